//! Recovery: credits that converge whatever the order of statements and orders, cancels
//! that survive a dead connection, heartbeats that settle disagreements at once, and
//! `/execute` jobs whose callers are gone never sent again.

use super::*;
use crate::Config;

/// Connects `agent` with a hello that names the jobs it runs and those whose results it
/// still holds.
fn rejoin(edge: &mut Edge, now: u64, running: &[&str], finished: &[&str], seed: u8) -> (String, Vec<Effect>) {
    let (sid, effects) = edge.connect(now, [seed; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    let hello = Hello {
        running: running.iter().map(|s| s.to_string()).collect(),
        finished: finished.iter().map(|s| s.to_string()).collect(),
        ..hello("spark", nonce, now)
    };
    let effects = edge.message(now, &sid, &hello_text(&hello, &agent_key(1)));
    assert!(closed(&effects).is_none(), "{effects:?}");
    (sid, effects)
}

fn cancels(effects: &[Effect], sid: &str) -> Vec<String> {
    sent(effects, sid)
        .into_iter()
        .filter_map(|m| match m {
            EdgeMessage::Cancel { envelope } => {
                let order: shared::protocol::CancelOrder =
                    open_order(&envelope, Domain::Cancel, &edge_key().verifying_key(), SPARK, 0).ok()?;
                Some(order.header.job_id)
            }
            _ => None,
        })
        .collect()
}

fn orders(effects: &[Effect], sid: &str) -> Vec<String> {
    sent(effects, sid)
        .into_iter()
        .filter_map(|m| match m {
            EdgeMessage::Job { envelope } => {
                let order: JobOrder = open_order(&envelope, Domain::Job, &edge_key().verifying_key(), SPARK, 0).ok()?;
                Some(order.header.job_id)
            }
            _ => None,
        })
        .collect()
}

/// The issue's scenario: a job ends while its agent is away, so the credit it would have
/// sent is lost; the agent comes back and states its free slot before it re-sends the
/// result. The next job must go out then, not never.
#[test]
fn a_job_that_ended_while_the_agent_was_away_does_not_leave_it_idle() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    edge.disconnect(2, &sid);
    edge.submit(3, "j2".into(), submission("y", 60_000, None), Mode::Detached).unwrap();
    // Back, with j1's result spooled: one free slot, stated before the result is re-sent.
    let (sid2, effects) = rejoin(&mut edge, 4, &[], &["j1"], 2);
    assert!(finished(&effects).is_empty(), "j1's result is on its way: {effects:?}");
    let effects = say(&mut edge, 5, &sid2, credit(1, 0));
    assert_eq!(orders(&effects, &sid2), vec!["j2".to_string()], "the free slot is used");
    let effects = report(&mut edge, 6, &sid2, "j1", ok_result());
    assert_eq!(finished(&effects)[0].0, "j1");
    assert!(orders(&effects, &sid2).is_empty(), "and never more than it has");
}

/// The welcome names the jobs of the hello the edge will not have the agent run, and comes
/// before anything else on the connection: one it ended `lost` while the agent was away
/// (its `/execute` caller told to fall back), one it has no record of — but not one it
/// takes over after a blip shorter than its `LOST_AFTER_MS` by its own count. The agent
/// never starts those it names, and judges no other by its own clock, which counts the
/// absence from its last frame heard, before the edge saw the loss (rev29-2).
#[test]
fn the_welcome_names_the_jobs_of_the_hello_the_edge_gave_up() {
    let mut edge = Edge::new(config(), 0);
    let back = |edge: &mut Edge, now: u64, running: &[&str], seed: u8| {
        let (sid, effects) = edge.connect(now, [seed; 64], PEER, Some(AGENT_NONCE));
        let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
        let hello = Hello { running: running.iter().map(|s| s.to_string()).collect(), capacity: 3, ..hello("spark", nonce, now) };
        let effects = edge.message(now, &sid, &hello_text(&hello, &agent_key(1)));
        let Some(EdgeMessage::Welcome { envelope }) = sent(&effects, &sid).into_iter().next() else { panic!("the welcome first: {effects:?}") };
        let welcome: Welcome = envelope.open(Domain::Welcome, &edge_key().verifying_key()).unwrap();
        (sid, effects, welcome.given_up)
    };
    let (sid, _, given_up) = back(&mut edge, 0, &[], 1);
    assert!(given_up.is_empty());
    edge.submit(0, "gone".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    assert_eq!(orders(&say(&mut edge, 1, &sid, credit(1, 0)), &sid), ["gone"]);
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "gone".into() });
    edge.disconnect(100, &sid);
    let done = finished(&edge.tick(100 + LOST));
    assert_eq!((done[0].0.as_str(), &done[0].2["fallback"]), ("gone", &json!(true)), "{done:?}");
    // Back, still holding it (held at the refresh gate, say), and a job the edge never knew.
    let (sid, effects, given_up) = back(&mut edge, 200 + LOST, &["gone", "ghost"], 2);
    assert_eq!(given_up, ["gone", "ghost"]);
    assert_eq!(cancels(&effects, &sid), ["gone", "ghost"], "the stray-cancels follow the welcome");
    // A job taken on this connection, then a blip: back within LOST_AFTER_MS by the edge's
    // count, the job is taken over, not named; the one given up still is.
    let t = 300 + LOST;
    edge.submit(t, "kept".into(), submission("y", 60_000, None), Mode::Wait).unwrap();
    assert_eq!(orders(&say(&mut edge, t, &sid, credit(1, 0)), &sid), ["kept"]);
    say(&mut edge, t, &sid, AgentMessage::Accepted { job_id: "kept".into() });
    edge.disconnect(t + 100, &sid);
    let (sid, effects, given_up) = back(&mut edge, t + 100 + LOST - 1, &["gone", "kept"], 3);
    assert_eq!(given_up, ["gone"]);
    assert!(finished(&effects).is_empty(), "{effects:?}");
    let kept = edge.job("kept").unwrap();
    assert_eq!((kept.state, kept.session_id.as_deref()), (JobState::Running, Some(sid.as_str())), "taken over on the new connection");
}

/// An agent holding more results than a hello names ([`MAX_HELLO_FINISHED`]) says so: a
/// job it did not name is not taken for lost at the hello — its result follows — and one
/// it named is its, as in any hello. A hello naming more than the bound (another agent's,
/// or a hostile one's) is taken as cut at the bound, not whole.
#[test]
fn a_hello_that_cannot_name_every_result_leaves_the_others_to_come() {
    use shared::protocol::MAX_HELLO_FINISHED;
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    edge.disconnect(2, &sid);
    let (sid2, effects) = edge.connect(4, [2; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid2)[0] else { panic!("challenge first") };
    let named: Vec<String> = (0..MAX_HELLO_FINISHED).map(|n| format!("old-{n}")).collect();
    let cut = Hello { finished: named, more_finished: true, ..hello("spark", nonce, 4) };
    let effects = edge.message(4, &sid2, &hello_text(&cut, &agent_key(1)));
    assert!(closed(&effects).is_none(), "{effects:?}");
    assert!(finished(&effects).is_empty(), "j1's result may be among those not named: {effects:?}");
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running);
    let done = finished(&report(&mut edge, 5, &sid2, "j1", ok_result()));
    assert_eq!(done[0].0, "j1", "its result, sent after the hello, ends it");

    // Over the bound, without saying so: j2, named past it, is not taken as named, and
    // not taken for lost either.
    edge.submit(6, "j2".into(), submission("y", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 6, &sid2, credit(1, 0));
    say(&mut edge, 7, &sid2, AgentMessage::Accepted { job_id: "j2".into() });
    edge.disconnect(8, &sid2);
    let (sid3, effects) = edge.connect(9, [3; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid3)[0] else { panic!("challenge first") };
    let mut named: Vec<String> = (0..MAX_HELLO_FINISHED).map(|n| format!("old-{n}")).collect();
    named.push("j2".into());
    let over = Hello { finished: named, ..hello("spark", nonce, 9) };
    let effects = edge.message(9, &sid3, &hello_text(&over, &agent_key(1)));
    assert!(closed(&effects).is_none(), "{effects:?}");
    assert!(finished(&effects).is_empty(), "{effects:?}");
    assert_eq!(edge.job("j2").unwrap().session_id.as_deref(), Some(sid2.as_str()), "named past the bound: not taken over");
    assert_eq!(finished(&report(&mut edge, 10, &sid3, "j2", ok_result()))[0].0, "j2");
}

#[test]
fn a_statement_never_over_fills_an_agent_whatever_crossed_it() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 2);
    for i in 0..3 {
        edge.submit(0, format!("j{i}"), submission("x", 60_000, None), Mode::Detached).unwrap();
    }
    assert_eq!(orders(&say(&mut edge, 1, &sid, AgentMessage::Credit { slots: Slots { free: 2, received: 0 } }), &sid).len(), 2);
    // A late copy of the same statement, and a heartbeat made before the orders arrived:
    // both crossed the two orders, so nothing more goes out.
    assert!(orders(&say(&mut edge, 2, &sid, AgentMessage::Credit { slots: Slots { free: 2, received: 0 } }), &sid).is_empty());
    let hb = Beat { capacity: 2, ..beat(&[], 2, 0) };
    assert!(orders(&pulse(&mut edge, 3, &sid, hb), &sid).is_empty());
    // An agent claiming more orders than were sent gains nothing by it.
    assert!(orders(&say(&mut edge, 4, &sid, AgentMessage::Credit { slots: Slots { free: 0, received: 99 } }), &sid).is_empty());
    // One ended: the agent says so, and one more goes.
    report(&mut edge, 5, &sid, "j0", ok_result());
    let effects = say(&mut edge, 5, &sid, AgentMessage::Credit { slots: Slots { free: 1, received: 2 } });
    assert_eq!(orders(&effects, &sid), vec!["j2".to_string()]);
}

/// A cancel sent while the edge still thought the connection alive (it was half-open) is
/// sent again when the agent comes back still running the job.
#[test]
fn a_cancel_sent_on_a_dead_connection_is_sent_again_at_the_reconnect() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    let effects = edge.cancel(2, "j1").unwrap();
    assert_eq!(cancels(&effects, &sid), vec!["j1".to_string()]);
    edge.disconnect(3, &sid);
    let (sid2, effects) = rejoin(&mut edge, 4, &["j1"], &[], 2);
    assert_eq!(cancels(&effects, &sid2), vec!["j1".to_string()], "the cancel goes out again: {effects:?}");
    let stopped = JobResult::failure(shared::contract::ErrorCode::Cancelled, "cancelled: by the caller", 9);
    let done = finished(&report(&mut edge, 5, &sid2, "j1", stopped));
    assert_eq!(done[0].2["error_code"], "CANCELLED");
}

/// A cancel asked for while the agent is away is kept (the caller got 202) and acted on
/// when the agent is back; if it never comes back, the job ends cancelled, not lost (its
/// caller does not want it run elsewhere).
#[test]
fn a_cancel_asked_while_the_agent_is_away_waits_for_it() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    edge.submit(0, "j2".into(), submission("y", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    edge.disconnect(2, &sid);
    let effects = edge.cancel(3, "j1").unwrap();
    assert!(finished(&effects).is_empty(), "not ended while its agent may still run it");
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running);
    let (sid2, effects) = rejoin(&mut edge, 4, &["j1"], &[], 2);
    assert_eq!(cancels(&effects, &sid2), vec!["j1".to_string()]);

    // Another time the agent does not come back.
    edge.disconnect(5, &sid2);
    let done = finished(&edge.tick(5 + LOST));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].2["error_code"], "CANCELLED", "{:?}", done[0]);
    assert_eq!(edge.job("j1").unwrap().state, JobState::Cancelled);
}

/// A job its caller cancelled that its agent lost — the agent died running it and says so
/// when it is back (its started marker), or comes back without it — ends cancelled, as when
/// the agent never comes back: the caller wanted it stopped, and `lost` (with `fallback`)
/// would tell an `/execute` waiter to run it elsewhere.
#[test]
fn a_cancelled_job_its_agent_lost_ends_cancelled_not_lost() {
    let (mut edge, sid) = ready_edge();
    let waiter = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "a", "timeout_ms": 60000}));
    let j1 = order_of(&waiter.effects, &sid, "spark", 0).header.job_id;
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: j1.clone() });
    edge.disconnect(2, &sid);
    edge.cancel(3, &j1).unwrap();
    // The agent died running it: back, it holds the "lost" result its marker left.
    let (sid2, _) = rejoin(&mut edge, 4, &[], &[&j1], 2);
    let marker = JobResult::failure(shared::contract::ErrorCode::RunnerLost, "the agent stopped while this job ran", 0);
    let effects = report(&mut edge, 5, &sid2, &j1, marker);
    let (status, answer) = answer_to(&effects, waiter.caller).expect("its waiter is answered");
    assert_eq!((status, answer["error_code"].as_str()), (200, Some("CANCELLED")), "{answer}");
    assert!(answer.get("fallback").is_none(), "{answer}");

    // Another job: the agent comes back without it at all.
    say(&mut edge, 6, &sid2, credit(1, 0));
    edge.submit(7, "j2".into(), submission("b", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 8, &sid2, AgentMessage::Accepted { job_id: "j2".into() });
    edge.disconnect(9, &sid2);
    edge.cancel(10, "j2").unwrap();
    let (_, effects) = rejoin(&mut edge, 11, &[], &[], 3);
    let done = finished(&effects);
    assert_eq!(done.len(), 1, "{effects:?}");
    assert_eq!(done[0].2["error_code"], "CANCELLED", "{:?}", done[0]);
    assert_eq!(edge.job("j2").unwrap().state, JobState::Cancelled);
}

#[test]
fn heartbeats_settle_disagreements_at_once() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 3);
    for id in ["ran", "sent", "late"] {
        edge.submit(0, id.into(), submission(id, 600_000, None), Mode::Detached).unwrap();
    }
    say(&mut edge, 0, &sid, AgentMessage::Credit { slots: Slots { free: 3, received: 0 } });
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "ran".into() });
    start(&mut edge, 1, &sid, "ran");
    // The agent has received two of the three orders and holds neither.
    let hb = Beat { capacity: 3, ..beat(&[], 3, 2) };
    let effects = pulse(&mut edge, 2, &sid, hb);
    let done = finished(&effects);
    assert_eq!(done.len(), 1, "{effects:?}");
    assert_eq!((done[0].0.as_str(), done[0].2["error_code"].as_str()), ("ran", Some("RUNNER_LOST")), "lost at once, not at its timeout");
    // The one it never started goes out again; the third is still on its way.
    assert_eq!(orders(&effects, &sid), vec!["sent".to_string()]);
    assert_eq!(edge.job("sent").unwrap().attempts, 2);
    assert_eq!(edge.job("late").unwrap().state, JobState::Dispatched);
    // The agent runs a job the edge ended, and one it never heard of: both are stopped.
    let hb = Beat { capacity: 3, ..beat(&["ran", "late", "stranger"], 0, 4) };
    let effects = pulse(&mut edge, 3, &sid, hb);
    let mut stopped = cancels(&effects, &sid);
    stopped.sort();
    assert_eq!(stopped, vec!["ran".to_string(), "stranger".to_string()]);
    assert_eq!(edge.job("late").unwrap().state, JobState::Running, "a heartbeat that lists it says it started");
}

/// A job the agent accepted but had not started (it fetched the repository, or waited
/// for the login refresh: no started record, its Claude never had the prompt) when it
/// restarted is not named by its next hello: it is sent again, not ended `lost` — as one
/// its hello or beat leaves out on the same connection. One it said started is lost.
#[test]
fn a_job_accepted_but_never_started_is_sent_again_when_its_agent_no_longer_has_it() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "waits".into(), submission("x", 600_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "waits".into() });
    assert_eq!(edge.job("waits").unwrap().state, JobState::Running);
    // kill -9 before its start; the agent comes back holding nothing.
    edge.disconnect(2, &sid);
    let (sid2, effects) = rejoin(&mut edge, 3, &[], &[], 2);
    assert!(finished(&effects).is_empty(), "not lost: {effects:?}");
    assert_eq!(edge.job("waits").unwrap().state, JobState::Queued, "queued again");
    assert_eq!(orders(&say(&mut edge, 4, &sid2, credit(1, 0)), &sid2), vec!["waits".to_string()], "sent again");
    assert_eq!(edge.job("waits").unwrap().attempts, 2);

    // Accepted again, and started this time: a hello that leaves it out ends it lost.
    say(&mut edge, 5, &sid2, AgentMessage::Accepted { job_id: "waits".into() });
    start(&mut edge, 6, &sid2, "waits");
    edge.disconnect(7, &sid2);
    let (sid3, effects) = rejoin(&mut edge, 8, &[], &[], 3);
    let done = finished(&effects);
    assert_eq!(done.len(), 1, "{effects:?}");
    assert_eq!(done[0].2["error_code"], "RUNNER_LOST", "{:?}", done[0]);

    // A beat on its own connection that leaves out an accepted, unstarted job sends it
    // again too; a `Started` of an older order (played back) does not count for the new one.
    say(&mut edge, 9, &sid3, credit(1, 0));
    edge.submit(10, "beat".into(), submission("y", 600_000, None), Mode::Detached).unwrap();
    say(&mut edge, 11, &sid3, AgentMessage::Accepted { job_id: "beat".into() });
    let effects = pulse(&mut edge, 12, &sid3, beat(&[], 1, 1));
    assert!(finished(&effects).is_empty(), "not lost: {effects:?}");
    assert_eq!(orders(&effects, &sid3), vec!["beat".to_string()], "sent again");
    let old = {
        let job = edge.job("beat").unwrap();
        format!("{}:{}:{}", job.id, job.attempts - 1, job.order_tags[job.order_tags.len() - 2])
    };
    let key = link(&edge, &sid3);
    say(&mut edge, 13, &sid3, AgentMessage::started("beat", &old, &key));
    assert_eq!(edge.job("beat").unwrap().state, JobState::Dispatched, "an older order's start is ignored");
}

/// A `Started` that comes before its `Accepted` (held back on the path, or lost with a
/// connection) makes the job running and started all the same; a made-up `Accepted` after
/// it does not make it unstarted again.
#[test]
fn a_start_counts_without_its_acceptance_and_is_not_undone_by_one() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 600_000, None), Mode::Detached).unwrap();
    start(&mut edge, 1, &sid, "j1");
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running);
    say(&mut edge, 2, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    assert!(!edge.job("j1").unwrap().unstarted);
    edge.disconnect(3, &sid);
    let (_, effects) = rejoin(&mut edge, 4, &[], &[], 2);
    let done = finished(&effects);
    assert_eq!(done.len(), 1, "{effects:?}");
    assert_eq!(done[0].2["error_code"], "RUNNER_LOST", "{:?}", done[0]);
}

/// A `Started` not MACed with the connection's key (made up on the path) is refused: the
/// job stays unstarted — it is a made-up start that could end a job lost that should go again.
#[test]
fn a_forged_start_is_refused() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 600_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    let nonce = edge.job("j1").unwrap().order_nonce();
    let before = edge.stats().refused_reports;
    say(&mut edge, 2, &sid, AgentMessage::started("j1", &nonce, &shared::link::MacKey::from_bytes([9; 32])));
    assert_eq!(edge.stats().refused_reports, before + 1);
    assert!(edge.job("j1").unwrap().unstarted);
}

/// The SIGSTOP scenario: the agent froze long enough for the edge to drop its connection;
/// a job is not lost while the agent, back on a new connection, says it runs it.
#[test]
fn a_job_is_not_lost_while_its_agent_says_it_runs_it() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 600_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    assert!(closed(&edge.tick(1 + 2 * HB)).is_some(), "dropped as silent");
    let (sid2, _) = rejoin(&mut edge, 2 * HB + 500, &["j1"], &[], 2);
    for t in (3 * HB..=4 * LOST).step_by(HB as usize) {
        pulse(&mut edge, t, &sid2, beat(&["j1"], 0, 0));
        assert!(finished(&edge.tick(t)).is_empty(), "ended at {t} while its agent runs it");
    }
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running);
}

/// An `/execute` job sent to an agent that never received it, whose caller has hung up
/// meanwhile, is not sent again: the caller may have run the task elsewhere.
#[test]
fn a_dispatched_execute_job_whose_caller_is_gone_is_not_sent_again() {
    let (mut edge, sid) = ready_edge();
    let gone = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "a", "timeout_ms": 60000}));
    let gone_id = order_of(&gone.effects, &sid, "spark", 0).header.job_id;
    assert!(edge.caller_gone(0, gone.caller).is_empty(), "sent: it may be running");
    edge.disconnect(1, &sid);
    let (sid2, effects) = rejoin(&mut edge, 2, &[], &[], 2);
    let done = finished(&effects);
    assert_eq!(done.len(), 1, "{effects:?}");
    assert_eq!(done[0].0, gone_id);
    assert!(edge.job(&gone_id).unwrap().started_at.is_none());
    assert!(orders(&say(&mut edge, 3, &sid2, credit(1, 0)), &sid2).is_empty(), "never sent again");

    // One whose caller still waits is sent again.
    let waiting = call(&mut edge, 4, "POST", "/execute", json!({"prompt": "b", "timeout_ms": 60000}));
    let waiting_id = order_of(&waiting.effects, &sid2, "spark", 4).header.job_id;
    edge.disconnect(5, &sid2);
    let (sid3, effects) = rejoin(&mut edge, 6, &[], &[], 3);
    assert!(finished(&effects).is_empty());
    assert_eq!(orders(&say(&mut edge, 7, &sid3, credit(1, 0)), &sid3), vec![waiting_id]);
}

/// A queued `/execute` job whose caller hangs up before it is sent never runs: the caller
/// may run the task elsewhere. It ends as one that never reached its agent does — unless
/// another caller, repeating its key, still waits for it.
#[test]
fn a_queued_execute_job_whose_caller_hung_up_is_never_sent() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let saved = |effects: &[Effect]| effects.iter().find_map(|e| if let Effect::Save(j) = e { Some(j.id.clone()) } else { None }).unwrap();
    let gone = call(&mut edge, 1, "POST", "/execute", json!({"prompt": "b", "timeout_ms": 60000, "idempotency_key": "kb1"}));
    assert!(answer_to(&gone.effects, gone.caller).is_none(), "queued: its caller waits");
    let id = saved(&gone.effects);
    let follower = call(&mut edge, 1, "GET", &format!("/jobs/{id}/events"), Value::Null);
    let effects = edge.caller_gone(2, gone.caller);
    assert!(orders(&say(&mut edge, 3, &sid, credit(1, 0)), &sid).is_empty(), "never sent");
    let done = finished(&effects);
    assert_eq!(done.len(), 1, "{effects:?}");
    assert_eq!((done[0].0.as_str(), done[0].2["error_code"].as_str()), (id.as_str(), Some("RUNNER_OFFLINE")), "{done:?}");
    assert!(done[0].2["error"].as_str().unwrap().contains("hung up"), "{done:?}");
    assert!(streamed(&effects, follower.caller).1, "its follower is given the end");
    assert!(edge.job(&id).unwrap().started_at.is_none());

    // One still waited on by a repeat of its key goes on.
    let first = call(&mut edge, 4, "POST", "/execute", json!({"prompt": "c", "timeout_ms": 60000, "idempotency_key": "kc1"}));
    let kept = saved(&first.effects);
    assert_eq!(orders(&first.effects, &sid), vec![kept.clone()], "sent at once: the agent has a slot");
    let id = {
        say(&mut edge, 5, &sid, AgentMessage::Accepted { job_id: kept.clone() });
        let queued = call(&mut edge, 6, "POST", "/execute", json!({"prompt": "d", "timeout_ms": 60000, "idempotency_key": "kd1"}));
        let id = saved(&queued.effects);
        let repeat = call(&mut edge, 7, "POST", "/execute", json!({"prompt": "d", "timeout_ms": 60000, "idempotency_key": "kd1"}));
        assert!(answer_to(&repeat.effects, repeat.caller).is_none(), "the repeat waits");
        assert!(finished(&edge.caller_gone(8, queued.caller)).is_empty(), "its repeat still waits");
        id
    };
    let effects = report(&mut edge, 9, &sid, &kept, ok_result());
    assert!(finished(&effects).iter().any(|(j, ..)| *j == kept));
    assert_eq!(orders(&say(&mut edge, 10, &sid, credit(1, 1)), &sid), vec![id]);
}

/// Memory keeps an ended job's header only; its whole record is read from storage when
/// someone asks for it, in the form they asked for.
#[test]
fn an_ended_job_keeps_only_its_header_and_is_read_from_storage_on_demand() {
    let (mut edge, sid) = ready_edge();
    let body = json!({"prompt": "p".repeat(500), "timeout_ms": 60000, "idempotency_key": "k"});
    let first = call(&mut edge, 0, "POST", "/execute", body.clone());
    let job_id = order_of(&first.effects, &sid, "spark", 0).header.job_id;
    let big = JobResult { output: "o".repeat(100_000), ..ok_result() };
    let effects = report(&mut edge, 1, &sid, &job_id, big);
    let whole = effects.iter().find_map(|e| match e {
        Effect::Save(job) if job.state.is_terminal() => Some((**job).clone()),
        _ => None,
    });
    let whole = whole.expect("the whole record is stored");
    assert_eq!(answer_to(&effects, first.caller).unwrap().1["output"].as_str().unwrap().len(), 100_000, "its caller got it all");
    edge.tick(2);
    let header = edge.job(&job_id).unwrap();
    // Of the task only its start stays (for the jobs list).
    let kept = crate::record::PROMPT_PREVIEW_BYTES;
    assert!(header.header_only && header.spec.prompt.len() <= kept && header.result.as_ref().unwrap().output.is_empty());
    assert!(header.bytes > 100_500, "{}", header.bytes);

    let read = |edge: &mut Edge, method: &str, path: &str, body: Value| {
        let handled = call(edge, 3, method, path, body);
        let deliver = handled.effects.iter().find_map(|e| match e {
            Effect::Deliver { caller, job_id, form } => Some((*caller, job_id.clone(), *form)),
            _ => None,
        });
        let (caller, id, form) = deliver.expect("read from storage");
        assert_eq!((caller, id.as_str()), (handled.caller, job_id.as_str()));
        (caller, form, Edge::deliver(caller, form, Ok(Some(whole.clone())), 3.into()))
    };
    let (caller, _, effects) = read(&mut edge, "GET", &format!("/jobs/{job_id}"), Value::Null);
    let (status, view) = answer_to(&effects, caller).unwrap();
    assert_eq!((status, view["state"].as_str()), (200, Some("succeeded")));
    assert_eq!(view["result"]["output"].as_str().unwrap().len(), 100_000);
    let (caller, _, effects) = read(&mut edge, "POST", "/execute", body);
    assert_eq!(answer_to(&effects, caller).unwrap().1["output"].as_str().unwrap().len(), 100_000, "the same key: the same answer");
    let (caller, _, effects) = read(&mut edge, "GET", &format!("/jobs/{job_id}/events"), Value::Null);
    let (chunks, ended) = streamed(&effects, caller);
    assert!(ended && chunks[0].starts_with("event: result"), "{chunks:?}");
    // The header still tells a different task under the same key.
    let other = call(&mut edge, 4, "POST", "/execute", json!({"prompt": "another", "idempotency_key": "k"}));
    assert_eq!(answer_to(&other.effects, other.caller).unwrap().0, 409);
    // A record the host could not read is a clear 500.
    let effects = Edge::deliver(caller, crate::record::Form::View, Err("disk I/O error".into()), 5.into());
    let (status, body) = answer_to(&effects, caller).unwrap();
    assert_eq!(status, 500);
    assert!(body["error"].as_str().unwrap().contains("retry"), "{body}");
}

/// Job `j<i>` submitted at `i * 10`, sent and ended 1 ms later with `output` bytes of
/// output: the jobs its end made the edge forget.
fn run_to_its_end(edge: &mut Edge, sid: &str, i: u64, output: usize) -> Vec<String> {
    edge.submit(i * 10, format!("j{i}"), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(edge, i * 10, sid, credit(1, i));
    let result = JobResult { output: "o".repeat(output), ..ok_result() };
    let effects = report(edge, i * 10 + 1, sid, &format!("j{i}"), result);
    effects.into_iter().filter_map(|e| if let Effect::Forget { job_id } = e { Some(job_id) } else { None }).collect()
}

#[test]
fn ended_jobs_are_kept_within_a_count_and_a_size() {
    let by = |jobs: usize, bytes: u64| Config { max_retained_jobs: jobs, max_retained_bytes: bytes, ..config() };
    let run = |cfg: Config, output: usize| {
        let mut edge = Edge::new(cfg, 0);
        let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
        let mut forgotten = Vec::new();
        for i in 0..3u64 {
            forgotten.extend(run_to_its_end(&mut edge, &sid, i, output));
        }
        (edge, forgotten)
    };
    let (edge, forgotten) = run(by(2, 1 << 30), 10);
    assert_eq!(forgotten, vec!["j0".to_string()], "over the count, the oldest goes");
    assert!(edge.job("j0").is_none() && edge.job("j2").is_some());
    // Each record is about 2.5 kB: two fit in 6 kB, three do not.
    let (_, forgotten) = run(by(100, 6_000), 2_000);
    assert_eq!(forgotten, vec!["j0".to_string()], "over the size, the oldest goes");
}

/// `MAX_RETAINED_BYTES`' least (1 MiB) is less than one job's record can be (Claude's
/// output alone may be 1 MiB, the diff and the task more): such a job, alone past the cap,
/// was forgotten the moment it ended — its callback given up, its caller's `GET
/// /jobs/{id}` a 404, a `submit` that followed again told nothing. The job that ended last
/// is kept whatever its size; the next job's end lets it go.
#[test]
fn the_job_that_ended_last_is_kept_past_the_size_cap() {
    let cfg = Config { max_retained_jobs: 100, max_retained_bytes: 1 << 20, ..config() };
    let mut edge = Edge::new(cfg, 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let mut forgotten = Vec::new();
    for (i, output) in [(0u64, 10), (1, 1 << 20), (2, 10)] {
        forgotten.extend(run_to_its_end(&mut edge, &sid, i, output));
        if i == 1 {
            assert!(edge.job("j1").is_some(), "the large job was forgotten as it ended");
            assert_eq!(forgotten, vec!["j0".to_string()], "the others go first");
        }
    }
    // Past the cap, the large one goes once another has ended.
    assert_eq!(forgotten, vec!["j0".to_string(), "j1".to_string()]);
    assert!(edge.job("j2").is_some());
}

/// The job spared past the size cap is the one that just ended, not the last in the
/// retained order (when it ended, then its id): two jobs ending in the same millisecond
/// (two agents' results in one tick) are ordered by id, and the one whose id sorts first
/// was forgotten as it ended — the 404 and lost callback `the_job_that_ended_last_…` fixed.
#[test]
fn of_two_jobs_ending_in_one_millisecond_the_later_is_kept_past_the_size_cap() {
    let cfg = Config { max_retained_jobs: 100, max_retained_bytes: 1 << 20, ..config() };
    let mut edge = Edge::new(cfg, 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 2);
    for id in ["jb", "ja"] {
        edge.submit(0, id.into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    }
    say(&mut edge, 0, &sid, credit(2, 0));
    let mut forgotten = Vec::new();
    for id in ["jb", "ja"] {
        let result = JobResult { output: "o".repeat(600 << 10), ..ok_result() };
        for e in report(&mut edge, 11, &sid, id, result) {
            if let Effect::Forget { job_id } = e {
                forgotten.push(job_id);
            }
        }
    }
    assert!(edge.job("ja").is_some(), "the job that ended last was forgotten as it ended");
    assert_eq!(forgotten, vec!["jb".to_string()]);
}

/// A job whose result was still to be posted to its `callback_url` (its first post failed:
/// the receiver down a moment) was forgotten under the caps like any other once newer jobs
/// ended, and its callback given up with it — the retries the README promises (2 s, 4 s, …,
/// 8 tries, kept across restarts) never came, and its caller never heard the end. Found by
/// the chaos soak with `MAX_RETAINED_JOBS=1` and a receiver that fails some posts. It is
/// kept past the caps, and not counted in them (at most `MAX_PENDING_CALLBACKS` such jobs),
/// until its callback is taken or given up; then the caps forget it.
#[test]
fn a_job_whose_callback_is_still_to_be_posted_is_kept_past_the_caps() {
    let cfg = Config { max_retained_jobs: 1, ..config() };
    let mut edge = Edge::new(cfg.clone(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let body = json!({"prompt": "x", "callback_url": "https://hooks.example.com/r"}).to_string();
    let sub = ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
    edge.submit(0, "j0".into(), sub, Mode::Detached).unwrap();
    say(&mut edge, 0, &sid, credit(1, 0));
    let effects = report(&mut edge, 1, &sid, "j0", ok_result());
    let record = effects.iter().find_map(|e| if let Effect::Save(j) = e { Some((**j).clone()) } else { None }).unwrap();
    let post_id = |effects: &[Effect]| effects.iter().find_map(|e| if let Effect::Post(p) = e { Some(p.id.clone()) } else { None });
    let first = post_id(&effects).expect("the result is posted as the job ends");
    let failed = edge.posted(2, &first, Ok(503));
    let alerts = failed.iter().find_map(|e| if let Effect::SaveAlerts(a) = e { Some((**a).clone()) } else { None }).unwrap();
    // Two jobs without a callback end after it: the cap keeps the newer of them, and j0.
    let mut forgotten = Vec::new();
    for i in 1..3u64 {
        forgotten.extend(run_to_its_end(&mut edge, &sid, i, 10));
    }
    assert_eq!(forgotten, vec!["j1".to_string()], "the job whose callback waits was forgotten");
    assert!(edge.job("j0").is_some() && edge.job("j2").is_some());
    // The same after a restart (the callback's state is stored with the alerts).
    let stored: Vec<_> = ["j0", "j2"].iter().map(|id| edge.job(id).unwrap().clone()).collect();
    let (mut edge, effects) = Edge::restore(cfg, stored, vec![], Some(alerts), 30);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Forget { .. })), "{effects:?}");
    // Its retry is made (from the whole record read back) and taken: now it goes.
    let effects = edge.tick(2_002);
    assert!(effects.iter().any(|e| matches!(e, Effect::Recall { job_id } if job_id == "j0")), "{effects:?}");
    let again = post_id(&edge.recalled(2_003, "j0", Ok(Some(record)))).expect("the retry");
    let effects = edge.posted(2_004, &again, Ok(200));
    assert!(effects.iter().any(|e| matches!(e, Effect::Forget { job_id } if job_id == "j0")), "{effects:?}");
    assert!(edge.job("j0").is_none() && edge.job("j2").is_some());
}

#[test]
fn memory_keeps_an_ended_job_as_its_header_and_a_live_one_whole() {
    let spec = serde_json::from_value(json!({"prompt": "p".repeat(10_000), "timeout_ms": 1000})).unwrap();
    let live = crate::record::Job::new("a".into(), spec, Mode::Detached, None, 0);
    assert_eq!(live.clone().in_memory(), live, "a live job is kept whole");
    let mut ended = live;
    assert!(ended.finish(JobResult { output: "o".repeat(10_000), ..ok_result() }, 1));
    let kept = ended.clone().in_memory();
    assert_eq!(kept, ended.header());
    assert!(kept.header_only && kept.result.unwrap().output.is_empty());

    // Made from the record itself, a header cuts at a character's edge and keeps no room
    // for the text it dropped: headers are what memory holds for the whole retention.
    let prompt = format!("a{}", "é".repeat(5_000));
    let spec = serde_json::from_value(json!({"prompt": prompt, "timeout_ms": 1000})).unwrap();
    let mut ended = crate::record::Job::new("b".into(), spec, Mode::Detached, None, 0);
    let error = format!("e{}", "é".repeat(5_000));
    assert!(ended.finish(JobResult { output: "o".repeat(10_000), error: Some(error.clone()), ..ok_result() }, 1));
    let kept = ended.clone().in_memory();
    assert_eq!(kept, ended.header());
    let preview = crate::record::PROMPT_PREVIEW_BYTES;
    assert_eq!(kept.spec.prompt, prompt[..preview - 1], "cut before the character the limit falls in");
    assert_eq!(kept.spec.prompt.capacity(), kept.spec.prompt.len());
    let kept_error = kept.result.as_ref().unwrap().error.as_ref().unwrap();
    assert!(error.starts_with(kept_error.as_str()) && kept_error.len() < 1_000);
    assert_eq!(kept_error.capacity(), kept_error.len());
    assert_eq!(kept.bytes, ended.approximate_bytes());
    assert_eq!(kept.spec_digest, ended.digest());
    // A job's end makes the header apart from the record, which it stores whole: the same
    // header, the record as it was.
    let whole = ended.clone();
    assert_eq!(ended.header_apart(), kept);
    assert_eq!(ended, whole);
}

/// A caller whose answer was lost (its connection cut by an edge's crash) sends its
/// idempotency key again. The caps had forgotten the job in between — it ended, and
/// `MAX_RETAINED_JOBS` jobs ended after it — and the key went with its record, so the
/// repeat made a new job, which ran the task a second time (the chaos soak saw it with
/// `MAX_RETAINED_JOBS=1`). The key stays until the job's retention would have ended: the
/// repeat is told the job ran and how it ended (410 `JOB_FORGOTTEN`), across a restart
/// too; the same key with another task is still a conflict; once the retention is over
/// the key is free.
#[test]
fn a_key_whose_job_the_caps_forgot_is_told_the_job_ran_not_run_again() {
    let cfg = Config { max_retained_jobs: 1, ..config() };
    let mut edge = Edge::new(cfg.clone(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let keyed = || submission("the task", 60_000, Some("k-1"));
    edge.submit(0, "j0".into(), keyed(), Mode::Detached).unwrap();
    say(&mut edge, 0, &sid, credit(1, 0));
    report(&mut edge, 5, &sid, "j0", ok_result());
    // Another job ends: the cap forgets j0, and stores what its key still answers.
    edge.submit(10, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 10, &sid, credit(1, 1));
    let effects = report(&mut edge, 11, &sid, "j1", ok_result());
    assert!(edge.job("j0").is_none(), "the cap forgot j0");
    let metrics = edge.metrics();
    assert!(metrics.contains("claude_runner_forgotten_job_keys 1\n") && metrics.contains("claude_runner_jobs_retained 1\n"), "{metrics}");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Forget { job_id } if job_id == "j0")), "{effects:?}");
    let (writes, _) = crate::split_writes(effects);
    let stub = writes.saves.iter().find(|j| j.id == "j0").expect("j0's key is stored").as_ref().clone();
    assert!(stub.forgotten && stub.result.is_none() && stub.spec.prompt.is_empty(), "{stub:?}");
    let j1 = writes.saves.iter().find(|j| j.id == "j1").unwrap().as_ref().clone();

    let told = |edge: &mut Edge, now: u64| {
        let err = edge.submit(now, format!("again-{now}"), keyed(), Mode::Wait).expect_err("a repeat of a forgotten job's key runs nothing");
        assert!(edge.job(&format!("again-{now}")).is_none() && edge.queued() == 0 && edge.active_jobs() == 0);
        err
    };
    let err = told(&mut edge, 20);
    assert_eq!((err.status, err.body.error_code, err.body.job_id.as_deref()), (410, shared::contract::ErrorCode::JobForgotten, Some("j0")));
    assert_eq!(err.body.state, Some(JobState::Succeeded));
    assert_eq!(err.body.fallback, None, "it ran: running it elsewhere would run it twice");
    assert!(err.body.error.contains("new idempotency key"), "{}", err.body.error);
    let other = edge.submit(21, "j2".into(), submission("another task", 60_000, Some("k-1")), Mode::Detached).unwrap_err();
    assert_eq!((other.status, other.body.error_code), (409, shared::contract::ErrorCode::Conflict));

    // A restart reads the stub back.
    let (mut edge, _) = Edge::restore(cfg, vec![stub, j1], vec![], None, 30);
    assert_eq!(told(&mut edge, 40).body.error_code, shared::contract::ErrorCode::JobForgotten);
    // Its retention over (it ended at 5), the key goes, and with it the stub.
    let retention = config().job_retention_ms;
    let effects = edge.tick(5 + retention - 1);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Forget { job_id } if job_id == "j0")), "{effects:?}");
    let effects = edge.tick(5 + retention);
    assert!(effects.iter().any(|e| matches!(e, Effect::Forget { job_id } if job_id == "j0")), "{effects:?}");
    let made = edge.submit(5 + retention + 1, "j3".into(), keyed(), Mode::Detached).unwrap();
    assert!(!made.existing && edge.job("j3").is_some(), "past its retention the key makes a new job");
}

/// The kept keys are bounded: past `max(MAX_RETAINED_JOBS, MIN_SPENT_KEYS)` the oldest goes,
/// its stub with it.
#[test]
fn kept_keys_of_forgotten_jobs_are_bounded_oldest_first() {
    let mut edge = Edge::new(Config { max_retained_jobs: 1, ..config() }, 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let cap = crate::machine::MIN_SPENT_KEYS as u64;
    let mut let_go = Vec::new();
    for i in 0..cap + 3 {
        edge.submit(i * 10, format!("j{i}"), submission("x", 60_000, Some(&format!("k{i}"))), Mode::Detached).unwrap();
        say(&mut edge, i * 10, &sid, credit(1, i));
        let effects = report(&mut edge, i * 10 + 1, &sid, &format!("j{i}"), ok_result());
        let_go.extend(effects.into_iter().filter_map(|e| if let Effect::Forget { job_id } = e { Some(job_id) } else { None }));
    }
    // j0..j{cap+1} were forgotten (j{cap+2} is kept): cap + 2 keys, two over the cap.
    assert_eq!(let_go, vec!["j0".to_string(), "j1".to_string()]);
    let err = edge.submit(100_000, "n".into(), submission("x", 60_000, Some("k2")), Mode::Detached).unwrap_err();
    assert_eq!(err.body.error_code, shared::contract::ErrorCode::JobForgotten);
    let again = edge.submit(100_001, "n".into(), submission("x", 60_000, Some("k0")), Mode::Detached).unwrap();
    assert!(!again.existing, "the oldest key was let go");
}

/// Only a job that may have run keeps its key once forgotten (hostile review rev27, M1): a
/// `/execute` job ended before any agent had it (its caller told to fall back) was told, on
/// a repeat, that it "already ran", without the `fallback` it had — and a caller that falls
/// back only when told to never ran the task at all. Such a job cannot run twice: its
/// key goes with it, and a repeat makes a new job, as before the kept keys.
#[test]
fn a_forgotten_job_that_was_never_sent_keeps_no_key() {
    let mut edge = Edge::new(Config { max_retained_jobs: 1, ..config() }, 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    edge.submit(0, "j0".into(), submission("the task", 600_000, Some("k")), Mode::Wait).unwrap();
    edge.disconnect(10, &sid);
    assert_eq!(finished(&edge.tick(10 + LOST))[0].2["fallback"], true);
    assert!(!edge.job("j0").unwrap().may_have_run());
    let (sid, _) = join(&mut edge, 20_000, "spark", &agent_key(1), vec![], 2);
    edge.submit(20_000, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 20_000, &sid, credit(1, 0));
    let effects = report(&mut edge, 20_001, &sid, "j1", ok_result());
    assert!(effects.iter().any(|e| matches!(e, Effect::Forget { job_id } if job_id == "j0")), "{effects:?}");
    let again = edge.submit(20_002, "j2".into(), submission("the task", 600_000, Some("k")), Mode::Wait).unwrap();
    assert!(!again.existing && edge.job("j2").is_some(), "the key made a new job");
}

/// A kept key's stub holds nothing of the task but its digest, and an ended job's header in
/// memory none of its long lists (hostile review rev27, M2: a request's 2 × 128 tools of 512
/// bytes and 64 KiB commit message made a stub of 196 kB, outside every byte cap, and
/// `approximate_bytes` counted none of them in the caps on ended jobs either).
#[test]
fn a_stub_and_a_header_keep_none_of_the_tasks_long_fields() {
    let tools: Vec<String> = (0..128).map(|i| format!("Tool{i}{}", "x".repeat(500))).collect();
    let body = json!({"prompt": "p", "timeout_ms": 1000, "allowed_tools": tools, "disallowed_tools": tools, "commit_message": "m".repeat(60_000),
                      "repo_url": "https://github.com/o/r", "push_branch": "claude/x", "labels": {"os": "linux"}});
    let sub = ExecuteRequest::parse(body.to_string().as_bytes(), Some("k"), Limits { max_timeout_ms: 3_600_000 }).unwrap();
    let mut job = crate::record::Job::new("a".into(), sub.spec, Mode::Detached, Some("k".into()), 0);
    job.placement = sub.placement;
    assert!(job.approximate_bytes() > 190_000, "the caps count the task's lists: {}", job.approximate_bytes());
    job.dispatched_at = Some(1);
    // A repository job's list of changed files (the agent caps it at a quarter of a
    // frame): kept by the whole record in storage, not by the header for the retention.
    let files: Vec<shared::job::FileChange> = (0..2_000)
        .map(|i| shared::job::FileChange { path: format!("src/{i}/{}", "f".repeat(200)), status: shared::job::ChangeKind::Modified, old_path: None })
        .collect();
    let result = JobResult { files_changed: Some(files.clone()), ..ok_result() };
    assert!(job.finish(result, 2));
    assert!(job.approximate_bytes() > 400_000, "the caps count the changed files: {}", job.approximate_bytes());
    let header = job.header();
    assert!(serde_json::to_string(&header).unwrap().len() < 4_096, "the header keeps the long fields");
    let mut whole = job.clone();
    assert_eq!(whole.header_apart(), header);
    assert_eq!(whole.result.as_ref().and_then(|r| r.files_changed.as_ref()), Some(&files), "the whole record keeps them");
    assert_eq!(header.repo_name(), job.repo_name(), "the header keeps what affinity reads");
    let stub = job.spent_key();
    assert!(serde_json::to_string(&stub).unwrap().len() < 1_024, "{}", serde_json::to_string(&stub).unwrap());
    assert_eq!((stub.digest(), stub.idempotency_slot()), (job.digest(), job.idempotency_slot()));
}

/// Found by the model test once its edge kept two ended jobs: a queued job cancelled in the
/// millisecond another job ended, its id the smaller, was the "oldest" of the retained
/// (they go by when each ended, then by id) and the count cap forgot it in the event that
/// ended it — and the cancel's answer, reading its view, panicked. The job that just ended
/// is spared by both caps.
#[test]
fn a_job_cancelled_in_the_millisecond_another_ended_is_kept_and_answered() {
    let mut edge = Edge::new(Config { max_retained_jobs: 1, ..config() }, 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    edge.submit(0, "j0".into(), submission("y", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 0, &sid, credit(1, 0));
    report(&mut edge, 5, &sid, "j1", ok_result());
    assert_eq!(edge.job("j0").map(|j| j.state), Some(JobState::Queued));
    let handled = call(&mut edge, 5, "DELETE", "/jobs/j0", Value::Null);
    let (status, body) = answer_to(&handled.effects, handled.caller).expect("answered");
    assert_eq!((status, &body["state"]), (202, &json!("cancelled")), "{body}");
    assert!(edge.job("j0").is_some() && edge.job("j1").is_none(), "the job that ended first went");
}

/// `spark`'s agent instance `instance` (its DATA_DIR; `None`: an agent of before the
/// field) connects at `now` with a hello naming `running`; the connection's id and what
/// the edge did.
fn join_instance(edge: &mut Edge, now: u64, instance: Option<&str>, running: &[&str], seed: u8) -> (String, Vec<Effect>) {
    join_holding(edge, now, instance, running, &[], seed)
}

/// [`join_instance`], the hello naming `finished` too: the results the agent holds.
fn join_holding(edge: &mut Edge, now: u64, instance: Option<&str>, running: &[&str], finished: &[&str], seed: u8) -> (String, Vec<Effect>) {
    let (sid, effects) = edge.connect(now, [seed; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    let hello = Hello {
        running: running.iter().map(|s| s.to_string()).collect(),
        finished: finished.iter().map(|s| s.to_string()).collect(),
        instance: instance.map(str::to_string),
        ..hello("spark", nonce, now)
    };
    let effects = edge.message(now, &sid, &hello_text(&hello, &agent_key(1)));
    (sid, effects)
}

/// Instance `a0` of `spark` runs `/execute` job `j1` on its connection.
fn running_on_a() -> (Edge, String) {
    let mut edge = Edge::new(config(), 0);
    let (sid, effects) = join_instance(&mut edge, 0, Some("a0"), &[], 1);
    assert!(closed(&effects).is_none(), "{effects:?}");
    say(&mut edge, 0, &sid, credit(1, 0));
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    start(&mut edge, 1, &sid, "j1");
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running);
    (edge, sid)
}

/// The goodbye's whole reason on a refused connection.
fn goodbye(effects: &[Effect], sid: &str) -> String {
    let said = sent(effects, sid).into_iter().find_map(|m| match m {
        EdgeMessage::Goodbye { reason, .. } => Some(reason),
        _ => None,
    });
    said.expect("a goodbye says why in full")
}

/// The review's scenario: a `.env` copied to a second machine, so two agents prove the
/// same AGENT_ID with the same key from two DATA_DIRs. The second one's hello (holding
/// nothing) replaced the first's connection and ended its running job `lost` — its
/// `/execute` caller told to fall back while the first agent still ran it — and the two
/// took turns replacing each other. Now the second is refused, saying why, what to do and
/// when to try again, and the first keeps its connection and its job, whose result still
/// ends it.
#[test]
fn a_second_instance_of_the_same_agent_is_refused_and_the_first_keeps_its_jobs() {
    let (mut edge, a) = running_on_a();
    for (t, seed) in [(500, 2), (1_500, 3), (2_500, 4)] {
        // The first is heard all along.
        if t > 1_000 {
            pulse(&mut edge, t - 500, &a, beat(&["j1"], 0, 1));
        }
        let (b, effects) = join_instance(&mut edge, t, Some("b0"), &[], seed);
        let (code, _) = closed(&effects).expect("the second instance is refused");
        assert_eq!(code, close::DUPLICATE);
        let said = goodbye(&effects, &b);
        // When the first would be silent past its deadline, heard 500 ms ago.
        assert!(said.starts_with(&format!("retry after {} ms: ", 2 * HB - 500)), "{said}");
        for says in ["another agent is connected as `spark` from another DATA_DIR (since 1970-01-01T00:00:00Z)", "its own AGENT_ID and key", "stop the other agent"] {
            assert!(said.contains(says), "{says}: {said}");
        }
        assert!(finished(&effects).is_empty(), "nothing ends: {effects:?}");
        assert!(!effects.iter().any(|e| matches!(e, Effect::Close { session, .. } if *session == a)), "the first's connection untouched");
        assert!(edge.session(&b).is_none(), "the refused connection is gone");
        let job = edge.job("j1").unwrap();
        assert_eq!((job.state, job.session_id.as_deref(), job.orphaned_at), (JobState::Running, Some(a.as_str()), None));
    }
    assert_eq!(edge.stats().refused_agents, 3);
    let done = finished(&report(&mut edge, 3_000, &a, "j1", ok_result()));
    assert_eq!((done[0].0.as_str(), done[0].1, &done[0].2["success"]), ("j1", 200, &json!(true)), "{done:?}");
}

/// The same instance again replaces its older connection at once, heard or not (the
/// DATA_DIR lock allows one agent process at a time, so the older one is half-open or its
/// process dead): reconnecting, its job carries on on the new connection; restarted (a
/// crash the edge did not see, the hello holds nothing), the job ends lost at once, not
/// after two heartbeat intervals of refusals. So does a hello that names no instance
/// after a connection that names none (an agent of before the field).
#[test]
fn the_same_instance_reconnecting_or_restarted_replaces_its_older_connection_at_once() {
    for instance in [Some("a0"), None] {
        let mut edge = Edge::new(config(), 0);
        let (a, _) = join_instance(&mut edge, 0, instance, &[], 1);
        say(&mut edge, 0, &a, credit(1, 0));
        edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
        say(&mut edge, 1, &a, AgentMessage::Accepted { job_id: "j1".into() });
        start(&mut edge, 1, &a, "j1");
        pulse(&mut edge, 400, &a, beat(&["j1"], 0, 1));
        let (a2, effects) = join_instance(&mut edge, 500, instance, &["j1"], 2);
        assert_eq!(closed(&effects), Some((close::REPLACED, "replaced by a newer connection of the same agent".into())), "{instance:?}");
        assert!(edge.session(&a).is_none() && edge.session(&a2).is_some());
        assert_eq!(edge.job("j1").unwrap().session_id.as_deref(), Some(a2.as_str()));
        pulse(&mut edge, 600, &a2, beat(&["j1"], 0, 0));
        let (a3, effects) = join_instance(&mut edge, 700, instance, &[], 3);
        assert_eq!(closed(&effects).map(|c| c.0), Some(close::REPLACED), "restarted: let in at once");
        assert!(edge.session(&a3).is_some());
        let done = finished(&effects);
        assert_eq!((done[0].0.as_str(), done[0].1, &done[0].2["error_code"]), ("j1", 502, &json!("RUNNER_LOST")), "{done:?}");
    }
}

/// Another instance once the first's connection has gone silent (a power cut): refused
/// while that connection is heard, then while j1 may still be with the first — until
/// LOST_AFTER_MS after the edge closed that connection — and told exactly when to come
/// back. Let in then, its hello settles none of the first's jobs: j1 ends by its orphan
/// deadline (saying LOST_AFTER_MS), and is never sent to it.
#[test]
fn another_instance_is_let_in_after_the_first_ones_jobs_orphan_deadline_and_settles_none() {
    let (mut edge, a) = running_on_a();
    let (b, effects) = join_instance(&mut edge, 2 * HB - 1, Some("b0"), &[], 2);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "still heard");
    assert!(goodbye(&effects, &b).starts_with("retry after 1 ms: another agent is connected"));
    let (b, effects) = join_instance(&mut edge, 2 * HB, Some("b0"), &[], 2);
    let said = goodbye(&effects, &b);
    assert!(said.starts_with(&format!("retry after {LOST} ms: jobs of `spark` may still be with another agent")), "j1 not yet orphaned: {said}");
    edge.tick(2 * HB);
    assert!(edge.session(&a).is_none(), "the silent connection closed");
    assert_eq!(edge.job("j1").unwrap().orphaned_at, Some(2 * HB));
    let (b, effects) = join_instance(&mut edge, 2 * HB + LOST - 1, Some("b0"), &[], 3);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "j1 may still be with the first");
    let said = goodbye(&effects, &b);
    assert!(said.starts_with("retry after 1 ms: jobs of `spark` may still be with another agent proving it from another DATA_DIR"), "{said}");
    assert!(finished(&effects).is_empty(), "{effects:?}");
    let (b, effects) = join_instance(&mut edge, 2 * HB + LOST, Some("b0"), &[], 4);
    assert!(closed(&effects).is_none(), "{effects:?}");
    assert!(finished(&effects).is_empty(), "the newcomer's hello settles none of the first's jobs: {effects:?}");
    let effects = edge.tick(2 * HB + LOST);
    let done = finished(&effects);
    assert_eq!((done[0].0.as_str(), done[0].1, &done[0].2["error_code"]), ("j1", 502, &json!("RUNNER_LOST")), "{done:?}");
    assert!(done[0].2["error"].as_str().unwrap().contains("LOST_AFTER_MS"), "ended by its deadline: {done:?}");
    let effects = say(&mut edge, 2 * HB + LOST, &b, credit(1, 0));
    assert!(!sent(&effects, &b).iter().any(|m| matches!(m, EdgeMessage::Job { .. })), "{effects:?}");
}

/// Review: an agent of before the field (no instance id) and one of now sharing a `.env`
/// were never told apart, and replaced each other as before. They are two instances.
#[test]
fn review_an_old_agent_without_an_instance_id_is_refused_beside_a_heard_new_one() {
    let (mut edge, a) = running_on_a();
    pulse(&mut edge, 400, &a, beat(&["j1"], 0, 1));
    let (_, effects) = join_instance(&mut edge, 500, None, &[], 2);
    assert!(finished(&effects).is_empty(), "{:?}", finished(&effects));
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE));
}

#[test]
fn review_a_new_agent_is_refused_beside_a_heard_old_one() {
    let mut edge = Edge::new(config(), 0);
    let (a, _) = join_instance(&mut edge, 0, None, &[], 1);
    say(&mut edge, 0, &a, credit(1, 0));
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &a, AgentMessage::Accepted { job_id: "j1".into() });
    pulse(&mut edge, 400, &a, beat(&["j1"], 0, 1));
    let (_, effects) = join_instance(&mut edge, 500, Some("b0"), &[], 2);
    assert!(finished(&effects).is_empty(), "{:?}", finished(&effects));
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE));
}

/// Review: the first's connection dropped briefly (an edge restart, a network blip) and
/// the refused second got in, taken as speaking for all of the id's jobs: the first's
/// running job ended lost while it ran, and the first was then locked out. Now the second
/// stays out while the job may be with the first, and the first, back, carries on.
#[test]
fn review_a_blip_of_the_first_does_not_let_the_second_end_its_running_job() {
    let (mut edge, a) = running_on_a();
    edge.disconnect(100, &a);
    let (b, effects) = join_instance(&mut edge, 150, Some("b0"), &[], 2);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "the second stays out");
    assert!(goodbye(&effects, &b).starts_with(&format!("retry after {} ms: ", 100 + LOST - 150)));
    assert!(finished(&effects).is_empty(), "{:?}", finished(&effects));
    let (a2, back) = join_instance(&mut edge, 400, Some("a0"), &["j1"], 3);
    assert_eq!(closed(&back), None, "the first is let back in");
    assert!(finished(&back).is_empty(), "{:?}", finished(&back));
    let done = finished(&report(&mut edge, 500, &a2, "j1", ok_result()));
    assert_eq!((done[0].0.as_str(), done[0].1, &done[0].2["success"]), ("j1", 200, &json!(true)), "{done:?}");
}

/// Review: a job sent to the first that it had not acknowledged when its connection
/// dropped was sent again to the second (it may run on both). Now it goes to nobody else
/// while the first may have it: the first, back, says it runs it.
#[test]
fn review_a_job_sent_to_the_first_is_not_sent_to_the_second() {
    let mut edge = Edge::new(config(), 0);
    let (a, _) = join_instance(&mut edge, 0, Some("a0"), &[], 1);
    say(&mut edge, 0, &a, credit(1, 0));
    let d = edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    assert!(sent(&d.effects, &a).iter().any(|m| matches!(m, EdgeMessage::Job { .. })));
    edge.disconnect(100, &a);
    let (b, effects) = join_instance(&mut edge, 150, Some("b0"), &[], 2);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE));
    let effects = say(&mut edge, 160, &b, credit(1, 0));
    let to_b = sent(&effects, &b).iter().any(|m| matches!(m, EdgeMessage::Job { .. }));
    assert!(!to_b, "j1, which A may run, was sent to B too");
    let (a2, back) = join_instance(&mut edge, 400, Some("a0"), &["j1"], 3);
    assert_eq!(closed(&back), None);
    let job = edge.job("j1").unwrap();
    assert_eq!((job.state, job.session_id.as_deref(), job.attempts), (JobState::Running, Some(a2.as_str()), 1));
}

/// An instance id the edge would not keep (it goes into records and logs) refuses the hello.
#[test]
fn a_hello_with_a_malformed_instance_id_is_refused() {
    let mut edge = Edge::new(config(), 0);
    for bad in ["", "a-b", "a\nb", &"a".repeat(65)] {
        let (_, effects) = join_instance(&mut edge, 0, Some(bad), &[], 1);
        let (code, reason) = closed(&effects).expect("refused");
        assert_eq!(code, close::PROTOCOL_ERROR, "{bad:?}");
        assert!(reason.contains("instance id"), "{reason}");
    }
    assert!(!edge.is_online());
}

/// Review: an agent of before the field (no instance id), upgraded — after a crash, or
/// with results its drain could not hand over (the edge unreachable then) — was refused
/// until the jobs it had had passed their orphan deadlines, though its hello named them
/// (its spool reports every job it had started), and then settled none: the results it
/// held were dropped and the jobs ended lost. A job of an agent of before the field that a
/// hello names is that agent's: it keeps it out no longer, and it takes the job over. One
/// it does not name may be with another machine, and still keeps it out; so does a job of
/// another instance id even named (a copy of its DATA_DIR with `instance-id` removed names
/// what its spool was running when copied).
#[test]
fn review_an_agent_upgraded_from_before_the_field_takes_over_the_jobs_it_names() {
    let mut edge = Edge::new(config(), 0);
    let (a, _) = join_instance(&mut edge, 0, None, &[], 1);
    say(&mut edge, 0, &a, credit(1, 0));
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &a, AgentMessage::Accepted { job_id: "j1".into() });
    say(&mut edge, 1, &a, credit(1, 1));
    edge.submit(2, "j2".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 3, &a, AgentMessage::Accepted { job_id: "j2".into() });
    assert_eq!(edge.job("j2").unwrap().instance.as_deref(), Some(""));
    edge.disconnect(100, &a);
    // Naming j1 only: j2 may be with another machine.
    let (b, effects) = join_holding(&mut edge, 150, Some("b0"), &[], &["j1"], 2);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "j2, not named, keeps it out");
    assert!(goodbye(&effects, &b).starts_with(&format!("retry after {} ms: ", 100 + LOST - 150)));
    let (b, effects) = join_holding(&mut edge, 200, Some("b0"), &["j2"], &["j1"], 3);
    assert_eq!(closed(&effects), None, "it names every job the edge has with the agent");
    assert!(finished(&effects).is_empty(), "{:?}", finished(&effects));
    for id in ["j1", "j2"] {
        let job = edge.job(id).unwrap();
        assert_eq!((job.session_id.as_deref(), job.instance.as_deref(), job.orphaned_at), (Some(b.as_str()), Some("b0"), None), "{id}");
    }
    let done = finished(&report(&mut edge, 300, &b, "j1", ok_result()));
    assert_eq!((done[0].0.as_str(), done[0].1, &done[0].2["success"]), ("j1", 200, &json!(true)), "{done:?}");
    pulse(&mut edge, 400, &b, beat(&["j2"], 0, 0));
    assert!(finished(&edge.tick(100 + LOST)).is_empty(), "j2 is with it, not lost");
    // b0's own job, named by another instance id: kept out still.
    let t = 100 + LOST;
    edge.disconnect(t, &b);
    let (c, effects) = join_holding(&mut edge, t + 100, Some("c0"), &["j2"], &[], 4);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "j2 is b0's");
    let said = goodbye(&effects, &c);
    assert!(said.starts_with(&format!("retry after {} ms: ", LOST - 100)), "{said}");
}

/// An agent of before the field (no instance id) and one of now, both `spark`: each is
/// kept out while a job of the other may be with it, the other's blip notwithstanding, and
/// the one that blipped is let back in at once and carries on.
#[test]
fn an_old_and_a_new_agent_keep_each_other_out_across_a_blip() {
    for (first, second) in [(None, Some("b0")), (Some("a0"), None)] {
        let mut edge = Edge::new(config(), 0);
        let (a, _) = join_instance(&mut edge, 0, first, &[], 1);
        say(&mut edge, 0, &a, credit(1, 0));
        edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
        say(&mut edge, 1, &a, AgentMessage::Accepted { job_id: "j1".into() });
        edge.disconnect(100, &a);
        let (_, effects) = join_instance(&mut edge, 150, second, &[], 2);
        assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "{first:?} then {second:?}");
        assert!(finished(&effects).is_empty(), "{:?}", finished(&effects));
        let (a2, back) = join_instance(&mut edge, 400, first, &["j1"], 3);
        assert_eq!(closed(&back), None, "{first:?} back");
        let done = finished(&report(&mut edge, 500, &a2, "j1", ok_result()));
        assert_eq!((done[0].0.as_str(), done[0].1, &done[0].2["success"]), ("j1", 200, &json!(true)), "{done:?}");
    }
}

/// The first restarted (the same DATA_DIR, a new process) while the second waits: let in
/// at once, the job it no longer has ended lost at once (it said so), and the second still
/// kept out while the first is heard.
#[test]
fn the_first_restarted_while_the_second_waits_is_let_in_at_once() {
    let (mut edge, a) = running_on_a();
    edge.disconnect(100, &a);
    let (_, effects) = join_instance(&mut edge, 150, Some("b0"), &[], 2);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE));
    let (a2, effects) = join_instance(&mut edge, 200, Some("a0"), &[], 3);
    assert_eq!(closed(&effects), None, "let in at once");
    let done = finished(&effects);
    assert_eq!((done[0].0.as_str(), &done[0].2["error_code"]), ("j1", &json!("RUNNER_LOST")), "{done:?}");
    let (b, effects) = join_instance(&mut edge, 300, Some("b0"), &[], 4);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "the first is heard");
    assert!(goodbye(&effects, &b).starts_with(&format!("retry after {} ms: another agent is connected", 200 + 2 * HB - 300)));
    assert!(edge.session(&a2).is_some());
}

/// The second let in once the first's job passed its orphan deadline (the first cut off
/// longer than LOST_AFTER_MS): the first's job ends lost by that deadline, as any vanished
/// agent's. The first, back, is kept out while the second is heard and while the second's
/// own job may be with it — no turn-taking that ends a job while its agent runs it — and
/// let in once both have passed; the second's job then ends by its own deadline, not by
/// the first's hello.
#[test]
fn the_second_let_in_after_the_deadline_keeps_the_first_out_while_its_own_job_may_run() {
    let (mut edge, a) = running_on_a();
    edge.disconnect(100, &a);
    let t = 100 + LOST;
    let done = finished(&edge.tick(t));
    assert_eq!((done[0].0.as_str(), &done[0].2["error_code"]), ("j1", &json!("RUNNER_LOST")), "{done:?}");
    let (b, effects) = join_instance(&mut edge, t, Some("b0"), &[], 2);
    assert_eq!(closed(&effects), None);
    say(&mut edge, t, &b, credit(1, 0));
    edge.submit(t, "j2".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, t + 1, &b, AgentMessage::Accepted { job_id: "j2".into() });
    assert_eq!(edge.job("j2").unwrap().instance.as_deref(), Some("b0"));
    // The first back, still running j1 (it never heard the edge end it).
    let (_, effects) = join_instance(&mut edge, t + 100, Some("a0"), &["j1"], 3);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "the second is heard");
    assert!(finished(&effects).is_empty(), "{:?}", finished(&effects));
    edge.disconnect(t + 200, &b);
    let (a2, effects) = join_instance(&mut edge, t + 300, Some("a0"), &["j1"], 4);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE), "j2 may be with the second");
    assert!(goodbye(&effects, &a2).starts_with(&format!("retry after {} ms: jobs of `spark`", LOST - 100)), "told when j2's deadline passes");
    assert!(finished(&effects).is_empty(), "{:?}", finished(&effects));
    let (a3, effects) = join_instance(&mut edge, t + 200 + LOST, Some("a0"), &["j1"], 5);
    assert_eq!(closed(&effects), None, "let in once j2 passed its deadline");
    assert!(sent(&effects, &a3).iter().any(|m| matches!(m, EdgeMessage::Cancel { .. })), "told to stop j1, which the edge ended");
    assert!(finished(&effects).is_empty(), "j2 is not the first's to settle: {:?}", finished(&effects));
    let done = finished(&edge.tick(t + 200 + LOST));
    assert_eq!((done[0].0.as_str(), &done[0].2["error_code"]), ("j2", &json!("RUNNER_LOST")), "{done:?}");
}

/// An edge restart: records kept (`Job::instance` with them, as stored), connections not.
/// The first's job waits LOST_AFTER_MS from the restart, and keeps the second out all that
/// time, whoever dials first; the first is let in at once and carries on.
#[test]
fn across_an_edge_restart_the_first_keeps_its_job_and_the_second_stays_out() {
    let (mut edge, _) = running_on_a();
    let effects = edge.shutdown(1_000);
    let mut stored: std::collections::BTreeMap<String, crate::record::Job> = Default::default();
    for e in effects {
        if let Effect::Save(job) = e {
            stored.insert(job.id.clone(), std::sync::Arc::unwrap_or_clone(job));
        }
    }
    let job = edge.job("j1").unwrap();
    let job: crate::record::Job = serde_json::from_str(&serde_json::to_string(job).unwrap()).unwrap();
    assert_eq!(job.instance.as_deref(), Some("a0"), "stored with the job");
    stored.insert(job.id.clone(), job);
    let (mut edge, _) = Edge::restore(config(), stored.into_values().collect(), vec![], None, 60_000);
    let (b, effects) = join_instance(&mut edge, 60_100, Some("b0"), &[], 2);
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::DUPLICATE));
    assert!(goodbye(&effects, &b).starts_with(&format!("retry after {} ms: jobs of `spark`", LOST - 100)));
    let (a2, effects) = join_instance(&mut edge, 60_200, Some("a0"), &["j1"], 3);
    assert_eq!(closed(&effects), None);
    assert_eq!(edge.job("j1").unwrap().session_id.as_deref(), Some(a2.as_str()));
}

/// Hostile review rev8, 2: a result dropped on the path alone (a frame-aware hop) while the
/// agent holds it: the next heartbeat names it as held, and the job waits for its result
/// — it is not taken for lost — which, sent again, ends it as the agent had it.
#[test]
fn a_heartbeat_naming_a_held_result_keeps_its_job_waiting_for_it() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    // The result frame is made, and lost on the way: the edge never reads it.
    let _dropped = result_msg(&edge, "j1", done("held"));
    pulse(&mut edge, 10, &sid, Beat { finished: vec!["j1".into()], ..beat(&[], 1, 1) });
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running, "waits for the result the agent holds");
    report(&mut edge, 20, &sid, "j1", done("held"));
    assert_eq!(edge.job("j1").unwrap().state, JobState::Succeeded, "ended as the agent had it");
    // Without the name the job is lost, as before.
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j2".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j2".into() });
    start(&mut edge, 1, &sid, "j2");
    pulse(&mut edge, 10, &sid, beat(&[], 1, 1));
    assert_eq!(edge.job("j2").unwrap().state, JobState::Lost);
}

/// Hostile review rev8, 1: a proven connection is not silent while a frame arrives at the
/// floor rate (bytes told by the host), nor when a new result ends it; bytes slower than
/// that rate, or a frame that ends as nothing new (a result played back), earn nothing.
#[test]
fn a_large_frame_arriving_or_a_new_result_is_a_sign_of_life() {
    use shared::contract::MIN_UPLINK_BYTES_PER_SEC as RATE;
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 600_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    let quiet = edge.session(&sid).unwrap().deadline(HB);
    // A frame of 20 intervals' worth at the floor rate begins, and arrives at that rate.
    edge.arriving(quiet - 1, &sid, 1_000);
    let mut t = quiet - 1;
    for step in 1..=40u64 {
        t = quiet - 1 + step * HB / 2;
        edge.arriving(t, &sid, 1_000 + step * RATE * HB / 2 / 1000);
        assert!(closed(&edge.tick(t)).is_none(), "closed while the frame arrived at {t}");
    }
    // It ends as the job's result: heard.
    report(&mut edge, t, &sid, "j1", done("big"));
    assert_eq!(edge.job("j1").unwrap().state, JobState::Succeeded, "ended as the agent had it");
    assert!(closed(&edge.tick(t + 2 * HB - 1)).is_none());
    // The same result again (played back on the path), after bytes at a tenth of the rate:
    // no life from either; the connection is silent once two intervals pass.
    edge.arriving(t + HB, &sid, 10_000_000);
    edge.arriving(t + 2 * HB - 1, &sid, 10_000_000 + RATE / 10);
    report(&mut edge, t + 2 * HB - 1, &sid, "j1", done("big"));
    assert_eq!(closed(&edge.tick(t + 2 * HB)).map(|c| c.0), Some(shared::protocol::close::SILENT));
}

/// rev20, 1: a host that reads sockets apart from the machine (the native edge) may have a
/// heartbeat read whole and still waiting for the machine's turn — behind a flood of
/// requests — when the connection's deadline comes: the connection is not judged silent
/// while a frame it sent before then waits (`Edge::frame_waiting`, stamped by the socket),
/// and is judged as usual once the frames are handled: a heartbeat among them keeps it, and
/// frames that were nothing new leave it silent.
#[test]
fn a_frame_read_in_time_and_waiting_for_its_turn_keeps_the_connection() {
    let (mut edge, sid) = ready_edge();
    let due = edge.session(&sid).unwrap().deadline(HB);
    // A heartbeat arrived before the deadline; the machine has not had it yet.
    edge.frame_waiting(&sid, Some(due - 10));
    assert!(closed(&edge.tick(due + HB)).is_none(), "closed while the heartbeat it sent in time waited for its turn");
    // Its turn comes: heard, and the connection lives on.
    pulse(&mut edge, due + HB, &sid, beat(&[], 1, 1));
    edge.frame_waiting(&sid, None);
    assert!(closed(&edge.tick(due + 2 * HB)).is_none());
    // A frame that waited and turned out to be nothing new earns nothing once handled.
    let due = edge.session(&sid).unwrap().deadline(HB);
    edge.frame_waiting(&sid, Some(due - 10));
    assert!(closed(&edge.tick(due)).is_none());
    say(&mut edge, due, &sid, credit(1, 0));
    edge.frame_waiting(&sid, None);
    assert_eq!(closed(&edge.tick(due)).map(|c| c.0), Some(shared::protocol::close::SILENT));
}

/// rev20, 1: the callers reading one ended job while the others' answers are still on
/// their way share one text of it, read from storage once, so a flood of readers that
/// never read their answers holds one copy, not one each (800 such readers of a 1 MiB
/// result took the native edge past a gigabyte). None is kept once no answer holds it.
#[test]
fn readers_of_an_ended_job_share_one_text_of_it() {
    use std::sync::Arc;
    let (mut edge, sid) = ready_edge();
    let first = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "p", "timeout_ms": 60000}));
    let job_id = order_of(&first.effects, &sid, "spark", 0).header.job_id;
    let effects = report(&mut edge, 1, &sid, &job_id, JobResult { output: "o".repeat(100_000), ..ok_result() });
    let whole = effects.iter().find_map(|e| match e {
        Effect::Save(job) if job.state.is_terminal() => Some((**job).clone()),
        _ => None,
    });
    let whole = whole.expect("the whole record is stored");
    let path = format!("/jobs/{job_id}");
    let body_of = |effects: &[Effect], caller: CallerId| -> Arc<str> {
        effects
            .iter()
            .find_map(|e| match e {
                Effect::Answer { caller: c, response } if *c == caller => Some(Arc::clone(&response.body)),
                _ => None,
            })
            .expect("answered")
    };
    // Once ended only its header is in memory: read from storage once, then shared.
    assert!(edge.job(&job_id).unwrap().header_only);
    let read = |edge: &mut Edge| -> (CallerId, Vec<Effect>, bool) {
        let handled = call(edge, 3, "GET", &path, Value::Null);
        let deliver = handled.effects.iter().find_map(|e| match e {
            Effect::Deliver { caller, job_id, form } => Some((*caller, job_id.clone(), *form)),
            _ => None,
        });
        match deliver {
            Some((caller, id, form)) => (caller, edge.delivered(caller, &id, form, Ok(Some(whole.clone())), 3.into()), true),
            None => (handled.caller, handled.effects, false),
        }
    };
    let c = {
        let (c, effects, stored) = read(&mut edge);
        assert!(stored, "the first reader's answer is read from storage");
        body_of(&effects, c)
    };
    let (d, effects, stored) = read(&mut edge);
    assert!(!stored, "read from storage again while the first reader's answer was still on its way");
    assert!(Arc::ptr_eq(&c, &body_of(&effects, d)), "two readers of one ended job were each given a copy");
    drop(c);
    drop(effects);
    let (_, _, stored) = read(&mut edge);
    assert!(stored, "a text no answer holds any more is not kept");
}

/// A result that succeeded, saying `output`.
fn done(output: &str) -> JobResult {
    JobResult { success: true, error_code: None, error: None, output: output.into(), ..JobResult::failure(shared::contract::ErrorCode::Cancelled, "", 1) }
}

/// rev8: a power cut at the native edge (SQLite's WAL not yet synced) can lose the stored
/// dispatch of a job whose order went out: back, the edge has it queued and sends it again
/// — to the same agent, which still runs the first copy and is told to stop it. Every
/// order's nonce was `<job>:<attempt>`, so the new order was `<job>:1` again, and the
/// stopped copy's `cancelled` result, bound to the forgotten order, was taken for the new
/// one's. Each order's nonce now carries a tag of the connection it went on: no result of
/// a forgotten order is taken for a new one.
#[test]
fn a_result_of_an_order_the_edge_forgot_is_never_taken_for_a_new_order() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let mut stored: std::collections::BTreeMap<String, crate::record::Job> = Default::default();
    for e in edge.submit(0, "j".into(), submission("x", 600_000, None), Mode::Detached).unwrap().effects {
        if let Effect::Save(job) = e {
            stored.insert(job.id.clone(), std::sync::Arc::unwrap_or_clone(job));
        }
    }
    // Dispatched on the agent's statement of slots: the power cut loses that event's save.
    let first = order_of(&say(&mut edge, 1, &sid, credit(1, 0)), &sid, "spark", 1);
    say(&mut edge, 2, &sid, AgentMessage::Accepted { job_id: "j".into() });
    drop(edge);

    let (mut edge, _) = Edge::restart(config(), stored.into_values().collect(), None, 100);
    assert_eq!(edge.job("j").unwrap().state, JobState::Queued);
    // The agent is back still running the first copy: told to stop it, and sent the job
    // again on its next statement of slots.
    let (sid2, effects) = rejoin(&mut edge, 101, &["j"], &[], 2);
    assert_eq!(cancels(&effects, &sid2), vec!["j".to_string()]);
    let again = order_of(&say(&mut edge, 102, &sid2, credit(1, 0)), &sid2, "spark", 102);
    assert_eq!(again.header.job_id, "j");
    assert_ne!(again.header.nonce, first.header.nonce, "a new order has a nonce of its own");
    // The stopped copy's result, bound to the forgotten order: acknowledged, not taken.
    let stopped = JobResult::failure(shared::contract::ErrorCode::Cancelled, "cancelled by the edge", 3);
    let stale = AgentMessage::result("j", &first.header.nonce, stopped, &link(&edge, &sid2));
    let effects = say(&mut edge, 103, &sid2, stale);
    assert!(finished(&effects).is_empty(), "the forgotten order's result ended the new one: {effects:?}");
    assert!(matches!(sent(&effects, &sid2)[..], [EdgeMessage::ResultAck { .. }]));
    assert!(!edge.job("j").unwrap().state.is_terminal());
    // The new order's own result ends it.
    let done = finished(&report(&mut edge, 104, &sid2, "j", ok_result()));
    assert_eq!((done.len(), done[0].2["success"].as_bool()), (1, Some(true)), "{done:?}");
}

/// Review rev20, finding 3: an agent whose DATA_DIR's disk was full answered every job at
/// once with a 500 INTERNAL_ERROR while `/health` said it took work. Now it says it
/// cannot start jobs (its heartbeat, before it hands the job back) and refuses the order
/// with `retry`: the edge holds it back as it does a stopping agent — `/health` 503 with
/// its reason, an `/execute` only it fits falls back (503 RUNNER_OFFLINE, naming the
/// reason), a `POST /jobs` job waits — until a heartbeat says it can again.
#[test]
fn an_agent_that_cannot_start_jobs_hands_them_back_and_takes_none_until_it_can() {
    let (mut edge, sid) = ready_edge();
    let waiting = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "a", "timeout_ms": 60000}));
    let id = order_of(&waiting.effects, &sid, "spark", 0).header.job_id;
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: id.clone() });
    let why = "it cannot make a job's workspace in /data/workspaces (No space left on device): free space on that folder's disk";
    pulse(&mut edge, 2, &sid, Beat { cannot_start: Some(why.into()), ..beat(&[&id], 0, 1) });
    let effects = refuse(&mut edge, 3, &sid, &id, &format!("the agent could not start the job: {why}"), true);
    let answer = answer_to(&effects, waiting.caller);
    assert!(orders(&effects, &sid).is_empty(), "sent back to the agent that cannot start it");
    let (status, body) = answer.expect("the /execute caller waits for an agent that cannot start its job");
    assert_eq!((status, body["error_code"].as_str(), body["fallback"].as_bool()), (503, Some("RUNNER_OFFLINE"), Some(true)), "{body}");
    assert!(body["error"].as_str().unwrap().contains("free space on that folder's disk"), "{body}");
    let health = edge.health(4);
    assert_eq!(health.status.http_status(), 503, "{health:?}");
    assert_eq!((health.agents[0].takes_work, health.agents[0].cannot_start.as_deref()), (false, Some(why)), "{health:?}");

    // A `POST /jobs` job waits for it, and goes once it says it can start jobs again.
    let s = edge.submit(5, "later".into(), submission("y", 600_000, None), Mode::Detached).unwrap();
    assert!(sent(&s.effects, &sid).is_empty(), "sent to an agent that cannot start it");
    let waiting = edge.job_view(5, edge.job("later").unwrap()).waiting_for.expect("queued: why it waits");
    assert_eq!(waiting.code, shared::contract::WaitCode::CannotStart, "{waiting:?}");
    assert!(waiting.message.contains("free space on that folder's disk"), "{waiting:?}");
    pulse(&mut edge, 6, &sid, beat(&[], 0, 1));
    let effects = say(&mut edge, 7, &sid, credit(1, 1));
    assert_eq!(order_of(&effects, &sid, "spark", 7).header.job_id, "later");
    assert_eq!(edge.health(8).status.http_status(), 200);
}

/// A job refused with `retry` again and again (agents that each hand it back, healing in
/// between) does not go round for ever: at [`crate::machine::MAX_JOB_SENDS`] sends it
/// ends, RUNNER_OFFLINE, with the last refusal's words. It never ran: a repeat of its key
/// makes a new job (review rev36a, 1).
#[test]
fn a_job_handed_back_again_and_again_ends_rather_than_go_round() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 600_000, Some("k")), Mode::Detached).unwrap();
    let mut received = 0;
    let done = loop {
        received += 1;
        assert!(received <= 100, "still sent after {received} refusals");
        let effects = refuse(&mut edge, received, &sid, "j1", "the agent could not start the job: its disk is full", true);
        if let Some(done) = finished(&effects).pop() {
            break done;
        }
        let effects = say(&mut edge, received, &sid, credit(1, received));
        assert_eq!(order_of(&effects, &sid, "spark", received).header.job_id, "j1");
    };
    assert_eq!(edge.job("j1").unwrap().attempts, crate::machine::MAX_JOB_SENDS);
    assert_eq!(done.2["error_code"], "RUNNER_OFFLINE", "{done:?}");
    assert!(done.2["error"].as_str().unwrap().contains("its disk is full"), "{done:?}");
    let again = edge.submit(200, "j2".into(), submission("x", 600_000, Some("k")), Mode::Detached).unwrap();
    assert!(!again.existing && again.job_id == "j2", "{again:?}");
}

/// The bound counts a job's sends, whatever became of them ([`crate::machine::MAX_JOB_SENDS`],
/// `Job::attempts`): orders lost on the way and sent again count as refused ones do, so a
/// job sent past the bound ends at its first refusal — and its result says how often it
/// was sent, not the bound ("16 times" of a job sent 19 times and refused once).
#[test]
fn a_job_sent_past_the_bound_ends_at_its_next_refusal_saying_how_often_it_was_sent() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 600_000, None), Mode::Detached).unwrap();
    let past = crate::machine::MAX_JOB_SENDS + 3;
    // Each order lost on the way: the agent's beat says it received it and holds nothing,
    // and the edge sends it again.
    for now in 1..u64::from(past) {
        let sent = edge.job("j1").unwrap().attempts;
        let effects = pulse(&mut edge, now, &sid, beat(&[], 1, u64::from(sent)));
        assert_eq!(orders(&effects, &sid), vec!["j1".to_string()], "sent again");
        assert_eq!(edge.job("j1").unwrap().attempts, sent + 1);
    }
    assert_eq!(edge.job("j1").unwrap().attempts, past);
    let effects = refuse(&mut edge, 100, &sid, "j1", "the agent could not start the job: its disk is full", true);
    let done = finished(&effects).pop().expect("ended at its first refusal past the bound");
    assert_eq!(done.2["error_code"], "RUNNER_OFFLINE", "{done:?}");
    let error = done.2["error"].as_str().unwrap();
    assert!(error.contains(&format!("sent to agents {past} times")) && error.contains("its disk is full"), "{error}");
}

/// review rev32, 1: the job's end after MAX_JOB_SENDS quoted the last agent's refusal to its
/// named caller (its DATA_DIR, its disk's error); that is the operator's to read.
#[test]
fn a_named_callers_job_ended_past_the_sends_bound_names_no_agents_own_report() {
    use super::routing::{request, answer, A_SECRET, pool_config};
    let mut edge = Edge::new(pool_config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(1, 0));
    let (status, body) = answer(&request(&mut edge, 0, A_SECRET, "POST", "/jobs", json!({"prompt": "x"})));
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    for now in 1..u64::from(crate::machine::MAX_JOB_SENDS) {
        let sent = edge.job(&id).unwrap().attempts;
        pulse(&mut edge, now, &sid, beat(&[], 1, u64::from(sent)));
    }
    let why = "the agent could not start the job: it cannot make a job's workspace in /home/spark/.local/share/claude-runner/workspaces (No space left on device (os error 28))";
    refuse(&mut edge, 100, &sid, &id, why, true);
    let job = edge.job(&id).expect("the ended job is kept");
    let text = serde_json::to_string(&job.result).unwrap();
    assert!(text.contains("sent to agents") && text.contains("cannot_start"), "ended past the bound, pointing to the operator: {text}");
    assert!(!text.contains("/home/spark") && !text.contains("No space left"), "an agent's own words told to a named caller: {text}");
}

/// Job records as a host stores them.
type Stored = std::collections::HashMap<String, crate::record::Job>;

/// Stores the records `effects` save, as a host would.
fn keep(stored: &mut Stored, effects: &[Effect]) {
    for e in effects {
        if let Effect::Save(job) = e {
            stored.insert(job.id.clone(), (**job).clone());
        }
    }
}

/// The welcome's `given_up` in `effects`, sent on `sid`.
fn given_up_in(effects: &[Effect], sid: &str) -> Vec<String> {
    let Some(EdgeMessage::Welcome { envelope }) = sent(effects, sid).into_iter().next() else { panic!("the welcome first: {effects:?}") };
    let welcome: Welcome = envelope.open(Domain::Welcome, &edge_key().verifying_key()).unwrap();
    welcome.given_up
}

/// The edge crashes (no clean stop) while its agent holds `/execute` jobs: one sent and not
/// yet taken, one accepted and held before its start (at the login's refresh gate, in a
/// long checkout), one started. The callers' requests died with the edge, unanswered, and
/// they may have run the tasks elsewhere: the restart ends the two not started as it ends a
/// queued one (rev34-3: they were kept, and the agent started the held one once its gate
/// opened), and the agent's welcome names them given up, so it never starts them. The
/// started one, and a `POST /jobs` job held the same way, go on.
#[test]
fn a_crash_ends_the_execute_jobs_their_agent_had_not_started() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 4);
    let mut stored = Stored::default();
    say(&mut edge, 0, &sid, credit(4, 0));
    for (id, mode) in [("sent", Mode::Wait), ("held", Mode::Wait), ("ran", Mode::Wait), ("detached", Mode::Detached)] {
        keep(&mut stored, &edge.submit(1, id.into(), submission(id, 600_000, None), mode).unwrap().effects);
    }
    for id in ["held", "ran", "detached"] {
        keep(&mut stored, &say(&mut edge, 2, &sid, AgentMessage::Accepted { job_id: id.into() }));
    }
    keep(&mut stored, &start(&mut edge, 3, &sid, "ran"));
    drop(edge);
    assert_eq!(stored["sent"].state, JobState::Dispatched);
    assert!(stored["held"].unstarted && stored["detached"].unstarted && !stored["ran"].unstarted);

    let (mut edge, effects) = Edge::restart(config(), stored.into_values().collect(), None, 1_000);
    let mut ended = finished(&effects);
    ended.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(ended.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["held", "sent"], "{ended:?}");
    for (_, status, body) in &ended {
        assert_eq!((*status, body["error_code"].as_str(), body["fallback"].as_bool()), (503, Some("RUNNER_OFFLINE"), Some(true)), "{body}");
        assert!(body["error"].as_str().unwrap().contains("its caller is gone; it will not run: submit it again"), "{body}");
    }
    // The agent comes back holding what it had: told not to start the held one.
    let (sid, effects) = join_with(&mut edge, 1_001, "spark", &agent_key(1), vec!["held".into(), "ran".into(), "detached".into()], 2, 4);
    assert_eq!(given_up_in(&effects, &sid), ["held"]);
    assert_eq!(cancels(&effects, &sid), ["held"]);
    for id in ["ran", "detached"] {
        assert_eq!(edge.job(id).unwrap().state, JobState::Running, "{id} goes on");
    }
}

/// A clean stop told the `/execute` caller of a job its agent accepted but had not started
/// to follow it (`EDGE_RESTARTING`, no fallback): the restart keeps that job, and a crash
/// after the restart still does (its caller was told to follow it, not to fall back).
#[test]
fn a_clean_stop_keeps_the_execute_jobs_whose_callers_it_told_to_follow() {
    let (mut edge, sid) = ready_edge();
    let mut stored = Stored::default();
    let held = call(&mut edge, 0, "POST", "/execute", json!({"prompt": "held", "timeout_ms": 600000}));
    keep(&mut stored, &held.effects);
    let job_id = order_of(&held.effects, &sid, "spark", 0).header.job_id;
    keep(&mut stored, &say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: job_id.clone() }));
    let effects = edge.shutdown(2);
    keep(&mut stored, &effects);
    let (_, body) = answer_to(&effects, held.caller).unwrap();
    assert_eq!(body["error_code"], "EDGE_RESTARTING", "{body}");
    for back in [1_000, 2_000] {
        let (mut edge, effects) = Edge::restart(config(), stored.clone().into_values().collect(), None, back);
        keep(&mut stored, &effects);
        assert!(finished(&effects).is_empty(), "{effects:?}");
        let (sid, effects) = rejoin(&mut edge, back + 1, &[&job_id], &[], 2);
        assert!(given_up_in(&effects, &sid).is_empty());
        assert_eq!(edge.job(&job_id).unwrap().state, JobState::Running);
    }
}

/// The edge is restarted with a smaller `LOST_AFTER_MS` while an agent holds a job it has
/// not started (its refresh gate) and cannot reach the edge: the agent still starts jobs by
/// its last welcome's value, so the edge gives the job up only after that — had it used the
/// new one, the agent would start the job after the edge ended it and its caller fell back
/// (rev34-2). Once the agent is welcomed with the new value, the job's wait follows it.
#[test]
fn a_smaller_lost_after_ms_after_a_restart_waits_as_long_as_the_agent_was_told() {
    let (mut edge, sid) = ready_edge();
    let mut stored = Stored::default();
    keep(&mut stored, &edge.submit(0, "held".into(), submission("x", 600_000, None), Mode::Detached).unwrap().effects);
    keep(&mut stored, &say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "held".into() }));
    assert_eq!(stored["held"].told_lost_after_ms, Some(LOST));
    drop(edge);

    let smaller = Config { lost_after_ms: LOST / 2, ..config() };
    let (mut edge, effects) = Edge::restart(smaller.clone(), stored.clone().into_values().collect(), None, 1_000);
    keep(&mut stored, &effects);
    assert!(finished(&edge.tick(1_000 + LOST / 2)).is_empty(), "given up before the agent's own count ran out");
    let done = finished(&edge.tick(1_000 + LOST));
    assert_eq!((done.len(), done[0].2["error_code"].as_str()), (1, Some("RUNNER_LOST")), "{done:?}");

    // Back under the new value, then gone again: the new value is the agent's now.
    let (mut edge, _) = Edge::restart(smaller, stored.into_values().collect(), None, 1_000);
    let (sid, _) = rejoin(&mut edge, 1_001, &["held"], &[], 2);
    assert_eq!(edge.job("held").unwrap().told_lost_after_ms, Some(LOST / 2));
    edge.disconnect(1_002, &sid);
    assert!(finished(&edge.tick(1_002 + LOST / 2 - 1)).is_empty());
    assert_eq!(finished(&edge.tick(1_002 + LOST / 2)).len(), 1);
}
