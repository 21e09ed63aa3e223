//! Time: the next moment anything is due ([`Edge::next_deadline`], where hosts set their
//! timer or alarm) and acting on everything due ([`Edge::tick`]): silent connections,
//! queued jobs nobody took, running jobs past their timeout or whose agent stayed away,
//! finished jobs past retention. All on edge time ([`Now::at`]), which never jumps.

use super::storage::Origin;
use super::{Edge, Effect};
use crate::clock::Now;
use crate::record::{self, Job};
use crate::session::Refused;
use shared::contract::{ApiError, ErrorCode};
use shared::job::JobResult;
use shared::protocol::{close, HANDSHAKE_TIMEOUT_MS};
use shared::Millis;
use tracing::warn;

impl Edge {
    /// The earliest edge time [`Edge::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        let hb = self.cfg.heartbeat_interval_ms;
        let sessions = self.sessions.values().map(|s| s.deadline(hb));
        let queued: Box<dyn Iterator<Item = Millis>> = match self.own_waits() {
            true => Box::new(self.queue.first_expiry().into_iter()),
            false => Box::new(self.queue.ids().map(|id| self.queued_deadline(&self.jobs[id]))),
        };
        let unfit = self.unfit_due().map(|(_, due)| due);
        let active = self
            .active
            .iter()
            .filter_map(|id| self.jobs[id].deadline(self.cfg.lost_after_ms, self.cfg.queue_ttl_ms, self.cfg.timeout_margin_ms));
        let retention = self.retained.first().map(|(t, _)| t.saturating_add(self.cfg.job_retention_ms));
        let keys = self.spent.next_due(self.cfg.job_retention_ms);
        // A usage window's reset lets held work go; a relay is given up at its expiry.
        let holds = self.earliest_usage_hold().filter(|_| !self.queue.is_empty());
        let logins = self.earliest_login_expiry();
        let notices = self.notices_deadline();
        // Jobs abandoned in an event whose writes failed end at the retry.
        let abandoned = self.retry_at.filter(|_| !self.abandoned.is_empty());
        let next = sessions
            .chain(queued)
            .chain(unfit)
            .chain(active)
            .chain(retention)
            .chain(keys)
            .chain(holds)
            .chain(logins)
            .chain(notices)
            .chain(self.held_back_due)
            .chain(abandoned)
            .min()?;
        // After a failed write, not again before the retry time.
        Some(self.retry_at.map_or(next, |retry| next.max(retry)))
    }

    /// Whether every queued job waits its own time, which the queue keeps in order (those
    /// no connected agent fits aside: [`Edge::unfit_due`]): while no usage window holds
    /// work (that of the agents connected, or with none connected the last one reported).
    /// Otherwise a held job's deadline moves (the window's reset), and the queue is walked.
    fn own_waits(&self) -> bool {
        self.queue_usage_hold().is_none()
    }

    fn queued_deadline(&self, job: &Job) -> Millis {
        let mut own = job.created_at.saturating_add(job.queue_wait(self.cfg.queue_ttl_ms));
        // A detached (or kept) job held for the usage window waits for its reset, then QUEUE_TTL_MS.
        if let (false, true, Some(hold)) = (job.waited_only(), job.wait_for_usage, self.queue_usage_hold()) {
            own = own.max(hold.saturating_add(self.cfg.queue_ttl_ms));
        }
        // A waiting caller should fall back rather than wait out its whole timeout for an
        // agent that is gone: `LOST_AFTER_MS` after no connected agent fits its job (the
        // whole edge offline, or the agents it names or whose labels it needs gone), an
        // agent's brief reconnect tolerated.
        match self.unfit_since.get(&job.id) {
            Some(since) if job.waited_only() => own.min(since.max(&job.created_at).saturating_add(self.cfg.lost_after_ms)),
            _ => own,
        }
    }

    /// The queued `/execute` jobs no connected agent fits, each with its deadline.
    fn unfit_due(&self) -> impl Iterator<Item = (&String, Millis)> {
        self.unfit_since
            .keys()
            .filter(|id| self.queue.contains(id))
            .map(|id| (id, self.queued_deadline(&self.jobs[id])))
    }

    /// Notes which queued `/execute` jobs no connected agent fits now, and since when
    /// (kept for those noted already): called as agents come and go, and as an event is
    /// undone. A job that fits one again — its agent back — waits on as before.
    pub(super) fn note_unfit(&mut self, now: Now) {
        let unfit = self
            .queued_waits_judged(|placement| self.fitting_agents(placement).is_empty().then_some(()))
            .into_iter()
            .map(|(id, ())| {
                let since = self.unfit_since.get(&id).copied().unwrap_or(now.at);
                (id, since)
            })
            .collect();
        self.unfit_since = unfit;
    }

    /// Acts on every deadline that has passed.
    pub fn tick(&mut self, now: impl Into<Now>) -> Vec<Effect> {
        let now = now.into();
        self.begin(Origin::Tick, Some(now));
        self.retry_at = None;
        let mut effects = Vec::new();
        let hb = self.cfg.heartbeat_interval_ms;
        let overdue: Vec<(String, bool)> = self
            .sessions
            .values()
            .filter(|s| s.deadline(hb) <= now.at)
            .map(|s| (s.id.clone(), s.agent().is_some()))
            .collect();
        for (id, ready) in overdue {
            let reason = if ready {
                format!("nothing from the agent for {} ms (two heartbeat intervals: no heartbeat, no new result, no frame arriving)", 2 * hb)
            } else {
                format!("no signed hello within {} s", HANDSHAKE_TIMEOUT_MS / 1000)
            };
            warn!(session = %id, reason = %reason, "closing silent connection");
            self.close(now, &id, Refused::new(close::SILENT, reason), &mut effects);
        }

        let mut expired: Vec<String> = match self.own_waits() {
            true => self.queue.expired(now.at),
            false => self.queue.ids().filter(|id| self.queued_deadline(&self.jobs[*id]) <= now.at).cloned().collect(),
        };
        let unfit: Vec<String> = self.unfit_due().filter(|(id, due)| *due <= now.at && !expired.contains(id)).map(|(id, _)| id.clone()).collect();
        expired.extend(unfit);
        for id in expired {
            let job = &self.jobs[&id];
            let waited = now.at.saturating_sub(job.created_at);
            // Its caller falls back, told why: as a new `/execute` would be refused.
            let gone = match (job.waited_only(), self.unfit_since.contains_key(&id), self.is_online()) {
                (true, true, false) => Some(ApiError::offline()),
                (true, true, true) => self.unplaceable(now, &job.placement),
                _ => None,
            };
            let result = match gone {
                Some(err) => JobResult::failure(err.body.error_code, err.body.error, waited),
                None => self.expired_in_queue(now, &job.placement, waited, job.queue_wait(self.cfg.queue_ttl_ms)),
            };
            self.finish(now, &id, result, &mut effects);
        }

        let due: Vec<String> = self
            .active
            .iter()
            .filter(|id| {
                self.jobs[*id]
                    .deadline(self.cfg.lost_after_ms, self.cfg.queue_ttl_ms, self.cfg.timeout_margin_ms)
                    .is_some_and(|d| d <= now.at)
            })
            .cloned()
            .collect();
        for id in due {
            let job = &self.jobs[&id];
            let lost = job.orphaned_at.is_some_and(|t| t.saturating_add(job.lost_after_ms(self.cfg.lost_after_ms)) <= now.at);
            if lost {
                let result = record::lost(job, now.at);
                self.finish(now, &id, result, &mut effects);
            } else {
                let result = timed_out(job, self.cfg.timeout_margin_ms, now.at);
                if let (Some(session), Some(agent)) = (job.session_id.clone(), job.agent_id.clone()) {
                    if self.sessions.contains_key(&session) {
                        self.send_cancel(now, &session, &agent, &id, "timed out at the edge", &mut effects);
                    }
                }
                self.finish(now, &id, result, &mut effects);
            }
        }

        if !self.abandoned.is_empty() {
            self.note_abandoned();
            for id in std::mem::take(&mut self.abandoned) {
                self.end_abandoned(now, &id, &mut effects);
            }
        }
        if self.held_back_due.is_some_and(|due| due <= now.at) {
            self.note_held_back_due();
            self.held_back_due = None;
            self.end_held_back_waits(now, &mut effects);
        }
        self.expire_logins(now, &mut effects);
        self.lift_usage_holds(now, &mut effects);
        self.settle_queue(now, &mut effects);
        // Observed first: a condition that ended drops its alert still on its way.
        self.observe(now, &mut effects);
        self.retry_notices(now, &mut effects);

        while let Some((finished_at, _)) = self.retained.first() {
            if finished_at.saturating_add(self.cfg.job_retention_ms) > now.at {
                break;
            }
            self.forget_oldest(&mut effects);
        }
        self.expire_spent(now, &mut effects);
        self.let_go_of_given();
        effects
    }
}

/// The edge's TIMEOUT of a job whose agent did not answer in time. Sent again, a job is
/// safe to run elsewhere — unless it asked for a push and went to an agent
/// ([`record::push_may_have_landed`]).
fn timed_out(job: &Job, margin_ms: u64, now: Millis) -> JobResult {
    let said = format!("the agent did not report a result within timeout_ms ({} ms) and a {margin_ms} ms margin", job.spec.timeout_ms);
    record::push_may_have_landed(job, JobResult::failure(ErrorCode::Timeout, said, job.elapsed(now)))
}
