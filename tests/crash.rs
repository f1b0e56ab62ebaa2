//! Crash safety of the processor: weir is SIGKILLed five times at random moments while
//! it consumes and flushes, and restarted each time. Afterwards every accepted event is
//! in `events` (or `dead_letters`) exactly once, every routed row in `profile_viewed`
//! exactly once, and the Redis counters equal the events sent: nothing lost (offsets are
//! committed only after every sink acknowledged) and nothing doubled (a replayed batch
//! skips the rows an earlier run already wrote, and increments Redis already holds).
//!
//! Ingest runs in a separate weir instance that is never killed, so that what is tested
//! is the processor's crash behaviour, not client retries. Also: a flush whose INSERTs
//! partly failed, and an INSERT ClickHouse committed but whose answer was lost.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weir_tests::{
    AnswerCutter, ClickHouse, KafkaCutter, Lcg, Redis, Tansu, WRITE_KEY, Weir, engagement_pipeline,
};

const EVENTS: usize = 12_000;
const KILLS: usize = 5;

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis, processor: bool) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "crash"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "crash"
compression = "{}"
[redis]
url = "{}"
[processor]
enabled = {processor}
flush_max_events = 400
flush_interval_ms = 100
{}
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        clickhouse.compression(),
        redis.url(),
        engagement_pipeline(),
    )
}

/// What the sender posted, and what each sink must hold afterwards.
#[derive(Default)]
struct Sent {
    kept: BTreeSet<String>,
    rejected: BTreeSet<String>,
    /// Ids of the `profile_viewed` events (one routed row each).
    views: BTreeSet<String>,
    view_counts: BTreeMap<String, i64>,
    like_counts: BTreeMap<String, i64>,
}

impl Sent {
    /// Event `n`: 1 in 10 rejected (no user), a third of the rest profile views (a row
    /// and a count), the others likes (a count).
    fn event(&mut self, n: usize) -> Value {
        let id = format!("k{n:06}");
        let user = format!("u{}", n % 300);
        if n.is_multiple_of(10) {
            self.rejected.insert(id.clone());
            return json!({"name": "post_liked", "event_id": id});
        }
        self.kept.insert(id.clone());
        if n.is_multiple_of(3) {
            let profile = format!("p{}", n % 17);
            self.views.insert(id.clone());
            *self.view_counts.entry(profile.clone()).or_default() += 1;
            json!({"name": "profile_viewed", "event_id": id, "user_id": user, "properties": {"profile_id": profile}})
        } else {
            let post = format!("x{}", n % 11);
            *self.like_counts.entry(post.clone()).or_default() += 1;
            json!({"name": "post_liked", "event_id": id, "user_id": user, "properties": {"post_id": post}})
        }
    }
}

/// The event ids in `crash.events`, checking that none is there twice (`doubled` says
/// what a double would mean).
async fn distinct_event_ids(clickhouse: &ClickHouse, doubled: &str) -> Result<BTreeSet<String>> {
    let rows = clickhouse
        .query("SELECT event_id FROM crash.events ORDER BY event_id")
        .await?;
    let ids: Vec<&str> = rows.lines().collect();
    let unique: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        ids.len(),
        unique.len(),
        "{doubled}: {} rows for {} events",
        ids.len(),
        unique.len()
    );
    Ok(unique)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_flushes_loses_and_doubles_nothing() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let ingest = Weir::start(&config(&tansu, &clickhouse, &redis, false))?;
    let mut processor = Weir::start(&config(&tansu, &clickhouse, &redis, true))?;
    processor.wait_for_partitions(Duration::from_secs(30))?;

    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_nanos() as u64;
    eprintln!("random seed {seed}");
    let mut rng = Lcg(seed);

    // Post the events in the background, paced over ~12 s.
    let url = ingest.events_url();
    let sender = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut sent = Sent::default();
        for chunk in 0..EVENTS / 100 {
            let batch: Vec<Value> = (0..100).map(|i| sent.event(chunk * 100 + i)).collect();
            let resp = http
                .post(&url)
                .header("Authorization", format!("Bearer {WRITE_KEY}"))
                .json(&batch)
                .send()
                .await?;
            if resp.status() != 202 {
                bail!("ingest answered {}: {}", resp.status(), resp.text().await?);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::Ok(sent)
    });

    // Kill the processor at random moments while it flushes (each time once the new
    // process has joined the group and written a batch), restarting it at once.
    let mut skipped = 0.0;
    for kill in 1..=KILLS {
        tokio::task::block_in_place(|| {
            processor.wait_for_metric(
                "weir_processor_batch_events_count",
                &[],
                1.0,
                Duration::from_secs(60),
            )
        })?;
        let wait = rng.next(600);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let written = clickhouse
            .count("SELECT count() FROM crash.events")
            .await
            .unwrap_or(0);
        skipped += processor.metric_now("weir_replayed_rows_skipped_total", &[]);
        processor.kill();
        eprintln!("kill {kill}, {wait} ms after a flush ({written} rows in events)");
        tokio::task::block_in_place(|| processor.restart())?;
    }
    let sent = sender.await??;
    let (kept, rejected) = (&sent.kept, &sent.rejected);

    let want = (kept.len() + rejected.len()) as u64;
    let started = Instant::now();
    loop {
        let have = clickhouse
            .count("SELECT (SELECT count() FROM crash.events) + (SELECT count() FROM crash.dead_letters)")
            .await
            .unwrap_or(0);
        if have >= want {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {have} of {want} rows after 120 s; processor log:\n{}",
                processor.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let unique = distinct_event_ids(&clickhouse, "events doubled").await?;
    assert_eq!(
        &unique, kept,
        "events table differs from the accepted events"
    );

    let rows = clickhouse
        .query("SELECT event_id FROM crash.dead_letters ORDER BY event_id")
        .await?;
    let ids: Vec<&str> = rows.lines().collect();
    let unique: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(ids.len(), unique.len(), "dead letters doubled");
    assert_eq!(&unique, rejected);

    // The routed table: each view once.
    let rows = clickhouse
        .query("SELECT event_id FROM crash.profile_viewed ORDER BY event_id")
        .await?;
    let ids: Vec<&str> = rows.lines().collect();
    let unique: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(ids.len(), unique.len(), "routed rows doubled");
    assert_eq!(unique, sent.views);

    // The counters: each increment once (they may trail ClickHouse by a flush).
    let started = Instant::now();
    loop {
        let views = redis.hgetall("weir:c:crash:profile_views")?;
        let likes = redis.hgetall("weir:c:crash:post_likes")?;
        if views == sent.view_counts && likes == sent.like_counts {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            panic!(
                "counters differ from the events sent:\nviews {views:?}\nwant  {:?}\nlikes {likes:?}\nwant  {:?}",
                sent.view_counts, sent.like_counts
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    skipped += processor.metric_now("weir_replayed_rows_skipped_total", &[]);
    eprintln!(
        "{} events, {KILLS} kills; {skipped} replayed rows skipped",
        kept.len() + rejected.len()
    );
    Ok(())
}

/// The worst moment for a crash: rows written, offsets not committed. The failpoint
/// aborts the processor exactly there; the next run must skip what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_write_and_commit_does_not_double_rows() -> Result<()> {
    crash_between_write_and_commit(ClickHouse::start()?, false).await
}

/// The same crash, on tables an earlier weir made without the coordinates views the
/// replay guard reads: the restarted weir adds the views, fills them from the tables'
/// rows, and the replay is recognised all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_onto_tables_from_before_the_coordinates_views_does_not_double_rows() -> Result<()>
{
    crash_between_write_and_commit(ClickHouse::start()?, true).await
}

/// Both on a current release (chdb's engine, `ClickHouse::current`), whose views keep
/// their rows in tables of another name (`.inner_id.UUID`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_onto_a_current_clickhouse_does_not_double_rows() -> Result<()> {
    crash_between_write_and_commit(ClickHouse::current()?, true).await
}

async fn crash_between_write_and_commit(clickhouse: ClickHouse, upgrade: bool) -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let redis = Redis::start()?;
    let ingest = Weir::start(&config(&tansu, &clickhouse, &redis, false))?;
    let mut processor = Weir::start_with_env(
        &config(&tansu, &clickhouse, &redis, true),
        &[("WEIR_FAILPOINT", "after_write:3")],
    )?;
    processor.wait_for_partitions(Duration::from_secs(30))?;

    let http = reqwest::Client::new();
    let mut expected = BTreeSet::new();
    for chunk in 0..30 {
        let batch: Vec<Value> = (0..100)
            .map(|i| {
                let id = format!("f{:05}", chunk * 100 + i);
                expected.insert(id.clone());
                json!({"name": "app_opened", "event_id": id})
            })
            .collect();
        let resp = http
            .post(ingest.events_url())
            .header("Authorization", format!("Bearer {WRITE_KEY}"))
            .json(&batch)
            .send()
            .await?;
        assert_eq!(resp.status(), 202);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    tokio::task::block_in_place(|| processor.wait_for_exit(Duration::from_secs(60)))?;
    let before = clickhouse.count("SELECT count() FROM crash.events").await?;
    assert!(before > 0, "the failpoint fires after a write");
    assert!(
        processor
            .log()
            .contains("WEIR_FAILPOINT after_write:3 reached")
    );

    if upgrade {
        for table in ["events", "dead_letters", "profile_viewed"] {
            clickhouse
                .query(&format!("DROP TABLE crash._weir_coords_{table}"))
                .await?;
        }
    }
    processor.env.clear();
    tokio::task::block_in_place(|| processor.restart())?;
    let started = Instant::now();
    while clickhouse.count("SELECT count() FROM crash.events").await? < expected.len() as u64 {
        if started.elapsed() > Duration::from_secs(90) {
            bail!("rows missing after the restart; log:\n{}", processor.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let unique = distinct_event_ids(&clickhouse, "rows doubled by the replay").await?;
    assert_eq!(unique, expected);
    assert!(
        processor.metric_now("weir_replayed_rows_skipped_total", &[]) > 0.0,
        "the replayed batch was not recognised"
    );
    if upgrade {
        assert!(
            processor.log().contains("copied into its coordinates view"),
            "{}",
            processor.log()
        );
        // The view holds each row's coordinates (the rows of before once more if the
        // fill raced the first INSERTs: the guard does not mind).
        let coords = clickhouse
            .count("SELECT uniqExact(kafka_partition, kafka_offset, kafka_index) FROM crash._weir_coords_events")
            .await?;
        assert_eq!(coords, expected.len() as u64);
    }
    eprintln!(
        "{before} rows written before the crash; the replay skipped them, {} rows in all",
        unique.len()
    );
    Ok(())
}

/// A bug that panics the processor (a failpoint, after its 2nd write) stops the whole
/// process with a failure status, instead of leaving ingest answering 202 with nothing
/// processing behind it; once restarted, every accepted event lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_processor_stops_the_process_and_the_restart_loses_nothing() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let mut weir = Weir::start_with_env(
        &config(&tansu, &clickhouse, &redis, true),
        &[("WEIR_FAILPOINT", "panic_after_write:2")],
    )?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let http = reqwest::Client::new();
    let (mut accepted, mut sent) = (BTreeSet::new(), BTreeSet::new());
    let started = Instant::now();
    // Post until the process is gone (ingest goes down with the processor).
    for chunk in 0.. {
        let batch: Vec<Value> = (0..50)
            .map(|i| json!({"name": "app_opened", "event_id": format!("p{:05}", chunk * 50 + i)}))
            .collect();
        sent.extend(
            batch
                .iter()
                .map(|e| e["event_id"].as_str().unwrap().to_owned()),
        );
        let answer = http
            .post(weir.events_url())
            .header("Authorization", format!("Bearer {WRITE_KEY}"))
            .json(&batch)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match answer {
            Ok(resp) if resp.status() == 202 => {
                accepted.extend(
                    batch
                        .iter()
                        .map(|e| e["event_id"].as_str().unwrap().to_owned()),
                );
            }
            Ok(resp) => bail!("ingest answered {}", resp.status()),
            Err(_) => break,
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "weir still answers 60 s after its processor panicked:\n{}",
                weir.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = tokio::task::block_in_place(|| weir.wait_for_exit(Duration::from_secs(60)))?;
    assert!(
        !status.success(),
        "weir exited with {status} after the panic"
    );
    assert!(
        accepted.len() >= 100,
        "{} accepted before the panic",
        accepted.len()
    );

    weir.env.clear();
    tokio::task::block_in_place(|| weir.restart())?;
    let want = accepted.len() as u64;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM crash.events",
            want,
            Duration::from_secs(90),
        )
        .await
        .with_context(|| weir.log())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let unique = distinct_event_ids(&clickhouse, "rows doubled after the restart").await?;
    // Every accepted event; a request cut off by the stop may have landed too.
    assert!(unique.is_superset(&accepted), "accepted events lost");
    assert!(unique.is_subset(&sent));
    Ok(())
}

/// ClickHouse refuses one INSERT of a flush after the INSERT into `events` succeeded
/// (a failpoint fails the 2nd INSERT into `profile_viewed`). The retry must write only
/// what is missing: `events` stays free of doubles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_failed_flush_is_retried_without_doubling() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let ingest = Weir::start(&config(&tansu, &clickhouse, &redis, false))?;
    let processor = Weir::start_with_env(
        &config(&tansu, &clickhouse, &redis, true),
        &[("WEIR_FAILPOINT", "insert_error:profile_viewed:2")],
    )?;
    processor.wait_for_partitions(Duration::from_secs(30))?;

    let mut sent = Sent::default();
    for chunk in 0..20 {
        let batch: Vec<Value> = (0..100).map(|i| sent.event(chunk * 100 + i)).collect();
        ingest.post(&batch).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let want = sent.kept.len() as u64;
    let started = Instant::now();
    while clickhouse
        .count("SELECT count() FROM crash.profile_viewed")
        .await?
        < sent.views.len() as u64
        || clickhouse.count("SELECT count() FROM crash.events").await? < want
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("rows missing; log:\n{}", processor.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let errors = weir_tests::metric(
        &processor.metrics().await?,
        "weir_sink_errors_total",
        &[("sink", "clickhouse")],
    );
    assert!(errors >= 1.0, "the failed attempt is counted");
    clickhouse
        .assert_each_once(&[
            ("crash.events", want),
            ("crash.profile_viewed", sent.views.len() as u64),
        ])
        .await
}

/// ClickHouse commits an INSERT into `events` but its answer never reaches weir (a
/// proxy owned by the test closes the connection once ClickHouse answered). weir sees
/// an error and retries; the retry must look again at what ClickHouse holds and write
/// only what is missing, not the whole batch a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_insert_answer_does_not_double_rows() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let upstream = SocketAddr::from(([127, 0, 0, 1], clickhouse.http_port));
    let cutter = AnswerCutter::start(upstream, "INSERT INTO `events`(", 1).await?;
    let cfg = config(&tansu, &clickhouse, &redis, true).replace(&clickhouse.url(), &cutter.url());
    let processor = Weir::start(&cfg)?;
    processor.wait_for_partitions(Duration::from_secs(30))?;

    let mut sent = Sent::default();
    for chunk in 0..10 {
        let batch: Vec<Value> = (0..100).map(|i| sent.event(chunk * 100 + i)).collect();
        processor.post(&batch).await?;
    }
    let want = sent.kept.len() as u64;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM crash.events",
            want,
            Duration::from_secs(60),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cutter.cut(), 1, "an INSERT's answer was lost");
    let metrics = processor.metrics().await?;
    assert!(
        weir_tests::metric(
            &metrics,
            "weir_sink_errors_total",
            &[("sink", "clickhouse")]
        ) >= 1.0,
        "weir saw the lost answer as a failed attempt"
    );
    assert!(
        weir_tests::metric(&metrics, "weir_replayed_rows_skipped_total", &[]) > 0.0,
        "the retry found the rows the lost INSERT had written"
    );
    clickhouse
        .assert_each_once(&[
            ("crash.events", want),
            ("crash.dead_letters", sent.rejected.len() as u64),
            ("crash.profile_viewed", sent.views.len() as u64),
        ])
        .await
}

/// Kafka stores a produce request but its answer never reaches weir (a proxy owned by
/// the test closes the connection once the broker handled the request), so librdkafka
/// sends the records again. The ingest producer and the topic sink's are idempotent:
/// the broker recognises the resend by its producer id and sequence numbers and
/// stores each record once. (Deduplication would hide a doubled ingest record from
/// the tables; the topics themselves are what is counted here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_produce_answer_does_not_double_records() -> Result<()> {
    let port = weir_tests::free_port();
    let upstream = SocketAddr::from(([127, 0, 0, 1], port));
    // The first produce is ingest's record, the second the topic sink's.
    let cutter = KafkaCutter::start(upstream, 0, 2).await?;
    let tansu = Tansu::start_on(port, Some(cutter.addr.port()))?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let cfg = config(&tansu, &clickhouse, &redis, true)
        + r#"
[[pipeline.topic]]
name = "signups"
topic = "weir.signups"
events = ["signup_completed"]
"#;
    let weir = Weir::start(&cfg)?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let batch: Vec<Value> = (0..10)
        .map(|i| json!({"name": "signup_completed", "event_id": format!("lp{i}"), "user_id": format!("u{i}")}))
        .collect();
    weir.post(&batch).await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM crash.events",
            10,
            Duration::from_secs(60),
        )
        .await?;
    let started = Instant::now();
    while cutter.cut() < 2 {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "{} produce answers cut, want 2; log:\n{}",
                cutter.cut(),
                weir.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bootstrap = tansu.bootstrap();
    let ingested = weir_tests::read_topic(&bootstrap, "weir.events").await?;
    assert_eq!(ingested.len(), 1, "the request's record stored once");
    let forwarded = weir_tests::read_topic(&bootstrap, "weir.signups").await?;
    let ids: BTreeSet<&[u8]> = forwarded.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(
        (forwarded.len(), ids.len()),
        (10, 10),
        "each event forwarded once"
    );
    clickhouse.assert_each_once(&[("crash.events", 10)]).await
}

/// A batch whose plugin work takes longer than `max.poll.interval.ms` (6 s here: a
/// plugin that runs every call with a `loop` event to its 2 s deadline, and the calls
/// that split such a batch to find the event: about 37 s). If the processor stopped
/// polling meanwhile, librdkafka would leave the group, its partitions would go to a
/// new owner (itself, rejoining) while it still wrote the batch, and its commit would
/// fail (measured before the fix: "Application maximum poll interval (6000ms)
/// exceeded", all 4 partitions revoked, the commit refused as UnknownMemberId). The
/// processor keeps polling between plugin calls, so the instance keeps its
/// partitions, and every event lands once. More than a batch arrives meanwhile: the
/// processor stops reading then, and a second later pauses consumption and polls on
/// (without that it would not poll for the rest of the batch, and be evicted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_keeps_the_instance_in_its_group() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let cfg = format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "slow"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
properties = {{ "max.poll.interval.ms" = "6000" }}
[clickhouse]
url = "{}"
database = "slow"
[processor]
flush_max_events = 1000
flush_interval_ms = 500
plugin_batch_size = 20
[[pipeline.plugin]]
name = "hostile"
path = "{}"
deadline_ms = 2000
quarantine_after = 1000
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        weir_tests::plugin_path("hostile").display(),
    ) + &redis.section();
    let weir = Weir::start(&cfg)?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    // Idle for longer than max.poll.interval.ms first: waiting for records must count
    // as polling too.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let started = Instant::now();
    // One request: one flush, with four `loop` events among 200 (each fails its call
    // at the deadline, then again as the call is split to find it).
    let batch: Vec<Value> = (0..204)
        .map(|i| {
            let name = if i % 51 == 50 { "loop" } else { "app_opened" };
            json!({"name": name, "event_id": format!("s{i:03}"), "user_id": "u1"})
        })
        .collect();
    weir.post(&batch).await?;
    // While that batch runs: 1,100 more events, over `flush_max_events`.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for r in 0..11 {
        let more: Vec<Value> = (0..100)
            .map(|i| json!({"name": "app_opened", "event_id": format!("m{r:02}{i:03}"), "user_id": "u2"}))
            .collect();
        weir.post(&more).await?;
    }
    clickhouse
        .wait_for_count(
            "SELECT count() FROM slow.dead_letters",
            4,
            Duration::from_secs(120),
        )
        .await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM slow.events",
            1300,
            Duration::from_secs(30),
        )
        .await?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = weir.metrics().await?;
    let flush = weir_tests::metric(&metrics, "weir_processor_flush_duration_seconds_sum", &[]);
    assert!(
        flush > 6.0,
        "the batch took longer than max.poll.interval.ms ({flush:.1} s of flushes, {took:?} in all)"
    );
    weir.assert_kept_partitions(&metrics)?;
    clickhouse
        .assert_each_once(&[("slow.events", 1300), ("slow.dead_letters", 4)])
        .await
}

/// ClickHouse commits an INSERT into `events` and its answer never comes: a proxy
/// owned by the test keeps the connection open and silent for 30 s. Without a bound the
/// processor would wait inside its write, poll nothing, and leave its group after
/// `max.poll.interval.ms` (6 s here). The attempt is abandoned after
/// `write_timeout_ms` (2 s) and retried after a fresh look at what ClickHouse holds
/// (the silent INSERT was committed): the instance keeps its partitions and every event
/// lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_answer_never_comes_is_abandoned_and_retried() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let upstream = SocketAddr::from(([127, 0, 0, 1], clickhouse.http_port));
    let cutter = AnswerCutter::start_holding(
        upstream,
        "INSERT INTO `events`(",
        1,
        Duration::from_secs(30),
    )
    .await?;
    let cfg = config(&tansu, &clickhouse, &redis, true)
        .replace(&clickhouse.url(), &cutter.url())
        .replace(
            "session_timeout_ms = 6000\n",
            "session_timeout_ms = 6000\nproperties = { \"max.poll.interval.ms\" = \"6000\" }\n",
        )
        .replace(
            "flush_interval_ms = 100\n",
            "flush_interval_ms = 100\nwrite_timeout_ms = 2000\n",
        );
    let processor = Weir::start(&cfg)?;
    processor.wait_for_partitions(Duration::from_secs(30))?;
    let mut sent = Sent::default();
    for chunk in 0..10 {
        let batch: Vec<Value> = (0..100).map(|i| sent.event(chunk * 100 + i)).collect();
        processor.post(&batch).await?;
    }
    let want = sent.kept.len() as u64;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM crash.events",
            want,
            Duration::from_secs(60),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cutter.cut(), 1, "an INSERT's answer never came");
    let metrics = processor.metrics().await?;
    processor.assert_kept_partitions(&metrics)?;
    assert!(
        weir_tests::metric(&metrics, "weir_replayed_rows_skipped_total", &[]) > 0.0,
        "the retry found the rows the silent INSERT had written"
    );
    clickhouse
        .assert_each_once(&[
            ("crash.events", want),
            ("crash.dead_letters", sent.rejected.len() as u64),
            ("crash.profile_viewed", sent.views.len() as u64),
        ])
        .await
}

/// The processor writes one batch while it processes the next: a backlog of two
/// batches (800 events, `flush_max_events = 400`) waits in Kafka when the processor
/// starts, and ClickHouse's answer to the first batch's INSERT into `events` hangs (a
/// proxy owned by the test holds it 20 s; the attempt is abandoned after
/// `write_timeout_ms`, 8 s). While the first batch waits for ClickHouse, the plugins
/// have processed the second (a processor that runs one batch at a time would not
/// start it before the first is written); the second is written only after the
/// first, and every event lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_batch_is_processed_while_a_batch_is_written() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let mut sent = Sent::default();
    {
        let ingest = Weir::start(&config(&tansu, &clickhouse, &redis, false))?;
        for chunk in 0..8 {
            let batch: Vec<Value> = (0..100).map(|i| sent.event(chunk * 100 + i)).collect();
            ingest.post(&batch).await?;
        }
    }
    let upstream = SocketAddr::from(([127, 0, 0, 1], clickhouse.http_port));
    let cutter = AnswerCutter::start_holding(
        upstream,
        "INSERT INTO `events`(",
        1,
        Duration::from_secs(20),
    )
    .await?;
    let cfg = config(&tansu, &clickhouse, &redis, true)
        .replace(&clickhouse.url(), &cutter.url())
        .replace(
            "flush_interval_ms = 100\n",
            "flush_interval_ms = 100\nwrite_timeout_ms = 8000\n",
        );
    let processor = Weir::start(&cfg)?;
    weir_tests::wait_until(
        "the first INSERT's answer held",
        Duration::from_secs(60),
        || cutter.cut() == 1,
    )?;
    let held = Instant::now();
    // Every event of both batches through the first plugin, in 5 s of the 8 the
    // first batch's write is held.
    processor.wait_for_metric(
        "weir_plugin_events_total",
        &[("plugin", "enrich")],
        800.0,
        Duration::from_secs(5),
    )?;
    let rows = clickhouse.count("SELECT count() FROM crash.events").await?;
    let want = sent.kept.len() as u64;
    assert!(
        held.elapsed() < Duration::from_secs(8) && rows < want,
        "the second batch was written before the first was acknowledged ({rows} of {want} rows)"
    );
    let tables = [
        ("crash.events", want),
        ("crash.dead_letters", sent.rejected.len() as u64),
        ("crash.profile_viewed", sent.views.len() as u64),
    ];
    // The second batch's three INSERTs land one after the other.
    for (table, n) in tables {
        let sql = format!("SELECT count() FROM {table}");
        clickhouse
            .wait_for_count(&sql, n, Duration::from_secs(60))
            .await?;
    }
    let metrics = processor.metrics().await?;
    processor.assert_kept_partitions(&metrics)?;
    clickhouse.assert_each_once(&tables).await
}
