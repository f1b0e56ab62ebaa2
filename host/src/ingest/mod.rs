//! The HTTP ingest endpoint: `POST /v1/events`.
//!
//! It checks the envelope only (see [`envelope`]), writes the whole request to Kafka
//! as one record, and answers 202 only once Kafka acknowledged it. It never waits on
//! the processor.

mod config;
pub mod envelope;

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
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::warn;

use crate::bus::{BusError, Producer};
use crate::model::Counter;
use crate::model::IngestRecord;
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
            ready: tokio::sync::Mutex::new(None),
        }
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
    let mut router = Router::new()
        .route("/v1/events", post(post_events::<S>))
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
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
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
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(i) = self.index {
            error["index"] = json!(i);
        }
        if let Some(f) = self.field {
            error["field"] = json!(f);
        }
        let mut resp = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn authenticate<'a, S>(state: &'a Ingest<S>, headers: &HeaderMap) -> Result<&'a str, ApiError> {
    let key = bearer(headers, "write key")?;
    state.keys.get(key).map(String::as_str).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown write key",
        )
    })
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
) -> Response {
    let started = std::time::Instant::now();
    let response = match accept(&state, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
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
) -> Result<Response, ApiError> {
    let app = authenticate(state, headers)?.to_owned();
    let format = body_format(headers)?;
    let bytes = read_body(body, headers, state.max_body_bytes, state.body_timeout).await?;
    let now_ms = crate::model::now_ms();
    let events = envelope::parse_body(&bytes, format, &state.limits, now_ms, || {
        uuid::Uuid::now_v7().to_string()
    })?;
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
            Ok((
                StatusCode::ACCEPTED,
                axum::Json(json!({ "accepted": event_ids.len(), "event_ids": event_ids })),
            )
                .into_response())
        }
        Err(BusError::TooLarge(n)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request's events encode to {n} bytes, more than Kafka accepts"),
        )),
        Err(e) => {
            warn!(%app, events = event_ids.len(), error = %e, "ingest refused: Kafka unavailable");
            Err(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kafka_unavailable",
                    "events could not be made durable; none were accepted, retry later",
                )
            })
        }
    }
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
