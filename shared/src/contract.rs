//! The HTTP contract of the edge, identical on both hosts: request bodies and their
//! validation, response bodies, error codes and the status each maps to.

use crate::job::{JobResult, JobSpec, JobState};
use crate::oauth::OAuthStatus;
use crate::placement::Placement;
use crate::repo::{RepoUrl, MAX_COMMIT_MESSAGE};
use serde::{Deserialize, Serialize};

/// Every error code a caller can see, in bodies of errors and of failed results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    Unauthorized,
    InvalidRequest,
    PayloadTooLarge,
    NotFound,
    MethodNotAllowed,
    Conflict,
    RunnerBusy,
    RunnerOffline,
    RunnerLost,
    /// The edge is stopping while the caller's job goes on: follow it with
    /// `GET /jobs/{id}` (never a reason to run the task elsewhere).
    EdgeRestarting,
    ClaudeError,
    Timeout,
    Cancelled,
    RepoError,
    RunnerOauthError,
    /// The subscription's usage window is used up: retry after `retry_at`, or elsewhere.
    UsageLimit,
    /// Claude stopped at `max_turns`.
    MaxTurns,
    /// Claude stopped at `max_budget_usd`.
    BudgetExceeded,
    /// The agent refused the signed job (bad signature, wrong audience, expired): the
    /// keys or clocks of edge and agent disagree.
    JobRejected,
    /// The idempotency key names a job that already ran and ended (`state`), whose record
    /// the edge no longer keeps: it is not run again, and its result cannot be given.
    JobForgotten,
    /// An upgrade to `/agent/connect` without an agent's proof (`X-Runner-Agent-Proof`):
    /// an agent older than the edge, or not an agent at all.
    AgentProofRequired,
    /// An upgrade to `/agent/connect` whose agent's proof does not hold: an unknown
    /// agent, a key that is not its `AGENT_PUBLIC_KEYS` entry, a clock too far off.
    AgentProofInvalid,
    InternalError,
}

impl ErrorCode {
    /// The HTTP status an error with this code is answered with. Codes that describe how a
    /// job ended (CLAUDE_ERROR, TIMEOUT…) come inside a 200 result, except the two that
    /// tell the caller to fall back.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 403,
            ErrorCode::InvalidRequest => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::JobForgotten => 410,
            ErrorCode::AgentProofRequired | ErrorCode::AgentProofInvalid => 401,
            ErrorCode::RunnerBusy => 429,
            ErrorCode::RunnerOffline => 503,
            ErrorCode::RunnerLost => 502,
            ErrorCode::EdgeRestarting => 503,
            ErrorCode::InternalError => 500,
            ErrorCode::ClaudeError
            | ErrorCode::Timeout
            | ErrorCode::Cancelled
            | ErrorCode::RepoError
            | ErrorCode::RunnerOauthError
            | ErrorCode::UsageLimit
            | ErrorCode::MaxTurns
            | ErrorCode::BudgetExceeded
            | ErrorCode::JobRejected => 200,
        }
    }

    /// Whether sending the same request again (later, or to another runner) may succeed
    /// without changing it. A job's result may say otherwise (a Claude error that was an
    /// API overload is retryable, an unknown session is not).
    pub fn retryable(self) -> bool {
        match self {
            ErrorCode::RunnerBusy
            | ErrorCode::RunnerOffline
            | ErrorCode::RunnerLost
            | ErrorCode::EdgeRestarting
            | ErrorCode::Timeout
            | ErrorCode::RunnerOauthError
            | ErrorCode::UsageLimit
            | ErrorCode::InternalError => true,
            ErrorCode::Unauthorized
            | ErrorCode::InvalidRequest
            | ErrorCode::PayloadTooLarge
            | ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::Conflict
            | ErrorCode::ClaudeError
            | ErrorCode::Cancelled
            | ErrorCode::RepoError
            | ErrorCode::MaxTurns
            | ErrorCode::BudgetExceeded
            | ErrorCode::JobRejected
            | ErrorCode::JobForgotten
            | ErrorCode::AgentProofRequired
            | ErrorCode::AgentProofInvalid => false,
        }
    }

    /// Whether the caller should run the task elsewhere.
    pub fn fallback(self) -> bool {
        matches!(self, ErrorCode::RunnerOffline | ErrorCode::RunnerLost)
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub success: bool,
    pub error: String,
    pub error_code: ErrorCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// When to try again (RFC 3339), for `USAGE_LIMIT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    /// How the named job ended, for `JOB_FORGOTTEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::job::JobState>,
}

/// An error answer: status and body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub body: ErrorBody,
}

/// Every route the edge serves, as its 404 names them (it named four of them: a
/// caller who mistyped `/oauth/login` was not shown it). Kept to the router in
/// `edge/core/src/http.rs` by its test `the_404_names_every_route_the_edge_serves`.
pub const EDGE_ROUTES: &str = "GET / (the status page), GET /health, POST /execute, POST /jobs, GET /jobs, GET /jobs/{id}, \
DELETE /jobs/{id}, GET /jobs/{id}/events, GET /oauth/status, POST /oauth/login, POST /oauth/login/code, \
POST /agents/{id}/pause, POST /agents/{id}/resume, GET /metrics, GET /pools; agents dial /agent/connect";

impl ApiError {
    pub fn new(code: ErrorCode, error: impl Into<String>) -> Self {
        ApiError {
            status: code.status(),
            body: ErrorBody {
                success: false,
                error: error.into(),
                error_code: code,
                fallback: code.fallback().then_some(true),
                job_id: None,
                retry_at: None,
                state: None,
            },
        }
    }

    /// Work the runner cannot take now, answered at once so the caller runs it elsewhere:
    /// 503 with `fallback: true`.
    pub fn refused(code: ErrorCode, error: impl Into<String>) -> Self {
        let mut err = Self::new(code, error);
        err.status = 503;
        err.body.fallback = Some(true);
        err
    }

    /// The agent's Claude cannot authenticate (its OAuth login needs a person).
    pub fn needs_login() -> Self {
        Self::refused(
            ErrorCode::RunnerOauthError,
            "the runner's Claude OAuth login needs renewing, so the task was not started: run it elsewhere; \
             the runner's owner can log in again from the edge's page (GET /) or with `claude-runner login` \
             (on the runner machine: as README's \"First login\" says)",
        )
    }

    /// The subscription's usage window is used up until `retry_at` (wall time, ms).
    pub fn usage_limit(retry_at: crate::Millis) -> Self {
        let at = crate::time::rfc3339(retry_at);
        let mut err = Self::refused(
            ErrorCode::UsageLimit,
            format!(
                "the runner's Claude subscription has used up its usage window until {at}, so the task was not started: \
                 run it elsewhere, or retry after then (POST /jobs waits for the reset by itself)"
            ),
        );
        err.body.retry_at = Some(at);
        err
    }

    pub fn with_job(mut self, job_id: &str) -> Self {
        self.body.job_id = Some(job_id.to_string());
        self
    }

    pub fn invalid(error: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, error)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            ErrorCode::Unauthorized,
            "missing or wrong runner secret: send it in the X-Runner-Secret header (or Authorization: Bearer)",
        )
    }

    pub fn offline() -> Self {
        Self::new(
            ErrorCode::RunnerOffline,
            "no agent is connected to this edge; run the task elsewhere, or start `claude-runner agent` on the runner machine",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes (MAX_BODY_BYTES); send a shorter prompt"),
        )
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found; check the URL (routes: {EDGE_ROUTES})"))
    }

    /// `job_id` is what the caller sent: shown only if it is a plain id. An ended job is
    /// also forgotten early under the caps, not only at its retention's end: the message
    /// names all three, so a caller who saw the job a moment ago knows where to look.
    pub fn job_not_found(job_id: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            format!(
                "job `{}` not found: no such job, or it ended and is no longer kept (JOB_RETENTION_MS, or the \
                 MAX_RETAINED_JOBS / MAX_RETAINED_BYTES caps); a job's callback_url hears its end even once it is forgotten",
                crate::ids::shown_job_id(job_id)
            ),
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body).expect("error bodies serialise")
    }
}

/// Bounds on what one request may ask for. `max_timeout_ms` comes from `MAX_TIMEOUT_MS`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_timeout_ms: u64,
}

/// An edge's event stream (`GET /jobs/{id}/events`) carries a `: keep-alive` comment after
/// at most this much silence, on both hosts (a Cloudflare Tunnel cuts a silent response at
/// ~100 s; `SSE_KEEPALIVE_MS` may shorten it, never lengthen it): so a follower that hears
/// nothing for a few of these is on a dead connection, not following a quiet job.
pub const SSE_KEEPALIVE_MS: u64 = 15_000;

/// The shortest and longest heartbeat interval an edge may give its agents
/// (`HEARTBEAT_INTERVAL_MS`): an agent keeps the interval its welcome names within these (a
/// hostile or broken edge's 0 or `u64::MAX` is no interval), so an edge refuses a setting
/// outside them rather than have its agents heartbeat at another pace than it was set to.
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 100;
pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 600_000;

/// The slowest uplink an agent is served on: a frame that is arriving at least this fast
/// is a sign of life on both ends, however long it takes (a result is up to ~8 MiB). An
/// agent gives a frame two heartbeat intervals plus its size at this rate to go out; the
/// native edge counts a frame's bytes arriving at up to this rate as the agent heard.
pub const MIN_UPLINK_BYTES_PER_SEC: u64 = 16 * 1024;

pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
pub const MIN_TIMEOUT_MS: u64 = 100;
pub const MAX_TOOLS: usize = 128;
pub const MAX_SHORT_TEXT: usize = 512;
pub const MAX_SYSTEM_PROMPT: usize = 64 * 1024;
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
pub const MAX_BUDGET_USD: f64 = 10_000.0;
pub const PERMISSION_MODES: &[&str] = &["default", "acceptEdits", "plan", "bypassPermissions", "dontAsk"];

/// The body of `POST /execute` and `POST /jobs`, as sent. Unknown fields are ignored;
/// a field of the wrong type fails parsing (400).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExecuteRequest {
    pub prompt: Option<String>,
    /// Alias of `prompt`, as the original service accepted.
    pub task: Option<String>,
    pub repo_url: Option<String>,
    pub branch: Option<String>,
    pub working_dir: Option<String>,
    pub timeout_ms: Option<u64>,
    pub allowed_tools: Option<Vec<String>>,
    pub disallowed_tools: Option<Vec<String>>,
    pub max_turns: Option<u32>,
    pub model: Option<String>,
    pub permission_mode: Option<String>,
    pub append_system_prompt: Option<String>,
    pub session_id: Option<String>,
    pub include_diff: Option<bool>,
    /// Run on the mirror's last fetched state when a fetch fails.
    pub allow_stale: Option<bool>,
    /// Commit Claude's changes and push them to this branch of `repo_url`.
    pub push_branch: Option<String>,
    pub commit_message: Option<String>,
    pub idempotency_key: Option<String>,
    /// Claude stops once a run has cost this much (`--max-budget-usd`).
    pub max_budget_usd: Option<f64>,
    /// `POST /jobs` only: wait in the queue while the usage window is used up (default),
    /// or be refused at once like `/execute`.
    pub wait_for_usage: Option<bool>,
    /// Where the edge POSTs the job's result when it ends (signed; hosts in the edge's
    /// `CALLBACK_HOSTS` only).
    pub callback_url: Option<String>,
    /// Labels the agent must offer (all of them): `{"gpu": "a100"}` or `"gpu=a100,os=linux"`.
    pub labels: Option<LabelsField>,
    /// Only this agent may run the job.
    pub agent_id: Option<String>,
    /// Who sends the job: callers take turns in the queue. A caller with its own secret
    /// (`RUNNER_SECRETS`) is named by it, and no other secret may name it.
    pub caller: Option<String>,
    /// 0-9 (default 0); higher runs first among this caller's queued jobs.
    pub priority: Option<u8>,
}

/// `labels` as a map or as `key=value,…` text.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LabelsField {
    Map(crate::placement::Labels),
    Text(String),
}

/// A validated submission: what to run and how to recognise a repeat of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub spec: JobSpec,
    pub idempotency_key: Option<String>,
    /// Where it may run, whose it is, its priority.
    pub placement: Placement,
    /// See [`ExecuteRequest::wait_for_usage`].
    pub wait_for_usage: bool,
    /// See [`ExecuteRequest::callback_url`] (its host is checked by the edge).
    pub callback_url: Option<String>,
    /// Sent with its caller's own secret (`RUNNER_SECRETS`): set by the edge from the
    /// secret, never from the body (false as parsed).
    pub caller_proven: bool,
}

impl ExecuteRequest {
    /// Parses and validates a request body. `header_key` is the `Idempotency-Key` header.
    pub fn parse(body: &[u8], header_key: Option<&str>, limits: Limits) -> Result<Submission, ApiError> {
        let req: ExecuteRequest = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(format!("the body is not a valid task: {e}; send JSON like {{\"prompt\": \"…\"}}"))
        })?;
        req.validate(header_key, limits)
    }

    pub fn validate(self, header_key: Option<&str>, limits: Limits) -> Result<Submission, ApiError> {
        let placement = self.placement()?;
        let prompt = self.prompt.or(self.task).unwrap_or_default();
        if prompt.trim().is_empty() {
            return Err(ApiError::invalid("`prompt` is required: say what Claude should do"));
        }
        // An empty `repo_url` means none, as it always has.
        let repo_url = self
            .repo_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(RepoUrl::parse)
            .transpose()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let branch = self.branch.map(|b| checked_ref_name("branch", b)).transpose()?;
        let push_branch = self.push_branch.map(|b| checked_ref_name("push_branch", b)).transpose()?;
        if let Some(m) = &self.commit_message {
            if m.trim().is_empty() || m.len() > MAX_COMMIT_MESSAGE || m.contains('\0') {
                return Err(ApiError::invalid(format!(
                    "`commit_message` must be 1 to {MAX_COMMIT_MESSAGE} bytes of text without NUL"
                )));
            }
        }
        if repo_url.is_none() && (push_branch.is_some() || self.commit_message.is_some()) {
            return Err(ApiError::invalid(
                "`push_branch` and `commit_message` need a `repo_url`: say which repository to push to",
            ));
        }
        let working_dir = self.working_dir.map(|d| checked_working_dir(&d)).transpose()?;
        // An edge whose MAX_TIMEOUT_MS is below the default still takes requests that name none.
        let timeout_ms = self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS.min(limits.max_timeout_ms));
        if !(MIN_TIMEOUT_MS..=limits.max_timeout_ms).contains(&timeout_ms) {
            return Err(ApiError::invalid(format!(
                "`timeout_ms` must be between {MIN_TIMEOUT_MS} and {} (MAX_TIMEOUT_MS)",
                limits.max_timeout_ms
            )));
        }
        let allowed_tools = checked_tools("allowed_tools", self.allowed_tools)?;
        let disallowed_tools = checked_tools("disallowed_tools", self.disallowed_tools)?;
        if let Some(0) | Some(10_001..) = self.max_turns {
            return Err(ApiError::invalid("`max_turns` must be between 1 and 10000"));
        }
        let model = self.model.map(|m| checked_word("model", m)).transpose()?;
        if let Some(mode) = &self.permission_mode {
            if !PERMISSION_MODES.contains(&mode.as_str()) {
                return Err(ApiError::invalid(format!(
                    "`permission_mode` must be one of {}",
                    PERMISSION_MODES.join(", ")
                )));
            }
        }
        if let Some(p) = &self.append_system_prompt {
            // It becomes one of Claude's arguments, which cannot hold a NUL.
            if p.len() > MAX_SYSTEM_PROMPT || p.contains('\0') {
                return Err(ApiError::invalid(format!(
                    "`append_system_prompt` must be at most {MAX_SYSTEM_PROMPT} bytes of text without NUL"
                )));
            }
        }
        if let Some(s) = &self.session_id {
            if !crate::ids::plain_id(s, crate::ids::MAX_JOB_ID) {
                return Err(ApiError::invalid(format!(
                    "`session_id` must be the session id of an earlier result (letters, digits, `-` and `_`, at most {})",
                    crate::ids::MAX_JOB_ID
                )));
            }
        }
        if let Some(b) = self.max_budget_usd {
            if !(b.is_finite() && b > 0.0 && b <= MAX_BUDGET_USD) {
                return Err(ApiError::invalid(format!("`max_budget_usd` must be a number above 0 and at most {MAX_BUDGET_USD}")));
            }
        }
        if let Some(url) = &self.callback_url {
            if url.is_empty() || url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ApiError::invalid("`callback_url` must be one URL of at most 2048 characters"));
            }
        }
        let idempotency_key = header_key.map(str::to_string).or(self.idempotency_key);
        if let Some(k) = &idempotency_key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || k.chars().any(char::is_control) {
                return Err(ApiError::invalid(format!(
                    "the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters"
                )));
            }
        }
        Ok(Submission {
            placement,
            spec: JobSpec {
                prompt,
                repo_url: repo_url.map(|u| u.url()),
                branch,
                working_dir,
                timeout_ms,
                allowed_tools,
                disallowed_tools,
                max_turns: self.max_turns,
                model,
                permission_mode: self.permission_mode,
                append_system_prompt: self.append_system_prompt,
                session_id: self.session_id,
                include_diff: self.include_diff.unwrap_or(false),
                max_budget_usd: self.max_budget_usd,
                allow_stale: self.allow_stale.unwrap_or(false),
                push_branch,
                commit_message: self.commit_message,
            },
            wait_for_usage: self.wait_for_usage.unwrap_or(true),
            callback_url: self.callback_url,
            idempotency_key,
            caller_proven: false,
        })
    }
}

impl ExecuteRequest {
    /// The request's `labels`, `agent_id`, `caller` and `priority`, checked.
    fn placement(&self) -> Result<Placement, ApiError> {
        let labels = match &self.labels {
            None => Default::default(),
            Some(LabelsField::Text(text)) => crate::placement::parse_labels(text).map_err(|e| ApiError::invalid(format!("`labels`: {e}")))?,
            Some(LabelsField::Map(map)) => {
                crate::placement::check_labels(map).map_err(|e| ApiError::invalid(format!("`labels`: {e}")))?;
                map.clone()
            }
        };
        if let Some(id) = &self.agent_id {
            if !crate::ids::valid_agent_id(id) {
                return Err(ApiError::invalid("`agent_id` must be an agent id of the pool (1-64 letters, digits, `-`, `_` or `.`)"));
            }
        }
        if let Some(c) = &self.caller {
            if !crate::placement::valid_caller(c) {
                return Err(ApiError::invalid("`caller` must be 1-64 letters, digits, `-` or `_`"));
            }
        }
        let priority = self.priority.unwrap_or(0);
        if priority > crate::placement::MAX_PRIORITY {
            return Err(ApiError::invalid(format!("`priority` must be between 0 and {}", crate::placement::MAX_PRIORITY)));
        }
        // Caller names are one per person whatever their case: `CI` and `ci` share a lane,
        // a queue cap and a secret (`RUNNER_SECRETS` names are lowered the same way).
        let caller = self.caller.as_deref().map(str::to_ascii_lowercase);
        Ok(Placement { labels, agent_id: self.agent_id.clone(), caller, priority })
    }
}

/// The longest folder name Linux's file systems take (NAME_MAX), in bytes.
pub const MAX_PATH_PART_BYTES: usize = 255;

/// A relative path that stays inside the job's checkout: no root, no `..`, no NUL, no
/// folder name longer than [`MAX_PATH_PART_BYTES`].
/// Returned normalised (no `.` parts, `/` separators).
pub fn checked_working_dir(dir: &str) -> Result<String, ApiError> {
    let bad = |why: &str| {
        Err(ApiError::invalid(format!(
            "`working_dir` {why}; give a path relative to the repository, like `packages/api`"
        )))
    };
    if dir.len() > 1024 {
        return bad("is too long");
    }
    if dir.contains('\0') || dir.contains('\\') {
        return bad("contains a forbidden character");
    }
    if dir.starts_with('/') || dir.starts_with('~') {
        return bad("must be relative");
    }
    let mut parts = Vec::new();
    for part in dir.split('/') {
        match part {
            "" | "." => {}
            ".." => return bad("must not leave the checkout (`..`)"),
            p if p.chars().any(char::is_control) => return bad("contains a control character"),
            // Past NAME_MAX no file system makes the folder: refused here, where the caller
            // reads why, not on the agent, whose `mkdir` would fail on a path of the job's.
            p if p.len() > MAX_PATH_PART_BYTES => return bad("has a folder name longer than 255 bytes"),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// A value passed to Claude Code as an option's argument: short, printable, and never
/// starting with `-` (it would read as another option).
fn checked_word(field: &str, value: String) -> Result<String, ApiError> {
    if value.is_empty()
        || value.len() > MAX_SHORT_TEXT
        || value.starts_with('-')
        || value.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(format!(
            "`{field}` must be 1 to {MAX_SHORT_TEXT} printable characters and not start with `-`"
        )));
    }
    Ok(value)
}

/// A branch, tag or commit name that git accepts and no command line misreads.
fn checked_ref_name(field: &str, value: String) -> Result<String, ApiError> {
    match crate::repo::ref_name_problem(&value) {
        None => Ok(value),
        Some(why) => Err(ApiError::invalid(format!("`{field}` {why}; give a branch, tag or commit name like `main`"))),
    }
}

fn checked_tools(field: &str, tools: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid(format!("`{field}` may name at most {MAX_TOOLS} tools")));
    }
    tools.into_iter().map(|t| checked_word(field, t)).collect()
}

/// The answer of `/execute` (and the `result` of `GET /jobs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecuteResponse {
    #[serde(flatten)]
    pub result: JobResult,
    pub job_id: String,
    pub agent_id: Option<String>,
}

/// The answer of `POST /jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub job_id: String,
    pub state: JobState,
    /// Why the job waits, while it is queued (as [`JobView::waiting_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<WaitingFor>,
}

/// Why a queued job has not started, and what would start it: the edge's judgement of the
/// agents that fit the job, the same that refuses an `/execute` at once. A queued job
/// without one of the other reasons waits for a free slot (`busy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitingFor {
    pub code: WaitCode,
    /// One sentence for a person: what keeps the job back and what to do next.
    pub message: String,
}

/// [`WaitingFor::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitCode {
    /// No agent is connected to the edge.
    NoAgent,
    /// No connected agent offers the job's labels or `agent_id`.
    NoFittingAgent,
    /// Every agent that fits the job is paused, stopping or unable to start jobs, at least
    /// one paused (resuming it lets the job start).
    Paused,
    /// Every agent that fits the job is stopping (draining before it exits).
    Stopping,
    /// Every agent that fits the job cannot start jobs now (its DATA_DIR's disk full, its
    /// process limit reached: the message says which and what to do), or is stopping, none
    /// paused.
    CannotStart,
    /// The Claude OAuth login of every agent that fits the job needs a person.
    Login,
    /// Their usage window is used up (until `retry_at` of an `/execute`).
    UsageLimit,
    /// A relayed login's code was passed on: the job starts once its outcome is in.
    LoginFinishing,
    /// Every agent that fits the job is busy with other jobs.
    Busy,
}

/// The answer of `GET /jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: String,
    pub state: JobState,
    pub created_at: String,
    pub agent_id: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub result: Option<ExecuteResponse>,
    /// The start of the job's prompt (the first 200 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Why it waits, while it is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<WaitingFor>,
}

/// The answer of `GET /jobs`: jobs waiting or running (oldest first), then the most
/// recently finished ones (newest first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub active: Vec<JobView>,
    pub finished: Vec<JobView>,
}

/// How many finished jobs `GET /jobs` lists.
pub const LISTED_FINISHED_JOBS: usize = 20;

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    pub service: String,
    pub timestamp: String,
    pub agent: Option<AgentInfo>,
    pub oauth: Option<OAuthStatus>,
    /// Every connected agent of the pool (the `agent` above is the best of them).
    pub agents: Vec<AgentInfo>,
    pub queued_jobs: usize,
    /// Agents connected that can take work now (not paused, login usable).
    #[serde(default)]
    pub agents_taking_work: usize,
    /// The subscription's usage window, when Claude has reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::UsageView>,
}

/// One pool in `GET /pools`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSummary {
    pub pool: String,
    pub status: HealthStatus,
    pub agents_online: usize,
    pub agents_taking_work: usize,
    pub queued_jobs: usize,
}

/// `GET /pools` (admin secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<PoolSummary>,
}

/// `GET /health` with a named caller's own secret (`RUNNER_SECRETS`): what a caller needs
/// to decide whether to send work here or fall back — the verdict, which agents can work
/// and what they offer, its own queued jobs, the usage window — and nothing of the
/// operator's (versions, logins, load) or of other callers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallerHealth {
    pub status: HealthStatus,
    pub service: String,
    pub timestamp: String,
    /// The connected agents: what a job may ask for (`agent_id`, `labels`) and whether
    /// each takes work now.
    pub agents: Vec<CallerAgent>,
    pub agents_taking_work: usize,
    /// This caller's own jobs waiting for an agent.
    pub queued_jobs: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::UsageView>,
}

/// One connected agent in [`CallerHealth`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallerAgent {
    pub agent_id: String,
    pub labels: crate::placement::Labels,
    pub takes_work: bool,
}

/// `GET /health` without the secret: the verdict alone (its status code says the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicHealth {
    pub status: HealthStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Unhealthy,
    Offline,
}

impl HealthStatus {
    /// 200 when work can run, 503 otherwise, so callers that only look at
    /// `response.ok` fall back correctly.
    pub fn http_status(self) -> u16 {
        match self {
            HealthStatus::Healthy | HealthStatus::Degraded => 200,
            HealthStatus::Unhealthy | HealthStatus::Offline => 503,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub connected: bool,
    pub agent_id: String,
    pub version: String,
    pub last_seen: String,
    pub running_jobs: usize,
    pub capacity: u32,
    /// The agent's Claude Code CLI (`claude --version`), when it reported one.
    #[serde(default)]
    pub claude_version: Option<String>,
    /// The labels it offers (`AGENT_LABELS`).
    #[serde(default)]
    pub labels: crate::placement::Labels,
    /// An operator paused it: it finishes its jobs and takes no new ones.
    #[serde(default)]
    pub paused: bool,
    /// It said it takes no new jobs: it is draining before it stops, or a `--one-job`
    /// agent has its job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// It cannot start jobs now, and why, with what to do (its DATA_DIR's disk is full:
    /// free space there; its user's process limit is reached): it handed a job back
    /// unstarted and takes none until it can again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cannot_start: Option<String>,
    /// Whether it can take a job now (connected, not paused or stopping, able to start
    /// jobs, its login usable), free slot or not.
    #[serde(default)]
    pub takes_work: bool,
    /// Its login as the edge judges it: `good`, `attention_soon` or `broken`.
    #[serde(default)]
    pub login: String,
}


#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits { max_timeout_ms: 3_600_000 };

    fn parse(v: serde_json::Value) -> Result<Submission, ApiError> {
        ExecuteRequest::parse(v.to_string().as_bytes(), None, LIMITS)
    }

    #[test]
    fn accepts_a_full_request_and_ignores_unknown_fields() {
        let s = parse(json!({
            "prompt": "hi", "timeout_ms": 5000, "allowed_tools": ["Read", "Bash(git log:*)"],
            "disallowed_tools": ["Write"], "max_turns": 3, "model": "claude-sonnet-4-5",
            "permission_mode": "acceptEdits", "append_system_prompt": "be brief",
            "session_id": "abc-123", "include_diff": true, "working_dir": "./a/b/",
            "idempotency_key": "k1", "something_new": {"x": 1}
        }))
        .unwrap();
        assert_eq!(s.spec.prompt, "hi");
        assert_eq!(s.spec.timeout_ms, 5000);
        assert_eq!(s.spec.working_dir.as_deref(), Some("a/b"));
        assert_eq!(s.spec.allowed_tools, vec!["Read", "Bash(git log:*)"]);
        assert_eq!(s.idempotency_key.as_deref(), Some("k1"));
    }

    /// The error said `letters, digits, \`-\`` while `_` is taken too and length is
    /// bounded: a caller fixing its id by the words would refuse good ids of its own.
    #[test]
    fn a_bad_session_id_is_refused_with_the_rule_the_edge_applies() {
        let ok = "a_B-9".repeat(25) + "abc";
        assert_eq!(ok.len(), crate::ids::MAX_JOB_ID);
        assert!(parse(json!({"prompt": "p", "session_id": ok})).is_ok());
        for bad in ["a b".to_string(), "x".repeat(crate::ids::MAX_JOB_ID + 1), String::new()] {
            let err = parse(json!({"prompt": "p", "session_id": bad})).unwrap_err().body.error;
            assert!(err.contains("letters, digits, `-` and `_`") && err.contains("at most 128"), "{err}");
        }
    }

    #[test]
    fn task_is_an_alias_of_prompt_and_defaults_apply() {
        let s = parse(json!({"task": "do it"})).unwrap();
        assert_eq!(s.spec.prompt, "do it");
        assert_eq!(s.spec.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert!(!s.spec.include_diff);
    }

    #[test]
    fn repository_fields_are_checked_and_carried() {
        let s = parse(json!({
            "prompt": "x", "repo_url": "octo/hello", "branch": "v1.0", "include_diff": true,
            "allow_stale": true, "push_branch": "claude/fix-1", "commit_message": "Fix it"
        }))
        .unwrap();
        assert_eq!(s.spec.repo_url.as_deref(), Some("https://github.com/octo/hello"));
        assert_eq!(s.spec.branch.as_deref(), Some("v1.0"));
        assert!(s.spec.include_diff && s.spec.allow_stale);
        assert_eq!(s.spec.push_branch.as_deref(), Some("claude/fix-1"));
        assert_eq!(s.spec.commit_message.as_deref(), Some("Fix it"));
        let s = parse(json!({"prompt": "x", "repo_url": "https://git.example.com:8443/a/b.git"})).unwrap();
        assert_eq!(s.spec.repo_url.as_deref(), Some("https://git.example.com:8443/a/b.git"));
        assert!(!s.spec.allow_stale && s.spec.push_branch.is_none());
    }

    #[test]
    fn header_idempotency_key_wins() {
        let body = json!({"prompt": "x", "idempotency_key": "body"}).to_string();
        let s = ExecuteRequest::parse(body.as_bytes(), Some("header"), LIMITS).unwrap();
        assert_eq!(s.idempotency_key.as_deref(), Some("header"));
    }

    #[test]
    fn rejects_bad_requests_with_400() {
        let cases = [
            json!({}),
            json!({"prompt": "   "}),
            json!({"prompt": 5}),
            json!({"prompt": "x", "timeout_ms": "soon"}),
            json!({"prompt": "x", "timeout_ms": -1}),
            json!({"prompt": "x", "timeout_ms": 0}),
            json!({"prompt": "x", "timeout_ms": 3_600_001u64}),
            json!({"prompt": "x", "allowed_tools": "Read"}),
            json!({"prompt": "x", "allowed_tools": ["--dangerously-skip-permissions"]}),
            json!({"prompt": "x", "model": "--help"}),
            json!({"prompt": "x", "max_turns": 0}),
            json!({"prompt": "x", "permission_mode": "yolo"}),
            json!({"prompt": "x", "session_id": "../../etc"}),
            json!({"prompt": "x", "include_diff": "yes"}),
            json!({"prompt": "x", "repo_url": "file:///etc"}),
            json!({"prompt": "x", "repo_url": "/srv/repo"}),
            json!({"prompt": "x", "repo_url": "git@github.com:a/b.git"}),
            json!({"prompt": "x", "repo_url": "https://u:t@github.com/a/b"}),
            json!({"prompt": "x", "repo_url": "-uhelp"}),
            json!({"prompt": "x", "repo_url": 5}),
            json!({"prompt": "x", "repo_url": "a/b", "branch": "--force"}),
            json!({"prompt": "x", "repo_url": "a/b", "branch": "a..b"}),
            json!({"prompt": "x", "repo_url": "a/b", "push_branch": "x y"}),
            json!({"prompt": "x", "repo_url": "a/b", "commit_message": ""}),
            json!({"prompt": "x", "repo_url": "a/b", "allow_stale": "yes"}),
            json!({"prompt": "x", "push_branch": "feature"}),
            json!({"prompt": "x", "commit_message": "no repo"}),
            json!({"prompt": "x", "working_dir": "../outside"}),
            json!({"prompt": "x", "working_dir": "a/../../b"}),
            json!({"prompt": "x", "working_dir": "/etc"}),
            json!({"prompt": "x", "working_dir": "~/x"}),
            // A folder name past NAME_MAX: the agent's `mkdir` would fail on the job's own
            // path (rev26-1: it was taken for the agent's disk, holding every agent back).
            json!({"prompt": "x", "working_dir": "a".repeat(256)}),
            json!({"prompt": "x", "working_dir": format!("ok/{}/b", "é".repeat(128))}),
            json!({"prompt": "x", "idempotency_key": ""}),
            json!({"prompt": "x", "append_system_prompt": "be brief\u{0}CLAUDE_CODE_OAUTH_TOKEN=x"}),
            json!([1, 2]),
        ];
        for case in cases {
            let err = parse(case.clone()).expect_err(&case.to_string());
            assert_eq!(err.status, 400, "{case}");
            assert_eq!(err.body.error_code, ErrorCode::InvalidRequest);
            assert!(!err.body.success);
        }
        for body in [&b"{not json"[..], b"", b"\xff\xfe"] {
            assert_eq!(ExecuteRequest::parse(body, None, LIMITS).unwrap_err().status, 400);
        }
    }

    #[test]
    fn error_bodies_carry_fallback_only_when_it_applies() {
        let off: serde_json::Value = serde_json::from_str(&ApiError::offline().to_json()).unwrap();
        assert_eq!(off["fallback"], json!(true));
        assert_eq!(off["error_code"], json!("RUNNER_OFFLINE"));
        assert_eq!(ApiError::offline().status, 503);
        let bad: serde_json::Value = serde_json::from_str(&ApiError::invalid("x").to_json()).unwrap();
        assert!(bad.get("fallback").is_none());
        assert_eq!(ApiError::new(ErrorCode::RunnerLost, "x").status, 502);
    }
}
