//! The example plugin in each language (Rust, JavaScript, Python), built from source by
//! this test (`scripts/build-example-plugins.sh`; the Rust one by `build.rs`), passes the
//! same behavioural test through the real host: every sample event gets the same
//! outcome, reason and resulting event bytes from all three.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weir::ingest::envelope::{self, BodyFormat};
use weir::runtime::{Event, Limits, Runtime, Verdict};
use weir_tests::{PLUGIN_DIR, plugin_path, repo_root};

fn build_examples() -> (PathBuf, PathBuf) {
    let out = Path::new(PLUGIN_DIR).join("../../examples");
    let status = Command::new(repo_root().join("scripts/build-example-plugins.sh"))
        .arg(&out)
        .status()
        .expect("run scripts/build-example-plugins.sh");
    assert!(
        status.success(),
        "building the JS and Python plugins failed"
    );
    (out.join("js_enrich.wasm"), out.join("python_enrich.wasm"))
}

fn sample_events() -> Vec<Event> {
    let body = std::fs::read(repo_root().join("examples/plugins/sample-events.ndjson")).unwrap();
    let limits = envelope::Limits {
        max_event_bytes: 32 * 1024,
        max_events: 1000,
        max_depth: 32,
    };
    let mut n = 0;
    envelope::parse_body(
        &body,
        BodyFormat::Ndjson,
        &limits,
        1_795_400_000_000,
        || {
            n += 1;
            format!("sample-{n}")
        },
    )
    .unwrap()
    .into_iter()
    .map(|e| weir::pipeline::to_plugin_event("app".into(), e))
    .collect()
}

/// Each verdict as comparable text: outcome, then reason or resulting event.
async fn run(path: &Path, config: &str, events: &[Event]) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let limits = Limits {
        // Generous: debug builds of weir run Python's interpreter slowly.
        deadline: Duration::from_secs(10),
        memory_bytes: 64 << 20,
    };
    let plugin = Runtime::new()
        .unwrap()
        .load("enrich", &bytes, config.into(), limits)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut instance = plugin.instantiate().await.unwrap();
    instance
        .process(events)
        .await
        .into_iter()
        .zip(events)
        .map(|(v, original)| match v {
            Verdict::Pass => format!("keep {}", weir::pipeline::event_json(original)),
            Verdict::Keep(e) => format!("keep {}", weir::pipeline::event_json(&e)),
            Verdict::Route(..) => panic!("the enrich plugins never route"),
            Verdict::Drop(r) => format!("drop {r}"),
            Verdict::Reject(r) => format!("reject {r}"),
            Verdict::Failed(r) => format!("failed {r}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_javascript_and_python_plugins_behave_the_same() {
    let (js, python) = build_examples();
    let events = sample_events();
    let rust = run(&plugin_path("enrich"), "{}", &events).await;
    assert!(rust.iter().any(|v| v.starts_with("keep")));
    assert!(rust.iter().any(|v| v.starts_with("drop")));
    assert!(rust.iter().any(|v| v.starts_with("reject")));
    assert!(!rust.iter().any(|v| v.starts_with("failed")), "{rust:#?}");
    for (lang, path) in [("JavaScript", &js), ("Python", &python)] {
        let got = run(path, "{}", &events).await;
        for (i, (want, got)) in rust.iter().zip(&got).enumerate() {
            assert_eq!(got, want, "{lang}, event {i}");
        }
        assert_eq!(got.len(), rust.len());
    }

    // Another configuration changes the behaviour in the same way.
    let config = r#"{"require_user":["app_opened"],"drop_flag":"screen"}"#;
    let rust = run(&plugin_path("enrich"), config, &events).await;
    let js = run(&js, config, &events).await;
    assert_eq!(js, rust, "JavaScript with {config}");
}
