//! The edge state machine: one pool's queue, its agent sessions, its jobs, their deadlines
//! and the callers waiting on them. Every input carries the time ([`Now`]); every output
//! is an [`Effect`] for the host. Split by concern, each file its own `impl Edge` block:
//!
//! - [`sessions`]: agent connections — handshake, credits, heartbeats, results, reconnects.
//! - [`jobs`]: submission, dispatch in queue order, cancel, requeue, and the one way a job
//!   ends ([`Edge::finish`]).
//! - [`callers`]: who waits on a job (`/execute`) or follows it (SSE), and what each gets.
//! - [`deadlines`]: the next time anything is due, and acting on it.
//! - [`storage`]: what a failed store write means: the event is undone, then decided on.
//! - [`stop`]: a clean stop: what each waiting caller is told, and which jobs end.
//! - [`operator`]: pausing and resuming agents.
//! - [`pending`]: the bytes of the jobs not ended yet, held to `MAX_PENDING_BYTES`.
//! - [`spent`]: the idempotency keys of jobs the caps forgot, kept until their retention
//!   ends, so a repeat is told the job ran rather than running it again.
//! - [`views`]: health, login status, the jobs list, metrics, the pool's summary for
//!   `GET /pools`.
//! - [`notices`]: alerts to `NOTIFY_URL` and result callbacks, posted and retried.
//! - [`login`]: the re-login relay (`POST /oauth/login`, `POST /oauth/login/code`), and
//!   when work may go to an agent at all ([`Availability`]: its login, its usage window).
//!
//! Guarantees kept here (and so on both hosts; ARCHITECTURE.md, "Guarantees and where
//! they are kept", lists the others):
//! - a job is sent only to an agent that granted a credit for it, fits its `agent_id` and
//!   labels, and is not paused; callers take turns, each caller's jobs go by priority then
//!   age, and among the agents that fit, one holding the job's repository goes first;
//! - every accepted job ends in exactly one terminal state ([`Job::finish`] refuses a
//!   second one), which its caller can read until retention ends;
//! - a job whose agent vanished waits `LOST_AFTER_MS` for it before it is `lost`, counted
//!   again from a restart after the edge was down ([`Edge::restart`]);
//! - `/execute` with no agent that fits it and can work is refused at once (the caller
//!   falls back), and a caller told to fall back never has its job started;
//! - nothing is announced (sent, answered) before the writes it depends on are stored.

mod callers;
mod deadlines;
mod jobs;
mod operator;
mod pending;
mod login;
mod notices;
mod sessions;
mod spent;
mod stop;
mod storage;
mod views;
mod waiting;

pub use callers::{CallerId, MAX_WAITERS_PER_JOB, MAX_WAITING_REPEATS};
pub use jobs::Submitted;
pub use operator::AgentControl;
pub use login::{Availability, LOGIN_TTL_MS, LOGIN_WAIT_MS};
pub use notices::Post;
pub use sessions::{MAX_PENDING_HANDSHAKES, MAX_JOB_SENDS, MAX_PENDING_PER_SOURCE, MAX_STRAY_CANCELS};
pub use spent::MIN_SPENT_KEYS;
pub use stop::shutting_down;
pub use storage::{split_writes, Writes, STORE_RETRY_MS};
#[cfg(test)]
pub(crate) use views::FULL_VIEWS;

use crate::clock::Now;
use crate::config::Config;
use crate::progress::Backlog;
use crate::record::{Form, Job};
use crate::response::Response;
use crate::session::{Agent, Session};
use shared::job::JobState;
use shared::oauth::OAuthReport;
use shared::Millis;
use crate::queue::FairQueue;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// How long `/health` shows an agent that went away as down (and the pool `degraded`).
pub const DOWN_SHOWN_MS: Millis = 3_600_000;
/// Result callbacks waiting for delivery (their receiver down or slow), or for their job's
/// end, at most; those of one caller with its own secret, its equal share of them
/// ([`Edge::caller_share`]). They are kept in alerting's memory, which
/// is stored whole at each change, so each one more makes every such event cost more: past
/// the cap a job asking for a callback is refused (429) until some are delivered or given
/// up ([`Edge::callbacks_full`]).
pub const MAX_PENDING_CALLBACKS: usize = 256;
/// Result callbacks handed to the host at once, at most: each POST carries its job's view
/// (up to [`crate::notify::MAX_CALLBACK_BODY_BYTES`]), and a restore can find every
/// pending one overdue. The next is handed out when one's outcome comes back
/// ([`Edge::posted`]), or when one went unheard past its timeout.
pub const MAX_CALLBACKS_IN_FLIGHT: usize = 8;
/// Of those, to one receiver (a callback URL's host) at most: a receiver that is slow to
/// answer, or never does, holds its places up to each attempt's timeout, and the others'
/// results still go meanwhile.
pub const MAX_CALLBACKS_PER_RECEIVER: usize = MAX_CALLBACKS_IN_FLIGHT / 2;

/// What the host must do. Writes (`Save`, `Forget`) come first and together: see
/// [`split_writes`] and [`Edge::store_failed`]. The rest in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store this job record (insert or replace): as the event left it, shared with the
    /// machine's memory (a later change there copies it first, `storage.rs`).
    Save(Arc<Job>),
    /// Delete a job record: its retention is over.
    Forget { job_id: String },
    /// Keep this session record where it survives the host's memory (the Durable Object
    /// stores it in the socket's attachment; the native host may ignore it). Shared with
    /// the machine's memory, as a job's `Save` is.
    SaveSession(Arc<Session>),
    /// Send a text frame on an agent connection.
    Send { session: String, text: String },
    /// Close an agent connection (the machine has already forgotten it).
    Close { session: String, code: u16, reason: String },
    /// Answer this HTTP caller; the host then forgets it.
    Answer { caller: CallerId, response: Response },
    /// Write this chunk on the caller's `text/event-stream` (counting it in the caller's
    /// [`crate::progress::FeedIn`]: a follower too far behind is cut, and the machine told
    /// with [`Edge::caller_gone`]).
    Stream { caller: CallerId, chunk: crate::progress::Chunk },
    /// End the caller's stream; the host then forgets it.
    EndStream { caller: CallerId },
    /// Read this ended job's whole record from storage (memory keeps only its header) and
    /// carry out what [`Edge::deliver`] makes of it for `caller`.
    Deliver { caller: CallerId, job_id: String, form: Form },
    /// Store alerting's and callbacks' memory (with the event's other writes).
    SaveAlerts(Box<crate::notify::AlertState>),
    /// POST this (an alert, a result callback) and report how it went with
    /// [`Edge::posted`].
    Post(Post),
    /// Read this ended job's whole record from storage and hand it to [`Edge::recalled`]
    /// (a callback to post again).
    Recall { job_id: String },
}

/// What a restore follows: whether agents could have come back to the edge meanwhile,
/// which says whether the time before it counts against a job's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resumed {
    /// The edge was down: the native server's process started again (after a clean stop,
    /// a kill or a power cut). No agent could come back to it meanwhile, so every job
    /// waiting for its agent waits `LOST_AFTER_MS` again from the restart.
    AfterDowntime,
    /// The edge was up all along and only rebuilt its memory: the Durable Object, evicted
    /// when idle (about 10 s) and rebuilt at its next event, which an agent coming back
    /// is. A job's wait goes on from when its agent went: resetting it at each rebuild
    /// would let a job whose agent never comes back wait for ever, the object being
    /// rebuilt by every alarm. (A Worker deploy restarts the object too, but it answers
    /// again at once: the gap is not one an agent could not come back in.)
    Rebuilt,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub submitted: u64,
    pub finished: BTreeMap<&'static str, u64>,
    pub rejected_orders: u64,
    pub refused_agents: u64,
    /// Progress and results whose signature was not their agent's.
    pub refused_reports: u64,
    /// Events whose writes the host could not store.
    pub store_failures: u64,
}

pub struct Edge {
    cfg: Config,
    /// Every job's record (an ended one's header). Shared with the journal and with the
    /// `Save`s of the event that changed it, never copied for them ([`Edge::job_mut`]).
    jobs: HashMap<String, Arc<Job>>,
    /// Queued jobs: a lane per caller, callers in turn.
    queue: FairQueue,
    /// Dispatched or running job ids.
    active: BTreeSet<String>,
    /// The bytes of the jobs in `queue` and `active`, which memory keeps whole:
    /// `MAX_PENDING_BYTES` bounds them ([`Edge::pending_full`]).
    pending: pending::Pending,
    /// Finished job ids in the order their retention ends (when each ended, then its id).
    retained: BTreeSet<(Millis, String)>,
    /// Retained jobs by owner ([`share_of`]), each owner's in the same order, and their
    /// bytes: what the caps take from first ([`Edge::keep_within_caps`]), found without
    /// going through the others' jobs.
    retained_by: BTreeMap<String, Held>,
    /// Shared with the journal and the `SaveSession`s, as `jobs` are.
    sessions: BTreeMap<String, Arc<Session>>,
    /// Jobs by (caller, `Idempotency-Key`): each caller's keys are its own, so another
    /// caller's key (guessed or shared) never finds, and never waits on, its job.
    idempotency: HashMap<(String, String), String>,
    /// Forgotten jobs whose keys are kept (their ids stay in `idempotency`).
    spent: spent::SpentKeys,
    /// The newest OAuth report of any agent, kept while no agent is connected.
    last_oauth: Option<(String, OAuthReport)>,
    /// Since when no agent is connected (None while one is).
    offline_since: Option<Millis>,
    /// Makes each cancel order's nonce unique, even two in the same millisecond.
    orders_sent: u64,
    /// Recent progress of running jobs.
    progress: HashMap<String, Backlog>,
    callers: callers::Callers,
    journal: storage::Journal,
    /// After a tick whose writes failed: when to try again.
    retry_at: Option<Millis>,
    /// A working agent's connection closed: the queued `/execute` jobs whose fitting agents
    /// are all held back now end in the next tick, an event retried when its writes fail
    /// (a disconnect's failed writes are kept, not undone: its socket is gone for good).
    held_back_due: Option<Millis>,
    /// Queued `/execute` jobs whose last waiter hung up in an event whose writes failed
    /// (`callers.rs::caller_gone`): they end, unstarted, in the next tick (at
    /// [`storage::STORE_RETRY_MS`]) — unless dispatched meanwhile, which the failing store
    /// makes unlikely.
    abandoned: Vec<String>,
    /// The queued `/execute` jobs no connected agent fits (none connected included), and
    /// since when ([`Edge::note_unfit`], as agents come and go; entries of jobs no longer
    /// queued are left for the next): each ends `LOST_AFTER_MS` after.
    unfit_since: BTreeMap<String, Millis>,
    /// The edge is stopping: no new work, no new agents.
    stopping: bool,
    stats: Stats,
    /// Alerting's memory (stored): alerts raised and on their way, callbacks on their
    /// way, agents gone (shown as down for [`DOWN_SHOWN_MS`]), pauses.
    alerts: crate::notify::AlertState,
    /// Makes each alert post's id unique (with the ids of those on their way).
    posts_made: u64,
    /// Upgrades to `/agent/connect` refused: counted into `stats`, logged with a bound.
    upgrades: crate::upgrade::Refusals,
    /// The queued jobs dispatch has looked at so far ([`Edge::jobs_walked`]).
    walked: u64,
    /// The agents taking work, and their labels, when the queue's jobs now set aside were
    /// found to fit none of them (`jobs.rs::dispatch`).
    set_aside_for: Vec<(String, shared::placement::Labels)>,
    /// The jobs whose results were heard on each proven connection, by session id: only a
    /// result new on its connection is a sign of life (one played back by the path again
    /// and again is not). Apart from the session's record, which each event that changes
    /// it copies (for an undo, and into `SaveSession`): up to `MAX_RESULTS_HEARD` ids
    /// there were copied a few times per job. Not kept, not undone: after a Worker's
    /// hibernation, or an event undone, a result may count once more.
    results_heard: HashMap<String, HashSet<String>>,
}

impl Edge {
    pub fn new(cfg: Config, now: impl Into<Now>) -> Edge {
        let now = now.into();
        Edge {
            pending: pending::Pending::new(&cfg.pool, cfg.max_pending_bytes, cfg.heartbeat_interval_ms, now.at),
            cfg,
            jobs: HashMap::new(),
            queue: FairQueue::default(),
            active: BTreeSet::new(),
            retained: BTreeSet::new(),
            retained_by: BTreeMap::new(),
            sessions: BTreeMap::new(),
            idempotency: HashMap::new(),
            spent: spent::SpentKeys::default(),
            last_oauth: None,
            offline_since: Some(now.at),
            orders_sent: 0,
            progress: HashMap::new(),
            callers: callers::Callers::default(),
            journal: storage::Journal::default(),
            retry_at: None,
            held_back_due: None,
            abandoned: Vec::new(),
            unfit_since: BTreeMap::new(),
            stopping: false,
            stats: Stats::default(),
            alerts: crate::notify::AlertState::default(),
            posts_made: 0,
            upgrades: crate::upgrade::Refusals::default(),
            walked: 0,
            set_aside_for: Vec::new(),
            results_heard: HashMap::new(),
        }
    }

    /// Rebuilds the machine of an edge that was up all along (the Durable Object after an
    /// eviction: `Resumed::Rebuilt`) from stored job records and the sessions whose
    /// connections survived (its hibernated sockets). Jobs whose connection did not survive
    /// start their `LOST_AFTER_MS` wait now; those waiting already wait on. No caller
    /// survives a restart, so an `/execute` job its agent has not started — queued,
    /// dispatched, or accepted and not said started ([`Job::unstarted`]) — whose caller is
    /// gone, and was perhaps told to fall back, ends here without ever starting, unless a
    /// clean stop told its caller to follow it ([`Job::callers_told_to_follow`]). (The
    /// Durable Object is evicted only when idle, and a waiting `/execute` caller keeps it
    /// busy: one rebuilt while a caller waited lost that caller with the old instance.)
    /// `alerts` is alerting's stored memory (how long no agent has been connected
    /// included), if any.
    pub fn restore(cfg: Config, jobs: Vec<Job>, sessions: Vec<Session>, alerts: Option<crate::notify::AlertState>, now: impl Into<Now>) -> (Edge, Vec<Effect>) {
        Edge::resume(cfg, jobs, sessions, alerts, now.into(), Resumed::Rebuilt)
    }

    /// [`Edge::restore`] of an edge that was down (`Resumed::AfterDowntime`: the native
    /// server's start, after a clean stop or a crash): no connection survived, and every
    /// job waiting for its agent waits `LOST_AFTER_MS` again from now.
    pub fn restart(cfg: Config, jobs: Vec<Job>, alerts: Option<crate::notify::AlertState>, now: impl Into<Now>) -> (Edge, Vec<Effect>) {
        Edge::resume(cfg, jobs, Vec::new(), alerts, now.into(), Resumed::AfterDowntime)
    }

    fn resume(cfg: Config, jobs: Vec<Job>, sessions: Vec<Session>, alerts: Option<crate::notify::AlertState>, now: Now, how: Resumed) -> (Edge, Vec<Effect>) {
        let mut edge = Edge::new(cfg, now);
        edge.begin(storage::Origin::Restore, Some(now));
        let mut effects = Vec::new();
        if let Some(alerts) = alerts {
            edge.offline_since = alerts.offline_since.or(edge.offline_since);
            edge.alerts = alerts;
        }
        for s in sessions {
            if let Some(a) = s.agent() {
                edge.last_oauth = Some((a.agent_id.clone(), a.oauth.clone()));
                edge.alerts.usage_hold = a.usage_hold_until;
                edge.offline_since = None;
                if a.paused {
                    edge.alerts.paused.insert(a.agent_id.clone());
                }
            }
            edge.sessions.insert(s.id.clone(), Arc::new(s));
        }
        let mut jobs = jobs;
        jobs.sort_by_key(|j| (j.created_at, j.id.clone()));
        // Each with whether it was sent to an agent, which may have started it before the
        // edge went down (its `Started` lost with it): such a job keeps its key's slot.
        let mut callerless: Vec<(String, bool)> = Vec::new();
        for job in jobs {
            if job.forgotten {
                edge.restore_spent(&job, &mut effects);
                continue;
            }
            let mut job = job.in_memory();
            edge.claim_slot(&job);
            let mut changed = false;
            match job.state {
                JobState::Queued if job.waited_only() => callerless.push((job.id.clone(), false)),
                JobState::Queued => {}
                // Sent, or accepted and held before its start (at the login's refresh gate,
                // in a long checkout), its Claude not given the prompt: its caller is gone
                // as a queued one's is, and ends the same way (its agent's hello is then told
                // it was given up, and never starts it) — unless a clean stop told that
                // caller to follow it.
                JobState::Dispatched | JobState::Running
                    if job.waited_only()
                        && (job.state == JobState::Dispatched || job.unstarted)
                        && !job.callers_told_to_follow =>
                {
                    callerless.push((job.id.clone(), true))
                }
                JobState::Dispatched | JobState::Running => {
                    let connected = job.session_id.as_ref().is_some_and(|s| edge.sessions.contains_key(s));
                    // The edge's own downtime is not the agent's: after it, a job that was
                    // waiting for its agent before a crash waits again from now, as after a
                    // clean stop (`machine/stop.rs`). Otherwise a kill longer than
                    // LOST_AFTER_MS lost every job whose agent was away, at the first tick.
                    if !connected && (job.orphaned_at.is_none() || how == Resumed::AfterDowntime) {
                        job.orphaned_at = Some(now.at);
                        changed = true;
                    }
                }
                _ => {}
            }
            edge.index(&job);
            let job = Arc::new(job);
            if changed {
                effects.push(Effect::Save(Arc::clone(&job)));
            }
            edge.jobs.insert(job.id.clone(), job);
        }
        for (id, sent) in callerless {
            // A repeat of a job's key makes a new job only if it was never sent
            // (`Job::superseded_by_repeat`): one that was keeps its key, and says to send a
            // new one.
            let why = match sent {
                false => "the edge restarted before the job started and its caller is gone; it will not run: submit it again",
                true => "the edge restarted before its agent said it started the job and its caller is gone; it will not run: \
                         submit it again with a new idempotency key (its agent may have begun it, and is told to drop it)",
            };
            edge.end_unstarted(now, &id, why, &mut effects);
        }
        // Restored, the job that ended last is the last in the retained order.
        let last = edge.retained.last().cloned();
        edge.keep_within_caps(last, &mut effects);
        edge.keep_spent_within_cap(&mut effects);
        (edge, effects)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id).map(|job| &**job)
    }

    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id).map(|s| &**s)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// How many queued jobs dispatch has looked at, in all, to find the ones to send: what
    /// the tests bound (a job no agent fits is not looked at again at every dispatch).
    pub fn jobs_walked(&self) -> u64 {
        self.walked
    }

    /// Agent sessions that finished the handshake.
    pub(crate) fn ready(&self) -> impl Iterator<Item = (&String, &Agent)> {
        self.sessions.iter().filter_map(|(id, s)| s.agent().map(|a| (id, a)))
    }

    pub fn is_online(&self) -> bool {
        self.ready().next().is_some()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn active_jobs(&self) -> usize {
        self.active.len()
    }

    /// Puts a job into the index its state belongs to (queue, active or retained). Used
    /// when a record arrives whole: at restore, and when a failed event is undone.
    fn index(&mut self, job: &Job) {
        match job.state {
            JobState::Queued => self.enqueue(job),
            JobState::Dispatched | JobState::Running => {
                self.active.insert(job.id.clone());
                self.pending.add(job);
            }
            _ => self.count_retained(job, true),
        }
        self.claim_slot(job);
    }

    /// Makes `job` the one its idempotency key names — unless the key names another job
    /// already and this one is superseded by a repeat ([`Job::superseded_by_repeat`]):
    /// the newer job made in its place keeps the key, whatever order records come back in
    /// (a restore, an undone event's job put back), or a repeat would make a third job
    /// while the second may be running.
    fn claim_slot(&mut self, job: &Job) {
        let Some(slot) = job.idempotency_slot() else { return };
        let taken = self.idempotency.get(&slot).is_some_and(|held| *held != job.id && (self.jobs.contains_key(held) || self.spent.contains(held)));
        if taken && job.superseded_by_repeat() {
            return;
        }
        self.idempotency.insert(slot, job.id.clone());
    }

    /// Counts an ended job in, or out of, what is retained: in all and by its owner.
    fn count_retained(&mut self, job: &Job, kept: bool) {
        self.count_retained_of(share_of(job), &retained_entry(job), job.approximate_bytes(), kept);
    }

    /// About how many bytes the whole records of the retained jobs take (each owner's
    /// summed: owners are the callers with their own secret, and the pool's).
    fn retained_bytes(&self) -> u64 {
        self.retained_by.values().map(|held| held.bytes).sum()
    }

    /// [`Edge::count_retained`] of a job known by its owner, its place and its size. Taking
    /// out one that is not retained does nothing.
    fn count_retained_of(&mut self, owner: &str, entry: &(Millis, String), bytes: u64, kept: bool) {
        if kept {
            if !self.retained.insert(entry.clone()) {
                return;
            }
            let held = match self.retained_by.get_mut(owner) {
                Some(held) => held,
                None => self.retained_by.entry(owner.to_string()).or_default(),
            };
            held.bytes += bytes;
            held.jobs.insert(entry.clone());
        } else {
            if !self.retained.remove(entry) {
                return;
            }
            if let Some(held) = self.retained_by.get_mut(owner) {
                held.bytes = held.bytes.saturating_sub(bytes);
                held.jobs.remove(entry);
                if held.jobs.is_empty() {
                    self.retained_by.remove(owner);
                }
            }
        }
    }

    /// Queues a job in its caller's lane, where its priority and age put it, counting it
    /// among the jobs not ended (once: a job queued again was counted when it came). Its
    /// turns are its owner's ([`share_of`]), as its share of everything else is: the pool
    /// secret's names, made up at will, take one owner's turns between them.
    fn enqueue(&mut self, job: &Job) {
        self.pending.add(job);
        let expires_at = job.created_at.saturating_add(job.queue_wait(self.cfg.queue_ttl_ms));
        let (owner, name, priority) = (share_of(job), job.placement.caller(), job.placement.priority);
        self.queue.push(&job.id, owner, name, priority, job.created_at, expires_at);
    }

    /// Takes a job out of every index (the reverse of [`Edge::index`]).
    fn unindex(&mut self, job: &Job) {
        self.queue.remove(&job.id);
        self.active.remove(&job.id);
        self.pending.remove(&job.id);
        self.count_retained(job, false);
        if let Some(slot) = job.idempotency_slot() {
            if self.idempotency.get(&slot) == Some(&job.id) {
                self.idempotency.remove(&slot);
            }
        }
    }
}

/// One owner's retained jobs ([`Edge::count_retained`]).
#[derive(Debug, Default)]
struct Held {
    /// Their records' bytes, about.
    bytes: u64,
    /// Their places in [`Edge::retained`]: when each ended, then its id.
    jobs: BTreeSet<(Millis, String)>,
}

/// An ended job's place among the retained: when it ended, then its id.
fn retained_entry(job: &Job) -> (Millis, String) {
    (job.finished_at.unwrap_or(0), job.id.clone())
}

/// Whose share of what callers hold together (the ended jobs kept, the event streams) a
/// job counts in: a caller that sent it with its own secret (`RUNNER_SECRETS`) holds its
/// own share, named by it; everything the pool's secret sent, whatever caller it named,
/// is one share, `""` (names are the pool secret's to make up, as the agent weighs
/// sessions).
pub(crate) fn share_of(job: &Job) -> &str {
    share(job.caller_proven, &job.placement)
}

impl Edge {
    /// The most a caller with its own secret holds of `all` — places or bytes every caller
    /// draws on: event streams, repeats waiting on jobs, the bytes of jobs not ended,
    /// callbacks waiting — an equal share among those who send jobs
    /// ([`crate::http::owners`]: the pool secret's callers as one, each named caller). The
    /// pool secret's own are held to `all` alone: its holder is the operator. Half each let
    /// two named callers take everything, the operator's and a third caller's part too
    /// (review rev10).
    pub(crate) fn caller_share<T>(&self, all: T) -> T
    where
        T: Copy + Ord + From<u8> + TryFrom<usize> + std::ops::Div<Output = T>,
    {
        crate::http::equal_share(all, crate::http::owners(&self.cfg))
    }
}

/// [`share_of`] a job sent as `placement` says, with its caller's own secret or not: a
/// submission's before it is a job.
pub(crate) fn share(caller_proven: bool, placement: &shared::placement::Placement) -> &str {
    if caller_proven {
        placement.caller()
    } else {
        ""
    }
}
