use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use super::config::RedisConfig;
use crate::metrics::events::{
    CounterWriteFailed, CounterWriteRecovered, EventsRefused, InternalEvent,
    ReplayedIncrementsSkipped,
};
use crate::model::{CountRow, DeadLetter, Kept, Stage};
use crate::sinks::{BoxError, DeadLetterStore, Flush, Refusal, Sink};

/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("Redis at {url} failed: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error(
        "partition {partition}: another instance moved the counters' offset to {found:?} (expected {expected:?}); will re-filter and retry"
    )]
    Moved {
        partition: i32,
        expected: Option<i64>,
        found: Option<i64>,
    },
    #[error("Redis returned an unexpected reply: {0}")]
    Reply(String),
    #[error(
        "partition {partition}: Redis refused the flush's increments ({reason}); none was applied, retrying"
    )]
    Refused { partition: i32, reason: String },
    #[error("cannot write the dead letters of refused increments: {0}")]
    DeadLetters(BoxError),
    #[error("cannot check a stored offset against the partition's log: {0}")]
    Log(crate::bus::BusError),
}

/// Atomically: check the partition's stored position, apply the sums, store the new
/// position ([`Position`]). KEYS[1] = offsets hash, KEYS[2..] = counter hashes. ARGV =
/// partition, expected position ('' = none), new position, then per increment: key
/// index, field, delta, ttl seconds ('0' = keep). Returns {1, new position}, {0, the
/// stored position}
/// when another instance moved it, or {2, why} when an increment cannot be applied (a
/// key of another type, a field that is not an integer, a sum past +-9.2e18): Redis
/// does not roll a script back, so everything is checked before anything is written,
/// and a refused flush applies nothing.
const APPLY: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return {0, cur} end
for i = 4, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[i])]
  local t = redis.call('TYPE', key).ok
  if t ~= 'hash' and t ~= 'none' then return {2, key .. ' holds a ' .. t .. ', not a hash'} end
  local have = redis.call('HGET', key, ARGV[i + 1]) or '0'
  if not string.match(have, '^-?%d+$') then
    return {2, key .. ' field ' .. ARGV[i + 1] .. ' holds ' .. have .. ', not an integer'}
  end
  local sum = tonumber(have) + tonumber(ARGV[i + 2])
  if sum >= 9.2e18 or sum <= -9.2e18 then
    return {2, key .. ' field ' .. ARGV[i + 1] .. ' would pass the 64-bit range'}
  end
end
for i = 4, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[i])]
  redis.call('HINCRBY', key, ARGV[i + 1], ARGV[i + 2])
  if ARGV[i + 3] ~= '0' then redis.call('EXPIRE', key, ARGV[i + 3]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, ARGV[3]}
";

/// After [`APPLY`] refused a partition's sums: which events, taken one by one in
/// order, cannot be applied. Applies nothing. KEYS[1..] = counter hashes. ARGV, per
/// event: the number n of its increments, then n times key index, field, delta (an
/// event's increments of one field summed). An event is refused whole when one of its
/// increments fails the checks of APPLY given the values before it plus the events
/// accepted so far (so the accepted ones, summed, pass APPLY). Returns {event
/// ordinal, increment ordinal, why} per refused event (ordinals from 0).
const CHECK_EACH: &str = r"
local sim = {}
local types = {}
local out = {}
local i = 1
local event = 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local staged = {}
  local why = nil
  for j = 0, n - 1 do
    local base = i + 1 + 3 * j
    local key = KEYS[tonumber(ARGV[base])]
    local field = ARGV[base + 1]
    if types[key] == nil then types[key] = redis.call('TYPE', key).ok end
    local t = types[key]
    local slot = key .. '\0' .. field
    if t ~= 'hash' and t ~= 'none' then
      why = {j, key .. ' holds a ' .. t .. ', not a hash'}
      break
    end
    local have = staged[slot] or sim[slot]
    if have == nil then
      local raw = redis.call('HGET', key, field) or '0'
      if not string.match(raw, '^-?%d+$') then
        why = {j, key .. ' field ' .. field .. ' holds ' .. raw .. ', not an integer'}
        break
      end
      have = tonumber(raw)
    end
    local sum = have + tonumber(ARGV[base + 2])
    if sum >= 9.2e18 or sum <= -9.2e18 then
      why = {j, key .. ' field ' .. field .. ' would pass the 64-bit range'}
      break
    end
    staged[slot] = sum
  end
  if why then
    table.insert(out, {event, why[1], why[2]})
  else
    for slot, sum in pairs(staged) do sim[slot] = sum end
  end
  i = i + 1 + 3 * n
  event = event + 1
end
return out
";

/// Isolation rounds in one attempt beyond one per partition: a refusal is isolated
/// and what is left of the partition applied, again if Redis' state changed
/// meanwhile; beyond, the attempt fails and is retried with backoff.
const MAX_ISOLATIONS: usize = 3;

/// What a dead letter of an event needs, kept while its increments wait past their
/// flush (Redis was down): the event as JSON and the pipeline version that kept it.
struct WaitingEvent {
    dead: DeadLetter,
    pipeline: Arc<str>,
    control_version: u64,
}

/// The counter hashes a script touches, in `KEYS` order, each with its TTL in seconds
/// (0: keep).
#[derive(Default)]
struct HashKeys {
    keys: Vec<(String, u64)>,
    index: HashMap<String, usize>,
    /// `YYYY-MM-DD` by day since the epoch, each made once.
    days: HashMap<i64, String>,
}

impl HashKeys {
    fn intern(&mut self, key: String, ttl: u64) -> usize {
        *self.index.entry(key.clone()).or_insert_with(|| {
            self.keys.push((key, ttl));
            self.keys.len() - 1
        })
    }

    /// The hashes `r` increments, as indexes into `keys`: its counter's total, and the
    /// UTC day's of its timestamp when the counter counts by day.
    fn of(&mut self, prefix: &str, r: &CountRow) -> impl Iterator<Item = usize> + use<> {
        let counter = &r.counter;
        let total = hash_key(prefix, &r.app, &counter.name);
        let day = counter.by_day.then(|| {
            let day = self
                .days
                .entry(r.timestamp_ms.div_euclid(86_400_000))
                .or_insert_with(|| day_of(r.timestamp_ms));
            let key = format!("{total}:{day}");
            self.intern(key, u64::from(counter.day_retention_days) * 86_400)
        });
        day.into_iter().chain([self.intern(total, 0)])
    }
}

/// One event's increments, as [`CHECK_EACH`] takes them.
struct EventIncrements<'a> {
    origin: crate::model::Origin,
    /// (key index, field, delta, counter name), one per hash and field.
    increments: Vec<(usize, &'a str, i64, &'a str)>,
}

/// A connection to the `[redis]` server that connects lazily (on first use) and
/// reconnects by itself; each round trip times out after `redis.timeout_ms`.
pub fn connect(cfg: &RedisConfig) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(cfg.url.as_str())?;
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(timeout);
    ConnectionManager::new_lazy_with_config(client, config)
}

/// [`connect`], its error named as the counters' own.
fn connect_counters(cfg: &RedisConfig) -> Result<ConnectionManager, CounterError> {
    connect(cfg).map_err(|source| CounterError::Redis {
        url: crate::model::redact_url(&cfg.url),
        source,
    })
}

/// `YYYY-MM-DD` of a time in ms since the epoch (UTC).
fn day_of(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let date = time::Date::from_julian_day((2_440_588 + days) as i32).unwrap_or(time::Date::MIN);
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        date.month() as u8,
        date.day()
    )
}

fn hash_key(prefix: &str, app: &str, counter: &str) -> String {
    format!("{prefix}:c:{app}:{counter}")
}

/// A partition's position in Redis: the offset of the last record whose increments
/// are applied and that record's receive time, stored as `offset:received_ms` (just
/// `offset` when an older weir stored it). The receive time tells a record of this
/// topic from one at the same offset of an earlier topic of the same name.
#[derive(Debug, Clone, PartialEq)]
struct Position {
    offset: i64,
    received_ms: Option<i64>,
    /// As stored: what the script expects to find.
    raw: String,
}

impl Position {
    fn of(o: crate::model::Origin) -> Self {
        Self {
            offset: o.offset,
            received_ms: Some(o.received_ms),
            raw: format!("{}:{}", o.offset, o.received_ms),
        }
    }

    fn parse(raw: String) -> Result<Self, String> {
        let (offset, received) = match raw.split_once(':') {
            Some((o, r)) => (o, Some(r)),
            None => (raw.as_str(), None),
        };
        let Ok(offset) = offset.parse() else {
            return Err(raw);
        };
        let received_ms = match received.map(str::parse) {
            Some(Ok(r)) => Some(r),
            Some(Err(_)) => return Err(raw),
            None => None,
        };
        Ok(Self {
            offset,
            received_ms,
            raw,
        })
    }
}

/// Writes counter increments to Redis, exactly once per Kafka record.
pub struct CounterSink {
    conn: ConnectionManager,
    url: String,
    prefix: String,
    offsets_key: String,
    max_pending: usize,
    /// Per partition, the stored position as this instance last saw it (`None`: none).
    watermarks: HashMap<i32, Option<Position>>,
    /// Partitions whose stored position is from an earlier topic of the same name (the
    /// log does not hold its record): nothing is skipped as a replay of it, and the
    /// next increments replace it.
    stale: HashSet<i32>,
    /// Where a stored position is checked against its partition's log, once loaded.
    probe: Option<Arc<crate::bus::LogProbe>>,
    /// Increments not yet in Redis, per partition.
    pending: BTreeMap<i32, Vec<CountRow>>,
    pending_len: usize,
    retry_backoff: Duration,
    /// After a failure: when to try again, and the backoff that led there.
    retry: Option<(Instant, Duration)>,
    /// Where increments Redis refuses for good go (their events' dead letters).
    dead_letters: Arc<dyn DeadLetterStore>,
    /// Per partition and (offset, index): the events whose increments wait past their
    /// flush, for their dead letters should Redis refuse them later.
    events: HashMap<i32, HashMap<(i64, u32), WaitingEvent>>,
}

impl CounterSink {
    /// A sink for the consumer group `group` of `topic`; after a failed attempt it
    /// asks to be retried after `retry_backoff`, doubled after each failure up to 30 s.
    /// The events whose increments Redis refuses for good (a key of another type, a
    /// field that is not an integer, a sum past the 64-bit range) are written to
    /// `dead_letters` (stage `sink`, `counter:<name>`).
    pub fn new(
        cfg: &RedisConfig,
        group: &str,
        topic: &str,
        retry_backoff: Duration,
        dead_letters: Arc<dyn DeadLetterStore>,
    ) -> Result<Self, CounterError> {
        Ok(Self {
            conn: connect_counters(cfg)?,
            url: crate::model::redact_url(&cfg.url),
            offsets_key: format!("{}:offsets:{group}:{topic}", cfg.key_prefix),
            prefix: cfg.key_prefix.clone(),
            max_pending: cfg.max_pending,
            watermarks: HashMap::new(),
            stale: HashSet::new(),
            probe: None,
            pending: BTreeMap::new(),
            pending_len: 0,
            retry_backoff,
            retry: None,
            dead_letters,
            events: HashMap::new(),
        })
    }

    /// Checks each stored position it loads against its partition's log (see
    /// [`crate::bus::LogProbe`]): one from an earlier topic of the same name skips
    /// nothing.
    pub fn with_log_probe(mut self, probe: Arc<crate::bus::LogProbe>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// A stored position of `partition` as Redis holds it.
    fn position(&self, partition: i32, raw: String) -> Result<Position, CounterError> {
        Position::parse(raw).map_err(|raw| {
            CounterError::Reply(format!(
                "position {raw:?} of partition {partition} in {} (want offset:received_ms)",
                self.offsets_key
            ))
        })
    }

    /// Queues a batch's increments.
    pub fn add(&mut self, rows: Vec<CountRow>) {
        self.pending_len += rows.len();
        for row in rows {
            self.pending
                .entry(row.origin.partition)
                .or_default()
                .push(row);
        }
        crate::metrics::COUNTER_PENDING.set(self.pending_len as i64);
    }

    /// True while increments wait for Redis.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Tries once to apply what is pending; after a failure, schedules the next try
    /// with backoff. Redis' failures are this sink's to report (logs, metrics): the
    /// processor goes on, holding back the commits of the partitions involved.
    async fn try_apply(&mut self, flush: Option<Flush<'_>>) {
        if !self.has_pending() {
            self.retry = None;
            return;
        }
        let started = std::time::Instant::now();
        let mut result = self.apply().await;
        for _ in 0..MAX_ISOLATIONS + self.pending.len() {
            let Err(CounterError::Refused { partition, .. }) = result else {
                break;
            };
            result = match self.set_aside_refused(partition, flush).await {
                Ok(()) => self.apply().await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(_) => {
                crate::metrics::SINK_FLUSH_DURATION
                    .with_label_values(&["redis"])
                    .observe(started.elapsed().as_secs_f64());
                if self.retry.take().is_some() {
                    CounterWriteRecovered.emit();
                }
            }
            Err(e) => {
                let backoff = self
                    .retry
                    .map_or(self.retry_backoff, |(_, b)| (b * 2).min(MAX_BACKOFF));
                self.retry = Some((Instant::now() + backoff, backoff));
                CounterWriteFailed {
                    error: &e,
                    retry_in: backoff,
                }
                .emit();
            }
        }
    }

    fn redis_err(&self) -> impl FnOnce(redis::RedisError) -> CounterError + '_ {
        |source| CounterError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    /// Applies every pending increment in one round trip (two the first time a
    /// partition is seen). Returns the number of increments applied.
    pub async fn apply(&mut self) -> Result<usize, CounterError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let unknown: Vec<i32> = self
            .pending
            .keys()
            .copied()
            .filter(|p| !self.watermarks.contains_key(p))
            .collect();
        if !unknown.is_empty() {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&self.offsets_key);
            for p in &unknown {
                cmd.arg(p);
            }
            let mut conn = self.conn.clone();
            let found: Vec<Option<String>> =
                cmd.query_async(&mut conn).await.map_err(self.redis_err())?;
            for (p, raw) in unknown.into_iter().zip(found) {
                let stored = raw.map(|raw| self.position(p, raw)).transpose()?;
                if let (Some(probe), Some(at)) = (&self.probe, &stored)
                    && !probe
                        .holds(p, at.offset, at.received_ms)
                        .await
                        .map_err(CounterError::Log)?
                {
                    self.stale.insert(p);
                }
                self.watermarks.insert(p, stored);
            }
        }

        let mut pipe = redis::pipe();
        let mut sent: Vec<(i32, Option<i64>, Position, usize)> = Vec::new();
        let mut skipped = 0;
        let partitions: Vec<i32> = self.pending.keys().copied().collect();
        for partition in partitions {
            let watermark = self.watermarks[&partition].clone();
            // What replays skip; the script still expects what Redis holds.
            let skip_to = watermark
                .as_ref()
                .filter(|_| !self.stale.contains(&partition))
                .map(|w| w.offset);
            let Some(rows) = self.pending.get_mut(&partition) else {
                continue;
            };
            let before = rows.len();
            rows.retain(|r| skip_to.is_none_or(|w| r.origin.offset > w));
            skipped += before - rows.len();
            let Some(last) = rows
                .iter()
                .map(|r| r.origin)
                .max_by_key(|o| (o.offset, o.index))
            else {
                continue;
            };
            let new = Position::of(last);
            let n = rows.len();
            pipe.add_command(self.script(
                partition,
                watermark.as_ref().map(|w| w.raw.as_str()),
                &new.raw,
                &self.pending[&partition],
            ));
            sent.push((partition, watermark.map(|w| w.offset), new, n));
        }
        self.pending.retain(|_, rows| !rows.is_empty());
        let pending = &self.pending;
        self.events.retain(|p, _| pending.contains_key(p));
        self.pending_len -= skipped;
        if skipped > 0 {
            ReplayedIncrementsSkipped {
                increments: skipped,
            }
            .emit();
        }
        if sent.is_empty() {
            crate::metrics::COUNTER_PENDING.set(self.pending_len as i64);
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<(i64, String)> = pipe
            .query_async(&mut conn)
            .await
            .map_err(self.redis_err())?;
        if replies.len() != sent.len() {
            return Err(CounterError::Reply(format!(
                "{} replies for {} scripts",
                replies.len(),
                sent.len()
            )));
        }
        let mut applied = 0;
        let mut failure = None;
        for ((partition, expected, new, n), (ok, stored)) in sent.into_iter().zip(replies) {
            if ok == 2 {
                failure.get_or_insert(CounterError::Refused {
                    partition,
                    reason: stored,
                });
                continue;
            }
            // Stored now by this topic's records (or moved by another instance
            // reading them): no longer stale.
            self.stale.remove(&partition);
            if ok == 1 {
                self.watermarks.insert(partition, Some(new));
                self.pending.remove(&partition);
                self.events.remove(&partition);
                self.pending_len -= n;
                applied += n;
            } else {
                let stored = if stored.is_empty() {
                    None
                } else {
                    Some(self.position(partition, stored)?)
                };
                let found = stored.as_ref().map(|s| s.offset);
                self.watermarks.insert(partition, stored);
                failure.get_or_insert(CounterError::Moved {
                    partition,
                    expected,
                    found,
                });
            }
        }
        crate::metrics::COUNTER_PENDING.set(self.pending_len as i64);
        crate::metrics::COUNTER_INCREMENTS.inc_by(applied as u64);
        match failure {
            Some(e) => Err(e),
            None => Ok(applied),
        }
    }

    /// After Redis refused `partition`'s sums: finds the events whose increments it
    /// cannot take, writes their dead letters, and takes their increments out, so
    /// that the rest can be applied. The dead letters are written before anything of
    /// the partition is applied: a crash in between replays the same refusal, and the
    /// dead-letter store skips what it already holds.
    async fn set_aside_refused(
        &mut self,
        partition: i32,
        flush: Option<Flush<'_>>,
    ) -> Result<(), CounterError> {
        let Some(rows) = self.pending.get(&partition) else {
            return Ok(());
        };
        let (keys, events) = self.by_event(rows);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(CHECK_EACH).arg(keys.len());
        for key in &keys {
            cmd.arg(key);
        }
        for e in &events {
            cmd.arg(e.increments.len());
            for (i, field, delta, _) in &e.increments {
                cmd.arg(i + 1).arg(*field).arg(*delta);
            }
        }
        let mut conn = self.conn.clone();
        let refused: Vec<(usize, usize, String)> =
            cmd.query_async(&mut conn).await.map_err(self.redis_err())?;
        if refused.is_empty() {
            // Redis' state changed since (or sums at the edge of the range): the next
            // attempt applies the partition whole or refuses it again.
            return Ok(());
        }
        let kept: HashMap<(i64, u32), &Kept> = flush
            .map(|f| {
                f.batch
                    .kept
                    .iter()
                    .filter(|k| k.origin.partition == partition)
                    .map(|k| ((k.origin.offset, k.origin.index), k))
                    .collect()
            })
            .unwrap_or_default();
        let held = self.events.get(&partition);
        // By (pipeline, control version): what the store records with them.
        let mut dead: BTreeMap<(Arc<str>, u64), Vec<DeadLetter>> = BTreeMap::new();
        let mut gone = HashSet::new();
        let mut by_counter: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for (event, increment, reason) in refused {
            let Some(e) = events.get(event) else {
                return Err(CounterError::Reply(format!(
                    "a refusal of event {event} of {}",
                    events.len()
                )));
            };
            let counter = e.increments.get(increment).map_or("", |i| i.3);
            let sink = format!("counter:{counter}");
            let at = (e.origin.offset, e.origin.index);
            let (letter, pipeline, version) = if let (Some(k), Some(f)) = (kept.get(&at), flush) {
                (
                    DeadLetter::of(e.origin, k.event.clone(), Stage::Sink, String::new()),
                    Arc::from(f.pipeline),
                    f.control_version,
                )
            } else if let Some(p) = held.and_then(|h| h.get(&at)) {
                (p.dead.clone(), p.pipeline.clone(), p.control_version)
            } else {
                return Err(CounterError::Reply(format!(
                    "no event known at partition {partition} offset {} index {} for its refused increments",
                    at.0, at.1
                )));
            };
            let entry = by_counter
                .entry(sink.clone())
                .or_insert((0, reason.clone()));
            entry.0 += 1;
            let letter = DeadLetter {
                reason: format!("Redis refused the increment: {reason}"),
                ..letter
            }
            .by(&sink, "");
            dead.entry((pipeline, version)).or_default().push(letter);
            gone.insert(at);
        }
        // A retry asks Redis again what it refuses and writes that, at its own time.
        for ((pipeline, version), letters) in &dead {
            self.dead_letters
                .write_dead_letters(letters, pipeline, *version, crate::model::now_ms())
                .await
                .map_err(CounterError::DeadLetters)?;
        }
        crate::failpoint::after_counter_dead_letters();
        for (sink, (events, reason)) in &by_counter {
            EventsRefused {
                sink,
                events: *events,
                reason,
            }
            .emit();
        }
        if let Some(rows) = self.pending.get_mut(&partition) {
            let before = rows.len();
            rows.retain(|r| !gone.contains(&(r.origin.offset, r.origin.index)));
            self.pending_len -= before - rows.len();
            if rows.is_empty() {
                self.pending.remove(&partition);
                self.events.remove(&partition);
            }
        }
        crate::metrics::COUNTER_PENDING.set(self.pending_len as i64);
        Ok(())
    }

    /// The hash keys of `rows` (in `KEYS` order) and their increments grouped by
    /// event, in the order of the events, each event's summed per hash and field.
    fn by_event<'r>(&self, rows: &'r [CountRow]) -> (Vec<String>, Vec<EventIncrements<'r>>) {
        let mut keys = HashKeys::default();
        let mut events: Vec<EventIncrements<'r>> = Vec::new();
        let mut index: HashMap<(i64, u32), usize> = HashMap::new();
        for r in rows {
            let at = (r.origin.offset, r.origin.index);
            let e = *index.entry(at).or_insert_with(|| {
                events.push(EventIncrements {
                    origin: r.origin,
                    increments: Vec::new(),
                });
                events.len() - 1
            });
            let increments = &mut events[e].increments;
            for key in keys.of(&self.prefix, r) {
                match increments
                    .iter_mut()
                    .find(|(k, f, _, _)| *k == key && *f == r.key.as_str())
                {
                    Some(inc) => inc.2 = inc.2.saturating_add(r.delta),
                    None => {
                        increments.push((key, r.key.as_str(), r.delta, r.counter.name.as_str()))
                    }
                }
            }
        }
        (keys.keys.into_iter().map(|(key, _)| key).collect(), events)
    }

    /// Keeps what the dead letters of this flush's events need while their increments
    /// wait past it (Redis is down), should Redis refuse them once it is back.
    fn keep_events(&mut self, flush: Flush<'_>) {
        if self.pending.is_empty() {
            return;
        }
        let waiting: HashSet<crate::model::Slot> = self
            .pending
            .values()
            .flatten()
            .map(|r| r.origin.slot())
            .collect();
        let pipeline: Arc<str> = Arc::from(flush.pipeline);
        for k in &flush.batch.kept {
            if !waiting.contains(&k.origin.slot()) {
                continue;
            }
            self.events
                .entry(k.origin.partition)
                .or_default()
                .entry((k.origin.offset, k.origin.index))
                .or_insert_with(|| WaitingEvent {
                    dead: DeadLetter::of(k.origin, k.event.clone(), Stage::Sink, String::new()),
                    pipeline: pipeline.clone(),
                    control_version: flush.control_version,
                });
        }
    }

    /// The script call applying one partition's rows, summed per hash and field.
    fn script(
        &self,
        partition: i32,
        expected: Option<&str>,
        new: &str,
        rows: &[CountRow],
    ) -> redis::Cmd {
        // (key index, field) -> sum.
        let mut keys = HashKeys::default();
        let mut sums: BTreeMap<(usize, &str), i64> = BTreeMap::new();
        for r in rows {
            for i in keys.of(&self.prefix, r) {
                // Saturated, a sum past the 64-bit range is refused whole by the script.
                let sum = sums.entry((i, r.key.as_str())).or_default();
                *sum = sum.saturating_add(r.delta);
            }
        }
        let keys = keys.keys;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(APPLY).arg(1 + keys.len()).arg(&self.offsets_key);
        for (key, _) in &keys {
            cmd.arg(key);
        }
        cmd.arg(partition)
            .arg(expected.unwrap_or_default())
            .arg(new);
        let mut ttl_set = HashSet::new();
        for ((i, field), delta) in sums {
            let ttl = keys[i].1;
            let ttl = if ttl > 0 && ttl_set.insert(i) { ttl } else { 0 };
            cmd.arg(i + 2).arg(field).arg(delta).arg(ttl);
        }
        cmd
    }
}

impl Sink for CounterSink {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// Takes the flush's increments and tries to apply what is pending once (while the
    /// processor writes the other sinks); never fails: what Redis did not take waits
    /// here, and its partitions are committed only up to it.
    fn write<'a>(&'a mut self, flush: Flush<'a>) -> BoxFuture<'a, Result<Vec<Refusal>, BoxError>> {
        Box::pin(async move {
            if !flush.batch.counts.is_empty() {
                self.add(flush.batch.counts.clone());
            }
            self.try_apply(Some(flush)).await;
            self.keep_events(flush);
            Ok(Vec::new())
        })
    }

    fn commit_limit(&self, partition: i32) -> Option<i64> {
        self.pending
            .get(&partition)?
            .iter()
            .map(|r| r.origin.offset)
            .min()
    }

    /// Their new owner re-reads the records.
    fn forget(&mut self, partitions: &HashSet<i32>) {
        for p in partitions {
            self.watermarks.remove(p);
            self.stale.remove(p);
            if let Some(rows) = self.pending.remove(p) {
                self.pending_len -= rows.len();
            }
            self.events.remove(p);
        }
        crate::metrics::COUNTER_PENDING.set(self.pending_len as i64);
    }

    fn retry_at(&self) -> Option<Instant> {
        self.retry.filter(|_| self.has_pending()).map(|(at, _)| at)
    }

    fn retry(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.try_apply(None))
    }

    /// The pending increments reached `redis.max_pending`.
    fn is_full(&self) -> bool {
        self.pending_len >= self.max_pending
    }
}

/// Reads counters for the counters API.
#[derive(Clone)]
pub struct CounterReader {
    conn: ConnectionManager,
    url: String,
    prefix: String,
}

/// One counter's value, as the counters API returns it.
#[derive(Debug, serde::Serialize)]
pub struct CounterValue {
    pub counter: String,
    pub key: String,
    pub value: i64,
    /// Per-day values, newest first, when asked for and the counter keeps them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<DayValue>>,
}

#[derive(Debug, serde::Serialize)]
pub struct DayValue {
    pub day: String,
    pub value: i64,
}

impl CounterReader {
    pub fn new(cfg: &RedisConfig) -> Result<Self, CounterError> {
        Ok(Self {
            conn: connect_counters(cfg)?,
            url: crate::model::redact_url(&cfg.url),
            prefix: cfg.key_prefix.clone(),
        })
    }

    /// The total of `counter` for `key` in `app`, and the last `days` UTC days
    /// (today first) when `days > 0`.
    pub async fn get(
        &self,
        app: &str,
        counter: &str,
        key: &str,
        days: u32,
    ) -> Result<CounterValue, CounterError> {
        let total = hash_key(&self.prefix, app, counter);
        let mut pipe = redis::pipe();
        pipe.hget(&total, key);
        let today = crate::model::now_ms();
        let labels: Vec<String> = (0..days)
            .map(|d| day_of(today - i64::from(d) * 86_400_000))
            .collect();
        for day in &labels {
            pipe.hget(format!("{total}:{day}"), key);
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<i64>> =
            pipe.query_async(&mut conn)
                .await
                .map_err(|source| CounterError::Redis {
                    url: self.url.clone(),
                    source,
                })?;
        let mut values = values.into_iter().map(Option::unwrap_or_default);
        let value = values.next().unwrap_or_default();
        Ok(CounterValue {
            counter: counter.to_owned(),
            key: key.to_owned(),
            value,
            days: (days > 0).then(|| {
                labels
                    .into_iter()
                    .zip(values)
                    .map(|(day, value)| DayValue { day, value })
                    .collect()
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_keep_the_receive_time_and_read_older_ones() {
        let p = Position::parse("41:1765000000041".into()).unwrap();
        assert_eq!((p.offset, p.received_ms), (41, Some(1_765_000_000_041)));
        assert_eq!(p.raw, "41:1765000000041");
        // Stored by weir before the receive time was kept: checked by offset only.
        let old = Position::parse("41".into()).unwrap();
        assert_eq!((old.offset, old.received_ms), (41, None));
        for bad in ["", "x", "41:", "41:x", ":5"] {
            assert_eq!(Position::parse(bad.into()), Err(bad.to_owned()), "{bad:?}");
        }
        let o = crate::model::Origin {
            partition: 3,
            offset: 7,
            index: 2,
            received_ms: 99,
        };
        assert_eq!(Position::of(o), Position::parse("7:99".into()).unwrap());
    }

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(86_400_000 - 1), "1970-01-01");
        assert_eq!(day_of(1_795_435_200_000), "2026-11-23");
        assert_eq!(day_of(-1), "1969-12-31");
    }
}
