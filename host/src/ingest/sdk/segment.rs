//! Segment's HTTP tracking API (`/v1/batch`, `/v1/track`, `/v1/identify`, `/v1/page`,
//! `/v1/screen`, `/v1/group`, `/v1/alias`, and `/v1/import` as RudderStack has it):
//! the messages that Segment's and RudderStack's SDKs send, turned into weir's own
//! events, which then go through the same checks as a `POST /v1/events` body (names,
//! ids, timestamps, strict JSON), so that plugins, schemas and sinks see no difference.
//!
//! The mapping, field by field (README, "Switching from Segment"):
//! - `messageId` -> `event_id` (a client's retry of a request carries the same ids, so
//!   deduplication drops the copy); none -> one is made.
//! - `track`: `event` -> `name`, in weir's form: letters and digits lowercased, every
//!   other run of characters one `_` (`Order Completed` -> `order_completed`); the name
//!   as sent is kept in `context.event_name`. The other types are events named
//!   `identify`, `page`, `screen`, `group`, `alias`.
//! - `userId`, or else `anonymousId` -> `user_id`; `anonymousId` is also kept in
//!   `context.anonymous_id` (how an anonymous visitor is tied to a user later).
//! - `properties` -> `properties` (track, page, screen; a page's or screen's `name` and
//!   `category` are added to them unless they have their own); `traits` ->
//!   `properties` (identify, group).
//! - `context` -> `context`, with `integrations`, `groupId` (group) and `previousId`
//!   (alias) added as `context.integrations`, `context.group_id`, `context.previous_id`.
//! - `timestamp` (or `originalTimestamp`), corrected for the client's clock as Segment
//!   does: `timestamp + (received - sentAt)` when the message or the batch has
//!   `sentAt`; none -> the receive time.
//!
//! Other fields of a message (`channel`, `version`, `receivedAt`, ...) are ignored, as
//! Segment's API ignores what it does not know.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::{Parsed, convert, corrected, id, key, message_object, name_of, object, time};
use crate::ingest::envelope::{self, EnvelopeError, Limits};

/// weir's field names as Segment's, in errors of weir's own checks.
const NAMES: &[(&str, &str)] = &[
    ("name", "event"),
    ("user_id", "userId"),
    ("event_id", "messageId"),
];

/// Largest message, in bytes, as Segment's API documents it.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Largest request body (after decompression), as Segment's API documents it.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;

/// Which endpoint a request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `/v1/batch` and `/v1/import`: `{"batch": [message, ...]}`, each with its `type`.
    Batch,
    /// One message of the type the path names.
    One(Type),
}

/// The type of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl Type {
    pub const ALL: [Type; 6] = [
        Type::Track,
        Type::Identify,
        Type::Page,
        Type::Screen,
        Type::Group,
        Type::Alias,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Type::Track => "track",
            Type::Identify => "identify",
            Type::Page => "page",
            Type::Screen => "screen",
            Type::Group => "group",
            Type::Alias => "alias",
        }
    }

    fn parse(s: &str) -> Option<Type> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(rename = "sentAt", default)]
    sent_at: Option<Value>,
    #[serde(rename = "writeKey", default)]
    write_key: Option<Value>,
}

/// Parses a body sent to `call` and turns its messages into weir's events. `limits`
/// are the ingest endpoint's (the event count applies to messages; each message is at
/// most [`MAX_MESSAGE_BYTES`]); `received_ms` is the receive time.
pub fn parse(
    body: &[u8],
    call: Call,
    limits: &Limits,
    received_ms: i64,
    new_id: impl FnMut() -> String,
) -> Result<Parsed, EnvelopeError> {
    let text = envelope::utf8(body)?;
    let (messages, sent_at, write_key) = match call {
        Call::Batch => {
            let b: BatchBody = serde_json::from_str(text).map_err(|e| {
                if text.trim_start().starts_with('{') && e.is_data() {
                    EnvelopeError::field(
                        "invalid_field",
                        "batch",
                        format!("a batch is {{\"batch\": [message, ...]}}: {e}"),
                    )
                } else {
                    envelope::json_error(e)
                }
            })?;
            let sent_at = match b.sent_at {
                Some(v) => time(Some(&v), "sentAt")?,
                None => None,
            };
            let write_key = key(b.write_key, "writeKey")?;
            (b.batch, sent_at, write_key)
        }
        Call::One(_) => {
            let raw: &RawValue = serde_json::from_str(text).map_err(envelope::json_error)?;
            (vec![raw], None, None)
        }
    };
    convert(
        messages,
        write_key,
        limits,
        received_ms,
        new_id,
        NAMES,
        |raw| message(raw, call, sent_at, received_ms),
    )
}

/// One message as weir's event (JSON), and the write key it carried.
fn message(
    raw: &str,
    call: Call,
    batch_sent_at: Option<i64>,
    received_ms: i64,
) -> Result<(Value, Option<String>), EnvelopeError> {
    let mut m = message_object(raw, MAX_MESSAGE_BYTES)?;
    let ty = match (call, m.get("type")) {
        (Call::One(ty), _) => ty,
        (Call::Batch, Some(Value::String(s))) => Type::parse(s).ok_or_else(|| {
            EnvelopeError::field(
                "invalid_field",
                "type",
                format!(
                    "unknown message type {s:?}; one of {}",
                    Type::ALL.map(Type::as_str).join(", ")
                ),
            )
        })?,
        (Call::Batch, _) => {
            return Err(EnvelopeError::field(
                "invalid_field",
                "type",
                "each message of a batch needs a \"type\" (track, identify, ...)",
            ));
        }
    };
    let write_key = key(m.remove("writeKey"), "writeKey")?;
    let user_id = id(m.remove("userId"), "userId")?;
    let anonymous_id = id(m.remove("anonymousId"), "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(EnvelopeError::field(
            "invalid_field",
            "userId",
            "a message needs a userId or an anonymousId",
        ));
    }
    let mut context = object(&mut m, "context")?;
    if let Some(a) = &anonymous_id {
        context.insert("anonymous_id".into(), json!(a));
    }
    let integrations = object(&mut m, "integrations")?;
    if !integrations.is_empty() {
        context.insert("integrations".into(), Value::Object(integrations));
    }
    let (name, properties) = match ty {
        Type::Track => {
            let (event, name) = name_of(m.get("event"), "event")?;
            context.insert("event_name".into(), json!(event));
            (name, object(&mut m, "properties")?)
        }
        Type::Page | Type::Screen => {
            let mut properties = object(&mut m, "properties")?;
            for key in ["name", "category"] {
                if let Some(v) = m.remove(key).filter(|v| !v.is_null()) {
                    properties.entry(key).or_insert(v);
                }
            }
            (ty.as_str().to_owned(), properties)
        }
        Type::Identify => (ty.as_str().to_owned(), traits(&mut m, &context)?),
        Type::Group => {
            if let Some(g) = id(m.remove("groupId"), "groupId")? {
                context.insert("group_id".into(), json!(g));
            }
            (ty.as_str().to_owned(), traits(&mut m, &context)?)
        }
        Type::Alias => {
            if let Some(p) = id(m.remove("previousId"), "previousId")? {
                context.insert("previous_id".into(), json!(p));
            }
            (ty.as_str().to_owned(), Map::new())
        }
    };
    let stamp = match time(m.get("timestamp"), "timestamp")? {
        Some(t) => Some(t),
        None => time(m.get("originalTimestamp"), "originalTimestamp")?,
    };
    let sent_at = time(m.get("sentAt"), "sentAt")?.or(batch_sent_at);
    let timestamp = corrected(stamp, sent_at, received_ms);
    let mut event = json!({
        "name": name,
        "user_id": user_id.or(anonymous_id),
        "timestamp": timestamp,
        "properties": properties,
        "context": context,
    });
    if let Some(mid) = id(m.remove("messageId"), "messageId")? {
        event["event_id"] = json!(mid);
    }
    Ok((event, write_key))
}

/// The traits of an identify or group call: `traits`, or where RudderStack's SDKs put
/// them, `context.traits`.
fn traits(
    m: &mut Map<String, Value>,
    context: &Map<String, Value>,
) -> Result<Map<String, Value>, EnvelopeError> {
    let traits = object(m, "traits")?;
    if !traits.is_empty() {
        return Ok(traits);
    }
    Ok(match context.get("traits") {
        Some(Value::Object(t)) => t.clone(),
        _ => traits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ingest::envelope::tests::LIMITS;

    const NOW: i64 = 1_796_000_000_000;

    fn parse_ok(body: &str, call: Call) -> Parsed {
        let mut n = 0;
        parse(body.as_bytes(), call, &LIMITS, NOW, || {
            n += 1;
            format!("made-{n}")
        })
        .unwrap_or_else(|e| panic!("{body}: {e:?}"))
    }

    fn parse_err(body: &str, call: Call) -> EnvelopeError {
        parse(body.as_bytes(), call, &LIMITS, NOW, || "x".into()).unwrap_err()
    }

    fn json_of(raw: &RawValue) -> Value {
        serde_json::from_str(raw.get()).unwrap()
    }

    #[test]
    fn a_batch_of_every_type_maps_field_by_field() {
        let body = r#"{
          "writeKey": "wk_body",
          "sentAt": "2026-12-04T18:00:10.000Z",
          "batch": [
            {"type": "track", "event": "Order Completed", "messageId": "m1", "userId": "u1",
             "anonymousId": "a1", "properties": {"total": 30}, "context": {"library": {"name": "analytics-python"}},
             "integrations": {"All": true}, "timestamp": "2026-12-04T18:00:00.000Z"},
            {"type": "identify", "messageId": "m2", "userId": 42, "anonymousId": "a1", "traits": {"plan": "pro"}},
            {"type": "page", "messageId": "m3", "anonymousId": "a2", "name": "Home", "properties": {"path": "/"}},
            {"type": "screen", "messageId": "m4", "userId": "u1", "name": "Feed", "category": "main", "properties": {"name": "own"}},
            {"type": "group", "messageId": "m5", "userId": "u1", "groupId": "g1", "traits": {"size": 3}},
            {"type": "alias", "messageId": "m6", "userId": "u1", "previousId": "a1"}
          ]}"#;
        let p = parse_ok(body, Call::Batch);
        assert_eq!(p.write_key.as_deref(), Some("wk_body"));
        let e = &p.events;
        assert_eq!(e.len(), 6);
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "order_completed",
                "identify",
                "page",
                "screen",
                "group",
                "alias"
            ]
        );
        let ids: Vec<&str> = e.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5", "m6"]);
        // userId wins; anonymousId when there is none; numbers as text.
        assert_eq!(e[0].user_id.as_deref(), Some("u1"));
        assert_eq!(e[1].user_id.as_deref(), Some("42"));
        assert_eq!(e[2].user_id.as_deref(), Some("a2"));
        // The client's clock was 10 s behind: its timestamp moves by as much.
        assert_eq!(e[0].timestamp_ms, NOW - 10_000);
        // No timestamp: the receive time.
        assert_eq!(e[1].timestamp_ms, NOW);
        assert_eq!(json_of(&e[0].properties), json!({"total": 30}));
        assert_eq!(
            json_of(&e[0].context),
            json!({"library": {"name": "analytics-python"}, "anonymous_id": "a1",
                   "integrations": {"All": true}, "event_name": "Order Completed"})
        );
        assert_eq!(json_of(&e[1].properties), json!({"plan": "pro"}));
        // RudderStack's SDKs send an identify's traits in its context.
        let rudder = r#"{"userId": "u", "context": {"traits": {"plan": "free"}}}"#;
        let p = parse_ok(rudder, Call::One(Type::Identify));
        assert_eq!(json_of(&p.events[0].properties), json!({"plan": "free"}));
        assert_eq!(
            json_of(&e[2].properties),
            json!({"path": "/", "name": "Home"})
        );
        // The screen's own properties.name is kept.
        assert_eq!(
            json_of(&e[3].properties),
            json!({"name": "own", "category": "main"})
        );
        assert_eq!(json_of(&e[4].properties), json!({"size": 3}));
        assert_eq!(json_of(&e[4].context), json!({"group_id": "g1"}));
        assert_eq!(json_of(&e[5].context), json!({"previous_id": "a1"}));
    }

    #[test]
    fn a_single_call_takes_its_type_from_the_path_and_its_key_from_the_body() {
        let p = parse_ok(
            r#"{"event": "Signed Up", "userId": "u9", "writeKey": "wk_1", "sentAt": "2026-12-04T18:00:00Z", "timestamp": "2026-12-04T17:59:59Z"}"#,
            Call::One(Type::Track),
        );
        assert_eq!(p.write_key.as_deref(), Some("wk_1"));
        assert_eq!(p.events[0].name, "signed_up");
        assert_eq!(p.events[0].timestamp_ms, NOW - 1000);
        // No messageId: one is made.
        assert_eq!(p.events[0].event_id, "made-1");
        let p = parse_ok(
            r#"{"userId": "u9", "traits": {"a": 1}}"#,
            Call::One(Type::Identify),
        );
        assert_eq!(p.events[0].name, "identify");
        assert_eq!(p.write_key, None);
    }

    /// Checks that `body` sent to `call` is refused with `code`, naming message `index`
    /// and `field`.
    fn refused(call: Call, body: &str, code: &str, index: Option<usize>, field: Option<&str>) {
        let e = parse_err(body, call);
        assert_eq!(
            (e.code, e.index, e.field.as_deref()),
            (code, index, field),
            "{body}: {e:?}"
        );
    }

    #[test]
    fn bad_batches_are_refused_naming_the_message_and_the_field() {
        let b = Call::Batch;
        refused(b, "not json", "malformed_json", None, None);
        refused(b, r#"{"batch": 5}"#, "invalid_field", None, Some("batch"));
        refused(b, r#"{"batch": []}"#, "empty_batch", None, None);
        let second_untyped =
            r#"{"batch": [{"type": "track", "userId": "u", "event": "e"}, {"userId": "u"}]}"#;
        refused(b, second_untyped, "invalid_field", Some(1), Some("type"));
        let unknown = r#"{"batch": [{"type": "boom", "userId": "u"}]}"#;
        refused(b, unknown, "invalid_field", Some(0), Some("type"));
        let key = r#"{"writeKey": [], "batch": [{"type": "alias", "userId": "u"}]}"#;
        refused(b, key, "invalid_field", None, Some("writeKey"));
    }

    #[test]
    fn bad_messages_are_refused_naming_the_field() {
        let t = Call::One(Type::Track);
        let at = Some(0);
        refused(t, r#"{"event": "e"}"#, "invalid_field", at, Some("userId"));
        refused(t, r#"{"userId": "u"}"#, "invalid_field", at, Some("event"));
        let no_letters = r#"{"userId": "u", "event": "!!"}"#;
        refused(t, no_letters, "invalid_field", at, Some("event"));
        let array_props = r#"{"userId": "u", "event": "e", "properties": [1]}"#;
        refused(t, array_props, "invalid_field", at, Some("properties"));
        let object_id = r#"{"userId": {"a": 1}, "event": "e"}"#;
        refused(t, object_id, "invalid_field", at, Some("userId"));
        let empty_id = r#"{"userId": "", "anonymousId": "a", "event": "e"}"#;
        refused(t, empty_id, "invalid_field", at, Some("userId"));
        let control = r#"{"userId": "u", "anonymousId": "a\u0010", "event": "e"}"#;
        refused(t, control, "invalid_field", at, Some("anonymousId"));
        let integrations = r#"{"userId": "u", "event": "e", "integrations": 5}"#;
        refused(t, integrations, "invalid_field", at, Some("integrations"));
        let key = r#"{"userId": "u", "event": "e", "writeKey": 5}"#;
        refused(t, key, "invalid_field", at, Some("writeKey"));
        let time = r#"{"userId": "u", "event": "e", "timestamp": "yesterday"}"#;
        refused(t, time, "invalid_field", at, Some("timestamp"));
        let sent = r#"{"userId": "u", "event": "e", "sentAt": 4294967296000}"#;
        refused(t, sent, "invalid_field", at, Some("sentAt"));
        let early = r#"{"userId": "u", "event": "e", "timestamp": -109, "sentAt": 0}"#;
        refused(t, early, "invalid_field", at, Some("timestamp"));
        let twice = r#"{"userId": "u", "event": "e", "properties": {"a": 1, "a": 2}}"#;
        refused(t, twice, "duplicate_key", at, Some("properties.a"));
        let array = r#"[{"userId": "u", "event": "e"}]"#;
        refused(t, array, "invalid_event", at, None);
        // weir's own checks speak of the SDK's fields.
        let long = format!(r#"{{"userId": "{}", "event": "e"}}"#, "u".repeat(300));
        let e = parse_err(&long, t);
        assert_eq!(e.field.as_deref(), Some("userId"), "{e:?}");
        assert!(e.message.contains("\"userId\""), "{}", e.message);
    }

    #[test]
    fn a_clock_correction_out_of_range_keeps_the_time_as_sent() {
        let p = parse_ok(
            r#"{"userId": "u", "event": "e", "timestamp": "1970-01-01T00:00:01Z", "sentAt": "2100-01-01T00:00:00Z"}"#,
            Call::One(Type::Track),
        );
        assert_eq!(p.events[0].timestamp_ms, 1000);
    }

    #[test]
    fn segment_sizes_and_counts_are_the_limits() {
        let big = format!(
            r#"{{"userId": "u", "event": "e", "properties": {{"x": "{}"}}}}"#,
            "y".repeat(MAX_MESSAGE_BYTES)
        );
        assert_eq!(
            parse_err(&big, Call::One(Type::Track)).code,
            "event_too_large"
        );
        let many: Vec<String> = (0..1001)
            .map(|i| format!(r#"{{"type": "track", "userId": "u", "event": "e{i}"}}"#))
            .collect();
        let body = format!(r#"{{"batch": [{}]}}"#, many.join(","));
        assert_eq!(parse_err(&body, Call::Batch).code, "too_many_events");
    }
}
