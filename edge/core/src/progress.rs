//! A running job's progress as its followers (`GET /jobs/{id}/events`) read it: Claude's
//! stream-json events framed as Server-Sent Events, and the bounded backlog a follower who
//! joins late is given first. The machine decides who gets which chunk; the text of every
//! chunk is made here.

use std::collections::VecDeque;

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

/// A running job's recent progress chunks.
#[derive(Debug, Default, Clone)]
pub struct Backlog {
    chunks: VecDeque<String>,
    bytes: usize,
    dropped: u64,
}

impl Backlog {
    /// Keeps a chunk, dropping the oldest ones past the bounds.
    pub fn push(&mut self, chunk: String) {
        self.bytes += chunk.len();
        self.chunks.push_back(chunk);
        while self.chunks.len() > MAX_BACKLOG_EVENTS || self.bytes > MAX_BACKLOG_BYTES {
            let Some(old) = self.chunks.pop_front() else { break };
            self.bytes -= old.len();
            self.dropped += 1;
        }
    }

    /// What a new follower reads first: a note of what was dropped, then the chunks kept.
    pub fn replay(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.chunks.len() + 1);
        if self.dropped > 0 {
            out.push(format!(": {} earlier progress events are no longer kept\n\n", self.dropped));
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
            b.push(progress_chunk(seq, &serde_json::json!({"n": seq})));
        }
        let replay = b.replay();
        assert_eq!(replay.len(), MAX_BACKLOG_EVENTS + 1);
        assert!(replay[0].contains("5 earlier progress events"), "{}", replay[0]);
        assert!(replay[1].starts_with("id: 5\n"), "{}", replay[1]);
        let mut big = Backlog::default();
        big.push("x".repeat(MAX_BACKLOG_BYTES));
        big.push("y".into());
        assert_eq!(big.replay(), vec![": 1 earlier progress events are no longer kept\n\n".to_string(), "y".into()]);
    }

    #[test]
    fn a_result_is_one_data_line() {
        assert_eq!(result_chunk("{\"a\":\n1}"), "event: result\ndata: {\"a\": 1}\n\n");
    }
}
