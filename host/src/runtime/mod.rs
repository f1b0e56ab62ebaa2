//! The WebAssembly runtime: the one wasmtime [`Engine`], the one `bindgen!`, and the
//! sandbox every plugin call runs in.
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

mod bindings {
    wasmtime::component::bindgen!({
        world: "plugin",
        path: "../wit",
        // Calls are async so that a plugin blocked inside a host call (a WASI sleep or
        // poll) can be abandoned at its deadline; CPU-bound code is stopped by epochs.
        exports: { default: async },
    });
}

use bindings::weir::plugin::host::Level;
use bindings::weir::plugin::types::{Count, Event, Outcome, Output, Routed, Row};

use crate::model::{self, FailureKind, Limits, PluginFailure, PluginOutput};

/// How often the epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Wasm stack cap of every instance.
pub const MAX_WASM_STACK: usize = 512 * 1024;
/// Most distinct counters one instance may create.
const MAX_COUNTERS: usize = 256;
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

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(setup)?;
        bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(setup)?;

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
        info!(plugin = %name, version = %plugin.version(), size = compiled.size, "plugin loaded");
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

    fn check_world(
        &self,
        name: &str,
        component: Component,
    ) -> Result<bindings::PluginPre<HostState>, RuntimeError> {
        let invalid = |reason: String| RuntimeError::Invalid {
            name: name.to_owned(),
            reason,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))?;
        bindings::PluginPre::new(pre)
            .map_err(|e| invalid(format!("not a component of the weir:plugin world: {e:#}")))
    }
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
    pre: bindings::PluginPre<HostState>,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Content address of the component: the first 12 hex digits of its sha256.
    pub fn version(&self) -> &str {
        &self.inner.version
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
            limiter: Limiter {
                memory_cap: p.limits.memory_bytes,
                peak_memory: 0,
                denied: None,
            },
            plugin: p.name.clone(),
            version: p.version.clone(),
            config: p.config.clone(),
            counters: BTreeMap::new(),
        };
        let mut store = Store::new(&p.engine, state);
        store.limiter(|s| &mut s.limiter);
        // A generous deadline for start-up code; calls set their own.
        store.set_epoch_deadline(ticks(p.limits.deadline).max(200));
        store.epoch_deadline_trap();
        let bindings =
            p.pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| RuntimeError::Instantiate {
                    name: p.name.clone(),
                    reason: format!("{e:#}"),
                })?;
        Ok(PluginInstance {
            plugin: self.clone(),
            store,
            bindings,
        })
    }
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() as u64)
        .div_ceil(EPOCH_TICK.as_micros() as u64)
        .max(1)
}

/// What became of one event in one plugin.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Kept unchanged: the caller still holds the event.
    Pass,
    /// Kept, changed by the plugin.
    Keep(model::Event),
    /// Kept (changed when `Some`) and fanned out to tables and counters.
    Route(Option<model::Event>, Vec<PluginOutput>),
    Drop(String),
    Reject(String),
    /// The plugin failed on this event: a trap (deadline, memory, stack, panic) or an
    /// invalid result. The message names the limit or the problem.
    Failed(PluginFailure),
}

/// One live instance. Not shared between threads; the processor owns one per plugin.
pub struct PluginInstance {
    plugin: Plugin,
    store: Store<HostState>,
    bindings: bindings::Plugin,
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

    /// Runs a batch. Returns one verdict per event; `events` is handed back as it
    /// was (its events cross the sandbox boundary by move, not by copy). Never fails
    /// as a whole: when a call traps, the instance is replaced and the batch bisected
    /// on fresh instances, so only the events that cause the trap fail.
    pub async fn process(&mut self, events: &mut Vec<model::Event>) -> Vec<Verdict> {
        let wit: Vec<Event> = events.drain(..).map(to_wit).collect();
        let verdicts = self.process_wit(&wit).await;
        events.extend(wit.into_iter().map(from_wit));
        verdicts
    }

    async fn process_wit(&mut self, events: &[Event]) -> Vec<Verdict> {
        let mut out: Vec<Option<Verdict>> = vec![None; events.len()];
        // Ranges still to run; popped from the end, so pushed right half first.
        let mut work = vec![(0, events.len())];
        while let Some((start, end)) = work.pop() {
            if start == end {
                continue;
            }
            let slice = &events[start..end];
            match self.call(slice).await {
                Ok(outcomes) => {
                    for (i, (outcome, original)) in outcomes.into_iter().zip(slice).enumerate() {
                        out[start + i] = Some(check_outcome(outcome, original));
                    }
                }
                Err(CallFailure::Mismatch(reason)) => {
                    out[start..end].fill(Some(Verdict::Failed(reason)));
                }
                Err(CallFailure::Trap(reason)) => {
                    warn!(
                        plugin = %self.plugin.name(),
                        version = %self.plugin.version(),
                        events = slice.len(),
                        kind = reason.kind.as_str(),
                        reason = %reason,
                        "plugin failed; isolating the offending events"
                    );
                    if !self.replace().await || slice.len() == 1 {
                        out[start..end].fill(Some(Verdict::Failed(reason)));
                    } else {
                        let mid = start + slice.len() / 2;
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

    async fn call(&mut self, events: &[Event]) -> Result<Vec<Outcome>, CallFailure> {
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
        let call = self.bindings.call_process(&mut self.store, events);
        let result = match tokio::time::timeout(limits.deadline + HOST_CALL_GRACE, call).await {
            Ok(result) => result,
            Err(_) => {
                return Err(CallFailure::Trap(PluginFailure::new(
                    FailureKind::Deadline,
                    format!(
                        "deadline exceeded: the call waited in a host call for longer than {} ms",
                        limits.deadline.as_millis()
                    ),
                )));
            }
        };
        match result {
            Ok(outcomes) if outcomes.len() == events.len() => Ok(outcomes),
            Ok(outcomes) => Err(CallFailure::Mismatch(PluginFailure::new(
                FailureKind::BadOutcome,
                format!(
                    "plugin returned {} outcomes for {} events",
                    outcomes.len(),
                    events.len()
                ),
            ))),
            Err(e) => Err(CallFailure::Trap(describe_trap(
                &e,
                limits,
                self.store.data().limiter.denied,
            ))),
        }
    }
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
                "memory cap exceeded: the plugin asked for {} MiB of linear memory, the cap is {} MiB ({})",
                wanted >> 20,
                limits.memory_bytes >> 20,
                first_line(&detail)
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

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Caps each linear memory of an instance and remembers its peak and any refusal.
struct Limiter {
    memory_cap: usize,
    peak_memory: usize,
    /// The size of the last refused growth, since the current call started.
    denied: Option<usize>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.denied = Some(desired);
            return Ok(false);
        }
        self.peak_memory = self.peak_memory.max(desired);
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

/// Checks what a plugin returned for one event.
fn check_outcome(outcome: Outcome, original: &Event) -> Verdict {
    let bad = |why| Verdict::Failed(PluginFailure::new(FailureKind::BadOutcome, why));
    match outcome {
        Outcome::Keep(event) => match check_event(event, original) {
            Ok(event) => Verdict::Keep(from_wit(event)),
            Err(why) => bad(why),
        },
        Outcome::Route(Routed { event, outputs }) => {
            let outputs = outputs.into_iter().map(output_from_wit).collect();
            match event {
                None => Verdict::Route(None, outputs),
                Some(event) => match check_event(event, original) {
                    Ok(event) => Verdict::Route(Some(from_wit(event)), outputs),
                    Err(why) => bad(why),
                },
            }
        }
        Outcome::Pass => Verdict::Pass,
        Outcome::Drop(reason) => Verdict::Drop(reason),
        Outcome::Reject(reason) => Verdict::Reject(reason),
    }
}

/// Checks an event a plugin returned changed; restores the fields it may not change.
fn check_event(mut event: Event, original: &Event) -> Result<Event, String> {
    if event.name != original.name
        && let Err(why) = crate::model::check_name(&event.name)
    {
        return Err(format!("plugin renamed the event badly: {why}"));
    }
    let changed_not_object =
        |text: &String, original: &String| text != original && !is_json_object(text);
    for (field, bad) in [
        (
            "properties",
            changed_not_object(&event.properties, &original.properties),
        ),
        (
            "context",
            changed_not_object(&event.context, &original.context),
        ),
    ] {
        if bad {
            return Err(format!("plugin returned {field} that is not a JSON object"));
        }
    }
    // The app and event id are the host's: a plugin cannot reassign them.
    event.app.clone_from(&original.app);
    event.event_id.clone_from(&original.event_id);
    Ok(event)
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

impl bindings::weir::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, mut message: String) {
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

    fn config(&mut self) -> String {
        self.config.clone()
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        if !self.counters.contains_key(&name) && self.counters.len() >= MAX_COUNTERS {
            warn!(plugin = %self.plugin, counter = %name, "plugin exceeds {MAX_COUNTERS} counters; ignored");
            return;
        }
        let slot = self.counters.entry(name).or_insert(0);
        *slot = slot.saturating_add(delta);
    }
}
