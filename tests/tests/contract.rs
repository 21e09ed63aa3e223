//! The HTTP contract (README "Using the edge"), run against each edge host with the real agent binary
//! and the stand-in for `claude`. Each test is written once and instantiated per host by
//! `contract!`; the Worker variants run when `tests/run` has built the Worker
//! (`CLAUDE_RUNNER_WORKER_TESTS=1` at build time, see tests/build.rs), else they show as
//! ignored.

use harness::*;
use std::time::{Duration, Instant};

/// An edge with one connected agent `spark`.
struct Setup {
    edge: EdgeServer,
    agent: AgentProc,
    client: Client,
}

/// Submits `n` jobs with a callback to the receiver on `port` and cancels each while it
/// waits (no agent): a job cancelled while queued posts its callback at once.
async fn cancel_jobs_with_callbacks(client: &Client, port: u16, n: usize) {
    for i in 0..n {
        let a = client.submit(json!({"prompt": format!("job {i}"), "callback_url": format!("http://127.0.0.1:{port}/cb")})).await;
        let job_id = a.body["job_id"].as_str().unwrap_or_else(|| panic!("{}", a.text)).to_string();
        let d = client.send("DELETE", &format!("/jobs/{job_id}"), Some(SECRET), None).await;
        assert_eq!(d.body["state"], "cancelled", "{}", d.text);
    }
}

/// Waits until `/health` says the agent is connected (its login aside).
async fn agent_connected(client: &Client) {
    let connected = eventually_async(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.health_full().await.body["agent"]["connected"] == true }
    });
    assert!(connected.await, "the agent never connected");
}

async fn setup(kind: EdgeKind, edge_settings: &[(&str, &str)], agent_env: &[(&str, &str)]) -> Setup {
    setup_with(kind, edge_settings, agent_env, true).await
}

/// `online`: wait until `/health` says the agent can work.
async fn setup_with(kind: EdgeKind, edge_settings: &[(&str, &str)], agent_env: &[(&str, &str)], online: bool) -> Setup {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, edge_settings);
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    for (k, v) in agent_env {
        opts = opts.env(k, v);
    }
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    if online {
        client.wait_online().await;
    }
    Setup { edge, agent, client }
}

async fn a_job_returns_every_response_field(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"prompt": "say hello", "timeout_ms": 20000})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let b = &a.body;
    assert_eq!(b["success"], true);
    assert_eq!(b["output"], "stand-in answer to: say hello");
    assert!(b["error"].is_null());
    assert_eq!(b["exit_code"], 0);
    assert!(b["duration_ms"].as_u64().is_some());
    assert!(b["job_id"].as_str().is_some_and(|j| !j.is_empty()));
    assert_eq!(b["agent_id"], "spark");
    // A session the agent named (`--session-id`, a UUID v4), not one Claude's output named.
    let session = b["session_id"].as_str().unwrap();
    assert!(session.len() == 36 && session.as_bytes()[14] == b'4' && session.split('-').map(str::len).eq([8, 4, 4, 4, 12]), "{session}");
    assert_eq!(b["num_turns"], 1);
    assert_eq!(b["cost_usd"], 0.0123);
    assert!(b["error_code"].is_null());
    // The job stays readable.
    let job = s.client.get(&format!("/jobs/{}", b["job_id"].as_str().unwrap())).await;
    assert_eq!(job.body["state"], "succeeded");
    assert_eq!(job.body["result"]["output"], b["output"]);
}

/// The two callers of the service this one replaces, as they call it
/// (CALLERS.md): TextGenerationWorkflow sends `task`, not `prompt`, and an `options` object
/// the runner does not know, which is taken and ignored; sandbox-executor sends its
/// `X-Request-ID` and, in front of a Tunnel, a Cloudflare Access service token's headers,
/// which the edge lets by.
async fn the_existing_callers_are_served_as_they_call(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"task": "You write haiku.\n\nvia task", "options": {"max_tokens": 5}})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["success"], true, "{}", a.text);
    assert_eq!(a.body["output"], "stand-in answer to: You write haiku.\n\nvia task");
    let headers = [
        ("X-Request-ID", "req-3f9a1c2e-sandbox"),
        ("CF-Access-Client-Id", "0123456789abcdef.access"),
        ("CF-Access-Client-Secret", "access-client-secret-0123456789abcdef"),
    ];
    let body = json!({"prompt": "from the sandbox", "timeout_ms": 300000, "allowed_tools": ["Read"], "max_turns": 3});
    let b = s.client.execute_with_headers(body, &headers).await;
    assert_eq!(b.status, 200, "{}", b.text);
    assert_eq!(b.body["success"], true, "{}", b.text);
    assert_eq!(b.body["output"], "stand-in answer to: from the sandbox");
    let runs = s.agent.claude_runs();
    let argv: Vec<String> = serde_json::from_value(runs.last().unwrap()["argv"].clone()).unwrap();
    assert!(argv.contains(&"--allowedTools=Read".to_string()) && argv.contains(&"--max-turns=3".to_string()), "{argv:?}");
}

async fn request_options_reach_claude_as_flags(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s
        .client
        .execute(json!({
            "prompt": "--help is not a flag here", "model": "claude-test-model", "max_turns": 4,
            "allowed_tools": ["Read", "Bash(git log:*)"], "disallowed_tools": ["Write"],
            "permission_mode": "acceptEdits", "append_system_prompt": "be terse", "working_dir": "sub/dir"
        }))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let runs = s.agent.claude_runs();
    assert_eq!(runs.len(), 1);
    let argv: Vec<String> = serde_json::from_value(runs[0]["argv"].clone()).unwrap();
    for flag in [
        "-p", "--output-format", "stream-json", "--verbose", "--model=claude-test-model", "--max-turns=4",
        "--allowedTools=Read", "--allowedTools=Bash(git log:*)", "--disallowedTools=Write",
        "--permission-mode=acceptEdits", "--append-system-prompt=be terse",
    ] {
        assert!(argv.contains(&flag.to_string()), "{flag} missing from {argv:?}");
    }
    assert_eq!(runs[0]["prompt"], "--help is not a flag here", "the prompt arrives on stdin");
    assert!(runs[0]["cwd"].as_str().unwrap().ends_with("sub/dir"));
    // (`session_id` → `--resume`: a_session_is_resumed_by_its_own_caller_alone.)
}

async fn offline_is_answered_at_once_with_fallback(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    // No agent ever: a task wrongly queued would be ended (503, offline, fallback: the
    // same answer) when the edge gives up on its agent (LOST_AFTER_MS); 10 min here, far
    // past the bound below.
    let edge = EdgeServer::start(kind, &keys, &[("LOST_AFTER_MS", "600000")]);
    let client = Client::new(&edge.url());
    let started = Instant::now();
    let a = client.execute(json!({"prompt": "anyone?"})).await;
    // "At once" means no waiting for an agent or a timeout (300 s by default, 600 s to
    // give up on the agent here); the bound is slack for a loaded machine.
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(a.body["success"], false);
    assert_eq!(a.body["error_code"], "RUNNER_OFFLINE");
    assert_eq!(a.body["fallback"], true);
    assert!(a.body["error"].as_str().unwrap().len() > 20);
    let h = client.health_full().await;
    assert_eq!(h.status, 503);
    assert_eq!(h.body["status"], "offline");
    assert_eq!(h.body["service"], "claude-runner");
}

async fn health_follows_the_agent(kind: EdgeKind) {
    let mut s = setup(kind, &[], &[]).await;
    let h = s.client.health_full().await;
    assert_eq!(h.status, 200);
    assert_eq!(h.body["status"], "healthy");
    assert_eq!(h.body["agent"]["connected"], true);
    assert_eq!(h.body["agent"]["agent_id"], "spark");
    assert_eq!(h.body["agent"]["capacity"], 1);
    // The agent's `claude --version`, read before its first hello.
    assert_eq!(h.body["agent"]["claude_version"], "0.0.0 (Claude Code stand-in)");
    assert_eq!(h.body["oauth"]["configured"], true);
    assert!(h.body["timestamp"].as_str().unwrap().ends_with('Z'));
    s.agent.stop();
    s.client.wait_health(503).await;
    assert_eq!(s.client.health().await.body["status"], "offline");
    s.agent.restart();
    s.client.wait_health(200).await;
}

async fn secrets_are_checked(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let body = Some(json!({"prompt": "x"}).to_string().into_bytes());
    for secret in [None, Some("wrong-secret"), Some("")] {
        let a = s.client.send("POST", "/execute", secret, body.clone()).await;
        assert_eq!(a.status, 403, "{secret:?}");
        assert_eq!(a.body["error_code"], "UNAUTHORIZED");
        assert_eq!(a.body["success"], false);
    }
    for path in ["/oauth/status", "/jobs/x"] {
        assert_eq!(s.client.send("GET", path, None, None).await.status, 403, "{path}");
    }
    assert!(s.agent.claude_runs().is_empty(), "nothing ran");
    // Bearer works too.
    let resp = reqwest::Client::new()
        .get(format!("{}/oauth/status", s.edge.url()))
        .header("Authorization", format!("Bearer {SECRET}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let o: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(o["source"], "oauth_token_env");
    assert_eq!(o["needs_login"], false);
}

async fn health_without_the_secret_says_only_its_status(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let open = s.client.health().await;
    assert_eq!(open.status, 200);
    assert_eq!(open.body, json!({"status": "healthy"}), "{}", open.text);
    let wrong = s.client.send("GET", "/health", Some("not-the-secret-0000"), None).await;
    assert_eq!(wrong.body, json!({"status": "healthy"}), "{}", wrong.text);
    let full = s.client.health_full().await;
    assert_eq!(full.body["agent"]["agent_id"], "spark", "{}", full.text);
    assert_eq!(full.body["oauth"]["configured"], true, "{}", full.text);
}

/// Named callers (`RUNNER_SECRETS`): each secret is one caller, whose name no other secret
/// may send jobs as; it sees its own jobs and a caller's view of `/health`, not the
/// operator's login or counters.
async fn a_named_callers_secret_is_that_caller_alone(kind: EdgeKind) {
    const A: &str = "caller-a-secret-0123456789";
    const B: &str = "caller-b-secret-0123456789";
    let callers = format!("a={A},b={B}");
    let s = setup(kind, &[("RUNNER_SECRETS", &callers)], &[]).await;
    let body = |v: serde_json::Value| Some(v.to_string().into_bytes());
    let a = s.client.send("POST", "/execute", Some(A), body(json!({"prompt": "a's task"}))).await;
    assert_eq!((a.status, a.body["success"].as_bool()), (200, Some(true)), "{}", a.text);
    let id = a.body["job_id"].as_str().unwrap().to_string();
    assert_eq!(s.client.send("GET", &format!("/jobs/{id}"), Some(B), None).await.status, 404, "b reads a's job");
    assert_eq!(s.client.send("GET", &format!("/jobs/{id}"), Some(A), None).await.status, 200);
    for (secret, who) in [(SECRET, "the pool's secret"), (B, "b's secret")] {
        let a = s.client.send("POST", "/jobs", Some(secret), body(json!({"prompt": "x", "caller": "a"}))).await;
        assert_eq!((a.status, a.body["error_code"].as_str()), (403, Some("UNAUTHORIZED")), "{who} sent as a: {}", a.text);
    }
    let h = s.client.send("GET", "/health", Some(A), None).await;
    assert_eq!((h.status, h.body["status"].as_str(), h.body["agents"][0]["agent_id"].as_str()), (200, Some("healthy"), Some("spark")), "{}", h.text);
    assert!(h.body.get("oauth").is_none() && h.body.get("agent").is_none(), "{}", h.text);
    let a = s.client.send("GET", "/oauth/status", Some(A), None).await;
    assert_eq!(a.status, 403, "{}", a.text);
}

/// A caller given its own secret (`RUNNER_SECRETS`) after the pool's secret sent jobs in
/// its name is not their sender: its new secret neither reads, lists nor cancels them
/// (their prompts and results stay the pool secret's), and reaches what it sends itself.
async fn a_callers_new_secret_reaches_no_job_the_pools_secret_sent_in_its_name(kind: EdgeKind) {
    const CI: &str = "caller-ci-secret-0123456789";
    let mut s = setup(kind, &[], &[]).await;
    let body = |v: serde_json::Value| Some(v.to_string().into_bytes());
    let before = s.client.send("POST", "/execute", Some(SECRET), body(json!({"prompt": "the pool's plans", "caller": "ci"}))).await;
    assert_eq!((before.status, before.body["success"].as_bool()), (200, Some(true)), "{}", before.text);
    let id = before.body["job_id"].as_str().unwrap().to_string();
    s.edge.env.insert("RUNNER_SECRETS".into(), format!("ci={CI}"));
    s.edge.restart();
    s.client.wait_online().await;
    for (method, path) in [("GET", format!("/jobs/{id}")), ("GET", format!("/jobs/{id}/events")), ("DELETE", format!("/jobs/{id}"))] {
        let a = s.client.send(method, &path, Some(CI), None).await;
        assert_eq!(a.status, 404, "{method} {path} with ci's new secret: {}", a.text);
        assert!(!a.text.contains("plans"), "{}", a.text);
    }
    let list = s.client.send("GET", "/jobs", Some(CI), None).await;
    assert!(list.status == 200 && !list.text.contains(&id), "{}", list.text);
    let pool = s.client.send("GET", &format!("/jobs/{id}"), Some(SECRET), None).await;
    assert_eq!((pool.status, pool.body["state"].as_str()), (200, Some("succeeded")), "{}", pool.text);
    let own = s.client.send("POST", "/execute", Some(CI), body(json!({"prompt": "ci's own"}))).await;
    let own = own.body["job_id"].as_str().unwrap().to_string();
    assert_eq!(s.client.send("GET", &format!("/jobs/{own}"), Some(CI), None).await.status, 200);
}

/// `session_id` resumes a Claude session only for the caller whose job made it: with two
/// callers' secrets (`RUNNER_SECRETS`), b — knowing the id a's job returned — is refused
/// before Claude runs, and a's transcript is not copied into b's job; nor may the pool's
/// secret (another caller), nor anyone a session no job made (a transcript put in Claude's
/// folder by hand). a resumes its own. Hostile ids are a 400 at the edge.
async fn a_session_is_resumed_by_its_own_caller_alone(kind: EdgeKind) {
    const A: &str = "caller-a-secret-0123456789";
    const B: &str = "caller-b-secret-0123456789";
    let s = setup(kind, &[("RUNNER_SECRETS", &format!("a={A},b={B}"))], &[]).await;
    let body = |v: serde_json::Value| Some(v.to_string().into_bytes());
    let first = s.client.send("POST", "/execute", Some(A), body(json!({"prompt": "@transcript the word is kiwi"}))).await;
    assert_eq!((first.status, first.body["success"].as_bool()), (200, Some(true)), "{}", first.text);
    let session = first.body["session_id"].as_str().unwrap().to_string();
    let projects = s.agent.data.path().join("claude-config/projects");
    let copies = || -> Vec<std::path::PathBuf> {
        let file = format!("{session}.jsonl");
        std::fs::read_dir(&projects).unwrap().flatten().map(|d| d.path().join(&file)).filter(|p| p.exists()).collect()
    };
    assert_eq!(copies().len(), 1, "a's job filed its transcript");

    for (secret, who) in [(B, "b"), (SECRET, "default")] {
        let other = s.client.send("POST", "/execute", Some(secret), body(json!({"prompt": "which word?", "session_id": session}))).await;
        assert_eq!((other.status, other.body["error_code"].as_str()), (400, Some("INVALID_REQUEST")), "{who}: {}", other.text);
        let error = other.body["error"].as_str().unwrap();
        assert!(error.contains(&format!("unknown to caller `{who}`")) && error.contains("your own jobs"), "{error}");
        assert_ne!(other.body["fallback"].as_bool(), Some(true), "not a task to run elsewhere: {}", other.text);
        let job = s.client.send("GET", &format!("/jobs/{}", other.body["job_id"].as_str().unwrap()), Some(secret), None).await;
        assert_eq!((job.body["state"].as_str(), job.body["result"]["error_code"].as_str()), (Some("failed"), Some("INVALID_REQUEST")), "{}", job.text);
    }
    assert_eq!(s.agent.claude_runs().len(), 1, "Claude never ran for them");
    assert_eq!(copies().len(), 1, "a's transcript was not copied into their jobs");

    // A session nobody's job made: a transcript put in Claude's folder by hand.
    std::fs::create_dir_all(projects.join("-home-operator")).unwrap();
    std::fs::write(projects.join("-home-operator/by-hand-1.jsonl"), "{\"secret\":1}\n").unwrap();
    for secret in [A, SECRET] {
        let hand = s.client.send("POST", "/execute", Some(secret), body(json!({"prompt": "go on", "session_id": "by-hand-1"}))).await;
        assert_eq!((hand.status, hand.body["error_code"].as_str()), (400, Some("INVALID_REQUEST")), "{}", hand.text);
    }
    assert_eq!(s.agent.claude_runs().len(), 1);

    // Hostile ids never reach the agent.
    let long = "a".repeat(129);
    for id in ["../../etc/passwd", "..", long.as_str(), "sé-1", "a/b", ""] {
        let bad = s.client.send("POST", "/execute", Some(A), body(json!({"prompt": "x", "session_id": id}))).await;
        assert_eq!((bad.status, bad.body["error_code"].as_str()), (400, Some("INVALID_REQUEST")), "{id:?}: {}", bad.text);
        assert!(bad.body["error"].as_str().unwrap().contains("session_id"), "{}", bad.text);
    }

    // a resumes its own, from its transcript, carried into the new job's workspace.
    let own = s.client.send("POST", "/execute", Some(A), body(json!({"prompt": "which word?", "session_id": session}))).await;
    assert_eq!((own.status, own.body["success"].as_bool()), (200, Some(true)), "{}", own.text);
    assert_eq!(own.body["output"].as_str().unwrap(), format!("stand-in answer to: which word? (resumed {session} after 1 turns)"));
    assert_eq!(own.body["session_id"].as_str(), Some(session.as_str()));
    let runs = s.agent.claude_runs();
    assert_eq!(runs.len(), 2);
    assert!(runs[1]["argv"].as_array().unwrap().iter().any(|a| a.as_str() == Some(&format!("--resume={session}"))), "{}", runs[1]["argv"]);
    // …and again: the session is still a's after its resumed run.
    let again = s.client.send("POST", "/execute", Some(A), body(json!({"prompt": "and now?", "session_id": session}))).await;
    assert_eq!((again.status, again.body["success"].as_bool()), (200, Some(true)), "{}", again.text);
    let b = s.client.send("POST", "/execute", Some(B), body(json!({"prompt": "x", "session_id": session}))).await;
    assert_eq!(b.status, 400, "{}", b.text);
}

/// The edge tells the agent, inside the signed order, whether a job's caller is proven —
/// sent with its own secret (`RUNNER_SECRETS`) — or only named by the pool's secret (whose
/// holder may make up any number of names), and the agent keeps it in the session's sealed
/// record (DATA_DIR/sessions.log): past its session cap the agent weighs a pool's unproven
/// names as one owner (agent/src/sessions.rs, the cut itself tested there at a small cap).
async fn the_agent_records_whether_a_sessions_caller_was_proven(kind: EdgeKind) {
    const A: &str = "caller-a-secret-0123456789";
    let s = setup(kind, &[("RUNNER_SECRETS", &format!("a={A}"))], &[]).await;
    let cases = [(A, json!({"prompt": "x"}), "a", true), (SECRET, json!({"prompt": "x", "caller": "made-up"}), "made-up", false), (SECRET, json!({"prompt": "x"}), "default", false)];
    let mut sessions = Vec::new();
    for (secret, body, _, _) in &cases {
        let done = s.client.send("POST", "/execute", Some(secret), Some(body.to_string().into_bytes())).await;
        assert_eq!((done.status, done.body["success"].as_bool()), (200, Some(true)), "{}", done.text);
        sessions.push(done.body["session_id"].as_str().unwrap().to_string());
    }
    let log = s.agent.data.path().join("data/sessions.log");
    // Each record: {"payload": "<the record as JSON>", "mac": …}.
    let records = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|sealed| serde_json::from_str(sealed["payload"].as_str().unwrap()).unwrap())
            .collect()
    };
    // Written after the result is sent (off the job's path): waited for.
    assert!(eventually(Duration::from_secs(20), || records().len() >= cases.len()).await, "{:?}", records());
    for (session, (_, _, caller, proven)) in sessions.iter().zip(&cases) {
        let record = records().into_iter().find(|r| r["session_id"] == session.as_str()).expect("a record of each session");
        assert_eq!((record["caller"].as_str(), record["proven"].as_bool()), (Some(*caller), Some(*proven)), "{record}");
    }
}

/// Requests announcing a body of 64 MiB that never comes: an edge that read (or drained)
/// before refusing would still be waiting.
async fn no_body_is_read_before_auth(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let port = edge.port;
    let cases = [
        ("POST /execute HTTP/1.1", "", "403"),
        ("POST /execute HTTP/1.1", "X-Runner-Secret: wrong-secret-000000\r\n", "403"),
        ("POST /jobs/x/events HTTP/1.1", "", "403"),
        ("POST /somewhere HTTP/1.1", "", "404"),
        ("POST /agent/connect/ HTTP/1.1", "", "426"),
        ("POST /agent/connect HTTP/1.1", "", "426"),
        ("GET /health HTTP/1.1", "", "503"),
    ];
    for (line, extra, want) in cases {
        let head = format!(
            "{line}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}Content-Length: 67108864\r\n\r\n"
        );
        let status = tokio::task::spawn_blocking(move || answer_to_head(port, &head, Duration::from_secs(10))).await.unwrap();
        let status = status.unwrap_or_else(|| panic!("{line}: no answer within 10 s: the edge waits for the body"));
        assert!(status.contains(want), "{line}: {status}");
    }
}

async fn bad_requests_are_400(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let cases: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        b"".to_vec(),
        json!({}).to_string().into_bytes(),
        json!({"prompt": ""}).to_string().into_bytes(),
        json!({"prompt": 42}).to_string().into_bytes(),
        json!({"prompt": "x", "timeout_ms": "soon"}).to_string().into_bytes(),
        json!({"prompt": "x", "allowed_tools": "Read"}).to_string().into_bytes(),
        json!({"prompt": "x", "working_dir": "../../etc"}).to_string().into_bytes(),
        json!({"prompt": "x", "working_dir": "/etc"}).to_string().into_bytes(),
        // A folder name no file system takes (rev26-1: the agent took its `mkdir`'s failure
        // for its own disk's and stopped taking work).
        json!({"prompt": "x", "working_dir": "a".repeat(300)}).to_string().into_bytes(),
        json!({"prompt": "x", "model": "--dangerously-skip-permissions"}).to_string().into_bytes(),
        json!({"prompt": "x", "repo_url": "file:///etc"}).to_string().into_bytes(),
    ];
    for body in cases {
        let a = s.client.send("POST", "/execute", Some(SECRET), Some(body.clone())).await;
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&body));
        assert_eq!(a.body["error_code"], "INVALID_REQUEST");
        assert_eq!(a.body["success"], false);
        assert!(a.body["error"].as_str().unwrap().len() > 10);
    }
    assert!(s.agent.claude_runs().is_empty(), "nothing ran");
}

async fn oversized_bodies_are_413(kind: EdgeKind) {
    let s = setup(kind, &[("MAX_BODY_BYTES", "4096")], &[]).await;
    let big = json!({"prompt": "x".repeat(5000)}).to_string().into_bytes();
    let a = s.client.send("POST", "/execute", Some(SECRET), Some(big)).await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert_eq!(a.body["error_code"], "PAYLOAD_TOO_LARGE");
    let ok = json!({"prompt": "x".repeat(3000)}).to_string().into_bytes();
    assert_eq!(s.client.send("POST", "/execute", Some(SECRET), Some(ok)).await.status, 200);
    // Far over the limit: still a readable 413, not a reset connection…
    let huge = vec![b' '; 2 * 1024 * 1024];
    let a = s.client.send("POST", "/execute", Some(SECRET), Some(huge)).await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert_eq!(a.body["error_code"], "PAYLOAD_TOO_LARGE");
    // (Without the secret the body is not even read: see no_body_is_read_before_auth.)
}

/// The bodies being read are held together to `MAX_PENDING_BYTES`, each secret's holder to
/// an equal share (here 1 MiB among the pool secret, alpha and beta: 349525 bytes). alpha
/// opens three uploads of 300000 bytes and sends 1000 of each: one is read, the two past
/// its share are refused 429 before the edge reads them, saying whose bodies and what to
/// do — while beta's request is still served. Finished, the body read is answered (400:
/// it is not JSON). Before, nothing bounded the bodies being read together: a caller's
/// uploads held half sent grew a Worker isolate past its 128 MB.
async fn bodies_being_read_are_held_to_a_share_each(kind: EdgeKind) {
    use std::io::{Read, Write};
    const ALPHA: &str = "caller-alpha-secret-0123456789";
    const BETA: &str = "caller-beta-secret-0123456789";
    const LENGTH: usize = 300_000;
    let keys = Keys::new(&["spark"]);
    let callers = format!("alpha={ALPHA},beta={BETA}");
    let edge = EdgeServer::start(kind, &keys, &[("RUNNER_SECRETS", &callers), ("MAX_PENDING_BYTES", "1048576")]);
    let head = format!(
        "POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Runner-Secret: {ALPHA}\r\nContent-Type: application/json\r\n\
         Content-Length: {LENGTH}\r\n\r\n"
    );
    // Each upload's answer is read as it comes: a refused one's at once, a held one's once
    // its body is finished.
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let mut uploads = Vec::new();
    for n in 0..3 {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", edge.port)).expect("the edge listens");
        tcp.write_all(head.as_bytes()).expect("the head is sent");
        tcp.write_all(&[b' '; 1000]).expect("the body's start is sent");
        let mut reader = tcp.try_clone().unwrap();
        let answered = answered.clone();
        std::thread::spawn(move || {
            // The answer's head, then its body: the connection may stay open after it.
            let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
            reader.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            let whole = |seen: &[u8]| {
                let text = String::from_utf8_lossy(seen);
                let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
                let length = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()));
                length.and_then(|l| l.parse::<usize>().ok()).is_none_or(|l| body.len() >= l)
            };
            while !whole(&seen) {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(got) => seen.extend_from_slice(&buf[..got]),
                }
            }
            let _ = answered.send((n, String::from_utf8_lossy(&seen).into_owned()));
        });
        uploads.push(tcp);
    }
    let mut refused = Vec::new();
    for _ in 0..2 {
        let answer = tokio::time::timeout(Duration::from_secs(90), answers.recv()).await.ok().flatten();
        let (n, answer) = answer.unwrap_or_else(|| panic!("alpha's uploads past its share were not refused: {refused:?}\n{}", edge.log()));
        assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
        assert!(answer.contains("RUNNER_BUSY") && answer.contains("caller alpha") && answer.contains("MAX_PENDING_BYTES"), "{answer}");
        refused.push(n);
    }
    let client = Client::new(&edge.url());
    let beta = client.send("POST", "/jobs", Some(BETA), Some(json!({"prompt": "beta's task"}).to_string().into_bytes())).await;
    assert_eq!(beta.status, 202, "beta was refused while alpha held an upload: {}", beta.text);
    let held = (0..3).find(|n| !refused.contains(n)).unwrap();
    uploads[held].write_all(&vec![b' '; LENGTH - 1000]).expect("the rest of the body is sent");
    let answer = tokio::time::timeout(Duration::from_secs(90), answers.recv()).await.ok().flatten();
    let (n, answer) = answer.expect("the upload read is answered");
    assert_eq!(n, held);
    assert!(answer.starts_with("HTTP/1.1 400 "), "the body read is answered: {answer}");
    drop(uploads);
}

/// A body cut short — its head declares 1000 bytes, 10 come, then nothing — is answered
/// 408 once its time is up (`edge_core::body::read_within_ms`: 30 s and a little more),
/// saying to send it again, on both hosts. Before, the Worker read such a body for ever,
/// its place among the isolate's bodies in flight (`MAX_PENDING_BYTES`) held with it: a
/// caller trickling bytes could hold the isolate's bound, every other pool's bodies 429.
async fn a_body_cut_short_is_answered_408(kind: EdgeKind) {
    use std::io::{Read, Write};
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let port = edge.port;
    let answer = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the edge listens");
        let head = format!(
            "POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Runner-Secret: {SECRET}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{\"prompt\":"
        );
        tcp.write_all(head.as_bytes()).expect("the head and the body's start are sent");
        tcp.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        // The answer until its body is whole (or the connection closed, or 90 s passed).
        let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
        loop {
            let text = String::from_utf8_lossy(&seen).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()));
                if length.and_then(|l| l.parse::<usize>().ok()).is_none_or(|l| body.len() >= l) {
                    return text;
                }
            }
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => return text,
                Ok(got) => seen.extend_from_slice(&buf[..got]),
            }
        }
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "a body cut short: {answer:?}\n{}", edge.log());
    assert!(answer.contains("INVALID_REQUEST") && answer.contains("send the request again"), "{answer}");
}

/// The jobs not ended are kept whole in the edge's memory, and loaded whole at its start:
/// ~100 `POST /jobs` of 1 MiB prompts ran a Worker pool's Durable Object out of memory at
/// every event after. Past `MAX_PENDING_BYTES` a submission is refused `429 RUNNER_BUSY`
/// saying so, after a restart too; a cancel makes room.
async fn jobs_not_ended_are_held_to_max_pending_bytes(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    // No agent: the jobs wait. 1 MiB holds two of these tasks (about 400 KB each), not three.
    let mut edge = EdgeServer::start(kind, &keys, &[("MAX_PENDING_BYTES", "1048576")]);
    let client = Client::new(&edge.url());
    let task = json!({"prompt": "x".repeat(400_000)});
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let a = client.submit(task.clone()).await;
        assert_eq!(a.status, 202, "{}", a.text);
        waiting.push(a.body["job_id"].as_str().unwrap().to_string());
    }
    let refused = |a: &Answer| {
        assert_eq!(a.status, 429, "{}", a.text);
        assert_eq!(a.body["error_code"], "RUNNER_BUSY", "{}", a.text);
        assert!(a.body["error"].as_str().unwrap().contains("MAX_PENDING_BYTES (1048576)"), "{}", a.text);
    };
    refused(&client.submit(task.clone()).await);
    // Restarted, the edge counts the jobs it loads.
    edge.restart();
    refused(&client.submit(task.clone()).await);
    let cancelled = client.send("DELETE", &format!("/jobs/{}", waiting[0]), Some(SECRET), None).await;
    assert_eq!(cancelled.status, 202, "{}", cancelled.text);
    assert_eq!(client.submit(task).await.status, 202, "a cancel makes room");
}

async fn a_timeout_kills_claude_and_its_children(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let pidfile = s.agent.data.path().join("child.pid");
    let prompt = format!("@spawn_child={} @sleep=60000 @ignore_term", pidfile.display());
    let a = s.client.execute(json!({"prompt": prompt, "timeout_ms": 1500})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["success"], false);
    assert_eq!(a.body["error_code"], "TIMEOUT");
    let child: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(eventually(Duration::from_secs(60), || !alive(child)).await, "the child {child} outlived the timeout");
    let job = s.client.get(&format!("/jobs/{}", a.body["job_id"].as_str().unwrap())).await;
    assert_eq!(job.body["state"], "timed_out");
}

async fn claude_errors_are_failures(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"prompt": "@is_error @exit=0"})).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["success"], false, "is_error decides, not the exit code");
    assert_eq!(a.body["error_code"], "CLAUDE_ERROR");
    assert!(a.body["error"].as_str().unwrap().contains("API Error: 500"));

    let a = s.client.execute(json!({"prompt": "@exit=3"})).await;
    assert_eq!(a.body["success"], true, "a result without is_error succeeds even with exit 3");
    assert_eq!(a.body["exit_code"], 3);

    let a = s.client.execute(json!({"prompt": "@garbage @exit=2"})).await;
    assert_eq!(a.body["success"], false);
    assert_eq!(a.body["error_code"], "CLAUDE_ERROR");
    assert!(a.body["error"].as_str().unwrap().contains("Segmentation fault"), "{}", a.text);

    let a = s.client.execute(json!({"prompt": "@no_result @exit=0"})).await;
    assert_eq!(a.body["success"], false);
    assert!(a.body["error"].as_str().unwrap().contains("without a result"));
}

/// Waits up to `within` for an async condition.
async fn eventually_async<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// How long `/health` takes to reach `status`, polled until `within`.
async fn health_after(client: &Client, status: u16, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if client.health().await.status == status {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

async fn an_auth_failure_says_log_in_again(kind: EdgeKind) {
    // Heartbeats every 10 min: what the edge learns within the 30 s bounds below, the
    // agent reported at once (a report left to the next heartbeat, 10 min after connect,
    // fails; with 10 s heartbeats and 3-4 s bounds it passed 1 in 3, and a loaded machine
    // could fail the fix).
    // The edge refuses a LOST_AFTER_MS under two heartbeat intervals.
    let s = setup(kind, &[("HEARTBEAT_INTERVAL_MS", "600000"), ("LOST_AFTER_MS", "1200000")], &[]).await;
    let a = s.client.execute(json!({"prompt": "@auth_error"})).await;
    assert_eq!(a.body["error_code"], "RUNNER_OAUTH_ERROR", "{}", a.text);
    assert_eq!(a.body["retryable"], true, "{}", a.text);
    let error = a.body["error"].as_str().unwrap();
    assert!(error.contains("log in") && error.contains("OAuth"), "callers look for `OAuth`: {error}");
    // The agent reports it at once (not with the next heartbeat): health turns unhealthy.
    assert!(health_after(&s.client, 503, Duration::from_secs(30)).await.is_some(), "the auth failure was not reported at once");
    let h = s.client.health_full().await;
    assert_eq!(h.body["status"], "unhealthy");
    assert_eq!(h.body["oauth"]["needs_login"], true);
    assert!(h.body["oauth"]["next_step"].as_str().unwrap().contains("log in again"), "{}", h.text);
    // New /execute calls fall back at once, without reaching Claude.
    let runs = s.agent.claude_runs().len();
    let started = Instant::now();
    let a = s.client.execute(json!({"prompt": "not now"})).await;
    // At once: not held for the job's time (300 s by default).
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(a.body["error_code"], "RUNNER_OAUTH_ERROR");
    assert_eq!(a.body["fallback"], true);
    assert!(a.body["error"].as_str().unwrap().contains("OAuth"), "{}", a.text);
    // A detached job waits for a login instead.
    let queued = s.client.submit(json!({"prompt": "after the new login"})).await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    let job_id = queued.body["job_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.client.get(&format!("/jobs/{job_id}")).await.body["state"], "queued");
    assert_eq!(s.agent.claude_runs().len(), runs, "nothing ran while the login was broken");
    // The credentials change (someone logged in on the runner): the edge knows within
    // about two seconds, and the held job runs by itself.
    let creds = s.agent.data.path().join("claude-config/.credentials.json");
    let file = json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-new-login-0123456789", "refreshToken": "sk-ant-ort01-new-login-0123456789",
        "expiresAt": 4_102_444_800_000u64, "scopes": ["user:inference"], "subscriptionType": "max"}});
    std::fs::write(&creds, file.to_string()).unwrap();
    // Seen by the agent within a second and reported at once (2 s promised; the bound is
    // slack for a loaded machine, far below the 10 min heartbeat).
    let seen = health_after(&s.client, 200, Duration::from_secs(30)).await;
    assert!(seen.is_some(), "the new login did not show within 30 s");
    let job = s.client.wait_job(&job_id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(s.client.execute(json!({"prompt": "fine now"})).await.body["success"], true);
}

/// A job queued while the agent is not logged in says so, and what to do: its view has
/// `waiting_for` naming the login, and `claude-runner submit` prints it (review rev22, 3:
/// `submit` said `queued`, then nothing for `QUEUE_TTL_MS`).
async fn a_job_queued_for_the_login_says_so_and_submit_shows_it(kind: EdgeKind) {
    // The wait bounds a submit that never says it: its job then ends, and submit with it.
    let s = setup_with(kind, &[("QUEUE_TTL_MS", "60000")], &[("CLAUDE_CODE_OAUTH_TOKEN", "")], false).await;
    agent_connected(&s.client).await;
    let queued = s.client.submit(json!({"prompt": "held for the login"})).await;
    assert_eq!((queued.status, queued.body["waiting_for"]["code"].as_str()), (202, Some("login")), "{}", queued.text);
    let job_id = queued.body["job_id"].as_str().unwrap();
    let view = s.client.get(&format!("/jobs/{job_id}")).await;
    assert_eq!((view.body["state"].as_str(), &view.body["waiting_for"]), (Some("queued"), &queued.body["waiting_for"]), "{}", view.text);
    let message = view.body["waiting_for"]["message"].as_str().unwrap();
    assert!(message.contains("login") && message.contains("`claude-runner login`"), "{message}");
    // `submit` says it, once, then waits on.
    let mut submit = std::process::Command::new(bin("claude-runner"))
        .args(["submit", "--edge", &s.edge.url(), "also held"])
        .env("RUNNER_SECRET", SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufRead::lines(std::io::BufReader::new(submit.stderr.take().unwrap()));
    let mut said = Vec::new();
    for line in stderr.map_while(Result::ok) {
        let waiting = line.starts_with("· waiting:");
        said.push(line);
        if waiting {
            break;
        }
    }
    let _ = submit.kill();
    let _ = submit.wait();
    let waiting = said.iter().find(|l| l.starts_with("· waiting:")).unwrap_or_else(|| panic!("submit never said why its job waits: {said:?}"));
    assert!(waiting.contains("`claude-runner login`"), "{said:?}");
}

/// The edge's advice to log in again offered a bare `claude auth login` "on the runner
/// machine", which logs in to `~/.claude` of whoever runs it: not the login of an agent
/// with a CLAUDE_CONFIG_DIR of its own (compose, systemd, `up`; review rev22, 9). It points
/// to README's "First login" instead, and its failure sentence still says `OAuth`.
async fn the_login_advice_offers_no_bare_claude_auth_login(kind: EdgeKind) {
    // The harness's agent has a CLAUDE_CONFIG_DIR of its own; no login is in it.
    let s = setup_with(kind, &[], &[("CLAUDE_CODE_OAUTH_TOKEN", "")], false).await;
    agent_connected(&s.client).await;
    let h = s.client.health_full().await;
    let next_step = h.body["oauth"]["next_step"].as_str().unwrap_or_else(|| panic!("no next_step: {}", h.text));
    assert!(!next_step.contains("`claude auth login`") && next_step.contains("First login") && next_step.contains("`claude-runner login`"), "{next_step}");
    let status = s.client.get("/oauth/status").await;
    assert_eq!(status.body["next_step"].as_str(), Some(next_step), "{}", status.text);
    let a = s.client.execute(json!({"prompt": "x"})).await;
    assert_eq!(a.body["error_code"], "RUNNER_OAUTH_ERROR", "{}", a.text);
    let error = a.body["error"].as_str().unwrap();
    assert!(error.contains("OAuth") && !error.contains("`claude auth login`") && error.contains("First login"), "{error}");
}

async fn the_login_relay_logs_the_agent_in_again(kind: EdgeKind) {
    // No login at all on the agent: no credentials file, no token.
    let s = setup_with(kind, &[], &[("CLAUDE_CODE_OAUTH_TOKEN", "")], false).await;
    agent_connected(&s.client).await;
    let h = s.client.health_full().await;
    assert_eq!((h.status, &h.body["status"], &h.body["oauth"]["needs_login"]), (503, &json!("unhealthy"), &json!(true)), "{}", h.text);
    let a = s.client.execute(json!({"prompt": "x"})).await;
    assert_eq!((a.status, a.body["error_code"].as_str()), (503, Some("RUNNER_OAUTH_ERROR")), "{}", a.text);
    let held = s.client.submit(json!({"prompt": "held for the login"})).await;
    let held_id = held.body["job_id"].as_str().unwrap().to_string();

    // Start: the agent's `claude auth login` prints its URL, which the caller gets.
    let secretless = s.client.send("POST", "/oauth/login", None, Some(b"{}".to_vec())).await;
    assert_eq!(secretless.status, 403);
    let start = s.client.send("POST", "/oauth/login", Some(SECRET), Some(b"{}".to_vec())).await;
    assert_eq!(start.status, 200, "{}", start.text);
    assert_eq!(start.body["state"], "awaiting_code");
    assert_eq!(start.body["agent_id"], "spark");
    let url = start.body["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://claude.ai/oauth/authorize?"), "{url}");
    let login_id = start.body["login_id"].as_str().unwrap().to_string();
    // The agent's signature over the URL came through the host untouched: it holds under
    // the agent's key for this login, agent and URL (what `claude-runner login` checks).
    let proof = start.body["url_proof"].as_str().expect("the agent's signature over the URL").to_string();
    let agent_key = s.edge.keys.agent("spark").verifying_key();
    shared::protocol::LoginUrlClaim::check(&proof, &agent_key, &login_id, "spark", &url).expect("the agent's claim holds");
    // One login at a time: asking again gives the same one, with its signature kept.
    let again = s.client.send("POST", "/oauth/login", Some(SECRET), None).await;
    assert_eq!(again.body["login_id"], login_id.as_str(), "{}", again.text);
    assert_eq!(again.body["url_proof"], proof.as_str(), "{}", again.text);
    let code = |login_id: &str, code: &str| json!({"login_id": login_id, "code": code}).to_string().into_bytes();
    let unknown = s.client.send("POST", "/oauth/login/code", Some(SECRET), Some(code("nope", "good-1"))).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text);
    for bad in [b"{}".to_vec(), b"[1]".to_vec(), code(&login_id, "two words"), code(&login_id, "")] {
        assert_eq!(s.client.send("POST", "/oauth/login/code", Some(SECRET), Some(bad)).await.status, 400);
    }
    // A wrong code: the login fails with a reason, and is over.
    let wrong = s.client.send("POST", "/oauth/login/code", Some(SECRET), Some(code(&login_id, "wrong-code-77"))).await;
    assert_eq!(wrong.status, 502, "{}", wrong.text);
    assert_eq!(wrong.body["error_code"], "RUNNER_OAUTH_ERROR");
    let why = wrong.body["error"].as_str().unwrap();
    assert!(why.contains("Invalid authorization code") && !why.contains("wrong-code-77"), "{why}");
    assert_eq!(s.client.get(&format!("/jobs/{held_id}")).await.body["state"], "queued", "jobs wait, not fail");

    // Again, with the right code: logged in, and the held job runs.
    let start = s.client.send("POST", "/oauth/login", Some(SECRET), Some(b"{}".to_vec())).await;
    let second_id = start.body["login_id"].as_str().unwrap().to_string();
    assert_ne!(second_id, login_id);
    let done = s.client.send("POST", "/oauth/login/code", Some(SECRET), Some(code(&second_id, "good-code-42"))).await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(done.body["state"], "logged_in");
    assert_eq!(done.body["oauth"]["needs_login"], false, "{}", done.text);
    assert_eq!(done.body["oauth"]["source"], "credentials_file");
    assert_eq!(done.body["oauth"]["subscription_type"], "max");
    assert!(!done.text.contains("sk-ant"), "no token in the answer: {}", done.text);
    s.client.wait_health(200).await;
    let job = s.client.wait_job(&held_id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    // The code and the URL were never logged, on either side.
    for log in [s.agent.log(), s.edge.log()] {
        for secret in ["good-code-42", "wrong-code-77", "oauth/authorize"] {
            assert!(!log.contains(secret), "{secret} in a log:\n{log}");
        }
    }
    assert!(s.agent.log().contains("login succeeded"), "{}", s.agent.log());
}

/// A relayed login started and abandoned before its code (the page closed, Ctrl-C or an
/// empty line given to `claude-runner login`) changes nothing on the runner: the agent
/// takes work, `/health` says so, and an `/execute` runs. Before, `/health` said healthy
/// while dispatch held every job for the ten minutes the relay waited, each `/execute`
/// waiting its whole `timeout_ms` to end TIMEOUT.
async fn a_login_abandoned_before_its_code_holds_no_work(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let start = s.client.send("POST", "/oauth/login", Some(SECRET), Some(b"{}".to_vec())).await;
    assert_eq!((start.status, &start.body["state"]), (200, &json!("awaiting_code")), "{}", start.text);
    let h = s.client.health_full().await;
    assert_eq!((h.status, &h.body["status"], &h.body["agents_taking_work"]), (200, &json!("healthy"), &json!(1)), "{}", h.text);
    assert_eq!(h.body["agents"][0]["takes_work"], true, "{}", h.text);
    let a = s.client.execute(json!({"prompt": "while a login waits for its code", "timeout_ms": 60_000})).await;
    assert_eq!((a.status, &a.body["success"]), (200, &json!(true)), "{}", a.text);
    // The login is still there to finish: its code logs the agent in.
    let login_id = start.body["login_id"].as_str().unwrap();
    let code = json!({"login_id": login_id, "code": "good-code-42"}).to_string().into_bytes();
    let done = s.client.send("POST", "/oauth/login/code", Some(SECRET), Some(code)).await;
    assert_eq!((done.status, &done.body["state"]), (200, &json!("logged_in")), "{}", done.text);
}

async fn a_used_up_usage_window_holds_work_until_its_reset(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"prompt": "@rate_limited=4"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    assert_eq!(a.body["retryable"], true);
    let retry_at = a.body["retry_at"].as_str().expect("retry_at").to_string();
    // /health: 503 unhealthy with the window — no agent can take work until the reset, and
    // a caller that decides by `response.ok` alone (TextGenerationWorkflow) falls back.
    let h = s.client.health_full().await;
    assert_eq!(h.status, 503, "{}", h.text);
    assert_eq!(h.body["status"], "unhealthy", "{}", h.text);
    assert_eq!(h.body["usage"]["status"], "rejected");
    assert_eq!(h.body["usage"]["type"], "five_hour");
    assert_eq!(h.body["usage"]["resets_at"], retry_at.as_str());
    // New /execute calls fall back at once, saying when to retry.
    let runs = s.agent.claude_runs().len();
    let resp = reqwest::Client::new()
        .post(format!("{}/execute", s.edge.url()))
        .header("X-Runner-Secret", SECRET)
        .body(json!({"prompt": "now?"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error_code"], "USAGE_LIMIT");
    assert_eq!(body["fallback"], true);
    assert_eq!(body["retry_at"], retry_at.as_str());
    let impatient = s.client.submit(json!({"prompt": "not waiting", "wait_for_usage": false})).await;
    assert_eq!((impatient.status, impatient.body["error_code"].as_str()), (503, Some("USAGE_LIMIT")), "{}", impatient.text);
    // A detached job waits for the reset, then runs by itself.
    let held = s.client.submit(json!({"prompt": "after the reset"})).await;
    assert_eq!(held.status, 202, "{}", held.text);
    let held_id = held.body["job_id"].as_str().unwrap().to_string();
    assert_eq!(s.client.get(&format!("/jobs/{held_id}")).await.body["state"], "queued");
    assert_eq!(s.agent.claude_runs().len(), runs, "nothing reached Claude while the window was used up");
    let job = s.client.wait_job(&held_id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let started = job["started_at"].as_str().unwrap();
    assert!(started >= retry_at.as_str(), "ran at {started}, before the reset at {retry_at}");
    s.client.wait_health(200).await;
    assert_eq!(s.client.health().await.body["status"], "healthy");
}

async fn a_used_up_usage_window_still_holds_work_after_the_agent_restarts(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let mut agent = s.agent;
    let a = s.client.execute(json!({"prompt": "@rate_limited=15"})).await;
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    let retry_at = a.body["retry_at"].as_str().expect("retry_at").to_string();
    // The agent restarts while the window is used up (an upgrade, a crash, a reboot).
    agent.restart();
    let status = agent.data.path().join("data/status.json");
    let reconnected = eventually(Duration::from_secs(30), || {
        std::fs::read_to_string(&status).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).is_some_and(|v| v["connected"] == true)
    });
    assert!(reconnected.await, "the restarted agent never connected");
    // The window is still used up: the edge still knows, and work still waits.
    let h = s.client.health_full().await;
    assert_eq!((h.status, &h.body["status"], &h.body["usage"]["status"]), (503, &json!("unhealthy"), &json!("rejected")), "{}", h.text);
    let held_id = submit_held(&s.client, &agent).await;
    let job = s.client.wait_job(&held_id, Duration::from_secs(40)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["started_at"].as_str().unwrap() >= retry_at.as_str(), "ran before the reset at {retry_at}: {job}");
}

/// A used-up window held the agent's work until its reset or a successful run, which
/// never came while the edge sent it nothing, and no operator could let it work again
/// (hostile review rev2: a forged line held it 8 days). `agent --clear-usage` tells the
/// running agent the window is open: the edge hears it at once and sends the held work.
async fn the_operator_clears_a_used_up_usage_window(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"prompt": "@rate_limited=3600"})).await;
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    let held_id = submit_held(&s.client, &s.agent).await;
    let data_dir = s.agent.data.path().join("data");
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(bin("claude-runner")).args(["agent", "--clear-usage"]).env("DATA_DIR", &data_dir).output().unwrap())
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && said.contains("the usage window is open"), "{said}{}", String::from_utf8_lossy(&out.stderr));
    let job = s.client.wait_job(&held_id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    s.client.wait_health(200).await;
    assert!(s.agent.log().contains("the operator cleared the usage window"), "{}", s.agent.log());
}

/// Submits a job while the agent's usage window is used up, and checks that it waits
/// (queued, half a second on) and that nothing reached Claude. Its id.
async fn submit_held(client: &Client, agent: &AgentProc) -> String {
    let runs = agent.claude_runs().len();
    let held = client.submit(json!({"prompt": "after the reset"})).await;
    let held_id = held.body["job_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.get(&format!("/jobs/{held_id}")).await.body["state"], "queued");
    assert_eq!(agent.claude_runs().len(), runs, "nothing reached Claude while the window was used up");
    held_id
}

/// An agent restarted twice within one heartbeat interval forgot its used-up usage window:
/// the status file its next start reads the window back from was rewritten at each start
/// without the login report, which came back only with the next heartbeat (15 s as
/// shipped). So a second restart before then started with the window open, told the edge
/// so, and the edge let the held jobs go to a Claude that would refuse them. Found by the
/// chaos soak's usage phases on the Worker (heartbeats 15 s there): held jobs started
/// before the reset after an agent was stopped twice in a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_usage_window_holds_across_two_quick_agent_restarts() {
    let s = setup(EdgeKind::Native, &[("HEARTBEAT_INTERVAL_MS", "600000"), ("LOST_AFTER_MS", "1200000")], &[]).await;
    let mut agent = s.agent;
    let a = s.client.execute(json!({"prompt": "@rate_limited=60"})).await;
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    let status = agent.data.path().join("data/status.json");
    for restart in 1..=2 {
        agent.restart();
        // Connected as the new process (the file is the old one's until it starts).
        let pid = agent.pid().unwrap();
        let reconnected = eventually(Duration::from_secs(30), || {
            std::fs::read_to_string(&status)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v["connected"] == true && v["pid"] == pid)
        });
        assert!(reconnected.await, "the agent never connected after restart {restart}");
    }
    let h = s.client.health_full().await;
    assert_eq!((h.status, &h.body["usage"]["status"]), (503, &json!("rejected")), "the window was forgotten: {}", h.text);
    submit_held(&s.client, &agent).await;
}

async fn an_auth_failure_still_stands_after_the_agent_restarts(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let mut agent = s.agent;
    let a = s.client.execute(json!({"prompt": "@auth_error"})).await;
    assert_eq!(a.body["error_code"], "RUNNER_OAUTH_ERROR", "{}", a.text);
    s.client.wait_needs_login().await;
    agent.restart();
    let status = agent.data.path().join("data/status.json");
    let reconnected = eventually(Duration::from_secs(30), || {
        std::fs::read_to_string(&status).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).is_some_and(|v| v["connected"] == true)
    });
    assert!(reconnected.await, "the restarted agent never connected");
    // Nothing changed the login: callers still fall back at once, nothing reaches Claude.
    let runs = agent.claude_runs().len();
    let h = s.client.health_full().await;
    assert_eq!((h.status, &h.body["oauth"]["needs_login"]), (503, &json!(true)), "{}", h.text);
    let a = s.client.execute(json!({"prompt": "not now"})).await;
    assert_eq!((a.status, a.body["error_code"].as_str()), (503, Some("RUNNER_OAUTH_ERROR")), "{}", a.text);
    assert_eq!(agent.claude_runs().len(), runs);
}

/// `claude auth login` closes its output and hangs: the relay still ends at the URL wait
/// (60 s) with the reason, and the process is killed. (Agent-side; the native edge only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_closes_its_output_and_hangs_is_ended() {
    let s = setup_with(EdgeKind::Native, &[], &[("CLAUDE_CODE_OAUTH_TOKEN", "")], false).await;
    s.client.wait_needs_login().await;
    let config = s.agent.data.path().join("claude-config");
    std::fs::write(config.join("standin-login-mute"), "").unwrap();
    let start = s.client.send("POST", "/oauth/login", Some(SECRET), Some(b"{}".to_vec())).await;
    assert_eq!((start.status, start.body["error_code"].as_str()), (502, Some("RUNNER_OAUTH_ERROR")), "{}", start.text);
    assert!(start.body["error"].as_str().unwrap().contains("no authorization URL"), "{}", start.text);
    let pid: i32 = std::fs::read_to_string(config.join("standin-login.pid")).unwrap().trim().parse().unwrap();
    let gone = eventually(Duration::from_secs(60), || {
        // A zombie (reaped by the agent a moment later) counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| st.split(' ').nth(2) == Some("Z"))
    });
    assert!(gone.await, "the hung `claude auth login` ({pid}) was left running");
}

/// A job runs as the agent's user, and `claude auth login` is dumpable after its `exec`:
/// its stdin, stdout and stderr were pipes, which any process of that user reopens
/// through `/proc/<pid>/fd/N` — to read the code the operator pasted as it goes into the
/// CLI, or to write a sign-in URL of its own for the operator to follow. They are socket
/// pairs now, which `/proc` does not reopen (ENXIO), and the CLI still takes its code.
/// (Agent-side; the native edge only. The real CLI: real_claude.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_cannot_reopen_a_relayed_logins_streams() {
    let s = setup_with(EdgeKind::Native, &[], &[("CLAUDE_CODE_OAUTH_TOKEN", "")], false).await;
    s.client.wait_needs_login().await;
    let start = s.client.send("POST", "/oauth/login", Some(SECRET), Some(b"{}".to_vec())).await;
    assert_eq!((start.status, &start.body["state"]), (200, &json!("awaiting_code")), "{}", start.text);
    let config = s.agent.data.path().join("claude-config");
    let pid: i32 = std::fs::read_to_string(config.join("standin-login.pid")).unwrap().trim().parse().unwrap();
    for fd in 0..3 {
        let path = format!("/proc/{pid}/fd/{fd}");
        let target = std::fs::read_link(&path).unwrap();
        assert!(target.to_string_lossy().starts_with("socket:["), "fd {fd} of `claude auth login` is {}", target.display());
        for write in [false, true] {
            let opened = std::fs::OpenOptions::new().read(!write).write(write).open(&path);
            assert!(opened.is_err(), "{path} opened for {}", if write { "writing" } else { "reading" });
        }
    }
    let code = json!({"login_id": start.body["login_id"], "code": "good-code-7"}).to_string().into_bytes();
    let done = s.client.send("POST", "/oauth/login/code", Some(SECRET), Some(code)).await;
    assert_eq!((done.status, &done.body["state"]), (200, &json!("logged_in")), "{}\n{}", done.text, s.agent.log());
}

/// A relayed login writes Claude's new login once it has the code: not while another
/// process on the same login (`doctor --canary`, another agent on the folder) lets a Claude
/// refresh it, whose write would then replace the new login. It waits at the refresh gate,
/// the lock in Claude's config folder, and goes on once the other lets go. (Agent-side;
/// the native edge only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_login_waits_for_a_refresh_another_process_lets_run() {
    let s = setup_with(EdgeKind::Native, &[], &[("CLAUDE_CODE_OAUTH_TOKEN", "")], false).await;
    let config = s.agent.data.path().join("claude-config");
    // A login whose access token expired and that can be refreshed: a refresh is due.
    // A login due a refresh, which another process holds the lock to make.
    let mut other = stale_login_with_the_refresh_held(&config).await;
    agent_connected(&s.client).await;
    let start = s.client.send("POST", "/oauth/login", Some(SECRET), Some(b"{}".to_vec())).await;
    assert_eq!(start.status, 200, "{}", start.text);
    let login_id = start.body["login_id"].as_str().unwrap().to_string();
    let client = s.client.clone();
    let code = json!({"login_id": login_id, "code": "good-code-42"}).to_string().into_bytes();
    let done = tokio::spawn(async move { client.send("POST", "/oauth/login/code", Some(SECRET), Some(code)).await });
    let waits = eventually(Duration::from_secs(60), || {
        let log = s.agent.log();
        log.lines().any(|l| l.contains("another process lets a Claude refresh this login") && l.contains(&login_id))
    });
    assert!(waits.await, "the login did not wait for the other process's refresh:\n{}", s.agent.log());
    // Still held: the login cannot have gone on.
    assert!(!done.is_finished(), "the login was answered while the other process held the lock");
    // With its code passed on, the login may change at any moment: work waits for it, and
    // /health counts the agent out as dispatch does.
    let h = s.client.health_full().await;
    assert_eq!((h.status, &h.body["agents_taking_work"]), (503, &json!(0)), "{}", h.text);
    let held = s.client.submit(json!({"prompt": "after the new login"})).await;
    let held_id = held.body["job_id"].as_str().unwrap().to_string();
    assert_eq!(s.client.get(&format!("/jobs/{held_id}")).await.body["state"], "queued");
    drop(other.stdin.take());
    other.wait().unwrap();
    let done = done.await.unwrap();
    assert_eq!((done.status, &done.body["state"]), (200, &json!("logged_in")), "{}", done.text);
    let job = s.client.wait_job(&held_id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
}

async fn failures_say_which_class_and_whether_to_retry(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    for (prompt, code, retryable) in [("@max_turns", "MAX_TURNS", false), ("@max_budget", "BUDGET_EXCEEDED", false), ("@is_error", "CLAUDE_ERROR", true)] {
        let a = s.client.execute(json!({"prompt": prompt, "max_budget_usd": 0.25})).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.body["error_code"], code, "{}", a.text);
        assert_eq!(a.body["retryable"], retryable, "{}", a.text);
    }
    let argv: Vec<String> = serde_json::from_value(s.agent.claude_runs()[0]["argv"].clone()).unwrap();
    assert!(argv.contains(&"--max-budget-usd=0.25".to_string()), "{argv:?}");
    let ok = s.client.execute(json!({"prompt": "fine"})).await;
    assert!(ok.body.get("retryable").is_none(), "only failures carry it: {}", ok.text);
    for bad in [json!({"prompt": "x", "max_budget_usd": 0}), json!({"prompt": "x", "max_budget_usd": "lots"}), json!({"prompt": "x", "max_budget_usd": -1})] {
        assert_eq!(s.client.execute(bad).await.status, 400);
    }
}

async fn alerts_reach_a_webhook_once_each(kind: EdgeKind) {
    let hook = Webhook::start(vec![]);
    let notify_url = hook.url("/runner-alerts");
    // Heartbeats 3 s apart: the edge hears that the usage window opened again from the
    // first heartbeat after its reset (15 s as shipped made this test 13 s longer), and a
    // pause of a loaded machine under 3 s drops no link (which would alert offline twice).
    let settings =
        [("NOTIFY_URL", notify_url.as_str()), ("OFFLINE_ALERT_MS", "2000"), ("OAUTH_WARN_HOURS", "24"), ("HEARTBEAT_INTERVAL_MS", "3000")];
    // A login that cannot refresh itself and ends in five hours: attention needed soon.
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &settings);
    let mut opts = AgentOpts::for_edge(&edge, "spark").env("CLAUDE_CODE_OAUTH_TOKEN", "");
    opts.claude_bin = bin("claude-standin");
    let mut agent = AgentProc::start(opts);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let creds = json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-alert-access-0123456789", "expiresAt": now + 5 * 3_600_000,
        "scopes": ["user:inference"], "subscriptionType": "max"}});
    std::fs::write(agent.data.path().join("claude-config/.credentials.json"), creds.to_string()).unwrap();
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let kinds = |hook: &Webhook| hook.received().iter().map(|h| h.headers.get("x-claude-runner-alert").cloned().unwrap_or_default()).collect::<Vec<_>>();
    assert!(eventually(Duration::from_secs(60), || kinds(&hook).contains(&"login_soon".to_string())).await, "{:?}", kinds(&hook));
    // The usage window is used up, then opens again two seconds later.
    let a = client.execute(json!({"prompt": "@rate_limited=2"})).await;
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    assert!(eventually(Duration::from_secs(60), || kinds(&hook).contains(&"usage_reset".to_string())).await, "{:?}", kinds(&hook));
    client.wait_online().await;
    // Claude fails to authenticate: log in now.
    let a = client.execute(json!({"prompt": "@auth_error"})).await;
    assert_eq!(a.body["error_code"], "RUNNER_OAUTH_ERROR", "{}", a.text);
    assert!(eventually(Duration::from_secs(60), || kinds(&hook).contains(&"login_needed".to_string())).await, "{:?}", kinds(&hook));
    // The agent goes away for longer than OFFLINE_ALERT_MS.
    agent.stop();
    assert!(eventually(Duration::from_secs(15), || kinds(&hook).contains(&"offline".to_string())).await, "{:?}", kinds(&hook));
    // Nothing twice, however many heartbeats and ticks went by.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = kinds(&hook);
    got.sort();
    assert_eq!(got, ["login_needed", "login_soon", "offline", "usage_rejected", "usage_reset"], "{:?}", hook.received());
    for h in hook.received() {
        assert_eq!(h.path, "/runner-alerts");
        assert!(h.headers.contains_key("title") && !h.body.is_empty(), "{h:?}");
        assert!(!h.body.contains("sk-ant") && !h.body.contains("0123456789"), "a token in an alert: {h:?}");
        // The default pool's alerts say nothing of pools (see worker_pool_alerts_go_to_the_pools_url_and_name_it).
        assert!(!h.headers.contains_key("x-claude-runner-pool") && !h.body.starts_with("Pool "), "{h:?}");
    }
    let offline = hook.received().into_iter().find(|h| h.headers["x-claude-runner-alert"] == "offline").unwrap();
    assert!(offline.body.contains("No agent has been connected"), "{}", offline.body);
}

/// The "open again" alert goes at the window's reset, not at the agent's next heartbeat:
/// with no work queued the edge woke at a usage hold's reset for nothing, so the alert
/// waited for the next heartbeat — here ten minutes — while /health already said open.
async fn the_usage_window_open_again_alert_goes_at_its_reset(kind: EdgeKind) {
    let hook = Webhook::start(vec![]);
    let notify_url = hook.url("/runner-alerts");
    let settings = [("NOTIFY_URL", notify_url.as_str()), ("HEARTBEAT_INTERVAL_MS", "600000"), ("LOST_AFTER_MS", "1200000")];
    let s = setup(kind, &settings, &[]).await;
    let kinds = |hook: &Webhook| hook.received().iter().map(|h| h.headers.get("x-claude-runner-alert").cloned().unwrap_or_default()).collect::<Vec<_>>();
    // The window is used up for two seconds; nothing waits for it.
    let a = s.client.execute(json!({"prompt": "@rate_limited=2"})).await;
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    assert!(eventually(Duration::from_secs(30), || kinds(&hook).contains(&"usage_rejected".to_string())).await, "{:?}", kinds(&hook));
    // Well before the next heartbeat, at 600 s.
    assert!(eventually(Duration::from_secs(60), || kinds(&hook).contains(&"usage_reset".to_string())).await, "{:?}", kinds(&hook));
    s.client.wait_health(200).await;
}

async fn callbacks_are_signed_and_retried(kind: EdgeKind) {
    use hmac::{Hmac, Mac};
    // The receiver fails twice, then takes it.
    let hook = Webhook::start(vec![500, 503]);
    let s = setup(kind, &[("CALLBACK_HOSTS", "127.0.0.1")], &[]).await;
    let a = s.client.submit(json!({"prompt": "call me back", "callback_url": hook.url("/result?job=1")})).await;
    assert!(a.body["job_id"].is_string(), "{}", a.text);
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    // Retried with backoff (2 s, then 4 s) until it is taken.
    assert!(eventually(Duration::from_secs(30), || hook.received().len() >= 3).await, "{:?}", hook.received());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = hook.received();
    assert_eq!(got.len(), 3, "not posted again once taken: {got:?}");
    for h in &got {
        assert_eq!(h.path, "/result?job=1");
        assert_eq!(h.headers["x-runner-job-id"], job_id);
        let timestamp = &h.headers["x-runner-timestamp"];
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.{}", h.body).as_bytes());
        let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(h.headers["x-runner-signature"], format!("sha256={expected}"), "signed with the runner secret");
        let body: serde_json::Value = serde_json::from_str(&h.body).unwrap();
        assert_eq!(body["job_id"], job_id.as_str());
        assert_eq!(body["state"], "succeeded");
        assert_eq!(body["result"]["output"], "stand-in answer to: call me back");
    }
    // Hosts not on CALLBACK_HOSTS, or plain http off this machine, are refused.
    for url in ["https://elsewhere.example.com/cb", "http://example.com/cb", "https://127.0.0.1.evil.com/cb"] {
        let a = s.client.submit(json!({"prompt": "x", "callback_url": url})).await;
        assert_eq!(a.status, 400, "{url}: {}", a.text);
        assert!(a.body["error"].as_str().unwrap().contains("callback_url"), "{}", a.text);
    }
}

async fn every_credential_state_shows_in_health_and_oauth_status(kind: EdgeKind) {
    // The agent reads its credentials file only (no token in its environment).
    let s = setup_with(kind, &[("HEARTBEAT_INTERVAL_MS", "10000")], &[("CLAUDE_CODE_OAUTH_TOKEN", "")], false).await;
    let creds = s.agent.data.path().join("claude-config/.credentials.json");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let h = 3_600_000u64;
    let file = |access_at: u64, refresh: bool, refresh_at: Option<u64>| {
        let mut entry = json!({"accessToken": format!("sk-ant-oat01-state-{access_at}"), "expiresAt": access_at, "scopes": ["user:inference"], "subscriptionType": "pro"});
        if refresh {
            entry["refreshToken"] = json!("sk-ant-ort01-state-refresh");
        }
        if let Some(t) = refresh_at {
            entry["refreshTokenExpiresAt"] = json!(t);
        }
        json!({"claudeAiOauth": entry}).to_string()
    };
    // (file, /health status code, status, needs_login, source)
    let states: Vec<(Option<String>, u16, &str, bool, &str)> = vec![
        (None, 503, "unhealthy", true, "none"),
        (Some(file(now + 8 * h, true, None)), 200, "healthy", false, "credentials_file"),
        (Some(file(now - h, true, None)), 200, "healthy", false, "credentials_file"),
        (Some(file(now + h, false, None)), 200, "degraded", false, "credentials_file"),
        (Some(file(now - h, false, None)), 503, "unhealthy", true, "credentials_file"),
        (Some(file(now + 8 * h, true, Some(now + 2 * h))), 200, "degraded", false, "credentials_file"),
        (Some(file(now - h, true, Some(now - 1))), 503, "unhealthy", true, "credentials_file"),
        (Some("{not json".to_string()), 503, "unhealthy", true, "none"),
    ];
    for (i, (content, code, status, needs_login, source)) in states.into_iter().enumerate() {
        match &content {
            Some(text) => std::fs::write(&creds, text).unwrap(),
            None => {
                let _ = std::fs::remove_file(&creds);
            }
        }
        // Each change is reported at once (heartbeats are 10 s apart here).
        let client = s.client.clone();
        let shown = eventually_async(Duration::from_secs(5), || {
            let client = client.clone();
            async move {
                let h = client.health_full().await;
                h.status == code && h.body["status"] == status && h.body["oauth"]["source"] == source
            }
        });
        assert!(shown.await, "state {i}: {}", s.client.health_full().await.text);
        let o = s.client.get("/oauth/status").await;
        assert_eq!(o.status, 200, "{}", o.text);
        assert_eq!((o.body["needs_login"].as_bool(), o.body["source"].as_str()), (Some(needs_login), Some(source)), "state {i}: {}", o.text);
        assert_eq!(o.body.get("next_step").is_some(), status != "healthy", "state {i}: {}", o.text);
        assert!(!o.text.contains("sk-ant"), "no token: {}", o.text);
    }
}

/// A receiver on 127.0.0.1 that takes connections and reads nothing, answers nothing,
/// closes nothing: its port, and the connections it holds.
fn mute_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>) {
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = mute.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let holding = std::sync::Arc::clone(&held);
    std::thread::spawn(move || {
        for stream in mute.incoming().flatten() {
            holding.lock().unwrap().push(stream);
        }
    });
    (port, held)
}

/// A callback receiver that takes the request and never answers holds up no other
/// delivery: the Worker posted one at a time, so every other job's callback (and every
/// alert) waited behind it for its 15 s timeout, each time it was tried again.
async fn a_callback_receiver_that_never_answers_holds_up_no_other(kind: EdgeKind) {
    let hook = Webhook::start(vec![]);
    let (mute_port, held) = mute_receiver();
    let s = setup(kind, &[("CALLBACK_HOSTS", "127.0.0.1")], &[]).await;
    let stuck = s.client.submit(json!({"prompt": "to nobody", "callback_url": format!("http://127.0.0.1:{mute_port}/cb")})).await;
    assert!(stuck.body["job_id"].is_string(), "{}", stuck.text);
    assert!(eventually(Duration::from_secs(30), || !held.lock().unwrap().is_empty()).await, "the mute receiver was never called");
    let a = s.client.submit(json!({"prompt": "call me back", "callback_url": hook.url("/ok")})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(30), || !hook.received().is_empty()).await, "the other callback never came");
    assert_eq!(hook.received()[0].headers["x-runner-job-id"], job_id);
    // It came while the edge still waited on the mute receiver (it gives up after 15 s and
    // says so), not after.
    let log = s.edge.log();
    let stuck_id = stuck.body["job_id"].as_str().unwrap();
    let gave_up = log.lines().any(|l| l.contains(stuck_id) && l.contains("callback failed"));
    assert!(!gave_up, "the other callback came only once the edge gave up on the mute receiver:\n{log}");
    drop(held);
}

/// Posts on their way hold up none of the edge's deadlines: the Worker makes its POSTs from
/// the alarm, which ran the machine's deadlines only once every POST was done, so a
/// receiver that never answers (15 s each), sent a new callback before the last was given
/// up, kept every deadline from coming — here a finished job's retention; the same held
/// silent agents, timeouts, lost jobs, the queue's waits and callbacks' retries.
async fn callbacks_on_their_way_hold_up_no_deadline(kind: EdgeKind) {
    let (mute_port, held) = mute_receiver();
    let s = setup(kind, &[("CALLBACK_HOSTS", "127.0.0.1"), ("JOB_RETENTION_MS", "3000")], &[]).await;
    let to_mute = json!({"prompt": "to nobody", "callback_url": format!("http://127.0.0.1:{mute_port}/cb")});
    assert!(s.client.submit(to_mute.clone()).await.body["job_id"].is_string());
    assert!(eventually(Duration::from_secs(30), || !held.lock().unwrap().is_empty()).await, "the mute receiver was never called");
    let a = s.client.execute(json!({"prompt": "kept for 3 s"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    // A new callback to the mute receiver every 2 s, each on its way for 15 s.
    let mut forgotten = false;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(s.client.submit(to_mute.clone()).await.body["job_id"].is_string());
        if s.client.get(&format!("/jobs/{job_id}")).await.status == 404 {
            forgotten = true;
            break;
        }
    }
    assert!(forgotten, "a job kept for 3 s was still kept 30 s on, while callbacks were on their way:\n{}", s.edge.log());
    drop(held);
}

/// What a receiver that never answers saw of the edge's connections to it: how many it
/// took, how many the edge closed, and the most open at once.
#[derive(Default, Clone, Copy, Debug)]
struct Seen {
    opened: usize,
    closed: usize,
    most_open: usize,
}

/// A receiver on 127.0.0.1 that takes connections, reads what comes and never answers,
/// noting each the edge closes. One thread, sockets polled without blocking: after taking
/// new connections it looks at every open one for its close before it counts them, so an
/// edge that closed one connection before it opened the next is never counted as holding
/// both (two threads could see the two the other way round).
fn mute_receiver_that_counts() -> (u16, std::sync::Arc<std::sync::Mutex<Seen>>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let noting = std::sync::Arc::downgrade(&seen);
    std::thread::spawn(move || {
        let mut open: Vec<std::net::TcpStream> = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        // Until the test lets go of what it reads.
        while let Some(seen) = noting.upgrade() {
            let mut took = 0;
            while let Ok((stream, _)) = listener.accept() {
                stream.set_nonblocking(true).unwrap();
                open.push(stream);
                took += 1;
            }
            let before = open.len();
            open.retain_mut(|stream| loop {
                match stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            });
            let mut seen = seen.lock().unwrap();
            seen.opened += took;
            seen.closed += before - open.len();
            seen.most_open = seen.most_open.max(open.len());
            drop(seen);
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (port, seen)
}

/// An attempt the edge gives up on (its receiver did not answer within the delivery
/// timeout, 15 s) closes its connection, so a receiver that never answers holds no more
/// than its share of the edge's connections. The Worker dropped only its own wait: the
/// runtime's fetch went on, its connection open for good, and each new attempt opened
/// another (64 open after three minutes) — while Cloudflare lets an invocation wait on a
/// few connections at once and queues the rest, so other receivers' callbacks and
/// NOTIFY_URL alerts never went out.
async fn a_callback_attempt_given_up_closes_its_connection(kind: EdgeKind) {
    // edge_core::machine::MAX_CALLBACKS_PER_RECEIVER (the tests do not link the core).
    const MAX_CALLBACKS_PER_RECEIVER: usize = 4;
    let (port, seen) = mute_receiver_that_counts();
    // No agent: a job cancelled while queued posts its callback at once.
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[("CALLBACK_HOSTS", "127.0.0.1")]);
    let client = Client::new(&edge.url());
    cancel_jobs_with_callbacks(&client, port, 8).await;
    let now = || *seen.lock().unwrap();
    assert!(eventually(Duration::from_secs(60), || now().opened >= MAX_CALLBACKS_PER_RECEIVER).await, "{:?}\n{}", now(), edge.log());
    // Each attempt of the first round is given up at its timeout and its connection
    // closed; then the next round's (the other jobs' first attempts) are given up too.
    let closed = eventually(Duration::from_secs(120), || now().closed >= 2 * MAX_CALLBACKS_PER_RECEIVER).await;
    assert!(closed, "the edge left the connections of attempts it gave up open: {:?}\n{}", now(), edge.log());
    let seen = now();
    assert!(seen.most_open <= MAX_CALLBACKS_PER_RECEIVER, "more connections open at once than the receiver's share: {seen:?}");
}

async fn megabytes_of_output_do_not_hang(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"prompt": "@megabytes=8", "timeout_ms": 60000})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["success"], true);
}

async fn a_missing_claude_binary_is_a_clear_failure(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    opts.claude_bin = "/nonexistent/claude".into();
    let _agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let a = client.execute(json!({"prompt": "x"})).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["success"], false);
    assert_eq!(a.body["error_code"], "CLAUDE_ERROR");
    assert!(a.body["error"].as_str().unwrap().contains("CLAUDE_BIN"), "{}", a.text);
}

async fn tokens_never_leave_the_machine(kind: EdgeKind) {
    use base64::Engine;
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"prompt": "@print_env=CLAUDE_CODE_OAUTH_TOKEN"})).await;
    assert_eq!(a.status, 200);
    assert!(!a.text.contains("test-token-not-real"), "token leaked: {}", a.text);
    assert!(a.text.contains("[REDACTED]"));
    // The agent's own key is not Claude's to see: with it, whoever holds RUNNER_SECRET
    // could pose as the agent (as a container's or a unit's environment has it).
    let key = shared::keys::encode_signing(s.edge.keys.agent("spark"));
    let a = s.client.execute(json!({"prompt": "@print_env=AGENT_SIGNING_KEY"})).await;
    assert_eq!(a.body["output"], "the value is ", "{}", a.text);
    assert!(!a.text.contains(&key));

    // The login file, printed whole in base64 (as `base64 ~/.claude/.credentials.json`
    // would), with tokens that do not even look like Anthropic's.
    let creds = s.agent.data.path().join("claude-config/.credentials.json");
    let access = "opaque-access-value-0123456789abcdef";
    let refresh = "opaque-refresh-value-fedcba9876543210";
    let file = json!({"claudeAiOauth": {"accessToken": access, "refreshToken": refresh,
        "expiresAt": 4_102_444_800_000u64, "scopes": ["user:inference"], "subscriptionType": "max"}});
    std::fs::write(&creds, file.to_string()).unwrap();
    let a = s.client.execute(json!({"prompt": format!("@base64={}", creds.display())})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    // Wrapped at 76 columns, as coreutils prints it: each line break is a `\n` inside the
    // stream-json string. What survives is read without them.
    let printed: String = a.body["output"].as_str().unwrap().trim_start_matches("the file is").split_whitespace().collect::<String>().replace("[REDACTED]", "");
    let engine = base64::engine::general_purpose::STANDARD;
    for secret in [access, refresh] {
        // Whatever survived, decoded at any alignment, does not hold the token.
        for skip in 0..4 {
            let tail: String = printed.chars().skip(skip).collect();
            let usable = tail.len() / 4 * 4;
            let decoded = String::from_utf8_lossy(&engine.decode(&tail[..usable]).unwrap_or_default()).into_owned();
            assert!(!decoded.contains(&secret[4..secret.len() - 4]), "{secret} leaked in base64: {decoded}");
        }
        assert!(!a.text.contains(secret));
    }
    assert!(a.text.contains("[REDACTED]"), "{}", a.text);

    // Nor in the progress events (the tool's output, as Claude Code reports it), nor in
    // the agent's log.
    // The stand-in waits after its first event, so the follower is there before the job
    // ends (an ended job's events are gone; under load a quick one could end first).
    let job = s.client.submit(json!({"prompt": format!("@sleep=2000 @base64={}", creds.display())})).await;
    let (_, _, events) = s.client.follow(job.body["job_id"].as_str().unwrap()).await;
    assert!(events.len() >= 4, "{events:?}");
    for (_, data) in &events {
        let event: serde_json::Value = serde_json::from_str(data).unwrap();
        let text = event["message"]["content"][0]["content"].as_str().or(event["output"].as_str()).unwrap_or_default();
        let printed: String = text.trim_start_matches("the file is").split_whitespace().collect::<String>().replace("[REDACTED]", "");
        for secret in [access, refresh] {
            for skip in 0..4 {
                let tail: String = printed.chars().skip(skip).collect();
                let decoded = String::from_utf8_lossy(&engine.decode(&tail[..tail.len() / 4 * 4]).unwrap_or_default()).into_owned();
                assert!(!decoded.contains(&secret[4..secret.len() - 4]), "{secret} leaked in an event: {decoded}");
            }
        }
    }
    assert!(events.iter().any(|(_, d)| d.contains("[REDACTED]")), "{events:?}");
    assert!(!s.agent.log().contains("test-token-not-real"));
    assert!(!s.agent.log().contains(access));
}

async fn the_agent_reconnects_after_an_edge_restart(kind: EdgeKind) {
    let mut s = setup(kind, &[], &[]).await;
    let done = s.client.execute(json!({"prompt": "before restart"})).await;
    let job_id = done.body["job_id"].as_str().unwrap().to_string();
    s.edge.restart();
    // A finished job is still readable after the restart.
    let job = s.client.get(&format!("/jobs/{job_id}")).await;
    assert_eq!(job.status, 200, "{}", job.text);
    assert_eq!(job.body["state"], "succeeded");
    assert_eq!(job.body["result"]["output"], "stand-in answer to: before restart");
    // The agent comes back by itself and work flows again.
    s.client.wait_online().await;
    assert_eq!(s.client.execute(json!({"prompt": "after restart"})).await.body["success"], true);
}

async fn a_job_in_flight_survives_an_edge_restart(kind: EdgeKind) {
    // The agent is away while the edge restarts: a 5 s LOST_AFTER_MS is about what a
    // Worker under Miniflare at load 9 takes to come back and be dialed again (once the
    // job ended `lost` at 8.7 s), and ending jobs of agents away is not this test's matter.
    let mut s = setup(kind, &[("LOST_AFTER_MS", "60000")], &[]).await;
    let a = s.client.submit(json!({"prompt": "@sleep=2500 slow one"})).await;
    assert!(a.body["job_id"].is_string(), "{}", a.text);
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(60), || !s.agent.claude_runs().is_empty()).await);
    s.edge.restart();
    let job = s.client.wait_job(&job_id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["output"], "stand-in answer to: @sleep=2500 slow one");
    assert_eq!(s.agent.claude_runs().len(), 1, "it ran once");
}

async fn a_vanished_agent_makes_the_job_lost(kind: EdgeKind) {
    let mut s = setup(kind, &[("LOST_AFTER_MS", "2000"), QUICK_HEARTBEATS], &[]).await;
    let client = s.client.clone();
    let waiter = tokio::spawn(async move { client.execute(json!({"prompt": "@sleep=30000"})).await });
    assert!(eventually(Duration::from_secs(60), || !s.agent.claude_runs().is_empty()).await);
    s.agent.kill();
    let a = waiter.await.unwrap();
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(a.body["error_code"], "RUNNER_LOST");
    assert_eq!(a.body["fallback"], true);
}

async fn an_agent_that_stops_mid_job_tells_the_caller_to_fall_back(kind: EdgeKind) {
    // The waiting caller is told once the edge gives the agent up (LOST_AFTER_MS).
    let mut s = setup(kind, &QUICK_LOSS, &[]).await;
    let client = s.client.clone();
    let waiter = tokio::spawn(async move { client.execute(json!({"prompt": "@sleep=30000"})).await });
    assert!(eventually(Duration::from_secs(60), || !s.agent.claude_runs().is_empty()).await);
    s.agent.stop(); // SIGTERM: a clean stop, as systemd or docker would do
    let a = waiter.await.unwrap();
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(a.body["error_code"], "RUNNER_LOST");
    assert_eq!(a.body["fallback"], true);
    assert!(a.body["error"].as_str().unwrap().contains("agent"), "{}", a.text);
}

async fn a_low_max_timeout_still_accepts_requests_without_timeout_ms(kind: EdgeKind) {
    let s = setup(kind, &[("MAX_TIMEOUT_MS", "60000")], &[]).await;
    let a = s.client.execute(json!({"prompt": "x"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = s.client.execute(json!({"prompt": "x", "timeout_ms": 60001})).await;
    assert_eq!(a.status, 400, "{}", a.text);
}

async fn an_unknown_agent_is_refused(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    opts.key = random_key(); // not the key the edge knows
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    // Refused at the upgrade (no socket), and said at every dial, not once and then
    // silence: an agent with a wrong key keeps saying so until someone fixes it.
    let said = |log: &str| log.lines().filter(|l| l.contains("the edge refused this agent") && l.contains("AGENT_PROOF_INVALID")).count();
    assert!(eventually(Duration::from_secs(60), || said(&agent.log()) >= 2).await, "{}", agent.log());
    assert!(agent.log().contains("AGENT_SIGNING_KEY matches"), "the reason says what to fix: {}", agent.log());
    assert_eq!(client.health().await.status, 503);
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    opts.id = "stranger";
    let agent = AgentProc::start(opts);
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("unknown agent")).await, "{}", agent.log());
}

async fn idempotent_submits_run_once(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let body = json!({"prompt": "once", "idempotency_key": "k-1"});
    let a = s.client.submit(body.clone()).await;
    let b = s.client.submit(body.clone()).await;
    assert_eq!(a.body["job_id"], b.body["job_id"]);
    s.client.wait_job(a.body["job_id"].as_str().unwrap(), Duration::from_secs(20)).await;
    let c = s.client.execute(body).await;
    assert_eq!(c.body["job_id"], a.body["job_id"]);
    // The same key and task placed elsewhere is not a repeat (review rev10, 4).
    let elsewhere = s.client.submit(json!({"prompt": "once", "idempotency_key": "k-1", "labels": "gpu=x"})).await;
    assert_eq!((elsewhere.status, &elsewhere.body["job_id"]), (409, &a.body["job_id"]), "{}", elsewhere.text);
    assert_eq!(s.agent.claude_runs().len(), 1);
}

/// Review rev36a, 1: a keyed job that ended without ever reaching an agent (here its wait
/// in the queue ran out behind the busy slot) kept its key, and every repeat was given its
/// stored end for JOB_RETENTION_MS, though it can never run. A repeat makes a new job in
/// its place, which runs once; the old one stays readable.
async fn a_repeat_of_the_key_of_a_job_that_never_ran_runs_the_task(kind: EdgeKind) {
    let s = setup(kind, &[("QUEUE_TTL_MS", "1500")], &[]).await;
    let busy = s.client.submit(json!({"prompt": "@sleep=4000 holding the one slot"})).await;
    let busy = busy.body["job_id"].as_str().unwrap().to_string();
    let body = json!({"prompt": "once", "idempotency_key": "k-expired"});
    let first = s.client.submit(body.clone()).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let old = first.body["job_id"].as_str().unwrap().to_string();
    let ended = s.client.wait_job(&old, Duration::from_secs(60)).await;
    assert_eq!((ended["state"].as_str(), ended["result"]["error_code"].as_str()), (Some("timed_out"), Some("TIMEOUT")), "{ended}");
    assert_eq!(s.client.wait_job(&busy, Duration::from_secs(60)).await["state"], "succeeded");
    let again = s.client.execute(body.clone()).await;
    assert_eq!((again.status, again.body["success"].as_bool()), (200, Some(true)), "{}", again.text);
    assert_ne!(again.body["job_id"], json!(old), "a new job");
    // The key names the new job now; the old one is still there to read.
    let repeat = s.client.submit(body).await;
    assert_eq!((repeat.status, &repeat.body["job_id"]), (200, &again.body["job_id"]), "{}", repeat.text);
    assert_eq!(s.client.get(&format!("/jobs/{old}")).await.body["state"], "timed_out");
    let runs: Vec<String> = s.agent.claude_runs().iter().map(|r| r["prompt"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(runs.iter().filter(|p| *p == "once").count(), 1, "{runs:?}");
}

/// `/execute` callers repeating the key of a job wait on it, up to 16 (the next is told
/// 429 at once, where to read the job). On the native edge one that hangs up gives its
/// place back; the Worker's object is not told of a hang-up (the workerd these tests run
/// aborted no request's signal when its client went, `enable_request_signal` or not), so
/// there a hung-up caller keeps its place until the job ends — held to the same caps.
async fn execute_repeats_of_one_job_are_capped(kind: EdgeKind) {
    const PER_JOB: usize = 16; // edge_core::machine::MAX_WAITERS_PER_JOB
    let s = setup(kind, &[], &[]).await;
    let body = json!({"prompt": "@sleep=240000 held", "idempotency_key": "k-held"});
    let queued = s.client.submit(body.clone()).await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    let id = queued.body["job_id"].as_str().unwrap().to_string();
    let repeat = |within: Option<Duration>| {
        let mut http = reqwest::Client::builder().no_proxy();
        if let Some(within) = within {
            http = http.timeout(within);
        }
        http.build().unwrap().post(format!("{}/execute", s.edge.url())).header("X-Runner-Secret", SECRET).json(&body).send()
    };
    // One more than the job takes, at once: exactly one is refused, whichever came last.
    let (told, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let waiting: Vec<_> = (0..=PER_JOB)
        .map(|_| {
            let (told, sent) = (told.clone(), repeat(None));
            tokio::spawn(async move {
                let r = sent.await.expect("the edge answers");
                let _ = told.send((r.status().as_u16(), r.text().await.unwrap_or_default()));
            })
        })
        .collect();
    let (status, text) = answers.recv().await.unwrap();
    assert_eq!(status, 429, "{text}");
    assert!(text.contains(&id) && text.contains("RUNNER_BUSY"), "{text}");
    let refused = s.client.execute(body.clone()).await;
    assert_eq!((refused.status, &refused.body["error_code"], &refused.body["job_id"]), (429, &json!("RUNNER_BUSY"), &json!(id)), "{}", refused.text);
    assert!(refused.text.contains(&format!("GET /jobs/{id}")), "{}", refused.text);
    // They hang up. On the native edge a repeat waits again (its request still unanswered
    // when this one gives up on it), and the job has not ended meanwhile.
    for w in &waiting {
        w.abort();
    }
    if kind == EdgeKind::Worker {
        assert_eq!(s.client.send("DELETE", &format!("/jobs/{id}"), Some(SECRET), None).await.status, 202);
        return;
    }
    // A 429 until the edge has seen them go.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(repeat(Some(Duration::from_secs(2))).await, Err(e) if e.is_timeout()) {
        assert!(Instant::now() < deadline, "the callers that hung up still hold every place");
    }
    assert_eq!(s.client.get(&format!("/jobs/{id}")).await.body["state"], "running");
    assert_eq!(s.client.send("DELETE", &format!("/jobs/{id}"), Some(SECRET), None).await.status, 202);
}

/// A caller whose answer was lost sends its key again after the caps forgot the job
/// (`MAX_RETAINED_JOBS=1`: one other job ended meanwhile): it is told the job ran and how it
/// ended (410 `JOB_FORGOTTEN`), on `/execute` and `POST /jobs`, and after the edge restarts —
/// and the task does not run again (the chaos soak saw it run twice when the key went with
/// the record).
async fn a_key_outlives_its_forgotten_job_and_runs_nothing_again(kind: EdgeKind) {
    let mut s = setup(kind, &[("MAX_RETAINED_JOBS", "1")], &[]).await;
    let body = json!({"prompt": "once", "idempotency_key": "k-1"});
    let first = s.client.execute(body.clone()).await;
    assert_eq!(first.body["success"], true, "{}", first.text);
    let id = first.body["job_id"].as_str().unwrap().to_string();
    let other = s.client.execute(json!({"prompt": "another"})).await;
    assert_eq!(other.body["success"], true, "{}", other.text);
    assert_eq!(s.client.get(&format!("/jobs/{id}")).await.status, 404, "the cap forgot the first job");
    let told = |a: &Answer| {
        assert_eq!((a.status, &a.body["error_code"], &a.body["job_id"], &a.body["state"]), (410, &json!("JOB_FORGOTTEN"), &json!(id), &json!("succeeded")), "{}", a.text);
        assert!(a.body.get("fallback").is_none(), "it ran: no fallback ({})", a.text);
    };
    told(&s.client.execute(body.clone()).await);
    told(&s.client.submit(body.clone()).await);
    s.edge.restart();
    told(&s.client.submit(body.clone()).await);
    let conflict = s.client.submit(json!({"prompt": "a different task", "idempotency_key": "k-1"})).await;
    assert_eq!(conflict.status, 409, "{}", conflict.text);
    // So is the same task for another agent: the forgotten job's key keeps its placement's digest.
    let elsewhere = s.client.submit(json!({"prompt": "once", "idempotency_key": "k-1", "agent_id": "other"})).await;
    assert_eq!(elsewhere.status, 409, "{}", elsewhere.text);
    let prompts: Vec<String> = s.agent.claude_runs().iter().map(|r| r["prompt"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(prompts, ["once", "another"], "the keyed task ran once");
}

/// A header's value may carry bytes past ASCII (`Idempotency-Key: clé`, as UTF-8): the
/// native edge took such a header for no header at all, so a retried submit ran the task
/// twice, and a `Last-Event-ID` never sent replayed the stream from the start instead of
/// the 400 the Worker gives. Then it read them as Latin-1 (a character a byte) and trimmed
/// Unicode's whitespace where the Worker reads UTF-8 and trims HTTP's: the same request got
/// another status on each host. Each answer below is the one both hosts give.
async fn headers_with_bytes_past_ascii_are_read_not_dropped(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let key = "clé-1".as_bytes();
    let a = s.client.send_with_header("POST", "/jobs", Some(json!({"prompt": "once"})), "Idempotency-Key", key).await;
    let b = s.client.send_with_header("POST", "/jobs", Some(json!({"prompt": "once"})), "Idempotency-Key", key).await;
    assert!(a.body["job_id"].is_string(), "{}", a.text);
    assert_eq!(a.body["job_id"], b.body["job_id"], "one job for one key\n{}\n{}", a.text, b.text);
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    s.client.wait_job(&job_id, Duration::from_secs(20)).await;
    assert_eq!(s.agent.claude_runs().len(), 1);
    let resumed = s.client.send_with_header("GET", &format!("/jobs/{job_id}/events"), None, "Last-Event-ID", "١٢".as_bytes()).await;
    assert_eq!(resumed.status, 400, "{}", resumed.text);
    assert!(resumed.text.contains("Last-Event-ID"), "{}", resumed.text);
    // 100 × `é`: 200 bytes of UTF-8, under the key's 256 (as Latin-1, 400).
    let long = "é".repeat(100);
    let keyed = s.client.send_with_header("POST", "/jobs", Some(json!({"prompt": "keyed"})), "Idempotency-Key", long.as_bytes()).await;
    assert_eq!(keyed.status, 202, "{}", keyed.text);
    // The secret and HTTP's own whitespace around it opens the edge; followed by anything
    // else (byte A0, U+00A0 in UTF-8, U+3000) it is a wrong secret.
    let http = reqwest::Client::new();
    let with_secret = |bytes: Vec<u8>| {
        let value = reqwest::header::HeaderValue::from_bytes(&bytes).expect("a header value's bytes");
        http.get(format!("{}/jobs", s.edge.url())).header("X-Runner-Secret", value).send()
    };
    let around = |before: &[u8], after: &[u8]| [before, SECRET.as_bytes(), after].concat();
    for (bytes, status) in [
        (around(b" \t", b"\t "), 200),
        (around(b"", b"\xa0"), 403),
        (around(b"", "\u{a0}".as_bytes()), 403),
        (around("\u{3000}".as_bytes(), b""), 403),
    ] {
        let answer = with_secret(bytes.clone()).await.expect("the edge answers");
        assert_eq!(answer.status().as_u16(), status, "{bytes:?}: {}", answer.text().await.unwrap_or_default());
    }
}

/// A header sent twice is read as the Worker's runtime reads it (Fetch joins the values
/// with `, `): the native edge took the first alone, so `X-Runner-Secret: <secret>` then
/// `X-Runner-Secret: <anything>` was let in there and refused on the Worker, and two
/// `Idempotency-Key`s named one job there and another on the Worker.
async fn a_header_sent_twice_is_read_the_same_on_both_hosts(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let http = reqwest::Client::new();
    let twice = |first: &str, second: &str| {
        http.get(format!("{}/jobs", s.edge.url())).header("X-Runner-Secret", first).header("X-Runner-Secret", second)
    };
    for (first, second) in [(SECRET, "wrong-secret-0123456789"), ("wrong-secret-0123456789", SECRET)] {
        let resp = twice(first, second).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 403, "secrets {first} then {second}: {}", resp.text().await.unwrap());
    }
    let submit = |keys: &[&str]| {
        let mut req = http.post(format!("{}/jobs", s.edge.url())).header("X-Runner-Secret", SECRET);
        for key in keys {
            req = req.header("Idempotency-Key", *key);
        }
        req.header("content-type", "application/json").body(json!({"prompt": "@sleep=200 keyed"}).to_string()).send()
    };
    let job = |resp: reqwest::Response| async move { resp.json::<serde_json::Value>().await.unwrap()["job_id"].as_str().unwrap().to_string() };
    let both = job(submit(&["k-1", "k-2"]).await.unwrap()).await;
    let joined = job(submit(&["k-1, k-2"]).await.unwrap()).await;
    let first = job(submit(&["k-1"]).await.unwrap()).await;
    assert_eq!(both, joined, "two keys are the one key `k-1, k-2`");
    assert_ne!(both, first, "two keys are not the first alone");
}

async fn progress_streams_as_server_sent_events(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.submit(json!({"prompt": "@sleep=1500 stream me"})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    let (status, content_type, events) = s.client.follow(&job_id).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert!(kinds.len() >= 3, "{events:?}");
    assert_eq!(kinds.last(), Some(&"result"), "{events:?}");
    let progress: Vec<serde_json::Value> =
        events.iter().filter(|(k, _)| k == "progress").map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(progress[0]["type"], "system", "Claude's stream-json, as it came");
    assert!(progress.iter().any(|e| e["type"] == "assistant"));
    let result: serde_json::Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(result["success"], true);
    assert_eq!(result["output"], "stand-in answer to: @sleep=1500 stream me");
    // Following a finished job gives its result at once.
    let (_, _, events) = s.client.follow(&job_id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "result");
    assert_eq!(s.client.get("/jobs/nope/events").await.status, 404);
}

/// The progress events in an SSE stream's text, as (id, data).
fn progress_of(raw: &str) -> Vec<(u64, String)> {
    raw.split("\n\n")
        .filter(|block| block.lines().any(|l| l == "event: progress"))
        .filter_map(|block| {
            let id = block.lines().find_map(|l| l.strip_prefix("id: "))?.parse().ok()?;
            Some((id, block.lines().find_map(|l| l.strip_prefix("data: "))?.to_string()))
        })
        .collect()
}

/// Reads a follower's stream into `text` until it holds `wanted` (gives up after 60 s:
/// long enough for any loaded machine, so a failure means the event never came).
async fn read_until<B: AsRef<[u8]>>(stream: &mut (impl futures_util::Stream<Item = reqwest::Result<B>> + Unpin), text: &mut String, wanted: &str) {
    use futures_util::StreamExt;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text.contains(wanted) {
        match tokio::time::timeout_at(deadline.into(), stream.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(chunk.as_ref())),
            Ok(Some(Err(e))) => panic!("the stream failed ({e}) before {wanted:?}; it said:\n{text}"),
            Ok(None) => panic!("the stream ended without {wanted:?}; it said:\n{text}"),
            Err(_) => panic!("no {wanted:?} in 60 s; the stream said:\n{text}"),
        }
    }
}

/// Claude prints a burst of lines (protocol 8): they travel in a few signed batches, and a
/// follower reads every event, each once, in order, numbered as before.
async fn a_burst_of_progress_reaches_followers_whole_in_order_in_few_frames(kind: EdgeKind) {
    const LINES: usize = 500;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let relay = PathRelay::start(&edge.ws_url()).await;
    let _agent = AgentProc::start(AgentOpts { edge_ws: relay.ws_url(), ..AgentOpts::for_edge(&edge, "spark") });
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let dir = TempDir::new("burst");
    let release = dir.path().join("release");
    // The stand-in holds on after its burst until the follower is there.
    let a = client.submit(json!({"prompt": format!("@lines={LINES} @await={} burst", release.display())})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    let mut stream = Box::pin(client.open_events(&job_id).await.bytes_stream());
    let mut raw = String::new();
    read_until(&mut stream, &mut raw, &format!("waiting for {}", release.display())).await;
    std::fs::write(&release, "").unwrap();
    read_until(&mut stream, &mut raw, "event: result").await;

    let progress = progress_of(&raw);
    let ids: Vec<u64> = progress.iter().map(|(id, _)| *id).collect();
    let expected: Vec<u64> = (1..=LINES as u64 + 4).collect();
    assert_eq!(ids, expected, "init, the burst, the wait, the answer, the result line: each once, in order\n{raw}");
    for (id, data) in &progress[1..=LINES] {
        assert!(data.contains(&format!(r#""text":"line {}""#, id - 1)), "event {id}: {data}");
    }
    let frames = relay.agent_frames().iter().filter(|f| f.contains(r#""type":"event""#)).count();
    // One frame per line before protocol 8; a batch holds up to 64. Only a stand-in
    // stopped for over 50 ms again and again mid-burst would need more than this.
    assert!(frames >= 1 && frames * 8 <= progress.len(), "{frames} progress frames for {} events", progress.len());
    assert_eq!(client.wait_job(&job_id, Duration::from_secs(30)).await["state"], "succeeded");
}

/// Claude prints a line, then waits (the model thinks): the event reaches a follower while
/// Claude still waits — a batch goes when its window ends, not only with the next line or
/// the job's end. Claude here waits for the test, which goes on only once it read the event.
async fn each_progress_event_reaches_a_follower_while_claude_waits(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let dir = TempDir::new("await");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let a = s.client.submit(json!({"prompt": format!("@await={} @await={} slow", one.display(), two.display())})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    let mut stream = Box::pin(s.client.open_events(&job_id).await.bytes_stream());
    let mut raw = String::new();
    for release in [&one, &two] {
        read_until(&mut stream, &mut raw, &format!("waiting for {}", release.display())).await;
        std::fs::write(release, "").unwrap();
    }
    read_until(&mut stream, &mut raw, "event: result").await;
    let ids: Vec<u64> = progress_of(&raw).iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "init, two waits, the answer, the result line\n{raw}");
}

/// A follower whose connection broke reconnects the way `EventSource` does, naming the
/// last event it read (`Last-Event-ID`): it reads on from there, nothing twice, nothing
/// missed; an id the stream never sent is refused with a 400 that says what to send.
async fn a_follower_that_reconnects_with_last_event_id_reads_on_from_there(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let dir = TempDir::new("resume");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let a = s.client.submit(json!({"prompt": format!("@await={} @await={} resumed", one.display(), two.display())})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    let mut first = Box::pin(s.client.open_events(&job_id).await.bytes_stream());
    let mut raw = String::new();
    read_until(&mut first, &mut raw, &format!("waiting for {}", one.display())).await;
    let read: Vec<u64> = progress_of(&raw).iter().map(|(id, _)| *id).collect();
    assert_eq!(read, [1, 2], "init, the first wait\n{raw}");
    drop(first);
    let refused = s.client.resume_events(&job_id, Some("not-an-id")).await;
    assert_eq!(refused.status(), 400);
    let text = refused.text().await.unwrap();
    assert!(text.contains("Last-Event-ID") && text.contains("INVALID_REQUEST"), "{text}");
    let mut again = Box::pin(s.client.resume_events(&job_id, Some("2")).await.bytes_stream());
    let mut raw = String::new();
    std::fs::write(&one, "").unwrap();
    read_until(&mut again, &mut raw, &format!("waiting for {}", two.display())).await;
    std::fs::write(&two, "").unwrap();
    read_until(&mut again, &mut raw, "event: result").await;
    let ids: Vec<u64> = progress_of(&raw).iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [3, 4, 5], "the second wait, the answer, the result line: after id 2 only\n{raw}");
}

/// A quiet job's stream carries a keep-alive comment after each `SSE_KEEPALIVE_MS` of
/// silence, on both hosts: a proxy in front keeps it open, and a follower (`submit`) tells a
/// quiet job from a dead connection. The Worker sent none before, so `submit` could not
/// bound its wait on a Worker's stream. (The interval is shortened here; the default is 15 s.)
async fn a_quiet_jobs_stream_carries_keep_alives(kind: EdgeKind) {
    let s = setup(kind, &[("SSE_KEEPALIVE_MS", "300")], &[]).await;
    let dir = TempDir::new("quiet");
    let release = dir.path().join("release");
    let a = s.client.submit(json!({"prompt": format!("@await={} quiet", release.display())})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    let mut stream = Box::pin(s.client.open_events(&job_id).await.bytes_stream());
    let mut raw = String::new();
    read_until(&mut stream, &mut raw, &format!("waiting for {}", release.display())).await;
    // Nothing comes from the job while it waits: only a keep-alive can end this read. Read
    // apart from what came before: a keep-alive may have come before the job's line (its
    // start slower than the keep-alive's 300 ms, on a loaded machine), and found there it
    // ended this read at once, with nothing read.
    let mut after = String::new();
    read_until(&mut stream, &mut after, ": keep-alive\n\n").await;
    assert!(after.trim_start().starts_with(": keep-alive"), "a keep-alive, not an event, came:\n{after}");
    raw.push_str(&after);
    std::fs::write(&release, "").unwrap();
    read_until(&mut stream, &mut raw, "event: result").await;
    let ids: Vec<u64> = progress_of(&raw).iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [1, 2, 3, 4], "the keep-alives are no events\n{raw}");
}

async fn a_running_job_can_be_cancelled(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let pidfile = s.agent.data.path().join("cancel-child.pid");
    let a = s.client.submit(json!({"prompt": format!("@spawn_child={} @sleep=30000", pidfile.display())})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(60), || pidfile.exists()).await);
    let d = s.client.send("DELETE", &format!("/jobs/{job_id}"), Some(SECRET), None).await;
    assert_eq!(d.status, 202, "{}", d.text);
    let job = s.client.wait_job(&job_id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["result"]["error_code"], "CANCELLED");
    let child: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(eventually(Duration::from_secs(60), || !alive(child)).await, "Claude's child outlived the cancel");
    // Cancelling again is a conflict that says where the result is.
    let again = s.client.send("DELETE", &format!("/jobs/{job_id}"), Some(SECRET), None).await;
    assert_eq!(again.status, 409);
    // A queued job (no agent free) is cancelled at once.
    let busy = s.client.submit(json!({"prompt": "@sleep=3000"})).await;
    let queued = s.client.submit(json!({"prompt": "never runs"})).await;
    let queued_id = queued.body["job_id"].as_str().unwrap();
    let d = s.client.send("DELETE", &format!("/jobs/{queued_id}"), Some(SECRET), None).await;
    assert_eq!(d.body["state"], "cancelled", "{}", d.text);
    s.client.wait_job(busy.body["job_id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert!(s.agent.claude_runs().iter().all(|r| r["prompt"] != "never runs"));
}

async fn a_binary_frame_closes_the_connection_with_a_reason(kind: EdgeKind) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let (mut ws, _) = tokio_tungstenite::connect_async(keys.prover("spark", "default").request(&format!("{}/agent/connect", edge.ws_url()))).await.unwrap();
    let _challenge = ws.next().await;
    ws.send(Message::Binary(vec![0u8, 1, 2].into())).await.unwrap();
    let mut close_code = None;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Ok(Message::Close(Some(frame))) = frame {
            close_code = Some(u16::from(frame.code));
            break;
        }
    }
    assert_eq!(close_code, Some(shared::protocol::close::PROTOCOL_ERROR));
}

async fn unknown_jobs_and_routes_are_404(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    assert_eq!(s.client.get("/jobs/does-not-exist").await.status, 404);
    assert_eq!(s.client.get("/nope").await.status, 404);
}

/// Answers the two hosts gave each their own way. `/pool/default/…` is no pool's path (the
/// default pool is the one without the prefix): the Worker served it as the default pool,
/// the native edge answered 404. An upgrade to `/agent/connect` without
/// `Sec-WebSocket-Key` is no WebSocket handshake: the native edge answered 426, the Worker
/// 401 (it looked at the proof first), which sent a caller hunting for a key it had.
async fn the_default_pools_prefix_and_a_handshake_without_its_key_are_answered_alike(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let client = Client::new(&edge.url());
    for path in ["/pool/default/health", "/pool/default/jobs", "/pool/default"] {
        for secret in [Some(SECRET), None] {
            let a = client.send("GET", path, secret, None).await;
            assert_eq!((a.status, a.body["error_code"].as_str()), (404, Some("NOT_FOUND")), "{path} {secret:?}: {}", a.text);
        }
    }
    let http = reqwest::Client::new();
    let dial = |key: Option<&str>| {
        let request = http
            .get(format!("{}/agent/connect", edge.url()))
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "13");
        match key {
            Some(key) => request.header("sec-websocket-key", key),
            None => request,
        }
        .send()
    };
    let keyless = dial(None).await.unwrap();
    assert_eq!(keyless.status().as_u16(), 426);
    let body: serde_json::Value = keyless.json().await.unwrap();
    assert!(body["error"].as_str().is_some_and(|e| e.contains("Sec-WebSocket-Key") && e.contains("claude-runner agent")), "{body}");
    // With its key (and no proof) it is a handshake, refused for its proof.
    assert_eq!(dial(Some("dGhlIHNhbXBsZSBub25jZQ==")).await.unwrap().status().as_u16(), 401);
}

/// A caller whose base URL ends in `/` (CLAUDE_RUNNER_URL=https://edge/) sends `//execute`:
/// served as `/execute`, on every route; a slash inside the path or an encoded one is not.
async fn a_base_url_with_a_trailing_slash_still_reaches_every_route(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let slashed = Client::new(&format!("{}/", s.edge.url()));
    let a = slashed.execute(json!({"prompt": "doubled"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["output"], "stand-in answer to: doubled");
    let job = slashed.get(&format!("/jobs/{}", a.body["job_id"].as_str().unwrap())).await;
    assert_eq!(job.body["state"], "succeeded", "{}", job.text);
    assert_eq!(slashed.health().await.status, 200);
    assert_eq!(s.client.get("///health").await.status, 200);
    for path in ["/jobs//x", "/%2Fhealth", "/pool//default/health"] {
        let a = s.client.get(path).await;
        assert!(a.status == 404 || a.status == 400, "{path}: {} {}", a.status, a.text);
    }
}

/// A hand-driven agent: proves its identity, then sends no heartbeat while keeping the
/// TCP connection open — a half-open agent, as after a network cut — and whoever sits on
/// the path keeps sending what anyone can make (credits, refusals naming no job): only
/// the agent's signed heartbeats count as hearing from it.
async fn a_silent_agent_is_reported_offline_within_two_heartbeats(kind: EdgeKind) {
    use futures_util::{SinkExt, StreamExt};
    use shared::envelope::{Domain, Envelope};
    use shared::protocol::{AgentMessage, EdgeMessage, Hello, PROTOCOL_VERSION};
    use tokio_tungstenite::tungstenite::Message;

    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[("HEARTBEAT_INTERVAL_MS", "1000")]);
    let client = Client::new(&edge.url());
    let (mut ws, _) = tokio_tungstenite::connect_async(keys.prover("spark", "default").request(&format!("{}/agent/connect", edge.ws_url()))).await.unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else { panic!("a challenge") };
    let EdgeMessage::Challenge { nonce, .. } = serde_json::from_str(&text).unwrap() else { panic!("a challenge") };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: "spark".into(),
        agent_version: "hand".into(),
        challenge: nonce,
        agent_nonce: "n".into(),
        ephemeral: shared::link::Ephemeral::new(runtime::entropy()).public(),
        issued_at: now,
        capacity: 1,
        running: vec![],
        finished: vec![],
        more_finished: false,
        oauth: shared::oauth::OAuthReport { source: shared::oauth::OAuthSource::ApiKey, ..shared::oauth::OAuthReport::unconfigured(now) },
        claude_version: None,
        labels: Default::default(),
        mirrors: Vec::new(),
        instance: None,
    };
    let envelope = Envelope::seal(Domain::Hello, &hello, keys.agent("spark"));
    let msg = AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: "spark".into(), envelope };
    ws.send(Message::Text(msg.to_text().into())).await.unwrap();
    client.wait_online().await;
    let online_at = Instant::now();
    // Stop reading; keep the socket, and talk on it as the path could.
    let (mut sink, _stream) = ws.split();
    let chatter = tokio::spawn(async move {
        loop {
            for frame in [AgentMessage::Credit { slots: Default::default() }, AgentMessage::OrderRefused { reason: "x".into() }] {
                if sink.send(Message::Text(frame.to_text().into())).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    client.wait_health(503).await;
    let took = online_at.elapsed();
    assert!(took >= Duration::from_millis(900), "dropped too early ({took:?}): silence shorter than two intervals is allowed");
    // Two intervals (2 s) plus generous slack for a loaded machine.
    assert!(took < Duration::from_secs(5), "noticed late ({took:?})");
    assert_eq!(client.execute(json!({"prompt": "x"})).await.status, 503);
    chatter.abort();
}

/// The agents' socket is given only to a peer that proves an agent's key on the upgrade
/// itself (`X-Runner-Agent-Proof`): without one, or with one that does not hold, the
/// upgrade is answered 401 in the contract's shape, saying what to do, and no socket is
/// made. Before, anyone got a socket, and the Worker's runtime copied whatever message
/// (up to 32 MiB) it sent before the edge could weigh it against a hello's limit.
async fn an_agent_socket_needs_an_agents_proof(kind: EdgeKind) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let http = reqwest::Client::new();
    let forged = Keys::new(&["spark"]).prover("spark", "default").proof();
    for (proof, code) in [(None, "AGENT_PROOF_REQUIRED"), (Some(forged), "AGENT_PROOF_INVALID"), (Some("x".into()), "AGENT_PROOF_INVALID")] {
        let mut upgrade = http
            .get(format!("{}/agent/connect", edge.url()))
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13");
        if let Some(proof) = &proof {
            upgrade = upgrade.header(shared::envelope::AGENT_PROOF_HEADER, proof);
        }
        let answer = upgrade.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 401, "{proof:?}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!((body["success"].as_bool(), body["error_code"].as_str()), (Some(false), Some(code)), "{proof:?}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("X-Runner-Agent-Proof") || e.contains("AGENT_SIGNING_KEY")), "{body}");
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(keys.prover("spark", "default").request(&format!("{}/agent/connect", edge.ws_url())))
        .await
        .unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else { panic!("a challenge") };
    assert!(text.contains("\"challenge\""), "{text}");
}

/// The edge proves its key before the agent says anything more: a dial that carries the
/// agent's nonce (`X-Runner-Agent-Nonce`) gets a challenge signed over it, this
/// connection's challenge, the protocol and the pool, with the edge's key; a dial without
/// one (an agent of before the nonce, within protocol 10) is closed before any challenge,
/// saying to upgrade the agent (it got an unsigned challenge until protocol 12, a path no
/// release since 11 reached); one whose nonce is not a nonce's shape (sent twice, say) is
/// closed saying so.
async fn the_challenge_is_signed_over_the_agents_nonce(kind: EdgeKind) {
    use futures_util::StreamExt;
    use shared::envelope::{ChallengeProof, AGENT_NONCE_HEADER};
    use shared::protocol::{EdgeMessage, PROTOCOL_VERSION};
    use tokio_tungstenite::tungstenite::Message;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let url = format!("{}/agent/connect", edge.ws_url());
    let first_challenge = |text: &str| -> (String, Option<String>) {
        match serde_json::from_str(text).unwrap() {
            EdgeMessage::Challenge { nonce, proof, protocol, .. } if protocol == PROTOCOL_VERSION => (nonce, proof),
            other => panic!("a challenge first: {other:?}"),
        }
    };
    let agent_nonce = shared::envelope::agent_nonce([7; 24]);
    let request = keys.prover("spark", "default").request_with(&url, &agent_nonce);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let Some(Ok(Message::Text(text))) = ws.next().await else { panic!("a challenge") };
    let (nonce, proof) = first_challenge(&text);
    let proof = proof.unwrap_or_else(|| panic!("a signed challenge: {text}"));
    let edge_key = keys.edge.verifying_key();
    assert!(ChallengeProof::verify(&proof, &edge_key, PROTOCOL_VERSION, &nonce, &agent_nonce, "default"), "{text}");
    assert!(!ChallengeProof::verify(&proof, &edge_key, PROTOCOL_VERSION, &nonce, &shared::envelope::agent_nonce([8; 24]), "default"));
    drop(ws);
    // Closed, no challenge, and the close frame's code and reason.
    let closed = |request| async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            match m {
                Message::Text(t) => assert!(!t.contains("\"challenge\""), "no challenge for a dial without a nonce's shape: {t}"),
                Message::Close(frame) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                _ => {}
            }
        }
        None
    };
    // Without a nonce: closed, saying to upgrade the agent.
    let mut request = keys.prover("spark", "default").request(&url);
    request.headers_mut().remove(AGENT_NONCE_HEADER);
    let (code, said) = closed(request).await.expect("a close frame");
    assert_eq!(code, shared::protocol::close::VERSION_MISMATCH, "{said}");
    assert!(said.contains("X-Runner-Agent-Nonce") && said.contains("upgrade claude-runner on the agent"), "{said:?}");
    // A nonce sent twice (read joined) is no nonce: closed, saying which header.
    let mut request = keys.prover("spark", "default").request_with(&url, &agent_nonce);
    request.headers_mut().append(AGENT_NONCE_HEADER, agent_nonce.parse().unwrap());
    let (_, said) = closed(request).await.expect("a close frame");
    assert!(said.contains("X-Runner-Agent-Nonce") || said.contains("x-runner-agent-nonce"), "{said:?}");
}

/// A proof sent twice is read as the Worker's runtime reads it (the values joined with
/// `, `, no proof's shape): the native edge took the first alone, so a valid proof then
/// junk got a socket there and 401 on the Worker.
async fn a_proof_sent_twice_is_read_the_same_on_both_hosts(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let mut request = keys.prover("spark", "default").request(&format!("{}/agent/connect", edge.ws_url()));
    request.headers_mut().append(shared::envelope::AGENT_PROOF_HEADER, "junk".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 401),
        other => panic!("two proofs must be refused on both hosts: {:?}", other.map(|_| ())),
    }
}

/// Every dial refused for its proof is counted in `claude_runner_agents_refused_total` and
/// logged with the peer's address and the reason, at most 10 a minute one by one, so a
/// flood of dials cannot fill the log: neither was done before. On the Worker the entry
/// refuses them without asking the pool's object (each one was a request to it), and hands
/// the count to it with the next request it forwards.
async fn refused_upgrades_are_counted_and_logged_with_a_bound(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let http = reqwest::Client::new();
    let forged = Keys::new(&["spark"]).prover("spark", "default").proof();
    for i in 0..25 {
        let mut dial = http
            .get(format!("{}/agent/connect", edge.url()))
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13");
        if i % 2 == 1 {
            dial = dial.header(shared::envelope::AGENT_PROOF_HEADER, &forged);
        }
        assert_eq!(dial.send().await.unwrap().status().as_u16(), 401);
    }
    if kind == EdgeKind::Worker {
        // The object logs this when it is first asked anything.
        assert!(!edge.log().contains("edge rebuilt"), "a dial without a valid proof reached the pool's object:\n{}", edge.log());
    }
    let metrics = Client::new(&edge.url()).get("/metrics").await.text;
    assert!(metrics.contains("claude_runner_agents_refused_total 25\n"), "{metrics}\n{}", edge.log());
    let log = edge.log();
    let logged: Vec<&str> = log.lines().filter(|l| l.contains("agent upgrade refused")).collect();
    // Ten a minute: twenty if a minute turned meanwhile.
    assert!((10..=20).contains(&logged.len()), "{} lines:\n{log}", logged.len());
    assert!(logged.iter().any(|l| l.contains("AGENT_PROOF_REQUIRED")) && logged.iter().any(|l| l.contains("does not verify")), "{log}");
    if kind == EdgeKind::Native {
        assert!(logged.iter().all(|l| l.contains("127.0.0.1")), "the peer's address: {log}");
    }
}

/// Whoever holds a proof of the agent's (played back within its window, or taken on the
/// path) can open connections to `/agent/connect`; 80 that never say hello, renewed every
/// 9 s (so none ever times out), must not keep the real agent out.
async fn silent_sockets_cannot_lock_the_agent_out(kind: EdgeKind) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let crowd = SilentCrowd::start(&format!("{}/agent/connect", edge.ws_url()), &keys.prover("spark", "default"), 80, Duration::from_secs(9));
    let deadline = Instant::now() + Duration::from_secs(20);
    while crowd.opened() < 80 {
        assert!(Instant::now() < deadline, "only {} silent connections opened", crowd.opened());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let client = Client::new(&edge.url());
    let online = tokio::time::timeout(Duration::from_secs(30), client.wait_online()).await;
    assert!(online.is_ok(), "the agent never got in past the silent crowd; agent log:\n{}", agent.log());
    let a = client.execute(json!({"prompt": "still served"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["success"], true, "{}", a.text);
    drop(crowd);
}

/// Before its hello is verified a connection may send a hello's worth, and what it calls
/// itself reaches no log line unchecked.
async fn unproven_connections_are_held_to_a_hello(kind: EdgeKind) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let keys = Keys::new(&["spark"]);
    // Logs as people read them (JSON would escape a newline by itself).
    let edge = EdgeServer::start(kind, &keys, &[("LOG_FORMAT", "text")]);
    async fn closed_with(ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>) -> Option<(u16, String)> {
        while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            if let Ok(Message::Close(Some(frame))) = frame {
                return Some((u16::from(frame.code), frame.reason.to_string()));
            }
            frame.ok()?;
        }
        None
    }
    // A frame just over the hello limit (but within what a host reads of an unproven
    // connection): refused with the reason.
    let (mut ws, _) = tokio_tungstenite::connect_async(keys.prover("spark", "default").request(&format!("{}/agent/connect", edge.ws_url()))).await.unwrap();
    let _challenge = ws.next().await;
    let big = format!(r#"{{"type":"hello","pad":"{}"}}"#, "x".repeat(shared::protocol::MAX_HELLO_BYTES));
    ws.send(Message::Text(big.into())).await.unwrap();
    let (code, reason) = closed_with(&mut ws).await.expect("closed with a reason");
    assert_eq!(code, shared::protocol::close::PROTOCOL_ERROR, "{reason}");
    assert!(reason.contains("limit"), "{reason}");
    // An agent id that would forge a log line: refused without echoing it.
    let forged = "spark\nINFO agent connected agent_id=mallory";
    let (mut ws, _) = tokio_tungstenite::connect_async(keys.prover("spark", "default").request(&format!("{}/agent/connect", edge.ws_url()))).await.unwrap();
    let _challenge = ws.next().await;
    let envelope = shared::envelope::Envelope { payload: "{}".into(), sig: String::new() };
    let hello = shared::protocol::AgentMessage::Hello { protocol: shared::protocol::PROTOCOL_VERSION, agent_id: forged.into(), envelope };
    ws.send(Message::Text(hello.to_text().into())).await.unwrap();
    let (code, reason) = closed_with(&mut ws).await.expect("closed with a reason");
    assert_eq!(code, shared::protocol::close::UNAUTHORIZED, "{reason}");
    assert!(!reason.contains("mallory"), "{reason}");
    assert!(eventually(Duration::from_secs(60), || edge.log().contains("agent refused")).await, "{}", edge.log());
    for line in edge.log().lines() {
        assert!(!line.contains("mallory"), "the peer's unchecked words in a log line: {line}");
    }
    // A frame that does not read, whose error quotes the peer's words (a string where a
    // number belongs): at most quoted on the edge's own line, never a line of their own.
    let (mut ws, _) = tokio_tungstenite::connect_async(keys.prover("spark", "default").request(&format!("{}/agent/connect", edge.ws_url()))).await.unwrap();
    let _challenge = ws.next().await;
    let frame = r#"{"type":"credit","slots":{"free":"x\n2026-01-01T00:00:00.000000Z  INFO claude_runner_edge: FORGEDLINE","received":0}}"#;
    ws.send(Message::Text(frame.into())).await.unwrap();
    let (code, _) = closed_with(&mut ws).await.expect("closed with a reason");
    assert_eq!(code, shared::protocol::close::PROTOCOL_ERROR);
    assert!(eventually(Duration::from_secs(60), || edge.log().contains("FORGEDLINE")).await, "{}", edge.log());
    for line in edge.log().lines().filter(|l| l.contains("FORGEDLINE")) {
        assert!(line.contains("unreadable frame"), "a log line the peer wrote: {line}");
    }
}

/// 200 followers of one job that never read past the status line: only so many are
/// taken (429 for the rest), those that stall are dropped, the edge's memory stays
/// bounded while megabytes of progress go by, and a follower that reads gets it all.
async fn followers_are_capped_and_those_that_stop_reading_are_dropped(kind: EdgeKind) {
    use std::io::Read;
    const PER_JOB: usize = 16; // edge_core::progress::MAX_FOLLOWERS_PER_JOB
    let s = setup(kind, &[], &[]).await;
    let blocker = s.client.submit(json!({"prompt": "@sleep=4000 blocker"})).await;
    // 16 MiB of progress over about 20 s: a follower that reads keeps up (it may stall
    // for about 4 s, as a test process on a loaded machine does, before it is 3 MiB
    // behind: MAX_FOLLOWER_LAG_BYTES; at 40 ms a piece, 2 s, a reader under load 7 was
    // once dropped), one that does not falls ever further behind.
    let flood = s.client.submit(json!({"prompt": "@megabytes=16 @gap_ms=80 @sleep=300 flood"})).await;
    let job_id = flood.body["job_id"].as_str().unwrap().to_string();
    assert_eq!(flood.body["state"], "queued", "{}", flood.text);
    // A follower that reads, first (its answer means it is registered).
    let stream = s.client.open_events(&job_id).await;
    assert_eq!(stream.status(), 200);
    let reader = tokio::spawn(read_events(stream));
    let peak_before = s.edge.peak_rss_kib();
    let port = s.edge.port;
    let following = job_id.clone();
    let (stalled, refused) = tokio::task::spawn_blocking(move || {
        let (mut stalled, mut refused) = (Vec::new(), 0);
        for _ in 0..200 {
            // The status line, and never another byte.
            let (tcp, status) = stalled_follower(port, &following);
            match &status {
                b"200" => stalled.push(tcp),
                b"429" => refused += 1,
                other => panic!("{}", String::from_utf8_lossy(other)),
            }
        }
        (stalled, refused)
    })
    .await
    .unwrap();
    assert_eq!(stalled.len(), PER_JOB - 1, "the reader and {} more are taken", PER_JOB - 1);
    assert_eq!(refused, 200 - (PER_JOB - 1));

    // The reader's stream ends with the job.
    let events = reader.await.unwrap();
    let done = s.client.get(&format!("/jobs/{job_id}")).await;
    assert_eq!(done.body["state"], "succeeded", "{}", done.text);
    // 15 stalled followers of 16 MiB of progress: unbounded queues would hold ~240 MiB.
    let grown_mib = s.edge.peak_rss_kib().saturating_sub(peak_before) / 1024;
    assert!(grown_mib < 120, "the edge's peak memory grew by {grown_mib} MiB");
    assert_eq!(events.iter().filter(|(k, _)| k == "progress").count(), 1 + 16 * 16 + 2, "the reader got every event (init, the flood, the answer, the result line)");
    assert_eq!(events.last().map(|(k, _)| k.as_str()), Some("result"));
    // The stalled ones were dropped before the end: cut off (no wait for the 20 s
    // timeout), and none of them got the result.
    let kept = tokio::task::spawn_blocking(move || {
        stalled
            .into_iter()
            .filter(|mut tcp| {
                tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut all = Vec::new();
                let still_open = matches!(tcp.read_to_end(&mut all), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
                still_open || String::from_utf8_lossy(&all).contains("event: result")
            })
            .count()
    })
    .await
    .unwrap();
    assert_eq!(kept, 0, "stalled followers were kept to the end, or kept open");
    s.client.wait_job(blocker.body["job_id"].as_str().unwrap(), Duration::from_secs(20)).await;
}

/// rev36a-4: a caller with its own secret opens as many streams of its job as the edge
/// takes (12 of the job's 16: the rest are the operator's), and is refused past them, told
/// whose streams fill the job and what to do; the operator (the pool's secret) still
/// follows the job, to its result. Before, the caller's 16 streams locked the operator out.
async fn a_callers_streams_leave_the_operator_its_places(kind: EdgeKind) {
    const A: &str = "caller-a-secret-0123456789";
    let s = setup(kind, &[("RUNNER_SECRETS", &format!("a={A}"))], &[]).await;
    let job = s.client.send("POST", "/jobs", Some(A), Some(json!({"prompt": "@sleep=60000 a's"}).to_string().into_bytes())).await;
    assert_eq!(job.status, 202, "{}", job.text);
    let job_id = job.body["job_id"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let url = format!("{}/jobs/{job_id}/events", s.client.base);
    // Each held open, on a connection of its own.
    let mut held = Vec::new();
    let refused = loop {
        let stream = http.get(&url).header("X-Runner-Secret", A).send().await.unwrap();
        if stream.status() != 200 {
            break stream;
        }
        held.push(stream);
        assert!(held.len() <= 16, "a was never refused");
    };
    // The operator follows, and reads the job to its end (cancelled, not to wait a minute).
    let operator = s.client.open_events(&job_id).await;
    assert_eq!(operator.status(), 200, "the operator was locked out by a's {} streams", held.len());
    assert_eq!(held.len(), 12, "a's part of its job's streams");
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error_code"], "RUNNER_BUSY", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("caller `a`") && error.contains(&format!("GET /jobs/{job_id}")), "{error}");
    let reader = tokio::spawn(read_events(operator));
    assert_eq!(s.client.send("DELETE", &format!("/jobs/{job_id}"), Some(A), None).await.status, 202);
    let events = reader.await.unwrap();
    assert_eq!(events.last().map(|(k, _)| k.as_str()), Some("result"), "{events:?}");
    drop(held);
}

/// Whoever controls the path between agent and edge makes up a result and a progress
/// event for a running job: the edge refuses both (they are not MACed by the agent),
/// says so in its log and metrics, and the job ends with the agent's own result.
async fn a_forged_result_from_the_path_is_refused(kind: EdgeKind) {
    use shared::protocol::AgentMessage;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    let relay = PathRelay::start(&edge.ws_url()).await;
    let agent = AgentProc::start(AgentOpts { edge_ws: relay.ws_url(), ..AgentOpts::for_edge(&edge, "spark") });
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let a = client.submit(json!({"prompt": "@sleep=2500 the real one"})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    let stream = client.open_events(&job_id).await;
    let follower = tokio::spawn(read_events(stream));
    let raw = client.open_events(&job_id).await;
    let raw = tokio::spawn(async move { raw.text().await.unwrap_or_default() });
    assert!(eventually(Duration::from_secs(60), || !agent.claude_runs().is_empty()).await);
    // The agent's own progress event, captured on the path and sent again: the edge has
    // shown it already.
    let is_event = |f: &String| f.contains(r#""type":"event""#);
    assert!(eventually(Duration::from_secs(60), || relay.agent_frames().iter().any(is_event)).await, "no progress from the agent");
    let first = relay.agent_frames().into_iter().find(is_event).unwrap();
    relay.inject(first.clone());
    relay.inject(first);
    // Whoever sits on the path (or holds RUNNER_SECRET) has neither signing key, so not
    // the connection's keys either: it MACs with one of its own.
    let forger = shared::link::MacKey::from_bytes(runtime::entropy());
    let fake = shared::job::JobResult { success: true, output: "FORGED".into(), ..Default::default() };
    let nonce = format!("{job_id}:1");
    relay.inject(AgentMessage::progress(&job_id, &nonce, vec![shared::protocol::ProgressEvent { seq: 99, event: json!({"type": "assistant", "text": "FORGED"}) }], &forger).to_text());
    relay.inject(AgentMessage::result(&job_id, &nonce, fake, &forger).to_text());
    let refused = |log: &str| log.contains("a report not MACed by the agent on this connection refused");
    assert!(eventually(Duration::from_secs(60), || refused(&edge.log())).await, "{}", edge.log());
    assert_eq!(client.get(&format!("/jobs/{job_id}")).await.body["state"], "running", "the job is unaffected");

    let job = client.wait_job(&job_id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["output"], "stand-in answer to: @sleep=2500 the real one");
    let events = follower.await.unwrap();
    assert!(events.iter().all(|(_, data)| !data.contains("FORGED")), "{events:?}");
    assert_eq!(events.last().map(|(k, _)| k.as_str()), Some("result"));
    let raw = raw.await.unwrap();
    let ids: Vec<u64> = raw.lines().filter_map(|l| l.strip_prefix("id: ")).map(|n| n.parse().unwrap()).collect();
    assert!(ids.len() > 1 && ids.windows(2).all(|w| w[0] < w[1]), "a progress event shown twice (or out of order): {ids:?}\n{raw}");
    let metrics = client.get("/metrics").await.text;
    assert!(metrics.contains("claude_runner_reports_refused_total 2"), "{metrics}");
}

/// Whoever controls the path between agent and edge makes up or plays back the agent's
/// refusal of a running job's order and its heartbeats (protocol 6): a refusal taken as
/// the agent's would send the job to the other agent, idle, which would run it too; a
/// heartbeat saying the agent holds nothing would end the job `lost` while it runs. The
/// edge refuses each, and the job runs once, to its own end.
async fn forged_refusals_and_heartbeats_from_the_path_are_refused(kind: EdgeKind) {
    use shared::protocol::{AgentMessage, Beat, Slots};
    let keys = Keys::new(&["spark", "laptop"]);
    // Heartbeats a second apart: one naming the job must come while it runs (4 s).
    let edge = EdgeServer::start(kind, &keys, &[QUICK_HEARTBEATS]);
    let relay = PathRelay::start(&edge.ws_url()).await;
    let spark = AgentProc::start(AgentOpts { edge_ws: relay.ws_url(), ..AgentOpts::for_edge(&edge, "spark") });
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let a = client.submit(json!({"prompt": "@sleep=4000 the real one"})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(60), || !spark.claude_runs().is_empty()).await, "{}", spark.log());
    // An idle agent beside it: whatever sent the job again would run it there.
    let laptop = AgentProc::start(AgentOpts::for_edge(&edge, "laptop"));
    let has_two = || async {
        let agents = client.health_full().await.body["agents"].as_array().cloned().unwrap_or_default();
        agents.iter().filter(|a| a["connected"] == true).count() == 2
    };
    assert!(eventually_async(Duration::from_secs(10), has_two).await, "{}", laptop.log());
    // The agent's own heartbeat, kept on the path, once it says it runs the job.
    let holding = |f: &String| f.contains(r#""type":"heartbeat""#) && f.contains(&job_id);
    assert!(eventually(Duration::from_secs(60), || relay.agent_frames().iter().any(holding)).await, "no heartbeat from the agent");
    let kept = relay.agent_frames().into_iter().find(holding).unwrap();

    let forger = shared::link::MacKey::from_bytes(runtime::entropy());
    let nonce = format!("{job_id}:1");
    relay.inject(AgentMessage::rejected(&job_id, &nonce, "no free slot", true, &forger).to_text());
    relay.inject(AgentMessage::OrderRefused { reason: "no free slot".into() }.to_text());
    relay.inject(kept);
    let Ok(AgentMessage::Heartbeat { envelope }) = serde_json::from_str(&relay.agent_frames().into_iter().find(holding).unwrap()) else { unreachable!() };
    let beat: Beat = serde_json::from_str(&envelope.payload).unwrap();
    let says_nothing = Beat { seq: beat.seq + 1_000, running: vec![], slots: Slots { free: 1, received: 1 }, ..beat };
    relay.inject(AgentMessage::heartbeat(&says_nothing, &forger).to_text());
    let refused = |log: &str| log.matches("a report not MACed by the agent on this connection refused").count() == 2 && log.contains("a heartbeat refused") && log.contains("could not tie to a job");
    assert!(eventually(Duration::from_secs(60), || refused(&edge.log())).await, "{}", edge.log());
    assert_eq!(client.get(&format!("/jobs/{job_id}")).await.body["state"], "running", "the job is unaffected");

    let job = client.wait_job(&job_id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["output"], "stand-in answer to: @sleep=4000 the real one");
    assert_eq!(spark.claude_runs().len(), 1, "run once");
    assert!(laptop.claude_runs().is_empty(), "run again on the other agent: {:?}", laptop.claude_runs());
    let metrics = client.get("/metrics").await.text;
    assert!(metrics.contains("claude_runner_reports_refused_total 2"), "{metrics}");
}

async fn cut_output_says_how_much_was_left_out(kind: EdgeKind) {
    let s = setup(kind, &[], &[]).await;
    let a = s.client.execute(json!({"prompt": "@megabytes=2 say hi"})).await;
    assert_eq!(a.body["success"], true, "{}", a.text);
    assert_eq!(a.body["truncated"], false, "the final text is short; only the stream was long");
    // A final text over 1 MiB: the stand-in answers with the base64 of a 1.5 MiB file.
    let big = s.agent.data.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 1536 * 1024]).unwrap();
    let a = s.client.execute(json!({"prompt": format!("@print_file_b64={}", big.display())})).await;
    let b = &a.body;
    assert_eq!(b["success"], true);
    assert_eq!(b["truncated"], true);
    let full = "the file is ".len() + (1536 * 1024usize).div_ceil(3) * 4;
    let kept = b["output"].as_str().unwrap().len();
    let cut = b["truncated_bytes"].as_u64().unwrap() as usize;
    assert!(cut > 0 && kept < full && kept + cut > full && kept + cut < full + 100, "kept {kept} + cut {cut} ≈ {full} (plus the marker)");
}

/// The repository fields go through the edge both ways (the Worker needs no git: the
/// agent does the git work, the edge checks the address and carries the fields).
async fn repository_jobs_carry_their_fields(kind: EdgeKind) {
    let git = harness::git_server::GitServer::start(None);
    let seed = git.seed("demo", &[("README.md", b"# demo\n")]);
    let start = seed.git(&["rev-parse", "HEAD"]);
    let (hosts, cert) = (git.host(), git.cert_file.display().to_string());
    let s = setup(kind, &[], &[("ALLOWED_REPO_HOSTS", &hosts), ("SSL_CERT_FILE", &cert)]).await;
    let body = json!({
        "prompt": "@write=NOTES.md", "repo_url": git.url("demo"), "branch": "main", "include_diff": true,
        "push_branch": "claude/notes", "commit_message": "Notes", "allow_stale": false
    });
    let job = s.client.submit(body).await;
    assert_eq!(job.status, 202, "{}", job.text);
    let view = s.client.wait_job(job.body["job_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    let b = &view["result"];
    assert_eq!(b["success"], true, "{view}");
    assert_eq!(b["commit"], start.as_str());
    assert!(b["diff"].as_str().unwrap().contains("+written by the stand-in: NOTES.md"), "{b}");
    assert_eq!(b["diff_truncated"], false);
    assert_eq!(b["files_changed"], json!([{"path": "NOTES.md", "status": "added"}]));
    assert_eq!(b["pushed_branch"], "claude/notes");
    assert_eq!(seed.server_git(&["rev-parse", "claude/notes"]), b["pushed_commit"].as_str().unwrap());
    assert_eq!(b["truncated"], false);
    // A refused address is a 400 at the edge, before anything is queued.
    for bad in ["file:///etc", "git@github.com:a/b.git", "https://user:pw@github.com/a/b", "--upload-pack=x", "/srv/repo"] {
        let a = s.client.execute(json!({"prompt": "x", "repo_url": bad})).await;
        assert_eq!(a.status, 400, "{bad}: {}", a.text);
        assert!(a.body["error"].as_str().unwrap().starts_with("`repo_url` "), "{}", a.text);
    }
    let a = s.client.execute(json!({"prompt": "x", "push_branch": "b"})).await;
    assert_eq!(a.status, 400, "push_branch without repo_url: {}", a.text);
    assert_eq!(s.agent.claude_runs().len(), 1);
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod native {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(harness::EdgeKind::Native).await
                }
            )*
        }
        mod worker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
                async fn $name() {
                    harness::require_worker_bundle();
                    super::$name(harness::EdgeKind::Worker).await
                }
            )*
        }
    };
}

contract!(
    a_job_returns_every_response_field,
    a_repeat_of_the_key_of_a_job_that_never_ran_runs_the_task,
    the_existing_callers_are_served_as_they_call,
    request_options_reach_claude_as_flags,
    offline_is_answered_at_once_with_fallback,
    health_follows_the_agent,
    health_without_the_secret_says_only_its_status,
    a_named_callers_secret_is_that_caller_alone,
    a_callers_new_secret_reaches_no_job_the_pools_secret_sent_in_its_name,
    a_session_is_resumed_by_its_own_caller_alone,
    the_agent_records_whether_a_sessions_caller_was_proven,
    no_body_is_read_before_auth,
    secrets_are_checked,
    bad_requests_are_400,
    oversized_bodies_are_413,
    bodies_being_read_are_held_to_a_share_each,
    a_body_cut_short_is_answered_408,
    jobs_not_ended_are_held_to_max_pending_bytes,
    a_timeout_kills_claude_and_its_children,
    claude_errors_are_failures,
    an_auth_failure_says_log_in_again,
    the_login_relay_logs_the_agent_in_again,
    a_job_queued_for_the_login_says_so_and_submit_shows_it,
    the_login_advice_offers_no_bare_claude_auth_login,
    a_login_abandoned_before_its_code_holds_no_work,
    a_used_up_usage_window_holds_work_until_its_reset,
    a_used_up_usage_window_still_holds_work_after_the_agent_restarts,
    the_operator_clears_a_used_up_usage_window,
    an_auth_failure_still_stands_after_the_agent_restarts,
    failures_say_which_class_and_whether_to_retry,
    alerts_reach_a_webhook_once_each,
    the_usage_window_open_again_alert_goes_at_its_reset,
    every_credential_state_shows_in_health_and_oauth_status,
    callbacks_are_signed_and_retried,
    a_callback_receiver_that_never_answers_holds_up_no_other,
    callbacks_on_their_way_hold_up_no_deadline,
    a_callback_attempt_given_up_closes_its_connection,
    megabytes_of_output_do_not_hang,
    a_missing_claude_binary_is_a_clear_failure,
    tokens_never_leave_the_machine,
    the_agent_reconnects_after_an_edge_restart,
    a_job_in_flight_survives_an_edge_restart,
    a_vanished_agent_makes_the_job_lost,
    an_unknown_agent_is_refused,
    idempotent_submits_run_once,
    execute_repeats_of_one_job_are_capped,
    a_key_outlives_its_forgotten_job_and_runs_nothing_again,
    unknown_jobs_and_routes_are_404,
    the_default_pools_prefix_and_a_handshake_without_its_key_are_answered_alike,
    a_base_url_with_a_trailing_slash_still_reaches_every_route,
    a_silent_agent_is_reported_offline_within_two_heartbeats,
    an_agent_that_stops_mid_job_tells_the_caller_to_fall_back,
    a_low_max_timeout_still_accepts_requests_without_timeout_ms,
    progress_streams_as_server_sent_events,
    a_burst_of_progress_reaches_followers_whole_in_order_in_few_frames,
    each_progress_event_reaches_a_follower_while_claude_waits,
    a_follower_that_reconnects_with_last_event_id_reads_on_from_there,
    a_quiet_jobs_stream_carries_keep_alives,
    headers_with_bytes_past_ascii_are_read_not_dropped,
    a_header_sent_twice_is_read_the_same_on_both_hosts,
    a_running_job_can_be_cancelled,
    a_binary_frame_closes_the_connection_with_a_reason,
    an_agent_socket_needs_an_agents_proof,
    the_challenge_is_signed_over_the_agents_nonce,
    a_proof_sent_twice_is_read_the_same_on_both_hosts,
    refused_upgrades_are_counted_and_logged_with_a_bound,
    silent_sockets_cannot_lock_the_agent_out,
    unproven_connections_are_held_to_a_hello,
    followers_are_capped_and_those_that_stop_reading_are_dropped,
    a_callers_streams_leave_the_operator_its_places,
    a_forged_result_from_the_path_is_refused,
    forged_refusals_and_heartbeats_from_the_path_are_refused,
    cut_output_says_how_much_was_left_out,
    repository_jobs_carry_their_fields,
);

/// One Worker alarm takes new posts for its budget only (5 minutes; here 1 s, through the
/// Worker's test-only ALARM_DELIVERY_BUDGET_MS), waits for those on their way, and leaves
/// the rest to the next alarm, which posts them: an alarm that kept taking posts while
/// others kept coming ran past the 15 minutes Cloudflare gives an alarm handler, and the
/// outcomes on their way were lost (each posted again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn a_worker_alarm_hands_posts_past_its_budget_to_the_next() {
    harness::require_worker_bundle();
    let (port, seen) = mute_receiver_that_counts();
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Worker, &keys, &[("CALLBACK_HOSTS", "127.0.0.1"), ("ALARM_DELIVERY_BUDGET_MS", "1000")]);
    let client = Client::new(&edge.url());
    cancel_jobs_with_callbacks(&client, port, 8).await;
    // The first four go out in one alarm; the next four are handed out when those time
    // out, past that alarm's budget: the next alarm posts them.
    let now = || *seen.lock().unwrap();
    assert!(eventually(Duration::from_secs(120), || now().opened >= 8).await, "the posts left over were never made: {:?}\n{}", now(), edge.log());
    let log = edge.log();
    assert!(log.contains("posts left for the next alarm"), "no alarm handed its posts on:\n{log}");
}

/// The Worker's pools (`POOLS`): each with its own secret and agents, none that is not
/// configured, and the pool signed into what the agent accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn worker_pools_are_isolated() {
    harness::require_worker_bundle();
    const GPU_SECRET: &str = "gpu-pool-secret-0123456789";
    let keys = Keys::new(&["spark", "rig"]);
    // `spark` serves the default pool; `rig` and — with the same key — `spark` are listed in `gpu`.
    let gpu_keys = format!(
        "rig={},spark={}",
        shared::keys::encode_verifying(&keys.agent("rig").verifying_key()),
        shared::keys::encode_verifying(&keys.agent("spark").verifying_key())
    );
    let default_keys = format!("spark={}", shared::keys::encode_verifying(&keys.agent("spark").verifying_key()));
    let edge = EdgeServer::start(
        EdgeKind::Worker,
        &keys,
        &[("AGENT_PUBLIC_KEYS", &default_keys), ("POOLS", "gpu"), ("RUNNER_SECRET_GPU", GPU_SECRET), ("AGENT_PUBLIC_KEYS_GPU", &gpu_keys)],
    );
    let stored = |edge: &EdgeServer| {
        fn count(dir: &std::path::Path) -> usize {
            std::fs::read_dir(dir).map(|d| d.flatten().map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 }).sum()).unwrap_or(0)
        }
        count(&edge.data.path().join("do"))
    };
    let default = Client::new(&edge.url());
    let gpu = Client::new(&format!("{}/pool/gpu", edge.url()));
    let nowhere = Client::new(&format!("{}/pool/nowhere", edge.url()));

    // A pool nobody configured does not exist, and asking for it stores nothing.
    default.health().await;
    let before = stored(&edge);
    for path in ["/health", "/execute", "/agent/connect", "/jobs/x", "/", "/oauth/login"] {
        let a = nowhere.send("GET", path, Some(SECRET), None).await;
        assert_eq!(a.status, 404, "{path}: {}", a.text);
        assert_eq!(a.body["error_code"], "NOT_FOUND");
    }
    assert_eq!(stored(&edge), before, "a Durable Object was made for a pool nobody configured");

    // Each pool has its own secret.
    let body = Some(json!({"prompt": "x"}).to_string().into_bytes());
    assert_eq!(gpu.send("POST", "/jobs", Some(SECRET), body.clone()).await.status, 403, "the default secret on gpu");
    assert_eq!(default.send("POST", "/jobs", Some(GPU_SECRET), body.clone()).await.status, 403, "gpu's secret on default");

    // And its own agents: `rig`, listed in gpu only, is unknown to the default pool.
    let mut opts = AgentOpts::for_edge(&edge, "rig");
    opts.edge_ws = format!("{}/pool/gpu", edge.ws_url());
    let rig_elsewhere = AgentProc::start(AgentOpts { edge_ws: edge.ws_url(), ..AgentOpts::for_edge(&edge, "rig") });
    assert!(eventually(Duration::from_secs(60), || rig_elsewhere.log().contains("unknown agent")).await, "{}", rig_elsewhere.log());
    drop(rig_elsewhere);
    // Signing for gpu (EDGE_POOL=gpu) while dialing the root: the refusal names both pools
    // and what to set.
    let rig_astray = AgentProc::start(AgentOpts { edge_ws: edge.ws_url(), ..AgentOpts::for_edge(&edge, "rig") }.env("EDGE_POOL", "gpu"));
    let named = |log: &str| log.contains("proof is for pool `gpu`") && log.contains("dials pool `default`") && log.contains("/pool/gpu");
    assert!(eventually(Duration::from_secs(60), || named(&rig_astray.log())).await, "{}", rig_astray.log());
    drop(rig_astray);
    let _rig = AgentProc::start(opts.env("EDGE_POOL", "gpu"));
    gpu.wait_online().await;
    assert_eq!(default.health().await.status, 503, "gpu's agent does not serve the default pool");
    let a = gpu.send("POST", "/execute", Some(GPU_SECRET), body.clone()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["agent_id"], "rig");
    assert_eq!(default.execute(json!({"prompt": "x"})).await.status, 503);
    // A pooled base URL ending in `/` (…/pool/gpu/ sends /pool/gpu//execute), and a host's
    // URL ending in one (…//pool/gpu), reach the same pool; `/pool//gpu` names no pool.
    for base in [format!("{}/pool/gpu/", edge.url()), format!("{}//pool/gpu", edge.url())] {
        let a = Client::new(&base).send("POST", "/execute", Some(GPU_SECRET), body.clone()).await;
        assert_eq!(a.status, 200, "{base}: {}", a.text);
        assert_eq!(a.body["agent_id"], "rig");
    }
    assert_eq!(default.send("GET", "/pool//gpu/health", Some(GPU_SECRET), None).await.status, 400);

    // The re-login relay and the page are the pool's too: gpu's secret reaches gpu's agent
    // only, and the default pool (no agent) starts none.
    assert_eq!(gpu.send("POST", "/oauth/login", Some(SECRET), None).await.status, 403, "the default secret on gpu's relay");
    let start = gpu.send("POST", "/oauth/login", Some(GPU_SECRET), Some(b"{}".to_vec())).await;
    assert_eq!((start.status, start.body["agent_id"].as_str(), start.body["state"].as_str()), (200, Some("rig"), Some("awaiting_code")), "{}", start.text);
    let login_id = start.body["login_id"].as_str().unwrap();
    let code = json!({"login_id": login_id, "code": "c0de"}).to_string().into_bytes();
    let elsewhere = default.send("POST", "/oauth/login/code", Some(SECRET), Some(code)).await;
    assert_eq!(elsewhere.status, 404, "gpu's login is unknown to the default pool: {}", elsewhere.text);
    assert_eq!(default.send("POST", "/oauth/login", Some(SECRET), None).await.status, 503, "no agent in the default pool");
    let page = gpu.send("GET", "/", None, None).await;
    assert!(page.status == 200 && page.text.contains("<html"), "{} {}", page.status, page.text);

    // `spark` is listed in gpu with its key too, but it serves the default pool: welcomed
    // into gpu, it hangs up rather than take gpu's work.
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    opts.edge_ws = format!("{}/pool/gpu", edge.ws_url());
    let spark = AgentProc::start(opts);
    assert!(eventually(Duration::from_secs(60), || spark.log().contains("EDGE_POOL")).await, "{}", spark.log());
    assert!(spark.claude_runs().is_empty());
}

/// Alerts of several pools: a pool's go to its own `NOTIFY_URL_<POOL>` when it has one, else
/// to `NOTIFY_URL`, and an alert of a pool other than `default` names it (its text and
/// `X-Claude-Runner-Pool`), so alerts that share a URL say which pool to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn worker_pool_alerts_go_to_the_pools_url_and_name_it() {
    harness::require_worker_bundle();
    let keys = Keys::new(&["spark", "rig", "crew"]);
    let listed = |id: &str| format!("{id}={}", shared::keys::encode_verifying(&keys.agent(id).verifying_key()));
    let hook = Webhook::start(vec![]);
    let (edge_url, gpu_url) = (hook.url("/runner-alerts"), hook.url("/gpu-alerts"));
    let edge = EdgeServer::start(
        EdgeKind::Worker,
        &keys,
        &[
            ("AGENT_PUBLIC_KEYS", &listed("spark")),
            ("POOLS", "gpu,team-b"),
            ("RUNNER_SECRET_GPU", "gpu-pool-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_GPU", &listed("rig")),
            ("RUNNER_SECRET_TEAM_B", "team-pool-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_TEAM_B", &listed("crew")),
            ("NOTIFY_URL", &edge_url),
            ("NOTIFY_URL_GPU", &gpu_url),
            ("OFFLINE_ALERT_MS", "2000"),
        ],
    );
    // One agent in each pool, then none: each pool alerts that it is offline.
    let mut agents = Vec::new();
    for (id, pool) in [("spark", "default"), ("rig", "gpu"), ("crew", "team-b")] {
        let mut opts = AgentOpts::for_edge(&edge, id);
        let mut client = Client::new(&edge.url());
        if pool != "default" {
            opts.edge_ws = format!("{}/pool/{pool}", edge.ws_url());
            opts = opts.env("EDGE_POOL", pool);
            client = Client::new(&format!("{}/pool/{pool}", edge.url()));
        }
        agents.push(AgentProc::start(opts));
        client.wait_online().await;
    }
    agents.iter_mut().for_each(AgentProc::stop);
    let offline = |hook: &Webhook| hook.received().into_iter().filter(|h| h.headers.get("x-claude-runner-alert").map(String::as_str) == Some("offline")).collect::<Vec<_>>();
    assert!(eventually(Duration::from_secs(20), || offline(&hook).len() >= 3).await, "{:?}", hook.received());
    let mut got: Vec<(String, Option<String>, bool)> = offline(&hook)
        .into_iter()
        .map(|h| {
            let pool = h.headers.get("x-claude-runner-pool").cloned();
            let named = h.body.starts_with(&format!("Pool `{}`: No agent has been connected", pool.as_deref().unwrap_or("default")));
            (h.path, pool, named)
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("/gpu-alerts".to_string(), Some("gpu".to_string()), true),
            ("/runner-alerts".to_string(), None, false),
            ("/runner-alerts".to_string(), Some("team-b".to_string()), true),
        ],
        "{:?}",
        hook.received()
    );
    let default = offline(&hook).into_iter().find(|h| !h.headers.contains_key("x-claude-runner-pool")).unwrap();
    assert!(default.body.starts_with("No agent has been connected"), "{}", default.body);
}

/// Protocol 9 keeps a connection's MAC keys in the session record, which the Worker keeps in
/// the socket's attachment. workerd evicts the Durable Object after ~10 s without an event
/// while the agent's socket stays open (heartbeats every 15 s here): the rebuilt edge must
/// read the keys back, so the agent's next heartbeat and the next job's result count on the
/// same connection — none refused as a forgery, no reconnect. (Were the keys lost, the
/// result would be refused, the agent dropped after two intervals, and the result would
/// arrive only under the next connection's keys: the job would still succeed, so the checks
/// below are on the refusals and the connections.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn worker_connection_keys_survive_the_objects_eviction() {
    harness::require_worker_bundle();
    let s = setup(EdgeKind::Worker, &[("HEARTBEAT_INTERVAL_MS", "15000"), ("LOST_AFTER_MS", "60000")], &[]).await;
    assert_eq!(s.client.execute(json!({"prompt": "before"})).await.body["success"], true);
    let rebuilt_with_the_agent = |log: &str| log.lines().any(|l| l.contains("edge rebuilt") && l.contains(", 1 agent connections"));
    assert!(eventually(Duration::from_secs(45), || rebuilt_with_the_agent(&s.edge.log())).await, "no eviction seen\n{}", s.edge.log());
    let a = s.client.execute(json!({"prompt": "after the eviction"})).await;
    assert_eq!(a.body["output"], "stand-in answer to: after the eviction", "{}", a.text);
    let metrics = s.client.get("/metrics").await.text;
    assert!(metrics.contains("claude_runner_reports_refused_total 0\n"), "{metrics}\n{}", s.edge.log());
    assert!(!s.edge.log().contains("not MACed by the agent"), "{}", s.edge.log());
    assert_eq!(s.agent.log().matches("connected to the edge").count(), 1, "one connection throughout\n{}", s.agent.log());
}
