//! The pipeline: decode Kafka records, run each event through the plugin chain, and
//! sort the results into what the sinks write (kept events) and dead letters.

pub mod config;
pub mod dedup;
pub mod route;
pub mod schema;
pub mod worker;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::metrics::events::{InternalEvent, PluginQuarantined, PluginReleased};
use crate::model::{
    self, Batch, CountRow, DeadLetter, Event, FailureKind, IngestRecord, Kept, Origin,
    PluginFailure, RoutedRow, WireEvent,
};
use crate::runtime::{self, PluginInstance, Runtime, Verdict};
use config::{FailurePolicy, PipelineConfig, PluginConfig};
use route::{Fanout, Routes};
use schema::Schemas;

/// Most distinct `counter-add` names exported as metrics per plugin version.
const MAX_EXPORTED_COUNTERS: usize = 256;

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
    #[error(transparent)]
    Routes(#[from] route::RouteError),
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
}

/// One plugin of the chain: its live instance and its circuit breaker.
pub struct Stage {
    instance: PluginInstance,
    policy: FailurePolicy,
    quarantine_after: u32,
    quarantine_for: Duration,
    /// Consecutive batch calls in which the plugin failed on at least half the events.
    failing_calls: u32,
    /// While set and in the future, the plugin is not called.
    quarantined_until: Option<Instant>,
    last_failure: String,
    /// The `counter-add` names exported as metrics so far.
    exported_counters: BTreeSet<String>,
}

impl Stage {
    pub fn new(instance: PluginInstance, cfg: &PluginConfig) -> Self {
        Self::with_policy(
            instance,
            cfg.failure_policy,
            cfg.quarantine_after,
            Duration::from_secs(cfg.quarantine_secs),
        )
    }

    /// A stage quarantined after `quarantine_after` failing calls for `quarantine_for`.
    pub fn with_policy(
        instance: PluginInstance,
        policy: FailurePolicy,
        quarantine_after: u32,
        quarantine_for: Duration,
    ) -> Self {
        Self {
            instance,
            policy,
            quarantine_after,
            quarantine_for,
            failing_calls: 0,
            quarantined_until: None,
            last_failure: String::new(),
            exported_counters: BTreeSet::new(),
        }
    }

    /// True while the plugin is quarantined.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined_until.is_some_and(|t| Instant::now() < t)
    }

    /// Runs the plugin on `batch` (handed back as it was): one verdict per event.
    async fn run(&mut self, batch: &mut Vec<Event>) -> Vec<Verdict> {
        let plugin = self.instance.plugin().clone();
        let labels = [plugin.name(), plugin.version()];
        if self.is_quarantined() {
            crate::metrics::PLUGIN_EVENTS
                .with_label_values(&[labels[0], labels[1], "quarantined"])
                .inc_by(batch.len() as u64);
            let failure = PluginFailure::new(
                FailureKind::Quarantined,
                format!(
                    "plugin quarantined after repeated failures; last: {}",
                    self.last_failure
                ),
            );
            if self.policy == FailurePolicy::Closed {
                crate::metrics::PLUGIN_FAILURES
                    .with_label_values(&[labels[0], labels[1], FailureKind::Quarantined.as_str()])
                    .inc_by(batch.len() as u64);
            }
            return batch
                .iter()
                .map(|_| match self.policy {
                    FailurePolicy::Open => Verdict::Pass,
                    FailurePolicy::Closed => Verdict::Failed(failure.clone()),
                })
                .collect();
        }
        let started = Instant::now();
        let verdicts = self.instance.process(batch).await;
        crate::metrics::PLUGIN_CALL_DURATION
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.export_counters(&labels);
        let mut counts = [0u64; 5];
        let mut failures = [0u64; FailureKind::ALL.len()];
        for v in &verdicts {
            counts[match v {
                Verdict::Pass => 0,
                Verdict::Keep | Verdict::Route { .. } => 1,
                Verdict::Drop(_) => 2,
                Verdict::Reject(_) => 3,
                Verdict::Failed(f) => {
                    failures[f.kind as usize] += 1;
                    4
                }
            }] += 1;
        }
        for (kind, n) in FailureKind::ALL.iter().zip(failures) {
            if n > 0 {
                crate::metrics::PLUGIN_FAILURES
                    .with_label_values(&[labels[0], labels[1], kind.as_str()])
                    .inc_by(n);
            }
        }
        for (outcome, n) in ["pass", "keep", "drop", "reject", "failed"]
            .iter()
            .zip(counts)
        {
            if n > 0 {
                crate::metrics::PLUGIN_EVENTS
                    .with_label_values(&[labels[0], labels[1], outcome])
                    .inc_by(n);
            }
        }
        let failed: Vec<&str> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Failed(f) => Some(f.message.as_str()),
                _ => None,
            })
            .collect();
        if !failed.is_empty() && failed.len() * 2 >= verdicts.len() {
            self.failing_calls += 1;
            self.last_failure = failed[0].to_owned();
            if self.failing_calls >= self.quarantine_after {
                PluginQuarantined {
                    plugin: labels[0],
                    version: labels[1],
                    failing_calls: self.failing_calls,
                    policy: &self.policy,
                    duration: self.quarantine_for,
                    last_failure: &self.last_failure,
                }
                .emit();
                self.quarantined_until = Some(Instant::now() + self.quarantine_for);
                self.failing_calls = 0;
            }
        } else {
            if self.quarantined_until.take().is_some() {
                PluginReleased {
                    plugin: labels[0],
                    version: labels[1],
                }
                .emit();
            }
            self.failing_calls = 0;
        }
        verdicts
    }

    /// Adds what the plugin counted with `counter-add` to `weir_plugin_counter_total`
    /// (names past the first [`MAX_EXPORTED_COUNTERS`] are left out, with a warning).
    fn export_counters(&mut self, labels: &[&str; 2]) {
        for (name, delta) in self.instance.take_counters() {
            if !self.exported_counters.contains(&name) {
                if self.exported_counters.len() >= MAX_EXPORTED_COUNTERS {
                    warn!(plugin = labels[0], counter = %name, "plugin counts more than {MAX_EXPORTED_COUNTERS} counters; not exported");
                    continue;
                }
                self.exported_counters.insert(name.clone());
            }
            crate::metrics::PLUGIN_COUNTERS
                .with_label_values(&[labels[0], labels[1], &name])
                .inc_by(delta);
        }
    }
}

/// Which control-plane version a pipeline comes from; recorded with every row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tag {
    /// The control-plane version the instance had applied.
    pub control_version: u64,
    /// The pipeline's version (0: the configuration file's pipeline).
    pub pipeline_version: u32,
}

/// A pipeline ready to run: one live instance per plugin, in chain order.
pub struct Pipeline {
    name: String,
    tag: Tag,
    /// Events of other names skip the schemas and the chain (`None`: every event runs).
    events: Option<std::collections::HashSet<String>>,
    schemas: Schemas,
    chain: Vec<Stage>,
    routes: Arc<Routes>,
    batch_size: usize,
    /// `name@version` of each plugin, joined by commas: recorded with each row.
    versions: String,
}

impl Pipeline {
    /// Loads, compiles and instantiates every plugin of the configured chain.
    pub async fn load(
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
            let plugin = runtime
                .load(&p.name, &bytes, p.config_json(), p.limits())
                .await?;
            chain.push(Stage::new(plugin.instantiate().await?, p));
        }
        let routes = Routes::new(cfg)?;
        let schemas = Schemas::load(&cfg.schemas)?;
        Ok(
            Self::new(cfg.name.clone(), chain, Arc::new(routes), batch_size)
                .with_schemas(schemas)
                .with_events(&cfg.events),
        )
    }

    pub fn new(name: String, chain: Vec<Stage>, routes: Arc<Routes>, batch_size: usize) -> Self {
        let mut pipeline = Self {
            name,
            tag: Tag::default(),
            events: None,
            schemas: Schemas::default(),
            chain,
            routes,
            batch_size: batch_size.max(1),
            versions: String::new(),
        };
        pipeline.versions = pipeline.plugin_versions().join(",");
        pipeline
    }

    /// Validates events against these schemas before the chain.
    pub fn with_schemas(mut self, schemas: Schemas) -> Self {
        self.schemas = schemas;
        self
    }

    /// Runs only events of these names through the schemas and the chain (all when
    /// empty).
    pub fn with_events(mut self, names: &[String]) -> Self {
        self.events = (!names.is_empty()).then(|| names.iter().cloned().collect());
        self
    }

    pub fn with_tag(mut self, tag: Tag) -> Self {
        self.tag = tag;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tag(&self) -> Tag {
        self.tag
    }

    /// A control-plane change that does not concern this pipeline: only the version
    /// recorded with rows moves.
    pub fn set_control_version(&mut self, version: u64) {
        self.tag.control_version = version;
    }

    /// `event@version` of the schemas in force.
    pub fn schema_versions(&self) -> Vec<String> {
        self.schemas.versions()
    }

    /// `name@version,...` of the chain.
    pub fn versions(&self) -> &str {
        &self.versions
    }

    /// `name@version` of each plugin, in chain order.
    pub fn plugin_versions(&self) -> Vec<String> {
        self.chain
            .iter()
            .map(|s| {
                let p = s.instance.plugin();
                format!("{}@{}", p.name(), p.version())
            })
            .collect()
    }

    /// The tables and counters plugins may route to.
    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// The stages, in chain order.
    pub fn stages(&self) -> &[Stage] {
        &self.chain
    }

    /// Runs decoded events through the chain, in plugin batches.
    pub async fn run(&mut self, events: Vec<(Origin, String, WireEvent)>) -> Batch {
        let mut out = Batch::default();
        let mut pending: Vec<(Origin, Event, Fanout)> = Vec::with_capacity(events.len());
        for (origin, app, e) in events {
            let event = Event::from_wire(app, e);
            if self
                .events
                .as_ref()
                .is_some_and(|n| !n.contains(&event.name))
            {
                out.kept.push(Kept {
                    origin,
                    event,
                    forwards: Vec::new(),
                });
                continue;
            }
            match self.schemas.check(&event) {
                Ok(()) => pending.push((origin, event, Fanout::default())),
                Err(reason) => {
                    crate::metrics::SCHEMA_FAILURES
                        .with_label_values(&[&event.name])
                        .inc();
                    out.dead.push(DeadLetter::of(
                        origin,
                        event,
                        model::Stage::Schema,
                        reason.to_string(),
                    ));
                }
            }
        }
        for stage in &mut self.chain {
            let mut next = Vec::with_capacity(pending.len());
            let mut iter = pending.into_iter().peekable();
            while iter.peek().is_some() {
                let mut origins = Vec::with_capacity(self.batch_size);
                let mut batch = Vec::with_capacity(self.batch_size);
                let mut fanouts = Vec::with_capacity(self.batch_size);
                for (o, e, f) in iter.by_ref().take(self.batch_size) {
                    origins.push(o);
                    batch.push(e);
                    fanouts.push(f);
                }
                let verdicts = stage.run(&mut batch).await;
                let plugin = stage.instance.plugin();
                let items = origins.into_iter().zip(batch).zip(fanouts).zip(verdicts);
                for (((origin, mut event), mut fanout), verdict) in items {
                    let reason = match verdict {
                        // A kept event's changes are in it already.
                        Verdict::Pass | Verdict::Keep => {
                            next.push((origin, event, fanout));
                            continue;
                        }
                        Verdict::Route { changes, outputs } => {
                            match self.routes.resolve(outputs, &mut fanout) {
                                Ok(()) => {
                                    if let Some(changes) = changes {
                                        changes.apply(&mut event);
                                    }
                                    next.push((origin, event, fanout));
                                    continue;
                                }
                                Err(why) => {
                                    let failure = PluginFailure::new(
                                        FailureKind::BadOutcome,
                                        format!("bad output: {why}"),
                                    );
                                    crate::metrics::PLUGIN_FAILURES
                                        .with_label_values(&[
                                            plugin.name(),
                                            plugin.version(),
                                            failure.kind.as_str(),
                                        ])
                                        .inc();
                                    failure.message
                                }
                            }
                        }
                        Verdict::Drop(reason) => {
                            debug!(plugin = %plugin.name(), event_id = %event.event_id, %reason, "event dropped");
                            out.dropped += 1;
                            continue;
                        }
                        Verdict::Reject(reason) => reason,
                        Verdict::Failed(failure) => failure.message,
                    };
                    out.dead.push(
                        DeadLetter::of(origin, event, model::Stage::Plugin, reason)
                            .by(plugin.name(), plugin.version()),
                    );
                }
            }
            pending = next;
        }
        out.kept.reserve(pending.len());
        for (origin, event, fanout) in pending {
            for row in fanout.rows {
                out.rows.entry(row.table).or_default().push(RoutedRow {
                    origin,
                    event_id: event.event_id.clone(),
                    app: event.app.clone(),
                    timestamp_ms: event.timestamp_ms,
                    data: row.data,
                });
            }
            for inc in fanout.increments {
                out.counts.push(CountRow {
                    origin,
                    app: event.app.clone(),
                    counter: self.routes.counters[inc.counter].clone(),
                    key: inc.key,
                    delta: inc.delta,
                    timestamp_ms: event.timestamp_ms,
                });
            }
            out.kept.push(Kept {
                origin,
                event,
                forwards: fanout.forwards,
            });
        }
        out
    }
}

/// The events of one Kafka record, each with its coordinates and app.
pub struct Decoded {
    /// The record replays dead letters (see [`IngestRecord::replay`]).
    pub replay: bool,
    pub events: Vec<(Origin, String, WireEvent)>,
}

/// Decodes one Kafka record into events, or a dead letter naming why it cannot be.
pub fn decode(
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
) -> Result<Decoded, Box<DeadLetter>> {
    match IngestRecord::decode(payload) {
        Ok(record) => {
            let n = record.events.len();
            let mut app = Some(record.app);
            let events = record
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
                    // The last event takes the record's app, the others a copy.
                    let app = if i + 1 == n {
                        app.take().unwrap_or_default()
                    } else {
                        app.clone().unwrap_or_default()
                    };
                    (origin, app, e)
                })
                .collect();
            Ok(Decoded {
                replay: record.replay,
                events,
            })
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
            stage: model::Stage::Decode,
            plugin: String::new(),
            plugin_version: String::new(),
            reason: e.to_string(),
            raw: String::from_utf8_lossy(payload.unwrap_or_default()).into_owned(),
        })),
    }
}
