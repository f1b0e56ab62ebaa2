//! A client of the admin API, for the CLI (`weir plugin push`, `weir apply`, ...).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ChainEntry, PipelineDoc};

/// The admin API of a weir instance.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        if token.is_empty() {
            bail!("no admin token: pass --token or set WEIR_ADMIN_TOKEN");
        }
        Ok(Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// Sends a request; `Ok((created, body))` for 2xx, the API's error message otherwise.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<(bool, Value)> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach the admin API at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = body["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            bail!("{what}: {status}: {message}");
        }
        Ok((status == reqwest::StatusCode::CREATED, body))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn push_plugin(
        &self,
        name: &str,
        bytes: Vec<u8>,
        allow: &[String],
    ) -> anyhow::Result<(bool, Value)> {
        let req = self
            .http
            .put(self.url(&format!("/admin/v1/plugins/{name}")))
            .query(&[("allow", allow.join(","))])
            .body(bytes);
        self.send(req, &format!("push plugin {name}")).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.get(self.url(path)), &format!("GET {path}"))
            .await?
            .1)
    }

    pub async fn get_query(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        Ok(self
            .send(
                self.http.get(self.url(path)).query(query),
                &format!("GET {path}"),
            )
            .await?
            .1)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self
            .send(
                self.http.post(self.url(path)).json(body),
                &format!("POST {path}"),
            )
            .await?
            .1)
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<(bool, Value)> {
        self.send(
            self.http.put(self.url(path)).json(body),
            &format!("PUT {path}"),
        )
        .await
    }

    pub async fn post(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        Ok(self
            .send(
                self.http.post(self.url(path)).query(query),
                &format!("POST {path}"),
            )
            .await?
            .1)
    }
}

/// A declarative file for `weir apply -f FILE` (TOML): plugins to upload, schemas and
/// pipelines. Applying it twice changes nothing the second time.
///
/// ```toml
/// [[plugin]]
/// name = "enrich"
/// path = "plugins/enrich.wasm"      # relative to this file
///
/// [schema]
/// profile_viewed = "schemas/profile_viewed.json"
///
/// [pipeline.engagement]
/// events = ["profile_viewed", "post_liked"]
/// [[pipeline.engagement.plugins]]
/// plugin = "enrich"                 # the file's plugin (its uploaded version), or name@version
/// config = { drop_flag = "is_test" }
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyFile {
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<ApplyPlugin>,
    /// Event name -> JSON Schema file.
    #[serde(default, rename = "schema")]
    pub schemas: BTreeMap<String, PathBuf>,
    /// Pipeline name -> document (chain entries may name a plugin of this file
    /// without a version).
    #[serde(default, rename = "pipeline")]
    pub pipelines: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPlugin {
    pub name: String,
    pub path: PathBuf,
    /// Import families accepted as granting nothing (`wasi:filesystem`, `wasi:sockets`).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Applies a declarative file: uploads its plugins, puts its schemas, then its
/// pipelines (each only if it differs from what is in force). Returns one line per item.
pub async fn apply(client: &AdminClient, path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: ApplyFile =
        toml::from_str(&text).with_context(|| format!("invalid apply file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut report = Vec::new();
    let mut versions = BTreeMap::new();
    for p in &file.plugins {
        let wasm = base.join(&p.path);
        let bytes = std::fs::read(&wasm)
            .with_context(|| format!("plugin {}: cannot read {}", p.name, wasm.display()))?;
        let (created, body) = client.push_plugin(&p.name, bytes, &p.allow).await?;
        let v = body["version"]
            .as_u64()
            .context("push answer without a version")?;
        versions.insert(p.name.clone(), v);
        report.push(format!(
            "plugin {}@{v}: {}",
            p.name,
            if created { "uploaded" } else { "unchanged" }
        ));
    }
    for (event, schema_path) in &file.schemas {
        let full = base.join(schema_path);
        let text = std::fs::read_to_string(&full)
            .with_context(|| format!("schema of {event}: cannot read {}", full.display()))?;
        let schema: Value = serde_json::from_str(&text)
            .with_context(|| format!("schema of {event}: {} is not JSON", full.display()))?;
        let (created, body) = client
            .put_json(&format!("/admin/v1/schemas/{event}"), &schema)
            .await?;
        report.push(format!(
            "schema {event}@{}: {}",
            body["version"],
            if created { "created" } else { "unchanged" }
        ));
    }
    for (name, doc) in &file.pipelines {
        let mut doc: PipelineDoc = doc
            .clone()
            .try_into()
            .with_context(|| format!("pipeline {name} in {}", path.display()))?;
        resolve(&mut doc.plugins, &versions).with_context(|| format!("pipeline {name}"))?;
        let (created, body) = client
            .put_json(&format!("/admin/v1/pipelines/{name}"), &json!(doc))
            .await?;
        report.push(format!(
            "pipeline {name}@{}: {}",
            body["version"],
            if created {
                "created and active"
            } else {
                "unchanged"
            }
        ));
    }
    Ok(report)
}

/// Gives chain entries without a version the version of the file's plugin.
fn resolve(chain: &mut [ChainEntry], versions: &BTreeMap<String, u64>) -> anyhow::Result<()> {
    for entry in chain {
        if entry.plugin.contains('@') {
            continue;
        }
        let v = versions.get(&entry.plugin).with_context(|| {
            format!(
                "plugin {:?} has no version and is not a [[plugin]] of this file (write name@version)",
                entry.plugin
            )
        })?;
        entry.plugin = format!("{}@{v}", entry.plugin);
    }
    Ok(())
}
