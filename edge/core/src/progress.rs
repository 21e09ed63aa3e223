//! A running job's progress as its followers (`GET /jobs/{id}/events`) read it: Claude's
//! stream-json events framed as Server-Sent Events, and the bounded backlog a follower who
//! joins late is given first. The machine decides who gets which chunk; the text of every
//! chunk is made here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

/// One SSE chunk. Shared, not copied: the backlog and every follower's queue hold the
/// same text, so many followers of a job cost pointers, not copies of its progress.
pub type Chunk = Arc<str>;

/// Followers (`GET /jobs/{id}/events`) of one job, and of all jobs together, at most.
/// They are parted between the readers, by the secret each stream was opened with
/// (`crate::machine`, `Edge::follow`): a caller with its own secret (`RUNNER_SECRETS`)
/// holds at most [`MAX_FOLLOWERS_PER_JOB`] less [`OPERATOR_FOLLOWERS`] streams of its job,
/// and its equal share of [`MAX_FOLLOWERS`] (`Edge::caller_share`); all such callers
/// together at most [`MAX_FOLLOWERS`] less [`OPERATOR_FOLLOWERS`]; past its part a new
/// stream is answered 429.
pub const MAX_FOLLOWERS_PER_JOB: usize = 16;
pub const MAX_FOLLOWERS: usize = 64;
/// The places kept for the operator's streams (the pool's `RUNNER_SECRET`) on each job of
/// a caller with its own secret, and in all: that caller's, however many it opens, never
/// lock the operator out of following the job (review rev36a-4).
pub const OPERATOR_FOLLOWERS: usize = 4;

/// How far a follower may fall behind — bytes queued for its connection that it has not
/// taken — before it is dropped: the whole backlog it is sent on joining, and 1 MiB. (One
/// with nothing queued takes any one chunk: a job's result, which may be larger.)
pub const MAX_FOLLOWER_LAG_BYTES: usize = MAX_BACKLOG_BYTES + 1024 * 1024;

/// How far all followers together may be behind — the bytes of the chunks queued for their
/// connections and not taken — before the one furthest behind is cut: one job's whole set
/// of followers, each as far behind as it may be. Without it 64 followers of 64 jobs could
/// hold 192 MiB, past a Worker isolate's 128 MB. A chunk queued for many followers (a
/// job's progress, its result) is one allocation, and counted once, however many queues
/// hold it: the total is the memory the queues hold, and a job's end, its result queued for
/// each of its followers at once, does not make the ones that keep up look far behind
/// together. Counted per process — on the Worker per isolate, whose memory every object
/// in it shares.
pub const MAX_FOLLOWERS_LAG_BYTES: usize = MAX_FOLLOWERS_PER_JOB * MAX_FOLLOWER_LAG_BYTES;

/// Every follower of this process, for [`MAX_FOLLOWERS_LAG_BYTES`].
static FOLLOWERS: Crowd = Crowd::new();

/// Progress kept per running job for followers who join late: the newest events, up to
/// these bounds (the older ones are dropped, and the stream says how many).
pub const MAX_BACKLOG_EVENTS: usize = 1_000;
pub const MAX_BACKLOG_BYTES: usize = 2 * 1024 * 1024;

/// The backlogs of all running jobs together, at most (give or take half of it): past
/// it, a job's new event drops its own oldest down to its floor — [`BACKLOG_FLOOR_BYTES`],
/// or less with many jobs: half of this shared among the backlogs kept, so that however
/// many jobs run, all of them keep at most one and a half times this. Each job may keep
/// 2 MiB, and an edge runs as many jobs as its agents take — 64 chatty ones held 128 MiB,
/// a Worker isolate's whole memory. Counted per process (on the Worker per isolate), as
/// the followers' queues are ([`MAX_FOLLOWERS_LAG_BYTES`]).
pub const MAX_BACKLOGS_BYTES: usize = 24 * 1024 * 1024;
/// What a job's backlog keeps, at most, while all of them together are past
/// [`MAX_BACKLOGS_BYTES`].
pub const BACKLOG_FLOOR_BYTES: usize = 128 * 1024;

/// Every backlog of this process, for [`MAX_BACKLOGS_BYTES`].
static BACKLOGS: Kept = Kept::new();

/// Backlogs counted together: their bytes, and how many there are.
#[derive(Debug)]
struct Kept {
    bytes: AtomicUsize,
    backlogs: AtomicUsize,
}

impl Kept {
    const fn new() -> Kept {
        Kept { bytes: AtomicUsize::new(0), backlogs: AtomicUsize::new(0) }
    }

    /// What one backlog keeps while all are past the bound.
    fn floor(&self) -> usize {
        let backlogs = self.backlogs.load(Ordering::Relaxed).max(1);
        BACKLOG_FLOOR_BYTES.min(MAX_BACKLOGS_BYTES / 2 / backlogs)
    }

    fn less(&self, bytes: usize) {
        let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_sub(bytes)));
    }
}

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

/// One progress event (one of Claude's stream-json lines) as an SSE chunk. `event` is one
/// JSON value's text as the agent sent it: JSON has line breaks only as whitespace between
/// its tokens (a string holds them escaped), and a `data:` line cannot hold one, so any
/// become spaces — the same value, on one line.
pub fn progress_chunk(at: At, event: &str) -> String {
    let event: std::borrow::Cow<str> = if event.contains(['\n', '\r']) { event.replace(['\n', '\r'], " ").into() } else { event.into() };
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

/// All followers of a process: the bytes of the chunks queued for them and not taken, and
/// who they are, so that past [`MAX_FOLLOWERS_LAG_BYTES`] the one furthest behind is found
/// and cut.
#[derive(Debug)]
struct Crowd {
    /// The bytes of the distinct chunks in the members' queues (each counted once).
    bytes: AtomicUsize,
    /// Each chunk queued (by its address, which stays its own while a queue holds it): in
    /// how many places of the members' queues.
    held: Mutex<BTreeMap<usize, usize>>,
    members: Mutex<Vec<Weak<FeedState>>>,
}

impl Crowd {
    const fn new() -> Crowd {
        Crowd { bytes: AtomicUsize::new(0), held: Mutex::new(BTreeMap::new()), members: Mutex::new(Vec::new()) }
    }

    /// A member queued `chunk`: its bytes join the total unless another queue holds it.
    fn hold(&self, chunk: &Chunk) {
        let mut held = lock(&self.held);
        let places = held.entry(address(chunk)).or_default();
        *places += 1;
        if *places == 1 {
            self.bytes.fetch_add(chunk.len(), Ordering::Relaxed);
        }
    }

    /// A member's queue let go of `chunk` (read, or dropped): its bytes leave the total
    /// once no queue holds it.
    fn let_go(&self, chunk: &Chunk) {
        let mut held = lock(&self.held);
        let key = address(chunk);
        let Some(places) = held.get_mut(&key) else { return };
        *places -= 1;
        if *places == 0 {
            held.remove(&key);
            let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_sub(chunk.len())));
        }
    }

    /// The member furthest behind.
    fn furthest_behind(&self) -> Option<Arc<FeedState>> {
        // Upgraded under the lock, compared and let go after it: a member whose last other
        // holder lets go meanwhile is dropped here, and its drop takes the lock.
        let members: Vec<Arc<FeedState>> = lock(&self.members).iter().filter_map(Weak::upgrade).collect();
        members.into_iter().max_by_key(|m| m.queued.load(Ordering::Relaxed))
    }
}

/// A chunk's one allocation, shared by every queue that holds it.
fn address(chunk: &Chunk) -> usize {
    Arc::as_ptr(chunk).cast::<u8>() as usize
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere leaves counts, never a half-made queue: go on with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A follower's queue: the chunks its host queued for its connection and the connection
/// has not taken yet, counted in the followers' total. Its host holds the [`FeedIn`] and
/// the connection the [`FeedOut`]. A follower that stops reading comes past
/// [`MAX_FOLLOWER_LAG_BYTES`], or is the one furthest behind when all followers together
/// come past [`MAX_FOLLOWERS_LAG_BYTES`], and is cut: its queue is emptied at once (the
/// bytes leave the total then, not when its connection ends: a peer that never reads
/// would hold them until a stall watcher noticed, and the Worker has none), leaving only a
/// last line saying why. A follower that keeps up is never cut for the others.
pub fn follower() -> (FeedIn, FeedOut) {
    follower_in(&FOLLOWERS)
}

fn follower_in(crowd: &'static Crowd) -> (FeedIn, FeedOut) {
    let state = Arc::new(FeedState { queued: AtomicUsize::new(0), queue: Mutex::new(Queue::default()), crowd });
    lock(&crowd.members).push(Arc::downgrade(&state));
    (FeedIn(state.clone()), FeedOut(state))
}

/// The host's half of a follower's queue ([`follower`]); letting go of it ends the stream
/// after what is queued.
#[derive(Debug)]
pub struct FeedIn(Arc<FeedState>);

/// The connection's half of a follower's queue ([`follower`]); letting go of it (the
/// connection went) frees what is queued.
#[derive(Debug)]
pub struct FeedOut(Arc<FeedState>);

#[derive(Debug)]
struct FeedState {
    /// The bytes of the chunks in `queue`, but the last line of one cut: how far behind
    /// this follower is (shared chunks counted in full: each is this follower's to read).
    queued: AtomicUsize,
    queue: Mutex<Queue>,
    crowd: &'static Crowd,
}

#[derive(Debug, Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    /// Why it was cut, if it was: [`BEHIND`] or [`CROWDED`].
    cut: u8,
    /// The host let go: the stream ends once the queue is read.
    ended: bool,
    /// The connection let go: nothing more is queued.
    gone: bool,
    /// The connection waiting for a chunk.
    waker: Option<Waker>,
}

const BEHIND: u8 = 1;
const CROWDED: u8 = 2;

/// What a follower's connection writes next ([`FeedOut::poll_next`]).
#[derive(Debug, PartialEq)]
pub enum Follow {
    Chunk(Chunk),
    /// The stream is over: the job ended, or the edge let the follower go.
    End,
    /// The follower was cut for falling behind and has read the line saying why: its host
    /// aborts the connection rather than ending the stream cleanly, so what the kernel
    /// still buffers for a peer that does not read is freed too.
    Cut,
}

impl FeedState {
    /// Cuts the follower: its queue emptied and out of the total, the reason its last line.
    fn cut(&self, why: u8) {
        let mut queue = lock(&self.queue);
        if queue.cut != 0 {
            return;
        }
        self.let_go_all(&mut queue);
        queue.cut = why;
        if !queue.gone {
            queue.chunks.push_back(farewell(why));
        }
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }

    /// Empties the queue, its chunks out of the total (after a cut, what is left is the
    /// last line, never counted).
    fn let_go_all(&self, queue: &mut Queue) {
        let counted = queue.cut == 0;
        for chunk in queue.chunks.drain(..) {
            if counted {
                self.crowd.let_go(&chunk);
            }
        }
        self.queued.store(0, Ordering::Relaxed);
    }
}

impl Drop for FeedState {
    fn drop(&mut self) {
        let mut queue = std::mem::take(&mut *lock(&self.queue));
        self.let_go_all(&mut queue);
        lock(&self.crowd.members).retain(|m| m.strong_count() > 0);
    }
}

impl FeedIn {
    /// Queues a chunk for the connection. `false`: the follower was cut (now, or before)
    /// or its connection went; the host lets it go and tells the machine.
    pub fn send(&self, chunk: Chunk) -> bool {
        let bytes = chunk.len();
        {
            let mut queue = lock(&self.0.queue);
            if queue.cut != 0 || queue.gone {
                return false;
            }
            // A follower with nothing queued takes any one chunk: a job's result is one chunk
            // and may alone pass the bound (a diff of several MiB), and cut for it a follower
            // would be cut again at each reconnect, given the result alone.
            let queued = self.0.queued.load(Ordering::Relaxed);
            if queued > 0 && queued.saturating_add(bytes) > MAX_FOLLOWER_LAG_BYTES {
                drop(queue);
                self.0.cut(BEHIND);
                return false;
            }
            self.0.crowd.hold(&chunk);
            queue.chunks.push_back(chunk);
            self.0.queued.fetch_add(bytes, Ordering::Relaxed);
            if let Some(waker) = queue.waker.take() {
                waker.wake();
            }
        }
        // Past the total, the followers furthest behind are cut until it is kept again —
        // this one only if none is further behind.
        while self.0.crowd.bytes.load(Ordering::Relaxed) > MAX_FOLLOWERS_LAG_BYTES {
            let Some(furthest) = self.0.crowd.furthest_behind() else { break };
            if furthest.queued.load(Ordering::Relaxed) == 0 {
                break;
            }
            furthest.cut(CROWDED);
            if Arc::ptr_eq(&furthest, &self.0) {
                return false;
            }
        }
        true
    }

    /// Whether the follower was cut for falling behind.
    pub fn cut(&self) -> bool {
        lock(&self.0.queue).cut != 0
    }
}

impl Drop for FeedIn {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.ended = true;
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }
}

impl FeedOut {
    /// The next chunk to write, in order; [`Follow::End`] or [`Follow::Cut`] once there are no
    /// more; pending (woken by the host) while the stream goes on and nothing is queued.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Follow> {
        let mut queue = lock(&self.0.queue);
        if let Some(chunk) = queue.chunks.pop_front() {
            if queue.cut == 0 {
                self.0.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
                self.0.crowd.let_go(&chunk);
            }
            return Poll::Ready(Follow::Chunk(chunk));
        }
        if queue.cut != 0 {
            return Poll::Ready(Follow::Cut);
        }
        if queue.ended {
            return Poll::Ready(Follow::End);
        }
        queue.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// [`FeedOut::poll_next`] as a future.
    pub fn next(&self) -> impl std::future::Future<Output = Follow> + '_ {
        std::future::poll_fn(|cx| self.poll_next(cx))
    }
}

impl Drop for FeedOut {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.gone = true;
        queue.waker = None;
        self.0.let_go_all(&mut queue);
    }
}

/// The last line of a follower cut (uncounted), saying why and what to do — read by a
/// follower that still reads, in place of what it had yet to read.
fn farewell(why: u8) -> Chunk {
    let why = match why {
        BEHIND => format!("this stream fell more than {MAX_FOLLOWER_LAG_BYTES} bytes behind the job's progress"),
        _ => format!("the streams of this edge together are more than {MAX_FOLLOWERS_LAG_BYTES} bytes behind and this one is the furthest"),
    };
    format!(": cut: {why}; reconnect with the Last-Event-ID of the last event read to read on, or read the result with GET /jobs/{{id}}\n\n").into()
}

/// A running job's recent progress chunks, each with where it stands.
#[derive(Debug)]
pub struct Backlog {
    chunks: VecDeque<(At, Chunk)>,
    bytes: usize,
    dropped: u64,
    /// The newest event dropped past the bounds: a follower resuming before it missed some.
    dropped_newest: Option<At>,
    /// The newest event taken.
    newest: Option<At>,
    /// The backlogs it is counted with ([`BACKLOGS`]; the tests' own).
    kept: &'static Kept,
}

impl Default for Backlog {
    fn default() -> Backlog {
        Backlog::counted_in(&BACKLOGS)
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        self.kept.less(self.bytes);
        self.kept.backlogs.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backlog {
    fn counted_in(kept: &'static Kept) -> Backlog {
        kept.backlogs.fetch_add(1, Ordering::Relaxed);
        Backlog { chunks: VecDeque::new(), bytes: 0, dropped: 0, dropped_newest: None, newest: None, kept }
    }

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
    /// Past [`MAX_BACKLOGS_BYTES`] for all jobs together, down to its floor
    /// ([`Kept::floor`]; its newest event too, if that alone is more): the job whose
    /// progress comes gives way, so what all keep grows no further, and a job gone quiet
    /// keeps what a follower joining late reads.
    pub fn push(&mut self, at: At, chunk: Chunk) {
        self.bytes += chunk.len();
        self.kept.bytes.fetch_add(chunk.len(), Ordering::Relaxed);
        self.chunks.push_back((at, chunk));
        loop {
            let crowded = self.kept.bytes.load(Ordering::Relaxed) > MAX_BACKLOGS_BYTES && self.bytes > self.kept.floor();
            if !(crowded || self.chunks.len() > MAX_BACKLOG_EVENTS || self.bytes > MAX_BACKLOG_BYTES) {
                break;
            }
            let Some((old_at, old)) = self.chunks.pop_front() else { break };
            self.bytes -= old.len();
            self.kept.less(old.len());
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

    /// The edge passes an event on as the agent wrote it; whatever whitespace that has, the
    /// chunk is three lines and the data the same JSON value.
    #[test]
    fn an_events_line_breaks_between_its_tokens_do_not_break_its_data_line() {
        let sent = "{\n  \"type\": \"assistant\",\r\n  \"text\": \"a\\nb\"\r}";
        let chunk = progress_chunk((2, 7), sent);
        let lines: Vec<&str> = chunk.strip_suffix("\n\n").expect("ends a chunk").split('\n').collect();
        assert_eq!(lines[..2], ["id: 2.7", "event: progress"], "{chunk:?}");
        assert_eq!(lines.len(), 3, "{chunk:?}");
        assert!(!chunk.contains('\r'), "{chunk:?}");
        let data: serde_json::Value = serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data, serde_json::json!({"type": "assistant", "text": "a\nb"}));
    }

    #[test]
    fn the_backlog_keeps_the_newest_and_says_how_many_were_dropped() {
        let mut b = Backlog::default();
        for seq in 0..(MAX_BACKLOG_EVENTS as u64 + 5) {
            b.push((1, seq), progress_chunk((1, seq), &serde_json::json!({"n": seq}).to_string()).into());
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

    /// 64 chatty jobs kept 2 MiB each, 128 MiB, a Worker isolate's whole memory: all the
    /// backlogs together are held near [`MAX_BACKLOGS_BYTES`]; each job keeps its newest
    /// events, and a backlog let go gives its bytes back.
    #[test]
    fn all_backlogs_together_are_bounded() {
        // 64 jobs keep their newest; 512 (the bound shared among them) stay under it too,
        // where a floor of 128 KiB each let them keep 24 + 64 MiB.
        for (jobs, piece_bytes) in [(64, 16 * 1024), (512, 16 * 1024), (512, 256 * 1024)] {
            static KEPT: Kept = Kept::new();
            let piece: Chunk = "p".repeat(piece_bytes).into();
            let mut backlogs: Vec<Backlog> = (0..jobs).map(|_| Backlog::counted_in(&KEPT)).collect();
            let pieces = (MAX_BACKLOG_BYTES / piece.len()) as u64;
            for seq in 0..pieces {
                for backlog in backlogs.iter_mut() {
                    backlog.push((1, seq), piece.clone());
                    assert!(KEPT.bytes.load(Ordering::Relaxed) <= MAX_BACKLOGS_BYTES * 3 / 2 + piece.len(), "{jobs} jobs");
                }
            }
            assert_eq!(KEPT.bytes.load(Ordering::Relaxed), backlogs.iter().map(|j| j.bytes).sum::<usize>());
            for backlog in &backlogs {
                let replay = backlog.replay(None);
                assert!(replay[0].contains("earlier progress events are no longer kept"), "{}", replay[0]);
                if jobs == 64 {
                    assert_eq!(backlog.chunks.back().map(|(at, _)| *at), Some((1, pieces - 1)), "the newest is kept");
                }
            }
            drop(backlogs);
            assert_eq!((KEPT.bytes.load(Ordering::Relaxed), KEPT.backlogs.load(Ordering::Relaxed)), (0, 0));
        }
    }

    #[test]
    fn a_resuming_follower_reads_only_what_came_after_its_last_id() {
        let mut b = Backlog::default();
        for at in [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)] {
            assert!(b.advance(at));
            b.push(at, progress_chunk(at, "{}").into());
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

    /// What the connection would write next, without waiting.
    fn take(out: &FeedOut) -> Option<Follow> {
        match out.poll_next(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(next) => Some(next),
            Poll::Pending => None,
        }
    }

    fn piece(bytes: usize) -> Chunk {
        "x".repeat(bytes).into()
    }

    #[test]
    fn a_follower_that_stops_reading_falls_too_far_behind() {
        static CROWD: Crowd = Crowd::new();
        let (feed, out) = follower_in(&CROWD);
        assert!(feed.send(piece(MAX_BACKLOG_BYTES)), "a whole backlog fits");
        assert!(matches!(take(&out), Some(Follow::Chunk(c)) if c.len() == MAX_BACKLOG_BYTES));
        assert_eq!(take(&out), None, "nothing queued: the connection waits");
        for _ in 0..MAX_FOLLOWER_LAG_BYTES / 65_536 {
            assert!(feed.send(piece(65_536)));
        }
        assert!(!feed.cut());
        assert!(!feed.send(piece(65_536)), "past the bound");
        assert!(feed.cut());
        assert_eq!(CROWD.bytes.load(Ordering::Relaxed), 0, "a follower cut leaves the total at once, its connection still open");
        let Some(Follow::Chunk(told)) = take(&out) else { panic!("told why") };
        assert!(told.contains("fell more than"), "{told}");
        assert_eq!(take(&out), Some(Follow::Cut), "what it had yet to read is gone with the cut");
        assert!(!feed.send(piece(1)), "nothing is queued after a cut");
        drop(out);
        drop(feed);
        assert!(lock(&CROWD.members).is_empty());
    }

    #[test]
    fn a_follower_ends_after_what_was_queued_and_a_gone_one_frees_its_queue() {
        static CROWD: Crowd = Crowd::new();
        let (feed, out) = follower_in(&CROWD);
        assert!(feed.send(piece(10)));
        drop(feed);
        assert!(matches!(take(&out), Some(Follow::Chunk(_))));
        assert_eq!(take(&out), Some(Follow::End));
        let (feed, out) = follower_in(&CROWD);
        assert!(feed.send(piece(1000)));
        drop(out);
        assert_eq!(CROWD.bytes.load(Ordering::Relaxed), 0, "what a follower gone left queued leaves the total");
        assert!(!feed.send(piece(1)), "its host is told it is gone");
    }

    /// Followers that stopped reading and were cut for their own lag, their connections
    /// still open, held the total: every other follower in the process — one that reads
    /// everything at once, of any job — was then cut at its first chunk, and again at each
    /// reconnect. (The review's case.)
    #[test]
    fn a_reader_that_keeps_up_is_not_cut_for_followers_already_cut() {
        static CROWD: Crowd = Crowd::new();
        let stalled: Vec<(FeedIn, FeedOut)> = (0..MAX_FOLLOWERS_PER_JOB).map(|_| follower_in(&CROWD)).collect();
        for (feed, _) in &stalled {
            while feed.send(piece(64 * 1024)) {}
            assert!(feed.cut());
        }
        for attempt in 0..3 {
            let (feed, out) = follower_in(&CROWD);
            assert!(feed.send(piece(200)), "attempt {attempt}: a reader 0 bytes behind is cut");
            assert!(matches!(take(&out), Some(Follow::Chunk(_))));
        }
    }

    /// 64 followers of 64 jobs that stop reading held 64 × 3 MiB, past a Worker isolate's
    /// 128 MB: together they are held to [`MAX_FOLLOWERS_LAG_BYTES`]. Past it the one
    /// furthest behind is cut and told why — never one that keeps up, whose chunk came
    /// last.
    #[test]
    fn all_followers_together_are_held_to_a_total() {
        static CROWD: Crowd = Crowd::new();
        let piece_bytes = 64 * 1024;
        let stalled: Vec<(FeedIn, FeedOut)> = (0..MAX_FOLLOWERS_LAG_BYTES / MAX_FOLLOWER_LAG_BYTES).map(|_| follower_in(&CROWD)).collect();
        for (feed, _) in &stalled {
            while feed.0.queued.load(Ordering::Relaxed) + 2 * piece_bytes <= MAX_FOLLOWER_LAG_BYTES {
                assert!(feed.send(piece(piece_bytes)));
            }
        }
        // The furthest behind by a little.
        assert!(stalled[3].0.send(piece(piece_bytes / 2)));
        assert!(CROWD.bytes.load(Ordering::Relaxed) <= MAX_FOLLOWERS_LAG_BYTES);
        // One a little behind, and one that keeps up, come past the total.
        let (behind, _behind_out) = follower_in(&CROWD);
        for _ in 0..MAX_FOLLOWER_LAG_BYTES / piece_bytes / 3 {
            assert!(behind.send(piece(piece_bytes)), "a follower not the furthest behind is not cut");
        }
        let (reader, out) = follower_in(&CROWD);
        for _ in 0..1000 {
            assert!(reader.send(piece(piece_bytes)), "a reader that keeps up is never cut");
            assert!(matches!(take(&out), Some(Follow::Chunk(_))));
        }
        let cut: Vec<usize> = (0..stalled.len()).filter(|&i| stalled[i].0.cut()).collect();
        assert_eq!(cut, [3], "the furthest behind is cut");
        let Some(Follow::Chunk(told)) = take(&stalled[3].1) else { panic!("told why") };
        assert!(told.starts_with(": cut: ") && told.contains("furthest") && told.contains("Last-Event-ID") && told.ends_with("\n\n"), "{told}");
        assert!(CROWD.bytes.load(Ordering::Relaxed) <= MAX_FOLLOWERS_LAG_BYTES);
        // One that falls behind with them is cut too once it is the furthest.
        let (late, _late_out) = follower_in(&CROWD);
        while late.send(piece(piece_bytes)) {}
        assert!(CROWD.bytes.load(Ordering::Relaxed) <= MAX_FOLLOWERS_LAG_BYTES);
        drop(stalled);
        drop((late, _late_out, behind, _behind_out));
        assert_eq!(CROWD.bytes.load(Ordering::Relaxed), 0);
        assert!(follower_in(&CROWD).0.send(piece(MAX_FOLLOWER_LAG_BYTES)), "room again once they are gone");
    }

    /// A job's result is one chunk, its whole `/execute` answer: with `include_diff` (the
    /// agent's MAX_DIFF_BYTES is 5 MiB by default, its file list up to 2 MiB, a result up to
    /// a frame of 8 MiB) it can pass MAX_FOLLOWER_LAG_BYTES alone. A follower with nothing
    /// queued was cut by it — at the job's end, and again at each reconnect, where a late
    /// follower is given the result alone (`Edge::give_ended`) — so no follower ever read
    /// such a job's result, and `submit` followed again until `--follow-for` gave up.
    #[test]
    fn a_result_larger_than_the_lag_bound_reaches_a_follower_with_nothing_queued() {
        static CROWD: Crowd = Crowd::new();
        let (feed, out) = follower_in(&CROWD);
        let body = serde_json::json!({"job_id": "j", "result": {"success": true, "diff": "+x\n".repeat(1 << 20)}}).to_string();
        let chunk: Chunk = result_chunk(&body).into();
        assert!(chunk.len() > MAX_FOLLOWER_LAG_BYTES);
        assert!(feed.send(chunk), "a follower 0 bytes behind is cut by its job's result");
        drop(feed);
        assert!(matches!(take(&out), Some(Follow::Chunk(c)) if c.starts_with("event: result")));
        assert_eq!(take(&out), Some(Follow::End));
    }

    /// A job's end queues its result for each of its followers in one event (on the Worker
    /// no connection reads in between; on the native edge the driver does not wait for
    /// them), one chunk, which was counted once per follower. Sixteen followers of a job
    /// whose result is under each one's bound, with another stream 2 MiB behind, came past
    /// the total, and the ones cut as "furthest behind" were followers that keep up,
    /// holding only the result they had had no moment to read — against "a stream that
    /// keeps up is never cut for the others" (README) — while the one really behind was
    /// kept.
    #[test]
    fn followers_that_keep_up_are_not_cut_by_their_jobs_result() {
        static CROWD: Crowd = Crowd::new();
        let (slow, _slow_out) = follower_in(&CROWD);
        assert!(slow.send(piece(MAX_BACKLOG_BYTES)), "a late follower given the whole backlog");
        let readers: Vec<(FeedIn, FeedOut)> = (0..MAX_FOLLOWERS_PER_JOB).map(|_| follower_in(&CROWD)).collect();
        let result = piece(MAX_FOLLOWER_LAG_BYTES - 64 * 1024);
        for (i, (feed, _)) in readers.iter().enumerate() {
            assert!(feed.send(result.clone()), "follower {i} of the job cut by its result");
        }
        let cut: Vec<usize> = (0..readers.len()).filter(|&i| readers[i].0.cut()).collect();
        assert_eq!(cut, Vec::<usize>::new(), "followers that read all they were given cut");
        for (i, (_, out)) in readers.iter().enumerate() {
            assert!(matches!(take(out), Some(Follow::Chunk(c)) if c.len() == result.len()), "follower {i} read its result");
        }
    }

    /// The total is the memory the queues hold: a chunk queued for several followers is
    /// one allocation, in the total once, until the last queue holding it lets it go (read,
    /// cut, or its connection gone); each follower's own lag still counts it whole.
    #[test]
    fn a_chunk_queued_for_many_followers_is_counted_once_until_the_last_lets_go() {
        static CROWD: Crowd = Crowd::new();
        let total = || CROWD.bytes.load(Ordering::Relaxed);
        let followers: Vec<(FeedIn, FeedOut)> = (0..3).map(|_| follower_in(&CROWD)).collect();
        let shared = piece(1000);
        for (feed, _) in &followers {
            assert!(feed.send(shared.clone()));
        }
        assert!(followers[2].0.send(piece(10)));
        assert_eq!(total(), 1010);
        assert!(followers.iter().all(|(feed, _)| feed.0.queued.load(Ordering::Relaxed) >= 1000), "each one's lag counts the chunk whole");
        assert!(matches!(take(&followers[0].1), Some(Follow::Chunk(_))));
        assert_eq!(total(), 1010, "read by one, still held by two");
        followers[1].0 .0.cut(CROWDED);
        assert_eq!(total(), 1010, "let go by a cut one, still held by one");
        let (feed, out) = followers.into_iter().nth(2).unwrap();
        drop(out);
        assert_eq!(total(), 0, "let go by the last");
        drop(feed);
        assert!(lock(&CROWD.held).is_empty());
    }

    #[test]
    fn a_result_is_one_data_line() {
        assert_eq!(result_chunk("{\"a\":\n1}"), "event: result\ndata: {\"a\": 1}\n\n");
    }
}
