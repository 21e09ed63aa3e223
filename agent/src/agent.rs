//! The agent's state that outlives connections, and its handling of the edge's orders:
//! verifying a job (signature, audience, expiry, replay), registering and starting it,
//! cancelling it, and keeping its result until the edge has it. Connections come and go
//! ([`crate::connection`]); job tasks are owned by the serve loop ([`crate::serve`]).

use crate::config::AgentConfig;
use crate::oauth::{Login, RefreshGate};
use crate::relogin::Relogin;
use crate::report::Reporter;
use crate::process::Stop;
use crate::replay::ReplayGuard;
use crate::runner::{self, JobContext};
use crate::sessions::{Claim, Owner, Sessions};
use crate::spool::{Spool, StoredResult};
use crate::status::StatusFile;
use futures_util::FutureExt;
use shared::contract::ErrorCode;
use shared::envelope::{check_order, Audience, Domain, Envelope, OrderHeader, Refusal, Tagged};
use shared::job::JobResult;
use shared::oauth::OAuthReport;
use shared::protocol::{AgentMessage, Beat, BeatAck, CancelOrder, EdgeMessage, JobOrder, LoginOrder, ResultReport, Slots, MAX_UNPROVEN_FRAMES};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// One job's whole task, from start to its result on the uplink; the serve loop runs it.
pub type JobTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The ends of the agent's queues that its tasks read.
pub struct Queues {
    /// Messages for the edge, the agent's own and its jobs' progress: the connection
    /// sends them ([`crate::uplink`]).
    pub uplink: crate::uplink::Receivers,
    /// Job tasks to run: the serve loop spawns them.
    pub jobs: mpsc::UnboundedReceiver<JobTask>,
}

/// Jobs on this agent: each running one has the handle that stops it. Whatever the agent
/// tells the edge about its jobs and slots (acceptances, refusals, results, statements of
/// its slots, heartbeats) is decided and queued while this is locked, so the edge hears
/// the agent's states in the order they happened (see [`shared::protocol::Slots`]).
#[derive(Default)]
struct Running {
    jobs: HashMap<String, Option<oneshot::Sender<Stop>>>,
    /// The agent is stopping: no new job starts.
    closed: bool,
    /// The number of the last job order taken on the current connection (orders are
    /// numbered by the edge; one whose signature did not verify is never counted).
    received: u64,
    /// The current connection's challenge, which its heartbeats are bound to, and the
    /// number of the last heartbeat made for it.
    challenge: String,
    beats: u64,
    /// The number of the last heartbeat of the current connection the edge acknowledged
    /// (MACed): an ack is heard only for a later beat, made, so one played back is no news.
    beat_acked: u64,
    /// The results the edge answered "not taken" on the current connection: they stay kept,
    /// so a second such answer (one played back) is no news.
    not_taken_here: HashSet<String>,
    /// The mirror names the edge was last told of (in a hello or a `Mirrors`).
    mirrors_told: Vec<String>,
    /// The agent could not start a job for a want of its own ([`runner::CannotStart`]):
    /// it offers no slot, and its heartbeats say why, until it can again
    /// ([`Agent::check_start`]).
    cannot_start: Option<Held>,
}

/// Why the agent takes no work now, and how many heartbeats have passed since.
struct Held {
    cannot: runner::CannotStart,
    checks: u32,
}

impl Running {
    /// The ids of the jobs held, sorted (as the edge and the status file are told them).
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.jobs.keys().cloned().collect();
        ids.sort();
        ids
    }
}

pub struct Agent {
    pub cfg: Arc<AgentConfig>,
    /// Shared by the jobs' contexts, not copied into each (its paths, variables and secrets).
    pub login: Arc<Login>,
    /// Claude's share of the agent's environment ([`crate::process::inherited_environment`]), read once.
    inherited_env: Arc<[(std::ffi::OsString, std::ffi::OsString)]>,
    pub gate: RefreshGate,
    /// The login and usage window as the edge is told them, and when.
    pub reporter: Arc<Reporter>,
    /// A re-login relayed by the edge, while one is under way.
    pub relogin: Relogin,
    pub spool: Arc<Spool>,
    pub status: StatusFile,
    /// The Claude Code CLI's version, for the edge's `/health`.
    pub cli: crate::cli_version::CliVersion,
    replay: Mutex<ReplayGuard>,
    /// The repository mirrors and what jobs do with them.
    pub repos: Arc<crate::repo::Repos>,
    /// Whose each Claude session is.
    sessions: Arc<Sessions>,
    running: Mutex<Running>,
    /// Frames of the current connection the edge did not prove: orders refused naming no
    /// order (a signature that fails, a copy of an order, one of another connection),
    /// frames that do not read, kinds the agent does not know, acknowledgements not MACed
    /// on the connection, goodbyes (plain: a real edge sends one, then closes). Counted apart
    /// from `running`, whose lock `on_job` holds while it refuses; the connection ends at
    /// [`MAX_UNPROVEN_FRAMES`].
    unproven: AtomicU32,
    /// `DATA_DIR/workspaces`, symlinks resolved.
    workspaces: Arc<std::path::PathBuf>,
    /// The lock on `DATA_DIR/agent.lock`, held while the agent lives.
    _data_lock: std::fs::File,
    /// A shared lock of DATA_DIR itself, held while the agent lives: how `status --check`
    /// finds this agent stopped when a job has replaced `agent.lock` ([`crate::drain::hold_folder`]).
    _folder_lock: Option<std::fs::File>,
    /// The agent's own words for the edge (taken before the jobs' progress); the current
    /// connection sends them, or drops them while there is none (results are spooled,
    /// credits recomputed).
    pub uplink: mpsc::UnboundedSender<AgentMessage>,
    /// Each job's progress queue, under the jobs' budgets ([`crate::uplink`]).
    progress: crate::uplink::Progress,
    /// The current connection's keys: what goes on the uplink is MACed with them.
    pub link: crate::link::Link,
    jobs: mpsc::UnboundedSender<JobTask>,
    /// When the jobs' waiting progress batches go.
    progress_clock: Arc<crate::progress_clock::ProgressClock>,
    /// This agent's instance id, kept in DATA_DIR (`instance`) and in every hello it sends
    /// ([`shared::protocol::Hello::instance`]): the edge tells this agent reconnecting or
    /// restarted from another one proving the same AGENT_ID from another DATA_DIR, which it
    /// refuses while this one may still run jobs of it.
    pub instance: String,
}

/// How long a result no edge takes is kept, from the first "not taken" answer: the edges'
/// default `JOB_RETENTION_MS` (24 h). The edge that issued the job may be away (restarting,
/// or no longer the one `EDGE_URL` names) and take it later; one gone for good never will,
/// and the spool must not grow with such results for ever. Counted from the time kept with
/// the result in the spool ([`Spool::not_taken`]), so across restarts of the agent (a result
/// the disk refuses keeps it in memory, as it keeps the result).
pub const NOT_TAKEN_KEPT_MS: u64 = 24 * 3_600_000;

/// What a frame from the edge was to its connection ([`Agent::on_edge_message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// The edge proved it on this connection, and it was new there: the edge is heard.
    /// `beat`: the heartbeat it acknowledged, if it was a heartbeat ack.
    Proven { beat: Option<u64> },
    /// Not proven, or a copy: not heard (counted as not proven, but for copies of the
    /// edge's own frames).
    Not,
    /// The edge says it closes the connection, and why (plain: counted, not heard).
    Goodbye { code: u16, reason: String },
    /// A challenge or welcome once the handshake is done.
    Handshake,
}

impl From<bool> for Heard {
    fn from(proven: bool) -> Heard {
        if proven {
            Heard::Proven { beat: None }
        } else {
            Heard::Not
        }
    }
}

/// The file in DATA_DIR whose lock the agent holds while it lives: one agent per DATA_DIR.
pub const DATA_LOCK: &str = "agent.lock";

impl Agent {
    pub fn new(cfg: AgentConfig) -> anyhow::Result<(Arc<Agent>, Queues)> {
        // Owner-only: a new DATA_DIR and the folders in it. An existing DATA_DIR keeps its
        // mode (it may be a shared folder); what the agent keeps in it is private anyway.
        let workspaces = crate::workspace::root(&cfg.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display())
        })?;
        // One agent per DATA_DIR: a second one would take the first's running jobs for
        // those a dead agent left (report them lost, remove their workspaces).
        let data_lock = runtime::hold_lock(&cfg.data_dir.join(DATA_LOCK))
            .map_err(|e| anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display()))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "another agent is running with DATA_DIR {} (it holds {}/agent.lock, let go when it exits: do not delete the file): stop it first (`claude-runner agent --drain` with the same DATA_DIR), or give this one a DATA_DIR of its own",
                    cfg.data_dir.display(),
                    cfg.data_dir.display()
                )
            })?;
        // No agent holds the folder exclusively: whoever does is no agent, and would hide a
        // stopped agent from `status --check`. A file system without flocks of folders
        // loses only that check.
        let folder_lock = match crate::drain::hold_folder(&cfg.data_dir) {
            Ok(Some(folder)) => Some(folder),
            Ok(None) => anyhow::bail!(
                "cannot use DATA_DIR {}: another process holds a lock of the folder itself, which no agent does (a job of this user can take one); see what holds it (`lslocks | grep {}`), stop that, and start the agent again",
                cfg.data_dir.display(),
                cfg.data_dir.display()
            ),
            Err(e) => {
                tracing::warn!(data_dir = %cfg.data_dir.display(), error = %e, "could not lock DATA_DIR itself: `status --check` cannot see this agent stopped if a job replaces agent.lock");
                None
            }
        };
        // What a crash left of a write (status, replay memory, session log): no write is
        // under way before the lock, and none of another agent's after it.
        crate::files::remove_leftovers(&cfg.data_dir);
        let (spool, interrupted) = Spool::open(
            cfg.data_dir.join("spool"),
            cfg.data_dir.join("started"),
            cfg.data_dir.join("records"),
            cfg.max_concurrent_jobs as usize,
            crate::spool::Seal::new(&cfg.signing_key),
        )
        .map_err(|e| {
            anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display())
        })?;
        if !interrupted.is_empty() {
            let jobs: Vec<&str> = interrupted.iter().map(|j| j.job_id.as_str()).collect();
            warn!(agent_id = %cfg.agent_id, jobs = ?jobs, "jobs that were running when the agent last stopped are reported lost");
        }
        // Reported like any result: bound to the order the marker kept.
        for job in interrupted {
            let stored = StoredResult::of(&ResultReport { job_id: job.job_id.clone(), order_nonce: job.order_nonce, result: crate::spool::interrupted() });
            spool.put(&job.job_id, &stored).map_err(|e| {
                anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display())
            })?;
        }
        let replay = ReplayGuard::open(cfg.data_dir.join("seen-orders.log"));
        let (sessions, loaded) = Sessions::open(cfg.data_dir.join("sessions.log"), crate::sessions::key(&cfg.signing_key), &cfg.agent_id, crate::now_ms())
            .map_err(|e| anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display()))?;
        if loaded.skipped > 0 {
            warn!(
                agent_id = %cfg.agent_id, skipped = loaded.skipped, sessions = loaded.sessions,
                "records in DATA_DIR/sessions.log skipped: not sealed by this agent for their session (torn by a crash, written or changed by a job, or sealed under another signing key); a session whose every record was skipped cannot be resumed"
            );
        }
        if loaded.passed_over > 0 {
            warn!(
                agent_id = %cfg.agent_id, passed_over = loaded.passed_over, sessions = loaded.sessions,
                "DATA_DIR/sessions.log is far bigger than the agent writes it (a job's doing?): only its last {} MiB were read, the sessions recorded before them cannot be resumed; it is rewritten smaller at its next compaction",
                crate::sessions::MAX_LOG_BYTES >> 20
            );
        }
        if let Some(e) = &loaded.unreadable {
            warn!(agent_id = %cfg.agent_id, error = %e, sessions = loaded.sessions, "DATA_DIR/sessions.log could not be read to its end: the sessions in the rest cannot be resumed; fix its permissions or the disk");
        }
        // The redactor also knows the agent's own secrets and the repository tokens.
        let login = Login::new(cfg.claude_config_dir.as_deref()).with_secrets(cfg.repos.token_values()).with_secrets(cfg.secrets.iter().map(String::as_str));
        // Read now, before any job can run: the tokens the file holds are remembered for the
        // agent's life (`oauth::Logins`), so a job that hides the file finds them masked
        // anyway, and the first redactor is built off any job's time.
        login.redactor(crate::now_ms());
        let reporter = Arc::new(Reporter::new(login.clone()));
        let login = Arc::new(login);
        let inherited_env = crate::process::inherited_environment(&cfg.job_env_allow).into();
        // Read before the new status file replaces it.
        reporter.resume(crate::status::read(&cfg.data_dir).ok().flatten().as_ref(), crate::now_ms());
        let repos = crate::repo::Repos::open(&cfg.data_dir, cfg.repos.clone()).map_err(|e| {
            anyhow::anyhow!("cannot keep repository mirrors in {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.join("repos").display())
        })?;
        // Like the spool's markers, the workspaces (and the mirrors: `serve` recovers them)
        // are this agent's alone: what a killed predecessor left in them goes before the
        // first job.
        let leftovers = crate::workspace::clear_leftovers(&cfg.data_dir.join("workspaces"), cfg.repos.keep_failed_workspaces);
        if leftovers > 0 {
            info!(agent_id = %cfg.agent_id, workspaces = leftovers, "removed the workspaces of jobs the agent was running when it last stopped");
        }
        let instance = crate::instance::open(&cfg.data_dir, &cfg.agent_id);
        let (uplink, progress, uplink_rx) = crate::uplink::channels();
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let status = StatusFile::new(cfg.data_dir.join("status.json"), &cfg.agent_id, &cfg.connect_url);
        status.resumed(&reporter.report(), reporter.fingerprint(), &login.config_dir);
        let agent = Agent {
            status,
            cli: Default::default(),
            cfg: Arc::new(cfg),
            login,
            inherited_env,
            gate: RefreshGate::default(),
            reporter,
            relogin: Relogin::default(),
            spool: Arc::new(spool),
            replay: Mutex::new(replay),
            repos: Arc::new(repos),
            sessions: Arc::new(sessions),
            running: Mutex::new(Running::default()),
            unproven: AtomicU32::new(0),
            workspaces: Arc::new(workspaces),
            _data_lock: data_lock,
            _folder_lock: folder_lock,
            uplink,
            progress,
            link: Default::default(),
            jobs,
            progress_clock: Default::default(),
            instance,
        };
        agent.status.mirrors(agent.repos.mirror_names());
        let agent = Arc::new(agent);
        // A change of the login or the usage window queues its heartbeat there and then,
        // ahead of what the changer queues next (a run's result): see `Reporter::tell_with`.
        // Weak: the reporter is the agent's.
        let weak = Arc::downgrade(&agent);
        agent.reporter.tell_with(move || {
            if let Some(agent) = weak.upgrade() {
                agent.heartbeat();
            }
        });
        Ok((agent, Queues { uplink: uplink_rx, jobs: jobs_rx }))
    }

    /// What a job runner gets to see: its order's nonce and its caller (and whether the
    /// edge says that caller is proven: it weighs the session cut, [`Owner::proven`]).
    fn job_context(&self, order_nonce: &str, caller: &str, caller_proven: Option<bool>) -> JobContext {
        JobContext {
            sessions: Some(Arc::clone(&self.sessions)),
            owner: Owner { caller: caller.to_string(), pool: self.cfg.pool.clone(), proven: caller_proven },
            cfg: Arc::clone(&self.cfg),
            login: Arc::clone(&self.login),
            inherited_env: Arc::clone(&self.inherited_env),
            gate: self.gate.clone(),
            progress: self.progress.job(),
            link: self.link.clone(),
            reporter: Arc::clone(&self.reporter),
            order_nonce: order_nonce.to_string(),
            spool: Some(Arc::clone(&self.spool)),
            uplink: Some(self.uplink.clone()),
            repos: Arc::clone(&self.repos),
            progress_clock: Arc::clone(&self.progress_clock),
            workspaces: Arc::clone(&self.workspaces),
        }
    }

    pub fn running_ids(&self) -> Vec<String> {
        self.running.lock().expect("running lock").ids()
    }

    /// What a hello says the agent holds: the jobs it runs, and the results it keeps
    /// ([`shared::protocol::Hello::name_finished`]: at most so many named, and whether
    /// there are more). See [`jobs_held`].
    pub fn held_for_hello(&self) -> (Vec<String>, Vec<String>, bool) {
        jobs_held(|| self.running_ids(), || self.spool.all().into_iter().map(|(id, _)| id).collect())
    }

    /// Whether the agent holds work the edge waits on: jobs running, or results it has
    /// not acknowledged. The edge gives those up after its `LOST_AFTER_MS` away.
    pub fn holds_work(&self) -> bool {
        !self.running_ids().is_empty() || self.spool.keeps_any()
    }

    fn slots(&self, running: &Running) -> Slots {
        Slots { free: self.free_slots(running), received: running.received }
    }

    /// How many more jobs this agent takes now: none while its door is closed (a
    /// `--one-job` agent's once it has its job), else its capacity less what runs.
    fn free_slots(&self, running: &Running) -> u32 {
        if running.closed || running.cannot_start.is_some() {
            return 0;
        }
        self.cfg.capacity().saturating_sub(running.jobs.len() as u32)
    }

    /// A new connection to the edge, whose challenge was `challenge` and whose keys are
    /// `keys`: its orders are numbered, and its heartbeats counted, from zero on it, and
    /// what the agent sends from now on is MACed with its key.
    pub fn begin_session(&self, challenge: &str, keys: shared::link::LinkKeys) {
        let mut running = self.running.lock().expect("running lock");
        self.link.set(keys);
        running.received = 0;
        running.challenge = challenge.to_string();
        running.beats = 0;
        running.beat_acked = 0;
        running.not_taken_here.clear();
        self.unproven.store(0, SeqCst);
    }

    /// A frame of this connection the edge did not prove that the agent did not refuse by
    /// itself (one that does not read, a kind it does not know): counted with the refused
    /// ones.
    pub fn unproven_frame(&self) {
        self.unproven.fetch_add(1, SeqCst);
    }

    /// Acts on a frame from the edge on the current connection and says whether it proved
    /// the edge is there (protocol 11, "What the agent hears"): signed or MACed by it and
    /// new on this connection. Only such frames count as the edge heard — for the
    /// connection's silence bound and the away rule ([`crate::link::Link::heard`]) —
    /// so whoever writes into the connection cannot keep the agent "connected" to an edge
    /// that has given it up (hostile review rev26, 2). Frames not proven are counted
    /// ([`Agent::too_many_unproven`]), but for copies of the edge's own proven frames a
    /// real edge may send twice (an acknowledgement of a result sent twice): those are only
    /// not heard.
    pub fn on_edge_message(self: &Arc<Self>, msg: EdgeMessage) -> Heard {
        match msg {
            EdgeMessage::Job { envelope } => self.on_job(&envelope).into(),
            EdgeMessage::Cancel { envelope } => self.on_cancel(&envelope).into(),
            EdgeMessage::Login { envelope } => self.on_login(&envelope).into(),
            EdgeMessage::ResultAck { envelope } => self.on_result_ack(&envelope).into(),
            EdgeMessage::HeartbeatAck { envelope } => match self.on_heartbeat_ack(&envelope) {
                Some(beat) => Heard::Proven { beat: Some(beat) },
                None => Heard::Not,
            },
            EdgeMessage::Goodbye { code, reason } => {
                self.unproven_frame();
                Heard::Goodbye { code, reason }
            }
            EdgeMessage::Challenge { .. } | EdgeMessage::Welcome { .. } => Heard::Handshake,
            EdgeMessage::Unknown => {
                // A kind the agent does not know: protocol 11 sends none (a new one comes
                // with a new version), so it was made up on the path.
                self.unproven_frame();
                Heard::Not
            }
        }
    }

    /// The edge took heartbeat `beat` of this connection: its number, when the edge's MAC
    /// on this connection says so and it answers a beat made and not acknowledged yet.
    /// Any other ack is counted as not proven.
    fn on_heartbeat_ack(&self, envelope: &Tagged) -> Option<u64> {
        let key = self.link.edges()?;
        let ack = envelope.open::<BeatAck>(Domain::HeartbeatAck, &key);
        let mut running = self.running.lock().expect("running lock");
        let why = match ack {
            Ok(BeatAck { beat, .. }) if beat > running.beat_acked && beat <= running.beats => {
                running.beat_acked = beat;
                return Some(beat);
            }
            Ok(BeatAck { beat, .. }) => format!("beat {beat} was not made, or was answered already (last made {}, last answered {})", running.beats, running.beat_acked),
            Err(e) => e.to_string(),
        };
        drop(running);
        self.unproven_frame();
        warn!(agent_id = %self.cfg.agent_id, reason = %why, "a heartbeat ack the edge did not prove on this connection ignored");
        None
    }

    /// How many frames a real edge never sends came on this connection, when that is
    /// [`MAX_UNPROVEN_FRAMES`] or more: the connection is to end.
    pub fn too_many_unproven(&self) -> Option<u32> {
        Some(self.unproven.load(SeqCst)).filter(|&n| n >= MAX_UNPROVEN_FRAMES)
    }

    /// The mirror names for a hello, remembered as what the edge knows.
    pub fn mirrors_for_hello(&self) -> Vec<String> {
        let names = self.repos.mirror_names_from_disk();
        self.running.lock().expect("running lock").mirrors_told = names.clone();
        names
    }

    /// Tells the edge how many jobs it may send now (after each welcome): while the door
    /// is closed, or the agent cannot start jobs, with a heartbeat at once, which says so
    /// ([`Beat::stopping`], [`Beat::cannot_start`]).
    pub fn state_slots(&self) {
        let closed = {
            let running = self.running.lock().expect("running lock");
            let _ = self.uplink.send(AgentMessage::Credit { slots: self.slots(&running) });
            running.closed || running.cannot_start.is_some()
        };
        if closed {
            self.heartbeat();
        }
    }

    /// Queues a heartbeat: the login, the jobs held and the slots, as of one moment. The
    /// results kept are named as the hello names them — every one the spool keeps, sent on
    /// this connection yet or not ([`Beat::finished`]): the edge waits for a result dropped
    /// on the way rather than take its job for lost, and takes a job of this connection
    /// that a beat leaves out for lost.
    pub fn heartbeat(&self) {
        let oauth = self.oauth_report();
        let mut running = self.running.lock().expect("running lock");
        running.beats += 1;
        let beat = Beat {
            challenge: running.challenge.clone(),
            seq: running.beats,
            running: running.ids(),
            finished: Vec::new(),
            more_finished: false,
            capacity: self.cfg.capacity(),
            oauth,
            slots: self.slots(&running),
            claude_version: self.cli.current(),
            stopping: running.closed,
            cannot_start: running.cannot_start.as_ref().map(|held| held.cannot.why.clone()),
        };
        let (finished, more_finished) = shared::protocol::Hello::name_finished(self.spool.kept_ids());
        let beat = Beat { finished, more_finished, ..beat };
        self.link.seal_and_send(&self.uplink, |key| AgentMessage::heartbeat(&beat, key));
    }

    pub fn oauth_report(&self) -> OAuthReport {
        self.reporter.report()
    }

    /// Tells the edge an order was refused. The edge settles a job on a refusal that names
    /// it, so a name is given only when it is the edge's own: read from an order whose
    /// signature verified, for a job order (a cancel that fails changes nothing about its
    /// job), and not for a replay or an order out of its connection's sequence (the first
    /// copy of that order may have been taken already).
    /// Such a refusal is signed and bound to the order's nonce ([`Agent::reject`]).
    /// Anything else — garbage, a forgery, a tampered frame — names no job: whoever sent it
    /// cannot make the edge fail a job by it.
    fn refuse(&self, domain: Domain, order: Option<&OrderHeader>, refusal: &Refusal) {
        let named = match refusal {
            _ if domain != Domain::Job => None,
            // An order of another connection, or numbered at or below one taken, may be a
            // copy of one taken (its job running here): naming it would have the edge
            // settle a running job. The edge settles it by the hello, or by the heartbeat's
            // `received`, which is past it.
            Refusal::Signature(_) | Refusal::Replay { .. } | Refusal::OtherConnection | Refusal::OutOfOrder { .. } => None,
            Refusal::WrongAgent { .. } | Refusal::WrongPool { .. } | Refusal::Expired { .. } | Refusal::FromTheFuture { .. } => order,
        };
        // Logged only when it is a plain id: a log line is no place for arbitrary text.
        let logged = named.map(|h| h.job_id.as_str()).filter(|id| shared::ids::plain_id(id, shared::ids::MAX_JOB_ID)).unwrap_or("-");
        warn!(job_id = logged, agent_id = %self.cfg.agent_id, reason = %refusal, "order refused");
        match named {
            Some(header) => self.reject(header, &refusal.to_string(), false),
            None => {
                // One a real edge may have sent (an expired cancel, on a clock that is off)
                // counts as well: it is refused all the same, and a reconnect costs nothing.
                self.unproven_frame();
                let _ = self.uplink.send(AgentMessage::OrderRefused { reason: refusal.to_string() });
            }
        }
    }

    /// Tells the edge the job order `header` was refused and nothing ran, MACed and bound
    /// to the order: `retry` when the refusal was about this moment, not the order.
    fn reject(&self, header: &OrderHeader, reason: &str, retry: bool) {
        self.link.seal_and_send(&self.uplink, |key| AgentMessage::rejected(&header.job_id, &header.nonce, reason, retry, key));
    }

    /// An order whose signature verified, or `None` after refusing it (naming no order:
    /// nothing of an unverified frame is read).
    fn open<T: serde::de::DeserializeOwned>(&self, envelope: &Envelope, domain: Domain) -> Option<T> {
        match envelope.open(domain, &self.cfg.edge_public_key) {
            Ok(order) => Some(order),
            Err(e) => {
                self.refuse(domain, None, &Refusal::Signature(e));
                None
            }
        }
    }

    /// Whether a verified order is for this agent and pool, fresh, and new (its nonce
    /// never seen); refused otherwise.
    fn admit(&self, header: &OrderHeader, domain: Domain) -> bool {
        let now = crate::now_ms();
        let me = Audience { agent_id: &self.cfg.agent_id, pool: &self.cfg.pool };
        if let Err(refusal) = check_order(header, me, now) {
            self.refuse(domain, Some(header), &refusal);
            return false;
        }
        if !self.replay.lock().expect("replay lock").admit(&header.nonce, header.expires_at, now) {
            self.refuse(domain, Some(header), &Refusal::Replay { nonce: header.nonce.clone() });
            return false;
        }
        true
    }

    /// A verified order taken on its own connection only (`bind`, with the connection's
    /// challenge), for this agent and pool, fresh and new; refused otherwise.
    fn verify<T: serde::de::DeserializeOwned + shared::envelope::HasHeader>(
        &self,
        envelope: &Envelope,
        domain: Domain,
        bind: impl FnOnce(&T, &str) -> Result<(), Refusal>,
    ) -> Option<T> {
        let order: T = self.open(envelope, domain)?;
        let bound = bind(&order, &self.running.lock().expect("running lock").challenge);
        if let Err(refusal) = bound {
            self.refuse(domain, Some(order.header()), &refusal);
            return None;
        }
        self.admit(order.header(), domain).then_some(order)
    }

    /// A signed job arrived: verify it and start it, or refuse it. Nothing runs unless
    /// every check passes. An order for a job already here is answered with what the
    /// agent has of it (it runs: `Accepted`; it ended: its result), never dropped.
    /// Whether the edge proved the order new on this connection (its signature, this
    /// connection's challenge, the next number), whatever became of it then.
    pub fn on_job(self: &Arc<Self>, envelope: &Envelope) -> bool {
        let mut running = self.running.lock().expect("running lock");
        let Some(order) = self.open::<JobOrder>(envelope, Domain::Job) else { return false };
        // Taken on its own connection only, each number once and in order; counted once its
        // signature verified, whatever becomes of it then (see Slots) — a frame made up on
        // the path never counts, so it cannot have the edge settle a held order as arrived.
        if let Err(refusal) = order.bind(&running.challenge, running.received) {
            self.refuse(Domain::Job, Some(&order.header), &refusal);
            return false;
        }
        running.received = order.order_no;
        self.take_job(running, order);
        true
    }

    /// A job order proven new on this connection ([`Agent::on_job`], whose lock on the
    /// running jobs it holds): admitted and started, or refused.
    fn take_job(self: &Arc<Self>, mut running: std::sync::MutexGuard<'_, Running>, order: JobOrder) {
        if !self.admit(&order.header, Domain::Job) {
            return;
        }
        let job_id = order.header.job_id.clone();
        if !shared::ids::plain_id(&job_id, shared::ids::MAX_JOB_ID) {
            // Signed by the edge, so its own id, but not one for a log line or a file name.
            let reason = "the job id has characters the agent does not accept as a file name";
            warn!(agent_id = %self.cfg.agent_id, "order refused: a job id that is not a plain id");
            self.reject(&order.header, reason, false);
            return;
        }
        if !shared::placement::valid_caller(&order.caller) {
            // The edge names callers by plain names only; this one would reach a log line.
            warn!(job_id = %job_id, agent_id = %self.cfg.agent_id, "order refused: a caller name that is not a plain name");
            self.reject(&order.header, "the order's caller is not a plain name", false);
            return;
        }
        if running.jobs.contains_key(&job_id) {
            warn!(job_id = %job_id, agent_id = %self.cfg.agent_id, "sent a job that runs here already; telling the edge");
            let _ = self.uplink.send(AgentMessage::Accepted { job_id });
            return;
        }
        if let Some(result) = self.spool.get(&job_id) {
            warn!(job_id = %job_id, agent_id = %self.cfg.agent_id, "sent a job that ended here already; sending its result again");
            self.link.seal_and_send(&self.uplink, |key| AgentMessage::result_text(result.payload, key));
            return;
        }
        if self.free_slots(&running) == 0 {
            // Nothing wrong with the order itself: the edge may send it again later.
            self.reject(&order.header, "no free slot: the agent is full or stopping, or cannot start jobs now", true);
            return;
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        running.jobs.insert(job_id.clone(), Some(stop_tx));
        if self.cfg.one_job {
            // `--one-job`: this is the job; the slots say so from the next statement on,
            // and a heartbeat below tells the edge now that this agent takes no other.
            running.closed = true;
        }
        info!(job_id = %job_id, agent_id = %self.cfg.agent_id, timeout_ms = order.spec.timeout_ms, "job accepted");
        let _ = self.uplink.send(AgentMessage::Accepted { job_id: job_id.clone() });
        // Handed over while the lock is held, so a stop that closes the registry finds
        // every registered job's task in the queue.
        let agent = Arc::clone(self);
        let id = job_id.clone();
        let task = async move {
            let job_id = id;
            let ctx = agent.job_context(&order.header.nonce, &order.caller, order.caller_proven);
            // A bug in the runner must not leave the slot taken and the caller waiting:
            // a panicked job still ends, as a failure.
            let run = std::panic::AssertUnwindSafe(runner::run(&ctx, &job_id, order.spec, stop_rx)).catch_unwind();
            let (result, session, leftover) = match run.await {
                Ok(runner::Ended { cannot_start: Some(cannot), leftover, .. }) => {
                    agent.hand_back(&job_id, &order.header, cannot, leftover).await;
                    return;
                }
                Ok(ended) => (ended.result, ended.session, Some(ended.leftover)),
                Err(_) => {
                    error!(job_id = %job_id, agent_id = %agent.cfg.agent_id, "the job runner panicked");
                    (JobResult::failure(ErrorCode::InternalError, "the agent failed while running this job (see its log); retry", 0), None, None)
                }
            };
            // After the job's own progress (a second at most: `uplink::MAX_RESULT_WAIT_MS`): the edge
            // ignores what comes after a result, and the connection takes the agent's
            // words (the result) before progress.
            ctx.progress.sent(&ctx.link, &job_id, &ctx.order_nonce).await;
            agent.finish(&job_id, &ctx.order_nonce, &ctx.owner, result, session, leftover).await;
        };
        if self.jobs.send(Box::pin(task)).is_err() {
            // The serve loop is gone: the agent is exiting.
            running.jobs.remove(&job_id);
        }
        let ids = running.ids();
        let closed = running.closed;
        drop(running);
        if closed {
            self.heartbeat();
        }
        self.status.running(ids);
    }

    /// A job ended: remember its login outcome, keep its result — bound to the order it
    /// answers, MACed with each connection's key as it goes — until the edge has it, free
    /// its slot, and tell the edge. The result is sent first and written to disk while it
    /// travels (see [`crate::spool`]); the job's workspace is removed after that write, as
    /// is the upkeep of the sessions' log. The record of whose its Claude session is
    /// ([`crate::sessions`]) is appended before the result goes. All of these writes are
    /// one trip off the async threads ([`crate::trips`]): each trip costs a wake-up of a
    /// trip thread and another of the runtime's, and the record and the result's write
    /// were two.
    /// `session` is the one the agent started Claude in ([`runner::Ended::session`]), not
    /// the result's.
    async fn finish(self: &Arc<Self>, job_id: &str, order_nonce: &str, owner: &Owner, result: JobResult, session: Option<String>, leftover: Option<runner::Leftover>) {
        match (result.success, result.error_code) {
            (false, Some(ErrorCode::RunnerOauthError)) => self.reporter.auth_failed(true),
            (true, _) => self.reporter.run_succeeded(),
            _ => {}
        }
        // Whose the session is, decided in memory now: the result may reach the caller,
        // and the caller's next job this agent, before the record is written.
        let session = session.filter(|session| self.claimed(job_id, session, owner));
        let stored = StoredResult::of(&ResultReport { job_id: job_id.to_string(), order_nonce: order_nonce.to_string(), result });
        // With no session to record, the result goes from here, before the trip; with one,
        // from the trip, once the record is appended.
        let unsent = match session {
            None => {
                self.send_result(job_id, stored);
                None
            }
            Some(_) => Some(stored),
        };
        // The job's task lasts until its result is on disk: a drain waits for it.
        let (agent, owner, id) = (Arc::clone(self), owner.clone(), job_id.to_string());
        let written = crate::trips::run(move || {
            if let Some(session) = &session {
                // Appended before the result goes (one write, no sync: a kill of the agent
                // loses nothing written): an agent killed once the result was sent lost the
                // session's resume for a caller who had the result. A failure of it, a
                // panic included (a bug), costs the resume, never the result.
                let recorded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.sessions.record(session, &owner, &id)))
                    .unwrap_or_else(|_| Err(std::io::Error::other("the write panicked (a bug: see the agent's log)")));
                if let Err(e) = recorded {
                    warn!(
                        job_id = %id, agent_id = %agent.cfg.agent_id, error = %e,
                        "could not record whose the job's Claude session is, so it cannot be resumed after the agent restarts: free space in DATA_DIR or fix its permissions"
                    );
                }
            }
            if let Some(stored) = unsent {
                agent.send_result(&id, stored);
            }
            let written = agent.spool.write_sent(&id);
            if session.is_some() {
                agent.sessions.tidy(crate::now_ms());
            }
            if let Some(leftover) = leftover {
                leftover.clean_up_now();
            }
            written
        })
        .await;
        if let Err(e) = written.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))) {
            error!(
                job_id, agent_id = %self.cfg.agent_id, error = %e, held = self.spool.held(),
                "could not write the result to the spool: it is kept in memory and sent until the edge has it, but \
                 a restart of the agent now would lose it; free space in DATA_DIR or fix its permissions"
            );
        }
    }

    /// Sends a job's result ([`Agent::finish`]): kept in the spool's memory, MACed, queued
    /// with the statement of the agent's slots (and of its mirrors, when they changed), the
    /// job's slot freed. Called from the runtime or a trip thread ([`crate::trips`]).
    fn send_result(&self, job_id: &str, stored: StoredResult) {
        // Kept before it is MACed: a reconnect in between sends it from the spool, under
        // the new connection's key.
        self.spool.sending(job_id, &stored);
        // MACed outside the lock; queued under it unless a reconnect came in between (the
        // spool sends it on the new connection then).
        let report = self.link.seal(|key| AgentMessage::result_text(stored.payload, key));
        let (ids, mirrors) = {
            let mut running = self.running.lock().expect("running lock");
            running.jobs.remove(job_id);
            let mirrors = self.repos.mirror_names();
            if let Some(report) = report {
                self.link.send(&self.uplink, report);
            }
            if mirrors != running.mirrors_told {
                // The edge routes a repository's jobs to agents holding its mirror.
                running.mirrors_told = mirrors.clone();
                let _ = self.uplink.send(AgentMessage::Mirrors { names: mirrors.clone() });
            }
            let _ = self.uplink.send(AgentMessage::Credit { slots: self.slots(&running) });
            (running.ids(), mirrors)
        };
        self.status.job_ended(ids, mirrors);
    }

    /// A job the agent could not start for a want of its own ([`runner::CannotStart`]: a
    /// full disk, its process limit) goes back to the edge unstarted, to run on another
    /// agent or later. First the agent stops taking work and says why — a heartbeat, read
    /// by the edge before the refusal behind it — so the job is not sent straight back
    /// here, round and round (every job it was sent ended at once, a failure, while it
    /// looked healthy); then it refuses the job's order, to be sent again. A started record
    /// written for it goes: its Claude never ran, and a restart must not report it lost.
    async fn hand_back(self: &Arc<Self>, job_id: &str, header: &OrderHeader, cannot: runner::CannotStart, leftover: runner::Leftover) {
        let (spool, id) = (Arc::clone(&self.spool), job_id.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            spool.unstart(&id);
            leftover.clean_up_now();
        })
        .await;
        let why = cannot.why.clone();
        {
            let mut running = self.running.lock().expect("running lock");
            if running.cannot_start.is_none() {
                warn!(agent_id = %self.cfg.agent_id, reason = %why, "the agent cannot start jobs: it takes no work until it can");
            }
            running.cannot_start = Some(Held { cannot, checks: 0 });
            let _ = self.uplink.send(AgentMessage::Credit { slots: self.slots(&running) });
        }
        // The job is still named running in this beat: one it left out the edge would
        // settle by itself (sent again at once, or lost had it heard `Started`) before the
        // refusal behind it says why.
        self.heartbeat();
        warn!(job_id, agent_id = %self.cfg.agent_id, reason = %why, "job handed back to the edge unstarted");
        self.reject(header, &format!("the agent could not start the job: {why}"), true);
        let ids = {
            let mut running = self.running.lock().expect("running lock");
            running.jobs.remove(job_id);
            running.ids()
        };
        self.status.running(ids);
    }

    /// At each heartbeat while the agent cannot start jobs: whether it can again. A want
    /// of disk ends once a write into the folders every job needs (its workspace's,
    /// the started records', and the mirrors' when a job on a repository found them
    /// taking none) succeeds; any other after a heartbeat interval. Then the agent offers
    /// its slots again (the heartbeat after this says so).
    pub async fn check_start(&self) {
        let (disk, repos) = {
            let mut running = self.running.lock().expect("running lock");
            let Some(held) = running.cannot_start.as_mut() else { return };
            held.checks += 1;
            if !held.cannot.disk && held.checks < 2 {
                return;
            }
            (held.cannot.disk, held.cannot.repos)
        };
        if disk {
            // The mirrors' folder too when it took no write (a job on a repository).
            let repos = repos.then(|| self.repos.root());
            if let Err(e) = runner::job_folders_take_writes(&self.workspaces, Some(&self.spool), repos).await {
                debug!(agent_id = %self.cfg.agent_id, error = %e, "DATA_DIR still takes no writes: no work yet");
                return;
            }
        }
        let mut running = self.running.lock().expect("running lock");
        if running.cannot_start.take().is_some() {
            info!(agent_id = %self.cfg.agent_id, "the agent can start jobs again: it takes work");
            let _ = self.uplink.send(AgentMessage::Credit { slots: self.slots(&running) });
        }
    }

    /// A signed login order: start `claude auth login`, or pass it the code.
    /// Whether it was the edge's, new on this connection ([`Agent::verify`]).
    pub fn on_login(self: &Arc<Self>, envelope: &Envelope) -> bool {
        let Some(order) = self.verify(envelope, Domain::Login, LoginOrder::bind) else { return false };
        self.relogin.on_order(self, order);
        true
    }

    /// The edge stored a result: it is forgotten here, once the edge's MAC on this
    /// connection says so (an acknowledgement made up on the path would lose it for good).
    /// Any other is ignored, and the result goes out again after the next reconnect.
    /// One the edge did not take ([`shared::protocol::Acknowledgement::not_taken`]) is
    /// kept for the edge that issued its job: see [`Agent::not_taken`].
    /// Whether it was news from the edge: MACed by it on this connection, for a result
    /// still kept (a taken one), or not answered so on this connection yet (not taken). A
    /// copy of one (the path plays it back, or the edge answers a result sent twice) is
    /// not news: the edge is not heard in it.
    pub fn on_result_ack(&self, envelope: &Tagged) -> bool {
        let Some(key) = self.link.edges() else { return false };
        match envelope.open::<shared::protocol::Acknowledgement>(Domain::ResultAck, &key) {
            Ok(ack) if ack.agent_id == self.cfg.agent_id && ack.not_taken => {
                let new = self.running.lock().expect("running lock").not_taken_here.insert(ack.job_id.clone());
                self.not_taken(&ack.job_id, crate::now_ms());
                new
            }
            Ok(ack) if ack.agent_id == self.cfg.agent_id => {
                let kept = self.spool.has(&ack.job_id);
                self.spool.remove(&ack.job_id);
                kept
            }
            Ok(_) => {
                warn!(agent_id = %self.cfg.agent_id, "an acknowledgement for another agent ignored");
                false
            }
            Err(e) => {
                // Not the edge's on this connection: made up or copied on the path.
                self.unproven_frame();
                warn!(agent_id = %self.cfg.agent_id, error = %e, "an acknowledgement not MACed by the edge on this connection ignored; its result stays");
                false
            }
        }
    }

    /// The edge of this connection did not take `job_id`'s result: it never issued that job
    /// (another edge did: the agent moved to another edge or pool, its `EDGE_URL` changed,
    /// a tunnel flipped), or not that order of it, or the job is another agent's. The
    /// result stays in the spool — named in heartbeats and hellos as every kept result is,
    /// sent no more on this connection — and the next connection sends it again,
    /// up to [`NOT_TAKEN_KEPT_MS`] after the first such answer (its time kept with the
    /// result, [`Spool::not_taken`], so counted across restarts); then it is given up.
    fn not_taken(&self, job_id: &str, now: shared::Millis) {
        let (agent_id, edge, pool) = (&self.cfg.agent_id, &self.cfg.connect_url, &self.cfg.pool);
        let Some((since, first)) = self.spool.not_taken(job_id, now) else {
            debug!(job_id, agent_id = %agent_id, "the edge did not take a result no longer kept (acknowledged meanwhile)");
            return;
        };
        let first = (now.saturating_sub(since) < NOT_TAKEN_KEPT_MS).then_some(first);
        match first {
            Some(true) => warn!(
                job_id, agent_id = %agent_id, edge = %edge, pool = %pool, kept_ms = NOT_TAKEN_KEPT_MS,
                "the edge did not take this job's result: it did not issue the job (another edge or pool did?); kept, and sent again on the next connection"
            ),
            Some(false) => debug!(job_id, agent_id = %agent_id, edge = %edge, pool = %pool, "the edge did not take this job's result again; kept"),
            None => {
                self.spool.remove(job_id);
                warn!(
                    job_id, agent_id = %agent_id, edge = %edge, pool = %pool, kept_ms = NOT_TAKEN_KEPT_MS,
                    "no edge took this job's result since it was first not taken: given up (the edge that issued the job ends it lost)"
                );
            }
        }
    }

    /// Whether it was the edge's, new on this connection ([`Agent::verify`]).
    pub fn on_cancel(&self, envelope: &Envelope) -> bool {
        let Some(order) = self.verify(envelope, Domain::Cancel, CancelOrder::bind) else { return false };
        // The id stays listed as running until the job task ends and removes it.
        let handle = self.running.lock().expect("running lock").jobs.get_mut(&order.header.job_id).and_then(Option::take);
        match handle {
            Some(stop) => {
                info!(job_id = %order.header.job_id, agent_id = %self.cfg.agent_id, reason = %order.reason, "cancelling job");
                let _ = stop.send(Stop::Cancelled(order.reason));
            }
            None => info!(job_id = %order.header.job_id, agent_id = %self.cfg.agent_id, "cancel for a job not running here"),
        }
        true
    }

    /// Whether the session job `job_id` ended in is its owner's (made theirs in memory now;
    /// its record is then to be written), saying in the log what did not go as asked.
    fn claimed(&self, job_id: &str, session: &str, owner: &Owner) -> bool {
        let agent_id = &self.cfg.agent_id;
        match self.sessions.ended(session, owner, crate::now_ms()) {
            Claim::Owned => true,
            Claim::Theirs(first) => {
                warn!(job_id, agent_id = %agent_id, caller = %owner.caller, owner = %first.caller, "the job ended in a session recorded for another caller; it stays theirs");
                false
            }
            Claim::NotPlain => {
                warn!(job_id, agent_id = %agent_id, "the job's session id is not a plain id (not Claude's): not recorded, it cannot be resumed");
                false
            }
        }
    }

    /// No new job starts from now on; the running ones go on.
    pub fn close(&self) {
        let mut running = self.running.lock().expect("running lock");
        running.closed = true;
        // No free slot from now on, and the agent stopping: the edge hears both at once.
        let _ = self.uplink.send(AgentMessage::Credit { slots: self.slots(&running) });
        drop(running);
        self.heartbeat();
    }

    /// Stops every running job (the agent is shutting down); their results are spooled.
    pub fn stop_all(&self) {
        let mut running = self.running.lock().expect("running lock");
        for stop in running.jobs.values_mut().filter_map(Option::take) {
            let _ = stop.send(Stop::AgentStopping);
        }
    }
}

/// The jobs running (`running`) and the results kept (`kept`), for a hello, with the
/// results named as [`shared::protocol::Hello::name_finished`] names them. The running
/// jobs are read first: a job ends by having its result kept, then leaving the running
/// ones ([`Agent::finish`]), so one that ends between the two reads is named in both,
/// never in neither — the edge takes a job a hello does not name for lost.
fn jobs_held(running: impl FnOnce() -> Vec<String>, kept: impl FnOnce() -> Vec<String>) -> (Vec<String>, Vec<String>, bool) {
    let running = running();
    let (finished, more_finished) = shared::protocol::Hello::name_finished(kept());
    (running, finished, more_finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello names every job the agent holds, and the edge takes a job it does not name
    /// for lost. A job ends by having its result kept, then leaving the running ones
    /// ([`Agent::finish`]): a job that ended between the hello's two reads — results
    /// first, then the running jobs — was in neither, and the edge ended it lost, then
    /// acknowledged its result (sent just after the hello) as a duplicate: a job that
    /// succeeded, reported lost to its caller.
    #[test]
    fn a_job_ending_while_a_hello_is_made_is_named_in_it() {
        // The job "j" runs; it ends (kept, then no longer running) right after the first read.
        let (kept, running) = (std::cell::RefCell::new(vec![]), std::cell::RefCell::new(vec!["j".to_string()]));
        let reads = std::cell::Cell::new(0);
        let read = |of: &std::cell::RefCell<Vec<String>>| {
            let now = of.borrow().clone();
            if reads.replace(reads.get() + 1) == 0 {
                kept.borrow_mut().push("j".to_string());
                running.borrow_mut().clear();
            }
            now
        };
        let (running_named, finished, more) = jobs_held(|| read(&running), || read(&kept));
        assert!(!more);
        assert!(running_named.contains(&"j".to_string()) || finished.contains(&"j".to_string()), "named in neither: {running_named:?} {finished:?}");
    }

    /// An agent killed after a job's result went to the edge but before the record of whose
    /// the job's Claude session is was written lost that session's resume: the caller had
    /// the result, and its next job naming the session was refused by the restarted agent
    /// (no record). The record is appended (no sync: a kill of the process does not lose
    /// it) before the result goes: when the result is on the uplink, the record is in
    /// the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jobs_session_is_recorded_before_its_result_goes() {
        let dir = std::env::temp_dir().join(format!("cr-agent-finish-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let local = crate::config::LocalArgs {
            claude_bin: "claude".into(),
            login: crate::config::ClaudeLoginArgs { claude_config_dir: None, dir: crate::config::DataDirArgs { data_dir: Some(dir.clone()) } },
            claude_model: None,
            job_env_allow: String::new(),
        };
        let (agent, mut queues) = Agent::new(AgentConfig::local_only(&local, "spark".into())).unwrap();
        let keys = shared::link::LinkKeys { agent_to_edge: shared::link::MacKey::from_bytes([1; 32]), edge_to_agent: shared::link::MacKey::from_bytes([2; 32]) };
        agent.begin_session("challenge", keys);
        let owner = Owner { caller: "default".into(), pool: shared::ids::DEFAULT_POOL.into(), proven: Some(false) };
        let session = "0f0e0d0c-0b0a-4908-8706-050403020100";
        let result = JobResult { session_id: Some(session.into()), ..JobResult::failure(ErrorCode::InternalError, "ended", 1) };
        let finishing = agent.finish("j1", "j1:1", &owner, result, Some(session.into()), None);
        tokio::pin!(finishing);
        let mut done = false;
        loop {
            tokio::select! {
                biased;
                Some(out) = queues.uplink.next() => if matches!(out.msg, AgentMessage::Result { .. }) { break },
                _ = &mut finishing, if !done => done = true,
            }
        }
        let log = std::fs::read_to_string(dir.join("sessions.log")).unwrap_or_default();
        assert!(log.contains(session), "the result went before the session's record was written: {log:?}");
        if !done {
            finishing.await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Hostile review s38: an edge that never issued a job (the agent had moved to it from
    /// the edge that did) acknowledged its result, and the agent dropped it for good — the
    /// issuing edge ended the job `lost`. An answer "not taken" keeps it in the spool (its
    /// heartbeats and hellos name it still); the next connection sends it again; after
    /// [`NOT_TAKEN_KEPT_MS`] it is given up. An acknowledgement still drops it.
    #[test]
    fn a_result_the_edge_did_not_take_is_kept_for_another_and_given_up_in_time() {
        let dir = std::env::temp_dir().join(format!("cr-agent-not-taken-{}", std::process::id()));
        let (agent, mut queues) = agent_with_claude(&dir, "exit 0\n");
        let edge_key = shared::link::MacKey::from_bytes([2; 32]);
        let keep = |job: &str| {
            let report = ResultReport { job_id: job.into(), order_nonce: format!("{job}:1"), result: JobResult::default() };
            agent.spool.put(job, &StoredResult::of(&report)).unwrap();
        };
        let answer = |job: &str, taken: bool| {
            let msg = if taken { shared::protocol::EdgeMessage::result_ack(job, "spark", &edge_key) } else { shared::protocol::EdgeMessage::result_not_taken(job, "spark", &edge_key) };
            let shared::protocol::EdgeMessage::ResultAck { envelope } = msg else { unreachable!() };
            agent.on_result_ack(&envelope);
        };
        let named = |queues: &mut Queues| {
            while queues.uplink.try_next().is_some() {}
            agent.heartbeat();
            let Some(AgentMessage::Heartbeat { envelope }) = queues.uplink.try_next().map(|out| out.msg) else { panic!("a heartbeat") };
            envelope.open::<Beat>(Domain::Heartbeat, &shared::link::MacKey::from_bytes([1; 32])).unwrap().finished
        };
        keep("of-e1");
        keep("of-e2");
        assert_eq!(named(&mut queues), vec!["of-e1", "of-e2"]);
        answer("of-e1", false);
        assert!(agent.spool.get("of-e1").is_some(), "a result the edge did not take was dropped");
        assert_eq!(named(&mut queues), vec!["of-e1", "of-e2"], "still named as kept");
        assert_eq!(agent.held_for_hello().1, vec!["of-e1", "of-e2"], "named in the next hello");
        answer("of-e2", true);
        assert!(agent.spool.get("of-e2").is_none(), "an acknowledged result is kept");
        // Another connection: sent again, and not taken again, within the time kept.
        let first = agent.spool.get("of-e1").and_then(|r| r.not_taken).expect("the first answer's time kept with the result");
        agent.not_taken("of-e1", first + NOT_TAKEN_KEPT_MS - 1);
        assert!(agent.spool.get("of-e1").is_some());
        agent.not_taken("of-e1", first + NOT_TAKEN_KEPT_MS);
        assert!(agent.spool.get("of-e1").is_none(), "a result no edge takes is kept for ever");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Carried from s38: the 24 h a result no edge takes is kept were counted in the agent's
    /// memory from the first "not taken" after each start, so an agent restarted within
    /// them (daily, or crash-looping) kept such a result, sent again on every connection,
    /// for ever. The first answer's time is kept with the result in the spool: after a
    /// restart the 24 h run on from it — for a result in its job's slot and for one in a
    /// spool file alike.
    #[test]
    fn a_result_not_taken_is_given_up_24_h_after_the_first_answer_across_restarts() {
        let dir = std::env::temp_dir().join(format!("cr-agent-not-taken-restart-{}", std::process::id()));
        let (agent, queues) = agent_with_claude(&dir, "exit 0\n");
        let report = |job: &str| StoredResult::of(&ResultReport { job_id: job.into(), order_nonce: format!("{job}:1"), result: JobResult::default() });
        // In its job's slot (started, then finished) and in a spool file (no slot).
        agent.spool.started("in-slot", "in-slot:1").unwrap();
        agent.spool.put("in-slot", &report("in-slot")).unwrap();
        agent.spool.put("in-file", &report("in-file")).unwrap();
        let first = 1_000_000;
        for job in ["in-slot", "in-file"] {
            agent.not_taken(job, first);
        }
        drop((agent, queues));
        let (agent, queues) = agent_in(&dir);
        for job in ["in-slot", "in-file"] {
            assert!(agent.spool.get(job).is_some(), "{job} lost in the restart");
            agent.not_taken(job, first + NOT_TAKEN_KEPT_MS - 1);
            assert!(agent.spool.get(job).is_some(), "{job} given up before its time");
        }
        drop((agent, queues));
        let (agent, _queues) = agent_in(&dir);
        for job in ["in-slot", "in-file"] {
            agent.not_taken(job, first + NOT_TAKEN_KEPT_MS);
            assert!(agent.spool.get(job).is_none(), "{job}, not taken for 24 h across restarts, still kept");
        }
        assert!(agent.spool.all().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review rev20, finding 3: an agent that cannot make a job's workspace (its disk full)
    /// hands the job back unstarted — after a heartbeat saying it cannot start jobs, with
    /// no free slot — and takes work again only once a write there succeeds, at a
    /// heartbeat. (Here the workspaces' folder is a file: no workspace can be made in it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_without_room_for_its_workspace_goes_back_and_the_agent_holds_until_there_is() {
        let dir = std::env::temp_dir().join(format!("cr-agent-no-room-{}", std::process::id()));
        let (agent, mut queues) = agent_with_claude(&dir, "exit 0\n");
        let workspaces = agent.workspaces.to_path_buf();
        std::fs::remove_dir_all(&workspaces).unwrap();
        std::fs::write(&workspaces, "").unwrap();
        let key = shared::link::MacKey::from_bytes([1; 32]);
        let (tx, rx) = oneshot::channel();
        let ctx = agent.job_context("j1:1", "default", None);
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "x", "timeout_ms": 10000})).unwrap();
        let ended = runner::run(&ctx, "j1", spec, rx).await;
        drop(tx);
        let cannot = ended.cannot_start.clone().expect("a job with no room for its workspace is handed back, not failed");
        assert!(cannot.disk && cannot.why.contains("free space on"), "{cannot:?}");
        agent.running.lock().unwrap().jobs.insert("j1".into(), None);
        let header = OrderHeader::new("j1", Audience { agent_id: "spark", pool: shared::ids::DEFAULT_POOL }, crate::now_ms(), "j1:1".into());
        while queues.uplink.try_next().is_some() {}
        agent.hand_back("j1", &header, cannot, ended.leftover).await;
        let said: Vec<AgentMessage> = std::iter::from_fn(|| queues.uplink.try_next().map(|out| out.msg)).collect();
        // The beat still names the job running: the refusal, not the beat, settles it.
        let held = |beat: Beat| beat.cannot_start.is_some() && beat.running == ["j1"];
        let beat = said.iter().position(|m| matches!(m, AgentMessage::Heartbeat { envelope } if held(envelope.open::<Beat>(Domain::Heartbeat, &key).unwrap())));
        let refusal = said.iter().position(|m| matches!(m, AgentMessage::Rejected { envelope } if envelope.open::<shared::protocol::Rejection>(Domain::Rejection, &key).unwrap().retry));
        assert!(matches!((beat, refusal), (Some(b), Some(r)) if b < r), "the agent must say it cannot start jobs before it hands one back: {said:?}");
        assert_eq!(agent.slots(&agent.running.lock().unwrap()).free, 0);
        assert!(agent.running_ids().is_empty());
        // Still no room at the next heartbeat; room at the one after.
        agent.check_start().await;
        assert!(agent.running.lock().unwrap().cannot_start.is_some(), "takes work while its disk takes no writes");
        std::fs::remove_file(&workspaces).unwrap();
        std::fs::create_dir(&workspaces).unwrap();
        agent.check_start().await;
        assert!(agent.running.lock().unwrap().cannot_start.is_none(), "still held once its disk takes writes");
        assert_eq!(agent.slots(&agent.running.lock().unwrap()).free, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review rev20, finding 4: no room for a process (the process limit) holds the agent
    /// back one heartbeat interval at least, two at most — no probe says when it ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_without_room_for_a_process_holds_one_heartbeat() {
        let dir = std::env::temp_dir().join(format!("cr-agent-no-process-{}", std::process::id()));
        let (agent, _queues) = agent_with_claude(&dir, "exit 0\n");
        let cannot = runner::CannotStart { why: "process limit".into(), disk: false, repos: false };
        agent.running.lock().unwrap().cannot_start = Some(Held { cannot, checks: 0 });
        agent.check_start().await;
        assert!(agent.running.lock().unwrap().cannot_start.is_some(), "released at the first heartbeat, which may come at once");
        agent.check_start().await;
        assert!(agent.running.lock().unwrap().cannot_start.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An agent in a fresh `dir` (its config and DATA_DIR there) whose Claude is the shell
    /// `script` (after reading its prompt), in a session with fixed keys.
    pub(super) fn agent_with_claude(dir: &std::path::Path, script: &str) -> (Arc<Agent>, Queues) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let claude = dir.join("claude.sh");
        std::fs::write(&claude, format!("#!/bin/sh\ncat >/dev/null\n{script}")).unwrap();
        std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
        agent_in(dir)
    }

    /// The agent of [`agent_with_claude`]'s `dir` started (again) on what it holds.
    fn agent_in(dir: &std::path::Path) -> (Arc<Agent>, Queues) {
        let claude = dir.join("claude.sh");
        let local = crate::config::LocalArgs {
            claude_bin: claude.to_string_lossy().into_owned(),
            login: crate::config::ClaudeLoginArgs { claude_config_dir: Some(dir.join("cfg")), dir: crate::config::DataDirArgs { data_dir: Some(dir.join("data")) } },
            claude_model: None,
            job_env_allow: String::new(),
        };
        let mut cfg = AgentConfig::local_only(&local, "spark".into());
        // The same key at every start, as an agent's: what it sealed on its disk is its own.
        cfg.signing_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let (agent, queues) = Agent::new(cfg).unwrap();
        let keys = shared::link::LinkKeys { agent_to_edge: shared::link::MacKey::from_bytes([1; 32]), edge_to_agent: shared::link::MacKey::from_bytes([2; 32]) };
        agent.begin_session("challenge", keys);
        (agent, queues)
    }

    /// Runs a script as Claude for one job through the runner and `finish`, as the serve
    /// loop does; returns the job's error code and the usage window then reported.
    async fn usage_after(name: &str, script: &str) -> (Option<ErrorCode>, Option<shared::usage::UsageWindow>) {
        let dir = std::env::temp_dir().join(format!("cr-agent-usage-{name}-{}", std::process::id()));
        let (agent, _queues) = agent_with_claude(&dir, script);
        let ctx = agent.job_context("j:1", "default", Some(false));
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 60000})).unwrap();
        let (_stop, stop_rx) = oneshot::channel();
        let ended = runner::run(&ctx, "j", spec, stop_rx).await;
        let code = ended.result.error_code;
        agent.finish("j", "j:1", &ctx.owner, ended.result.clone(), None, None).await;
        ended.leftover.clean_up().await;
        let usage = agent.oauth_report().usage;
        let _ = std::fs::remove_dir_all(&dir);
        (code, usage)
    }

    /// An agent cut off from the edge while a job it accepted was checking out its
    /// repository (or waiting at the refresh gate) started the job once that was done, long
    /// after the edge had ended it `lost` and told its `/execute` caller to fall back: the
    /// task ran twice. A job starts only while the last frame the edge proved it read was
    /// written less than LOST_AFTER_MS ago, connected or not; else its start is held until
    /// the edge proves it is there in a frame written after the check, and ends "not
    /// started" at its deadline (rev30-1: a hop kept the agent "connected" without the edge,
    /// and the old rule, asked only while disconnected, let the job start).
    #[tokio::test(flavor = "current_thread")]
    async fn a_job_is_held_while_nothing_the_edge_proved_is_fresh_and_starts_once_it_is() {
        let dir = std::env::temp_dir().join(format!("cr-agent-away-{}", std::process::id()));
        let ran = dir.join("ran");
        let (agent, _queues) = agent_with_claude(&dir, &format!("touch '{}'", ran.display()));
        let run = |agent: Arc<Agent>, timeout_ms: u64| async move {
            let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": timeout_ms})).unwrap();
            let ctx = agent.job_context("j:1", "default", Some(false));
            let (_stop, stop_rx) = oneshot::channel();
            let ended = runner::run(&ctx, "j", spec, stop_rx).await;
            ended.leftover.clean_up().await;
            ended.result
        };
        // Connected as far as the agent knows (no connection ends here), but the last frame
        // the edge proved was its welcome's hello, two seconds ago: past LOST_AFTER_MS 1 s.
        let two_s_ago = crate::boot_clock::BootInstant::now().checked_sub(std::time::Duration::from_secs(2)).unwrap();
        agent.link.welcomed(Some(1_000), Vec::new(), two_s_ago);
        let result = run(Arc::clone(&agent), 1_500).await;
        assert!(!ran.exists(), "Claude was started with nothing the edge proved younger than LOST_AFTER_MS");
        assert_eq!((result.error_code, result.retryable), (Some(ErrorCode::RunnerLost), Some(true)), "{result:?}");
        let said = result.error.unwrap_or_default();
        assert!(said.starts_with("not started: this agent heard nothing from the edge in the 1000 ms (LOST_AFTER_MS)") && said.ends_with("run it again"), "{said}");
        // Held, then the edge answers a beat written after the check: the job starts.
        let job = tokio::spawn(run(Arc::clone(&agent), 60_000));
        while !job.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            agent.link.heard_at(crate::boot_clock::BootInstant::now());
        }
        let result = job.await.unwrap();
        assert!(ran.exists(), "the job held for the edge did not start once it answered: {result:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review rev39, finding 3, before the prompt: a drain that ends a job held at its start
    /// (here the start rule; the checkout and the refresh gate take the same path) says
    /// Claude never ran and may be run again, not that it was stopped while running.
    #[tokio::test(flavor = "current_thread")]
    async fn a_drain_before_claude_starts_says_it_never_ran() {
        let dir = std::env::temp_dir().join(format!("cr-agent-drain-held-{}", std::process::id()));
        let ran = dir.join("ran");
        let (agent, _queues) = agent_with_claude(&dir, &format!("touch '{}'", ran.display()));
        let two_s_ago = crate::boot_clock::BootInstant::now().checked_sub(std::time::Duration::from_secs(2)).unwrap();
        agent.link.welcomed(Some(1_000), Vec::new(), two_s_ago);
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 300_000})).unwrap();
        let ctx = agent.job_context("j:1", "default", Some(false));
        let (drain, stop_rx) = oneshot::channel();
        drain.send(Stop::AgentStopping).unwrap();
        let ended = runner::run(&ctx, "j", spec, stop_rx).await;
        ended.leftover.clean_up().await;
        let result = ended.result;
        assert!(!ran.exists(), "Claude was started by a job held at its start");
        assert_eq!((result.error_code, result.retryable), (Some(ErrorCode::RunnerLost), Some(true)), "{result:?}");
        let said = result.error.unwrap_or_default();
        assert!(!said.contains("while Claude was running") && said.contains("never ran"), "{said}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job's deadline counts a suspend, as the edge's timeout does. Spark slept with Claude
    /// running; the edge timed the job out `timeout_ms` (and its margin) of real time after
    /// it sent it and told its caller TIMEOUT; on resume the deadline, on the monotonic
    /// clock, lay the rest of the job's awake time ahead, and Claude ran on — its changes, a
    /// push, landing long after the caller was told the job was over. Here the machine
    /// sleeps past the deadline once Claude runs: the job ends TIMEOUT on resume, its Claude
    /// stopped, within a fraction of its awake time (before the fix: all of it).
    #[tokio::test(flavor = "current_thread")]
    async fn a_job_whose_deadline_passed_in_a_suspend_times_out_on_resume() {
        use crate::boot_clock::tests::Machine;
        let dir = std::env::temp_dir().join(format!("cr-agent-suspended-{}", std::process::id()));
        let ran = dir.join("ran");
        let (agent, _queues) = agent_with_claude(&dir, &format!("touch '{}'\nexec sleep 600", ran.display()));
        agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
        let timeout = std::time::Duration::from_secs(30);
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": timeout.as_millis() as u64})).unwrap();
        let ctx = agent.job_context("j:1", "default", Some(false));
        let (_stop, stop_rx) = oneshot::channel();
        let awake = std::time::Instant::now();
        let mut machine = None;
        let suspend = async {
            while !ran.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            // Claude runs: the machine sleeps for longer than the job's whole time.
            let m = Machine::install_now();
            m.suspend(2 * timeout);
            machine = Some(m);
        };
        let (ended, ()) = tokio::join!(runner::run(&ctx, "j", spec, stop_rx), suspend);
        let awake = awake.elapsed();
        drop(machine);
        ended.leftover.clean_up().await;
        let result = ended.result;
        assert_eq!((result.error_code, result.success), (Some(ErrorCode::Timeout), false), "{result:?}");
        assert!(awake < timeout, "the job ran on after the suspend for its whole awake time ({awake:?}): its deadline did not count the sleep");
        assert!(result.duration_ms >= 2 * timeout.as_millis() as u64, "its duration does not count the sleep: {result:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// rev37-1: a job whose deadline passed before the refresh gate let it go (the machine
    /// slept through its checkout, and the gate opened on resume) is not started: the gate
    /// and the deadline were both ready, the select picked at random, and when the gate won
    /// Claude was spawned and given its prompt after the edge had told its caller TIMEOUT
    /// (12 of 20 in the review), the error saying it ran and was stopped. A `timeout_ms` of
    /// 0 puts the deadline at the job's start, so it has passed when the gate opens; each
    /// job here met the race, so the test fails unless every one ends as never started.
    #[tokio::test(flavor = "current_thread")]
    async fn a_job_whose_deadline_passed_before_the_gate_opened_never_starts_claude() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cr-agent-late-start-{}", std::process::id()));
        let (spawned, prompted) = (dir.join("spawned"), dir.join("prompted"));
        let (agent, queues) = agent_with_claude(&dir, "");
        let script = format!("#!/bin/sh\ntouch '{}'\ncat >/dev/null\ntouch '{}'\nexec sleep 600\n", spawned.display(), prompted.display());
        std::fs::write(dir.join("claude.sh"), script).unwrap();
        std::fs::set_permissions(dir.join("claude.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
        let jobs = 16;
        for i in 0..jobs {
            let job_id = format!("j{i}");
            let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 0})).unwrap();
            let ctx = agent.job_context(&format!("{job_id}:1"), "default", Some(false));
            let (_stop, stop_rx) = oneshot::channel();
            let ended = runner::run(&ctx, &job_id, spec, stop_rx).await;
            ended.leftover.clean_up().await;
            let result = ended.result;
            // process::run returns once Claude is dead: whatever it did, it has done.
            assert!(!spawned.exists() && !prompted.exists(), "job {i}: Claude was spawned (prompted: {}) after the job's deadline: {result:?}", prompted.exists());
            assert_eq!((result.error_code, result.retryable, result.success), (Some(ErrorCode::Timeout), Some(true), false), "job {i}: {result:?}");
            let said = result.error.clone().unwrap_or_default();
            assert!(said.starts_with("not started: timeout_ms (0 ms) passed before Claude was started") && said.contains("Claude never ran"), "job {i}: {said}");
            assert!(result.session_id.is_none(), "job {i}: a session of a Claude that never ran: {result:?}");
            assert!(ended.cannot_start.is_none(), "job {i}: handed back as if the agent could not start jobs");
        }
        // A restart finds no started record of any: none is reported run and lost.
        drop((agent, queues));
        let (agent, _queues) = agent_in(&dir);
        for i in 0..jobs {
            assert!(agent.spool.get(&format!("j{i}")).is_none(), "job {i}: its started record outlived it");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The last look right before the prompt, on the thread that wrote the started record,
    /// checks the deadline too: one that passed after the start rule let the job go (the
    /// record's write, or a suspend during it, took the rest) kills Claude unprompted, clears
    /// its record, and the job ends TIMEOUT, never started. The window is forced: this
    /// thread's machine stands still before the deadline (booted a second ago), and the
    /// record's thread (a trip thread, `crate::trips`), on which no test machine is
    /// installed, reads the system's boot clock, long past it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_deadline_that_passed_after_the_start_rule_let_the_job_go_is_seen_before_the_prompt() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cr-agent-late-prompt-{}", std::process::id()));
        let prompted = dir.join("prompted");
        let (agent, queues) = agent_with_claude(&dir, "");
        // Its prompt read, Claude ends at once: this thread's clock, standing still, never
        // reaches the deadline to stop it.
        std::fs::write(dir.join("claude.sh"), format!("#!/bin/sh\ncat >/dev/null\ntouch '{}'\n", prompted.display())).unwrap();
        std::fs::set_permissions(dir.join("claude.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let machine = crate::boot_clock::tests::Machine::install_up(std::time::Duration::from_secs(1));
        // Read on another thread, the system's clock is past this thread's deadline.
        assert!(crate::boot_clock::BootInstant::now() + std::time::Duration::from_secs(1) < std::thread::spawn(crate::boot_clock::BootInstant::now).join().unwrap(), "the system's boot clock is not past this thread's deadline");
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 100})).unwrap();
        let ctx = agent.job_context("j:1", "default", Some(false));
        let (_stop, stop_rx) = oneshot::channel();
        let ended = runner::run(&ctx, "j", spec, stop_rx).await;
        drop(machine);
        ended.leftover.clean_up().await;
        let result = ended.result;
        assert!(!prompted.exists(), "Claude got its prompt after the job's deadline: {result:?}");
        assert_eq!((result.error_code, result.retryable), (Some(ErrorCode::Timeout), Some(true)), "{result:?}");
        let said = result.error.unwrap_or_default();
        assert!(said.starts_with("not started: timeout_ms (100 ms) passed before Claude was started"), "{said}");
        assert!(ended.cannot_start.is_none(), "handed back as if the agent could not start jobs");
        // A restart finds no started record of it: nothing reports it run and lost.
        drop((ctx, agent, queues));
        let (agent, _queues) = agent_in(&dir);
        assert!(agent.spool.get("j").is_none(), "its started record outlived it: reported lost at the restart");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A started record refused for the job's own order (a nonce too long to record), not
    /// for want of the agent's disk: the job fails alone, unstarted, and the agent keeps
    /// taking work. Every record failure held the agent back and told the operator to free
    /// disk space (final read of session 40).
    #[tokio::test(flavor = "current_thread")]
    async fn a_record_refused_for_the_jobs_own_order_does_not_hold_the_agent_back() {
        let dir = std::env::temp_dir().join(format!("cr-agent-record-own-{}", std::process::id()));
        let ran = dir.join("ran");
        let (agent, _queues) = agent_with_claude(&dir, &format!("touch '{}'", ran.display()));
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 60000})).unwrap();
        agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
        let nonce = format!("j:{}", "9".repeat(64 * 1024));
        let ctx = agent.job_context(&nonce, "default", Some(false));
        let (_stop, stop_rx) = oneshot::channel();
        let ended = runner::run(&ctx, "j", spec, stop_rx).await;
        ended.leftover.clean_up().await;
        assert!(!ran.exists(), "Claude got its prompt with no started record");
        assert!(ended.cannot_start.is_none(), "held the agent back for a fault of the job's own");
        assert!(ended.result.error.unwrap_or_default().contains("could not record that the job starts"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// rev31-1: a started record the records refuse is the agent's want whatever the error:
    /// the job goes back unstarted and the agent takes work again only once the records
    /// take the write a job's start makes. `spoil` makes them refuse it, `mend` undoes that.
    async fn a_refused_record_holds_the_agent_until(name: &str, spoil: impl Fn(&std::path::Path), mend: impl Fn(&std::path::Path)) {
        let dir = std::env::temp_dir().join(format!("cr-agent-record-{name}-{}", std::process::id()));
        let ran = dir.join("ran");
        let (agent, _queues) = agent_with_claude(&dir, &format!("touch '{}'", ran.display()));
        agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
        // A job's run, finished as the serve loop finishes one that was not handed back:
        // its result in its slot until the edge acknowledges it.
        let run = |agent: Arc<Agent>, job: &'static str| async move {
            let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 60000})).unwrap();
            let nonce = format!("{job}:1");
            let ctx = agent.job_context(&nonce, "default", Some(false));
            let (_stop, stop_rx) = oneshot::channel();
            let ended = runner::run(&ctx, job, spec, stop_rx).await;
            ended.leftover.clean_up().await;
            if ended.cannot_start.is_none() {
                agent.finish(job, &nonce, &ctx.owner, ended.result.clone(), None, None).await;
            }
            (ended.result, ended.cannot_start)
        };
        let records = dir.join("data/records");
        // A job first: the slot's record file is made, kept open, and holds its result,
        // which the next job's start moves to a spool file.
        let (result, cannot) = run(Arc::clone(&agent), "j1").await;
        assert!(ran.exists() && cannot.is_none(), "{result:?}");
        std::fs::remove_file(&ran).unwrap();
        spoil(&records);
        let (result, cannot) = run(Arc::clone(&agent), "j2").await;
        assert!(!ran.exists(), "Claude got its prompt with no started record");
        let cannot = cannot.unwrap_or_else(|| panic!("failed alone, the agent taking the next job the same: {result:?}"));
        assert!(cannot.disk && cannot.why.contains("could not record that the job starts"), "{cannot:?}");
        agent.running.lock().unwrap().cannot_start = Some(Held { cannot, checks: 0 });
        agent.check_start().await;
        assert!(agent.running.lock().unwrap().cannot_start.is_some(), "takes work while the records refuse a job's start");
        mend(&records);
        agent.check_start().await;
        assert!(agent.running.lock().unwrap().cannot_start.is_none(), "still held once the records take writes");
        let (result, cannot) = run(Arc::clone(&agent), "j3").await;
        assert!(ran.exists() && cannot.is_none(), "{result:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The records' folder removed (by a job: the agent's user can): ENOENT at the record
    /// failed every job alone, 500 INTERNAL_ERROR, while the agent took work (rev31-1, on
    /// 25058c7). Made again, the agent takes work.
    #[tokio::test(flavor = "current_thread")]
    async fn a_records_folder_removed_holds_the_agent_back_until_it_is_made_again() {
        a_refused_record_holds_the_agent_until("gone", |records| std::fs::remove_dir_all(records).unwrap(), |records| std::fs::create_dir(records).unwrap()).await;
    }

    /// A folder put in the place of the slot's record file (by a job): EISDIR at its open,
    /// while the records' folder takes a new file. Asked whether the folder took a write,
    /// the agent failed every job alone while it took work (rev31-1's black hole, left so
    /// by 1b5e3bc); held until that, it would take work again at once and the job go
    /// round. Moved out of the way, the agent takes work.
    #[tokio::test(flavor = "current_thread")]
    async fn a_folder_in_a_slot_records_place_holds_the_agent_back_until_it_is_moved() {
        let slot = |records: &std::path::Path| records.join("0");
        a_refused_record_holds_the_agent_until(
            "folder",
            |records| {
                std::fs::remove_file(slot(records)).unwrap();
                std::fs::create_dir(slot(records)).unwrap();
            },
            |records| std::fs::remove_dir(slot(records)).unwrap(),
        )
        .await;
    }

    /// A leftover of the job (sent again) that cannot be removed — EBUSY here, a folder in
    /// it a mount point; EPERM alike — is no want of the agent's disk: the job fails alone,
    /// unstarted, and the agent keeps taking work. Every error but the few the workspace
    /// code wrapped as the job's was taken for the disk's (the rule was inverted): the job
    /// went back and the agent held itself back — until its next write test, which
    /// succeeded at once, so the job went round (final read of session 40). The mount is in
    /// a mount namespace of this thread's own (root: CAP_SYS_ADMIN), gone with it.
    #[test]
    fn a_leftover_that_cannot_be_removed_fails_its_job_alone() {
        let dir = std::env::temp_dir().join(format!("cr-agent-leftover-{}", std::process::id()));
        let in_namespace = dir.clone();
        std::thread::spawn(move || {
            let dir = in_namespace;
            // SAFETY: unshare and mount with NUL-terminated strings; this thread alone moves
            // to the new namespace (CLONE_NEWNS unshares its file system information too).
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    eprintln!("skipped: no mount namespace of its own ({}): run as root", std::io::Error::last_os_error());
                    return;
                }
                let private = libc::mount(c"none".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null());
                assert_eq!(private, 0, "{}", std::io::Error::last_os_error());
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let ran = dir.join("ran");
                let (agent, _queues) = agent_with_claude(&dir, &format!("touch '{}'", ran.display()));
                let held = agent.workspaces.join("j").join("held");
                std::fs::create_dir_all(&held).unwrap();
                let target = std::ffi::CString::new(held.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: as above.
                let mounted = unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, c"size=64k".as_ptr().cast()) };
                assert_eq!(mounted, 0, "{}", std::io::Error::last_os_error());
                agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
                let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 60000})).unwrap();
                let ctx = agent.job_context("j:2", "default", Some(false));
                let (_stop, stop_rx) = oneshot::channel();
                let ended = runner::run(&ctx, "j", spec, stop_rx).await;
                // SAFETY: as above.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
                ended.leftover.clean_up().await;
                assert!(!ran.exists(), "Claude ran in a workspace that was not fresh");
                assert!(ended.cannot_start.is_none(), "held the agent back for a leftover of the job's own: {:?}", ended.cannot_start);
                let error = ended.result.error.unwrap_or_default();
                assert!(error.contains("could not prepare the job's workspace") && error.contains("busy"), "{error}");
            });
        })
        .join()
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The window after that check: nothing the edge proved is fresh any more by the time
    /// the job's started record is written and Claude spawned. Checked again right before
    /// the prompt, the job does not start: its Claude is killed unprompted and the started
    /// record cleared (a restart does not report the job lost as if it ran); the start is
    /// held as at the first check, ending "not started" at its deadline — or, once the edge
    /// proves it is there again, Claude starts anew and gets its prompt.
    #[tokio::test(flavor = "current_thread")]
    async fn a_job_whose_edge_went_stale_between_its_check_and_its_prompt_is_not_started_then() {
        let dir = std::env::temp_dir().join(format!("cr-agent-away-late-{}", std::process::id()));
        let ran = dir.join("ran");
        let (agent, queues) = agent_with_claude(&dir, &format!("touch '{}'", ran.display()));
        let spec = |timeout_ms: u64| -> shared::job::JobSpec { serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": timeout_ms})).unwrap() };
        agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
        // The check before the started record passes; the next finds nothing fresh.
        agent.link.away_at_check(1);
        let ctx = agent.job_context("j:1", "default", Some(false));
        let (_stop, stop_rx) = oneshot::channel();
        let ended = runner::run(&ctx, "j", spec(1_500), stop_rx).await;
        ended.leftover.clean_up().await;
        let result = ended.result;
        assert!(!ran.exists(), "Claude got its prompt with nothing the edge proved fresh");
        assert!(ended.cannot_start.is_none(), "handed back as if the agent could not start jobs");
        assert_eq!((result.error_code, result.retryable), (Some(ErrorCode::RunnerLost), Some(true)), "{result:?}");
        let said = result.error.unwrap_or_default();
        assert!(said.starts_with("not started: this agent heard nothing from the edge") && said.ends_with("run it again"), "{said}");
        // A restart finds no started record of it: nothing reports it run and lost.
        drop((ctx, agent, queues));
        let (agent, _queues) = agent_in(&dir);
        assert!(agent.spool.get("j").is_none(), "its started record outlived it: reported lost at the restart");
        // Again, and the edge answers while the start is held: Claude starts anew.
        agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
        agent.link.away_at_check(1);
        let job = {
            let agent = Arc::clone(&agent);
            tokio::spawn(async move {
                let ctx = agent.job_context("j:2", "default", Some(false));
                let (_stop, stop_rx) = oneshot::channel();
                let ended = runner::run(&ctx, "j", spec(60_000), stop_rx).await;
                ended.leftover.clean_up().await;
                ended.result
            })
        };
        while !job.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            agent.link.heard_at(crate::boot_clock::BootInstant::now());
        }
        let result = job.await.unwrap();
        assert!(ran.exists(), "the held job did not start once the edge answered: {result:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Jobs accepted on one connection, then the link cut past LOST_AFTER_MS by the agent's
    /// count, then a reconnection before their checkout or refresh gate let them start.
    /// The welcome says which the edge gave up (ended `lost`, its `/execute` caller told to
    /// fall back): that one never starts, although the agent is connected again and the
    /// edge's stray-cancel for it is not read yet — started, the task would run twice. The
    /// other the edge took over: it starts. rev29-2: the agent judged by its own count,
    /// which starts at its last frame heard, before the edge saw the loss, and after a blip
    /// the edge had not given up it ended both "not started: the edge had given the job up".
    #[tokio::test(flavor = "current_thread")]
    async fn once_back_only_a_job_the_welcome_names_is_not_started() {
        let dir = std::env::temp_dir().join(format!("cr-agent-away-back-{}", std::process::id()));
        let ran = dir.join("ran");
        let (agent, _queues) = agent_with_claude(&dir, &format!("touch '{}'", ran.display()));
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 60000})).unwrap();
        let run = |ctx: JobContext, id: &'static str, spec: shared::job::JobSpec| async move {
            let (_stop, stop_rx) = oneshot::channel();
            let ended = runner::run(&ctx, id, spec, stop_rx).await;
            ended.leftover.clean_up().await;
            ended.result
        };
        agent.link.welcomed(Some(60_000), Vec::new(), crate::boot_clock::BootInstant::now());
        let (gone, kept) = (agent.job_context("gone:1", "default", Some(false)), agent.job_context("kept:1", "default", Some(false)));
        agent.link.welcomed(Some(60_000), vec!["gone".into()], crate::boot_clock::BootInstant::now());
        let result = run(gone, "gone", spec.clone()).await;
        assert!(!ran.exists(), "Claude was started after the edge gave the job up, once the agent was back");
        assert_eq!((result.error_code, result.retryable), (Some(ErrorCode::RunnerLost), Some(true)), "{result:?}");
        let said = result.error.unwrap_or_default();
        assert!(said.starts_with("not started: the edge had given the job up while this agent was away (its welcome said so") && said.ends_with("run it again if it did not end"), "{said}");
        // The job the welcome does not name: the edge still has it for this agent.
        let result = run(kept, "kept", spec).await;
        assert!(ran.exists(), "a job the edge took over on the new connection did not start: {result:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The agent's frames as the connection takes them, each heartbeat read as the usage
    /// status it carries ("beat <status>"), a result as "result", others by kind.
    fn taken(uplink: &mut crate::uplink::Receivers) -> Vec<String> {
        let key = shared::link::MacKey::from_bytes([1; 32]);
        std::iter::from_fn(|| uplink.try_next())
            .filter_map(|out| match out.msg {
                AgentMessage::Heartbeat { envelope } => {
                    let beat: Beat = envelope.open(Domain::Heartbeat, &key).unwrap();
                    Some(format!("beat {:?}", beat.oauth.usage.map(|u| u.status)))
                }
                AgentMessage::Result { .. } => Some("result".into()),
                AgentMessage::Credit { .. } => Some("credit".into()),
                _ => None,
            })
            .collect()
    }

    /// A run that ended on the usage limit told the reporter of the used-up window, which
    /// only woke the connection's loop: the loop queued a heartbeat when it got to it, and
    /// now and then took the run's result first. The caller had its answer while the edge
    /// still took the window for open, and its next job, sent on that answer, reached a
    /// Claude whose window was used up (CI's contract usage-window test, on both hosts). A
    /// change of the login or the usage window now queues its heartbeat as it happens,
    /// ahead of every frame queued after it — whatever changed it (here the run, then the
    /// operator's `--clear-usage`).
    #[tokio::test(flavor = "current_thread")]
    async fn a_change_of_the_login_reaches_the_edge_before_any_frame_queued_after_it() {
        let dir = std::env::temp_dir().join(format!("cr-agent-told-{}", std::process::id()));
        let reset_s = crate::now_ms() / 1000 + 3600;
        let rejected = format!(r#"{{"type":"rate_limit_event","rate_limit_info":{{"status":"rejected","resetsAt":{reset_s},"rateLimitType":"five_hour"}}}}"#);
        let result = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"5-hour limit reached"}"#;
        let (agent, mut queues) = agent_with_claude(&dir, &format!("echo '{rejected}'\necho '{result}'\nexit 1\n"));
        let ctx = agent.job_context("j:1", "default", Some(false));
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 60000})).unwrap();
        let (_stop, stop_rx) = oneshot::channel();
        let ended = runner::run(&ctx, "j", spec, stop_rx).await;
        assert_eq!(ended.result.error_code, Some(ErrorCode::UsageLimit));
        agent.finish("j", "j:1", &ctx.owner, ended.result.clone(), None, None).await;
        ended.leftover.clean_up().await;
        let frames = taken(&mut queues.uplink);
        let _ = std::fs::remove_dir_all(&dir);
        let result_at = frames.iter().position(|f| f == "result").expect("the result is queued");
        assert!(frames[..result_at].iter().any(|f| f == "beat Some(Rejected)"), "the result goes before the edge hears of the used-up window: {frames:?}");
        assert!(agent.reporter.clear_usage());
        agent.state_slots();
        let frames = taken(&mut queues.uplink);
        assert_eq!(frames.first().map(String::as_str), Some("beat Some(Allowed)"), "the slots go before the edge hears the window is open: {frames:?}");
    }

    /// A job could write into Claude's stdout (`/proc/<pid>/fd/1`, the same user, while it
    /// was a pipe; since it is a socket, only a process that can trace Claude can: at
    /// `kernel.yama.ptrace_scope` 0 any process of the agent's user). One line of it — a
    /// rejected `rate_limit_event` resetting in 30 days — then Claude killed so that no
    /// run succeeded, marked the agent's window used up for 8 days: the edge sent it
    /// nothing, across restarts (hostile review rev2). A rejected window is believed only
    /// when the run ended on the usage limit. The job could also write the CLI's 429
    /// result after the line and then kill Claude (hostile review, session 38): a run
    /// ends on the usage limit only when Claude exited by itself, not by a signal.
    #[tokio::test(flavor = "current_thread")]
    async fn a_rejected_window_is_believed_only_from_a_run_that_ended_on_it() {
        let reset_s = crate::now_ms() / 1000 + 30 * 86_400;
        let rejected = format!(r#"{{"type":"rate_limit_event","rate_limit_info":{{"status":"rejected","resetsAt":{reset_s},"rateLimitType":"seven_day"}}}}"#);
        // Forged: the line, then Claude gone without its result.
        let (code, usage) = usage_after("forged", &format!("echo '{rejected}'\nexit 1\n")).await;
        assert_eq!(code, Some(ErrorCode::ClaudeError));
        let now = crate::now_ms();
        assert!(usage.as_ref().is_none_or(|u| !u.blocks(now)), "a forged line blocked the agent: {usage:?}");
        // As the CLI ends a run on a used-up window: the line, then its 429 result.
        let result = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"Weekly limit reached"}"#;
        let before = crate::now_ms();
        let (code, usage) = usage_after("ended", &format!("echo '{rejected}'\necho '{result}'\nexit 1\n")).await;
        assert_eq!(code, Some(ErrorCode::UsageLimit));
        let until = usage.as_ref().and_then(|u| u.blocked_until()).expect("the used-up window is held");
        assert!(until > crate::now_ms() && until <= crate::now_ms() + shared::usage::MAX_RESET_MS, "held until {until}, {} h after it was seen", (until - before) / 3_600_000);
        // Forged whole: both lines written into Claude's stdout, then Claude killed (SIGKILL)
        // before its own end. Only a Claude that exited by itself ended on the usage limit.
        let (code, usage) = usage_after("killed", &format!("echo '{rejected}'\necho '{result}'\nkill -9 $$\n")).await;
        assert_eq!(code, Some(ErrorCode::ClaudeError), "a killed Claude's result taken as the usage limit");
        assert!(usage.as_ref().is_none_or(|u| !u.blocks(crate::now_ms())), "forged lines and a kill blocked the agent: {usage:?}");
        // Or sent SIGTERM, which the CLI catches, exiting 143 with no result of its own.
        let (code, usage) = usage_after("terminated", &format!("trap 'exit 143' TERM\necho '{rejected}'\necho '{result}'\nkill -TERM $$\n")).await;
        assert_eq!(code, Some(ErrorCode::ClaudeError), "a Claude ended by SIGTERM: its result taken as the usage limit");
        assert!(usage.as_ref().is_none_or(|u| !u.blocks(crate::now_ms())), "forged lines and a SIGTERM blocked the agent: {usage:?}");
        // A warning is reported mid-run as before, whatever the run's end.
        let warning = r#"{"type":"rate_limit_event","rate_limit_info":{"status":"allowed_warning","resetsAt":1796150108,"utilization":0.91}}"#;
        let (_, usage) = usage_after("warning", &format!("echo '{warning}'\nexit 1\n")).await;
        assert_eq!(usage.map(|u| (u.status, u.utilization)), Some((shared::usage::UsageStatus::AllowedWarning, Some(0.91))));
    }

    /// The agent hears the edge only in what the edge proved on the connection, new there:
    /// a hop that let the handshake through, cut the edge off and wrote `{"type":"junk"}`
    /// into the agent's side kept it "connected" (every frame was heard), so it never
    /// applied the away rule and a job it held started after the edge had ended it `lost`
    /// (hostile review rev26, 2). Each frame the edge did not prove counts, and at
    /// MAX_UNPROVEN_FRAMES the connection is to end; copies of the edge's own acks are
    /// only not heard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_frames_the_edge_proved_new_on_the_connection_are_heard_and_the_rest_are_counted() {
        let dir = std::env::temp_dir().join(format!("cr-agent-heard-{}", std::process::id()));
        let (agent, _queues) = agent_with_claude(&dir, "exit 0");
        // The edge→agent key `agent_in` set for this connection, and another connection's.
        let (edge, other) = (shared::link::MacKey::from_bytes([2; 32]), shared::link::MacKey::from_bytes([3; 32]));
        let ack = |beat: u64, key: &shared::link::MacKey| EdgeMessage::heartbeat_ack(beat, 0, key);
        let decode = |text: &str| shared::protocol::decode::<EdgeMessage>(text).unwrap();
        agent.heartbeat();
        agent.heartbeat();
        let mut counted = 0;
        let mut not_heard = |heard: Heard, count: bool| {
            assert_eq!(heard, Heard::Not);
            counted += u32::from(count);
            assert_eq!(agent.too_many_unproven(), None, "{counted} counted");
        };
        // The edge's ack of beat 1, MACed on this connection: heard, naming its beat.
        assert_eq!(agent.on_edge_message(ack(1, &edge)), Heard::Proven { beat: Some(1) });
        // Played back; one for a beat not made; one MACed with another key: counted.
        not_heard(agent.on_edge_message(ack(1, &edge)), true);
        not_heard(agent.on_edge_message(ack(3, &edge)), true);
        not_heard(agent.on_edge_message(ack(2, &other)), true);
        // A kind the agent does not know (the review's junk): counted.
        not_heard(agent.on_edge_message(decode(r#"{"type":"junk"}"#)), true);
        // A result's ack, MACed on this connection, for a result no longer kept (a copy, or
        // the edge answering a result sent twice): not heard, not counted.
        not_heard(agent.on_edge_message(EdgeMessage::result_ack("gone", "spark", &edge)), false);
        // Made up: an order whose signature fails.
        let order = Envelope { payload: "{}".into(), sig: String::new() };
        not_heard(agent.on_edge_message(EdgeMessage::Job { envelope: order.clone() }), true);
        not_heard(agent.on_edge_message(EdgeMessage::Cancel { envelope: order }), true);
        assert_eq!(agent.on_edge_message(ack(2, &edge)), Heard::Proven { beat: Some(2) }, "heard at its next beat all the same");
        // A goodbye is plain: not heard, counted (the seventh).
        let goodbye = agent.on_edge_message(EdgeMessage::Goodbye { code: 4005, reason: "x".into() });
        assert!(matches!(goodbye, Heard::Goodbye { code: 4005, .. }), "{goodbye:?}");
        assert_eq!((counted, agent.too_many_unproven()), (6, None));
        // The eighth (a frame that does not read, counted by the connection): it is to end.
        agent.unproven_frame();
        assert_eq!(agent.too_many_unproven(), Some(MAX_UNPROVEN_FRAMES));
        // A new connection counts from zero, and its beats from 1.
        agent.begin_session("c2", shared::link::LinkKeys { agent_to_edge: shared::link::MacKey::from_bytes([1; 32]), edge_to_agent: other.clone() });
        assert_eq!(agent.too_many_unproven(), None);
        agent.heartbeat();
        assert_eq!(agent.on_edge_message(ack(1, &edge)), Heard::Not, "the last connection's key");
        assert_eq!(agent.on_edge_message(ack(1, &other)), Heard::Proven { beat: Some(1) });
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod flood_tests {
    use super::*;

    /// A job whose Claude prints `lines` assistant lines of about 1 KiB, as fast as it can.
    fn flooding(dir: &std::path::Path, lines: usize) -> (Arc<Agent>, Queues) {
        let pad = "x".repeat(1000);
        let script = format!("yes '{{\"type\":\"assistant\",\"m\":\"{pad}\"}}' | head -n {lines}\necho '{{\"type\":\"result\",\"subtype\":\"success\",\"result\":\"ok\"}}'\n");
        super::tests::agent_with_claude(dir, &script)
    }

    /// A job printing faster than the link to the edge carries (a slow uplink, a half-open
    /// link whose writes block for up to two heartbeat intervals, or a job writing into
    /// Claude's stdout on purpose) had every byte of it queued on the unbounded uplink:
    /// 60 MiB here, with nobody reading — the agent's memory grew with the job's output
    /// until the kernel killed it, and every job with it (hostile review 2, 1). What waits
    /// unsent is now held to the job's budget; the rest is dropped, and one marker says
    /// how many events were, so the events and the marker account for every line.
    #[tokio::test(flavor = "current_thread")]
    async fn a_flooding_jobs_unsent_progress_is_held_to_its_budget_and_the_rest_counted() {
        let dir = std::env::temp_dir().join(format!("cr-flood-a-{}", std::process::id()));
        let lines = 60_000;
        let (agent, queues) = flooding(&dir, lines);
        let ctx = agent.job_context("j1:1", "default", Some(false));
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 600000})).unwrap();
        let (_stop, stop_rx) = oneshot::channel();
        let ended = runner::run(&ctx, "j1", spec, stop_rx).await;
        let mut uplink = queues.uplink;
        let (mut bytes, mut seqs, mut dropped, mut markers) = (0usize, Vec::new(), 0u64, 0);
        while let Some(out) = uplink.try_next() {
            if let AgentMessage::Event { envelope } = &out.msg {
                bytes += envelope.payload.len();
                let report: shared::protocol::ProgressReport = envelope.open(Domain::Progress, &shared::link::MacKey::from_bytes([1; 32])).unwrap();
                for e in report.events {
                    if e.event["type"] == "progress_dropped" {
                        markers += 1;
                        dropped += e.event["events"].as_u64().unwrap();
                    }
                    seqs.push(e.seq);
                }
            }
        }
        ended.leftover.clean_up().await;
        let _ = std::fs::remove_dir_all(&dir);
        assert!(bytes <= agent_core::progress::JOB_BACKLOG_BYTES, "{} MiB of one job's progress queued unsent", bytes >> 20);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "numbered strictly up");
        assert!(markers >= 1, "no marker says events were dropped");
        // Each marker stands in for the events it counts (it takes the last one's number).
        assert_eq!(seqs.len() as u64 - markers + dropped, lines as u64 + 1, "every line is an event sent or one counted dropped");
    }

    /// The agent's other words — heartbeats, acceptances, results, statements of its slots —
    /// were queued behind a flooding job's progress in one FIFO: on a slow link every other
    /// job's result and the heartbeats that keep the connection waited for the backlog to
    /// go. The connection now takes them first.
    #[tokio::test(flavor = "current_thread")]
    async fn heartbeats_and_results_go_before_a_progress_backlog() {
        let dir = std::env::temp_dir().join(format!("cr-flood-b-{}", std::process::id()));
        let (agent, mut queues) = flooding(&dir, 20_000);
        let ctx = agent.job_context("j1:1", "default", Some(false));
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({"prompt": "hi", "timeout_ms": 600000})).unwrap();
        let (_stop, stop_rx) = oneshot::channel();
        let ended = runner::run(&ctx, "j1", spec, stop_rx).await;
        agent.heartbeat();
        // The job's start was told as it began, before its progress and this beat.
        let mut next = queues.uplink.try_next().unwrap().msg;
        while matches!(next, AgentMessage::Started { .. }) {
            next = queues.uplink.try_next().unwrap().msg;
        }
        ended.leftover.clean_up().await;
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(next, AgentMessage::Heartbeat { .. }), "the connection's next frame: {}", &next.to_text()[..40]);
    }
}
