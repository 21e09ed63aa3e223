//! A running job's progress as its followers (`GET /jobs/{id}/events`) read it: Claude's
//! stream-json events framed as Server-Sent Events, and the bounded backlog a follower who
//! joins late is given first. The machine decides who gets which chunk; the text of every
//! chunk is made here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
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

/// How far all followers together may be behind — the bytes queued for their connections
/// and not taken — before the one whose next chunk would pass it is cut: one job's whole
/// set of followers, each as far behind as it may be. Without it 64 followers of 64 jobs
/// could hold 192 MiB, past a Worker isolate's 128 MB. (A chunk queued for many followers
/// of one job is held once and counted for each: the bound is on more than the memory.)
/// Counted per process — on the Worker per isolate, whose memory every object in it shares.
pub const MAX_FOLLOWERS_LAG_BYTES: usize = MAX_FOLLOWERS_PER_JOB * MAX_FOLLOWER_LAG_BYTES;

/// The bytes queued for every follower of this process ([`MAX_FOLLOWERS_LAG_BYTES`]).
static FOLLOWERS_LAG: AtomicUsize = AtomicUsize::new(0);

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
/// connection has not taken yet, counted in the followers' total too. The host counts every
/// chunk in and out; a follower that stops reading comes past [`MAX_FOLLOWER_LAG_BYTES`],
/// or finds all followers past [`MAX_FOLLOWERS_LAG_BYTES`], and is dropped, so the queues
/// stay bounded. What a connection gone leaves queued leaves the total with it.
#[derive(Debug, Clone, Default)]
pub struct Lag(Arc<LagState>);

#[derive(Debug)]
struct LagState {
    queued: AtomicUsize,
    /// Why it was cut, if it was: [`BEHIND`] or [`CROWDED`].
    cut: AtomicU8,
    /// All followers' bytes queued, this one's included.
    total: &'static AtomicUsize,
}

const BEHIND: u8 = 1;
const CROWDED: u8 = 2;

impl Default for LagState {
    fn default() -> Self {
        LagState { queued: AtomicUsize::new(0), cut: AtomicU8::new(0), total: &FOLLOWERS_LAG }
    }
}

impl Drop for LagState {
    /// Its host and its connection both let go of it: what was queued and never taken is
    /// freed with the queue.
    fn drop(&mut self) {
        let left = *self.queued.get_mut();
        self.total.fetch_sub(left.min(self.total.load(Ordering::Relaxed)), Ordering::Relaxed);
    }
}

impl Lag {
    /// A lag counted in `total` rather than the process's: tests' own.
    #[cfg(test)]
    fn within(total: &'static AtomicUsize) -> Lag {
        Lag(Arc::new(LagState { queued: AtomicUsize::new(0), cut: AtomicU8::new(0), total }))
    }

    /// A chunk of `bytes` is to be queued for the connection. `false`: the follower is too
    /// far behind, or all followers together are; drop it instead of queueing this (it is
    /// marked [`Lag::cut`], and [`Lag::farewell`] says why).
    pub fn queued(&self, bytes: usize) -> bool {
        let own = self.0.queued.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes);
        let all = self.0.total.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes);
        let why = match () {
            _ if own > MAX_FOLLOWER_LAG_BYTES => BEHIND,
            _ if all > MAX_FOLLOWERS_LAG_BYTES => CROWDED,
            _ => return true,
        };
        // Not queued: not counted.
        self.taken(bytes);
        self.0.cut.store(why, Ordering::Relaxed);
        false
    }

    /// The connection took a chunk of `bytes`.
    pub fn taken(&self, bytes: usize) {
        let bytes = bytes.min(self.0.queued.load(Ordering::Relaxed));
        self.0.queued.fetch_sub(bytes, Ordering::Relaxed);
        self.0.total.fetch_sub(bytes.min(self.0.total.load(Ordering::Relaxed)), Ordering::Relaxed);
    }

    /// The follower was dropped for falling behind: when its queue runs out its host
    /// aborts the connection rather than ending the stream cleanly, so what the kernel
    /// still buffers for a peer that does not read is freed too.
    pub fn cut(&self) -> bool {
        self.0.cut.load(Ordering::Relaxed) != 0
    }

    /// For a follower just cut: the last chunk its host queues for it (uncounted, a line),
    /// saying why and what to do — read by a follower that still reads, after what it had
    /// yet to read.
    pub fn farewell(&self) -> Option<Chunk> {
        let why = match self.0.cut.load(Ordering::Relaxed) {
            BEHIND => format!("this stream fell more than {MAX_FOLLOWER_LAG_BYTES} bytes behind the job's progress"),
            CROWDED => format!("the streams of this edge together are more than {MAX_FOLLOWERS_LAG_BYTES} bytes behind"),
            _ => return None,
        };
        Some(format!(": cut: {why}; reconnect with the Last-Event-ID of the last event read to read on, or read the result with GET /jobs/{{id}}\n\n").into())
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
        static TOTAL: AtomicUsize = AtomicUsize::new(0);
        let lag = Lag::within(&TOTAL);
        assert!(lag.queued(MAX_BACKLOG_BYTES), "a whole backlog fits");
        lag.taken(MAX_BACKLOG_BYTES);
        for _ in 0..MAX_FOLLOWER_LAG_BYTES / 65_536 {
            assert!(lag.queued(65_536));
        }
        assert!(!lag.cut());
        assert!(!lag.queued(65_536), "past the bound");
        assert!(lag.cut());
        assert!(lag.farewell().unwrap().contains("fell more than"));
        lag.taken(usize::MAX);
        assert!(lag.queued(1), "taking never underflows");
        drop(lag);
        assert_eq!(TOTAL.load(Ordering::Relaxed), 0, "what a follower gone left queued leaves the total");
    }

    /// 64 followers of 64 jobs that stop reading held 64 × 3 MiB, past a Worker isolate's
    /// 128 MB: together they are held to [`MAX_FOLLOWERS_LAG_BYTES`]. The one whose chunk
    /// would pass it is cut and told why; once the others' connections go, followers are
    /// taken again.
    #[test]
    fn all_followers_together_are_held_to_a_total() {
        static TOTAL: AtomicUsize = AtomicUsize::new(0);
        let piece = 64 * 1024;
        let stalled: Vec<Lag> = (0..MAX_FOLLOWERS_LAG_BYTES / MAX_FOLLOWER_LAG_BYTES).map(|_| Lag::within(&TOTAL)).collect();
        for lag in &stalled {
            while lag.0.queued.load(Ordering::Relaxed) + piece <= MAX_FOLLOWER_LAG_BYTES {
                assert!(lag.queued(piece));
            }
        }
        let reader = Lag::within(&TOTAL);
        let mut taken_in = 0;
        while reader.queued(piece) {
            taken_in += piece;
            assert!(taken_in <= MAX_FOLLOWERS_LAG_BYTES, "the total never held it back");
        }
        assert!(reader.cut() && reader.0.queued.load(Ordering::Relaxed) < MAX_FOLLOWER_LAG_BYTES, "cut by the total, not its own lag");
        let told = reader.farewell().unwrap();
        assert!(told.starts_with(": cut: ") && told.contains("Last-Event-ID") && told.ends_with("\n\n"), "{told}");
        assert!(TOTAL.load(Ordering::Relaxed) <= MAX_FOLLOWERS_LAG_BYTES);
        drop(stalled);
        drop(reader);
        assert_eq!(TOTAL.load(Ordering::Relaxed), 0);
        assert!(Lag::within(&TOTAL).queued(MAX_FOLLOWER_LAG_BYTES), "room again once they are gone");
    }

    #[test]
    fn a_result_is_one_data_line() {
        assert_eq!(result_chunk("{\"a\":\n1}"), "event: result\ndata: {\"a\": 1}\n\n");
    }
}
