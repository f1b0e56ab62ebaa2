//! ClickHouse failover: weir is given two endpoints; the first is stopped mid-run and
//! the writes go on to the second. Every accepted event is in exactly one of the two
//! servers, once (the test's two servers are independent; in production the endpoints
//! serve the same replicated tables).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};
use weir_tests::{ClickHouse, Redis, Tansu, WRITE_KEY, Weir, metric};

fn batch(n0: usize) -> Vec<Value> {
    (n0..n0 + 100)
        .map(|n| json!({"name": "app_opened", "event_id": format!("f{n:05}"), "user_id": format!("u{n}")}))
        .collect()
}

async fn ids(ch: &ClickHouse) -> Result<Vec<String>> {
    let text = ch.query("SELECT event_id FROM failover.events").await?;
    Ok(text.lines().map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_over_to_the_next_endpoint() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let mut first = ClickHouse::start()?;
    let second = ClickHouse::start()?;
    let config = format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "failover"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
failover_urls = ["{}"]
database = "failover"
[processor]
flush_max_events = 500
flush_interval_ms = 100
retry_backoff_ms = 200
"#,
        tansu.bootstrap(),
        first.url(),
        second.url()
    );
    let redis = Redis::start()?;
    let weir = Weir::start(&(config + &redis.section()))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let http = reqwest::Client::new();
    let mut sent = 0;
    let post = async |n0: usize| -> Result<()> {
        let resp = http
            .post(weir.events_url())
            .bearer_auth(WRITE_KEY)
            .json(&batch(n0))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 202, "ingest answered {}", resp.status());
        Ok(())
    };
    while sent < 1_000 {
        post(sent).await?;
        sent += 100;
    }
    first
        .wait_for_count(
            "SELECT count() FROM failover.events",
            1_000,
            Duration::from_secs(60),
        )
        .await?;
    // Both servers got weir's tables at start.
    assert_eq!(
        second.count("SELECT count() FROM failover.events").await?,
        0
    );

    first.stop();
    while sent < 2_000 {
        post(sent).await?;
        sent += 100;
    }
    second
        .wait_for_count(
            "SELECT count() FROM failover.events",
            1_000,
            Duration::from_secs(60),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| first.restart())?;

    let (a, b) = (ids(&first).await?, ids(&second).await?);
    let all: BTreeSet<&String> = a.iter().chain(&b).collect();
    assert_eq!(
        a.len() + b.len(),
        sent,
        "{} + {} rows for {sent} events",
        a.len(),
        b.len()
    );
    assert_eq!(all.len(), sent, "no event in both");
    let metrics = weir.metrics().await?;
    assert_eq!(
        metric(&metrics, "weir_clickhouse_failovers_total", &[]),
        1.0
    );
    Ok(())
}
