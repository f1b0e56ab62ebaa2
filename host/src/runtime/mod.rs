//! The WebAssembly runtime: the one wasmtime [`Engine`], a `bindgen!` per version of
//! the plugin contract (`weir:plugin@0.1.0` in `wit/plugin.wit`, `0.2.0` in
//! `wit/0.2.0/plugin.wit`: a plugin of either runs here), and the sandbox every plugin
//! call runs in.
//!
//! Plugins are hostile until proven otherwise. Every call runs under a wall-clock
//! deadline (epoch interruption), a linear-memory cap and a stack cap, with WASI
//! linked but granting nothing: no preopened directories, no environment, no network.
//! A trap poisons only the instance it happened in: [`PluginInstance::process`]
//! replaces the instance and bisects the batch, so the offending events fail with the
//! trap message and every other event is processed.
//!
//! This module knows nothing of Kafka or sinks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{debug, error, info, trace, warn};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// `weir:plugin@0.1.0`: events cross as records of strings, changed events whole.
mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit",
        // Calls are async so that a plugin blocked inside a host call (a WASI sleep or
        // poll) can be abandoned at its deadline; CPU-bound code is stopped by epochs.
        exports: { default: async },
    });
}

/// `weir:plugin@0.2.0`: a batch crosses as one text buffer and spans of it, a changed
/// event as what changed.
mod bindings_v2 {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit/0.2.0",
        exports: { default: async },
    });
}

use bindings::weir::plugin::host::Level;
use bindings::weir::plugin::types::{Count, Event, Outcome, Output, Routed, Row};
use bindings_v2::weir::plugin::types as v2;

use crate::model::{self, FailureKind, Limits, PluginFailure, PluginOutput};

/// `WEIR_WASM_PROFILER=perfmap`: write a perf map of compiled plugin code, so that
/// `perf record`/`perf top` name the plugin functions weir's CPU goes to.
pub const PROFILER_ENV: &str = "WEIR_WASM_PROFILER";

/// How often the epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Wasm stack cap of every instance.
pub const MAX_WASM_STACK: usize = 512 * 1024;
/// Most distinct counters one instance may create.
const MAX_COUNTERS: usize = 256;
/// Longest counter name of `counter-add`, in bytes (a longer one is ignored).
const MAX_COUNTER_NAME: usize = 128;
/// Most outputs (rows, counts, forwards) one event may route to: the event beyond
/// fails, as a bad outcome.
pub const MAX_OUTPUTS_PER_EVENT: usize = 64;
/// Longest log line a plugin may write; the rest is cut.
const MAX_LOG_LINE: usize = 4096;

/// Errors while preparing a plugin.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the WebAssembly engine: {0}")]
    Setup(String),
    #[error("plugin {name}: not a valid weir plugin component: {reason}")]
    Invalid { name: String, reason: String },
    #[error("plugin {name}: cannot instantiate: {reason}")]
    Instantiate { name: String, reason: String },
}

/// The shared engine. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
}

impl Runtime {
    /// Creates the engine and starts its epoch ticker (a thread that ends with the
    /// last clone of the engine). Instances get their memory on demand: see
    /// [`Runtime::with_pooling`] for why that is the default.
    pub fn new() -> Result<Self, RuntimeError> {
        Self::build(false)
    }

    /// Like [`Runtime::new`], with wasmtime's pooling allocator (memories and tables
    /// pre-reserved in a pool of 64 instances of up to 256 MiB each). Measured in
    /// `tests/benches/plugin_call.rs` (`instantiate/*`): it makes instantiation faster,
    /// but weir instantiates only when a plugin loads and when a failed batch is
    /// bisected, never per batch, so the default stays on demand (no large virtual
    /// reservation, no pool-size limit on plugins).
    pub fn with_pooling() -> Result<Self, RuntimeError> {
        Self::build(true)
    }

    fn build(pooling: bool) -> Result<Self, RuntimeError> {
        let setup = |e: wasmtime::Error| RuntimeError::Setup(format!("{e:#}"));
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        // `perf` sees compiled plugin code as anonymous memory; with a perf map
        // (`/tmp/perf-PID.map`) it names each plugin function.
        if std::env::var_os(PROFILER_ENV).is_some_and(|v| v == "perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if pooling {
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_component_instances(64)
                .total_core_instances(256)
                .total_memories(256)
                .total_tables(256)
                .max_memory_size(256 << 20);
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config).map_err(setup)?;
        // wasmtime compiles on rayon's global pool, whose threads take the priority of
        // the thread that first compiles. Made here, at the process's priority, so that
        // a dry run (compiled from a thread at nice 10) cannot leave every later
        // pipeline compile and hot swap at its lower priority. Already made: fine.
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("weir-compile-{i}"))
            .build_global();

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(setup)?;
        bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(setup)?;
        bindings_v2::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(setup)?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| RuntimeError::Setup(format!("cannot start the epoch thread: {e}")))?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
        })
    }

    /// Compiles a component and checks it against the weir world. Compilation is the
    /// slow part (tens of ms to seconds): do it once per version, off the hot path.
    /// The version is the first 12 hex digits of the component's sha256.
    pub async fn load(
        &self,
        name: &str,
        bytes: &[u8],
        config_json: String,
        limits: Limits,
    ) -> Result<Plugin, RuntimeError> {
        let version = hex::encode(&Sha256::digest(bytes)[..6]);
        self.load_as(name, &version, bytes, config_json, limits)
            .await
    }

    /// Like [`Runtime::load`], with the version label given (the control plane's
    /// version number of the plugin).
    pub async fn load_as(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        config_json: String,
        limits: Limits,
    ) -> Result<Plugin, RuntimeError> {
        let compiled = self.compile(name, bytes).await?;
        self.load_compiled(name, version, &compiled, config_json, limits)
            .await
    }

    /// Compiles a component (on a blocking thread: it can take seconds), to make
    /// plugins of it later with [`Runtime::load_compiled`].
    pub async fn compile(&self, name: &str, bytes: &[u8]) -> Result<Compiled, RuntimeError> {
        Ok(Compiled {
            component: self.compile_blocking(name, bytes).await?,
            size: bytes.len(),
        })
    }

    /// Makes a plugin of a compiled component: checks it against the weir world and
    /// instantiates it once. Milliseconds: no compilation.
    pub async fn load_compiled(
        &self,
        name: &str,
        version: &str,
        compiled: &Compiled,
        config_json: String,
        limits: Limits,
    ) -> Result<Plugin, RuntimeError> {
        let pre = self.check_world(name, compiled.component.clone())?;
        let plugin = Plugin {
            inner: Arc::new(PluginInner {
                name: name.to_owned(),
                version: version.to_owned(),
                config: config_json,
                limits,
                engine: self.engine.clone(),
                pre,
            }),
        };
        // Instantiate once now, so a plugin that cannot start fails at load, not mid-stream.
        plugin.instantiate().await?;
        info!(
            plugin = %name,
            version = %plugin.version(),
            contract = plugin.contract(),
            size = compiled.size,
            "plugin loaded"
        );
        Ok(plugin)
    }

    /// Compiles `bytes` and reports what an upload check needs: its imports, and
    /// whether it is a component of the weir world. `Err` when it is not a component at
    /// all (garbage, a core module, a component that does not compile).
    pub async fn inspect(&self, name: &str, bytes: &[u8]) -> Result<Inspection, RuntimeError> {
        let invalid = |reason: String| RuntimeError::Invalid {
            name: name.to_owned(),
            reason,
        };
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', _, _, 1, 0]) => {}
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
                return Err(invalid(
                    "this is a core WebAssembly module, not a component; build for wasm32-wasip2 \
                     or wrap it with `wasm-tools component new`"
                        .into(),
                ));
            }
            _ => {
                return Err(invalid(
                    "not WebAssembly (the bytes do not start with the \\0asm header)".into(),
                ));
            }
        }
        let component = self.compile_blocking(name, bytes).await?;
        let imports = component
            .component_type()
            .imports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let world = self.check_world(name, component).map(drop);
        Ok(Inspection { imports, world })
    }

    async fn compile_blocking(&self, name: &str, bytes: &[u8]) -> Result<Component, RuntimeError> {
        let engine = self.engine.clone();
        let owned = bytes.to_vec();
        tokio::task::spawn_blocking(move || Component::new(&engine, owned))
            .await
            .map_err(|e| RuntimeError::Setup(format!("compiler thread failed: {e}")))?
            .map_err(|e| RuntimeError::Invalid {
                name: name.to_owned(),
                reason: format!("{e:#}"),
            })
    }

    /// The contract a component exports: 0.2.0 if it does, else 0.1.0, else an error
    /// that says why it is neither (against 0.1.0's `process`, the older contract).
    fn check_world(&self, name: &str, component: Component) -> Result<Pre, RuntimeError> {
        let invalid = |reason: String| RuntimeError::Invalid {
            name: name.to_owned(),
            reason,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))?;
        if let Ok(v2) = bindings_v2::PluginPre::new(pre.clone()) {
            return Ok(Pre::V2(v2));
        }
        bindings::PluginPre::new(pre).map(Pre::V1).map_err(|e| {
            invalid(format!(
                "not a component of the weir:plugin world (0.1.0 or 0.2.0): {e:#}"
            ))
        })
    }
}

/// A component checked against one version of the contract, ready to instantiate.
enum Pre {
    V1(bindings::PluginPre<HostState>),
    V2(bindings_v2::PluginPre<HostState>),
}

/// The exports of one instance, by contract version.
enum Exports {
    V1(bindings::Plugin),
    V2(bindings_v2::Plugin),
}

/// A compiled component, not yet checked against the weir world. Cheap to clone.
#[derive(Clone)]
pub struct Compiled {
    component: Component,
    size: usize,
}

/// What [`Runtime::inspect`] found in a component.
#[derive(Debug)]
pub struct Inspection {
    /// Import names, e.g. `wasi:filesystem/types@0.2.0`.
    pub imports: Vec<String>,
    /// Whether it exports the weir world with imports weir can link.
    pub world: Result<(), RuntimeError>,
}

/// A compiled, pre-instantiated plugin version. Cheap to clone; instances are made
/// from it with [`Plugin::instantiate`].
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    name: String,
    version: String,
    config: String,
    limits: Limits,
    engine: Engine,
    pre: Pre,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Content address of the component: the first 12 hex digits of its sha256.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The version of the plugin contract the component exports: `0.1.0` or `0.2.0`.
    pub fn contract(&self) -> &'static str {
        match self.inner.pre {
            Pre::V1(_) => "0.1.0",
            Pre::V2(_) => "0.2.0",
        }
    }

    /// Makes a fresh instance in its own store.
    pub async fn instantiate(&self) -> Result<PluginInstance, RuntimeError> {
        let p = &self.inner;
        let state = HostState {
            wasi: WasiCtx::builder()
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .build(),
            table: ResourceTable::new(),
            limiter: Limiter::new(p.limits.memory_bytes),
            plugin: p.name.clone(),
            version: p.version.clone(),
            config: p.config.clone(),
            counters: BTreeMap::new(),
        };
        let mut store = Store::new(&p.engine, state);
        store.limiter(|s| &mut s.limiter);
        // What one call (and one host call) hands the host: strings and lists are copied
        // out of the plugin's memory, and an outcome may point at the same bytes any
        // number of times. The cap is the plugin's memory cap, not wasmtime's 128 MiB.
        store.set_hostcall_fuel(p.limits.memory_bytes);
        // A generous deadline for start-up code; calls set their own.
        store.set_epoch_deadline(ticks(p.limits.deadline).max(200));
        store.epoch_deadline_trap();
        let exports = match &p.pre {
            Pre::V1(pre) => pre.instantiate_async(&mut store).await.map(Exports::V1),
            Pre::V2(pre) => pre.instantiate_async(&mut store).await.map(Exports::V2),
        }
        .map_err(|e| RuntimeError::Instantiate {
            name: p.name.clone(),
            reason: format!("{e:#}"),
        })?;
        Ok(PluginInstance {
            plugin: self.clone(),
            store,
            exports,
            batch: v2::Batch {
                text: Vec::new(),
                events: Vec::new(),
            },
        })
    }
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() as u64)
        .div_ceil(EPOCH_TICK.as_micros() as u64)
        .max(1)
}

/// What became of one event in one plugin. For `Keep`, the event in the batch passed
/// to [`PluginInstance::process`] now holds the plugin's changes; for every other
/// verdict it is as it was.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Kept unchanged.
    Pass,
    /// Kept, changed by the plugin (the changes are applied to the event).
    Keep,
    /// Kept, with these changes if any (not yet applied: the caller applies them once
    /// it accepted the outputs), and fanned out to tables and counters.
    Route {
        changes: Option<Changes>,
        outputs: Vec<PluginOutput>,
    },
    Drop(String),
    Reject(String),
    /// The plugin failed on this event: a trap (deadline, memory, stack, panic) or an
    /// invalid result. The message names the limit or the problem.
    Failed(PluginFailure),
}

/// What a plugin answered for one event, checked, before it is applied to the event.
enum Answer {
    Pass,
    Keep(Changes),
    Route(Option<Changes>, Vec<PluginOutput>),
    Drop(String),
    Reject(String),
    Failed(PluginFailure),
}

impl Answer {
    fn apply(self, event: &mut model::Event) -> Verdict {
        match self {
            Answer::Pass => Verdict::Pass,
            Answer::Keep(changes) => {
                changes.apply(event);
                Verdict::Keep
            }
            Answer::Route(changes, outputs) => Verdict::Route { changes, outputs },
            Answer::Drop(reason) => Verdict::Drop(reason),
            Answer::Reject(reason) => Verdict::Reject(reason),
            Answer::Failed(failure) => Verdict::Failed(failure),
        }
    }
}

/// The fields a plugin changed in an event (checked); `None` leaves one as it was.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    name: Option<String>,
    user_id: Option<Option<String>>,
    timestamp_ms: Option<i64>,
    properties: Option<String>,
    context: Option<String>,
}

impl Changes {
    /// Changes `e` as the plugin did.
    pub fn apply(self, e: &mut model::Event) {
        if let Some(name) = self.name {
            e.name = name;
        }
        if let Some(user_id) = self.user_id {
            e.user_id = user_id;
        }
        if let Some(timestamp_ms) = self.timestamp_ms {
            e.timestamp_ms = timestamp_ms;
        }
        if let Some(properties) = self.properties {
            e.properties = properties;
        }
        if let Some(context) = self.context {
            e.context = context;
        }
    }
}

/// The events of one call, in the type of the instance's contract.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// Moved into 0.1.0's records for the whole batch (so a bisection copies nothing).
    V1(&'a [Event]),
    /// Encoded into 0.2.0's batch per call.
    V2(&'a [model::Event]),
}

impl Input<'_> {
    fn len(&self) -> usize {
        match self {
            Input::V1(e) => e.len(),
            Input::V2(e) => e.len(),
        }
    }

    fn range(&self, start: usize, end: usize) -> Self {
        match self {
            Input::V1(e) => Input::V1(&e[start..end]),
            Input::V2(e) => Input::V2(&e[start..end]),
        }
    }
}

/// Above this, the text buffer of a 0.2.0 batch is not kept for the next call.
const KEEP_TEXT_CAPACITY: usize = 8 << 20;

/// One live instance. Not shared between threads; the processor owns one per plugin.
pub struct PluginInstance {
    plugin: Plugin,
    store: Store<HostState>,
    exports: Exports,
    /// The 0.2.0 batch of the current call, its buffers kept from call to call.
    batch: v2::Batch,
}

/// Why one batch call did not produce outcomes.
enum CallFailure {
    /// The instance trapped or was abandoned: it must not be used again.
    Trap(PluginFailure),
    /// The plugin answered with the wrong number of outcomes.
    Mismatch(PluginFailure),
}

impl PluginInstance {
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Takes the counters the plugin reported through `counter-add` since the last
    /// take (sums per name; at most 256 names per take).
    pub fn take_counters(&mut self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.store.data_mut().counters)
    }

    /// The largest linear memory this instance has asked for, in bytes.
    pub fn peak_memory(&self) -> usize {
        self.store.data().limiter.peak_memory
    }

    /// Runs a batch. Returns one verdict per event, and applies the plugin's changes to
    /// the events it kept changed (the others are handed back as they were). Never
    /// fails as a whole: when a call traps, the instance is replaced and the batch
    /// bisected on fresh instances, so only the events that cause the trap fail.
    pub async fn process(&mut self, events: &mut Vec<model::Event>) -> Vec<Verdict> {
        let answers = if matches!(self.exports, Exports::V1(_)) {
            // 0.1.0 lowers records of strings: the events move into them and back.
            let wit: Vec<Event> = events.drain(..).map(to_wit).collect();
            let answers = self.bisect(Input::V1(&wit)).await;
            events.extend(wit.into_iter().map(from_wit));
            answers
        } else {
            self.bisect(Input::V2(events)).await
        };
        events
            .iter_mut()
            .zip(answers)
            .map(|(event, answer)| answer.apply(event))
            .collect()
    }

    async fn bisect(&mut self, input: Input<'_>) -> Vec<Answer> {
        let mut out: Vec<Option<Answer>> =
            std::iter::repeat_with(|| None).take(input.len()).collect();
        // Ranges still to run; popped from the end, so pushed right half first.
        let mut work = vec![(0, input.len())];
        while let Some((start, end)) = work.pop() {
            if start == end {
                continue;
            }
            let fail = |out: &mut [Option<Answer>], reason: &PluginFailure| {
                for slot in out {
                    *slot = Some(Answer::Failed(reason.clone()));
                }
            };
            match self.call(input.range(start, end)).await {
                Ok(answers) => {
                    for (slot, answer) in out[start..end].iter_mut().zip(answers) {
                        *slot = Some(answer);
                    }
                }
                Err(CallFailure::Mismatch(reason)) => fail(&mut out[start..end], &reason),
                Err(CallFailure::Trap(reason)) => {
                    warn!(
                        plugin = %self.plugin.name(),
                        version = %self.plugin.version(),
                        events = end - start,
                        kind = reason.kind.as_str(),
                        reason = %reason,
                        "plugin failed; isolating the offending events"
                    );
                    if !self.replace().await || end - start == 1 {
                        fail(&mut out[start..end], &reason);
                    } else {
                        let mid = start + (end - start) / 2;
                        work.push((mid, end));
                        work.push((start, mid));
                    }
                }
            }
        }
        out.into_iter()
            .map(|v| v.expect("every range is resolved"))
            .collect()
    }

    /// Replaces a trapped instance with a fresh one. False if that failed too.
    async fn replace(&mut self) -> bool {
        match self.plugin.instantiate().await {
            Ok(fresh) => {
                // What the plugin counted before the trap stays counted.
                let counters = self.take_counters();
                *self = fresh;
                self.store.data_mut().counters = counters;
                true
            }
            Err(e) => {
                error!(plugin = %self.plugin.name(), error = %e, "cannot re-instantiate plugin");
                false
            }
        }
    }

    /// One call of the plugin on `input`, its outcomes checked.
    async fn call(&mut self, input: Input<'_>) -> Result<Vec<Answer>, CallFailure> {
        // A call runs on this thread without yielding until it returns (epochs trap at
        // the deadline, they do not yield): let the task's other work run first, so
        // that a chain of calls (a large batch, or a failing one being split) does not
        // starve the Kafka consumer of its polls for longer than one call.
        tokio::task::yield_now().await;
        let limits = self.plugin.inner.limits;
        self.store.set_epoch_deadline(ticks(limits.deadline));
        self.store.data_mut().limiter.denied = None;
        // Epochs stop wasm code at the deadline; the timeout stops a call that waits in a
        // host function (a WASI sleep or poll), which epochs cannot interrupt.
        let wait = limits.deadline + HOST_CALL_GRACE;
        match (&self.exports, input) {
            (Exports::V1(exports), Input::V1(events)) => {
                let call = exports.call_process(&mut self.store, events);
                let result = tokio::time::timeout(wait, call).await;
                let outcomes = self.finish(result, events.len())?;
                Ok(outcomes
                    .into_iter()
                    .zip(events)
                    .map(|(outcome, original)| answer_v1(outcome, original))
                    .collect())
            }
            (Exports::V2(exports), Input::V2(events)) => {
                encode(events, &mut self.batch).map_err(CallFailure::Trap)?;
                let call = exports.call_process(&mut self.store, &self.batch);
                let result = tokio::time::timeout(wait, call).await;
                if self.batch.text.capacity() > KEEP_TEXT_CAPACITY {
                    self.batch.text = Vec::new();
                }
                let outcomes = self.finish(result, events.len())?;
                Ok(outcomes.into_iter().map(answer_v2).collect())
            }
            _ => unreachable!("a call's input is built for the instance's contract"),
        }
    }

    /// The outcomes of a call that was to return `expected` of them, or why not.
    fn finish<T>(
        &self,
        result: Result<wasmtime::Result<Vec<T>>, tokio::time::error::Elapsed>,
        expected: usize,
    ) -> Result<Vec<T>, CallFailure> {
        let limits = self.plugin.inner.limits;
        match result {
            Err(_) => Err(CallFailure::Trap(PluginFailure::new(
                FailureKind::Deadline,
                format!(
                    "deadline exceeded: the call waited in a host call for longer than {} ms",
                    limits.deadline.as_millis()
                ),
            ))),
            Ok(Ok(outcomes)) if outcomes.len() == expected => Ok(outcomes),
            Ok(Ok(outcomes)) => Err(CallFailure::Mismatch(PluginFailure::new(
                FailureKind::BadOutcome,
                format!(
                    "plugin returned {} outcomes for {} events",
                    outcomes.len(),
                    expected
                ),
            ))),
            Ok(Err(e)) => Err(CallFailure::Trap(describe_trap(
                &e,
                limits,
                self.store.data().limiter.denied,
            ))),
        }
    }
}

/// Writes `events` into a 0.2.0 batch: their strings back to back in `batch.text`
/// (an app shared by consecutive events once), each event as spans of it. Fails when
/// the text does not fit the spans' 32-bit offsets (the batch is then split).
fn encode(events: &[model::Event], batch: &mut v2::Batch) -> Result<(), PluginFailure> {
    fn put(text: &mut Vec<u8>, s: &str) -> v2::Span {
        let offset = text.len() as u32;
        text.extend_from_slice(s.as_bytes());
        v2::Span {
            offset,
            len: s.len() as u32,
        }
    }
    let (text, spans) = (&mut batch.text, &mut batch.events);
    text.clear();
    spans.clear();
    spans.reserve(events.len());
    let mut app: Option<(&str, v2::Span)> = None;
    for e in events {
        let app_span = match app {
            Some((a, span)) if a == e.app => span,
            _ => {
                let span = put(text, &e.app);
                app = Some((&e.app, span));
                span
            }
        };
        spans.push(v2::Event {
            event_id: put(text, &e.event_id),
            app: app_span,
            name: put(text, &e.name),
            user_id: e.user_id.as_deref().map(|u| put(text, u)),
            timestamp_ms: e.timestamp_ms,
            properties: put(text, &e.properties),
            context: put(text, &e.context),
        });
    }
    if u32::try_from(text.len()).is_err() {
        return Err(PluginFailure::new(
            FailureKind::MemoryCap,
            format!(
                "a batch of {} events holds {} MiB of text, more than one call can take (4 GiB)",
                events.len(),
                text.len() >> 20
            ),
        ));
    }
    Ok(())
}

/// Extra time a call may spend inside host functions beyond its deadline.
const HOST_CALL_GRACE: Duration = Duration::from_millis(20);

/// A trap's kind and a message that names the limit that fired, when one did.
fn describe_trap(
    e: &wasmtime::Error,
    limits: Limits,
    denied_memory: Option<usize>,
) -> PluginFailure {
    let detail = format!("{e:#}");
    if let Some(wanted) = denied_memory {
        return PluginFailure::new(
            FailureKind::MemoryCap,
            format!(
                "memory cap exceeded: the plugin asked for {} MiB of linear memory (all its memories together), the cap is {} MiB ({})",
                wanted >> 20,
                limits.memory_bytes >> 20,
                first_line(&detail)
            ),
        );
    }
    if detail.contains(HOSTCALL_FUEL_EXHAUSTED) {
        return PluginFailure::new(
            FailureKind::BadOutcome,
            format!(
                "bad output: the plugin handed the host more than {} MiB in one call, its memory cap \
                 (its outcomes repeat the same memory, or are too large)",
                limits.memory_bytes >> 20
            ),
        );
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => PluginFailure::new(
            FailureKind::Deadline,
            format!(
                "deadline exceeded: the call ran longer than {} ms",
                limits.deadline.as_millis()
            ),
        ),
        Some(wasmtime::Trap::StackOverflow) => PluginFailure::new(
            FailureKind::StackOverflow,
            format!(
                "stack overflow: the wasm stack cap is {} KiB",
                MAX_WASM_STACK / 1024
            ),
        ),
        Some(trap) => PluginFailure::new(FailureKind::Trap, format!("trap: {trap}")),
        None => PluginFailure::new(
            FailureKind::Trap,
            format!("plugin failed: {}", first_line(&detail)),
        ),
    }
}

/// How wasmtime words a call whose data copied out of the guest passed
/// `Store::set_hostcall_fuel` (its error type is private).
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Caps the linear memory of an instance, all its memories together (a component may
/// have many: each one under the cap would otherwise get a multiple of it), and
/// remembers its peak and any refusal.
struct Limiter {
    memory_cap: usize,
    /// The bytes of every linear memory of the store, together.
    memory_total: usize,
    peak_memory: usize,
    /// The total the last refused growth asked for, since the current call started.
    denied: Option<usize>,
}

impl Limiter {
    fn new(memory_cap: usize) -> Self {
        Self {
            memory_cap,
            memory_total: 0,
            peak_memory: 0,
            denied: None,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .memory_total
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.memory_cap {
            self.denied = Some(total);
            return Ok(false);
        }
        self.memory_total = total;
        self.peak_memory = self.peak_memory.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }
}

/// Most elements of one table.
const MAX_TABLE_ELEMENTS: usize = 100_000;

fn too_many_outputs(n: usize) -> Answer {
    Answer::Failed(PluginFailure::new(
        FailureKind::BadOutcome,
        format!("bad output: {n} outputs for one event; at most {MAX_OUTPUTS_PER_EVENT}"),
    ))
}

/// Checks what a 0.1.0 plugin returned for one event.
fn answer_v1(outcome: Outcome, original: &Event) -> Answer {
    let bad = |why| Answer::Failed(PluginFailure::new(FailureKind::BadOutcome, why));
    match outcome {
        Outcome::Keep(event) => match changes_v1(event, original) {
            Ok(changes) => Answer::Keep(changes),
            Err(why) => bad(why),
        },
        Outcome::Route(Routed { event, outputs }) => {
            if outputs.len() > MAX_OUTPUTS_PER_EVENT {
                return too_many_outputs(outputs.len());
            }
            let outputs = outputs.into_iter().map(output_from_wit).collect();
            match event.map(|e| changes_v1(e, original)).transpose() {
                Ok(changes) => Answer::Route(changes, outputs),
                Err(why) => bad(why),
            }
        }
        Outcome::Pass => Answer::Pass,
        Outcome::Drop(reason) => Answer::Drop(reason),
        Outcome::Reject(reason) => Answer::Reject(reason),
    }
}

/// What a 0.1.0 plugin changed in an event it returned whole, checked. The app and
/// event id are the host's: a changed value is ignored.
fn changes_v1(event: Event, original: &Event) -> Result<Changes, String> {
    let changed = |new: String, old: &String| (new != *old).then_some(new);
    check_changes(Changes {
        name: changed(event.name, &original.name),
        user_id: (event.user_id != original.user_id).then_some(event.user_id),
        timestamp_ms: (event.timestamp_ms != original.timestamp_ms).then_some(event.timestamp_ms),
        properties: changed(event.properties, &original.properties),
        context: changed(event.context, &original.context),
    })
}

/// Checks what a 0.2.0 plugin returned for one event.
fn answer_v2(outcome: v2::Outcome) -> Answer {
    let bad = |why| Answer::Failed(PluginFailure::new(FailureKind::BadOutcome, why));
    match outcome {
        v2::Outcome::Keep(changes) => match check_changes(changes_v2(changes)) {
            Ok(changes) => Answer::Keep(changes),
            Err(why) => bad(why),
        },
        v2::Outcome::Route(v2::Routed { changes, outputs }) => {
            if outputs.len() > MAX_OUTPUTS_PER_EVENT {
                return too_many_outputs(outputs.len());
            }
            let outputs = outputs.into_iter().map(output_from_v2).collect();
            match changes.map(|c| check_changes(changes_v2(c))).transpose() {
                Ok(changes) => Answer::Route(changes, outputs),
                Err(why) => bad(why),
            }
        }
        v2::Outcome::Pass => Answer::Pass,
        v2::Outcome::Drop(reason) => Answer::Drop(reason),
        v2::Outcome::Reject(reason) => Answer::Reject(reason),
    }
}

fn changes_v2(c: v2::Changes) -> Changes {
    Changes {
        name: c.name,
        user_id: c.user_id,
        timestamp_ms: c.timestamp_ms,
        properties: c.properties,
        context: c.context,
    }
}

/// Checks the fields a plugin changed: a new name follows the name rule, new
/// properties and context are JSON objects.
fn check_changes(changes: Changes) -> Result<Changes, String> {
    if let Some(name) = &changes.name
        && let Err(why) = crate::model::check_name(name)
    {
        return Err(format!("plugin renamed the event badly: {why}"));
    }
    for (field, text) in [
        ("properties", &changes.properties),
        ("context", &changes.context),
    ] {
        if text.as_deref().is_some_and(|t| !is_json_object(t)) {
            return Err(format!("plugin returned {field} that is not a JSON object"));
        }
    }
    Ok(changes)
}

/// The host's event as the WIT type (fields moved, not copied).
fn to_wit(e: model::Event) -> Event {
    Event {
        event_id: e.event_id,
        app: e.app,
        name: e.name,
        user_id: e.user_id,
        timestamp_ms: e.timestamp_ms,
        properties: e.properties,
        context: e.context,
    }
}

/// The WIT event as the host's (fields moved, not copied).
fn from_wit(e: Event) -> model::Event {
    model::Event {
        event_id: e.event_id,
        app: e.app,
        name: e.name,
        user_id: e.user_id,
        timestamp_ms: e.timestamp_ms,
        properties: e.properties,
        context: e.context,
    }
}

fn output_from_v2(o: v2::Output) -> PluginOutput {
    match o {
        v2::Output::Row(v2::Row { table, columns }) => PluginOutput::Row { table, columns },
        v2::Output::Count(v2::Count {
            counter,
            key,
            delta,
        }) => PluginOutput::Count {
            counter,
            key,
            delta,
        },
        v2::Output::Forward(name) => PluginOutput::Forward(name),
    }
}

fn output_from_wit(o: Output) -> PluginOutput {
    match o {
        Output::Row(Row { table, columns }) => PluginOutput::Row { table, columns },
        Output::Count(Count {
            counter,
            key,
            delta,
        }) => PluginOutput::Count {
            counter,
            key,
            delta,
        },
        Output::Forward(name) => PluginOutput::Forward(name),
    }
}

fn is_json_object(text: &str) -> bool {
    text.trim_start().starts_with('{')
        && serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok()
}

/// The state of one store: WASI (granting nothing), limits, and the host imports.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    plugin: String,
    version: String,
    config: String,
    counters: BTreeMap<String, u64>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::weir::plugin::types::Host for HostState {}
impl bindings_v2::weir::plugin::types::Host for HostState {}

impl bindings::weir::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.write_log(level, message);
    }

    fn config(&mut self) -> String {
        self.config.clone()
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        self.add_to_counter(name, delta);
    }
}

/// 0.2.0's host interface is 0.1.0's.
impl bindings_v2::weir::plugin::host::Host for HostState {
    fn log(&mut self, level: bindings_v2::weir::plugin::host::Level, message: String) {
        use bindings_v2::weir::plugin::host::Level as L;
        let level = match level {
            L::Trace => Level::Trace,
            L::Debug => Level::Debug,
            L::Info => Level::Info,
            L::Warn => Level::Warn,
            L::Error => Level::Error,
        };
        self.write_log(level, message);
    }

    fn config(&mut self) -> String {
        self.config.clone()
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        self.add_to_counter(name, delta);
    }
}

impl HostState {
    fn write_log(&mut self, level: Level, mut message: String) {
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let (plugin, version) = (&self.plugin, &self.version);
        match level {
            Level::Trace => trace!(%plugin, %version, "{message}"),
            Level::Debug => debug!(%plugin, %version, "{message}"),
            Level::Info => info!(%plugin, %version, "{message}"),
            Level::Warn => warn!(%plugin, %version, "{message}"),
            Level::Error => error!(%plugin, %version, "{message}"),
        }
    }

    fn add_to_counter(&mut self, name: String, delta: u64) {
        if name.len() > MAX_COUNTER_NAME {
            warn!(plugin = %self.plugin, bytes = name.len(), "plugin counter name longer than {MAX_COUNTER_NAME} bytes; ignored");
            return;
        }
        if !self.counters.contains_key(&name) && self.counters.len() >= MAX_COUNTERS {
            warn!(plugin = %self.plugin, counter = %name, "plugin exceeds {MAX_COUNTERS} counters; ignored");
            return;
        }
        let slot = self.counters.entry(name).or_insert(0);
        *slot = slot.saturating_add(delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_cap_holds_for_all_memories_together() {
        let mut l = Limiter::new(10 << 20);
        // Two memories of 4 MiB each: 8 MiB in all.
        assert!(l.memory_growing(0, 4 << 20, None).unwrap());
        assert!(l.memory_growing(0, 4 << 20, None).unwrap());
        // A third of 4 MiB would make 12: refused, though it is under the cap alone.
        assert!(!l.memory_growing(0, 4 << 20, None).unwrap());
        assert_eq!(l.denied, Some(12 << 20));
        // The first growing from 4 to 6 MiB: 10 in all, at the cap.
        assert!(l.memory_growing(4 << 20, 6 << 20, None).unwrap());
        assert_eq!((l.memory_total, l.peak_memory), (10 << 20, 10 << 20));
        assert!(!l.memory_growing(4 << 20, 5 << 20, None).unwrap());
    }

    #[test]
    fn an_event_routed_to_too_many_outputs_fails() {
        let outputs = (0..=MAX_OUTPUTS_PER_EVENT)
            .map(|i| v2::Output::Forward(format!("t{i}")))
            .collect();
        let answer = answer_v2(v2::Outcome::Route(v2::Routed {
            changes: None,
            outputs,
        }));
        let Answer::Failed(f) = answer else {
            panic!("not failed")
        };
        assert_eq!(f.kind, FailureKind::BadOutcome);
        assert!(
            f.message.contains("65 outputs for one event; at most 64"),
            "{}",
            f.message
        );
    }

    fn event(i: usize, app: &str, user: Option<&str>) -> model::Event {
        model::Event {
            event_id: format!("e{i}"),
            app: app.into(),
            name: "post_liked".into(),
            user_id: user.map(str::to_owned),
            timestamp_ms: i as i64,
            properties: format!(r#"{{"i":{i}}}"#),
            context: "{}".into(),
        }
    }

    fn text(batch: &v2::Batch, span: v2::Span) -> &str {
        let start = span.offset as usize;
        std::str::from_utf8(&batch.text[start..start + span.len as usize]).unwrap()
    }

    #[test]
    fn a_batch_encodes_every_string_as_a_span_and_an_app_once_per_run() {
        let events = [
            event(0, "a", Some("u0")),
            event(1, "a", None),
            event(2, "bé", Some("ü")),
        ];
        let mut batch = v2::Batch {
            text: b"left over".to_vec(),
            events: Vec::new(),
        };
        encode(&events, &mut batch).unwrap();
        assert_eq!(batch.events.len(), 3);
        for (e, s) in events.iter().zip(&batch.events) {
            assert_eq!(text(&batch, s.event_id), e.event_id);
            assert_eq!(text(&batch, s.app), e.app);
            assert_eq!(text(&batch, s.name), e.name);
            assert_eq!(s.user_id.map(|u| text(&batch, u)), e.user_id.as_deref());
            assert_eq!(s.timestamp_ms, e.timestamp_ms);
            assert_eq!(text(&batch, s.properties), e.properties);
            assert_eq!(text(&batch, s.context), e.context);
        }
        let (a0, a1) = (batch.events[0].app, batch.events[1].app);
        assert_eq!((a0.offset, a0.len), (a1.offset, a1.len));
        assert!(!batch.text.starts_with(b"left over"));
        let strings: usize = events
            .iter()
            .map(|e| {
                e.event_id.len()
                    + e.name.len()
                    + e.user_id.as_ref().map_or(0, String::len)
                    + e.properties.len()
                    + e.context.len()
            })
            .sum();
        assert_eq!(batch.text.len(), strings + "a".len() + "bé".len());
    }

    #[test]
    fn changes_are_checked_and_applied_field_by_field() {
        let keep = |c: v2::Changes| answer_v2(v2::Outcome::Keep(c));
        let none = v2::Changes {
            name: None,
            user_id: None,
            timestamp_ms: None,
            properties: None,
            context: None,
        };
        let mut e = event(1, "a", Some("u1"));
        let original = e.clone();
        let answer = keep(v2::Changes {
            user_id: Some(None),
            properties: Some(r#"{"i":1,"seen":true}"#.into()),
            ..none.clone()
        });
        assert!(matches!(answer.apply(&mut e), Verdict::Keep));
        assert_eq!(e.user_id, None);
        assert_eq!(e.properties, r#"{"i":1,"seen":true}"#);
        assert_eq!((&e.name, &e.context), (&original.name, &original.context));
        assert_eq!(e.timestamp_ms, original.timestamp_ms);

        for (changes, why) in [
            (
                v2::Changes {
                    name: Some("bad name".into()),
                    ..none.clone()
                },
                "renamed the event badly",
            ),
            (
                v2::Changes {
                    properties: Some("[1]".into()),
                    ..none.clone()
                },
                "properties that is not a JSON object",
            ),
            (
                v2::Changes {
                    context: Some("{".into()),
                    ..none.clone()
                },
                "context that is not a JSON object",
            ),
        ] {
            let mut e = original.clone();
            match keep(changes).apply(&mut e) {
                Verdict::Failed(f) => {
                    assert_eq!(f.kind, FailureKind::BadOutcome);
                    assert!(f.message.contains(why), "{f}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(e, original, "a refused change is not applied");
        }
    }

    #[test]
    fn a_whole_event_from_0_1_0_becomes_its_changes_and_keeps_the_host_ids() {
        let original = to_wit(event(1, "a", Some("u1")));
        let mut returned = original.clone();
        returned.app = "other".into();
        returned.event_id = "forged".into();
        returned.timestamp_ms = 99;
        let changes = changes_v1(returned, &original).unwrap();
        assert_eq!(changes.timestamp_ms, Some(99));
        assert!(changes.name.is_none() && changes.user_id.is_none());
        assert!(changes.properties.is_none() && changes.context.is_none());
        let mut e = from_wit(original);
        changes.apply(&mut e);
        assert_eq!((e.app.as_str(), e.event_id.as_str()), ("a", "e1"));
        assert_eq!(e.timestamp_ms, 99);
    }
}
