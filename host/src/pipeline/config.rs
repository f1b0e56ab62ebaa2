//! `[processor]` and `[pipeline]`: batching and flushing, and the plugin chain every event runs through.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::model::Limits;
use crate::sinks::clickhouse::TableConfig;
use crate::sinks::counters::CounterConfig;
use crate::sinks::topic::TopicConfig;
use crate::sinks::webhook::WebhookConfig;

/// `[processor]`: how consumed events are batched into ClickHouse.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// Run the processor (consume, plugins, sinks) in this instance. Default true.
    pub enabled: bool,
    /// Flush when this many events are buffered. Default 10000. Up to three batches
    /// are in memory at once: one written, the next processed, and what is read
    /// meanwhile (consumption pauses when that reaches this many events).
    pub flush_max_events: usize,
    /// Flush at least this often while events are buffered, in milliseconds. Default 1000.
    pub flush_interval_ms: u64,
    /// Events per plugin call. Default 256.
    pub plugin_batch_size: usize,
    /// Lanes a batch is spread over: each has its own instance of every plugin, and
    /// all the events of one partition go to one lane, so the plugins of different
    /// partitions run on different cores at once. Default: one per CPU core (at most
    /// 8); 1-64.
    pub plugin_lanes: Option<usize>,
    /// Delay before retrying a failed ClickHouse insert, in milliseconds (doubles up to
    /// 30 s). The batch is retried until it succeeds; offsets do not move meanwhile.
    /// Default 500.
    pub retry_backoff_ms: u64,
    /// On a graceful stop (SIGTERM), how long the processor waits, after its last
    /// flush, for the sinks that deliver on their own (webhooks, counters waiting for
    /// Redis) to deliver what they hold, committing as they do, in milliseconds.
    /// What is still undelivered then is not committed: the next owner of the
    /// partition delivers it again (at least once). Keep it below the grace period
    /// of whatever stops weir (Kubernetes: 30 s). Default 15000; at most 600000.
    pub drain_timeout_ms: u64,
    /// Longest one write attempt of a sink may take (an INSERT whose answer does not
    /// come, a broker that does not acknowledge), in milliseconds: the attempt is then
    /// abandoned and retried like a failed one, with consumption paused and the
    /// consumer polling. Keep it below `max.poll.interval.ms` (librdkafka's default
    /// is 300 s): no poll happens during an attempt. Default 60000; 100-600000.
    pub write_timeout_ms: u64,
}

/// The range of [`ProcessorConfig::write_timeout_ms`].
pub const WRITE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=600_000;

/// Longest [`ProcessorConfig::drain_timeout_ms`].
pub const MAX_DRAIN_TIMEOUT_MS: u64 = 600_000;

/// Longest pause between two retries (of a failed flush, of a deduplication check):
/// `retry_backoff_ms` doubles up to it.
pub const MAX_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_max_events: 10_000,
            flush_interval_ms: 1000,
            plugin_batch_size: 256,
            plugin_lanes: None,
            retry_backoff_ms: 500,
            drain_timeout_ms: 15_000,
            write_timeout_ms: 60_000,
        }
    }
}

impl ProcessorConfig {
    /// `plugin_lanes`, or one lane per CPU core this process may use (at most
    /// [`DEFAULT_MAX_LANES`]).
    pub fn lanes(&self) -> usize {
        self.plugin_lanes.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(DEFAULT_MAX_LANES)
        })
    }
}

/// Most lanes [`ProcessorConfig::lanes`] picks by itself.
pub const DEFAULT_MAX_LANES: usize = 8;

/// `[pipeline]`: the plugin chain every event runs through, in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Name of the pipeline, recorded with each row (`pipeline` column). Default `default`.
    pub name: String,
    /// Names of the events that go through the schemas and the plugin chain; other
    /// events are written to `events` untouched. Default: every event.
    pub events: Vec<String>,
    /// The plugins, in the order they run.
    #[serde(rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    /// Typed ClickHouse tables plugins route rows to.
    #[serde(rename = "table")]
    pub tables: Vec<TableConfig>,
    /// Counters plugins increment (kept in Redis).
    #[serde(rename = "counter")]
    pub counters: Vec<CounterConfig>,
    /// JSON Schemas events are validated against before the plugins run.
    #[serde(rename = "schema")]
    pub schemas: Vec<SchemaConfig>,
    /// HTTP endpoints kept events of chosen names are POSTed to.
    #[serde(rename = "webhook")]
    pub webhooks: Vec<WebhookConfig>,
    /// Kafka topics kept events of chosen names are forwarded to.
    #[serde(rename = "topic")]
    pub topics: Vec<TopicConfig>,
}

/// `[[pipeline.schema]]`: a JSON Schema for the events of one name. The schema sees
/// the event as `{"event_id", "name", "user_id", "timestamp" (epoch ms), "properties",
/// "context"}`; an event that fails goes to the dead letters (stage `schema`) with the
/// JSON pointer and message of each error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// The event name.
    pub event: String,
    /// Path of the schema (JSON), relative to the config file.
    pub path: PathBuf,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            events: Vec::new(),
            plugins: Vec::new(),
            tables: Vec::new(),
            counters: Vec::new(),
            schemas: Vec::new(),
            webhooks: Vec::new(),
            topics: Vec::new(),
        }
    }
}

/// `[[pipeline.plugin]]`: one plugin of the chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Name, used in logs, metrics and dead letters.
    pub name: String,
    /// Path of the component (`.wasm`), relative to the config file.
    pub path: PathBuf,
    /// The plugin's own configuration, handed to it as JSON. Default `{}`.
    #[serde(default)]
    pub config: Option<toml::Table>,
    /// Wall-clock budget of one batch call, in milliseconds. Default 100.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Linear memory cap of an instance, in MiB. Default 64.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
    /// What happens to events while the plugin is quarantined: `closed` (default: they
    /// go to the dead letters) or `open` (they pass this plugin untouched).
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Quarantine the plugin after this many consecutive failing batch calls (calls in
    /// which it failed on at least half the events: traps, deadlines, memory cap).
    /// Default 3.
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: u32,
    /// How long a quarantine lasts before the plugin is tried again, in seconds.
    /// Default 30.
    #[serde(default = "default_quarantine_secs")]
    pub quarantine_secs: u64,
}

/// What a pipeline does with events a quarantined plugin cannot process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Fail closed: dead-letter the events.
    #[default]
    Closed,
    /// Fail open: pass the events on as if the plugin had kept them unchanged.
    Open,
}

/// Largest `deadline_ms` of a plugin: one batch call may take at most a minute.
pub const MAX_DEADLINE_MS: u64 = 60_000;
/// Largest `memory_mib`: 4 GiB, all a 32-bit linear memory can address.
pub const MAX_MEMORY_MIB: usize = 4096;
/// Largest `quarantine_secs`: a day.
pub const MAX_QUARANTINE_SECS: u64 = 86_400;

/// Checks a plugin's limits (from a configuration file or the control plane): each
/// within its range, so that no value an admin sends can overflow a deadline or a
/// quarantine's end. The message names the plugin and the limit.
pub fn check_limits(
    plugin: &str,
    deadline_ms: u64,
    memory_mib: usize,
    quarantine_after: u32,
    quarantine_secs: u64,
) -> Result<(), String> {
    let out = |what: &str, value: u64, max: u64| {
        Err(format!(
            "plugin {plugin}: {what} must be 1-{max}, got {value}"
        ))
    };
    if !(1..=MAX_DEADLINE_MS).contains(&deadline_ms) {
        return out("deadline_ms", deadline_ms, MAX_DEADLINE_MS);
    }
    if !(1..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return out("memory_mib", memory_mib as u64, MAX_MEMORY_MIB as u64);
    }
    if quarantine_after == 0 {
        return out("quarantine_after", 0, u64::from(u32::MAX));
    }
    if !(1..=MAX_QUARANTINE_SECS).contains(&quarantine_secs) {
        return out("quarantine_secs", quarantine_secs, MAX_QUARANTINE_SECS);
    }
    Ok(())
}

pub fn default_quarantine_after() -> u32 {
    3
}

pub fn default_quarantine_secs() -> u64 {
    30
}

pub fn default_deadline_ms() -> u64 {
    100
}

pub fn default_memory_mib() -> usize {
    64
}

impl PluginConfig {
    /// The plugin's configuration as JSON text.
    pub fn config_json(&self) -> String {
        match &self.config {
            Some(table) => serde_json::to_string(table).unwrap_or_else(|_| "{}".into()),
            None => "{}".into(),
        }
    }

    /// The sandbox limits of this plugin.
    pub fn limits(&self) -> Limits {
        Limits {
            deadline: Duration::from_millis(self.deadline_ms),
            memory_bytes: self.memory_mib << 20,
        }
    }
}
