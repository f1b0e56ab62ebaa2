//! The Redis counter sink: counters by name and key (and by UTC day), per app.
//!
//! Layout (prefix `weir` by default):
//! - `{prefix}:c:{app}:{counter}`: a hash, key -> total;
//! - `{prefix}:c:{app}:{counter}:{YYYY-MM-DD}`: a hash per day (counters declared
//!   `by_day`), expiring after the counter's retention;
//! - `{prefix}:offsets:{group}:{topic}`: a hash, partition -> the position of the last
//!   Kafka record whose increments the counters hold: `offset:received_ms` (the
//!   record's receive time; a bare `offset` from weir before 2026-12-07 is read too).
//!
//! Exactly once: the increments of a partition are summed per key, then applied by a
//! Lua script that, in one atomic step, checks that the partition's offset in Redis is
//! still the one this instance last saw, applies every sum and stores the new offset.
//! After a crash, the replayed records at or below the stored offset are left out; if
//! another instance moved the offset meanwhile (a rebalance, a zombie), the script
//! refuses, the increments are filtered again against the new offset and retried. All
//! partitions of a flush go in one pipelined round trip. A stored position is checked
//! against the partition's log when it is loaded (`bus::LogProbe`): if the log does not
//! reach its offset, or holds a record received at another time there, the topic was
//! deleted and created again since (its offsets start at 0 again), so nothing is
//! skipped as a replay of it and the next increments replace it.
//!
//! An increment Redis can never take (a key of another type, a field that is not an
//! integer, a sum past +-9.2e18) makes the script refuse the partition's flush whole;
//! the sink then checks the partition's events one by one (a script that applies
//! nothing), writes the dead letters of those Redis refuses (stage `sink`,
//! `counter:<name>`) through the dead-letter store, takes their increments out, and
//! applies the rest. The dead letters are written first: a crash before the rest is
//! applied replays the refusal, and the store skips what it already holds.
//!
//! While Redis is unreachable, increments wait in memory (up to `redis.max_pending`)
//! and the partitions they come from are not committed in Kafka, so a crash meanwhile
//! loses nothing either.

mod config;
mod sink;

pub use config::*;
pub use sink::*;
