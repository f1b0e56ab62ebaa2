//! weir's configuration file (TOML).
//!
//! Every struct here is the user documentation of its section: the doc comments are
//! what `weir serve --config FILE` accepts. Unknown keys are errors, so a typo never
//! silently falls back to a default. [`Config::load`] parses and then validates, so
//! nothing starts on a configuration that cannot work.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

// Each section's struct lives with the module it configures; the file's shape is here.
pub use crate::bus::KafkaConfig;
pub use crate::ingest::IngestConfig;
pub use crate::ingest::quota::Quota;
use crate::model::is_identifier;
pub use crate::pipeline::config::{
    FailurePolicy, PipelineConfig, PluginConfig, ProcessorConfig, SchemaConfig,
    default_deadline_ms, default_memory_mib, default_quarantine_after, default_quarantine_secs,
};
pub use crate::pipeline::dedup::{DedupConfig, MAX_WINDOW_SECS};
pub use crate::sinks::clickhouse::{ClickHouseConfig, InsertCompression, TableConfig};
pub use crate::sinks::counters::{CounterConfig, RedisConfig};
pub use crate::sinks::topic::{TopicConfig, TopicKey};
pub use crate::sinks::webhook::WebhookConfig;

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

/// `value` of setting `name` must lie in `range`: the error names the setting, the
/// range and the value.
fn check_range<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(invalid(format!(
        "{name} must be {}-{}, not {value}",
        range.start(),
        range.end()
    )))
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
    /// The Redis server that holds counters and the deduplication window. Needed when
    /// the pipeline declares counters or deduplication is on.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Deduplication of events by app and `event_id` (client resends), in Redis.
    #[serde(default)]
    pub dedup: DedupConfig,
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
    /// Largest plugin component accepted, in bytes. Default 64 MiB; at most 1 GiB.
    pub max_plugin_bytes: usize,
    /// How long a request body may take to arrive, in ms, from the end of its headers
    /// (a plugin upload of `max_plugin_bytes` included): a body still arriving then
    /// is answered `408 body_timeout`. Default 120000 (2 minutes); 1000-3600000.
    pub body_timeout_ms: u64,
}

/// The range of [`AdminConfig::body_timeout_ms`].
pub const ADMIN_BODY_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;
/// The range of [`AdminConfig::max_plugin_bytes`].
pub const MAX_PLUGIN_BYTES: std::ops::RangeInclusive<usize> = 1..=1 << 30;

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            tokens: Vec::new(),
            max_plugin_bytes: 64 << 20,
            body_timeout_ms: 120_000,
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
    /// `[app.quota]`: events and bytes per second for the whole app, on each ingest
    /// instance (429 with `Retry-After` beyond). Default: no limit.
    #[serde(default)]
    pub quota: Option<Quota>,
    /// `[app.key_quota]`: the same for each of the app's write keys on its own (a
    /// leaked key floods only its own share). Default: no limit.
    #[serde(default)]
    pub key_quota: Option<Quota>,
}

impl AppConfig {
    fn validate_quotas(&self) -> Result<(), ConfigError> {
        use crate::ingest::quota::{BURST_SECS, BYTES_PER_SEC, EVENTS_PER_SEC};
        for (section, quota) in [("quota", &self.quota), ("key_quota", &self.key_quota)] {
            let Some(q) = quota else { continue };
            let name = |field: &str| format!("app {:?}: {section}.{field}", self.name);
            if q.events_per_sec.is_none() && q.bytes_per_sec.is_none() {
                return Err(invalid(format!(
                    "app {:?}: {section} sets neither events_per_sec nor bytes_per_sec",
                    self.name
                )));
            }
            if let Some(v) = q.events_per_sec {
                check_range(&name("events_per_sec"), v, EVENTS_PER_SEC)?;
            }
            if let Some(v) = q.bytes_per_sec {
                check_range(&name("bytes_per_sec"), v, BYTES_PER_SEC)?;
            }
            check_range(&name("burst_secs"), q.burst_secs, BURST_SECS)?;
        }
        Ok(())
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
        check_range(
            "ingest.header_timeout_ms",
            ingest.header_timeout_ms,
            crate::ingest::HEADER_TIMEOUT_MS,
        )?;
        check_range(
            "ingest.body_timeout_ms",
            ingest.body_timeout_ms,
            crate::ingest::BODY_TIMEOUT_MS,
        )?;
        check_range(
            "ingest.max_connections",
            ingest.max_connections,
            crate::ingest::MAX_CONNECTIONS,
        )?;
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
            app.validate_quotas()?;
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
            check_range(
                "admin.max_plugin_bytes",
                admin.max_plugin_bytes,
                MAX_PLUGIN_BYTES,
            )?;
            check_range(
                "admin.body_timeout_ms",
                admin.body_timeout_ms,
                ADMIN_BODY_TIMEOUT_MS,
            )?;
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
        check_range("kafka.linger_ms", self.kafka.linger_ms, 0..=1000)?;
        check_range(
            "kafka.fetch_wait_max_ms",
            self.kafka.fetch_wait_max_ms,
            1..=10_000,
        )?;
        let p = &self.processor;
        if p.flush_max_events == 0 || p.flush_interval_ms == 0 || p.plugin_batch_size == 0 {
            return Err(invalid(
                "processor.flush_max_events, flush_interval_ms and plugin_batch_size must be positive",
            ));
        }
        if let Some(lanes) = p.plugin_lanes {
            check_range(
                "processor.plugin_lanes",
                lanes,
                1..=crate::pipeline::MAX_LANES,
            )?;
        }
        check_range(
            "processor.write_timeout_ms",
            p.write_timeout_ms,
            crate::pipeline::config::WRITE_TIMEOUT_MS,
        )?;
        if p.drain_timeout_ms > crate::pipeline::config::MAX_DRAIN_TIMEOUT_MS {
            return Err(invalid(format!(
                "processor.drain_timeout_ms must be at most {}, not {}",
                crate::pipeline::config::MAX_DRAIN_TIMEOUT_MS,
                p.drain_timeout_ms
            )));
        }
        if !is_identifier(&self.clickhouse.database) {
            return Err(invalid(format!(
                "clickhouse.database {:?} must match [A-Za-z_][A-Za-z0-9_]*",
                self.clickhouse.database
            )));
        }
        if let Some(r) = &self.clickhouse.replication {
            r.validate().map_err(invalid)?;
        }
        let mut names = std::collections::HashSet::new();
        for plugin in &self.pipeline.plugins {
            if !names.insert(plugin.name.as_str()) {
                return Err(invalid(format!(
                    "plugin {:?} appears twice in the pipeline",
                    plugin.name
                )));
            }
            crate::pipeline::config::check_limits(
                &plugin.name,
                plugin.deadline_ms,
                plugin.memory_mib,
                plugin.quarantine_after,
                plugin.quarantine_secs,
            )
            .map_err(invalid)?;
        }
        crate::pipeline::route::Routes::new(&self.pipeline).map_err(|e| invalid(e.to_string()))?;
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
                .find(|e| crate::model::check_name(e).is_err())
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
                .any(|e| crate::model::check_name(e).is_err())
            {
                return Err(invalid(format!(
                    "topic sink {n}: events must list valid event names"
                )));
            }
            let range = crate::sinks::topic::MAX_RECORD_BYTES;
            if !range.contains(&t.max_record_bytes) {
                return Err(invalid(format!(
                    "topic sink {n}: max_record_bytes = {} is outside {}-{}",
                    t.max_record_bytes,
                    range.start(),
                    range.end()
                )));
            }
        }
        if let Some(bad) = self
            .pipeline
            .events
            .iter()
            .find(|e| crate::model::check_name(e).is_err())
        {
            return Err(invalid(format!(
                "pipeline.events: {bad:?} is not a valid event name"
            )));
        }
        for schema in &self.pipeline.schemas {
            if crate::model::check_name(&schema.event).is_err() {
                return Err(invalid(format!(
                    "[[pipeline.schema]] event {:?} is not a valid event name",
                    schema.event
                )));
            }
        }
        if (!self.pipeline.counters.is_empty() || self.dedup.enabled)
            && self.redis.key_prefix.is_empty()
        {
            return Err(invalid("redis.key_prefix must not be empty"));
        }
        if self.dedup.enabled && !(1..=MAX_WINDOW_SECS).contains(&self.dedup.window_secs) {
            return Err(invalid(format!(
                "dedup.window_secs must be 1-{MAX_WINDOW_SECS} (30 days), got {}",
                self.dedup.window_secs
            )));
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

    /// Every app's quotas, for ingest.
    pub fn quotas(&self) -> crate::ingest::quota::Quotas {
        crate::ingest::quota::Quotas::new(self.apps.iter().map(|app| {
            (
                app.name.as_str(),
                app.quota.as_ref(),
                app.key_quota.as_ref(),
                app.write_keys.as_slice(),
            )
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_are_checked_and_named_in_errors() {
        let app = |quota: &str| {
            format!("[[app]]\nname = \"a\"\nwrite_keys = [\"k123456789012345678\"]\n{quota}")
        };
        let c = Config::parse(&app(
            "[app.quota]\nevents_per_sec = 5000\nbytes_per_sec = 5000000\n[app.key_quota]\nevents_per_sec = 1000\nburst_secs = 5\n",
        ))
        .unwrap();
        let quota = c.apps[0].quota.unwrap();
        assert_eq!((quota.events_per_sec, quota.burst_secs), (Some(5000), 1));
        assert_eq!(c.apps[0].key_quota.unwrap().burst_secs, 5);
        for (quota, message) in [
            (
                "[app.quota]\nevents_per_sec = 0\n",
                "app \"a\": quota.events_per_sec must be 1-10000000, not 0",
            ),
            (
                "[app.key_quota]\nbytes_per_sec = 100\n",
                "app \"a\": key_quota.bytes_per_sec must be 1024-10000000000, not 100",
            ),
            (
                "[app.quota]\nevents_per_sec = 10\nburst_secs = 9223372036854775807\n",
                "app \"a\": quota.burst_secs must be 1-3600, not 9223372036854775807",
            ),
            (
                "[app.quota]\nburst_secs = 2\n",
                "app \"a\": quota sets neither events_per_sec nor bytes_per_sec",
            ),
        ] {
            let err = Config::parse(&app(quota)).unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    #[test]
    fn empty_config_has_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.ingest.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.ingest.max_body_bytes, 1 << 20);
        assert_eq!(c.ingest.max_event_bytes, 32 << 10);
        assert_eq!(c.ingest.max_connections, 4096);
        assert_eq!(c.ingest.header_timeout_ms, 10_000);
        assert_eq!(c.ingest.body_timeout_ms, 15_000);
        for (line, want) in [
            (
                "max_connections = 0",
                "ingest.max_connections must be 1-1000000, not 0",
            ),
            (
                "header_timeout_ms = 50",
                "ingest.header_timeout_ms must be 100-300000, not 50",
            ),
            (
                "body_timeout_ms = 700000",
                "ingest.body_timeout_ms must be 100-600000, not 700000",
            ),
        ] {
            let err = Config::parse(&format!("[ingest]\n{line}")).unwrap_err();
            assert!(err.to_string().contains(want), "{line}: {err}");
        }
        let admin = Config::parse("[admin]\ntokens = [\"at_test_1234567890abcdef\"]").unwrap();
        let admin = admin.admin.expect("[admin] given");
        assert_eq!(admin.body_timeout_ms, 120_000);
        assert_eq!(admin.max_plugin_bytes, 64 << 20);
        for (line, want) in [
            (
                "body_timeout_ms = 999",
                "admin.body_timeout_ms must be 1000-3600000, not 999",
            ),
            (
                "max_plugin_bytes = 0",
                "admin.max_plugin_bytes must be 1-1073741824, not 0",
            ),
        ] {
            let text = format!("[admin]\ntokens = [\"at_test_1234567890abcdef\"]\n{line}");
            let err = Config::parse(&text).unwrap_err();
            assert!(err.to_string().contains(want), "{line}: {err}");
        }
        assert_eq!(c.ingest.max_events_per_request, 1000);
        assert_eq!(c.ingest.max_depth, 32);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.fetch_wait_max_ms, 50);
        assert_eq!(c.clickhouse.database, "weir");
        assert!(c.dedup.enabled);
        assert_eq!(c.dedup.window_secs, 86_400);
        assert_eq!(
            c.dedup.when_unavailable,
            crate::pipeline::dedup::WhenUnavailable::Wait
        );
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
        assert!(c.processor.plugin_lanes.is_none());
        assert!((1..=crate::pipeline::config::DEFAULT_MAX_LANES).contains(&c.processor.lanes()));
        let c = Config::parse("[processor]\nplugin_lanes = 3").unwrap();
        assert_eq!(c.processor.lanes(), 3);
        for lanes in [0, 65] {
            let err = Config::parse(&format!("[processor]\nplugin_lanes = {lanes}")).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("processor.plugin_lanes must be 1-64, not {lanes}")),
                "{err}"
            );
        }
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
    fn replication_defaults_and_bad_values() {
        let c = Config::parse("[clickhouse.replication]").unwrap();
        let r = c.clickhouse.replication.unwrap();
        assert_eq!(r.cluster, None);
        assert_eq!(
            r.zookeeper_path,
            "/clickhouse/tables/{shard}/{database}/{table}"
        );
        assert_eq!(r.replica_name, "{replica}");
        assert_eq!(r.ddl_timeout_secs, 30);
        assert!(Config::parse("").unwrap().clickhouse.replication.is_none());
        for (text, says) in [
            ("cluster = \"a b\"", "replication.cluster"),
            ("zookeeper_path = \"/t/{shard}\"", "contain {table}"),
            ("zookeeper_path = \"t/{table}\"", "start with /"),
            ("zookeeper_path = \"/t/{table}')\"", "without quotes"),
            ("replica_name = \"\"", "replica_name"),
            ("ddl_timeout_secs = 0", "ddl_timeout_secs must be 1-3600"),
            ("engine = \"x\"", "unknown field"),
        ] {
            let err = Config::parse(&format!("[clickhouse.replication]\n{text}")).unwrap_err();
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn plugin_limits_and_the_dedup_window_are_bounded() {
        let plugin = |limit: &str| {
            format!("[[pipeline.plugin]]\nname = \"p\"\npath = \"p.wasm\"\n{limit}\n")
        };
        for (limit, want) in [
            // 2^63 s of quarantine once panicked the worker at its first quarantine.
            (
                "quarantine_secs = 9223372036854775807",
                "quarantine_secs must be 1-86400",
            ),
            ("quarantine_secs = 0", "quarantine_secs must be 1-86400"),
            ("deadline_ms = 0", "deadline_ms must be 1-60000"),
            ("deadline_ms = 600000", "deadline_ms must be 1-60000"),
            ("memory_mib = 5000", "memory_mib must be 1-4096"),
            ("quarantine_after = 0", "quarantine_after must be"),
        ] {
            let err = Config::parse(&plugin(limit)).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("plugin p"),
                "{limit}: {err}"
            );
        }
        assert!(Config::parse(&plugin("quarantine_secs = 86400")).is_ok());
        let err = Config::parse("[dedup]\nwindow_secs = 0").unwrap_err();
        assert!(err.to_string().contains("dedup.window_secs"), "{err}");
        assert!(Config::parse("[dedup]\nenabled = false\nwindow_secs = 0").is_ok());
        let err = Config::parse("[dedup]\nwhen_unavailable = \"drop\"").unwrap_err();
        assert!(err.to_string().contains("when_unavailable"), "{err}");
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
