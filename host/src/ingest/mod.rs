//! The HTTP ingest endpoint: `POST /v1/events`, and the APIs of the tracking SDKs apps
//! already use (see [`sdk`]): Segment's (and RudderStack's) and PostHog's.
//!
//! It checks the envelope only (see [`envelope`]), writes the whole request to Kafka
//! as one record, and answers only once Kafka acknowledged it. It never waits on the
//! processor. Bodies may be gzip-compressed (see [`encoding`]).

mod config;
pub mod encoding;
pub mod envelope;
pub mod quota;
pub mod sdk;

use sdk::segment;

pub use config::{
    BODY_TIMEOUT_MS, HEADER_TIMEOUT_MS, IngestConfig, MAX_CONNECTIONS, MetricsOnIngest,
};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::warn;

use crate::bus::{BusError, Producer};
use crate::model::Counter;
use crate::model::{IngestRecord, WireEvent};
use envelope::{BodyFormat, EnvelopeError, Limits};

/// Where ingest writes accepted requests. [`Producer`] in production; tests of the
/// HTTP layer alone may use another implementation.
pub trait Sink: Send + Sync + 'static {
    fn send(
        &self,
        record: IngestRecord,
        key: String,
    ) -> impl Future<Output = Result<(), BusError>> + Send;
    fn is_ready(&self) -> impl Future<Output = bool> + Send;
}

impl Sink for Producer {
    async fn send(&self, record: IngestRecord, key: String) -> Result<(), BusError> {
        Producer::send(self, &record, &key).await.map(|_| ())
    }

    async fn is_ready(&self) -> bool {
        Producer::is_ready(self, Duration::from_secs(1)).await
    }
}

/// Shared state of the ingest endpoint.
pub struct Ingest<S> {
    sink: S,
    keys: HashMap<String, String>,
    limits: Limits,
    max_body_bytes: usize,
    /// Longest a client may take to send a body (408 beyond).
    body_timeout: Duration,
    /// `GET /metrics` is served here (see [`IngestConfig::metrics`]).
    serves_metrics: bool,
    counters: Option<Counters>,
    quotas: quota::Quotas,
    /// The last readiness probe and when it was made: `/readyz` asks the broker at
    /// most once per [`READY_CACHE`], however often it is called.
    ready: tokio::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

/// How long a readiness probe's answer is reused.
const READY_CACHE: Duration = Duration::from_secs(1);

/// What the counters API reads: the counters the pipeline in force declares, and
/// their values. `serve` implements it over the processor's pipeline and Redis; ingest
/// knows neither.
pub trait CounterSource: Send + Sync + 'static {
    /// The declared counter named `name`, if any.
    fn counter(&self, name: &str) -> Option<Counter>;
    /// The value of `counter` for `app` and `key` (and of the last `days` UTC days),
    /// as the API answers it.
    fn read<'a>(
        &'a self,
        app: &'a str,
        counter: &'a str,
        key: &'a str,
        days: u32,
    ) -> futures::future::BoxFuture<
        'a,
        Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>>,
    >;
}

/// What the counters API needs: read keys and the counters.
pub struct Counters {
    pub read_keys: HashMap<String, String>,
    pub source: Arc<dyn CounterSource>,
}

impl<S: Sink> Ingest<S> {
    pub fn new(cfg: &IngestConfig, keys: HashMap<String, String>, sink: S) -> Self {
        Self {
            sink,
            keys,
            limits: Limits {
                max_event_bytes: cfg.max_event_bytes,
                max_events: cfg.max_events_per_request,
                max_depth: cfg.max_depth,
            },
            max_body_bytes: cfg.max_body_bytes,
            body_timeout: Duration::from_millis(cfg.body_timeout_ms),
            serves_metrics: cfg.serves_metrics(),
            counters: None,
            quotas: quota::Quotas::default(),
            ready: tokio::sync::Mutex::new(None),
        }
    }

    /// Limits each app's (and write key's) events and bytes per second.
    pub fn with_quotas(mut self, quotas: quota::Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Serves `GET /v1/counters/{counter}/{key}` too.
    pub fn with_counters(mut self, counters: Counters) -> Self {
        self.counters = Some(counters);
        self
    }
}

/// The ingest router: `/v1/events`, `/v1/counters/{counter}/{key}`, `/healthz`,
/// `/readyz`, and `/metrics` where [`IngestConfig::metrics`] says so.
pub fn app<S: Sink>(state: Arc<Ingest<S>>, cors_origins: &[String]) -> Router {
    let mut router = Router::new().route(
        "/v1/events",
        post(|st: State<Arc<Ingest<S>>>, h: HeaderMap, b: Body| post_events(st, h, b, Api::Events)),
    );
    for (path, call) in SEGMENT_PATHS {
        let handler = move |st: State<Arc<Ingest<S>>>, h: HeaderMap, b: Body| {
            post_events(st, h, b, Api::Segment(call))
        };
        router = router.route(path, post(handler));
    }
    for path in POSTHOG_PATHS {
        let handler = |st: State<Arc<Ingest<S>>>, uri: Uri, h: HeaderMap, b: Body| async move {
            // posthog-js says a body is gzip in the query, not in a header.
            match uri.query().map(posthog_compression) {
                Some(Err(e)) => e.into_response(),
                Some(Ok(true)) => post_events(st, h, b, Api::PostHog { gzip: true }).await,
                _ => post_events(st, h, b, Api::PostHog { gzip: false }).await,
            }
        };
        router = router.route(path, post(handler));
    }
    let mut router = router
        .route("/v1/counters/{counter}/{key}", get(get_counter::<S>))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<S>));
    if state.serves_metrics {
        router = router.route("/metrics", get(|| async { crate::metrics::render() }));
    }
    let router = router
        // The handler enforces the body limit itself, to answer in JSON.
        .layer(DefaultBodyLimit::disable())
        .with_state(state);
    if cors_origins.is_empty() {
        return router;
    }
    let origins = if cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    router.layer(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST, Method::GET])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

/// An error answer: `{"error": {"code", "message", "index"?, "field"?}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    index: Option<usize>,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            index: None,
            field: None,
            retry_after: None,
        }
    }

    /// Its code (`body_too_large`, `bad_encoding`, ...), as the answer's body names it.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The same error, telling the client to try again in `secs` seconds.
    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl From<EnvelopeError> for ApiError {
    fn from(e: EnvelopeError) -> Self {
        Self {
            index: e.index,
            field: e.field,
            ..Self::new(StatusCode::BAD_REQUEST, e.code, e.message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response(false)
    }
}

impl ApiError {
    /// The error as an answer: `{"error": {"code", "message", ...}}`. With
    /// `segment_shape` (Segment's API), `success: false`, `code` and `message` are also
    /// at the top, where Segment's and RudderStack's SDKs read them: RudderStack's
    /// Python SDK takes an error body without them for a network failure and retries
    /// it, even a 400.
    fn response(self, segment_shape: bool) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(i) = self.index {
            error["index"] = json!(i);
        }
        if let Some(f) = self.field {
            error["field"] = json!(f);
        }
        let body = if segment_shape {
            json!({ "success": false, "code": self.code, "message": error["message"], "error": error })
        } else {
            json!({ "error": error })
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Which API a request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// weir's own: `POST /v1/events`.
    Events,
    /// Segment's tracking API.
    Segment(segment::Call),
    /// PostHog's capture API; `gzip` when the query said the body is (posthog-js).
    PostHog { gzip: bool },
}

/// The paths of PostHog's capture API, with and without the trailing slash.
const POSTHOG_PATHS: [&str; 8] = [
    "/batch",
    "/batch/",
    "/capture",
    "/capture/",
    "/e",
    "/e/",
    "/i/v0/e",
    "/i/v0/e/",
];

/// Whether a capture request's query (`compression=gzip-js`, posthog-js) says the body
/// is gzip; another compression gets 415.
fn posthog_compression(query: &str) -> Result<bool, ApiError> {
    let compression = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "compression")
        .map(|(_, v)| v);
    match compression {
        None | Some("") => Ok(false),
        Some("gzip" | "gzip-js") => Ok(true),
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("compression={other} is not supported; use gzip-js or a gzip Content-Encoding"),
        )),
    }
}

/// The paths of Segment's tracking API (and RudderStack's `/v1/import`).
const SEGMENT_PATHS: [(&str, segment::Call); 8] = {
    use segment::{Call, Type};
    [
        ("/v1/batch", Call::Batch),
        ("/v1/import", Call::Batch),
        ("/v1/track", Call::One(Type::Track)),
        ("/v1/identify", Call::One(Type::Identify)),
        ("/v1/page", Call::One(Type::Page)),
        ("/v1/screen", Call::One(Type::Screen)),
        ("/v1/group", Call::One(Type::Group)),
        ("/v1/alias", Call::One(Type::Alias)),
    ]
};

/// The app a request posts for, and the write key it used (`Authorization: Bearer`).
fn authenticate<'a, S>(
    state: &'a Ingest<S>,
    headers: &'a HeaderMap,
) -> Result<(&'a str, &'a str), ApiError> {
    app_of(state, bearer(headers, "write key")?)
}

/// The app of write key `key`, and the key as the configuration holds it.
fn app_of<'a, S>(state: &'a Ingest<S>, key: &str) -> Result<(&'a str, &'a str), ApiError> {
    let (key, app) = state.keys.get_key_value(key).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown write key",
        )
    })?;
    Ok((app, key))
}

/// The write key of a tracking SDK's request header: `Basic base64(KEY:)` as Segment's
/// SDKs send it, or weir's `Bearer KEY`. None without an `Authorization` header (the
/// key may be in the body).
fn sdk_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    use base64::Engine as _;
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authorization must be \"Basic base64(<write key>:)\" or \"Bearer <write key>\"",
        )
    };
    let value = value.to_str().map_err(|_| bad())?;
    if let Some(key) = value.strip_prefix("Bearer ") {
        return Ok(Some(key.trim().to_owned()));
    }
    let encoded = value.strip_prefix("Basic ").ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    // The user is the key; Segment's SDKs send no password.
    let key = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    Ok(Some(key.to_owned()))
}

/// A 429 for a request over a quota, counted by app and limit.
fn throttled(app: &str, t: quota::Throttled) -> ApiError {
    crate::metrics::INGEST_THROTTLED
        .with_label_values(&[app, t.limit.as_str()])
        .inc();
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", t.message())
        .retry_after(t.retry_after_secs())
}

/// The bearer token of a request.
pub(crate) fn bearer<'h>(headers: &'h HeaderMap, what: &str) -> Result<&'h str, ApiError> {
    let unauthorized = |msg: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized(format!("missing Authorization: Bearer <{what}>")))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthorized(format!("Authorization must be \"Bearer <{what}>\"")))
}

/// Query of `GET /v1/counters/{counter}/{key}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterQuery {
    /// Also return the last N UTC days (counters declared `by_day`), at most 366.
    #[serde(default)]
    days: u32,
}

/// Longest history the counters API returns, in days.
const MAX_COUNTER_DAYS: u32 = 366;

async fn get_counter<S: Sink>(
    State(state): State<Arc<Ingest<S>>>,
    Path((counter, key)): Path<(String, String)>,
    query: Result<Query<CounterQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let Some(counters) = &state.counters else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "this weir declares no counters ([[pipeline.counter]])",
            ));
        };
        let token = bearer(&headers, "read key")?;
        let Some(app) = counters.read_keys.get(token) else {
            if state.keys.contains_key(token) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "a write key cannot read counters; use one of the app's read keys",
                ));
            }
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown read key",
            ));
        };
        let Query(query) = query
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
        let Some(spec) = counters.source.counter(&counter) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no counter named {counter:?} is declared"),
            ));
        };
        if key.is_empty() || key.len() > crate::model::MAX_COUNTER_KEY {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_key",
                "the key must be 1-256 bytes",
            ));
        }
        if query.days > 0 && !spec.by_day {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("counter {counter} keeps no per-day counts (by_day = false)"),
            ));
        }
        if query.days > MAX_COUNTER_DAYS {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("days must be at most {MAX_COUNTER_DAYS}"),
            ));
        }
        counters
            .source
            .read(app, &counter, &key, query.days)
            .await
            .map_err(|e| {
                warn!(error = %e, "counter read failed");
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "counters_unavailable",
                        "the counter store (Redis) is unavailable; retry shortly",
                    )
                }
            })
    }
    .await;
    match result {
        Ok(value) => axum::Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

fn body_format(headers: &HeaderMap) -> Result<BodyFormat, ApiError> {
    let unsupported = |what: &str| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "{what}; use application/json (an event or an array) or application/x-ndjson (one event per line)"
            ),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("missing Content-Type"));
    };
    let value = value.to_str().unwrap_or_default();
    let mime = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        // text/plain: what navigator.sendBeacon sends without a preflight.
        "application/json" | "text/plain" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
            Ok(BodyFormat::Ndjson)
        }
        _ => Err(unsupported(&format!(
            "Content-Type {value:?} is not supported"
        ))),
    }
}

async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    deadline: Duration,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    deadline.as_millis()
                ),
            )
        })?;
    read.map_err(|e| {
        let is_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if is_limit || e.to_string().contains("length limit") {
            too_large()
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_read_failed",
                format!("cannot read request body: {e}"),
            )
        }
    })
}

async fn post_events<S: Sink>(
    State(state): State<Arc<Ingest<S>>>,
    headers: HeaderMap,
    body: Body,
    api: Api,
) -> Response {
    let started = std::time::Instant::now();
    let response = match accept(&state, &headers, body, api).await {
        Ok(r) => r,
        Err(e) => e.response(matches!(api, Api::Segment(_))),
    };
    crate::metrics::INGEST_REQUESTS
        .with_label_values(&[response.status().as_str()])
        .inc();
    crate::metrics::INGEST_DURATION.observe(started.elapsed().as_secs_f64());
    response
}

async fn accept<S: Sink>(
    state: &Ingest<S>,
    headers: &HeaderMap,
    body: Body,
    api: Api,
) -> Result<Response, ApiError> {
    // The key is in the header, or (Segment's API) perhaps in the body.
    let from_header = match api {
        Api::Events => Some(authenticate(state, headers)?),
        Api::Segment(_) | Api::PostHog { .. } => sdk_key(headers)?
            .map(|key| app_of(state, &key))
            .transpose()?,
    };
    let limit = match api {
        Api::Events | Api::PostHog { .. } => state.max_body_bytes,
        Api::Segment(_) => state.max_body_bytes.min(segment::MAX_BATCH_BYTES),
    };
    // Refused before its body is parsed: a flood over quota costs weir little. The
    // body is still read (and dropped), so that the connection stays usable and a
    // client still sending gets the answer rather than a reset.
    if let Some((app, key)) = from_header
        && let Err(t) = state.quotas.check(app, key)
    {
        let _ = read_body(body, headers, limit, state.body_timeout).await;
        return Err(throttled(app, t));
    }
    let format = match api {
        Api::Events => body_format(headers)?,
        // The SDKs send JSON, whatever their Content-Type says (a beacon's is text/plain).
        Api::Segment(_) | Api::PostHog { .. } => BodyFormat::Json,
    };
    let bytes = read_body(body, headers, limit, state.body_timeout).await?;
    let wire_bytes = bytes.len() as u64;
    let now_ms = crate::model::now_ms();
    let (events, body_key, body_bytes) =
        match decode_and_parse(state, headers, bytes, api, format, limit, now_ms) {
            Ok(parsed) => parsed,
            Err(e) => {
                // A refused body is charged what it weighed on the wire to the key the
                // header named, so that a flood of bad bodies (or of gzip bombs) runs into
                // the bytes quota like any other.
                if let Some((app, key)) = from_header {
                    state.quotas.spend(app, key, 0, wire_bytes);
                }
                return Err(e);
            }
        };
    let (app, key) = match from_header {
        Some(found) => found,
        // Only the SDKs' APIs get here: the key is in the body, and its quota is
        // checked now.
        None => {
            let key = body_key.as_deref().ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing write key: send Authorization: Basic base64(<write key>:), or the key in the body (\"writeKey\"; PostHog's \"api_key\" or \"token\")",
                )
            })?;
            let (app, key) = app_of(state, key)?;
            state
                .quotas
                .check(app, key)
                .map_err(|t| throttled(app, t))?;
            (app, key)
        }
    };
    let cost = (events.len() as u64, body_bytes);
    state
        .quotas
        .charge(app, key, cost.0, cost.1)
        .map_err(|t| throttled(app, t))?;
    let write_key = key;
    let app = app.to_owned();
    let event_ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    let record = IngestRecord::new(app.clone(), now_ms, events);
    let key = record.key();
    let produce = std::time::Instant::now();
    let sent = state.sink.send(record, key).await;
    crate::metrics::PRODUCE_DURATION.observe(produce.elapsed().as_secs_f64());
    match sent {
        Ok(()) => {
            crate::metrics::INGEST_EVENTS
                .with_label_values(&[app.as_str()])
                .inc_by(event_ids.len() as u64);
            Ok(match api {
                Api::Events => (
                    StatusCode::ACCEPTED,
                    axum::Json(json!({ "accepted": event_ids.len(), "event_ids": event_ids })),
                )
                    .into_response(),
                // What Segment's and PostHog's APIs answer, and their SDKs expect.
                Api::Segment(_) => axum::Json(json!({ "success": true })).into_response(),
                Api::PostHog { .. } => axum::Json(json!({ "status": 1 })).into_response(),
            })
        }
        // Nothing was accepted: the quota is given back, so that the client's retry is
        // not refused for a request weir did not take.
        Err(e) => {
            state.quotas.refund(&app, write_key, cost.0, cost.1);
            Err(refused_by_kafka(&app, event_ids.len(), e))
        }
    }
}

/// The answer to a request Kafka did not take.
fn refused_by_kafka(app: &str, events: usize, e: BusError) -> ApiError {
    match e {
        BusError::TooLarge(n) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request's events encode to {n} bytes, more than Kafka accepts"),
        ),
        e => {
            warn!(%app, events, error = %e, "ingest refused: Kafka unavailable");
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kafka_unavailable",
                    "events could not be made durable; none were accepted, retry later",
                )
            }
        }
    }
}

/// A request's body decoded (gzip) and parsed by its API's rules: its events, the write
/// key its body names (the SDKs' APIs) and its decoded size.
fn decode_and_parse<S>(
    state: &Ingest<S>,
    headers: &HeaderMap,
    bytes: bytes::Bytes,
    api: Api,
    format: BodyFormat,
    limit: usize,
    now_ms: i64,
) -> Result<(Vec<WireEvent>, Option<String>, u64), ApiError> {
    let bytes = match api {
        Api::PostHog { gzip: true } => encoding::gunzip(&bytes, limit)?,
        _ => encoding::decode(headers, bytes, limit)?,
    };
    let new_id = || uuid::Uuid::now_v7().to_string();
    let (events, body_key) = match api {
        Api::Events => (
            envelope::parse_body(&bytes, format, &state.limits, now_ms, new_id)?,
            None,
        ),
        Api::Segment(call) => {
            let parsed = segment::parse(&bytes, call, &state.limits, now_ms, new_id)?;
            (parsed.events, parsed.write_key)
        }
        Api::PostHog { .. } => {
            let parsed = sdk::posthog::parse(&bytes, &state.limits, now_ms, new_id)?;
            (parsed.events, parsed.write_key)
        }
    };
    Ok((events, body_key, bytes.len() as u64))
}

async fn readyz<S: Sink>(State(state): State<Arc<Ingest<S>>>) -> Response {
    let ready = {
        // One probe at a time; the callers meanwhile wait for its answer.
        let mut last = state.ready.lock().await;
        match *last {
            Some((at, ready)) if at.elapsed() < READY_CACHE => ready,
            _ => {
                let ready = state.sink.is_ready().await;
                *last = Some((std::time::Instant::now(), ready));
                ready
            }
        }
    };
    if ready {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "kafka_unavailable",
                "Kafka does not answer",
            )
        }
        .into_response()
    }
}

/// The HTTP layer alone, without a socket (`tower::ServiceExt::oneshot`), with a sink
/// that records what it would have sent. The real Kafka path is in `tests/ingest.rs`.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    const KEY: &str = "wk_unit_test_key_0001";

    #[derive(Default)]
    struct Recorder {
        records: Mutex<Vec<(IngestRecord, String)>>,
        probes: std::sync::atomic::AtomicUsize,
    }

    impl Sink for Arc<Recorder> {
        async fn send(&self, record: IngestRecord, key: String) -> Result<(), BusError> {
            self.records.lock().unwrap().push((record, key));
            Ok(())
        }

        async fn is_ready(&self) -> bool {
            self.probes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        }
    }

    fn router(cors: &[&str]) -> (Router, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let keys = HashMap::from([(KEY.to_owned(), "unit".to_owned())]);
        let state = Arc::new(Ingest::new(
            &IngestConfig::default(),
            keys,
            recorder.clone(),
        ));
        let cors: Vec<String> = cors.iter().map(|s| s.to_string()).collect();
        (app(state, &cors), recorder)
    }

    fn post() -> axum::http::request::Builder {
        Request::post("/v1/events")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_TYPE, "application/json")
    }

    async fn json_body(resp: Response) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_accepted_request_is_one_record_keyed_by_the_first_user() {
        let (app, recorder) = router(&[]);
        let body = r#"[{"name":"a","user_id":"u7"},{"name":"b","event_id":"e2"}]"#;
        let resp = app
            .oneshot(post().body(Body::from(body)).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let answer = json_body(resp).await;
        assert_eq!(answer["accepted"], 2);
        assert_eq!(answer["event_ids"][1], "e2");
        let records = recorder.records.lock().unwrap();
        assert_eq!(records.len(), 1);
        let (record, key) = &records[0];
        assert_eq!((record.app.as_str(), key.as_str()), ("unit", "u7"));
        assert_eq!(record.events.len(), 2);
    }

    #[tokio::test]
    async fn a_refused_request_never_reaches_the_sink() {
        let (app, recorder) = router(&[]);
        let body = r#"{"name":"a","extra":1}"#;
        let resp = app
            .clone()
            .oneshot(post().body(Body::from(body)).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json_body(resp).await["error"]["field"], "extra");
        // A declared length over the limit is refused before the body is read.
        let resp = app
            .oneshot(
                post()
                    .header(header::CONTENT_LENGTH, (2 << 20).to_string())
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(recorder.records.lock().unwrap().is_empty());
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[tokio::test]
    async fn a_gzip_body_is_accepted_as_sent_and_a_bomb_is_413() {
        let (app, recorder) = router(&[]);
        let body = gzip(br#"[{"name":"a","event_id":"g1"},{"name":"b","event_id":"g2"}]"#);
        let resp = app
            .clone()
            .oneshot(
                post()
                    .header(header::CONTENT_ENCODING, "gzip")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(json_body(resp).await["event_ids"], json!(["g1", "g2"]));
        // 8 MiB of spaces inside a JSON array: a few KiB on the wire, over the 1 MiB
        // limit once inflated.
        let mut bomb = b"[".to_vec();
        bomb.resize(8 << 20, b' ');
        bomb.push(b']');
        let resp = app
            .oneshot(
                post()
                    .header(header::CONTENT_ENCODING, "gzip")
                    .body(Body::from(gzip(&bomb)))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json_body(resp).await["error"]["code"], "body_too_large");
        assert_eq!(recorder.records.lock().unwrap().len(), 1);
    }

    /// The name and id of every event the recorder was sent, in order.
    fn names_and_ids<K>(records: &[(IngestRecord, K)]) -> Vec<(&str, &str)> {
        records
            .iter()
            .flat_map(|(r, _)| {
                r.events
                    .iter()
                    .map(|e| (e.name.as_str(), e.event_id.as_str()))
            })
            .collect()
    }

    #[tokio::test]
    async fn segment_clients_authenticate_as_they_do_and_get_segments_answer() {
        use base64::Engine as _;
        let (app, recorder) = router(&[]);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"));
        let batch = r#"{"batch": [{"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1"}]}"#;
        let send = |path: &str, auth: Option<String>, body: String| {
            let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
            if let Some(auth) = auth {
                req = req.header(header::AUTHORIZATION, auth);
            }
            app.clone().oneshot(req.body(Body::from(body)).unwrap())
        };
        // Basic base64(key:), as analytics-node sends it.
        let resp = send("/v1/batch", Some(format!("Basic {basic}")), batch.into())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(json_body(resp).await, json!({"success": true}));
        // The key in the body only, as analytics-python sends it.
        let body = format!(
            r#"{{"writeKey": "{KEY}", "batch": [{{"type": "identify", "userId": "u1", "messageId": "m2"}}]}}"#
        );
        let resp = send("/v1/import", None, body).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // weir's Bearer key, on a single call, gzip-compressed.
        let resp = app
            .clone()
            .oneshot(
                Request::post("/v1/page")
                    .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
                    .header(header::CONTENT_ENCODING, "gzip")
                    .body(Body::from(gzip(
                        br#"{"anonymousId": "a1", "name": "Home", "messageId": "m3"}"#,
                    )))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // No key anywhere, a wrong one, a malformed header: 401, nothing sent.
        for auth in [
            None,
            Some("Basic d3JvbmdrZXk6".to_owned()),
            Some("Basic !!".to_owned()),
        ] {
            let resp = send("/v1/batch", auth.clone(), batch.into()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        }
        // A bad message is a 400 (the SDKs do not retry it) naming message and field.
        let resp = send(
            "/v1/track",
            Some(format!("Basic {basic}")),
            r#"{"userId": "u"}"#.into(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e = json_body(resp).await;
        assert_eq!(
            (e["error"]["index"].clone(), e["error"]["field"].clone()),
            (json!(0), json!("event"))
        );
        // Where Segment's and RudderStack's SDKs read an error (RudderStack's retries
        // one without them).
        assert_eq!(
            (&e["success"], &e["code"], &e["message"]),
            (&json!(false), &e["error"]["code"], &e["error"]["message"])
        );
        let records = recorder.records.lock().unwrap();
        assert_eq!(
            names_and_ids(&records),
            [
                ("order_completed", "m1"),
                ("identify", "m2"),
                ("page", "m3")
            ]
        );
        assert!(records.iter().all(|(r, _)| r.app == "unit"));
    }

    #[tokio::test]
    async fn posthog_clients_send_their_key_in_the_body_and_get_posthogs_answer() {
        let (app, recorder) = router(&[]);
        let send = |path: &str, body: Vec<u8>| {
            app.clone().oneshot(
                Request::post(path)
                    .header(header::CONTENT_TYPE, "text/plain")
                    .body(Body::from(body))
                    .unwrap(),
            )
        };
        // posthog-python: a batch with api_key beside it.
        let batch = format!(
            r#"{{"api_key": "{KEY}", "batch": [{{"event": "$pageview", "distinct_id": "d1", "uuid": "p1"}}]}}"#
        );
        let resp = send("/batch/", batch.into_bytes()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(json_body(resp).await, json!({"status": 1}));
        // posthog-js: an array, the token in properties, gzip said in the query.
        let js = format!(
            r#"[{{"event": "clicked", "uuid": "p2", "properties": {{"distinct_id": "d2", "token": "{KEY}"}}}}]"#
        );
        let resp = send("/e/?compression=gzip-js&ver=1.0", gzip(js.as_bytes()))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // Without the trailing slash too; an unknown compression is 415; no key, 401.
        let one =
            format!(r#"{{"token": "{KEY}", "event": "e", "distinct_id": "d", "uuid": "p3"}}"#);
        let resp = send("/i/v0/e", one.clone().into_bytes()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = send("/e/?compression=lz64", one.into_bytes())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let resp = send(
            "/capture/",
            br#"{"event": "e", "distinct_id": "d"}"#.to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            names_and_ids(&recorder.records.lock().unwrap()),
            [("pageview", "p1"), ("clicked", "p2"), ("e", "p3")]
        );
    }

    #[tokio::test]
    async fn browsers_get_cors_preflight_answers_for_configured_origins_only() {
        let (app, _) = router(&["https://app.example.com"]);
        let preflight = |origin: &str| {
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/v1/events")
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .header(
                    header::ACCESS_CONTROL_REQUEST_HEADERS,
                    "authorization,content-type",
                )
                .body(Body::empty())
                .unwrap()
        };
        let resp = app
            .clone()
            .oneshot(preflight("https://app.example.com"))
            .await
            .unwrap();
        assert!(resp.status().is_success());
        assert_eq!(
            resp.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        let resp = app
            .oneshot(preflight("https://evil.example.net"))
            .await
            .unwrap();
        assert!(
            resp.headers()
                .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .is_none()
        );
    }

    #[tokio::test]
    async fn readiness_asks_the_broker_at_most_once_a_second() {
        let (app, recorder) = router(&[]);
        let calls = (0..50).map(|_| {
            app.clone()
                .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        });
        for resp in futures::future::join_all(calls).await {
            assert_eq!(resp.unwrap().status(), StatusCode::OK);
        }
        let probes = || recorder.probes.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(probes(), 1);
        tokio::time::sleep(READY_CACHE + Duration::from_millis(50)).await;
        let resp = app
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(probes(), 2);
    }

    #[tokio::test]
    async fn over_quota_is_answered_429_with_retry_after_and_sends_nothing() {
        let recorder = Arc::new(Recorder::default());
        let keys = HashMap::from([(KEY.to_owned(), "unit".to_owned())]);
        let quota = quota::Quota {
            events_per_sec: Some(10),
            bytes_per_sec: None,
            burst_secs: 1,
        };
        let key_list = vec![KEY.to_owned()];
        let quotas = quota::Quotas::new([("unit", Some(&quota), None, key_list.as_slice())]);
        let state =
            Ingest::new(&IngestConfig::default(), keys, recorder.clone()).with_quotas(quotas);
        let app = app(Arc::new(state), &[]);
        let batch = |n: usize| {
            let events: Vec<_> = (0..n)
                .map(|i| json!({"name": "a", "event_id": format!("e{i}")}))
                .collect();
            post()
                .body(Body::from(serde_json::to_vec(&events).unwrap()))
                .unwrap()
        };
        // 30 events: admitted (the bucket was full), then 2 s of debt at 10/s.
        let resp = app.clone().oneshot(batch(30)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let resp = app.clone().oneshot(batch(1)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let error = &json_body(resp).await["error"];
        assert_eq!(error["code"], "rate_limited");
        assert_eq!(
            error["message"],
            "over the app's quota of 10 events/s; retry in 2 s"
        );
        assert_eq!(recorder.records.lock().unwrap().len(), 1);
        let throttled = crate::metrics::INGEST_THROTTLED
            .with_label_values(&["unit", "app_events"])
            .get();
        assert!(throttled >= 1);
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_answered_408() {
        let recorder = Arc::new(Recorder::default());
        let keys = HashMap::from([(KEY.to_owned(), "unit".to_owned())]);
        let cfg = IngestConfig {
            body_timeout_ms: 200,
            ..IngestConfig::default()
        };
        let app = app(Arc::new(Ingest::new(&cfg, keys, recorder.clone())), &[]);
        use futures::StreamExt as _;
        // A body whose first bytes come and whose rest never does.
        let stream =
            futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"[{"))])
                .chain(futures::stream::pending());
        let started = std::time::Instant::now();
        let resp = app
            .oneshot(post().body(Body::from_stream(stream)).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(json_body(resp).await["error"]["code"], "body_timeout");
        assert!(recorder.records.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn metrics_are_served_on_loopback_and_where_asked_only() {
        let public = || IngestConfig {
            listen: "0.0.0.0:8080".parse().unwrap(),
            ..IngestConfig::default()
        };
        for (cfg, served) in [
            (IngestConfig::default(), true),
            (public(), false),
            (
                IngestConfig {
                    metrics: MetricsOnIngest::Yes,
                    ..public()
                },
                true,
            ),
            (
                IngestConfig {
                    metrics: MetricsOnIngest::No,
                    ..IngestConfig::default()
                },
                false,
            ),
        ] {
            let state = Ingest::new(&cfg, HashMap::new(), Arc::new(Recorder::default()));
            let resp = app(Arc::new(state), &[])
                .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
                .await
                .unwrap();
            if served {
                assert_eq!(resp.status(), StatusCode::OK, "{cfg:?}");
                let text = resp.into_body().collect().await.unwrap().to_bytes();
                assert!(String::from_utf8_lossy(&text).contains("weir_ingest_requests_total"));
            } else {
                assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{cfg:?}");
            }
        }
    }
}
