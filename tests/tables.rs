//! weir's tables on a real ClickHouse server (18.16): what `ensure_schema` makes of
//! tables that exist already.

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
