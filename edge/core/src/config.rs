//! Edge settings. Both hosts read the same variable names (DESIGN.md "Configuration");
//! [`Config::from_lookup`] takes a lookup function so the native host passes
//! `std::env::var` and the Worker passes its vars and secrets.

use ed25519_dalek::SigningKey;
use shared::keys::{self, Keyring};

#[derive(Clone)]
pub struct Config {
    pub runner_secret: String,
    pub signing_key: SigningKey,
    pub agents: Keyring,
    pub heartbeat_interval_ms: u64,
    pub lost_after_ms: u64,
    pub max_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub job_retention_ms: u64,
    /// How long a job submitted with `POST /jobs` may wait in the queue for an agent.
    pub queue_ttl_ms: u64,
    /// Jobs waiting for a free agent before submissions get 429.
    pub max_queued_jobs: usize,
    /// Added to a job's `timeout_ms` before the edge gives up on the agent's own report.
    pub timeout_margin_ms: u64,
    pub edge_version: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        f.debug_struct("Config")
            .field("agents", &self.agents.len())
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("lost_after_ms", &self.lost_after_ms)
            .field("max_timeout_ms", &self.max_timeout_ms)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("job_retention_ms", &self.job_retention_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set; run `claude-runner keygen` and set it as it says")]
    Missing(&'static str),
    #[error("{name} must be a whole number of {unit}, got `{value}`")]
    Number { name: &'static str, unit: &'static str, value: String },
    #[error("{0}")]
    Key(#[from] keys::KeyError),
    #[error("RUNNER_SECRET is too short ({0} characters): use at least 16, e.g. `openssl rand -hex 32`")]
    WeakSecret(usize),
}

pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 15_000;
pub const DEFAULT_LOST_AFTER_MS: u64 = 120_000;
pub const DEFAULT_MAX_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_JOB_RETENTION_MS: u64 = 24 * 3_600_000;
pub const DEFAULT_QUEUE_TTL_MS: u64 = 15 * 60_000;
pub const DEFAULT_MAX_QUEUED_JOBS: usize = 100;
pub const DEFAULT_TIMEOUT_MARGIN_MS: u64 = 30_000;

impl Config {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let required = |name: &'static str| get(name).ok_or(ConfigError::Missing(name));
        let number = |name: &'static str, unit: &'static str, default: u64| -> Result<u64, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| ConfigError::Number { name, unit, value: v }),
            }
        };
        let runner_secret = required("RUNNER_SECRET")?;
        if runner_secret.len() < 16 {
            return Err(ConfigError::WeakSecret(runner_secret.len()));
        }
        Ok(Config {
            signing_key: keys::signing_key("EDGE_SIGNING_KEY", &required("EDGE_SIGNING_KEY")?)?,
            agents: Keyring::parse(&required("AGENT_PUBLIC_KEYS")?)?,
            runner_secret,
            heartbeat_interval_ms: number("HEARTBEAT_INTERVAL_MS", "milliseconds", DEFAULT_HEARTBEAT_INTERVAL_MS)?.max(100),
            lost_after_ms: number("LOST_AFTER_MS", "milliseconds", DEFAULT_LOST_AFTER_MS)?,
            max_timeout_ms: number("MAX_TIMEOUT_MS", "milliseconds", DEFAULT_MAX_TIMEOUT_MS)?,
            max_body_bytes: number("MAX_BODY_BYTES", "bytes", DEFAULT_MAX_BODY_BYTES as u64)? as usize,
            job_retention_ms: number("JOB_RETENTION_MS", "milliseconds", DEFAULT_JOB_RETENTION_MS)?,
            queue_ttl_ms: number("QUEUE_TTL_MS", "milliseconds", DEFAULT_QUEUE_TTL_MS)?,
            max_queued_jobs: number("MAX_QUEUED_JOBS", "jobs", DEFAULT_MAX_QUEUED_JOBS as u64)? as usize,
            timeout_margin_ms: number("TIMEOUT_MARGIN_MS", "milliseconds", DEFAULT_TIMEOUT_MARGIN_MS)?,
            edge_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }
}
