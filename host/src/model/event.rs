//! An event as the host sees it, and where it came from.

use serde_json::value::RawValue;

use super::record::WireEvent;

/// One event inside the processor: the envelope's fields, typed, with the app that
/// sent it. `properties` and `context` are JSON object text, as the app sent them
/// (compacted), so nothing re-serialises them on the way to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_id: String,
    pub app: String,
    pub name: String,
    pub user_id: Option<String>,
    pub timestamp_ms: i64,
    pub properties: String,
    pub context: String,
}

impl Event {
    /// The event of an ingest record, owned by `app`.
    pub fn from_wire(app: String, e: WireEvent) -> Self {
        Self {
            event_id: e.event_id,
            app,
            name: e.name,
            user_id: e.user_id,
            timestamp_ms: e.timestamp_ms,
            // The raw JSON's buffer becomes the string: no copy.
            properties: Box::<str>::from(e.properties).into(),
            context: Box::<str>::from(e.context).into(),
        }
    }

    /// The event as the JSON a client would have sent (dead letters, webhooks and
    /// topic sinks carry this form): `{"event_id", "name", "user_id", "timestamp"
    /// (epoch ms), "properties", "context"}`.
    pub fn to_json(&self) -> String {
        let raw = |s: &str| {
            RawValue::from_string(s.to_owned())
                .unwrap_or_else(|_| serde_json::value::to_raw_value(s).expect("string to JSON"))
        };
        serde_json::json!({
            "event_id": self.event_id,
            "name": self.name,
            "user_id": self.user_id,
            "timestamp": self.timestamp_ms,
            "properties": raw(&self.properties),
            "context": raw(&self.context),
        })
        .to_string()
    }
}

/// Where an event came from: its Kafka coordinates and position in the record. Stable
/// across replays, so it identifies the event's slot in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
    /// Position of the event inside its record.
    pub index: u32,
    pub received_ms: i64,
}

/// An event's slot in the stream: partition, offset, index in the record (an
/// [`Origin`] without the receive time, which a replay does not change either).
pub type Slot = (i32, i64, u32);

impl Origin {
    pub fn slot(&self) -> Slot {
        (self.partition, self.offset, self.index)
    }
}

/// Something a plugin sends besides the event itself, as the plugin named it (not yet
/// checked against what the pipeline declares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginOutput {
    /// A row for a declared table: JSON object text, one member per column.
    Row { table: String, columns: String },
    /// An increment of a declared counter.
    Count {
        counter: String,
        key: String,
        delta: i64,
    },
    /// The event, forwarded to a webhook or topic sink by its name.
    Forward(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_the_properties_text() {
        let e = Event {
            event_id: "e1".into(),
            app: "a".into(),
            name: "post_liked".into(),
            user_id: None,
            timestamp_ms: 5,
            properties: r#"{"n":1.0}"#.into(),
            context: "{}".into(),
        };
        assert_eq!(
            e.to_json(),
            r#"{"context":{},"event_id":"e1","name":"post_liked","properties":{"n":1.0},"timestamp":5,"user_id":null}"#
        );
    }
}
