//! Dead letters through the admin API: list them, and replay them through the pipeline
//! in force (after a plugin or schema was fixed).
//!
//! A replay sends each dead letter's event back to the events topic as a new ingest
//! record (same `event_id`, same app, received now), so it goes through the schemas,
//! the plugins and the sinks like any event. Dead letters whose event is already in
//! `events` are skipped (a webhook dead letter, or one replayed before), as are records
//! that were never events (stage `decode`) and events a sink refused (stage `sink`:
//! the other sinks took them, and a replay would reach those again). The dead letter
//! rows stay where they are.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::bus::{BusError, Producer};
use crate::ingest::envelope::{self, BodyFormat};
use crate::model::{IngestRecord, Stage, WireEvent};
use crate::sinks::clickhouse::{
    ClickHouseError, ClickHouseSink, DeadLetterFilter, DeadLetterRecord,
};

/// Most events per replayed record (as a request of `POST /v1/events`).
const EVENTS_PER_RECORD: usize = 500;

/// Why dead letters could not be listed or replayed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// ClickHouse did not answer the query (nothing was replayed).
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    /// Kafka refused a replayed record: the first `replayed` events were sent.
    #[error("replayed {replayed} events, then Kafka refused the next record: {source}")]
    Kafka { replayed: usize, source: BusError },
}

/// What lists and replays dead letters.
pub struct DeadLetters {
    pub sink: ClickHouseSink,
    pub producer: Producer,
}

/// The outcome of a replay.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    /// Events sent back to the events topic.
    pub replayed: usize,
    /// Dead letters left alone, with why.
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub event_id: String,
    pub stage: String,
    pub reason: String,
}

impl DeadLetters {
    pub async fn list(
        &self,
        filter: &DeadLetterFilter,
    ) -> Result<Vec<DeadLetterRecord>, DeadLetterError> {
        Ok(self.sink.dead_letters(filter).await?)
    }

    /// Replays the dead letters matching `filter` (newest first, one per event).
    pub async fn replay(&self, filter: &DeadLetterFilter) -> Result<ReplayReport, DeadLetterError> {
        let letters = self.sink.dead_letters(filter).await?;
        let mut seen = HashSet::new();
        let letters: Vec<DeadLetterRecord> = letters
            .into_iter()
            .filter(|d| d.event_id.is_empty() || seen.insert(d.event_id.clone()))
            .collect();
        let ids: Vec<String> = letters.iter().map(|d| d.event_id.clone()).collect();
        let present = self.sink.events_present(&ids).await?;
        let mut report = ReplayReport::default();
        let mut by_app: BTreeMap<String, Vec<WireEvent>> = BTreeMap::new();
        let limits = envelope::Limits {
            max_event_bytes: usize::MAX,
            max_events: 1,
            max_depth: 64,
        };
        let now = crate::model::now_ms();
        for d in letters {
            let skip = |reason: &str| Skipped {
                event_id: d.event_id.clone(),
                stage: d.stage.clone(),
                reason: reason.to_owned(),
            };
            if Stage::parse(&d.stage) == Some(Stage::Decode) || d.event_id.is_empty() {
                report.skipped.push(skip(
                    "the Kafka record was not a weir event; nothing to replay",
                ));
                continue;
            }
            if present.contains(&d.event_id) {
                report.skipped.push(skip("the event is in events already"));
                continue;
            }
            if Stage::parse(&d.stage) == Some(Stage::Sink) {
                // The other sinks took the event when this one refused it: a replay
                // goes through every sink, and would deliver it to them again.
                report.skipped.push(skip(&format!(
                    "{} refused the event after the other sinks took it; a replay would \
                     deliver it to them again (its event is in raw)",
                    d.plugin
                )));
                continue;
            }
            let parsed =
                envelope::parse_body(d.raw.as_bytes(), BodyFormat::Json, &limits, now, || {
                    d.event_id.clone()
                });
            match parsed {
                Ok(mut events) if events.len() == 1 => {
                    by_app
                        .entry(d.app.clone())
                        .or_default()
                        .push(events.remove(0));
                }
                Ok(_) => report
                    .skipped
                    .push(skip("the dead letter holds no single event")),
                Err(e) => report.skipped.push(skip(&format!(
                    "the dead letter's event is not valid: {}",
                    e.message
                ))),
            }
        }
        for (app, events) in by_app {
            for chunk in events.chunks(EVENTS_PER_RECORD) {
                let record = IngestRecord {
                    replay: true,
                    ..IngestRecord::new(app.clone(), now, chunk.to_vec())
                };
                let key = record.key();
                self.producer.send(&record, &key).await.map_err(|source| {
                    DeadLetterError::Kafka {
                        replayed: report.replayed,
                        source,
                    }
                })?;
                report.replayed += chunk.len();
            }
        }
        tracing::info!(
            replayed = report.replayed,
            skipped = report.skipped.len(),
            "dead letters replayed"
        );
        Ok(report)
    }
}
