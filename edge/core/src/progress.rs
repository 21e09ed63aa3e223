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
/// Followers of the jobs of one caller with its own secret (`RUNNER_SECRETS`), at most:
/// half the places, so no one caller can take them all and leave the others' refused.
/// (The pool secret's are held to the two caps above alone: its holder is the operator.)
pub const MAX_FOLLOWERS_PER_CALLER: usize = MAX_FOLLOWERS / 2;

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
/// Its longest interval, and the default: a promise to callers, so in the contract.
pub use shared::contract::SSE_KEEPALIVE_MS;

/// Where a progress event stands in its job's stream: the attempt of the order it ran
/// under (1 for the first), and its number within that attempt. Events are shown in this
/// order and each at most once.
pub type At = (u32, u64);

/// The SSE `id:` of the event at `at`: its number alone for a job's first attempt (what a
/// follower sees for nearly every job), `attempt.number` for a later one, so the ids a
/// stream sends keep increasing when a job is sent again, and a follower that reconnects
/// with `Last-Event-ID` is never taken for being further than it is.
pub fn event_id((attempt, seq): At) -> String {
    if attempt <= 1 {
        seq.to_string()
    } else {
        format!("{attempt}.{seq}")
    }
}

/// Reads a `Last-Event-ID` back: one of the ids [`event_id`] writes, nothing else.
pub fn parse_event_id(text: &str) -> Option<At> {
    fn number<T: std::str::FromStr>(digits: &str) -> Option<T> {
        // Digits only: no sign, no spaces, no leading `+` that `parse` would take.
        (!digits.is_empty() && digits.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
    }
    match text.split_once('.') {
        None => Some((1, number(text)?)),
        Some((attempt, seq)) => Some((number::<u32>(attempt).filter(|&a| a >= 2)?, number(seq)?)),
    }
}

/// One progress event (one of Claude's stream-json lines) as an SSE chunk.
pub fn progress_chunk(at: At, event: &serde_json::Value) -> String {
    format!("id: {}\nevent: progress\ndata: {event}\n\n", event_id(at))
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

/// A running job's recent progress chunks, each with where it stands.
#[derive(Debug, Default, Clone)]
pub struct Backlog {
    chunks: VecDeque<(At, Chunk)>,
    bytes: usize,
    dropped: u64,
    /// The newest event dropped past the bounds: a follower resuming before it missed some.
    dropped_newest: Option<At>,
    /// The newest event taken.
    newest: Option<At>,
}

impl Backlog {
    /// Whether an event at `at` comes after every one taken so far; if so it becomes the
    /// newest.
    pub fn advance(&mut self, at: At) -> bool {
        if self.newest.is_some_and(|newest| at <= newest) {
            return false;
        }
        self.newest = Some(at);
        true
    }

    /// Keeps the chunk of the event at `at`, dropping the oldest ones past the bounds.
    pub fn push(&mut self, at: At, chunk: Chunk) {
        self.bytes += chunk.len();
        self.chunks.push_back((at, chunk));
        while self.chunks.len() > MAX_BACKLOG_EVENTS || self.bytes > MAX_BACKLOG_BYTES {
            let Some((old_at, old)) = self.chunks.pop_front() else { break };
            self.bytes -= old.len();
            self.dropped += 1;
            self.dropped_newest = Some(old_at);
        }
    }

    /// What a new follower reads first: the chunks kept — after `after` (its
    /// `Last-Event-ID`) when it resumes — with a note first if some it should have read
    /// were dropped.
    pub fn replay(&self, after: Option<At>) -> Vec<Chunk> {
        let mut out = Vec::with_capacity(self.chunks.len() + 1);
        match (after, self.dropped_newest) {
            (None, Some(_)) => out.push(format!(": {} earlier progress events are no longer kept\n\n", self.dropped).into()),
            (Some(after), Some(gone)) if gone > after => out.push(
                format!(": the progress events after id {} up to id {} are no longer kept\n\n", event_id(after), event_id(gone)).into(),
            ),
            _ => {}
        }
        out.extend(self.chunks.iter().filter(|(at, _)| after.is_none_or(|after| *at > after)).map(|(_, chunk)| chunk.clone()));
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
            b.push((1, seq), progress_chunk((1, seq), &serde_json::json!({"n": seq})).into());
        }
        let replay = b.replay(None);
        assert_eq!(replay.len(), MAX_BACKLOG_EVENTS + 1);
        assert!(replay[0].contains("5 earlier progress events"), "{}", replay[0]);
        assert!(replay[1].starts_with("id: 5\n"), "{}", replay[1]);
        let mut big = Backlog::default();
        big.push((1, 1), "x".repeat(MAX_BACKLOG_BYTES).into());
        big.push((1, 2), "y".into());
        let replay: Vec<String> = big.replay(None).iter().map(|c| c.to_string()).collect();
        assert_eq!(replay, vec![": 1 earlier progress events are no longer kept\n\n".to_string(), "y".into()]);
        // A follower resuming after what was dropped misses nothing: no note.
        let resumed: Vec<String> = big.replay(Some((1, 1))).iter().map(|c| c.to_string()).collect();
        assert_eq!(resumed, vec!["y".to_string()]);
    }

    #[test]
    fn a_resuming_follower_reads_only_what_came_after_its_last_id() {
        let mut b = Backlog::default();
        for at in [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)] {
            assert!(b.advance(at));
            b.push(at, progress_chunk(at, &serde_json::json!({})).into());
        }
        let ids = |after: Option<At>| -> Vec<String> {
            b.replay(after).iter().map(|c| c.lines().next().unwrap_or_default().to_string()).collect()
        };
        assert_eq!(ids(Some((1, 2))), ["id: 3", "id: 2.1", "id: 2.2"]);
        assert_eq!(ids(Some((1, 3))), ["id: 2.1", "id: 2.2"], "a second attempt's events come after the first's");
        assert_eq!(ids(Some((2, 2))), Vec::<String>::new(), "up to date: nothing again");
        assert_eq!(ids(Some((9, 0))), Vec::<String>::new(), "an id from the future skips everything kept");
        assert_eq!(ids(None).len(), 5);
        // Dropped events a resuming follower had not read are named.
        let mut small = Backlog::default();
        for seq in 1..=(MAX_BACKLOG_EVENTS as u64 + 3) {
            small.push((1, seq), format!("id: {seq}\n\n").into());
        }
        let replay = small.replay(Some((1, 1)));
        assert_eq!(&*replay[0], ": the progress events after id 1 up to id 3 are no longer kept\n\n");
        assert_eq!(replay[1].lines().next(), Some("id: 4"));
    }

    #[test]
    fn event_ids_read_back_only_as_written() {
        for at in [(1, 0), (1, 7), (2, 1), (u32::MAX, u64::MAX)] {
            assert_eq!(parse_event_id(&event_id(at)), Some(at), "{at:?}");
        }
        assert_eq!(event_id((1, 12)), "12");
        assert_eq!(event_id((3, 4)), "3.4");
        for bad in ["", "x", "-1", "+1", " 1", "1 ", "1.2", "0.5", "2.", ".2", "2.3.4", "1e3", "99999999999999999999999", "4294967296.1"] {
            assert_eq!(parse_event_id(bad), None, "{bad:?}");
        }
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
