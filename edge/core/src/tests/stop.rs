//! A clean stop: no caller is told to fall back while its job will still run, and a job
//! whose caller was told to fall back never starts, not even after the restart.

use super::*;
use crate::record::Job;
use std::collections::HashMap;

fn keep(stored: &mut HashMap<String, Job>, effects: &[Effect]) {
    for e in effects {
        if let Effect::Save(job) = e {
            stored.insert(job.id.clone(), (**job).clone());
        }
    }
}

/// A job its agent runs on a ready edge: the edge, the agent's session, the job records
/// stored so far, the job's id.
fn a_running_job() -> (Edge, String, HashMap<String, Job>, String) {
    let (mut edge, sid) = ready_edge();
    let mut stored = HashMap::new();
    keep(&mut stored, &call(&mut edge, 0, "POST", "/jobs", json!({"prompt": "long", "timeout_ms": 600000})).effects);
    let job_id = stored.keys().next().unwrap().clone();
    keep(&mut stored, &say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: job_id.clone() }));
    (edge, sid, stored, job_id)
}

/// The edge is brought back at `back` by `restart` (`Edge::restore` after a clean stop,
/// `Edge::restart` after a kill) from what was `stored` while it ran `job_id`, its agent
/// away: the job waits `LOST_AFTER_MS` for its agent from `back`, that wait stored before
/// anything is served. Its agent takes it back within that time; without it, the job is
/// lost when the time is up.
fn waits_for_its_agent_again(restart: impl Fn(Vec<Job>, u64) -> (Edge, Vec<Effect>), back: u64, mut stored: HashMap<String, Job>, job_id: &str) {
    let (mut edge, effects) = restart(stored.clone().into_values().collect(), back);
    keep(&mut stored, &effects);
    assert!(finished(&effects).is_empty());
    let effects = edge.tick(back);
    assert!(finished(&effects).is_empty(), "lost before its agent could come back: {effects:?}");
    assert_eq!(stored[job_id].orphaned_at, Some(back), "the new wait is stored before anything is served");
    let (_, effects) = join(&mut edge, back + LOST - 1, "spark", &agent_key(1), vec![job_id.to_string()], 2);
    assert!(finished(&effects).is_empty());
    assert_eq!(edge.job(job_id).unwrap().state, JobState::Running, "its agent took it back");

    // An agent that does not come back loses the job LOST_AFTER_MS after the restart.
    let (mut edge, _) = restart(stored.into_values().collect(), back);
    assert!(finished(&edge.tick(back + LOST - 1)).is_empty());
    let done = finished(&edge.tick(back + LOST));
    assert_eq!((done.len(), done[0].2["error_code"].as_str()), (1, Some("RUNNER_LOST")));
}

#[test]
fn a_clean_stop_tells_each_caller_the_truth() {
    let (mut edge, sid) = ready_edge();
    let mut stored = HashMap::new();
    // Running: its caller must be told where to follow it.
    let running = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "long", "timeout_ms": 60000}));
    keep(&mut stored, &running.effects);
    let running_id = order_of(&running.effects, &sid, "spark", 0).header.job_id;
    keep(&mut stored, &say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: running_id.clone() }));
    // Queued behind it: its caller falls back, so it must never start.
    let queued = call(&mut edge, 2, "POST", "/execute", json!({"prompt": "next", "timeout_ms": 60000}));
    keep(&mut stored, &queued.effects);
    // A detached job, and an /execute caller waiting on it through its idempotency key.
    let detached = call(&mut edge, 3, "POST", "/jobs", json!({"prompt": "later", "idempotency_key": "k"}));
    keep(&mut stored, &detached.effects);
    let (_, accepted) = answer_to(&detached.effects, detached.caller).unwrap();
    let detached_id = accepted["job_id"].as_str().unwrap().to_string();
    let rejoined = call(&mut edge, 4, "POST", "/execute", json!({"prompt": "later", "idempotency_key": "k"}));
    // A follower of the running job.
    let follower = call(&mut edge, 5, "GET", &format!("/jobs/{running_id}/events"), Value::Null);

    let effects = edge.shutdown(10);
    keep(&mut stored, &effects);

    let (status, body) = answer_to(&effects, queued.caller).unwrap();
    assert_eq!((status, body["error_code"].as_str(), body["fallback"].as_bool()), (503, Some("RUNNER_OFFLINE"), Some(true)), "{body}");
    assert!(body["error"].as_str().unwrap().contains("will not run"), "{body}");
    let queued_id = body["job_id"].as_str().unwrap().to_string();
    assert_eq!(stored[&queued_id].state, JobState::Failed, "ended, durably, before the answer");

    for (caller, job) in [(running.caller, &running_id), (rejoined.caller, &detached_id)] {
        let (status, body) = answer_to(&effects, caller).unwrap();
        assert_eq!((status, body["error_code"].as_str()), (503, Some("EDGE_RESTARTING")), "{body}");
        assert!(body.get("fallback").is_none(), "no fallback while the job goes on: {body}");
        assert_eq!(body["job_id"], job.as_str());
        assert!(body["error"].as_str().unwrap().contains(&format!("GET /jobs/{job}")), "{body}");
    }
    let (chunks, ended) = streamed(&effects, follower.caller);
    assert!(ended && chunks.last().unwrap().contains(&format!("/jobs/{running_id}/events")), "{chunks:?}");
    assert_eq!(closed(&effects).unwrap().0, close::SHUTTING_DOWN);
    assert_eq!(edge.callers_waiting(), 0);
    // No new work while stopping.
    let late = call(&mut edge, 11, "POST", "/jobs", json!({"prompt": "too late"}));
    assert_eq!(answer_to(&late.effects, late.caller).unwrap().0, 503);

    // After the restart the agent comes back: the running job goes on, the detached one
    // is sent, the one whose caller fell back is not.
    let (mut edge, effects) = Edge::restore(config(), stored.into_values().collect(), vec![], None, 1_000);
    assert!(finished(&effects).is_empty(), "nothing left to end: {effects:?}");
    let (sid2, _) = join(&mut edge, 1_001, "spark", &agent_key(1), vec![running_id.clone()], 2);
    let effects = say(&mut edge, 1_002, &sid2, credit(0, 0));
    assert!(sent(&effects, &sid2).is_empty(), "the one slot is busy with the running job");
    let effects = report(&mut edge, 1_003, &sid2, &running_id, ok_result());
    assert_eq!(finished(&effects)[0].0, running_id);
    let effects = say(&mut edge, 1_004, &sid2, credit(1, 0));
    assert_eq!(order_of(&effects, &sid2, "spark", 1_004).header.job_id, detached_id);
    assert_eq!(edge.job(&queued_id).unwrap().state, JobState::Failed);
}

#[test]
fn a_restart_ends_queued_execute_jobs_whose_callers_are_gone() {
    // The edge died without a clean stop: its /execute callers saw their connections
    // drop and may have run the task elsewhere.
    let mut edge = Edge::new(config(), 0);
    let mut stored = HashMap::new();
    join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    keep(&mut stored, &call(&mut edge, 0, "POST", "/execute", json!({"prompt": "x"})).effects);
    keep(&mut stored, &call(&mut edge, 0, "POST", "/jobs", json!({"prompt": "y"})).effects);

    let (mut edge, effects) = Edge::restore(config(), stored.into_values().collect(), vec![], None, 100);
    let ended = finished(&effects);
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].2["error_code"], "RUNNER_OFFLINE");
    let (sid, _) = join(&mut edge, 101, "spark", &agent_key(1), vec![], 1);
    let effects = say(&mut edge, 102, &sid, credit(1, 0));
    let order = order_of(&effects, &sid, "spark", 102);
    assert_eq!(edge.job(&order.header.job_id).unwrap().mode, Mode::Detached, "only the detached job is sent");
    assert_eq!(edge.queued(), 0);
}

#[test]
fn a_stop_whose_writes_fail_tells_every_caller_to_follow_its_job() {
    let (mut edge, sid) = ready_edge();
    let running = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "a", "timeout_ms": 60000}));
    assert!(!sent(&running.effects, &sid).is_empty());
    let queued = call(&mut edge, 1, "POST", "/execute", json!({"prompt": "b", "timeout_ms": 60000}));
    let _ = edge.shutdown(2);
    // The queued job's end could not be stored: it is still queued on disk, so its caller
    // must not be told to fall back.
    let effects = edge.store_failed(2, "database is locked");
    for caller in [running.caller, queued.caller] {
        let (status, body) = answer_to(&effects, caller).unwrap();
        assert_eq!((status, body["error_code"].as_str()), (503, Some("EDGE_RESTARTING")), "{body}");
    }
    assert_eq!(closed(&effects).unwrap().0, close::SHUTTING_DOWN);
}

/// The edge stays down longer than `LOST_AFTER_MS` after a clean stop (an upgrade, a
/// reboot of its host). Its agent could not come back to an edge that was not there, so a
/// job the agent runs is not lost at the restart: the wait for the agent starts when the
/// edge is back. (It was lost by the first tick, before any agent could reconnect: the
/// clean stop had stored when it closed the agent's connection, and the restore kept that
/// time. A crash, which stores nothing, did not lose it.)
#[test]
fn a_job_running_across_a_long_edge_stop_waits_for_its_agent_again() {
    let (mut edge, _, mut stored, job_id) = a_running_job();
    keep(&mut stored, &edge.shutdown(10));
    assert_eq!(stored[&job_id].orphaned_at, None, "the stop did not start the wait for the agent");

    waits_for_its_agent_again(|jobs, at| Edge::restore(config(), jobs, vec![], None, at), 10 + 3 * LOST, stored, &job_id);
}

/// The same when the agent was already away as the edge stopped: it could not come back
/// while the edge was down either, so its wait starts again at the restart rather than
/// running out during the edge's own downtime.
#[test]
fn a_job_whose_agent_was_away_when_the_edge_stopped_waits_for_it_again() {
    let (mut edge, sid, mut stored, _) = a_running_job();
    keep(&mut stored, &edge.disconnect(100, &sid));
    keep(&mut stored, &edge.shutdown(100 + LOST / 2));

    let back = 100 + 3 * LOST;
    let (mut edge, effects) = Edge::restore(config(), stored.into_values().collect(), vec![], None, back);
    assert!(finished(&effects).is_empty());
    assert!(finished(&edge.tick(back + LOST - 1)).is_empty(), "lost before its agent could come back");
    let done = finished(&edge.tick(back + LOST));
    assert_eq!((done.len(), done[0].2["error_code"].as_str()), (1, Some("RUNNER_LOST")));
}

/// The edge is killed (or loses power) while an agent is away, and stays down longer than
/// `LOST_AFTER_MS`: no agent could come back to it meanwhile, so at the restart the job
/// waits for its agent again, as after a clean stop (rev8: the kill stored nothing, so the
/// job kept the time its agent went, and the first tick after the restart ended it
/// `RUNNER_LOST`, `fallback: true`, while its agent still ran it).
#[test]
fn a_job_whose_agent_was_away_when_the_edge_was_killed_waits_for_it_again() {
    let (mut edge, sid, mut stored, job_id) = a_running_job();
    keep(&mut stored, &edge.disconnect(1_000, &sid));
    assert_eq!(stored[&job_id].orphaned_at, Some(1_000), "the wait for the agent is stored");
    // Killed: nothing more is stored.
    drop(edge);

    waits_for_its_agent_again(|jobs, at| Edge::restart(config(), jobs, None, at), 2_000 + LOST + 1_000, stored, &job_id);
}

/// The Durable Object is evicted when idle and rebuilt at its next event, an agent coming
/// back among them: its rebuild is not downtime, so a job's wait goes on from when its
/// agent went. (Restarted at each rebuild, it would never end: every alarm rebuilds it.)
#[test]
fn a_rebuild_of_an_edge_that_was_up_keeps_each_jobs_wait() {
    let (mut edge, sid, mut stored, _) = a_running_job();
    keep(&mut stored, &edge.disconnect(1_000, &sid));
    let mut at = 1_000;
    for _ in 0..3 {
        at += LOST / 4;
        let (mut rebuilt, effects) = Edge::restore(config(), stored.clone().into_values().collect(), vec![], None, at);
        keep(&mut stored, &effects);
        assert!(finished(&rebuilt.tick(at)).is_empty());
    }
    let (mut edge, _) = Edge::restore(config(), stored.into_values().collect(), vec![], None, at);
    let done = finished(&edge.tick(1_000 + LOST));
    assert_eq!((done.len(), done[0].2["error_code"].as_str()), (1, Some("RUNNER_LOST")), "lost LOST_AFTER_MS after its agent went");
}
