//! A clean stop of the edge (the native server on SIGTERM). A caller must never be told to
//! fall back while its job will still run, so each waiting caller is told the truth:
//!
//! - a queued `/execute` job ends here, never started (and so never dispatched after the
//!   restart), and its caller is told to run the task elsewhere (`fallback: true`);
//! - a caller whose job goes on (dispatched, running, or a `POST /jobs` job it waited on)
//!   is told where to follow it — `EDGE_RESTARTING` with the job id, no `fallback` — and
//!   its `/execute` job is marked so ([`crate::record::Job::callers_told_to_follow`]): the
//!   restore after a crash ends one not started, its caller gone unanswered, but not this;
//! - event streams end with where to pick them up; agents are told to reconnect shortly;
//! - a job waiting for its agent waits again from the restart.
//!
//! From then on the machine takes no new work and no new agents.

use super::storage::Origin;
use super::{Edge, Effect};
use crate::clock::Now;
use crate::record::Mode;
use crate::session::Refused;
use shared::contract::{ApiError, ErrorCode};
use shared::protocol::close;
use tracing::info;

impl Edge {
    /// The edge is stopping. Hosts carry out the effects, then stop.
    pub fn shutdown(&mut self, now: impl Into<Now>) -> Vec<Effect> {
        let now = now.into();
        self.begin(Origin::Shutdown, Some(now));
        self.stopping = true;
        let mut effects = Vec::new();
        let unstarted: Vec<String> =
            self.queue.ids().filter(|id| self.jobs[*id].waited_only()).cloned().collect();
        info!(unstarted = unstarted.len(), callers = self.callers_waiting(), "edge stopping");
        for id in unstarted {
            self.end_unstarted(
                now,
                &id,
                "the edge is restarting and the job had not started; it was ended and will not run: run the task elsewhere",
                &mut effects,
            );
        }
        // Their waiters are told to follow them (`EDGE_RESTARTING`, not to fall back): the
        // restore after this stop must not end them as jobs whose caller is gone.
        let followed: Vec<String> = self
            .active
            .iter()
            .filter(|id| self.jobs[*id].mode == Mode::Wait && self.callers.waiters.get(*id).is_some_and(|w| !w.is_empty()))
            .cloned()
            .collect();
        for id in &followed {
            self.job_mut(id).expect("active jobs exist").callers_told_to_follow = true;
        }
        self.let_go(now, &mut effects);
        // No agent can come back to an edge that is away, so the edge's own downtime must
        // not count against one: every job waiting for its agent (whose connection this
        // stop just closed, or which was away already) waits again from the restart (the
        // restore starts the wait of jobs without one). Otherwise a stop longer than
        // LOST_AFTER_MS loses every running job at the restart, before any agent is back.
        let waiting: Vec<String> = self.active.iter().filter(|id| self.jobs[*id].orphaned_at.is_some()).cloned().collect();
        for id in &waiting {
            self.job_mut(id).expect("active jobs exist").orphaned_at = None;
        }
        let changed: std::collections::BTreeSet<String> = followed.into_iter().chain(waiting).collect();
        for id in changed {
            effects.push(self.save(&id));
        }
        effects
    }

    /// Tells every waiting caller and stream where its job is, and every agent to
    /// reconnect shortly.
    pub(super) fn let_go(&mut self, now: Now, effects: &mut Vec<Effect>) {
        self.release_callers(effects);
        let sessions: Vec<String> = self.sessions.keys().cloned().collect();
        for id in sessions {
            let refused = Refused::new(close::SHUTTING_DOWN, "the edge is restarting; reconnect shortly");
            self.close(now, &id, refused, effects);
        }
    }
}

/// The refusal of new work while the edge stops (and, from its host, of any request once
/// the machine is gone).
pub fn shutting_down() -> ApiError {
    ApiError::new(ErrorCode::RunnerOffline, "the edge is shutting down; retry in a moment or run the task elsewhere")
}
