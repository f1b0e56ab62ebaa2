//! `[[pipeline.topic]]`: a Kafka topic kept events are forwarded to.

use serde::Deserialize;

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
    /// Largest record the sink produces, in bytes (librdkafka's `message.max.bytes`):
    /// an event whose record is larger goes to `dead_letters` (stage `sink`) instead.
    /// Set it to the topic's `max.message.bytes` when that is lower than the broker's.
    /// Default 1000000; 1000-1000000000.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
}

/// The range of [`TopicConfig::max_record_bytes`] (librdkafka's own).
pub const MAX_RECORD_BYTES: std::ops::RangeInclusive<usize> = 1000..=1_000_000_000;

fn default_max_record_bytes() -> usize {
    1_000_000
}

/// What a forwarded record is keyed by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicKey {
    #[default]
    UserId,
    EventId,
}
