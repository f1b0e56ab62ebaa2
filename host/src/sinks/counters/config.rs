//! `[redis]` and `[[pipeline.counter]]`: where counters live, and the counters plugins increment.

use serde::Deserialize;

use crate::model::{Counter, is_identifier};

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

impl CounterConfig {
    /// The counter this declares, or why it cannot be.
    pub fn declare(&self) -> Result<Counter, String> {
        if !is_identifier(&self.name) {
            return Err(format!(
                "counter name {:?} must match [A-Za-z_][A-Za-z0-9_]*",
                self.name
            ));
        }
        if self.day_retention_days == 0 {
            return Err(format!(
                "counter {}: day_retention_days must be positive",
                self.name
            ));
        }
        Ok(Counter {
            name: self.name.clone(),
            by_day: self.by_day,
            day_retention_days: self.day_retention_days,
        })
    }
}
