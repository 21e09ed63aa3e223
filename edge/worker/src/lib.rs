//! The edge as a Cloudflare Worker: one Durable Object per pool hosts the same state
//! machine ([`edge_core::Edge`]) as the native server. This crate only translates I/O —
//! requests, WebSocket frames, alarms, storage — into the machine's events and carries out
//! the [`edge_core::Effect`]s it returns; every decision is the machine's, so both hosts
//! behave the same.
//!
//! - [`entry`]: the Worker's fetch handler: picks the pool (`/pool/{name}/…`, else
//!   `default`) and forwards the request to that pool's Durable Object.
//! - [`object`]: the Durable Object `EdgeDurableObject`: translates requests, agent
//!   frames, socket closes and alarms into the machine's events (rebuilding it lazily
//!   after every eviction), and its effects into storage writes, socket sends, alarms and
//!   answers on each caller's channel.
//! - [`store`]: job records in the object's SQLite storage (what survives eviction), one
//!   event's writes in one transaction.
//! - [`sockets`]: the agents' hibernatable WebSockets: tags name the session, the
//!   attachment keeps its record, and sends and closes find the socket by tag.
//! - [`exchange`]: worker `Request`/`Response` ⇄ the core's HTTP types: the body read as
//!   the core's intake says, answers and event streams written out.
//! - [`console`]: the core's `tracing` events as Workers console lines (`wrangler tail`).

pub mod console;
pub mod entry;
pub mod exchange;
pub mod object;
pub mod sockets;
pub mod store;

pub use object::EdgeDurableObject;

use edge_core::Millis;

/// Milliseconds since the epoch. The only clock the Worker reads; the machine gets it as
/// an argument. (Workers advance `Date.now()` only across I/O, which is all we need.)
pub fn now_ms() -> Millis {
    worker::Date::now().as_millis()
}

/// Fresh random bytes (Web Crypto `getRandomValues`) for job ids, session ids and nonces.
pub fn entropy<const N: usize>() -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| format!("no random source: {e}"))?;
    Ok(bytes)
}

/// Runs once when the Worker's module is instantiated.
#[worker::event(start)]
fn start() {
    console::install();
}
