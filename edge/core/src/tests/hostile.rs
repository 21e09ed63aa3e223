//! What a caller without the secret, an unproven connection or a forging path between
//! agent and edge can make the edge do: as little as possible (issue 7).

use super::*;
use crate::http::Gate;
use shared::protocol::ProgressEvent;

fn gate(method: &str, path: &str, secret: Option<&str>) -> Gate {
    http::preflight(&config(), method, path, secret, None)
}

#[test]
fn no_body_is_read_before_auth_nor_for_a_route_that_takes_none() {
    // The agents' socket, with or without a trailing slash, never goes to the general
    // handler (which would read a body).
    for path in ["/agent/connect", "/agent/connect/", "/agent/connect//"] {
        for method in ["GET", "POST"] {
            assert_eq!(gate(method, path, None), Gate::AgentSocket, "{method} {path}");
        }
    }
    for (method, path) in [("POST", "/execute"), ("POST", "/jobs"), ("POST", "/nope"), ("POST", "/agent"), ("DELETE", "/jobs/x")] {
        assert!(matches!(gate(method, path, None), Gate::Answer(_)), "{method} {path} without the secret");
    }
    for (method, path) in [("GET", "/health"), ("HEAD", "/health/"), ("GET", "/")] {
        assert_eq!(gate(method, path, None), Gate::Handle { read_body: false }, "{method} {path}");
    }
    for (method, path, read) in [
        ("POST", "/execute", true),
        ("POST", "/jobs/", true),
        ("GET", "/jobs/x", false),
        ("DELETE", "/jobs/x", false),
        ("GET", "/metrics", false),
        ("POST", "/oauth/login", true),
        ("POST", "/oauth/login/code", true),
        ("GET", "/jobs", false),
    ] {
        assert_eq!(gate(method, path, Some(SECRET)), Gate::Handle { read_body: read }, "{method} {path}");
    }
    // A method the route does not take is answered from the method and route alone.
    for (method, path) in [("GET", "/execute"), ("POST", "/oauth/status"), ("PUT", "/jobs/x"), ("HEAD", "/jobs/x/events")] {
        let Gate::Answer(answer) = gate(method, path, Some(SECRET)) else { panic!("{method} {path}: 405") };
        assert_eq!(answer.status, 405, "{method} {path}");
    }
    // A long path is not echoed whole.
    let Gate::Answer(answer) = gate("GET", &format!("/{}", "x".repeat(10_000)), None) else { panic!("404") };
    assert_eq!(answer.status, 404);
    assert!(answer.body.len() < 1_000, "{}", answer.body.len());
}

#[test]
fn only_the_secret_itself_opens_the_edge() {
    // The comparison hashes both sides (their lengths must not show in its time): what
    // is near the secret — a prefix, an extension, another case, empty — is refused.
    let upper = SECRET.to_uppercase();
    let (prefix, longer) = (&SECRET[..SECRET.len() - 1], format!("{SECRET}x"));
    for wrong in ["", prefix, longer.as_str(), upper.as_str()] {
        assert!(http::who(&config(), Some(wrong), None).is_none(), "{wrong:?}");
        assert!(http::who(&config(), None, Some(&format!("Bearer {wrong}"))).is_none(), "bearer {wrong:?}");
    }
    assert_eq!(http::who(&config(), Some(&format!(" {SECRET} ")), None), Some(http::Who::Pool));
    assert_eq!(http::who(&config(), Some(&format!("\t{SECRET}\t")), None), Some(http::Who::Pool));
    assert_eq!(http::who(&config(), None, Some(&format!("Bearer {SECRET}"))), Some(http::Who::Pool));
    // Only HTTP's own whitespace (spaces and tabs) is trimmed, as the Worker's runtime
    // trims a header: Unicode's (U+00A0, U+3000) was too, so the native edge let in what
    // the Worker refused.
    for near in ["\u{a0}", "\u{3000}", "\u{2003}", "\u{85}"] {
        assert!(http::who(&config(), Some(&format!("{SECRET}{near}")), None).is_none(), "{near:?}");
        assert!(http::who(&config(), None, Some(&format!("Bearer {near}{SECRET}"))).is_none(), "bearer {near:?}");
    }
}

#[test]
fn health_without_the_secret_is_the_verdict_alone() {
    let (mut edge, _) = ready_edge();
    let health = |edge: &mut Edge, secret: Option<&str>| {
        let req = Request {
            method: "GET".into(),
            path: "/health".into(),
            secret_header: secret.map(str::to_string),
            authorization: None,
            idempotency_key: None,
            last_event_id: None,
            body: Body::Bytes(Vec::new()),
        };
        let handled = http::handle(edge, 0, [0; 16], &req);
        answer_to(&handled.effects, handled.caller).unwrap()
    };
    for secret in [None, Some("wrong-secret-0000000")] {
        let (status, body) = health(&mut edge, secret);
        assert_eq!(status, 200);
        assert_eq!(body, json!({"status": "healthy"}), "{secret:?}");
    }
    let (status, body) = health(&mut edge, Some(SECRET));
    assert_eq!(status, 200);
    assert_eq!(body["agent"]["agent_id"], "spark");
    assert_eq!(body["oauth"]["source"], "oauth_token_env");
    let mut offline = Edge::new(config(), 0);
    assert_eq!(health(&mut offline, None), (503, json!({"status": "offline"})));
}

/// Entropy making session `n`.
fn seed(n: u64) -> [u8; 64] {
    let mut e = [7u8; 64];
    e[..8].copy_from_slice(&n.to_be_bytes());
    e
}

fn pending(edge: &Edge) -> usize {
    edge.unproven_connections()
}

/// Answers the challenge in `effects` with `spark`'s signed hello.
fn prove(edge: &mut Edge, now: u64, sid: &str, effects: &[Effect]) -> Vec<Effect> {
    let nonce = sent(effects, sid)
        .into_iter()
        .find_map(|m| match m {
            EdgeMessage::Challenge { nonce, .. } => Some(nonce),
            _ => None,
        })
        .expect("a challenge");
    edge.message(now, sid, &hello_frame("spark", &nonce, now, &agent_key(1)))
}

/// The ids of the sessions these effects close.
fn closes(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Close { session, .. } => Some(session.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn silent_connections_cannot_lock_the_agent_out() {
    use crate::machine::{MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_SOURCE};
    let mut edge = Edge::new(config(), 0);
    // An attacker spread over many addresses fills every unproven slot…
    let mut n = 0;
    for i in 0..MAX_PENDING_HANDSHAKES {
        n += 1;
        let (_, effects) = edge.connect(i as u64, seed(n), &format!("198.51.100.{}", i % 8), Some(AGENT_NONCE));
        assert!(closes(&effects).is_empty());
    }
    assert_eq!(pending(&edge), MAX_PENDING_HANDSHAKES);
    // …and renews them: each new one closes the oldest of the most crowded source.
    for i in 0..200u64 {
        n += 1;
        let (_, effects) = edge.connect(100 + i, seed(n), &format!("198.51.100.{}", i % 8), Some(AGENT_NONCE));
        assert_eq!(closes(&effects).len(), 1);
        assert_eq!(pending(&edge), MAX_PENDING_HANDSHAKES);
    }
    // The agent, from its own address or from one of the attacker's, still gets in.
    for (i, peer) in ["203.0.113.9", "198.51.100.3"].into_iter().enumerate() {
        n += 1;
        let (sid, effects) = edge.connect(1_000, seed(n), peer, Some(AGENT_NONCE));
        assert_eq!(closes(&effects).len(), 1, "room is made for it");
        let effects = prove(&mut edge, 1_000, &sid, &effects);
        assert!(closed(&effects).is_none(), "{peer}: {effects:?}");
        assert!(edge.session(&sid).unwrap().agent().is_some());
        edge.disconnect(1_000 + i as u64, &sid);
        n += 1;
        edge.connect(1_000, seed(n), "198.51.100.0", Some(AGENT_NONCE));
    }
    // The evicted are told why.
    let (_, effects) = edge.connect(2_000, seed(10_000), "198.51.100.1", Some(AGENT_NONCE));
    let (code, reason) = closed(&effects).unwrap();
    assert_eq!(code, close::SILENT);
    assert!(reason.contains("waited longest"), "{reason}");
    let goodbye = effects.iter().any(|e| matches!(e, Effect::Send { text, .. } if text.contains("goodbye")));
    assert!(goodbye, "{effects:?}");

    // One source alone cannot hold more than its share: its own oldest goes first.
    let mut edge = Edge::new(config(), 0);
    let (other, _) = edge.connect(0, seed(1), "203.0.113.1", Some(AGENT_NONCE));
    let mut flood = Vec::new();
    for i in 0..MAX_PENDING_PER_SOURCE as u64 {
        flood.push(edge.connect(1 + i, seed(2 + i), "2001:db8:1:2::1", Some(AGENT_NONCE)).0);
    }
    let (_, effects) = edge.connect(100, seed(500), "2001:db8:1:2::ffff", Some(AGENT_NONCE));
    assert_eq!(closes(&effects), vec![flood[0].clone()], "the same /64 is one source");
    assert!(edge.session(&other).is_some());
}

#[test]
fn a_frame_before_the_hello_is_verified_is_small() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = edge.connect(0, seed(1), PEER, Some(AGENT_NONCE));
    let big = format!(r#"{{"type":"hello","pad":"{}"}}"#, "x".repeat(shared::protocol::MAX_HELLO_BYTES));
    let (code, reason) = closed(&edge.message(1, &sid, &big)).unwrap();
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("limit"), "{reason}");
    // Once proven, frames up to the protocol's limit are fine.
    let (mut edge, sid) = ready_edge();
    let mut event = serde_json::to_value(signed(&edge, &sid, beat(&[], 1, 0))).unwrap();
    event["pad"] = json!("x".repeat(200_000));
    assert!(closed(&edge.message(1, &sid, &event.to_string())).is_none());
}

#[test]
fn ids_from_unproven_peers_are_neither_echoed_nor_logged() {
    let mut edge = Edge::new(config(), 0);
    for bad in ["spark\n2026-01-01T00:00:00Z INFO agent connected agent_id=spark", &"a".repeat(100), "", "sp ark"] {
        let (sid, effects) = edge.connect(0, seed(1), PEER, Some(AGENT_NONCE));
        let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge") };
        let effects = edge.message(0, &sid, &hello_frame(bad, nonce, 0, &agent_key(1)));
        let (code, reason) = closed(&effects).unwrap();
        assert_eq!(code, close::UNAUTHORIZED);
        assert!(!bad.is_empty() && !reason.contains(bad) || bad.is_empty(), "{reason}");
        for m in sent(&effects, &sid) {
            if let EdgeMessage::Goodbye { reason, .. } = m {
                assert!(!reason.contains('\n') && !reason.contains("aaaaaaaa"), "{reason}");
            }
        }
    }
}

#[test]
fn followers_are_capped_per_job_and_in_all() {
    use crate::progress::{MAX_FOLLOWERS, MAX_FOLLOWERS_PER_JOB};
    let mut edge = Edge::new(Config { max_queued_jobs: 10, ..config() }, 0);
    let jobs = MAX_FOLLOWERS / MAX_FOLLOWERS_PER_JOB + 1;
    for j in 0..jobs {
        edge.submit(0, format!("j{j}"), submission("x", 60_000, None), Mode::Detached).unwrap();
    }
    let follow = |edge: &mut Edge, job: &str| {
        let caller = edge.begin_request(0);
        edge.follow(caller, job, &crate::http::Who::Pool, None, &mut Vec::new()).map(|()| caller)
    };
    let first = follow(&mut edge, "j0").unwrap();
    for _ in 1..MAX_FOLLOWERS_PER_JOB {
        follow(&mut edge, "j0").unwrap();
    }
    let refused = follow(&mut edge, "j0").unwrap_err();
    assert_eq!(refused.status, 429);
    assert!(refused.body.error.contains("GET /jobs/j0"), "{}", refused.body.error);
    // One that leaves makes room.
    assert!(edge.caller_gone(0, first).is_empty());
    follow(&mut edge, "j0").unwrap();
    for j in 1..jobs - 1 {
        for _ in 0..MAX_FOLLOWERS_PER_JOB {
            follow(&mut edge, &format!("j{j}")).unwrap();
        }
    }
    assert_eq!(edge.callers_waiting(), MAX_FOLLOWERS);
    assert_eq!(follow(&mut edge, &format!("j{}", jobs - 1)).unwrap_err().status, 429, "the edge's bound");
    // Through HTTP: the 429 in the contract's shape.
    let handled = call(&mut edge, 0, "GET", &format!("/jobs/j{}/events", jobs - 1), Value::Null);
    let (status, body) = answer_to(&handled.effects, handled.caller).unwrap();
    assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")));
}

#[test]
fn the_pool_is_signed_into_the_welcome_and_every_order() {
    let mut edge = Edge::new(Config { pool: "gpu".into(), ..config() }, 0);
    let (sid, effects) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let EdgeMessage::Welcome { envelope } = &sent(&effects, &sid)[0] else { panic!("welcome") };
    let welcome: Welcome = envelope.open(Domain::Welcome, &edge_key().verifying_key()).unwrap();
    assert_eq!(welcome.pool, "gpu");
    say(&mut edge, 0, &sid, credit(1, 0));
    let effects = edge.submit(1, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap().effects;
    let job = sent(&effects, &sid).into_iter().find_map(|m| match m {
        EdgeMessage::Job { envelope } => Some(envelope),
        _ => None,
    });
    let gpu = shared::envelope::Audience { agent_id: "spark", pool: "gpu" };
    let order: JobOrder = open_order(&job.clone().unwrap(), Domain::Job, &edge_key().verifying_key(), gpu, 1).unwrap();
    assert_eq!(order.header.pool, "gpu");
    let refused = open_order::<JobOrder>(&job.unwrap(), Domain::Job, &edge_key().verifying_key(), SPARK, 1).unwrap_err();
    assert!(matches!(refused, shared::envelope::Refusal::WrongPool { .. }), "{refused:?}");
    let effects = edge.cancel(2, "j1").unwrap();
    let cancel = sent(&effects, &sid).into_iter().find_map(|m| match m {
        EdgeMessage::Cancel { envelope } => Some(envelope),
        _ => None,
    });
    let order: shared::protocol::CancelOrder = open_order(&cancel.unwrap(), Domain::Cancel, &edge_key().verifying_key(), gpu, 2).unwrap();
    assert_eq!(order.header.pool, "gpu");
    // Bound to the connection, as a job order is: the path cannot hold it for the next (rev21, 4).
    let challenge = edge.session(&sid).and_then(|s| s.agent()).unwrap().challenge.clone();
    assert_eq!(order.challenge.as_deref(), Some(challenge.as_str()));
}

/// An edge whose agent `spark` runs `j1` (order `j1:1`), which a caller follows.
fn followed_job() -> (Edge, String, CallerId) {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    let follower = edge.begin_request(1);
    edge.follow(follower, "j1", &crate::http::Who::Pool, None, &mut Vec::new()).unwrap();
    (edge, sid, follower)
}

#[test]
fn forged_results_and_progress_from_the_path_are_refused_and_change_nothing() {
    let (mut edge, sid, follower) = followed_job();
    let forger = forged_link(77);
    let fake = JobResult { success: true, output: "forged".into(), ..Default::default() };
    let nonce = edge.job("j1").unwrap().order_nonce();

    // Made up by whoever sits between agent and edge: another key.
    for forged in [
        AgentMessage::result("j1", &nonce, fake.clone(), &forger),
        AgentMessage::progress("j1", &nonce, vec![ProgressEvent { seq: 1, event: json!({"type": "assistant", "forged": true}) }], &forger),
    ] {
        let effects = say(&mut edge, 2, &sid, forged);
        assert!(effects.is_empty(), "nothing done, nothing acknowledged: {effects:?}");
    }
    // The agent's own report, altered on the way.
    let AgentMessage::Result { mut envelope } = result_msg(&edge, "j1", ok_result()) else { panic!("a result") };
    envelope.payload = envelope.payload.replace("done", "evil");
    assert!(say(&mut edge, 2, &sid, AgentMessage::Result { envelope }).is_empty());
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running, "the job is unaffected");
    // The agent's own result MACed with the edge→agent key (a frame of the edge's sent
    // back: reflected), or with another connection's key.
    let AgentMessage::Result { envelope } = result_msg(&edge, "j1", ok_result()) else { panic!("a result") };
    let edge_to_agent = edge.session(&sid).unwrap().agent().unwrap().keys.edge_to_agent.clone();
    let reflected = AgentMessage::result_text(envelope.payload.clone(), &edge_to_agent);
    let (other, _) = join(&mut edge, 2, "laptop", &agent_key(2), vec![], 9);
    let elsewhere = AgentMessage::result_text(envelope.payload, &link(&edge, &other));
    for forged in [reflected, elsewhere] {
        assert!(say(&mut edge, 2, &sid, forged).is_empty());
    }
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running, "the job is unaffected");
    assert!(edge.metrics().contains("claude_runner_reports_refused_total 5\n"), "{}", edge.metrics());
    assert_eq!(edge.stats().refused_reports, 5);

    // MACed by the agent but for an order this edge never sent: answered "not taken" (so
    // it is not sent again on this connection), not applied.
    let stray = AgentMessage::result("j1", "j1:9", fake, &link(&edge, &sid));
    let effects = say(&mut edge, 3, &sid, stray);
    assert!(finished(&effects).is_empty());
    assert_eq!(answers(&edge, &effects, &sid), vec![("j1".to_string(), true)]);

    // The agent's real progress and result go through.
    let (chunks, _) = streamed(&progress(&mut edge, 4, &sid, "j1", 1, json!({"type": "system"})), follower);
    assert_eq!(chunks.len(), 1);
    let done = finished(&report(&mut edge, 5, &sid, "j1", ok_result()));
    assert_eq!(done[0].2["output"], "done");
}

/// The result answers on `sid` in `effects`, opened with its edge→agent key: each job id
/// and whether the edge said it did not take it.
fn answers(edge: &Edge, effects: &[Effect], sid: &str) -> Vec<(String, bool)> {
    let key = edge.session(sid).unwrap().agent().unwrap().keys.edge_to_agent.clone();
    sent(effects, sid)
        .into_iter()
        .filter_map(|m| match m {
            EdgeMessage::ResultAck { envelope } => Some(envelope.open::<shared::protocol::Acknowledgement>(Domain::ResultAck, &key).expect("MACed by the edge")),
            _ => None,
        })
        .map(|ack| (ack.job_id, ack.not_taken))
        .collect()
}

/// Hostile review s38: a result the edge did not take — a job it does not know, another
/// agent's running job, an order of the job it never sent — was acknowledged, and the
/// agent dropped it for good, while the edge that issued the job (the agent had moved, or
/// its EDGE_URL changed) waited for it and ended it `lost`. Each is now answered "not
/// taken", and changes nothing; a result the edge stores, or has, is acknowledged.
#[test]
fn a_result_the_edge_did_not_take_is_answered_not_taken() {
    let (mut edge, sid, _follower) = followed_job();
    let nonce = edge.job("j1").unwrap().order_nonce();
    let fake = JobResult { success: true, output: "elsewhere".into(), ..Default::default() };

    // A job this edge never had (another edge issued it).
    let key = link(&edge, &sid);
    let effects = say(&mut edge, 2, &sid, AgentMessage::result("j-of-e1", "j-of-e1:1", fake.clone(), &key));
    assert!(finished(&effects).is_empty());
    assert_eq!(answers(&edge, &effects, &sid), vec![("j-of-e1".to_string(), true)]);
    assert!(edge.job("j-of-e1").is_none());

    // An order of j1 this edge never sent.
    let effects = say(&mut edge, 3, &sid, AgentMessage::result("j1", "j1:9", fake.clone(), &key));
    assert!(finished(&effects).is_empty());
    assert_eq!(answers(&edge, &effects, &sid), vec![("j1".to_string(), true)]);

    // j1 is spark's: another agent's result for it, MACed on its own connection.
    let (laptop, _) = join(&mut edge, 4, "laptop", &agent_key(2), vec![], 9);
    let other = link(&edge, &laptop);
    let effects = say(&mut edge, 4, &laptop, AgentMessage::result("j1", &nonce, fake, &other));
    assert!(finished(&effects).is_empty());
    assert_eq!(answers(&edge, &effects, &laptop), vec![("j1".to_string(), true)]);
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running, "the job is unaffected");

    // Its own agent's result is taken, and acknowledged; sent again, acknowledged again.
    let effects = report(&mut edge, 5, &sid, "j1", ok_result());
    assert_eq!(finished(&effects).len(), 1);
    assert_eq!(answers(&edge, &effects, &sid), vec![("j1".to_string(), false)]);
    let effects = report(&mut edge, 6, &sid, "j1", ok_result());
    assert!(finished(&effects).is_empty());
    assert_eq!(answers(&edge, &effects, &sid), vec![("j1".to_string(), false)]);
}

#[test]
fn orders_and_reports_share_one_nonce_per_attempt() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    let job = edge.job("j1").unwrap();
    // `id:attempt:tag`, the tag the connection's and the order's own (rev8: a power cut
    // that lost a dispatch numbered the next order as the forgotten one was).
    let first = job.order_nonce();
    let (number, tag) = first.strip_prefix("j1:").and_then(|rest| rest.split_once(':')).unwrap();
    assert_eq!((number, tag.len()), ("1", 16), "{first}");
    assert!(job.issued(&first));
    let never = [
        "j1:0", "j1:2", "j1:01", "j1:+1", "j2:1", "j1", "j1:1", "j1:1:1", "",
        &format!("j1:01:{tag}"), &format!("j1:2:{tag}"), &format!("j2:1:{tag}"), &format!("{first}0"), &format!("{first}:"),
    ];
    for never in never {
        assert!(!job.issued(never), "{never}");
    }
    // Sent again after a refusal for want of a slot: both orders are the edge's, each
    // under its own tag.
    refuse(&mut edge, 1, &sid, "j1", "no free slot", true);
    say(&mut edge, 2, &sid, credit(1, 1));
    let job = edge.job("j1").unwrap();
    let second = job.order_nonce();
    let second_tag = second.strip_prefix("j1:2:").unwrap();
    assert_ne!(second_tag, tag);
    assert!(job.issued(&first) && job.issued(&second));
    for never in [format!("j1:3:{second_tag}"), format!("j1:1:{second_tag}"), format!("j1:2:{tag}"), "j1:2".into()] {
        assert!(!job.issued(&never), "{never}");
    }
}

/// A job an edge of before sent (its orders `id:attempt`, no tags kept) still takes its
/// agent's reports for those orders after the upgrade; once this edge sent it again, only
/// tagged ones. Only a job's latest orders are kept ([`MAX_ORDER_TAGS`]).
#[test]
fn orders_sent_before_tags_and_the_oldest_orders_of_many() {
    use crate::record::{Job, MAX_ORDER_TAGS};
    let spec = serde_json::from_value(json!({"prompt": "x", "timeout_ms": 1000})).unwrap();
    let mut job = Job::new("j1".into(), spec, Mode::Detached, None, 0);
    job.attempts = 2;
    let stored: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
    assert!(stored.order_tags.is_empty());
    assert!(stored.issued("j1:1") && stored.issued("j1:2") && !stored.issued("j1:3"));
    assert_eq!(stored.order_nonce(), "j1:2");
    job.new_order("challenge", 1);
    assert!(job.order_nonce().starts_with("j1:3:") && job.issued(&job.order_nonce()));
    assert!(!job.issued("j1:1") && !job.issued("j1:3"), "plain nonces only while no order is tagged");

    let mut job = Job::new("j2".into(), serde_json::from_value(json!({"prompt": "x", "timeout_ms": 1000})).unwrap(), Mode::Detached, None, 0);
    let mut nonces = Vec::new();
    for n in 1..=MAX_ORDER_TAGS as u64 + 1 {
        job.new_order("challenge", n);
        nonces.push(job.order_nonce());
    }
    assert_eq!(job.order_tags.len(), MAX_ORDER_TAGS);
    assert!(!job.issued(&nonces[0]), "the oldest order's tag is no longer kept");
    assert!(nonces[1..].iter().all(|n| job.issued(n)), "{nonces:?}");
    assert_eq!(job.attempt_of(nonces.last().unwrap()), Some(MAX_ORDER_TAGS as u32 + 1));
    assert_eq!(job.attempt_of(&nonces[1]), Some(2));
}

#[test]
fn progress_replayed_or_reordered_on_the_path_is_shown_once_in_order() {
    let (mut edge, sid, follower) = followed_job();
    let key = link(&edge, &sid);
    let nonce = edge.job("j1").unwrap().order_nonce();
    let event = |seq: u64| AgentMessage::progress("j1", &nonce, vec![ProgressEvent { seq, event: json!({"n": seq}) }], &key);
    for seq in [1, 2] {
        assert_eq!(streamed(&say(&mut edge, 2, &sid, event(seq)), follower).0.len(), 1, "the agent's own event {seq}");
    }
    // Captured on the path and sent again, or held back and sent late: signed by the agent,
    // but shown already (or out of order), so neither followers nor the backlog get it.
    for seq in [2, 1, 2] {
        let effects = say(&mut edge, 3, &sid, event(seq));
        assert!(streamed(&effects, follower).0.is_empty(), "event {seq} shown again: {effects:?}");
    }
    assert_eq!(streamed(&say(&mut edge, 4, &sid, event(3)), follower).0.len(), 1, "the next one goes through");
    let late = edge.begin_request(4);
    let mut effects = Vec::new();
    edge.follow(late, "j1", &crate::http::Who::Pool, None, &mut effects).unwrap();
    let ids: Vec<String> = streamed(&effects, late).0.iter().map(|c| c.lines().next().unwrap_or_default().to_string()).collect();
    assert_eq!(ids, ["id: 1", "id: 2", "id: 3"], "a late follower reads each event once, in order");
}

/// `spark`'s batch of the events `seqs` of `j1`'s order `nonce`, MACed with `key`.
fn batch(key: &MacKey, job_id: &str, nonce: &str, seqs: &[u64]) -> AgentMessage {
    let events = seqs.iter().map(|&seq| ProgressEvent { seq, event: json!({"n": seq}) }).collect();
    AgentMessage::progress(job_id, nonce, events, key)
}

/// The SSE ids in these chunks.
fn ids(chunks: &[String]) -> Vec<String> {
    chunks.iter().map(|c| c.lines().next().unwrap_or_default().to_string()).collect()
}

#[test]
fn a_progress_batch_reaches_followers_and_the_backlog_event_by_event() {
    let (mut edge, sid, follower) = followed_job();
    let key = link(&edge, &sid);
    let nonce = edge.job("j1").unwrap().order_nonce();
    let (chunks, _) = streamed(&say(&mut edge, 2, &sid, batch(&key, "j1", &nonce, &[1, 2, 3])), follower);
    assert_eq!(ids(&chunks), ["id: 1", "id: 2", "id: 3"]);
    assert!(chunks[1].contains(r#"data: {"n":2}"#), "{chunks:?}");
    // Gaps are the agent's (an event summarised away, or sent while the edge was away).
    let (chunks, _) = streamed(&say(&mut edge, 3, &sid, batch(&key, "j1", &nonce, &[5, 9])), follower);
    assert_eq!(ids(&chunks), ["id: 5", "id: 9"]);
    let late = edge.begin_request(3);
    let mut effects = Vec::new();
    edge.follow(late, "j1", &crate::http::Who::Pool, None, &mut effects).unwrap();
    assert_eq!(ids(&streamed(&effects, late).0), ["id: 1", "id: 2", "id: 3", "id: 5", "id: 9"], "the backlog holds each event");
}

#[test]
fn progress_batches_forged_replayed_or_misbound_are_refused_and_show_nothing() {
    let (mut edge, sid, follower) = followed_job();
    let key = link(&edge, &sid);
    let nonce = edge.job("j1").unwrap().order_nonce();
    let good = batch(&key, "j1", &nonce, &[1, 2]);
    assert_eq!(streamed(&say(&mut edge, 2, &sid, good.clone()), follower).0.len(), 2);

    // Played back on the path: shown already.
    assert!(streamed(&say(&mut edge, 3, &sid, good), follower).0.is_empty(), "a replayed batch shown again");
    // Made up with another key, or the agent's own altered on the way (an event added).
    let forged = AgentMessage::progress("j1", &nonce, vec![ProgressEvent { seq: 3, event: json!("forged") }], &forged_link(77));
    assert!(say(&mut edge, 4, &sid, forged).is_empty());
    let AgentMessage::Event { mut envelope } = batch(&key, "j1", &nonce, &[3]) else { panic!("progress") };
    envelope.payload = envelope.payload.replace(r#"{"seq":3,"event":{"n":3}}"#, r#"{"seq":3,"event":{"n":3}},{"seq":4,"event":"added"}"#);
    assert!(envelope.payload.contains("added"));
    assert!(say(&mut edge, 4, &sid, AgentMessage::Event { envelope }).is_empty());
    assert_eq!(edge.stats().refused_reports, 2, "both counted as forgeries");

    // Signed by the agent, but bound to an order the edge never sent, or to another job's.
    let (other_job, another_tag) = (nonce.replacen("j1", "j2", 1), format!("{}{}", &nonce[..nonce.len() - 1], if nonce.ends_with('0') { '1' } else { '0' }));
    for (job, nonce) in [("j1", "j1:9"), ("j1", "j1:1"), ("j1", another_tag.as_str()), ("j2", nonce.as_str()), ("j1", other_job.as_str())] {
        assert!(say(&mut edge, 5, &sid, batch(&key, job, nonce, &[3])).is_empty(), "{job} {nonce}");
    }
    // Empty (nothing lost), or over the size limit (refused before its MAC is even
    // checked: whose it is cannot be told).
    assert!(say(&mut edge, 6, &sid, batch(&key, "j1", &nonce, &[])).is_empty());
    let huge = json!("x".repeat(shared::protocol::MAX_PROGRESS_PAYLOAD_BYTES));
    let big = AgentMessage::progress("j1", &nonce, vec![ProgressEvent { seq: 3, event: huge }], &key);
    assert!(say(&mut edge, 7, &sid, big).is_empty());
    assert_eq!(edge.stats().refused_reports, 2, "the agent's own signature: not counted as forgeries");

    // None of it showed; the agent's next batch goes through, and the connection stayed.
    let (chunks, _) = streamed(&say(&mut edge, 8, &sid, batch(&key, "j1", &nonce, &[3, 4])), follower);
    assert_eq!(ids(&chunks), ["id: 3", "id: 4"]);
    let late = edge.begin_request(8);
    let mut effects = Vec::new();
    edge.follow(late, "j1", &crate::http::Who::Pool, None, &mut effects).unwrap();
    assert_eq!(ids(&streamed(&effects, late).0), ["id: 1", "id: 2", "id: 3", "id: 4"]);
    assert!(edge.is_online());
}

/// Carried from s38: a batch the agent MACed for a job's order but that the edge could not
/// show (not one the agent makes: numbered down or twice, too many events; or a payload
/// that does not read as a batch) was dropped with a warning alone, so a follower never
/// learnt events were lost. It counts as dropped as the agent's own drops do: one
/// `progress_dropped` event for the job, numbered as the last of them, so ids stay
/// increasing and the agent's next events go through.
#[test]
fn a_batch_of_the_agents_the_edge_cannot_show_is_told_to_followers_as_dropped() {
    let (mut edge, sid, follower) = followed_job();
    let key = link(&edge, &sid);
    let nonce = edge.job("j1").unwrap().order_nonce();
    assert_eq!(streamed(&say(&mut edge, 2, &sid, batch(&key, "j1", &nonce, &[1, 2])), follower).0.len(), 2);
    let dropped = |events: u64| format!("data: {}", shared::protocol::progress_dropped(events));
    let over: Vec<u64> = (6..=6 + shared::protocol::MAX_PROGRESS_EVENTS as u64).collect();
    let mut shown = Vec::new();
    for (seqs, id, events) in [(&[4, 3][..], 4, 2), (&[5, 5], 5, 2), (&over, 70, 65)] {
        let (chunks, _) = streamed(&say(&mut edge, 3, &sid, batch(&key, "j1", &nonce, seqs)), follower);
        assert_eq!(ids(&chunks), [format!("id: {id}")], "{seqs:?}");
        assert!(chunks[0].contains(&dropped(events)), "{seqs:?}: {chunks:?}");
        shown.push(format!("id: {id}"));
    }
    // MACed by the agent, but no batch: its events cannot be read as such.
    let unread = json!({"job_id": "j1", "order_nonce": nonce, "events": [{"seq": 71, "event": {}}, {"seq": "72", "event": {}}]});
    let envelope = shared::envelope::Tagged::seal_text(shared::envelope::Domain::Progress, unread.to_string(), &key);
    let (chunks, _) = streamed(&say(&mut edge, 4, &sid, AgentMessage::Event { envelope }), follower);
    assert_eq!(ids(&chunks), ["id: 71"]);
    assert!(chunks[0].contains(&dropped(2)), "{chunks:?}");
    shown.push("id: 71".into());
    // Played back, or another job's: nothing more.
    assert!(streamed(&say(&mut edge, 5, &sid, batch(&key, "j1", &nonce, &[5, 5])), follower).0.is_empty());
    assert!(streamed(&say(&mut edge, 5, &sid, batch(&key, "j2", &nonce.replacen("j1", "j2", 1), &[80, 80])), follower).0.is_empty());
    // The agent's next batch goes through, and a late follower reads the markers in place.
    let (chunks, _) = streamed(&say(&mut edge, 6, &sid, batch(&key, "j1", &nonce, &[72, 73])), follower);
    assert_eq!(ids(&chunks), ["id: 72", "id: 73"]);
    let late = edge.begin_request(6);
    let mut effects = Vec::new();
    edge.follow(late, "j1", &crate::http::Who::Pool, None, &mut effects).unwrap();
    let expected: Vec<String> = ["id: 1", "id: 2"].into_iter().map(String::from).chain(shown).chain(["id: 72".into(), "id: 73".into()]).collect();
    assert_eq!(ids(&streamed(&effects, late).0), expected);
    assert!(edge.is_online());
}

/// Read raw (as the agent wrote them, session 40), progress events were no longer held to
/// serde_json's 128 levels: an agent's event 100,000 levels deep went to every follower,
/// whose parser gave up on it (`claude-runner submit`'s at 128 levels: the job's stream
/// unreadable from there). A batch holding an event deeper than `MAX_EVENT_DEPTH` is one
/// the agent never sends (it sends a summary), refused as the others are: told to
/// followers as dropped. One at the depth goes through.
#[test]
fn a_batch_with_an_event_nested_past_the_depth_is_told_to_followers_as_dropped() {
    use shared::protocol::MAX_EVENT_DEPTH;
    let (mut edge, sid, follower) = followed_job();
    let key = link(&edge, &sid);
    let nonce = edge.job("j1").unwrap().order_nonce();
    let nested = |depth: usize| format!(r#"{{"type":"user","x":{}1{}}}"#, "[".repeat(depth - 1), "]".repeat(depth - 1));
    // Written out: a value that deep would overflow the stack of whatever wrote it.
    let sealed = |seq: u64, event: String| {
        let payload = format!(r#"{{"job_id":"j1","order_nonce":{},"events":[{{"seq":{seq},"event":{event}}}]}}"#, json!(nonce));
        AgentMessage::Event { envelope: shared::envelope::Tagged::seal_text(Domain::Progress, payload, &key) }
    };
    for (seq, depth, shown) in [(1, MAX_EVENT_DEPTH, true), (2, MAX_EVENT_DEPTH + 1, false), (3, 100_000, false)] {
        let (chunks, _) = streamed(&say(&mut edge, 2, &sid, sealed(seq, nested(depth))), follower);
        assert_eq!(ids(&chunks), [format!("id: {seq}")], "{depth} levels");
        let data = chunks[0].lines().find_map(|l| l.strip_prefix("data: ")).expect("a data line");
        let event: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{depth} levels: a follower cannot read the event: {e}"));
        assert_eq!((event["type"].as_str(), event["events"].as_u64()), if shown { (Some("user"), None) } else { (Some("progress_dropped"), Some(1)) }, "{depth} levels");
    }
    assert!(edge.is_online(), "the connection stays: the agent's next batches go through");
}

/// Whether these effects send a job order on any connection.
fn any_order(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Send { text, .. } if matches!(serde_json::from_str(text), Ok(EdgeMessage::Job { .. }))))
}

#[test]
fn refusals_made_up_altered_or_played_back_on_the_path_never_send_a_job_again() {
    // Before protocol 6 a plain `{"type":"rejected","job_id":"j1","retry":true}` from the
    // path requeued a job whose order was on its way to the agent, which ran it: the next
    // agent with a free slot ran it too.
    let mut edge = Edge::new(config(), 0);
    let (spark, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &spark, credit(1, 0));
    edge.submit(1, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    let n1 = edge.job("j1").unwrap().order_nonce();
    assert!(n1.starts_with("j1:1:"), "{n1}");
    let refusal = |job_id: &str, nonce: &str, key: &MacKey| AgentMessage::rejected(job_id, nonce, "no free slot", true, key);
    let spark_key = link(&edge, &spark);

    // The agent's own refusal of j1's first order, for want of a slot: it goes out again.
    let first = refusal("j1", &n1, &spark_key);
    let effects = say(&mut edge, 2, &spark, first.clone());
    assert!(finished(&effects).is_empty());
    assert!(any_order(&say(&mut edge, 3, &spark, credit(1, 1))), "sent again");
    let n2 = edge.job("j1").unwrap().order_nonce();
    assert!(n2.starts_with("j1:2:"), "{n2}");
    // Another agent with a free slot: whatever requeued j1 now would run it there too.
    let (laptop, _) = join(&mut edge, 4, "laptop", &agent_key(2), vec![], 2);
    say(&mut edge, 4, &laptop, credit(1, 0));

    let laptop_key = link(&edge, &laptop);
    let AgentMessage::Rejected { envelope: genuine } = refusal("j9", &n2.replacen("j1", "j9", 1), &spark_key) else { unreachable!() };
    let mut altered = genuine.clone();
    altered.payload = altered.payload.replace("j9", "j1");
    let attacks: Vec<(&str, &str, AgentMessage)> = vec![
        ("made up with another key", &spark, refusal("j1", &n2, &forged_link(77))),
        ("the agent's refusal of another job, altered to name this one", &spark, AgentMessage::Rejected { envelope: altered }),
        ("another connection's key on this agent's connection", &spark, refusal("j1", &n2, &laptop_key)),
        ("another agent's own refusal, on its own connection", &laptop, refusal("j1", &n2, &laptop_key)),
        ("the agent's refusal of the earlier order, played back", &spark, first.clone()),
    ];
    for accepted in [false, true] {
        if accepted {
            say(&mut edge, 5, &spark, AgentMessage::Accepted { job_id: "j1".into() });
        }
        for (what, sid, attack) in &attacks {
            let effects = say(&mut edge, 6, sid, attack.clone());
            assert!(!any_order(&effects) && finished(&effects).is_empty(), "{what} (accepted: {accepted}): {effects:?}");
            let job = edge.job("j1").unwrap();
            assert_eq!((job.attempts, job.agent_id.as_deref()), (2, Some("spark")), "{what}");
            assert_eq!(job.state, if accepted { JobState::Running } else { JobState::Dispatched }, "{what}");
        }
    }
    assert_eq!(edge.stats().refused_reports, 6, "the MACs that failed are counted as forgeries");
    // An `OrderRefused` names nothing: counted, nothing else.
    let effects = say(&mut edge, 7, &spark, AgentMessage::OrderRefused { reason: "bad signature\nFORGED LOG LINE".into() });
    assert!(effects.is_empty(), "{effects:?}");
    // The agent's own refusal of the latest order still counts — even after an
    // `Accepted`, which the path could have made up (`shared::protocol`, "Signed or not").
    let effects = say(&mut edge, 8, &spark, refusal("j1", &n2, &spark_key));
    assert!(any_order(&effects), "sent again, to the agent with a free slot");
    assert_eq!(edge.job("j1").unwrap().agent_id.as_deref(), Some("laptop"));
}

#[test]
fn heartbeats_made_up_altered_or_played_back_never_end_a_running_job_lost() {
    let mut edge = Edge::new(config(), 0);
    // The agent's first connection: it ran one job, and said so in a heartbeat, signed —
    // which whoever sits on the path kept.
    let (first, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &first, credit(1, 0));
    edge.submit(1, "j0".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    report(&mut edge, 2, &first, "j0", ok_result());
    for t in 2..6 {
        pulse(&mut edge, t, &first, beat(&[], 1, 1));
    }
    // Numbered above anything the next connection will have said when it is played back.
    let kept = signed(&edge, &first, beat(&[], 1, 1));
    let first_key = link(&edge, &first);
    assert!(finished(&say(&mut edge, 3, &first, kept.clone())).is_empty());

    // It reconnects and runs j1 (its first order on the new connection).
    let (sid, _) = join(&mut edge, 10, "spark", &agent_key(1), vec![], 2);
    say(&mut edge, 10, &sid, credit(1, 0));
    edge.submit(11, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 12, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    start(&mut edge, 12, &sid, "j1");
    let holding = pulse(&mut edge, 13, &sid, beat(&["j1"], 0, 1));
    assert!(finished(&holding).is_empty());
    let challenge = edge.session(&sid).unwrap().agent().unwrap().challenge.clone();

    // What each says: the agent holds nothing, having received the order — j1 would end
    // `lost` (its caller told to run it elsewhere while it runs here).
    let says_nothing = |seq, key: &MacKey| AgentMessage::heartbeat(&Beat { challenge: challenge.clone(), seq, ..beat(&[], 1, 1) }, key);
    let AgentMessage::Heartbeat { envelope: mut altered } = signed(&edge, &sid, beat(&["j1"], 0, 1)) else { unreachable!() };
    altered.payload = altered.payload.replace(r#""running":["j1"]"#, r#""running":[]"#);
    let refused_before = edge.stats().refused_reports;
    let attacks = [
        ("made up with another key", says_nothing(99, &forged_link(77))),
        ("its earlier connection's key", says_nothing(99, &first_key)),
        ("the agent's own, altered", AgentMessage::Heartbeat { envelope: altered }),
        ("the agent's own from its earlier connection", kept),
        ("the agent's own on this connection, played back", says_nothing(1, &link(&edge, &sid))),
    ];
    for (what, attack) in attacks {
        let effects = say(&mut edge, 14, &sid, attack);
        assert!(finished(&effects).is_empty(), "{what}: {effects:?}");
        assert!(!effects.iter().any(|e| matches!(e, Effect::Send { .. })), "{what}: not even acknowledged: {effects:?}");
        assert_eq!(edge.job("j1").unwrap().state, JobState::Running, "{what}");
    }
    assert_eq!(edge.stats().refused_reports, refused_before + 4, "four MACs failed (the earlier connection's beat too: its key is not this one's)");

    // Nor can an older beat bring back what a newer one said: the login it reported.
    pulse(&mut edge, 15, &sid, Beat { oauth: OAuthReport::unconfigured(15), ..beat(&["j1"], 0, 1) });
    let seq = edge.session(&sid).unwrap().agent().unwrap().beat;
    let older = AgentMessage::heartbeat(&Beat { challenge: challenge.clone(), seq: seq - 1, ..beat(&["j1"], 0, 1) }, &link(&edge, &sid));
    say(&mut edge, 16, &sid, older);
    assert_eq!(edge.session(&sid).unwrap().agent().unwrap().oauth, OAuthReport::unconfigured(15), "the newest report stands");

    // The agent's own fresh heartbeat saying the same does settle it: the refusals above
    // were the checks', not the message's.
    let done = finished(&pulse(&mut edge, 17, &sid, beat(&[], 1, 1)));
    assert_eq!((done[0].0.as_str(), done[0].2["error_code"].as_str()), ("j1", Some("RUNNER_LOST")));
}

/// Whoever sits on the path cannot keep a gone agent "connected": the edge hears the
/// agent in its signed heartbeats, fresh on this connection. Frames anyone can make —
/// credits, acceptances, refusals naming no job, mirror lists, garbage-signed reports, a
/// played-back heartbeat — do not push the silence deadline back, so a dead agent is
/// dropped within two heartbeat intervals and its job waits for it only `LOST_AFTER_MS`
/// (then ends `lost`, its caller sent elsewhere), not until its timeout an hour later;
/// and `/health` stops saying it is there.
#[test]
fn frames_anyone_can_make_do_not_keep_a_gone_agent_connected() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(1, 0));
    edge.submit(1, "j".into(), submission("x", 3_600_000, None), Mode::Detached).unwrap();
    say(&mut edge, 2, &sid, AgentMessage::Accepted { job_id: "j".into() });
    let kept = signed(&edge, &sid, beat(&["j"], 0, 1));
    let last = 500;
    pulse(&mut edge, last, &sid, beat(&["j"], 0, 1));
    let forged_result = AgentMessage::result("j", "j:1", ok_result(), &forged_link(9));
    // The agent is gone; the path keeps talking, several times an interval.
    let mut t = last;
    while t + HB / 4 < last + 2 * HB {
        t += HB / 4;
        for frame in [
            credit(1, 1),
            AgentMessage::Accepted { job_id: "j".into() },
            AgentMessage::OrderRefused { reason: "x".into() },
            AgentMessage::Mirrors { names: vec![] },
            forged_result.clone(),
            kept.clone(),
        ] {
            assert!(closed(&say(&mut edge, t, &sid, frame)).is_none());
        }
    }
    let (code, _) = closed(&edge.tick(last + 2 * HB)).expect("the silent agent is dropped");
    assert_eq!(code, close::SILENT);
    assert!(!edge.is_online());
    let ended = finished(&edge.tick(last + 2 * HB + LOST));
    assert_eq!((ended[0].0.as_str(), ended[0].2["error_code"].as_str()), ("j", Some("RUNNER_LOST")), "{ended:?}");
}

/// An order the path held back and let through late, after the edge sent the job again
/// elsewhere, reaches the agent it named, which starts it (an agent of protocol 7 refuses
/// such an order — see `job_orders_name_their_connection_and_their_number_on_it` — so
/// this is the edge's second line): the agent's next heartbeat names a job
/// the edge has on another agent. That copy must stop at once — the agent is told to
/// cancel it — not run to its end beside the other (Claude twice, pushed twice).
#[test]
fn a_job_an_agent_holds_that_the_edge_has_elsewhere_is_stopped_there() {
    let mut edge = Edge::new(config(), 0);
    let (spark, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &spark, credit(1, 0));
    edge.submit(1, "j".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    assert_eq!(edge.job("j").unwrap().agent_id.as_deref(), Some("spark"));
    // Spark says it received one order and holds nothing: the job goes to laptop.
    let (laptop, _) = join(&mut edge, 2, "laptop", &agent_key(2), vec![], 2);
    say(&mut edge, 2, &laptop, credit(1, 0));
    pulse(&mut edge, 3, &spark, beat(&[], 0, 1));
    assert_eq!(edge.job("j").unwrap().agent_id.as_deref(), Some("laptop"));
    // The held order reaches spark, which runs it and says so.
    let effects = pulse(&mut edge, 4, &spark, beat(&["j"], 0, 1));
    let told = sent(&effects, &spark).into_iter().any(|m| match m {
        EdgeMessage::Cancel { envelope } => serde_json::from_str::<shared::protocol::CancelOrder>(&envelope.payload).unwrap().header.job_id == "j",
        _ => false,
    });
    assert!(told, "spark's copy is cancelled: {effects:?}");
    assert!(finished(&effects).is_empty());
    assert_eq!(edge.job("j").unwrap().agent_id.as_deref(), Some("laptop"), "laptop's run stands");
}

/// Every job order is bound to the connection it is sent on (its challenge) and numbered
/// on it from 1, in the order sent, so the agent can refuse one the path held back from
/// an earlier connection or past a later order (protocol 7): the numbers are the ones the
/// agent's `received` counts, and they start again at 1 on a new connection.
#[test]
fn job_orders_name_their_connection_and_their_number_on_it() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 2);
    edge.submit(0, "a".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    edge.submit(0, "b".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    let orders = |effects: &[Effect], sid: &str| -> Vec<JobOrder> {
        sent(effects, sid)
            .into_iter()
            .filter_map(|m| match m {
                EdgeMessage::Job { envelope } => Some(envelope.open(Domain::Job, &edge_key().verifying_key()).unwrap()),
                _ => None,
            })
            .collect()
    };
    let challenge = |edge: &Edge, sid: &str| edge.session(sid).and_then(|s| s.agent()).unwrap().challenge.clone();
    let first = challenge(&edge, &sid);
    assert!(!first.is_empty());
    let sent1 = orders(&say(&mut edge, 1, &sid, credit(2, 0)), &sid);
    let numbered: Vec<(&str, &str, u64)> = sent1.iter().map(|o| (o.header.job_id.as_str(), o.challenge.as_str(), o.order_no)).collect();
    assert_eq!(numbered, [("a", first.as_str(), 1), ("b", first.as_str(), 2)]);
    // Order 1 held on the path, order 2 taken: the agent's `received` is 2, so `a` is
    // settled as arrived and not held, and sent again as order 3.
    let sent2 = orders(&pulse(&mut edge, 2, &sid, beat(&["b"], 1, 2)), &sid);
    let numbered: Vec<(&str, &str, u64)> = sent2.iter().map(|o| (o.header.job_id.as_str(), o.challenge.as_str(), o.order_no)).collect();
    assert_eq!(numbered, [("a", first.as_str(), 3)]);
    assert!(sent2[0].header.nonce.starts_with("a:2:"), "{}", sent2[0].header.nonce);
    // A new connection: its own challenge, numbers from 1 again.
    edge.disconnect(3, &sid);
    let (sid2, effects) = join_with(&mut edge, 4, "spark", &agent_key(1), vec!["b".into()], 2, 2);
    let second = challenge(&edge, &sid2);
    assert_ne!(first, second);
    let mut resent = orders(&effects, &sid2);
    resent.extend(orders(&say(&mut edge, 5, &sid2, credit(1, 0)), &sid2));
    let numbered: Vec<(&str, &str, u64)> = resent.iter().map(|o| (o.header.job_id.as_str(), o.challenge.as_str(), o.order_no)).collect();
    assert_eq!(numbered, [("a", second.as_str(), 1)]);
    assert!(resent[0].header.nonce.starts_with("a:3:"), "{}", resent[0].header.nonce);
    // Each order's nonce carries its own tag, made from its connection and its number.
    let tags: std::collections::BTreeSet<&str> = [&sent1[0], &sent2[0], &resent[0]].iter().map(|o| o.header.nonce.rsplit(':').next().unwrap()).collect();
    assert_eq!(tags.len(), 3);
    assert_eq!(resent[0].header.nonce, format!("a:3:{}", crate::record::order_tag(&second, 1)));
}

/// A client whose base URL ends in `/` sends `//execute`: a leading run of slashes is the
/// single-slash path, on every route — and nothing more: slashes inside the path, encoded
/// slashes and dot segments are left as they are, so no folded path reaches a route its
/// single-slash form could not.
#[test]
fn leading_slashes_fold_to_one_and_nothing_else_does() {
    for (method, doubled, single) in [
        ("POST", "//execute", "/execute"),
        ("POST", "///execute/", "/execute"),
        ("GET", "//health", "/health"),
        ("GET", "//", "/"),
        ("GET", "//jobs/x/events", "/jobs/x/events"),
        ("GET", "//agent/connect", "/agent/connect"),
        ("GET", "//metrics", "/metrics"),
    ] {
        assert_eq!(gate(method, doubled, Some(SECRET)), gate(method, single, Some(SECRET)), "{method} {doubled}");
        assert!(!matches!(gate(method, doubled, Some(SECRET)), Gate::Answer(_)), "{method} {doubled}");
    }
    for path in ["/jobs//x", "/%2Fexecute", "/%2F%2Fexecute", "/./execute", "/x/../execute", "//pool/gpu/execute"] {
        assert!(matches!(gate("POST", path, Some(SECRET)), Gate::Answer(_)), "{path} is not a route");
    }
}

/// `claude-runner doctor`'s probe ([`AgentMessage::Probe`]): checked as a hello is, answered
/// with a welcome signed over its nonce, then closed — and nothing else. Before it, a
/// hello was the only way to ask, and a hello replaces the agent's running connection and
/// reconciles its jobs against the asker's empty lists (a running job would have ended
/// lost). Tried here: a probe while `spark` runs a job; a probe from an unknown agent, with
/// another agent's key, or answering another challenge; a hello's signature sent as a
/// probe and a probe's as a hello (each domain its own); a probe on a proven connection.
#[test]
fn a_probe_is_answered_and_closed_and_touches_no_agent_and_no_job() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    let probe = |hello: &Hello, domain: Domain, key: &SigningKey| AgentMessage::Probe {
        protocol: PROTOCOL_VERSION,
        agent_id: hello.agent_id.clone(),
        envelope: Envelope::seal(domain, hello, key),
    };
    let challenge = |edge: &mut Edge, seed: u8| {
        let (pid, effects) = edge.connect(2, [seed; 64], PEER, Some(AGENT_NONCE));
        let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &pid)[0] else { panic!("challenge first") };
        (pid, nonce.clone())
    };

    let (pid, nonce) = challenge(&mut edge, 90);
    let asked = Hello { agent_nonce: "doctor-nonce".into(), capacity: 0, ..hello("spark", &nonce, 2) };
    let effects = say(&mut edge, 2, &pid, probe(&asked, Domain::Probe, &agent_key(1)));
    let Some(EdgeMessage::Welcome { envelope }) = sent(&effects, &pid).into_iter().next() else { panic!("a welcome first: {effects:?}") };
    let welcome: Welcome = envelope.open(Domain::Welcome, &edge_key().verifying_key()).unwrap();
    assert_eq!((welcome.agent_id.as_str(), welcome.agent_nonce.as_str(), welcome.pool.as_str()), ("spark", "doctor-nonce", "default"));
    assert_eq!(closed(&effects).map(|(code, _)| code), Some(close::PROBED));
    assert!(edge.session(&pid).is_none(), "the probe's connection is forgotten");
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Save(_) | Effect::SaveSession(_)) || matches!(e, Effect::Close { session, .. } if *session == sid)),
        "nothing saved, spark's connection untouched: {effects:?}"
    );
    assert!(edge.session(&sid).and_then(|s| s.agent()).is_some(), "spark is still connected");
    assert_eq!(edge.job("j1").map(|j| (j.state, j.session_id.clone())), Some((JobState::Running, Some(sid.clone()))));
    assert_eq!(edge.stats().refused_agents, 0);

    // Refused as a hello would be, saying why; nothing welcomed.
    type Make<'a> = Box<dyn Fn(&str) -> AgentMessage + 'a>;
    let cases: Vec<(&str, u8, Make, &str)> = vec![
        ("unknown agent", 93, Box::new(|n| probe(&hello("nobody", n, 2), Domain::Probe, &agent_key(1))), "unknown agent `nobody`"),
        ("another agent's key", 94, Box::new(|n| probe(&hello("spark", n, 2), Domain::Probe, &agent_key(2))), "failed to prove its identity"),
        ("another challenge", 95, Box::new(|_| probe(&hello("spark", "not-this-one", 2), Domain::Probe, &agent_key(1))), "another connection's challenge"),
        ("a hello's signature as a probe", 96, Box::new(|n| probe(&hello("spark", n, 2), Domain::Hello, &agent_key(1))), "failed to prove its identity"),
        (
            "a probe's signature as a hello",
            97,
            Box::new(|n| AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: "spark".into(), envelope: Envelope::seal(Domain::Probe, &hello("spark", n, 2), &agent_key(1)) }),
            "failed to prove its identity",
        ),
    ];
    for (what, seed, make, says) in cases {
        let (pid, nonce) = challenge(&mut edge, seed);
        let effects = say(&mut edge, 3, &pid, make(&nonce));
        assert!(!sent(&effects, &pid).iter().any(|m| matches!(m, EdgeMessage::Welcome { .. })), "{what}: no welcome");
        let (code, _) = closed(&effects).unwrap_or_else(|| panic!("{what}: closed"));
        assert_eq!(code, close::UNAUTHORIZED, "{what}");
        let goodbye = sent(&effects, &pid).into_iter().find_map(|m| match m {
            EdgeMessage::Goodbye { reason, .. } => Some(reason),
            _ => None,
        });
        assert!(goodbye.as_deref().is_some_and(|r| r.contains(says)), "{what}: {goodbye:?}");
        assert!(edge.session(&sid).and_then(|s| s.agent()).is_some(), "{what}: spark is still connected");
    }
    assert_eq!(edge.job("j1").map(|j| j.state), Some(JobState::Running));

    // On a proven connection a probe is a second hello: a protocol error.
    let effects = say(&mut edge, 4, &sid, probe(&hello("spark", "x", 4), Domain::Probe, &agent_key(1)));
    assert_eq!(closed(&effects).map(|(code, _)| code), Some(close::PROTOCOL_ERROR));
}

/// The refused count is a counter nobody outside sets, but the Worker's object adds
/// whatever count its entry hands it: added saturating on every path, never a panic
/// (an overflow check) or a wrap to 0 of `claude_runner_agents_refused_total`.
#[test]
fn the_refused_count_saturates_on_every_path() {
    let mut edge = Edge::new(config(), 0);
    edge.upgrades_refused_before(u64::MAX);
    edge.upgrades_refused_before(1);
    let refused = crate::upgrade::check_upgrade(None, &config(), 1_000).unwrap_err();
    edge.upgrade_refused(1_000, "203.0.113.7", &refused);
    // A hello refused (another key than `spark`'s).
    let (_, effects) = join(&mut edge, 1_000, "spark", &agent_key(9), vec![], 2);
    assert!(closed(&effects).is_some(), "{effects:?}");
    let metrics = call(&mut edge, 1_000, "GET", "/metrics", Value::Null).effects;
    let text = format!("{metrics:?}");
    assert!(text.contains(&format!("claude_runner_agents_refused_total {}", u64::MAX)), "{text}");
}

/// The job ids these effects tell session `sid`'s agent (`spark`) to cancel.
fn cancelled_on(effects: &[Effect], sid: &str) -> Vec<String> {
    sent(effects, sid)
        .into_iter()
        .filter_map(|m| match m {
            EdgeMessage::Cancel { envelope } => Some(serde_json::from_str::<shared::protocol::CancelOrder>(&envelope.payload).unwrap().header.job_id),
            _ => None,
        })
        .collect()
}

/// Whoever holds one agent's key (the agent's own MAC on its own connection) names
/// thousands of jobs in one heartbeat, far past what any agent runs: every id the edge did
/// not know got a signed cancel of its own (100,000 of them took the native edge's one
/// driver thread 2.75 s and queued 37 MB for the socket, every beat). The beat closes the
/// connection instead, and nothing is signed for it.
#[test]
fn a_heartbeat_naming_more_jobs_than_its_agent_can_hold_closes_the_connection() {
    let (mut edge, sid) = ready_edge();
    let ids: Vec<String> = (0..5_000).map(|n| format!("made-up-{n}")).collect();
    let hb = Beat { capacity: u32::MAX, running: ids, ..beat(&[], 0, 0) };
    let effects = pulse(&mut edge, 1, &sid, hb);
    assert!(cancelled_on(&effects, &sid).is_empty(), "{} cancels", cancelled_on(&effects, &sid).len());
    let (code, reason) = closed(&effects).expect("the connection is closed");
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("5000 running jobs") && reason.contains("64"), "{reason}");
    assert!(edge.session(&sid).is_none() && !edge.is_online());

    // Its capacity as stated (1): two jobs named are one too many.
    let (sid, _) = join(&mut edge, 2, "spark", &agent_key(1), vec![], 2);
    let effects = pulse(&mut edge, 3, &sid, beat(&["a", "b"], 0, 0));
    assert_eq!(closed(&effects).map(|c| c.0), Some(close::PROTOCOL_ERROR), "{effects:?}");
    assert!(cancelled_on(&effects, &sid).is_empty());
}

/// The same at the hello: one naming more running jobs than its capacity is refused, no
/// cancel signed.
#[test]
fn a_hello_naming_more_jobs_than_its_agent_can_hold_is_refused() {
    let mut edge = Edge::new(config(), 0);
    let (sid, effects) = edge.connect(0, [1; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    let running: Vec<String> = (0..1_000).map(|n| format!("made-up-{n}")).collect();
    let hello = Hello { capacity: u32::MAX, running, ..hello("spark", nonce, 0) };
    let effects = edge.message(0, &sid, &hello_text(&hello, &agent_key(1)));
    assert!(cancelled_on(&effects, &sid).is_empty());
    assert!(!sent(&effects, &sid).iter().any(|m| matches!(m, EdgeMessage::Welcome { .. })), "{effects:?}");
    let (code, reason) = closed(&effects).expect("the connection is closed");
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("1000 running jobs"), "{reason}");
    assert!(!edge.is_online());
}

/// A capacity past the most an agent runs (`MAX_CONCURRENT_JOBS` is at most 64) is taken
/// as that most, at the hello and in every beat: the edge never counts on more slots, nor
/// shows more, than an agent can have.
#[test]
fn an_agents_capacity_is_held_to_the_most_an_agent_runs() {
    use shared::protocol::MAX_CAPACITY;
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, u32::MAX);
    assert_eq!(edge.session(&sid).and_then(|s| s.agent()).unwrap().capacity, MAX_CAPACITY);
    pulse(&mut edge, 1, &sid, Beat { capacity: 2, ..beat(&[], 2, 0) });
    assert_eq!(edge.session(&sid).and_then(|s| s.agent()).unwrap().capacity, 2);
    pulse(&mut edge, 2, &sid, Beat { capacity: u32::MAX, ..beat(&[], u32::MAX, 0) });
    assert_eq!(edge.health(3).agents[0].capacity, MAX_CAPACITY);
}

/// Ids the edge has no record of (a job the caps forgot while its agent was away, or made
/// up) within the agent's capacity: a few cancels each beat, in turn, so each is told in a
/// few beats — not one signed cancel for every id in every beat.
#[test]
fn jobs_the_edge_never_heard_of_are_cancelled_a_few_per_beat_in_turn() {
    use crate::machine::MAX_STRAY_CANCELS;
    use shared::protocol::MAX_CAPACITY;
    let mut edge = Edge::new(config(), 0);
    let ids: Vec<String> = (0..MAX_CAPACITY).map(|n| format!("forgotten-{n:02}")).collect();
    let (sid, effects) = join_with(&mut edge, 0, "spark", &agent_key(1), ids.clone(), 1, MAX_CAPACITY);
    assert!(closed(&effects).is_none(), "{effects:?}");
    let mut told: std::collections::BTreeSet<String> = cancelled_on(&effects, &sid).into_iter().collect();
    assert_eq!(told.len(), MAX_STRAY_CANCELS);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let beats = (MAX_CAPACITY as usize).div_ceil(MAX_STRAY_CANCELS);
    for t in 1..=beats as u64 {
        let effects = pulse(&mut edge, t, &sid, Beat { capacity: MAX_CAPACITY, ..beat(&refs, 0, 0) });
        assert!(closed(&effects).is_none(), "{effects:?}");
        let now = cancelled_on(&effects, &sid);
        assert!(now.len() <= MAX_STRAY_CANCELS, "{} cancels in one beat", now.len());
        told.extend(now);
    }
    assert_eq!(told.len(), ids.len(), "every one told within {beats} beats");
}

/// Whoever can write into an agent's connection (a hop that ends TLS) writes frames no
/// agent sends — reports not MACed on the connection, refusals that name no order — as
/// fast as the link carries them: each used to write a line to the edge's log (rev21, 1).
/// A few per connection are logged, then one line says the rest are only counted (the
/// metrics count every one), and the agent's own reports still count.
#[test]
fn a_flood_of_frames_no_agent_sends_logs_a_few_lines_per_connection() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let logs = super::logs::capture();
    let forged = AgentMessage::result("j", "j:1", ok_result(), &forged_link(9));
    for _ in 0..1_000 {
        say(&mut edge, 1, &sid, AgentMessage::OrderRefused { reason: "x".into() });
        say(&mut edge, 1, &sid, forged.clone());
    }
    assert_eq!((edge.stats().rejected_orders, edge.stats().refused_reports), (1_000, 1_000), "all counted");
    let lines = logs.lines();
    let about = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    let logged = about("could not tie to a job") + about("not MACed by the agent on this connection");
    assert_eq!(logged, shared::protocol::MAX_UNPROVEN_FRAMES as usize, "{lines:#?}");
    assert_eq!(about("only counted"), 1, "{lines:#?}");
    // The connection's own reports still count: its heartbeat is taken and answered.
    assert!(!pulse(&mut edge, 2, &sid, beat(&[], 1, 1)).is_empty());
}
