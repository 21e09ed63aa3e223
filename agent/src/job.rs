//! One job's life on Spark: a fresh workspace, Claude started in its own process group,
//! its stream-json read line by line (each line redacted, forwarded as a progress event),
//! `timeout_ms` and cancels enforced by killing the whole group (TERM, then KILL), and a
//! result that always comes back — a missing binary, a crash or garbage output become a
//! clear failure, never a hang.

use crate::claude::{self, Ending, Transcript};
use crate::agent::Agent;
use shared::job::{JobResult, JobSpec};
use shared::protocol::AgentMessage;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Time Claude gets to exit after SIGTERM before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// After Claude exits, how long stray children may keep its stdout open.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Longest stdout line read whole; longer ones are cut (a result that long is not JSON
/// anyone can use, and results are capped at 1 MiB anyway).
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
/// How often the redactor re-reads the login: Claude may rotate the tokens mid-job.
const REDACTOR_REFRESH: Duration = Duration::from_secs(2);

/// Why a job is stopped before Claude ends by itself.
#[derive(Debug)]
pub enum Stop {
    /// The caller (or the edge) cancelled it.
    Cancelled(String),
    /// The agent is shutting down.
    AgentStopping,
}

impl Stop {
    fn ending(stop: Result<Stop, oneshot::error::RecvError>) -> Ending {
        match stop {
            Ok(Stop::Cancelled(reason)) => Ending::Cancelled { reason },
            Ok(Stop::AgentStopping) | Err(_) => Ending::AgentStopping,
        }
    }
}
/// Largest progress event forwarded; bigger ones are summarised.
const MAX_EVENT_BYTES: usize = 256 * 1024;
const STDERR_TAIL_BYTES: usize = 8 * 1024;

/// Runs the job to its end and returns its (redacted) result.
pub async fn run(agent: Arc<Agent>, job_id: String, spec: JobSpec, mut cancel: oneshot::Receiver<Stop>) -> JobResult {
    let started = Instant::now();
    let workspace = agent.cfg.data_dir.join("workspaces").join(&job_id);
    let cwd = match prepare(&workspace, spec.working_dir.as_deref()) {
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
        let config = agent.cfg.claude_config_dir.clone().unwrap_or_else(|| crate::home().join(".claude"));
        if let Err(e) = carry_session(&config, session, &cwd) {
            warn!(job_id = %job_id, session_id = %session, error = %e, "could not carry the session over; Claude will say it is unknown");
        }
    }
    // While the token is stale only one job starts; see oauth::RefreshGate. Waiting there
    // counts against the job's timeout, and a cancel ends the wait.
    let deadline = deadline_of(started, spec.timeout_ms);
    let admitted = tokio::select! {
        refresher = agent.gate.admit(&agent.login) => Ok(refresher),
        stop = &mut cancel => Err(Stop::ending(stop)),
        _ = tokio::time::sleep_until(deadline) => Err(Ending::TimedOut { after_ms: spec.timeout_ms }),
    };
    let mut result = match admitted {
        Ok(refresher) => {
            let result = run_claude(&agent, &job_id, &spec, &cwd, cancel, started).await;
            drop(refresher);
            result
        }
        Err(ending) => {
            info!(job_id = %job_id, agent_id = %agent.cfg.agent_id, ending = ?ending, "job ended while waiting for the login refresh");
            claude::result(&Transcript::default(), ending, "", started.elapsed().as_millis() as u64)
        }
    };
    let redactor = agent.login.redactor(crate::now_ms());
    result.output = redactor.redact(&result.output);
    result.error = result.error.map(|e| redactor.redact(&e));
    match result.error_code {
        Some(shared::contract::ErrorCode::RunnerOauthError) => agent.auth.set_failed(true),
        None => agent.auth.set_failed(false),
        _ => {}
    }
    if std::env::var_os("CLAUDE_RUNNER_KEEP_WORKSPACES").is_none() {
        let _ = tokio::fs::remove_dir_all(&workspace).await;
    }
    result
}

/// A fresh, empty workspace, and the working directory inside it.
fn prepare(workspace: &std::path::Path, working_dir: Option<&str>) -> std::io::Result<PathBuf> {
    if workspace.exists() {
        std::fs::remove_dir_all(workspace)?;
    }
    std::fs::create_dir_all(workspace)?;
    // The edge validated it; check again here, the side that touches the disk.
    let dir = match working_dir {
        Some(d) => shared::contract::checked_working_dir(d).map_err(|e| std::io::Error::other(e.body.error))?,
        None => String::new(),
    };
    let cwd = workspace.join(&dir);
    std::fs::create_dir_all(&cwd)?;
    let real = cwd.canonicalize()?;
    if !real.starts_with(workspace.canonicalize()?) {
        return Err(std::io::Error::other("working_dir leaves the workspace"));
    }
    Ok(real)
}

/// Claude Code files a session under `projects/<its working directory, slugged>/<id>.jsonl`
/// and `--resume` looks only under the current directory's folder. Every job has a fresh
/// workspace, so a session from an earlier job is copied to where this job's Claude looks.
fn carry_session(config_dir: &std::path::Path, session_id: &str, cwd: &std::path::Path) -> std::io::Result<()> {
    // The edge allows only these characters; check again before building paths.
    if session_id.is_empty() || !session_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(std::io::Error::other("unsafe session id"));
    }
    let projects = config_dir.join("projects");
    let file = format!("{session_id}.jsonl");
    let slug: String = cwd.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let target = projects.join(slug);
    if target.join(&file).exists() {
        return Ok(());
    }
    let source = std::fs::read_dir(&projects)?
        .flatten()
        .map(|dir| dir.path().join(&file))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    let Some(source) = source else { return Ok(()) };
    std::fs::create_dir_all(&target)?;
    std::fs::copy(source, target.join(file))?;
    Ok(())
}

/// When a job that started at `started` must be stopped (far future if it overflows).
fn deadline_of(started: Instant, timeout_ms: u64) -> tokio::time::Instant {
    let at = started.checked_add(Duration::from_millis(timeout_ms)).unwrap_or(started + Duration::from_secs(365 * 86_400));
    tokio::time::Instant::from_std(at)
}

fn kill_group(pgid: u32, signal: libc::c_int) {
    // Group 0 would be the agent's own.
    if pgid == 0 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the process group; no memory involved.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), signal);
    }
}

async fn run_claude(
    agent: &Agent,
    job_id: &str,
    spec: &JobSpec,
    cwd: &std::path::Path,
    mut cancel: oneshot::Receiver<Stop>,
    started: Instant,
) -> JobResult {
    let cfg = &agent.cfg;
    let mut cmd = Command::new(&cfg.claude_bin);
    cmd.args(claude::args(spec, cfg.claude_model.as_deref()))
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &cfg.claude_config_dir {
        cmd.env("CLAUDE_CONFIG_DIR", dir);
    }
    // SAFETY: prctl only sets a flag on the child between fork and exec. If the agent dies,
    // Claude dies with it instead of running on unseen (its result could not be reported,
    // and the job might be sent again).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "the Claude Code binary `{}` was not found: install it (`npm install -g @anthropic-ai/claude-code`) or set CLAUDE_BIN",
                    cfg.claude_bin
                )
            } else {
                format!("could not start `{}`: {e}", cfg.claude_bin)
            };
            let ending = Ending::SpawnFailed(hint);
            return claude::result(&Transcript::default(), ending, "", started.elapsed().as_millis() as u64);
        }
    };
    let pgid = child.id().unwrap_or(0);
    info!(job_id, agent_id = %cfg.agent_id, pid = pgid, "claude started");

    if let Some(mut stdin) = child.stdin.take() {
        let prompt = spec.prompt.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(prompt.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
    }
    let stderr_task = child.stderr.take().map(|mut err| {
        tokio::spawn(async move {
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL_BYTES * 2 {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
            String::from_utf8_lossy(&tail[tail.len().saturating_sub(STDERR_TAIL_BYTES)..]).into_owned()
        })
    });
    let mut stdout = BufReader::with_capacity(64 * 1024, child.stdout.take().expect("stdout is piped"));

    let mut redactor = agent.login.redactor(crate::now_ms());
    let mut redactor_read = Instant::now();
    let mut transcript = Transcript::default();
    let mut seq = 0u64;
    let deadline = deadline_of(started, spec.timeout_ms);
    let mut exit: Option<Option<i32>> = None;
    let mut stdout_open = true;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut line = Vec::new();
    let stop: Option<Ending> = loop {
        if exit.is_some() && !stdout_open {
            break None;
        }
        tokio::select! {
            read = read_line_capped(&mut stdout, &mut line, MAX_LINE_BYTES), if stdout_open => {
                match read {
                    Ok(0) | Err(_) => stdout_open = false,
                    Ok(_) => {
                        if redactor_read.elapsed() > REDACTOR_REFRESH {
                            redactor = agent.login.redactor(crate::now_ms());
                            redactor_read = Instant::now();
                        }
                        let text = redactor.redact(&String::from_utf8_lossy(&line));
                        if let Some(event) = transcript.line(&text) {
                            seq += 1;
                            let event = if text.len() > MAX_EVENT_BYTES {
                                serde_json::json!({"type": event["type"], "truncated": true, "bytes": text.len()})
                            } else {
                                event
                            };
                            let _ = agent.uplink.send(AgentMessage::Event { job_id: job_id.to_string(), seq, event });
                        }
                    }
                }
            }
            status = child.wait(), if exit.is_none() => {
                exit = Some(status.ok().and_then(|s| s.code()));
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or(deadline)), if drain_until.is_some() => {
                // Claude is gone but something it started still holds stdout.
                break None;
            }
            _ = tokio::time::sleep_until(deadline) => {
                break Some(Ending::TimedOut { after_ms: spec.timeout_ms });
            }
            stop = &mut cancel => {
                break Some(Stop::ending(stop));
            }
        }
    };
    let ending = match stop {
        None => Ending::Exited(exit.flatten()),
        Some(ending) => {
            warn!(job_id, agent_id = %cfg.agent_id, ending = ?ending, "stopping claude");
            kill_group(pgid, libc::SIGTERM);
            if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
                kill_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
            }
            ending
        }
    };
    // Whatever Claude left behind in its group goes too.
    kill_group(pgid, libc::SIGKILL);
    let stderr = match stderr_task {
        Some(t) => tokio::time::timeout(Duration::from_secs(1), t).await.ok().and_then(Result::ok).unwrap_or_default(),
        None => String::new(),
    };
    // Re-read: the tokens may have been rotated while Claude ran.
    let redactor = agent.login.redactor(crate::now_ms());
    let stderr = redactor.redact(&stderr);
    let duration_ms = started.elapsed().as_millis() as u64;
    let result = claude::result(&transcript, ending, &stderr, duration_ms);
    info!(job_id, agent_id = %cfg.agent_id, success = result.success, error_code = ?result.error_code, duration_ms, lines = transcript.lines, "claude finished");
    result
}

/// Reads one line (without its newline) into `buf`, keeping at most `max` bytes of it and
/// discarding the rest. Returns the bytes consumed (0 at end of input).
async fn read_line_capped<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    buf.clear();
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(available.len());
        reader.consume(used);
        consumed += used;
        if done.is_some() {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_lines_and_caps_long_ones() {
        let data = b"one\n\ntwo-long-line\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while read_line_capped(&mut r, &mut buf, 5).await.unwrap() > 0 {
            lines.push(String::from_utf8(buf.clone()).unwrap());
        }
        assert_eq!(lines, ["one", "", "two-l", "last"]);
    }

    #[test]
    fn sessions_follow_the_job_to_its_new_workspace() {
        let root = std::env::temp_dir().join(format!("cr-session-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let old = root.join("projects/-data-workspaces-job1");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("abc-123.jsonl"), "{\"turn\":1}\n").unwrap();
        let cwd = std::path::Path::new("/data/workspaces/job2/sub_dir");
        carry_session(&root, "abc-123", cwd).unwrap();
        let copied = root.join("projects/-data-workspaces-job2-sub-dir/abc-123.jsonl");
        assert_eq!(std::fs::read_to_string(copied).unwrap(), "{\"turn\":1}\n");
        // Unknown sessions are left for Claude to report; hostile ids build no paths.
        assert!(carry_session(&root, "unknown", cwd).is_ok());
        assert!(carry_session(&root, "../../etc/passwd", cwd).is_err());
    }

    #[test]
    fn workspaces_are_fresh_and_keep_working_dir_inside() {
        let ws = std::env::temp_dir().join(format!("cr-ws-{}", std::process::id()));
        std::fs::create_dir_all(ws.join("old")).unwrap();
        let cwd = prepare(&ws, Some("a/b")).unwrap();
        assert!(cwd.ends_with("a/b"));
        assert!(!ws.join("old").exists(), "a workspace starts empty");
        assert!(prepare(&ws, Some("../x")).is_err());
        assert!(prepare(&ws, Some("/etc")).is_err());
    }
}
