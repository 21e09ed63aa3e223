//! The edge's decisions, free of I/O. Both hosts — the native server (`claude-runner-edge`)
//! and the Cloudflare Durable Object — feed it events with the time (and, where an id must
//! be made, entropy) and carry out the [`Effect`]s it returns. Nothing here reads a clock,
//! touches a socket or a disk, so both hosts behave the same and tests can drive it with
//! simulated time.
//!
//! - [`config`]: settings, from the environment variables of DESIGN.md.
//! - [`job`]: one job's record (what is stored) and its timers.
//! - [`session`]: one agent connection: handshake, credits, heartbeats.
//! - [`machine`]: the [`Edge`] itself: queue, dispatch, results, deadlines, health.
//! - [`http`]: the HTTP contract on top of the machine: auth, routing, bodies.

pub mod config;
pub mod http;
pub mod job;
pub mod machine;
pub mod session;

pub use config::Config;
pub use machine::{Edge, Effect};
pub use shared::Millis;

#[cfg(test)]
mod tests;
