//! How the agent is asked to stop. The first SIGTERM (or SIGINT) drains it: no new jobs,
//! the running ones may finish within `DRAIN_TIMEOUT_MS`, their results go out, then it
//! exits 0. A second one stops the running jobs at once; they are reported to the edge
//! as handed back (`RUNNER_LOST`, so callers fall back), never lost. [`crate::serve`]
//! carries this out.
//!
//! `claude-runner agent --drain` asks for a drain from another shell with SIGUSR1, which
//! only ever drains: sent while a drain is under way (a `systemctl stop` waiting for a
//! job, another `--drain`), or followed by the service manager's SIGTERM, it never turns
//! into the second SIGTERM that hands the running jobs back.

use crate::pidfd;
use crate::status;
use std::path::Path;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// What a stop request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Drain: the first SIGTERM or SIGINT, and every SIGUSR1 (`agent --drain`).
    Drain,
    /// Hand the running jobs back now: every later SIGTERM or SIGINT.
    Now,
}

/// One request per signal received, for as long as the receiver lives.
pub fn stop_requests() -> mpsc::UnboundedReceiver<Request> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut term = signal(SignalKind::terminate()).expect("signal handlers install");
    let mut int = signal(SignalKind::interrupt()).expect("signal handlers install");
    let mut usr1 = signal(SignalKind::user_defined1()).expect("signal handlers install");
    tokio::spawn(async move {
        let mut stops = 0u32;
        loop {
            let request = tokio::select! {
                _ = term.recv() => stop(&mut stops),
                _ = int.recv() => stop(&mut stops),
                _ = usr1.recv() => Request::Drain,
            };
            if tx.send(request).is_err() {
                return;
            }
        }
    });
    rx
}

/// The `n`th SIGTERM or SIGINT: the first drains, the others stop at once.
fn stop(stops: &mut u32) -> Request {
    *stops += 1;
    if *stops == 1 { Request::Drain } else { Request::Now }
}

/// Waits for a request to stop at once, passing over drain requests (the agent drains
/// already). Never returns once no more requests can come.
pub async fn stop_now(stops: &mut mpsc::UnboundedReceiver<Request>) {
    loop {
        match stops.recv().await {
            Some(Request::Now) => return,
            Some(Request::Drain) => {}
            None => std::future::pending().await,
        }
    }
}

/// Whether the process `pid` catches `signal` (its `SigCgt` in /proc). An agent from
/// before `--drain` used SIGUSR1 does not, and would die of it: it gets SIGTERM instead;
/// one from before `--clear-usage` would die of SIGUSR2, and gets none.
fn catches(pid: u32, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| caught_in(&status, signal))
}

/// Whether `signal` is in the `SigCgt:` mask of a /proc/<pid>/status text.
fn caught_in(status: &str, signal: i32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (signal - 1)) != 0)
}

/// DATA_DIR's lock file ([`crate::agent::DATA_LOCK`]), when it is a plain file: the agent
/// of `data_dir` holds a lock on it for its whole life. Locks are read from /proc/locks,
/// which a job cannot write (the status file, which names the agent's pid, is a job's to
/// write; and the agent is not dumpable: its /proc/<pid>/fd is closed to its user).
fn data_lock(data_dir: &Path) -> Option<std::fs::Metadata> {
    std::fs::symlink_metadata(data_dir.join(crate::agent::DATA_LOCK)).ok().filter(|lock| lock.is_file())
}

/// /proc/locks as one reading shows it, read once per question. Each read(2) of it is a
/// pass of its own over the kernel's list of every lock, which starts again at the number
/// of locks already shown: a lock let go between two passes (any process's) shifts the
/// rest, and one line goes unseen — the agent's, whose lock was then "held by no agent"
/// (`read_to_string` began with reads of 32 bytes: a pass every line or two). A pass shows
/// at most a page (some 80 locks) and is read whole, so a shorter /proc/locks is one
/// reading. A longer one is read [`MAX_READINGS`] times, and the lines `agree_on` picks
/// (those of the lock file in question) that any reading showed are all kept: a line shown
/// was a lock held (or waited for) at that moment, and the agent's is held for its whole
/// life, so only a line every reading missed goes unseen. Stopping at two readings that
/// agreed took two that both missed it as the answer (review rev13: a job churning a few
/// hundred locks of its own hid the agent's about once in 2,000 checks).
pub(crate) fn proc_locks(agree_on: impl Fn(&str) -> bool) -> Option<String> {
    readings_of_locks(read_proc_locks, agree_on)
}

/// [`proc_locks`]' decision, given what reads /proc/locks (its text and passes).
fn readings_of_locks(mut read: impl FnMut() -> Option<(String, usize)>, agree_on: impl Fn(&str) -> bool) -> Option<String> {
    // Without their numbers, which another lock's coming or going changes.
    let unnumbered = |line: &str| line.split_once(':').map_or(line, |(_, rest)| rest).to_string();
    let (text, passes) = read()?;
    if passes <= 1 {
        return Some(text);
    }
    let mut seen: Vec<String> = text.lines().filter(|l| agree_on(l)).map(unnumbered).collect();
    let mut last = text;
    for _ in 1..MAX_READINGS {
        let Some((text, _)) = read() else { break };
        for line in text.lines().filter(|l| agree_on(l)).map(unnumbered) {
            if !seen.contains(&line) {
                seen.push(line);
            }
        }
        last = text;
    }
    // The last reading, with the picked lines only earlier readings showed after it.
    let shown: Vec<String> = last.lines().filter(|l| agree_on(l)).map(unnumbered).collect();
    let mut text = last;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for line in seen.iter().filter(|line| !shown.contains(line)) {
        text.push_str(&format!("0:{line}\n"));
    }
    Some(text)
}

/// How many readings [`proc_locks`] takes of a /proc/locks longer than one pass.
const MAX_READINGS: usize = 4;

/// /proc/locks, and in how many passes (read(2)s that gave lines) it was read.
fn read_proc_locks() -> Option<(String, usize)> {
    use std::io::Read;
    let mut file = std::fs::File::open("/proc/locks").ok()?;
    // More than a pass ever gives: each read takes a whole pass.
    let mut chunk = vec![0u8; 64 << 10];
    let (mut text, mut passes) = (Vec::new(), 0);
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                text.extend_from_slice(&chunk[..n]);
                passes += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    String::from_utf8(text).ok().map(|text| (text, passes))
}

/// The locks on DATA_DIR's lock file, from /proc/locks read once. /proc/locks names a
/// lock's file by device and inode (`fe:00:7086084`); the inode alone matched a lock on
/// any file of that number on another file system (another user's, a job's on /dev/shm),
/// and `stat`'s device is not the one shown under an overlay (a container's root). So the
/// name is learned from a lock of this process's own on the file: a POSIX read lock
/// (it never meets the agent's flock), shown in this descriptor's /proc/self/fdinfo and
/// released when the file closes here.
///
/// A POSIX write lock can be in the way of that read lock: a job's (the agent's user can
/// lock the file; a POSIX lock never meets a flock), or on NFS, where the server holds
/// every flock as a POSIX lock of the whole file, the agent's own (the client still
/// records it as a flock, and /proc/locks shows a FLOCK line; F_GETLK names no local
/// process, the holder being the server's). The name is then the device of a lock of
/// this process's own on DATA_DIR itself (a folder cannot be opened for writing, so no
/// write lock is ever in the way of a read lock on it) and the file's inode.
///
/// The agent's lock is a flock (`File::try_lock`): only FLOCK lines are the agent's. A
/// POSIX or OFD lock is never an agent's, and only says the file is taken. None where the
/// name cannot be learned (no plain lock file, no /proc).
struct DataLocks {
    /// The lock file as /proc/locks names it.
    file: String,
    /// /proc/locks, without the locks of this process's own.
    text: String,
    /// A lock was in the way of this process's own read lock on the file.
    in_the_way: bool,
}

impl DataLocks {
    fn read(data_dir: &Path) -> Option<DataLocks> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        use std::os::unix::io::{AsRawFd, FromRawFd};
        let dir = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(data_dir).ok()?;
        let name = std::ffi::CString::new(crate::agent::DATA_LOCK).expect("no NUL in the lock file's name");
        // SAFETY: openat(2) in a descriptor owned here; the new descriptor is owned by the
        // File from here on. In the folder whose device names the file when a lock is in
        // the way.
        let lock = unsafe {
            let fd = libc::openat(dir.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
            if fd < 0 {
                return None;
            }
            std::fs::File::from_raw_fd(fd)
        };
        let metadata = lock.metadata().ok()?;
        if !metadata.is_file() {
            return None;
        }
        let (file, in_the_way) = match own_read_lock(&lock) {
            Ok(file) => (file, false),
            Err(e) if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => return None,
            Err(_) => {
                let folder = own_read_lock(&dir).ok()?;
                let (device, _) = folder.rsplit_once(':')?;
                (format!("{device}:{}", inode(&lock).unwrap_or(metadata.ino())), true)
            }
        };
        let text = proc_locks(|l| Line::of(l).is_some_and(|line| line.file == file))?
            .lines()
            .filter(|l| !Line::of(l).is_some_and(|line| line.is_ours()))
            .map(|l| format!("{l}\n"))
            .collect();
        Some(DataLocks { file, text, in_the_way })
    }

    /// The locks on the lock file (held, or waited for).
    fn on_file(&self) -> impl Iterator<Item = Line<'_>> {
        self.text.lines().filter_map(Line::of).filter(|line| line.file == self.file)
    }

    /// Whether anyone holds (or waits for) a lock on the file: an agent runs with this
    /// DATA_DIR — or something holds it that is none (a job's POSIX lock), which is not
    /// told apart here: a taken file is never another agent's to take (see `is_agent_of`).
    fn taken(&self) -> bool {
        self.in_the_way || self.on_file().next().is_some()
    }

    /// The processes that hold (not wait for) a flock of the file: the agent of this
    /// DATA_DIR while it lives.
    fn flock_holders(&self) -> impl Iterator<Item = u32> + '_ {
        self.on_file().filter(|line| line.kind == "FLOCK" && !line.waits).filter_map(|line| line.pid)
    }

    /// Whether process `pid` holds the lock, as the agent of this DATA_DIR does.
    fn held_by(&self, pid: u32) -> bool {
        self.flock_holders().any(|holder| holder == pid)
    }
}

/// Takes a POSIX read lock of the whole of `file` (released when it closes) and returns
/// the file's name as /proc/locks shows it, from the lock in its /proc/self/fdinfo.
/// `EAGAIN` or `EACCES` when a lock is in the way.
fn own_read_lock(file: &std::fs::File) -> std::io::Result<String> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a flock struct is plain data; zeroed, it covers the whole file.
    let mut probe: libc::flock = unsafe { std::mem::zeroed() };
    probe.l_type = libc::F_RDLCK as _;
    probe.l_whence = libc::SEEK_SET as _;
    // SAFETY: fcntl(2) on a descriptor owned by the caller, with a flock it only reads.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &probe) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd()))?;
    let ours = fdinfo.lines().filter_map(|l| l.strip_prefix("lock:")).filter_map(Line::of).find(Line::is_ours);
    ours.map(|line| line.file.to_string()).ok_or_else(|| std::io::Error::other("no lock of this process's own in its fdinfo"))
}

/// `file`'s inode number as /proc/locks shows it (its /proc/self/fdinfo `ino:`, Linux
/// 5.14 and later), which under an overlay `stat` need not give.
fn inode(file: &std::fs::File) -> Option<u64> {
    use std::os::unix::io::AsRawFd;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).ok()?;
    fdinfo.lines().find_map(|l| l.strip_prefix("ino:")).and_then(|ino| ino.trim().parse().ok())
}

/// Whether process `pid` holds DATA_DIR's lock ([`data_lock`]), as the agent of
/// `data_dir` does while it lives.
#[cfg(test)]
fn holds_data_lock(pid: u32, data_dir: &Path) -> bool {
    DataLocks::read(data_dir).is_some_and(|locks| locks.held_by(pid))
}

/// Whether process `pid` is the agent of `data_dir`: it holds DATA_DIR's lock
/// ([`DataLocks`]) — or it is an agent of a release before that lock (4860cf7),
/// which took none: a `claude-runner … agent` holding no lock at all, where nobody holds
/// DATA_DIR's (an agent since holds its own for its whole life, so a newer agent, of this
/// DATA_DIR or another, is never taken for an older one). Draining such an agent is the
/// upgrade's own step. What a job can still name that way, an older agent of the same user
/// with another DATA_DIR, it can signal itself.
pub(crate) fn is_agent_of(pid: u32, data_dir: &Path) -> bool {
    let holds_none = |locks: &str| !locks.lines().filter_map(Line::of).any(|line| !line.waits && line.pid == Some(pid));
    if data_lock(data_dir).is_none() {
        return proc_locks(|l| Line::of(l).is_some_and(|line| line.pid == Some(pid))).is_some_and(|locks| holds_none(&locks)) && status::runs_agent(pid);
    }
    match DataLocks::read(data_dir) {
        Some(locks) if locks.held_by(pid) => true,
        Some(locks) if locks.taken() => false,
        Some(locks) => holds_none(&locks.text) && status::runs_agent(pid),
        None => false,
    }
}

/// Whether anyone holds (or waits for) DATA_DIR's lock ([`DataLocks`]): an agent runs
/// with `data_dir`.
pub fn lock_taken(data_dir: &Path) -> bool {
    DataLocks::read(data_dir).is_some_and(|locks| locks.taken())
}

/// The processes that hold (not wait for) a flock of DATA_DIR's lock file ([`DataLocks`]),
/// the agent of `data_dir` while it lives — a POSIX lock of the file (a job's) is none —
/// where anyone holds or waits for it ([`lock_taken`]); None where nobody does. Both from
/// one reading of /proc/locks: from two, a lock held throughout was once held by nobody in
/// one and taken in the other ("locked, but no agent holds it").
pub fn lock_holders(data_dir: &Path) -> Option<Vec<u32>> {
    DataLocks::read(data_dir).filter(DataLocks::taken).map(|locks| locks.flock_holders().collect())
}

/// A shared flock of DATA_DIR itself, the folder, which every agent takes at its start and
/// holds while it lives (beside its lock of `agent.lock`): a job (the agent's user) can
/// rename or replace `agent.lock` and lock the new file itself, but it cannot move the
/// agent's lock off the folder the agent opened, so this is how `status --check` finds an
/// agent of the folder whatever became of its lock file ([`folder_flock_holders`]).
/// `Ok(None)` when another process holds the folder exclusively (no agent does).
pub fn hold_folder(data_dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let folder = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(data_dir)?;
    match folder.try_lock_shared() {
        Ok(()) => Ok(Some(folder)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The processes holding (not waiting for) a flock of DATA_DIR, the folder ([`hold_folder`]):
/// its agents while they live, and whatever else flocks it (a job can). From /proc/locks,
/// the folder named there as [`DataLocks`] learns a name, by a POSIX read lock of this
/// process's own on it. Empty where it cannot be read.
pub fn folder_flock_holders(data_dir: &Path) -> Vec<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(folder) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(data_dir) else {
        return Vec::new();
    };
    let Ok(name) = own_read_lock(&folder) else { return Vec::new() };
    let on_folder = |l: &str| Line::of(l).is_some_and(|line| line.file == name);
    let Some(text) = proc_locks(on_folder) else { return Vec::new() };
    let holders = text.lines().filter_map(Line::of).filter(|line| line.file == name && line.kind == "FLOCK" && !line.waits);
    holders.filter_map(|line| line.pid).collect()
}

/// A /proc/locks line: `1: FLOCK  ADVISORY  WRITE 4242 08:01:1311 0 EOF`, or a wait for a
/// lock, `1: -> FLOCK  ADVISORY  WRITE 4243 08:01:1311 0 EOF` (its fields one further on).
pub(crate) struct Line<'a> {
    pub(crate) waits: bool,
    pub(crate) kind: &'a str,
    /// -1 (none) for a lock of an open file description (OFDLCK).
    pub(crate) pid: Option<u32>,
    /// The file, `major:minor:inode`.
    pub(crate) file: &'a str,
}

impl<'a> Line<'a> {
    pub(crate) fn of(line: &'a str) -> Option<Line<'a>> {
        let mut fields = line.split_whitespace().skip(1).peekable();
        let waits = fields.next_if_eq(&"->").is_some();
        let kind = fields.next()?;
        let pid = fields.nth(2)?.parse().ok();
        let file = fields.next()?;
        Some(Line { waits, kind, pid, file })
    }

    /// A POSIX lock this process holds: one of [`own_read_lock`]'s.
    fn is_ours(&self) -> bool {
        self.kind == "POSIX" && self.pid == Some(std::process::id()) && !self.waits
    }
}

/// `claude-runner agent --drain`: asks the agent that runs with `data_dir` to drain, then
/// waits until it has exited, saying what it is still running. False if none runs.
pub async fn request(data_dir: &Path) -> anyhow::Result<bool> {
    request_to(&mut std::io::stdout(), data_dir).await
}

/// The agent of a DATA_DIR as its status file names it, checked to be that folder's
/// ([`is_agent_of`]) and held by its pidfd, so a signal reaches it and no process that got
/// its pid since. For `agent --drain` and `agent --clear-usage`.
pub(crate) struct Reached {
    pub agent: status::Status,
    held: Option<std::os::fd::OwnedFd>,
    /// It catches the signal [`reach`] was asked about.
    pub catches: bool,
}

impl Reached {
    pub fn ended(&self) -> bool {
        match &self.held {
            Some(held) => pidfd::ended(held, Duration::ZERO),
            None => !status::is_agent(self.agent.pid),
        }
    }

    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        match &self.held {
            Some(held) => pidfd::signal(held, signal),
            // SAFETY: kill(2) sends a signal; the pid was checked to be the agent of this
            // DATA_DIR ([`reach`]).
            None if unsafe { libc::kill(self.agent.pid as libc::pid_t, signal) } != 0 => Err(std::io::Error::last_os_error()),
            None => Ok(()),
        }
    }
}

/// Finds the running agent of `data_dir` and whether it catches `signal`; None, with what
/// was found said to `out` (what the status file says — a job's to write, as the agent's
/// user — with its control characters escaped, [`status::say`]), when there is none to
/// `what` (a verb: "drain").
pub(crate) fn reach(out: &mut impl std::io::Write, data_dir: &Path, signal: i32, what: &str) -> anyhow::Result<Option<Reached>> {
    let Some(agent) = status::read(data_dir)? else {
        status::say(out, format!("No agent has run with DATA_DIR={} (no status.json); nothing to {what}.", data_dir.display()))?;
        return Ok(None);
    };
    // Held from before the checks that it is this DATA_DIR's agent to the signal and the
    // wait: between them the agent may end and its pid go to another process, which the
    // signal would reach, and whose life the wait would follow (pidfd; a kernel before 5.3
    // has none, and the pid is used as before).
    let not_running = |out: &mut _, agent: &status::Status| status::say(out, format!("Agent {} (pid {}) is not running; nothing to {what}.", agent.agent_id, agent.pid));
    let held = match pidfd::open(agent.pid) {
        Ok(held) => Some(held),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            not_running(out, &agent)?;
            return Ok(None);
        }
        Err(e) => {
            tracing::debug!(pid = agent.pid, error = %e, "no pidfd for the agent: signalled by its pid");
            None
        }
    };
    // What the process is, read before whether it has ended: an agent that ends while it is
    // read (its lock let go, its /proc gone) was said to be no agent of this DATA_DIR. One
    // that has not ended after was the one read (held by its pidfd).
    let named = status::is_agent(agent.pid);
    let of_this = named && is_agent_of(agent.pid, data_dir);
    let catches = of_this && catches(agent.pid, signal);
    let reached = Reached { agent, held, catches };
    if !named || reached.ended() {
        not_running(out, &reached.agent)?;
        return Ok(None);
    }
    if !of_this {
        status::say(
            out,
            format!(
                "Process {} (named by {}/status.json as agent {}) does not hold {}: it is not the agent of this DATA_DIR, and is not signalled. Is the agent running with another DATA_DIR?",
                reached.agent.pid,
                data_dir.display(),
                reached.agent.agent_id,
                data_dir.join(crate::agent::DATA_LOCK).display()
            ),
        )?;
        return Ok(None);
    }
    Ok(Some(reached))
}

/// [`request`], written to `out`.
async fn request_to(out: &mut impl std::io::Write, data_dir: &Path) -> anyhow::Result<bool> {
    let Some(reached) = reach(out, data_dir, libc::SIGUSR1, "drain")? else { return Ok(false) };
    let agent = &reached.agent;
    // An older agent knows only SIGTERM; to it a second one means "hand the jobs back",
    // so it gets none while it drains already.
    let signal = match (reached.catches, agent.draining) {
        (true, _) => Some(libc::SIGUSR1),
        (false, false) => Some(libc::SIGTERM),
        (false, true) => None,
    };
    if let Some(signal) = signal {
        if let Err(e) = reached.signal(signal) {
            if e.raw_os_error() == Some(libc::ESRCH) {
                status::say(out, format!("Agent {} (pid {}) stopped before it was asked to drain.", agent.agent_id, agent.pid))?;
                return Ok(true);
            }
            // Shown escaped, as every command's closing error is (main).
            anyhow::bail!("cannot signal agent {} (pid {}): {e}; run this as the user the agent runs as", agent.agent_id, agent.pid);
        }
    }
    status::say(out, format!("Draining agent {} (pid {}): it takes no new jobs and exits once its jobs are done.", agent.agent_id, agent.pid))?;
    let mut said = None;
    while !reached.ended() {
        let running = status::read(data_dir).ok().flatten().map(|s| s.running).unwrap_or_default();
        if said.as_ref() != Some(&running) {
            if running.is_empty() {
                status::say(out, "  no job running; delivering results and closing".into())?;
            } else {
                status::say(out, format!("  waiting for {}", running.join(", ")))?;
            }
            said = Some(running);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    status::say(out, format!("Agent {} has stopped.", agent.agent_id))?;
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A /proc/locks longer than one pass, read while other locks come and go: two readings
    /// may both miss the agent's line. Any reading that showed it keeps it (review rev13:
    /// two readings that agreed on missing it were the answer: "held by no agent").
    #[test]
    fn a_lock_line_any_reading_showed_is_kept() {
        let agents = "3: FLOCK  ADVISORY  WRITE 4242 08:01:77 0 EOF";
        let other = "1: FLOCK  ADVISORY  WRITE 99 08:01:5 0 EOF\n";
        let with = format!("{other}{agents}\n");
        let mut readings = vec![(other.to_string(), 2), (other.to_string(), 2), (with, 2), (other.to_string(), 2)].into_iter();
        let text = readings_of_locks(|| readings.next(), |l| l.contains("08:01:77 ")).unwrap();
        let held: Vec<_> = text.lines().filter_map(Line::of).filter(|l| l.file == "08:01:77").collect();
        assert_eq!(held.len(), 1, "{text}");
        assert_eq!(held[0].pid, Some(4242));
        // One pass: that reading as it is.
        let text = readings_of_locks(|| Some((other.to_string(), 1)), |_| true).unwrap();
        assert_eq!(text, other);
    }

    #[test]
    fn the_first_sigterm_drains_and_the_next_ones_stop_at_once() {
        let mut stops = 0;
        assert_eq!([stop(&mut stops), stop(&mut stops), stop(&mut stops)], [Request::Drain, Request::Now, Request::Now]);
    }

    /// The status file is a job's to write (the agent's user), and `agent --drain` printed
    /// what it said (the agent's id, the jobs it runs) raw to the operator's terminal, as
    /// `status` did before cb1b97e: a job could set its clipboard (OSC 52) or title, or
    /// print over what was shown. They are shown with their control characters escaped.
    #[tokio::test]
    async fn what_the_status_file_says_reaches_the_terminal_without_its_control_sequences() {
        let dir = std::env::temp_dir().join(format!("cr-drain-words-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sequence = "\x1b]52;c;ZXZpbA==\x07\x1b[2K\r";
        // This process is no agent: it is "not running".
        let planted = status::Status { agent_id: format!("a{sequence}"), pid: std::process::id(), ..Default::default() };
        std::fs::write(dir.join("status.json"), serde_json::to_vec(&planted).unwrap()).unwrap();
        let mut shown = Vec::new();
        assert!(!request_to(&mut shown, &dir).await.unwrap());
        let shown = String::from_utf8(shown).unwrap();
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
        assert!(shown.contains("is not running"), "{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The status file is a job's to write: one naming another `claude-runner` of the
    /// same user (another agent, with its own DATA_DIR) had `--drain` signal that one, and
    /// drain (or, an older one, stop) an agent nobody asked to. Only the agent holding this
    /// DATA_DIR's lock is signalled.
    #[tokio::test]
    async fn a_status_file_naming_another_claude_runner_signals_nobody() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("cr-drain-other-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Another "claude-runner" (by its argv[0]), holding no lock of this DATA_DIR.
        let mut other = std::process::Command::new("sleep").arg0("claude-runner").arg("60").spawn().unwrap();
        let pid = other.id();
        // Named so once its exec is done.
        for _ in 0..6000 {
            if status::is_agent(pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(status::is_agent(pid), "{:?}", std::fs::read(format!("/proc/{pid}/cmdline")));
        let planted = status::Status { agent_id: "other".into(), pid, ..Default::default() };
        std::fs::write(dir.join("status.json"), serde_json::to_vec(&planted).unwrap()).unwrap();
        let mut shown = Vec::new();
        let asked = request_to(&mut shown, &dir).await;
        let alive = other.try_wait().unwrap().is_none();
        let _ = other.kill();
        let _ = other.wait();
        assert!(alive, "the other claude-runner was signalled");
        let said = format!("{asked:?} {}", String::from_utf8_lossy(&shown));
        assert!(matches!(asked, Ok(false)) && said.contains("does not hold"), "{said}");
        // The agent of the folder holds its lock (here, this process).
        assert!(!holds_data_lock(std::process::id(), &dir));
        let _lock = runtime::hold_lock(&dir.join(crate::agent::DATA_LOCK)).unwrap().expect("free");
        assert!(holds_data_lock(std::process::id(), &dir));
        assert!(!holds_data_lock(pid, &dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An agent of a release before DATA_DIR's lock (4860cf7) took none: `--drain` refused
    /// it as "not the agent of this DATA_DIR", though it was — the upgrade's own step (the
    /// new binary drains the old agent before it is restarted). A `claude-runner agent`
    /// that holds no lock at all, where nobody holds this DATA_DIR's, is such an agent.
    #[tokio::test]
    async fn an_agent_of_a_release_before_the_lock_is_still_drained() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("cr-drain-older-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // `claude-runner agent` by its command line, holding no lock (tail follows /dev/null
        // whatever the missing "agent" file).
        let mut older = std::process::Command::new("tail").arg0("claude-runner").args(["agent", "-f", "/dev/null"]).stderr(std::process::Stdio::null()).spawn().unwrap();
        let pid = older.id();
        for _ in 0..6000 {
            if status::is_agent(pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let status = status::Status { agent_id: "older".into(), pid, ..Default::default() };
        std::fs::write(dir.join("status.json"), serde_json::to_vec(&status).unwrap()).unwrap();
        let mut shown = Vec::new();
        let asked = tokio::time::timeout(std::time::Duration::from_secs(60), request_to(&mut shown, &dir)).await;
        // Signalled (it catches no SIGUSR1: SIGTERM), or killed here.
        let signalled = {
            use std::os::unix::process::ExitStatusExt;
            if !matches!(asked, Ok(Ok(true))) {
                let _ = older.kill();
            }
            older.wait().unwrap().signal() == Some(libc::SIGTERM)
        };
        let said = String::from_utf8_lossy(&shown).to_string();
        assert!(signalled && matches!(asked, Ok(Ok(true))), "not drained: {asked:?} {said}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// /proc/locks names a lock's file by its device and inode; only the inode was
    /// compared, so a lock on any file of the same inode number on another file system
    /// (another user's, a job's on /dev/shm) was taken for one on DATA_DIR's lock file:
    /// its holder, named in a status.json a job wrote, was signalled as this DATA_DIR's agent.
    #[test]
    fn a_lock_on_a_file_of_the_same_inode_on_another_device_is_not_data_dirs() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("cr-drain-device-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(crate::agent::DATA_LOCK), b"").unwrap();
        let lock = data_lock(&dir).unwrap();
        let mut locks = DataLocks::read(&dir).expect("a plain lock file");
        assert!(locks.file.ends_with(&format!(":{}", lock.ino())), "{}", locks.file);
        locks.text = format!("1: FLOCK  ADVISORY  WRITE 4242 ff:7f:{} 0 EOF\n", lock.ino());
        let (taken, held) = (locks.taken(), locks.held_by(4242));
        // The same line on the lock file's own device is its lock.
        locks.text = format!("1: FLOCK  ADVISORY  WRITE 4242 {} 0 EOF\n", locks.file);
        let (taken, held) = ((taken, locks.taken()), (held, locks.held_by(4242)));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((taken, held), ((false, true), (false, true)));
    }

    /// A POSIX write lock in the way of drain's own read lock (a job's; on NFS the agent's
    /// flock, which the server holds as one) left the lock file's name unknown: its holder
    /// (F_GETLK) was asked for instead, and the FLOCK lines, the agent's, were never read.
    /// The name is learned through DATA_DIR's own device: the same as without the lock.
    #[test]
    fn a_lock_in_the_way_of_drains_own_leaves_the_files_name_known() {
        let dir = std::env::temp_dir().join(format!("cr-drain-posix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(crate::agent::DATA_LOCK), b"").unwrap();
        let free = DataLocks::read(&dir).expect("a plain lock file");
        let mut job = posix_locker(&dir, libc::F_WRLCK);
        let in_the_way = DataLocks::read(&dir).expect("a plain lock file");
        let _ = end_group(&mut job);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!free.in_the_way && in_the_way.in_the_way);
        assert_eq!(in_the_way.file, free.file);
        assert!(in_the_way.taken() && !in_the_way.held_by(job.id()));
    }

    /// Other locks (other agents', tests', builds'), taken and let go over and over on
    /// files in `dir` by two threads until this is dropped.
    pub(crate) struct Churn {
        done: std::sync::Arc<std::sync::atomic::AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    pub(crate) fn other_locks_coming_and_going(dir: &Path) -> Churn {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..2)
            .map(|i| {
                let (done, file) = (std::sync::Arc::clone(&done), dir.join(format!("other-lock-{i}")));
                std::thread::spawn(move || {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        drop(runtime::hold_lock(&file).unwrap());
                    }
                })
            })
            .collect();
        Churn { done, threads }
    }

    impl Drop for Churn {
        fn drop(&mut self) {
            self.done.store(true, std::sync::atomic::Ordering::Relaxed);
            self.threads.drain(..).for_each(|t| t.join().unwrap());
        }
    }

    /// A job's process (the agent's user) holding a POSIX lock of `kind` (`F_WRLCK`,
    /// `F_RDLCK`) of the whole of DATA_DIR's lock file, `claude-runner … agent` by its
    /// command line (tail follows /dev/null whatever the missing "agent" file).
    pub(crate) fn posix_locker(dir: &Path, kind: i32) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let path = std::ffi::CString::new(dir.join(crate::agent::DATA_LOCK).to_str().unwrap()).unwrap();
        let (locked_w, locked_r) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut child = std::process::Command::new("tail");
        child.arg0("claude-runner").args(["agent", "-f", "/dev/null"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).process_group(0);
        // SAFETY: open(2), fcntl(2) and write(2) only, between fork and exec; the descriptor
        // stays open across exec (no O_CLOEXEC), so the lock stays the child's.
        let child = unsafe {
            let signal = std::os::unix::io::AsRawFd::as_raw_fd(&locked_w);
            child.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600);
                let mut lock: libc::flock = std::mem::zeroed();
                lock.l_type = kind as _;
                lock.l_whence = libc::SEEK_SET as _;
                if fd < 0 || libc::fcntl(fd, libc::F_SETLK, &lock) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::write(signal, b"l".as_ptr().cast(), 1);
                Ok(())
            })
        }
        .spawn()
        .unwrap();
        drop(locked_w);
        std::io::Read::read_exact(&mut &locked_r, &mut [0]).unwrap();
        for _ in 0..6000 {
            if status::is_agent(child.id()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(status::is_agent(child.id()), "{:?}", std::fs::read(format!("/proc/{}/cmdline", child.id())));
        child
    }

    /// Kills `child`'s process group and reaps it: the signal it ended by, if any.
    pub(crate) fn end_group(child: &mut std::process::Child) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        // SAFETY: kill(2) of the process group this test started.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        child.wait().unwrap().signal()
    }

    /// What `--drain` says and does with a status file naming `pid`, and whether
    /// `oauth-status` and `doctor` would take the file as the running agent's.
    async fn drain_named(dir: &Path, pid: u32) -> (anyhow::Result<bool>, String, bool) {
        let planted = status::Status { agent_id: "named".into(), pid, ..Default::default() };
        std::fs::write(dir.join("status.json"), serde_json::to_vec(&planted).unwrap()).unwrap();
        let trusted = status::running_agents(dir).is_some();
        let mut shown = Vec::new();
        let asked = tokio::time::timeout(std::time::Duration::from_secs(60), request_to(&mut shown, dir)).await.unwrap_or_else(|_| Err(anyhow::anyhow!("drain waited 60 s")));
        (asked, String::from_utf8_lossy(&shown).to_string(), trusted)
    }

    /// A job (the agent's user) can take a POSIX lock of the agent's lock file: it does not
    /// meet the agent's flock. A write lock was in the way of drain's own read lock, and its
    /// holder (F_GETLK) was taken for the agent; a read lock was one more holder on the
    /// file. Either way `--drain` signalled the job's process (a `claude-runner … agent` by
    /// its command line) when status.json named it, and `oauth-status` trusted the file.
    /// Only the flock's holder is the agent: it alone is signalled.
    async fn a_job_locking_beside_the_agent_is_not_taken_for_it(kind: i32) {
        let dir = std::env::temp_dir().join(format!("cr-drain-beside-{kind}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The agent: this program (`oauth-status` checks the program a file names runs).
        let mut agent = crate::status::tests::stand_in(&dir);
        let mut job = posix_locker(&dir, kind);
        let holders = lock_holders(&dir);
        let (by_job, said_by_job, job_trusted) = drain_named(&dir, job.id()).await;
        let job_alive = job.try_wait().unwrap().is_none();
        let (by_agent, said_by_agent, agent_trusted) = drain_named(&dir, agent.id()).await;
        let agent_ended_by = agent.try_wait().unwrap().and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
        let _ = (end_group(&mut agent), end_group(&mut job));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(job_alive && matches!(by_job, Ok(false)) && said_by_job.contains("does not hold") && !job_trusted, "{by_job:?} {said_by_job}");
        assert_eq!(holders, Some(vec![agent.id()]));
        assert!(matches!(by_agent, Ok(true)) && agent_trusted && agent_ended_by == Some(libc::SIGTERM), "{by_agent:?} {said_by_agent}");
    }

    #[tokio::test]
    async fn a_jobs_posix_write_lock_beside_the_agents_flock_is_not_the_agent() {
        a_job_locking_beside_the_agent_is_not_taken_for_it(libc::F_WRLCK).await;
    }

    #[tokio::test]
    async fn a_jobs_posix_read_lock_beside_the_agents_flock_is_not_the_agent() {
        a_job_locking_beside_the_agent_is_not_taken_for_it(libc::F_RDLCK).await;
    }

    /// A job's POSIX lock of the lock file with no agent running (no flock on it): its
    /// process was the agent to `--drain`, `status` and `oauth-status`. No agent runs.
    async fn a_job_locking_alone_is_no_agent(kind: i32) {
        let dir = std::env::temp_dir().join(format!("cr-drain-alone-{kind}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut job = posix_locker(&dir, kind);
        let holders = lock_holders(&dir);
        let (by_job, said, trusted) = drain_named(&dir, job.id()).await;
        let job_alive = job.try_wait().unwrap().is_none();
        let _ = end_group(&mut job);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(job_alive && matches!(by_job, Ok(false)) && said.contains("does not hold") && !trusted, "{by_job:?} {said}");
        assert_eq!(holders, Some(Vec::new()), "taken, by no flock");
    }

    #[tokio::test]
    async fn a_jobs_posix_write_lock_alone_is_no_agent() {
        a_job_locking_alone_is_no_agent(libc::F_WRLCK).await;
    }

    #[tokio::test]
    async fn a_jobs_posix_read_lock_alone_is_no_agent() {
        a_job_locking_alone_is_no_agent(libc::F_RDLCK).await;
    }

    #[test]
    fn reads_whether_a_process_catches_a_signal() {
        // SIGUSR1 is bit 9 (signal 10), SIGTERM bit 14.
        let status = "Name:\tclaude-runner\nSigIgn:\t0000000000001000\nSigCgt:\t0000000180004a00\n";
        assert!(caught_in(status, libc::SIGUSR1));
        assert!(caught_in(status, libc::SIGTERM));
        assert!(!caught_in(status, libc::SIGHUP));
        assert!(!caught_in("Name:\tx\n", libc::SIGUSR1));
        // This very process: the test harness catches no SIGUSR1.
        assert!(!catches(std::process::id(), libc::SIGUSR1));
    }
}
