//! weir's tables on a real ClickHouse server (18.16, and chdb's current engine where
//! a test says so): what `ensure_schema` makes of tables that exist already, and how
//! a retried INSERT is named.

use std::sync::Arc;

use anyhow::{Result, ensure};
use weir::sinks::clickhouse::{
    ClickHouseConfig, ClickHouseError, ClickHouseSink, Table, TableConfig,
};
use weir_tests::ClickHouse;

fn sink(ch: &ClickHouse, db: &str, tables: Vec<Table>) -> ClickHouseSink {
    let cfg = ClickHouseConfig {
        url: ch.url(),
        database: db.into(),
        ..ClickHouseConfig::default()
    };
    ClickHouseSink::new(&cfg, Arc::from(tables))
}

fn views_table() -> Table {
    Table::new(&TableConfig {
        name: "views".into(),
        columns: vec!["profile_id String".into()],
        order_by: vec!["timestamp".into()],
    })
    .expect("a valid table")
}

/// A routed table made by someone else, with the declared columns but not the Kafka
/// coordinates weir writes, is refused with the column named, before weir creates
/// anything for it (its coordinates view would read the missing columns).
#[tokio::test]
async fn a_routed_table_without_weirs_columns_is_refused_by_name() -> Result<()> {
    let ch = ClickHouse::start()?;
    ch.query("CREATE DATABASE t").await?;
    ch.query(
        "CREATE TABLE t.views (event_id String, app String, timestamp DateTime, plugins String, \
         control_version UInt64, kafka_partition UInt32, kafka_offset UInt64, profile_id String) \
         ENGINE = MergeTree() ORDER BY timestamp",
    )
    .await?;
    let err = sink(&ch, "t", vec![views_table()])
        .ensure_schema()
        .await
        .expect_err("kafka_index is missing");
    let ClickHouseError::Schema(msg) = &err else {
        panic!("want a schema error, got {err:?}");
    };
    ensure!(
        msg.contains("table t.views")
            && msg.contains(
                "exists with column kafka_index missing, but the pipeline's table has UInt32"
            ),
        "{msg}"
    );
    let views = ch
        .count("SELECT count() FROM system.tables WHERE database = 't' AND name LIKE '%coords%'")
        .await?;
    ensure!(
        views == 0,
        "{views} coordinates views (and their tables) made"
    );

    // Once the column is there, the table is taken as it is and gets its view.
    ch.query("ALTER TABLE t.views ADD COLUMN kafka_index UInt32")
        .await?;
    sink(&ch, "t", vec![views_table()]).ensure_schema().await?;
    let views = ch
        .count("SELECT count() FROM system.tables WHERE database = 't' AND engine = 'MaterializedView' AND name LIKE '_weir_coords_%'")
        .await?;
    ensure!(
        views == 3,
        "{views} coordinates views, want events', dead letters', views'"
    );
    Ok(())
}

/// An INSERT whose answer was lost is sent again, possibly to another replica after a
/// failover, and a dead letter's `failed_at` is the time of the attempt: the retry's
/// bytes differ, so block deduplication does not see it. On a current release weir
/// names each INSERT by its rows (`insert_deduplication_token`), so a table that
/// deduplicates INSERTs (every replicated one; here a plain MergeTree with
/// `non_replicated_deduplication_window`, since chdb has no ZooKeeper) stores the
/// retry once, while the same event's dead letter from another sink, in an INSERT of
/// its own, is stored. 18.16 knows no such setting: weir sends none there, and the
/// same INSERTs go through (three rows: its plain tables do not deduplicate).
#[tokio::test]
async fn a_retried_insert_is_stored_once_where_the_server_takes_a_token() -> Result<()> {
    use weir::model::{DeadLetter, Origin, Stage};
    use weir::sinks::clickhouse::InsertCompression;

    let letter = |stage, plugin: &str| DeadLetter {
        origin: Origin {
            partition: 2,
            offset: 4711,
            index: 3,
            received_ms: 1_765_000_000_000,
        },
        event_id: "e-1".into(),
        app: "shop".into(),
        name: "signup_completed".into(),
        stage,
        plugin: plugin.into(),
        plugin_version: String::new(),
        reason: "refused".into(),
        raw: "{}".into(),
    };
    let webhook = letter(Stage::Webhook, "crm");
    let topic = letter(Stage::Sink, "topic:signups");
    for (ch, current) in [
        (ClickHouse::current()?, true),
        (ClickHouse::start()?, false),
    ] {
        let cfg = ClickHouseConfig {
            url: ch.url(),
            database: "tok".into(),
            compression: InsertCompression::None,
            ..ClickHouseConfig::default()
        };
        let s = ClickHouseSink::new(&cfg, Arc::from(Vec::new()));
        s.ensure_schema().await?;
        if current {
            ch.query(
                "ALTER TABLE tok.dead_letters MODIFY SETTING non_replicated_deduplication_window = 100",
            )
            .await?;
        }
        s.insert_dead_letters(&[&webhook], "engagement", 1, 1_765_000_000)
            .await?;
        // The retry, a second later.
        s.insert_dead_letters(&[&webhook], "engagement", 1, 1_765_000_001)
            .await?;
        s.insert_dead_letters(&[&topic], "engagement", 1, 1_765_000_001)
            .await?;
        let rows = ch
            .query("SELECT stage, plugin FROM tok.dead_letters ORDER BY stage, plugin, failed_at")
            .await?;
        let want = if current {
            "sink\ttopic:signups\nwebhook\tcrm"
        } else {
            "sink\ttopic:signups\nwebhook\tcrm\nwebhook\tcrm"
        };
        ensure!(
            rows == want,
            "{} ({}): {rows:?}, want {want:?}",
            if current { "current release" } else { "18.16" },
            ch.url()
        );
    }
    Ok(())
}
