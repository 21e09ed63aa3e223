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
