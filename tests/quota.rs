//! Quotas on real services: one app floods far over its quota while another posts at
//! its normal rate. The flooder is answered 429 with `Retry-After` for what is over,
//! the other app is never refused, and every event either app was told was accepted
//! (202) is in ClickHouse once; none that was refused is.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use tokio::sync::Mutex;
use weir_tests::{ClickHouse, Redis, Tansu, WRITE_KEY, Weir};

const NOISY_KEY: &str = "wk_noisy_1234567890abcdef";
/// The noisy app's quota, events per second (burst 1 s).
const QUOTA: u64 = 200;
const FLOOD_SECS: f64 = 3.0;

fn config(tansu: &Tansu, clickhouse: &ClickHouse) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "quiet"
write_keys = ["{WRITE_KEY}"]
[[app]]
name = "noisy"
write_keys = ["{NOISY_KEY}"]
[app.quota]
events_per_sec = {QUOTA}
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "quota"
[processor]
flush_max_events = 1000
flush_interval_ms = 100
"#,
        tansu.bootstrap(),
        clickhouse.url(),
    )
}

#[derive(Default)]
struct Seen {
    accepted: BTreeSet<String>,
    refused: u64,
    refused_ids: BTreeSet<String>,
    other: Vec<u16>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_over_quota_is_refused_429_and_the_other_app_is_served() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&(config(&tansu, &clickhouse) + &redis.section()))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let url = weir.events_url();
    let http = reqwest::Client::new();

    let noisy = Arc::new(Mutex::new(Seen::default()));
    let quiet = Arc::new(Mutex::new(Seen::default()));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(FLOOD_SECS);
    let mut tasks = Vec::new();
    // Eight flooders, 20 events a request, as fast as they are answered.
    for client in 0..8 {
        let (http, url, seen) = (http.clone(), url.clone(), noisy.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < end {
                let ids: Vec<String> = (0..20).map(|i| format!("n{client}-{n}-{i}")).collect();
                n += 1;
                let body: Vec<_> = ids
                    .iter()
                    .map(|id| json!({"name": "app_opened", "event_id": id}))
                    .collect();
                let resp = http
                    .post(&url)
                    .bearer_auth(NOISY_KEY)
                    .json(&body)
                    .send()
                    .await?;
                let status = resp.status().as_u16();
                let retry_after = resp.headers().get("retry-after").cloned();
                let mut seen = seen.lock().await;
                match status {
                    202 => seen.accepted.extend(ids),
                    429 => {
                        if retry_after.is_none() {
                            bail!("a 429 without Retry-After");
                        }
                        seen.refused += 1;
                        seen.refused_ids.extend(ids);
                    }
                    other => seen.other.push(other),
                }
            }
            anyhow::Ok(())
        }));
    }
    // The quiet app: one event every 50 ms.
    {
        let (http, url, seen) = (http.clone(), url.clone(), quiet.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < end {
                let id = format!("q{n}");
                n += 1;
                let resp = http
                    .post(&url)
                    .bearer_auth(WRITE_KEY)
                    .json(&json!({"name": "app_opened", "event_id": id}))
                    .send()
                    .await?;
                let mut seen = seen.lock().await;
                match resp.status().as_u16() {
                    202 => {
                        seen.accepted.insert(id);
                    }
                    other => seen.other.push(other),
                }
                drop(seen);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let noisy = noisy.lock().await;
    let quiet = quiet.lock().await;
    println!(
        "in {elapsed:.1} s: noisy {} events accepted, {} requests refused; quiet {} accepted",
        noisy.accepted.len(),
        noisy.refused,
        quiet.accepted.len()
    );
    if !noisy.other.is_empty() || !quiet.other.is_empty() {
        bail!(
            "unexpected answers: noisy {:?}, quiet {:?}",
            noisy.other,
            quiet.other
        );
    }
    // Over the quota: at most the rate over the run, its 1 s burst and one request.
    let most = (QUOTA as f64 * (elapsed + 1.0)) as usize + 20;
    let accepted = noisy.accepted.len();
    if accepted > most || accepted < QUOTA as usize {
        bail!(
            "the noisy app had {accepted} events accepted in {elapsed:.1} s; quota allows {QUOTA}/s (at most {most})"
        );
    }
    if noisy.refused < 100 {
        bail!("only {} requests of the flood were refused", noisy.refused);
    }
    if quiet.accepted.len() < 30 {
        bail!(
            "the quiet app had only {} events accepted",
            quiet.accepted.len()
        );
    }
    let throttled = weir.metric_now(
        "weir_ingest_throttled_requests_total",
        &[("app", "noisy"), ("limit", "app_events")],
    );
    assert_eq!(throttled, noisy.refused as f64);

    // Every accepted event once, per app; nothing refused.
    let want = (noisy.accepted.len() + quiet.accepted.len()) as u64;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM quota.events",
            want,
            Duration::from_secs(60),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    clickhouse
        .assert_each_once(&[("quota.events", want)])
        .await?;
    for (app, seen) in [("noisy", &*noisy), ("quiet", &*quiet)] {
        let ids = clickhouse
            .query(&format!(
                "SELECT event_id FROM quota.events WHERE app = '{app}' ORDER BY event_id"
            ))
            .await?;
        let stored: BTreeSet<String> = ids.lines().map(str::to_owned).collect();
        if stored != seen.accepted {
            bail!(
                "{app}: {} stored, {} accepted, {} accepted but missing, {} refused but stored",
                stored.len(),
                seen.accepted.len(),
                seen.accepted.difference(&stored).count(),
                stored.intersection(&seen.refused_ids).count()
            );
        }
    }
    Ok(())
}
