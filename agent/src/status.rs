//! The agent's own account of itself, for `claude-runner status`: whether it is connected,
//! to which edge, since when, what it runs, why the last connection ended. Kept in
//! `DATA_DIR/status.json` (the agent has no port to ask, by design).

use crate::files::write_atomically;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub agent_id: String,
    pub edge: String,
    pub pid: u32,
    pub connected: bool,
    /// When the current connection, or the current disconnection, began.
    pub since: String,
    pub last_error: Option<String>,
    pub running: Vec<String>,
    /// The repositories whose mirror the agent holds.
    #[serde(default)]
    pub mirrors: Vec<String>,
    pub updated_at: String,
}

pub struct StatusFile {
    path: PathBuf,
    status: Mutex<Status>,
}

impl StatusFile {
    pub fn new(path: PathBuf, agent_id: &str, edge: &str) -> StatusFile {
        let now = shared::time::rfc3339(crate::now_ms());
        let status = Status {
            agent_id: agent_id.into(),
            edge: edge.into(),
            pid: std::process::id(),
            since: now,
            ..Status::default()
        };
        let file = StatusFile { path, status: Mutex::new(status) };
        file.update(|_| {});
        file
    }

    fn update(&self, change: impl FnOnce(&mut Status)) {
        let mut status = self.status.lock().expect("status lock");
        change(&mut status);
        status.updated_at = shared::time::rfc3339(crate::now_ms());
        let bytes = serde_json::to_vec_pretty(&*status).expect("status serialises");
        if let Err(e) = write_atomically(&self.path, &bytes, false) {
            tracing::debug!(path = %self.path.display(), error = %e, "could not write the status file");
        }
    }

    pub fn connected(&self) {
        self.update(|s| {
            s.connected = true;
            s.since = shared::time::rfc3339(crate::now_ms());
        });
    }

    pub fn disconnected(&self, reason: &str) {
        self.update(|s| {
            if s.connected {
                s.since = shared::time::rfc3339(crate::now_ms());
            }
            s.connected = false;
            s.last_error = Some(reason.to_string());
        });
    }

    pub fn running(&self, running: Vec<String>) {
        self.update(|s| s.running = running);
    }

    pub fn mirrors(&self, mirrors: Vec<String>) {
        self.update(|s| s.mirrors = mirrors);
    }
}

/// `claude-runner status`: prints the local agent's state; exits non-zero unless it runs
/// and is connected.
pub fn show(data_dir: &std::path::Path) -> anyhow::Result<bool> {
    let path = data_dir.join("status.json");
    let status: Status = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is unreadable ({e}); restart the agent to rewrite it", path.display()))?,
        Err(_) => {
            println!("No agent has run with DATA_DIR={} (no status.json). Start one: `claude-runner agent` (or `up`).", data_dir.display());
            return Ok(false);
        }
    };
    let alive = std::path::Path::new(&format!("/proc/{}", status.pid)).exists();
    println!("agent     {} (pid {}, {})", status.agent_id, status.pid, if alive { "running" } else { "not running" });
    println!("edge      {}", status.edge);
    if !alive {
        println!("state     stopped; start it again with `claude-runner agent`");
        return Ok(false);
    }
    if status.connected {
        println!("state     connected since {}", status.since);
    } else {
        println!("state     disconnected since {}: {}", status.since, status.last_error.as_deref().unwrap_or("?"));
        println!("          (it keeps retrying; `claude-runner doctor` checks the settings)");
    }
    if status.running.is_empty() {
        println!("jobs      none running");
    } else {
        println!("jobs      {}", status.running.join(", "));
    }
    if !status.mirrors.is_empty() {
        println!("mirrors   {}", status.mirrors.join(", "));
    }
    Ok(status.connected)
}
