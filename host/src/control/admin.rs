//! The admin API (`openapi/admin.yaml`), on its own port, for operators and the CLI.
//! Every route but `/healthz` and `/metrics` needs `Authorization: Bearer <admin
//! token>`; an app's write or read key gets 403.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::dead_letters::{DeadLetterError, DeadLetters};
use super::{AdminError, Control, PipelineDoc};
use crate::control::dry_run;
use crate::ingest::{ApiError, bearer};
use crate::sinks::clickhouse::DeadLetterFilter;

/// What the admin routes share.
pub struct Admin {
    pub control: Control,
    pub tokens: HashSet<String>,
    /// Apps' write and read keys: they get 403, not 401.
    pub app_keys: HashSet<String>,
    pub max_plugin_bytes: usize,
    /// How long a request body may take to arrive (`admin.body_timeout_ms`).
    pub body_timeout: Duration,
    /// Instances not heard from for this long are not listed.
    pub instance_ttl: Duration,
    pub dead_letters: DeadLetters,
    /// One dry run at a time on this instance: each compiles a component and runs it
    /// on the cores ingest and the processor use.
    pub dry_runs: Arc<tokio::sync::Semaphore>,
}

/// A query string, or the JSON `400 bad_query` that says what is wrong with it (axum's
/// own rejection is plain text). Taken after the token is checked, so that a caller
/// without one gets 401 whatever its query.
struct QueryOr<T>(Result<T, ApiError>);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for QueryOr<T>
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = Query::<T>::from_request_parts(parts, state).await;
        Ok(Self(query.map(|Query(q)| q).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())
        })))
    }
}

/// The admin router.
pub fn app(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/admin/v1/plugins", get(list_plugins))
        .route("/admin/v1/plugins/{name}", put(push_plugin).get(get_plugin))
        .route("/admin/v1/plugins/{name}/test", post(test_plugin))
        .route("/admin/v1/schemas", get(list_schemas))
        .route("/admin/v1/schemas/{event}", put(put_schema).get(get_schema))
        .route("/admin/v1/pipelines", get(list_pipelines))
        .route(
            "/admin/v1/pipelines/{name}",
            put(put_pipeline).get(get_pipeline),
        )
        .route("/admin/v1/pipelines/{name}/rollback", post(rollback))
        .route("/admin/v1/status", get(status))
        .route("/admin/v1/dead-letters", get(list_dead_letters))
        .route("/admin/v1/dead-letters/replay", post(replay_dead_letters))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        // Handlers read bodies with their own limits, to answer in JSON.
        .layer(DefaultBodyLimit::disable())
        .with_state(admin)
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let (status, code) = match &e {
            AdminError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            AdminError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            AdminError::Contended => (StatusCode::CONFLICT, "contended"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = bearer(headers, "admin token")?;
    if admin.tokens.contains(token) {
        return Ok(());
    }
    if admin.app_keys.contains(token) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an app's write or read key cannot use the admin API; use an admin token",
        ));
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "unknown admin token",
    ))
}

/// Checks the token, then reads the latest control-plane state.
async fn authorized_state(admin: &Admin, headers: &HeaderMap) -> Result<super::State, ApiError> {
    authorize(admin, headers)?;
    Ok(admin
        .control
        .store()
        .state()
        .await
        .map_err(AdminError::from)?)
}

impl Admin {
    /// Reads an upload of at most `max` bytes; `None` if it is larger. A larger body is
    /// still read (and dropped) up to twice the limit, so that the client, still sending,
    /// gets the 413 rather than a broken connection; beyond that the connection is cut.
    /// A body still arriving at `admin.body_timeout_ms` is answered 408.
    async fn read_upload(&self, mut body: Body, max: usize) -> Result<Option<Bytes>, ApiError> {
        use http_body_util::BodyExt as _;
        let read = async move {
            let mut buf = bytes::BytesMut::new();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return None;
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len();
                if total <= max {
                    buf.extend_from_slice(&data);
                } else if total > max.saturating_mul(2) {
                    return None;
                }
            }
            (total <= max).then(|| buf.freeze())
        };
        tokio::time::timeout(self.body_timeout, read)
            .await
            .map_err(|_| self.body_timeout_error())
    }

    /// Reads a body of at most `max` bytes, within `admin.body_timeout_ms`.
    async fn read_body(&self, body: Body, max: usize, what: &str) -> Result<Bytes, ApiError> {
        tokio::time::timeout(self.body_timeout, axum::body::to_bytes(body, max))
            .await
            .map_err(|_| self.body_timeout_error())?
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("{what} is larger than the limit of {max} bytes"),
                )
            })
    }

    fn body_timeout_error(&self) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms (admin.body_timeout_ms)",
                self.body_timeout.as_millis()
            ),
        )
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{what} is not valid: {e}"),
        )
    })
}

/// A request body that the API documents as a JSON object, read as `T`. serde would
/// also read a struct from a JSON array of its fields (`[]` is a pipeline with every
/// field defaulted): that is refused here, like any other body of the wrong type.
fn parse_object<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    let value: Value = parse_json(bytes, what)?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{what} is not valid: a JSON object is expected"),
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{what} is not valid: {e}"),
        )
    })
}

fn created(is_new: bool, body: Value) -> Response {
    let status = if is_new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body)).into_response()
}

fn not_found(msg: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", msg)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushQuery {
    /// Comma-separated import families accepted as granting nothing.
    #[serde(default)]
    allow: String,
}

async fn push_plugin(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    QueryOr(q): QueryOr<PushQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&admin, &headers)?;
    let q = q?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "plugin {name} is larger than the limit of {} bytes (admin.max_plugin_bytes)",
                admin.max_plugin_bytes
            ),
        )
    };
    let bytes = admin
        .read_upload(body, admin.max_plugin_bytes)
        .await?
        .ok_or_else(too_large)?;
    let allow: Vec<String> = q
        .allow
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let (pv, is_new) = admin.control.push_plugin(&name, &bytes, &allow).await?;
    Ok(created(is_new, json!(pv)))
}

async fn list_plugins(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let state = authorized_state(&admin, &headers).await?;
    Ok(axum::Json(
        json!({"version": state.version, "plugins": state.plugins}),
    ))
}

async fn get_plugin(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let state = authorized_state(&admin, &headers).await?;
    let versions = state
        .plugins
        .get(&name)
        .ok_or_else(|| not_found(format!("no plugin {name}")))?;
    Ok(axum::Json(json!({"name": name, "versions": versions})))
}

/// Body of `POST /admin/v1/plugins/{name}/test`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    /// The version to run (default: the latest).
    #[serde(default)]
    version: Option<u32>,
    /// Sample events, as `POST /v1/events` takes them.
    events: Vec<Value>,
    #[serde(default)]
    config: serde_json::Map<String, Value>,
    #[serde(default = "default_deadline_ms")]
    deadline_ms: u64,
    #[serde(default = "default_memory_mib")]
    memory_mib: usize,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
}

fn default_deadline_ms() -> u64 {
    100
}
fn default_memory_mib() -> usize {
    64
}
fn default_batch_size() -> usize {
    256
}

/// Most sample events in one dry run.
const MAX_TEST_EVENTS: usize = 10_000;

async fn test_plugin(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&admin, &headers)?;
    let Ok(slot) = admin.dry_runs.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "another dry run is in progress on this instance; try again shortly",
        )
        .retry_after(1));
    };
    let body = admin
        .read_body(body, 16 << 20, "the dry-run request")
        .await?;
    let req: TestRequest = parse_object(&body, "the dry-run request")?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid", m);
    if req.events.len() > MAX_TEST_EVENTS {
        return Err(bad(format!("at most {MAX_TEST_EVENTS} events per dry run")));
    }
    if req.batch_size == 0 {
        return Err(bad("batch_size must be positive".into()));
    }
    crate::pipeline::config::check_limits(
        &name,
        req.deadline_ms,
        req.memory_mib,
        1,
        crate::pipeline::config::default_quarantine_secs(),
    )
    .map_err(bad)?;
    let state = admin
        .control
        .store()
        .state()
        .await
        .map_err(AdminError::from)?;
    let versions = state
        .plugins
        .get(&name)
        .ok_or_else(|| not_found(format!("no plugin {name}")))?;
    let pv = match req.version {
        Some(v) => versions
            .iter()
            .find(|p| p.version == v)
            .ok_or_else(|| not_found(format!("no version {v} of plugin {name}")))?,
        None => versions
            .last()
            .ok_or_else(|| not_found(format!("no plugin {name}")))?,
    };
    let bytes = admin
        .control
        .store()
        .blob(&pv.sha256)
        .await
        .map_err(AdminError::from)?
        .ok_or_else(|| not_found(format!("the component of {name}@{} is missing", pv.version)))?;
    let events_json = serde_json::to_vec(&req.events).expect("JSON");
    let events = dry_run::parse_samples(&events_json).map_err(bad)?;
    let limits = crate::model::Limits {
        deadline: Duration::from_millis(req.deadline_ms),
        memory_bytes: req.memory_mib << 20,
    };
    let run = dry_run::Request {
        name: name.clone(),
        version: pv.version.to_string(),
        bytes,
        config: Value::Object(req.config).to_string(),
        limits,
        events,
        batch_size: req.batch_size,
    };
    let report = dry_run::run_apart(admin.control.runtime().clone(), run, slot)
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok(axum::Json(json!({
        "plugin": name,
        "version": pv.version,
        "outcomes": report.outcomes,
        "summary": report.summary(req.batch_size),
    })))
}

async fn put_schema(
    State(admin): State<Arc<Admin>>,
    Path(event): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&admin, &headers)?;
    let body = admin.read_body(body, 1 << 20, "the schema").await?;
    let schema: Value = parse_json(&body, "the schema (JSON)")?;
    let (sv, is_new) = admin.control.put_schema(&event, schema).await?;
    Ok(created(is_new, json!(sv)))
}

async fn list_schemas(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let state = authorized_state(&admin, &headers).await?;
    let latest: serde_json::Map<String, Value> = state
        .schemas
        .iter()
        .filter_map(|(e, vs)| vs.last().map(|v| (e.clone(), json!(v))))
        .collect();
    Ok(axum::Json(
        json!({"version": state.version, "schemas": latest}),
    ))
}

async fn get_schema(
    State(admin): State<Arc<Admin>>,
    Path(event): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let state = authorized_state(&admin, &headers).await?;
    let versions = state
        .schemas
        .get(&event)
        .ok_or_else(|| not_found(format!("no schema for {event}")))?;
    Ok(axum::Json(json!({"event": event, "versions": versions})))
}

async fn put_pipeline(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&admin, &headers)?;
    let body = admin.read_body(body, 1 << 20, "the pipeline").await?;
    let doc: PipelineDoc = parse_object(&body, "the pipeline")?;
    let (pv, is_new) = admin.control.put_pipeline(&name, doc).await?;
    Ok(created(
        is_new,
        json!({"name": name, "version": pv.version, "active": true, "doc": pv.doc}),
    ))
}

async fn list_pipelines(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let state = authorized_state(&admin, &headers).await?;
    let active: serde_json::Map<String, Value> = state
        .pipelines
        .iter()
        .map(|(n, r)| {
            (
                n.clone(),
                json!({"active": r.active, "doc": r.active().map(|v| &v.doc)}),
            )
        })
        .collect();
    Ok(axum::Json(
        json!({"version": state.version, "pipelines": active}),
    ))
}

async fn get_pipeline(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let state = authorized_state(&admin, &headers).await?;
    let record = state
        .pipelines
        .get(&name)
        .ok_or_else(|| not_found(format!("no pipeline {name}")))?;
    Ok(axum::Json(
        json!({"name": name, "active": record.active, "history": record.history, "versions": record.versions}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackQuery {
    /// Activate this version (default: the one active before the current one).
    #[serde(default)]
    to: Option<u32>,
}

async fn rollback(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    QueryOr(q): QueryOr<RollbackQuery>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&admin, &headers)?;
    let q = q?;
    let pv = admin.control.rollback(&name, q.to).await?;
    Ok(axum::Json(
        json!({"name": name, "version": pv.version, "active": true, "doc": pv.doc}),
    ))
}

async fn status(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&admin, &headers)?;
    let store = admin.control.store();
    let state = store.state().await.map_err(AdminError::from)?;
    let instances = store
        .instances(admin.instance_ttl)
        .await
        .map_err(AdminError::from)?;
    let pipelines: serde_json::Map<String, Value> = state
        .pipelines
        .iter()
        .map(|(n, r)| (n.clone(), json!(r.active)))
        .collect();
    Ok(axum::Json(json!({
        "control_version": state.version,
        "changed_at_ms": state.changed_at_ms,
        "change": state.change,
        "store": store.describe(),
        "pipelines": pipelines,
        "instances": instances,
    })))
}

fn unavailable(e: DeadLetterError) -> ApiError {
    let code = match e {
        DeadLetterError::ClickHouse(_) => "clickhouse_unavailable",
        DeadLetterError::Kafka { .. } => "kafka_unavailable",
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string())
}

/// A filter of dead letters whose `stage` names one (an unknown stage would match
/// nothing and hide a typo) and whose `limit` is not negative.
fn check_filter(filter: DeadLetterFilter) -> Result<DeadLetterFilter, ApiError> {
    use crate::model::Stage;
    if let Some(limit) = filter.limit.filter(|l| *l < 0) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("limit must be at least 0, not {limit}"),
        ));
    }
    match &filter.stage {
        Some(stage) if Stage::parse(stage).is_none() => {
            let known: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("unknown stage {stage:?}; one of {}", known.join(", ")),
            ))
        }
        _ => Ok(filter),
    }
}

async fn list_dead_letters(
    State(admin): State<Arc<Admin>>,
    QueryOr(filter): QueryOr<DeadLetterFilter>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&admin, &headers)?;
    let filter = check_filter(filter?)?;
    let rows = admin
        .dead_letters
        .list(&filter)
        .await
        .map_err(unavailable)?;
    Ok(axum::Json(json!({"dead_letters": rows})))
}

async fn replay_dead_letters(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&admin, &headers)?;
    let body = admin.read_body(body, 4 << 20, "the replay request").await?;
    let filter = check_filter(parse_object(&body, "the replay request")?)?;
    let report = admin
        .dead_letters
        .replay(&filter)
        .await
        .map_err(unavailable)?;
    Ok(axum::Json(json!(report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_filter_needs_a_known_stage_and_a_limit_from_0() {
        let filter = |stage: Option<&str>, limit: Option<i64>| DeadLetterFilter {
            stage: stage.map(str::to_owned),
            limit,
            ..DeadLetterFilter::default()
        };
        assert!(check_filter(filter(Some("plugin"), Some(0))).is_ok());
        assert!(check_filter(filter(None, Some(i64::MAX))).is_ok());
        for (bad, says) in [
            (filter(Some("nope"), None), "unknown stage"),
            (filter(None, Some(-1)), "limit must be at least 0, not -1"),
        ] {
            let e = format!("{:?}", check_filter(bad).unwrap_err());
            assert!(e.contains("400") && e.contains(says), "{e}");
        }
    }
}
