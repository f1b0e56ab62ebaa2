//! The vocabulary every other module speaks, and nothing else: events as the host
//! sees them, the Kafka record that carries them, where an event came from, what the
//! pipeline makes of it (kept events, routed rows, counter increments, dead letters),
//! the rules for names, and a plugin's limits.
//!
//! This module depends on no other module of weir; everything else may depend on it.
//! The WIT-generated types of the plugin contract stay in `runtime`, which converts
//! them to and from these at the sandbox boundary (by moving fields, not copying).

mod batch;
mod event;
mod names;
mod record;
mod secrets;

pub use batch::{
    Batch, CountRow, Counter, DeadLetter, FailureKind, Kept, PluginFailure, RoutedRow, Stage,
    Target,
};
pub use event::{Event, Origin, PluginOutput, Slot};
pub use names::{MAX_COUNTER_KEY, MAX_EVENT_NAME, check_name, is_identifier};
pub use record::{DecodeError, IngestRecord, RECORD_VERSION, WireEvent};
pub use secrets::redact_url;

use std::time::Duration;

/// A plugin's sandbox limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one batch call.
    pub deadline: Duration,
    /// Linear memory cap, in bytes.
    pub memory_bytes: usize,
}

/// A JSON value's kind as error messages name it: `null`, `a boolean`, `a number`,
/// `a string`, `an array`, `an object`.
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The latest event timestamp weir accepts, in ms since the Unix epoch:
/// 2106-02-07T06:28:15.999Z, the last second ClickHouse's `DateTime` column (seconds
/// since the epoch, 32 bits unsigned) holds. The earliest is the epoch itself.
pub const MAX_TIMESTAMP_MS: i64 = u32::MAX as i64 * 1000 + 999;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
