//! `weir serve`: starts ingest and the processor from a configuration, and stops them
//! cleanly on SIGINT/SIGTERM (ingest stops accepting, the processor flushes and
//! commits, the producer drains).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::bus::{self, Producer};
use crate::config::{Config, DEV_WRITE_KEY};
use crate::ingest::{self, Counters, Ingest};
use crate::pipeline::route::Routes;
use crate::pipeline::{Pipeline, worker::Worker};
use crate::runtime::Runtime;
use crate::sinks::clickhouse::{ClickHouseError, ClickHouseSink};
use crate::sinks::counters::{CounterReader, CounterSink};
use crate::sinks::topic::TopicSink;
use crate::sinks::webhook::WebhookSink;

/// Runs weir until `shutdown` resolves.
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
    let worker = if config.processor.enabled {
        let runtime = Runtime::new().context("cannot start the WebAssembly runtime")?;
        let pipeline = Pipeline::load(
            &runtime,
            &config.pipeline,
            config.processor.plugin_batch_size,
        )
        .await
        .context("cannot load the pipeline")?;
        let routes = pipeline.routes().clone();
        let sink = ClickHouseSink::new(&config.clickhouse, routes.clone());
        // A table that does not match the pipeline is a configuration error; an
        // unreachable ClickHouse is an outage: ingest must come up regardless, and the
        // processor creates the tables before its first write.
        match sink.ensure_schema().await {
            Ok(()) => {}
            Err(e @ ClickHouseError::Schema(_)) => return Err(e.into()),
            Err(e) => warn!(
                error = %e,
                url = %config.clickhouse.url,
                "ClickHouse is unreachable; starting anyway: the processor creates its tables before the first write and holds its events until then"
            ),
        }
        let consumer = bus::consumer(&config.kafka).context("cannot create the Kafka consumer")?;
        let counters = if routes.counters.is_empty() {
            None
        } else {
            Some(
                CounterSink::new(
                    &config.redis,
                    &config.kafka.group,
                    &config.kafka.topic,
                    routes,
                )
                .context("cannot set up the Redis counter sink")?,
            )
        };
        let mut topics = Vec::new();
        for (i, t) in config.pipeline.topics.iter().enumerate() {
            bus::ensure_named_topic(&config.kafka, &t.topic)
                .await
                .with_context(|| format!("cannot create topic {} of sink {}", t.topic, t.name))?;
            topics.push(TopicSink::new(t, i, &config.kafka)?);
        }
        let mut webhooks = Vec::new();
        for (i, w) in config.pipeline.webhooks.iter().enumerate() {
            webhooks.push(
                WebhookSink::start(w, i, sink.clone(), config.pipeline.name.clone())
                    .map_err(anyhow::Error::msg)?,
            );
        }
        let worker = Worker::new(
            consumer,
            config.kafka.topic.clone(),
            pipeline,
            sink,
            counters,
            config.processor.clone(),
        )
        .with_webhooks(webhooks)
        .with_topics(topics);
        Some(tokio::spawn(worker.run(stop_rx.clone())))
    } else {
        None
    };

    let producer = Producer::new(&config.kafka).context("cannot create the Kafka producer")?;
    let mut ingest = Ingest::new(&config.ingest, keys, producer.clone());
    if !config.pipeline.counters.is_empty() {
        let routes = Routes::new(&config.pipeline).map_err(anyhow::Error::msg)?;
        ingest = ingest.with_counters(Counters {
            read_keys: config.read_keys(),
            routes: Arc::new(routes),
            reader: CounterReader::new(&config.redis)
                .context("cannot set up the Redis counter reader")?,
        });
    }
    let state = Arc::new(ingest);
    let router = ingest::app(state, &config.ingest.cors_origins);
    let listener = tokio::net::TcpListener::bind(config.ingest.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.ingest.listen))?;
    info!(addr = %config.ingest.listen, "ingest listening");

    let mut http_stop = stop_rx.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = http_stop.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(30), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "ingest server error"),
        Ok(Err(e)) => warn!(error = %e, "ingest server task failed"),
        Err(_) => warn!("ingest did not drain within 30 s"),
    }
    producer.flush(Duration::from_secs(10));
    if let Some(worker) = worker
        && tokio::time::timeout(Duration::from_secs(30), worker)
            .await
            .is_err()
    {
        warn!("processor did not stop within 30 s");
    }
    info!("stopped");
    Ok(())
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
