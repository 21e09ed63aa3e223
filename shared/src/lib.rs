//! What both sides of Claude Runner speak. Pure code: no tokio, no I/O, no clock and no
//! randomness of its own (callers pass time and entropy in), so it builds for the native
//! edge, the agent and the wasm32 Worker alike.
//!
//! - [`contract`]: the HTTP contract of the edge — requests, responses, error bodies and
//!   the status code each error maps to.
//! - [`job`]: a job as both sides see it: the validated spec the agent runs, its result,
//!   its lifecycle states.
//! - [`oauth`]: the agent's report of its Claude login, and how the edge judges it.
//! - [`usage`]: the subscription's usage window (Claude's `rate_limit_event`s).
//! - [`repo`]: repository addresses (`repo_url`), git names, and mirror names.
//! - [`placement`]: agent labels, and where a job may run, whose it is, its priority.
//! - [`protocol`]: the versioned messages of the agent ⇄ edge WebSocket; `frame` reads
//!   them by their `type` first.
//! - [`envelope`]: ed25519-signed envelopes and MACed ones, with domain separation (jobs,
//!   cancels, hello, reports).
//! - [`link`]: the keys of one connection: X25519 in the signed handshake, HMAC-SHA256.
//! - [`ids`]: agent ids, plain ids and hex, checked and made the same way everywhere.
//! - [`keys`]: base64 key encoding and the `AGENT_PUBLIC_KEYS` keyring.
//! - [`setting`]: a setting's value as meant: trimmed, blank as unset (agent and edges).
//! - [`text`]: cutting text to a byte budget on character boundaries; outside words as
//!   one log line.
//! - [`time`]: milliseconds since the epoch ⇄ RFC 3339 text.

pub mod contract;
pub mod envelope;
mod frame;
pub mod ids;
pub mod job;
pub mod keys;
pub mod link;
pub mod oauth;
pub mod placement;
pub mod protocol;
pub mod repo;
pub mod setting;
pub mod text;
pub mod time;
pub mod usage;

/// Milliseconds since the Unix epoch. Every timestamp in the system is one of these; the
/// host reads the clock and passes it in.
pub type Millis = u64;
