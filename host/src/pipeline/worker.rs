//! The processor loop: consume, buffer, run the pipeline, write the sinks, commit.
//!
//! At-least-once, done so that nothing is lost and, with one consumer per partition,
//! nothing is written twice:
//! - offsets are committed (synchronously) only after ClickHouse acknowledged every
//!   row the batch produced;
//! - a failed insert is retried with backoff, and the offsets do not move meanwhile;
//! - when a rebalance revokes partitions, whatever was buffered from them and not yet
//!   written is dropped: the new owner re-reads it from the committed offset;
//! - on shutdown the buffer is flushed and committed before the consumer leaves.

use std::collections::{BTreeMap, HashSet};

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::Consumer as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{DeadLetter, Origin, Pipeline};
use crate::bus::record::WireEvent;
use crate::bus::{self, Consumer};
use crate::config::ProcessorConfig;
use crate::sinks::clickhouse::ClickHouseSink;

/// Longest pause between retries of a failed flush.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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

/// The processor of one instance.
pub struct Worker {
    consumer: Consumer,
    topic: String,
    pipeline: Pipeline,
    sink: ClickHouseSink,
    cfg: ProcessorConfig,
}

impl Worker {
    pub fn new(
        consumer: Consumer,
        topic: String,
        pipeline: Pipeline,
        sink: ClickHouseSink,
        cfg: ProcessorConfig,
    ) -> Self {
        Self {
            consumer,
            topic,
            pipeline,
            sink,
            cfg,
        }
    }

    /// Runs until `shutdown` turns true, then flushes, commits and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut buf = Buffer::default();
        let interval = Duration::from_millis(self.cfg.flush_interval_ms);
        info!(pipeline = %self.pipeline.name(), plugins = %self.pipeline.versions(), "processor started");
        loop {
            let deadline = buf.since.map(|t| t + interval);
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = sleep_until(deadline) => {
                    self.flush(&mut buf, &mut shutdown).await;
                }
                msg = self.consumer.recv() => {
                    buf.forget(&self.consumer.context().take_revoked());
                    match msg {
                        Ok(m) => {
                            let (partition, offset) = (m.partition(), m.offset());
                            match super::decode(partition, offset, m.payload()) {
                                Ok(events) => buf.events.extend(events),
                                Err(dead) => {
                                    warn!(partition, offset, reason = %dead.reason, "undecodable Kafka record sent to dead letters");
                                    buf.undecodable.push(*dead);
                                }
                            }
                            buf.next_offsets.insert(partition, offset + 1);
                            buf.since.get_or_insert_with(Instant::now);
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
        buf.forget(&self.consumer.context().take_revoked());
        if buf.is_empty() {
            return;
        }
        let events = std::mem::take(&mut buf.events);
        let count = events.len();
        let started = std::time::Instant::now();
        let mut output = self.pipeline.run(events).await;
        output.dead.append(&mut buf.undecodable);
        let plugin_time = started.elapsed();

        let mut backoff = Duration::from_millis(self.cfg.retry_backoff_ms);
        loop {
            match self
                .sink
                .write(
                    &output.kept,
                    &output.dead,
                    self.pipeline.name(),
                    self.pipeline.versions(),
                )
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "flush to ClickHouse failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {
                            warn!(events = count, "shutdown during a failing flush: offsets not committed, the events will be re-read");
                            buf.next_offsets.clear();
                            buf.since = None;
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // Rebalance callbacks run only inside `recv`, so every partition we wrote for is
        // still ours: the commit below cannot be refused for ownership.
        let offsets = std::mem::take(&mut buf.next_offsets);
        buf.since = None;
        if let Err(e) = bus::commit(&self.consumer, &self.topic, offsets) {
            warn!(error = %e, "offset commit failed; the batch may be re-read after a restart");
        }
        info!(
            events = count,
            kept = output.kept.len(),
            dead_letters = output.dead.len(),
            dropped = output.dropped,
            plugin_ms = plugin_time.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "batch flushed"
        );
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
