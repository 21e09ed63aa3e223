//! `bench --keepalive`: what an event stream's keep-alive comments cost an edge. A job that
//! prints one line and then waits is followed for `--keepalive-seconds`, once with
//! `SSE_KEEPALIVE_MS=100` and once with the default 15 s (no keep-alive in that time), each
//! on a fresh edge; the difference of the edge's CPU (its whole process tree: node and
//! workerd for the Worker), divided by the difference of keep-alives read, is the CPU one
//! keep-alive costs. Both runs hold the same open stream, agent heartbeats and timers.

use super::{cpu_of_tree, round3};
use harness::{AgentOpts, AgentProc, Client, EdgeKind, EdgeServer, Keys, TempDir, SECRET};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub async fn run(seconds: u64, edges: &[EdgeKind]) -> Value {
    let mut out = serde_json::Map::new();
    for &kind in edges {
        let name = if kind == EdgeKind::Native { "native" } else { "worker" };
        let (fast_cpu, fast_n) = follow_quiet_job(kind, "100", seconds).await;
        let (slow_cpu, slow_n) = follow_quiet_job(kind, "15000", seconds).await;
        let per = (fast_n > slow_n).then(|| (fast_cpu - slow_cpu) / (fast_n - slow_n) as f64 * 1e6);
        eprintln!("{name}: {fast_n} keep-alives in {seconds} s: {fast_cpu:.3} s CPU; {slow_n} with 15 s: {slow_cpu:.3} s CPU");
        out.insert(
            name.into(),
            json!({
                "seconds": seconds,
                "keepalives_at_100ms": fast_n, "edge_cpu_s_at_100ms": round3(fast_cpu),
                "keepalives_at_15s": slow_n, "edge_cpu_s_at_15s": round3(slow_cpu),
                "cpu_us_per_keepalive": per.map(|p| p.round()),
            }),
        );
    }
    Value::Object(out)
}

/// The edge's CPU while one follower reads a quiet job for `seconds`, and the keep-alives read.
async fn follow_quiet_job(kind: EdgeKind, keepalive_ms: &str, seconds: u64) -> (f64, usize) {
    use futures_util::StreamExt;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(kind, &keys, &[("SSE_KEEPALIVE_MS", keepalive_ms)]);
    let _agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let dir = TempDir::new("bench-keepalive");
    let release = dir.path().join("release");
    let a = client.submit(json!({"prompt": format!("@await={} quiet", release.display())})).await;
    let job_id = a.body["job_id"].as_str().expect("the edge took the job").to_string();
    let http = reqwest::Client::new();
    let resp = http.get(format!("{}/jobs/{job_id}/events", edge.url())).header("X-Runner-Secret", SECRET).send().await.expect("the edge answers");
    let mut stream = Box::pin(resp.bytes_stream());
    let mut text = String::new();
    while !text.contains("waiting for") {
        let chunk = stream.next().await.expect("the stream goes on").expect("the stream reads");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let pid = edge.pid().expect("the edge runs");
    let start = cpu_of_tree(pid).own;
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut quiet = String::new();
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(until.into(), stream.next()).await {
        quiet.push_str(&String::from_utf8_lossy(&chunk));
    }
    let cpu = cpu_of_tree(pid).own - start;
    let _ = std::fs::write(&release, "");
    (cpu, quiet.matches(": keep-alive").count())
}
