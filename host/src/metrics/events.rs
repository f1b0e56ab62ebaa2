//! Internal events: what weir tells its operators, each as one type whose `emit` writes
//! the log line and updates the metric together (vector's `internal_events`). A test
//! or a dashboard waits on the metric; the log line's wording can change freely.
//!
//! Emit an event where it happens: `PartitionsAssigned { partitions: &parts }.emit()`.

use std::fmt::Display;
use std::time::Duration;

use tracing::{error, info, warn};

use super::*;

/// Something worth telling an operator: a log line and the metrics that count it.
pub trait InternalEvent {
    fn emit(self);
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// The group coordinator gave this instance partitions.
pub struct PartitionsAssigned<'a> {
    pub partitions: &'a [i32],
}

impl InternalEvent for PartitionsAssigned<'_> {
    fn emit(self) {
        info!(partitions = ?self.partitions, "partitions assigned");
        ASSIGNED_PARTITIONS.add(self.partitions.len() as i64);
        REBALANCES.with_label_values(&["assigned"]).inc();
    }
}

/// The group coordinator took partitions from this instance.
pub struct PartitionsRevoked<'a> {
    pub partitions: &'a [i32],
}

impl InternalEvent for PartitionsRevoked<'_> {
    fn emit(self) {
        info!(partitions = ?self.partitions, "partitions revoked");
        ASSIGNED_PARTITIONS.sub(self.partitions.len() as i64);
        REBALANCES.with_label_values(&["revoked"]).inc();
    }
}

/// A rebalance failed (librdkafka retries it).
pub struct RebalanceFailed<'a> {
    pub error: &'a dyn Display,
}

impl InternalEvent for RebalanceFailed<'_> {
    fn emit(self) {
        warn!(error = %self.error, "rebalance error");
        REBALANCES.with_label_values(&["error"]).inc();
    }
}

/// The processor waited for sinks that held as much undelivered data as they may
/// (`redis.max_pending`, a webhook's `max_pending`) before it took a new batch.
pub struct SinksCaughtUp {
    pub waited: Duration,
}

impl InternalEvent for SinksCaughtUp {
    fn emit(self) {
        warn!(
            waited_ms = self.waited.as_millis() as u64,
            "a sink held as much undelivered data as it may (redis.max_pending, a webhook's max_pending): the pipeline waited for it, polling Kafka with consumption paused"
        );
        SINK_FULL_WAIT.inc_by(self.waited.as_secs_f64());
    }
}

/// A Kafka producer that kept failing was replaced by a new one (a new producer id).
pub struct ProducerReplaced<'a> {
    pub producer: &'a str,
    pub failing_for: Duration,
    pub error: &'a dyn Display,
}

impl InternalEvent for ProducerReplaced<'_> {
    fn emit(self) {
        warn!(
            producer = self.producer,
            failing_for_ms = self.failing_for.as_millis() as u64,
            error = %self.error,
            "every Kafka send failed for a while; replaced the producer with a new one (the broker may have forgotten its producer id)"
        );
        PRODUCERS_REPLACED.with_label_values(&[self.producer]).inc();
    }
}

/// A rebalance took partitions from a flush under way (its plugins running, or its
/// writes failing): their events were taken out of the batch and are left to the
/// partitions' new owner.
pub struct RevokedMidFlush<'a> {
    pub partitions: &'a [i32],
}

impl InternalEvent for RevokedMidFlush<'_> {
    fn emit(self) {
        warn!(partitions = ?self.partitions, "partitions revoked during a flush: their events are left to the new owner");
        FLUSH_REVOCATIONS.inc();
    }
}

/// A Kafka record that is not weir's format went to the dead letters.
pub struct UndecodableRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

impl InternalEvent for UndecodableRecord<'_> {
    fn emit(self) {
        warn!(partition = self.partition, offset = self.offset, reason = %self.reason,
            "undecodable Kafka record sent to dead letters");
        UNDECODABLE_RECORDS.inc();
    }
}

/// Every sink took a batch and its offsets were committed (as far as the sinks allow).
pub struct BatchFlushed {
    pub events: usize,
    pub kept: usize,
    pub routed_rows: usize,
    pub increments: usize,
    pub dead_letters: usize,
    pub dropped: usize,
    pub plugin_time: Duration,
    pub total_time: Duration,
}

impl InternalEvent for BatchFlushed {
    fn emit(self) {
        info!(
            events = self.events,
            kept = self.kept,
            routed_rows = self.routed_rows,
            increments = self.increments,
            dead_letters = self.dead_letters,
            dropped = self.dropped,
            plugin_ms = millis(self.plugin_time),
            total_ms = millis(self.total_time),
            "batch flushed"
        );
        BATCH_EVENTS.observe(self.events as f64);
        FLUSH_DURATION.observe(self.total_time.as_secs_f64());
    }
}

/// A sink did not take a batch; the worker retries it after `retry_in`.
pub struct SinkWriteFailed<'a> {
    pub sink: &'static str,
    pub error: &'a dyn Display,
    pub retry_in: Duration,
}

impl InternalEvent for SinkWriteFailed<'_> {
    fn emit(self) {
        error!(sink = self.sink, error = %self.error, retry_in_ms = millis(self.retry_in),
            "a sink did not take the batch; retrying");
        SINK_ERRORS.with_label_values(&[self.sink]).inc();
    }
}

/// Consumption paused: a sink does not take the current batch; the consumer keeps
/// polling with every partition paused, so the instance stays in its group.
pub struct ConsumptionPaused {
    pub partitions: usize,
}

impl InternalEvent for ConsumptionPaused {
    fn emit(self) {
        warn!(
            partitions = self.partitions,
            "consumption paused until the sinks accept the batch (still polling to stay in the group)"
        );
        PROCESSOR_PAUSED.set(1);
        PROCESSOR_PAUSES.inc();
    }
}

/// A whole batch has waited for the pipeline longer than `after` (long plugin work):
/// consumption is paused so that the consumer can poll on without reading more.
pub struct LongPipelineWait {
    pub waiting: usize,
    pub after: Duration,
}

impl InternalEvent for LongPipelineWait {
    fn emit(self) {
        info!(
            waiting = self.waiting,
            after_ms = millis(self.after),
            "a whole batch waits for the pipeline: consumption paused (still polling to stay in the group)"
        );
    }
}

/// Consumption resumed after a pause.
pub struct ConsumptionResumed;

impl InternalEvent for ConsumptionResumed {
    fn emit(self) {
        info!("consumption resumed");
        PROCESSOR_PAUSED.set(0);
    }
}

/// An operation on a ClickHouse endpoint failed; the next one is used from now on.
pub struct ClickHouseFailover<'a> {
    pub from: &'a str,
    pub to: &'a str,
}

impl InternalEvent for ClickHouseFailover<'_> {
    fn emit(self) {
        warn!(from = %self.from, to = %self.to, "ClickHouse endpoint failed; failing over");
        CLICKHOUSE_FAILOVERS.inc();
    }
}

/// A sink refused events of a flush for good: they go to `dead_letters` (stage
/// `sink`) and the partition goes on.
pub struct EventsRefused<'a> {
    /// `clickhouse:<table>`, `topic:<name>`, `counter:<name>`.
    pub sink: &'a str,
    pub events: usize,
    /// The first refusal's reason.
    pub reason: &'a str,
}

impl InternalEvent for EventsRefused<'_> {
    fn emit(self) {
        warn!(
            sink = self.sink,
            events = self.events,
            reason = self.reason,
            "a sink refused events for good; they go to dead_letters (stage sink)"
        );
        SINK_REFUSALS
            .with_label_values(&[self.sink])
            .inc_by(self.events as u64);
    }
}

/// A part of weir (the processor, the control agent, the ingest server) ended before
/// the shutdown signal: weir stops, with an error, so that its supervisor restarts it.
pub struct PartStopped<'a> {
    pub part: &'static str,
    pub why: &'a str,
}

impl InternalEvent for PartStopped<'_> {
    fn emit(self) {
        error!(
            part = self.part,
            why = self.why,
            "stopped before the shutdown signal; weir stops"
        );
    }
}

/// The processor stopped gracefully: what the sinks delivered is committed; the
/// partitions still held have events the next owner delivers again.
pub struct ShutdownDrained {
    pub undelivered_partitions: usize,
}

impl InternalEvent for ShutdownDrained {
    fn emit(self) {
        if self.undelivered_partitions == 0 {
            info!("every sink delivered what it held; everything is committed");
        } else {
            warn!(
                partitions = self.undelivered_partitions,
                "processor.drain_timeout_ms passed with events undelivered; they stay uncommitted and are delivered again by the next owner"
            );
        }
    }
}

/// Rows of a replayed Kafka record that ClickHouse already held were not written again.
pub struct ReplayedRowsSkipped {
    pub rows: usize,
}

impl InternalEvent for ReplayedRowsSkipped {
    fn emit(self) {
        warn!(
            skipped = self.rows,
            "skipped rows an earlier run already wrote (a replay after a crash)"
        );
        REPLAYED_ROWS_SKIPPED.inc_by(self.rows as u64);
    }
}

/// Events of replayed Kafka records that a webhook or topic sink had delivered
/// already (its marks were past them) were not delivered again.
pub struct ReplayedDeliveriesSkipped<'a> {
    /// `webhook:<name>` or `topic:<name>`.
    pub sink: &'a str,
    pub events: u64,
}

impl InternalEvent for ReplayedDeliveriesSkipped<'_> {
    fn emit(self) {
        warn!(
            sink = self.sink,
            skipped = self.events,
            "skipped events this sink delivered before (a replay after a crash or a rebalance)"
        );
        DELIVERY_REPLAYS_SKIPPED
            .with_label_values(&[self.sink])
            .inc_by(self.events);
    }
}

/// A position a sink stored of a partition (counters applied, events delivered) names
/// a record the partition's log does not hold (past its end, or another record
/// there): it is from an earlier topic of the same name, and is ignored.
pub struct StaleOffsetIgnored<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub stored: i64,
    /// The log's end, when the position is past it.
    pub end: Option<i64>,
}

impl InternalEvent for StaleOffsetIgnored<'_> {
    fn emit(self) {
        warn!(
            topic = self.topic,
            partition = self.partition,
            stored = self.stored,
            log_end = ?self.end,
            "a stored position names a record this topic does not hold: the topic was created again since; its records are not taken for replays"
        );
        STALE_OFFSETS_IGNORED.inc();
    }
}

/// Counter increments of a replayed Kafka record that Redis already held were not
/// applied again.
pub struct ReplayedIncrementsSkipped {
    pub increments: usize,
}

impl InternalEvent for ReplayedIncrementsSkipped {
    fn emit(self) {
        warn!(
            skipped = self.increments,
            "skipped counter increments Redis already held (a replay after a crash)"
        );
        COUNTER_REPLAYS_SKIPPED.inc_by(self.increments as u64);
    }
}

/// Applying counter increments to Redis failed; they stay pending (the commits of their
/// partitions held back) and are tried again after `retry_in`.
pub struct CounterWriteFailed<'a> {
    pub error: &'a dyn Display,
    pub retry_in: Duration,
}

impl InternalEvent for CounterWriteFailed<'_> {
    fn emit(self) {
        warn!(error = %self.error, retry_in_ms = millis(self.retry_in),
            "counter write to Redis failed; ClickHouse writes go on, Kafka offsets of the partitions involved are held");
        SINK_ERRORS.with_label_values(&["redis"]).inc();
    }
}

/// Pending counter increments reached Redis after failed attempts.
pub struct CounterWriteRecovered;

impl InternalEvent for CounterWriteRecovered {
    fn emit(self) {
        info!("counter increments reached Redis again; held offsets released");
    }
}

/// A webhook POST failed in a way worth retrying.
pub struct WebhookAttemptFailed<'a> {
    pub webhook: &'a str,
    pub attempt: u32,
    pub error: &'a str,
    pub retry_in: Duration,
}

impl InternalEvent for WebhookAttemptFailed<'_> {
    fn emit(self) {
        warn!(webhook = %self.webhook, attempt = self.attempt, error = %self.error,
            retry_in_ms = millis(self.retry_in), "webhook POST failed; retrying");
        SINK_ERRORS.with_label_values(&["webhook"]).inc();
    }
}

/// A webhook refused events, or its attempts ran out: they go to the dead letters.
pub struct WebhookGaveUp<'a> {
    pub webhook: &'a str,
    pub events: usize,
    pub reason: &'a str,
}

impl InternalEvent for WebhookGaveUp<'_> {
    fn emit(self) {
        error!(webhook = %self.webhook, events = self.events, reason = %self.reason,
            "webhook gave up; events go to dead_letters");
        WEBHOOK_EVENTS
            .with_label_values(&[self.webhook, "dead_letter"])
            .inc_by(self.events as u64);
    }
}

/// A plugin failed on too many calls in a row and is skipped (or its events dead
/// lettered, per its policy) for a while.
pub struct PluginQuarantined<'a> {
    pub plugin: &'a str,
    pub version: &'a str,
    pub failing_calls: u32,
    pub policy: &'a dyn std::fmt::Debug,
    pub duration: Duration,
    pub last_failure: &'a str,
}

impl InternalEvent for PluginQuarantined<'_> {
    fn emit(self) {
        warn!(
            plugin = %self.plugin,
            version = %self.version,
            failing_calls = self.failing_calls,
            policy = ?self.policy,
            seconds = self.duration.as_secs(),
            last_failure = %self.last_failure,
            "plugin quarantined"
        );
        PLUGIN_QUARANTINED
            .with_label_values(&[self.plugin, self.version])
            .set(1);
    }
}

/// A quarantined plugin ran a call without failing: it is out of quarantine.
pub struct PluginReleased<'a> {
    pub plugin: &'a str,
    pub version: &'a str,
}

impl InternalEvent for PluginReleased<'_> {
    fn emit(self) {
        info!(plugin = %self.plugin, version = %self.version, "plugin out of quarantine");
        PLUGIN_QUARANTINED
            .with_label_values(&[self.plugin, self.version])
            .set(0);
    }
}

/// A new control-plane version's pipeline was built beside the running one; the worker
/// swaps it in between two batches.
pub struct PipelinePrepared<'a> {
    pub control_version: u64,
    pub pipeline: &'a str,
    pub pipeline_version: u32,
    pub plugins: &'a str,
    pub prepare_time: Duration,
}

impl InternalEvent for PipelinePrepared<'_> {
    fn emit(self) {
        info!(
            version = self.control_version,
            pipeline = %self.pipeline,
            pipeline_version = self.pipeline_version,
            plugins = %self.plugins,
            prepare_ms = millis(self.prepare_time),
            "new pipeline prepared; swapping between batches"
        );
        CONTROL_SWAPS.with_label_values(&["swapped"]).inc();
    }
}

/// A new control-plane version's pipeline could not be built; the instance keeps
/// running the previous one.
pub struct SwapRefused<'a> {
    pub error: &'a str,
}

impl InternalEvent for SwapRefused<'_> {
    fn emit(self) {
        warn!(error = %self.error, "hot swap refused");
        CONTROL_SWAPS.with_label_values(&["failed"]).inc();
    }
}

/// Events dropped as copies: another Kafka record carried the same app and event id
/// within the deduplication window.
pub struct DuplicatesDropped<'a> {
    pub app: &'a str,
    pub events: usize,
}

impl InternalEvent for DuplicatesDropped<'_> {
    fn emit(self) {
        info!(app = %self.app, events = self.events, "dropped events already received (client resends)");
        DEDUP_DUPLICATES
            .with_label_values(&[self.app])
            .inc_by(self.events as u64);
    }
}

/// The deduplication check failed; the flush retries it after `retry_in` with
/// consumption paused.
pub struct DedupCheckFailed<'a> {
    pub error: &'a dyn Display,
    pub retry_in: Duration,
}

impl InternalEvent for DedupCheckFailed<'_> {
    fn emit(self) {
        error!(error = %self.error, retry_in_ms = millis(self.retry_in),
            "deduplication check failed; retrying");
        DEDUP_ERRORS.inc();
    }
}

/// No deduplication state was found in Redis at this instance's first check: the
/// window starts now (a first start, or a Redis emptied while no instance ran).
pub struct DedupWindowStarted {
    pub window_secs: u64,
}

impl InternalEvent for DedupWindowStarted {
    fn emit(self) {
        info!(
            window_secs = self.window_secs,
            "deduplication window starts now (no earlier state in Redis)"
        );
    }
}

/// The deduplication state disappeared from Redis while this instance ran (flushed, or
/// evicted under maxmemory): until the window fills again, a copy of an event sent
/// before is written again (at least once; nothing is lost).
pub struct DedupStateLost {
    pub window_secs: u64,
}

impl InternalEvent for DedupStateLost {
    fn emit(self) {
        warn!(
            window_secs = self.window_secs,
            "deduplication state lost in Redis: copies of events sent before now are not recognised (at least once until the window refills)"
        );
        DEDUP_STATE_LOST.inc();
    }
}

/// A flush's events went on without a deduplication check, Redis not answering
/// (`dedup.when_unavailable = "pass"`): a copy among them is stored again.
pub struct DedupSkipped {
    pub events: usize,
}

impl InternalEvent for DedupSkipped {
    fn emit(self) {
        warn!(
            events = self.events,
            "events passed without a deduplication check (Redis unavailable, dedup.when_unavailable = \"pass\")"
        );
        DEDUP_UNCHECKED.inc_by(self.events as u64);
    }
}
