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
//! - [`listen`]: the listening socket, its backlog sized from `MAX_CONNECTIONS`; each
//!   accepted socket's TCP keepalive and `TCP_USER_TIMEOUT`, so a peer gone without a
//!   word is noticed within a minute.
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
/// at all), then `POOLS`, then the machine's own checks.
pub fn edge_settings<G: Fn(&str) -> Option<std::ffi::OsString>>(
    env: &shared::setting::TextSettings<G>,
    given: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<EdgeSettings> {
    let pools = one_pool_only(|name| env.get(name));
    let config = edge_core::Config::from_lookup(|name| given(name).or_else(|| env.get(name)));
    let max_connections = env.get("MAX_CONNECTIONS");
    let execute_keepalive_ms = env.get("EXECUTE_KEEPALIVE_MS");
    env.refuse_any()?;
    pools?;
    Ok(EdgeSettings { config: config?, max_connections, execute_keepalive_ms: execute_keepalive(execute_keepalive_ms)? })
}

/// What [`edge_settings`] read.
pub struct EdgeSettings {
    pub config: edge_core::Config,
    /// `MAX_CONNECTIONS` as set, which [`Server::bind`] checks against the descriptor limit.
    pub max_connections: Option<String>,
    /// `EXECUTE_KEEPALIVE_MS`: see [`execute_keepalive`].
    pub execute_keepalive_ms: Option<u64>,
}

/// The shortest and longest `EXECUTE_KEEPALIVE_MS`. Longest: a proxy that cuts an answer
/// silent for 100 s (Cloudflare's, in front of a Tunnel) must hear a byte before then.
pub const EXECUTE_KEEPALIVE_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=90_000;

/// `EXECUTE_KEEPALIVE_MS`, this host's alone: after that long with no answer, an
/// `/execute` is answered `200` at once and a space is sent every so often until its JSON
/// follows ([`server`]) — for a proxy in front that cuts a silent answer (a Cloudflare
/// Tunnel, after about 100 s). Unset (or empty): off, each answer with its own status.
/// The Worker has no such cut between Workers, so it has no such setting.
pub fn execute_keepalive(text: Option<String>) -> anyhow::Result<Option<u64>> {
    let Some(text) = text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else { return Ok(None) };
    let (low, high) = (*EXECUTE_KEEPALIVE_RANGE_MS.start(), *EXECUTE_KEEPALIVE_RANGE_MS.end());
    match text.parse::<u64>() {
        Ok(ms) if EXECUTE_KEEPALIVE_RANGE_MS.contains(&ms) => Ok(Some(ms)),
        _ => anyhow::bail!(
            "EXECUTE_KEEPALIVE_MS must be milliseconds from {low} to {high} (20000 behind a Cloudflare Tunnel, which cuts an answer silent for 100 s), or unset for none; got `{}`",
            shared::text::truncate(&text, 40)
        ),
    }
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

    #[test]
    fn the_execute_keepalive_is_off_unset_and_refused_outside_its_range() {
        assert_eq!(execute_keepalive(None).unwrap(), None);
        assert_eq!(execute_keepalive(Some(" ".into())).unwrap(), None, "empty is unset");
        assert_eq!(execute_keepalive(Some("20000".into())).unwrap(), Some(20_000));
        assert_eq!(execute_keepalive(Some(" 100 ".into())).unwrap(), Some(100));
        for bad in ["99", "90001", "0", "-5", "20s", "1e4"] {
            let err = execute_keepalive(Some(bad.into())).unwrap_err().to_string();
            assert!(err.contains("EXECUTE_KEEPALIVE_MS") && err.contains("20000") && err.contains(&format!("`{bad}`")), "{err}");
        }
    }
}
