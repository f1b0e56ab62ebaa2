//! `weir-load`: drives a running weir with realistic engagement events and measures it.
//!
//! - Ingest latency of every request, in an HDR histogram. At a fixed rate (`--rate`),
//!   requests have intended send times and latency is measured from them, so a stall
//!   shows as the latency of every request it delayed (no coordinated omission). At
//!   `--max`, each client sends back to back.
//! - End-to-end freshness: probe events with known ids, sent every 200 ms during the
//!   run; a poller records when each is visible in ClickHouse's `events` table, and
//!   (with `--read-key`) when its view counter is visible through the counters API.
//! - Sustained end-to-end throughput: accepted events divided by the time from the
//!   first request until the last of them is in ClickHouse (`events` + `dead_letters`).
//! - weir's CPU (cores used) and peak RSS, sampled from `/proc/<pid>` (`--pid`).
//! - With `--verify`: weir's own metrics before and after the run must agree with what
//!   the harness saw (requests by status, events accepted, rows written).
//!
//! It prints a table and, with `--json FILE`, writes the figures as JSON.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Parser, Debug, Clone)]
#[command(name = "weir-load", version, about, args_override_self = true)]
struct Args {
    /// weir's ingest base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Write key of the app to post as.
    #[arg(long, default_value = "wk_dev_0000000000000000")]
    write_key: String,
    /// Read key of the same app: also measures POST -> counter visible.
    #[arg(long)]
    read_key: Option<String>,
    /// Counter the probes' views land in (the route plugin's `profile_views`).
    #[arg(long, default_value = "profile_views")]
    counter: String,
    /// ClickHouse HTTP URL: measures freshness and end-to-end throughput. Without it,
    /// only ingest is measured.
    #[arg(long)]
    clickhouse: Option<String>,
    /// ClickHouse database weir writes to.
    #[arg(long, default_value = "weir")]
    database: String,
    /// Events per second in all (fixed rate). Conflicts with --max.
    #[arg(long, conflicts_with = "max")]
    rate: Option<u64>,
    /// Send as fast as the clients can.
    #[arg(long)]
    max: bool,
    /// Concurrent clients (connections). Each has one request in flight, so they cap
    /// the rate at clients x batch / latency (8 clients at 16 ms: 50,000 events/s):
    /// keep them well above what the rate needs.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Events per request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Distinct users in the generated events.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// How long to wait for ClickHouse to catch up after sending, in seconds.
    #[arg(long, default_value_t = 120.0)]
    drain_timeout: f64,
    /// weir's process id, for CPU and RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// Write the figures here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Check weir's /metrics against what the harness saw; exit 1 on a mismatch.
    #[arg(long)]
    verify: bool,
    /// A name for the run, printed and written to the JSON.
    #[arg(long, default_value = "load")]
    scenario: String,
    /// weir's admin API, for --swap-every.
    #[arg(long)]
    admin_url: Option<String>,
    /// Admin token for --admin-url.
    #[arg(long, default_value = "at_dev_0000000000000000")]
    admin_token: String,
    /// Hot-swap the pipeline every this many seconds while sending (needs
    /// --admin-url): the active version of --pipeline is put again with its first
    /// plugin's deadline_ms moved by 1 ms, a new pipeline version that every instance
    /// must prepare and swap in. Latency and freshness are then reported before, during
    /// (2 s from each swap) and after the swaps.
    #[arg(long, requires = "admin_url")]
    swap_every: Option<f64>,
    /// The pipeline --swap-every changes.
    #[arg(long, default_value = "engagement")]
    pipeline: String,
    /// The app of --write-key: ClickHouse rows are then counted for this app only, so
    /// that two harnesses posting as two apps (the noisy-neighbour benchmark) each wait
    /// for their own rows.
    #[arg(long)]
    app: Option<String>,
    /// How often a freshness probe is sent, in milliseconds; 0 sends none.
    #[arg(long, default_value_t = 200)]
    probe_every_ms: u64,
    /// The API the load is sent to: weir's `POST /v1/events` (`events`), or Segment's
    /// `POST /v1/batch` with Basic auth (`segment`: the same events as track messages,
    /// as Segment's SDKs send them). Freshness probes always use `/v1/events`.
    #[arg(long, value_enum, default_value_t = Api::Events)]
    api: Api,
    /// Give every event an id of the client's (`event_id`; Segment's `messageId`), as
    /// tracking SDKs do, so that weir's deduplication checks each one. Without it
    /// ingest makes the ids, and deduplication has nothing to check.
    #[arg(long)]
    event_ids: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Events,
    Segment,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Events => "/v1/events",
            Api::Segment => "/v1/batch",
        }
    }

    /// The status of an accepted request.
    fn accepted(self) -> &'static str {
        match self {
            Api::Events => "202",
            Api::Segment => "200",
        }
    }
}

/// How long after a swap counts as "during" it.
const SWAP_WINDOW_S: f64 = 2.0;

/// A small fast generator (the load must not be limited by its own randomness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const SOURCES: [&str; 5] = ["search", "feed", "profile", "notification", "deeplink"];
const DEVICES: [&str; 4] = ["ios", "android", "web", "ipad"];
const LOCALES: [&str; 6] = ["en-GB", "en-US", "de-DE", "fr-FR", "es-ES", "pt-BR"];

/// Appends one realistic event's JSON to `out`: names weighted as in the seeds' traffic,
/// ~400-600 bytes. Written as text directly (no `serde_json::Value` per event): the
/// harness shares the machine's two cores with what it measures, so its own cost per
/// event must stay small. Every string is plain ASCII: nothing needs escaping.
/// One generated event: weir's JSON, or (`api` Segment) a Segment track message with
/// the same content; with `ids`, a client's event id (32 hex digits) too.
fn write_event(out: &mut String, rng: &mut Rng, users: u64, api: Api, ids: bool) {
    use std::fmt::Write;
    let roll = rng.below(100);
    let name = match roll {
        0..40 => "profile_viewed",
        40..70 => "post_liked",
        70..90 => "app_opened",
        _ => "signup_step_completed",
    };
    let (name_key, user_key, id_key) = match api {
        Api::Events => (r#"{"name":"#, "user_id", "event_id"),
        Api::Segment => (r#"{"type":"track","event":"#, "userId", "messageId"),
    };
    let _ = write!(
        out,
        r#"{name_key}"{name}","{user_key}":"user{}","#,
        rng.below(users)
    );
    if ids {
        let _ = write!(
            out,
            r#""{id_key}":"{:016x}{:016x}","#,
            rng.next(),
            rng.next()
        );
    }
    out.push_str(r#""properties":"#);
    let _ = match roll {
        0..40 => write!(
            out,
            r#"{{"profile_id":"user{}","source":"{}","position":{},"referrer":"https://app.example.com/search?q=term{}"}}"#,
            rng.below(users),
            SOURCES[rng.below(5) as usize],
            rng.below(50),
            rng.below(1000)
        ),
        40..70 => write!(
            out,
            r#"{{"post_id":"post{}","author_id":"user{}","reaction":"{}"}}"#,
            rng.below(users * 3),
            rng.below(users),
            if rng.below(4) == 0 { "love" } else { "like" }
        ),
        70..90 => write!(
            out,
            r#"{{"cold_start":{},"push_opened":{}}}"#,
            rng.below(3) == 0,
            rng.below(5) == 0
        ),
        _ => write!(
            out,
            r#"{{"step":{},"variant":"{}"}}"#,
            rng.below(6),
            if rng.below(2) == 0 { "a" } else { "b" }
        ),
    };
    let _ = write!(
        out,
        r#","context":{{"locale":"{}","app_version":"4.{}.{}","device":"{}","os_version":"{}.{}","screen":{{"w":{},"h":{}}},"session_id":"s{:016x}","ip_country":"GB"}}}}"#,
        LOCALES[rng.below(6) as usize],
        rng.below(10),
        rng.below(20),
        DEVICES[rng.below(4) as usize],
        12 + rng.below(6),
        rng.below(5),
        390 + rng.below(800),
        844 + rng.below(400),
        rng.next()
    );
}

/// What the clients saw.
struct Tally {
    latency: Mutex<Histogram<u64>>,
    /// The same latencies by second of intended send time since the start.
    by_second: Mutex<Vec<Histogram<u64>>>,
    statuses: Mutex<BTreeMap<String, u64>>,
    accepted: AtomicU64,
    requests: AtomicU64,
}

async fn client(
    id: usize,
    args: Args,
    http: reqwest::Client,
    tally: Arc<Tally>,
    next: Arc<AtomicU64>,
    start: Instant,
    end: Instant,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let url = format!("{}{}", args.url, args.api.path());
    let basic = {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode(format!("{}:", args.write_key));
        format!("Basic {key}")
    };
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.batch as f64 / r.max(1) as f64));
    let new_histogram = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut local = new_histogram();
    let mut by_second: Vec<Histogram<u64>> = Vec::new();
    loop {
        // Fixed rate: request i is due at start + i * interval, whoever sends it.
        let intended = match interval {
            Some(iv) => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let due = start + iv.mul_f64(i as f64);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            }
        };
        let mut body = String::with_capacity(args.batch * 640 + 16);
        body.push_str(match args.api {
            Api::Events => "[",
            Api::Segment => r#"{"batch":["#,
        });
        for i in 0..args.batch {
            if i > 0 {
                body.push(',');
            }
            write_event(&mut body, &mut rng, args.users, args.api, args.event_ids);
        }
        body.push_str(match args.api {
            Api::Events => "]",
            Api::Segment => "]}",
        });
        let request = http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        let request = match args.api {
            Api::Events => request.bearer_auth(&args.write_key),
            Api::Segment => request.header(reqwest::header::AUTHORIZATION, &basic),
        };
        let resp = request.body(body).send().await;
        let status = match resp {
            Ok(r) => {
                let s = r.status().as_u16();
                let _ = r.bytes().await;
                s.to_string()
            }
            Err(e) if e.is_timeout() => "timeout".into(),
            Err(_) => "connection_error".into(),
        };
        let micros = intended.elapsed().as_micros() as u64;
        let _ = local.record(micros.max(1));
        let second = (intended - start).as_secs() as usize;
        while by_second.len() <= second {
            by_second.push(new_histogram());
        }
        let _ = by_second[second].record(micros.max(1));
        if status == args.api.accepted() {
            tally
                .accepted
                .fetch_add(args.batch as u64, Ordering::Relaxed);
        }
        tally.requests.fetch_add(1, Ordering::Relaxed);
        *tally.statuses.lock().unwrap().entry(status).or_default() += 1;
    }
    let _ = tally.latency.lock().unwrap().add(local);
    let mut all = tally.by_second.lock().unwrap();
    for (i, h) in by_second.into_iter().enumerate() {
        while all.len() <= i {
            all.push(new_histogram());
        }
        let _ = all[i].add(h);
    }
}

/// Probes: sent every 200 ms; each is looked for until it is seen.
#[derive(Default)]
struct Probes {
    sent: Vec<(String, Instant)>,
    /// (sent, milliseconds until seen)
    row_ms: Vec<(Instant, f64)>,
    counter_ms: Vec<(Instant, f64)>,
    row_pending: HashMap<String, Instant>,
    counter_pending: HashMap<String, Instant>,
}

async fn probe_loop(
    args: Args,
    http: reqwest::Client,
    probes: Arc<Mutex<Probes>>,
    end: Instant,
    run: String,
) {
    if args.probe_every_ms == 0 {
        return;
    }
    let mut k = 0;
    while Instant::now() < end {
        k += 1;
        let id = format!("probe-{run}-{k}");
        let event = json!({"name": "profile_viewed", "event_id": id, "user_id": "weir-load",
                           "properties": {"profile_id": id, "source": "probe"}});
        let sent = Instant::now();
        let ok = http
            .post(format!("{}/v1/events", args.url))
            .bearer_auth(&args.write_key)
            .json(&event)
            .send()
            .await
            .is_ok_and(|r| r.status() == 202);
        if ok {
            let mut p = probes.lock().unwrap();
            p.sent.push((id.clone(), sent));
            if args.clickhouse.is_some() {
                p.row_pending.insert(id.clone(), sent);
            }
            if args.read_key.is_some() {
                p.counter_pending.insert(id, sent);
            }
        }
        tokio::time::sleep(Duration::from_millis(args.probe_every_ms)).await;
    }
}

/// Looks for pending probes every 25 ms until `stop` and none is pending.
async fn probe_poller(
    args: Args,
    http: reqwest::Client,
    probes: Arc<Mutex<Probes>>,
    stop: Arc<AtomicBool>,
) {
    loop {
        let (rows, counters): (Vec<String>, Vec<String>) = {
            let p = probes.lock().unwrap();
            (
                p.row_pending.keys().cloned().collect(),
                p.counter_pending.keys().cloned().collect(),
            )
        };
        if stop.load(Ordering::Relaxed) && rows.is_empty() && counters.is_empty() {
            return;
        }
        if let (Some(ch), false) = (&args.clickhouse, rows.is_empty()) {
            let list = rows
                .iter()
                .map(|r| format!("'{r}'"))
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!(
                "SELECT event_id FROM {}.events WHERE event_id IN ({list})",
                args.database
            );
            if let Ok(r) = http.post(ch).body(sql).send().await
                && let Ok(text) = r.text().await
            {
                let now = Instant::now();
                let mut p = probes.lock().unwrap();
                for id in text.lines() {
                    if let Some(sent) = p.row_pending.remove(id) {
                        p.row_ms.push((sent, (now - sent).as_secs_f64() * 1e3));
                    }
                }
            }
        }
        if let Some(key) = &args.read_key {
            for id in counters {
                let url = format!("{}/v1/counters/{}/{id}", args.url, args.counter);
                let seen = match http.get(url).bearer_auth(key).send().await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"].as_i64().unwrap_or(0) >= 1),
                    Err(_) => false,
                };
                if seen {
                    let now = Instant::now();
                    let mut p = probes.lock().unwrap();
                    if let Some(sent) = p.counter_pending.remove(&id) {
                        p.counter_ms.push((sent, (now - sent).as_secs_f64() * 1e3));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// CPU seconds (user + system) and RSS bytes of a process.
fn proc_sample(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    // USER_HZ is 100 on Linux.
    Some((ticks / 100.0, rss_kib * 1024))
}

async fn clickhouse_count(
    http: &reqwest::Client,
    url: &str,
    db: &str,
    app: Option<&str>,
) -> Result<u64> {
    let filter = app.map_or(String::new(), |app| {
        format!(
            " WHERE app = '{}'",
            app.replace('\\', "\\\\").replace('\'', "\\'")
        )
    });
    let sql = format!(
        "SELECT (SELECT count() FROM {db}.events{filter}) + (SELECT count() FROM {db}.dead_letters{filter})"
    );
    let text = http
        .post(url)
        .body(sql)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.trim().parse().context("ClickHouse count")
}

/// weir's metrics that the run moves.
#[derive(Debug, Default, Clone)]
struct WeirMetrics {
    requests_ok: f64,
    events_accepted: f64,
    rows: f64,
}

async fn weir_metrics(http: &reqwest::Client, url: &str) -> Result<WeirMetrics> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let sum = |name: &str, label: Option<(&str, &str)>| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
                let ok = metric == name
                    && label.is_none_or(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
                ok.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    };
    Ok(WeirMetrics {
        // 202 from /v1/events, 200 from Segment's API.
        requests_ok: sum("weir_ingest_requests_total", Some(("status", "202")))
            + sum("weir_ingest_requests_total", Some(("status", "200"))),
        events_accepted: sum("weir_ingest_events_total", None),
        rows: sum("weir_sink_rows_total", Some(("table", "events")))
            + sum("weir_sink_rows_total", Some(("table", "dead_letters"))),
    })
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    json!({"p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1e3, "count": h.len()})
}

/// One hot swap: when (seconds since the start), the new control-plane version, and
/// how long until every instance reported running it.
#[derive(Debug, Clone)]
struct SwapRecord {
    at_s: f64,
    version: u64,
    converged_ms: Option<f64>,
}

/// Every `every` seconds until `end`: re-puts the pipeline with its first plugin's
/// deadline moved by 1 ms and waits until every instance runs the new version.
async fn swap_loop(
    args: Args,
    http: reqwest::Client,
    start: Instant,
    end: Instant,
    every: f64,
) -> Result<Vec<SwapRecord>> {
    let admin = args
        .admin_url
        .clone()
        .context("--swap-every needs --admin-url")?;
    let get = |path: String| {
        let http = http.clone();
        let token = args.admin_token.clone();
        async move {
            let r = http.get(path).bearer_auth(token).send().await?;
            let status = r.status();
            let body: Value = r.json().await?;
            if !status.is_success() {
                bail!("{status}: {body}");
            }
            Ok::<Value, anyhow::Error>(body)
        }
    };
    let mut swaps = Vec::new();
    let mut k = 1u32;
    loop {
        let due = start + Duration::from_secs_f64(every * k as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let record = get(format!("{admin}/admin/v1/pipelines/{}", args.pipeline))
            .await
            .with_context(|| format!("cannot read pipeline {}", args.pipeline))?;
        let active = record["active"].as_u64().unwrap_or(0);
        let mut doc = record["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["version"].as_u64() == Some(active)))
            .map(|v| v["doc"].clone())
            .context("the pipeline has no active version")?;
        let deadline = &mut doc["plugins"][0]["deadline_ms"];
        let d = deadline
            .as_u64()
            .context("the pipeline has no plugin to swap")?;
        *deadline = json!(if k % 2 == 1 {
            d + 1
        } else {
            d.saturating_sub(1).max(1)
        });
        let at_s = start.elapsed().as_secs_f64();
        let r = http
            .put(format!("{admin}/admin/v1/pipelines/{}", args.pipeline))
            .bearer_auth(&args.admin_token)
            .json(&doc)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "swap {k}: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        let status = get(format!("{admin}/admin/v1/status")).await?;
        let version = status["control_version"].as_u64().unwrap_or(0);
        let mut converged_ms = None;
        while Instant::now() < end + Duration::from_secs(5) {
            let s = get(format!("{admin}/admin/v1/status")).await?;
            let instances = s["instances"].as_array().cloned().unwrap_or_default();
            if !instances.is_empty()
                && instances
                    .iter()
                    .all(|i| i["control_version"].as_u64().unwrap_or(0) >= version)
            {
                converged_ms = Some((start.elapsed().as_secs_f64() - at_s) * 1e3);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        swaps.push(SwapRecord {
            at_s,
            version,
            converged_ms,
        });
        k += 1;
    }
    Ok(swaps)
}

/// Which phase of a hot-swap run a moment (seconds since the start) is in.
fn phase(at_s: f64, swaps: &[SwapRecord]) -> &'static str {
    match swaps.first() {
        None => "before",
        Some(first) if at_s < first.at_s => "before",
        _ if swaps
            .iter()
            .any(|s| at_s >= s.at_s && at_s < s.at_s + SWAP_WINDOW_S) =>
        {
            "during"
        }
        _ => "after",
    }
}

fn sample_percentiles(v: &mut [f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    json!({"p50_ms": at(0.5), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": v[v.len() - 1], "count": v.len()})
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.rate.is_none() && !args.max {
        bail!("choose --rate EVENTS_PER_SECOND or --max");
    }
    if args.batch == 0 || args.clients == 0 || args.duration <= 0.0 {
        bail!("--batch, --clients and --duration must be positive");
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    let before = weir_metrics(&http, &args.url)
        .await
        .with_context(|| format!("weir does not answer at {}/metrics", args.url))?;
    let rows_before = match &args.clickhouse {
        Some(ch) => Some(clickhouse_count(&http, ch, &args.database, args.app.as_deref()).await?),
        None => None,
    };

    let tally = Arc::new(Tally {
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        by_second: Mutex::new(Vec::new()),
        statuses: Mutex::new(BTreeMap::new()),
        accepted: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let probes = Arc::new(Mutex::new(Probes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let run = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let cpu_start = args.pid.and_then(proc_sample);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..args.clients {
        tasks.push(tokio::spawn(client(
            id,
            args.clone(),
            http.clone(),
            tally.clone(),
            next.clone(),
            start,
            end,
        )));
    }
    let prober = tokio::spawn(probe_loop(
        args.clone(),
        http.clone(),
        probes.clone(),
        end,
        run,
    ));
    let poller = tokio::spawn(probe_poller(
        args.clone(),
        http.clone(),
        probes.clone(),
        stop.clone(),
    ));
    let swapper = args
        .swap_every
        .map(|every| tokio::spawn(swap_loop(args.clone(), http.clone(), start, end, every)));
    // Sample weir's RSS while sending.
    let mut peak_rss = 0u64;
    while Instant::now() < end {
        if let Some((_, rss)) = args.pid.and_then(proc_sample) {
            peak_rss = peak_rss.max(rss);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for t in tasks {
        t.await?;
    }
    prober.await?;
    let swaps = match swapper {
        Some(t) => t.await??,
        None => Vec::new(),
    };
    let sent_for = start.elapsed();
    let accepted = tally.accepted.load(Ordering::Relaxed);
    let probes_sent = probes.lock().unwrap().sent.len() as u64;

    // Drain: wait until every accepted event (and probe) is in ClickHouse.
    let mut drained = None;
    if let (Some(ch), Some(before_rows)) = (&args.clickhouse, rows_before) {
        let want = before_rows + accepted + probes_sent;
        let deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
        loop {
            if let Some((_, rss)) = args.pid.and_then(proc_sample) {
                peak_rss = peak_rss.max(rss);
            }
            let have = clickhouse_count(&http, ch, &args.database, args.app.as_deref())
                .await
                .unwrap_or(0);
            if have >= want {
                drained = Some(start.elapsed());
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "weir-load: only {} of {} rows after the drain timeout",
                    have - before_rows,
                    want - before_rows
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let busy_for = drained.unwrap_or(sent_for);
    let cpu = match (cpu_start, args.pid.and_then(proc_sample)) {
        (Some((a, _)), Some((b, _))) => Some((b - a) / busy_for.as_secs_f64()),
        _ => None,
    };
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), poller).await;

    let latency = tally.latency.lock().unwrap().clone();
    let statuses = tally.statuses.lock().unwrap().clone();
    let requests = tally.requests.load(Ordering::Relaxed);
    let (row_fresh, counter_fresh, lost_row_probes, lost_counter_probes) = {
        let p = probes.lock().unwrap();
        let ms = |v: &[(Instant, f64)]| v.iter().map(|(_, ms)| *ms).collect::<Vec<_>>();
        (
            sample_percentiles(&mut ms(&p.row_ms)),
            sample_percentiles(&mut ms(&p.counter_ms)),
            p.row_pending.len(),
            p.counter_pending.len(),
        )
    };
    let hot_swap = if swaps.is_empty() {
        Value::Null
    } else {
        let by_second = tally.by_second.lock().unwrap().clone();
        let p = probes.lock().unwrap();
        let mut phases = serde_json::Map::new();
        for name in ["before", "during", "after"] {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            for (second, hs) in by_second.iter().enumerate() {
                // A second belongs to the phase of its middle.
                if phase(second as f64 + 0.5, &swaps) == name {
                    h.add(hs)?;
                }
            }
            let fresh = |v: &[(Instant, f64)]| {
                let mut ms: Vec<f64> = v
                    .iter()
                    .filter(|(sent, _)| phase((*sent - start).as_secs_f64(), &swaps) == name)
                    .map(|(_, ms)| *ms)
                    .collect();
                sample_percentiles(&mut ms)
            };
            phases.insert(
                name.into(),
                json!({
                    "ingest_latency": if h.is_empty() { Value::Null } else { percentiles(&h) },
                    "freshness_clickhouse": fresh(&p.row_ms),
                    "freshness_counter": fresh(&p.counter_ms),
                }),
            );
        }
        let list: Vec<Value> = swaps
            .iter()
            .map(|s| json!({"at_s": s.at_s, "control_version": s.version, "all_instances_ms": s.converged_ms}))
            .collect();
        json!({"swaps": list, "window_s": SWAP_WINDOW_S, "phases": phases})
    };

    let mode = match args.rate {
        Some(r) => format!("fixed rate {r} events/s"),
        None => "max rate".into(),
    };
    let report = json!({
        "scenario": args.scenario,
        "mode": mode,
        "clients": args.clients,
        "batch": args.batch,
        "duration_s": sent_for.as_secs_f64(),
        "requests": requests,
        "statuses": statuses,
        "events_accepted": accepted,
        "ingest_events_per_s": accepted as f64 / sent_for.as_secs_f64(),
        "ingest_latency": percentiles(&latency),
        "e2e_events_per_s": drained.map(|d| (accepted + probes_sent) as f64 / d.as_secs_f64()),
        "drained_s": drained.map(|d| d.as_secs_f64()),
        "freshness_clickhouse": row_fresh,
        "freshness_counter": counter_fresh,
        "probes_not_seen": {"clickhouse": lost_row_probes, "counter": lost_counter_probes},
        "weir_cpu_cores": cpu,
        "weir_peak_rss_mib": args.pid.map(|_| peak_rss as f64 / (1 << 20) as f64),
        "hot_swap": hot_swap,
    });

    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    if args.verify {
        // Rows are counted by weir when written; give the last flush a moment.
        let mut after = weir_metrics(&http, &args.url).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while args.clickhouse.is_some()
            && after.rows - before.rows < (accepted + probes_sent) as f64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = weir_metrics(&http, &args.url).await?;
        }
        let ok_requests = statuses.get(args.api.accepted()).copied().unwrap_or(0) + probes_sent;
        let mut problems = Vec::new();
        let mut check = |what: &str, weir: f64, harness: u64| {
            if weir != harness as f64 {
                problems.push(format!(
                    "{what}: weir's metrics say {weir}, the harness saw {harness}"
                ));
            }
        };
        check(
            "requests accepted",
            after.requests_ok - before.requests_ok,
            ok_requests,
        );
        check(
            "events accepted",
            after.events_accepted - before.events_accepted,
            accepted + probes_sent,
        );
        if args.clickhouse.is_some() {
            check(
                "rows written (events + dead_letters)",
                after.rows - before.rows,
                accepted + probes_sent,
            );
        }
        if lost_row_probes > 0 || lost_counter_probes > 0 {
            problems.push(format!("{lost_row_probes} probes never reached ClickHouse, {lost_counter_probes} never reached the counter"));
        }
        if problems.is_empty() {
            println!("verify: weir's metrics agree with the harness");
        } else {
            for p in &problems {
                eprintln!("verify: {p}");
            }
            std::process::exit(1);
        }
    }
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if x.fract() == 0.0 && x.abs() < 1e15 {
                format!("{x:.0}")
            } else {
                format!("{x:.2}")
            }
        }
        other => other.to_string(),
    };
    let lat = |key: &str| {
        let v = &r[key];
        if v.is_null() {
            "-".to_owned()
        } else {
            format!(
                "p50 {} / p95 {} / p99 {} / max {} ms (n={})",
                f(&v["p50_ms"]),
                f(&v["p95_ms"]),
                f(&v["p99_ms"]),
                f(&v["max_ms"]),
                f(&v["count"])
            )
        }
    };
    println!(
        "scenario           {}",
        r["scenario"].as_str().unwrap_or("")
    );
    println!(
        "mode               {}, {} clients, {} events/request",
        r["mode"].as_str().unwrap_or(""),
        r["clients"],
        r["batch"]
    );
    println!(
        "sent for           {} s, {} requests, statuses {}",
        f(&r["duration_s"]),
        r["requests"],
        r["statuses"]
    );
    println!(
        "accepted           {} events, {} events/s",
        r["events_accepted"],
        f(&r["ingest_events_per_s"])
    );
    println!("ingest latency     {}", lat("ingest_latency"));
    println!(
        "end to end         {} events/s (all rows in ClickHouse after {} s)",
        f(&r["e2e_events_per_s"]),
        f(&r["drained_s"])
    );
    println!("POST -> row        {}", lat("freshness_clickhouse"));
    println!("POST -> counter    {}", lat("freshness_counter"));
    println!(
        "weir CPU / RSS     {} cores / {} MiB peak",
        f(&r["weir_cpu_cores"]),
        f(&r["weir_peak_rss_mib"])
    );
    let hs = &r["hot_swap"];
    if !hs.is_null() {
        for s in hs["swaps"].as_array().into_iter().flatten() {
            println!(
                "hot swap           at {} s -> control version {}, every instance running it after {} ms",
                f(&s["at_s"]),
                s["control_version"],
                f(&s["all_instances_ms"])
            );
        }
        for phase in ["before", "during", "after"] {
            let p = &hs["phases"][phase];
            let line = |v: &Value| {
                if v.is_null() {
                    "-".to_owned()
                } else {
                    format!(
                        "p50 {} / p99 {} / max {} ms",
                        f(&v["p50_ms"]),
                        f(&v["p99_ms"]),
                        f(&v["max_ms"])
                    )
                }
            };
            println!(
                "  {phase:<7} ingest {}; POST -> row {}; POST -> counter {}",
                line(&p["ingest_latency"]),
                line(&p["freshness_clickhouse"]),
                line(&p["freshness_counter"])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_events_are_json_objects_of_realistic_size() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut names = HashMap::new();
        for _ in 0..2000 {
            let mut text = String::new();
            write_event(&mut text, &mut rng, 100_000, Api::Events, false);
            let event: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(
                event["properties"].is_object() && event["context"].is_object(),
                "{text}"
            );
            assert!(event["user_id"].as_str().unwrap().starts_with("user"));
            assert!(event.get("event_id").is_none(), "{text}");
            assert!(
                (150..700).contains(&text.len()),
                "{} bytes: {text}",
                text.len()
            );
            *names
                .entry(event["name"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        // 40 / 30 / 20 / 10 %.
        assert!((700..900).contains(&names["profile_viewed"]), "{names:?}");
        assert!(
            (100..300).contains(&names["signup_step_completed"]),
            "{names:?}"
        );
    }

    #[test]
    fn segment_messages_carry_the_same_event_as_tracks() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let (mut ours, mut theirs) = (String::new(), String::new());
        write_event(&mut ours, &mut a, 1000, Api::Events, true);
        write_event(&mut theirs, &mut b, 1000, Api::Segment, true);
        let ours: Value = serde_json::from_str(&ours).unwrap();
        let theirs: Value = serde_json::from_str(&theirs).unwrap();
        assert_eq!(theirs["type"], "track");
        assert_eq!(theirs["event"], ours["name"]);
        assert_eq!(theirs["userId"], ours["user_id"]);
        assert_eq!(theirs["messageId"], ours["event_id"]);
        assert_eq!(ours["event_id"].as_str().map(str::len), Some(32));
        assert_eq!(theirs["properties"], ours["properties"]);
        assert_eq!(theirs["context"], ours["context"]);
    }
}
