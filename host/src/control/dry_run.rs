//! Dry runs: a plugin on sample events under production limits, with each outcome,
//! timing and memory, and no side effect (`weir plugin test`, and the admin API's
//! `POST /admin/v1/plugins/{name}/test`).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::ingest::envelope::{self, BodyFormat};
use crate::model::{Event, Limits, PluginOutput};
use crate::runtime::{Plugin, Runtime, RuntimeError, Verdict};

/// Name of the thread a dry run of the admin API runs on.
pub const THREAD_NAME: &str = "weir-dry-run";
/// Its nice value (0 is the process's; 19 the lowest priority): when the cores are
/// busy, the scheduler gives them to ingest and the processor first.
pub const THREAD_NICE: i32 = 10;

/// A dry run asked for through the admin API: the plugin's component and what to run
/// it on.
pub struct Request {
    pub name: String,
    pub version: String,
    pub bytes: Vec<u8>,
    pub config: String,
    pub limits: Limits,
    pub events: Vec<Event>,
    pub batch_size: usize,
}

/// Compiles and runs a dry run away from the cores' main work: on a thread of its
/// own ([`THREAD_NAME`], at nice [`THREAD_NICE`]) with an async runtime of its own, so
/// that a component's compilation and its calls (up to `deadline_ms` each, thousands
/// of events) neither hold a worker of the runtime ingest and the processor share nor
/// outrank them for a core (wasmtime's parallel compiler pool is shared with the
/// pipelines' compiles and keeps its normal priority).
///
/// `slot` is the instance's one dry-run permit: it moves into the thread and is freed
/// when the run ends (before its answer is sent), not when the caller stops waiting (a client that hangs up must
/// not free the slot while its run goes on).
pub async fn run_apart(
    runtime: Runtime,
    req: Request,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<Report, RuntimeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            lower_this_threads_priority();
            let done = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt.block_on(async {
                    let plugin = runtime
                        .load_as(&req.name, &req.version, &req.bytes, req.config, req.limits)
                        .await?;
                    run(&plugin, &req.events, req.batch_size).await
                }),
                Err(e) => Err(RuntimeError::Setup(format!(
                    "cannot start the dry run's async runtime: {e}"
                ))),
            };
            // The slot is freed before the answer goes out: a client that sends its next
            // dry run as soon as it has this one's answer finds the slot free.
            drop(slot);
            let _ = tx.send(done);
        })
        .map_err(|e| RuntimeError::Setup(format!("cannot start the dry run's thread: {e}")))?;
    rx.await.unwrap_or_else(|_| {
        Err(RuntimeError::Setup(
            "the dry run's thread ended early".into(),
        ))
    })
}

/// Sets the calling thread's nice value to [`THREAD_NICE`] (Linux: per thread).
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read their arguments; `who` is this thread.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, THREAD_NICE) != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot lower the dry run thread's priority"
            );
        }
    }
}

/// Parses sample events: a JSON event, a JSON array, or NDJSON, in the format of
/// `POST /v1/events`. Events without an id get `sample-N`.
pub fn parse_samples(body: &[u8]) -> Result<Vec<Event>, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let is_single_document = match first {
        Some(b'[') => true,
        Some(b'{') => serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok(),
        _ => false,
    };
    let format = if is_single_document {
        BodyFormat::Json
    } else {
        BodyFormat::Ndjson
    };
    let limits = envelope::Limits {
        max_event_bytes: 32 * 1024,
        max_events: 100_000,
        max_depth: 32,
    };
    let mut n = 0;
    let events = envelope::parse_body(body, format, &limits, crate::model::now_ms(), || {
        n += 1;
        format!("sample-{n}")
    })
    .map_err(|e| {
        format!(
            "{}{}",
            e.message,
            e.index.map(|i| format!(" (event {i})")).unwrap_or_default()
        )
    })?;
    Ok(events
        .into_iter()
        .map(|e| Event::from_wire("sample".into(), e))
        .collect())
}

/// What a dry run saw.
#[derive(Debug)]
pub struct Report {
    /// One JSON object per event: `index`, `event_id`, `outcome` (keep, drop, reject,
    /// failed) and the kept event, its outputs, or the reason.
    pub outcomes: Vec<Value>,
    pub kept: usize,
    pub dropped: usize,
    pub rejected: usize,
    pub failed: usize,
    pub call_time: Duration,
    pub peak_memory_bytes: usize,
    pub counters: std::collections::BTreeMap<String, u64>,
}

impl Report {
    /// The summary as JSON (without the outcomes).
    pub fn summary(&self, batch_size: usize) -> Value {
        let n = self.outcomes.len().max(1) as f64;
        json!({
            "events": self.outcomes.len(),
            "kept": self.kept,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "failed": self.failed,
            "call_ms": self.call_time.as_secs_f64() * 1e3,
            "us_per_event": self.call_time.as_secs_f64() * 1e6 / n,
            "batch_size": batch_size,
            "peak_memory_bytes": self.peak_memory_bytes,
            "counters": self.counters,
        })
    }
}

/// Runs `plugin` on `events` in batches of `batch_size`, in a fresh instance.
pub async fn run(
    plugin: &Plugin,
    events: &[Event],
    batch_size: usize,
) -> Result<Report, RuntimeError> {
    let mut instance = plugin.instantiate().await?;
    let mut report = Report {
        outcomes: Vec::with_capacity(events.len()),
        kept: 0,
        dropped: 0,
        rejected: 0,
        failed: 0,
        call_time: Duration::ZERO,
        peak_memory_bytes: 0,
        counters: Default::default(),
    };
    let as_json = |e: &Event| serde_json::from_str::<Value>(&e.to_json()).unwrap_or(Value::Null);
    let mut index = 0;
    for chunk in events.chunks(batch_size.max(1)) {
        let mut batch = chunk.to_vec();
        let started = Instant::now();
        let verdicts = instance.process(&mut batch).await;
        report.call_time += started.elapsed();
        for (name, n) in instance.take_counters() {
            *report.counters.entry(name).or_insert(0) += n;
        }
        for (event, verdict) in batch.iter().zip(verdicts) {
            let id = &event.event_id;
            let line = match verdict {
                Verdict::Pass => {
                    report.kept += 1;
                    json!({"index": index, "event_id": id, "outcome": "keep", "changed": false, "event": as_json(event)})
                }
                Verdict::Keep => {
                    report.kept += 1;
                    json!({"index": index, "event_id": id, "outcome": "keep", "changed": true, "event": as_json(event)})
                }
                Verdict::Route { changes, outputs } => {
                    report.kept += 1;
                    let changed = changes.is_some();
                    let mut kept = event.clone();
                    if let Some(changes) = changes {
                        changes.apply(&mut kept);
                    }
                    let outputs: Vec<Value> = outputs.iter().map(output_json).collect();
                    json!({"index": index, "event_id": id, "outcome": "keep", "changed": changed, "event": as_json(&kept), "outputs": outputs})
                }
                Verdict::Drop(reason) => {
                    report.dropped += 1;
                    json!({"index": index, "event_id": id, "outcome": "drop", "reason": reason})
                }
                Verdict::Reject(reason) => {
                    report.rejected += 1;
                    json!({"index": index, "event_id": id, "outcome": "reject", "reason": reason})
                }
                Verdict::Failed(failure) => {
                    report.failed += 1;
                    json!({"index": index, "event_id": id, "outcome": "failed", "kind": failure.kind.as_str(), "reason": failure.message})
                }
            };
            report.outcomes.push(line);
            index += 1;
        }
    }
    report.peak_memory_bytes = instance.peak_memory();
    Ok(report)
}

/// A plugin output as JSON (a row's columns parsed when they are JSON, kept as text
/// otherwise, so that a bad row shows as the plugin sent it).
fn output_json(output: &PluginOutput) -> Value {
    match output {
        PluginOutput::Row { table, columns } => {
            let columns = serde_json::from_str::<Value>(columns).unwrap_or_else(|_| json!(columns));
            json!({"row": {"table": table, "columns": columns}})
        }
        PluginOutput::Count {
            counter,
            key,
            delta,
        } => {
            json!({"count": {"counter": counter, "key": key, "delta": delta}})
        }
        PluginOutput::Forward(sink) => json!({"forward": sink}),
    }
}
