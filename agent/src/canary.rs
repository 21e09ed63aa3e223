//! `claude-runner doctor --canary`: one tiny real job through the local Claude Code CLI,
//! run by the same job runner as the edge's jobs (workspace, refresh gate, process group,
//! stream-json reading, redaction), to tell whether this CLI version works with the
//! runner before it serves callers: the stream-json it prints (an init line with a session
//! id, then a result line), the fields of that result, and the login. It costs one short
//! request on the account Claude is logged in with.

use crate::config::{AgentConfig, LocalArgs};
use crate::oauth::{Login, RefreshGate};
use crate::runner::{self, JobContext};
use serde_json::{json, Value};
use shared::contract::ErrorCode;
use shared::job::{JobResult, JobSpec};
use shared::envelope::Domain;
use shared::protocol::{AgentMessage, ProgressReport};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// The canary's task: small, one turn, no tools needed.
const PROMPT: &str = "This is a health check from claude-runner. Reply with the single word: ok";
/// Long enough for a slow first start of the CLI and one API round trip.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The fields of Claude's `result` line the runner reads, and the JSON type of each.
const RESULT_FIELDS: [(&str, fn(&Value) -> bool); 5] = [
    ("is_error", Value::is_boolean),
    ("session_id", Value::is_string),
    ("num_turns", Value::is_number),
    ("total_cost_usd", Value::is_number),
    ("duration_ms", Value::is_number),
];

/// Runs the canary job; `Ok` with a one-line account, or every problem found, each with
/// what to do.
pub async fn run(local: &LocalArgs, agent_id: String) -> Result<String, Vec<String>> {
    let cfg = AgentConfig::local_only(local, agent_id);
    let (_control, progress, mut events) = crate::uplink::channels();
    let link = crate::link::Link::local();
    let repos = crate::repo::Repos::open(&cfg.data_dir, cfg.repos.clone())
        .map_err(|e| vec![format!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display())])?;
    let login = Login::new(cfg.claude_config_dir.as_deref()).with_secrets(cfg.secrets.iter().map(String::as_str));
    let reporter = Arc::new(crate::report::Reporter::new(login.clone()));
    let workspaces = crate::workspace::root(&cfg.data_dir)
        .map(Arc::new)
        .map_err(|e| vec![format!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display())])?;
    let pool = cfg.pool.clone();
    let ctx = JobContext {
        inherited_env: crate::process::inherited_environment(&cfg.job_env_allow).into(),
        login: Arc::new(login),
        // Backed by the lock in Claude's config folder: beside a running agent on the same
        // login, only one of the two lets a Claude refresh it.
        gate: RefreshGate::default(),
        progress: progress.job(),
        link: link.clone(),
        reporter,
        repos: Arc::new(repos),
        cfg: Arc::new(cfg),
        order_nonce: "canary:1".into(),
        progress_clock: Default::default(),
        spool: None,
        uplink: None,
        workspaces,
        // The canary resumes no session and leaves none to resume.
        sessions: None,
        owner: crate::sessions::Owner { caller: "canary".into(), pool, proven: Some(false) },
    };
    let spec: JobSpec = serde_json::from_value(json!({"prompt": PROMPT, "timeout_ms": TIMEOUT.as_millis() as u64, "max_turns": 1}))
        .expect("the canary's spec is valid");
    let job_id = format!("canary-{}", shared::ids::hex(&runtime::entropy::<8>()));
    // Never stopped from outside: the timeout bounds it.
    let (_stop, stop_rx) = oneshot::channel();
    let runner::Ended { result, leftover, .. } = runner::run(&ctx, &job_id, spec, stop_rx).await;
    leftover.clean_up().await;
    drop(ctx);
    let mut lines = Vec::new();
    while let Some(out) = events.try_next() {
        if let AgentMessage::Event { envelope } = out.msg {
            if let Ok(report) = envelope.open::<ProgressReport>(Domain::Progress, &link.mine().expect("a local link")) {
                lines.extend(report.events.into_iter().map(|e| e.event));
            }
        }
    }
    judge(&lines, &result)
}

/// The verdict on what the CLI printed (`lines`, its stream-json events as the runner
/// forwarded them) and the result the runner made of it.
pub fn judge(lines: &[Value], result: &JobResult) -> Result<String, Vec<String>> {
    const ROLL_BACK: &str = "this CLI version does not work with this claude-runner: go back to the last version that passed (README \"Upgrading\")";
    // The run's error (what the CLI printed) goes on its problem's line: doctor shows a
    // problem of several lines as several, one of the CLI's choosing as doctor's own.
    let mut problems = Vec::new();
    if result.error_code == Some(ErrorCode::RunnerOauthError) {
        problems.push(format!(
            "Claude could not authenticate ({}): log in again (`claude auth login`, or a new CLAUDE_CODE_OAUTH_TOKEN) and rerun the canary",
            shared::text::one_line(result.error.as_deref().unwrap_or("no detail"))
        ));
        return Err(problems);
    }
    let init = lines.iter().find(|l| l["type"] == "system" && l["subtype"] == "init");
    match init {
        None => problems.push(format!("no `system`/`init` line in its stream-json output; {ROLL_BACK}")),
        Some(init) if !init["session_id"].is_string() => {
            problems.push(format!("its `init` line has no session_id (sessions could not be resumed); {ROLL_BACK}"))
        }
        // The runner names each new session (`--session-id`) and records that id: a CLI
        // that runs in another leaves every session unresumable.
        Some(init) if init["session_id"].as_str() != result.session_id.as_deref() => problems.push(format!(
            "its `init` line names session {}, not the one claude-runner started it in (`--session-id`), so its sessions could not be resumed; {ROLL_BACK}",
            init["session_id"]
        )),
        Some(_) => {}
    }
    match lines.iter().rev().find(|l| l["type"] == "result") {
        None => problems.push(format!(
            "no `result` line in its stream-json output ({}); {ROLL_BACK}",
            shared::text::one_line(result.error.as_deref().unwrap_or("it printed none"))
        )),
        Some(line) => {
            let missing: Vec<&str> = RESULT_FIELDS.iter().filter(|(name, is)| !is(&line[*name])).map(|(name, _)| *name).collect();
            if !missing.is_empty() {
                problems.push(format!("its result line lacks {} (or has another type); {ROLL_BACK}", missing.join(", ")));
            }
        }
    }
    if problems.is_empty() && !result.success {
        problems.push(format!(
            "the job failed ({}): {}",
            result.error_code.map(|c| format!("{c:?}")).unwrap_or_default(),
            shared::text::one_line(result.error.as_deref().unwrap_or("no detail"))
        ));
    }
    if problems.is_empty() && result.output.trim().is_empty() {
        problems.push(format!("the job succeeded but its answer is empty; {ROLL_BACK}"));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(format!(
        "a job ran end to end in {:.1} s: stream-json, result fields and login as claude-runner expects (answer: {:?})",
        result.duration_ms as f64 / 1000.0,
        shared::text::truncate(result.output.trim(), 60)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_lines() -> Vec<Value> {
        vec![
            json!({"type": "system", "subtype": "init", "session_id": "s-1"}),
            json!({"type": "assistant", "message": {"content": [{"type": "text", "text": "ok"}]}}),
            json!({"type": "result", "subtype": "success", "is_error": false, "result": "ok", "session_id": "s-1",
                   "num_turns": 1, "total_cost_usd": 0.001, "duration_ms": 900}),
        ]
    }

    fn ok_result() -> JobResult {
        JobResult { success: true, output: "ok".into(), session_id: Some("s-1".into()), duration_ms: 1200, ..JobResult::default() }
    }

    #[test]
    fn a_cli_that_speaks_as_expected_passes() {
        let verdict = judge(&good_lines(), &ok_result()).unwrap();
        assert!(verdict.contains("1.2 s"), "{verdict}");
    }

    #[test]
    fn a_changed_stream_json_shape_fails_with_the_way_back() {
        let mut lines = good_lines();
        lines[2].as_object_mut().unwrap().remove("total_cost_usd");
        lines[2]["num_turns"] = json!("1");
        let problems = judge(&lines, &ok_result()).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("num_turns, total_cost_usd") && problems[0].contains("Upgrading"), "{problems:?}");

        let problems = judge(&lines[1..], &ok_result()).unwrap_err();
        assert!(problems[0].contains("`init`"), "{problems:?}");
        assert!(judge(&[], &JobResult::default()).unwrap_err().len() == 2);
        // A CLI that does not take the runner's session id.
        let mut lines = good_lines();
        lines[0]["session_id"] = json!("s-2");
        let problems = judge(&lines, &ok_result()).unwrap_err();
        assert!(problems.len() == 1 && problems[0].contains("--session-id"), "{problems:?}");
    }

    #[test]
    fn a_login_failure_says_to_log_in() {
        let result = JobResult {
            error_code: Some(ErrorCode::RunnerOauthError),
            error: Some("Failed to authenticate".into()),
            ..JobResult::default()
        };
        let problems = judge(&good_lines(), &result).unwrap_err();
        assert!(problems[0].contains("claude auth login"), "{problems:?}");
    }
}
