use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use clickhouse::{Client, Row};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::config::{ClickHouseConfig, InsertCompression};
use super::table::{
    Ddl, IDENTITIES, Layout, SYSTEM_COLUMNS, ServerVersion, Table, add_control_version,
    coords_view, datetime, put_routed_row, schema_ddl,
};
use crate::metrics::events::{
    ClickHouseFailover, EventsRefused, InternalEvent, ReplayedRowsSkipped,
};
use crate::model::{DeadLetter, Kept, Origin, RoutedRow, Slot};
use crate::sinks::{BoxError, Flush, Refusal, Sink};

/// Errors talking to ClickHouse.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("ClickHouse {what} failed: {source}")]
    Query {
        what: String,
        source: clickhouse::error::Error,
    },
    #[error("{0}")]
    Schema(String),
    #[error("insert into {0} failed on purpose (WEIR_FAILPOINT)")]
    Injected(String),
    #[error(
        "ClickHouse refused rows of {table} for good in {inserts} INSERTs of one flush, more than bad events would explain: the table (a column's DEFAULT or MATERIALIZED expression, a materialized view) seems broken; retrying. Last refusal: {last}"
    )]
    TableRefuses {
        table: String,
        inserts: usize,
        last: String,
    },
}

impl ClickHouseError {
    /// True when ClickHouse refused an INSERT for the data it carries (an expression
    /// of the table that cannot take a value, a partition key that spreads one block
    /// over too many partitions ...): the same rows fail the same way on every retry,
    /// while the other rows of the batch can be written.
    pub fn refuses_rows(&self) -> bool {
        match self {
            ClickHouseError::Query {
                source: clickhouse::error::Error::BadResponse(body),
                ..
            } => refuses_rows(body),
            _ => false,
        }
    }
}

/// ClickHouse's exception codes for an INSERT that fails on the values it carries,
/// whatever the server's state: CANNOT_PARSE_TEXT (6), CANNOT_PARSE_QUOTED_STRING
/// (26), CANNOT_PARSE_INPUT_ASSERTION_FAILED (27), CANNOT_PARSE_DATE (38),
/// CANNOT_PARSE_DATETIME (41), TYPE_MISMATCH (53), ARGUMENT_OUT_OF_BOUND (69),
/// CANNOT_CONVERT_TYPE (70), CANNOT_PARSE_NUMBER (72), INCORRECT_DATA (117),
/// TOO_LARGE_STRING_SIZE (131), VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE (321),
/// FUNCTION_THROW_IF_VALUE_IS_NON_ZERO (395), DECIMAL_OVERFLOW (407),
/// VIOLATED_CONSTRAINT (469). Code 252 (TOO_MANY_PARTS) is one only for "too many
/// partitions for single INSERT block" (the rows span too many partitions); "too
/// many parts" is the server falling behind its merges, and passes. Every other
/// error (a network failure, a proxy's 502, a full disk, memory) is transient.
const ROW_REFUSAL_CODES: [u32; 15] = [
    6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 395, 407, 469,
];

fn refuses_rows(body: &str) -> bool {
    match exception_code(body) {
        Some(252) => body.contains("partitions for single INSERT block"),
        Some(code) => ROW_REFUSAL_CODES.contains(&code),
        None => false,
    }
}

/// The code of a ClickHouse exception message (`Code: 6, e.displayText() = ...` on
/// 18.16, `Code: 6. DB::Exception: ...` since); `None` if the body is not one (a
/// proxy's page).
fn exception_code(body: &str) -> Option<u32> {
    let rest = &body[body.find("Code: ")? + "Code: ".len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// TIMEOUT_EXCEEDED: also an ON CLUSTER statement some replica has not run yet.
const DDL_TIMEOUT: u32 = 159;

/// `Err` when the `insert_error` failpoint of `table` fires (tests only).
fn failpoint(table: &str) -> Result<(), ClickHouseError> {
    if crate::failpoint::insert_error(table) {
        return Err(ClickHouseError::Injected(table.to_owned()));
    }
    Ok(())
}

#[derive(Row, Deserialize)]
struct TableRow {
    name: String,
    engine: String,
    create_table_query: String,
}

impl TableRow {
    /// Its engine; a materialized view's is the one of its `ENGINE = ` clause (18.16
    /// names its table `.inner.NAME`, current releases `.inner_id.UUID`).
    fn engine(&self) -> &str {
        if self.engine != "MaterializedView" {
            return &self.engine;
        }
        self.create_table_query
            .split_once("ENGINE = ")
            .map_or("", |(_, rest)| {
                rest.split(|c: char| !c.is_ascii_alphanumeric())
                    .next()
                    .unwrap_or_default()
            })
    }
}

#[derive(Row, Deserialize)]
struct ColumnRow {
    name: String,
    r#type: String,
}

fn query_err(what: impl Into<String>) -> impl FnOnce(clickhouse::error::Error) -> ClickHouseError {
    let what = what.into();
    move |source| ClickHouseError::Query { what, source }
}

#[derive(Row, Serialize)]
struct EventRow<'a> {
    event_id: &'a str,
    app: &'a str,
    name: &'a str,
    user_id: Option<&'a str>,
    timestamp: u32,
    timestamp_ms: i64,
    received_at: u32,
    properties: &'a str,
    context: &'a str,
    pipeline: &'a str,
    plugins: &'a str,
    control_version: u64,
    kafka_partition: u32,
    kafka_offset: u64,
    kafka_index: u32,
}

#[derive(Row, Serialize)]
struct DeadLetterRow<'a> {
    event_id: &'a str,
    app: &'a str,
    name: &'a str,
    stage: &'a str,
    plugin: &'a str,
    plugin_version: &'a str,
    reason: &'a str,
    raw: &'a str,
    failed_at: u32,
    pipeline: &'a str,
    control_version: u64,
    kafka_partition: u32,
    kafka_offset: u64,
    kafka_index: u32,
}

/// A row of `dead_letters`, as the admin API lists it.
#[derive(Debug, Clone, Row, Deserialize, Serialize)]
pub struct DeadLetterRecord {
    pub event_id: String,
    pub app: String,
    pub name: String,
    pub stage: String,
    pub plugin: String,
    pub plugin_version: String,
    pub reason: String,
    pub raw: String,
    /// Seconds since the Unix epoch.
    pub failed_at: u32,
    pub control_version: u64,
}

/// Which dead letters to list or replay (every condition given must hold).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterFilter {
    pub stage: Option<String>,
    pub name: Option<String>,
    pub app: Option<String>,
    /// Failed at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
    /// Only these events.
    #[serde(default)]
    pub event_ids: Vec<String>,
    /// At most this many, newest first (default 100; 0 is taken as 1, more than
    /// 10,000 as 10,000). An int64, as the admin API documents it; the API refuses a
    /// negative one.
    pub limit: Option<i64>,
}

#[derive(Row, Deserialize)]
struct IdRow {
    event_id: String,
}

/// Rows already written: `(kafka_offset, kafka_index)` -> `event_id`.
pub type Written = HashMap<(i64, u32), String>;

#[derive(Row, Deserialize)]
struct KeyRow {
    kafka_offset: u64,
    kafka_index: u32,
    event_id: String,
}

/// A dead letter as the replay guard tells it apart: its coordinates, event id, stage
/// and the plugin or sink at fault (a kept event can have several, one per sink that
/// refused it or webhook that gave up on it).
pub type DeadKey = (i64, u32, String, String, String);

/// The [`DeadKey`] of `d`.
fn dead_key(d: &DeadLetter) -> DeadKey {
    (
        d.origin.offset,
        d.origin.index,
        d.event_id.clone(),
        d.stage.as_str().to_owned(),
        d.plugin.clone(),
    )
}

#[derive(Row, Deserialize)]
struct DeadKeyRow {
    kafka_offset: u64,
    kafka_index: u32,
    event_id: String,
    stage: String,
    plugin: String,
}

#[derive(Row, Deserialize)]
struct MaxRow {
    max_offset: u64,
    rows: u64,
}

/// One ClickHouse server (or load balancer) weir can write to.
struct Endpoint {
    /// Its URL as weir prints it, in logs, errors and events: credentials redacted
    /// (`?password=***`). The clients hold the URL as configured.
    url: String,
    /// For DDL: no default database (it may not exist yet); names are qualified.
    admin: Client,
    /// For everything else: the configured database is the default one.
    client: Client,
    /// Its database and tables are known to exist and match.
    ready: AtomicBool,
    /// Its server takes `insert_deduplication_token` (known once `ready`).
    tokens: AtomicBool,
}

/// Writes processed batches to ClickHouse: to the current endpoint, failing over to
/// the next configured one when an operation fails.
#[derive(Clone)]
pub struct ClickHouseSink {
    /// The routed tables of the pipeline.
    tables: Arc<[Table]>,
    endpoints: Arc<Vec<Endpoint>>,
    current: Arc<AtomicUsize>,
    database: String,
    layout: Layout,
}

impl ClickHouseSink {
    pub fn new(cfg: &ClickHouseConfig, tables: Arc<[Table]>) -> Self {
        let endpoints = std::iter::once(&cfg.url)
            .chain(&cfg.failover_urls)
            .map(|url| {
                let client = Client::default()
                    .with_compression(match cfg.compression {
                        InsertCompression::Lz4 => clickhouse::Compression::Lz4,
                        InsertCompression::None => clickhouse::Compression::None,
                    })
                    .with_url(url)
                    .with_user(&cfg.user)
                    .with_password(&cfg.password)
                    .with_validation(false);
                Endpoint {
                    url: crate::model::redact_url(url),
                    admin: client.clone(),
                    client: client.with_database(&cfg.database),
                    ready: AtomicBool::new(false),
                    tokens: AtomicBool::new(false),
                }
            })
            .collect();
        Self {
            tables,
            endpoints: Arc::new(endpoints),
            current: Arc::new(AtomicUsize::new(0)),
            database: cfg.database.clone(),
            layout: Layout {
                replication: cfg.replication.clone(),
                ..Layout::default()
            },
        }
    }

    /// The same endpoints for another pipeline version's routed tables. Each endpoint
    /// is prepared again (tables created and checked) before its next write.
    pub fn with_tables(&self, tables: Arc<[Table]>) -> Self {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| Endpoint {
                url: e.url.clone(),
                admin: e.admin.clone(),
                client: e.client.clone(),
                ready: AtomicBool::new(false),
                tokens: AtomicBool::new(false),
            })
            .collect();
        Self {
            tables,
            endpoints: Arc::new(endpoints),
            current: self.current.clone(),
            database: self.database.clone(),
            layout: self.layout.clone(),
        }
    }

    /// The routed tables it writes.
    pub fn tables(&self) -> &Arc<[Table]> {
        &self.tables
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoints[self.current.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    fn client(&self) -> &Client {
        &self.endpoint().client
    }

    /// The client for an INSERT into `table` of `rows` (each row's slot and what
    /// else tells it apart, in the order written): on a server that takes one, with
    /// the INSERT's `insert_deduplication_token` (see [`insert_token`]).
    fn insert_client<'r>(
        &self,
        table: &str,
        rows: impl Iterator<Item = (Slot, &'r str, &'r str)>,
    ) -> Client {
        let ep = self.endpoint();
        if !ep.tokens.load(Ordering::Relaxed) {
            return ep.client.clone();
        }
        ep.client
            .clone()
            .with_setting("insert_deduplication_token", insert_token(table, rows))
    }

    /// URL of the endpoint in use, as printed (credentials redacted).
    pub fn url(&self) -> &str {
        &self.endpoint().url
    }

    /// After a failed operation on `url`: switch to the next endpoint (if there is
    /// another and nobody switched already).
    pub fn fail_over(&self, url: &str) {
        let n = self.endpoints.len();
        if n < 2 {
            return;
        }
        let cur = self.current.load(Ordering::Relaxed);
        if self.endpoints[cur % n].url != url {
            return;
        }
        let next = (cur + 1) % n;
        if self
            .current
            .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            ClickHouseFailover {
                from: url,
                to: &self.endpoints[next].url,
            }
            .emit();
        }
    }

    /// Creates the database and tables where missing, on every endpoint that answers,
    /// and checks that routed tables that exist already have the declared columns.
    /// Fails if no endpoint answers or a table does not match; an endpoint down now is
    /// prepared when weir first fails over to it.
    pub async fn ensure_schema(&self) -> Result<(), ClickHouseError> {
        let mut first_err = None;
        let mut ready = 0;
        for (i, ep) in self.endpoints.iter().enumerate() {
            match self.prepare(ep).await {
                Ok(()) => {
                    if ready == 0 {
                        self.current.store(i, Ordering::Relaxed);
                    }
                    ready += 1;
                }
                Err(e @ ClickHouseError::Schema(_)) => return Err(e),
                Err(e) => {
                    warn!(url = %ep.url, error = %e, "ClickHouse endpoint not ready");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if ready == 0 => Err(e),
            _ => Ok(()),
        }
    }

    /// Prepares the current endpoint if it was not yet (after a failover).
    pub async fn ensure_current(&self) -> Result<(), ClickHouseError> {
        let ep = self.endpoint();
        if ep.ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.prepare(ep).await
    }

    async fn prepare(&self, ep: &Endpoint) -> Result<(), ClickHouseError> {
        let db = &self.database;
        let server = Self::version(ep).await?;
        // Tables weir makes take the form of this server; those that exist keep theirs.
        let layout = self.layout.on_server(server);
        let existing = Self::existing(ep, db).await?;
        self.check_engines(ep, existing.as_ref())?;
        // Only what is missing is created: an ON CLUSTER statement waits for every
        // replica, and one that is down would hold each start and failover for
        // `ddl_timeout_secs` per statement.
        let routed = self
            .tables
            .iter()
            .flat_map(|t| t.ddl_statements(db, &layout));
        let had = |name: &str| existing.as_ref().is_some_and(|t| t.contains_key(name));
        let missing = |ddl: &Ddl| match &ddl.creates {
            None => existing.is_none(),
            Some(name) => !had(name),
        };
        // The coordinates views come last: they read columns of their tables, which
        // are checked first.
        let (views, tables): (Vec<Ddl>, Vec<Ddl>) = schema_ddl(db, &layout)
            .into_iter()
            .chain(routed)
            .filter(missing)
            .partition(|d| d.backfill.is_some());
        for ddl in &tables {
            self.run_ddl(ep, &ddl.sql).await?;
        }
        // Tables made before weir recorded the control-plane version get the column.
        for table in self.table_names() {
            let have = Self::columns(ep, db, table).await?;
            if !have.contains_key("control_version") {
                let sql = add_control_version(db, table);
                ep.admin
                    .query(&sql)
                    .execute()
                    .await
                    .map_err(query_err(format!("adding control_version to {table}")))?;
                info!(url = %ep.url, table, "added column control_version");
            }
        }
        for table in self.tables.iter() {
            let have = Self::columns(ep, db, &table.name).await?;
            let declared = table.columns.iter().map(|c| (c.name.as_str(), c.ty.sql()));
            let system = SYSTEM_COLUMNS.iter().map(|&(n, t)| (n, t.to_owned()));
            for (name, want) in declared.chain(system) {
                match have.get(name) {
                    Some(t) if *t == want => {}
                    found => {
                        return Err(ClickHouseError::Schema(format!(
                            "table {db}.{} at {} exists with column {name} {}, but the pipeline's table has {want}; \
                             alter or drop the table, or rename the pipeline's table",
                            table.name,
                            ep.url,
                            found.map_or("missing", |t| t.as_str()),
                        )));
                    }
                }
            }
        }
        for ddl in views {
            self.run_ddl(ep, &ddl.sql).await?;
            // A coordinates view made for a table that has rows (weir made the table
            // before it kept coordinates): the rows it has now are copied in, as one
            // INSERT. Rows another instance writes meanwhile may be copied twice, which
            // the guard's lookups do not mind.
            if let Some(fill) = ddl.backfill.filter(|f| had(&f.table)) {
                ep.admin
                    .query(&fill.sql)
                    .execute()
                    .await
                    .map_err(query_err(format!("filling {}", coords_view(&fill.table))))?;
                info!(url = %ep.url, table = %fill.table, "Kafka coordinates of the table's rows copied into its coordinates view");
            }
        }
        ep.tokens.store(
            server >= ServerVersion::DEDUPLICATION_TOKEN,
            Ordering::Relaxed,
        );
        ep.ready.store(true, Ordering::Relaxed);
        info!(url = %ep.url, database = %self.database, routed = self.tables.len(), %server, "ClickHouse tables ready");
        Ok(())
    }

    /// Runs one statement of weir's DDL. An ON CLUSTER statement that a replica did
    /// not run within `ddl_timeout_secs` (it is down) is queued in ZooKeeper and runs
    /// there when the replica is back: weir goes on with a warning.
    async fn run_ddl(&self, ep: &Endpoint, ddl: &str) -> Result<(), ClickHouseError> {
        let mut query = ep.admin.query(ddl);
        if let Some(r) = &self.layout.replication
            && r.cluster.is_some()
        {
            query = query.with_setting(
                "distributed_ddl_task_timeout",
                r.ddl_timeout_secs.to_string(),
            );
        }
        match query.execute().await {
            Ok(()) => Ok(()),
            Err(clickhouse::error::Error::BadResponse(body))
                if exception_code(&body) == Some(DDL_TIMEOUT)
                    && body.contains("execute the query in background") =>
            {
                warn!(url = %ep.url, reply = %body.trim(), "ON CLUSTER DDL not run on every replica yet; those run it when they are back");
                Ok(())
            }
            Err(e) => Err(query_err("schema creation")(e)),
        }
    }

    /// The server's release. One weir cannot read is taken for the oldest weir runs
    /// on, with a warning: its tables then take 18.16's form, which every release reads.
    async fn version(ep: &Endpoint) -> Result<ServerVersion, ClickHouseError> {
        let version: String = ep
            .admin
            .query("SELECT version()")
            .fetch_one()
            .await
            .map_err(query_err("version query"))?;
        Ok(ServerVersion::parse(&version).unwrap_or_else(|| {
            warn!(url = %ep.url, version, "ClickHouse version not understood; making tables as for 18.16");
            ServerVersion::OLDEST
        }))
    }

    /// The tables and views of database `db` at `ep` with their engines (a
    /// materialized view's: the engine of the table it keeps its rows in); `None` if
    /// the database does not exist.
    async fn existing(
        ep: &Endpoint,
        db: &str,
    ) -> Result<Option<HashMap<String, String>>, ClickHouseError> {
        let databases: Vec<String> = ep
            .admin
            .query(&format!(
                "SELECT name FROM system.databases WHERE name = '{db}'"
            ))
            .fetch_all()
            .await
            .map_err(query_err("database listing"))?;
        if databases.is_empty() {
            return Ok(None);
        }
        let sql = format!(
            "SELECT name, engine, create_table_query FROM system.tables WHERE database = '{db}'"
        );
        let rows: Vec<TableRow> = ep
            .admin
            .query(&sql)
            .fetch_all()
            .await
            .map_err(query_err("table listing"))?;
        Ok(Some(
            rows.into_iter()
                .map(|r| {
                    let engine = r.engine().to_owned();
                    (r.name, engine)
                })
                .collect(),
        ))
    }

    /// Refuses plain tables where `[clickhouse.replication]` asks for replicated ones:
    /// a failover between two servers' own tables would split the data, and a retried
    /// INSERT would be stored twice. weir does not convert tables itself (the README's
    /// "Moving to a replicated cluster" says how).
    fn check_engines(
        &self,
        ep: &Endpoint,
        existing: Option<&HashMap<String, String>>,
    ) -> Result<(), ClickHouseError> {
        let (true, Some(existing)) = (self.layout.is_replicated(), existing) else {
            return Ok(());
        };
        let db = &self.database;
        let views: Vec<String> = self
            .table_names()
            .map(coords_view)
            .chain([IDENTITIES.to_owned()])
            .collect();
        let ours = self.table_names().chain(views.iter().map(String::as_str));
        for name in ours {
            if let Some(engine) = existing.get(name)
                && !engine.starts_with("Replicated")
            {
                return Err(ClickHouseError::Schema(format!(
                    "table {db}.{name} at {} is a {engine} table, but [clickhouse.replication] asks for replicated tables: \
                     weir does not convert tables itself; move its rows to a replicated table as the README's \
                     \"Moving to a replicated cluster\" says, or remove [clickhouse.replication]",
                    ep.url
                )));
            }
        }
        Ok(())
    }

    /// Column name -> type of a table.
    async fn columns(
        ep: &Endpoint,
        db: &str,
        table: &str,
    ) -> Result<HashMap<String, String>, ClickHouseError> {
        let sql = format!(
            "SELECT name, type FROM system.columns WHERE database = '{db}' AND table = '{table}'"
        );
        Ok(ep
            .admin
            .query(&sql)
            .fetch_all::<ColumnRow>()
            .await
            .map_err(query_err(format!("column check of {table}")))?
            .into_iter()
            .map(|c| (c.name, c.r#type))
            .collect())
    }

    /// Every table weir writes rows with Kafka coordinates to.
    fn table_names(&self) -> impl Iterator<Item = &str> {
        ["events", "dead_letters"]
            .into_iter()
            .chain(self.tables.iter().map(|t| t.name.as_str()))
    }

    /// The highest Kafka offset of `partition` at or above `from` in any of weir's
    /// tables, if any row has one. Rows up to it may be written again by a replay after
    /// a crash. Read from the tables' coordinates views: a range of their index.
    pub async fn max_offset(
        &self,
        partition: i32,
        from: i64,
    ) -> Result<Option<i64>, ClickHouseError> {
        let mut max = None;
        for table in self.table_names() {
            let sql = format!(
                "SELECT max(kafka_offset) AS max_offset, count() AS rows FROM {} \
                 WHERE kafka_partition = {partition} AND kafka_offset >= {from}",
                coords_view(table)
            );
            let row: MaxRow = self
                .client()
                .query(&sql)
                .fetch_one()
                .await
                .map_err(query_err(format!("offset watermark of {table}")))?;
            if row.rows > 0 {
                max = max.max(Some(row.max_offset as i64));
            }
        }
        Ok(max)
    }

    /// The rows of `partition` with offsets in `lo..=hi` already in `table` (`events`
    /// or a routed table), read from its coordinates view.
    pub async fn written(
        &self,
        table: &str,
        partition: i32,
        lo: i64,
        hi: i64,
    ) -> Result<Written, ClickHouseError> {
        let sql = format!(
            "SELECT kafka_offset, kafka_index, event_id FROM {} \
             WHERE kafka_partition = {partition} AND kafka_offset >= {lo} AND kafka_offset <= {hi}",
            coords_view(table)
        );
        let rows: Vec<KeyRow> = self
            .client()
            .query(&sql)
            .fetch_all()
            .await
            .map_err(query_err(format!("replay check of {table}")))?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.kafka_offset as i64, r.kafka_index), r.event_id))
            .collect())
    }

    /// The dead letters stored for `partition` at offsets `lo..=hi`.
    pub async fn written_dead_letters(
        &self,
        partition: i32,
        lo: i64,
        hi: i64,
    ) -> Result<HashSet<DeadKey>, ClickHouseError> {
        let sql = format!(
            "SELECT kafka_offset, kafka_index, event_id, stage, plugin FROM {} \
             WHERE kafka_partition = {partition} AND kafka_offset >= {lo} AND kafka_offset <= {hi}",
            coords_view("dead_letters")
        );
        let rows: Vec<DeadKeyRow> = self
            .client()
            .query(&sql)
            .fetch_all()
            .await
            .map_err(query_err("replay check of dead_letters"))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.kafka_offset as i64,
                    r.kafka_index,
                    r.event_id,
                    r.stage,
                    r.plugin,
                )
            })
            .collect())
    }

    /// Which of `dead` the table already holds (written before a crash replayed them).
    pub async fn stored_dead_letters(
        &self,
        dead: &[DeadLetter],
    ) -> Result<HashSet<(i32, DeadKey)>, ClickHouseError> {
        let mut out = HashSet::new();
        for (partition, (lo, hi)) in offset_ranges(dead.iter().map(|d| d.origin)) {
            let stored = self.written_dead_letters(partition, lo, hi).await?;
            out.extend(stored_among(dead, partition, &stored));
        }
        Ok(out)
    }

    /// Inserts kept events into `events`, in one INSERT. Returns when ClickHouse
    /// acknowledged.
    pub async fn insert_events(
        &self,
        kept: &[&Kept],
        pipeline: &str,
        plugins: &str,
        control_version: u64,
    ) -> Result<(), ClickHouseError> {
        if kept.is_empty() {
            return Ok(());
        }
        failpoint("events")?;
        let mut insert = self
            .insert_client("events", kept.iter().map(|k| (k.origin.slot(), "", "")))
            .insert::<EventRow<'_>>("events")
            .await
            .map_err(query_err("insert into events"))?;
        for k in kept {
            let e = &k.event;
            insert
                .write(&EventRow {
                    event_id: &e.event_id,
                    app: &e.app,
                    name: &e.name,
                    user_id: e.user_id.as_deref(),
                    timestamp: datetime(e.timestamp_ms),
                    timestamp_ms: e.timestamp_ms,
                    received_at: datetime(k.origin.received_ms),
                    properties: &e.properties,
                    context: &e.context,
                    pipeline,
                    plugins,
                    control_version,
                    kafka_partition: k.origin.partition as u32,
                    kafka_offset: k.origin.offset as u64,
                    kafka_index: k.origin.index,
                })
                .await
                .map_err(query_err("insert into events"))?;
        }
        insert.end().await.map_err(query_err("insert into events"))
    }

    /// Inserts dead letters into `dead_letters`, in one INSERT, failed at `failed_at`
    /// (seconds since the epoch).
    pub async fn insert_dead_letters(
        &self,
        dead: &[&DeadLetter],
        pipeline: &str,
        control_version: u64,
        failed_at: u32,
    ) -> Result<(), ClickHouseError> {
        if dead.is_empty() {
            return Ok(());
        }
        failpoint("dead_letters")?;
        let mut insert = self
            .insert_client(
                "dead_letters",
                dead.iter()
                    .map(|d| (d.origin.slot(), d.stage.as_str(), d.plugin.as_str())),
            )
            .insert::<DeadLetterRow<'_>>("dead_letters")
            .await
            .map_err(query_err("insert into dead_letters"))?;
        for d in dead {
            insert
                .write(&DeadLetterRow {
                    event_id: &d.event_id,
                    app: &d.app,
                    name: &d.name,
                    stage: d.stage.as_str(),
                    plugin: &d.plugin,
                    plugin_version: &d.plugin_version,
                    reason: &d.reason,
                    raw: &d.raw,
                    failed_at,
                    pipeline,
                    control_version,
                    kafka_partition: d.origin.partition as u32,
                    kafka_offset: d.origin.offset as u64,
                    kafka_index: d.origin.index,
                })
                .await
                .map_err(query_err("insert into dead_letters"))?;
        }
        insert
            .end()
            .await
            .map_err(query_err("insert into dead_letters"))
    }

    /// Inserts the rows of routed table `t` in one INSERT: weir's columns, then the
    /// plugin's, already encoded in RowBinary.
    pub async fn insert_routed(
        &self,
        t: usize,
        rows: &[&RoutedRow],
        plugins: &str,
        control_version: u64,
    ) -> Result<(), ClickHouseError> {
        if rows.is_empty() {
            return Ok(());
        }
        let table = &self.tables[t];
        failpoint(&table.name)?;
        let what = || format!("insert into {}", table.name);
        let mut body = Vec::with_capacity(rows.iter().map(|r| r.data.len() + 64).sum());
        for r in rows {
            put_routed_row(&mut body, r, plugins, control_version);
        }
        let sql = format!(
            "INSERT INTO {} ({}) FORMAT RowBinary",
            table.name,
            table.insert_columns()
        );
        let mut insert = self
            .insert_client(&table.name, rows.iter().map(|r| (r.origin.slot(), "", "")))
            .insert_formatted_with(sql);
        insert.send(body.into()).await.map_err(query_err(what()))?;
        insert.end().await.map_err(query_err(what()))
    }

    /// Dead letters matching `filter`, newest first.
    pub async fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
    ) -> Result<Vec<DeadLetterRecord>, ClickHouseError> {
        let mut sql = String::from(
            "SELECT event_id, app, name, stage, plugin, plugin_version, reason, raw, failed_at, \
             control_version FROM dead_letters WHERE 1",
        );
        let mut strings = Vec::new();
        for (column, value) in [
            ("stage", &filter.stage),
            ("name", &filter.name),
            ("app", &filter.app),
        ] {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = ?"));
                strings.push(v.clone());
            }
        }
        if let Some(ms) = filter.since_ms {
            sql.push_str(&format!(
                " AND failed_at >= toDateTime({})",
                ms.div_euclid(1000).max(0)
            ));
        }
        if !filter.event_ids.is_empty() {
            sql.push_str(" AND has(?, event_id)");
        }
        let limit = filter.limit.unwrap_or(100).clamp(1, 10_000);
        sql.push_str(&format!(" ORDER BY failed_at DESC LIMIT {limit}"));
        let mut query = self.client().query(&sql);
        for s in strings {
            query = query.bind(s);
        }
        if !filter.event_ids.is_empty() {
            query = query.bind(filter.event_ids.clone());
        }
        query
            .fetch_all()
            .await
            .map_err(query_err("reading dead_letters"))
    }

    /// Which of `ids` are in `events`.
    pub async fn events_present(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>, ClickHouseError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let rows: Vec<IdRow> = self
            .client()
            .query("SELECT event_id FROM events WHERE has(?, event_id)")
            .bind(ids.to_vec())
            .fetch_all()
            .await
            .map_err(query_err("looking up events"))?;
        Ok(rows.into_iter().map(|r| r.event_id).collect())
    }

    /// The name of routed table `t`.
    pub fn routed_name(&self, t: usize) -> &str {
        &self.tables[t].name
    }
}

impl crate::sinks::DeadLetterStore for ClickHouseSink {
    fn write_dead_letters<'a>(
        &'a self,
        dead: &'a [DeadLetter],
        pipeline: &'a str,
        control_version: u64,
        failed_ms: i64,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::sinks::BoxError>> {
        Box::pin(async move {
            let stored = self.stored_dead_letters(dead).await?;
            if !stored.is_empty() {
                ReplayedRowsSkipped { rows: stored.len() }.emit();
            }
            let dead: Vec<&DeadLetter> = dead
                .iter()
                .filter(|d| !stored.contains(&(d.origin.partition, dead_key(d))))
                .collect();
            self.insert_dead_letters(&dead, pipeline, control_version, datetime(failed_ms))
                .await
                .map_err(Into::into)
        })
    }
}

/// The `insert_deduplication_token` of an INSERT into `table` of `rows`: a digest of
/// the table's name and of each row's identity, in order (its event's Kafka
/// coordinates; for a dead letter also its stage and plugin, since one event can be
/// set aside by several sinks, in INSERTs of their own). A retry of the same INSERT
/// (after an error whose INSERT ClickHouse may have committed, on the same server or
/// on another replica after a failover) carries the same rows and so the same token,
/// even where their bytes differ (a dead letter's `failed_at` is the time of the
/// attempt): a replicated table stores it once. Any other INSERT holds other rows, so
/// it has another token.
pub fn insert_token<'r>(
    table: &str,
    rows: impl Iterator<Item = (Slot, &'r str, &'r str)>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(table.as_bytes());
    h.update([0]);
    for ((partition, offset, index), stage, plugin) in rows {
        h.update(partition.to_be_bytes());
        h.update(offset.to_be_bytes());
        h.update(index.to_be_bytes());
        for part in [stage, plugin] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    format!("weir-{}", hex::encode(&h.finalize()[..16]))
}

/// Per partition, the lowest and highest offset of `origins`.
fn offset_ranges(origins: impl IntoIterator<Item = Origin>) -> BTreeMap<i32, (i64, i64)> {
    let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for o in origins {
        let r = ranges.entry(o.partition).or_insert((o.offset, o.offset));
        r.0 = r.0.min(o.offset);
        r.1 = r.1.max(o.offset);
    }
    ranges
}

/// The keys of the dead letters of `partition` among `dead` that `stored` holds.
fn stored_among<'a>(
    dead: &'a [DeadLetter],
    partition: i32,
    stored: &'a HashSet<DeadKey>,
) -> impl Iterator<Item = (i32, DeadKey)> + 'a {
    dead.iter()
        .filter(move |d| d.origin.partition == partition)
        .map(dead_key)
        .filter(|k| stored.contains(k))
        .map(move |k| (partition, k))
}

/// True if the rows `written` of `partition` hold the event `event_id` at `o`'s
/// coordinates (the event id keeps a recreated topic's offsets from passing for it).
fn holds(written: &Written, partition: i32, o: &Origin, event_id: &str) -> bool {
    o.partition == partition
        && written
            .get(&(o.offset, o.index))
            .is_some_and(|id| id == event_id)
}

/// The rows of one flush an earlier run already wrote (a replay after a crash).
#[derive(Default)]
struct Replayed {
    events: HashSet<Slot>,
    /// By partition and [`DeadKey`].
    dead_letters: HashSet<(i32, DeadKey)>,
    /// By routed table index.
    routed: HashMap<usize, HashSet<Slot>>,
}

/// What of the current flush is written (a retry after a partial failure writes only
/// the rest: ClickHouse died between two INSERTs).
#[derive(Default)]
struct Done {
    /// Set once the replay check ran for the flush.
    replayed: Option<Replayed>,
    events: bool,
    dead_letters: bool,
    routed: HashSet<usize>,
    /// Events refused by the tables written so far.
    refused: Vec<Refusal>,
    /// The dead letters' `failed_at`, taken at the flush's first attempt: a retry sends
    /// the same block, which a replicated table then stores once, also on the other
    /// replica after a lost answer.
    failed_at: Option<u32>,
}

/// Most INSERTs the rows of one table may take in one flush attempt while ClickHouse
/// refuses some of them: enough to set aside a dozen bad events in a batch of 50,000
/// (about 2 log2(n) INSERTs each); beyond it, the table is at fault.
const MAX_ISOLATING_INSERTS: usize = 400;

/// Longest refusal reason stored (ClickHouse's messages quote the values).
const MAX_REASON_BYTES: usize = 2000;

fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    reason
}

/// The rows of one table in a flush.
enum TableRows<'a> {
    Events(Vec<&'a Kept>),
    /// By the routed table's index.
    Routed(usize, Vec<&'a RoutedRow>),
}

impl TableRows<'_> {
    fn len(&self) -> usize {
        match self {
            TableRows::Events(k) => k.len(),
            TableRows::Routed(_, r) => r.len(),
        }
    }

    fn origin(&self, i: usize) -> Origin {
        match self {
            TableRows::Events(k) => k[i].origin,
            TableRows::Routed(_, r) => r[i].origin,
        }
    }

    fn event_id(&self, i: usize) -> &str {
        match self {
            TableRows::Events(k) => &k[i].event.event_id,
            TableRows::Routed(_, r) => &r[i].event_id,
        }
    }

    fn table<'s>(&self, sink: &'s ClickHouseSink) -> &'s str {
        match self {
            TableRows::Events(_) => "events",
            TableRows::Routed(t, _) => sink.routed_name(*t),
        }
    }
}

/// The processor's ClickHouse sink: each flush's kept events to `events`, its dead
/// letters to `dead_letters`, its routed rows to their tables, one INSERT per table,
/// failing over to the next endpoint when an attempt fails.
///
/// Its replay guard: per partition, the highest offset already in ClickHouse when
/// this instance took the partition (loaded lazily; forgotten on revoke). Rows of
/// records up to it are looked up by `(kafka_partition, kafka_offset, kafka_index,
/// event_id)` and not written again if present; the event id keeps a recreated topic
/// (offsets from 0 again) from being taken for a replay. The guard decides what this
/// sink writes only: every other sink gets the whole flush.
pub struct ClickHouseWriter {
    client: ClickHouseSink,
    /// Per partition, the highest offset in ClickHouse when this instance took it.
    watermarks: HashMap<i32, Option<i64>>,
    done: Done,
    /// The endpoint of the attempt under way; still set at the start of the next one
    /// when the worker abandoned it (dropped it after `write_timeout_ms`).
    attempting: Option<String>,
}

impl ClickHouseWriter {
    pub fn new(client: ClickHouseSink) -> Self {
        Self {
            client,
            watermarks: HashMap::new(),
            done: Done::default(),
            attempting: None,
        }
    }

    /// After a failed or abandoned attempt on `url`: the next endpoint, and a fresh
    /// look at what ClickHouse holds before the retry writes (the attempt's INSERTs
    /// may have been committed all the same: an answer lost to a reset, a proxy's 502,
    /// a timeout).
    fn after_failure(&mut self, url: &str) {
        self.client.fail_over(url);
        self.done.replayed = None;
        self.watermarks.clear();
    }

    /// Writes what is not written yet of the flush; returns the events refused for
    /// good (their rows are not written).
    async fn write_flush(&mut self, flush: Flush<'_>) -> Result<Vec<Refusal>, ClickHouseError> {
        if !Arc::ptr_eq(self.client.tables(), flush.tables) {
            // A new pipeline version with other tables (the agent created them).
            self.client = self.client.with_tables(flush.tables.clone());
        }
        let batch = flush.batch;
        self.client.ensure_current().await?;
        if self.done.replayed.is_none() {
            self.done.replayed = Some(self.replayed(flush).await?);
        }
        let replayed = self.done.replayed.as_ref().expect("checked above");
        let rows_metric = &crate::metrics::SINK_ROWS;
        if !self.done.events {
            let kept: Vec<&Kept> = batch
                .kept
                .iter()
                .filter(|k| !replayed.events.contains(&k.origin.slot()))
                .collect();
            let rows = TableRows::Events(kept);
            let refused = self.insert_isolating(&rows, flush).await?;
            self.done.events = true;
            rows_metric
                .with_label_values(&["events"])
                .inc_by((rows.len() - refused.len()) as u64);
            self.done.refused.extend(refused);
        }
        if !self.done.dead_letters {
            let dead: Vec<&DeadLetter> = batch
                .dead
                .iter()
                .filter(|d| {
                    !replayed
                        .dead_letters
                        .contains(&(d.origin.partition, dead_key(d)))
                })
                .collect();
            let failed_at = *self
                .done
                .failed_at
                .get_or_insert_with(|| datetime(crate::model::now_ms()));
            self.client
                .insert_dead_letters(&dead, flush.pipeline, flush.control_version, failed_at)
                .await?;
            self.done.dead_letters = true;
            rows_metric
                .with_label_values(&["dead_letters"])
                .inc_by(dead.len() as u64);
            for d in &dead {
                crate::metrics::DEAD_LETTERS
                    .with_label_values(&[d.stage.as_str()])
                    .inc();
            }
        }
        for (&t, rows) in &batch.rows {
            if self.done.routed.contains(&t) {
                continue;
            }
            let skip = replayed.routed.get(&t);
            let rows: Vec<&RoutedRow> = rows
                .iter()
                .filter(|r| skip.is_none_or(|s| !s.contains(&r.origin.slot())))
                .collect();
            let rows = TableRows::Routed(t, rows);
            let refused = self.insert_isolating(&rows, flush).await?;
            self.done.routed.insert(t);
            rows_metric
                .with_label_values(&[self.client.routed_name(t)])
                .inc_by((rows.len() - refused.len()) as u64);
            self.done.refused.extend(refused);
        }
        Ok(std::mem::take(&mut self.done.refused))
    }

    /// Writes `rows` to their table in one INSERT. When ClickHouse refuses it for the
    /// data it carries, the rows are split in halves and each half written on its
    /// own, down to the single rows it refuses, which are returned: one bad event
    /// costs about 2 log2(n) INSERTs and holds up none of the others. A refusal that
    /// spreads over more than [`MAX_ISOLATING_INSERTS`] INSERTs is the table's fault,
    /// not the events': that is an error, retried like an outage.
    async fn insert_isolating(
        &self,
        rows: &TableRows<'_>,
        flush: Flush<'_>,
    ) -> Result<Vec<Refusal>, ClickHouseError> {
        let table = rows.table(&self.client);
        let mut refused = Vec::new();
        let mut todo: Vec<Vec<usize>> = vec![(0..rows.len()).collect()];
        let mut inserts = 0;
        while let Some(part) = todo.pop() {
            inserts += 1;
            let err = match self.insert_part(rows, &part, flush).await {
                Ok(()) => continue,
                Err(e) if e.refuses_rows() => e,
                Err(e) => return Err(e),
            };
            if inserts >= MAX_ISOLATING_INSERTS {
                return Err(ClickHouseError::TableRefuses {
                    table: table.to_owned(),
                    inserts,
                    last: err.to_string(),
                });
            }
            // ClickHouse writes a block to its table before it runs the table's
            // materialized views: when a view refused the block, the rows are
            // stored all the same, and are not written again.
            let stored = self.stored(rows, &part).await?;
            let part: Vec<usize> = part.into_iter().filter(|i| !stored.contains(i)).collect();
            match part.len() {
                0 => {}
                1 => refused.push(Refusal {
                    origin: rows.origin(part[0]),
                    sink: format!("clickhouse:{table}"),
                    reason: bounded(err.to_string()),
                }),
                n => {
                    let (a, b) = part.split_at(n / 2);
                    todo.push(b.to_vec());
                    todo.push(a.to_vec());
                }
            }
        }
        if let Some(first) = refused.first() {
            EventsRefused {
                sink: &first.sink,
                events: refused.len(),
                reason: &first.reason,
            }
            .emit();
        }
        Ok(refused)
    }

    /// Writes the rows at `part` of `rows` in one INSERT.
    async fn insert_part(
        &self,
        rows: &TableRows<'_>,
        part: &[usize],
        flush: Flush<'_>,
    ) -> Result<(), ClickHouseError> {
        let inserted = match rows {
            TableRows::Events(kept) => {
                let kept: Vec<&Kept> = part.iter().map(|&i| kept[i]).collect();
                self.client
                    .insert_events(&kept, flush.pipeline, flush.plugins, flush.control_version)
                    .await
            }
            TableRows::Routed(t, routed) => {
                let routed: Vec<&RoutedRow> = part.iter().map(|&i| routed[i]).collect();
                self.client
                    .insert_routed(*t, &routed, flush.plugins, flush.control_version)
                    .await
            }
        };
        if inserted.is_ok() {
            crate::failpoint::after_insert();
        }
        inserted
    }

    /// Which of the rows at `part` the table holds (by coordinates and event id).
    async fn stored(
        &self,
        rows: &TableRows<'_>,
        part: &[usize],
    ) -> Result<HashSet<usize>, ClickHouseError> {
        let table = rows.table(&self.client);
        let mut stored = HashSet::new();
        for (partition, (lo, hi)) in offset_ranges(part.iter().map(|&i| rows.origin(i))) {
            let written = self.client.written(table, partition, lo, hi).await?;
            stored.extend(
                part.iter()
                    .copied()
                    .filter(|&i| holds(&written, partition, &rows.origin(i), rows.event_id(i))),
            );
        }
        Ok(stored)
    }

    /// The rows of the flush an earlier run already wrote, table by table.
    async fn replayed(&mut self, flush: Flush<'_>) -> Result<Replayed, ClickHouseError> {
        let batch = flush.batch;
        let ranges = offset_ranges(
            batch
                .kept
                .iter()
                .map(|k| k.origin)
                .chain(batch.dead.iter().map(|d| d.origin)),
        );
        let mut out = Replayed::default();
        for (partition, (lo, hi)) in ranges {
            let watermark = match self.watermarks.get(&partition) {
                Some(w) => *w,
                None => {
                    // Later flushes of the partition start higher (a seek back comes
                    // with `forget` or `after_failure`, which clear the cache).
                    let w = self.client.max_offset(partition, lo).await?;
                    self.watermarks.insert(partition, w);
                    w
                }
            };
            let Some(watermark) = watermark.filter(|w| lo <= *w) else {
                continue;
            };
            let hi = hi.min(watermark);
            // A row is a replay if its coordinates hold the same event in the table.
            let found = |written: &Written, o: &Origin, event_id: &str| {
                holds(written, partition, o, event_id)
            };
            let events = self.client.written("events", partition, lo, hi).await?;
            out.events.extend(
                batch
                    .kept
                    .iter()
                    .filter(|k| found(&events, &k.origin, &k.event.event_id))
                    .map(|k| k.origin.slot()),
            );
            if batch.dead.iter().any(|d| d.origin.partition == partition) {
                let dead = self.client.written_dead_letters(partition, lo, hi).await?;
                out.dead_letters
                    .extend(stored_among(&batch.dead, partition, &dead));
            }
            for (&t, rows) in &batch.rows {
                if !rows.iter().any(|r| r.origin.partition == partition) {
                    continue;
                }
                let table = self.client.routed_name(t).to_owned();
                let written = self.client.written(&table, partition, lo, hi).await?;
                out.routed.entry(t).or_default().extend(
                    rows.iter()
                        .filter(|r| found(&written, &r.origin, &r.event_id))
                        .map(|r| r.origin.slot()),
                );
            }
        }
        let skipped = out.events.len()
            + out.dead_letters.len()
            + out.routed.values().map(HashSet::len).sum::<usize>();
        if skipped > 0 {
            ReplayedRowsSkipped { rows: skipped }.emit();
        }
        Ok(out)
    }
}

impl Sink for ClickHouseWriter {
    fn kind(&self) -> &'static str {
        "clickhouse"
    }

    fn write<'a>(&'a mut self, flush: Flush<'a>) -> BoxFuture<'a, Result<Vec<Refusal>, BoxError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            if let Some(abandoned) = self.attempting.take() {
                warn!(url = %abandoned, "the previous write attempt was abandoned; looking again at what ClickHouse holds");
                self.after_failure(&abandoned);
            }
            let url = self.client.url().to_owned();
            self.attempting = Some(url.clone());
            let result = self.write_flush(flush).await;
            self.attempting = None;
            match result {
                Ok(refused) => {
                    crate::metrics::SINK_FLUSH_DURATION
                        .with_label_values(&["clickhouse"])
                        .observe(started.elapsed().as_secs_f64());
                    Ok(refused)
                }
                Err(e) => {
                    error!(error = %e, %url, "flush to ClickHouse failed");
                    self.after_failure(&url);
                    Err(e.into())
                }
            }
        })
    }

    fn finish(&mut self) {
        self.done = Done::default();
        self.attempting = None;
    }

    fn forget(&mut self, partitions: &HashSet<i32>) {
        self.watermarks.retain(|p, _| !partitions.contains(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_token_names_the_rows_not_their_bytes() {
        let token = |table, rows: &[(Slot, &'static str, &'static str)]| {
            insert_token(table, rows.iter().copied())
        };
        let rows = [
            ((0, 10, 0), "", ""),
            ((0, 10, 1), "", ""),
            ((3, 7, 0), "", ""),
        ];
        let t = token("events", &rows);
        assert!(t.starts_with("weir-") && t.len() == 5 + 32, "{t}");
        // A retry: the same rows, the same token.
        assert_eq!(token("events", &rows), t);
        // Another table, another row, the rows in another order: another INSERT.
        assert_ne!(token("profile_viewed", &rows), t);
        assert_ne!(token("events", &rows[..2]), t);
        let mut swapped = rows;
        swapped.swap(0, 1);
        assert_ne!(token("events", &swapped), t);
        // One event set aside by two sinks, in two INSERTs: two tokens, or the
        // second dead letter would be taken for a retry of the first.
        let by = |stage, plugin| token("dead_letters", &[((1, 5, 0), stage, plugin)]);
        assert_ne!(by("sink", "clickhouse:events"), by("webhook", "crm"));
        assert_ne!(by("sink", "topic:a"), by("sink", "topic:b"));
        // Lengths are part of the digest: the boundary between stage and plugin counts.
        assert_ne!(by("ab", "c"), by("a", "bc"));
    }

    #[test]
    fn refusals_are_told_from_outages_by_the_exception_code() {
        // As 18.16 words them, and as current servers do.
        let parse = "Code: 6, e.displayText() = DB::Exception: Cannot parse string 'abc' as UInt32: \
                     syntax error at begin of string. (version 18.16.1)";
        assert_eq!(exception_code(parse), Some(6));
        assert!(refuses_rows(parse));
        let partitions = "Code: 252. DB::Exception: Too many partitions for single INSERT block \
                          (more than 100). (TOO_MANY_PARTS) (version 25.3.2.39 (official build))";
        assert!(refuses_rows(partitions));
        let throw = "Code: 395. DB::Exception: Value passed to 'throwIf' function is non zero";
        assert!(refuses_rows(throw));
        for transient in [
            // Merges behind: the same INSERT passes later.
            "Code: 252. DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts.",
            "Code: 241. DB::Exception: Memory limit (total) exceeded",
            "Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space",
            "Code: 60, e.displayText() = DB::Exception: Table weir.events doesn't exist.",
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
            "",
        ] {
            assert!(!refuses_rows(transient), "{transient}");
        }
        assert_eq!(exception_code("Code: "), None);
    }

    #[test]
    fn only_bad_responses_can_be_refusals() {
        let refusal = ClickHouseError::Query {
            what: "insert into events".into(),
            source: clickhouse::error::Error::BadResponse(
                "Code: 53. DB::Exception: Type mismatch".into(),
            ),
        };
        assert!(refusal.refuses_rows());
        let timeout = ClickHouseError::Query {
            what: "insert into events".into(),
            source: clickhouse::error::Error::TimedOut,
        };
        assert!(!timeout.refuses_rows());
        assert!(!ClickHouseError::Injected("events".into()).refuses_rows());
    }

    /// A password in a ClickHouse URL (`?password=`, or user information) is in none of
    /// what the sink prints: its URL, the failover event, the errors of an endpoint down.
    #[tokio::test]
    async fn credentials_in_urls_stay_out_of_what_the_sink_prints() {
        let cfg = ClickHouseConfig {
            url: "http://127.0.0.1:1/?user=weir&password=hunter2".into(),
            failover_urls: vec!["http://weir:hunter2@127.0.0.1:2/".into()],
            ..ClickHouseConfig::default()
        };
        let sink = ClickHouseSink::new(&cfg, Arc::from(Vec::new()));
        assert_eq!(sink.url(), "http://127.0.0.1:1/?user=weir&password=***");
        let err = sink
            .ensure_schema()
            .await
            .expect_err("nothing listens there");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
        sink.fail_over("http://127.0.0.1:1/?user=weir&password=***");
        assert_eq!(sink.url(), "http://weir:***@127.0.0.1:2/");
    }

    #[test]
    fn reasons_are_bounded_on_a_character_boundary() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = bounded(long);
        assert!(cut.len() <= MAX_REASON_BYTES + 3);
        assert!(cut.ends_with("..."));
        assert_eq!(bounded("short".into()), "short");
    }
}
