//! The agent's shared state and its handling of edge orders: verifying a job (signature,
//! audience, expiry, replay), starting it, cancelling it, and keeping its result until
//! the edge has it. Connections come and go ([`crate::connection`]); this outlives them.

use crate::config::AgentConfig;
use crate::oauth::{AuthHealth, Login, RefreshGate};
use crate::replay::ReplayGuard;
use crate::spool::{safe_id, Spool};
use crate::status::StatusFile;
use shared::envelope::{open_order, Domain, Envelope, Refusal};
use shared::oauth::OAuthReport;
use shared::protocol::{AgentMessage, CancelOrder, JobOrder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub struct Agent {
    pub cfg: AgentConfig,
    pub login: Login,
    pub gate: RefreshGate,
    pub auth: AuthHealth,
    pub spool: Spool,
    pub status: StatusFile,
    /// The Claude Code CLI's version, for the edge's `/health`.
    pub cli: crate::cli_version::CliVersion,
    replay: Mutex<ReplayGuard>,
    /// Running jobs and the handle that cancels each.
    running: Mutex<HashMap<String, Option<oneshot::Sender<crate::job::Stop>>>>,
    /// Messages for the edge; the current connection sends them, or drops them while
    /// there is none (results are spooled, credits recomputed, events are only progress).
    pub uplink: mpsc::UnboundedSender<AgentMessage>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> anyhow::Result<(Arc<Agent>, mpsc::UnboundedReceiver<AgentMessage>)> {
        let spool = Spool::open(cfg.data_dir.join("spool")).map_err(|e| {
            anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", cfg.data_dir.display())
        })?;
        let replay = ReplayGuard::open(cfg.data_dir.join("seen-orders.log"));
        let login = Login::new(cfg.claude_config_dir.as_deref());
        let (uplink, rx) = mpsc::unbounded_channel();
        let status = StatusFile::new(cfg.data_dir.join("status.json"), &cfg.agent_id, &cfg.connect_url);
        let agent = Agent {
            status,
            cli: Default::default(),
            cfg,
            login,
            gate: RefreshGate::default(),
            auth: AuthHealth::default(),
            spool,
            replay: Mutex::new(replay),
            running: Mutex::new(HashMap::new()),
            uplink,
        };
        Ok((Arc::new(agent), rx))
    }

    pub fn running_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.running.lock().expect("running lock").keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn free_slots(&self) -> u32 {
        self.cfg.max_concurrent_jobs.saturating_sub(self.running.lock().expect("running lock").len() as u32)
    }

    pub fn oauth_report(&self) -> OAuthReport {
        let mut report = self.login.read(crate::now_ms()).report;
        report.auth_failed = self.auth.failed();
        report
    }

    fn refuse(&self, envelope: &Envelope, refusal: &Refusal) {
        // The job id is read without trusting it, only so the edge can settle the job.
        let job_id = serde_json::from_str::<serde_json::Value>(&envelope.payload)
            .ok()
            .and_then(|v| v.get("job_id").and_then(|j| j.as_str()).map(str::to_string));
        warn!(job_id = job_id.as_deref().unwrap_or("?"), agent_id = %self.cfg.agent_id, reason = %refusal, "order refused");
        let _ = self.uplink.send(AgentMessage::Rejected { job_id, reason: refusal.to_string(), retry: false });
    }

    fn verify<T: serde::de::DeserializeOwned + shared::envelope::HasHeader>(&self, envelope: &Envelope, domain: Domain) -> Option<T> {
        let now = crate::now_ms();
        let order: T = match open_order(envelope, domain, &self.cfg.edge_public_key, &self.cfg.agent_id, now) {
            Ok(o) => o,
            Err(refusal) => {
                self.refuse(envelope, &refusal);
                return None;
            }
        };
        let header = order.header();
        if !self.replay.lock().expect("replay lock").admit(&header.nonce, header.expires_at, now) {
            self.refuse(envelope, &Refusal::Replay { nonce: header.nonce.clone() });
            return None;
        }
        Some(order)
    }

    /// A signed job arrived: verify it and start it, or refuse it. Nothing runs unless
    /// every check passes.
    pub fn on_job(self: &Arc<Self>, envelope: &Envelope) {
        let Some(order) = self.verify::<JobOrder>(envelope, Domain::Job) else { return };
        let job_id = order.header.job_id.clone();
        if !safe_id(&job_id) {
            let reason = "the job id has characters the agent does not accept as a file name".into();
            let _ = self.uplink.send(AgentMessage::Rejected { job_id: Some(job_id), reason, retry: false });
            return;
        }
        let (cancel_tx, cancel_rx) = oneshot::channel();
        {
            let mut running = self.running.lock().expect("running lock");
            if running.contains_key(&job_id) || self.spool.has(&job_id) {
                warn!(job_id = %job_id, "job already here; not starting it twice");
                return;
            }
            if running.len() as u32 >= self.cfg.max_concurrent_jobs {
                drop(running);
                let reason = "no free slot: the edge sent more jobs than the agent granted".to_string();
                // Nothing wrong with the order itself: the edge may send it again later.
                let _ = self.uplink.send(AgentMessage::Rejected { job_id: Some(job_id), reason, retry: true });
                return;
            }
            running.insert(job_id.clone(), Some(cancel_tx));
        }
        self.status.running(self.running_ids());
        info!(job_id = %job_id, agent_id = %self.cfg.agent_id, timeout_ms = order.spec.timeout_ms, "job accepted");
        let _ = self.uplink.send(AgentMessage::Accepted { job_id: job_id.clone() });
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            // A bug in the runner must not leave the slot taken and the caller waiting:
            // a panicked job still ends, as a failure.
            let run = tokio::spawn(crate::job::run(Arc::clone(&agent), job_id.clone(), order.spec, cancel_rx));
            let result = run.await.unwrap_or_else(|e| {
                tracing::error!(job_id = %job_id, error = %e, "the job runner failed");
                shared::job::JobResult::failure(
                    shared::contract::ErrorCode::InternalError,
                    "the agent failed while running this job (see its log); retry",
                    0,
                )
            });
            if let Err(e) = agent.spool.put(&job_id, &result) {
                warn!(job_id = %job_id, error = %e, "could not spool the result; sending it anyway");
            }
            agent.running.lock().expect("running lock").remove(&job_id);
            agent.status.running(agent.running_ids());
            let _ = agent.uplink.send(AgentMessage::Result { job_id, result });
            let _ = agent.uplink.send(AgentMessage::Credit { slots: 1 });
        });
    }

    pub fn on_cancel(&self, envelope: &Envelope) {
        let Some(order) = self.verify::<CancelOrder>(envelope, Domain::Cancel) else { return };
        // The id stays listed as running until the job task ends and removes it.
        let handle = self.running.lock().expect("running lock").get_mut(&order.header.job_id).and_then(Option::take);
        match handle {
            Some(cancel) => {
                info!(job_id = %order.header.job_id, reason = %order.reason, "cancelling job");
                let _ = cancel.send(crate::job::Stop::Cancelled(order.reason));
            }
            None => info!(job_id = %order.header.job_id, "cancel for a job not running here"),
        }
    }

    /// Stops every running job (the agent is shutting down); their results are spooled.
    pub fn stop_all(&self) {
        for cancel in self.running.lock().expect("running lock").values_mut().filter_map(Option::take) {
            let _ = cancel.send(crate::job::Stop::AgentStopping);
        }
    }
}
