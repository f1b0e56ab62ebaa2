//! `[[pipeline.webhook]]`: an HTTP endpoint kept events are POSTed to.

use serde::Deserialize;

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
