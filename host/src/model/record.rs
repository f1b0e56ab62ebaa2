//! The Kafka record format: one record holds every event of one accepted ingest
//! request, so a request is durable all at once or not at all (Kafka writes a record
//! atomically). Versioned by the `v` field and the `weir-format` header.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Current record format version.
pub const RECORD_VERSION: u32 = 1;

/// One accepted request.
#[derive(Debug, Serialize, Deserialize)]
pub struct IngestRecord {
    /// Format version ([`RECORD_VERSION`]).
    pub v: u32,
    /// The app that owns the write key of the request.
    pub app: String,
    /// When ingest received the request (ms since the Unix epoch).
    pub received_ms: i64,
    /// The request's events, normalised.
    pub events: Vec<WireEvent>,
    /// The record sends dead letters back through the pipeline (`weir dead-letters
    /// replay`): its events are processed again although their ids were seen, and take
    /// over their deduplication claims. Absent (false) in what ingest writes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
}

/// One event after the envelope checks: every field present and typed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireEvent {
    pub event_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub timestamp_ms: i64,
    /// A JSON object, kept as text: the processor hands it to plugins untouched.
    pub properties: Box<RawValue>,
    /// A JSON object, kept as text.
    pub context: Box<RawValue>,
    /// The event id was made by ingest because the client sent none: no copy of the
    /// event can reach weir (a client's resend would get another id), so deduplication
    /// does not claim it. Absent (false) when the id is the client's; records written
    /// before it existed read as false, so their events are claimed as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub id_assigned: bool,
}

/// Why a Kafka record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no payload")]
    Empty,
    #[error("record is not a weir ingest record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported record format version {0} (this weir reads version {RECORD_VERSION})")]
    Version(u32),
}

impl IngestRecord {
    /// A record of the current format version.
    pub fn new(app: String, received_ms: i64, events: Vec<WireEvent>) -> Self {
        Self {
            v: RECORD_VERSION,
            app,
            received_ms,
            events,
            replay: false,
        }
    }

    /// The Kafka key: the first event's user (or, without one, its id), so that a
    /// user's single-event requests land on one partition and stay in order.
    pub fn key(&self) -> String {
        let first = self
            .events
            .first()
            .expect("a record holds at least one event");
        first
            .user_id
            .clone()
            .unwrap_or_else(|| first.event_id.clone())
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialising an ingest record cannot fail")
    }

    pub fn decode(payload: Option<&[u8]>) -> Result<IngestRecord, DecodeError> {
        let payload = payload.ok_or(DecodeError::Empty)?;
        let record: IngestRecord = serde_json::from_slice(payload)?;
        if record.v != RECORD_VERSION {
            return Err(DecodeError::Version(record.v));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_json_text() {
        let record = IngestRecord {
            v: RECORD_VERSION,
            app: "demo".into(),
            received_ms: 1_700_000_000_000,
            events: vec![WireEvent {
                event_id: "e1".into(),
                name: "post_liked".into(),
                user_id: Some("u1".into()),
                timestamp_ms: 1_700_000_000_001,
                properties: RawValue::from_string(r#"{"post":"p1","n":1}"#.into()).unwrap(),
                context: RawValue::from_string("{}".into()).unwrap(),
                id_assigned: false,
            }],
            replay: false,
        };
        let back = IngestRecord::decode(Some(&record.encode())).unwrap();
        assert_eq!(back.events[0].properties.get(), r#"{"post":"p1","n":1}"#);
        assert_eq!(back.events[0].user_id.as_deref(), Some("u1"));
        assert!(!back.replay);
        assert!(
            !String::from_utf8(record.encode())
                .unwrap()
                .contains("replay"),
            "ingest's records stay as they were"
        );
        assert!(!back.events[0].id_assigned);
        assert!(
            !String::from_utf8(record.encode())
                .unwrap()
                .contains("id_assigned"),
            "a client's id is written as before"
        );
        let mut assigned = IngestRecord::decode(Some(&record.encode())).unwrap();
        assigned.events[0].id_assigned = true;
        assert!(
            IngestRecord::decode(Some(&assigned.encode()))
                .unwrap()
                .events[0]
                .id_assigned,
            "an id ingest made stays marked"
        );
        let replay = IngestRecord {
            replay: true,
            ..record
        };
        assert!(IngestRecord::decode(Some(&replay.encode())).unwrap().replay);
    }

    #[test]
    fn foreign_records_are_named() {
        assert!(matches!(
            IngestRecord::decode(None),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            IngestRecord::decode(Some(b"hello")),
            Err(DecodeError::Json(_))
        ));
        let v2 = br#"{"v":2,"app":"a","received_ms":0,"events":[]}"#;
        assert!(matches!(
            IngestRecord::decode(Some(v2)),
            Err(DecodeError::Version(2))
        ));
    }
}
