//! The agent's pure pieces — what it reads from outside and how it decides, without I/O —
//! as a library, so the fuzzers (`tests/fuzz`) and the benchmark drive exactly the code
//! the binary runs. Like `edge_core` for the edge. Everything that touches processes,
//! sockets or disks lives in the binary (`main.rs`).
//!
//! - [`claude`]: Claude Code's command line and its stream-json, as pure functions.
//! - [`redact`]: keeps secrets from leaving the machine, in plain and encoded forms.
//! - [`credentials`]: Claude's `.credentials.json`, read from bytes.
//! - [`sse`]: Server-Sent Events framing, for `submit` following a job.
//! - [`edge_url`]: `EDGE_URL` → the URL dialed; plaintext only to loopback (the rule
//!   `submit` and `login` keep for `CLAUDE_RUNNER_URL` too).
//! - [`progress`]: a job's progress events gathered into batches, one signed frame each.
//! - [`record`]: the framing of the agent's slot records (started jobs, results), read
//!   back safely after a torn write.

pub mod claude;
pub mod credentials;
pub mod edge_url;
pub mod progress;
pub mod record;
pub mod redact;
pub mod sse;
