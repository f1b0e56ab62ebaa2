//! ClickHouse down for 30 s under continuous traffic, then back.
//!
//! Ingest does not depend on ClickHouse: every POST keeps getting 202 (Kafka holds the
//! events). The processor retries its flush with backoff and commits nothing meanwhile,
//! with consumption paused but still polling (it stays in its group);
//! once ClickHouse is back the backlog drains, and every accepted event is in `events`
//! once, every view in `profile_viewed` once, and every count in Redis once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use weir_tests::{ClickHouse, Redis, Tansu, WRITE_KEY, Weir, engagement_pipeline, metric};

const OUTAGE: Duration = Duration::from_secs(30);

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "outage"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "outage"
[redis]
url = "{}"
[processor]
flush_max_events = 2000
flush_interval_ms = 200
retry_backoff_ms = 250
{}
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        redis.url(),
        engagement_pipeline(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_for_30_s_loses_and_doubles_nothing() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let mut clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;

    let mut views: BTreeMap<String, i64> = BTreeMap::new();
    let mut sent = 0usize;
    // Traffic before, during and after the outage, 500 events/s.
    for _ in 0..10 {
        post(&weir, batch(sent, &mut views)).await?;
        sent += 100;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    clickhouse.stop();
    let down = Instant::now();
    let mut slowest = Duration::ZERO;
    while down.elapsed() < OUTAGE {
        slowest = slowest.max(post(&weir, batch(sent, &mut views)).await?);
        sent += 100;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("ClickHouse down for {OUTAGE:?}: {sent} events accepted, slowest POST {slowest:?}");
    let metrics = weir.metrics().await?;
    assert!(
        metric(
            &metrics,
            "weir_sink_errors_total",
            &[("sink", "clickhouse")]
        ) > 0.0,
        "the failing flushes show in the metrics"
    );
    assert_eq!(
        metric(&metrics, "weir_processor_paused", &[]),
        1.0,
        "consumption is paused while the batch cannot be written"
    );
    tokio::task::block_in_place(|| clickhouse.restart())?;
    let back = Instant::now();
    for _ in 0..10 {
        post(&weir, batch(sent, &mut views)).await?;
        sent += 100;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The backlog drains.
    loop {
        let have = clickhouse
            .count("SELECT count() FROM outage.events")
            .await
            .unwrap_or(0);
        if have >= sent as u64 {
            break;
        }
        if back.elapsed() > Duration::from_secs(90) {
            bail!(
                "{have} of {sent} rows 90 s after ClickHouse returned; log:\n{}",
                weir.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "backlog written {:?} after ClickHouse returned",
        back.elapsed()
    );
    let started = Instant::now();
    loop {
        let stored = redis.hgetall("weir:c:outage:profile_views")?;
        if stored == views {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("counters {stored:?}, want {views:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    clickhouse
        .assert_each_once(&[
            ("outage.events", sent as u64),
            ("outage.profile_viewed", sent as u64),
        ])
        .await?;
    assert_eq!(redis.hgetall("weir:c:outage:profile_views")?, views);
    // The consumer lag of every partition, reported by librdkafka, is back to 0.
    let started = Instant::now();
    loop {
        let metrics = weir.metrics().await?;
        let partitions = metrics
            .lines()
            .filter(|l| l.starts_with("weir_consumer_lag_records{"))
            .count();
        let lag = metric(&metrics, "weir_consumer_lag_records", &[]);
        if partitions == 4 && lag == 0.0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("consumer lag {lag} over {partitions} partitions 20 s after the drain");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = weir.metrics().await?;
    assert!(
        metric(
            &metrics,
            "weir_sink_errors_total",
            &[("sink", "clickhouse")]
        ) > 0.0,
        "the outage is counted"
    );
    assert!(
        metric(&metrics, "weir_processor_pauses_total", &[]) > 0.0,
        "consumption was paused"
    );
    assert_eq!(
        metric(&metrics, "weir_processor_paused", &[]),
        0.0,
        "and resumed"
    );
    assert_eq!(
        metric(&weir.metrics().await?, "weir_processor_paused", &[]),
        0.0
    );
    Ok(())
}

/// Views `n0..n0 + 100` of 23 profiles, counted into `views`.
fn batch(n0: usize, views: &mut BTreeMap<String, i64>) -> Vec<Value> {
    (n0..n0 + 100)
        .map(|n| {
            let profile = format!("p{}", n % 23);
            *views.entry(profile.clone()).or_default() += 1;
            json!({"name": "profile_viewed", "event_id": format!("o{n:06}"),
                   "user_id": format!("u{}", n % 97), "properties": {"profile_id": profile}})
        })
        .collect()
}

/// Posts a batch; fails unless it is accepted. Returns how long the answer took.
async fn post(weir: &Weir, events: Vec<Value>) -> Result<Duration> {
    let started = Instant::now();
    weir.post(&events).await?;
    Ok(started.elapsed())
}

/// A second processor joins while ClickHouse is down and the first is paused in a
/// failing flush: the rebalance takes partitions from it mid-batch. Whatever it had
/// buffered from them is left to their new owner, so once ClickHouse is back every
/// event is written once and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_during_an_outage_loses_and_doubles_nothing() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let mut clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let a = Weir::start(&config(&tansu, &clickhouse, &redis))?;
    a.wait_for_partitions(Duration::from_secs(30))?;
    let mut views = BTreeMap::new();
    let mut sent = 0;
    while sent < 1_000 {
        post(&a, batch(sent, &mut views)).await?;
        sent += 100;
    }
    clickhouse
        .wait_for_count(
            "SELECT count() FROM outage.events",
            1_000,
            Duration::from_secs(60),
        )
        .await?;

    clickhouse.stop();
    while sent < 3_000 {
        post(&a, batch(sent, &mut views)).await?;
        sent += 100;
    }
    a.wait_for_metric(
        "weir_processor_pauses_total",
        &[],
        1.0,
        Duration::from_secs(30),
    )?;
    let b = Weir::start(&config(&tansu, &clickhouse, &redis))?;
    b.wait_for_partitions(Duration::from_secs(60))?;
    a.wait_for_metric(
        "weir_processor_flush_revocations_total",
        &[],
        1.0,
        Duration::from_secs(60),
    )?;
    while sent < 4_000 {
        post(&a, batch(sent, &mut views)).await?;
        sent += 100;
    }
    tokio::task::block_in_place(|| clickhouse.restart())?;

    clickhouse
        .wait_for_count(
            "SELECT count() FROM outage.events",
            sent as u64,
            Duration::from_secs(90),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nA:\n{}\nB:\n{}", a.log(), b.log()))?;
    let started = Instant::now();
    while redis.hgetall("weir:c:outage:profile_views")? != views {
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "counters differ: {:?}",
                redis.hgetall("weir:c:outage:profile_views")?
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    clickhouse
        .assert_each_once(&[
            ("outage.events", sent as u64),
            ("outage.profile_viewed", sent as u64),
        ])
        .await?;
    assert_eq!(redis.hgetall("weir:c:outage:profile_views")?, views);
    Ok(())
}
