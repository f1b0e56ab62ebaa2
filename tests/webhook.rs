//! The forwarding sinks. The webhook sink against a real HTTP endpoint run by the test
//! (the role a customer-engagement tool plays): it answers 500 for a while, then
//! recovers. Every event of the configured names must be accepted exactly once by the
//! endpoint (by its `event_id`, the idempotency key), none of the other names ever sent;
//! and an endpoint that keeps failing sends the events to dead_letters after the retry
//! budget. The Kafka topic sink: every event of its names in the output topic once,
//! keyed by user.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use weir_tests::{ClickHouse, Redis, Tansu, WRITE_KEY, Weir};

/// What the endpoint saw.
#[derive(Default)]
struct Seen {
    /// event_id -> times accepted (answered 200).
    accepted: BTreeMap<String, u32>,
    /// Requests answered 500.
    refused: u32,
    /// Requests without an Idempotency-Key header.
    without_key: u32,
    names: BTreeMap<String, u32>,
}

struct Endpoint {
    seen: Mutex<Seen>,
    /// Answer 500 until this moment (`None`: always).
    fail_until: Mutex<Option<Instant>>,
    /// Answer this long after a request arrived, in milliseconds.
    delay_ms: std::sync::atomic::AtomicU64,
}

impl Endpoint {
    /// Answers 200 from now on.
    fn recover(&self) {
        *self.fail_until.lock().unwrap() = Some(Instant::now());
    }
}

async fn hook(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: String) -> StatusCode {
    let delay = ep.delay_ms.load(std::sync::atomic::Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut seen = ep.seen.lock().unwrap();
    if !headers.contains_key("idempotency-key") {
        seen.without_key += 1;
    }
    if ep
        .fail_until
        .lock()
        .unwrap()
        .is_none_or(|t| Instant::now() < t)
    {
        seen.refused += 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    for e in body["events"].as_array().into_iter().flatten() {
        let id = e["event_id"].as_str().unwrap_or_default().to_owned();
        *seen.accepted.entry(id).or_default() += 1;
        *seen
            .names
            .entry(e["name"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    StatusCode::OK
}

async fn endpoint(fail_for: Option<Duration>) -> Result<(SocketAddr, Arc<Endpoint>)> {
    let ep = Arc::new(Endpoint {
        seen: Mutex::default(),
        fail_until: Mutex::new(fail_for.map(|d| Instant::now() + d)),
        delay_ms: Default::default(),
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(ep.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, ep))
}

fn config(
    tansu: &Tansu,
    clickhouse: &ClickHouse,
    db: &str,
    hook: SocketAddr,
    attempts: u32,
) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "hooks"
write_keys = ["{WRITE_KEY}"]
[admin]
listen = "{{admin}}"
tokens = ["at_test_1234567890abcdef"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "{db}"
[processor]
flush_max_events = 500
flush_interval_ms = 100
[[pipeline.webhook]]
name = "crm"
url = "http://{hook}/hook"
events = ["signup_completed"]
batch_size = 50
max_attempts = {attempts}
retry_backoff_ms = 100
headers = {{ "X-Api-Key" = "test" }}
"#,
        tansu.bootstrap(),
        clickhouse.url(),
    )
}

async fn post_events(weir: &Weir, n: usize) -> Result<usize> {
    let mut signups = 0;
    for chunk in 0..n / 100 {
        let batch: Vec<Value> = (0..100)
            .map(|i| {
                let k = chunk * 100 + i;
                let name = if k % 3 == 0 {
                    "signup_completed"
                } else {
                    "app_opened"
                };
                signups += usize::from(k % 3 == 0);
                json!({"name": name, "event_id": format!("h{k:05}"), "user_id": format!("u{k}")})
            })
            .collect();
        weir.post(&batch).await?;
    }
    Ok(signups)
}

/// A crash after ClickHouse took a flush and before its webhook events were delivered
/// (the endpoint was failing). Kafka replays the flush after the restart; ClickHouse's
/// replay guard skips the rows it holds, and the webhook must still get every event:
/// one sink's guard never hides events from another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_webhook_delivery_loses_no_webhook_event() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let (addr, ep) = endpoint(None).await?;
    let redis = Redis::start()?;
    let processor_config = config(&tansu, &clickhouse, "hookcrash", addr, 1000) + &redis.section();
    let ingest_config = processor_config.replace("[processor]\n", "[processor]\nenabled = false\n");
    let ingest = Weir::start(&ingest_config)?;
    let signups = post_events(&ingest, 1_000).await?;

    let mut processor =
        Weir::start_with_env(&processor_config, &[("WEIR_FAILPOINT", "after_write:1")])?;
    tokio::task::block_in_place(|| processor.wait_for_exit(Duration::from_secs(60)))?;
    assert!(
        processor
            .log()
            .contains("WEIR_FAILPOINT after_write:1 reached")
    );
    let written = clickhouse
        .count("SELECT count() FROM hookcrash.events")
        .await?;
    assert!(written > 0, "the failpoint fires after a write");
    assert!(
        ep.seen.lock().unwrap().accepted.is_empty(),
        "nothing was delivered before the crash"
    );

    ep.recover();
    processor.env.clear();
    tokio::task::block_in_place(|| processor.restart())?;
    let started = Instant::now();
    loop {
        let done = ep.seen.lock().unwrap().accepted.len();
        let rows = clickhouse
            .count("SELECT count() FROM hookcrash.events")
            .await?;
        if done >= signups && rows >= 1_000 {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!(
                "{done} of {signups} events delivered, {rows} rows, after the restart; log:\n{}",
                processor.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected: Vec<String> = (0..1_000)
        .filter(|k| k % 3 == 0)
        .map(|k| format!("h{k:05}"))
        .collect();
    let accepted: Vec<String> = ep.seen.lock().unwrap().accepted.keys().cloned().collect();
    assert_eq!(accepted, expected);
    let (rows, unique) = (
        clickhouse
            .count("SELECT count() FROM hookcrash.events")
            .await?,
        clickhouse
            .count("SELECT uniqExact(event_id) FROM hookcrash.events")
            .await?,
    );
    assert_eq!((rows, unique), (1_000, 1_000), "events doubled or lost");
    eprintln!(
        "{written} rows written before the crash; every one of {signups} signups delivered after it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_then_recovering_endpoint_gets_each_event_once() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let (addr, ep) = endpoint(Some(Duration::from_secs(4))).await?;
    let redis = Redis::start()?;
    let weir = Weir::start(&(config(&tansu, &clickhouse, "hooks", addr, 20) + &redis.section()))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;

    let signups = post_events(&weir, 3_000).await?;
    let started = Instant::now();
    loop {
        let done = ep.seen.lock().unwrap().accepted.len();
        if done >= signups {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "{done} of {signups} events delivered after 60 s; log:\n{}",
                weir.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let seen = ep.seen.lock().unwrap();
        assert!(seen.refused > 0, "the endpoint failed for a while");
        assert_eq!(seen.without_key, 0, "every POST has an Idempotency-Key");
        assert_eq!(seen.accepted.len(), signups);
        let twice: Vec<_> = seen.accepted.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "accepted more than once: {twice:?}");
        assert_eq!(seen.names.keys().collect::<Vec<_>>(), ["signup_completed"]);
    }
    assert_eq!(
        clickhouse
            .count("SELECT count() FROM hooks.dead_letters")
            .await?,
        0
    );
    let metrics = weir.metrics().await?;
    let delivered = weir_tests::metric(
        &metrics,
        "weir_webhook_events_total",
        &[("webhook", "crm"), ("result", "delivered")],
    );
    assert_eq!(delivered as usize, signups);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_keeps_failing_sends_events_to_dead_letters() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let (addr, ep) = endpoint(None).await?;
    let redis = Redis::start()?;
    let weir =
        Weir::start(&(config(&tansu, &clickhouse, "dead_hooks", addr, 3) + &redis.section()))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    // A control-plane change (an upload) moves the version rows record; the webhook's
    // dead letters must record it too.
    let admin = reqwest::Client::new();
    let token = "at_test_1234567890abcdef";
    let up = admin
        .put(weir.admin_url("/admin/v1/plugins/passthrough"))
        .bearer_auth(token)
        .body(std::fs::read(weir_tests::plugin_path("passthrough"))?)
        .send()
        .await?;
    assert_eq!(up.status(), 201);
    let started = Instant::now();
    while admin
        .get(weir.admin_url("/admin/v1/status"))
        .bearer_auth(token)
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?["instances"][0]["control_version"]
        != 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "version 1 not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let signups = post_events(&weir, 300).await?;
    let started = Instant::now();
    loop {
        let dead = clickhouse
            .count("SELECT count() FROM dead_hooks.dead_letters WHERE stage = 'webhook'")
            .await
            .unwrap_or(0);
        if dead as usize >= signups {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "{dead} of {signups} dead letters after 60 s; log:\n{}",
                weir.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reason = clickhouse
        .query("SELECT any(reason), any(plugin), uniqExact(event_id) FROM dead_hooks.dead_letters")
        .await?;
    assert!(
        reason.starts_with("webhook crm answered 500 Internal Server Error: ")
            && reason.contains("after 3 attempts\tcrm\t"),
        "{reason}"
    );
    assert!(reason.ends_with(&format!("\t{signups}")), "{reason}");
    let versions = clickhouse
        .query("SELECT min(control_version), max(control_version) FROM dead_hooks.dead_letters")
        .await?;
    assert_eq!(
        versions, "1\t1",
        "webhook dead letters record the control version"
    );
    assert!(ep.seen.lock().unwrap().accepted.is_empty());
    // The events themselves are in `events` regardless.
    assert_eq!(
        clickhouse
            .count("SELECT count() FROM dead_hooks.events")
            .await?,
        300
    );
    Ok(())
}

/// A webhook whose URL carries a token, answered with a redirect to another host: weir
/// does not follow it (the redirect would carry the webhook's secret headers to that
/// host), dead-letters the events with a reason that says so, and neither the reason
/// nor weir's log holds the token; the same for a webhook whose server is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_and_webhook_urls_stay_out_of_dead_letters() -> Result<()> {
    const TOKEN: &str = "s3cr3t-t0ken-in-the-path";
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    // Where the redirect points: it must never be called.
    let (target, target_seen) = endpoint(Some(Duration::ZERO)).await?;
    let location = format!("http://{target}/hook");
    let redirector = axum::Router::new().route(
        &format!("/hook/{TOKEN}"),
        axum::routing::post(move || {
            let location = location.clone();
            async move {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, location)],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let redirecting = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, redirector).await });
    let down = weir_tests::free_port();
    let config = config(&tansu, &clickhouse, "redirects", redirecting, 2)
        .replace("/hook\"", &format!("/hook/{TOKEN}\""))
        + &format!(
            r#"[[pipeline.webhook]]
name = "down"
url = "http://127.0.0.1:{down}/hook/{TOKEN}"
events = ["signup_completed"]
max_attempts = 2
retry_backoff_ms = 100
"#
        )
        + &redis.section();
    let weir = Weir::start(&config)?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let signups = post_events(&weir, 300).await?;
    let want = 2 * signups as u64;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM redirects.dead_letters WHERE stage = 'webhook'",
            want,
            Duration::from_secs(60),
        )
        .await?;
    let reasons = clickhouse
        .query("SELECT plugin, any(reason) FROM redirects.dead_letters WHERE stage = 'webhook' GROUP BY plugin ORDER BY plugin")
        .await?;
    assert!(!reasons.contains(TOKEN), "{reasons}");
    let lines: Vec<&str> = reasons.lines().collect();
    assert_eq!(lines.len(), 2, "{reasons}");
    assert!(
        lines[0].starts_with(
            "crm\twebhook crm answered 307 Temporary Redirect: weir does not follow redirects"
        ),
        "{reasons}"
    );
    assert!(lines[1].starts_with("down\twebhook down: "), "{reasons}");
    assert!(
        !weir.log().contains(TOKEN),
        "the log holds the webhook's token"
    );
    assert!(target_seen.seen.lock().unwrap().accepted.is_empty());
    assert_eq!(target_seen.seen.lock().unwrap().refused, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_sink_forwards_each_event_of_its_names_once() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let config = format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "fwd"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "fwd"
[processor]
flush_max_events = 500
flush_interval_ms = 100
[[pipeline.topic]]
name = "signups"
topic = "weir.signups"
events = ["signup_completed"]
"#,
        tansu.bootstrap(),
        clickhouse.url(),
    );
    let redis = Redis::start()?;
    let weir = Weir::start(&(config + &redis.section()))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let signups = post_events(&weir, 1_000).await?;
    let started = Instant::now();
    while clickhouse
        .count("SELECT count() FROM fwd.events")
        .await
        .unwrap_or(0)
        < 1_000
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("events not written; log:\n{}", weir.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = weir_tests::read_topic(&tansu.bootstrap(), "weir.signups").await?;
    let mut seen = BTreeMap::new();
    for (key, payload) in &records {
        let event: Value = serde_json::from_slice(payload)?;
        assert_eq!(event["app"], "fwd");
        assert_eq!(event["name"], "signup_completed");
        assert_eq!(
            event["user_id"].as_str().unwrap_or_default().as_bytes(),
            key.as_slice(),
            "keyed by user"
        );
        *seen
            .entry(event["event_id"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), signups, "every signup forwarded");
    assert!(seen.values().all(|n| *n == 1), "none twice");
    Ok(())
}

/// A plugin forwards events to a webhook that takes no event by name: the
/// `route-engagement` plugin sends each view of someone else's profile to `notify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_forwards_events_to_a_webhook() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let (addr, ep) = endpoint(Some(Duration::ZERO)).await?;
    let config = format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "fwd"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "plugin_fwd"
[processor]
flush_max_events = 500
flush_interval_ms = 100
[[pipeline.plugin]]
name = "enrich"
path = "{}"
[[pipeline.plugin]]
name = "route"
path = "{}"
config = {{ views_table = "", views_counter = "", likes_counter = "", forward_views_to = "notify" }}
[[pipeline.webhook]]
name = "notify"
url = "http://{addr}/hook"
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        weir_tests::plugin_path("enrich").display(),
        weir_tests::plugin_path("route-engagement").display(),
    );
    let redis = Redis::start()?;
    let weir = Weir::start(&(config + &redis.section()))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let http = reqwest::Client::new();
    let mut want = BTreeMap::new();
    let batch: Vec<Value> = (0..300)
        .map(|n| {
            let id = format!("v{n:04}");
            match n % 3 {
                // A view of someone else's profile: forwarded.
                0 => {
                    want.insert(id.clone(), 1);
                    json!({"name": "profile_viewed", "event_id": id, "user_id": "u1", "properties": {"profile_id": format!("p{n}")}})
                }
                // A self view: not forwarded.
                1 => json!({"name": "profile_viewed", "event_id": id, "user_id": "p1", "properties": {"profile_id": "p1"}}),
                _ => json!({"name": "app_opened", "event_id": id}),
            }
        })
        .collect();
    let resp = http
        .post(weir.events_url())
        .bearer_auth(WRITE_KEY)
        .json(&batch)
        .send()
        .await?;
    assert_eq!(resp.status(), 202);
    let started = Instant::now();
    while ep.seen.lock().unwrap().accepted.len() < want.len() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("forwards missing; log:\n{}", weir.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ep.seen.lock().unwrap().accepted, want);
    Ok(())
}

/// A webhook that answers slowly (1.5 s a request of 10 events) with room for 20
/// events in its queue: the processor must not wait for room inside its write (it
/// would stop polling Kafka, and under `max.poll.interval.ms` = 6 s the instance would
/// leave its group while it still held the batch). It takes no new batch while the
/// webhook is full, polls meanwhile, and every signup is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_keeps_the_instance_in_its_group() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let (addr, ep) = endpoint(Some(Duration::ZERO)).await?;
    ep.delay_ms.store(1500, std::sync::atomic::Ordering::SeqCst);
    let redis = Redis::start()?;
    let cfg = config(&tansu, &clickhouse, "slowhook", addr, 5)
        .replace(
            "session_timeout_ms = 6000\n",
            "session_timeout_ms = 6000\nproperties = { \"max.poll.interval.ms\" = \"6000\" }\n",
        )
        .replace("batch_size = 50\n", "batch_size = 10\nmax_pending = 20\n")
        + &redis.section();
    let weir = Weir::start(&cfg)?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let signups = post_events(&weir, 300).await?;
    let started = Instant::now();
    while ep.seen.lock().unwrap().accepted.len() < signups {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "{} of {signups} delivered; log:\n{}",
                ep.seen.lock().unwrap().accepted.len(),
                weir.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(6),
        "delivery took longer than max.poll.interval.ms ({took:?})"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = weir.metrics().await?;
    weir.assert_kept_partitions(&metrics)?;
    let once = ep.seen.lock().unwrap().accepted.values().all(|n| *n == 1);
    assert!(once, "none twice");
    clickhouse
        .assert_each_once(&[("slowhook.events", 300)])
        .await
}
