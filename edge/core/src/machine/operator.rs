//! The operator's hand on the pool's agents: pause one (it finishes what it runs and takes
//! nothing new) and resume it. A pause is kept by agent id in the edge's stored memory, so
//! it outlasts the agent's reconnects and the edge's restarts; the session record carries
//! it too, for the dispatch decision.

use super::{Edge, Effect};
use crate::clock::Now;
use serde::Serialize;
use shared::contract::ApiError;
use tracing::info;

/// The answer of `POST /agents/{id}/pause` and `/resume`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentControl {
    pub agent_id: String,
    pub paused: bool,
    pub connected: bool,
    pub running_jobs: usize,
}

impl Edge {
    /// Pauses (`pause`) or resumes an agent of the pool, within the event of its request.
    /// A resumed agent is sent queued work at once.
    pub fn pause(&mut self, now: impl Into<Now>, agent_id: &str, pause: bool) -> Result<(AgentControl, Vec<Effect>), ApiError> {
        let now = now.into();
        if self.cfg.agents.get(agent_id).is_none() {
            let shown = shared::text::truncate(agent_id, 64);
            return Err(ApiError::new(
                shared::contract::ErrorCode::NotFound,
                format!("agent `{shown}` is not one of this pool's agents (AGENT_PUBLIC_KEYS): name one that GET /health lists"),
            ));
        }
        let mut effects = Vec::new();
        // Noted for the undo, as every change of alerting's memory is: a pause whose write
        // fails is answered "nothing was done", so nothing must be — kept in memory, it held
        // the agent back from its next hello and was stored with the next save.
        let before = self.alerts.clone();
        let changed = if pause { self.alerts.paused.insert(agent_id.to_string()) } else { self.alerts.paused.remove(agent_id) };
        if changed {
            self.note_alerts(before);
            effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
        }
        let sessions: Vec<String> = self.ready().filter(|(_, a)| a.agent_id == agent_id).map(|(id, _)| id.clone()).collect();
        for id in &sessions {
            let session = self.session_mut(id).expect("ready sessions exist");
            session.agent_mut().expect("ready session").paused = pause;
            effects.push(self.save_session(id));
        }
        info!(agent_id, paused = pause, connected = !sessions.is_empty(), "agent {}", if pause { "paused" } else { "resumed" });
        // A pause ends the queued `/execute` jobs only paused agents fit (their callers fall
        // back, as a new one is refused); a resume sends what waits.
        match pause {
            true => self.end_held_back_waits(now, &mut effects),
            false => self.dispatch(now, &mut effects),
        }
        let running_jobs = self.active.iter().filter(|id| self.jobs[*id].agent_id.as_deref() == Some(agent_id)).count();
        Ok((AgentControl { agent_id: agent_id.to_string(), paused: pause, connected: !sessions.is_empty(), running_jobs }, effects))
    }
}
