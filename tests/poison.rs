//! Poison events: an event a sink can never take (ClickHouse refuses its row for the
//! value it carries, the broker refuses its record as too large) must not stall the
//! processor. It goes to `dead_letters` with stage `sink`, the sink and the server's
//! reason; every other event of its batch lands once, and so does everything after
//! it. A crash between the write and the commit replays the batch: the refusal is
//! found again and its dead letter is not written twice.
//!
//! The refusals are real ones from real servers: a column an analyst added to
//! ClickHouse's tables (`MATERIALIZED toUInt8(...)` of a property) that cannot parse
//! some events' value, a materialized view that cannot, and a topic sink whose
//! `max_record_bytes` is below an event's record.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use weir_tests::{ClickHouse, Redis, Tansu, WRITE_KEY, Weir, engagement_pipeline};

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis, db: &str, extra: &str) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "poison"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "{db}"
[redis]
url = "{}"
[processor]
flush_max_events = 2000
flush_interval_ms = 100
retry_backoff_ms = 200
{}
{extra}
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        redis.url(),
        engagement_pipeline(),
    )
}

/// View `n`: a digit `code` and `source` unless it is poison for `events` (`code`
/// "n/a") or for the routed `profile_viewed` table (`source` "n/a").
fn view(n: usize, poison_events: &BTreeSet<usize>, poison_rows: &BTreeSet<usize>) -> Value {
    let code = if poison_events.contains(&n) {
        "n/a".to_owned()
    } else {
        (n % 10).to_string()
    };
    let source = if poison_rows.contains(&n) {
        "n/a".to_owned()
    } else {
        (n % 3).to_string()
    };
    json!({"name": "profile_viewed", "event_id": format!("v{n:05}"), "user_id": format!("u{}", n % 50),
           "properties": {"profile_id": format!("p{}", n % 20), "code": code, "source": source}})
}

/// Posts views `ns` in requests of 250.
async fn post_views(
    weir: &Weir,
    ns: std::ops::Range<usize>,
    poison_events: &BTreeSet<usize>,
    poison_rows: &BTreeSet<usize>,
) -> Result<()> {
    let views: Vec<Value> = ns.map(|n| view(n, poison_events, poison_rows)).collect();
    for batch in views.chunks(250) {
        weir.post(batch).await?;
    }
    Ok(())
}

/// `(event_id, plugin, reason)` of every dead letter, sorted.
async fn dead_letters(clickhouse: &ClickHouse, db: &str) -> Result<Vec<(String, String, String)>> {
    let text = clickhouse
        .query(&format!(
            "SELECT event_id, stage, plugin, reason FROM {db}.dead_letters ORDER BY event_id, plugin"
        ))
        .await?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.splitn(4, '\t').collect();
        if cols.len() != 4 || cols[1] != "sink" {
            bail!("unexpected dead letter: {line}");
        }
        out.push((cols[0].to_owned(), cols[2].to_owned(), cols[3].to_owned()));
    }
    Ok(out)
}

/// Three events whose `code` the `events` table cannot parse and two whose `source`
/// `profile_viewed` cannot, in the first batch: each is set aside by the table that
/// refused it (and written to the other), the rest of the batch and every later one
/// land once. The processor is SIGKILLed right after that first batch was written,
/// before its commit: the replay refuses the same events again and writes no dead
/// letter twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_clickhouse_refuses_are_dead_lettered_and_the_rest_lands_once() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let processor_config = config(&tansu, &clickhouse, &redis, "poison", "");
    let mut processor =
        Weir::start_with_env(&processor_config, &[("WEIR_FAILPOINT", "after_write:1")])?;
    processor.wait_for_partitions(Duration::from_secs(30))?;
    // What an analyst adds: a typed copy of a property, and of a routed column.
    clickhouse
        .query("ALTER TABLE poison.events ADD COLUMN code UInt8 MATERIALIZED toUInt8(visitParamExtractString(properties, 'code'))")
        .await?;
    clickhouse
        .query("ALTER TABLE poison.profile_viewed ADD COLUMN source_code UInt8 MATERIALIZED toUInt8(ifNull(source, '0'))")
        .await?;

    let ingest_config = processor_config.replace("[processor]\n", "[processor]\nenabled = false\n");
    let ingest = Weir::start(&ingest_config)?;
    let poison_events: BTreeSet<usize> = [3, 117, 240].into();
    let poison_rows: BTreeSet<usize> = [5, 199].into();
    // The first request (one batch of the processor) holds all the poison.
    post_views(&ingest, 0..250, &poison_events, &poison_rows).await?;
    tokio::task::block_in_place(|| processor.wait_for_exit(Duration::from_secs(60)))?;
    // The first flush holds the first record at least, and with it poison.
    let before = dead_letters(&clickhouse, "poison").await?;
    assert!(!before.is_empty(), "events were set aside before the crash");

    processor.env.clear();
    tokio::task::block_in_place(|| processor.restart())?;
    post_views(&ingest, 250..1000, &BTreeSet::new(), &BTreeSet::new()).await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM poison.events",
            1000 - 3,
            Duration::from_secs(60),
        )
        .await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM poison.profile_viewed",
            1000 - 2,
            Duration::from_secs(30),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    clickhouse
        .assert_each_once(&[
            ("poison.events", 1000 - 3),
            ("poison.profile_viewed", 1000 - 2),
            ("poison.dead_letters", 5),
        ])
        .await?;
    let dead = dead_letters(&clickhouse, "poison").await?;
    let want: Vec<(String, String)> = [
        (3, "clickhouse:events"),
        (5, "clickhouse:profile_viewed"),
        (117, "clickhouse:events"),
        (199, "clickhouse:profile_viewed"),
        (240, "clickhouse:events"),
    ]
    .into_iter()
    .map(|(n, sink)| (format!("v{n:05}"), sink.to_owned()))
    .collect();
    let got: Vec<(String, String)> = dead
        .iter()
        .map(|(e, p, _)| (e.clone(), p.clone()))
        .collect();
    assert_eq!(got, want);
    for (_, _, reason) in &dead {
        assert!(
            // (TabSeparated escapes the quotes around n/a.)
            reason.contains("Cannot parse string") && reason.contains("n/a"),
            "ClickHouse's reason recorded: {reason}"
        );
    }
    // The poison events missing from one table are in the other.
    let events_of = |table: &str, ids: &BTreeSet<usize>| {
        let list: Vec<String> = ids.iter().map(|n| format!("'v{n:05}'")).collect();
        format!(
            "SELECT count() FROM poison.{table} WHERE event_id IN ({})",
            list.join(",")
        )
    };
    assert_eq!(
        clickhouse
            .count(&events_of("profile_viewed", &poison_events))
            .await?,
        3
    );
    assert_eq!(
        clickhouse.count(&events_of("events", &poison_rows)).await?,
        2
    );
    let refused =
        processor.metric_now("weir_sink_refusals_total", &[("sink", "clickhouse:events")]);
    assert_eq!(refused, 3.0, "the replay refused the same events again");
    Ok(())
}

/// A materialized view on `events` that cannot parse one event's value makes
/// ClickHouse answer the INSERT with an error after it wrote the rows to `events`
/// (views run after the table's block is written). weir must see that the rows are
/// stored, write none again and go on: no stall, no duplicate, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_refuses_a_block_neither_stalls_nor_doubles_it() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis, "poisonmv", ""))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    clickhouse
        .query(
            "CREATE MATERIALIZED VIEW poisonmv.codes ENGINE = MergeTree ORDER BY event_id AS \
             SELECT event_id, toUInt8(visitParamExtractString(properties, 'code')) AS code FROM poisonmv.events",
        )
        .await?;
    post_views(&weir, 0..1000, &[42].into(), &BTreeSet::new()).await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM poisonmv.events",
            1000,
            Duration::from_secs(60),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    clickhouse
        .assert_each_once(&[
            ("poisonmv.events", 1000),
            ("poisonmv.profile_viewed", 1000),
            ("poisonmv.dead_letters", 0),
        ])
        .await?;
    Ok(())
}

/// A topic sink whose records may be at most 1,000 bytes: the events whose record is
/// larger go to `dead_letters` (stage `sink`, `topic:big`), the others are forwarded
/// once, and `events` holds all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_producer_refuses_are_dead_lettered() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let topic = r#"
[[pipeline.topic]]
name = "big"
topic = "weir.views"
events = ["profile_viewed"]
max_record_bytes = 1000
"#;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis, "poisontopic", topic))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let large: BTreeSet<usize> = [7, 50, 93].into();
    let views: Vec<Value> = (0..200)
        .map(|n| {
            let mut v = view(n, &BTreeSet::new(), &BTreeSet::new());
            if large.contains(&n) {
                v["properties"]["note"] = json!("x".repeat(2000));
            }
            v
        })
        .collect();
    weir.post(&views).await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM poisontopic.dead_letters",
            3,
            Duration::from_secs(60),
        )
        .await?;
    let records = weir_tests::read_topic(&tansu.bootstrap(), "weir.views").await?;
    let mut forwarded = BTreeSet::new();
    for (_, payload) in &records {
        let event: Value = serde_json::from_slice(payload)?;
        let id = event["event_id"].as_str().unwrap_or_default().to_owned();
        assert!(forwarded.insert(id.clone()), "{id} forwarded twice");
    }
    let want: BTreeSet<String> = (0..200)
        .filter(|n| !large.contains(n))
        .map(|n| format!("v{n:05}"))
        .collect();
    assert_eq!(forwarded, want);
    let dead = dead_letters(&clickhouse, "poisontopic").await?;
    let ids: Vec<&str> = dead.iter().map(|(e, _, _)| e.as_str()).collect();
    assert_eq!(ids, ["v00007", "v00050", "v00093"]);
    for (_, plugin, reason) in &dead {
        assert_eq!(plugin, "topic:big");
        assert!(
            reason.contains("weir.views") && reason.to_lowercase().contains("too large"),
            "{reason}"
        );
    }
    clickhouse
        .assert_each_once(&[("poisontopic.events", 200)])
        .await?;
    Ok(())
}

/// Increments Redis can never take: `profile_views` of profile `p3` holds a string
/// and that of `p7` a value at the edge of 64 bits (what an operator's
/// mistake or a counter that grew for years leaves). The events that would count
/// them go to `dead_letters` (stage `sink`, `counter:profile_views`, Redis' reason);
/// every other view is counted once, and nothing stalls. The processor is SIGKILLed
/// right after it wrote the first dead letters, before it applied the rest of the
/// partition: the replay refuses the same increments again and writes no dead letter
/// twice. The second half of the views arrives while Redis is down (deduplication,
/// which holds every flush while Redis is down, is off here): their increments wait
/// past their flush, and Redis refuses them once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_redis_refuses_are_dead_lettered_and_the_rest_counts_once() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let mut redis = Redis::start()?;
    let key = "weir:c:poison:profile_views";
    {
        let client = redis::Client::open(redis.url())?;
        let mut conn = client.get_connection()?;
        redis::cmd("HSET")
            .arg(key)
            .arg("p3")
            .arg("many")
            .arg("p7")
            .arg("9200000000000000000")
            .query::<()>(&mut conn)?;
    }
    let processor_config = config(
        &tansu,
        &clickhouse,
        &redis,
        "poisoncount",
        "[dedup]\nenabled = false\n",
    );
    let mut processor = Weir::start_with_env(
        &processor_config,
        &[("WEIR_FAILPOINT", "after_counter_dead_letters:1")],
    )?;
    processor.wait_for_partitions(Duration::from_secs(30))?;
    let ingest_config = processor_config.replace("[processor]\n", "[processor]\nenabled = false\n");
    let ingest = Weir::start(&ingest_config)?;
    post_views(&ingest, 0..400, &BTreeSet::new(), &BTreeSet::new()).await?;
    tokio::task::block_in_place(|| processor.wait_for_exit(Duration::from_secs(60)))?;
    assert!(
        !dead_letters(&clickhouse, "poisoncount").await?.is_empty(),
        "dead letters were written before the crash"
    );

    processor.env.clear();
    tokio::task::block_in_place(|| processor.restart())?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM poisoncount.dead_letters",
            40,
            Duration::from_secs(60),
        )
        .await?;
    redis.stop();
    post_views(&ingest, 400..800, &BTreeSet::new(), &BTreeSet::new()).await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM poisoncount.events",
            800,
            Duration::from_secs(60),
        )
        .await?;
    tokio::task::block_in_place(|| redis.restart())?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM poisoncount.dead_letters",
            80,
            Duration::from_secs(60),
        )
        .await?;
    let want_counts = || -> std::collections::BTreeMap<String, i64> {
        (0..20)
            .filter(|p| *p != 3 && *p != 7)
            .map(|p| (format!("p{p}"), 40))
            .collect()
    };
    let counted = || -> Result<std::collections::BTreeMap<String, i64>> {
        let client = redis::Client::open(redis.url())?;
        let mut conn = client.get_connection()?;
        let all: std::collections::BTreeMap<String, String> =
            redis::cmd("HGETALL").arg(key).query(&mut conn)?;
        Ok(all
            .into_iter()
            .filter(|(f, _)| f != "p3" && f != "p7")
            .map(|(f, v)| (f, v.parse().unwrap_or(-1)))
            .collect())
    };
    weir_tests::wait_until("every good view counted", Duration::from_secs(30), || {
        counted().is_ok_and(|c| c == want_counts())
    })
    .map_err(|e| anyhow::anyhow!("{e}: counted {:?}", counted()))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(counted()?, want_counts(), "no view counted twice");
    clickhouse
        .assert_each_once(&[
            ("poisoncount.events", 800),
            ("poisoncount.profile_viewed", 800),
            ("poisoncount.dead_letters", 80),
        ])
        .await?;
    let dead = dead_letters(&clickhouse, "poisoncount").await?;
    let want: Vec<String> = (0..800)
        .filter(|n| n % 20 == 3 || n % 20 == 7)
        .map(|n| format!("v{n:05}"))
        .collect();
    let ids: Vec<String> = dead.iter().map(|(e, _, _)| e.clone()).collect();
    assert_eq!(ids, want);
    for (id, plugin, reason) in &dead {
        assert_eq!(plugin, "counter:profile_views");
        let n: usize = id[1..].parse()?;
        let why = if n % 20 == 3 {
            "field p3 holds many, not an integer"
        } else {
            "field p7 would pass the 64-bit range"
        };
        assert!(reason.contains(why), "{id}: {reason}");
    }
    let client = redis::Client::open(redis.url())?;
    let mut conn = client.get_connection()?;
    let untouched: (String, String) = redis::cmd("HMGET")
        .arg(key)
        .arg("p3")
        .arg("p7")
        .query(&mut conn)?;
    assert_eq!(
        untouched,
        ("many".to_owned(), "9200000000000000000".to_owned())
    );
    Ok(())
}
