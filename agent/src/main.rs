//! `claude-runner`: the agent that runs Claude Code on Spark for an edge, and the
//! operator's commands. Laid out by role, like the Buildkite agent; the pure pieces
//! (Claude's stream-json, redaction, the credentials file, SSE, `EDGE_URL`) are the
//! `agent_core` library (`lib.rs`), which the fuzzers drive too (ARCHITECTURE.md, "The
//! agent, by role"):
//!
//! - [`serve`]: the agent's life: connection, job tasks, graceful stop.
//! - [`config`]: the agent's settings (environment and flags), checked once at start.
//! - [`setting_value`]: the number and switch settings' parsers: a refusal says what to write.
//! - [`drain`]: how a stop is asked for: signals, or `agent --drain` from another shell
//!   (which finds the running agent as `agent --clear-usage` does).
//! - [`connection`]: the outbound WebSocket: handshake, heartbeats, reconnects.
//! - [`metered`]: its socket's writes metered, so that a send is given up when the link
//!   takes nothing, not when a large frame is slow.
//! - [`upgrade`]: the agent's proof on its dial, and the edge's refusal of it read.
//! - [`reconnect`]: how long to wait before dialing again: backoff and jitter, capped
//!   within the edge's `LOST_AFTER_MS` while the agent holds work.
//! - [`lost_after`]: that `LOST_AFTER_MS`, kept in `DATA_DIR` from the last welcome.
//! - [`agent`]: state that outlives connections; verifying, starting and cancelling orders.
//! - [`link`]: the current connection's MAC keys, shared by the agent and its jobs.
//! - [`boot_clock`]: the clock the start rule and the link's silence count by, which goes
//!   on while the machine is suspended, as the edge's does.
//! - [`runner`]: one job's life, given a narrow [`runner::JobContext`].
//! - [`progress_clock`]: when the jobs' waiting progress batches go (one clock for all).
//! - [`uplink`]: the queues to the edge: the agent's own words first, the jobs' progress
//!   under a byte budget (dropped past it, and counted).
//! - [`workspace`]: a job's fresh folder, its working directory, a carried-over session.
//! - [`process`]: Claude's process: start, read, stop (TERM, then KILL).
//! - [`trips`]: a job's blocking trips (its start, its end's records) on the agent's own
//!   threads, each woken once, not through tokio's blocking pool.
//! - [`launcher`]: the small process that starts every Claude, so the agent itself never
//!   forks per job.
//! - [`zygote`]: the process each launcher is cloned from, forked at the agent's start, so
//!   that no launcher is ever dumpable.
//! - [`warden`]: the small process between the launcher and Claude that kills Claude's
//!   whole tree with its job, even when the agent is killed.
//! - [`watchdog`]: systemd's watchdog told the agent is alive, from its runtime thread.
//! - [`rawsys`]: system calls that return `-errno` and leave `errno` alone, for the
//!   wardens, which share the launcher's memory and so its `errno`.
//! - [`pidfd`]: a process held as itself, never another that got its pid since.
//! - [`cli_version`]: which Claude Code CLI runs here, reported in `/health`.
//! - [`oauth`]: the login on this machine and the refresh gate.
//! - [`report`]: what the edge is told of the login and usage window, and when (at once
//!   on a change: the credentials file is watched); `agent --clear-usage`.
//! - [`relogin`]: `claude auth login` driven with pipes for the edge's re-login relay.
//! - [`repo`]: jobs on repositories: git2 mirror cache, a checkout per job, diff and push.
//! - [`spool`]: one record file per job slot: "started" records, and results until the
//!   edge acknowledges them (format: the library's `record`).
//! - [`replay`]: remembered order nonces.
//! - [`sessions`]: whose each Claude session is: a session is resumed only for the caller
//!   whose job made it.
//! - [`files`]: atomic, owner-only files.
//! - [`status`]: the agent's state file, and `claude-runner status`.
//! - [`signin`]: `claude-runner login`, the re-login relay from a terminal.
//! - [`keygen`], [`up`], [`doctor`] (and its [`canary`] job), [`submit`]: operator
//!   commands (`up` needs the default `up` feature: it runs a native edge in the same
//!   process).
//! - [`follow`]: when `submit` follows its job's stream again, and when it gives up on an
//!   edge that brings nothing.

mod agent;
mod boot_clock;
mod canary;
mod cli_version;
mod config;
mod connection;
mod doctor;
mod drain;
mod files;
mod follow;
mod instance;
mod keygen;
mod launcher;
mod link;
mod lost_after;
mod metered;
mod oauth;
mod pidfd;
mod process;
mod progress_clock;
mod rawsys;
mod reconnect;
mod relogin;
mod repo;
mod report;
mod replay;
mod runner;
mod serve;
mod setting_value;
mod sessions;
mod signin;
mod spool;
mod status;
mod trips;
mod submit;
#[cfg(feature = "up")]
mod up;
mod upgrade;
mod uplink;
mod warden;
mod watchdog;
mod workspace;
mod zygote;

use agent_core::{claude, credentials, edge_url, redact, sse};
use clap::{Parser, Subcommand};
use config::AgentArgs;

#[derive(Parser)]
#[command(name = "claude-runner", version, about = "Run Claude Code on your own machine for cloud callers")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true, value_parser = runtime::log_format)]
    log_format: runtime::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: dial the edge and run the jobs it sends. SIGTERM drains it.
    Agent {
        #[command(flatten)]
        args: AgentArgs,
        /// Do not run one: ask the agent running with this DATA_DIR to drain (finish its
        /// jobs, then exit) and wait until it has.
        #[arg(long)]
        drain: bool,
        /// Do not run one: tell the agent running with this DATA_DIR that Claude's usage
        /// window is open again, so the edge sends it work (a used-up window otherwise holds
        /// its work until the reset Claude named, eight days at most).
        #[arg(long, conflicts_with = "drain")]
        clear_usage: bool,
    },
    /// Make the edge and agent key pairs and print where each goes.
    Keygen {
        /// Print {"edge_signing_key","edge_public_key","agent_signing_key","agent_public_key"}.
        #[arg(long, conflicts_with = "env")]
        json: bool,
        /// Print NAME=value lines to append to docker-compose's .env.
        #[arg(long)]
        env: bool,
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
        login: config::ClaudeLoginArgs,
    },
    /// Check the claude binary, the login, the keys and the edge, with a fix for each problem.
    Doctor {
        #[command(flatten)]
        args: AgentArgs,
        /// Also run one tiny real job through the local Claude Code CLI: does this CLI
        /// version work with the runner? (One short request on Claude's account.)
        #[arg(long)]
        canary: bool,
    },
    /// Send a task to an edge, show its progress live, print the result.
    Submit(submit::SubmitArgs),
    /// Log the runner's Claude in again from anywhere: the edge relays `claude auth login`
    /// (prints the URL to open, reads the code it shows).
    Login(signin::LoginArgs),
    /// Is the local agent running and connected, and what is it running?
    Status {
        #[command(flatten)]
        dir: config::DataDirArgs,
        /// Print one line and exit 0 only if the agent runs, is connected and not stuck
        /// (a health check that needs no port).
        #[arg(long)]
        check: bool,
    },
}

/// The one wall clock the agent reads (durations use `Instant`).
pub use runtime::now_ms;

/// The unit tests' zygote, forked before the test harness starts its threads, as `main`
/// forks the agent's before anything: the repository tests' git workers are cloned from it
/// and use libgit2, whose locks another test's thread could hold at a later fork (a
/// zygote forked then would copy them locked, and a worker wait on them for ever).
#[cfg(test)]
#[used]
#[link_section = ".init_array"]
static FORK_THE_ZYGOTE_FIRST: extern "C" fn() = {
    extern "C" fn fork_the_zygote() {
        // As Rust's start does for `main`, later: the zygote's clones (git workers) get a
        // write to a closed socket as EPIPE, as the agent's do.
        // SAFETY: sets one signal's disposition, in a process of one thread.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        zygote::start();
    }
    fork_the_zygote
};

fn main() {
    // First: most commands hold a secret (the agent's keys, Claude's login, the runner
    // secret), and a process of the same user may open a dumpable process's memory. What is
    // left is the window from the `exec` to here (README, What a job can see).
    runtime::not_dumpable();
    // Next the zygote, while this process has one thread and has read nothing: not even its
    // command line, since parsing it copies settings' values onto the heap
    // (`AGENT_SIGNING_KEY` among them, clap's `env`), and the zygote's heap is every
    // launcher's, warden's and pre-exec Claude's. Which command runs is known only after.
    zygote::start();
    let command = <Cli as clap::CommandFactory>::command();
    config::tidy_settings(&command);
    config::settle_home();
    // Help and the version are answered whatever the settings hold (they read none). A
    // setting the command reads that is not text is refused by name: in place of clap's
    // error for it, which names none, or where clap took the arguments (a secret clap does
    // not read); any other error of clap's is said first.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Built again: clap takes each setting's value from the environment as the command is
    // built, and `tidy_settings` has just changed some.
    let mut parsing = <Cli as clap::CommandFactory>::command();
    let matches = parsing.clone().try_get_matches_from(&args);
    if let Err(e) = &matches {
        use clap::error::ErrorKind::{DisplayHelp, DisplayHelpOnMissingArgumentOrSubcommand, DisplayVersion};
        if matches!(e.kind(), DisplayHelp | DisplayHelpOnMissingArgumentOrSubcommand | DisplayVersion) {
            e.exit();
        }
    }
    let check = matches.as_ref().map_or_else(|e| e.kind() == clap::error::ErrorKind::InvalidUtf8, |_| true);
    let parsed = matches.as_ref().ok().and_then(|m| m.subcommand_name());
    if check {
        if let Err(e) = config::refuse_settings_not_text(&command, &args, parsed, |name| std::env::var_os(name)) {
            eprintln!("claude-runner: {e}");
            std::process::exit(not_text_status(config::asked_command(&command, &args, parsed)));
        }
    }
    // A secret given as a flag (`--github-token`, `--secret`, …) is refused before anything
    // reads it: it is in /proc for this process's whole life.
    if let Err(e) = matches.as_ref().map_or(Ok(()), |m| config::refuse_secret_flags(&command, m)) {
        eprintln!("claude-runner: {e}");
        std::process::exit(2);
    }
    let cli = matches
        .and_then(|mut m| <Cli as clap::FromArgMatches>::from_arg_matches_mut(&mut m).map_err(|e| e.format(&mut parsing)))
        .unwrap_or_else(|e| e.exit());
    #[cfg(feature = "up")]
    let runs_jobs = matches!(cli.command, Command::Agent { drain: false, clear_usage: false, .. } | Command::Up(_));
    #[cfg(not(feature = "up"))]
    let runs_jobs = matches!(cli.command, Command::Agent { drain: false, clear_usage: false, .. });
    quiet_on_a_closed_stdout(&cli.command);
    if runs_jobs {
        process::harden_agent();
    } else if !matches!(cli.command, Command::Doctor { canary: true, .. }) {
        // Starts no Claude (the canary does): no process left idle beside it.
        zygote::stop();
    }
    runtime::init_logging(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Before any thread starts (it writes the environment): where the system's CA
    // certificates are, as `SSL_CERT_FILE`/`SSL_CERT_DIR` when unset. Each git worker is
    // given them (`repo::worker`); searching the disk in each took 20 ms.
    // SAFETY: one thread so far (the runtime is built below).
    unsafe { openssl_probe::init_openssl_env_vars() };
    // One runtime thread. A job's path hops between the connection's task, the serve loop
    // and the job's task; on two workers each hop was a futex wake of the other thread and
    // an epoll round (as on the edge before it went to one thread). What may block goes to
    // the blocking pool as before (the started record and the result's syncs, the
    // launcher's request, the status file, git); what stays on this thread is short (a
    // workspace's mkdir, the replay log's append, a redactor rebuilt when the tokens
    // rotate), so heartbeats and frames still go out while jobs run.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio starts");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Agent { args, drain: true, .. } => {
                if !drain::request(&args.local.running_agent_dir()).await? {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Agent { args, clear_usage: true, .. } => {
                if !report::ask_to_clear(&args.local.running_agent_dir())? {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Agent { args, .. } => {
                let cfg = args.resolve()?;
                serve::serve(cfg, drain::stop_requests()).await
            }
            Command::Keygen { json, env, agent_id } => {
                let format = match (json, env) {
                    (true, _) => keygen::Format::Json,
                    (_, true) => keygen::Format::Env,
                    _ => keygen::Format::Text,
                };
                // Printed into shell lines to paste (inside single quotes) and an env file.
                let agent_id = agent_id.unwrap_or_else(config::default_agent_id);
                if !shared::ids::valid_agent_id(&agent_id) {
                    anyhow::bail!("agent id `{agent_id}` is not valid: use 1-64 letters, digits, `-`, `_` or `.` (--agent-id, AGENT_ID)");
                }
                keygen::print(&keygen::KeySet::generate(), &agent_id, format);
                Ok(())
            }
            #[cfg(feature = "up")]
            Command::Up(args) => {
                up::run(args).await
            }
            Command::Doctor { args, canary } => {
                if !doctor::run(args, canary).await {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Submit(args) => {
                let code = submit::run(args).await?;
                std::process::exit(code);
            }
            Command::Status { dir, check } => {
                let dir = dir.running_agent_dir();
                let healthy = if check { status::check(&dir)? } else { status::show(&dir)? };
                if !healthy {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::OauthStatus { login: settings } => {
                let agent_dir = settings.dir.running_agent_dir();
                let (login, read_in) = report::local_login(settings.claude_config_dir.as_deref(), &agent_dir);
                let status = report::local_report(&login, &agent_dir).status(now_ms());
                // On stderr: stdout is the JSON, for a program to read.
                eprintln!("Claude's login {read_in}.");
                // Its usage window is the status file's, a job's to write.
                println!("{}", status::json_for_terminal(&serde_json::to_string_pretty(&status)?));
                if let Some(next) = &status.next_step {
                    eprintln!("Next: {}.", shared::text::one_line(next));
                }
                if status.needs_login {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Login(args) => {
                let code = signin::run(args).await?;
                std::process::exit(code);
            }
        }
    });
    if let Err(e) = result {
        if closed_pipe(&e) && !runs_jobs {
            end_as_a_closed_pipe_ends_a_tool();
        }
        // As one line, its control characters escaped: an error may quote outside words (a
        // status file a job wrote, named in serde's "unknown variant"; an edge's answer).
        eprintln!("claude-runner: {}", shared::text::one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
    // Dropping the runtime waits for every blocking-pool thread: one stuck (libgit2's, when
    // it ran in the agent: a git server sending a byte at a time) kept an agent that had
    // drained and said "agent stopped" from exiting. Whatever is left is given up: exit now.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(0);
}

/// A command whose output is for a person or a pipe ends quietly when that pipe closes
/// (`claude-runner keygen | head -1`), as Unix tools do: it panicked ("failed printing to
/// stdout: Broken pipe", exit 101). Rust ignores SIGPIPE, so a write to a closed pipe
/// fails with EPIPE instead, which `println!` turns into a panic.
///
/// Where the command writes no pipe but stdout and stderr and no socket (`keygen`,
/// `status`, `oauth-status`), SIGPIPE's default comes back: the kernel ends it at the
/// first write, as it ends `cat`. Not where it holds sockets (`submit`, `login`, `doctor`):
/// Rust writes sockets with `send(MSG_NOSIGNAL)` but `write_vectored` is a plain `writev`,
/// which raises SIGPIPE on a socket the peer reset (hyper and rustls write so) — such a
/// reset must stay an error said, not a silent death. Nor where Claude's stdin is a pipe
/// (`agent`, `up`, `doctor --canary`): a Claude that dies before it reads its prompt must
/// not kill the agent. There a failed print of std's ends the command quietly
/// ([`end_as_a_closed_pipe_ends_a_tool`]) and an EPIPE returned up to `main` does too;
/// `agent` and `up`, which run jobs, keep std's behaviour whole.
///
/// Any other failed print of these commands (stdout a file on a full disk: `keygen >
/// keys.env`, `submit > result.txt`) panicked too, and said so with a backtrace hint and
/// exit 101: it is said as a failed write instead, with the command's failure status
/// (`submit` and `login`: 2, the others 1), and nothing more is printed.
/// The exit status for a setting refused as not text: `submit`'s and `login`'s usage error
/// (2), as for any other wrong setting of theirs, since their 1 says the task ran and
/// failed; the other commands' error (1).
fn not_text_status(asked: Option<&clap::Command>) -> i32 {
    match asked.map(clap::Command::get_name) {
        Some("submit" | "login") => 2,
        _ => 1,
    }
}

fn quiet_on_a_closed_stdout(command: &Command) {
    let failure = match command {
        Command::Keygen { .. } | Command::Status { .. } | Command::OauthStatus { .. } => {
            // SAFETY: sets a signal's disposition to its default; no handler runs.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            1
        }
        Command::Doctor { .. } => 1,
        Command::Submit(_) | Command::Login(_) => 2,
        _ => return,
    };
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info.payload().downcast_ref::<String>().map(String::as_str).unwrap_or_default();
        if failed_print_to_a_closed_pipe(text) {
            end_as_a_closed_pipe_ends_a_tool();
        }
        if let Some((stream, why)) = failed_print(text) {
            // Perhaps to the stream that failed (stderr): then nothing can be said.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "claude-runner: could not write to {stream} ({why}): what it shows is cut short; run it again where {stream} can be written");
            std::process::exit(failure);
        }
        previous(info)
    }));
}

/// Which stream std's panic for a failed print (`println!`, `eprintln!`) is of, and why it
/// failed: "failed printing to stdout: No space left on device (os error 28)".
fn failed_print(panic: &str) -> Option<(&str, &str)> {
    panic.strip_prefix("failed printing to ")?.split_once(": ").filter(|(stream, _)| matches!(*stream, "stdout" | "stderr"))
}

/// Whether `panic` is std's for a print to a closed pipe: "failed printing to stdout:
/// Broken pipe (os error 32)".
fn failed_print_to_a_closed_pipe(panic: &str) -> bool {
    let epipe = std::io::Error::from_raw_os_error(libc::EPIPE).to_string();
    failed_print(panic).is_some_and(|(_, why)| why == epipe)
}

/// Whether `e` is a write to a closed pipe, returned up to `main` (`status`'s, `login`'s).
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Ends the process as a closed pipe ends a Unix tool: by SIGPIPE, saying nothing (a shell
/// sees status 141, as for `yes | head -1`).
pub(crate) fn end_as_a_closed_pipe_ends_a_tool() -> ! {
    // SAFETY: the default disposition, then the signal to this thread: the process ends.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(128 + libc::SIGPIPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Only std's panic for a print to a closed pipe ends quietly; any other is said.
    #[test]
    fn only_a_print_to_a_closed_pipe_is_taken_for_one() {
        let epipe = std::io::Error::from_raw_os_error(libc::EPIPE);
        assert!(failed_print_to_a_closed_pipe(&format!("failed printing to stdout: {epipe}")));
        assert!(failed_print_to_a_closed_pipe(&format!("failed printing to stderr: {epipe}")));
        assert!(!failed_print_to_a_closed_pipe(&format!("failed printing to stdout: {}", std::io::Error::from_raw_os_error(libc::ENOSPC))));
        assert!(!failed_print_to_a_closed_pipe(&format!("index out of bounds: {epipe}")));
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC).to_string();
        assert_eq!(failed_print(&format!("failed printing to stdout: {enospc}")), Some(("stdout", enospc.as_str())));
        assert_eq!(failed_print(&format!("failed printing to a file: {enospc}")), None);
        assert!(closed_pipe(&anyhow::Error::from(epipe).context("writing the status")));
        assert!(!closed_pipe(&anyhow::anyhow!("Broken pipe")));
    }

    /// The settings a subcommand's `--help` names (each `[env: NAME]`).
    fn settings_of(subcommand: &str) -> std::collections::BTreeSet<String> {
        let mut cli = Cli::command();
        cli.build();
        let sub = cli.find_subcommand(subcommand).unwrap_or_else(|| panic!("no subcommand {subcommand}"));
        sub.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect()
    }

    /// `status` and `oauth-status` listed the agent's job settings (`--claude-model`,
    /// `--job-env-allow`, `--claude-bin`), which they never read: each lists what it reads.
    #[test]
    fn status_and_oauth_status_list_only_what_they_read() {
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(settings_of("status"), names(&["DATA_DIR", "LOG_FORMAT"]));
        assert_eq!(settings_of("oauth-status"), names(&["CLAUDE_CONFIG_DIR", "DATA_DIR", "LOG_FORMAT"]));
        // `up` runs an agent: its job settings, labels and drain are its own.
        if !cfg!(feature = "up") {
            return;
        }
        let up = settings_of("up");
        for name in ["CLAUDE_BIN", "CLAUDE_MODEL", "JOB_ENV_ALLOW", "AGENT_LABELS", "DRAIN_TIMEOUT_MS", "MAX_CONCURRENT_JOBS", "LISTEN"] {
            assert!(up.contains(name), "up --help lacks {name}: {up:?}");
        }
    }
}
