//! Recovery end to end, on the native edge with the real agent: the scenarios of
//! a job left behind, run twice or never stopped. Each failed on the code before its fix.

use harness::proxy::{Direction, Proxy};
use harness::*;
use std::time::{Duration, Instant};

/// A native edge with agent `spark` connected (through `proxy`, if given).
async fn setup(edge_settings: &[(&str, &str)], proxy: bool) -> (EdgeServer, AgentProc, Client, Option<Proxy>) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, edge_settings);
    let proxy = if proxy { Some(Proxy::start(edge.port).await) } else { None };
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    if let Some(p) = &proxy {
        opts.edge_ws = format!("ws://127.0.0.1:{}", p.port());
    }
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    client.wait_online().await;
    (edge, agent, client, proxy)
}

/// Issue item 9: a child of Claude outlived the agent's SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_kills_claudes_whole_tree() {
    let (_edge, mut agent, client, _) = setup(&[], false).await;
    let pidfile = agent.data.path().join("child.pid");
    let a = client.submit(json!({"prompt": format!("@spawn_child={} @sleep=60000", pidfile.display())})).await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert!(eventually(Duration::from_secs(10), || pidfile.exists()).await, "{}", agent.log());
    let child: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let claude = agent.claude_runs()[0]["pid"].as_i64().unwrap() as i32;
    assert!(alive(child) && alive(claude));
    agent.kill();
    assert!(eventually(Duration::from_secs(5), || !alive(claude)).await, "claude {claude} outlived the agent");
    assert!(eventually(Duration::from_secs(5), || !alive(child)).await, "claude's child {child} outlived the agent");
}

/// Issue item 4: the agent dies after Claude started and before the edge saw `Accepted`
/// (here the agent's messages are black-holed from the moment the job is sent). After the
/// agent's restart the job is reported lost; it never runs a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_before_the_agent_died_is_lost_not_run_again() {
    // Long heartbeats: the agent does not give the muted link up before it is killed.
    let (_edge, mut agent, client, proxy) = setup(&[("LOST_AFTER_MS", "30000"), ("HEARTBEAT_INTERVAL_MS", "5000")], true).await;
    let proxy = proxy.unwrap();
    proxy.blackhole(Direction::Up);
    let a = client.submit(json!({"prompt": "@sleep=60000 once only"})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(10), || !agent.claude_runs().is_empty()).await, "{}", agent.log());
    assert_eq!(client.get(&format!("/jobs/{job_id}")).await.body["state"], "dispatched", "the edge never heard it started");
    agent.kill();
    agent.restart();
    let job = client.wait_job(&job_id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "lost", "{job}");
    // It is not sent again: a probe runs next, and the job ran once.
    let probe = client.execute(json!({"prompt": "probe", "timeout_ms": 20000})).await;
    assert_eq!(probe.status, 200, "{}", probe.text);
    let prompts: Vec<String> = agent.claude_runs().iter().map(|r| r["prompt"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(prompts, vec!["@sleep=60000 once only".to_string(), "probe".to_string()]);
}

/// Issue item 1, from outside: the edge is down while a job ends, so the agent's credit for
/// it is lost; once the edge is back the next job must run, not wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_edge_outage_across_a_job_end_the_agent_takes_work_again() {
    let (mut edge, agent, client, _) = setup(&[], false).await;
    let a = client.submit(json!({"prompt": "@sleep=1500 across the outage"})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(10), || !agent.claude_runs().is_empty()).await);
    edge.stop();
    // The job ends while the edge is away.
    assert!(eventually(Duration::from_secs(10), || agent.standin_log().iter().any(|l| l.get("end").is_some())).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    edge.restart();
    assert_eq!(client.wait_job(&job_id, Duration::from_secs(30)).await["state"], "succeeded");
    let next = client.execute(json!({"prompt": "next", "timeout_ms": 15000})).await;
    assert_eq!(next.status, 200, "{}", next.text);
    assert_eq!(next.body["success"], true, "the agent was left without credit: {}", next.text);
}

/// Issue item 3: the agent is frozen (SIGSTOP) during a long job and the caller cancels it
/// meanwhile. The job must end cancelled, with Claude stopped — not run on, not end lost
/// while the agent still runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_an_agent_freeze_stops_the_job() {
    let (_edge, agent, client, _) = setup(&[], false).await;
    let a = client.submit(json!({"prompt": "@sleep=20000 frozen"})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(10), || !agent.claude_runs().is_empty()).await);
    let claude = agent.claude_runs()[0]["pid"].as_i64().unwrap() as i32;
    agent.signal(libc::SIGSTOP);
    let cancelled = client.send("DELETE", &format!("/jobs/{job_id}"), Some(SECRET), None).await;
    assert_eq!(cancelled.status, 202, "{}", cancelled.text);
    // Frozen past two heartbeat intervals: the edge drops the connection meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.signal(libc::SIGCONT);
    let started = Instant::now();
    let job = client.wait_job(&job_id, Duration::from_secs(15)).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(eventually(Duration::from_secs(10), || !alive(claude)).await, "claude {claude} still runs");
    assert!(!agent.standin_log().iter().any(|l| l.get("end").is_some()), "the job ran to its end");
}
