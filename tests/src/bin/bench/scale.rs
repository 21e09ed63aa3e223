//! `bench --scale`: one pool with many agents. The agents are light and in-process — one
//! tokio task each — but speak the real protocol with real signatures: each dials with a
//! fresh nonce, checks the edge's signature over it in the challenge, answers the
//! challenge with a signed hello, checks the edge's signed welcome and every job
//! order's signature, and answers each job at once with `Accepted`, a signed result and a
//! new statement of its slots. So what is measured is the edge: its dispatch and the
//! bookkeeping of each job's end.
//!
//! For each agent count (10 … 200), on a fresh edge:
//! 1. connect: the agents connect and prove themselves, stating no slot free;
//! 2. fill: `--scale-jobs` jobs are queued with `POST /jobs` (16 clients) — after, with
//!    `--scale-unfit N`, N jobs each asking for a label of its own that no agent offers,
//!    from a caller of their own (its lane, never served, is first in turn throughout:
//!    what a queue of jobs nobody can take costs every dispatch);
//! 3. drain: every agent states its slots free at once; dispatch throughput is the jobs
//!    sent per second until the last one reached its agent;
//! 4. latency: jobs are submitted at `--scale-rate` per second for `--scale-seconds`;
//!    queue-to-dispatch is from the moment the caller sends `POST /jobs` to the moment
//!    the agent has the verified order (so it includes the submission itself);
//! 5. memory: the edge's VmRSS after the fill and at the end (its peak too), and its CPU
//!    time per job: in the fill, in the drain, and in each half of the drain (a cost
//!    that grew with the queue would make the first half dearer), with the load average
//!    (the machine is shared; contention moves these figures more than the code does).

use shared::link::{Ephemeral, LinkKeys, Transcript};
use super::{dist, edge_name, memory, round3, cpu_of_tree};
use ed25519_dalek::{SigningKey, VerifyingKey};
use futures_util::{SinkExt, StreamExt};
use harness::{EdgeKind, EdgeServer, Keys, SECRET};
use serde_json::{json, Value};
use shared::envelope::{open_order, Audience, ChallengeProof, Domain, Envelope};
use shared::oauth::{OAuthReport, OAuthSource};
use shared::protocol::{AgentMessage, Beat, EdgeMessage, Hello, JobOrder, Slots, Welcome, PROTOCOL_VERSION};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone)]
pub struct ScaleOpts {
    pub agents: Vec<usize>,
    pub slots: u32,
    pub jobs: usize,
    pub rate: usize,
    pub seconds: u64,
    /// Jobs no agent fits, queued before the fill and left waiting.
    pub unfit: usize,
}

impl Default for ScaleOpts {
    fn default() -> Self {
        ScaleOpts { agents: vec![10, 50, 100, 200], slots: 4, jobs: 20_000, rate: 1_000, seconds: 5, unfit: 0 }
    }
}

// The aims for the native edge with 200 agents.
pub const AIM_DISPATCH_PER_S: f64 = 2_000.0;
pub const AIM_P99_MS: f64 = 50.0;

/// What the agents of one run saw.
struct Seen {
    /// Orders received (and verified) in all.
    received: AtomicUsize,
    /// When the last order arrived, in µs since `base`.
    last_at: AtomicU64,
    base: Instant,
    /// Latency jobs: when each was sent (µs since `base`; 0 until sent), and the
    /// send-to-order latencies measured.
    sent_at: Vec<AtomicU64>,
    latencies: Mutex<Vec<Duration>>,
    /// Orders whose signature or audience did not verify (must stay 0).
    refused: AtomicUsize,
}

impl Seen {
    fn micros(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

pub async fn run(opts: ScaleOpts, edges: &[EdgeKind]) -> Value {
    let mut out = serde_json::Map::new();
    for kind in edges {
        let mut runs = Vec::new();
        for &n in &opts.agents {
            eprintln!("[scale {}] {n} agents x {} slots, {} jobs", edge_name(*kind), opts.slots, opts.jobs);
            match one(*kind, n, &opts).await {
                Ok(v) => {
                    eprintln!("[scale {}] {v}", edge_name(*kind));
                    runs.push(v)
                }
                Err(e) => runs.push(json!({ "agents": n, "error": format!("{e:#}") })),
            }
        }
        out.insert(edge_name(*kind).to_string(), Value::Array(runs));
    }
    out.insert("aims_native_200_agents".into(), json!({ "dispatch_per_s": AIM_DISPATCH_PER_S, "queue_to_dispatch_p99_ms": AIM_P99_MS }));
    out.insert("slots_per_agent".into(), json!(opts.slots));
    out.insert("jobs".into(), json!(opts.jobs));
    out.insert("latency_rate_per_s".into(), json!(opts.rate));
    out.insert("latency_seconds".into(), json!(opts.seconds));
    out.insert("unfit_jobs_waiting".into(), json!(opts.unfit));
    Value::Object(out)
}

async fn one(kind: EdgeKind, n: usize, opts: &ScaleOpts) -> anyhow::Result<Value> {
    let ids: Vec<String> = (0..n).map(|i| format!("sim{i:03}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let keys = Keys::new(&id_refs);
    let latency_jobs = opts.rate * opts.seconds as usize;
    let max_queued = (opts.jobs + latency_jobs + opts.unfit + 1_000).to_string();
    let settings = [
        ("HEARTBEAT_INTERVAL_MS", "15000"),
        ("LOST_AFTER_MS", "120000"),
        ("QUEUE_TTL_MS", "3600000"),
        ("MAX_QUEUED_JOBS", max_queued.as_str()),
    ];
    let edge = tokio::task::block_in_place(|| EdgeServer::start(kind, &keys, &settings));
    let edge_pid = edge.pid().expect("the edge runs");
    let tree = kind == EdgeKind::Worker;
    let http = super::http_client();
    let health = format!("{}/health", edge.url());
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(&health).send().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the edge never answered /health");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let idle_memory = memory(edge_pid, tree);

    // 1. Connect the agents with no slot free (at most 8 handshakes at once, as agents
    //    reconnecting with backoff and jitter would: the edge bounds unproven connections
    //    per source address, and these all come from 127.0.0.1).
    let seen = Arc::new(Seen {
        received: AtomicUsize::new(0),
        last_at: AtomicU64::new(0),
        base: Instant::now(),
        sent_at: (0..latency_jobs).map(|_| AtomicU64::new(0)).collect(),
        latencies: Mutex::new(Vec::new()),
        refused: AtomicUsize::new(0),
    });
    let (go_tx, go_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(n);
    let edge_public = keys.edge.verifying_key();
    let connect_started = Instant::now();
    let mut tasks = Vec::new();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(8));
    for id in &ids {
        let sim = Sim { url: format!("{}/agent/connect", edge.ws_url()), id: id.clone(), key: keys.agent(id).clone(), edge_public, slots: opts.slots };
        tasks.push(tokio::spawn(sim.run(seen.clone(), handshakes.clone(), ready_tx.clone(), go_rx.clone(), stop_rx.clone())));
    }
    for _ in 0..n {
        ready_rx.recv().await.expect("agents report")?;
    }
    let connect = connect_started.elapsed();

    // 2. Fill the queue while no agent has a slot free (the jobs nobody fits first).
    submit_unfit(&edge.url(), opts.unfit).await?;
    let load_start = super::loadavg();
    let fill_started = Instant::now();
    let cpu_fill = cpu_of_tree(edge_pid).own;
    submit_many(&edge.url(), opts.jobs, 16, None).await?;
    let fill = fill_started.elapsed();
    let cpu_fill = cpu_of_tree(edge_pid).own - cpu_fill;
    let filled_memory = memory(edge_pid, tree);

    // 3. Free every slot at once: the drain.
    let cpu_before = cpu_of_tree(edge_pid).own;
    let drain_started = seen.micros();
    go_tx.send(true)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    // The edge's CPU when half the queue has gone: a cost that grows with the queue (or
    // with the ended jobs kept) shows as halves that differ.
    let mut at_half = None;
    while seen.received.load(Ordering::Relaxed) < opts.jobs {
        anyhow::ensure!(Instant::now() < deadline, "the drain did not end: {} of {} sent", seen.received.load(Ordering::Relaxed), opts.jobs);
        if at_half.is_none() && seen.received.load(Ordering::Relaxed) >= opts.jobs / 2 {
            at_half = Some((cpu_of_tree(edge_pid).own, seen.received.load(Ordering::Relaxed)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_s = (seen.last_at.load(Ordering::Relaxed).saturating_sub(drain_started)) as f64 / 1e6;
    // Let the last results settle before the latency run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_after = cpu_of_tree(edge_pid).own;
    let cpu_drain = cpu_after - cpu_before;
    let (cpu_half, jobs_half) = at_half.unwrap_or((cpu_after, opts.jobs));
    let per_job = |cpu: f64, jobs: usize| round3(cpu * 1000.0 / jobs.max(1) as f64);
    let halves = [per_job(cpu_half - cpu_before, jobs_half), per_job(cpu_after - cpu_half, opts.jobs - jobs_half)];

    // 4. Latency at a steady rate.
    let before = seen.received.load(Ordering::Relaxed);
    submit_many(&edge.url(), latency_jobs, 16, Some((opts.rate, seen.clone()))).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.received.load(Ordering::Relaxed) < before + latency_jobs {
        anyhow::ensure!(Instant::now() < deadline, "latency jobs were not all dispatched");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let latencies = seen.latencies.lock().expect("latency lock").clone();
    let end_memory = memory(edge_pid, tree);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    drop(edge);
    Ok(json!({
        "agents": n,
        "fill_s": round3(fill.as_secs_f64()),
        "fill_jobs_per_s": round3(opts.jobs as f64 / fill.as_secs_f64()),
        "connect_all_s": round3(connect.as_secs_f64()),
        "drain_s": round3(drain_s),
        "dispatch_per_s": round3(opts.jobs as f64 / drain_s.max(1e-9)),
        "edge_cpu_ms_per_job_in_drain": round3(cpu_drain * 1000.0 / opts.jobs as f64),
        "edge_cpu_ms_per_job_in_drain_halves": halves,
        "edge_cpu_ms_per_job_in_fill": per_job(cpu_fill, opts.jobs),
        "load_average": { "start": load_start, "end": super::loadavg() },
        "queue_to_dispatch": dist(&latencies),
        "refused_orders": seen.refused.load(Ordering::Relaxed),
        "edge_memory": { "idle": idle_memory, "queue_full": filled_memory, "end": end_memory },
    }))
}

/// Queues `count` jobs that no agent fits, each asking for a label of its own, from the
/// caller `unfit`.
async fn submit_unfit(base: &str, count: usize) -> anyhow::Result<()> {
    let http = super::http_client();
    for i in 0..count {
        let body = json!({"prompt": format!("unfit {i}"), "caller": "unfit", "labels": {"need": format!("u{i}")}});
        let resp = http.post(format!("{base}/jobs")).header("X-Runner-Secret", SECRET).json(&body).send().await?;
        anyhow::ensure!(resp.status().as_u16() == 202, "POST /jobs answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    Ok(())
}

/// Submits `count` jobs with `clients` concurrent clients; with `paced`, at that many per
/// second in all, recording when each was sent.
async fn submit_many(base: &str, count: usize, clients: usize, paced: Option<(usize, Arc<Seen>)>) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (next, paced, url) = (next.clone(), paced.clone(), format!("{base}/jobs"));
        workers.push(tokio::spawn(async move {
            let http = super::http_client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                let prompt = match &paced {
                    Some((rate, seen)) => {
                        let due = started + Duration::from_secs_f64(i as f64 / *rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                        seen.sent_at[i].store(seen.micros().max(1), Ordering::Relaxed);
                        format!("lat {i}")
                    }
                    None => format!("fill {i}"),
                };
                let resp = http.post(&url).header("X-Runner-Secret", SECRET).json(&json!({"prompt": prompt})).send().await?;
                anyhow::ensure!(resp.status().as_u16() == 202, "POST /jobs answered {}: {}", resp.status(), resp.text().await.unwrap_or_default());
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(())
}

/// One light agent.
struct Sim {
    url: String,
    id: String,
    key: SigningKey,
    edge_public: VerifyingKey,
    slots: u32,
}

impl Sim {
    async fn run(self, seen: Arc<Seen>, handshakes: Arc<tokio::sync::Semaphore>, ready: tokio::sync::mpsc::Sender<anyhow::Result<()>>, mut go: watch::Receiver<bool>, mut stop: watch::Receiver<bool>) {
        let permit = handshakes.acquire_owned().await.expect("the semaphore stays open");
        let shaken = self.handshake().await;
        drop(permit);
        let (mut ws, challenge, link) = match shaken {
            Ok(shaken) => {
                let _ = ready.send(Ok(())).await;
                shaken
            }
            Err(e) => {
                let _ = ready.send(Err(e.context(format!("agent {}", self.id)))).await;
                return;
            }
        };
        let mut received: u64 = 0;
        let mut free = 0;
        let credit = |free, received| AgentMessage::Credit { slots: Slots { free, received } };
        let mut beat = tokio::time::interval(Duration::from_secs(5));
        let mut beats: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Ok(()) = go.changed(), if free == 0 => {
                    // Every slot free at once: the drain starts.
                    free = self.slots;
                    if ws.send(Message::text(credit(free, received).to_text())).await.is_err() { break; }
                }
                _ = beat.tick() => {
                    beats += 1;
                    let hb = Beat { challenge: challenge.clone(), seq: beats, running: vec![], capacity: self.slots, oauth: oauth(), slots: Slots { free, received }, claude_version: None, stopping: false, cannot_start: None, finished: vec![], more_finished: false };
                    let hb = AgentMessage::heartbeat(&hb, &link.agent_to_edge);
                    if ws.send(Message::text(hb.to_text())).await.is_err() { break; }
                }
                frame = ws.next() => {
                    let Some(Ok(Message::Text(text))) = frame else {
                        if matches!(frame, Some(Ok(_))) { continue; }
                        break;
                    };
                    let Ok(EdgeMessage::Job { envelope }) = serde_json::from_str::<EdgeMessage>(&text) else { continue };
                    received += 1;
                    let me = Audience { agent_id: &self.id, pool: "default" };
                    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
                    let order: JobOrder = match open_order(&envelope, Domain::Job, &self.edge_public, me, wall) {
                        Ok(o) => o,
                        Err(_) => {
                            seen.refused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let now = seen.micros();
                    if let Some(i) = order.spec.prompt.strip_prefix("lat ").and_then(|i| i.parse::<usize>().ok()) {
                        let sent = seen.sent_at.get(i).map_or(0, |s| s.load(Ordering::Relaxed));
                        if sent > 0 {
                            seen.latencies.lock().expect("latency lock").push(Duration::from_micros(now.saturating_sub(sent)));
                        }
                    }
                    seen.last_at.fetch_max(now, Ordering::Relaxed);
                    seen.received.fetch_add(1, Ordering::Relaxed);
                    let job_id = order.header.job_id.clone();
                    let done = AgentMessage::result(&job_id, &order.header.nonce, shared::job::JobResult { success: true, output: "ok".into(), exit_code: Some(0), ..Default::default() }, &link.agent_to_edge);
                    let replies = [AgentMessage::Accepted { job_id }, done, credit(free, received)];
                    let mut failed = false;
                    for m in replies {
                        failed |= ws.feed(Message::text(m.to_text())).await.is_err();
                    }
                    if failed || ws.flush().await.is_err() { break; }
                }
            }
        }
        let _ = ws.close(None).await;
    }

    /// A proven connection, its challenge (the heartbeats are bound to it) and its keys.
    async fn handshake(&self) -> anyhow::Result<(tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, String, LinkKeys)> {
        let prover = harness::Prover { agent_id: self.id.clone(), pool: "default".into(), key: self.key.clone() };
        // A fresh nonce on each dial, as the agent's: the edge signs it in its challenge.
        let agent_nonce = shared::envelope::agent_nonce(runtime::entropy());
        let (mut ws, _) = tokio_tungstenite::connect_async(prover.request_with(&self.url, &agent_nonce)).await?;
        let challenge = next_text(&mut ws).await?;
        let EdgeMessage::Challenge { nonce, proof, .. } = serde_json::from_str(&challenge)? else { anyhow::bail!("no challenge: {challenge}") };
        // Nothing more is said until the edge proved its key for this dial, as the agent does.
        let proven = proof.is_some_and(|proof| ChallengeProof::verify(&proof, &self.edge_public, PROTOCOL_VERSION, &nonce, &agent_nonce, "default"));
        anyhow::ensure!(proven, "the challenge is not signed by the edge's key for this dial: {challenge}");
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        let ephemeral = Ephemeral::new(runtime::entropy());
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: self.id.clone(),
            agent_version: "bench".into(),
            challenge: nonce.clone(),
            agent_nonce: agent_nonce.clone(),
            ephemeral: ephemeral.public(),
            issued_at: wall,
            capacity: self.slots,
            running: vec![],
            finished: vec![],
            more_finished: false,
            oauth: oauth(),
            claude_version: None,
            labels: Default::default(),
            mirrors: vec![],
            instance: None,
        };
        let msg = AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: self.id.clone(), envelope: Envelope::seal(Domain::Hello, &hello, &self.key) };
        ws.send(Message::text(msg.to_text())).await?;
        let welcome = next_text(&mut ws).await?;
        let EdgeMessage::Welcome { envelope } = serde_json::from_str(&welcome)? else { anyhow::bail!("no welcome: {welcome}") };
        let welcome: Welcome = envelope.open(Domain::Welcome, &self.edge_public).map_err(|e| anyhow::anyhow!("the welcome does not verify: {e}"))?;
        anyhow::ensure!(welcome.agent_nonce == agent_nonce, "the welcome answers another hello");
        let transcript = Transcript {
            challenge: &nonce,
            agent_nonce: &agent_nonce,
            agent_public: &hello.ephemeral,
            edge_public: &welcome.ephemeral,
            agent_id: &self.id,
            pool: &welcome.pool,
        };
        let link = LinkKeys::agree(&ephemeral, &welcome.ephemeral, &transcript)?;
        // No slot free until every agent is in.
        ws.send(Message::text(AgentMessage::Credit { slots: Slots { free: 0, received: 0 } }.to_text())).await?;
        Ok((ws, nonce, link))
    }
}

async fn next_text<S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin>(ws: &mut S) -> anyhow::Result<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the edge closed the connection"),
        }
    }
}

fn oauth() -> OAuthReport {
    OAuthReport { source: OAuthSource::OauthTokenEnv, ..OAuthReport::unconfigured(0) }
}
