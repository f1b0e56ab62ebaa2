//! Deduplication of client resends, on real services (Tansu, ClickHouse, Redis).
//!
//! A client here behaves like a tracking SDK: it resends a request whose answer it
//! did not get (a connection cut, a crash of weir), with the same `event_id`s, and it
//! re-batches what it resends (the copy of an event may come alone, or with other
//! events). Every event must still be in `events` (or `dead_letters`) once, in the
//! routed table once and counted once. A negative control turns deduplication off and
//! must see the copies, so that the accounting is known to catch a duplicate.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use weir_tests::{
    ClickHouse, Lcg, Redis, Tansu, WRITE_KEY, Weir, engagement_pipeline, metric, repo_root,
};

const PROFILES: usize = 40;
const APP: &str = "dd";

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis, dedup: bool) -> String {
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
url = "{}"
database = "dd"
[redis]
url = "{}"
[dedup]
enabled = {dedup}
[processor]
flush_max_events = 1000
flush_interval_ms = 100
retry_backoff_ms = 200
[pipeline]
name = "engagement"
[[pipeline.schema]]
event = "profile_viewed"
path = "{}"
{}
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        redis.url(),
        repo_root()
            .join("examples/schemas/profile_viewed.json")
            .display(),
        engagement_pipeline(),
    )
}

/// What the unique events must produce.
#[derive(Default, Debug)]
struct Expected {
    kept: u64,
    dead: u64,
    rows: u64,
    views: BTreeMap<String, i64>,
    likes: BTreeMap<String, i64>,
}

/// Event `n`: views of other users' profiles, likes, and 1 in 10 a view without a
/// user (its schema refuses it: a dead letter).
fn event(n: usize, exp: &mut Expected) -> Value {
    let id = format!("dd-{n:06}");
    let profile = format!("p{}", n % PROFILES);
    if n % 10 == 9 {
        exp.dead += 1;
        return json!({"name": "profile_viewed", "event_id": id, "properties": {"profile_id": profile}});
    }
    exp.kept += 1;
    if n % 5 == 4 {
        let post = format!("post{}", n % 7);
        *exp.likes.entry(post.clone()).or_default() += 1;
        return json!({"name": "post_liked", "event_id": id, "user_id": format!("u{n}"), "properties": {"post_id": post}});
    }
    exp.rows += 1;
    *exp.views.entry(profile.clone()).or_default() += 1;
    json!({"name": "profile_viewed", "event_id": id, "user_id": format!("u{}", n % 101),
           "properties": {"profile_id": profile, "source": "feed"}})
}

/// A tracking SDK's sending side: posts requests until they are accepted, resends
/// some of what it sent (as a client whose answer was lost does), re-batched.
struct Client {
    http: reqwest::Client,
    url: String,
    rng: Lcg,
    /// Requests sent so far (for resends).
    sent: Vec<Vec<Value>>,
    /// Events in accepted requests, copies included.
    posted: usize,
}

impl Client {
    fn new(url: String, seed: u64) -> Self {
        Self {
            http: reqwest::Client::new(),
            url,
            rng: Lcg(seed),
            sent: Vec::new(),
            posted: 0,
        }
    }

    /// Posts until the answer is 202; a connection error or a 5xx is retried with the
    /// same body (the request may have been accepted anyway: that is a resend too).
    async fn post(&mut self, batch: &[Value]) -> Result<()> {
        let started = Instant::now();
        loop {
            let answer = self
                .http
                .post(&self.url)
                .bearer_auth(WRITE_KEY)
                .json(batch)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 202 => {
                    self.posted += batch.len();
                    return Ok(());
                }
                Ok(r) if r.status().is_server_error() => {}
                Ok(r) => bail!("ingest answered {}: {}", r.status(), r.text().await?),
                Err(_) => {}
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!("a request was not accepted within 90 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends `batch`, then, with probability `percent` %, a copy of something sent:
    /// the same request again, an earlier request, half of one with new events, or
    /// one event alone.
    async fn send(&mut self, batch: Vec<Value>, percent: u64) -> Result<()> {
        self.post(&batch).await?;
        self.sent.push(batch);
        if self.rng.next(100) >= percent {
            return Ok(());
        }
        let earlier = self.sent[self.rng.next(self.sent.len() as u64) as usize].clone();
        let copy = match self.rng.next(4) {
            0 => self.sent.last().expect("just sent").clone(),
            1 => earlier,
            2 => earlier[..earlier.len() / 2].to_vec(),
            _ => vec![earlier[self.rng.next(earlier.len() as u64) as usize].clone()],
        };
        self.post(&copy).await
    }
}

/// Sends `n` events in requests of 20, resending `percent` % of them.
async fn send_events(
    client: &mut Client,
    n: usize,
    percent: u64,
    exp: &mut Expected,
) -> Result<()> {
    let events: Vec<Value> = (0..n).map(|i| event(i, exp)).collect();
    for batch in events.chunks(20) {
        client.send(batch.to_vec(), percent).await?;
    }
    Ok(())
}

/// Waits until every unique event is stored, then checks that each is stored and
/// counted once everywhere.
async fn assert_once(
    clickhouse: &ClickHouse,
    redis: &Redis,
    weir: &Weir,
    exp: &Expected,
) -> Result<()> {
    let started = Instant::now();
    let mut stable = None;
    loop {
        let now = (
            clickhouse.rows_and_events("dd.events").await?,
            clickhouse.rows_and_events("dd.dead_letters").await?,
            clickhouse.rows_and_events("dd.profile_viewed").await?,
        );
        let complete = now.0.1 == exp.kept && now.1.1 == exp.dead && now.2.1 == exp.rows;
        // Complete, and unchanged for 2 s: late copies would have landed by then.
        match stable {
            Some((seen, at)) if seen == now && complete => {
                if Instant::now().duration_since(at) > Duration::from_secs(2) {
                    break;
                }
            }
            _ => stable = Some((now, Instant::now())),
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "after 120 s: events {:?}, dead_letters {:?}, profile_viewed {:?} (unique {}, {}, {}); log:\n{}",
                now.0,
                now.1,
                now.2,
                exp.kept,
                exp.dead,
                exp.rows,
                weir.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    clickhouse
        .assert_each_once(&[
            ("dd.events", exp.kept),
            ("dd.dead_letters", exp.dead),
            ("dd.profile_viewed", exp.rows),
        ])
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for (counter, want) in [("profile_views", &exp.views), ("post_likes", &exp.likes)] {
        let key = format!("weir:c:{APP}:{counter}");
        while &redis.hgetall(&key)? != want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let have = redis.hgetall(&key)?;
        if &have != want {
            bail!(
                "{counter}: every event counted once: have {have:?}, want {want:?}; log:\n{}",
                weir.log()
            );
        }
    }
    Ok(())
}

/// Half of the requests are followed by a copy of something already sent: every copy
/// is dropped before the pipeline, and counted as a duplicate of its app. Events sent
/// without an id (ingest makes one) are stored too, without a check in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_events_are_stored_and_counted_once() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis, true))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let seed = Lcg::seed();
    eprintln!("seed {seed}");
    let mut client = Client::new(weir.events_url(), seed);
    let mut exp = Expected::default();
    send_events(&mut client, 2_000, 50, &mut exp).await?;
    let unique = (exp.kept + exp.dead) as usize;
    assert!(
        client.posted > unique + 300,
        "the client resent ({} posted)",
        client.posted
    );
    let with_ids = client.posted;
    let anonymous: Vec<Value> = (0..200)
        .map(|n| json!({"name": "app_opened", "user_id": format!("u{n}")}))
        .collect();
    for batch in anonymous.chunks(20) {
        client.post(batch).await?;
    }
    exp.kept += anonymous.len() as u64;

    assert_once(&clickhouse, &redis, &weir, &exp).await?;
    let metrics = weir.metrics().await?;
    assert_eq!(
        metric(&metrics, "weir_dedup_checked_events_total", &[]),
        with_ids as f64,
        "every event with a client id was checked, and none whose id ingest made"
    );
    assert_eq!(
        metric(&metrics, "weir_dedup_duplicates_total", &[("app", APP)]),
        (with_ids - unique) as f64,
        "every copy is counted as a duplicate of its app"
    );
    Ok(())
}

/// weir is SIGKILLed while a client sends (resending 5 % of its requests, and every
/// request whose answer the crash cut off), then started again: Kafka replays what was
/// not committed (a replay is not a duplicate of itself) and the client's resends are
/// dropped, so every event is still stored and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_across_a_sigkill_are_stored_and_counted_once() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let mut weir = Weir::start(&config(&tansu, &clickhouse, &redis, true))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let seed = Lcg::seed();
    eprintln!("seed {seed}");
    let url = weir.events_url();
    let sender = tokio::spawn(async move {
        let mut client = Client::new(url, seed);
        let mut exp = Expected::default();
        let events: Vec<Value> = (0..6_000).map(|i| event(i, &mut exp)).collect();
        for batch in events.chunks(20) {
            client.send(batch.to_vec(), 5).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::Ok((client.posted, exp))
    });
    // Kill once the processor has written something, while the client still sends.
    tokio::task::block_in_place(|| {
        weir.wait_for_metric(
            "weir_processor_batch_events_count",
            &[],
            3.0,
            Duration::from_secs(60),
        )
    })?;
    weir.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| weir.restart())?;
    let (posted, exp) = sender.await??;
    eprintln!(
        "{posted} events posted for {} unique ones",
        exp.kept + exp.dead
    );
    assert_once(&clickhouse, &redis, &weir, &exp).await
}

/// Redis stops while a client sends (and resends): with the default
/// `dedup.when_unavailable = "wait"` the processor holds the flush, consumption paused,
/// until Redis answers again; then every event is stored and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_holds_the_pipeline_and_doubles_nothing() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let mut redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis, true))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let mut client = Client::new(weir.events_url(), Lcg::seed());
    let mut exp = Expected::default();
    let events: Vec<Value> = (0..1_000).map(|i| event(i, &mut exp)).collect();
    let (before, during) = events.split_at(500);
    for batch in before.chunks(20) {
        client.send(batch.to_vec(), 20).await?;
    }
    clickhouse
        .wait_for_count(
            "SELECT count() FROM dd.events",
            450,
            Duration::from_secs(60),
        )
        .await?;

    redis.stop();
    for batch in during.chunks(20) {
        client.send(batch.to_vec(), 20).await?;
    }
    tokio::task::block_in_place(|| {
        weir.wait_for_metric(
            "weir_processor_pauses_total",
            &[],
            1.0,
            Duration::from_secs(30),
        )
    })?;
    let held = clickhouse.count("SELECT count() FROM dd.events").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        clickhouse.count("SELECT count() FROM dd.events").await?,
        held,
        "nothing is written while the deduplication check cannot run"
    );
    assert!(weir.metric_now("weir_dedup_errors_total", &[]) > 0.0);

    tokio::task::block_in_place(|| redis.restart())?;
    assert_once(&clickhouse, &redis, &weir, &exp).await?;
    assert_eq!(
        weir.metric_now("weir_processor_paused", &[]),
        0.0,
        "resumed"
    );
    Ok(())
}

/// The negative control: with deduplication off, the same resends are stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dedup_resent_events_are_stored_twice() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis, false))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let mut client = Client::new(weir.events_url(), Lcg::seed());
    let mut exp = Expected::default();
    send_events(&mut client, 500, 50, &mut exp).await?;
    let unique = (exp.kept + exp.dead) as usize;
    assert!(client.posted > unique, "the client resent");
    let want = client.posted as u64;
    clickhouse
        .wait_for_count(
            "SELECT (SELECT count() FROM dd.events) + (SELECT count() FROM dd.dead_letters)",
            want,
            Duration::from_secs(60),
        )
        .await?;
    let (all, unique_events) = clickhouse.rows_and_events("dd.events").await?;
    assert!(
        all > unique_events,
        "copies are stored: {all} rows for {unique_events} events"
    );
    assert_eq!(unique_events, exp.kept);
    Ok(())
}

/// The marks webhooks and topic sinks keep of what they delivered (so that a replay
/// skips it), in a real Redis: per sink and partition, moving forward only, shared by
/// every instance of the group, and gone with the group's key only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_marks_move_forward_only_per_sink_and_partition() -> Result<()> {
    use weir::config::RedisConfig;
    use weir::model::Origin;
    use weir::pipeline::dedup::{DedupConfig, RedisMarks};
    use weir::sinks::DeliveryMarks;

    let redis = Redis::start()?;
    let cfg = RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    };
    let marks = RedisMarks::new(&cfg, &DedupConfig::default(), "g", "weir.events")?;
    let none = marks
        .load("webhook:crm", &[0, 1])
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(none, vec![None, None]);
    let at = |partition, offset, index| Origin {
        partition,
        offset,
        index,
        received_ms: 1_765_000_000_000 + offset,
    };

    marks
        .advance("webhook:crm", &[at(0, 41, 7), at(1, 3, 0)])
        .await
        .map_err(anyhow::Error::msg)?;
    // Behind the stored mark (an instance that lost its partition finishing late):
    // nothing moves. At the same offset, a later index moves it.
    marks
        .advance("webhook:crm", &[at(0, 40, 99), at(1, 3, 1)])
        .await
        .map_err(anyhow::Error::msg)?;
    // Another instance of the group (its own connection) reads the same marks.
    let other = RedisMarks::new(&cfg, &DedupConfig::default(), "g", "weir.events")?;
    let got = other
        .load("webhook:crm", &[1, 0, 2])
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(got, vec![Some((1, 3, 1)), Some((0, 41, 7)), None]);
    // Offsets past 2^32 and up to 2^53 - 1 (Lua's exact integers) survive the trip.
    let far = (1i64 << 53) - 1;
    marks
        .advance("webhook:crm", &[at(2, far, 0)])
        .await
        .map_err(anyhow::Error::msg)?;
    marks
        .advance("webhook:crm", &[at(2, far - 1, u32::MAX)])
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        other
            .load("webhook:crm", &[2])
            .await
            .map_err(anyhow::Error::msg)?,
        vec![Some((2, far, 0))]
    );

    // Sinks, groups and topics do not share marks.
    let group = RedisMarks::new(&cfg, &DedupConfig::default(), "g2", "weir.events")?;
    let topic = RedisMarks::new(&cfg, &DedupConfig::default(), "g", "other")?;
    for (store, sink) in [
        (&marks, "topic:signups"),
        (&group, "webhook:crm"),
        (&topic, "webhook:crm"),
    ] {
        let found = store.load(sink, &[0]).await.map_err(anyhow::Error::msg)?;
        assert_eq!(found, vec![None], "{sink}");
    }

    // The hash expires a window after its last change.
    let client = redis::Client::open(redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let ttl: i64 = redis::cmd("TTL")
        .arg("weir:delivered:g:weir.events")
        .query_async(&mut conn)
        .await?;
    assert!(
        (86_300..=86_400).contains(&ttl),
        "the marks' hash expires with the window: TTL {ttl}"
    );

    // A mark keeps the receive time of its record, which tells it from the record at
    // the same offset of a topic created again under the same name.
    let stored: String = redis::cmd("HGET")
        .arg("weir:delivered:g:weir.events")
        .arg("webhook:crm:0")
        .query_async(&mut conn)
        .await?;
    assert_eq!(stored, "41:7:1765000000041");

    // A value that is not a mark is an error that names the key, not a silent skip.
    let _: () = redis::cmd("HSET")
        .arg("weir:delivered:g:weir.events")
        .arg("webhook:crm:5")
        .arg("garbage")
        .query_async(&mut conn)
        .await?;
    let err = marks
        .load("webhook:crm", &[5])
        .await
        .expect_err("a garbage mark is refused");
    assert!(
        err.to_string().contains("webhook:crm:5")
            && err.to_string().contains("not a delivery mark"),
        "{err}"
    );
    Ok(())
}
