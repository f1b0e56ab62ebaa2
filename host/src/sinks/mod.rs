//! Sinks: where processed events go. Each sink lives in its own folder with the same
//! files (`mod.rs`: what it guarantees; `config.rs`: its configuration; `sink.rs`: the
//! sink itself); sinks know nothing of plugins, and no sink uses another: what they
//! share is declared here.

pub mod clickhouse;
pub mod counters;
pub mod topic;
pub mod webhook;

use futures::future::BoxFuture;

use crate::model::DeadLetter;

/// Any error a sink reports through a shared contract.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a sink that delivers on its own (a webhook) writes the events it gives up
/// on. The ClickHouse sink is one (`dead_letters`).
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Writes `dead`, recording the pipeline and control-plane version that kept them.
    fn write_dead_letters<'a>(
        &'a self,
        dead: &'a [DeadLetter],
        pipeline: &'a str,
        control_version: u64,
    ) -> BoxFuture<'a, Result<(), BoxError>>;
}
