//! The replay guard's lookups on a large `events` table, and what keeping them cheap
//! costs each INSERT.
//!
//! After a rebalance or a restart, the first flush of each partition asks ClickHouse
//! which of its Kafka offsets are already stored (`max_offset`, then `written` over
//! the flush's range). weir reads them from each table's coordinates view
//! (`_weir_coords_TABLE`, sorted by partition and offset); before, the same questions
//! went to the tables, whose sorting key starts with `app, name, timestamp`, so each
//! was a scan of the whole table. This fills `events` (and so its view) with N rows
//! spread over 4 partitions, then times, per partition, weir's own calls and the old
//! SQL on the table, warm (median of 5) and once cold (page cache dropped, when the
//! benchmark may write `/proc/sys/vm/drop_caches`; not with `--smoke`). Then what the view costs an INSERT:
//! 50,000-row blocks into `events` with its view and into a copy without one.
//!
//! Run: `scripts/bench.sh guard` (50,000,000 rows; about 10 minutes here, 3 GB of disk
//! in a temp dir) or `scripts/bench.sh guard --smoke` (1,000,000 rows).
//! `WEIR_BENCH_ROWS=N` sets the rows. Figures go in BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use weir::sinks::clickhouse::{ClickHouseConfig, ClickHouseSink, InsertCompression};
use weir_tests::ClickHouse;

const PARTITIONS: u64 = 4;
/// Offsets per partition in one flush of 50,000 events over 4 partitions.
const FLUSH_OFFSETS: u64 = 12_500;
const DB: &str = "guard";

/// The rows of `numbers(offset, n)` as weir writes them: 3 apps, 5 names, 20 events a
/// second, partition `n % 4` at offset `n / 4`.
fn fill_sql(db: &str, table: &str, offset: u64, n: u64) -> String {
    format!(
        "INSERT INTO {db}.{table} (event_id, app, name, user_id, timestamp, timestamp_ms, \
         received_at, properties, context, pipeline, plugins, control_version, \
         kafka_partition, kafka_offset, kafka_index) \
         SELECT lower(hex(MD5(toString(number)))), concat('app', toString(number % 3)), \
         ['profile_viewed', 'post_liked', 'post_viewed', 'message_sent', 'follow'][number % 5 + 1], \
         concat('user', toString(intHash32(number) % 100000)), \
         toDateTime(1790000000 + intDiv(number, 20)), (1790000000 + intDiv(number, 20)) * 1000, \
         toDateTime(1790000000 + intDiv(number, 20)), \
         concat('{{\"profile_id\":\"user', toString(number % 9973), '\",\"source\":\"feed\"}}'), \
         '{{\"locale\":\"en-GB\"}}', 'default', 'enrich', 1, \
         number % {PARTITIONS}, intDiv(number, {PARTITIONS}), 0 \
         FROM numbers({offset}, {n})"
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Drops the OS page cache and ClickHouse's mark cache; false if not allowed.
async fn drop_caches(ch: &ClickHouse) -> Result<bool> {
    ch.query("SYSTEM DROP MARK CACHE").await?;
    unsafe { libc::sync() };
    Ok(std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok())
}

struct Lookup {
    what: &'static str,
    warm: Duration,
    cold: Option<Duration>,
}

/// Times `f` once cold (if caches can be dropped) and 5 times warm.
async fn time<F, Fut>(ch: &ClickHouse, cold: bool, what: &'static str, mut f: F) -> Result<Lookup>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let cold = if cold && drop_caches(ch).await? {
        let t = Instant::now();
        f().await?;
        Some(t.elapsed())
    } else {
        None
    };
    let mut warm = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        f().await?;
        warm.push(t.elapsed());
    }
    Ok(Lookup {
        what,
        warm: median(warm),
        cold,
    })
}

async fn size(ch: &ClickHouse, table: &str) -> Result<String> {
    ch.query(&format!(
        "SELECT formatReadableSize(sum(bytes_on_disk)) FROM system.parts \
         WHERE active AND database = '{DB}' AND table = '{table}'"
    ))
    .await
}

/// `cold`: also time each lookup once after dropping the caches.
async fn run(ch: &ClickHouse, rows: u64, cold: bool) -> Result<()> {
    let sink = |db: &str| {
        let cfg = ClickHouseConfig {
            url: ch.url(),
            database: db.into(),
            compression: InsertCompression::None,
            ..ClickHouseConfig::default()
        };
        ClickHouseSink::new(&cfg, Arc::from(Vec::new()))
    };
    let version = ch.query("SELECT version()").await?;

    // What the view costs an INSERT: the same rows into `events` (and its view) and
    // into a copy of `events` without one, in blocks of a flush's size, alternating.
    // In a database of their own, dropped after.
    let cost = "guard_cost";
    sink(cost).ensure_schema().await.context("weir's tables")?;
    ch.query(&format!(
        "CREATE TABLE {cost}.events_plain AS {cost}.events"
    ))
    .await?;
    let block = 50_000;
    let per_round = if rows >= 10_000_000 {
        1_000_000
    } else {
        200_000
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..3u64 {
        for (table, out) in [("events", &mut with), ("events_plain", &mut without)] {
            let t = Instant::now();
            ch.query(&format!(
                "{} SETTINGS max_block_size = {block}, max_insert_block_size = {block}",
                fill_sql(cost, table, round * per_round, per_round)
            ))
            .await?;
            out.push(t.elapsed());
        }
    }
    let (with, without) = (median(with), median(without));
    ch.query(&format!("DROP DATABASE {cost}")).await?;

    let sink = sink(DB);
    sink.ensure_schema().await.context("weir's tables")?;
    let t = Instant::now();
    ch.query(&fill_sql(DB, "events", 0, rows)).await?;
    let fill = t.elapsed();
    let stored = ch
        .count(&format!("SELECT count() FROM {DB}.events"))
        .await?;
    let indexed = ch
        .count(&format!("SELECT count() FROM {DB}._weir_coords_events"))
        .await?;
    ensure!(
        stored == rows && indexed == rows,
        "{stored} rows in events, {indexed} in its view; want {rows}"
    );
    // Merges of the fill would run under the lookups.
    ch.query(&format!("OPTIMIZE TABLE {DB}.events FINAL"))
        .await?;
    ch.query(&format!("OPTIMIZE TABLE {DB}._weir_coords_events FINAL"))
        .await?;

    // The flush after a rebalance: each partition's newest FLUSH_OFFSETS offsets.
    let top = rows / PARTITIONS - 1;
    let lo = top + 1 - FLUSH_OFFSETS;
    let mut lookups = Vec::new();
    lookups.push(
        time(
            ch,
            cold,
            "weir: max_offset + written, 4 partitions",
            || async {
                for p in 0..PARTITIONS as i32 {
                    let max = sink.max_offset(p, lo as i64).await?;
                    ensure!(max == Some(top as i64), "partition {p}: max {max:?}");
                    let written = sink.written("events", p, lo as i64, top as i64).await?;
                    ensure!(written.len() as u64 == FLUSH_OFFSETS, "{}", written.len());
                }
                Ok(())
            },
        )
        .await?,
    );
    lookups.push(
        time(ch, cold, "before: the same on the tables, 4 partitions", || async {
            for p in 0..PARTITIONS {
                for table in ["events", "dead_letters"] {
                    ch.query(&format!(
                        "SELECT max(kafka_offset), count() FROM {DB}.{table} \
                         WHERE kafka_partition = {p}"
                    ))
                    .await?;
                }
                let n = ch
                    .query(&format!(
                        "SELECT kafka_offset, kafka_index, event_id FROM {DB}.events \
                         WHERE kafka_partition = {p} AND kafka_offset >= {lo} AND kafka_offset <= {top}"
                    ))
                    .await?
                    .lines()
                    .count() as u64;
                ensure!(n == FLUSH_OFFSETS, "{n}");
            }
            Ok(())
        })
        .await?,
    );

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("\n== The replay guard's lookups (ClickHouse {version}, {cores} cores)");
    println!(
        "rows               {rows} in events ({}), its coordinates view {}",
        size(ch, "events").await?,
        // (18.16 keeps a view's rows in `.inner.NAME`.)
        size(ch, ".inner._weir_coords_events").await?
    );
    println!(
        "fill               {:.1} s (INSERT ... SELECT FROM numbers, view included)",
        fill.as_secs_f64()
    );
    for l in &lookups {
        let cold = l.cold.map_or("not measured".into(), ms);
        println!("{:<48} warm {:>10}   cold {cold}", l.what, ms(l.warm));
    }
    println!(
        "INSERT of {per_round} rows in {block}-row blocks (median of 3): {} with the view, {} without ({:+.0} %)",
        ms(with),
        ms(without),
        (with.as_secs_f64() / without.as_secs_f64() - 1.0) * 100.0
    );
    Ok(())
}

fn main() -> Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let rows = match std::env::var("WEIR_BENCH_ROWS") {
        Ok(n) => n.parse().context("WEIR_BENCH_ROWS")?,
        Err(_) if smoke => 1_000_000,
        Err(_) => 50_000_000,
    };
    ensure!(
        rows >= PARTITIONS * FLUSH_OFFSETS,
        "WEIR_BENCH_ROWS: at least {}",
        PARTITIONS * FLUSH_OFFSETS
    );
    let ch = ClickHouse::start()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The smoke run (in CI) leaves the machine's page cache alone.
    rt.block_on(run(&ch, rows, !smoke))
}
