//! weir's configuration file (TOML).
//!
//! Every struct here is the user documentation of its section: the doc comments are
//! what `weir serve --config FILE` accepts. Unknown keys are errors, so a typo never
//! silently falls back to a default. [`Config::load`] parses and then validates, so
//! nothing starts on a configuration that cannot work.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The write key and admin token of the development configuration. weir prints them at
/// start and refuses to listen on a non-loopback address while any of them is in use.
pub const DEV_WRITE_KEY: &str = "wk_dev_0000000000000000";

/// The development read key of the demo configuration: refused off loopback too.
pub const DEV_READ_KEY: &str = "rk_dev_0000000000000000";

/// The development admin token of the demo configuration: refused off loopback too.
pub const DEV_ADMIN_TOKEN: &str = "at_dev_0000000000000000";

/// Errors found while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP ingest endpoint.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// Apps and their write keys. At least one app is required to accept events.
    #[serde(default, rename = "app")]
    pub apps: Vec<AppConfig>,
    /// The Kafka cluster that makes events durable.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The ClickHouse server that receives processed events and dead letters.
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    /// The processor: batching and flushing.
    #[serde(default)]
    pub processor: ProcessorConfig,
    /// The pipeline every event runs through.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// The Redis server that holds counters. Needed only when the pipeline declares
    /// counters.
    #[serde(default)]
    pub redis: RedisConfig,
    /// The admin API. Absent: no admin port (the control plane is still read).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Where the control plane (uploaded plugins, schemas, pipelines) is kept.
    #[serde(default)]
    pub control: ControlConfig,
}

/// `[admin]`: the admin API, on its own port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on. Default `127.0.0.1:8081`.
    pub listen: SocketAddr,
    /// Bearer tokens accepted by the admin API (at least 16 characters each).
    pub tokens: Vec<String>,
    /// Largest plugin component accepted, in bytes. Default 64 MiB.
    pub max_plugin_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            tokens: Vec::new(),
            max_plugin_bytes: 64 << 20,
        }
    }
}

/// Where the control plane lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// A local directory: a single node (any number of processes on it).
    #[default]
    Dir,
    /// The `[redis]` server: a fleet. Changes are announced on pub/sub.
    Redis,
}

/// `[control]`: the control-plane store and how instances follow it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// `dir` (default) or `redis`.
    pub store: StoreKind,
    /// The directory of the `dir` store, relative to the config file. Default
    /// `weir-control`.
    pub dir: PathBuf,
    /// How often an instance re-reads the control-plane version even without a change
    /// notice, in milliseconds. Default 1000 (the `dir` store has no notices).
    pub reconcile_ms: u64,
    /// How often an instance reports its status, in milliseconds. Default 1000.
    pub heartbeat_ms: u64,
    /// An instance not heard from for this long is no longer listed. Default 10000.
    pub instance_ttl_ms: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Dir,
            dir: PathBuf::from("weir-control"),
            reconcile_ms: 1000,
            heartbeat_ms: 1000,
            instance_ttl_ms: 10_000,
        }
    }
}

/// `[redis]`: where counters live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Server URL. Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key weir writes. Default `weir`.
    pub key_prefix: String,
    /// Timeout of one round trip, in milliseconds. Default 2000.
    pub timeout_ms: u64,
    /// Most counter increments held in memory while Redis is unreachable. Past it,
    /// the processor stops taking new events until Redis answers. Default 1,000,000.
    pub max_pending: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "weir".into(),
            timeout_ms: 2000,
            max_pending: 1_000_000,
        }
    }
}

/// `[ingest]`: the HTTP endpoint apps post events to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes (413 beyond). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Largest single event, in bytes of its JSON text (400 beyond). Default 32 KiB.
    pub max_event_bytes: usize,
    /// Most events in one request (400 beyond). Default 1000.
    pub max_events_per_request: usize,
    /// Deepest nesting of objects and arrays inside one event (400 beyond). Default 32.
    pub max_depth: usize,
    /// Origins allowed to post from a browser (CORS), e.g. `["https://app.example.com"]`;
    /// `["*"]` allows any. Default: none.
    pub cors_origins: Vec<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            max_event_bytes: 32 * 1024,
            max_events_per_request: 1000,
            max_depth: 32,
            cors_origins: Vec::new(),
        }
    }
}

/// `[[app]]`: one app (tenant) and the write keys that post on its behalf.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The app's name, recorded with each of its events (`app` column).
    pub name: String,
    /// Write keys: public, ingest-only credentials (`Authorization: Bearer <key>`).
    pub write_keys: Vec<String>,
    /// Read keys: secret credentials for the app's backend to read its counters
    /// (`GET /v1/counters/...`). A write key never reads. Default none.
    #[serde(default)]
    pub read_keys: Vec<String>,
}

/// `[kafka]`: brokers, topic and consumer group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Topic holding accepted events. Default `weir.events`.
    pub topic: String,
    /// Partitions of the topic when weir creates it. Default 4.
    pub partitions: i32,
    /// Replication factor when weir creates the topic. Default 1.
    pub replication_factor: i32,
    /// Consumer group of the processors. Default `weir-processor`.
    pub group: String,
    /// How long ingest waits for Kafka to acknowledge a request's events before it
    /// answers 503, in milliseconds. Default 5000.
    pub produce_timeout_ms: u64,
    /// Consumer session timeout in milliseconds. Default 10000.
    pub session_timeout_ms: u64,
    /// Longest a fetch request may wait at the broker for new records
    /// (librdkafka's `fetch.wait.max.ms`), in milliseconds. Default 50. Kafka answers a
    /// fetch as soon as a record arrives, whatever this is; Tansu holds every fetch
    /// for this long (half of it from 500 ms up), so there it bounds how fresh
    /// counters and rows can be, and a lower value costs the broker CPU (more
    /// fetches). 1-10000.
    pub fetch_wait_max_ms: u64,
    /// How long the producer waits to batch records bound for the same partition
    /// (librdkafka's `linger.ms`), in milliseconds. Default 5: fewer, fuller produce
    /// requests (less broker CPU) for a few milliseconds of ingest latency. 0-1000.
    pub linger_ms: u64,
    /// Extra librdkafka properties for both producer and consumer, e.g.
    /// `{ "security.protocol" = "ssl" }`.
    pub properties: HashMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "weir.events".into(),
            partitions: 4,
            replication_factor: 1,
            group: "weir-processor".into(),
            produce_timeout_ms: 5000,
            session_timeout_ms: 10_000,
            fetch_wait_max_ms: 50,
            linger_ms: 5,
            properties: HashMap::new(),
        }
    }
}

/// `[clickhouse]`: where processed events and dead letters are written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP URL of the server. Default `http://127.0.0.1:8123`.
    pub url: String,
    /// Other endpoints serving the same tables (replicas, a second load balancer),
    /// tried in order when the current one fails. Default none.
    pub failover_urls: Vec<String>,
    /// Database; weir creates it and its tables. Default `weir`.
    pub database: String,
    /// User. Default `default`.
    pub user: String,
    /// Password. Default empty.
    pub password: String,
    /// How INSERTs travel: `lz4` (default) or `none`. On loopback or a fast LAN, `none`
    /// spares both weir and ClickHouse the (de)compression.
    pub compression: InsertCompression,
}

/// `clickhouse.compression`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InsertCompression {
    #[default]
    Lz4,
    None,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            failover_urls: Vec::new(),
            database: "weir".into(),
            user: "default".into(),
            password: String::new(),
            compression: InsertCompression::Lz4,
        }
    }
}

/// `[processor]`: how consumed events are batched into ClickHouse.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// Run the processor (consume, plugins, sinks) in this instance. Default true.
    pub enabled: bool,
    /// Flush when this many events are buffered. Default 10000.
    pub flush_max_events: usize,
    /// Flush at least this often while events are buffered, in milliseconds. Default 1000.
    pub flush_interval_ms: u64,
    /// Events per plugin call. Default 256.
    pub plugin_batch_size: usize,
    /// Delay before retrying a failed ClickHouse insert, in milliseconds (doubles up to
    /// 30 s). The batch is retried until it succeeds; offsets do not move meanwhile.
    /// Default 500.
    pub retry_backoff_ms: u64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_max_events: 10_000,
            flush_interval_ms: 1000,
            plugin_batch_size: 256,
            retry_backoff_ms: 500,
        }
    }
}

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

/// `[[pipeline.topic]]`: forwards kept events of the listed names to a Kafka topic
/// (created if missing), one JSON record per event, at least once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Name, `[A-Za-z_][A-Za-z0-9_]*`, used in logs and metrics.
    pub name: String,
    /// The topic; must differ from `kafka.topic`.
    pub topic: String,
    /// Event names forwarded (as the plugins left them). Plugins can also forward any
    /// event here by the sink's name. Default none.
    #[serde(default)]
    pub events: Vec<String>,
    /// Record key: `user_id` (default; the event id when there is no user) or `event_id`.
    #[serde(default)]
    pub key: TopicKey,
}

/// What a forwarded record is keyed by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicKey {
    #[default]
    UserId,
    EventId,
}

/// `[[pipeline.webhook]]`: POSTs kept events of the listed names to a URL, in batches
/// (`{"webhook": NAME, "events": [EVENT, ...]}`), at least once, with retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Name, `[A-Za-z_][A-Za-z0-9_]*`, used in logs, metrics and dead letters.
    pub name: String,
    /// `http://` or `https://` URL.
    pub url: String,
    /// Event names sent (after the plugin chain: as the plugins left them). Plugins
    /// can also forward any event here by the webhook's name. Default none.
    #[serde(default)]
    pub events: Vec<String>,
    /// Most events per POST; 1 sends each event on its own. Default 100.
    #[serde(default = "default_webhook_batch")]
    pub batch_size: usize,
    /// Timeout of one POST, in milliseconds. Default 5000.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// Attempts of one batch before its events go to dead_letters. Default 8.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// Pause before the first retry, doubled each time up to 30 s. Default 500.
    #[serde(default = "default_webhook_backoff")]
    pub retry_backoff_ms: u64,
    /// Most events queued for delivery; past it the processor waits. Default 10000.
    #[serde(default = "default_webhook_pending")]
    pub max_pending: usize,
    /// Extra request headers (e.g. an API key). Default none.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn default_webhook_batch() -> usize {
    100
}
fn default_webhook_timeout() -> u64 {
    5000
}
fn default_webhook_attempts() -> u32 {
    8
}
fn default_webhook_backoff() -> u64 {
    500
}
fn default_webhook_pending() -> usize {
    10_000
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

/// `[[pipeline.table]]`: a typed table plugins write rows to (`row` outputs). weir
/// creates it with its columns after the columns it fills itself: `event_id`, `app`,
/// `timestamp` (the event's, `DateTime`), `plugins`, `kafka_partition`, `kafka_offset`,
/// `kafka_index`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Table name, `[A-Za-z_][A-Za-z0-9_]*`; must not be `events` or `dead_letters`.
    pub name: String,
    /// The columns, each `"name Type"`. Types: `String`, `Int8`..`Int64`,
    /// `UInt8`..`UInt64`, `Float32`, `Float64`, `Bool` (stored as `UInt8`), `Date`,
    /// `DateTime`, and `Nullable(T)` of any of them.
    pub columns: Vec<String>,
    /// The sorting key. Default `["timestamp"]`.
    #[serde(default)]
    pub order_by: Vec<String>,
}

/// `[[pipeline.counter]]`: a counter plugins increment (`count` outputs), per app and
/// key, read by apps at `GET /v1/counters/{name}/{key}`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CounterConfig {
    /// Counter name, `[A-Za-z_][A-Za-z0-9_]*`.
    pub name: String,
    /// Also keep a count per UTC day of the event's timestamp. Default false.
    #[serde(default)]
    pub by_day: bool,
    /// How long per-day counts are kept, in days. Default 90.
    #[serde(default = "default_day_retention")]
    pub day_retention_days: u32,
}

fn default_day_retention() -> u32 {
    90
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

pub(crate) fn default_quarantine_after() -> u32 {
    3
}

pub(crate) fn default_quarantine_secs() -> u64 {
    30
}

pub(crate) fn default_deadline_ms() -> u64 {
    100
}

pub(crate) fn default_memory_mib() -> usize {
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
    pub fn limits(&self) -> crate::runtime::Limits {
        crate::runtime::Limits {
            deadline: Duration::from_millis(self.deadline_ms),
            memory_bytes: self.memory_mib << 20,
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file. Plugin paths are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for plugin in &mut config.pipeline.plugins {
            if plugin.path.is_relative() {
                plugin.path = base.join(&plugin.path);
            }
        }
        for schema in &mut config.pipeline.schemas {
            if schema.path.is_relative() {
                schema.path = base.join(&schema.path);
            }
        }
        if config.control.dir.is_relative() {
            config.control.dir = base.join(&config.control.dir);
        }
        Ok(config)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ingest = &self.ingest;
        if ingest.max_body_bytes == 0 || ingest.max_event_bytes == 0 {
            return Err(invalid("ingest size limits must be positive"));
        }
        if ingest.max_event_bytes > ingest.max_body_bytes {
            return Err(invalid(
                "ingest.max_event_bytes cannot exceed ingest.max_body_bytes",
            ));
        }
        if ingest.max_events_per_request == 0 || ingest.max_depth == 0 {
            return Err(invalid(
                "ingest.max_events_per_request and ingest.max_depth must be positive",
            ));
        }
        let mut seen = HashMap::new();
        for app in &self.apps {
            if app.name.is_empty() {
                return Err(invalid("an [[app]] has an empty name"));
            }
            for key in app.write_keys.iter().chain(&app.read_keys) {
                if key.len() < 16 {
                    return Err(invalid(format!(
                        "a key of app {:?} is shorter than 16 characters",
                        app.name
                    )));
                }
                if let Some(other) = seen.insert(key.as_str(), app.name.as_str()) {
                    return Err(invalid(format!(
                        "a key is shared by apps {other:?} and {:?} (or used both to write and to read)",
                        app.name
                    )));
                }
            }
        }
        for (dev, what) in [(DEV_WRITE_KEY, "write"), (DEV_READ_KEY, "read")] {
            if !ingest.listen.ip().is_loopback() && seen.contains_key(dev) {
                return Err(invalid(format!(
                    "ingest listens on {} (not loopback) with the development {what} key; set your own {what} keys",
                    ingest.listen
                )));
            }
        }
        if let Some(admin) = &self.admin {
            for token in &admin.tokens {
                if token.len() < 16 {
                    return Err(invalid("an [admin] token is shorter than 16 characters"));
                }
                if seen.contains_key(token.as_str()) {
                    return Err(invalid(
                        "an [admin] token is also an app's write or read key",
                    ));
                }
            }
            if admin.tokens.is_empty() {
                return Err(invalid("[admin] needs at least one token (admin.tokens)"));
            }
            if !admin.listen.ip().is_loopback() && admin.tokens.iter().any(|t| t == DEV_ADMIN_TOKEN)
            {
                return Err(invalid(format!(
                    "admin listens on {} (not loopback) with the development admin token; set your own admin.tokens",
                    admin.listen
                )));
            }
            if admin.max_plugin_bytes == 0 {
                return Err(invalid("admin.max_plugin_bytes must be positive"));
            }
        }
        let c = &self.control;
        if c.reconcile_ms == 0 || c.heartbeat_ms == 0 || c.instance_ttl_ms <= c.heartbeat_ms {
            return Err(invalid(
                "control.reconcile_ms and heartbeat_ms must be positive, and instance_ttl_ms above heartbeat_ms",
            ));
        }
        if self.kafka.topic.is_empty() || self.kafka.group.is_empty() {
            return Err(invalid("kafka.topic and kafka.group must not be empty"));
        }
        if self.kafka.partitions < 1 || self.kafka.replication_factor < 1 {
            return Err(invalid(
                "kafka.partitions and kafka.replication_factor must be at least 1",
            ));
        }
        if self.kafka.linger_ms > 1000 {
            return Err(invalid(format!(
                "kafka.linger_ms must be 0-1000, not {}",
                self.kafka.linger_ms
            )));
        }
        if !(1..=10_000).contains(&self.kafka.fetch_wait_max_ms) {
            return Err(invalid(format!(
                "kafka.fetch_wait_max_ms must be 1-10000, not {}",
                self.kafka.fetch_wait_max_ms
            )));
        }
        let p = &self.processor;
        if p.flush_max_events == 0 || p.flush_interval_ms == 0 || p.plugin_batch_size == 0 {
            return Err(invalid(
                "processor.flush_max_events, flush_interval_ms and plugin_batch_size must be positive",
            ));
        }
        if !is_identifier(&self.clickhouse.database) {
            return Err(invalid(format!(
                "clickhouse.database {:?} must match [A-Za-z_][A-Za-z0-9_]*",
                self.clickhouse.database
            )));
        }
        let mut names = std::collections::HashSet::new();
        for plugin in &self.pipeline.plugins {
            if !names.insert(plugin.name.as_str()) {
                return Err(invalid(format!(
                    "plugin {:?} appears twice in the pipeline",
                    plugin.name
                )));
            }
            if plugin.deadline_ms == 0 || plugin.memory_mib == 0 || plugin.quarantine_after == 0 {
                return Err(invalid(format!(
                    "plugin {:?}: deadline_ms, memory_mib and quarantine_after must be positive",
                    plugin.name
                )));
            }
        }
        crate::pipeline::route::Routes::new(&self.pipeline).map_err(invalid)?;
        let mut hooks = std::collections::HashSet::new();
        for w in &self.pipeline.webhooks {
            let n = &w.name;
            if !is_identifier(n) || !hooks.insert(n.as_str()) {
                return Err(invalid(format!(
                    "webhook name {n:?} must match [A-Za-z_][A-Za-z0-9_]* and be unique"
                )));
            }
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(invalid(format!(
                    "webhook {n}: url {:?} must start with http:// or https://",
                    w.url
                )));
            }
            if let Some(bad) = w
                .events
                .iter()
                .find(|e| crate::ingest::envelope::check_name(e).is_err())
            {
                return Err(invalid(format!(
                    "webhook {n}: {bad:?} is not a valid event name"
                )));
            }
            if w.batch_size == 0 || w.timeout_ms == 0 || w.max_attempts == 0 || w.max_pending == 0 {
                return Err(invalid(format!(
                    "webhook {n}: batch_size, timeout_ms, max_attempts and max_pending must be positive"
                )));
            }
        }
        for t in &self.pipeline.topics {
            let n = &t.name;
            if !is_identifier(n) || !hooks.insert(n.as_str()) {
                return Err(invalid(format!(
                    "topic sink name {n:?} must match [A-Za-z_][A-Za-z0-9_]* and be unique among webhooks and topics"
                )));
            }
            let valid_topic = !t.topic.is_empty()
                && t.topic.len() <= 249
                && t.topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid_topic || t.topic == self.kafka.topic {
                return Err(invalid(format!(
                    "topic sink {n}: topic {:?} must be 1-249 of [A-Za-z0-9._-] and not the events topic",
                    t.topic
                )));
            }
            if t.events
                .iter()
                .any(|e| crate::ingest::envelope::check_name(e).is_err())
            {
                return Err(invalid(format!(
                    "topic sink {n}: events must list valid event names"
                )));
            }
        }
        if let Some(bad) = self
            .pipeline
            .events
            .iter()
            .find(|e| crate::ingest::envelope::check_name(e).is_err())
        {
            return Err(invalid(format!(
                "pipeline.events: {bad:?} is not a valid event name"
            )));
        }
        for schema in &self.pipeline.schemas {
            if crate::ingest::envelope::check_name(&schema.event).is_err() {
                return Err(invalid(format!(
                    "[[pipeline.schema]] event {:?} is not a valid event name",
                    schema.event
                )));
            }
        }
        if !self.pipeline.counters.is_empty() && self.redis.key_prefix.is_empty() {
            return Err(invalid("redis.key_prefix must not be empty"));
        }
        if self.redis.timeout_ms == 0 || self.redis.max_pending == 0 {
            return Err(invalid(
                "redis.timeout_ms and redis.max_pending must be positive",
            ));
        }
        Ok(())
    }

    /// Read key -> app name.
    pub fn read_keys(&self) -> HashMap<String, String> {
        self.apps
            .iter()
            .flat_map(|app| {
                app.read_keys
                    .iter()
                    .map(move |key| (key.clone(), app.name.clone()))
            })
            .collect()
    }

    /// Write key -> app name.
    pub fn write_keys(&self) -> HashMap<String, String> {
        self.apps
            .iter()
            .flat_map(|app| {
                app.write_keys
                    .iter()
                    .map(move |key| (key.clone(), app.name.clone()))
            })
            .collect()
    }
}

/// True for a plain SQL identifier (safe to interpolate into DDL).
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.ingest.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.ingest.max_body_bytes, 1 << 20);
        assert_eq!(c.ingest.max_event_bytes, 32 << 10);
        assert_eq!(c.ingest.max_events_per_request, 1000);
        assert_eq!(c.ingest.max_depth, 32);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.fetch_wait_max_ms, 50);
        assert_eq!(c.clickhouse.database, "weir");
        let err = Config::parse("[kafka]\nfetch_wait_max_ms = 0").unwrap_err();
        assert!(
            err.to_string()
                .contains("fetch_wait_max_ms must be 1-10000"),
            "{err}"
        );
        assert_eq!(c.kafka.linger_ms, 5);
        assert_eq!(c.clickhouse.compression, InsertCompression::Lz4);
        let c = Config::parse("[clickhouse]\ncompression = \"none\"").unwrap();
        assert_eq!(c.clickhouse.compression, InsertCompression::None);
        let err = Config::parse("[clickhouse]\ncompression = \"zstd\"").unwrap_err();
        assert!(err.to_string().contains("zstd"), "{err}");
        let err = Config::parse("[kafka]\nlinger_ms = 1001").unwrap_err();
        assert!(
            err.to_string().contains("linger_ms must be 0-1000"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("[ingest]\nlisten_addr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn dev_key_refused_off_loopback() {
        let text = format!(
            "[ingest]\nlisten = \"0.0.0.0:8080\"\n[[app]]\nname = \"demo\"\nwrite_keys = [\"{DEV_WRITE_KEY}\"]\n"
        );
        let err = Config::parse(&text).unwrap_err();
        assert!(err.to_string().contains("development write key"), "{err}");
        let text = format!(
            "[ingest]\nlisten = \"0.0.0.0:8080\"\n[[app]]\nname = \"demo\"\nwrite_keys = [\"wk_0123456789abcdef\"]\nread_keys = [\"{DEV_READ_KEY}\"]\n"
        );
        let err = Config::parse(&text).unwrap_err();
        assert!(err.to_string().contains("development read key"), "{err}");
    }

    #[test]
    fn routing_declarations_are_checked_at_load() {
        let text = "[[pipeline.table]]\nname = \"t\"\ncolumns = [\"a Map(String, String)\"]\n";
        let err = Config::parse(text).unwrap_err();
        assert!(err.to_string().contains("unsupported column type"), "{err}");
        let text = "[[app]]\nname = \"a\"\nwrite_keys = [\"k123456789012345678\"]\nread_keys = [\"k123456789012345678\"]\n";
        let err = Config::parse(text).unwrap_err();
        assert!(err.to_string().contains("to write and to read"), "{err}");
    }

    #[test]
    fn shared_keys_and_bad_database_are_rejected() {
        let text = "[[app]]\nname = \"a\"\nwrite_keys = [\"k123456789012345678\"]\n[[app]]\nname = \"b\"\nwrite_keys = [\"k123456789012345678\"]\n";
        assert!(
            Config::parse(text)
                .unwrap_err()
                .to_string()
                .contains("shared")
        );
        let err = Config::parse("[clickhouse]\ndatabase = \"weir; DROP\"").unwrap_err();
        assert!(err.to_string().contains("clickhouse.database"), "{err}");
    }

    #[test]
    fn plugin_config_becomes_json() {
        let text = "[[pipeline.plugin]]\nname = \"p\"\npath = \"p.wasm\"\nconfig = { a = 1, b = [\"x\"] }\n";
        let c = Config::parse(text).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&c.pipeline.plugins[0].config_json()).unwrap();
        assert_eq!(json, serde_json::json!({"a": 1, "b": ["x"]}));
    }
}
