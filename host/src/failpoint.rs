//! Fault injection for tests, from the `WEIR_FAILPOINT` environment variable: a comma
//! separated list of
//! - `after_write:N`: abort the process right after the Nth flush was written to
//!   ClickHouse, before its offsets are committed (the crash window a replay covers);
//! - `after_claim:N`: abort right after the Nth deduplication check stored its claims
//!   in Redis, before anything of those events is written;
//! - `after_insert:N`: abort right after ClickHouse acknowledged the Nth INSERT of
//!   events or routed rows, when the other tables and sinks of that flush may not
//!   have been written yet;
//! - `after_counter_dead_letters:N`: abort right after the Nth write of the dead
//!   letters of increments Redis refused, before the rest of the partition is
//!   applied;
//! - `panic_after_write:N`: panic in the processor right after the Nth flush was
//!   written (a bug in the processor: the process must stop, not ingest alone go on);
//! - `insert_error:TABLE:N`: the Nth INSERT into TABLE fails as if ClickHouse had
//!   refused it (after the INSERTs before it in the same flush succeeded).
//!
//! Unset (production), every check is one relaxed atomic load of a cached `None`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::OnceLock;

use tracing::error;

#[derive(Default)]
struct Points {
    /// Crash points (`after_write`, ...) and the call that aborts.
    crash: HashMap<String, u64>,
    insert_error: HashMap<String, u64>,
    /// Calls seen so far, per point.
    seen: Mutex<HashMap<String, u64>>,
}

fn points() -> Option<&'static Points> {
    static POINTS: OnceLock<Option<Points>> = OnceLock::new();
    POINTS
        .get_or_init(|| {
            let spec = std::env::var("WEIR_FAILPOINT").ok()?;
            let mut p = Points::default();
            for item in spec.split(',') {
                let parts: Vec<&str> = item.trim().split(':').collect();
                match parts.as_slice() {
                    [
                        point @ ("after_write"
                        | "after_claim"
                        | "after_insert"
                        | "after_counter_dead_letters"
                        | "panic_after_write"),
                        n,
                    ] => {
                        if let Ok(n) = n.parse() {
                            p.crash.insert((*point).to_owned(), n);
                        }
                    }
                    ["insert_error", table, n] => {
                        if let Ok(n) = n.parse() {
                            p.insert_error.insert((*table).to_owned(), n);
                        }
                    }
                    _ => error!(item, "unknown WEIR_FAILPOINT item ignored"),
                }
            }
            Some(p)
        })
        .as_ref()
}

/// Counts a call of point `key` and returns how many there were, this one included.
fn count(p: &Points, key: &str) -> u64 {
    let mut seen = p.seen.lock().expect("failpoint lock");
    let n = seen.entry(key.to_owned()).or_default();
    *n += 1;
    *n
}

/// `after_write:N`: aborts the process at the Nth call; `panic_after_write:N`: panics
/// at the Nth call.
pub fn after_write() {
    crash_at("after_write");
    let Some(p) = points() else { return };
    if let Some(&at) = p.crash.get("panic_after_write")
        && count(p, "panic_after_write") == at
    {
        panic!("WEIR_FAILPOINT panic_after_write:{at} reached");
    }
}

/// `after_claim:N`: aborts the process at the Nth call.
pub fn after_claim() {
    crash_at("after_claim");
}

/// `after_insert:N`: aborts the process at the Nth call.
pub fn after_insert() {
    crash_at("after_insert");
}

/// `after_counter_dead_letters:N`: aborts the process at the Nth call.
pub fn after_counter_dead_letters() {
    crash_at("after_counter_dead_letters");
}

fn crash_at(point: &str) {
    let Some(p) = points() else { return };
    if let Some(&at) = p.crash.get(point)
        && count(p, point) == at
    {
        error!("WEIR_FAILPOINT {point}:{at} reached: aborting");
        std::process::abort();
    }
}

/// `insert_error:TABLE:N`: true at the Nth INSERT into `table`.
pub fn insert_error(table: &str) -> bool {
    let Some(p) = points() else { return false };
    let Some(&at) = p.insert_error.get(table) else {
        return false;
    };
    let hit = count(p, &format!("insert_error:{table}")) == at;
    if hit {
        error!("WEIR_FAILPOINT insert_error:{table}:{at} reached: failing this INSERT");
    }
    hit
}
