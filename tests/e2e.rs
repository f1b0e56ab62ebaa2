//! End to end on real services: HTTP POST -> Kafka (Tansu) -> the `enrich` Wasm plugin
//! -> ClickHouse, with weir restarted in the middle of the flow. Twice: on ClickHouse
//! 18.16 (Debian's server) and on a current release (26.9: chdb's engine behind
//! ClickHouse's HTTP interface, `ClickHouse::current`), where weir makes its tables in
//! the current form.
//!
//! Several concurrent clients post over 10,000 events in mixed batches (single JSON
//! events, arrays, NDJSON). Afterwards every accepted event must be in `events` exactly
//! once with the plugin's change visible, every event the plugin rejects must be in
//! `dead_letters` with its reason, and nothing else may be in either table.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use weir_tests::{ClickHouse, Redis, Tansu, WRITE_KEY, Weir, plugin_path};

const CLIENTS: usize = 4;
const EVENTS_PER_CLIENT: usize = 2_600;
/// Batch sizes cycled through by each client; 1 is sent as a bare JSON object.
const BATCH_SIZES: [usize; 8] = [1, 37, 200, 5, 120, 1, 64, 250];

/// What the plugin should do with an event, decided when the event is made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Kept,
    Dropped,
    Rejected(&'static str),
}

fn make_event(client: usize, n: usize) -> (Value, Expect) {
    let id = format!("c{client}-{n:05}");
    let user = format!("u{}", (client * 7919 + n) % 500);
    match n % 20 {
        0 => (
            json!({"name": "profile_viewed", "event_id": id, "user_id": user, "properties": {"source": "feed"}}),
            Expect::Rejected("profile_viewed needs a string properties.profile_id"),
        ),
        1 => (
            json!({"name": "app_opened", "event_id": id, "properties": {"is_test": true}}),
            Expect::Dropped,
        ),
        2 => (
            json!({"name": "post_liked", "event_id": id, "properties": {"post_id": format!("p{n}")}}),
            Expect::Rejected("post_liked requires a user_id"),
        ),
        3..=9 => (
            json!({
                "name": "profile_viewed",
                "event_id": id,
                "user_id": user,
                "timestamp": 1_795_400_000_000u64 + n as u64,
                "properties": {"profile_id": format!("u{}", n % 500), "source": "search"},
                "context": {"locale": "en-GB", "app_version": "4.2.0"}
            }),
            Expect::Kept,
        ),
        10..=15 => (
            json!({
                "name": "post_liked",
                "event_id": id,
                "user_id": user,
                "timestamp": "2026-11-23T10:00:00.123Z",
                "properties": {"post_id": format!("p{}", n % 97), "reaction": "heart"}
            }),
            Expect::Kept,
        ),
        _ => (
            json!({"name": "signup_step_completed", "event_id": id, "properties": {"step": n % 5}}),
            Expect::Kept,
        ),
    }
}

fn encode(batch: &[Value], ndjson: bool) -> (Vec<u8>, &'static str) {
    if ndjson {
        let lines: Vec<String> = batch.iter().map(Value::to_string).collect();
        (
            (lines.join("\n") + "\n").into_bytes(),
            "application/x-ndjson",
        )
    } else if batch.len() == 1 {
        (batch[0].to_string().into_bytes(), "application/json")
    } else {
        (
            Value::Array(batch.to_vec()).to_string().into_bytes(),
            "application/json",
        )
    }
}

/// Posts one batch until it is accepted (202). Connection errors and 503s (weir
/// restarting) are retried with the same body, so the same event ids.
async fn post_until_accepted(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    content_type: &str,
    expected: usize,
) -> Result<u32> {
    let start = Instant::now();
    let mut retries = 0;
    loop {
        let result = client
            .post(url)
            .header("Authorization", format!("Bearer {WRITE_KEY}"))
            .header("Content-Type", content_type)
            .body(body.clone())
            .send()
            .await;
        match result {
            Ok(resp) if resp.status().as_u16() == 202 => {
                let answer: Value = resp.json().await?;
                if answer["accepted"] != expected {
                    bail!("accepted {} of {expected}: {answer}", answer["accepted"]);
                }
                return Ok(retries);
            }
            Ok(resp) if resp.status().as_u16() == 503 => {}
            Ok(resp) => bail!(
                "unexpected answer {}: {}",
                resp.status(),
                resp.text().await?
            ),
            Err(e) if e.is_connect() || e.is_request() => {}
            Err(e) => bail!("request failed: {e}"),
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("batch not accepted within 120 s");
        }
        retries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn config(tansu: &Tansu, clickhouse: &ClickHouse) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "e2e"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "e2e"
compression = "{}"
[processor]
flush_max_events = 2000
flush_interval_ms = 250
[pipeline]
name = "engagement"
[[pipeline.plugin]]
name = "enrich"
path = "{}"
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        clickhouse.compression(),
        plugin_path("enrich").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_flow_to_clickhouse_exactly_once_across_a_restart() -> Result<()> {
    flow(ClickHouse::start()?, "String").await
}

/// The same on a current release: the tables take its form (LowCardinality).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_flow_to_a_current_clickhouse_exactly_once_across_a_restart() -> Result<()> {
    flow(ClickHouse::current()?, "LowCardinality(String)").await
}

/// The flow on `clickhouse`, whose `events.app` weir should make of type `app_type`.
async fn flow(clickhouse: ClickHouse, app_type: &str) -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let redis = Redis::start()?;
    let weir = Weir::start(&(config(&tansu, &clickhouse) + &redis.section()))?;
    // The processor has joined the group (on Tansu this takes about half the session
    // timeout): the restart below then really interrupts a running pipeline.
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let url = weir.events_url();
    let weir = Arc::new(Mutex::new(weir));

    let accepted = Arc::new(AtomicUsize::new(0));
    let mut expected: BTreeMap<String, Expect> = BTreeMap::new();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let events: Vec<(Value, Expect)> =
            (0..EVENTS_PER_CLIENT).map(|n| make_event(c, n)).collect();
        for (e, x) in &events {
            expected.insert(e["event_id"].as_str().unwrap().to_owned(), *x);
        }
        let (url, accepted) = (url.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut retries = 0;
            let (mut i, mut b) = (0, c);
            while i < events.len() {
                let size = BATCH_SIZES[b % BATCH_SIZES.len()].min(events.len() - i);
                let batch: Vec<Value> =
                    events[i..i + size].iter().map(|(e, _)| e.clone()).collect();
                let (body, ct) = encode(&batch, b % 3 == 2);
                retries += post_until_accepted(&http, &url, body, ct, size).await?;
                accepted.fetch_add(size, Ordering::SeqCst);
                i += size;
                b += 1;
                // Pace the clients (~10 s in all), so the restart lands mid-flow.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            anyhow::Ok(retries)
        }));
    }

    // Restart weir (graceful: SIGTERM) once about 40% of the events are accepted and
    // the processor has written some of them.
    let total = CLIENTS * EVENTS_PER_CLIENT;
    while accepted.load(Ordering::SeqCst) < total * 2 / 5
        || clickhouse
            .count("SELECT count() FROM e2e.events")
            .await
            .unwrap_or(0)
            == 0
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_restart = accepted.load(Ordering::SeqCst);
    {
        let mut w = weir.lock().await;
        let log = w.log();
        tokio::task::block_in_place(|| {
            assert!(w.stop(), "weir did not stop gracefully:\n{log}");
            w.restart()
        })?;
    }
    let written = clickhouse.count("SELECT count() FROM e2e.events").await?;
    eprintln!(
        "weir restarted after {at_restart} of {total} events were accepted and {written} written"
    );

    let mut retries = 0;
    for c in clients {
        retries += c.await??;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), total);
    assert!(at_restart < total, "the restart must happen mid-flow");
    eprintln!("all {total} events accepted; {retries} requests retried during the restart");

    let kept: BTreeSet<&str> = expected
        .iter()
        .filter(|(_, x)| **x == Expect::Kept)
        .map(|(id, _)| id.as_str())
        .collect();
    let rejected: BTreeMap<&str, &str> = expected
        .iter()
        .filter_map(|(id, x)| match x {
            Expect::Rejected(reason) => Some((id.as_str(), *reason)),
            _ => None,
        })
        .collect();

    // Wait for the processor to write everything (and a little longer, to catch extras).
    let want = (kept.len() + rejected.len()) as u64;
    let started = Instant::now();
    loop {
        let have = clickhouse
            .count(
                "SELECT (SELECT count() FROM e2e.events) + (SELECT count() FROM e2e.dead_letters)",
            )
            .await
            .unwrap_or(0);
        if have >= want {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let w = weir.lock().await;
            bail!(
                "only {have} of {want} rows after 120 s; weir log:\n{}",
                w.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "all rows visible {:?} after the last POST",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every kept event exactly once, and nothing else.
    let rows = clickhouse
        .query("SELECT event_id FROM e2e.events ORDER BY event_id")
        .await?;
    let ids: Vec<&str> = rows.lines().collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(
        ids.len(),
        unique.len(),
        "duplicates in events: {} rows, {} distinct",
        ids.len(),
        unique.len()
    );
    let missing: Vec<_> = kept.difference(&unique).take(10).collect();
    let extra: Vec<_> = unique.difference(&kept).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "events table differs: missing {missing:?}, unexpected {extra:?}"
    );

    // The plugin's change is visible on every row, and the rows name who processed them.
    let unenriched = clickhouse
        .count("SELECT count() FROM e2e.events WHERE visitParamExtractString(properties, 'enriched_by') != 'enrich'")
        .await?;
    assert_eq!(unenriched, 0, "rows without the plugin's change");
    let no_self_view = clickhouse
        .count("SELECT count() FROM e2e.events WHERE name = 'profile_viewed' AND NOT visitParamHas(properties, 'self_view')")
        .await?;
    assert_eq!(no_self_view, 0);
    let pipelines = clickhouse
        .query("SELECT DISTINCT pipeline, plugins, app FROM e2e.events")
        .await?;
    let fields: Vec<&str> = pipelines.split('\t').collect();
    assert_eq!(
        fields.len(),
        3,
        "one pipeline version expected, got {pipelines:?}"
    );
    assert_eq!(fields[0], "engagement");
    assert!(
        fields[1].starts_with("enrich@") && fields[1].len() == "enrich@".len() + 12,
        "{pipelines}"
    );
    assert_eq!(fields[2], "e2e");
    // Timestamps survive as sent.
    let ts = clickhouse
        .query(
            "SELECT timestamp_ms, toString(timestamp) FROM e2e.events WHERE event_id = 'c0-00010'",
        )
        .await?;
    assert!(ts.starts_with("1795428000123\t"), "{ts}");

    // Every rejected event is a dead letter with the plugin's reason, and nothing else.
    let rows = clickhouse
        .query("SELECT event_id, stage, plugin, reason FROM e2e.dead_letters ORDER BY event_id")
        .await?;
    let mut dead = BTreeMap::new();
    for line in rows.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!((f[1], f[2]), ("plugin", "enrich"), "{line}");
        assert!(
            dead.insert(f[0], f[3]).is_none(),
            "duplicate dead letter {}",
            f[0]
        );
    }
    assert_eq!(
        dead.len(),
        rejected.len(),
        "dead letters: {} rows, {} expected",
        dead.len(),
        rejected.len()
    );
    for (id, reason) in &rejected {
        assert_eq!(dead.get(id), Some(reason), "dead letter of {id}");
    }
    let raw = clickhouse
        .query("SELECT raw FROM e2e.dead_letters WHERE event_id = 'c1-00002'")
        .await?;
    let raw: Value = serde_json::from_str(&raw.replace("\\\\", "\\"))?;
    assert_eq!(
        raw["name"], "post_liked",
        "the dead letter keeps the event: {raw}"
    );

    // The form of the server's release.
    let app = clickhouse
        .query("SELECT type FROM system.columns WHERE database = 'e2e' AND table = 'events' AND name = 'app'")
        .await?;
    assert_eq!(app, app_type, "events.app");

    let w = weir.lock().await;
    assert!(
        w.metric_now("weir_processor_batch_events_count", &[]) > 0.0,
        "the restarted instance processed batches"
    );
    Ok(())
}
