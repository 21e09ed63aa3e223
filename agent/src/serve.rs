//! The agent's life: start the connection, run the jobs it receives, and on a stop
//! request drain (see [`crate::drain`]): close the door to new jobs, let the running ones
//! finish within `DRAIN_TIMEOUT_MS` (or stop them at once on a second SIGTERM), wait for
//! their results to reach the edge (or stay spooled) and close the connection. Job tasks
//! live in a `JoinSet` owned here, so a stop waits for exactly the jobs there are.

use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::connection;
use crate::drain::{self, Request};
use crate::process::KILL_GRACE;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// How long a stopping agent waits for the edge to acknowledge the last results; those
/// not acknowledged by then stay spooled and go out on the next start.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until a stop request arrives on `stops`, then drains and returns.
pub async fn serve(cfg: AgentConfig, mut stops: mpsc::UnboundedReceiver<Request>) -> anyhow::Result<()> {
    info!(agent_id = %cfg.agent_id, edge = %cfg.connect_url, capacity = cfg.max_concurrent_jobs, claude = %cfg.claude_bin, "agent starting");
    // First: reading DATA_DIR below may take a while, and systemd counts from the start.
    let watchdog = crate::watchdog::start();
    // Off the runtime thread: it reads DATA_DIR (the spool, the session log) whole.
    let (agent, queues) = tokio::task::spawn_blocking(move || Agent::new(cfg)).await.map_err(|e| anyhow::anyhow!("the agent failed while starting: {e}"))??;
    // What a killed predecessor left in the mirrors goes before the first job (here, not
    // in `Agent::new`: a git worker checks the mirrors, and waiting for it is async).
    agent.repos.recover().await;
    agent.status.mirrors(agent.repos.mirror_names());
    if let Err(e) = crate::process::start_launcher() {
        // Each job tries again, and fails with this in its error if it still cannot.
        warn!(agent_id = %agent.cfg.agent_id, error = %e, "could not start the launcher that starts Claude");
    }
    // Known before the first hello; then noticed within a minute of an upgrade.
    agent.cli.refresh(&agent.cfg.claude_bin).await;
    let cli_watch = tokio::spawn({
        let agent = agent.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                agent.cli.refresh(&agent.cfg.claude_bin).await;
            }
        }
    });
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let connection = tokio::spawn(connection::run(agent.clone(), queues.uplink, shutdown_rx));
    let reporter = std::sync::Arc::clone(&agent.reporter);
    let watcher = tokio::spawn(async move { reporter.watch().await });
    let clears = clear_usage_on_request(&agent);
    let mut launches = queues.jobs;
    let mut jobs = JoinSet::new();
    loop {
        tokio::select! {
            _ = stops.recv() => break,
            Some(task) = launches.recv() => {
                jobs.spawn(task);
                if agent.cfg.one_job {
                    info!(agent_id = %agent.cfg.agent_id, "--one-job: the job started; the agent exits once its result is delivered");
                    break;
                }
            }
            Some(joined) = jobs.join_next(), if !jobs.is_empty() => log_abnormal(&agent, joined),
        }
    }

    // Draining: nothing new starts; what runs may finish.
    agent.close();
    agent.status.draining();
    // Jobs registered before the door closed are queued already.
    while let Ok(task) = launches.try_recv() {
        jobs.spawn(task);
    }
    let drain_timeout = agent.cfg.drain_timeout;
    info!(agent_id = %agent.cfg.agent_id, running = jobs.len(), drain_timeout_ms = drain_timeout.as_millis() as u64, "agent draining: no new jobs; stop it again to hand the running ones back now");
    let finished = tokio::select! {
        _ = join_all(&agent, &mut jobs) => true,
        _ = tokio::time::sleep(drain_timeout) => {
            warn!(agent_id = %agent.cfg.agent_id, left = jobs.len(), "drain timeout: handing the running jobs back");
            false
        }
        _ = drain::stop_now(&mut stops) => {
            warn!(agent_id = %agent.cfg.agent_id, left = jobs.len(), "stopped again: handing the running jobs back now");
            false
        }
    };
    if !finished {
        // Each stopped job ends with a RUNNER_LOST result (its caller falls back).
        agent.stop_all();
        let grace = KILL_GRACE + Duration::from_secs(2);
        if tokio::time::timeout(grace, join_all(&agent, &mut jobs)).await.is_err() {
            warn!(agent_id = %agent.cfg.agent_id, left = jobs.len(), "jobs did not stop in time; their results will be missing");
        }
    }

    // The results are on disk and on their way; give the edge a moment to take them.
    let delivered = tokio::select! {
        delivered = delivery(&agent) => delivered,
        _ = drain::stop_now(&mut stops) => false,
    };
    if !delivered {
        let kept = agent.spool.all().len();
        if kept > 0 {
            warn!(agent_id = %agent.cfg.agent_id, results = kept, "results not acknowledged by the edge yet: kept on disk, sent on the next start");
        }
    }
    watcher.abort();
    clears.abort();
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), connection).await;
    cli_watch.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    // Nothing of the agent's left when it exits: its jobs have ended, and its helpers end
    // here (a kill and a reap each; off the runtime thread, as every launcher call is).
    let _ = tokio::task::spawn_blocking(crate::process::end_helpers).await;
    info!(agent_id = %agent.cfg.agent_id, "agent stopped");
    Ok(())
}

/// `agent --clear-usage`'s SIGUSR2 ([`crate::report::ask_to_clear`]), caught while the
/// agent serves: each clears a used-up usage window, in the agent (the edge is told at
/// once) and in its status file (a restart takes a window over from there).
fn clear_usage_on_request(agent: &std::sync::Arc<Agent>) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = signal(SignalKind::user_defined2()).expect("signal handlers install");
    let agent = agent.clone();
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            if agent.reporter.clear_usage() {
                agent.status.beat(&agent.oauth_report(), agent.reporter.fingerprint());
            }
        }
    })
}

fn log_abnormal(agent: &Agent, joined: Result<(), tokio::task::JoinError>) {
    // Job tasks catch their own panics; this is only the runtime's word.
    if let Err(e) = joined {
        warn!(agent_id = %agent.cfg.agent_id, error = %e, "a job task ended abnormally");
    }
}

async fn join_all(agent: &Agent, jobs: &mut JoinSet<()>) {
    while let Some(joined) = jobs.join_next().await {
        log_abnormal(agent, joined);
    }
}

/// Waits until the edge has acknowledged every spooled result. False when it did not
/// within [`DELIVERY_GRACE`]. A connection that is down meanwhile (the edge restarting,
/// a dropped link) is waited for too: the connection task keeps dialing, and sends every
/// spooled result after its hello.
async fn delivery(agent: &Agent) -> bool {
    let deadline = tokio::time::Instant::now() + DELIVERY_GRACE;
    loop {
        if agent.spool.all().is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
