//! The agent's queues to the edge, which the connection empties ([`crate::connection`]).
//!
//! The agent's own queue first, then each job's, one frame of each in turn
//! ([`Receivers::next`]):
//! - what the agent says of its jobs, slots and login — acceptances, refusals, results,
//!   statements of its slots, heartbeats, login reports —, made and queued in the order it
//!   happened (see [`crate::agent`]), small, and bounded by what the agent does (a result
//!   per job, a beat per interval) — not by what comes in: a refusal of a frame a real
//!   edge never sends is queued for at most [`shared::protocol::MAX_UNPROVEN_FRAMES`] of a
//!   connection's, then the agent hangs up (a flood of such frames had this queue grow
//!   by a refusal each, without bound);
//! - each job's progress, as much as Claude prints, on a queue of its own. Each job's
//!   frames count against its budget from when they are queued until the connection has
//!   written them ([`agent_core::progress::admits`]: a job's, and all jobs' together); a
//!   batch past it is dropped, never waited for — Claude's stdout is read on whatever the
//!   link does, a pipe not read would stall it — and the next frame that goes is a marker
//!   saying how many events were ([`agent_core::progress::Dropped`]). Events lost with a
//!   connection's queue (a stalled link given up on), or whose write failed, are counted
//!   the same way, so a marker tells of those too, and one lost itself is told again by
//!   the next; a marker is numbered past every event that may have reached the edge.
//!
//! Why: in one unbounded FIFO, a job printing faster than the link carries (a home uplink,
//! a half-open link whose writes block for up to two heartbeat intervals, a job writing
//! into Claude's stdout on purpose) kept every byte of its output in the agent's memory
//! until the kernel killed the agent, and every job with it; and the other jobs' results
//! and the heartbeats waited behind the backlog. With the budget but one FIFO for all
//! jobs' progress, a job's result still waited for every other job's backlog queued
//! before its own last batch (up to 8 MiB a flooding job: minutes on a slow link).
//!
//! A job's result comes after its own progress: the edge ignores progress for a job it
//! has ended, so the job's task waits for its progress to be written (or dropped with a
//! lost connection) before it hands its result over ([`JobProgress::sent`]) — for its own
//! frames only, as the connection takes one frame of each job in turn, and for at most
//! half a second (twice, with the marker): what is still queued then is dropped, and a
//! marker says so.

use crate::link::Link;
use agent_core::progress::{admits, Dropped, JOB_BACKLOG_BYTES};
use shared::protocol::{AgentMessage, ProgressEvent};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tracing::{info, warn};

/// The agent's queues: the sender of its own words, the maker of each job's progress
/// queue, and the connection's ends.
pub fn channels() -> (UnboundedSender<AgentMessage>, Progress, Receivers) {
    let (control, control_rx) = mpsc::unbounded_channel();
    let (ready, ready_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        all: Mutex::new(0),
        patience_ms: AtomicU64::new(MAX_RESULT_WAIT_MS),
    });
    let progress = Progress { ready: ready.clone(), shared: Arc::clone(&shared) };
    (control, progress, Receivers { control: control_rx, ready: ready_rx, again: ready, shared })
}

/// How long a job's result waits for its own progress at most, each of the two times it
/// may wait ([`JobProgress::sent`]): on a link that works, a job's last batch is written
/// within milliseconds. Kept short so that the whole wait (twice this) fits where the
/// result must arrive: within the edge's timeout margin after the hand-back
/// (`runner.rs`'s `a_hand_back_ends_within_the_edges_default_margin`), and within the
/// stop's grace, before which the result must be in the spool (`serve.rs`). A heartbeat
/// interval, as first set, let a result wait past both (hostile review s35, uplink 1-2).
pub const MAX_RESULT_WAIT_MS: u64 = 500;

/// Makes each job's progress queue; all share the agent's budget.
#[derive(Clone)]
pub struct Progress {
    ready: UnboundedSender<Arc<Queue>>,
    shared: Arc<Shared>,
}

impl Progress {
    /// A new job's progress queue.
    pub fn job(&self) -> JobProgress {
        JobProgress(Arc::new(Job { ready: self.ready.clone(), shared: Arc::clone(&self.shared), queue: Arc::default(), warned: AtomicBool::new(false) }))
    }
}

/// What all jobs' queues share: the bytes of all jobs' progress queued and not yet
/// written, and how long a job's result waits for its own progress at most
/// ([`MAX_RESULT_WAIT_MS`]).
struct Shared {
    all: Mutex<usize>,
    patience_ms: AtomicU64,
}

/// One job's progress on its way: its frames not yet taken by the connection, its bytes
/// queued and not yet written (changed under the [`Shared`] budget's lock), who waits for
/// them to go, and the events it has not delivered.
#[derive(Default)]
struct Queue {
    frames: Mutex<Frames>,
    bytes: AtomicUsize,
    drained: Notify,
    /// The events dropped (past the budget, or lost with a connection) since the last
    /// marker was queued, and how the job's events are numbered.
    dropped: Mutex<Dropped>,
    /// Events dropped in all.
    dropped_total: AtomicU64,
    /// Told when events are dropped (one waiter: the job's progress task).
    noted: Notify,
}

/// A job's frames not yet taken by the connection, and whether the job is on the
/// connection's list of queues to take from ([`Receivers::next`]): it is from when a frame
/// is queued until the connection finds the queue empty.
#[derive(Default)]
struct Frames {
    queued: VecDeque<Queued>,
    listed: bool,
}

impl Queue {
    fn dropped(&self) -> std::sync::MutexGuard<'_, Dropped> {
        self.dropped.lock().expect("dropped lock")
    }

    fn frames(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.frames.lock().expect("frames lock")
    }

    /// Counts `events` (the last numbered `last_seq`) not delivered; true when they begin
    /// a run of such.
    fn note(&self, dropped: &mut Dropped, events: u64, last_seq: u64) -> bool {
        self.dropped_total.fetch_add(events, SeqCst);
        self.noted.notify_one();
        dropped.note(events, last_seq)
    }

    /// Takes every frame not yet taken by the connection (to be dropped by the caller,
    /// outside the lock: dropping one counts its events for the next marker).
    fn take_all(&self) -> VecDeque<Queued> {
        std::mem::take(&mut self.frames().queued)
    }
}

/// A progress frame's bytes, counted against its job's budget and the agent's until this
/// is dropped: by the connection once it has written the frame ([`Held::written`]), or
/// with the frame when it is not sent (a lost connection's queue, a failed write, the
/// agent stopping) — then its events count as dropped, for the job's next marker.
pub struct Held {
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    bytes: usize,
    /// The events the frame carries (a marker: those it stands for), the last one's number.
    events: u64,
    last_seq: u64,
    /// Taken by the connection: once it is, a write that fails may still have reached the
    /// edge.
    taken: bool,
    delivered: bool,
}

impl Held {
    /// The connection wrote the frame.
    pub fn written(mut self) {
        self.delivered = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.delivered {
            let mut dropped = self.queue.dropped();
            self.queue.note(&mut dropped, self.events, self.last_seq);
            if self.taken {
                dropped.may_have_arrived(self.last_seq);
            }
        }
        let left = {
            let mut all = self.shared.all.lock().expect("budget lock");
            *all -= self.bytes;
            self.queue.bytes.fetch_sub(self.bytes, SeqCst) - self.bytes
        };
        if left == 0 {
            self.queue.drained.notify_waiters();
        }
    }
}

struct Queued {
    msg: AgentMessage,
    held: Held,
}

/// One frame for the connection to send; a progress frame holds its budget ([`Held`])
/// until this is dropped.
pub struct Outgoing {
    pub msg: AgentMessage,
    pub held: Option<Held>,
}

/// The connection's ends of the queues: the agent's own, and the list of jobs whose
/// queues hold frames, each listed once and listed again at the back after each frame
/// taken from it (so one frame of each in turn).
pub struct Receivers {
    control: UnboundedReceiver<AgentMessage>,
    ready: UnboundedReceiver<Arc<Queue>>,
    /// Lists a job's queue again after a turn.
    again: UnboundedSender<Arc<Queue>>,
    shared: Arc<Shared>,
}

impl Receivers {
    /// The next frame to send, the agent's own words first, then one frame of the next
    /// job's progress in turn; `None` once the agent is gone. Cancel-safe.
    pub async fn next(&mut self) -> Option<Outgoing> {
        loop {
            tokio::select! {
                biased;
                msg = self.control.recv() => return msg.map(|msg| Outgoing { msg, held: None }),
                Some(queue) = self.ready.recv() => if let Some(out) = self.turn(queue) {
                    return Some(out);
                },
            }
        }
    }

    /// The next frame queued now, if any, in the same order as [`Receivers::next`].
    pub fn try_next(&mut self) -> Option<Outgoing> {
        if let Ok(msg) = self.control.try_recv() {
            return Some(Outgoing { msg, held: None });
        }
        while let Ok(queue) = self.ready.try_recv() {
            if let Some(out) = self.turn(queue) {
                return Some(out);
            }
        }
        None
    }

    /// A job's turn: its first frame, and the job listed again at the back if it has more.
    /// None if its frames were taken back meanwhile ([`JobProgress::sent`]).
    fn turn(&mut self, queue: Arc<Queue>) -> Option<Outgoing> {
        let (first, more) = {
            let mut frames = queue.frames();
            let first = frames.queued.pop_front();
            frames.listed = !frames.queued.is_empty();
            (first, frames.listed)
        };
        if more {
            // Cannot fail: this holds the receiver.
            let _ = self.again.send(Arc::clone(&queue));
        }
        first.map(|Queued { msg, mut held }| {
            held.taken = true;
            Outgoing { msg, held: Some(held) }
        })
    }

    /// Drops everything queued (what was queued for a connection that ended).
    pub fn clear(&mut self) {
        while self.control.try_recv().is_ok() {}
        while let Ok(queue) = self.ready.try_recv() {
            let frames = {
                let mut frames = queue.frames();
                frames.listed = false;
                std::mem::take(&mut frames.queued)
            };
            drop(frames);
        }
    }

    /// How long a job's result waits for its own progress at most: the connection's
    /// heartbeat interval if shorter than [`MAX_RESULT_WAIT_MS`] (tests set it shorter).
    pub fn patience(&self, heartbeat: Duration) {
        let ms = u64::try_from(heartbeat.as_millis()).unwrap_or(u64::MAX).min(MAX_RESULT_WAIT_MS);
        self.shared.patience_ms.store(ms, SeqCst);
    }

    /// The agent's own frames queued, and the jobs with progress queued.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.control.len() + self.ready.len()
    }
}

impl Drop for Receivers {
    /// The agent stops: what the jobs' queues hold is let go (it holds their budget).
    fn drop(&mut self) {
        self.clear();
    }
}

/// One job's progress on its way to the edge: its batches, under its budget.
#[derive(Clone)]
pub struct JobProgress(Arc<Job>);

struct Job {
    ready: UnboundedSender<Arc<Queue>>,
    shared: Arc<Shared>,
    queue: Arc<Queue>,
    /// Whether the log has said the job's progress is dropped.
    warned: AtomicBool,
}

/// What a progress frame counts against the budget: what the queue holds of it.
fn frame_bytes(msg: &AgentMessage) -> usize {
    match msg {
        AgentMessage::Event { envelope } => envelope.payload.len() + envelope.mac.len() + 64,
        _ => 64,
    }
}

impl JobProgress {
    /// Queues a batch of job `job_id`'s events, MACed bound to its order, after the marker
    /// for events dropped before it — both or neither, if the budget has room for them;
    /// else they are dropped and counted.
    pub fn forward(&self, link: &Link, job_id: &str, order_nonce: &str, events: Vec<ProgressEvent>) {
        self.forward_between(link, job_id, order_nonce, events, || {})
    }

    /// [`JobProgress::forward`], calling `between` once the frames are MACed and before
    /// they are queued (a test changes the connection there).
    fn forward_between(&self, link: &Link, job_id: &str, order_nonce: &str, mut events: Vec<ProgressEvent>, between: impl FnOnce()) {
        let job = &self.0;
        let mut dropped = job.queue.dropped();
        // Nothing is encoded and MACed for a batch with no room at all: a flood costs the
        // redaction of its lines, not their encoding too.
        let room = admits(job.queue.bytes.load(SeqCst), *job.shared.all.lock().expect("budget lock"), 1);
        let mut over_budget = !room;
        let mut queued = false;
        // The marker first: it may take a number of its own, which the batch then follows.
        let marker = if room { dropped.marker() } else { None };
        dropped.number(&mut events);
        let (count, last) = (events.len() as u64, events.last().map_or(0, |e| e.seq));
        if room {
            // What each frame carries, counted again as dropped if it is lost: the marker
            // what it stands for (its own words), the batch its events.
            let mut counts: Vec<(u64, u64)> = marker.iter().map(|m| (m.event["events"].as_u64().unwrap_or(0), m.seq)).collect();
            counts.push((count, last));
            let frames: Option<Vec<_>> = marker
                .map(|m| vec![m])
                .into_iter()
                .chain(std::iter::once(events))
                .map(|events| link.seal(|key| AgentMessage::progress(job_id, order_nonce, events, key)))
                .collect();
            // None before the first connection: there is nowhere to send it.
            let Some(frames) = frames else { return };
            let had_marker = counts.len() > 1;
            between();
            queued = link.send_with(frames, |msgs| {
                let fits = self.hold(msgs, &counts, false);
                over_budget = !fits;
                fits
            });
            if queued {
                if had_marker {
                    dropped.told();
                }
            }
        }
        // Not queued: past the budget, or MACed for a connection that ended meanwhile
        // (its queue was dropped; the batch is counted as that queue's were).
        if !queued && job.queue.note(&mut dropped, count, last) && over_budget && !job.warned.swap(true, SeqCst) {
            warn!(
                job_id, budget_mib = JOB_BACKLOG_BYTES >> 20,
                "the job prints faster than the link to the edge carries: progress past its budget is dropped, and its followers are told how many events (its result is not affected)"
            );
        }
    }

    /// Queues the marker for the events dropped since the last one went, if any, alone: if
    /// the budget has room, or `anyway` — at the end of Claude's run, whatever the budget
    /// (one small frame), saying in the log how many were dropped in all.
    pub fn tell(&self, link: &Link, job_id: &str, order_nonce: &str, anyway: bool) {
        self.queue_marker(link, job_id, order_nonce, anyway);
        let total = self.0.queue.dropped_total.load(SeqCst);
        if anyway && total > 0 {
            info!(job_id, events = total, "progress events of the job dropped: the link to the edge was slower than the job printed, or lost");
        }
    }

    /// [`JobProgress::tell`] without the log line.
    fn queue_marker(&self, link: &Link, job_id: &str, order_nonce: &str, anyway: bool) {
        let mut dropped = self.0.queue.dropped();
        if !anyway && !admits(self.0.queue.bytes.load(SeqCst), *self.0.shared.all.lock().expect("budget lock"), 1) {
            return;
        }
        if let Some(marker) = dropped.marker() {
            let counts = [(marker.event["events"].as_u64().unwrap_or(0), marker.seq)];
            if let Some(frame) = link.seal(|key| AgentMessage::progress(job_id, order_nonce, vec![marker], key)) {
                if link.send_with(vec![frame], |msgs| self.hold(msgs, &counts, anyway)) {
                    dropped.told();
                }
            }
        }
    }

    /// Whether a marker waits to be sent.
    pub fn marker_waits(&self) -> bool {
        self.0.queue.dropped().waits()
    }

    /// Resolves when events are dropped (or were since the last call).
    pub async fn dropped(&self) {
        self.0.queue.noted.notified().await
    }

    /// Counts `msgs` (carrying `counts`: events, last number) against the budgets and
    /// queues them, if they fit (or `anyway`). Called with the job's `dropped` locked.
    fn hold(&self, msgs: Vec<AgentMessage>, counts: &[(u64, u64)], anyway: bool) -> bool {
        let job = &self.0;
        let sizes: Vec<usize> = msgs.iter().map(frame_bytes).collect();
        let bytes: usize = sizes.iter().sum();
        {
            let mut all = job.shared.all.lock().expect("budget lock");
            if !anyway && !admits(job.queue.bytes.load(SeqCst), *all, bytes) {
                return false;
            }
            *all += bytes;
            job.queue.bytes.fetch_add(bytes, SeqCst);
        }
        let list = {
            let mut frames = job.queue.frames();
            for ((msg, bytes), &(events, last_seq)) in msgs.into_iter().zip(sizes).zip(counts) {
                let held = Held { shared: Arc::clone(&job.shared), queue: Arc::clone(&job.queue), bytes, events, last_seq, taken: false, delivered: false };
                frames.queued.push_back(Queued { msg, held });
            }
            !std::mem::replace(&mut frames.listed, true)
        };
        if list && job.ready.send(Arc::clone(&job.queue)).is_err() {
            // The agent is stopping: nothing is delivered any more, and `dropped` is
            // locked by the caller.
            job.queue.take_all().into_iter().for_each(|q| q.held.written());
        }
        true
    }

    /// Resolves once nothing of this job's progress waits to be written: it went, or was
    /// dropped with a lost connection's queue. A job's result is handed over after it, so
    /// that the edge, which ignores progress for a job it has ended, shows it all. The
    /// connection takes one frame of each job in turn, so this waits for the job's own
    /// frames, not for other jobs' backlogs; and for at most [`MAX_RESULT_WAIT_MS`]
    /// ([`Receivers::patience`]): on a link slower than the job printed, what is still
    /// queued then is dropped, a marker saying how many events were is queued in its place
    /// and waited for as long again at most, and the result goes. Events dropped before
    /// (a lost connection's queue) and not told yet get their marker here too: nothing
    /// comes after the result to carry it.
    pub async fn sent(&self, link: &Link, job_id: &str, order_nonce: &str) {
        if self.written_within().await {
            if self.marker_waits() {
                self.queue_marker(link, job_id, order_nonce, true);
                self.cut_after_a_wait().await;
            }
            return;
        }
        let before = self.0.queue.dropped_total.load(SeqCst);
        drop(self.0.queue.take_all());
        let dropped = self.0.queue.dropped_total.load(SeqCst) - before;
        // Only a frame the connection is writing was left (a stalled link): nothing was
        // dropped, and nothing is to be said.
        if dropped == 0 && !self.marker_waits() {
            return;
        }
        warn!(
            job_id, dropped_events = dropped, waited_ms = self.0.shared.patience_ms.load(SeqCst),
            "the job's progress was not written soon after its end (the link to the edge is slower than it printed): the rest of it is dropped, so its result goes now"
        );
        self.queue_marker(link, job_id, order_nonce, true);
        self.cut_after_a_wait().await;
    }

    /// Waits for the job's queue once more (its marker), and drops what is left then.
    async fn cut_after_a_wait(&self) {
        if !self.written_within().await {
            drop(self.0.queue.take_all());
        }
    }

    /// Whether this job's progress was written (or lost) within the patience.
    async fn written_within(&self) -> bool {
        let queue = &self.0.queue;
        let written = async {
            loop {
                let drained = queue.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if queue.bytes.load(SeqCst) == 0 {
                    return;
                }
                drained.await;
            }
        };
        // Nothing queued (a job's usual end): no timer.
        if queue.bytes.load(SeqCst) == 0 {
            return true;
        }
        let patience = Duration::from_millis(self.0.shared.patience_ms.load(SeqCst));
        tokio::time::timeout(patience, written).await.is_ok()
    }

    /// The bytes of this job's progress queued and not yet written.
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.0.queue.bytes.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn link() -> Link {
        let link = Link::default();
        link.set(shared::link::LinkKeys { agent_to_edge: shared::link::MacKey::from_bytes([1; 32]), edge_to_agent: shared::link::MacKey::from_bytes([2; 32]) });
        link
    }

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Vec<ProgressEvent> {
        seqs.map(|seq| ProgressEvent { seq, event: serde_json::json!({"type": "assistant", "pad": "x".repeat(200 * 1024)}) }).collect()
    }

    /// A job's progress counts from when it is queued until the connection lets go of it
    /// (written, or dropped with the queue); its result waits for that.
    #[tokio::test]
    async fn a_jobs_progress_counts_until_written_and_its_result_waits_for_it() {
        let (_control, progress, mut rx) = channels();
        let (link, job) = (link(), progress.job());
        job.forward(&link, "j", "j:1", batch(1..=1));
        assert!(job.queued_bytes() > 200 * 1024);
        let mut sent = Box::pin(job.sent(&link, "j", "j:1"));
        assert!((&mut sent).now_or_never().is_none(), "its progress is not written yet");
        let out = rx.try_next().expect("queued");
        assert!(out.held.is_some());
        assert!((&mut sent).now_or_never().is_none(), "taken, not yet written");
        out.held.unwrap().written();
        assert_eq!(job.queued_bytes(), 0);
        assert!((&mut sent).now_or_never().is_some());
    }

    /// Floods from several jobs hold at most the agent's budget (and a floor each), and a
    /// job that prints little is still heard while they do.
    #[test]
    fn all_jobs_together_hold_the_agents_budget_and_a_quiet_job_is_still_heard() {
        use agent_core::progress::{AGENT_BACKLOG_BYTES, JOB_BACKLOG_FLOOR};
        let (_control, progress, mut rx) = channels();
        let link = link();
        let floods: Vec<JobProgress> = (0..8).map(|_| progress.job()).collect();
        for (n, job) in floods.iter().enumerate() {
            for seq in 1..=50 {
                job.forward(&link, &format!("j{n}"), "j:1", batch(seq..=seq));
            }
            assert!(job.queued_bytes() <= JOB_BACKLOG_BYTES);
        }
        let held: usize = floods.iter().map(JobProgress::queued_bytes).sum();
        assert!(held <= AGENT_BACKLOG_BYTES + floods.len() * JOB_BACKLOG_FLOOR, "{} MiB held", held >> 20);
        let quiet = progress.job();
        quiet.forward(&link, "q", "q:1", vec![ProgressEvent { seq: 1, event: serde_json::json!({"type": "assistant"}) }]);
        assert!(quiet.queued_bytes() > 0, "the quiet job's event was dropped");
        rx.clear();
        assert_eq!(floods.iter().chain([&quiet]).map(JobProgress::queued_bytes).sum::<usize>(), 0, "all let go with the queue");
    }

    fn read(out: Outgoing) -> Vec<ProgressEvent> {
        let AgentMessage::Event { envelope } = &out.msg else { panic!("progress") };
        let report: shared::protocol::ProgressReport = envelope.open(shared::envelope::Domain::Progress, &shared::link::MacKey::from_bytes([1; 32])).unwrap();
        out.held.unwrap().written();
        report.events
    }

    /// Progress lost with a connection's queue (a stalled link given up on) is counted as
    /// dropped: the next batch to go is preceded by a marker for it, numbered as the last
    /// event lost, or past it if the connection had taken it (its write failed, and may
    /// have arrived); a marker lost so is told again by the next.
    #[test]
    fn events_lost_with_a_connections_queue_are_told_by_the_next_marker() {
        let (_control, progress, mut rx) = channels();
        let (link, job) = (link(), progress.job());
        job.forward(&link, "j", "j:1", batch(1..=2));
        job.forward(&link, "j", "j:1", batch(3..=3));
        rx.clear();
        assert_eq!(job.queued_bytes(), 0);
        job.forward(&link, "j", "j:1", batch(4..=4));
        let (marker, next) = (read(rx.try_next().unwrap()), rx.try_next().unwrap());
        assert_eq!(marker.len(), 1);
        assert_eq!((marker[0].seq, &marker[0].event), (3, &serde_json::json!({"type": agent_core::progress::DROPPED_TYPE, "events": 3})));
        // The batch after the marker is taken and its write fails, the marker written: 1
        // more, numbered past it.
        drop(next);
        job.forward(&link, "j", "j:1", batch(5..=5));
        let marker = read(rx.try_next().unwrap());
        assert_eq!((marker[0].seq, &marker[0].event["events"]), (5, &serde_json::json!(1)));
        assert_eq!(read(rx.try_next().unwrap())[0].seq, 6, "the job's events numbered past the marker from now on");
        // A marker lost is told again, with what was lost after it.
        job.forward(&link, "j", "j:1", batch(6..=6));
        job.forward(&link, "j", "j:1", batch(7..=7));
        rx.clear();
        job.forward(&link, "j", "j:1", batch(8..=8));
        let marker = read(rx.try_next().unwrap());
        assert_eq!((marker[0].seq, &marker[0].event["events"]), (8, &serde_json::json!(2)));
        assert_eq!(read(rx.try_next().unwrap())[0].seq, 9);
        assert!(rx.try_next().is_none());
    }

    /// The job's last events lost with a connection's queue, and nothing after them: the
    /// result went with no marker, as a marker rides on the next batch or a tick — and
    /// after a job's end there is neither (hostile review s35, uplink 3). `sent` queues it.
    #[tokio::test(flavor = "current_thread")]
    async fn the_last_events_lost_with_a_connection_are_told_before_the_result() {
        let (_control, progress, mut rx) = channels();
        let (link, job) = (link(), progress.job());
        job.forward(&link, "j", "j:1", batch(1..=2));
        rx.clear();
        assert_eq!(job.queued_bytes(), 0);
        let mut sent = Box::pin(job.sent(&link, "j", "j:1"));
        assert!((&mut sent).now_or_never().is_none(), "the result went with the loss untold");
        let marker = read(rx.try_next().expect("a marker is queued"));
        assert_eq!((marker[0].seq, &marker[0].event["events"]), (2, &serde_json::json!(2)));
        sent.await;
    }

    /// All jobs' progress shared one FIFO: a quiet job's result (`sent`) waited for every
    /// frame another job had queued before it — up to that job's whole budget, minutes on
    /// a slow link, past the quiet job's deadline (hostile review 3, 1). Each job now has
    /// its own queue, and the connection takes one frame of each in turn.
    #[tokio::test(flavor = "current_thread")]
    async fn a_quiet_jobs_result_waits_for_its_own_progress_not_for_anothers_flood() {
        let (_control, progress, mut rx) = channels();
        let link = link();
        let (flood, quiet) = (progress.job(), progress.job());
        for seq in 1..=35 {
            flood.forward(&link, "f", "f:1", batch(seq..=seq));
        }
        quiet.forward(&link, "q", "q:1", vec![ProgressEvent { seq: 1, event: serde_json::json!({"type": "assistant"}) }]);
        let mut sent = Box::pin(quiet.sent(&link, "q", "q:1"));
        let mut flood_frames = 0;
        while (&mut sent).now_or_never().is_none() {
            let out = rx.try_next().expect("the quiet job's frame is queued");
            let AgentMessage::Event { envelope } = &out.msg else { panic!("progress") };
            let report: shared::protocol::ProgressReport = envelope.open(shared::envelope::Domain::Progress, &shared::link::MacKey::from_bytes([1; 32])).unwrap();
            flood_frames += usize::from(report.job_id == "f");
            out.held.unwrap().written();
        }
        assert!(flood_frames <= 1, "the quiet job's result waited for {flood_frames} frames of the flooding job's progress");
    }

    /// A batch MACed for a connection that ended before it was queued was lost without
    /// being counted: no marker told of it (hostile review 3, 2).
    #[test]
    fn a_batch_made_for_a_connection_that_ended_meanwhile_is_counted_for_the_next_marker() {
        let (_control, progress, mut rx) = channels();
        let (link, job) = (link(), progress.job());
        let reconnect = || link.set(shared::link::LinkKeys { agent_to_edge: shared::link::MacKey::from_bytes([1; 32]), edge_to_agent: shared::link::MacKey::from_bytes([2; 32]) });
        job.forward_between(&link, "j", "j:1", batch(1..=2), reconnect);
        assert!(rx.try_next().is_none(), "not queued on the next connection");
        job.forward(&link, "j", "j:1", batch(3..=3));
        let marker = read(rx.try_next().expect("a marker"));
        assert_eq!((marker[0].seq, &marker[0].event["events"]), (2, &serde_json::json!(2)));
        assert_eq!(read(rx.try_next().unwrap())[0].seq, 3);
    }

    /// Frames whose write failed were counted as dropped, and the marker took the last
    /// one's number; but the write may have reached the edge, which then ignored the
    /// marker as not newer than what it showed (hostile review 3, 3). The marker is now
    /// numbered past everything queued, and the job's events after it one further.
    #[test]
    fn a_marker_for_frames_whose_write_failed_is_numbered_past_them() {
        let (_control, progress, mut rx) = channels();
        let (link, job) = (link(), progress.job());
        job.forward(&link, "j", "j:1", batch(1..=2));
        // Taken and fed to the socket, whose flush failed: dropped unwritten.
        drop(rx.try_next().unwrap());
        job.forward(&link, "j", "j:1", batch(3..=3));
        let marker = read(rx.try_next().expect("a marker"));
        assert_eq!(marker[0].event["events"], serde_json::json!(2));
        assert!(marker[0].seq > 2, "the marker is numbered {}, as an event that may have been shown", marker[0].seq);
        let next = read(rx.try_next().unwrap());
        assert!(next[0].seq > marker[0].seq, "numbered up after the marker");
    }

    /// A job's result waits for its own progress for a short bound at most:
    /// on a link slower than the job printed, what is still queued then is dropped, and a
    /// marker says how many events were; if that does not go either, the result goes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_jobs_result_waits_for_its_own_backlog_a_heartbeat_interval_at_most() {
        let (_control, progress, mut rx) = channels();
        let (link, job) = (link(), progress.job());
        rx.patience(std::time::Duration::from_millis(20));
        for seq in 1..=10 {
            job.forward(&link, "j", "j:1", batch(seq..=seq));
        }
        let taken = rx.try_next().unwrap();
        // Nobody takes the rest. (A day: only for this test not to hang on a failure.)
        let sent = tokio::time::timeout(std::time::Duration::from_secs(86_400), job.sent(&link, "j", "j:1"));
        let reader = async {
            // The write of the first frame goes on meanwhile, then the marker's turn.
            tokio::task::yield_now().await;
            taken.held.unwrap().written();
            // The rest is dropped once the patience is up.
            job.dropped().await;
            loop {
                if let Some(out) = rx.try_next() {
                    return read(out);
                }
                tokio::task::yield_now().await;
            }
        };
        let (sent, marker) = tokio::join!(sent, reader);
        assert!(sent.is_ok(), "the result waited on");
        assert_eq!((marker[0].seq, &marker[0].event), (10, &serde_json::json!({"type": agent_core::progress::DROPPED_TYPE, "events": 9})));
        assert_eq!(job.queued_bytes(), 0);
    }
}
