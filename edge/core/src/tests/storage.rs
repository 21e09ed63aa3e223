//! Failed store writes: the host stores an event's writes first and, when that fails,
//! carries out nothing else of the event and asks the machine what to do instead.

use super::*;
use crate::record::Job;
use crate::split_writes;
use std::collections::HashMap;

/// A host as both real ones are: writes first, in one go; the rest only if they were
/// stored. Its store can be made to fail.
struct Host {
    edge: Edge,
    stored: HashMap<String, Job>,
    /// Alerting's memory as last stored.
    memory: Option<crate::notify::AlertState>,
    failing: bool,
}

impl Host {
    fn new(edge: Edge) -> Host {
        Host { edge, stored: HashMap::new(), memory: None, failing: false }
    }

    /// Carries out one event's effects; returns what went out (sends, answers, closes…).
    fn carry_out(&mut self, now: u64, effects: Vec<Effect>) -> Vec<Effect> {
        let (writes, rest) = split_writes(effects);
        if self.failing && !writes.is_empty() {
            let instead = self.edge.store_failed(now, "disk I/O error");
            assert!(instead.iter().all(|e| !e.is_write()), "a failure's answer holds no writes: {instead:?}");
            return instead;
        }
        for job in writes.saves {
            self.stored.insert(job.id.clone(), std::sync::Arc::unwrap_or_clone(job));
        }
        for id in writes.forgets {
            self.stored.remove(&id);
        }
        if let Some(memory) = writes.alerts {
            self.memory = Some(memory);
        }
        rest
    }

    fn say(&mut self, now: u64, sid: &str, msg: AgentMessage) -> Vec<Effect> {
        let effects = self.edge.message(now, sid, &msg.to_text());
        self.carry_out(now, effects)
    }

    fn call(&mut self, now: u64, method: &str, path: &str, body: Value) -> (CallerId, Vec<Effect>) {
        let handled = call(&mut self.edge, now, method, path, body);
        (handled.caller, self.carry_out(now, handled.effects))
    }

    fn tick(&mut self, now: u64) -> Vec<Effect> {
        let effects = self.edge.tick(now);
        self.carry_out(now, effects)
    }
}

fn ready_host() -> (Host, String) {
    let (edge, sid) = ready_edge();
    (Host::new(edge), sid)
}

#[test]
fn a_submission_that_cannot_be_stored_is_refused_and_does_not_exist() {
    let (mut host, sid) = ready_host();
    host.failing = true;
    let body = json!({"prompt": "x", "idempotency_key": "k1"});
    let (caller, out) = host.call(0, "POST", "/execute", body.clone());
    let (status, answer) = answer_to(&out, caller).expect("the caller is answered at once");
    assert_eq!(status, 500, "{answer}");
    assert_eq!(answer["error_code"], "INTERNAL_ERROR");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("nothing was done") && error.contains("run the task elsewhere"), "{error}");
    // The order that was to go out in the same event did not, and nothing else did either.
    assert_eq!(out.len(), 1, "only the refusal goes out: {out:?}");
    assert!(host.stored.is_empty());
    assert_eq!(host.edge.queued() + host.edge.active_jobs(), 0, "the job does not exist");
    assert_eq!(host.edge.stats().submitted, 0);
    assert_eq!(host.edge.stats().store_failures, 1);

    // Once storage works, the same task (same idempotency key) runs, on the credit the
    // failed event had taken.
    host.failing = false;
    let (caller, out) = host.call(1, "POST", "/execute", body);
    assert!(answer_to(&out, caller).is_none(), "it waits for its job");
    let order = order_of(&out, &sid, "spark", 1);
    assert_eq!(host.stored.len(), 1);
    assert!(host.stored.contains_key(&order.header.job_id));
}

#[test]
fn a_detached_submission_that_cannot_be_stored_is_refused_too() {
    let mut host = Host::new(Edge::new(config(), 0));
    host.failing = true;
    let (caller, out) = host.call(0, "POST", "/jobs", json!({"prompt": "x"}));
    assert_eq!(answer_to(&out, caller).unwrap().0, 500);
    assert_eq!(host.edge.queued(), 0);
}

#[test]
fn a_result_that_cannot_be_stored_is_not_acknowledged_and_comes_again() {
    let (mut host, sid) = ready_host();
    let (waiter, out) = host.call(0, "POST", "/execute", json!({"prompt": "x", "timeout_ms": 60000}));
    let job_id = order_of(&out, &sid, "spark", 0).header.job_id;
    host.say(1, &sid, AgentMessage::Accepted { job_id: job_id.clone() });

    host.failing = true;
    let done = result_msg(&host.edge, &job_id, ok_result());
    let out = host.say(2, &sid, done);
    // No acknowledgement (the agent keeps its spooled result), no answer to the caller,
    // and the connection is closed so the agent reconnects and sends it again.
    assert!(!sent(&out, &sid).iter().any(|m| matches!(m, EdgeMessage::ResultAck { .. })), "{out:?}");
    assert!(answer_to(&out, waiter).is_none());
    let (code, reason) = closed(&out).expect("the session is closed");
    assert_eq!(code, close::INTERNAL_ERROR);
    assert!(reason.contains("reconnect"), "{reason}");
    assert_eq!(host.edge.job(&job_id).unwrap().state, JobState::Running, "the job did not end");
    assert_eq!(host.stored[&job_id].state, JobState::Running);

    // The agent comes back with the result in its spool and sends it again.
    host.failing = false;
    let (sid2, out) = join(&mut host.edge, 3, "spark", &agent_key(1), vec![job_id.clone()], 2);
    let out = host.carry_out(3, out);
    assert!(closed(&out).is_none());
    assert_eq!(host.edge.job(&job_id).unwrap().session_id.as_deref(), Some(sid2.as_str()), "taken over: {out:?}");
    let done = result_msg(&host.edge, &job_id, ok_result());
    let out = host.say(4, &sid2, done);
    assert!(sent(&out, &sid2).iter().any(|m| matches!(m, EdgeMessage::ResultAck { .. })));
    let (status, answer) = answer_to(&out, waiter).expect("the caller gets the result");
    assert_eq!((status, answer["output"].as_str()), (200, Some("done")));
    assert_eq!(host.stored[&job_id].state, JobState::Succeeded);
}

#[test]
fn a_hello_that_cannot_be_stored_closes_the_connection() {
    let (mut host, sid) = ready_host();
    let (_, out) = host.call(0, "POST", "/execute", json!({"prompt": "x", "timeout_ms": 60000}));
    let job_id = order_of(&out, &sid, "spark", 0).header.job_id;
    host.edge.disconnect(1, &sid);
    host.failing = true;
    // Taking the job over is a write: the welcome must not go out without it.
    let (sid2, effects) = join(&mut host.edge, 2, "spark", &agent_key(1), vec![job_id.clone()], 2);
    let out = host.carry_out(2, effects);
    assert!(!sent(&out, &sid2).iter().any(|m| matches!(m, EdgeMessage::Welcome { .. })), "{out:?}");
    assert_eq!(closed(&out).unwrap().0, close::INTERNAL_ERROR);
    assert!(!host.edge.is_online());
    assert!(host.edge.job(&job_id).unwrap().orphaned_at.is_some(), "still waiting for its agent");
}

#[test]
fn a_tick_that_cannot_be_stored_announces_nothing_and_is_tried_again() {
    let (mut host, sid) = ready_host();
    let (waiter, out) = host.call(0, "POST", "/execute", json!({"prompt": "x", "timeout_ms": 2000}));
    let job_id = order_of(&out, &sid, "spark", 0).header.job_id;
    for t in [900, 1_800, 2_700] {
        let hb = signed(&host.edge, &sid, beat(&[&job_id], 0, 1));
        host.say(t, &sid, hb);
    }
    host.failing = true;
    let out = host.tick(3_000);
    assert!(out.is_empty(), "nothing goes out: {out:?}");
    assert_eq!(host.edge.job(&job_id).unwrap().state, JobState::Running);
    assert_eq!(host.edge.next_deadline(), Some(3_000 + crate::machine::STORE_RETRY_MS), "tried again a second later");

    host.failing = false;
    let out = host.tick(4_000);
    let (status, answer) = answer_to(&out, waiter).expect("the timeout is announced once stored");
    assert_eq!((status, answer["error_code"].as_str()), (200, Some("TIMEOUT")));
    assert!(sent(&out, &sid).iter().any(|m| matches!(m, EdgeMessage::Cancel { .. })));
    assert_eq!(host.stored[&job_id].state, JobState::TimedOut);
}

/// A caller hangs up while the store fails: the end of the queued `/execute` job it left
/// cannot be stored, so it is undone — but the caller is gone all the same, and the job
/// ends, unstarted, at the retry, before any agent can take it.
#[test]
fn a_hang_up_whose_end_cannot_be_stored_ends_the_job_at_the_retry() {
    let mut host = Host::new(Edge::new(config(), 0));
    let (sid, _) = join(&mut host.edge, 0, "spark", &agent_key(1), vec![], 1);
    let (caller, out) = host.call(1, "POST", "/execute", json!({"prompt": "x", "timeout_ms": 60000}));
    assert!(answer_to(&out, caller).is_none(), "queued: no free slot");
    let job_id = host.stored.keys().next().unwrap().clone();
    host.failing = true;
    let effects = host.edge.caller_gone(2, caller);
    assert!(host.carry_out(2, effects).is_empty());
    assert_eq!(host.edge.job(&job_id).unwrap().state, JobState::Queued, "undone");
    assert_eq!(host.edge.callers_waiting(), 0, "the caller is gone all the same");
    assert_eq!(host.edge.next_deadline(), Some(2 + crate::machine::STORE_RETRY_MS), "tried again a second later");
    // The retry fails too: the job stays to be ended.
    assert!(host.tick(2 + crate::machine::STORE_RETRY_MS).is_empty());
    assert_eq!(host.edge.job(&job_id).unwrap().state, JobState::Queued);
    host.failing = false;
    let at = host.edge.next_deadline().unwrap();
    host.tick(at);
    let stored = &host.stored[&job_id];
    assert_eq!(stored.result.as_ref().and_then(|r| r.error_code), Some(shared::contract::ErrorCode::RunnerOffline), "{stored:?}");
    assert!(stored.dispatched_at.is_none());
    assert!(sent(&host.say(at, &sid, credit(1, 0)), &sid).is_empty(), "never sent");
}

#[test]
fn a_cancel_that_cannot_be_stored_leaves_the_job_queued() {
    let mut host = Host::new(Edge::new(config(), 0));
    let (_, out) = host.call(0, "POST", "/jobs", json!({"prompt": "x"}));
    assert!(out.iter().any(|e| matches!(e, Effect::Answer { response, .. } if response.status == 202)));
    let job_id = host.stored.keys().next().unwrap().clone();
    let follower = host.edge.begin_request(0);
    host.edge.follow(follower, &job_id, &crate::http::Who::Pool, None, &mut Vec::new()).unwrap();
    host.failing = true;
    let (caller, out) = host.call(1, "DELETE", &format!("/jobs/{job_id}"), Value::Null);
    assert_eq!(answer_to(&out, caller).unwrap().0, 500);
    assert_eq!(streamed(&out, follower), (vec![], false), "its follower heard nothing");
    assert_eq!(host.edge.job(&job_id).unwrap().state, JobState::Queued);
    assert_eq!(host.edge.queued(), 1);
    // The follower is still there when it does end.
    host.failing = false;
    let (_, out) = host.call(2, "DELETE", &format!("/jobs/{job_id}"), Value::Null);
    assert!(streamed(&out, follower).1);
}

/// The store fails for longer than `LOST_AFTER_MS` while the agent, which holds the job's
/// result, keeps reconnecting: each hello (a write: taking the job over) fails and closes
/// its connection. The agent is plainly alive, so when the store heals the job must not be
/// declared lost by the first tick — which beats the agent's backed-off reconnect. (It
/// was: the wait ran from the first failure, the job ended `lost`, its caller was told to
/// run it elsewhere, and the agent's result was then dropped as a duplicate.)
#[test]
fn a_job_whose_agent_keeps_coming_back_while_the_store_fails_is_not_lost() {
    let (mut host, sid) = ready_host();
    let (waiter, out) = host.call(0, "POST", "/execute", json!({"prompt": "x", "timeout_ms": 600000}));
    let job_id = order_of(&out, &sid, "spark", 0).header.job_id;
    host.say(1, &sid, AgentMessage::Accepted { job_id: job_id.clone() });

    host.failing = true;
    let out = host.say(1_000, &sid, result_msg(&host.edge, &job_id, ok_result()));
    assert!(closed(&out).is_some());
    // The agent comes back with a growing backoff; the store still fails every time.
    let mut now = 1_000;
    for (seed, backoff) in [(2, 250), (3, 500), (4, 1_000), (5, 2_000), (6, 4_000)] {
        now += backoff;
        host.tick(now);
        let (_, effects) = join(&mut host.edge, now, "spark", &agent_key(1), vec![job_id.clone()], seed);
        let out = host.carry_out(now, effects);
        assert_eq!(closed(&out).map(|c| c.0), Some(close::INTERNAL_ERROR), "{out:?}");
    }
    assert!(now > 1_000 + LOST, "the store failed for longer than LOST_AFTER_MS");

    // The store heals; a tick comes before the agent's next reconnect.
    host.failing = false;
    let out = host.tick(now + 500);
    assert!(answer_to(&out, waiter).is_none(), "the job was declared lost while its agent kept coming back: {out:?}");
    assert_eq!(host.edge.job(&job_id).unwrap().state, JobState::Running);

    let (sid2, effects) = join(&mut host.edge, now + 1_000, "spark", &agent_key(1), vec![job_id.clone()], 7);
    assert!(closed(&host.carry_out(now + 1_000, effects)).is_none());
    let out = host.say(now + 1_001, &sid2, result_msg(&host.edge, &job_id, ok_result()));
    let (status, answer) = answer_to(&out, waiter).expect("the caller gets the result");
    assert_eq!((status, answer["success"].as_bool()), (200, Some(true)), "{answer}");
    assert_eq!(host.stored[&job_id].state, JobState::Succeeded);
}

/// A job queued and sent in the same event is saved once, as it was sent (one record
/// copied, encoded and written instead of two); one that stays queued is saved queued.
#[test]
fn a_job_queued_and_sent_in_one_event_is_saved_once_as_sent() {
    let (mut edge, sid) = ready_edge();
    let handled = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "x"}));
    let saves: Vec<&Job> = handled.effects.iter().filter_map(|e| if let Effect::Save(job) = e { Some(&**job) } else { None }).collect();
    assert_eq!(saves.len(), 1, "saved once: {:?}", handled.effects);
    assert_eq!(saves[0].state, JobState::Dispatched);
    let (writes, rest) = split_writes(handled.effects);
    assert_eq!(writes.saves.len(), 1, "{:?}", writes.saves);
    assert_eq!(writes.saves[0].state, JobState::Dispatched);
    assert_eq!(writes.saves[0].session_id.as_deref(), Some(sid.as_str()));
    assert!(rest.iter().all(|e| !e.is_write()));

    // No agent takes it: saved as queued.
    let mut edge = Edge::new(config(), 0);
    let handled = call(&mut edge, 0, "POST", "/jobs", json!({"prompt": "x"}));
    let (writes, _) = split_writes(handled.effects);
    assert_eq!(writes.saves.len(), 1, "{:?}", writes.saves);
    assert_eq!(writes.saves[0].state, JobState::Queued);
}

/// Several jobs in one event each keep their last version, in the order of those.
#[test]
fn an_events_saves_keep_each_jobs_last_version_in_order() {
    let job = |id: &str, attempts: u32| {
        let spec = serde_json::from_value(json!({"prompt": "x", "timeout_ms": 1000})).unwrap();
        let mut job = Job::new(id.into(), spec, crate::record::Mode::Detached, None, 0);
        job.attempts = attempts;
        Effect::Save(std::sync::Arc::new(job))
    };
    let (writes, _) = split_writes(vec![job("a", 1), job("b", 1), job("a", 2), Effect::Forget { job_id: "c".into() }, job("b", 3)]);
    let kept: Vec<(&str, u32)> = writes.saves.iter().map(|j| (j.id.as_str(), j.attempts)).collect();
    assert_eq!(kept, vec![("a", 2), ("b", 3)]);
    assert_eq!(writes.forgets, vec!["c".to_string()]);
}

/// One event that forgets a job and saves it again (or saves it, then forgets it): the
/// host writes the outcome. Were the forget kept beside the save, a host that writes an
/// event's saves before its forgets would delete on disk a job the machine still holds.
#[test]
fn a_job_forgotten_and_saved_in_one_event_is_written_as_it_ended() {
    let job = |id: &str, attempts: u32| {
        let spec = serde_json::from_value(json!({"prompt": "x", "timeout_ms": 1000})).unwrap();
        let mut job = Job::new(id.into(), spec, crate::record::Mode::Detached, None, 0);
        job.attempts = attempts;
        Effect::Save(std::sync::Arc::new(job))
    };
    let forget = |id: &str| Effect::Forget { job_id: id.into() };
    let (writes, _) = split_writes(vec![job("a", 1), forget("a"), job("a", 2), job("b", 1), forget("b")]);
    let kept: Vec<(&str, u32)> = writes.saves.iter().map(|j| (j.id.as_str(), j.attempts)).collect();
    assert_eq!(kept, vec![("a", 2)], "a is kept as last saved");
    assert_eq!(writes.forgets, vec!["b".to_string()], "b is gone, and a is not");
}

/// The caps forget a job whose key is kept (`spent.rs`), or let a kept key go, in an event
/// whose writes fail: undone, the job and its key are as they were — a repeat of the key
/// finds the job again, or is still told it ran — and nothing of either went to storage.
#[test]
fn forgetting_a_keyed_job_or_its_key_is_undone_with_a_failed_write() {
    let mut host = Host::new(Edge::new(Config { max_retained_jobs: 1, job_retention_ms: 1_000, ..config() }, 0));
    let (sid, _) = join(&mut host.edge, 0, "spark", &agent_key(1), vec![], 1);
    let keyed = || submission("the task", 60_000, Some("k-1"));
    let submitted = host.edge.submit(0, "j0".into(), keyed(), Mode::Detached).unwrap();
    host.carry_out(0, submitted.effects);
    host.say(0, &sid, credit(1, 0));
    let msg = result_msg(&host.edge, "j0", ok_result());
    host.say(5, &sid, msg);
    let submitted = host.edge.submit(10, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    host.carry_out(10, submitted.effects);
    host.say(10, &sid, credit(1, 1));

    // j1's result would make the cap forget j0: the write fails, and the event is undone.
    host.failing = true;
    let msg = result_msg(&host.edge, "j1", ok_result());
    host.say(11, &sid, msg);
    assert!(host.edge.job("j0").is_some(), "j0 is back");
    let again = host.edge.submit(12, "x".into(), keyed(), Mode::Detached).unwrap();
    assert!(again.existing && again.job_id == "j0", "the key names j0 again: {again:?}");
    assert!(!host.stored["j0"].forgotten);

    // Stored this time: j0 goes, its key stays.
    host.failing = false;
    let (sid, _) = join(&mut host.edge, 20, "spark", &agent_key(1), vec!["j1".to_string()], 1);
    let msg = result_msg(&host.edge, "j1", ok_result());
    host.say(21, &sid, msg);
    assert!(host.edge.job("j0").is_none() && host.stored["j0"].forgotten);
    let told = |host: &mut Host, now: u64| host.edge.submit(now, format!("y{now}"), keyed(), Mode::Detached).unwrap_err().body.error_code;
    assert_eq!(told(&mut host, 22), shared::contract::ErrorCode::JobForgotten);

    // The key's retention ends (j0 ended at 5) in a tick whose write fails: kept, then let
    // go by the tick that is stored.
    host.failing = true;
    host.tick(1_005);
    assert_eq!(told(&mut host, 1_006), shared::contract::ErrorCode::JobForgotten);
    assert!(host.stored.contains_key("j0"));
    host.failing = false;
    host.tick(1_005 + crate::machine::STORE_RETRY_MS);
    assert!(!host.stored.contains_key("j0"), "the stub went with the key");
    let made = host.edge.submit(3_000, "j2".into(), keyed(), Mode::Detached).unwrap();
    assert!(!made.existing);
}

/// The bytes of the jobs not ended (`MAX_PENDING_BYTES`) are put back with a failed
/// write: a submission undone frees its bytes, a result or a cancel undone takes the job's
/// bytes back. Counted wrong, either would leave room the edge does not have, or refuse
/// jobs for room it has.
#[test]
fn the_bytes_of_jobs_not_ended_are_put_back_with_a_failed_write() {
    // Room for two jobs of a 3,000-byte task (3,512 bytes each), not three.
    let cfg = Config { max_pending_bytes: 8_000, max_body_bytes: 8_192, max_queued_jobs: 100, ..config() };
    let mut host = Host::new(Edge::new(cfg, 0));
    let (sid, out) = join(&mut host.edge, 0, "spark", &agent_key(1), vec![], 1);
    host.carry_out(0, out);
    host.say(0, &sid, credit(1, 0));
    let task = json!({"prompt": "x".repeat(3_000), "timeout_ms": 60_000});
    let status = |out: &[Effect], caller| answer_to(out, caller).map(|(status, _)| status);

    host.failing = true;
    let (caller, out) = host.call(1, "POST", "/jobs", task.clone());
    assert_eq!(status(&out, caller), Some(500));
    host.failing = false;
    let (caller, out) = host.call(2, "POST", "/jobs", task.clone());
    assert_eq!(status(&out, caller), Some(202), "the undone submission holds no bytes");
    let running = order_of(&out, &sid, "spark", 2).header.job_id;
    let (caller, out) = host.call(3, "POST", "/jobs", task.clone());
    assert_eq!(status(&out, caller), Some(202));
    let (caller, out) = host.call(4, "POST", "/jobs", task.clone());
    assert_eq!(status(&out, caller), Some(429), "two fit, three do not");
    let waiting = host.stored.keys().find(|id| **id != running).unwrap().clone();

    // A result and a cancel that cannot be stored: both jobs are back, with their bytes.
    host.failing = true;
    let msg = result_msg(&host.edge, &running, ok_result());
    host.say(5, &sid, msg);
    let (caller, out) = host.call(6, "DELETE", &format!("/jobs/{waiting}"), Value::Null);
    assert_eq!(status(&out, caller), Some(500));
    host.failing = false;
    assert_eq!(host.edge.job(&running).unwrap().state, JobState::Dispatched);
    let (caller, out) = host.call(7, "POST", "/jobs", task.clone());
    assert_eq!(status(&out, caller), Some(429), "the jobs not ended are still counted");
    let (caller, out) = host.call(8, "DELETE", &format!("/jobs/{waiting}"), Value::Null);
    assert_eq!(status(&out, caller), Some(202));
    let (caller, out) = host.call(9, "POST", "/jobs", task);
    assert_eq!(status(&out, caller), Some(202), "a stored cancel frees the bytes");
}

/// A pause whose write failed was answered "nothing was done" and kept all the same: the
/// paused set was changed outside the event's undo. The agent, paused from its next
/// hello, took no work, and the next save of alerting's memory stored the pause.
#[test]
fn a_pause_that_cannot_be_stored_is_not_kept() {
    let (mut host, sid) = ready_host();
    host.failing = true;
    let (caller, out) = host.call(1, "POST", "/agents/spark/pause", Value::Null);
    let (status, answer) = answer_to(&out, caller).expect("answered at once");
    assert_eq!(status, 500, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("nothing was done"), "{answer}");
    host.failing = false;
    // The agent goes and comes back: its departure and return are stored, the pause not.
    let out = host.edge.disconnect(2, &sid);
    host.carry_out(2, out);
    let (sid, out) = join(&mut host.edge, 3, "spark", &agent_key(1), vec![], 2);
    host.carry_out(3, out);
    let memory = host.memory.clone().expect("alerting's memory was stored");
    assert!(memory.paused.is_empty(), "the pause nothing was done for was stored: {:?}", memory.paused);
    host.say(3, &sid, credit(1, 0));
    let (_, out) = host.call(4, "POST", "/jobs", json!({"prompt": "x"}));
    assert!(sent(&out, &sid).iter().any(|m| matches!(m, EdgeMessage::Job { .. })), "the agent takes work: {out:?}");
    assert!(!host.edge.health(5).agents[0].paused);
}

/// The same for the usage window an agent's report holds work for: kept outside the undo
/// of a heartbeat whose writes failed, it was stored with the next save of alerting's
/// memory, though the edge had taken nothing of that heartbeat.
#[test]
fn a_usage_hold_that_cannot_be_stored_is_not_kept() {
    use shared::usage::{UsageStatus, UsageWindow};
    let (mut host, sid) = ready_host();
    let usage = UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(200_000), utilization: None, seen_at: 0 };
    let used_up = Beat { oauth: OAuthReport { usage: Some(usage), ..oauth() }, ..beat(&[], 1, 0) };
    host.failing = true;
    let msg = signed(&host.edge, &sid, used_up);
    let out = host.say(1, &sid, msg);
    assert_eq!(closed(&out).map(|c| c.0), Some(close::INTERNAL_ERROR), "{out:?}");
    host.failing = false;
    // While the agent is away the operator pauses another: the pause is stored, the hold not.
    let (caller, out) = host.call(2, "POST", "/agents/laptop/pause", Value::Null);
    assert_eq!(answer_to(&out, caller).map(|a| a.0), Some(200));
    let memory = host.memory.clone().expect("alerting's memory was stored");
    assert!(memory.paused.contains("laptop"), "{memory:?}");
    assert_eq!(memory.usage_hold, None, "a hold from a heartbeat the edge undid was stored");
}

/// A host may store several events' writes in one transaction (the native edge groups what
/// is queued at once): when that fails, every event of the group is undone at once — the
/// result taken in its middle as much as the submissions around it — answering none
/// (`Edge::group_failed`); handled again alone, each is answered as it would have been.
/// Nothing of any of them had gone out.
#[test]
fn a_group_of_events_that_cannot_be_stored_is_undone_whole() {
    let (mut host, sid) = ready_host();
    let (waiter, out) = host.call(0, "POST", "/execute", json!({"prompt": "first", "timeout_ms": 60000}));
    let first = order_of(&out, &sid, "spark", 0).header.job_id;
    host.say(1, &sid, AgentMessage::Accepted { job_id: first.clone() });
    let stored_before = host.stored.clone();

    host.edge.group_events();
    let second = call(&mut host.edge, 2, "POST", "/execute", json!({"prompt": "second", "timeout_ms": 60000}));
    let done = result_msg(&host.edge, &first, ok_result());
    let result = host.edge.message(3, &sid, &done.to_text());
    assert!(result.iter().any(|e| matches!(e, Effect::Save(job) if job.id == first && job.state == JobState::Succeeded)));
    let third = call(&mut host.edge, 4, "POST", "/jobs", json!({"prompt": "third"}));
    assert!(second.effects.iter().chain(&third.effects).any(Effect::is_write));
    host.edge.group_failed(5, "disk I/O error");

    // As before the group: the first job running, nothing else queued or kept.
    assert_eq!(host.edge.job(&first).unwrap().state, JobState::Running);
    assert_eq!(host.edge.queued(), 0);
    assert_eq!(host.edge.active_jobs(), 1);
    assert_eq!(host.edge.stats().submitted, 1);
    assert_eq!(host.edge.stats().store_failures, 0, "nothing is told failed before it is handled alone");
    assert_eq!(host.stored, stored_before);

    // Each again alone, the store still failing: each submission refused as alone, the
    // result neither acknowledged nor answered, its connection closed for the agent to send
    // it again.
    host.failing = true;
    let (second, out) = host.call(5, "POST", "/execute", json!({"prompt": "second", "timeout_ms": 60000}));
    assert_eq!(answer_to(&out, second).expect("the second caller is answered").0, 500);
    let out = host.say(5, &sid, done);
    assert!(answer_to(&out, waiter).is_none(), "{out:?}");
    assert!(!sent(&out, &sid).iter().any(|m| matches!(m, EdgeMessage::ResultAck { .. })), "{out:?}");
    assert_eq!(closed(&out).expect("the session is closed").0, close::INTERNAL_ERROR);
    let (third, out) = host.call(5, "POST", "/jobs", json!({"prompt": "third"}));
    assert_eq!(answer_to(&out, third).expect("the third caller is answered").0, 500);
    assert_eq!(host.edge.job(&first).unwrap().state, JobState::Running);
    assert_eq!(host.edge.queued(), 0);
    assert_eq!(host.edge.stats().submitted, 1);
    assert_eq!(host.edge.stats().store_failures, 3, "one failure counted per event");
    assert_eq!(host.stored, stored_before);
}

/// A group stored is done: an event after it whose writes fail undoes itself only, not the
/// group's events (the journal starts again with it).
#[test]
fn an_event_after_a_stored_group_undoes_only_itself() {
    let (mut host, sid) = ready_host();
    let (waiter, out) = host.call(0, "POST", "/execute", json!({"prompt": "first", "timeout_ms": 60000}));
    let first = order_of(&out, &sid, "spark", 0).header.job_id;
    host.say(1, &sid, AgentMessage::Accepted { job_id: first.clone() });

    host.edge.group_events();
    let done = result_msg(&host.edge, &first, ok_result());
    let mut effects = host.edge.message(2, &sid, &done.to_text());
    let second = call(&mut host.edge, 3, "POST", "/jobs", json!({"prompt": "second"}));
    effects.extend(second.effects);
    let out = host.carry_out(3, effects);
    host.edge.group_stored();
    assert_eq!(answer_to(&out, waiter).expect("the result is answered").0, 200);

    host.failing = true;
    let (caller, out) = host.call(4, "POST", "/jobs", json!({"prompt": "third"}));
    assert_eq!(answer_to(&out, caller).unwrap().0, 500);
    assert!(closed(&out).is_none(), "the stored group's result is not undone: {out:?}");
    assert_eq!(host.edge.job(&first).unwrap().state, JobState::Succeeded);
    assert_eq!(host.edge.queued() + host.edge.active_jobs(), 1, "the second job stays; the third does not exist");
    assert_eq!(host.edge.stats().store_failures, 1);
}

/// An agent's heartbeat (it writes nothing) grouped with another caller's submission
/// whose commit fails is not closed (hostile review rev41: it was, 1011, its agent shown
/// offline): the group is undone whole and each event handled again alone, as the host
/// does (`Edge::group_failed`), and only the submission is refused.
#[test]
fn a_heartbeat_grouped_with_a_failed_write_keeps_its_agent() {
    let (mut host, sid) = ready_host();
    host.edge.group_events();
    let hb = signed(&host.edge, &sid, beat(&[], 1, 0));
    let hb_effects = host.edge.message(2, &sid, &hb.to_text());
    assert!(!hb_effects.iter().any(Effect::is_write), "a heartbeat writes nothing");
    let post = call(&mut host.edge, 3, "POST", "/jobs", json!({"prompt": "x"}));
    assert!(post.effects.iter().any(Effect::is_write));
    host.edge.group_failed(4, "database is locked");
    assert_eq!(host.edge.queued(), 0, "the group is undone whole");

    // Each again alone, the store still failing: as if never grouped.
    host.failing = true;
    let out = host.say(4, &sid, hb);
    assert!(closed(&out).is_none(), "the heartbeat's agent was disconnected for another caller's write: {out:?}");
    let (caller, out) = host.call(4, "POST", "/jobs", json!({"prompt": "x"}));
    assert_eq!(answer_to(&out, caller).expect("the submission is answered").0, 500);
    assert!(host.edge.is_online());
    assert_eq!(host.edge.queued(), 0);
    assert_eq!(host.edge.stats().store_failures, 1, "only the submission failed");
}
