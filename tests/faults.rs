//! The fault suite: one workload, one accounting, every fault.
//!
//! Each case starts its own Tansu, ClickHouse and Redis, a webhook receiver owned by
//! the test, an ingest instance that is never harmed and a processor instance; a
//! client posts `events` unique events the way tracking SDKs do (it resends a share of
//! its requests, re-batched, and retries until it gets a 202) while the fault happens.
//! Then every sink is counted against what the unique events must produce:
//!
//! - `events`, `dead_letters` (the schema's refusals, and the poison a table refuses)
//!   and the routed `profile_viewed` table, by `event_id`;
//! - the `profile_views` counter, per profile;
//! - the webhook receiver (`signup_completed`), by the `event_id`s it accepted;
//! - the topic sink `weir.signups`, by the `event_id`s of its records.
//!
//! `lost` is what a sink lacks, `dup` what it holds more than once. Every sink must
//! show neither in every case, with one exception: webhooks and topics mark what they
//! delivered once it is acknowledged, so a SIGKILL in the middle of a flush (at a
//! random moment, or between its INSERTs) can fall while a delivery is in flight or
//! before its mark, and that delivery is sent again (with the same `event_id`, for the
//! receiver to drop); in those cases their `dup` is reported and their `lost` must be 0.
//! A negative control (deduplication off, half the requests resent) must show
//! duplicates, or the accounting could not see one.
//!
//! `cargo test -p weir-tests --test faults` runs the short table (CI); with
//! `WEIR_FAULTS=full` every case runs longer, with more events, more kills and 30 s
//! outages (`scripts/faults.sh`). The table is printed at the end.
//! `WEIR_FAULT_CASE=TEXT` runs only the cases whose names contain TEXT.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use weir_tests::{
    AnswerCutter, ClickHouse, Lcg, ObjectStore, Redis, Tansu, WRITE_KEY, Weir, engagement_pipeline,
    repo_root,
};

const APP: &str = "faults";
const DB: &str = "faults";
const PROFILES: usize = 25;

/// What happens to the processor (or a server) while the client sends.
#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    /// SIGKILLs at random moments, each followed by a restart.
    Kills(usize),
    /// The processor aborts at a failpoint (`WEIR_FAILPOINT`, e.g. `after_write:2`:
    /// right after its second flush was written, before the commit), then restarts.
    Failpoint(&'static str),
    /// SIGTERM while the webhook receiver answers slowly, then a restart.
    SigtermSlowWebhook,
    ClickHouseDown(Duration),
    /// ClickHouse commits INSERTs into `events` whose answers are lost (a proxy).
    LostInsertAnswers(usize),
    RedisDown(Duration),
    /// The broker killed (SIGKILL) while the client sends and started again after the
    /// outage, with its log and committed offsets intact (a Tansu that keeps them in an
    /// object store): ingest answers 503 meanwhile, the processor and the topic sink
    /// reconnect.
    BrokerRestart(Duration),
    /// A second processor joins the group mid-stream; the first leaves later.
    SecondInstance,
    /// A column of `events` that some events' values cannot fill.
    Poison,
}

struct Case {
    name: &'static str,
    events: usize,
    /// Share of requests sent a second time, in percent.
    resend_pct: u64,
    dedup: bool,
    fault: Fault,
}

impl Case {
    /// True if the webhook and the topic may see an event twice in this case: a
    /// SIGKILL in the middle of a flush (at a random moment, or between its INSERTs,
    /// while the other sinks write beside ClickHouse) can fall while a delivery is in
    /// flight or before its mark, and that delivery is sent again after the restart.
    fn redelivers(&self) -> bool {
        matches!(self.fault, Fault::Kills(_))
            || matches!(self.fault, Fault::Failpoint(p) if p.starts_with("after_insert"))
    }
}

fn full() -> bool {
    std::env::var("WEIR_FAULTS").is_ok_and(|v| v == "full")
}

fn cases() -> Vec<Case> {
    let (n, outage, kills) = if full() {
        (20_000, Duration::from_secs(30), 5)
    } else {
        (2_000, Duration::from_secs(6), 2)
    };
    let case = |name, resend_pct, fault| Case {
        name,
        events: n,
        resend_pct,
        dedup: true,
        fault,
    };
    vec![
        case("no fault", 0, Fault::None),
        case("client resends 5 %", 5, Fault::None),
        case("client resends 50 %", 50, Fault::None),
        case("SIGKILL at random moments", 5, Fault::Kills(kills)),
        case(
            "SIGKILL after a write, before its commit",
            5,
            Fault::Failpoint("after_write:2"),
        ),
        case(
            "SIGKILL after the dedup claims, before the write",
            5,
            Fault::Failpoint("after_claim:3"),
        ),
        case(
            "SIGKILL between the INSERTs of a flush",
            5,
            Fault::Failpoint("after_insert:3"),
        ),
        case("SIGTERM with a slow webhook", 5, Fault::SigtermSlowWebhook),
        case("ClickHouse down", 5, Fault::ClickHouseDown(outage)),
        case("lost INSERT answers", 5, Fault::LostInsertAnswers(2)),
        case("Redis down", 5, Fault::RedisDown(outage)),
        case("broker restart", 5, Fault::BrokerRestart(outage)),
        case(
            "a second instance joins, the first leaves",
            5,
            Fault::SecondInstance,
        ),
        case("poison events (a column refuses them)", 5, Fault::Poison),
        Case {
            name: "negative control: deduplication off",
            events: n,
            resend_pct: 50,
            dedup: false,
            fault: Fault::None,
        },
    ]
}

/// What the unique events must produce.
#[derive(Default)]
struct Expected {
    events: BTreeSet<String>,
    dead: BTreeSet<String>,
    rows: BTreeSet<String>,
    views: BTreeMap<String, i64>,
    signups: BTreeSet<String>,
}

/// Event `n`: mostly views of other users' profiles (a row and a count), signups
/// (the webhook and the topic), 1 in 10 a view without a user (its schema refuses
/// it); with `poison`, 1 in 97 carries a `code` the `events` table cannot parse.
fn event(n: usize, poison: bool, exp: &mut Expected) -> Value {
    let id = format!("f-{n:06}");
    let profile = format!("p{}", n % PROFILES);
    if n % 10 == 9 {
        exp.dead.insert(id.clone());
        return json!({"name": "profile_viewed", "event_id": id, "properties": {"profile_id": profile}});
    }
    let code = if poison && n.is_multiple_of(97) {
        exp.dead.insert(id.clone());
        "n/a".to_owned()
    } else {
        exp.events.insert(id.clone());
        (n % 10).to_string()
    };
    if n % 4 == 3 {
        exp.signups.insert(id.clone());
        return json!({"name": "signup_completed", "event_id": id, "user_id": format!("new{n}"),
                      "properties": {"code": code}});
    }
    exp.rows.insert(id.clone());
    *exp.views.entry(profile.clone()).or_default() += 1;
    json!({"name": "profile_viewed", "event_id": id, "user_id": format!("u{}", n % 101),
           "properties": {"profile_id": profile, "source": "feed", "code": code}})
}

/// The webhook receiver: counts each event id it accepted; answers after `delay`.
#[derive(Default)]
struct Receiver {
    accepted: Mutex<BTreeMap<String, u64>>,
    delay_ms: std::sync::atomic::AtomicU64,
}

async fn hook(State(r): State<Arc<Receiver>>, body: String) -> StatusCode {
    let delay = r.delay_ms.load(std::sync::atomic::Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut accepted = r.accepted.lock().unwrap();
    for e in body["events"].as_array().into_iter().flatten() {
        let id = e["event_id"].as_str().unwrap_or_default().to_owned();
        *accepted.entry(id).or_default() += 1;
    }
    StatusCode::OK
}

async fn receiver() -> Result<(SocketAddr, Arc<Receiver>)> {
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, r))
}

fn config(
    tansu: &Tansu,
    clickhouse_url: &str,
    redis: &Redis,
    hook: SocketAddr,
    case: &Case,
) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "{APP}"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{clickhouse_url}"
database = "{DB}"
[redis]
url = "{}"
timeout_ms = 500
[dedup]
enabled = {}
[processor]
flush_max_events = 500
flush_interval_ms = 100
retry_backoff_ms = 200
[pipeline]
name = "engagement"
[[pipeline.schema]]
event = "profile_viewed"
path = "{}"
{}
[[pipeline.webhook]]
name = "crm"
url = "http://{hook}/hook"
events = ["signup_completed"]
batch_size = 50
retry_backoff_ms = 100
[[pipeline.topic]]
name = "signups"
topic = "weir.signups"
events = ["signup_completed"]
"#,
        tansu.bootstrap(),
        redis.url(),
        case.dedup,
        repo_root()
            .join("examples/schemas/profile_viewed.json")
            .display(),
        engagement_pipeline(),
    )
}

/// A tracking SDK's sending side (see `tests/dedup.rs`): posts until a 202, resends
/// `resend_pct` % of its requests (an earlier one, whole or its second half).
async fn send(url: String, events: Vec<Value>, resend_pct: u64, seed: u64) -> Result<Sent> {
    let http = reqwest::Client::new();
    let mut rng = Lcg(seed);
    let mut sent = Sent::default();
    let started = Instant::now();
    let refused = std::sync::atomic::AtomicUsize::new(0);
    let post = |batch: Vec<Value>| {
        let http = http.clone();
        let url = url.clone();
        let refused = &refused;
        async move {
            let started = Instant::now();
            loop {
                let answer = http
                    .post(&url)
                    .bearer_auth(WRITE_KEY)
                    .json(&batch)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == 202 => return Ok(batch.len()),
                    Ok(r) if r.status().is_client_error() => {
                        bail!("ingest answered {}: {}", r.status(), r.text().await?)
                    }
                    _ => {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                if started.elapsed() > Duration::from_secs(120) {
                    bail!("a request was not accepted within 120 s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut earlier: Vec<Vec<Value>> = Vec::new();
    for (i, batch) in events.chunks(100).enumerate() {
        sent.posted += post(batch.to_vec()).await?;
        earlier.push(batch.to_vec());
        // Exactly resend_pct % of the requests are followed by a resend.
        let i = i as u64;
        if (i + 1) * resend_pct / 100 > i * resend_pct / 100 {
            // Resend an earlier request: as it was, or its second half alone.
            let pick = earlier[rng.next(earlier.len() as u64) as usize].clone();
            let copy = if rng.next(2) == 0 {
                pick
            } else {
                pick[pick.len() / 2..].to_vec()
            };
            sent.posted += post(copy).await?;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    sent.refused = refused.into_inner();
    sent.took = started.elapsed();
    Ok(sent)
}

/// What the client sent: events accepted (copies included), answers other than a 202
/// or a 4xx that it retried (a 503 while Kafka was down, a reset), and for how long.
#[derive(Debug, Default)]
struct Sent {
    posted: usize,
    refused: usize,
    took: Duration,
}

/// Lost and doubled events of one sink.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    lost: u64,
    dup: u64,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.lost, self.dup)
    }
}

/// Compares what a sink holds (`event_id` -> copies) with what it must.
fn tally(want: &BTreeSet<String>, have: &BTreeMap<String, u64>) -> Tally {
    let lost = want.iter().filter(|id| !have.contains_key(*id)).count() as u64;
    let dup = have
        .iter()
        .map(|(id, n)| if want.contains(id) { n - 1 } else { *n })
        .sum();
    Tally { lost, dup }
}

async fn copies(clickhouse: &ClickHouse, table: &str) -> Result<BTreeMap<String, u64>> {
    let text = clickhouse
        .query(&format!(
            "SELECT event_id, count() FROM {DB}.{table} GROUP BY event_id"
        ))
        .await?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (id, n) = l.split_once('\t').context("two columns")?;
            Ok((id.to_owned(), n.parse()?))
        })
        .collect()
}

/// One row of the table.
struct Row {
    events: Tally,
    dead: Tally,
    rows: Tally,
    counter: Tally,
    webhook: Tally,
    topic: Tally,
    posted: usize,
}

impl Row {
    /// ClickHouse and the counters: neither lost nor doubled; the webhook and the
    /// topic too unless `redeliver` (a SIGKILL at a random moment may fall between a
    /// delivery's acknowledgement and its mark: that delivery is sent again).
    fn once(&self, redeliver: bool) -> bool {
        let delivered = [self.webhook, self.topic];
        [self.events, self.dead, self.rows, self.counter]
            .iter()
            .chain(if redeliver { &[][..] } else { &delivered[..] })
            .all(|t| *t == Tally::default())
    }

    /// Nothing lost anywhere.
    fn nothing_lost(&self) -> bool {
        [
            self.events,
            self.dead,
            self.rows,
            self.counter,
            self.webhook,
            self.topic,
        ]
        .iter()
        .all(|t| t.lost == 0)
    }
}

/// Runs `case` on a fresh stack and counts every sink.
async fn run(case: &Case, seed: u64) -> Result<Row> {
    // A broker that is restarted must come back with what it held.
    let store = match case.fault {
        Fault::BrokerRestart(_) => Some(ObjectStore::start("weir-faults")?),
        _ => None,
    };
    let mut tansu = match &store {
        Some(store) => Tansu::start_durable(store)?,
        None => Tansu::start()?,
    };
    tansu.create_topic("weir.events", 4)?;
    let mut clickhouse = ClickHouse::start()?;
    let mut redis = Redis::start()?;
    let (hook, receiver) = receiver().await?;
    let cutter = match case.fault {
        Fault::LostInsertAnswers(n) => {
            let upstream = SocketAddr::from(([127, 0, 0, 1], clickhouse.http_port));
            Some(AnswerCutter::start(upstream, "INSERT INTO `events`(", n).await?)
        }
        _ => None,
    };
    let ch_url = cutter.as_ref().map_or(clickhouse.url(), AnswerCutter::url);
    let cfg = config(&tansu, &ch_url, &redis, hook, case);
    let env: Vec<(&str, String)> = match case.fault {
        Fault::Failpoint(point) => vec![("WEIR_FAILPOINT", point.to_owned())],
        _ => vec![],
    };
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut processor = Weir::start_with_env(&cfg, &env_refs)?;
    processor.wait_for_partitions(Duration::from_secs(30))?;
    if let Fault::Poison = case.fault {
        clickhouse
            .query(&format!(
                "ALTER TABLE {DB}.events ADD COLUMN code UInt8 MATERIALIZED toUInt8(visitParamExtractString(properties, 'code'))"
            ))
            .await?;
    }
    let ingest = Weir::start(&cfg.replace("[processor]\n", "[processor]\nenabled = false\n"))?;

    let mut exp = Expected::default();
    let poison = matches!(case.fault, Fault::Poison);
    let events: Vec<Value> = (0..case.events)
        .map(|n| event(n, poison, &mut exp))
        .collect();
    let client = tokio::spawn(send(ingest.events_url(), events, case.resend_pct, seed));

    let mut rng = Lcg(seed ^ 0x5eed);
    let mut second = None;
    match case.fault {
        Fault::Kills(times) => {
            for _ in 0..times {
                tokio::time::sleep(Duration::from_millis(500 + rng.next(1500))).await;
                processor.kill();
                tokio::task::block_in_place(|| processor.restart())?;
            }
        }
        Fault::Failpoint(_) => {
            tokio::task::block_in_place(|| processor.wait_for_exit(Duration::from_secs(60)))?;
            processor.env.clear();
            tokio::task::block_in_place(|| processor.restart())?;
        }
        Fault::SigtermSlowWebhook => {
            receiver
                .delay_ms
                .store(300, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(2)).await;
            tokio::task::block_in_place(|| processor.stop());
            receiver
                .delay_ms
                .store(0, std::sync::atomic::Ordering::SeqCst);
            tokio::task::block_in_place(|| processor.restart())?;
        }
        Fault::ClickHouseDown(d) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            clickhouse.stop();
            tokio::time::sleep(d).await;
            tokio::task::block_in_place(|| clickhouse.restart())?;
        }
        Fault::RedisDown(d) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis.stop();
            tokio::time::sleep(d).await;
            tokio::task::block_in_place(|| redis.restart())?;
        }
        Fault::BrokerRestart(d) => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tansu.kill();
            tokio::time::sleep(d).await;
            tokio::task::block_in_place(|| tansu.restart())?;
        }
        Fault::SecondInstance => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            second = Some(Weir::start(&cfg)?);
            tokio::time::sleep(Duration::from_secs(8)).await;
            tokio::task::block_in_place(|| processor.stop());
        }
        Fault::None | Fault::LostInsertAnswers(_) | Fault::Poison => {}
    }
    let sent = client.await??;
    eprintln!(
        "{}: the client sent for {:?}; {} answers retried",
        case.name, sent.took, sent.refused
    );
    if matches!(case.fault, Fault::BrokerRestart(_)) && sent.refused == 0 {
        bail!("ingest refused nothing: the broker was not down while the client sent");
    }

    // Wait until every sink has at least what it must (or time runs out), then a
    // little longer for stragglers to show up as duplicates.
    let started = Instant::now();
    loop {
        let stored = clickhouse
            .count(&format!("SELECT uniqExact(event_id) FROM {DB}.events"))
            .await
            .unwrap_or(0);
        let dead = clickhouse
            .count(&format!(
                "SELECT uniqExact(event_id) FROM {DB}.dead_letters"
            ))
            .await
            .unwrap_or(0);
        let hooked = receiver.accepted.lock().unwrap().len();
        if stored >= exp.events.len() as u64
            && dead >= exp.dead.len() as u64
            && hooked >= exp.signups.len()
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let counted = redis.hgetall(&format!("weir:c:{APP}:profile_views"))?;
    let mut counter = Tally::default();
    for profile in exp
        .views
        .keys()
        .chain(counted.keys())
        .collect::<BTreeSet<_>>()
    {
        let want = exp.views.get(profile).copied().unwrap_or(0);
        let have = counted.get(profile).copied().unwrap_or(0);
        counter.lost += (want - have).max(0) as u64;
        counter.dup += (have - want).max(0) as u64;
    }
    let mut topic = BTreeMap::new();
    for (_, payload) in weir_tests::read_topic(&tansu.bootstrap(), "weir.signups").await? {
        let e: Value = serde_json::from_slice(&payload)?;
        *topic
            .entry(e["event_id"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let row = Row {
        events: tally(&exp.events, &copies(&clickhouse, "events").await?),
        dead: tally(&exp.dead, &copies(&clickhouse, "dead_letters").await?),
        rows: tally(&exp.rows, &copies(&clickhouse, "profile_viewed").await?),
        counter,
        webhook: tally(&exp.signups, &receiver.accepted.lock().unwrap()),
        topic: tally(&exp.signups, &topic),
        posted: sent.posted,
    };
    if cutter.as_ref().is_some_and(|c| c.cut() == 0) {
        bail!("no INSERT answer was cut");
    }
    // The crash cut a written flush off before its commit: the restarted processor
    // read its signups again, and the delivery marks (not luck) kept the webhook and
    // the topic from sending them twice.
    if matches!(case.fault, Fault::Failpoint(p) if p.starts_with("after_write")) {
        for sink in ["webhook:crm", "topic:signups"] {
            let skipped =
                processor.metric_now("weir_delivery_replays_skipped_total", &[("sink", sink)]);
            if skipped < 1.0 {
                bail!("the replay skipped nothing {sink} had delivered before the crash");
            }
        }
    }
    if !row.once(case.redelivers()) && case.dedup {
        eprintln!(
            "{} failed its accounting; processor log:\n{}",
            case.name,
            processor.log()
        );
    }
    drop(second);
    Ok(row)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_loses_nothing_and_doubles_nothing() -> Result<()> {
    let seed = Lcg::seed();
    let mut table = String::from(
        "| case | events posted (copies included) | events | dead_letters | profile_viewed | counter | webhook | topic |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    let only = std::env::var("WEIR_FAULT_CASE").unwrap_or_default();
    for case in cases().into_iter().filter(|c| c.name.contains(&only)) {
        let row = run(&case, seed).await.with_context(|| case.name)?;
        table.push_str(&format!(
            "| {} | {} of {} | {} | {} | {} | {} | {} | {} |\n",
            case.name,
            row.posted,
            case.events,
            row.events,
            row.dead,
            row.rows,
            row.counter,
            row.webhook,
            row.topic
        ));
        eprintln!("{}", table.lines().last().unwrap_or_default());
        match (
            case.dedup,
            row.once(case.redelivers()) && row.nothing_lost(),
        ) {
            (true, false) => failures.push(case.name),
            // The negative control must see the copies.
            (false, true) => failures.push(case.name),
            _ => {}
        }
    }
    println!("\nlost/duplicated per sink (seed {seed}):\n\n{table}");
    if !failures.is_empty() {
        bail!("failed: {failures:?}\n{table}");
    }
    Ok(())
}
