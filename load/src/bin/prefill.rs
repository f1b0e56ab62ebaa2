//! Pre-fills a Kafka topic with N events for the drain benchmark (`scripts/bench.sh
//! drain`), then reads the topic back and fails unless it holds them all.
//!
//! The same events (a seeded generator: ~310 bytes of JSON each, ten names, four apps,
//! 100,000 users) in one of two formats:
//! - `weir`: weir's ingest records (format v1), `--per-record K` events per record, as
//!   ingest writes one record per accepted request;
//! - `json`: one plain JSON event per record (what a Kafka -> ClickHouse pipeline such
//!   as Vector's reads), with `app` and an RFC 3339 `timestamp` in the event.
//!
//! Records have no key and go round-robin over the partitions. The producer is
//! idempotent with `acks=all`. Every event is valid (its name passes weir's rule), so
//! a pipeline that drops nothing ends with exactly N rows, and `uniqExact(event_id)`
//! tells duplicates from loss.
//!
//!     weir-prefill --brokers 127.0.0.1:9092 --topic drain --partitions 4 -n 1000000 \
//!         --format weir --per-record 1

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Format {
    Weir,
    Json,
}

#[derive(Parser)]
#[command(about = "Pre-fills a Kafka topic with N events (weir records or plain JSON)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Partitions of the topic, created if missing.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Events in all.
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, value_enum, default_value = "weir")]
    format: Format,
    /// Events per weir record (ingest writes one record per accepted request).
    #[arg(long, default_value_t = 1)]
    per_record: u64,
    /// Seed of the event generator: the same seed makes the same events in both formats.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// How long the read-back may take, in seconds.
    #[arg(long, default_value_t = 300)]
    verify_timeout: u64,
}

const NAMES: [&str; 10] = [
    "profile_viewed",
    "page_viewed",
    "button_clicked",
    "signup_completed",
    "purchase_made",
    "search_performed",
    "item_added_to_cart",
    "session_started",
    "app.opened",
    "video:played",
];
const APPS: [&str; 4] = ["demo", "shop", "blog", "news"];
const SOURCES: [&str; 6] = ["search", "feed", "profile", "notification", "direct", "ad"];
const UAS: [&str; 3] = [
    "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; rv:121.0) Firefox/121.0",
];
/// 2026-11-22T10:00:00Z, in ms.
const BASE_MS: i64 = 1_795_341_600_000;

/// splitmix64: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One generated event.
struct Event {
    id: uuid::Uuid,
    name: &'static str,
    app: &'static str,
    user: u64,
    timestamp_ms: i64,
    properties: String,
    context: String,
}

fn event(i: u64, rng: &mut Rng) -> Event {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&rng.next().to_le_bytes());
    bytes[8..].copy_from_slice(&rng.next().to_le_bytes());
    let properties = format!(
        r#"{{"profile_id":"p{}","source":"{}","dwell_ms":{}}}"#,
        rng.below(10_000),
        SOURCES[rng.below(SOURCES.len() as u64) as usize],
        rng.below(60_000)
    );
    let context = format!(
        r#"{{"ip":"10.{}.{}.{}","ua":"{}"}}"#,
        rng.below(256),
        rng.below(256),
        1 + rng.below(254),
        UAS[rng.below(UAS.len() as u64) as usize]
    );
    Event {
        id: uuid::Builder::from_random_bytes(bytes).into_uuid(),
        name: NAMES[(i % NAMES.len() as u64) as usize],
        app: APPS[rng.below(APPS.len() as u64) as usize],
        user: rng.below(100_000),
        timestamp_ms: BASE_MS + rng.below(86_400_000) as i64,
        properties,
        context,
    }
}

/// `2026-11-22T10:00:00.123Z`.
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn json_event(e: &Event) -> String {
    format!(
        r#"{{"event_id":"{}","name":"{}","user_id":"u{}","timestamp":"{}","app":"{}","properties":{},"context":{}}}"#,
        e.id,
        e.name,
        e.user,
        rfc3339(e.timestamp_ms),
        e.app,
        e.properties,
        e.context
    )
}

/// A weir ingest record (format v1) holding `events`, of the first event's app.
fn weir_record(events: &[Event], received_ms: i64) -> String {
    let mut out = format!(
        r#"{{"v":1,"app":"{}","received_ms":{received_ms},"events":["#,
        events[0].app
    );
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"event_id":"{}","name":"{}","user_id":"u{}","timestamp_ms":{},"properties":{},"context":{}}}"#,
            e.id, e.name, e.user, e.timestamp_ms, e.properties, e.context
        );
    }
    out.push_str("]}");
    out
}

async fn create_topic(args: &Args) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()
        .context("Kafka admin client")?;
    let topic = NewTopic::new(&args.topic, args.partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .context("creating the topic")?;
    for r in results {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("cannot create topic {t}: {code}"),
        }
    }
    Ok(())
}

async fn produce(args: &Args) -> Result<u64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .context("Kafka producer")?;
    let mut rng = Rng(args.seed);
    let per_record = match args.format {
        Format::Weir => args.per_record.max(1),
        Format::Json => 1,
    };
    let received_ms = BASE_MS + 86_400_000;
    let mut pending = Vec::new();
    let mut records = 0u64;
    let mut i = 0u64;
    while i < args.events {
        let n = per_record.min(args.events - i);
        let events: Vec<Event> = (i..i + n).map(|j| event(j, &mut rng)).collect();
        i += n;
        let payload = match args.format {
            Format::Weir => weir_record(&events, received_ms),
            Format::Json => json_event(&events[0]),
        };
        let partition = (records % args.partitions as u64) as i32;
        records += 1;
        let record = FutureRecord::<(), _>::to(&args.topic)
            .payload(&payload)
            .partition(partition);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::anyhow!("cannot queue a record: {e}"))?;
        pending.push(delivery);
        if pending.len() >= 50_000 {
            for d in pending.drain(..) {
                d.await?
                    .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
            }
        }
    }
    for d in pending {
        d.await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the producer")?;
    Ok(records)
}

/// Reads the topic from the start with a throwaway group and counts its records (some
/// brokers' high watermarks cannot be trusted).
fn count_records(args: &Args, expected: u64) -> Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set(
            "group.id",
            format!("weir-prefill-verify-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .context("Kafka consumer")?;
    consumer.subscribe(&[&args.topic])?;
    let deadline = Instant::now() + Duration::from_secs(args.verify_timeout);
    let mut seen = 0u64;
    let mut idle_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if m.payload().is_some() {
                    seen += 1;
                }
                idle_since = Instant::now();
            }
            Some(Err(e)) => eprintln!("prefill: read-back: {e}"),
            None => {
                if seen >= expected && idle_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
    }
    Ok(seen)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.partitions < 1 {
        bail!("--partitions must be at least 1");
    }
    create_topic(&args).await?;
    let started = Instant::now();
    let records = produce(&args).await?;
    eprintln!(
        "prefill: {} events in {records} records to {} ({} partitions) in {:.1} s",
        args.events,
        args.topic,
        args.partitions,
        started.elapsed().as_secs_f64()
    );
    let seen = tokio::task::block_in_place(|| count_records(&args, records))?;
    if seen != records {
        bail!("the topic holds {seen} records, {records} were produced");
    }
    eprintln!("prefill: read back {seen} records");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(BASE_MS + 123), "2026-11-22T10:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn both_formats_hold_the_same_event() {
        let e = event(0, &mut Rng(42));
        let json: serde_json::Value = serde_json::from_str(&json_event(&e)).unwrap();
        let record: serde_json::Value = serde_json::from_str(&weir_record(&[e], 1)).unwrap();
        let inner = &record["events"][0];
        assert_eq!(json["event_id"], inner["event_id"]);
        assert_eq!(json["properties"], inner["properties"]);
        assert_eq!(record["app"], json["app"]);
        let len = json_event(&event(1, &mut Rng(7))).len();
        assert!((250..400).contains(&len), "{len} bytes");
    }
}
