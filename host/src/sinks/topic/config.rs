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
}

/// What a forwarded record is keyed by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicKey {
    #[default]
    UserId,
    EventId,
}
