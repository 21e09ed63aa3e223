//! The agent's settings: each is an environment variable and a `--flag` (README
//! "Configuration"), checked once at start with errors that say what to fix.

use clap::Args;
use ed25519_dalek::{SigningKey, VerifyingKey};
use shared::keys;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The edge to dial: ws://host:port or wss://host (http/https are accepted too).
    #[arg(long, env = "EDGE_URL")]
    pub edge_url: Option<String>,
    /// This agent's id, as listed in the edge's AGENT_PUBLIC_KEYS (default: hostname).
    #[arg(long, env = "AGENT_ID")]
    pub agent_id: Option<String>,
    /// base64 ed25519 seed of this agent (or use AGENT_KEY_FILE).
    #[arg(long, env = "AGENT_SIGNING_KEY", hide_env_values = true)]
    pub agent_signing_key: Option<String>,
    /// File holding AGENT_SIGNING_KEY.
    #[arg(long, env = "AGENT_KEY_FILE")]
    pub agent_key_file: Option<PathBuf>,
    /// base64 public key of the edge: only jobs it signed run.
    #[arg(long, env = "EDGE_PUBLIC_KEY")]
    pub edge_public_key: Option<String>,
    #[command(flatten)]
    pub local: LocalArgs,
    /// Jobs run at once.
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value_t = 1)]
    pub max_concurrent_jobs: u32,
    #[command(flatten)]
    pub repos: crate::repo::settings::RepoArgs,
    /// On a stop (SIGTERM), how long running jobs may take to finish before they are
    /// handed back to the edge, in milliseconds.
    #[arg(long, env = "DRAIN_TIMEOUT_MS", default_value_t = DEFAULT_DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: u64,
}

/// Five minutes: the default `timeout_ms` of a job.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 300_000;

/// Settings about this machine only, shared with `oauth-status` and `doctor`.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// The Claude Code binary.
    #[arg(long, env = "CLAUDE_BIN", default_value = "claude")]
    pub claude_bin: String,
    /// Claude's config folder (holds .credentials.json; default ~/.claude).
    #[arg(long, env = "CLAUDE_CONFIG_DIR")]
    pub claude_config_dir: Option<PathBuf>,
    /// Workspaces and the result spool (default ~/.local/share/claude-runner).
    #[arg(long, env = "DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Model for jobs that do not name one.
    #[arg(long, env = "CLAUDE_MODEL")]
    pub claude_model: Option<String>,
}

impl LocalArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| crate::home().join(".local/share/claude-runner"))
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub connect_url: String,
    pub agent_id: String,
    pub signing_key: SigningKey,
    pub edge_public_key: VerifyingKey,
    pub claude_bin: String,
    pub claude_config_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub max_concurrent_jobs: u32,
    pub claude_model: Option<String>,
    pub repos: crate::repo::settings::RepoSettings,
    /// How long a stop waits for running jobs before handing them back.
    pub drain_timeout: std::time::Duration,
}

/// Makes a setting set to an empty value (`CLAUDE_MODEL=` in an `.env` file or a systemd
/// `EnvironmentFile`) count as unset, as people writing those files expect; clap would
/// take it as an empty value and refuse it. Every variable a flag of `cli` reads is
/// covered. Call it before any thread starts (it changes the environment).
pub fn forget_empty_settings(cli: &clap::Command) {
    fn names(cmd: &clap::Command, out: &mut Vec<std::ffi::OsString>) {
        out.extend(cmd.get_arguments().filter_map(|a| a.get_env().map(|e| e.to_os_string())));
        for sub in cmd.get_subcommands() {
            names(sub, out);
        }
    }
    let mut settings = Vec::new();
    names(cli, &mut settings);
    for name in settings {
        if std::env::var_os(&name).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(&name);
        }
    }
}

/// `ws(s)://host[:port][/prefix]` → the `/agent/connect` URL.
pub fn connect_url(edge_url: &str) -> anyhow::Result<String> {
    let url = edge_url.trim().trim_end_matches('/');
    let url = if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if url.starts_with("ws://") || url.starts_with("wss://") {
        url.to_string()
    } else {
        anyhow::bail!("EDGE_URL must start with wss:// (or ws:// for a local edge), got `{edge_url}`");
    };
    Ok(if url.ends_with("/agent/connect") { url } else { format!("{url}/agent/connect") })
}

/// The machine's hostname, made into a valid agent id.
pub fn default_agent_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() { "spark".into() } else { id }
}

impl AgentConfig {
    /// Settings to run a job on this machine with no edge (the canary): the local ones
    /// from `local`; the keys are fresh and never used, as nothing is dialled.
    pub fn local_only(local: &LocalArgs, agent_id: String) -> AgentConfig {
        let unused = SigningKey::from_bytes(&runtime::entropy());
        AgentConfig {
            connect_url: String::new(),
            agent_id,
            edge_public_key: unused.verifying_key(),
            signing_key: unused,
            claude_bin: local.claude_bin.clone(),
            claude_config_dir: local.claude_config_dir.clone(),
            data_dir: local.data_dir(),
            max_concurrent_jobs: 1,
            claude_model: local.claude_model.clone(),
            repos: crate::repo::settings::RepoSettings::default(),
            drain_timeout: std::time::Duration::ZERO,
        }
    }
}

impl AgentArgs {
    pub fn agent_id(&self) -> String {
        self.agent_id.clone().unwrap_or_else(default_agent_id)
    }

    /// The text of the agent's signing key, from AGENT_SIGNING_KEY or AGENT_KEY_FILE.
    pub fn signing_key_text(&self) -> anyhow::Result<String> {
        match (&self.agent_signing_key, &self.agent_key_file) {
            (Some(k), _) => Ok(k.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read AGENT_KEY_FILE {}: {e}", path.display())),
            (None, None) => anyhow::bail!("set AGENT_SIGNING_KEY or AGENT_KEY_FILE (`claude-runner keygen` makes one)"),
        }
    }

    pub fn resolve(self) -> anyhow::Result<AgentConfig> {
        let key_text = self.signing_key_text()?;
        let agent_id = self.agent_id();
        if !shared::ids::valid_agent_id(&agent_id) {
            anyhow::bail!("AGENT_ID `{agent_id}` is not valid: use 1-64 letters, digits, `-`, `_` or `.`");
        }
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > 64 {
            anyhow::bail!("MAX_CONCURRENT_JOBS must be between 1 and 64");
        }
        let edge_url = self.edge_url.as_deref().ok_or_else(|| {
            anyhow::anyhow!("set EDGE_URL to the edge, e.g. wss://claude-runner-edge.<you>.workers.dev")
        })?;
        let edge_public_key = self.edge_public_key.as_deref().ok_or_else(|| {
            anyhow::anyhow!("set EDGE_PUBLIC_KEY (printed by `claude-runner keygen` next to EDGE_SIGNING_KEY)")
        })?;
        Ok(AgentConfig {
            connect_url: connect_url(edge_url)?,
            agent_id,
            signing_key: keys::signing_key("AGENT_SIGNING_KEY", &key_text)?,
            edge_public_key: keys::verifying_key("EDGE_PUBLIC_KEY", edge_public_key)?,
            data_dir: self.local.data_dir(),
            claude_bin: self.local.claude_bin,
            claude_config_dir: self.local.claude_config_dir,
            max_concurrent_jobs: self.max_concurrent_jobs,
            claude_model: self.local.claude_model,
            repos: self.repos.resolve()?,
            drain_timeout: std::time::Duration::from_millis(self.drain_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_connect_url() {
        assert_eq!(connect_url("wss://edge.example.com").unwrap(), "wss://edge.example.com/agent/connect");
        assert_eq!(connect_url("https://e.x/").unwrap(), "wss://e.x/agent/connect");
        assert_eq!(connect_url("ws://127.0.0.1:8787/agent/connect").unwrap(), "ws://127.0.0.1:8787/agent/connect");
        assert!(connect_url("ftp://x").is_err());
        assert!(connect_url("127.0.0.1:8787").is_err());
    }
}
