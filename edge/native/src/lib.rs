//! The edge as a native server (`claude-runner-edge`): the same state machine as the
//! Durable Object, hosted on tokio and axum, with jobs kept in SQLite.
//!
//! - [`driver`]: the one task that owns the state machine: translates commands into its
//!   events, and its effects into SQLite writes, socket sends and callers' answers.
//! - [`server`]: bind, serve, stop; HTTP requests into commands, answers into responses.
//! - [`connections`]: how many connections are held, and which one is closed to make
//!   room at `MAX_CONNECTIONS` (the one idle longest, then the oldest unproven agent
//!   socket; never a request in flight that carries the secret, nor a proven agent's
//!   socket), and how many each secret's holder may hold busy (a quarter of the cap kept
//!   for agents, the rest split equally). No I/O: the server tells it what each
//!   connection does.
//! - [`listen`]: the listening socket, its backlog sized from `MAX_CONNECTIONS`.
//! - [`socket`]: an agent's WebSocket: frames into commands, outbound frames out, and
//!   the socket's end once either side closed it.
//! - [`stall`]: each connection watched, and ended once its peer takes nothing for
//!   [`stall::WRITE_STALL_MS`] (a follower that stopped reading, a dead peer).
//! - [`store`]: job records in SQLite under `DATA_DIR`, so a restart keeps running,
//!   detached and finished jobs.
//! - [`clock`]: edge time (monotonic) and wall time for each event.

pub mod clock;
pub mod connections;
pub mod driver;
pub mod listen;
pub mod server;
pub mod socket;
pub mod stall;
pub mod store;

pub use server::{Server, ServerOptions};

/// The native edge serves one pool: its `RUNNER_SECRET` and `AGENT_PUBLIC_KEYS`, on `/`.
/// `POOLS` is the Worker's (its `/pool/<name>/` routes); set here it would be read and its
/// pools' settings checked, and then nothing of them served, so the start stops instead
/// (`claude-runner-edge` and `claude-runner up` both).
pub fn one_pool_only(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    match get("POOLS").filter(|v| !v.trim().is_empty()) {
        None => Ok(()),
        Some(listed) => anyhow::bail!(
            "POOLS is set (`{}`), but the native edge serves one pool (its RUNNER_SECRET and AGENT_PUBLIC_KEYS, on /; \
             it has no /pool/<name>/ routes): unset POOLS and the RUNNER_SECRET_<POOL>, AGENT_PUBLIC_KEYS_<POOL> settings, \
             then run one native edge per pool (each with its own LISTEN, DATA_DIR, RUNNER_SECRET and AGENT_PUBLIC_KEYS), \
             or deploy the Worker, which serves every pool in POOLS under /pool/<name>",
            shared::text::truncate(listed.trim(), 200)
        ),
    }
}

/// The settings of the edge's machine and of this host's sockets, as both starters of a
/// native edge read them (`claude-runner-edge`, and `claude-runner up`, which supplies some
/// itself through `given`): a value that is not text is refused by name before any other
/// error about a setting read (it would read as unset, and be reported as missing, or not
/// at all), then `POOLS`, then the machine's own checks. Returns the machine's settings and
/// `MAX_CONNECTIONS` as set, which [`Server::bind`] checks against the descriptor limit.
pub fn edge_settings<G: Fn(&str) -> Option<std::ffi::OsString>>(
    env: &shared::setting::TextSettings<G>,
    given: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<(edge_core::Config, Option<String>)> {
    let pools = one_pool_only(|name| env.get(name));
    let config = edge_core::Config::from_lookup(|name| given(name).or_else(|| env.get(name)));
    let max_connections = env.get("MAX_CONNECTIONS");
    env.refuse_any()?;
    pools?;
    Ok((config?, max_connections))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// POOLS was read here (the Worker's setting) and, with RUNNER_SECRET_<POOL> set, the
    /// edge started and served nothing of that pool: the start now stops, saying what to do.
    #[test]
    fn pools_stop_the_start_saying_what_to_do_instead() {
        let err = one_pool_only(|name| (name == "POOLS").then(|| "gpu, team-b".to_string())).unwrap_err().to_string();
        for says in ["POOLS", "`gpu, team-b`", "one pool", "one native edge per pool", "Worker", "/pool/<name>"] {
            assert!(err.contains(says), "{says}: {err}");
        }
        assert!(one_pool_only(|_| None).is_ok());
        assert!(one_pool_only(|name| (name == "POOLS").then(|| " ".to_string())).is_ok(), "empty is unset");
    }
}
