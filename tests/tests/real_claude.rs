//! The real Claude Code CLI behind the real agent and the native edge: what the stand-in
//! only imitates. Runs when `CLAUDE_RUNNER_REAL_CLAUDE` names the CLI (e.g.
//! `node_modules/.bin/claude` after `npm install @anthropic-ai/claude-code@2.1.197`);
//! otherwise each test prints a one-line notice and passes.
//!
//! The agent's `CLAUDE_BIN` is a small wrapper this file writes: it runs the CLI inside a new
//! network namespace that has only loopback (`unshare -n`, so nothing can leave the machine
//! even if the CLI tries), next to the fake Anthropic API `tests/fake-anthropic/server.py`
//! started in the same namespace. The fake logs every request it gets, so the tests can see
//! what the job's options became on the wire. Needs root (or unprivileged user
//! namespaces: then `unshare -rn`), `ip` (iproute2) and Python 3.

use harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the fake answers (tests/fake-anthropic/server.py's default).
const FAKE_TEXT: &str = "Hello from the fake Anthropic API.";

/// The CLI to test, or None (after a notice) when the tests are not wanted.
fn real_claude() -> Option<PathBuf> {
    let Some(path) = std::env::var_os("CLAUDE_RUNNER_REAL_CLAUDE") else {
        eprintln!("real Claude Code test not run: set CLAUDE_RUNNER_REAL_CLAUDE to the `claude` binary to run it");
        return None;
    };
    let path = PathBuf::from(path);
    let path = path.canonicalize().unwrap_or_else(|e| panic!("CLAUDE_RUNNER_REAL_CLAUDE={}: {e}", path.display()));
    assert!(
        unshare_flags().is_some(),
        "neither `unshare -n` (root) nor `unshare -rn` (user namespaces) works here; the real CLI only runs inside a network namespace"
    );
    let python = std::process::Command::new("python3").arg("--version").output();
    assert!(python.is_ok_and(|o| o.status.success()), "python3 is needed for tests/fake-anthropic/server.py");
    Some(path)
}

/// How to enter a new network namespace: `-n` as root, else `-rn` (a user namespace that
/// maps the caller to root, where user namespaces are allowed).
fn unshare_flags() -> Option<&'static str> {
    static FLAGS: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *FLAGS.get_or_init(|| {
        ["-n", "-rn"].into_iter().find(|flags| {
            std::process::Command::new("unshare")
                .args([flags, "sh", "-c", "PATH=$PATH:/usr/sbin:/sbin; ip link set lo up"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

/// An edge, an agent whose `claude` is the real CLI in a namespace, and the fake's logs.
struct Real {
    _edge: EdgeServer,
    agent: AgentProc,
    client: Client,
    dir: TempDir,
}

impl Real {
    /// `mode` is the fake's scenario: `ok`, `unauthorized`, `not_found`, `tool_use`, `stall`,
    /// `rate_limited` or `warning`.
    async fn start(claude: &Path, mode: &str) -> Real {
        Real::start_with(claude, mode, None, &[]).await
    }

    /// With the fake's tool call (`tool_use` mode) and more agent settings.
    async fn start_with(claude: &Path, mode: &str, tool: Option<&Value>, agent_env: &[(&str, &str)]) -> Real {
        Real::start_answering(claude, mode, tool, agent_env, 1).await
    }

    /// With the fake's text answer repeated `text_repeat` times.
    async fn start_answering(claude: &Path, mode: &str, tool: Option<&Value>, agent_env: &[(&str, &str)], text_repeat: usize) -> Real {
        let dir = TempDir::new("real-claude");
        let wrapper = write_wrapper(dir.path(), claude, mode, tool, text_repeat);
        let keys = Keys::new(&["spark"]);
        let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
        let mut opts = AgentOpts::for_edge(&edge, "spark");
        for (k, v) in agent_env {
            opts = opts.env(k, v);
        }
        opts.claude_bin = wrapper;
        let agent = AgentProc::start(opts);
        let client = Client::new(&edge.url());
        client.wait_online().await;
        Real { _edge: edge, agent, client, dir }
    }

    /// Every request the fake API got so far, in order.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("the fake logs JSON lines"))
            .collect()
    }

    /// The message requests (POST /v1/messages…), bodies only.
    fn message_requests(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["method"] == "POST" && r["path"].as_str().is_some_and(|p| p.starts_with("/v1/messages")))
            .collect()
    }

    /// Logs for a failure message.
    fn logs(&self) -> String {
        let fake = std::fs::read_to_string(self.dir.path().join("fake.log")).unwrap_or_default();
        format!("agent log:\n{}\nfake API log:\n{fake}", self.agent.log())
    }

    async fn execute(&self, body: Value) -> Answer {
        let started = Instant::now();
        let a = self.client.execute(body).await;
        assert_eq!(a.status, 200, "{}\n{}", a.text, self.logs());
        eprintln!("job took {} ms end to end", started.elapsed().as_millis());
        a
    }
}

/// Writes the agent's `CLAUDE_BIN`: the real CLI in a new network namespace with the fake API.
fn write_wrapper(dir: &Path, claude: &Path, mode: &str, tool: Option<&Value>, text_repeat: usize) -> PathBuf {
    let server = repo_root().join("tests/fake-anthropic/server.py");
    assert!(server.exists(), "{} is missing", server.display());
    for p in [dir, claude, server.as_path()] {
        assert!(!p.display().to_string().contains('\''), "a quote in {} would break the wrapper", p.display());
    }
    let tool = tool.map(Value::to_string).unwrap_or_else(|| r#"{"name": "Read", "input": {"file_path": "/etc/hostname"}}"#.into());
    assert!(!tool.contains('\''), "a quote in the tool call would break the wrapper");
    let script = format!(
        r#"#!/bin/sh
# CLAUDE_BIN for tests/tests/real_claude.rs (written by the test): the real Claude Code CLI
# inside a new network namespace with only loopback, next to the fake Anthropic API started
# in the same namespace. The agent's argv and stdin (the prompt) pass through unchanged.
REAL_CLAUDE='{claude}'
FAKE_SERVER='{server}'
FAKE_DIR='{dir}'
FAKE_ANTHROPIC_MODE='{mode}'
FAKE_ANTHROPIC_TOOL='{tool}'
FAKE_ANTHROPIC_TEXT_REPEAT={text_repeat}
export REAL_CLAUDE FAKE_SERVER FAKE_DIR FAKE_ANTHROPIC_MODE FAKE_ANTHROPIC_TOOL FAKE_ANTHROPIC_TEXT_REPEAT
exec unshare {netns} /bin/sh -c '
PATH=$PATH:/usr/sbin:/sbin
ip link set lo up || {{ echo "claude-in-netns: cannot bring up loopback in the new namespace" >&2; exit 97; }}
run=$FAKE_DIR/run.$$
mkdir -p "$run/home" "$run/tmp"
python3 "$FAKE_SERVER" --port 0 --port-file "$run/port" --log "$FAKE_DIR/requests.jsonl" </dev/null >>"$FAKE_DIR/fake.log" 2>&1 &
fake=$!
n=0
while [ ! -s "$run/port" ]; do
  n=$((n + 1))
  if [ $n -gt 1000 ] || ! kill -0 $fake 2>/dev/null; then
    echo "claude-in-netns: the fake API did not start; see $FAKE_DIR/fake.log" >&2
    kill $fake 2>/dev/null
    exit 98
  fi
  sleep 0.01
done
# Nothing from the caller'"'"'s environment may pick another provider or credential.
unset ANTHROPIC_API_KEY ANTHROPIC_AUTH_TOKEN CLAUDE_CODE_USE_BEDROCK CLAUDE_CODE_USE_VERTEX CLAUDECODE
HOME=$run/home TMPDIR=$run/tmp ANTHROPIC_BASE_URL=http://127.0.0.1:$(cat "$run/port") \
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_TELEMETRY=1 DISABLE_ERROR_REPORTING=1 \
DISABLE_AUTOUPDATER=1 CLAUDE_CODE_MAX_RETRIES=0 API_TIMEOUT_MS=30000 \
  "$REAL_CLAUDE" "$@"
rc=$?
kill $fake 2>/dev/null
exit $rc
' claude-in-netns "$@"
"#,
        claude = claude.display(),
        server = server.display(),
        dir = dir.display(),
        tool = tool,
        text_repeat = text_repeat,
        netns = unshare_flags().expect("checked by real_claude()"),
    );
    let path = dir.join("claude-in-netns");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Every text block of a message request's user turns.
fn user_texts(body: &Value) -> Vec<String> {
    let mut texts = Vec::new();
    for m in body["messages"].as_array().into_iter().flatten().filter(|m| m["role"] == "user") {
        match &m["content"] {
            Value::String(s) => texts.push(s.clone()),
            Value::Array(blocks) => texts.extend(blocks.iter().filter_map(|b| b["text"].as_str().map(String::from))),
            _ => {}
        }
    }
    texts
}

fn system_text(body: &Value) -> String {
    match &body["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

fn tool_names(body: &Value) -> Vec<String> {
    body["tools"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str().map(String::from)).collect()
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.split('-').map(str::len).eq([8, 4, 4, 4, 12]) && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_runs_a_job_with_every_option() {
    let Some(claude) = real_claude() else { return };
    let r = Real::start(&claude, "ok").await;
    // Starts with dashes: on stdin it is a prompt, never an option.
    let prompt = "--help is not a flag here: say hello";
    let a = r
        .execute(json!({
            "prompt": prompt, "model": "claude-sonnet-4-5", "max_turns": 3,
            "allowed_tools": ["Read", "Bash(git log:*)"], "disallowed_tools": ["Write"],
            "permission_mode": "acceptEdits", "append_system_prompt": "be brief",
            "timeout_ms": 60000
        }))
        .await;
    let b = &a.body;
    assert_eq!(b["success"], true, "{}\n{}", a.text, r.logs());
    assert_eq!(b["output"], FAKE_TEXT);
    assert!(b["error"].is_null() && b["error_code"].is_null(), "{}", a.text);
    assert_eq!(b["exit_code"], 0);
    assert_eq!(b["num_turns"], 1);
    assert!(b["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{}", a.text);
    assert!(b["session_id"].as_str().is_some_and(is_uuid), "a real session id: {}", a.text);

    // The agent read the CLI's version line before its first hello; /health shows it.
    let h = r.client.health_full().await;
    let version = h.body["agent"]["claude_version"].as_str().unwrap_or_default();
    assert!(version.ends_with("(Claude Code)") && version.starts_with("2."), "{}", h.text);

    // What arrived at the API: the model, the system prompt addition, the prompt, the tools.
    let requests = r.message_requests();
    assert_eq!(requests.len(), 1, "one turn, one request: {requests:#?}");
    let req = &requests[0];
    assert_eq!(req["headers"]["authorization"], "present", "the agent's CLAUDE_CODE_OAUTH_TOKEN is sent as a bearer token");
    let body = &req["body"];
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["stream"], true);
    assert!(system_text(body).ends_with("\n\nbe brief"), "append_system_prompt ends the system prompt");
    assert!(user_texts(body).iter().any(|t| t == prompt), "the prompt arrives verbatim: {:?}", user_texts(body));
    let tools = tool_names(body);
    assert!(tools.contains(&"Read".to_string()) && tools.contains(&"Bash".to_string()), "{tools:?}");
    assert!(!tools.contains(&"Write".to_string()), "disallowed_tools removes Write from the tool list: {tools:?}");
    // Only loopback was ever asked, and only these.
    for req in r.requests() {
        let path = req["path"].as_str().unwrap_or_default();
        assert!(path == "/" || path.starts_with("/api/hello") || path.starts_with("/v1/messages"), "unexpected request {req}");
    }
}

/// Claude's stdout is a socket (not a pipe: another job could reopen a pipe through
/// `/proc/<pid>/fd/1`). The CLI writes to a pipe or a socket asynchronously and exits
/// right after its result: a result larger than the socket's buffer must still arrive
/// whole, its last line included. 640 KB, twice per run (the assistant message and the
/// result), a few runs. Before, a pipe (64 KiB) cut the assistant line, a socket with the
/// default buffer (~200 KB) the result line: "exited with code 0 without a result".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_arrives_whole() {
    let Some(claude) = real_claude() else { return };
    // The agent widens the buffer to 4 MiB as root (SO_SNDBUFFORCE); as another user up to
    // net.core.wmem_max (the kernel counts twice it): the answer is sized to what it gets.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(212_992);
    let repeat = if root || wmem_max >= 4 << 20 { 20_000 } else { wmem_max / FAKE_TEXT.len() / 2 };
    let r = Real::start_answering(&claude, "ok", None, &[], repeat).await;
    let expected = FAKE_TEXT.repeat(repeat);
    for run in 0..3 {
        let a = r.execute(json!({"prompt": "say it at length", "timeout_ms": 120000})).await;
        let b = &a.body;
        assert_eq!(b["success"], true, "run {run}: {}\n{}", shared::text::truncate(&a.text, 2000), r.logs());
        let output = b["output"].as_str().unwrap_or_default();
        assert!(output == expected, "run {run}: {} bytes of {} arrived", output.len(), expected.len());
        assert_eq!(b["truncated"], false, "run {run}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_401_is_a_runner_oauth_error() {
    let Some(claude) = real_claude() else { return };
    let r = Real::start(&claude, "unauthorized").await;
    let a = r.execute(json!({"prompt": "say hello", "timeout_ms": 60000})).await;
    let b = &a.body;
    assert_eq!(b["success"], false, "{}", a.text);
    assert_eq!(b["error_code"], "RUNNER_OAUTH_ERROR", "{}\n{}", a.text, r.logs());
    assert_eq!(b["exit_code"], 1);
    let error = b["error"].as_str().unwrap();
    // With CLAUDE_CODE_OAUTH_TOKEN the CLI says "Not logged in · Please run /login" (with an
    // API key: "Invalid API key · Fix external API key"); its result has api_error_status 401.
    assert!(error.contains("Please run /login"), "{error}");
    assert!(error.contains("log in again"), "{error}");
    assert!(!a.text.contains("test-token-not-real"), "token leaked: {}", a.text);
    // The next heartbeat tells the edge; health turns unhealthy (503).
    r.client.wait_health(503).await;
    let h = r.client.health_full().await;
    assert_eq!(h.body["status"], "unhealthy", "{}", h.text);
    assert_eq!(h.body["oauth"]["needs_login"], true, "{}", h.text);
}

/// The caller names the model, and the real CLI's answer to the API's 404 for it puts the
/// name in its text: a model named with the words of a login failure made any caller put
/// the agent into "needs login" for everyone, kept across restarts (hostile review of the
/// output, 1). A model named with `x-api-key` makes the CLI itself call that 404 a login
/// failure ("Not logged in · Please run /login"); the API's status says what it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_named_like_a_login_failure_is_no_login_failure() {
    let Some(claude) = real_claude() else { return };
    let r = Real::start(&claude, "not_found").await;
    for model in ["nope failed to authenticate · please run /login", "nope x-api-key"] {
        let a = r.execute(json!({"prompt": "say hello", "model": model, "timeout_ms": 60000})).await;
        let b = &a.body;
        assert_eq!(b["success"], false, "{}", a.text);
        assert_eq!(b["error_code"], "CLAUDE_ERROR", "{}\n{}", a.text, r.logs());
        assert_eq!(b["retryable"], false, "{}", a.text);
    }
    let models: Vec<Value> = r.message_requests().iter().map(|req| req["body"]["model"].clone()).collect();
    assert!(models.contains(&json!("nope x-api-key")), "the API was asked (and answered 404): {models:?}");
    // The agent told the edge nothing of its login (it would before each result went).
    assert!(!r.agent.log().contains("Claude's login state changed"), "{}", r.logs());
    let h = r.client.health_full().await;
    assert_eq!((h.status, &h.body["oauth"]["needs_login"]), (200, &json!(false)), "{}", h.text);
    let next = r.client.execute(json!({"prompt": "again", "model": "nope", "timeout_ms": 60000})).await;
    assert_eq!((next.status, next.body["error_code"].as_str()), (200, Some("CLAUDE_ERROR")), "{}", next.text);
}

/// The fake answers as the API does for a Claude subscription whose usage window is used
/// up: HTTP 429 with `anthropic-ratelimit-unified-status: rejected`,
/// `anthropic-ratelimit-unified-reset: <epoch s>` (an hour from now),
/// `anthropic-ratelimit-unified-representative-claim: five_hour` and the per-window
/// `anthropic-ratelimit-unified-5h-*` / `-7d-*` headers — the names the CLI reads (found in
/// its bundled code; see tests/fake-anthropic/server.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_subscription_window_is_a_usage_limit_with_its_reset() {
    let Some(claude) = real_claude() else { return };
    let r = Real::start(&claude, "rate_limited").await;
    let before = now_s();
    let a = r.execute(json!({"prompt": "say hello", "timeout_ms": 60000})).await;
    let b = &a.body;
    assert_eq!(b["success"], false, "{}", a.text);
    assert_eq!(b["error_code"], "USAGE_LIMIT", "{}\n{}", a.text, r.logs());
    assert_eq!(b["retryable"], true, "{}", a.text);
    // retry_at is the reset the API named (not the rounded local time in the CLI's text).
    let retry_at = b["retry_at"].as_str().expect("retry_at").to_string();
    let expected = shared::time::rfc3339((before + 3600) * 1000);
    let later = shared::time::rfc3339((now_s() + 3600) * 1000);
    assert!(retry_at >= expected && retry_at <= later, "retry_at {retry_at}, expected between {expected} and {later}");
    assert_eq!(r.message_requests().len(), 1, "no retries on a used-up window");
    // The edge knows at once: 503 unhealthy, with the window; new work falls back.
    let h = r.client.health_full().await;
    assert_eq!((h.status, &h.body["status"]), (503, &serde_json::json!("unhealthy")), "{}", h.text);
    assert_eq!(h.body["usage"]["status"], "rejected", "{}", h.text);
    assert_eq!(h.body["usage"]["type"], "five_hour", "{}", h.text);
    assert_eq!(h.body["usage"]["resets_at"], retry_at.as_str());
    let refused = r.client.execute(json!({"prompt": "again"})).await;
    assert_eq!((refused.status, refused.body["error_code"].as_str()), (503, Some("USAGE_LIMIT")), "{}", refused.text);
    assert_eq!(refused.body["retry_at"], retry_at.as_str());
}

/// `claude auth login` itself, driven by the relay: the URL the real CLI prints reaches the
/// caller; the code goes in; offline, its token exchange fails, and the caller is told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_drives_the_real_cli_login() {
    let Some(claude) = real_claude() else { return };
    let r = Real::start(&claude, "ok").await;
    let start = r.client.send("POST", "/oauth/login", Some(SECRET), None).await;
    assert_eq!(start.status, 200, "{}\n{}", start.text, r.logs());
    let url = start.body["url"].as_str().unwrap();
    assert!(url.starts_with("https://") && url.contains("/oauth/authorize?") && url.contains("code_challenge="), "{url}");
    let code = json!({"login_id": start.body["login_id"], "code": "not-a-real-code#state"}).to_string().into_bytes();
    let done = r.client.send("POST", "/oauth/login/code", Some(SECRET), Some(code)).await;
    assert_eq!(done.status, 502, "{}", done.text);
    let why = done.body["error"].as_str().unwrap();
    // Offline the CLI cannot reach Anthropic's token endpoint: "Login failed: …".
    assert!(why.contains("Login failed"), "{why}");
    assert!(!why.contains("not-a-real-code"), "the code is not repeated: {why}");
    // Work goes on with the login it had.
    r.client.wait_online().await;
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_max_turns_is_max_turns() {
    let Some(claude) = real_claude() else { return };
    // The fake answers the first turn with a tool call, so a second turn is needed.
    let r = Real::start(&claude, "tool_use").await;
    let a = r.execute(json!({"prompt": "read a file", "max_turns": 1, "timeout_ms": 60000})).await;
    let b = &a.body;
    assert_eq!(b["success"], false, "{}", a.text);
    assert_eq!(b["error_code"], "MAX_TURNS", "{}", a.text);
    assert_eq!(b["retryable"], false, "{}", a.text);
    let error = b["error"].as_str().unwrap();
    // The result line: subtype error_max_turns, is_error true, no `result`, and
    // errors ["Reached maximum number of turns (1)"].
    assert!(error.contains("error_max_turns") || error.contains("maximum number of turns"), "{error}");
    assert_eq!(r.message_requests().len(), 1, "the CLI stops before a second request");
}

/// A session the runner has no record of for the caller never reaches the CLI: a 400,
/// nothing asked of the API. One it recorded whose transcript is gone (Claude Code deletes
/// them after `cleanupPeriodDays`) does, and the CLI fails as for any unknown session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_session_is_refused_and_a_lost_transcript_is_a_claude_error() {
    let Some(claude) = real_claude() else { return };
    let r = Real::start(&claude, "ok").await;
    let unknown = "4b0c8a4e-1a7e-4c53-9b1e-2f3a4d5e6f70";
    let a = r.client.execute(json!({"prompt": "continue", "session_id": unknown, "timeout_ms": 60000})).await;
    assert_eq!((a.status, a.body["error_code"].as_str()), (400, Some("INVALID_REQUEST")), "{}", a.text);
    assert!(r.message_requests().is_empty(), "nothing is asked of the API");
    let first = r.execute(json!({"prompt": "remember the word pelican", "timeout_ms": 60000})).await;
    assert_eq!(first.body["success"], true, "{}", first.text);
    let session = first.body["session_id"].as_str().unwrap().to_string();
    // Its transcript removed, wherever the CLI filed it.
    let removed = remove_files_named(r.agent.data.path(), &format!("{session}.jsonl"));
    assert!(removed > 0, "the CLI filed the session's transcript under {}", r.agent.data.path().display());
    let asked = r.message_requests().len();
    let a = r.execute(json!({"prompt": "continue", "session_id": session, "timeout_ms": 60000})).await;
    let b = &a.body;
    assert_eq!(b["success"], false, "{}", a.text);
    assert_eq!(b["error_code"], "CLAUDE_ERROR", "{}", a.text);
    assert_eq!(b["exit_code"], 1);
    // The result line: subtype error_during_execution, is_error true, no `result`, and
    // errors ["No conversation found with session ID: …"].
    let error = b["error"].as_str().unwrap();
    assert!(error.contains("error_during_execution") || error.contains("No conversation found"), "{error}");
    assert_eq!(r.message_requests().len(), asked, "nothing more is asked of the API");
}

/// Removes every file called `name` under `dir`; returns how many.
fn remove_files_named(dir: &Path, name: &str) -> usize {
    files_named(dir, name).iter().filter(|path| std::fs::remove_file(path).is_ok()).count()
}

/// Every file named `name` under `dir`.
fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                folders.push(entry.path());
            } else if entry.file_name().to_str() == Some(name) {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Processes whose working directory is inside `dir` (the real CLI runs in the job's
/// workspace, and so does the fake API its wrapper started).
fn processes_inside(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if cwd.starts_with(dir) && alive(pid) {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!("{pid}: {}", String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_stops_the_real_cli_and_everything_it_started() {
    let Some(claude) = real_claude() else { return };
    // The fake never answers, so only timeout_ms ends the job.
    let r = Real::start(&claude, "stall").await;
    let started = Instant::now();
    // Long enough for the CLI to start and reach the API even on a loaded machine (its
    // start takes ~0.5 s idle, and took more than 8 s at load 10), so the kill lands
    // mid-request.
    let a = r.execute(json!({"prompt": "wait forever", "timeout_ms": 20000})).await;
    assert_eq!(a.body["success"], false, "{}", a.text);
    assert_eq!(a.body["error_code"], "TIMEOUT", "{}\n{}", a.text, r.logs());
    assert!(started.elapsed().as_secs() < 37, "stopped promptly, not after the 5 s kill grace and more");
    assert_eq!(r.message_requests().len(), 1, "the CLI was waiting on the API");
    let workspaces = r.agent.data.path().join("data");
    let gone = eventually(std::time::Duration::from_secs(10), || processes_inside(&workspaces).is_empty()).await;
    assert!(gone, "left running: {:?}", processes_inside(&workspaces));
}

/// Claude Code files a session under its working directory
/// (`$CLAUDE_CONFIG_DIR/projects/<cwd with every non-alphanumeric character as '-'>/<id>.jsonl`)
/// and `--resume` only looks under the current one; every job runs in a fresh workspace
/// (`DATA_DIR/workspaces/<job id>`), so a later job cannot find an earlier job's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_job_resumes_an_earlier_jobs_session() {
    let Some(claude) = real_claude() else { return };
    let r = Real::start(&claude, "ok").await;
    // Followed as it runs: the CLI's own init line is seen, not only the result.
    let submitted = r.client.submit(json!({"prompt": "remember the word pelican", "timeout_ms": 60000})).await;
    assert_eq!(submitted.status, 202, "{}", submitted.text);
    let (_, _, events) = r.client.follow(submitted.body["job_id"].as_str().unwrap()).await;
    let first: Value = serde_json::from_str(&events.last().expect("events").1).unwrap();
    assert_eq!(first["success"], true, "{first}\n{}", r.logs());
    let session = first["session_id"].as_str().unwrap().to_string();
    assert!(is_uuid(&session), "{session}");
    // The agent named the session (`--session-id`; the result names the agent's id) and the
    // CLI ran in it: its init line names that id, and its transcript is filed under it.
    let inits: Vec<Value> = events
        .iter()
        .filter(|(k, _)| k == "progress")
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap())
        .filter(|e| e["type"] == "system" && e["subtype"] == "init")
        .collect();
    assert_eq!(inits.len(), 1, "{events:?}");
    assert_eq!(inits[0]["session_id"], session.as_str(), "the CLI's init line names the id the agent passed");
    assert!(!r.agent.log().contains("other than the one the agent started it in"), "{}", r.logs());
    assert_eq!(files_named(r.agent.data.path(), &format!("{session}.jsonl")).len(), 1, "the transcript is filed under the agent's id");
    let second = r.execute(json!({"prompt": "which word?", "session_id": session, "timeout_ms": 60000})).await;
    assert_eq!(second.body["success"], true, "{}\n{}", second.text, r.logs());
    assert_eq!(second.body["session_id"], session.as_str());
    // The resumed run stays in that session (its init line names it), so its use is
    // recorded and the session's 30 days start again.
    assert!(!r.agent.log().contains("named a session other than"), "{}", r.logs());
    let requests = r.message_requests();
    let last = &requests.last().expect("the second job asked the API")["body"];
    let texts = user_texts(last);
    assert!(texts.iter().any(|t| t.contains("remember the word pelican")), "the first job's turn is in the history: {texts:?}");
    assert!(texts.iter().any(|t| t.contains("which word?")));
}

/// The whole repository path with the real CLI: the agent fetches a repository over https
/// (outside the namespace), the CLI runs in the fresh checkout and writes a file with its
/// Write tool, and the diff names that file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_writes_a_file_in_a_repository_checked_out_over_https() {
    let Some(claude) = real_claude() else { return };
    let git = harness::git_server::GitServer::start(None);
    let seed = git.seed("site", &[("README.md", b"# site\n")]);
    let tool = json!({"name": "Write", "input": {"file_path": "{cwd}/HELLO.md", "content": "Hello from Claude\n"}});
    let (hosts, cert) = (git.host(), git.cert_file.display().to_string());
    let r = Real::start_with(&claude, "tool_use", Some(&tool), &[("ALLOWED_REPO_HOSTS", &hosts), ("SSL_CERT_FILE", &cert)]).await;
    let a = r
        .execute(json!({
            "prompt": "add a HELLO.md", "repo_url": git.url("site"), "include_diff": true,
            "allowed_tools": ["Write"], "permission_mode": "acceptEdits", "timeout_ms": 60000
        }))
        .await;
    let b = &a.body;
    assert_eq!(b["success"], true, "{}\n{}", a.text, r.logs());
    assert_eq!(b["output"], FAKE_TEXT);
    assert_eq!(b["commit"], seed.git(&["rev-parse", "HEAD"]).as_str());
    let diff = b["diff"].as_str().unwrap();
    assert!(diff.contains("diff --git a/HELLO.md b/HELLO.md\nnew file mode 100644"), "{diff}");
    assert!(diff.contains("+Hello from Claude"), "{diff}");
    assert_eq!(b["files_changed"], json!([{"path": "HELLO.md", "status": "added"}]));
    // The CLI really used its Write tool, in the checkout: the second request carries the
    // tool's result, and the first told the model the checkout was the working directory.
    let requests = r.message_requests();
    assert_eq!(requests.len(), 2, "a tool call, then the answer");
    let second = requests[1]["body"].to_string();
    assert!(second.contains("tool_result") && second.contains("HELLO.md"), "{second}");
    assert!(system_text(&requests[0]["body"]).contains("/data/workspaces/"), "Claude worked in the job's checkout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_keeps_the_cli_off_the_network() {
    let Some(_claude) = real_claude() else { return };
    // The same `unshare` the wrapper uses: only loopback exists in there.
    let out = std::process::Command::new("unshare")
        .args([unshare_flags().unwrap(), "sh", "-c", "PATH=$PATH:/usr/sbin:/sbin; ip link set lo up && ip -o link show | grep -v ' lo:' | wc -l"])
        .output()
        .expect("unshare runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "no interface but loopback in the namespace");
}

/// `claude-runner doctor --canary` against the real CLI (in its namespace, with the fake
/// API): this CLI version passes, and a login the API refuses is named as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_passes_with_this_cli_and_names_a_refused_login() {
    let Some(claude) = real_claude() else { return };
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    for (mode, passes) in [("ok", true), ("unauthorized", false)] {
        let dir = TempDir::new("real-canary");
        let wrapper = write_wrapper(dir.path(), &claude, mode, None, 1);
        let out = std::process::Command::new(bin("claude-runner"))
            .args(["doctor", "--canary"])
            .env_remove("ANTHROPIC_API_KEY")
            .env("EDGE_URL", edge.ws_url())
            .env("AGENT_ID", "spark")
            .env("AGENT_SIGNING_KEY", shared::keys::encode_signing(keys.agent("spark")))
            .env("EDGE_PUBLIC_KEY", shared::keys::encode_verifying(&keys.edge.verifying_key()))
            .env("CLAUDE_BIN", &wrapper)
            .env("CLAUDE_CONFIG_DIR", dir.path().join("claude"))
            .env("DATA_DIR", dir.path().join("data"))
            .env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-test-token-not-real-0123456789")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let fake = std::fs::read_to_string(dir.path().join("requests.jsonl")).unwrap_or_default();
        assert_eq!(out.status.success(), passes, "{mode}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("(2.1."), "the binary line shows the CLI's version: {text}");
        assert!(fake.contains("/v1/messages"), "{mode}: a real request reached the (fake) API");
        if passes {
            assert!(text.contains("ok    canary: a job ran end to end"), "{text}");
        } else {
            assert!(text.contains("FAIL  canary: Claude could not authenticate"), "{text}");
            assert!(text.contains("claude auth login"), "{text}");
            assert!(!text.contains("test-token-not-real"), "token leaked: {text}");
        }
    }
}
