//! Where the control plane is kept: a local directory (one node) or Redis (a fleet).
//!
//! Both hold the same three things:
//! - the state: one JSON document ([`State`]) with every plugin version, schema
//!   version and pipeline version, and a single version number that every change
//!   bumps. A change is a compare-and-set on that number, so two admins racing never
//!   lose an update, and an instance always reads a consistent snapshot;
//! - blobs: plugin components, immutable, addressed by their sha256;
//! - instance heartbeats, for `GET /admin/v1/status`.
//!
//! Redis also announces every new version on a pub/sub channel; the directory store
//! has no notices, and instances poll its state's version instead (a `stat` and a
//! small read).

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{InstanceStatus, State};
use crate::config::{ControlConfig, RedisConfig, StoreKind};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("control store {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("control store (Redis) {what}: {source}")]
    Redis {
        what: String,
        source: redis::RedisError,
    },
    #[error("control store holds an unreadable state document: {0}")]
    Corrupt(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

fn rd(what: impl Into<String>) -> impl FnOnce(redis::RedisError) -> StoreError {
    let what = what.into();
    move |source| StoreError::Redis { what, source }
}

/// The control-plane store. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Dir(DirStore),
    Redis(RedisStore),
}

impl Store {
    /// Opens the store the configuration names.
    pub fn open(control: &ControlConfig, redis: &RedisConfig) -> Result<Self, StoreError> {
        match control.store {
            StoreKind::Dir => DirStore::open(&control.dir).map(Store::Dir),
            StoreKind::Redis => RedisStore::open(redis).map(Store::Redis),
        }
    }

    /// The latest state (the empty state at version 0 when nothing was ever stored).
    pub async fn state(&self) -> Result<State, StoreError> {
        match self {
            Store::Dir(s) => s.state().await,
            Store::Redis(s) => s.state().await,
        }
    }

    /// The latest state's version, without reading the state.
    pub async fn version(&self) -> Result<u64, StoreError> {
        match self {
            Store::Dir(s) => s.version().await,
            Store::Redis(s) => s.version().await,
        }
    }

    /// Stores `state` if the stored version is still `expected` (and `state.version`
    /// is the next one). False when someone else changed it first.
    pub async fn commit(&self, expected: u64, state: &State) -> Result<bool, StoreError> {
        debug_assert_eq!(state.version, expected + 1);
        let json = serde_json::to_string(state).expect("state serialises");
        match self {
            Store::Dir(s) => s.commit(expected, json).await,
            Store::Redis(s) => s.commit(expected, state.version, json).await,
        }
    }

    /// Stores a blob under its sha256 (hex). Idempotent.
    pub async fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        match self {
            Store::Dir(s) => s.put_blob(sha256, bytes).await,
            Store::Redis(s) => s.put_blob(sha256, bytes).await,
        }
    }

    pub async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Dir(s) => s.blob(sha256).await,
            Store::Redis(s) => s.blob(sha256).await,
        }
    }

    /// Records an instance's status (replacing its previous one).
    pub async fn heartbeat(&self, status: &InstanceStatus) -> Result<(), StoreError> {
        let json = serde_json::to_string(status).expect("status serialises");
        match self {
            Store::Dir(s) => s.heartbeat(&status.id, json).await,
            Store::Redis(s) => s.heartbeat(&status.id, json).await,
        }
    }

    /// Removes an instance's status (it is stopping).
    pub async fn forget_instance(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Store::Dir(s) => s.forget_instance(id).await,
            Store::Redis(s) => s.forget_instance(id).await,
        }
    }

    /// Every instance heard from within `ttl`, oldest first. Older entries are removed.
    pub async fn instances(&self, ttl: Duration) -> Result<Vec<InstanceStatus>, StoreError> {
        let all = match self {
            Store::Dir(s) => s.instances().await?,
            Store::Redis(s) => s.instances().await?,
        };
        let now = crate::model::now_ms();
        let mut live = Vec::new();
        for (id, json) in all {
            match serde_json::from_str::<InstanceStatus>(&json) {
                Ok(s) if now - s.updated_at_ms <= ttl.as_millis() as i64 => live.push(s),
                Ok(s) if now - s.updated_at_ms > 3_600_000 => {
                    let _ = self.forget_instance(&s.id).await;
                }
                Ok(_) => {}
                Err(e) => warn!(instance = %id, error = %e, "unreadable instance status"),
            }
        }
        live.sort_by(|a, b| a.started_at_ms.cmp(&b.started_at_ms).then(a.id.cmp(&b.id)));
        Ok(live)
    }

    /// Change notices (new versions). Redis announces every change to every instance
    /// (the task resubscribes after a connection loss and then sends the version it
    /// finds, so a notice missed meanwhile is made up for); the directory store only
    /// announces changes made through this process (others are found by polling).
    pub fn notices(&self) -> mpsc::Receiver<u64> {
        match self {
            Store::Dir(s) => s.notices(),
            Store::Redis(s) => s.notices(),
        }
    }

    /// A short description for logs and status.
    pub fn describe(&self) -> String {
        match self {
            Store::Dir(s) => format!("dir:{}", s.root.display()),
            Store::Redis(s) => format!("redis:{}", s.url),
        }
    }
}

/// The directory store: `state.json`, `blobs/<sha256>.wasm`, `instances/<id>.json`.
/// Commits take an exclusive lock on `lock`, so processes on one machine can share it.
#[derive(Clone)]
pub struct DirStore {
    root: PathBuf,
    /// Receivers of this process's change notices.
    listeners: std::sync::Arc<std::sync::Mutex<Vec<mpsc::Sender<u64>>>>,
}

impl DirStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for sub in ["blobs", "instances"] {
            std::fs::create_dir_all(root.join(sub))
                .map_err(io(format!("cannot create {}", root.join(sub).display())))?;
        }
        Ok(Self {
            root: root.to_owned(),
            listeners: Default::default(),
        })
    }

    fn notices(&self) -> mpsc::Receiver<u64> {
        let (tx, rx) = mpsc::channel(16);
        self.listeners.lock().expect("listeners lock").push(tx);
        rx
    }

    fn announce(&self, version: u64) {
        let mut listeners = self.listeners.lock().expect("listeners lock");
        listeners.retain(|tx| !tx.is_closed());
        for tx in listeners.iter() {
            // A full queue already holds a notice that makes the agent read the store.
            let _ = tx.try_send(version);
        }
    }

    fn read_state(root: &Path) -> Result<State, StoreError> {
        let path = root.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io(format!("cannot read {}", path.display()))(e)),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || f(&root))
            .await
            .expect("control store task panicked")
    }

    async fn state(&self) -> Result<State, StoreError> {
        self.blocking(Self::read_state).await
    }

    async fn version(&self) -> Result<u64, StoreError> {
        // The state is small; reading it whole is simpler than a separate version file
        // that could disagree with it.
        Ok(self.state().await?.version)
    }

    async fn commit(&self, expected: u64, json: String) -> Result<bool, StoreError> {
        let done = self
            .blocking(move |root| {
                let lock_path = root.join("lock");
                let lock = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(io(format!("cannot open {}", lock_path.display())))?;
                lock.lock()
                    .map_err(io(format!("cannot lock {}", lock_path.display())))?;
                if Self::read_state(root)?.version != expected {
                    return Ok(false);
                }
                write_atomically(&root.join("state.json"), json.as_bytes())?;
                Ok(true)
            })
            .await?;
        if done {
            self.announce(expected + 1);
        }
        Ok(done)
    }

    async fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.root.join("blobs").join(format!("{sha256}.wasm"));
        let bytes = bytes.to_vec();
        self.blocking(move |_| {
            if path.exists() {
                return Ok(());
            }
            write_atomically(&path, &bytes)
        })
        .await
    }

    async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.root.join("blobs").join(format!("{sha256}.wasm"));
        self.blocking(move |_| match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("cannot read {}", path.display()))(e)),
        })
        .await
    }

    async fn heartbeat(&self, id: &str, json: String) -> Result<(), StoreError> {
        let path = self.root.join("instances").join(format!("{id}.json"));
        self.blocking(move |_| write_atomically(&path, json.as_bytes()))
            .await
    }

    async fn forget_instance(&self, id: &str) -> Result<(), StoreError> {
        let path = self.root.join("instances").join(format!("{id}.json"));
        self.blocking(move |_| match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("cannot remove {}", path.display()))(e))
            }
            _ => Ok(()),
        })
        .await
    }

    async fn instances(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.blocking(|root| {
            let dir = root.join("instances");
            let mut out = Vec::new();
            for entry in std::fs::read_dir(&dir)
                .map_err(io(format!("cannot list {}", dir.display())))?
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(".json") else {
                    continue;
                };
                if let Ok(json) = std::fs::read_to_string(entry.path()) {
                    out.push((id.to_owned(), json));
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Writes a file so that readers see the old or the new content, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot write {}", path.display())))
}

/// The Redis store: keys `<prefix>:control:{version,state,blob:<sha256>,instances}`,
/// notices on channel `<prefix>:control`.
#[derive(Clone)]
pub struct RedisStore {
    /// For messages: the password redacted.
    url: String,
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
}

/// Sets the state if the version is still the expected one, and announces it.
/// KEYS: version, state. ARGV: expected, new version, state JSON, channel.
const COMMIT: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
";

impl RedisStore {
    pub fn open(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(rd("bad url"))?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(rd("connect"))?;
        Ok(Self {
            url: crate::model::redact_url(&cfg.url),
            client,
            conn,
            prefix: cfg.key_prefix.clone(),
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}:control:{k}", self.prefix)
    }

    /// Runs an idempotent command, once more if the connection was lost (the manager
    /// reconnects after a failure, e.g. after Redis restarted). Never used for commits,
    /// whose outcome is unknown when the answer is lost.
    async fn idempotent<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match f(self.conn.clone()).await {
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
                debug!(error = %e, "control store connection lost; retrying once");
                tokio::time::sleep(Duration::from_millis(100)).await;
                f(self.conn.clone()).await.map_err(rd(what))
            }
            r => r.map_err(rd(what)),
        }
    }

    fn channel(&self) -> String {
        format!("{}:control", self.prefix)
    }

    async fn state(&self) -> Result<State, StoreError> {
        let key = self.key("state");
        let json: Option<String> = self
            .idempotent("read state", |mut c| {
                let key = key.clone();
                async move { c.get(key).await }
            })
            .await?;
        match json {
            Some(j) => serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string())),
            None => Ok(State::default()),
        }
    }

    async fn version(&self) -> Result<u64, StoreError> {
        let key = self.key("version");
        let v: Option<u64> = self
            .idempotent("read version", |mut c| {
                let key = key.clone();
                async move { c.get(key).await }
            })
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn commit(&self, expected: u64, version: u64, json: String) -> Result<bool, StoreError> {
        let done: i64 = redis::Script::new(COMMIT)
            .key(self.key("version"))
            .key(self.key("state"))
            .arg(expected)
            .arg(version)
            .arg(json)
            .arg(self.channel())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(rd("commit"))?;
        Ok(done == 1)
    }

    async fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let key = self.key(&format!("blob:{sha256}"));
        self.idempotent("store blob", |mut c| {
            let key = key.clone();
            async move { c.set_nx::<_, _, ()>(key, bytes).await }
        })
        .await
    }

    async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(&format!("blob:{sha256}"));
        self.idempotent("read blob", |mut c| {
            let key = key.clone();
            async move { c.get(key).await }
        })
        .await
    }

    async fn heartbeat(&self, id: &str, json: String) -> Result<(), StoreError> {
        let key = self.key("instances");
        self.idempotent("heartbeat", |mut c| {
            let (key, json) = (key.clone(), json.clone());
            async move { c.hset::<_, _, _, ()>(key, id, json).await }
        })
        .await
    }

    async fn forget_instance(&self, id: &str) -> Result<(), StoreError> {
        let key = self.key("instances");
        self.idempotent("forget instance", |mut c| {
            let key = key.clone();
            async move { c.hdel::<_, _, ()>(key, id).await }
        })
        .await
    }

    async fn instances(&self) -> Result<Vec<(String, String)>, StoreError> {
        let key = self.key("instances");
        self.idempotent("list instances", |mut c| {
            let key = key.clone();
            async move { c.hgetall(key).await }
        })
        .await
    }

    fn notices(&self) -> mpsc::Receiver<u64> {
        let (tx, rx) = mpsc::channel(16);
        let store = self.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            let mut backoff = Duration::from_millis(200);
            loop {
                let subscribed = async {
                    let mut pubsub = store.client.get_async_pubsub().await?;
                    pubsub.subscribe(store.channel()).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                }
                .await;
                match subscribed {
                    Ok(mut pubsub) => {
                        backoff = Duration::from_millis(200);
                        // Whatever changed while unsubscribed.
                        if let Ok(v) = store.version().await
                            && tx.send(v).await.is_err()
                        {
                            return;
                        }
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let v: u64 = msg.get_payload().unwrap_or(0);
                            if tx.send(v).await.is_err() {
                                return;
                            }
                        }
                        debug!("control notice subscription ended; resubscribing");
                    }
                    Err(e) => {
                        debug!(error = %e, "cannot subscribe to control notices; retrying");
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        rx
    }
}
