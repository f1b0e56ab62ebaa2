//! The `weir` command line (the binary's `main` is [`main`]).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
    /// Checks a configuration file and exits.
    CheckConfig {
        #[arg(short, long, env = "WEIR_CONFIG", default_value = "weir.toml")]
        config: PathBuf,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,cranelift=warn,wasmtime=warn"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match cli.command {
        Command::Serve { config } => {
            let config = crate::config::Config::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(crate::serve::serve(config, crate::serve::signal()))
        }
        Command::CheckConfig { config } => {
            let config = crate::config::Config::load(&config)?;
            let runtime = crate::runtime::Runtime::new()?;
            let pipeline = crate::pipeline::Pipeline::load(
                &runtime,
                &config.pipeline,
                config.processor.plugin_batch_size,
            )?;
            println!(
                "config ok; pipeline {} runs [{}]",
                pipeline.name(),
                pipeline.versions()
            );
            Ok(())
        }
    }
}
