//! The edge state machine: one pool's queue, its agent sessions, its jobs and their
//! deadlines. Every input carries the time; every output is an [`Effect`] for the host.
//!
//! Guarantees kept here (and so on both hosts):
//! - a job is sent only to an agent that granted a credit for it, in queue order;
//! - every accepted job ends in exactly one terminal state ([`Job::finish`] refuses a
//!   second one), which its caller can read until retention ends;
//! - a job whose agent vanished waits `LOST_AFTER_MS` for it before it is `lost`;
//! - `/execute` with no agent is refused at once (the caller falls back).

use crate::config::Config;
use crate::job::{self, Job, Mode};
use crate::session::{self, Agent, Phase, Refused, Session};
use shared::contract::{AgentInfo, ApiError, ErrorCode, Health, HealthStatus, Submission};
use shared::envelope::{Domain, Envelope, OrderHeader, ORDER_TTL_MS};
use shared::job::{JobResult, JobState};
use shared::keys;
use shared::oauth::{LoginHealth, OAuthReport, OAuthStatus};
use shared::protocol::{self, close, AgentMessage, CancelOrder, EdgeMessage, JobOrder, Welcome, PROTOCOL_VERSION};
use shared::time::rfc3339;
use shared::Millis;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use tracing::{debug, info, warn};

/// Progress kept per running job for followers who join late: the newest events, up to
/// these bounds (the older ones are dropped, and the stream says how many).
pub const MAX_BACKLOG_EVENTS: usize = 1_000;
pub const MAX_BACKLOG_BYTES: usize = 2 * 1024 * 1024;

/// A running job's recent progress.
#[derive(Debug, Default)]
struct Backlog {
    chunks: VecDeque<String>,
    bytes: usize,
    dropped: u64,
}

/// What a new follower of a job gets: the progress so far, and the end if there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Follow {
    pub backlog: Vec<String>,
    /// The final chunk, when the job is already over: write it and close.
    pub end: Option<String>,
}

/// Connections that have not answered their challenge yet, at most.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// What the host must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a text frame on an agent connection.
    Send { session: String, text: String },
    /// Close an agent connection (the machine has already forgotten it).
    Close { session: String, code: u16, reason: String },
    /// Store this job record (insert or replace). Done before any message about it.
    Save(Box<Job>),
    /// Delete a job record: its retention is over.
    Forget { job_id: String },
    /// Keep this session record where it survives the host's memory (the Durable Object
    /// stores it in the socket's attachment; the native host may ignore it).
    SaveSession(Box<Session>),
    /// The job is over: answer whoever waits on it with this status and JSON body.
    Finished { job_id: String, status: u16, body: String },
    /// A progress event of a running job, as a Server-Sent Events chunk for its followers
    /// (`GET /jobs/{id}/events`). When the job ends, followers get
    /// [`crate::http::sse_result`] of the `Finished` body and the stream closes.
    Progress { job_id: String, chunk: String },
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub submitted: u64,
    pub finished: BTreeMap<&'static str, u64>,
    pub rejected_orders: u64,
    pub refused_agents: u64,
}

/// Outcome of a submission.
#[derive(Debug)]
pub struct Submitted {
    pub job_id: String,
    /// The idempotency key named an earlier job; nothing new was queued.
    pub existing: bool,
    pub effects: Vec<Effect>,
}

pub struct Edge {
    cfg: Config,
    jobs: HashMap<String, Job>,
    /// Queued job ids, oldest first.
    queue: VecDeque<String>,
    /// Dispatched or running job ids.
    active: BTreeSet<String>,
    /// Finished job ids in the order their retention ends.
    retained: VecDeque<(Millis, String)>,
    sessions: BTreeMap<String, Session>,
    idempotency: HashMap<String, String>,
    /// The newest OAuth report of any agent, kept while no agent is connected.
    last_oauth: Option<(String, OAuthReport)>,
    /// Since when no agent is connected (None while one is).
    offline_since: Option<Millis>,
    /// Makes each cancel order's nonce unique, even two in the same millisecond.
    orders_sent: u64,
    /// Recent progress of running jobs.
    progress: HashMap<String, Backlog>,
    pub stats: Stats,
}

impl Edge {
    pub fn new(cfg: Config, now: Millis) -> Edge {
        Edge {
            cfg,
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            active: BTreeSet::new(),
            retained: VecDeque::new(),
            sessions: BTreeMap::new(),
            idempotency: HashMap::new(),
            last_oauth: None,
            offline_since: Some(now),
            orders_sent: 0,
            progress: HashMap::new(),
            stats: Stats::default(),
        }
    }

    /// Rebuilds the machine from stored job records and the sessions whose connections
    /// survived (the Durable Object's hibernated sockets; none for the native host). Jobs
    /// whose connection did not survive start their `LOST_AFTER_MS` wait now.
    pub fn restore(cfg: Config, jobs: Vec<Job>, sessions: Vec<Session>, now: Millis) -> (Edge, Vec<Effect>) {
        let mut edge = Edge::new(cfg, now);
        let mut effects = Vec::new();
        for s in sessions {
            if let Some(a) = s.agent() {
                edge.last_oauth = Some((a.agent_id.clone(), a.oauth.clone()));
                edge.offline_since = None;
            }
            edge.sessions.insert(s.id.clone(), s);
        }
        let mut jobs = jobs;
        jobs.sort_by_key(|j| (j.created_at, j.id.clone()));
        for mut job in jobs {
            if let Some(key) = &job.idempotency_key {
                edge.idempotency.insert(key.clone(), job.id.clone());
            }
            match job.state {
                JobState::Queued => edge.queue.push_back(job.id.clone()),
                JobState::Dispatched | JobState::Running => {
                    let connected = job.session_id.as_ref().is_some_and(|s| edge.sessions.contains_key(s));
                    if !connected && job.orphaned_at.is_none() {
                        job.orphaned_at = Some(now);
                        effects.push(Effect::Save(Box::new(job.clone())));
                    }
                    edge.active.insert(job.id.clone());
                }
                _ => edge.retained.push_back((job.finished_at.unwrap_or(now), job.id.clone())),
            }
            edge.jobs.insert(job.id.clone(), job);
        }
        edge.retained.make_contiguous().sort();
        (edge, effects)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }

    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    /// Agent sessions that finished the handshake.
    fn ready(&self) -> impl Iterator<Item = (&String, &Agent)> {
        self.sessions.iter().filter_map(|(id, s)| s.agent().map(|a| (id, a)))
    }

    pub fn is_online(&self) -> bool {
        self.ready().next().is_some()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    // ----- agent connections -------------------------------------------------------

    /// A WebSocket opened on `/agent/connect`. `entropy` makes the session id and the
    /// challenge nonce.
    pub fn connect(&mut self, now: Millis, entropy: [u8; 32]) -> (String, Vec<Effect>) {
        let id = hex(&entropy[..8]);
        // Anyone can open a connection; only so many may sit unproven at once.
        let pending = self.sessions.values().filter(|s| s.agent().is_none()).count();
        if pending >= MAX_PENDING_HANDSHAKES {
            warn!(session = %id, pending, "too many unproven agent connections; refusing one");
            let reason = "too many connections are waiting to prove themselves; retry shortly".to_string();
            let effects = vec![Effect::Close { session: id.clone(), code: close::PROTOCOL_ERROR, reason }];
            return (id, effects);
        }
        let nonce = keys::encode(&entropy[8..]);
        let session = Session { id: id.clone(), connected_at: now, last_seen: now, phase: Phase::Challenged { nonce: nonce.clone() } };
        let challenge = EdgeMessage::Challenge {
            protocol: PROTOCOL_VERSION,
            nonce,
            edge_version: self.cfg.edge_version.clone(),
            server_time: now,
        };
        let effects = vec![
            Effect::SaveSession(Box::new(session.clone())),
            Effect::Send { session: id.clone(), text: challenge.to_text() },
        ];
        self.sessions.insert(id.clone(), session);
        (id, effects)
    }

    /// The connection closed (or errored). Its jobs wait for the agent to come back.
    pub fn disconnect(&mut self, now: Millis, session_id: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        self.drop_session(now, session_id, &mut effects);
        effects
    }

    fn drop_session(&mut self, now: Millis, session_id: &str, effects: &mut Vec<Effect>) {
        let Some(session) = self.sessions.remove(session_id) else { return };
        let Some(agent) = session.agent() else { return };
        info!(agent_id = %agent.agent_id, session = session_id, "agent disconnected");
        for id in &self.active {
            let job = self.jobs.get_mut(id).expect("active jobs exist");
            if job.session_id.as_deref() == Some(session_id) && job.orphaned_at.is_none() {
                job.orphaned_at = Some(now);
                effects.push(Effect::Save(Box::new(job.clone())));
            }
        }
        if !self.is_online() {
            self.offline_since = Some(now);
        }
    }

    fn close(&mut self, now: Millis, session_id: &str, refused: Refused, effects: &mut Vec<Effect>) {
        let goodbye = EdgeMessage::Goodbye { code: refused.code, reason: refused.reason.clone() };
        effects.push(Effect::Send { session: session_id.to_string(), text: goodbye.to_text() });
        // Close frames carry at most 123 bytes of reason; the goodbye above has it whole.
        let reason = match refused.reason.len() {
            0..=120 => refused.reason,
            _ => format!("{}...", shared::text::truncate(&refused.reason, 117)),
        };
        effects.push(Effect::Close { session: session_id.to_string(), code: refused.code, reason });
        self.drop_session(now, session_id, effects);
    }

    /// A binary frame from an agent connection: not part of the protocol, so the
    /// connection is closed like any other protocol error.
    pub fn binary_frame(&mut self, now: Millis, session_id: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.sessions.contains_key(session_id) {
            warn!(session = session_id, "binary frame from agent");
            let reason = "binary frames are not part of the protocol; send JSON text frames".to_string();
            self.close(now, session_id, Refused { code: close::PROTOCOL_ERROR, reason }, &mut effects);
        }
        effects
    }

    /// A text frame from an agent connection.
    pub fn message(&mut self, now: Millis, session_id: &str, text: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(session) = self.sessions.get_mut(session_id) else {
            return effects;
        };
        session.last_seen = now;
        let msg = match protocol::decode::<AgentMessage>(text) {
            Ok(m) => m,
            Err(e) => {
                warn!(session = session_id, agent_id = session.agent_id().unwrap_or("-"), error = %e, "unreadable frame from agent");
                self.close(now, session_id, Refused { code: close::PROTOCOL_ERROR, reason: e }, &mut effects);
                return effects;
            }
        };
        let nonce = match &session.phase {
            Phase::Challenged { nonce } => Some(nonce.clone()),
            Phase::Ready(_) => None,
        };
        match (nonce, msg) {
            (Some(nonce), AgentMessage::Hello { protocol, agent_id, envelope }) => {
                match session::verify_hello(protocol, &agent_id, &envelope, &nonce, &self.cfg.agents, now) {
                    Ok(hello) => self.welcome(now, session_id, hello, &mut effects),
                    Err(refused) => {
                        self.stats.refused_agents += 1;
                        warn!(agent_id = %agent_id, session = session_id, reason = %refused.reason, "agent refused");
                        self.close(now, session_id, refused, &mut effects);
                    }
                }
            }
            (Some(_), _) => {
                let refused = Refused { code: close::PROTOCOL_ERROR, reason: "the first message must be a signed hello".into() };
                self.close(now, session_id, refused, &mut effects);
            }
            (None, msg) => self.agent_message(now, session_id, msg, &mut effects),
        }
        effects
    }

    fn welcome(&mut self, now: Millis, session_id: &str, hello: shared::protocol::Hello, effects: &mut Vec<Effect>) {
        let agent_id = hello.agent_id.clone();
        // One connection per agent: a newer one means the older is dead or a duplicate.
        let older: Vec<String> = self
            .ready()
            .filter(|(_, a)| a.agent_id == agent_id)
            .map(|(id, _)| id.clone())
            .collect();
        for old in older {
            let refused = Refused { code: close::REPLACED, reason: "replaced by a newer connection of the same agent".into() };
            self.close(now, &old, refused, effects);
        }
        let session = self.sessions.get_mut(session_id).expect("session exists");
        session.phase = Phase::Ready(Agent {
            agent_id: agent_id.clone(),
            version: hello.agent_version.clone(),
            capacity: hello.capacity,
            credits: 0,
            oauth: hello.oauth.clone(),
            claude_version: hello.claude_version.as_deref().map(claude_version),
        });
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION,
            agent_id: agent_id.clone(),
            agent_nonce: hello.agent_nonce.clone(),
            session_id: session_id.to_string(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            issued_at: now,
        };
        let envelope = Envelope::seal(Domain::Welcome, &welcome, &self.cfg.signing_key);
        effects.push(Effect::SaveSession(Box::new(session.clone())));
        effects.push(Effect::Send { session: session_id.to_string(), text: EdgeMessage::Welcome { envelope }.to_text() });
        self.last_oauth = Some((agent_id.clone(), hello.oauth.clone()));
        self.offline_since = None;
        info!(agent_id = %agent_id, session = session_id, version = %hello.agent_version, capacity = hello.capacity, "agent connected");
        self.reconcile(now, session_id, &hello, effects);
        self.dispatch(now, effects);
    }

    /// After a reconnect: take over the jobs the agent still has, requeue those it never
    /// received, and settle those it lost.
    fn reconcile(&mut self, now: Millis, session_id: &str, hello: &shared::protocol::Hello, effects: &mut Vec<Effect>) {
        let agent_id = &hello.agent_id;
        let mine: Vec<String> = self
            .active
            .iter()
            .filter(|id| self.jobs[*id].agent_id.as_deref() == Some(agent_id))
            .cloned()
            .collect();
        for id in mine {
            let has_it = hello.running.contains(&id) || hello.finished.contains(&id);
            let job = self.jobs.get_mut(&id).expect("active jobs exist");
            if has_it {
                info!(job_id = %id, agent_id = %agent_id, "job taken over by the reconnected agent");
                job.session_id = Some(session_id.to_string());
                job.orphaned_at = None;
                if job.state == JobState::Dispatched {
                    job.state = JobState::Running;
                    job.started_at = Some(now);
                }
                effects.push(Effect::Save(Box::new(job.clone())));
            } else if job.state == JobState::Dispatched {
                // Sent, but the agent never got it: nothing ran, so it may be sent again.
                info!(job_id = %id, agent_id = %agent_id, "requeueing a job the agent never received");
                self.requeue(&id, effects);
            } else {
                let result = JobResult::failure(
                    ErrorCode::RunnerLost,
                    "the agent restarted and no longer has this job; run the task again",
                    job.elapsed(now),
                );
                self.finish(now, &id, result, effects);
            }
        }
        // A job the edge already ended (cancelled, timed out, lost) that the agent still
        // runs must stop.
        for id in &hello.running {
            if self.jobs.get(id).is_some_and(|j| j.state.is_terminal()) {
                self.send_cancel(now, session_id, agent_id, id, "the edge already ended this job", effects);
            }
        }
    }

    fn agent_message(&mut self, now: Millis, session_id: &str, msg: AgentMessage, effects: &mut Vec<Effect>) {
        let session = self.sessions.get_mut(session_id).expect("session exists");
        let agent = session.agent_mut().expect("ready session");
        let agent_id = agent.agent_id.clone();
        match msg {
            AgentMessage::Heartbeat { running: _, capacity, oauth, claude_version: version } => {
                agent.capacity = capacity;
                agent.oauth = oauth.clone();
                if let Some(v) = version {
                    agent.claude_version = Some(claude_version(&v));
                }
                effects.push(Effect::SaveSession(Box::new(session.clone())));
                self.last_oauth = Some((agent_id, oauth));
                let ack = EdgeMessage::HeartbeatAck { server_time: now };
                effects.push(Effect::Send { session: session_id.to_string(), text: ack.to_text() });
            }
            AgentMessage::Credit { slots } => {
                // Never more than the free slots the edge can see: a credit that crossed a
                // reconnect, or a buggy agent, must not make the edge send more jobs than
                // the agent can run.
                let busy = self
                    .active
                    .iter()
                    .filter(|id| self.jobs[*id].session_id.as_deref() == Some(session_id))
                    .count() as u32;
                agent.credits = agent.credits.saturating_add(slots).min(agent.capacity.saturating_sub(busy));
                effects.push(Effect::SaveSession(Box::new(session.clone())));
                self.dispatch(now, effects);
            }
            AgentMessage::Accepted { job_id } => {
                if let Some(job) = self.own_active_job(&job_id, &agent_id) {
                    if job.state == JobState::Dispatched {
                        job.state = JobState::Running;
                        job.started_at = Some(now);
                        info!(job_id = %job_id, agent_id = %agent_id, "job running");
                        effects.push(Effect::Save(Box::new(job.clone())));
                    }
                }
            }
            AgentMessage::Rejected { job_id, reason, retry } => {
                self.stats.rejected_orders += 1;
                warn!(job_id = job_id.as_deref().unwrap_or("?"), agent_id = %agent_id, reason = %reason, retry, "agent refused an order");
                let Some(id) = job_id else { return };
                if !self.own_active_job(&id, &agent_id).is_some_and(|j| j.state == JobState::Dispatched) {
                    return;
                }
                if retry {
                    self.requeue(&id, effects);
                    self.dispatch(now, effects);
                } else {
                    let result = JobResult::failure(
                        ErrorCode::JobRejected,
                        format!(
                            "the agent refused the job: {reason}. Check that the agent's EDGE_PUBLIC_KEY matches this edge's EDGE_SIGNING_KEY and that both clocks are right, then retry"
                        ),
                        0,
                    );
                    self.finish(now, &id, result, effects);
                }
            }
            AgentMessage::Event { job_id, seq, event } => {
                if self.own_active_job(&job_id, &agent_id).is_some() {
                    let chunk = crate::http::sse_progress(seq, &event);
                    let backlog = self.progress.entry(job_id.clone()).or_default();
                    backlog.bytes += chunk.len();
                    backlog.chunks.push_back(chunk.clone());
                    while backlog.chunks.len() > MAX_BACKLOG_EVENTS || backlog.bytes > MAX_BACKLOG_BYTES {
                        let Some(old) = backlog.chunks.pop_front() else { break };
                        backlog.bytes -= old.len();
                        backlog.dropped += 1;
                    }
                    effects.push(Effect::Progress { job_id, chunk });
                }
            }
            AgentMessage::Result { job_id, result } => {
                match self.jobs.get(&job_id) {
                    Some(job) if job.agent_id.as_deref() != Some(agent_id.as_str()) && !job.state.is_terminal() => {
                        warn!(job_id = %job_id, agent_id = %agent_id, "result for a job of another agent ignored");
                    }
                    Some(job) if job.state.is_terminal() => {
                        debug!(job_id = %job_id, agent_id = %agent_id, "duplicate result acknowledged");
                    }
                    Some(_) => self.finish(now, &job_id, result, effects),
                    None => warn!(job_id = %job_id, agent_id = %agent_id, "result for an unknown job acknowledged"),
                }
                // Acknowledge in every case so the agent stops re-sending it.
                let ack = EdgeMessage::ResultAck { job_id };
                effects.push(Effect::Send { session: session_id.to_string(), text: ack.to_text() });
            }
            AgentMessage::LoginProgress { .. } | AgentMessage::Unknown => {
                debug!(agent_id = %agent_id, "message kind not handled by this edge ignored");
            }
            AgentMessage::Hello { .. } => {
                let refused = Refused { code: close::PROTOCOL_ERROR, reason: "hello sent twice".into() };
                self.close(now, session_id, refused, effects);
            }
        }
    }

    /// A dispatched job that never ran goes back to the head of the queue, to be sent
    /// again (with a new nonce).
    fn requeue(&mut self, job_id: &str, effects: &mut Vec<Effect>) {
        let job = self.jobs.get_mut(job_id).expect("requeued jobs exist");
        job.state = JobState::Queued;
        job.agent_id = None;
        job.session_id = None;
        job.dispatched_at = None;
        job.orphaned_at = None;
        effects.push(Effect::Save(Box::new(job.clone())));
        self.active.remove(job_id);
        self.queue.push_front(job_id.to_string());
    }

    fn own_active_job(&mut self, job_id: &str, agent_id: &str) -> Option<&mut Job> {
        self.jobs
            .get_mut(job_id)
            .filter(|j| !j.state.is_terminal() && j.agent_id.as_deref() == Some(agent_id))
    }

    // ----- jobs --------------------------------------------------------------------

    /// Takes a validated submission. `job_id` is a fresh id the host made.
    pub fn submit(&mut self, now: Millis, job_id: String, submission: Submission, mode: Mode) -> Result<Submitted, ApiError> {
        if let Some(existing) = submission.idempotency_key.as_ref().and_then(|k| self.idempotency.get(k)) {
            // The same key for a different task is a caller's mistake, not a repeat.
            if self.jobs.get(existing).is_some_and(|j| j.spec != submission.spec) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "this idempotency key was already used for a different task; use a new key for a new task",
                )
                .with_job(existing));
            }
            return Ok(Submitted { job_id: existing.clone(), existing: true, effects: Vec::new() });
        }
        if mode == Mode::Wait && !self.is_online() {
            return Err(ApiError::offline());
        }
        if self.queue.len() >= self.cfg.max_queued_jobs {
            return Err(ApiError::new(
                ErrorCode::RunnerBusy,
                format!("{} jobs are already waiting for the agent (MAX_QUEUED_JOBS); retry later or run the task elsewhere", self.queue.len()),
            ));
        }
        if self.jobs.contains_key(&job_id) {
            return Err(ApiError::new(ErrorCode::InternalError, "job id collision; retry"));
        }
        let job = Job::new(job_id.clone(), submission.spec, mode, submission.idempotency_key, now);
        if let Some(key) = &job.idempotency_key {
            self.idempotency.insert(key.clone(), job_id.clone());
        }
        info!(job_id = %job_id, mode = ?mode, timeout_ms = job.spec.timeout_ms, "job queued");
        let mut effects = vec![Effect::Save(Box::new(job.clone()))];
        self.jobs.insert(job_id.clone(), job);
        self.queue.push_back(job_id.clone());
        self.stats.submitted += 1;
        self.dispatch(now, &mut effects);
        Ok(Submitted { job_id, existing: false, effects })
    }

    /// Sends queued jobs, oldest first, to agents with credit (the one with most first).
    fn dispatch(&mut self, now: Millis, effects: &mut Vec<Effect>) {
        while let Some(job_id) = self.queue.front().cloned() {
            let best = self
                .sessions
                .values_mut()
                .filter_map(|s| {
                    let id = s.id.clone();
                    s.agent_mut().filter(|a| a.credits > 0).map(|a| (id, a))
                })
                .max_by_key(|(_, a)| a.credits);
            let Some((session_id, agent)) = best else { break };
            agent.credits -= 1;
            let agent_id = agent.agent_id.clone();
            let session = self.sessions[&session_id].clone();
            self.queue.pop_front();
            let job = self.jobs.get_mut(&job_id).expect("queued jobs exist");
            job.state = JobState::Dispatched;
            job.dispatched_at = Some(now);
            job.agent_id = Some(agent_id.clone());
            job.session_id = Some(session_id.clone());
            job.attempts += 1;
            let order = JobOrder {
                header: OrderHeader {
                    job_id: job_id.clone(),
                    agent_id: agent_id.clone(),
                    issued_at: now,
                    expires_at: now + ORDER_TTL_MS,
                    nonce: format!("{job_id}:{}", job.attempts),
                },
                spec: job.spec.clone(),
            };
            let envelope = Envelope::seal(Domain::Job, &order, &self.cfg.signing_key);
            info!(job_id = %job_id, agent_id = %agent_id, "job dispatched");
            effects.push(Effect::Save(Box::new(job.clone())));
            effects.push(Effect::SaveSession(Box::new(session)));
            effects.push(Effect::Send { session: session_id, text: EdgeMessage::Job { envelope }.to_text() });
            self.active.insert(job_id);
        }
    }

    fn send_cancel(&mut self, now: Millis, session_id: &str, agent_id: &str, job_id: &str, reason: &str, effects: &mut Vec<Effect>) {
        let order = CancelOrder {
            header: OrderHeader {
                job_id: job_id.to_string(),
                agent_id: agent_id.to_string(),
                issued_at: now,
                expires_at: now + ORDER_TTL_MS,
                nonce: format!("{job_id}:cancel:{now}:{}", self.orders_sent),
            },
            reason: reason.to_string(),
        };
        self.orders_sent += 1;
        let envelope = Envelope::seal(Domain::Cancel, &order, &self.cfg.signing_key);
        effects.push(Effect::Send { session: session_id.to_string(), text: EdgeMessage::Cancel { envelope }.to_text() });
    }

    /// `DELETE /jobs/{id}`. A queued job ends at once; a running one is stopped by its
    /// agent, which reports it `cancelled`.
    pub fn cancel(&mut self, now: Millis, job_id: &str) -> Result<Vec<Effect>, ApiError> {
        let job = self.jobs.get(job_id).ok_or_else(|| ApiError::job_not_found(job_id))?;
        let mut effects = Vec::new();
        match job.state {
            JobState::Queued => {
                self.queue.retain(|id| id != job_id);
                let result = JobResult::failure(ErrorCode::Cancelled, "cancelled before it started", 0);
                self.finish(now, job_id, result, &mut effects);
            }
            JobState::Dispatched | JobState::Running => {
                let connected = job.session_id.as_ref().filter(|s| self.sessions.contains_key(*s)).cloned();
                match (connected, job.agent_id.clone()) {
                    (Some(session), Some(agent)) => {
                        info!(job_id, agent_id = %agent, "cancel sent to agent");
                        self.send_cancel(now, &session, &agent, job_id, "cancelled by the caller", &mut effects);
                    }
                    _ => {
                        // The agent is away; end it here. If it comes back still running
                        // the job, reconcile() tells it to stop.
                        let result = JobResult::failure(ErrorCode::Cancelled, "cancelled by the caller", job.elapsed(now));
                        self.finish(now, job_id, result, &mut effects);
                    }
                }
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("the job already ended ({}); read its result with GET /jobs/{job_id}", job.state.as_str()),
                )
                .with_job(job_id))
            }
        }
        Ok(effects)
    }

    fn finish(&mut self, now: Millis, job_id: &str, result: JobResult, effects: &mut Vec<Effect>) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if !job.finish(result, now) {
            return;
        }
        self.active.remove(job_id);
        self.queue.retain(|id| id != job_id);
        self.progress.remove(job_id);
        self.retained.push_back((now, job_id.to_string()));
        *self.stats.finished.entry(job.state.as_str()).or_default() += 1;
        info!(
            job_id,
            agent_id = job.agent_id.as_deref().unwrap_or("-"),
            state = job.state.as_str(),
            error_code = ?job.result.as_ref().and_then(|r| r.error_code),
            "job finished"
        );
        effects.push(Effect::Save(Box::new(job.clone())));
        let (status, body) = job.answer().expect("finished jobs have results");
        effects.push(Effect::Finished { job_id: job_id.to_string(), status, body });
    }

    // ----- time --------------------------------------------------------------------

    /// The earliest time [`Edge::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        let hb = self.cfg.heartbeat_interval_ms;
        let sessions = self.sessions.values().map(|s| s.deadline(hb));
        let queued = self.queue.iter().map(|id| self.queued_deadline(&self.jobs[id]));
        let active = self
            .active
            .iter()
            .filter_map(|id| self.jobs[id].deadline(self.cfg.lost_after_ms, self.cfg.queue_ttl_ms, self.cfg.timeout_margin_ms));
        let retention = self.retained.front().map(|(t, _)| t + self.cfg.job_retention_ms);
        sessions.chain(queued).chain(active).chain(retention).min()
    }

    fn queued_deadline(&self, job: &Job) -> Millis {
        let own = job.created_at + job.queue_wait(self.cfg.queue_ttl_ms);
        match (job.mode, self.offline_since) {
            // A waiting caller should fall back rather than wait out its whole timeout
            // for an agent that is gone.
            (Mode::Wait, Some(since)) => own.min(since.max(job.created_at) + self.cfg.lost_after_ms),
            _ => own,
        }
    }

    /// Acts on every deadline that has passed.
    pub fn tick(&mut self, now: Millis) -> Vec<Effect> {
        let mut effects = Vec::new();
        let hb = self.cfg.heartbeat_interval_ms;
        let overdue: Vec<(String, bool)> = self
            .sessions
            .values()
            .filter(|s| s.deadline(hb) <= now)
            .map(|s| (s.id.clone(), s.agent().is_some()))
            .collect();
        for (id, ready) in overdue {
            let reason = if ready {
                format!("no message from the agent for {} ms (two heartbeat intervals)", 2 * hb)
            } else {
                "no signed hello within 10 s".to_string()
            };
            warn!(session = %id, reason = %reason, "closing silent connection");
            self.close(now, &id, Refused { code: close::SILENT, reason }, &mut effects);
        }

        let expired: Vec<String> = self
            .queue
            .iter()
            .filter(|id| self.queued_deadline(&self.jobs[*id]) <= now)
            .cloned()
            .collect();
        for id in expired {
            let job = &self.jobs[&id];
            let result = if !self.is_online() && job.mode == Mode::Wait {
                JobResult::failure(ErrorCode::RunnerOffline, ApiError::offline().body.error, now.saturating_sub(job.created_at))
            } else {
                JobResult::failure(
                    ErrorCode::Timeout,
                    format!("no agent took the job within {} ms; retry later", job.queue_wait(self.cfg.queue_ttl_ms)),
                    now.saturating_sub(job.created_at),
                )
            };
            self.finish(now, &id, result, &mut effects);
        }

        let due: Vec<String> = self
            .active
            .iter()
            .filter(|id| {
                self.jobs[*id]
                    .deadline(self.cfg.lost_after_ms, self.cfg.queue_ttl_ms, self.cfg.timeout_margin_ms)
                    .is_some_and(|d| d <= now)
            })
            .cloned()
            .collect();
        for id in due {
            let job = &self.jobs[&id];
            let lost = job.orphaned_at.is_some_and(|t| t + self.cfg.lost_after_ms <= now);
            if lost {
                let result = job::lost(job, now);
                self.finish(now, &id, result, &mut effects);
            } else {
                let result = JobResult::failure(
                    ErrorCode::Timeout,
                    format!("the agent did not report a result within timeout_ms ({} ms) and a {} ms margin", job.spec.timeout_ms, self.cfg.timeout_margin_ms),
                    job.elapsed(now),
                );
                if let (Some(session), Some(agent)) = (job.session_id.clone(), job.agent_id.clone()) {
                    if self.sessions.contains_key(&session) {
                        self.send_cancel(now, &session, &agent, &id, "timed out at the edge", &mut effects);
                    }
                }
                self.finish(now, &id, result, &mut effects);
            }
        }

        while let Some((finished_at, id)) = self.retained.front().cloned() {
            if finished_at + self.cfg.job_retention_ms > now {
                break;
            }
            self.retained.pop_front();
            if let Some(job) = self.jobs.remove(&id) {
                if let Some(key) = job.idempotency_key {
                    self.idempotency.remove(&key);
                }
            }
            effects.push(Effect::Forget { job_id: id });
        }
        effects
    }

    // ----- views -------------------------------------------------------------------

    pub fn health(&self, now: Millis) -> Health {
        let agents: Vec<(&String, &Agent)> = self.ready().collect();
        let running = |session_id: &str| {
            self.active
                .iter()
                .filter(|id| self.jobs[*id].session_id.as_deref() == Some(session_id))
                .count()
        };
        let rank = |a: &Agent| match a.oauth.health(now) {
            LoginHealth::Good => 0,
            LoginHealth::AttentionSoon => 1,
            LoginHealth::Broken => 2,
        };
        let best = agents.iter().min_by_key(|(_, a)| rank(a));
        let info = |(sid, a): &(&String, &Agent)| AgentInfo {
            connected: true,
            agent_id: a.agent_id.clone(),
            version: a.version.clone(),
            last_seen: rfc3339(self.sessions[*sid].last_seen),
            running_jobs: running(sid),
            capacity: a.capacity,
            claude_version: a.claude_version.clone(),
        };
        let status = match best {
            None => HealthStatus::Offline,
            Some((_, a)) => match a.oauth.health(now) {
                LoginHealth::Good => HealthStatus::Healthy,
                LoginHealth::AttentionSoon => HealthStatus::Degraded,
                LoginHealth::Broken => HealthStatus::Unhealthy,
            },
        };
        Health {
            status,
            service: "claude-runner".into(),
            timestamp: rfc3339(now),
            agent: best.map(info),
            oauth: best
                .map(|(_, a)| a.oauth.status(now))
                .or_else(|| self.last_oauth.as_ref().map(|(_, r)| r.status(now))),
            agents: agents.iter().map(info).collect(),
            queued_jobs: self.queue.len(),
        }
    }

    /// The best connected agent's login, else the last one reported.
    pub fn oauth_status(&self, now: Millis) -> Option<OAuthStatus> {
        self.health(now).oauth
    }

    /// `GET /jobs/{id}/events`: what a new follower gets first.
    pub fn follow(&self, job_id: &str) -> Option<Follow> {
        let job = self.jobs.get(job_id)?;
        if let Some((_, body)) = job.answer() {
            return Some(Follow { backlog: Vec::new(), end: Some(crate::http::sse_result(&body)) });
        }
        let mut backlog = Vec::new();
        if let Some(b) = self.progress.get(job_id) {
            if b.dropped > 0 {
                backlog.push(format!(": {} earlier progress events are no longer kept\n\n", b.dropped));
            }
            backlog.extend(b.chunks.iter().cloned());
        }
        Some(Follow { backlog, end: None })
    }

    pub fn active_jobs(&self) -> usize {
        self.active.len()
    }

}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An agent's CLI version as the edge keeps and shows it: one bounded line.
fn claude_version(reported: &str) -> String {
    let line = reported.lines().next().unwrap_or_default().trim();
    shared::text::truncate(line, shared::protocol::MAX_CLAUDE_VERSION_BYTES).to_string()
}
