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

pub use serde_json::{Map, Value, json};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "weir_plugin_sdk::bindings",
        runtime_path: "weir_plugin_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

pub use bindings::weir::plugin::host::Level;

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
    raw: String,
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
    fn from_raw(raw: String) -> Self {
        Self {
            raw,
            members: OnceCell::new(),
            map: OnceCell::new(),
            map_dirty: false,
            spliced: false,
        }
    }

    fn members(&self) -> &[Member] {
        self.members
            .get_or_init(|| scan_object(&self.raw).unwrap_or_default())
    }

    /// The index of the last member named `key`.
    fn find(&self, key: &str) -> Option<usize> {
        self.members().iter().rposition(|m| {
            let text = &self.raw[m.key.clone()];
            if m.key_escaped {
                let quoted = &self.raw[m.key.start - 1..m.key.end + 1];
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
            .get_or_init(|| serde_json::from_str(&self.raw[member.value.clone()]).ok())
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
        if self.members().is_empty() && scan_object(&self.raw).is_none() {
            // Not an object: it reads as `{}`, so it is written as one.
            self.raw = "{}".into();
            self.members = OnceCell::new();
        }
        let text = serde_json::to_string(&value).expect("a Value always serialises");
        let found = self.find(&key);
        let members = self.members.get_mut().expect("scanned by find");
        match found {
            Some(i) => {
                let old = members[i].value.clone();
                self.raw.replace_range(old.clone(), &text);
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
                    .map_or(self.raw.trim_end().len() - 1, |m| m.value.end);
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
                self.raw.insert_str(at, &member);
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
            .get_or_init(|| serde_json::from_str(&self.raw).unwrap_or_default())
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
            (true, Some(map)) => serde_json::to_string(&map).unwrap_or(self.raw),
            _ => self.raw,
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
/// changed through setters, so the SDK knows whether the plugin changed the event: an
/// unchanged event is answered with the WIT `pass` outcome and nothing crosses back.
#[derive(Debug, Clone)]
pub struct Event {
    event_id: String,
    app: String,
    name: String,
    user_id: Option<String>,
    timestamp_ms: i64,
    properties: JsonObject,
    context: JsonObject,
    /// Set by the setters of `name`, `user_id` and `timestamp_ms`.
    changed: bool,
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
            event_id: "test-event".into(),
            app: "test-app".into(),
            name: name.into(),
            user_id: None,
            timestamp_ms: 0,
            properties: JsonObject::from_raw("{}".into()),
            context: JsonObject::from_raw("{}".into()),
            changed: false,
            outputs: Vec::new(),
        }
    }

    /// Builder: sets the user id.
    pub fn with_user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
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
        &self.event_id
    }

    /// The app that sent the event (cannot be changed).
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The event name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the event. The new name must match `[A-Za-z0-9_.:-]{1,128}`, or the host
    /// fails the event.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
        self.changed = true;
    }

    /// The user the event is about.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    pub fn set_user_id(&mut self, user_id: Option<String>) {
        self.user_id = user_id;
        self.changed = true;
    }

    /// When it happened, ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.timestamp_ms
    }

    pub fn set_timestamp_ms(&mut self, timestamp_ms: i64) {
        self.timestamp_ms = timestamp_ms;
        self.changed = true;
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
    /// # let wit = event.into_wit();
    /// assert_eq!(wit.properties, r#"{"n":1.0,"checked":true}"#);
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
        self.changed || self.properties.is_changed() || self.context.is_changed()
    }

    #[doc(hidden)]
    pub fn from_wit(e: bindings::Event) -> Self {
        Self {
            event_id: e.event_id,
            app: e.app,
            name: e.name,
            user_id: e.user_id,
            timestamp_ms: e.timestamp_ms,
            properties: JsonObject::from_raw(e.properties),
            context: JsonObject::from_raw(e.context),
            changed: false,
            outputs: Vec::new(),
        }
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> bindings::Event {
        bindings::Event {
            event_id: self.event_id,
            app: self.app,
            name: self.name,
            user_id: self.user_id,
            timestamp_ms: self.timestamp_ms,
            properties: self.properties.into_raw(),
            context: self.context.into_raw(),
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
        use bindings::weir::plugin::types as wit;
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
                let event = e.is_changed().then(|| e.into_wit());
                bindings::Outcome::Route(wit::Routed { event, outputs })
            }
            Outcome::Keep(e) if !e.is_changed() => bindings::Outcome::Pass,
            Outcome::Keep(e) => bindings::Outcome::Keep(e.into_wit()),
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
    events: Vec<bindings::Event>,
    mut handler: impl FnMut(Event) -> Outcome,
) -> Vec<bindings::Outcome> {
    events
        .into_iter()
        .map(|e| handler(Event::from_wit(e)).into_wit())
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
                events: ::std::vec::Vec<$crate::bindings::Event>,
            ) -> ::std::vec::Vec<$crate::bindings::Outcome> {
                $crate::__run_batch(events, $handler)
            }
        }

        $crate::bindings::__export_plugin!(__WeirPlugin with_types_in $crate::bindings);
    };
    ($handler:path, config: $config:ty) => {
        #[doc(hidden)]
        pub struct __WeirPlugin;

        impl $crate::bindings::Guest for __WeirPlugin {
            fn process(
                events: ::std::vec::Vec<$crate::bindings::Event>,
            ) -> ::std::vec::Vec<$crate::bindings::Outcome> {
                static CONFIG: ::std::sync::OnceLock<::std::result::Result<$config, ::std::string::String>> =
                    ::std::sync::OnceLock::new();
                match CONFIG.get_or_init($crate::__load_config::<$config>) {
                    Ok(config) => $crate::__run_batch(events, |e| $handler(e, config)),
                    Err(reason) => $crate::__run_batch(events, |_| $crate::Outcome::reject(reason.clone())),
                }
            }
        }

        $crate::bindings::__export_plugin!(__WeirPlugin with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_properties_keep_their_text() {
        let e = Event::from_wit(bindings::Event {
            event_id: "e".into(),
            app: "a".into(),
            name: "n".into(),
            user_id: None,
            timestamp_ms: 1,
            properties: r#"{"b":1,  "a":2}"#.into(),
            context: "{}".into(),
        });
        assert_eq!(e.property("a"), Some(&json!(2)));
        assert!(!e.is_changed());
        assert!(matches!(
            Outcome::keep(e).into_wit(),
            bindings::Outcome::Pass
        ));
    }

    #[test]
    fn outputs_make_a_route_outcome_that_carries_the_event_only_if_changed() {
        let mut e = Event::new("profile_viewed");
        e.count("profile_views", "p1", 1);
        e.emit_row("profile_viewed", &json!({"profile_id": "p1"}));
        match Outcome::keep(e).into_wit() {
            bindings::Outcome::Route(r) => {
                assert!(r.event.is_none());
                assert_eq!(r.outputs.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        let mut e = Event::new("profile_viewed");
        e.set_property("x", 1);
        e.count("profile_views", "p1", 1);
        assert!(matches!(
            Outcome::keep(e).into_wit(),
            bindings::Outcome::Route(r) if r.event.is_some()
        ));
    }

    #[test]
    fn changed_properties_are_reserialised() {
        let mut e = Event::new("n");
        e.set_property("k", "v");
        assert!(e.is_changed());
        assert_eq!(e.into_wit().properties, r#"{"k":"v"}"#);
        let mut e = Event::new("n");
        e.set_name("m");
        assert!(matches!(Outcome::keep(e).into_wit(), bindings::Outcome::Keep(w) if w.name == "m"));
    }

    fn with_raw_properties(raw: &str) -> Event {
        let mut e = Event::new("n");
        e.properties = JsonObject::from_raw(raw.into());
        e
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
            e.into_wit().properties,
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
        assert_eq!(
            e.into_wit().properties,
            r#"{"a":1,"\u0061":9,"b\"":3,"q\"":1}"#
        );
    }

    #[test]
    fn text_that_is_not_an_object_reads_as_empty_and_is_replaced_when_set() {
        for raw in ["", "[1]", "{\"a\":1", "{\"a\" 1}", "{} x", "null"] {
            let mut e = with_raw_properties(raw);
            assert_eq!(e.property("a"), None, "{raw}");
            assert!(e.properties().is_empty(), "{raw}");
            e.set_property("k", 1);
            assert_eq!(e.into_wit().properties, r#"{"k":1}"#, "{raw}");
        }
        let mut e = with_raw_properties(" { } ");
        e.set_property("k", 1);
        assert_eq!(e.into_wit().properties, r#" { "k":1} "#);
    }

    #[test]
    fn the_map_api_sees_spliced_members_and_writes_sorted_keys() {
        let mut e = with_raw_properties(r#"{"z":1,"a":2}"#);
        e.set_property("m", 3);
        assert_eq!(e.properties().len(), 3);
        e.properties_mut().remove("z");
        e.set_property("b", 4);
        assert_eq!(e.property("b"), Some(&json!(4)));
        assert_eq!(e.into_wit().properties, r#"{"a":2,"b":4,"m":3}"#);
        let mut e = with_raw_properties(r#"{"z":1}"#);
        e.set_context_value("locale", "fr");
        assert_eq!(e.context_value("locale"), Some(&json!("fr")));
        let wit = e.into_wit();
        assert_eq!(
            (wit.properties.as_str(), wit.context.as_str()),
            (r#"{"z":1}"#, r#"{"locale":"fr"}"#)
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
}
