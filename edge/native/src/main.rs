//! `claude-runner-edge`: the edge as a native server. Configuration comes from the
//! environment (README "Configuration"); `--help` lists it.

use edge_native::{Server, ServerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

const HELP: &str = "claude-runner-edge: the Claude Runner edge as a native server

Environment:
  RUNNER_SECRET          callers' shared secret (X-Runner-Secret)            required
  EDGE_SIGNING_KEY       base64 ed25519 seed that signs jobs                 required
  AGENT_PUBLIC_KEYS      id=base64key,... agents allowed to connect          required
  RUNNER_SECRETS         name=secret,... named callers with their own secrets
  ADMIN_SECRET           the secret of GET /pools (16+ chars; unset: closed)
  LISTEN                 address to serve on             (default 127.0.0.1:8787)
  DATA_DIR               where jobs are stored  (default ~/.local/share/claude-runner/edge)
  HEARTBEAT_INTERVAL_MS, LOST_AFTER_MS, MAX_TIMEOUT_MS, MAX_BODY_BYTES,
  JOB_RETENTION_MS, QUEUE_TTL_MS, MAX_QUEUED_JOBS, MAX_QUEUED_PER_CALLER,
  TIMEOUT_MARGIN_MS, SSE_KEEPALIVE_MS,
  MAX_RETAINED_JOBS, MAX_RETAINED_BYTES               limits (see README)
  NOTIFY_URL             where alerts are posted (ntfy topic or webhook)   (default none)
  OAUTH_WARN_HOURS, OFFLINE_ALERT_MS, NOTIFY_MIN_INTERVAL_MS   when to alert (see README)
  CALLBACK_HOSTS         host,host: where a job's callback_url may point   (default none)
  MAX_CONNECTIONS        connections held at once; at the cap the one idle longest
                         is closed; callers' requests in flight hold at most 3/4,
                         each secret an equal share of that (429 past it)
                                      (default: the descriptor limit less 320, <= 16384)
  LOG_FORMAT             text | json                                (default text)
  RUST_LOG               log filter                                 (default info)

`claude-runner keygen` makes the keys and prints what to set.";

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return;
    }
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("claude-runner-edge {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    match runtime::log_format(&std::env::var("LOG_FORMAT").unwrap_or_default()) {
        Ok(format) => runtime::init_logging(format),
        Err(e) => {
            eprintln!("claude-runner-edge: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = run() {
        eprintln!("claude-runner-edge: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let config = edge_core::Config::from_lookup(|name| std::env::var(name).ok())?;
    let listen: SocketAddr = std::env::var("LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:8787".into())
        .parse()
        .map_err(|e| anyhow::anyhow!("LISTEN must be an address like 127.0.0.1:8787: {e}"))?;
    let data_dir = std::env::var_os("DATA_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into());
        home.join(".local/share/claude-runner/edge")
    });
    // One thread: every request and frame goes through the one task that drives the
    // machine, so a second worker only added hand-offs between threads (a futex wake and
    // an epoll round per hop, about a fifth of the edge's CPU per job) and parallelism
    // for nothing but socket reads and writes.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = Server::bind(ServerOptions { config, listen, data_dir }).await?;
        server.serve(runtime::shutdown_signal()).await
    })
}
