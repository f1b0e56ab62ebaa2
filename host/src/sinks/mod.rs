//! Sinks: where processed events go. Each sink lives in its own folder with the same
//! files (`mod.rs`: what it guarantees; `config.rs`: its configuration; `sink.rs`: the
//! sink itself); sinks know nothing of plugins, and no sink uses another: what they
//! share is declared here.
//!
//! Every sink answers the processor through one contract, [`Sink`]: the worker hands
//! each flush to every sink, retries the ones that failed, commits each partition only
//! as far as every sink says it may ([`Sink::commit_limit`]), and tells every sink
//! which partitions a rebalance took away ([`Sink::forget`]). An error of an attempt
//! is retried; an event a sink can never take (its row refused for bad data) is named
//! in the attempt's answer as a [`Refusal`], and the worker sets it aside in
//! `dead_letters` (stage `sink`) so that the partition goes on. A sink that delivers on
//! its own, after the flush (webhooks, counters waiting for Redis), or that marks its
//! deliveries (topic sinks: a record too large for the broker), writes what it gives
//! up on through a [`DeadLetterStore`] instead, before it lets the partition's commit
//! (or its mark) pass the event. How a sink keeps its promise (write within the flush,
//! or queue and deliver on its own) is its business;
//! each guards itself against the replays of Kafka (a crash re-delivers what was not
//! committed), so no sink's guard can hide events from another: ClickHouse by looking
//! up the coordinates it stored, the counters by the offsets stored with their sums,
//! webhooks and topics by their [`DeliveryMarks`].
//!
//! Adding a sink: a folder with these files, and the line in `serve.rs` that builds it
//! into the worker's list.

pub mod clickhouse;
pub mod counters;
pub mod topic;
pub mod webhook;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::model::{Batch, DeadLetter, Origin, Slot};

/// One flush, as every sink gets it.
#[derive(Clone, Copy)]
pub struct Flush<'a> {
    pub batch: &'a Batch,
    /// The pipeline's name and `name@version` of its plugins, recorded with rows.
    pub pipeline: &'a str,
    pub plugins: &'a str,
    /// The control-plane version of the pipeline that processed the batch.
    pub control_version: u64,
    /// The pipeline's declared tables: what [`crate::model::Batch::rows`] indexes.
    pub tables: &'a Arc<[clickhouse::Table]>,
}

/// What the processor asks of every sink.
pub trait Sink: Send {
    /// The kind of sink, as the `sink` label of `weir_sink_errors_total`:
    /// `clickhouse`, `redis`, `webhook`, `topic`.
    fn kind(&self) -> &'static str;

    /// Takes a flush. `Ok` once the sink holds it as it promises (written, or queued
    /// for delivery of its own), with the kept events it refused for good (an error
    /// that retrying cannot change: bad data, not an unreachable server); the worker
    /// dead-letters those. `Err` if this attempt failed: the worker keeps the flush's
    /// offsets, pauses consumption and calls again with the same flush (less the
    /// partitions revoked meanwhile) until `Ok`. A sink remembers what it finished of
    /// a flush, so that a retry writes only the rest; [`Sink::finish`] ends the flush.
    ///
    /// An attempt may be abandoned (dropped) when it takes longer than
    /// `processor.write_timeout_ms`; the next call must then treat it like a failed
    /// attempt whose writes may or may not have happened.
    ///
    /// Only kept events (and their rows) may be refused: a sink that cannot write a
    /// dead letter reports an error, retried like an outage, since there is nowhere
    /// further to set it aside.
    fn write<'a>(&'a mut self, flush: Flush<'a>) -> BoxFuture<'a, Result<Vec<Refusal>, BoxError>>;

    /// Every sink took the flush (or the worker gave it up at shutdown): forget what
    /// was finished of it.
    fn finish(&mut self) {}

    /// The lowest offset of `partition` the sink took but has not delivered yet: the
    /// partition may be committed up to it, not beyond. `None`: nothing outstanding.
    fn commit_limit(&self, _partition: i32) -> Option<i64> {
        None
    }

    /// A rebalance took `partitions` away: forget what is held of them (their new owner
    /// re-reads them).
    fn forget(&mut self, _partitions: &HashSet<i32>) {}

    /// When the sink wants [`Sink::retry`] called: it holds undelivered events and
    /// has no task of its own to deliver them.
    fn retry_at(&self) -> Option<Instant> {
        None
    }

    /// Tries again to deliver what the sink holds.
    fn retry(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// True while the sink holds as much as it may (bounded memory): the worker takes
    /// no new batch, and calls [`Sink::retry`] at [`Sink::retry_at`], until it is false.
    fn is_full(&self) -> bool {
        false
    }
}

/// A kept event a sink refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The event (its coordinates in the stream).
    pub origin: Origin,
    /// The sink and where in it: `clickhouse:<table>`, `topic:<name>`. Stored as the
    /// dead letter's `plugin`.
    pub sink: String,
    /// Why, as the sink's server said it.
    pub reason: String,
}

/// Any error a sink reports through a shared contract.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a sink that sets events aside on its own (a webhook, the counters, a topic
/// sink) writes them. The ClickHouse sink is one (`dead_letters`).
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Writes `dead`, failed at `failed_ms` (ms since the epoch), recording the
    /// pipeline and control-plane version that kept them. Dead letters the store
    /// already holds (same coordinates, event, stage and plugin: written before a
    /// crash replayed their events) are not written again. A caller that retries
    /// passes the same `failed_ms` every time, so that a retry writes the same rows
    /// (what a replicated table recognises as the same block).
    fn write_dead_letters<'a>(
        &'a self,
        dead: &'a [DeadLetter],
        pipeline: &'a str,
        control_version: u64,
        failed_ms: i64,
    ) -> BoxFuture<'a, Result<(), BoxError>>;
}

/// How far a sink that delivers outside weir's tables (a webhook, a topic sink) has
/// delivered each partition, kept where a restarted instance, or the next owner of a
/// partition after a rebalance, finds it. A replay of Kafka (what was not committed
/// before a crash or a rebalance is read again) then skips what was delivered instead
/// of delivering it twice.
///
/// A mark is a slot: the sink delivered (or dead-lettered) every event of the
/// partition up to and including it, in order. A sink advances its marks right after a
/// delivery is acknowledged, so only a crash while a delivery is in flight or before
/// its mark delivers an event twice; the event ids (and a webhook's
/// `Idempotency-Key`) are there for the receiver in that case.
pub trait DeliveryMarks: Send + Sync + 'static {
    /// The marks of `sink` for `partitions`, in their order (`None`: nothing marked).
    fn load<'a>(
        &'a self,
        sink: &'a str,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<Vec<Option<Slot>>, BoxError>>;

    /// Moves the marks of `sink` forward to the events at `origins` (at most one per
    /// partition; their receive time is kept with them, to tell a record of this topic
    /// from one of an earlier topic of the same name). A mark never moves back: an
    /// event below the stored mark leaves it as it is.
    fn advance<'a>(
        &'a self,
        sink: &'a str,
        origins: &'a [Origin],
    ) -> BoxFuture<'a, Result<(), BoxError>>;
}

/// A sink's view of its [`DeliveryMarks`]: the marks of the partitions it has seen
/// since they were assigned, loaded once each.
pub struct Marks {
    store: Option<Arc<dyn DeliveryMarks>>,
    /// The sink as the store names it: `webhook:<name>`, `topic:<name>`.
    sink: String,
    known: HashMap<i32, Option<Slot>>,
}

impl Marks {
    /// Marks of `sink` in `store`; without a store (deduplication off) nothing is
    /// marked and every replayed event is delivered again (at least once).
    pub fn new(store: Option<Arc<dyn DeliveryMarks>>, sink: String) -> Self {
        Self {
            store,
            sink,
            known: HashMap::new(),
        }
    }

    /// Loads the marks of the `partitions` not loaded since their assignment.
    pub async fn load(
        &mut self,
        partitions: impl IntoIterator<Item = i32>,
    ) -> Result<(), BoxError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut wanted: Vec<i32> = partitions
            .into_iter()
            .filter(|p| !self.known.contains_key(p))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(());
        }
        let marks = store.load(&self.sink, &wanted).await?;
        self.known.extend(wanted.into_iter().zip(marks));
        Ok(())
    }

    /// True if the sink delivered the event at `slot` before (a replay): its partition's
    /// mark, loaded by [`Marks::load`], is at or past it.
    pub fn delivered(&self, slot: Slot) -> bool {
        let (partition, offset, index) = slot;
        matches!(self.known.get(&partition), Some(Some((_, o, i))) if (*o, *i) >= (offset, index))
    }

    /// A rebalance took `partitions` away: their marks are loaded again if they come
    /// back (another instance may have moved them meanwhile).
    pub fn forget(&mut self, partitions: &HashSet<i32>) {
        self.known.retain(|p, _| !partitions.contains(p));
    }

    /// Moves the sink's marks forward (see [`DeliveryMarks::advance`]).
    pub async fn advance(&self, origins: &[Origin]) -> Result<(), BoxError> {
        match &self.store {
            Some(store) => store.advance(&self.sink, origins).await,
            None => Ok(()),
        }
    }

    /// The sink's name in the store: `webhook:<name>`, `topic:<name>`.
    pub fn sink(&self) -> &str {
        &self.sink
    }

    /// The store and the sink's name in it, for a delivery task of the sink's own.
    pub fn store(&self) -> Option<(Arc<dyn DeliveryMarks>, String)> {
        self.store.clone().map(|s| (s, self.sink.clone()))
    }
}

/// The last of `origins` per partition (by offset and position in the record): what
/// [`DeliveryMarks::advance`] takes once they are all delivered.
pub fn highest(origins: impl IntoIterator<Item = Origin>) -> Vec<Origin> {
    let mut top: BTreeMap<i32, Origin> = BTreeMap::new();
    for o in origins {
        let at = top.entry(o.partition).or_insert(o);
        if (o.offset, o.index) > (at.offset, at.index) {
            *at = o;
        }
    }
    top.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64, index: u32) -> Origin {
        Origin {
            partition,
            offset,
            index,
            received_ms: offset * 10,
        }
    }

    #[test]
    fn the_last_event_of_each_partition_is_marked() {
        let last = highest([
            at(1, 5, 0),
            at(0, 9, 1),
            at(1, 5, 3),
            at(0, 9, 0),
            at(1, 4, 9),
        ]);
        assert_eq!(last, vec![at(0, 9, 1), at(1, 5, 3)]);
        assert!(highest([]).is_empty());
    }

    #[test]
    fn what_a_mark_covers_is_delivered_and_a_forgotten_partition_is_not() {
        let mut marks = Marks::new(None, "webhook:crm".into());
        // Without a store nothing is marked: every replayed event is delivered.
        assert!(!marks.delivered((0, 0, 0)));
        marks.known.insert(0, Some((0, 41, 7)));
        marks.known.insert(1, None);
        assert!(marks.delivered((0, 41, 7)));
        assert!(marks.delivered((0, 41, 6)));
        assert!(marks.delivered((0, 3, 99)));
        assert!(!marks.delivered((0, 41, 8)));
        assert!(!marks.delivered((0, 42, 0)));
        assert!(!marks.delivered((1, 0, 0)));
        marks.forget(&HashSet::from([0]));
        assert!(!marks.delivered((0, 3, 99)));
    }
}
