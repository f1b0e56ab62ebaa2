//! What the pipeline makes of a batch of events: what every sink reads.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::event::{Event, Origin};

/// An event that went through the whole chain.
#[derive(Debug, Clone)]
pub struct Kept {
    pub origin: Origin,
    pub event: Event,
    /// Webhooks and topic sinks a plugin forwarded the event to (usually none).
    pub forwards: Vec<Target>,
}

/// Where an event was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The Kafka record is not a weir ingest record.
    Decode,
    /// The event failed its JSON Schema.
    Schema,
    /// A plugin rejected the event or failed on it.
    Plugin,
    /// A webhook refused the event, or its retries ran out.
    Webhook,
    /// A sink refused the event for good (ClickHouse refused its row, the broker its
    /// record): retrying would fail the same way, so the event is set aside here and
    /// the partition goes on.
    Sink,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Decode,
        Stage::Schema,
        Stage::Plugin,
        Stage::Webhook,
        Stage::Sink,
    ];

    /// The name stored in `dead_letters.stage` and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Schema => "schema",
            Stage::Plugin => "plugin",
            Stage::Webhook => "webhook",
            Stage::Sink => "sink",
        }
    }

    /// The stage stored as `name`.
    pub fn parse(name: &str) -> Option<Stage> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that was refused or failed, with the stage and reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub origin: Origin,
    pub event_id: String,
    pub app: String,
    pub name: String,
    pub stage: Stage,
    /// The plugin (stage `plugin`), webhook (stage `webhook`) or sink (stage `sink`:
    /// `clickhouse:<table>`, `topic:<name>`, `counter:<name>`) at fault.
    pub plugin: String,
    pub plugin_version: String,
    pub reason: String,
    /// The event as JSON (or the record's bytes, lossily, for `decode`).
    pub raw: String,
}

impl DeadLetter {
    /// The dead letter of `event`, failed at `stage` for `reason`.
    pub fn of(origin: Origin, event: Event, stage: Stage, reason: String) -> Self {
        Self {
            origin,
            raw: event.to_json(),
            event_id: event.event_id,
            app: event.app,
            name: event.name,
            stage,
            plugin: String::new(),
            plugin_version: String::new(),
            reason,
        }
    }

    /// Names the plugin (or webhook) at fault.
    pub fn by(mut self, plugin: &str, version: &str) -> Self {
        plugin.clone_into(&mut self.plugin);
        version.clone_into(&mut self.plugin_version);
        self
    }
}

/// Why a plugin failed on an event (as opposed to rejecting it, which is the plugin's
/// own verdict).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The batch call ran past the plugin's deadline.
    Deadline,
    /// The plugin asked for more linear memory than its cap.
    MemoryCap,
    /// The wasm stack overflowed its cap.
    StackOverflow,
    /// Any other trap (a panic, `unreachable`, an out-of-bounds access ...).
    Trap,
    /// The plugin answered something invalid (the wrong number of outcomes, an event
    /// renamed badly, properties that are not an object, an output the pipeline does
    /// not declare).
    BadOutcome,
    /// The plugin is quarantined after repeated failures and was not called.
    Quarantined,
}

impl FailureKind {
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Deadline,
        FailureKind::MemoryCap,
        FailureKind::StackOverflow,
        FailureKind::Trap,
        FailureKind::BadOutcome,
        FailureKind::Quarantined,
    ];

    /// The metric label (`weir_plugin_failures_total{kind}`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Deadline => "deadline",
            FailureKind::MemoryCap => "memory_cap",
            FailureKind::StackOverflow => "stack_overflow",
            FailureKind::Trap => "trap",
            FailureKind::BadOutcome => "bad_outcome",
            FailureKind::Quarantined => "quarantined",
        }
    }
}

/// A plugin's failure on one event: what kind, and the message recorded as the dead
/// letter's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl PluginFailure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A row for a routed table, from an event that completed the chain.
#[derive(Debug, Clone)]
pub struct RoutedRow {
    pub origin: Origin,
    pub event_id: String,
    pub app: String,
    pub timestamp_ms: i64,
    /// The declared columns, encoded as the table's sink writes them (RowBinary).
    pub data: Vec<u8>,
}

/// A declared counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub name: String,
    /// Also counts per UTC day of the event's timestamp.
    pub by_day: bool,
    pub day_retention_days: u32,
}

/// A counter increment from an event that completed the chain.
#[derive(Debug, Clone)]
pub struct CountRow {
    pub origin: Origin,
    pub app: String,
    /// The counter (of the pipeline version that produced the increment).
    pub counter: Arc<Counter>,
    pub key: String,
    pub delta: i64,
    /// The event's time (for per-day counts).
    pub timestamp_ms: i64,
}

/// A forwarding sink a plugin can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Index into the pipeline's webhooks.
    Webhook(usize),
    /// Index into the pipeline's topic sinks.
    Topic(usize),
}

/// The result of processing one batch: what the sinks write.
#[derive(Debug, Default)]
pub struct Batch {
    pub kept: Vec<Kept>,
    pub dead: Vec<DeadLetter>,
    pub dropped: usize,
    /// Routed rows, by the table's index among the pipeline's tables; tables without
    /// rows are absent.
    pub rows: BTreeMap<usize, Vec<RoutedRow>>,
    pub counts: Vec<CountRow>,
}

impl Batch {
    /// Appends what a later part of the same events gave (a batch processed in
    /// chunks).
    pub fn append(&mut self, other: Batch) {
        self.kept.extend(other.kept);
        self.dead.extend(other.dead);
        self.dropped += other.dropped;
        for (table, rows) in other.rows {
            self.rows.entry(table).or_default().extend(rows);
        }
        self.counts.extend(other.counts);
    }

    /// Takes the events of `partitions` out of the batch (a rebalance gave them to
    /// another instance, which re-reads them).
    pub fn drop_partitions(&mut self, partitions: &HashSet<i32>) {
        let keep = |o: &Origin| !partitions.contains(&o.partition);
        self.kept.retain(|k| keep(&k.origin));
        self.dead.retain(|d| keep(&d.origin));
        for rows in self.rows.values_mut() {
            rows.retain(|r| keep(&r.origin));
        }
        self.counts.retain(|c| keep(&c.origin));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_round_trip_through_their_names() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
        }
        assert_eq!(Stage::parse("sinks"), None);
    }
}
