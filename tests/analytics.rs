//! The analyst kit (`analytics/`): every query of `analytics/queries/` runs on weir's
//! own tables, made by weir's own DDL, against seeded events whose answers are worked
//! out by hand below, on ClickHouse 18.16 (the server the other tests start) and on
//! chdb 26.9 (a current ClickHouse engine); and every panel of the Grafana dashboard
//! is one of those queries with Grafana's time range and app variable in place of the
//! literals.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weir::sinks::clickhouse::{Layout, ServerVersion, schema};
use weir_tests::{ClickHouse, repo_root};

/// The seeded events: (app, name, user, UTC time, properties). Shop's signup funnel
/// (steps within 24 hours, in order):
/// - u1 (variant a): steps 1, 2, 3 on 11-02: reaches 3.
/// - u2 (a): steps 1, 2 on 11-02: reaches 2.
/// - u3 (b): steps 1, 2 on 11-03, step 3 two days later: reaches 2.
/// - u4 (b): step 1 on 11-03: reaches 1.
/// - u5 (b): step 2 only: not in the funnel.
/// - u6 (a): steps 1 and 3, no 2: reaches 1.
///
/// Activity after the first day: u1 on 11-03 (day 1) and 11-09 (day 7), u2 on 11-03
/// (day 1), u6 on 11-11 (day 7). Profile views: bob by u1 (twice), u2 and u4; carol by
/// u3; u4 views their own profile. App blog: two people open it on 11-02. One event
/// just before and one just after November: outside every query's range.
const EVENTS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "shop",
        "signup_step_completed",
        "u1",
        "2026-11-02 10:00:00",
        r#"{"step":1,"variant":"a"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u1",
        "2026-11-02 10:05:00",
        r#"{"step":2,"variant":"a"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u1",
        "2026-11-02 10:10:00",
        r#"{"step":3,"variant":"a"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u2",
        "2026-11-02 11:00:00",
        r#"{"step":1,"variant":"a"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u2",
        "2026-11-02 11:30:00",
        r#"{"step":2,"variant":"a"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u3",
        "2026-11-03 09:00:00",
        r#"{"step":1,"variant":"b"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u3",
        "2026-11-03 09:10:00",
        r#"{"step":2,"variant":"b"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u3",
        "2026-11-05 09:00:00",
        r#"{"step":3,"variant":"b"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u4",
        "2026-11-03 12:00:00",
        r#"{"step":1,"variant":"b"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u5",
        "2026-11-04 10:00:00",
        r#"{"step":2,"variant":"b"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u6",
        "2026-11-04 08:00:00",
        r#"{"step":1,"variant":"a"}"#,
    ),
    (
        "shop",
        "signup_step_completed",
        "u6",
        "2026-11-04 08:10:00",
        r#"{"step":3,"variant":"a"}"#,
    ),
    ("shop", "app_opened", "u1", "2026-11-03 08:00:00", "{}"),
    ("shop", "app_opened", "u1", "2026-11-09 08:00:00", "{}"),
    ("shop", "app_opened", "u2", "2026-11-03 20:00:00", "{}"),
    ("shop", "app_opened", "u6", "2026-11-11 09:00:00", "{}"),
    (
        "shop",
        "profile_viewed",
        "u1",
        "2026-11-02 12:00:00",
        r#"{"profile_id":"bob"}"#,
    ),
    (
        "shop",
        "profile_viewed",
        "u2",
        "2026-11-02 12:30:00",
        r#"{"profile_id":"bob"}"#,
    ),
    (
        "shop",
        "profile_viewed",
        "u1",
        "2026-11-02 13:00:00",
        r#"{"profile_id":"bob"}"#,
    ),
    (
        "shop",
        "profile_viewed",
        "u3",
        "2026-11-03 10:00:00",
        r#"{"profile_id":"carol"}"#,
    ),
    (
        "shop",
        "profile_viewed",
        "u4",
        "2026-11-03 13:00:00",
        r#"{"profile_id":"bob"}"#,
    ),
    (
        "shop",
        "profile_viewed",
        "u4",
        "2026-11-03 13:05:00",
        r#"{"profile_id":"u4"}"#,
    ),
    ("blog", "app_opened", "w1", "2026-11-02 09:00:00", "{}"),
    ("blog", "app_opened", "w2", "2026-11-02 09:30:00", "{}"),
    ("shop", "app_opened", "u1", "2026-10-31 23:59:59", "{}"),
    (
        "shop",
        "signup_step_completed",
        "u7",
        "2026-12-01 00:00:00",
        r#"{"step":1,"variant":"a"}"#,
    ),
];

/// Dead letters: two of shop's events refused on 11-02.
const DEAD_LETTERS: &[(&str, &str)] = &[
    ("shop", "2026-11-02 14:00:00"),
    ("shop", "2026-11-02 15:00:00"),
];

/// Each query of the kit and its answer on the seed (TabSeparated), worked out by hand
/// from the seed's description.
const ANSWERS: &[(&str, &str)] = &[
    // 5 people did step 1 (u1, u2, u3, u4, u6), 3 reached step 2, 1 step 3.
    ("funnel_dropoff", "5\t3\t1\t60\t33.3"),
    // 11-02: u1 (completed), u2 (step 2); 11-03: u3 (step 2), u4; 11-04: u6.
    (
        "conversion_over_time",
        "2026-11-02\t2\t2\t1\t50\n2026-11-03\t2\t1\t0\t0\n2026-11-04\t1\t0\t0\t0",
    ),
    // a: u1 (3), u2 (2), u6 (1); b: u3 (2), u4 (1).
    ("funnel_by_variant", "a\t3\t2\t1\t33.3\nb\t2\t1\t0\t0"),
    // 11-02: u1 (day 1 and 7), u2 (day 1); 11-03: u3, u4; 11-04: u5, u6 (day 7).
    (
        "retention",
        "2026-11-02\t2\t2\t1\t100\t50\n2026-11-03\t2\t0\t0\t0\t0\n2026-11-04\t2\t0\t1\t0\t50",
    ),
    // bob: u1 twice, u2, u4; carol: u3; u4's own profile left out.
    ("top_profiles_viewed", "bob\t4\t3\ncarol\t1\t1"),
    (
        "event_volume",
        "blog\t2026-11-02\t2\t2\t0\n\
         shop\t2026-11-02\t8\t2\t2\n\
         shop\t2026-11-03\t8\t4\t0\n\
         shop\t2026-11-04\t3\t2\t0\n\
         shop\t2026-11-05\t1\t1\t0\n\
         shop\t2026-11-09\t1\t1\t0\n\
         shop\t2026-11-11\t1\t1\t0",
    ),
];

/// The literals of a kit query that the dashboard replaces with Grafana's macros and
/// variables (grafana-clickhouse-datasource).
const GRAFANA: [(&str, &str); 3] = [
    ("toDateTime('2026-11-01 00:00:00', 'UTC')", "$__fromTime"),
    ("toDateTime('2026-12-01 00:00:00', 'UTC')", "$__toTime"),
    ("'shop'", "${app:sqlstring}"),
];

/// weir's DDL for database `weir` as it makes it on a server of release `server`, then
/// the seed.
fn seed(server: ServerVersion) -> Vec<String> {
    let mut sql = schema("weir", &Layout::default().on_server(server));
    let rows: Vec<String> = EVENTS
        .iter()
        .enumerate()
        .map(|(i, (app, name, user, at, properties))| {
            format!(
                "('s{i}', '{app}', '{name}', '{user}', toDateTime('{at}', 'UTC'), \
                 toUnixTimestamp(toDateTime('{at}', 'UTC')) * 1000, toDateTime('{at}', 'UTC'), \
                 '{properties}', '{{}}')"
            )
        })
        .collect();
    sql.push(format!(
        "INSERT INTO weir.events (event_id, app, name, user_id, timestamp, timestamp_ms, \
         received_at, properties, context) VALUES {}",
        rows.join(", ")
    ));
    let dead: Vec<String> = DEAD_LETTERS
        .iter()
        .enumerate()
        .map(|(i, (app, at))| {
            format!(
                "('d{i}', '{app}', 'signup_step_completed', 'schema', '', '', 'step: not an integer', \
                 '{{}}', toDateTime('{at}', 'UTC'))"
            )
        })
        .collect();
    sql.push(format!(
        "INSERT INTO weir.dead_letters (event_id, app, name, stage, plugin, plugin_version, \
         reason, raw, failed_at) VALUES {}",
        dead.join(", ")
    ));
    sql
}

/// The kit's queries, by name (the file's stem), with their answers on the seed. Fails
/// if a query has no answer here or an answer no query.
fn kit() -> Result<Vec<(String, String, &'static str)>> {
    let dir = repo_root().join("analytics/queries");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("a query file's name")?
            .to_owned();
        let sql = std::fs::read_to_string(&path)?;
        let answer = ANSWERS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .with_context(|| format!("analytics/queries/{name}.sql has no answer in this test"))?;
        queries.push((name, sql, answer));
    }
    queries.sort();
    if queries.len() != ANSWERS.len() {
        bail!(
            "{} answers for {} query files",
            ANSWERS.len(),
            queries.len()
        );
    }
    Ok(queries)
}

#[tokio::test]
async fn the_kit_answers_on_clickhouse_18_16() -> Result<()> {
    let clickhouse = ClickHouse::start()?;
    for sql in seed(ServerVersion::OLDEST) {
        clickhouse.query(&sql).await?;
    }
    for (name, sql, want) in kit()? {
        let got = clickhouse.query(&sql).await.context(name.clone())?;
        if got != want {
            bail!("{name} answered\n{got}\nwant\n{want}");
        }
        eprintln!("ok {name} (ClickHouse 18.16):\n{got}");
    }
    Ok(())
}

#[test]
fn the_kit_answers_on_a_current_clickhouse() -> Result<()> {
    let mut run: Vec<Value> = seed(ServerVersion::new(26, 9))
        .into_iter()
        .map(|sql| json!({"what": "seed", "sql": sql, "expect": null}))
        .collect();
    for (name, sql, want) in kit()? {
        run.push(json!({"what": name, "sql": sql, "expect": want}));
    }
    weir_tests::run_on_chdb(&run)?;
    Ok(())
}

#[test]
fn every_dashboard_panel_is_a_query_of_the_kit() -> Result<()> {
    let path = repo_root().join("analytics/grafana/weir-engagement.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let kit = kit()?;
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let mut shown = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let targets = panel["targets"]
            .as_array()
            .context("a panel without targets")?;
        for target in targets {
            assert_eq!(
                target["datasource"]["type"], "grafana-clickhouse-datasource",
                "{title}"
            );
            let mut sql = target["rawSql"]
                .as_str()
                .with_context(|| format!("{title}: no rawSql"))?
                .to_owned();
            for (literal, macro_) in GRAFANA {
                sql = sql.replace(macro_, literal);
            }
            let Some((name, _, _)) = kit.iter().find(|(_, q, _)| *q == sql) else {
                bail!("panel {title:?} runs a query that is not one of analytics/queries:\n{sql}");
            };
            shown.push(name.clone());
        }
    }
    shown.sort();
    let all: Vec<String> = kit.iter().map(|(n, _, _)| n.clone()).collect();
    assert_eq!(shown, all, "every query of the kit on the dashboard, once");
    // The app variable the panels use.
    let vars = dashboard["templating"]["list"]
        .as_array()
        .context("no variables")?;
    assert!(vars.iter().any(|v| v["name"] == "app"), "no app variable");
    Ok(())
}
