use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

use super::config::{TopicConfig, TopicKey};
use crate::bus::{KafkaConfig, SelfHealingProducer};
use crate::metrics::events::{EventsRefused, InternalEvent, ReplayedDeliveriesSkipped};
use crate::model::{DeadLetter, Kept, Slot, Stage, Target};
use crate::sinks::{
    BoxError, DeadLetterStore, DeliveryMarks, Flush, Marks, Refusal, Sink, highest,
};

/// Errors producing to the topic.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("topic sink {name}: cannot create its producer: {source}")]
    Create {
        name: String,
        source: Box<rdkafka::error::KafkaError>,
    },
    #[error("topic sink {name}: {failed} of {total} records not acknowledged by {topic}: {first}")]
    Produce {
        name: String,
        topic: String,
        failed: usize,
        total: usize,
        first: String,
    },
}

/// One configured topic sink.
pub struct TopicSink {
    name: String,
    /// Position among the pipeline's topic sinks (what plugins' `forward` outputs name).
    index: usize,
    topic: String,
    events: HashSet<String>,
    key: TopicKey,
    producer: SelfHealingProducer,
    timeout: Duration,
    /// The events of the current flush already acknowledged, or refused for good.
    sent: HashSet<Slot>,
    /// The events of the current flush refused for good, not yet dead-lettered, and
    /// when the first was refused.
    refused: Vec<DeadLetter>,
    refused_ms: i64,
    /// Where the events refused for good go, before their partition's mark passes them.
    dead_letters: Arc<dyn DeadLetterStore>,
    /// What this sink produced before a crash or a rebalance.
    marks: Marks,
}

/// True for a produce error that retrying cannot change: the record is too large for
/// the producer's or the broker's limit, or the broker refuses it as invalid.
fn is_permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
        )
    )
}

impl TopicSink {
    /// A producer to the sink's topic. Events it refuses for good go to
    /// `dead_letters`; what it produced is marked in `marks` (none: a replay produces
    /// again).
    pub fn new(
        cfg: &TopicConfig,
        index: usize,
        kafka: &KafkaConfig,
        dead_letters: Arc<dyn DeadLetterStore>,
        marks: Option<Arc<dyn DeliveryMarks>>,
    ) -> Result<Self, TopicError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &kafka.brokers);
        for (k, v) in &kafka.properties {
            c.set(k, v);
        }
        c.set("message.timeout.ms", kafka.produce_timeout_ms.to_string())
            .set("linger.ms", "5")
            .set("message.max.bytes", cfg.max_record_bytes.to_string())
            // A produce request holds at most message.max.bytes: batches stay below.
            .set(
                "batch.size",
                cfg.max_record_bytes.min(1_000_000).to_string(),
            );
        let timeout = Duration::from_millis(kafka.produce_timeout_ms);
        let producer = SelfHealingProducer::new(c, timeout * 2, format!("topic:{}", cfg.name))
            .map_err(|source| TopicError::Create {
                name: cfg.name.clone(),
                source: Box::new(source),
            })?;
        Ok(Self {
            name: cfg.name.clone(),
            index,
            topic: cfg.topic.clone(),
            events: cfg.events.iter().cloned().collect(),
            key: cfg.key,
            producer,
            timeout: Duration::from_millis(kafka.produce_timeout_ms),
            sent: HashSet::new(),
            refused: Vec::new(),
            refused_ms: 0,
            dead_letters,
            marks: Marks::new(marks, format!("topic:{}", cfg.name)),
        })
    }

    /// True for a kept event this sink takes (by name, or forwarded to it by a plugin).
    fn takes(&self, k: &Kept) -> bool {
        self.events.contains(&k.event.name) || k.forwards.contains(&Target::Topic(self.index))
    }

    /// Produces a record per kept event this sink takes, not yet acknowledged in this
    /// flush nor produced before it (a replay: the partition's mark is past it), and
    /// waits for the acknowledgements; a retry produces only what failed. A record
    /// refused for good is not produced again: its event is kept in `refused`. Returns
    /// the records produced.
    async fn produce(&mut self, kept: &[Kept]) -> Result<usize, TopicError> {
        let mut replayed = 0;
        let mut todo: Vec<(Slot, &Kept)> = Vec::new();
        for k in kept {
            if !self.takes(k) {
                continue;
            }
            let slot = k.origin.slot();
            if self.sent.contains(&slot) {
                continue;
            }
            if self.marks.delivered(slot) {
                // Done for this flush: a retry does not count it again.
                self.sent.insert(slot);
                replayed += 1;
                continue;
            }
            todo.push((slot, k));
        }
        if replayed > 0 {
            ReplayedDeliveriesSkipped {
                sink: self.marks.sink(),
                events: replayed,
            }
            .emit();
        }
        let sent = &mut self.sent;
        let payloads: Vec<String> = todo
            .iter()
            .map(|(_, k)| {
                let json = k.event.to_json();
                let app = serde_json::to_string(&k.event.app).unwrap_or_default();
                format!("{{\"app\":{app},{}", &json[1..])
            })
            .collect();
        let producer = self.producer.get();
        let sends = todo.iter().zip(&payloads).map(|((_, k), payload)| {
            let key = match self.key {
                TopicKey::UserId => k.event.user_id.as_deref().unwrap_or(&k.event.event_id),
                TopicKey::EventId => &k.event.event_id,
            };
            let headers = OwnedHeaders::new().insert(Header {
                key: "weir-event-id",
                value: Some(k.event.event_id.as_str()),
            });
            let record = FutureRecord::to(&self.topic)
                .payload(payload.as_str())
                .key(key)
                .headers(headers);
            producer.send(record, Timeout::After(self.timeout))
        });
        let results = join_all(sends).await;
        let total = results.len();
        let mut first = None;
        let mut failed = 0;
        let mut produced = 0;
        for ((i, k), result) in todo.iter().zip(results) {
            match result {
                Ok(_) => {
                    sent.insert(*i);
                    produced += 1;
                    self.producer.succeeded();
                }
                Err((e, _)) if is_permanent(&e) => {
                    sent.insert(*i);
                    let reason = format!("topic {} refused the event's record: {e}", self.topic);
                    if self.refused.is_empty() {
                        self.refused_ms = crate::model::now_ms();
                    }
                    self.refused.push(
                        DeadLetter::of(k.origin, k.event.clone(), Stage::Sink, reason)
                            .by(self.marks.sink(), ""),
                    );
                }
                Err((e, _)) => {
                    failed += 1;
                    self.producer.failed(&e);
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
        match first {
            None => Ok(produced),
            Some(first) => Err(TopicError::Produce {
                name: self.name.clone(),
                topic: self.topic.clone(),
                failed,
                total,
                first,
            }),
        }
    }
}

impl Sink for TopicSink {
    fn kind(&self) -> &'static str {
        "topic"
    }

    /// Produces the flush's events this sink takes (less what it produced before a
    /// replay), dead-letters the ones the broker refuses for good, then marks them
    /// all delivered. A failed step fails the attempt; the retry goes on from it.
    fn write<'a>(&'a mut self, flush: Flush<'a>) -> BoxFuture<'a, Result<Vec<Refusal>, BoxError>> {
        Box::pin(async move {
            let mine: Vec<crate::model::Origin> = flush
                .batch
                .kept
                .iter()
                .filter(|k| self.takes(k))
                .map(|k| k.origin)
                .collect();
            if mine.is_empty() {
                return Ok(Vec::new());
            }
            self.marks.load(mine.iter().map(|o| o.partition)).await?;
            let n = self.produce(&flush.batch.kept).await.inspect_err(
                |e| tracing::error!(error = %e, "flush to a Kafka topic sink failed"),
            )?;
            if n > 0 {
                crate::metrics::SINK_ROWS
                    .with_label_values(&[&format!("topic:{}", self.topic)])
                    .inc_by(n as u64);
            }
            if let Some(first) = self.refused.first() {
                self.dead_letters
                    .write_dead_letters(
                        &self.refused,
                        flush.pipeline,
                        flush.control_version,
                        self.refused_ms,
                    )
                    .await?;
                EventsRefused {
                    sink: self.marks.sink(),
                    events: self.refused.len(),
                    reason: &first.reason,
                }
                .emit();
                crate::metrics::DEAD_LETTERS
                    .with_label_values(&[Stage::Sink.as_str()])
                    .inc_by(self.refused.len() as u64);
                self.refused.clear();
            }
            self.marks.advance(&highest(mine)).await?;
            Ok(Vec::new())
        })
    }

    fn finish(&mut self) {
        self.sent.clear();
        self.refused.clear();
    }

    /// Their new owner re-reads them and produces what this instance had not.
    fn forget(&mut self, partitions: &HashSet<i32>) {
        self.marks.forget(partitions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::RDKafkaErrorCode as Code;

    #[test]
    fn only_refusals_of_the_record_itself_are_permanent() {
        let produce = |c| KafkaError::MessageProduction(c);
        assert!(is_permanent(&produce(Code::MessageSizeTooLarge)));
        assert!(is_permanent(&produce(Code::InvalidRecord)));
        for transient in [
            Code::MessageTimedOut,
            Code::BrokerTransportFailure,
            Code::NotLeaderForPartition,
            Code::QueueFull,
            Code::UnknownTopicOrPartition,
        ] {
            assert!(!is_permanent(&produce(transient)), "{transient:?}");
        }
    }
}
