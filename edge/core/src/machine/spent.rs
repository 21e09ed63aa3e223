//! Idempotency keys outlive their jobs' records. The caps (`MAX_RETAINED_JOBS`,
//! `MAX_RETAINED_BYTES`) may forget an ended job long before its retention
//! (`JOB_RETENTION_MS`) ends, and a caller whose answer was lost — its connection cut by a
//! crash, an `/execute` that timed out on its side — sends the same key again. Had the key
//! gone with the record, that repeat made a new job, which ran the task a second time (the
//! chaos soak saw it: a job ended and was forgotten under `MAX_RETAINED_JOBS=1` in the
//! moment between an edge's restart and its caller's resend). Now the key stays until the
//! job's retention would have ended: a repeat is told the job ran, how it ended and that
//! its result is no longer kept (410 `JOB_FORGOTTEN`), and nothing runs.
//!
//! Only the keys of jobs that may have run (sent to an agent) are kept: a job never sent
//! cannot run twice, and a repeat of its key makes a new job, which runs once.
//!
//! What is kept of such a job is small: in memory a [`Spent`] beside its key, in storage
//! the record's stub ([`Job::spent_key`], marked `forgotten`), which a restore turns back
//! into a [`Spent`]. At most [`Edge::spent_cap`] are kept; past it the oldest key of the
//! owner holding the most goes (and its job could run again if sent once more with it: the
//! README says so).

use super::{Edge, Effect};
use crate::clock::Now;
use crate::record::Job;
use shared::contract::{ApiError, ErrorCode};
use shared::job::JobState;
use shared::Millis;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tracing::info;

/// The fewest keys of forgotten jobs kept, whatever `MAX_RETAINED_JOBS` says: an edge that
/// keeps one ended job (the chaos soak's) still answers the repeats of the last minutes.
pub const MIN_SPENT_KEYS: usize = 1_000;

/// What a forgotten job's idempotency key still answers.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Spent {
    /// The key's slot: (caller, key).
    slot: (String, String),
    /// Whose share of the kept keys it counts in (`super::share_of`).
    owner: String,
    state: JobState,
    finished_at: Millis,
    /// What a repeat is compared on: the same key with another task, placement or
    /// callback is a conflict, as for a kept job.
    repeatable: super::jobs::Repeatable,
}

impl Spent {
    fn of(job: &Job) -> Option<Spent> {
        Some(Spent {
            slot: job.idempotency_slot()?,
            owner: super::share_of(job).to_string(),
            state: job.state,
            finished_at: job.finished_at?,
            repeatable: super::jobs::Repeatable::of(job),
        })
    }
}

/// The keys of forgotten jobs, by job id, in the order their retention ends, and by owner.
#[derive(Debug, Default)]
pub(super) struct SpentKeys {
    by_id: HashMap<String, Spent>,
    order: BTreeSet<(Millis, String)>,
    by_owner: BTreeMap<String, BTreeSet<(Millis, String)>>,
}

impl SpentKeys {
    /// When the first one's retention ends (`retention` after its job ended).
    pub(super) fn next_due(&self, retention: Millis) -> Option<Millis> {
        self.order.first().map(|(at, _)| at.saturating_add(retention))
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the key of forgotten job `id` is kept.
    pub(super) fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    fn insert(&mut self, id: &str, spent: Spent) {
        let place = (spent.finished_at, id.to_string());
        self.order.insert(place.clone());
        self.by_owner.entry(spent.owner.clone()).or_default().insert(place);
        self.by_id.insert(id.to_string(), spent);
    }

    fn remove(&mut self, id: &str) -> Option<Spent> {
        let spent = self.by_id.remove(id)?;
        let place = (spent.finished_at, id.to_string());
        self.order.remove(&place);
        if let Some(owned) = self.by_owner.get_mut(&spent.owner) {
            owned.remove(&place);
            if owned.is_empty() {
                self.by_owner.remove(&spent.owner);
            }
        }
        Some(spent)
    }

    /// The key to let go of past the cap: the oldest of the owner holding the most (of
    /// those, the one whose oldest is oldest), so one caller's stream of keyed jobs lets
    /// go of its own keys, not another caller's — as the caps on ended jobs do.
    fn evictee(&self) -> Option<String> {
        let most = self.by_owner.values().map(BTreeSet::len).max()?;
        self.by_owner.values().filter(|owned| owned.len() == most).filter_map(|owned| owned.first()).min().map(|(_, id)| id.clone())
    }
}

impl Edge {
    /// At most this many keys of forgotten jobs are kept: as many as ended jobs
    /// (`MAX_RETAINED_JOBS`), and at least [`MIN_SPENT_KEYS`].
    pub(super) fn spent_cap(&self) -> usize {
        self.cfg.max_retained_jobs.max(MIN_SPENT_KEYS)
    }

    /// The answer to a repeat of the key of forgotten job `id`, if it is one's: a
    /// conflict when the task, its placement or callback, or the sender differs (as for a
    /// kept job), else
    /// `JOB_FORGOTTEN`.
    pub(super) fn spent_repeat(&self, now: Now, id: &str, submission: &shared::contract::Submission, mode: crate::record::Mode) -> Option<ApiError> {
        let spent = self.spent.by_id.get(id)?;
        let refused = spent.repeatable.refused(id, submission, mode);
        Some(refused.unwrap_or_else(|| {
            let ended = shared::time::rfc3339(now.wall_of(spent.finished_at));
            let mut err = ApiError::new(
                ErrorCode::JobForgotten,
                format!(
                    "this idempotency key's job {id} was sent to an agent and ended {} at {ended}, and the edge no longer \
                     keeps its record (MAX_RETAINED_JOBS, MAX_RETAINED_BYTES), so its result cannot be given again. It will \
                     not run again: send the task with a new idempotency key to run it once more",
                    spent.state.as_str()
                ),
            )
            .with_job(id);
            err.body.state = Some(spent.state);
            err
        }))
    }

    /// Keeps the key of an ended job just forgotten (out of `jobs` and the retained
    /// indexes), from its stub ([`Job::spent_key`]), which is stored in place of its record.
    pub(super) fn spend(&mut self, stub: Job, effects: &mut Vec<Effect>) {
        let Some(spent) = Spent::of(&stub) else {
            effects.push(Effect::Forget { job_id: stub.id });
            return;
        };
        self.note_spent(&stub.id);
        self.keep_spent(&stub.id, spent);
        effects.push(Effect::Save(std::sync::Arc::new(stub)));
        self.keep_spent_within_cap(effects);
    }

    /// Lets go of the kept keys past [`Edge::spent_cap`], from the owner holding the most.
    pub(super) fn keep_spent_within_cap(&mut self, effects: &mut Vec<Effect>) {
        while self.spent.len() > self.spent_cap() {
            let Some(oldest) = self.spent.evictee() else { break };
            info!(job_id = %oldest, kept = self.spent.len() - 1, "a forgotten job's idempotency key is let go early: more are kept than MAX_RETAINED_JOBS (or 1,000)");
            self.let_go_of_key(&oldest, effects);
        }
    }

    /// Lets go of the keys whose jobs' retention has ended: the same key makes a new job.
    pub(super) fn expire_spent(&mut self, now: Now, effects: &mut Vec<Effect>) {
        while let Some((finished_at, id)) = self.spent.order.first().cloned() {
            if finished_at.saturating_add(self.cfg.job_retention_ms) > now.at {
                break;
            }
            self.let_go_of_key(&id, effects);
        }
    }

    /// Takes a stored stub back in at a restore (one that names no key, never written so,
    /// goes).
    pub(super) fn restore_spent(&mut self, job: &Job, effects: &mut Vec<Effect>) {
        let Some(spent) = Spent::of(job) else {
            effects.push(Effect::Forget { job_id: job.id.clone() });
            return;
        };
        self.keep_spent(&job.id, spent);
    }

    /// Keeps forgotten job `id`'s key: its slot names the job again.
    fn keep_spent(&mut self, id: &str, spent: Spent) {
        self.idempotency.insert(spent.slot.clone(), id.to_string());
        self.spent.insert(id, spent);
    }

    /// Drops the kept key of forgotten job `id`, and its stub.
    fn let_go_of_key(&mut self, id: &str, effects: &mut Vec<Effect>) {
        self.note_spent(id);
        self.remove_spent(id);
        effects.push(Effect::Forget { job_id: id.to_string() });
    }

    /// Takes forgotten job `id`'s key out of memory (its slot too, if it is still its).
    fn remove_spent(&mut self, id: &str) {
        let Some(spent) = self.spent.remove(id) else { return };
        if self.idempotency.get(&spent.slot).is_some_and(|j| j == id) {
            self.idempotency.remove(&spent.slot);
        }
    }

    /// Puts a key back as it was before the event (undo): `prior` of forgotten job `id`.
    pub(super) fn put_back_spent(&mut self, id: &str, prior: Option<Spent>) {
        self.remove_spent(id);
        if let Some(spent) = prior {
            self.keep_spent(id, spent);
        }
    }

    /// The version of forgotten job `id`'s key before the event, for its undo.
    pub(super) fn spent_before(&self, id: &str) -> Option<Spent> {
        self.spent.by_id.get(id).cloned()
    }
}
