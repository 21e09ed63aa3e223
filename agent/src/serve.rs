//! The agent's life: start the connection, run the jobs it receives, and on stop close
//! the door to new jobs, stop the running ones, wait for their results to go out (or stay
//! spooled) and close the connection. Job tasks live in a `JoinSet` owned here, so a stop
//! waits for exactly the jobs there are.

use crate::agent::Agent;
use crate::config::AgentConfig;
use crate::connection;
use crate::process::KILL_GRACE;
use std::future::Future;
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Runs the agent until `stop` resolves.
pub async fn serve(cfg: AgentConfig, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    info!(agent_id = %cfg.agent_id, edge = %cfg.connect_url, capacity = cfg.max_concurrent_jobs, claude = %cfg.claude_bin, "agent starting");
    let (agent, queues) = Agent::new(cfg)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let connection = tokio::spawn(connection::run(agent.clone(), queues.uplink, shutdown_rx));
    let reporter = std::sync::Arc::clone(&agent.reporter);
    let watcher = tokio::spawn(async move { reporter.watch().await });
    let mut launches = queues.jobs;
    let mut jobs = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(task) = launches.recv() => {
                jobs.spawn(task);
            }
            Some(joined) = jobs.join_next(), if !jobs.is_empty() => {
                // Job tasks catch their own panics; this is only the runtime's word.
                if let Err(e) = joined {
                    warn!(agent_id = %agent.cfg.agent_id, error = %e, "a job task ended abnormally");
                }
            }
        }
    }
    info!(agent_id = %agent.cfg.agent_id, running = jobs.len(), "agent stopping");
    agent.close();
    // Jobs registered before the door closed are queued already.
    while let Ok(task) = launches.try_recv() {
        jobs.spawn(task);
    }
    agent.stop_all();
    let grace = KILL_GRACE + Duration::from_secs(2);
    if tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await.is_err() {
        warn!(agent_id = %agent.cfg.agent_id, left = jobs.len(), "jobs did not stop in time; their results will be missing");
    }
    watcher.abort();
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), connection).await;
    Ok(())
}
