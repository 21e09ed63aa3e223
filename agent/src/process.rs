//! Claude's process: found on PATH, started through a [`crate::warden`] (which keeps its
//! whole tree in reach, even if the agent is killed) with the prompt on stdin, its stdout
//! read line by line (each line capped), stopped with its whole tree (SIGTERM, then
//! SIGKILL) on a timeout (its deadline on the boot clock, so one that passed while the
//! machine slept stops Claude on resume: [`crate::boot_clock`]), a cancel or the agent
//! stopping. What the lines mean is
//! [`crate::claude`]'s business; what to do with them is the job runner's.
//!
//! Claude runs whatever a prompt asks, as the agent's user, so it gets an environment built
//! from an allow-list ([`claude_environment`]), never the agent's own, and the agent makes
//! itself non-dumpable ([`harden_agent`]) so Claude cannot read the agent's memory or
//! `/proc/<agent>/environ` either. README "What a job can see" is the user's account.

use crate::claude::Ending;
use crate::boot_clock::{self, BootInstant};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::path::{Path, PathBuf};
use std::time::Duration;
use crate::launcher::{pipe, socket_pair, ChildEnds, Launcher, Spawn};
use std::os::fd::OwnedFd;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Time Claude gets to exit after SIGTERM before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// After Claude exits, how long stray children may keep its stdout open.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Longest stdout line read whole; longer ones are cut (a result that long is not JSON
/// anyone can use, and results are capped at 1 MiB anyway).
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
const STDERR_TAIL_BYTES: usize = 8 * 1024;

/// What to do when `bin` (CLAUDE_BIN) is not found: it names the binary looked for, which
/// is not `claude` when CLAUDE_BIN says otherwise.
pub fn install_claude(bin: &str) -> String {
    // A CLAUDE_BIN set to another name (`claud`) is most likely a typo or a binary not on
    // this PATH: that is said first, where "not installed … npm install" sent the operator
    // to install what may well be there.
    if bin != DEFAULT_CLAUDE_BIN {
        let missing = if bin.contains('/') {
            format!("No Claude Code binary at `{bin}`, which CLAUDE_BIN names: no executable file there.")
        } else {
            format!("No binary `{bin}` was found on PATH; CLAUDE_BIN names it.")
        };
        return format!(
            "{missing}
Check CLAUDE_BIN (--claude-bin): set it to the Claude Code binary's name or path, or unset it for `{DEFAULT_CLAUDE_BIN}`.
If Claude Code is not installed: npm install -g @anthropic-ai/claude-code, then `claude auth login`."
        );
    }
    format!(
        "Claude Code is not installed (no `{bin}` on PATH).
Install it and log in, then run this again:
    npm install -g @anthropic-ai/claude-code
    claude auth login          # or: export CLAUDE_CODE_OAUTH_TOKEN=... from `claude setup-token`
Or point CLAUDE_BIN at the binary."
    )
}

/// CLAUDE_BIN when unset.
pub const DEFAULT_CLAUDE_BIN: &str = "claude";

/// Where `name` resolves on PATH, or the path itself if it has a slash.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| executable(p))
}


/// Why a job is stopped before Claude ends by itself.
#[derive(Debug)]
pub enum Stop {
    /// The caller (or the edge) cancelled it.
    Cancelled(String),
    /// The agent is shutting down.
    AgentStopping,
}

impl Stop {
    /// How a job ends when told to stop (a dropped handle means the agent is going away).
    pub fn ending(stop: Result<Stop, oneshot::error::RecvError>) -> Ending {
        match stop {
            Ok(Stop::Cancelled(reason)) => Ending::Cancelled { reason },
            Ok(Stop::AgentStopping) | Err(_) => Ending::AgentStopping,
        }
    }

    /// How a job ends when told to stop before Claude got its prompt: as [`Stop::ending`],
    /// but a drain says Claude never ran (its words are not those of a run cut short).
    pub fn ending_unstarted(stop: Result<Stop, oneshot::error::RecvError>) -> Ending {
        match Stop::ending(stop) {
            Ending::AgentStopping => Ending::AgentStoppingUnstarted,
            ending => ending,
        }
    }
}

/// Closes the agent to the jobs it runs, as far as one user can: not dumpable (a process
/// of the same user can then neither ptrace it nor read its `/proc/<pid>/environ`, `mem`
/// or `fd/`; only root, or a holder of CAP_SYS_PTRACE, can), and everything it creates
/// owner-only (umask 077; Claude inherits it, so workspaces stay private too).
pub fn harden_agent() {
    runtime::not_dumpable();
    // SAFETY: umask changes a process attribute only; no memory is involved.
    unsafe { libc::umask(0o077) };
}

/// Variables Claude may inherit from the agent, by exact name: what a shell and Node need
/// to run (home, path, locale, terminal, temp folder, user, time zone), TLS trust and
/// proxies to reach the API, and Claude Code's documented settings.
const PASSED: &[&str] = &[
    "HOME", "PATH", "LANG", "LANGUAGE", "TERM", "TMPDIR", "TZ", "USER", "LOGNAME", "SHELL",
    "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy",
    "ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL",
    "API_TIMEOUT_MS", "MAX_THINKING_TOKENS", "MAX_MCP_OUTPUT_TOKENS", "MCP_TIMEOUT", "MCP_TOOL_TIMEOUT",
    "BASH_DEFAULT_TIMEOUT_MS", "BASH_MAX_TIMEOUT_MS", "BASH_MAX_OUTPUT_LENGTH", "IS_SANDBOX",
];
/// …and by prefix: locale categories and Claude Code's own knobs.
const PASSED_PREFIXES: &[&str] = &["LC_", "CLAUDE_CODE_", "DISABLE_", "ANTHROPIC_DEFAULT_"];

/// The whole environment of one Claude run: `inherited`, the agent's share of its own
/// ([`inherited_environment`]: its allow-listed variables — the operator's `allow` list,
/// `JOB_ENV_ALLOW`, among them — and [`GIT_SETTINGS`]), then how Claude logs in (`login`,
/// from [`crate::oauth::Login::claude_env`]) and what this job needs (`job`: e.g.
/// `CLAUDE_CONFIG_DIR`). The agent's secrets ([`crate::config::SECRET_VARS`]) are never
/// inherited, whatever the lists say; only `login` and `job` can set one, on purpose.
pub fn claude_environment(inherited: &Arc<[(OsString, OsString)]>, login: Vec<(&'static str, String)>, job: Vec<(String, OsString)>) -> ClaudeEnv {
    let mut set: Vec<(OsString, OsString)> = Vec::new();
    for (name, value) in login.into_iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).chain(job.into_iter().map(|(k, v)| (OsString::from(k), v))) {
        set.retain(|(n, _)| *n != name);
        set.push((name, value));
    }
    ClaudeEnv { inherited: Arc::clone(inherited), set }
}

/// Claude's whole environment for one run ([`claude_environment`]): the agent's share of
/// its own, less the names the run sets, then what the run sets. The share is read once
/// at the agent's start and shared by every run, never copied for one (issue 11: a copy
/// of each variable, and a filter over them, at every job's start).
#[derive(Debug, Clone, Default)]
pub struct ClaudeEnv {
    inherited: Arc<[(OsString, OsString)]>,
    set: Vec<(OsString, OsString)>,
}

impl ClaudeEnv {
    /// Every variable, once each, in the order Claude gets them.
    pub fn vars(&self) -> impl Iterator<Item = (&OsStr, &OsStr)> {
        let set = &self.set;
        let kept = self.inherited.iter().filter(move |(name, _)| !set.iter().any(|(n, _)| n == name));
        kept.chain(set.iter()).map(|(name, value)| (name.as_os_str(), value.as_os_str()))
    }

    /// The value Claude gets for `name`, if any.
    pub fn get(&self, name: &str) -> Option<&OsStr> {
        self.vars().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Sets `name` for this run (in place of what it inherits or set before).
    fn set(&mut self, name: OsString, value: OsString) {
        self.set.retain(|(n, _)| *n != name);
        self.set.push((name, value));
    }
}

/// These variables alone (nothing inherited), in this order.
impl From<Vec<(OsString, OsString)>> for ClaudeEnv {
    fn from(set: Vec<(OsString, OsString)>) -> ClaudeEnv {
        ClaudeEnv { inherited: Arc::new([]), set }
    }
}

/// Settings every git that Claude runs takes over its config files. `safe.bareRepository
/// = explicit`: git uses a bare repository only when pointed at it (`--git-dir`,
/// `GIT_DIR`), never one it finds by walking up from its folder. A repository's folder
/// shaped as a git directory (`HEAD`, `objects/`, `refs/`, a `config` naming a command as
/// `core.fsmonitor`) otherwise ran that command through the `git status` Claude Code runs
/// where it starts, no tool allowed (hostile review rev25, 1). Git reads it only from the
/// command line or the environment and from the user's and the system's files, never from
/// a repository's own config.
const GIT_SETTINGS: &[(&str, &str)] = &[("safe.bareRepository", "explicit")];

/// Adds [`GIT_SETTINGS`] as `GIT_CONFIG_KEY_<n>`/`GIT_CONFIG_VALUE_<n>` after the pairs the
/// operator passes (`JOB_ENV_ALLOW` may pass `GIT_CONFIG_COUNT` and its pairs), so that
/// theirs still apply and ours, read last, win. A count that is no number (git would
/// refuse to run at all) is replaced: only ours count then.
fn with_git_settings(env: &mut ClaudeEnv) {
    let count = "GIT_CONFIG_COUNT";
    let theirs = env.get(count).and_then(|v| v.to_str()?.trim().parse::<usize>().ok()).unwrap_or(0);
    for (i, (key, value)) in GIT_SETTINGS.iter().enumerate() {
        let at = theirs.saturating_add(i);
        env.set(format!("GIT_CONFIG_KEY_{at}").into(), OsString::from(key));
        env.set(format!("GIT_CONFIG_VALUE_{at}").into(), OsString::from(value));
    }
    env.set(count.into(), theirs.saturating_add(GIT_SETTINGS.len()).to_string().into());
}

/// What of the agent's own environment Claude inherits: its allow-listed variables, then
/// [`GIT_SETTINGS`] after the operator's git settings. Made once, when the agent starts
/// (after [`crate::config`] has taken its secrets out of it; nothing changes it later),
/// rather than copied whole and filtered again at every job's start; a job's
/// [`claude_environment`] adds only its login and its own variables. (Made with the git
/// settings and then filtered again for each job, which added them a second time one
/// index past the operator's pairs, the share left a gap at that index for an operator
/// passing `GIT_CONFIG_COUNT` and its pairs, `JOB_ENV_ALLOW`: every git Claude ran failed,
/// "missing config key".)
pub fn inherited_environment(allow: &[String]) -> Vec<(OsString, OsString)> {
    agents_share(std::env::vars_os(), allow)
}

/// [`inherited_environment`] of the agent's environment `vars`.
fn agents_share(vars: impl IntoIterator<Item = (OsString, OsString)>, allow: &[String]) -> Vec<(OsString, OsString)> {
    let mut share = ClaudeEnv::from(passed_on(vars, allow));
    with_git_settings(&mut share);
    // Nothing inherited: every variable is in what it sets, in order.
    share.set
}

/// The variables of `vars` Claude may inherit: allow-listed ([`PASSED`],
/// [`PASSED_PREFIXES`], the operator's `allow`), and never one of the agent's secrets.
fn passed_on(vars: impl IntoIterator<Item = (OsString, OsString)>, allow: &[String]) -> Vec<(OsString, OsString)> {
    let passed = |name: &str| {
        !crate::config::SECRET_VARS.contains(&name)
            && (PASSED.contains(&name) || PASSED_PREFIXES.iter().any(|p| name.starts_with(p)) || allow.iter().any(|a| a == name))
    };
    vars.into_iter().filter(|(name, _)| name.to_str().is_some_and(passed)).collect()
}

/// One run of Claude: what to start and where.
pub struct Launch<'a> {
    pub program: &'a str,
    pub args: Vec<String>,
    pub cwd: &'a Path,
    /// Claude's whole environment (see [`claude_environment`]); nothing else is inherited.
    pub env: ClaudeEnv,
    /// Written to stdin, which is then closed.
    pub stdin: String,
}

/// How the run went, for [`crate::claude::result`].
pub struct Finished {
    pub ending: Ending,
    /// The last few KiB Claude wrote to stderr.
    pub stderr: String,
}

/// The agent's end of a warden's control pipe (see [`crate::warden`]): a byte asks for a
/// gentle stop, closing it kills the whole tree.
struct Control(Option<OwnedFd>);

impl Control {
    /// The control pipe: the agent keeps the write end, the warden gets the read end.
    fn pipe() -> std::io::Result<(Control, OwnedFd)> {
        let (read, write) = pipe()?;
        Ok((Control(Some(write)), read))
    }

    fn stop(&self) {
        use std::os::fd::AsRawFd;
        if let Some(fd) = &self.0 {
            // SAFETY: a one-byte write on a pipe we own; a full or closed pipe is fine.
            unsafe { libc::write(fd.as_raw_fd(), [crate::warden::STOP].as_ptr().cast(), 1) };
        }
    }

    fn kill(&mut self) {
        self.0 = None;
    }
}

/// The agent's end of a pipe made by [`pipe`] or a socket made by [`socket_pair`], made
/// non-blocking for the runtime: one `fcntl` (the end was just made, so its other flags
/// are known: none). Tokio's checked pipe constructors would `fstat` it and read its flags
/// first, three calls per pipe, four ends per job.
fn nonblocking(end: OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: sets the status flags of a descriptor we own.
    if unsafe { libc::fcntl(end.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end)
}

/// Bytes of output Claude may write ahead of the agent's reads: the send buffer of
/// Claude's end of stdout (the kernel counts twice this, with its bookkeeping). The CLI
/// writes to a socket (or a pipe) asynchronously and exits right after its result line;
/// what the kernel did not take by then is lost (anthropics/claude-code#77112: a pipe's
/// 64 KiB; a socket's default, `net.core.wmem_default`, is about 200 KB). The last lines
/// carry the answer twice (its assistant message and its result, up to [`MAX_OUTPUT_BYTES`]
/// each as the agent keeps them), so this holds both of a 1 MiB answer. The memory is
/// taken only while Claude is ahead of the agent, which reads as Claude writes.
///
/// [`MAX_OUTPUT_BYTES`]: crate::claude::MAX_OUTPUT_BYTES
const STDOUT_BUFFER: libc::c_int = 4 * 1024 * 1024;

/// Whether `SO_SNDBUFFORCE` was refused (it needs CAP_NET_ADMIN): then only `SO_SNDBUF`
/// is asked, which the kernel caps at `net.core.wmem_max` — one call per job, not two.
static FORCE_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Gives Claude's end of stdout [`STDOUT_BUFFER`], or as much of it as this agent may:
/// past `net.core.wmem_max` only with CAP_NET_ADMIN (an agent run as root). Best effort:
/// a smaller buffer only means a large last line may be cut, as the CLI cuts it anyway.
fn widen_stdout(end: &OwnedFd) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::Relaxed;
    let set = |option| {
        // SAFETY: sets an integer option of a socket we own, from a value on our stack.
        unsafe {
            libc::setsockopt(end.as_raw_fd(), libc::SOL_SOCKET, option, (&STDOUT_BUFFER as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
        }
    };
    if FORCE_REFUSED.load(Relaxed) || set(libc::SO_SNDBUFFORCE) != 0 {
        FORCE_REFUSED.store(true, Relaxed);
        set(libc::SO_SNDBUF);
    }
}

/// This agent's launcher (see [`crate::launcher`]), started with the first job.
static LAUNCHER: Launcher = Launcher::new();

/// The thread every job's start through [`LAUNCHER`] is sent to, in turn ([`crate::trips::Lane`]).
static LAUNCHES: crate::trips::Lane = crate::trips::Lane::new("claude-runner-launches");

/// Starts this agent's launcher ahead of the first job.
pub fn start_launcher() -> std::io::Result<()> {
    LAUNCHER.start()
}

/// One standard stream of a child the agent starts (Claude, `claude auth login`): a socket
/// pair ([`socket_pair`]), the agent's end registered with the runtime, and the child's.
/// Not a pipe: the child is dumpable after its `exec`, so any process of the agent's user
/// — a job's — may open its `/proc/<pid>/fd/N`, which reopens a pipe (to read what goes
/// in or comes out, or to write into it) but refuses a socket (ENXIO). As a pipe's, a
/// socket's end of input comes when every holder of the child's end has closed it (the
/// child and whatever it started): the agent keeps no copy of it once the child has it.
pub fn stream() -> std::io::Result<(UnixStream, OwnedFd)> {
    let (agent, child) = socket_pair()?;
    Ok((UnixStream::from_std(std::os::unix::net::UnixStream::from(nonblocking(agent)?))?, child))
}

/// Ends and reaps the agent's helpers (its launcher, then the zygote), so that the agent
/// exits alone: what it leaves running dies of its parent-death signal only as the agent
/// exits, racing the service manager's sweep of what is left (see [`Launcher::stop`]).
pub fn end_helpers() {
    LAUNCHER.stop();
    crate::zygote::stop();
}

/// A running Claude, as the agent holds it: its warden's pid, its standard streams (the
/// agent's ends of three socket pairs), and the exit status to come.
struct Claude {
    pid: u32,
    pidfd: Option<OwnedFd>,
    /// Not registered with the runtime: the prompt is written into it by the thread that
    /// made the job's started record durable ([`run`]).
    stdin: Option<std::os::unix::net::UnixStream>,
    stdout: Option<UnixStream>,
    stderr: Option<UnixStream>,
    control: Option<Control>,
    /// Reads the warden's status pipe to its end.
    exited: Option<tokio::task::JoinHandle<Option<i32>>>,
    exit: Option<Option<i32>>,
}

impl Claude {
    /// The streams and pipes of a Claude about to start: the agent's ends (registered with
    /// the runtime) in a `Claude` whose pid comes with [`Claude::started`], and the child's
    /// ends for the launcher. Claude's exit (and its tree's) is then seen as the ends of
    /// these: the agent keeps no copy of the child's ends once they are sent.
    ///
    /// Claude's stdin, stdout and stderr are socket pairs, not pipes ([`stream`]): another
    /// caller's job could reopen a pipe to read Claude's prompt or its lines, or to write
    /// a forged result line into its stdout.
    fn pipes() -> std::io::Result<(Claude, ChildEnds)> {
        let (stdin_agent, stdin_claude) = socket_pair()?;
        let stdin_agent = std::os::unix::net::UnixStream::from(nonblocking(stdin_agent)?);
        let (stdout_agent, stdout_claude) = stream()?;
        widen_stdout(&stdout_claude);
        let (stderr_agent, stderr_claude) = stream()?;
        let (status_read, status_write) = pipe()?;
        let (control, control_read) = Control::pipe()?;
        let ends = ChildEnds { stdin: stdin_claude, stdout: stdout_claude, stderr: stderr_claude, control: control_read, status: status_write };
        let mut status = pipe::Receiver::from_owned_fd_unchecked(nonblocking(status_read)?)?;
        let exited = tokio::spawn(async move {
            // The warden writes the status once Claude's tree is gone, then exits: its four
            // bytes are the end of the job, not the pipe's close (which waits for the
            // warden's own exit, 0.1-0.2 ms later). A warden dead before writing them is
            // an early end of the pipe: no status.
            let mut bytes = [0u8; 4];
            status.read_exact(&mut bytes).await.ok()?;
            let wait_status = i32::from_le_bytes(bytes);
            // As std's ExitStatus::code: the exit code, none for a signal.
            libc::WIFEXITED(wait_status).then(|| libc::WEXITSTATUS(wait_status))
        });
        let claude = Claude {
            pid: 0,
            pidfd: None,
            stdin: Some(stdin_agent),
            stdout: Some(stdout_agent),
            stderr: Some(stderr_agent),
            control: Some(control),
            exited: Some(exited),
            exit: None,
        };
        Ok((claude, ends))
    }

    /// The launcher started it.
    fn started(&mut self, started: crate::launcher::Started) {
        self.pid = started.pid;
        self.pidfd = started.pidfd;
    }

    /// Claude's exit code once its warden has reported it (none after a signal, or when the
    /// warden died without a word). Cancel-safe: it may be called again after being cut short.
    async fn wait(&mut self) -> Option<i32> {
        if let Some(exit) = self.exit {
            return exit;
        }
        let exit = match self.exited.as_mut() {
            Some(exited) => exited.await.ok().flatten(),
            None => None,
        };
        self.exited = None;
        self.exit = Some(exit);
        exit
    }

    /// The last resort, when the warden itself does not end: SIGKILL to it (Claude dies
    /// with it, by its parent-death signal). Through the pidfd, so never another process
    /// that got its pid.
    fn kill_warden(&self) {
        match &self.pidfd {
            Some(fd) => {
                let _ = crate::pidfd::signal(fd, libc::SIGKILL);
            }
            None => warn!(pid = self.pid, "the warden does not end and this kernel has no pidfd to kill it with"),
        }
    }
}

/// Between a job's run and the trip that makes its started record ([`run`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Gate {
    /// Neither has decided yet.
    Open,
    /// The record's trip made its record: the rest of its way — the prompt, which never
    /// waits — is its own. (A record refused leaves the gate `Open`: no prompt goes.)
    Passed,
    /// The job ended first (its deadline, a cancel, the agent's drain): the record's trip
    /// gives no prompt and undoes its record.
    Shut,
}

/// How a job whose Claude could not be started (`e`) ends: a missing binary
/// (`not_found` says what to do), no room for a process now — the user's process limit
/// (`EAGAIN`), the machine's memory (`ENOMEM`): [`Ending::NoRoom`], no fault of the job's —
/// or a start that failed.
fn start_failed(e: &std::io::Error, program: &str, not_found: impl FnOnce() -> String) -> Ending {
    match e.raw_os_error() {
        _ if e.kind() == std::io::ErrorKind::NotFound => Ending::SpawnFailed(not_found()),
        Some(libc::EAGAIN | libc::ENOMEM) => Ending::NoRoom(format!("could not start `{program}`: {e}")),
        _ => Ending::SpawnFailed(format!("could not start `{program}`: {e}")),
    }
}

/// Runs Claude until it ends, `deadline` passes or `stop` fires, handing each stdout line
/// to `on_line`. Whatever happens, nothing of its process group is left running.
/// `started` is called once Claude was spawned and `ready` (its durable started marker,
/// made on a trip thread, [`crate::trips`], while the launcher starts Claude) is done: never for a
/// job whose Claude could not be started.
///
/// The deadline and `stop` end a start stuck behind the launcher or on its record too. A
/// record still being made then has no prompt given after it; `unready` is called on its
/// thread once it is done instead (to clear a record made for a job that ended), and a
/// Claude the launcher starts after finds its control pipe closed: its warden kills it.
/// Such a job ends as one Claude never ran, unless the launcher had started Claude and its
/// prompt was given: it ends as a run cut short.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    launch: Launch<'_>,
    job_id: &str,
    deadline: BootInstant,
    timeout_ms: u64,
    stop: &mut oneshot::Receiver<Stop>,
    ready: impl FnOnce() -> Result<(), String> + Send + 'static,
    unready: impl FnOnce() + Send + 'static,
    started: impl FnOnce(),
    mut on_line: impl FnMut(&[u8]),
) -> Finished {
    let not_found = || {
        format!(
            "the Claude Code binary `{}` was not found: install it (`npm install -g @anthropic-ai/claude-code`) or set CLAUDE_BIN",
            launch.program
        )
    };
    let Some(program) = find_binary(launch.program) else {
        return Finished { ending: Ending::SpawnFailed(not_found()), stderr: String::new() };
    };
    let Launch { args, cwd, env, stdin: prompt, .. } = launch;
    let (cwd, launch_program) = (cwd.to_path_buf(), launch.program.to_string());
    let could_not_start = |e: std::io::Error| Finished { ending: start_failed(&e, &launch_program, not_found), stderr: String::new() };
    let (mut child, ends) = match Claude::pipes() {
        Ok(pipes) => pipes,
        Err(e) => return could_not_start(e),
    };
    // Both trips on the agent's own threads ([`crate::trips`]), beside each other: the
    // launcher's on its lane (it starts one Claude at a time), the record's on a thread of
    // its own.
    let start = LAUNCHES.run(move || LAUNCHER.spawn(&Spawn { program: &program, cwd: &cwd, args: &args, env: &env }, ends));
    // `ready` (the job's durable "started" record) is made while Claude starts, and the
    // prompt — Claude's work — goes into its stdin the moment it is done, by the thread
    // that made it, whether or not Claude is up yet (the socket holds it): the runtime
    // thread is not woken for it, only once for the launcher's answer, by when the record
    // is most often done. Until then stdin stays open and empty: a Claude killed for want
    // of the record never reads a prompt, not even an empty one.
    let stdin = child.stdin.take();
    // Whether the record's trip may go on to the prompt, or the job ended while its start
    // was stuck (the record or the launcher): decided once, under this lock, by whichever of
    // the two comes first.
    let gate = Arc::new(std::sync::Mutex::new(Gate::Open));
    let feed = {
        let gate = Arc::clone(&gate);
        crate::trips::run(move || {
            // Even a panic there hands stdin back unwritten, to be closed only once Claude is
            // killed.
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(ready));
            {
                let mut gate = gate.lock().unwrap_or_else(|e| e.into_inner());
                if *gate == Gate::Shut {
                    drop(gate);
                    // The job ended meanwhile: no prompt, and no record left behind that
                    // a restart would report lost.
                    drop(stdin);
                    unready();
                    return Err(("the job ended before its start was recorded".to_string(), None));
                }
                // Only a record made lets the prompt go: one refused leaves the gate as it
                // was, so that the job's end then says Claude never ran.
                if matches!(made, Ok(Ok(()))) {
                    *gate = Gate::Passed;
                }
            }
            match made {
                Ok(Ok(())) => Ok(stdin.and_then(|stdin| feed_prompt(stdin, prompt))),
                Ok(Err(why)) => Err((why, stdin)),
                Err(_) => Err(("recording that the job starts failed (a bug: see the agent's log), so it was not started".to_string(), stdin)),
            }
        })
    };
    // One wait for the whole run, not one per line; on the boot clock, so a deadline that
    // passed while the machine slept ends the run on resume ([`crate::boot_clock`]).
    let timed_out = boot_clock::sleep_until(deadline);
    tokio::pin!(timed_out);
    // The launcher first: awaited in this order, a record done before the answer wakes
    // nothing (a oneshot wakes only a task that has polled it). Both raced against the
    // deadline and the stop: the launcher's exchange is bounded only by its own wait, a
    // record's write (a hung DATA_DIR) not at all.
    // (An atomic only for the future to stay `Send`: one task reads and writes it.)
    let launched = std::sync::atomic::AtomicBool::new(false);
    let starting = async {
        let spawned = start.await;
        launched.store(matches!(spawned, Ok(Ok(_))), std::sync::atomic::Ordering::Relaxed);
        (spawned, feed.await)
    };
    tokio::pin!(starting);
    // `biased`, the start first: a start done is a run, even when the stop or the deadline
    // is ready at the same poll (a runtime thread busy while Claude started and read its
    // prompt); a fair pick ended such a run "Claude never ran". Polled first, the start
    // has also heard the launcher's answer, if sent, when `launched` is read below.
    let ended = tokio::select! {
        biased;
        both = &mut starting => Ok(both),
        _ = &mut timed_out => Err(None),
        s = &mut *stop => Err(Some(s)),
    };
    let (spawned, fed) = match ended {
        Ok(both) => both,
        Err(cut) => {
            let recorded = std::mem::replace(&mut *gate.lock().unwrap_or_else(|e| e.into_inner()), Gate::Shut) == Gate::Passed;
            // Started by the launcher and its prompt given (its trip just not answered yet):
            // Claude may have read it and begun, so the words are those of a run cut short.
            // Else Claude never ran: killed as it starts, whether or not its prompt was in.
            let ending = match (cut, recorded && launched.load(std::sync::atomic::Ordering::Relaxed)) {
                (None, true) => Ending::TimedOut { after_ms: timeout_ms },
                (None, false) => Ending::TimedOutUnstarted { after_ms: timeout_ms },
                (Some(s), true) => Stop::ending(s),
                (Some(s), false) => Stop::ending_unstarted(s),
            };
            // Returning drops `child`, and with it the control pipe: a Claude the launcher
            // starts after this finds it closed, and its warden kills it at once. Its
            // trips run to their end on their threads.
            warn!(job_id, ending = ?ending, recorded, "the job ended while its start was stuck (the launcher or its started record): claude is killed as it starts");
            return Finished { ending, stderr: String::new() };
        }
    };
    let fed = fed.unwrap_or_else(|e| Err((format!("the start was cut short: {e}"), None)));
    let spawned = spawned.unwrap_or_else(|e| Err(std::io::Error::other(format!("the start was cut short: {e}"))));
    match fed {
        Err((why, stdin)) => {
            if spawned.is_ok() {
                // Closing the control pipe kills it; it never saw a prompt.
                drop(child.control.take());
                let _ = child.wait().await;
            }
            drop(stdin);
            return Finished { ending: Ending::NotStarted(why), stderr: String::new() };
        }
        // The rest of a prompt larger than the socket's buffer goes in while Claude reads
        // it; the shutdown ends Claude's input whoever else may hold the agent's end (a
        // process the agent forks holds it until its `exec`).
        Ok(Some((stdin, rest))) => {
            // A second descriptor of it is held while it is handed to the runtime: should
            // that fail (the user's epoll watches used up, by a job), Claude is killed
            // before its input can end on part of its prompt.
            let held = stdin.try_clone();
            match UnixStream::from_std(stdin) {
                Ok(mut stdin) => {
                    drop(held);
                    tokio::spawn(async move {
                        let _ = stdin.write_all(&rest).await;
                        let _ = stdin.shutdown().await;
                    });
                }
                Err(e) => {
                    if spawned.is_ok() {
                        drop(child.control.take());
                        let _ = child.wait().await;
                    }
                    drop(held);
                    let why = format!("could not give Claude the rest of its prompt ({e}), so it was not started");
                    return Finished { ending: Ending::NotStarted(why), stderr: String::new() };
                }
            }
        }
        Ok(None) => {}
    }
    match spawned {
        Ok(spawned) => child.started(spawned),
        Err(e) => return could_not_start(e),
    }
    started();
    let pid = child.pid;
    info!(job_id, pid, "claude started");

    let stderr_task = child.stderr.take().map(|mut err| {
        tokio::spawn(async move {
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL_BYTES * 2 {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
            String::from_utf8_lossy(&tail[tail.len().saturating_sub(STDERR_TAIL_BYTES)..]).into_owned()
        })
    });
    let mut stdout = BufReader::with_capacity(64 * 1024, child.stdout.take().expect("stdout is the agent's"));
    let mut control = child.control.take().expect("the control pipe is ours");

    let mut stdout_open = true;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut line = Line::default();
    let stopped: Option<Ending> = loop {
        if child.exit.is_some() && !stdout_open {
            break None;
        }
        tokio::select! {
            read = read_line_capped(&mut stdout, &mut line, MAX_LINE_BYTES), if stdout_open => {
                match read {
                    Ok(false) | Err(_) => stdout_open = false,
                    Ok(true) => {
                        on_line(&line.bytes);
                        line = Line::default();
                    }
                }
            }
            _ = child.wait(), if child.exit.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => {
                // Claude is gone but something it started still holds stdout.
                break None;
            }
            _ = &mut timed_out => {
                break Some(Ending::TimedOut { after_ms: timeout_ms });
            }
            s = &mut *stop => {
                break Some(Stop::ending(s));
            }
        }
    };
    let ending = match stopped {
        None => Ending::Exited(child.exit.flatten()),
        Some(ending) => {
            warn!(job_id, ending = ?ending, "stopping claude");
            control.stop();
            if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
                control.kill();
                if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_err() {
                    // The warden itself is stuck: it goes, and Claude with it.
                    child.kill_warden();
                    let _ = child.wait().await;
                }
            }
            ending
        }
    };
    // Whatever Claude left behind goes too (the warden has done so if Claude exited).
    control.kill();
    let stderr = match stderr_task {
        Some(t) => tokio::time::timeout(Duration::from_secs(1), t).await.ok().and_then(Result::ok).unwrap_or_default(),
        None => String::new(),
    };
    Finished { ending, stderr }
}

/// Writes what of `prompt` Claude's stdin takes now (most prompts: all of it, and its end
/// then said), without waiting: called on the thread that made the job's started record
/// durable, never the runtime's. What is left, with the stream, is for the caller to send.
fn feed_prompt(stdin: std::os::unix::net::UnixStream, prompt: String) -> Option<(std::os::unix::net::UnixStream, Vec<u8>)> {
    use std::io::Write;
    let bytes = prompt.into_bytes();
    // Non-blocking: a full buffer (or a Claude already gone) writes less, never waits.
    let written = (&stdin).write(&bytes).unwrap_or(0);
    if written < bytes.len() {
        let mut rest = bytes;
        rest.drain(..written);
        return Some((stdin, rest));
    }
    let _ = stdin.shutdown(std::net::Shutdown::Write);
    None
}

/// A stdout line being read. It lives across reads: the read runs inside a `select!`, and
/// when another branch wins (Claude exits, a timeout) mid-line, the next read must go on
/// from there, not lose what was taken.
#[derive(Default)]
struct Line {
    /// The line so far, without its newline, at most `max` bytes of it.
    bytes: Vec<u8>,
    /// Some of it was read (an empty line has no bytes but has begun).
    begun: bool,
}

/// Reads the rest of the current line into `line`, keeping at most `max` bytes of it and
/// discarding the rest. Cancel-safe. True when a line is complete (its newline, or the end
/// of input after part of one); false at the end of input with nothing pending.
async fn read_line_capped<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Line, max: usize) -> std::io::Result<bool> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(std::mem::take(&mut line.begun));
        }
        line.begun = true;
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        let room = max.saturating_sub(line.bytes.len());
        line.bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(available.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review rev20, finding 4: a job started while other processes of the agent's user
    /// held its process limit full ended CLAUDE_ERROR, not retryable, "could not start …:
    /// Resource temporarily unavailable (os error 11)" — though it never ran. No room for
    /// a process (EAGAIN, ENOMEM) is `NoRoom`: the job goes back unstarted.
    #[test]
    fn a_start_refused_for_want_of_processes_or_memory_is_no_room() {
        let missing = || "missing".to_string();
        for errno in [libc::EAGAIN, libc::ENOMEM] {
            let ending = start_failed(&std::io::Error::from_raw_os_error(errno), "claude", missing);
            assert!(matches!(&ending, Ending::NoRoom(e) if e.starts_with("could not start `claude`")), "{ending:?}");
        }
        let denied = start_failed(&std::io::Error::from_raw_os_error(libc::EACCES), "claude", missing);
        assert!(matches!(denied, Ending::SpawnFailed(_)), "{denied:?}");
        assert_eq!(start_failed(&std::io::Error::from_raw_os_error(libc::ENOENT), "claude", missing), Ending::SpawnFailed("missing".into()));
    }

    /// `up` and `doctor` said "no `claude` on PATH" with CLAUDE_BIN set to another name or
    /// a path: the message now names what was looked for.
    #[test]
    fn a_missing_claude_is_named_as_claude_bin_gives_it() {
        let default = install_claude("claude");
        assert!(default.starts_with("Claude Code is not installed (no `claude` on PATH).") && default.contains("npm install -g"), "{default}");
        // Set to another name (a typo: `claud`): no such binary, check CLAUDE_BIN — not
        // "Claude Code is not installed".
        let other = install_claude("claud");
        assert!(other.starts_with("No binary `claud` was found on PATH; CLAUDE_BIN names it.") && other.contains("Check CLAUDE_BIN"), "{other}");
        assert!(!other.contains("not installed ("), "{other}");
        let at = install_claude("/opt/claude/bin/claude");
        assert!(at.starts_with("No Claude Code binary at `/opt/claude/bin/claude`, which CLAUDE_BIN names") && at.contains("Check CLAUDE_BIN"), "{at}");
    }

    #[test]
    fn claude_sees_only_allowed_variables_and_never_a_secret() {
        let inherited = [
            ("HOME", "/home/spark"), ("PATH", "/usr/bin"), ("LC_ALL", "C.UTF-8"), ("CLAUDE_CODE_MAX_RETRIES", "2"),
            ("DISABLE_TELEMETRY", "1"), ("ANTHROPIC_BASE_URL", "http://127.0.0.1:9"), ("NPM_CONFIG_REGISTRY", "r"),
            ("AGENT_SIGNING_KEY", "k"), ("RUNNER_SECRET", "s"), ("GITHUB_TOKEN", "g"), ("REPO_TOKENS", "h=t"),
            ("EDGE_SIGNING_KEY", "e"), ("CLAUDE_CODE_OAUTH_TOKEN", "inherited-token"), ("ANTHROPIC_API_KEY", "a"),
            ("AGENT_KEY_FILE", "/k"), ("AWS_SECRET_ACCESS_KEY", "x"), ("RANDOM_THING", "y"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let allow = vec!["NPM_CONFIG_REGISTRY".to_string(), "RUNNER_SECRET".to_string()];
        let login = vec![("CLAUDE_CODE_OAUTH_TOKEN", "login-token".to_string())];
        let job = vec![("CLAUDE_CONFIG_DIR".to_string(), OsString::from("/cfg")), ("HOME".to_string(), OsString::from("/job-home"))];
        let inherited: Arc<[(OsString, OsString)]> = agents_share(inherited, &allow).into();
        let env = claude_environment(&inherited, login, job);
        let names: Vec<&OsStr> = env.vars().map(|(k, _)| k).collect();
        assert!(names.iter().all(|n| names.iter().filter(|m| *m == n).count() == 1), "each once: {names:?}");
        let env: std::collections::HashMap<String, String> = env.vars().map(|(k, v)| (k.to_str().unwrap().to_string(), v.to_str().unwrap().to_string())).collect();
        let mut names: Vec<&str> = env.keys().map(String::as_str).filter(|n| !n.starts_with("GIT_CONFIG_")).collect();
        names.sort();
        assert_eq!(
            names,
            ["ANTHROPIC_BASE_URL", "CLAUDE_CODE_MAX_RETRIES", "CLAUDE_CODE_OAUTH_TOKEN", "CLAUDE_CONFIG_DIR", "DISABLE_TELEMETRY", "HOME", "LC_ALL", "NPM_CONFIG_REGISTRY", "PATH"]
        );
        assert_eq!(env["CLAUDE_CODE_OAUTH_TOKEN"], "login-token", "the login's token, not an inherited one");
        assert_eq!(env["HOME"], "/job-home", "the job's settings win");
    }

    /// Git in Claude's environment uses no bare repository it was not pointed at (rev25, 1),
    /// after whatever `GIT_CONFIG_*` pairs the operator passes.
    #[test]
    fn git_in_claudes_environment_finds_no_bare_repository_by_itself() {
        let env_of = |inherited: &[(&str, &str)], allow: &[&str]| -> std::collections::HashMap<String, String> {
            let inherited = inherited.iter().map(|(k, v)| (OsString::from(k), OsString::from(v)));
            let allow: Vec<String> = allow.iter().map(|a| a.to_string()).collect();
            let inherited: Arc<[(OsString, OsString)]> = agents_share(inherited, &allow).into();
            claude_environment(&inherited, Vec::new(), Vec::new()).vars().map(|(k, v)| (k.to_str().unwrap().to_string(), v.to_str().unwrap().to_string())).collect()
        };
        let git = |env: &std::collections::HashMap<String, String>| {
            let mut v: Vec<(String, String)> = env.iter().filter(|(k, _)| k.starts_with("GIT_CONFIG_")).map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort();
            v
        };
        let pairs = |list: &[(&str, &str)]| list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            git(&env_of(&[("PATH", "/usr/bin")], &[])),
            pairs(&[("GIT_CONFIG_COUNT", "1"), ("GIT_CONFIG_KEY_0", "safe.bareRepository"), ("GIT_CONFIG_VALUE_0", "explicit")])
        );
        // The operator's pairs stay, ours come after them (the last one read wins).
        let theirs = [("GIT_CONFIG_COUNT", "2"), ("GIT_CONFIG_KEY_0", "http.sslVerify"), ("GIT_CONFIG_VALUE_0", "true"), ("GIT_CONFIG_KEY_1", "safe.bareRepository"), ("GIT_CONFIG_VALUE_1", "all")];
        let allow = ["GIT_CONFIG_COUNT", "GIT_CONFIG_KEY_0", "GIT_CONFIG_VALUE_0", "GIT_CONFIG_KEY_1", "GIT_CONFIG_VALUE_1"];
        assert_eq!(
            git(&env_of(&theirs, &allow)),
            pairs(&[
                ("GIT_CONFIG_COUNT", "3"), ("GIT_CONFIG_KEY_0", "http.sslVerify"), ("GIT_CONFIG_KEY_1", "safe.bareRepository"), ("GIT_CONFIG_KEY_2", "safe.bareRepository"),
                ("GIT_CONFIG_VALUE_0", "true"), ("GIT_CONFIG_VALUE_1", "all"), ("GIT_CONFIG_VALUE_2", "explicit"),
            ])
        );
        // Not passed (not allowed), or no number: only ours.
        for (inherited, allow) in [(&theirs[..], &[][..]), (&[("GIT_CONFIG_COUNT", "many")][..], &["GIT_CONFIG_COUNT"][..])] {
            let env = git(&env_of(inherited, allow));
            assert_eq!(env, pairs(&[("GIT_CONFIG_COUNT", "1"), ("GIT_CONFIG_KEY_0", "safe.bareRepository"), ("GIT_CONFIG_VALUE_0", "explicit")]));
        }
    }

    /// A job's environment holds the agent's share of its own as it is, not a copy of it
    /// (each variable copied, the allow-lists applied again and the git settings made
    /// again at every job's start: 5-7 % of the agent's allocations, issue 11), and gives
    /// each variable once, what the job sets in place of what it inherits.
    #[test]
    fn a_jobs_environment_shares_the_agents_own() {
        let agents: Arc<[(OsString, OsString)]> = [("HOME", "/home/spark"), ("PATH", "/usr/bin"), ("LANG", "C.UTF-8")].map(|(k, v)| (OsString::from(k), OsString::from(v))).into();
        let env = claude_environment(&agents, vec![("CLAUDE_CODE_OAUTH_TOKEN", "t".to_string())], vec![("HOME".to_string(), OsString::from("/job"))]);
        assert_eq!(Arc::strong_count(&agents), 2, "shared, not copied");
        // The git settings are the share's, made once at the agent's start: a job adds
        // only its login and its own.
        let vars: Vec<(&str, &str)> = env.vars().map(|(k, v)| (k.to_str().unwrap(), v.to_str().unwrap())).collect();
        assert_eq!(vars, [("PATH", "/usr/bin"), ("LANG", "C.UTF-8"), ("CLAUDE_CODE_OAUTH_TOKEN", "t"), ("HOME", "/job")]);
        drop(env);
        assert_eq!(Arc::strong_count(&agents), 1);
    }

    /// The operator's git settings passed on (`JOB_ENV_ALLOW`) and ours after them make a
    /// whole set git reads, in the environment a job's Claude gets as the runner makes it
    /// (the agent's share of its own environment, read once at its start, then the job's
    /// additions). The share was made with the git settings already in it and the job's
    /// added them again, one index further: git refused the set ("missing config key
    /// GIT_CONFIG_KEY_1") and every git Claude ran failed.
    #[test]
    fn the_operators_git_settings_and_ours_make_a_set_git_reads() {
        let agents = [("PATH", "/usr/bin:/bin"), ("GIT_CONFIG_COUNT", "1"), ("GIT_CONFIG_KEY_0", "core.abbrev"), ("GIT_CONFIG_VALUE_0", "9")];
        let allow: Vec<String> = ["GIT_CONFIG_COUNT", "GIT_CONFIG_KEY_0", "GIT_CONFIG_VALUE_0"].map(String::from).to_vec();
        let inherited: Arc<[(OsString, OsString)]> = agents_share(agents.map(|(k, v)| (OsString::from(k), OsString::from(v))), &allow).into();
        let env = claude_environment(&inherited, Vec::new(), Vec::new());
        let git = |key: &str| {
            let out = std::process::Command::new("git").args(["config", "--get", key]).env_clear().envs(env.vars()).output().unwrap();
            assert!(out.status.success(), "git refused the environment: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        assert_eq!(git("core.abbrev"), "9", "the operator's setting");
        assert_eq!(git("safe.bareRepository"), "explicit", "ours");
    }

    /// The prompt goes into Claude's stdin from the thread that made the job's started
    /// record durable, the moment it is, not from the runtime's thread: that one is woken
    /// only for the launcher's answer (a wake-up fewer a job), and a runtime thread busy
    /// with other jobs does not hold Claude's work back. Here the runtime's one thread is
    /// held, blocked, from before the record is done until Claude has its prompt.
    #[tokio::test(flavor = "current_thread")]
    async fn the_prompt_goes_in_from_the_thread_that_made_the_record_durable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cr-process-prompt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let got = dir.join("got");
        let claude = dir.join("claude.sh");
        std::fs::write(&claude, format!("#!/bin/sh\ncat > '{0}.part' && mv '{0}.part' '{0}'\n", got.display())).unwrap();
        std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
        let program = claude.to_string_lossy().into_owned();
        let env = vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
        let launch = Launch { program: &program, args: Vec::new(), cwd: &dir, env: env.into(), stdin: "the prompt".into() };
        let (_stop, mut stop) = oneshot::channel();
        let deadline = BootInstant::now() + Duration::from_secs(300);
        // The record is done only once the runtime's thread is held.
        let (holding, held) = std::sync::mpsc::channel::<()>();
        let ready = move || {
            held.recv().map_err(|_| "the test ended".to_string())?;
            Ok(())
        };
        let run = run(launch, "j", deadline, 300_000, &mut stop, ready, || {}, || {}, |_: &[u8]| {});
        let hold = async {
            // Once round first, so that the run has asked for the record and the launcher.
            tokio::task::yield_now().await;
            holding.send(()).unwrap();
            // Blocks this runtime's only thread: nothing on it runs meanwhile. Bounded
            // only so that a failure ends the test.
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !got.exists() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            got.exists()
        };
        let (finished, had_it) = tokio::join!(run, hold);
        assert!(had_it, "Claude got no prompt while the runtime's thread was held");
        assert_eq!(std::fs::read_to_string(&got).unwrap(), "the prompt");
        assert_eq!(finished.ending, Ending::Exited(Some(0)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A started record whose write hangs until `release` is sent (`ready`), and the
    /// clearing of a record made late (`unready`), told through `was_cleared`.
    fn record_held() -> (
        std::sync::mpsc::Sender<()>,
        impl FnOnce() -> Result<(), String> + Send + 'static,
        impl FnOnce() + Send + 'static,
        oneshot::Receiver<()>,
    ) {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let ready = move || {
            stuck.recv().map_err(|_| "the test ended".to_string())?;
            Ok(())
        };
        let (cleared, was_cleared) = oneshot::channel();
        let unready = move || {
            let _ = cleared.send(());
        };
        (release, ready, unready, was_cleared)
    }

    /// A stand-in Claude that writes its pid, then what it reads, for the stuck-start tests.
    fn stuck_start_claude(name: &str) -> (PathBuf, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cr-process-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let claude = dir.join("claude.sh");
        let (pid, got) = (dir.join("pid"), dir.join("got"));
        std::fs::write(&claude, format!("#!/bin/sh\necho $$ > '{}'\ncat > '{1}.part' && mv '{1}.part' '{1}'\n", pid.display(), got.display())).unwrap();
        std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
        let program = claude.to_string_lossy().into_owned();
        (dir, program)
    }

    /// Once every start the launcher was asked for is done: if the stand-in Claude got as
    /// far as writing its pid, it is gone (its warden killed it: the control pipe closed),
    /// and (`prompt_unseen`) it never had its prompt. The bound only keeps a broken build from hanging.
    async fn no_claude_left(dir: &Path, prompt_unseen: bool) {
        LAUNCHES.run(|| ()).await.unwrap();
        if let Ok(pid) = std::fs::read_to_string(dir.join("pid")) {
            let pid: libc::pid_t = pid.trim().parse().unwrap();
            let until = std::time::Instant::now() + Duration::from_secs(60);
            // SAFETY: signal 0 only asks whether the process is there.
            while unsafe { libc::kill(pid, 0) } == 0 && std::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "a Claude spawned for a job that ended is still running");
        }
        if prompt_unseen {
            assert_ne!(std::fs::read_to_string(dir.join("got")).ok().as_deref(), Some("the prompt"), "Claude got the prompt of a job that ended");
        }
    }

    /// Review rev38, finding 5: a start whose started record hangs (a DATA_DIR write that
    /// never returns) was awaited before the run watched its stop: a cancel never ended the
    /// job. Now it ends CANCELLED at once; the record, made after all, is cleared on the
    /// record's thread (`unready`), and Claude — spawned meanwhile — is killed unprompted.
    #[tokio::test]
    async fn a_start_stuck_on_its_record_ends_by_cancel() {
        let (dir, program) = stuck_start_claude("stuck-record");
        let env = vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
        let launch = Launch { program: &program, args: Vec::new(), cwd: &dir, env: env.into(), stdin: "the prompt".into() };
        let (cancel, mut stop) = oneshot::channel();
        let deadline = BootInstant::now() + Duration::from_secs(300);
        let (release, ready, unready, was_cleared) = record_held();
        cancel.send(Stop::Cancelled("by the test".into())).unwrap();
        let run = run(launch, "j", deadline, 300_000, &mut stop, ready, unready, || panic!("a job that ended is not started"), |_: &[u8]| {});
        let finished = tokio::time::timeout(Duration::from_secs(30), run).await.expect("a start stuck on its record was not ended by its cancel");
        assert_eq!(finished.ending, Ending::Cancelled { reason: "by the test".into() });
        // The record is made after all: it is cleared, and the prompt never goes in.
        release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(60), was_cleared).await.expect("the record made after the job ended was not cleared").unwrap();
        no_claude_left(&dir, true).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review rev39, finding 3: a drain that ended a start stuck on its record said "the
    /// agent stopped while Claude was running", though Claude never ran. It says Claude
    /// never started, and that the task may be run again (RUNNER_LOST, retryable).
    #[tokio::test]
    async fn a_drain_ending_a_stuck_start_says_claude_never_ran() {
        let (dir, program) = stuck_start_claude("stuck-drain");
        let env = vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
        let launch = Launch { program: &program, args: Vec::new(), cwd: &dir, env: env.into(), stdin: "the prompt".into() };
        let (drain, mut stop) = oneshot::channel();
        let deadline = BootInstant::now() + Duration::from_secs(300);
        let (release, ready, unready, was_cleared) = record_held();
        drain.send(Stop::AgentStopping).unwrap();
        let run = run(launch, "j", deadline, 300_000, &mut stop, ready, unready, || panic!("a job that ended is not started"), |_: &[u8]| {});
        let finished = tokio::time::timeout(Duration::from_secs(30), run).await.expect("a start stuck on its record was not ended by the drain");
        let said = crate::claude::result(&crate::claude::Transcript::default(), finished.ending, "", 0);
        let words = said.error.clone().unwrap_or_default();
        assert_eq!((said.error_code, said.retryable), (Some(shared::contract::ErrorCode::RunnerLost), Some(true)), "{said:?}");
        assert!(!words.contains("while Claude was running") && words.contains("never ran") && words.contains("run the task again"), "{words}");
        release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(60), was_cleared).await.expect("the record made after the job ended was not cleared").unwrap();
        no_claude_left(&dir, true).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Review rev38, finding 5: a start stuck behind the launcher (another job's exchange,
    /// each bounded only by `answer_within`) did not end at its deadline. Now it ends
    /// TIMEOUT at the deadline, not started; the Claude the launcher starts later finds its control pipe
    /// closed and is killed at once. The record was made in time: it stays, for the job's
    /// result to be written beside it (not cleared).
    #[tokio::test]
    async fn a_start_stuck_behind_the_launcher_ends_at_its_deadline() {
        let (dir, program) = stuck_start_claude("stuck-launcher");
        let env = vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
        let launch = Launch { program: &program, args: Vec::new(), cwd: &dir, env: env.into(), stdin: "the prompt".into() };
        let (_stop, mut stop) = oneshot::channel();
        // The launcher's lane is busy until the test lets it go, as behind a stuck exchange.
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let busy = LAUNCHES.run(move || stuck.recv());
        let deadline = BootInstant::now() + Duration::from_millis(50);
        let cleared = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let unready = {
            let cleared = Arc::clone(&cleared);
            move || cleared.store(true, std::sync::atomic::Ordering::SeqCst)
        };
        let run = run(launch, "j", deadline, 50, &mut stop, || Ok(()), unready, || panic!("a job that ended is not started"), |_: &[u8]| {});
        let finished = tokio::time::timeout(Duration::from_secs(30), run).await;
        release.send(()).unwrap();
        let _ = busy.await;
        assert_eq!(finished.expect("a start stuck behind the launcher did not end at its deadline").ending, Ending::TimedOutUnstarted { after_ms: 50 });
        no_claude_left(&dir, false).await;
        assert!(!cleared.load(std::sync::atomic::Ordering::SeqCst), "a record made before the job ended is the result's to clear");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job cut (`drain`, else its deadline `deadline_ms` after its start) only once the
    /// launcher answered that Claude started and Claude has read its whole prompt: the
    /// runtime's only thread is held meanwhile (a large line being redacted, say), so at
    /// the run's next poll its start and its end are both ready. How it ended, each of
    /// `tries` times.
    async fn cut_once_claude_read_its_prompt(name: &str, drain: bool, deadline_ms: u64, tries: usize) -> Vec<Ending> {
        use std::os::unix::fs::PermissionsExt;
        let mut endings = Vec::new();
        for i in 0..tries {
            let dir = std::env::temp_dir().join(format!("cr-process-{name}-{}-{i}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let got = dir.join("got");
            let claude = dir.join("claude.sh");
            std::fs::write(&claude, format!("#!/bin/sh\ncat > '{0}.part' && mv '{0}.part' '{0}'\nsleep 300\n", got.display())).unwrap();
            std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
            let program = claude.to_string_lossy().into_owned();
            let env = vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
            let launch = Launch { program: &program, args: Vec::new(), cwd: &dir, env: env.into(), stdin: "the prompt".into() };
            let (stopping, mut stop) = oneshot::channel();
            let deadline = BootInstant::now() + Duration::from_millis(deadline_ms);
            // A task of its own, run once the run's first poll handed its start to the
            // launcher and the record's thread. Once it is done the runtime turns its
            // driver (a deadline passed fires) before it polls the run again.
            let hold = tokio::spawn(async move {
                // Queued behind this job's start on the launcher's lane: runs once the
                // launcher's answer is sent.
                let (answered, answer) = std::sync::mpsc::channel();
                drop(LAUNCHES.run(move || answered.send(())));
                answer.recv_timeout(Duration::from_secs(60)).expect("the launcher did not answer");
                // Bounded only so that a failure ends the test.
                let until = std::time::Instant::now() + Duration::from_secs(60);
                while !got.exists() && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                while BootInstant::now() < deadline && !drain {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Kept, not dropped, when not sent: a dropped one is a drain too.
                let stopping = match drain {
                    true => stopping.send(Stop::AgentStopping).map(|_| None).unwrap(),
                    false => Some(stopping),
                };
                (got.exists(), stopping)
            });
            let finished = run(launch, "j", deadline, deadline_ms, &mut stop, || Ok(()), || {}, || {}, |_: &[u8]| {}).await;
            assert!(hold.await.unwrap().0, "Claude did not read its prompt");
            endings.push(finished.ending);
            let _ = std::fs::remove_dir_all(&dir);
        }
        endings
    }

    /// Review rev40b-3: a drain heard together with the start of a Claude that had read its
    /// whole prompt ended the job "Claude never ran; run the task again as it is" (a fair
    /// pick between the two, 2 in 3). It says the agent stopped while Claude was running.
    #[tokio::test(flavor = "current_thread")]
    async fn a_drain_heard_with_the_start_of_a_claude_that_read_its_prompt_says_it_ran() {
        for ending in cut_once_claude_read_its_prompt("drain-read", true, 300_000, 12).await {
            let said = crate::claude::result(&crate::claude::Transcript::default(), ending.clone(), "", 0);
            let words = said.error.unwrap_or_default();
            assert!(ending == Ending::AgentStopping && words.contains("while Claude was running") && !words.contains("never ran"), "{ending:?}: {words}");
        }
    }

    /// Review rev40b-3: so did a deadline ("not started: ... Claude never ran", 1 in 3). It
    /// ends as a run that did not finish in time.
    #[tokio::test(flavor = "current_thread")]
    async fn a_deadline_passed_with_the_start_of_a_claude_that_read_its_prompt_says_it_ran() {
        for ending in cut_once_claude_read_its_prompt("deadline-read", false, 200, 12).await {
            assert_eq!(ending, Ending::TimedOut { after_ms: 200 });
        }
    }

    /// A prompt larger than the socket's buffer: what the record's thread could not write
    /// at once goes in from the runtime while Claude reads, and Claude gets it whole.
    #[tokio::test(flavor = "current_thread")]
    async fn a_prompt_larger_than_stdins_buffer_reaches_claude_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cr-process-large-prompt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let got = dir.join("got");
        let claude = dir.join("claude.sh");
        std::fs::write(&claude, format!("#!/bin/sh\nexec cat > '{}'\n", got.display())).unwrap();
        std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
        let program = claude.to_string_lossy().into_owned();
        let prompt: String = (0..4 * 1024 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let env = vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))];
        let launch = Launch { program: &program, args: Vec::new(), cwd: &dir, env: env.into(), stdin: prompt.clone() };
        let (_stop, mut stop) = oneshot::channel();
        let deadline = BootInstant::now() + Duration::from_secs(300);
        let finished = run(launch, "j", deadline, 300_000, &mut stop, || Ok(()), || {}, || {}, |_: &[u8]| {}).await;
        assert_eq!(finished.ending, Ending::Exited(Some(0)));
        assert!(std::fs::read_to_string(&got).unwrap() == prompt, "Claude's input is not the prompt");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn reads_lines_and_caps_long_ones() {
        let data = b"one\n\ntwo-long-line\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut line = Line::default();
        let mut lines = Vec::new();
        while read_line_capped(&mut r, &mut line, 5).await.unwrap() {
            lines.push(String::from_utf8(std::mem::take(&mut line).bytes).unwrap());
        }
        assert_eq!(lines, ["one", "", "two-l", "last"]);
    }

    /// A read cut short (another `select!` branch won) resumes the line where it stopped.
    /// Before this, the line's start was lost: a long last line of Claude's output, cut when
    /// Claude exited, lost its result.
    #[tokio::test]
    async fn a_read_cut_short_loses_nothing() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = BufReader::with_capacity(8, rx);
        let mut line = Line::default();
        tx.write_all(b"hello wo").await.unwrap();
        let cut = tokio::time::timeout(Duration::from_millis(50), read_line_capped(&mut r, &mut line, 100)).await;
        assert!(cut.is_err(), "no newline yet: the read is still waiting when it is dropped");
        tx.write_all(b"rld\nnext").await.unwrap();
        drop(tx);
        assert!(read_line_capped(&mut r, &mut line, 100).await.unwrap());
        assert_eq!(std::mem::take(&mut line).bytes, b"hello world");
        assert!(read_line_capped(&mut r, &mut line, 100).await.unwrap());
        assert_eq!(std::mem::take(&mut line).bytes, b"next");
        assert!(!read_line_capped(&mut r, &mut line, 100).await.unwrap());
    }
}
