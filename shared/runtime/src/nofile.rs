//! The process's descriptor limit (`RLIMIT_NOFILE`): raised at the edge's start, soft to
//! hard, as Go's runtime does by itself. The soft default, 1024 on Debian and under
//! systemd, is what a few hundred connections use up, and the hard limit is what the
//! operator allowed; kept at the soft one, a MAX_CONNECTIONS above it failed with EMFILE
//! under load. Both `claude-runner-edge` and `claude-runner up` raise it here (through
//! the native edge's `Server::bind`). The programs a raised process starts are given the soft limit
//! it started with back ([`restore_in_child`]), as Go's `os/exec` does: some still use
//! `select`, which breaks past 1024 descriptors.

use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit before [`raise`] raised it; 0 while it has not.
static SOFT_AT_START: AtomicU64 = AtomicU64::new(0);

/// The soft and hard limits now in force.
#[allow(clippy::unnecessary_cast)] // `rlim_t` is 32 bits on some targets.
pub fn limits() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, nothing else.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => Ok((limit.rlim_cur as u64, limit.rlim_max as u64)),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The soft limit; 1024, the usual default, if it cannot be read.
pub fn soft() -> u64 {
    limits().map_or(1024, |(soft, _)| soft)
}

/// Raises the soft limit to the hard one: the soft limit before and after (the same when
/// it was the hard one already).
pub fn raise() -> std::io::Result<(u64, u64)> {
    let (before, hard) = limits()?;
    if before < hard {
        let raised = libc::rlimit { rlim_cur: hard as libc::rlim_t, rlim_max: hard as libc::rlim_t };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The first raise's: a second start in the same process (tests) keeps it.
        let _ = SOFT_AT_START.compare_exchange(0, before, Ordering::SeqCst, Ordering::SeqCst);
    }
    Ok((before, soft()))
}

/// In a child between its fork and its `exec`: gives it back the soft limit this process
/// started with, if [`raise`] raised it. Only an atomic load and a system call, so
/// async-signal-safe (a `pre_exec`, a child forked from a multi-threaded process).
pub fn restore_in_child() -> std::io::Result<()> {
    let at_start = SOFT_AT_START.load(Ordering::SeqCst);
    if at_start == 0 {
        return Ok(());
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = (at_start as libc::rlim_t).min(limit.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// The only test of this crate that sets the limit.
    #[test]
    fn raised_for_this_process_and_given_back_to_the_programs_it_starts() {
        // Its children are forked: the lock tests' descriptors must not go with them.
        let _forking = crate::FORKING.lock().unwrap_or_else(|e| e.into_inner());
        let (_, hard) = limits().unwrap();
        if hard <= 64 {
            return; // No room to move it here.
        }
        // Started at 64 below the hard limit, as a shell's `ulimit -Sn` would.
        let low = libc::rlimit { rlim_cur: (hard - 64) as libc::rlim_t, rlim_max: hard as libc::rlim_t };
        // SAFETY: setrlimit reads the struct it is given.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        assert_eq!(raise().unwrap(), (hard - 64, hard));
        assert_eq!(soft(), hard);
        let mut child = std::process::Command::new("sh");
        child.args(["-c", "ulimit -Sn"]);
        // SAFETY: restore_in_child is async-signal-safe.
        unsafe { child.pre_exec(restore_in_child) };
        let shown = String::from_utf8(child.output().unwrap().stdout).unwrap();
        assert_eq!(shown.trim(), (hard - 64).to_string());
        // Without it, the child inherits the raised one.
        let shown = String::from_utf8(std::process::Command::new("sh").args(["-c", "ulimit -Sn"]).output().unwrap().stdout).unwrap();
        assert_eq!(shown.trim(), hard.to_string());
    }
}
