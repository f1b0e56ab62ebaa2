//! The `weir` command line (the binary's `main` is [`main`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::ingest::envelope::{self, BodyFormat};
use crate::pipeline::{Pipeline, event_json};
use crate::runtime::{Limits, Runtime, Verdict};

#[derive(Parser)]
#[command(name = "weir", version, about = "A WebAssembly-plugin event processor")]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "WEIR_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs ingest and the processor.
    Serve {
        /// The configuration file (TOML).
        #[arg(short, long, env = "WEIR_CONFIG", default_value = "weir.toml")]
        config: PathBuf,
    },
    /// Checks a configuration file, compiles and instantiates its plugins, and exits.
    CheckConfig {
        #[arg(short, long, env = "WEIR_CONFIG", default_value = "weir.toml")]
        config: PathBuf,
    },
    /// Works with plugins locally.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Runs a plugin on sample events under production limits and prints each outcome
    /// (one JSON line per event on stdout) and a summary (timing, memory) on stderr.
    Test {
        /// The component (`.wasm`).
        component: PathBuf,
        /// Sample events: a JSON event, a JSON array, or NDJSON (one event per line), in
        /// the format of `POST /v1/events`.
        #[arg(long)]
        events: PathBuf,
        /// The plugin's configuration (JSON).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Wall-clock budget of one batch call.
        #[arg(long, default_value_t = 100)]
        deadline_ms: u64,
        /// Linear memory cap, in MiB.
        #[arg(long, default_value_t = 64)]
        memory_mib: usize,
        /// Events per call.
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,cranelift=warn,wasmtime=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            rt.block_on(crate::serve::serve(config, crate::serve::signal()))
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            let runtime = Runtime::new()?;
            let pipeline = rt.block_on(Pipeline::load(
                &runtime,
                &config.pipeline,
                config.processor.plugin_batch_size,
            ))?;
            println!(
                "config ok; pipeline {} runs [{}]",
                pipeline.name(),
                pipeline.versions()
            );
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Test {
                    component,
                    events,
                    config,
                    deadline_ms,
                    memory_mib,
                    batch_size,
                },
        } => {
            let limits = Limits {
                deadline: Duration::from_millis(deadline_ms),
                memory_bytes: memory_mib << 20,
            };
            rt.block_on(plugin_test(&component, &events, config, limits, batch_size))
        }
    }
}

async fn plugin_test(
    component: &std::path::Path,
    events: &std::path::Path,
    config: String,
    limits: Limits,
    batch_size: usize,
) -> anyhow::Result<()> {
    if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&config).is_err() {
        bail!("--config must be a JSON object");
    }
    let bytes =
        std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    let body =
        std::fs::read(events).with_context(|| format!("cannot read {}", events.display()))?;
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let is_single_document = match first {
        Some(b'[') => true,
        Some(b'{') => serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok(),
        _ => false,
    };
    let format = if is_single_document {
        BodyFormat::Json
    } else {
        BodyFormat::Ndjson
    };
    let sample_limits = envelope::Limits {
        max_event_bytes: 32 * 1024,
        max_events: usize::MAX,
        max_depth: 32,
    };
    let mut n = 0;
    let events = envelope::parse_body(&body, format, &sample_limits, crate::now_ms(), || {
        n += 1;
        format!("sample-{n}")
    })
    .map_err(|e| {
        anyhow::anyhow!(
            "{}: {}{}",
            events.display(),
            e.message,
            e.index.map(|i| format!(" (event {i})")).unwrap_or_default()
        )
    })?;
    let events: Vec<crate::runtime::Event> = events
        .into_iter()
        .map(|e| crate::pipeline::to_plugin_event("sample".into(), e))
        .collect();

    let name = component
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let runtime = Runtime::new()?;
    let compile = Instant::now();
    let plugin = runtime.load(&name, &bytes, config, limits).await?;
    let compile = compile.elapsed();
    let mut instance = plugin.instantiate().await?;

    let mut call_time = Duration::ZERO;
    let mut tally = [0usize; 4];
    let mut index = 0;
    for batch in events.chunks(batch_size.max(1)) {
        let started = Instant::now();
        let verdicts = instance.process(batch).await;
        call_time += started.elapsed();
        for (event, verdict) in batch.iter().zip(verdicts) {
            let line = match verdict {
                Verdict::Pass => {
                    tally[0] += 1;
                    let kept: serde_json::Value = serde_json::from_str(&event_json(event))?;
                    json!({"index": index, "event_id": event.event_id, "outcome": "keep", "changed": false, "event": kept})
                }
                Verdict::Keep(kept) => {
                    tally[0] += 1;
                    let kept: serde_json::Value = serde_json::from_str(&event_json(&kept))?;
                    json!({"index": index, "event_id": event.event_id, "outcome": "keep", "changed": true, "event": kept})
                }
                Verdict::Route(kept, outputs) => {
                    tally[0] += 1;
                    let changed = kept.is_some();
                    let kept = kept.as_ref().unwrap_or(event);
                    let kept: serde_json::Value = serde_json::from_str(&event_json(kept))?;
                    let outputs: Vec<serde_json::Value> = outputs.iter().map(output_json).collect();
                    json!({"index": index, "event_id": event.event_id, "outcome": "keep", "changed": changed, "event": kept, "outputs": outputs})
                }
                Verdict::Drop(reason) => {
                    tally[1] += 1;
                    json!({"index": index, "event_id": event.event_id, "outcome": "drop", "reason": reason})
                }
                Verdict::Reject(reason) => {
                    tally[2] += 1;
                    json!({"index": index, "event_id": event.event_id, "outcome": "reject", "reason": reason})
                }
                Verdict::Failed(reason) => {
                    tally[3] += 1;
                    json!({"index": index, "event_id": event.event_id, "outcome": "failed", "reason": reason})
                }
            };
            println!("{line}");
            index += 1;
        }
    }
    let per_event = call_time.as_secs_f64() * 1e6 / events.len().max(1) as f64;
    eprintln!(
        "{}@{}: {} events: {} kept, {} dropped, {} rejected, {} failed",
        plugin.name(),
        plugin.version(),
        events.len(),
        tally[0],
        tally[1],
        tally[2],
        tally[3]
    );
    eprintln!(
        "compile {:.1} ms; calls {:.3} ms in all, {per_event:.2} us/event (batch {batch_size}); peak memory {} KiB of {} MiB; counters {:?}",
        compile.as_secs_f64() * 1e3,
        call_time.as_secs_f64() * 1e3,
        instance.peak_memory() / 1024,
        limits.memory_bytes >> 20,
        instance.counters()
    );
    Ok(())
}

/// A plugin output as JSON for `weir plugin test` (a row's columns parsed when they
/// are JSON, kept as text otherwise, so that a bad row shows as the plugin sent it).
fn output_json(output: &crate::runtime::Output) -> serde_json::Value {
    use crate::runtime::Output;
    match output {
        Output::Row(row) => {
            let columns = serde_json::from_str::<serde_json::Value>(&row.columns)
                .unwrap_or_else(|_| json!(row.columns));
            json!({"row": {"table": row.table, "columns": columns}})
        }
        Output::Count(c) => {
            json!({"count": {"counter": c.counter, "key": c.key, "delta": c.delta}})
        }
        Output::Forward(sink) => json!({"forward": sink}),
    }
}
