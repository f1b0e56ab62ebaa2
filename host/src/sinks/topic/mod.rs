//! The Kafka topic sink: forwards kept events of configured names to another topic,
//! for other consumers (a search indexer, a fraud service ...).
//!
//! A record per event: the event as JSON (with its `app`), keyed by the user id (or
//! the event id) so that one user's events keep their order, with a `weir-event-id`
//! header. Records are produced with acks=all by an idempotent producer (librdkafka's
//! resend of a request whose answer was lost is stored once) as part of the flush; the flush's offsets
//! are committed only after every record was acknowledged. Once a flush's records are
//! acknowledged (and those refused for good dead-lettered) the sink marks each
//! partition's last event delivered ([`crate::sinks::DeliveryMarks`]); a replay after a
//! crash or a rebalance skips what the marks cover. Only a crash while a flush's
//! records are being produced, or before their mark, produces records again, with the
//! same `event_id` for consumers to deduplicate on. A record the producer or the broker
//! refuses for good (larger than `max_record_bytes` or the topic's limit, or refused
//! by a broker's record policy) is not retried: the sink writes the event to
//! `dead_letters` itself, through the dead-letter store, with stage `sink`,
//! `plugin = "topic:<name>"` and the broker's reason.

mod config;
mod sink;

pub use config::*;
pub use sink::*;
