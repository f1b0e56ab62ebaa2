//! Test harness: real servers on free loopback ports, started and stopped by the test.
//!
//! - [`Tansu`]: the Kafka-compatible broker, from `$WEIR_CACHE/bin` or `PATH`
//!   (`scripts/stack.sh install` puts it there): memory storage, or durable across its
//!   restarts on an [`ObjectStore`] (moto's S3 server).
//! - [`ClickHouse`]: Debian's `clickhouse-server`, with its state in a temp dir.
//! - [`Redis`]: Debian's `redis-server`, persistent across restarts.
//! - [`Weir`]: the real `weir` binary as a child process, so tests can restart it
//!   (SIGTERM) or kill it (SIGKILL).
//!
//! Every child is killed when its handle drops, and (Linux) when the test process
//! dies, so a failed test leaves no server behind.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Directory holding the example plugins built for wasm32-wasip2 by `build.rs`.
pub const PLUGIN_DIR: &str = env!("WEIR_PLUGIN_DIR");

/// Path of a built plugin component, e.g. `plugin_path("enrich")`.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = Path::new(PLUGIN_DIR).join(format!("weir_plugin_{}.wasm", name.replace('-', "_")));
    assert!(
        path.exists(),
        "plugin {name} was not built at {}",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A free TCP port on 127.0.0.1, never one this process has handed out before: the
/// tests of a binary run in parallel, and two of their servers must not be given the
/// same port between its release here and their bind.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The last `lines` lines of a file ("" if it cannot be read).
fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until `check` returns true, polling every 50 ms, or fails after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A minimal blocking `GET` over std's TcpStream: true on a 2xx answer. (No HTTP client
/// here, so it is safe to call from inside an async test.)
pub fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head[9] == b'2'
}

/// A minimal blocking `GET` over std's TcpStream: the body of a 2xx answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let answer = http_exchange(addr, "GET", path).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.") && head.as_bytes().get(9) == Some(&b'2')).then(|| body.to_owned())
}

/// One HTTP/1.0 request without a body over std's TcpStream: the whole answer, head
/// and body, as text.
fn http_exchange(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A small deterministic generator: a test seeds it from the clock and prints the seed,
/// so that a failing run can be repeated.
pub struct Lcg(pub u64);

impl Lcg {
    /// The seed of a new run: the clock's nanoseconds.
    pub fn seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    }

    /// A number in `0..below`.
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// A temp directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "weir-test-{prefix}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop, and when the test process dies.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child
        // when the thread that spawned it exits.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of the process's output (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` returns true; fails at once, quoting the process's output, if
    /// it exits first (a port taken, a bad flag), and after `timeout` if neither happens.
    pub fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                bail!(
                    "{} exited ({status}) while waiting for {what}:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what}:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How the process ended; None while it runs.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL. Returns whether it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILL at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where `scripts/stack.sh install` puts what it downloads: `$WEIR_CACHE`, by default
/// `~/.cache/weir`.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("WEIR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/weir")))
}

/// `path` under `$WEIR_CACHE`, where `scripts/stack.sh install` puts the tools the tests
/// run (`chdb-venv/bin/python`, `s3-venv/bin/moto_server`, ...); an error naming the
/// install command if it is not there.
pub fn installed(path: &str) -> Result<PathBuf> {
    let full = cache_dir()
        .context("neither WEIR_CACHE nor HOME is set")?
        .join(path);
    if !full.exists() {
        bail!(
            "{} not found; run `scripts/stack.sh install`",
            full.display()
        );
    }
    Ok(full)
}

/// Runs SQL statements in order on chdb, a current ClickHouse engine in-process (PyPI
/// `chdb-core`, which `scripts/stack.sh install` puts in `$WEIR_CACHE/chdb-venv`), through
/// `tests/chdb/run.py`. Each statement is `{"what": label, "sql": text, "expect": answer
/// or null}`; fails at the first statement chdb refuses or answers otherwise than
/// expected. Prints (and returns) the list of what ran.
pub fn run_on_chdb(statements: &[serde_json::Value]) -> Result<String> {
    use std::io::Write as _;
    let python = installed("chdb-venv/bin/python")?;
    let mut child = Command::new(&python)
        .arg(repo_root().join("tests/chdb/run.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", python.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(statements)?.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}");
    if !out.status.success() {
        bail!(
            "chdb refused a statement:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ran = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    if ran != statements.len() {
        bail!(
            "chdb ran {ran} of {} statements:\n{stdout}",
            statements.len()
        );
    }
    Ok(stdout)
}

/// Finds a program in `$WEIR_CACHE/bin` (default `~/.cache/weir/bin`) or on `PATH`.
pub fn find_program(name: &str) -> Result<PathBuf> {
    if let Some(p) = cache_dir()
        .map(|c| c.join("bin").join(name))
        .filter(|p| p.exists())
    {
        return Ok(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not found in $WEIR_CACHE/bin or PATH; run `scripts/stack.sh install`")
}

/// An S3-compatible object store on a free port: moto's server (PyPI `moto[server]`,
/// which `scripts/stack.sh install` puts in `$WEIR_CACHE/s3-venv`), with one bucket. It
/// is what a [`Tansu::start_durable`] broker keeps its log and its consumer groups'
/// offsets in, so that the broker can be stopped and started again with both intact,
/// as a Kafka broker's disk keeps them.
pub struct ObjectStore {
    pub port: u16,
    pub bucket: String,
    _proc: Proc,
    _dir: TempDir,
}

impl ObjectStore {
    pub fn start(bucket: &str) -> Result<ObjectStore> {
        let server = installed("s3-venv/bin/moto_server")?;
        let dir = TempDir::new("s3");
        let port = free_port();
        let mut proc = Proc::spawn(
            "moto_server",
            Command::new(&server).args(["-H", "127.0.0.1", "-p", &port.to_string()]),
            dir.path().join("moto.log"),
        )?;
        proc.wait_ready(
            "moto's S3 server to listen",
            Duration::from_secs(30),
            || port_open(port),
        )?;
        let store = ObjectStore {
            port,
            bucket: bucket.to_owned(),
            _proc: proc,
            _dir: dir,
        };
        store.create_bucket()?;
        Ok(store)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `PUT /BUCKET` (moto checks no signature).
    fn create_bucket(&self) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let answer = http_exchange(addr, "PUT", &format!("/{}", self.bucket))?;
        if !answer.starts_with("HTTP/1.0 200") && !answer.starts_with("HTTP/1.1 200") {
            bail!(
                "creating bucket {} failed: {}",
                self.bucket,
                answer.lines().next().unwrap_or("no answer")
            );
        }
        Ok(())
    }
}

/// Where a [`Tansu`] keeps its topics.
enum Storage {
    /// `memory://`: a restart starts empty.
    Memory,
    /// `s3://BUCKET/` on an [`ObjectStore`]: a restart keeps every record and offset.
    S3 { endpoint: String, bucket: String },
}

/// The Tansu broker on a free port.
pub struct Tansu {
    pub port: u16,
    /// The port it tells clients to use (a proxy's), if not its own.
    advertised: Option<u16>,
    storage: Storage,
    dir: TempDir,
    proc: Option<Proc>,
    starts: u32,
}

impl Tansu {
    /// A broker with memory storage.
    pub fn start() -> Result<Tansu> {
        Self::start_on(free_port(), None)
    }

    /// A broker on `port` that advertises `advertised` (a proxy in front of it) to its
    /// clients, so that every connection goes through the proxy.
    pub fn start_on(port: u16, advertised: Option<u16>) -> Result<Tansu> {
        Self::start_with(port, advertised, Storage::Memory)
    }

    /// A broker that keeps its topics and committed offsets in `store`: it can be
    /// stopped ([`Tansu::stop`]) and started again ([`Tansu::restart`]) with them intact.
    pub fn start_durable(store: &ObjectStore) -> Result<Tansu> {
        let storage = Storage::S3 {
            endpoint: store.endpoint(),
            bucket: store.bucket.clone(),
        };
        Self::start_with(free_port(), None, storage)
    }

    fn start_with(port: u16, advertised: Option<u16>, storage: Storage) -> Result<Tansu> {
        let mut t = Tansu {
            port,
            advertised,
            storage,
            dir: TempDir::new("tansu"),
            proc: None,
            starts: 0,
        };
        t.restart()?;
        Ok(t)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised.unwrap_or(self.port))
    }

    /// Starts the broker again on the same port (with memory storage it starts empty;
    /// on an object store with what it held).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.starts += 1;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let log = self.dir.path().join(format!("tansu-{}.log", self.starts));
        let mut cmd = Command::new(find_program("tansu")?);
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ]);
        match &self.storage {
            Storage::Memory => {
                cmd.args(["--storage-engine", "memory://tansu/"]);
            }
            Storage::S3 { endpoint, bucket } => {
                // object_store's S3 client reads these; moto takes any credentials.
                cmd.args(["--storage-engine", &format!("s3://{bucket}/")])
                    .env("AWS_ENDPOINT", endpoint)
                    .env("AWS_ALLOW_HTTP", "true")
                    .env("AWS_ACCESS_KEY_ID", "weir-tests")
                    .env("AWS_SECRET_ACCESS_KEY", "weir-tests")
                    .env("AWS_DEFAULT_REGION", "us-east-1");
            }
        }
        let mut proc = Proc::spawn("tansu", &mut cmd, log)?;
        let port = self.port;
        proc.wait_ready("tansu to listen", Duration::from_secs(30), || {
            port_open(port)
        })?;
        self.proc = Some(proc);
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// SIGKILL: the broker dies with whatever it was doing.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Creates a topic with `tansu topic create`.
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        let out = Command::new(find_program("tansu")?)
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .output()?;
        if !out.status.success() {
            bail!(
                "tansu topic create {name} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// A standalone ZooKeeper (Debian's `zookeeper` package, configured by
/// `scripts/stack.sh zookeeper-config`) on a free port, for replicated ClickHouse.
pub struct ZooKeeper {
    pub port: u16,
    _dir: TempDir,
    _proc: Proc,
}

impl ZooKeeper {
    pub fn start() -> Result<ZooKeeper> {
        let dir = TempDir::new("zookeeper");
        let port = free_port();
        let out = Command::new(repo_root().join("scripts/stack.sh"))
            .args(["zookeeper-config", &dir.path().display().to_string()])
            .arg(port.to_string())
            .output()?;
        if !out.status.success() {
            bail!(
                "scripts/stack.sh zookeeper-config failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8(out.stdout)?;
        let argv: Vec<&str> = line.split_whitespace().collect();
        let (program, args) = argv
            .split_first()
            .context("zookeeper-config printed no command")?;
        let mut proc = Proc::spawn(
            "zookeeper",
            Command::new(program).args(args).current_dir(dir.path()),
            dir.path().join("zookeeper.log"),
        )?;
        proc.wait_ready("zookeeper to answer ruok", Duration::from_secs(60), || {
            four_letter_word(port, "ruok").is_some_and(|a| a == "imok")
        })?;
        Ok(ZooKeeper {
            port,
            _dir: dir,
            _proc: proc,
        })
    }
}

/// ZooKeeper's answer to a four-letter command.
fn four_letter_word(port: u16, word: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(word.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// What makes a ClickHouse server a replica (see [`ClickHouse::replicas`]).
struct Replica<'a> {
    zookeeper_port: u16,
    name: &'a str,
    /// `NAME=TCP_PORT,TCP_PORT`.
    cluster: &'a str,
    interserver_port: u16,
}

/// How one start of a ClickHouse server ended.
enum Launch {
    Up,
    /// It exited because a port it was given is in use (the error log's line).
    PortTaken(String),
}

/// A ClickHouse server with its state in a temp dir.
pub struct ClickHouse {
    pub http_port: u16,
    dir: TempDir,
    config: String,
    proc: Option<Proc>,
    starts: u32,
    http: reqwest::Client,
    /// A current engine (chdb behind `tests/chdb/serve.py`) instead of 18.16's server.
    chdb: bool,
}

impl ClickHouse {
    /// One not started yet, with its state in a new temp dir named after `prefix`.
    fn unstarted(prefix: &str, chdb: bool) -> ClickHouse {
        ClickHouse {
            http_port: 0,
            dir: TempDir::new(prefix),
            config: String::new(),
            proc: None,
            starts: 0,
            http: reqwest::Client::new(),
            chdb,
        }
    }

    /// Starts a server on two free ports. A port can be taken between the moment it is
    /// found free and the server's bind (by another test's server or an outgoing
    /// connection's local port): the server then exits at once, and it is started again
    /// on two other ports.
    pub fn start() -> Result<ClickHouse> {
        ClickHouse::unstarted("clickhouse", false).start_on_free_ports()
    }

    /// Starts it on free ports, on other ones while a port turns out taken.
    fn start_on_free_ports(mut self) -> Result<ClickHouse> {
        let server = if self.chdb {
            "chdb's server"
        } else {
            "clickhouse-server"
        };
        for attempt in 1.. {
            if self.chdb {
                self.http_port = free_port();
            } else {
                self.configure(free_port(), free_port(), None)?;
            }
            match self.launch()? {
                Launch::Up => return Ok(self),
                Launch::PortTaken(why) if attempt < 4 => {
                    eprintln!("{server} could not bind its ports ({why}); other ports");
                }
                Launch::PortTaken(why) => bail!("{server} could not bind: {why}"),
            }
        }
        unreachable!()
    }

    /// A current ClickHouse release: chdb's engine (PyPI `chdb-core`, which
    /// `scripts/stack.sh install` puts in `$WEIR_CACHE/chdb-venv`) served over
    /// ClickHouse's HTTP interface by `tests/chdb/serve.py`, on a free port. Only the
    /// transport is the script's; every statement runs in the engine. Inserts must not
    /// be compressed (`compression = "none"`).
    pub fn current() -> Result<ClickHouse> {
        ClickHouse::unstarted("chdb", true).start_on_free_ports()
    }

    /// Two replicas of one shard that replicate through `zk` (each with an interserver
    /// port and `{shard}`/`{replica}` macros), both in cluster `cluster` of their
    /// `<remote_servers>`, for ON CLUSTER DDL.
    pub fn replicas(zk: &ZooKeeper, cluster: &str) -> Result<[ClickHouse; 2]> {
        let new = || ClickHouse::unstarted("clickhouse-replica", false);
        let mut pair = [new(), new()];
        'attempt: for attempt in 1.. {
            let ports: Vec<[u16; 3]> = (0..2)
                .map(|_| [free_port(), free_port(), free_port()])
                .collect();
            let members = format!("{cluster}={},{}", ports[0][1], ports[1][1]);
            for (i, ch) in pair.iter_mut().enumerate() {
                let replica = Replica {
                    zookeeper_port: zk.port,
                    name: ["r1", "r2"][i],
                    cluster: &members,
                    interserver_port: ports[i][2],
                };
                ch.configure(ports[i][0], ports[i][1], Some(replica))?;
            }
            for ch in pair.iter_mut() {
                match ch.launch()? {
                    Launch::Up => {}
                    Launch::PortTaken(why) if attempt < 4 => {
                        eprintln!(
                            "clickhouse-server could not bind its ports ({why}); other ports"
                        );
                        continue 'attempt;
                    }
                    Launch::PortTaken(why) => bail!("clickhouse-server could not bind: {why}"),
                }
            }
            return Ok(pair);
        }
        unreachable!()
    }

    /// Writes the server's config for these ports (`scripts/stack.sh clickhouse-config`),
    /// as a replica if asked.
    fn configure(&mut self, http_port: u16, tcp_port: u16, replica: Option<Replica>) -> Result<()> {
        let mut cmd = Command::new(repo_root().join("scripts/stack.sh"));
        cmd.args(["clickhouse-config", &self.dir.path().display().to_string()])
            .args([http_port.to_string(), tcp_port.to_string()]);
        if let Some(r) = replica {
            cmd.arg(r.interserver_port.to_string())
                .env("CLICKHOUSE_ZOOKEEPER_PORT", r.zookeeper_port.to_string())
                .env("CLICKHOUSE_REPLICA", r.name)
                .env("CLICKHOUSE_CLUSTER", r.cluster);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!(
                "scripts/stack.sh clickhouse-config failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.config = String::from_utf8(out.stdout)?.trim().to_owned();
        self.http_port = http_port;
        Ok(())
    }

    /// Starts the server (again) on the same ports and data directory. A port still
    /// held by someone else (an outgoing connection's local port) is waited for.
    pub fn restart(&mut self) -> Result<()> {
        for attempt in 1.. {
            match self.launch()? {
                Launch::Up => return Ok(()),
                Launch::PortTaken(why) if attempt < 10 => {
                    eprintln!("clickhouse-server could not bind its ports ({why}); again in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Launch::PortTaken(why) => bail!("clickhouse-server could not bind: {why}"),
            }
        }
        unreachable!()
    }

    /// One start: up once it answers `/ping`; an exit because a port is taken is
    /// told apart from every other failure, which is an error quoting the server's logs.
    fn launch(&mut self) -> Result<Launch> {
        self.stop();
        self.starts += 1;
        if self.chdb {
            return self.launch_chdb();
        }
        let mut proc = Proc::spawn(
            "clickhouse-server",
            Command::new(find_program("clickhouse-server")?)
                .arg(format!("--config-file={}", self.config))
                .current_dir(self.dir.path()),
            self.dir
                .path()
                .join(format!("server-stdout-{}.log", self.starts)),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.http_port));
        let waited = proc.wait_ready(
            "clickhouse to answer /ping",
            Duration::from_secs(90),
            || http_ok(addr, "/ping"),
        );
        let errors = self.error_log_tail(20);
        match waited {
            Ok(()) => {
                self.proc = Some(proc);
                Ok(Launch::Up)
            }
            Err(_) if proc.exit_status().is_some() && errors.contains("Address already in use") => {
                let line = errors
                    .lines()
                    .find(|l| l.contains("Address already in use"));
                Ok(Launch::PortTaken(
                    line.unwrap_or_default().trim().to_owned(),
                ))
            }
            Err(e) => Err(e.context(format!("clickhouse-server's error log:\n{errors}"))),
        }
    }

    /// [`ClickHouse::launch`] of [`ClickHouse::current`]: up once it answers.
    fn launch_chdb(&mut self) -> Result<Launch> {
        let python = installed("chdb-venv/bin/python")?;
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let mut proc = Proc::spawn(
            "chdb-server",
            Command::new(&python)
                .arg(repo_root().join("tests/chdb/serve.py"))
                .arg(self.http_port.to_string())
                .arg(&data),
            self.dir
                .path()
                .join(format!("server-stdout-{}.log", self.starts)),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.http_port));
        match proc.wait_ready("chdb's server to answer", Duration::from_secs(60), || {
            http_ok(addr, "/ping")
        }) {
            Ok(()) => {
                self.proc = Some(proc);
                Ok(Launch::Up)
            }
            Err(_) if proc.log_text().contains("Address already in use") => {
                Ok(Launch::PortTaken("Address already in use".into()))
            }
            Err(e) => Err(e),
        }
    }

    /// The server's log (information level) of this run, all starts.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log/clickhouse-server.log"))
            .unwrap_or_default()
    }

    /// The last lines of the server's error log (it logs there, not to stdout).
    fn error_log_tail(&self, lines: usize) -> String {
        file_tail(
            &self.dir.path().join("log/clickhouse-server.err.log"),
            lines,
        )
    }

    /// Kills the server (SIGKILL), as a crash or a lost machine would; its data stays
    /// for the next [`ClickHouse::restart`].
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Stops the server (SIGTERM); its data stays for the next [`ClickHouse::restart`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(30));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// What weir's `clickhouse.compression` must be for this server: `lz4` (weir's
    /// default), or `none` for [`ClickHouse::current`], whose transport takes plain
    /// bodies only.
    pub fn compression(&self) -> &'static str {
        if self.chdb { "none" } else { "lz4" }
    }

    /// Runs a query and returns its output (TabSeparated), trimmed.
    pub async fn query(&self, sql: &str) -> Result<String> {
        let resp = self
            .http
            .post(self.url())
            .body(sql.to_owned())
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("ClickHouse query failed ({status}): {text}\nquery: {sql}");
        }
        Ok(text.trim().to_owned())
    }

    /// Waits until a query returning one number returns at least `want`.
    pub async fn wait_for_count(&self, sql: &str, want: u64, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let have = self.count(sql).await;
            if have.as_ref().is_ok_and(|have| *have >= want) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                match have {
                    Ok(have) => bail!("{sql}: {have} of {want} after {timeout:?}"),
                    Err(e) => bail!("{sql}: no answer after {timeout:?} (last: {e:#})"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a query returning one number.
    pub async fn count(&self, sql: &str) -> Result<u64> {
        let text = self.query(sql).await?;
        text.parse()
            .with_context(|| format!("expected a number from {sql:?}, got {text:?}"))
    }

    /// `count()` and `uniqExact(event_id)` of `table` (`db.table`): its rows and the
    /// distinct events among them.
    pub async fn rows_and_events(&self, table: &str) -> Result<(u64, u64)> {
        let sql = format!("SELECT count(), uniqExact(event_id) FROM {table}");
        let text = self.query(&sql).await?;
        let parsed = text
            .split_once('\t')
            .and_then(|(rows, events)| Some((rows.parse().ok()?, events.parse().ok()?)));
        parsed.with_context(|| format!("expected two numbers from {sql:?}, got {text:?}"))
    }

    /// Fails unless each `(table, want)` (`db.table`) holds `want` rows of `want`
    /// distinct events: every event once.
    pub async fn assert_each_once(&self, tables: &[(&str, u64)]) -> Result<()> {
        for &(table, want) in tables {
            let have = self.rows_and_events(table).await?;
            if have != (want, want) {
                bail!(
                    "{table}: {} rows of {} distinct events, want {want} of {want}",
                    have.0,
                    have.1
                );
            }
        }
        Ok(())
    }
}

/// A Redis server with its state (append-only file, fsynced on every write) in a temp
/// dir, so that a restart keeps the data as a real outage would.
pub struct Redis {
    pub port: u16,
    dir: TempDir,
    proc: Option<Proc>,
    starts: u32,
}

impl Redis {
    pub fn start() -> Result<Redis> {
        let mut r = Redis {
            port: free_port(),
            dir: TempDir::new("redis"),
            proc: None,
            starts: 0,
        };
        r.restart()?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The `[redis]` section of a weir configuration that uses this server.
    pub fn section(&self) -> String {
        format!("\n[redis]\nurl = \"{}\"\n", self.url())
    }

    /// Starts the server (again) on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.starts += 1;
        let log = self.dir.path().join(format!("redis-{}.log", self.starts));
        let mut proc = Proc::spawn(
            "redis-server",
            Command::new(find_program("redis-server")?)
                .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .arg("--dir")
                .arg(self.dir.path()),
            log,
        )?;
        let port = self.port;
        proc.wait_ready("redis to listen", Duration::from_secs(30), || {
            port_open(port)
        })?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops the server (SIGTERM); its data stays for the next [`Redis::restart`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// `HGETALL key` as field -> integer value.
    pub fn hgetall(&self, key: &str) -> Result<std::collections::BTreeMap<String, i64>> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_connection()?;
        Ok(redis::cmd("HGETALL").arg(key).query(&mut conn)?)
    }
}

/// A running `weir serve` process.
pub struct Weir {
    pub ingest: SocketAddr,
    /// The address `{admin}` in the configuration was replaced with.
    pub admin: SocketAddr,
    /// Extra environment of the next start.
    pub env: Vec<(String, String)>,
    config: PathBuf,
    dir: TempDir,
    proc: Option<Proc>,
    starts: u32,
    http: reqwest::Client,
}

/// The `weir-under-test` binary of this package: beside the test executable's `deps/`.
pub fn weir_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("weir-under-test"))
        .filter(|p| p.exists());
    bin.with_context(|| format!("weir-under-test not found next to {}", exe.display()))
}

/// The write key the harness configures.
pub const WRITE_KEY: &str = "wk_test_1234567890abcdef";

/// A read key (counters API) for test configurations.
pub const READ_KEY: &str = "rk_test_1234567890abcdef";

impl Weir {
    /// Writes `config` (TOML; `{ingest}` and `{admin}` are replaced by free addresses)
    /// and starts weir.
    pub fn start(config: &str) -> Result<Weir> {
        Self::start_with_env(config, &[])
    }

    /// Like [`Weir::start`], with extra environment variables for this first start.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Result<Weir> {
        let dir = TempDir::new("weir");
        let ingest = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = dir.path().join("weir.toml");
        let config = config
            .replace("{ingest}", &ingest.to_string())
            .replace("{admin}", &admin.to_string());
        std::fs::write(&path, config)?;
        let mut weir = Weir {
            ingest,
            admin,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            config: path,
            dir,
            proc: None,
            starts: 0,
            http: reqwest::Client::new(),
        };
        weir.restart()?;
        Ok(weir)
    }

    /// Starts (again) and waits until ingest answers `/healthz`.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(30));
        }
        self.starts += 1;
        let log = self.dir.path().join(format!("weir-{}.log", self.starts));
        let mut proc = Proc::spawn(
            "weir",
            Command::new(weir_binary()?)
                .args(["serve", "--config"])
                .arg(&self.config)
                .env("WEIR_LOG", "info,rdkafka=warn")
                .envs(self.env.iter().map(|(k, v)| (k, v))),
            log,
        )?;
        let ingest = self.ingest;
        wait_until("weir to answer /healthz", Duration::from_secs(60), || {
            if !proc.is_running() {
                return true;
            }
            http_ok(ingest, "/healthz")
        })
        .with_context(|| proc.log_tail(40))?;
        if !proc.is_running() {
            // Not only the last lines: with RUST_BACKTRACE set, a start's error is followed
            // by a backtrace longer than a short tail.
            bail!("weir exited at start:\n{}", proc.log_tail(200));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Graceful stop (SIGTERM). Returns false if it had to be killed.
    pub fn stop(&mut self) -> bool {
        self.proc
            .take()
            .map(|mut p| p.stop(Duration::from_secs(40)))
            .unwrap_or(true)
    }

    /// The process id of the running weir.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// SIGKILL: no flush, no commit, no goodbye to the consumer group.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// All output of every start so far, oldest first.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let path = self.dir.path().join(format!("weir-{n}.log"));
                let text = std::fs::read_to_string(path).unwrap_or_default();
                format!("---- weir start #{n} ----\n{text}")
            })
            .collect()
    }

    /// Waits until the current process exits by itself; how it ended.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let proc = self.proc.as_mut().context("weir is not running")?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = proc.exit_status() {
                break status;
            }
            if start.elapsed() > timeout {
                bail!("weir still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.proc = None;
        Ok(status)
    }

    /// The current value of metric `name` (summed over the series with `labels`) in
    /// the current process; 0 when it cannot be read.
    pub fn metric_now(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        http_get(self.ingest, "/metrics").map_or(0.0, |text| metric(&text, name, labels))
    }

    /// Waits until metric `name` (summed over the series with `labels`) of the current
    /// process is at least `at_least`: how a test waits for an internal event (a
    /// rebalance, a pause, a flush) rather than for a log line's wording.
    pub fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
        timeout: Duration,
    ) -> Result<()> {
        self.proc.as_ref().context("weir is not running")?;
        wait_until(&format!("{name}{labels:?} >= {at_least}"), timeout, || {
            self.metric_now(name, labels) >= at_least
        })
        .with_context(|| self.log())
    }

    /// Waits until this process owns partitions of the events topic (it joined its
    /// consumer group and got its assignment).
    pub fn wait_for_partitions(&self, timeout: Duration) -> Result<()> {
        self.wait_for_metric("weir_kafka_assigned_partitions", &[], 1.0, timeout)
    }

    /// Fails (with the log) if `metrics`, read from this instance, count a rebalance
    /// that took partitions from it: it stayed in its consumer group throughout.
    pub fn assert_kept_partitions(&self, metrics: &str) -> Result<()> {
        let revoked = metric(
            metrics,
            "weir_kafka_rebalances_total",
            &[("kind", "revoked")],
        );
        if revoked > 0.0 {
            bail!(
                "the instance lost its partitions {revoked} times; log:\n{}",
                self.log()
            );
        }
        Ok(())
    }

    pub fn events_url(&self) -> String {
        format!("http://{}/v1/events", self.ingest)
    }

    /// Posts `events` (one JSON event or an array) to `POST /v1/events` with the
    /// harness's write key; fails unless the answer is 202.
    pub async fn post(&self, events: &(impl serde::Serialize + ?Sized)) -> Result<()> {
        let resp = self
            .http
            .post(self.events_url())
            .bearer_auth(WRITE_KEY)
            .json(events)
            .send()
            .await?;
        if resp.status() != 202 {
            bail!("ingest answered {}: {}", resp.status(), resp.text().await?);
        }
        Ok(())
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.ingest);
        Ok(reqwest::get(url).await?.error_for_status()?.text().await?)
    }

    /// URL of an admin API path, e.g. `admin_url("/admin/v1/status")`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The directory of its configuration file (where a `dir` control store lives).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// URL of `GET /v1/counters/{counter}/{key}`.
    pub fn counter_url(&self, counter: &str, key: &str) -> String {
        format!("http://{}/v1/counters/{counter}/{key}", self.ingest)
    }
}

/// Sums the samples of metric `name` whose labels include every `key="value"` pair of
/// `labels`, in Prometheus text output.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Reads a whole topic from the start with a fresh consumer group until it stays idle
/// for 3 s: each record's key and payload.
pub async fn read_topic(bootstrap: &str, topic: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", free_port()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut records = Vec::new();
    // Joining a Tansu group takes about half the session timeout: wait for the first
    // record generously, then stop once the topic stays idle.
    let mut idle = Duration::from_secs(20);
    loop {
        match tokio::time::timeout(idle, consumer.recv()).await {
            Ok(Ok(m)) => {
                records.push((
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
                idle = Duration::from_secs(3);
            }
            Ok(Err(e)) => bail!("consume failed: {e}"),
            Err(_) => return Ok(records),
        }
    }
}

/// The engagement pipeline of the examples, as configuration: `enrich` then
/// `route-engagement`, the `profile_viewed` table it routes to, and the
/// `profile_views` (per day too) and `post_likes` counters it increments.
pub fn engagement_pipeline() -> String {
    format!(
        r#"
[[pipeline.plugin]]
name = "enrich"
path = "{}"
[[pipeline.plugin]]
name = "route"
path = "{}"
[[pipeline.table]]
name = "profile_viewed"
columns = ["profile_id String", "viewer_id Nullable(String)", "self_view Bool", "source Nullable(String)"]
order_by = ["profile_id", "timestamp"]
[[pipeline.counter]]
name = "profile_views"
by_day = true
[[pipeline.counter]]
name = "post_likes"
"#,
        plugin_path("enrich").display(),
        plugin_path("route-engagement").display(),
    )
}

/// A TCP proxy in front of an HTTP server that loses answers: for the first `cuts`
/// requests whose request line (URL-decoded) contains `needle`, it forwards the
/// request, lets the server finish it, and closes the client's connection instead of
/// forwarding the answer. The server did the work; the client never hears of it (a
/// reset after the body was sent, a proxy's 502).
pub struct AnswerCutter {
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl AnswerCutter {
    pub async fn start(upstream: SocketAddr, needle: &str, cuts: usize) -> Result<Self> {
        Self::start_holding(upstream, needle, cuts, Duration::ZERO).await
    }

    /// Like [`AnswerCutter::start`], but holds each cut connection open, silent, for
    /// `hold` before it closes it: a server that took the request and hangs.
    pub async fn start_holding(
        upstream: SocketAddr,
        needle: &str,
        cuts: usize,
        hold: Duration,
    ) -> Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let left = Arc::new(AtomicUsize::new(cuts));
        let cut = Arc::new(AtomicUsize::new(0));
        let needle = needle.to_owned();
        let (l, c) = (left.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(cut_connection(
                    client,
                    server,
                    needle.clone(),
                    l.clone(),
                    c.clone(),
                    hold,
                ));
            }
        });
        Ok(Self { addr, cut, task })
    }

    /// How many answers it cut so far.
    pub fn cut(&self) -> usize {
        self.cut.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for AnswerCutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `bytes` as text with `+` and `%XX` decoded (as a URL's query string is).
fn url_decoded(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn cut_connection(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    needle: String,
    left: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    hold: Duration,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Whether the request in flight (HTTP/1.1: one at a time per connection) matches.
    let matched = Arc::new(AtomicBool::new(false));
    let m = matched.clone();
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tail.extend_from_slice(&buf[..n]);
            if url_decoded(&tail).contains(&needle) {
                m.store(true, Ordering::SeqCst);
                tail.clear();
            } else if tail.len() > 4096 {
                tail.drain(..tail.len() - 1024);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if matched.swap(false, Ordering::SeqCst)
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                .is_ok()
        {
            // The server answered: the work is done. Drop the answer and the connection.
            cut.fetch_add(1, Ordering::SeqCst);
            upstream.abort();
            tokio::time::sleep(hold).await;
            drop(cw);
            return;
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    upstream.abort();
}

/// A TCP proxy in front of a Kafka broker that loses answers: for the first `cuts`
/// requests with Kafka API key `api_key` (0: Produce), it forwards the request, lets
/// the broker handle it, and closes the client's connection instead of forwarding the
/// answer. The broker stored the records; the client never hears of it and retries.
/// The broker must advertise the proxy's port ([`Tansu::start_on`]).
pub struct KafkaCutter {
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KafkaCutter {
    pub async fn start(upstream: SocketAddr, api_key: i16, cuts: usize) -> Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let left = Arc::new(AtomicUsize::new(cuts));
        let cut = Arc::new(AtomicUsize::new(0));
        let (l, c) = (left.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(cut_kafka_connection(
                    client,
                    server,
                    api_key,
                    l.clone(),
                    c.clone(),
                ));
            }
        });
        Ok(Self { addr, cut, task })
    }

    /// How many answers it cut so far.
    pub fn cut(&self) -> usize {
        self.cut.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for KafkaCutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows Kafka request frames (a 4-byte size, then the API key) in a byte stream.
#[derive(Default)]
struct KafkaFrames {
    header: Vec<u8>,
    /// Bytes of the current frame still to pass.
    left: usize,
}

impl KafkaFrames {
    /// The API keys of the frames whose header completes in `chunk`.
    fn feed(&mut self, mut chunk: &[u8]) -> Vec<i16> {
        let mut keys = Vec::new();
        while !chunk.is_empty() {
            if self.left > 0 {
                let n = self.left.min(chunk.len());
                self.left -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (6 - self.header.len()).min(chunk.len());
            self.header.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            if self.header.len() == 6 {
                let h = &self.header;
                let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                keys.push(i16::from_be_bytes([h[4], h[5]]));
                self.left = size.saturating_sub(2);
                self.header.clear();
            }
        }
        keys
    }
}

async fn cut_kafka_connection(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    api_key: i16,
    left: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Set before the request to cut is forwarded: from then on nothing goes back.
    let cutting = Arc::new(AtomicBool::new(false));
    let flag = cutting.clone();
    let downstream = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if flag.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut frames = KafkaFrames::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let hit = frames.feed(&buf[..n]).contains(&api_key)
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                .is_ok();
        if hit {
            cutting.store(true, Ordering::SeqCst);
        }
        if sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if hit {
            // Let the broker handle the request, then drop both connections.
            tokio::time::sleep(Duration::from_millis(500)).await;
            cut.fetch_add(1, Ordering::SeqCst);
            break;
        }
    }
    downstream.abort();
}
