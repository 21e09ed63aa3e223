//! What a failed store write means. Hosts write an event's `Save`s and `Forget`s in one
//! transaction before they carry out anything else of it ([`split_writes`]); when that
//! fails they carry out none of the event's other effects and call
//! [`Edge::store_failed`]. Nothing of the event was announced, so the machine undoes it —
//! every job, session and caller list it touched goes back to how it was — and then
//! decides by what the event was:
//!
//! - a request (a submission, a cancel): its caller gets a 500 saying nothing was done and
//!   what to do next; a job it submitted does not exist afterwards;
//! - an agent's frame (a result, an acceptance, a credit, a hello): the connection is
//!   closed (1011), so the agent reconnects and sends again what the edge did not
//!   acknowledge — its spooled results;
//! - a tick: tried again [`STORE_RETRY_MS`] later;
//! - a caller gone: its places are given back all the same, and the queued `/execute` job
//!   it no longer waits for ends at the next tick, tried [`STORE_RETRY_MS`] later;
//! - a stop: the callers still waiting are told where to follow their jobs (whose
//!   records are as they were), and agents to reconnect;
//! - a lost connection: kept — it ends no job (the queued `/execute` jobs it leaves to
//!   held-back agents end in the next tick), and a restore marks the same again;
//! - a restore: the hosts store its writes before they serve anything, and do not serve
//!   when that fails (the native edge exits, the Worker's object rebuilds at its next
//!   event): served on unstored decisions, a job ended in memory only could be forgotten
//!   by the caps, its record deleted with its end never written. Kept here, should a host
//!   report one all the same.
//!
//! The undo is a journal of first touches: before an event changes a job, a session or a
//! job's caller lists for the first time, the version before is kept. The journal is
//! cleared when the next event begins — unless the host grouped events
//! ([`Edge::group_events`]): a host may store several events' writes in one transaction
//! (the native edge does with what is queued at once: one commit instead of one per event),
//! announcing nothing of any of them before it. Then the journal spans the group (the
//! first touch of each thing is its version before the group), and a failed store undoes
//! every event of the group at once, answering none ([`Edge::group_failed`]): the host then
//! handles each again alone, as if never grouped. A job's record is shared, not copied, by the
//! journal and by the event's `Save` (an `Arc`): an event copies a record only when it
//! changes one that either still holds ([`Edge::job_mut`]), once, where it made two or
//! three copies of it (issue 11: a fifth of the edge's allocations).

use super::{CallerId, Edge, Effect};
use crate::clock::Now;
use crate::progress::Backlog;
use crate::record::Job;
use crate::response::Response;
use crate::session::{Refused, Session};
use shared::contract::{ApiError, ErrorCode};
use shared::protocol::close;
use shared::Millis;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{error, warn};

/// How soon a tick whose writes failed is tried again.
pub const STORE_RETRY_MS: Millis = 1_000;

/// One event's writes, to be stored in one transaction.
#[derive(Debug, Default, PartialEq)]
pub struct Writes {
    /// The records as the event left them, shared with the machine's memory.
    pub saves: Vec<Arc<Job>>,
    pub forgets: Vec<String>,
    /// Alerting's memory, when it changed.
    pub alerts: Option<crate::notify::AlertState>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.saves.is_empty() && self.forgets.is_empty() && self.alerts.is_none()
    }
}

/// Splits one event's effects into its writes (to store first, together) and the rest
/// (to carry out afterwards, in order). The transaction holds the event's outcome, not its
/// steps: a job saved twice in one event (queued and sent at once, the common case) is
/// written once, as it was last, and a job both saved and forgotten is written as the last
/// of those left it — saved, or gone — since a host writes an event's saves before its
/// forgets.
pub fn split_writes(effects: Vec<Effect>) -> (Writes, Vec<Effect>) {
    let mut writes = Writes::default();
    let mut steps = Vec::new();
    let mut rest = Vec::with_capacity(effects.len());
    for effect in effects {
        match effect {
            Effect::Save(job) => steps.push(Ok(job)),
            Effect::Forget { job_id } => steps.push(Err(job_id)),
            Effect::SaveAlerts(state) => writes.alerts = Some(*state),
            other => rest.push(other),
        }
    }
    // Which step is each job's last, by its id borrowed from the steps themselves: most
    // events have one or two, and this runs for every event.
    fn id(step: &Result<Arc<Job>, String>) -> &str {
        step.as_ref().map_or_else(String::as_str, |job| job.id.as_str())
    }
    let last: HashMap<&str, usize> = if steps.len() > 1 { steps.iter().enumerate().map(|(i, step)| (id(step), i)).collect() } else { HashMap::new() };
    let kept: Vec<bool> = (0..steps.len()).map(|i| last.is_empty() || last[id(&steps[i])] == i).collect();
    drop(last);
    for (step, kept) in steps.into_iter().zip(kept) {
        match (kept, step) {
            (false, _) => {}
            (true, Ok(job)) => writes.saves.push(job),
            (true, Err(job_id)) => writes.forgets.push(job_id),
        }
    }
    (writes, rest)
}

impl Effect {
    pub fn is_write(&self) -> bool {
        matches!(self, Effect::Save(_) | Effect::Forget { .. } | Effect::SaveAlerts(_))
    }
}

/// What started the current event.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) enum Origin {
    /// Nothing that writes (a wait bound passed).
    #[default]
    Quiet,
    Request(CallerId),
    /// This caller hung up (it may end the queued `/execute` job it waited on).
    Gone(CallerId),
    /// A frame (or a new connection) on this agent session.
    Session(String),
    Disconnect,
    Tick,
    Shutdown,
    Restore,
}

/// The versions before the current event changed them (`None`: it did not exist).
#[derive(Debug, Default)]
pub(super) struct Journal {
    pub origin: Origin,
    jobs: HashMap<String, Option<Arc<Job>>>,
    /// Forgotten jobs' kept keys (`spent.rs`), by job id.
    spent: HashMap<String, Option<super::spent::Spent>>,
    sessions: HashMap<String, Option<Arc<Session>>>,
    /// A job's (waiters, followers) lists.
    callers: HashMap<String, (Option<Vec<CallerId>>, Option<Vec<super::callers::Follower>>)>,
    backlogs: Vec<(String, Backlog)>,
    stats: Option<super::Stats>,
    /// The relay's callers before the event changed them.
    logins: Option<HashMap<String, Vec<CallerId>>>,
    /// Alerting's memory before the event changed it.
    alerts: Option<crate::notify::AlertState>,
    /// [`Edge::held_back_due`] before the event changed it.
    held_back_due: Option<Option<Millis>>,
    /// [`Edge::abandoned`] before the event changed it.
    abandoned: Option<Vec<String>>,
    /// While the host groups events ([`Edge::group_events`]): each event's origin, in
    /// order; the journal then spans them all.
    group: Option<Vec<Origin>>,
}

impl Edge {
    /// Starts an event, at `now` (`None`: one the host gives no time, an upgrade counted): what
    /// it changes from now on can be undone until the next one, and the machine's pool
    /// counts in the process's pending bytes a while more (`pending.rs`).
    pub(super) fn begin(&mut self, origin: Origin, now: Option<Now>) {
        match &mut self.journal.group {
            // Grouped: the versions before the group stay, for the group's one undo.
            Some(origins) => {
                origins.push(origin.clone());
                self.journal.origin = origin;
            }
            None => self.journal = Journal { origin, ..Journal::default() },
        }
        if let Some(now) = now {
            self.pending.touch(now.at);
        }
    }

    /// The host stores the writes of the events from here until [`Edge::group_stored`] in
    /// one transaction, and carries out nothing else of any of them before that: a failed
    /// store ([`Edge::group_failed`]) then undoes them all.
    pub fn group_events(&mut self) {
        self.journal = Journal { group: Some(Vec::new()), ..Journal::default() };
    }

    /// The group's writes were stored: its events are done, and the next event starts a
    /// journal of its own.
    pub fn group_stored(&mut self) {
        self.journal.group = None;
    }

    /// The group's writes could not be stored: every event of it is undone at once (the
    /// journal holds each thing as it was before the group's first event), and nothing of
    /// any of them is answered or closed here. The host then handles each event again,
    /// alone, each in a transaction of its own, exactly as if it had never been grouped:
    /// a read, a repeated key's answer, a heartbeat write nothing and are served as ever,
    /// and only an event whose own writes fail again is told so ([`Edge::store_failed`],
    /// the one place that words a failure). Otherwise a read grouped with another caller's
    /// failed write was told "nothing was done, run the task elsewhere" (a job run twice),
    /// and an agent that sent only a heartbeat was disconnected.
    pub fn group_failed(&mut self, now: impl Into<Now>, problem: &str) {
        let now = now.into();
        let origins = self.journal.group.take().unwrap_or_default();
        warn!(problem, events = origins.len(), "could not store a group of events; undoing it and handling each event again alone");
        if origins.iter().any(|o| !matches!(o, Origin::Quiet | Origin::Disconnect | Origin::Restore)) {
            self.undo(now);
        }
        self.begin(Origin::Quiet, Some(now));
    }

    /// A job to change, its version before noted. The record is copied here if the
    /// journal or a `Save` of this event still holds it (copy on write), else changed in
    /// place: the version before, and the version saved, stay as they were.
    pub(super) fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
        let job = self.jobs.get(id)?;
        // A restore is never undone (see `store_failed`): each job it ends, whole, held
        // beside its `Save` while the host writes them, would be waste.
        if self.journal.origin != Origin::Restore && !self.journal.jobs.contains_key(id) {
            self.journal.jobs.insert(id.to_string(), Some(Arc::clone(job)));
        }
        self.jobs.get_mut(id).map(Arc::make_mut)
    }

    /// The job's record as it is now, to store: shared with memory, not copied.
    pub(super) fn save(&self, id: &str) -> Effect {
        Effect::Save(Arc::clone(&self.jobs[id]))
    }

    pub(super) fn insert_job(&mut self, job: Job) {
        let prior = self.jobs.get(&job.id).cloned();
        self.journal.jobs.entry(job.id.clone()).or_insert(prior);
        self.jobs.insert(job.id.clone(), Arc::new(job));
    }

    /// Removes a job whose retention is over, with its idempotency key.
    pub(super) fn forget_job(&mut self, id: &str) {
        let Some(job) = self.jobs.remove(id) else { return };
        if let Some(slot) = job.idempotency_slot() {
            if self.idempotency.get(&slot).is_some_and(|j| j == id) {
                self.idempotency.remove(&slot);
            }
        }
        self.journal.jobs.entry(id.to_string()).or_insert(Some(job));
    }

    /// Notes a forgotten job's kept key (`spent.rs`) before it changes.
    pub(super) fn note_spent(&mut self, id: &str) {
        if !self.journal.spent.contains_key(id) {
            let prior = self.spent_before(id);
            self.journal.spent.insert(id.to_string(), prior);
        }
    }

    /// A session to change, its version before noted: copied on write, as a job is
    /// ([`Edge::job_mut`]).
    pub(super) fn session_mut(&mut self, id: &str) -> Option<&mut Session> {
        let session = self.sessions.get(id)?;
        if !self.journal.sessions.contains_key(id) {
            self.journal.sessions.insert(id.to_string(), Some(Arc::clone(session)));
        }
        self.sessions.get_mut(id).map(Arc::make_mut)
    }

    /// The session's record as it is now, for the host to keep: shared, not copied.
    pub(super) fn save_session(&self, id: &str) -> Effect {
        Effect::SaveSession(Arc::clone(&self.sessions[id]))
    }

    pub(super) fn insert_session(&mut self, session: Session) {
        let prior = self.sessions.get(&session.id).cloned();
        self.journal.sessions.entry(session.id.clone()).or_insert(prior);
        self.sessions.insert(session.id.clone(), Arc::new(session));
    }

    pub(super) fn remove_session(&mut self, id: &str) -> Option<Arc<Session>> {
        let session = self.sessions.remove(id)?;
        self.results_heard.remove(id);
        self.journal.sessions.entry(id.to_string()).or_insert_with(|| Some(Arc::clone(&session)));
        Some(session)
    }

    /// Notes a job's caller lists before they change.
    pub(super) fn note_callers(&mut self, job_id: &str) {
        if !self.journal.callers.contains_key(job_id) {
            let prior = (self.callers.waiters.get(job_id).cloned(), self.callers.followers.get(job_id).cloned());
            self.journal.callers.insert(job_id.to_string(), prior);
        }
    }

    /// Notes alerting's memory as it was before the event changed it.
    pub(super) fn note_alerts(&mut self, before: crate::notify::AlertState) {
        if self.journal.alerts.is_none() {
            self.journal.alerts = Some(before);
        }
    }

    /// Notes when the held-back `/execute` jobs were due to end, before a tick takes it.
    pub(super) fn note_held_back_due(&mut self) {
        if self.journal.held_back_due.is_none() {
            self.journal.held_back_due = Some(self.held_back_due);
        }
    }

    /// Notes the jobs abandoned by callers in events whose writes failed, before a tick
    /// takes them.
    pub(super) fn note_abandoned(&mut self) {
        if self.journal.abandoned.is_none() {
            self.journal.abandoned = Some(self.abandoned.clone());
        }
    }

    /// Notes the relay's callers before they change.
    pub(super) fn note_logins(&mut self) {
        if self.journal.logins.is_none() {
            self.journal.logins = Some(self.callers.logins.clone());
        }
    }

    pub(super) fn drop_backlog(&mut self, job_id: &str) {
        if let Some(backlog) = self.progress.remove(job_id) {
            self.journal.backlogs.push((job_id.to_string(), backlog));
        }
    }

    pub(super) fn stats_mut(&mut self) -> &mut super::Stats {
        if self.journal.stats.is_none() {
            self.journal.stats = Some(self.stats.clone());
        }
        &mut self.stats
    }

    /// The host could not store the writes of the event just handled and carried out none
    /// of its other effects. Returns what to do instead; it holds no writes. One event
    /// only: a group's failed store goes through [`Edge::group_failed`], which undoes the
    /// group and has the host handle each event again alone, each then told here.
    pub fn store_failed(&mut self, now: impl Into<Now>, problem: &str) -> Vec<Effect> {
        let now = now.into();
        if self.journal.group.take().is_some() {
            // A host that groups calls `group_failed`: answered here, only the group's last
            // event would be, the others' callers left waiting.
            error!(problem, "a host reported a group's failed store as one event's; its last event only is answered");
            debug_assert!(false, "a group's failed store goes through group_failed");
        }
        let origin = self.journal.origin.clone();
        error!(problem, event = ?origin, "the edge could not store an event's changes; undoing it");
        // Which agent proved itself on the connection (in the event or before), as it was
        // before the undo.
        let agent_id = match &origin {
            Origin::Session(session) => self.sessions.get(session).and_then(|s| s.agent_id()).map(str::to_string),
            _ => None,
        };
        // A wait bound passed, a lost connection and a restore keep what they did (below);
        // every other event is undone.
        if !matches!(origin, Origin::Quiet | Origin::Disconnect | Origin::Restore) {
            self.undo(now);
        }
        let mut effects = Vec::new();
        self.failed(now, origin, agent_id, problem, &mut effects);
        self.stats.store_failures += 1;
        // What is decided here is not stored (the store just failed): a restore rebuilds
        // the same from the records as they are.
        effects.retain(|e| !e.is_write());
        self.begin(Origin::Quiet, Some(now));
        effects
    }

    /// What one event whose writes failed (and were undone) means, by what it was.
    fn failed(&mut self, now: Now, origin: Origin, agent_id: Option<String>, problem: &str, effects: &mut Vec<Effect>) {
        match origin {
            Origin::Quiet | Origin::Disconnect => {}
            // The hosts store a restore's writes themselves and serve nothing when that
            // fails: kept (it announced nothing), but a host that calls this is wrong.
            Origin::Restore => {
                error!("a host reported a restore's failed writes instead of refusing to serve; the jobs it decided on are ended in memory only until the next start");
                debug_assert!(false, "hosts store a restore's writes before serving");
            }
            Origin::Request(caller) => {
                let err = ApiError::new(
                    ErrorCode::InternalError,
                    format!(
                        "the edge could not store this change ({problem}), so nothing was done: no job was queued or \
                         cancelled. Retry in a moment or run the task elsewhere; the edge's operator should check its \
                         storage (disk space, permissions, another process holding the database)"
                    ),
                );
                effects.push(Effect::Answer { caller, response: Response::error(err) });
            }
            Origin::Session(session) => {
                if self.sessions.contains_key(&session) {
                    let refused = Refused::new(
                        close::INTERNAL_ERROR,
                        "the edge could not store what this connection sent; reconnect and send it again",
                    );
                    self.close(now, &session, refused, effects);
                }
                if let Some(agent_id) = agent_id {
                    self.agent_was_here(now, &agent_id);
                }
            }
            Origin::Tick => {
                self.retry_at = Some(now.at.saturating_add(STORE_RETRY_MS));
            }
            // The caller is gone all the same: its places are given back again, and the
            // queued `/execute` job it left ends unstarted at the next tick.
            Origin::Gone(caller) => {
                if let Some(job_id) = self.let_caller_go(caller) {
                    if self.unwaited_in_queue(&job_id) && !self.abandoned.contains(&job_id) {
                        self.abandoned.push(job_id);
                        self.retry_at = Some(now.at.saturating_add(STORE_RETRY_MS));
                    }
                }
            }
            Origin::Shutdown => self.let_go(now, effects),
        }
    }

    /// The edge closed an agent's connection only because it could not store what the
    /// agent said: the agent did not vanish, and comes back at once. Its jobs' wait for it
    /// (`LOST_AFTER_MS`) starts again from now; otherwise, when the store fails for longer
    /// than that while the agent keeps coming back, the first tick that can store again
    /// would declare lost a job the agent runs or holds the result of. Kept in memory only
    /// (the store is failing); a restore marks such jobs again.
    fn agent_was_here(&mut self, now: Now, agent_id: &str) {
        let waiting: Vec<String> = self
            .active
            .iter()
            .filter(|id| {
                let job = &self.jobs[*id];
                job.agent_id.as_deref() == Some(agent_id) && job.orphaned_at.is_some()
            })
            .cloned()
            .collect();
        for id in waiting {
            if let Some(job) = self.jobs.get_mut(&id) {
                Arc::make_mut(job).orphaned_at = Some(now.at);
            }
        }
    }

    /// The bytes of the whole records the current event's journal keeps for an undo.
    #[cfg(test)]
    pub(crate) fn journalled_bytes(&self) -> u64 {
        self.journal.jobs.values().flatten().map(|job| job.approximate_bytes()).sum()
    }

    /// Puts back every job, session, caller list and backlog the current event changed.
    fn undo(&mut self, now: Now) {
        let journal = std::mem::take(&mut self.journal);
        warn!(jobs = journal.jobs.len(), sessions = journal.sessions.len(), "undoing an event that could not be stored");
        // Keys first: a job forgotten in the event took its key's slot, which the job,
        // put back below, takes again.
        for (id, prior) in journal.spent {
            self.put_back_spent(&id, prior);
        }
        let mut restored = Vec::new();
        for (id, prior) in journal.jobs {
            if let Some(current) = self.jobs.remove(&id) {
                self.unindex(&current);
            }
            if let Some(job) = prior {
                restored.push(id.clone());
                self.jobs.insert(id, job);
            }
        }
        for id in restored {
            let job = self.jobs[&id].clone();
            self.index(&job);
        }
        for (id, prior) in journal.sessions {
            self.sessions.remove(&id);
            if let Some(session) = prior {
                self.sessions.insert(id, session);
            }
        }
        if self.is_online() {
            self.offline_since = None;
        } else if self.offline_since.is_none() {
            self.offline_since = Some(now.at);
        }
        self.note_unfit(now);
        for (job_id, (waiters, followers)) in journal.callers {
            self.callers.set(&job_id, waiters, followers);
        }
        for (job_id, backlog) in journal.backlogs {
            self.progress.insert(job_id, backlog);
        }
        if let Some(stats) = journal.stats {
            self.stats = stats;
        }
        if let Some(logins) = journal.logins {
            self.callers.logins = logins;
        }
        if let Some(alerts) = journal.alerts {
            self.alerts = alerts;
        }
        if let Some(due) = journal.held_back_due {
            self.held_back_due = due;
        }
        if let Some(abandoned) = journal.abandoned {
            self.abandoned = abandoned;
        }
    }
}
