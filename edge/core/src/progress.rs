//! A running job's progress as its followers (`GET /jobs/{id}/events`) read it: Claude's
//! stream-json events framed as Server-Sent Events, and the bounded backlog a follower who
//! joins late is given first. The machine decides who gets which chunk; the text of every
//! chunk is made here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// One SSE chunk. Shared, not copied: the backlog and every follower's queue hold the
/// same text, so many followers of a job cost pointers, not copies of its progress.
pub type Chunk = Arc<str>;

/// Followers (`GET /jobs/{id}/events`) of one job, and of all jobs together, at most;
/// past these a new one is answered 429.
pub const MAX_FOLLOWERS_PER_JOB: usize = 16;
pub const MAX_FOLLOWERS: usize = 64;

/// How far a follower may fall behind — bytes queued for its connection that it has not
/// taken — before it is dropped: the whole backlog it is sent on joining, and 1 MiB.
pub const MAX_FOLLOWER_LAG_BYTES: usize = MAX_BACKLOG_BYTES + 1024 * 1024;

/// Progress kept per running job for followers who join late: the newest events, up to
/// these bounds (the older ones are dropped, and the stream says how many).
pub const MAX_BACKLOG_EVENTS: usize = 1_000;
pub const MAX_BACKLOG_BYTES: usize = 2 * 1024 * 1024;

pub const SSE_CONTENT_TYPE: &str = "text/event-stream";
/// Written while a job is quiet so proxies keep the stream open (a Cloudflare Tunnel cuts
/// a silent response at ~100 s).
pub const SSE_KEEPALIVE: &str = ": keep-alive\n\n";
pub const SSE_KEEPALIVE_MS: u64 = 15_000;

/// One progress event (one of Claude's stream-json lines) as an SSE chunk.
pub fn progress_chunk(seq: u64, event: &serde_json::Value) -> String {
    format!("id: {seq}\nevent: progress\ndata: {event}\n\n")
}

/// The last chunk of a job's stream: its `/execute` answer body.
pub fn result_chunk(body: &str) -> String {
    // `data:` lines cannot hold a newline; the bodies are single-line JSON already.
    format!("event: result\ndata: {}\n\n", body.replace('\n', " "))
}

/// The last chunk when the edge stops before the job ends: where to pick the stream up.
pub fn restart_chunk(job_id: &str) -> String {
    format!(": the edge is restarting; the job goes on: reconnect to GET /jobs/{job_id}/events\n\n")
}

/// How far one follower's connection is behind: what its host queued for it and the
/// connection has not taken yet. The host counts every chunk in and out; a follower that
/// stops reading comes past [`MAX_FOLLOWER_LAG_BYTES`] and is dropped, so its queue stays
/// bounded.
#[derive(Debug, Clone, Default)]
pub struct Lag(Arc<(AtomicUsize, AtomicBool)>);

impl Lag {
    /// A chunk of `bytes` is queued for the connection. `false`: the follower is too far
    /// behind; drop it instead of queueing more (it is marked [`Lag::cut`]).
    pub fn queued(&self, bytes: usize) -> bool {
        let within = self.0 .0.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes) <= MAX_FOLLOWER_LAG_BYTES;
        if !within {
            self.0 .1.store(true, Ordering::Relaxed);
        }
        within
    }

    /// The connection took a chunk of `bytes`.
    pub fn taken(&self, bytes: usize) {
        self.0 .0.fetch_sub(bytes.min(self.0 .0.load(Ordering::Relaxed)), Ordering::Relaxed);
    }

    /// The follower was dropped for falling behind: when its queue runs out its host
    /// aborts the connection rather than ending the stream cleanly, so what the kernel
    /// still buffers for a peer that does not read is freed too.
    pub fn cut(&self) -> bool {
        self.0 .1.load(Ordering::Relaxed)
    }
}

/// A running job's recent progress chunks.
#[derive(Debug, Default, Clone)]
pub struct Backlog {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    dropped: u64,
    /// The order attempt and sequence number of the newest event taken.
    newest: Option<(u32, u64)>,
}

impl Backlog {
    /// Whether an event at `at` (its order's attempt, its sequence number) comes after every
    /// one taken so far; if so it becomes the newest.
    pub fn advance(&mut self, at: (u32, u64)) -> bool {
        if self.newest.is_some_and(|newest| at <= newest) {
            return false;
        }
        self.newest = Some(at);
        true
    }

    /// Keeps a chunk, dropping the oldest ones past the bounds.
    pub fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.len();
        self.chunks.push_back(chunk);
        while self.chunks.len() > MAX_BACKLOG_EVENTS || self.bytes > MAX_BACKLOG_BYTES {
            let Some(old) = self.chunks.pop_front() else { break };
            self.bytes -= old.len();
            self.dropped += 1;
        }
    }

    /// What a new follower reads first: a note of what was dropped, then the chunks kept.
    pub fn replay(&self) -> Vec<Chunk> {
        let mut out = Vec::with_capacity(self.chunks.len() + 1);
        if self.dropped > 0 {
            out.push(format!(": {} earlier progress events are no longer kept\n\n", self.dropped).into());
        }
        out.extend(self.chunks.iter().cloned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_keeps_the_newest_and_says_how_many_were_dropped() {
        let mut b = Backlog::default();
        for seq in 0..(MAX_BACKLOG_EVENTS as u64 + 5) {
            b.push(progress_chunk(seq, &serde_json::json!({"n": seq})).into());
        }
        let replay = b.replay();
        assert_eq!(replay.len(), MAX_BACKLOG_EVENTS + 1);
        assert!(replay[0].contains("5 earlier progress events"), "{}", replay[0]);
        assert!(replay[1].starts_with("id: 5\n"), "{}", replay[1]);
        let mut big = Backlog::default();
        big.push("x".repeat(MAX_BACKLOG_BYTES).into());
        big.push("y".into());
        let replay: Vec<String> = big.replay().iter().map(|c| c.to_string()).collect();
        assert_eq!(replay, vec![": 1 earlier progress events are no longer kept\n\n".to_string(), "y".into()]);
    }

    #[test]
    fn a_follower_that_stops_reading_falls_too_far_behind() {
        let lag = Lag::default();
        assert!(lag.queued(MAX_BACKLOG_BYTES), "a whole backlog fits");
        lag.taken(MAX_BACKLOG_BYTES);
        for _ in 0..MAX_FOLLOWER_LAG_BYTES / 65_536 {
            assert!(lag.queued(65_536));
        }
        assert!(!lag.cut());
        assert!(!lag.queued(65_536), "past the bound");
        assert!(lag.cut());
        lag.taken(usize::MAX);
        assert!(lag.queued(1), "taking never underflows");
    }

    #[test]
    fn a_result_is_one_data_line() {
        assert_eq!(result_chunk("{\"a\":\n1}"), "event: result\ndata: {\"a\": 1}\n\n");
    }
}
