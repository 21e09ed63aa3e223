//! `claude-runner up`: the newcomer's one command. A native edge on 127.0.0.1 and an agent
//! connected to it, in one process; keys and a runner secret are made on the first run and
//! kept under `DATA_DIR/up`, so the curl line printed stays valid across restarts.

use crate::config::{default_agent_id, AgentConfig, LocalArgs};
use crate::keygen::{runner_secret, KeySet};
use crate::files::{private_dir, restrict, write_atomically, PRIVATE_FILE};
use serde::{Deserialize, Serialize};
use shared::keys;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the local edge listens.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value_t = 1)]
    pub max_concurrent_jobs: u32,
    #[command(flatten)]
    pub local: LocalArgs,
    #[command(flatten)]
    pub repos: crate::repo::settings::RepoArgs,
}

#[derive(Serialize, Deserialize)]
struct UpState {
    #[serde(flatten)]
    keys: KeySet,
    runner_secret: String,
    agent_id: String,
}

fn load_or_create(dir: &Path) -> anyhow::Result<UpState> {
    let path = dir.join("up.json");
    // Owner-only, folder and file: they hold both signing keys and the runner secret. One
    // left open by an older version is closed now rather than refused: `up` is the
    // newcomer's command.
    private_dir(dir)?;
    if let Ok(bytes) = std::fs::read(&path) {
        restrict(&path, PRIVATE_FILE)?;
        return serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is damaged ({e}); delete it to make new keys", path.display()));
    }
    let state = UpState { keys: KeySet::generate(), runner_secret: runner_secret(), agent_id: default_agent_id() };
    // Created owner-only: it holds both signing keys.
    write_atomically(&path, &serde_json::to_vec_pretty(&state)?, true)?;
    Ok(state)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if crate::process::find_binary(&args.local.claude_bin).is_none() {
        eprintln!("{}", crate::process::INSTALL_CLAUDE);
        std::process::exit(1);
    }
    let root = args.local.data_dir().join("up");
    let state = load_or_create(&root)?;
    let agent_public_keys = format!("{}={}", state.agent_id, state.keys.agent_public_key);
    let config = edge_core::Config::from_lookup(|name| match name {
        "RUNNER_SECRET" => Some(state.runner_secret.clone()),
        "EDGE_SIGNING_KEY" => Some(state.keys.edge_signing_key.clone()),
        "AGENT_PUBLIC_KEYS" => Some(agent_public_keys.clone()),
        other => std::env::var(other).ok(),
    })?;
    let edge = edge_native::Server::bind(edge_native::ServerOptions { config, listen: args.listen, data_dir: root.join("edge") }).await?;
    let addr = edge.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let edge_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    };
    let edge_task = tokio::spawn(edge.serve(edge_stop));

    let agent_key = keys::signing_key("agent key", &state.keys.agent_signing_key)?;
    // Everything `up` holds is a secret a job must not print.
    let mut secrets = crate::config::key_forms(&state.keys.agent_signing_key, &agent_key);
    secrets.extend([state.runner_secret.clone(), state.keys.edge_signing_key.clone()]);
    secrets.extend(crate::config::secret_values(|name| std::env::var(name).ok()));
    let agent_cfg = AgentConfig {
        connect_url: format!("ws://{addr}/agent/connect"),
        agent_id: state.agent_id.clone(),
        pool: shared::ids::DEFAULT_POOL.to_string(),
        signing_key: agent_key,
        edge_public_key: keys::verifying_key("edge key", &state.keys.edge_public_key)?,
        claude_bin: args.local.claude_bin.clone(),
        claude_config_dir: args.local.claude_config_dir.clone(),
        data_dir: root.join("agent"),
        max_concurrent_jobs: args.max_concurrent_jobs,
        claude_model: args.local.claude_model.clone(),
        job_env_allow: crate::config::job_env_allow(&args.local.job_env_allow)?,
        secrets,
        repos: args.repos.clone().resolve()?,
        drain_timeout: std::time::Duration::from_millis(crate::config::DEFAULT_DRAIN_TIMEOUT_MS),
    };
    println!(
        "Claude Runner is up: edge http://{addr}, agent `{id}` connected to it.

  curl -s -X POST http://{addr}/execute \\
    -H 'Content-Type: application/json' -H 'X-Runner-Secret: {secret}' \\
    -d '{{\"prompt\": \"Write a haiku about home servers\"}}'

  curl -s -H 'X-Runner-Secret: {secret}' http://{addr}/health
Keys and secret: {keys_path} (kept for the next run). Ctrl-C stops both.",
        id = state.agent_id,
        secret = state.runner_secret,
        keys_path = root.join("up.json").display(),
    );
    let result = crate::serve::serve(agent_cfg, crate::drain::stop_requests()).await;
    let _ = stop_tx.send(true);
    let _ = edge_task.await;
    result
}
