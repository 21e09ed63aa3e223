//! One job's life on Spark: a fresh workspace, the refresh gate, Claude run through
//! [`crate::process`], each stdout line redacted and forwarded as a progress event, and a
//! result that always comes back — a missing binary, a crash or garbage output become a
//! clear failure, never a hang. The runner sees only its [`JobContext`], not the agent.

use crate::claude::{self, Ending, Transcript};
use crate::config::AgentConfig;
use crate::oauth::{Login, RefreshGate};
use crate::process::{self, Launch, Stop};
use crate::workspace;
use shared::job::{JobResult, JobSpec};
use shared::protocol::AgentMessage;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How often the redactor re-reads the login: Claude may rotate the tokens mid-job.
const REDACTOR_REFRESH: Duration = Duration::from_secs(2);
/// Largest progress event forwarded; bigger ones are summarised.
const MAX_EVENT_BYTES: usize = 256 * 1024;

/// What a job needs from the agent, and nothing more.
#[derive(Clone)]
pub struct JobContext {
    pub cfg: Arc<AgentConfig>,
    pub login: Login,
    pub gate: RefreshGate,
    /// Progress events go out here (dropped while the agent is offline).
    pub uplink: mpsc::UnboundedSender<AgentMessage>,
    /// Told of the usage window as Claude reports it, mid-run.
    pub reporter: Arc<crate::report::Reporter>,
}

/// Runs the job to its end and returns its (redacted) result.
pub async fn run(ctx: &JobContext, job_id: &str, spec: JobSpec, mut stop: oneshot::Receiver<Stop>) -> JobResult {
    let started = Instant::now();
    let workspace = ctx.cfg.data_dir.join("workspaces").join(job_id);
    let cwd = match workspace::prepare(&workspace, spec.working_dir.as_deref()) {
        Ok(dir) => dir,
        Err(e) => {
            return JobResult::failure(
                shared::contract::ErrorCode::InternalError,
                format!("could not prepare the job's workspace {}: {e}; check DATA_DIR's disk space", workspace.display()),
                0,
            )
        }
    };
    if let Some(session) = &spec.session_id {
        if let Err(e) = workspace::carry_session(&ctx.login.config_dir, session, &cwd) {
            warn!(job_id, session_id = %session, error = %e, "could not carry the session over; Claude will say it is unknown");
        }
    }
    // While the token is stale only one job starts; see oauth::RefreshGate. Waiting there
    // counts against the job's timeout, and a cancel ends the wait.
    let deadline = deadline_of(started, spec.timeout_ms);
    let admitted = tokio::select! {
        refresher = ctx.gate.admit(&ctx.login) => Ok(refresher),
        s = &mut stop => Err(Stop::ending(s)),
        _ = tokio::time::sleep_until(deadline) => Err(Ending::TimedOut { after_ms: spec.timeout_ms }),
    };
    let mut result = match admitted {
        Ok(refresher) => {
            let result = run_claude(ctx, job_id, &spec, &cwd, deadline, stop, started).await;
            drop(refresher);
            result
        }
        Err(ending) => {
            info!(job_id, agent_id = %ctx.cfg.agent_id, ending = ?ending, "job ended while waiting for the login refresh");
            claude::result(&Transcript::default(), ending, "", started.elapsed().as_millis() as u64)
        }
    };
    // Re-read: the tokens may have been rotated while Claude ran.
    let redactor = ctx.login.redactor(crate::now_ms());
    result.output = redactor.redact(&result.output);
    result.error = result.error.map(|e| redactor.redact(&e));
    if std::env::var_os("CLAUDE_RUNNER_KEEP_WORKSPACES").is_none() {
        let _ = tokio::fs::remove_dir_all(&workspace).await;
    }
    result
}

/// When a job that started at `started` must be stopped (far future if it overflows).
fn deadline_of(started: Instant, timeout_ms: u64) -> tokio::time::Instant {
    let at = started.checked_add(Duration::from_millis(timeout_ms)).unwrap_or(started + Duration::from_secs(365 * 86_400));
    tokio::time::Instant::from_std(at)
}

async fn run_claude(
    ctx: &JobContext,
    job_id: &str,
    spec: &JobSpec,
    cwd: &std::path::Path,
    deadline: tokio::time::Instant,
    mut stop: oneshot::Receiver<Stop>,
    started: Instant,
) -> JobResult {
    let cfg = &ctx.cfg;
    let mut env = Vec::new();
    if let Some(dir) = &cfg.claude_config_dir {
        env.push(("CLAUDE_CONFIG_DIR", dir.clone().into_os_string()));
    }
    let launch = Launch {
        program: &cfg.claude_bin,
        args: claude::args(spec, cfg.claude_model.as_deref()),
        cwd,
        env,
        stdin: spec.prompt.clone(),
    };
    let mut redactor = ctx.login.redactor(crate::now_ms());
    let mut redactor_read = Instant::now();
    let mut transcript = Transcript::default();
    let mut seq = 0u64;
    let on_line = |line: &[u8]| {
        if redactor_read.elapsed() > REDACTOR_REFRESH {
            redactor = ctx.login.redactor(crate::now_ms());
            redactor_read = Instant::now();
        }
        let text = redactor.redact(&String::from_utf8_lossy(line));
        if let Some(event) = transcript.line(&text) {
            if let Some(window) = shared::usage::UsageWindow::from_event(&event, crate::now_ms()) {
                ctx.reporter.saw_usage(window);
            }
            seq += 1;
            let event = if text.len() > MAX_EVENT_BYTES {
                serde_json::json!({"type": event["type"], "truncated": true, "bytes": text.len()})
            } else {
                event
            };
            let _ = ctx.uplink.send(AgentMessage::Event { job_id: job_id.to_string(), seq, event });
        }
    };
    let finished = process::run(launch, job_id, deadline, spec.timeout_ms, &mut stop, on_line).await;
    let stderr = ctx.login.redactor(crate::now_ms()).redact(&finished.stderr);
    let duration_ms = started.elapsed().as_millis() as u64;
    let result = claude::result(&transcript, finished.ending, &stderr, duration_ms);
    info!(job_id, agent_id = %cfg.agent_id, success = result.success, error_code = ?result.error_code, duration_ms, lines = transcript.lines, "claude finished");
    result
}
