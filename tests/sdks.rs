//! The tracking SDKs apps already use, unchanged, against a live weir on real services:
//! Segment's `segment-analytics-python` (gzip on) and `@segment/analytics-node`,
//! RudderStack's `rudder-sdk-python` and PostHog's `posthog` (gzip on), as installed from
//! PyPI and npm by `scripts/stack.sh install`. Each sends 13 messages (Segment's:
//! identify, ten tracks, page and screen; PostHog's: ten captures, a pageview, a set and
//! an alias) through a proxy that loses the answer to its first batch (the server
//! stored it; the SDK hears nothing and sends it again). Then every message is in
//! ClickHouse exactly once, with the fields mapped as the README says.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use weir_tests::{
    AnswerCutter, ClickHouse, Lcg, Redis, Tansu, TempDir, WRITE_KEY, Weir, plugin_path,
};

/// Messages each Segment or RudderStack client sends (tests/sdk/python_client.py,
/// node_client.mjs: screen, identify, 10 tracks, page, alias).
const PER_CLIENT: u64 = 14;
/// Events the PostHog client sends (tests/sdk/posthog_client.py: pageview, 10
/// captures, set, alias).
const PER_POSTHOG: u64 = 13;
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "shop"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "sdks"
[processor]
flush_interval_ms = 100
[pipeline]
name = "sdks"
[[pipeline.plugin]]
name = "enrich"
path = "{}"
{}"#,
        tansu.bootstrap(),
        clickhouse.url(),
        plugin_path("enrich").display(),
        redis.section(),
    )
}

/// Runs one SDK client to its end; fails with its output unless it exits 0. Returns
/// its output.
async fn run(name: &str, cmd: &mut tokio::process::Command) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {name} client (run scripts/stack.sh install)"))?;
    let out = tokio::time::timeout(CLIENT_DEADLINE, child.wait_with_output())
        .await
        .with_context(|| format!("the {name} client did not finish in {CLIENT_DEADLINE:?}"))??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("the {name} client failed ({}):\n{text}", out.status);
    }
    println!("{}", text.trim());
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_rudderstack_and_posthog_sdks_land_once_with_their_fields_mapped() -> Result<()> {
    let python = weir_tests::installed("sdk-venv/bin/python")?;
    let node_modules = weir_tests::installed("sdk-node/node_modules")?;
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let run_id = format!("r{}", Lcg::seed() % 1_000_000);
    let scripts = weir_tests::repo_root().join("tests/sdk");

    // ES modules resolve packages from their own directory: the script is copied
    // beside a link to the installed packages.
    let node_dir = TempDir::new("sdk-node");
    std::os::unix::fs::symlink(&node_modules, node_dir.path().join("node_modules"))?;
    let node_script = node_dir.path().join("node_client.mjs");
    std::fs::copy(scripts.join("node_client.mjs"), &node_script)?;

    let mut cutters = Vec::new();
    for sdk in ["segment", "rudder", "node"] {
        // Each client's first batch is stored by weir, and its answer lost.
        let cutter = AnswerCutter::start(weir.ingest, "/v1/batch", 1).await?;
        let mut cmd = if sdk == "node" {
            let mut c = tokio::process::Command::new("node");
            c.arg(&node_script);
            c
        } else {
            let mut c = tokio::process::Command::new(&python);
            c.arg(scripts.join("python_client.py")).arg(sdk);
            c
        };
        cmd.arg(cutter.url()).arg(WRITE_KEY).arg(&run_id);
        run(sdk, &mut cmd).await.with_context(|| weir.log())?;
        cutters.push((sdk, cutter));
    }
    // PostHog's SDK posts to /batch/ and wants UUIDs as ids: it prints those it used.
    let cutter = AnswerCutter::start(weir.ingest, "/batch/", 1).await?;
    let out = run(
        "posthog",
        tokio::process::Command::new(&python)
            .arg(scripts.join("posthog_client.py"))
            .arg(cutter.url())
            .arg(WRITE_KEY)
            .arg(&run_id),
    )
    .await
    .with_context(|| weir.log())?;
    cutters.push(("posthog", cutter));
    let posthog_ids: Vec<String> = out
        .lines()
        .find_map(|l| l.strip_prefix("ids: "))
        .context("the posthog client printed no ids")?
        .split(' ')
        .map(str::to_owned)
        .collect();
    if posthog_ids.len() != PER_POSTHOG as usize {
        bail!("the posthog client printed {} ids", posthog_ids.len());
    }
    for (sdk, cutter) in &cutters {
        if cutter.cut() != 1 {
            bail!("{sdk}: {} answers were cut, want 1", cutter.cut());
        }
    }

    let want = 3 * PER_CLIENT + PER_POSTHOG;
    let quoted: Vec<String> = posthog_ids.iter().map(|id| format!("'{id}'")).collect();
    let ours = format!(
        "sdks.events WHERE (event_id LIKE '{run_id}-%' OR event_id IN ({}))",
        quoted.join(",")
    );
    clickhouse
        .wait_for_count(
            &format!("SELECT count() FROM {ours}"),
            want,
            Duration::from_secs(60),
        )
        .await
        .with_context(|| weir.log())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rows, events) = clickhouse
        .query(&format!("SELECT count(), uniqExact(event_id) FROM {ours}"))
        .await?
        .split_once('\t')
        .map(|(r, e)| (r.to_owned(), e.to_owned()))
        .context("two numbers")?;
    if (rows.as_str(), events.as_str()) != (want.to_string().as_str(), want.to_string().as_str()) {
        bail!("{rows} rows of {events} distinct events; want each of {want} once");
    }
    // Every request was sent twice at least once: the copies were dropped.
    let dropped = weir.metric_now("weir_dedup_duplicates_total", &[]);
    if dropped < 1.0 {
        bail!("no resent event was dropped (weir_dedup_duplicates_total = {dropped})");
    }

    // The mapping, per SDK: name, user, a property, the anonymous id, the name as
    // sent, the id an alias replaces.
    for sdk in ["segment", "rudder", "node"] {
        let row = |n: u32, property: &'static str| {
            let sql = format!(
                "SELECT name, user_id, visitParamExtractRaw(properties, '{property}'), \
                 visitParamExtractString(context, 'anonymous_id'), \
                 visitParamExtractString(context, 'event_name'), \
                 visitParamExtractString(context, 'previous_id'), 'end' \
                 FROM sdks.events WHERE event_id = '{run_id}-{sdk}-{n}'"
            );
            let ch = &clickhouse;
            async move { ch.query(&sql).await }
        };
        let expect: [(u32, &str, [&str; 7]); 5] = [
            (
                13,
                "name",
                ["screen", "anon-2", r#""Feed""#, "anon-2", "", "", "end"],
            ),
            (
                1,
                "plan",
                ["identify", "user-1", r#""pro""#, "anon-1", "", "", "end"],
            ),
            (
                2,
                "total",
                [
                    "order_completed",
                    "user-1",
                    "2",
                    "",
                    "Order Completed",
                    "",
                    "end",
                ],
            ),
            (12, "path", ["page", "user-1", r#""/""#, "", "", "", "end"]),
            (
                14,
                "enriched_by",
                ["alias", "user-1", r#""enrich""#, "", "", "anon-2", "end"],
            ),
        ];
        for (n, property, want) in expect {
            let got = row(n, property).await?;
            let fields: Vec<&str> = got.split('\t').collect();
            if fields != want {
                bail!("{sdk} message {n}: stored {fields:?}, want {want:?}");
            }
        }
    }
    // The pipeline's plugin saw them as it sees weir's own events: each is stamped.
    let unenriched = clickhouse
        .count(&format!(
            "SELECT count() FROM {ours} AND visitParamExtractString(properties, 'enriched_by') != 'enrich'"
        ))
        .await?;
    if unenriched != 0 {
        bail!("{unenriched} events without the enrich plugin's change");
    }
    // PostHog's: name, user, the name as sent, the id an alias replaces, and a property.
    let posthog = |n: usize, property: &str| {
        let sql = format!(
            "SELECT name, user_id, visitParamExtractString(context, 'event_name'), \
             visitParamExtractString(context, 'previous_id'), \
             visitParamExtractRaw(properties, '{property}'), 'end' \
             FROM sdks.events WHERE event_id = '{}'",
            posthog_ids[n - 1]
        );
        let ch = &clickhouse;
        async move { ch.query(&sql).await }
    };
    let expect = [
        (
            1,
            "total",
            ["user_signed_up", "user-1", "user signed up", "", "1", "end"],
        ),
        (
            11,
            "$current_url",
            [
                "pageview",
                "anon-2",
                "$pageview",
                "",
                r#""https://x/""#,
                "end",
            ],
        ),
        (
            12,
            "$set",
            ["set", "user-1", "$set", "", r#"{"plan":"pro"}"#, "end"],
        ),
        (
            13,
            "alias",
            [
                "create_alias",
                "user-1",
                "$create_alias",
                "anon-2",
                r#""user-1""#,
                "end",
            ],
        ),
    ];
    for (n, property, want) in expect {
        let got = posthog(n, property).await?;
        let fields: Vec<&str> = got.split('\t').collect();
        if fields != want {
            bail!("posthog event {n}: stored {fields:?}, want {want:?}");
        }
    }

    // Identity: anon-1 signed in as user-1 (the Segment SDKs' identify), and anon-2
    // (every SDK's alias); one row per pair.
    let pairs = clickhouse
        .query(
            "SELECT anonymous_id, user_id FROM sdks.identities FINAL \
             WHERE app = 'shop' ORDER BY anonymous_id",
        )
        .await?;
    if pairs != "anon-1\tuser-1\nanon-2\tuser-1" {
        bail!("identities:\n{pairs}\nwant anon-1 and anon-2 as user-1");
    }
    // The README's funnel: user-1 saw a screen as anon-2, then ordered.
    let readme = std::fs::read_to_string(weir_tests::repo_root().join("README.md"))?;
    let funnel = readme
        .split_once("<!-- query: funnel -->\n```sql\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(sql, _)| sql.replace("weir.", "sdks."))
        .context("the README has no funnel query")?;
    let people = clickhouse.query(&funnel).await?;
    if people != "1" {
        bail!("the README's funnel counted {people} people, want 1 (user-1)");
    }
    Ok(())
}
