//! The machine driven with simulated time by a scripted agent.
//!
//! - this file: the helpers, and the flow of jobs, sessions and deadlines;
//! - [`cost`]: what one job costs the machine, in allocations, after many;
//! - [`storage`]: failed store writes, through a host whose store can be made to fail;
//! - [`stop`]: a clean stop and what each waiting caller is told;
//! - [`hosts`]: the cases where the two hosts used to decide differently, and time;
//! - [`recovery`]: credits, cancels and heartbeats across reconnects;
//! - [`model`]: a property test of the machine against model agents;
//! - [`hostile`]: callers and peers without the secret or a key, and a forging path;
//! - [`login`]: work held or refused for the login and the usage window; the re-login relay;
//! - [`notices`]: alerts and result callbacks through the machine;
//! - [`routing`]: many agents: labels, affinity, callers' turns, pause, health.
//! - [`pending`]: the bytes of the jobs not ended yet, held to `MAX_PENDING_BYTES`.
//! - [`logs`]: the machine's log lines, captured.
//! - [`waiters`]: `/execute` callers waiting on one job: their caps, their shared answer.
//! - [`shares`]: what callers with secrets of their own hold of what every caller draws on.
//! - [`waiting`]: why a queued job waits (`waiting_for`), judged as `/execute` is refused.

mod cost;
mod hostile;
mod hosts;
mod login;
pub(crate) mod logs;
mod model;
mod notices;
mod pending;
mod recovery;
mod repeats;
mod routing;
mod shares;
mod streams;
mod stop;
mod storage;
mod waiters;
mod waiting;

use crate::body::Body;
use crate::http::{self, Reply, Request};
use crate::record::Mode;
use crate::{CallerId, Config, Edge, Effect};
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use shared::contract::{ExecuteRequest, Limits, Submission};
use shared::envelope::{open_order, Audience, Domain, Envelope};
use shared::job::{JobResult, JobState};
use shared::keys::Keyring;
use shared::link::{Ephemeral, MacKey};
use shared::oauth::{OAuthReport, OAuthSource};
use shared::protocol::{close, AgentMessage, Beat, EdgeMessage, Hello, JobOrder, Slots, Welcome, PROTOCOL_VERSION};

pub(super) const SECRET: &str = "0123456789abcdef0123";
pub(super) const HB: u64 = 1_000;
pub(super) const LOST: u64 = 5_000;
/// The address the scripted agent connects from.
pub(super) const PEER: &str = "192.0.2.1";
/// The nonce the scripted agent dials with (`X-Runner-Agent-Nonce`): base64, of a nonce's shape.
pub(super) const AGENT_NONCE: &str = "YWdlbnQtbm9uY2UtZm9yLXRoZS10ZXN0cw==";
/// Orders for `spark` in the default pool.
pub(super) const SPARK: Audience<'static> = Audience { agent_id: "spark", pool: "default" };

pub(super) fn edge_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}
pub(super) fn agent_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// The scripted agents' X25519 key of every connection (the edge's comes from the seed).
pub(super) fn agent_ephemeral() -> Ephemeral {
    Ephemeral::new([0x42; 32])
}

/// The agent→edge key of the connection `sid`: what its agent MACs its reports with. The
/// scripted agent derives it from the welcome in [`join_with`], which checks that both
/// sides agree; later helpers read it from the session record.
pub(super) fn link(edge: &Edge, sid: &str) -> MacKey {
    edge.session(sid).and_then(|s| s.agent()).expect("a proven session").keys.agent_to_edge.clone()
}

/// The agent→edge key of `agent`'s current connection.
pub(super) fn link_of(edge: &Edge, agent: &str) -> MacKey {
    edge.ready().find(|(_, a)| a.agent_id == agent).map(|(_, a)| a.keys.agent_to_edge.clone()).expect("the agent is connected")
}

/// A key no connection has: what someone on the path, without either side's signing key,
/// could MAC with.
pub(super) fn forged_link(n: u8) -> MacKey {
    MacKey::from_bytes([n; 32])
}

pub(super) fn config() -> Config {
    Config {
        pool: "default".into(),
        runner_secret: SECRET.into(),
        caller_secrets: Vec::new(),
        max_queued_per_caller: 1_000,
        admin_secret: None,
        signing_key: edge_key(),
        agents: Keyring::from_keys([
            ("spark".to_string(), agent_key(1).verifying_key()),
            ("laptop".to_string(), agent_key(2).verifying_key()),
        ]),
        other_pools: Vec::new(),
        heartbeat_interval_ms: HB,
        lost_after_ms: LOST,
        max_timeout_ms: 3_600_000,
        max_body_bytes: 1024,
        job_retention_ms: 60_000,
        queue_ttl_ms: 30_000,
        max_queued_jobs: 3,
        timeout_margin_ms: 1_000,
        max_retained_jobs: 1_000,
        max_retained_bytes: 64 * 1024 * 1024,
        max_pending_bytes: crate::config::DEFAULT_MAX_PENDING_BYTES,
        edge_version: "test".into(),
        notify_url: None,
        oauth_warn_hours: 24.0,
        offline_alert_ms: 60_000,
        notify_min_interval_ms: 3_600_000,
        callback_hosts: vec!["127.0.0.1".into(), "hooks.example.com".into()],
        sse_keepalive_ms: crate::progress::SSE_KEEPALIVE_MS,
    }
}

pub(super) fn oauth() -> OAuthReport {
    OAuthReport { source: OAuthSource::OauthTokenEnv, ..OAuthReport::unconfigured(0) }
}

pub(super) fn sent(effects: &[Effect], session: &str) -> Vec<EdgeMessage> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { session: s, text } if s == session => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

/// The jobs these effects ended, with the answer their callers get: every job ends with
/// the save of its terminal record.
pub(super) fn finished(effects: &[Effect]) -> Vec<(String, u16, Value)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Save(job) if job.state.is_terminal() => {
                let (status, body) = job.answer().unwrap();
                Some((job.id.clone(), status, serde_json::from_str(&body).unwrap()))
            }
            _ => None,
        })
        .collect()
}

/// What these effects answer `caller`, if anything.
pub(super) fn answer_to(effects: &[Effect], caller: CallerId) -> Option<(u16, Value)> {
    effects.iter().find_map(|e| match e {
        Effect::Answer { caller: c, response } if *c == caller => Some((response.status, serde_json::from_str(&response.body).unwrap())),
        _ => None,
    })
}

/// The chunks these effects write on `caller`'s stream, and whether they end it.
pub(super) fn streamed(effects: &[Effect], caller: CallerId) -> (Vec<String>, bool) {
    let chunks = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Stream { caller: c, chunk } if *c == caller => Some(chunk.to_string()),
            _ => None,
        })
        .collect();
    (chunks, effects.iter().any(|e| matches!(e, Effect::EndStream { caller: c } if *c == caller)))
}

pub(super) fn closed(effects: &[Effect]) -> Option<(u16, String)> {
    effects.iter().find_map(|e| match e {
        Effect::Close { code, reason, .. } => Some((*code, reason.clone())),
        _ => None,
    })
}

/// Connects and authenticates an agent; returns its session id.
pub(super) fn join(edge: &mut Edge, now: u64, agent: &str, key: &SigningKey, running: Vec<String>, seed: u8) -> (String, Vec<Effect>) {
    join_with(edge, now, agent, key, running, seed, 1)
}

pub(super) fn join_with(edge: &mut Edge, now: u64, agent: &str, key: &SigningKey, running: Vec<String>, seed: u8, capacity: u32) -> (String, Vec<Effect>) {
    let (sid, effects) = edge.connect(now, [seed; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, protocol, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    assert_eq!(*protocol, PROTOCOL_VERSION);
    let hello = Hello {
        agent_nonce: "agent-nonce".into(),
        capacity,
        running,
        claude_version: Some("2.1.197 (Claude Code)".into()),
        ..hello(agent, nonce, now)
    };
    let effects = edge.message(now, &sid, &hello_text(&hello, key));
    // Both ends of the connection hold the same keys: the agent's, derived from the welcome.
    if let Some(EdgeMessage::Welcome { envelope }) = sent(&effects, &sid).into_iter().next() {
        let welcome: Welcome = envelope.open(Domain::Welcome, &edge_key().verifying_key()).unwrap();
        let t = shared::link::Transcript {
            challenge: &hello.challenge,
            agent_nonce: &hello.agent_nonce,
            agent_public: &hello.ephemeral,
            edge_public: &welcome.ephemeral,
            agent_id: agent,
            pool: &welcome.pool,
        };
        let keys = shared::link::LinkKeys::agree(&agent_ephemeral(), &welcome.ephemeral, &t).unwrap();
        assert_eq!(edge.session(&sid).and_then(|s| s.agent()).unwrap().keys, keys, "the edge's keys are the agent's");
    }
    (sid, effects)
}

/// A hello from `agent` answering `nonce` at `now`: one free slot, nothing held, a working
/// login, no labels or mirrors. A test changes what it needs: `Hello { …, ..hello(…) }`.
pub(super) fn hello(agent: &str, nonce: &str, now: u64) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: agent.into(),
        agent_version: "t".into(),
        claude_version: None,
        challenge: nonce.into(),
        agent_nonce: "n".into(),
        ephemeral: agent_ephemeral().public(),
        issued_at: now,
        capacity: 1,
        running: vec![],
        finished: vec![],
        more_finished: false,
        oauth: oauth(),
        labels: Default::default(),
        mirrors: Vec::new(),
        instance: None,
    }
}

/// `hello` as the frame its agent sends, signed with `key`.
pub(super) fn hello_text(hello: &Hello, key: &SigningKey) -> String {
    AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: hello.agent_id.clone(), envelope: Envelope::seal(Domain::Hello, hello, key) }.to_text()
}

/// A hello from `agent` answering `nonce`, signed with `key`.
pub(super) fn hello_frame(agent: &str, nonce: &str, now: u64, key: &SigningKey) -> String {
    hello_text(&hello(agent, nonce, now), key)
}

/// An edge with agent `spark` connected and one credit granted.
pub(super) fn ready_edge() -> (Edge, String) {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(1, 0));
    (edge, sid)
}

/// The agent states `free` slots, having received `received` orders on this connection.
pub(super) fn credit(free: u32, received: u64) -> AgentMessage {
    AgentMessage::Credit { slots: Slots { free, received } }
}

/// A heartbeat of a capacity-1 agent holding `running`, with its statement of slots and
/// a working login; [`signed`] makes it the frame its agent sends on a connection.
pub(super) fn beat(running: &[&str], free: u32, received: u64) -> Beat {
    Beat {
        challenge: String::new(),
        seq: 0,
        running: running.iter().map(|s| s.to_string()).collect(),
        capacity: 1,
        oauth: oauth(),
        slots: Slots { free, received },
        claude_version: None,
        stopping: false,
        cannot_start: None,
        finished: Vec::new(),
        more_finished: false,
    }
}

/// `beat` as the agent of session `sid` sends it: bound to the session's challenge,
/// numbered after the last heartbeat the edge took on it, signed with the agent's key.
pub(super) fn signed(edge: &Edge, sid: &str, beat: Beat) -> AgentMessage {
    let agent = edge.session(sid).and_then(|s| s.agent()).expect("a proven session");
    AgentMessage::heartbeat(&Beat { challenge: agent.challenge.clone(), seq: agent.beat + 1, ..beat }, &agent.keys.agent_to_edge)
}

/// The agent of session `sid` sends heartbeat `beat` at `now`.
pub(super) fn pulse(edge: &mut Edge, now: u64, sid: &str, beat: Beat) -> Vec<Effect> {
    let msg = signed(edge, sid, beat);
    say(edge, now, sid, msg)
}

pub(super) fn submission(prompt: &str, timeout_ms: u64, key: Option<&str>) -> Submission {
    let body = json!({"prompt": prompt, "timeout_ms": timeout_ms}).to_string();
    ExecuteRequest::parse(body.as_bytes(), key, Limits { max_timeout_ms: 3_600_000 }).unwrap()
}

pub(super) fn order_of(effects: &[Effect], sid: &str, agent: &str, now: u64) -> JobOrder {
    let job = sent(effects, sid).into_iter().find_map(|m| match m {
        EdgeMessage::Job { envelope } => Some(envelope),
        _ => None,
    });
    open_order(&job.expect("a job was sent"), Domain::Job, &edge_key().verifying_key(), Audience { agent_id: agent, pool: "default" }, now).unwrap()
}

pub(super) fn say(edge: &mut Edge, now: u64, sid: &str, msg: AgentMessage) -> Vec<Effect> {
    edge.message(now, sid, &msg.to_text())
}

/// An authorised HTTP request, handled as a host would at `now`.
pub(super) fn call(edge: &mut Edge, now: impl Into<crate::Now>, method: &str, path: &str, body: Value) -> http::Handled {
    let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let req = Request {
        method: method.into(),
        path: path.into(),
        secret_header: Some(SECRET.into()),
        authorization: None,
        idempotency_key: None,
        last_event_id: None,
        body: Body::Bytes(body),
    };
    static SEED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let seed = SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    http::handle(edge, now, [seed; 16], &req)
}

/// `spark`'s signed result for the job's latest order.
pub(super) fn result_msg(edge: &Edge, job_id: &str, result: JobResult) -> AgentMessage {
    let nonce = edge.job(job_id).map_or(format!("{job_id}:1"), |j| j.order_nonce());
    AgentMessage::result(job_id, &nonce, result, &link_of(edge, "spark"))
}

/// `spark`'s signed progress event for the job's latest order.
pub(super) fn progress_msg(edge: &Edge, job_id: &str, seq: u64, event: Value) -> AgentMessage {
    let nonce = edge.job(job_id).map_or(format!("{job_id}:1"), |j| j.order_nonce());
    AgentMessage::progress(job_id, &nonce, vec![shared::protocol::ProgressEvent { seq, event }], &link_of(edge, "spark"))
}

/// `spark` reports the job's result, signed and bound to the job's latest order.
pub(super) fn report(edge: &mut Edge, now: u64, sid: &str, job_id: &str, result: JobResult) -> Vec<Effect> {
    let msg = result_msg(edge, job_id, result);
    say(edge, now, sid, msg)
}

/// `spark` refuses the job's latest order, signed and bound to it.
pub(super) fn refuse(edge: &mut Edge, now: u64, sid: &str, job_id: &str, reason: &str, retry: bool) -> Vec<Effect> {
    let nonce = edge.job(job_id).map_or(format!("{job_id}:1"), |j| j.order_nonce());
    let key = link(edge, sid);
    say(edge, now, sid, AgentMessage::rejected(job_id, &nonce, reason, retry, &key))
}

/// `spark` says the job started (its started record is durable), MACed and bound to its
/// latest order.
pub(super) fn start(edge: &mut Edge, now: u64, sid: &str, job_id: &str) -> Vec<Effect> {
    let nonce = edge.job(job_id).map_or(format!("{job_id}:1"), |j| j.order_nonce());
    let key = link(edge, sid);
    say(edge, now, sid, AgentMessage::started(job_id, &nonce, &key))
}

/// `spark` reports a progress event of the job, signed and bound to its latest order.
pub(super) fn progress(edge: &mut Edge, now: u64, sid: &str, job_id: &str, seq: u64, event: Value) -> Vec<Effect> {
    let msg = progress_msg(edge, job_id, seq, event);
    say(edge, now, sid, msg)
}

pub(super) fn ok_result() -> JobResult {
    JobResult { success: true, output: "done".into(), exit_code: Some(0), duration_ms: 5, ..Default::default() }
}

#[test]
fn execute_with_no_agent_is_refused_at_once() {
    let mut edge = Edge::new(config(), 0);
    let err = edge.submit(0, "j1".into(), submission("hi", 1000, None), Mode::Wait).unwrap_err();
    assert_eq!(err.status, 503);
    assert_eq!(err.body.fallback, Some(true));
    // A detached job may wait for an agent.
    assert!(edge.submit(0, "j2".into(), submission("hi", 1000, None), Mode::Detached).is_ok());
}

#[test]
fn a_job_flows_to_a_proven_agent_and_back() {
    let mut edge = Edge::new(config(), 0);
    let (sid, effects) = join(&mut edge, 10, "spark", &agent_key(1), vec![], 1);
    let EdgeMessage::Welcome { envelope } = &sent(&effects, &sid)[0] else { panic!("welcome") };
    let welcome: Welcome = envelope.open(Domain::Welcome, &edge_key().verifying_key()).unwrap();
    assert_eq!(welcome.agent_nonce, "agent-nonce");
    assert_eq!(welcome.heartbeat_interval_ms, HB);
    // The agent comes back within it while it holds jobs (agent/src/reconnect.rs).
    assert_eq!(welcome.lost_after_ms, Some(LOST));
    assert!(edge.is_online());

    // No credit yet: the job waits.
    let s = edge.submit(20, "j1".into(), submission("hi", 10_000, None), Mode::Wait).unwrap();
    assert!(sent(&s.effects, &sid).is_empty());
    assert_eq!(edge.job("j1").unwrap().state, JobState::Queued);
    let effects = say(&mut edge, 30, &sid, credit(1, 0));
    let order = order_of(&effects, &sid, "spark", 30);
    assert_eq!(order.header.job_id, "j1");
    assert_eq!(order.spec.prompt, "hi");
    // The record is saved before the order goes out.
    let save = effects.iter().position(|e| matches!(e, Effect::Save(_))).unwrap();
    let send = effects.iter().position(|e| matches!(e, Effect::Send { .. })).unwrap();
    assert!(save < send);

    say(&mut edge, 40, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    assert_eq!(edge.job("j1").unwrap().state, JobState::Running);
    let effects = report(&mut edge, 50, &sid, "j1", ok_result());
    let done = finished(&effects);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1, 200);
    assert_eq!(done[0].2["output"], "done");
    assert_eq!(done[0].2["agent_id"], "spark");
    assert_eq!(done[0].2["job_id"], "j1");
    assert!(matches!(sent(&effects, &sid)[..], [EdgeMessage::ResultAck { .. }]));
    // A resent result is acknowledged and changes nothing.
    let effects = report(&mut edge, 60, &sid, "j1", JobResult::default());
    assert!(finished(&effects).is_empty());
    assert_eq!(edge.job("j1").unwrap().state, JobState::Succeeded);
}

#[test]
fn never_sends_more_jobs_than_credits() {
    let (mut edge, sid) = ready_edge();
    let mut orders = 0;
    for i in 0..3 {
        let s = edge.submit(1, format!("j{i}"), submission("x", 10_000, None), Mode::Wait).unwrap();
        orders += sent(&s.effects, &sid).len();
    }
    assert_eq!(orders, 1);
    // A statement made before the order arrived (it crossed the order) sends nothing more.
    let effects = say(&mut edge, 2, &sid, credit(1, 0));
    assert!(sent(&effects, &sid).is_empty(), "over capacity: {effects:?}");
    report(&mut edge, 2, &sid, "j0", ok_result());
    let effects = say(&mut edge, 2, &sid, credit(1, 1));
    assert_eq!(order_of(&effects, &sid, "spark", 2).header.job_id, "j1", "queue order is kept");
    // The queue is full at three waiting jobs.
    edge.submit(3, "j3".into(), submission("x", 10_000, None), Mode::Wait).unwrap();
    edge.submit(3, "j4".into(), submission("x", 10_000, None), Mode::Wait).unwrap();
    let err = edge.submit(3, "j5".into(), submission("x", 10_000, None), Mode::Wait).unwrap_err();
    assert_eq!(err.status, 429);
}

#[test]
fn a_job_refused_for_want_of_a_slot_goes_back_to_the_queue() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 10_000, None), Mode::Detached).unwrap();
    let effects = refuse(&mut edge, 1, &sid, "j1", "no free slot", true);
    assert!(finished(&effects).is_empty());
    assert_eq!(edge.job("j1").unwrap().state, JobState::Queued);
    let effects = say(&mut edge, 2, &sid, credit(1, 1));
    let nonce = order_of(&effects, &sid, "spark", 2).header.nonce;
    assert!(nonce.starts_with("j1:2:") && nonce == edge.job("j1").unwrap().order_nonce(), "{nonce}");
    // A refusal of the order itself ends the job, with what to check.
    let done = finished(&refuse(&mut edge, 3, &sid, "j1", "bad signature", false));
    assert_eq!(done[0].2["error_code"], "JOB_REJECTED");
    assert!(done[0].2["error"].as_str().unwrap().contains("EDGE_PUBLIC_KEY"));
}

#[test]
fn a_clock_that_steps_back_does_not_panic() {
    let mut edge = Edge::new(config(), 0);
    edge.submit(10_000, "j1".into(), submission("x", 1_000, None), Mode::Wait).ok();
    edge.submit(10_000, "j2".into(), submission("x", 1_000, None), Mode::Detached).unwrap();
    let _ = edge.tick(5_000);
    let _ = edge.tick(10_000 + 30_000 + 1);
    assert_eq!(edge.job("j2").unwrap().state, JobState::TimedOut);
}

/// A job that asked for a push ended TIMEOUT at the edge, "retryable", while its agent was
/// still pushing: the branch landed on the server 23 s later, and a caller that sent the
/// job again ran it twice (hostile review of repository jobs, 1). Sent to an agent, such a
/// job's TIMEOUT now says a push may have landed, and is not retryable; one that pushes
/// nothing stays retryable.
#[test]
fn the_edges_timeout_of_a_pushing_job_says_the_push_may_have_landed() {
    let (mut edge, sid) = ready_edge();
    let body = json!({"prompt": "p", "timeout_ms": 20_000, "repo_url": "https://github.com/o/r", "push_branch": "claude/x"}).to_string();
    let pushing = ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
    let s = edge.submit(1, "push".into(), pushing, Mode::Detached).unwrap();
    assert_eq!(sent(&s.effects, &sid).len(), 1, "the job went to the agent");
    let done = finished(&edge.tick(10_000_000));
    let (_, status, body) = done.iter().find(|(id, ..)| id == "push").expect("the job timed out");
    assert_eq!((*status, body["error_code"].as_str()), (200, Some("TIMEOUT")), "{body}");
    assert_eq!(body["retryable"], false, "{body}");
    let said = body["error"].as_str().unwrap();
    assert!(said.contains("claude/x") && said.contains("may have landed"), "{said}");

    // A job that pushes nothing may be sent again.
    let (mut edge, sid) = ready_edge();
    let s = edge.submit(1, "plain".into(), submission("p", 20_000, None), Mode::Detached).unwrap();
    assert_eq!(sent(&s.effects, &sid).len(), 1, "the job went to the agent");
    let done = finished(&edge.tick(10_000_000));
    assert_eq!((done[0].2["error_code"].as_str(), &done[0].2["retryable"]), (Some("TIMEOUT"), &json!(true)), "{:?}", done[0].2);
}

#[test]
fn refuses_unknown_forged_and_replayed_hellos() {
    let mut edge = Edge::new(config(), 0);
    // Unknown agent id.
    let (_, effects) = join(&mut edge, 0, "mallory", &agent_key(1), vec![], 1);
    let (code, reason) = closed(&effects).unwrap();
    assert_eq!(code, close::UNAUTHORIZED);
    assert!(reason.contains("AGENT_PUBLIC_KEYS"), "{reason}");
    // Known id, wrong key.
    let (_, effects) = join(&mut edge, 0, "spark", &agent_key(2), vec![], 2);
    assert_eq!(closed(&effects).unwrap().0, close::UNAUTHORIZED);
    assert!(!edge.is_online());

    // A hello captured from one connection, replayed on another.
    let (sid1, effects) = edge.connect(0, [3; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid1)[0] else { panic!() };
    let text = hello_frame("spark", nonce, 0, &agent_key(1));
    assert!(closed(&edge.message(0, &sid1, &text)).is_none());
    let (sid2, _) = edge.connect(0, [4; 64], PEER, Some(AGENT_NONCE));
    let (code, reason) = closed(&edge.message(0, &sid2, &text)).unwrap();
    assert_eq!(code, close::UNAUTHORIZED);
    assert!(reason.contains("replay"), "{reason}");
}

#[test]
fn a_hello_whose_connection_key_was_swapped_or_gives_no_secret_is_refused() {
    let mut edge = Edge::new(config(), 0);
    // Swapped on the path for one whose secret the path would know: the signature breaks.
    let (sid, effects) = edge.connect(0, [5; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!() };
    let text = hello_frame("spark", nonce, 0, &agent_key(1));
    let mallory = Ephemeral::new([0x43; 32]).public();
    assert!(text.contains(&agent_ephemeral().public()), "{text}");
    let swapped = text.replace(&agent_ephemeral().public(), &mallory);
    let effects = edge.message(0, &sid, &swapped);
    let (code, reason) = closed(&effects).unwrap_or_else(|| panic!("refused: {effects:?}"));
    assert_eq!(code, close::UNAUTHORIZED);
    assert!(reason.contains("failed to prove its identity"), "{reason}");
    // Signed by the agent, but a low-order point (no shared secret) or not a key at all.
    for (seed, bad) in [(6, shared::keys::encode(&[0; 32])), (8, shared::keys::encode(&[1; 31]))] {
        let (sid, effects) = edge.connect(0, [seed; 64], PEER, Some(AGENT_NONCE));
        let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!() };
        let hello = Hello { ephemeral: bad.clone(), ..hello("spark", nonce, 0) };
        let (code, reason) = closed(&edge.message(0, &sid, &hello_text(&hello, &agent_key(1)))).expect("refused");
        assert_eq!(code, close::UNAUTHORIZED);
        assert!(reason.contains("connection key is refused"), "{reason}");
    }
    assert!(!edge.is_online());
    // The agent's own key goes through.
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 7);
    assert!(edge.session(&sid).and_then(|s| s.agent()).is_some());
}

#[test]
fn refuses_another_protocol_version_by_name() {
    // 10: the last version whose agents heard any frame (a hop's made-up ones too) as the
    // edge there; 9: the last whose orders named no caller (its agents resume any session).
    // 11: the last whose welcome named no job given up (its agents judged by their own
    // clock, rev29-2).
    assert_eq!(shared::protocol::PROTOCOL_VERSION, 12);
    for old in [11, 10, 9, 8, 7, 99] {
        let mut edge = Edge::new(config(), 0);
        let (sid, _) = edge.connect(0, [1; 64], PEER, Some(AGENT_NONCE));
        let env = Envelope { payload: "{}".into(), sig: String::new() };
        let text = AgentMessage::Hello { protocol: old, agent_id: "spark".into(), envelope: env }.to_text();
        let (code, reason) = closed(&edge.message(0, &sid, &text)).unwrap();
        assert_eq!(code, close::VERSION_MISMATCH);
        assert!(reason.contains(&format!("v{old}")) && reason.contains("v12"), "{reason}");
    }
}

/// The challenge carries the edge's signature over the agent's nonce from the upgrade
/// (the agent sends its hello only once it holds). Without a nonce (an agent of before it,
/// within protocol 10: no release since 11 dials so) the connection is closed, saying to
/// upgrade the agent — it got an unsigned challenge, a path no release reached; a nonce
/// not of a nonce's shape (a header sent twice, read joined) closes it too, saying so,
/// and nothing of either is signed.
#[test]
fn the_challenge_is_signed_over_the_agents_nonce_and_a_dial_without_one_is_closed() {
    use shared::envelope::ChallengeProof;
    let mut edge = Edge::new(config(), 0);
    let agent_nonce = shared::keys::encode(&[5; 24]);
    let (sid, effects) = edge.connect(0, [1; 64], PEER, Some(&agent_nonce));
    let EdgeMessage::Challenge { nonce, proof, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    let proof = proof.as_deref().expect("signed");
    let key = edge_key().verifying_key();
    assert!(ChallengeProof::verify(proof, &key, PROTOCOL_VERSION, nonce, &agent_nonce, "default"));
    assert!(!ChallengeProof::verify(proof, &key, PROTOCOL_VERSION, nonce, &shared::keys::encode(&[6; 24]), "default"));
    // Without one: closed before any challenge, naming the fix.
    let (sid, effects) = edge.connect(0, [2; 64], PEER, None);
    assert!(sent(&effects, &sid).is_empty(), "{effects:?}");
    let (code, reason) = closed(&effects).expect("closed");
    assert_eq!(code, close::VERSION_MISMATCH);
    assert!(reason.contains("X-Runner-Agent-Nonce") && reason.contains("upgrade claude-runner on the agent") && !reason.ends_with("..."), "{reason}");
    assert!(edge.session(&sid).is_none(), "no record kept of it");
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 3);
    assert!(edge.session(&sid).and_then(|s| s.agent()).is_some());
    for malformed in [format!("{agent_nonce}, {agent_nonce}"), "short".into(), "a\nb".repeat(10), "x".repeat(65)] {
        let (sid, effects) = edge.connect(0, [4; 64], PEER, Some(&malformed));
        assert!(sent(&effects, &sid).is_empty(), "{malformed:?}: {effects:?}");
        let (code, reason) = closed(&effects).expect("closed");
        assert_eq!(code, close::PROTOCOL_ERROR);
        assert!(reason.contains("X-Runner-Agent-Nonce") && !reason.ends_with("..."), "{reason}");
        assert!(edge.session(&sid).is_none());
    }
}

#[test]
fn garbage_frames_close_the_connection_without_panicking() {
    for text in ["", "nonsense", "{\"type\":\"credit\"}", "[]", "{\"type\":\"result\",\"job_id\":5}"] {
        let mut edge = Edge::new(config(), 0);
        let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
        let effects = edge.message(0, &sid, text);
        assert_eq!(closed(&effects).unwrap().0, close::PROTOCOL_ERROR, "{text}");
        assert!(!edge.is_online());
    }
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let (code, reason) = closed(&edge.binary_frame(0, &sid)).unwrap();
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("JSON text"), "{reason}");
    assert!(!edge.is_online());
}

/// A pushing job lost with its agent ended RUNNER_LOST, retryable and `fallback: true`,
/// though the agent may have pushed before it went away (or be pushing still, cut off
/// from the edge): a caller that ran it elsewhere pushed twice. Lost, gone from a
/// restarted agent, or reported lost by that agent itself (restarted, unsure), such a job
/// now says a push may have landed, not retryable, no fallback; one its agent stopped on
/// purpose (it knows nothing was pushed), or that pushes nothing, is unchanged.
#[test]
fn a_lost_pushing_job_says_the_push_may_have_landed() {
    let pushing = || {
        let body = json!({"prompt": "p", "timeout_ms": 60_000, "repo_url": "https://github.com/o/r", "push_branch": "claude/x"}).to_string();
        ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap()
    };
    // Its agent went away and did not come back in time.
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "push".into(), pushing(), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "push".into() });
    edge.disconnect(100, &sid);
    let done = finished(&edge.tick(100 + LOST));
    assert_eq!((done[0].1, done[0].2["error_code"].as_str()), (502, Some("RUNNER_LOST")), "{:?}", done[0].2);
    assert_eq!(done[0].2["fallback"], Value::Null, "{:?}", done[0].2);
    let said = done[0].2["error"].as_str().unwrap();
    assert!(said.contains("claude/x") && said.contains("may have landed"), "{said}");
    let view = serde_json::to_value(edge.job("push").unwrap().response().unwrap()).unwrap();
    assert_eq!(view["retryable"], false, "{view}");

    // Its agent came back without it (restarted).
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "push".into(), pushing(), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "push".into() });
    start(&mut edge, 1, &sid, "push");
    edge.disconnect(100, &sid);
    join(&mut edge, 200, "spark", &agent_key(1), vec![], 1);
    let view = serde_json::to_value(edge.job("push").unwrap().response().expect("ended lost at the hello")).unwrap();
    assert_eq!((view["error_code"].as_str(), &view["retryable"]), (Some("RUNNER_LOST"), &json!(false)), "{view}");
    let said = view["error"].as_str().unwrap();
    assert!(said.contains("restarted") && said.contains("may have landed"), "{view}");

    // Its agent, killed mid-push and back in time, reports it lost itself (its started
    // record without a result): the same (hostile review rev3, 1).
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "push".into(), pushing(), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "push".into() });
    let interrupted = JobResult { retryable: None, ..JobResult::failure(shared::contract::ErrorCode::RunnerLost, "the agent stopped (it crashed or was killed) while this job ran; it was not run again: run the task again or elsewhere", 0) };
    let done = finished(&report(&mut edge, 5, &sid, "push", interrupted));
    assert_eq!((done[0].1, done[0].2["error_code"].as_str(), &done[0].2["fallback"]), (502, Some("RUNNER_LOST"), &Value::Null), "{:?}", done[0].2);
    let said = done[0].2["error"].as_str().unwrap();
    assert!(said.contains("may have landed") && said.matches("may have landed").count() == 1, "{said}");
    let view = serde_json::to_value(edge.job("push").unwrap().response().unwrap()).unwrap();
    assert_eq!(view["retryable"], false, "{view}");

    // Its agent, stopped on purpose (a drain that ran out, a second SIGTERM), knows it
    // pushed nothing (Claude was still running, or the push had not begun), and says so:
    // retryable, with fallback (hostile review rev4, 1).
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "push".into(), pushing(), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "push".into() });
    let stopping = JobResult::failure(shared::contract::ErrorCode::RunnerLost, "the agent on the runner machine stopped while Claude was running; run the task again or elsewhere", 0);
    let done = finished(&report(&mut edge, 5, &sid, "push", stopping));
    assert_eq!((done[0].1, &done[0].2["fallback"]), (502, &json!(true)), "{:?}", done[0].2);
    assert!(!done[0].2["error"].as_str().unwrap().contains("may have landed"), "{:?}", done[0].2);

    // A job that pushes nothing may still run elsewhere.
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "plain".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "plain".into() });
    edge.disconnect(100, &sid);
    let done = finished(&edge.tick(100 + LOST));
    assert_eq!((done[0].2["fallback"].clone(), done[0].2["error_code"].as_str()), (json!(true), Some("RUNNER_LOST")));
}

#[test]
fn a_job_waits_for_its_agent_then_is_lost() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    edge.disconnect(100, &sid);
    assert_eq!(edge.next_deadline(), Some(100 + LOST));
    assert!(finished(&edge.tick(100 + LOST - 1)).is_empty());
    let done = finished(&edge.tick(100 + LOST));
    assert_eq!(done[0].1, 502);
    assert_eq!(done[0].2["error_code"], "RUNNER_LOST");
    assert_eq!(done[0].2["fallback"], true);
    assert_eq!(edge.job("j1").unwrap().state, JobState::Lost);
}

#[test]
fn a_job_survives_a_reconnect_and_its_result_arrives() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    edge.disconnect(100, &sid);
    let (sid2, _) = join(&mut edge, 200, "spark", &agent_key(1), vec!["j1".into()], 2);
    assert!(edge.job("j1").unwrap().orphaned_at.is_none());
    for t in (1_000..=100 + LOST).step_by(1_000) {
        pulse(&mut edge, t, &sid2, beat(&["j1"], 0, 0));
    }
    assert!(finished(&edge.tick(100 + LOST)).is_empty(), "not lost: the agent came back");
    let done = finished(&report(&mut edge, 5_500, &sid2, "j1", ok_result()));
    assert_eq!(done[0].1, 200);
}

#[test]
fn an_agent_that_restarted_without_the_job_settles_it() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join_with(&mut edge, 0, "spark", &agent_key(1), vec![], 1, 2);
    say(&mut edge, 0, &sid, AgentMessage::Credit { slots: Slots { free: 2, received: 0 } });
    edge.submit(0, "run".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    edge.submit(0, "sent".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "run".into() });
    start(&mut edge, 1, &sid, "run");
    edge.disconnect(2, &sid);
    let (sid2, effects) = join(&mut edge, 3, "spark", &agent_key(1), vec![], 2);
    let done = finished(&effects);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, "run");
    assert_eq!(done[0].1, 502);
    // The job it never received goes out again, with a new nonce.
    let effects = say(&mut edge, 4, &sid2, credit(1, 0));
    let order = order_of(&effects, &sid2, "spark", 4);
    assert_eq!(order.header.job_id, "sent");
    assert!(order.header.nonce.starts_with("sent:2:"), "{}", order.header.nonce);
}

#[test]
fn a_silent_agent_is_dropped_within_two_heartbeats() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let effects = pulse(&mut edge, 500, &sid, beat(&[], 1, 0));
    // Naming the beat it answers (the agent's silence bound counts from it), MACed with the
    // connection's edge→agent key: the agent hears the edge only in what it proves.
    let [EdgeMessage::HeartbeatAck { envelope }] = &sent(&effects, &sid)[..] else { panic!("{:?}", sent(&effects, &sid)) };
    let key = edge.session(&sid).unwrap().agent().unwrap().keys.edge_to_agent.clone();
    let ack: shared::protocol::BeatAck = envelope.open(Domain::HeartbeatAck, &key).expect("MACed by the edge on this connection");
    assert_eq!(ack.beat, 1);
    assert!(envelope.open::<shared::protocol::BeatAck>(Domain::HeartbeatAck, &edge.session(&sid).unwrap().agent().unwrap().keys.agent_to_edge).is_err());
    assert_eq!(edge.next_deadline(), Some(500 + 2 * HB));
    assert!(closed(&edge.tick(500 + 2 * HB - 1)).is_none());
    assert_eq!(closed(&edge.tick(500 + 2 * HB)).unwrap().0, close::SILENT);
    assert!(!edge.is_online());
    assert_eq!(edge.health(3000).status.http_status(), 503);
}

#[test]
fn an_unfinished_handshake_is_dropped() {
    let mut edge = Edge::new(config(), 0);
    let (_sid, _) = edge.connect(0, [1; 64], PEER, Some(AGENT_NONCE));
    assert_eq!(edge.next_deadline(), Some(10_000));
    assert!(closed(&edge.tick(10_000)).is_some());
}

#[test]
fn the_edge_times_a_job_out_and_tells_the_agent() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 2_000, None), Mode::Wait).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    // Keep the connection alive meanwhile.
    pulse(&mut edge, 1_500, &sid, beat(&["j1"], 0, 1));
    pulse(&mut edge, 2_500, &sid, beat(&["j1"], 0, 1));
    let effects = edge.tick(3_000);
    assert_eq!(finished(&effects)[0].2["error_code"], "TIMEOUT");
    assert!(sent(&effects, &sid).iter().any(|m| matches!(m, EdgeMessage::Cancel { .. })));
}

/// An order never seen taken may be held on the agent's path; let through after the edge
/// ended its job (timed out, lost) it would start the job after the caller was told to run
/// it elsewhere. So such a job is not ended before its order has expired on the agent's
/// clock too — and then the late order is refused by the agent as expired.
#[test]
fn a_job_whose_order_was_never_seen_taken_is_not_ended_before_that_order_expired() {
    let hold = shared::envelope::ORDER_TTL_MS + 2 * shared::envelope::CLOCK_SKEW_MS;
    // Timed out: the order held back while the connection stays up.
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 2_000, None), Mode::Wait).unwrap();
    let mut at = 0;
    while at + 1_000 < hold {
        at += 1_000;
        pulse(&mut edge, at, &sid, beat(&[], 1, 0));
        assert!(finished(&edge.tick(at)).is_empty(), "ended at {at} ms while its order could still be taken");
    }
    let effects = edge.tick(hold);
    assert_eq!(finished(&effects)[0].2["error_code"], "TIMEOUT");
    // Lost: the connection gone with the order unanswered.
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j2".into(), submission("x", 600_000, None), Mode::Wait).unwrap();
    edge.disconnect(10, &sid);
    assert!(finished(&edge.tick(10 + LOST)).is_empty(), "lost while its order could still be taken");
    assert_eq!(finished(&edge.tick(hold))[0].2["error_code"], "RUNNER_LOST");
}

#[test]
fn a_queued_execute_falls_back_when_the_agent_leaves() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    edge.submit(0, "j1".into(), submission("x", 600_000, None), Mode::Wait).unwrap();
    edge.disconnect(10, &sid);
    let done = finished(&edge.tick(10 + LOST));
    assert_eq!(done[0].1, 503);
    assert_eq!(done[0].2["error_code"], "RUNNER_OFFLINE");
}

#[test]
fn idempotency_keys_return_the_same_job() {
    let mut edge = Edge::new(config(), 0);
    let a = edge.submit(0, "j1".into(), submission("x", 1000, Some("k")), Mode::Detached).unwrap();
    let b = edge.submit(0, "j2".into(), submission("x", 1000, Some("k")), Mode::Detached).unwrap();
    assert_eq!(b.job_id, a.job_id);
    assert!(b.existing);
    assert!(edge.job("j2").is_none());
    // The same key for another task is refused, naming the job it belongs to.
    let err = edge.submit(0, "j3".into(), submission("something else", 1000, Some("k")), Mode::Detached).unwrap_err();
    assert_eq!(err.status, 409);
    assert_eq!(err.body.job_id.as_deref(), Some("j1"));
}

/// Review rev10, 4: a key used again with another placement (`labels`, `agent_id`,
/// `priority`), `callback_url` or `wait_for_usage` was answered with the first job, as if
/// it were the same request, though that job runs where, how and telling whom the first
/// said. It is a `409`, as for another task: while the job is kept and once the caps forgot
/// it (its key kept). An `/execute` repeating a `POST /jobs` key is not compared on
/// `wait_for_usage`, which only `POST /jobs` says.
#[test]
fn a_key_used_again_for_another_placement_or_delivery_is_a_conflict() {
    let cfg = Config { max_retained_jobs: 1, ..config() };
    let mut edge = Edge::new(cfg.clone(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let first = || submission("x", 60_000, Some("k"));
    edge.submit(0, "j1".into(), first(), Mode::Detached).unwrap();
    type Change = fn(&mut Submission);
    let changes: [(&str, Change); 5] = [
        ("agent_id", |s| s.placement.agent_id = Some("other".into())),
        ("labels", |s| drop(s.placement.labels.insert("gpu".into(), "x".into()))),
        ("priority", |s| s.placement.priority = 9),
        ("callback_url", |s| s.callback_url = Some("https://hooks.example.com/r".into())),
        ("wait_for_usage", |s| s.wait_for_usage = false),
    ];
    let conflicts = |edge: &mut Edge, now: u64| {
        for (what, change) in changes {
            let mut again = first();
            change(&mut again);
            let err = edge.submit(now, "j2".into(), again, Mode::Detached).expect_err(what);
            assert_eq!((err.status, err.body.job_id.as_deref()), (409, Some("j1")), "{what}: {}", err.body.error);
            assert!(err.body.error.contains("new key"), "{what}: says what to do: {}", err.body.error);
        }
    };
    conflicts(&mut edge, 1);
    assert!(edge.submit(1, "j2".into(), first(), Mode::Detached).unwrap().existing, "the same request is still a repeat");
    let mut execute = first();
    execute.wait_for_usage = false;
    assert!(edge.submit(1, "j2".into(), execute, Mode::Wait).unwrap().existing, "an /execute repeat is not compared on wait_for_usage");
    // j1 ends, then another job: the cap forgets j1 and keeps its key.
    say(&mut edge, 2, &sid, credit(1, 0));
    report(&mut edge, 3, &sid, "j1", ok_result());
    edge.submit(4, "j9".into(), submission("y", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 4, &sid, credit(1, 1));
    let effects = report(&mut edge, 5, &sid, "j9", ok_result());
    assert!(edge.job("j1").is_none(), "the cap forgot j1");
    conflicts(&mut edge, 6);
    let forgotten = |edge: &mut Edge, again: Submission| {
        let err = edge.submit(6, "j2".into(), again, Mode::Detached).unwrap_err();
        assert_eq!(err.body.error_code, shared::contract::ErrorCode::JobForgotten, "{}", err.body.error);
    };
    forgotten(&mut edge, first());
    // Restored from its stub, the key answers the same.
    let (writes, _) = crate::split_writes(effects);
    let stub = writes.saves.iter().find(|j| j.id == "j1").expect("j1's key is stored").as_ref().clone();
    let (mut edge, _) = Edge::restore(cfg.clone(), vec![stub.clone()], vec![], None, 6);
    conflicts(&mut edge, 6);
    // The stub of an edge of before kept no digest of the placement and callback (nor
    // them): its repeats are compared on the task and the sender alone, as they were.
    let before = crate::record::Job { terms_digest: String::new(), ..stub };
    let (mut edge, _) = Edge::restore(cfg, vec![before], vec![], None, 6);
    let mut elsewhere = first();
    elsewhere.placement.agent_id = Some("other".into());
    forgotten(&mut edge, elsewhere);
    let mut changed = first();
    changed.spec.prompt = "another task".into();
    assert_eq!(edge.submit(6, "j2".into(), changed, Mode::Detached).unwrap_err().status, 409);
}

#[test]
fn cancel_ends_a_queued_job_and_asks_the_agent_for_a_running_one() {
    let mut edge = Edge::new(config(), 0);
    edge.submit(0, "q".into(), submission("x", 1000, None), Mode::Detached).unwrap();
    let done = finished(&edge.cancel(1, "q").unwrap());
    assert_eq!(done[0].2["error_code"], "CANCELLED");
    assert_eq!(edge.cancel(2, "q").unwrap_err().status, 409);
    assert_eq!(edge.cancel(2, "nope").unwrap_err().status, 404);

    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(1, 0));
    edge.submit(0, "r".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    let effects = edge.cancel(5, "r").unwrap();
    let cancel = sent(&effects, &sid).into_iter().find_map(|m| match m {
        EdgeMessage::Cancel { envelope } => Some(envelope),
        _ => None,
    });
    let order: shared::protocol::CancelOrder =
        open_order(&cancel.unwrap(), Domain::Cancel, &edge_key().verifying_key(), SPARK, 5).unwrap();
    assert_eq!(order.header.job_id, "r");
}

#[test]
fn restore_keeps_jobs_and_starts_the_lost_clock() {
    let (mut edge, sid) = ready_edge();
    let mut saved = std::collections::HashMap::new();
    let mut keep = |effects: Vec<Effect>| {
        for e in effects {
            if let Effect::Save(j) = e {
                saved.insert(j.id.clone(), std::sync::Arc::unwrap_or_clone(j));
            }
        }
    };
    keep(edge.submit(0, "done".into(), submission("x", 60_000, Some("k")), Mode::Wait).unwrap().effects);
    keep(report(&mut edge, 1, &sid, "done", ok_result()));
    say(&mut edge, 1, &sid, credit(1, 1));
    keep(edge.submit(2, "run".into(), submission("x", 60_000, None), Mode::Wait).unwrap().effects);
    keep(say(&mut edge, 2, &sid, AgentMessage::Accepted { job_id: "run".into() }));
    // Started: an `/execute` job not started ends at a restore (its caller is gone).
    keep(start(&mut edge, 2, &sid, "run"));
    keep(edge.submit(2, "queued".into(), submission("x", 60_000, None), Mode::Detached).unwrap().effects);

    let (mut edge, _) = Edge::restore(config(), saved.into_values().collect(), vec![], None, 1_000);
    assert_eq!(edge.job("done").unwrap().state, JobState::Succeeded);
    assert_eq!(edge.job("queued").unwrap().state, JobState::Queued);
    assert!(edge.submit(3, "dup".into(), submission("x", 60_000, Some("k")), Mode::Detached).unwrap().existing);
    let done = finished(&edge.tick(1_000 + LOST));
    assert_eq!(done[0].0, "run");
    assert_eq!(done[0].2["error_code"], "RUNNER_LOST");
    // Retention ends; the record goes and so does its idempotency key.
    let effects = edge.tick(1 + 60_000);
    assert!(effects.iter().any(|e| matches!(e, Effect::Forget { job_id } if job_id == "done")));
    assert!(edge.job("done").is_none());
}

/// Jobs an edge stored before caller names were lowered keep their caller as it was sent
/// (`CI`). Read back, each is the lowered caller's: the same task sent again under its
/// idempotency key (as `CI`, now lowered to `ci`) is that job, not a second run, and the
/// queued one counts in `ci`'s lane against its cap.
#[test]
fn jobs_stored_before_caller_names_were_lowered_are_the_lowered_callers() {
    let mut cfg = config();
    cfg.max_queued_per_caller = 2;
    let mut edge = Edge::new(cfg.clone(), 0);
    let as_ci = |key: Option<&str>| {
        let body = json!({"prompt": "x", "timeout_ms": 60_000, "caller": "CI"}).to_string();
        ExecuteRequest::parse(body.as_bytes(), key, Limits { max_timeout_ms: 3_600_000 }).unwrap()
    };
    let mut saved = Vec::new();
    for (id, key) in [("keyed", Some("k")), ("other", None)] {
        for e in edge.submit(0, id.into(), as_ci(key), Mode::Detached).unwrap().effects {
            if let Effect::Save(job) = e {
                // As the older edge wrote it: the name as sent.
                let mut stored = serde_json::to_value(&*job).unwrap();
                assert_eq!(stored["placement"]["caller"], "ci");
                stored["placement"]["caller"] = json!("CI");
                saved.push(serde_json::from_value::<crate::record::Job>(stored).unwrap());
            }
        }
    }
    let (mut edge, _) = Edge::restore(cfg, saved, vec![], None, 1);
    let again = edge.submit(2, "again".into(), as_ci(Some("k")), Mode::Detached).unwrap();
    assert_eq!((again.job_id.as_str(), again.existing), ("keyed", true), "one job for one key");
    let capped = edge.submit(2, "third".into(), as_ci(None), Mode::Detached).unwrap_err();
    assert_eq!(capped.status, 429, "{capped:?}");
}

#[test]
fn health_follows_agents_and_their_login() {
    let mut edge = Edge::new(config(), 0);
    let h = edge.health(0);
    assert_eq!(h.status.http_status(), 503);
    assert!(h.agent.is_none());
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    assert_eq!(edge.health(0).status.http_status(), 200);
    assert_eq!(edge.health(0).agent.unwrap().agent_id, "spark");
    let broken = OAuthReport { auth_failed: true, ..oauth() };
    pulse(&mut edge, 1, &sid, Beat { oauth: broken, ..beat(&[], 1, 0) });
    let h = edge.health(1);
    assert_eq!(h.status.http_status(), 503);
    assert!(h.oauth.unwrap().needs_login);
}

#[test]
fn an_agent_back_on_a_new_connection_before_its_old_one_closed_is_not_listed_as_down() {
    let mut edge = Edge::new(config(), 0);
    let (first, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    // The same agent again while the edge still holds its first connection (half-open):
    // the newer one replaces it.
    let (second, _) = join(&mut edge, 5, "spark", &agent_key(1), vec![], 2);
    assert!(edge.session(&first).is_none() && edge.session(&second).is_some());
    let h = edge.health(10);
    let agents: Vec<(String, bool)> = h.agents.iter().map(|a| (a.agent_id.clone(), a.connected)).collect();
    assert_eq!(agents, vec![("spark".to_string(), true)]);
    assert_eq!(serde_json::to_value(h.status).unwrap(), "healthy");
}

#[test]
fn an_agent_gone_is_listed_as_down_for_an_hour_across_a_restart() {
    let mut edge = Edge::new(config(), 0);
    let (a, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    join(&mut edge, 0, "ember", &agent_key(2), vec![], 2);
    let effects = edge.disconnect(1_000, &a);
    let stored = effects.iter().rev().find_map(|e| match e {
        Effect::SaveAlerts(s) => Some((**s).clone()),
        _ => None,
    });
    let stored = stored.expect("an agent gone is stored with alerting's memory");
    // The edge rebuilt from storage (the Worker's object, every few seconds idle).
    let (edge, _) = Edge::restore(config(), vec![], vec![], Some(stored), 2_000);
    let down = |edge: &Edge, t: u64| edge.health(t).agents.iter().filter(|a| !a.connected).map(|a| a.agent_id.clone()).collect::<Vec<_>>();
    assert_eq!(down(&edge, 2_000), vec!["spark".to_string()]);
    assert!(down(&edge, 1_000 + crate::machine::DOWN_SHOWN_MS).is_empty(), "shown for an hour");
}

#[test]
fn health_shows_the_agents_claude_cli_version() {
    let mut edge = Edge::new(config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let version = |edge: &Edge| edge.health(5).agent.unwrap().claude_version;
    assert_eq!(version(&edge).as_deref(), Some("2.1.197 (Claude Code)"), "from the hello");
    let beat = |v: Option<String>| Beat { claude_version: v, ..beat(&[], 1, 0) };
    // An upgrade under the running agent shows at the next heartbeat; a heartbeat without
    // the field (an older agent, or a probe that failed) keeps what is known.
    pulse(&mut edge, 1, &sid, beat(Some("2.1.198 (Claude Code)".into())));
    assert_eq!(version(&edge).as_deref(), Some("2.1.198 (Claude Code)"));
    pulse(&mut edge, 2, &sid, beat(None));
    assert_eq!(version(&edge).as_deref(), Some("2.1.198 (Claude Code)"));
    // One bounded line, whatever the agent sends.
    pulse(&mut edge, 3, &sid, beat(Some(format!("{}\nsecond line", "9".repeat(500)))));
    let shown = version(&edge).unwrap();
    assert_eq!(shown.len(), shared::protocol::MAX_CLAUDE_VERSION_BYTES);
    assert!(!shown.contains('\n'));
    let json = serde_json::to_value(edge.health(5)).unwrap();
    assert_eq!(json["agent"]["claude_version"], shown.as_str());
}

#[test]
fn http_routes_check_the_secret_size_and_methods() {
    let mut edge = Edge::new(config(), 0);
    let req = |method: &str, path: &str, secret: Option<&str>, body: &[u8]| Request {
        method: method.into(),
        path: path.into(),
        secret_header: secret.map(str::to_string),
        authorization: None,
        idempotency_key: None,
        last_event_id: None,
        body: Body::Bytes(body.to_vec()),
    };
    let status = |edge: &mut Edge, r: Request| {
        let handled = http::handle(edge, 0, [0; 16], &r);
        answer_to(&handled.effects, handled.caller).map_or(0, |(status, _)| status)
    };
    assert_eq!(status(&mut edge, req("GET", "/health", None, b"")), 503);
    assert_eq!(status(&mut edge, req("POST", "/execute", None, b"{}")), 403);
    assert_eq!(status(&mut edge, req("POST", "/execute", Some("wrong-secret-000000"), b"{}")), 403);
    assert_eq!(status(&mut edge, req("POST", "/execute", Some(SECRET), b"{}")), 400);
    assert_eq!(status(&mut edge, req("POST", "/execute", Some(SECRET), br#"{"prompt":"x"}"#)), 503);
    assert_eq!(status(&mut edge, req("GET", "/execute", Some(SECRET), b"")), 405);
    assert_eq!(status(&mut edge, req("GET", "/nope", Some(SECRET), b"")), 404);
    assert_eq!(status(&mut edge, req("GET", "/jobs/x", Some(SECRET), b"")), 404);
    let big = Request { body: Body::TooLarge, ..req("POST", "/execute", Some(SECRET), b"") };
    assert_eq!(status(&mut edge, big), 413);
    let bearer = Request { authorization: Some("Bearer 0123456789abcdef0123".into()), ..req("POST", "/jobs", None, br#"{"prompt":"x"}"#) };
    assert_eq!(status(&mut edge, bearer), 202);
    join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let handled = http::handle(&mut edge, 0, [1; 16], &req("POST", "/execute", Some(SECRET), br#"{"prompt":"x"}"#));
    assert!(matches!(handled.reply, Reply::Once { max_wait_ms, .. } if max_wait_ms > 300_000));
    assert!(answer_to(&handled.effects, handled.caller).is_none(), "the caller waits for the job");
}

/// Which answers a host may keep alive (`EXECUTE_KEEPALIVE_MS`) is the route's to say, as
/// the core reads it: an `/execute` waiting for its job, however its path is written
/// (`//execute` from a base URL ending in `/`, `/execute/`); no other route, nor a method
/// `/execute` does not take. The host read the route itself before (rev24-1's fold was
/// repeated there).
#[test]
fn only_a_waiting_execute_may_be_kept_alive() {
    let mut edge = Edge::new(Config { max_queued_jobs: 100, ..config() }, 0);
    join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    let task = || json!({"prompt": "x"});
    let kept = |handled: http::Handled| {
        let answered = answer_to(&handled.effects, handled.caller).map(|(status, _)| status);
        match handled.reply {
            Reply::Once { may_keep_alive, .. } => (may_keep_alive, answered),
            Reply::Stream => (false, answered),
        }
    };
    for path in ["/execute", "//execute", "/execute/", "///execute//"] {
        assert_eq!(kept(call(&mut edge, 0, "POST", path, task())), (true, None), "POST {path}");
    }
    for (method, path, status) in [
        ("GET", "/execute", 405),
        ("GET", "//execute/", 405),
        ("POST", "/pool/gpu/execute", 404),
        ("POST", "/execute/x", 404),
        ("POST", "/jobs", 202),
        ("GET", "/jobs", 200),
        ("GET", "/health", 200),
    ] {
        assert_eq!(kept(call(&mut edge, 0, method, path, task())), (false, Some(status)), "{method} {path}");
    }
    // An `/execute` refused at once has its answer already: nothing to keep alive.
    assert_eq!(kept(call(&mut edge, 0, "POST", "/execute", json!({}))), (false, Some(400)));
}

#[test]
fn a_follower_resuming_with_last_event_id_reads_only_what_it_missed() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    for seq in 1..=4 {
        progress(&mut edge, 2, &sid, "j1", seq, json!({"n": seq}));
    }
    let follow = |edge: &mut Edge, last_event_id: Option<&str>| {
        let req = Request {
            method: "GET".into(),
            path: "/jobs/j1/events".into(),
            secret_header: Some(SECRET.into()),
            authorization: None,
            idempotency_key: None,
            last_event_id: last_event_id.map(String::from),
            body: Body::Bytes(Vec::new()),
        };
        let handled = http::handle(edge, 3, [9; 16], &req);
        let ids: Vec<String> = streamed(&handled.effects, handled.caller).0.iter().map(|c| c.lines().next().unwrap_or_default().to_string()).collect();
        (handled, ids)
    };
    let (_, ids) = follow(&mut edge, None);
    assert_eq!(ids, ["id: 1", "id: 2", "id: 3", "id: 4"]);
    let (handled, ids) = follow(&mut edge, Some("2"));
    assert!(matches!(handled.reply, http::Reply::Stream));
    assert_eq!(ids, ["id: 3", "id: 4"], "only what came after the last id read");
    let (resumed, ids) = follow(&mut edge, Some("4"));
    assert!(ids.is_empty(), "up to date: {ids:?}");
    // The resumed stream goes on with the next event.
    let effects = progress(&mut edge, 4, &sid, "j1", 5, json!({"n": 5}));
    assert_eq!(streamed(&effects, resumed.caller).0.len(), 1);
    // An id this stream never sends is refused, saying what to send (and not repeating
    // more of it than fits a line).
    for bad in ["banana", "-3", "1.5", &"7".repeat(5_000)] {
        let (handled, _) = follow(&mut edge, Some(bad));
        let (status, body) = answer_to(&handled.effects, handled.caller).expect("answered at once");
        assert_eq!(status, 400, "{bad:?}");
        let text = body["error"].as_str().unwrap_or_default();
        assert!(text.contains("Last-Event-ID") && text.contains("the `id:` of the last event read") && text.len() < 400, "{body}");
    }
}

#[test]
fn followers_get_the_progress_so_far_then_the_result() {
    let (mut edge, sid) = ready_edge();
    edge.submit(0, "j1".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    let early = edge.begin_request(0);
    let mut effects = Vec::new();
    assert!(edge.follow(early, "j1", &crate::http::Who::Pool, None, &mut effects).is_ok());
    assert_eq!(streamed(&effects, early), (vec![], false));
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    let effects = progress(&mut edge, 2, &sid, "j1", 1, json!({"type": "system"}));
    let (chunks, _) = streamed(&effects, early);
    assert_eq!(chunks, vec!["id: 1\nevent: progress\ndata: {\"type\":\"system\"}\n\n".to_string()]);
    // Events for a job that is not this agent's are dropped.
    let effects = progress(&mut edge, 2, &sid, "other", 1, json!({}));
    assert!(effects.iter().all(|e| !matches!(e, Effect::Stream { .. })));
    for seq in 2..=(crate::progress::MAX_BACKLOG_EVENTS as u64 + 5) {
        progress(&mut edge, 3, &sid, "j1", seq, json!({"type": "assistant"}));
    }
    let late = edge.begin_request(3);
    let mut effects = Vec::new();
    edge.follow(late, "j1", &crate::http::Who::Pool, None, &mut effects).unwrap();
    let (backlog, ended) = streamed(&effects, late);
    assert!(!ended);
    assert!(backlog[0].contains("5 earlier progress events"), "{}", backlog[0]);
    assert_eq!(backlog.len(), crate::progress::MAX_BACKLOG_EVENTS + 1);
    // The result goes to both followers, and ends their streams.
    let effects = report(&mut edge, 4, &sid, "j1", ok_result());
    for caller in [early, late] {
        let (chunks, ended) = streamed(&effects, caller);
        assert!(ended);
        assert!(chunks[0].starts_with("event: result\ndata: {") && chunks[0].contains("\"output\":\"done\""), "{chunks:?}");
    }
    // A follower of a job that is over gets the result at once, read from storage.
    let after = edge.begin_request(4);
    let mut effects = Vec::new();
    edge.follow(after, "j1", &crate::http::Who::Pool, None, &mut effects).unwrap();
    assert!(matches!(&effects[..], [Effect::Deliver { form: crate::record::Form::Stream, .. }]), "{effects:?}");
    assert_eq!(edge.follow(after, "nope", &crate::http::Who::Pool, None, &mut Vec::new()).unwrap_err().status, 404);
}
