//! The agent's own account of itself, for `claude-runner status`: whether it is connected,
//! to which edge, since when, what it runs, why the last connection ended. Kept in
//! `DATA_DIR/status.json` (the agent has no port to ask, by design), rewritten at every
//! heartbeat so `status --check` (the container's HEALTHCHECK) can tell a stuck agent
//! from a quiet one.

use crate::files::write_atomically;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub agent_id: String,
    pub edge: String,
    pub pid: u32,
    pub connected: bool,
    /// When the current connection, or the current disconnection, began.
    pub since: String,
    pub last_error: Option<String>,
    pub running: Vec<String>,
    /// The repositories whose mirror the agent holds.
    #[serde(default)]
    pub mirrors: Vec<String>,
    pub updated_at: String,
    /// `updated_at` in milliseconds, for the freshness check.
    #[serde(default)]
    pub updated_ms: u64,
    /// The connection's heartbeat interval: the file is rewritten at least this often
    /// while connected.
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// Stopping: no new jobs, the running ones finish (see [`crate::drain`]).
    #[serde(default)]
    pub draining: bool,
    /// The login and usage window as the agent last reported them to the edge (what
    /// `oauth-status` and `doctor` add to their own reading: a failed authentication,
    /// the usage window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<shared::oauth::OAuthReport>,
    /// The credentials `login` was read from ([`crate::report::Reporter::fingerprint`]):
    /// a restart keeps a failed authentication only for the same ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_fingerprint: Option<u64>,
    /// Claude's config folder the agent reads its login from (its `CLAUDE_CONFIG_DIR`, or
    /// ~/.claude): `oauth-status` and `doctor` name it when their own shell reads another
    /// (`up` started with `CLAUDE_CONFIG_DIR=/x` reads /x, the next shell may not set it),
    /// and do not read it: this file is a job's to write ([`crate::report::local_login`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claude_config_dir: Option<PathBuf>,
}

/// The least time between two background writes of the status file (job starts and
/// ends); `claude-runner status` shows them this much later at most.
const BACKGROUND_WRITE_GAP: std::time::Duration = std::time::Duration::from_millis(50);

/// Slack on top of three missed heartbeats before a connected agent counts as stuck.
const STALE_SLACK_MS: u64 = 10_000;

/// How far ahead of the clock a status file may be dated and still be the agent's: the
/// agent and `status --check` read the same clock, so only a step of it back between the
/// write and the check (set by NTP, or by hand) gives a file written a little ahead.
const AHEAD_SLACK_MS: u64 = 10_000;

/// What /proc says of the process a status file names ([`liveness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Gone, or no claude-runner any more.
    NotRunning,
    /// Stopped (SIGSTOP, SIGTSTP) or held by a debugger: it does nothing, and the file it
    /// left, or one a job writes in its name, can look as fresh as anyone likes.
    Stopped,
    Running,
}

/// Whether `pid` is a claude-runner ([`is_agent`]) and, if so, whether it runs or is
/// stopped: its state in /proc/<pid>/stat, `T` (stopped by a signal) or `t` (stopped by a
/// debugger tracing it).
pub fn liveness(pid: u32) -> Liveness {
    if !is_agent(pid) {
        return Liveness::NotRunning;
    }
    let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `pid (comm) S …`: the name may hold spaces and parentheses, so the state is read
    // after its last `)`.
    let state = stat.iter().rposition(|&b| b == b')').and_then(|end| stat.get(end + 2));
    match state {
        Some(b'T' | b't') => Liveness::Stopped,
        _ => Liveness::Running,
    }
}

/// The command that starts the agent of `data_dir` again once it has exited.
fn start_again(data_dir: &std::path::Path) -> String {
    start_again_given(data_dir, &crate::config::default_data_dir())
}

/// [`start_again`], `default` being the default `DATA_DIR`. `up`'s agent is started by
/// `up` alone (`claude-runner agent` there has no keys), run with the `DATA_DIR` that holds
/// its folder: a plain `claude-runner up` with another one set would start another `up`,
/// in the default folder, with other keys and secret. Its other settings of this machine
/// are not in its folder, so they are named for the operator to give again.
fn start_again_given(data_dir: &std::path::Path, default: &std::path::Path) -> String {
    if !crate::config::is_up_agent_dir(data_dir) {
        return "`claude-runner agent` (or `claude-runner up`, if up ran it)".into();
    }
    let up_data_dir = data_dir.parent().and_then(std::path::Path::parent).unwrap_or(data_dir);
    // Absolute: pasted in another folder, a relative one names another.
    let up_data_dir = std::path::absolute(up_data_dir).unwrap_or_else(|_| up_data_dir.to_path_buf());
    let setting = if up_data_dir == default { String::new() } else { format!("DATA_DIR={} ", crate::up::shell_word(&up_data_dir.to_string_lossy())) };
    // Every setting, not three: up.json keeps none of them, and one left out silently goes
    // back to its default (ALLOWED_REPO_HOSTS narrowed to one host opened again, rev23-6).
    format!(
        "`{setting}claude-runner up` (with every other setting it ran with, if you set any: LISTEN, CLAUDE_BIN, CLAUDE_CONFIG_DIR, \
         ALLOWED_REPO_HOSTS, GITHUB_TOKEN/REPO_TOKENS, MAX_CONCURRENT_JOBS, AGENT_LABELS, …)"
    )
}

/// What to say of a stopped agent, and what to do.
fn stopped(agent_id: &str, pid: u32) -> String {
    format!(
        "agent {agent_id} (pid {pid}) is stopped (by a signal such as SIGSTOP, or by a debugger): it runs nothing and answers the edge nothing; \
         resume it with `kill -CONT {pid}` (a debugger must let it go), or restart it — if nobody here stopped it, a job of its user may have"
    )
}

impl Status {
    /// Whether this status describes a working agent at `now`: a live one ([`Status::alive`]),
    /// connected, and writing its file. The reason either way. `full`: `DATA_DIR`'s file
    /// system has no space left ([`no_space_left`]), which is why a working agent stops
    /// writing its file — not a reason to restart it. `data_dir`: the agent's folder, which
    /// says how to start it again.
    pub fn health(&self, data_dir: &std::path::Path, process: Liveness, full: bool, now: u64) -> Result<String, String> {
        self.alive(data_dir, process, now)?;
        if !self.connected {
            let why = self.last_error.as_deref().unwrap_or("not connected yet");
            return Err(format!("agent {} is not connected to {} since {}: {why}", self.agent_id, self.edge, self.since));
        }
        let silent = now.saturating_sub(self.updated_ms);
        if silent > self.heartbeat_ms.saturating_mul(3).saturating_add(STALE_SLACK_MS) {
            if full {
                return Err(format!(
                    "agent {} has not written its status for {} s: DATA_DIR's {}",
                    self.agent_id,
                    silent / 1000,
                    crate::files::FREE_SPACE
                ));
            }
            return Err(format!(
                "agent {} has not written its status for {} s (heartbeat every {} s): it looks stuck; restart it",
                self.agent_id,
                silent / 1000,
                self.heartbeat_ms / 1000
            ));
        }
        Ok(format!("agent {} is connected to {} since {}", self.agent_id, self.edge, self.since))
    }

    /// Whether this status is a live agent's at `now`, as far as `process` (read from
    /// /proc by the caller, [`judge`]) and the file say: running, not stopped, and a file
    /// an agent could have written. Asked by the health check and by [`live_agent`].
    fn alive(&self, data_dir: &std::path::Path, process: Liveness, now: u64) -> Result<(), String> {
        match process {
            Liveness::NotRunning => {
                return Err(format!("agent {} (pid {}) is not running; start it again with {}", self.agent_id, self.pid, start_again(data_dir)));
            }
            Liveness::Stopped => return Err(stopped(&self.agent_id, self.pid)),
            Liveness::Running => {}
        }
        // The checks below read the file's word for when it was written and how often it
        // is: a job (the agent's user) can write it. Dated ahead, a file never goes stale,
        // and without an interval it is never judged: neither is the agent's writing.
        if self.updated_ms > now.saturating_add(AHEAD_SLACK_MS) {
            return Err(format!(
                "agent {}'s status file is dated {} s ahead of this machine's clock: the agent did not write that (a job of its user can write the file), unless the clock was set back since; if the next heartbeat does not mend it, restart the agent",
                self.agent_id,
                (self.updated_ms - now) / 1000
            ));
        }
        // An agent not connected yet has no interval.
        if self.connected && self.heartbeat_ms == 0 {
            return Err(format!(
                "agent {}'s status file says it is connected but records no heartbeat interval, which no agent of this release writes (a job of its user can write the file); restart the agent",
                self.agent_id
            ));
        }
        // Nor can an interval no edge can set (the protocol's longest): one of 10^15 ms kept
        // a file a day old fresh, and three of u64::MAX/2 overflowed.
        if self.heartbeat_ms > shared::contract::MAX_HEARTBEAT_INTERVAL_MS {
            return Err(format!(
                "agent {}'s status file records a heartbeat interval of {} ms, longer than any edge can set ({} ms), which no agent writes (a job of its user can write the file); restart the agent",
                self.agent_id,
                self.heartbeat_ms,
                shared::contract::MAX_HEARTBEAT_INTERVAL_MS
            ));
        }
        Ok(())
    }
}

pub struct StatusFile {
    path: PathBuf,
    behind: Arc<Behind>,
}

/// The status and its writes: which snapshot is on disk, and whether a change waits to be
/// written. Shared with the background writer, which serialises the status itself when it
/// writes (see [`StatusFile::update_soon`]).
#[derive(Default)]
struct Behind {
    status: Mutex<Status>,
    /// Snapshots are numbered as they are made (under the status lock, so a higher
    /// number is a later status).
    changes: std::sync::atomic::AtomicU64,
    /// The number of the snapshot on disk; held while the file is written.
    written: Mutex<u64>,
    queue: Mutex<Queue>,
    /// When a failed write was last logged.
    warned_ms: Mutex<u64>,
}

/// A status file that cannot be written is logged at most once per this.
const WARN_GAP_MS: u64 = 60_000;

#[derive(Default)]
struct Queue {
    /// A change made since the background writer's last snapshot.
    changed: bool,
    /// A background write is under way (and will take the change).
    writing: bool,
}

impl Behind {
    /// The status as of now, numbered, as the file holds it.
    fn snapshot(&self) -> (u64, Vec<u8>) {
        let mut status = self.status.lock().expect("status lock");
        status.updated_ms = crate::now_ms();
        status.updated_at = shared::time::rfc3339(status.updated_ms);
        let seq = self.changes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        (seq, serde_json::to_vec_pretty(&*status).expect("status serialises"))
    }

    /// Writes snapshot `seq` unless a newer one is on disk already.
    fn write(&self, path: &std::path::Path, seq: u64, bytes: &[u8]) {
        let mut written = self.written.lock().expect("status write lock");
        if seq <= *written {
            return;
        }
        if let Err(e) = write_atomically(path, bytes, false) {
            // Said once a minute at most (it is tried at every heartbeat and job): `status
            // --check` goes unhealthy when the file is stale, and the log must say why.
            let now = crate::now_ms();
            let mut warned = self.warned_ms.lock().expect("status warn lock");
            if now.saturating_sub(*warned) >= WARN_GAP_MS {
                *warned = now;
                let next = if crate::files::disk_full(&e) { crate::files::FREE_SPACE } else { "check that the agent's user can write DATA_DIR" };
                tracing::warn!(path = %path.display(), error = %e, "could not write the status file (status --check will say the agent is unhealthy): {next}");
            }
        }
        *written = seq;
    }
}

impl StatusFile {
    pub fn new(path: PathBuf, agent_id: &str, edge: &str) -> StatusFile {
        let now = shared::time::rfc3339(crate::now_ms());
        let status = Status {
            agent_id: agent_id.into(),
            edge: edge.into(),
            pid: std::process::id(),
            since: now,
            ..Status::default()
        };
        let behind = Behind { status: Mutex::new(status), ..Behind::default() };
        let file = StatusFile { path, behind: Arc::new(behind) };
        file.update(|_| {});
        file
    }

    /// Changes the status and writes the file now (what an agent about to exit says).
    fn update(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.behind.status.lock().expect("status lock"));
        let (seq, bytes) = self.behind.snapshot();
        self.behind.write(&self.path, seq, &bytes);
    }

    /// Changes the status and has the file written off the caller's thread: each job's
    /// start and end change it, and rewriting the file (a new file and a rename, which
    /// frees the old one's blocks: a measurable share of the agent's CPU per job) is not
    /// worth making a job wait for. Written at most every [`BACKGROUND_WRITE_GAP`]: the
    /// changes between become one write, and one serialisation — made by the writer, so a
    /// job's start or end costs the agent's runtime thread only the change itself. An
    /// older snapshot never replaces a newer one.
    fn update_soon(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.behind.status.lock().expect("status lock"));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let (seq, bytes) = self.behind.snapshot();
            return self.behind.write(&self.path, seq, &bytes);
        };
        let mut queue = self.behind.queue.lock().expect("status queue lock");
        queue.changed = true;
        if queue.writing {
            return;
        }
        queue.writing = true;
        drop(queue);
        let (behind, path) = (Arc::clone(&self.behind), self.path.clone());
        runtime.spawn_blocking(move || loop {
            {
                let mut queue = behind.queue.lock().expect("status queue lock");
                if !std::mem::take(&mut queue.changed) {
                    queue.writing = false;
                    return;
                }
            }
            let (seq, bytes) = behind.snapshot();
            behind.write(&path, seq, &bytes);
            std::thread::sleep(BACKGROUND_WRITE_GAP);
        });
    }

    pub fn connected(&self, heartbeat_ms: u64) {
        self.update(|s| {
            s.connected = true;
            s.heartbeat_ms = heartbeat_ms;
            s.since = shared::time::rfc3339(crate::now_ms());
        });
    }

    /// The login report the agent starts with, taken over from the file before it was
    /// rewritten (`Reporter::resume`): kept in the new file from the start, so a second
    /// restart before the first heartbeat takes it over again. Written only with the next
    /// heartbeat, a used-up usage window was forgotten by an agent restarted twice within
    /// one heartbeat interval, and the edge let held jobs go to a Claude that would refuse them.
    pub fn resumed(&self, report: &shared::oauth::OAuthReport, fingerprint: u64, claude_config_dir: &std::path::Path) {
        self.update(|s| s.claude_config_dir = Some(claude_config_dir.to_path_buf()));
        self.beat(report, fingerprint);
    }

    /// A heartbeat went out with this report: the agent is alive and not stuck.
    pub fn beat(&self, report: &shared::oauth::OAuthReport, fingerprint: u64) {
        self.update(|s| {
            s.login = Some(report.clone());
            s.login_fingerprint = Some(fingerprint);
        });
    }

    pub fn disconnected(&self, reason: &str) {
        self.update(|s| {
            if s.connected {
                s.since = shared::time::rfc3339(crate::now_ms());
            }
            s.connected = false;
            s.last_error = Some(reason.to_string());
        });
    }

    /// The agent took its last job: it exits once the running ones are done.
    pub fn draining(&self) {
        self.update(|s| s.draining = true);
    }

    pub fn running(&self, running: Vec<String>) {
        self.update_soon(|s| s.running = running);
    }

    pub fn mirrors(&self, mirrors: Vec<String>) {
        self.update(|s| s.mirrors = mirrors);
    }

    /// A job ended: one write for both (the file is rewritten whole each time).
    pub fn job_ended(&self, running: Vec<String>, mirrors: Vec<String>) {
        self.update_soon(|s| {
            s.running = running;
            s.mirrors = mirrors;
        });
    }
}

/// Far more than the agent writes (its jobs, mirrors and login, a few KiB).
const MAX_STATUS_BYTES: usize = 4 * 1024 * 1024;

/// The agent's state file, in its `DATA_DIR`.
pub const FILE_NAME: &str = "status.json";

pub fn read(data_dir: &std::path::Path) -> anyhow::Result<Option<Status>> {
    let path = data_dir.join(FILE_NAME);
    // Read as a file the agent keeps (bounded, never waiting on a pipe a job put there);
    // anything else reads as none, and the agent's own replaces it.
    match crate::files::read_plain(&path, MAX_STATUS_BYTES, "status file") {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{} is unreadable ({e}); restart the agent to rewrite it", path.display())),
        Err(_) => Ok(None),
    }
}

/// Whether `pid` is a running claude-runner (a pid from an earlier container or boot may
/// belong to something else by now).
pub fn is_agent(pid: u32) -> bool {
    command_line(pid).is_some_and(|cmd| cmd.split(|&b| b == 0).next().is_some_and(|argv0| argv0.ends_with(b"claude-runner")))
}

/// Whether `pid`'s command line is `… agent …` after its program (an agent's, whatever
/// global flags come before its subcommand): with [`is_agent`], a `claude-runner agent`.
pub fn runs_agent(pid: u32) -> bool {
    command_line(pid).is_some_and(|cmd| runs_the_agent_command(&cmd))
}

/// Whether a command line (its arguments, each ended by a NUL) runs the `agent` subcommand:
/// its first argument past the program and the global flag (`--log-format`, main.rs) is
/// `agent`. (`agent` anywhere passed: a `claude-runner submit agent`, a prompt, too.)
fn runs_the_agent_command(cmd: &[u8]) -> bool {
    let mut args = cmd.split(|&b| b == 0).skip(1);
    while let Some(arg) = args.next() {
        match arg {
            b"--log-format" => {
                args.next();
            }
            _ if arg.starts_with(b"--log-format=") => {}
            _ => return arg == b"agent",
        }
    }
    false
}

/// `pid`'s command line (its arguments, each ended by a NUL), none once it is gone.
fn command_line(pid: u32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// The status file when it is a live agent's ([`live_agent`]). What a command takes from
/// the file as the agent's (the login and usage window `oauth-status` and `doctor` show)
/// is read through here.
pub fn running_agents(data_dir: &std::path::Path) -> Option<Status> {
    let mut status = read(data_dir).ok().flatten()?;
    live_agent(data_dir, &mut status, crate::now_ms()).ok()?;
    Some(status)
}

/// Whether `status`, read from `data_dir`, is a live agent's at `now`: the one predicate
/// `status --check` and what `oauth-status` and `doctor` take from the file share.
/// - No other process holds DATA_DIR's lock ([`not_the_lock_holders`]);
/// - no stopped agent holds the folder's own lock, and the process named runs this very
///   program where that can be read ([`judge`]; a stopped agent found so is the status's
///   pid from then on);
/// - it runs, and the file is one an agent could have written ([`Status::alive`]);
/// - it is the agent of `data_dir` as `agent --drain` judges it
///   ([`crate::drain::is_agent_of`]: the holder of the lock's flock, or a `claude-runner
///   agent` where nobody locks the file).
///
/// Not whether it is connected or writing its file: [`Status::health`] adds those.
/// `Ok`: how its process runs; Err says why the file is not a live agent's.
fn live_agent(data_dir: &std::path::Path, status: &mut Status, now: u64) -> Result<Liveness, String> {
    if let Some(line) = not_the_lock_holders(data_dir, status) {
        return Err(line);
    }
    let (process, pid) = judge(data_dir, status)?;
    status.pid = pid;
    status.alive(data_dir, process, now)?;
    if !crate::drain::is_agent_of(status.pid, data_dir) {
        return Err(format!(
            "process {} that {}/status.json names is no `claude-runner agent` of this DATA_DIR (nobody holds its lock, and it runs another command); start the agent again with {}",
            status.pid,
            data_dir.display(),
            start_again(data_dir)
        ));
    }
    Ok(process)
}

/// Why the status file is not the agent's, when DATA_DIR's lock is held but not by the
/// process the file names: the lock is seen in /proc/locks, which a job cannot write, but
/// a job (the agent's user) can lock the file itself and write status.json naming any
/// running claude-runner. A file so contradicted is not shown as an agent's. So too where
/// the file is locked but by no agent (an agent holds a flock of it; a job can take a
/// POSIX lock, which never meets that flock).
fn not_the_lock_holders(data_dir: &std::path::Path, status: &Status) -> Option<String> {
    let holders = crate::drain::lock_holders(data_dir)?;
    if holders.contains(&status.pid) {
        return None;
    }
    if holders.is_empty() {
        let lock = data_dir.join(crate::agent::DATA_LOCK);
        return Some(format!(
            "{} is locked, but no agent holds it (an agent holds a flock of it; this is another lock: a job of an agent of this user can take one, or an agent on another machine sharing this folder holds it): {}/status.json (pid {}) is not the running agent's, and is not shown. See what locks it: `lslocks | grep {}`",
            lock.display(),
            data_dir.display(),
            status.pid,
            lock.display()
        ));
    }
    let holders: Vec<String> = holders.iter().map(u32::to_string).collect();
    Some(format!(
        "{} is held by process {}, not by the agent {}/status.json names (pid {}): that file is not the running agent's (a job of an agent of this user can write both), and is not shown. See what holds the lock: `ps -o pid,args -p {}`",
        data_dir.join(crate::agent::DATA_LOCK).display(),
        holders.join(", "),
        data_dir.display(),
        status.pid,
        holders.join(",")
    ))
}

/// What the processes say of the agent the status file names, past its lock
/// ([`not_the_lock_holders`]), from what a job (the agent's user) cannot write: its state, a
/// stopped agent of the folder, and the program it runs. The lock file is found by its
/// name, which a job can point at a file of its own: it can stop the agent, move
/// `agent.lock` aside, lock a new one with any program whose command line starts with
/// `claude-runner`, and write a fresh status file naming that. So:
/// - an agent of `data_dir` that is stopped makes it stopped, whatever the file names: found
///   by its lock of the folder itself ([`crate::drain::folder_flock_holders`]), which a job
///   cannot move; its pid is the one returned;
/// - the process named must run this very program (`/proc/<pid>/exe` the same file as
///   `/proc/self/exe`) where that can be read: by the same user of a dumpable process, or
///   with `CAP_SYS_PTRACE`. The agent is not dumpable, and the container's root holds no
///   `CAP_SYS_PTRACE`: there the program is not judged, and a job's stand-in of another
///   program passes while the real agent runs, stuck but not stopped (README 3a says what a
///   job can still fake).
fn judge(data_dir: &std::path::Path, status: &Status) -> Result<(Liveness, u32), String> {
    let stopped = crate::drain::folder_flock_holders(data_dir).into_iter().find(|&pid| runs_agent(pid) && liveness(pid) == Liveness::Stopped);
    if let Some(pid) = stopped {
        return Ok((Liveness::Stopped, pid));
    }
    let process = liveness(status.pid);
    if process == Liveness::Running && same_program(status.pid) == Some(false) {
        return Err(format!(
            "process {} that {}/status.json names (and that holds its lock) does not run this claude-runner ({}): it is no agent of this release — a job of the agent's user can lock the file and write both — or an agent whose program was since replaced on disk; restart the agent",
            status.pid,
            data_dir.display(),
            std::fs::read_link("/proc/self/exe").map_or_else(|_| "?".into(), |p| p.display().to_string())
        ));
    }
    Ok((process, status.pid))
}

/// Whether `pid` runs the program this process runs (the same file, by device and inode:
/// a path can name another file since); None where its `/proc/<pid>/exe` cannot be read
/// (gone, or not dumpable and no `CAP_SYS_PTRACE` here).
fn same_program(pid: u32) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/exe").ok()?;
    let theirs = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()))
}

fn no_agent(data_dir: &std::path::Path) -> String {
    format!("No agent has run with DATA_DIR={} (no status.json). Start one: `claude-runner agent` (or `up`).", data_dir.display())
}

/// `claude-runner status --check`: one line, and whether the agent is healthy (running,
/// connected, not stuck). The container's HEALTHCHECK: it needs no port.
pub fn check(data_dir: &std::path::Path) -> anyhow::Result<bool> {
    check_to(&mut std::io::stdout().lock(), data_dir)
}

/// [`check`], written to `out`.
fn check_to(out: &mut impl std::io::Write, data_dir: &std::path::Path) -> anyhow::Result<bool> {
    let Some(mut status) = read(data_dir)? else {
        say(out, no_agent(data_dir))?;
        return Ok(false);
    };
    let now = crate::now_ms();
    let process = match live_agent(data_dir, &mut status, now) {
        Ok(process) => process,
        Err(line) => {
            say(out, format!("unhealthy: {line}"))?;
            return Ok(false);
        }
    };
    match status.health(data_dir, process, no_space_left(data_dir), now) {
        Ok(line) => {
            say(out, format!("healthy: {line}"))?;
            Ok(true)
        }
        Err(line) => {
            say(out, format!("unhealthy: {line}"))?;
            Ok(false)
        }
    }
}

/// Whether the file system holding `dir` has no block or inode left for the agent's user
/// (`statvfs`'s `f_bavail`, `f_favail`): a status file gone stale there was not written for want of
/// room. A quota spent is not seen here; the agent's own log says so.
fn no_space_left(dir: &std::path::Path) -> bool {
    let Ok(space) = crate::workspace::disk_space(dir) else { return false };
    // Out of blocks, or of inodes (a job that made millions of empty files): either way a
    // new file cannot be written.
    space.free == 0 || space.free_inodes == Some(0)
}

/// Writes one line of what `status` shows, its control characters escaped: what it says
/// comes from the status file, which a job (the agent's user) can write, and from the
/// edge's refusals; raw, it could drive the operator's terminal (its clipboard with OSC 52,
/// its title, the cursor to print over what was shown).
pub(crate) fn say(out: &mut impl std::io::Write, line: String) -> std::io::Result<()> {
    writeln!(out, "{}", shared::text::one_line(&line))
}

/// JSON for the terminal: serde escapes the control characters below 0x20 but leaves DEL
/// and the C1 ones (U+0080-U+009F, which terminals act on as on their ESC forms: U+009B is
/// CSI, U+009D OSC) as they are, and the bidi controls and line separators
/// ([`shared::text::acts_on_display`]); here they are escaped too. Outside strings JSON holds none
/// but its line breaks, so this is the same JSON.
pub(crate) fn json_for_terminal(json: &str) -> String {
    json.chars().map(|c| if shared::text::acts_on_display(c) && c != '\n' { format!("\\u{:04x}", c as u32) } else { c.to_string() }).collect()
}

/// `claude-runner status`: prints the local agent's state; exits non-zero unless it runs
/// and is connected.
pub fn show(data_dir: &std::path::Path) -> anyhow::Result<bool> {
    show_to(&mut std::io::stdout().lock(), data_dir)
}

/// [`show`], written to `out`.
fn show_to(out: &mut impl std::io::Write, data_dir: &std::path::Path) -> anyhow::Result<bool> {
    let Some(mut status) = read(data_dir)? else {
        say(out, no_agent(data_dir))?;
        return Ok(false);
    };
    if let Some(line) = not_the_lock_holders(data_dir, &status) {
        say(out, line)?;
        return Ok(false);
    }
    let process = match judge(data_dir, &status) {
        Ok((process, pid)) => {
            status.pid = pid;
            process
        }
        Err(line) => {
            say(out, line)?;
            return Ok(false);
        }
    };
    let state = match process {
        Liveness::NotRunning => "not running",
        Liveness::Stopped => "stopped",
        Liveness::Running => "running",
    };
    say(out, format!("agent     {} (pid {}, {state})", status.agent_id, status.pid))?;
    say(out, format!("edge      {}", status.edge))?;
    if process == Liveness::Stopped {
        say(out, format!("state     {}", stopped(&status.agent_id, status.pid)))?;
        return Ok(false);
    }
    if process == Liveness::NotRunning {
        say(out, format!("state     stopped; start it again with {}", start_again(data_dir)))?;
        return Ok(false);
    }
    if status.connected {
        say(out, format!("state     connected since {}", status.since))?;
    } else {
        say(out, format!("state     disconnected since {}: {}", status.since, status.last_error.as_deref().unwrap_or("?")))?;
        say(out, "          (it keeps retrying; `claude-runner doctor` checks the settings)".into())?;
    }
    if status.draining {
        say(out, "          draining: no new jobs; it exits once these are done (`claude-runner agent --drain` waits for that)".into())?;
    }
    if status.running.is_empty() {
        say(out, "jobs      none running".into())?;
    } else {
        say(out, format!("jobs      {}", status.running.join(", ")))?;
    }
    if !status.mirrors.is_empty() {
        say(out, format!("mirrors   {}", status.mirrors.join(", ")))?;
    }
    Ok(status.connected)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The status file is a job's to write (the agent's user), and `status` and `status
    /// --check` printed what it said raw to the operator's terminal: a job could set its
    /// clipboard (OSC 52) or title, or print over what was shown, when the operator looked
    /// at the agent it had just stopped. What they show has its control characters escaped.
    #[test]
    fn what_the_status_file_says_reaches_the_terminal_without_its_control_sequences() {
        let dir = std::env::temp_dir().join(format!("cr-status-words-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sequence = "\x1b]52;c;ZXZpbA==\x07\x1b[2K\r";
        let planted = Status {
            agent_id: format!("a{sequence}"),
            edge: format!("wss://e{sequence}"),
            pid: std::process::id(),
            since: sequence.into(),
            last_error: Some(sequence.into()),
            running: vec![sequence.into()],
            mirrors: vec![sequence.into()],
            ..Default::default()
        };
        std::fs::write(dir.join("status.json"), serde_json::to_vec(&planted).unwrap()).unwrap();
        let mut shown = Vec::new();
        show_to(&mut shown, &dir).unwrap();
        check_to(&mut shown, &dir).unwrap();
        let shown = String::from_utf8(shown).unwrap();
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
        assert!(shown.contains("wss://e"), "{shown}");
        // What reorders or breaks a line on screen goes the same way, in JSON too.
        let json = json_for_terminal("{\"agent_id\": \"a\u{202e}b\u{2029}c\"}");
        assert_eq!(json, "{\"agent_id\": \"a\\u202eb\\u2029c\"}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `status` of `up`'s stopped agent said "start it again with `claude-runner agent` (or
    /// `claude-runner up`, if up ran it)", though it knew the folder was `up`'s: it says
    /// `claude-runner up` there, with `up`'s DATA_DIR unless it is the default one, and
    /// both elsewhere; `status --check` says the same.
    #[test]
    fn a_stopped_agent_of_up_is_started_again_with_up() {
        let data = std::env::temp_dir().join(format!("cr-status-up-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let ups = crate::config::up_agent_dir(&data);
        std::fs::create_dir_all(&ups).unwrap();
        std::fs::write(crate::config::up_state_file(&data), "{}").unwrap();
        // A pid above the kernel's highest (4194304): no process has it.
        let stopped = Status { agent_id: "spark".into(), pid: 4_194_305, ..Default::default() };
        for dir in [&ups, &data] {
            std::fs::write(dir.join("status.json"), serde_json::to_vec(&stopped).unwrap()).unwrap();
        }
        let shown = |dir: &std::path::Path| {
            let mut shown = Vec::new();
            assert!(!show_to(&mut shown, dir).unwrap());
            String::from_utf8(shown).unwrap()
        };
        // Not the default DATA_DIR: a plain `claude-runner up` would start another, in the
        // default folder, with other keys (rev22 8). The folder is named, and the settings
        // it ran with.
        let up = shown(&ups);
        let again = format!("start it again with `DATA_DIR={} claude-runner up`", data.display());
        assert!(up.contains(&format!("stopped; {again}")) && up.contains("every other setting") && up.contains("ALLOWED_REPO_HOSTS"), "{up}");
        let mut checked = Vec::new();
        assert!(!check_to(&mut checked, &ups).unwrap());
        let checked = String::from_utf8(checked).unwrap();
        assert!(checked.contains(&format!("is not running; {again}")) && checked.contains("every other setting"), "{checked}");
        // In the default DATA_DIR, no setting to give.
        let plain = start_again_given(&ups, &data);
        assert!(plain.starts_with("`claude-runner up` (with every other setting"), "{plain}");
        let own = shown(&data);
        assert!(own.contains("start it again with `claude-runner agent` (or `claude-runner up`, if up ran it)"), "{own}");
        std::fs::remove_dir_all(&data).unwrap();
    }

    /// A job (the agent's user) can hold a lock on DATA_DIR/agent.lock itself and plant
    /// status.json naming a running claude-runner (here a stand-in, `claude-runner … agent`
    /// by its command line): `status` showed the planted file as that agent's, connected.
    /// The lock's holder is not the process the file names: `status` says so and shows
    /// nothing of the file as an agent's. Where the holder is the one named, it is shown.
    #[test]
    fn a_status_file_beside_a_lock_another_process_holds_is_not_shown_as_the_agents() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("cr-status-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Holds the lock itself, this program, `claude-runner agent` by its command line.
        let mut agent = stand_in(&dir);
        let pid = agent.id();
        let status = |pid: u32| Status { agent_id: "planted".into(), edge: "wss://planted".into(), pid, connected: true, since: "then".into(), ..Default::default() };
        let shown = |status: &Status| {
            std::fs::write(dir.join("status.json"), serde_json::to_vec(status).unwrap()).unwrap();
            let mut shown = Vec::new();
            let healthy = (show_to(&mut shown, &dir).unwrap(), check_to(&mut shown, &dir).unwrap());
            (healthy, String::from_utf8(shown).unwrap())
        };
        let ((shown_ok, _), by_the_holder) = shown(&status(pid));
        // Another claude-runner agent (not holding this lock), named by the planted file.
        let mut other = std::process::Command::new("tail").arg0("claude-runner").args(["agent", "-f", "/dev/null"]).stderr(std::process::Stdio::null()).spawn().unwrap();
        let (healthy, planted) = shown(&status(other.id()));
        let _ = (agent.kill(), other.kill(), agent.wait(), other.wait());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(shown_ok && by_the_holder.contains("running") && by_the_holder.contains("connected since then"), "{by_the_holder}");
        assert_eq!(healthy, (false, false), "{planted}");
        assert!(!planted.contains("connected since"), "the planted file shown as the agent's: {planted}");
        assert!(planted.contains(&format!("held by process {pid}")), "{planted}");
    }

    /// A job can lock DATA_DIR/agent.lock with a POSIX lock where no agent runs (an agent
    /// holds a flock of it), and plant status.json naming its own process, a `claude-runner
    /// … agent` by its command line: `status` showed that file as the running agent's,
    /// connected. A lock of the file that no flock holder holds is no agent's: the file is
    /// not shown as one's.
    #[test]
    fn a_status_file_beside_a_lock_no_agent_holds_is_not_shown_as_the_agents() {
        let dir = std::env::temp_dir().join(format!("cr-status-posix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut job = crate::drain::tests::posix_locker(&dir, libc::F_WRLCK);
        let planted = Status { agent_id: "planted".into(), edge: "wss://planted".into(), pid: job.id(), connected: true, since: "then".into(), ..Default::default() };
        std::fs::write(dir.join("status.json"), serde_json::to_vec(&planted).unwrap()).unwrap();
        let mut shown = Vec::new();
        let healthy = (show_to(&mut shown, &dir).unwrap(), check_to(&mut shown, &dir).unwrap());
        let _ = crate::drain::tests::end_group(&mut job);
        let _ = std::fs::remove_dir_all(&dir);
        let shown = String::from_utf8(shown).unwrap();
        assert_eq!(healthy, (false, false), "{shown}");
        assert!(!shown.contains("connected since"), "the planted file shown as the agent's: {shown}");
        assert!(shown.contains("no agent holds"), "{shown}");
    }

    /// Under CI's load `status --check` once said `up`'s agent lock, held by the agent the
    /// status file names, was "locked, but no agent holds it". /proc/locks is not read in
    /// one piece: each read(2) of it starts again at the count of locks it had shown, so a
    /// lock of another process let go between two reads shifts the rest and one line, the
    /// agent's, goes unseen; and the check read it three times, taking "nobody holds it"
    /// from one read and "it is locked" from the next. Here this process holds the lock
    /// and is named by the file, while other locks come and go: it is the agent, every time.
    #[test]
    fn the_agents_lock_is_its_own_while_other_locks_come_and_go() {
        let dir = std::env::temp_dir().join(format!("cr-status-churn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _held = runtime::hold_lock(&dir.join(crate::agent::DATA_LOCK)).unwrap().expect("nobody else holds it");
        let status = Status { agent_id: "a".into(), pid: std::process::id(), ..Default::default() };
        let churn = crate::drain::tests::other_locks_coming_and_going(&dir);
        // Judged its own by `status` and by `agent --drain` (which takes it for the agent of
        // the folder only when a reading shows it holding the lock) every time.
        let judged = || not_the_lock_holders(&dir, &status).or_else(|| (!crate::drain::is_agent_of(status.pid, &dir)).then(|| "not the agent of its folder".to_string()));
        let misjudged: Vec<String> = (0..3000).filter_map(|_| judged()).take(1).collect();
        drop(churn);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(misjudged.is_empty(), "{misjudged:?}");
    }

    /// Only a command line whose subcommand is `agent` runs the agent: `agent` anywhere in
    /// it passed, so a `claude-runner submit agent` (a prompt, a `--model` value) was taken
    /// for an agent of a release before DATA_DIR's lock by `agent --drain` (signalled) and
    /// by `oauth-status` and `doctor` (its status file's login shown as the agent's).
    #[test]
    fn only_the_agent_subcommand_runs_the_agent() {
        let runs = |args: &[&str]| runs_the_agent_command(args.iter().map(|a| format!("{a}\0")).collect::<String>().as_bytes());
        assert!(runs(&["claude-runner", "agent"]));
        assert!(runs(&["/usr/local/bin/claude-runner", "agent", "--drain"]));
        assert!(runs(&["claude-runner", "--log-format", "json", "agent"]));
        assert!(runs(&["claude-runner", "--log-format=json", "agent"]));
        assert!(!runs(&["claude-runner", "submit", "agent"]), "a prompt");
        assert!(!runs(&["claude-runner", "submit", "--model", "agent", "fix it"]), "an option's value");
        assert!(!runs(&["claude-runner", "--log-format", "agent", "submit"]), "the global flag's value");
        assert!(!runs(&["claude-runner", "status", "agent"]));
        assert!(!runs(&["claude-runner"]) && !runs(&[]));
    }

    /// The agent reads the status file its predecessor left before it writes its own: a
    /// pipe a job put there (the agent's user) held the agent's start for good, and the
    /// container's health check (`status --check`) with it. It reads as no status file.
    #[test]
    fn a_pipe_in_place_of_the_status_file_holds_nothing() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir().join(format!("cr-status-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        crate::files::pipe_at(&dir.join("status.json"));
        let (tx, rx) = std::sync::mpsc::channel();
        let read_in = dir.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read(&read_in).map_err(|e| e.to_string()));
        });
        let Ok(status) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
            let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(dir.join("status.json"));
            panic!("reading the status file waited on a pipe put in its place");
        };
        assert!(matches!(status, Ok(None)), "a pipe is no status file: {status:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Job starts and ends are written off the job's thread, in bursts; whatever the
    /// interleaving with immediate writes, the file ends with the last change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_in_the_background_never_leave_an_older_status_on_disk() {
        let dir = std::env::temp_dir().join(format!("cr-status-behind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = Arc::new(StatusFile::new(dir.join("status.json"), "spark", "wss://edge"));
        let mut tasks = Vec::new();
        for t in 0..4 {
            let file = Arc::clone(&file);
            tasks.push(tokio::spawn(async move {
                for i in 0..200 {
                    file.running(vec![format!("job-{t}-{i}")]);
                    if i % 50 == 0 {
                        file.draining();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        file.job_ended(vec!["the-last".into()], vec!["owner/repo".into()]);
        let last = || read(&dir).ok().flatten().map(|s| (s.running, s.mirrors));
        let wanted = Some((vec!["the-last".to_string()], vec!["owner/repo".to_string()]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while last() != wanted {
            assert!(std::time::Instant::now() < deadline, "the file kept {:?}", last());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // And it stays so: no write of an older snapshot comes after.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(last(), wanted);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Carried from s38: `oauth-status` and `doctor` add to their own reading of the login
    /// what the running agent's status file says (a failed authentication, the usage
    /// window: [`running_agents`]), and took the file as the running agent's by its lock
    /// alone — not by what `status --check` had learnt since: a stopped agent's file, or
    /// one a job (the agent's user) wrote dated ahead or with a heartbeat interval no agent
    /// writes, was believed. One predicate of a live agent ([`live_agent`]) serves all three.
    #[test]
    fn oauth_status_and_doctor_take_no_stopped_or_faked_agent_for_the_running_one() {
        let dir = std::env::temp_dir().join(format!("cr-status-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let login = crate::oauth::Login::new(Some(&dir.join("cfg")));
        let mut failed = login.read(crate::now_ms()).report;
        failed.auth_failed = true;
        let mut agent = stand_in(&dir);
        let pid = agent.id();
        let live = Status { agent_id: "a".into(), edge: "wss://e".into(), pid, connected: true, since: "then".into(), heartbeat_ms: 15_000, login: Some(failed), ..Default::default() };
        // Whether `oauth-status` and `doctor` take the file's failed authentication as the
        // running agent's.
        let believed = |change: &dyn Fn(&mut Status)| {
            let mut status = Status { updated_ms: crate::now_ms(), ..live.clone() };
            change(&mut status);
            std::fs::write(dir.join("status.json"), serde_json::to_vec(&status).unwrap()).unwrap();
            (running_agents(&dir).is_some(), crate::report::local_report(&login, &dir).auth_failed)
        };
        let running = believed(&|_| {});
        let disconnected = believed(&|s| (s.connected, s.heartbeat_ms) = (false, 0));
        let ahead = believed(&|s| s.updated_ms = 1 << 63);
        let unbeating = believed(&|s| s.heartbeat_ms = 0);
        let forged_beat = believed(&|s| s.heartbeat_ms = shared::contract::MAX_HEARTBEAT_INTERVAL_MS + 1);
        // SAFETY: a signal to our own child, then a wait (WUNTRACED) until it has stopped.
        unsafe {
            libc::kill(pid as i32, libc::SIGSTOP);
            libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WUNTRACED);
        }
        let stopped = believed(&|_| {});
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let resumed = believed(&|_| {});
        let _ = (agent.kill(), agent.wait());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(running, (true, true), "the running agent's file");
        assert_eq!(disconnected, (true, true), "a running agent not connected yet writes no interval");
        assert_eq!(resumed, (true, true), "resumed");
        for (what, judged) in [("dated ahead", ahead), ("connected with no interval", unbeating), ("an interval no edge sets", forged_beat), ("stopped", stopped)] {
            assert_eq!(judged, (false, false), "a file {what} taken as the running agent's");
        }
    }

    /// A stand-in agent for the tests: this very program (so `/proc/<pid>/exe` is the
    /// checker's own), `claude-runner agent …` by its command line, holding DATA_DIR's
    /// locks as the agent takes them. Does nothing unless [`stand_in`] starts it.
    #[test]
    #[ignore = "started by stand_in"]
    fn stand_in_agent() {
        let Some(dir) = std::env::var_os("CR_STAND_IN_DATA_DIR") else { return };
        let dir = PathBuf::from(dir);
        let _lock = runtime::hold_lock(&dir.join(crate::agent::DATA_LOCK)).unwrap().expect("nobody else holds it");
        let _folder = crate::drain::hold_folder(&dir).unwrap().expect("nobody holds the folder");
        std::thread::sleep(std::time::Duration::from_secs(120));
    }

    /// Starts [`stand_in_agent`] for `dir`, once it holds both locks (in a process group
    /// of its own, as `crate::drain::tests::end_group` ends one).
    pub(crate) fn stand_in(dir: &std::path::Path) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let agent = std::process::Command::new(std::env::current_exe().unwrap())
            .arg0("claude-runner")
            .args(["agent", "--exact", "--ignored", "status::tests::stand_in_agent"])
            .env("CR_STAND_IN_DATA_DIR", dir)
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        while !crate::drain::folder_flock_holders(dir).contains(&agent.id()) || !crate::drain::lock_holders(dir).is_some_and(|h| h.contains(&agent.id())) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        agent
    }

    fn connected_at(updated_ms: u64) -> Status {
        Status {
            agent_id: "spark".into(),
            edge: "wss://edge".into(),
            connected: true,
            heartbeat_ms: 15_000,
            updated_ms,
            ..Status::default()
        }
    }

    #[test]
    fn healthy_only_when_running_connected_and_fresh() {
        let now = 1_000_000;
        let dir = std::path::Path::new("/nowhere");
        assert!(connected_at(now - 20_000).health(dir, Liveness::Running, false, now).is_ok());
        // Three missed heartbeats and the slack: stuck.
        let stuck = connected_at(now - 56_000).health(dir, Liveness::Running, false, now).unwrap_err();
        assert!(stuck.contains("looks stuck"), "{stuck}");
        // Stale for want of room: said so, with what to do, not "restart it".
        let full = connected_at(now - 56_000).health(dir, Liveness::Running, true, now).unwrap_err();
        assert!(full.contains("full") && full.contains("free some space") && !full.contains("restart"), "{full}");
        let dead = connected_at(now).health(dir, Liveness::NotRunning, false, now).unwrap_err();
        assert!(dead.contains("not running"), "{dead}");
        let held = connected_at(now).health(dir, Liveness::Stopped, false, now).unwrap_err();
        assert!(held.contains("is stopped") && held.contains("kill -CONT"), "{held}");
        let mut offline = connected_at(now);
        offline.connected = false;
        offline.last_error = Some("cannot reach the edge".into());
        let why = offline.health(dir, Liveness::Running, false, now).unwrap_err();
        assert!(why.contains("cannot reach the edge"), "{why}");
        // A file that says connected with no heartbeat interval was not written by an agent
        // of this release (a job, the agent's user, can write it): no staleness check would
        // ever turn it unhealthy.
        let mut unbeating = connected_at(now);
        unbeating.heartbeat_ms = 0;
        let why = unbeating.health(dir, Liveness::Running, false, now).unwrap_err();
        assert!(why.contains("no heartbeat interval") && why.contains("restart"), "{why}");
        // Dated ahead of the clock (past a little slack): never stale, so not believed.
        assert!(connected_at(now + 5_000).health(dir, Liveness::Running, false, now).is_ok(), "a clock a little behind the writer's");
        for ahead in [now + 60_000, 1 << 63, u64::MAX] {
            let why = connected_at(ahead).health(dir, Liveness::Running, false, now).unwrap_err();
            assert!(why.contains("ahead of this machine's clock") && why.contains("restart"), "{why}");
        }
        // An interval no edge can set (the protocol's longest is 600 s): a file a day old
        // was healthy for one of 10^15 ms, and 3 × u64::MAX/2 overflowed.
        let day_old = 86_400_000 * 2;
        for beat in [1_000_000_000_000_000, u64::MAX / 2, u64::MAX] {
            let mut forged = connected_at(day_old - 86_400_000);
            forged.heartbeat_ms = beat;
            let why = forged.health(dir, Liveness::Running, false, day_old).unwrap_err();
            assert!(why.contains("heartbeat interval") && why.contains("restart"), "{why}");
        }
        // The longest an edge can set is taken as is.
        let mut slow = connected_at(now - 1_000_000);
        slow.heartbeat_ms = shared::contract::MAX_HEARTBEAT_INTERVAL_MS;
        assert!(slow.health(dir, Liveness::Running, false, now + 500_000).is_ok());
    }

    /// A job (the agent's user) could SIGSTOP the agent and rewrite status.json dated far
    /// ahead (`updated_ms` 2^63): `status --check`, the container's health check, said
    /// healthy for ever. A stopped lock holder is unhealthy, said to be stopped, with what
    /// to do; so is a file dated ahead, from a running one.
    #[test]
    fn a_stopped_agent_or_a_file_dated_ahead_is_not_healthy() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("cr-status-stopped-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lock = dir.join(crate::agent::DATA_LOCK);
        let mut agent = stand_in(&dir);
        let pid = agent.id();
        let checked_as = |pid: u32, updated_ms: u64| {
            let status = Status { agent_id: "a".into(), edge: "wss://e".into(), pid, connected: true, since: "then".into(), heartbeat_ms: 15_000, updated_ms, ..Default::default() };
            std::fs::write(dir.join("status.json"), serde_json::to_vec(&status).unwrap()).unwrap();
            let mut shown = Vec::new();
            let healthy = check_to(&mut shown, &dir).unwrap();
            let mut more = Vec::new();
            let shown_ok = show_to(&mut more, &dir).unwrap();
            (healthy, shown_ok, String::from_utf8(shown).unwrap() + &String::from_utf8(more).unwrap())
        };
        let checked = |updated_ms: u64| checked_as(pid, updated_ms);
        let running = checked(crate::now_ms());
        let ahead = checked(1 << 63);
        // SAFETY: a signal to our own child, then a wait (WUNTRACED) until it has stopped.
        unsafe {
            libc::kill(pid as i32, libc::SIGSTOP);
            libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WUNTRACED);
        }
        let stopped = checked(crate::now_ms());
        let stopped_ahead = checked(1 << 63);
        // The lock file swapped: the stopped agent's moved aside, a new one locked by a
        // `claude-runner` by its first argument (flock(1)), and a fresh file naming that.
        std::fs::rename(&lock, dir.join("x")).unwrap();
        std::fs::write(&lock, b"").unwrap();
        let mut job = std::process::Command::new("flock").arg0("claude-runner").arg(&lock).args(["sleep", "60"]).spawn().unwrap();
        while !crate::drain::lock_holders(&dir).is_some_and(|holders| holders.contains(&job.id())) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let swapped = checked_as(job.id(), crate::now_ms());
        // The agent resumed, the job's stand-in still named: not this program.
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let other_program = checked_as(job.id(), crate::now_ms());
        let _ = (agent.kill(), agent.wait(), job.kill(), job.wait());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(running.0 && running.1, "{}", running.2);
        assert!(!ahead.0 && ahead.2.contains("ahead of this machine's clock"), "{}", ahead.2);
        for (healthy, shown_ok, said) in [stopped, stopped_ahead, swapped] {
            assert!(!healthy && !shown_ok, "{said}");
            assert!(said.contains(&format!("(pid {pid}) is stopped")) && said.contains(&format!("kill -CONT {pid}")), "{said}");
            assert!(!said.contains("connected since"), "a stopped agent shown as connected: {said}");
        }
        assert!(!other_program.0 && !other_program.1 && other_program.2.contains("does not run this claude-runner"), "{}", other_program.2);
        assert!(!other_program.2.contains("connected since"), "{}", other_program.2);
    }
}
