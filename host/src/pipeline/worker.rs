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
//!   skipped (checked only for offsets up to what ClickHouse held when this instance
//!   took the partition), so a replay does not write an event twice.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::Consumer as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{DeadLetter, Origin, Output, Pipeline};
use crate::bus::record::WireEvent;
use crate::bus::{self, Consumer};
use crate::config::ProcessorConfig;
use crate::sinks::clickhouse::{ClickHouseError, ClickHouseSink, Written};

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
    /// Per partition, the highest offset already in ClickHouse when this instance took
    /// the partition (`None`: nothing there). Loaded lazily; forgotten on revoke.
    watermarks: HashMap<i32, Option<i64>>,
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
            watermarks: HashMap::new(),
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
                    forget_revoked(&self.consumer, &mut self.watermarks, &mut buf);
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
        forget_revoked(&self.consumer, &mut self.watermarks, buf);
        if buf.is_empty() {
            return;
        }
        let events = std::mem::take(&mut buf.events);
        let count = events.len();
        crate::metrics::BATCH_EVENTS.observe(count as f64);
        let started = std::time::Instant::now();
        let mut output = self.pipeline.run(events).await;
        output.dead.append(&mut buf.undecodable);
        let plugin_time = started.elapsed();

        let mut backoff = Duration::from_millis(self.cfg.retry_backoff_ms);
        loop {
            let write_started = std::time::Instant::now();
            match self.write(&mut output).await {
                Ok(()) => {
                    crate::metrics::SINK_FLUSH_DURATION
                        .with_label_values(&["clickhouse"])
                        .observe(write_started.elapsed().as_secs_f64());
                    let m = &crate::metrics::SINK_ROWS;
                    m.with_label_values(&["events"])
                        .inc_by(output.kept.len() as u64);
                    m.with_label_values(&["dead_letters"])
                        .inc_by(output.dead.len() as u64);
                    for d in &output.dead {
                        crate::metrics::DEAD_LETTERS
                            .with_label_values(&[d.stage])
                            .inc();
                    }
                    break;
                }
                Err(e) => {
                    crate::metrics::SINK_ERRORS
                        .with_label_values(&["clickhouse"])
                        .inc();
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
        failpoint_after_write();
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

impl Worker {
    /// Skips rows a previous run already wrote, then writes the rest.
    async fn write(&mut self, output: &mut Output) -> Result<(), ClickHouseError> {
        self.skip_replayed(output).await?;
        self.sink
            .write(
                &output.kept,
                &output.dead,
                self.pipeline.name(),
                self.pipeline.versions(),
            )
            .await
    }

    async fn skip_replayed(&mut self, output: &mut Output) -> Result<(), ClickHouseError> {
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
        }
        if skipped > 0 {
            warn!(
                skipped,
                "skipped rows an earlier run already wrote (a replay after a crash)"
            );
        }
        Ok(())
    }
}

/// Fault injection for crash tests: with `WEIR_FAILPOINT=after_write:N` the process
/// aborts right after its Nth flush was written to ClickHouse and before the offsets
/// were committed: the window in which a crash makes Kafka replay written rows.
fn failpoint_after_write() {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static FLUSHES: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        std::env::var("WEIR_FAILPOINT")
            .ok()
            .and_then(|v| v.strip_prefix("after_write:")?.parse().ok())
    });
    if let Some(at) = at
        && FLUSHES.fetch_add(1, Ordering::SeqCst) + 1 == *at
    {
        error!("WEIR_FAILPOINT after_write:{at} reached: aborting");
        std::process::abort();
    }
}

/// Forgets what was buffered from, and known about, partitions just revoked.
fn forget_revoked(
    consumer: &Consumer,
    watermarks: &mut HashMap<i32, Option<i64>>,
    buf: &mut Buffer,
) {
    let revoked = consumer.context().take_revoked();
    for p in &revoked {
        watermarks.remove(p);
    }
    buf.forget(&revoked);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
