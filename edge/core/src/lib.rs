//! The edge's decisions, free of I/O. Both hosts — the native server (`claude-runner-edge`)
//! and the Cloudflare Durable Object — feed it events with the time (and, where an id must
//! be made, entropy) and carry out the [`Effect`]s it returns. Nothing here reads a clock,
//! touches a socket or a disk, so both hosts behave the same and tests can drive it with
//! simulated time. ARCHITECTURE.md ("The edge: one state machine, two hosts", "Life of a
//! job") says which file does each step.
//!
//! - [`config`]: settings, from the environment variables of the README.
//! - [`clock`]: the time an event carries — edge time for durations, wall time for dates.
//! - [`record`]: one job's stored record and its timers.
//! - [`session`]: one agent connection's record and the handshake check.
//! - [`upgrade`]: the agents' door: the proof an upgrade to `/agent/connect` must carry,
//!   and refusals counted and logged with a bound.
//! - [`machine`]: the [`Edge`] itself — sessions, jobs, callers, deadlines, storage
//!   failures, stop, views — one `impl` block per concern.
//! - [`queue`]: the pool's queue, fair between callers (turns, priorities).
//! - [`routing`]: which agent takes a job: fit (labels, `agent_id`), credit, mirror, load.
//! - [`notify`]: alerts to `NOTIFY_URL` and result callbacks — which, when, how often,
//!   signed how.
//! - [`progress`]: a running job's progress backlog and its Server-Sent Events text.
//! - [`body`]: how a host reads a request body (limit, drain, broken uploads).
//! - [`response`]: what a caller is answered.
//! - [`page`]: the phone page at `GET /` (plain HTML, CSS and JavaScript; strict CSP).
//! - [`path`]: a request's path into its pool and route (leading slashes folded).
//! - [`http`]: the HTTP contract on top of the machine: auth, routing, status codes.

pub mod body;
pub mod clock;
pub mod config;
pub mod http;
pub mod machine;
pub mod notify;
pub mod page;
pub mod path;
pub mod progress;
pub mod queue;
pub mod record;
pub mod response;
pub mod routing;
pub mod session;
pub mod upgrade;

pub use clock::Now;
pub use config::Config;
pub use machine::{split_writes, CallerId, Edge, Effect, Writes};
pub use response::Response;
pub use shared::Millis;

#[cfg(test)]
mod tests;
