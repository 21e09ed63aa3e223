//! Decisions the two hosts used to make each their own way, now the machine's: frames on
//! connections it does not know, broken and oversized uploads, the 426 answer, who gets a
//! job's answer; and time — a wall clock that jumps.

use super::*;
use crate::body::Intake;
use crate::Now;

#[test]
fn a_frame_on_a_connection_the_edge_does_not_know_closes_it() {
    let mut edge = Edge::new(config(), 0);
    for effects in [edge.message(0, "nope", "{}"), edge.binary_frame(0, "nope")] {
        let (code, reason) = closed(&effects).unwrap();
        assert_eq!(code, close::PROTOCOL_ERROR);
        assert!(reason.contains("no record") && reason.contains("reconnect"), "{reason}");
    }
    // The same once the edge has closed a connection and frames still arrive on it.
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let hb = signed(&edge, &sid, beat(&[], 1, 0));
    edge.binary_frame(0, &sid);
    assert_eq!(closed(&say(&mut edge, 1, &sid, hb)).unwrap().0, close::PROTOCOL_ERROR);
    assert!(!edge.is_online());
}

/// `POST /jobs` with the secret, its body as the host read it.
fn post_jobs(body: crate::body::Body) -> Request {
    Request {
        method: "POST".into(),
        path: "/jobs".into(),
        secret_header: Some(SECRET.into()),
        authorization: None,
        idempotency_key: None,
        last_event_id: None,
        body,
    }
}

#[test]
fn a_broken_upload_is_a_400_and_an_oversized_one_a_413() {
    let mut edge = Edge::new(config(), 0);
    let mut handle = |body: crate::body::Body| {
        let handled = http::handle(&mut edge, 0, [1; 16], &post_jobs(body));
        answer_to(&handled.effects, handled.caller).unwrap()
    };
    let mut broken = Intake::new(1024);
    broken.chunk(br#"{"prompt": "x"#);
    broken.failed("connection reset by peer");
    let (status, body) = handle(broken.finish());
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("connection reset by peer"), "{body}");
    let mut large = Intake::new(1024);
    large.chunk(&[b' '; 2000]);
    assert_eq!(handle(large.finish()).0, 413);
    // A body that did not arrive in time: 408, and its connection closed (what is left of
    // the body may still come).
    let mut late = Intake::new(1024);
    late.chunk(br#"{"prompt": "#);
    late.timed_out(30_012);
    let handled = http::handle(&mut edge, 0, [2; 16], &post_jobs(late.finish()));
    let answer = handled.effects.iter().find_map(|e| match e {
        Effect::Answer { response, .. } => Some(response.clone()),
        _ => None,
    });
    let answer = answer.expect("answered at once");
    assert_eq!(answer.status, 408, "{}", answer.body);
    assert!(answer.body.contains("within 31 s") && answer.body.contains("send the request again"), "{}", answer.body);
    assert!(answer.headers.iter().any(|(name, value)| *name == "connection" && value == "close"), "{:?}", answer.headers);
    let upgrade = http::upgrade_required();
    assert_eq!(upgrade.status, 426);
    assert!(upgrade.body.contains("Upgrade: websocket") && upgrade.body.contains("Sec-WebSocket-Key") && upgrade.body.contains("Connection: Upgrade"), "{}", upgrade.body);
}

/// What either host takes for a WebSocket handshake before it looks at the proof.
#[test]
fn a_handshake_needs_its_upgrade_version_and_key() {
    let full = [("upgrade", "websocket"), ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")];
    let with = |skip: &str, set: &[(&str, &str)]| {
        let headers: Vec<(String, String)> = full
            .iter()
            .filter(|(n, _)| *n != skip)
            .map(|(n, v)| (n.to_string(), set.iter().find(|(m, _)| m == n).map_or(*v, |(_, v)| *v).to_string()))
            .collect();
        move |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    };
    assert!(crate::upgrade::is_handshake("GET", with("", &[])));
    assert!(crate::upgrade::is_handshake("GET", with("", &[("upgrade", "h2c, WebSocket")])));
    assert!(!crate::upgrade::is_handshake("POST", with("", &[])));
    for missing in ["upgrade", "sec-websocket-version", "sec-websocket-key"] {
        assert!(!crate::upgrade::is_handshake("GET", with(missing, &[])), "{missing}");
    }
    assert!(!crate::upgrade::is_handshake("GET", with("", &[("sec-websocket-version", "8")])));
    assert!(!crate::upgrade::is_handshake("GET", with("", &[("sec-websocket-key", " ")])));
}

#[test]
fn every_caller_of_a_job_gets_its_answer_once() {
    let (mut edge, sid) = ready_edge();
    let body = json!({"prompt": "x", "timeout_ms": 60000, "idempotency_key": "same"});
    let first = call(&mut edge, 0, "POST", "/execute", body.clone());
    let job_id = order_of(&first.effects, &sid, "spark", 0).header.job_id;
    let second = call(&mut edge, 1, "POST", "/execute", body.clone());
    let third = call(&mut edge, 1, "POST", "/execute", body);
    // One caller's host gave up waiting: it is told where to look, and forgotten.
    let effects = edge.wait_expired(2, second.caller);
    let (status, answer) = answer_to(&effects, second.caller).unwrap();
    assert_eq!(status, 200);
    assert!(answer["error"].as_str().unwrap().contains(&format!("GET /jobs/{job_id}")), "{answer}");
    assert!(edge.wait_expired(2, second.caller).is_empty(), "answered once");
    // Another hung up.
    assert!(edge.caller_gone(2, third.caller).is_empty());
    let effects = report(&mut edge, 3, &sid, &job_id, ok_result());
    assert_eq!(answer_to(&effects, first.caller).unwrap().0, 200);
    let answers = effects.iter().filter(|e| matches!(e, Effect::Answer { .. })).count();
    assert_eq!(answers, 1, "only the caller still waiting: {effects:?}");
    assert_eq!(edge.callers_waiting(), 0);
}

/// Connects `agent` at `now`, its hello stamped with the wall clock (as agents do).
fn join_at(edge: &mut Edge, now: Now, agent: &str, seed: u8, running: Vec<String>) -> String {
    let (sid, effects) = edge.connect(now, [seed; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, server_time, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    assert_eq!(*server_time, now.wall, "the agent is shown the wall clock");
    let hello = Hello { running, ..hello(agent, nonce, now.wall) };
    let effects = edge.message(now, &sid, &hello_text(&hello, &agent_key(1)));
    assert!(closed(&effects).is_none(), "{effects:?}");
    sid
}

#[test]
fn a_wall_clock_jump_neither_times_out_running_jobs_nor_breaks_orders() {
    const WALL: u64 = 1_800_000_000_000;
    const JUMP: u64 = 2 * 3_600_000;
    // Edge time starts where the wall clock was; then the wall clock jumps two hours ahead.
    let at = |t: u64| Now { at: WALL + t, wall: WALL + t };
    let jumped = |t: u64| Now { at: WALL + t, wall: WALL + t + JUMP };
    let mut edge = Edge::new(config(), at(0));
    let sid = join_at(&mut edge, at(0), "spark", 1, vec![]);
    say(&mut edge, WALL, &sid, credit(1, 0));
    let job = call(&mut edge, at(10), "POST", "/execute", json!({"prompt": "x", "timeout_ms": 60000}));
    let order = order_of(&job.effects, &sid, "spark", WALL + 10);
    assert_eq!(order.header.issued_at, WALL + 10);

    for t in (1_000..=5_000).step_by(1_000) {
        let effects = edge.message(jumped(t), &sid, &signed(&edge, &sid, beat(&[&order.header.job_id], 0, 1)).to_text());
        let ack = sent(&effects, &sid);
        let [EdgeMessage::HeartbeatAck { envelope }] = &ack[..] else { panic!("{ack:?}") };
        let key = edge.session(&sid).unwrap().agent().unwrap().keys.edge_to_agent.clone();
        let ack: shared::protocol::BeatAck = envelope.open(shared::envelope::Domain::HeartbeatAck, &key).unwrap();
        assert_eq!(ack.server_time, WALL + t + JUMP);
        assert!(edge.tick(jumped(t)).is_empty(), "nothing is due two hours early");
    }
    assert_eq!(edge.job(&order.header.job_id).unwrap().state, JobState::Running, "the heartbeat says it runs");
    let cfg = config();
    let deadline = |edge: &Edge| edge.job(&order.header.job_id).unwrap().deadline(cfg.lost_after_ms, cfg.queue_ttl_ms, cfg.timeout_margin_ms);
    assert_eq!(deadline(&edge), Some(WALL + 10 + 60_000 + cfg.timeout_margin_ms), "the deadline is on edge time");
    // People are shown the wall clock: the job was created 4990 ms ago, by the new clock.
    let view = edge.job(&order.header.job_id).unwrap().view(jumped(5_000));
    assert_eq!(view.created_at, shared::time::rfc3339(WALL + 10 + JUMP));
    assert_eq!(edge.health(jumped(5_000)).timestamp, shared::time::rfc3339(WALL + 5_000 + JUMP));

    assert!(finished(&edge.tick(jumped(60_000))).is_empty());
    assert_eq!(deadline(&edge), Some(WALL + 10 + 60_000 + cfg.timeout_margin_ms));

    // An agent connecting now stamps its hello with the (new) wall clock: accepted.
    edge.disconnect(jumped(60_000), &sid);
    let sid2 = join_at(&mut edge, jumped(60_001), "spark", 2, vec![order.header.job_id.clone()]);
    // A cancel order carries the wall clock too, so the agent's freshness check passes.
    let effects = edge.cancel(jumped(60_002), &order.header.job_id).unwrap();
    let cancel = sent(&effects, &sid2).into_iter().find_map(|m| match m {
        EdgeMessage::Cancel { envelope } => Some(envelope),
        _ => None,
    });
    let opened: shared::protocol::CancelOrder =
        open_order(&cancel.unwrap(), Domain::Cancel, &edge_key().verifying_key(), SPARK, WALL + 60_002 + JUMP).unwrap();
    assert_eq!(opened.header.issued_at, WALL + 60_002 + JUMP);

    // And once its edge time is up, it times out, though the wall clock now went back.
    let due = WALL + 10 + 60_000 + cfg.timeout_margin_ms;
    let effects = edge.tick(Now { at: due, wall: WALL - 3_600_000 });
    assert_eq!(finished(&effects)[0].2["error_code"], "TIMEOUT");
}

/// Records outlive the edge, and the native host sets edge time's epoch to the wall clock
/// at start-up: a job stored by a run whose clock was ahead (stepped back by NTP before
/// the restart) carries edge times ahead of the new run's. What already happened is shown
/// as at the latest now, never as a date still to come (d1f6369 let every future edge time
/// through for a login's deadline, so such a job was shown as created tomorrow).
#[test]
fn a_stored_time_ahead_of_now_is_not_shown_as_a_date_to_come() {
    const WALL: u64 = 1_800_000_000_000;
    const AHEAD: u64 = 24 * 3_600_000;
    let ahead = |t: u64| Now { at: WALL + AHEAD + t, wall: WALL + AHEAD + t };
    let mut edge = Edge::new(config(), ahead(0));
    let sid = join_at(&mut edge, ahead(0), "spark", 1, vec![]);
    say(&mut edge, WALL + AHEAD, &sid, credit(1, 0));
    let job = call(&mut edge, ahead(10), "POST", "/execute", json!({"prompt": "x", "timeout_ms": 60000}));
    let order = order_of(&job.effects, &sid, "spark", WALL + AHEAD + 10);
    // The next run: its clock right, a day behind the stored times.
    let after = Now { at: WALL + 100, wall: WALL + 100 };
    let view = edge.job(&order.header.job_id).unwrap().view(after);
    assert_eq!(view.created_at, shared::time::rfc3339(WALL + 100), "{view:?}");
}

#[test]
fn a_host_failure_on_a_task_says_it_may_be_queued_and_elsewhere_to_retry() {
    // A Worker that lost an `/execute` answer (or could not reach its object after sending
    // the task) must not tell the caller to retry blindly: the job may run all the same.
    for (method, path) in [("POST", "/execute"), ("POST", "/jobs/"), ("POST", "/jobs")] {
        let answer = crate::http::host_failed(method, path, "the edge lost this request while waiting");
        assert_eq!(answer.status, 500);
        let body: Value = serde_json::from_str(&answer.body).unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("may have been queued") && error.contains("GET /jobs") && !error.ends_with("retry"), "{error}");
    }
    for (method, path, status) in [("GET", "/jobs", 500), ("DELETE", "/jobs/j1", 500), ("GET", "/health", 503), ("POST", "/oauth/login", 500)] {
        let answer = crate::http::host_failed(method, path, "the edge failed to answer: boom");
        assert_eq!(answer.status, status, "{method} {path}");
        let body: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(body["error"], "the edge failed to answer: boom; retry", "{method} {path}");
    }
}
