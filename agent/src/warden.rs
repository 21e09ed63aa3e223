//! The warden: a small process between the agent and Claude that makes sure Claude's
//! whole tree dies with its job, even when the agent itself is killed with SIGKILL.
//!
//! Why a watchdog process. `PR_SET_PDEATHSIG` reaches only the process it is set on, not
//! the tools Claude starts. A cgroup would hold the whole tree, but creating one needs a
//! delegated cgroup (systemd's `Delegate=`, or root), and `KillMode=control-group` in the
//! systemd unit covers only systemd deployments. A subreaper alone is no help once the
//! subreaper is the one killed. So the agent starts each Claude through a warden — its own
//! binary, run again as `claude-runner __warden` — which:
//!
//! - is a child subreaper, so every descendant of Claude that loses its parent (a
//!   double fork, a `setsid` daemon) becomes the warden's child and stays in reach;
//! - starts Claude in a new process group, with `PR_SET_PDEATHSIG` tied to itself;
//! - holds the read end of a control pipe whose write end only the agent holds.
//!
//! On the pipe a `T` means "stop": SIGTERM to Claude's group and every descendant. Its
//! end — the agent closed it, or the kernel did because the agent died — means "kill":
//! SIGKILL to all of them, then the warden exits. When Claude exits by itself, the warden
//! kills whatever Claude left behind and exits with Claude's status. The warden ignores
//! SIGTERM, SIGINT and SIGHUP: only the agent, through the pipe, or SIGKILL ends it early.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::time::{Duration, Instant};

/// The hidden subcommand that runs the warden.
pub const SUBCOMMAND: &str = "__warden";
/// The byte that asks for a gentle stop.
pub const STOP: u8 = b'T';
/// The warden's exit code when it could not start Claude.
pub const CANNOT_START: i32 = 127;

/// Runs the warden: `__warden --control-fd N -- PROGRAM ARGS...`. Never returns.
pub fn main(args: &[OsString]) -> ! {
    let (fd, program, rest) = match parse(args) {
        Some(parsed) => parsed,
        None => {
            eprintln!("claude-runner {SUBCOMMAND}: usage: {SUBCOMMAND} --control-fd N -- PROGRAM [ARGS...] (started by the agent, not by hand)");
            std::process::exit(2);
        }
    };
    // SAFETY: process attributes and signal dispositions only; no memory is involved.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Claude must not inherit the control pipe.
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let mut cmd = std::process::Command::new(&program);
    cmd.args(&rest).process_group(0);
    // SAFETY: between fork and exec only async-signal-safe calls: signal dispositions
    // back to their defaults (ignored ones would survive exec) and prctl.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_DFL);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let claude = match cmd.spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(e) => {
            eprintln!("could not start `{}`: {e}", program.to_string_lossy());
            std::process::exit(CANNOT_START);
        }
    };
    // The pipes to the agent are Claude's now: the warden's copies would keep them open.
    quiet_stdio();
    let status = watch(fd, claude);
    exit_like(status)
}

fn parse(args: &[OsString]) -> Option<(RawFd, OsString, Vec<OsString>)> {
    let mut it = args.iter();
    if it.next()?.to_str()? != "--control-fd" {
        return None;
    }
    let fd: RawFd = it.next()?.to_str()?.parse().ok()?;
    if it.next()?.to_str()? != "--" {
        return None;
    }
    let program = it.next()?.clone();
    Some((fd, program, it.cloned().collect()))
}

fn quiet_stdio() {
    // SAFETY: plain fd syscalls on the warden's own standard streams.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
}

/// Waits for Claude's exit or the agent's word; returns Claude's wait status (None if it
/// was not seen).
fn watch(control: RawFd, claude: libc::pid_t) -> Option<libc::c_int> {
    // A pidfd wakes the poll the moment Claude exits (the agent waits on the warden's own
    // exit to end the job); without one (kernels before 5.3) the poll's timeout does.
    // SAFETY: pidfd_open on our own child; the fd is ours.
    let exited = unsafe { libc::syscall(libc::SYS_pidfd_open, claude, 0) } as RawFd;
    let mut status = None;
    loop {
        let mut fds = [
            libc::pollfd { fd: control, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: exited, events: libc::POLLIN, revents: 0 },
        ];
        let watched = if exited >= 0 { 2 } else { 1 };
        // Orphans to reap are checked every round, at least every 100 ms.
        // SAFETY: `watched` valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), watched, 100) };
        reap(claude, &mut status);
        if status.is_some() {
            // Claude is done: nothing it started may outlive it.
            kill_all(claude, libc::SIGKILL);
            return status;
        }
        if fds[0].revents != 0 {
            let mut byte = [0u8; 16];
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(control, byte.as_mut_ptr().cast(), byte.len()) };
            if n > 0 && byte[..n as usize].contains(&STOP) {
                kill_all(claude, libc::SIGTERM);
            } else if n == 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted) {
                // The agent closed the pipe, or died.
                kill_all(claude, libc::SIGKILL);
                reap(claude, &mut status);
                return status;
            }
        }
    }
}

/// Reaps every child that ended (orphans of Claude's tree included), noting Claude's status.
fn reap(claude: libc::pid_t, status: &mut Option<libc::c_int>) {
    loop {
        let mut st = 0;
        // SAFETY: waitpid with a local status word.
        let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == claude {
            *status = Some(st);
        }
    }
}

/// The warden's children, from the kernel's list.
fn children() -> Vec<libc::pid_t> {
    let me = std::process::id();
    std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Signals Claude's process group and every descendant. With SIGKILL it goes on until
/// none is left (each one killed hands its own children to the warden), for at most two
/// seconds.
fn kill_all(claude: libc::pid_t, sig: libc::c_int) {
    let until = Instant::now() + Duration::from_secs(2);
    let mut ignored = None;
    loop {
        // SAFETY: kill(2) on Claude's group and on the warden's own children.
        unsafe { libc::kill(-claude, sig) };
        let kids = children();
        for pid in &kids {
            // A child may lead a group of its own (a `setsid` daemon): that goes too.
            unsafe {
                libc::kill(-*pid, sig);
                libc::kill(*pid, sig);
            }
        }
        if sig != libc::SIGKILL || kids.is_empty() || Instant::now() > until {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
        reap(claude, &mut ignored);
    }
}

/// Exits as Claude did: its exit code, or the signal that ended it.
fn exit_like(status: Option<libc::c_int>) -> ! {
    let Some(status) = status.map(std::process::ExitStatus::from_raw) else { std::process::exit(128 + libc::SIGKILL) };
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    let sig = status.signal().unwrap_or(libc::SIGKILL);
    // SAFETY: dies by the same signal, its default action restored first.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::kill(libc::getpid(), sig);
    }
    std::process::exit(128 + sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_command_line() {
        let args: Vec<OsString> = ["--control-fd", "7", "--", "/bin/claude", "-p", "--verbose"].iter().map(OsString::from).collect();
        let (fd, program, rest) = parse(&args).unwrap();
        assert_eq!((fd, program.to_str().unwrap()), (7, "/bin/claude"));
        assert_eq!(rest, vec![OsString::from("-p"), OsString::from("--verbose")]);
        for bad in [&["--control-fd", "x", "--", "p"][..], &["--control-fd", "7", "p"], &["--control-fd", "7", "--"], &[]] {
            let bad: Vec<OsString> = bad.iter().map(OsString::from).collect();
            assert!(parse(&bad).is_none(), "{bad:?}");
        }
    }
}
