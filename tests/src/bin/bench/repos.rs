//! `bench --repo`: what a `repo_url` costs. A repository of `--repo-mb` MiB over
//! `--repo-commits` commits (random, incompressible contents, made with `git fast-import`)
//! is served over https on 127.0.0.1 by the harness's git server; one agent (stand-in
//! `claude`) runs jobs on it through the native edge.
//!
//! 1. Time to the first Claude event (`POST /jobs`, then the first `progress` event of
//!    `GET /jobs/{id}/events`): with a cold cache (the mirror removed before each job: a
//!    whole clone) and with a cached mirror (a fetch that finds nothing new), alternated,
//!    `--repo-runs` of each.
//! 2. `include_diff` on a change of `--diff-files` new files: the time the agent spends
//!    staging and diffing (its "changes handed back" log line), and the whole job's
//!    `duration_ms` with and without it, alternated.

use super::{dist, http_client, round3};
use harness::git_server::{git, GitServer};
use harness::{AgentOpts, AgentProc, EdgeKind, EdgeServer, Keys, SECRET};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RepoOpts {
    pub runs: usize,
    pub mb: usize,
    pub commits: usize,
    pub files: usize,
    pub diff_files: usize,
}

impl Default for RepoOpts {
    fn default() -> Self {
        RepoOpts { runs: 10, mb: 50, commits: 5000, files: 500, diff_files: 1000 }
    }
}

// The aims.
const AIM_CACHED_MS: f64 = 300.0;
const AIM_SPEEDUP: f64 = 20.0;

/// A small, fast, seeded generator: the same repository every run.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes repository `name` on `server`: `files` files on `main`, then one commit per file
/// change until `commits`, all contents random, about `mb` MiB in all.
fn generate(server: &GitServer, name: &str, o: &RepoOpts) -> anyhow::Result<Value> {
    let started = Instant::now();
    let bare = server.bare(name);
    std::fs::create_dir_all(&bare)?;
    git(&bare, &["init", "-q", "--bare"]);
    let per_change = (o.mb * 1024 * 1024) / (o.commits + o.files);
    let mut child = std::process::Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(&bare)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, child.stdin.take().expect("piped"));
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    let mut blob = vec![0u8; per_change];
    let path = |i: usize| format!("src/part{:02}/file{i:04}.bin", i % 20);
    for c in 0..o.commits {
        let changed: Vec<usize> = if c == 0 { (0..o.files).collect() } else { vec![c % o.files] };
        let mut marks = Vec::new();
        for (k, _) in changed.iter().enumerate() {
            rng.fill(&mut blob);
            let mark = 1_000_000 + c * o.files + k;
            write!(w, "blob\nmark :{mark}\ndata {}\n", blob.len())?;
            w.write_all(&blob)?;
            w.write_all(b"\n")?;
            marks.push(mark);
        }
        let message = format!("change {c}");
        write!(w, "commit refs/heads/main\nmark :{}\ncommitter Bench <bench@example.com> {} +0000\ndata {}\n{message}\n", c + 1, 1_700_000_000 + c, message.len())?;
        if c > 0 {
            writeln!(w, "from :{c}")?;
        }
        for (file, mark) in changed.iter().zip(&marks) {
            writeln!(w, "M 100644 :{mark} {}", path(*file))?;
        }
        w.write_all(b"\n")?;
    }
    w.flush()?;
    drop(w);
    anyhow::ensure!(child.wait()?.success(), "git fast-import failed");
    git(&bare, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    let commits: usize = git(&bare, &["rev-list", "--count", "main"]).parse()?;
    let pack_bytes = dir_bytes(&bare.join("objects"));
    Ok(json!({
        "commits": commits, "files": o.files, "pack_mib": round3(pack_bytes as f64 / 1048576.0),
        "generated_s": round3(started.elapsed().as_secs_f64()),
    }))
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        total += if p.is_dir() { dir_bytes(&p) } else { p.metadata().map(|m| m.len()).unwrap_or(0) };
    }
    total
}

/// One job through `POST /jobs` and its event stream: the time to its first progress event
/// and its result.
async fn first_event(http: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<(Duration, Value)> {
    use futures_util::StreamExt;
    let started = Instant::now();
    let resp = http.post(format!("{base}/jobs")).header("X-Runner-Secret", SECRET).json(body).send().await?;
    let accepted: Value = resp.json().await?;
    let job_id = accepted["job_id"].as_str().ok_or_else(|| anyhow::anyhow!("not accepted: {accepted}"))?.to_string();
    let resp = http.get(format!("{base}/jobs/{job_id}/events")).header("X-Runner-Secret", SECRET).send().await?;
    let mut stream = resp.bytes_stream();
    let (mut text, mut first) = (String::new(), None);
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk?));
        if first.is_none() && text.contains("event: progress") {
            first = Some(started.elapsed());
        }
        if text.contains("event: result") && text.ends_with("\n\n") {
            break;
        }
    }
    let data = text.split("event: result\ndata: ").nth(1).unwrap_or("").trim();
    let result: Value = serde_json::from_str(data).unwrap_or(Value::Null);
    anyhow::ensure!(result["success"] == true, "job {job_id} failed: {result}");
    Ok((first.ok_or_else(|| anyhow::anyhow!("job {job_id} sent no progress"))?, result))
}

/// A figure from the agent's log line `message` about `job_id` (e.g. `ms=123`).
fn logged_ms(agent: &AgentProc, job_id: &str, message: &str, field: &str) -> Option<Duration> {
    let log = agent.log();
    let line = log.lines().filter(|l| l.contains(message) && l.contains(job_id)).last()?;
    let at = line.find(&format!(" {field}="))? + field.len() + 2;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok().map(Duration::from_millis)
}

pub async fn run(o: RepoOpts) -> anyhow::Result<Value> {
    let server = tokio::task::block_in_place(|| GitServer::start(None));
    eprintln!("[repo] generating a repository of {} MiB over {} commits", o.mb, o.commits);
    let repo = tokio::task::block_in_place(|| generate(&server, "big", &o))?;
    eprintln!("[repo] {repo}");
    let keys = Keys::new(&["spark"]);
    let edge = tokio::task::block_in_place(|| EdgeServer::start(EdgeKind::Native, &keys, &super::edge_settings()));
    let agent = tokio::task::block_in_place(|| {
        AgentProc::start(
            AgentOpts::for_edge(&edge, "spark")
                .env("ALLOWED_REPO_HOSTS", &server.host())
                .env("SSL_CERT_FILE", &server.cert_file.display().to_string())
                .env("STANDIN_LOG", ""),
        )
    });
    let http = http_client();
    let base = edge.url();
    harness::Client::new(&base).wait_online().await;
    let repos = agent.data.path().join("data/repos");
    let url = server.url("big");

    // Warm-up: one cold and one cached job, not counted.
    let job = json!({"prompt": "bench", "repo_url": url, "timeout_ms": 600_000});
    first_event(&http, &base, &job).await?;
    first_event(&http, &base, &job).await?;
    // Per kind (cold, cached): first event, the agent's fetch, its fetch + checkout.
    let mut times: [[Vec<Duration>; 3]; 2] = Default::default();
    for i in 0..o.runs {
        for (kind, samples) in times.iter_mut().enumerate() {
            if kind == 0 {
                let _ = std::fs::remove_dir_all(&repos);
            }
            let (t, r) = first_event(&http, &base, &job).await?;
            let id = r["job_id"].as_str().unwrap_or("?");
            let fetch = logged_ms(&agent, id, "repository checked out", "fetch_ms").unwrap_or_default();
            let prepare = logged_ms(&agent, id, "repository checked out", "ms").unwrap_or_default();
            samples[0].push(t);
            samples[1].push(fetch);
            samples[2].push(prepare);
        }
        eprintln!("[repo] run {}: cold {:.0} ms, cached {:.1} ms", i + 1, ms(times[0][0][i]), ms(times[1][0][i]));
    }
    let [[cold, cold_fetch, cold_prepare], [cached, cached_fetch, cached_prepare]] = times;

    eprintln!("[repo] include_diff on a change of {} new files", o.diff_files);
    let prompt: String = (0..o.diff_files).map(|i| format!("@write=changes/part{:02}/new{i:04}.txt ", i % 20)).collect();
    let (mut with, mut without, mut handing, mut diff_bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..o.runs {
        for include in [true, false] {
            let body = json!({"prompt": prompt, "repo_url": url, "include_diff": include, "timeout_ms": 600_000});
            let (_, r) = first_event(&http, &base, &body).await?;
            let took = Duration::from_millis(r["duration_ms"].as_u64().unwrap_or(0));
            if include {
                anyhow::ensure!(r["files_changed"].as_array().map(Vec::len) == Some(o.diff_files), "the diff lists every file");
                diff_bytes = r["diff"].as_str().map(str::len).unwrap_or(0);
                with.push(took);
                handing.push(logged_ms(&agent, r["job_id"].as_str().unwrap_or("?"), "changes handed back", "ms").unwrap_or_default());
            } else {
                without.push(took);
            }
        }
    }
    let (cold_d, cached_d) = (dist(&cold), dist(&cached));
    let speedup = cold_d["p50_ms"].as_f64().unwrap_or(0.0) / cached_d["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let (with_d, without_d) = (dist(&with), dist(&without));
    Ok(json!({
        "repository": repo,
        "runs": o.runs,
        "first_event": {
            "cold": cold_d, "cached": cached_d, "speedup_p50": round3(speedup),
            "cold_fetch": dist(&cold_fetch), "cached_fetch": dist(&cached_fetch),
            "cold_fetch_and_checkout": dist(&cold_prepare), "cached_fetch_and_checkout": dist(&cached_prepare),
        },
        "include_diff": {
            "files": o.diff_files, "diff_bytes": diff_bytes, "with": with_d, "without": without_d,
            "staging_and_diff": dist(&handing),
        },
        "targets": { "cached_first_event_ms": AIM_CACHED_MS, "speedup": AIM_SPEEDUP },
    }))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn print(r: &Value) {
    let f = &r["first_event"];
    let repo = &r["repository"];
    println!();
    println!(
        "Repository jobs: {} commits, {} files, {} MiB of objects; {} runs of each, alternated",
        repo["commits"], repo["files"], repo["pack_mib"], r["runs"]
    );
    println!("| time to the first Claude event (ms)  |    p50 |    p90 |    max |");
    println!("|--------------------------------------|-------:|-------:|-------:|");
    for (name, d) in [
        ("cold cache (a whole clone)", &f["cold"]),
        ("  of which the agent's fetch", &f["cold_fetch"]),
        ("  of which fetch + checkout", &f["cold_fetch_and_checkout"]),
        ("cached mirror (a fetch, nothing new)", &f["cached"]),
        ("  of which the agent's fetch", &f["cached_fetch"]),
        ("  of which fetch + checkout", &f["cached_fetch_and_checkout"]),
    ] {
        println!("| {name:<36} | {:>6.1} | {:>6.1} | {:>6.1} |", d["p50_ms"].as_f64().unwrap_or(f64::NAN), d["p90_ms"].as_f64().unwrap_or(f64::NAN), d["max_ms"].as_f64().unwrap_or(f64::NAN));
    }
    let cached = f["cached"]["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let speedup = f["speedup_p50"].as_f64().unwrap_or(0.0);
    println!(
        "cached p50 {cached:.1} ms (aim < {AIM_CACHED_MS} ms: {}); {speedup:.0}× faster than cold (aim ≥ {AIM_SPEEDUP}×: {})",
        super::verdict(cached < AIM_CACHED_MS),
        super::verdict(speedup >= AIM_SPEEDUP)
    );
    let d = &r["include_diff"];
    let p50 = |v: &Value| v["p50_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "include_diff on {} new files ({} KiB of diff): staging and diffing took p50 {:.0} ms (p90 {:.0}); whole jobs p50 {:.0} ms with it, {:.0} ms without",
        d["files"],
        d["diff_bytes"].as_u64().unwrap_or(0) / 1024,
        p50(&d["staging_and_diff"]),
        d["staging_and_diff"]["p90_ms"].as_f64().unwrap_or(f64::NAN),
        p50(&d["with"]),
        p50(&d["without"]),
    );
}
