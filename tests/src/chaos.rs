//! The chaos soak: jobs from several callers through an edge and two agents while the
//! harness breaks things at random — a [`Proxy`] between the agents and the edge
//! black-holes either direction (true half-open links) or resets the links; agents are
//! SIGKILLed or SIGTERMed and started again; the edge is SIGKILLed or SIGTERMed and
//! started again on the same storage. Then everything heals, and the soak checks what the
//! issue promises:
//!
//! - every accepted job id reached exactly one terminal state, and it is readable (what
//!   callers were told along the way agrees with it);
//! - the stand-in's logs show each job started at most once;
//! - no job whose caller was told `fallback: true` started after that answer, or ran on
//!   to its end after it;
//! - no job the stand-in ran to its end was given up by the edge as lost (its agent did
//!   not bring the result back within `LOST_AFTER_MS`);
//! - a probe job succeeds after the chaos.
//!
//! The edge keeps as few ended jobs as its settings allow (`MAX_RETAINED_JOBS=1`,
//! `MAX_RETAINED_BYTES` at its 1 MiB floor), so nearly every job is forgotten early, and the
//! checks hold for those too: a job whose `GET /jobs/{id}` answers 404 must be one the edge's
//! log says it forgot after it ended (a 404 it never said it forgot, or a forget before the
//! job's end, is a loss), its end taken from the edge's "job finished" line; an `/execute`
//! caller still heard that end, and a `POST /jobs` job's `callback_url` (the soak's own
//! receiver on 127.0.0.1, which answers one post in ten with a 503, so retries happen) got
//! it, in the state the job ended in.
//!
//! Usage windows: a phase makes both agents' Claude report its usage window used up
//! (`@rate_limited=S`, one job pinned to each agent while the callers hold off), then sends
//! jobs that the edge must hold until the reset, and breaks something (an agent or, on the
//! native edge, the edge killed or stopped) while they wait. The held jobs face the same
//! checks as every other (one end, started at most once), and none may start before the
//! windows' reset; the report counts the holds, the
//! held jobs, `/execute` calls told `USAGE_LIMIT`, and the `usage_rejected` / `usage_reset`
//! alerts the soak's receiver got (alerts are told at most once: a crash between storing an
//! alert's memory and posting it loses that post, so they are counted, not checked).
//!
//! Every job carries its own idempotency key, so a request cut by an edge crash is sent
//! again — by its caller while the chaos lasts, and once more after the heal if it still
//! went unheard (the same key names the same job, or makes it if it never existed).
//! `src/bin/soak.rs` runs it from the command line; `tests/tests/chaos.rs` runs a short
//! form in CI.
//!
//! Against the Worker (under Miniflare) the faults are the agents' and the links' (a
//! half-open link takes two 15 s heartbeats to notice there, too slow for a soak), plus
//! quiet spells of 12 s: workerd evicts the idle Durable Object while the agents' sockets
//! stay open, so the next event rebuilds the edge from storage and socket attachments —
//! counted from the Worker's log as "DO rebuilt, agents connected".

use crate::proxy::{Direction, Proxy};
use crate::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub kind: EdgeKind,
    pub jobs: usize,
    pub callers: usize,
    /// Stop submitting after this long (the checks still run).
    pub max: Duration,
    pub seed: u64,
    pub faults: bool,
    /// Usage-window phases among the faults (until [`MIN_USAGE_HOLDS`] held).
    pub usage: bool,
}

/// Faults a soak injects at least (while its time lasts).
pub const MIN_FAULTS: u64 = 3;

/// Usage holds a soak goes through at least (while its time lasts): phases are tried until
/// one held the work, at most [`MAX_FORCED_USAGE_PHASES`] of them (a phase whose agent was
/// away holds nothing on that agent).
pub const MIN_USAGE_HOLDS: u64 = 1;
const MAX_FORCED_USAGE_PHASES: u64 = 3;

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions { kind: EdgeKind::Native, jobs: 1000, callers: 6, max: Duration::from_secs(600), seed: 1, faults: true, usage: true }
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub edge: String,
    pub jobs_submitted: usize,
    pub jobs_accepted: usize,
    pub faults: BTreeMap<String, u64>,
    pub final_states: BTreeMap<String, u64>,
    pub lost: u64,
    pub doubled: u64,
    pub fallback_answers: u64,
    pub ran_after_fallback: u64,
    /// Lost jobs the edge gave up on itself (`record::lost`: their agent away past
    /// `LOST_AFTER_MS`), not ones an agent reported lost on starting again. One of them the
    /// stand-in ran to its end is a success reported lost (8266150's defect): a problem.
    pub given_up_by_edge: u64,
    /// Requests sent again with their key (their first answer lost) that were told their
    /// job had run and been forgotten (410 `JOB_FORGOTTEN`) rather than running it again.
    pub repeats_told_forgotten: u64,
    /// Jobs no caller heard an answer for during the chaos, sent again (same key) after
    /// it: these went through less of the chaos than the rest.
    pub sent_again_after_chaos: u64,
    /// Accepted jobs the edge no longer knew at the end (404): each one its log says it
    /// forgot after it ended (`MAX_RETAINED_JOBS` / `MAX_RETAINED_BYTES`), its end read
    /// from its "job finished" line.
    pub forgotten: u64,
    /// Jobs sent with a `callback_url` (every `POST /jobs` job), and those the receiver
    /// got at least one post for.
    pub callbacks_expected: u64,
    pub callbacks_delivered: u64,
    /// Jobs whose result was posted more than once (the edge killed after a post went and
    /// before it stored that it was taken posts it again: receivers dedupe by
    /// `X-Runner-Job-Id`). Counted, not a problem.
    pub callbacks_repeated: u64,
    /// Usage-window phases, and those in which the edge then held all work (`/health`:
    /// no agent takes work, usage `rejected`).
    pub usage_phases: u64,
    pub usage_holds: u64,
    /// Jobs sent while all work was held, and how they ended.
    pub held_jobs: u64,
    pub held_final_states: BTreeMap<String, u64>,
    /// Held jobs the stand-in started before the earliest reset their phase's Claude
    /// named: each a problem (41f6b8b's defect: an agent restarted twice within a
    /// heartbeat interval forgot its window, and the edge let the held jobs go).
    pub held_started_early: u64,
    /// Each phase's wait for idle agents, and its whole time until the held jobs were
    /// sent (ms): the callers hold off that long.
    pub usage_phase_ms: Vec<(u64, u64)>,
    /// `/execute` calls told `USAGE_LIMIT` with `fallback: true`.
    pub usage_limit_fallbacks: u64,
    /// Alerts the soak's `NOTIFY_URL` receiver got, by kind.
    pub alerts: BTreeMap<String, u64>,
    /// Until the chaos ended (the callers done, the faults over), until every job's end
    /// was read, until the callbacks were in; `seconds` is the whole run.
    pub chaos_seconds: f64,
    pub ends_read_seconds: f64,
    pub callbacks_seconds: f64,
    pub seconds: f64,
    pub problems: Vec<String>,
    /// Where the edge's, the agents' and the stand-in's logs of a run with problems were
    /// kept (see [`keep_logs`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_logs: Option<String>,
}

/// A small xorshift generator: the soak's randomness, from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What one job's caller saw.
#[derive(Debug, Clone, Default)]
struct Seen {
    job_id: Option<String>,
    /// Terminal states callers were told (by an /execute answer or a poll).
    told: Vec<String>,
    /// When a caller was told `fallback: true` (ms since the epoch).
    fallback_at: Option<u64>,
    /// The request's outcome is unknown (the connection broke).
    unknown: bool,
    /// The task as sent.
    body: Value,
    /// Sent while the edge held all work for the agents' usage windows.
    held: bool,
    /// When its usage phase's windows reset at the earliest, by the stand-in's clock
    /// (ms since the epoch): a held job started before it started early.
    held_until: u64,
    /// Told `USAGE_LIMIT` with `fallback: true`.
    usage_limited: bool,
    /// A repeat of its request was told its job ran and was forgotten (`JOB_FORGOTTEN`).
    told_forgotten: bool,
    /// Told (an answer, a poll, its callback) it ended lost by the edge's own word: its
    /// agent did not come back within `LOST_AFTER_MS` (`record::lost`).
    given_up: bool,
}

impl Seen {
    /// Notes what the answer `body` to its request told its caller (at `at`, ms since the
    /// epoch): an `/execute` answer (`wait`) tells the job's end, a `POST /jobs` one only
    /// when it is a repeat told its job ran and was forgotten.
    fn heard(&mut self, body: &Value, wait: bool, at: u64) {
        self.job_id = self.job_id.clone().or(body["job_id"].as_str().map(str::to_string));
        if body["fallback"] == true {
            self.fallback_at = Some(at);
        }
        let forgotten = body["error_code"] == "JOB_FORGOTTEN";
        if wait || forgotten {
            self.told.extend(state_of_answer(body));
            self.given_up |= given_up_by_edge(body);
        }
        self.told_forgotten |= forgotten;
        self.usage_limited |= body["fallback"] == true && body["error_code"] == "USAGE_LIMIT";
        // Told to follow its job elsewhere: the soak does, at the end.
        self.unknown |= body["error_code"] == "EDGE_RESTARTING";
    }
}

/// Whether a job's view or answer says the edge gave it up as lost itself.
fn given_up_by_edge(body: &Value) -> bool {
    let error = body["result"]["error"].as_str().or(body["error"].as_str());
    body.get("job_id").is_some() && error.is_some_and(|e| e.contains("did not come back in time"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn state_of_answer(body: &Value) -> Option<String> {
    if body["success"] == true {
        return Some("succeeded".into());
    }
    // A repeat of a key whose job ran and was forgotten: told how it ended.
    if body["error_code"] == "JOB_FORGOTTEN" {
        body["job_id"].as_str()?;
        return body["state"].as_str().map(str::to_string);
    }
    let state = match body["error_code"].as_str()? {
        "TIMEOUT" => "timed_out",
        "CANCELLED" => "cancelled",
        "RUNNER_LOST" => "lost",
        "EDGE_RESTARTING" | "INTERNAL_ERROR" | "RUNNER_BUSY" | "INVALID_REQUEST" | "CONFLICT" => return None,
        _ => "failed",
    };
    // A refusal before any job existed names no job.
    body["job_id"].as_str()?;
    Some(state.into())
}

/// How long a caller sends a request again before leaving the job to the heal: longer
/// than an edge restart takes on a loaded machine.
const UNHEARD_FOR: Duration = Duration::from_secs(30);

const TERMINAL: [&str; 5] = ["succeeded", "failed", "timed_out", "cancelled", "lost"];

/// The numbers of the jobs a usage phase sends (its rate-limited ones and the held ones),
/// above any caller's, in the same `soak-N` naming so every check applies to them.
const PHASE_JOBS_FROM: usize = 1_000_000;

struct World {
    client: Client,
    seen: Mutex<HashMap<usize, Seen>>,
    next: AtomicUsize,
    /// The next usage phase's job number.
    phase_next: AtomicUsize,
    stop: AtomicBool,
    /// Callers hold off (a quiet spell).
    quiet: AtomicBool,
    /// Callers hold off (a usage phase letting the agents go idle).
    held_off: AtomicBool,
    /// Where `POST /jobs` jobs have their results posted (the soak's receiver).
    callback_url: String,
    /// Each usage phase's time until the agents were idle, and in all (ms).
    phase_ms: Mutex<Vec<(u64, u64)>>,
}

impl World {
    fn note(&self, i: usize, f: impl FnOnce(&mut Seen)) {
        f(self.seen.lock().unwrap().entry(i).or_default());
    }

    /// A soak job's task: a detached one asks for a callback, so its end reaches its
    /// caller even once the edge has forgotten the job (MAX_RETAINED_JOBS).
    fn body(&self, i: usize, prompt: &str, detached: bool) -> Value {
        let mut body = json!({"prompt": format!("{prompt} soak-{i}"), "timeout_ms": 30000, "idempotency_key": format!("soak-{i}")});
        if detached {
            body["callback_url"] = json!(format!("{}/soak-{i}", self.callback_url));
        }
        body
    }

    /// Reads a job until it is terminal (the edge may be down for a while meanwhile), or
    /// until the edge says it no longer knows it: ended and forgotten under its caps (the
    /// checks at the end make sure that is what a 404 meant), its end gone to its callback.
    async fn follow(&self, i: usize, job_id: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(a) = self.client.try_send("GET", &format!("/jobs/{job_id}"), Some(SECRET), None).await {
                if a.status == 404 {
                    return;
                }
                if let Some(state) = a.body["state"].as_str().filter(|s| TERMINAL.contains(s)) {
                    let state = state.to_string();
                    self.note(i, |s| {
                        s.told.push(state);
                        s.given_up |= given_up_by_edge(&a.body);
                    });
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a job's request again, with its key, while it goes unheard (the edge down
    /// or restarting, the request cut), as a caller with a key does. Moving on at once
    /// would spend the job list in the instant the edge is down — a run saw 701 of 1,000
    /// jobs go that way — and leave those jobs to the heal, after the chaos.
    async fn send_until_heard(&self, path: &str, body: &Value) -> Option<Answer> {
        let deadline = Instant::now() + UNHEARD_FOR;
        loop {
            match self.client.try_send("POST", path, Some(SECRET), Some(body.to_string().into_bytes())).await {
                Ok(a) => return Some(a),
                Err(_) if Instant::now() < deadline && !self.stop.load(Ordering::SeqCst) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => return None,
            }
        }
    }

    /// Sends job `i` (`/execute` when `wait`, else `POST /jobs` and follows it) and notes
    /// what its caller was told.
    async fn run_job(&self, i: usize, body: Value, wait: bool) {
        self.note(i, |s| s.body = body.clone());
        let path = if wait { "/execute" } else { "/jobs" };
        match self.send_until_heard(path, &body).await {
            None => self.note(i, |s| s.unknown = true),
            Some(a) => {
                let job_id = a.body["job_id"].as_str().map(str::to_string);
                let at = now_ms();
                self.note(i, |s| s.heard(&a.body, wait, at));
                if let (false, Some(id)) = (wait, job_id) {
                    self.follow(i, &id, Duration::from_secs(60)).await;
                }
            }
        }
    }

    async fn caller(self: Arc<Self>, jobs: usize, seed: u64) {
        let mut rng = Rng(seed | 1);
        loop {
            while self.quiet.load(Ordering::SeqCst) || self.held_off.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let i = self.next.fetch_add(1, Ordering::SeqCst);
            if i >= jobs || self.stop.load(Ordering::SeqCst) {
                return;
            }
            let wait = rng.below(2) == 0;
            let body = self.body(i, &format!("@sleep={}", 20 + rng.below(300)), !wait);
            self.run_job(i, body, wait).await;
        }
    }

    /// A usage phase: the callers hold off until the agents are idle (a job that succeeds
    /// on an agent after its window was used up reopens it there), one job pinned to each
    /// agent ends as Claude does on a used-up window (resetting in `secs`), and if the edge
    /// then holds all work, `held` jobs are sent to wait for the reset — followed by tasks
    /// returned here, so the chaos goes on while they wait. Returns whether work was held.
    async fn usage_phase(self: &Arc<Self>, secs: u64, held: usize, followers: &mut Vec<tokio::task::JoinHandle<()>>) -> bool {
        let begun = Instant::now();
        self.held_off.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(h) = self.client.try_send("GET", "/health", Some(SECRET), None).await {
                let agents = h.body["agents"].as_array().cloned().unwrap_or_default();
                let connected = agents.iter().filter(|a| a["connected"] == true).count();
                let running: u64 = agents.iter().map(|a| a["running_jobs"].as_u64().unwrap_or(0)).sum();
                if connected == 2 && running == 0 && h.body["queued_jobs"] == 0 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let limited: Vec<(usize, Value)> = ["a1", "a2"]
            .into_iter()
            .map(|agent| {
                let i = self.phase_next.fetch_add(1, Ordering::SeqCst);
                let mut body = self.body(i, &format!("@rate_limited={secs}"), true);
                body["agent_id"] = json!(agent);
                (i, body)
            })
            .collect();
        let idle_after = begun.elapsed();
        let started = now_ms();
        let runs = limited.into_iter().map(|(i, body)| async move { self.run_job(i, body, false).await });
        futures_util::future::join_all(runs).await;
        let h = self.client.try_send("GET", "/health", Some(SECRET), None).await;
        // Both agents there and neither taking work: one away would take the held jobs as
        // it comes back, its window never used up.
        let all_held = h.is_ok_and(|h| {
            let connected = h.body["agents"].as_array().map_or(0, |a| a.iter().filter(|a| a["connected"] == true).count());
            connected == 2 && h.body["agents_taking_work"] == 0 && h.body["usage"]["status"] == "rejected"
        });
        if all_held {
            // The stand-in names a reset `secs` after the second it printed in, which is
            // after `started`: no window reset before this.
            let until = started / 1000 * 1000 + secs * 1000;
            for _ in 0..held {
                let i = self.phase_next.fetch_add(1, Ordering::SeqCst);
                let body = self.body(i, "@sleep=50", true);
                self.note(i, |s| {
                    s.held = true;
                    s.held_until = until;
                });
                let world = self.clone();
                followers.push(tokio::spawn(async move { world.run_job(i, body, false).await }));
            }
        }
        self.held_off.store(false, Ordering::SeqCst);
        self.phase_ms.lock().unwrap().push((idle_after.as_millis() as u64, begun.elapsed().as_millis() as u64));
        all_held
    }
}

/// What the soak breaks: the links' proxy, the agents and the edge.
struct Rig {
    proxy: Proxy,
    agents: Vec<Arc<Mutex<AgentProc>>>,
    edge: Arc<Mutex<EdgeServer>>,
}

impl Rig {
    /// Injects fault `fault` (see the loop in [`soak`]): its name, and how long to wait
    /// after it (ms).
    async fn inject(&self, world: &World, rng: &mut Rng, fault: u64) -> (&'static str, u64) {
        match fault {
            7 => {
                world.quiet.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(12)).await;
                world.quiet.store(false, Ordering::SeqCst);
                ("quiet spell (12 s)", 0)
            }
            0 => {
                self.proxy.blackhole(Direction::Up);
                ("blackhole agent->edge", 0)
            }
            1 => {
                self.proxy.blackhole(Direction::Down);
                ("blackhole edge->agent", 0)
            }
            2 => {
                self.proxy.reset();
                ("reset links", 0)
            }
            3 | 4 => {
                let agent = self.agents[rng.below(2) as usize].clone();
                let kill = rng.below(2) == 0;
                let pause = 100 + rng.below(700);
                tokio::task::spawn_blocking(move || {
                    let mut a = agent.lock().unwrap();
                    if kill {
                        a.kill();
                    } else {
                        a.stop();
                    }
                    std::thread::sleep(Duration::from_millis(pause));
                    a.restart();
                })
                .await
                .unwrap();
                (if kill { "SIGKILL agent" } else { "SIGTERM agent" }, 0)
            }
            k => {
                let edge = self.edge.clone();
                let kill = k == 5;
                tokio::task::spawn_blocking(move || {
                    let mut e = edge.lock().unwrap();
                    if kill {
                        e.kill();
                    } else {
                        e.stop();
                    }
                    e.restart();
                })
                .await
                .unwrap();
                (if kill { "SIGKILL edge" } else { "SIGTERM edge" }, 500)
            }
        }
    }
}

/// What the edge's log says of its jobs' ends and forgetting, by job id: the lines of
/// each job's "job finished" (and the state each names) and of its "forgotten early".
/// Reads the native edge's JSON lines and the Worker's `LEVEL message key=value` ones.
/// A line is written as the edge decides, before it stores the decision: an edge killed
/// in between logged an end or a forget that never happened, and may log another later.
#[derive(Default)]
struct EdgeLog {
    finished: HashMap<String, Vec<(usize, String)>>,
    forgotten: HashMap<String, Vec<usize>>,
}

impl EdgeLog {
    fn read(log: &str) -> EdgeLog {
        let mut out = EdgeLog::default();
        for (n, line) in log.lines().enumerate() {
            let (message, field): (String, Box<dyn Fn(&str) -> Option<String>>) = match serde_json::from_str::<Value>(line) {
                Ok(v) => {
                    let fields = v["fields"].clone();
                    (fields["message"].as_str().unwrap_or("").to_string(), Box::new(move |k| fields[k].as_str().map(str::to_string)))
                }
                Err(_) => {
                    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
                    let message = if line.contains("INFO job finished ") {
                        "job finished"
                    } else if line.contains("INFO an ended job is forgotten early") {
                        "an ended job is forgotten early: over MAX_RETAINED_JOBS or MAX_RETAINED_BYTES"
                    } else {
                        ""
                    };
                    let find = move |k: &str| words.iter().find_map(|w| w.strip_prefix(&format!("{k}=")).map(|v| v.trim_matches('"').to_string()));
                    (message.to_string(), Box::new(find))
                }
            };
            let Some(id) = field("job_id") else { continue };
            if message == "job finished" {
                out.finished.entry(id).or_default().push((n, field("state").unwrap_or_default()));
            } else if message.starts_with("an ended job is forgotten early") {
                out.forgotten.entry(id).or_default().push(n);
            }
        }
        out
    }

    /// How a job the edge no longer knows went, by its log: `Ok` with the state of the
    /// last end logged before its last forget (the forget that held), or why that is a
    /// loss.
    fn forgotten_end(&self, id: &str) -> Result<String, &'static str> {
        let forgot = *self.forgotten.get(id).and_then(|f| f.last()).ok_or("yet its log never says it forgot it: a lost job")?;
        let ended = self.finished.get(id).and_then(|e| e.iter().rev().find(|(n, _)| *n < forgot));
        ended.map(|(_, state)| state.clone()).ok_or("and its log says it was forgotten before it ended: a queued or running job must never be")
    }
}

/// Runs the soak and checks it; `problems` in the report is empty when every promise held.
pub async fn soak(opts: SoakOptions) -> Report {
    let started = Instant::now();
    let keys = Keys::new(&["a1", "a2"]);
    let (heartbeat, lost) = match opts.kind {
        EdgeKind::Native => ("500", "10000"),
        EdgeKind::Worker => ("15000", "60000"),
    };
    // Results and alerts land here: callbacks under /soak-N, alerts under /alerts. One post
    // in ten is answered 503, as a receiver busy a moment: the edge posts it again later
    // (2 s, 4 s, …), by when the caps have long passed its job by.
    let mut statuses = Rng(opts.seed.wrapping_mul(0x9E37_79B9) | 1);
    let hook = Webhook::start((0..20_000).map(|_| if statuses.below(10) == 0 { 503 } else { 200 }).collect());
    let notify_url = hook.url("/alerts");
    let settings = [
        ("HEARTBEAT_INTERVAL_MS", heartbeat),
        ("LOST_AFTER_MS", lost),
        ("QUEUE_TTL_MS", "300000"),
        ("MAX_QUEUED_JOBS", "1000"),
        ("TIMEOUT_MARGIN_MS", "5000"),
        // As few ended jobs kept as the settings allow: almost every job is forgotten
        // early, most while the chaos goes on (see the module's comment).
        ("MAX_RETAINED_JOBS", "1"),
        ("MAX_RETAINED_BYTES", "1048576"),
        ("CALLBACK_HOSTS", "127.0.0.1"),
        ("NOTIFY_URL", notify_url.as_str()),
        // Every usage phase's alerts, not one an hour.
        ("NOTIFY_MIN_INTERVAL_MS", "0"),
    ];
    let edge = EdgeServer::start(opts.kind, &keys, &settings);
    let proxy = Proxy::start(edge.port).await;
    let mut agents = Vec::new();
    for id in ["a1", "a2"] {
        let mut o = AgentOpts::for_edge(&edge, id).env("MAX_CONCURRENT_JOBS", "2").env("DRAIN_TIMEOUT_MS", "2000");
        o.edge_ws = format!("ws://127.0.0.1:{}", proxy.port());
        agents.push(Arc::new(Mutex::new(AgentProc::start(o))));
    }
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let rig = Rig { proxy, agents, edge: Arc::new(Mutex::new(edge)) };
    let world = Arc::new(World {
        client: client.clone(),
        seen: Mutex::default(),
        next: AtomicUsize::new(0),
        phase_next: AtomicUsize::new(PHASE_JOBS_FROM),
        stop: AtomicBool::new(false),
        quiet: AtomicBool::new(false),
        held_off: AtomicBool::new(false),
        callback_url: hook.url(""),
        phase_ms: Mutex::default(),
    });

    let callers: Vec<_> =
        (0..opts.callers).map(|c| tokio::spawn(world.clone().caller(opts.jobs, opts.seed.wrapping_mul(31).wrapping_add(c as u64 + 7)))).collect();

    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut rng = Rng(opts.seed.wrapping_mul(2654435761) | 1);
    let (mut usage_phases, mut usage_holds) = (0u64, 0u64);
    let mut held_followers = Vec::new();
    let usage_due = |phases: u64, holds: u64| opts.usage && holds < MIN_USAGE_HOLDS && phases < MAX_FORCED_USAGE_PHASES;
    // Until the callers are done — and at least MIN_FAULTS in all (each turn adds one), so
    // a run whose callers finish during one slow fault (an edge restart on a loaded
    // machine) still puts its jobs through enough chaos to mean something; and at least
    // MIN_USAGE_HOLDS usage holds.
    while opts.faults && (callers.iter().any(|c| !c.is_finished()) || faults.values().sum::<u64>() < MIN_FAULTS || usage_due(usage_phases, usage_holds)) {
        if started.elapsed() > opts.max {
            world.stop.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        // The faults that break something while held jobs wait: agents, and the edge
        // where it is a process of its own.
        let breaks: &[u64] = match opts.kind {
            EdgeKind::Native => &[3, 4, 5, 6],
            EdgeKind::Worker => &[2, 3, 4],
        };
        let mut fault = match opts.kind {
            // Links (0-2), agents (3, 4), the edge (5, 6).
            EdgeKind::Native => rng.below(7),
            // Resets, agents, quiet spells (7).
            EdgeKind::Worker => [2, 3, 4, 7][rng.below(4) as usize],
        };
        // A usage phase (8): one fault in sixteen (a phase holds the callers a few seconds:
        // more would thin the other faults out); and from half the jobs taken (or none
        // left) until one held the work, while callers still send work.
        let half = world.next.load(Ordering::SeqCst) >= opts.jobs / 2;
        if opts.usage && (rng.below(16) == 0 || usage_due(usage_phases, usage_holds) && (half || callers.iter().all(|c| c.is_finished()))) {
            fault = 8;
        }
        let (name, pause) = if fault == 8 {
            usage_phases += 1;
            // Long enough for an edge's restart to fall inside the hold.
            let secs = 4 + rng.below(3);
            if world.usage_phase(secs, 3, &mut held_followers).await {
                usage_holds += 1;
                // Something breaks while the held jobs wait for the reset.
                let fault = breaks[rng.below(breaks.len() as u64) as usize];
                let (name, pause) = rig.inject(&world, &mut rng, fault).await;
                *faults.entry(format!("{name} (during a usage hold)")).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            ("usage window used up on both agents", 0)
        } else {
            rig.inject(&world, &mut rng, fault).await
        };
        *faults.entry(name.to_string()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for c in callers {
        let _ = c.await;
    }
    for f in held_followers {
        let _ = f.await;
    }
    let chaos_seconds = started.elapsed().as_secs_f64();
    let Rig { proxy, agents, edge } = rig;

    // Heal: agents up, links fresh, and every job whose fate a caller did not learn is
    // found again by its key.
    proxy.reset();
    for a in &agents {
        let a = a.clone();
        tokio::task::spawn_blocking(move || a.lock().unwrap().ensure_running()).await.unwrap();
    }
    // Both agents back on fresh links (the edge may still list a link it has not yet
    // noticed is gone: wait until it lists two again).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.health_full().await.body["agents"].as_array().map_or(0, Vec::len) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unknown: Vec<(usize, Value)> =
        world.seen.lock().unwrap().iter().filter(|(_, s)| s.unknown && s.job_id.is_none()).map(|(i, s)| (*i, s.body.clone())).collect();
    let sent_again_after_chaos = unknown.len() as u64;
    for (i, body) in unknown {
        // The same key and task: the job the cut request made, or a new one if it made none.
        let again = client.submit(body).await;
        world.note(i, |s| s.heard(&again.body, false, now_ms()));
    }

    let mut faults = faults;
    let rebuilt = edge.lock().unwrap().log().lines().filter(|l| l.contains("edge rebuilt") && !l.contains(", 0 agent connections")).count();
    if rebuilt > 0 {
        faults.insert("DO rebuilt, agents connected".into(), rebuilt as u64);
    }
    let mut report =
        Report { edge: format!("{:?}", opts.kind).to_lowercase(), faults, sent_again_after_chaos, usage_phases, usage_holds, ..Report::default() };
    let seen = world.seen.lock().unwrap().clone();
    report.jobs_submitted = seen.len();
    // Every job id any answer named, read to its end.
    let ids: Vec<(usize, String)> = seen.iter().filter_map(|(i, s)| s.job_id.clone().map(|id| (*i, id))).collect();
    report.jobs_accepted = ids.len();
    let mut finals: HashMap<usize, String> = HashMap::new();
    // The jobs ended lost by the edge's own word (`record::lost`), not an agent's.
    let mut given_up: Vec<(usize, String)> = Vec::new();
    // Read when the first job turns out forgotten (by then every job has ended), and again
    // for a job forgotten since.
    let mut edge_log: Option<EdgeLog> = None;
    for (i, id) in &ids {
        let deadline = Instant::now() + Duration::from_secs(90);
        let state = loop {
            let a = client.get(&format!("/jobs/{id}")).await;
            match a.body["state"].as_str() {
                Some(s) if TERMINAL.contains(&s) => {
                    if s == "lost" && a.body["result"]["error"].as_str().is_some_and(|e| e.contains("did not come back in time")) {
                        given_up.push((*i, id.clone()));
                    }
                    break Some(s.to_string());
                }
                // Unknown to the edge: ended and forgotten under its caps, if its log says
                // so — anything else is a job lost.
                _ if a.status == 404 => {
                    let log = edge_log.get_or_insert_with(|| EdgeLog::read(&edge.lock().unwrap().log()));
                    // A job whose callback was still to be posted is kept past the caps and
                    // forgotten once it is taken: perhaps after the log was read.
                    if log.forgotten_end(id).is_err() {
                        *log = EdgeLog::read(&edge.lock().unwrap().log());
                    }
                    match log.forgotten_end(id) {
                        Err(why) => {
                            report.problems.push(format!("job {id} (soak-{i}) is unknown to the edge (404), {why}"));
                            break None;
                        }
                        Ok(state) => {
                            report.forgotten += 1;
                            // Its `/execute` caller heard the end before the edge let it go
                            // (one whose request was cut sent it again, and was answered or
                            // left it to the heal; a `POST /jobs` one's callback is checked below).
                            let s = &seen[i];
                            if s.body.get("callback_url").is_none() && s.told.is_empty() && !s.unknown && s.fallback_at.is_none() {
                                report.problems.push(format!("job {id} (soak-{i}) ended {state} and was forgotten, and its /execute caller was never told its end"));
                            }
                            // Its view is gone: what its caller or callback was told.
                            if state == "lost" && (seen[i].given_up || hook.received().iter().any(|h| h.headers.get("x-runner-job-id") == Some(id) && h.body.contains("did not come back in time"))) {
                                given_up.push((*i, id.clone()));
                            }
                            break Some(state);
                        }
                    }
                }
                _ if Instant::now() > deadline => {
                    report.problems.push(format!("job {id} (soak-{i}) never reached a terminal state"));
                    break None;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if let Some(state) = state {
            for told in &seen[i].told {
                if *told != state {
                    report.problems.push(format!("job {id} (soak-{i}) was reported {told} but ended {state}"));
                }
            }
            *report.final_states.entry(state.clone()).or_default() += 1;
            if seen[i].held {
                *report.held_final_states.entry(state.clone()).or_default() += 1;
            }
            finals.insert(*i, state);
        }
    }
    report.lost = report.final_states.get("lost").copied().unwrap_or(0);
    report.chaos_seconds = chaos_seconds;
    report.ends_read_seconds = started.elapsed().as_secs_f64();
    report.held_jobs = seen.values().filter(|s| s.held).count() as u64;
    report.usage_phase_ms = world.phase_ms.lock().unwrap().clone();
    report.usage_limit_fallbacks = seen.values().filter(|s| s.usage_limited).count() as u64;
    report.repeats_told_forgotten = seen.values().filter(|s| s.told_forgotten).count() as u64;

    // Callbacks: every `POST /jobs` job that ended (forgotten or not) had its end posted,
    // in the state it ended in. A retry after a failed post waits 2 s, 4 s, …: up to a
    // minute for the last ones.
    let expected: Vec<(usize, String)> =
        ids.iter().filter(|(i, _)| seen[i].body.get("callback_url").is_some() && finals.contains_key(i)).cloned().collect();
    report.callbacks_expected = expected.len() as u64;
    let posted = |hook: &Webhook| -> HashMap<String, Vec<String>> {
        let mut by_job: HashMap<String, Vec<String>> = HashMap::new();
        // Taken: answered 2xx (a 503 is the edge's to post again).
        for h in hook.received().into_iter().filter(|h| h.path.starts_with("/soak-") && h.answered == 200) {
            let state = serde_json::from_str::<Value>(&h.body).ok().and_then(|v| v["state"].as_str().map(str::to_string)).unwrap_or_default();
            by_job.entry(h.headers.get("x-runner-job-id").cloned().unwrap_or_default()).or_default().push(state);
        }
        by_job
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && expected.iter().any(|(_, id)| !posted(&hook).contains_key(id)) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let posted = posted(&hook);
    report.callbacks_seconds = started.elapsed().as_secs_f64();
    for (i, id) in &expected {
        let Some(states) = posted.get(id) else {
            report.problems.push(format!("job {id} (soak-{i}) ended {} but its callback never came", finals[i]));
            continue;
        };
        report.callbacks_delivered += 1;
        if states.len() > 1 {
            report.callbacks_repeated += 1;
        }
        for state in states {
            if *state != finals[i] {
                report.problems.push(format!("job {id} (soak-{i}) ended {} but its callback said {state}", finals[i]));
            }
        }
    }
    for h in hook.received().into_iter().filter(|h| h.path == "/alerts" && h.answered == 200) {
        *report.alerts.entry(h.headers.get("x-claude-runner-alert").cloned().unwrap_or_default()).or_default() += 1;
    }

    // The stand-in's word: each job started at most once; none after a fallback.
    // When each job started (ms since the epoch), and on which agent: a doubled start names them.
    let mut starts: HashMap<usize, Vec<(u64, String)>> = HashMap::new();
    let mut ends: HashMap<usize, Vec<u64>> = HashMap::new();
    for a in &agents {
        let a = a.lock().unwrap();
        for line in a.standin_log() {
            let Some(i) = line["prompt"].as_str().and_then(|p| p.split("soak-").nth(1)).and_then(|n| n.trim().parse::<usize>().ok()) else {
                continue;
            };
            let at = line["at"].as_u64().unwrap_or(0);
            if line.get("end").is_some() {
                ends.entry(i).or_default().push(at)
            } else {
                starts.entry(i).or_default().push((at, a.id.clone()));
            }
        }
    }
    for (i, started) in &starts {
        if started.len() > 1 {
            report.doubled += 1;
            let job = seen.get(i).and_then(|s| s.job_id.clone()).unwrap_or_else(|| "(no id heard)".into());
            let mut started = started.clone();
            started.sort();
            let on: Vec<String> = started.iter().map(|(at, agent)| format!("{agent} at {at}")).collect();
            report.problems.push(format!("soak-{i} (job {job}) started {} times: {}", started.len(), on.join(", ")));
        }
    }
    for (i, s) in &seen {
        // The phase waited for idle agents, so no success on another slot reopened a
        // window early; nothing but a window forgotten lets a held job start before it.
        if let Some((t, _)) = starts.get(i).into_iter().flatten().find(|(t, _)| s.held && *t < s.held_until) {
            report.held_started_early += 1;
            report.problems.push(format!("soak-{i} was held for the agents' usage windows, and started {} ms before they reset", s.held_until - t));
        }
        let Some(fell_back) = s.fallback_at else { continue };
        report.fallback_answers += 1;
        let late_start = starts.get(i).into_iter().flatten().any(|(t, _)| *t > fell_back);
        let ran_on = ends.get(i).into_iter().flatten().any(|t| *t > fell_back);
        if late_start || ran_on {
            report.ran_after_fallback += 1;
            report.problems.push(format!("soak-{i}: its caller was told to fall back, and it {}", if late_start { "started afterwards" } else { "ran on to its end" }));
        }
    }
    for (i, state) in &finals {
        if state == "succeeded" && !ends.contains_key(i) {
            report.problems.push(format!("soak-{i} succeeded but the stand-in never finished it"));
        }
    }
    report.given_up_by_edge = given_up.len() as u64;
    for (i, id) in &given_up {
        // The stand-in finished it, and its agent did not report it lost on a restart (that
        // result carries the agent's words, not the edge's): the agent kept a result it did
        // not bring back before the edge gave up.
        if ends.contains_key(i) {
            report.problems.push(format!("job {id} (soak-{i}) ran to its end on its agent but the edge reported it lost (its agent did not come back within LOST_AFTER_MS)"));
        }
    }

    // A link the heal above counted may have been one the edge had not yet noticed was
    // gone, its agent still reconnecting (backoff, a loaded machine): the probe waits, as a
    // caller would, for /health to say an agent can take work (at most 60 s, else it fails).
    client.wait_online().await;
    let probe = client.execute(json!({"prompt": "probe after the chaos", "timeout_ms": 60000})).await;
    if probe.status != 200 || probe.body["success"] != true {
        report.problems.push(format!("the probe job failed: {} {}", probe.status, probe.text));
    }
    report.seconds = started.elapsed().as_secs_f64();
    // The edge's log for a look after the run (its folder goes with the soak).
    if let Ok(path) = std::env::var("SOAK_EDGE_LOG") {
        let _ = std::fs::write(path, edge.lock().unwrap().log());
    }
    // A run with problems cannot be run again (its faults fall where the clock put them):
    // its logs are what is left to trace it by, so they outlive the soak's folders.
    if !report.problems.is_empty() {
        report.kept_logs = keep_logs(&edge.lock().unwrap(), &agents, opts.seed);
    }
    drop(agents);
    report
}

/// Copies the edge's log and each agent's log and stand-in log into a folder of their own
/// (`SOAK_KEEP_DIR`, else `claude-runner-soak-problems/<pid>-<seed>` under the temp
/// folder), and names it; `None` (with the reason on stderr) if they could not be written.
fn keep_logs(edge: &EdgeServer, agents: &[Arc<Mutex<AgentProc>>], seed: u64) -> Option<String> {
    let dir = std::env::var_os("SOAK_KEEP_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("claude-runner-soak-problems").join(format!("{}-{seed}", std::process::id())));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("edge.log"), edge.log())?;
        for a in agents {
            let a = a.lock().unwrap();
            std::fs::write(dir.join(format!("{}-agent.log", a.id)), a.log())?;
            std::fs::copy(a.data.path().join("standin.log"), dir.join(format!("{}-standin.log", a.id))).map(drop).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }
            })?;
        }
        Ok(())
    };
    match write() {
        Ok(()) => Some(dir.display().to_string()),
        Err(e) => {
            eprintln!("the soak's logs could not be kept in {}: {e}", dir.display());
            None
        }
    }
}
