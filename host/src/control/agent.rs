//! The control agent of one instance: follows the control plane and hands the
//! processor each new pipeline, prepared off the hot path.
//!
//! It learns of a new version from a change notice (Redis pub/sub) or from its
//! periodic reconciliation (re-reading the version every `control.reconcile_ms`), so
//! an instance that missed a notice, or started after the change, converges. For the
//! pipeline named in its configuration it then builds the new [`Pipeline`] (fetches
//! and compiles the plugin versions, instantiates them, compiles the schemas) and
//! sends it to the processor, which swaps it in between two batches. If preparing
//! fails, the processor keeps the version it runs and the status says why.
//!
//! Which pipeline runs: the active version of the configured pipeline name in the
//! control plane, or, while the control plane has none of that name, the pipeline of
//! the configuration file (version 0). Sinks always come from the configuration file.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::store::{Store, StoreError};
use super::{InstanceStatus, PipelineVersion, State};
use crate::config::{ControlConfig, PipelineConfig};
use crate::metrics::events::{InternalEvent, PipelinePrepared, SwapRefused};
use crate::pipeline::route::{RouteError, Routes};
use crate::pipeline::schema::{SchemaError, Schemas};
use crate::pipeline::worker::{Running, Swap};
use crate::pipeline::{Pipeline, PipelineError, Shape, Stage, Tag};
use crate::runtime::{Compiled, Runtime, RuntimeError};
use crate::sinks::clickhouse::{ClickHouseError, ClickHouseSink, Table, same_tables};

/// What decides the pipeline an instance runs: equal keys, same pipeline.
#[derive(Debug, Clone, PartialEq)]
struct Key {
    pipeline: Option<PipelineVersion>,
    /// Schema versions in force, when the pipeline validates.
    schemas: Vec<(String, u32)>,
}

/// Builds pipelines from the control plane.
pub struct Preparer {
    store: Store,
    runtime: Runtime,
    file: PipelineConfig,
    /// The configuration file's tables and counters.
    routes: Arc<Routes>,
    /// The tables of the pipeline last prepared (they exist).
    prepared_tables: Option<Arc<[Table]>>,
    /// To create the tables of a new version before it is swapped in.
    sink: Option<ClickHouseSink>,
    /// Events per plugin call and lanes of the pipelines it builds.
    shape: Shape,
    /// Compiled components by sha256: each version is compiled once, when it is
    /// uploaded (see [`Preparer::warm`]), so a switch to it or a rollback does not wait
    /// for the compiler.
    compiled: HashMap<String, Compiled>,
    /// The components the pipeline in force uses (never evicted).
    used: std::collections::HashSet<String>,
}

/// Most compiled components kept (beyond those in use).
const MAX_COMPILED: usize = 32;

impl Preparer {
    pub fn new(
        store: Store,
        runtime: Runtime,
        file: PipelineConfig,
        routes: Arc<Routes>,
        shape: Shape,
    ) -> Self {
        Self {
            store,
            runtime,
            file,
            routes,
            shape,
            prepared_tables: None,
            sink: None,
            compiled: HashMap::new(),
            used: std::collections::HashSet::new(),
        }
    }

    /// The compiled component of a plugin version, compiling it if needed.
    async fn compiled(
        &mut self,
        plugin: &str,
        version: u32,
        sha256: &str,
    ) -> Result<Compiled, PrepareError> {
        if let Some(c) = self.compiled.get(sha256) {
            return Ok(c.clone());
        }
        let bytes = self
            .store
            .blob(sha256)
            .await
            .map_err(|source| PrepareError::Store {
                plugin: plugin.to_owned(),
                version,
                source,
            })?
            .ok_or_else(|| PrepareError::MissingComponent {
                plugin: plugin.to_owned(),
                version,
                sha256: sha256.to_owned(),
            })?;
        let started = Instant::now();
        let compiled = self.runtime.compile(plugin, &bytes).await?;
        info!(
            plugin,
            version,
            compile_ms = started.elapsed().as_millis() as u64,
            "plugin version compiled"
        );
        if self.compiled.len() >= MAX_COMPILED {
            // Keep what runs; the others are compiled again if needed.
            let used = &self.used;
            self.compiled.retain(|sha, _| used.contains(sha));
        }
        self.compiled.insert(sha256.to_owned(), compiled.clone());
        Ok(compiled)
    }

    /// Compiles the latest version of every plugin ahead of use, so that the pipeline
    /// change that follows an upload swaps without waiting for the compiler. A version
    /// that does not compile here is reported when a pipeline needs it.
    async fn warm(&mut self, state: &State) {
        for (name, versions) in &state.plugins {
            if let Some(v) = versions.last()
                && !self.compiled.contains_key(&v.sha256)
                && let Err(e) = self.compiled(name, v.version, &v.sha256).await
            {
                warn!(plugin = %name, version = v.version, error = %e, "cannot compile a new plugin version ahead of use");
            }
        }
    }

    fn key(&self, state: &State) -> Key {
        let pipeline = state
            .pipelines
            .get(&self.file.name)
            .and_then(|r| r.active())
            .cloned();
        let validates = pipeline.as_ref().is_some_and(|p| p.doc.schemas);
        let schemas = if validates {
            state
                .schemas
                .iter()
                .filter_map(|(e, vs)| vs.last().map(|v| (e.clone(), v.version)))
                .collect()
        } else {
            Vec::new()
        };
        Key { pipeline, schemas }
    }

    /// Builds the pipeline `state` asks this instance to run.
    async fn prepare(&mut self, state: &State, key: &Key) -> Result<Pipeline, PrepareError> {
        let tag = |pipeline_version| Tag {
            control_version: state.version,
            pipeline_version,
        };
        let Some(pv) = &key.pipeline else {
            let p = Pipeline::load(&self.runtime, &self.file, self.shape).await?;
            return Ok(p.with_tag(tag(0)));
        };
        let name = self.file.name.clone();
        let routes = if pv.doc.tables.is_none() && pv.doc.counters.is_none() {
            self.routes.clone()
        } else {
            Arc::new(Routes::new(&pv.doc.routes_config(&self.file))?)
        };
        let tables_ready = self
            .prepared_tables
            .as_ref()
            .is_none_or(|t| same_tables(t, &routes.tables));
        if let (false, Some(sink)) = (tables_ready, &self.sink) {
            sink.with_tables(routes.tables.clone())
                .ensure_schema()
                .await
                .map_err(PrepareError::Tables)?;
        }
        let mut chain = Vec::new();
        let mut used = std::collections::HashSet::new();
        for entry in &pv.doc.plugins {
            let (plugin, version) = entry.reference().map_err(PrepareError::Reference)?;
            let meta = state
                .plugins
                .get(plugin)
                .and_then(|vs| vs.iter().find(|v| v.version == version))
                .ok_or_else(|| PrepareError::UnknownPlugin {
                    plugin: plugin.to_owned(),
                    version,
                })?;
            let compiled = self.compiled(plugin, version, &meta.sha256).await?;
            used.insert(meta.sha256.clone());
            let config = serde_json::Value::Object(entry.config.clone()).to_string();
            let plugin = self
                .runtime
                .load_compiled(
                    plugin,
                    &version.to_string(),
                    &compiled,
                    config,
                    entry.limits(),
                )
                .await?;
            let instance = plugin.instantiate().await?;
            chain.push(Stage::with_policy(
                instance,
                entry.failure_policy,
                entry.quarantine_after,
                Duration::from_secs(entry.quarantine_secs),
            ));
        }
        self.used = used;
        let mut schemas = if pv.doc.schemas {
            Schemas::load(&self.file.schemas)?
        } else {
            Schemas::default()
        };
        for (event, version) in &key.schemas {
            let sv = state.schemas[event]
                .iter()
                .find(|v| v.version == *version)
                .expect("key from this state");
            schemas.put(event, &sv.schema, sv.version)?;
        }
        Ok(Pipeline::new(name, chain, routes, self.shape.batch_size)
            .with_schemas(schemas)
            .with_events(&pv.doc.events)
            .with_tag(tag(pv.version))
            .with_lanes(self.shape.lanes)
            .await?)
    }
}

/// Why this instance cannot build the pipeline a control-plane version asks for (it
/// keeps running the previous one, and reports the error in its status).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("cannot prepare its ClickHouse tables: {0}")]
    Tables(#[source] ClickHouseError),
    #[error("{0}")]
    Reference(String),
    #[error("plugin {plugin}@{version} is not in the control plane")]
    UnknownPlugin { plugin: String, version: u32 },
    #[error("cannot read the component of {plugin}@{version} from the store: {source}")]
    Store {
        plugin: String,
        version: u32,
        source: StoreError,
    },
    #[error("the component of {plugin}@{version} (sha256 {sha256}) is missing from the store")]
    MissingComponent {
        plugin: String,
        version: u32,
        sha256: String,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The agent's loop.
pub struct Agent {
    store: Store,
    cfg: ControlConfig,
    preparer: Preparer,
    /// To the processor (absent when this instance runs no processor).
    swaps: Option<mpsc::Sender<Swap>>,
    /// What the processor runs.
    running: watch::Receiver<Running>,
    status: InstanceStatus,
    /// The control-plane version last read, and the pipeline key in force.
    seen: u64,
    applied: Option<Key>,
    /// A pipeline that failed to prepare: retried on the next change, or after a while.
    failed: Option<(Key, Instant)>,
}

/// How long before a pipeline that failed to prepare is tried again (without a change).
const RETRY_FAILED: Duration = Duration::from_secs(30);

impl Agent {
    /// Reads the control plane and, for an instance with a processor (`processor`),
    /// prepares the pipeline to start with. Fails when the control plane's pipeline
    /// cannot be prepared (weir does not start on another version than the fleet's).
    pub async fn start(
        store: Store,
        cfg: ControlConfig,
        mut preparer: Preparer,
        id: String,
        processor: bool,
    ) -> anyhow::Result<(Self, Option<Pipeline>)> {
        let state = store.state().await.map_err(|e| {
            anyhow::anyhow!("cannot read the control plane ({}): {e}", store.describe())
        })?;
        let key = preparer.key(&state);
        let pipeline = if processor {
            Some(preparer.prepare(&state, &key).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot prepare pipeline {} at control-plane version {}: {e}",
                    preparer.file.name,
                    state.version
                )
            })?)
        } else {
            None
        };
        let now = crate::model::now_ms();
        let (_, running) = watch::channel(pipeline.as_ref().map(Running::of).unwrap_or_default());
        let agent = Self {
            status: InstanceStatus {
                id,
                started_at_ms: now,
                control_version: state.version,
                pipeline: preparer.file.name.clone(),
                ..Default::default()
            },
            store,
            cfg,
            preparer,
            swaps: None,
            running,
            seen: state.version,
            applied: Some(key),
            failed: None,
        };
        crate::metrics::CONTROL_VERSION.set(state.version as i64);
        Ok((agent, pipeline))
    }

    /// Connects the agent to the processor, whose sink creates the tables of new
    /// versions.
    pub fn with_processor(
        mut self,
        swaps: mpsc::Sender<Swap>,
        running: watch::Receiver<Running>,
        sink: ClickHouseSink,
    ) -> Self {
        self.preparer.prepared_tables = Some(sink.tables().clone());
        self.preparer.sink = Some(sink);
        self.swaps = Some(swaps);
        self.running = running;
        self
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut notices = Some(self.store.notices());
        let mut reconcile = tokio::time::interval(Duration::from_millis(self.cfg.reconcile_ms));
        let mut heartbeat = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                notice = recv(&mut notices) => match notice {
                    Some(v) if v != self.seen => self.reconcile().await,
                    Some(_) => {}
                    None => notices = None,
                },
                _ = reconcile.tick() => {
                    match self.store.version().await {
                        Ok(v) if v != self.seen => self.reconcile().await,
                        Ok(_) => {
                            if self.failed.as_ref().is_some_and(|(_, at)| at.elapsed() >= RETRY_FAILED) {
                                self.reconcile().await;
                            }
                        }
                        Err(e) => warn!(error = %e, "cannot read the control-plane version"),
                    }
                }
                // Only an instance with a processor has one to watch (without, the
                // channel's sender is gone from the start).
                changed = self.running.changed(), if self.swaps.is_some() => {
                    if changed.is_err() {
                        // The processor stopped.
                        break;
                    }
                    self.beat().await;
                }
                _ = heartbeat.tick() => self.beat().await,
            }
        }
        if let Err(e) = self.store.forget_instance(&self.status.id).await {
            warn!(error = %e, "cannot remove this instance from the control plane's status");
        }
    }

    /// Reads the latest state and, if this instance's pipeline changed, prepares it.
    async fn reconcile(&mut self) {
        let state = match self.store.state().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot read the control plane");
                return;
            }
        };
        if state.version < self.seen {
            warn!(
                seen = self.seen,
                found = state.version,
                "the control plane went back in version (was its store reset?); following it"
            );
        }
        self.seen = state.version;
        if self.swaps.is_none() {
            // No processor: nothing to prepare, only the version to report.
            self.send(Swap {
                pipeline: None,
                control_version: state.version,
            })
            .await;
            return;
        }
        let key = self.preparer.key(&state);
        if self.applied.as_ref() == Some(&key) {
            // Nothing to prepare (or back to what runs, after a version that failed).
            self.failed = None;
            self.status.error = None;
            self.send(Swap {
                pipeline: None,
                control_version: state.version,
            })
            .await;
            self.preparer.warm(&state).await;
            return;
        }
        let started = Instant::now();
        match self.preparer.prepare(&state, &key).await {
            Ok(pipeline) => {
                PipelinePrepared {
                    control_version: state.version,
                    pipeline: pipeline.name(),
                    pipeline_version: pipeline.tag().pipeline_version,
                    plugins: pipeline.versions(),
                    prepare_time: started.elapsed(),
                }
                .emit();
                self.preparer.prepared_tables = Some(pipeline.routes().tables.clone());
                self.applied = Some(key);
                self.failed = None;
                self.status.error = None;
                self.send(Swap {
                    pipeline: Some(pipeline),
                    control_version: state.version,
                })
                .await;
                self.preparer.warm(&state).await;
            }
            Err(e) => {
                let error = format!(
                    "control-plane version {}: cannot prepare pipeline {}: {e}; still running the previous version",
                    state.version, self.preparer.file.name
                );
                SwapRefused { error: &error }.emit();
                self.status.error = Some(error);
                self.failed = Some((key, Instant::now()));
                self.beat().await;
            }
        }
    }

    async fn send(&mut self, swap: Swap) {
        match &self.swaps {
            Some(tx) => {
                if tx.send(swap).await.is_err() {
                    self.swaps = None;
                }
            }
            None => {
                // No processor: the version seen is the version applied.
                crate::metrics::CONTROL_VERSION.set(swap.control_version as i64);
                self.status.control_version = swap.control_version;
                self.beat().await;
            }
        }
    }

    async fn beat(&mut self) {
        let running = self.running.borrow_and_update().clone();
        let s = &mut self.status;
        if self.swaps.is_some() {
            s.control_version = running.tag.control_version;
            s.pipeline_version = running.tag.pipeline_version;
            s.plugins = running.plugins;
            s.schemas = running.schemas;
            s.consumer_lag = Some(consumer_lag());
        }
        s.updated_at_ms = crate::model::now_ms();
        if let Err(e) = self.store.heartbeat(s).await {
            warn!(error = %e, "cannot report this instance's status to the control plane");
        }
    }
}

async fn recv(rx: &mut Option<mpsc::Receiver<u64>>) -> Option<u64> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The sum of `weir_consumer_lag_records` over this instance's partitions.
fn consumer_lag() -> i64 {
    use prometheus::core::Collector as _;
    crate::metrics::CONSUMER_LAG
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_gauge().get_value() as i64)
        .sum()
}
