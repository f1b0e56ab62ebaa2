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
