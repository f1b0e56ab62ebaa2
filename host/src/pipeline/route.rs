//! Routing: the tables and counters a pipeline declares, and the checking of what
//! plugins send to them (`row` and `count` outputs).
//!
//! A plugin's row arrives as JSON text; it is checked against the table's declared
//! columns here, once, and encoded straight into ClickHouse's `RowBinary`, so the sink
//! only concatenates bytes. A bad row fails its event (dead letter naming the table and
//! column), never the batch.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{CounterConfig, PipelineConfig, TableConfig, is_identifier};
use crate::runtime::{Count, Output, Row};

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

/// Longest counter key, in bytes.
pub const MAX_COUNTER_KEY: usize = 256;

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
    fn encode(&self, value: Option<&Value>, out: &mut Vec<u8>) -> Result<(), String> {
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

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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
    fn new(cfg: &TableConfig) -> Result<Self, String> {
        let t = &cfg.name;
        if !is_identifier(t) || t == "events" || t == "dead_letters" {
            return Err(format!(
                "table name {t:?} must match [A-Za-z_][A-Za-z0-9_]* and not be events or dead_letters"
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

    /// `CREATE TABLE IF NOT EXISTS` for this table in database `db`.
    pub fn ddl(&self, db: &str) -> String {
        let columns: Vec<String> = SYSTEM_COLUMNS
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .chain(
                self.columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.ty.sql())),
            )
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{} ({}) ENGINE = MergeTree() PARTITION BY toYYYYMM(timestamp) ORDER BY ({})",
            self.name,
            columns.join(", "),
            self.order_by.join(", ")
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
    fn encode(&self, json: &str) -> Result<Vec<u8>, String> {
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

/// A declared counter.
#[derive(Debug, Clone)]
pub struct Counter {
    pub name: String,
    pub by_day: bool,
    pub day_retention_days: u32,
}

impl Counter {
    fn new(cfg: &CounterConfig) -> Result<Self, String> {
        if !is_identifier(&cfg.name) {
            return Err(format!(
                "counter name {:?} must match [A-Za-z_][A-Za-z0-9_]*",
                cfg.name
            ));
        }
        if cfg.day_retention_days == 0 {
            return Err(format!(
                "counter {}: day_retention_days must be positive",
                cfg.name
            ));
        }
        Ok(Self {
            name: cfg.name.clone(),
            by_day: cfg.by_day,
            day_retention_days: cfg.day_retention_days,
        })
    }
}

/// A checked row: the table's index in [`Routes::tables`] and the declared columns
/// encoded in RowBinary.
#[derive(Debug, Clone)]
pub struct RowData {
    pub table: usize,
    pub data: Vec<u8>,
}

/// A checked increment: the counter's index in [`Routes::counters`].
#[derive(Debug, Clone)]
pub struct Increment {
    pub counter: usize,
    pub key: String,
    pub delta: i64,
}

/// A forwarding sink a plugin can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Index into the pipeline's webhooks.
    Webhook(usize),
    /// Index into the pipeline's topic sinks.
    Topic(usize),
}

/// What one event sends besides itself, accumulated over the chain.
#[derive(Debug, Clone, Default)]
pub struct Fanout {
    pub rows: Vec<RowData>,
    pub increments: Vec<Increment>,
    pub forwards: Vec<Target>,
}

/// The tables and counters of a pipeline.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub tables: Vec<Table>,
    /// Shared with the increments that name them, which may outlive a pipeline swap.
    pub counters: Vec<Arc<Counter>>,
    table_index: HashMap<String, usize>,
    counter_index: HashMap<String, usize>,
    targets: HashMap<String, Target>,
}

impl Routes {
    /// Checks the declarations of a pipeline.
    pub fn new(cfg: &PipelineConfig) -> Result<Self, String> {
        let mut routes = Self::default();
        for t in &cfg.tables {
            let table = Table::new(t)?;
            if routes
                .table_index
                .insert(table.name.clone(), routes.tables.len())
                .is_some()
            {
                return Err(format!("table {} is declared twice", table.name));
            }
            routes.tables.push(table);
        }
        for (i, w) in cfg.webhooks.iter().enumerate() {
            routes.targets.insert(w.name.clone(), Target::Webhook(i));
        }
        for (i, t) in cfg.topics.iter().enumerate() {
            routes.targets.insert(t.name.clone(), Target::Topic(i));
        }
        for c in &cfg.counters {
            let counter = Counter::new(c)?;
            if routes
                .counter_index
                .insert(counter.name.clone(), routes.counters.len())
                .is_some()
            {
                return Err(format!("counter {} is declared twice", counter.name));
            }
            routes.counters.push(Arc::new(counter));
        }
        Ok(routes)
    }

    /// The counter named `name`, if declared.
    pub fn counter(&self, name: &str) -> Option<&Counter> {
        self.counter_index.get(name).map(|&i| &*self.counters[i])
    }

    /// True if both declare the same tables (names, columns, order).
    pub fn same_tables(&self, other: &Routes) -> bool {
        let ddl = |r: &Routes| r.tables.iter().map(|t| t.ddl("")).collect::<Vec<_>>();
        ddl(self) == ddl(other)
    }

    /// Checks a plugin's outputs and adds them to `fanout`. On error nothing is added
    /// and the message names the output at fault.
    pub fn resolve(&self, outputs: Vec<Output>, fanout: &mut Fanout) -> Result<(), String> {
        let mut rows = Vec::new();
        let mut increments = Vec::new();
        let mut forwards = Vec::new();
        for output in outputs {
            match output {
                Output::Forward(name) => {
                    let &target = self.targets.get(&name).ok_or_else(|| {
                        format!(
                            "forward to {name:?}, which is no webhook or topic sink of the pipeline"
                        )
                    })?;
                    if !forwards.contains(&target) {
                        forwards.push(target);
                    }
                }
                Output::Row(Row { table, columns }) => {
                    let &i = self.table_index.get(&table).ok_or_else(|| {
                        format!("row for table {table:?}, which the pipeline does not declare")
                    })?;
                    rows.push(RowData {
                        table: i,
                        data: self.tables[i].encode(&columns)?,
                    });
                }
                Output::Count(Count {
                    counter,
                    key,
                    delta,
                }) => {
                    let &i = self.counter_index.get(&counter).ok_or_else(|| {
                        format!(
                            "count for counter {counter:?}, which the pipeline does not declare"
                        )
                    })?;
                    if key.is_empty() || key.len() > MAX_COUNTER_KEY {
                        return Err(format!(
                            "count for counter {counter}: the key must be 1-{MAX_COUNTER_KEY} bytes, got {}",
                            key.len()
                        ));
                    }
                    if delta != 0 {
                        increments.push(Increment {
                            counter: i,
                            key,
                            delta,
                        });
                    }
                }
            }
        }
        fanout.rows.append(&mut rows);
        fanout.increments.append(&mut increments);
        for t in forwards {
            if !fanout.forwards.contains(&t) {
                fanout.forwards.push(t);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(toml_text: &str) -> Result<Routes, String> {
        let cfg: PipelineConfig = toml::from_str(toml_text).unwrap();
        Routes::new(&cfg)
    }

    fn views() -> Routes {
        routes(
            r#"
            [[table]]
            name = "profile_viewed"
            columns = ["profile_id String", "viewer Nullable(String)", "ms UInt16", "at DateTime", "day Date", "ok Bool", "score Float64", "delta Int8"]
            order_by = ["profile_id", "timestamp"]
            [[counter]]
            name = "profile_views"
            by_day = true
            "#,
        )
        .unwrap()
    }

    fn row(table: &str, columns: &str) -> Output {
        Output::Row(Row {
            table: table.into(),
            columns: columns.into(),
        })
    }

    #[test]
    fn rows_are_encoded_in_rowbinary_in_declared_order() {
        let r = views();
        let mut f = Fanout::default();
        r.resolve(
            vec![row(
                "profile_viewed",
                r#"{"delta":-2,"profile_id":"p1","ms":513,"at":1000,"day":"1970-01-03","ok":true,"score":0.5}"#,
            )],
            &mut f,
        )
        .unwrap();
        let mut want = vec![2, b'p', b'1', 1, 0x01, 0x02, 1, 0, 0, 0, 2, 0, 1];
        want.extend_from_slice(&0.5f64.to_le_bytes());
        want.push(0xfe);
        assert_eq!(f.rows[0].data, want);
        assert_eq!(f.rows[0].table, 0);
    }

    #[test]
    fn bad_rows_name_the_table_and_column() {
        let r = views();
        let cases = [
            (
                r#"{"profile_id":1}"#,
                "column profile_id is String, got a number",
            ),
            (
                r#"{"profile_id":"p","ms":70000,"at":0,"day":"1970-01-01","ok":true,"score":1,"delta":0}"#,
                "UInt16; 70000 is out of range",
            ),
            (r#"{"profile_id":"p"}"#, "column ms is missing"),
            (r#"{"profile_id":"p","nope":1}"#, "has no column \"nope\""),
            ("[1]", "not a JSON object"),
            (
                r#"{"profile_id":"p","ms":1,"at":"yesterday","day":"1970-01-01","ok":true,"score":1,"delta":0}"#,
                "not RFC 3339",
            ),
        ];
        for (json, want) in cases {
            let mut f = Fanout::default();
            let err = r
                .resolve(vec![row("profile_viewed", json)], &mut f)
                .unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
            assert!(f.rows.is_empty());
        }
        let err = r
            .resolve(vec![row("nope", "{}")], &mut Fanout::default())
            .unwrap_err();
        assert!(err.contains("does not declare"), "{err}");
    }

    #[test]
    fn counts_need_a_declared_counter_and_a_sane_key() {
        let r = views();
        let count = |counter: &str, key: &str| {
            Output::Count(Count {
                counter: counter.into(),
                key: key.into(),
                delta: 1,
            })
        };
        let mut f = Fanout::default();
        r.resolve(vec![count("profile_views", "p1")], &mut f)
            .unwrap();
        assert_eq!(f.increments.len(), 1);
        assert!(r.resolve(vec![count("likes", "p1")], &mut f).is_err());
        assert!(r.resolve(vec![count("profile_views", "")], &mut f).is_err());
        let long = "k".repeat(MAX_COUNTER_KEY + 1);
        assert!(
            r.resolve(vec![count("profile_views", &long)], &mut f)
                .is_err()
        );
        assert_eq!(f.increments.len(), 1, "a failed resolve adds nothing");
    }

    #[test]
    fn forwards_name_a_webhook_or_topic_sink() {
        let r = routes(
            "[[webhook]]\nname = \"crm\"\nurl = \"http://x/\"\n[[topic]]\nname = \"out\"\ntopic = \"o\"\n",
        )
        .unwrap();
        let mut f = Fanout::default();
        r.resolve(
            vec![
                Output::Forward("out".into()),
                Output::Forward("crm".into()),
                Output::Forward("out".into()),
            ],
            &mut f,
        )
        .unwrap();
        assert_eq!(f.forwards, vec![Target::Topic(0), Target::Webhook(0)]);
        let err = r
            .resolve(vec![Output::Forward("nope".into())], &mut Fanout::default())
            .unwrap_err();
        assert!(err.contains("no webhook or topic sink"), "{err}");
    }

    #[test]
    fn bad_declarations_are_refused() {
        for (text, want) in [
            (
                "[[table]]\nname = \"events\"\ncolumns = [\"a String\"]",
                "events or dead_letters",
            ),
            (
                "[[table]]\nname = \"t\"\ncolumns = [\"a Map\"]",
                "unsupported column type",
            ),
            (
                "[[table]]\nname = \"t\"\ncolumns = [\"event_id String\"]",
                "filled by weir",
            ),
            (
                "[[table]]\nname = \"t\"\ncolumns = [\"a String\"]\norder_by = [\"b\"]",
                "order_by",
            ),
            ("[[table]]\nname = \"t\"\ncolumns = [\"a\"]", "name Type"),
            (
                "[[counter]]\nname = \"c\"\n[[counter]]\nname = \"c\"",
                "declared twice",
            ),
        ] {
            let err = routes(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn ddl_puts_system_columns_first() {
        let ddl = views().tables[0].ddl("weir");
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS weir.profile_viewed (event_id String, app String, timestamp DateTime,"), "{ddl}");
        assert!(ddl.contains("viewer Nullable(String)"));
        assert!(ddl.contains("ok UInt8"));
        assert!(ddl.ends_with("ORDER BY (profile_id, timestamp)"));
    }
}
