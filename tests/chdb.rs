//! weir's SQL on a current ClickHouse release. The servers the other tests start are
//! Debian's 18.16; this runs, on chdb 26.9 (a current ClickHouse engine in-process,
//! from PyPI `chdb-core`, installed by `scripts/stack.sh install`), every statement weir
//! emits to make its tables, in the form it gives them on a current release and in
//! 18.16's (tables kept across an upgrade), for weir's own tables, the demo's routed
//! table and a table of every column type a pipeline may declare, the migration of a table from before
//! `control_version`, and every SQL block of the README, on seeded events whose funnel
//! answer is known. It lists each statement it ran.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use weir::config::Config;
use weir::sinks::clickhouse::{
    Layout, ServerVersion, Table, TableConfig, add_control_version, schema, schema_ddl,
};

/// The tables as weir makes them on chdb's release (the current form).
fn current() -> Layout {
    Layout::default().on_server(ServerVersion::new(26, 9))
}

/// The README's ```sql blocks, split into statements (comment lines dropped).
fn readme_statements() -> Result<Vec<(String, String)>> {
    let readme = std::fs::read_to_string(weir_tests::repo_root().join("README.md"))?;
    let mut out = Vec::new();
    let chunks: Vec<&str> = readme.split("```sql\n").collect();
    for (n, (before, block)) in chunks.iter().zip(&chunks[1..]).enumerate() {
        let sql = block
            .split_once("```")
            .context("an unclosed ```sql block")?
            .0;
        let text: String = sql
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for statement in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            out.push((format!("README sql block {}", n + 1), statement.to_owned()));
        }
        // "Moving to a replicated cluster" sets the tables aside and starts weir, which
        // creates them again (here not replicated: chdb has no ZooKeeper).
        if before.ends_with("<!-- migration: set aside -->\n") {
            for sql in schema("weir", &current()) {
                out.push(("weir starts again (migration)".into(), sql));
            }
        }
    }
    Ok(out)
}

fn statement(what: impl Into<String>, sql: impl Into<String>) -> Value {
    json!({"what": what.into(), "sql": sql.into(), "expect": null})
}

/// A query that must answer `expect` (TabSeparated, trimmed).
fn answered(what: &str, sql: &str, expect: &str) -> Value {
    json!({"what": what, "sql": sql, "expect": expect})
}

#[test]
fn every_statement_weir_emits_and_every_readme_query_run_on_a_current_clickhouse() -> Result<()> {
    let mut run = Vec::new();
    for sql in schema("weir", &current()) {
        let what = sql
            .split('(')
            .next()
            .unwrap_or(&sql)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        run.push(statement(what, sql));
    }
    // The demo's routed tables, as its configuration declares them.
    let demo = std::fs::read_to_string(weir_tests::repo_root().join("examples/demo/weir.toml"))?;
    let demo = Config::parse(&demo)?;
    let mut tables: Vec<TableConfig> = demo.pipeline.tables.clone();
    // Every column type a pipeline may declare.
    let types = [
        "String", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
        "Float32", "Float64", "Bool", "Date", "DateTime",
    ];
    let mut columns: Vec<String> = types
        .iter()
        .map(|t| format!("c_{} {t}", t.to_lowercase()))
        .collect();
    columns.extend(
        types
            .iter()
            .map(|t| format!("n_{} Nullable({t})", t.to_lowercase())),
    );
    tables.push(TableConfig {
        name: "every_type".into(),
        columns,
        order_by: vec!["timestamp".into(), "c_string".into()],
    });
    for cfg in &tables {
        let table = Table::new(cfg).map_err(anyhow::Error::msg)?;
        for ddl in table.ddl_statements("weir", &current()) {
            let name = ddl.creates.unwrap_or_default();
            run.push(statement(format!("CREATE weir.{name}"), ddl.sql));
        }
    }
    // A table from before weir recorded the control-plane version, migrated.
    run.push(statement(
        "a table made before control_version",
        "CREATE TABLE weir.older (event_id String, timestamp DateTime) ENGINE = MergeTree() ORDER BY timestamp",
    ));
    run.push(statement(
        "ALTER TABLE weir.older (migration)",
        add_control_version("weir", "older"),
    ));
    // The DDL is idempotent: a second start runs it again.
    for sql in schema("weir", &current()) {
        run.push(statement("again (idempotent)", sql));
    }
    // The current form: few-valued strings as LowCardinality, codecs on the times and
    // the JSON text.
    run.push(answered(
        "current form: app's type",
        "SELECT type FROM system.columns WHERE database = 'weir' AND table = 'events' AND name = 'app'",
        "LowCardinality(String)",
    ));
    run.push(answered(
        "current form: columns of events with a codec",
        "SELECT count() FROM system.columns WHERE database = 'weir' AND table = 'events' AND compression_codec != ''",
        "5",
    ));
    // Tables weir made on 18.16 and kept when the server is upgraded: 18.16's form, as
    // weir emits it, also runs here and takes rows.
    for sql in schema("legacy", &Layout::default()) {
        run.push(statement("18.16 form", sql));
    }
    run.push(statement(
        "INSERT INTO legacy.events (18.16 form)",
        "INSERT INTO legacy.events (event_id, app, name, user_id, timestamp, timestamp_ms, received_at, properties, context) VALUES \
         ('l1', 'shop', 'page', 'anon-1', toDateTime(1700000000), 1700000000000, now(), '{}', '{}')",
    ));
    run.push(answered(
        "18.16 form: app's type, and the row in the coordinates view",
        "SELECT (SELECT type FROM system.columns WHERE database = 'legacy' AND table = 'events' AND name = 'app'), (SELECT count() FROM legacy._weir_coords_events)",
        "String\t1",
    ));
    // Seeded events: anon-2 views a page, is identified as user-1, who orders; anon-3
    // only views. The identities view is filled as they are written.
    run.push(statement(
        "INSERT INTO weir.events (seed)",
        "INSERT INTO weir.events (event_id, app, name, user_id, timestamp, timestamp_ms, received_at, properties, context) VALUES \
         ('e1', 'shop', 'page', 'anon-2', toDateTime(1700000000), 1700000000000, now(), '{}', '{\"anonymous_id\":\"anon-2\"}'), \
         ('e2', 'shop', 'identify', 'user-1', toDateTime(1700000060), 1700000060000, now(), '{}', '{\"anonymous_id\":\"anon-2\"}'), \
         ('e3', 'shop', 'order_completed', 'user-1', toDateTime(1700000120), 1700000120000, now(), '{}', '{}'), \
         ('e4', 'shop', 'page', 'anon-3', toDateTime(1700000000), 1700000000000, now(), '{}', '{\"anonymous_id\":\"anon-3\"}')",
    ));
    // The coordinates view is filled by the INSERT; a backfill (a view weir adds to a
    // table with rows) copies the table's rows in again.
    run.push(answered(
        "coordinates view of events",
        "SELECT count() FROM weir._weir_coords_events WHERE kafka_partition = 0 AND kafka_offset >= 0",
        "4",
    ));
    for ddl in schema_ddl("weir", &current()) {
        if let Some(fill) = ddl.backfill {
            run.push(statement(format!("backfill of {}", fill.table), fill.sql));
        }
    }
    run.push(answered(
        "coordinates view of events, backfilled",
        "SELECT count() FROM weir._weir_coords_events",
        "8",
    ));
    run.push(answered(
        "identities (materialized view)",
        "SELECT anonymous_id, user_id, via FROM weir.identities FINAL ORDER BY anonymous_id",
        "anon-2\tuser-1\tidentify",
    ));
    for (what, sql) in readme_statements()? {
        // The funnel counts user-1 only (anon-3 never ordered).
        let expect = sql.starts_with("SELECT count() AS people").then_some("1");
        run.push(json!({"what": what, "sql": sql, "expect": expect}));
    }
    weir_tests::run_on_chdb(&run)?;
    Ok(())
}
