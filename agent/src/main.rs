//! `claude-runner`: the agent that runs Claude Code on Spark for an edge, and the
//! operator's commands. Laid out by role, like the Buildkite agent:
//!
//! - [`serve`]: the agent's life: connection, job tasks, graceful stop.
//! - [`connection`]: the outbound WebSocket: handshake, heartbeats, reconnects.
//! - [`agent`]: state that outlives connections; verifying, starting and cancelling orders.
//! - [`runner`]: one job's life, given a narrow [`runner::JobContext`].
//! - [`workspace`]: a job's fresh folder, its working directory, a carried-over session.
//! - [`process`]: Claude's process group: start, read, stop (TERM, then KILL).
//! - [`claude`]: Claude Code's command line and its stream-json, as pure functions.
//! - [`oauth`]: the login on this machine and the refresh gate.
//! - [`report`]: what the edge is told of the login and usage window, and when (at once
//!   on a change: the credentials file is watched).
//! - [`relogin`]: `claude auth login` driven with pipes for the edge's re-login relay.
//! - [`redact`]: keeps tokens from ever leaving the machine.
//! - [`spool`]: results on disk until the edge acknowledges them.
//! - [`replay`]: remembered order nonces.
//! - [`files`]: atomic, owner-only files.
//! - [`status`]: the agent's state file, and `claude-runner status`.
//! - [`keygen`], [`up`], [`doctor`], [`submit`]: operator commands (`up` needs the
//!   default `up` feature: it runs a native edge in the same process).

mod agent;
mod claude;
mod config;
mod connection;
mod doctor;
mod files;
mod keygen;
mod oauth;
mod process;
mod redact;
mod relogin;
mod report;
mod replay;
mod runner;
mod serve;
mod spool;
mod status;
mod submit;
#[cfg(feature = "up")]
mod up;
mod workspace;

use clap::{Parser, Subcommand};
use config::{AgentArgs, LocalArgs};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "claude-runner", version, about = "Run Claude Code on your own machine for cloud callers")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: dial the edge and run the jobs it sends.
    Agent(AgentArgs),
    /// Make the edge and agent key pairs and print where each goes.
    Keygen {
        /// Print {"edge_signing_key","edge_public_key","agent_signing_key","agent_public_key"}.
        #[arg(long)]
        json: bool,
        /// The agent id to print in AGENT_PUBLIC_KEYS.
        #[arg(long, env = "AGENT_ID")]
        agent_id: Option<String>,
    },
    /// A local edge on 127.0.0.1 plus an agent connected to it: try it in one command.
    #[cfg(feature = "up")]
    Up(up::UpArgs),
    /// Show this machine's Claude login as the agent reports it.
    OauthStatus {
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Check the claude binary, the login, the keys and the edge, with a fix for each problem.
    Doctor(AgentArgs),
    /// Send a task to an edge, show its progress live, print the result.
    Submit(submit::SubmitArgs),
    /// Is the local agent running and connected, and what is it running?
    Status {
        #[command(flatten)]
        local: LocalArgs,
    },
}

/// The one wall clock the agent reads (durations use `Instant`).
pub use runtime::now_ms;

pub fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

fn main() {
    let cli = Cli::parse();
    runtime::init_logging(&cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio starts");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Agent(args) => {
                let cfg = args.resolve()?;
                serve::serve(cfg, runtime::shutdown_signal()).await
            }
            Command::Keygen { json, agent_id } => {
                keygen::print(&keygen::KeySet::generate(), &agent_id.unwrap_or_else(config::default_agent_id), json);
                Ok(())
            }
            #[cfg(feature = "up")]
            Command::Up(args) => up::run(args).await,
            Command::Doctor(args) => {
                if !doctor::run(args).await {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Submit(args) => {
                let code = submit::run(args).await?;
                std::process::exit(code);
            }
            Command::Status { local } => {
                if !status::show(&local.data_dir())? {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::OauthStatus { local } => {
                let login = oauth::Login::new(local.claude_config_dir.as_deref());
                let status = login.read(now_ms()).report.status(now_ms());
                println!("{}", serde_json::to_string_pretty(&status)?);
                if status.needs_login {
                    eprintln!("Claude needs a login on this machine: run `claude auth login` (or set CLAUDE_CODE_OAUTH_TOKEN).");
                    std::process::exit(1);
                }
                Ok(())
            }
        }
    });
    if let Err(e) = result {
        eprintln!("claude-runner: {e:#}");
        std::process::exit(1);
    }
}
