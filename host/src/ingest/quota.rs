//! Per-app and per-write-key quotas: events per second and bytes per second, each a
//! rate limiter of the GCRA kind (a token bucket kept as one instant, the time at which
//! the bucket is full again).
//!
//! A request is admitted while the bucket's debt is at most `burst_secs` of its rate,
//! whatever its size, and then charged its whole cost; so the long-run rate is the
//! quota, a burst from idle is `burst_secs` of it plus one request, and a request is
//! never refused for being larger than the bucket. A request refused for the quota is
//! charged nothing and told when the bucket admits again (`Retry-After`); one refused
//! for its body is charged the bytes weir read; one Kafka did not take is given back. Quotas are kept per
//! ingest instance: behind a load balancer with N instances an app gets up to N times
//! its quota.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// A quota: `[app.quota]` (the whole app) or `[app.key_quota]` (each of its write keys).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Events per second (averaged over `burst_secs`). Default: no limit; 1-10,000,000.
    #[serde(default)]
    pub events_per_sec: Option<u64>,
    /// Request-body bytes per second (averaged over `burst_secs`). Default: no limit;
    /// 1,024-10,000,000,000.
    #[serde(default)]
    pub bytes_per_sec: Option<u64>,
    /// How long a burst above the rate may last, in seconds. Default 1; 1-3600.
    #[serde(default = "default_burst_secs")]
    pub burst_secs: u64,
}

fn default_burst_secs() -> u64 {
    1
}

/// The range of [`Quota::events_per_sec`].
pub const EVENTS_PER_SEC: std::ops::RangeInclusive<u64> = 1..=10_000_000;
/// The range of [`Quota::bytes_per_sec`].
pub const BYTES_PER_SEC: std::ops::RangeInclusive<u64> = 1024..=10_000_000_000;
/// The range of [`Quota::burst_secs`].
pub const BURST_SECS: std::ops::RangeInclusive<u64> = 1..=3600;

/// Which limit refused a request (the `limit` label of
/// `weir_ingest_throttled_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    AppEvents,
    AppBytes,
    KeyEvents,
    KeyBytes,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::AppEvents => "app_events",
            Limit::AppBytes => "app_bytes",
            Limit::KeyEvents => "key_events",
            Limit::KeyBytes => "key_bytes",
        }
    }

    fn describe(self, rate: u64) -> String {
        match self {
            Limit::AppEvents => format!("the app's quota of {rate} events/s"),
            Limit::AppBytes => format!("the app's quota of {rate} bytes/s"),
            Limit::KeyEvents => format!("this write key's quota of {rate} events/s"),
            Limit::KeyBytes => format!("this write key's quota of {rate} bytes/s"),
        }
    }
}

/// A refusal: which limit, its rate, and how long until it admits again.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttled {
    pub limit: Limit,
    pub rate: u64,
    pub retry_after: Duration,
}

impl Throttled {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    pub fn message(&self) -> String {
        format!(
            "over {}; retry in {} s",
            self.limit.describe(self.rate),
            self.retry_after_secs()
        )
    }
}

/// One rate: the instant at which its bucket is full again (GCRA's theoretical arrival
/// time), as nanoseconds after [`Quotas::epoch`].
#[derive(Debug)]
struct Gcra {
    limit: Limit,
    rate: u64,
    /// Nanoseconds one unit (event or byte) costs.
    per_unit_ns: f64,
    tolerance_ns: f64,
    full_at_ns: f64,
}

impl Gcra {
    fn new(limit: Limit, rate: u64, burst_secs: u64) -> Self {
        Self {
            limit,
            rate,
            per_unit_ns: 1e9 / rate as f64,
            tolerance_ns: burst_secs as f64 * 1e9,
            full_at_ns: 0.0,
        }
    }

    /// `Err` if the bucket admits nothing at `now_ns`.
    fn check(&self, now_ns: f64) -> Result<(), Throttled> {
        let debt = self.full_at_ns.max(now_ns) - now_ns;
        if debt > self.tolerance_ns {
            return Err(Throttled {
                limit: self.limit,
                rate: self.rate,
                retry_after: Duration::from_nanos((debt - self.tolerance_ns) as u64),
            });
        }
        Ok(())
    }

    /// What a request of `events` events and `bytes` bytes costs this rate.
    fn units(&self, events: u64, bytes: u64) -> u64 {
        match self.limit {
            Limit::AppEvents | Limit::KeyEvents => events,
            Limit::AppBytes | Limit::KeyBytes => bytes,
        }
    }

    fn charge(&mut self, now_ns: f64, units: u64) {
        self.full_at_ns = self.full_at_ns.max(now_ns) + units as f64 * self.per_unit_ns;
    }
}

/// The rates of one app: its own and its keys'.
#[derive(Debug, Default)]
struct AppBuckets {
    rates: Vec<Gcra>,
    keys: HashMap<String, Vec<Gcra>>,
}

fn buckets(quota: Option<&Quota>, events: Limit, bytes: Limit) -> Vec<Gcra> {
    let Some(q) = quota else { return Vec::new() };
    let mut out = Vec::new();
    if let Some(rate) = q.events_per_sec {
        out.push(Gcra::new(events, rate, q.burst_secs));
    }
    if let Some(rate) = q.bytes_per_sec {
        out.push(Gcra::new(bytes, rate, q.burst_secs));
    }
    out
}

/// The quotas of every app that has one. Apps and keys without a quota cost a map
/// lookup.
#[derive(Debug)]
pub struct Quotas {
    epoch: Instant,
    apps: HashMap<String, Mutex<AppBuckets>>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            apps: HashMap::new(),
        }
    }
}

impl Quotas {
    /// `apps`: (app name, its quota, the quota of each of its keys, its write keys).
    pub fn new<'a>(
        apps: impl IntoIterator<Item = (&'a str, Option<&'a Quota>, Option<&'a Quota>, &'a [String])>,
    ) -> Self {
        let mut quotas = Self::default();
        for (app, quota, key_quota, keys) in apps {
            let mut b = AppBuckets {
                rates: buckets(quota, Limit::AppEvents, Limit::AppBytes),
                keys: HashMap::new(),
            };
            if key_quota.is_some() {
                for key in keys {
                    b.keys.insert(
                        key.clone(),
                        buckets(key_quota, Limit::KeyEvents, Limit::KeyBytes),
                    );
                }
            }
            if !b.rates.is_empty() || !b.keys.is_empty() {
                quotas.apps.insert(app.to_owned(), Mutex::new(b));
            }
        }
        quotas
    }

    fn now_ns(&self) -> f64 {
        self.epoch.elapsed().as_nanos() as f64
    }

    /// Whether `app` (posting with `key`) is admitted at all now, before its body is
    /// read: a flooding client is refused without weir reading or parsing what it sent.
    pub fn check(&self, app: &str, key: &str) -> Result<(), Throttled> {
        self.take(app, key, None)
    }

    /// Admits and charges a request of `events` events and `bytes` bytes, or refuses it
    /// (charging nothing).
    pub fn charge(&self, app: &str, key: &str, events: u64, bytes: u64) -> Result<(), Throttled> {
        self.take(app, key, Some((events, bytes)))
    }

    /// Charges `events` and `bytes` whatever the buckets' debt: what a refused body cost
    /// weir to read.
    pub fn spend(&self, app: &str, key: &str, events: u64, bytes: u64) {
        self.adjust(app, key, events, bytes, 1.0);
    }

    /// Gives back what [`Quotas::charge`] took for a request that was not accepted after
    /// all (Kafka did not take it), so that its retry is not refused for it.
    pub fn refund(&self, app: &str, key: &str, events: u64, bytes: u64) {
        self.adjust(app, key, events, bytes, -1.0);
    }

    fn adjust(&self, app: &str, key: &str, events: u64, bytes: u64, sign: f64) {
        let Some(buckets) = self.apps.get(app) else {
            return;
        };
        let now = self.now_ns();
        let mut b = buckets.lock().unwrap_or_else(|e| e.into_inner());
        let AppBuckets { rates, keys } = &mut *b;
        let key_rates = keys.get_mut(key).map_or(&mut [][..], Vec::as_mut_slice);
        for g in rates.iter_mut().chain(key_rates.iter_mut()) {
            let units = g.units(events, bytes);
            if sign > 0.0 {
                g.charge(now, units);
            } else {
                // Never below "full now": a refund does not bank credit.
                g.full_at_ns = (g.full_at_ns - units as f64 * g.per_unit_ns).max(now);
            }
        }
    }

    fn take(&self, app: &str, key: &str, cost: Option<(u64, u64)>) -> Result<(), Throttled> {
        let Some(buckets) = self.apps.get(app) else {
            return Ok(());
        };
        let now = self.now_ns();
        let mut b = buckets.lock().unwrap_or_else(|e| e.into_inner());
        let AppBuckets { rates, keys } = &mut *b;
        let key_rates = keys.get_mut(key).map_or(&mut [][..], Vec::as_mut_slice);
        // The longest wait of all the limits that refuse, so that a client retrying
        // after Retry-After is not refused again by another.
        let refused = rates
            .iter()
            .chain(key_rates.iter())
            .filter_map(|g| g.check(now).err())
            .max_by_key(|t| t.retry_after);
        if let Some(t) = refused {
            return Err(t);
        }
        if let Some((events, bytes)) = cost {
            for g in rates.iter_mut().chain(key_rates.iter_mut()) {
                g.charge(now, g.units(events, bytes));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(events: Option<u64>, bytes: Option<u64>, burst_secs: u64) -> Quota {
        Quota {
            events_per_sec: events,
            bytes_per_sec: bytes,
            burst_secs,
        }
    }

    #[test]
    fn the_long_run_rate_is_the_quota() {
        let mut g = Gcra::new(Limit::AppEvents, 1000, 1);
        // Offer 100 events every 10 ms (10,000 events/s) for 10 s.
        let mut admitted = 0;
        for step in 0..1000 {
            let now = step as f64 * 10e6;
            if g.check(now).is_ok() {
                g.charge(now, 100);
                admitted += 100;
            }
        }
        // 10 s at 1000/s, plus the burst of 1 s, plus one request.
        assert!((10_000..=11_100).contains(&admitted), "{admitted}");
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_once_it_is_full() {
        let mut g = Gcra::new(Limit::AppEvents, 10, 1);
        assert!(g.check(0.0).is_ok());
        g.charge(0.0, 1000);
        let refused = g.check(1e9).unwrap_err();
        // 1000 events at 10/s: full again after 100 s, admitting after 99 s.
        assert_eq!(refused.retry_after_secs(), 98);
        assert!(g.check(99.5e9).is_ok());
    }

    #[test]
    fn app_and_key_quotas_refuse_with_the_longest_wait() {
        let keys = vec!["k1".to_owned(), "k2".to_owned()];
        let app = quota(Some(300), None, 1);
        let key = quota(Some(100), Some(1024), 1);
        let q = Quotas::new([("a", Some(&app), Some(&key), keys.as_slice())]);
        // k1: 150 events (over its 100/s burst afterwards).
        q.charge("a", "k1", 150, 10).unwrap();
        let t = q.check("a", "k1").unwrap_err();
        assert_eq!(t.limit, Limit::KeyEvents);
        assert!(
            t.message()
                .contains("this write key's quota of 100 events/s")
        );
        // k2 is its own key: its first two requests pass although k1 spent 150. The
        // third is refused by k2's limit (1 s to wait) and the app's (0.17 s): the
        // answer is the longer wait, k2's.
        q.charge("a", "k2", 100, 10).unwrap();
        q.charge("a", "k2", 100, 10).unwrap();
        let t = q.charge("a", "k2", 1, 10).unwrap_err();
        assert_eq!(t.limit, Limit::KeyEvents);
        assert_eq!(t.retry_after_secs(), 1);
        // Bytes count too.
        let q = Quotas::new([("a", None, Some(&key), keys.as_slice())]);
        q.charge("a", "k1", 1, 5000).unwrap();
        assert_eq!(q.check("a", "k1").unwrap_err().limit, Limit::KeyBytes);
        // Apps without a quota, and unknown apps, pass.
        assert!(q.charge("b", "k1", u64::MAX, u64::MAX).is_ok());
    }

    #[test]
    fn refused_bodies_are_spent_and_requests_kafka_refused_are_given_back() {
        let keys = vec!["k".to_owned()];
        let app = quota(Some(100), Some(10_000), 1);
        let q = Quotas::new([("a", Some(&app), None, keys.as_slice())]);
        // Bad bodies of 8 KB each at 10 KB/s: each is spent, so that after the second
        // the next request is refused before it is read.
        q.spend("a", "k", 0, 8_000);
        assert!(q.check("a", "k").is_ok());
        q.spend("a", "k", 0, 8_000);
        assert_eq!(q.check("a", "k").unwrap_err().limit, Limit::AppBytes);
        // A request charged and then refused by Kafka costs nothing, and a refund
        // banks no credit beyond a full bucket.
        let q = Quotas::new([("a", Some(&app), None, keys.as_slice())]);
        q.charge("a", "k", 190, 0).unwrap();
        q.refund("a", "k", 190, 0);
        q.refund("a", "k", 1_000, 0);
        q.charge("a", "k", 190, 0).unwrap();
        assert!(q.check("a", "k").is_err(), "a refund banked credit");
    }

    #[test]
    fn a_refused_request_costs_nothing() {
        let keys = vec!["k".to_owned()];
        let app = quota(Some(100), None, 1);
        let q = Quotas::new([("a", Some(&app), None, keys.as_slice())]);
        q.charge("a", "k", 250, 0).unwrap();
        let first = q.check("a", "k").unwrap_err().retry_after;
        for _ in 0..100 {
            assert!(q.charge("a", "k", 100, 0).is_err());
        }
        let later = q.check("a", "k").unwrap_err().retry_after;
        assert!(later <= first, "{later:?} > {first:?}");
    }
}
