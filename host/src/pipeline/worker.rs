//! The processor loop: consume, buffer, run the pipeline, hand the batch to every
//! sink, commit.
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
    RevokedMidFlush, ShutdownDrained, SinkWriteFailed, SinksCaughtUp, UndecodableRecord,
};
use crate::model::{Batch, DeadLetter, Kept, Origin, Stage, WireEvent};
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

/// How often held-back offsets are tried again while no batch commits them.
const HELD_RETRY: Duration = Duration::from_millis(500);

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
}

impl Buffer {
    /// Decodes a record into the buffer (or its dead letter, if it is not weir's).
    fn add(&mut self, partition: i32, offset: i64, payload: Option<&[u8]>) {
        match super::decode(partition, offset, payload) {
            Ok(decoded) => {
                if decoded.replay {
                    self.replays.insert((partition, offset));
                }
                self.events.extend(decoded.events);
            }
            Err(dead) => {
                UndecodableRecord {
                    partition,
                    offset,
                    reason: &dead.reason,
                }
                .emit();
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
        self.replays.retain(|(p, _)| !partitions.contains(p));
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

/// The processor of one instance.
pub struct Worker {
    consumer: Consumer,
    topic: String,
    pipeline: Pipeline,
    /// Every sink, each driven through the same contract.
    sinks: Vec<Box<dyn Sink>>,
    cfg: ProcessorConfig,
    /// Next offsets of flushed batches not committed yet, because a sink still holds
    /// events of the partition undelivered.
    held: BTreeMap<i32, i64>,
    /// Records received while a failing flush polled with its partitions paused; they
    /// are buffered once the flush is done.
    early: Vec<rdkafka::message::OwnedMessage>,
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
            pipeline,
            sinks,
            cfg,
            held: BTreeMap::new(),
            early: Vec::new(),
            swaps: None,
            running: None,
            shared_routes: None,
            dedup: None,
        }
    }

    /// Drops copies of events already received within `dedup`'s window before they
    /// reach the pipeline.
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
        match swap.pipeline {
            Some(pipeline) => {
                let old = self.pipeline.tag();
                self.pipeline = pipeline;
                if let Some(shared) = &self.shared_routes {
                    let routes = self.pipeline.routes();
                    let mut current = shared.write().expect("routes lock");
                    if !Arc::ptr_eq(&current, routes) {
                        *current = routes.clone();
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
        info!(pipeline = %self.pipeline.name(), plugins = %self.pipeline.versions(), "processor started");
        loop {
            // Records that arrived while a flush ran (its plugins, its retries) join the
            // buffer before anything waits: nothing may wake the loop for them later.
            loop {
                for m in std::mem::take(&mut self.early) {
                    buf.add(m.partition(), m.offset(), m.payload());
                }
                if buf.len() < self.cfg.flush_max_events || *shutdown.borrow() {
                    break;
                }
                self.flush(&mut buf, &mut shutdown).await;
            }
            if *shutdown.borrow() {
                break;
            }
            let deadline = buf.since.map(|t| t + interval);
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

    /// Processes the buffer and hands it to every sink, retrying until each took it,
    /// then commits its offsets as far as the sinks allow. Gives up (without
    /// committing) only on shutdown.
    async fn flush(&mut self, buf: &mut Buffer, shutdown: &mut watch::Receiver<bool>) {
        self.forget_revoked(buf);
        if buf.is_empty() {
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
        let mut events = std::mem::take(&mut buf.events);
        let replays = std::mem::take(&mut buf.replays);
        if !self.deduplicate(&mut events, &replays, buf, shutdown).await {
            warn!(
                events = events.len(),
                "shutdown during a failing deduplication check: offsets not committed, the events will be re-read"
            );
            buf.next_offsets.clear();
            buf.since = None;
            return;
        }
        let count = events.len();
        let started = std::time::Instant::now();
        let (mut output, gone) = self.run_polling(events).await;
        self.forget_partitions(&gone, buf);
        output.dead.append(&mut buf.undecodable);
        let plugin_time = started.elapsed();

        let (mut written, revoked, refused) = self.write_until_acked(&mut output, shutdown).await;
        // Partitions revoked while the flush polled: their rows were taken out of the
        // batch before the next attempt; drop what else this instance knew of them.
        self.forget_partitions(&revoked, buf);
        if written && !refused.is_empty() {
            written = self.set_aside(&output, refused, buf, shutdown).await;
        }
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
        let offsets = std::mem::take(&mut buf.next_offsets);
        buf.since = None;
        self.commit(offsets);
        BatchFlushed {
            events: count,
            kept: output.kept.len(),
            routed_rows: output.rows.values().map(Vec::len).sum::<usize>(),
            increments: output.counts.len(),
            dead_letters: output.dead.len(),
            dropped: output.dropped,
            plugin_time,
            total_time: started.elapsed(),
        }
        .emit();
    }

    /// Runs the pipeline on `events` while the consumer keeps polling (heartbeats,
    /// rebalances; the records that arrive wait in `early`, and consumption pauses
    /// once `flush_max_events` of them wait), so that plugin work of any length does
    /// not get the instance evicted from its group (`max.poll.interval.ms`) while it
    /// still holds the batch. The events of partitions revoked meanwhile are taken out
    /// of the output (their new owner re-reads them); returns those partitions too.
    async fn run_polling(
        &mut self,
        events: Vec<(Origin, String, WireEvent)>,
    ) -> (Batch, HashSet<i32>) {
        let mut revoked = HashSet::new();
        let mut paused = None;
        let mut output = {
            let run = self.pipeline.run(events);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    biased;
                    output = &mut run => break output,
                    msg = self.consumer.recv() => {
                        absorb_revoked(&self.consumer, &mut self.early, &mut revoked);
                        match msg {
                            Ok(m) => self.early.push(m.detach()),
                            Err(e) => warn!(error = %e, "Kafka consume error during plugin work"),
                        }
                        if paused.is_none() && self.early.len() >= self.cfg.flush_max_events {
                            paused = pause(&self.consumer);
                        }
                    }
                }
            }
        };
        absorb_revoked(&self.consumer, &mut self.early, &mut revoked);
        output.drop_partitions(&revoked);
        if let Some(list) = paused {
            self.resume(&list);
        }
        (output, revoked)
    }

    /// Dead-letters the kept events of `output` that sinks refused for good (stage
    /// `sink`), through every sink like any flush, so that their offsets can be
    /// committed. False if shutdown came first (nothing is committed; the replay
    /// refuses them again).
    async fn set_aside(
        &mut self,
        output: &Batch,
        refused: Vec<Refusal>,
        buf: &mut Buffer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut aside = Batch {
            dead: refused_dead_letters(&output.kept, refused),
            ..Batch::default()
        };
        let (written, revoked, again) = self.write_until_acked(&mut aside, shutdown).await;
        self.forget_partitions(&revoked, buf);
        if !again.is_empty() {
            // The contract: only kept events are refused.
            error!(
                refusals = again.len(),
                "a sink refused dead letters; they stay only in this log: {again:?}"
            );
        }
        written
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
        shutdown: &mut watch::Receiver<bool>,
    ) -> (bool, HashSet<i32>, Vec<Refusal>) {
        let mut backoff = Duration::from_millis(self.cfg.retry_backoff_ms);
        let mut taken = vec![false; self.sinks.len()];
        let mut paused = None;
        let mut revoked = HashSet::new();
        let mut refused = Vec::new();
        let timeout = Duration::from_millis(self.cfg.write_timeout_ms);
        let written = loop {
            let flush = Flush {
                batch: output,
                pipeline: self.pipeline.name(),
                plugins: self.pipeline.versions(),
                control_version: self.pipeline.tag().control_version,
                tables: &self.pipeline.routes().tables,
            };
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
                    // A rebalance is served inside `recv` before the record it
                    // returns: what was received earlier from a revoked partition is
                    // stale, `msg` is not.
                    absorb_revoked(&self.consumer, &mut self.early, &mut revoked);
                    match msg {
                        Ok(m) => self.early.push(m.detach()),
                        Err(e) => warn!(error = %e, "Kafka consume error while paused"),
                    }
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
        pause(&self.consumer)
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
    ConsumptionPaused {
        partitions: list.count(),
    }
    .emit();
    Some(list)
}

/// Takes the partitions revoked since the last look out of the records received
/// meanwhile; adds them to `revoked`.
fn absorb_revoked(
    consumer: &Consumer,
    early: &mut Vec<rdkafka::message::OwnedMessage>,
    revoked: &mut HashSet<i32>,
) {
    let gone = consumer.context().take_revoked();
    if gone.is_empty() {
        return;
    }
    let mut list: Vec<i32> = gone.iter().copied().collect();
    list.sort_unstable();
    RevokedMidFlush { partitions: &list }.emit();
    early.retain(|m| !gone.contains(&m.partition()));
    revoked.extend(gone);
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
