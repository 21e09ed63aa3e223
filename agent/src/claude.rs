//! Claude Code as the agent drives it: the command line a job becomes, and how its
//! stream-json output turns into a result. Pure code; [`crate::job`] does the running.
//!
//! The prompt goes in on stdin, not argv: argv caps one argument at 128 KiB, and a
//! prompt starting with `-` would read as an option. Every other value was validated by
//! the edge (never starting with `-`) and is passed as `--flag=value`.

use serde_json::Value;
use shared::contract::ErrorCode;
use shared::job::{JobResult, JobSpec};
use shared::usage::{UsageStatus, UsageWindow};

/// The Claude session a run is in, chosen by the agent before Claude starts: a new one
/// under an id the agent made (`--session-id`), or the one the job may resume (`--resume`
/// without `--fork-session` keeps its id). It is what the agent records as the job's
/// caller's (the agent's `sessions.rs`), never an id read from Claude's output: a process
/// that can trace Claude (`ptrace`; at `kernel.yama.ptrace_scope` 0 any process of the
/// agent's user, another caller's job) can write into its stdout before Claude's own
/// first line, and a job's commands can once tools run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    New(String),
    Resume(String),
}

impl Session {
    /// The session of a run of `spec`: the one it resumes (already allowed by the agent's
    /// records), else a new one named by `fresh` (16 random bytes) as a UUID v4 — the CLI
    /// takes nothing else for `--session-id`, and refuses an id whose transcript exists.
    pub fn of(spec: &JobSpec, fresh: impl FnOnce() -> [u8; 16]) -> Session {
        match &spec.session_id {
            Some(id) => Session::Resume(id.clone()),
            None => Session::New(uuid_v4(fresh())),
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Session::New(id) | Session::Resume(id) => id,
        }
    }
}

/// `bytes` as a random (version 4) UUID, in its canonical form (lowercase, hyphenated).
pub fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = shared::ids::hex(&bytes);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Arguments for one run (after the binary), in `session`.
pub fn args(spec: &JobSpec, default_model: Option<&str>, session: &Session) -> Vec<String> {
    let mut args: Vec<String> = ["-p", "--output-format", "stream-json", "--verbose"].map(String::from).to_vec();
    if let Some(model) = spec.model.as_deref().or(default_model) {
        args.push(format!("--model={model}"));
    }
    if let Some(n) = spec.max_turns {
        args.push(format!("--max-turns={n}"));
    }
    for tool in &spec.allowed_tools {
        args.push(format!("--allowedTools={tool}"));
    }
    for tool in &spec.disallowed_tools {
        args.push(format!("--disallowedTools={tool}"));
    }
    if let Some(mode) = &spec.permission_mode {
        args.push(format!("--permission-mode={mode}"));
    }
    if let Some(p) = &spec.append_system_prompt {
        args.push(format!("--append-system-prompt={p}"));
    }
    match session {
        Session::New(id) => args.push(format!("--session-id={id}")),
        Session::Resume(id) => args.push(format!("--resume={id}")),
    }
    if let Some(b) = spec.max_budget_usd {
        args.push(format!("--max-budget-usd={b}"));
    }
    args
}

/// What the run's stdout said, line by line.
#[derive(Debug, Default)]
pub struct Transcript {
    /// The session the agent started Claude in (None: Claude did not run).
    pub session: Option<Session>,
    /// Whether a `system`/`init` line named that session: Claude began (or resumed) it.
    pub confirmed: bool,
    /// The first `system`/`init` line's session, when it named another: a CLI that did not
    /// take the agent's id, or a line another process wrote into Claude's stdout (one that
    /// can trace Claude, see [`Session`]), or a job's command once tools run.
    pub named_other: Option<String>,
    /// The final `{"type":"result",…}` line.
    pub result: Option<Value>,
    /// Lines that were not JSON objects with a `type` (a crash, a wrapper's noise).
    pub garbage_lines: u64,
    /// The last of those, for the error message.
    pub last_garbage: Option<String>,
    pub lines: u64,
    /// The newest usage window Claude reported (`rate_limit_event`).
    pub usage: Option<UsageWindow>,
    /// The kind of API error the last `assistant` line named (its `error`:
    /// `authentication_failed`, `model_not_found`, …): the CLI prints one such line for
    /// the error that ends its run, before the result. Kept short.
    pub error_kind: Option<String>,
}

impl Transcript {
    /// The transcript of a run in `session`.
    pub fn of(session: Session) -> Transcript {
        Transcript { session: Some(session), ..Transcript::default() }
    }

    /// The session the job's result names: the one the agent started Claude in — a new one
    /// once Claude printed an `init` line (it began one), a resumed one always (also when
    /// Claude fails before its `init` line: the caller's session stays theirs).
    pub fn session_id(&self) -> Option<&str> {
        match self.session.as_ref()? {
            Session::Resume(id) => Some(id),
            Session::New(id) => (self.confirmed || self.named_other.is_some()).then_some(id.as_str()),
        }
    }

    /// The session to record as the job's caller's: [`Transcript::session_id`], unless every
    /// `init` line named another session (`Err`: the first one named) — then Claude did not
    /// run in the session the agent chose, and nothing is recorded. An `init` line naming
    /// another session beside one naming the agent's changes nothing: no one can take Claude's
    /// own line away, and the id recorded is the agent's either way.
    pub fn recorded(&self) -> Result<Option<&str>, &str> {
        match (&self.named_other, self.confirmed) {
            (Some(other), false) => Err(other),
            _ => Ok(self.session_id()),
        }
    }

    /// Takes one stdout line (already redacted). Returns the event to forward, if any.
    pub fn line(&mut self, line: &str) -> Option<Value> {
        match serde_json::from_str::<Value>(line.trim()) {
            Ok(value) => self.value(value),
            Err(_) => self.text(line),
        }
    }

    /// Takes one stdout line that is not JSON (already redacted).
    pub fn text(&mut self, line: &str) -> Option<Value> {
        self.lines += 1;
        let trimmed = line.trim();
        if !trimmed.is_empty() {
            self.garbage(trimmed.chars().take(300).collect());
        }
        None
    }

    fn garbage(&mut self, sample: String) {
        self.garbage_lines += 1;
        self.last_garbage = Some(sample);
    }

    /// Takes one stdout line that is JSON (already redacted). Returns the event to forward,
    /// if it is one (an object with a `type`).
    pub fn value(&mut self, value: Value) -> Option<Value> {
        self.lines += 1;
        if value.get("type").and_then(Value::as_str).is_none() {
            self.garbage(value.to_string().chars().take(300).collect());
            return None;
        }
        if value["type"] == "system" && value["subtype"] == "init" {
            if let (Some(session), Some(id)) = (&self.session, value.get("session_id").and_then(Value::as_str)) {
                if id == session.id() {
                    self.confirmed = true;
                } else if self.named_other.is_none() {
                    // Kept short: it goes into a log line.
                    self.named_other = Some(id.chars().take(128).collect());
                }
            }
        }
        if value["type"] == "assistant" {
            self.error_kind = value.get("error").and_then(Value::as_str).map(|kind| kind.chars().take(64).collect());
        }
        if value["type"] == "result" {
            self.result = Some(value.clone());
        }
        // (Pure code has no clock: `seen_at` stays 0; the runner reports the window with
        // the time to the edge.)
        if let Some(window) = UsageWindow::from_event(&value, 0) {
            self.usage = Some(window);
        }
        Some(value)
    }

    /// The rejected window the run ended on, when its result is a `USAGE_LIMIT`: the only
    /// rejected window the agent believes. A process that can trace Claude (see
    /// [`Session`]) can write a line into its stdout and end it before its own result; a
    /// rejected window from a run that ended otherwise is not taken as the account's. Nor
    /// is one from a Claude killed by a signal, whatever result line preceded its death:
    /// [`result`] makes that run no `USAGE_LIMIT`.
    pub fn used_up(&self, result: &JobResult) -> Option<&UsageWindow> {
        let ended_on_it = result.error_code == Some(ErrorCode::UsageLimit);
        self.usage.as_ref().filter(|u| ended_on_it && u.status == UsageStatus::Rejected)
    }

    /// The run ended because the usage window is used up: the CLI said so with a rejected
    /// `rate_limit_event` (2.1.197 and later), or with `api_error: "usage_limit_reached"`
    /// on its result (2.1.33x). A plain 429 without either is an ordinary API error. The
    /// rejected window counts only for a result that is a 429 itself: a process that can
    /// trace Claude can write the line into its stdout, and then have the run end on
    /// another error of Claude's own (on SIGINT the CLI prints `error_during_execution`).
    fn usage_limit(&self, result: &Value) -> Option<Option<shared::Millis>> {
        let a_429 = result.get("api_error_status").and_then(Value::as_u64) == Some(429);
        let rejected = self.usage.as_ref().filter(|u| a_429 && u.status == UsageStatus::Rejected);
        let said = result.get("api_error").and_then(Value::as_str) == Some("usage_limit_reached");
        // The reset the API named, when it named one.
        (rejected.is_some() || said).then(|| rejected.and_then(|u| u.resets_at))
    }
}

/// How the run ended, as the job runner saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    Exited(Option<i32>),
    TimedOut { after_ms: u64 },
    /// `timeout_ms` passed before Claude got its prompt (the checkout, the refresh gate, a
    /// start stuck on its record or the launcher, a suspend took it all): Claude never ran. TIMEOUT, as the edge itself would end the
    /// job at its deadline, with words that do not say it ran and was stopped.
    TimedOutUnstarted { after_ms: u64 },
    Cancelled { reason: String },
    /// The agent itself is shutting down: the caller should fall back, not give up.
    AgentStopping,
    /// The agent is shutting down before Claude got its prompt (the checkout, the refresh
    /// gate, the start rule, a start stuck on its record or the launcher): Claude never
    /// ran, and the task may be sent again as it is.
    AgentStoppingUnstarted,
    SpawnFailed(String),
    /// The agent could not prepare the run (the durable "started" marker): Claude never
    /// got its prompt.
    NotStarted(String),
    /// Claude could not be started for want of processes or memory (`EAGAIN`, `ENOMEM`:
    /// the user's process limit, held full by other processes, or the machine's memory):
    /// it never ran, and may start later or elsewhere.
    NoRoom(String),
}

/// Whether a Claude that exited with `code` ended by itself, not by a signal: killed by
/// one, it has no code; exiting on one it caught, the code is 128 and the signal's number,
/// as a shell reports a death by signal — the CLI (2.1.197) exits 143 on SIGTERM and 129
/// on SIGHUP, printing no result of its own.
fn exited_by_itself(code: Option<i32>) -> bool {
    code.is_some_and(|c| (0..128).contains(&c))
}

/// Whether the run ended because Claude could not authenticate, from what the CLI states
/// rather than from its words: the API's status (`api_error_status`: 401; 403 when the CLI
/// calls it a login failure — a revoked token, an organisation that disallows OAuth),
/// else, with no API answer (no credentials at all), the kind the CLI gave the error
/// (`kind`, [`Transcript::error_kind`]). Its texts hold the caller's words (a 404's
/// "There's an issue with the selected model (<model>)"), and the CLI's own kind does too
/// at times (it calls any error whose message says `x-api-key` a login failure, a 404
/// naming such a model included): a caller must not put the agent into "needs login"
/// for everyone. Only a CLI that states neither is read by its text, and then only by
/// the fixed words it opens with.
fn is_auth_failure(result: &Value, kind: Option<&str>) -> bool {
    let says_auth = |kind: &str| matches!(kind, "authentication_failed" | "oauth_org_not_allowed");
    match (result.get("api_error_status").and_then(Value::as_u64), kind) {
        (Some(401), _) => true,
        (Some(403) | None, Some(kind)) => says_auth(kind),
        (Some(403) | None, None) => {
            let text = result.get("result").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
            ["failed to authenticate", "not logged in", "invalid api key", "oauth token has expired", "oauth token revoked", "please run /login", "api error: 401"]
                .iter()
                .any(|opening| text.starts_with(opening))
        }
        (Some(_), _) => false,
    }
}

/// Caps a text at `max` bytes, keeping its head and tail, with a marker in between.
/// Returns it with the number of bytes left out (0 when it fit).
pub fn cap(text: String, max: usize) -> (String, u64) {
    if text.len() <= max {
        return (text, 0);
    }
    let (head, tail) = (shared::text::truncate(&text, max / 2), shared::text::tail(&text, max / 2));
    let cut = text.len() - head.len() - tail.len();
    (format!("{head}\n[… {cut} bytes cut by claude-runner …]\n{tail}"), cut as u64)
}

/// Largest `output` or `error` a result carries.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// Turns what happened into the job's result. `success` follows Claude's `is_error`, not
/// the exit code.
pub fn result(transcript: &Transcript, ending: Ending, stderr_tail: &str, duration_ms: u64) -> JobResult {
    let mut r = JobResult { duration_ms, session_id: transcript.session_id().map(String::from), ..JobResult::default() };
    if let Some(res) = &transcript.result {
        r.output = res.get("result").and_then(Value::as_str).unwrap_or_default().to_string();
        r.num_turns = res.get("num_turns").and_then(Value::as_u64).map(|n| n.min(u32::MAX as u64) as u32);
        r.cost_usd = res.get("total_cost_usd").and_then(Value::as_f64);
    }
    // Claude's session ids are UUIDs; anything else long is not one worth carrying (a
    // resumed id was checked against the records: plain, and short).
    r.session_id = r.session_id.filter(|id| id.len() <= 128);
    let stderr_hint = || {
        let t = stderr_tail.trim();
        if t.is_empty() { String::new() } else { format!("; stderr: {}", shared::text::tail(t, 500)) }
    };
    match ending {
        Ending::TimedOut { after_ms } => {
            r.error = Some(format!("Claude did not finish within timeout_ms ({after_ms} ms) and was stopped; raise timeout_ms or split the task"));
            r.error_code = Some(ErrorCode::Timeout);
        }
        Ending::TimedOutUnstarted { after_ms } => {
            r.error = Some(format!(
                "not started: timeout_ms ({after_ms} ms) passed before Claude was started (the wait for the repository, the login refresh, a start stuck on the runner's disk or its launcher, or a suspend of the runner machine took it all), so Claude never ran; run it again, with a longer timeout_ms"
            ));
            r.error_code = Some(ErrorCode::Timeout);
        }
        Ending::Cancelled { reason } => {
            r.error = Some(format!("cancelled: {reason}"));
            r.error_code = Some(ErrorCode::Cancelled);
        }
        Ending::AgentStopping => {
            r.error = Some("the agent on the runner machine stopped while Claude was running; run the task again or elsewhere".into());
            r.error_code = Some(ErrorCode::RunnerLost);
        }
        Ending::AgentStoppingUnstarted => {
            r.error = Some("not started: the agent on the runner machine stopped before Claude was started, so Claude never ran; run the task again as it is, here or elsewhere".into());
            r.error_code = Some(ErrorCode::RunnerLost);
        }
        Ending::SpawnFailed(e) => {
            r.error = Some(e);
            r.error_code = Some(ErrorCode::ClaudeError);
        }
        Ending::NotStarted(e) => {
            r.error = Some(e);
            r.error_code = Some(ErrorCode::InternalError);
        }
        Ending::NoRoom(e) => {
            r.error = Some(format!("{e}; it never ran: retry"));
            r.error_code = Some(ErrorCode::InternalError);
        }
        Ending::Exited(code) => {
            r.exit_code = code;
            match &transcript.result {
                // Killed by a signal the agent did not send (a timeout or a cancel is not
                // `Exited`): whatever its last line says, no success. Another process of the
                // agent's user can write a result line where Claude's output goes (README
                // "What a job can see") and kill Claude before its own.
                Some(_) if code.is_none() => {
                    (r.output, r.num_turns, r.cost_usd) = (String::new(), None, None);
                    r.error = Some(format!("Claude was killed by a signal before it exited; its result is not trusted{}", stderr_hint()));
                    r.error_code = Some(ErrorCode::ClaudeError);
                }
                Some(res) => {
                    let is_error = res.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                    let subtype = res.get("subtype").and_then(Value::as_str).unwrap_or("");
                    if is_error || (subtype != "success" && !subtype.is_empty()) {
                        // Some failures (an unknown --resume, too many turns) carry no
                        // `result` text, only an `errors` list.
                        let errors: Vec<&str> = res
                            .get("errors")
                            .and_then(Value::as_array)
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        let detail = match (r.output.is_empty(), errors.is_empty()) {
                            (false, _) => r.output.clone(),
                            (true, false) => format!("{subtype}: {}", errors.join("; ")),
                            (true, true) => subtype.to_string(),
                        };
                        let api_status = res.get("api_error_status").and_then(Value::as_u64);
                        // Both believed from a Claude that exited by itself only: a process
                        // that can trace Claude (ptrace; at `ptrace_scope` 0 any process of
                        // the agent's user, a job's) can write these lines into its stdout
                        // and then end it before it prints anything of its own; a used-up
                        // window holds the agent's work for days, a login failure for
                        // everyone until someone logs in again. The CLI ends a run on either
                        // with exit code 1.
                        let usage_limit = transcript.usage_limit(res);
                        let auth_failure = usage_limit.is_none() && is_auth_failure(res, transcript.error_kind.as_deref());
                        if (usage_limit.is_some() || auth_failure) && !exited_by_itself(code) {
                            let how = code.map_or("killed".to_string(), |c| format!("exit code {c}"));
                            let (said, taken) = match usage_limit {
                                Some(_) => ("the usage window is used up", "the usage limit"),
                                None => ("Claude could not authenticate", "a login failure"),
                            };
                            r.error = Some(format!(
                                "Claude was ended by a signal ({how}) after output saying {said} ({detail}); not taken as {taken}, \
                                 as a process that can trace Claude can write that output and end it (see what ended it in the runner's log)"
                            ));
                            r.error_code = Some(ErrorCode::ClaudeError);
                        } else if let Some(retry_at) = usage_limit {
                            let until = retry_at.map(shared::time::rfc3339);
                            r.error = Some(format!(
                                "the Claude subscription's usage window is used up ({detail}); retry after {}, or run the task elsewhere",
                                until.as_deref().unwrap_or("its reset")
                            ));
                            r.error_code = Some(ErrorCode::UsageLimit);
                            r.retry_at = until;
                        } else if auth_failure {
                            r.error = Some(format!("Claude could not authenticate (OAuth: {detail}); log in again from the edge's page, with `claude-runner login`, or `claude auth login` on the runner machine (or renew CLAUDE_CODE_OAUTH_TOKEN)"));
                            r.error_code = Some(ErrorCode::RunnerOauthError);
                        } else if subtype == "error_max_turns" {
                            r.error = Some(format!("Claude stopped at max_turns ({detail}); raise max_turns or split the task"));
                            r.error_code = Some(ErrorCode::MaxTurns);
                        } else if subtype == "error_max_budget_usd" {
                            r.error = Some(format!("Claude stopped at max_budget_usd ({detail}); raise max_budget_usd or split the task"));
                            r.error_code = Some(ErrorCode::BudgetExceeded);
                        } else {
                            r.error = Some(format!("Claude reported an error: {detail}"));
                            r.error_code = Some(ErrorCode::ClaudeError);
                            // An overloaded or failing API may answer the same request later.
                            r.retryable = Some(matches!(api_status, Some(408 | 429 | 500..=599)));
                        }
                    } else {
                        r.success = true;
                    }
                }
                None => {
                    let what = match code {
                        Some(c) => format!("exited with code {c}"),
                        None => "was killed by a signal".to_string(),
                    };
                    let garbage = transcript
                        .last_garbage
                        .as_ref()
                        .map(|g| format!("; it printed non-stream-json output such as `{g}`"))
                        .unwrap_or_default();
                    r.error = Some(format!("Claude {what} without a result{garbage}{}", stderr_hint()));
                    r.error_code = Some(ErrorCode::ClaudeError);
                }
            }
        }
    }
    if !r.success {
        r.retryable = r.retryable.or(r.error_code.map(ErrorCode::retryable));
    }
    let (output, cut) = cap(std::mem::take(&mut r.output), MAX_OUTPUT_BYTES);
    r.output = output;
    if cut > 0 {
        r.truncated = true;
        r.truncated_bytes = Some(cut);
    }
    r.error = r.error.map(|e| cap(e, 64 * 1024).0);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> JobSpec {
        JobSpec {
            prompt: "hi".into(),
            repo_url: None,
            branch: None,
            working_dir: None,
            timeout_ms: 1000,
            allowed_tools: vec!["Read".into(), "Bash(git log:*)".into()],
            disallowed_tools: vec!["Write".into()],
            max_turns: Some(3),
            model: None,
            permission_mode: Some("acceptEdits".into()),
            append_system_prompt: Some("be brief".into()),
            session_id: Some("abc".into()),
            include_diff: false,
            max_budget_usd: Some(0.5),
            allow_stale: false,
            push_branch: None,
            commit_message: None,
        }
    }

    #[test]
    fn maps_options_to_flags() {
        let a = args(&spec(), Some("claude-default"), &Session::of(&spec(), || unreachable!("a resumed session is not made")));
        assert_eq!(&a[..4], ["-p", "--output-format", "stream-json", "--verbose"]);
        for flag in [
            "--model=claude-default",
            "--max-turns=3",
            "--allowedTools=Read",
            "--allowedTools=Bash(git log:*)",
            "--disallowedTools=Write",
            "--permission-mode=acceptEdits",
            "--append-system-prompt=be brief",
            "--resume=abc",
            "--max-budget-usd=0.5",
        ] {
            assert!(a.contains(&flag.to_string()), "{flag} in {a:?}");
        }
        assert!(!a.iter().any(|x| x.contains("hi")), "the prompt is not in argv");
        let mut s = spec();
        s.model = Some("opus".into());
        assert!(args(&s, Some("claude-default"), &Session::Resume("abc".into())).contains(&"--model=opus".to_string()));
        // A new session: the agent names it, as a UUID v4, and nothing is resumed.
        s.session_id = None;
        let session = Session::of(&s, || [0xff; 16]);
        assert_eq!(session, Session::New("ffffffff-ffff-4fff-bfff-ffffffffffff".into()));
        let a = args(&s, None, &session);
        assert!(a.contains(&"--session-id=ffffffff-ffff-4fff-bfff-ffffffffffff".to_string()), "{a:?}");
        assert!(!a.iter().any(|x| x.starts_with("--resume")), "{a:?}");
        assert_eq!(uuid_v4([0; 16]), "00000000-0000-4000-8000-000000000000");
    }

    fn transcript(lines: &[Value]) -> Transcript {
        in_session(Session::New("s1".into()), lines)
    }

    fn in_session(session: Session, lines: &[Value]) -> Transcript {
        let mut t = Transcript::of(session);
        for l in lines {
            t.line(&l.to_string());
        }
        t
    }

    #[test]
    fn success_follows_is_error_not_the_exit_code() {
        let ok = transcript(&[
            json!({"type":"system","subtype":"init","session_id":"s1"}),
            json!({"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":2,"total_cost_usd":0.5,"session_id":"s1"}),
        ]);
        let r = result(&ok, Ending::Exited(Some(0)), "", 10);
        assert!(r.success);
        assert_eq!(r.output, "done");
        assert_eq!(r.num_turns, Some(2));
        assert_eq!(r.cost_usd, Some(0.5));
        assert_eq!(r.session_id.as_deref(), Some("s1"));

        let err = transcript(&[json!({"type":"result","subtype":"success","is_error":true,"result":"API Error: 500"})]);
        let r = result(&err, Ending::Exited(Some(0)), "", 10);
        assert!(!r.success);
        assert_eq!(r.error_code, Some(ErrorCode::ClaudeError));

        let turns = transcript(&[json!({"type":"result","subtype":"error_max_turns","is_error":true,"errors":["Reached maximum number of turns (1)"]})]);
        let r = result(&turns, Ending::Exited(Some(1)), "", 1);
        assert!(!r.success);
        assert_eq!(r.error_code, Some(ErrorCode::MaxTurns));
        assert_eq!(r.retryable, Some(false));
        assert!(r.error.unwrap().contains("error_max_turns: Reached maximum number of turns (1)"));
    }

    /// The session a job is in is the one the agent started Claude in, whatever its output
    /// names: another process can write a forged `init` line into Claude's stdout before
    /// Claude's own, and a job's commands can once tools run.
    #[test]
    fn the_session_is_the_one_the_agent_started_claude_in() {
        let new = || Session::New("mine".into());
        let ok = |id: &str| json!({"type":"result","subtype":"success","is_error":false,"result":"ok","session_id":id});
        let init = |id: &str| json!({"type":"system","subtype":"init","session_id":id});
        // A forged first line, then Claude's own: the agent's session, recorded.
        let forged = in_session(new(), &[init("theirs"), init("mine"), ok("theirs")]);
        assert_eq!(result(&forged, Ending::Exited(Some(0)), "", 1).session_id.as_deref(), Some("mine"));
        assert_eq!((forged.recorded(), forged.named_other.as_deref()), (Ok(Some("mine")), Some("theirs")));
        // Claude's own, then lines naming another (a job's command): the same.
        let claimed = in_session(new(), &[init("mine"), init("theirs"), json!({"type":"assistant","session_id":"theirs","message":{"content":[]}}), ok("theirs")]);
        assert_eq!(result(&claimed, Ending::Exited(Some(0)), "", 1).session_id.as_deref(), Some("mine"));
        assert_eq!(claimed.recorded(), Ok(Some("mine")));
        // Only another session named (a CLI that did not take the agent's id): the result
        // names the agent's, and nothing is recorded.
        let other = in_session(new(), &[init("theirs"), ok("theirs")]);
        assert_eq!(result(&other, Ending::Exited(Some(0)), "", 1).session_id.as_deref(), Some("mine"));
        assert_eq!(other.recorded(), Err("theirs"));
        // No init line: Claude began no session (it failed first).
        let none = in_session(new(), &[ok("theirs")]);
        assert_eq!((result(&none, Ending::Exited(Some(1)), "", 1).session_id, none.recorded()), (None, Ok(None)));
        // A resumed run is in its session, also when Claude fails before its init line.
        let resumed = in_session(Session::Resume("old".into()), &[json!({"type":"result","subtype":"error_during_execution","is_error":true,"errors":["No conversation found"],"session_id":"theirs"})]);
        assert_eq!(result(&resumed, Ending::Exited(Some(1)), "", 1).session_id.as_deref(), Some("old"));
        assert_eq!(resumed.recorded(), Ok(Some("old")));
        let renamed = in_session(Session::Resume("old".into()), &[init("forked")]);
        assert_eq!(result(&renamed, Ending::Exited(Some(0)), "", 1).session_id.as_deref(), Some("old"));
        assert_eq!(renamed.recorded(), Err("forked"));
        // A run that never started is in no session.
        assert_eq!(result(&Transcript::default(), Ending::SpawnFailed("x".into()), "", 1).session_id, None);
    }

    /// A Claude killed by a signal the agent did not send (a timeout or a cancel has an
    /// ending of its own) is no success, whatever its last line says: another process of
    /// the agent's user can write a result line into its output and kill it.
    #[test]
    fn a_claude_killed_by_a_signal_is_never_a_success() {
        let forged = transcript(&[
            json!({"type":"system","subtype":"init","session_id":"s1"}),
            json!({"type":"result","subtype":"success","is_error":false,"result":"FORGED","num_turns":1}),
        ]);
        let r = result(&forged, Ending::Exited(None), "", 1);
        assert!(!r.success, "{r:?}");
        assert_eq!((r.error_code, r.exit_code), (Some(ErrorCode::ClaudeError), None));
        assert!(r.error.as_deref().is_some_and(|e| e.contains("killed by a signal")), "{r:?}");
        assert!(!r.output.contains("FORGED"), "the output of a killed run is not passed on: {r:?}");
        // The same line from a Claude that exited by itself is its answer.
        assert!(result(&forged, Ending::Exited(Some(0)), "", 1).success);
    }

    #[test]
    fn failure_classes_say_whether_a_retry_may_help() {
        let budget = transcript(&[json!({"type":"result","subtype":"error_max_budget_usd","is_error":true,"errors":["Reached maximum budget ($0.01)"]})]);
        let r = result(&budget, Ending::Exited(Some(1)), "", 1);
        assert_eq!((r.error_code, r.retryable), (Some(ErrorCode::BudgetExceeded), Some(false)));
        let overloaded = transcript(&[json!({"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"API Error: 529 overloaded"})]);
        let r = result(&overloaded, Ending::Exited(Some(1)), "", 1);
        assert_eq!((r.error_code, r.retryable), (Some(ErrorCode::ClaudeError), Some(true)));
        let unknown = transcript(&[json!({"type":"result","subtype":"error_during_execution","is_error":true,"errors":["No conversation found"]})]);
        assert_eq!(result(&unknown, Ending::Exited(Some(1)), "", 1).retryable, Some(false));
        assert_eq!(result(&Transcript::default(), Ending::TimedOut { after_ms: 5 }, "", 1).retryable, Some(true));
        assert_eq!(result(&Transcript::default(), Ending::TimedOutUnstarted { after_ms: 5 }, "", 1).retryable, Some(true));
        assert_eq!(result(&Transcript::default(), Ending::AgentStoppingUnstarted, "", 1).retryable, Some(true));
        assert_eq!(result(&overloaded, Ending::Exited(Some(1)), "", 1).retry_at, None);
    }

    #[test]
    fn a_used_up_usage_window_is_a_usage_limit_with_its_reset() {
        // As the real CLI (2.1.197) prints a 429 whose unified status is rejected.
        let lines = [
            json!({"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1796150081,"rateLimitType":"five_hour","isUsingOverage":false}}),
            json!({"type":"assistant","message":{"model":"<synthetic>","content":[{"type":"text","text":"You've hit your session limit · resets 6:34pm (UTC)"}]},"error":"rate_limit"}),
            json!({"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"You've hit your session limit · resets 6:34pm (UTC)"}),
        ];
        let t = transcript(&lines);
        let r = result(&t, Ending::Exited(Some(1)), "", 1);
        assert_eq!(r.error_code, Some(ErrorCode::UsageLimit));
        assert_eq!(r.retry_at.as_deref(), Some("2026-12-01T18:34:41Z"));
        assert_eq!(r.retryable, Some(true));
        // 2.1.33x also names it on the result line.
        let named = transcript(&[json!({"type":"result","subtype":"success","is_error":true,"api_error_status":429,"api_error":"usage_limit_reached","result":"You've hit your 5-hour limit"})]);
        assert_eq!(result(&named, Ending::Exited(Some(1)), "", 1).error_code, Some(ErrorCode::UsageLimit));
        // The same lines from a Claude ended by a signal (a process that can trace Claude
        // can write them into its stdout, then kill it): not the usage limit, and not
        // believed as the account's.
        // Killed (no exit code), or exiting on one it caught: the CLI (2.1.197) exits 143
        // on SIGTERM and 129 on SIGHUP, printing no result of its own.
        for t in [&t, &named] {
            for ending in [Ending::Exited(None), Ending::Exited(Some(143)), Ending::Exited(Some(129))] {
                let r = result(t, ending.clone(), "", 1);
                assert_eq!(r.error_code, Some(ErrorCode::ClaudeError), "{ending:?}: {r:?}");
                assert!(r.error.as_deref().is_some_and(|e| e.contains("by a signal")), "{r:?}");
                assert!(t.used_up(&r).is_none());
            }
        }
        // A rejected line (written by a job), then Claude's own result of another error (on
        // SIGINT the CLI prints `error_during_execution` and exits 0; or max_turns): the run
        // did not end on the usage limit, whose result is a 429.
        for own in [
            json!({"type":"result","subtype":"error_during_execution","is_error":true,"errors":["interrupted"]}),
            json!({"type":"result","subtype":"error_max_turns","is_error":true,"errors":["Reached maximum number of turns (1)"]}),
        ] {
            let t = transcript(&[lines[0].clone(), own]);
            for code in [0, 1] {
                let r = result(&t, Ending::Exited(Some(code)), "", 1);
                assert_ne!(r.error_code, Some(ErrorCode::UsageLimit), "{r:?}");
                assert!(t.used_up(&r).is_none());
            }
        }
        // A 429 that is not about the subscription's window (a plain rate limit) is not.
        let plain = transcript(&[json!({"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"API Error: 429 rate limited"})]);
        let r = result(&plain, Ending::Exited(Some(1)), "", 1);
        assert_eq!((r.error_code, r.retryable), (Some(ErrorCode::ClaudeError), Some(true)));
        // A warning is kept but is no failure.
        let warned = transcript(&[
            json!({"type":"rate_limit_event","rate_limit_info":{"status":"allowed_warning","resetsAt":1796150108,"utilization":0.91}}),
            json!({"type":"result","subtype":"success","is_error":false,"result":"fine"}),
        ]);
        assert!(result(&warned, Ending::Exited(Some(0)), "", 1).success);
        assert_eq!(warned.usage.unwrap().utilization, Some(0.91));
    }

    /// A failed run, as the real CLI (2.1.197) prints one: the synthetic assistant line
    /// naming the error's kind (`None`: an older CLI that names none), then the result with
    /// the API's status (`None`: no API answer, or an older CLI) and the text.
    fn failed(kind: Option<&str>, status: Option<u64>, text: &str) -> Option<ErrorCode> {
        let mut assistant = json!({"type":"assistant","message":{"model":"<synthetic>","role":"assistant","content":[{"type":"text","text":text}]}});
        if let Some(kind) = kind {
            assistant["error"] = json!(kind);
        }
        let result_line = json!({"type":"result","subtype":"success","is_error":true,"api_error_status":status,"result":text});
        result(&transcript(&[assistant, result_line]), Ending::Exited(Some(1)), "", 1).error_code
    }

    #[test]
    fn auth_failures_are_told_apart() {
        let auth = Some(ErrorCode::RunnerOauthError);
        // The CLI's own words for a 401 with CLAUDE_CODE_OAUTH_TOKEN (tests/real_claude.rs).
        assert_eq!(failed(Some("authentication_failed"), Some(401), "Not logged in · Please run /login"), auth);
        // No credentials at all: no API answer, the CLI names the kind.
        assert_eq!(failed(Some("authentication_failed"), None, "Not logged in · Please run /login"), auth);
        // A revoked token is a 403; so is an organisation that disallows OAuth.
        assert_eq!(failed(Some("authentication_failed"), Some(403), "OAuth token revoked · Please run /login"), auth);
        assert_eq!(failed(Some("oauth_org_not_allowed"), Some(403), "Your organization has disabled Claude subscription access for Claude Code"), auth);
        // An older CLI that names neither: only its own fixed opening counts.
        let old = transcript(&[json!({"type":"result","subtype":"success","is_error":true,"result":"Failed to authenticate. API Error: 401"})]);
        assert_eq!(result(&old, Ending::Exited(Some(1)), "", 1).error_code, auth);
    }

    /// A login failure puts the agent into "needs login" for every caller, across restarts,
    /// until someone logs in again. A process that can trace Claude (ptrace, at
    /// `ptrace_scope` 0 any process of the agent's user) can write the CLI's 401 lines into
    /// its stdout and then SIGTERM it: the CLI (2.1.197) exits 143 on SIGTERM and 129 on
    /// SIGHUP, printing nothing of its own. As for the usage window, a login failure is
    /// believed only from a Claude that exited by itself.
    #[test]
    fn a_login_failure_is_believed_only_from_a_claude_that_exited_by_itself() {
        let assistant = json!({"type":"assistant","message":{"model":"<synthetic>","role":"assistant","content":[{"type":"text","text":"Not logged in · Please run /login"}]},"error":"authentication_failed"});
        let forged = transcript(&[assistant, json!({"type":"result","subtype":"success","is_error":true,"api_error_status":401,"result":"Not logged in · Please run /login"})]);
        let old = transcript(&[json!({"type":"result","subtype":"success","is_error":true,"result":"Failed to authenticate. API Error: 401"})]);
        for t in [&forged, &old] {
            assert_eq!(result(t, Ending::Exited(Some(1)), "", 1).error_code, Some(ErrorCode::RunnerOauthError));
            for ending in [Ending::Exited(None), Ending::Exited(Some(143)), Ending::Exited(Some(129))] {
                let r = result(t, ending.clone(), "", 1);
                assert_eq!(r.error_code, Some(ErrorCode::ClaudeError), "{ending:?}: {r:?}");
                assert!(!r.success, "{r:?}");
                assert!(r.error.as_deref().is_some_and(|e| e.contains("signal")), "{ending:?}: {r:?}");
            }
        }
    }

    /// The caller names the model, and the CLI's answer to a 404 puts the name in its text:
    /// words of a login failure there made any caller put the agent into "needs login" for
    /// everyone, across restarts (hostile review of the output, 1).
    #[test]
    fn a_callers_words_in_an_error_are_no_auth_failure() {
        let claude_error = Some(ErrorCode::ClaudeError);
        // As 2.1.197 prints it for `"model": "nope failed to authenticate"`.
        let text = "There's an issue with the selected model (nope failed to authenticate · please run /login). It may not exist or you may not have access to it.";
        assert_eq!(failed(Some("model_not_found"), Some(404), text), claude_error);
        // A model named with `x-api-key`: the CLI itself calls that 404 a login failure, in
        // its fixed words, but the API's status says what it was.
        assert_eq!(failed(Some("authentication_failed"), Some(404), "Not logged in · Please run /login"), claude_error);
        // A 403 the CLI does not call one (an API key refused by its organisation).
        assert_eq!(failed(Some("invalid_request"), Some(403), "Your organization has disabled API key authentication · Failed to authenticate"), claude_error);
        // Without a status or a kind, the words are read only at the text's start.
        let old = transcript(&[json!({"type":"result","subtype":"success","is_error":true,"result":"API Error: 404 model: nope failed to authenticate"})]);
        assert_eq!(result(&old, Ending::Exited(Some(1)), "", 1).error_code, claude_error);
    }

    #[test]
    fn garbage_and_crashes_become_clear_failures() {
        let mut t = Transcript::default();
        assert!(t.line("Segmentation fault").is_none());
        assert!(t.line("[1,2]").is_none());
        assert!(t.line(r#"{"no_type":1}"#).is_none());
        let r = result(&t, Ending::Exited(Some(139)), "core dumped", 1);
        assert!(!r.success);
        let e = r.error.unwrap();
        assert!(e.contains("139") && e.contains("no_type") && e.contains("core dumped"), "{e}");
    }

    #[test]
    fn caps_huge_output_on_char_boundaries() {
        let big = "é".repeat(MAX_OUTPUT_BYTES);
        let (capped, cut) = cap(big, MAX_OUTPUT_BYTES);
        assert!(capped.len() < MAX_OUTPUT_BYTES + 100);
        assert_eq!(cut, MAX_OUTPUT_BYTES as u64, "half of the 2 MiB was left out");
        assert_eq!(cap("short".into(), 10), ("short".to_string(), 0));
        assert!(capped.contains("bytes cut"));
    }
}
