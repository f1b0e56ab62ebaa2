//! The processor loop: consume, buffer, run the pipeline, hand the batch to every
//! sink, commit.
//!
//! Two batches overlap: while the sinks write batch N, the pipeline (deduplication
//! first, then schemas and plugins) processes batch N+1 on a task of its own, and the
//! consumer keeps reading what becomes batch N+2. A processed batch is written at once
//! when nothing else was read meanwhile (no latency is added when the processor keeps
//! up), and otherwise while the next batch is processed. Batches are written and
//! committed strictly in order, so a partition's offsets never pass a batch that was
//! not written (within a batch, the pipeline runs partitions in parallel lanes: see
//! [`super::Pipeline`]); a rebalance drops the revoked partitions from every batch, in flight,
//! processed or buffered. A hot swap waits for the batch in flight; a processed batch
//! keeps the pipeline version that made it.
//!
//! Every sink is driven the same way, through [`crate::sinks::Sink`]:
//! - each flush goes to every sink at once (the ClickHouse INSERTs, the topic records,
//!   the counter increments and the webhook queues proceed together); a sink whose
//!   attempt fails is retried with backoff, the others are not called again, and the
//!   flush's offsets do not move meanwhile. Between attempts the consumer keeps
//!   polling with every partition paused, so the instance stays in its group however
//!   long the outage lasts; a partition revoked meanwhile is taken out of the batch
//!   before the next attempt;
//! - offsets are committed (synchronously) once every sink took the flush, and each
//!   partition only up to the lowest offset some sink still holds undelivered
//!   ([`crate::sinks::Sink::commit_limit`]: increments waiting for Redis, events
//!   queued for a webhook); what is held back is committed as the sinks catch up;
//! - when a rebalance revokes partitions, whatever was buffered from them and not yet
//!   written is dropped, and every sink forgets them: the new owner re-reads them from
//!   the committed offset;
//! - on shutdown the buffer is flushed and committed before the consumer leaves, and
//!   the sinks that deliver on their own get `drain_timeout_ms` to deliver what they
//!   hold (committed as they do);
//! - after a crash, the batch that was written but not committed is read again; each
//!   sink guards itself against that replay (ClickHouse skips rows it holds, Redis
//!   skips increments at or below the offset it stored with them; webhooks and topics
//!   deliver again, at least once, with the same event ids).

use std::collections::{BTreeMap, HashMap, HashSet};

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::Message;
use rdkafka::consumer::Consumer as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::config::{MAX_RETRY_BACKOFF, ProcessorConfig};
use super::dedup::Dedup;
use super::route::Routes;
use super::{Pipeline, Tag};
use crate::bus::{self, Consumer};
use crate::metrics::events::{
    BatchFlushed, ConsumptionPaused, ConsumptionResumed, DedupCheckFailed, InternalEvent,
    LongPipelineWait, RevokedMidFlush, ShutdownDrained, SinkWriteFailed, SinksCaughtUp,
    UndecodableRecord,
};
use crate::model::{Batch, DeadLetter, Kept, Origin, Stage, WireEvent};
use crate::sinks::clickhouse::Table;
use crate::sinks::{Flush, Refusal, Sink};

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

/// The pipeline version that processed a batch: what the sinks record with its rows,
/// and the tables its rows index.
struct Provenance {
    pipeline: String,
    plugins: String,
    control_version: u64,
    tables: Arc<[Table]>,
}

impl Provenance {
    fn of(p: &Pipeline) -> Self {
        Self {
            pipeline: p.name().to_owned(),
            plugins: p.versions().to_owned(),
            control_version: p.tag().control_version,
            tables: p.routes().tables.clone(),
        }
    }

    fn flush<'a>(&'a self, batch: &'a Batch) -> Flush<'a> {
        Flush {
            batch,
            pipeline: &self.pipeline,
            plugins: &self.plugins,
            control_version: self.control_version,
            tables: &self.tables,
        }
    }
}

/// What the task processing a batch gives back: the pipeline and the deduplication
/// state it took, and the batch, or the events a failed deduplication check left
/// unchecked.
type Joined = (Pipeline, Option<Dedup>, Result<Batch, Unchecked>);

/// Events whose deduplication check failed: the worker retries it.
struct Unchecked {
    /// What the events checked before the failure gave.
    done: Batch,
    events: Vec<(Origin, String, WireEvent)>,
    replays: Arc<HashSet<(i32, i64)>>,
    error: super::dedup::DedupError,
}

/// A batch being processed on a task of its own.
struct InFlight {
    handle: tokio::task::JoinHandle<Joined>,
    /// Next offset to commit per partition, once the batch is written.
    offsets: BTreeMap<i32, i64>,
    undecodable: Vec<DeadLetter>,
    events: usize,
    started: std::time::Instant,
    provenance: Provenance,
}

/// A batch the pipeline processed and the sinks have not taken yet.
struct Processed {
    output: Batch,
    offsets: BTreeMap<i32, i64>,
    events: usize,
    plugin_time: Duration,
    provenance: Provenance,
}

/// How often held-back offsets are tried again while no batch commits them.
const HELD_RETRY: Duration = Duration::from_millis(500);

/// How long the processor stops reading while a whole batch waits for the pipeline
/// before it pauses consumption and reads on. Not reading keeps what librdkafka
/// fetched ahead (a pause throws it away, and it is fetched again on resume); reading
/// on with every partition paused serves rebalances and `max.poll.interval.ms`
/// during plugin work of any length.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Events per deduplication round trip within a batch: small enough that the plugins
/// wait for Redis only briefly (the first chunk's check), large enough that a round
/// trip's fixed cost is spread over many events.
const CHECK_CHUNK: usize = 4096;

/// Events read from Kafka and not yet written.
#[derive(Default)]
struct Buffer {
    events: Vec<(Origin, String, WireEvent)>,
    /// `(partition, offset)` of the buffered records that replay dead letters.
    replays: HashSet<(i32, i64)>,
    undecodable: Vec<DeadLetter>,
    /// Next offset to commit, per partition.
    next_offsets: BTreeMap<i32, i64>,
    /// When the oldest buffered record arrived.
    since: Option<Instant>,
    /// A batch processed and not written yet: it is written while the next batch is
    /// processed.
    processed: Option<Processed>,
    /// Partitions forgotten since the batch in flight started: what it makes of them
    /// is dropped.
    forgotten: HashSet<i32>,
    /// A flush was given up on shutdown: nothing read after it may be committed.
    abandoned: bool,
}

/// A record read from Kafka, decoded (or its dead letter, if it is not weir's).
struct Received {
    partition: i32,
    offset: i64,
    decoded: Result<super::Decoded, Box<DeadLetter>>,
}

impl Received {
    fn decode(m: &impl Message) -> Self {
        let (partition, offset) = (m.partition(), m.offset());
        let decoded = super::decode(partition, offset, m.payload());
        if let Err(dead) = &decoded {
            UndecodableRecord {
                partition,
                offset,
                reason: &dead.reason,
            }
            .emit();
        }
        Self {
            partition,
            offset,
            decoded,
        }
    }

    fn events(&self) -> usize {
        self.decoded.as_ref().map_or(1, |d| d.events.len())
    }
}

/// Records read while a flush runs (decoded as they arrive, so that decoding overlaps
/// the batch's processing); they join the buffer once the flush is done.
#[derive(Default)]
struct Early {
    records: Vec<Received>,
    events: usize,
}

impl Early {
    fn push(&mut self, m: &impl Message) {
        let r = Received::decode(m);
        self.events += r.events();
        self.records.push(r);
    }

    fn drop_partitions(&mut self, partitions: &HashSet<i32>) {
        self.records.retain(|r| !partitions.contains(&r.partition));
        self.events = self.records.iter().map(Received::events).sum();
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl Buffer {
    /// Adds a decoded record to the buffer (its events, or its dead letter).
    fn add(&mut self, r: Received) {
        if self.abandoned {
            return;
        }
        match r.decoded {
            Ok(decoded) => {
                if decoded.replay {
                    self.replays.insert((r.partition, r.offset));
                }
                self.events.extend(decoded.events);
            }
            Err(dead) => self.undecodable.push(*dead),
        }
        self.next_offsets.insert(r.partition, r.offset + 1);
        self.since.get_or_insert_with(Instant::now);
    }

    fn len(&self) -> usize {
        self.events.len() + self.undecodable.len()
    }

    /// Nothing read waits to be written (buffered or processed).
    fn is_empty(&self) -> bool {
        self.next_offsets.is_empty() && self.processed.is_none()
    }

    /// Gives up on what was read and not written, on shutdown: none of it (and
    /// nothing read later) is committed; the next owner re-reads it.
    fn abandon(&mut self) {
        self.events.clear();
        self.replays.clear();
        self.undecodable.clear();
        self.next_offsets.clear();
        self.since = None;
        self.processed = None;
        self.abandoned = true;
    }

    fn forget(&mut self, partitions: &HashSet<i32>) {
        if partitions.is_empty() {
            return;
        }
        self.forgotten.extend(partitions);
        let before = self.len() + self.processed.as_ref().map_or(0, |p| p.output.kept.len());
        if let Some(p) = &mut self.processed {
            p.output.drop_partitions(partitions);
            p.offsets.retain(|k, _| !partitions.contains(k));
        }
        self.events
            .retain(|(o, _, _)| !partitions.contains(&o.partition));
        self.undecodable
            .retain(|d| !partitions.contains(&d.origin.partition));
        self.next_offsets.retain(|p, _| !partitions.contains(p));
        self.replays.retain(|(p, _)| !partitions.contains(p));
        if self.next_offsets.is_empty() {
            self.since = None;
        }
        let dropped =
            before - self.len() - self.processed.as_ref().map_or(0, |p| p.output.kept.len());
        if dropped > 0 {
            info!(
                dropped,
                "dropped buffered events of revoked partitions; their new owner re-reads them"
            );
        }
    }
}

/// The processor of one instance.
pub struct Worker {
    consumer: Consumer,
    topic: String,
    /// The pipeline in force; away (on the task that runs it) while a batch is in
    /// flight, home between flushes.
    pipeline: Option<Pipeline>,
    /// Every sink, each driven through the same contract.
    sinks: Vec<Box<dyn Sink>>,
    cfg: ProcessorConfig,
    /// Next offsets of flushed batches not committed yet, because a sink still holds
    /// events of the partition undelivered.
    held: BTreeMap<i32, i64>,
    /// Records received while a failing flush polled with its partitions paused; they
    /// are buffered once the flush is done.
    early: Early,
    /// New pipelines from the control agent, swapped in between batches.
    swaps: Option<mpsc::Receiver<Swap>>,
    /// What runs now, for the agent's status reports.
    running: Option<watch::Sender<Running>>,
    /// The counters API's view of the declared counters.
    shared_routes: Option<SharedRoutes>,
    /// Drops copies of events already received (client resends), when enabled.
    dedup: Option<Dedup>,
}

impl Worker {
    pub fn new(
        consumer: Consumer,
        topic: String,
        pipeline: Pipeline,
        sinks: Vec<Box<dyn Sink>>,
        cfg: ProcessorConfig,
    ) -> Self {
        Self {
            consumer,
            topic,
            pipeline: Some(pipeline),
            sinks,
            cfg,
            held: BTreeMap::new(),
            early: Early::default(),
            swaps: None,
            running: None,
            shared_routes: None,
            dedup: None,
        }
    }

    /// Drops copies of events already received within `dedup`'s window before they
    /// reach the pipeline. Away with the pipeline while a batch is in flight.
    pub fn with_dedup(mut self, dedup: Dedup) -> Self {
        self.dedup = Some(dedup);
        self
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
    /// one. Rows of later batches go to the new version's tables (the agent created
    /// them; each flush carries its tables to the sinks); increments already waiting
    /// for Redis keep the counters they were made for.
    fn swap(&mut self, swap: Swap) {
        let current = self
            .pipeline
            .as_mut()
            .expect("the pipeline is home between flushes");
        match swap.pipeline {
            Some(pipeline) => {
                let old = current.tag();
                *current = pipeline;
                let current = &*current;
                if let Some(shared) = &self.shared_routes {
                    let routes = current.routes();
                    let mut current = shared.write().expect("routes lock");
                    if !Arc::ptr_eq(&current, routes) {
                        *current = routes.clone();
                    }
                }
                let new = current.tag();
                info!(
                    pipeline = %current.name(),
                    from_version = old.pipeline_version,
                    to_version = new.pipeline_version,
                    control_version = new.control_version,
                    plugins = %current.versions(),
                    "pipeline swapped"
                );
            }
            None => current.set_control_version(swap.control_version),
        }
        crate::metrics::CONTROL_VERSION.set(swap.control_version as i64);
        if let Some(running) = &self.running {
            running.send_replace(Running::of(
                self.pipeline.as_ref().expect("the pipeline is home"),
            ));
        }
    }

    /// When the next sink wants to be retried.
    fn next_retry(&self) -> Option<Instant> {
        self.sinks.iter().filter_map(|s| s.retry_at()).min()
    }

    /// Retries the sinks whose time has come.
    async fn retry_due(&mut self) {
        let now = Instant::now();
        for sink in &mut self.sinks {
            if sink.retry_at().is_some_and(|t| t <= now) {
                sink.retry().await;
            }
        }
    }

    /// Runs until `shutdown` turns true, then flushes, commits and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut buf = Buffer::default();
        let interval = Duration::from_millis(self.cfg.flush_interval_ms);
        if let Some(p) = &self.pipeline {
            info!(pipeline = %p.name(), plugins = %p.versions(), "processor started");
        }
        loop {
            // Records that arrived while a flush ran (its plugins, its retries) join the
            // buffer before anything waits: nothing may wake the loop for them later.
            loop {
                for r in std::mem::take(&mut self.early).records {
                    buf.add(r);
                }
                if buf.len() < self.cfg.flush_max_events || *shutdown.borrow() {
                    break;
                }
                self.flush(&mut buf, &mut shutdown).await;
            }
            if *shutdown.borrow() {
                break;
            }
            // A processed batch waits: write it now (the next batch, from what was
            // read meanwhile, is processed as it is written).
            let deadline = if buf.processed.is_some() {
                Some(Instant::now())
            } else {
                buf.since.map(|t| t + interval)
            };
            let next_retry = self.next_retry();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(swap) = recv_swap(&mut self.swaps) => self.swap(swap),
                _ = sleep_until(deadline) => {
                    self.flush(&mut buf, &mut shutdown).await;
                }
                _ = sleep_until(next_retry) => {
                    self.forget_revoked(&mut buf);
                    self.retry_due().await;
                    self.commit(BTreeMap::new());
                }
                // Offsets held back for sinks still delivering: commit what they finished.
                _ = sleep_until((!self.held.is_empty()).then(|| Instant::now() + HELD_RETRY)) => {
                    self.forget_revoked(&mut buf);
                    self.commit(BTreeMap::new());
                }
                msg = self.consumer.recv() => {
                    let revoked = self.consumer.context().take_revoked();
                    forget(&revoked, &mut self.held, &mut self.sinks, &mut buf);
                    match msg {
                        Ok(m) => {
                            if let Some(ms) = m.timestamp().to_millis() {
                                let delay_ms = crate::model::now_ms().saturating_sub(ms).max(0);
                                crate::metrics::CONSUME_DELAY.observe(delay_ms as f64 / 1000.0);
                            }
                            buf.add(Received::decode(&m));
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
            let flush_all = async {
                while !buf.is_empty() && !buf.abandoned {
                    self.flush(&mut buf, &mut rx).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), flush_all).await;
        }
        self.drain().await;
        info!("processor stopped");
    }

    /// On shutdown: gives the sinks that deliver on their own (a webhook's queue,
    /// increments waiting for Redis) up to `drain_timeout_ms` to deliver what they
    /// hold, committing as they catch up, so that the next owner of the partitions
    /// does not deliver it again. What is left then stays uncommitted (at least once).
    async fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.drain_timeout_ms);
        self.commit(BTreeMap::new());
        while !self.held.is_empty() && Instant::now() < deadline {
            let poll = Instant::now() + Duration::from_millis(100);
            let wake = self
                .next_retry()
                .map_or(poll, |t| t.min(poll))
                .min(deadline);
            tokio::time::sleep_until(wake).await;
            self.retry_due().await;
            self.commit(BTreeMap::new());
        }
        ShutdownDrained {
            undelivered_partitions: self.held.len(),
        }
        .emit();
    }

    /// Starts processing the buffer (deduplication, then the pipeline on a task of its
    /// own) and, meanwhile, writes the batch processed before it; then waits for the
    /// new batch, polling the consumer. The new batch is written at once when nothing
    /// else is waiting, or kept in `buf.processed` to be written while the next one is
    /// processed. A batch's offsets are committed once every sink took it, in batch
    /// order, so a later batch never commits past an earlier one that was not written.
    /// Gives up (without committing) only on shutdown.
    async fn flush(&mut self, buf: &mut Buffer, shutdown: &mut watch::Receiver<bool>) {
        self.forget_revoked(buf);
        if buf.is_empty() || buf.abandoned {
            return;
        }
        // Bounded memory: while a sink holds as much as it may (increments waiting for
        // Redis up to redis.max_pending, events waiting for room in a webhook's queue),
        // take nothing new until it delivers, polling Kafka with consumption paused.
        if self.sinks.iter().any(|s| s.is_full()) {
            let paused = self.pause();
            let started = Instant::now();
            let mut stopped = false;
            while self.sinks.iter().any(|s| s.is_full()) {
                let wait = self
                    .next_retry()
                    .map_or(Duration::from_millis(self.cfg.retry_backoff_ms), |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                let (stop, gone) = self.wait_paused(Instant::now() + wait, shutdown).await;
                self.forget_partitions(&gone, buf);
                if stop {
                    stopped = true;
                    break;
                }
                self.retry_due().await;
                self.commit(BTreeMap::new());
            }
            if let Some(list) = paused {
                self.resume(&list);
            }
            SinksCaughtUp {
                waited: started.elapsed(),
            }
            .emit();
            if stopped || buf.is_empty() {
                return;
            }
        }
        let in_flight = (!buf.next_offsets.is_empty()).then(|| self.start(buf));
        if let Some(previous) = buf.processed.take()
            && !self.write(previous, buf, shutdown).await
        {
            if let Some(batch) = in_flight {
                // The pipeline comes home; what it made is not written.
                let _ = self.join_polling(batch, buf, shutdown).await;
            }
            return;
        }
        let Some(batch) = in_flight else { return };
        let Some(processed) = self.join_polling(batch, buf, shutdown).await else {
            return;
        };
        if self.early.is_empty() || *shutdown.borrow() {
            self.write(processed, buf, shutdown).await;
        } else {
            buf.processed = Some(processed);
        }
    }

    /// Takes the buffer's events and offsets as the next batch and processes them on
    /// a task of its own (deduplication, then the pipeline), so that the Redis check
    /// and the plugins work while the previous batch is written.
    fn start(&mut self, buf: &mut Buffer) -> InFlight {
        let events = std::mem::take(&mut buf.events);
        let replays = std::mem::take(&mut buf.replays);
        let provenance = Provenance::of(self.pipeline.as_ref().expect("the pipeline is home"));
        buf.forgotten.clear();
        buf.since = None;
        let count = events.len();
        InFlight {
            handle: self.spawn(events, Some(replays), Batch::default()),
            offsets: std::mem::take(&mut buf.next_offsets),
            undecodable: std::mem::take(&mut buf.undecodable),
            events: count,
            started: std::time::Instant::now(),
            provenance,
        }
    }

    /// Waits for a batch's processing (deduplication, plugins) while the consumer
    /// keeps polling (heartbeats, rebalances; the records that arrive wait in
    /// `early`, decoded; once `flush_max_events` of them wait, reading stops for up
    /// to [`PAUSE_AFTER`], then consumption pauses and polling goes on), so that
    /// plugin work of any length does not get the instance evicted from its group
    /// (`max.poll.interval.ms`) while it still holds the batch. The pipeline and the
    /// deduplication state come home. Whatever comes from partitions revoked since the
    /// batch started is taken out of it (their new owner re-reads them). A failed
    /// deduplication check is retried here, with backoff and consumption paused,
    /// before the pipeline runs; None if shutdown came first (the buffer is abandoned).
    async fn join_polling(
        &mut self,
        mut batch: InFlight,
        buf: &mut Buffer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Processed> {
        let mut output = loop {
            let (pipeline, dedup, result) = self.poll_until_joined(&mut batch.handle, buf).await;
            self.pipeline = Some(pipeline);
            self.dedup = dedup;
            match result {
                Ok(output) => break output,
                Err(unchecked) => {
                    DedupCheckFailed {
                        error: &unchecked.error,
                        retry_in: Duration::ZERO,
                    }
                    .emit();
                    let mut events = unchecked.events;
                    events.retain(|(o, _, _)| !buf.forgotten.contains(&o.partition));
                    if !self
                        .deduplicate(&mut events, &unchecked.replays, buf, shutdown)
                        .await
                    {
                        warn!(
                            events = events.len(),
                            "shutdown during a failing deduplication check: offsets not committed, the events will be re-read"
                        );
                        buf.abandon();
                        return None;
                    }
                    batch.handle = self.spawn(events, None, unchecked.done);
                }
            }
        };
        let mut offsets = batch.offsets;
        offsets.retain(|p, _| !buf.forgotten.contains(p));
        output.dead.extend(batch.undecodable);
        output.drop_partitions(&buf.forgotten);
        Some(Processed {
            output,
            offsets,
            events: batch.events,
            plugin_time: batch.started.elapsed(),
            provenance: batch.provenance,
        })
    }

    /// Runs `events` through deduplication (unless `replays` is None: they were
    /// checked) and the pipeline on a task of its own, adding the result to `done`;
    /// the pipeline and the deduplication state go with it and come back with the
    /// result. The check goes chunk by chunk ([`CHECK_CHUNK`] events), each chunk's
    /// Redis round trip made while the plugins run the chunk before it, so that the
    /// batch waits for Redis only for its first chunk. Plugins only ever see checked
    /// events. A failed check gives back what the chunks before it made, and the
    /// rest of the events unchecked.
    fn spawn(
        &mut self,
        events: Vec<(Origin, String, WireEvent)>,
        replays: Option<HashSet<(i32, i64)>>,
        mut done: Batch,
    ) -> tokio::task::JoinHandle<Joined> {
        let mut pipeline = self
            .pipeline
            .take()
            .expect("the pipeline is home between flushes");
        let dedup = self.dedup.take();
        tokio::spawn(async move {
            let (mut d, replays) = match (dedup, replays) {
                (Some(d), Some(replays)) => (d, replays),
                // Checked already, or no deduplication: the state (if any) comes home.
                (dedup, _) => {
                    done.append(pipeline.run(events).await);
                    return (pipeline, dedup, Ok(done));
                }
            };
            let replays = Arc::new(replays);
            let mut chunks = chunked(events, CHECK_CHUNK).into_iter();
            let mut checked = None;
            while let Some(chunk) = chunks.next() {
                // The check runs on a task of its own, so that building the Redis
                // commands and reading the replies use the other core while this task
                // runs the plugins on the chunk checked before.
                let check = tokio::spawn(check_chunk(d, chunk, replays.clone()));
                if let Some(previous) = checked.take() {
                    done.append(pipeline.run(previous).await);
                }
                let (back, chunk, result) = match check.await {
                    Ok(joined) => joined,
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                d = back;
                if let Err(error) = result {
                    let mut events = chunk;
                    events.extend(chunks.flatten());
                    let unchecked = Unchecked {
                        done,
                        events,
                        replays,
                        error,
                    };
                    return (pipeline, Some(d), Err(unchecked));
                }
                checked = Some(chunk);
            }
            if let Some(last) = checked {
                done.append(pipeline.run(last).await);
            }
            (pipeline, Some(d), Ok(done))
        })
    }

    /// Waits for the task processing a batch while the consumer keeps polling; the
    /// partitions revoked meanwhile are forgotten (`buf.forgotten` has them).
    async fn poll_until_joined(
        &mut self,
        handle: &mut tokio::task::JoinHandle<Joined>,
        buf: &mut Buffer,
    ) -> Joined {
        let mut revoked = HashSet::new();
        let mut paused = None;
        // Since when a whole batch waits in `early` (reading stops then).
        let mut full_since: Option<Instant> = None;
        let joined = loop {
            let reading = paused.is_some() || full_since.is_none();
            let pause_at = full_since
                .filter(|_| paused.is_none())
                .map(|t| t + PAUSE_AFTER);
            tokio::select! {
                biased;
                joined = &mut *handle => match joined {
                    Ok(done) => break done,
                    // A panic in the pipeline is a bug: it stops the processor as it
                    // would have had the pipeline run on this task.
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                },
                _ = sleep_until(pause_at) => {
                    paused = pause(&self.consumer);
                    if paused.is_some() {
                        LongPipelineWait {
                            waiting: self.early.events,
                            after: PAUSE_AFTER,
                        }
                        .emit();
                    }
                }
                msg = self.consumer.recv(), if reading => {
                    receive_early(&self.consumer, &mut self.early, &mut revoked, msg, "during plugin work");
                    if full_since.is_none() && self.early.events >= self.cfg.flush_max_events {
                        full_since = Some(Instant::now());
                    }
                }
            }
        };
        absorb_revoked(&self.consumer, &mut self.early, &mut revoked);
        if let Some(list) = paused {
            self.resume(&list);
        }
        self.forget_partitions(&revoked, buf);
        joined
    }

    /// Hands a processed batch to every sink, retrying until each took it (and
    /// dead-letters what they refused for good), then commits its offsets as far as
    /// the sinks allow. False, and the buffer abandoned, if shutdown came first.
    async fn write(
        &mut self,
        mut batch: Processed,
        buf: &mut Buffer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let started = std::time::Instant::now();
        let (mut written, mut revoked, refused) = self
            .write_until_acked(&mut batch.output, &batch.provenance, shutdown)
            .await;
        // Partitions revoked while the flush polled: their rows were taken out of the
        // batch before the next attempt; drop what else this instance knew of them.
        self.forget_partitions(&revoked, buf);
        if written && !refused.is_empty() {
            let (aside, gone) = self
                .set_aside(&batch.output, &batch.provenance, refused, buf, shutdown)
                .await;
            written = aside;
            revoked.extend(gone);
        }
        if !written {
            warn!(
                events = batch.events,
                "shutdown during a failing flush: offsets not committed, the events will be re-read"
            );
            buf.abandon();
            return false;
        }
        crate::failpoint::after_write();
        batch.offsets.retain(|p, _| !revoked.contains(p));
        self.commit(batch.offsets);
        let output = &batch.output;
        BatchFlushed {
            events: batch.events,
            kept: output.kept.len(),
            routed_rows: output.rows.values().map(Vec::len).sum::<usize>(),
            increments: output.counts.len(),
            dead_letters: output.dead.len(),
            dropped: output.dropped,
            plugin_time: batch.plugin_time,
            total_time: batch.plugin_time + started.elapsed(),
        }
        .emit();
        true
    }

    /// Dead-letters the kept events of `output` that sinks refused for good (stage
    /// `sink`), through every sink like any flush, so that their offsets can be
    /// committed. False if shutdown came first (nothing is committed; the replay
    /// refuses them again); returns the partitions revoked meanwhile too.
    async fn set_aside(
        &mut self,
        output: &Batch,
        provenance: &Provenance,
        refused: Vec<Refusal>,
        buf: &mut Buffer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (bool, HashSet<i32>) {
        let mut aside = Batch {
            dead: refused_dead_letters(&output.kept, refused),
            ..Batch::default()
        };
        let (written, revoked, again) = self
            .write_until_acked(&mut aside, provenance, shutdown)
            .await;
        self.forget_partitions(&revoked, buf);
        if !again.is_empty() {
            // The contract: only kept events are refused.
            error!(
                refusals = again.len(),
                "a sink refused dead letters; they stay only in this log: {again:?}"
            );
        }
        (written, revoked)
    }

    /// Hands the batch to every sink, retrying the ones that failed with backoff until
    /// each took it. Between attempts the consumer keeps polling with its partitions
    /// paused, so the instance stays in its group however long the outage lasts; a
    /// partition revoked meanwhile is taken out of the batch (its new owner re-reads
    /// it) and returned, with the events the sinks refused for good. False if shutdown
    /// came first.
    async fn write_until_acked(
        &mut self,
        output: &mut Batch,
        provenance: &Provenance,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (bool, HashSet<i32>, Vec<Refusal>) {
        let mut backoff = Duration::from_millis(self.cfg.retry_backoff_ms);
        let mut taken = vec![false; self.sinks.len()];
        let mut paused = None;
        let mut revoked = HashSet::new();
        let mut refused = Vec::new();
        let timeout = Duration::from_millis(self.cfg.write_timeout_ms);
        let written = loop {
            let flush = provenance.flush(output);
            let attempts = self
                .sinks
                .iter_mut()
                .zip(&taken)
                .enumerate()
                .filter(|(_, (_, taken))| !**taken)
                .map(|(i, (sink, _))| async move {
                    let kind = sink.kind();
                    let result = match tokio::time::timeout(timeout, sink.write(flush)).await {
                        Ok(result) => result,
                        // Dropped: the sink finds out at its next attempt
                        // (`Sink::write` is abandoned, never half-remembered).
                        Err(_) => Err(format!(
                            "the write attempt took longer than processor.write_timeout_ms ({} ms) and was abandoned",
                            timeout.as_millis()
                        )
                        .into()),
                    };
                    (i, kind, result)
                });
            let mut failed = 0;
            for (i, kind, result) in join_all(attempts).await {
                match result {
                    Ok(r) => {
                        taken[i] = true;
                        refused.extend(r);
                    }
                    Err(e) => {
                        failed += 1;
                        SinkWriteFailed {
                            sink: kind,
                            error: &e,
                            retry_in: backoff,
                        }
                        .emit();
                    }
                }
            }
            if failed == 0 {
                break true;
            }
            if paused.is_none() {
                paused = self.pause();
            }
            let (stop, gone) = self.wait_paused(Instant::now() + backoff, shutdown).await;
            output.drop_partitions(&gone);
            refused.retain(|r| !gone.contains(&r.origin.partition));
            revoked.extend(gone);
            if stop {
                break false;
            }
            backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
        };
        for sink in &mut self.sinks {
            sink.finish();
        }
        if let Some(list) = paused {
            self.resume(&list);
        }
        (written, revoked, refused)
    }

    /// Drops the copies of events already received (when deduplication is on),
    /// retrying a failed check with backoff and consumption paused, like a sink that
    /// does not take a batch; the events of partitions revoked meanwhile are dropped
    /// too (their new owner re-reads them). False if shutdown came first.
    async fn deduplicate(
        &mut self,
        events: &mut Vec<(Origin, String, WireEvent)>,
        replays: &HashSet<(i32, i64)>,
        buf: &mut Buffer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut backoff = Duration::from_millis(self.cfg.retry_backoff_ms);
        let mut paused = None;
        let done = loop {
            let Some(dedup) = self.dedup.as_mut() else {
                break true;
            };
            // With `when_unavailable = "pass"` this does not fail: the events go on
            // unchecked.
            match dedup.filter(events, replays).await {
                Ok(_) => break true,
                Err(e) => DedupCheckFailed {
                    error: &e,
                    retry_in: backoff,
                }
                .emit(),
            }
            if paused.is_none() {
                paused = self.pause();
            }
            let (stop, gone) = self.wait_paused(Instant::now() + backoff, shutdown).await;
            if !gone.is_empty() {
                events.retain(|(o, _, _)| !gone.contains(&o.partition));
                self.forget_partitions(&gone, buf);
            }
            if stop {
                break false;
            }
            backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
        };
        if let Some(list) = paused {
            self.resume(&list);
        }
        done
    }

    /// Waits until `until` with consumption paused, polling the consumer so that the
    /// instance stays in its group (heartbeats, rebalances); records that arrive are
    /// kept for after the flush. Returns whether shutdown came first, and the
    /// partitions revoked meanwhile (none of their records is kept).
    async fn wait_paused(
        &mut self,
        until: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (bool, HashSet<i32>) {
        let mut revoked = HashSet::new();
        let stop = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break false,
                _ = shutdown.changed() => break true,
                msg = self.consumer.recv() => {
                    receive_early(&self.consumer, &mut self.early, &mut revoked, msg, "while paused");
                }
            }
        };
        // With every partition paused, `recv` may not return at all: a rebalance it
        // served meanwhile is only seen here.
        absorb_revoked(&self.consumer, &mut self.early, &mut revoked);
        (stop, revoked)
    }

    /// Pauses every assigned partition (the consumer keeps polling: heartbeats,
    /// rebalances). Returns what was paused.
    fn pause(&self) -> Option<rdkafka::TopicPartitionList> {
        let list = pause(&self.consumer)?;
        ConsumptionPaused {
            partitions: list.count(),
        }
        .emit();
        Some(list)
    }

    fn resume(&self, list: &rdkafka::TopicPartitionList) {
        // Resume everything that was paused, assigned or not: librdkafka keeps a
        // partition's pause flag across a rebalance, so a partition revoked and then
        // assigned again to this instance would otherwise stay paused for good.
        if let Err(e) = self.consumer.resume(list) {
            warn!(error = %e, "cannot resume consumption");
        }
        ConsumptionResumed.emit();
    }

    /// Commits `offsets` and any held ones, each partition only up to the lowest
    /// offset a sink still holds undelivered (the rest stays held).
    fn commit(&mut self, offsets: BTreeMap<i32, i64>) {
        self.held.extend(offsets);
        let mut ready = BTreeMap::new();
        let sinks = &self.sinks;
        self.held.retain(|&p, &mut o| {
            let limit = sinks.iter().filter_map(|s| s.commit_limit(p)).min();
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

    /// Forgets what this instance buffered from, and knew about, `partitions`: held
    /// offsets, and what every sink holds of them. Their new owner re-reads them.
    fn forget_partitions(&mut self, partitions: &HashSet<i32>, buf: &mut Buffer) {
        forget(partitions, &mut self.held, &mut self.sinks, buf);
    }
}

/// Forgets what was buffered from, and known about, `partitions`: held offsets, and
/// what every sink holds of them. Their new owner re-reads them. A free function so
/// that it can run while a received message borrows the consumer.
fn forget(
    partitions: &HashSet<i32>,
    held: &mut BTreeMap<i32, i64>,
    sinks: &mut [Box<dyn Sink>],
    buf: &mut Buffer,
) {
    if partitions.is_empty() {
        return;
    }
    for p in partitions {
        held.remove(p);
    }
    for sink in sinks {
        sink.forget(partitions);
    }
    buf.forget(partitions);
}

/// The dead letters of the kept events sinks refused (one per refusal: an event two
/// sinks refused has two, each naming its sink).
fn refused_dead_letters(kept: &[Kept], refused: Vec<Refusal>) -> Vec<DeadLetter> {
    let by_slot: HashMap<_, &Kept> = kept.iter().map(|k| (k.origin.slot(), k)).collect();
    refused
        .into_iter()
        .filter_map(|r| {
            let Some(k) = by_slot.get(&r.origin.slot()) else {
                error!(sink = %r.sink, origin = ?r.origin, "a sink refused an event the flush does not hold");
                return None;
            };
            Some(DeadLetter::of(r.origin, k.event.clone(), Stage::Sink, r.reason).by(&r.sink, ""))
        })
        .collect()
}

/// Pauses every partition assigned to `consumer`; returns what was paused.
fn pause(consumer: &Consumer) -> Option<rdkafka::TopicPartitionList> {
    let list = consumer.assignment().ok()?;
    if let Err(e) = consumer.pause(&list) {
        warn!(error = %e, "cannot pause consumption");
        return None;
    }
    Some(list)
}

/// Takes the partitions revoked since the last look out of the records received
/// meanwhile; adds them to `revoked`.
fn absorb_revoked(consumer: &Consumer, early: &mut Early, revoked: &mut HashSet<i32>) {
    let gone = consumer.context().take_revoked();
    if gone.is_empty() {
        return;
    }
    let mut list: Vec<i32> = gone.iter().copied().collect();
    list.sort_unstable();
    RevokedMidFlush { partitions: &list }.emit();
    early.drop_partitions(&gone);
    revoked.extend(gone);
}

/// Takes a record received while a flush runs into `early`. A rebalance is served
/// inside `recv` before the record it returns: what was received earlier from a
/// revoked partition is stale (dropped, and the partition added to `revoked`), `msg`
/// is not.
fn receive_early(
    consumer: &Consumer,
    early: &mut Early,
    revoked: &mut HashSet<i32>,
    msg: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
    during: &str,
) {
    absorb_revoked(consumer, early, revoked);
    match msg {
        Ok(m) => early.push(&m),
        Err(e) => warn!(error = %e, "Kafka consume error {during}"),
    }
}

/// Checks `chunk` in Redis; the deduplication state and the chunk come back with
/// the result.
async fn check_chunk(
    mut dedup: Dedup,
    mut chunk: Vec<(Origin, String, WireEvent)>,
    replays: Arc<HashSet<(i32, i64)>>,
) -> (
    Dedup,
    Vec<(Origin, String, WireEvent)>,
    Result<(), super::dedup::DedupError>,
) {
    let result = dedup.filter(&mut chunk, &replays).await.map(drop);
    (dedup, chunk, result)
}

/// `items` in chunks of `size`, in order.
fn chunked<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut items = items.into_iter().peekable();
    let mut chunks = Vec::new();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(size).collect());
    }
    chunks
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, IngestRecord};
    use serde_json::value::RawValue;

    fn wire(id: &str) -> WireEvent {
        WireEvent {
            event_id: id.into(),
            name: "post_liked".into(),
            user_id: None,
            timestamp_ms: 1,
            properties: RawValue::from_string("{}".into()).unwrap(),
            context: RawValue::from_string("{}".into()).unwrap(),
            id_assigned: false,
        }
    }

    /// A record of `events` events read at `partition`/`offset`.
    fn received(partition: i32, offset: i64, events: usize) -> Received {
        let ids: Vec<WireEvent> = (0..events)
            .map(|i| wire(&format!("e{offset}.{i}")))
            .collect();
        let payload = IngestRecord::new("demo".into(), 1, ids).encode();
        Received {
            partition,
            offset,
            decoded: super::super::decode(partition, offset, Some(&payload)),
        }
    }

    fn processed(partitions: &[i32]) -> Processed {
        let kept = partitions
            .iter()
            .map(|&p| Kept {
                origin: Origin {
                    partition: p,
                    offset: 7,
                    index: 0,
                    received_ms: 1,
                },
                event: Event::from_wire("demo".into(), wire(&format!("k{p}"))),
                forwards: Vec::new(),
            })
            .collect();
        Processed {
            output: Batch {
                kept,
                ..Batch::default()
            },
            offsets: partitions.iter().map(|&p| (p, 8)).collect(),
            events: partitions.len(),
            plugin_time: Duration::ZERO,
            provenance: Provenance {
                pipeline: "p".into(),
                plugins: String::new(),
                control_version: 0,
                tables: Arc::from(Vec::new()),
            },
        }
    }

    #[test]
    fn a_revoked_partition_leaves_the_buffer_and_the_processed_batch() {
        let mut buf = Buffer::default();
        buf.add(received(0, 10, 2));
        buf.add(received(1, 20, 3));
        buf.processed = Some(processed(&[0, 1]));
        buf.forget(&HashSet::from([1]));
        assert_eq!(buf.len(), 2);
        assert_eq!(buf.next_offsets, BTreeMap::from([(0, 11)]));
        let p = buf.processed.as_ref().unwrap();
        assert_eq!(p.offsets, BTreeMap::from([(0, 8)]));
        assert!(p.output.kept.iter().all(|k| k.origin.partition == 0));
        assert_eq!(
            buf.forgotten,
            HashSet::from([1]),
            "the batch in flight drops it too"
        );
        assert!(!buf.is_empty());
    }

    #[test]
    fn an_abandoned_buffer_commits_nothing_read_later() {
        let mut buf = Buffer::default();
        buf.add(received(0, 10, 1));
        buf.processed = Some(processed(&[0]));
        buf.abandon();
        assert!(buf.is_empty() && buf.processed.is_none());
        buf.add(received(0, 11, 1));
        assert!(
            buf.is_empty(),
            "a record read after an abandoned flush is not buffered"
        );
    }

    #[test]
    fn early_records_count_their_events_and_drop_revoked_partitions() {
        let mut early = Early::default();
        for r in [received(0, 1, 100), received(1, 1, 1), received(0, 2, 5)] {
            early.events += r.events();
            early.records.push(r);
        }
        assert_eq!(early.events, 106);
        early.drop_partitions(&HashSet::from([0]));
        assert_eq!(early.events, 1);
        assert_eq!(early.records.len(), 1);
        let dead = Received {
            partition: 2,
            offset: 0,
            decoded: super::super::decode(2, 0, Some(b"not json")),
        };
        assert_eq!(dead.events(), 1, "an undecodable record is one dead letter");
    }

    #[test]
    fn chunks_keep_every_item_in_order() {
        let chunks = chunked((0..10).collect(), 4);
        assert_eq!(chunks.len(), 3);
        let mut all = Vec::new();
        for c in chunks {
            assert!(!c.is_empty() && c.len() <= 4);
            all.extend(c);
        }
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(chunked(Vec::<u8>::new(), 4).is_empty());
    }

    #[test]
    fn a_batch_processed_in_chunks_adds_up() {
        let mut done = processed(&[0]).output;
        done.rows.insert(1, Vec::new());
        done.dropped = 2;
        let mut later = processed(&[1, 2]).output;
        later.dropped = 1;
        later.rows.insert(0, Vec::new());
        done.append(later);
        assert_eq!(done.kept.len(), 3);
        assert_eq!(done.dropped, 3);
        assert_eq!(done.rows.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        let partitions: Vec<i32> = done.kept.iter().map(|k| k.origin.partition).collect();
        assert_eq!(partitions, vec![0, 1, 2], "kept in the order of the chunks");
    }
}
