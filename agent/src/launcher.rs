//! The launcher: one small process, started with the agent's first job, that starts every
//! Claude. The agent hands it what to run (program, arguments, folder, environment) and
//! the pipes to run it with; the launcher clones a [`crate::warden`] into its own memory
//! (see [`launch`]), which starts Claude.
//!
//! Why a process of its own. Starting Claude straight from the agent meant forking the
//! agent: a multi-threaded process of 15-20 MiB whose page tables are copied and
//! write-protected at every fork, with a TLB flush on both cores each time, and whose
//! pages are then copied again as the agent writes to them while the child lives. `perf`
//! put that at a quarter of the agent's CPU per job. The launcher is single-threaded and
//! small, and it no longer forks at all: each warden is a `clone(CLONE_VM)` that shares
//! its memory (a fork of even this small process was half of the launcher tree's CPU per
//! job), under the rules [`launch`] and [`crate::rawsys`] give.
//! It is the agent's own code, cloned by the agent's [`crate::zygote`] (once, again if it
//! ever dies), not `exec`'d: a process is dumpable from its `exec` until it says otherwise,
//! and this one never is (see there). `ps` shows it as `claude-runner __launcher`.
//!
//! The conversation, over a Unix socket (the zygote hands the launcher its end):
//! - request: a 4-byte length with the job's five ends attached (`SCM_RIGHTS`: Claude's
//!   stdin, stdout and stderr — sockets, [`socket_pair`] — the warden's control pipe and
//!   its status pipe),
//!   then the body: NUL-separated fields `program, folder, argc, args…, NAME=value…`;
//! - answer: `errno` (0 when Claude's `exec` succeeded) and the warden's pid, with a pidfd
//!   of the warden attached when the kernel has them (the agent's last resort to kill it).
//!
//! Claude's exit reaches the agent on the status pipe (see [`crate::warden`]), not through
//! the launcher: the launcher holds no job state, and a launcher that dies loses nothing
//! running. The agent sees it gone at its next request and starts a new one; it sends that
//! request again only if the old launcher cannot have had it whole (it would otherwise risk
//! running the job twice), and waits at most [`ANSWER_WITHIN`] for any answer (a launcher
//! found stopped is given up on at once, [`answered_or_dead`]). To tell
//! those apart after the fact, the agent keeps a copy of the launcher's end of the socket:
//! what the launcher never read stays queued there, even once it is dead.
//!
//! The launcher dies with the agent whatever its state (a stopped process reads no end of
//! socket): its parent-death signal is SIGKILL. The kernel sends that signal when its
//! parent *thread* ends: the agent's thread that forked the zygote (the launcher is cloned
//! as the zygote's sibling), which is `main`, or, for a zygote forked again after one was
//! lost, the one thread that asks for every launcher and lives as long as the agent
//! ([`Running::start`]).

use std::ffi::CString;
#[cfg(test)]
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

/// The word after the program's name in a launcher's command line (`ps`, `/proc/<pid>/cmdline`).
pub const COMMAND: &str = "__launcher";
/// The pipe ends sent with each request, in this order.
const FDS: usize = 5;
/// A request body larger than this is refused (`E2BIG`): Linux refuses an `exec` whose
/// arguments and environment pass a few MiB anyway.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How long the launcher has to take a request and answer it (a clone, a clone and an
/// `exec`: milliseconds, even on a loaded machine). A launcher that takes longer is stuck
/// (starved): it is killed and replaced, rather than holding every job after it for ever
/// behind the launcher's lock. One stopped with SIGSTOP (any process of the agent's user
/// may send one, a job's included) is not waited for at all ([`answered_or_dead`]).
///
/// Not a setting: nothing an operator knows makes another figure right. The work it
/// bounds takes milliseconds (BENCHMARKS.md's hot-path timeline: a job's Claude runs
/// 1.3-1.6 ms after it is accepted, on a loaded 2-core machine; the launcher's answer
/// under `bench --jobs 1500`, debug build, load average 10.5 on 2 cores: 1.9 ms at the
/// median, 30 ms at p99, 100 ms at most over 3,879 starts); a machine
/// where it takes seconds is swapping so hard that Claude could not run a job either, and
/// a stuck launcher now costs only this wait (the request goes to its replacement when
/// it was never taken), so a longer bound would buy nothing and a shorter one risks
/// failing a job the launcher may have started.
pub(crate) const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// What an error that a helper was lost says to look for, after "If it fails again, ".
pub(crate) const HELPERS_STOPPED: &str = "a process of the agent's user (a job's, perhaps) may be stopping or killing the agent's helpers (`claude-runner __zygote`, `__launcher`, `__git`; `ps -u $USER -o pid,stat,args` shows them, `T` when stopped): end it, or restart the agent";

/// What Claude is started with: program, folder, arguments, the whole environment.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub cwd: &'a Path,
    pub args: &'a [String],
    pub env: &'a crate::process::ClaudeEnv,
}

/// The child's ends that the launcher passes on (the agent keeps the other ends).
pub struct ChildEnds {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The read end of the warden's control pipe.
    pub control: OwnedFd,
    /// The write end of the warden's status pipe.
    pub status: OwnedFd,
}

/// A started warden (Claude's parent).
pub struct Started {
    pub pid: u32,
    /// A pidfd of the warden, when the kernel has them (5.3 and later).
    pub pidfd: Option<OwnedFd>,
}

/// The agent's side: the running launcher, started on first use.
pub struct Launcher {
    running: Mutex<Option<Running>>,
    /// How a launcher is started (tests start stand-ins).
    start: fn() -> std::io::Result<Running>,
    /// [`ANSWER_WITHIN`] (tests wait less).
    answer_within: std::time::Duration,
}

struct Running {
    socket: UnixStream,
    /// A copy of the launcher's end of the socket: what the launcher never read stays
    /// queued there after its death (see [`unread`]).
    peer: OwnedFd,
    process: Child,
    /// The launcher's pidfd (kernels 5.3 and later): its death ends the wait for an answer
    /// at once (the socket's end cannot say it while `peer` holds it open).
    pidfd: Option<OwnedFd>,
}

impl Launcher {
    pub const fn new() -> Launcher {
        Launcher { running: Mutex::new(None), start: Running::start, answer_within: ANSWER_WITHIN }
    }

    /// Starts the launcher now, if it does not run (the agent does so at start, so that a
    /// launcher that cannot start is said at once, and memory figures include it).
    pub fn start(&self) -> std::io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if running.is_none() {
            *running = Some(self.new_launcher()?);
        }
        Ok(())
    }

    /// Ends the launcher, if it runs, and reaps it: the agent's last act before a clean
    /// exit. Left to its parent-death signal, it died while systemd swept the unit's
    /// processes after the agent's exit, and systemd on a cgroup v1 host could lose track
    /// of it and wait out TimeoutStopSec (330 s) before the restart or the stop ended.
    pub fn stop(&self) {
        if let Some(mut running) = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            running.process.kill();
            let _ = running.process.wait();
        }
    }

    /// A new launcher, every send and receive to it bounded (SO_SNDTIMEO and SO_RCVTIMEO
    /// apply to sendmsg and recvmsg too): a timeout is an error like the launcher's death.
    fn new_launcher(&self) -> std::io::Result<Running> {
        let started = (self.start)()?;
        started.socket.set_read_timeout(Some(self.answer_within))?;
        started.socket.set_write_timeout(Some(self.answer_within))?;
        Ok(started)
    }

    /// Starts Claude through the launcher (started, or started again, as needed). Blocks
    /// for a clone, a clone and an `exec`: call it off the async threads.
    pub fn spawn(&self, spawn: &Spawn, ends: ChildEnds) -> std::io::Result<Started> {
        let body = encode(spawn)?;
        if body.len() > MAX_BODY {
            return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
        }
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A launcher that died (killed, out of memory) or stopped answering is replaced, and
        // the request sent again, only if it cannot have run it: it never read the whole
        // request. Once it had it, it may have started Claude, on these very pipes, before
        // it died (or while it was stopped): sending it again could run the job twice.
        let mut retried = false;
        loop {
            if running.is_none() {
                *running = Some(self.new_launcher()?);
            }
            let launcher = running.as_mut().expect("just started");
            // A launcher that died since its last answer is seen here: the agent's copy of
            // its end keeps the socket open, so a request too large for the socket's buffer
            // would otherwise wait out the whole bound before it counts as not delivered.
            let failure = match launcher.process.try_wait() {
                Ok(Some(exit)) => Failure::NotDelivered(std::io::Error::other(format!("the launcher had ended ({exit})"))),
                // Stopped (by a job, SIGSTOP) while idle: a request larger than the socket's
                // buffer would wait out the whole bound on a send it never reads.
                Ok(None) if stopped(launcher.process.pid) => Failure::NotDelivered(std::io::Error::other("the launcher was stopped (SIGSTOP) before the request")),
                _ => match exchange(launcher, &body, &ends, self.answer_within) {
                    Ok(answer) => return answer,
                    Err(failure) => failure,
                },
            };
            let failure = match running.take() {
                Some(mut gone) => {
                    gone.process.kill();
                    let _ = gone.process.wait();
                    // Dead now, it reads nothing more: what it left unread it never had.
                    match failure {
                        Failure::Unanswered(e) if unread(&gone.peer) => Failure::NotDelivered(e),
                        failure => failure,
                    }
                }
                None => failure,
            };
            match failure {
                Failure::Unanswered(e) => {
                    tracing::warn!(error = %e, "the launcher failed while starting claude; it is replaced");
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("the agent's launcher failed while starting it ({e}) and was replaced; Claude may have started, so the job was not started again: run the job again"),
                    ));
                }
                Failure::NotDelivered(e) if retried => {
                    return Err(std::io::Error::new(e.kind(), format!("the agent's launcher failed twice in a row ({e}); the next job's start starts a new one: run the job again. If it fails again, {HELPERS_STOPPED}")));
                }
                Failure::NotDelivered(e) => {
                    tracing::warn!(error = %e, "the launcher is gone; starting a new one");
                    retried = true;
                }
            }
        }
    }
}

impl Default for Launcher {
    fn default() -> Self {
        Launcher::new()
    }
}

impl Running {
    /// Starts a launcher from the one thread that starts them all ([`on_starter_thread`]).
    fn start() -> std::io::Result<Running> {
        on_starter_thread(Running::spawn)?
    }

    /// The zygote clones it, given a copy of its end of the socket: the agent keeps its own
    /// copy of that end as the `peer`.
    fn spawn() -> std::io::Result<Running> {
        let (ours, peer, pid) = crate::zygote::launcher()?;
        Ok(Running::new(ours, peer, Child { pid, reaped: false }))
    }

    fn new(socket: UnixStream, peer: OwnedFd, process: Child) -> Running {
        // Our own child, not reaped yet: the pidfd is surely this process's.
        let pidfd = crate::pidfd::open(process.pid as u32).ok();
        Running { socket, peer, process, pidfd }
    }
}

/// Runs `f` on the one thread that starts every launcher and git worker (spawned on first
/// use, never ending), and waits for it: a zygote forked again there
/// ([`crate::zygote::launcher`]) is that thread's child, and it, its launchers and workers
/// get their parent-death signal when that thread ends, while the agent's other threads
/// come and go (tokio's blocking pool ends a thread idle for 10 s).
pub(crate) fn on_starter_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    type Task = Box<dyn FnOnce() + Send>;
    static STARTER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Task>>> = std::sync::OnceLock::new();
    let starter = STARTER.get_or_init(|| {
        let (requests, asked) = std::sync::mpsc::channel::<Task>();
        let thread = std::thread::Builder::new().name("launcher-starter".into()).spawn(move || {
            for task in asked {
                task();
            }
        });
        if let Err(e) = thread {
            tracing::warn!(error = %e, "could not start the thread that starts the launcher");
        }
        Mutex::new(requests)
    });
    let (reply, answer) = std::sync::mpsc::channel();
    let gone = || std::io::Error::other("the agent's thread that starts its launcher and git workers is gone, or failed at this start: restart the agent");
    // A task that panics ends its own wait, not the thread: the thread's end would kill
    // every helper whose parent-death signal is tied to it.
    let task: Task = Box::new(move || {
        if let Ok(done) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let _ = reply.send(done);
        }
    });
    starter.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).send(task).map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())
}

/// A launcher process: the agent's child (the zygote clones it as such), so its pid is the
/// agent's to signal until the agent reaps it.
struct Child {
    pid: libc::pid_t,
    reaped: bool,
}

impl Child {
    /// Its exit status, reaped, if it has ended.
    fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    fn kill(&self) {
        if !self.reaped {
            // SAFETY: a signal to our own child, not reaped yet: its pid is no other process's.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    fn wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.wait_with(0)
    }

    fn wait_with(&mut self, flags: libc::c_int) -> std::io::Result<Option<std::process::ExitStatus>> {
        use std::os::unix::process::ExitStatusExt;
        if self.reaped {
            return Ok(None);
        }
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child into an int we own.
            let done = unsafe { libc::waitpid(self.pid, &mut status, flags) };
            if done == self.pid {
                self.reaped = true;
                return Ok(Some(std::process::ExitStatus::from_raw(status)));
            }
            if done == 0 {
                return Ok(None);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Whether the launcher left bytes unread on its end of the socket (`FIONREAD` on the
/// agent's copy of that end). Asked after the launcher's death, so it can read no more.
fn unread(peer: &OwnedFd) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int we own.
    let ok = unsafe { libc::ioctl(peer.as_raw_fd(), libc::FIONREAD, &mut queued) } == 0;
    ok && queued > 0
}

/// How a conversation with the launcher failed.
enum Failure {
    /// Before the launcher had the whole request: it cannot have acted on it.
    NotDelivered(std::io::Error),
    /// After: it may have started Claude.
    Unanswered(std::io::Error),
}

/// One request and its answer. An `Err` is the conversation failing (the launcher is
/// gone, or stuck); an `Ok(Err)` is the launcher's answer that Claude could not be started.
fn exchange(launcher: &mut Running, body: &[u8], ends: &ChildEnds, within: std::time::Duration) -> Result<std::io::Result<Started>, Failure> {
    let socket = &mut launcher.socket;
    let fds = [&ends.stdin, &ends.stdout, &ends.stderr, &ends.control, &ends.status].map(|fd| fd.as_raw_fd());
    send_with_fds(socket.as_raw_fd(), &(body.len() as u32).to_le_bytes(), &fds).map_err(Failure::NotDelivered)?;
    let pidfd = launcher.pidfd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    send_body("the launcher", socket.as_raw_fd(), body, pidfd, launcher.process.pid, within).map_err(Failure::NotDelivered)?;
    answered_or_dead("the launcher", socket.as_raw_fd(), pidfd, launcher.process.pid, within).map_err(Failure::Unanswered)?;
    let mut answer = [0u8; 8];
    let (n, mut received) = recv_with_fds(socket.as_raw_fd(), &mut answer, 1).map_err(|e| Failure::Unanswered(not_answering(e, within)))?;
    if n == 0 {
        return Err(Failure::Unanswered(std::io::ErrorKind::UnexpectedEof.into()));
    }
    socket.read_exact(&mut answer[n..]).map_err(|e| Failure::Unanswered(not_answering(e, within)))?;
    let errno = i32::from_le_bytes(answer[..4].try_into().expect("4 bytes"));
    let pid = u32::from_le_bytes(answer[4..].try_into().expect("4 bytes"));
    if errno != 0 {
        return Ok(Err(std::io::Error::from_raw_os_error(errno)));
    }
    Ok(Ok(Started { pid, pidfd: received.pop() }))
}

/// How often a wait for a helper's answer looks whether the helper is stopped.
const STOPPED_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Waits until `helper` (the launcher, the zygote: a child of the agent's, `pid`) answers
/// on `socket` (Ok), dies (its pidfd, when there is one), is stopped, or lets `within` pass.
///
/// A stopped helper (SIGSTOP: any process of the agent's user may send it, a job's
/// included) answers nothing until it is continued, and nothing of the agent's continues
/// it: it is given up on at once (within [`STOPPED_CHECK_EVERY`]), not after the whole
/// bound. Before, a job that stopped each new launcher and zygote held every start about
/// 50 s (10 s per wait, five waits) before it failed. A helper that is slow but runs is
/// still waited for, up to `within`. The error's kind is `TimedOut` only when `within`
/// passed: a helper dead or stopped is worth replacing at once, one merely slow is not.
pub(crate) fn answered_or_dead(helper: &str, socket: RawFd, pidfd: RawFd, pid: libc::pid_t, within: std::time::Duration) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match poll_slice(socket, libc::POLLIN, pidfd, left)? {
            Slice::Ready => return Ok(()),
            Slice::Died => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{helper} died before answering"))),
            Slice::Passed => {}
        }
        if stopped(pid) {
            return Err(std::io::Error::other(format!("{helper} was stopped (SIGSTOP) before answering")));
        }
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{helper} did not answer within {within:?}")));
        }
    }
}

/// Writes a request's body to `helper` (a child of the agent's, `pid`) as
/// [`answered_or_dead`] waits for its answer: the whole write within `within`, and given up
/// at once when the helper dies or is stopped. A body larger than the socket's buffer is
/// written in parts, and a job can stop the launcher between the look before the request
/// and its last part; a blocking write waited out its timeout for each part (twice the
/// bound for a 4 MiB body), holding every other start behind the launcher's lock. One
/// `send` for a body the buffer takes, as the blocking write was.
fn send_body(helper: &str, socket: RawFd, body: &[u8], pidfd: RawFd, pid: libc::pid_t, within: std::time::Duration) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + within;
    let mut sent = 0;
    while sent < body.len() {
        let rest = &body[sent..];
        // SAFETY: sends from a buffer we own; MSG_DONTWAIT makes a full buffer EAGAIN, not a wait.
        let n = unsafe { libc::send(socket, rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            sent += n as usize;
            continue;
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => {}
            _ => return Err(std::io::Error::last_os_error()),
        }
        if stopped(pid) {
            return Err(std::io::Error::other(format!("{helper} was stopped (SIGSTOP) while the request was sent")));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{helper} did not take the request within {within:?}")));
        }
        if poll_slice(socket, libc::POLLOUT, pidfd, left)? == Slice::Died {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{helper} died before it took the request")));
        }
    }
    Ok(())
}

/// What one slice of a wait on a helper saw.
#[derive(Debug, PartialEq)]
enum Slice {
    /// The socket is ready for what was asked (an answer to read, room to write).
    Ready,
    /// The helper died (its pidfd is readable).
    Died,
    /// Neither, within the slice (or a signal cut it short): time to look whether the
    /// helper is stopped, and at the deadline.
    Passed,
}

/// Waits one slice of a wait on a helper: until `socket` is ready for `events`, the helper
/// dies (`pidfd`; a negative fd, no pidfd, is skipped by poll), or [`STOPPED_CHECK_EVERY`]
/// (at most `left`) passes. [`answered_or_dead`] and [`send_body`] wait in these slices so
/// that a stopped helper is seen between two of them.
fn poll_slice(socket: RawFd, events: libc::c_short, pidfd: RawFd, left: std::time::Duration) -> std::io::Result<Slice> {
    let mut fds = [libc::pollfd { fd: socket, events, revents: 0 }, libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 }];
    // Rounded up: a wait of less than 1 ms left is not a poll that returns at once.
    let slice = left.min(STOPPED_CHECK_EVERY).as_micros().div_ceil(1000) as i32;
    // SAFETY: polls descriptors in a buffer we own.
    if unsafe { libc::poll(fds.as_mut_ptr(), 2, slice) } < 0 {
        return if errno() == libc::EINTR { Ok(Slice::Passed) } else { Err(std::io::Error::last_os_error()) };
    }
    Ok(if fds[0].revents != 0 {
        Slice::Ready
    } else if fds[1].revents != 0 {
        Slice::Died
    } else {
        Slice::Passed
    })
}

/// Whether the agent's child `pid` is stopped now. `waitid` with `WNOWAIT` leaves the
/// report for another wait, and reports a stop only while it lasts (`SIGCONT` ends it).
fn stopped(pid: libc::pid_t) -> bool {
    // SAFETY: a siginfo_t is plain data, zeroes included.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into the siginfo_t we own; WNOHANG|WNOWAIT neither blocks nor reaps.
    let asked = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WSTOPPED | libc::WNOHANG | libc::WNOWAIT) };
    // SAFETY: si_pid is set for a child's report, and 0 (zeroed) when there is none.
    asked == 0 && unsafe { info.si_pid() } == pid
}

/// A receive that timed out says so (the kernel's EAGAIN reads "Resource temporarily unavailable").
fn not_answering(e: std::io::Error, within: std::time::Duration) -> std::io::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the launcher did not answer within {within:?}"))
        }
        _ => e,
    }
}

/// `program \0 cwd \0 argc \0 args… \0 NAME=value…`, each field NUL-terminated. A field
/// holding a NUL is refused (`exec` takes C strings): it would split into two, and the rest
/// of a caller's value (an `append_system_prompt`) would become the next argument or an
/// environment variable of its choosing.
fn encode(spawn: &Spawn) -> std::io::Result<Vec<u8>> {
    // Sized once and each `NAME=value` written in place: a job's request is built on the
    // agent's one runtime thread, and a copy per variable was most of its allocations.
    let size = spawn.program.as_os_str().len()
        + spawn.cwd.as_os_str().len()
        + 24
        + spawn.args.iter().map(|a| a.len() + 1).sum::<usize>()
        + spawn.env.vars().map(|(n, v)| n.len() + v.len() + 2).sum::<usize>();
    let mut body = Vec::with_capacity(size);
    let mut nul = false;
    let mut field = |parts: &[&[u8]]| {
        for part in parts {
            nul |= part.contains(&0);
            body.extend_from_slice(part);
        }
        body.push(0);
    };
    field(&[spawn.program.as_os_str().as_bytes()]);
    field(&[spawn.cwd.as_os_str().as_bytes()]);
    field(&[spawn.args.len().to_string().as_bytes()]);
    for arg in spawn.args {
        field(&[arg.as_bytes()]);
    }
    for (name, value) in spawn.env.vars() {
        field(&[name.as_bytes(), b"=", value.as_bytes()]);
    }
    if nul {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an argument or environment variable holds a NUL byte, which no program can be given: remove it from the job's fields (append_system_prompt, …)",
        ));
    }
    Ok(body)
}

/// What the launcher runs, from a request body.
struct Request {
    program: CString,
    cwd: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

fn decode(body: &[u8]) -> Option<Request> {
    let body = body.strip_suffix(&[0])?;
    let mut fields = body.split(|&b| b == 0).map(|f| CString::new(f).ok());
    let program = fields.next()??;
    let cwd = fields.next()??;
    let argc: usize = std::str::from_utf8(fields.next()??.as_bytes()).ok()?.parse().ok()?;
    let mut argv = vec![program.clone()];
    for _ in 0..argc {
        argv.push(fields.next()??);
    }
    let envp = fields.collect::<Option<Vec<_>>>()?;
    Some(Request { program, cwd, argv, envp })
}

/// The launcher's life, in a fresh clone of the zygote ([`crate::zygote`]; the agent,
/// `agent`, is its parent): answers requests on `socket` until the agent closes it. Never
/// returns; ends with `_exit` (std's `exit` would flush a copy of the agent's stdout, whose
/// lock another of the agent's threads may have held when the zygote was forked).
pub fn serve(socket: OwnedFd, agent: libc::pid_t) -> ! {
    // SAFETY: process-wide settings of this single-threaded process, set before anything runs.
    unsafe {
        // Dies with the agent, even stopped (a job may SIGSTOP it): the end of its socket
        // reaches only a launcher that runs. Asked for after the start, so the agent may
        // already be gone (the launcher is then the child of another process): checked.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != agent {
            libc::_exit(0);
        }
        // Non-dumpable from its first instruction: the flag came with the zygote's memory.
        // Were it not, nothing of a job's may come here (checked, never assumed).
        if libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 {
            libc::_exit(5);
        }
        libc::setpgid(0, 0);
        libc::umask(0o077);
        // The zygote ignores SIGTERM, SIGINT and SIGHUP already (only the agent ends a
        // launcher, by closing its socket: a Ctrl-C in the agent's terminal, or a SIGTERM
        // for a drain, must leave running jobs alone).
        crate::zygote::name_and_forget_the_agents_words(COMMAND);
    }
    // What every Claude needs reset: this process's signals not at their default, now
    // that it has set its own (it changes none later; its wardens change theirs after
    // Claude's start).
    let reset = NotDefault::now();
    // Wardens report to the agent, not here, but they are reaped here (promptly, so their
    // CPU time is counted as this process's children's, and no zombie waits): SIGCHLD is
    // read from a signalfd beside the socket.
    let children = child_signals();
    // Close-on-exec (received so), above 0-2 (the zygote's /dev/null and stderr).
    let mut socket = UnixStream::from(socket);
    fn exit(code: libc::c_int) -> ! {
        // SAFETY: ends this process, running no destructor.
        unsafe { libc::_exit(code) }
    }
    let mut stacks = Stacks::default();
    loop {
        reap(children, &mut stacks);
        if !wait_readable(socket.as_raw_fd(), children) {
            continue;
        }
        let mut header = [0u8; 4];
        let (n, fds) = match recv_with_fds(socket.as_raw_fd(), &mut header, FDS) {
            Ok((0, _)) | Err(_) => exit(0),
            Ok(got) => got,
        };
        if socket.read_exact(&mut header[n..]).is_err() {
            exit(0);
        }
        let len = u32::from_le_bytes(header) as usize;
        if len > MAX_BODY {
            exit(3);
        }
        let mut body = vec![0u8; len];
        if socket.read_exact(&mut body).is_err() {
            exit(0);
        }
        let answer = match (decode(&body), <[OwnedFd; FDS]>::try_from(fds)) {
            (Some(request), Ok(ends)) => launch(&request, ends, &reset, &mut stacks),
            _ => Err(libc::EINVAL),
        };
        let (errno, pid, pidfd) = match answer {
            Ok((pid, pidfd)) => (0, pid, pidfd),
            Err(errno) => (errno, 0, None),
        };
        let mut reply = [0u8; 8];
        reply[..4].copy_from_slice(&errno.to_le_bytes());
        reply[4..].copy_from_slice(&(pid as u32).to_le_bytes());
        let attached: Vec<RawFd> = pidfd.iter().map(AsRawFd::as_raw_fd).collect();
        if send_with_fds(socket.as_raw_fd(), &reply, &attached).is_err() {
            exit(0);
        }
    }
}

/// Blocks SIGCHLD and returns a signalfd that reads it (-1 if there is none: then the
/// launcher reaps before each request only).
fn child_signals() -> RawFd {
    // SAFETY: signal mask and signalfd calls on a set built here.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    }
}

/// Reaps every child that ended (the wardens), takes back their stacks, and empties the
/// signalfd.
fn reap(children: RawFd, stacks: &mut Stacks) {
    // SAFETY: waitpid without a status pointer; reads into a buffer we own.
    unsafe {
        loop {
            let pid = libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG);
            if pid <= 0 {
                break;
            }
            stacks.reaped(pid);
        }
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        while children >= 0 && libc::read(children, info.as_mut_ptr().cast(), info.len()) > 0 {}
    }
}

/// Waits until the socket has something (true) or a child ended (false).
fn wait_readable(socket: RawFd, children: RawFd) -> bool {
    let mut fds = [libc::pollfd { fd: socket, events: libc::POLLIN, revents: 0 }, libc::pollfd { fd: children, events: libc::POLLIN, revents: 0 }];
    let watched = if children >= 0 { 2 } else { 1 };
    // SAFETY: polls descriptors in a buffer we own.
    unsafe { libc::poll(fds.as_mut_ptr(), watched, -1) };
    fds[0].revents != 0
}

/// A pipe, both ends close-on-exec: (read, write). The wardens' control and status
/// pipes and the launcher's exec-error pipe are made here.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A connected pair of Unix stream sockets, both close-on-exec: (the agent's end, the
/// child's end). The standard streams of Claude and of `claude auth login` are made here
/// (`process::stream`): unlike a pipe's, a socket's `/proc/<pid>/fd/N` does not open
/// (ENXIO), so no other process of the agent's user can read or write them through it.
pub fn socket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two fds we then own.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The signals whose action is not the default in this process: ignored ones (by the
/// zygote, by Rust's runtime, or inherited: an ignored signal stays ignored across `exec`,
/// so whatever started the agent may have passed some down, glibc's own 32 and 33 among
/// them after a `posix_spawn`) and any caught one (the zygote put the agent's back to their
/// default; asked again here rather than assumed). Found once, at the launcher's start (64
/// `rt_sigaction` calls), so that each Claude's start resets these few instead of every
/// signal.
struct NotDefault {
    signals: [libc::c_int; 64],
    count: usize,
}

impl NotDefault {
    fn now() -> NotDefault {
        let mut found = NotDefault { signals: [0; 64], count: 0 };
        for sig in 1..=libc::SIGRTMAX().min(64) {
            // The kernel's struct sigaction begins with the handler (0: SIG_DFL) on every
            // layout; 4 words hold the largest.
            let mut old = [0u64; 4];
            // SAFETY: a query (no new action) into a buffer we own.
            let asked = unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, std::ptr::null::<u64>(), old.as_mut_ptr(), 8usize) };
            // A signal that cannot be asked about is reset anyway: never left to chance.
            if asked != 0 || old[0] != libc::SIG_DFL as u64 {
                found.signals[found.count] = sig;
                found.count += 1;
            }
        }
        found
    }

    fn signals(&self) -> &[libc::c_int] {
        &self.signals[..self.count]
    }
}

/// A warden's stack, and Claude's before its `exec`: [`STACK`] bytes above a guard page
/// (`PROT_NONE`, so an overflow faults instead of writing the launcher's memory). The
/// warden starts at the top; Claude's side of its clone starts half-way down, below
/// anything the warden has on its stack then (the warden waits while that side runs).
const STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

/// The wardens' stacks: kept and reused, since in a memory the wardens share every
/// `munmap` is a TLB shoot-down on each CPU that runs one of them, and a fresh mapping's
/// pages fault in again. A stack goes back to the free list only once its warden is reaped
/// (a zombie runs no more code); beyond [`KEPT_STACKS`] free ones, it is unmapped.
#[derive(Default)]
struct Stacks {
    free: Vec<*mut u8>,
    /// Each running warden's pid and its stack.
    lent: Vec<(libc::pid_t, *mut u8)>,
}

/// Free stacks kept for reuse: as many as jobs an agent runs at once, on most machines.
/// Each holds the few pages a warden touched (about 20 KiB).
const KEPT_STACKS: usize = 64;

impl Stacks {
    /// A stack's lowest byte (its guard page), or the `errno` of a failed `mmap`.
    fn take(&mut self) -> Result<*mut u8, i32> {
        if let Some(stack) = self.free.pop() {
            return Ok(stack);
        }
        // SAFETY: a new private mapping, owned by this pool until it is unmapped.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                GUARD + STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(errno());
            }
            if libc::mprotect(base, GUARD, libc::PROT_NONE) != 0 {
                let e = errno();
                libc::munmap(base, GUARD + STACK);
                return Err(e);
            }
            Ok(base.cast())
        }
    }

    fn lend(&mut self, pid: libc::pid_t, stack: *mut u8) {
        self.lent.push((pid, stack));
    }

    /// A stack no warden runs on (its clone failed, or it was reaped).
    fn give_back(&mut self, stack: *mut u8) {
        if self.free.len() < KEPT_STACKS {
            self.free.push(stack);
        } else {
            // SAFETY: a mapping of this pool that nothing runs on any more.
            unsafe { libc::munmap(stack.cast(), GUARD + STACK) };
        }
    }

    fn reaped(&mut self, pid: libc::pid_t) {
        if let Some(i) = self.lent.iter().position(|&(lent, _)| lent == pid) {
            let (_, stack) = self.lent.swap_remove(i);
            self.give_back(stack);
        }
    }
}

/// Everything a warden starts from, on the launcher's stack while it waits (see [`launch`]).
struct WardenStart<'a> {
    claude: ClaudeStart<'a>,
    control: RawFd,
    status: RawFd,
    /// The launcher's signal mask, which the warden keeps once Claude is started.
    mask: u64,
}

/// Clones the warden, which starts Claude; waits for Claude's `exec`. Returns the warden's
/// pid and a pidfd of it, or the `errno` that kept Claude from starting.
///
/// The warden is a `clone(CLONE_VM)`: it shares this process's memory, so that its start
/// copies no page tables and its exit tears down no address space (a `fork` here was about
/// half of the launcher tree's CPU per job: `copy_page_range`, the copy-on-write faults
/// after it, `exit_mmap`). What that sharing asks, and where it is met:
/// - the warden and Claude's side of its clone share this thread's `errno`: they make
///   system calls through [`crate::rawsys`] only (see there), and neither allocates;
/// - they read `request`, `argv`, `envp` and `start` here, so this function returns only
///   once they are done with them: when the exec-error pipe ends (Claude has `exec`'d, and
///   the warden closed its copy, which it does after Claude's start) or holds an `errno`
///   (Claude's side or the warden wrote it as its last act before `_exit`); the warden
///   copies what it keeps (its pipes, Claude's pid) to its own stack first;
/// - their stack is one of [`Stacks`], lent until the warden is reaped;
/// - the memory is the launcher's, non-dumpable ([`serve`]): `PR_SET_DUMPABLE` is a flag
///   of the memory, so a job (same user) can no more `ptrace` or read `/proc/<pid>/mem` of
///   a warden than of the launcher; Claude after its `exec` has a memory of its own.
fn launch(request: &Request, [stdin, stdout, stderr, control, status]: [OwnedFd; FDS], reset: &NotDefault, stacks: &mut Stacks) -> Result<(libc::pid_t, Option<OwnedFd>), i32> {
    let (error_read, error_write) = pipe().map_err(|_| errno())?;
    let argv: Vec<*const libc::c_char> = request.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> = request.envp.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
    let stack = stacks.take()?;
    let mut start = WardenStart {
        claude: ClaudeStart {
            request,
            argv: &argv,
            envp: &envp,
            pipes: [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
            error: error_write.as_raw_fd(),
            reset: reset.signals(),
            // SAFETY: within the mapping: half-way up its usable part (page-aligned).
            stack_top: unsafe { stack.add(GUARD + STACK / 2) },
        },
        control: control.as_raw_fd(),
        status: status.as_raw_fd(),
        mask: 0,
    };
    // Every signal blocked across the clone: no handler of the launcher's (Rust's SIGSEGV
    // one) may run on the warden's side before it has reset them.
    let all = !0u64;
    // SAFETY: the mask calls take sets we own. The clone's child runs `warden` on a stack
    // lent to it until it is reaped, reading `start` only while this function waits below.
    let warden = unsafe {
        crate::rawsys::set_mask(&all, &mut start.mask);
        let top = stack.add(GUARD + STACK);
        let pid = crate::rawsys::clone_on(libc::CLONE_VM | libc::SIGCHLD, top, warden, &start as *const WardenStart as *mut libc::c_void);
        crate::rawsys::set_mask(&start.mask, std::ptr::null_mut());
        pid
    };
    if warden < 0 {
        stacks.give_back(stack);
        return Err(-warden as i32);
    }
    let warden = warden as libc::pid_t;
    stacks.lend(warden, stack);
    // The launcher keeps none of the job's pipe ends: Claude and the warden hold them.
    drop((stdin, stdout, stderr, control, status, error_write));
    let mut code = [0u8; 4];
    let mut read = 0;
    loop {
        // Raw: the result says the error, with no `errno` the warden could have written
        // in between (it writes none, but this wait is what keeps `start` alive).
        // SAFETY: reads into a 4-byte buffer we own.
        let n = unsafe { crate::rawsys::read(error_read.as_raw_fd(), code[read..].as_mut_ptr(), 4 - read) };
        if n > 0 {
            read += n as usize;
            if read == 4 {
                break;
            }
        } else if n == 0 {
            break;
        } else if n != -(libc::EINTR as isize) {
            // A pipe read fails with nothing else. Were it to, nothing would say when the
            // warden is done with `start`: the launcher ends without freeing it (its memory
            // lives on while a warden does), and the agent, unanswered, starts another.
            // SAFETY: ends this process at once, running no destructor.
            unsafe { libc::_exit(4) };
        }
    }
    // `start`, `argv`, `envp` and the request are no longer read: they may go. Until here
    // `start`'s place on this stack is kept (the compiler could otherwise reuse it for
    // `code` or `read` once it sees no more use of its own).
    std::hint::black_box(&start);
    if read == 4 {
        // Claude's exec failed; its warden reports the exit to a status pipe nobody reads.
        return Err(i32::from_le_bytes(code));
    }
    // Our own child, which is not reaped before we answer (a zombie still has its pid):
    // the pidfd is surely the warden's.
    let pidfd = crate::pidfd::open(warden as u32).ok();
    Ok((warden, pidfd))
}

/// The warden's first code, on its own stack in the launcher's memory: its own process
/// group, a subreaper (before Claude exists, so none of its descendants can slip past),
/// Claude started, then [`crate::warden::run`]. `start` is read only until Claude is.
///
/// # Safety
/// Only as the entry of [`launch`]'s clone, with a [`WardenStart`].
unsafe extern "C" fn warden(start: *mut libc::c_void) -> ! {
    use crate::rawsys as sys;
    let start = &*(start as *const WardenStart);
    // What the warden keeps, copied before Claude's start: once Claude's side has written
    // to the exec-error pipe or the warden has closed it, the launcher frees `start`.
    let (control, status, error, mask) = (start.control, start.status, start.claude.error, start.mask);
    // The launcher's handlers (Rust's SIGSEGV and SIGBUS ones) are the launcher's code on
    // its thread's state: the warden dies of those signals as a plain process does.
    for sig in [libc::SIGSEGV, libc::SIGBUS] {
        sys::set_action(sig, libc::SIG_DFL);
    }
    sys::setpgid(0, 0);
    sys::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    let claude = spawn_claude(&start.claude, sys::getpid());
    if claude < 0 {
        let code = (-claude as i32).to_le_bytes();
        sys::write(error, code.as_ptr(), 4);
        sys::exit(127);
    }
    // Back to the launcher's mask (SIGCHLD blocked), as a forked warden had it.
    sys::set_mask(&mask, std::ptr::null_mut());
    crate::warden::run(control, status, claude as libc::pid_t)
}

/// What Claude's side of the warden's clone needs, prepared before it (in the launcher).
struct ClaudeStart<'a> {
    request: &'a Request,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    /// Claude's stdin, stdout and stderr.
    pipes: [RawFd; 3],
    /// The exec-error pipe's write end.
    error: RawFd,
    /// The signals not at their default action ([`NotDefault`]).
    reset: &'a [libc::c_int],
    /// Where Claude's side of the clone starts its stack (part of the warden's, see [`STACK`]).
    stack_top: *mut u8,
}

/// Claude's side of the clone: what the launcher prepared, and the warden's pid (for the
/// parent-death race), which the warden does not write into the launcher's `ClaudeStart`.
struct ClaudeSide<'a> {
    start: &'a ClaudeStart<'a>,
    warden: libc::pid_t,
}

/// Starts Claude from the warden with a vfork-style clone (`CLONE_VM | CLONE_VFORK`): the
/// child shares the memory, on a stack of its own, and the warden waits until it has
/// `exec`'d or exited. A `fork` here copied the page tables and faulted pages back in
/// (copy-on-write) for a process that only makes system calls and `exec`s. `posix_spawn`
/// does the same clone but cannot set the parent-death signal. Returns Claude's pid, or
/// `-errno`.
///
/// # Safety
/// Only in the warden, with `start` alive until it returns.
unsafe fn spawn_claude(start: &ClaudeStart, warden: libc::pid_t) -> isize {
    unsafe extern "C" fn entry(side: *mut libc::c_void) -> ! {
        // SAFETY: the warden passed a ClaudeSide it keeps alive while this child runs
        // (CLONE_VFORK: it waits for the exec or the exit); start_claude never returns.
        let side = &*(side as *const ClaudeSide);
        start_claude(side.start, side.warden)
    }
    let side = ClaudeSide { start, warden };
    // Every signal stays blocked across this clone (the launcher blocked them all for the
    // warden's): a handler must not run in the child before it has reset them.
    crate::rawsys::clone_on(libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD, start.stack_top, entry, &side as *const ClaudeSide as *mut libc::c_void)
}

/// Claude's side of the warden's clone: its own process group, killed with the warden,
/// signals as a fresh process has them, the job's pipes on 0-2, then `exec`. Writes the
/// `errno` to `error` and exits 127 if any step fails. It shares the memory until the
/// `exec`: it writes none of it but its own stack (raw system calls on memory prepared
/// before).
///
/// # Safety
/// Only in the child of the warden's clone.
unsafe fn start_claude(start: &ClaudeStart, warden: libc::pid_t) -> ! {
    use crate::rawsys as sys;
    let ClaudeStart { request, argv, envp, pipes, error, reset, .. } = *start;
    let fail = |result: isize| -> ! {
        let code = (-result as i32).to_le_bytes();
        sys::write(error, code.as_ptr(), 4);
        sys::exit(127)
    };
    sys::setpgid(0, 0);
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as usize);
    if sys::getppid() != warden {
        // The warden died before the signal was asked for: nobody would kill this Claude.
        sys::exit(127);
    }
    sys::prctl(libc::PR_SET_CHILD_SUBREAPER, 0);
    // The launcher ignores some signals (and Rust ignores SIGPIPE; what started the agent
    // may have passed more down): ignored signals stay ignored across exec, so each signal
    // not at its default goes back to it.
    for &sig in reset {
        sys::set_action(sig, libc::SIG_DFL);
    }
    let none = 0u64;
    sys::set_mask(&none, std::ptr::null_mut());
    for (target, &fd) in pipes.iter().enumerate() {
        let done = sys::dup2(fd, target as RawFd);
        if done < 0 {
            fail(done);
        }
    }
    // Nothing else goes through `exec`: whatever the agent was started with and did not mark
    // close-on-exec (a shell's or a supervisor's descriptors) passed to the launcher, and
    // from it to every Claude. Only the exec-error pipe stays, until the `exec` closes it.
    crate::warden::close_all_but(error, error);
    let moved = sys::chdir(request.cwd.as_ptr());
    if moved < 0 {
        fail(moved);
    }
    fail(sys::execve(request.program.as_ptr(), argv.as_ptr(), envp.as_ptr()))
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Sends `bytes` with `fds` attached.
pub(crate) fn send_with_fds(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: the message's buffers live on this stack frame; CMSG_* lay out the header
    // within `control`, which has room for FDS descriptors.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let space = libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
        }
        loop {
            let n = libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL);
            if n >= 0 {
                // A stream socket may take part of it; the descriptors went with the first byte.
                if (n as usize) < bytes.len() {
                    let mut stream = std::mem::ManuallyDrop::new(UnixStream::from_raw_fd(socket));
                    stream.write_all(&bytes[n as usize..])?;
                }
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Receives up to `buf.len()` bytes and at most `max_fds` descriptors (close-on-exec).
/// Descriptors beyond `max_fds` are closed.
pub(crate) fn recv_with_fds(socket: RawFd, buf: &mut [u8], max_fds: usize) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 16];
    // SAFETY: as in send_with_fds; every descriptor the kernel put in the control data is
    // taken into an OwnedFd exactly once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = loop {
            let n = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        fds.truncate(max_fds);
        Ok((n, fds))
    }
}

/// `OsString`s of the environment, as the request wants them (used by tests).
#[cfg(test)]
fn env_of(pairs: &[(&str, &str)]) -> crate::process::ClaudeEnv {
    pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect::<Vec<_>>().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_body_reads_back_as_it_was_written() {
        let args = vec!["-p".to_string(), "".to_string(), "--output-format".to_string()];
        let env = env_of(&[("HOME", "/h"), ("EMPTY", ""), ("EQ", "a=b")]);
        let body = encode(&Spawn { program: Path::new("/usr/bin/claude"), cwd: Path::new("/w/job 1"), args: &args, env: &env }).unwrap();
        let r = decode(&body).expect("decodes");
        assert_eq!(r.program.as_bytes(), b"/usr/bin/claude");
        assert_eq!(r.cwd.as_bytes(), b"/w/job 1");
        let argv: Vec<&[u8]> = r.argv.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(argv, [&b"/usr/bin/claude"[..], b"-p", b"", b"--output-format"]);
        let envp: Vec<&[u8]> = r.envp.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(envp, [&b"HOME=/h"[..], b"EMPTY=", b"EQ=a=b"]);
    }

    /// A stand-in launcher: `serve` on a thread at the other end of the socket, and a
    /// `sleep` for its process, which dies when `serve` returns (or when the agent's side
    /// gives up on it).
    fn stand_in(serve: impl FnOnce(UnixStream) + Send + 'static) -> std::io::Result<Running> {
        let (ours, theirs) = UnixStream::pair()?;
        let peer = theirs.try_clone()?.into();
        let pid = std::process::Command::new("sleep").arg("600").spawn()?.id() as libc::pid_t;
        let process = Child { pid, reaped: false };
        std::thread::spawn(move || {
            serve(theirs);
            // SAFETY: a signal to our own child, which only the Launcher reaps (after this).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        Ok(Running::new(ours, peer, process))
    }

    /// A stand-in launcher that takes what `take` reads of the request, is then stopped
    /// (SIGSTOP, as a job may do: the agent sees it at once) and holds its end, and what it
    /// took, until the agent's side gives up on it (then the socket hangs up).
    fn stopped_after(take: impl FnOnce(&mut UnixStream) -> Vec<OwnedFd> + Send + 'static) -> std::io::Result<Running> {
        let (ours, theirs) = UnixStream::pair()?;
        let peer = theirs.try_clone()?.into();
        let pid = std::process::Command::new("sleep").arg("600").spawn()?.id() as libc::pid_t;
        std::thread::spawn(move || {
            let mut socket = theirs;
            let taken = take(&mut socket);
            // SAFETY: a signal to our own child, which only the Launcher reaps.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            let mut hangup = libc::pollfd { fd: socket.as_raw_fd(), events: 0, revents: 0 };
            // SAFETY: polls one descriptor we own.
            unsafe { libc::poll(&mut hangup, 1, -1) };
            drop(taken);
        });
        Ok(Running::new(ours, peer, Child { pid, reaped: false }))
    }

    /// Returns once the launcher `launcher` runs has ended, left for the Launcher to reap
    /// (`WNOWAIT`): the case of a launcher found dead before the request, whatever the
    /// stand-in thread's timing.
    fn wait_ended(launcher: &Launcher) {
        let pid = launcher.running.lock().unwrap().as_ref().expect("started").process.pid;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            // SAFETY: a siginfo_t is plain data, zeroes included.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes into the siginfo_t we own; WNOHANG|WNOWAIT neither blocks nor reaps.
            let asked = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
            // SAFETY: si_pid is set for a child's report, and 0 (zeroed) when there is none.
            if asked == 0 && unsafe { info.si_pid() } == pid {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the stand-in launcher {pid} never ended");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A Launcher that starts launchers with `start`. Its bound on each wait (60 s) only
    /// bounds a hang: the stand-ins' threads may be paused for hundreds of milliseconds on a
    /// loaded machine (a 300 ms bound failed such tests by chance: the stand-in took the
    /// request, or answered, too late). A test whose subject is the bound sets its own.
    fn launcher_of(start: fn() -> std::io::Result<Running>) -> Launcher {
        Launcher { running: Mutex::new(None), start, answer_within: std::time::Duration::from_secs(60) }
    }

    /// Answers a request taken as started, warden pid 42.
    fn answer_42(socket: &UnixStream) {
        let mut answer = [0u8; 8];
        answer[4..].copy_from_slice(&42u32.to_le_bytes());
        send_with_fds(socket.as_raw_fd(), &answer, &[]).unwrap();
    }

    /// Takes one request as the launcher does; "runs Claude" by writing `ran` to its stdout.
    fn take_request(socket: &mut UnixStream) -> Vec<OwnedFd> {
        let mut header = [0u8; 4];
        let (n, fds) = recv_with_fds(socket.as_raw_fd(), &mut header, FDS).unwrap();
        socket.read_exact(&mut header[n..]).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
        socket.read_exact(&mut body).unwrap();
        assert!(decode(&body).is_some());
        let mut stdout = UnixStream::from(fds[1].try_clone().unwrap());
        stdout.write_all(b"ran\n").unwrap();
        fds
    }

    /// Spawns through `launcher`; returns the outcome and what "Claude" wrote to its stdout.
    fn spawn_through(launcher: &Launcher) -> (std::io::Result<Started>, String) {
        spawn_with_args(launcher, &[])
    }

    /// [`spawn_through`] with `args`: a long one makes a request larger than the socket's
    /// buffer, sent in parts.
    fn spawn_with_args(launcher: &Launcher, args: &[String]) -> (std::io::Result<Started>, String) {
        let end = || UnixStream::pair().map(|(a, b)| (a, OwnedFd::from(b))).unwrap();
        let (mut stdout, stdout_end) = end();
        let ends = ChildEnds { stdin: end().1, stdout: stdout_end, stderr: end().1, control: end().1, status: end().1 };
        let env = env_of(&[("HOME", "/h")]);
        let spawn = Spawn { program: Path::new("/bin/true"), cwd: Path::new("/"), args, env: &env };
        let outcome = launcher.spawn(&spawn, ends);
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        (outcome, out)
    }

    /// The launcher dies after it took a request (it may have started Claude: here, it
    /// did). Before the fix the agent sent the same request, with the same pipes, to a new
    /// launcher: Claude ran twice, on one stdin and one stdout.
    #[test]
    fn a_request_the_launcher_may_have_run_is_never_sent_again() {
        fn dies_after_taking_it() -> std::io::Result<Running> {
            stand_in(|mut socket| drop(take_request(&mut socket)))
        }
        let launcher = launcher_of(dies_after_taking_it);
        let (outcome, out) = spawn_through(&launcher);
        let e = outcome.err().expect("the start fails");
        assert_eq!(out, "ran\n", "claude ran once, not again");
        assert!(e.to_string().contains("run the job again"), "{e}");
    }

    /// The launcher stops answering after it read the whole request (stuck between
    /// reading and answering): it may have started Claude, so the job fails, run once.
    /// The bound is this test's subject, so the stand-in must take the request within it:
    /// 2 s (the test waited as long before) is far past a paused thread's wake-up.
    #[test]
    fn a_request_a_stuck_launcher_took_whole_is_never_sent_again() {
        fn stuck_after_taking_it() -> std::io::Result<Running> {
            stand_in(|mut socket| {
                let fds = take_request(&mut socket);
                // Holds the pipes until the agent's side gives up (the socket hangs up).
                let mut hangup = libc::pollfd { fd: socket.as_raw_fd(), events: 0, revents: 0 };
                // SAFETY: polls one descriptor we own.
                unsafe { libc::poll(&mut hangup, 1, -1) };
                drop((fds, socket));
            })
        }
        let mut launcher = launcher_of(stuck_after_taking_it);
        launcher.answer_within = std::time::Duration::from_secs(2);
        let (outcome, out) = spawn_through(&launcher);
        let e = outcome.err().expect("the start fails");
        assert_eq!(out, "ran\n", "claude ran once, not again");
        assert!(e.to_string().contains("run the job again") && e.to_string().contains("did not answer"), "{e}");
    }

    /// The launcher is stopped (SIGSTOP; a job may send it) after it read the whole
    /// request. Before the fix the agent waited out its whole bound (10 s in the agent);
    /// now it sees the launcher stopped, kills it and fails the job (it may have started
    /// Claude) without waiting for the bound, here 120 s.
    #[test]
    fn a_launcher_stopped_with_the_request_is_given_up_at_once() {
        fn stopped_after_taking_it() -> std::io::Result<Running> {
            let (ours, theirs) = UnixStream::pair()?;
            let peer = theirs.try_clone()?.into();
            let pid = std::process::Command::new("sleep").arg("600").spawn()?.id() as libc::pid_t;
            std::thread::spawn(move || {
                let mut socket = theirs;
                let fds = take_request(&mut socket);
                // SAFETY: a signal to our own child, which only the Launcher reaps.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                // Holds the pipes and the socket as the stopped launcher would, until the
                // agent's side gives up.
                let mut rest = Vec::new();
                let _ = socket.read_to_end(&mut rest);
                drop(fds);
            });
            Ok(Running::new(ours, peer, Child { pid, reaped: false }))
        }
        let mut launcher = launcher_of(stopped_after_taking_it);
        launcher.answer_within = std::time::Duration::from_secs(120);
        let (outcome, out) = spawn_through(&launcher);
        let e = outcome.err().expect("the start fails").to_string();
        assert_eq!(out, "ran\n", "claude ran once, not again");
        assert!(e.contains("stopped") && e.contains("run the job again"), "{e}");
    }

    /// The launcher stops answering before it read the request (SIGSTOPped once the
    /// request came): it cannot have started Claude. Before the fix the job failed ("run it
    /// again"); now the request goes to the launcher that replaces it, and Claude runs once.
    #[test]
    fn a_request_a_stuck_launcher_never_read_goes_to_a_new_one() {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn stuck_then_well() -> std::io::Result<Running> {
            if STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return stopped_after(|socket| {
                    // The request came; none of it is read.
                    let mut came = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: polls one descriptor we own.
                    unsafe { libc::poll(&mut came, 1, -1) };
                    Vec::new()
                });
            }
            stand_in(|mut socket| {
                drop(take_request(&mut socket));
                answer_42(&socket);
            })
        }
        let launcher = launcher_of(stuck_then_well);
        let (outcome, out) = spawn_through(&launcher);
        assert_eq!(outcome.expect("started by the second launcher").pid, 42);
        assert_eq!(out, "ran\n");
        assert_eq!(STARTED.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// Same, for a launcher stopped half-way through the request (it had the pipes and
    /// the length, not the whole body): it cannot have acted on it either.
    #[test]
    fn a_request_a_stuck_launcher_read_in_part_goes_to_a_new_one() {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn stuck_then_well() -> std::io::Result<Running> {
            if STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return stopped_after(|socket| {
                    let mut header = [0u8; 4];
                    let (n, fds) = recv_with_fds(socket.as_raw_fd(), &mut header, FDS).unwrap();
                    assert_eq!((n, fds.len()), (4, FDS));
                    fds
                });
            }
            stand_in(|mut socket| {
                drop(take_request(&mut socket));
                answer_42(&socket);
            })
        }
        let launcher = launcher_of(stuck_then_well);
        let (outcome, out) = spawn_through(&launcher);
        assert_eq!(outcome.expect("started by the second launcher").pid, 42);
        assert_eq!(out, "ran\n");
    }

    /// A launcher found dead before the request is replaced, and the request goes to the
    /// new one (it cannot have run it).
    #[test]
    fn a_request_the_launcher_never_took_goes_to_a_new_one() {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn dead_then_well() -> std::io::Result<Running> {
            if STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return stand_in(drop);
            }
            stand_in(|mut socket| {
                drop(take_request(&mut socket));
                answer_42(&socket);
            })
        }
        let launcher = launcher_of(dead_then_well);
        // The first stand-in has ended before the request is sent.
        launcher.start().unwrap();
        wait_ended(&launcher);
        let (outcome, out) = spawn_through(&launcher);
        assert_eq!(outcome.expect("started by the second launcher").pid, 42);
        assert_eq!(out, "ran\n");
    }

    /// A request larger than the socket's buffer, to a launcher that died idle, goes to a
    /// new one at once: it does not wait out the bound on a send nobody will read.
    #[test]
    fn a_large_request_to_a_dead_launcher_goes_to_a_new_one_at_once() {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn dead_then_well() -> std::io::Result<Running> {
            if STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return stand_in(drop);
            }
            stand_in(|mut socket| {
                drop(take_request(&mut socket));
                answer_42(&socket);
            })
        }
        let mut launcher = launcher_of(dead_then_well);
        launcher.answer_within = std::time::Duration::from_secs(120);
        launcher.start().unwrap();
        wait_ended(&launcher);
        let end = || UnixStream::pair().map(|(a, b)| (a, OwnedFd::from(b))).unwrap();
        let (mut stdout, stdout_end) = end();
        let ends = ChildEnds { stdin: end().1, stdout: stdout_end, stderr: end().1, control: end().1, status: end().1 };
        let env = env_of(&[("HOME", "/h")]);
        let args = vec!["x".repeat(4 * 1024 * 1024)];
        let spawn = Spawn { program: Path::new("/bin/true"), cwd: Path::new("/"), args: &args, env: &env };
        let started = std::time::Instant::now();
        let outcome = launcher.spawn(&spawn, ends);
        let waited = started.elapsed();
        assert_eq!(outcome.expect("started by the second launcher").pid, 42);
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        assert_eq!(out, "ran\n");
        assert!(waited < launcher.answer_within, "waited out the bound: {waited:?}");
    }

    /// A request larger than the socket's buffer, to a launcher a job stopped while it
    /// was idle, goes to a new one at once. Before, the send waited out its whole bound
    /// (here 120 s; 10 s in the agent) on a launcher that reads nothing while stopped.
    #[test]
    fn a_large_request_to_a_stopped_launcher_goes_to_a_new_one_at_once() {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn stopped_then_well() -> std::io::Result<Running> {
            if STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let running = stand_in(|socket| {
                    // Reads nothing, as a stopped launcher; holds its end until the agent's
                    // side gives up on it (then the socket hangs up).
                    let mut hangup = libc::pollfd { fd: socket.as_raw_fd(), events: 0, revents: 0 };
                    // SAFETY: polls one descriptor we own.
                    unsafe { libc::poll(&mut hangup, 1, -1) };
                })?;
                // SAFETY: a signal to our own child, which only the Launcher reaps.
                unsafe { libc::kill(running.process.pid, libc::SIGSTOP) };
                // A stop takes effect when the process next runs: the case here is a
                // launcher stopped before the request, not one stopped while it is sent.
                while !stopped(running.process.pid) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                return Ok(running);
            }
            stand_in(|mut socket| {
                drop(take_request(&mut socket));
                answer_42(&socket);
            })
        }
        let mut launcher = launcher_of(stopped_then_well);
        launcher.answer_within = std::time::Duration::from_secs(120);
        launcher.start().unwrap();
        let started = std::time::Instant::now();
        let (outcome, out) = spawn_with_args(&launcher, &["x".repeat(4 * 1024 * 1024)]);
        let waited = started.elapsed();
        assert_eq!(outcome.expect("started by the second launcher").pid, 42);
        assert_eq!(out, "ran\n");
        assert!(waited < launcher.answer_within, "waited out the bound: {waited:?}");
    }

    /// A launcher stopped (SIGSTOP; a job may send it) after the agent's look before the
    /// request, while a request larger than the socket's buffer is being sent: a job that
    /// watches the launcher wake can time that. Before the fix the send waited out its
    /// whole bound (here 20 s; 10 s in the agent, per write), holding every other start
    /// behind the launcher's lock; now the launcher is seen stopped within a slice of the
    /// wait, and the request, never taken whole, goes to a new launcher.
    #[test]
    fn a_launcher_stopped_while_a_large_request_is_sent_is_replaced_at_once() {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn stopped_once_sending() -> std::io::Result<Running> {
            if STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let (ours, theirs) = UnixStream::pair()?;
                let peer = theirs.try_clone()?.into();
                let pid = std::process::Command::new("sleep").arg("600").spawn()?.id() as libc::pid_t;
                std::thread::spawn(move || {
                    // The request's first bytes: the agent looked before sending, and found
                    // the launcher running.
                    let mut first = libc::pollfd { fd: theirs.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: polls one descriptor we own.
                    unsafe { libc::poll(&mut first, 1, -1) };
                    // SAFETY: a signal to our own child, which only the Launcher reaps.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    // Reads nothing more, as the stopped launcher; holds its end until the
                    // agent's side gives up on it (then the socket hangs up).
                    let mut hangup = libc::pollfd { fd: theirs.as_raw_fd(), events: 0, revents: 0 };
                    // SAFETY: as above.
                    unsafe { libc::poll(&mut hangup, 1, -1) };
                });
                return Ok(Running::new(ours, peer, Child { pid, reaped: false }));
            }
            stand_in(|mut socket| {
                drop(take_request(&mut socket));
                answer_42(&socket);
            })
        }
        let mut launcher = launcher_of(stopped_once_sending);
        launcher.answer_within = std::time::Duration::from_secs(20);
        launcher.start().unwrap();
        let started = std::time::Instant::now();
        let (outcome, out) = spawn_with_args(&launcher, &["x".repeat(4 * 1024 * 1024)]);
        let waited = started.elapsed();
        assert_eq!(outcome.expect("started by the second launcher").pid, 42);
        assert_eq!(out, "ran\n", "claude ran once");
        assert!(waited < launcher.answer_within, "waited out the bound: {waited:?}");
    }

    /// The signals each Claude's start resets are those not at their default: ignored ones
    /// (Rust's SIGPIPE, one ignored here as a parent may pass it down) and caught ones.
    #[test]
    fn the_signals_to_reset_are_those_not_at_their_default() {
        // SAFETY: process-wide dispositions of signals no test sends.
        unsafe { libc::signal(libc::SIGRTMAX() - 1, libc::SIG_IGN) };
        let found = NotDefault::now();
        let found = found.signals();
        assert!(found.contains(&libc::SIGPIPE) && found.contains(&(libc::SIGRTMAX() - 1)), "{found:?}");
        assert!(!found.contains(&libc::SIGKILL) && !found.contains(&libc::SIGCHLD), "{found:?}");
        unsafe { libc::signal(libc::SIGRTMAX() - 1, libc::SIG_DFL) };
    }

    /// A warden's stack comes back for the next one only once the warden is reaped, and its
    /// lowest page is a guard (an overflow faults rather than write the launcher's memory).
    #[test]
    fn a_wardens_stack_is_reused_only_after_it_is_reaped() {
        let mut stacks = Stacks::default();
        let first = stacks.take().unwrap();
        stacks.lend(4242, first);
        let second = stacks.take().unwrap();
        assert_ne!(first, second, "a running warden's stack was handed out again");
        stacks.reaped(4243);
        assert!(stacks.free.is_empty());
        stacks.reaped(4242);
        assert_eq!(stacks.take().unwrap(), first);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let guard = maps.lines().find(|l| l.starts_with(&format!("{:x}-", first as usize))).expect("the stack's mapping");
        assert!(guard.split_whitespace().nth(1) == Some("---p"), "{guard}");
        for _ in 0..KEPT_STACKS + 2 {
            let stack = stacks.take().unwrap();
            stacks.give_back(stack);
        }
        let many: Vec<_> = (0..KEPT_STACKS + 2).map(|_| stacks.take().unwrap()).collect();
        for stack in many {
            stacks.give_back(stack);
        }
        assert_eq!(stacks.free.len(), KEPT_STACKS, "free stacks beyond the bound are unmapped");
        for stack in [first, second] {
            stacks.give_back(stack);
        }
    }

    #[test]
    fn a_field_holding_a_nul_is_refused_not_split_in_two() {
        let clean = env_of(&[("HOME", "/h")]);
        let spawn = |args: &[String], env: &crate::process::ClaudeEnv| {
            encode(&Spawn { program: Path::new("/usr/bin/claude"), cwd: Path::new("/w"), args, env }).map(|_| ()).map_err(|e| e.kind())
        };
        let refused = Err(std::io::ErrorKind::InvalidInput);
        assert_eq!(spawn(&["--append-system-prompt=x\0EVIL=1".to_string()], &clean), refused);
        assert_eq!(spawn(&[], &env_of(&[("HOME", "/h\0EVIL=1")])), refused);
        assert_eq!(spawn(&[], &env_of(&[("HO\0ME", "/h")])), refused);
        assert_eq!(spawn(&["fine".to_string()], &clean), Ok(()));
    }

    #[test]
    fn a_broken_request_body_is_refused_not_trusted() {
        for body in [&b""[..], b"prog", b"prog\0cwd\0", b"prog\0cwd\0x\0", b"prog\0cwd\x002\0one\0", b"prog\0cwd\018446744073709551616\0"] {
            assert!(decode(body).is_none(), "{body:?}");
        }
        assert!(decode(b"prog\0cwd\00\0").is_some());
    }
}
