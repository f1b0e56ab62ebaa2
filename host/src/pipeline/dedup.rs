//! Deduplication by `(app, event_id)` within a window, before the schemas and the
//! plugins, so that every sink (events, dead letters, routed tables, counters, webhooks,
//! topics) sees an event once however often its client sent it.
//!
//! Tracking SDKs resend a request whose answer they did not get, with the same event
//! ids; ingest accepts every copy (each is durable at once), so the copies reach Kafka
//! as different records, possibly in different partitions. Each event is *claimed* in
//! Redis by the first record that carries it: one `SET key claim NX GET EX window` per
//! event, a chunk of a flush's events in one pipelined round trip (the worker checks
//! the next chunk while the plugins run the one before), where `key` names the consumer
//! group, the app and the event id, and `claim` is the Kafka coordinates of the event
//! (partition, offset, position in its record). An event is kept when the key was free
//! or holds its own coordinates (a replay of the same record after a crash or a
//! rebalance is not a duplicate of itself: the first occurrence, by coordinates, wins),
//! and dropped otherwise.
//!
//! The claim is made before the flush is written and its offsets committed. A crash
//! after the claim replays the same record, which finds its own claim and is written; a
//! copy that is dropped because another record claimed the event is dropped only once
//! that record's claim is in Redis, and that record stays uncommitted until it is
//! written, so an event is never lost to its own copy.
//!
//! An event whose id ingest made (its client sent none: `WireEvent::id_assigned`) is
//! not claimed: a client's resend of it would carry another id, so no copy of it can
//! come, and its replays are recognised by their coordinates as always. Only the ids
//! clients send (SDKs' `messageId`, PostHog's `uuid`, `event_id`) cost a key.
//!
//! A record that replays dead letters (`weir dead-letters replay`, marked in the record)
//! is let through although its events' ids were seen, and takes their claims over (a
//! `SET` without `NX`), so that a client's later copy, or the original record read
//! again, is dropped.
//!
//! The state is bounded by the window: each key expires `window_secs` after its claim
//! (about 180 bytes of Redis memory per event in the window: 168 MiB for a million
//! keys of this shape on Redis 7.0). A marker key without
//! expiry tells whether the state survived: if it disappears (Redis flushed, or its
//! keys evicted under `maxmemory`), weir says so (log and
//! `weir_dedup_state_lost_total`) and goes on at least once: copies whose claim was
//! lost are written again, nothing is lost. While Redis does not answer, the flush
//! waits and retries with consumption paused, like a sink that does not take a batch.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::config::MAX_RETRY_BACKOFF;
use crate::metrics::events::{
    DedupCheckFailed, DedupSkipped, DedupStateLost, DedupWindowStarted, DuplicatesDropped,
    InternalEvent,
};
use crate::model::{Origin, Slot, WireEvent};
use crate::sinks::counters::{RedisConfig, connect};
use crate::sinks::{BoxError, DeliveryMarks};

/// `[dedup]`: deduplication of events by `(app, event_id)`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Drop an event whose app and `event_id` an earlier record carried within the
    /// window. Needs the `[redis]` server. Default true.
    pub enabled: bool,
    /// How long an event id is remembered, in seconds (1 s to 30 days). Default 86,400
    /// (24 h, as Segment and RudderStack deduplicate message ids).
    pub window_secs: u64,
    /// What a flush does while Redis does not answer the check: `wait` (default) holds
    /// the pipeline until it does (nothing doubled; the backlog waits in Kafka), `pass`
    /// lets the events through unchecked and unclaimed (ClickHouse stays fresh; a copy
    /// sent meanwhile is stored again), counted in `weir_dedup_unchecked_events_total`.
    pub when_unavailable: WhenUnavailable,
}

/// See [`DedupConfig::when_unavailable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenUnavailable {
    #[default]
    Wait,
    Pass,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_secs: 86_400,
            when_unavailable: WhenUnavailable::Wait,
        }
    }
}

/// Longest window accepted, in seconds.
pub const MAX_WINDOW_SECS: u64 = 30 * 86_400;

/// Why the deduplication check failed (the flush waits and retries it).
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("deduplication state in Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error(
        "Redis at {url} refused SET with both NX and GET ({detail}): deduplication needs Redis 7.0 or later (or set dedup.enabled = false)"
    )]
    Unsupported { url: String, detail: String },
    #[error("Redis answered the deduplication check with {got} replies for {want} commands")]
    Reply { got: usize, want: usize },
}

/// The connection to the `[redis]` server that holds the deduplication window and
/// the delivery marks, and its URL as printed (credentials redacted).
fn connect_state(redis: &RedisConfig) -> Result<(ConnectionManager, String), DedupError> {
    let url = crate::model::redact_url(&redis.url);
    match connect(redis) {
        Ok(conn) => Ok((conn, url)),
        Err(source) => Err(DedupError::Redis { url, source }),
    }
}

/// The deduplication window of one consumer group, in Redis.
pub struct Dedup {
    conn: ConnectionManager,
    url: String,
    /// `{prefix}:d:{group}:`, followed by 16 bytes of SHA-256 of the app and event id.
    key_prefix: Vec<u8>,
    /// `{prefix}:d:{group}`: holds when the window started (ms), never expires.
    marker: String,
    window_secs: u64,
    /// Whether this instance has seen the marker (so that its disappearance is news).
    marker_seen: bool,
    when_unavailable: WhenUnavailable,
    /// First pause after a failed check, with `when_unavailable = "pass"`.
    retry_backoff: Duration,
    /// With `when_unavailable = "pass"`, after a failed check: until when flushes pass
    /// unchecked without asking Redis, and the backoff that led there.
    down: Option<(Instant, Duration)>,
}

/// How an event's claim is stored: its Kafka coordinates, 16 bytes big-endian.
fn claim(o: &Origin) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..4].copy_from_slice(&o.partition.to_be_bytes());
    c[4..12].copy_from_slice(&o.offset.to_be_bytes());
    c[12..].copy_from_slice(&o.index.to_be_bytes());
    c
}

impl Dedup {
    /// The window of consumer group `group`; connects to Redis on first use. With
    /// `when_unavailable = "pass"`, a failed check leaves Redis alone for
    /// `retry_backoff` (doubled after each failure up to 30 s).
    pub fn new(
        redis: &RedisConfig,
        cfg: &DedupConfig,
        group: &str,
        retry_backoff: Duration,
    ) -> Result<Self, DedupError> {
        let (conn, url) = connect_state(redis)?;
        let marker = format!("{}:d:{group}", redis.key_prefix);
        Ok(Self {
            conn,
            url,
            key_prefix: format!("{marker}:").into_bytes(),
            marker,
            window_secs: cfg.window_secs,
            marker_seen: false,
            when_unavailable: cfg.when_unavailable,
            retry_backoff,
            down: None,
        })
    }

    /// The Redis key of an event: fixed length whatever the event id's (up to 256
    /// bytes), so that the window's memory depends only on how many events it holds.
    #[cfg(test)]
    fn key(&self, app: &str, event_id: &str) -> Vec<u8> {
        let mut key = Vec::new();
        self.write_key(&mut key, app, event_id);
        key
    }

    /// Writes the key of an event into `key` (cleared first).
    fn write_key(&self, key: &mut Vec<u8>, app: &str, event_id: &str) {
        let mut h = Sha256::new();
        h.update(app.as_bytes());
        h.update([0]);
        h.update(event_id.as_bytes());
        let digest = h.finalize();
        key.clear();
        key.extend_from_slice(&self.key_prefix);
        key.extend_from_slice(&digest[..16]);
    }

    /// Removes from `events` every event that another record claimed within the window,
    /// claiming the others. The events of the records in `replays` (`(partition,
    /// offset)`: records that replay dead letters) are kept and take the claim over, so
    /// that a copy sent later, or their original read again, is dropped. Returns how many
    /// were removed. On error `events` is unchanged (claims made by a failed round trip
    /// are the events' own, so the retry keeps them). With `when_unavailable = "pass"`
    /// it does not fail: while Redis does not answer, the events stay unchecked.
    pub async fn filter(
        &mut self,
        events: &mut Vec<(Origin, String, WireEvent)>,
        replays: &HashSet<(i32, i64)>,
    ) -> Result<usize, DedupError> {
        let pass = self.when_unavailable == WhenUnavailable::Pass;
        if pass && self.down.is_some_and(|(until, _)| Instant::now() < until) {
            DedupSkipped {
                events: events.len(),
            }
            .emit();
            return Ok(0);
        }
        let started = Instant::now();
        match self.check(events, replays).await {
            Ok(dropped) => {
                crate::metrics::DEDUP_DURATION.observe(started.elapsed().as_secs_f64());
                self.down = None;
                Ok(dropped)
            }
            Err(e) if pass => {
                let retry_in = self
                    .down
                    .map_or(self.retry_backoff, |(_, b)| (b * 2).min(MAX_RETRY_BACKOFF));
                self.down = Some((Instant::now() + retry_in, retry_in));
                DedupCheckFailed {
                    error: &e,
                    retry_in,
                }
                .emit();
                DedupSkipped {
                    events: events.len(),
                }
                .emit();
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// One check of `events` in Redis (see [`Dedup::filter`]).
    async fn check(
        &mut self,
        events: &mut Vec<(Origin, String, WireEvent)>,
        replays: &HashSet<(i32, i64)>,
    ) -> Result<usize, DedupError> {
        // An id ingest made cannot come twice: such events are not claimed.
        let claimed = |(_, _, e): &&(Origin, String, WireEvent)| !e.id_assigned;
        let wanted = events.iter().filter(claimed).count();
        if wanted == 0 {
            return Ok(0);
        }
        let mut pipe = redis::Pipeline::with_capacity(wanted + 1);
        pipe.cmd("SET")
            .arg(&self.marker)
            .arg(crate::model::now_ms())
            .arg("NX")
            .arg("GET");
        // Each command sized up front: 7 arguments, the key, the claim and ~24 bytes.
        let mut key = Vec::with_capacity(self.key_prefix.len() + 16);
        let size = self.key_prefix.len() + 16 + 16 + 24;
        for (origin, app, e) in events.iter().filter(claimed) {
            self.write_key(&mut key, app, &e.event_id);
            let mut cmd = redis::Cmd::with_capacity(7, size);
            cmd.arg("SET").arg(&key[..]).arg(&claim(origin)[..]);
            if !replays.contains(&(origin.partition, origin.offset)) {
                cmd.arg("NX");
            }
            cmd.arg("GET").arg("EX").arg(self.window_secs);
            pipe.add_command(cmd);
        }
        let replies: Vec<Option<Vec<u8>>> =
            pipe.query_async(&mut self.conn).await.map_err(|source| {
                let syntax = source.code() == Some("ERR")
                    && source.detail().is_some_and(|d| d.contains("syntax"));
                if syntax {
                    DedupError::Unsupported {
                        url: self.url.clone(),
                        detail: source.to_string(),
                    }
                } else {
                    DedupError::Redis {
                        url: self.url.clone(),
                        source,
                    }
                }
            })?;
        if replies.len() != wanted + 1 {
            return Err(DedupError::Reply {
                got: replies.len(),
                want: wanted + 1,
            });
        }
        if replies[0].is_none() {
            if self.marker_seen {
                DedupStateLost {
                    window_secs: self.window_secs,
                }
                .emit();
            } else {
                DedupWindowStarted {
                    window_secs: self.window_secs,
                }
                .emit();
            }
        }
        self.marker_seen = true;
        crate::failpoint::after_claim();
        let mut dropped: BTreeMap<&str, usize> = BTreeMap::new();
        let mut replies = replies[1..].iter();
        let keep: Vec<bool> = events
            .iter()
            .map(|(origin, app, e)| {
                if e.id_assigned {
                    return true;
                }
                // As many replies as claimed events: checked above.
                let reply = replies.next().and_then(Option::as_deref);
                let own = replays.contains(&(origin.partition, origin.offset))
                    || reply.is_none_or(|c| c == claim(origin));
                if !own {
                    *dropped.entry(app.as_str()).or_default() += 1;
                }
                own
            })
            .collect();
        let total = dropped.values().sum();
        for (app, n) in dropped {
            DuplicatesDropped { app, events: n }.emit();
        }
        crate::metrics::DEDUP_CHECKED.inc_by(wanted as u64);
        if total > 0 {
            let mut keep = keep.into_iter();
            events.retain(|_| keep.next().unwrap_or(true));
        }
        Ok(total)
    }
}

/// Moves marks forward, never back. KEYS[1] = the marks' hash; ARGV = pairs of field
/// and mark (`offset:index:received_ms`), then the hash's time to live in seconds.
const ADVANCE: &str = r"
local function parse(m)
  local o, i = string.match(m, '^(%-?%d+):(%d+)')
  return tonumber(o), tonumber(i)
end
for n = 1, #ARGV - 1, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[n])
  local o, i = parse(ARGV[n + 1])
  local later = true
  if cur then
    local co, ci = parse(cur)
    later = co == nil or o > co or (o == co and i > ci)
  end
  if later then redis.call('HSET', KEYS[1], ARGV[n], ARGV[n + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[#ARGV])
return 1
";

/// The [`DeliveryMarks`] of one consumer group's webhooks and topic sinks, in the
/// deduplication's Redis: one hash, `{prefix}:delivered:{group}:{topic}`, a field per
/// sink and partition (`webhook:<name>:<partition>`), holding `offset:index:received_ms`
/// (the record's receive time tells it from a record of an earlier topic of the same
/// name: see [`RedisMarks::with_log_probe`]). It expires a window after its last
/// change: a partition idle that long has long been committed past its marks. With
/// `when_unavailable = "pass"` an unreachable Redis neither holds deliveries back nor
/// fails them: nothing is skipped (a replay delivers again) and nothing is marked,
/// and weir says so in its log.
pub struct RedisMarks {
    conn: ConnectionManager,
    url: String,
    key: String,
    ttl_secs: u64,
    pass: bool,
    advance: redis::Script,
    /// Where a loaded mark is checked against its partition's log.
    probe: Option<std::sync::Arc<crate::bus::LogProbe>>,
}

impl RedisMarks {
    /// The marks of consumer group `group` reading `topic`; connects on first use.
    pub fn new(
        redis: &RedisConfig,
        cfg: &DedupConfig,
        group: &str,
        topic: &str,
    ) -> Result<Self, DedupError> {
        let (conn, url) = connect_state(redis)?;
        Ok(Self {
            conn,
            url,
            key: format!("{}:delivered:{group}:{topic}", redis.key_prefix),
            ttl_secs: cfg.window_secs,
            pass: cfg.when_unavailable == WhenUnavailable::Pass,
            advance: redis::Script::new(ADVANCE),
            probe: None,
        })
    }

    /// Checks every mark it loads against its partition's log: a mark whose record
    /// the log does not hold (past its end, or received at another time) is from an
    /// earlier topic of the same name and is ignored (loaded as none), so the new
    /// topic's events are delivered.
    pub fn with_log_probe(mut self, probe: std::sync::Arc<crate::bus::LogProbe>) -> Self {
        self.probe = Some(probe);
        self
    }

    fn field(sink: &str, partition: i32) -> String {
        format!("{sink}:{partition}")
    }

    fn error(&self, source: redis::RedisError) -> BoxError {
        Box::new(DedupError::Redis {
            url: self.url.clone(),
            source,
        })
    }
}

/// A stored mark of `partition`, `offset:index:received_ms` (`offset:index` before the
/// receive time was kept): its slot and the receive time.
fn parse_mark(partition: i32, mark: &str) -> Option<(Slot, Option<i64>)> {
    let mut parts = mark.split(':');
    let offset = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    let received = match parts.next() {
        Some(r) => Some(r.parse().ok()?),
        None => None,
    };
    parts
        .next()
        .is_none()
        .then_some(((partition, offset, index), received))
}

impl DeliveryMarks for RedisMarks {
    fn load<'a>(
        &'a self,
        sink: &'a str,
        partitions: &'a [i32],
    ) -> futures::future::BoxFuture<'a, Result<Vec<Option<Slot>>, BoxError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&self.key);
            for p in partitions {
                cmd.arg(Self::field(sink, *p));
            }
            let stored: Vec<Option<String>> = match cmd.query_async(&mut self.conn.clone()).await {
                Ok(stored) => stored,
                Err(e) if self.pass => {
                    tracing::warn!(sink, error = %self.error(e), "cannot read what was delivered before; dedup.when_unavailable = \"pass\": replayed events are delivered again");
                    return Ok(vec![None; partitions.len()]);
                }
                Err(e) => return Err(self.error(e)),
            };
            let mut marks = Vec::with_capacity(partitions.len());
            for (p, mark) in partitions.iter().zip(stored) {
                let Some(m) = mark else {
                    marks.push(None);
                    continue;
                };
                let (mark, received) = parse_mark(*p, &m).ok_or_else(|| -> BoxError {
                    format!(
                        "Redis key {} field {}: {m:?} is not a delivery mark (offset:index:received_ms)",
                        self.key,
                        Self::field(sink, *p)
                    )
                    .into()
                })?;
                let live = match &self.probe {
                    Some(probe) => probe.holds(*p, mark.1, received).await?,
                    None => true,
                };
                marks.push(live.then_some(mark));
            }
            Ok(marks)
        })
    }

    fn advance<'a>(
        &'a self,
        sink: &'a str,
        origins: &'a [Origin],
    ) -> futures::future::BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(async move {
            if origins.is_empty() {
                return Ok(());
            }
            let mut call = self.advance.key(&self.key);
            for o in origins {
                call.arg(Self::field(sink, o.partition))
                    .arg(format!("{}:{}:{}", o.offset, o.index, o.received_ms));
            }
            call.arg(self.ttl_secs);
            match call.invoke_async::<i64>(&mut self.conn.clone()).await {
                Ok(_) => Ok(()),
                Err(e) if self.pass => {
                    tracing::warn!(sink, error = %self.error(e), "cannot record a delivery; dedup.when_unavailable = \"pass\": a crash before the commit delivers it again");
                    Ok(())
                }
                Err(e) => Err(self.error(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_the_coordinates() {
        let o = Origin {
            partition: 3,
            offset: 0x0102_0304_0506,
            index: 7,
            received_ms: 99,
        };
        let c = claim(&o);
        assert_eq!(&c[..4], &[0, 0, 0, 3]);
        assert_eq!(&c[4..12], &[0, 0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(&c[12..], &[0, 0, 0, 7]);
        // The receive time is not part of the claim: a replay has the same one anyway.
        assert_eq!(
            claim(&Origin {
                received_ms: 0,
                ..o
            }),
            c
        );
    }

    #[tokio::test]
    async fn keys_separate_apps_and_have_a_fixed_length() {
        let d = Dedup::new(
            &RedisConfig::default(),
            &DedupConfig::default(),
            "g",
            Duration::from_millis(500),
        )
        .unwrap();
        let a = d.key("app", "e1");
        assert!(a.starts_with(b"weir:d:g:"));
        assert_eq!(a.len(), "weir:d:g:".len() + 16);
        assert_ne!(a, d.key("other", "e1"));
        assert_ne!(a, d.key("app", "e2"));
        // The separator keeps (app, id) pairs apart that concatenate alike.
        assert_ne!(d.key("ab", "c"), d.key("a", "bc"));
        assert_eq!(d.key("app", &"x".repeat(256)).len(), a.len());
    }
}
