//! The zygote: the process every launcher ([`crate::launcher`]) and every git worker
//! ([`crate::repo::worker`]) is forked from, so that none is ever dumpable, not even for its
//! first instruction. What follows says "launcher"; a git worker is cloned the same way
//! (asked for with `G` rather than `L`), and the agent keeps no copy of its socket's end.
//!
//! Why. The launcher's memory is every warden's and, until its `exec`, every Claude's
//! (`clone(CLONE_VM)`): the program, folder and environment of each job. A process is
//! dumpable again after `execve` until it says otherwise, and a job runs as the agent's
//! user: one that killed the launcher could watch for the replacement, open its
//! `/proc/<pid>/mem` in the milliseconds between its `exec` and its
//! `prctl(PR_SET_DUMPABLE, 0)`, and read it for ever after through that descriptor
//! (`job_isolation::a_job_cannot_open_a_new_launchers_memory_as_it_starts`). The flag is
//! one of the memory's, copied by `fork` and reset only by `exec`: a launcher forked from a
//! process that is already non-dumpable never has a dumpable moment.
//!
//! Why not fork the agent itself for each launcher: the agent is multi-threaded (locks
//! other threads hold at the fork stay held in the child) and 15-20 MiB whose pages the
//! launcher would keep after the agent rewrites its own (copy-on-write), growing the
//! agent's memory by up to that much. So the agent forks the zygote once, at its start
//! ([`start`], from `main`, before its command line is parsed, before logging or the
//! runtime exist: one thread, a small heap, no secret read yet — clap copies settings'
//! values, `AGENT_SIGNING_KEY` among them, onto the heap), right after making itself
//! non-dumpable; the zygote then clones a
//! fresh launcher from its own small, clean memory whenever the agent asks
//! ([`launcher`]). The clone is a `CLONE_PARENT` one: the launcher is the agent's
//! child, as when the agent started it, so the agent waits for it, kills it, and its
//! parent-death signal comes from the agent's thread that forked the zygote.
//!
//! A job can signal the zygote too (same user). Killed or stopped (either seen at once), or
//! not answering within [`LAUNCHER_WITHIN`], it is killed, reaped and forked again (at
//! once, or at the next start after one that ran out of time), this time from the running agent (from the launcher-starter thread, which lives as long
//! as the agent): still non-dumpable from birth, at the cost of a zygote that shares the
//! agent's larger memory copy-on-write. The child of a multi-threaded fork uses nothing
//! here that another thread could have held locked: system calls, and `malloc`, which
//! glibc's `fork` makes safe in the child; no `std::env`, standard streams, `tracing` or
//! `std::process::exit` (the agent's clean-up at exit): the zygote and its launchers end
//! with `_exit`.
//!
//! Why the zygote forked again is not an `exec` of the agent's binary in a zygote mode,
//! with a clean environment, which would hold none of the running agent's secrets (its
//! settings, `AGENT_SIGNING_KEY`, the login's token, the buffers of jobs running then).
//! A process is dumpable from its `exec` until its first `prctl(PR_SET_DUMPABLE, 0)`, and
//! the job that killed the zygote knows when the replacement comes (at the next start): it
//! can open the new zygote's `/proc/<pid>/mem` read-write in that window (or attach with
//! `ptrace`, where Yama allows) and keep the descriptor after the `prctl`, which only
//! `open` checks. Writing there runs its code in the zygote, and so in every launcher
//! cloned after: every later job's program, folder and environment. The copy-on-write copy
//! exposes nothing to a job: it is non-dumpable from its first instruction, so only a
//! process that could read the agent itself (root, `CAP_SYS_PTRACE`) reads it, and no core
//! dump writes it out. The window could be closed: the kernel makes a process non-dumpable
//! at its `exec` when its user may not read the image (`would_dump`, then dumpable is
//! `fs.suid_dumpable`), so the agent could exec a copy of its binary in a memfd made
//! execute-only (`fchmod 0100`, exec'd through an `O_PATH` descriptor). Not done: the
//! copy of the whole binary (49 MB for today's debug build) would stay in memory for
//! the zygote's life; the pid page would need a memfd (`MAP_SHARED` does not cross an
//! `exec`) and `main` a second entry; and the window is back wherever the image is
//! readable after all (an agent with `CAP_DAC_OVERRIDE`, whose jobs could read the agent
//! anyway) or `fs.suid_dumpable` is 1.
//!
//! The conversation, on a Unix socket: the agent sends one byte with the new launcher's
//! end of its socket attached (`SCM_RIGHTS`); the zygote answers four bytes, the
//! launcher's pid or `-errno`. A zygote killed between its clone and its answer leaves a
//! launcher the agent never heard of, yet its child: a zombie of the agent's for ever once
//! it exits (or a stray process, if a job stopped it). So the kernel writes each
//! launcher's pid, as it clones it, in a page the agent shares with the zygote
//! ([`PidSlot`]); the agent kills and reaps the launcher found there with the zygote.

use crate::launcher::{answered_or_dead, recv_with_fds, send_with_fds, ANSWER_WITHIN, HELPERS_STOPPED};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// How long a start has to get a new launcher from the zygote, its re-fork included. The
/// zygote's answer is one clone of a small process: measured under `bench` load (debug
/// build, `bench --edge native --jobs 1500`, load average 10.5 on 2 cores, 1,240 asks),
/// 0.7 ms at the median, 25 ms at p99, 84 ms at most; 5 s is 60 times the worst. A zygote
/// that takes longer is stuck, or the machine so loaded that Claude could not run a job
/// either: the start fails (run the job again) and the next start forks a new zygote.
/// A zygote stopped or dead is seen at once and forked again within the same start (see
/// [`crate::launcher::answered_or_dead`]).
const LAUNCHER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The word after the program's name in a zygote's command line (`ps`, `/proc/<pid>/cmdline`).
const NAME: &str = "__zygote";

/// The agent's zygote, once forked.
static ZYGOTE: Mutex<Option<Zygote>> = Mutex::new(None);

/// The agent's side of a running zygote.
struct Zygote {
    socket: UnixStream,
    /// The zygote's pid: the agent's child, so its own until the agent reaps it.
    pid: libc::pid_t,
    /// The pid of the launcher the zygote cloned for the request in hand, not yet answered.
    cloned: PidSlot,
    /// The zygote's pidfd (kernels 5.3 and later): its death ends a wait for its answer at
    /// once, even while a launcher it cloned still holds a copy of its socket.
    pidfd: Option<OwnedFd>,
    /// Forked while the agent had one thread (at its start): it holds no lock copied held.
    clean: bool,
}

/// Which zygote cloned a git worker: its pid, and whether it is [`Zygote::clean`].
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub zygote: libc::pid_t,
    pub clean: bool,
}

/// One word of memory shared by the agent and its zygote (`MAP_SHARED`, mapped before the
/// zygote's fork), where the kernel writes the pid of each launcher the zygote clones
/// (`CLONE_PARENT_SETTID`: written before `clone` returns, so a zygote killed at any point
/// after the launcher exists has written it). The agent clears it before each request and
/// after each answer: a pid found there after the zygote's death is a launcher it never
/// answered for, the agent's child, which the agent kills and reaps.
///
/// Nothing else is shared: the page holds pids only, the zygote writes it only through the
/// kernel, and its launchers do not inherit it (`MADV_DONTFORK`, set in the zygote).
struct PidSlot(std::ptr::NonNull<std::sync::atomic::AtomicI32>);

// SAFETY: the page is the process's until `drop`; an atomic is read and written through it.
unsafe impl Send for PidSlot {}

impl PidSlot {
    fn new() -> std::io::Result<PidSlot> {
        // SAFETY: a new anonymous mapping, ours until `drop`.
        let page = unsafe { libc::mmap(std::ptr::null_mut(), PidSlot::LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
        if page == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("could not map the page the agent shares with its zygote ({e}): restart the agent")));
        }
        Ok(PidSlot(std::ptr::NonNull::new(page.cast()).expect("mmap never answers NULL here")))
    }

    const LEN: usize = 4096;

    fn word(&self) -> &std::sync::atomic::AtomicI32 {
        // SAFETY: mapped, aligned and zero-initialised until `drop`.
        unsafe { self.0.as_ref() }
    }

    /// Where the kernel writes the next clone's pid (in the zygote's copy of the mapping).
    fn as_ptr(&self) -> *mut libc::pid_t {
        self.word().as_ptr()
    }

    /// The pid written since it was last taken, if any; the slot is clear after.
    fn take(&self) -> Option<libc::pid_t> {
        Some(self.word().swap(0, std::sync::atomic::Ordering::SeqCst)).filter(|&pid| pid > 0)
    }
}

impl Drop for PidSlot {
    fn drop(&mut self) {
        // SAFETY: our mapping, used no more.
        unsafe { libc::munmap(self.0.as_ptr().cast(), PidSlot::LEN) };
    }
}

/// Forks the zygote now: from `main`, before any thread starts and before the command line
/// is parsed (which copies secrets onto the heap), right after the process has made itself
/// non-dumpable. A failure is left for the first launcher's start, which forks again and
/// says why in the job's error if it still cannot.
pub fn start() {
    let mut zygote = ZYGOTE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if zygote.is_none() {
        *zygote = Zygote::fork(true).ok();
    }
}

/// Ends the zygote [`start`] (or a start since) forked, and reaps it: for a command that
/// starts no Claude, and at the agent's clean exit ([`crate::process::end_helpers`]).
pub fn stop() {
    if let Some(zygote) = ZYGOTE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
        zygote.end();
    }
}

/// A new launcher, the agent's child: the agent's end of its socket, the agent's copy of
/// the launcher's end, and its pid. Forks the zygote first if there is none, or again once
/// if it is dead or stopped; each try with a socket of its own, so that a launcher the
/// failed zygote may still have cloned shares nothing with the one that answers. All
/// within [`LAUNCHER_WITHIN`]: a zygote that does not answer by then is ended, and the
/// next call forks a new one.
pub fn launcher() -> std::io::Result<(UnixStream, OwnedFd, libc::pid_t)> {
    clone_helper(LAUNCHER).map(|(ours, theirs, pid, _)| (ours, theirs, pid))
}

/// A new git worker ([`crate::repo::worker`]), the agent's child: the agent's end of its
/// socket and its pid. As [`launcher`], but the agent keeps no copy of the worker's end
/// (its death is then the socket's end).
pub fn git_worker() -> std::io::Result<(UnixStream, libc::pid_t, Origin)> {
    clone_helper(GIT_WORKER).map(|(ours, _theirs, pid, origin)| (ours, pid, origin))
}

/// Ends the zygote `origin` names, if it is still the agent's and was forked again from
/// the running agent (not [`Zygote::clean`]), so that the next launcher or git worker comes
/// from a new one: its git workers may wait on a lock it copied held (see
/// [`crate::repo::worker`]). A clean zygote is kept: what held its worker up was load, or
/// a job stopping it, and a new zygote could only be forked from the running agent.
pub fn replace(origin: Origin) {
    let mut zygote = ZYGOTE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if zygote.as_ref().is_some_and(|z| z.pid == origin.zygote && !z.clean) {
        if let Some(gone) = zygote.take() {
            tracing::warn!(zygote = gone.pid, "a zygote forked again from the running agent left a git worker waiting; it is replaced");
            gone.end();
        }
    }
}

/// What the zygote is asked to clone: a launcher, or a git worker.
const LAUNCHER: u8 = b'L';
const GIT_WORKER: u8 = b'G';

fn clone_helper(kind: u8) -> std::io::Result<(UnixStream, OwnedFd, libc::pid_t, Origin)> {
    let deadline = std::time::Instant::now() + LAUNCHER_WITHIN;
    let mut zygote = ZYGOTE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut retried = false;
    loop {
        if zygote.is_none() {
            *zygote = Some(Zygote::fork(false)?);
        }
        let running = zygote.as_mut().expect("just forked");
        let (ours, theirs) = UnixStream::pair()?;
        let theirs = OwnedFd::from(theirs);
        match running.ask(kind, &theirs, deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(answer) => return answer.map(|pid| (ours, theirs, pid, Origin { zygote: running.pid, clean: running.clean })),
            Err(e) => {
                if let Some(gone) = zygote.take() {
                    gone.end();
                }
                let what = "the agent's zygote, which starts its launchers and git workers,";
                if e.kind() == std::io::ErrorKind::TimedOut || std::time::Instant::now() >= deadline {
                    tracing::warn!(error = %e, "the zygote that starts launchers did not answer in time; it was ended");
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} failed ({e}); it was ended and the next job's start forks a new one: run the job again. If it fails again, the machine is overloaded, or {HELPERS_STOPPED}")));
                }
                if retried {
                    return Err(std::io::Error::new(e.kind(), format!("{what} failed twice in a row ({e}); the next job's start forks a new one: run the job again. If it fails again, {HELPERS_STOPPED}")));
                }
                tracing::warn!(error = %e, "the zygote that starts launchers is gone or stopped; forking a new one");
                retried = true;
            }
        }
    }
}

impl Zygote {
    /// Forks a zygote from this process, made non-dumpable first (`main` has already, for
    /// every command; a unit test's process has not), so that the zygote and every launcher
    /// after it are never dumpable.
    fn fork(at_start: bool) -> std::io::Result<Zygote> {
        let (ours, theirs) = UnixStream::pair()?;
        let cloned = PidSlot::new()?;
        // SAFETY: prctl and getpid change and read process attributes only.
        let agent = unsafe {
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
            libc::getpid()
        };
        // `/proc` unreadable: a fork from `start` (the agent's first, from `main`) is clean.
        let one_thread = threads().map_or(at_start, |n| n == 1);
        // SAFETY: the child runs only `live` (what it uses is safe after a fork, see the
        // module's note) and never returns here.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("could not fork the agent's zygote, which starts its launchers and git workers ({e}): restart the agent")));
        }
        if pid == 0 {
            let socket = theirs.as_raw_fd();
            let slot = cloned.as_ptr();
            std::mem::forget((ours, theirs, cloned));
            live(socket, slot, agent);
        }
        #[cfg(test)]
        tests::forked();
        drop(theirs);
        // Our own child, not reaped yet: the pidfd is surely this process's.
        let pidfd = crate::pidfd::open(pid as u32).ok();
        let zygote = Zygote { socket: ours, pid, cloned, pidfd, clean: one_thread };
        // A zygote forked is the agent's child to reap, whatever fails after.
        let bounded = zygote.socket.set_read_timeout(Some(ANSWER_WITHIN)).and_then(|()| zygote.socket.set_write_timeout(Some(ANSWER_WITHIN)));
        if let Err(e) = bounded {
            zygote.end();
            return Err(e);
        }
        Ok(zygote)
    }

    /// One launcher asked for. `Err`: the conversation failed (the zygote is gone or
    /// stuck); `Ok(Err)`: the zygote's clone failed (`EAGAIN`: out of processes).
    fn ask(&mut self, kind: u8, socket: &OwnedFd, within: std::time::Duration) -> std::io::Result<std::io::Result<libc::pid_t>> {
        self.cloned.take();
        send_with_fds(self.socket.as_raw_fd(), &[kind], &[socket.as_raw_fd()])?;
        let pidfd = self.pidfd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        answered_or_dead("the zygote", self.socket.as_raw_fd(), pidfd, self.pid, within)?;
        let mut answer = [0u8; 4];
        self.socket.read_exact(&mut answer).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the zygote did not finish its answer within {ANSWER_WITHIN:?}"))
            }
            _ => e,
        })?;
        // Answered for: the launcher is the caller's now.
        self.cloned.take();
        Ok(match i32::from_le_bytes(answer) {
            pid if pid > 0 => Ok(pid),
            errno => Err(std::io::Error::new(
                std::io::Error::from_raw_os_error(-errno).kind(),
                format!("the agent could not start a launcher: {}", std::io::Error::from_raw_os_error(-errno)),
            )),
        })
    }

    /// Kills and reaps a zygote that failed (dead already, or stuck: stopped by a job), or
    /// one not needed ([`stop`]); then the launcher it cloned and never answered for, if
    /// any (read once the zygote is dead: it clones no more).
    /// Each pid is the agent's child's until reaped, so the signal reaches no other process.
    fn end(self) {
        kill_and_reap(self.pid);
        if let Some(launcher) = self.cloned.take() {
            tracing::warn!(pid = launcher, "the zygote ended before it answered for the launcher it cloned; that launcher is ended too");
            kill_and_reap(launcher);
        }
    }
}

/// This process's threads (`/proc/self/stat`, field 20), if `/proc` says.
fn threads() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(20 - 3)?.parse().ok()
}

/// Kills and reaps a child of the agent's, not reaped yet (so its pid is no other process's).
pub(crate) fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: a signal to, and a wait for, our own unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        while libc::waitpid(pid, std::ptr::null_mut(), 0) < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {}
    }
}

/// The zygote's life: a clean process to clone launchers from, then clones on request.
/// Never returns; ends when the agent closes the socket or dies. `cloned`: the [`PidSlot`].
fn live(socket: RawFd, cloned: *mut libc::pid_t, agent: libc::pid_t) -> ! {
    // SAFETY: process-wide settings of this new single-threaded process; the descriptors
    // closed are copies of the agent's, which this process never uses.
    unsafe {
        // Dies with the agent (its parent-death signal is tied to the thread that forked it:
        // `main`, or the launcher-starter thread, both as long-lived as the agent).
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != agent || libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 {
            // The agent is gone, or this memory could be read: never serve.
            libc::_exit(0);
        }
        // Its own process group, as the launchers: a Ctrl-C or a job-control stop meant for
        // the agent's terminal does not reach it.
        libc::setpgid(0, 0);
        // No handler of the agent's may run here (tokio's write to a pipe that is not this
        // process's), and only the agent ends it: caught signals go back to their default,
        // and SIGTERM, SIGINT and SIGHUP (a drain, a Ctrl-C) are ignored.
        for sig in 1..=libc::SIGRTMAX().min(64) {
            let mut old = [0u64; 4];
            let asked = libc::syscall(libc::SYS_rt_sigaction, sig, std::ptr::null::<u64>(), old.as_mut_ptr(), 8usize);
            if asked == 0 && old[0] != libc::SIG_DFL as u64 && old[0] != libc::SIG_IGN as u64 {
                crate::rawsys::set_action(sig, libc::SIG_DFL);
            }
        }
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            crate::rawsys::set_action(sig, libc::SIG_IGN);
        }
        let none = 0u64;
        crate::rawsys::set_mask(&none, std::ptr::null_mut());
        // Only its socket, and the agent's stderr: the agent's other descriptors (its
        // connection, the other launchers' sockets, whose ends must reach their launchers)
        // are not the zygote's to hold.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in [0, 1] {
            libc::dup2(null, fd);
        }
        crate::warden::close_all_but(socket, socket);
        // A zygote forked again from a `claude-runner up` that raised its descriptor limit
        // gives its launchers, so Claude, the one `up` was started with (as the zygote forked
        // at the start, before the raise, has). Only now, with the agent's descriptors
        // closed: lowered before, with `up` holding more than that limit, /dev/null's open
        // above failed (EMFILE) and stdin and stdout stayed the agent's.
        let _ = runtime::nofile::restore_in_child();
        // The page shared with the agent is not the launchers' (best effort: were it theirs,
        // they would hold a page of pids).
        libc::madvise(cloned.cast(), PidSlot::LEN, libc::MADV_DONTFORK);
        name_and_forget_the_agents_words(NAME);
        // Free heap pages go back to the kernel: what the agent frees and rewrites after the
        // fork would otherwise stay here, a copy kept for nothing.
        libc::malloc_trim(0);
    }
    loop {
        let mut byte = [0u8; 1];
        let end = match recv_with_fds(socket, &mut byte, 1) {
            Ok((0, _)) | Err(_) => unsafe { libc::_exit(0) },
            Ok((_, mut fds)) => fds.pop(),
        };
        let answer = match end {
            None => -libc::EINVAL,
            Some(end) => {
                #[cfg(test)]
                tests::hook_when_asked();
                // SAFETY: this process is single-threaded and holds no lock here; `cloned` is
                // the shared page, mapped for the zygote's life.
                let pid = unsafe { crate::rawsys::clone_sibling(cloned) };
                if pid == 0 {
                    // SAFETY: the zygote's socket is not the launcher's (or worker's) to hold.
                    unsafe { libc::close(socket) };
                    match byte[0] {
                        GIT_WORKER => crate::repo::worker::serve(end, agent),
                        _ => crate::launcher::serve(end, agent),
                    }
                }
                #[cfg(test)]
                tests::hook_after_clone();
                drop(end);
                pid as i32
            }
        };
        if send_with_fds(socket, &answer.to_le_bytes(), &[]).is_err() {
            // SAFETY: ends this process, whose only work is here.
            unsafe { libc::_exit(0) };
        }
    }
}

/// Writes `claude-runner <name>` over this process's command line and zeroes its
/// environment: `ps` tells the agent's processes apart, and the agent's words (its
/// environment may hold `AGENT_SIGNING_KEY`) are not kept in a copy of its memory that
/// needs none of them. The kernel keeps where both lie (`/proc/self/stat`, fields 48-51);
/// they are the agent's original words on its first thread's stack. Best effort: a
/// `/proc` that does not say leaves them as they are.
///
/// # Safety
/// In a process of one thread that never reads its arguments or environment again.
pub unsafe fn name_and_forget_the_agents_words(name: &str) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    let Some(after) = stat.rsplit(')').next() else { return };
    // After the ")" the fields count from 3 (state).
    let field = |n: usize| after.split_whitespace().nth(n - 3).and_then(|v| v.parse::<usize>().ok());
    let (Some(args), Some(args_end), Some(env), Some(env_end)) = (field(48), field(49), field(50), field(51)) else { return };
    if args == 0 || args_end < args || env_end < env {
        return;
    }
    std::ptr::write_bytes(env as *mut u8, 0, env_end - env);
    std::ptr::write_bytes(args as *mut u8, 0, args_end - args);
    // The area's last byte stays a NUL: the kernel then reads the words as they are, one
    // per NUL. A short command line (`claude-runner agent`) gets the name alone.
    let room = (args_end - args).saturating_sub(1);
    let full = format!("claude-runner\0{name}\0");
    let label = if full.len() <= room { full } else { format!("{name}\0") };
    std::ptr::copy_nonoverlapping(label.as_ptr(), args as *mut u8, label.len().min(room));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The zygote ends right after its next clone, before it answers (as one a job kills
    /// then). Read in the zygote, a copy of this process's memory taken at its fork; the
    /// test that sets it forks a zygote after it, and the fork clears it here, so that
    /// the zygote forked to replace that one serves.
    static EXIT_AFTER_CLONE: AtomicBool = AtomicBool::new(false);
    /// Every zygote forked while it is set stops itself (SIGSTOP) when asked for a launcher,
    /// as when a job stops each new one.
    static STOP_WHEN_ASKED: AtomicBool = AtomicBool::new(false);
    /// Tests of the one zygote of this process, one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// Called by the agent after each fork of a zygote.
    pub(super) fn forked() {
        EXIT_AFTER_CLONE.store(false, Ordering::SeqCst);
    }

    /// Called by the zygote when asked for a launcher, in the zygote.
    pub(super) fn hook_when_asked() {
        if STOP_WHEN_ASKED.load(Ordering::SeqCst) {
            // SAFETY: a signal to this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
        }
    }

    /// Called by the zygote after each clone, in the zygote.
    pub(super) fn hook_after_clone() {
        if EXIT_AFTER_CLONE.load(Ordering::SeqCst) {
            // SAFETY: ends the zygote, as SIGKILL would.
            unsafe { libc::_exit(0) };
        }
    }

    fn zygote_pid() -> Option<libc::pid_t> {
        ZYGOTE.lock().unwrap().as_ref().map(|z| z.pid)
    }

    /// This thread's children (the zygote is forked by the thread that asks for the first
    /// launcher, and launchers are the zygote's siblings), zombies included.
    fn my_children() -> Vec<libc::pid_t> {
        // SAFETY: gettid reads this thread's id.
        let tid = unsafe { libc::gettid() };
        let listed = std::fs::read_to_string(format!("/proc/self/task/{tid}/children")).expect("/proc lists a thread's children");
        let mut pids: Vec<libc::pid_t> = listed.split_whitespace().map(|p| p.parse().unwrap()).collect();
        pids.sort();
        pids
    }

    /// The zygote dies between its clone of a launcher and its answer (a job killed it).
    /// Before the fix the agent never learnt that launcher's pid: it stayed the agent's
    /// zombie for ever (or ran on, stopped, if a job had stopped it). Now the agent kills
    /// and reaps it with the zygote, and the launcher asked for comes from a new zygote.
    #[test]
    fn a_launcher_whose_zygote_died_before_answering_is_reaped() {
        if !in_own_process("zygote::tests::a_launcher_whose_zygote_died_before_answering_is_reaped") {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stop();
        assert_eq!(my_children(), Vec::<libc::pid_t>::new());
        EXIT_AFTER_CLONE.store(true, Ordering::SeqCst);
        start();
        let (ours, peer, launcher) = launcher().expect("a launcher from the zygote forked again");
        let zygote = zygote_pid().expect("a zygote");
        let mut expected = vec![zygote, launcher];
        expected.sort();
        assert_eq!(my_children(), expected, "only the new zygote and its launcher: no zombie, no stray launcher");
        drop((ours, peer));
        // SAFETY: a wait for a child of this process.
        assert_eq!(unsafe { libc::waitpid(launcher, std::ptr::null_mut(), 0) }, launcher);
        stop();
    }

    /// A job stops every new zygote (SIGSTOP; same user). Before the fix each wait for the
    /// zygote's answer ran out its whole bound (10 s) twice, and a launcher's twice more,
    /// before the job failed (~50 s). Now a stopped zygote is seen as such at once: it is
    /// replaced once, and when the new one is stopped too the start fails saying so, and
    /// what to do; the next start forks a new zygote and gets its launcher.
    #[test]
    fn a_start_whose_zygotes_are_all_stopped_fails_at_once_and_the_next_forks_again() {
        if !in_own_process("zygote::tests::a_start_whose_zygotes_are_all_stopped_fails_at_once_and_the_next_forks_again") {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stop();
        STOP_WHEN_ASKED.store(true, Ordering::SeqCst);
        let refused = launcher();
        STOP_WHEN_ASKED.store(false, Ordering::SeqCst);
        let e = refused.err().expect("no launcher from stopped zygotes").to_string();
        assert!(e.contains("stopped") && e.contains("run the job again"), "{e}");
        assert_eq!(zygote_pid(), None, "the stopped zygote was kept");
        assert_eq!(my_children(), Vec::<libc::pid_t>::new(), "a stopped zygote was left behind");
        let (ours, peer, launcher) = launcher().expect("a launcher from a zygote forked again");
        drop((ours, peer));
        // SAFETY: a wait for a child of this process.
        assert_eq!(unsafe { libc::waitpid(launcher, std::ptr::null_mut(), 0) }, launcher);
        stop();
    }

    /// A job kills the zygote again and again, and each time the agent forks a new one from
    /// itself, running, while another of its threads reads the environment (as the agent
    /// does at every Claude start and every git step). The git workers of such a zygote
    /// called std's `set_var`, whose lock the fork had copied held by that thread: about half
    /// of them waited for ever, and every later fetch, checkout and hand-back with them
    /// (hostile review rev24, H1). A worker takes no lock of std's now, and one that is not
    /// ready within its bound has its zygote replaced.
    #[test]
    fn git_workers_of_a_zygote_forked_again_from_the_running_agent_do_not_hang() {
        if !in_own_process("zygote::tests::git_workers_of_a_zygote_forked_again_from_the_running_agent_do_not_hang") {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::env::set_var("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt");
        let reading = std::sync::Arc::new(AtomicBool::new(true));
        let reader = {
            let reading = std::sync::Arc::clone(&reading);
            std::thread::spawn(move || {
                while reading.load(Ordering::SeqCst) {
                    std::hint::black_box(std::env::var("SSL_CERT_FILE").ok());
                }
            })
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for round in 0..20 {
            if let Some(pid) = zygote_pid() {
                // SAFETY: a signal to this process's zygote, as a job may send it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let work = crate::repo::worker::Work::Usable { dirs: vec![] };
            let checked = runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(30), crate::repo::worker::run(work, (), "check the mirrors", None)).await });
            let (answer, ()) = checked.unwrap_or_else(|_| panic!("round {round}: the git worker hung"));
            assert!(matches!(answer, Ok(crate::repo::worker::Answer::Usable(_))), "round {round}: {answer:?}");
        }
        reading.store(false, Ordering::SeqCst);
        reader.join().unwrap();
        stop();
    }

    /// A git worker that waits for ever after it said it was ready (on a lock its set-up
    /// does not take, copied held into a zygote forked again from the running agent; here a
    /// FIFO where libgit2 opens a mirror's `config`) is killed with its job; when its zygote is
    /// such a one, the next worker comes from a new zygote (before, every later fetch and
    /// checkout waited on the same lock until the agent restarted: hostile review rev26,
    /// M1). A clean zygote, forked at the start, is kept.
    #[test]
    fn a_zygote_forked_again_whose_worker_never_answered_is_replaced_a_clean_one_kept() {
        if !in_own_process("zygote::tests::a_zygote_forked_again_whose_worker_never_answered_is_replaced_a_clean_one_kept") {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let tmp = harness::TempDir::new("stuck-worker");
        let mirror = tmp.path().join("mirror.git");
        std::fs::create_dir_all(mirror.join("objects")).unwrap();
        std::fs::create_dir_all(mirror.join("refs")).unwrap();
        std::fs::write(mirror.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        crate::files::pipe_at(&mirror.join("config"));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stuck = || {
            let work = crate::repo::worker::Work::Usable { dirs: vec![mirror.clone()] };
            let ran = runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(2), crate::repo::worker::run(work, (), "check the mirrors", None)).await });
            assert!(ran.is_err(), "the worker answered: {:?}", ran.map(|(a, ())| a));
            // A replacement would run on the blocking pool: give it a moment.
            runtime.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(500)).await });
        };
        // This process's zygote was forked before the test harness's threads: clean.
        let clean = zygote_pid().expect("the test binary's zygote");
        stuck();
        assert_eq!(zygote_pid(), Some(clean), "a clean zygote was replaced");
        // A job kills it; the next is forked from the running process.
        // SAFETY: a signal to this process's zygote, as a job may send it.
        unsafe { libc::kill(clean, libc::SIGKILL) };
        let (ours, peer, launcher) = launcher().expect("a launcher from a zygote forked again");
        drop((ours, peer));
        // SAFETY: a wait for a child of this process.
        unsafe { libc::waitpid(launcher, std::ptr::null_mut(), 0) };
        let forked_again = zygote_pid().expect("a zygote");
        assert_ne!(forked_again, clean);
        stuck();
        // The replacement runs on the blocking pool: on a loaded machine, later.
        let replaced = (0..100).any(|_| {
            if zygote_pid() != Some(forked_again) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        });
        assert!(replaced, "the zygote whose worker never answered was kept");
        stop();
    }

    /// Set in a process of its own that a test runs in ([`in_own_process`]).
    const OWN_PROCESS: &str = "CLAUDE_RUNNER_TEST_ZYGOTE_OWN_PROCESS";

    /// Whether to run the test `name` here: true in a process of its own (this test binary
    /// again, that test alone), which this starts when not in one, checking it passed. For
    /// the tests that stop, kill or fork again this process's zygote, or change what the
    /// process holds: the other tests' git workers must come from the zygote forked before
    /// the test harness started its threads (`main.rs`), which copied no lock they hold.
    fn in_own_process(name: &str) -> bool {
        if std::env::var_os(OWN_PROCESS).is_some() {
            return true;
        }
        let exe = std::env::current_exe().expect("this test binary");
        // Without the CA settings this machine may have, as most have none: a worker then
        // finds them itself (see `crate::repo::worker`).
        let run = std::process::Command::new(exe)
            .args([name, "--exact", "--test-threads=1"])
            .env(OWN_PROCESS, "1")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .output()
            .expect("the test binary runs");
        let said = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        assert!(run.status.success() && said.contains("1 passed"), "in a process of its own: {said}");
        false
    }

    /// A zygote forked again from a `claude-runner up` that raised its descriptor limit, with
    /// `up` holding more descriptors than the limit it started with: the limit, lowered
    /// back before the agent's descriptors were closed, failed the zygote's open of
    /// /dev/null (EMFILE), and its stdin and stdout stayed the agent's (rev14's finding,
    /// a9f8f9b). Run in a process of its own (the test binary again, this test alone): the
    /// limit and the descriptors are the process's, which the other tests share. The agent's
    /// stdin and stdout are the write end of a pipe here: once the agent lets go of it, its
    /// reader sees its end only if the zygote holds it no more.
    #[test]
    fn a_zygote_forked_after_a_raise_keeps_none_of_the_agents_stdin_and_stdout() {
        if !in_own_process("zygote::tests::a_zygote_forked_after_a_raise_keeps_none_of_the_agents_stdin_and_stdout") {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stop();
        let (_, hard) = runtime::nofile::limits().expect("the descriptor limit");
        const STARTED_WITH: u64 = 64;
        assert!(hard > 4 * STARTED_WITH, "a hard limit of {hard} leaves no room for this test");
        let mut ends = [0; 2];
        // SAFETY: descriptors of this process alone (it runs this test only); 0 and 1 are
        // put back before the harness writes its verdict.
        let (saved_in, saved_out) = unsafe {
            assert_eq!(libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK), 0);
            let saved = (libc::dup(0), libc::dup(1));
            assert!(libc::dup2(ends[1], 0) == 0 && libc::dup2(ends[1], 1) == 1);
            libc::close(ends[1]);
            // Started with a soft limit of 64, as under a shell's `ulimit -Sn 64`, then raised.
            let low = libc::rlimit { rlim_cur: STARTED_WITH as libc::rlim_t, rlim_max: hard as libc::rlim_t };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
            saved
        };
        assert_eq!(runtime::nofile::raise().expect("raised").0, STARTED_WITH);
        // More descriptors open than that limit, none free below it (as `up` serving many
        // connections).
        let mut held = Vec::new();
        loop {
            // SAFETY: a copy of stderr, closed below.
            let fd = unsafe { libc::dup(2) };
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            held.push(fd);
            if fd as u64 > STARTED_WITH {
                break;
            }
        }
        let (ours, peer, launcher) = launcher().expect("a launcher from a zygote forked after the raise");
        let zygote = zygote_pid().expect("a zygote");
        // SAFETY: this process's own descriptors: its stdin and stdout back, the copies gone.
        unsafe {
            assert!(libc::dup2(saved_in, 0) == 0 && libc::dup2(saved_out, 1) == 1);
            libc::close(saved_in);
            libc::close(saved_out);
            for fd in held {
                libc::close(fd);
            }
        }
        drop((ours, peer));
        // SAFETY: a wait for a child of this process.
        assert_eq!(unsafe { libc::waitpid(launcher, std::ptr::null_mut(), 0) }, launcher);
        let limits = std::fs::read_to_string(format!("/proc/{zygote}/limits")).expect("the zygote's limits");
        let soft = limits.lines().find(|l| l.starts_with("Max open files")).and_then(|l| l.split_whitespace().nth(3)).unwrap_or("?").to_string();
        let mut byte = [0u8; 1];
        // SAFETY: a read into a buffer of one byte, of this process's pipe.
        let read = unsafe { libc::read(ends[0], byte.as_mut_ptr().cast(), 1) };
        let error = std::io::Error::last_os_error();
        stop();
        assert_eq!(soft, STARTED_WITH.to_string(), "the zygote's limit is the one the agent started with");
        assert_eq!(read, 0, "the zygote holds the agent's stdin or stdout ({error})");
    }

    /// The launcher the zygote clones is this process's child (the agent waits for it, kills
    /// it, and its parent-death signal is the agent's), serving the socket it was given; a
    /// zygote a job killed is forked again, and the launcher asked for meanwhile still comes.
    #[test]
    fn a_launcher_is_the_agents_child_and_a_killed_zygote_is_replaced() {
        if !in_own_process("zygote::tests::a_launcher_is_the_agents_child_and_a_killed_zygote_is_replaced") {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (ours, peer, first) = launcher().expect("a launcher");
        let zygote = zygote_pid().expect("a zygote");
        // SAFETY: a wait for a child of this process.
        assert_eq!(unsafe { libc::waitpid(first, std::ptr::null_mut(), libc::WNOHANG) }, 0, "not this process's running child");
        // The launcher ends when the agent lets go of its socket.
        drop((ours, peer));
        let mut status = 0;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::waitpid(first, &mut status, 0) }, first);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{status:#x}");
        // SAFETY: a signal to the zygote this process forked (not reaped: its pid is its own).
        unsafe { libc::kill(zygote, libc::SIGKILL) };
        let (ours, peer, second) = launcher().expect("a launcher from a new zygote");
        assert_ne!(zygote_pid(), Some(zygote));
        drop((ours, peer));
        // SAFETY: a wait for a child of this process.
        assert_eq!(unsafe { libc::waitpid(second, std::ptr::null_mut(), 0) }, second);
        // SAFETY: the old zygote was reaped by its replacement's start.
        assert_eq!(unsafe { libc::waitpid(zygote, std::ptr::null_mut(), libc::WNOHANG) }, -1);
    }
}
