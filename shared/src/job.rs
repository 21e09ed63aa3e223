//! A job as both sides see it: the spec the agent runs, the result it sends back, and the
//! lifecycle states the edge keeps.

use crate::contract::ErrorCode;
use serde::{Deserialize, Serialize};

/// A validated task. Built from an `/execute` body by [`crate::contract::ExecuteRequest::validate`];
/// travels inside the signed job order, so the agent runs exactly what the edge accepted.
///
/// `Default` is the empty task (no prompt, no timeout): not a valid one, only a base to
/// build on (the edge's stub of a forgotten job keeps nothing of its task).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_stale: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_message: Option<String>,
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
    /// Everything the job changed against `commit`, as a unified diff (`include_diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// Whether `diff` was cut at the agent's `MAX_DIFF_BYTES` (`include_diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_truncated: Option<bool>,
    /// Each path the job changed (`include_diff`), up to a cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_changed: Option<Vec<FileChange>>,
    /// Whether `files_changed` was cut: the job changed more paths than a result carries
    /// (`include_diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_changed_truncated: Option<bool>,
    pub error_code: Option<ErrorCode>,
    /// Whether the same request sent again (later, or elsewhere) may succeed; on failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// When to try again (RFC 3339), for `USAGE_LIMIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    /// The commit Claude started from (jobs with a `repo_url`).
    #[serde(default)]
    pub commit: Option<String>,
    /// The commit pushed to `pushed_branch` (`push_branch`; null when nothing changed).
    #[serde(default)]
    pub pushed_commit: Option<String>,
    #[serde(default)]
    pub pushed_branch: Option<String>,
    /// Whether `output` was cut to fit the result, and how many bytes were left out.
    #[serde(default)]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated_bytes: Option<u64>,
}

/// One path a job changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    pub status: ChangeKind,
    /// Where a renamed file came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    Renamed,
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

    /// A job lost by whoever found it so (the edge: its agent gone too long, or back
    /// without it; a restarted agent: its started record without a result), who cannot
    /// say whether it may be sent again: `retryable` is left unsaid, and the edge, which
    /// has the job, decides when it ends it (a push it asked for may have landed).
    pub fn lost(error: impl Into<String>, duration_ms: u64) -> Self {
        JobResult { retryable: None, ..JobResult::failure(ErrorCode::RunnerLost, error, duration_ms) }
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
