//! Repeats of an idempotency key whose job ended without ever running (review rev36a, 1
//! and 2): a repeat makes a new job in its place — never when the job may have run — and
//! a `POST /jobs` repeating a waiting `/execute`'s key keeps that job through its
//! `/execute` caller's hang-up and a restart.

use super::*;
use crate::record::Job;
use std::collections::HashMap;

/// The records the host stored, by id (each `Save` replaces the one before).
#[derive(Default)]
struct Stored(HashMap<String, Job>);

impl Stored {
    fn keep(&mut self, effects: &[Effect]) {
        for e in effects {
            if let Effect::Save(job) = e {
                self.0.insert(job.id.clone(), (**job).clone());
            }
        }
    }

    fn all(&self) -> Vec<Job> {
        self.0.values().cloned().collect()
    }
}

fn execute(key: &str) -> Value {
    json!({"prompt": "task", "timeout_ms": 60000, "idempotency_key": key})
}

/// The id of the job a request's event saved first.
fn saved(effects: &[Effect]) -> String {
    effects.iter().find_map(|e| if let Effect::Save(j) = e { Some(j.id.clone()) } else { None }).expect("a job was saved")
}

/// An `/execute` repeating the key of `old`, which never ran: a new job, waited on — not
/// `old`'s stored answer (read from storage: `Deliver`), nor any answer yet.
fn makes_a_new_job(edge: &mut Edge, now: u64, key: &str, old: &str, stored: &mut Stored) -> String {
    let repeat = call(edge, now, "POST", "/execute", execute(key));
    stored.keep(&repeat.effects);
    assert!(!repeat.effects.iter().any(|e| matches!(e, Effect::Deliver { .. })), "the stale answer was given again: {:?}", repeat.effects);
    assert!(answer_to(&repeat.effects, repeat.caller).is_none(), "{:?}", repeat.effects);
    let new = saved(&repeat.effects);
    assert_ne!(new, old);
    assert_eq!(edge.job(old).unwrap().state, JobState::Failed, "the old record stays readable by its id");
    assert_eq!(edge.job(&new).unwrap().idempotency_key.as_deref(), Some(key));
    // The key names the new job now.
    assert_eq!(repeated(edge, now, key), (200, new.clone()));
    new
}

/// A `POST /jobs` repeating `key`: its status and the job it names.
fn repeated(edge: &mut Edge, now: u64, key: &str) -> (u16, String) {
    let repeat = call(edge, now, "POST", "/jobs", execute(key));
    let (status, body) = answer_to(&repeat.effects, repeat.caller).expect("answered at once");
    (status, body["job_id"].as_str().unwrap().to_string())
}

/// An `/execute` repeating the key of `old`, which may have run: `old`'s stored answer.
fn answers_as_before(edge: &mut Edge, now: u64, key: &str, old: &str) {
    let repeat = call(edge, now, "POST", "/execute", execute(key));
    let deliver = repeat.effects.iter().any(|e| matches!(e, Effect::Deliver { job_id, .. } if job_id == old));
    assert!(deliver, "{:?}", repeat.effects);
}

/// A busy agent (its one slot taken by a `POST /jobs` job), and an `/execute` with `key`
/// queued behind it, waiting.
fn queued_behind_busy(key: &str, stored: &mut Stored) -> (Edge, String, http::Handled) {
    let (mut edge, sid) = ready_edge();
    let busy = edge.submit(0, "busy".into(), submission("busy", 600_000, None), Mode::Detached).unwrap();
    stored.keep(&busy.effects);
    let waiting = call(&mut edge, 1, "POST", "/execute", execute(key));
    stored.keep(&waiting.effects);
    assert!(answer_to(&waiting.effects, waiting.caller).is_none(), "queued: it waits");
    (edge, sid, waiting)
}

/// rev36a, 1 (`stale503.py`, `idem_hangup.py` order A): a queued `/execute` ended unstarted
/// — its caller hung up, or its agents left — answered every repeat of its key with the
/// stored 503 for `JOB_RETENTION_MS`, with an agent back and free.
#[test]
fn a_repeat_of_the_key_of_a_job_that_never_ran_makes_a_new_job() {
    // Its caller hung up.
    let mut stored = Stored::default();
    let (mut edge, sid, waiting) = queued_behind_busy("ka", &mut stored);
    let old = saved(&waiting.effects);
    let done = finished(&edge.caller_gone(2, waiting.caller));
    assert_eq!((done[0].0.as_str(), done[0].2["error_code"].as_str()), (old.as_str(), Some("RUNNER_OFFLINE")));
    report(&mut edge, 3, &sid, "busy", ok_result());
    say(&mut edge, 3, &sid, credit(1, 1));
    let new = makes_a_new_job(&mut edge, 4, "ka", &old, &mut stored);
    assert_eq!(edge.job(&new).unwrap().state, JobState::Dispatched, "sent to the free agent");

    // Its agents left while it was queued.
    let mut stored = Stored::default();
    let (mut edge, sid, waiting) = queued_behind_busy("kd", &mut stored);
    let old = saved(&waiting.effects);
    edge.disconnect(2, &sid);
    let effects = edge.tick(2 + LOST);
    let (status, answer) = answer_to(&effects, waiting.caller).expect("told to fall back");
    assert_eq!((status, answer["error_code"].as_str()), (503, Some("RUNNER_OFFLINE")));
    join(&mut edge, 3 + LOST, "spark", &agent_key(1), vec!["busy".into()], 2);
    makes_a_new_job(&mut edge, 4 + LOST, "kd", &old, &mut stored);
}

/// rev36a, 1 (`crash_idem.py`): a queued `/execute` the restore after a crash ended (its
/// caller gone with the edge) answered every repeat "the edge restarted before the job
/// started … submit it again". One that had been sent may have been started by its agent
/// before the crash (its `Started` lost with it): it keeps its key and its answer, which
/// says to send a new key.
#[test]
fn a_repeat_after_a_restart_makes_a_new_job_only_for_one_never_sent() {
    let mut stored = Stored::default();
    let (mut edge, sid) = ready_edge();
    let sent = call(&mut edge, 0, "POST", "/execute", execute("ks"));
    stored.keep(&sent.effects);
    let sent = order_of(&sent.effects, &sid, "spark", 0).header.job_id;
    let queued = call(&mut edge, 1, "POST", "/execute", execute("kq"));
    stored.keep(&queued.effects);
    let queued = saved(&queued.effects);
    drop(edge);

    let (mut edge, effects) = Edge::restart(config(), stored.all(), None, 1_000);
    stored.keep(&effects);
    let ended = finished(&effects);
    assert_eq!(ended.len(), 2, "{ended:?}");
    let said = |id: &str| ended.iter().find(|(j, ..)| j == id).unwrap().2["error"].as_str().unwrap().to_string();
    assert!(said(&sent).contains("new idempotency key"), "{}", said(&sent));
    let (sid, _) = join(&mut edge, 1_001, "spark", &agent_key(1), vec![], 2);
    say(&mut edge, 1_001, &sid, credit(1, 0));
    let new = makes_a_new_job(&mut edge, 1_002, "kq", &queued, &mut stored);
    answers_as_before(&mut edge, 1_003, "ks", &sent);

    // Restored again, the old and the new record of "kq" made in the same millisecond:
    // the key names the new one, whichever comes back first (a restore takes records of
    // one millisecond in the order of their ids).
    for (old_id, new_id) in [("a-old", "z-new"), ("z-old", "a-new")] {
        let mut jobs: Vec<Job> = stored.all().into_iter().filter(|j| j.id == queued || j.id == new).collect();
        for job in &mut jobs {
            job.created_at = 0;
            job.id = if job.id == queued { old_id.into() } else { new_id.into() };
        }
        let (mut edge, _) = Edge::restore(config(), jobs, vec![], None, 1_004);
        assert_eq!(repeated(&mut edge, 1_004, "kq"), (200, new_id.to_string()));
    }
}

/// A job sent whose agent never received it, its `/execute` caller gone, ends unstarted
/// and is taken back: it never ran, so a repeat makes a new job. One that may have run —
/// lost with its agent — and one its caller cancelled keep their keys and answers.
#[test]
fn only_a_job_that_can_never_have_run_gives_up_its_key() {
    let mut stored = Stored::default();
    let (mut edge, sid) = ready_edge();
    let gone = call(&mut edge, 0, "POST", "/execute", execute("kg"));
    let old = order_of(&gone.effects, &sid, "spark", 0).header.job_id;
    edge.caller_gone(1, gone.caller);
    edge.disconnect(2, &sid);
    let (sid, effects) = join(&mut edge, 3, "spark", &agent_key(1), vec![], 2);
    assert_eq!(finished(&effects)[0].0, old, "it never reached its agent: ended, not sent again");
    say(&mut edge, 3, &sid, credit(1, 0));
    let new = makes_a_new_job(&mut edge, 4, "kg", &old, &mut stored);

    // Accepted, then its agent went for good: it may have run.
    say(&mut edge, 5, &sid, AgentMessage::Accepted { job_id: new.clone() });
    start(&mut edge, 5, &sid, &new);
    edge.disconnect(6, &sid);
    let done = finished(&edge.tick(6 + LOST));
    assert_eq!((done[0].0.as_str(), done[0].2["error_code"].as_str()), (new.as_str(), Some("RUNNER_LOST")));
    answers_as_before(&mut edge, 7 + LOST, "kg", &new);

    // Cancelled by its caller before it started: the cancel stands.
    let (status, cancelled) = repeated(&mut edge, 8 + LOST, "kc");
    assert_eq!(status, 202);
    edge.cancel(9 + LOST, &cancelled).unwrap();
    assert_eq!(repeated(&mut edge, 10 + LOST, "kc"), (200, cancelled));
}

/// rev36a, 2 (`idem_hangup.py` order B): a `POST /jobs` repeating a waiting `/execute`'s key
/// was told "queued", then the job ended when the `/execute` caller hung up ("its caller
/// hung up … submit it again"), though the `/jobs` caller never hung up. It is kept as a
/// `POST /jobs` job from that repeat on — through the hang-up and a restart.
#[test]
fn a_jobs_repeat_of_a_waiting_execute_keeps_it_through_the_hang_up_and_a_restart() {
    let mut stored = Stored::default();
    let (mut edge, sid, waiting) = queued_behind_busy("kb", &mut stored);
    let id = saved(&waiting.effects);
    let repeat = call(&mut edge, 2, "POST", "/jobs", execute("kb"));
    stored.keep(&repeat.effects);
    let (status, accepted) = answer_to(&repeat.effects, repeat.caller).unwrap();
    assert_eq!((status, accepted["job_id"].as_str(), accepted["state"].as_str()), (200, Some(id.as_str()), Some("queued")));
    assert!(stored.0[&id].kept, "stored kept, in the repeat's event");
    let effects = edge.caller_gone(3, waiting.caller);
    assert!(finished(&effects).is_empty(), "{effects:?}");
    assert_eq!(edge.job(&id).unwrap().state, JobState::Queued);

    // The edge restarts with it queued, its /execute caller gone: it stays queued.
    let (mut edge, effects) = Edge::restart(config(), stored.all(), None, 1_000);
    assert!(finished(&effects).is_empty(), "{effects:?}");
    assert_eq!(edge.job(&id).unwrap().state, JobState::Queued);
    drop(sid);
    let (sid, _) = join_with(&mut edge, 1_001, "spark", &agent_key(1), vec!["busy".into()], 2, 2);
    say(&mut edge, 1_001, &sid, credit(1, 0));
    assert_eq!(edge.job(&id).unwrap().state, JobState::Dispatched, "sent when the agent has a slot");

    // A clean stop does not end it either.
    let (mut edge, _, waiting) = queued_behind_busy("kb2", &mut Stored::default());
    let id = saved(&waiting.effects);
    assert_eq!(repeated(&mut edge, 2, "kb2"), (200, id.clone()));
    let effects = edge.shutdown(3);
    assert!(!finished(&effects).iter().any(|(j, ..)| *j == id), "{effects:?}");
}

/// Queued behind the busy job: an `/execute` (`timeout_ms`), kept by a `POST /jobs`
/// repeating its key, and a plain `POST /jobs` job beside it. Their ids and the waiter.
fn kept_beside_plain(key: &str, timeout_ms: u64) -> (Edge, String, http::Handled, String, String) {
    let mut stored = Stored::default();
    let (mut edge, sid) = ready_edge();
    let busy = edge.submit(0, "busy".into(), submission("busy", 600_000, None), Mode::Detached).unwrap();
    stored.keep(&busy.effects);
    let body = json!({"prompt": "task", "timeout_ms": timeout_ms, "idempotency_key": key});
    let waiting = call(&mut edge, 1, "POST", "/execute", body.clone());
    assert!(answer_to(&waiting.effects, waiting.caller).is_none(), "queued: it waits");
    let kept = saved(&waiting.effects);
    let repeat = call(&mut edge, 1, "POST", "/jobs", body);
    assert_eq!(saved(&repeat.effects), kept);
    assert!(edge.job(&kept).unwrap().kept);
    let plain = call(&mut edge, 1, "POST", "/jobs", json!({"prompt": "other", "timeout_ms": timeout_ms}));
    let plain = saved(&plain.effects);
    (edge, sid, waiting, kept, plain)
}

/// rev38, 3: a kept `/execute` (a `POST /jobs` repeated its key, its `/execute` caller then
/// gone) was still ended by the `/execute`-only rules: with its agents gone for
/// `LOST_AFTER_MS` it ended `RUNNER_OFFLINE`, while a `POST /jobs` job queued beside it
/// waited on (`QUEUE_TTL_MS`). The reviewer's attack, kept as the regression test.
#[test]
fn a_kept_execute_waits_on_as_a_jobs_job_when_its_agents_leave() {
    let (mut edge, sid, waiting, id, plain) = kept_beside_plain("kr", 60_000);
    edge.caller_gone(3, waiting.caller);
    edge.disconnect(4, &sid);
    let effects = edge.tick(4 + LOST + 1);
    assert!(finished(&effects).is_empty(), "{effects:?}");
    assert_eq!(edge.job(&id).unwrap().state, edge.job(&plain).unwrap().state, "the kept job is not kept as a POST /jobs job is");
    assert_eq!(edge.job(&id).unwrap().state, JobState::Queued);
}

/// Every other `/execute`-only rule lets go of a kept job as well (one predicate,
/// `Job::waited_only`): its wait in the queue is `QUEUE_TTL_MS`, not its own (shorter)
/// timeout, and a pause of every agent that fits it does not end it — it ends exactly
/// when the `POST /jobs` job beside it does.
#[test]
fn a_kept_execute_is_a_jobs_job_for_its_wait_and_a_pause() {
    // Its own timeout (10 s) is shorter than QUEUE_TTL_MS (30 s).
    let (mut edge, _sid, waiting, id, plain) = kept_beside_plain("kt", 10_000);
    edge.caller_gone(2, waiting.caller);
    let effects = edge.tick(1 + 10_000 + 1);
    assert!(finished(&effects).is_empty(), "ended at its own timeout: {effects:?}");
    let effects = edge.tick(1 + 30_000);
    let ended: Vec<String> = finished(&effects).into_iter().map(|(j, ..)| j).collect();
    assert_eq!(ended, [id, plain], "both end at QUEUE_TTL_MS, in their order");

    // The agent paused: an /execute falls back at once, a POST /jobs job waits.
    let (mut edge, _sid, waiting, id, plain) = kept_beside_plain("kp", 60_000);
    edge.caller_gone(2, waiting.caller);
    let paused = call(&mut edge, 3, "POST", "/agents/spark/pause", Value::Null);
    assert!(finished(&paused.effects).is_empty(), "{:?}", paused.effects);
    assert_eq!((edge.job(&id).unwrap().state, edge.job(&plain).unwrap().state), (JobState::Queued, JobState::Queued));
}

/// The `/execute` caller still waiting on a kept job is not given the `/execute` fallback
/// (a 503 that says to run the task elsewhere) while the job stays queued for the
/// `POST /jobs` caller — the task would run twice —: it waits on with the job, and is
/// answered its end (or hangs up; the job goes on).
#[test]
fn the_waiter_of_a_kept_execute_waits_with_it() {
    let (mut edge, sid, waiting, id, _plain) = kept_beside_plain("kw", 60_000);
    edge.disconnect(3, &sid);
    let effects = edge.tick(3 + LOST + 1);
    assert!(answer_to(&effects, waiting.caller).is_none(), "{effects:?}");
    assert_eq!(edge.job(&id).unwrap().state, JobState::Queued);
    let effects = edge.tick(1 + 30_000);
    let (status, body) = answer_to(&effects, waiting.caller).expect("answered its job's end");
    assert_eq!((status, body["job_id"].as_str(), body["error_code"].as_str()), (200, Some(id.as_str()), Some("TIMEOUT")), "{body}");
}
