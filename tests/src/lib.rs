//! The end-to-end harness: starts the real `claude-runner-edge` (or the Worker under
//! Miniflare) and `claude-runner agent` binaries on loopback, with the stand-in for
//! `claude` (`src/bin/claude-standin.rs`), and talks to them over HTTP.
//!
//! The binaries are found next to the test executable (`target/<profile>/`); the test
//! command (`tests/run`) builds them first.
//!
//! - [`git_server`]: a git server over https on 127.0.0.1 (`git http-backend` behind a
//!   self-signed certificate), optionally demanding a token, for the repository tests.
//!
//! [`proxy`] sits between agents and an edge to break their links on command; [`chaos`] is
//! the soak that does so at random.

use ed25519_dalek::SigningKey;
use serde_json::Value;
use shared::keys::{encode_signing, encode_verifying};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use serde_json::json;

pub mod git_server;
pub mod chaos;
pub mod proxy;

pub const SECRET: &str = "test-runner-secret-0123456789";

/// A stand-in edge's accept of an agent's dial: the socket, and the agent's nonce from its
/// upgrade request (`X-Runner-Agent-Nonce`), for the challenge to sign ([`challenge`]).
pub async fn accept_agent(
    tcp: tokio::net::TcpStream,
) -> Result<(tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, Option<String>), tokio_tungstenite::tungstenite::Error> {
    let mut nonce = None;
    let keep_nonce = |request: &tokio_tungstenite::tungstenite::handshake::server::Request, response| {
        nonce = request.headers().get(shared::envelope::AGENT_NONCE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, keep_nonce).await?;
    Ok((ws, nonce))
}

/// The challenge a real edge of `protocol` holding `edge_key` sends on a dial of pool
/// `pool` that carried `agent_nonce`: signed over it (unsigned without one, as for an agent
/// of before the nonce).
pub fn challenge(edge_key: &SigningKey, protocol: u32, nonce: &str, agent_nonce: Option<&str>, pool: &str) -> shared::protocol::EdgeMessage {
    shared::protocol::EdgeMessage::Challenge {
        protocol,
        nonce: nonce.to_string(),
        edge_version: "stand-in".into(),
        server_time: 0,
        proof: agent_nonce.map(|agent_nonce| shared::envelope::ChallengeProof::sign(edge_key, protocol, nonce, agent_nonce, pool)),
    }
}

/// Where the workspace's binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLAUDE_RUNNER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test knows its path");
    let mut dir = exe.parent().expect("exe has a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, or run the README's test command `tests/run`)",
        path.display()
    );
    path
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repo").to_path_buf()
}

/// A folder removed when dropped (kept if `KEEP_TEST_DIRS` is set, for post-mortems).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir()
            .join("claude-runner-tests")
            .join(format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn random_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom(&mut seed);
    SigningKey::from_bytes(&seed)
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).expect("urandom");
}

/// A port free right now on 127.0.0.1 — for a process this test starts and cannot tell to
/// pick its own (port 0) and say which: another test may take it before that process binds.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A port on 127.0.0.1 where nobody listens, for as long as this lives: a socket bound to
/// it that never listens, so a connection there is refused, and no other test can bind it
/// or be given it as its connection's own port meanwhile (a port merely found free, as
/// [`free_port`] gives, could be taken by another test's edge and answer).
pub struct ClosedPort {
    pub port: u16,
    _socket: std::os::fd::OwnedFd,
}

pub fn closed_port() -> ClosedPort {
    use std::os::fd::FromRawFd;
    // SAFETY: a new socket, owned at once; `addr` and `len` are sized for AF_INET.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let socket = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let bound = libc::bind(fd, &addr as *const libc::sockaddr_in as *const libc::sockaddr, len);
        assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
        let named = libc::getsockname(fd, &mut addr as *mut libc::sockaddr_in as *mut libc::sockaddr, &mut len);
        assert_eq!(named, 0, "getsockname: {}", std::io::Error::last_os_error());
        ClosedPort { port: u16::from_be(addr.sin_port), _socket: socket }
    }
}

/// Key material for one edge and its agents.
#[derive(Clone)]
pub struct Keys {
    pub edge: SigningKey,
    pub agents: Vec<(String, SigningKey)>,
}

impl Keys {
    pub fn new(agent_ids: &[&str]) -> Keys {
        Keys { edge: random_key(), agents: agent_ids.iter().map(|id| (id.to_string(), random_key())).collect() }
    }
    pub fn agent(&self, id: &str) -> &SigningKey {
        &self.agents.iter().find(|(a, _)| a == id).expect("known agent").1
    }
    /// How agent `id` proves itself on its dial of `pool`'s `/agent/connect`.
    pub fn prover(&self, id: &str, pool: &str) -> Prover {
        Prover { agent_id: id.to_string(), pool: pool.to_string(), key: self.agent(id).clone() }
    }
    pub fn agent_public_keys(&self) -> String {
        self.agents.iter().map(|(id, k)| format!("{id}={}", encode_verifying(&k.verifying_key()))).collect::<Vec<_>>().join(",")
    }
}

/// What an agent proves itself with on its dial of `/agent/connect` (the edge gives no
/// socket without it): its id, the pool it dials, its key. Each proof is made when asked
/// for, so a dial an hour into a test is as fresh as the first.
#[derive(Clone)]
pub struct Prover {
    pub agent_id: String,
    pub pool: String,
    pub key: SigningKey,
}

impl Prover {
    /// The `X-Runner-Agent-Proof` header's value, made now.
    pub fn proof(&self) -> String {
        shared::envelope::UpgradeProof::sign(&self.key, &self.pool, &self.agent_id, runtime::now_ms())
    }

    /// The upgrade request to `url` (`ws://…/agent/connect`) with a fresh proof and a fresh
    /// nonce, for a dialer that does not check the challenge's proof ([`Prover::request_with`]).
    pub fn request(&self, url: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        self.request_with(url, &shared::envelope::agent_nonce(runtime::entropy()))
    }

    /// The upgrade request to `url` with a fresh proof, carrying `agent_nonce` as the agent
    /// does (`X-Runner-Agent-Nonce`, [`shared::envelope::agent_nonce`]): the edge closes a
    /// dial without one, and signs it in its challenge — check that with
    /// `shared::envelope::ChallengeProof::verify` before saying hello, as the agent does.
    pub fn request_with(&self, url: &str, agent_nonce: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("a WebSocket URL");
        request.headers_mut().insert(shared::envelope::AGENT_PROOF_HEADER, self.proof().parse().expect("a proof is header text"));
        request.headers_mut().insert(shared::envelope::AGENT_NONCE_HEADER, agent_nonce.parse().expect("a nonce is header text"));
        request
    }
}

/// Heartbeats a second apart, for a test about noticing a silent or half-open link: the
/// edge drops an agent it heard nothing from for two intervals, and the agent an edge
/// (`agent/src/connection.rs`). A process paused past one interval (a loaded machine) is
/// dropped too, so only the tests that need it ask; the rest run with the shipped 15 s.
pub const QUICK_HEARTBEATS: (&str, &str) = ("HEARTBEAT_INTERVAL_MS", "1000");

/// A vanished agent's running jobs `lost` (and a waiting caller told to fall back) 5 s
/// after its link went, for a test about that end; the rest run with the shipped 120 s,
/// so an agent that comes back late (a loaded machine) keeps its jobs. Heartbeats 2.5 s
/// apart with it: the edge refuses a `LOST_AFTER_MS` under two intervals.
pub const QUICK_LOSS: [(&str, &str); 2] = [("LOST_AFTER_MS", "5000"), ("HEARTBEAT_INTERVAL_MS", "2500")];

/// Which edge host a contract test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeKind {
    Native,
    Worker,
}

/// A running edge process on loopback.
pub struct EdgeServer {
    pub kind: EdgeKind,
    pub port: u16,
    pub keys: Keys,
    pub env: HashMap<String, String>,
    pub data: TempDir,
    child: Option<Child>,
    /// A command the native edge is started under, before its own path.
    pub wrapper: Vec<String>,
}

impl EdgeServer {
    /// An edge of `kind` with `settings`; any other setting is as shipped (heartbeats 15 s
    /// apart, LOST_AFTER_MS 120 s: see [`QUICK_HEARTBEATS`] and [`QUICK_LOSS`]).
    pub fn start(kind: EdgeKind, keys: &Keys, settings: &[(&str, &str)]) -> EdgeServer {
        Self::start_wrapped(kind, keys, settings, Vec::new())
    }

    /// Like [`EdgeServer::start`], the native edge started under `wrapper` (e.g. `unshare`).
    pub fn start_wrapped(kind: EdgeKind, keys: &Keys, settings: &[(&str, &str)], wrapper: Vec<String>) -> EdgeServer {
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("RUNNER_SECRET".into(), SECRET.into());
        env.insert("EDGE_SIGNING_KEY".into(), encode_signing(&keys.edge));
        env.insert("AGENT_PUBLIC_KEYS".into(), keys.agent_public_keys());
        for (k, v) in settings {
            env.insert(k.to_string(), v.to_string());
        }
        let mut edge = EdgeServer { kind, port: 0, keys: keys.clone(), env, data: TempDir::new("edge"), child: None, wrapper };
        edge.spawn();
        edge
    }

    /// Starts the process on `self.port` (0 the first time: the OS picks a free port, and
    /// the edge's own "ready" line says which, so no two tests can race for one). A restart
    /// binds the port it had, which another process may hold a while (a test's outgoing
    /// connection given it as its own port while the edge was down): tried again for up to
    /// 60 s, then a panic that says so.
    fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.spawn_once() {
                Ok(()) => {
                    // Every client drops the connections it keeps ([`Client`]).
                    EDGE_STARTS.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Err(log) if self.port != 0 && port_taken(&log) => {
                    assert!(
                        Instant::now() < deadline,
                        "the edge could not bind port {} again for 60 s: another process took it while the edge was down; log:\n{log}",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => panic!("the edge exited before it was ready; log:\n{log}"),
            }
        }
    }

    /// One start: `Err` with the log when the process exits before it is ready.
    fn spawn_once(&mut self) -> Result<(), String> {
        let log_path = self.data.path().join("edge.log");
        let logged_before = std::fs::read_to_string(&log_path).map(|l| l.len()).unwrap_or(0);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut cmd = match self.kind {
            EdgeKind::Native => {
                let mut c = match self.wrapper.split_first() {
                    Some((program, args)) => {
                        let mut c = Command::new(program);
                        c.args(args).arg(bin("claude-runner-edge"));
                        c
                    }
                    None => Command::new(bin("claude-runner-edge")),
                };
                c.env("LISTEN", format!("127.0.0.1:{}", self.port))
                    .env("DATA_DIR", self.data.path().join("db"))
                    .env("LOG_FORMAT", "json");
                c
            }
            EdgeKind::Worker => {
                let mut c = Command::new("node");
                c.arg(repo_root().join("edge/worker/miniflare-host.mjs"))
                    .env("WORKER_PORT", self.port.to_string())
                    .env("WORKER_PERSIST_DIR", self.data.path().join("do"))
                    .env("WORKER_BINDINGS_JSON", serde_json::to_string(&self.env).unwrap());
                c
            }
        };
        // Its own process group: the Miniflare host starts workerd, which must go with it.
        use std::os::unix::process::CommandExt;
        cmd.envs(&self.env)
            .env("RUST_LOG", "info")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("edge starts"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if let Some(port) = ready_port(&log[logged_before.min(log.len())..]) {
                self.port = port;
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                // What it started goes with it (the Miniflare host's workerd).
                self.kill();
                return Err(format!("(exited: {status})\n{log}"));
            }
            assert!(Instant::now() < deadline, "the edge was not ready within 60 s; log:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("edge.log")).unwrap_or_default()
    }

    /// Stops the process (SIGTERM, then SIGKILL after 5 s) and keeps its storage.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(5));
    }

    /// Stops the process (SIGTERM, then SIGKILL after `grace`, as systemd's
    /// `TimeoutStopSec` would) and keeps its storage.
    pub fn stop_within(&mut self, grace: Duration) {
        if let Some(child) = self.child.take() {
            stop_child(child, grace);
        }
    }

    /// SIGKILL to the process and its group (a crash); the storage stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the group of a child we own.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Same port, same storage, new process.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for EdgeServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The port in an edge's "ready" line: the native edge's JSON log (`"listen":"…"`) or the
/// Miniflare host's `READY http://127.0.0.1:PORT`.
fn ready_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        if let Some(url) = line.strip_prefix("READY ") {
            return url.trim().rsplit(':').next()?.trim_end_matches('/').parse().ok();
        }
        // The native edge with LOG_FORMAT=text: `… edge ready listen=127.0.0.1:8787`.
        if line.contains("edge ready") && !line.starts_with('{') {
            let listen = line.split_whitespace().find_map(|w| w.strip_prefix("listen="))?;
            return listen.rsplit(':').next()?.parse().ok();
        }
        let v: Value = serde_json::from_str(line).ok()?;
        if v["fields"]["message"] != "edge ready" {
            return None;
        }
        v["fields"]["listen"].as_str()?.rsplit(':').next()?.parse().ok()
    })
}

/// Whether an edge's log says its port was in use (the native edge's bind error, Node's).
fn port_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("EADDRINUSE")
}

/// SIGTERM (a clean stop), then, after `grace`, SIGKILL to whatever is left of its process
/// group.
fn stop_child(mut child: Child, grace: Duration) {
    let pid = child.id() as i32;
    // SAFETY: signalling a child we own and the group it leads.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `claude-runner agent`.
pub struct AgentProc {
    pub id: String,
    pub data: TempDir,
    child: Option<Child>,
    args: Vec<(String, String)>,
    wrapper: Vec<String>,
    /// Flags after `agent` (e.g. `--one-job`).
    flags: Vec<String>,
}

pub struct AgentOpts<'a> {
    pub id: &'a str,
    pub key: SigningKey,
    pub edge_public: String,
    pub edge_ws: String,
    pub claude_bin: PathBuf,
    pub extra_env: Vec<(String, String)>,
    /// A command the agent is started under (e.g. `setpriv …`, `unshare …`), before its own argv.
    pub wrapper: Vec<String>,
}

impl<'a> AgentOpts<'a> {
    /// An agent of `edge` named `id`, running the stand-in.
    pub fn for_edge(edge: &EdgeServer, id: &'a str) -> AgentOpts<'a> {
        AgentOpts {
            id,
            key: edge.keys.agent(id).clone(),
            edge_public: encode_verifying(&edge.keys.edge.verifying_key()),
            edge_ws: edge.ws_url(),
            claude_bin: bin("claude-standin"),
            extra_env: Vec::new(),
            wrapper: Vec::new(),
        }
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.extra_env.push((k.into(), v.into()));
        self
    }
}

impl AgentProc {
    pub fn start(opts: AgentOpts) -> AgentProc {
        AgentProc::start_with_flags(opts, &[])
    }

    /// Like [`AgentProc::start`], with these flags after `agent`.
    pub fn start_with_flags(opts: AgentOpts, flags: &[&str]) -> AgentProc {
        let data = TempDir::new("agent");
        std::fs::create_dir_all(data.path().join("claude-config")).unwrap();
        let mut args: Vec<(String, String)> = vec![
            ("EDGE_URL".into(), opts.edge_ws.clone()),
            ("AGENT_ID".into(), opts.id.into()),
            ("AGENT_SIGNING_KEY".into(), encode_signing(&opts.key)),
            ("EDGE_PUBLIC_KEY".into(), opts.edge_public.clone()),
            ("CLAUDE_BIN".into(), opts.claude_bin.display().to_string()),
            ("CLAUDE_CONFIG_DIR".into(), data.path().join("claude-config").display().to_string()),
            ("DATA_DIR".into(), data.path().join("data").display().to_string()),
            ("CLAUDE_CODE_OAUTH_TOKEN".into(), "sk-ant-oat01-test-token-not-real-0123456789".into()),
            ("STANDIN_LOG".into(), data.path().join("standin.log").display().to_string()),
            // Claude gets an allow-listed environment; the stand-in's log is the test's.
            ("JOB_ENV_ALLOW".into(), "STANDIN_LOG".into()),
        ];
        args.extend(opts.extra_env);
        let flags = flags.iter().map(|f| f.to_string()).collect();
        let mut agent = AgentProc { id: opts.id.into(), data, child: None, args, wrapper: opts.wrapper, flags };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data.path().join("agent.log")).unwrap();
        let agent = bin("claude-runner");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent);
                c
            }
            None => Command::new(agent),
        };
        cmd.arg("agent")
            .args(&self.flags)
            .env_remove("ANTHROPIC_API_KEY")
            // A test may ask for more of the agent's log (its own RUST_LOG comes after).
            .env("RUST_LOG", "info")
            .envs(self.args.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("agent starts"));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("agent.log")).unwrap_or_default()
    }

    /// Sets `name` for the agent's next start (e.g. `EDGE_URL`, to move it to another edge).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.args.retain(|(k, _)| k != name);
        self.args.push((name.into(), value.into()));
    }

    /// The value the agent was started with for `name`.
    pub fn env_value(&self, name: &str) -> Option<String> {
        self.args.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// Every stand-in invocation so far (argv, cwd, prompt, pid, `at`).
    pub fn claude_runs(&self) -> Vec<Value> {
        self.standin_log().into_iter().filter(|v| v.get("end").is_none()).collect()
    }

    /// The stand-in's log: a line per start, and one (`"end": true`) per result printed.
    pub fn standin_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.data.path().join("standin.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }


    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, Duration::from_secs(5));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the agent again if it is not running (it was killed, or exited).
    pub fn ensure_running(&mut self) {
        let running = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if !running {
            self.child = None;
            self.spawn();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the agent process.
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: signalling a child we own.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Waits up to `within` for the agent to exit by itself; its exit status, if it did.
    /// Looked at once more after the deadline, as [`eventually`] does: a test thread paused
    /// past the deadline otherwise gave up on an agent that had exited.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let last = Instant::now() >= deadline;
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(status);
            }
            if last {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the agent again after it exited by itself (same settings, same folders).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the agent is still running");
        self.spawn();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `e` in words with the errors under it (reqwest's own says only "error sending
/// request"; hyper's kind, below it, says what failed).
fn with_causes(e: &reqwest::Error) -> String {
    let mut said = e.to_string();
    let mut under = std::error::Error::source(e);
    while let Some(cause) = under {
        said.push_str(&format!(": {cause}"));
        under = cause.source();
    }
    said
}

/// An HTTP answer: status and JSON body (Null if not JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

/// The edges started in this process (each start and restart of an [`EdgeServer`]): a
/// [`Client`] whose connections were kept before the latest drops them.
static EDGE_STARTS: AtomicU64 = AtomicU64::new(0);

/// An HTTP client of an edge, for the tests. The connections it keeps are dropped at every
/// edge start: one kept to an edge since stopped was taken for the next request once that
/// edge was back, and failed before any answer ("error sending request": hyper's
/// `IncompleteMessage`, the request written and the connection found closed), a POST right
/// after `edge.restart()` included (`native_edge::a_request_right_after_an_edge_restart_reaches_the_new_edge`).
/// Not sent again instead: that error does not say the edge never read the request (an edge
/// that reads it and dies before answering gives the same), and a POST sent twice would be
/// two jobs.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    /// The client, and the [`EDGE_STARTS`] it was made after.
    http: std::sync::Arc<std::sync::Mutex<(u64, reqwest::Client)>>,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let http = (EDGE_STARTS.load(Ordering::SeqCst), Client::connections());
        Client { base: base.to_string(), http: std::sync::Arc::new(std::sync::Mutex::new(http)) }
    }

    /// A client with no connection kept yet.
    fn connections() -> reqwest::Client {
        // workerd (the Worker's local host) closes a keep-alive connection after about 5 s
        // idle, and a request sent on it just then is reset: never reuse one idle that long.
        reqwest::Client::builder().no_proxy().pool_idle_timeout(Duration::from_secs(2)).build().unwrap()
    }

    /// The client to send with: a new one, none of its connections kept, once an edge
    /// started after this one was made.
    fn http(&self) -> reqwest::Client {
        let mut http = self.http.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let started = EDGE_STARTS.load(Ordering::SeqCst);
        if http.0 != started {
            *http = (started, Client::connections());
        }
        http.1.clone()
    }

    pub async fn send(&self, method: &str, path: &str, secret: Option<&str>, body: Option<Vec<u8>>) -> Answer {
        self.try_send(method, path, secret, body).await.unwrap_or_else(|e| panic!("the edge answers: {e}"))
    }

    /// Like [`Client::send`], but a connection that fails (the edge was killed) is an
    /// `Err`, not a panic.
    pub async fn try_send(&self, method: &str, path: &str, secret: Option<&str>, body: Option<Vec<u8>>) -> Result<Answer, String> {
        let mut req = self.http().request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(s) = secret {
            req = req.header("X-Runner-Secret", s);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| with_causes(&e))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        Ok(Answer { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text })
    }

    pub async fn execute(&self, body: Value) -> Answer {
        self.send("POST", "/execute", Some(SECRET), Some(body.to_string().into_bytes())).await
    }

    /// `POST /execute` with the secret and these headers besides (a caller's own, such as
    /// sandbox-executor's `X-Request-ID` and Cloudflare Access headers).
    pub async fn execute_with_headers(&self, body: Value, headers: &[(&str, &str)]) -> Answer {
        let mut req = self.http().post(format!("{}/execute", self.base)).header("X-Runner-Secret", SECRET);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.header("content-type", "application/json").body(body.to_string()).send().await.expect("the edge answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        Answer { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
    }

    /// A request with the secret and one header whose value is raw bytes (a header a
    /// caller's client may send with bytes past ASCII in it).
    pub async fn send_with_header(&self, method: &str, path: &str, body: Option<Value>, name: &str, value: &[u8]) -> Answer {
        let mut req = self.http().request(method.parse().unwrap(), format!("{}{path}", self.base)).header("X-Runner-Secret", SECRET);
        req = req.header(name, reqwest::header::HeaderValue::from_bytes(value).expect("a header value's bytes"));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.expect("the edge answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        Answer { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
    }

    pub async fn submit(&self, body: Value) -> Answer {
        self.send("POST", "/jobs", Some(SECRET), Some(body.to_string().into_bytes())).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, Some(SECRET), None).await
    }

    /// `/health` as anyone may read it: the status code and `{"status"}` alone.
    pub async fn health(&self) -> Answer {
        self.send("GET", "/health", None, None).await
    }

    /// `/health` with the secret: the whole body (agents, login, queue).
    pub async fn health_full(&self) -> Answer {
        self.send("GET", "/health", Some(SECRET), None).await
    }

    /// Polls until `/health` says 200 (an agent is connected and its login usable).
    pub async fn wait_online(&self) {
        self.wait_health(200).await
    }

    /// Polls until `/health` (read with the secret) says the agent's login needs a person.
    pub async fn wait_needs_login(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.health_full().await.body["oauth"]["needs_login"] != true {
            assert!(Instant::now() < deadline, "the agent never reported its missing login");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_health(&self, status: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let h = self.health().await;
            if h.status == status {
                return;
            }
            assert!(Instant::now() < deadline, "health never became {status}; last: {} {}", h.status, h.text);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Follows `GET /jobs/{id}/events` to its end: the status, content type and every
    /// SSE event as (event name, data).
    pub async fn follow(&self, job_id: &str) -> (u16, String, Vec<(String, String)>) {
        let resp = self.open_events(job_id).await;
        let status = resp.status().as_u16();
        let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        (status, content_type, read_events(resp).await)
    }

    /// `GET /jobs/{id}/events`, answered (the stream is open) but not read yet.
    pub async fn open_events(&self, job_id: &str) -> reqwest::Response {
        self.resume_events(job_id, None).await
    }

    /// Follows a job's progress as a reconnecting `EventSource` does: from after
    /// `last_event_id` (its `Last-Event-ID` header), or from the start.
    pub async fn resume_events(&self, job_id: &str, last_event_id: Option<&str>) -> reqwest::Response {
        let mut req = self.http().get(format!("{}/jobs/{job_id}/events", self.base)).header("X-Runner-Secret", SECRET);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        req.send().await.expect("the edge answers")
    }

    /// Polls a job until it is in a terminal state.
    pub async fn wait_job(&self, job_id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            // A request sent on a kept connection the edge closed as it stopped (a test that
            // restarts the edge, then waits for its job) fails once: asked again, on a new one.
            let a = match self.try_send("GET", &format!("/jobs/{job_id}"), Some(SECRET), None).await {
                Ok(a) => a,
                Err(e) => {
                    assert!(Instant::now() < deadline, "job {job_id}: the edge did not answer: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let state = a.body["state"].as_str().unwrap_or("").to_string();
            if !["queued", "dispatched", "running", ""].contains(&state.as_str()) {
                return a.body;
            }
            assert!(Instant::now() < deadline, "job {job_id} did not end; last: {}", a.text);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sends `head` — a request line and headers, ending with the blank line — on a raw
/// connection and never anything more (whatever body the head announces), then returns
/// the status line the edge answers within `within`, or `None` if it answered nothing:
/// whether an edge answers without waiting for a body.
pub fn answer_to_head(port: u16, head: &str, within: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the edge listens");
    tcp.write_all(head.as_bytes()).expect("the head is sent");
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(2).any(|w| w == b"\r\n") {
        let left = deadline.checked_duration_since(Instant::now())?;
        tcp.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    text.lines().next().filter(|l| !l.is_empty()).map(str::to_string)
}

/// Connections to an edge's `/agent/connect` that never say a word — what anyone holding
/// an agent's proof can open (one played back within its window, or taken on the path):
/// `n` of them, each dropped and opened again every `period`, until the crowd is dropped.
pub struct SilentCrowd {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    opened: std::sync::Arc<AtomicU32>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SilentCrowd {
    pub fn start(connect_url: &str, prover: &Prover, n: usize, period: Duration) -> SilentCrowd {
        use futures_util::StreamExt;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opened = std::sync::Arc::new(AtomicU32::new(0));
        let tasks = (0..n)
            .map(|i| {
                let (url, stop, opened, prover) = (connect_url.to_string(), stop.clone(), opened.clone(), prover.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
                    while !stop.load(Ordering::SeqCst) {
                        let renew = tokio::time::Instant::now() + period;
                        if let Ok(Ok((mut ws, _))) = tokio::time::timeout(period, tokio_tungstenite::connect_async(prover.request(&url))).await {
                            opened.fetch_add(1, Ordering::SeqCst);
                            // Read (the challenge, a close) but never answer, until renewal.
                            while let Ok(Some(Ok(_))) = tokio::time::timeout_at(renew, ws.next()).await {}
                        }
                        tokio::time::sleep_until(renew).await;
                    }
                })
            })
            .collect();
        SilentCrowd { stop, opened, tasks }
    }

    /// Connections opened so far.
    pub fn opened(&self) -> u32 {
        self.opened.load(Ordering::SeqCst)
    }
}

impl Drop for SilentCrowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Reads an event stream to its end (at most a minute): every SSE event as (event name,
/// data).
pub async fn read_events(resp: reqwest::Response) -> Vec<(String, String)> {
    use futures_util::StreamExt;
    let mut text = String::new();
    let mut body = resp.bytes_stream();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline.into(), body.next()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_string(), data.to_string()))
        })
        .collect()
}

/// A follower of a job's events (`GET /jobs/{id}/events` on the edge at `port`) that
/// reads the status line and never another byte: a plain blocking socket, so nothing
/// reads for it. The socket, and the status as three ASCII digits. Call it from
/// `spawn_blocking`.
pub fn stalled_follower(port: u16, job_id: &str) -> (std::net::TcpStream, [u8; 3]) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the edge");
    let head = format!("GET /jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Runner-Secret: {SECRET}\r\n\r\n");
    tcp.write_all(head.as_bytes()).expect("send the request");
    let mut line = [0u8; 12]; // "HTTP/1.1 200"
    tcp.set_read_timeout(Some(Duration::from_secs(60))).expect("set a read timeout");
    tcp.read_exact(&mut line).expect("the status line");
    (tcp, [line[9], line[10], line[11]])
}

/// Whoever sits on the path between an agent and its edge: a WebSocket relay on loopback
/// that passes every frame both ways, keeps a copy of the agent's text frames (to replay)
/// and can slip frames of its own towards the edge.
/// Point the agent's `EDGE_URL` at [`PathRelay::ws_url`].
pub struct PathRelay {
    port: u16,
    inject: tokio::sync::mpsc::UnboundedSender<String>,
    heard: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PathRelay {
    /// Relays one agent connection at a time to `edge_ws` (`ws://host:port[/pool/x]`).
    pub async fn start(edge_ws: &str) -> PathRelay {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<String>();
        let edge = format!("{edge_ws}/agent/connect");
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = heard.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // The agent's proof and nonce are passed on, as a proxy on the path would.
                let mut kept_headers = Vec::new();
                let keep_proof = |request: &tokio_tungstenite::tungstenite::handshake::server::Request, response| {
                    for name in [shared::envelope::AGENT_PROOF_HEADER, shared::envelope::AGENT_NONCE_HEADER] {
                        if let Some(value) = request.headers().get(name) {
                            kept_headers.push((name, value.clone()));
                        }
                    }
                    Ok(response)
                };
                let Ok(agent) = tokio_tungstenite::accept_hdr_async(tcp, keep_proof).await else { continue };
                let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(edge.as_str()).unwrap();
                for (name, value) in kept_headers {
                    request.headers_mut().insert(name, value);
                }
                let Ok((upstream, _)) = tokio_tungstenite::connect_async(request).await else { continue };
                let (mut to_agent, mut from_agent) = agent.split();
                let (mut to_edge, mut from_edge) = upstream.split();
                loop {
                    tokio::select! {
                        m = from_agent.next() => match m {
                            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                                if let Message::Text(text) = &m {
                                    kept.lock().unwrap().push(text.to_string());
                                }
                                if to_edge.send(m).await.is_err() {
                                    break;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        },
                        m = from_edge.next() => match m {
                            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => if to_agent.send(m).await.is_err() { break },
                            Some(Ok(_)) => {}
                            _ => break,
                        },
                        Some(text) = injected.recv() => if to_edge.send(Message::Text(text.into())).await.is_err() { break },
                    }
                }
            }
        });
        PathRelay { port, inject, heard, task }
    }

    /// The text frames the agent sent so far, in order.
    pub fn agent_frames(&self) -> Vec<String> {
        self.heard.lock().unwrap().clone()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Sends `frame` to the edge as if the agent had.
    pub fn inject(&self, frame: String) {
        let _ = self.inject.send(frame);
    }
}

impl Drop for PathRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Which regions of an agent's slot record `DATA_DIR/records/<n>` hold a record naming
/// `job_id`: (its "started" region, its result region). Read as raw bytes — a region holds
/// a record when it starts with the format's magic (`agent_core::record`).
pub fn slot_record_names(data_dir: &Path, n: usize, job_id: &str) -> (bool, bool) {
    let bytes = std::fs::read(data_dir.join("records").join(n.to_string())).unwrap_or_default();
    let named = format!("\"job_id\":\"{job_id}\"");
    let names = |region: &[u8]| region.starts_with(b"CRr1") && String::from_utf8_lossy(region).contains(&named);
    let (started, result) = bytes.split_at(bytes.len().min(4096));
    (names(started), names(result))
}

/// Waits up to `within` for `cond`.
/// A Claude login in `config` whose access token expired and can be refreshed (a refresh is
/// due), with the agent's refresh lock held by another process, as another Claude refreshing
/// it would: `flock(1)` holds it until its stdin closes (drop or close the child's stdin to
/// let it go). Returns once the lock is seen held.
pub async fn stale_login_with_the_refresh_held(config: &Path) -> Child {
    let stale = serde_json::json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-stale-0123456789", "refreshToken": "sk-ant-ort01-stale-0123456789", "expiresAt": 1_000u64}});
    std::fs::write(config.join(".credentials.json"), stale.to_string()).unwrap();
    let lock = config.join(".claude-runner-refresh.lock");
    let other = Command::new("flock").arg(&lock).args(["sh", "-c", "read x"]).stdin(Stdio::piped()).spawn().unwrap();
    let held = eventually(Duration::from_secs(30), || {
        std::fs::File::open(&lock).is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
    });
    assert!(held.await, "flock(1) never took the lock");
    other
}

/// Whether `secret` (its first 16 bytes) reads in `out`, a file printed base64-encoded (the
/// stand-in's `@base64`, a file a job wrote): what follows `the file is`, masks and line
/// breaks left out, decoded at each alignment.
pub fn readable_in_base64(out: &str, secret: &str) -> bool {
    use base64::Engine;
    let printed: String = out.trim_start_matches("the file is").split_whitespace().collect::<String>().replace("[REDACTED]", "");
    (0..4).any(|skip| {
        let tail = &printed[skip.min(printed.len())..];
        let decoded = base64::engine::general_purpose::STANDARD.decode(&tail[..tail.len() / 4 * 4]).unwrap_or_default();
        String::from_utf8_lossy(&decoded).contains(&secret[..secret.len().min(16)])
    })
}

pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// The Worker variants need the bundle `edge/worker/build.sh` makes; fail clearly without it.
pub fn require_worker_bundle() {
    let bundle = repo_root().join("edge/worker/build/index.js");
    assert!(bundle.exists(), "{} is missing: run edge/worker/build.sh (tests/run does)", bundle.display());
}

// Helpers for the benchmark (`src/bin/bench.rs`).

impl EdgeServer {
    /// The edge's process id (for the Worker: node running the Miniflare host, with
    /// workerd as its child).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// A `/proc/PID/status` figure in KiB, e.g. `VmRSS` (resident memory) or `VmHWM` (its peak).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The proportional set size of a process in KiB (`Pss` of `/proc/PID/smaps_rollup`): its
/// private pages, and each page it shares with n processes counted 1/n.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|l| l.split(':').next() == Some("Pss"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A process's command line, its arguments joined by spaces (empty if it is gone).
pub fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>().join(" ")
}

/// A process and all its descendants (the Worker host is node plus workerd).
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if let Some(ppid) = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok()) {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

impl EdgeServer {
    /// The peak resident memory of the edge so far in KiB (`VmHWM`): the native
    /// process, or node and workerd.
    pub fn peak_rss_kib(&self) -> u64 {
        self.pid().map_or(0, |pid| process_tree(pid).into_iter().filter_map(|p| proc_status_kib(p, "VmHWM")).sum())
    }
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// A native edge with agent `spark` connected to it through a [`proxy::Proxy`], and a
/// caller: the scene of the recovery tests that cut the agent's link around a job.
pub struct ProxiedAgent {
    pub edge: EdgeServer,
    pub agent: AgentProc,
    pub client: Client,
    pub proxy: proxy::Proxy,
}

/// What an edge's job order to its agent starts with on the wire (`EdgeMessage::Job`; the
/// edge's WebSocket frames are not masked): for [`proxy::Proxy::blackhole_when`] to cut
/// the link at the moment the order is sent.
pub const JOB_ORDER: &str = r#"{"type":"job""#;

impl ProxiedAgent {
    /// Starts them and waits until `/health` says the agent can work.
    pub async fn start(edge_settings: &[(&str, &str)]) -> ProxiedAgent {
        let keys = Keys::new(&["spark"]);
        let edge = EdgeServer::start(EdgeKind::Native, &keys, edge_settings);
        let proxy = proxy::Proxy::start(edge.port).await;
        let opts = AgentOpts { edge_ws: format!("ws://127.0.0.1:{}", proxy.port()), ..AgentOpts::for_edge(&edge, "spark") };
        let agent = AgentProc::start(opts);
        let client = Client::new(&edge.url());
        client.wait_online().await;
        ProxiedAgent { edge, agent, client, proxy }
    }

    /// Submits `prompt` (`POST /jobs`) and waits until Claude has started it (the
    /// stand-in logged its start); returns the job's id. No wait for the agent's first
    /// statement of its free slots is needed: the edge sends no order before it.
    pub async fn run_job(&self, prompt: &str) -> String {
        let runs = self.agent.claude_runs().len();
        let a = self.client.submit(serde_json::json!({ "prompt": prompt })).await;
        assert_eq!(a.status, 202, "{}", a.text);
        let job_id = a.body["job_id"].as_str().expect("a job id").to_string();
        let started = eventually(Duration::from_secs(60), || self.agent.claude_runs().len() > runs).await;
        assert!(started, "Claude never started `{prompt}`:\n{}\n{}", self.agent.log(), self.edge.log());
        job_id
    }
}

/// One request a [`Webhook`] received.
#[derive(Debug, Clone)]
pub struct Hook {
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The status it was answered with (the script's).
    pub answered: u16,
}

/// A local test webhook on 127.0.0.1: records every POST and answers each with the next
/// status of its script (then 200).
pub struct Webhook {
    pub port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<Hook>>>,
}

impl Webhook {
    pub fn start(script: Vec<u16>) -> Webhook {
        Webhook::answering_after(Duration::ZERO, script)
    }

    /// A receiver that takes each POST (recorded at once) and answers it only `delay`
    /// later, one at a time.
    pub fn answering_after(delay: Duration, script: Vec<u16>) -> Webhook {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&received);
        std::thread::spawn(move || {
            let mut script = script.into_iter();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut headers = HashMap::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let status = script.next().unwrap_or(200);
                log.lock().unwrap().push(Hook { path, headers, body: String::from_utf8_lossy(&body).into_owned(), answered: status });
                std::thread::sleep(delay);
                let _ = write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        Webhook { port, received }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn received(&self) -> Vec<Hook> {
        self.received.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While held, a closed port refuses connections and no listener can take it (a port
    /// [`free_port`] found free can be taken by anyone).
    #[test]
    fn a_closed_port_refuses_connections_and_cannot_be_taken() {
        let nobody = closed_port();
        let taken = std::net::TcpListener::bind(("127.0.0.1", nobody.port)).map(drop).map_err(|e| e.kind());
        assert_eq!(taken, Err(std::io::ErrorKind::AddrInUse));
        let dialed = std::net::TcpStream::connect(("127.0.0.1", nobody.port)).map(drop).map_err(|e| e.kind());
        assert_eq!(dialed, Err(std::io::ErrorKind::ConnectionRefused));
    }

    /// An edge restarted while another process holds its port a moment (a listener here,
    /// for 1 s) starts once the port is free, on it.
    #[test]
    fn a_restart_waits_for_its_port_held_a_moment() {
        let mut edge = EdgeServer::start(EdgeKind::Native, &Keys::new(&["spark"]), &[]);
        let port = edge.port;
        edge.stop();
        let holder = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the stopped edge's port");
        let freed = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            drop(holder);
        });
        edge.restart();
        freed.join().unwrap();
        assert_eq!(edge.port, port);
        assert!(edge.log().contains("Address already in use"), "the restart never met the held port:\n{}", edge.log());
    }
}
