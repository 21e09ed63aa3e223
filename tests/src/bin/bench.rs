//! `bench`: what the edge and the agent cost on top of running Claude, measured with the
//! real binaries on loopback and the compiled stand-in for `claude`.
//!
//! ```text
//! cargo build --release --bins
//! cargo run --release -p claude-runner-tests --bin bench -- [--jobs N] [--clients C]
//!     [--edge native|worker|both] [--json PATH]
//! ```
//!
//! 1. Job overhead: the stand-in spawned directly (prompt on stdin, stdout read to the end,
//!    waited for: what the agent does) against `POST /execute` through an edge and one
//!    agent (`MAX_CONCURRENT_JOBS=8`), sequentially and with C concurrent clients (one
//!    keep-alive HTTP client each). Direct and edge runs are interleaved in blocks, in
//!    alternating order, so that load from other processes on a shared machine falls on
//!    both alike. Reported: p50/p99 of each, overhead = edge − direct at the same
//!    percentile, and throughput (jobs/s) for the concurrent runs.
//! 2. Offline: time to the 503 `RUNNER_OFFLINE` of an edge with no agent.
//! 3. Memory: VmRSS and PSS of the agent (with its launcher) and the edge once connected
//!    and idle ~2 s, and again after the job runs (VmHWM too), plus the CPU each process
//!    spent per job. The agent's aim is judged on PSS (see [`memory`]).
//!
//! `--edge worker` runs the same against the Worker under Miniflare (needs
//! `edge/worker/build.sh` first) and adds the time from Miniflare's start to its first
//! `/health` answer.
//!
//! `--repo` measures repository jobs instead (see [`repos`]): cold clone against cached
//! mirror, and the cost of `include_diff`.
//!
//! `--scale` measures one pool with many agents instead (see [`scale`]): 10 to 200 light
//! in-process agents speaking the real protocol, dispatch throughput, queue-to-dispatch
//! latency and the edge's memory.

#[path = "bench/keepalive.rs"]
mod keepalive;
#[path = "bench/repos.rs"]
mod repos;
#[path = "bench/retention.rs"]
mod retention;
#[path = "bench/scale.rs"]
mod scale;

use harness::{AgentOpts, AgentProc, EdgeKind, EdgeServer, Keys, TempDir, SECRET};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The arguments the agent gives Claude for a job with no options.
const CLAUDE_ARGS: [&str; 4] = ["-p", "--output-format", "stream-json", "--verbose"];
const AGENT_SLOTS: u32 = 8;
const WARMUP: usize = 20;

// The aims of the issue, and what the original TypeScript service did.
const AIM_OVERHEAD_P50_MS: f64 = 3.0;
const AIM_OVERHEAD_P99_MS: f64 = 8.0;
const AIM_THROUGHPUT: f64 = 400.0;
const AIM_OFFLINE_MS: f64 = 10.0;
const AIM_AGENT_PSS_MIB: f64 = 20.0;
const AIM_EDGE_RSS_MIB: f64 = 30.0;
const TS_OVERHEAD_P50_MS: f64 = 3.5;
const TS_OVERHEAD_P99_MS: f64 = 8.3;
const TS_THROUGHPUT: f64 = 385.0;
const TS_RSS_MIB: f64 = 60.0;

const USAGE: &str = "bench: Claude Runner's overhead, throughput, offline answer and memory

usage: cargo run --release -p claude-runner-tests --bin bench -- [options]
  --jobs N             jobs per run: sequential, and again with C clients (default 1000)
  --clients C          concurrent clients, and the agent's MAX_CONCURRENT_JOBS stays 8 (default 8)
  --offline N          requests to the offline edge (default 1000)
  --block N            jobs per interleaved block of direct / edge runs (default 100)
  --edge KIND          native (default), worker (the Worker under Miniflare), or both
  --json PATH          also write the figures as JSON to PATH
  --repo               measure repository jobs instead: time to the first Claude event with
                       a cold cache and with a cached mirror, and the cost of include_diff
  --repo-runs N        jobs of each kind (default 10)
  --repo-mb N          size of the generated repository in MiB (default 50)
  --repo-commits N     its commits (default 5000)
  --repo-files N       files in its working tree (default 500)
  --diff-files N       new files in the include_diff job (default 1000)
  --scale              measure one pool with many light in-process agents instead:
                       dispatch throughput, queue-to-dispatch latency, edge memory
  --scale-agents LIST  agent counts, comma-separated (default 10,50,100,200)
  --scale-slots N      slots per agent (default 4)
  --scale-jobs N       jobs queued, then drained (default 20000)
  --scale-rate N       jobs per second in the latency run (default 1000)
  --scale-seconds N    length of the latency run (default 5)
  --scale-unfit N      before the fill, queue N jobs each asking for a label no agent
                       offers (they wait the whole run): what such jobs cost dispatch
                       (default 0)
  --retention          measure what a job's end costs the native edge past MAX_RETAINED_JOBS,
                       with one owner of the retained jobs and with two
  --retention-jobs N   MAX_RETAINED_JOBS (default 10000)
  --retention-measure N  jobs measured once the cap is reached (default 2000)
  --keepalive          measure the CPU an event stream's keep-alive costs the edge (--edge
                       native, worker or both): a quiet job followed with SSE_KEEPALIVE_MS=100
                       against the default
  --keepalive-seconds N  how long each stream is followed (default 20)

Build the binaries first: cargo build --release --bins";

#[derive(Debug, Clone)]
struct Opts {
    jobs: usize,
    clients: usize,
    offline: usize,
    block: usize,
    edges: Vec<EdgeKind>,
    json: Option<PathBuf>,
    repo: Option<repos::RepoOpts>,
    scale: Option<scale::ScaleOpts>,
    retention: Option<retention::RetentionOpts>,
    /// `--keepalive`: seconds each stream is followed.
    keepalive: Option<u64>,
}

fn parse_args() -> Result<Opts, String> {
    let mut opts = Opts { jobs: 1000, clients: 8, offline: 1000, block: 100, edges: vec![EdgeKind::Native], json: None, repo: None, scale: None, retention: None, keepalive: None };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if name == "-h" || name == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || inline.clone().or_else(|| args.next()).ok_or_else(|| format!("{name} needs a value"));
        let number = |v: String| -> Result<usize, String> {
            v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{name} needs a positive number, not {v:?}"))
        };
        match name.as_str() {
            "--jobs" => opts.jobs = number(value()?)?,
            "--clients" => opts.clients = number(value()?)?,
            "--offline" => opts.offline = number(value()?)?,
            "--block" => opts.block = number(value()?)?,
            "--json" => opts.json = Some(PathBuf::from(value()?)),
            "--repo" => opts.repo = Some(opts.repo.take().unwrap_or_default()),
            "--repo-runs" => opts.repo.get_or_insert_with(Default::default).runs = number(value()?)?,
            "--repo-mb" => opts.repo.get_or_insert_with(Default::default).mb = number(value()?)?,
            "--repo-commits" => opts.repo.get_or_insert_with(Default::default).commits = number(value()?)?,
            "--repo-files" => opts.repo.get_or_insert_with(Default::default).files = number(value()?)?,
            "--scale" => opts.scale = Some(opts.scale.take().unwrap_or_default()),
            "--scale-slots" => opts.scale.get_or_insert_with(Default::default).slots = number(value()?)? as u32,
            "--scale-jobs" => opts.scale.get_or_insert_with(Default::default).jobs = number(value()?)?,
            "--scale-rate" => opts.scale.get_or_insert_with(Default::default).rate = number(value()?)?,
            "--scale-seconds" => opts.scale.get_or_insert_with(Default::default).seconds = number(value()?)? as u64,
            "--scale-unfit" => opts.scale.get_or_insert_with(Default::default).unfit = number(value()?)?,
            "--scale-agents" => {
                let list = value()?;
                let counts: Result<Vec<usize>, String> = list.split(',').map(|n| number(n.trim().to_string())).collect();
                opts.scale.get_or_insert_with(Default::default).agents = counts?;
            }
            "--keepalive" => opts.keepalive = Some(opts.keepalive.unwrap_or(20)),
            "--keepalive-seconds" => opts.keepalive = Some(number(value()?)? as u64),
            "--retention" => opts.retention = Some(opts.retention.take().unwrap_or_default()),
            "--retention-jobs" => opts.retention.get_or_insert_with(Default::default).jobs = number(value()?)?,
            "--retention-measure" => opts.retention.get_or_insert_with(Default::default).measure = number(value()?)?,
            "--diff-files" => opts.repo.get_or_insert_with(Default::default).diff_files = number(value()?)?,
            "--edge" => {
                opts.edges = match value()?.as_str() {
                    "native" => vec![EdgeKind::Native],
                    "worker" => vec![EdgeKind::Worker],
                    "both" => vec![EdgeKind::Native, EdgeKind::Worker],
                    other => return Err(format!("--edge is native, worker or both, not {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(opts)
}

/// The binaries must be there before anything starts; the harness would panic.
fn check_binaries(opts: &Opts) -> Result<(), String> {
    let dir = harness::bin_dir();
    let missing: Vec<&str> =
        ["claude-runner-edge", "claude-runner", "claude-standin"].into_iter().filter(|name| !dir.join(name).exists()).collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing in {}: {}\nbuild them first:  cargo build --release --bins\nthen:              cargo run --release -p claude-runner-tests --bin bench",
            dir.display(),
            missing.join(", ")
        ));
    }
    if opts.edges.contains(&EdgeKind::Worker) {
        let root = harness::repo_root();
        for f in ["edge/worker/build/index.js", "edge/worker/miniflare-host.mjs"] {
            if !root.join(f).exists() {
                return Err(format!("--edge worker needs {f}: run edge/worker/build.sh first"));
            }
        }
    }
    if !dir.ends_with("release") {
        eprintln!("warning: the binaries in {} are not a release build; figures will not be representative (use --release)", dir.display());
    }
    Ok(())
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = check_binaries(&opts) {
        eprintln!("bench: {e}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio starts");
    let report = match (opts.repo.clone(), opts.scale.clone()) {
        _ if opts.keepalive.is_some() => {
            let load_start = loadavg();
            let mut report = runtime.block_on(keepalive::run(opts.keepalive.expect("checked above"), &opts.edges));
            report["git_commit"] = json!(git_commit());
            report["machine"] = machine();
            report["load_average"] = json!([load_start, loadavg()]);
            println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            report
        }
        _ if opts.retention.is_some() => {
            let load_start = loadavg();
            let retention = opts.retention.clone().expect("checked above");
            let mut report = runtime.block_on(retention::run(retention)).unwrap_or_else(|e| {
                eprintln!("bench: the retention run failed: {e:#}");
                std::process::exit(1);
            });
            report["git_commit"] = json!(git_commit());
            report["machine"] = machine();
            report["load_average"] = json!([load_start, loadavg()]);
            println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            report
        }
        (None, Some(scale)) => {
            let load_start = loadavg();
            let mut report = runtime.block_on(scale::run(scale, &opts.edges));
            report["git_commit"] = json!(git_commit());
            report["machine"] = machine();
            report["load_average"] = json!([load_start, loadavg()]);
            println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            report
        }
        (repo, _) => match repo {
        Some(repo) => {
            let load_start = loadavg();
            let mut report = runtime.block_on(repos::run(repo)).unwrap_or_else(|e| {
                eprintln!("bench: the repository run failed: {e:#}");
                std::process::exit(1);
            });
            report["git_commit"] = json!(git_commit());
            report["machine"] = machine();
            report["load_average"] = json!([load_start, loadavg()]);
            repos::print(&report);
            report
        }
        None => {
            let report = runtime.block_on(run(opts.clone()));
            print_report(&report, &opts);
            report
        }
        },
    };
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report).expect("report serialises");
        match std::fs::write(path, text + "\n") {
            Ok(()) => println!("\nJSON written to {}", path.display()),
            Err(e) => {
                eprintln!("bench: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
}

// ------------------------------------------------------------------------------ figures

/// A latency distribution, in milliseconds.
fn dist(samples: &[Duration]) -> Value {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).expect("durations compare"));
    let pct = |p: f64| -> f64 {
        if ms.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * ms.len() as f64).ceil() as usize;
        ms[rank.clamp(1, ms.len()) - 1]
    };
    let mean = if ms.is_empty() { f64::NAN } else { ms.iter().sum::<f64>() / ms.len() as f64 };
    json!({
        "n": ms.len(),
        "min_ms": round3(ms.first().copied().unwrap_or(f64::NAN)),
        "p50_ms": round3(pct(50.0)),
        "p90_ms": round3(pct(90.0)),
        "p99_ms": round3(pct(99.0)),
        "max_ms": round3(ms.last().copied().unwrap_or(f64::NAN)),
        "mean_ms": round3(mean),
    })
}

/// p50 of the first and of the last tenth of a run, in run order: growth over a run shows.
fn drift(samples: &[Duration]) -> Value {
    let tenth = (samples.len() / 10).max(1);
    let head = &samples[..tenth.min(samples.len())];
    let tail = &samples[samples.len().saturating_sub(tenth)..];
    json!({ "first_tenth_p50_ms": dist(head)["p50_ms"], "last_tenth_p50_ms": dist(tail)["p50_ms"] })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ms(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

// ------------------------------------------------------------------------------ processes

/// The memory of a process tree, in MiB: `VmRSS` and `VmHWM` (peak) summed, and the
/// proportional set size (`Pss` of `/proc/PID/smaps_rollup`) summed, with each process's
/// own figures (`RssAnon`: its heap and stacks; `RssFile`: mapped files).
///
/// Summed RSS counts a page every process of the tree maps once per process: the agent
/// and its launcher are one binary, so its file pages count twice. PSS charges a shared
/// page to each of its n mappers by 1/n, so the sum over the tree is what the tree costs
/// the machine. `pss_mib` is null where `smaps_rollup` cannot be read (kernels before
/// 4.14, or another user's process).
fn memory(pid: u32, tree: bool) -> Value {
    let pids = if tree { harness::process_tree(pid) } else { vec![pid] };
    let mib = |kib: u64| round3(kib as f64 / 1024.0);
    let sum = |field: &str| mib(pids.iter().filter_map(|p| harness::proc_status_kib(*p, field)).sum::<u64>());
    let pss: Option<u64> = pids.iter().map(|p| harness::pss_kib(*p)).sum();
    let each: Vec<Value> = pids
        .iter()
        .map(|p| {
            let field = |f: &str| harness::proc_status_kib(*p, f).map(mib);
            json!({
                "pid": p, "command": harness::command_line(*p), "rss_mib": field("VmRSS"), "pss_mib": harness::pss_kib(*p).map(mib),
                "rss_anon_mib": field("RssAnon"), "rss_file_mib": field("RssFile"), "threads": harness::proc_status_kib(*p, "Threads"),
            })
        })
        .collect();
    json!({
        "rss_mib": sum("VmRSS"), "peak_rss_mib": sum("VmHWM"), "pss_mib": pss.map(mib),
        "processes": pids.len(), "each": each,
    })
}

/// The figure the agent's memory aim is judged on, and its name: PSS, or RSS where PSS
/// could not be read.
fn agent_memory_figure(m: &Value) -> (f64, &'static str) {
    match m["pss_mib"].as_f64() {
        Some(pss) => (pss, "PSS"),
        None => (ms(&m["rss_mib"]), "RSS"),
    }
}

/// CPU time a process spent: its own, and that of its children it has waited for (for
/// the agent's launcher: the wardens and stand-ins), in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    own: f64,
    children: f64,
}

fn cpu_of(pid: u32) -> Cpu {
    // SAFETY: sysconf has no memory effects.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Cpu::default() };
    let fields: Vec<f64> = stat.rsplit(')').next().unwrap_or("").split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect();
    // After the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let f = |i: usize| fields.get(i).copied().unwrap_or(0.0) / tick;
    Cpu { own: f(11) + f(12), children: f(13) + f(14) }
}

fn cpu_of_tree(pid: u32) -> Cpu {
    harness::process_tree(pid).into_iter().map(cpu_of).fold(Cpu::default(), |a, b| Cpu { own: a.own + b.own, children: a.children + b.children })
}

fn self_cpu() -> f64 {
    cpu_of(std::process::id()).own
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, m)| m.trim().to_string());
    let os = read("/etc/os-release").lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()));
    let mem_kib: Option<u64> =
        read("/proc/meminfo").lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "os": os,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "memory_gib": mem_kib.map(|k| round3(k as f64 / 1024.0 / 1024.0)),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The commit measured, with "+changes" when the code of the binaries differs from it
/// (the benchmark's own source aside).
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git").arg("-C").arg(harness::repo_root()).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let changed = git(&["status", "--porcelain", "--", "Cargo.lock", "shared", "edge", "agent", "tests/src", ":!tests/src/bin/bench.rs"])
        .is_some_and(|s| !s.is_empty());
    Some(if changed { commit + "+changes" } else { commit })
}

// ------------------------------------------------------------------------------ direct runs

/// Runs the stand-in once as the agent would: prompt on stdin, stdout read to its end, wait.
async fn direct_once(standin: &Path, cwd: &Path, log: &Path, prompt: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(standin)
        .args(CLAUDE_ARGS)
        .current_dir(cwd)
        .env("STANDIN_LOG", log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let write = async {
        stdin.write_all(prompt.as_bytes()).await?;
        stdin.shutdown().await?;
        drop(stdin);
        Ok::<_, std::io::Error>(())
    };
    let mut out = Vec::with_capacity(4096);
    let (w, r) = tokio::join!(write, stdout.read_to_end(&mut out));
    w?;
    r?;
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "the stand-in exited with {status}");
    anyhow::ensure!(out.windows(8).any(|w| w == b"\"result\""), "the stand-in printed no result");
    Ok(started.elapsed())
}

struct Direct {
    standin: PathBuf,
    dir: TempDir,
}

impl Direct {
    fn new() -> Direct {
        let dir = TempDir::new("bench-direct");
        std::fs::create_dir_all(dir.path().join("cwd")).expect("cwd");
        Direct { standin: harness::bin("claude-standin"), dir }
    }

    async fn run(self: &Arc<Self>, first: usize, count: usize, clients: usize) -> anyhow::Result<Batch> {
        let next = Arc::new(AtomicUsize::new(first));
        let end = first + count;
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..clients.min(count) {
            let (next, this) = (Arc::clone(&next), Arc::clone(self));
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let log = this.dir.path().join("standin.log");
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= end {
                        return Ok::<_, anyhow::Error>(out);
                    }
                    let took = direct_once(&this.standin, &this.dir.path().join("cwd"), &log, &prompt(i)).await?;
                    out.push((i, took));
                }
            }));
        }
        collect(workers, started).await
    }
}

fn prompt(i: usize) -> String {
    format!("benchmark job number {i}: reply with anything")
}

/// Latencies of one block, in job order, and the block's wall time.
struct Batch {
    latencies: Vec<(usize, Duration)>,
    agent_ms: Vec<(usize, u64)>,
    wall: Duration,
}

/// A client task's samples, each with its job number.
type Worker<T> = tokio::task::JoinHandle<anyhow::Result<Vec<(usize, T)>>>;

async fn collect<T: Into<Sample>>(workers: Vec<Worker<T>>, started: Instant) -> anyhow::Result<Batch> {
    let mut batch = Batch { latencies: Vec::new(), agent_ms: Vec::new(), wall: Duration::ZERO };
    for w in workers {
        for (i, s) in w.await?? {
            let s: Sample = s.into();
            batch.latencies.push((i, s.latency));
            if let Some(a) = s.agent_ms {
                batch.agent_ms.push((i, a));
            }
        }
    }
    batch.wall = started.elapsed();
    Ok(batch)
}

struct Sample {
    latency: Duration,
    agent_ms: Option<u64>,
}

impl From<Duration> for Sample {
    fn from(latency: Duration) -> Sample {
        Sample { latency, agent_ms: None }
    }
}

// ------------------------------------------------------------------------------ edge runs

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4)
        // workerd (the Worker's local host) closes a connection idle for about 5 s, and a
        // request sent on it just then is reset: never reuse one idle for 2 s.
        .pool_idle_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("reqwest client builds")
}

/// One `POST /execute`, timed from sending to the last byte of the answer.
async fn execute_once(http: &reqwest::Client, url: &str, i: usize) -> anyhow::Result<Sample> {
    let body = json!({ "prompt": prompt(i), "timeout_ms": 60_000 }).to_string();
    let started = Instant::now();
    let resp = http.post(url).header("X-Runner-Secret", SECRET).header("content-type", "application/json").body(body).send().await?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    let latency = started.elapsed();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    anyhow::ensure!(status == 200 && v["success"] == true, "job {i}: {status} {}", String::from_utf8_lossy(&bytes));
    Ok(Sample { latency, agent_ms: v["duration_ms"].as_u64() })
}

struct Through {
    url: String,
    clients: Vec<reqwest::Client>,
}

impl Through {
    async fn run(self: &Arc<Self>, first: usize, count: usize, clients: usize) -> anyhow::Result<Batch> {
        let next = Arc::new(AtomicUsize::new(first));
        let end = first + count;
        let started = Instant::now();
        let mut workers = Vec::new();
        for w in 0..clients.min(count) {
            let (next, this) = (Arc::clone(&next), Arc::clone(self));
            workers.push(tokio::spawn(async move {
                let http = &this.clients[w];
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= end {
                        return Ok::<_, anyhow::Error>(out);
                    }
                    out.push((i, execute_once(http, &this.url, i).await?));
                }
            }));
        }
        collect(workers, started).await
    }
}

/// One mode (sequential or concurrent), direct and through the edge, interleaved.
struct Paired {
    direct: Vec<Duration>,
    edge: Vec<Duration>,
    agent_ms: Vec<u64>,
    outside_agent: Vec<Duration>,
    direct_wall: Duration,
    edge_wall: Duration,
}

async fn paired(
    direct: &Arc<Direct>,
    through: &Arc<Through>,
    jobs: usize,
    clients: usize,
    block: usize,
    label: &str,
) -> anyhow::Result<Paired> {
    // Warm both paths (page cache, connection pools, the agent's first job).
    direct.run(0, WARMUP.max(clients), clients).await?;
    through.run(0, WARMUP.max(clients), clients).await?;
    let mut d: Vec<(usize, Duration)> = Vec::new();
    let mut e: Vec<(usize, Duration)> = Vec::new();
    let mut agent: Vec<(usize, u64)> = Vec::new();
    let (mut dw, mut ew) = (Duration::ZERO, Duration::ZERO);
    let mut first = 0;
    let mut round = 0;
    while first < jobs {
        let count = block.min(jobs - first);
        // A-B, then B-A: drift in background load falls on both alike.
        for direct_turn in if round % 2 == 0 { [true, false] } else { [false, true] } {
            if direct_turn {
                let b = direct.run(first, count, clients).await?;
                dw += b.wall;
                d.extend(b.latencies);
            } else {
                let b = through.run(first, count, clients).await?;
                ew += b.wall;
                e.extend(b.latencies);
                agent.extend(b.agent_ms);
            }
        }
        first += count;
        round += 1;
        eprint!("\r  {label}: {first}/{jobs} jobs ");
    }
    eprintln!();
    d.sort_by_key(|(i, _)| *i);
    e.sort_by_key(|(i, _)| *i);
    agent.sort_by_key(|(i, _)| *i);
    let outside_agent = e.iter().zip(&agent).map(|((_, lat), (_, a))| lat.saturating_sub(Duration::from_millis(*a))).collect();
    Ok(Paired {
        direct: d.into_iter().map(|(_, l)| l).collect(),
        edge: e.into_iter().map(|(_, l)| l).collect(),
        agent_ms: agent.into_iter().map(|(_, a)| a).collect(),
        outside_agent,
        direct_wall: dw,
        edge_wall: ew,
    })
}

fn paired_json(p: &Paired, clients: usize) -> Value {
    let direct = dist(&p.direct);
    let edge = dist(&p.edge);
    let agent: Vec<Duration> = p.agent_ms.iter().map(|a| Duration::from_millis(*a)).collect();
    let mut v = json!({
        "clients": clients,
        "direct": direct,
        "edge": edge,
        "overhead_p50_ms": round3(ms(&edge["p50_ms"]) - ms(&direct["p50_ms"])),
        "overhead_p99_ms": round3(ms(&edge["p99_ms"]) - ms(&direct["p99_ms"])),
        "direct_drift": drift(&p.direct),
        "edge_drift": drift(&p.edge),
        "agent_reported_duration": dist(&agent),
        "outside_agent_job": dist(&p.outside_agent),
    });
    if clients > 1 {
        v["direct_jobs_per_s"] = json!(round3(p.direct.len() as f64 / p.direct_wall.as_secs_f64()));
        v["edge_jobs_per_s"] = json!(round3(p.edge.len() as f64 / p.edge_wall.as_secs_f64()));
    }
    v
}

fn edge_name(kind: EdgeKind) -> &'static str {
    match kind {
        EdgeKind::Native => "native",
        EdgeKind::Worker => "worker",
    }
}

fn edge_settings() -> Vec<(&'static str, &'static str)> {
    // The documented defaults (README "Configuration"), not the harness's fast test heartbeats.
    vec![("HEARTBEAT_INTERVAL_MS", "15000"), ("LOST_AFTER_MS", "120000")]
}

/// Starts an edge and times its start to the first answer of `/health`.
async fn start_edge(kind: EdgeKind, keys: &Keys) -> (EdgeServer, Duration) {
    let started = Instant::now();
    let edge = tokio::task::block_in_place(|| EdgeServer::start(kind, keys, &edge_settings()));
    let http = http_client();
    let url = format!("{}/health", edge.url());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http.get(&url).send().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the {} edge never answered /health; log:\n{}", edge_name(kind), edge.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (edge, started.elapsed())
}

async fn bench_edge(kind: EdgeKind, opts: &Opts, direct: &Arc<Direct>) -> anyhow::Result<Value> {
    let name = edge_name(kind);
    let tree = kind == EdgeKind::Worker;
    eprintln!("[{name}] starting the edge and one agent (MAX_CONCURRENT_JOBS={AGENT_SLOTS})");
    let keys = Keys::new(&["spark"]);
    let (edge, startup) = start_edge(kind, &keys).await;
    let edge_pid = edge.pid().expect("the edge runs");
    let agent_slots = AGENT_SLOTS.to_string();
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark").env("MAX_CONCURRENT_JOBS", &agent_slots));
    let agent_pid = agent.pid().expect("the agent runs");
    let client = harness::Client::new(&edge.url());
    let connect_started = Instant::now();
    client.wait_online().await;
    let connect = connect_started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = json!({ "agent": memory(agent_pid, true), "edge": memory(edge_pid, tree) });
    eprintln!("[{name}] idle memory: {idle}");

    let url = format!("{}/execute", edge.url());
    let through = Arc::new(Through { url, clients: (0..opts.clients.max(1)).map(|_| http_client()).collect() });
    let (edge_cpu0, agent_cpu0, self_cpu0) = (cpu_of_tree(edge_pid), cpu_of_tree(agent_pid), self_cpu());
    let seq = paired(direct, &through, opts.jobs, 1, opts.block, &format!("[{name}] sequential")).await?;
    let par = paired(direct, &through, opts.jobs, opts.clients, opts.block * 2, &format!("[{name}] {} clients", opts.clients)).await?;
    let (edge_cpu1, agent_cpu1, self_cpu1) = (cpu_of_tree(edge_pid), cpu_of_tree(agent_pid), self_cpu());
    let edge_jobs = (seq.edge.len() + par.edge.len() + WARMUP + WARMUP.max(opts.clients)) as f64;
    let per_job = |s: f64| round3(s * 1000.0 / edge_jobs);
    let cpu = json!({
        "edge_ms_per_job": per_job(edge_cpu1.own - edge_cpu0.own),
        "agent_ms_per_job": per_job(agent_cpu1.own - agent_cpu0.own),
        "standin_ms_per_job_via_agent": per_job(agent_cpu1.children - agent_cpu0.children),
        "note": "edge and agent CPU over the edge runs only; the agent's includes its launcher, which reaps the stand-ins and their wardens (theirs is the stand-in figure). 10 ms clock ticks, averaged.",
        "bench_process_s_total": round3(self_cpu1 - self_cpu0),
    });
    let just_after = json!({ "agent": memory(agent_pid, true), "edge": memory(edge_pid, tree) });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = json!({ "agent": memory(agent_pid, true), "edge": memory(edge_pid, tree) });
    eprintln!("[{name}] memory after the runs: {after}");
    let agent_log_lines = agent.log().lines().count();
    drop(agent);
    drop(edge);

    eprintln!("[{name}] offline: an edge with no agent, {} requests", opts.offline);
    let offline = offline(kind, opts.offline).await?;

    Ok(json!({
        "edge": name,
        "startup_to_first_health_ms": round3(startup.as_secs_f64() * 1000.0),
        "agent_connect_to_online_ms": round3(connect.as_secs_f64() * 1000.0),
        "sequential": paired_json(&seq, 1),
        "concurrent": paired_json(&par, opts.clients),
        "offline_503": offline,
        "memory": { "idle": idle, "after_runs": just_after, "after_runs_idle_2s": after },
        "cpu": cpu,
        "agent_log_lines": agent_log_lines,
    }))
}

async fn offline(kind: EdgeKind, requests: usize) -> anyhow::Result<Value> {
    let keys = Keys::new(&["spark"]);
    let (edge, _) = start_edge(kind, &keys).await;
    let http = http_client();
    let url = format!("{}/execute", edge.url());
    let mut samples = Vec::with_capacity(requests);
    for i in 0..requests + WARMUP {
        let body = json!({ "prompt": prompt(i) }).to_string();
        let started = Instant::now();
        let resp = http.post(&url).header("X-Runner-Secret", SECRET).header("content-type", "application/json").body(body).send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let took = started.elapsed();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        anyhow::ensure!(
            status == 503 && v["error_code"] == "RUNNER_OFFLINE" && v["fallback"] == true,
            "offline edge answered {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        if i >= WARMUP {
            samples.push(took);
        }
    }
    Ok(dist(&samples))
}

async fn run(opts: Opts) -> Value {
    let load_start = loadavg();
    let started = Instant::now();
    let direct = Arc::new(Direct::new());
    let mut edges = serde_json::Map::new();
    for kind in &opts.edges {
        match bench_edge(*kind, &opts, &direct).await {
            Ok(v) => {
                edges.insert(edge_name(*kind).into(), v);
            }
            Err(e) => {
                eprintln!("bench: the {} edge run failed: {e:#}", edge_name(*kind));
                edges.insert(edge_name(*kind).into(), json!({ "error": format!("{e:#}") }));
            }
        }
    }
    json!({
        "command": "cargo run --release -p claude-runner-tests --bin bench -- ".to_string() + &std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        "git_commit": git_commit(),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": loadavg(),
        "wall_s": round3(started.elapsed().as_secs_f64()),
        "config": {
            "jobs": opts.jobs, "clients": opts.clients, "offline_requests": opts.offline,
            "block": opts.block, "warmup": WARMUP, "agent_max_concurrent_jobs": AGENT_SLOTS,
            "heartbeat_interval_ms": 15000,
        },
        "targets": {
            "overhead_p50_ms": AIM_OVERHEAD_P50_MS, "overhead_p99_ms": AIM_OVERHEAD_P99_MS,
            "jobs_per_s": AIM_THROUGHPUT, "offline_503_ms": AIM_OFFLINE_MS,
            "agent_idle_pss_mib": AIM_AGENT_PSS_MIB, "native_edge_idle_rss_mib": AIM_EDGE_RSS_MIB,
        },
        "typescript_original": {
            "overhead_p50_ms": TS_OVERHEAD_P50_MS, "overhead_p99_ms": TS_OVERHEAD_P99_MS,
            "jobs_per_s": TS_THROUGHPUT, "idle_rss_mib": TS_RSS_MIB,
        },
        "edges": edges,
    })
}

// ------------------------------------------------------------------------------ printing

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn print_report(r: &Value, opts: &Opts) {
    let m = &r["machine"];
    println!();
    println!("Claude Runner benchmark  (commit {})", r["git_commit"].as_str().unwrap_or("?"));
    println!(
        "machine: {} CPUs ({}), {}, kernel {}; load average {} at start, {} at end; {:.0} s",
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["os"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        r["load_average_start"].as_str().unwrap_or("?"),
        r["load_average_end"].as_str().unwrap_or("?"),
        ms(&r["wall_s"]),
    );
    println!(
        "{} jobs per run after {} warm-up; direct and edge runs interleaved in blocks; agent MAX_CONCURRENT_JOBS={}",
        opts.jobs, WARMUP, AGENT_SLOTS
    );
    for (name, e) in r["edges"].as_object().into_iter().flatten() {
        println!();
        if let Some(err) = e["error"].as_str() {
            println!("== {name} edge: FAILED: {err}");
            continue;
        }
        println!("== {name} edge (edge start to first /health: {:.1} ms)", ms(&e["startup_to_first_health_ms"]));
        println!();
        println!("  latency (ms)                           p50      p90      p99      max     jobs/s");
        let row = |label: &str, d: &Value, rate: Option<&Value>| {
            println!(
                "  {label:<34} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10}",
                ms(&d["p50_ms"]),
                ms(&d["p90_ms"]),
                ms(&d["p99_ms"]),
                ms(&d["max_ms"]),
                rate.and_then(Value::as_f64).map(|x| format!("{x:.0}")).unwrap_or_default()
            );
        };
        let s = &e["sequential"];
        let c = &e["concurrent"];
        row("direct spawn, sequential", &s["direct"], None);
        row(&format!("POST /execute via {name}, sequential"), &s["edge"], None);
        row(&format!("direct spawn, {} at once", opts.clients), &c["direct"], Some(&c["direct_jobs_per_s"]));
        row(&format!("POST /execute, {} clients", opts.clients), &c["edge"], Some(&c["edge_jobs_per_s"]));
        row("offline 503 (no agent)", &e["offline_503"], None);
        println!();
        println!("  overhead over direct (ms)              p50      p99");
        println!("  {:<34} {:>8.2} {:>8.2}", "sequential", ms(&s["overhead_p50_ms"]), ms(&s["overhead_p99_ms"]));
        println!("  {:<34} {:>8.2} {:>8.2}", format!("{} clients", opts.clients), ms(&c["overhead_p50_ms"]), ms(&c["overhead_p99_ms"]));
        println!();
        println!(
            "  drift (p50 of first / last tenth of the run, ms): direct seq {:.2} / {:.2}, edge seq {:.2} / {:.2}, edge {}x {:.2} / {:.2}",
            ms(&s["direct_drift"]["first_tenth_p50_ms"]),
            ms(&s["direct_drift"]["last_tenth_p50_ms"]),
            ms(&s["edge_drift"]["first_tenth_p50_ms"]),
            ms(&s["edge_drift"]["last_tenth_p50_ms"]),
            opts.clients,
            ms(&c["edge_drift"]["first_tenth_p50_ms"]),
            ms(&c["edge_drift"]["last_tenth_p50_ms"]),
        );
        println!(
            "  breakdown, sequential: agent-reported job duration p50 {:.0} ms; time outside the agent's job p50 {:.2} / p99 {:.2} ms",
            ms(&s["agent_reported_duration"]["p50_ms"]),
            ms(&s["outside_agent_job"]["p50_ms"]),
            ms(&s["outside_agent_job"]["p99_ms"]),
        );
        let cpu = &e["cpu"];
        println!(
            "  CPU per job: edge {:.2} ms, agent {:.2} ms, stand-in {:.2} ms",
            ms(&cpu["edge_ms_per_job"]),
            ms(&cpu["agent_ms_per_job"]),
            ms(&cpu["standin_ms_per_job_via_agent"]),
        );
        println!();
        let mem = &e["memory"];
        println!("  memory (MiB)                  idle RSS   idle PSS   after runs RSS   after runs PSS   peak RSS");
        let pss = |m: &Value| m["pss_mib"].as_f64().map(|p| format!("{p:.1}")).unwrap_or_else(|| "-".into());
        for who in ["agent", "edge"] {
            println!(
                "  {:<28} {:>9.1} {:>10} {:>16.1} {:>16} {:>10.1}",
                if who == "edge" { format!("{name} edge") } else { "agent + zygote + launcher".into() },
                ms(&mem["idle"][who]["rss_mib"]),
                pss(&mem["idle"][who]),
                ms(&mem["after_runs_idle_2s"][who]["rss_mib"]),
                pss(&mem["after_runs_idle_2s"][who]),
                ms(&mem["after_runs_idle_2s"][who]["peak_rss_mib"]),
            );
        }
        for p in mem["idle"]["agent"]["each"].as_array().into_iter().flatten() {
            let command = p["command"].as_str().unwrap_or("");
            let role = if command.contains("__launcher") {
                "launcher"
            } else if command.contains("__zygote") {
                "zygote"
            } else {
                "agent"
            };
            println!(
                "    idle {role:<9} RSS {:.1} (anon {:.1}, file {:.1}), PSS {}, {} threads",
                ms(&p["rss_mib"]),
                ms(&p["rss_anon_mib"]),
                ms(&p["rss_file_mib"]),
                pss(p),
                p["threads"],
            );
        }
        println!("  (RSS summed counts the pages the agent, its zygote and its launcher share once each; PSS splits them)");
        println!();
        println!("  against the aims (TypeScript original in brackets)");
        let line = |what: &str, got: f64, unit: &str, aim: &str, ts: &str, ok: bool| {
            println!("  {what:<34} {got:>9.2} {unit:<6} aim {aim:<9} (TS {ts:<8}) {}", verdict(ok));
        };
        let (o50, o99) = (ms(&s["overhead_p50_ms"]), ms(&s["overhead_p99_ms"]));
        line("overhead p50, sequential", o50, "ms", "< 3", "3.5", o50 < AIM_OVERHEAD_P50_MS);
        line("overhead p99, sequential", o99, "ms", "< 8", "8.3", o99 < AIM_OVERHEAD_P99_MS);
        let rate = ms(&c["edge_jobs_per_s"]);
        line(&format!("throughput, {} clients", opts.clients), rate, "jobs/s", "> 400", "~385", rate > AIM_THROUGHPUT);
        let off = ms(&e["offline_503"]["p99_ms"]);
        line("offline 503 p99", off, "ms", "< 10", "-", off < AIM_OFFLINE_MS);
        // The aim is what the agent costs the machine: its processes' PSS (RSS would count
        // the binary's pages once per process that maps them).
        let (a, figure) = agent_memory_figure(&mem["idle"]["agent"]);
        line(&format!("agent idle {figure} (+ launcher)"), a, "MiB", "< 20", "~60", a < AIM_AGENT_PSS_MIB);
        if figure == "RSS" {
            println!("  (smaps_rollup unreadable: the agent's aim is judged on summed RSS, which counts shared pages twice)");
        }
        let ed = ms(&mem["idle"]["edge"]["rss_mib"]);
        if name == "native" {
            line("native edge idle RSS", ed, "MiB", "< 30", "~60", ed < AIM_EDGE_RSS_MIB);
        } else {
            println!("  {:<34} {ed:>9.2} MiB    (node + workerd; no aim)", format!("{name} edge idle RSS"));
        }
    }
}
