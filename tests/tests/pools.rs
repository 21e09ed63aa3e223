//! Many agents on one pool (issue 11), end to end: real agents with the stand-in for
//! `claude` on the native edge — labels and `agent_id`, repository affinity, callers taking
//! turns, pause and resume, `--one-job`, an agent killed with jobs (its running job ends
//! lost, queued work goes on at the others) — and on the Worker
//! under Miniflare: `/pool/<name>` reaching that pool's agents and `GET /pools`.

use harness::git_server::GitServer;
use harness::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-secret-0123456789abcdef";
const CALLER_A: &str = "caller-a-secret-0123456789";
const CALLER_B: &str = "caller-b-secret-0123456789";

struct Pool {
    edge: EdgeServer,
    agents: Vec<AgentProc>,
    client: Client,
}

/// A native edge and one agent per `(id, settings)`, each connected.
async fn pool(kind: EdgeKind, agents: &[(&str, &[(&str, &str)])], edge_settings: &[(&str, &str)]) -> Pool {
    let ids: Vec<&str> = agents.iter().map(|(id, _)| *id).collect();
    let keys = Keys::new(&ids);
    let mut settings = vec![("ADMIN_SECRET", ADMIN)];
    settings.extend_from_slice(edge_settings);
    let edge = EdgeServer::start(kind, &keys, &settings);
    let procs = agents
        .iter()
        .map(|(id, env)| {
            let mut opts = AgentOpts::for_edge(&edge, id);
            for (k, v) in env.iter() {
                opts = opts.env(k, v);
            }
            AgentProc::start(opts)
        })
        .collect();
    let client = Client::new(&edge.url());
    let p = Pool { edge, agents: procs, client };
    p.wait_agents(ids.len()).await;
    p
}

impl Pool {
    /// Waits until `n` agents are connected.
    async fn wait_agents(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let h = self.client.health_full().await;
            let online = h.body["agents"].as_array().map_or(0, |a| a.iter().filter(|a| a["connected"] == true).count());
            if online == n {
                return;
            }
            assert!(Instant::now() < deadline, "{n} agents never connected: {}\n{}", h.text, self.edge.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn agent(&self, id: &str) -> &AgentProc {
        self.agents.iter().find(|a| a.id == id).expect("a known agent")
    }

    /// Which agent's stand-in ran `prompt`.
    fn ran_on(&self, prompt: &str) -> Vec<String> {
        self.agents.iter().filter(|a| a.claude_runs().iter().any(|r| r["prompt"] == prompt)).map(|a| a.id.clone()).collect()
    }
}

async fn submit_as(client: &Client, secret: &str, body: Value) -> Answer {
    client.send("POST", "/jobs", Some(secret), Some(body.to_string().into_bytes())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_and_agent_id_route_jobs_between_agents() {
    let p = pool(
        EdgeKind::Native,
        &[("spark", &[("AGENT_LABELS", "os=linux,model=opus")]), ("laptop", &[("AGENT_LABELS", "os=mac,model=opus")])],
        &[],
    )
    .await;
    let a = p.client.execute(json!({"prompt": "on a mac", "labels": {"os": "mac"}})).await;
    assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("laptop")), "{}", a.text);
    assert_eq!(p.ran_on("on a mac"), ["laptop"]);
    let a = p.client.execute(json!({"prompt": "pinned", "agent_id": "spark", "labels": "model=opus"})).await;
    assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("spark")), "{}", a.text);
    // Labels nobody offers: /execute falls back at once, naming them; POST /jobs waits.
    let started = Instant::now();
    let a = p.client.execute(json!({"prompt": "on a gpu", "labels": "gpu=a100"})).await;
    assert_eq!((a.status, a.body["error_code"].as_str(), a.body["fallback"].as_bool()), (503, Some("RUNNER_OFFLINE"), Some(true)), "{}", a.text);
    assert!(a.body["error"].as_str().unwrap().contains("gpu=a100"), "{}", a.text);
    // At once: not the 300 s such a job would wait (a bound that only a wait fails).
    assert!(started.elapsed() < Duration::from_secs(60), "answered at once");
    let waiting = p.client.submit(json!({"prompt": "on a gpu later", "labels": "gpu=a100"})).await;
    assert_eq!(waiting.status, 202, "{}", waiting.text);
    let id = waiting.body["job_id"].as_str().unwrap();
    // Other work goes on around it.
    let a = p.client.execute(json!({"prompt": "anywhere"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(p.client.get(&format!("/jobs/{id}")).await.body["state"], "queued");
    // /health lists both agents with their labels, load and login.
    let h = p.client.health_full().await;
    let agents = h.body["agents"].as_array().unwrap();
    let laptop = agents.iter().find(|a| a["agent_id"] == "laptop").unwrap();
    assert_eq!((laptop["labels"]["os"].as_str(), laptop["login"].as_str(), laptop["capacity"].as_u64()), (Some("mac"), Some("good"), Some(1)), "{}", h.text);
    assert_eq!(h.body["agents_taking_work"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_job_goes_to_the_agent_holding_its_mirror() {
    let git = GitServer::start(None);
    git.seed("alpha", &[("README.md", b"alpha\n")]);
    git.seed("beta", &[("README.md", b"beta\n")]);
    let allowed = format!("github.com,{}", git.host());
    let cert = git.cert_file.display().to_string();
    let env: &[(&str, &str)] = &[("ALLOWED_REPO_HOSTS", &allowed), ("SSL_CERT_FILE", &cert)];
    let p = pool(EdgeKind::Native, &[("spark", env), ("laptop", env)], &[]).await;
    // The first job of each repository is pinned, so the mirrors are on different agents.
    for (repo, agent) in [("alpha", "spark"), ("beta", "laptop")] {
        let a = p.client.execute(json!({"prompt": format!("first on {repo}"), "repo_url": git.url(repo), "agent_id": agent})).await;
        assert_eq!((a.status, a.body["success"].as_bool()), (200, Some(true)), "{}", a.text);
    }
    // Every later job of a repository, sent while both agents are free, goes where its
    // mirror is — whichever agent load alone would pick.
    let holder = std::collections::BTreeMap::from([("alpha", "spark"), ("beta", "laptop")]);
    for i in 0..8 {
        let repo = if i % 2 == 0 { "alpha" } else { "beta" };
        let a = p.client.execute(json!({"prompt": format!("job {i} on {repo}"), "repo_url": git.url(repo)})).await;
        assert_eq!((a.status, a.body["success"].as_bool()), (200, Some(true)), "{}", a.text);
        assert_eq!(a.body["agent_id"].as_str(), Some(holder[repo]), "job {i} of {repo} went elsewhere than its mirror");
    }
    // Each agent reports what it holds: the mirrors are where the jobs went.
    for (repo, agent) in &holder {
        let mirrors = std::fs::read_dir(p.agent(agent).data.path().join("data/repos")).unwrap();
        let names: Vec<String> = mirrors.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().any(|n| n.contains(repo)), "{agent} holds no mirror of {repo}: {names:?}");
        let other = if *agent == "spark" { "laptop" } else { "spark" };
        let theirs = std::fs::read_dir(p.agent(other).data.path().join("data/repos")).unwrap();
        assert!(!theirs.flatten().any(|e| e.file_name().to_string_lossy().contains(repo)), "{other} cloned {repo} too");
    }
}

/// Caller A queues a burst of 12 jobs of 1.5 s each (`burst_job(i)`: the secret and the
/// body of the i-th); once two of them run (every slot busy), B queues one. Meanwhile the
/// agents are paused, so the A jobs sent before B's was queued are known — not guessed
/// from the clock: on a loaded machine a slot could free and another A job go out between
/// the test's reading of the time and B's job reaching the edge, and count as overtaking
/// B. B's job must start within agents × slots dispatches. Returns A's jobs and B's.
async fn burst_then_one(p: &Pool, burst_job: impl Fn(usize) -> (&'static str, Value)) -> (Vec<String>, String) {
    let (agents, slots) = (2, 1);
    let mut burst = Vec::new();
    for i in 0..12 {
        let (secret, mut body) = burst_job(i);
        body["prompt"] = json!(format!("@sleep=1500 burst {i}"));
        let a = submit_as(&p.client, secret, body).await;
        assert_eq!(a.status, 202, "{}", a.text);
        burst.push(a.body["job_id"].as_str().unwrap().to_string());
    }
    let a_runs = || p.agents.iter().flat_map(|a| a.claude_runs()).filter(|r| r["prompt"].as_str().unwrap().starts_with("@sleep=1500 burst")).count();
    assert!(eventually(Duration::from_secs(60), || a_runs() == agents * slots).await, "A's first jobs did not start");
    for agent in ["spark", "laptop"] {
        assert_eq!(p.client.send("POST", &format!("/agents/{agent}/pause"), Some(SECRET), None).await.status, 200);
    }
    let mut sent_before = Vec::new();
    for (i, id) in burst.iter().enumerate() {
        if p.client.get(&format!("/jobs/{id}")).await.body["state"] != "queued" {
            sent_before.push(format!("@sleep=1500 burst {i}"));
        }
    }
    let b = submit_as(&p.client, CALLER_B, json!({"prompt": "@sleep=10 the single job"})).await;
    let b_id = b.body["job_id"].as_str().unwrap().to_string();
    for agent in ["spark", "laptop"] {
        assert_eq!(p.client.send("POST", &format!("/agents/{agent}/resume"), Some(SECRET), None).await.status, 200);
    }
    let done = p.client.wait_job(&b_id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // Count A's jobs sent after B's was queued that started before it.
    let b_started = p.agents.iter().flat_map(|a| a.claude_runs()).find(|r| r["prompt"] == "@sleep=10 the single job").unwrap()["at"].as_u64().unwrap();
    let overtook = p
        .agents
        .iter()
        .flat_map(|a| a.claude_runs())
        .filter(|r| r["prompt"].as_str().unwrap().starts_with("@sleep=1500 burst"))
        .filter(|r| !sent_before.iter().any(|p| r["prompt"] == p.as_str()))
        .filter(|r| r["at"].as_u64().unwrap() < b_started)
        .count();
    assert!(overtook < agents * slots, "{overtook} of A's jobs started before B's single one");
    (burst, b_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_caller_does_not_starve_another_caller() {
    let settings: &[(&str, &str)] = &[("RUNNER_SECRETS", &format!("a={CALLER_A},b={CALLER_B}"))];
    let p = pool(EdgeKind::Native, &[("spark", &[]), ("laptop", &[])], settings).await;
    let (burst, b_id) = burst_then_one(&p, |_| (CALLER_A, json!({}))).await;
    // A named caller's secret is that caller: it cannot queue as another.
    let a = submit_as(&p.client, CALLER_A, json!({"prompt": "x", "caller": "b"})).await;
    assert_eq!(a.status, 403, "{}", a.text);
    // ... and reaches only its own jobs: B neither sees nor cancels A's.
    let a_job = &burst[burst.len() - 1];
    for method in ["GET", "DELETE"] {
        let a = p.client.send(method, &format!("/jobs/{a_job}"), Some(CALLER_B), None).await;
        assert_eq!(a.status, 404, "{method} of A's job with B's secret: {}", a.text);
    }
    let a = p.client.send("GET", "/jobs", Some(CALLER_B), None).await;
    assert!(!a.text.contains(a_job.as_str()) && a.text.contains(b_id.as_str()), "{}", a.text);
    let a = p.client.send("GET", &format!("/jobs/{a_job}"), Some(CALLER_A), None).await;
    assert_eq!((a.status, a.body["job_id"].as_str()), (200, Some(a_job.as_str())), "{}", a.text);
    for id in burst {
        p.client.send("DELETE", &format!("/jobs/{id}"), Some(SECRET), None).await;
    }
}

/// The pool's secret spreading its burst over names it makes up takes one owner's turns,
/// not one per name: B, with its own secret, still goes within agents × slots (review rev1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_made_up_names_does_not_starve_a_caller_with_its_own_secret() {
    let settings: &[(&str, &str)] = &[("RUNNER_SECRETS", &format!("a={CALLER_A},b={CALLER_B}"))];
    let p = pool(EdgeKind::Native, &[("spark", &[]), ("laptop", &[])], settings).await;
    let (burst, _) = burst_then_one(&p, |i| (SECRET, json!({"caller": format!("made-up-{i}")}))).await;
    for id in burst {
        p.client.send("DELETE", &format!("/jobs/{id}"), Some(SECRET), None).await;
    }
}

/// At the default caps (README: `MAX_QUEUED_JOBS` 100, `MAX_QUEUED_PER_CALLER` the same),
/// caller A filling the queue with jobs no agent can take shut every other caller out, the
/// operator too, while the agent sat idle (review rev7, 1). Now A alone is refused: B's
/// `/execute` runs at once on the idle agent, and the operator's job is queued and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_filling_the_queue_shuts_no_one_else_out() {
    let settings: &[(&str, &str)] = &[("RUNNER_SECRETS", &format!("a={CALLER_A},b={CALLER_B}"))];
    let p = pool(EdgeKind::Native, &[("spark", &[("AGENT_LABELS", "gpu=none")])], settings).await;
    let mut queued = 0;
    let refused = loop {
        let a = submit_as(&p.client, CALLER_A, json!({"prompt": "never runs", "labels": {"gpu": format!("g{queued}")}})).await;
        match a.status {
            202 => queued += 1,
            _ => break a,
        }
        assert!(queued <= 100, "A queued past the default MAX_QUEUED_JOBS");
    };
    assert_eq!((queued, refused.status, refused.body["error_code"].as_str()), (100, 429, Some("RUNNER_BUSY")), "{}", refused.text);
    let b = p.client.send("POST", "/execute", Some(CALLER_B), Some(json!({"prompt": "b's task"}).to_string().into_bytes())).await;
    assert_eq!((b.status, b.body["success"].as_bool()), (200, Some(true)), "{}", b.text);
    let op = p.client.submit(json!({"prompt": "the operator's"})).await;
    assert_eq!(op.status, 202, "{}", op.text);
    let done = p.client.wait_job(op.body["job_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_caller_owns_its_name_and_sees_its_part_of_health() {
    let settings: &[(&str, &str)] = &[("RUNNER_SECRETS", &format!("a={CALLER_A},b={CALLER_B}")), ("MAX_QUEUED_PER_CALLER", "2")];
    let p = pool(EdgeKind::Native, &[("spark", &[("AGENT_LABELS", "os=linux")])], settings).await;
    // The pool's secret may not send jobs as `a`, which has a secret of its own: it could
    // fill a's queue cap (a's own jobs refused) or take a's turns.
    for path in ["/jobs", "/execute"] {
        let body = json!({"prompt": "as a", "caller": "a"}).to_string().into_bytes();
        let a = p.client.send("POST", path, Some(SECRET), Some(body)).await;
        assert_eq!((a.status, a.body["error_code"].as_str()), (403, Some("UNAUTHORIZED")), "{path}: {}", a.text);
        assert!(a.body["error"].as_str().unwrap().contains("RUNNER_SECRETS"), "{}", a.text);
    }
    assert!(p.ran_on("as a").is_empty());
    let mine = submit_as(&p.client, CALLER_A, json!({"prompt": "@sleep=3000 a's own"})).await;
    assert_eq!(mine.status, 202, "{}", mine.text);
    // A named caller's /health: the verdict, the agents and what they offer, its own
    // queue; no versions, logins or load — and nothing of other callers.
    let h = p.client.send("GET", "/health", Some(CALLER_B), None).await;
    assert_eq!(h.status, 200, "{}", h.text);
    assert_eq!(h.body["agents"], json!([{"agent_id": "spark", "labels": {"os": "linux"}, "takes_work": true}]), "{}", h.text);
    assert_eq!(h.body["queued_jobs"], 0, "b has nothing queued: {}", h.text);
    for operators in ["agent", "oauth"] {
        assert!(h.body.get(operators).is_none(), "{operators} shown to a caller: {}", h.text);
    }
    // The login and the counters need the pool's secret.
    for path in ["/oauth/status", "/metrics"] {
        let a = p.client.send("GET", path, Some(CALLER_A), None).await;
        assert_eq!(a.status, 403, "{path}: {}", a.text);
        assert_eq!(p.client.send("GET", path, Some(SECRET), None).await.status, 200, "{path}");
    }
    let id = mine.body["job_id"].as_str().unwrap();
    p.client.send("DELETE", &format!("/jobs/{id}"), Some(CALLER_A), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_falls_back_at_once_when_the_agents_that_fit_it_need_a_login() {
    let p = pool(EdgeKind::Native, &[("spark", &[("AGENT_LABELS", "gpu=none")]), ("gpu", &[("AGENT_LABELS", "gpu=a100")])], &[]).await;
    // The gpu agent's Claude fails to authenticate: it reports it at once.
    let a = p.client.execute(json!({"prompt": "@auth_error", "agent_id": "gpu"})).await;
    assert_eq!(a.body["error_code"], "RUNNER_OAUTH_ERROR", "{}", a.text);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = p.client.health_full().await;
        if h.body["agents"].as_array().is_some_and(|a| a.iter().any(|a| a["agent_id"] == "gpu" && a["login"] == "broken")) {
            break;
        }
        assert!(Instant::now() < deadline, "the gpu agent's broken login never showed: {}", h.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A gpu job falls back at once, told which agent fits and why it cannot take it —
    // though the pool as a whole can work (spark's login is fine).
    let started = Instant::now();
    let a = p.client.execute(json!({"prompt": "on the gpu", "labels": "gpu=a100"})).await;
    // At once: not the 300 s such a job would wait (a bound that only a wait fails).
    assert!(started.elapsed() < Duration::from_secs(60), "answered at once");
    assert_eq!((a.status, a.body["error_code"].as_str(), a.body["fallback"].as_bool()), (503, Some("RUNNER_OAUTH_ERROR"), Some(true)), "{}", a.text);
    assert!(a.body["error"].as_str().unwrap().contains("gpu (gpu=a100): its Claude OAuth login needs renewing"), "{}", a.text);
    assert!(p.ran_on("on the gpu").is_empty());
    assert_eq!(p.client.health().await.status, 200, "spark takes work");
    let a = p.client.execute(json!({"prompt": "anywhere"})).await;
    assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("spark")), "{}", a.text);
    // POST /jobs for the gpu waits for a new login instead.
    let waits = p.client.submit(json!({"prompt": "on the gpu later", "labels": "gpu=a100"})).await;
    assert_eq!(waits.status, 202, "{}", waits.text);
    let id = waits.body["job_id"].as_str().unwrap();
    assert_eq!(p.client.get(&format!("/jobs/{id}")).await.body["state"], "queued");
    p.client.send("DELETE", &format!("/jobs/{id}"), Some(SECRET), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_finishes_its_job_and_takes_no_new_ones_until_resumed() {
    let p = pool(EdgeKind::Native, &[("spark", &[]), ("laptop", &[])], &[]).await;
    let running = p.client.submit(json!({"prompt": "@sleep=1500 long one", "agent_id": "spark"})).await;
    let running = running.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(60), || !p.ran_on("@sleep=1500 long one").is_empty()).await);
    let a = p.client.send("POST", "/agents/spark/pause", Some(SECRET), None).await;
    assert_eq!((a.status, a.body["paused"].as_bool()), (200, Some(true)), "{}", a.text);
    let h = p.client.health_full().await;
    let spark = h.body["agents"].as_array().unwrap().iter().find(|a| a["agent_id"] == "spark").unwrap().clone();
    assert_eq!((spark["paused"].as_bool(), spark["takes_work"].as_bool()), (Some(true), Some(false)), "{}", h.text);
    assert_eq!(h.status, 200, "laptop still takes work");
    // New work goes to laptop only; spark's running job ends as usual.
    for i in 0..3 {
        let a = p.client.execute(json!({"prompt": format!("while paused {i}")})).await;
        assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("laptop")), "{}", a.text);
    }
    assert_eq!(p.client.wait_job(&running, Duration::from_secs(60)).await["state"], "succeeded");
    let pinned = p.client.execute(json!({"prompt": "x", "agent_id": "spark"})).await;
    assert_eq!(pinned.status, 503, "{}", pinned.text);
    assert!(pinned.body["error"].as_str().unwrap().contains("paused"), "{}", pinned.text);
    // The status page shows it.
    let page = p.client.send("GET", "/", None, None).await;
    assert_eq!(page.status, 200);
    let a = p.client.send("POST", "/agents/spark/resume", Some(SECRET), None).await;
    assert_eq!((a.status, a.body["paused"].as_bool()), (200, Some(false)), "{}", a.text);
    let a = p.client.execute(json!({"prompt": "after resume", "agent_id": "spark"})).await;
    assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("spark")), "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_jobs_leaves_the_others_serving() {
    let p = pool(
        EdgeKind::Native,
        &[("spark", &[]), ("laptop", &[]), ("desk", &[])],
        // The kill closes spark's connection at once; heartbeats slow enough (named): at
        // 500 ms the edge dropped any agent it heard nothing from for 1 s, which a loaded
        // machine's pause of laptop or desk could exceed, losing the job it ran. The edge
        // refuses a LOST_AFTER_MS under two intervals (an agent notices a silent edge only
        // then).
        &[("LOST_AFTER_MS", "5000"), ("HEARTBEAT_INTERVAL_MS", "2500")],
    )
    .await;
    let mut p = p;
    // A job runs on spark; laptop and desk are busy too, so one more job waits in the queue.
    let running = p.client.submit(json!({"prompt": "@sleep=60000 on spark", "agent_id": "spark"})).await;
    let running = running.body["job_id"].as_str().unwrap().to_string();
    for agent in ["laptop", "desk"] {
        p.client.submit(json!({"prompt": format!("@sleep=1500 on {agent}"), "agent_id": agent})).await;
    }
    assert!(eventually(Duration::from_secs(60), || p.ran_on("@sleep=60000 on spark").len() + p.ran_on("@sleep=1500 on laptop").len() + p.ran_on("@sleep=1500 on desk").len() == 3).await);
    let queued = p.client.submit(json!({"prompt": "waiting for a slot"})).await;
    let queued = queued.body["job_id"].as_str().unwrap().to_string();
    assert_eq!(p.client.get(&format!("/jobs/{queued}")).await.body["state"], "queued");
    p.agents.iter_mut().find(|a| a.id == "spark").unwrap().kill();
    // Its running job ends lost; the waiting job runs on another agent.
    let lost = p.client.wait_job(&running, Duration::from_secs(60)).await;
    assert_eq!((lost["state"].as_str(), lost["result"]["error_code"].as_str()), (Some("lost"), Some("RUNNER_LOST")), "{lost}");
    let moved = p.client.wait_job(&queued, Duration::from_secs(60)).await;
    assert_eq!(moved["state"], "succeeded", "{moved}");
    assert_ne!(moved["agent_id"], "spark");
    // The others keep serving; /health is degraded (an agent is down) but 200.
    for i in 0..4 {
        let a = p.client.execute(json!({"prompt": format!("after the kill {i}")})).await;
        assert_eq!((a.status, a.body["success"].as_bool()), (200, Some(true)), "{}", a.text);
    }
    let h = p.client.health_full().await;
    assert_eq!((h.status, h.body["status"].as_str()), (200, Some("degraded")), "{}", h.text);
    let spark = h.body["agents"].as_array().unwrap().iter().find(|a| a["agent_id"] == "spark").unwrap().clone();
    assert_eq!(spark["connected"], false, "{}", h.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_job_agent_exits_after_its_job() {
    let mut p = pool(EdgeKind::Native, &[("spark", &[])], &[]).await;
    // Restart spark as an ephemeral worker.
    p.agents[0].kill();
    let opts = AgentOpts::for_edge(&p.edge, "spark").env("MAX_CONCURRENT_JOBS", "2");
    let mut eph = AgentProc::start_with_flags(opts, &["--one-job"]);
    p.client.wait_online().await;
    let first = p.client.submit(json!({"prompt": "@sleep=300 the one"})).await.body["job_id"].as_str().unwrap().to_string();
    let second = p.client.submit(json!({"prompt": "the next"})).await.body["job_id"].as_str().unwrap().to_string();
    let status = eph.wait_exit(Duration::from_secs(60)).await.expect("the agent exits after its job");
    assert!(status.success(), "{status}:\n{}", eph.log());
    assert_eq!(p.client.wait_job(&first, Duration::from_secs(60)).await["state"], "succeeded");
    assert_eq!(p.client.get(&format!("/jobs/{second}")).await.body["state"], "queued", "one job only");
}

/// A `--one-job` agent offered every slot, took one order and refused the rest with
/// `retry`, each refusal counting toward the edge's limit of sends per job: a pool of
/// one-job workers on a full queue ended jobs "sent 16 times and never started". It offers
/// one slot, and none once it has its job, so no order it is sent is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_job_agent_offers_one_slot_and_refuses_no_order() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[("ADMIN_SECRET", ADMIN)]);
    let client = Client::new(&edge.url());
    let mut ids = Vec::new();
    for prompt in ["@sleep=300 the one", "the next"] {
        let a = client.submit(json!({"prompt": prompt})).await;
        assert_eq!(a.status, 202, "{}", a.text);
        ids.push(a.body["job_id"].as_str().unwrap().to_string());
    }
    let opts = AgentOpts::for_edge(&edge, "spark").env("MAX_CONCURRENT_JOBS", "2");
    let mut eph = AgentProc::start_with_flags(opts, &["--one-job"]);
    let status = eph.wait_exit(Duration::from_secs(60)).await.expect("the agent exits after its job");
    assert!(status.success(), "{status}:\n{}", eph.log());
    let states: Vec<Value> = states_of(&client, &ids).await;
    assert_eq!(states.iter().filter(|s| *s == "succeeded").count(), 1, "one job ran: {states:?}");
    assert_eq!(states.iter().filter(|s| *s == "queued").count(), 1, "the other waits: {states:?}");
    let metrics = client.get("/metrics").await.text;
    assert!(metrics.contains("claude_runner_orders_rejected_total 0\n"), "{metrics}\n{}\n{}", eph.log(), edge.log());
}

async fn states_of(client: &Client, ids: &[String]) -> Vec<Value> {
    let mut states = Vec::new();
    for id in ids {
        states.push(client.get(&format!("/jobs/{id}")).await.body["state"].clone());
    }
    states
}

/// An agent dialing a `/pool/<name>` the edge does not serve logged only "HTTP error: 404"
/// at every retry: it now says the edge refused it, for want of that pool, and what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_dialing_a_pool_the_edge_does_not_serve_is_told_what_to_set() {
    let keys = Keys::new(&["rig"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let mut opts = AgentOpts::for_edge(&edge, "rig").env("EDGE_POOL", "gpu");
    opts.edge_ws = format!("{}/pool/gpu", edge.ws_url());
    let rig = AgentProc::start(opts);
    let told = |log: &str| ["the edge refused this agent", "404", "`gpu`", "POOLS", "RUNNER_SECRET_GPU", "AGENT_PUBLIC_KEYS_GPU", "EDGE_URL"].iter().all(|w| log.contains(w));
    assert!(eventually(Duration::from_secs(60), || told(&rig.log())).await, "{}", rig.log());
}

const GPU_SECRET: &str = "gpu-pool-secret-0123456789";

/// The Worker's default pool, with its agent `spark`, and its pool `gpu` (`GPU_SECRET`),
/// with its agent `rig`.
struct WorkerPools {
    edge: EdgeServer,
    _spark: AgentProc,
    rig: AgentProc,
    /// The default pool's.
    client: Client,
    gpu: Client,
}

/// Starts the Worker and both agents (`WorkerPools::wait_agents` waits for them), the
/// Worker serving also the `more` pools, each `(name, RUNNER_SECRET_<NAME>,
/// AGENT_PUBLIC_KEYS_<NAME>)`, with no agent.
fn worker_pools(more: &[(&str, &str, &str)]) -> WorkerPools {
    require_worker_bundle();
    let keys = Keys::new(&["spark", "rig"]);
    let key_of = |id: &str| format!("{id}={}", shared::keys::encode_verifying(&keys.agent(id).verifying_key()));
    let pools: Vec<&str> = std::iter::once("gpu").chain(more.iter().map(|(name, _, _)| *name)).collect();
    let mut settings: Vec<(String, String)> = vec![
        ("ADMIN_SECRET".into(), ADMIN.to_string()),
        ("AGENT_PUBLIC_KEYS".into(), key_of("spark")),
        ("POOLS".into(), pools.join(",")),
        ("RUNNER_SECRET_GPU".into(), GPU_SECRET.to_string()),
        ("AGENT_PUBLIC_KEYS_GPU".into(), key_of("rig")),
    ];
    for (name, secret, agent_keys) in more {
        let name = name.to_uppercase().replace('-', "_");
        settings.push((format!("RUNNER_SECRET_{name}"), secret.to_string()));
        settings.push((format!("AGENT_PUBLIC_KEYS_{name}"), agent_keys.to_string()));
    }
    let refs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let edge = EdgeServer::start(EdgeKind::Worker, &keys, &refs);
    let _spark = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let mut rig_opts = AgentOpts::for_edge(&edge, "rig").env("EDGE_POOL", "gpu");
    rig_opts.edge_ws = format!("{}/pool/gpu", edge.ws_url());
    let rig = AgentProc::start(rig_opts);
    let client = Client::new(&edge.url());
    let gpu = Client::new(&format!("{}/pool/gpu", edge.url()));
    WorkerPools { edge, _spark, rig, client, gpu }
}

impl WorkerPools {
    /// Waits until both agents are connected, each to its pool.
    async fn wait_agents(&self) {
        self.client.wait_online().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.gpu.send("GET", "/health", None, None).await.status != 200 {
            assert!(Instant::now() < deadline, "the gpu pool's agent never connected:\n{}", self.rig.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn the_worker_routes_each_pool_to_its_agents_and_lists_pools() {
    let p = worker_pools(&[]);
    let (client, gpu) = (&p.client, &p.gpu);
    p.wait_agents().await;
    let a = gpu.send("POST", "/execute", Some(GPU_SECRET), Some(json!({"prompt": "on the rig"}).to_string().into_bytes())).await;
    assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("rig")), "{}", a.text);
    let a = client.send("GET", "/pools", Some(SECRET), None).await;
    assert_eq!(a.status, 403, "the pool's secret is not the admin's");
    let a = client.send("GET", "/pools", Some(ADMIN), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let pools = a.body["pools"].as_array().unwrap();
    let names: Vec<&str> = pools.iter().map(|p| p["pool"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "gpu"], "{}", a.text);
    assert!(pools.iter().all(|p| p["agents_online"] == 1 && p["queued_jobs"] == 0), "{}", a.text);
}

/// A Worker var of another type than text or number (wrangler.toml's `[vars]` takes TOML
/// booleans, arrays and tables) was read as unset, without a word: `MAX_QUEUED_JOBS = true`
/// ran with the default, `CALLBACK_HOSTS = ["hooks.example"]` refused every callback as not
/// listed. The edge now answers as misconfigured, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn a_worker_var_that_is_neither_text_nor_a_number_is_refused_not_unset() {
    require_worker_bundle();
    let keys = Keys::new(&["spark"]);
    let vars = TempDir::new("vars");
    let file = vars.path().join("vars.json");
    std::fs::write(&file, json!({"MAX_QUEUED_JOBS": true}).to_string()).unwrap();
    let edge = EdgeServer::start(EdgeKind::Worker, &keys, &[("WORKER_BINDINGS_FILE", file.to_str().unwrap())]);
    let client = Client::new(&edge.url());
    let a = client.send("POST", "/execute", Some(SECRET), Some(json!({"prompt": "x"}).to_string().into_bytes())).await;
    assert_eq!(a.status, 500, "{}", a.text);
    assert!(a.text.contains("MAX_QUEUED_JOBS must be a whole number"), "{}", a.text);
}

/// Pools with values of their own share one isolate's memory: gpu (`MAX_PENDING_BYTES_GPU`
/// 16 MiB) fills it with queued jobs past the default pool's 4 MiB, and the default pool,
/// holding nothing, still gets its own part (1 MiB: half its value between two pools) —
/// before (review rev32, 2) it was refused it, told it was past it. Past its part it is
/// held to its own value for the isolate, which gpu's jobs pass: so both pools are counted
/// in one isolate here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn a_pool_of_a_smaller_bound_gets_its_own_part_while_a_larger_one_fills_the_isolate() {
    require_worker_bundle();
    let keys = Keys::new(&["spark", "rig"]);
    let key_of = |id: &str| format!("{id}={}", shared::keys::encode_verifying(&keys.agent(id).verifying_key()));
    let (spark, rig) = (key_of("spark"), key_of("rig"));
    let settings = [
        ("AGENT_PUBLIC_KEYS", spark.as_str()),
        ("POOLS", "gpu"),
        ("RUNNER_SECRET_GPU", GPU_SECRET),
        ("AGENT_PUBLIC_KEYS_GPU", rig.as_str()),
        ("MAX_PENDING_BYTES", "4194304"),
        ("MAX_PENDING_BYTES_GPU", "16777216"),
    ];
    // No agent: the jobs stay queued, and pending.
    let edge = EdgeServer::start(EdgeKind::Worker, &keys, &settings);
    let (client, gpu) = (Client::new(&edge.url()), Client::new(&format!("{}/pool/gpu", edge.url())));
    let job = |bytes: usize| Some(json!({"prompt": "x".repeat(bytes), "timeout_ms": 600000}).to_string().into_bytes());
    for n in 0..11 {
        let a = gpu.send("POST", "/jobs", Some(GPU_SECRET), job(1_000_000)).await;
        assert_eq!(a.status, 202, "gpu's job {n}: {}", a.text);
    }
    let a = client.send("POST", "/jobs", Some(SECRET), job(500_000)).await;
    assert_eq!(a.status, 202, "the default pool's own part, gpu holding 11 MB: {}", a.text);
    let a = client.send("POST", "/jobs", Some(SECRET), job(700_000)).await;
    assert_eq!((a.status, a.body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{}", a.text);
    assert!(a.text.contains("past its own part (1048576) of MAX_PENDING_BYTES (4194304)"), "{}", a.text);
}

/// Pools are units of isolation: one pool's bad setting (a typo in its agents' keys)
/// answered every pool's requests 503 on the Worker, which read every pool's settings at
/// each request. The other pools serve on now; the bad one says what to fix, and
/// `GET /pools` lists it offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn one_pools_bad_setting_leaves_the_other_pools_serving() {
    let team_secret = "team-b-pool-secret-0123456789";
    let p = worker_pools(&[("team-b", team_secret, "laptop=not-a-key")]);
    let (client, gpu) = (&p.client, &p.gpu);
    let team = Client::new(&format!("{}/pool/team-b", p.edge.url()));
    let a = team.send("GET", "/health", Some(team_secret), None).await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert!(a.text.contains("AGENT_PUBLIC_KEYS_TEAM_B"), "the bad pool says what to fix: {}", a.text);
    p.wait_agents().await;
    let a = client.send("POST", "/execute", Some(SECRET), Some(json!({"prompt": "on the default pool"}).to_string().into_bytes())).await;
    assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("spark")), "{}", a.text);
    let a = gpu.send("POST", "/execute", Some(GPU_SECRET), Some(json!({"prompt": "on the rig"}).to_string().into_bytes())).await;
    assert_eq!((a.status, a.body["agent_id"].as_str()), (200, Some("rig")), "{}", a.text);
    let a = client.send("GET", "/pools", Some(ADMIN), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let listed: Vec<(&str, &str)> = a.body["pools"].as_array().unwrap().iter().map(|p| (p["pool"].as_str().unwrap(), p["status"].as_str().unwrap())).collect();
    assert_eq!(listed.len(), 3, "{}", a.text);
    assert_eq!(listed[2], ("team-b", "offline"), "{}", a.text);
    assert!(listed[..2].iter().all(|(_, status)| *status != "offline"), "{}", a.text);
}

/// `GET /pools` lists a default pool whose own setting is bad (here a RUNNER_SECRET of 15
/// characters) offline, as it lists any other pool's: the Worker read the default pool's
/// settings before it answered the route, so one bad default-pool setting answered the
/// list itself 503, and the admin could see no pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn get_pools_lists_a_misconfigured_default_pool_offline() {
    require_worker_bundle();
    let keys = Keys::new(&["rig"]);
    let rig = format!("rig={}", shared::keys::encode_verifying(&keys.agent("rig").verifying_key()));
    let settings = [
        ("ADMIN_SECRET", ADMIN),
        ("RUNNER_SECRET", "fifteen-chars-x"),
        ("POOLS", "gpu"),
        ("RUNNER_SECRET_GPU", GPU_SECRET),
        ("AGENT_PUBLIC_KEYS_GPU", rig.as_str()),
    ];
    let edge = EdgeServer::start(EdgeKind::Worker, &keys, &settings);
    let client = Client::new(&edge.url());
    // The default pool itself says what to fix.
    let a = client.send("GET", "/health", Some("fifteen-chars-x"), None).await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert!(a.text.contains("RUNNER_SECRET"), "{}", a.text);
    // The list answers, the default pool in it offline, the others as they are.
    let a = client.send("GET", "/pools", Some(ADMIN), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let listed: Vec<(&str, &str)> = a.body["pools"].as_array().unwrap().iter().map(|p| (p["pool"].as_str().unwrap(), p["status"].as_str().unwrap())).collect();
    assert_eq!(listed, [("default", "offline"), ("gpu", "offline")], "{}", a.text);
    // Still the admin's alone: without its secret, refused as before.
    let a = client.send("GET", "/pools", Some(GPU_SECRET), None).await;
    assert_eq!(a.status, 403, "{}", a.text);
    // Another method is the core's 405, answered as the list is: not handed to the
    // default pool, whose bad setting answered it 500.
    let a = client.send("POST", "/pools", Some(ADMIN), None).await;
    assert_eq!((a.status, a.body["error_code"].as_str()), (405, Some("METHOD_NOT_ALLOWED")), "{}", a.text);
}
