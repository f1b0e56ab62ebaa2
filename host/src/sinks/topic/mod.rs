//! The Kafka topic sink: forwards kept events of configured names to another topic,
//! for other consumers (a search indexer, a fraud service ...).
//!
//! A record per event: the event as JSON (with its `app`), keyed by the user id (or
//! the event id) so that one user's events keep their order, with a `weir-event-id`
//! header. Records are produced with acks=all by an idempotent producer (librdkafka's
//! resend of a request whose answer was lost is stored once) as part of the flush; the flush's offsets
//! are committed only after every record was acknowledged. Delivery is at least once:
//! a record acknowledged before a crash is produced again by the replay, with the
//! same `event_id` for consumers to deduplicate on. A record the producer or the broker
//! refuses for good (larger than `max_record_bytes` or the topic's limit, or refused
//! by a broker's record policy) is not retried: the event goes to `dead_letters` with
//! stage `sink`, `plugin = "topic:<name>"` and the broker's reason.

mod config;
mod sink;

pub use config::*;
pub use sink::*;
