//! The edge as a native server (`claude-runner-edge`): the same state machine as the
//! Durable Object, hosted on tokio and axum, with jobs kept in SQLite.
//!
//! - [`driver`]: the one task that owns the state machine: translates commands into its
//!   events, and its effects into SQLite writes, socket sends and callers' answers.
//! - [`server`]: bind, serve, stop; HTTP requests into commands, answers into responses.
//! - [`socket`]: an agent's WebSocket: frames into commands, outbound frames out, and
//!   the socket's end once either side closed it.
//! - [`store`]: job records in SQLite under `DATA_DIR`, so a restart keeps queued,
//!   running and finished jobs.
//! - [`clock`]: edge time (monotonic) and wall time for each event.

pub mod clock;
pub mod driver;
pub mod server;
pub mod socket;
pub mod store;

pub use server::{Server, ServerOptions};

/// Milliseconds since the epoch, from the system clock: the only clock the edge reads.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Logs to stderr, one line per event: `text` (colour only on a terminal) or `json`,
/// filtered by `RUST_LOG` (default `info`). Shared by `claude-runner-edge` and `claude-runner`.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGINT or SIGTERM: how both binaries learn to stop.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handlers install");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Fresh random bytes for ids and nonces.
pub fn entropy<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes
}
