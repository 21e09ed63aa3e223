//! How a job's progress events are gathered into batches, each signed and sent as one
//! frame (protocol 8): pure decisions. The runner feeds it Claude's lines as they come
//! and sends what it hands back.
//!
//! A batch goes when the agent's progress clock ticks (every [`PROGRESS_BATCH_MS`], so
//! its first event waits at most that long), when it is full ([`MAX_PROGRESS_EVENTS`]
//! events, or [`MAX_PROGRESS_BYTES`] of Claude's output), and — whatever it holds — when
//! Claude's run ends, before the job's result.

use shared::protocol::{ProgressEvent, MAX_PROGRESS_BYTES, MAX_PROGRESS_EVENTS};

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
