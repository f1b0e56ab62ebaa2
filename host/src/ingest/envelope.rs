//! Envelope checks: turn a request body into normalised events, or say precisely
//! what is wrong with it. Only the envelope is checked here (types, sizes, names);
//! what an event means is for JSON Schemas and plugins, later in the pipeline.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::model::{MAX_TIMESTAMP_MS, WireEvent, check_name, json_kind as kind};

/// The fields an event may have. Anything else is refused, naming the field.
pub const EVENT_FIELDS: [&str; 6] = [
    "name",
    "user_id",
    "event_id",
    "timestamp",
    "properties",
    "context",
];

/// Longest `user_id` and `event_id`, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON event or a JSON array of events.
    Json,
    /// One JSON event per line.
    Ndjson,
}

/// Limits applied to each request (see `[ingest]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_events: usize,
    pub max_depth: usize,
}

/// Every code an [`EnvelopeError`] carries, as the README's table of 400 answers
/// lists them (checked by a test); the fuzzers hold the parsers to it.
pub const CODES: [&str; 11] = [
    "malformed_json",
    "invalid_utf8",
    "invalid_event",
    "missing_field",
    "invalid_field",
    "unknown_field",
    "duplicate_key",
    "too_deep",
    "event_too_large",
    "too_many_events",
    "empty_batch",
];

/// A refused request: always a 400, with a stable code (one of [`CODES`]) and the
/// place of the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError {
    pub code: &'static str,
    pub message: String,
    /// Position of the offending event in the request (0-based), if any.
    pub index: Option<usize>,
    /// The offending field, if any.
    pub field: Option<String>,
}

impl EnvelopeError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            index: None,
            field: None,
        }
    }

    pub(crate) fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    pub(crate) fn field(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            ..Self::new(code, message)
        }
    }
}

/// Parses and checks a request body. `now_ms` is the receive time, the default
/// timestamp; `new_id` makes an event id when the client sent none.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    limits: &Limits,
    now_ms: i64,
    mut new_id: impl FnMut() -> String,
) -> Result<Vec<WireEvent>, EnvelopeError> {
    let text = utf8(body)?;
    let raws = split_events(text, format, limits.max_events)?;
    if raws.is_empty() {
        return Err(EnvelopeError::new(
            "empty_batch",
            "request contains no events",
        ));
    }
    raws.into_iter()
        .enumerate()
        .map(|(i, raw)| check_event(raw, limits, now_ms, &mut new_id).map_err(|e| e.at(i)))
        .collect()
}

/// The body as text, or the offset of its first byte that is not UTF-8.
pub(crate) fn utf8(body: &[u8]) -> Result<&str, EnvelopeError> {
    std::str::from_utf8(body).map_err(|e| {
        EnvelopeError::new(
            "invalid_utf8",
            format!(
                "request body is not valid UTF-8 (first bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// Splits the body into the raw JSON text of each event.
fn split_events(
    text: &str,
    format: BodyFormat,
    max_events: usize,
) -> Result<Vec<&str>, EnvelopeError> {
    let too_many = || {
        EnvelopeError::new(
            "too_many_events",
            format!("request holds more than {max_events} events"),
        )
    };
    match format {
        BodyFormat::Json => {
            let trimmed = text.trim_start();
            if trimmed.starts_with('[') {
                let items: Vec<&RawValue> = serde_json::from_str(text).map_err(json_error)?;
                if items.len() > max_events {
                    return Err(too_many());
                }
                Ok(items.into_iter().map(RawValue::get).collect())
            } else {
                let item: &RawValue = serde_json::from_str(text).map_err(json_error)?;
                Ok(vec![item.get()])
            }
        }
        BodyFormat::Ndjson => {
            let mut out = Vec::new();
            for line in text.lines() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                if out.len() == max_events {
                    return Err(too_many());
                }
                let item: &RawValue =
                    serde_json::from_str(line).map_err(|e| json_error(e).at(out.len()))?;
                out.push(item.get());
            }
            Ok(out)
        }
    }
}

pub(crate) fn json_error(e: serde_json::Error) -> EnvelopeError {
    if e.to_string().starts_with("recursion limit exceeded") {
        return EnvelopeError::new("too_deep", "JSON nesting is deeper than allowed");
    }
    EnvelopeError::new(
        "malformed_json",
        format!(
            "malformed JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        ),
    )
}

fn check_event(
    raw: &str,
    limits: &Limits,
    now_ms: i64,
    new_id: &mut impl FnMut() -> String,
) -> Result<WireEvent, EnvelopeError> {
    if raw.len() > limits.max_event_bytes {
        return Err(EnvelopeError::new(
            "event_too_large",
            format!(
                "event is {} bytes; the limit is {}",
                raw.len(),
                limits.max_event_bytes
            ),
        ));
    }
    // The event's fields, each as its raw text: `properties` and `context` go on as the
    // app sent them (validated JSON, never parsed into values and re-serialised).
    let Ok(fields) = serde_json::from_str::<Fields>(raw) else {
        let value: Value = serde_json::from_str(raw).map_err(json_error)?;
        return Err(EnvelopeError::new(
            "invalid_event",
            format!("an event must be a JSON object, not {}", kind(&value)),
        ));
    };
    if let Some(key) = fields.unknown {
        return Err(EnvelopeError::field(
            "unknown_field",
            &key,
            format!(
                "unknown field {key:?}; an event has only {}",
                EVENT_FIELDS.join(", ")
            ),
        ));
    }
    if let Some(key) = fields.repeated {
        return Err(EnvelopeError::field(
            "duplicate_key",
            key,
            format!("field {key:?} is given twice"),
        ));
    }
    let fields = fields.values;
    let get = |name: &str| {
        let i = EVENT_FIELDS.iter().position(|f| *f == name)?;
        fields[i]
    };
    let depth = 1 + fields
        .iter()
        .flatten()
        .map(|v| depth(v.get()))
        .max()
        .unwrap_or(0);
    if depth > limits.max_depth {
        return Err(EnvelopeError::new(
            "too_deep",
            format!(
                "event nests {depth} levels deep; the limit is {}",
                limits.max_depth
            ),
        ));
    }
    // The small fields are parsed as values; the JSON objects are not.
    let mut obj: Map<String, Value> = Map::new();
    for field in ["name", "user_id", "event_id", "timestamp"] {
        if let Some(v) = get(field) {
            obj.insert(
                field.into(),
                serde_json::from_str(v.get()).map_err(json_error)?,
            );
        }
    }

    let name = match obj.remove("name") {
        None | Some(Value::Null) => {
            return Err(EnvelopeError::field(
                "missing_field",
                "name",
                "field \"name\" is required",
            ));
        }
        Some(Value::String(s)) => s,
        Some(other) => return Err(wrong_type("name", "a string", &other)),
    };
    if let Err(why) = check_name(&name) {
        return Err(EnvelopeError::field("invalid_field", "name", why));
    }
    let user_id = optional_id(&mut obj, "user_id")?;
    let (event_id, id_assigned) = match optional_id(&mut obj, "event_id")? {
        Some(id) => (id, false),
        None => (new_id(), true),
    };
    let timestamp_ms = match obj.remove("timestamp") {
        None | Some(Value::Null) => now_ms,
        Some(v) => parse_timestamp(&v, "timestamp")?,
    };
    let properties = json_object(get("properties"), "properties")?;
    let context = json_object(get("context"), "context")?;
    Ok(WireEvent {
        event_id,
        name,
        user_id,
        timestamp_ms,
        properties,
        context,
        id_assigned,
    })
}

/// An event object's members by [`EVENT_FIELDS`] index, as raw JSON text borrowed from
/// the request (a repeated member: the last one), and the first unknown member's name.
/// Read without a map or a `String` per key.
struct Fields<'a> {
    values: [Option<&'a RawValue>; EVENT_FIELDS.len()],
    unknown: Option<String>,
    /// The first field given twice.
    repeated: Option<&'static str>,
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut fields = Fields {
                    values: [None; EVENT_FIELDS.len()],
                    unknown: None,
                    repeated: None,
                };
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    let value: &'de RawValue = map.next_value()?;
                    match EVENT_FIELDS.iter().position(|f| *f == key) {
                        Some(i) => {
                            if fields.values[i].replace(value).is_some() {
                                fields.repeated.get_or_insert(EVENT_FIELDS[i]);
                            }
                        }
                        None => {
                            fields.unknown.get_or_insert_with(|| key.into_owned());
                        }
                    }
                }
                Ok(fields)
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// An object key, borrowed from the request unless it has escapes.
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Key<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(Visit)
    }
}

fn optional_id(obj: &mut Map<String, Value>, field: &str) -> Result<Option<String>, EnvelopeError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => check_id(&s, field).map(|()| Some(s)),
        Some(other) => Err(wrong_type(field, "a string", &other)),
    }
}

/// An id (`user_id`, `event_id`): 1-[`MAX_ID_BYTES`] bytes, no control characters.
pub(crate) fn check_id(s: &str, field: &str) -> Result<(), EnvelopeError> {
    if s.is_empty() || s.len() > MAX_ID_BYTES {
        return Err(EnvelopeError::field(
            "invalid_field",
            field,
            format!("{field:?} must be 1-{MAX_ID_BYTES} bytes long"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(EnvelopeError::field(
            "invalid_field",
            field,
            format!("{field:?} must not contain control characters"),
        ));
    }
    Ok(())
}

/// A time in field `field`: an RFC 3339 string or epoch milliseconds, as epoch
/// milliseconds, within what the tables' `DateTime` columns hold. weir's `timestamp`,
/// and the time fields of the tracking SDKs' messages (`ingest::sdk`).
pub(crate) fn parse_timestamp(v: &Value, field: &str) -> Result<i64, EnvelopeError> {
    let out_of_range = || {
        EnvelopeError::field(
            "invalid_field",
            field,
            format!(
                "\"{field}\" must lie between 1970-01-01T00:00:00Z and 2106-02-07T06:28:15.999Z (what the tables' DateTime columns hold)"
            ),
        )
    };
    match v {
        Value::Number(n) => {
            let ms = n.as_i64().ok_or_else(|| {
                EnvelopeError::field(
                    "invalid_field",
                    field,
                    format!(
                        "a numeric \"{field}\" must be whole milliseconds since the Unix epoch"
                    ),
                )
            })?;
            if !(0..=MAX_TIMESTAMP_MS).contains(&ms) {
                return Err(out_of_range());
            }
            Ok(ms)
        }
        Value::String(s) => {
            let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
                EnvelopeError::field(
                    "invalid_field",
                    field,
                    format!("\"{field}\" {s:?} is not RFC 3339: {e}"),
                )
            })?;
            let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
            if !(0..=MAX_TIMESTAMP_MS).contains(&ms) {
                return Err(out_of_range());
            }
            Ok(ms)
        }
        other => Err(wrong_type(
            field,
            "an RFC 3339 string or epoch milliseconds",
            other,
        )),
    }
}

/// `properties` or `context`: the raw text of a JSON object as the app sent it (key
/// order, numbers, escapes), without the whitespace between tokens (`{}` when absent or
/// null). Compact text is what ClickHouse's `visitParam*` functions can read.
fn json_object(raw: Option<&RawValue>, field: &str) -> Result<Box<RawValue>, EnvelopeError> {
    let Some(raw) = raw else {
        return Ok(RawValue::from_string("{}".into()).expect("valid JSON"));
    };
    match raw.get().as_bytes().first() {
        Some(b'{') => {
            check_unambiguous(raw.get(), field)?;
            Ok(match compact(raw.get()) {
                Some(text) => RawValue::from_string(text).expect("compacted valid JSON is valid"),
                None => raw.to_owned(),
            })
        }
        Some(b'n') => Ok(RawValue::from_string("{}".into()).expect("valid JSON")),
        _ => {
            let value: Value = serde_json::from_str(raw.get()).map_err(json_error)?;
            Err(wrong_type(field, "an object", &value))
        }
    }
}

/// Refuses JSON that later stages would read differently: a key repeated in one object
/// (the schemas and the SDK read the last copy, ClickHouse's `visitParamExtract*` the
/// first, so a schema could be bypassed), a number beyond what a double holds (`1e400`:
/// a schema would see no number at all), a `\u` escape of a lone surrogate (not a
/// character: no later stage can read the string). One pass, no value built, keys
/// borrowed from the text. `field` names the text in the error (`""`: the text is a
/// whole object, and the error names the path inside it).
pub(crate) fn check_unambiguous(text: &str, field: &str) -> Result<(), EnvelopeError> {
    use serde::de::DeserializeSeed as _;
    let (mut path, mut keys) = (Vec::new(), Vec::new());
    let mut de = serde_json::Deserializer::from_str(text);
    let checked = Checked {
        path: &mut path,
        keys: &mut keys,
    };
    checked.deserialize(&mut de).map_err(|e| {
        let code = match e.classify() {
            // The visitor's own: a repeated key.
            serde_json::error::Category::Data => "duplicate_key",
            // serde_json's: a number out of range, a lone surrogate.
            _ => "invalid_field",
        };
        let message = e.to_string();
        // serde_json adds " at line L column C": of the field's text, not the body's.
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m);
        let mut at = field.to_owned();
        for seg in &path {
            match seg {
                Seg::Key(k) => {
                    at.push('.');
                    at.push_str(k);
                }
                Seg::Index(i) => at.push_str(&format!("[{i}]")),
            }
        }
        // Without a field (a whole message), the path is the field.
        let at = at.trim_start_matches('.');
        let field = if field.is_empty() { at } else { field };
        EnvelopeError::field(code, field, format!("{at}: {message}"))
    })
}

/// One step of the path to where [`Checked`] is.
enum Seg<'de> {
    Key(std::borrow::Cow<'de, str>),
    Index(usize),
}

/// Walks a JSON value (see [`check_unambiguous`]). `path` is where it is (left as it
/// was at an error); `keys` holds the keys of the objects open around it, each
/// object's after its parents', so that no object allocates a list of its own.
struct Checked<'p, 'de> {
    path: &'p mut Vec<Seg<'de>>,
    keys: &'p mut Vec<std::borrow::Cow<'de, str>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Checked<'_, 'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Keys per object compared one by one; a larger object gets a hash set.
const SMALL_OBJECT: usize = 16;

impl<'de> serde::de::Visitor<'de> for Checked<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    // A number beyond a double's range never gets here: serde_json refuses it.
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            self.path.push(Seg::Index(i));
            let more = seq.next_element_seed(Checked {
                path: &mut *self.path,
                keys: &mut *self.keys,
            })?;
            self.path.pop();
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let start = self.keys.len();
        let mut large: Option<std::collections::HashSet<std::borrow::Cow<'de, str>>> = None;
        while let Some(Key(key)) = map.next_key::<Key>()? {
            let repeated = match &mut large {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let seen = self.keys[start..].contains(&key);
                    self.keys.push(key.clone());
                    if self.keys.len() - start > SMALL_OBJECT {
                        large = Some(self.keys.drain(start..).collect());
                    }
                    seen
                }
            };
            self.path.push(Seg::Key(key));
            if repeated {
                // The only error of this visitor (`Category::Data`); the path stays.
                return Err(serde::de::Error::custom(
                    "the key is given twice in one object",
                ));
            }
            map.next_value_seed(Checked {
                path: &mut *self.path,
                keys: &mut *self.keys,
            })?;
            self.path.pop();
        }
        self.keys.truncate(start);
        Ok(())
    }
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> EnvelopeError {
    EnvelopeError::field(
        "invalid_field",
        field,
        format!("{field:?} must be {expected}, not {}", kind(got)),
    )
}

/// Follows valid JSON text byte by byte and tells which bytes belong to strings.
#[derive(Default)]
struct Strings {
    inside: bool,
    escaped: bool,
}

impl Strings {
    /// Whether `b`, the text's next byte, is part of a string literal (quotes included).
    fn step(&mut self, b: u8) -> bool {
        if self.inside {
            match b {
                _ if self.escaped => self.escaped = false,
                b'\\' => self.escaped = true,
                b'"' => self.inside = false,
                _ => {}
            }
            return true;
        }
        self.inside = b == b'"';
        self.inside
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Valid JSON text without the whitespace between its tokens, or `None` if it has none.
fn compact(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut strings = Strings::default();
    let first = bytes.iter().position(|&b| !strings.step(b) && is_ws(b))?;
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    // Stepping over `first` again leaves the state as it is: it is whitespace.
    out.extend(
        bytes[first..]
            .iter()
            .filter(|&&b| strings.step(b) || !is_ws(b)),
    );
    // Only ASCII whitespace was removed, between tokens: still UTF-8.
    Some(String::from_utf8(out).expect("UTF-8 in, UTF-8 out"))
}

/// Nesting depth of a JSON value's (valid) text: 0 for a scalar, 1 for `[]` or `{}`.
fn depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut strings = Strings::default();
    for &b in text.as_bytes() {
        if strings.step(b) {
            continue;
        }
        match b {
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth -= 1,
            _ => {}
        }
    }
    max
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_code() {
        let readme = include_str!("../../../README.md");
        let row = readme
            .lines()
            .find(|l| l.starts_with("  | 400 | `malformed_json`"))
            .expect("the README's table of 400 answers");
        let listed: Vec<&str> = row
            .split('|')
            .nth(2)
            .unwrap_or_default()
            .split(',')
            .map(|c| c.trim().trim_matches('`'))
            .collect();
        assert_eq!(listed, CODES);
    }

    /// The default limits of `[ingest]`, for the tests of every body parser.
    pub(crate) const LIMITS: Limits = Limits {
        max_event_bytes: 32 * 1024,
        max_events: 1000,
        max_depth: 32,
    };

    fn parse(body: &str, format: BodyFormat) -> Result<Vec<WireEvent>, EnvelopeError> {
        let mut n = 0;
        parse_body(body.as_bytes(), format, &LIMITS, 1_000, || {
            n += 1;
            format!("gen-{n}")
        })
    }

    fn err(body: &str) -> EnvelopeError {
        parse(body, BodyFormat::Json).unwrap_err()
    }

    #[test]
    fn single_array_and_ndjson() {
        let one = parse(r#"{"name":"a"}"#, BodyFormat::Json).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].event_id, "gen-1");
        assert_eq!(one[0].timestamp_ms, 1_000);
        assert_eq!(one[0].properties.get(), "{}");
        let many = parse(
            r#"[{"name":"a"},{"name":"b","user_id":"u"}]"#,
            BodyFormat::Json,
        )
        .unwrap();
        assert_eq!(many[1].user_id.as_deref(), Some("u"));
        let nd = parse("{\"name\":\"a\"}\n\n{\"name\":\"b\"}\n", BodyFormat::Ndjson).unwrap();
        assert_eq!(nd.len(), 2);
    }

    #[test]
    fn fields_are_normalised() {
        let e = &parse(
            r#"{"name":"post_liked","event_id":"e-1","timestamp":"2026-11-23T10:00:00.250Z","properties":{"post":"p"},"context":{"ip":"x"}}"#,
            BodyFormat::Json,
        )
        .unwrap()[0];
        assert_eq!(e.event_id, "e-1");
        assert!(!e.id_assigned, "the client's id");
        assert_eq!(e.timestamp_ms, 1_795_428_000_250);
        assert_eq!(e.properties.get(), r#"{"post":"p"}"#);
        let e = &parse(
            r#"{"name":"x","timestamp":1700000000123}"#,
            BodyFormat::Json,
        )
        .unwrap()[0];
        assert_eq!(e.timestamp_ms, 1_700_000_000_123);
        assert!(e.id_assigned, "no id sent: ingest made it");
    }

    #[test]
    fn properties_and_context_keep_the_apps_bytes() {
        let props =
            "{ \"z\": 1.0,\n\t\"a\": [1e16, -0, \"] }\\\" {\"],\r\n \"n\": 18446744073709551616 }";
        let body = format!(r#"{{"name":"x","properties":{props},"context":{{"b":2,"a":1}}}}"#);
        let e = &parse(&body, BodyFormat::Json).unwrap()[0];
        // Only the whitespace between tokens goes.
        assert_eq!(
            e.properties.get(),
            r#"{"z":1.0,"a":[1e16,-0,"] }\" {"],"n":18446744073709551616}"#
        );
        assert_eq!(e.context.get(), r#"{"b":2,"a":1}"#);
        let e = &parse(r#"{"name":"x","properties":null}"#, BodyFormat::Json).unwrap()[0];
        assert_eq!(e.properties.get(), "{}");
        // Keys are compared decoded: a member repeated under another spelling is
        // repeated.
        let e = err(r#"{"n\u0061me":"x","name":"y","user_id":"u"}"#);
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("duplicate_key", Some("name"))
        );
        let err = err(r#"{"name":"x","z\u00e9":1,"other":2}"#);
        assert_eq!(
            (err.code, err.field.as_deref()),
            ("unknown_field", Some("zé"))
        );
        // Brackets inside strings do not count as nesting.
        assert_eq!(depth(r#"{"a":"[[[{{{","b":[{}]}"#), 3);
        assert_eq!(depth("1"), 0);
    }

    #[test]
    fn json_that_later_stages_would_read_differently_is_refused() {
        for (body, code, field, at) in [
            (
                r#"{"name":"a","properties":{"plan":"free","x":1,"plan":"pro"}}"#,
                "duplicate_key",
                "properties",
                "properties.plan: the key is given twice",
            ),
            (
                r#"{"name":"a","context":{"o":{"a":[1,{"k":1,"k":2}]}}}"#,
                "duplicate_key",
                "context",
                "context.o.a[1].k: the key is given twice",
            ),
            (
                r#"{"name":"a","properties":{"n":[1,1e400]}}"#,
                "invalid_field",
                "properties",
                "properties.n[1]: number out of range",
            ),
            (
                r#"{"name":"a","properties":{"s":"\ud800x"}}"#,
                "invalid_field",
                "properties",
                "properties.s: ",
            ),
            (
                r#"{"name":"a","name":"b"}"#,
                "duplicate_key",
                "name",
                "field \"name\" is given twice",
            ),
        ] {
            let e = err(body);
            assert_eq!(
                (e.code, e.field.as_deref()),
                (code, Some(field)),
                "{body}: {e:?}"
            );
            assert!(e.message.starts_with(at), "{body}: {}", e.message);
        }
        // Escaped spellings of one key are the same key; distinct keys pass, in any
        // number; a surrogate pair is a character.
        let e = err(r#"{"name":"a","properties":{"a":1,"\u0061":2}}"#);
        assert_eq!(e.code, "duplicate_key");
        let many: Vec<String> = (0..100).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let body = format!(
            r#"{{"name":"a","properties":{{{},"s":"\ud83d\ude00"}}}}"#,
            many.join(",")
        );
        let events = parse(&body, BodyFormat::Json).unwrap();
        assert!(events[0].properties.get().contains("k99"));
        let repeated = format!(
            r#"{{"name":"a","properties":{{{},"k7":0}}}}"#,
            many.join(",")
        );
        assert_eq!(err(&repeated).code, "duplicate_key");
    }

    #[test]
    fn each_problem_has_its_code_field_and_index() {
        let e = err(r#"[{"name":"ok"},{"nam":"typo"}]"#);
        assert_eq!(
            (e.code, e.index, e.field.as_deref()),
            ("unknown_field", Some(1), Some("nam"))
        );
        let e = err(r#"{"user_id":"u"}"#);
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("missing_field", Some("name"))
        );
        let e = err(r#"{"name":42}"#);
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_field", Some("name"))
        );
        assert!(e.message.contains("not a number"), "{}", e.message);
        let e = err(r#"{"name":"has space"}"#);
        assert_eq!(e.field.as_deref(), Some("name"));
        assert_eq!(
            err(&format!(r#"{{"name":"{}"}}"#, "a".repeat(129))).code,
            "invalid_field"
        );
        assert_eq!(
            err(r#"{"name":"a","timestamp":"yesterday"}"#)
                .field
                .as_deref(),
            Some("timestamp")
        );
        assert_eq!(
            err(r#"{"name":"a","timestamp":1.5}"#).field.as_deref(),
            Some("timestamp")
        );
        assert_eq!(
            err(r#"{"name":"a","timestamp":-1}"#).field.as_deref(),
            Some("timestamp")
        );
        // Past what ClickHouse's DateTime holds: refused, not stored as another time.
        for late in [
            r#""9999-12-31T00:00:00Z""#,
            r#""2106-02-07T06:28:16Z""#,
            "4294967296000",
        ] {
            let e = err(&format!(r#"{{"name":"a","timestamp":{late}}}"#));
            assert_eq!(e.field.as_deref(), Some("timestamp"), "{late}");
            assert!(
                e.message.contains("2106-02-07T06:28:15.999Z"),
                "{}",
                e.message
            );
        }
        let last = parse(
            r#"{"name":"a","timestamp":"2106-02-07T06:28:15.999Z"}"#,
            BodyFormat::Json,
        )
        .unwrap();
        assert_eq!(last[0].timestamp_ms, MAX_TIMESTAMP_MS);
        assert_eq!(
            err(r#"{"name":"a","properties":[1]}"#).field.as_deref(),
            Some("properties")
        );
        assert_eq!(
            err(r#"{"name":"a","user_id":7}"#).field.as_deref(),
            Some("user_id")
        );
        assert_eq!(
            err(r#"{"name":"a","event_id":""}"#).field.as_deref(),
            Some("event_id")
        );
        assert_eq!(err("[1]").code, "invalid_event");
        assert_eq!(err("[]").code, "empty_batch");
        assert_eq!(err(r#"{"name":"a""#).code, "malformed_json");
        let e = parse("{\"name\":\"a\"}\n{oops}\n", BodyFormat::Ndjson).unwrap_err();
        assert_eq!((e.code, e.index), ("malformed_json", Some(1)));
    }

    #[test]
    fn limits_are_enforced() {
        let deep = format!(
            r#"{{"name":"a","properties":{}1{}}}"#,
            "{\"k\":".repeat(40),
            "}".repeat(40)
        );
        assert_eq!(err(&deep).code, "too_deep");
        let very_deep = format!(
            r#"{{"name":"a","properties":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(err(&very_deep).code, "too_deep");
        let big = format!(
            r#"{{"name":"a","properties":{{"s":"{}"}}}}"#,
            "x".repeat(40_000)
        );
        assert_eq!(err(&big).code, "event_too_large");
        let many = format!("[{}]", vec![r#"{"name":"a"}"#; 1001].join(","));
        assert_eq!(err(&many).code, "too_many_events");
        let e = parse_body(
            b"{\"name\":\"\xff\"}",
            BodyFormat::Json,
            &LIMITS,
            0,
            String::new,
        )
        .unwrap_err();
        assert_eq!(e.code, "invalid_utf8");
    }

    #[test]
    fn depth_counts_the_event_itself() {
        // event (1) > properties (2) > 30 arrays (3..=32)
        let ok = format!(
            r#"{{"name":"a","properties":{{"k":{}1{}}}}}"#,
            "[".repeat(30),
            "]".repeat(30)
        );
        assert!(parse(&ok, BodyFormat::Json).is_ok());
        let over = format!(
            r#"{{"name":"a","properties":{{"k":{}1{}}}}}"#,
            "[".repeat(31),
            "]".repeat(31)
        );
        assert_eq!(err(&over).code, "too_deep");
    }
}
