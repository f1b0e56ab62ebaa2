//! The plugin call path: per-event cost of a pass-through plugin (built with the Rust
//! SDK) at batch sizes 1, 64, 256 and 1024, through `PluginInstance::process` (the
//! sandbox crossing, lifting and lowering the events, checking the outcomes), and of
//! the `enrich` example plugin, which parses and re-serialises the properties.
//!
//! Also instantiation, with memory on demand and with the pooling allocator.
//!
//! Run: `cargo bench -p weir-tests --bench plugin_call`. Figures go in BENCHMARKS.md.
//! `WEIR_BENCH_PLUGINS=label=path.wasm,...` adds other builds to the call benchmark
//! (e.g. a plugin built against an older SDK, to compare contract versions).

use std::time::Duration;

use std::path::PathBuf;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use weir::model::{Event, Limits};
use weir::runtime::Runtime;
use weir_tests::plugin_path;

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            event_id: format!("01a2082a-23bc-76e5-8bf8-{i:012}"),
            app: "bench".into(),
            name: if i % 2 == 0 {
                "profile_viewed"
            } else {
                "post_liked"
            }
            .into(),
            user_id: Some(format!("user{}", i % 1000)),
            timestamp_ms: 1_795_400_000_000 + i as i64,
            properties: format!(
                r#"{{"profile_id":"user{}","source":"feed","position":{i}}}"#,
                i % 97
            ),
            context: r#"{"locale":"en-GB","app_version":"4.2.0"}"#.into(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtime = Runtime::new().unwrap();
    let limits = Limits {
        deadline: Duration::from_secs(1),
        memory_bytes: 64 << 20,
    };
    let mut plugins: Vec<(String, PathBuf)> = ["passthrough", "enrich"]
        .map(|p| (p.to_owned(), plugin_path(p)))
        .into();
    if let Ok(extra) = std::env::var("WEIR_BENCH_PLUGINS") {
        for item in extra.split(',').filter(|i| !i.is_empty()) {
            let (label, path) = item
                .split_once('=')
                .expect("WEIR_BENCH_PLUGINS is label=path.wasm,...");
            plugins.push((label.to_owned(), path.into()));
        }
    }
    for (plugin, path) in plugins {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let loaded = rt
            .block_on(runtime.load(&plugin, &bytes, "{}".into(), limits))
            .unwrap();
        let mut instance = rt.block_on(loaded.instantiate()).unwrap();
        let mut group = c.benchmark_group(format!("plugin_call/{plugin}@{}", loaded.contract()));
        for batch in [1usize, 64, 256, 1024] {
            // A fresh copy per iteration (not timed): the plugin's changes are applied
            // to the events it keeps.
            let input = events(batch);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::from_parameter(batch), |b| {
                b.iter_batched_ref(
                    || input.clone(),
                    |batch| rt.block_on(instance.process(batch)),
                    BatchSize::SmallInput,
                )
            });
        }
        group.finish();
    }
}

/// Instantiation (at load, and for each fresh instance of a bisection after a trap),
/// with memory on demand and with the pooling allocator.
fn instantiate(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limits = Limits {
        deadline: Duration::from_secs(1),
        memory_bytes: 64 << 20,
    };
    for (strategy, runtime) in [
        ("ondemand", Runtime::new().unwrap()),
        ("pooling", Runtime::with_pooling().unwrap()),
    ] {
        let mut group = c.benchmark_group(format!("instantiate/{strategy}"));
        let plugins = ["passthrough", "enrich"].map(|p| (p, plugin_path(p)));
        for (plugin, path) in plugins {
            let bytes = std::fs::read(path).unwrap();
            let loaded = rt
                .block_on(runtime.load(plugin, &bytes, "{}".into(), limits))
                .unwrap();
            group.bench_function(plugin, |b| {
                b.iter(|| rt.block_on(loaded.instantiate()).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench, instantiate
}
criterion_main!(benches);
