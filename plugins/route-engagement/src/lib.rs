//! `route-engagement`: the routing example of weir's demo and tests.
//!
//! - A `profile_viewed` event becomes a row of the typed table `profile_viewed`
//!   (`profile_id`, `viewer_id`, `self_view`, `source`) and, unless the user viewed
//!   their own profile, one more view in the counter `profile_views` for the profile.
//! - A `post_liked` event with a string `properties.post_id` adds one to the counter
//!   `post_likes` for the post.
//!
//! - With `forward_views_to` set, each view of someone else's profile is also forwarded
//!   to that webhook or topic sink (e.g. to notify the profile's owner).
//!
//! Every event is kept unchanged: the plugin only fans out. It expects to run after
//! `enrich`, which guarantees `profile_id` and sets `self_view`.
//!
//! Configuration (JSON, from the pipeline), every key optional; an empty name turns
//! that output off: `{"views_table": "profile_viewed", "views_counter":
//! "profile_views", "likes_counter": "post_likes", "count_self_views": false,
//! "forward_views_to": ""}`.

use serde::{Deserialize, Serialize};
use weir_plugin_sdk::{Event, Outcome, plugin};

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub views_table: String,
    pub views_counter: String,
    pub likes_counter: String,
    /// Count a user's views of their own profile too.
    pub count_self_views: bool,
    /// A webhook or topic sink each view of someone else's profile is forwarded to.
    pub forward_views_to: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            views_table: "profile_viewed".into(),
            views_counter: "profile_views".into(),
            likes_counter: "post_likes".into(),
            count_self_views: false,
            forward_views_to: String::new(),
        }
    }
}

/// A row of the `profile_viewed` table (its declared columns).
#[derive(Debug, Serialize)]
pub struct ProfileView<'a> {
    pub profile_id: &'a str,
    pub viewer_id: Option<&'a str>,
    pub self_view: bool,
    pub source: Option<&'a str>,
}

plugin!(route, config: Config);

pub fn route(mut event: Event, config: &Config) -> Outcome {
    match event.name() {
        "profile_viewed" => {
            let Some(profile) = event.property_str("profile_id").map(str::to_owned) else {
                return Outcome::reject("profile_viewed needs a string properties.profile_id");
            };
            let self_view = event.property("self_view") == Some(&true.into());
            if !config.views_table.is_empty() {
                let row = ProfileView {
                    profile_id: &profile,
                    viewer_id: event.user_id(),
                    self_view,
                    source: event.property_str("source"),
                };
                let row = serde_json::to_value(&row).expect("a row serialises");
                event.emit_row(config.views_table.clone(), &row);
            }
            if !config.views_counter.is_empty() && (config.count_self_views || !self_view) {
                event.count(config.views_counter.clone(), profile, 1);
            }
            if !config.forward_views_to.is_empty() && !self_view {
                event.forward(config.forward_views_to.clone());
            }
        }
        "post_liked" if !config.likes_counter.is_empty() => {
            if let Some(post) = event.property_str("post_id").map(str::to_owned) {
                event.count(config.likes_counter.clone(), post, 1);
            }
        }
        _ => {}
    }
    Outcome::keep(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_plugin_sdk::{Emitted, json};

    fn outputs(event: Event) -> Vec<Emitted> {
        let outcome = route(event, &Config::default());
        let kept = outcome.kept().expect("kept");
        assert!(!kept.is_changed(), "the router never changes the event");
        kept.outputs().to_vec()
    }

    #[test]
    fn a_view_is_a_row_and_a_count() {
        let e = Event::new("profile_viewed")
            .with_user("u1")
            .with_properties(json!({"profile_id": "p9", "self_view": false, "source": "search"}));
        let out = outputs(e);
        assert_eq!(out.len(), 2);
        match &out[0] {
            Emitted::Row { table, columns } => {
                assert_eq!(table, "profile_viewed");
                let v: serde_json::Value = serde_json::from_str(columns).unwrap();
                assert_eq!(
                    v,
                    json!({"profile_id": "p9", "viewer_id": "u1", "self_view": false, "source": "search"})
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            out[1],
            Emitted::Count {
                counter: "profile_views".into(),
                key: "p9".into(),
                delta: 1
            }
        );
    }

    #[test]
    fn a_self_view_is_a_row_but_not_a_count() {
        let e = Event::new("profile_viewed")
            .with_user("p9")
            .with_properties(json!({"profile_id": "p9", "self_view": true}));
        let out = outputs(e);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Emitted::Row { .. }));
    }

    #[test]
    fn views_are_forwarded_when_configured() {
        let config = Config {
            forward_views_to: "notify".into(),
            ..Config::default()
        };
        let e = Event::new("profile_viewed")
            .with_user("u1")
            .with_properties(json!({"profile_id": "p9", "self_view": false}));
        let outcome = route(e, &config);
        let out = outcome.kept().unwrap().outputs();
        assert_eq!(out.last(), Some(&Emitted::Forward("notify".into())));
    }

    #[test]
    fn likes_are_counted_by_post_and_other_events_pass() {
        let e = Event::new("post_liked").with_properties(json!({"post_id": "x1"}));
        assert_eq!(
            outputs(e),
            vec![Emitted::Count {
                counter: "post_likes".into(),
                key: "x1".into(),
                delta: 1
            }]
        );
        assert!(outputs(Event::new("app_opened")).is_empty());
        assert!(outputs(Event::new("post_liked")).is_empty());
    }
}
