//! Sinks: where processed events go. Each sink lives in its own folder with the same
//! shape; sinks know nothing of plugins or Kafka.

pub mod clickhouse;
pub mod counters;
pub mod topic;
pub mod webhook;
