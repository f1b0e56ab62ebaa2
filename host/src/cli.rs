//! The `weir` command line (the binary's `main` is [`main`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::control::client::AdminClient;
use crate::control::dry_run;
use crate::model::Limits;
use crate::pipeline::{Pipeline, Shape};
use crate::runtime::Runtime;

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
    /// Plugins: test one locally, or upload, list and roll back through the admin API.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// JSON Schemas of events, through the admin API.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
    /// Pipelines, through the admin API.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Applies a declarative file of plugins, schemas and pipelines (idempotent: what
    /// is already in force is left alone).
    Apply {
        /// The file (TOML); paths in it are relative to it.
        #[arg(short, long)]
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Dead letters: list them, or replay them through the pipeline in force.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// The control-plane version and every live instance: what it runs, its lag.
    Status {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where the admin API is, and the token to use.
#[derive(clap::Args)]
struct AdminArgs {
    /// Base URL of a weir instance's admin API.
    #[arg(long, env = "WEIR_ADMIN_URL", default_value = "http://127.0.0.1:8081")]
    admin_url: String,
    /// Admin token.
    #[arg(
        long,
        env = "WEIR_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    token: String,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<AdminClient> {
        AdminClient::new(&self.admin_url, &self.token)
    }
}

/// Which dead letters (every condition given must hold).
#[derive(clap::Args)]
struct DeadLetterArgs {
    /// Stage: schema, plugin, webhook or decode.
    #[arg(long)]
    stage: Option<String>,
    /// Event name.
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    app: Option<String>,
    /// These events only (repeatable; replay only).
    #[arg(long = "event-id")]
    event_ids: Vec<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

impl DeadLetterArgs {
    fn filter(&self) -> serde_json::Value {
        let mut f = serde_json::json!({"limit": self.limit});
        for (k, v) in [
            ("stage", &self.stage),
            ("name", &self.name),
            ("app", &self.app),
        ] {
            if let Some(v) = v {
                f[k] = serde_json::json!(v);
            }
        }
        if !self.event_ids.is_empty() {
            f["event_ids"] = serde_json::json!(self.event_ids);
        }
        f
    }
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Lists dead letters, newest first (JSON).
    List {
        #[command(flatten)]
        which: DeadLetterArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Sends dead letters' events back through the pipeline in force (those already in
    /// `events` are skipped).
    Replay {
        #[command(flatten)]
        which: DeadLetterArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Uploads the JSON Schema of an event name (a new version, in force at once).
    Put {
        event: String,
        /// The schema (JSON).
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Uploads a pipeline document (JSON, or TOML if the file ends in .toml) as the
    /// pipeline's next version, active at once.
    Put {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Shows a pipeline's versions and which is active.
    Get {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Activates the version that was active before the current one (or --to N).
    Rollback {
        name: String,
        #[arg(long)]
        to: Option<u32>,
        #[command(flatten)]
        admin: AdminArgs,
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
    /// Uploads a component: validated, stored content-addressed, given the next
    /// version of its name. Uploading the same bytes again changes nothing.
    Push {
        file: PathBuf,
        /// The plugin's name (default: the file name without `.wasm` and a
        /// `weir_plugin_` prefix).
        #[arg(long)]
        name: Option<String>,
        /// Accept an import family the sandbox grants nothing to (`wasi:filesystem`,
        /// `wasi:sockets`); repeatable.
        #[arg(long)]
        allow: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lists the uploaded plugins and their versions.
    List {
        /// Only this plugin.
        name: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Puts the previous version of a plugin back into a pipeline (a new pipeline
    /// version; `weir pipeline rollback` undoes a whole change instead).
    Rollback {
        name: String,
        #[arg(long)]
        pipeline: String,
        #[command(flatten)]
        admin: AdminArgs,
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
                Shape::of(&config.processor),
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
        Command::Plugin {
            command:
                PluginCommand::Push {
                    file,
                    name,
                    allow,
                    admin,
                },
        } => {
            let name = name.unwrap_or_else(|| default_plugin_name(&file));
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let (created, body) = rt.block_on(admin.client()?.push_plugin(&name, bytes, &allow))?;
            println!(
                "{name}@{} {} (sha256 {}, {} bytes)",
                body["version"],
                if created {
                    "uploaded"
                } else {
                    "unchanged: these bytes are that version already"
                },
                body["sha256"].as_str().unwrap_or_default(),
                body["size"]
            );
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::List { name, admin },
        } => {
            let path = match &name {
                Some(n) => format!("/admin/v1/plugins/{n}"),
                None => "/admin/v1/plugins".into(),
            };
            let body = rt.block_on(admin.client()?.get(&path))?;
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Rollback {
                    name,
                    pipeline,
                    admin,
                },
        } => rt.block_on(plugin_rollback(&admin.client()?, &name, &pipeline)),
        Command::Schema {
            command: SchemaCommand::Put { event, file, admin },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let (created, body) = rt.block_on(
                admin
                    .client()?
                    .put_json(&format!("/admin/v1/schemas/{event}"), &schema),
            )?;
            println!(
                "schema {event}@{} {}",
                body["version"],
                if created { "created" } else { "unchanged" }
            );
            Ok(())
        }
        Command::Pipeline {
            command: PipelineCommand::Put { name, file, admin },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let doc: crate::control::PipelineDoc = if file.extension().is_some_and(|e| e == "toml")
            {
                toml::from_str(&text)
                    .with_context(|| format!("invalid pipeline {}", file.display()))?
            } else {
                serde_json::from_str(&text)
                    .with_context(|| format!("invalid pipeline {}", file.display()))?
            };
            let (created, body) = rt.block_on(admin.client()?.put_json(
                &format!("/admin/v1/pipelines/{name}"),
                &serde_json::json!(doc),
            ))?;
            println!(
                "pipeline {name}@{} {}",
                body["version"],
                if created {
                    "created and active"
                } else {
                    "unchanged: that document is active already"
                }
            );
            Ok(())
        }
        Command::Pipeline {
            command: PipelineCommand::Get { name, admin },
        } => {
            let body = rt.block_on(admin.client()?.get(&format!("/admin/v1/pipelines/{name}")))?;
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(())
        }
        Command::Pipeline {
            command: PipelineCommand::Rollback { name, to, admin },
        } => {
            let query: Vec<(&str, String)> =
                to.map(|v| ("to", v.to_string())).into_iter().collect();
            let body = rt.block_on(
                admin
                    .client()?
                    .post(&format!("/admin/v1/pipelines/{name}/rollback"), &query),
            )?;
            println!("pipeline {name}: version {} active", body["version"]);
            Ok(())
        }
        Command::Apply { file, admin } => {
            for line in rt.block_on(crate::control::client::apply(&admin.client()?, &file))? {
                println!("{line}");
            }
            Ok(())
        }
        Command::DeadLetters {
            command: DeadLetterCommand::List { which, admin },
        } => {
            if !which.event_ids.is_empty() {
                bail!("--event-id is for replay; list filters by --stage, --name, --app");
            }
            let filter = which.filter();
            let query: Vec<(&str, String)> = filter
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        k.as_str(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect();
            let client = admin.client()?;
            let body = rt.block_on(client.get_query("/admin/v1/dead-letters", &query))?;
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(())
        }
        Command::DeadLetters {
            command: DeadLetterCommand::Replay { which, admin },
        } => {
            let client = admin.client()?;
            let body =
                rt.block_on(client.post_json("/admin/v1/dead-letters/replay", &which.filter()))?;
            println!("replayed {} events", body["replayed"]);
            for s in body["skipped"].as_array().into_iter().flatten() {
                println!(
                    "  skipped {} ({}): {}",
                    s["event_id"].as_str().unwrap_or(""),
                    s["stage"].as_str().unwrap_or(""),
                    s["reason"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::Status { json, admin } => {
            let body = rt.block_on(admin.client()?.get("/admin/v1/status"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                print_status(&body);
            }
            Ok(())
        }
    }
}

/// `enrich` for `weir_plugin_enrich.wasm` or `enrich.wasm`.
fn default_plugin_name(file: &std::path::Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    stem.strip_prefix("weir_plugin_")
        .unwrap_or(&stem)
        .replace('_', "-")
}

async fn plugin_rollback(client: &AdminClient, name: &str, pipeline: &str) -> anyhow::Result<()> {
    let record = client
        .get(&format!("/admin/v1/pipelines/{pipeline}"))
        .await?;
    let active = record["active"]
        .as_u64()
        .context("pipeline without an active version")?;
    let doc = record["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"].as_u64() == Some(active)))
        .map(|v| v["doc"].clone())
        .context("active version missing from the answer")?;
    let mut doc: crate::control::PipelineDoc = serde_json::from_value(doc)?;
    let entry = doc
        .plugins
        .iter_mut()
        .find(|e| e.reference().is_ok_and(|(n, _)| n == name))
        .with_context(|| format!("pipeline {pipeline} does not run plugin {name}"))?;
    let (_, current) = entry.reference().map_err(anyhow::Error::msg)?;
    let versions = client.get(&format!("/admin/v1/plugins/{name}")).await?;
    let previous = versions["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["version"].as_u64())
        .filter(|v| *v < current as u64)
        .max()
        .with_context(|| format!("plugin {name} has no version before {current}"))?;
    entry.plugin = format!("{name}@{previous}");
    let (_, body) = client
        .put_json(
            &format!("/admin/v1/pipelines/{pipeline}"),
            &serde_json::json!(doc),
        )
        .await?;
    println!(
        "pipeline {pipeline}@{}: {name}@{current} replaced by {name}@{previous}",
        body["version"]
    );
    Ok(())
}

fn print_status(status: &serde_json::Value) {
    println!(
        "control plane version {} ({}), store {}",
        status["control_version"],
        status["change"].as_str().unwrap_or(""),
        status["store"].as_str().unwrap_or("")
    );
    let instances = status["instances"].as_array().cloned().unwrap_or_default();
    println!("{} live instance(s)", instances.len());
    for i in instances {
        let plugins: Vec<&str> = i["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        println!(
            "  {}  version {}  pipeline {}@{}  plugins [{}]  lag {}{}",
            i["id"].as_str().unwrap_or(""),
            i["control_version"],
            i["pipeline"].as_str().unwrap_or(""),
            i["pipeline_version"],
            plugins.join(", "),
            i["consumer_lag"],
            i["error"]
                .as_str()
                .map(|e| format!("\n    ERROR: {e}"))
                .unwrap_or_default()
        );
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
    let events =
        dry_run::parse_samples(&body).map_err(|e| anyhow::anyhow!("{}: {e}", events.display()))?;
    let name = component
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let runtime = Runtime::new()?;
    let compile = Instant::now();
    let plugin = runtime.load(&name, &bytes, config, limits).await?;
    let compile = compile.elapsed();
    let report = dry_run::run(&plugin, &events, batch_size).await?;
    for line in &report.outcomes {
        println!("{line}");
    }
    let per_event = report.call_time.as_secs_f64() * 1e6 / events.len().max(1) as f64;
    eprintln!(
        "{}@{}: {} events: {} kept, {} dropped, {} rejected, {} failed",
        plugin.name(),
        plugin.version(),
        events.len(),
        report.kept,
        report.dropped,
        report.rejected,
        report.failed
    );
    eprintln!(
        "compile {:.1} ms; calls {:.3} ms in all, {per_event:.2} us/event (batch {batch_size}); peak memory {} KiB of {} MiB; counters {:?}",
        compile.as_secs_f64() * 1e3,
        report.call_time.as_secs_f64() * 1e3,
        report.peak_memory_bytes / 1024,
        limits.memory_bytes >> 20,
        report.counters
    );
    Ok(())
}
