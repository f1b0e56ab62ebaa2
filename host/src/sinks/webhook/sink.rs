use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::config::WebhookConfig;
use crate::metrics::events::{
    InternalEvent, ReplayedDeliveriesSkipped, WebhookAttemptFailed, WebhookGaveUp,
};
use crate::model::{DeadLetter, Kept, Origin, Stage, Target};
use crate::sinks::{
    BoxError, DeadLetterStore, DeliveryMarks, Flush, Marks, Refusal, Sink, highest,
};

/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One event waiting for delivery.
struct Item {
    origin: Origin,
    event_id: String,
    app: String,
    name: String,
    json: String,
    /// The control-plane version of the pipeline that kept the event.
    control_version: u64,
    /// Its partition's assignment when it was queued (see [`Held::epochs`]).
    epoch: u64,
}

/// What the sink and its delivery task share.
#[derive(Default)]
struct Held {
    /// Per partition, offset -> events of that offset not yet delivered or
    /// dead-lettered.
    outstanding: HashMap<i32, BTreeMap<i64, usize>>,
    /// Per partition, how many times a rebalance took it away: a queued event of an
    /// earlier assignment is not delivered (its partition's new owner delivers it).
    epochs: HashMap<i32, u64>,
}

impl Held {
    fn epoch(&self, partition: i32) -> u64 {
        self.epochs.get(&partition).copied().unwrap_or(0)
    }
}

type Outstanding = Arc<Mutex<Held>>;

/// A running webhook: the queue into its delivery task.
pub struct WebhookSink {
    name: String,
    /// Position among the pipeline's webhooks (what plugins' `forward` outputs name).
    index: usize,
    events: HashSet<String>,
    tx: mpsc::Sender<Item>,
    outstanding: Outstanding,
    /// What this webhook delivered before a crash or a rebalance.
    marks: Marks,
    /// Events taken while the queue was full, waiting for room (never blocking the
    /// processor: it keeps polling Kafka, and takes no new batch while this holds any).
    overflow: VecDeque<Item>,
    /// When to try moving `overflow` into the queue again.
    next_move: Option<Instant>,
}

/// How soon the worker tries again to move overflow into a full queue.
const OVERFLOW_RETRY: Duration = Duration::from_millis(50);

impl WebhookSink {
    /// Starts the delivery task. Dead letters are written through `dead_letters`;
    /// deliveries are marked in `marks` (none: a replay delivers again).
    pub fn start(
        cfg: &WebhookConfig,
        index: usize,
        dead_letters: Arc<dyn DeadLetterStore>,
        marks: Option<Arc<dyn DeliveryMarks>>,
        pipeline: String,
    ) -> Result<Self, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("webhook {}: header name {k:?}: {e}", cfg.name))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| format!("webhook {}: header {k}: {e}", cfg.name))?;
            headers.insert(name, value);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            // A redirect would carry the configured headers (secrets, often) to another
            // address: it is answered as a refusal instead (see `Delivery::post`).
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .user_agent(concat!("weir/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhook {}: {e}", cfg.name))?;
        let (tx, rx) = mpsc::channel(cfg.max_pending);
        let outstanding = Outstanding::default();
        let marks = Marks::new(marks, format!("webhook:{}", cfg.name));
        let task = Delivery {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            batch_size: cfg.batch_size,
            max_attempts: cfg.max_attempts,
            backoff: Duration::from_millis(cfg.retry_backoff_ms),
            http,
            outstanding: outstanding.clone(),
            dead_letters,
            marks: marks.store(),
            pipeline,
        };
        tokio::spawn(task.run(rx));
        Ok(Self {
            name: cfg.name.clone(),
            index,
            events: cfg.events.iter().cloned().collect(),
            tx,
            outstanding,
            marks,
            overflow: VecDeque::new(),
            next_move: None,
        })
    }

    /// True for a kept event this webhook takes (by name, or forwarded to it by a
    /// plugin).
    fn takes(&self, k: &Kept) -> bool {
        self.events.contains(&k.event.name) || k.forwards.contains(&Target::Webhook(self.index))
    }

    /// Queues the kept events this webhook takes, less those it delivered before (a
    /// replay: their partition's mark, loaded first, is past them); what the full
    /// queue has no room for waits in `overflow`.
    fn offer(&mut self, kept: &[Kept], control_version: u64) {
        let mut replayed = 0;
        for k in kept {
            if !self.takes(k) {
                continue;
            }
            if self.marks.delivered(k.origin.slot()) {
                replayed += 1;
                continue;
            }
            let epoch = {
                let mut held = self.outstanding.lock().expect("outstanding lock");
                *held
                    .outstanding
                    .entry(k.origin.partition)
                    .or_default()
                    .entry(k.origin.offset)
                    .or_default() += 1;
                held.epoch(k.origin.partition)
            };
            let item = Item {
                origin: k.origin,
                event_id: k.event.event_id.clone(),
                app: k.event.app.clone(),
                name: k.event.name.clone(),
                json: k.event.to_json(),
                control_version,
                epoch,
            };
            crate::metrics::WEBHOOK_PENDING
                .with_label_values(&[&self.name])
                .inc();
            self.overflow.push_back(item);
        }
        if replayed > 0 {
            ReplayedDeliveriesSkipped {
                sink: self.marks.sink(),
                events: replayed,
            }
            .emit();
        }
        self.move_overflow();
    }

    /// Moves waiting events into the delivery queue while it has room.
    fn move_overflow(&mut self) {
        self.next_move = None;
        while let Some(item) = self.overflow.pop_front() {
            match self.tx.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Full(item)) => {
                    self.overflow.push_front(item);
                    self.next_move = Some(Instant::now() + OVERFLOW_RETRY);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    // Its events stay outstanding: their partitions are not committed
                    // past them, and the next owner delivers them.
                    error!(webhook = %self.name, "webhook delivery task is gone");
                    self.overflow.clear();
                    return;
                }
            }
        }
    }
}

impl Sink for WebhookSink {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    /// Queues the flush's events for the delivery task without waiting for their
    /// delivery (what the full queue has no room for waits in the sink, which then
    /// says it is full). Fails only when the marks of a partition seen for the first
    /// time cannot be read; delivery problems end as dead letters.
    fn write<'a>(&'a mut self, flush: Flush<'a>) -> BoxFuture<'a, Result<Vec<Refusal>, BoxError>> {
        Box::pin(async move {
            let partitions: Vec<i32> = flush
                .batch
                .kept
                .iter()
                .filter(|k| self.takes(k))
                .map(|k| k.origin.partition)
                .collect();
            self.marks.load(partitions).await?;
            self.offer(&flush.batch.kept, flush.control_version);
            Ok(Vec::new())
        })
    }

    fn retry_at(&self) -> Option<Instant> {
        self.next_move
    }

    fn retry(&mut self) -> BoxFuture<'_, ()> {
        self.move_overflow();
        Box::pin(async {})
    }

    /// Events wait for room in the delivery queue (`max_pending`): no new batch.
    fn is_full(&self) -> bool {
        !self.overflow.is_empty()
    }

    /// The lowest offset of `partition` with events not yet delivered or
    /// dead-lettered.
    fn commit_limit(&self, partition: i32) -> Option<i64> {
        let held = self.outstanding.lock().expect("outstanding lock");
        held.outstanding
            .get(&partition)
            .and_then(|o| o.keys().next().copied())
    }

    /// Their new owner re-reads them, and delivers what this instance had not: queued
    /// events of these partitions are not delivered from now on.
    fn forget(&mut self, partitions: &HashSet<i32>) {
        let mut held = self.outstanding.lock().expect("outstanding lock");
        held.outstanding.retain(|p, _| !partitions.contains(p));
        for p in partitions {
            *held.epochs.entry(*p).or_default() += 1;
        }
        drop(held);
        self.marks.forget(partitions);
        let before = self.overflow.len();
        self.overflow
            .retain(|item| !partitions.contains(&item.origin.partition));
        if self.overflow.is_empty() {
            self.next_move = None;
        }
        crate::metrics::WEBHOOK_PENDING
            .with_label_values(&[&self.name])
            .sub((before - self.overflow.len()) as i64);
    }
}

/// The delivery task of one webhook.
struct Delivery {
    name: String,
    url: String,
    batch_size: usize,
    max_attempts: u32,
    backoff: Duration,
    http: reqwest::Client,
    outstanding: Outstanding,
    dead_letters: Arc<dyn DeadLetterStore>,
    /// Where deliveries are marked, and this webhook's name there.
    marks: Option<(Arc<dyn DeliveryMarks>, String)>,
    pipeline: String,
}

/// How one POST ended.
enum Answer {
    Delivered,
    /// Worth retrying (5xx, 408, 429, timeout, connection error).
    Retry(String),
    /// Not worth retrying (other 4xx).
    Refused(String),
}

impl Delivery {
    async fn run(self, mut rx: mpsc::Receiver<Item>) {
        let mut batch = Vec::with_capacity(self.batch_size);
        while rx.recv_many(&mut batch, self.batch_size).await > 0 {
            self.deliver(&batch).await;
            batch.clear();
        }
        info!(webhook = %self.name, "webhook delivery stopped");
    }

    /// Delivers `queued` (less the events of partitions taken away since they were
    /// queued), dead-letters it if the webhook refuses it or after `max_attempts`,
    /// marks it delivered, then lets its partitions' commits pass it.
    async fn deliver(&self, queued: &[Item]) {
        let batch: Vec<&Item> = {
            let held = self.outstanding.lock().expect("outstanding lock");
            queued
                .iter()
                .filter(|i| i.epoch == held.epoch(i.origin.partition))
                .collect()
        };
        crate::metrics::WEBHOOK_PENDING
            .with_label_values(&[&self.name])
            .sub((queued.len() - batch.len()) as i64);
        if batch.is_empty() {
            return;
        }
        let ids: Vec<&str> = batch.iter().map(|i| i.event_id.as_str()).collect();
        let key = if batch.len() == 1 {
            ids[0].to_owned()
        } else {
            hex::encode(Sha256::digest(ids.join("\n").as_bytes()))
        };
        let mut body = String::with_capacity(batch.iter().map(|i| i.json.len() + 16).sum());
        body.push_str("{\"webhook\":");
        body.push_str(&serde_json::to_string(&self.name).unwrap_or_default());
        body.push_str(",\"events\":[");
        for (n, item) in batch.iter().enumerate() {
            if n > 0 {
                body.push(',');
            }
            body.push_str(&item.json);
        }
        body.push_str("]}");

        let labels = [self.name.as_str()];
        let mut backoff = self.backoff;
        let mut attempt = 0;
        let failure = loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let answer = self.post(&key, body.clone()).await;
            match answer {
                Answer::Delivered => {
                    crate::metrics::SINK_FLUSH_DURATION
                        .with_label_values(&["webhook"])
                        .observe(started.elapsed().as_secs_f64());
                    crate::metrics::WEBHOOK_EVENTS
                        .with_label_values(&[labels[0], "delivered"])
                        .inc_by(batch.len() as u64);
                    break None;
                }
                Answer::Refused(why) => break Some(why),
                Answer::Retry(why) => {
                    WebhookAttemptFailed {
                        webhook: &self.name,
                        attempt,
                        error: &why,
                        retry_in: backoff,
                    }
                    .emit();
                    if attempt >= self.max_attempts {
                        break Some(format!("{why} after {attempt} attempts"));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        if let Some(reason) = failure {
            self.dead_letter(&batch, &reason).await;
        }
        self.mark(&batch).await;
        let mut held = self.outstanding.lock().expect("outstanding lock");
        for item in &batch {
            if item.epoch != held.epoch(item.origin.partition) {
                continue;
            }
            if let Some(offsets) = held.outstanding.get_mut(&item.origin.partition)
                && let Some(n) = offsets.get_mut(&item.origin.offset)
            {
                *n -= 1;
                if *n == 0 {
                    offsets.remove(&item.origin.offset);
                }
            }
        }
        crate::metrics::WEBHOOK_PENDING
            .with_label_values(&labels)
            .sub(batch.len() as i64);
    }

    async fn post(&self, key: &str, body: String) -> Answer {
        let resp = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(body)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => Answer::Delivered,
            Ok(r) if r.status().is_redirection() => Answer::Refused(format!(
                "webhook {} answered {}: weir does not follow redirects (they would carry the webhook's headers to another address); set its url to the final address",
                self.name,
                r.status()
            )),
            Ok(r) => {
                let status = r.status();
                let text = error_text(r).await;
                let why = format!("webhook {} answered {status}: {text}", self.name);
                if status.is_client_error() && status != 408 && status != 429 {
                    Answer::Refused(why)
                } else {
                    Answer::Retry(why)
                }
            }
            // Without the URL: it may hold a token (in its path or query), and this
            // reason goes to logs and to dead_letters.reason.
            Err(e) => Answer::Retry(format!("webhook {}: {}", self.name, e.without_url())),
        }
    }

    /// Marks `batch` delivered, retrying until the marks are stored (the events'
    /// offsets stay uncommitted meanwhile, and the queue waits).
    async fn mark(&self, batch: &[&Item]) {
        let Some((marks, sink)) = &self.marks else {
            return;
        };
        let last = highest(batch.iter().map(|i| i.origin));
        let mut backoff = self.backoff;
        while let Err(e) = marks.advance(sink, &last).await {
            warn!(webhook = %self.name, error = %e, "cannot mark events delivered; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Writes the batch to dead_letters, retrying until ClickHouse takes it (the
    /// events' offsets stay uncommitted meanwhile).
    async fn dead_letter(&self, batch: &[&Item], reason: &str) {
        WebhookGaveUp {
            webhook: &self.name,
            events: batch.len(),
            reason,
        }
        .emit();
        // Rows record the version that kept each event: one INSERT per version.
        let mut by_version: std::collections::BTreeMap<u64, Vec<DeadLetter>> = Default::default();
        for i in batch {
            by_version
                .entry(i.control_version)
                .or_default()
                .push(DeadLetter {
                    origin: i.origin,
                    event_id: i.event_id.clone(),
                    app: i.app.clone(),
                    name: i.name.clone(),
                    stage: Stage::Webhook,
                    plugin: self.name.clone(),
                    plugin_version: String::new(),
                    reason: reason.to_owned(),
                    raw: i.json.clone(),
                });
        }
        let failed_ms = crate::model::now_ms();
        for (version, dead) in by_version {
            let mut backoff = self.backoff;
            while let Err(e) = self
                .dead_letters
                .write_dead_letters(&dead, &self.pipeline, version, failed_ms)
                .await
            {
                warn!(webhook = %self.name, error = %e, "cannot write webhook dead letters; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            crate::metrics::DEAD_LETTERS
                .with_label_values(&[Stage::Webhook.as_str()])
                .inc_by(dead.len() as u64);
        }
    }
}

/// Most bytes of an error answer's body read (and quoted, up to [`ERROR_TEXT_CHARS`]
/// characters, in the reason): an endpoint cannot make weir read an endless body.
const ERROR_BODY_BYTES: usize = 4096;
const ERROR_TEXT_CHARS: usize = 200;

/// The start of an error answer's body, read up to [`ERROR_BODY_BYTES`].
async fn error_text(mut r: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match r.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body)
        .chars()
        .take(ERROR_TEXT_CHARS)
        .collect()
}
