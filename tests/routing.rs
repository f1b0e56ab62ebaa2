//! Routing and the Redis counter sink, on real services (Tansu, ClickHouse, Redis).
//!
//! The seed scenario: apps post `profile_viewed` (and `post_liked`) events; the
//! `route-engagement` plugin turns each view into a row of the typed `profile_viewed`
//! table and one more view in the `profile_views` counter of the profile (unless the
//! user viewed their own profile). The table and the counters must match what was
//! sent exactly, and a new view must be readable through the counters API within 1 s.
//! A Redis outage, with a SIGKILL of weir in the middle of it, must not stop the
//! ClickHouse writes and must not count anything twice once Redis is back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use weir::config::{PipelineConfig, PluginConfig};
use weir::model::Origin;
use weir::pipeline::route::Routes;
use weir::pipeline::{Pipeline, Stage};
use weir::runtime::Runtime;
use weir_tests::{
    ClickHouse, READ_KEY, Redis, Tansu, WRITE_KEY, Weir, engagement_pipeline, metric, plugin_path,
    repo_root,
};

const PROFILES: usize = 40;

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis, db: &str) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "seed"
write_keys = ["{WRITE_KEY}"]
read_keys = ["{READ_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "{db}"
[redis]
url = "{}"
timeout_ms = 500
[processor]
flush_max_events = 2000
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

/// What a set of posted events must produce.
#[derive(Default, Debug)]
struct Expected {
    /// Rows of `profile_viewed` per profile (every accepted view).
    rows: BTreeMap<String, u64>,
    /// `profile_views` per profile (views of someone else's profile).
    views: BTreeMap<String, i64>,
    likes: BTreeMap<String, i64>,
    /// Events in `events`.
    kept: u64,
    /// Views without a user: refused by the JSON Schema before any plugin.
    schema_rejected: u64,
}

/// Event `n` of a run tagged `tag`: mostly views (1 in 9 a self view, 1 in 13 without
/// a user, which `enrich` rejects and nothing may count), some likes.
fn event(tag: &str, n: usize, exp: &mut Expected) -> Value {
    let id = format!("{tag}-{n:06}");
    let profile = format!("p{}", n % PROFILES);
    if n % 5 == 4 {
        let post = format!("post{}", n % 7);
        *exp.likes.entry(post.clone()).or_default() += 1;
        exp.kept += 1;
        return json!({"name": "post_liked", "event_id": id, "user_id": format!("u{n}"), "properties": {"post_id": post}});
    }
    if n.is_multiple_of(13) {
        exp.schema_rejected += 1;
        return json!({"name": "profile_viewed", "event_id": id, "properties": {"profile_id": profile}});
    }
    let viewer = if n.is_multiple_of(9) {
        profile.clone()
    } else {
        format!("u{}", n % 101)
    };
    *exp.rows.entry(profile.clone()).or_default() += 1;
    if viewer != profile {
        *exp.views.entry(profile.clone()).or_default() += 1;
    }
    exp.kept += 1;
    json!({"name": "profile_viewed", "event_id": id, "user_id": viewer,
           "properties": {"profile_id": profile, "source": if n.is_multiple_of(2) { "search" } else { "feed" }}})
}

async fn post_events(weir: &Weir, tag: &str, count: usize, exp: &mut Expected) -> Result<()> {
    let events: Vec<Value> = (0..count).map(|n| event(tag, n, exp)).collect();
    for batch in events.chunks(250) {
        weir.post(batch).await?;
    }
    Ok(())
}

async fn counter(
    http: &reqwest::Client,
    weir: &Weir,
    name: &str,
    key: &str,
    query: &str,
) -> Result<(u16, Value)> {
    let resp = http
        .get(format!("{}{query}", weir.counter_url(name, key)))
        .bearer_auth(READ_KEY)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Every counter of `want` through the API; the first difference, if any.
async fn counters_differ(
    http: &reqwest::Client,
    weir: &Weir,
    name: &str,
    want: &BTreeMap<String, i64>,
) -> Result<Option<String>> {
    for (key, value) in want {
        let (status, body) = counter(http, weir, name, key, "").await?;
        if status != 200 || body["value"] != json!(value) {
            return Ok(Some(format!("{name}/{key}: {status} {body}, want {value}")));
        }
    }
    Ok(None)
}

async fn wait_for_counters(
    http: &reqwest::Client,
    weir: &Weir,
    exp: &Expected,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let views = counters_differ(http, weir, "profile_views", &exp.views).await?;
        let likes = counters_differ(http, weir, "post_likes", &exp.likes).await?;
        match views.or(likes) {
            None => return Ok(()),
            Some(diff) if started.elapsed() > timeout => {
                bail!(
                    "counters differ after {timeout:?}: {diff}\nlog:\n{}",
                    weir.log()
                )
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn wait_for_rows(clickhouse: &ClickHouse, sql: &str, want: u64, weir: &Weir) -> Result<()> {
    let started = Instant::now();
    loop {
        let have = clickhouse.count(sql).await.unwrap_or(0);
        if have >= want {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{sql}: {have} of {want} after 60 s; log:\n{}", weir.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn table_rows(clickhouse: &ClickHouse, db: &str) -> Result<BTreeMap<String, u64>> {
    let text = clickhouse
        .query(&format!(
            "SELECT profile_id, count() FROM {db}.profile_viewed GROUP BY profile_id ORDER BY profile_id"
        ))
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, n)| (p.to_owned(), n.parse().unwrap_or(0)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_views_land_in_their_table_and_counters_exactly() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis, "seed"))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let http = reqwest::Client::new();
    // The README's materialized view over the routed table, verbatim but for the database.
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    let view = readme
        .split("```sql\n")
        .find_map(|block| {
            block
                .split(";\n")
                .find(|s| s.starts_with("CREATE MATERIALIZED VIEW"))
        })
        .expect("README shows a materialized view")
        .replace("weir.", "seed.");
    clickhouse.query(&view).await?;

    let mut exp = Expected::default();
    post_events(&weir, "seed", 6_000, &mut exp).await?;
    wait_for_rows(
        &clickhouse,
        "SELECT count() FROM seed.events",
        exp.kept,
        &weir,
    )
    .await?;
    wait_for_counters(&http, &weir, &exp, Duration::from_secs(10)).await?;
    let rows: u64 = exp.rows.values().sum();
    wait_for_rows(
        &clickhouse,
        "SELECT count() FROM seed.profile_viewed",
        rows,
        &weir,
    )
    .await?;

    // The typed table: one row per accepted view, typed columns filled, weir's columns
    // pointing back at the event.
    assert_eq!(table_rows(&clickhouse, "seed").await?, exp.rows);
    let row = clickhouse
        .query(
            "SELECT viewer_id, self_view, source, app, plugins FROM seed.profile_viewed \
             WHERE event_id = 'seed-000007'",
        )
        .await?;
    let plugins = clickhouse
        .query("SELECT plugins FROM seed.events WHERE event_id = 'seed-000007'")
        .await?;
    assert!(
        plugins.starts_with("enrich@") && plugins.contains(",route@"),
        "{plugins}"
    );
    assert_eq!(row, format!("u7\t0\tfeed\tseed\t{plugins}"));
    assert_eq!(
        clickhouse
            .count("SELECT count() FROM seed.profile_viewed WHERE self_view = 1")
            .await?,
        exp.rows.values().sum::<u64>() - exp.views.values().sum::<i64>() as u64
    );

    // Views without a user never reached a plugin: the schema refused them, naming
    // the field.
    let refused = clickhouse
        .query(
            "SELECT count(), any(reason) FROM seed.dead_letters WHERE stage = 'schema' AND name = 'profile_viewed'",
        )
        .await?;
    let (count, reason) = refused.split_once('\t').unwrap_or_default();
    assert_eq!(count, exp.schema_rejected.to_string(), "{refused}");
    assert!(
        reason.starts_with(
            "does not match the schema of profile_viewed: /user_id: null is not of type"
        ),
        "{reason}"
    );
    assert_eq!(
        clickhouse
            .count("SELECT count() FROM seed.dead_letters")
            .await?,
        exp.schema_rejected,
        "nothing else is a dead letter"
    );

    // The materialized view agrees with the counters (both leave self views out).
    let daily = clickhouse
        .query(
            "SELECT profile_id, sum(views) FROM seed.profile_views_daily GROUP BY profile_id ORDER BY profile_id",
        )
        .await?;
    let daily: BTreeMap<String, i64> = daily
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, n)| (p.to_owned(), n.parse().unwrap_or(0)))
        .collect();
    assert_eq!(daily, exp.views, "the README's materialized view");

    // The counters API: per day too, and its refusals.
    let (status, body) = counter(&http, &weir, "profile_views", "p1", "?days=2").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["value"], json!(exp.views["p1"]));
    let days = body["days"].as_array().expect("days");
    assert_eq!(days.len(), 2);
    assert_eq!(
        days[0]["value"],
        json!(exp.views["p1"]),
        "every view is today's"
    );
    assert_eq!(days[1]["value"], json!(0));
    let (status, body) = counter(&http, &weir, "profile_views", "nobody", "").await?;
    assert_eq!((status, body["value"].clone()), (200, json!(0)));
    let refusals = [
        (Some(WRITE_KEY), "profile_views", "", 403),
        (Some("rk_unknown_0000000000"), "profile_views", "", 401),
        (None, "profile_views", "", 401),
        (Some(READ_KEY), "logins", "", 404),
        (Some(READ_KEY), "post_likes", "?days=3", 400),
        (Some(READ_KEY), "profile_views", "?days=9999", 400),
        (Some(READ_KEY), "profile_views", "?day=1", 400),
    ];
    for (key, name, query, want) in refusals {
        let mut req = http.get(format!("{}{query}", weir.counter_url(name, "p1")));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await?;
        assert_eq!(status, want, "{key:?} {name}{query}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }

    // Freshness: a new view is readable through the API within 1 s of its POST.
    let mut latencies = Vec::new();
    for i in 0..5 {
        let before = exp.views["p3"];
        let started = Instant::now();
        weir.post(
            &[json!({"name": "profile_viewed", "user_id": "fresh", "properties": {"profile_id": "p3"}})],
        )
        .await?;
        loop {
            let (_, body) = counter(&http, &weir, "profile_views", "p3", "").await?;
            if body["value"] == json!(before + 1) {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("view {i} not counted after 10 s: {body}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(started.elapsed());
        exp.views.insert("p3".into(), before + 1);
    }
    eprintln!("POST -> counter visible: {latencies:?}");
    let worst = latencies.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_secs(1),
        "a view took {worst:?} to show"
    );

    // The metrics agree with what was sent.
    // (Counters may show before ClickHouse acknowledged the same batch: wait for it.)
    let started = Instant::now();
    let metrics = loop {
        let metrics = weir.metrics().await?;
        let written = metric(
            &metrics,
            "weir_sink_rows_total",
            &[("table", "profile_viewed")],
        );
        if written as u64 >= rows + 5 || started.elapsed() > Duration::from_secs(10) {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let counted: i64 = exp.views.values().sum::<i64>() + exp.likes.values().sum::<i64>();
    assert_eq!(
        metric(&metrics, "weir_counter_increments_total", &[]) as i64,
        counted
    );
    assert_eq!(
        metric(
            &metrics,
            "weir_sink_rows_total",
            &[("table", "profile_viewed")]
        ) as u64,
        rows + 5
    );
    assert_eq!(
        metric(&metrics, "weir_counter_pending_increments", &[]),
        0.0
    );
    assert_eq!(
        metric(
            &metrics,
            "weir_schema_failures_total",
            &[("event", "profile_viewed")]
        ) as u64,
        exp.schema_rejected
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_and_a_crash_neither_stop_clickhouse_nor_double_count() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let mut redis = Redis::start()?;
    // Deduplication lives in Redis too: here it lets events through unchecked while
    // Redis is down (the default waits for it: tests/dedup.rs).
    let cfg = config(&tansu, &clickhouse, &redis, "outage").replace(
        "[processor]",
        "[dedup]\nwhen_unavailable = \"pass\"\n[processor]",
    );
    let mut weir = Weir::start(&cfg)?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let http = reqwest::Client::new();

    let mut exp = Expected::default();
    post_events(&weir, "before", 2_000, &mut exp).await?;
    wait_for_counters(&http, &weir, &exp, Duration::from_secs(20)).await?;

    // Redis goes away: events keep being accepted and written to ClickHouse.
    redis.stop();
    post_events(&weir, "during", 3_000, &mut exp).await?;
    wait_for_rows(
        &clickhouse,
        "SELECT count() FROM outage.events",
        exp.kept,
        &weir,
    )
    .await?;
    let rows: u64 = exp.rows.values().sum();
    wait_for_rows(
        &clickhouse,
        "SELECT count() FROM outage.profile_viewed",
        rows,
        &weir,
    )
    .await?;
    let (status, _) = counter(&http, &weir, "profile_views", "p1", "").await?;
    assert_eq!(status, 503, "counters API while Redis is down");
    let metrics = weir.metrics().await?;
    assert!(metric(&metrics, "weir_counter_pending_increments", &[]) > 0.0);
    assert!(metric(&metrics, "weir_sink_errors_total", &[("sink", "redis")]) > 0.0);
    assert!(metric(&metrics, "weir_dedup_unchecked_events_total", &[]) > 0.0);

    // weir crashes while increments wait: their Kafka offsets were held back, so the
    // new process re-reads them; ClickHouse skips the rows it has, Redis gets them once.
    weir.kill();
    tokio::task::block_in_place(|| weir.restart())?;
    weir.wait_for_partitions(Duration::from_secs(60))?;
    post_events(&weir, "after", 1_000, &mut exp).await?;
    wait_for_rows(
        &clickhouse,
        "SELECT count() FROM outage.events",
        exp.kept,
        &weir,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart()?;
    wait_for_counters(&http, &weir, &exp, Duration::from_secs(30)).await?;

    // Settled: nothing counted twice, nothing written twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_for_counters(&http, &weir, &exp, Duration::from_secs(1)).await?;
    assert_eq!(
        clickhouse
            .count("SELECT count() FROM outage.events")
            .await?,
        exp.kept
    );
    assert_eq!(
        clickhouse
            .count("SELECT uniqExact(event_id) FROM outage.events")
            .await?,
        exp.kept
    );
    assert_eq!(table_rows(&clickhouse, "outage").await?, exp.rows);
    let stored = redis.hgetall("weir:c:seed:profile_views")?;
    assert_eq!(
        stored.values().sum::<i64>(),
        exp.views.values().sum::<i64>()
    );
    assert!(
        metric(
            &weir.metrics().await?,
            "weir_sink_errors_total",
            &[("sink", "redis")]
        ) > 0.0,
        "the outage is counted"
    );
    Ok(())
}

/// A plugin that routes to a table or counter the pipeline does not declare: each such
/// event goes to the dead letters naming the output, the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_to_undeclared_targets_dead_letter_their_event() -> Result<()> {
    let text = format!(
        r#"
name = "p"
[[plugin]]
name = "route"
path = "{}"
config = {{ views_table = "profile_viewd" }}
[[counter]]
name = "profile_views"
[[counter]]
name = "post_likes"
"#,
        plugin_path("route-engagement").display()
    );
    let cfg: PipelineConfig = toml::from_str(&text)?;
    let p: &PluginConfig = &cfg.plugins[0];
    let runtime = Runtime::new()?;
    let plugin = runtime
        .load(
            &p.name,
            &std::fs::read(&p.path)?,
            p.config_json(),
            p.limits(),
        )
        .await?;
    let stage = Stage::new(plugin.instantiate().await?, p);
    let routes = Routes::new(&cfg)?;
    let mut pipeline = Pipeline::new("p".into(), vec![stage], routes.into(), 64);

    let events = [
        ("profile_viewed", json!({"profile_id": "p1"})),
        ("post_liked", json!({"post_id": "x"})),
        ("app_opened", json!({})),
    ];
    let batch = events
        .iter()
        .enumerate()
        .map(|(i, (name, props))| {
            let origin = Origin {
                partition: 0,
                offset: i as i64,
                index: 0,
                received_ms: 0,
            };
            let wire = weir::model::WireEvent {
                event_id: format!("e{i}"),
                name: (*name).into(),
                user_id: Some("u1".into()),
                timestamp_ms: 0,
                properties: serde_json::value::to_raw_value(props).unwrap(),
                context: serde_json::value::to_raw_value(&json!({})).unwrap(),
                id_assigned: false,
            };
            (origin, "app".to_owned(), wire)
        })
        .collect();
    let out = pipeline.run(batch).await;
    assert_eq!(out.dead.len(), 1, "{:?}", out.dead);
    assert_eq!(out.dead[0].event_id, "e0");
    assert!(
        out.dead[0]
            .reason
            .contains("row for table \"profile_viewd\", which the pipeline does not declare"),
        "{}",
        out.dead[0].reason
    );
    assert_eq!(out.kept.len(), 2);
    assert!(out.rows.is_empty());
    assert_eq!(out.counts.len(), 1, "the like is counted");
    assert_eq!(out.counts[0].key, "x");
    Ok(())
}

/// A counter hash that holds another type (here a string an operator wrote by hand):
/// Redis does not roll a script back, so the script checks every increment of the
/// flush before it writes any, and refuses the flush whole. The events whose
/// increments Redis can never take (the views) go to `dead_letters` (stage `sink`,
/// `counter:profile_views`); the likes of the same Kafka record are counted exactly
/// once, and the operator's key is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_redis_cannot_apply_dead_letters_its_events_and_counts_the_rest() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let mut conn = redis::Client::open(redis.url())?.get_connection()?;
    let views_key = "weir:c:seed:profile_views";
    redis::cmd("SET")
        .arg(views_key)
        .arg("not a hash")
        .query::<()>(&mut conn)?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis, "typed"))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;

    // One request (one Kafka record, one script): likes first, so that their
    // increments come first in the script.
    let mut batch: Vec<Value> = (0..10)
        .map(|n| json!({"name": "post_liked", "event_id": format!("l{n}"), "user_id": format!("u{n}"), "properties": {"post_id": "post1"}}))
        .collect();
    batch.extend((0..10).map(|n| json!({"name": "profile_viewed", "event_id": format!("v{n}"), "user_id": format!("u{n}"), "properties": {"profile_id": "p1"}})));
    weir.post(&batch).await?;
    clickhouse
        .wait_for_count(
            "SELECT count() FROM typed.dead_letters WHERE stage = 'sink' AND plugin = 'counter:profile_views' AND event_id LIKE 'v%'",
            10,
            Duration::from_secs(60),
        )
        .await?;
    let want = BTreeMap::from([("post1".to_owned(), 10i64)]);
    let started = Instant::now();
    while redis.hgetall("weir:c:seed:post_likes")? != want {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("likes not counted; log:\n{}", weir.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        redis.hgetall("weir:c:seed:post_likes")?,
        want,
        "counted once"
    );
    let left: String = redis::cmd("GET").arg(views_key).query(&mut conn)?;
    assert_eq!(left, "not a hash");
    clickhouse
        .assert_each_once(&[("typed.events", 20), ("typed.dead_letters", 10)])
        .await?;
    Ok(())
}

/// A topic deleted and created again (here: a broker on memory storage, restarted
/// empty, and the topic made again) starts its offsets at 0, below what Redis stored of
/// the old one: the counters' applied offsets and the topic sink's delivery marks.
/// weir checks each stored offset against the end of its partition's log when it loads
/// it; one at or past the end is from the old topic and is ignored, so the new topic's
/// events are counted and forwarded, each once. (Before, they were taken for replays of
/// the old offsets and skipped: the counters stood still.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_is_counted_and_forwarded_not_taken_for_replays() -> Result<()> {
    let mut tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let cfg = format!(
        "{}\n[[pipeline.topic]]\nname = \"likes\"\ntopic = \"weir.likes\"\nevents = [\"post_liked\"]\n",
        config(&tansu, &clickhouse, &redis, "again")
    );
    let mut weir = Weir::start(&cfg)?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let http = reqwest::Client::new();
    let mut exp = Expected::default();
    post_events(&weir, "old", 3_000, &mut exp).await?;
    wait_for_counters(&http, &weir, &exp, Duration::from_secs(30)).await?;
    let old_likes: i64 = exp.likes.values().sum();
    let forwarded = weir_tests::read_topic(&tansu.bootstrap(), "weir.likes").await?;
    assert_eq!(
        forwarded.len() as i64,
        old_likes,
        "the old topic's likes forwarded"
    );

    // The broker loses its storage; the events topic is made again, empty.
    weir.stop();
    tansu.restart()?;
    tansu.create_topic("weir.events", 4)?;
    weir.restart()?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    post_events(&weir, "new", 1_000, &mut exp).await?;
    // Counted on top of the old counts (Redis kept those), each new event once.
    wait_for_counters(&http, &weir, &exp, Duration::from_secs(30)).await?;
    let new_likes = exp.likes.values().sum::<i64>() - old_likes;
    let forwarded = weir_tests::read_topic(&tansu.bootstrap(), "weir.likes").await?;
    let mut ids: Vec<String> = forwarded
        .iter()
        .map(|(_, payload)| {
            serde_json::from_slice::<Value>(payload).map(|e| e["event_id"].to_string())
        })
        .collect::<Result<_, _>>()?;
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(
        (n, ids.len()),
        (new_likes as usize, new_likes as usize),
        "the new topic's likes forwarded, each once"
    );
    assert!(ids.iter().all(|id| id.starts_with("\"new-")), "{ids:?}");
    let ignored = weir.metric_now("weir_stale_offsets_ignored_total", &[]);
    assert!(
        ignored >= 1.0,
        "the old topic's stored offsets were found past the new logs' ends: {ignored}"
    );
    // And weir's tables hold every event of both topics once.
    wait_for_rows(
        &clickhouse,
        "SELECT count() FROM again.events",
        exp.kept,
        &weir,
    )
    .await?;
    clickhouse
        .assert_each_once(&[("again.events", exp.kept)])
        .await?;
    Ok(())
}
