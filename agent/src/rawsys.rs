//! System calls made without libc's wrappers, for the code that runs in the launcher's
//! memory but not as the launcher: its wardens (`clone(CLONE_VM)`, see
//! [`crate::launcher`]) and Claude's side of each warden's clone before its `exec`; and
//! the one clone glibc has no wrapper for, the zygote's of each launcher ([`clone_sibling`]).
//!
//! Why not libc. Those processes share the launcher's address space *and* its thread
//! pointer (no `CLONE_SETTLS`: there is no thread of theirs for libc to set one up for), so
//! `errno`, which glibc's wrappers write on every failure (a `waitpid` answering `ECHILD`, a
//! `read` interrupted), is the launcher's own. The launcher reads it while they run (its
//! `EINTR` check on the exec-error pipe): a warden's write there could make it answer, and
//! free the request that Claude's side still reads, before Claude's `exec`. Here a call
//! returns `-errno` in its result and touches no memory but what it is given.
//!
//! x86_64 (built and tested) and aarch64 (the same calls in its convention: compiled for
//! aarch64 with Debian's rustc and `-Zbuild-std=core`, its `clone_on` read back from the
//! object; not run). Another architecture fails to build here, by name, rather
//! than fall back to a fork that would be a second way to start a warden.

use std::os::fd::RawFd;

/// A system call's result: a value (>= 0) or `-errno`.
pub type Ret = isize;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("agent/src/rawsys.rs has system calls for x86_64 and aarch64 only: add this architecture's");

/// System call `n` with six arguments (unused ones 0).
///
/// # Safety
/// As the system call itself: pointers among the arguments must be valid for it.
#[inline(always)]
pub unsafe fn call(n: libc::c_long, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> Ret {
    let ret: Ret;
    #[cfg(target_arch = "x86_64")]
    core::arch::asm!(
        "syscall",
        inlateout("rax") n as isize => ret,
        in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d, in("r8") e, in("r9") f,
        lateout("rcx") _, lateout("r11") _,
        options(nostack),
    );
    #[cfg(target_arch = "aarch64")]
    core::arch::asm!(
        "svc 0",
        in("x8") n as usize,
        inlateout("x0") a => ret,
        in("x1") b, in("x2") c, in("x3") d, in("x4") e, in("x5") f,
        options(nostack),
    );
    ret
}

/// `clone(flags)` whose child starts on `stack_top` in `entry(arg)`, which never returns.
/// The parent gets the child's pid or `-errno`. No thread pointer, no tid pointers: the
/// child shares the caller's (see the module's note). glibc's `clone` does the same but
/// writes `errno` on failure, which a warden may not.
///
/// # Safety
/// `stack_top` is the 16-byte aligned top of a stack only the child uses; `entry` may use
/// only what `arg` points to and this module's calls; with `CLONE_VM`, what `arg` points
/// to lives as long as the child reads it.
#[inline(never)]
pub unsafe fn clone_on(flags: libc::c_int, stack_top: *mut u8, entry: unsafe extern "C" fn(*mut libc::c_void) -> !, arg: *mut libc::c_void) -> Ret {
    let ret: Ret;
    // The child comes back from the system call on `stack_top` with the parent's registers
    // (the result aside): it calls `entry` at once, from registers the call keeps.
    #[cfg(target_arch = "x86_64")]
    core::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        "xor ebp, ebp",
        "mov rdi, r12",
        "call r13",
        "ud2",
        "2:",
        inlateout("rax") libc::SYS_clone as isize => ret,
        in("rdi") flags as usize, in("rsi") stack_top, in("rdx") 0usize, in("r10") 0usize, in("r8") 0usize,
        in("r12") arg, in("r13") entry,
        lateout("rcx") _, lateout("r11") _,
        options(nostack),
    );
    #[cfg(target_arch = "aarch64")]
    core::arch::asm!(
        "svc 0",
        "cbnz x0, 2f",
        "mov x0, x20",
        "blr x21",
        "brk #1",
        "2:",
        in("x8") libc::SYS_clone as usize,
        inlateout("x0") flags as usize => ret,
        in("x1") stack_top, in("x2") 0usize, in("x3") 0usize, in("x4") 0usize,
        in("x20") arg, in("x21") entry,
        options(nostack),
    );
    ret
}

/// A fork whose child is the caller's *sibling*: `clone(CLONE_PARENT)`, no new stack
/// (the child goes on from this call on a copy of the caller's, as after `fork`), answering
/// 0 in the child and the child's pid (or `-errno`) in the caller. The zygote starts each
/// launcher with it ([`crate::zygote`]): the launcher is then the agent's child, as one the
/// agent started itself. Its exit signal is the caller's own (SIGCHLD, the zygote's).
///
/// Not glibc's `fork`: that has no `CLONE_PARENT`. The child's thread block keeps the
/// caller's thread id (glibc's `fork` would update it), which only locks that record their
/// owner by thread id use, and glibc's `raise` asks the kernel instead: the zygote is one
/// thread, holds no lock while it calls this, and the launcher takes none of those.
///
/// The kernel also writes the child's pid at `pid_at` (`CLONE_PARENT_SETTID`) before the
/// call returns, even if the caller is killed meanwhile: the zygote points it at memory it
/// shares with the agent, so the agent learns of every launcher it has, answered or not.
///
/// # Safety
/// As `fork`: in a process of one thread, or the child may use only what is safe after it.
/// `pid_at` is writable for 4 bytes.
pub unsafe fn clone_sibling(pid_at: *mut libc::pid_t) -> Ret {
    // x86_64 and aarch64 order clone's later arguments differently, but both take the
    // parent's tid pointer third.
    call(libc::SYS_clone, (libc::CLONE_PARENT | libc::CLONE_PARENT_SETTID) as usize, 0, pid_at as usize, 0, 0, 0)
}

pub unsafe fn read(fd: RawFd, buf: *mut u8, len: usize) -> Ret {
    call(libc::SYS_read, fd as usize, buf as usize, len, 0, 0, 0)
}

pub unsafe fn write(fd: RawFd, buf: *const u8, len: usize) -> Ret {
    call(libc::SYS_write, fd as usize, buf as usize, len, 0, 0, 0)
}

/// `open` read-write or read-only (`flags`), relative to the working folder.
pub unsafe fn open(path: *const libc::c_char, flags: libc::c_int) -> Ret {
    call(libc::SYS_openat, libc::AT_FDCWD as usize, path as usize, flags as usize, 0, 0, 0)
}

/// `getdents64`: the entries of the folder open at `fd`, as the kernel's `linux_dirent64`
/// records, into `buf`; 0 at the end.
pub unsafe fn getdents64(fd: RawFd, buf: *mut u8, len: usize) -> Ret {
    call(libc::SYS_getdents64, fd as usize, buf as usize, len, 0, 0, 0)
}

pub unsafe fn close(fd: RawFd) -> Ret {
    call(libc::SYS_close, fd as usize, 0, 0, 0, 0, 0)
}

/// `dup2`, which aarch64 lacks: `dup3`, and for `fd == to` (which `dup3` refuses) the
/// close-on-exec flag cleared, as `dup2` would leave a copy that survives `exec`.
pub unsafe fn dup2(fd: RawFd, to: RawFd) -> Ret {
    if fd == to {
        return call(libc::SYS_fcntl, fd as usize, libc::F_SETFD as usize, 0, 0, 0, 0);
    }
    call(libc::SYS_dup3, fd as usize, to as usize, 0, 0, 0, 0)
}

/// Closes every descriptor from `from` to `to`, both included.
pub unsafe fn close_range(from: libc::c_uint, to: libc::c_uint) -> Ret {
    call(libc::SYS_close_range, from as usize, to as usize, 0, 0, 0, 0)
}

/// `poll` (as `ppoll`, which both architectures have) for at most `ms` milliseconds.
pub unsafe fn poll(fds: *mut libc::pollfd, n: usize, ms: i64) -> Ret {
    let timeout = libc::timespec { tv_sec: (ms / 1000) as libc::time_t, tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long };
    call(libc::SYS_ppoll, fds as usize, n, &timeout as *const libc::timespec as usize, 0, 0, 0)
}

/// `waitpid(pid, status, flags)`.
pub unsafe fn waitpid(pid: libc::pid_t, status: *mut libc::c_int, flags: libc::c_int) -> Ret {
    call(libc::SYS_wait4, pid as usize, status as usize, flags as usize, 0, 0, 0)
}

pub unsafe fn kill(pid: libc::pid_t, sig: libc::c_int) -> Ret {
    call(libc::SYS_kill, pid as isize as usize, sig as usize, 0, 0, 0, 0)
}

pub unsafe fn getpid() -> libc::pid_t {
    call(libc::SYS_getpid, 0, 0, 0, 0, 0, 0) as libc::pid_t
}

pub unsafe fn getppid() -> libc::pid_t {
    call(libc::SYS_getppid, 0, 0, 0, 0, 0, 0) as libc::pid_t
}

pub unsafe fn setpgid(pid: libc::pid_t, group: libc::pid_t) -> Ret {
    call(libc::SYS_setpgid, pid as usize, group as usize, 0, 0, 0, 0)
}

pub unsafe fn prctl(option: libc::c_int, arg: usize) -> Ret {
    call(libc::SYS_prctl, option as usize, arg, 0, 0, 0, 0)
}

pub unsafe fn chdir(path: *const libc::c_char) -> Ret {
    call(libc::SYS_chdir, path as usize, 0, 0, 0, 0, 0)
}

pub unsafe fn execve(program: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> Ret {
    call(libc::SYS_execve, program as usize, argv as usize, envp as usize, 0, 0, 0)
}

pub unsafe fn pidfd_open(pid: libc::pid_t) -> Ret {
    call(libc::SYS_pidfd_open, pid as usize, 0, 0, 0, 0, 0)
}

pub unsafe fn nanosleep(ms: i64) -> Ret {
    let pause = libc::timespec { tv_sec: (ms / 1000) as libc::time_t, tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long };
    call(libc::SYS_nanosleep, &pause as *const libc::timespec as usize, 0, 0, 0, 0, 0)
}

/// Sets `sig`'s action to `handler` (`SIG_DFL` or `SIG_IGN`), no flags, an empty mask: the
/// kernel's call, not glibc's `signal`, which refuses glibc's own 32 and 33. The kernel's
/// struct begins with the handler on every layout; 4 words hold the largest.
pub unsafe fn set_action(sig: libc::c_int, handler: libc::sighandler_t) -> Ret {
    let action = [handler as u64, 0, 0, 0];
    call(libc::SYS_rt_sigaction, sig as usize, action.as_ptr() as usize, 0, 8, 0, 0)
}

/// Sets the signal mask to `mask` (the kernel's 64-bit set); the old one into `old` if
/// not null.
pub unsafe fn set_mask(mask: *const u64, old: *mut u64) -> Ret {
    call(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK as usize, mask as usize, old as usize, 8, 0, 0)
}

/// Ends the process (all of it: `exit_group`).
pub unsafe fn exit(code: libc::c_int) -> ! {
    call(libc::SYS_exit_group, code as usize, 0, 0, 0, 0, 0);
    // exit_group does not come back; should it, the process must still not run on.
    loop {
        call(libc::SYS_exit, code as usize, 0, 0, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed call answers `-errno` and leaves `errno` as it was: the launcher's reads of
    /// its own `errno` cannot see a warden's failures.
    #[test]
    fn a_failing_call_answers_its_errno_and_leaves_errno_alone() {
        // SAFETY: errno is this thread's; the calls are given valid (or harmlessly invalid) arguments.
        unsafe {
            *libc::__errno_location() = 4242;
            assert_eq!(close(-1), -(libc::EBADF as isize));
            assert_eq!(read(-1, std::ptr::null_mut(), 0), -(libc::EBADF as isize));
            assert_eq!(*libc::__errno_location(), 4242);
            assert_eq!(getpid(), libc::getpid());
            assert_eq!(getppid(), libc::getppid());
        }
    }

    /// A child cloned with `CLONE_VM` onto a stack of its own runs in this memory (it writes
    /// what the parent then reads) and is waited for like any child.
    #[test]
    fn a_clone_on_its_own_stack_shares_memory_and_exits_with_its_code() {
        unsafe extern "C" fn entry(arg: *mut libc::c_void) -> ! {
            let seen = &*(arg as *const std::sync::atomic::AtomicU32);
            seen.store(7, std::sync::atomic::Ordering::SeqCst);
            exit(3)
        }
        let seen = std::sync::atomic::AtomicU32::new(0);
        let mut stack = vec![0u128; 4096];
        // SAFETY: the stack and `seen` outlive the child, which is reaped before they go.
        unsafe {
            let top = stack.as_mut_ptr().add(stack.len()).cast::<u8>();
            let pid = clone_on(libc::CLONE_VM | libc::SIGCHLD, top, entry, &seen as *const _ as *mut libc::c_void);
            assert!(pid > 0, "{pid}");
            let mut status = 0;
            assert_eq!(libc::waitpid(pid as libc::pid_t, &mut status, 0), pid as libc::pid_t);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3, "{status:#x}");
        }
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 7);
        drop(stack);
    }
}
