use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::config::{ClickHouseConfig, InsertCompression};
use super::table::{Table, datetime, put_routed_row, schema};
use crate::model::{DeadLetter, Kept, RoutedRow};

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
}

/// `Err` when the `insert_error` failpoint of `table` fires (tests only).
fn failpoint(table: &str) -> Result<(), ClickHouseError> {
    if crate::failpoint::insert_error(table) {
        return Err(ClickHouseError::Injected(table.to_owned()));
    }
    Ok(())
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
    /// At most this many, newest first (default 100, at most 10,000).
    pub limit: Option<usize>,
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

#[derive(Row, Deserialize)]
struct MaxRow {
    max_offset: u64,
    rows: u64,
}

/// One ClickHouse server (or load balancer) weir can write to.
struct Endpoint {
    url: String,
    /// For DDL: no default database (it may not exist yet); names are qualified.
    admin: Client,
    /// For everything else: the configured database is the default one.
    client: Client,
    /// Its database and tables are known to exist and match.
    ready: AtomicBool,
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
                    url: url.clone(),
                    admin: client.clone(),
                    client: client.with_database(&cfg.database),
                    ready: AtomicBool::new(false),
                }
            })
            .collect();
        Self {
            tables,
            endpoints: Arc::new(endpoints),
            current: Arc::new(AtomicUsize::new(0)),
            database: cfg.database.clone(),
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
            })
            .collect();
        Self {
            tables,
            endpoints: Arc::new(endpoints),
            current: self.current.clone(),
            database: self.database.clone(),
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

    /// URL of the endpoint in use.
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
            crate::metrics::CLICKHOUSE_FAILOVERS.inc();
            warn!(from = %url, to = %self.endpoints[next].url, "ClickHouse endpoint failed; failing over");
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
        let routed = self.tables.iter().map(|t| t.ddl(db));
        for ddl in schema(db).into_iter().chain(routed) {
            ep.admin
                .query(&ddl)
                .execute()
                .await
                .map_err(query_err("schema creation"))?;
        }
        // Tables made before weir recorded the control-plane version get the column.
        for table in self.table_names() {
            let have = Self::columns(ep, db, table).await?;
            if !have.contains_key("control_version") {
                let sql =
                    format!("ALTER TABLE {db}.{table} ADD COLUMN control_version UInt64 DEFAULT 0");
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
            for c in &table.columns {
                let want = c.ty.sql();
                match have.get(&c.name) {
                    Some(t) if *t == want => {}
                    found => {
                        return Err(ClickHouseError::Schema(format!(
                            "table {db}.{} at {} exists with column {} {}, but the pipeline declares {want}; \
                             alter or drop the table, or rename the pipeline's table",
                            table.name,
                            ep.url,
                            c.name,
                            found.map_or("missing", |t| t.as_str()),
                        )));
                    }
                }
            }
        }
        ep.ready.store(true, Ordering::Relaxed);
        info!(url = %ep.url, database = %self.database, routed = self.tables.len(), "ClickHouse tables ready");
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

    /// The highest Kafka offset of `partition` in any of weir's tables, if any row has
    /// one. Rows up to it may be written again by a replay after a crash.
    pub async fn max_offset(&self, partition: i32) -> Result<Option<i64>, ClickHouseError> {
        let mut max = None;
        for table in self.table_names() {
            let sql = format!(
                "SELECT max(kafka_offset) AS max_offset, count() AS rows FROM {table} WHERE kafka_partition = {partition}"
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

    /// The rows of `partition` with offsets in `lo..=hi` already in `table`
    /// (`events` or `dead_letters`).
    pub async fn written(
        &self,
        table: &str,
        partition: i32,
        lo: i64,
        hi: i64,
    ) -> Result<Written, ClickHouseError> {
        let sql = format!(
            "SELECT kafka_offset, kafka_index, event_id FROM {table} \
             WHERE kafka_partition = {partition} AND kafka_offset >= {lo} AND kafka_offset <= {hi}"
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

    /// Inserts kept events into `events`, in one INSERT. Returns when ClickHouse
    /// acknowledged.
    pub async fn insert_events(
        &self,
        kept: &[Kept],
        pipeline: &str,
        plugins: &str,
        control_version: u64,
    ) -> Result<(), ClickHouseError> {
        if kept.is_empty() {
            return Ok(());
        }
        failpoint("events")?;
        let mut insert = self
            .client()
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

    /// Inserts dead letters into `dead_letters`, in one INSERT.
    pub async fn insert_dead_letters(
        &self,
        dead: &[DeadLetter],
        pipeline: &str,
        control_version: u64,
    ) -> Result<(), ClickHouseError> {
        if dead.is_empty() {
            return Ok(());
        }
        failpoint("dead_letters")?;
        let mut insert = self
            .client()
            .insert::<DeadLetterRow<'_>>("dead_letters")
            .await
            .map_err(query_err("insert into dead_letters"))?;
        let now = datetime(crate::model::now_ms());
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
                    failed_at: now,
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
        rows: &[RoutedRow],
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
        let mut insert = self.client().insert_formatted_with(sql);
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
    ) -> futures::future::BoxFuture<'a, Result<(), crate::sinks::BoxError>> {
        Box::pin(async move {
            self.insert_dead_letters(dead, pipeline, control_version)
                .await
                .map_err(Into::into)
        })
    }
}
