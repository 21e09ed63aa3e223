//! When work may go to an agent at all, and the re-login relay.
//!
//! An agent takes work only while its login works, its usage window is open and no
//! relayed login is writing a new one ([`crate::session::Agent::takes_work`]). [`Edge::availability`]
//! sums that up for the pool, [`Edge::availability_for`] for the agents one job fits: an
//! `/execute` is refused at once (503, `fallback: true`) when no agent that fits it can take
//! work because their login needs a person (`RUNNER_OAUTH_ERROR`) or their usage window is
//! used up (`USAGE_LIMIT`, with `retry_at`), its answer naming each fitting agent and why;
//! `POST /jobs` jobs wait in the queue instead — for a login up to `QUEUE_TTL_MS`, for the
//! usage window until its reset (and `QUEUE_TTL_MS` more) — and drain by themselves once
//! the agent can work again.
//!
//! The relay: `POST /oauth/login` sends the agent a signed order to start
//! `claude auth login`; the agent answers with the authorization URL, which the caller
//! gets. `POST /oauth/login/code` sends the code the person pasted, in a second signed
//! order; the agent answers with the outcome and its login as it now reads it. One relay
//! per agent at a time, given up after [`LOGIN_TTL_MS`]. Work waits for a relay only from
//! its code to its outcome ([`crate::session::Agent::login_changing`]): one abandoned
//! before its code holds nothing. The URL and the code are never logged.

use super::{CallerId, Edge, Effect};
use crate::clock::Now;
use crate::record::Mode;
use crate::response::Response;
use crate::session::{Agent, LoginRelay, LoginStep};
use serde_json::{json, Value};
use shared::contract::{ApiError, ErrorCode, Submission};
use shared::placement::{Labels, Placement};
use std::collections::HashMap;
use shared::envelope::{Audience, Domain, Envelope, OrderHeader};
use shared::ids::hex;
use shared::job::{JobResult, JobState};
use shared::protocol::{EdgeMessage, LoginAction, LoginOrder, LoginReport, LoginState};
use shared::time::rfc3339;
use shared::Millis;
use tracing::{info, warn};

/// How long a relayed login may wait for its code: the agent kills `claude auth login`
/// after ten minutes without one; the edge gives the relay up a little later.
pub const LOGIN_TTL_MS: Millis = 10 * 60_000 + 30_000;
/// How long a caller of the relay waits for the agent's answer.
pub const LOGIN_WAIT_MS: u64 = 90_000;
/// Longest authorization code accepted (real ones are about 100 characters).
const MAX_CODE_BYTES: usize = 2048;

/// Whether the pool can run work now, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// An agent can take work.
    Ready,
    /// No agent is connected.
    Offline,
    /// The only agents with a usable login are finishing a relayed login (its code passed
    /// on, [`Agent::login_changing`]): work waits for the outcome.
    LoggingIn,
    /// The usage window is used up until this wall time.
    UsageLimited { until: Millis },
    /// Claude cannot authenticate on any connected agent: a person must log in.
    NeedsLogin,
}

/// Whether `agents` (the pool's, or those that fit one job) can run work now. A paused
/// agent is the operator's choice, and a stopping one its own, not its login's state: the
/// verdict is the others'. With none left (all paused or stopping, or none at all) it is [`Availability::Ready`]: nothing
/// about a login keeps the work back, and whether it may wait is decided elsewhere.
fn verdict<'a>(now: Now, agents: impl Iterator<Item = &'a Agent>) -> Availability {
    let agents: Vec<&Agent> = agents.filter(|a| !a.held_back()).collect();
    if agents.is_empty() || agents.iter().any(|a| a.takes_work(now)) {
        return Availability::Ready;
    }
    let usable = |a: &&&Agent| !a.needs_login(now);
    if agents.iter().filter(usable).any(|a| a.login_changing() && !a.usage_held(now)) {
        return Availability::LoggingIn;
    }
    let until = agents
        .iter()
        .filter(usable)
        .filter(|a| a.usage_held(now))
        .filter_map(|a| a.oauth.usage.as_ref()?.blocked_until())
        .min();
    match until {
        Some(until) => Availability::UsageLimited { until },
        None => Availability::NeedsLogin,
    }
}

/// The log line of a queued `/execute` job ended because every agent that fits it is held
/// back; its `reason` field (the refusal) says how, agent by agent.
const HELD_BACK_ENDED: &str = "queued job ended: every agent that fits it is held back (see reason)";

/// A refusal that says, before its own sentence, which agents fit the job and why none
/// of them can take it now.
fn explained(mut err: ApiError, reasons: String) -> ApiError {
    err.body.error = format!("no agent that fits this job can take it now ({reasons}); {}", err.body.error);
    err
}

/// An agent as a refusal names it: its id, and its labels when it has any.
pub(crate) fn shown_agent(a: &Agent) -> String {
    match a.labels.is_empty() {
        true => a.agent_id.clone(),
        false => format!("{} ({})", a.agent_id, shared::placement::show_labels(&a.labels)),
    }
}

/// Who reads what is said of a job's agents: its answers, its `waiting_for`, its end
/// when it cannot be placed ([`Edge::told_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Told {
    /// The pool's operator (the pool's `RUNNER_SECRET`, and the callers it sends for):
    /// every agent's own words.
    Operator,
    /// A caller with its own secret (`RUNNER_SECRETS`): what its `/health` says of the
    /// agents — their ids and labels, and whether they take work — and why in the words the
    /// edge has for it, never an agent's own report (its folders, its errors: README "Who
    /// may do what").
    Caller,
}

/// Where the pool's operator reads why an agent cannot start jobs, as a caller with its
/// own secret is told instead of the agent's own words ([`Told::Caller`]).
pub(crate) const CANNOT_START_WHY: &str = "why is the pool's operator's to read: `cannot_start` in GET /health";

/// Why one agent cannot take a job now, as a person reads it (`None`: it could, but has
/// no free slot), told to `to`: the agent's own words why it cannot start jobs (its disk,
/// its folders, its process limit) to the operator alone.
pub(crate) fn why_not(a: &Agent, now: Now, to: Told) -> Option<String> {
    if a.paused {
        return Some(format!("paused (by the pool's operator, who resumes it: POST /agents/{}/resume with the pool's RUNNER_SECRET)", a.agent_id));
    }
    if a.stopping {
        return Some("stopping: it finishes its running jobs and takes no new ones".into());
    }
    if let Some(why) = &a.cannot_start {
        let why = match to {
            Told::Operator => why,
            Told::Caller => CANNOT_START_WHY,
        };
        return Some(format!("cannot start jobs: {why}"));
    }
    if a.needs_login(now) {
        return Some("its Claude OAuth login needs renewing".into());
    }
    if a.usage_held(now) {
        let until = a.oauth.usage.as_ref().and_then(|u| u.blocked_until());
        return Some(match until {
            Some(t) => format!("its usage window is used up until {}", rfc3339(t)),
            None => "its usage window is used up".into(),
        });
    }
    a.login_changing().then(|| "its new login is being written (a relayed login's code was passed on)".into())
}

impl Edge {
    pub fn availability(&self, now: impl Into<Now>) -> Availability {
        let now = now.into();
        if !self.is_online() {
            return Availability::Offline;
        }
        // With every agent paused work waits (and `/execute` is refused as unplaceable),
        // whatever their logins.
        verdict(now, self.ready().map(|(_, a)| a))
    }

    /// [`Edge::availability`] for one job: over the connected agents that fit it (its
    /// `agent_id`, its labels) alone — a gpu job whose only gpu agent needs a login cannot
    /// run now, whatever the other agents' logins.
    pub fn availability_for(&self, now: impl Into<Now>, placement: &Placement) -> Availability {
        let now = now.into();
        if !self.is_online() {
            return Availability::Offline;
        }
        verdict(now, self.ready().map(|(_, a)| a).filter(|a| placement.fits(&a.agent_id, &a.labels)))
    }

    /// Why a new job of this kind is refused at once, if it is. Both kinds are judged by
    /// the agents that fit them: an `/execute` job ([`Mode::Wait`]) when none of them can
    /// run it now ([`Edge::hindrance`], the judgement a queued job's `waiting_for` says);
    /// a `POST /jobs` job waits, unless it asked not to wait for the usage window
    /// ([`Edge::impatient`]) and theirs is used up.
    pub(super) fn refusal(&self, now: Now, mode: Mode, submission: &Submission) -> Option<ApiError> {
        let placement = &submission.placement;
        match mode {
            Mode::Wait => self.refused_at_once(now, placement, self.hindrance(now, placement)?),
            Mode::Detached => self.unrunnable(now, placement).filter(|_| !submission.wait_for_usage).filter(Self::impatient),
        }
    }

    /// Whether a `POST /jobs` job that asked not to wait for the usage window
    /// (`wait_for_usage: false`) ends on this refusal of its fitting agents: on theirs
    /// being used up, as an `/execute` job would; a login it waits for like any job.
    fn impatient(refused: &ApiError) -> bool {
        refused.body.error_code == ErrorCode::UsageLimit
    }

    /// Why no agent that fits this placement can run a job now — each one's login needs a
    /// person, or its usage window is used up — if so: the refusal of an `/execute` job,
    /// naming each fitting agent and why.
    pub(super) fn unrunnable(&self, now: Now, placement: &Placement) -> Option<ApiError> {
        let err = match self.availability_for(now, placement) {
            Availability::NeedsLogin => ApiError::needs_login(),
            Availability::UsageLimited { until } => ApiError::usage_limit(until),
            _ => return None,
        };
        Some(explained(err, self.fitting_reasons(now, placement)))
    }

    /// Who reads what is said of a job of this placement's agents: a caller with its own
    /// secret when the job is its own (it reads its own jobs alone; the operator, who may
    /// read them too, reads the agents' words in `/health`), else the pool's operator.
    pub(crate) fn told_to(&self, placement: &Placement) -> Told {
        match self.cfg.has_own_secret(placement.caller()) {
            true => Told::Caller,
            false => Told::Operator,
        }
    }

    /// What a judgement of a queued job's agents depends on, so one made for a job serves
    /// every job with the same: what it needs (labels, `agent_id`) and who reads it.
    pub(super) fn judged_as<'a>(&self, placement: &'a Placement) -> (&'a Labels, Option<&'a str>, Told) {
        (&placement.labels, placement.agent_id.as_deref(), self.told_to(placement))
    }

    /// The connected agents that fit a placement.
    /// The queued `/execute` jobs ([`crate::record::Job::waited_only`]: not kept by a
    /// `POST /jobs` repeat) for which `judge`, given the job's placement, has a
    /// verdict, with it: judged once per (labels, `agent_id`) however many jobs share them,
    /// so that a walk of 20,000 queued jobs costs a walk, not 20,000 looks at the agents.
    /// Both walks that end or time waits as agents come and go use it
    /// ([`Edge::end_held_back_waits`], [`Edge::note_unfit`]).
    pub(super) fn queued_waits_judged<T: Clone>(&self, judge: impl Fn(&Placement) -> Option<T>) -> Vec<(String, T)> {
        let mut judged: HashMap<(&Labels, Option<&str>, Told), Option<T>> = HashMap::new();
        let mut found = Vec::new();
        for id in self.queue.ids() {
            let job = &self.jobs[id];
            if !job.waited_only() {
                continue;
            }
            let placement = &job.placement;
            let need = self.judged_as(placement);
            if let Some(verdict) = judged.entry(need).or_insert_with(|| judge(placement)) {
                found.push((id.clone(), verdict.clone()));
            }
        }
        found
    }

    pub(super) fn fitting_agents(&self, placement: &Placement) -> Vec<&Agent> {
        self.ready().map(|(_, a)| a).filter(|a| placement.fits(&a.agent_id, &a.labels)).collect()
    }

    /// A refusal as answered: with `Retry-After` when it names a time (the usage window's
    /// reset of the agents that fit the job, else of the pool).
    pub fn refusal_response(&self, now: impl Into<Now>, err: ApiError, placement: &Placement) -> Response {
        let now = now.into();
        if err.body.error_code != ErrorCode::UsageLimit {
            return Response::error(err);
        }
        // The verdict the refusal came from is the one whose reset it names.
        for verdict in [self.availability_for(now, placement), self.availability(now)] {
            if let Availability::UsageLimited { until } = verdict {
                if err.body.retry_at.as_deref() == Some(rfc3339(until).as_str()) {
                    return Response::retry_later(err, until, now.wall);
                }
            }
        }
        Response::error(err)
    }

    /// Ends the queued jobs that must not wait for what keeps the agents from working
    /// (an `/execute` caller falls back at once once no agent that fits its job can run
    /// it; a job that asked not to wait for the usage window ends once that of the agents that fit it is used up), then sends what
    /// can go.
    pub(super) fn settle_queue(&mut self, now: Now, effects: &mut Vec<Effect>) {
        let mut ended: Vec<(String, ApiError)> = Vec::new();
        // While every agent not paused or stopping takes work, no job's fitting agents are
        // all kept from it by a login: the walk through the queue is skipped (this runs at
        // every heartbeat; those held back are walked for once, as they become so:
        // [`Edge::end_held_back_waits`]).
        let all_work = self.ready().all(|(_, a)| a.held_back() || a.takes_work(now));
        if !all_work {
            let mut verdicts: HashMap<(&Labels, Option<&str>, Told), Option<ApiError>> = HashMap::new();
            for id in self.queue.ids() {
                let job = &self.jobs[id];
                if !job.waited_only() && job.wait_for_usage {
                    continue;
                }
                let placement = &job.placement;
                let need = self.judged_as(placement);
                let refused = verdicts.entry(need).or_insert_with(|| self.unrunnable(now, placement));
                match refused {
                    Some(err) if job.waited_only() || Self::impatient(err) => ended.push((id.clone(), err.clone())),
                    _ => {}
                }
            }
        }
        self.end_queued(now, ended, "queued job ended: no agent that fits it can run it now", effects);
        self.dispatch(now, effects);
    }

    /// Ends queued jobs, each with its refusal as its result (its `retry_at` kept), logged
    /// with it: the refusal names each agent that fits the job and its true reason.
    fn end_queued(&mut self, now: Now, ended: Vec<(String, ApiError)>, why: &'static str, effects: &mut Vec<Effect>) {
        for (id, err) in ended {
            info!(job_id = %id, error_code = ?err.body.error_code, reason = %err.body.error, "{why}");
            let mut result = JobResult::failure(err.body.error_code, err.body.error, 0);
            result.retry_at = err.body.retry_at;
            self.finish(now, &id, result, effects);
        }
    }

    /// Ends the queued `/execute` jobs whose fitting agents are now all held back (paused,
    /// stopping, unable to start jobs), their callers told to fall back as a new one is
    /// (one queued behind the running job before a drain waited the whole drain out).
    /// Called as an agent becomes held back — a pause, a heartbeat that says it stops or
    /// cannot start jobs — not at every heartbeat: a walk of 20,000 queued jobs took 8 ms,
    /// at each beat of each agent for a whole drain.
    pub(super) fn end_held_back_waits(&mut self, now: Now, effects: &mut Vec<Effect>) {
        let ended = self.queued_waits_judged(|placement| self.held_back_only(now, placement));
        self.end_queued(now, ended, HELD_BACK_ENDED, effects);
    }

    /// [`Edge::end_held_back_waits`] for the one job `job_id`, just queued again.
    pub(super) fn end_held_back_wait(&mut self, now: Now, job_id: &str, effects: &mut Vec<Effect>) {
        let Some(job) = self.job(job_id).filter(|j| j.state == JobState::Queued && j.waited_only()) else { return };
        if let Some(err) = self.held_back_only(now, &job.placement) {
            self.end_queued(now, vec![(job_id.to_string(), err)], HELD_BACK_ENDED, effects);
        }
    }

    /// The result of a queued job whose wait ran out: why it could not run, as the agents
    /// that fit it stand.
    pub(super) fn expired_in_queue(&self, now: Now, placement: &Placement, waited: u64, limit: u64) -> JobResult {
        match self.availability_for(now, placement) {
            Availability::NeedsLogin => JobResult::failure(
                ErrorCode::RunnerOauthError,
                format!("no agent could run the job within {limit} ms: the runner's Claude OAuth login needs renewing (see GET /oauth/status)"),
                waited,
            ),
            Availability::UsageLimited { until } => {
                let mut r = JobResult::failure(
                    ErrorCode::UsageLimit,
                    format!("the runner's usage window stays used up until {}; submit the job again then", rfc3339(until)),
                    waited,
                );
                r.retry_at = Some(rfc3339(until));
                r
            }
            _ => JobResult::failure(ErrorCode::Timeout, format!("no agent took the job within {limit} ms; retry later"), waited),
        }
    }

    /// Agents' usage holds that have passed are cleared (so work flows again).
    pub(super) fn lift_usage_holds(&mut self, now: Now, effects: &mut Vec<Effect>) {
        let lifted: Vec<String> = self
            .ready()
            .filter(|(_, a)| a.usage_hold_until.is_some_and(|t| t <= now.at))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lifted {
            let session = self.session_mut(&id).expect("ready sessions exist");
            let agent = session.agent_mut().expect("ready session");
            agent.usage_hold_until = None;
            info!(agent_id = %agent.agent_id, "the usage window has reset; work flows again");
            effects.push(self.save_session(&id));
        }
    }

    /// The earliest edge time a usage hold ends, if any agent has one.
    pub(super) fn earliest_usage_hold(&self) -> Option<Millis> {
        self.ready().filter_map(|(_, a)| a.usage_hold_until).min()
    }

    /// Until when jobs waiting for the usage window wait: the connected agents' holds, or
    /// while none is connected (a restart of either side, a network blip) the last one
    /// reported, which the edge's stored memory keeps.
    pub(super) fn queue_usage_hold(&self) -> Option<Millis> {
        if self.ready().next().is_some() {
            self.earliest_usage_hold()
        } else {
            self.alerts.usage_hold
        }
    }

    /// Remembers the hold an agent's report set, in the stored memory when it changed
    /// (noted for the undo: a report whose writes fail is taken back whole).
    pub(super) fn keep_usage_hold(&mut self, hold: Option<Millis>, effects: &mut Vec<Effect>) {
        if self.alerts.usage_hold != hold {
            let before = self.alerts.clone();
            self.alerts.usage_hold = hold;
            self.note_alerts(before);
            effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
        }
    }

    /// `POST /oauth/login`: starts a relayed `claude auth login` on an agent (the one
    /// named by `{"agent_id"}`, else the one that needs it most), or answers with the one
    /// already under way. The caller is answered when the agent prints its URL.
    pub fn start_login(&mut self, now: impl Into<Now>, caller: CallerId, entropy: [u8; 16], body: &[u8]) -> Vec<Effect> {
        let now = now.into();
        let mut effects = Vec::new();
        let named = match parse_object(body) {
            Ok(v) => match v.get("agent_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(id)) => Some(id.clone()),
                Some(_) => return answer(caller, Response::error(ApiError::invalid("`agent_id` must be a string")), effects),
            },
            Err(e) => return answer(caller, Response::error(e), effects),
        };
        let pick = self
            .ready()
            .filter(|(_, a)| named.as_deref().is_none_or(|n| a.agent_id == n))
            // One under way first; then one that is not stopping (its login would end with it).
            .max_by_key(|(_, a)| (a.login.is_some(), !a.stopping, a.needs_login(now)))
            .map(|(sid, a)| (sid.clone(), a.agent_id.clone(), a.login.clone()));
        let Some((session_id, agent_id, relay)) = pick else {
            let err = match named {
                Some(id) => ApiError::new(ErrorCode::RunnerOffline, format!("agent `{id}` is not connected; start it, then log in again")),
                None => ApiError::offline(),
            };
            return answer(caller, Response::error(err), effects);
        };
        match relay {
            Some(LoginRelay { id, url: Some(url), url_proof, awaiting_code: true, code_sent: false, expires_at, .. }) => {
                let body = awaiting_code(&id, &agent_id, &url, url_proof.as_deref(), now.wall_until(expires_at));
                answer(caller, Response::json(200, body.to_string()), effects)
            }
            Some(LoginRelay { code_sent: true, .. }) => {
                let err = ApiError::new(ErrorCode::Conflict, "a login on this agent is being finished right now; wait for it and check GET /oauth/status");
                answer(caller, Response::error(err), effects)
            }
            Some(LoginRelay { id, awaiting_code: false, started_at, .. }) if now.at.saturating_sub(started_at) < LOGIN_WAIT_MS => {
                // Still starting: this caller gets the URL with the first one.
                self.wait_for_login(caller, &id);
                effects
            }
            // None under way; or one whose start went unanswered, or whose URL its host could
            // not keep: a new one (the agent replaces its `claude auth login` with it).
            _ => {
                let id = hex(&entropy[..8]);
                let relay = LoginRelay {
                    id: id.clone(),
                    url: None,
                    url_proof: None,
                    awaiting_code: false,
                    code_sent: false,
                    started_at: now.at,
                    expires_at: now.at.saturating_add(LOGIN_TTL_MS),
                };
                self.set_relay(&session_id, Some(relay), &mut effects);
                self.send_login_order(now, &session_id, &agent_id, &id, LoginStep::Start, LoginAction::Start, &mut effects);
                info!(agent_id = %agent_id, login_id = %id, "re-login started");
                self.wait_for_login(caller, &id);
                self.dispatch(now, &mut effects);
                effects
            }
        }
    }

    /// `POST /oauth/login/code` `{"login_id", "code"}`: passes the code to the agent's
    /// `claude auth login`; the caller is answered with the outcome.
    pub fn send_login_code(&mut self, now: impl Into<Now>, caller: CallerId, body: &[u8]) -> Vec<Effect> {
        let now = now.into();
        let effects = Vec::new();
        let (login_id, code) = match parse_code(body) {
            Ok(parsed) => parsed,
            Err(e) => return answer(caller, Response::error(e), effects),
        };
        let found = self
            .ready()
            .find(|(_, a)| a.login.as_ref().is_some_and(|l| l.id == login_id))
            .map(|(sid, a)| (sid.clone(), a.agent_id.clone(), a.login.clone().expect("found by its login")));
        let Some((session_id, agent_id, relay)) = found else {
            let err = ApiError::new(
                ErrorCode::NotFound,
                format!("no login `{login_id}` is under way (it finished, was given up after 10 minutes, or its agent reconnected): start again with POST /oauth/login"),
            );
            return answer(caller, Response::error(err), effects);
        };
        if !relay.awaiting_code || relay.code_sent {
            let why = if relay.code_sent { "a code for this login was sent already; wait for its outcome" } else { "this login has not shown its URL yet; open the URL first" };
            return answer(caller, Response::error(ApiError::new(ErrorCode::Conflict, why)), effects);
        }
        let mut effects = effects;
        self.set_relay(&session_id, Some(LoginRelay { code_sent: true, ..relay }), &mut effects);
        self.send_login_order(now, &session_id, &agent_id, &login_id, LoginStep::Code, LoginAction::Code { code }, &mut effects);
        info!(agent_id = %agent_id, login_id = %login_id, "re-login code passed on");
        self.wait_for_login(caller, &login_id);
        effects
    }

    /// The agent's word on a relayed login (its signature checked already).
    pub(super) fn login_progress(&mut self, now: Now, session_id: &str, report: LoginReport, effects: &mut Vec<Effect>) {
        let LoginReport { login_id, order_nonce, state, url, error, oauth, url_proof } = report;
        let login_id = login_id.as_str();
        let agent = self.sessions.get(session_id).and_then(|s| s.agent()).expect("ready session");
        let agent_id = agent.agent_id.clone();
        let Some(relay) = agent.login.clone().filter(|l| l.id == login_id) else {
            warn!(agent_id = %agent_id, login_id, "progress of a login this edge is not relaying ignored");
            return;
        };
        if !relay.issued(&order_nonce) {
            warn!(agent_id = %agent_id, login_id, "login progress for an order this edge never sent ignored");
            return;
        }
        // Only a sign-in page of Anthropic's is shown to the operator: another process on
        // the runner may have written into the output the agent read it from.
        let url = url.filter(|u| match shared::oauth::sign_in_host(u) {
            Ok(_) => true,
            Err(why) => {
                warn!(agent_id = %agent_id, login_id, reason = %why, "the agent's login URL is not Anthropic's sign-in page: not passed on");
                false
            }
        });
        // Passed on unchecked (the edge is not who must believe it), but only in a claim's
        // shape: the relay keeps it, in a Worker's session record of 2 KiB in all.
        let url_proof = url_proof.filter(|p| shared::protocol::LoginUrlClaim::well_formed(p));
        match (state, url) {
            (LoginState::AwaitingCode, Some(url)) => {
                info!(agent_id = %agent_id, login_id, "re-login waits for its code");
                // The agent's signature over the URL goes on as it came: the edge has no key
                // to make one, and `claude-runner login` checks it against the agent's.
                let body = awaiting_code(login_id, &agent_id, &url, url_proof.as_deref(), now.wall_until(relay.expires_at));
                self.set_relay(session_id, Some(LoginRelay { url: Some(url), url_proof, awaiting_code: true, ..relay }), effects);
                self.answer_login(login_id, Response::json(200, body.to_string()), effects);
            }
            (LoginState::LoggedIn, _) => {
                info!(agent_id = %agent_id, login_id, "re-login succeeded");
                if let Some(report) = oauth {
                    self.take_report(now, session_id, report, effects);
                }
                self.set_relay(session_id, None, effects);
                let oauth = self.sessions[session_id].agent().map(|a| a.oauth.status(now.wall));
                let body = json!({"state": "logged_in", "login_id": login_id, "agent_id": agent_id, "oauth": oauth});
                self.answer_login(login_id, Response::json(200, body.to_string()), effects);
                self.settle_queue(now, effects);
            }
            (state, _) => {
                let why = match state {
                    LoginState::AwaitingCode => "the agent's `claude auth login` printed no usable authorization URL".to_string(),
                    _ => error.unwrap_or_else(|| "no reason given".into()),
                };
                warn!(agent_id = %agent_id, login_id, reason = %shared::text::truncate(&why, 300), "re-login failed");
                self.set_relay(session_id, None, effects);
                let mut err = ApiError::new(
                    ErrorCode::RunnerOauthError,
                    format!("the login on the runner failed: {why}. Start again with POST /oauth/login (or log in on the runner machine as README's \"First login\" says)"),
                );
                err.status = 502;
                self.answer_login(login_id, Response::error(err), effects);
                self.settle_queue(now, effects);
            }
        }
    }

    /// Relays past [`LOGIN_TTL_MS`] are given up.
    pub(super) fn expire_logins(&mut self, now: Now, effects: &mut Vec<Effect>) {
        let expired: Vec<(String, String)> = self
            .ready()
            .filter_map(|(sid, a)| a.login.as_ref().filter(|l| l.expires_at <= now.at).map(|l| (sid.clone(), l.id.clone())))
            .collect();
        for (session_id, login_id) in expired {
            info!(login_id = %login_id, "re-login given up: no code within 10 minutes");
            self.set_relay(&session_id, None, effects);
            let err = relay_timeout("the login was given up: no code came within 10 minutes; start again with POST /oauth/login");
            self.answer_login(&login_id, Response::error(err), effects);
        }
    }

    /// The earliest edge time a relay is given up.
    pub(super) fn earliest_login_expiry(&self) -> Option<Millis> {
        self.ready().filter_map(|(_, a)| a.login.as_ref().map(|l| l.expires_at)).min()
    }

    /// The agent of a relay went away: its callers are told, the relay is over.
    pub(super) fn login_lost(&mut self, relay: &LoginRelay, effects: &mut Vec<Effect>) {
        let err = ApiError::new(ErrorCode::RunnerOffline, "the agent disconnected during the login; start again with POST /oauth/login once it is back");
        self.answer_login(&relay.id, Response::error(err), effects);
    }

    /// A caller of the relay waited past its bound: it is told, and the relay is given up
    /// so a new one can start (the agent replaces its `claude auth login` with the new one).
    pub(super) fn login_wait_expired(&mut self, caller: CallerId) -> Option<Vec<Effect>> {
        let login_id = self.callers.logins.iter().find(|(_, c)| c.contains(&caller)).map(|(id, _)| id.clone())?;
        let mut effects = Vec::new();
        let session = self.ready().find(|(_, a)| a.login.as_ref().is_some_and(|l| l.id == login_id)).map(|(sid, _)| sid.clone());
        if let Some(session_id) = session {
            self.set_relay(&session_id, None, &mut effects);
        }
        let err = relay_timeout("the agent did not answer the login in time; try again, and check the agent's log");
        self.answer_login(&login_id, Response::error(err), &mut effects);
        Some(effects)
    }

    fn set_relay(&mut self, session_id: &str, relay: Option<LoginRelay>, effects: &mut Vec<Effect>) {
        let session = self.session_mut(session_id).expect("relays live on ready sessions");
        session.agent_mut().expect("ready session").login = relay;
        effects.push(self.save_session(session_id));
    }

    #[allow(clippy::too_many_arguments)]
    fn send_login_order(&mut self, now: Now, session_id: &str, agent_id: &str, login_id: &str, step: LoginStep, action: LoginAction, effects: &mut Vec<Effect>) {
        // One start and at most one code per login id (a new start takes a new id), so the
        // nonce is unique and the agent's report can be bound to it (LoginRelay::issued).
        let nonce = LoginRelay::nonce(login_id, step);
        let to = Audience { agent_id, pool: &self.cfg.pool };
        // Bound to this connection, as a job order is: the path cannot hold it back for the next.
        let challenge = self.session_challenge(session_id);
        let order = LoginOrder { header: OrderHeader::new(login_id, to, now.wall, nonce), challenge, action };
        let envelope = Envelope::seal(Domain::Login, &order, &self.cfg.signing_key);
        effects.push(Effect::Send { session: session_id.to_string(), text: EdgeMessage::Login { envelope }.to_text() });
    }

    fn wait_for_login(&mut self, caller: CallerId, login_id: &str) {
        self.note_logins();
        self.callers.logins.entry(login_id.to_string()).or_default().push(caller);
    }

    fn answer_login(&mut self, login_id: &str, response: Response, effects: &mut Vec<Effect>) {
        self.note_logins();
        for caller in self.callers.logins.remove(login_id).unwrap_or_default() {
            effects.push(Effect::Answer { caller, response: response.clone() });
        }
    }
}

fn answer(caller: CallerId, response: Response, mut effects: Vec<Effect>) -> Vec<Effect> {
    effects.push(Effect::Answer { caller, response });
    effects
}

/// The answer while a login waits for its code: with the sign-in page's host, for the page
/// and `claude-runner login` to show plainly beside the link.
fn awaiting_code(login_id: &str, agent_id: &str, url: &str, url_proof: Option<&str>, expires_at_wall: Millis) -> Value {
    let mut body = json!({
        "state": "awaiting_code", "login_id": login_id, "agent_id": agent_id, "url": url,
        "host": shared::oauth::sign_in_host(url).ok(),
        "expires_at": rfc3339(expires_at_wall),
        "next": "open the URL, sign in, and send the code it shows with POST /oauth/login/code {\"login_id\", \"code\"}",
    });
    if let Some(proof) = url_proof {
        body["url_proof"] = json!(proof);
    }
    body
}

/// A JSON object body, or no body at all (an empty object).
fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::invalid("the body must be a JSON object (or empty)")),
    }
}

fn parse_code(body: &[u8]) -> Result<(String, String), ApiError> {
    let map = parse_object(body)?;
    let field = |name: &str| map.get(name).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
    let (Some(login_id), Some(code)) = (field("login_id"), field("code")) else {
        return Err(ApiError::invalid("send {\"login_id\": \"…\", \"code\": \"…\"}: the login id POST /oauth/login answered and the code the sign-in page showed"));
    };
    if !shared::ids::plain_id(login_id, 64) {
        return Err(ApiError::invalid("`login_id` is not a login id POST /oauth/login could have answered"));
    }
    if code.len() > MAX_CODE_BYTES || code.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::invalid(format!("`code` must be the code the sign-in page showed: one word of at most {MAX_CODE_BYTES} characters")));
    }
    Ok((login_id.to_string(), code.to_string()))
}

/// A relay that ran out of time. Unlike a job's TIMEOUT (a result, inside a 200), nothing
/// here ended: the request itself went unanswered, so it is a 504.
fn relay_timeout(reason: &str) -> ApiError {
    ApiError { status: 504, ..ApiError::new(ErrorCode::Timeout, reason) }
}
