//! weir: a WebAssembly-plugin event processor.
//!
//! Follow one event through the modules, top to bottom:
//! [`ingest`] (HTTP, envelope checks) → [`bus`] (Kafka) → [`pipeline`] (decode, plugin
//! chain, outcomes, routing) → [`runtime`] (the Wasm sandbox) → [`sinks`] (ClickHouse,
//! Redis counters, webhooks).
//! [`config`] is the TOML configuration; [`serve`] wires everything together.

pub mod bus;
pub mod cli;
pub mod config;
pub mod control;
pub mod failpoint;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod runtime;
pub mod serve;
pub mod sinks;
