//! Why a queued job waits: `waiting_for` in `POST /jobs`'s answer and the job's view, one
//! reason for each way the agents that fit it cannot take it, judged as `/execute` is
//! refused at once (review rev22, 3: a job queued for a login nobody knew was needed said
//! only `queued` for 15 minutes).

use super::routing::{answer, enter, request, three_agents};
use super::*;
use shared::usage::{UsageStatus, UsageWindow};

/// `POST /jobs` of `body`: the job's id and `waiting_for` as its answer says it.
fn queued(edge: &mut Edge, now: u64, body: Value) -> (String, Value) {
    let h = request(edge, now, SECRET, "POST", "/jobs", body);
    let (status, body) = answer(&h);
    assert_eq!((status, body["state"].as_str()), (202, Some("queued")), "{body}");
    (body["job_id"].as_str().unwrap().to_string(), body["waiting_for"].clone())
}

/// `waiting_for` in `GET /jobs/{id}`, and in the job's entry of `GET /jobs`.
fn shown(edge: &mut Edge, now: u64, id: &str) -> Value {
    let (status, view) = answer(&request(edge, now, SECRET, "GET", &format!("/jobs/{id}"), Value::Null));
    assert_eq!(status, 200, "{view}");
    let (_, list) = answer(&request(edge, now, SECRET, "GET", "/jobs", Value::Null));
    let listed = list["active"].as_array().unwrap().iter().find(|j| j["job_id"] == id).expect("listed").clone();
    assert_eq!(listed["waiting_for"], view["waiting_for"], "{list}");
    view["waiting_for"].clone()
}

/// An `/execute` of `body`: its status and error code.
fn refused(edge: &mut Edge, now: u64, body: Value) -> (u16, Value) {
    let (status, body) = answer(&request(edge, now, SECRET, "POST", "/execute", body));
    (status, body["error_code"].clone())
}

fn code(waiting: &Value) -> &str {
    waiting["code"].as_str().unwrap_or_else(|| panic!("no waiting_for code: {waiting}"))
}

fn message(waiting: &Value) -> &str {
    waiting["message"].as_str().unwrap_or_else(|| panic!("no waiting_for message: {waiting}"))
}

#[test]
fn a_job_queued_for_the_login_says_so_and_names_the_login_command() {
    let (mut edge, sid) = ready_edge();
    pulse(&mut edge, 1, &sid, Beat { oauth: OAuthReport { auth_failed: true, ..oauth() }, ..beat(&[], 1, 0) });
    // The same judgement refuses an `/execute` at once.
    assert_eq!(refused(&mut edge, 2, json!({"prompt": "x"})), (503, json!("RUNNER_OAUTH_ERROR")));
    let (id, waiting) = queued(&mut edge, 3, json!({"prompt": "x"}));
    assert_eq!(code(&waiting), "login", "{waiting}");
    assert!(message(&waiting).contains("`claude-runner login`") && message(&waiting).contains("spark"), "{waiting}");
    assert_eq!(shown(&mut edge, 4, &id), waiting);
    // Logged in again: the job goes, and its view no longer says it waits.
    let effects = pulse(&mut edge, 5, &sid, beat(&[], 1, 0));
    assert_eq!(order_of(&effects, &sid, "spark", 5).header.job_id, id);
    assert!(shown(&mut edge, 6, &id).is_null());
}

#[test]
fn a_job_queued_for_the_usage_window_says_until_when() {
    let (mut edge, sid) = ready_edge();
    let reset = 100_000;
    let usage = UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(reset), utilization: None, seen_at: 0 };
    pulse(&mut edge, 1, &sid, Beat { oauth: OAuthReport { usage: Some(usage), ..oauth() }, ..beat(&[], 1, 0) });
    assert_eq!(refused(&mut edge, 2, json!({"prompt": "x"})), (503, json!("USAGE_LIMIT")));
    let (id, waiting) = queued(&mut edge, 3, json!({"prompt": "x"}));
    assert_eq!(code(&waiting), "usage_limit", "{waiting}");
    assert!(message(&waiting).contains(&shared::time::rfc3339(reset)), "{waiting}");
    assert_eq!(shown(&mut edge, 4, &id), waiting);
}

#[test]
fn a_job_no_connected_agent_fits_says_what_it_asks_for() {
    let mut edge = Edge::new(three_agents(), 0);
    enter(&mut edge, 0, "spark", 1, 1, "gpu=none", &[]);
    assert_eq!(refused(&mut edge, 1, json!({"prompt": "x", "labels": "gpu=a100"})), (503, json!("RUNNER_OFFLINE")));
    let (id, waiting) = queued(&mut edge, 2, json!({"prompt": "x", "labels": "gpu=a100"}));
    assert_eq!(code(&waiting), "no_fitting_agent", "{waiting}");
    assert!(message(&waiting).contains("gpu=a100") && message(&waiting).contains("AGENT_LABELS"), "{waiting}");
    assert_eq!(shown(&mut edge, 3, &id), waiting);
    let (_, waiting) = queued(&mut edge, 4, json!({"prompt": "x", "agent_id": "laptop"}));
    assert_eq!(code(&waiting), "no_fitting_agent", "{waiting}");
    assert!(message(&waiting).contains("agent `laptop`"), "{waiting}");
}

#[test]
fn a_job_whose_agents_are_paused_or_stopping_says_which() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    assert_eq!(answer(&request(&mut edge, 1, SECRET, "POST", "/agents/spark/pause", Value::Null)).0, 200);
    assert_eq!(refused(&mut edge, 2, json!({"prompt": "x"})), (503, json!("RUNNER_OFFLINE")));
    let (id, waiting) = queued(&mut edge, 3, json!({"prompt": "x"}));
    assert_eq!(code(&waiting), "paused", "{waiting}");
    assert!(message(&waiting).contains("POST /agents/spark/resume"), "{waiting}");
    assert_eq!(shown(&mut edge, 4, &id), waiting);
    assert_eq!(answer(&request(&mut edge, 5, SECRET, "POST", "/agents/spark/resume", Value::Null)).0, 200);
    // Running it, spark says it stops: the next job waits for an agent that is not.
    pulse(&mut edge, 6, &spark, Beat { stopping: true, ..beat(&[&id], 0, 1) });
    let (_, waiting) = queued(&mut edge, 7, json!({"prompt": "x"}));
    assert_eq!(code(&waiting), "stopping", "{waiting}");
    assert!(message(&waiting).contains("spark: stopping"), "{waiting}");
}

/// Hostile review rev26, 4: the agents that fit a job, one stopping and one unable to
/// start jobs (its disk full), none paused: the job's `waiting_for` said `paused`, "resume
/// one (POST /agents/<id>/resume…)", and an `/execute` that every agent "is paused or
/// stopping" — resuming is no answer for any of them. It says what is true of each, and
/// what to do: see to the one that cannot start. With one of them paused, resuming it is
/// the answer, as before.
#[test]
fn a_job_whose_agents_are_stopping_or_cannot_start_is_not_said_to_wait_for_a_resume() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    let laptop = enter(&mut edge, 0, "laptop", 2, 1, "", &[]);
    pulse(&mut edge, 1, &spark, Beat { stopping: true, ..beat(&[], 0, 0) });
    let why = "it cannot make a job's workspace (No space left on device): free space on DATA_DIR's disk";
    pulse(&mut edge, 2, &laptop, Beat { cannot_start: Some(why.into()), ..beat(&[], 0, 0) });
    let (status, body) = answer(&request(&mut edge, 3, SECRET, "POST", "/execute", json!({"prompt": "x"})));
    assert_eq!((status, body["error_code"].as_str()), (503, Some("RUNNER_OFFLINE")), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(!error.contains("paused") && error.contains("stopping or unable to start jobs") && error.contains("free space on DATA_DIR's disk"), "{body}");
    let (id, waiting) = queued(&mut edge, 4, json!({"prompt": "x"}));
    assert_eq!(code(&waiting), "cannot_start", "{waiting}");
    assert!(!message(&waiting).contains("resume"), "{waiting}");
    assert!(message(&waiting).contains("spark: stopping") && message(&waiting).contains(why), "{waiting}");
    assert_eq!(shown(&mut edge, 5, &id), waiting);
    // One of them paused by the operator: resuming it is the answer.
    assert_eq!(answer(&request(&mut edge, 6, SECRET, "POST", "/agents/laptop/pause", Value::Null)).0, 200);
    assert_eq!(code(&shown(&mut edge, 7, &id)), "paused");
}

/// What a caller with its own secret learns of the agents is what its `/health` says:
/// their ids and labels, and whether they take work (README "Who may do what": no
/// versions, logins, load). An agent's reason it cannot start jobs is its own report —
/// its DATA_DIR's folders, the error its disk gave — and reached the caller in its
/// `/execute` refusal, its job's `waiting_for` and the end of an `/execute` job left
/// with no agent to take it. Now it is told where the operator reads why; the operator
/// still reads the agent's words.
#[test]
fn a_caller_with_its_own_secret_is_not_told_an_agents_own_reason() {
    use super::routing::A_SECRET;
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    let why = "it cannot make a job's workspace in /home/spark/.local/share/claude-runner/workspaces (No space left on device)";
    pulse(&mut edge, 1, &spark, Beat { cannot_start: Some(why.into()), ..beat(&[], 0, 0) });
    let told = |body: &Value, to: &str| {
        let text = body.to_string();
        assert!(!text.contains("/home/spark") && !text.contains("No space left"), "an agent's own words told to {to}: {text}");
        assert!(text.contains("spark") && text.contains("`cannot_start` in GET /health"), "{to} is told which agent and where its operator reads why: {text}");
    };
    let (status, body) = answer(&request(&mut edge, 2, A_SECRET, "POST", "/execute", json!({"prompt": "x"})));
    assert_eq!((status, body["error_code"].as_str()), (503, Some("RUNNER_OFFLINE")), "{body}");
    told(&body, "a's /execute");
    let (status, body) = answer(&request(&mut edge, 3, A_SECRET, "POST", "/jobs", json!({"prompt": "x"})));
    assert_eq!(status, 202, "{body}");
    told(&body["waiting_for"], "a's POST /jobs");
    assert!(message(&body["waiting_for"]).contains("the pool's operator sees to it"), "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    told(&answer(&request(&mut edge, 4, A_SECRET, "GET", &format!("/jobs/{id}"), Value::Null)).1, "a's GET /jobs/{id}");
    told(&answer(&request(&mut edge, 4, A_SECRET, "GET", "/jobs", Value::Null)).1, "a's GET /jobs");
    // The pool's secret is the operator's: the agent's words, as before.
    let (_, body) = answer(&request(&mut edge, 5, SECRET, "POST", "/execute", json!({"prompt": "x"})));
    assert!(body["error"].as_str().unwrap().contains(why), "{body}");
    let (_, waiting) = queued(&mut edge, 6, json!({"prompt": "x"}));
    assert!(message(&waiting).contains(why), "{waiting}");
}

#[test]
fn a_job_queued_with_no_agent_connected_says_to_start_one() {
    let mut edge = Edge::new(config(), 0);
    assert_eq!(refused(&mut edge, 1, json!({"prompt": "x"})), (503, json!("RUNNER_OFFLINE")));
    let (id, waiting) = queued(&mut edge, 2, json!({"prompt": "x"}));
    assert_eq!(code(&waiting), "no_agent", "{waiting}");
    assert!(message(&waiting).contains("claude-runner agent"), "{waiting}");
    assert_eq!(shown(&mut edge, 3, &id), waiting);
}

#[test]
fn a_job_behind_busy_agents_says_it_waits_for_a_slot() {
    let (mut edge, _sid) = ready_edge();
    let (first, waiting) = {
        let h = request(&mut edge, 1, SECRET, "POST", "/jobs", json!({"prompt": "x"}));
        let (_, body) = answer(&h);
        (body["job_id"].as_str().unwrap().to_string(), body["waiting_for"].clone())
    };
    assert!(waiting.is_null(), "a job sent at once does not wait: {waiting}");
    assert!(shown_view(&mut edge, 2, &first).get("waiting_for").is_none());
    let (id, waiting) = queued(&mut edge, 3, json!({"prompt": "x"}));
    assert_eq!(code(&waiting), "busy", "{waiting}");
    assert_eq!(shown(&mut edge, 4, &id), waiting);
}

fn shown_view(edge: &mut Edge, now: u64, id: &str) -> Value {
    answer(&request(edge, now, SECRET, "GET", &format!("/jobs/{id}"), Value::Null)).1
}

/// One wording of why each agent cannot take work (`login::why_not`): an `/execute`
/// refused because every agent that fits it is held back names each one as a queued job's
/// `waiting_for` does, and a queued `/execute` ended so is logged with that reason. The
/// refusal listed its own words (a paused agent's resume route with `<id>` in it, a
/// reason to start jobs bare), and the log line said "paused or stopping" of an agent
/// that could not start jobs.
#[test]
fn a_held_back_agents_reason_is_worded_alike_in_refusals_waits_and_the_log() {
    let (mut edge, sid) = ready_edge();
    let running = super::routing::submit(&mut edge, 1, SECRET, json!({"prompt": "x"}));
    say(&mut edge, 2, &sid, AgentMessage::Accepted { job_id: running.clone() });
    let behind = call(&mut edge, 3, "POST", "/execute", json!({"prompt": "behind it"}));
    // It says it cannot start jobs: the `/execute` queued behind its job ends, logged.
    let why = "it cannot make a job's workspace in /data/workspaces (No space left on device): free space on that folder's disk";
    let said = format!("spark: cannot start jobs: {why}");
    let logs = super::logs::capture();
    let effects = pulse(&mut edge, 4, &sid, Beat { cannot_start: Some(why.into()), ..beat(&[&running], 0, 1) });
    let (status, body) = answer_to(&effects, behind.caller).expect("the queued /execute ends");
    assert_eq!((status, body["error_code"].as_str()), (503, Some("RUNNER_OFFLINE")), "{body}");
    assert!(body["error"].as_str().unwrap().contains(&said), "{body}");
    let lines = logs.lines();
    let ended = lines.iter().find(|l| l.contains("queued job ended")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(ended.contains(&said) && !ended.contains("paused or stopping"), "{ended}");
    let (queued_id, waiting) = queued(&mut edge, 5, json!({"prompt": "x"}));
    assert!(message(&waiting).contains(&said), "{waiting}");
    // Paused by the operator too: said as `why_not` says it, the agent's own route named.
    assert_eq!(answer(&request(&mut edge, 6, SECRET, "POST", "/agents/spark/pause", Value::Null)).0, 200);
    let said = "spark: paused (by the pool's operator, who resumes it: POST /agents/spark/resume";
    let (status, body) = answer(&request(&mut edge, 7, SECRET, "POST", "/execute", json!({"prompt": "x"})));
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains(said), "{body}");
    let waiting = shown(&mut edge, 8, &queued_id);
    assert!(message(&waiting).contains(said), "{waiting}");
}
