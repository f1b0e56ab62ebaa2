//! The example plugin in each language (Rust, JavaScript, Python, C), built from source
//! by this test (`scripts/build-example-plugins.sh`; the Rust one by `build.rs`), passes
//! the same behavioural test through the real host: every sample event gets the same
//! outcome, reason and resulting event bytes from all four. The Rust one is built
//! against contract 0.2.0 (the SDK's), the others against 0.1.0, so this is also the
//! test that the host runs both contracts alike. Each language's own unit tests of the
//! plugin's logic run natively here too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weir::ingest::envelope::{self, BodyFormat};
use weir::model::{Event, Limits};
use weir::runtime::{Runtime, Verdict};
use weir_tests::{PLUGIN_DIR, plugin_path, repo_root};

struct Examples {
    js: PathBuf,
    python: PathBuf,
    c: PathBuf,
}

fn build_examples() -> Examples {
    let out = Path::new(PLUGIN_DIR).join("../../examples");
    let status = Command::new(repo_root().join("scripts/build-example-plugins.sh"))
        .arg(&out)
        .status()
        .expect("run scripts/build-example-plugins.sh");
    assert!(
        status.success(),
        "building the JS, Python and C plugins failed"
    );
    Examples {
        js: out.join("js_enrich.wasm"),
        python: out.join("python_enrich.wasm"),
        c: out.join("c_enrich.wasm"),
    }
}

/// Runs a command in `dir`; panics with its output if it fails.
fn run_native(what: &str, dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
    .map(|e| Event::from_wire("app".into(), e))
    .collect()
}

/// A kept event as comparable text: its fields, and its JSON fields' exact bytes.
fn keep(e: &Event) -> String {
    format!(
        "keep {} {} {:?} {} properties={} context={}",
        e.event_id, e.name, e.user_id, e.timestamp_ms, e.properties, e.context
    )
}

/// Each verdict as comparable text: outcome, then reason or resulting event.
/// The contract each example is built against: the Rust SDK's 0.2.0, the
/// others' 0.1.0 (`wit/plugin.wit`), so their equal outcomes also show that the host
/// runs both contracts alike.
fn contract_of(path: &Path) -> &'static str {
    if path == plugin_path("enrich") {
        "0.2.0"
    } else {
        "0.1.0"
    }
}

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
    assert_eq!(plugin.contract(), contract_of(path), "{}", path.display());
    let mut instance = plugin.instantiate().await.unwrap();
    let mut batch = events.to_vec();
    instance
        .process(&mut batch)
        .await
        .into_iter()
        .zip(&batch)
        .map(|(v, event)| match v {
            // A kept event's changes are applied to it in `batch`.
            Verdict::Pass | Verdict::Keep => keep(event),
            Verdict::Route { .. } => panic!("the enrich plugins never route"),
            Verdict::Drop(r) => format!("drop {r}"),
            Verdict::Reject(r) => format!("reject {r}"),
            Verdict::Failed(r) => format!("failed {r}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_javascript_python_and_c_plugins_behave_the_same() {
    let Examples { js, python, c } = build_examples();
    run_unit_tests_natively();
    let events = sample_events();
    let rust = run(&plugin_path("enrich"), "{}", &events).await;
    assert!(rust.iter().any(|v| v.starts_with("keep")));
    assert!(rust.iter().any(|v| v.starts_with("drop")));
    assert!(rust.iter().any(|v| v.starts_with("reject")));
    assert!(!rust.iter().any(|v| v.starts_with("failed")), "{rust:#?}");
    // Properties are edited in place: the members the plugin did not touch keep their
    // bytes (no float rounding of a huge integer, no `1e+16` for `1e16`), the new one
    // goes at the end.
    assert!(
        rust.iter().any(|v| v.ends_with(
            r#"properties={"post_id":"p1","z":1,"a":[1.0,2.5e-7,1e16,-0],"n":18446744073709551616,"enriched_by":"enrich"} context={}"#
        )),
        "{rust:#?}"
    );
    for (lang, path) in [("JavaScript", &js), ("Python", &python), ("C", &c)] {
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
    let c_verdicts = run(&c, config, &events).await;
    assert_eq!(c_verdicts, rust, "C with {config}");

    // A configuration that does not parse rejects every event, naming the fault.
    for (lang, path) in [("Rust", plugin_path("enrich")), ("C", c)] {
        let verdicts = run(&path, r#"{"drop_flag":1}"#, &events).await;
        assert!(
            verdicts
                .iter()
                .all(|v| v.starts_with("reject invalid plugin config: invalid type:")),
            "{lang}: {verdicts:?}"
        );
    }
}

/// Each language's own unit tests of the plugin's logic, natively. Run after
/// `build_examples`, which installs node (and the C toolchain) when missing.
fn run_unit_tests_natively() {
    let examples = repo_root().join("examples/plugins");
    run_native(
        "JavaScript unit tests (node --test)",
        &examples.join("js"),
        "node",
        &["--test", "test/"],
    );
    run_native(
        "Python unit tests (python3 -m unittest)",
        &examples.join("python"),
        "python3",
        &["-m", "unittest", "discover", "-s", "tests"],
    );
    run_native(
        "C unit tests (build.sh --test)",
        &examples.join("c"),
        "./build.sh",
        &["--test"],
    );
}
