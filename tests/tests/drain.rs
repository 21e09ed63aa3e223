//! Stopping the agent gracefully (issue 10): the first SIGTERM drains it — no new jobs,
//! the running one finishes, its result reaches the edge, exit 0 — within
//! `DRAIN_TIMEOUT_MS`; past that, or on a second SIGTERM, the running jobs are handed back
//! (`RUNNER_LOST`, so callers fall back) and nothing is lost. `claude-runner agent
//! --drain` asks for the same from another shell and waits. `docker stop` and
//! `systemctl stop` send exactly this SIGTERM (see the Dockerfile and the units).

use harness::*;
use std::process::Command;
use std::time::{Duration, Instant};

struct Setup {
    edge: EdgeServer,
    agent: AgentProc,
    client: Client,
}

async fn setup(agent_env: &[(&str, &str)]) -> Setup {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    for (k, v) in agent_env {
        opts = opts.env(k, v);
    }
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    client.wait_online().await;
    Setup { edge, agent, client }
}

/// Submits `prompt` as an async job and waits until Claude (the stand-in) runs it.
async fn running_job(s: &Setup, prompt: &str) -> String {
    let a = s.client.submit(json!({"prompt": prompt, "timeout_ms": 120000})).await;
    assert_eq!(a.status, 202, "{}", a.text);
    let id = a.body["job_id"].as_str().unwrap().to_string();
    let started = eventually(Duration::from_secs(60), || s.agent.claude_runs().iter().any(|r| r["prompt"] == prompt)).await;
    assert!(started, "the job never started:\n{}", s.agent.log());
    id
}

async fn wait_for_log(agent: &AgentProc, needle: &str) {
    let seen = eventually(Duration::from_secs(60), || agent.log().contains(needle)).await;
    assert!(seen, "`{needle}` never logged:\n{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_job_finish_then_exits_0() {
    let mut s = setup(&[]).await;
    let job = running_job(&s, "@sleep=2500 finish me").await;
    s.agent.signal(libc::SIGTERM);
    wait_for_log(&s.agent, "agent draining").await;
    // A job submitted while draining is not taken: it waits in the edge's queue.
    let later = s.client.submit(json!({"prompt": "after the drain", "timeout_ms": 120000})).await;
    let later = later.body["job_id"].as_str().unwrap().to_string();
    // The edge hears that the agent is stopping: `/health` says so, and no agent can work.
    let mut stopping = false;
    for _ in 0..600 {
        let h = s.client.health_full().await;
        if h.body["agents"][0]["stopping"] == true {
            assert_eq!((h.status, h.body["agents_taking_work"].as_u64()), (503, Some(0)), "{}", h.text);
            stopping = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stopping, "the edge never heard the agent is stopping:\n{}", s.edge.log());
    // An `/execute` only this agent could take is refused at once, its caller told to fall
    // back, while the job the drain waits for still runs: before, it queued behind the whole
    // drain (up to DRAIN_TIMEOUT_MS), then was refused.
    let refused = s.client.execute(json!({"prompt": "execute while draining"})).await;
    assert_eq!((refused.status, refused.body["fallback"].as_bool()), (503, Some(true)), "{}", refused.text);
    assert!(refused.text.contains("stopping"), "{}", refused.text);
    assert_eq!(s.client.get(&format!("/jobs/{job}")).await.body["state"], "running");

    let status = s.agent.wait_exit(Duration::from_secs(20)).await.expect("the drained agent exits by itself");
    assert!(status.success(), "exit status {status}:\n{}", s.agent.log());
    let done = s.client.wait_job(&job, Duration::from_secs(5)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["output"], "stand-in answer to: @sleep=2500 finish me");
    assert!(!s.agent.claude_runs().iter().any(|r| r["prompt"] == "after the drain"), "a draining agent took new work");
    assert_eq!(s.client.get(&format!("/jobs/{later}")).await.body["state"], "queued");
    // Nothing is left for the next start to re-send: the edge acknowledged the result.
    let spool = s.agent.data.path().join("data/spool");
    assert_eq!(std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0), 0, "results left in {}", spool.display());

    // The next agent takes the waiting job, and `/execute` again.
    s.agent.start_again();
    let done = s.client.wait_job(&later, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let again = s.client.execute(json!({"prompt": "after the restart"})).await;
    assert_eq!((again.status, again.body["success"].as_bool()), (200, Some(true)), "{}", again.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_timeout_the_job_is_handed_back() {
    let mut s = setup(&[("DRAIN_TIMEOUT_MS", "500")]).await;
    let job = running_job(&s, "@sleep=60000 too long").await;
    let stopped = Instant::now();
    s.agent.signal(libc::SIGTERM);
    let status = s.agent.wait_exit(Duration::from_secs(20)).await.expect("the agent exits after the drain timeout");
    assert!(status.success(), "exit status {status}:\n{}", s.agent.log());
    assert!(stopped.elapsed() < Duration::from_secs(15), "handed back at the timeout, not after the job");
    let done = s.client.wait_job(&job, Duration::from_secs(5)).await;
    assert_eq!(done["result"]["error_code"], "RUNNER_LOST", "{done}");
    assert!(s.agent.log().contains("drain timeout"), "{}", s.agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_hands_the_jobs_back_at_once() {
    // The default drain timeout (5 minutes) would let the job finish.
    let mut s = setup(&[]).await;
    let job = running_job(&s, "@sleep=60000 long").await;
    s.agent.signal(libc::SIGTERM);
    wait_for_log(&s.agent, "agent draining").await;
    assert_eq!(s.client.get(&format!("/jobs/{job}")).await.body["state"], "running", "draining lets it run");
    s.agent.signal(libc::SIGTERM);
    let status = s.agent.wait_exit(Duration::from_secs(15)).await.expect("a second SIGTERM stops the agent");
    assert!(status.success(), "exit status {status}:\n{}", s.agent.log());
    let done = s.client.wait_job(&job, Duration::from_secs(5)).await;
    assert_eq!(done["state"], "lost", "{done}");
    assert_eq!(done["result"]["error_code"], "RUNNER_LOST", "reported, so the caller falls back: {done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_drain_asks_the_running_agent_and_waits_for_it() {
    let mut s = setup(&[]).await;
    let job = running_job(&s, "@sleep=2000 drain me").await;
    let data_dir = s.agent.data.path().join("data");
    let status_out = Command::new(bin("claude-runner")).arg("status").env("DATA_DIR", &data_dir).output().unwrap();
    assert!(String::from_utf8_lossy(&status_out.stdout).contains(&job));

    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin("claude-runner")).args(["agent", "--drain"]).env("DATA_DIR", &data_dir).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("waiting for {job}")), "{text}");
    assert!(text.contains("has stopped"), "{text}");
    // It returned only once the agent was gone (exiting: its memory released, an empty
    // command line, as `--drain` looks), with the job done. Looked at now, not timed: the
    // exit's last steps (the reap here) may take longer than a fixed wait on a loaded machine.
    let pid = s.agent.pid().expect("the agent was started here");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmdline.is_empty(), "the agent still ran when --drain returned: {}", String::from_utf8_lossy(&cmdline));
    let status = s.agent.wait_exit(Duration::from_secs(60)).await.expect("the agent had exited");
    assert!(status.success());
    assert_eq!(s.client.wait_job(&job, Duration::from_secs(60)).await["state"], "succeeded");

    // Nothing to drain now.
    let out = Command::new(bin("claude-runner")).args(["agent", "--drain"]).env("DATA_DIR", s.agent.data.path().join("data")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"));
}

/// `agent --drain` only ever drains: run while a SIGTERM's drain is under way (someone
/// watching a `systemctl stop`), and followed by the service manager's own SIGTERM, it
/// never becomes the second SIGTERM that hands the running job back. (It was a SIGTERM:
/// the job ended `lost`, its caller told to fall back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_drain_never_hands_back_what_a_drain_lets_finish() {
    let mut s = setup(&[]).await;
    let job = running_job(&s, "@sleep=4000 let me finish").await;
    let data_dir = s.agent.data.path().join("data");
    let drain = |data_dir: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || Command::new(bin("claude-runner")).args(["agent", "--drain"]).env("DATA_DIR", &data_dir).output().unwrap())
    };

    // A drain asked for from another shell, then the service manager's stop.
    let first = drain(data_dir.clone());
    wait_for_log(&s.agent, "agent draining").await;
    s.agent.signal(libc::SIGTERM);
    // And once more from another shell while it drains.
    let second = drain(data_dir.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.client.get(&format!("/jobs/{job}")).await.body["state"], "running", "{}", s.agent.log());

    let status = s.agent.wait_exit(Duration::from_secs(20)).await.expect("the drained agent exits by itself");
    assert!(status.success(), "exit status {status}:\n{}", s.agent.log());
    let done = s.client.wait_job(&job, Duration::from_secs(5)).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", s.agent.log());
    assert_eq!(done["result"]["output"], "stand-in answer to: @sleep=4000 let me finish");
    assert!(!s.agent.log().contains("stopped again"), "{}", s.agent.log());
    for out in [first.await.unwrap(), second.await.unwrap()] {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && text.contains("has stopped"), "{text}");
    }
}

/// A drain whose job ends while the edge is briefly away (restarting, a dropped link)
/// waits for the agent to reconnect and deliver the result before it exits. (It exited
/// at once with the result left in the spool: the edge, hearing nothing, ended the job
/// `lost` after LOST_AFTER_MS and its caller was told to fall back — though it ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_delivers_a_result_across_a_brief_edge_outage() {
    let mut s = setup(&[]).await;
    let prompt = "@sleep=1500 finish while the edge is away";
    let job = running_job(&s, prompt).await;
    s.agent.signal(libc::SIGTERM);
    wait_for_log(&s.agent, "agent draining").await;
    s.edge.stop();
    let ended = eventually(Duration::from_secs(60), || s.agent.standin_log().iter().any(|l| l["end"] == true && l["prompt"] == prompt)).await;
    assert!(ended, "{}", s.agent.log());
    // The result is made and spooled while the edge is down; it is back a moment later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.edge.restart();

    let status = s.agent.wait_exit(Duration::from_secs(20)).await.expect("the drained agent exits by itself");
    assert!(status.success(), "exit status {status}:\n{}", s.agent.log());
    let done = s.client.get(&format!("/jobs/{job}")).await.body;
    assert_eq!(done["state"], "succeeded", "delivered before the agent exited: {done}\n{}", s.agent.log());
    let spool = s.agent.data.path().join("data/spool");
    assert_eq!(std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0), 0, "results left in {}", spool.display());
}
