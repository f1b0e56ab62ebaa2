//! Property-based fuzzing of ingest's envelope parser (`weir::ingest::envelope`), the
//! code that reads what the internet sends.
//!
//! - Any bytes, and valid bodies with random bytes changed, inserted or removed: the
//!   parser answers (events or an error with a documented code), never panics.
//! - Valid events in each framing (one object, an array, NDJSON): accepted, with every
//!   field as sent and `properties`/`context` meaning the same JSON.
//! - A key repeated anywhere in `properties`: refused `duplicate_key`.
//! - Segment's and PostHog's APIs (`weir::ingest::sdk`): any bytes and valid bodies with
//!   bytes changed get an answer with a documented code, never a panic; what they accept
//!   is a valid weir event (its name held to weir's rule, `properties`/`context` JSON
//!   objects); valid messages are accepted with their ids as sent.
//! - gzip bodies (`weir::ingest::encoding::gunzip`): any bytes, and valid gzip cut or
//!   changed, are inflated or refused, never past the limit.
//!
//! CI runs the default number of cases (`PROPTEST_CASES`, 256 per property); the long
//! run is `PROPTEST_CASES=200000 cargo test -p weir-tests --test fuzz --release`.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use weir::ingest::envelope::{BodyFormat, CODES, Limits, parse_body};
use weir::ingest::sdk::{posthog, segment};

const LIMITS: Limits = Limits {
    max_event_bytes: 32 * 1024,
    max_events: 1000,
    max_depth: 32,
};

fn parse(body: &[u8], format: BodyFormat) -> Result<Vec<weir::model::WireEvent>, String> {
    let mut n = 0;
    let result = parse_body(body, format, &LIMITS, 1_700_000_000_000, || {
        n += 1;
        format!("generated-{n}")
    });
    result.map_err(|e| {
        assert!(CODES.contains(&e.code), "undocumented code {:?}", e.code);
        assert!(!e.message.is_empty());
        e.code.to_owned()
    })
}

/// JSON values as apps send them: nested a few levels, strings with escapes and
/// non-ASCII, integers beyond i64, floats.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        "[\"\\\\/\\x00-\\x1f\u{e9}\u{1f600}]{0,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("[a-z_]{1,8}|\\PC{1,6}", json_value(), 0..8)
        .prop_map(|m| m.into_iter().collect())
}

/// A valid event, as JSON.
fn event() -> impl Strategy<Value = Value> {
    (
        "[A-Za-z0-9_.:-]{1,40}",
        prop::option::of("\\PC{1,40}"),
        prop::option::of("[a-z0-9-]{1,36}"),
        prop::option::of(0i64..4_294_967_295_999),
        prop::option::of(json_object()),
        prop::option::of(json_object()),
    )
        .prop_map(|(name, user, id, ts, properties, context)| {
            let mut e = json!({ "name": name });
            if let Some(u) = user {
                e["user_id"] = json!(u);
            }
            if let Some(id) = id {
                e["event_id"] = json!(id);
            }
            if let Some(ts) = ts {
                e["timestamp"] = json!(ts);
            }
            if let Some(p) = properties {
                e["properties"] = Value::Object(p);
            }
            if let Some(c) = context {
                e["context"] = Value::Object(c);
            }
            e
        })
}

/// Events framed as the format says; pretty-printed (whitespace between tokens) or not.
fn frame(events: &[Value], format: BodyFormat, pretty: bool) -> String {
    let text = |v: &Value| {
        if pretty {
            serde_json::to_string_pretty(v).unwrap()
        } else {
            v.to_string()
        }
    };
    match format {
        BodyFormat::Ndjson => events
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        BodyFormat::Json if events.len() == 1 => text(&events[0]),
        BodyFormat::Json => text(&Value::Array(events.to_vec())),
    }
}

fn format() -> impl Strategy<Value = BodyFormat> {
    prop_oneof![Just(BodyFormat::Json), Just(BodyFormat::Ndjson)]
}

/// One change to a body: a byte replaced, inserted or removed.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Insert(usize, u8),
    Remove(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]\",:\\ \n0e-.u".to_vec()),
    ];
    let edit = prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
    ];
    prop::collection::vec(edit, 1..6)
}

proptest! {
    #[test]
    fn any_bytes_get_an_answer(body in prop::collection::vec(any::<u8>(), 0..512), format in format()) {
        let _ = parse(&body, format);
    }

    #[test]
    fn valid_bodies_with_bytes_changed_get_an_answer(
        events in prop::collection::vec(event(), 1..4),
        format in format(),
        edits in edits(),
    ) {
        let mut body = frame(&events, format, false).into_bytes();
        for edit in edits {
            match edit {
                Edit::Replace(i, b) if !body.is_empty() => {
                    let i = i % body.len();
                    body[i] = b;
                }
                Edit::Insert(i, b) => body.insert(i % (body.len() + 1), b),
                Edit::Remove(i) if !body.is_empty() => {
                    body.remove(i % body.len());
                }
                _ => {}
            }
        }
        if let Ok(parsed) = parse(&body, format) {
            // Whatever is accepted is well-formed: objects that read back as JSON.
            for e in parsed {
                prop_assert!(serde_json::from_str::<Map<String, Value>>(e.properties.get()).is_ok());
                prop_assert!(serde_json::from_str::<Map<String, Value>>(e.context.get()).is_ok());
            }
        }
    }

    #[test]
    fn valid_events_are_accepted_as_sent(
        events in prop::collection::vec(event(), 1..6),
        format in format(),
        pretty in any::<bool>(),
    ) {
        let body = frame(&events, format, pretty);
        let parsed = parse(body.as_bytes(), format);
        prop_assert!(parsed.is_ok(), "{:?} for {}", parsed.err(), body);
        let parsed = parsed.unwrap();
        prop_assert_eq!(parsed.len(), events.len());
        for (sent, got) in events.iter().zip(&parsed) {
            prop_assert_eq!(sent["name"].as_str(), Some(got.name.as_str()));
            prop_assert_eq!(sent["user_id"].as_str(), got.user_id.as_deref());
            if let Some(id) = sent["event_id"].as_str() {
                prop_assert_eq!(id, got.event_id.as_str());
            }
            prop_assert_eq!(sent["timestamp"].as_i64().unwrap_or(1_700_000_000_000), got.timestamp_ms);
            for field in ["properties", "context"] {
                let text = if field == "properties" { got.properties.get() } else { got.context.get() };
                // The sent text parsed as the stored text is (serde_json's float
                // parsing may be a unit off in the last place; both sides alike).
                let want: Value = if sent[field].is_null() {
                    json!({})
                } else {
                    serde_json::from_str(&sent[field].to_string()).unwrap()
                };
                let have: Value = serde_json::from_str(text).unwrap();
                prop_assert_eq!(&have, &want, "{} as stored: {}", field, text);
            }
        }
    }

    #[test]
    fn a_key_repeated_anywhere_in_properties_is_refused(
        properties in json_object(),
        key in "[a-z]{1,6}",
        first in json_value(),
        second in json_value(),
        nested in any::<bool>(),
    ) {
        // The repeated key spliced into the text, where a serde_json map cannot hold it.
        let pair = format!("{}:{},{}:{}", json!(key), first, json!(key), second);
        let inner = if properties.is_empty() {
            format!("{{{pair}}}")
        } else {
            let text = Value::Object(properties).to_string();
            format!("{{{pair},{}", &text[1..])
        };
        let properties = if nested { format!("{{\"outer\":{inner}}}") } else { inner };
        let body = format!("{{\"name\":\"e\",\"properties\":{properties}}}");
        let code = parse(body.as_bytes(), BodyFormat::Json).err();
        prop_assert_eq!(code.as_deref(), Some("duplicate_key"), "{}", body);
    }
}

/// The APIs of the tracking SDKs, by path.
#[derive(Debug, Clone, Copy)]
enum Sdk {
    Segment(segment::Call),
    PostHog,
}

fn sdk() -> impl Strategy<Value = Sdk> {
    use segment::{Call, Type};
    prop::sample::select(vec![
        Sdk::Segment(Call::Batch),
        Sdk::Segment(Call::One(Type::Track)),
        Sdk::Segment(Call::One(Type::Identify)),
        Sdk::Segment(Call::One(Type::Page)),
        Sdk::Segment(Call::One(Type::Alias)),
        Sdk::PostHog,
    ])
}

/// Parses `body` as `api` would; the error's code, which must be a documented one.
fn parse_sdk(body: &[u8], api: Sdk) -> Result<weir::ingest::sdk::Parsed, String> {
    let mut n = 0;
    let new_id = || {
        n += 1;
        format!("generated-{n}")
    };
    let result = match api {
        Sdk::Segment(call) => segment::parse(body, call, &LIMITS, 1_700_000_000_000, new_id),
        Sdk::PostHog => posthog::parse(body, &LIMITS, 1_700_000_000_000, new_id),
    };
    result.map_err(|e| {
        assert!(CODES.contains(&e.code), "undocumented code {:?}", e.code);
        assert!(!e.message.is_empty());
        e.code.to_owned()
    })
}

/// What an accepted SDK request must be: weir events like any other.
fn check_accepted(parsed: &weir::ingest::sdk::Parsed) -> Result<(), TestCaseError> {
    for e in &parsed.events {
        prop_assert!(
            weir::model::check_name(&e.name).is_ok(),
            "name {:?}",
            e.name
        );
        prop_assert!(!e.event_id.is_empty() && e.event_id.len() <= 256);
        prop_assert!(serde_json::from_str::<Map<String, Value>>(e.properties.get()).is_ok());
        prop_assert!(serde_json::from_str::<Map<String, Value>>(e.context.get()).is_ok());
    }
    Ok(())
}

/// A valid body of `api`: its messages (track calls, or PostHog captures) with the ids
/// `id-0`, `id-1`, ...
fn sdk_body(api: Sdk, names: &[String], properties: &[Map<String, Value>]) -> String {
    let messages: Vec<Value> = names
        .iter()
        .zip(properties)
        .enumerate()
        .map(|(i, (name, props))| match api {
            Sdk::PostHog => json!({
                "event": name, "distinct_id": format!("d{i}"), "uuid": format!("id-{i}"),
                "properties": props,
            }),
            Sdk::Segment(_) => json!({
                "type": "track", "event": name, "userId": format!("u{i}"),
                "messageId": format!("id-{i}"), "properties": props,
                "timestamp": "2026-12-01T10:00:00Z",
            }),
        })
        .collect();
    match api {
        Sdk::Segment(segment::Call::Batch) => {
            json!({"writeKey": "k", "batch": messages}).to_string()
        }
        Sdk::PostHog => json!({"api_key": "k", "batch": messages}).to_string(),
        Sdk::Segment(segment::Call::One(_)) => messages[0].to_string(),
    }
}

/// An event name as the SDKs send them: words with spaces and capitals, `$` names.
fn sdk_name() -> impl Strategy<Value = String> {
    "[$]?[A-Za-z0-9][A-Za-z0-9 _.$-]{0,40}"
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

proptest! {
    #[test]
    fn sdk_apis_answer_any_bytes(body in prop::collection::vec(any::<u8>(), 0..512), api in sdk()) {
        if let Ok(parsed) = parse_sdk(&body, api) {
            check_accepted(&parsed)?;
        }
    }

    #[test]
    fn sdk_bodies_with_bytes_changed_get_an_answer(
        names in prop::collection::vec(sdk_name(), 1..4),
        properties in prop::collection::vec(json_object(), 4),
        api in sdk(),
        edits in edits(),
    ) {
        let mut body = sdk_body(api, &names, &properties).into_bytes();
        for edit in edits {
            match edit {
                Edit::Replace(i, b) => {
                    let i = i % body.len();
                    body[i] = b;
                }
                Edit::Insert(i, b) => body.insert(i % (body.len() + 1), b),
                Edit::Remove(i) if body.len() > 1 => {
                    body.remove(i % body.len());
                }
                Edit::Remove(_) => {}
            }
        }
        if let Ok(parsed) = parse_sdk(&body, api) {
            check_accepted(&parsed)?;
        }
    }

    #[test]
    fn valid_sdk_messages_are_accepted_with_their_ids(
        names in prop::collection::vec(sdk_name(), 1..4),
        properties in prop::collection::vec(json_object(), 4),
        api in prop::sample::select(vec![
            Sdk::Segment(segment::Call::Batch),
            Sdk::Segment(segment::Call::One(segment::Type::Track)),
            Sdk::PostHog,
        ]),
    ) {
        let body = sdk_body(api, &names, &properties);
        let parsed = parse_sdk(body.as_bytes(), api);
        prop_assert!(parsed.is_ok(), "{:?} for {}", parsed.as_ref().err(), body);
        let parsed = parsed.unwrap();
        check_accepted(&parsed)?;
        let ids: Vec<&str> = parsed.events.iter().map(|e| e.event_id.as_str()).collect();
        let want: Vec<String> = (0..ids.len()).map(|i| format!("id-{i}")).collect();
        prop_assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn gzip_bodies_inflate_within_the_limit_or_are_refused(
        text in prop::collection::vec(any::<u8>(), 0..4096),
        repeat in 1usize..64,
        cut in any::<prop::sample::Index>(),
        flip in any::<Option<(prop::sample::Index, u8)>>(),
        limit in 16usize..20_000,
    ) {
        let plain = text.repeat(repeat);
        let mut body = gzip(&plain);
        if let Some((at, byte)) = flip {
            let i = at.index(body.len());
            body[i] ^= byte;
        }
        // Whole, or cut anywhere.
        for body in [&body[..], &body[..cut.index(body.len())]] {
            match weir::ingest::encoding::gunzip(body, limit) {
                Ok(out) => {
                    prop_assert!(out.len() <= limit, "{} bytes past the limit {}", out.len(), limit);
                }
                Err(e) => {
                    let code = e.code();
                    prop_assert!(code == "bad_encoding" || code == "body_too_large", "{}", code);
                }
            }
        }
        if flip.is_none() && plain.len() <= limit {
            prop_assert_eq!(&weir::ingest::encoding::gunzip(&body, limit).unwrap()[..], &plain[..]);
        }
    }
}
