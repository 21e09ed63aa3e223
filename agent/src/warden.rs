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

/// Signals Claude's process group and each of the warden's children (and the group it may
/// lead: a `setsid` daemon). With SIGKILL it goes on until none is left — each one killed
/// hands its own children to the warden — for at most two seconds.
unsafe fn kill_all(claude: libc::pid_t, sig: libc::c_int) {
    let mut ignored = None;
    for _ in 0..200 {
        sys::kill(-claude, sig);
        let mut any = false;
        each_child(|pid| {
            any = true;
            sys::kill(-pid, sig);
            sys::kill(pid, sig);
        });
        if sig != libc::SIGKILL || !any {
            return;
        }
        sys::nanosleep(10);
        reap(claude, &mut ignored);
    }
}

/// Calls `f` with each of the warden's children, read from the kernel's list into a
/// fixed buffer (no allocation).
unsafe fn each_child(mut f: impl FnMut(libc::pid_t)) {
    // "/proc/self/task/<pid>/children": the warden has one thread, whose id is its pid.
    let mut path = [0u8; 64];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if let Some(slot) = path.get_mut(at) {
                *slot = b;
                at += 1;
            }
        }
    };
    put(b"/proc/self/task/");
    let mut digits = [0u8; 20];
    let n = write_number(&mut digits, sys::getpid() as u64);
    put(digits.get(..n).unwrap_or_default());
    put(b"/children\0");
    let fd = sys::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; 4096];
    let n = sys::read(fd as RawFd, buf.as_mut_ptr(), buf.len());
    sys::close(fd as RawFd);
    let mut pid: libc::pid_t = 0;
    for &b in buf.get(..n.max(0) as usize).unwrap_or_default() {
        if b.is_ascii_digit() {
            pid = pid.wrapping_mul(10).wrapping_add((b - b'0') as libc::pid_t);
        } else if pid > 0 {
            f(pid);
            pid = 0;
        }
    }
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
