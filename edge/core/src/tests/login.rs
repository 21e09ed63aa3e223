//! When agents cannot work — a login that needs a person, a used-up usage window, a
//! re-login under way — and the relay that logs them in again.

use super::*;
use crate::machine::LOGIN_TTL_MS;
use shared::contract::ErrorCode;
use crate::session::{LoginRelay, LoginStep};
use shared::protocol::{LoginAction, LoginOrder, LoginReport, LoginState, Slots};
use shared::usage::{UsageStatus, UsageWindow};

fn broken() -> OAuthReport {
    OAuthReport { auth_failed: true, ..oauth() }
}

fn rejected(resets_at: u64) -> OAuthReport {
    let usage = UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(resets_at), utilization: None, seen_at: 0 };
    OAuthReport { usage: Some(usage), ..oauth() }
}

/// A heartbeat of an idle capacity-1 agent that received `received` orders, with its login.
fn beat(edge: &mut Edge, now: u64, sid: &str, oauth: OAuthReport) -> Vec<Effect> {
    report(edge, now, sid, oauth, &[], 0)
}

/// A heartbeat with the login, holding `running` having received `received` orders.
fn report(edge: &mut Edge, now: u64, sid: &str, oauth: OAuthReport, running: &[&str], received: u64) -> Vec<Effect> {
    let free = 1 - running.len() as u32;
    let running = running.iter().map(|s| s.to_string()).collect();
    pulse(edge, now, sid, Beat { running, capacity: 1, oauth, slots: Slots { free, received }, claude_version: None, challenge: String::new(), seq: 0, stopping: false, cannot_start: None, finished: Vec::new(), more_finished: false })
}

fn login_order(effects: &[Effect], sid: &str, now: u64) -> LoginOrder {
    let envelope = sent(effects, sid)
        .into_iter()
        .find_map(|m| match m {
            EdgeMessage::Login { envelope } => Some(envelope),
            _ => None,
        })
        .expect("a login order was sent");
    open_order(&envelope, Domain::Login, &edge_key().verifying_key(), SPARK, now).expect("signed by the edge for spark")
}

/// The agent's MACed report on the login `login_id`, answering its order for `step`.
fn login_msg(edge: &Edge, login_id: &str, step: LoginStep, state: LoginState, url: Option<String>, error: Option<String>, oauth: Option<OAuthReport>) -> AgentMessage {
    let report = LoginReport { login_id: login_id.to_string(), order_nonce: LoginRelay::nonce(login_id, step), state, url, error, oauth, url_proof: None };
    AgentMessage::login(&report, &link_of(edge, "spark"))
}

#[test]
fn a_broken_login_sends_execute_callers_elsewhere_and_holds_detached_jobs() {
    let (mut edge, sid) = ready_edge();
    // A queued /execute job (the one slot is busy) falls back as soon as the login breaks.
    edge.submit(0, "busy".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    edge.submit(0, "waiting".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    let effects = report(&mut edge, 10, &sid, broken(), &["busy"], 1);
    let done = finished(&effects);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].0.as_str(), done[0].1), ("waiting", 503));
    assert_eq!(done[0].2["error_code"], "RUNNER_OAUTH_ERROR");
    assert_eq!(done[0].2["fallback"], true);
    // New ones are refused at once; detached ones wait.
    let err = edge.submit(20, "new".into(), submission("x", 60_000, None), Mode::Wait).unwrap_err();
    assert_eq!((err.status, err.body.error_code, err.body.fallback), (503, ErrorCode::RunnerOauthError, Some(true)));
    assert!(err.body.error.contains("OAuth"));
    edge.submit(20, "later".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    let busy = result_msg(&edge, "busy", ok_result());
    say(&mut edge, 30, &sid, busy);
    let effects = say(&mut edge, 30, &sid, credit(1, 1));
    assert!(sent(&effects, &sid).is_empty(), "nothing is sent to an agent that cannot log in");
    // The login works again: the held job goes.
    let effects = report(&mut edge, 40, &sid, oauth(), &[], 1);
    assert_eq!(order_of(&effects, &sid, "spark", 40).header.job_id, "later");
}

#[test]
fn a_held_job_ends_with_the_reason_when_its_wait_runs_out() {
    let (mut edge, sid) = ready_edge();
    beat(&mut edge, 0, &sid, broken());
    edge.submit(0, "held".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    for t in (500..30_000).step_by(500) {
        beat(&mut edge, t, &sid, broken());
    }
    let done = finished(&edge.tick(30_000));
    assert_eq!(done[0].2["error_code"], "RUNNER_OAUTH_ERROR", "{:?}", done);
}

#[test]
fn a_used_up_window_refuses_execute_with_retry_after_and_drains_the_queue_at_its_reset() {
    let (mut edge, sid) = ready_edge();
    let reset = 100_000;
    beat(&mut edge, 1_000, &sid, rejected(reset));
    let handled = call(&mut edge, 1_000, "POST", "/execute", json!({"prompt": "x"}));
    let response = handled.effects.iter().find_map(|e| match e {
        Effect::Answer { response, .. } => Some(response.clone()),
        _ => None,
    });
    let response = response.unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(response.headers, vec![("retry-after", "99".to_string())]);
    let body: Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!((body["error_code"].as_str(), body["fallback"].as_bool()), (Some("USAGE_LIMIT"), Some(true)));
    assert_eq!(body["retry_at"], shared::time::rfc3339(reset));
    let impatient = call(&mut edge, 1_000, "POST", "/jobs", json!({"prompt": "x", "wait_for_usage": false}));
    assert_eq!(answer_to(&handled_effects(&impatient), impatient.caller).unwrap().0, 503);
    // A detached job waits past QUEUE_TTL_MS (30 s here) for the reset.
    edge.submit(1_000, "held".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    // No agent can take work until the reset: a caller that asks /health alone (its
    // response.ok) must fall back, as /execute's 503 tells the others.
    let health = edge.health(50_000);
    assert_eq!((health.status.http_status(), health.agents_taking_work), (503, 0));
    assert_eq!(serde_json::to_value(health.status).unwrap(), "unhealthy");
    assert_eq!(health.usage.unwrap().status, UsageStatus::Rejected);
    let mut t = 1_000;
    while t + 1_000 < reset {
        t += 1_000;
        let effects = beat(&mut edge, t, &sid, rejected(reset));
        assert!(sent(&effects, &sid).iter().all(|m| !matches!(m, EdgeMessage::Job { .. })), "sent before the reset at {t}");
        assert!(finished(&edge.tick(t)).is_empty(), "the held job ended at {t}");
    }
    // The reset: the tick lets it go, with no word from the agent needed.
    let effects = edge.tick(reset);
    assert_eq!(order_of(&effects, &sid, "spark", reset).header.job_id, "held");
    assert_eq!(serde_json::to_value(edge.health(reset).status).unwrap(), "healthy");
}

#[test]
fn a_job_held_for_the_usage_window_outlasts_its_agent_going_away() {
    let (mut edge, sid) = ready_edge();
    let reset = 200_000;
    beat(&mut edge, 1_000, &sid, rejected(reset));
    edge.submit(1_000, "held".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
    for t in (2_000..=60_000).step_by(1_000) {
        beat(&mut edge, t, &sid, rejected(reset));
    }
    // Past QUEUE_TTL_MS (30 s here) the agent goes away for a moment (a restart, a
    // network blip): the window it reported is still used up, and the job still waits.
    edge.disconnect(60_500, &sid);
    for t in (61_000..=70_000).step_by(1_000) {
        assert!(finished(&edge.tick(t)).is_empty(), "the held job ended at {t} while its agent was away");
    }
    // Back, still used up (its first heartbeat grants the slot): sent at the reset.
    let (sid, _) = join(&mut edge, 70_000, "spark", &agent_key(1), vec![], 2);
    let effects = beat(&mut edge, 70_000, &sid, rejected(reset));
    assert!(sent(&effects, &sid).iter().all(|m| !matches!(m, EdgeMessage::Job { .. })), "sent before the reset");
    for t in (71_000..reset).step_by(1_000) {
        let effects = beat(&mut edge, t, &sid, rejected(reset));
        assert!(sent(&effects, &sid).iter().all(|m| !matches!(m, EdgeMessage::Job { .. })), "sent before the reset at {t}");
    }
    let effects = edge.tick(reset);
    assert_eq!(order_of(&effects, &sid, "spark", reset).header.job_id, "held");
}

#[test]
fn a_job_held_for_the_usage_window_outlasts_an_edge_restart() {
    // What a host stores: job records and the edge's stored memory (the native host
    // restores no sessions; the Worker none after a deploy).
    let mut jobs = std::collections::HashMap::new();
    let mut memory = None;
    let mut keep = |effects: &[Effect]| {
        for e in effects {
            match e {
                Effect::Save(j) => {
                    jobs.insert(j.id.clone(), (**j).clone());
                }
                Effect::SaveAlerts(a) => memory = Some((**a).clone()),
                _ => {}
            }
        }
    };
    let (mut edge, sid) = ready_edge();
    let reset = 200_000;
    keep(&beat(&mut edge, 1_000, &sid, rejected(reset)));
    keep(&edge.submit(1_000, "held".into(), submission("x", 60_000, None), Mode::Detached).unwrap().effects);
    for t in (2_000..=60_000).step_by(1_000) {
        keep(&beat(&mut edge, t, &sid, rejected(reset)));
    }
    // Past QUEUE_TTL_MS (30 s here) the edge restarts; the agent is not back yet.
    let (mut edge, _) = Edge::restore(config(), jobs.into_values().collect(), vec![], memory, 60_500);
    for t in (61_000..=90_000).step_by(1_000) {
        assert!(finished(&edge.tick(t)).is_empty(), "the held job ended at {t} after the edge restarted");
    }
    let (sid, _) = join(&mut edge, 90_000, "spark", &agent_key(1), vec![], 2);
    let effects = beat(&mut edge, 90_000, &sid, rejected(reset));
    assert!(sent(&effects, &sid).iter().all(|m| !matches!(m, EdgeMessage::Job { .. })), "sent before the reset");
    for t in (91_000..reset).step_by(1_000) {
        let effects = beat(&mut edge, t, &sid, rejected(reset));
        assert!(sent(&effects, &sid).iter().all(|m| !matches!(m, EdgeMessage::Job { .. })), "sent before the reset at {t}");
    }
    let effects = edge.tick(reset);
    assert_eq!(order_of(&effects, &sid, "spark", reset).header.job_id, "held");
}

#[test]
fn a_relay_the_agent_never_answers_is_a_gateway_timeout() {
    let (mut edge, sid) = ready_edge();
    beat(&mut edge, 0, &sid, broken());
    let start = call(&mut edge, 10, "POST", "/oauth/login", Value::Null);
    let effects = edge.wait_expired(90_010, start.caller);
    let (status, body) = answer_to(&effects, start.caller).expect("the caller is told");
    assert_eq!((status, body["error_code"].as_str()), (504, Some("TIMEOUT")), "{body}");
    assert_eq!(body["success"], false);
}

fn handled_effects(h: &http::Handled) -> Vec<Effect> {
    h.effects.clone()
}

#[test]
fn the_relay_starts_once_passes_the_code_and_lets_held_work_go() {
    let (mut edge, sid) = ready_edge();
    beat(&mut edge, 0, &sid, broken());
    edge.submit(0, "held".into(), submission("x", 600_000, None), Mode::Detached).unwrap();
    let first = call(&mut edge, 10, "POST", "/oauth/login", Value::Null);
    assert!(answer_to(&first.effects, first.caller).is_none(), "answered when the URL comes");
    let order = login_order(&first.effects, &sid, 10);
    assert_eq!(order.action, LoginAction::Start);
    // Bound to the connection, as a job order is: the path cannot hold it for the next (rev21, 4).
    let challenge = edge.session(&sid).and_then(|s| s.agent()).unwrap().challenge.clone();
    assert_eq!(order.challenge.as_deref(), Some(challenge.as_str()));
    let login_id = order.header.job_id.clone();
    // A second caller joins the same login.
    let second = call(&mut edge, 11, "POST", "/oauth/login", Value::Null);
    assert!(sent(&second.effects, &sid).is_empty(), "one login at a time");
    let url = "https://claude.ai/oauth/authorize?code=true&state=s".to_string();
    let progress = login_msg(&edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, Some(url.clone()), None, None);
    let effects = say(&mut edge, 20, &sid, progress);
    // It is given up LOGIN_TTL_MS after it started, and says so (it said the time of the
    // answer: a future time was shown as now).
    let expires_at = shared::time::rfc3339(10 + crate::machine::LOGIN_TTL_MS);
    for caller in [first.caller, second.caller] {
        let (status, body) = answer_to(&effects, caller).unwrap();
        assert_eq!((status, body["url"].as_str(), body["login_id"].as_str()), (200, Some(url.as_str()), Some(login_id.as_str())));
        assert_eq!(body["expires_at"].as_str(), Some(expires_at.as_str()), "{body}");
    }
    // Asked again later: the same login, answered at once.
    let third = call(&mut edge, 30, "POST", "/oauth/login", Value::Null);
    let (_, body) = answer_to(&third.effects, third.caller).unwrap();
    assert_eq!((body["login_id"].as_str(), body["expires_at"].as_str()), (Some(login_id.as_str()), Some(expires_at.as_str())), "{body}");
    // The code goes to the agent in a signed order.
    let code = call(&mut edge, 40, "POST", "/oauth/login/code", json!({"login_id": login_id, "code": "abc#def"}));
    let order = login_order(&code.effects, &sid, 40);
    assert_eq!((order.action, order.challenge.as_deref()), (LoginAction::Code { code: "abc#def".into() }, Some(challenge.as_str())));
    let twice = call(&mut edge, 41, "POST", "/oauth/login/code", json!({"login_id": login_id, "code": "abc#def"}));
    assert_eq!(answer_to(&twice.effects, twice.caller).unwrap().0, 409);
    // Logged in: the caller hears it with the new login, and the held job goes.
    let done = login_msg(&edge, &login_id, LoginStep::Code, LoginState::LoggedIn, None, None, Some(oauth()));
    let effects = say(&mut edge, 50, &sid, done);
    let (status, body) = answer_to(&effects, code.caller).unwrap();
    assert_eq!((status, body["state"].as_str(), body["oauth"]["needs_login"].as_bool()), (200, Some("logged_in"), Some(false)));
    assert_eq!(order_of(&effects, &sid, "spark", 50).header.job_id, "held");
}

/// A relay waiting for its code whom nobody will send one (`claude-runner login` given an
/// empty line or Ctrl-C, the page closed) changes nothing on the runner: work goes on, and
/// `/health` says so. Only once the code is passed on — `claude auth login` then writes the
/// new login, which a job's Claude starting on the old one could write over — does work
/// wait, until the outcome; `/health` then counts the agent out, as dispatch does.
#[test]
fn jobs_wait_only_while_a_relogin_can_change_the_login() {
    let (mut edge, sid) = ready_edge();
    let start = call(&mut edge, 0, "POST", "/oauth/login", Value::Null);
    let login_id = login_order(&start.effects, &sid, 0).header.job_id;
    let url = Some("https://claude.ai/oauth/authorize?x".to_string());
    let msg = login_msg(&edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, url, None, None);
    say(&mut edge, 1, &sid, msg);
    // Abandoned before its code: the agent still takes work.
    let health = edge.health(2);
    assert_eq!((health.status.http_status(), health.agents_taking_work, health.agents[0].takes_work), (200, 1, true));
    let s = edge.submit(2, "before".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    assert_eq!(order_of(&s.effects, &sid, "spark", 2).header.job_id, "before", "an /execute waited on a login awaiting its code");
    let done = result_msg(&edge, "before", ok_result());
    say(&mut edge, 3, &sid, done);
    say(&mut edge, 3, &sid, credit(1, 1));
    // The code goes: the login can change now, and work waits for its outcome.
    call(&mut edge, 4, "POST", "/oauth/login/code", json!({"login_id": login_id, "code": "c0de"}));
    let health = edge.health(5);
    assert_eq!((health.status.http_status(), health.agents_taking_work, health.agents[0].takes_work), (503, 0, false));
    let s = edge.submit(5, "j".into(), submission("x", 60_000, None), Mode::Wait).unwrap();
    assert!(sent(&s.effects, &sid).is_empty(), "a job went while the new login was being written");
    assert!(finished(&s.effects).is_empty(), "an /execute was refused while a login it can wait for was finishing");
    let failed = login_msg(&edge, &login_id, LoginStep::Code, LoginState::Failed, None, Some("Login failed: x".into()), None);
    let effects = say(&mut edge, 6, &sid, failed);
    assert_eq!(answer_to(&effects, start.caller).map(|(status, _)| status), None, "the start was answered already");
    assert_eq!(order_of(&effects, &sid, "spark", 6).header.job_id, "j", "the relay is over: work goes on");
    assert_eq!(edge.health(7).agents_taking_work, 1);
}

/// `/health` counts an agent as taking work exactly when dispatch would send it a job:
/// one predicate ([`crate::session::Agent::takes_work`]) for both, whatever holds the
/// agent back.
#[test]
fn health_counts_an_agent_taking_work_exactly_when_dispatch_sends_it_work() {
    type Setup = fn(&mut Edge, &str);
    let cases: [(&str, Setup); 6] = [
        ("working", |_, _| {}),
        ("paused", |edge, _| {
            call(edge, 1, "POST", "/agents/spark/pause", Value::Null);
        }),
        ("login broken", |edge, sid| {
            beat(edge, 1, sid, broken());
        }),
        ("window used up", |edge, sid| {
            beat(edge, 1, sid, rejected(1_000_000));
        }),
        ("relay awaiting its code", |edge, sid| {
            let start = call(&mut *edge, 1, "POST", "/oauth/login", Value::Null);
            let login_id = login_order(&start.effects, sid, 1).header.job_id;
            let url = Some("https://claude.ai/oauth/authorize?x".to_string());
            let msg = login_msg(edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, url, None, None);
            say(edge, 1, sid, msg);
        }),
        ("relay finishing with its code", |edge, sid| {
            let start = call(&mut *edge, 1, "POST", "/oauth/login", Value::Null);
            let login_id = login_order(&start.effects, sid, 1).header.job_id;
            let url = Some("https://claude.ai/oauth/authorize?x".to_string());
            let msg = login_msg(edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, url, None, None);
            say(edge, 1, sid, msg);
            call(edge, 1, "POST", "/oauth/login/code", json!({"login_id": login_id, "code": "c0de"}));
        }),
    ];
    for (what, setup) in cases {
        let (mut edge, sid) = ready_edge();
        setup(&mut edge, &sid);
        let health = edge.health(2);
        let caller = edge.caller_health(2, "someone");
        let s = edge.submit(2, "j".into(), submission("x", 60_000, None), Mode::Detached).unwrap();
        let dispatched = sent(&s.effects, &sid).iter().any(|m| matches!(m, EdgeMessage::Job { .. }));
        assert_eq!(health.agents[0].takes_work, dispatched, "{what}: /health's agent");
        assert_eq!(health.agents_taking_work, usize::from(dispatched), "{what}: /health's count");
        assert_eq!(caller.agents[0].takes_work, dispatched, "{what}: a caller's /health");
        assert_eq!(health.status.http_status() == 200, dispatched, "{what}: /health's status {:?}", health.status);
    }
}

#[test]
fn a_relay_is_given_up_after_its_time_or_with_its_agent() {
    let (mut edge, sid) = ready_edge();
    let start = call(&mut edge, 0, "POST", "/oauth/login", Value::Null);
    let login_id = login_order(&start.effects, &sid, 0).header.job_id;
    let url = Some("https://claude.ai/oauth/authorize?x".to_string());
    let msg = login_msg(&edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, url, None, None);
    say(&mut edge, 1, &sid, msg);
    // Nothing more: the relay ends at its expiry and the next start is a new one.
    for t in (1_000..LOGIN_TTL_MS).step_by(1_000) {
        beat(&mut edge, t, &sid, oauth());
    }
    edge.tick(LOGIN_TTL_MS);
    let again = call(&mut edge, LOGIN_TTL_MS + 1, "POST", "/oauth/login", Value::Null);
    assert_ne!(login_order(&again.effects, &sid, LOGIN_TTL_MS + 1).header.job_id, login_id);
    // Its agent leaves: the caller waiting on it is told.
    let effects = edge.disconnect(LOGIN_TTL_MS + 2, &sid);
    assert_eq!(answer_to(&effects, again.caller).unwrap().0, 503);
    // Codes for logins nobody runs are 404; bad bodies 400.
    let unknown = call(&mut edge, LOGIN_TTL_MS + 3, "POST", "/oauth/login/code", json!({"login_id": login_id, "code": "c"}));
    assert_eq!(answer_to(&unknown.effects, unknown.caller).unwrap().0, 404);
    for bad in [json!({"code": "c"}), json!({"login_id": "a b", "code": "c"}), json!({"login_id": "x", "code": "two words"}), json!([1])] {
        let h = call(&mut edge, LOGIN_TTL_MS + 3, "POST", "/oauth/login/code", bad.clone());
        assert_eq!(answer_to(&h.effects, h.caller).unwrap().0, 400, "{bad}");
    }
}

#[test]
fn progress_for_a_login_the_edge_is_not_relaying_is_ignored() {
    let (mut edge, sid) = ready_edge();
    let forged = login_msg(&edge, "nope", LoginStep::Code, LoginState::LoggedIn, None, None, Some(broken()));
    let effects = say(&mut edge, 1, &sid, forged);
    assert!(effects.iter().all(|e| !matches!(e, Effect::Answer { .. })));
    assert!(!edge.health(1).oauth.unwrap().needs_login, "its report was not taken");
    // A URL that is not https is never passed on.
    let start = call(&mut edge, 2, "POST", "/oauth/login", Value::Null);
    let login_id = login_order(&start.effects, &sid, 2).header.job_id;
    let evil = login_msg(&edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, Some("javascript:alert(1)".into()), None, None);
    let effects = say(&mut edge, 3, &sid, evil);
    assert_eq!(answer_to(&effects, start.caller).unwrap().0, 502);
}

/// A process a job left behind could write into `claude auth login`'s stdout before the
/// CLI prints its URL (`/proc/<pid>/fd/1` while it was a pipe; one that can trace the CLI
/// still can): any https URL with `/oauth/authorize` in it was passed on to the operator
/// as the sign-in page. Only a sign-in page on one of Anthropic's hosts is, and the answer
/// names the host, for the page and `claude-runner login` to show.
#[test]
fn a_sign_in_url_not_on_anthropics_hosts_is_never_passed_on() {
    let (mut edge, sid) = ready_edge();
    for (t, url) in [
        "https://evil.example/oauth/authorize?code=true",
        "https://claude.ai@evil.example/oauth/authorize?x",
        "https://claude.ai.evil.example/oauth/authorize?x",
        "https://evil.example/claude.ai/oauth/authorize?x",
        "https://claude.ai:8443/oauth/authorize?x",
        "https://claude.ai/phish?x=/oauth/authorize",
        "http://claude.ai/oauth/authorize?x",
    ]
    .into_iter()
    .enumerate()
    {
        let t = t as u64 * 10;
        let start = call(&mut edge, t, "POST", "/oauth/login", Value::Null);
        let login_id = login_order(&start.effects, &sid, t).header.job_id;
        let msg = login_msg(&edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, Some(url.into()), None, None);
        let effects = say(&mut edge, t + 1, &sid, msg);
        let (status, body) = answer_to(&effects, start.caller).unwrap();
        assert_eq!(status, 502, "{url}: {body}");
        assert!(!body.to_string().contains("evil"), "{url}: {body}");
    }
    for (url, host) in [("https://claude.com/cai/oauth/authorize?code=true", "claude.com"), ("https://platform.claude.com/oauth/authorize?x", "platform.claude.com")] {
        let start = call(&mut edge, 100, "POST", "/oauth/login", Value::Null);
        let login_id = login_order(&start.effects, &sid, 100).header.job_id;
        let msg = login_msg(&edge, &login_id, LoginStep::Start, LoginState::AwaitingCode, Some(url.into()), None, None);
        let effects = say(&mut edge, 101, &sid, msg);
        let (status, body) = answer_to(&effects, start.caller).unwrap();
        assert_eq!((status, body["url"].as_str(), body["host"].as_str()), (200, Some(url), Some(host)), "{body}");
        let failed = login_msg(&edge, &login_id, LoginStep::Start, LoginState::Failed, None, Some("x".into()), None);
        say(&mut edge, 102, &sid, failed);
    }
}

#[test]
fn a_relay_that_lost_its_url_or_its_start_is_started_anew_and_its_code_still_goes() {
    let (mut edge, sid) = ready_edge();
    let start = call(&mut edge, 0, "POST", "/oauth/login", Value::Null);
    let first = login_order(&start.effects, &sid, 0).header.job_id;
    // No answer from the agent for longer than a caller waits: asking again starts anew.
    let again = call(&mut edge, crate::machine::LOGIN_WAIT_MS, "POST", "/oauth/login", Value::Null);
    let second = login_order(&again.effects, &sid, crate::machine::LOGIN_WAIT_MS).header.job_id;
    assert_ne!(first, second);
    let url = Some("https://claude.ai/oauth/authorize?x".to_string());
    let t = crate::machine::LOGIN_WAIT_MS + 1;
    let msg = login_msg(&edge, &second, LoginStep::Start, LoginState::AwaitingCode, url, None, None);
    say(&mut edge, t, &sid, msg);
    // The host could not keep the URL (the Worker's attachment budget): the record comes
    // back without it after the object left memory.
    let mut session = edge.session(&sid).unwrap().clone();
    session.agent_mut().unwrap().login.as_mut().unwrap().url = None;
    let session_without_url = session.clone();
    let (mut edge, _) = Edge::restore(config(), vec![], vec![session], None, t + 1);
    // The code still goes to the login under way…
    let code = call(&mut edge, t + 2, "POST", "/oauth/login/code", json!({"login_id": second, "code": "c0de"}));
    assert_eq!(login_order(&code.effects, &sid, t + 2).action, LoginAction::Code { code: "c0de".into() });
    // …while asking for the login again, with no URL to give, starts a new one.
    let (mut edge, _) = Edge::restore(config(), vec![], vec![session_without_url], None, t + 3);
    let third = call(&mut edge, t + 4, "POST", "/oauth/login", Value::Null);
    assert_ne!(login_order(&third.effects, &sid, t + 4).header.job_id, second);
}

#[test]
fn a_login_report_counts_only_signed_by_its_agent_and_bound_to_an_order_of_that_login() {
    let (mut edge, sid) = ready_edge();
    beat(&mut edge, 0, &sid, broken());
    edge.submit(0, "held".into(), submission("x", 600_000, None), Mode::Detached).unwrap();
    let start = call(&mut edge, 1, "POST", "/oauth/login", Value::Null);
    let order = login_order(&start.effects, &sid, 1);
    assert_eq!(order.header.pool, "default", "the order is bound to the pool");
    let login_id = order.header.job_id;
    let spark_key = link(&edge, &sid);
    let logged_in = |nonce: String, key: &MacKey| {
        let report = LoginReport { login_id: login_id.clone(), order_nonce: nonce, state: LoginState::LoggedIn, url: None, error: None, oauth: Some(oauth()), url_proof: None };
        AgentMessage::login(&report, key)
    };
    let nothing_happened = |effects: &[Effect], edge: &Edge| {
        assert!(effects.iter().all(|e| !matches!(e, Effect::Answer { .. })), "{effects:?}");
        assert!(edge.health(5).oauth.unwrap().needs_login, "the forged login was taken");
        assert!(sent(effects, &sid).is_empty(), "held work went");
    };
    // MACed with another key (whoever sits on the path): refused and counted.
    let effects = say(&mut edge, 2, &sid, logged_in(LoginRelay::nonce(&login_id, LoginStep::Code), &forged_link(2)));
    nothing_happened(&effects, &edge);
    assert_eq!(edge.stats().refused_reports, 1);
    // Signed by the agent, but for a code this edge never sent, or another login's order.
    let effects = say(&mut edge, 3, &sid, logged_in(LoginRelay::nonce(&login_id, LoginStep::Code), &spark_key));
    nothing_happened(&effects, &edge);
    let effects = say(&mut edge, 4, &sid, logged_in(LoginRelay::nonce("0123456789abcdef", LoginStep::Start), &spark_key));
    nothing_happened(&effects, &edge);
    // A result's MAC is not a login report's.
    let report = LoginReport { login_id: login_id.clone(), order_nonce: LoginRelay::nonce(&login_id, LoginStep::Start), state: LoginState::LoggedIn, url: None, error: None, oauth: Some(oauth()), url_proof: None };
    let envelope = shared::envelope::Tagged::seal(Domain::Result, &report, &spark_key);
    let effects = say(&mut edge, 5, &sid, AgentMessage::LoginProgress { envelope });
    nothing_happened(&effects, &edge);
    assert_eq!(edge.stats().refused_reports, 2);
    // The agent's own, answering the start: taken.
    let effects = say(&mut edge, 6, &sid, logged_in(LoginRelay::nonce(&login_id, LoginStep::Start), &spark_key));
    assert_eq!(answer_to(&effects, start.caller).unwrap().1["state"], "logged_in");
    assert_eq!(order_of(&effects, &sid, "spark", 6).header.job_id, "held");
}
