//! What the two native binaries (`claude-runner` and `claude-runner-edge`) need from the
//! operating system, in one place: the wall clock, fresh entropy, logging to stderr and
//! the stop signals. The `shared` crate stays pure (it builds for wasm32 too); the
//! Worker has its own clock and entropy from the Workers runtime.

/// Milliseconds since the epoch, from the system clock. For timestamps people read and
/// for expiry checks against the other side's clock; durations use a monotonic clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Fresh random bytes for ids and nonces.
pub fn entropy<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes
}

/// Logs to stderr, one line per event: `text` (colour only on a terminal) or `json`,
/// filtered by `RUST_LOG` (default `info`).
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
