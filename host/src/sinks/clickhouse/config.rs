//! `[clickhouse]` and `[[pipeline.table]]`: the server, and the typed tables plugins route rows to.

use serde::Deserialize;

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
