//! Why a job cannot start now: one judgement of the agents that fit it
//! ([`Edge::hindrance`]), behind both an `/execute` refused at once ([`Edge::refused_at_once`])
//! and a queued job's `waiting_for` (`POST /jobs`, `GET /jobs/{id}`, `GET /jobs`). A caller
//! told only `queued` waited up to `QUEUE_TTL_MS` for a login nobody knew was needed
//! (review rev22, 3).

use super::login::{shown_agent, why_not, Told};
use super::{Availability, Edge};
use crate::clock::Now;
use crate::record::Job;
use crate::session::Agent;
use shared::contract::{ApiError, JobView, WaitCode, WaitingFor};
use shared::job::JobState;
use shared::placement::Placement;
use shared::time::rfc3339;
use shared::Millis;

/// What keeps the agents that fit a job from taking it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hindrance {
    /// No agent is connected.
    NoAgent,
    /// No connected agent fits the job (its labels, its `agent_id`).
    NoneFits,
    /// Every agent that fits it is paused, stopping or unable to start jobs.
    HeldBack(Held),
    /// The login of each of them that is not held back needs a person.
    Login,
    /// Their usage window is used up until this wall time.
    Usage { until: Millis },
    /// A relayed login's code was passed on: its outcome is awaited.
    LoginFinishing,
}

/// How the agents that fit a job are all held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    Paused,
    Stopping,
    /// Each said it cannot start jobs now (its disk, its process limit), none paused or
    /// stopping ([`Agent::cannot_start`]).
    CannotStart,
    /// Some of these, at least one paused: resuming it lets the job start.
    SomePaused,
    /// Some stopping, the others unable to start jobs, none paused: only one that can
    /// start jobs again takes it (a resume is no answer: rev26, 4).
    StoppingOrCannotStart,
}

impl Held {
    /// How the agents that fit a job are held back, as its refusal and its `waiting_for`
    /// say it before naming each one's reason ([`Edge::fitting_reasons`]).
    pub(crate) fn said(self) -> &'static str {
        match self {
            Held::Paused => "paused",
            Held::Stopping => "stopping",
            Held::CannotStart => "unable to start jobs",
            Held::SomePaused => "paused, stopping or unable to start jobs",
            Held::StoppingOrCannotStart => "stopping or unable to start jobs",
        }
    }
}

impl Edge {
    /// Each connected agent that fits the placement, with why it cannot take a job now
    /// ([`why_not`]; `busy`: it could, but has no free slot), as every refusal and
    /// `waiting_for` lists them: one wording of the agents' reasons.
    /// Told to whoever reads what is said of the job ([`Edge::told_to`]).
    pub(crate) fn fitting_reasons(&self, now: Now, placement: &Placement) -> String {
        let to = self.told_to(placement);
        let each: Vec<String> = self.fitting_agents(placement).iter().map(|a| format!("{}: {}", shown_agent(a), why_not(a, now, to).unwrap_or_else(|| "busy".into()))).collect();
        each.join("; ")
    }

    /// What keeps a job of this placement from starting now, if anything but busy agents
    /// does: no agent at all, none that fits, all that fit paused or stopping
    /// ([`Edge::unplaced`]), or their logins or usage windows ([`Edge::availability_for`]).
    pub(crate) fn hindrance(&self, now: Now, placement: &Placement) -> Option<Hindrance> {
        if !self.is_online() {
            return Some(Hindrance::NoAgent);
        }
        if let Some(unplaced) = self.unplaced(placement) {
            return Some(unplaced);
        }
        match self.availability_for(now, placement) {
            Availability::NeedsLogin => Some(Hindrance::Login),
            Availability::UsageLimited { until } => Some(Hindrance::Usage { until }),
            Availability::LoggingIn => Some(Hindrance::LoginFinishing),
            Availability::Ready | Availability::Offline => None,
        }
    }

    /// Whether no connected agent fits the placement, or every one that does is paused or
    /// stopping ([`Hindrance::NoneFits`], [`Hindrance::HeldBack`]).
    pub(super) fn unplaced(&self, placement: &Placement) -> Option<Hindrance> {
        let fitting = self.fitting_agents(placement);
        if fitting.iter().any(|a| !a.held_back()) {
            return None;
        }
        if fitting.is_empty() {
            return Some(Hindrance::NoneFits);
        }
        let cannot_start = |a: &&Agent| a.cannot_start.is_some() && !a.paused && !a.stopping;
        let held = match (fitting.iter().all(|a| a.paused), fitting.iter().all(|a| a.stopping && !a.paused), fitting.iter().all(cannot_start)) {
            (true, _, _) => Held::Paused,
            (_, true, _) => Held::Stopping,
            (_, _, true) => Held::CannotStart,
            _ if fitting.iter().any(|a| a.paused) => Held::SomePaused,
            _ => Held::StoppingOrCannotStart,
        };
        Some(Hindrance::HeldBack(held))
    }

    /// An `/execute` job's refusal for what keeps it back: at once for all but a relayed
    /// login being finished (seconds as a rule: it waits for the outcome).
    pub(super) fn refused_at_once(&self, now: Now, placement: &Placement, hindrance: Hindrance) -> Option<ApiError> {
        match hindrance {
            Hindrance::NoAgent => Some(ApiError::offline()),
            Hindrance::NoneFits | Hindrance::HeldBack(_) => self.unplaceable(now, placement),
            Hindrance::Login | Hindrance::Usage { .. } => self.unrunnable(now, placement),
            Hindrance::LoginFinishing => None,
        }
    }

    /// A job as `GET /jobs/{id}` shows it: a queued one with why it waits.
    pub fn job_view(&self, now: impl Into<Now>, job: &Job) -> JobView {
        let now = now.into();
        let mut view = job.view(now);
        if job.state == JobState::Queued {
            view.waiting_for = Some(self.waiting_for(now, &job.placement));
        }
        view
    }

    /// Why a queued job of this placement waits, and what to do about it.
    pub fn waiting_for(&self, now: impl Into<Now>, placement: &Placement) -> WaitingFor {
        let now = now.into();
        let fitting = || -> Vec<&Agent> { self.fitting_agents(placement).into_iter().filter(|a| !a.held_back()).collect() };
        let names = |agents: Vec<&Agent>| agents.iter().map(|a| shown_agent(a)).collect::<Vec<_>>().join(", ");
        let (code, message) = match self.hindrance(now, placement) {
            Some(Hindrance::NoAgent) => (
                WaitCode::NoAgent,
                "no agent is connected to the edge: start `claude-runner agent` (or `claude-runner up`) on the runner machine; the job starts when one connects".to_string(),
            ),
            Some(Hindrance::NoneFits) => {
                let offered: Vec<String> = self.ready().map(|(_, a)| shown_agent(a)).collect();
                (
                    WaitCode::NoFittingAgent,
                    format!(
                        "no connected agent offers {} (connected: {}): start one that does (AGENT_ID, AGENT_LABELS), or cancel the job (DELETE /jobs/<id>) and submit it without them",
                        placement.needs(),
                        offered.join(", ")
                    ),
                )
            }
            Some(Hindrance::HeldBack(held)) => {
                let (code, what) = match held {
                    Held::Stopping => (WaitCode::Stopping, "the job starts once one is started again"),
                    // The stopping ones do not come back by themselves: the one that cannot
                    // start jobs is what the operator can see to.
                    Held::CannotStart | Held::StoppingOrCannotStart => (
                        WaitCode::CannotStart,
                        match self.told_to(placement) {
                            Told::Operator => "do what its reason says (free space on its DATA_DIR's disk, say); the job starts once one can start jobs again",
                            Told::Caller => "the pool's operator sees to it: ask them; the job starts once one can start jobs again",
                        },
                    ),
                    // Named callers read this too, whose secret cannot resume an agent
                    // (review rev27, 4): the operator's part is said as such.
                    Held::Paused | Held::SomePaused => (
                        WaitCode::Paused,
                        "the pool's operator resumes one (POST /agents/<id>/resume with the pool's RUNNER_SECRET, or the edge's page): ask them; the job starts then",
                    ),
                };
                (code, format!("every agent that fits it is {} ({}): {what}", held.said(), self.fitting_reasons(now, placement)))
            }
            Some(Hindrance::Login) => {
                let agents = fitting();
                // With more than one agent connected, the one to log in is named.
                let command = match (self.ready().count(), agents.first()) {
                    (1, _) | (_, None) => "claude-runner login".to_string(),
                    (_, Some(a)) => format!("claude-runner login --agent-id {}", a.agent_id),
                };
                (
                    WaitCode::Login,
                    format!(
                        "the Claude OAuth login of the agent that fits it ({}) needs renewing: the pool's operator runs `{command}` (or follows \"Log in again\" on the edge's page): ask them if that is not you; the job starts once it is logged in",
                        names(agents)
                    ),
                )
            }
            Some(Hindrance::Usage { until }) => (
                WaitCode::UsageLimit,
                format!(
                    "the usage window of the agent that fits it ({}) is used up until {}: the job starts after the reset",
                    names(fitting()),
                    rfc3339(until)
                ),
            ),
            Some(Hindrance::LoginFinishing) => (
                WaitCode::LoginFinishing,
                format!("a new login is being written on the agent that fits it ({}): the job starts once it is in", names(fitting())),
            ),
            None => (
                WaitCode::Busy,
                "every agent that fits it is busy with other jobs (or with those ahead of it in turn): it starts when one has a free slot".to_string(),
            ),
        };
        WaitingFor { code, message }
    }
}
