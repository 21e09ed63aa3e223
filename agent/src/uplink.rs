//! The agent's queues to the edge, which the connection empties ([`crate::connection`]).
//!
//! Two queues, the first taken first ([`Receivers::next`]):
//! - what the agent says of its jobs, slots and login — acceptances, refusals, results,
//!   statements of its slots, heartbeats, login reports —, made and queued in the order it
//!   happened (see [`crate::agent`]), small, and bounded by what the agent does (a result
//!   per job, a beat per interval);
//! - the jobs' progress, as much as Claude prints. Each job's frames count against its
//!   budget from when they are queued until the connection has written them
//!   ([`agent_core::progress::admits`]: a job's, and all jobs' together); a batch past it
//!   is dropped, never waited for — Claude's stdout is read on whatever the link does, a
//!   pipe not read would stall it — and the next frame that goes is a marker saying how
//!   many events were ([`agent_core::progress::Dropped`]). Events lost with a connection's
//!   queue (a stalled link given up on) are counted the same way, so a marker tells of
//!   those too, and one lost itself is told again by the next.
//!
//! Why: in one unbounded FIFO, a job printing faster than the link carries (a home uplink,
//! a half-open link whose writes block for up to two heartbeat intervals, a job writing
//! into Claude's stdout on purpose) kept every byte of its output in the agent's memory
//! until the kernel killed the agent, and every job with it; and the other jobs' results
//! and the heartbeats waited behind the backlog.
//!
//! A job's result still comes after its own progress: the edge ignores progress for a job
//! it has ended, so the job's task waits for its progress to be written (or dropped with
//! a lost connection) before it hands its result over ([`JobProgress::sent`]).

use crate::link::Link;
use agent_core::progress::{admits, Dropped, JOB_BACKLOG_BYTES};
use shared::protocol::{AgentMessage, ProgressEvent};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tracing::{info, warn};

/// The agent's queues: the sender of its own words, the maker of each job's progress
/// queue, and the connection's ends.
pub fn channels() -> (UnboundedSender<AgentMessage>, Progress, Receivers) {
    let (control, control_rx) = mpsc::unbounded_channel();
    let (progress, progress_rx) = mpsc::unbounded_channel();
    (control, Progress { tx: progress, budget: Arc::default() }, Receivers { control: control_rx, progress: progress_rx })
}

/// Makes each job's progress queue; all share the agent's budget.
#[derive(Clone)]
pub struct Progress {
    tx: UnboundedSender<Queued>,
    budget: Arc<Budget>,
}

impl Progress {
    /// A new job's progress queue.
    pub fn job(&self) -> JobProgress {
        JobProgress(Arc::new(Job { tx: self.tx.clone(), budget: Arc::clone(&self.budget), queue: Arc::default(), warned: AtomicBool::new(false) }))
    }
}

/// The bytes of all jobs' progress queued and not yet written.
#[derive(Default)]
struct Budget {
    all: Mutex<usize>,
}

/// One job's progress on its way: its bytes queued and not yet written (changed under the
/// [`Budget`]'s lock), who waits for them to go, and the events it has not delivered.
#[derive(Default)]
struct Queue {
    bytes: AtomicUsize,
    drained: Notify,
    /// The events dropped (past the budget, or lost with a connection) since the last
    /// marker was queued.
    dropped: Mutex<Dropped>,
    /// Events dropped in all.
    dropped_total: AtomicU64,
    /// Told when events are dropped (one waiter: the job's progress task).
    noted: Notify,
}

impl Queue {
    fn dropped(&self) -> std::sync::MutexGuard<'_, Dropped> {
        self.dropped.lock().expect("dropped lock")
    }

    /// Counts `events` (the last numbered `last_seq`) not delivered; true when they begin
    /// a run of such.
    fn note(&self, dropped: &mut Dropped, events: u64, last_seq: u64) -> bool {
        self.dropped_total.fetch_add(events, SeqCst);
        self.noted.notify_one();
        dropped.note(events, last_seq)
    }
}

/// A progress frame's bytes, counted against its job's budget and the agent's until this
/// is dropped: by the connection once it has written the frame ([`Held::written`]), or
/// with the frame when it is not sent (a lost connection's queue, the agent stopping) —
/// then its events count as dropped, for the job's next marker.
pub struct Held {
    budget: Arc<Budget>,
    queue: Arc<Queue>,
    bytes: usize,
    /// The events the frame carries (a marker: those it stands for), the last one's number.
    events: u64,
    last_seq: u64,
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
        }
        let left = {
            let mut all = self.budget.all.lock().expect("budget lock");
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

/// The connection's ends of the queues.
pub struct Receivers {
    control: UnboundedReceiver<AgentMessage>,
    progress: UnboundedReceiver<Queued>,
}

impl Receivers {
    /// The next frame to send, the agent's own words first; `None` once the agent is gone.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Option<Outgoing> {
        tokio::select! {
            biased;
            msg = self.control.recv() => msg.map(|msg| Outgoing { msg, held: None }),
            Some(Queued { msg, held }) = self.progress.recv() => Some(Outgoing { msg, held: Some(held) }),
        }
    }

    /// The next frame queued now, if any, the agent's own words first.
    pub fn try_next(&mut self) -> Option<Outgoing> {
        match self.control.try_recv() {
            Ok(msg) => Some(Outgoing { msg, held: None }),
            Err(_) => self.progress.try_recv().ok().map(|Queued { msg, held }| Outgoing { msg, held: Some(held) }),
        }
    }

    /// Drops everything queued (what was queued for a connection that ended).
    pub fn clear(&mut self) {
        while self.try_next().is_some() {}
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.control.len() + self.progress.len()
    }
}

/// One job's progress on its way to the edge: its batches, under its budget.
#[derive(Clone)]
pub struct JobProgress(Arc<Job>);

struct Job {
    tx: UnboundedSender<Queued>,
    budget: Arc<Budget>,
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
        let job = &self.0;
        let mut dropped = job.queue.dropped();
        let (count, last) = (events.len() as u64, events.last().map_or(0, |e| e.seq));
        // Nothing is encoded and MACed for a batch with no room at all: a flood costs the
        // redaction of its lines, not their encoding too.
        let room = admits(job.queue.bytes.load(SeqCst), *job.budget.all.lock().expect("budget lock"), 1);
        let mut refused = !room;
        if room {
            let marker = dropped.marker();
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
            let queued = link.send_with(frames, |msgs| {
                let fits = self.hold(msgs, &counts, false);
                refused = !fits;
                fits
            });
            if queued && had_marker {
                dropped.told();
            }
        }
        if refused && job.queue.note(&mut dropped, count, last) && !job.warned.swap(true, SeqCst) {
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
        let job = &self.0;
        let mut dropped = job.queue.dropped();
        if let Some(marker) = dropped.marker() {
            let counts = [(marker.event["events"].as_u64().unwrap_or(0), marker.seq)];
            if let Some(frame) = link.seal(|key| AgentMessage::progress(job_id, order_nonce, vec![marker], key)) {
                if link.send_with(vec![frame], |msgs| self.hold(msgs, &counts, anyway)) {
                    dropped.told();
                }
            }
        }
        drop(dropped);
        let total = job.queue.dropped_total.load(SeqCst);
        if anyway && total > 0 {
            info!(job_id, events = total, "progress events of the job dropped: the link to the edge was slower than the job printed, or lost");
        }
    }

    /// Whether a marker waits to be sent.
    pub fn marker_waits(&self) -> bool {
        self.0.queue.dropped().marker().is_some()
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
            let mut all = job.budget.all.lock().expect("budget lock");
            if !anyway && !admits(job.queue.bytes.load(SeqCst), *all, bytes) {
                return false;
            }
            *all += bytes;
            job.queue.bytes.fetch_add(bytes, SeqCst);
        }
        for ((msg, bytes), &(events, last_seq)) in msgs.into_iter().zip(sizes).zip(counts) {
            let held = Held { budget: Arc::clone(&job.budget), queue: Arc::clone(&job.queue), bytes, events, last_seq, delivered: false };
            if let Err(mpsc::error::SendError(Queued { held, .. })) = job.tx.send(Queued { msg, held }) {
                // The agent is stopping: nothing is delivered any more, and `dropped` is
                // locked by the caller.
                held.written();
            }
        }
        true
    }

    /// Resolves once nothing of this job's progress waits to be written: it went, or was
    /// dropped with a lost connection's queue. A job's result is handed over after it, so
    /// that the edge, which ignores progress for a job it has ended, shows it all.
    pub async fn sent(&self) {
        let queue = &self.0.queue;
        loop {
            let drained = queue.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if queue.bytes.load(SeqCst) == 0 {
                return;
            }
            drained.await;
        }
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
        let mut sent = Box::pin(job.sent());
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
    /// event lost; a marker lost so is told again by the next.
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
        // The batch after the marker is lost too, the marker written: 1 more.
        drop(next);
        job.forward(&link, "j", "j:1", batch(5..=5));
        let marker = read(rx.try_next().unwrap());
        assert_eq!((marker[0].seq, &marker[0].event["events"]), (4, &serde_json::json!(1)));
        assert_eq!(read(rx.try_next().unwrap())[0].seq, 5);
        // A marker lost is told again, with what was lost after it.
        job.forward(&link, "j", "j:1", batch(6..=6));
        drop(rx.try_next());
        job.forward(&link, "j", "j:1", batch(7..=7));
        let marker = read(rx.try_next().unwrap());
        assert_eq!((marker[0].seq, &marker[0].event["events"]), (6, &serde_json::json!(1)));
        assert_eq!(read(rx.try_next().unwrap())[0].seq, 7);
        assert!(rx.try_next().is_none());
    }
}
