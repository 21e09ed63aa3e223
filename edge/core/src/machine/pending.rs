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
//! may share one: so each pool's bytes are also counted for the whole process, which
//! holds at most the bound in all. Each pool has its own part of it (half the bound split
//! among the pools the edge serves), which it may always fill, and past it takes what the
//! others leave of the rest, never what they have not filled of their own parts
//! ([`crate::http::pool_past_its_share`], asked by [`Edge::pending_full`]); pools with
//! values of their own each keep their own entry's value, and the process holds at most
//! the largest. (The native edge serves one pool: there the two counts agree, and its
//! part is the whole bound.)
//!
//! The process's count is kept by pool ([`Registry`]), each pool's entry written by its
//! newest machine alone: a machine takes a fresh generation when it is built, and its
//! entry replaces the one of any machine of its pool before it, whose updates and whose
//! drop then change nothing. A Worker's object is rebuilt after every eviction (about ten
//! seconds idle) and the machine evicted is dropped late if ever — workerd frees a wasm
//! object's memory only through a `FinalizationRegistry`, offered only with the
//! `enable_weak_ref` compatibility flag (wrangler.toml sets it), and only when its garbage
//! collector gets to it, after the rebuilt machine has restored — so a count that only a
//! drop takes back counted each rebuilt pool's jobs once more at every rebuild, until
//! every pool of the isolate was refused with nothing pending. And an object may be
//! rebuilt in another isolate, leaving its entry in the one before for good: an entry
//! counts for the other pools only while its machine handles events
//! ([`counted_for`]: at least every heartbeat interval while an agent is connected). An
//! idle pool, or one whose object went elsewhere, is then left out: what that costs is
//! memory, never a refusal, and each pool alone is still held to its own bound.

use super::Edge;
use crate::record::Job;
use shared::contract::{ApiError, ErrorCode};
use shared::Millis;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

/// How long after its machine last handled an event a pool's entry still counts for the
/// others: a minute, or four heartbeat intervals if that is longer. A connected agent's
/// heartbeat is an event at least every interval (and its session's deadline a tick two
/// intervals after the last), so a pool with agents connected is always counted.
fn counted_for(heartbeat_interval_ms: u64) -> Millis {
    60_000u64.max(heartbeat_interval_ms.saturating_mul(4))
}

/// Every pool's jobs not ended yet in this process (a Worker's isolate), by pool.
#[derive(Debug)]
struct Registry {
    /// The generation the next machine built takes.
    next: u64,
    pools: BTreeMap<String, Entry>,
}

/// One pool's count, as its newest machine keeps it.
#[derive(Debug)]
struct Entry {
    generation: u64,
    bytes: u64,
    /// Edge time of the last event its machine handled.
    touched: Millis,
    /// How long after `touched` it counts for the others ([`counted_for`]).
    counted_for: Millis,
    /// The pool's own `MAX_PENDING_BYTES` (pools may have their own values): the process
    /// may hold what the largest of those counted lets in ([`crate::http::pool_past_its_share`]).
    bound: u64,
}

fn registry() -> &'static Mutex<Registry> {
    #[cfg(not(test))]
    {
        static REGISTRY: Mutex<Registry> = Mutex::new(Registry { next: 0, pools: BTreeMap::new() });
        &REGISTRY
    }
    // Each test (a thread of its own) is a process of its own: tests run side by side.
    #[cfg(test)]
    {
        thread_local!(static REGISTRY: &'static Mutex<Registry> = Box::leak(Box::new(Mutex::new(Registry { next: 0, pools: BTreeMap::new() }))));
        REGISTRY.with(|registry| *registry)
    }
}

/// The jobs not ended yet and their bytes ([`Job::approximate_bytes`]), in all and by
/// owner, and the pool's entry in the process's count.
#[derive(Debug)]
pub(super) struct Pending {
    /// Each counted job's owner and bytes, as counted: taken out as they were put in.
    jobs: HashMap<String, (String, u64)>,
    by_owner: HashMap<String, u64>,
    bytes: u64,
    /// The pool whose entry this machine keeps in the process's count, and its generation.
    pool: String,
    generation: u64,
    registry: &'static Mutex<Registry>,
}

impl Drop for Pending {
    /// A machine let go (the native edge's, at its end): its pool leaves the process's
    /// count, unless a newer machine of the pool has taken its entry over.
    fn drop(&mut self) {
        let mut registry = self.lock();
        if registry.pools.get(&self.pool).is_some_and(|e| e.generation == self.generation) {
            registry.pools.remove(&self.pool);
        }
    }
}

impl Pending {
    /// A new machine's count of `pool`, held to `bound`, nothing pending: its entry
    /// replaces the one of any machine of the pool built before.
    pub(super) fn new(pool: &str, bound: u64, heartbeat_interval_ms: u64, now: Millis) -> Pending {
        let registry = registry();
        let generation = {
            let mut registry = lock(registry);
            registry.next += 1;
            let generation = registry.next;
            let entry = Entry { generation, bytes: 0, touched: now, counted_for: counted_for(heartbeat_interval_ms), bound };
            registry.pools.insert(pool.to_string(), entry);
            generation
        };
        Pending { jobs: HashMap::new(), by_owner: HashMap::new(), bytes: 0, pool: pool.to_string(), generation, registry }
    }

    fn lock(&self) -> MutexGuard<'static, Registry> {
        lock(self.registry)
    }

    /// The pool's entry, if this machine is still the one keeping it.
    fn entry<'a>(&self, registry: &'a mut Registry) -> Option<&'a mut Entry> {
        registry.pools.get_mut(&self.pool).filter(|e| e.generation == self.generation)
    }

    /// Writes this machine's bytes into its pool's entry.
    fn publish(&self) {
        let mut registry = self.lock();
        if let Some(entry) = self.entry(&mut registry) {
            entry.bytes = self.bytes;
        }
    }

    /// The machine handles an event at `now`: its pool's entry counts for the others for
    /// a while more.
    pub(super) fn touch(&self, now: Millis) {
        let mut registry = self.lock();
        if let Some(entry) = self.entry(&mut registry) {
            entry.touched = entry.touched.max(now);
        }
    }

    /// Counts a job in (once).
    pub(super) fn add(&mut self, job: &Job) {
        if self.jobs.contains_key(&job.id) {
            return;
        }
        let (owner, bytes) = (super::share_of(job).to_string(), job.approximate_bytes());
        *self.by_owner.entry(owner.clone()).or_default() += bytes;
        self.bytes += bytes;
        self.jobs.insert(job.id.clone(), (owner, bytes));
        self.publish();
    }

    /// Counts a job out; one not counted changes nothing.
    pub(super) fn remove(&mut self, id: &str) {
        let Some((owner, bytes)) = self.jobs.remove(id) else { return };
        self.bytes = self.bytes.saturating_sub(bytes);
        if let Some(held) = self.by_owner.get_mut(&owner) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.by_owner.remove(&owner);
            }
        }
        self.publish();
    }

    /// The bytes of all the jobs not ended yet.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The bytes of the other pools' jobs not ended yet in this process at `now`, each
    /// pool's with its value: those whose machines handled an event lately and hold some.
    pub(super) fn others(&self, now: Millis) -> Vec<crate::http::OtherPool> {
        let registry = self.lock();
        registry
            .pools
            .iter()
            .filter(|(pool, entry)| **pool != self.pool && entry.bytes > 0 && now <= entry.touched.saturating_add(entry.counted_for))
            .map(|(_, entry)| crate::http::OtherPool { holds: entry.bytes, bound: entry.bound })
            .collect()
    }

    /// The bytes of one owner's jobs not ended yet.
    pub(super) fn bytes_of(&self, owner: &str) -> u64 {
        self.by_owner.get(owner).copied().unwrap_or(0)
    }
}

fn lock(registry: &'static Mutex<Registry>) -> MutexGuard<'static, Registry> {
    // A panic elsewhere leaves counts, never a half-made entry: go on with them.
    registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Edge {
    /// Why `job`, about to be queued, would take the jobs not ended yet past
    /// `MAX_PENDING_BYTES` (or its owner past its equal share of it, for a caller with its
    /// own secret: [`Edge::caller_share`]), if it would. A job always fits when nothing (of its owner's) is pending:
    /// the bound is at least `MAX_BODY_BYTES` (`config.rs`), and a job whose overhead takes
    /// it just past must still run.
    pub(super) fn pending_full(&self, now: Millis, job: &Job) -> Option<ApiError> {
        let (bytes, all, cap) = (job.approximate_bytes(), self.pending.bytes(), self.cfg.max_pending_bytes);
        let owner = super::share_of(job);
        // A caller with its own secret is told its own bytes, never the others' (review
        // rev27, 4): those are the operator's to read.
        let told = |held: u64, whose: &str| match owner {
            "" => format!("{whose} hold {held} bytes of tasks already"),
            _ => format!("{whose} are at their bound (caller `{owner}`'s hold {} bytes of them)", self.pending.bytes_of(owner)),
        };
        if all > 0 && all.saturating_add(bytes) > cap {
            return Some(ApiError::new(
                ErrorCode::RunnerBusy,
                format!(
                    "{}, and this one {bytes} more would pass MAX_PENDING_BYTES ({cap}); retry when some have ended, or run the task elsewhere",
                    told(all, "the jobs not ended yet")
                ),
            ));
        }
        // The pools of one process (a Worker's isolate) share its memory: each has its own
        // part of the bound, and the process holds at most the bound in all
        // ([`crate::http::pool_past_its_share`]; review rev27, 1: one pool's jobs filled
        // it and every other pool was refused; then the process held twice the bound).
        let others = self.pending.others(now);
        let pools = self.cfg.pools();
        if let Some(past) = crate::http::pool_past_its_share(all, &others, bytes, cap, pools) {
            // The others' bytes are theirs (pools are units of isolation): a pool's
            // operator is told its own pool's and the rule's numbers, a named caller its own.
            let held = match owner {
                "" => format!("this pool's jobs not ended yet hold {all} bytes of tasks"),
                _ => format!("caller `{owner}`'s jobs not ended yet hold {} bytes of tasks", self.pending.bytes_of(owner)),
            };
            if past.within {
                return Some(ApiError::new(
                    ErrorCode::RunnerBusy,
                    format!(
                        "{held}, and this one {bytes} more is within this pool's own part ({}) of MAX_PENDING_BYTES ({cap}), but would take \
                         the jobs of the {pools} pools this edge serves from one memory (a Worker isolate's) past the bound they share: another \
                         pool holds a job larger than the room its own part leaves the others (let in alone, as a job always is when none is \
                         pending); retry when that job has ended, or run the task elsewhere",
                        past.own
                    ),
                ));
            }
            return Some(ApiError::new(
                ErrorCode::RunnerBusy,
                format!(
                    "{held}, and this one {bytes} more would take this pool past its own part ({}) of MAX_PENDING_BYTES ({cap}), \
                     which bounds the jobs of the {pools} pools this edge serves from one memory (a Worker isolate's) together, \
                     while the other pools hold or keep the rest; retry when some have ended, or run the task elsewhere",
                    past.own
                ),
            ));
        }
        if owner.is_empty() {
            // The pool secret's jobs are held to the whole bound alone: its holder is the
            // operator, as with the other shares.
            return None;
        }
        let (mine, share) = (self.pending.bytes_of(owner), self.caller_share(cap));
        if mine > 0 && mine.saturating_add(bytes) > share {
            return Some(ApiError::new(
                ErrorCode::RunnerBusy,
                format!(
                    "caller `{owner}`'s jobs not ended yet hold {mine} bytes of tasks already, and this one {bytes} more \
                     would pass {}; retry when some of its jobs have ended",
                    crate::http::named_share(&format!("MAX_PENDING_BYTES ({cap})"))
                ),
            ));
        }
        None
    }
}

#[cfg(test)]
impl Edge {
    /// The count equals the live jobs' bytes, recomputed, and its pool's entry in the
    /// process's count (this machine the pool's newest).
    pub(crate) fn check_pending(&self) {
        let live: std::collections::BTreeSet<&String> = self.queue.ids().chain(self.active.iter()).collect();
        let counted: std::collections::BTreeSet<&String> = self.pending.jobs.keys().collect();
        assert_eq!(live, counted, "pending ids vs queue+active");
        let sum: u64 = live.iter().map(|id| self.jobs[*id].approximate_bytes()).sum();
        assert_eq!(sum, self.pending.bytes, "pending bytes vs live jobs' bytes");
        let published = self.pending.entry(&mut self.pending.lock()).map(|e| e.bytes);
        assert_eq!(published, Some(self.pending.bytes), "the pool's entry in the process's count vs its machine's");
        for id in &live {
            assert!(!self.jobs[*id].state.is_terminal(), "terminal job {id} in queue/active");
        }
        let live_all: usize = self.jobs.values().filter(|j| !j.state.is_terminal() && !j.forgotten).count();
        assert_eq!(live_all, live.len(), "live jobs not in queue/active");
    }
}
