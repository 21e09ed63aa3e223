//! How a job's progress events are gathered into batches, each signed and sent as one
//! frame (protocol 8): pure decisions. The runner feeds it Claude's lines as they come
//! and sends what it hands back.
//!
//! A batch goes when the agent's progress clock ticks (every [`PROGRESS_BATCH_MS`], so
//! its first event waits at most that long), when it is full ([`MAX_PROGRESS_EVENTS`]
//! events, or [`MAX_PROGRESS_BYTES`] of Claude's output), and — whatever it holds — when
//! Claude's run ends, before the job's result.
//!
//! What a job has queued for the edge and the connection has not written yet is held to a
//! budget ([`admits`]): a job printing faster than the link carries has its batches past
//! it dropped, never waited for (a pipe not read would stall Claude), and one event of
//! the agent's own ([`Dropped`]) tells its followers how many.

use shared::protocol::{ProgressEvent, MAX_PROGRESS_BYTES, MAX_PROGRESS_EVENTS};

/// How long the first event of a batch may wait for others. Claude prints in bursts (a
/// tool call, its result, the next message, within milliseconds) between pauses of
/// seconds while the model thinks; 50 ms takes in a burst, so it costs one signature and
/// one verification (about 65 µs of CPU between agent and edge) and one frame instead of
/// one per line, while a person following a job cannot tell 50 ms from live — the SSE
/// stream, the network and the terminal already add as much. A job that ends sooner sends
/// its events at its end, so short jobs wait for nothing.
pub const PROGRESS_BATCH_MS: u64 = 50;

/// Most bytes of one job's progress queued for the edge and not yet written by the
/// connection. A job's batches go at the link's pace: past this, the link is slower than
/// the job prints (a home uplink, a half-open link whose writes block for up to two
/// heartbeat intervals, a job writing into Claude's stdout on purpose), and what it
/// prints next is dropped rather than kept in the agent's memory. 8 MiB is 32 full
/// batches, seconds of a busy Claude on any link that carries it at all.
pub const JOB_BACKLOG_BYTES: usize = 8 * 1024 * 1024;
/// Most bytes of all jobs' progress queued unsent, so that `MAX_CONCURRENT_JOBS` (up to 64)
/// flooding jobs do not hold 64 budgets.
pub const AGENT_BACKLOG_BYTES: usize = 32 * 1024 * 1024;
/// What a job may queue even when the agent's budget is used up by others: a job that
/// prints little is never silenced by ones that flood.
pub const JOB_BACKLOG_FLOOR: usize = 1024 * 1024;

/// Whether a progress frame of `bytes` may be queued when its job has `job` bytes queued
/// unsent and all jobs together `all`: within the job's budget, and within the agent's or
/// the job's floor. So all jobs together hold at most [`AGENT_BACKLOG_BYTES`] plus a
/// floor each.
pub fn admits(job: usize, all: usize, bytes: usize) -> bool {
    let job_after = job.saturating_add(bytes);
    job_after <= JOB_BACKLOG_BYTES && (all.saturating_add(bytes) <= AGENT_BACKLOG_BYTES || job_after <= JOB_BACKLOG_FLOOR)
}

/// The `type` of the event the agent puts in a job's progress where events were dropped
/// ([`Dropped`], [`shared::protocol::progress_dropped`]), as the edge does for a batch it
/// cannot show.
pub const DROPPED_TYPE: &str = shared::protocol::PROGRESS_DROPPED_TYPE;

/// The events of a job dropped since the last that went: what the marker will say. And
/// how the job's events are numbered on the way out, so that a marker is never numbered
/// as an event the edge may have shown: the edge ignores an event not newer than the last
/// it showed of the job, and a frame whose write failed may still have arrived.
#[derive(Debug, Default)]
pub struct Dropped {
    events: u64,
    last_seq: u64,
    /// The highest number of a frame the connection took and did not write (its write
    /// failed): it may have reached the edge.
    arrived: u64,
    /// Added to the runner's numbers: one for each marker numbered past what was queued.
    shift: u64,
}

impl Dropped {
    /// `events` events were dropped, the last numbered `last_seq`. True when they begin a
    /// run of dropped events.
    pub fn note(&mut self, events: u64, last_seq: u64) -> bool {
        let begins = self.events == 0 && events > 0;
        if events > 0 {
            self.events += events;
            // A frame lost with its connection is counted when the connection lets go of it,
            // which may be after later ones: the marker takes the highest number.
            self.last_seq = self.last_seq.max(last_seq);
        }
        begins
    }

    /// The marker for the events dropped since the last one, if any. It takes the number
    /// of the last of them, which was never sent, so the job's events stay numbered up and
    /// a follower's ids skip the others; unless that one may have arrived (its write
    /// failed): then the number past it, and the events after it are numbered one further
    /// ([`Dropped::number`]). (A job's frames are taken in the order they are numbered, so
    /// a frame never taken is numbered past every one that was.)
    pub fn marker(&mut self) -> Option<ProgressEvent> {
        if self.events == 0 {
            return None;
        }
        if self.last_seq <= self.arrived {
            self.last_seq = self.arrived + 1;
            self.shift += 1;
        }
        Some(ProgressEvent { seq: self.last_seq, event: shared::protocol::progress_dropped(self.events) })
    }

    /// Whether a marker waits to be sent.
    pub fn waits(&self) -> bool {
        self.events > 0
    }

    /// Numbers the runner's `events` as they go out (the same, unless a marker took a
    /// number of its own).
    pub fn number(&self, events: &mut [ProgressEvent]) {
        if self.shift > 0 {
            events.iter_mut().for_each(|e| e.seq += self.shift);
        }
    }

    /// A frame whose events end at number `last_seq` was taken by the connection and not
    /// written: it may have reached the edge.
    pub fn may_have_arrived(&mut self, last_seq: u64) {
        self.arrived = self.arrived.max(last_seq);
    }

    /// The marker went: what is dropped from now on is counted afresh.
    pub fn told(&mut self) {
        (self.events, self.last_seq) = (0, 0);
    }
}

/// The events of a job not sent yet.
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<ProgressEvent>,
    bytes: usize,
}

impl Batch {
    /// Adds event `seq` (its line was `bytes` long), and hands `send` every batch due
    /// because of it: the pending one first when this event would take it past
    /// [`MAX_PROGRESS_BYTES`], then the batch with this event when that is full.
    pub fn push(&mut self, seq: u64, event: serde_json::Value, bytes: usize, mut send: impl FnMut(Vec<ProgressEvent>)) {
        if !self.events.is_empty() && self.bytes.saturating_add(bytes) > MAX_PROGRESS_BYTES {
            send(self.take_all());
        }
        self.events.push(ProgressEvent { seq, event });
        self.bytes = self.bytes.saturating_add(bytes);
        if self.events.len() >= MAX_PROGRESS_EVENTS || self.bytes >= MAX_PROGRESS_BYTES {
            send(self.take_all());
        }
    }

    /// Whether events wait.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The pending batch, if any (the clock ticked, or Claude's run ended).
    pub fn take(&mut self) -> Option<Vec<ProgressEvent>> {
        (!self.events.is_empty()).then(|| self.take_all())
    }

    fn take_all(&mut self) -> Vec<ProgressEvent> {
        self.bytes = 0;
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seqs(batches: &[Vec<ProgressEvent>]) -> Vec<Vec<u64>> {
        batches.iter().map(|b| b.iter().map(|e| e.seq).collect()).collect()
    }

    #[test]
    fn a_batch_waits_until_taken_then_goes_whole() {
        let mut batch = Batch::default();
        let mut sent = Vec::new();
        assert!(batch.is_empty() && batch.take().is_none());
        for seq in 1..=3 {
            batch.push(seq, json!({"n": seq}), 10, |b| sent.push(b));
        }
        assert!(sent.is_empty() && !batch.is_empty());
        sent.extend(batch.take());
        assert_eq!(seqs(&sent), [vec![1, 2, 3]]);
        assert!(batch.is_empty() && batch.take().is_none(), "nothing left");
    }

    #[test]
    fn a_full_batch_goes_at_once() {
        let mut batch = Batch::default();
        let mut sent = Vec::new();
        for seq in 1..=(2 * MAX_PROGRESS_EVENTS as u64 + 1) {
            batch.push(seq, json!(seq), 1, |b| sent.push(b));
        }
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|b| b.len() == MAX_PROGRESS_EVENTS));
        assert_eq!(seqs(&[batch.take().unwrap()]), [vec![2 * MAX_PROGRESS_EVENTS as u64 + 1]]);
    }

    /// A job's budget, the agent's, and the floor that keeps a quiet job heard while others
    /// flood.
    #[test]
    fn a_frame_is_admitted_within_its_jobs_budget_and_the_agents_or_the_floor() {
        assert!(admits(0, 0, JOB_BACKLOG_BYTES));
        assert!(!admits(1, 0, JOB_BACKLOG_BYTES), "over the job's budget");
        assert!(!admits(JOB_BACKLOG_FLOOR, AGENT_BACKLOG_BYTES, 1), "the agent's used up, the floor too");
        assert!(admits(JOB_BACKLOG_FLOOR - 10, AGENT_BACKLOG_BYTES, 10), "within the floor whatever the others hold");
        assert!(admits(2 * JOB_BACKLOG_FLOOR, AGENT_BACKLOG_BYTES - 10, 10));
        assert!(!admits(usize::MAX, usize::MAX, usize::MAX), "no overflow");
    }

    /// Dropped events are counted until a marker goes, which takes the last one's number.
    #[test]
    fn a_marker_counts_the_events_dropped_since_the_last_and_takes_the_last_ones_number() {
        let mut dropped = Dropped::default();
        assert!(dropped.marker().is_none());
        assert!(!dropped.note(0, 0), "nothing dropped");
        assert!(dropped.note(3, 5), "a run begins");
        assert!(!dropped.note(4, 9), "the same run");
        let marker = dropped.marker().unwrap();
        assert_eq!((marker.seq, &marker.event), (9, &json!({"type": DROPPED_TYPE, "events": 7})));
        dropped.told();
        assert!(dropped.marker().is_none());
        assert!(dropped.note(1, 12), "a new run");
    }

    /// Events whose write failed may have reached the edge, which
    /// ignores an event not newer than the last it showed: the marker for them takes the
    /// number past them, and the events after it one more than the runner's.
    #[test]
    fn a_marker_for_events_that_may_have_arrived_is_numbered_past_them() {
        let mut dropped = Dropped::default();
        dropped.note(2, 4);
        dropped.may_have_arrived(4);
        let marker = dropped.marker().unwrap();
        assert_eq!((marker.seq, &marker.event["events"]), (5, &json!(2)));
        let mut next = vec![ProgressEvent { seq: 5, event: json!({}) }];
        dropped.number(&mut next);
        assert_eq!(next[0].seq, 6, "after the marker");
        // Not sent: asked again, the same number.
        assert_eq!(dropped.marker().unwrap().seq, 5);
        dropped.told();
        // Dropped before it was sent: its own number, nothing shifted further.
        dropped.note(1, 7);
        assert_eq!(dropped.marker().unwrap().seq, 7);
        let mut next = vec![ProgressEvent { seq: 7, event: json!({}) }];
        dropped.number(&mut next);
        assert_eq!(next[0].seq, 8);
    }

    #[test]
    fn a_batch_never_holds_more_output_than_the_cap_unless_one_event_does() {
        let mut batch = Batch::default();
        let mut sent = Vec::new();
        let third = MAX_PROGRESS_BYTES / 3;
        for seq in 1..=3 {
            batch.push(seq, json!(seq), third, |b| sent.push(b));
        }
        assert!(sent.is_empty(), "three thirds fit");
        // The fourth would take it over: the three go first, the fourth waits.
        batch.push(4, json!(4), third, |b| sent.push(b));
        assert_eq!(seqs(&sent), [vec![1, 2, 3]]);
        // One event at the cap goes alone, at once, after what was pending.
        batch.push(5, json!(5), MAX_PROGRESS_BYTES, |b| sent.push(b));
        assert_eq!(seqs(&sent), [vec![1, 2, 3], vec![4], vec![5]]);
        assert_eq!(batch.take(), None);
    }
}
