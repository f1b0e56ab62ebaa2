//! `[ingest]`: the HTTP endpoint's address and limits.

use std::net::SocketAddr;

use serde::Deserialize;

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
    /// Most connections open at once; beyond it a new connection is answered `503`
    /// with `Retry-After: 1` and closed at once. weir raises its open-files limit to
    /// fit, up to the hard limit. Default 4096; 1-1000000.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers, and longest a kept-alive
    /// connection may stay idle, in milliseconds: the connection is then closed.
    /// Default 10000; 100-300000.
    pub header_timeout_ms: u64,
    /// Longest a client may take to send a request's body, in milliseconds (408
    /// beyond). Default 15000; 100-600000.
    pub body_timeout_ms: u64,
    /// Whether the ingest port serves `GET /metrics` (it names every app, plugin and
    /// sink): `auto` (default) when `listen` is a loopback address, `yes`, or `no`.
    /// The admin port serves it in every case.
    pub metrics: MetricsOnIngest,
}

/// See [`IngestConfig::metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsOnIngest {
    #[default]
    Auto,
    Yes,
    No,
}

/// The range of [`IngestConfig::max_connections`].
pub const MAX_CONNECTIONS: std::ops::RangeInclusive<usize> = 1..=1_000_000;
/// The range of [`IngestConfig::header_timeout_ms`].
pub const HEADER_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=300_000;
/// The range of [`IngestConfig::body_timeout_ms`].
pub const BODY_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=600_000;

impl IngestConfig {
    /// Whether the ingest port serves `/metrics` (see [`IngestConfig::metrics`]).
    pub fn serves_metrics(&self) -> bool {
        match self.metrics {
            MetricsOnIngest::Auto => self.listen.ip().is_loopback(),
            MetricsOnIngest::Yes => true,
            MetricsOnIngest::No => false,
        }
    }

    /// What the ingest server bounds per connection.
    pub fn server_limits(&self) -> crate::http::ServerLimits {
        crate::http::ServerLimits {
            max_connections: self.max_connections,
            header_timeout: std::time::Duration::from_millis(self.header_timeout_ms),
        }
    }
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
            max_connections: 4096,
            header_timeout_ms: 10_000,
            body_timeout_ms: 15_000,
            metrics: MetricsOnIngest::Auto,
        }
    }
}
