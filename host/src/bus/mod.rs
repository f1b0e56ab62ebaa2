//! Kafka: the producer ingest writes through, the topic, and the consumer the
//! processor reads from. Delivery is at-least-once: offsets are committed only after
//! the sinks acknowledged what they cover (see `pipeline::worker`).

mod config;

pub use config::KafkaConfig;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::metrics::events::{
    InternalEvent, PartitionsAssigned, PartitionsRevoked, ProducerReplaced, RebalanceFailed,
    StaleOffsetIgnored,
};
use crate::model::IngestRecord;

/// Errors at the Kafka boundary.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("Kafka did not acknowledge the record: {0}")]
    Unavailable(KafkaError),
    #[error("record of {0} bytes is larger than Kafka accepts")]
    TooLarge(usize),
    #[error("Kafka client error: {0}")]
    Client(#[from] KafkaError),
}

/// How long the consumer waits to fetch again after its prefetch queue filled up.
const FETCH_QUEUE_BACKOFF_MS: &str = "20";

/// Largest record the producer sends; topics weir creates accept it too.
pub const MAX_RECORD_BYTES: usize = 8 * 1024 * 1024;

fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// An idempotent producer that replaces itself when it keeps failing.
///
/// An idempotent producer has an identity at the broker (a producer id and epoch)
/// that numbers its records, so that a resend of a request whose answer was lost is
/// stored once. When the broker forgets that identity (a broker that lost its state,
/// as Tansu's memory storage does on a restart; a producer id expired on an idle
/// producer), librdkafka bumps the epoch itself and sends again, which such a broker
/// refuses as an unknown producer, forever. So once every send has failed for
/// `patience`, the next send gets a new producer (a new identity); sends that fail
/// meanwhile fail as before (the caller answers 503 or retries).
pub struct SelfHealingProducer {
    config: ClientConfig,
    current: std::sync::RwLock<FutureProducer>,
    /// Since when every send failed (`None`: the last one succeeded).
    failing_since: Mutex<Option<Instant>>,
    patience: Duration,
    /// Who it produces for, in logs.
    name: String,
}

impl SelfHealingProducer {
    /// `config` with acks=all and idempotence set.
    pub fn new(
        mut config: ClientConfig,
        patience: Duration,
        name: impl Into<String>,
    ) -> Result<Self, KafkaError> {
        config.set("acks", "all").set("enable.idempotence", "true");
        let current = config.create()?;
        Ok(Self {
            config,
            current: std::sync::RwLock::new(current),
            failing_since: Mutex::new(None),
            patience,
            name: name.into(),
        })
    }

    /// The producer to send with now.
    pub fn get(&self) -> FutureProducer {
        self.current.read().expect("producer lock").clone()
    }

    /// A send succeeded.
    pub fn succeeded(&self) {
        *self.failing_since.lock().expect("producer lock") = None;
    }

    /// A send failed with `error`: once sends have failed for `patience` (or at once
    /// when librdkafka calls the producer's state fatal), it is replaced.
    pub fn failed(&self, error: &KafkaError) {
        let now = Instant::now();
        let mut since = self.failing_since.lock().expect("producer lock");
        let first = *since.get_or_insert(now);
        let fatal = self.get().client().fatal_error();
        if fatal.is_none() && now.duration_since(first) < self.patience {
            return;
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                *self.current.write().expect("producer lock") = fresh;
                *since = None;
                ProducerReplaced {
                    producer: &self.name,
                    failing_for: now.duration_since(first),
                    error,
                }
                .emit();
            }
            Err(e) => {
                warn!(producer = %self.name, error = %e, "cannot create a new Kafka producer")
            }
        }
    }
}

/// The ingest side: writes one record per accepted request, acks=all, idempotent (a
/// resend of a request whose answer was lost is stored once).
#[derive(Clone)]
pub struct Producer {
    inner: Arc<SelfHealingProducer>,
    topic: Arc<str>,
    timeout: Duration,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, BusError> {
        let timeout = Duration::from_millis(cfg.produce_timeout_ms);
        let mut config = client_config(cfg);
        config
            .set("message.timeout.ms", cfg.produce_timeout_ms.to_string())
            .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("reconnect.backoff.max.ms", "1000");
        // Two produce timeouts of nothing but failures: the broker is back (or was
        // never gone) and does not know the producer.
        let inner = SelfHealingProducer::new(config, timeout * 2, "ingest")?;
        Ok(Self {
            inner: Arc::new(inner),
            topic: cfg.topic.as_str().into(),
            timeout,
        })
    }

    /// Writes one record and waits until Kafka acknowledged it (or the produce timeout
    /// passed). Returns the partition and offset.
    pub async fn send(&self, record: &IngestRecord, key: &str) -> Result<(i32, i64), BusError> {
        let payload = record.encode();
        if payload.len() > MAX_RECORD_BYTES {
            return Err(BusError::TooLarge(payload.len()));
        }
        let headers = OwnedHeaders::new().insert(Header {
            key: "weir-format",
            value: Some("1"),
        });
        let fut = FutureRecord::to(&self.topic)
            .payload(&payload)
            .key(key)
            .headers(headers);
        match self
            .inner
            .get()
            .send(fut, Timeout::After(self.timeout))
            .await
        {
            Ok(delivery) => {
                self.inner.succeeded();
                Ok((delivery.partition, delivery.offset))
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                Err(BusError::TooLarge(payload.len()))
            }
            Err((e, _)) => {
                self.inner.failed(&e);
                Err(BusError::Unavailable(e))
            }
        }
    }

    /// True when the broker answers a metadata request for the topic within `timeout`.
    pub async fn is_ready(&self, timeout: Duration) -> bool {
        let producer = self.inner.get();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map(|m| m.topics().iter().any(|t| t.error().is_none()))
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }

    /// Waits until queued records are delivered (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.inner.get().flush(timeout) {
            warn!(error = %e, "records still queued for Kafka at shutdown");
        }
    }
}

/// Creates the events topic if it does not exist yet.
pub async fn ensure_topic(cfg: &KafkaConfig) -> Result<(), BusError> {
    ensure_named_topic(cfg, &cfg.topic).await
}

/// Creates topic `name` (with the events topic's partitions and replication) if it
/// does not exist yet.
pub async fn ensure_named_topic(cfg: &KafkaConfig, name: &str) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
    let max_bytes = MAX_RECORD_BYTES.to_string();
    let topic = NewTopic::new(
        name,
        cfg.partitions,
        TopicReplication::Fixed(cfg.replication_factor),
    )
    .set("max.message.bytes", &max_bytes);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics([&topic], &opts).await?;
    for result in results {
        match result {
            Ok(name) => info!(topic = %name, partitions = cfg.partitions, "created Kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(BusError::Client(KafkaError::AdminOp(code))).inspect_err(|_| {
                    warn!(topic = %name, %code, "cannot create Kafka topic");
                });
            }
        }
    }
    Ok(())
}

/// Tracks partitions revoked by a rebalance, so the processor can drop what it
/// buffered from them: their new owner re-reads it from the committed offset.
#[derive(Default)]
pub struct GroupContext {
    revoked: Mutex<HashSet<i32>>,
}

impl GroupContext {
    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> HashSet<i32> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked lock"))
    }
}

impl ClientContext for GroupContext {
    /// librdkafka's statistics (every `STATS_INTERVAL_MS`): the consumer lag of each
    /// assigned partition, i.e. how far the committed offset trails the end of the log.
    fn stats(&self, stats: rdkafka::Statistics) {
        for topic in stats.topics.values() {
            for (&partition, p) in &topic.partitions {
                if partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let label = partition.to_string();
                if p.consumer_lag >= 0 {
                    crate::metrics::CONSUMER_LAG
                        .with_label_values(&[&label])
                        .set(p.consumer_lag);
                } else {
                    let _ = crate::metrics::CONSUMER_LAG.remove_label_values(&[&label]);
                }
            }
        }
    }
}

/// How often librdkafka reports statistics (consumer lag), in milliseconds.
const STATS_INTERVAL_MS: &str = "2000";

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let parts: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                PartitionsRevoked { partitions: &parts }.emit();
                self.revoked.lock().expect("revoked lock").extend(parts);
            }
            Rebalance::Assign(list) => {
                let parts: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                PartitionsAssigned { partitions: &parts }.emit();
            }
            Rebalance::Error(e) => RebalanceFailed { error: e }.emit(),
        }
    }
}

pub type Consumer = StreamConsumer<GroupContext>;

/// A consumer in the processor group, subscribed to the events topic. Offsets are
/// never committed automatically: see [`commit`].
pub fn consumer(cfg: &KafkaConfig) -> Result<Consumer, BusError> {
    let consumer: Consumer = client_config(cfg)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        .set("fetch.max.bytes", (4 * MAX_RECORD_BYTES).to_string())
        .set("max.partition.fetch.bytes", MAX_RECORD_BYTES.to_string())
        // Once the prefetch queue is full, librdkafka waits this long before fetching
        // again (1 s by default): the processor empties a full queue in well under a
        // second, and would then wait for the broker with nothing to do.
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .set("reconnect.backoff.max.ms", "1000")
        .set("statistics.interval.ms", STATS_INTERVAL_MS)
        .create_with_context(GroupContext::default())?;
    rdkafka::consumer::Consumer::subscribe(&consumer, &[&cfg.topic])?;
    Ok(consumer)
}

/// Checks a position a sink stored in Redis (the offset of the last increments
/// applied, of the last event delivered) against the events topic as it is now. A
/// position names a record the log held, and the record's receive time is stored with
/// it; if the log no longer reaches the offset, or the record there was received at
/// another time, the position is from an earlier topic of the same name (deleted and
/// created again, or a broker that lost its storage), and the sink must not take the
/// new topic's records for replays of it.
pub struct LogProbe {
    cfg: KafkaConfig,
    timeout: Duration,
    /// Its client, made at the first question and kept: the questions come when
    /// partitions are assigned, one per partition and sink, and one at a time.
    reader: Arc<Mutex<Option<BaseConsumer>>>,
}

impl LogProbe {
    /// Asks the brokers of `cfg` about its topic; each question times out after the
    /// produce timeout.
    pub fn new(cfg: &KafkaConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            timeout: Duration::from_millis(cfg.produce_timeout_ms),
            reader: Arc::default(),
        }
    }

    /// True if the record at `offset` of `partition` is still in the topic and was
    /// received at `received_ms` (not checked when `None`: a position stored by an
    /// older weir). A record the log no longer holds at the start (retention) passes:
    /// nothing can be read from below it anyway.
    pub async fn holds(
        &self,
        partition: i32,
        offset: i64,
        received_ms: Option<i64>,
    ) -> Result<bool, BusError> {
        let cfg = self.cfg.clone();
        let timeout = self.timeout;
        let reader = self.reader.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut reader = reader.lock().unwrap_or_else(|e| e.into_inner());
            let consumer = match reader.take() {
                Some(c) => c,
                None => probe_client(&cfg)?,
            };
            let found = record_time(&consumer, &cfg.topic, partition, offset, timeout);
            // A client that failed may be in any state: the next question makes another.
            if found.is_ok() {
                *reader = Some(consumer);
            }
            found
        })
        .await
        .map_err(|_| BusError::Client(KafkaError::Canceled))??;
        let holds = match found {
            Probe::PastTheEnd(_) | Probe::Foreign => false,
            Probe::Gone => true,
            Probe::Record(at) => received_ms.is_none_or(|want| want == at),
        };
        if !holds {
            StaleOffsetIgnored {
                topic: &self.cfg.topic,
                partition,
                stored: offset,
                end: match found {
                    Probe::PastTheEnd(end) => Some(end),
                    _ => None,
                },
            }
            .emit();
        }
        Ok(holds)
    }
}

/// What the log holds at an offset.
enum Probe {
    /// The offset is at or past the end of the log (the end given).
    PastTheEnd(i64),
    /// No record there any more (retention, compaction).
    Gone,
    /// A record weir did not write.
    Foreign,
    /// A record, received at this time (ms).
    Record(i64),
}

/// The client of a [`LogProbe`]. It reads records by offset (`assign`, no group
/// membership) and commits nothing; librdkafka wants a group id for `assign` all the
/// same.
fn probe_client(cfg: &KafkaConfig) -> Result<BaseConsumer, BusError> {
    Ok(client_config(cfg)
        .set("group.id", format!("{}.probe", cfg.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .create()?)
}

/// Reads the record at `offset` of `partition` of `topic` (blocking).
fn record_time(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
    timeout: Duration,
) -> Result<Probe, BusError> {
    use rdkafka::consumer::Consumer as _;
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    if offset >= high {
        return Ok(Probe::PastTheEnd(high));
    }
    if offset < low {
        return Ok(Probe::Gone);
    }
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&list)?;
    let found = read_at(consumer, partition, offset, timeout);
    let _ = consumer.unassign();
    found
}

/// Polls the record at `offset` of the assigned `partition`. What an earlier question
/// left in the client's queue (another partition, or this one below `offset`) is
/// passed over; a first record past `offset` means there is none at it (compacted).
fn read_at(
    consumer: &BaseConsumer,
    partition: i32,
    offset: i64,
    timeout: Duration,
) -> Result<Probe, BusError> {
    use rdkafka::message::Message as _;
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match consumer.poll(left) {
            Some(Ok(m)) if m.partition() != partition || m.offset() < offset => {}
            Some(Ok(m)) if m.offset() == offset => {
                return Ok(match IngestRecord::decode(m.payload()) {
                    Ok(record) => Probe::Record(record.received_ms),
                    Err(_) => Probe::Foreign,
                });
            }
            Some(Ok(_)) => return Ok(Probe::Gone),
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => return Ok(Probe::Gone),
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Err(BusError::Client(KafkaError::MessageConsumption(
        RDKafkaErrorCode::RequestTimedOut,
    )))
}

/// Commits, synchronously, `next offset` per partition of the topic.
pub fn commit(
    consumer: &Consumer,
    topic: &str,
    offsets: impl IntoIterator<Item = (i32, i64)>,
) -> Result<(), BusError> {
    let mut list = TopicPartitionList::new();
    for (partition, next) in offsets {
        list.add_partition_offset(topic, partition, Offset::Offset(next))?;
    }
    if list.count() == 0 {
        return Ok(());
    }
    rdkafka::consumer::Consumer::commit(consumer, &list, rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}
