//! Ingest's envelope check: per-event cost of `envelope::parse_body` on a request of
//! 100 events (~300 bytes each, with properties and context as an SDK sends them):
//! the events split out, their fields checked, properties and context checked for
//! JSON that later stages would read differently (repeated keys, numbers out of range,
//! lone surrogates) and compacted.
//!
//! Run: `cargo bench -p weir-tests --bench envelope`. Figures go in BENCHMARKS.md.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use weir::ingest::envelope::{self, BodyFormat, Limits};

fn body(n: usize) -> String {
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name":"profile_viewed","event_id":"01a2082a-23bc-76e5-8bf8-{i:012}","user_id":"user{}","timestamp":"2026-12-03T10:00:00.{:03}Z","properties":{{"profile_id":"user{}","source":"feed","position":{i},"tags":["a","b"],"ab":{{"variant":"blue","since":1795400000}}}},"context":{{"locale":"en-GB","app_version":"4.2.0","os":"android"}}}}"#,
                i % 1000,
                i % 1000,
                i % 97
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

fn bench(c: &mut Criterion) {
    let limits = Limits {
        max_event_bytes: 32 << 10,
        max_events: 1000,
        max_depth: 32,
    };
    let body = body(100);
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(100));
    group.bench_function("parse_body/100", |b| {
        b.iter(|| {
            envelope::parse_body(body.as_bytes(), BodyFormat::Json, &limits, 0, || {
                "generated".to_owned()
            })
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
