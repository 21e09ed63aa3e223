//! How the agent is asked to stop. The first SIGTERM (or SIGINT) drains it: no new jobs,
//! the running ones may finish within `DRAIN_TIMEOUT_MS`, their results go out, then it
//! exits 0. A second one stops the running jobs at once; they are reported to the edge
//! as handed back (`RUNNER_LOST`, so callers fall back), never lost. [`crate::serve`]
//! carries this out; `claude-runner agent --drain` asks for it from another shell.

use crate::status;
use std::path::Path;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// One message per SIGTERM or SIGINT received, for as long as the receiver lives.
pub fn stop_requests() -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate()).expect("signal handlers install");
    let mut int = signal(SignalKind::interrupt()).expect("signal handlers install");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    rx
}

/// `claude-runner agent --drain`: SIGTERM to the agent that runs with `data_dir`, then
/// wait until it has exited, saying what it is still running. False if none runs.
pub async fn request(data_dir: &Path) -> anyhow::Result<bool> {
    let Some(agent) = status::read(data_dir)? else {
        println!("No agent has run with DATA_DIR={} (no status.json); nothing to drain.", data_dir.display());
        return Ok(false);
    };
    if !status::is_agent(agent.pid) {
        println!("Agent {} (pid {}) is not running; nothing to drain.", agent.agent_id, agent.pid);
        return Ok(false);
    }
    // SAFETY: kill(2) sends a signal; the pid was just checked to be a claude-runner.
    if unsafe { libc::kill(agent.pid as libc::pid_t, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("cannot signal agent {} (pid {}): {e}; run this as the user the agent runs as", agent.agent_id, agent.pid);
    }
    println!("Draining agent {} (pid {}): it takes no new jobs and exits once its jobs are done.", agent.agent_id, agent.pid);
    let mut said = None;
    while status::is_agent(agent.pid) {
        let running = status::read(data_dir).ok().flatten().map(|s| s.running).unwrap_or_default();
        if said.as_ref() != Some(&running) {
            if running.is_empty() {
                println!("  no job running; delivering results and closing");
            } else {
                println!("  waiting for {}", running.join(", "));
            }
            said = Some(running);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("Agent {} has stopped.", agent.agent_id);
    Ok(true)
}
