//! `[clickhouse]` and `[[pipeline.table]]`: the server, and the typed tables plugins route rows to.

use serde::Deserialize;

/// `[clickhouse]`: where processed events and dead letters are written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP URL of the server. Default `http://127.0.0.1:8123`.
    pub url: String,
    /// Other endpoints serving the same tables (the other replicas of
    /// `[clickhouse.replication]`, a second load balancer), tried in order when the
    /// current one fails. Default none.
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
    /// `[clickhouse.replication]`: make weir's tables `Replicated*` (ZooKeeper keeps
    /// their replicas in step and stores a retried block once). Default: absent, plain
    /// `MergeTree` tables.
    pub replication: Option<ReplicationConfig>,
}

/// `[clickhouse.replication]`: weir's tables on a replicated cluster. The servers
/// need a `<zookeeper>` section and `<macros>` (`shard`, `replica`) in their config;
/// ON CLUSTER DDL also needs the cluster in their `<remote_servers>`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// A cluster of the servers' `<remote_servers>`: weir's DDL runs `ON CLUSTER` it,
    /// so every replica gets the tables, also ones weir has no URL of. Default none:
    /// weir creates the tables on each endpoint it is given (`url`, `failover_urls`).
    pub cluster: Option<String>,
    /// ZooKeeper path of each table; `{database}` and `{table}` are filled in by weir,
    /// other macros (`{shard}`) by the server. Default
    /// `/clickhouse/tables/{shard}/{database}/{table}`.
    pub zookeeper_path: String,
    /// Name of the replica; a macro of the server's config. Default `{replica}`.
    pub replica_name: String,
    /// How long an ON CLUSTER statement waits for every replica
    /// (`distributed_ddl_task_timeout`), in seconds. A replica that is down runs the
    /// statement when it is back; weir then goes on with a warning. Default 30.
    pub ddl_timeout_secs: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            cluster: None,
            zookeeper_path: "/clickhouse/tables/{shard}/{database}/{table}".into(),
            replica_name: "{replica}".into(),
            ddl_timeout_secs: 30,
        }
    }
}

impl ReplicationConfig {
    /// Checks the values that end up in DDL.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.cluster
            && !crate::model::is_identifier(c)
        {
            return Err(format!(
                "clickhouse.replication.cluster {c:?} must match [A-Za-z_][A-Za-z0-9_]*"
            ));
        }
        let quoted = |what: &str, v: &str| -> Result<(), String> {
            if v.is_empty() || v.contains(['\'', '\\']) || v.chars().any(char::is_control) {
                return Err(format!(
                    "clickhouse.replication.{what} {v:?} must be non-empty, without quotes, backslashes or control characters"
                ));
            }
            Ok(())
        };
        quoted("zookeeper_path", &self.zookeeper_path)?;
        quoted("replica_name", &self.replica_name)?;
        if !self.zookeeper_path.starts_with('/') || !self.zookeeper_path.contains("{table}") {
            return Err(format!(
                "clickhouse.replication.zookeeper_path {:?} must start with / and contain {{table}} (each table needs a path of its own)",
                self.zookeeper_path
            ));
        }
        if !(1..=3600).contains(&self.ddl_timeout_secs) {
            return Err(format!(
                "clickhouse.replication.ddl_timeout_secs must be 1-3600, not {}",
                self.ddl_timeout_secs
            ));
        }
        Ok(())
    }
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
            replication: None,
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
