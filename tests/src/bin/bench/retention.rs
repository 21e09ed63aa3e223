//! `bench --retention`: what an ended job costs the native edge once `MAX_RETAINED_JOBS`
//! is reached, when every job end forgets one (the oldest of the owner holding the most).
//! Jobs are ended without an agent: `POST /jobs` then `DELETE` (the job is queued, and
//! cancelled at once), 8 clients. Two layouts, each on a fresh edge:
//! - one owner: caller `a` (its own secret) ends `--retention-jobs` jobs, then the
//!   measured ones;
//! - two owners: the pool's secret ends half of them first, then `a` one more than
//!   half, so `a` holds the most and its oldest job comes after all of the pool's.
//! Measured: the edge's CPU per job over the last `--retention-measure` jobs of `a`
//! (each of which forgets one of `a`'s), and their `DELETE`'s latency.

use super::{dist, http_client, round3, cpu_of_tree};
use harness::{EdgeKind, EdgeServer, Keys, SECRET};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const A_SECRET: &str = "bench-caller-a-secret-0123456789";
const CLIENTS: usize = 8;

#[derive(Debug, Clone)]
pub struct RetentionOpts {
    pub jobs: usize,
    pub measure: usize,
}

impl Default for RetentionOpts {
    fn default() -> Self {
        RetentionOpts { jobs: 10_000, measure: 2_000 }
    }
}

/// Ends `n` jobs with `secret`, `CLIENTS` at a time; the `DELETE`s' latencies.
async fn end_jobs(url: &str, secret: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (next, url, secret) = (next.clone(), url.to_string(), secret.to_string());
        tasks.push(tokio::spawn(async move {
            let http = http_client();
            let mut took = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let resp = http.post(format!("{url}/jobs")).header("X-Runner-Secret", &secret).json(&json!({"prompt": "bench"})).send().await?;
                anyhow::ensure!(resp.status() == 202, "POST /jobs answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
                let v: Value = resp.json().await?;
                let id = v["job_id"].as_str().unwrap_or_default().to_string();
                let started = Instant::now();
                let resp = http.delete(format!("{url}/jobs/{id}")).header("X-Runner-Secret", &secret).send().await?;
                anyhow::ensure!(resp.status() == 202, "DELETE answered {}", resp.status());
                took.push(started.elapsed());
            }
            Ok(took)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

async fn layout(opts: &RetentionOpts, two_owners: bool) -> anyhow::Result<Value> {
    let keys = Keys::new(&["spark"]);
    let cap = opts.jobs.to_string();
    let secrets = format!("a={A_SECRET}");
    let settings = [("MAX_RETAINED_JOBS", cap.as_str()), ("RUNNER_SECRETS", secrets.as_str())];
    let edge = tokio::task::block_in_place(|| EdgeServer::start(EdgeKind::Native, &keys, &settings));
    let url = edge.url();
    let http = http_client();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{url}/health")).send().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the edge never answered /health; log:\n{}", edge.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = edge.pid().expect("the edge runs");
    let name = if two_owners { "two owners" } else { "one owner" };
    eprintln!("[retention, {name}] filling {} ended jobs", opts.jobs);
    if two_owners {
        end_jobs(&url, SECRET, opts.jobs / 2).await?;
        end_jobs(&url, A_SECRET, opts.jobs / 2 + 1).await?;
    } else {
        end_jobs(&url, A_SECRET, opts.jobs).await?;
    }
    eprintln!("[retention, {name}] measuring {} more", opts.measure);
    let cpu0 = cpu_of_tree(pid).own;
    let started = Instant::now();
    let took = end_jobs(&url, A_SECRET, opts.measure).await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_of_tree(pid).own - cpu0;
    Ok(json!({
        "layout": name,
        "edge_cpu_ms_per_job": round3(cpu * 1000.0 / opts.measure as f64),
        "jobs_per_s": round3(opts.measure as f64 / wall),
        "delete_ms": dist(&took),
    }))
}

pub async fn run(opts: RetentionOpts) -> anyhow::Result<Value> {
    let one = layout(&opts, false).await?;
    let two = layout(&opts, true).await?;
    Ok(json!({
        "command": "cargo run --release -p claude-runner-tests --bin bench -- ".to_string() + &std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        "max_retained_jobs": opts.jobs,
        "measured_jobs": opts.measure,
        "clients": CLIENTS,
        "layouts": [one, two],
    }))
}
