//! The warden: a small process between the agent and Claude that makes sure Claude's
//! whole tree dies with its job, even when the agent itself is killed with SIGKILL.
//!
//! Why a watchdog process. `PR_SET_PDEATHSIG` reaches only the process it is set on, not
//! the tools Claude starts. A cgroup would hold the whole tree, but creating one needs a
//! delegated cgroup (systemd's `Delegate=`, or root), and `KillMode=control-group` in the
//! systemd unit covers only systemd deployments. A subreaper alone is no help once the
//! subreaper is the one killed. So the process the agent spawns for a job is a warden,
//! which:
//!
//! - is a child subreaper, so every descendant of Claude that loses its parent (a
//!   double fork, a `setsid` daemon) becomes the warden's child and stays in reach;
//! - starts Claude (a vfork-style clone) in a new process group, with `PR_SET_PDEATHSIG`
//!   tied to itself;
//! - holds the read end of a control pipe whose write end only the agent holds.
//!
//! On the pipe a `T` means "stop": SIGTERM to Claude's group and every descendant. Its
//! end — the agent closed it, or the kernel did because the agent died — means "kill":
//! SIGKILL to all of them, then the warden exits. When Claude exits by itself, the warden
//! kills whatever Claude left behind and exits with Claude's status. The warden ignores
//! SIGTERM, SIGINT and SIGHUP: only the agent, through the pipe, or SIGKILL ends it early.
//!
//! The warden is not a program of its own: the launcher ([`crate::launcher`]) clones it,
//! and it starts Claude. Claude's exit status goes to the agent on a status pipe (four
//! bytes, the wait status, then the pipe's end when the warden exits): the warden is the
//! launcher's child, not the agent's, so the agent cannot wait for it.
//!
//! The warden runs in the launcher's memory (`clone(CLONE_VM)`, on a stack the launcher
//! keeps for it: no page tables copied, no copy-on-write faults, no address space torn down
//! at its exit), and with the launcher's thread pointer, so its `errno` too. Hence the rules
//! for all the code below, which the launcher runs alongside it: system calls through
//! [`crate::rawsys`] only (they leave `errno` alone), no allocation (the launcher's heap
//! is not the warden's to use), nothing that can panic (a panic would unwind through the
//! launcher's runtime state), and nothing of the launcher's read once Claude is started
//! (the launcher frees the request then).

use crate::rawsys as sys;
use std::os::fd::RawFd;

/// The byte that asks for a gentle stop.
pub const STOP: u8 = b'T';

/// The warden's life once Claude is started (`claude`, its pid, or -1 if that failed):
/// watches `control`, reports Claude's wait status on `status`. Never returns.
///
/// # Safety
/// Only in the warden, which this takes over; nothing it reads belongs to the launcher.
pub unsafe fn run(control: RawFd, status: RawFd, claude: libc::pid_t) -> ! {
    // The launcher ignores these three already; said again so that no change there can
    // let a Ctrl-C meant for the agent's terminal end a job's warden.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        sys::set_action(sig, libc::SIG_IGN);
    }
    // The job's pipes are Claude's: the warden's copies would keep them open. So would any
    // other descriptor it inherited (the launcher's socket, the exec-error pipe: the
    // launcher waits for its end, and only then frees the request Claude was started from).
    let null = sys::open(c"/dev/null".as_ptr(), libc::O_RDWR) as RawFd;
    for fd in 0..3 {
        sys::dup2(null, fd);
    }
    close_all_but(control, status);
    let exited = if claude > 0 { watch(control, claude) } else { None };
    // The agent reads four bytes (or nothing, when Claude's status is unknown).
    if let Some(code) = exited {
        let bytes = code.to_le_bytes();
        sys::write(status, bytes.as_ptr(), bytes.len());
    }
    exit_like(exited)
}

/// Closes every descriptor from 3 up except `a` and `b` (raw calls: Claude's side of the
/// clone uses it too).
pub(crate) unsafe fn close_all_but(a: RawFd, b: RawFd) {
    let (low, high) = (a.min(b), a.max(b));
    let mut from = 3;
    for keep in [low, high] {
        if keep >= from {
            if keep > from {
                sys::close_range(from as libc::c_uint, (keep - 1) as libc::c_uint);
            }
            from = keep + 1;
        }
    }
    sys::close_range(from as libc::c_uint, libc::c_uint::MAX);
}

/// Waits for Claude's exit or the agent's word; returns Claude's wait status (None if it
/// was not seen).
unsafe fn watch(control: RawFd, claude: libc::pid_t) -> Option<libc::c_int> {
    // A pidfd wakes the poll the moment Claude exits (the agent waits on the warden's own
    // exit to end the job); without one (kernels before 5.3) the poll's timeout does.
    let exited = sys::pidfd_open(claude) as RawFd;
    let mut status = None;
    loop {
        let mut fds = [
            libc::pollfd { fd: control, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: exited, events: libc::POLLIN, revents: 0 },
        ];
        let watched = if exited >= 0 { 2 } else { 1 };
        // Orphans to reap are checked every round, at least every 100 ms.
        sys::poll(fds.as_mut_ptr(), watched, 100);
        reap(claude, &mut status);
        if status.is_some() {
            // Claude is done: nothing it started may outlive it.
            kill_all(claude, libc::SIGKILL);
            return status;
        }
        if fds[0].revents != 0 {
            let mut bytes = [0u8; 16];
            let n = sys::read(control, bytes.as_mut_ptr(), bytes.len());
            if n > 0 && bytes.get(..n as usize).is_some_and(|read| read.contains(&STOP)) {
                kill_all(claude, libc::SIGTERM);
            } else if n == 0 || (n < 0 && n != -(libc::EINTR as isize)) {
                // The agent closed the pipe, or died.
                kill_all(claude, libc::SIGKILL);
                reap(claude, &mut status);
                return status;
            }
        }
    }
}

/// Reaps every child that ended (orphans of Claude's tree included), noting Claude's status.
unsafe fn reap(claude: libc::pid_t, status: &mut Option<libc::c_int>) {
    loop {
        let mut st = 0;
        let pid = sys::waitpid(-1, &mut st, libc::WNOHANG);
        if pid <= 0 {
            return;
        }
        if pid == claude as isize {
            *status = Some(st);
        }
    }
}

/// Signals Claude's process group and every process of its tree (and the group each may
/// lead: a `setsid` daemon). With SIGKILL it goes on until none is left, for at most two
/// seconds: a process killed while it forked hands its new child to the warden, which the
/// next round finds.
unsafe fn kill_all(claude: libc::pid_t, sig: libc::c_int) {
    let mut ignored = None;
    for _ in 0..200 {
        let any = signal_tree(claude, sig);
        if sig != libc::SIGKILL || !any {
            return;
        }
        sys::nanosleep(10);
        reap(claude, &mut ignored);
    }
}

/// The processes one walk of the tree holds at most (4 KiB of the warden's stack). A bigger
/// tree takes more rounds: the children of those killed are handed to the warden, whose
/// own children are walked first.
const WALK: usize = 1024;

/// Signals Claude's group and every descendant of the warden, each with the group it may
/// lead; returns whether the warden has any child. The whole tree in one round, each
/// process's children read before it is signalled: signalling only the warden's children
/// reached one level of a chain per round (the next came into reach once its parent died
/// and it was handed to the warden), and a chain deeper than the rounds, each level in a
/// session of its own, outlived its job (hostile review rev11).
unsafe fn signal_tree(claude: libc::pid_t, sig: libc::c_int) -> bool {
    sys::kill(-claude, sig);
    let mut walk = [0 as libc::pid_t; WALK];
    let mut len = 0;
    each_child(sys::getpid(), &mut |pid| note(&mut walk, &mut len, pid));
    let any = len > 0;
    let mut next = 0;
    while next < len {
        let pid = walk.get(next).copied().unwrap_or(0);
        next += 1;
        // Never 0 or less: `kill(0)` would be the warden's own group.
        if pid <= 0 {
            continue;
        }
        each_child(pid, &mut |child| note(&mut walk, &mut len, child));
        sys::kill(-pid, sig);
        sys::kill(pid, sig);
    }
    any
}

/// Adds `pid` to the walk, if it has room left.
fn note(walk: &mut [libc::pid_t; WALK], len: &mut usize, pid: libc::pid_t) {
    if let Some(slot) = walk.get_mut(*len) {
        *slot = pid;
        *len += 1;
    }
}

/// A `/proc` path built without allocation.
struct ProcPath {
    bytes: [u8; 64],
    len: usize,
}

impl ProcPath {
    fn new() -> ProcPath {
        ProcPath { bytes: [0; 64], len: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> &mut ProcPath {
        for &b in bytes {
            // The last byte stays NUL: a path cut short names nothing rather than another file.
            if let Some(slot) = self.bytes.get_mut(self.len).filter(|_| self.len + 1 < 64) {
                *slot = b;
                self.len += 1;
            }
        }
        self
    }

    fn number(&mut self, n: u64) -> &mut ProcPath {
        let mut digits = [0u8; 20];
        let count = write_number(&mut digits, n);
        self.put(digits.get(..count).unwrap_or_default())
    }

    fn c_str(&self) -> *const libc::c_char {
        self.bytes.as_ptr().cast()
    }
}

/// Calls `f` with each child of `pid`: the kernel lists a process's children by the thread
/// that made them (`/proc/<pid>/task/<tid>/children`), so every thread's list is read — a
/// tool forking from a thread other than its first is not missed. Read into fixed buffers
/// (no allocation).
unsafe fn each_child(pid: libc::pid_t, f: &mut impl FnMut(libc::pid_t)) {
    let mut tasks = ProcPath::new();
    tasks.put(b"/proc/").number(pid as u64).put(b"/task");
    let dir = sys::open(tasks.c_str(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
    if dir < 0 {
        return;
    }
    let mut entries = [0u8; 1024];
    loop {
        let n = sys::getdents64(dir as RawFd, entries.as_mut_ptr(), entries.len());
        if n <= 0 {
            break;
        }
        let mut at = 0usize;
        while let Some(record) = entries.get(at..n as usize) {
            // linux_dirent64: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name (NUL-ended).
            let Some(&[lo, hi]) = record.get(16..18) else { break };
            let reclen = u16::from_ne_bytes([lo, hi]) as usize;
            if reclen == 0 {
                break;
            }
            let name = record.get(19..reclen.min(record.len())).unwrap_or_default();
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            if !name.is_empty() && name.iter().all(u8::is_ascii_digit) {
                let mut children = ProcPath::new();
                children.put(b"/proc/").number(pid as u64).put(b"/task/").put(name).put(b"/children");
                each_listed(&children, f);
            }
            at += reclen;
        }
    }
    sys::close(dir as RawFd);
}

/// Calls `f` with each pid in the space-separated list at `path`, however long.
unsafe fn each_listed(path: &ProcPath, f: &mut impl FnMut(libc::pid_t)) {
    let fd = sys::open(path.c_str(), libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut pid: libc::pid_t = 0;
    loop {
        let n = sys::read(fd as RawFd, buf.as_mut_ptr(), buf.len());
        if n <= 0 {
            break;
        }
        for &b in buf.get(..n as usize).unwrap_or_default() {
            if b.is_ascii_digit() {
                pid = pid.wrapping_mul(10).wrapping_add((b - b'0') as libc::pid_t);
            } else if pid > 0 {
                f(pid);
                pid = 0;
            }
        }
    }
    sys::close(fd as RawFd);
    if pid > 0 {
        f(pid);
    }
}

/// Writes `n` in decimal into `out` (20 bytes hold any u64); returns the digits written.
fn write_number(out: &mut [u8; 20], mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    for slot in digits.iter_mut() {
        *slot = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (to, from) in out.iter_mut().zip(digits.iter().take(len).rev()) {
        *to = *from;
    }
    len
}

/// Exits as Claude did: its exit code, or the signal that ended it.
unsafe fn exit_like(status: Option<libc::c_int>) -> ! {
    let Some(status) = status else { sys::exit(128 + libc::SIGKILL) };
    if libc::WIFEXITED(status) {
        sys::exit(libc::WEXITSTATUS(status));
    }
    let sig = if libc::WIFSIGNALED(status) { libc::WTERMSIG(status) } else { libc::SIGKILL };
    // Unblocked too: the warden runs with the launcher's mask (SIGCHLD blocked).
    sys::set_action(sig, libc::SIG_DFL);
    let none = 0u64;
    sys::set_mask(&none, std::ptr::null_mut());
    sys::kill(sys::getpid(), sig);
    sys::exit(128 + sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_numbers_without_allocating() {
        let mut out = [0u8; 20];
        let n = write_number(&mut out, 40213);
        assert_eq!(&out[..n], b"40213");
        assert_eq!(write_number(&mut out, 0), 1);
        assert_eq!(out[0], b'0');
        assert_eq!(write_number(&mut out, u64::MAX), 20);
        assert_eq!(&out[..], b"18446744073709551615");
    }
}
