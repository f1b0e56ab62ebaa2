//! `enrich`: the example plugin of weir's demo and end-to-end tests.
//!
//! For engagement events it
//! - drops test traffic (an event whose `properties.<drop_flag>` is `true`);
//! - rejects events that need a user (`require_user`) but have no `user_id`;
//! - rejects a `profile_viewed` without a string `properties.profile_id`, and marks
//!   the others with `self_view` (did the user look at their own profile?);
//! - stamps every kept event with `properties.enriched_by = "enrich"`.
//!
//! Configuration (JSON, from the pipeline), every key optional:
//! `{"require_user": ["profile_viewed", "post_liked"], "drop_flag": "is_test"}`.

use serde::Deserialize;
use weir_plugin_sdk::{Event, Outcome, counter_add, plugin};

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Event names that must carry a `user_id`.
    pub require_user: Vec<String>,
    /// A boolean property marking test traffic to drop.
    pub drop_flag: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            require_user: vec!["profile_viewed".into(), "post_liked".into()],
            drop_flag: "is_test".into(),
        }
    }
}

plugin!(enrich, config: Config);

pub fn enrich(mut event: Event, config: &Config) -> Outcome {
    if event.property(&config.drop_flag) == Some(&true.into()) {
        counter_add("dropped_test_traffic", 1);
        return Outcome::drop("test traffic");
    }
    if event.user_id().is_none() && config.require_user.iter().any(|n| n == event.name()) {
        return Outcome::reject(format!("{} requires a user_id", event.name()));
    }
    if event.name() == "profile_viewed" {
        let Some(profile) = event.property_str("profile_id") else {
            return Outcome::reject("profile_viewed needs a string properties.profile_id");
        };
        let self_view = event.user_id() == Some(profile);
        event.set_property("self_view", self_view);
    }
    event.set_property("enriched_by", "enrich");
    Outcome::keep(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_plugin_sdk::json;

    fn run(event: Event) -> Outcome {
        enrich(event, &Config::default())
    }

    #[test]
    fn stamps_kept_events() {
        let out = run(Event::new("app_opened"));
        assert_eq!(
            out.kept().unwrap().property_str("enriched_by"),
            Some("enrich")
        );
    }

    #[test]
    fn profile_views_need_a_user_and_a_profile() {
        assert!(
            matches!(run(Event::new("profile_viewed")), Outcome::Reject(r) if r.contains("user_id"))
        );
        let no_profile = Event::new("profile_viewed").with_user("u1");
        assert!(matches!(run(no_profile), Outcome::Reject(r) if r.contains("profile_id")));
        let own = Event::new("profile_viewed")
            .with_user("u1")
            .with_properties(json!({"profile_id": "u1"}));
        assert_eq!(
            run(own).kept().unwrap().property("self_view"),
            Some(&json!(true))
        );
        let other = Event::new("profile_viewed")
            .with_user("u1")
            .with_properties(json!({"profile_id": "u2"}));
        assert_eq!(
            run(other).kept().unwrap().property("self_view"),
            Some(&json!(false))
        );
    }

    #[test]
    fn drops_test_traffic_and_counts_it() {
        let test = Event::new("app_opened").with_properties(json!({"is_test": true}));
        assert!(matches!(run(test), Outcome::Drop(_)));
        assert_eq!(
            weir_plugin_sdk::testing::counters()["dropped_test_traffic"],
            1
        );
    }
}
