//! The plugin sandbox against hostile plugins (built from `tests/plugins/hostile`): an
//! endless loop, a memory bomb, an outcome that repeats its memory, deep recursion, a trap in one event of a batch of
//! 1,000, and a plugin that never returns from a host call. Each time the host
//! survives, the limit fires, only the offending events fail with a reason naming the
//! limit, the others are processed, and the next batch runs.

use std::time::{Duration, Instant};

use serde_json::Value;
use weir::config::{FailurePolicy, PluginConfig};
use weir::model::{Event, FailureKind, Limits, Origin};
use weir::pipeline::{Pipeline, Stage};
use weir::runtime::{Plugin, PluginInstance, Runtime, Verdict};
use weir_tests::plugin_path;

const DEADLINE: Duration = Duration::from_millis(50);
const MEMORY: usize = 16 << 20;

async fn load(name: &str) -> Plugin {
    let bytes = std::fs::read(plugin_path(name)).unwrap();
    let limits = Limits {
        deadline: DEADLINE,
        memory_bytes: MEMORY,
    };
    Runtime::new()
        .unwrap()
        .load(name, &bytes, "{}".into(), limits)
        .await
        .unwrap()
}

fn event(i: usize, name: &str) -> Event {
    Event {
        event_id: format!("e{i}"),
        app: "test".into(),
        name: name.into(),
        user_id: Some(format!("u{i}")),
        timestamp_ms: 1_700_000_000_000 + i as i64,
        properties: format!(r#"{{"i":{i}}}"#),
        context: "{}".into(),
    }
}

/// A batch of `n` ordinary events with `bad` at the given positions.
fn batch(n: usize, bad: &[(usize, &str)]) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let name = bad
                .iter()
                .find(|(at, _)| *at == i)
                .map_or("ok", |(_, name)| *name);
            event(i, name)
        })
        .collect()
}

/// Checks that exactly the `bad` events failed, with a reason containing `why`, and
/// that every other event was processed by the plugin.
fn assert_isolated(verdicts: &[Verdict], events: &[Event], bad: &[usize], why: &str) {
    assert_eq!(verdicts.len(), events.len());
    for (i, v) in verdicts.iter().enumerate() {
        match v {
            Verdict::Failed(failure) if bad.contains(&i) => {
                let reason = &failure.message;
                assert!(
                    reason.contains(why),
                    "event {i}: reason {reason:?} does not name {why:?}"
                )
            }
            Verdict::Keep if !bad.contains(&i) => {
                let e = &events[i];
                assert_eq!(e.event_id, format!("e{i}"));
                let props: Value = serde_json::from_str(&e.properties).unwrap();
                assert_eq!(
                    props["seen"], true,
                    "event {i} was not processed by the plugin"
                );
                assert_eq!(props["i"], i, "event {i} carries another event's data");
            }
            other => panic!("event {i}: unexpected verdict {other:?}"),
        }
    }
}

/// Runs `n` events, the `bad` ones misbehaving, through a fresh hostile instance;
/// checks that exactly the bad ones failed with a reason naming `why` and that the
/// instance's next batch runs normally. Returns the instance and the batch's time.
async fn isolate(n: usize, bad: &[(usize, &str)], why: &str) -> (PluginInstance, Duration) {
    let plugin = load("hostile").await;
    let mut instance = plugin.instantiate().await.unwrap();
    let mut events = batch(n, bad);
    let started = Instant::now();
    let verdicts = instance.process(&mut events).await;
    let took = started.elapsed();
    let positions: Vec<usize> = bad.iter().map(|(at, _)| *at).collect();
    assert_isolated(&verdicts, &events, &positions, why);

    let mut next = batch(10, &[]);
    let verdicts = instance.process(&mut next).await;
    assert_isolated(&verdicts, &next, &[], "");
    (instance, took)
}

#[tokio::test]
async fn a_trap_in_one_event_of_a_batch_of_1000_fails_only_that_event() {
    isolate(1000, &[(617, "panic")], "unreachable").await;
}

#[tokio::test]
async fn an_endless_loop_is_stopped_at_the_deadline() {
    let (_, took) = isolate(64, &[(3, "loop"), (40, "loop")], "deadline exceeded").await;
    // Bisection: each call containing a loop costs one deadline; 64 events, 2 loops.
    assert!(took < DEADLINE * 20, "isolating two loops took {took:?}");
}

#[tokio::test]
async fn a_memory_bomb_is_stopped_by_the_memory_cap() {
    let (instance, _) = isolate(100, &[(99, "alloc")], "memory cap exceeded").await;
    assert!(instance.peak_memory() <= MEMORY);
}

/// An outcome that points at the same megabyte of the plugin's memory 64 times would
/// make the host copy 64 MiB for one event (and a batch of such, gigabytes): what a
/// call hands the host is capped at the plugin's memory cap.
#[tokio::test]
async fn an_outcome_that_repeats_its_memory_is_stopped_at_the_call_cap() {
    isolate(40, &[(21, "amplify")], "more than 16 MiB").await;
}

#[tokio::test]
async fn deep_recursion_is_stopped_by_the_stack_cap() {
    isolate(50, &[(0, "recurse")], "stack overflow").await;
}

#[tokio::test]
async fn a_plugin_that_never_returns_from_a_host_call_is_abandoned() {
    let (_, took) = isolate(20, &[(7, "sleep")], "deadline exceeded").await;
    assert!(
        took < Duration::from_secs(5),
        "abandoning the sleeping call took {took:?}"
    );
}

#[tokio::test]
async fn every_limit_in_one_batch() {
    let plugin = load("hostile").await;
    let mut instance = plugin.instantiate().await.unwrap();
    let bad = [
        (1, "panic"),
        (30, "loop"),
        (77, "alloc"),
        (150, "recurse"),
        (255, "sleep"),
    ];
    let mut events = batch(256, &bad);
    let verdicts = instance.process(&mut events).await;
    let failures: Vec<_> = verdicts
        .iter()
        .filter_map(|v| match v {
            Verdict::Failed(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), bad.len(), "{failures:?}");
    for ((want, kind), got) in [
        ("unreachable", FailureKind::Trap),
        ("deadline", FailureKind::Deadline),
        ("memory cap", FailureKind::MemoryCap),
        ("stack overflow", FailureKind::StackOverflow),
        ("deadline", FailureKind::Deadline),
    ]
    .iter()
    .zip(&failures)
    {
        assert!(got.message.contains(want), "{got:?} should name {want:?}");
        assert_eq!(got.kind, *kind, "{got:?}");
    }
    assert_eq!(
        verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Keep))
            .count(),
        251
    );
}

fn pipeline_config(policy: FailurePolicy) -> PluginConfig {
    let text = format!(
        "name = \"hostile\"\npath = \"{}\"\ndeadline_ms = 50\nquarantine_after = 2\nquarantine_secs = 60\nfailure_policy = \"{}\"\n",
        plugin_path("hostile").display(),
        if policy == FailurePolicy::Open {
            "open"
        } else {
            "closed"
        }
    );
    toml::from_str(&text).unwrap()
}

async fn quarantine_pipeline(policy: FailurePolicy) -> Pipeline {
    let cfg = pipeline_config(policy);
    let runtime = Runtime::new().unwrap();
    let bytes = std::fs::read(&cfg.path).unwrap();
    let plugin = runtime
        .load(&cfg.name, &bytes, cfg.config_json(), cfg.limits())
        .await
        .unwrap();
    let stage = Stage::new(plugin.instantiate().await.unwrap(), &cfg);
    Pipeline::new("p".into(), vec![stage], Default::default(), 16)
}

fn wire_batch(names: &[&str]) -> Vec<(Origin, String, weir::model::WireEvent)> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let origin = Origin {
                partition: 0,
                offset: i as i64,
                index: 0,
                received_ms: 0,
            };
            let e = weir::model::WireEvent {
                event_id: format!("w{i}"),
                name: (*name).into(),
                user_id: None,
                timestamp_ms: 0,
                properties: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                context: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                id_assigned: false,
            };
            (origin, "test".into(), e)
        })
        .collect()
}

#[tokio::test]
async fn a_plugin_that_keeps_failing_is_quarantined_fail_closed() {
    let mut pipeline = quarantine_pipeline(FailurePolicy::Closed).await;
    // Two batches in which every event panics: the plugin is quarantined.
    for _ in 0..2 {
        let out = pipeline.run(wire_batch(&["panic"; 4])).await;
        assert_eq!(out.dead.len(), 4);
        assert!(out.dead.iter().all(|d| d.reason.contains("unreachable")));
    }
    assert!(pipeline.stages()[0].is_quarantined());
    // Quarantined, fail closed: good events are dead-lettered without calling the plugin.
    let out = pipeline.run(wire_batch(&["ok", "ok"])).await;
    assert_eq!(out.dead.len(), 2);
    assert!(
        out.dead[0].reason.contains("quarantined"),
        "{}",
        out.dead[0].reason
    );
    assert_eq!(out.dead[0].plugin, "hostile");
    assert_eq!(out.dead[0].plugin_version.len(), 12);
    assert!(out.kept.is_empty());
}

#[tokio::test]
async fn a_plugin_that_keeps_failing_is_quarantined_fail_open() {
    let mut pipeline = quarantine_pipeline(FailurePolicy::Open).await;
    for _ in 0..2 {
        pipeline.run(wire_batch(&["panic"; 4])).await;
    }
    // Quarantined, fail open: events pass untouched (the plugin would add `seen`).
    let out = pipeline.run(wire_batch(&["ok", "ok"])).await;
    assert!(out.dead.is_empty());
    assert_eq!(out.kept.len(), 2);
    assert_eq!(out.kept[0].event.properties, "{}");
}

/// `per_partition` events named `name` in each of `partitions` partitions, interleaved.
fn wire_partitions(
    name: &str,
    partitions: i32,
    per_partition: usize,
) -> Vec<(Origin, String, weir::model::WireEvent)> {
    let mut out = Vec::new();
    for offset in 0..per_partition {
        for partition in 0..partitions {
            let (_, app, mut e) = wire_batch(&[name]).pop().unwrap();
            e.event_id = format!("p{partition}-{offset}");
            let origin = Origin {
                partition,
                offset: offset as i64,
                index: 0,
                received_ms: 0,
            };
            out.push((origin, app, e));
        }
    }
    out
}

#[tokio::test]
async fn lanes_run_whole_partitions_in_instances_of_their_own() {
    let mut pipeline = quarantine_pipeline(FailurePolicy::Closed)
        .await
        .with_lanes(2)
        .await
        .unwrap();
    assert_eq!(pipeline.lanes(), 2);
    let out = pipeline.run(wire_partitions("tally", 2, 32)).await;
    assert!(out.dead.is_empty(), "{:?}", out.dead);
    assert_eq!(out.kept.len(), 64);
    // Each partition went, in order, through one instance that saw nothing else: its
    // tally counts 1..=32 (one instance for both would count to 64).
    for partition in 0..2 {
        let nth: Vec<u64> = out
            .kept
            .iter()
            .filter(|k| k.origin.partition == partition)
            .map(|k| {
                let p: Value = serde_json::from_str(&k.event.properties).unwrap();
                assert_eq!(
                    k.event.event_id,
                    format!("p{partition}-{}", p["nth"].as_u64().unwrap() - 1)
                );
                p["nth"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(nth, (1..=32).collect::<Vec<_>>(), "partition {partition}");
    }
}

#[tokio::test]
async fn lanes_share_one_breaker_per_plugin() {
    let mut pipeline = quarantine_pipeline(FailurePolicy::Closed)
        .await
        .with_lanes(2)
        .await
        .unwrap();
    // One failing call in each lane: two in all, which is quarantine_after.
    let out = pipeline.run(wire_partitions("panic", 2, 16)).await;
    assert_eq!(out.dead.len(), 32);
    assert!(pipeline.stages()[0].is_quarantined());
    let out = pipeline.run(wire_partitions("ok", 2, 16)).await;
    assert_eq!(out.dead.len(), 32);
    assert!(out.dead.iter().all(|d| d.reason.contains("quarantined")));
}

#[tokio::test]
async fn isolated_failures_alone_do_not_quarantine() {
    let mut pipeline = quarantine_pipeline(FailurePolicy::Closed).await;
    // One poisoned event per batch: dead-lettered, but the plugin stays in service.
    for _ in 0..5 {
        let out = pipeline.run(wire_batch(&["ok", "panic", "ok", "ok"])).await;
        assert_eq!((out.kept.len(), out.dead.len()), (3, 1));
    }
    assert!(!pipeline.stages()[0].is_quarantined());
}

/// Runs `weir plugin test` with the enrich plugin on an events file.
fn plugin_test(events: &std::path::Path) -> std::process::Output {
    std::process::Command::new(weir_tests::weir_binary().unwrap())
        .args(["plugin", "test"])
        .arg(plugin_path("enrich"))
        .arg("--events")
        .arg(events)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn plugin_test_command_prints_each_outcome_and_a_summary() {
    let dir = weir_tests::TempDir::new("plugin-test");
    let events = dir.path().join("sample.ndjson");
    std::fs::write(
        &events,
        concat!(
            "{\"name\":\"profile_viewed\",\"user_id\":\"alice\",\"properties\":{\"profile_id\":\"alice\"}}\n",
            "{\"name\":\"post_liked\"}\n",
            "{\"name\":\"app_opened\",\"properties\":{\"is_test\":true}}\n",
        ),
    )
    .unwrap();
    let out = plugin_test(&events);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["outcome"], "keep");
    assert_eq!(lines[0]["event"]["properties"]["self_view"], true);
    assert_eq!(lines[1]["outcome"], "reject");
    assert_eq!(lines[1]["reason"], "post_liked requires a user_id");
    assert_eq!(lines[2]["outcome"], "drop");
    assert!(
        stderr.contains("1 kept, 1 dropped, 1 rejected, 0 failed"),
        "{stderr}"
    );
    assert!(stderr.contains("peak memory"), "{stderr}");

    // Bad sample events are named, not guessed at.
    std::fs::write(&events, "{\"name\":\"a\",\"colour\":1}\n").unwrap();
    let out = plugin_test(&events);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field \"colour\""));
}
