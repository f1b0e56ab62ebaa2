//! `weir serve`: starts ingest and the processor from a configuration, and stops them
//! cleanly on SIGINT/SIGTERM (ingest stops accepting, the processor flushes and
//! commits, the producer drains).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::metrics::events::{InternalEvent, PartStopped};

use crate::bus::{self, Producer};
use crate::config::{Config, DEV_ADMIN_TOKEN, DEV_WRITE_KEY};
use crate::control::Control;
use crate::control::admin::{self, Admin};
use crate::control::agent::{Agent, Preparer};
use crate::control::dead_letters::DeadLetters;
use crate::control::store::Store;
use crate::ingest::{self, CounterSource, Counters, Ingest};
use crate::model::Counter;
use crate::pipeline::Shape;
use crate::pipeline::dedup::{Dedup, RedisMarks};
use crate::pipeline::route::Routes;
use crate::pipeline::worker::{Running, SharedRoutes, Worker};
use crate::runtime::Runtime;
use crate::sinks::clickhouse::{ClickHouseError, ClickHouseSink, ClickHouseWriter};
use crate::sinks::counters::{CounterReader, CounterSink};
use crate::sinks::topic::TopicSink;
use crate::sinks::webhook::WebhookSink;
use crate::sinks::{DeliveryMarks, Sink};

/// Runs weir until `shutdown` resolves.
/// The admin port's bounds: a few operators and the CLI, never the public.
const ADMIN_LIMITS: crate::http::ServerLimits = crate::http::ServerLimits {
    max_connections: 256,
    header_timeout: Duration::from_secs(10),
};

/// Open files weir needs besides its HTTP connections (Kafka, ClickHouse, Redis, the
/// control-plane store, logs).
const RESERVED_FILES: u64 = 512;

pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let keys = config.write_keys();
    if keys.is_empty() {
        warn!("no [[app]] with write keys configured: every POST /v1/events will get 401");
    }
    if keys.contains_key(DEV_WRITE_KEY) {
        warn!(
            write_key = DEV_WRITE_KEY,
            "using the DEVELOPMENT write key; set your own for production"
        );
    }

    bus::ensure_topic(&config.kafka).await.with_context(|| {
        format!(
            "cannot reach Kafka at {} to create topic {}",
            config.kafka.brokers, config.kafka.topic
        )
    })?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let runtime = Runtime::new().context("cannot start the WebAssembly runtime")?;
    let routes = Arc::new(Routes::new(&config.pipeline)?);
    let store = Store::open(&config.control, &config.redis)
        .context("cannot open the control-plane store")?;
    let id = instance_id();
    let preparer = Preparer::new(
        store.clone(),
        runtime.clone(),
        config.pipeline.clone(),
        routes.clone(),
        Shape::of(&config.processor),
    );
    let (mut agent, pipeline) = Agent::start(
        store.clone(),
        config.control.clone(),
        preparer,
        id.clone(),
        config.processor.enabled,
    )
    .await
    .context("cannot load the pipeline")?;
    info!(instance = %id, store = %store.describe(), "control plane read");
    // The tables and counters of the pipeline in force (the file's, or the control
    // plane's version): the processor replaces them on a swap, the counters API reads them.
    let shared_routes: SharedRoutes = Arc::new(std::sync::RwLock::new(
        pipeline
            .as_ref()
            .map_or(routes.clone(), |p| p.routes().clone()),
    ));
    let worker = match pipeline {
        Some(pipeline) => {
            let sink = ClickHouseSink::new(&config.clickhouse, pipeline.routes().tables.clone());
            // A table that does not match the pipeline is a configuration error; an
            // unreachable ClickHouse is an outage: ingest must come up regardless, and the
            // processor creates the tables before its first write.
            match sink.ensure_schema().await {
                Ok(()) => {}
                Err(e @ ClickHouseError::Schema(_)) => return Err(e.into()),
                Err(e) => warn!(
                    error = %e,
                    url = %crate::model::redact_url(&config.clickhouse.url),
                    "ClickHouse is unreachable; starting anyway: the processor creates its tables before the first write and holds its events until then"
                ),
            }
            let consumer =
                bus::consumer(&config.kafka).context("cannot create the Kafka consumer")?;
            // What counters and delivery marks stored in Redis is checked against each
            // partition's log (a topic created again starts at offset 0 again).
            let log_probe = Arc::new(bus::LogProbe::new(&config.kafka));
            // Every sink the worker writes, driven through one contract.
            let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(ClickHouseWriter::new(sink.clone()))];
            // Connects to Redis on first use: only once a pipeline version counts.
            sinks.push(Box::new(
                CounterSink::new(
                    &config.redis,
                    &config.kafka.group,
                    &config.kafka.topic,
                    Duration::from_millis(config.processor.retry_backoff_ms),
                    Arc::new(sink.clone()),
                )
                .context("cannot set up the Redis counter sink")?
                .with_log_probe(log_probe.clone()),
            ));
            // What webhooks and topic sinks delivered, so that a replay does not
            // deliver it again: kept with the deduplication's state.
            let marks: Option<Arc<dyn DeliveryMarks>> = if config.dedup.enabled {
                Some(Arc::new(
                    RedisMarks::new(
                        &config.redis,
                        &config.dedup,
                        &config.kafka.group,
                        &config.kafka.topic,
                    )
                    .context("cannot set up delivery marks in Redis")?
                    .with_log_probe(log_probe.clone()),
                ))
            } else {
                None
            };
            for (i, t) in config.pipeline.topics.iter().enumerate() {
                bus::ensure_named_topic(&config.kafka, &t.topic)
                    .await
                    .with_context(|| {
                        format!("cannot create topic {} of sink {}", t.topic, t.name)
                    })?;
                sinks.push(Box::new(TopicSink::new(
                    t,
                    i,
                    &config.kafka,
                    Arc::new(sink.clone()),
                    marks.clone(),
                )?));
            }
            for (i, w) in config.pipeline.webhooks.iter().enumerate() {
                sinks.push(Box::new(
                    WebhookSink::start(
                        w,
                        i,
                        Arc::new(sink.clone()),
                        marks.clone(),
                        config.pipeline.name.clone(),
                    )
                    .map_err(anyhow::Error::msg)?,
                ));
            }
            let (swap_tx, swap_rx) = mpsc::channel(4);
            let (running_tx, running_rx) = watch::channel(Running::of(&pipeline));
            agent = agent.with_processor(swap_tx, running_rx, sink.clone());
            let worker = Worker::new(
                consumer,
                config.kafka.topic.clone(),
                pipeline,
                sinks,
                config.processor.clone(),
            )
            .with_control(swap_rx, running_tx, shared_routes.clone());
            let worker = if config.dedup.enabled {
                worker.with_dedup(
                    Dedup::new(
                        &config.redis,
                        &config.dedup,
                        &config.kafka.group,
                        Duration::from_millis(config.processor.retry_backoff_ms),
                    )
                    .context("cannot set up deduplication in Redis")?,
                )
            } else {
                warn!("dedup.enabled = false: events a client sends twice are written twice");
                worker
            };
            Some(tokio::spawn(worker.run(stop_rx.clone())))
        }
        None => None,
    };
    let agent = tokio::spawn(agent.run(stop_rx.clone()));

    let producer = Producer::new(&config.kafka).context("cannot create the Kafka producer")?;
    let admin_server = match &config.admin {
        Some(admin_cfg) => {
            if admin_cfg.tokens.iter().any(|t| t == DEV_ADMIN_TOKEN) {
                warn!(
                    admin_token = DEV_ADMIN_TOKEN,
                    "using the DEVELOPMENT admin token; set your own for production"
                );
            }
            let control = Control::new(store.clone(), runtime.clone(), admin_cfg.max_plugin_bytes);
            let app_keys = config
                .write_keys()
                .into_keys()
                .chain(config.read_keys().into_keys())
                .collect();
            let state = Arc::new(Admin {
                control,
                tokens: admin_cfg.tokens.iter().cloned().collect(),
                app_keys,
                max_plugin_bytes: admin_cfg.max_plugin_bytes,
                body_timeout: Duration::from_millis(admin_cfg.body_timeout_ms),
                instance_ttl: Duration::from_millis(config.control.instance_ttl_ms),
                dry_runs: Arc::new(tokio::sync::Semaphore::new(1)),
                dead_letters: DeadLetters {
                    sink: ClickHouseSink::new(&config.clickhouse, routes.tables.clone()),
                    producer: producer.clone(),
                },
            });
            let listener = tokio::net::TcpListener::bind(admin_cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {} (admin)", admin_cfg.listen))?;
            info!(addr = %admin_cfg.listen, "admin API listening");
            let mut stop = stop_rx.clone();
            let server = crate::http::serve(
                "admin",
                listener,
                admin::app(state),
                ADMIN_LIMITS,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            );
            Some(tokio::spawn(server))
        }
        None => None,
    };

    let mut ingest =
        Ingest::new(&config.ingest, keys, producer.clone()).with_quotas(config.quotas());
    ingest = ingest.with_counters(Counters {
        read_keys: config.read_keys(),
        source: Arc::new(RedisCounters {
            routes: shared_routes,
            reader: CounterReader::new(&config.redis)
                .context("cannot set up the Redis counter reader")?,
        }),
    });
    let state = Arc::new(ingest);
    let router = ingest::app(state, &config.ingest.cors_origins);
    let listener = tokio::net::TcpListener::bind(config.ingest.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.ingest.listen))?;
    info!(addr = %config.ingest.listen, metrics = config.ingest.serves_metrics(), "ingest listening");
    if !config.ingest.serves_metrics() && config.admin.is_none() {
        warn!(
            "GET /metrics is served nowhere: the ingest port listens beyond loopback (ingest.metrics = \"auto\") and there is no [admin] port; add one, or set ingest.metrics = \"yes\" to expose the metrics publicly"
        );
    }

    let limits = config.ingest.server_limits();
    let wanted = (limits.max_connections + ADMIN_LIMITS.max_connections) as u64 + RESERVED_FILES;
    match crate::http::raise_open_files_limit(wanted) {
        Ok(limit) if limit < wanted => warn!(
            limit,
            wanted,
            "the open-files limit (ulimit -n, hard) is below ingest.max_connections plus what weir needs for itself: at the limit, accepting fails instead of answering 503; raise it or lower ingest.max_connections"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    let mut http_stop = stop_rx.clone();
    let server = tokio::spawn(crate::http::serve(
        "ingest",
        listener,
        router,
        limits,
        async move {
            let _ = http_stop.wait_for(|s| *s).await;
        },
    ));

    // Every part runs until the shutdown signal; one that ends before it (a panic, a
    // bug) stops the whole process with an error, so that its supervisor restarts it,
    // rather than leave ingest answering 202 with nothing processing behind it.
    let (mut worker, mut agent, mut server) = (worker, Some(agent), Some(server));
    let failed = tokio::select! {
        _ = shutdown => None,
        ended = finished(&mut worker) => Some(("the processor", ended)),
        ended = finished(&mut agent) => Some(("the control agent", ended)),
        ended = finished(&mut server) => Some(("the ingest server", ended)),
    };
    let failed = failed.map(|(part, ended)| {
        let why = match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) => describe_join_error(e),
        };
        PartStopped { part, why: &why }.emit();
        anyhow::anyhow!("{part} stopped unexpectedly ({why})")
    });
    info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(server) = server {
        match tokio::time::timeout(Duration::from_secs(30), server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "ingest server task failed"),
            Err(_) => warn!("ingest did not drain within 30 s"),
        }
    }
    producer.flush(Duration::from_secs(10));
    if let Some(worker) = worker
        && tokio::time::timeout(Duration::from_secs(30), worker)
            .await
            .is_err()
    {
        warn!("processor did not stop within 30 s");
    }
    if let Some(admin) = admin_server {
        let _ = tokio::time::timeout(Duration::from_secs(5), admin).await;
    }
    if let Some(agent) = agent {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    }
    info!("stopped");
    failed.map_or(Ok(()), Err)
}

/// Waits for the task in `handle` to end (never, if there is none), and takes it.
async fn finished<T>(
    handle: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    let ended = match handle {
        Some(h) => h.await,
        None => std::future::pending().await,
    };
    *handle = None;
    ended
}

/// A panic's message, or why else the task ended.
fn describe_join_error(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("panicked: {message}")
}

/// The counters API's source: the counters of the pipeline in force (replaced by the
/// processor on a swap), read from Redis.
struct RedisCounters {
    routes: SharedRoutes,
    reader: CounterReader,
}

impl CounterSource for RedisCounters {
    fn counter(&self, name: &str) -> Option<Counter> {
        let routes = self.routes.read().expect("routes lock").clone();
        routes.counter(name).cloned()
    }

    fn read<'a>(
        &'a self,
        app: &'a str,
        counter: &'a str,
        key: &'a str,
        days: u32,
    ) -> futures::future::BoxFuture<
        'a,
        Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>>,
    > {
        Box::pin(async move {
            let value = self.reader.get(app, counter, key, days).await?;
            Ok(serde_json::to_value(value)?)
        })
    }
}

/// A name for this instance in the control plane's status: host, process, and a
/// random suffix (a restarted process is a new instance).
fn instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weir".into());
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &random[random.len() - 6..]
    )
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
