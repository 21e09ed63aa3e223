//! The bytes of the jobs not ended yet — queued, sent, running — bounded by
//! `MAX_PENDING_BYTES`. Memory keeps such a job whole, its task's text included
//! ([`crate::record::Job::in_memory`]), and a restore loads every one of them whole before
//! anything is served: on a Durable Object (128 MB) a queue of large prompts ran it out of
//! memory at every event after, the expiry that would have emptied the queue and every
//! `DELETE` included. So a submission that would take them past the bound is refused
//! (`429 RUNNER_BUSY`), and one caller with its own secret may hold half of it, as with
//! the other shares ([`super::share_of`]).
//!
//! Counted as jobs come and go, never by a walk through them: a job is counted in when it
//! is queued or found live at a restore or an undo ([`Edge::index`]), out when it ends or
//! an undo takes it away. Each job's count is kept by its id, so counting one twice, or
//! taking out one that was not counted, changes nothing.
//!
//! A Worker's memory limit is its isolate's, and the objects of several pools (`POOLS`)
//! may share one: so the bytes are also counted for the whole process, every pool's
//! machine adding and taking out its own (a machine let go, at a rebuild, takes out all
//! of its), and a submission is also refused when every pool's jobs together would pass
//! its pool's bound. (The native edge serves one pool: there the two counts agree.)

use super::Edge;
use crate::record::Job;
use shared::contract::{ApiError, ErrorCode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// The bytes of every pool's jobs not ended yet in this process (a Worker's isolate).
fn process_total() -> &'static AtomicU64 {
    #[cfg(not(test))]
    {
        static TOTAL: AtomicU64 = AtomicU64::new(0);
        &TOTAL
    }
    // Each test (a thread of its own) is a process of its own: tests run side by side.
    #[cfg(test)]
    {
        thread_local!(static TOTAL: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0))));
        TOTAL.with(|total| *total)
    }
}

/// The jobs not ended yet and their bytes ([`Job::approximate_bytes`]), in all and by
/// owner, and counted in the process's total.
#[derive(Debug)]
pub(super) struct Pending {
    /// Each counted job's owner and bytes, as counted: taken out as they were put in.
    jobs: HashMap<String, (String, u64)>,
    by_owner: HashMap<String, u64>,
    bytes: u64,
    /// Every pool's bytes in this process, this one's included.
    process: &'static AtomicU64,
}

impl Default for Pending {
    fn default() -> Self {
        Pending { jobs: HashMap::new(), by_owner: HashMap::new(), bytes: 0, process: process_total() }
    }
}

impl Drop for Pending {
    /// A machine let go (a Worker object rebuilds its own): its jobs leave the process's
    /// count with it.
    fn drop(&mut self) {
        self.release(self.bytes);
    }
}

impl Pending {
    fn release(&self, bytes: u64) {
        let _ = self.process.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_sub(bytes)));
    }

    /// Counts a job in (once).
    pub(super) fn add(&mut self, job: &Job) {
        if self.jobs.contains_key(&job.id) {
            return;
        }
        let (owner, bytes) = (super::share_of(job).to_string(), job.approximate_bytes());
        *self.by_owner.entry(owner.clone()).or_default() += bytes;
        self.bytes += bytes;
        self.process.fetch_add(bytes, Ordering::Relaxed);
        self.jobs.insert(job.id.clone(), (owner, bytes));
    }

    /// Counts a job out; one not counted changes nothing.
    pub(super) fn remove(&mut self, id: &str) {
        let Some((owner, bytes)) = self.jobs.remove(id) else { return };
        self.bytes = self.bytes.saturating_sub(bytes);
        self.release(bytes);
        if let Some(held) = self.by_owner.get_mut(&owner) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.by_owner.remove(&owner);
            }
        }
    }

    /// The bytes of all the jobs not ended yet.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The bytes of every pool's jobs not ended yet in this process.
    pub(super) fn process_bytes(&self) -> u64 {
        self.process.load(Ordering::Relaxed)
    }

    /// The bytes of one owner's jobs not ended yet.
    pub(super) fn bytes_of(&self, owner: &str) -> u64 {
        self.by_owner.get(owner).copied().unwrap_or(0)
    }
}

impl Edge {
    /// Why `job`, about to be queued, would take the jobs not ended yet past
    /// `MAX_PENDING_BYTES` (or its owner past half of it, for a caller with its own
    /// secret), if it would. A job always fits when nothing (of its owner's) is pending:
    /// the bound is at least `MAX_BODY_BYTES` (`config.rs`), and a job whose overhead takes
    /// it just past must still run.
    pub(super) fn pending_full(&self, job: &Job) -> Option<ApiError> {
        let (bytes, all, cap) = (job.approximate_bytes(), self.pending.bytes(), self.cfg.max_pending_bytes);
        if all > 0 && all.saturating_add(bytes) > cap {
            return Some(ApiError::new(
                ErrorCode::RunnerBusy,
                format!(
                    "the jobs not ended yet hold {all} bytes of tasks already, and this one {bytes} more would pass \
                     MAX_PENDING_BYTES ({cap}); retry when some have ended, or run the task elsewhere"
                ),
            ));
        }
        let process = self.pending.process_bytes();
        if process > 0 && process.saturating_add(bytes) > cap {
            return Some(ApiError::new(
                ErrorCode::RunnerBusy,
                format!(
                    "the jobs not ended yet of every pool this edge serves from one memory (a Worker isolate's) hold \
                     {process} bytes of tasks already, and this one {bytes} more would pass this pool's MAX_PENDING_BYTES \
                     ({cap}), which bounds them together; retry when some have ended, or run the task elsewhere"
                ),
            ));
        }
        let owner = super::share_of(job);
        if owner.is_empty() {
            // The pool secret's jobs are held to the whole bound alone: its holder is the
            // operator, as with the other shares.
            return None;
        }
        let (mine, share) = (self.pending.bytes_of(owner), cap / 2);
        if mine > 0 && mine.saturating_add(bytes) > share {
            return Some(ApiError::new(
                ErrorCode::RunnerBusy,
                format!(
                    "caller `{owner}`'s jobs not ended yet hold {mine} bytes of tasks already, and this one {bytes} more \
                     would pass its share: half of MAX_PENDING_BYTES ({share}); retry when some of its jobs have ended"
                ),
            ));
        }
        None
    }
}

#[cfg(test)]
impl Edge {
    /// The count equals the live jobs' bytes, recomputed, and (one machine in the test's
    /// process) the process's count.
    pub(crate) fn check_pending(&self) {
        let live: std::collections::BTreeSet<&String> = self.queue.ids().chain(self.active.iter()).collect();
        let counted: std::collections::BTreeSet<&String> = self.pending.jobs.keys().collect();
        assert_eq!(live, counted, "pending ids vs queue+active");
        let sum: u64 = live.iter().map(|id| self.jobs[*id].approximate_bytes()).sum();
        assert_eq!(sum, self.pending.bytes, "pending bytes vs live jobs' bytes");
        assert_eq!(self.pending.process_bytes(), self.pending.bytes, "the process's count vs its one machine's");
        for id in &live {
            assert!(!self.jobs[*id].state.is_terminal(), "terminal job {id} in queue/active");
        }
        let live_all: usize = self.jobs.values().filter(|j| !j.state.is_terminal() && !j.forgotten).count();
        assert_eq!(live_all, live.len(), "live jobs not in queue/active");
    }
}
