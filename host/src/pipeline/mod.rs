//! The pipeline: decode Kafka records, run each event through the plugin chain, and
//! sort the results into what the sinks write (kept events) and dead letters.

pub mod worker;

use std::time::Duration;

use tracing::debug;

use crate::bus::record::{IngestRecord, WireEvent};
use crate::config::PipelineConfig;
use crate::runtime::{self, Event, PluginInstance, Runtime, Verdict};

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

/// An event that went through the whole chain.
#[derive(Debug, Clone)]
pub struct Kept {
    pub origin: Origin,
    pub event: Event,
}

/// An event that was refused or failed, with the stage and reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub origin: Origin,
    pub event_id: String,
    pub app: String,
    pub name: String,
    /// `decode` (not a weir record) or `plugin`.
    pub stage: &'static str,
    pub plugin: String,
    pub plugin_version: String,
    pub reason: String,
    /// The event as JSON (or the record's bytes, lossily, for `decode`).
    pub raw: String,
}

/// The result of one batch.
#[derive(Debug, Default)]
pub struct Output {
    pub kept: Vec<Kept>,
    pub dead: Vec<DeadLetter>,
    pub dropped: usize,
}

/// Errors while building a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read plugin {name} from {path}: {source}")]
    Read {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
}

/// A pipeline ready to run: one live instance per plugin, in chain order.
pub struct Pipeline {
    name: String,
    chain: Vec<PluginInstance>,
    batch_size: usize,
    /// `name@version` of each plugin, joined by commas: recorded with each row.
    versions: String,
}

impl Pipeline {
    /// Loads, compiles and instantiates every plugin of the configured chain.
    pub fn load(
        runtime: &Runtime,
        cfg: &PipelineConfig,
        batch_size: usize,
    ) -> Result<Self, PipelineError> {
        let mut chain = Vec::new();
        for p in &cfg.plugins {
            let bytes = std::fs::read(&p.path).map_err(|source| PipelineError::Read {
                name: p.name.clone(),
                path: p.path.display().to_string(),
                source,
            })?;
            let limits = runtime::Limits {
                deadline: Duration::from_millis(p.deadline_ms),
                memory_bytes: p.memory_mib << 20,
            };
            let plugin = runtime.load(&p.name, &bytes, p.config_json(), limits)?;
            chain.push(plugin.instantiate()?);
        }
        Ok(Self::new(cfg.name.clone(), chain, batch_size))
    }

    pub fn new(name: String, chain: Vec<PluginInstance>, batch_size: usize) -> Self {
        let versions = chain
            .iter()
            .map(|i| format!("{}@{}", i.plugin().name(), i.plugin().version()))
            .collect::<Vec<_>>()
            .join(",");
        Self {
            name,
            chain,
            batch_size: batch_size.max(1),
            versions,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name@version,...` of the chain.
    pub fn versions(&self) -> &str {
        &self.versions
    }

    /// Runs decoded events through the chain, in plugin batches.
    pub fn run(&mut self, events: Vec<(Origin, String, WireEvent)>) -> Output {
        let mut out = Output::default();
        let mut pending: Vec<(Origin, Event)> = events
            .into_iter()
            .map(|(origin, app, e)| (origin, to_plugin_event(app, e)))
            .collect();
        for instance in &mut self.chain {
            let mut next = Vec::with_capacity(pending.len());
            let mut iter = pending.into_iter().peekable();
            while iter.peek().is_some() {
                let chunk: Vec<(Origin, Event)> = iter.by_ref().take(self.batch_size).collect();
                let (origins, batch): (Vec<Origin>, Vec<Event>) = chunk.into_iter().unzip();
                let verdicts = instance.process(&batch);
                for ((origin, original), verdict) in origins.into_iter().zip(batch).zip(verdicts) {
                    let plugin = instance.plugin();
                    let dead = |reason: String| DeadLetter {
                        origin,
                        raw: event_json(&original),
                        event_id: original.event_id.clone(),
                        app: original.app.clone(),
                        name: original.name.clone(),
                        stage: "plugin",
                        plugin: plugin.name().to_owned(),
                        plugin_version: plugin.version().to_owned(),
                        reason,
                    };
                    match verdict {
                        Verdict::Keep(event) => next.push((origin, event)),
                        Verdict::Drop(reason) => {
                            debug!(plugin = %plugin.name(), event_id = %original.event_id, %reason, "event dropped");
                            out.dropped += 1;
                        }
                        Verdict::Reject(reason) => out.dead.push(dead(reason)),
                        Verdict::Failed(reason) => out.dead.push(dead(reason)),
                    }
                }
            }
            pending = next;
        }
        out.kept = pending
            .into_iter()
            .map(|(origin, event)| Kept { origin, event })
            .collect();
        out
    }
}

/// Decodes one Kafka record into events, or a dead letter naming why it cannot be.
pub fn decode(
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
) -> Result<Vec<(Origin, String, WireEvent)>, Box<DeadLetter>> {
    match IngestRecord::decode(payload) {
        Ok(record) => {
            let app = record.app;
            Ok(record
                .events
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let origin = Origin {
                        partition,
                        offset,
                        index: i as u32,
                        received_ms: record.received_ms,
                    };
                    (origin, app.clone(), e)
                })
                .collect())
        }
        Err(e) => Err(Box::new(DeadLetter {
            origin: Origin {
                partition,
                offset,
                index: 0,
                received_ms: 0,
            },
            event_id: String::new(),
            app: String::new(),
            name: String::new(),
            stage: "decode",
            plugin: String::new(),
            plugin_version: String::new(),
            reason: e.to_string(),
            raw: String::from_utf8_lossy(payload.unwrap_or_default()).into_owned(),
        })),
    }
}

fn to_plugin_event(app: String, e: WireEvent) -> Event {
    Event {
        event_id: e.event_id,
        app,
        name: e.name,
        user_id: e.user_id,
        timestamp_ms: e.timestamp_ms,
        properties: e.properties.get().to_owned(),
        context: e.context.get().to_owned(),
    }
}

/// The event as the JSON a client would have sent (for dead letters).
pub fn event_json(e: &Event) -> String {
    let raw = |s: &str| {
        serde_json::value::RawValue::from_string(s.to_owned())
            .unwrap_or_else(|_| serde_json::value::to_raw_value(s).expect("string to JSON"))
    };
    serde_json::json!({
        "event_id": e.event_id,
        "name": e.name,
        "user_id": e.user_id,
        "timestamp": e.timestamp_ms,
        "properties": raw(&e.properties),
        "context": raw(&e.context),
    })
    .to_string()
}
