//! Edge settings. Both hosts read the same variable names (README "Configuration");
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
    /// Ended jobs kept readable at most (the oldest go first, even before
    /// `JOB_RETENTION_MS`).
    pub max_retained_jobs: usize,
    /// …and at most this many bytes of their records, about.
    pub max_retained_bytes: u64,
    pub edge_version: String,
    /// Where alerts are posted (an ntfy topic URL, or any webhook taking a POST).
    pub notify_url: Option<String>,
    /// Alert when the login will need a person within this many hours.
    pub oauth_warn_hours: f64,
    /// Alert when no agent has been connected for this long.
    pub offline_alert_ms: u64,
    /// The same alert at most once per this long.
    pub notify_min_interval_ms: u64,
    /// Hosts a job's `callback_url` may name.
    pub callback_hosts: Vec<String>,
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
    #[error("{name} must be an http:// or https:// URL, got `{value}`")]
    Url { name: &'static str, value: String },
    #[error("{name} is {value}, over the most this edge supports ({max}); lower it")]
    TooLarge { name: &'static str, value: u64, max: u64 },
}

const DAY_MS: u64 = 24 * 3_600_000;
const WEEK_MS: u64 = 7 * DAY_MS;

pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 15_000;
pub const DEFAULT_LOST_AFTER_MS: u64 = 120_000;
pub const DEFAULT_MAX_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_JOB_RETENTION_MS: u64 = 24 * 3_600_000;
pub const DEFAULT_QUEUE_TTL_MS: u64 = 15 * 60_000;
pub const DEFAULT_MAX_QUEUED_JOBS: usize = 100;
pub const DEFAULT_TIMEOUT_MARGIN_MS: u64 = 30_000;
pub const DEFAULT_OAUTH_WARN_HOURS: u64 = 24;
pub const DEFAULT_OFFLINE_ALERT_MS: u64 = 10 * 60_000;
pub const DEFAULT_NOTIFY_MIN_INTERVAL_MS: u64 = 3_600_000;
/// A Durable Object keeps every ended job's header in memory (about 1 KiB each) and its
/// whole record in storage; 10,000 headers fit its 128 MB of memory many times over.
pub const DEFAULT_MAX_RETAINED_JOBS: usize = 10_000;
/// Records of up to ~2 MiB each (a result, its diff, the task): 1 GiB is 500 of the
/// largest, and far under a Durable Object's storage.
pub const DEFAULT_MAX_RETAINED_BYTES: u64 = 1024 * 1024 * 1024;

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
        // Bounds keep every deadline sum far from overflow.
        let bounded = |name: &'static str, unit: &'static str, default: u64, max: u64| -> Result<u64, ConfigError> {
            let value = number(name, unit, default)?;
            if value > max {
                return Err(ConfigError::TooLarge { name, value, max });
            }
            Ok(value)
        };
        let runner_secret = required("RUNNER_SECRET")?;
        if runner_secret.len() < 16 {
            return Err(ConfigError::WeakSecret(runner_secret.len()));
        }
        Ok(Config {
            signing_key: keys::signing_key("EDGE_SIGNING_KEY", &required("EDGE_SIGNING_KEY")?)?,
            agents: Keyring::parse(&required("AGENT_PUBLIC_KEYS")?)?,
            runner_secret,
            heartbeat_interval_ms: bounded("HEARTBEAT_INTERVAL_MS", "milliseconds", DEFAULT_HEARTBEAT_INTERVAL_MS, DAY_MS)?.max(100),
            lost_after_ms: bounded("LOST_AFTER_MS", "milliseconds", DEFAULT_LOST_AFTER_MS, WEEK_MS)?,
            max_timeout_ms: bounded("MAX_TIMEOUT_MS", "milliseconds", DEFAULT_MAX_TIMEOUT_MS, WEEK_MS)?.max(1_000),
            max_body_bytes: bounded("MAX_BODY_BYTES", "bytes", DEFAULT_MAX_BODY_BYTES as u64, 64 * 1024 * 1024)? as usize,
            job_retention_ms: bounded("JOB_RETENTION_MS", "milliseconds", DEFAULT_JOB_RETENTION_MS, 30 * DAY_MS)?,
            queue_ttl_ms: bounded("QUEUE_TTL_MS", "milliseconds", DEFAULT_QUEUE_TTL_MS, WEEK_MS)?,
            max_queued_jobs: bounded("MAX_QUEUED_JOBS", "jobs", DEFAULT_MAX_QUEUED_JOBS as u64, 100_000)? as usize,
            timeout_margin_ms: bounded("TIMEOUT_MARGIN_MS", "milliseconds", DEFAULT_TIMEOUT_MARGIN_MS, DAY_MS)?,
            max_retained_jobs: bounded("MAX_RETAINED_JOBS", "jobs", DEFAULT_MAX_RETAINED_JOBS as u64, 1_000_000)?.max(1) as usize,
            max_retained_bytes: bounded("MAX_RETAINED_BYTES", "bytes", DEFAULT_MAX_RETAINED_BYTES, 1 << 40)?.max(1 << 20),
            edge_version: env!("CARGO_PKG_VERSION").to_string(),
            notify_url: match get("NOTIFY_URL") {
                Some(url) if url.starts_with("https://") || url.starts_with("http://") => Some(url),
                Some(url) => return Err(ConfigError::Url { name: "NOTIFY_URL", value: url }),
                None => None,
            },
            oauth_warn_hours: bounded("OAUTH_WARN_HOURS", "hours", DEFAULT_OAUTH_WARN_HOURS, 24 * 365)? as f64,
            offline_alert_ms: bounded("OFFLINE_ALERT_MS", "milliseconds", DEFAULT_OFFLINE_ALERT_MS, WEEK_MS)?,
            notify_min_interval_ms: bounded("NOTIFY_MIN_INTERVAL_MS", "milliseconds", DEFAULT_NOTIFY_MIN_INTERVAL_MS, WEEK_MS)?,
            callback_hosts: get("CALLBACK_HOSTS")
                .map(|v| v.split(',').map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect())
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(extra: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            let base = [
                ("RUNNER_SECRET", "0123456789abcdef0123"),
                ("EDGE_SIGNING_KEY", "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="),
                ("AGENT_PUBLIC_KEYS", "spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
            ];
            extra.iter().chain(base.iter()).find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn reads_defaults_and_refuses_bad_values_with_the_name() {
        let cfg = Config::from_lookup(lookup(&[])).unwrap();
        assert_eq!(cfg.heartbeat_interval_ms, DEFAULT_HEARTBEAT_INTERVAL_MS);
        assert_eq!(cfg.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let err = Config::from_lookup(lookup(&[("MAX_TIMEOUT_MS", "18446744073709551615")])).unwrap_err();
        assert!(err.to_string().contains("MAX_TIMEOUT_MS"), "{err}");
        let err = Config::from_lookup(lookup(&[("LOST_AFTER_MS", "soon")])).unwrap_err();
        assert!(err.to_string().contains("LOST_AFTER_MS"), "{err}");
        let err = Config::from_lookup(lookup(&[("RUNNER_SECRET", "short")])).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        let err = Config::from_lookup(|_| None).unwrap_err();
        assert!(err.to_string().contains("keygen"), "{err}");
    }
}
