//! The control plane: plugins, schemas and pipelines uploaded while weir runs, and
//! how every instance follows them.
//!
//! - [`store`]: where the control plane is kept (a directory, or Redis for a fleet);
//! - this module: the state document and the changes the admin API makes to it, each
//!   validated before anything is stored, so a refused change leaves no trace;
//! - [`admin`]: the admin HTTP API;
//! - [`agent`]: the per-instance loop that notices a new version, prepares the new
//!   pipeline off the hot path and hands it to the processor, which swaps it in
//!   between two batches.
//!
//! Plugin components are immutable and content-addressed (sha256); each upload of new
//! bytes under a name gets the next version number of that name. Schemas and
//! pipelines are versioned documents. Every change bumps the one control-plane
//! version, which rows written to ClickHouse record (`control_version`).

pub mod admin;
pub mod agent;
pub mod client;
pub mod dead_letters;
pub mod dry_run;
pub mod store;

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{
    CounterConfig, FailurePolicy, PipelineConfig, TableConfig, default_deadline_ms,
    default_memory_mib, default_quarantine_after, default_quarantine_secs,
};
use crate::runtime::Runtime;
use store::{Store, StoreError};

/// The whole control plane at one version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Bumped by every change; 0 before the first.
    pub version: u64,
    #[serde(default)]
    pub changed_at_ms: i64,
    /// What the last change did, for humans.
    #[serde(default)]
    pub change: String,
    /// Plugin versions by plugin name, oldest first.
    #[serde(default)]
    pub plugins: BTreeMap<String, Vec<PluginVersion>>,
    /// Schema versions by event name, oldest first; the last one is in force.
    #[serde(default)]
    pub schemas: BTreeMap<String, Vec<SchemaVersion>>,
    #[serde(default)]
    pub pipelines: BTreeMap<String, PipelineRecord>,
}

/// One uploaded plugin version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginVersion {
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub size: u64,
    pub uploaded_at_ms: i64,
    /// Import families (`wasi:filesystem`, `wasi:sockets`) the uploader accepted as
    /// linked but granting nothing.
    #[serde(default)]
    pub stubbed_imports: Vec<String>,
}

/// One schema version of an event name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub event: String,
    pub version: u32,
    pub created_at_ms: i64,
    pub schema: Value,
}

/// A pipeline's versions and which one is active.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub versions: Vec<PipelineVersion>,
    /// The version instances run.
    pub active: u32,
    /// Versions activated over time (the last is `active`); a rollback steps back.
    pub history: Vec<u32>,
}

impl PipelineRecord {
    pub fn get(&self, version: u32) -> Option<&PipelineVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    pub fn active(&self) -> Option<&PipelineVersion> {
        self.get(self.active)
    }
}

/// One version of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineVersion {
    pub version: u32,
    pub created_at_ms: i64,
    pub doc: PipelineDoc,
}

/// What a pipeline does, as uploaded with `PUT /admin/v1/pipelines/{name}`. The
/// sinks it routes to (tables, counters, webhooks, topics) are those of the
/// instance's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDoc {
    /// Event names that go through the schemas and plugins; others are written to
    /// `events` untouched. Empty: every event.
    #[serde(default)]
    pub events: Vec<String>,
    /// Validate events against the schema in force for their name (default true).
    #[serde(default = "yes")]
    pub schemas: bool,
    /// The plugin chain, in order.
    #[serde(default)]
    pub plugins: Vec<ChainEntry>,
    /// Typed tables plugins route rows to, as `[[pipeline.table]]` declares them
    /// (weir creates them before the swap). Absent: the configuration file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<TableConfig>>,
    /// Counters plugins increment, as `[[pipeline.counter]]`. Absent: the
    /// configuration file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Vec<CounterConfig>>,
}

impl PipelineDoc {
    /// The configuration file's pipeline with this document's tables and counters
    /// (where it has them): what its routes are built from.
    pub fn routes_config(&self, file: &PipelineConfig) -> PipelineConfig {
        let mut cfg = file.clone();
        if let Some(t) = &self.tables {
            cfg.tables = t.clone();
        }
        if let Some(c) = &self.counters {
            cfg.counters = c.clone();
        }
        cfg
    }
}

fn yes() -> bool {
    true
}

/// One plugin of a pipeline's chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainEntry {
    /// `name@version`, e.g. `enrich@2`.
    pub plugin: String,
    /// The plugin's own configuration (a JSON object).
    #[serde(default)]
    pub config: serde_json::Map<String, Value>,
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: u32,
    #[serde(default = "default_quarantine_secs")]
    pub quarantine_secs: u64,
}

impl ChainEntry {
    /// `(name, version)` of `name@version`.
    pub fn reference(&self) -> Result<(&str, u32), String> {
        let (name, version) = self.plugin.rsplit_once('@').ok_or_else(|| {
            format!(
                "plugin {:?} must be name@version, e.g. enrich@1",
                self.plugin
            )
        })?;
        let version = version.parse::<u32>().map_err(|_| {
            format!(
                "plugin {:?}: the version must be a number, e.g. {name}@1",
                self.plugin
            )
        })?;
        Ok((name, version))
    }

    pub fn limits(&self) -> crate::model::Limits {
        crate::model::Limits {
            deadline: std::time::Duration::from_millis(self.deadline_ms),
            memory_bytes: self.memory_mib << 20,
        }
    }
}

/// What an instance reports about itself (`GET /admin/v1/status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    /// The control-plane version the instance has applied.
    pub control_version: u64,
    pub pipeline: String,
    /// The pipeline version it runs (0: the one of its configuration file).
    pub pipeline_version: u32,
    /// `name@version` of each plugin it runs, in chain order.
    pub plugins: Vec<String>,
    /// `event@version` of each schema in force.
    pub schemas: Vec<String>,
    /// Records behind the end of its partitions, summed (absent without a processor).
    #[serde(default)]
    pub consumer_lag: Option<i64>,
    /// Why the last control-plane version could not be applied (it runs the previous).
    #[serde(default)]
    pub error: Option<String>,
}

/// Why an admin request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is wrong; nothing changed.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the control plane changed concurrently too many times; try again")]
    Contended,
}

fn invalid(msg: impl Into<String>) -> AdminError {
    AdminError::Invalid(msg.into())
}

/// Import families the sandbox links but grants nothing to: a component importing
/// them is accepted only when its uploader says so.
pub const STUBBABLE_IMPORTS: [&str; 2] = ["wasi:filesystem", "wasi:sockets"];
/// Import families every plugin may use.
const GRANTED_IMPORTS: [&str; 5] = [
    "weir:plugin",
    "wasi:io",
    "wasi:clocks",
    "wasi:random",
    "wasi:cli",
];

/// The family of an import name: `wasi:filesystem/types@0.2.0` -> `wasi:filesystem`.
fn import_family(import: &str) -> &str {
    import.split(['/', '@']).next().unwrap_or(import)
}

/// Plugin, schema and pipeline names: `[A-Za-z0-9_-]{1,64}` (plugins and pipelines) or
/// an event name (schemas).
fn check_name(what: &str, name: &str) -> Result<(), AdminError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} name {name:?} must be 1-64 of [A-Za-z0-9_-]"
        )))
    }
}

/// Makes validated changes to the control plane.
#[derive(Clone)]
pub struct Control {
    store: Store,
    runtime: Runtime,
    max_plugin_bytes: usize,
}

impl Control {
    pub fn new(store: Store, runtime: Runtime, max_plugin_bytes: usize) -> Self {
        Self {
            store,
            runtime,
            max_plugin_bytes,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Applies `change` to the latest state and stores the result as the next version,
    /// retrying if another change landed first. `change` returns the description of
    /// what it did, or `None` when there is nothing to change (nothing is stored).
    async fn update<T>(
        &self,
        mut change: impl FnMut(&mut State) -> Result<(Option<String>, T), AdminError>,
    ) -> Result<(T, u64), AdminError> {
        for _ in 0..20 {
            let mut state = self.store.state().await?;
            let expected = state.version;
            let (what, out) = change(&mut state)?;
            let Some(what) = what else {
                return Ok((out, expected));
            };
            state.version = expected + 1;
            state.changed_at_ms = crate::model::now_ms();
            state.change = what.clone();
            if self.store.commit(expected, &state).await? {
                tracing::info!(version = state.version, change = %what, "control plane changed");
                crate::metrics::CONTROL_CHANGES.inc();
                return Ok((out, state.version));
            }
        }
        Err(AdminError::Contended)
    }

    /// Validates and stores a plugin component. The same bytes under the same name
    /// return the existing version (nothing changes). `allow` lists import families of
    /// [`STUBBABLE_IMPORTS`] the uploader accepts as granting nothing.
    pub async fn push_plugin(
        &self,
        name: &str,
        bytes: &[u8],
        allow: &[String],
    ) -> Result<(PluginVersion, bool), AdminError> {
        check_name("plugin", name)?;
        if bytes.len() > self.max_plugin_bytes {
            return Err(AdminError::TooLarge(format!(
                "plugin {name}: {} bytes is over the limit of {} (admin.max_plugin_bytes)",
                bytes.len(),
                self.max_plugin_bytes
            )));
        }
        if let Some(bad) = allow
            .iter()
            .find(|a| !STUBBABLE_IMPORTS.contains(&a.as_str()))
        {
            return Err(invalid(format!(
                "allow={bad:?}: only {} can be allowed (as granting nothing)",
                STUBBABLE_IMPORTS.join(" and ")
            )));
        }
        let inspection = self
            .runtime
            .inspect(name, bytes)
            .await
            .map_err(|e| invalid(e.to_string()))?;
        let mut stubbed = Vec::new();
        for import in &inspection.imports {
            let family = import_family(import);
            if GRANTED_IMPORTS.contains(&family) {
                continue;
            }
            if STUBBABLE_IMPORTS.contains(&family) {
                if allow.iter().any(|a| a == family) {
                    if !stubbed.iter().any(|s| s == family) {
                        stubbed.push(family.to_owned());
                    }
                    continue;
                }
                return Err(invalid(format!(
                    "plugin {name} imports {import}, which the sandbox does not grant (plugins get no \
                     filesystem and no network). Remove the import, or upload with allow={family} to \
                     accept it linked to a stub that grants nothing"
                )));
            }
            return Err(invalid(format!(
                "plugin {name} imports {import}, which the sandbox does not provide"
            )));
        }
        inspection.world.map_err(|e| invalid(e.to_string()))?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        self.store.put_blob(&sha256, bytes).await?;
        let size = bytes.len() as u64;
        let ((pv, created), _) = self
            .update(|state| {
                let versions = state.plugins.entry(name.to_owned()).or_default();
                if let Some(v) = versions.iter().find(|v| v.sha256 == sha256) {
                    return Ok((None, (v.clone(), false)));
                }
                let pv = PluginVersion {
                    name: name.to_owned(),
                    version: versions.last().map_or(1, |v| v.version + 1),
                    sha256: sha256.clone(),
                    size,
                    uploaded_at_ms: crate::model::now_ms(),
                    stubbed_imports: stubbed.clone(),
                };
                versions.push(pv.clone());
                Ok((
                    Some(format!("plugin {name}@{} uploaded", pv.version)),
                    (pv, true),
                ))
            })
            .await?;
        Ok((pv, created))
    }

    /// Validates and stores a JSON Schema for an event name; the same schema as the one
    /// in force changes nothing.
    pub async fn put_schema(
        &self,
        event: &str,
        schema: Value,
    ) -> Result<(SchemaVersion, bool), AdminError> {
        crate::model::check_name(event)
            .map_err(|e| invalid(format!("event name {event:?}: {e}")))?;
        jsonschema::validator_for(&schema)
            .map_err(|e| invalid(format!("not a valid JSON Schema: {e}")))?;
        let ((sv, created), _) = self
            .update(|state| {
                let versions = state.schemas.entry(event.to_owned()).or_default();
                if let Some(last) = versions.last()
                    && last.schema == schema
                {
                    return Ok((None, (last.clone(), false)));
                }
                let sv = SchemaVersion {
                    event: event.to_owned(),
                    version: versions.last().map_or(1, |v| v.version + 1),
                    created_at_ms: crate::model::now_ms(),
                    schema: schema.clone(),
                };
                versions.push(sv.clone());
                Ok((
                    Some(format!("schema of {event} version {}", sv.version)),
                    (sv, true),
                ))
            })
            .await?;
        Ok((sv, created))
    }

    /// Validates a pipeline document against the latest state and stores it as the
    /// pipeline's next version, active at once. The same document as the active one
    /// changes nothing. Every plugin of the chain is loaded and instantiated here with
    /// its configuration and limits first, so a chain that cannot start is refused
    /// rather than deployed (an instance that still cannot prepare it keeps its version
    /// and reports why).
    pub async fn put_pipeline(
        &self,
        name: &str,
        doc: PipelineDoc,
    ) -> Result<(PipelineVersion, bool), AdminError> {
        check_name("pipeline", name)?;
        let state = self.store.state().await?;
        check_pipeline(&state, &doc)?;
        for entry in &doc.plugins {
            let (plugin, version) = entry.reference().map_err(invalid)?;
            let meta = state.plugins[plugin]
                .iter()
                .find(|v| v.version == version)
                .expect("checked above");
            let bytes = self.store.blob(&meta.sha256).await?.ok_or_else(|| {
                invalid(format!(
                    "the component of {} is missing from the store",
                    entry.plugin
                ))
            })?;
            let config = Value::Object(entry.config.clone()).to_string();
            self.runtime
                .load_as(plugin, &version.to_string(), &bytes, config, entry.limits())
                .await
                .map_err(|e| {
                    invalid(format!(
                        "{} cannot start with these settings: {e}",
                        entry.plugin
                    ))
                })?;
        }
        let ((pv, created), _) = self
            .update(|state| {
                check_pipeline(state, &doc)?;
                let record = state.pipelines.entry(name.to_owned()).or_default();
                if let Some(active) = record.active()
                    && active.doc == doc
                {
                    return Ok((None, (active.clone(), false)));
                }
                let pv = PipelineVersion {
                    version: record.versions.last().map_or(1, |v| v.version + 1),
                    created_at_ms: crate::model::now_ms(),
                    doc: doc.clone(),
                };
                record.versions.push(pv.clone());
                record.active = pv.version;
                record.history.push(pv.version);
                let chain: Vec<&str> = doc.plugins.iter().map(|p| p.plugin.as_str()).collect();
                Ok((
                    Some(format!(
                        "pipeline {name} version {} active: [{}]",
                        pv.version,
                        chain.join(", ")
                    )),
                    (pv, true),
                ))
            })
            .await?;
        Ok((pv, created))
    }

    /// Activates the version that was active before the current one (or `to`).
    pub async fn rollback(
        &self,
        name: &str,
        to: Option<u32>,
    ) -> Result<PipelineVersion, AdminError> {
        let (pv, _) = self
            .update(|state| {
                let record = state
                    .pipelines
                    .get_mut(name)
                    .ok_or_else(|| AdminError::NotFound(format!("no pipeline {name}")))?;
                let target = match to {
                    Some(v) => {
                        if record.get(v).is_none() {
                            return Err(AdminError::NotFound(format!(
                                "pipeline {name} has no version {v}"
                            )));
                        }
                        v
                    }
                    None => {
                        let n = record.history.len();
                        if n < 2 {
                            return Err(invalid(format!(
                                "pipeline {name} has no earlier version to roll back to"
                            )));
                        }
                        record.history[n - 2]
                    }
                };
                let from = record.active;
                if to.is_none() {
                    record.history.pop();
                } else {
                    record.history.push(target);
                }
                record.active = target;
                let pv = record.get(target).expect("checked").clone();
                Ok((
                    Some(format!(
                        "pipeline {name} rolled back from version {from} to {target}"
                    )),
                    pv,
                ))
            })
            .await?;
        Ok(pv)
    }
}

/// Checks a pipeline document against a state: every plugin version exists, names
/// and limits are valid.
fn check_pipeline(state: &State, doc: &PipelineDoc) -> Result<(), AdminError> {
    if let Some(bad) = doc
        .events
        .iter()
        .find(|e| crate::model::check_name(e).is_err())
    {
        return Err(invalid(format!(
            "events: {bad:?} is not a valid event name"
        )));
    }
    if doc.tables.is_some() || doc.counters.is_some() {
        crate::pipeline::route::Routes::new(&doc.routes_config(&PipelineConfig::default()))
            .map_err(|e| invalid(e.to_string()))?;
    }
    let mut names = HashSet::new();
    for entry in &doc.plugins {
        let (name, version) = entry.reference().map_err(invalid)?;
        if !names.insert(name) {
            return Err(invalid(format!("plugin {name} appears twice in the chain")));
        }
        let known = state
            .plugins
            .get(name)
            .is_some_and(|vs| vs.iter().any(|v| v.version == version));
        if !known {
            let have = state
                .plugins
                .get(name)
                .map(|vs| {
                    vs.iter()
                        .map(|v| v.version.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|s| !s.is_empty());
            return Err(AdminError::Invalid(match have {
                Some(have) => {
                    format!("plugin {name}@{version} does not exist (versions of {name}: {have})")
                }
                None => format!(
                    "plugin {name}@{version} does not exist (no plugin {name} was uploaded)"
                ),
            }));
        }
        crate::pipeline::config::check_limits(
            &entry.plugin,
            entry.deadline_ms,
            entry.memory_mib,
            entry.quarantine_after,
            entry.quarantine_secs,
        )
        .map_err(invalid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_families() {
        assert_eq!(
            import_family("wasi:filesystem/types@0.2.0"),
            "wasi:filesystem"
        );
        assert_eq!(import_family("weir:plugin/host@0.1.0"), "weir:plugin");
        assert_eq!(import_family("wasi:cli/environment@0.2.3"), "wasi:cli");
    }

    #[test]
    fn chain_references() {
        let entry = |p: &str| ChainEntry {
            plugin: p.into(),
            config: Default::default(),
            deadline_ms: 1,
            memory_mib: 1,
            failure_policy: FailurePolicy::Closed,
            quarantine_after: 1,
            quarantine_secs: 1,
        };
        assert_eq!(entry("enrich@2").reference(), Ok(("enrich", 2)));
        assert!(
            entry("enrich")
                .reference()
                .unwrap_err()
                .contains("name@version")
        );
        assert!(
            entry("enrich@latest")
                .reference()
                .unwrap_err()
                .contains("number")
        );
    }

    #[test]
    fn pipeline_needs_existing_plugin_versions() {
        let mut state = State::default();
        state.plugins.insert(
            "enrich".into(),
            vec![PluginVersion {
                name: "enrich".into(),
                version: 1,
                sha256: "00".into(),
                size: 1,
                uploaded_at_ms: 0,
                stubbed_imports: vec![],
            }],
        );
        let doc = |p: &str| -> PipelineDoc {
            serde_json::from_value(serde_json::json!({"plugins": [{"plugin": p}]})).unwrap()
        };
        assert!(check_pipeline(&state, &doc("enrich@1")).is_ok());
        let e = check_pipeline(&state, &doc("enrich@2"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("enrich@2 does not exist (versions of enrich: 1)"),
            "{e}"
        );
        let e = check_pipeline(&state, &doc("route@1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no plugin route"), "{e}");
        let bad: Result<PipelineDoc, _> =
            serde_json::from_value(serde_json::json!({"plugins": [], "sinks": []}));
        assert!(bad.unwrap_err().to_string().contains("unknown field"));
    }
}
