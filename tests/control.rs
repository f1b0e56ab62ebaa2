//! The control plane on real services: plugins, pipelines and schemas changed through
//! the admin API while two weir instances of one consumer group process continuous
//! load, with the Redis store.
//!
//! Shown: every accepted event lands exactly once (in `events` or `dead_letters`);
//! each row names the control-plane version and plugin versions that processed it;
//! per partition the versions only move forward (one switch point per change); both
//! instances report a change in `GET /admin/v1/status` within 1 s; bad uploads are
//! refused with their reason and change nothing; an instance started after the changes
//! and instances that missed a change notice converge.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};
use weir_tests::{ClickHouse, READ_KEY, Redis, Tansu, WRITE_KEY, Weir, plugin_path};

const ADMIN_TOKEN: &str = "at_test_1234567890abcdef";

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis, db: &str, topic: &str) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "seed"
write_keys = ["{WRITE_KEY}"]
[admin]
listen = "{{admin}}"
tokens = ["{ADMIN_TOKEN}"]
max_plugin_bytes = 2097152
[control]
store = "redis"
reconcile_ms = 1000
heartbeat_ms = 500
[kafka]
brokers = "{}"
topic = "{topic}"
partitions = 4
group = "{topic}-group"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "{db}"
[redis]
url = "{}"
key_prefix = "{db}"
[processor]
flush_max_events = 2000
flush_interval_ms = 100
retry_backoff_ms = 200
[pipeline]
name = "engagement"
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        redis.url(),
    )
}

/// The admin API of one instance.
struct AdminApi {
    http: reqwest::Client,
    base: String,
}

impl AdminApi {
    fn of(weir: &Weir) -> Self {
        Self {
            // A fresh connection per request: the server closes one whose body it
            // refused unread (413), and a pooled client could write the next request
            // into it.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("HTTP client"),
            base: weir.admin_url(""),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(StatusCode, Value)> {
        let resp = req.bearer_auth(ADMIN_TOKEN).send().await?;
        let status = resp.status();
        let body = resp.text().await?;
        let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        Ok((status, value))
    }

    async fn push(&self, name: &str, bytes: Vec<u8>, allow: &str) -> Result<(StatusCode, Value)> {
        let url = format!("{}/admin/v1/plugins/{name}?allow={allow}", self.base);
        self.send(self.http.put(url).body(bytes)).await
    }

    async fn put(&self, path: &str, body: &Value) -> Result<(StatusCode, Value)> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.put(url).json(body)).await
    }

    async fn post(&self, path: &str) -> Result<(StatusCode, Value)> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(url)).await
    }

    async fn status(&self) -> Result<Value> {
        let (code, v) = self
            .send(self.http.get(format!("{}/admin/v1/status", self.base)))
            .await?;
        ensure!(code == StatusCode::OK, "status: {code} {v}");
        Ok(v)
    }

    /// Waits until `n` instances report control version `version` (at least) running
    /// `plugins`; returns how long that took.
    async fn wait_converged(
        &self,
        n: usize,
        version: u64,
        plugins: &[&str],
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let status = self.status().await?;
            let instances = status["instances"].as_array().cloned().unwrap_or_default();
            let ok = instances
                .iter()
                .filter(|i| {
                    i["control_version"].as_u64().unwrap_or(0) >= version
                        && i["plugins"] == json!(plugins)
                })
                .count();
            if ok >= n {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{n} instances did not reach control version {version} with {plugins:?} within {timeout:?}: {status:#}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn expect_created(what: &str, (code, body): (StatusCode, Value)) -> Result<Value> {
    ensure!(
        code == StatusCode::CREATED,
        "{what}: expected 201, got {code}: {body}"
    );
    Ok(body)
}

fn expect_refused(
    what: &str,
    (code, body): (StatusCode, Value),
    want: StatusCode,
    reason: &str,
) -> Result<()> {
    let message = body["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        code == want && message.contains(reason),
        "{what}: expected {want} naming {reason:?}, got {code}: {body}"
    );
    Ok(())
}

/// Posts events to the instances in turn until `stop`, each event with its own id; 1
/// in 20 views lacks a `profile_id`. Returns the ids accepted (202).
async fn load(targets: Vec<String>, stop: Arc<AtomicBool>) -> Result<Vec<String>> {
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut batch = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..8 {
            n += 1;
            let id = format!("ev-{n}");
            let event = if n.is_multiple_of(5) {
                json!({"event_id": id, "name": "post_liked", "user_id": format!("u{}", n % 31), "properties": {"post_id": format!("p{}", n % 7)}})
            } else if n % 20 == 1 {
                json!({"event_id": id, "name": "profile_viewed", "user_id": format!("u{}", n % 31), "properties": {"source": "feed"}})
            } else {
                json!({"event_id": id, "name": "profile_viewed", "user_id": format!("u{}", n % 31), "properties": {"profile_id": format!("u{}", n % 17)}})
            };
            batch.push(event);
            ids.push(id);
        }
        let url = &targets[(n / 8) as usize % targets.len()];
        let resp = http
            .post(url)
            .bearer_auth(WRITE_KEY)
            .json(&batch)
            .send()
            .await
            .context("POST /v1/events")?;
        ensure!(
            resp.status() == StatusCode::ACCEPTED,
            "POST got {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
        accepted.extend(ids);
    }
    Ok(accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_and_rollback_under_load_on_two_instances() -> Result<()> {
    let tansu = Tansu::start()?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let db = "control_swap";
    clickhouse
        .query(&format!("DROP DATABASE IF EXISTS {db}"))
        .await?;
    let cfg = config(&tansu, &clickhouse, &redis, db, "control-swap");
    let mut a = Weir::start(&cfg)?;
    let mut b = Weir::start(&cfg)?;
    let api = AdminApi::of(&a);
    let api_b = AdminApi::of(&b);
    api.wait_converged(2, 0, &[], Duration::from_secs(20))
        .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(vec![a.events_url(), b.events_url()], stop.clone()));
    // Rows processed by the configuration file's pipeline (no plugins) first.
    clickhouse
        .wait_for_count(
            &format!("SELECT count() FROM {db}.events"),
            200,
            Duration::from_secs(30),
        )
        .await?;

    // v1: the pass-through plugin, uploaded as `stamp`.
    let passthrough = std::fs::read(plugin_path("passthrough"))?;
    let enrich = std::fs::read(plugin_path("enrich"))?;
    let v1 = expect_created(
        "push stamp v1",
        api.push("stamp", passthrough.clone(), "").await?,
    )?;
    assert_eq!(v1["version"], 1);
    // The same bytes again: the same version, nothing changes.
    let (code, again) = api.push("stamp", passthrough.clone(), "").await?;
    assert_eq!((code, &again["version"]), (StatusCode::OK, &json!(1)));
    expect_created(
        "pipeline v1",
        api.put(
            "/admin/v1/pipelines/engagement",
            &json!({"plugins": [{"plugin": "stamp@1"}]}),
        )
        .await?,
    )?;
    let c1 = api.status().await?["control_version"].as_u64().unwrap();
    let took = api
        .wait_converged(2, c1, &["stamp@1"], Duration::from_secs(20))
        .await?;
    println!("v1 running on both instances {took:?} after the change");
    for w in [&a, &b] {
        for line in w
            .log()
            .lines()
            .filter(|l| l.contains("prepared") || l.contains("swapped"))
        {
            println!("{line}");
        }
    }
    ensure!(
        took <= Duration::from_secs(1),
        "both instances took {took:?} to report v1"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // v2: a different component under the same name; switched to through the other
    // instance's admin API.
    let v2 = expect_created(
        "push stamp v2",
        api_b.push("stamp", enrich.clone(), "").await?,
    )?;
    assert_eq!(v2["version"], 2);
    expect_created(
        "pipeline v2",
        api_b
            .put(
                "/admin/v1/pipelines/engagement",
                &json!({"plugins": [{"plugin": "stamp@2", "config": {"require_user": []}}]}),
            )
            .await?,
    )?;
    let c2 = api.status().await?["control_version"].as_u64().unwrap();
    let took = api
        .wait_converged(2, c2, &["stamp@2"], Duration::from_secs(20))
        .await?;
    println!("v2 running on both instances {took:?} after the change");
    ensure!(
        took <= Duration::from_secs(1),
        "both instances took {took:?} to report v2"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Bad uploads while v2 runs: each refused with its reason, nothing changes.
    let before = api.status().await?;
    expect_refused(
        "garbage",
        api.push("bad", b"hello, not wasm".to_vec(), "").await?,
        StatusCode::BAD_REQUEST,
        "not WebAssembly",
    )?;
    expect_refused(
        "core module",
        api.push("bad", b"\0asm\x01\0\0\0".to_vec(), "").await?,
        StatusCode::BAD_REQUEST,
        "core WebAssembly module",
    )?;
    let other = std::fs::read(plugin_path("other-world"))?;
    expect_refused(
        "other world",
        api.push("bad", other, "").await?,
        StatusCode::BAD_REQUEST,
        "not a component of the weir:plugin world",
    )?;
    let fs = std::fs::read(plugin_path("fs-reader"))?;
    expect_refused(
        "filesystem import",
        api.push("bad", fs.clone(), "").await?,
        StatusCode::BAD_REQUEST,
        "imports wasi:filesystem",
    )?;
    expect_refused(
        "oversize",
        api.push("bad", vec![0u8; 3 << 20], "").await?,
        StatusCode::PAYLOAD_TOO_LARGE,
        "larger than the limit of 2097152 bytes",
    )?;
    expect_refused(
        "bad name",
        api.push("no%20spaces", passthrough.clone(), "").await?,
        StatusCode::BAD_REQUEST,
        "must be 1-64 of",
    )?;
    expect_refused(
        "invalid schema",
        api.put(
            "/admin/v1/schemas/profile_viewed",
            &json!({"type": "strin"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "not a valid JSON Schema",
    )?;
    expect_refused(
        "missing plugin version",
        api.put(
            "/admin/v1/pipelines/engagement",
            &json!({"plugins": [{"plugin": "stamp@9"}]}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "stamp@9 does not exist (versions of stamp: 1, 2)",
    )?;
    expect_refused(
        "unknown field",
        api.put(
            "/admin/v1/pipelines/engagement",
            &json!({"plugins": [], "sink": "x"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "unknown field",
    )?;
    // serde reads a struct from an array of its fields too: `[]` was a pipeline with
    // no plugins, made active (schemathesis found it).
    expect_refused(
        "an array for a pipeline",
        api.put("/admin/v1/pipelines/engagement", &json!([]))
            .await?,
        StatusCode::BAD_REQUEST,
        "a JSON object is expected",
    )?;
    let forbidden = reqwest::Client::new()
        .get(a.admin_url("/admin/v1/status"))
        .bearer_auth(WRITE_KEY)
        .send()
        .await?;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let after = api.status().await?;
    assert_eq!(
        before["control_version"], after["control_version"],
        "a refused upload changed the control plane"
    );
    let (_, plugins) = api
        .send(api.http.get(format!("{}/admin/v1/plugins", api.base)))
        .await?;
    assert!(
        plugins["plugins"]
            .get("bad")
            .is_none_or(|v| v.as_array().is_some_and(|a| a.is_empty())),
        "{plugins}"
    );
    // The filesystem import is accepted when the uploader allows it as a stub.
    let allowed = expect_created(
        "fs allowed",
        api.push("fs-reader", fs, "wasi:filesystem").await?,
    )?;
    assert_eq!(allowed["stubbed_imports"], json!(["wasi:filesystem"]));
    let c_fs = api.status().await?["control_version"].as_u64().unwrap();
    api.wait_converged(2, c_fs, &["stamp@2"], Duration::from_secs(5))
        .await?;

    // Roll back to v1.
    let (code, rb) = api.post("/admin/v1/pipelines/engagement/rollback").await?;
    ensure!(
        code == StatusCode::OK && rb["version"] == 1,
        "rollback: {code} {rb}"
    );
    let c3 = api.status().await?["control_version"].as_u64().unwrap();
    let took = api
        .wait_converged(2, c3, &["stamp@1"], Duration::from_secs(20))
        .await?;
    println!("rollback running on both instances {took:?} after the change");
    ensure!(
        took <= Duration::from_secs(1),
        "both instances took {took:?} to report the rollback"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A schema for profile_viewed: views without a profile_id become dead letters.
    let schema = json!({"type": "object", "required": ["properties"], "properties": {"properties": {"type": "object", "required": ["profile_id"]}}});
    expect_created(
        "schema",
        api.put("/admin/v1/schemas/profile_viewed", &schema).await?,
    )?;
    let c4 = api.status().await?["control_version"].as_u64().unwrap();
    let took = api
        .wait_converged(2, c4, &["stamp@1"], Duration::from_secs(20))
        .await?;
    ensure!(
        took <= Duration::from_secs(1),
        "both instances took {took:?} to report the schema"
    );
    let status = api.status().await?;
    for i in status["instances"].as_array().unwrap() {
        assert_eq!(i["schemas"], json!(["profile_viewed@1"]), "{status:#}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    stop.store(true, Ordering::Relaxed);
    let accepted = load.await??;
    println!("{} events accepted during the changes", accepted.len());

    // Every accepted event exactly once, in events or dead letters.
    let total = accepted.len() as u64;
    let landed = format!(
        "SELECT count() FROM (SELECT event_id FROM {db}.events UNION ALL SELECT event_id FROM {db}.dead_letters)"
    );
    clickhouse
        .wait_for_count(&landed, total, Duration::from_secs(60))
        .await?;
    let ids = clickhouse
        .query(&format!(
            "SELECT event_id FROM {db}.events UNION ALL SELECT event_id FROM {db}.dead_letters"
        ))
        .await?;
    let ids: Vec<&str> = ids.lines().collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "an event landed twice");
    let want: HashSet<&str> = accepted.iter().map(String::as_str).collect();
    assert_eq!(unique, want, "landed events differ from accepted ones");

    // Each row names its versions; per partition, versions only move forward.
    let rows = clickhouse
        .query(&format!(
            "SELECT kafka_partition, kafka_offset, kafka_index, control_version, plugins, \
             position(properties, 'enriched_by') > 0 FROM {db}.events \
             ORDER BY kafka_partition, kafka_offset, kafka_index"
        ))
        .await?;
    let expected_plugins = |v: u64| -> &str {
        if v < c1 {
            ""
        } else if v < c2 {
            "stamp@1"
        } else if v < c3 {
            "stamp@2"
        } else {
            "stamp@1"
        }
    };
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut by_plugins: BTreeMap<String, u64> = BTreeMap::new();
    for line in rows.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (partition, version, plugins, enriched) = (
            f[0].parse::<u32>()?,
            f[3].parse::<u64>()?,
            f[4],
            f[5] == "1",
        );
        let prev = last.insert(partition, version).unwrap_or(0);
        ensure!(
            version >= prev,
            "partition {partition}: control version went back from {prev} to {version} at offset {}",
            f[1]
        );
        ensure!(
            plugins == expected_plugins(version),
            "row at control version {version} ran {plugins:?}, expected {:?}",
            expected_plugins(version)
        );
        ensure!(
            enriched == (plugins == "stamp@2"),
            "row {line}: enriched only by stamp@2"
        );
        *by_plugins.entry(plugins.to_owned()).or_default() += 1;
    }
    println!("rows by plugin versions: {by_plugins:?}");
    for p in ["", "stamp@1", "stamp@2"] {
        ensure!(
            by_plugins.get(p).is_some_and(|n| *n > 0),
            "no row processed by {p:?}: {by_plugins:?}"
        );
    }
    // Views without a profile_id: rejected by stamp@2 (enrich), by the schema after c4.
    let dead = clickhouse
        .query(&format!("SELECT stage, plugin, plugin_version, min(control_version), max(control_version) FROM {db}.dead_letters GROUP BY stage, plugin, plugin_version ORDER BY stage"))
        .await?;
    println!("dead letters: {dead}");
    for line in dead.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f[0] {
            "plugin" => ensure!(
                f[1] == "stamp"
                    && f[2] == "2"
                    && f[3].parse::<u64>()? >= c2
                    && f[4].parse::<u64>()? < c3,
                "{line}"
            ),
            "schema" => ensure!(f[3].parse::<u64>()? >= c4, "{line}"),
            other => bail!("unexpected dead letter stage {other}: {line}"),
        }
    }

    // An instance started after the changes runs the current version at once.
    let mut c = Weir::start(&cfg)?;
    api.wait_converged(3, c4, &["stamp@1"], Duration::from_secs(10))
        .await?;

    // A change whose notice is lost (written to the store without the announcement):
    // every instance converges by reconciliation.
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let state_key = format!("{db}:control:state");
    let text: String = redis::cmd("GET")
        .arg(&state_key)
        .query_async(&mut conn)
        .await?;
    let mut state: Value = serde_json::from_str(&text)?;
    let c5 = state["version"].as_u64().unwrap() + 1;
    state["version"] = json!(c5);
    state["pipelines"]["engagement"]["active"] = json!(2);
    state["pipelines"]["engagement"]["history"]
        .as_array_mut()
        .unwrap()
        .push(json!(2));
    let _: () = redis::cmd("SET")
        .arg(&state_key)
        .arg(state.to_string())
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SET")
        .arg(format!("{db}:control:version"))
        .arg(c5)
        .query_async(&mut conn)
        .await?;
    let took = api
        .wait_converged(3, c5, &["stamp@2"], Duration::from_secs(5))
        .await?;
    println!("a change without notice reached all instances in {took:?}");

    // Redis restarted: instances resubscribe and still follow changes.
    drop(conn);
    let mut redis = redis;
    redis.restart()?;
    let (code, rb) = api.post("/admin/v1/pipelines/engagement/rollback").await?;
    ensure!(
        code == StatusCode::OK && rb["version"] == 1,
        "rollback after restart: {code} {rb}"
    );
    let c6 = api.status().await?["control_version"].as_u64().unwrap();
    api.wait_converged(3, c6, &["stamp@1"], Duration::from_secs(5))
        .await?;

    let metrics = reqwest::get(a.admin_url("/metrics")).await?.text().await?;
    assert!(
        metrics.contains(&format!("weir_control_version {c6}")),
        "admin /metrics"
    );
    for w in [&mut a, &mut b, &mut c] {
        assert!(w.stop(), "weir did not stop cleanly:\n{}", w.log());
    }
    Ok(())
}

/// Waits until profile `bob` has `want` rows in the routed `profile_viewed` table and
/// `want` views through the counters API.
async fn wait_for_views(
    clickhouse: &ClickHouse,
    db: &str,
    counter_url: &str,
    want: u64,
) -> Result<()> {
    clickhouse
        .wait_for_count(
            &format!("SELECT count() FROM {db}.profile_viewed WHERE profile_id = 'bob'"),
            want,
            Duration::from_secs(30),
        )
        .await?;
    let start = Instant::now();
    loop {
        let r = reqwest::Client::new()
            .get(counter_url)
            .bearer_auth(READ_KEY)
            .send()
            .await?;
        let code = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if code == StatusCode::OK && body["value"] == want {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "counter: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nice value of the thread named `name` of process `pid`, if it has one now
/// (`/proc/PID/task/TID/stat`, field 19).
fn thread_nice(pid: u32, name: &str) -> Option<i64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // After the command's closing parenthesis: field 3 onwards.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        return fields.get(19 - 3)?.parse().ok();
    }
    None
}

/// Runs the `weir` CLI against an instance's admin API; returns stdout, or the error
/// with stderr.
fn cli(weir: &Weir, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(weir_tests::weir_binary()?)
        .args(args)
        .env("WEIR_ADMIN_URL", weir.admin_url(""))
        .env("WEIR_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "weir {args:?} failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_directory_store_with_the_cli() -> Result<()> {
    let tansu = Tansu::start()?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let db = "control_dir";
    clickhouse
        .query(&format!("DROP DATABASE IF EXISTS {db}"))
        .await?;
    // No [control]: the directory store beside the configuration file. No table or
    // counter in the file: a pipeline version brings them.
    let cfg = format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "seed"
write_keys = ["{WRITE_KEY}"]
read_keys = ["{READ_KEY}"]
[admin]
listen = "{{admin}}"
tokens = ["{ADMIN_TOKEN}"]
[redis]
url = "{}"
key_prefix = "{db}"
[kafka]
brokers = "{}"
topic = "control-dir"
group = "control-dir-group"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "{db}"
[processor]
flush_interval_ms = 100
[pipeline]
name = "engagement"
"#,
        redis.url(),
        tansu.bootstrap(),
        clickhouse.url(),
    );
    let mut weir = Weir::start(&cfg)?;
    let api = AdminApi::of(&weir);
    api.wait_converged(1, 0, &[], Duration::from_secs(20))
        .await?;

    let apply = weir.dir().join("control.toml");
    std::fs::write(
        &apply,
        format!(
            r#"
[[plugin]]
name = "enrich"
path = "{}"
[pipeline.engagement]
[[pipeline.engagement.plugins]]
plugin = "enrich"
config = {{ require_user = ["profile_viewed"] }}
"#,
            plugin_path("enrich").display()
        ),
    )?;
    let apply = apply.to_str().unwrap();
    let out = cli(&weir, &["apply", "-f", apply])?;
    assert!(out.contains("plugin enrich@1: uploaded"), "{out}");
    assert!(
        out.contains("pipeline engagement@1: created and active"),
        "{out}"
    );
    let version = api.status().await?["control_version"].as_u64().unwrap();
    api.wait_converged(1, version, &["enrich@1"], Duration::from_secs(5))
        .await?;
    // Idempotent: nothing changes the second time.
    let out = cli(&weir, &["apply", "-f", apply])?;
    assert!(
        out.contains("plugin enrich@1: unchanged")
            && out.contains("pipeline engagement@1: unchanged"),
        "{out}"
    );
    assert_eq!(api.status().await?["control_version"], json!(version));
    let out = cli(&weir, &["status"])?;
    assert!(
        out.contains("1 live instance(s)") && out.contains("plugins [enrich@1]"),
        "{out}"
    );
    assert!(weir.dir().join("weir-control/state.json").exists());

    // Events are processed by the uploaded version.
    let events = json!([
        {"name": "profile_viewed", "user_id": "ann", "properties": {"profile_id": "bob"}},
        {"name": "app_opened", "user_id": "ann"}
    ]);
    weir.post(&events).await?;
    let no_user = json!({"event_id": "nouser-1", "name": "profile_viewed", "properties": {"profile_id": "zed"}});
    weir.post(&no_user).await?;
    clickhouse
        .wait_for_count(
            &format!("SELECT count() FROM {db}.dead_letters WHERE event_id = 'nouser-1'"),
            1,
            Duration::from_secs(30),
        )
        .await?;
    clickhouse
        .wait_for_count(
            &format!("SELECT count() FROM {db}.events WHERE plugins = 'enrich@1'"),
            2,
            Duration::from_secs(30),
        )
        .await?;

    // The dry run: outcomes, nothing written.
    let (code, run) = api
        .send(api.http.post(format!("{}/admin/v1/plugins/enrich/test", api.base)).json(&json!({
            "events": [{"name": "profile_viewed", "user_id": "ann", "properties": {"profile_id": "ann"}},
                       {"name": "profile_viewed", "properties": {"profile_id": "bob"}}]
        })))
        .await?;
    assert_eq!(code, StatusCode::OK, "{run}");
    assert_eq!(run["outcomes"][0]["outcome"], "keep", "{run}");
    assert_eq!(
        run["outcomes"][0]["event"]["properties"]["self_view"], true,
        "{run}"
    );
    assert_eq!(run["outcomes"][1]["outcome"], "reject", "{run}");
    assert_eq!(run["summary"]["rejected"], 1, "{run}");
    // One dry run at a time per instance (each compiles the component): the others
    // sent meanwhile get 503 busy with Retry-After, and the next one runs.
    let dry = || {
        api.http
            .post(format!("{}/admin/v1/plugins/enrich/test", api.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"events": [{"name": "profile_viewed", "properties": {"profile_id": "ann"}}]}))
            .send()
    };
    let answers = futures::future::join_all((0..3).map(|_| dry())).await;
    let mut codes: Vec<u16> = Vec::new();
    for a in answers {
        let a = a?;
        if a.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(a.headers()["retry-after"], "1");
            let body: Value = a.json().await?;
            assert_eq!(body["error"]["code"], "busy", "{body}");
            codes.push(503);
        } else {
            codes.push(a.status().as_u16());
        }
    }
    codes.sort_unstable();
    assert_eq!(codes[0], 200, "{codes:?}");
    assert_eq!(codes[2], 503, "{codes:?}");
    assert_eq!(dry().await?.status(), StatusCode::OK);

    // Nothing to roll back to yet: a clear refusal.
    let err = cli(&weir, &["pipeline", "rollback", "engagement"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no earlier version to roll back to"), "{err}");
    // A bad plugin file through the CLI: refused, named.
    let garbage = weir.dir().join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm")?;
    let err = cli(&weir, &["plugin", "push", garbage.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("400") && err.contains("not WebAssembly"),
        "{err}"
    );

    // A chain that cannot start (a memory cap below the plugin's initial memory) is
    // refused at once.
    let bad = json!({"plugins": [{"plugin": "enrich@1", "memory_mib": 1}]});
    expect_refused(
        "plugin that cannot start",
        api.put("/admin/v1/pipelines/engagement", &bad).await?,
        StatusCode::BAD_REQUEST,
        "enrich@1 cannot start with these settings",
    )?;
    // A limit out of range: refused before anything is stored (a quarantine of 2^63 s
    // once panicked every instance's worker at its first quarantine).
    let bad = json!({"plugins": [{"plugin": "enrich@1", "quarantine_secs": i64::MAX}]});
    expect_refused(
        "quarantine past a day",
        api.put("/admin/v1/pipelines/engagement", &bad).await?,
        StatusCode::BAD_REQUEST,
        "quarantine_secs must be 1-86400",
    )?;
    // A version the instance cannot prepare (its table exists in ClickHouse with other
    // column types): it keeps running the previous one and says why in its status.
    clickhouse
        .query(&format!(
            "CREATE TABLE {db}.clash (event_id String, app String, timestamp DateTime, x UInt8) \
             ENGINE = MergeTree() ORDER BY timestamp"
        ))
        .await?;
    let bad = json!({"plugins": [{"plugin": "enrich@1"}],
                     "tables": [{"name": "clash", "columns": ["x String"], "order_by": ["timestamp"]}]});
    expect_created(
        "unpreparable pipeline",
        api.put("/admin/v1/pipelines/engagement", &bad).await?,
    )?;
    let start = Instant::now();
    let status = loop {
        let s = api.status().await?;
        if s["instances"][0]["error"].is_string() {
            break s;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "no error reported: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let instance = &status["instances"][0];
    let error = instance["error"].as_str().unwrap();
    assert!(
        error.contains("cannot prepare pipeline engagement")
            && error.contains("clash")
            && error.contains("still running the previous version"),
        "{error}"
    );
    assert_eq!(instance["pipeline_version"], 1, "{status:#}");
    assert_eq!(instance["control_version"], json!(version), "{status:#}");
    let out = cli(&weir, &["status"])?;
    assert!(out.contains("ERROR: control-plane version"), "{out}");
    weir.post(&events).await?;
    clickhouse
        .wait_for_count(
            &format!("SELECT count() FROM {db}.events WHERE plugins = 'enrich@1'"),
            4,
            Duration::from_secs(30),
        )
        .await?;
    // Rolled back, the instance is healthy again.
    let out = cli(&weir, &["pipeline", "rollback", "engagement"])?;
    assert!(out.contains("version 1 active"), "{out}");
    let version = api.status().await?["control_version"].as_u64().unwrap();
    api.wait_converged(1, version, &["enrich@1"], Duration::from_secs(5))
        .await?;
    assert!(api.status().await?["instances"][0]["error"].is_null());

    // A version that brings its own table and counter: weir creates the table before
    // the swap, and the counters API serves the new counter.
    let route = std::fs::read(plugin_path("route-engagement"))?;
    expect_created("push route", api.push("route", route, "").await?)?;
    let doc = json!({
        "plugins": [
            {"plugin": "enrich@1", "config": {"require_user": []}},
            {"plugin": "route@1", "config": {"views_table": "profile_viewed", "views_counter": "profile_views"}}
        ],
        "tables": [{"name": "profile_viewed", "order_by": ["profile_id", "timestamp"],
                    "columns": ["profile_id String", "viewer_id Nullable(String)", "self_view Bool", "source Nullable(String)"]}],
        "counters": [{"name": "profile_views", "by_day": true}]
    });
    let bad = json!({"plugins": [], "tables": [{"name": "t", "columns": ["x Strin"], "order_by": ["x"]}]});
    expect_refused(
        "bad table",
        api.put("/admin/v1/pipelines/engagement", &bad).await?,
        StatusCode::BAD_REQUEST,
        "Strin",
    )?;
    let counter_url = weir.counter_url("profile_views", "bob");
    let before = reqwest::Client::new()
        .get(&counter_url)
        .bearer_auth(READ_KEY)
        .send()
        .await?;
    assert_eq!(
        before.status(),
        StatusCode::NOT_FOUND,
        "no counter before the swap"
    );
    expect_created(
        "pipeline with sinks",
        api.put("/admin/v1/pipelines/engagement", &doc).await?,
    )?;
    let version = api.status().await?["control_version"].as_u64().unwrap();
    api.wait_converged(
        1,
        version,
        &["enrich@1", "route@1"],
        Duration::from_secs(10),
    )
    .await?;
    let views = json!([
        {"name": "profile_viewed", "user_id": "ann", "properties": {"profile_id": "bob"}},
        {"name": "profile_viewed", "user_id": "cid", "properties": {"profile_id": "bob"}}
    ]);
    weir.post(&views).await?;
    wait_for_views(&clickhouse, db, &counter_url, 2).await?;

    // Restarted, the instance runs the stored pipeline (and its table and counter)
    // from the start.
    weir.restart()?;
    api.wait_converged(
        1,
        version,
        &["enrich@1", "route@1"],
        Duration::from_secs(10),
    )
    .await?;
    weir.post(&views).await?;
    wait_for_views(&clickhouse, db, &counter_url, 4).await?;

    // The view without a user that enrich@1 rejected: listed, replayed through the
    // version in force (which no longer requires a user), and not twice.
    let listed = cli(&weir, &["dead-letters", "list", "--stage", "plugin"])?;
    assert!(
        listed.contains("nouser-1") && listed.contains("profile_viewed requires a user_id"),
        "{listed}"
    );
    let out = cli(&weir, &["dead-letters", "replay", "--stage", "plugin"])?;
    assert!(out.contains("replayed 1 events"), "{out}");
    clickhouse
        .wait_for_count(
            &format!("SELECT count() FROM {db}.events WHERE event_id = 'nouser-1'"),
            1,
            Duration::from_secs(30),
        )
        .await?;
    let out = cli(&weir, &["dead-letters", "replay", "--stage", "plugin"])?;
    assert!(
        out.contains("replayed 0 events") && out.contains("in events already"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = clickhouse
        .count(&format!(
            "SELECT count() FROM {db}.events WHERE event_id = 'nouser-1'"
        ))
        .await?;
    assert_eq!(n, 1, "the replayed event landed twice");
    // A dry run runs on a thread of its own at a lower priority (not on the runtime
    // ingest and the processor share): seen in /proc while a plugin that loops
    // forever is stopped at its deadline, event after event.
    let (code, _) = api
        .push("hostile", std::fs::read(plugin_path("hostile"))?, "")
        .await?;
    assert_eq!(code, StatusCode::CREATED);
    let looping: Vec<Value> = (0..8).map(|_| json!({"name": "loop"})).collect();
    let run = api.send(
        api.http
            .post(format!("{}/admin/v1/plugins/hostile/test", api.base))
            .json(&json!({"events": looping, "batch_size": 1, "deadline_ms": 250})),
    );
    let pid = weir.pid().context("weir runs")?;
    let watch = async {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(nice) = thread_nice(pid, "weir-dry-run") {
                return Some(nice);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    };
    let ((code, run), nice) = tokio::join!(async { run.await.expect("dry run") }, watch);
    assert_eq!(code, StatusCode::OK, "{run}");
    assert_eq!(run["summary"]["failed"], 8, "{run}");
    assert_eq!(run["outcomes"][7]["kind"], "deadline", "{run}");
    assert_eq!(nice, Some(10), "the dry run's thread and its nice value");

    assert!(weir.stop(), "weir did not stop cleanly:\n{}", weir.log());
    Ok(())
}
