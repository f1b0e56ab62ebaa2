//! Prometheus metrics, served at `GET /metrics` on the ingest and admin ports. Names follow
//! Prometheus' conventions: `weir_<noun>_<unit>`, counters end in `_total`. What weir
//! tells its operators about (a rebalance, a pause, a failover) is an internal event in
//! [`events`]: one type that writes the log line and updates the metric together.

pub mod events;

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    TextEncoder,
};

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    prometheus::register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    prometheus::register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    prometheus::register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    prometheus::register(Box::new(h.clone())).expect("metric registered once");
    h
}

/// Latency buckets from 100 us to 10 s.
fn latency() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.5, 12).expect("valid buckets")
}

pub static INGEST_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_ingest_requests_total",
        "POST /v1/events requests by HTTP status",
        &["status"],
    )
});
pub static INGEST_THROTTLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_ingest_throttled_requests_total",
        "POST /v1/events requests refused with 429 by app and the quota that refused them (app_events, app_bytes, key_events, key_bytes)",
        &["app", "limit"],
    )
});
pub static INGEST_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_ingest_events_total",
        "Events accepted (202) by app",
        &["app"],
    )
});
pub static HTTP_CONNECTIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "weir_http_connections",
        "Open HTTP connections, by server (ingest, admin)",
        &["server"],
    )
});
pub static HTTP_CONNECTIONS_SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_http_connections_shed_total",
        "Connections answered 503 and closed at once because the server was at its connection limit, by server",
        &["server"],
    )
});
pub static INGEST_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "weir_ingest_request_duration_seconds",
        "Time to answer POST /v1/events",
        latency(),
    )
});
pub static PRODUCE_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "weir_kafka_produce_duration_seconds",
        "Time from sending a request's record to Kafka's acknowledgement",
        latency(),
    )
});
pub static CONSUME_DELAY: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "weir_kafka_consume_delay_seconds",
        "Time from a record's Kafka timestamp (when ingest produced it) to the processor receiving it",
        latency(),
    )
});
pub static BATCH_EVENTS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "weir_processor_batch_events",
        "Events per processor flush",
        prometheus::exponential_buckets(1.0, 4.0, 10).expect("valid buckets"),
    )
});
pub static PLUGIN_CALL_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "weir_plugin_call_duration_seconds",
        "Time of one batch call into a plugin (including trap isolation)",
        &["plugin", "version"],
        latency(),
    )
});
pub static PLUGIN_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_plugin_events_total",
        "Events by plugin outcome: pass, keep, drop, reject, failed (trap or limit), quarantined",
        &["plugin", "version", "outcome"],
    )
});
pub static PLUGIN_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_plugin_failures_total",
        "Events a plugin failed on, by kind: deadline, memory_cap, stack_overflow, trap, bad_outcome, quarantined",
        &["plugin", "version", "kind"],
    )
});
pub static PLUGIN_COUNTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_plugin_counter_total",
        "What plugins count with the counter-add host import (at most 256 counters per plugin version)",
        &["plugin", "version", "counter"],
    )
});
pub static PLUGIN_QUARANTINED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "weir_plugin_quarantined",
        "1 while the plugin is quarantined",
        &["plugin", "version"],
    )
});
pub static SINK_FLUSH_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "weir_sink_flush_duration_seconds",
        "Time of one successful flush to a sink",
        &["sink"],
        latency(),
    )
});
pub static SINK_ROWS: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter_vec("weir_sink_rows_total", "Rows written, by table", &["table"]));
pub static SINK_FULL_WAIT: LazyLock<prometheus::Counter> = LazyLock::new(|| {
    let c = prometheus::Counter::new(
        "weir_processor_sink_full_wait_seconds_total",
        "Time the processor took no new batch because a sink held as much undelivered data as it may",
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("metric registered once");
    c
});

pub static PRODUCERS_REPLACED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_kafka_producers_replaced_total",
        "Kafka producers replaced after every send failed for a while (ingest, topic:<name>)",
        &["producer"],
    )
});

pub static SINK_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_sink_refusals_total",
        "Events a sink refused for good (sent to dead_letters with stage sink), by sink",
        &["sink"],
    )
});

pub static SINK_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_sink_errors_total",
        "Failed flush attempts (each is retried)",
        &["sink"],
    )
});
pub static REPLAYED_ROWS_SKIPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_replayed_rows_skipped_total",
        "Rows of replayed Kafka records that were already in ClickHouse",
    )
});
pub static DELIVERY_REPLAYS_SKIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_delivery_replays_skipped_total",
        "Events of replayed Kafka records a webhook or topic sink had delivered already, by sink",
        &["sink"],
    )
});
pub static STALE_OFFSETS_IGNORED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_stale_offsets_ignored_total",
        "Positions stored in Redis (counters applied, events delivered) that name a record their partition does not hold: from an earlier topic of the same name",
    )
});
pub static DEAD_LETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_dead_letters_total",
        "Events written to dead_letters, by stage",
        &["stage"],
    )
});

pub static FLUSH_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "weir_processor_flush_duration_seconds",
        "Time of one processor flush: the plugin chain, every sink's write (with retries) and the commit",
        latency(),
    )
});
pub static ASSIGNED_PARTITIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "weir_kafka_assigned_partitions",
        "Partitions of the events topic this instance owns in its consumer group",
    )
});
pub static REBALANCES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_kafka_rebalances_total",
        "Consumer-group rebalances seen by this instance, by kind (assigned, revoked, error)",
        &["kind"],
    )
});
pub static FLUSH_REVOCATIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_processor_flush_revocations_total",
        "Rebalances that took partitions from a flush under way (plugins running or writes failing; their events left to the new owner)",
    )
});
pub static UNDECODABLE_RECORDS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_processor_undecodable_records_total",
        "Kafka records that are not weir's record format (each goes to dead_letters)",
    )
});
pub static PROCESSOR_PAUSES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_processor_pauses_total",
        "Times consumption was paused because a sink did not accept a batch",
    )
});
pub static DEDUP_CHECKED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_dedup_checked_events_total",
        "Events checked against the deduplication window (those with a client's event id)",
    )
});
pub static DEDUP_DUPLICATES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_dedup_duplicates_total",
        "Events dropped because another Kafka record carried the same app and event_id within the window, by app",
        &["app"],
    )
});
pub static DEDUP_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "weir_dedup_duration_seconds",
        "Time of one deduplication check (one pipelined Redis round trip for a chunk of up to 4,096 events)",
        latency(),
    )
});
pub static DEDUP_UNCHECKED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_dedup_unchecked_events_total",
        "Events let through without a deduplication check while Redis did not answer (dedup.when_unavailable = \"pass\")",
    )
});
pub static DEDUP_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_dedup_errors_total",
        "Failed deduplication checks (each is retried with consumption paused)",
    )
});
pub static DEDUP_STATE_LOST: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_dedup_state_lost_total",
        "Times the deduplication state in Redis was found gone (flushed or evicted): copies sent before are not recognised",
    )
});
pub static PROCESSOR_PAUSED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "weir_processor_paused",
        "1 while consumption is paused because a sink does not accept the current batch",
    )
});
pub static CLICKHOUSE_FAILOVERS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_clickhouse_failovers_total",
        "Switches to the next ClickHouse endpoint after a failed operation",
    )
});
pub static CONSUMER_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "weir_consumer_lag_records",
        "Kafka records of an assigned partition not yet committed (end of log - committed offset)",
        &["partition"],
    )
});
pub static WEBHOOK_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_webhook_events_total",
        "Events handed to a webhook, by webhook and result (delivered, dead_letter)",
        &["webhook", "result"],
    )
});
pub static WEBHOOK_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "weir_webhook_pending_events",
        "Events queued for a webhook and not yet delivered",
        &["webhook"],
    )
});
pub static SCHEMA_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_schema_failures_total",
        "Events that failed their JSON Schema, by event name",
        &["event"],
    )
});
pub static COUNTER_INCREMENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_counter_increments_total",
        "Counter increments (one per event and count output) applied in Redis",
    )
});
pub static COUNTER_REPLAYS_SKIPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_counter_replayed_increments_skipped_total",
        "Increments of replayed Kafka records that Redis already held",
    )
});
pub static COUNTER_PENDING: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "weir_counter_pending_increments",
        "Counter increments waiting for Redis (non-zero while Redis is unreachable)",
    )
});

pub static CONTROL_VERSION: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "weir_control_version",
        "The control-plane version this instance runs",
    )
});

pub static CONTROL_CHANGES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "weir_control_changes_total",
        "Control-plane changes made through this instance's admin API",
    )
});

pub static CONTROL_SWAPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "weir_control_swaps_total",
        "Pipeline versions prepared for a hot swap, by result (swapped, failed)",
        &["result"],
    )
});

/// All metrics in Prometheus' text format.
pub fn render() -> String {
    // Touch every metric so that it is listed from the start, not after first use.
    LazyLock::force(&INGEST_REQUESTS);
    LazyLock::force(&INGEST_EVENTS);
    LazyLock::force(&INGEST_THROTTLED);
    LazyLock::force(&INGEST_DURATION);
    LazyLock::force(&HTTP_CONNECTIONS);
    LazyLock::force(&HTTP_CONNECTIONS_SHED);
    LazyLock::force(&PRODUCE_DURATION);
    LazyLock::force(&BATCH_EVENTS);
    LazyLock::force(&PLUGIN_CALL_DURATION);
    LazyLock::force(&PLUGIN_EVENTS);
    LazyLock::force(&PLUGIN_QUARANTINED);
    LazyLock::force(&SINK_FLUSH_DURATION);
    LazyLock::force(&SINK_ROWS);
    LazyLock::force(&SINK_ERRORS);
    LazyLock::force(&SINK_REFUSALS);
    LazyLock::force(&PRODUCERS_REPLACED);
    LazyLock::force(&SINK_FULL_WAIT);
    LazyLock::force(&REPLAYED_ROWS_SKIPPED);
    LazyLock::force(&DELIVERY_REPLAYS_SKIPPED);
    LazyLock::force(&STALE_OFFSETS_IGNORED);
    LazyLock::force(&DEAD_LETTERS);
    LazyLock::force(&PROCESSOR_PAUSED);
    LazyLock::force(&PROCESSOR_PAUSES);
    LazyLock::force(&DEDUP_CHECKED);
    LazyLock::force(&DEDUP_DUPLICATES);
    LazyLock::force(&DEDUP_ERRORS);
    LazyLock::force(&DEDUP_UNCHECKED);
    LazyLock::force(&DEDUP_DURATION);
    LazyLock::force(&DEDUP_STATE_LOST);
    LazyLock::force(&FLUSH_DURATION);
    LazyLock::force(&ASSIGNED_PARTITIONS);
    LazyLock::force(&REBALANCES);
    LazyLock::force(&FLUSH_REVOCATIONS);
    LazyLock::force(&UNDECODABLE_RECORDS);
    LazyLock::force(&CLICKHOUSE_FAILOVERS);
    LazyLock::force(&CONSUMER_LAG);
    LazyLock::force(&SCHEMA_FAILURES);
    LazyLock::force(&WEBHOOK_EVENTS);
    LazyLock::force(&WEBHOOK_PENDING);
    LazyLock::force(&COUNTER_INCREMENTS);
    LazyLock::force(&COUNTER_REPLAYS_SKIPPED);
    LazyLock::force(&COUNTER_PENDING);
    LazyLock::force(&CONTROL_VERSION);
    LazyLock::force(&CONTROL_CHANGES);
    LazyLock::force(&CONTROL_SWAPS);
    TextEncoder::new()
        .encode_to_string(&prometheus::gather())
        .unwrap_or_default()
}
