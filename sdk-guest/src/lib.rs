//! Write weir plugins in Rust.
//!
//! A plugin is a plain function from an [`Event`] to an [`Outcome`], exported with one
//! macro. Depend on this crate alone (it re-exports what the generated bindings need)
//! and build for `wasm32-wasip2`:
//!
//! ```
//! use weir_plugin_sdk::{plugin, Event, Outcome};
//!
//! plugin!(handle);
//!
//! fn handle(mut event: Event) -> Outcome {
//!     if event.user_id().is_none() {
//!         return Outcome::reject("user_id is required");
//!     }
//!     event.set_property("checked", true);
//!     Outcome::keep(event)
//! }
//! ```
//!
//! With a configuration (the JSON set for the plugin in its pipeline, deserialised
//! once per instance):
//!
//! ```
//! use weir_plugin_sdk::{plugin, Event, Outcome};
//!
//! #[derive(serde::Deserialize, Default)]
//! #[serde(default)]
//! struct Config { sample_every: u64 }
//!
//! plugin!(handle, config: Config);
//!
//! fn handle(event: Event, config: &Config) -> Outcome {
//!     if config.sample_every > 1 && event.timestamp_ms() as u64 % config.sample_every != 0 {
//!         return Outcome::drop("sampled out");
//!     }
//!     Outcome::keep(event)
//! }
//! # fn main() {
//! #     let config = Config { sample_every: 2 };
//! #     assert!(matches!(handle(Event::new("x"), &config), Outcome::Keep(_)));
//! # }
//! ```
//!
//! The same function is unit-testable natively with `cargo test`: build an event with
//! [`Event::new`] and call it. Host imports ([`log`], [`counter_add`]) work natively
//! too: logs go to stderr, counters to [`testing::counters`].

extern crate self as weir_plugin_sdk;

use std::cell::OnceCell;
use std::ops::Range;
use std::rc::Rc;

pub use serde_json::{Map, Value, json};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "weir_plugin_sdk::bindings",
        runtime_path: "weir_plugin_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::weir::plugin::host::Level;
use bindings::weir::plugin::types as wit;

/// The text of one field of an event: a slice of the batch's text as the host sent it
/// (shared, not copied), or the plugin's own once it sets the field.
#[derive(Debug, Clone)]
enum Text {
    Batch(Rc<str>, Range<usize>),
    Owned(String),
}

impl Text {
    fn as_str(&self) -> &str {
        match self {
            Text::Batch(text, range) => &text[range.clone()],
            Text::Owned(s) => s,
        }
    }

    /// The text, to change: copied out of the batch first.
    fn to_mut(&mut self) -> &mut String {
        if let Text::Batch(..) = self {
            *self = Text::Owned(self.as_str().to_owned());
        }
        match self {
            Text::Owned(s) => s,
            Text::Batch(..) => unreachable!("copied above"),
        }
    }

    fn into_string(self) -> String {
        match self {
            Text::Batch(..) => self.as_str().to_owned(),
            Text::Owned(s) => s,
        }
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Owned(s)
    }
}

/// A JSON object field of an event (`properties`, `context`), kept as the host's text.
///
/// Reading a member scans the text's top level once and parses only the values read.
/// Setting a member splices its new value into the text: every other member keeps its
/// bytes and its place, so numbers the plugin does not touch (a `1.0`, an integer beyond
/// `u64`) reach the sinks exactly as the app sent them, and nothing is re-serialised.
/// A new member goes at the end. When a key appears more than once, reads and writes
/// see its last occurrence, as a JSON parser that keeps the last value does.
///
/// The whole-object API (`properties()`, `properties_mut()`) parses the text into a map;
/// after `properties_mut()` the object is written back from the map (keys sorted).
#[derive(Debug, Clone)]
struct JsonObject {
    raw: Text,
    /// The top-level members of `raw`, scanned on the first read by key; an empty list
    /// when `raw` is not a JSON object (it then reads as `{}`, as the map API does).
    members: OnceCell<Vec<Member>>,
    /// `raw` parsed whole, for the map API.
    map: OnceCell<Map<String, Value>>,
    /// `properties_mut()` was called: the map is the truth from now on.
    map_dirty: bool,
    /// A member was set by splicing.
    spliced: bool,
}

/// One top-level member of a [`JsonObject`]'s text.
#[derive(Debug, Clone)]
struct Member {
    /// The key's text between its quotes (still escaped if `key_escaped`).
    key: Range<usize>,
    key_escaped: bool,
    /// The value's text.
    value: Range<usize>,
    /// The value, parsed on first read (`None` if its text does not parse).
    parsed: OnceCell<Option<Value>>,
}

impl JsonObject {
    fn from_raw(raw: impl Into<Text>) -> Self {
        Self {
            raw: raw.into(),
            members: OnceCell::new(),
            map: OnceCell::new(),
            map_dirty: false,
            spliced: false,
        }
    }

    fn members(&self) -> &[Member] {
        self.members
            .get_or_init(|| scan_object(self.raw.as_str()).unwrap_or_default())
    }

    /// The index of the last member named `key`.
    fn find(&self, key: &str) -> Option<usize> {
        self.members().iter().rposition(|m| {
            let raw = self.raw.as_str();
            let text = &raw[m.key.clone()];
            if m.key_escaped {
                let quoted = &raw[m.key.start - 1..m.key.end + 1];
                serde_json::from_str::<String>(quoted).is_ok_and(|k| k == key)
            } else {
                text == key
            }
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        if self.map_dirty {
            return self.map.get().and_then(|m| m.get(key));
        }
        let member = &self.members()[self.find(key)?];
        member
            .parsed
            .get_or_init(|| serde_json::from_str(&self.raw.as_str()[member.value.clone()]).ok())
            .as_ref()
    }

    fn set(&mut self, key: String, value: Value) {
        if self.map_dirty {
            self.map
                .get_mut()
                .expect("map_dirty implies a parsed map")
                .insert(key, value);
            return;
        }
        if self.members().is_empty() && scan_object(self.raw.as_str()).is_none() {
            // Not an object: it reads as `{}`, so it is written as one.
            self.raw = Text::Owned("{}".into());
            self.members = OnceCell::new();
        }
        let text = serde_json::to_string(&value).expect("a Value always serialises");
        let found = self.find(&key);
        let members = self.members.get_mut().expect("scanned by find");
        match found {
            Some(i) => {
                let old = members[i].value.clone();
                self.raw.to_mut().replace_range(old.clone(), &text);
                let new_end = old.start + text.len();
                members[i].value = old.start..new_end;
                members[i].parsed = OnceCell::from(Some(value));
                for m in &mut members[i + 1..] {
                    m.key = shift(&m.key, old.end, new_end);
                    m.value = shift(&m.value, old.end, new_end);
                }
            }
            None => {
                // After the last member, or before the closing `}` of an empty object.
                let at = members
                    .last()
                    .map_or(self.raw.as_str().trim_end().len() - 1, |m| m.value.end);
                let key_text = serde_json::to_string(&key).expect("a string always serialises");
                let mut member = String::with_capacity(key_text.len() + text.len() + 2);
                if !members.is_empty() {
                    member.push(',');
                }
                let key_start = at + member.len() + 1;
                member.push_str(&key_text);
                let key_end = at + member.len() - 1;
                member.push(':');
                let value_start = at + member.len();
                member.push_str(&text);
                self.raw.to_mut().insert_str(at, &member);
                members.push(Member {
                    key: key_start..key_end,
                    key_escaped: key_text.contains('\\'),
                    value: value_start..value_start + text.len(),
                    parsed: OnceCell::from(Some(value)),
                });
            }
        }
        self.map = OnceCell::new();
        self.spliced = true;
    }

    fn map(&self) -> &Map<String, Value> {
        self.map
            .get_or_init(|| serde_json::from_str(self.raw.as_str()).unwrap_or_default())
    }

    fn map_mut(&mut self) -> &mut Map<String, Value> {
        self.map();
        self.map_dirty = true;
        self.members = OnceCell::new();
        self.map.get_mut().expect("initialised above")
    }

    fn is_changed(&self) -> bool {
        self.map_dirty || self.spliced
    }

    fn into_raw(self) -> String {
        match (self.map_dirty, self.map.into_inner()) {
            (true, Some(map)) => {
                serde_json::to_string(&map).unwrap_or_else(|_| self.raw.into_string())
            }
            _ => self.raw.into_string(),
        }
    }
}

/// `range` moved by the change of an earlier span's end from `old_end` to `new_end`.
fn shift(range: &Range<usize>, old_end: usize, new_end: usize) -> Range<usize> {
    range.start + new_end - old_end..range.end + new_end - old_end
}

/// The top-level members of a JSON object's text, or `None` if it is not one. Values
/// are skipped, not checked (the host hands plugins validated JSON); a value that does
/// not parse reads as absent.
fn scan_object(raw: &str) -> Option<Vec<Member>> {
    let b = raw.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut members = Vec::new();
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let (end, key_escaped) = skip_string(b, i)?;
            let key = i + 1..end - 1;
            i = skip_ws(b, end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(b, i + 1);
            i = skip_value(b, start)?;
            members.push(Member {
                key,
                key_escaped,
                value: start..i,
                parsed: OnceCell::new(),
            });
            i = skip_ws(b, i);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(b, i) == b.len()).then_some(members)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// From the opening quote at `i`: the index after the closing quote, and whether the
/// string has escapes.
fn skip_string(b: &[u8], mut i: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    i += 1;
    loop {
        match b.get(i)? {
            b'"' => return Some((i + 1, escaped)),
            b'\\' => {
                escaped = true;
                i += 2;
            }
            _ => i += 1,
        }
    }
}

/// From the first byte of a value at `i`: the index after it.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i).map(|(end, _)| end),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = skip_string(b, i)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let start = i;
            while !matches!(
                b.get(i),
                None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            ) {
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

/// One event, as the host hands it to the plugin. Fields are read through methods and
/// changed through setters, so the SDK knows what the plugin changed: an unchanged
/// event is answered with the WIT `pass` outcome (nothing crosses back), a changed one
/// with its changed fields only. The event's strings are slices of the batch the host
/// sent until the plugin sets them.
#[derive(Debug, Clone)]
pub struct Event {
    event_id: Text,
    app: Text,
    name: Text,
    user_id: Option<Text>,
    timestamp_ms: i64,
    properties: JsonObject,
    context: JsonObject,
    /// Set by the setters of `name`, `user_id` and `timestamp_ms`.
    name_changed: bool,
    user_changed: bool,
    timestamp_changed: bool,
    /// Rows and counts sent along with the event.
    outputs: Vec<Emitted>,
}

/// Something an event sends besides itself (see [`Event::emit_row`], [`Event::count`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Emitted {
    /// A row for the pipeline's table `table`: the text of a JSON object.
    Row { table: String, columns: String },
    /// `delta` added to counter `counter` for `key`.
    Count {
        counter: String,
        key: String,
        delta: i64,
    },
    /// The event sent to the webhook or topic sink of this name.
    Forward(String),
}

impl Event {
    /// A new event with empty properties and context (for tests).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            event_id: Text::Owned("test-event".into()),
            app: Text::Owned("test-app".into()),
            name: Text::Owned(name.into()),
            user_id: None,
            timestamp_ms: 0,
            properties: JsonObject::from_raw(String::from("{}")),
            context: JsonObject::from_raw(String::from("{}")),
            name_changed: false,
            user_changed: false,
            timestamp_changed: false,
            outputs: Vec::new(),
        }
    }

    /// Builder: sets the user id.
    pub fn with_user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(Text::Owned(user_id.into()));
        self
    }

    /// Builder: sets the properties (must be a JSON object; anything else is ignored).
    pub fn with_properties(mut self, properties: Value) -> Self {
        // The event as the host would hand it in: not marked changed.
        if properties.is_object() {
            self.properties = JsonObject::from_raw(properties.to_string());
        }
        self
    }

    /// Unique id of the event (the host keeps its own: it cannot be changed).
    pub fn event_id(&self) -> &str {
        self.event_id.as_str()
    }

    /// The app that sent the event (cannot be changed).
    pub fn app(&self) -> &str {
        self.app.as_str()
    }

    /// The event name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Renames the event. The new name must match `[A-Za-z0-9_.:-]{1,128}`, or the host
    /// fails the event.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = Text::Owned(name.into());
        self.name_changed = true;
    }

    /// The user the event is about.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_ref().map(Text::as_str)
    }

    pub fn set_user_id(&mut self, user_id: Option<String>) {
        self.user_id = user_id.map(Text::Owned);
        self.user_changed = true;
    }

    /// When it happened, ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.timestamp_ms
    }

    pub fn set_timestamp_ms(&mut self, timestamp_ms: i64) {
        self.timestamp_ms = timestamp_ms;
        self.timestamp_changed = true;
    }

    /// The event's properties, parsed whole. To read a few members, [`Event::property`]
    /// is cheaper: it parses only the values it reads.
    pub fn properties(&self) -> &Map<String, Value> {
        self.properties.map()
    }

    /// The event's properties, for changing as a map. The event is then written back
    /// from the map (keys sorted, numbers as `serde_json` writes them). To set a few
    /// members, [`Event::set_property`] is cheaper and keeps the others' bytes.
    pub fn properties_mut(&mut self) -> &mut Map<String, Value> {
        self.properties.map_mut()
    }

    /// One property (the last, if the key appears more than once), parsed on first
    /// read; `None` if absent.
    pub fn property(&self, key: &str) -> Option<&Value> {
        self.properties.get(key)
    }

    /// One property, if it is a string.
    pub fn property_str(&self, key: &str) -> Option<&str> {
        self.property(key).and_then(Value::as_str)
    }

    /// Sets one property: its new value replaces the old one's text in place, or is
    /// appended. The other properties keep their bytes and order.
    ///
    /// ```
    /// # use weir_plugin_sdk::{Event, json};
    /// let mut event = Event::new("post_liked").with_properties(json!({"n": 1.0}));
    /// event.set_property("checked", true);
    /// # let changes = event.into_changes();
    /// assert_eq!(changes.properties.as_deref(), Some(r#"{"n":1.0,"checked":true}"#));
    /// ```
    pub fn set_property(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.properties.set(key.into(), value.into());
    }

    /// The event's context (device, locale, page ...), parsed whole.
    pub fn context(&self) -> &Map<String, Value> {
        self.context.map()
    }

    /// One member of the context, parsed on first read.
    pub fn context_value(&self, key: &str) -> Option<&Value> {
        self.context.get(key)
    }

    /// Sets one member of the context, keeping the others' bytes.
    pub fn set_context_value(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.context.set(key.into(), value.into());
    }

    /// The event's context, for changing as a map (written back with keys sorted).
    pub fn context_mut(&mut self) -> &mut Map<String, Value> {
        self.context.map_mut()
    }

    /// Sends a row to the pipeline's table `table` (declared in `[[pipeline.table]]`),
    /// written if the event completes the chain. `columns` serialises to a JSON object
    /// of the table's columns; the host checks every value against the column's type
    /// and dead-letters the event, naming the column, if one does not fit.
    ///
    /// ```
    /// # use weir_plugin_sdk::{Event, Emitted, json};
    /// let mut event = Event::new("profile_viewed");
    /// event.emit_row("profile_viewed", &json!({"profile_id": "p1"}));
    /// assert!(matches!(&event.outputs()[0], Emitted::Row { table, .. } if table == "profile_viewed"));
    /// ```
    pub fn emit_row(&mut self, table: impl Into<String>, columns: &impl serde::Serialize) {
        let columns = serde_json::to_string(columns)
            .unwrap_or_else(|e| format!("row could not be serialised: {e}"));
        self.outputs.push(Emitted::Row {
            table: table.into(),
            columns,
        });
    }

    /// Adds `delta` to counter `counter` (declared in `[[pipeline.counter]]`) for `key`,
    /// applied exactly once if the event completes the chain. Apps read it at
    /// `GET /v1/counters/{counter}/{key}`.
    pub fn count(&mut self, counter: impl Into<String>, key: impl Into<String>, delta: i64) {
        self.outputs.push(Emitted::Count {
            counter: counter.into(),
            key: key.into(),
            delta,
        });
    }

    /// Sends the event, as it leaves the chain, to the pipeline's webhook or Kafka topic
    /// sink named `sink` (`[[pipeline.webhook]]`, `[[pipeline.topic]]`).
    pub fn forward(&mut self, sink: impl Into<String>) {
        self.outputs.push(Emitted::Forward(sink.into()));
    }

    /// The rows, counts and forwards emitted so far (for tests).
    pub fn outputs(&self) -> &[Emitted] {
        &self.outputs
    }

    /// True if the plugin changed anything (or asked for mutable access to the JSON).
    pub fn is_changed(&self) -> bool {
        self.name_changed
            || self.user_changed
            || self.timestamp_changed
            || self.properties.is_changed()
            || self.context.is_changed()
    }

    /// The event the host sent as `e`, its strings slices of the batch's `text`.
    #[doc(hidden)]
    pub fn from_batch(text: &Rc<str>, e: wit::Event) -> Self {
        let slice = |span: wit::Span| {
            let start = span.offset as usize;
            Text::Batch(text.clone(), start..start + span.len as usize)
        };
        Self {
            event_id: slice(e.event_id),
            app: slice(e.app),
            name: slice(e.name),
            user_id: e.user_id.map(slice),
            timestamp_ms: e.timestamp_ms,
            properties: JsonObject::from_raw(slice(e.properties)),
            context: JsonObject::from_raw(slice(e.context)),
            name_changed: false,
            user_changed: false,
            timestamp_changed: false,
            outputs: Vec::new(),
        }
    }

    /// What the plugin changed, for the host (the unchanged fields stay `none`).
    #[doc(hidden)]
    pub fn into_changes(self) -> wit::Changes {
        wit::Changes {
            name: self.name_changed.then(|| self.name.into_string()),
            user_id: self
                .user_changed
                .then(|| self.user_id.map(Text::into_string)),
            timestamp_ms: self.timestamp_changed.then_some(self.timestamp_ms),
            properties: self
                .properties
                .is_changed()
                .then(|| self.properties.into_raw()),
            context: self.context.is_changed().then(|| self.context.into_raw()),
        }
    }
}

/// What the plugin decided for one event.
// `Keep` is by far the common case: boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Pass the event on (changed or not: the SDK sends only changed events back).
    Keep(Event),
    /// Discard it on purpose; the reason is counted, the event written nowhere.
    Drop(String),
    /// Refuse it as invalid; it goes to the dead letters with the reason.
    Reject(String),
}

impl Outcome {
    pub fn keep(event: Event) -> Self {
        Outcome::Keep(event)
    }

    pub fn drop(reason: impl Into<String>) -> Self {
        Outcome::Drop(reason.into())
    }

    pub fn reject(reason: impl Into<String>) -> Self {
        Outcome::Reject(reason.into())
    }

    /// The kept event, if any (handy in tests).
    pub fn kept(&self) -> Option<&Event> {
        match self {
            Outcome::Keep(e) => Some(e),
            _ => None,
        }
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> bindings::Outcome {
        match self {
            Outcome::Keep(mut e) if !e.outputs.is_empty() => {
                let outputs = std::mem::take(&mut e.outputs)
                    .into_iter()
                    .map(|o| match o {
                        Emitted::Row { table, columns } => {
                            wit::Output::Row(wit::Row { table, columns })
                        }
                        Emitted::Count {
                            counter,
                            key,
                            delta,
                        } => wit::Output::Count(wit::Count {
                            counter,
                            key,
                            delta,
                        }),
                        Emitted::Forward(sink) => wit::Output::Forward(sink),
                    })
                    .collect();
                let changes = e.is_changed().then(|| e.into_changes());
                bindings::Outcome::Route(wit::Routed { changes, outputs })
            }
            Outcome::Keep(e) if !e.is_changed() => bindings::Outcome::Pass,
            Outcome::Keep(e) => bindings::Outcome::Keep(e.into_changes()),
            Outcome::Drop(r) => bindings::Outcome::Drop(r),
            Outcome::Reject(r) => bindings::Outcome::Reject(r),
        }
    }
}

/// Writes a line to weir's log, tagged with the plugin's name and version.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::weir::plugin::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// Adds to one of the plugin's counters (a Prometheus metric on the host).
pub fn counter_add(name: &str, delta: u64) {
    #[cfg(target_arch = "wasm32")]
    bindings::weir::plugin::host::counter_add(name, delta);
    #[cfg(not(target_arch = "wasm32"))]
    testing::add(name, delta);
}

/// The plugin's configuration JSON, as set in the pipeline (`{}` when none).
pub fn config_json() -> String {
    #[cfg(target_arch = "wasm32")]
    return bindings::weir::plugin::host::config();
    #[cfg(not(target_arch = "wasm32"))]
    return testing::config();
}

/// Native stand-ins for the host imports, for unit tests.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        static COUNTERS: RefCell<BTreeMap<String, u64>> = RefCell::default();
        static CONFIG: RefCell<String> = RefCell::new("{}".into());
    }

    pub(crate) fn add(name: &str, delta: u64) {
        COUNTERS.with(|c| *c.borrow_mut().entry(name.to_owned()).or_default() += delta);
    }

    pub(crate) fn config() -> String {
        CONFIG.with(|c| c.borrow().clone())
    }

    /// Counters added on this thread so far.
    pub fn counters() -> BTreeMap<String, u64> {
        COUNTERS.with(|c| c.borrow().clone())
    }

    /// Sets what [`crate::config_json`] returns on this thread.
    pub fn set_config(json: &str) {
        CONFIG.with(|c| *c.borrow_mut() = json.to_owned());
    }
}

#[doc(hidden)]
pub fn __load_config<C: serde::de::DeserializeOwned>() -> Result<C, String> {
    serde_json::from_str(&config_json()).map_err(|e| format!("invalid plugin config: {e}"))
}

#[doc(hidden)]
pub fn __run_batch(
    batch: bindings::Batch,
    mut handler: impl FnMut(Event) -> Outcome,
) -> Vec<bindings::Outcome> {
    let text: Rc<str> = match String::from_utf8(batch.text) {
        Ok(text) => text.into(),
        Err(e) => {
            // The host sends UTF-8: this is a host bug, made visible in dead letters.
            let reason = format!("the batch's text is not UTF-8: {e}");
            return batch
                .events
                .iter()
                .map(|_| bindings::Outcome::Reject(reason.clone()))
                .collect();
        }
    };
    batch
        .events
        .into_iter()
        .map(|e| handler(Event::from_batch(&text, e)).into_wit())
        .collect()
}

/// Exports a function as the plugin.
///
/// - `plugin!(handle)` with `fn handle(event: Event) -> Outcome`;
/// - `plugin!(handle, config: Config)` with `fn handle(event: Event, config: &Config) ->
///   Outcome`, where `Config: serde::de::DeserializeOwned` is read once per instance from
///   the pipeline's JSON. If it does not deserialise, every event is rejected with the
///   reason, so a bad configuration is visible in the dead letters at once.
#[macro_export]
macro_rules! plugin {
    ($handler:path) => {
        #[doc(hidden)]
        pub struct __WeirPlugin;

        impl $crate::bindings::Guest for __WeirPlugin {
            fn process(
                batch: $crate::bindings::Batch,
            ) -> ::std::vec::Vec<$crate::bindings::Outcome> {
                $crate::__run_batch(batch, $handler)
            }
        }

        $crate::bindings::__export_plugin!(__WeirPlugin with_types_in $crate::bindings);
    };
    ($handler:path, config: $config:ty) => {
        #[doc(hidden)]
        pub struct __WeirPlugin;

        impl $crate::bindings::Guest for __WeirPlugin {
            fn process(
                batch: $crate::bindings::Batch,
            ) -> ::std::vec::Vec<$crate::bindings::Outcome> {
                static CONFIG: ::std::sync::OnceLock<::std::result::Result<$config, ::std::string::String>> =
                    ::std::sync::OnceLock::new();
                match CONFIG.get_or_init($crate::__load_config::<$config>) {
                    Ok(config) => $crate::__run_batch(batch, |e| $handler(e, config)),
                    Err(reason) => $crate::__run_batch(batch, |_| $crate::Outcome::reject(reason.clone())),
                }
            }
        }

        $crate::bindings::__export_plugin!(__WeirPlugin with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch as the host encodes it: each event's strings back to back, the app once.
    fn batch(events: &[(&str, Option<&str>, &str)]) -> bindings::Batch {
        let mut text = Vec::new();
        let mut put = |s: &str| {
            let offset = text.len() as u32;
            text.extend_from_slice(s.as_bytes());
            wit::Span {
                offset,
                len: s.len() as u32,
            }
        };
        let app = put("a");
        let events = events
            .iter()
            .enumerate()
            .map(|(i, (name, user, properties))| wit::Event {
                event_id: put(&format!("e{i}")),
                app,
                name: put(name),
                user_id: user.map(&mut put),
                timestamp_ms: i as i64,
                properties: put(properties),
                context: put("{}"),
            })
            .collect();
        bindings::Batch { text, events }
    }

    #[test]
    fn events_read_from_the_batch_and_only_changes_go_back() {
        let b = batch(&[
            ("n", None, r#"{"b":1,  "a":2}"#),
            ("m", Some("u1"), r#"{"k":"v"}"#),
            ("renamed", None, "{}"),
        ]);
        let mut seen = Vec::new();
        let outcomes = __run_batch(b, |mut e| {
            seen.push((
                e.event_id().to_owned(),
                e.app().to_owned(),
                e.name().to_owned(),
                e.user_id().map(str::to_owned),
                e.timestamp_ms(),
            ));
            match e.name() {
                "m" => e.set_property("k", "w"),
                "renamed" => e.set_name("new_name"),
                _ => assert_eq!(e.property("a"), Some(&json!(2))),
            }
            Outcome::keep(e)
        });
        assert_eq!(
            seen,
            [
                ("e0".into(), "a".into(), "n".into(), None, 0),
                ("e1".into(), "a".into(), "m".into(), Some("u1".into()), 1),
                ("e2".into(), "a".into(), "renamed".into(), None, 2),
            ]
        );
        assert!(matches!(outcomes[0], bindings::Outcome::Pass));
        match &outcomes[1] {
            bindings::Outcome::Keep(c) => {
                assert_eq!(c.properties.as_deref(), Some(r#"{"k":"w"}"#));
                assert!(c.name.is_none() && c.user_id.is_none() && c.context.is_none());
                assert!(c.timestamp_ms.is_none());
            }
            other => panic!("{other:?}"),
        }
        match &outcomes[2] {
            bindings::Outcome::Keep(c) => {
                assert_eq!(c.name.as_deref(), Some("new_name"));
                assert!(c.properties.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_removed_user_is_a_change() {
        let outcomes = __run_batch(batch(&[("n", Some("u1"), "{}")]), |mut e| {
            e.set_user_id(None);
            Outcome::keep(e)
        });
        assert!(matches!(&outcomes[0], bindings::Outcome::Keep(c) if c.user_id == Some(None)));
    }

    #[test]
    fn text_that_is_not_utf8_rejects_the_batch() {
        let mut b = batch(&[("n", None, "{}")]);
        b.text.push(0xff);
        let outcomes = __run_batch(b, Outcome::keep);
        assert!(matches!(&outcomes[0], bindings::Outcome::Reject(r) if r.contains("not UTF-8")));
    }

    #[test]
    fn outputs_make_a_route_outcome_that_carries_the_event_only_if_changed() {
        let mut e = Event::new("profile_viewed");
        e.count("profile_views", "p1", 1);
        e.emit_row("profile_viewed", &json!({"profile_id": "p1"}));
        match Outcome::keep(e).into_wit() {
            bindings::Outcome::Route(r) => {
                assert!(r.changes.is_none());
                assert_eq!(r.outputs.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        let mut e = Event::new("profile_viewed");
        e.set_property("x", 1);
        e.count("profile_views", "p1", 1);
        assert!(matches!(
            Outcome::keep(e).into_wit(),
            bindings::Outcome::Route(r) if r.changes.is_some()
        ));
    }

    #[test]
    fn changed_properties_are_reserialised() {
        let mut e = Event::new("n");
        e.set_property("k", "v");
        assert!(e.is_changed());
        assert_eq!(properties(e), r#"{"k":"v"}"#);
        let mut e = Event::new("n");
        e.set_name("m");
        assert!(
            matches!(Outcome::keep(e).into_wit(), bindings::Outcome::Keep(c) if c.name.as_deref() == Some("m"))
        );
    }

    fn with_raw_properties(raw: &str) -> Event {
        let mut e = Event::new("n");
        e.properties = JsonObject::from_raw(String::from(raw));
        e
    }

    /// The properties' text the host gets back (the event must have changed them).
    fn properties(e: Event) -> String {
        e.into_changes().properties.expect("properties changed")
    }

    #[test]
    fn set_property_splices_and_keeps_the_other_members_bytes() {
        let raw = r#"{ "n": 18446744073709551616, "f": 1.0, "s": "a}\"b", "o": {"x": [1, "]"]}, "t": false }"#;
        let mut e = with_raw_properties(raw);
        assert_eq!(e.property("t"), Some(&json!(false)));
        assert_eq!(e.property("o"), Some(&json!({"x": [1, "]"]})));
        assert_eq!(e.property("s"), Some(&json!("a}\"b")));
        e.set_property("t", "yes");
        e.set_property("added", json!({"k": [true]}));
        e.set_property("f", 2);
        assert_eq!(e.property("t"), Some(&json!("yes")));
        assert_eq!(e.property("added"), Some(&json!({"k": [true]})));
        assert!(e.is_changed());
        assert_eq!(
            properties(e),
            r#"{ "n": 18446744073709551616, "f": 2, "s": "a}\"b", "o": {"x": [1, "]"]}, "t": "yes","added":{"k":[true]} }"#
        );
    }

    #[test]
    fn escaped_and_repeated_keys_resolve_like_a_last_wins_parser() {
        let mut e = with_raw_properties(r#"{"a":1,"\u0061":2,"b\"":3}"#);
        assert_eq!(e.property("a"), Some(&json!(2)));
        assert_eq!(e.property("b\""), Some(&json!(3)));
        assert_eq!(e.properties()["a"], json!(2));
        e.set_property("a", 9);
        e.set_property("q\"", 1);
        assert_eq!(e.property("a"), Some(&json!(9)));
        assert_eq!(e.property("q\""), Some(&json!(1)));
        assert_eq!(properties(e), r#"{"a":1,"\u0061":9,"b\"":3,"q\"":1}"#);
    }

    #[test]
    fn text_that_is_not_an_object_reads_as_empty_and_is_replaced_when_set() {
        for raw in ["", "[1]", "{\"a\":1", "{\"a\" 1}", "{} x", "null"] {
            let mut e = with_raw_properties(raw);
            assert_eq!(e.property("a"), None, "{raw}");
            assert!(e.properties().is_empty(), "{raw}");
            e.set_property("k", 1);
            assert_eq!(properties(e), r#"{"k":1}"#, "{raw}");
        }
        let mut e = with_raw_properties(" { } ");
        e.set_property("k", 1);
        assert_eq!(properties(e), r#" { "k":1} "#);
    }

    #[test]
    fn the_map_api_sees_spliced_members_and_writes_sorted_keys() {
        let mut e = with_raw_properties(r#"{"z":1,"a":2}"#);
        e.set_property("m", 3);
        assert_eq!(e.properties().len(), 3);
        e.properties_mut().remove("z");
        e.set_property("b", 4);
        assert_eq!(e.property("b"), Some(&json!(4)));
        assert_eq!(properties(e), r#"{"a":2,"b":4,"m":3}"#);
        let mut e = with_raw_properties(r#"{"z":1}"#);
        e.set_context_value("locale", "fr");
        assert_eq!(e.context_value("locale"), Some(&json!("fr")));
        let changes = e.into_changes();
        assert_eq!(
            (changes.properties.as_deref(), changes.context.as_deref()),
            (None, Some(r#"{"locale":"fr"}"#))
        );
    }

    #[test]
    fn counters_and_config_work_natively() {
        counter_add("seen", 2);
        counter_add("seen", 1);
        assert_eq!(testing::counters()["seen"], 3);
        testing::set_config(r#"{"x":1}"#);
        #[derive(Debug, serde::Deserialize)]
        struct C {
            x: u32,
        }
        assert_eq!(__load_config::<C>().unwrap().x, 1);
        testing::set_config("[]");
        assert!(
            __load_config::<C>()
                .unwrap_err()
                .contains("invalid plugin config")
        );
    }

    mod splicer_properties {
        //! Property-based fuzzing of the JSON splicer (`JsonObject`): reads and writes by
        //! key agree with a map that keeps the last value of each key, the text it
        //! writes is always the object the map holds, members never set keep their exact
        //! bytes, and no text makes it panic. The long run:
        //! `PROPTEST_CASES=200000 cargo test -p weir-plugin-sdk --release splicer`.
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "\\PC{0,8}".prop_map(Value::from),
                "[\"\\\\/\\x00-\\x1f]{0,3}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("\\PC{0,4}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A key: often one of a few, so that sets and reads meet; escapes and
        /// non-ASCII too.
        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec!["a", "b", "plan", "caf\u{e9}", "q\"uote", "\\"])
                    .prop_map(str::to_owned),
                "\\PC{0,6}",
            ]
        }

        #[derive(Debug, Clone)]
        enum Op {
            Get(String),
            Set(String, Value),
        }

        fn ops() -> impl Strategy<Value = Vec<Op>> {
            prop::collection::vec(
                prop_oneof![
                    key().prop_map(Op::Get),
                    (key(), value()).prop_map(|(k, v)| Op::Set(k, v)),
                ],
                0..12,
            )
        }

        /// An object's text as an app may send it: members in any order, a key
        /// possibly repeated, whitespace between tokens, and numbers the splicer must
        /// keep as written (`"keep":1.0`, an integer beyond u64).
        fn object_text() -> impl Strategy<Value = String> {
            (
                prop::collection::vec((key(), value()), 0..6),
                prop::sample::select(vec!["", " ", "\n  "]),
            )
                .prop_map(|(members, ws)| {
                    let mut parts = vec![
                        format!("\"keep\"{ws}:{ws}1.0"),
                        format!("\"huge\":{ws}123456789012345678901234567890"),
                    ];
                    for (k, v) in members {
                        parts.push(format!("{}:{ws}{}", json!(k), v));
                    }
                    format!("{{{ws}{}{ws}}}", parts.join(&format!(",{ws}")))
                })
        }

        proptest! {
            #[test]
            fn reads_and_writes_agree_with_a_last_value_map(text in object_text(), ops in ops()) {
                let mut model: Map<String, Value> = serde_json::from_str(&text).unwrap();
                let mut object = JsonObject::from_raw(text.clone());
                for op in &ops {
                    match op {
                        Op::Get(k) if k != "huge" => prop_assert_eq!(object.get(k), model.get(k)),
                        Op::Get(_) => {}
                        Op::Set(k, v) => {
                            object.set(k.clone(), v.clone());
                            model.insert(k.clone(), v.clone());
                        }
                    }
                }
                let changed = object.is_changed();
                let written = object.into_raw();
                let reread: Map<String, Value> = serde_json::from_str(&written)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {written}")))?;
                prop_assert_eq!(&reread, &model, "{}", written);
                let set = |key: &str| ops.iter().any(|op| matches!(op, Op::Set(k, _) if k == key));
                if !set("keep") {
                    prop_assert!(written.contains("1.0"), "{}", written);
                }
                if !set("huge") {
                    prop_assert!(written.contains("123456789012345678901234567890"), "{}", written);
                }
                if !changed {
                    prop_assert_eq!(written, text);
                }
            }

            #[test]
            fn any_text_is_read_and_written_without_panic(text in "\\PC{0,40}|[{}\\[\\]\",:\\\\ a0-9]{0,40}", k in key(), v in value()) {
                let object = JsonObject::from_raw(text.clone());
                let _ = object.get(&k);
                let _ = object.map();
                let mut object = JsonObject::from_raw(text);
                let _ = object.get(&k);
                object.set(k, v);
                let _ = object.into_raw();
            }
        }
    }
}
