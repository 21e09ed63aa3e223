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
//! The warden is not a program of its own: the launcher ([`crate::launcher`]) forks it,
//! and it starts Claude. Claude's exit status goes to the agent on a status pipe (four
//! bytes, the wait status, then the pipe's end when the warden exits): the warden is the
//! launcher's child, not the agent's, so the agent cannot wait for it. The code below
//! keeps to async-signal-safe calls (raw system calls, no allocation), as a fork's child
//! should; the launcher being single-threaded makes that a habit rather than a must.

use std::os::fd::RawFd;

/// The byte that asks for a gentle stop.
pub const STOP: u8 = b'T';

/// The warden's life once Claude is forked (`claude`, its pid, or -1 if that fork
/// failed): watches `control`, reports Claude's wait status on `status`. Never returns.
///
/// # Safety
/// Only in the launcher's child, which this takes over.
pub unsafe fn run(control: RawFd, status: RawFd, claude: libc::pid_t) -> ! {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        libc::signal(sig, libc::SIG_IGN);
    }
    // Every descendant of Claude that loses its parent (a double fork, a `setsid` daemon)
    // becomes the warden's child and stays in reach.
    libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    // The job's pipes are Claude's: the warden's copies would keep them open. So would any
    // other descriptor it inherited (the launcher's socket, the exec-error pipe).
    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
    for fd in 0..3 {
        libc::dup2(null, fd);
    }
    close_all_but(control, status);
    let exited = if claude > 0 { watch(control, claude) } else { None };
    // The agent reads four bytes (or nothing, when Claude's status is unknown).
    if let Some(code) = exited {
        let bytes = code.to_le_bytes();
        libc::write(status, bytes.as_ptr().cast(), bytes.len());
    }
    exit_like(exited)
}

/// Closes every descriptor from 3 up except `a` and `b`.
pub(crate) unsafe fn close_all_but(a: RawFd, b: RawFd) {
    let (low, high) = (a.min(b), a.max(b));
    let mut from = 3;
    for keep in [low, high] {
        if keep >= from {
            if keep > from {
                libc::syscall(libc::SYS_close_range, from as libc::c_uint, (keep - 1) as libc::c_uint, 0);
            }
            from = keep + 1;
        }
    }
    libc::syscall(libc::SYS_close_range, from as libc::c_uint, libc::c_uint::MAX, 0);
}

/// Waits for Claude's exit or the agent's word; returns Claude's wait status (None if it
/// was not seen).
unsafe fn watch(control: RawFd, claude: libc::pid_t) -> Option<libc::c_int> {
    // A pidfd wakes the poll the moment Claude exits (the agent waits on the warden's own
    // exit to end the job); without one (kernels before 5.3) the poll's timeout does.
    let exited = libc::syscall(libc::SYS_pidfd_open, claude, 0) as RawFd;
    let mut status = None;
    loop {
        let mut fds = [
            libc::pollfd { fd: control, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: exited, events: libc::POLLIN, revents: 0 },
        ];
        let watched = if exited >= 0 { 2 } else { 1 };
        // Orphans to reap are checked every round, at least every 100 ms.
        libc::poll(fds.as_mut_ptr(), watched, 100);
        reap(claude, &mut status);
        if status.is_some() {
            // Claude is done: nothing it started may outlive it.
            kill_all(claude, libc::SIGKILL);
            return status;
        }
        if fds[0].revents != 0 {
            let mut bytes = [0u8; 16];
            let n = libc::read(control, bytes.as_mut_ptr().cast(), bytes.len());
            if n > 0 && bytes[..n as usize].contains(&STOP) {
                kill_all(claude, libc::SIGTERM);
            } else if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
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
        let pid = libc::waitpid(-1, &mut st, libc::WNOHANG);
        if pid <= 0 {
            return;
        }
        if pid == claude {
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
        libc::kill(-claude, sig);
        let mut any = false;
        each_child(|pid| {
            any = true;
            libc::kill(-pid, sig);
            libc::kill(pid, sig);
        });
        if sig != libc::SIGKILL || !any {
            return;
        }
        let pause = libc::timespec { tv_sec: 0, tv_nsec: 10_000_000 };
        libc::nanosleep(&pause, std::ptr::null_mut());
        reap(claude, &mut ignored);
    }
}

/// Calls `f` with each of the warden's children, read from the kernel's list into a
/// fixed buffer (no allocation).
unsafe fn each_child(mut f: impl FnMut(libc::pid_t)) {
    // "/proc/self/task/<pid>/children": the warden has one thread, whose id is its pid.
    let mut path = [0u8; 64];
    let prefix = b"/proc/self/task/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut at = prefix.len() + write_number(&mut path[prefix.len()..], libc::getpid() as u64);
    for b in b"/children\0" {
        path[at] = *b;
        at += 1;
    }
    let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; 4096];
    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
    libc::close(fd);
    let mut pid: libc::pid_t = 0;
    for &b in &buf[..n.max(0) as usize] {
        if b.is_ascii_digit() {
            pid = pid * 10 + (b - b'0') as libc::pid_t;
        } else if pid > 0 {
            f(pid);
            pid = 0;
        }
    }
    if pid > 0 {
        f(pid);
    }
}

/// Writes `n` in decimal into `out`; returns the digits written.
fn write_number(out: &mut [u8], mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[i] = digits[len - 1 - i];
    }
    len
}

/// Exits as Claude did: its exit code, or the signal that ended it.
unsafe fn exit_like(status: Option<libc::c_int>) -> ! {
    let Some(status) = status else { libc::_exit(128 + libc::SIGKILL) };
    if libc::WIFEXITED(status) {
        libc::_exit(libc::WEXITSTATUS(status));
    }
    let sig = if libc::WIFSIGNALED(status) { libc::WTERMSIG(status) } else { libc::SIGKILL };
    libc::signal(sig, libc::SIG_DFL);
    libc::kill(libc::getpid(), sig);
    libc::_exit(128 + sig)
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
    }
}
