//! Contract tests: schemathesis (PyPI) reads `openapi/ingest.yaml` and
//! `openapi/admin.yaml`, generates requests from them (valid ones, and invalid ones
//! that break a constraint of the document) and sends them to a live weir on real
//! services. Every answer must be one the document declares, with the status, headers,
//! content type and body schema it declares; no request may get a 5xx; a request
//! the document calls invalid must be refused and one it calls valid must be accepted.
//! A drift between the code and its OpenAPI documents fails here.
//!
//! Three admin operations take bodies whose validity no schema can say: a plugin upload
//! (the bytes of a Wasm component), a pipeline and a dry run (which name uploaded
//! plugins). For their paths the "valid data is accepted" check is off; every other
//! check is on. Plugin bytes (`application/wasm`) are generated as binary data.
//!
//! Bounded: a fixed number of cases per operation (`WEIR_CONTRACT_EXAMPLES`, default
//! 25) and a deadline per run. The seed is printed; `WEIR_CONTRACT_SEED` repeats it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weir_tests::{
    ClickHouse, Lcg, READ_KEY, Redis, Tansu, TempDir, WRITE_KEY, Weir, find_program, repo_root,
};

const ADMIN_TOKEN: &str = "at_contract_1234567890abcdef";
/// A run that takes longer than this is stopped and fails.
const RUN_DEADLINE: Duration = Duration::from_secs(240);
/// Paths whose bodies' validity no schema can say (see the top of the file).
const OPAQUE_BODIES: &str = "^/admin/v1/(pipelines/\\{name\\}|plugins/\\{name\\}(/test)?)$";
/// Schemathesis hooks: plugin bytes are sent as binary data, as for
/// `application/octet-stream`.
const HOOKS: &str = "import schemathesis\nschemathesis.serializer.alias(\"application/wasm\", \"application/octet-stream\")\n";
/// Schemathesis configuration: 413 is a right answer to a request over the body limit,
/// which no schema states (a valid array of 1,000 large events can pass it), whether
/// the request was generated to be valid or not.
const CONFIG: &str = r#"
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", 401, 403, 404, 409, 413, 429, "5xx"]
"#;

fn config(tansu: &Tansu, clickhouse: &ClickHouse, redis: &Redis) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "contract"
write_keys = ["{WRITE_KEY}"]
read_keys = ["{READ_KEY}"]
[admin]
listen = "{{admin}}"
tokens = ["{ADMIN_TOKEN}"]
[kafka]
brokers = "{}"
session_timeout_ms = 6000
[clickhouse]
url = "{}"
database = "contract"
[redis]
url = "{}"
key_prefix = "contract"
[processor]
flush_interval_ms = 100
[pipeline]
name = "engagement"
[[pipeline.counter]]
name = "profile_views"
"#,
        tansu.bootstrap(),
        clickhouse.url(),
        redis.url(),
    )
}

/// One schemathesis run of `spec` against `base`; fails with its output unless every
/// check passed.
fn schemathesis(spec: &str, base: &str, bearer: &str, args: &[&str], seed: u64) -> Result<()> {
    let bin = find_program("schemathesis")?;
    let spec = repo_root().join("openapi").join(spec);
    // Its example database and reports go to a directory of its own, not the checkout.
    let dir = TempDir::new("schemathesis");
    let examples = std::env::var("WEIR_CONTRACT_EXAMPLES").unwrap_or_else(|_| "25".into());
    let out = dir.path().join("out.txt");
    std::fs::write(dir.path().join("weir_hooks.py"), HOOKS)?;
    std::fs::write(dir.path().join("schemathesis.toml"), CONFIG)?;
    let mut cmd = Command::new(&bin);
    cmd.current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env("PYTHONPATH", dir.path())
        .env("SCHEMATHESIS_HOOKS", "weir_hooks")
        .arg("run")
        .arg(&spec)
        .args(["--url", base])
        .args(["--header", &format!("Authorization: Bearer {bearer}")])
        .args(["--max-examples", &examples])
        .args(["--seed", &seed.to_string()])
        // One worker: with two, CPython 3.11 sometimes fails inside schemathesis
        // ("AST constructor recursion depth mismatch", an internal error, not a finding).
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--generation-database", "none", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--checks", "all"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::options().append(true).open(&out)?);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "schemathesis on {} did not finish in {RUN_DEADLINE:?}:\n{}",
                spec.display(),
                read(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = read(&out);
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("passed") || l.contains("failed"))
        .unwrap_or("");
    println!(
        "schemathesis {} {args:?}: {status} in {:.0} s: {summary}",
        file_name(&spec),
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!(
            "schemathesis found answers that break {} (seed {seed}; repeat with WEIR_CONTRACT_SEED={seed}):\n{text}",
            spec.display()
        );
    }
    Ok(())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn the_apis_answer_as_their_openapi_documents_say() -> Result<()> {
    // Found before any server starts, so that a machine without it fails at once.
    find_program("schemathesis")?;
    let seed = match std::env::var("WEIR_CONTRACT_SEED") {
        Ok(s) => s.parse().context("WEIR_CONTRACT_SEED must be a number")?,
        Err(_) => Lcg::seed() % 1_000_000_007,
    };
    println!("seed {seed}");
    let tansu = Tansu::start()?;
    tansu.create_topic("weir.events", 4)?;
    let clickhouse = ClickHouse::start()?;
    let redis = Redis::start()?;
    let weir = Weir::start(&config(&tansu, &clickhouse, &redis))?;
    weir.wait_for_partitions(Duration::from_secs(30))?;
    let ingest = format!("http://{}", weir.ingest);
    let admin = format!("http://{}", weir.admin);

    let result = (|| {
        // Ingest with the write key; the counters API takes the read key.
        schemathesis(
            "ingest.yaml",
            &ingest,
            WRITE_KEY,
            &["--exclude-path-regex", "^/v1/counters/"],
            seed,
        )?;
        schemathesis(
            "ingest.yaml",
            &ingest,
            READ_KEY,
            &["--include-path-regex", "^/v1/counters/"],
            seed,
        )?;
        schemathesis(
            "admin.yaml",
            &admin,
            ADMIN_TOKEN,
            &["--exclude-path-regex", OPAQUE_BODIES],
            seed,
        )?;
        schemathesis(
            "admin.yaml",
            &admin,
            ADMIN_TOKEN,
            &[
                "--include-path-regex",
                OPAQUE_BODIES,
                "--exclude-checks",
                "positive_data_acceptance",
            ],
            seed,
        )
    })();
    // No request may have taken weir down.
    if !weir_tests::http_ok(weir.ingest, "/healthz") {
        bail!("weir stopped answering:\n{}", weir.log());
    }
    result.with_context(|| format!("weir's log:\n{}", tail(&weir.log(), 60)))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
