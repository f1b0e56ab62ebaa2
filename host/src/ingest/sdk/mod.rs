//! The APIs of the tracking SDKs apps already use: Segment's (and RudderStack's, see
//! [`segment`]) and PostHog's capture API (see [`posthog`]). Each turns the SDK's
//! messages into weir's events (JSON), which then go through the same checks as a
//! `POST /v1/events` body ([`finish`]: names, ids, timestamps, strict JSON), so that
//! plugins, schemas and sinks see no difference.

pub mod posthog;
pub mod segment;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::envelope::{self, BodyFormat, EnvelopeError, Limits};
use crate::model::{MAX_TIMESTAMP_MS, WireEvent, json_kind};

/// A request's events, and the write key its body carried, if any (analytics-python
/// and PostHog's SDKs send it only there).
#[derive(Debug)]
pub struct Parsed {
    pub write_key: Option<String>,
    pub events: Vec<WireEvent>,
}

/// The messages of one request (`raws`) as weir's events: at least one and at most
/// `limits.max_events`, each mapped by `map` (its error placed at its position), the
/// request's write key or else the first a message carried, then [`finish`].
pub(crate) fn convert(
    raws: Vec<&RawValue>,
    write_key: Option<String>,
    limits: &Limits,
    received_ms: i64,
    new_id: impl FnMut() -> String,
    names: &[(&str, &str)],
    mut map: impl FnMut(&str) -> Result<(Value, Option<String>), EnvelopeError>,
) -> Result<Parsed, EnvelopeError> {
    if raws.is_empty() {
        return Err(EnvelopeError::new(
            "empty_batch",
            "the request holds no events",
        ));
    }
    if raws.len() > limits.max_events {
        return Err(EnvelopeError::new(
            "too_many_events",
            format!("the request holds more than {} events", limits.max_events),
        ));
    }
    let mut write_key = write_key;
    let mut events = Vec::with_capacity(raws.len());
    for (i, raw) in raws.into_iter().enumerate() {
        let (event, key) = map(raw.get()).map_err(|e| e.at(i))?;
        write_key = write_key.or(key);
        events.push(event);
    }
    let events = finish(&events, limits, received_ms, new_id, names)?;
    Ok(Parsed { write_key, events })
}

/// weir's own checks on the events an SDK's messages became, as for a body of `POST
/// /v1/events`. Each message was held to its size limit already, so the event it
/// became is not held to weir's again. `names` maps weir's field names to the SDK's,
/// for the errors.
pub(crate) fn finish(
    events: &[Value],
    limits: &Limits,
    received_ms: i64,
    new_id: impl FnMut() -> String,
    names: &[(&str, &str)],
) -> Result<Vec<WireEvent>, EnvelopeError> {
    let native = serde_json::to_vec(events).expect("JSON values serialise");
    let limits = Limits {
        max_event_bytes: usize::MAX,
        ..*limits
    };
    envelope::parse_body(&native, BodyFormat::Json, &limits, received_ms, new_id).map_err(
        |mut e| {
            let theirs = e
                .field
                .as_deref()
                .and_then(|f| names.iter().find(|(ours, _)| *ours == f));
            if let Some((ours, theirs)) = theirs {
                e.message = e
                    .message
                    .replace(&format!("\"{ours}\""), &format!("\"{theirs}\""));
                e.field = Some((*theirs).to_owned());
            }
            e
        },
    )
}

/// An SDK's event name in weir's form: ASCII letters and digits lowercased, every
/// other run of characters one `_`, none at either end (`Order Completed` ->
/// `order_completed`, `$pageview` -> `pageview`). None when nothing is left.
pub fn event_name(event: &str) -> Option<String> {
    let mut out = String::with_capacity(event.len());
    let mut gap = false;
    for c in event.chars() {
        if c.is_ascii_alphanumeric() {
            if gap && !out.is_empty() {
                out.push('_');
            }
            gap = false;
            out.push(c.to_ascii_lowercase());
        } else {
            gap = true;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// One message's text as a JSON object: at most `max_bytes`, and held to the strict
/// JSON rules of weir's own events (no key twice, no number beyond a double, no lone
/// surrogate).
pub(crate) fn message_object(
    raw: &str,
    max_bytes: usize,
) -> Result<Map<String, Value>, EnvelopeError> {
    if raw.len() > max_bytes {
        return Err(EnvelopeError::new(
            "event_too_large",
            format!(
                "the message is {} bytes; the limit is {max_bytes}",
                raw.len()
            ),
        ));
    }
    envelope::check_unambiguous(raw, "")?;
    serde_json::from_str(raw)
        .map_err(|_| EnvelopeError::new("invalid_event", "a message must be a JSON object"))
}

/// The event name in field `field`, as sent and in weir's form; an error naming the
/// field when it is not a string or has no letter or digit.
pub(crate) fn name_of(v: Option<&Value>, field: &str) -> Result<(String, String), EnvelopeError> {
    let Some(Value::String(event)) = v else {
        return Err(EnvelopeError::field(
            "invalid_field",
            field,
            format!("the message needs an \"{field}\" name (a string)"),
        ));
    };
    // Bounded as sent (weir's form is never longer), as the API documents it.
    let chars = event.chars().count();
    if chars > crate::model::MAX_EVENT_NAME {
        return Err(EnvelopeError::field(
            "invalid_field",
            field,
            format!(
                "the event name is {chars} characters; at most {}",
                crate::model::MAX_EVENT_NAME
            ),
        ));
    }
    let name = event_name(event).ok_or_else(|| {
        EnvelopeError::field(
            "invalid_field",
            field,
            format!("the event name {event:?} has no letter or digit to name it by"),
        )
    })?;
    Ok((event.clone(), name))
}

/// A write key field (`writeKey`, `api_key`, `token`): a string, if given.
pub(crate) fn key(v: Option<Value>, field: &str) -> Result<Option<String>, EnvelopeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(k)) => Ok(Some(k)),
        Some(other) => Err(EnvelopeError::field(
            "invalid_field",
            field,
            format!("\"{field}\" must be a string, not {}", json_kind(&other)),
        )),
    }
}

/// An id field: a string, or a number (some SDKs send numeric user ids) as its text.
/// Absent or null is none; a string is held to weir's rules for ids (1-256 bytes, no
/// control characters), wherever it ends up.
pub(crate) fn id(v: Option<Value>, field: &str) -> Result<Option<String>, EnvelopeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => envelope::check_id(&s, field).map(|()| Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(EnvelopeError::field(
            "invalid_field",
            field,
            format!("\"{field}\" must be a string, not {}", json_kind(&other)),
        )),
    }
}

/// An object field; absent or null is `{}`.
pub(crate) fn object(
    m: &mut Map<String, Value>,
    field: &str,
) -> Result<Map<String, Value>, EnvelopeError> {
    match m.remove(field) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o),
        Some(other) => Err(EnvelopeError::field(
            "invalid_field",
            field,
            format!("\"{field}\" must be an object, not {}", json_kind(&other)),
        )),
    }
}

/// A time field (absent or null: none), read as weir's own `timestamp` is: an RFC 3339
/// time, or epoch milliseconds, within what the tables hold.
pub(crate) fn time(v: Option<&Value>, field: &str) -> Result<Option<i64>, EnvelopeError> {
    v.filter(|v| !v.is_null())
        .map(|v| envelope::parse_timestamp(v, field))
        .transpose()
}

/// When an event happened, corrected for the client's clock as Segment and PostHog do:
/// `timestamp + (received - sent_at)` when the request says when it was sent; the
/// receive time when the event says nothing. A correction that would take the time out
/// of what the tables hold (a `sent_at` years off) is not made: the time as sent is kept.
pub(crate) fn corrected(timestamp: Option<i64>, sent_at: Option<i64>, received_ms: i64) -> i64 {
    match (timestamp, sent_at) {
        (Some(t), Some(sent)) => Some(received_ms.saturating_add(t.saturating_sub(sent)))
            .filter(|c| (0..=MAX_TIMESTAMP_MS).contains(c))
            .unwrap_or(t),
        (Some(t), None) => t,
        (None, _) => received_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercased_with_underscores_between_words() {
        assert_eq!(
            event_name("Order Completed").as_deref(),
            Some("order_completed")
        );
        assert_eq!(
            event_name("  Checkout -- Step 2 ").as_deref(),
            Some("checkout_step_2")
        );
        assert_eq!(event_name("post_liked").as_deref(), Some("post_liked"));
        assert_eq!(event_name("$pageview").as_deref(), Some("pageview"));
        assert_eq!(event_name("Vidéo vue").as_deref(), Some("vid_o_vue"));
        assert_eq!(event_name("!!!"), None);
        assert_eq!(event_name("注文"), None);
    }

    #[test]
    fn clocks_are_corrected_within_what_the_tables_hold() {
        let now = 1_796_000_000_000;
        assert_eq!(
            corrected(Some(now - 5_000), Some(now - 10_000), now),
            now + 5_000
        );
        assert_eq!(corrected(Some(7), None, now), 7);
        assert_eq!(corrected(None, Some(3), now), now);
        // A sent_at decades off would move the time before 1970: kept as sent.
        assert_eq!(corrected(Some(1000), Some(4_000_000_000_000), now), 1000);
    }
}
