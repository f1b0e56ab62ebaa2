//! PostHog's capture API (`/batch/`, `/capture/`, `/e/`, `/i/v0/e/`, with or without the
//! trailing slash): the events PostHog's SDKs send, as weir's events.
//!
//! A body is one event, a JSON array of events, or `{"batch": [event, ...]}`; every
//! path takes each form, as PostHog's own capture does. The project key (weir's write
//! key) is `api_key` or `token` in the body, in an event, or in its
//! `properties.token` (posthog-js), or weir's Bearer key.
//!
//! The mapping, field by field (README, "Switching from PostHog"):
//! - `uuid` -> `event_id` (a retry carries the same; one is made when absent).
//! - `event` -> `name` in weir's form (`$pageview` -> `pageview`, `user signed up` ->
//!   `user_signed_up`); the name as sent is kept in `context.event_name`.
//! - `distinct_id` (or `properties.distinct_id`, where posthog-js puts it) -> `user_id`.
//! - `properties` -> `properties` (without `token`, the key); `$set` and `$set_once`
//!   given beside them are added to them under those names.
//! - `$identify`: `properties.$anon_distinct_id` -> `context.anonymous_id`.
//!   `$create_alias`: `user_id` is `properties.alias` (the id the person is known by
//!   from now on) and `context.previous_id` the `distinct_id` it replaces.
//! - `timestamp`, corrected for the client's clock: `received - offset` when the event
//!   has an `offset` (ms before sending, posthog-js), else `timestamp + (received -
//!   sent_at)` when the request or event has `sent_at`; none -> the receive time.
//!
//! Other fields (`type`, `library`, `historical_migration`, ...) are ignored.

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::{Parsed, convert, corrected, id, key, message_object, name_of, object, time};
use crate::ingest::envelope::{self, EnvelopeError, Limits};
use crate::model::MAX_TIMESTAMP_MS;

/// weir's field names as PostHog's, in errors of weir's own checks.
const NAMES: &[(&str, &str)] = &[
    ("name", "event"),
    ("user_id", "distinct_id"),
    ("event_id", "uuid"),
];

/// Parses a body sent to the capture API and turns its events into weir's. Each event
/// is at most `limits.max_event_bytes`; `received_ms` is the receive time.
pub fn parse(
    body: &[u8],
    limits: &Limits,
    received_ms: i64,
    new_id: impl FnMut() -> String,
) -> Result<Parsed, EnvelopeError> {
    let text = envelope::utf8(body)?;
    let (raws, write_key, sent_at) = if text.trim_start().starts_with('[') {
        let raws: Vec<&RawValue> = serde_json::from_str(text).map_err(envelope::json_error)?;
        (raws, None, None)
    } else {
        // An event, or a batch: the top level holds the key either way.
        // Parsed first, so that broken or too deep JSON is told as such
        // (`malformed_json`, `too_deep`); then no key may be given twice.
        let mut top: Map<String, Value> =
            serde_json::from_str(text).map_err(envelope::json_error)?;
        envelope::check_unambiguous(text, "")?;
        // Each is checked, the first given is used.
        let api_key = key(top.remove("api_key"), "api_key")?;
        let write_key = api_key.or(key(top.remove("token"), "token")?);
        let sent_at = time(top.get("sent_at"), "sent_at")?;
        if top.contains_key("batch") {
            #[derive(serde::Deserialize)]
            struct Batch<'a> {
                #[serde(borrow)]
                batch: Vec<&'a RawValue>,
            }
            let b: Batch = serde_json::from_str(text).map_err(|e| {
                EnvelopeError::field(
                    "invalid_field",
                    "batch",
                    format!("\"batch\" must be an array of events: {e}"),
                )
            })?;
            (b.batch, write_key, sent_at)
        } else {
            let raw: &RawValue = serde_json::from_str(text).map_err(envelope::json_error)?;
            (vec![raw], write_key, None)
        }
    };
    convert(raws, write_key, limits, received_ms, new_id, NAMES, |raw| {
        event(raw, limits, sent_at, received_ms)
    })
}

/// One PostHog event as weir's (JSON), and the key it carried.
fn event(
    raw: &str,
    limits: &Limits,
    batch_sent_at: Option<i64>,
    received_ms: i64,
) -> Result<(Value, Option<String>), EnvelopeError> {
    let mut m = message_object(raw, limits.max_event_bytes)?;
    let mut properties = object(&mut m, "properties")?;
    // Each is checked, the first given is used.
    let api_key = key(m.remove("api_key"), "api_key")?;
    let token = key(m.remove("token"), "token")?;
    let in_properties = key(properties.remove("token"), "properties.token")?;
    let write_key = api_key.or(token).or(in_properties);
    let (event, name) = name_of(m.get("event"), "event")?;
    let mut distinct_id = id(m.remove("distinct_id"), "distinct_id")?;
    if distinct_id.is_none() {
        distinct_id = id(properties.remove("distinct_id"), "distinct_id")?;
    }
    let Some(distinct_id) = distinct_id else {
        return Err(EnvelopeError::field(
            "invalid_field",
            "distinct_id",
            "an event needs a distinct_id",
        ));
    };
    for set in ["$set", "$set_once"] {
        let value = object(&mut m, set)?;
        if !value.is_empty() {
            properties.entry(set).or_insert(Value::Object(value));
        }
    }
    let mut context = Map::new();
    context.insert("event_name".into(), json!(event));
    let user_id = match event.as_str() {
        "$identify" => {
            if let Some(anon) = id(
                properties.get("$anon_distinct_id").cloned(),
                "$anon_distinct_id",
            )? {
                context.insert("anonymous_id".into(), json!(anon));
            }
            distinct_id
        }
        "$create_alias" => match id(properties.get("alias").cloned(), "alias")? {
            Some(alias) => {
                context.insert("previous_id".into(), json!(distinct_id));
                alias
            }
            None => distinct_id,
        },
        _ => distinct_id,
    };
    let offset = match m.get("offset") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|ms| ms <= MAX_TIMESTAMP_MS as u64) => {
            n.as_u64()
        }
        Some(_) => {
            return Err(EnvelopeError::field(
                "invalid_field",
                "offset",
                format!("\"offset\" must be whole milliseconds, 0-{MAX_TIMESTAMP_MS}"),
            ));
        }
    };
    // Both are checked, whichever is used.
    let stamp = time(m.get("timestamp"), "timestamp")?;
    let sent_at = time(m.get("sent_at"), "sent_at")?.or(batch_sent_at);
    let timestamp = match offset {
        Some(o) => Some(received_ms.saturating_sub(i64::try_from(o).unwrap_or(i64::MAX)))
            .filter(|t| *t >= 0)
            .unwrap_or(received_ms),
        None => corrected(stamp, sent_at, received_ms),
    };
    let mut out = json!({
        "name": name,
        "user_id": user_id,
        "timestamp": timestamp,
        "properties": properties,
        "context": context,
    });
    if let Some(uuid) = id(m.remove("uuid"), "uuid")? {
        out["event_id"] = json!(uuid);
    }
    Ok((out, write_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ingest::envelope::tests::LIMITS;

    const NOW: i64 = 1_796_000_000_000;

    fn parse_ok(body: &str) -> Parsed {
        let mut n = 0;
        parse(body.as_bytes(), &LIMITS, NOW, || {
            n += 1;
            format!("made-{n}")
        })
        .unwrap_or_else(|e| panic!("{body}: {e:?}"))
    }

    fn props(e: &crate::model::WireEvent) -> Value {
        serde_json::from_str(e.properties.get()).unwrap()
    }

    fn ctx(e: &crate::model::WireEvent) -> Value {
        serde_json::from_str(e.context.get()).unwrap()
    }

    #[test]
    fn a_batch_from_posthog_python_maps_field_by_field() {
        let body = r#"{"api_key": "phc_key", "sent_at": "2026-12-04T18:00:10+00:00", "batch": [
          {"event": "user signed up", "distinct_id": "u1", "uuid": "01", "timestamp": "2026-12-04T18:00:00+00:00",
           "properties": {"plan": "pro", "$lib": "posthog-python"}, "type": "capture"},
          {"event": "$set", "distinct_id": 42, "uuid": "02", "$set": {"email": "a@b.c"}, "properties": {}},
          {"event": "$create_alias", "distinct_id": "anon-9", "uuid": "03", "properties": {"distinct_id": "anon-9", "alias": "u1"}},
          {"event": "$identify", "distinct_id": "u1", "uuid": "04", "properties": {"$anon_distinct_id": "anon-9"}}
        ]}"#;
        let p = parse_ok(body);
        assert_eq!(p.write_key.as_deref(), Some("phc_key"));
        let e = &p.events;
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["user_signed_up", "set", "create_alias", "identify"]);
        let ids: Vec<&str> = e.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["01", "02", "03", "04"]);
        assert_eq!(e[0].user_id.as_deref(), Some("u1"));
        assert_eq!(e[0].timestamp_ms, NOW - 10_000);
        assert_eq!(
            props(&e[0]),
            json!({"plan": "pro", "$lib": "posthog-python"})
        );
        assert_eq!(ctx(&e[0]), json!({"event_name": "user signed up"}));
        assert_eq!(e[1].user_id.as_deref(), Some("42"));
        assert_eq!(props(&e[1]), json!({"$set": {"email": "a@b.c"}}));
        // An alias: the new id is the user, the one it replaces is kept.
        assert_eq!(e[2].user_id.as_deref(), Some("u1"));
        assert_eq!(ctx(&e[2])["previous_id"], "anon-9");
        assert_eq!(e[3].user_id.as_deref(), Some("u1"));
        assert_eq!(ctx(&e[3])["anonymous_id"], "anon-9");
    }

    #[test]
    fn posthog_js_arrays_carry_the_key_and_the_id_in_properties() {
        let body = r#"[{"event": "$pageview", "offset": 1500,
            "properties": {"distinct_id": "d1", "token": "phc_js", "$current_url": "https://x/"}}]"#;
        let p = parse_ok(body);
        assert_eq!(p.write_key.as_deref(), Some("phc_js"));
        let e = &p.events[0];
        assert_eq!(
            (e.name.as_str(), e.user_id.as_deref()),
            ("pageview", Some("d1"))
        );
        assert_eq!(e.timestamp_ms, NOW - 1500);
        assert_eq!(e.event_id, "made-1");
        // The key is not stored.
        assert_eq!(props(e), json!({"$current_url": "https://x/"}));
        // One event alone, its key beside it.
        let p = parse_ok(r#"{"token": "phc_1", "event": "clicked", "distinct_id": "d2"}"#);
        assert_eq!(p.write_key.as_deref(), Some("phc_1"));
        assert_eq!(p.events[0].name, "clicked");
    }

    #[test]
    fn bad_events_are_refused_naming_the_event_and_the_field() {
        let refused = |body: &str, code: &str, index: Option<usize>, field: Option<&str>| {
            let e = parse(body.as_bytes(), &LIMITS, NOW, || "x".into()).unwrap_err();
            assert_eq!(
                (e.code, e.index, e.field.as_deref()),
                (code, index, field),
                "{body}"
            );
        };
        refused("[]", "empty_batch", None, None);
        refused(r#"{"batch": {}}"#, "invalid_field", None, Some("batch"));
        // Broken and too deep JSON are told as such, an object body as an array one.
        refused(r#"{"event":"#, "malformed_json", None, None);
        refused(r#"[{"event":"#, "malformed_json", None, None);
        let deep = format!(
            r#"{{"event": "e", "p": {}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        refused(&deep, "too_deep", None, None);
        refused(
            r#"{"event": "e", "event": "f"}"#,
            "duplicate_key",
            None,
            Some("event"),
        );
        refused(
            r#"[{"distinct_id": "d"}]"#,
            "invalid_field",
            Some(0),
            Some("event"),
        );
        refused(
            r#"[{"event": "e"}]"#,
            "invalid_field",
            Some(0),
            Some("distinct_id"),
        );
        refused(
            r#"[{"event": "$$", "distinct_id": "d"}]"#,
            "invalid_field",
            Some(0),
            Some("event"),
        );
        let offset = r#"[{"event": "e", "distinct_id": "d", "offset": -5}]"#;
        refused(offset, "invalid_field", Some(0), Some("offset"));
        let offset = r#"[{"event": "e", "distinct_id": "d", "offset": 4294967296000}]"#;
        refused(offset, "invalid_field", Some(0), Some("offset"));
        // At most 128 characters as sent, though weir's form would be shorter.
        let long = format!(
            r#"[{{"event": "a{}", "distinct_id": "d"}}]"#,
            "!".repeat(200)
        );
        refused(&long, "invalid_field", Some(0), Some("event"));
        // With an offset the timestamp is not used, but still checked.
        let both = r#"[{"event": "e", "distinct_id": "d", "offset": 5, "timestamp": true}]"#;
        refused(both, "invalid_field", Some(0), Some("timestamp"));
        let twice = r#"[{"event": "e", "distinct_id": "d", "properties": {"a": 1, "a": 2}}]"#;
        refused(twice, "duplicate_key", Some(0), Some("properties.a"));
        let long = format!(
            r#"[{{"event": "e", "distinct_id": "{}"}}]"#,
            "d".repeat(300)
        );
        refused(&long, "invalid_field", Some(0), Some("distinct_id"));
        refused(
            r#"{"api_key": 5, "event": "e", "distinct_id": "d"}"#,
            "invalid_field",
            None,
            Some("api_key"),
        );
        let token =
            r#"{"api_key": "k", "token": 5, "batch": [{"event": "e", "distinct_id": "d"}]}"#;
        refused(token, "invalid_field", None, Some("token"));
        let inner =
            r#"[{"api_key": "k", "event": "e", "distinct_id": "d", "properties": {"token": 1}}]"#;
        refused(inner, "invalid_field", Some(0), Some("properties.token"));
    }
}
