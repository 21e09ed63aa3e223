//! Jobs: submission, dispatch to agents with credit in queue order, cancel, requeue, and
//! [`Edge::finish`] — the one way a job ends, which stores it and tells its callers.

use super::waiting::Hindrance;
use super::{Edge, Effect};
use crate::clock::Now;
use crate::record::{Job, Mode};
use crate::routing::{self, Candidate};
use shared::placement::Labels;
use std::collections::HashMap;
use shared::contract::{ApiError, ErrorCode, Submission};
use shared::envelope::{Audience, Domain, Envelope, OrderHeader};
use shared::job::{JobResult, JobState};
use shared::protocol::{CancelOrder, EdgeMessage, JobOrder};
use tracing::info;

/// What [`Edge::next_order`] found: the job to send and its session, if any; the jobs it
/// passed that no agent taking work fits; how many it looked at.
#[derive(Debug, Default)]
struct Walk {
    order: Option<(String, String)>,
    unfit: Vec<String>,
    examined: usize,
}

/// Outcome of a submission.
#[derive(Debug)]
pub struct Submitted {
    pub job_id: String,
    /// The idempotency key named an earlier job; nothing new was queued.
    pub existing: bool,
    pub effects: Vec<Effect>,
}

/// What a repeat of a job's idempotency key is compared on: kept with the job, and with its
/// key once the caps forgot it (`spent.rs`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Repeatable {
    /// The task's digest ([`crate::record::spec_digest`]).
    digest: String,
    /// Its placement's and callback's ([`crate::record::terms_digest`]). `None`: not known
    /// (the stub of a job an edge of before forgot), and not compared.
    terms: Option<String>,
    /// Its `wait_for_usage`, if a `POST /jobs` job (an `/execute` says none).
    usage_wait: Option<bool>,
    /// Sent with its caller's own secret.
    proven: bool,
    /// Its caller's name.
    caller: String,
}

impl Repeatable {
    pub(super) fn of(job: &Job) -> Repeatable {
        Repeatable {
            digest: job.digest(),
            terms: job.terms(),
            usage_wait: (job.mode == Mode::Detached).then_some(job.wait_for_usage),
            proven: job.caller_proven,
            caller: job.placement.caller().to_string(),
        }
    }

    /// Why `submission` (sent as `mode`), whose idempotency key names job `id` — kept, or
    /// forgotten with its key kept — is not a repeat of it, if it is not.
    pub(super) fn refused(&self, id: &str, submission: &Submission, mode: Mode) -> Option<ApiError> {
        let terms = || crate::record::terms_digest(&submission.placement, submission.callback_url.as_deref());
        // `wait_for_usage` is a `POST /jobs` field: an `/execute` repeating a job's key, or
        // a `POST /jobs` repeating an `/execute`'s, says nothing of it.
        let usage_wait = self.usage_wait.filter(|_| mode == Mode::Detached);
        // The same key for a different task is a caller's mistake, not a repeat.
        let error = if self.digest != crate::record::spec_digest(&submission.spec) {
            "this idempotency key was already used for a different task; use a new key for a new task".to_string()
        } else if self.proven != submission.caller_proven {
            // A caller with its own secret and the pool secret's name for it are two senders
            // (the one's job may be planted by the other, who guessed key and task): a 409 —
            // neither the other's job nor a second run of the task.
            let (used, now) = if self.proven { ("its own secret", "the pool's secret") } else { ("the pool's secret", "its own secret") };
            let caller = &self.caller;
            format!("this idempotency key was used for caller `{caller}` with {used}, and this request comes with {now}; use a new key")
        } else if self.terms.as_ref().is_some_and(|kept| *kept != terms()) || usage_wait.is_some_and(|w| w != submission.wait_for_usage) {
            // So is the same task placed or delivered otherwise: answered with the first
            // job, the caller would take it for what it asked (review rev10, 4).
            "this idempotency key was already used for the same task with other labels, agent_id, priority, callback_url \
             or wait_for_usage; send the first request as it was to repeat it, or use a new key for a new job"
                .to_string()
        } else {
            return None;
        };
        Some(ApiError::new(ErrorCode::Conflict, error).with_job(id))
    }
}

impl Edge {
    /// Takes a validated submission, within the event of its request
    /// ([`Edge::begin_request`]). `job_id` is a fresh id the host made.
    pub fn submit(&mut self, now: impl Into<Now>, job_id: String, submission: Submission, mode: Mode) -> Result<Submitted, ApiError> {
        let now = now.into();
        let mut effects = Vec::new();
        let slot = submission.idempotency_key.as_ref().map(|k| (submission.placement.caller().to_string(), k.clone()));
        // A key whose job ended without ever being sent to an agent that may have run it
        // names nothing a repeat must not run again: the repeat makes a new job, which
        // takes the key's slot ([`Job::superseded_by_repeat`]). A repeat naming another
        // task, or sent otherwise, is still refused as for any job of the key: the key
        // was used for that.
        let superseded = slot.as_ref().and_then(|slot| self.idempotency.get(slot)).and_then(|id| self.job(id)).filter(|job| job.superseded_by_repeat());
        if let Some(old) = superseded {
            if let Some(refused) = Repeatable::of(old).refused(&old.id, &submission, mode) {
                return Err(refused);
            }
            info!(job_id = %job_id, superseded = %old.id, "a repeat of an idempotency key whose job never ran makes a new job");
        } else if let Some(existing) = slot.and_then(|slot| self.idempotency.get(&slot)) {
            if let Some(answer) = self.spent_repeat(now, existing, &submission, mode) {
                return Err(answer);
            }
            let refused = self.job(existing).and_then(|job| Repeatable::of(job).refused(&job.id, &submission, mode));
            if let Some(refused) = refused {
                return Err(refused);
            }
            let existing = existing.clone();
            self.keep_for_detached_repeat(&existing, mode, &mut effects);
            return Ok(Submitted { job_id: existing, existing: true, effects });
        }
        if self.stopping {
            return Err(super::stop::shutting_down());
        }
        if let Some(refused) = self.refusal(now, mode, &submission) {
            return Err(refused);
        }
        if let Some(url) = &submission.callback_url {
            crate::notify::check_callback(url, &self.cfg.callback_hosts).map_err(ApiError::invalid)?;
            if let Some(refused) = self.callbacks_full(&submission) {
                return Err(refused);
            }
        }
        if let Some(refused) = self.queue_full(now, &submission) {
            return Err(refused);
        }
        if self.jobs.contains_key(&job_id) {
            return Err(ApiError::new(ErrorCode::InternalError, "job id collision; retry"));
        }
        let mut job = Job::new(job_id.clone(), submission.spec, mode, submission.idempotency_key, now.at);
        job.placement = submission.placement;
        job.wait_for_usage = submission.wait_for_usage;
        job.callback_url = submission.callback_url;
        job.caller_proven = submission.caller_proven;
        job.terms_digest = crate::record::terms_digest(&job.placement, job.callback_url.as_deref());
        if let Some(refused) = self.pending_full(now.at, &job) {
            return Err(refused);
        }
        self.claim_slot(&job);
        info!(job_id = %job_id, mode = ?mode, timeout_ms = job.spec.timeout_ms, caller = job.placement.caller(), priority = job.placement.priority, "job queued");
        self.enqueue(&job);
        self.insert_job(job);
        self.stats_mut().submitted += 1;
        self.dispatch(now, &mut effects);
        // A job sent at once (the common case) was saved as sent; one still queued is
        // saved as it is. Either way the event's transaction holds it once, and no copy
        // of it is made only to be dropped again by `split_writes`.
        if self.jobs[&job_id].state == JobState::Queued {
            effects.push(self.save(&job_id));
        }
        Ok(Submitted { job_id, existing: false, effects })
    }

    /// A `POST /jobs` repeated the key of `job_id`: an `/execute` job not ended yet is
    /// kept from then on as a `POST /jobs` job is ([`Job::kept`]) — that caller was told
    /// it is queued, and never hung up —, stored so, in this request's event. Every
    /// `/execute`-only rule lets go of it at once ([`Job::waited_only`]): still queued, it
    /// waits up to `QUEUE_TTL_MS` from its submission, not its own timeout, and no longer
    /// ends `LOST_AFTER_MS` after no connected agent fits it.
    fn keep_for_detached_repeat(&mut self, job_id: &str, mode: Mode, effects: &mut Vec<Effect>) {
        let keep = mode == Mode::Detached && self.job(job_id).is_some_and(|j| j.waited_only() && !j.state.is_terminal());
        if keep {
            info!(job_id, "a POST /jobs repeated this /execute job's key: it is kept whether or not its /execute callers wait");
            let ttl = self.cfg.queue_ttl_ms;
            let job = self.job_mut(job_id).expect("the job exists");
            job.kept = true;
            let expires_at = job.created_at.saturating_add(job.queue_wait(ttl));
            self.queue.retime(job_id, expires_at);
            self.unfit_since.remove(job_id);
            effects.push(self.save(job_id));
        }
    }

    /// Why the queue has no room for this submission, if it has none. The caps bound
    /// what waits, and how much of it one owner ([`super::share`]: a caller with its own
    /// secret, or all the pool secret's names together) may hold:
    /// - a job a free agent takes at once does not wait, and is never refused for them (no
    ///   queued job fits a free agent — dispatch would have sent it — so the one sent now
    ///   is this one, and the queue is no longer after than before);
    /// - `MAX_QUEUED_PER_CALLER` jobs of one caller name, as one owner's (those the pool's
    ///   secret queued under a name before it had a secret of its own are not the name's);
    /// - past `MAX_QUEUED_JOBS`, an owner holding its even share of it or more — the cap
    ///   divided among the owners with jobs waiting, this one counted — is refused, and an
    ///   owner holding less is not: one caller's burst fills the queue for itself, not for
    ///   everyone else (review rev7: a caller filled it with jobs nobody could take, and
    ///   the others, the operator too, got 429). An owner holds at most its even share of
    ///   what passes the cap, but shares grow as owners leave, so twice `MAX_QUEUED_JOBS`
    ///   is the bound of what waits, past which every job that would wait is refused —
    ///   but one of an owner holding none (there are only so many owners).
    fn queue_full(&self, now: Now, submission: &Submission) -> Option<ApiError> {
        let placement = &submission.placement;
        if self.candidates(now).iter().any(|c| placement.fits(c.agent_id, c.labels)) {
            return None;
        }
        let (cap, waiting) = (self.cfg.max_queued_jobs, self.queue.len());
        let busy = |error: String| Some(ApiError::new(ErrorCode::RunnerBusy, error));
        let owner = super::share(submission.caller_proven, placement);
        let held = self.queue.len_of_owner(owner);
        // An owner holding none still gets one job in (review rev9: four owners' shares
        // came past twice the cap, and a fifth holding nothing was refused). Owners are
        // the callers with secrets of their own and the pool secret's, all configured, so
        // this grows what waits by their number at most.
        // A caller with its own secret is told its own count and the cap, never how many
        // jobs the others hold nor how many others there are: those are the operator's
        // to read (review rev27, 4). Nor its share's number: the cap divided among the
        // owners waiting, it told how many wait (rev31-6). The pool secret's holder is
        // the operator.
        if waiting >= cap.saturating_mul(2) && held > 0 {
            return busy(match owner {
                "" => format!(
                    "{waiting} jobs are already waiting for the agents (twice MAX_QUEUED_JOBS, the most that ever waits); retry later or run the task elsewhere"
                ),
                _ => format!(
                    "the queue is at the most that ever waits for the agents (twice MAX_QUEUED_JOBS {cap}), and caller `{owner}` holds {held} of its jobs; \
                     retry when some of them have started, or run the task elsewhere"
                ),
            });
        }
        let caller = placement.caller();
        let mine = self.queue.len_of(owner, caller);
        if mine >= self.cfg.max_queued_per_caller {
            return busy(format!("caller `{caller}` has {mine} jobs waiting already (MAX_QUEUED_PER_CALLER); retry when some have started"));
        }
        let owners = self.queue.owners_waiting() + usize::from(held == 0);
        if waiting >= cap && held.saturating_mul(owners) >= cap {
            return busy(match owner {
                "" => format!(
                    "{waiting} jobs are already waiting for the agents (MAX_QUEUED_JOBS {cap}), and the pool secret's callers (one share together) \
                     hold {held} of them, at least an even share among the {owners} callers with jobs waiting; retry when some have started"
                ),
                _ => format!(
                    "the queue is full (MAX_QUEUED_JOBS {cap}), and caller `{owner}` holds {held} of its jobs, at least its even share \
                     of it among the callers with jobs waiting; retry when some of them have started"
                ),
            });
        }
        None
    }

    /// Sends queued jobs while an agent can take one. The next job is found by
    /// [`Edge::next_order`]: owners take turns, then each owner's callers (`queue.rs`),
    /// each caller's jobs go by priority then age, and a job no free agent fits waits without holding up the jobs behind it.
    /// An agent's credit is what it last stated free less the orders on their way to it
    /// ([`crate::session::Agent::credits`]); each order is numbered on its connection.
    ///
    /// A job that fits none of the agents taking work, credits aside (labels nobody
    /// offers, an `agent_id` not connected, or fitting only agents paused, stopping or kept
    /// from work by their login), is set aside after one look
    /// ([`crate::queue::FairQueue::set_aside`]): the walk for the next job no longer passes
    /// it. It was looked at again at every dispatch — first in turn, as its lane is never
    /// served — and a caller giving each job labels of its own defeated the walk's memo
    /// (review rev7, 2). Jobs set aside go back in their lanes, in their places, as soon as
    /// a dispatch finds the agents taking work, or what they offer, other than they were
    /// when the jobs were set aside ([`Edge::workers`] against `set_aside_for`). Jobs that
    /// fit only agents without a credit are still walked, once per need (labels and
    /// `agent_id`) in each walk.
    pub(super) fn dispatch(&mut self, now: Now, effects: &mut Vec<Effect>) {
        if self.queue.is_empty() {
            return;
        }
        if self.queue.aside() > 0 && !self.workers(now).eq(self.set_aside_for.iter().map(|(id, labels)| (id, labels))) {
            self.queue.put_back();
        }
        while !self.queue.is_empty() {
            let walk = self.next_order(now);
            self.walked += walk.examined as u64;
            if !walk.unfit.is_empty() {
                // The same agents as the jobs already aside were set aside for, or those
                // were put back above.
                self.set_aside_for = self.workers(now).map(|(id, labels)| (id.clone(), labels.clone())).collect();
                for id in &walk.unfit {
                    self.queue.set_aside(id);
                }
            }
            let Some((job_id, session_id)) = walk.order else { break };
            self.queue.dispatched(&job_id);
            self.send_job(now, &job_id, &session_id, effects);
        }
    }

    /// The agents taking work now, credits aside ([`crate::session::Agent::takes_work`]), and what they
    /// offer: what a job set aside fitted none of.
    fn workers(&self, now: Now) -> impl Iterator<Item = (&String, &Labels)> {
        self.ready().filter(move |(_, a)| a.takes_work(now)).map(|(_, a)| (&a.agent_id, &a.labels))
    }

    /// The agents that can take a job now: ready, with a credit, taking work (not paused,
    /// login usable, usage window open, no relayed login writing a new one: [`crate::session::Agent::takes_work`]).
    fn candidates(&self, now: Now) -> Vec<Candidate<'_>> {
        self.sessions
            .values()
            .filter_map(|s| {
                let a = s.agent()?;
                let credits = a.credits();
                (credits > 0 && a.takes_work(now)).then_some(Candidate {
                    session: &s.id,
                    agent_id: &a.agent_id,
                    labels: &a.labels,
                    mirrors: &a.mirrors,
                    credits,
                })
            })
            .collect()
    }

    /// The next job to send and the session to send it on: the lanes in turn, each
    /// lane's jobs in order, the first job one of the [`Edge::candidates`] fits
    /// ([`routing::choose`]); and the jobs passed on the way that no agent taking work
    /// fits, to set aside.
    fn next_order(&self, now: Now) -> Walk {
        let mut walk = Walk::default();
        let candidates = self.candidates(now);
        if candidates.is_empty() {
            return walk;
        }
        let mut workers: Option<Vec<(&String, &Labels)>> = None;
        // Whether a need (labels, agent_id) fits any agent taking work, for those no
        // candidate fits: the next job asking it is not tried again.
        let mut unfit: HashMap<(&Labels, Option<&str>), bool> = HashMap::new();
        for (_, _, ids) in self.queue.in_turn() {
            for id in ids {
                walk.examined += 1;
                let job = &self.jobs[id];
                let placement = &job.placement;
                let need = (&placement.labels, placement.agent_id.as_deref());
                let nobody = match unfit.get(&need) {
                    Some(nobody) => *nobody,
                    None => match routing::choose(placement, job.repo_name().as_deref(), &candidates) {
                        Some(i) => {
                            walk.order = Some((id.to_string(), candidates[i].session.to_string()));
                            return walk;
                        }
                        None => {
                            let workers = workers.get_or_insert_with(|| self.workers(now).collect());
                            *unfit.entry(need).or_insert(!workers.iter().any(|(agent, labels)| placement.fits(agent, labels)))
                        }
                    },
                };
                if nobody {
                    walk.unfit.push(id.to_string());
                }
            }
        }
        walk
    }

    /// Sends one queued job on a session whose agent has a credit for it.
    fn send_job(&mut self, now: Now, job_id: &str, session_id: &str, effects: &mut Vec<Effect>) {
        let session = self.session_mut(session_id).expect("candidates are sessions");
        let agent = session.agent_mut().expect("ready session");
        agent.sent += 1;
        let order_no = agent.sent;
        let agent_id = agent.agent_id.clone();
        let instance = agent.instance_key().to_string();
        // The agent takes it on this connection only, numbered in the order sent.
        let challenge = agent.challenge.clone();
        let told = self.told_lost_after_ms(session_id);
        let saved = self.save_session(session_id);
        let job = self.job_mut(job_id).expect("queued jobs exist");
        job.state = JobState::Dispatched;
        job.dispatched_at = Some(now.at);
        job.agent_id = Some(agent_id.clone());
        job.session_id = Some(session_id.to_string());
        job.instance = Some(instance);
        job.told_lost_after_ms = told;
        job.order_no = order_no;
        job.new_order(&challenge, order_no);
        // The record's own task, shared (never copied) into the order sealed below.
        let (nonce, spec, caller, sent_proven) = (job.order_nonce(), std::sync::Arc::clone(&job.spec), job.placement.caller().to_string(), job.caller_proven);
        effects.push(self.save(job_id));
        let to = Audience { agent_id: &agent_id, pool: &self.cfg.pool };
        // The caller goes with the order: the agent resumes a Claude session only for the
        // caller whose job made it (agent/src/sessions.rs). Proven when the caller's own
        // secret sent it (as submitted: a job the pool's secret named before the name was
        // given a secret, queued across the restart that gave it one, is not) and the name
        // still has one (a secret taken away since takes the share with it). The agent
        // weighs its session cut by it: made-up names share one owner's share, a proven
        // caller holds its own.
        let caller_proven = Some(sent_proven && self.cfg.has_own_secret(&caller));
        let order = JobOrder { header: OrderHeader::new(job_id, to, now.wall, nonce), challenge, order_no, caller, caller_proven, spec: &*spec };
        let envelope = Envelope::seal(Domain::Job, &order, &self.cfg.signing_key);
        info!(job_id = %job_id, agent_id = %agent_id, order_no, "job dispatched");
        effects.push(saved);
        effects.push(Effect::Send { session: session_id.to_string(), text: EdgeMessage::Job { envelope }.to_text() });
        self.active.insert(job_id.to_string());
    }

    /// [`Edge::unplaceable`]'s refusal when agents fit the job and every one is paused,
    /// stopping or unable to start jobs: a queued `/execute` job then ends. (With none
    /// connected that fits, a queued one waits `LOST_AFTER_MS` for one to come back:
    /// [`Edge::note_unfit`].)
    pub(super) fn held_back_only(&self, now: Now, placement: &shared::placement::Placement) -> Option<ApiError> {
        matches!(self.unplaced(placement), Some(Hindrance::HeldBack(_))).then(|| self.unplaceable(now, placement)).flatten()
    }

    /// Why an `/execute` job cannot be placed now, if it cannot: no connected agent fits
    /// its `agent_id` and labels, or every one that does is paused, stopping or unable to
    /// start jobs — each named with its reason, worded once ([`Edge::fitting_reasons`]).
    /// Its caller falls back at once rather than wait for an agent that may never come.
    /// (Fitting agents that are there but cannot work — their login, their usage window —
    /// are [`Edge::refusal`]'s.) Judged by [`Edge::unplaced`], as a queued job's
    /// `waiting_for` is.
    pub(super) fn unplaceable(&self, now: Now, placement: &shared::placement::Placement) -> Option<ApiError> {
        let needs = placement.needs();
        let why = match self.unplaced(placement)? {
            Hindrance::HeldBack(held) => {
                let who = match needs.is_empty() {
                    true => "every connected agent".to_string(),
                    false => format!("every agent that offers {needs}"),
                };
                format!("{who} is {} ({})", held.said(), self.fitting_reasons(now, placement))
            }
            _ => {
                let offered: Vec<String> = self.ready().map(|(_, a)| super::login::shown_agent(a)).collect();
                format!("no connected agent offers {needs} (connected: {})", offered.join(", "))
            }
        };
        Some(ApiError::new(ErrorCode::RunnerOffline, format!("{why}; run the task elsewhere, or submit it with POST /jobs to wait for such an agent")))
    }

    pub(super) fn send_cancel(&mut self, now: Now, session_id: &str, agent_id: &str, job_id: &str, reason: &str, effects: &mut Vec<Effect>) {
        let nonce = format!("{job_id}:cancel:{}:{}", now.wall, self.orders_sent);
        self.orders_sent += 1;
        let to = Audience { agent_id, pool: &self.cfg.pool };
        // Bound to this connection, as a job order is: the path cannot hold it back for the next.
        let challenge = self.session_challenge(session_id);
        let order = CancelOrder { header: OrderHeader::new(job_id, to, now.wall, nonce), challenge, reason: reason.to_string() };
        let envelope = Envelope::seal(Domain::Cancel, &order, &self.cfg.signing_key);
        effects.push(Effect::Send { session: session_id.to_string(), text: EdgeMessage::Cancel { envelope }.to_text() });
    }

    /// `DELETE /jobs/{id}`, within the event of its request. A queued job ends at once; a
    /// running one is stopped by its agent, which reports it `cancelled`.
    pub fn cancel(&mut self, now: impl Into<Now>, job_id: &str) -> Result<Vec<Effect>, ApiError> {
        let now = now.into();
        let mut effects = Vec::new();
        let job = self.job(job_id).ok_or_else(|| ApiError::job_not_found(job_id))?;
        match job.state {
            JobState::Queued => {
                let result = JobResult::failure(ErrorCode::Cancelled, "cancelled before it started", 0);
                self.finish(now, job_id, result, &mut effects);
            }
            JobState::Dispatched | JobState::Running => {
                // Kept on the job, so it is sent again at the agent's reconnect: a cancel
                // sent on a connection that turns out to be dead is not lost, and one
                // asked for while the agent is away is acted on when it is back.
                let connected = job.session_id.as_ref().filter(|s| self.sessions.contains_key(*s)).cloned();
                let agent = job.agent_id.clone();
                self.job_mut(job_id).expect("the job exists").cancel_requested = true;
                effects.push(self.save(job_id));
                match (connected, agent) {
                    (Some(session), Some(agent)) => {
                        info!(job_id, agent_id = %agent, "cancel sent to agent");
                        self.send_cancel(now, &session, &agent, job_id, "cancelled by the caller", &mut effects);
                    }
                    _ => info!(job_id, "cancel kept for when the job's agent is back"),
                }
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("the job already ended ({}); read its result with GET /jobs/{job_id}", job.state.as_str()),
                )
                .with_job(job_id))
            }
        }
        Ok(effects)
    }

    /// Ends a job: stores it, then answers its waiters and ends its followers' streams.
    /// A job that already ended is left as it is.
    pub(super) fn finish(&mut self, now: Now, job_id: &str, result: JobResult, effects: &mut Vec<Effect>) {
        let Some(job) = self.job_mut(job_id) else { return };
        // Lost by its agent after its caller cancelled it: it ends cancelled, whoever
        // found it lost (see `record::lost`) — `lost` would tell a waiter to run it
        // elsewhere, against the cancel. Lost by whoever found it so (`JobResult::lost`:
        // the edge, or a restarted agent that found the job's started record), a pushing
        // job's push may have landed. An agent that stopped on purpose says `retryable`:
        // it pushed nothing.
        let result = match result.error_code {
            Some(ErrorCode::RunnerLost) if job.cancel_requested => crate::record::lost(job, now.at),
            Some(ErrorCode::RunnerLost) if result.retryable.is_none() => crate::record::push_may_have_landed(job, result),
            _ => result,
        };
        if !job.finish(result, now.at) {
            return;
        }
        // Memory keeps only the header from here on; the whole record goes to the store in
        // this event's `Save` (the journal keeps the version before, should the write fail;
        // a restore, never undone, keeps none), and the header is made without a copy of it.
        // Kept whole until the next event, as it was, a restore or a tick ending many
        // pending jobs at once held them whole beside their `Save`s: twice
        // MAX_PENDING_BYTES before the host's encoding of them.
        let header = job.header_apart();
        let job = std::mem::replace(job, header);
        let ended = super::retained_entry(&job);
        self.active.remove(job_id);
        self.queue.remove(job_id);
        self.pending.remove(job_id);
        self.drop_backlog(job_id);
        self.count_retained(&job, true);
        *self.stats_mut().finished.entry(job.state.as_str()).or_default() += 1;
        info!(
            job_id,
            agent_id = job.agent_id.as_deref().unwrap_or("-"),
            state = job.state.as_str(),
            error_code = ?job.result.as_ref().and_then(|r| r.error_code),
            "job finished"
        );
        let (status, body) = job.answer().expect("finished jobs have results");
        self.announce_end(job_id, status, &body, effects);
        self.start_callback(now, &job, effects);
        effects.push(Effect::Save(std::sync::Arc::new(job)));
        self.keep_within_caps(Some(ended), effects);
    }

    /// Forgets ended jobs while more are kept than `MAX_RETAINED_JOBS` or their records
    /// take more than `MAX_RETAINED_BYTES`: the oldest of the owner holding the most (jobs,
    /// or bytes, whichever cap is passed; see `share_of`), so one caller's flood of
    /// jobs that end at once pushes out its own results, not other callers'. With one
    /// owner, the oldest. Both caps spare `ended`, the job that ended last: one record may
    /// be larger than the size cap's least (Claude's output alone up to 1 MiB, its diff and
    /// task more), and forgotten as it ended its callback was given up and its caller's
    /// read a 404 (a cancel's own answer found it gone); it goes once another has ended (or
    /// at its retention's end). Named by the caller, not taken as the last retained: that
    /// order is by when a job ended, then its id, and of two ending in one millisecond it
    /// is not always the later.
    ///
    /// A job whose result is still to be posted to its callback is kept past both caps and
    /// not counted in them: forgotten, its callback would be given up (its retries need
    /// the record), and its caller never told. They are at most `MAX_PENDING_CALLBACKS`;
    /// the caps take them once their callback is taken or given up
    /// ([`Edge::callback_settled`]).
    pub(super) fn keep_within_caps(&mut self, ended: Option<(shared::Millis, String)>, effects: &mut Vec<Effect>) {
        let posting: std::collections::BTreeMap<(shared::Millis, String), u64> = self
            .alerts
            .callbacks
            .keys()
            .filter_map(|id| self.job(id))
            .filter(|job| job.state.is_terminal())
            .map(|job| (super::retained_entry(job), job.approximate_bytes()))
            .filter(|(entry, _)| self.retained.contains(entry))
            .collect();
        let posting_bytes: u64 = posting.values().sum();
        loop {
            let by_count = self.retained.len().saturating_sub(posting.len()) > self.cfg.max_retained_jobs;
            if !by_count && self.retained_bytes().saturating_sub(posting_bytes) <= self.cfg.max_retained_bytes {
                break;
            }
            // The job that just ended is spared by both caps: forgotten in the event that
            // ended it (a tie with another job ending in the same millisecond made it the
            // "oldest" under the count cap), its own request — a cancel — found it gone.
            let spared = ended.as_ref();
            let not_spared = |entry: &&(shared::Millis, String)| Some(*entry) != spared && !posting.contains_key(*entry);
            let held = |h: &super::Held| if by_count { h.jobs.len() as u64 } else { h.bytes };
            let most = self.retained_by.values().map(held).max().unwrap_or(0);
            // Of the owners holding the most, the one whose oldest job is oldest: each
            // owner's jobs are kept in order, so this looks at no other owner's jobs (going
            // through all of them in order cost every job's end as many steps as others'
            // jobs came before the owner's oldest).
            let oldest = self.retained_by.values().filter(|h| held(h) == most).filter_map(|h| h.jobs.iter().find(not_spared)).min();
            let Some(entry) = oldest.or_else(|| self.retained.iter().find(not_spared)).cloned() else { break };
            info!(job_id = %entry.1, kept = self.retained.len() - 1, "an ended job is forgotten early: over MAX_RETAINED_JOBS or MAX_RETAINED_BYTES");
            self.forget_retained(entry, true, effects);
        }
    }

    /// Forgets the ended job whose retention ends first, now over: its key goes with it.
    pub(super) fn forget_oldest(&mut self, effects: &mut Vec<Effect>) {
        if let Some(entry) = self.retained.first().cloned() {
            self.forget_retained(entry, false, effects);
        }
    }

    /// Forgets the ended job at this place of `retained`; with `keep_key` (forgotten before
    /// its retention ended) its idempotency key, if it has one, stays (`spent.rs`).
    fn forget_retained(&mut self, entry: (shared::Millis, String), keep_key: bool, effects: &mut Vec<Effect>) {
        match self.job(&entry.1).map(|j| (super::share_of(j).to_string(), j.approximate_bytes())) {
            Some((owner, bytes)) => self.count_retained_of(&owner, &entry, bytes, false),
            // Never expected (every retained id is a job's): taken out wherever it is, so
            // the caps' loop ends.
            None => {
                self.retained.remove(&entry);
                self.retained_by.retain(|_, held| {
                    held.jobs.remove(&entry);
                    !held.jobs.is_empty()
                });
            }
        }
        let id = entry.1;
        // What stays of a keyed job forgotten before its retention ended (`spent.rs`).
        let stub = self.job(&id).filter(|job| keep_key && job.idempotency_key.is_some() && job.may_have_run()).map(Job::spent_key);
        self.forget_job(&id);
        // Its callback, if still waiting, cannot be made without the record (a retry
        // gives it up as no longer kept): it goes now, or it would hold its place among
        // the callbacks, no longer counted as its caller's, until its next retry.
        self.give_up_callback(&id, "the job is no longer kept (MAX_RETAINED_JOBS, MAX_RETAINED_BYTES or its retention)", effects);
        match stub {
            Some(stub) => self.spend(stub, effects),
            None => effects.push(Effect::Forget { job_id: id }),
        }
    }

    /// Ends a job not started that must never start (its caller was told to run it
    /// elsewhere, hung up, or is gone with a restart): it is not dispatched, now or after a
    /// restart, and an agent that holds it is told it was given up.
    pub(super) fn end_unstarted(&mut self, now: Now, job_id: &str, why: &str, effects: &mut Vec<Effect>) {
        info!(job_id, "job ended before it started");
        let result = JobResult::failure(ErrorCode::RunnerOffline, why, 0);
        self.finish(now, job_id, result, effects);
    }

    /// A dispatched job that never ran (its agent refused it for want of a slot, or never
    /// received it) goes back to the head of the queue — unless it is an `/execute` job
    /// whose caller is gone: that caller may have run the task elsewhere, so it never
    /// starts — or one its caller cancelled meanwhile, which ends cancelled.
    pub(super) fn send_again(&mut self, now: Now, job_id: &str, effects: &mut Vec<Effect>) {
        let Some(job) = self.job(job_id) else { return };
        if job.cancel_requested {
            let result = JobResult::failure(ErrorCode::Cancelled, "cancelled before it started", 0);
            self.finish(now, job_id, result, effects);
        } else if self.unwaited(job) {
            let why = "the job never reached its agent and its caller is gone (it may have run the task elsewhere); \
                       it will not run: submit it again";
            // Taken back first: it never ran, so a repeat of its key makes a new job
            // ([`Job::superseded_by_repeat`]).
            self.job_mut(job_id).expect("the job exists").take_back();
            self.end_unstarted(now, job_id, why, effects);
        } else {
            info!(job_id, "job queued again: it never ran");
            self.requeue(job_id, effects);
        }
    }

    /// Puts a dispatched job back in the queue where its priority and age put it (ahead
    /// of what came after it), to be sent again (with a new nonce).
    fn requeue(&mut self, job_id: &str, effects: &mut Vec<Effect>) {
        let job = self.job_mut(job_id).expect("requeued jobs exist");
        job.state = JobState::Queued;
        job.take_back();
        let job = std::sync::Arc::clone(&self.jobs[job_id]);
        effects.push(Effect::Save(std::sync::Arc::clone(&job)));
        self.active.remove(job_id);
        self.enqueue(&job);
    }
}
