//! The pipeline: decode Kafka records, run each event through the plugin chain, and
//! sort the results into what the sinks write (kept events) and dead letters.

pub mod config;
pub mod dedup;
pub mod route;
pub mod schema;
pub mod worker;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::metrics::events::{InternalEvent, PluginQuarantined, PluginReleased};
use crate::model::{
    self, Batch, CountRow, DeadLetter, Event, FailureKind, IngestRecord, Kept, Origin,
    PluginFailure, RoutedRow, WireEvent,
};
use crate::runtime::{self, PluginInstance, Runtime, Verdict};
use config::{FailurePolicy, PipelineConfig, PluginConfig, ProcessorConfig};
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

/// One plugin of the chain: its live instance and its circuit breaker. Every lane of a
/// pipeline has its own instance of each plugin; the lanes' instances of one plugin
/// share its breaker (so a plugin failing in one lane is quarantined in all of them)
/// and its exported counters.
pub struct Stage {
    instance: PluginInstance,
    breaker: Arc<Mutex<Breaker>>,
}

/// The circuit breaker of one plugin (shared by its instances in every lane).
struct Breaker {
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

impl Breaker {
    fn is_quarantined(&self) -> bool {
        self.quarantined_until.is_some_and(|t| Instant::now() < t)
    }

    /// Counts one call: quarantines the plugin after `quarantine_after` consecutive
    /// calls that failed on at least half their events, releases it after a call
    /// that did not.
    fn record(&mut self, labels: &[&str; 2], verdicts: &[Verdict]) {
        let mut failed = verdicts.iter().filter_map(|v| match v {
            Verdict::Failed(f) => Some(f.message.as_str()),
            _ => None,
        });
        let first = failed.next();
        let failures = first.map_or(0, |_| 1 + failed.count());
        if let Some(first) = first
            && failures * 2 >= verdicts.len()
        {
            self.failing_calls += 1;
            first.clone_into(&mut self.last_failure);
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
    }
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
            breaker: Arc::new(Mutex::new(Breaker {
                policy,
                quarantine_after,
                quarantine_for,
                failing_calls: 0,
                quarantined_until: None,
                last_failure: String::new(),
                exported_counters: BTreeSet::new(),
            })),
        }
    }

    /// The same plugin in a new instance (for another lane), sharing this stage's
    /// breaker.
    fn sibling(&self) -> impl Future<Output = Result<Self, runtime::RuntimeError>> + Send + use<> {
        let (plugin, breaker) = (self.instance.plugin().clone(), self.breaker.clone());
        async move {
            Ok(Self {
                instance: plugin.instantiate().await?,
                breaker,
            })
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // The breaker holds counts only: one left by a panicking lane is still sound.
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while the plugin is quarantined.
    pub fn is_quarantined(&self) -> bool {
        self.breaker().is_quarantined()
    }

    /// Runs the plugin on `batch` (handed back as it was): one verdict per event.
    async fn run(&mut self, batch: &mut Vec<Event>) -> Vec<Verdict> {
        let plugin = self.instance.plugin().clone();
        let labels = [plugin.name(), plugin.version()];
        let quarantined = {
            let b = self.breaker();
            b.is_quarantined()
                .then(|| (b.policy, b.last_failure.clone()))
        };
        if let Some((policy, last_failure)) = quarantined {
            crate::metrics::PLUGIN_EVENTS
                .with_label_values(&[labels[0], labels[1], "quarantined"])
                .inc_by(batch.len() as u64);
            let failure = PluginFailure::new(
                FailureKind::Quarantined,
                format!("plugin quarantined after repeated failures; last: {last_failure}"),
            );
            if policy == FailurePolicy::Closed {
                crate::metrics::PLUGIN_FAILURES
                    .with_label_values(&[labels[0], labels[1], FailureKind::Quarantined.as_str()])
                    .inc_by(batch.len() as u64);
            }
            return batch
                .iter()
                .map(|_| match policy {
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
        self.breaker().record(&labels, &verdicts);
        verdicts
    }

    /// Adds what the plugin counted with `counter-add` to `weir_plugin_counter_total`
    /// (names past the first [`MAX_EXPORTED_COUNTERS`] are left out, with a warning).
    fn export_counters(&mut self, labels: &[&str; 2]) {
        let counters = self.instance.take_counters();
        if counters.is_empty() {
            return;
        }
        let mut breaker = self.breaker();
        let exported = &mut breaker.exported_counters;
        for (name, delta) in counters {
            if !exported.contains(&name) {
                if exported.len() >= MAX_EXPORTED_COUNTERS {
                    warn!(plugin = labels[0], counter = %name, "plugin counts more than {MAX_EXPORTED_COUNTERS} counters; not exported");
                    continue;
                }
                exported.insert(name.clone());
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

/// How a pipeline runs its events: how many go to a plugin in one call, and over how
/// many lanes a batch is spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Events per plugin call.
    pub batch_size: usize,
    /// Sets of plugin instances that process a batch's partitions in parallel.
    pub lanes: usize,
}

impl Shape {
    pub fn of(cfg: &ProcessorConfig) -> Self {
        Self {
            batch_size: cfg.plugin_batch_size,
            lanes: cfg.lanes(),
        }
    }
}

/// What every lane of a pipeline reads: which events run, the schemas, the routes.
struct Common {
    /// Events of other names skip the schemas and the chain (`None`: every event runs).
    events: Option<std::collections::HashSet<String>>,
    schemas: Schemas,
    routes: Arc<Routes>,
    batch_size: usize,
}

/// A pipeline ready to run: one live instance per plugin, in chain order, in each of
/// its lanes.
///
/// A batch is spread over the lanes by partition: all the events of one partition go
/// to one lane, in their order, and the lanes run at once, each on a task of its own
/// with its own plugin instances (so the plugin chain uses as many cores as there are
/// lanes). Partitions are assigned per batch, the largest first, each to the lane with
/// the fewest events so far. Plugins must not rely on seeing every event in one
/// instance: a partition's events may go to another lane in the next batch.
pub struct Pipeline {
    name: String,
    tag: Tag,
    /// Shared with the lanes' tasks while a batch runs; only built before the first.
    common: Arc<Common>,
    /// Never empty; the first lane is the one a batch of one partition runs in.
    lanes: Vec<Lane>,
    /// `name@version` of each plugin, joined by commas: recorded with each row.
    versions: String,
}

/// One set of plugin instances, in chain order.
struct Lane {
    chain: Vec<Stage>,
}

/// Most lanes a pipeline may have (`processor.plugin_lanes`).
pub const MAX_LANES: usize = 64;

impl Pipeline {
    /// Loads, compiles and instantiates every plugin of the configured chain, in
    /// `shape.lanes` lanes.
    pub async fn load(
        runtime: &Runtime,
        cfg: &PipelineConfig,
        shape: Shape,
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
        Self::new(cfg.name.clone(), chain, Arc::new(routes), shape.batch_size)
            .with_schemas(schemas)
            .with_events(&cfg.events)
            .with_lanes(shape.lanes)
            .await
    }

    /// A pipeline of one lane.
    pub fn new(name: String, chain: Vec<Stage>, routes: Arc<Routes>, batch_size: usize) -> Self {
        let mut pipeline = Self {
            name,
            tag: Tag::default(),
            common: Arc::new(Common {
                events: None,
                schemas: Schemas::default(),
                routes,
                batch_size: batch_size.max(1),
            }),
            lanes: vec![Lane { chain }],
            versions: String::new(),
        };
        pipeline.versions = pipeline.plugin_versions().join(",");
        pipeline
    }

    /// The parts every lane reads, while the pipeline is being built.
    fn common_mut(&mut self) -> &mut Common {
        Arc::get_mut(&mut self.common).expect("a pipeline is built before it runs")
    }

    /// Validates events against these schemas before the chain.
    pub fn with_schemas(mut self, schemas: Schemas) -> Self {
        self.common_mut().schemas = schemas;
        self
    }

    /// Runs only events of these names through the schemas and the chain (all when
    /// empty).
    pub fn with_events(mut self, names: &[String]) -> Self {
        self.common_mut().events = (!names.is_empty()).then(|| names.iter().cloned().collect());
        self
    }

    /// Spreads batches over `lanes` lanes (at least 1, at most [`MAX_LANES`]): the
    /// lanes after the first get new instances of every plugin of the chain.
    pub async fn with_lanes(mut self, lanes: usize) -> Result<Self, PipelineError> {
        while self.lanes.len() < lanes.clamp(1, MAX_LANES) {
            let mut chain = Vec::with_capacity(self.lanes[0].chain.len());
            for i in 0..self.lanes[0].chain.len() {
                let sibling = self.lanes[0].chain[i].sibling();
                chain.push(sibling.await?);
            }
            self.lanes.push(Lane { chain });
        }
        Ok(self)
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
        self.common.schemas.versions()
    }

    /// `name@version,...` of the chain.
    pub fn versions(&self) -> &str {
        &self.versions
    }

    /// `name@version` of each plugin, in chain order.
    pub fn plugin_versions(&self) -> Vec<String> {
        self.stages()
            .iter()
            .map(|s| {
                let p = s.instance.plugin();
                format!("{}@{}", p.name(), p.version())
            })
            .collect()
    }

    /// The tables and counters plugins may route to.
    pub fn routes(&self) -> &Arc<Routes> {
        &self.common.routes
    }

    /// The stages of the first lane, in chain order (every lane has the same plugins,
    /// and their breakers are shared).
    pub fn stages(&self) -> &[Stage] {
        &self.lanes[0].chain
    }

    /// How many lanes a batch is spread over.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Runs decoded events through the chain, in plugin batches, the partitions spread
    /// over the lanes (see [`Pipeline`]).
    pub async fn run(&mut self, events: Vec<(Origin, String, WireEvent)>) -> Batch {
        let mut parts = spread(events, self.lanes.len(), self.common.batch_size);
        if parts.len() <= 1 {
            let events = parts.pop().unwrap_or_default();
            return self.lanes[0].run(&self.common, events).await;
        }
        // Every lane but the first runs on a task of its own; the first runs here.
        let first = parts.remove(0);
        let others: Vec<Lane> = self.lanes.drain(1..=parts.len()).collect();
        let tasks = others
            .into_iter()
            .zip(parts)
            .map(|(mut lane, events)| {
                let common = self.common.clone();
                tokio::spawn(async move {
                    let out = lane.run(&common, events).await;
                    (lane, out)
                })
            })
            .collect::<Vec<_>>();
        let mut out = self.lanes[0].run(&self.common, first).await;
        for task in tasks {
            match task.await {
                Ok((lane, part)) => {
                    self.lanes.push(lane);
                    out.append(part);
                }
                // A panic in a plugin lane is a bug: it stops the processor as it
                // would have had the lane run on this task.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        out
    }
}

/// Splits a batch's events into at most `lanes` parts, each partition's events whole
/// and in order in one part: partitions by descending event count, each to the part
/// with the fewest events so far. One part when there is one lane, one partition, or
/// too few events to be worth a task (less than one plugin call per lane).
fn spread(
    events: Vec<(Origin, String, WireEvent)>,
    lanes: usize,
    batch_size: usize,
) -> Vec<Vec<(Origin, String, WireEvent)>> {
    if lanes <= 1 || events.len() < 2 * batch_size {
        return vec![events];
    }
    let mut counts: Vec<(i32, usize)> = Vec::new();
    for (o, _, _) in &events {
        match counts.iter_mut().find(|(p, _)| *p == o.partition) {
            Some((_, n)) => *n += 1,
            None => counts.push((o.partition, 1)),
        }
    }
    if counts.len() == 1 {
        return vec![events];
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let parts = lanes.min(counts.len());
    let mut load = vec![0usize; parts];
    // (partition, part) for every partition of the batch.
    let mut part_of: Vec<(i32, usize)> = Vec::with_capacity(counts.len());
    for (partition, n) in counts {
        let (least, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| **l)
            .expect("at least two parts");
        load[least] += n;
        part_of.push((partition, least));
    }
    let mut out: Vec<Vec<_>> = load.iter().map(|n| Vec::with_capacity(*n)).collect();
    for e in events {
        let part = part_of
            .iter()
            .find(|(p, _)| *p == e.0.partition)
            .map_or(0, |(_, part)| *part);
        out[part].push(e);
    }
    out
}

impl Lane {
    /// Runs decoded events through this lane's chain, in plugin batches.
    async fn run(&mut self, common: &Common, events: Vec<(Origin, String, WireEvent)>) -> Batch {
        let mut out = Batch::default();
        let mut pending: Vec<(Origin, Event, Fanout)> = Vec::with_capacity(events.len());
        for (origin, app, e) in events {
            let event = Event::from_wire(app, e);
            if common
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
            match common.schemas.check(&event) {
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
        let batch_size = common.batch_size;
        for stage in &mut self.chain {
            let mut next = Vec::with_capacity(pending.len());
            let mut iter = pending.into_iter().peekable();
            while iter.peek().is_some() {
                let mut origins = Vec::with_capacity(batch_size);
                let mut batch = Vec::with_capacity(batch_size);
                let mut fanouts = Vec::with_capacity(batch_size);
                for (o, e, f) in iter.by_ref().take(batch_size) {
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
                            match common.routes.resolve(outputs, &mut fanout) {
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
                    counter: common.routes.counters[inc.counter].clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `counts[p]` events of partition `p`, interleaved as a consumer reads them.
    fn events(counts: &[usize]) -> Vec<(Origin, String, WireEvent)> {
        let raw = || serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let most = counts.iter().copied().max().unwrap_or(0);
        let mut out = Vec::new();
        for offset in 0..most {
            for (p, n) in counts.iter().enumerate() {
                if offset < *n {
                    let origin = Origin {
                        partition: p as i32,
                        offset: offset as i64,
                        index: 0,
                        received_ms: 0,
                    };
                    let e = WireEvent {
                        event_id: format!("{p}-{offset}"),
                        name: "e".into(),
                        user_id: None,
                        timestamp_ms: 0,
                        properties: raw(),
                        context: raw(),
                        id_assigned: false,
                    };
                    out.push((origin, "app".into(), e));
                }
            }
        }
        out
    }

    /// The partitions of each part, and checks each partition is whole, in order, in one.
    fn partitions(parts: &[Vec<(Origin, String, WireEvent)>], counts: &[usize]) -> Vec<Vec<i32>> {
        let mut seen = std::collections::HashMap::new();
        let listed = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let mut ps: Vec<i32> = Vec::new();
                for (o, _, _) in part {
                    let (at, next) = seen.entry(o.partition).or_insert((i, 0i64));
                    assert_eq!(*at, i, "partition {} in two parts", o.partition);
                    assert_eq!(o.offset, *next, "partition {} out of order", o.partition);
                    *next += 1;
                    if !ps.contains(&o.partition) {
                        ps.push(o.partition);
                    }
                }
                ps.sort_unstable();
                ps
            })
            .collect();
        for (p, n) in counts.iter().enumerate() {
            assert_eq!(seen.get(&(p as i32)).map_or(0, |s| s.1), *n as i64);
        }
        listed
    }

    #[test]
    fn a_batch_is_spread_by_whole_partitions_over_the_lanes() {
        let counts = [100, 100, 100, 100];
        let parts = spread(events(&counts), 2, 16);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [200, 200]);
        assert_eq!(partitions(&parts, &counts), [vec![0, 2], vec![1, 3]]);
        // The largest partition first, each to the lightest part.
        let counts = [50, 500, 100, 100, 100];
        let parts = spread(events(&counts), 2, 16);
        assert_eq!(partitions(&parts, &counts), [vec![1], vec![0, 2, 3, 4]]);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [500, 350]);
        // More lanes than partitions: one part per partition.
        let counts = [40, 40];
        let parts = spread(events(&counts), 8, 16);
        assert_eq!(partitions(&parts, &counts), [vec![0], vec![1]]);
    }

    #[test]
    fn one_lane_one_partition_or_a_small_batch_stay_whole() {
        for (counts, lanes) in [(&[100, 100][..], 1), (&[0, 300][..], 4), (&[10, 10][..], 2)] {
            let parts = spread(events(counts), lanes, 16);
            assert_eq!(parts.len(), 1, "{counts:?} over {lanes}");
            assert_eq!(parts[0].len(), counts.iter().sum::<usize>());
        }
    }
}
