//! The Kafka topic sink: forwards kept events of configured names to another topic,
//! for other consumers (a search indexer, a fraud service ...).
//!
//! A record per event: the event as JSON (with its `app`), keyed by the user id (or
//! the event id) so that one user's events keep their order, with a `weir-event-id`
//! header. Records are produced with acks=all as part of the flush; the flush's offsets
//! are committed only after every record was acknowledged. Delivery is at least once:
//! a record acknowledged before a crash is produced again by the replay, with the
//! same `event_id` for consumers to deduplicate on.

mod config;
mod sink;

pub use config::*;
pub use sink::*;
