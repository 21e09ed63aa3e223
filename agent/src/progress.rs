//! How a job's progress events are gathered into batches, each signed and sent as one
//! frame (protocol 8): pure decisions, the time passed in. The runner feeds it Claude's
//! lines as they come and sends what it hands back.
//!
//! A batch goes when the first event in it has waited [`PROGRESS_BATCH_MS`], when it is
//! full ([`MAX_PROGRESS_EVENTS`] events, or [`MAX_PROGRESS_BYTES`] of Claude's output), and
//! — whatever it holds — when Claude's run ends, before the job's result.

use shared::protocol::{ProgressEvent, MAX_PROGRESS_BYTES, MAX_PROGRESS_EVENTS};
use std::time::{Duration, Instant};

/// How long the first event of a batch may wait for others. Claude prints in bursts (a
/// tool call, its result, the next message, within milliseconds) between pauses of
/// seconds while the model thinks; 50 ms takes in a burst, so it costs one signature and
/// one verification (about 65 µs of CPU between agent and edge) and one frame instead of
/// one per line, while a person following a job cannot tell 50 ms from live — the SSE
/// stream, the network and the terminal already add as much. A job that ends sooner sends
/// its events at its end, so short jobs wait for nothing.
pub const PROGRESS_BATCH_MS: u64 = 50;

/// The events of a job not sent yet.
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<ProgressEvent>,
    bytes: usize,
    opened: Option<Instant>,
}

impl Batch {
    /// Adds event `seq` (its line was `bytes` long) at `now`, and hands `send` every batch
    /// due because of it: the pending one first when this event would take it past
    /// [`MAX_PROGRESS_BYTES`], then the batch with this event when that is full.
    pub fn push(&mut self, seq: u64, event: serde_json::Value, bytes: usize, now: Instant, mut send: impl FnMut(Vec<ProgressEvent>)) {
        if !self.events.is_empty() && self.bytes.saturating_add(bytes) > MAX_PROGRESS_BYTES {
            send(self.take_all());
        }
        if self.events.is_empty() {
            self.opened = Some(now);
        }
        self.events.push(ProgressEvent { seq, event });
        self.bytes = self.bytes.saturating_add(bytes);
        if self.events.len() >= MAX_PROGRESS_EVENTS || self.bytes >= MAX_PROGRESS_BYTES {
            send(self.take_all());
        }
    }

    /// When the pending batch must go, if there is one.
    pub fn due_at(&self) -> Option<Instant> {
        self.opened.map(|at| at + Duration::from_millis(PROGRESS_BATCH_MS))
    }

    /// The pending batch, if its time has come at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Vec<ProgressEvent>> {
        self.due_at().is_some_and(|at| at <= now).then(|| self.take_all())
    }

    /// The pending batch, if any, whatever its age (Claude's run ended).
    pub fn take(&mut self) -> Option<Vec<ProgressEvent>> {
        (!self.events.is_empty()).then(|| self.take_all())
    }

    fn take_all(&mut self) -> Vec<ProgressEvent> {
        self.bytes = 0;
        self.opened = None;
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
    fn a_batch_goes_whole_when_its_first_event_has_waited_the_window() {
        let t0 = Instant::now();
        let mut batch = Batch::default();
        let mut sent = Vec::new();
        assert_eq!(batch.due_at(), None);
        batch.push(1, json!({"n": 1}), 10, t0, |b| sent.push(b));
        let due = batch.due_at().expect("a batch is open");
        assert_eq!(due, t0 + Duration::from_millis(PROGRESS_BATCH_MS));
        // A later event does not put the batch off.
        batch.push(2, json!({"n": 2}), 10, t0 + Duration::from_millis(30), |b| sent.push(b));
        assert_eq!(batch.due_at(), Some(due));
        assert!(batch.take_due(due - Duration::from_millis(1)).is_none());
        sent.extend(batch.take_due(due));
        assert_eq!(seqs(&sent), [vec![1, 2]]);
        assert_eq!((batch.due_at(), batch.take()), (None, None), "nothing left");
        // The next event opens a new window.
        batch.push(3, json!({"n": 3}), 10, due + Duration::from_secs(5), |b| sent.push(b));
        assert_eq!(batch.due_at(), Some(due + Duration::from_secs(5) + Duration::from_millis(PROGRESS_BATCH_MS)));
        sent.extend(batch.take());
        assert_eq!(seqs(&sent), [vec![1, 2], vec![3]], "the end of the run sends what is pending");
    }

    #[test]
    fn a_full_batch_goes_at_once() {
        let t0 = Instant::now();
        let mut batch = Batch::default();
        let mut sent = Vec::new();
        for seq in 1..=(2 * MAX_PROGRESS_EVENTS as u64 + 1) {
            batch.push(seq, json!(seq), 1, t0, |b| sent.push(b));
        }
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|b| b.len() == MAX_PROGRESS_EVENTS));
        assert_eq!(seqs(&[batch.take().unwrap()]), [vec![2 * MAX_PROGRESS_EVENTS as u64 + 1]]);
    }

    #[test]
    fn a_batch_never_holds_more_output_than_the_cap_unless_one_event_does() {
        let t0 = Instant::now();
        let mut batch = Batch::default();
        let mut sent = Vec::new();
        let third = MAX_PROGRESS_BYTES / 3;
        for seq in 1..=3 {
            batch.push(seq, json!(seq), third, t0, |b| sent.push(b));
        }
        assert!(sent.is_empty(), "three thirds fit");
        // The fourth would take it over: the three go first, the fourth waits.
        batch.push(4, json!(4), third, t0, |b| sent.push(b));
        assert_eq!(seqs(&sent), [vec![1, 2, 3]]);
        // One event at the cap goes alone, at once, after what was pending.
        batch.push(5, json!(5), MAX_PROGRESS_BYTES, t0, |b| sent.push(b));
        assert_eq!(seqs(&sent), [vec![1, 2, 3], vec![4], vec![5]]);
        assert_eq!(batch.take(), None);
    }
}
