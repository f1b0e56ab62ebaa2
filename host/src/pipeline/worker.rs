//! The processor loop: consume, buffer, run the pipeline, write the sinks, commit.
//!
//! At-least-once, done so that nothing is lost and, with one consumer per partition,
//! nothing is written twice:
//! - offsets are committed (synchronously) only after ClickHouse acknowledged every
//!   row the batch produced;
//! - a failed insert is retried with backoff, and the offsets do not move meanwhile;
//! - when a rebalance revokes partitions, whatever was buffered from them and not yet
//!   written is dropped: the new owner re-reads it from the committed offset;
//! - on shutdown the buffer is flushed and committed before the consumer leaves;
//! - after a crash, the batch that was written but not committed is read again: before
//!   writing, rows whose Kafka coordinates and event id are already in ClickHouse are
//!   skipped, table by table (checked only for offsets up to what ClickHouse held when
//!   this instance took the partition), so a replay does not write an event twice;
//! - counter increments go to Redis while ClickHouse writes, with the partition's
//!   offset in the same atomic step (see [`crate::sinks::counters`]), so a replay
//!   counts nothing twice whichever sink got further; while Redis is unreachable,
//!   ClickHouse writes go on and the offsets of the partitions whose increments wait
//!   are held back, so Kafka re-delivers them after a crash.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::Consumer as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::config::ProcessorConfig;
use super::route::Routes;
use super::{Pipeline, Tag};
use crate::bus::{self, Consumer};
use crate::model::{Batch, DeadLetter, Origin, WireEvent};
use crate::sinks::clickhouse::{ClickHouseError, ClickHouseSink, Written};
use crate::sinks::counters::{CounterError, CounterSink};
use crate::sinks::topic::{TopicError, TopicSink};
use crate::sinks::webhook::WebhookSink;

/// A new pipeline for the processor, or only a newer control-plane version (a change
/// that does not concern this instance's pipeline).
pub struct Swap {
    pub pipeline: Option<Pipeline>,
    pub control_version: u64,
}

/// What the processor runs now (it publishes this after each swap).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Running {
    pub tag: Tag,
    /// `name@version` of each plugin.
    pub plugins: Vec<String>,
    pub schemas: Vec<String>,
}

impl Running {
    pub fn of(p: &Pipeline) -> Self {
        Self {
            tag: p.tag(),
            plugins: p.plugin_versions(),
            schemas: p.schema_versions(),
        }
    }
}

/// The tables and counters of the pipeline in force, shared by the processor (which
/// replaces them on a hot swap) and the counters API.
pub type SharedRoutes = Arc<std::sync::RwLock<Arc<Routes>>>;

/// Longest pause between retries of a failed flush.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How often held-back offsets are tried again while no batch commits them.
const HELD_RETRY: Duration = Duration::from_millis(500);

/// Events read from Kafka and not yet written.
#[derive(Default)]
struct Buffer {
    events: Vec<(Origin, String, WireEvent)>,
    undecodable: Vec<DeadLetter>,
    /// Next offset to commit, per partition.
    next_offsets: BTreeMap<i32, i64>,
    /// When the oldest buffered record arrived.
    since: Option<Instant>,
}

impl Buffer {
    /// Decodes a record into the buffer (or its dead letter, if it is not weir's).
    fn add(&mut self, partition: i32, offset: i64, payload: Option<&[u8]>) {
        match super::decode(partition, offset, payload) {
            Ok(events) => self.events.extend(events),
            Err(dead) => {
                warn!(partition, offset, reason = %dead.reason, "undecodable Kafka record sent to dead letters");
                self.undecodable.push(*dead);
            }
        }
        self.next_offsets.insert(partition, offset + 1);
        self.since.get_or_insert_with(Instant::now);
    }

    fn len(&self) -> usize {
        self.events.len() + self.undecodable.len()
    }

    fn is_empty(&self) -> bool {
        self.next_offsets.is_empty()
    }

    fn forget(&mut self, partitions: &HashSet<i32>) {
        if partitions.is_empty() {
            return;
        }
        let before = self.len();
        self.events
            .retain(|(o, _, _)| !partitions.contains(&o.partition));
        self.undecodable
            .retain(|d| !partitions.contains(&d.origin.partition));
        self.next_offsets.retain(|p, _| !partitions.contains(p));
        if self.next_offsets.is_empty() {
            self.since = None;
        }
        let dropped = before - self.len();
        if dropped > 0 {
            info!(
                dropped,
                "dropped buffered events of revoked partitions; their new owner re-reads them"
            );
        }
    }
}

/// What part of a batch's write succeeded (see `Worker::write`).
#[derive(Default)]
struct Done {
    checked: bool,
    events: bool,
    dead_letters: bool,
    routed: HashSet<usize>,
    /// Per topic sink, the kept events already acknowledged.
    forwarded: HashMap<usize, HashSet<usize>>,
}

/// Why a flush attempt failed.
#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error(transparent)]
    ClickHouse(#[from] ClickHouseError),
    #[error(transparent)]
    Topic(#[from] TopicError),
}

/// The processor of one instance.
pub struct Worker {
    consumer: Consumer,
    topic: String,
    pipeline: Pipeline,
    sink: ClickHouseSink,
    cfg: ProcessorConfig,
    /// Per partition, the highest offset already in ClickHouse when this instance took
    /// the partition (`None`: nothing there). Loaded lazily; forgotten on revoke.
    watermarks: HashMap<i32, Option<i64>>,
    /// The Redis counters, when the pipeline declares counters.
    counters: Option<CounterSink>,
    /// Next offsets written to ClickHouse but not committed, because counter
    /// increments of the partition still wait for Redis.
    held: BTreeMap<i32, i64>,
    /// When to try Redis again, after a failure.
    counters_retry: Option<(Instant, Duration)>,
    /// The webhooks, each delivering from its own queue.
    webhooks: Vec<WebhookSink>,
    /// The Kafka topic sinks, written as part of each flush.
    topics: Vec<TopicSink>,
    /// Records received while a failing flush polled with its partitions paused; they
    /// are buffered once the flush is done.
    early: Vec<rdkafka::message::OwnedMessage>,
    /// New pipelines from the control agent, swapped in between batches.
    swaps: Option<mpsc::Receiver<Swap>>,
    /// What runs now, for the agent's status reports.
    running: Option<watch::Sender<Running>>,
    /// The counters API's view of the declared counters.
    shared_routes: Option<SharedRoutes>,
}

impl Worker {
    pub fn new(
        consumer: Consumer,
        topic: String,
        pipeline: Pipeline,
        sink: ClickHouseSink,
        counters: Option<CounterSink>,
        cfg: ProcessorConfig,
    ) -> Self {
        Self {
            consumer,
            topic,
            pipeline,
            sink,
            cfg,
            watermarks: HashMap::new(),
            counters,
            held: BTreeMap::new(),
            counters_retry: None,
            webhooks: Vec::new(),
            topics: Vec::new(),
            early: Vec::new(),
            swaps: None,
            running: None,
            shared_routes: None,
        }
    }

    /// Takes new pipelines from the control agent and reports what runs.
    pub fn with_control(
        mut self,
        swaps: mpsc::Receiver<Swap>,
        running: watch::Sender<Running>,
        shared_routes: SharedRoutes,
    ) -> Self {
        self.swaps = Some(swaps);
        self.running = Some(running);
        self.shared_routes = Some(shared_routes);
        self
    }

    /// Swaps in a new pipeline. Called between batches only: every event of a batch
    /// is processed by one version, and a partition's events after the swap by the new
    /// one.
    fn swap(&mut self, swap: Swap) {
        match swap.pipeline {
            Some(pipeline) => {
                let old = self.pipeline.tag();
                self.pipeline = pipeline;
                let routes = self.pipeline.routes().clone();
                if !Arc::ptr_eq(self.sink.tables(), &routes.tables) {
                    // Other tables or counters: rows of later batches go to the new
                    // tables (the agent created them); increments already waiting for
                    // Redis keep the counters they were made for.
                    self.sink = self.sink.with_tables(routes.tables.clone());
                }
                if let Some(shared) = &self.shared_routes {
                    let mut current = shared.write().expect("routes lock");
                    if !Arc::ptr_eq(&current, &routes) {
                        *current = routes;
                    }
                }
                let new = self.pipeline.tag();
                info!(
                    pipeline = %self.pipeline.name(),
                    from_version = old.pipeline_version,
                    to_version = new.pipeline_version,
                    control_version = new.control_version,
                    plugins = %self.pipeline.versions(),
                    "pipeline swapped"
                );
            }
            None => self.pipeline.set_control_version(swap.control_version),
        }
        crate::metrics::CONTROL_VERSION.set(swap.control_version as i64);
        if let Some(running) = &self.running {
            running.send_replace(Running::of(&self.pipeline));
        }
    }

    /// Also forwards to these topics.
    pub fn with_topics(mut self, topics: Vec<TopicSink>) -> Self {
        self.topics = topics;
        self
    }

    /// Also delivers to these webhooks.
    pub fn with_webhooks(mut self, webhooks: Vec<WebhookSink>) -> Self {
        self.webhooks = webhooks;
        self
    }

    /// Runs until `shutdown` turns true, then flushes, commits and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut buf = Buffer::default();
        let interval = Duration::from_millis(self.cfg.flush_interval_ms);
        info!(pipeline = %self.pipeline.name(), plugins = %self.pipeline.versions(), "processor started");
        loop {
            for m in std::mem::take(&mut self.early) {
                buf.add(m.partition(), m.offset(), m.payload());
            }
            if buf.len() >= self.cfg.flush_max_events {
                self.flush(&mut buf, &mut shutdown).await;
            }
            let deadline = buf.since.map(|t| t + interval);
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(swap) = recv_swap(&mut self.swaps) => self.swap(swap),
                _ = sleep_until(deadline) => {
                    self.flush(&mut buf, &mut shutdown).await;
                }
                _ = sleep_until(self.counters_retry.map(|(t, _)| t)) => {
                    self.forget_revoked(&mut buf);
                    self.apply_counters().await;
                    self.commit(BTreeMap::new());
                }
                // Offsets held back for sinks still delivering: commit what they finished.
                _ = sleep_until((!self.held.is_empty()).then(|| Instant::now() + HELD_RETRY)) => {
                    self.forget_revoked(&mut buf);
                    self.commit(BTreeMap::new());
                }
                msg = self.consumer.recv() => {
                    let revoked = self.consumer.context().take_revoked();
                    forget(&revoked, &mut self.watermarks, &mut self.held, &mut self.counters, &self.webhooks, &mut buf);
                    match msg {
                        Ok(m) => {
                            if let Some(ms) = m.timestamp().to_millis() {
                                let delay_ms = crate::model::now_ms().saturating_sub(ms).max(0);
                                crate::metrics::CONSUME_DELAY.observe(delay_ms as f64 / 1000.0);
                            }
                            buf.add(m.partition(), m.offset(), m.payload());
                            if buf.len() >= self.cfg.flush_max_events {
                                self.flush(&mut buf, &mut shutdown).await;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "Kafka consume error");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
        if !buf.is_empty() {
            info!(events = buf.len(), "flushing before shutdown");
            // The shutdown signal has fired already; a fresh receiver lets the final
            // flush retry a little before giving up (the events are not committed, so
            // the next owner re-reads them).
            let (_tx, mut rx) = watch::channel(false);
            let _ =
                tokio::time::timeout(Duration::from_secs(10), self.flush(&mut buf, &mut rx)).await;
        }
        info!("processor stopped");
    }

    /// Processes and writes the buffer, retrying until ClickHouse acknowledged, then
    /// commits its offsets. Gives up (without committing) only on shutdown.
    async fn flush(&mut self, buf: &mut Buffer, shutdown: &mut watch::Receiver<bool>) {
        self.forget_revoked(buf);
        if buf.is_empty() {
            return;
        }
        // Bounded memory: with too many increments waiting for Redis, take nothing
        // new until Redis answers.
        while self.counters.as_ref().is_some_and(CounterSink::is_full) {
            warn!(
                "counter increments waiting for Redis reached redis.max_pending: pausing the pipeline until Redis answers"
            );
            let wait = self
                .counters_retry
                .map_or(Duration::from_millis(self.cfg.retry_backoff_ms), |(_, b)| b);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            self.forget_revoked(buf);
            self.apply_counters().await;
            self.commit(BTreeMap::new());
        }
        let events = std::mem::take(&mut buf.events);
        let count = events.len();
        crate::metrics::BATCH_EVENTS.observe(count as f64);
        let started = std::time::Instant::now();
        let mut output = self.pipeline.run(events).await;
        output.dead.append(&mut buf.undecodable);
        let plugin_time = started.elapsed();

        // Counters go to Redis while ClickHouse writes: both are safe under replay (the
        // replay guard; the offsets stored with the counters), so neither waits for the
        // other. Offsets are committed once ClickHouse acknowledged; partitions whose
        // increments still wait for Redis are held back.
        let increments = output.counts.len();
        let mut counters = self.counters.take();
        if let Some(c) = &mut counters {
            c.add(std::mem::take(&mut output.counts));
        }
        let ((written, revoked), applied) = tokio::join!(
            self.write_until_acked(&mut output, shutdown),
            apply_pending(&mut counters)
        );
        self.counters = counters;
        self.after_counters(applied);
        // Partitions revoked while the flush polled: their rows were taken out of the
        // batch before the next attempt; drop what else this instance knew of them.
        self.forget_partitions(&revoked, buf);
        if !written {
            warn!(
                events = count,
                "shutdown during a failing flush: offsets not committed, the events will be re-read"
            );
            buf.next_offsets.clear();
            buf.since = None;
            return;
        }
        crate::failpoint::after_write();
        for webhook in &self.webhooks {
            webhook
                .offer(&output.kept, self.pipeline.tag().control_version)
                .await;
        }
        let offsets = std::mem::take(&mut buf.next_offsets);
        buf.since = None;
        self.commit(offsets);
        info!(
            events = count,
            kept = output.kept.len(),
            routed_rows = output.rows.values().map(Vec::len).sum::<usize>(),
            increments,
            dead_letters = output.dead.len(),
            dropped = output.dropped,
            plugin_ms = plugin_time.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "batch flushed"
        );
    }
}

impl Worker {
    /// Writes the batch to ClickHouse (and the topic sinks), retrying with backoff
    /// until it is acknowledged. Between attempts the consumer keeps polling with its
    /// partitions paused, so the instance stays in its group however long the outage
    /// lasts; a partition revoked meanwhile is taken out of the batch (its new owner
    /// re-reads it) and returned. False if shutdown came first.
    async fn write_until_acked(
        &mut self,
        output: &mut Batch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (bool, HashSet<i32>) {
        let mut backoff = Duration::from_millis(self.cfg.retry_backoff_ms);
        let mut done = Done::default();
        let mut paused = None;
        let mut revoked = HashSet::new();
        let written = loop {
            let write_started = std::time::Instant::now();
            let url = self.sink.url().to_owned();
            match self.write(output, &mut done).await {
                Ok(()) => {
                    crate::metrics::SINK_FLUSH_DURATION
                        .with_label_values(&["clickhouse"])
                        .observe(write_started.elapsed().as_secs_f64());
                    let m = &crate::metrics::SINK_ROWS;
                    m.with_label_values(&["events"])
                        .inc_by(output.kept.len() as u64);
                    m.with_label_values(&["dead_letters"])
                        .inc_by(output.dead.len() as u64);
                    for (&t, rows) in &output.rows {
                        m.with_label_values(&[self.sink.routed_name(t)])
                            .inc_by(rows.len() as u64);
                    }
                    for d in &output.dead {
                        crate::metrics::DEAD_LETTERS
                            .with_label_values(&[d.stage.as_str()])
                            .inc();
                    }
                    break true;
                }
                Err(e) => {
                    let retry_in_ms = backoff.as_millis() as u64;
                    match &e {
                        FlushError::ClickHouse(e) => {
                            crate::metrics::SINK_ERRORS
                                .with_label_values(&["clickhouse"])
                                .inc();
                            error!(error = %e, %url, retry_in_ms, "flush to ClickHouse failed; retrying");
                            self.sink.fail_over(&url);
                        }
                        FlushError::Topic(e) => {
                            crate::metrics::SINK_ERRORS
                                .with_label_values(&["topic"])
                                .inc();
                            error!(error = %e, retry_in_ms, "flush to a Kafka topic sink failed; retrying");
                        }
                    }
                    if paused.is_none() {
                        paused = self.pause();
                    }
                    let until = Instant::now() + backoff;
                    let stop = loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => break false,
                            _ = shutdown.changed() => break true,
                            msg = self.consumer.recv() => {
                                // A rebalance is served inside `recv` before the record it
                                // returns: what was received earlier from a revoked
                                // partition is stale, `msg` is not.
                                absorb_revoked(&self.consumer, &mut self.early, output, &mut revoked);
                                match msg {
                                    Ok(m) => self.early.push(m.detach()),
                                    Err(e) => warn!(error = %e, "Kafka consume error while paused"),
                                }
                            }
                        }
                    };
                    if stop {
                        break false;
                    }
                    // With every partition paused, `recv` may not return at all: a
                    // rebalance it served meanwhile is only seen here.
                    absorb_revoked(&self.consumer, &mut self.early, output, &mut revoked);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        if let Some(list) = paused {
            self.resume(&list);
        }
        (written, revoked)
    }

    /// Pauses every assigned partition (the consumer keeps polling: heartbeats,
    /// rebalances). Returns what was paused.
    fn pause(&self) -> Option<rdkafka::TopicPartitionList> {
        use rdkafka::consumer::Consumer as _;
        let list = self.consumer.assignment().ok()?;
        if let Err(e) = self.consumer.pause(&list) {
            warn!(error = %e, "cannot pause consumption");
            return None;
        }
        crate::metrics::PROCESSOR_PAUSED.set(1);
        warn!(
            partitions = list.count(),
            "consumption paused until the sinks accept the batch (still polling to stay in the group)"
        );
        Some(list)
    }

    fn resume(&self, list: &rdkafka::TopicPartitionList) {
        use rdkafka::consumer::Consumer as _;
        // Resume everything that was paused, assigned or not: librdkafka keeps a
        // partition's pause flag across a rebalance, so a partition revoked and then
        // assigned again to this instance would otherwise stay paused for good.
        if let Err(e) = self.consumer.resume(list) {
            warn!(error = %e, "cannot resume consumption");
        }
        crate::metrics::PROCESSOR_PAUSED.set(0);
        info!("consumption resumed");
    }

    /// Tries once to apply the pending counter increments; on failure schedules a
    /// retry with backoff. True when nothing waits for Redis any more.
    async fn apply_counters(&mut self) -> bool {
        let mut counters = self.counters.take();
        let applied = apply_pending(&mut counters).await;
        self.counters = counters;
        self.after_counters(applied)
    }

    /// Books the result of [`apply_pending`]: metrics, logs, the retry schedule.
    fn after_counters(&mut self, applied: Option<(Result<usize, CounterError>, Duration)>) -> bool {
        let Some((result, took)) = applied else {
            self.counters_retry = None;
            return true;
        };
        match result {
            Ok(_) => {
                crate::metrics::SINK_FLUSH_DURATION
                    .with_label_values(&["redis"])
                    .observe(took.as_secs_f64());
                if self.counters_retry.take().is_some() {
                    info!("counter increments reached Redis again; held offsets released");
                }
                true
            }
            Err(e) => {
                crate::metrics::SINK_ERRORS
                    .with_label_values(&["redis"])
                    .inc();
                let backoff = self.counters_retry.map_or(
                    Duration::from_millis(self.cfg.retry_backoff_ms),
                    |(_, b)| (b * 2).min(MAX_BACKOFF),
                );
                self.counters_retry = Some((Instant::now() + backoff, backoff));
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "counter write to Redis failed; ClickHouse writes go on, Kafka offsets of the partitions involved are held");
                false
            }
        }
    }

    /// Commits `offsets` and any held ones, as far as every sink got: not at all for
    /// partitions whose counter increments wait for Redis, and only up to the first
    /// event a webhook has not delivered yet (the rest stays held).
    fn commit(&mut self, offsets: BTreeMap<i32, i64>) {
        self.held.extend(offsets);
        let waiting: HashSet<i32> = self
            .counters
            .as_ref()
            .map(|c| c.pending_partitions().collect())
            .unwrap_or_default();
        let mut ready = BTreeMap::new();
        let webhooks = &self.webhooks;
        self.held.retain(|&p, &mut o| {
            if waiting.contains(&p) {
                return true;
            }
            let limit = webhooks.iter().filter_map(|w| w.commit_limit(p)).min();
            match limit {
                Some(l) if l < o => {
                    ready.insert(p, l);
                    true
                }
                _ => {
                    ready.insert(p, o);
                    false
                }
            }
        });
        // Rebalance callbacks run only inside `recv`, and revoked partitions were
        // forgotten before, so every partition here is still ours.
        if let Err(e) = bus::commit(&self.consumer, &self.topic, ready) {
            warn!(error = %e, "offset commit failed; the batch may be re-read after a restart");
        }
    }

    /// Forgets what was buffered from, and known about, partitions just revoked.
    fn forget_revoked(&mut self, buf: &mut Buffer) {
        let revoked = self.consumer.context().take_revoked();
        self.forget_partitions(&revoked, buf);
    }

    /// Forgets what this instance buffered from, and knew about, `partitions`.
    fn forget_partitions(&mut self, partitions: &HashSet<i32>, buf: &mut Buffer) {
        forget(
            partitions,
            &mut self.watermarks,
            &mut self.held,
            &mut self.counters,
            &self.webhooks,
            buf,
        );
    }

    /// Skips rows a previous run already wrote, then writes the rest, one INSERT per
    /// table. `done` records what succeeded, so that a retry after a partial failure
    /// (ClickHouse died between two INSERTs) does not write a table twice.
    async fn write(&mut self, output: &mut Batch, done: &mut Done) -> Result<(), FlushError> {
        self.sink.ensure_current().await?;
        if !done.checked {
            self.skip_replayed(output).await?;
            done.checked = true;
        }
        let (pipeline, plugins) = (self.pipeline.name(), self.pipeline.versions());
        let version = self.pipeline.tag().control_version;
        if !done.events {
            self.sink
                .insert_events(&output.kept, pipeline, plugins, version)
                .await?;
            done.events = true;
        }
        if !done.dead_letters {
            self.sink
                .insert_dead_letters(&output.dead, pipeline, version)
                .await?;
            done.dead_letters = true;
        }
        for (&t, rows) in &output.rows {
            if done.routed.insert(t)
                && let Err(e) = self.sink.insert_routed(t, rows, plugins, version).await
            {
                done.routed.remove(&t);
                return Err(e.into());
            }
        }
        for (i, topic) in self.topics.iter().enumerate() {
            let sent = done.forwarded.entry(i).or_default();
            let n = topic.write(&output.kept, sent).await?;
            if n > 0 {
                crate::metrics::SINK_ROWS
                    .with_label_values(&[&format!("topic:{}", topic.topic())])
                    .inc_by(n as u64);
            }
        }
        Ok(())
    }

    async fn skip_replayed(&mut self, output: &mut Batch) -> Result<(), ClickHouseError> {
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        let origins = output
            .kept
            .iter()
            .map(|k| k.origin)
            .chain(output.dead.iter().map(|d| d.origin));
        for o in origins {
            let r = ranges.entry(o.partition).or_insert((o.offset, o.offset));
            r.0 = r.0.min(o.offset);
            r.1 = r.1.max(o.offset);
        }
        let mut skipped = 0;
        for (partition, (lo, hi)) in ranges {
            let watermark = match self.watermarks.get(&partition) {
                Some(w) => *w,
                None => {
                    let w = self.sink.max_offset(partition).await?;
                    self.watermarks.insert(partition, w);
                    w
                }
            };
            let Some(watermark) = watermark.filter(|w| lo <= *w) else {
                continue;
            };
            let hi = hi.min(watermark);
            let events = self.sink.written("events", partition, lo, hi).await?;
            let dead = self.sink.written("dead_letters", partition, lo, hi).await?;
            // A row is a replay if its coordinates hold the same event in the table.
            let replayed = |written: &Written, o: &Origin, event_id: &str| {
                o.partition == partition
                    && written
                        .get(&(o.offset, o.index))
                        .is_some_and(|id| id == event_id)
            };
            let before = output.kept.len() + output.dead.len();
            output
                .kept
                .retain(|k| !replayed(&events, &k.origin, &k.event.event_id));
            output
                .dead
                .retain(|d| !replayed(&dead, &d.origin, &d.event_id));
            skipped += before - output.kept.len() - output.dead.len();
            for (&t, rows) in &mut output.rows {
                if !rows.iter().any(|r| r.origin.partition == partition) {
                    continue;
                }
                let table = self.sink.routed_name(t).to_owned();
                let written = self.sink.written(&table, partition, lo, hi).await?;
                let before = rows.len();
                rows.retain(|r| !replayed(&written, &r.origin, &r.event_id));
                skipped += before - rows.len();
            }
        }
        if skipped > 0 {
            crate::metrics::REPLAYED_ROWS_SKIPPED.inc_by(skipped as u64);
            warn!(
                skipped,
                "skipped rows an earlier run already wrote (a replay after a crash)"
            );
        }
        Ok(())
    }
}

/// Takes the partitions revoked since the last look out of the batch and out of the
/// records received while paused; adds them to `revoked`.
fn absorb_revoked(
    consumer: &Consumer,
    early: &mut Vec<rdkafka::message::OwnedMessage>,
    output: &mut Batch,
    revoked: &mut HashSet<i32>,
) {
    let gone = consumer.context().take_revoked();
    if gone.is_empty() {
        return;
    }
    warn!(partitions = ?gone, "partitions revoked during a failing flush: their events are left to the new owner");
    output.drop_partitions(&gone);
    early.retain(|m| !gone.contains(&m.partition()));
    revoked.extend(gone);
}

/// Applies the pending counter increments once, if there are any: the result and how
/// long it took. A free function so that it can run while `Worker::write_until_acked`
/// holds the worker.
async fn apply_pending(
    counters: &mut Option<CounterSink>,
) -> Option<(Result<usize, CounterError>, Duration)> {
    let counters = counters.as_mut().filter(|c| c.has_pending())?;
    let started = std::time::Instant::now();
    let result = counters.apply().await;
    Some((result, started.elapsed()))
}

/// Forgets the state of revoked partitions: buffered events, ClickHouse watermarks,
/// held offsets, pending counter increments. Their new owner re-reads them.
fn forget(
    revoked: &HashSet<i32>,
    watermarks: &mut HashMap<i32, Option<i64>>,
    held: &mut BTreeMap<i32, i64>,
    counters: &mut Option<CounterSink>,
    webhooks: &[WebhookSink],
    buf: &mut Buffer,
) {
    if revoked.is_empty() {
        return;
    }
    for p in revoked {
        watermarks.remove(p);
        held.remove(p);
    }
    if let Some(c) = counters {
        c.forget(revoked);
    }
    for w in webhooks {
        w.forget(revoked);
    }
    buf.forget(revoked);
}

async fn recv_swap(rx: &mut Option<mpsc::Receiver<Swap>>) -> Option<Swap> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
