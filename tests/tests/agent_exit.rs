//! What the agent leaves behind when it exits cleanly: nothing. Its helpers (the zygote and
//! the launcher, its children) are ended and reaped before it exits. Left to their
//! parent-death signal, they died only as the agent exited, while systemd swept the unit's
//! remaining processes (`KillMode=mixed`); on a cgroup v1 host systemd could lose track of
//! one and wait out `TimeoutStopSec` (330 s) before a restart (`Restart=always`) or a
//! `systemctl stop` ended (the systemd container test hit it under load).
//!
//! A test binary of its own: this process adopts the orphans of its children (a
//! subreaper), which no other test should have to think about.

use harness::*;
use std::time::Duration;

/// The pids of `parent`'s children, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_agent_ends_its_helpers_before_it_exits() {
    // A helper still alive when the agent exits becomes this process's child, and stays a
    // process (a zombie, never reaped here) once its parent-death signal kills it: so a
    // pid of the agent's helpers still in /proc after the agent's exit was left running.
    // SAFETY: a process-wide flag of this test binary, which runs this one test.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let mut agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let client = Client::new(&edge.url());
    client.wait_online().await;
    // A job, so the launcher has started Claude once.
    let a = client.execute(json!({"prompt": "before the exit"})).await;
    assert_eq!(a.body["success"], true, "{}\n{}", a.text, agent.log());
    let pid = agent.pid().expect("the agent runs");
    let helpers = children_of(pid);
    // The zygote and the launcher (the stand-in's warden is gone with its job).
    assert!(helpers.len() >= 2, "the agent's children: {helpers:?}\n{}", agent.log());

    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", agent.log());
    let left: Vec<String> = helpers
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).ok().map(|c| format!("{p}: {}", c.replace('\0', " "))))
        .collect();
    assert!(left.is_empty(), "processes of the agent's still there after its exit: {left:?}\n{}", agent.log());
}
