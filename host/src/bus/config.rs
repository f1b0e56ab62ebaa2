//! `[kafka]`: the Kafka cluster, topic and consumer group.

use std::collections::HashMap;

use serde::Deserialize;

/// `[kafka]`: brokers, topic and consumer group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Topic holding accepted events. Default `weir.events`.
    pub topic: String,
    /// Partitions of the topic when weir creates it. Default 4.
    pub partitions: i32,
    /// Replication factor when weir creates the topic. Default 1.
    pub replication_factor: i32,
    /// Consumer group of the processors. Default `weir-processor`.
    pub group: String,
    /// How long ingest waits for Kafka to acknowledge a request's events before it
    /// answers 503, in milliseconds. Default 5000.
    pub produce_timeout_ms: u64,
    /// Consumer session timeout in milliseconds. Default 10000.
    pub session_timeout_ms: u64,
    /// Longest a fetch request may wait at the broker for new records
    /// (librdkafka's `fetch.wait.max.ms`), in milliseconds. Default 50. Kafka answers a
    /// fetch as soon as a record arrives, whatever this is; Tansu holds every fetch
    /// for this long (half of it from 500 ms up), so there it bounds how fresh
    /// counters and rows can be, and a lower value costs the broker CPU (more
    /// fetches). 1-10000.
    pub fetch_wait_max_ms: u64,
    /// How long the producer waits to batch records bound for the same partition
    /// (librdkafka's `linger.ms`), in milliseconds. Default 5: fewer, fuller produce
    /// requests (less broker CPU) for a few milliseconds of ingest latency. 0-1000.
    pub linger_ms: u64,
    /// Extra librdkafka properties for both producer and consumer, e.g.
    /// `{ "security.protocol" = "ssl" }`.
    pub properties: HashMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "weir.events".into(),
            partitions: 4,
            replication_factor: 1,
            group: "weir-processor".into(),
            produce_timeout_ms: 5000,
            session_timeout_ms: 10_000,
            fetch_wait_max_ms: 50,
            linger_ms: 5,
            properties: HashMap::new(),
        }
    }
}
