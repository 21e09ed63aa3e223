//! The launcher: one small process, started with the agent's first job, that starts every
//! Claude. The agent hands it what to run (program, arguments, folder, environment) and
//! the pipes to run it with; the launcher forks a [`crate::warden`], which forks Claude.
//!
//! Why a process of its own. Starting Claude straight from the agent meant forking the
//! agent: a multi-threaded process of 15-20 MiB whose page tables are copied and
//! write-protected at every fork, with a TLB flush on both cores each time, and whose
//! pages are then copied again as the agent writes to them while the child lives. `perf`
//! put that at a quarter of the agent's CPU per job. The launcher is single-threaded and
//! small, so its forks are cheap, and its children are free to allocate before `exec`.
//! It is the agent's own binary (`claude-runner __launcher`, started once with
//! `posix_spawn`, again if it ever dies), so nothing new is installed.
//!
//! The conversation, over a Unix socket on the launcher's stdin:
//! - request: a 4-byte length with the job's five pipe ends attached (`SCM_RIGHTS`:
//!   Claude's stdin, stdout and stderr, the warden's control pipe and its status pipe),
//!   then the body: NUL-separated fields `program, folder, argc, args…, NAME=value…`;
//! - answer: `errno` (0 when Claude's `exec` succeeded) and the warden's pid, with a pidfd
//!   of the warden attached when the kernel has them (the agent's last resort to kill it).
//!
//! Claude's exit reaches the agent on the status pipe (see [`crate::warden`]), not through
//! the launcher: the launcher holds no job state, and a launcher that dies loses nothing
//! running. The agent sees it gone at its next request and starts a new one.

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

/// The hidden sub-command that makes the agent's binary a launcher.
pub const COMMAND: &str = "__launcher";
/// The pipe ends sent with each request, in this order.
const FDS: usize = 5;
/// A request body larger than this is refused (`E2BIG`): Linux refuses an `exec` whose
/// arguments and environment pass a few MiB anyway.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What Claude is started with: program, folder, arguments, the whole environment.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub cwd: &'a Path,
    pub args: &'a [String],
    pub env: &'a [(OsString, OsString)],
}

/// Claude's pipe ends that the launcher passes on (the agent keeps the other ends).
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
}

struct Running {
    socket: UnixStream,
    process: std::process::Child,
}

impl Launcher {
    pub const fn new() -> Launcher {
        Launcher { running: Mutex::new(None) }
    }

    /// Starts the launcher now, if it does not run (the agent does so at start, so that a
    /// launcher that cannot start is said at once, and memory figures include it).
    pub fn start(&self) -> std::io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if running.is_none() {
            *running = Some(Running::start()?);
        }
        Ok(())
    }

    /// Starts Claude through the launcher (started, or started again, as needed). Blocks
    /// for a fork, a fork and an `exec`: call it off the async threads.
    pub fn spawn(&self, spawn: &Spawn, ends: ChildEnds) -> std::io::Result<Started> {
        let body = encode(spawn);
        if body.len() > MAX_BODY {
            return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
        }
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A launcher that died (killed, out of memory) is replaced once, then the error stands.
        let mut retried = false;
        loop {
            if running.is_none() {
                *running = Some(Running::start()?);
            }
            let launcher = running.as_mut().expect("just started");
            match exchange(&mut launcher.socket, &body, &ends) {
                Ok(answer) => return answer,
                Err(e) => {
                    if let Some(mut gone) = running.take() {
                        let _ = gone.process.kill();
                        let _ = gone.process.wait();
                    }
                    if retried {
                        return Err(std::io::Error::new(e.kind(), format!("the agent's launcher failed twice in a row ({e}); restart the agent")));
                    }
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
    fn start() -> std::io::Result<Running> {
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = UnixStream::pair()?;
        // No pre_exec: std starts it with posix_spawn (vfork), which copies nothing.
        let process = std::process::Command::new("/proc/self/exe")
            .arg(COMMAND)
            .env_clear()
            .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("could not start the agent's launcher (/proc/self/exe {COMMAND}): {e}")))?;
        Ok(Running { socket: ours, process })
    }
}

/// One request and its answer. An `Err` is the conversation failing (the launcher is
/// gone); an `Ok(Err)` is the launcher's answer that Claude could not be started.
fn exchange(socket: &mut UnixStream, body: &[u8], ends: &ChildEnds) -> std::io::Result<std::io::Result<Started>> {
    let fds = [&ends.stdin, &ends.stdout, &ends.stderr, &ends.control, &ends.status].map(|fd| fd.as_raw_fd());
    send_with_fds(socket.as_raw_fd(), &(body.len() as u32).to_le_bytes(), &fds)?;
    socket.write_all(body)?;
    let mut answer = [0u8; 8];
    let (n, mut received) = recv_with_fds(socket.as_raw_fd(), &mut answer, 1)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    socket.read_exact(&mut answer[n..])?;
    let errno = i32::from_le_bytes(answer[..4].try_into().expect("4 bytes"));
    let pid = u32::from_le_bytes(answer[4..].try_into().expect("4 bytes"));
    if errno != 0 {
        return Ok(Err(std::io::Error::from_raw_os_error(errno)));
    }
    Ok(Ok(Started { pid, pidfd: received.pop() }))
}

/// `program \0 cwd \0 argc \0 args… \0 NAME=value…`, each field NUL-terminated (none can
/// hold a NUL: `exec` takes C strings).
fn encode(spawn: &Spawn) -> Vec<u8> {
    let mut body = Vec::new();
    let mut field = |bytes: &[u8]| {
        body.extend_from_slice(bytes);
        body.push(0);
    };
    field(spawn.program.as_os_str().as_bytes());
    field(spawn.cwd.as_os_str().as_bytes());
    field(spawn.args.len().to_string().as_bytes());
    for arg in spawn.args {
        field(arg.as_bytes());
    }
    for (name, value) in spawn.env {
        let mut pair = name.clone();
        pair.push("=");
        pair.push(value);
        field(pair.as_bytes());
    }
    body
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

/// The launcher's life (`claude-runner __launcher`): answers requests on stdin until the
/// agent closes it. Never returns.
pub fn serve() -> ! {
    // SAFETY: process-wide settings of this single-threaded process, set before anything runs.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::umask(0o077);
        // Only the agent ends it (by closing the socket): a Ctrl-C in the agent's
        // terminal, or a SIGTERM for a drain, must leave running jobs alone.
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    // Wardens report to the agent, not here, but they are reaped here (promptly, so their
    // CPU time is counted as this process's children's, and no zombie waits): SIGCHLD is
    // read from a signalfd beside the socket.
    let children = child_signals();
    // The socket leaves fd 0 (Claude's stdin goes there in the child) for a close-on-exec fd.
    // SAFETY: fd 0 is the socket the agent gave us; F_DUPFD_CLOEXEC returns a new fd we own.
    let socket = unsafe {
        let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            std::process::exit(2);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        libc::dup2(null, 0);
        libc::close(null);
        UnixStream::from(OwnedFd::from_raw_fd(fd))
    };
    let mut socket = socket;
    loop {
        reap(children);
        if !wait_readable(socket.as_raw_fd(), children) {
            continue;
        }
        let mut header = [0u8; 4];
        let (n, fds) = match recv_with_fds(socket.as_raw_fd(), &mut header, FDS) {
            Ok((0, _)) | Err(_) => std::process::exit(0),
            Ok(got) => got,
        };
        if socket.read_exact(&mut header[n..]).is_err() {
            std::process::exit(0);
        }
        let len = u32::from_le_bytes(header) as usize;
        if len > MAX_BODY {
            std::process::exit(3);
        }
        let mut body = vec![0u8; len];
        if socket.read_exact(&mut body).is_err() {
            std::process::exit(0);
        }
        let answer = match (decode(&body), <[OwnedFd; FDS]>::try_from(fds)) {
            (Some(request), Ok(ends)) => launch(&request, ends),
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
            std::process::exit(0);
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

/// Reaps every child that ended, and empties the signalfd.
fn reap(children: RawFd) {
    // SAFETY: waitpid without a status pointer; reads into a buffer we own.
    unsafe {
        while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
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

/// Forks the warden, which forks Claude; waits for Claude's `exec`. Returns the warden's
/// pid and a pidfd of it, or the `errno` that kept Claude from starting.
fn launch(request: &Request, [stdin, stdout, stderr, control, status]: [OwnedFd; FDS]) -> Result<(libc::pid_t, Option<OwnedFd>), i32> {
    let mut exec_error = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(exec_error.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(errno());
    }
    // SAFETY: both were just created.
    let (error_read, error_write) = unsafe { (OwnedFd::from_raw_fd(exec_error[0]), OwnedFd::from_raw_fd(exec_error[1])) };
    let argv: Vec<*const libc::c_char> = request.argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> = request.envp.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
    // SAFETY: this process is single-threaded, so the child may do anything; it only
    // makes system calls on memory prepared above and never returns.
    let warden = unsafe { libc::fork() };
    if warden < 0 {
        return Err(errno());
    }
    if warden == 0 {
        // SAFETY: the child's whole life; see crate::warden::run.
        unsafe {
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            libc::setpgid(0, 0);
            // A subreaper before Claude exists, so none of its descendants can slip past.
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
            let claude = libc::fork();
            if claude < 0 {
                let code = errno().to_le_bytes();
                libc::write(error_write.as_raw_fd(), code.as_ptr().cast(), 4);
                libc::_exit(127);
            }
            if claude == 0 {
                start_claude(request, &argv, &envp, [&stdin, &stdout, &stderr], error_write.as_raw_fd());
            }
            crate::warden::run(control.as_raw_fd(), status.as_raw_fd(), claude)
        }
    }
    // The launcher keeps none of the job's pipe ends: Claude and the warden hold them.
    drop((stdin, stdout, stderr, control, status, error_write));
    let mut code = [0u8; 4];
    let mut read = 0;
    loop {
        // SAFETY: reads into a 4-byte buffer we own.
        let n = unsafe { libc::read(error_read.as_raw_fd(), code[read..].as_mut_ptr().cast(), 4 - read) };
        if n > 0 {
            read += n as usize;
            if read == 4 {
                break;
            }
        } else if n == 0 || errno() != libc::EINTR {
            break;
        }
    }
    if read == 4 {
        // Claude's exec failed; its warden reports the exit to a status pipe nobody reads.
        return Err(i32::from_le_bytes(code));
    }
    // SAFETY: pidfd_open on our own child, which is not reaped before we answer (a zombie
    // still has its pid).
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, warden, 0) };
    // SAFETY: a successful pidfd_open returns an fd we own.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
    Ok((warden, pidfd))
}

/// Claude's side of the warden's fork: its own process group, killed with the warden,
/// signals as a fresh process has them, the job's pipes on 0-2, then `exec`. Writes the
/// `errno` to `error` and exits 127 if any step fails.
///
/// # Safety
/// Only in the child of the warden's fork.
unsafe fn start_claude(request: &Request, argv: &[*const libc::c_char], envp: &[*const libc::c_char], pipes: [&OwnedFd; 3], error: RawFd) -> ! {
    libc::setpgid(0, 0);
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
    // The launcher ignores some signals (and Rust ignores SIGPIPE): ignored signals stay
    // ignored across exec, so each goes back to its default.
    for sig in 1..libc::SIGRTMAX() {
        libc::signal(sig, libc::SIG_DFL);
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    let fail = |error: RawFd| -> ! {
        let code = errno().to_le_bytes();
        libc::write(error, code.as_ptr().cast(), 4);
        libc::_exit(127)
    };
    for (target, fd) in pipes.iter().enumerate() {
        if libc::dup2(fd.as_raw_fd(), target as RawFd) < 0 {
            fail(error);
        }
    }
    if libc::chdir(request.cwd.as_ptr()) != 0 {
        fail(error);
    }
    libc::execve(request.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(error)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Sends `bytes` with `fds` attached.
fn send_with_fds(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
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
fn recv_with_fds(socket: RawFd, buf: &mut [u8], max_fds: usize) -> std::io::Result<(usize, Vec<OwnedFd>)> {
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

/// Whether this process was started as the launcher.
pub fn is_launcher(first_arg: Option<&OsStr>) -> bool {
    first_arg == Some(OsStr::new(COMMAND))
}

/// `OsString`s of the environment, as the request wants them (used by tests).
#[cfg(test)]
fn env_of(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_body_reads_back_as_it_was_written() {
        let args = vec!["-p".to_string(), "".to_string(), "--output-format".to_string()];
        let env = env_of(&[("HOME", "/h"), ("EMPTY", ""), ("EQ", "a=b")]);
        let body = encode(&Spawn { program: Path::new("/usr/bin/claude"), cwd: Path::new("/w/job 1"), args: &args, env: &env });
        let r = decode(&body).expect("decodes");
        assert_eq!(r.program.as_bytes(), b"/usr/bin/claude");
        assert_eq!(r.cwd.as_bytes(), b"/w/job 1");
        let argv: Vec<&[u8]> = r.argv.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(argv, [&b"/usr/bin/claude"[..], b"-p", b"", b"--output-format"]);
        let envp: Vec<&[u8]> = r.envp.iter().map(|a| a.as_bytes()).collect();
        assert_eq!(envp, [&b"HOME=/h"[..], b"EMPTY=", b"EQ=a=b"]);
    }

    #[test]
    fn a_broken_request_body_is_refused_not_trusted() {
        for body in [&b""[..], b"prog", b"prog\0cwd\0", b"prog\0cwd\0x\0", b"prog\0cwd\x002\0one\0", b"prog\0cwd\018446744073709551616\0"] {
            assert!(decode(body).is_none(), "{body:?}");
        }
        assert!(decode(b"prog\0cwd\00\0").is_some());
    }
}
