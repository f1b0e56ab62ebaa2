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
    /// Concurrent clients (connections).
    #[arg(long, default_value_t = 8)]
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
}

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

/// One realistic event: names weighted as in the seeds' traffic, ~400-600 bytes.
fn event(rng: &mut Rng, users: u64) -> Value {
    let user = format!("user{}", rng.below(users));
    let session = format!("s{:016x}", rng.next());
    let context = json!({
        "locale": LOCALES[rng.below(6) as usize],
        "app_version": format!("4.{}.{}", rng.below(10), rng.below(20)),
        "device": DEVICES[rng.below(4) as usize],
        "os_version": format!("{}.{}", 12 + rng.below(6), rng.below(5)),
        "screen": {"w": 390 + rng.below(800), "h": 844 + rng.below(400)},
        "session_id": session,
        "ip_country": "GB",
    });
    let roll = rng.below(100);
    let (name, properties) = if roll < 40 {
        (
            "profile_viewed",
            json!({
                "profile_id": format!("user{}", rng.below(users)),
                "source": SOURCES[rng.below(5) as usize],
                "position": rng.below(50),
                "referrer": format!("https://app.example.com/search?q=term{}", rng.below(1000)),
            }),
        )
    } else if roll < 70 {
        (
            "post_liked",
            json!({
                "post_id": format!("post{}", rng.below(users * 3)),
                "author_id": format!("user{}", rng.below(users)),
                "reaction": if rng.below(4) == 0 { "love" } else { "like" },
            }),
        )
    } else if roll < 90 {
        (
            "app_opened",
            json!({"cold_start": rng.below(3) == 0, "push_opened": rng.below(5) == 0}),
        )
    } else {
        (
            "signup_step_completed",
            json!({"step": rng.below(6), "variant": if rng.below(2) == 0 { "a" } else { "b" }}),
        )
    };
    json!({"name": name, "user_id": user, "properties": properties, "context": context})
}

/// What the clients saw.
struct Tally {
    latency: Mutex<Histogram<u64>>,
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
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 0x2545_f491_4f6c_dd1d));
    let url = format!("{}/v1/events", args.url);
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.batch as f64 / r.max(1) as f64));
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
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
        let body: Vec<Value> = (0..args.batch)
            .map(|_| event(&mut rng, args.users))
            .collect();
        let resp = http
            .post(&url)
            .bearer_auth(&args.write_key)
            .json(&body)
            .send()
            .await;
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
        if status == "202" {
            tally
                .accepted
                .fetch_add(args.batch as u64, Ordering::Relaxed);
        }
        tally.requests.fetch_add(1, Ordering::Relaxed);
        *tally.statuses.lock().unwrap().entry(status).or_default() += 1;
    }
    let _ = tally.latency.lock().unwrap().add(local);
}

/// Probes: sent every 200 ms; each is looked for until it is seen.
#[derive(Default)]
struct Probes {
    sent: Vec<(String, Instant)>,
    row_ms: Vec<f64>,
    counter_ms: Vec<f64>,
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
        tokio::time::sleep(Duration::from_millis(200)).await;
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
                        p.row_ms.push((now - sent).as_secs_f64() * 1e3);
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
                        p.counter_ms.push((now - sent).as_secs_f64() * 1e3);
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

async fn clickhouse_count(http: &reqwest::Client, url: &str, db: &str) -> Result<u64> {
    let sql = format!(
        "SELECT (SELECT count() FROM {db}.events) + (SELECT count() FROM {db}.dead_letters)"
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
    requests_202: f64,
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
        requests_202: sum("weir_ingest_requests_total", Some(("status", "202"))),
        events_accepted: sum("weir_ingest_events_total", None),
        rows: sum("weir_sink_rows_total", Some(("table", "events")))
            + sum("weir_sink_rows_total", Some(("table", "dead_letters"))),
    })
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    json!({"p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1e3, "count": h.len()})
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
        Some(ch) => Some(clickhouse_count(&http, ch, &args.database).await?),
        None => None,
    };

    let tally = Arc::new(Tally {
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
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
            let have = clickhouse_count(&http, ch, &args.database)
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
        let mut p = probes.lock().unwrap();
        (
            sample_percentiles(&mut p.row_ms),
            sample_percentiles(&mut p.counter_ms),
            p.row_pending.len(),
            p.counter_pending.len(),
        )
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
        let ok_requests = statuses.get("202").copied().unwrap_or(0) + probes_sent;
        let mut problems = Vec::new();
        let mut check = |what: &str, weir: f64, harness: u64| {
            if weir != harness as f64 {
                problems.push(format!(
                    "{what}: weir's metrics say {weir}, the harness saw {harness}"
                ));
            }
        };
        check(
            "requests answered 202",
            after.requests_202 - before.requests_202,
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
}
