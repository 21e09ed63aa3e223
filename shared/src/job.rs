//! A job as both sides see it: the spec the agent runs, the result it sends back, and the
//! lifecycle states the edge keeps.

use crate::contract::ErrorCode;
use serde::{Deserialize, Serialize};

/// A validated task. Built from an `/execute` body by [`crate::contract::ExecuteRequest::validate`];
/// travels inside the signed job order, so the agent runs exactly what the edge accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disallowed_tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default)]
    pub include_diff: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
}

/// How a job ended, as the agent reports it (the edge adds `job_id` and `agent_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JobResult {
    pub success: bool,
    pub output: String,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub session_id: Option<String>,
    pub num_turns: Option<u32>,
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    pub error_code: Option<ErrorCode>,
    /// Whether the same request sent again (later, or elsewhere) may succeed; on failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// When to try again (RFC 3339), for `USAGE_LIMIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

impl JobResult {
    /// A failed result the edge makes itself (lost agent, edge-side timeout, cancel before
    /// dispatch): nothing ran, or nothing came back.
    pub fn failure(code: ErrorCode, error: impl Into<String>, duration_ms: u64) -> Self {
        JobResult {
            success: false,
            error: Some(error.into()),
            error_code: Some(code),
            retryable: Some(code.retryable()),
            duration_ms,
            ..JobResult::default()
        }
    }

    /// The terminal state this result puts its job in.
    pub fn terminal_state(&self) -> JobState {
        match (self.success, self.error_code) {
            (true, _) => JobState::Succeeded,
            (false, Some(ErrorCode::Timeout)) => JobState::TimedOut,
            (false, Some(ErrorCode::Cancelled)) => JobState::Cancelled,
            (false, Some(ErrorCode::RunnerLost)) => JobState::Lost,
            (false, _) => JobState::Failed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Lost,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Dispatched | JobState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            JobState::Lost => "lost",
        }
    }
}
