//! The webhook sink: POSTs kept events of configured names to an HTTP endpoint (a
//! customer-engagement tool, an internal service), in batches, with retries.
//!
//! Each webhook runs in its own task behind a bounded queue, so a slow or failing
//! endpoint delays only itself until its queue is full; then the processor waits for
//! room (bounded memory) instead of buffering without end. A failed POST is retried
//! with backoff up to `max_attempts`, then its events go to
//! `dead_letters` (stage `webhook`); a 4xx answer other than 408 and 429 dead-letters
//! at once. Each event carries its `event_id`, the receiver's idempotency key; the
//! `Idempotency-Key` header is the event id for a single event, and a digest of the
//! batch's event ids for a batch (the same on every retry). The Kafka offset of an
//! event is committed only once it was delivered or dead-lettered, so a crash re-sends
//! rather than loses; and a partition's events are delivered in order, each batch
//! marked delivered ([`crate::sinks::DeliveryMarks`]) right after its answer, so a
//! replay skips what was delivered. Only a crash while a POST is in flight or before
//! its mark, or a batch in flight while a rebalance gives its partition away, sends
//! events again.

mod config;
mod sink;

pub use config::*;
pub use sink::*;
