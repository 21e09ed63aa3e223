//! A process held by its pidfd: signalled, and seen to end, as the very process it was
//! when it was opened. A pid names whichever process has it *now*: once the one read
//! (from a status file, from a fork) has ended and been reaped, the next process the
//! system starts may get the same number, and a `kill(pid)` would reach it. A pidfd never
//! moves to another process; a signal through it to a process that has ended fails with
//! `ESRCH` (Linux 5.3 and later; before, [`open`] says so and callers use the pid).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `pid`'s pidfd: `ESRCH` when no process has that pid, `ENOSYS` on a kernel without
/// pidfds. The process is held from here on, whatever it was checked to be after.
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful pidfd_open returns a descriptor that is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `signal` to the held process: `ESRCH` once it has ended (its pid may be
/// another's by now, who is not signalled).
pub fn signal(process: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: a signal through a pidfd we own; no siginfo.
    let sent = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, process.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the held process has ended, waiting up to `within` for it: a pidfd is
/// readable once its process has exited (a zombie not reaped yet has ended too).
pub fn ended(process: &OwnedFd, within: Duration) -> bool {
    let mut poll = libc::pollfd { fd: process.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(within.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one pollfd, valid for the call.
    let ready = unsafe { libc::poll(&mut poll, 1, ms) };
    ready > 0 && poll.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pidfd held on a process that ended and was reaped reaches nobody, not the process
    /// that got its pid next. The pid is handed on here through the kernel's
    /// `ns_last_pid` (root only, as CI runs): elsewhere the reuse cannot be made to
    /// happen (not root, or a container's read-only /proc/sys), and the test says so
    /// rather than pass on nothing.
    #[test]
    fn a_held_process_that_ended_is_never_confused_with_the_next_one_of_its_pid() {
        let mut first = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = first.id();
        let held = open(pid).unwrap();
        assert!(!ended(&held, Duration::ZERO), "a running process has not ended");
        first.kill().unwrap();
        first.wait().unwrap();
        assert!(ended(&held, Duration::from_secs(60)), "an ended process is seen ended");
        // Tests of this binary fork beside this one: try until the next fork is ours.
        let mut second = None;
        for _ in 0..200 {
            if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()) {
                eprintln!("cannot hand a pid on here ({e}): only the held process's end was checked");
                return;
            }
            let next = std::process::Command::new("sleep").arg("60").spawn().unwrap();
            if next.id() == pid {
                second = Some(next);
                break;
            }
            let mut next = next;
            let _ = next.kill();
            let _ = next.wait();
        }
        let Some(mut second) = second else {
            panic!("pid {pid} was not handed on in 200 tries");
        };
        let reached = signal(&held, libc::SIGKILL);
        let still_running = second.try_wait().unwrap().is_none();
        let _ = second.kill();
        let _ = second.wait();
        assert_eq!(reached.map_err(|e| e.raw_os_error()), Err(Some(libc::ESRCH)), "the signal reached nobody");
        assert!(still_running, "the process that got the pid next was not signalled");
    }
}
