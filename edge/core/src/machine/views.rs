//! What the machine shows without changing: `/health`, the agents' login (`/oauth/status`)
//! and the Prometheus text of `/metrics`. Logins are judged on the wall clock (their
//! expiry is a date); times the edge measured are shown as wall times.

use super::{Edge, DOWN_SHOWN_MS};
use crate::clock::Now;
use crate::session::Agent;
use shared::contract::{AgentInfo, CallerAgent, CallerHealth, Health, HealthStatus, JobList, PoolSummary, LISTED_FINISHED_JOBS};
use shared::oauth::{LoginHealth, OAuthStatus};
use shared::time::rfc3339;
use shared::Millis;
use shared::contract::WaitingFor;
use shared::job::JobState;
use shared::placement::Labels;
use std::collections::{BTreeMap, HashMap};

/// A login's health as `/health` words it per agent.
fn login_word(health: LoginHealth) -> &'static str {
    match health {
        LoginHealth::Good => "good",
        LoginHealth::AttentionSoon => "attention_soon",
        LoginHealth::Broken => "broken",
    }
}

#[cfg(test)]
thread_local! {
    /// Operator's `/health` views (every agent's load, login and details) built on this
    /// thread: tests show which answers build none.
    pub(crate) static FULL_VIEWS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How an agent's login and usage window rank for `/health`'s verdict: best first.
fn rank(a: &Agent, now: Now) -> u8 {
    match (a.oauth.health(now.wall), a.usage_held(now)) {
        (LoginHealth::Good, false) => 0,
        (LoginHealth::AttentionSoon, false) => 1,
        (LoginHealth::Good | LoginHealth::AttentionSoon, true) => 2,
        (LoginHealth::Broken, _) => 3,
    }
}

/// What every view of `/health` rests on, found without looking at a job: the anonymous
/// answer (the verdict alone), a caller's, `/pools` and `/oauth/status` need no more, and
/// anyone may ask for the first, which the edge answers on its one thread.
struct Verdict<'a> {
    status: HealthStatus,
    /// The connected agents (their session id and record).
    agents: Vec<(&'a String, &'a Agent)>,
    /// The agent `/health` speaks for: the best able to work, else the one that says best
    /// when work may go again.
    best: Option<(&'a String, &'a Agent)>,
    /// How many of `agents` can take work.
    working: usize,
    /// Agents gone within [`DOWN_SHOWN_MS`], and since when.
    down: Vec<(&'a String, &'a Millis)>,
}

impl Edge {
    /// `/health`'s verdict: 200 while at least one agent can take work — as dispatch
    /// judges it ([`Agent::takes_work`]: connected, not paused nor stopping, its login
    /// usable, its usage window open, no relayed login writing a new one) — `degraded`
    /// when it can but something needs a look — the best agent's login soon, or an agent
    /// that is down (gone within [`DOWN_SHOWN_MS`], or connected with a login that does
    /// not work). With agents connected and none able to work, `unhealthy` and 503: a
    /// caller that decides by the status code alone must fall back, as `/execute` tells it
    /// to — except while a relayed login finishes (its code passed on, seconds as a rule),
    /// when an `/execute` waits for the outcome instead ([`super::Availability::LoggingIn`]).
    fn verdict(&self, now: Now) -> Verdict<'_> {
        let agents: Vec<(&String, &Agent)> = self.ready().collect();
        let working = agents.iter().filter(|(_, a)| a.takes_work(now)).count();
        // With none able to work, the agent that says best when work may go again: not a
        // paused one (the operator's choice, not why work is refused), and of used-up
        // windows the one that opens first — so `usage` says what `/execute`'s `retry_at` says.
        let opens_at = |a: &Agent| a.usage_held(now).then(|| a.oauth.usage.as_ref().and_then(|u| u.blocked_until())).flatten();
        let best = agents
            .iter()
            .filter(|(_, a)| a.takes_work(now))
            .min_by_key(|(_, a)| rank(a, now))
            .or_else(|| agents.iter().min_by_key(|(_, a)| (a.held_back(), rank(a, now), opens_at(a))))
            .copied();
        let down: Vec<(&String, &Millis)> = self.alerts.departed.iter().filter(|(_, t)| t.saturating_add(DOWN_SHOWN_MS) > now.at).collect();
        let some_down = !down.is_empty() || agents.iter().any(|(_, a)| a.oauth.health(now.wall) == LoginHealth::Broken);
        let status = match best {
            None => HealthStatus::Offline,
            Some(_) if working == 0 => HealthStatus::Unhealthy,
            Some((_, a)) => match a.oauth.health(now.wall) {
                LoginHealth::Good if some_down => HealthStatus::Degraded,
                LoginHealth::Good => HealthStatus::Healthy,
                LoginHealth::AttentionSoon => HealthStatus::Degraded,
                LoginHealth::Broken => HealthStatus::Unhealthy,
            },
        };
        Verdict { status, agents, best, working, down }
    }

    /// `/health` as anyone without a secret sees it: the verdict alone ([`Edge::health`]).
    pub fn health_status(&self, now: impl Into<Now>) -> HealthStatus {
        self.verdict(now.into()).status
    }

    /// The usage window `/health` shows: the best agent's, else the last one reported.
    fn usage_shown(&self, verdict: &Verdict, now: Now) -> Option<shared::usage::UsageView> {
        verdict
            .best
            .and_then(|(_, a)| a.oauth.usage.as_ref())
            .or_else(|| self.last_oauth.as_ref().and_then(|(_, r)| r.usage.as_ref()))
            .map(|u| u.view(now.wall))
    }

    /// `/health` as the operator sees it: the verdict ([`Edge::verdict`]) and every agent
    /// with its labels, load and login.
    pub fn health(&self, now: impl Into<Now>) -> Health {
        let now = now.into();
        #[cfg(test)]
        FULL_VIEWS.with(|n| n.set(n.get() + 1));
        let verdict = self.verdict(now);
        // Each connection's jobs, counted in one pass over the running ones.
        let mut running: BTreeMap<&str, usize> = BTreeMap::new();
        for id in &self.active {
            if let Some(sid) = self.jobs[id].session_id.as_deref() {
                *running.entry(sid).or_default() += 1;
            }
        }
        let info = |(sid, a): &(&String, &Agent)| AgentInfo {
            connected: true,
            agent_id: a.agent_id.clone(),
            version: a.version.clone(),
            last_seen: rfc3339(now.wall_of(self.sessions[*sid].last_seen)),
            running_jobs: running.get(sid.as_str()).copied().unwrap_or(0),
            capacity: a.capacity,
            claude_version: a.claude_version.clone(),
            labels: a.labels.clone(),
            paused: a.paused,
            stopping: a.stopping,
            cannot_start: a.cannot_start.clone(),
            takes_work: a.takes_work(now),
            login: login_word(a.oauth.health(now.wall)).into(),
        };
        let gone = verdict.down.iter().map(|(id, t)| AgentInfo {
            connected: false,
            agent_id: (*id).clone(),
            version: String::new(),
            last_seen: rfc3339(now.wall_of(**t)),
            running_jobs: 0,
            capacity: 0,
            claude_version: None,
            labels: Default::default(),
            paused: self.alerts.paused.contains(*id),
            stopping: false,
            cannot_start: None,
            takes_work: false,
            login: String::new(),
        });
        Health {
            status: verdict.status,
            service: "claude-runner".into(),
            timestamp: rfc3339(now.wall),
            agent: verdict.best.as_ref().map(info),
            oauth: self.login_shown(&verdict, now),
            agents: verdict.agents.iter().map(info).chain(gone).collect(),
            queued_jobs: self.queue.len(),
            agents_taking_work: verdict.working,
            usage: self.usage_shown(&verdict, now),
        }
    }

    /// The login `/health` and `/oauth/status` show: the best agent's, else the last one
    /// reported.
    fn login_shown(&self, verdict: &Verdict, now: Now) -> Option<OAuthStatus> {
        verdict
            .best
            .map(|(_, a)| a.oauth.status(now.wall))
            .or_else(|| self.last_oauth.as_ref().map(|(_, r)| r.status(now.wall)))
    }

    /// `/health` as a named caller sees it: the verdict without the operator's details,
    /// and the queue counted in that caller's jobs alone.
    pub fn caller_health(&self, now: impl Into<Now>, caller: &str) -> CallerHealth {
        let now = now.into();
        let verdict = self.verdict(now);
        CallerHealth {
            status: verdict.status,
            service: "claude-runner".into(),
            timestamp: rfc3339(now.wall),
            agents: verdict
                .agents
                .iter()
                .map(|(_, a)| CallerAgent { agent_id: a.agent_id.clone(), labels: a.labels.clone(), takes_work: a.takes_work(now) })
                .collect(),
            agents_taking_work: verdict.working,
            // Its own secret's jobs: not those the pool's secret queued under its name.
            queued_jobs: self.queue.len_of(caller, caller),
            usage: self.usage_shown(&verdict, now),
        }
    }

    /// This pool in `GET /pools`.
    pub fn pool_summary(&self, now: impl Into<Now>) -> PoolSummary {
        let verdict = self.verdict(now.into());
        PoolSummary {
            pool: self.cfg.pool.clone(),
            status: verdict.status,
            agents_online: verdict.agents.len(),
            agents_taking_work: verdict.working,
            queued_jobs: self.queue.len(),
        }
    }

    /// `GET /jobs`: what waits or runs, oldest first, then the last finished, newest first;
    /// with `caller`, the jobs that caller sent with its own secret only (it sees no other
    /// caller's, nor those the pool's secret sent in its name).
    pub fn job_list(&self, now: impl Into<Now>, caller: Option<&str>) -> JobList {
        let now = now.into();
        let listed = |j: &&crate::record::Job| caller.is_none_or(|c| j.sent_by_own_secret_of(c));
        let mut active: Vec<&crate::record::Job> =
            self.queue.ids().chain(self.active.iter()).filter_map(|id| self.job(id)).filter(listed).collect();
        active.sort_by_key(|j| (j.created_at, j.id.clone()));
        let finished = self.retained.iter().rev().filter_map(|(_, id)| self.job(id)).filter(listed).take(LISTED_FINISHED_JOBS);
        // Why each queued job waits, judged once per (labels, agent_id, reader) however many share them.
        let mut judged: HashMap<(&Labels, Option<&str>, super::login::Told), WaitingFor> = HashMap::new();
        let mut shown = Vec::with_capacity(active.len());
        for j in active {
            let mut view = j.view(now);
            if j.state == JobState::Queued {
                let need = self.judged_as(&j.placement);
                view.waiting_for = Some(judged.entry(need).or_insert_with(|| self.waiting_for(now, &j.placement)).clone());
            }
            shown.push(view);
        }
        JobList { active: shown, finished: finished.map(|j| j.view(now)).collect() }
    }

    /// The best connected agent's login, else the last one reported.
    pub fn oauth_status(&self, now: impl Into<Now>) -> Option<OAuthStatus> {
        let now = now.into();
        self.login_shown(&self.verdict(now), now)
    }

    /// `/metrics`: Prometheus text.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, help: &str, kind: &str, samples: Vec<(String, u64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in samples {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let s = &self.stats;
        let one = |v: u64| vec![(String::new(), v)];
        line("claude_runner_jobs_submitted_total", "Jobs accepted.", "counter", one(s.submitted));
        line(
            "claude_runner_jobs_finished_total",
            "Jobs ended, by final state.",
            "counter",
            s.finished.iter().map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v)).collect(),
        );
        line("claude_runner_orders_rejected_total", "Orders the agent refused.", "counter", one(s.rejected_orders));
        line("claude_runner_agents_refused_total", "Agent connections refused: upgrades without a valid agent proof, and hellos refused.", "counter", one(s.refused_agents));
        line("claude_runner_reports_refused_total", "Progress, results, login reports, refusals and heartbeats not MACed by their agent on their connection.", "counter", one(s.refused_reports));
        line("claude_runner_store_failures_total", "Events whose changes could not be stored (and were undone).", "counter", one(s.store_failures));
        line("claude_runner_jobs_queued", "Jobs waiting for an agent.", "gauge", one(self.queue.len() as u64));
        line("claude_runner_jobs_active", "Jobs dispatched or running.", "gauge", one(self.active.len() as u64));
        line("claude_runner_agents_connected", "Agents connected.", "gauge", one(self.ready().count() as u64));
        line("claude_runner_jobs_retained", "Ended jobs kept, readable.", "gauge", one(self.retained.len() as u64));
        line(
            "claude_runner_forgotten_job_keys",
            "Idempotency keys of jobs forgotten early, kept until their retention ends (at most max(MAX_RETAINED_JOBS, 1000)).",
            "gauge",
            one(self.spent.len() as u64),
        );
        out
    }
}
