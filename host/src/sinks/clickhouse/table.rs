//! The tables weir writes: the columns it fills itself, the column types a declared
//! table may use, their DDL, and their RowBinary encoding.
//!
//! A plugin's row arrives as JSON text; it is checked against the table's declared
//! columns once, when the pipeline resolves the plugin's outputs, and encoded straight
//! into RowBinary, so the sink only concatenates bytes. The SQL runs on ClickHouse
//! 18.16 (Debian 12's package) and on current releases.

use serde_json::Value;

use super::config::{ReplicationConfig, TableConfig};
use crate::model::{RoutedRow, is_identifier, json_kind as kind};

/// A ClickHouse server's release (`SELECT version()`), which decides the form of the
/// DDL weir sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    /// The oldest release weir runs on: Debian 12's package.
    pub const OLDEST: Self = Self::new(18, 16);
    /// From this release on (the 2020 long-term release) weir's tables use
    /// `LowCardinality(String)` for their few-valued strings (experimental before 19.3)
    /// and column codecs (`Delta` for times, `ZSTD` for JSON text; from 19.1 and 19.3).
    pub const CURRENT_FORM: Self = Self::new(20, 3);
    /// From this release on an INSERT takes `insert_deduplication_token` (22.2): weir
    /// names each INSERT by the rows it carries, so that a retry is recognised by its
    /// name rather than by its bytes (see `sink::insert_token`).
    pub const DEDUPLICATION_TOKEN: Self = Self::new(22, 2);

    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// `18.16.1`, `26.9.2.1`, `24.8.4.13-lts`: its first two numbers.
    pub fn parse(version: &str) -> Option<Self> {
        let mut parts = version.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.split(|c: char| !c.is_ascii_digit()).next()?;
        Some(Self::new(major, minor.parse().ok()?))
    }
}

impl Default for ServerVersion {
    fn default() -> Self {
        Self::OLDEST
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// How weir's tables are made: plain `MergeTree` tables on each server (the
/// default), or `Replicated*` tables that share their parts through ZooKeeper
/// (`[clickhouse.replication]`), created `ON CLUSTER` when a cluster is named; in the
/// form of the server they are made on ([`ServerVersion`]; default 18.16's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    pub replication: Option<ReplicationConfig>,
    pub server: ServerVersion,
}

impl Layout {
    pub fn replicated(cfg: ReplicationConfig) -> Self {
        Self {
            replication: Some(cfg),
            ..Self::default()
        }
    }

    /// The same tables on a server of release `server`.
    pub fn on_server(&self, server: ServerVersion) -> Self {
        Self {
            server,
            ..self.clone()
        }
    }

    /// Whether the tables take the current form ([`ServerVersion::CURRENT_FORM`]).
    pub fn is_current_form(&self) -> bool {
        self.server >= ServerVersion::CURRENT_FORM
    }

    /// The type of a string column with few distinct values (apps, names, stages).
    fn few_strings(&self) -> &'static str {
        if self.is_current_form() {
            "LowCardinality(String)"
        } else {
            "String"
        }
    }

    /// The codec clause of a column of `kind`: ` CODEC(...)` or nothing.
    fn codec(&self, kind: Codec) -> &'static str {
        if !self.is_current_form() {
            return "";
        }
        match kind {
            Codec::Time => " CODEC(Delta, ZSTD(1))",
            Codec::Text => " CODEC(ZSTD(1))",
        }
    }

    /// The ENGINE of table `table` of database `db`, of a MergeTree `family`
    /// (`MergeTree`, `ReplacingMergeTree`): `MergeTree()`, or
    /// `ReplicatedMergeTree('/clickhouse/tables/{shard}/db/table', '{replica}')` with
    /// `{database}` and `{table}` of the configured path filled in here (ClickHouse
    /// 18.16 knows only the macros of its own config, such as `{shard}` and `{replica}`).
    pub fn engine(&self, family: &str, db: &str, table: &str) -> String {
        match &self.replication {
            None => format!("{family}()"),
            Some(r) => format!(
                "Replicated{family}('{}', '{}')",
                r.zookeeper_path
                    .replace("{database}", db)
                    .replace("{table}", table),
                r.replica_name
            ),
        }
    }

    /// ` ON CLUSTER name` when a cluster is named, else nothing.
    pub fn on_cluster(&self) -> String {
        match self.replication.as_ref().and_then(|r| r.cluster.as_deref()) {
            Some(c) => format!(" ON CLUSTER {c}"),
            None => String::new(),
        }
    }

    pub fn is_replicated(&self) -> bool {
        self.replication.is_some()
    }
}

/// What a column's codec is chosen for.
#[derive(Clone, Copy)]
enum Codec {
    /// Times and offsets: close to their neighbours, so their deltas are small.
    Time,
    /// JSON text.
    Text,
}

/// A statement of weir's DDL and what it creates.
#[derive(Debug, Clone)]
pub struct Ddl {
    /// The table or view it creates in the database; `None`: the database itself.
    pub creates: Option<String>,
    pub sql: String,
    /// For a coordinates view ([`coords_view`]): the statement that fills it with the
    /// rows its table held before the view existed (run when the view is new and the
    /// table is not).
    pub backfill: Option<Backfill>,
}

/// See [`Ddl::backfill`].
#[derive(Debug, Clone)]
pub struct Backfill {
    /// The table the view copies from.
    pub table: String,
    pub sql: String,
}

impl Ddl {
    fn new(creates: Option<&str>, sql: String) -> Self {
        Self {
            creates: creates.map(str::to_owned),
            sql,
            backfill: None,
        }
    }
}

/// The view that keeps the Kafka coordinates of the rows of `table`, sorted by them:
/// the replay guard's lookups by partition and offset read a range of its index
/// instead of every row of the table (whose sorting key starts with `app`).
pub fn coords_view(table: &str) -> String {
    format!("{COORDS_PREFIX}{table}")
}

/// Names that start with it are weir's ([`coords_view`]); a declared table may not.
pub const COORDS_PREFIX: &str = "_weir_coords_";

/// The Kafka coordinates, which end the sorting key of every table weir makes (not its
/// primary index): rows that tie on the rest are sorted the same way in every INSERT,
/// so a retried INSERT makes the same part, which a replicated table recognises (its
/// block deduplication hashes the part) and stores once, also on the other replica.
const KAFKA: &str = "kafka_partition, kafka_offset, kafka_index";

/// The coordinate columns of every table, and those of `dead_letters`, which the guard
/// tells apart also by stage and plugin (one event can fail at two stages).
const COORDS: &str = "kafka_partition, kafka_offset, kafka_index, event_id";
const DEAD_COORDS: &str = "kafka_partition, kafka_offset, kafka_index, event_id, stage, plugin";

/// The coordinates view of `table` ([`coords_view`]), filled by ClickHouse in the same
/// INSERT as the table's rows, with its backfill.
fn coords_ddl(db: &str, table: &str, columns: &str, layout: &Layout) -> Ddl {
    let view = coords_view(table);
    let sql = format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{view}{} \
         ENGINE = {} ORDER BY ({KAFKA}) \
         AS SELECT {columns} FROM {db}.{table}",
        layout.on_cluster(),
        layout.engine("MergeTree", db, &view),
    );
    Ddl {
        creates: Some(view.clone()),
        sql,
        backfill: Some(Backfill {
            table: table.to_owned(),
            // An INSERT into a materialized view goes to the table it keeps its rows in.
            sql: format!("INSERT INTO {db}.{view} ({columns}) SELECT {columns} FROM {db}.{table}"),
        }),
    }
}

/// DDL of the tables weir writes, for a database name (the statements of
/// [`schema_ddl`]). Idempotent.
pub fn schema(db: &str, layout: &Layout) -> Vec<String> {
    schema_ddl(db, layout).into_iter().map(|d| d.sql).collect()
}

/// DDL of the tables weir writes, for a database name, each with what it creates.
/// Idempotent.
pub fn schema_ddl(db: &str, layout: &Layout) -> Vec<Ddl> {
    let on = layout.on_cluster();
    let engine = |family: &str, table: &str| layout.engine(family, db, table);
    let few = layout.few_strings();
    let (time, text) = (layout.codec(Codec::Time), layout.codec(Codec::Text));
    vec![
        Ddl::new(None, format!("CREATE DATABASE IF NOT EXISTS {db}{on}")),
        Ddl::new(
            Some("events"),
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.events{on} (
                event_id String,
                app {few},
                name {few},
                user_id Nullable(String),
                timestamp DateTime{time},
                timestamp_ms Int64{time},
                received_at DateTime{time},
                properties String{text},
                context String{text},
                pipeline {few},
                plugins {few},
                control_version UInt64,
                kafka_partition UInt32,
                kafka_offset UInt64,
                kafka_index UInt32
            ) ENGINE = {}
            PARTITION BY toYYYYMM(timestamp)
            ORDER BY (app, name, timestamp, event_id, {KAFKA})
            PRIMARY KEY (app, name, timestamp, event_id)",
                engine("MergeTree", "events")
            ),
        ),
        Ddl::new(
            Some("dead_letters"),
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.dead_letters{on} (
                event_id String,
                app {few},
                name {few},
                stage {few},
                plugin {few},
                plugin_version {few},
                reason String{text},
                raw String{text},
                failed_at DateTime{time},
                pipeline {few},
                control_version UInt64,
                kafka_partition UInt32,
                kafka_offset UInt64,
                kafka_index UInt32
            ) ENGINE = {}
            PARTITION BY toYYYYMM(failed_at)
            ORDER BY (stage, failed_at, {KAFKA})
            PRIMARY KEY (stage, failed_at)",
                engine("MergeTree", "dead_letters")
            ),
        ),
        // Who an anonymous visitor turned out to be: each identify or alias event that
        // ties an earlier id (an alias's `context.previous_id`, else the event's
        // `context.anonymous_id`) to a user id, as the tracking SDKs' events carry them
        // (see ingest::sdk). Filled as events are written; one row per pair once merged.
        Ddl::new(
            Some(IDENTITIES),
            format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{IDENTITIES}{on}
            ENGINE = {}
            ORDER BY (app, anonymous_id, user_id)
            AS SELECT
                app,
                if(name IN ('alias', 'create_alias')
                       AND visitParamExtractString(context, 'previous_id') != '',
                   visitParamExtractString(context, 'previous_id'),
                   visitParamExtractString(context, 'anonymous_id')) AS anonymous_id,
                assumeNotNull(user_id) AS user_id,
                timestamp,
                name AS via,
                event_id
            FROM {db}.events
            WHERE name IN ('identify', 'alias', 'create_alias')
                AND isNotNull(user_id)
                AND anonymous_id != ''
                AND anonymous_id != assumeNotNull(user_id)",
                engine("ReplacingMergeTree", IDENTITIES)
            ),
        ),
        coords_ddl(db, "events", COORDS, layout),
        coords_ddl(db, "dead_letters", DEAD_COORDS, layout),
    ]
}

/// The migration of a table weir made before it recorded the control-plane version
/// (run when the table lacks the column). Not `ON CLUSTER`: on a replicated table the
/// ALTER reaches every replica through ZooKeeper.
pub fn add_control_version(db: &str, table: &str) -> String {
    format!("ALTER TABLE {db}.{table} ADD COLUMN control_version UInt64 DEFAULT 0")
}

/// The view of anonymous ids and the users they turned out to be.
pub const IDENTITIES: &str = "identities";

/// Names weir's own tables and views have, which a declared table may not take.
pub const RESERVED: [&str; 3] = ["events", "dead_letters", IDENTITIES];

/// Columns weir fills in every routed table, in this order, before the declared ones.
pub const SYSTEM_COLUMNS: [(&str, &str); 8] = [
    ("event_id", "String"),
    ("app", "String"),
    ("timestamp", "DateTime"),
    ("plugins", "String"),
    ("control_version", "UInt64"),
    ("kafka_partition", "UInt32"),
    ("kafka_offset", "UInt64"),
    ("kafka_index", "UInt32"),
];

/// A column type weir can check and encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    String,
    Int(u8),
    UInt(u8),
    Float32,
    Float64,
    Bool,
    Date,
    DateTime,
    Nullable(Box<ColumnType>),
}

impl ColumnType {
    /// Parses a declared type (`UInt32`, `Nullable(String)` ...).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(inner) = s
            .strip_prefix("Nullable(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let inner = Self::parse(inner)?;
            if matches!(inner, Self::Nullable(_)) {
                return Err(format!("type {s} nests Nullable"));
            }
            return Ok(Self::Nullable(Box::new(inner)));
        }
        Ok(match s {
            "String" => Self::String,
            "Int8" => Self::Int(8),
            "Int16" => Self::Int(16),
            "Int32" => Self::Int(32),
            "Int64" => Self::Int(64),
            "UInt8" => Self::UInt(8),
            "UInt16" => Self::UInt(16),
            "UInt32" => Self::UInt(32),
            "UInt64" => Self::UInt(64),
            "Float32" => Self::Float32,
            "Float64" => Self::Float64,
            "Bool" => Self::Bool,
            "Date" => Self::Date,
            "DateTime" => Self::DateTime,
            other => {
                return Err(format!(
                    "unsupported column type {other:?} (String, Int8-64, UInt8-64, Float32/64, Bool, Date, DateTime, Nullable(T))"
                ));
            }
        })
    }

    /// The ClickHouse type of the column.
    pub fn sql(&self) -> String {
        match self {
            Self::String => "String".into(),
            Self::Int(bits) => format!("Int{bits}"),
            Self::UInt(bits) => format!("UInt{bits}"),
            Self::Float32 => "Float32".into(),
            Self::Float64 => "Float64".into(),
            Self::Bool => "UInt8".into(),
            Self::Date => "Date".into(),
            Self::DateTime => "DateTime".into(),
            Self::Nullable(inner) => format!("Nullable({})", inner.sql()),
        }
    }

    /// Appends `value` in RowBinary, or says why it does not fit.
    pub fn encode(&self, value: Option<&Value>, out: &mut Vec<u8>) -> Result<(), String> {
        let value = match (self, value) {
            (Self::Nullable(inner), v) => {
                return match v {
                    None | Some(Value::Null) => {
                        out.push(1);
                        Ok(())
                    }
                    Some(v) => {
                        out.push(0);
                        inner.encode(Some(v), out)
                    }
                };
            }
            (_, None) => return Err("is missing (only Nullable columns may be)".into()),
            (_, Some(v)) => v,
        };
        let wrong = || format!("is {}, got {}", self.sql(), kind(value));
        match self {
            Self::String => {
                let s = value.as_str().ok_or_else(wrong)?;
                put_varint(out, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            Self::Int(bits) => {
                let n = value.as_i64().ok_or_else(wrong)?;
                let (lo, hi) = match bits {
                    64 => (i64::MIN, i64::MAX),
                    b => (-(1i64 << (b - 1)), (1i64 << (b - 1)) - 1),
                };
                if n < lo || n > hi {
                    return Err(format!("is Int{bits}; {n} is out of range"));
                }
                out.extend_from_slice(&n.to_le_bytes()[..(*bits as usize / 8)]);
            }
            Self::UInt(bits) => {
                let n = value.as_u64().ok_or_else(wrong)?;
                if *bits < 64 && n >= (1u64 << bits) {
                    return Err(format!("is UInt{bits}; {n} is out of range"));
                }
                out.extend_from_slice(&n.to_le_bytes()[..(*bits as usize / 8)]);
            }
            Self::Float32 => {
                let f = value.as_f64().ok_or_else(wrong)?;
                out.extend_from_slice(&(f as f32).to_le_bytes());
            }
            Self::Float64 => {
                let f = value.as_f64().ok_or_else(wrong)?;
                out.extend_from_slice(&f.to_le_bytes());
            }
            Self::Bool => out.push(u8::from(value.as_bool().ok_or_else(wrong)?)),
            Self::Date => {
                let s = value.as_str().ok_or_else(wrong)?;
                let date =
                    time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
                        .map_err(|_| format!("is Date; {s:?} is not YYYY-MM-DD"))?;
                let days = date.to_julian_day()
                    - time::Date::from_calendar_date(1970, time::Month::January, 1)
                        .expect("valid date")
                        .to_julian_day();
                let days = u16::try_from(days)
                    .map_err(|_| format!("is Date; {s} is out of range (1970-2149)"))?;
                out.extend_from_slice(&days.to_le_bytes());
            }
            Self::DateTime => {
                let ms = match value {
                    Value::Number(n) => n.as_i64().ok_or_else(wrong)?,
                    Value::String(s) => {
                        time::OffsetDateTime::parse(
                            s,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .map_err(|_| format!("is DateTime; {s:?} is not RFC 3339"))?
                        .unix_timestamp()
                            * 1000
                    }
                    _ => return Err(wrong()),
                };
                let secs = u32::try_from(ms.div_euclid(1000))
                    .map_err(|_| format!("is DateTime; {ms} ms is out of range (1970-2106)"))?;
                out.extend_from_slice(&secs.to_le_bytes());
            }
            Self::Nullable(_) => unreachable!("handled above"),
        }
        Ok(())
    }
}

/// Appends an unsigned LEB128 number (RowBinary's string length prefix).
pub fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// One declared column.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
}

/// A declared table.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
    pub order_by: Vec<String>,
}

impl Table {
    pub fn new(cfg: &TableConfig) -> Result<Self, String> {
        let t = &cfg.name;
        if !is_identifier(t) || RESERVED.contains(&t.as_str()) || t.starts_with(COORDS_PREFIX) {
            return Err(format!(
                "table name {t:?} must match [A-Za-z_][A-Za-z0-9_]*, not be {} and not start with {COORDS_PREFIX}",
                RESERVED.join(", ")
            ));
        }
        if cfg.columns.is_empty() {
            return Err(format!("table {t} declares no columns"));
        }
        let mut columns: Vec<Column> = Vec::new();
        for decl in &cfg.columns {
            let (name, ty) = decl
                .trim()
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("table {t}: column {decl:?} must be \"name Type\""))?;
            if !is_identifier(name) {
                return Err(format!(
                    "table {t}: column name {name:?} must match [A-Za-z_][A-Za-z0-9_]*"
                ));
            }
            if SYSTEM_COLUMNS.iter().any(|(n, _)| *n == name) {
                return Err(format!(
                    "table {t}: column {name} is filled by weir itself; choose another name"
                ));
            }
            if columns.iter().any(|c| c.name == name) {
                return Err(format!("table {t}: column {name} is declared twice"));
            }
            let ty = ColumnType::parse(ty).map_err(|e| format!("table {t}, column {name}: {e}"))?;
            columns.push(Column {
                name: name.to_owned(),
                ty,
            });
        }
        let order_by = if cfg.order_by.is_empty() {
            vec!["timestamp".to_owned()]
        } else {
            cfg.order_by.clone()
        };
        for key in &order_by {
            let known = SYSTEM_COLUMNS.iter().any(|(n, _)| n == key)
                || columns
                    .iter()
                    .any(|c| &c.name == key && !matches!(c.ty, ColumnType::Nullable(_)));
            if !known {
                return Err(format!(
                    "table {t}: order_by names {key:?}, which is not a non-Nullable column"
                ));
            }
        }
        Ok(Self {
            name: t.clone(),
            columns,
            order_by,
        })
    }

    /// [`Table::ddl`], with what it creates, and its coordinates view's.
    pub fn ddl_statements(&self, db: &str, layout: &Layout) -> [Ddl; 2] {
        [
            Ddl::new(Some(&self.name), self.ddl(db, layout)),
            coords_ddl(db, &self.name, COORDS, layout),
        ]
    }

    /// `CREATE TABLE IF NOT EXISTS` for this table in database `db`.
    pub fn ddl(&self, db: &str, layout: &Layout) -> String {
        let columns: Vec<String> = SYSTEM_COLUMNS
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .chain(
                self.columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.ty.sql())),
            )
            .collect();
        // The coordinates end the sorting key (see KAFKA), unless it has them already.
        let sort: Vec<&str> = self
            .order_by
            .iter()
            .map(String::as_str)
            .chain(
                KAFKA
                    .split(", ")
                    .filter(|c| !self.order_by.iter().any(|o| o == c)),
            )
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{}{} ({}) ENGINE = {} PARTITION BY toYYYYMM(timestamp) \
             ORDER BY ({}) PRIMARY KEY ({order})",
            self.name,
            layout.on_cluster(),
            columns.join(", "),
            layout.engine("MergeTree", db, &self.name),
            sort.join(", "),
            order = self.order_by.join(", "),
        )
    }

    /// The column list of an INSERT, in RowBinary order.
    pub fn insert_columns(&self) -> String {
        SYSTEM_COLUMNS
            .iter()
            .map(|(n, _)| *n)
            .chain(self.columns.iter().map(|c| c.name.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks a plugin's row (JSON object text) and encodes the declared columns.
    pub fn encode(&self, json: &str) -> Result<Vec<u8>, String> {
        let map: serde_json::Map<String, Value> = serde_json::from_str(json)
            .map_err(|e| format!("row for table {} is not a JSON object: {e}", self.name))?;
        if let Some(extra) = map
            .keys()
            .find(|k| !self.columns.iter().any(|c| &c.name == *k))
        {
            return Err(format!("table {} has no column {extra:?}", self.name));
        }
        let mut out = Vec::with_capacity(json.len());
        for c in &self.columns {
            c.ty.encode(map.get(&c.name), &mut out)
                .map_err(|e| format!("table {}, column {} {e}", self.name, c.name))?;
        }
        Ok(out)
    }
}

/// True if both declare the same tables (names, columns, order).
pub fn same_tables(a: &[Table], b: &[Table]) -> bool {
    let plain = Layout::default();
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.ddl("", &plain) == y.ddl("", &plain))
}

/// Appends a routed row in RowBinary: weir's columns in [`SYSTEM_COLUMNS`] order, then
/// the declared ones (already encoded).
pub fn put_routed_row(out: &mut Vec<u8>, row: &RoutedRow, plugins: &str, control_version: u64) {
    put_string(out, &row.event_id);
    put_string(out, &row.app);
    out.extend_from_slice(&datetime(row.timestamp_ms).to_le_bytes());
    put_string(out, plugins);
    out.extend_from_slice(&control_version.to_le_bytes());
    out.extend_from_slice(&(row.origin.partition as u32).to_le_bytes());
    out.extend_from_slice(&(row.origin.offset as u64).to_le_bytes());
    out.extend_from_slice(&row.origin.index.to_le_bytes());
    out.extend_from_slice(&row.data);
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Seconds since the epoch for a `DateTime` column (clamped to its range).
pub fn datetime(ms: i64) -> u32 {
    (ms.div_euclid(1000)).clamp(0, u32::MAX as i64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_read_from_what_servers_answer() {
        let v = |s| ServerVersion::parse(s);
        assert_eq!(v("18.16.1"), Some(ServerVersion::new(18, 16)));
        assert_eq!(v("26.9.2.1"), Some(ServerVersion::new(26, 9)));
        assert_eq!(v("24.8.4.13-lts\n"), Some(ServerVersion::new(24, 8)));
        assert_eq!(v("20.3"), Some(ServerVersion::new(20, 3)));
        assert_eq!(v("25.10-alpha"), Some(ServerVersion::new(25, 10)));
        for bad in ["", "26", "x.1", "26.x", "-1.2"] {
            assert_eq!(v(bad), None, "{bad:?}");
        }
        // Compared as numbers, not text.
        assert!(ServerVersion::new(20, 10) > ServerVersion::new(20, 3));
        assert!(ServerVersion::new(100, 0) > ServerVersion::new(99, 12));
        assert_eq!(ServerVersion::new(26, 9).to_string(), "26.9");
    }

    /// 18.16 and releases before the 2020 LTS get plain strings and no codecs; from it
    /// on, LowCardinality and codecs. Routed tables are the same on both.
    #[test]
    fn the_tables_take_the_form_of_the_server_they_are_made_on() {
        let old = Layout::default();
        let before = old.on_server(ServerVersion::new(20, 1));
        let current = old.on_server(ServerVersion::CURRENT_FORM);
        for layout in [&old, &before] {
            let sql = schema("w", layout).join("\n");
            assert!(
                !sql.contains("LowCardinality") && !sql.contains("CODEC"),
                "{sql}"
            );
            assert!(sql.contains("app String,"), "{sql}");
        }
        let sql = schema("w", &current);
        let events = &sql[1];
        for column in [
            "app LowCardinality(String),",
            "name LowCardinality(String),",
            "timestamp DateTime CODEC(Delta, ZSTD(1)),",
            "properties String CODEC(ZSTD(1)),",
            "event_id String,",
            "user_id Nullable(String),",
        ] {
            assert!(events.contains(column), "{column}: {events}");
        }
        assert!(
            sql[2].contains("stage LowCardinality(String),"),
            "{}",
            sql[2]
        );
        assert!(sql[2].contains("raw String CODEC(ZSTD(1)),"), "{}", sql[2]);
        let table = Table::new(&TableConfig {
            name: "views".into(),
            columns: vec!["profile_id String".into()],
            order_by: vec![],
        })
        .unwrap();
        assert_eq!(table.ddl("w", &old), table.ddl("w", &current));
    }

    /// Every table's sorting key ends with the Kafka coordinates, so that rows are in
    /// the same order in every INSERT of them (a retried block is the same part); the
    /// primary index stays the declared key.
    #[test]
    fn sorting_keys_end_with_the_kafka_coordinates() {
        let sql = schema("w", &Layout::default());
        assert!(
            sql[1].contains("ORDER BY (app, name, timestamp, event_id, kafka_partition, kafka_offset, kafka_index)")
                && sql[1].contains("PRIMARY KEY (app, name, timestamp, event_id)"),
            "{}",
            sql[1]
        );
        assert!(
            sql[2].contains(
                "ORDER BY (stage, failed_at, kafka_partition, kafka_offset, kafka_index)"
            ) && sql[2].contains("PRIMARY KEY (stage, failed_at)"),
            "{}",
            sql[2]
        );
        let routed = |order_by: &[&str]| {
            Table::new(&TableConfig {
                name: "views".into(),
                columns: vec!["profile_id String".into()],
                order_by: order_by.iter().map(|s| s.to_string()).collect(),
            })
            .unwrap()
            .ddl("w", &Layout::default())
        };
        assert!(
            routed(&["profile_id", "timestamp"]).ends_with(
                "ORDER BY (profile_id, timestamp, kafka_partition, kafka_offset, kafka_index) \
                 PRIMARY KEY (profile_id, timestamp)"
            ),
            "{}",
            routed(&["profile_id", "timestamp"])
        );
        // A coordinate in the declared key is not repeated.
        assert!(
            routed(&["kafka_offset"]).ends_with(
                "ORDER BY (kafka_offset, kafka_partition, kafka_index) PRIMARY KEY (kafka_offset)"
            ),
            "{}",
            routed(&["kafka_offset"])
        );
    }

    #[test]
    fn a_replicated_layout_names_each_table_its_own_path_and_runs_on_the_cluster() {
        let layout = Layout::replicated(ReplicationConfig {
            cluster: Some("prod".into()),
            ..Default::default()
        });
        let sql = schema("w", &layout);
        assert_eq!(sql[0], "CREATE DATABASE IF NOT EXISTS w ON CLUSTER prod");
        assert!(sql[1].starts_with("CREATE TABLE IF NOT EXISTS w.events ON CLUSTER prod ("));
        assert!(sql[1].contains(
            "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/w/events', '{replica}')"
        ));
        assert!(sql[2].contains("'/clickhouse/tables/{shard}/w/dead_letters', '{replica}'"));
        assert!(
            sql[3]
                .starts_with("CREATE MATERIALIZED VIEW IF NOT EXISTS w.identities ON CLUSTER prod")
        );
        assert!(sql[3].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/w/identities', '{replica}')"
        ));
        let table = Table::new(&TableConfig {
            name: "views".into(),
            columns: vec!["profile_id String".into()],
            order_by: vec![],
        })
        .unwrap();
        let ddl = table.ddl("w", &layout);
        assert!(
            ddl.starts_with("CREATE TABLE IF NOT EXISTS w.views ON CLUSTER prod ("),
            "{ddl}"
        );
        assert!(
            ddl.contains(
                "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/w/views', '{replica}')"
            ),
            "{ddl}"
        );
        let [made, coords] = table.ddl_statements("w", &layout);
        assert_eq!(made.creates.as_deref(), Some("views"));
        assert_eq!(coords.creates.as_deref(), Some("_weir_coords_views"));
        assert!(coords.sql.contains(
            "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/w/_weir_coords_views', '{replica}') ORDER BY (kafka_partition, kafka_offset, kafka_index)"
        ));
        assert_eq!(
            coords.backfill.unwrap().sql,
            "INSERT INTO w._weir_coords_views (kafka_partition, kafka_offset, kafka_index, event_id) \
             SELECT kafka_partition, kafka_offset, kafka_index, event_id FROM w.views"
        );
        // Without a cluster: no ON CLUSTER; the plain layout: MergeTree().
        let alone = Layout::replicated(ReplicationConfig::default());
        assert!(!schema("w", &alone).iter().any(|s| s.contains("ON CLUSTER")));
        let plain = schema("w", &Layout::default());
        assert!(plain[1].contains("ENGINE = MergeTree()"));
        assert!(plain[3].contains("ENGINE = ReplacingMergeTree()"));
        let creates: Vec<Option<String>> = schema_ddl("w", &Layout::default())
            .into_iter()
            .map(|d| d.creates)
            .collect();
        assert_eq!(
            creates,
            [
                None,
                Some("events".into()),
                Some("dead_letters".into()),
                Some(IDENTITIES.into()),
                Some("_weir_coords_events".into()),
                Some("_weir_coords_dead_letters".into())
            ]
        );
    }
}
