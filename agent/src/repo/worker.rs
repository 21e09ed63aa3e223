//! The git worker: every libgit2 operation of a job — the fetch into a mirror, the checkout,
//! the hand-back (diff, commit, push) — the repack of a mirror, and the check of the
//! mirrors at the agent's start —
//! runs in a process of its own, which the agent kills when the job no longer waits for it.
//!
//! Why a process. libgit2 cannot be stopped mid-call, and a thread cannot be killed. A job
//! runs as the agent's user and can put a FIFO where libgit2 opens a file (a mirror's
//! `packed-refs`, another job's `.git/HEAD`) between the agent's check and the open; a git
//! server can send a byte every 29 s, within libgit2's read timeout. Either held a thread of
//! the agent's for ever, and with it the repository's fetch lock (every later job of the
//! repository waited) or a slot of the blocking pool (about 512 of them, and the agent
//! stalled). A process is killed: its job's time up, the worker goes, and with it whatever
//! it held; the lock is let go once it is reaped, never while it may still write.
//!
//! Why the zygote ([`crate::zygote`]) clones it, as it clones launchers, rather than the
//! agent forking itself or `exec`ing its binary. It holds a token (a fetch's, a push's):
//! a process is dumpable from its `exec` until it says otherwise, and a job that opened its
//! `/proc/<pid>/mem` then could read the token later; a clone of the zygote is never
//! dumpable. A fork of the agent would copy locks other threads hold (libgit2's, the
//! allocator's, the log's) into a process that then waits on them for ever; the zygote was
//! forked when the agent had one thread. Nothing the agent's own threads use is used here:
//! the agent runs no libgit2 at all, and the worker logs through a logger of its own that
//! writes to its stderr with `write(2)` ([`RawStderr`]).
//!
//! The conversation, on a Unix socket: the agent sends one [`Request`] (a 4-byte length,
//! then JSON); the worker sets itself up, says so with one byte ([`READY`]: one that does
//! not within [`READY_WITHIN`] is ended and the work goes to a new worker, none of it
//! begun; its zygote is replaced if it was forked again from the running agent), does the
//! work, answers one [`Answer`] (a byte [`ANSWER`], then as the request came), and exits; a
//! hand-back says [`PUSHING`] first when its push is about to go out, and [`STAGED`] once
//! it has staged the job's changes, then waits for the agent's redactor again ([`SAME`],
//! or [`MASKS`] and a new one: a login that appeared meanwhile). A byte
//! [`STOP`] from the agent asks the hand-back to stop at its next step (a push not yet
//! begun never begins); the socket's end (the agent gone, or done with it) ends the worker.
//! The agent then kills it anyway and reaps it: a worker is the agent's child (the zygote
//! clones it with `CLONE_PARENT`) and dies with it (`PR_SET_PDEATHSIG`).

use super::changes::{Patch, PushTarget};
use super::checkout::FileSystem;
use super::error::{local, RepoError};
use super::mirror::{Fetched, Source};
use crate::redact::Redactor;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The word after the program's name in a worker's command line (`ps`).
pub const COMMAND: &str = "__git";
/// The byte that asks the worker's work to stop at its next step.
const STOP: u8 = b'S';
/// The largest message either side takes: a fetch's refs (a repository with a million tags
/// is ~100 MB of them as JSON), a diff (`MAX_DIFF_BYTES`).
const MAX_MESSAGE: usize = 1 << 30;

/// The most memory (address space, `RLIMIT_AS`) a git worker may take. A repository can
/// be a bomb — a 382-byte delta pack that expands to 1.5 GiB in the fetch, a file libgit2
/// holds whole — and without a limit the machine's OOM killer ended it, or chose another
/// process (the agent, a job's Claude). With it an allocation fails and the worker ends,
/// its job's `REPO_ERROR` saying so. 4 GiB: a checkout's largest file (1 GiB, held whole)
/// and libgit2's pack windows (at most 1 GiB mapped, [`super::mirror::set_timeouts`]) with
/// room to spare.
pub const MAX_WORKER_MEMORY: u64 = 4 << 30;

/// The agent's settings a worker takes from it: the zygote's copy of the environment is
/// blank. TLS trust as OpenSSL reads it, and the log filter.
const PASSED_ON: [&str; 4] = ["SSL_CERT_FILE", "SSL_CERT_DIR", "OPENSSL_CONF", "RUST_LOG"];

impl Work {
    /// The largest answer the agent reads for this work. A hand-back's holds a diff cut at
    /// its cap (each byte at most 6 in JSON: a control character's `\u0001`) and a file
    /// list cut at [`super::changes::MAX_FILES_CHANGED_BYTES`], and it was read up to
    /// [`MAX_MESSAGE`] (1 GiB) into the agent's memory; a fetch's refs may be that many.
    fn answer_limit(&self) -> usize {
        match self {
            Work::HandBack(w) => 6 * w.diff_max_bytes.unwrap_or(0) + super::changes::MAX_FILES_CHANGED_BYTES + (1 << 20),
            _ => MAX_MESSAGE,
        }
    }
}

/// What the agent asks of a worker.
#[derive(Serialize, Deserialize)]
struct Request<W = Work> {
    work: W,
    /// [`PASSED_ON`], as the agent has them (bytes: a path need not be UTF-8).
    env: Vec<(String, Vec<u8>)>,
    /// Log as the agent does (`None`: the agent does not log).
    log: Option<runtime::LogFormat>,
}

/// One operation.
#[derive(Serialize, Deserialize)]
pub enum Work {
    /// Brings the mirror at `dir` up to date from `source` ([`super::mirror::fetch_into`]),
    /// starting from the refs the agent's last fetch found (`known`); `alone`: no other
    /// job holds or waits for the mirror.
    Fetch { dir: PathBuf, source: Source, known: Option<Fetched>, alone: bool },
    /// Which of these mirrors have a commit to start from (the agent's start).
    Usable { dirs: Vec<PathBuf> },
    /// Packs the objects of the mirror at `dir`'s packs into one pack written into `into`,
    /// when it holds `at` or more ([`super::mirror::combine_packs`]); the agent puts it in place.
    Repack { dir: PathBuf, into: PathBuf, at: usize },
    /// A job's checkout ([`super::checkout::create`]), and where Claude starts in it.
    Checkout(CheckoutWork),
    /// A job's diff and push ([`super::hand_back`]).
    HandBack(HandBackWork),
}

#[derive(Serialize, Deserialize)]
pub struct CheckoutWork {
    pub mirror: PathBuf,
    pub fetched: Fetched,
    pub dir: PathBuf,
    pub branch: Option<String>,
    pub url: String,
    pub max_bytes: u64,
    pub working_dir: Option<String>,
    /// The room claims ahead of the job keep, which its checkout must leave
    /// (`super::claim::leave`).
    pub claimed: Option<super::claim::Claimed>,
}

#[derive(Serialize, Deserialize)]
pub struct HandBackWork {
    pub dir: PathBuf,
    /// The commit Claude started from.
    pub base: String,
    /// What libgit2 found the checkout's file system can hold, as it made the checkout.
    pub fs: FileSystem,
    /// The diff's cap, when the job asked for one (`include_diff`).
    pub diff_max_bytes: Option<usize>,
    pub push: Option<PushWork>,
    /// Masks the diff, and finds a secret in what would be pushed. Shared with the agent's
    /// own, not copied: sent as its secrets.
    #[serde(with = "shared_redactor")]
    pub redactor: Arc<Redactor>,
}

#[derive(Serialize, Deserialize)]
pub struct PushWork {
    pub target: PushTarget,
    pub author_name: String,
    pub author_email: String,
    pub message: String,
}

/// What a fetch found, and what the agent needs to know of the mirror when it failed.
#[derive(Debug, Serialize, Deserialize)]
pub struct FetchAnswer {
    pub result: Result<Fetched, RepoError>,
    /// After a failed fetch, whether the mirror still has a commit to start from
    /// (`allow_stale`); a fetch that succeeded left one.
    pub usable: bool,
    /// The packs the mirror holds after a fetch that succeeded (each fetch that brings
    /// something adds one): past [`super::layout::REPACK_AT_PACKS`] it is repacked.
    #[serde(default)]
    pub packs: usize,
}

/// A pack made of a mirror's packs ([`super::mirror::combine_packs`]), not yet in place.
#[derive(Debug, Serialize, Deserialize)]
pub struct Repacked {
    /// Its files' name, without `.pack` or `.idx` (`pack-<hex>`).
    pub name: String,
    /// The packs whose objects it holds (their names), which go once it is in place.
    pub combined: Vec<String>,
    /// How many objects it holds.
    pub objects: usize,
}

/// What a checkout made: the commit Claude starts from, the folder it starts in, and what
/// its file system can hold.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckedOut {
    pub commit: String,
    pub cwd: PathBuf,
    pub fs: FileSystem,
}

/// The job's changes, handed back.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub patch: Option<Patch>,
    pub pushed_commit: Option<String>,
    pub pushed_branch: Option<String>,
    /// Why the push failed once the diff was made: the diff still comes back.
    pub error: Option<RepoError>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Fetched(FetchAnswer),
    Usable(Vec<bool>),
    /// None: fewer packs than asked for, nothing made.
    Repacked(Result<Option<Repacked>, RepoError>),
    CheckedOut(Result<CheckedOut, RepoError>),
    HandedBack(Result<Outcome, RepoError>),
}

impl Answer {
    /// The error for an answer to another work than `action`'s.
    pub fn unexpected(&self, action: &'static str) -> RepoError {
        let kind = match self {
            Answer::Fetched(_) => "a fetch's answer",
            Answer::Usable(_) => "a check of mirrors",
            Answer::Repacked(_) => "a repack's answer",
            Answer::CheckedOut(_) => "a checkout's answer",
            Answer::HandedBack(_) => "a hand-back's answer",
        };
        local(action, format!("the git worker answered with {kind}"))
    }
}

/// When to ask a worker to stop — at `at`, or once `cancel` resolves (the job cancelled, the
/// agent stopping), whichever comes first — and how long to wait after that before it is
/// killed; and what to answer for a worker that goes without an answer ([`Gone`]).
pub struct Stop<'a> {
    /// On the boot clock, as the job's deadline it comes from ([`crate::boot_clock`]).
    pub at: crate::boot_clock::BootInstant,
    pub cancel: Option<Cancel<'a>>,
    pub then_within: std::time::Duration,
    pub gone: Box<dyn Fn(Gone) -> RepoError + Send + Sync>,
    /// For a hand-back, once its changes are staged: a redactor to use instead of the one
    /// sent with the work, when a login appeared since that one was built (`None`: keep it).
    pub masks_again: Option<MasksAgain<'a>>,
}

/// A redactor newer than the one sent with a hand-back's work, if one is needed: asked
/// once the changes are staged ([`STAGED`]). Sent as its secrets, never copied.
pub type MasksAgain<'a> = Box<dyn Fn() -> Option<Arc<Redactor>> + Send + Sync + 'a>;

/// A hand-back's [`Redactor`] as the agent shares it ([`HandBackWork::redactor`]).
mod shared_redactor {
    use super::{Arc, Redactor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(redactor: &Arc<Redactor>, serializer: S) -> Result<S::Ok, S::Error> {
        redactor.as_ref().serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<Redactor>, D::Error> {
        Redactor::deserialize(deserializer).map(Arc::new)
    }
}

/// Resolves when the job no longer wants its work done: a cancel, or the agent stopping.
pub type Cancel<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// How a worker went without an answer, and whether it had said a push was going out
/// ([`PUSHING`]; or it cannot be known): before that nothing was pushed, after it a push
/// may have reached the server.
pub enum Gone {
    /// Asked to stop, it did not answer within [`Stop::then_within`], and was killed.
    GivenUp { pushing: bool },
    /// It died (a job killed it, out of memory) or its socket failed: `error` says so.
    Died { pushing: bool, error: RepoError },
}

/// How long a new worker has to say it is ready (its set-up: the environment, the log,
/// libgit2): milliseconds, unless it waits on a lock copied held into a zygote forked again
/// from the running agent (a job killed the first). Then the zygote is replaced, and the
/// work goes to a worker of the new one: nothing of it was begun.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);
/// The byte a worker sends once set up, before it begins the work.
const READY: u8 = b'R';
/// The byte a worker sends at the last moment its push could stop (after it, the push may
/// reach the server).
const PUSHING: u8 = b'P';
/// The byte before the worker's answer (its length, then JSON).
const ANSWER: u8 = b'A';
/// The byte a hand-back's worker sends once it has staged the job's changes; it then waits
/// for [`SAME`] or [`MASKS`] before it makes the diff or checks the push.
const STAGED: u8 = b'T';
/// The agent's answer to [`STAGED`]: the redactor sent with the work still masks every login.
const SAME: u8 = b'=';
/// The agent's answer to [`STAGED`] when a login appeared since: a new redactor follows (its
/// length, then JSON).
const MASKS: u8 = b'M';
/// Answers larger than this are read off the agent's runtime thread.
const READ_ASIDE: usize = 256 * 1024;

/// Runs `work` in a new worker and waits for its answer. `held` is let go only once every
/// worker that was sent the work is dead and reaped, however this ends: answered, failed, or
/// this future dropped (the job gave up: the worker is killed). `action` names the work in
/// errors.
pub async fn run<H: Send>(work: Work, held: H, action: &'static str, stop: Option<Stop<'_>>) -> (Result<Answer, RepoError>, H) {
    let mut held = held;
    let mut tries = 0;
    let mut worker = loop {
        tries += 1;
        let mut worker = match Worker::start(held, action).await {
            Ok(worker) => worker,
            Err((e, held)) => return (Err(e), held),
        };
        match worker.hand(&work).await {
            Ok(()) => break worker,
            Err(Unready::Lost(e)) => return (Err(e), worker.end()),
            Err(Unready::Late) => {
                let origin = worker.origin;
                held = worker.end();
                tracing::warn!(action, zygote = origin.zygote, clean = origin.clean, "a git worker was not ready in time; it is ended and the work goes to another");
                // Its drop asked for that too; waited for here, so the retry's worker comes
                // from the new zygote (the second ask finds it gone: one zygote goes).
                replace_zygote(origin).await;
                if tries == 2 {
                    let e = local(action, format!("the agent's git process (`claude-runner {COMMAND}`) was not ready within {READY_WITHIN:?}, twice: run the job again. If it fails again, the machine is overloaded, or {}", crate::launcher::HELPERS_STOPPED));
                    return (Err(e), held);
                }
            }
        }
    };
    worker.max_answer = work.answer_limit();
    drop(work);
    let mut stop = stop;
    let masks_again = stop.as_mut().and_then(|stop| stop.masks_again.take());
    let answer = async {
        let Some(mut stop) = stop else { return worker.answer(masks_again.as_deref()).await };
        let cancel = stop.cancel.take();
        let socket = worker.stream.as_raw_fd();
        let pid = worker.process.as_ref().map(|p| p.0);
        let pushing = Arc::clone(&worker.pushing);
        let (replying, stop_after_reply) = (Arc::clone(&worker.replying), Arc::clone(&worker.stop_after_reply));
        let died = |error| (stop.gone)(Gone::Died { pushing: pushing.load(Ordering::SeqCst), error });
        // One read of the answer throughout: one dropped mid-way would lose what it read.
        let answer = worker.answer(masks_again.as_deref());
        tokio::pin!(answer);
        let cancelled = async {
            match cancel {
                Some(cancel) => cancel.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            answer = &mut answer => return answer.map_err(died),
            _ = crate::boot_clock::sleep_until(stop.at) => {}
            // A cancel stops a push not yet begun as the deadline does; one under way is
            // waited for, so the answer says whether it landed.
            () = cancelled => {}
        }
        // `answer` is polled on this task only, never while this runs: it is between two
        // writes, or mid-way through a reply to STAGED, and then writes the STOP once the
        // reply is whole.
        if replying.load(Ordering::SeqCst) {
            stop_after_reply.store(true, Ordering::SeqCst);
        } else {
            // SAFETY: one byte written to the worker's socket, open as long as `worker`; the
            // socket's buffer is empty of ours (the request was read whole before any
            // answer, a reply to STAGED is written whole before this: see `Worker::answer`).
            unsafe { libc::write(socket, [STOP].as_ptr().cast(), 1) };
        }
        if let Ok(answer) = tokio::time::timeout(stop.then_within, &mut answer).await {
            return answer.map_err(died);
        }
        // Given up: killed first, then what it wrote before it died is read to its end, so
        // a PUSHING sent a moment before is not missed (nothing it did after the kill can
        // be). The pid stays its until `worker.end()` reaps it.
        if let Some(pid) = pid {
            // SAFETY: a signal to our child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        match tokio::time::timeout(DRAINED_WITHIN, &mut answer).await {
            Ok(Ok(answer)) => Ok(answer),
            // Read to its end: whether it had said its push began is known.
            Ok(Err(_)) => Err((stop.gone)(Gone::GivenUp { pushing: pushing.load(Ordering::SeqCst) })),
            // Not read to its end (the agent's runtime stalled that long): not known, so it may have.
            Err(_) => Err((stop.gone)(Gone::GivenUp { pushing: true })),
        }
    }
    .await;
    (answer, worker.end())
}

/// How long what a killed worker wrote takes to read: its socket's buffer, at once.
pub(crate) const DRAINED_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// [`crate::zygote::replace`], off the runtime thread (it waits for the zygote's lock, which
/// a start holds for up to seconds, and reaps the zygote).
async fn replace_zygote(origin: crate::zygote::Origin) {
    let _ = tokio::task::spawn_blocking(move || crate::zygote::replace(origin)).await;
}

/// Why a worker did not take its work.
enum Unready {
    /// It died, or the socket failed.
    Lost(RepoError),
    /// It did not say it was ready within [`READY_WITHIN`].
    Late,
}

/// The agent's side of one worker: killed and reaped when dropped, and only then lets go
/// of what it holds.
struct Worker<H> {
    stream: tokio::net::UnixStream,
    process: Option<Process>,
    held: Option<H>,
    action: &'static str,
    origin: crate::zygote::Origin,
    /// It answered (whatever the answer said).
    answered: bool,
    /// It said a push was going out ([`PUSHING`]).
    pushing: Arc<AtomicBool>,
    /// The largest answer read from it ([`Work::answer_limit`]).
    max_answer: usize,
    /// A reply to [`STAGED`] is being written ([`Worker::answer`]): a [`STOP`] waits for its
    /// end ([`Worker::stop_after_reply`]).
    replying: Arc<AtomicBool>,
    /// A [`STOP`] asked for while a reply was being written, which `answer` writes after it.
    stop_after_reply: Arc<AtomicBool>,
}

/// A worker process, the agent's child: killed and reaped when dropped (so its pid is no
/// other process's until then).
struct Process(libc::pid_t);

impl Drop for Process {
    fn drop(&mut self) {
        // Once killed it ends within milliseconds (it holds no lock anyone waits on).
        crate::zygote::kill_and_reap(self.0);
    }
}

impl<H> Worker<H> {
    async fn start(held: H, action: &'static str) -> Result<Worker<H>, (RepoError, H)> {
        // From the thread that starts launchers: a zygote forked again is that thread's
        // child, and dies when its parent thread ends (see `crate::launcher`). Should this
        // future be dropped meanwhile, the worker is killed and reaped with the task's output.
        let cloned = tokio::task::spawn_blocking(|| crate::launcher::on_starter_thread(crate::zygote::git_worker).and_then(|r| r).map(|(s, pid, origin)| (s, Process(pid), origin))).await;
        let (stream, process, origin) = match cloned {
            Ok(Ok(cloned)) => cloned,
            Ok(Err(e)) => return Err((local(action, format!("the agent could not start its git process ({e})")), held)),
            Err(e) => return Err((local(action, e), held)),
        };
        let stream = stream.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(stream));
        match stream {
            Ok(stream) => Ok(Worker { stream, process: Some(process), held: Some(held), action, origin, answered: false, pushing: Arc::default(), max_answer: MAX_MESSAGE, replying: Arc::default(), stop_after_reply: Arc::default() }),
            Err(e) => Err((local(action, e), held)),
        }
    }

    fn lost(&self, e: impl std::fmt::Display) -> RepoError {
        local(
            self.action,
            format!(
                "the agent's git process (`claude-runner {COMMAND}`) failed before it answered ({e}): run the job again. If it fails again, the repository may need more than the {} GiB of memory a git process may take (a file or pack that expands to gigabytes), or {}",
                MAX_WORKER_MEMORY >> 30,
                crate::launcher::HELPERS_STOPPED
            ),
        )
    }

    /// Sends the work, and waits for the worker to say it is set up (it then begins).
    async fn hand(&mut self, work: &Work) -> Result<(), Unready> {
        use std::os::unix::ffi::OsStrExt;
        let env = PASSED_ON.iter().filter_map(|name| Some((name.to_string(), std::env::var_os(name)?.as_bytes().to_vec()))).collect();
        let body = serde_json::to_vec(&Request { work, env, log: runtime::logging_format() }).map_err(|e| Unready::Lost(local(self.action, e)))?;
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        self.stream.write_all(&framed).await.map_err(|e| Unready::Lost(self.lost(e)))?;
        let mut ready = [0u8; 1];
        match tokio::time::timeout(READY_WITHIN, self.stream.read_exact(&mut ready)).await {
            Ok(Ok(_)) if ready[0] == READY => Ok(()),
            Ok(Ok(_)) => Err(Unready::Lost(self.lost("it said something else than ready"))),
            Ok(Err(e)) => Err(Unready::Lost(self.lost(e))),
            Err(_) => Err(Unready::Late),
        }
    }

    /// Reads the worker's answer; answers its [`STAGED`] with `masks_again`'s redactor, if
    /// it gives one.
    async fn answer(&mut self, masks_again: Option<&(dyn Fn() -> Option<Arc<Redactor>> + Send + Sync)>) -> Result<Answer, RepoError> {
        loop {
            let mut said = [0u8; 1];
            self.stream.read_exact(&mut said).await.map_err(|e| self.lost(e))?;
            match said[0] {
                ANSWER => break,
                PUSHING => self.pushing.store(true, Ordering::SeqCst),
                STAGED => {
                    let reply = match masks_again.and_then(|again| again()) {
                        None => vec![SAME],
                        Some(redactor) => {
                            let body = serde_json::to_vec(&*redactor).map_err(|e| self.lost(e))?;
                            drop(redactor);
                            let mut framed = vec![MASKS];
                            framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
                            framed.extend_from_slice(&body);
                            framed
                        }
                    };
                    // A STOP asked for while it is written (`run`, which writes to the
                    // socket itself) waits until it is whole: landed inside it (a reply of
                    // many tokens outgrows the socket's buffer), it broke the reply, and the
                    // hand-back failed saying the agent did not answer (review rev45a-5b).
                    self.replying.store(true, Ordering::SeqCst);
                    let wrote = self.stream.write_all(&reply).await;
                    self.replying.store(false, Ordering::SeqCst);
                    wrote.map_err(|e| self.lost(e))?;
                    if self.stop_after_reply.swap(false, Ordering::SeqCst) {
                        self.stream.write_all(&[STOP]).await.map_err(|e| self.lost(e))?;
                    }
                }
                other => return Err(self.lost(format!("it said {other:#04x}, neither an answer nor a push's start"))),
            }
        }
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await.map_err(|e| self.lost(e))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max_answer {
            return Err(self.lost(format!("an answer of {len} bytes, over the {} it may take", self.max_answer)));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).await.map_err(|e| self.lost(e))?;
        let read = |body: Vec<u8>| serde_json::from_slice::<Answer>(&body).map_err(|e| e.to_string());
        // A fetch's refs may be a million: not on the thread every job's frames go through.
        let answer = if len > READ_ASIDE { tokio::task::spawn_blocking(move || read(body)).await.map_err(|e| e.to_string()).and_then(|r| r) } else { read(body) };
        let answer = answer.map_err(|e| self.lost(format!("an answer that does not read: {e}")))?;
        self.answered = true;
        Ok(answer)
    }

    /// Kills and reaps the worker (done already, or not), then gives back what it held.
    fn end(mut self) -> H {
        let held = self.held.take().expect("held until the end");
        drop(self);
        held
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        // The process first (`Process`'s drop kills and reaps it): only then is what it
        // held, the repository's fetch lock among it, let go.
        drop(self.process.take());
        drop(self.held.take());
        // One that never answered (killed with its job, or lost) may have waited on a lock
        // its zygote copied held, if that zygote was forked again from the running agent
        // (a lock its set-up does not take, so READY did not show it): the next worker comes
        // from a new zygote. Off this thread, after what it held is let go.
        if !self.answered && !self.origin.clean {
            let origin = self.origin;
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || crate::zygote::replace(origin))),
                Err(_) => crate::zygote::replace(origin),
            }
        }
    }
}

/// The worker's life, in a fresh clone of the zygote (the agent, `agent`, is its parent):
/// one request, one answer. Never returns; ends with `_exit` (no destructor, no flush of a
/// copy of the agent's buffers).
pub fn serve(socket: OwnedFd, agent: libc::pid_t) -> ! {
    // SAFETY: process-wide settings of this single-threaded process, set before anything runs.
    unsafe {
        // Dies with the agent. Asked for after the start, so the agent may already be gone.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        // Never dumpable (it will hold a token): the flag came with the zygote's memory.
        if libc::getppid() != agent || libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 {
            libc::_exit(5);
        }
        crate::zygote::name_and_forget_the_agents_words(COMMAND);
        // Before any work, with one system call each (no lock: see `answer_one`). Never
        // above a hard limit already lower.
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_AS, &mut limit) == 0 {
            let max = limit.rlim_max.min(MAX_WORKER_MEMORY);
            libc::setrlimit(libc::RLIMIT_AS, &libc::rlimit { rlim_cur: max, rlim_max: max });
        }
    }
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer_one(socket))) {
        Ok(Ok(())) => 0,
        Ok(Err(_)) => 1,
        Err(_) => 3,
    };
    // SAFETY: ends this process, running no destructor.
    unsafe { libc::_exit(code) }
}

/// The worker's one request. Its set-up takes what the agent's threads never take once the
/// agent runs (they may have held it when a zygote was forked again from the agent, and
/// it would be held here for ever): `setenv` through libc, not std's lock; a logger of its
/// own writing with `write(2)`; libgit2 and OpenSSL, which the agent never runs. Should it
/// wait on a lock all the same, it does so before it says it is ready, and the agent
/// replaces its zygote ([`READY_WITHIN`]).
fn answer_one(socket: OwnedFd) -> std::io::Result<()> {
    let mut stream = std::os::unix::net::UnixStream::from(socket);
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other("a request too large"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    let request: Request<serde_json::Value> = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
    drop(body);
    for (name, value) in &request.env {
        let (Ok(name), Ok(value)) = (std::ffi::CString::new(name.as_str()), std::ffi::CString::new(value.as_slice())) else { continue };
        // SAFETY: two NUL-terminated strings; this process has one thread.
        unsafe { libc::setenv(name.as_ptr(), value.as_ptr(), 1) };
    }
    // libgit2's set-up (`set_timeouts` below) writes where the CA certificates are into the
    // environment through std's `set_var` unless it finds them there already: written
    // here first, through libc (the agent found them at its start, but a value may differ
    // or be missing), so that std's lock is never written (its probe only reads, and
    // checks paths; when the agent's told it, it searches nothing).
    let found = openssl_probe::probe();
    for (name, value) in [("SSL_CERT_FILE", found.cert_file), ("SSL_CERT_DIR", found.cert_dir)] {
        use std::os::unix::ffi::OsStrExt;
        let (Ok(name), Some(Ok(value))) = (std::ffi::CString::new(name), value.map(|v| std::ffi::CString::new(v.as_os_str().as_bytes()))) else { continue };
        // SAFETY: as above.
        unsafe { libc::setenv(name.as_ptr(), value.as_ptr(), 1) };
    }
    // The hard limit (what `up` raises the agent's to), not the one the zygote was started
    // with: a mirror fetched many times holds a pack file per fetch.
    let _ = runtime::nofile::raise();
    let work = serde_json::from_value::<Work>(request.work).map_err(std::io::Error::other)?;
    let logger = request.log.map(|format| {
        // SAFETY: isatty reads a descriptor's kind.
        let ansi = unsafe { libc::isatty(2) } == 1;
        runtime::logger(format, ansi, || RawStderr)
    });
    let _default = logger.as_ref().map(tracing::dispatcher::set_default);
    // A panic (a bug, or an answer of a git server's that git2 does not read: a ref name
    // that is not UTF-8) is one log line, written without std's stderr lock.
    std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "the git worker failed")));
    // Each log line says it comes from a git worker; and the span's thread-local state is
    // set up now, before the worker says it is ready.
    let span = tracing::info_span!("git_worker");
    let _in_span = span.enter();
    super::mirror::set_timeouts();
    let stop = Arc::new(AtomicBool::new(false));
    let (masks, masks_heard) = std::sync::mpsc::channel();
    watch(stream.try_clone()?, Arc::clone(&stop), masks);
    stream.write_all(&[READY])?;
    // Said before a push may reach the server; unheard (the agent gone), it does not.
    let begins = || (&stream).write_all(&[PUSHING]).is_ok();
    let masks_again = || -> Result<Option<Vec<String>>, RepoError> {
        let unheard = |e: String| local("collect the job's changes", format!("the agent did not say whether Claude's login changed while the job's changes were staged ({e}): run the job again"));
        (&stream).write_all(&[STAGED]).map_err(|e| unheard(e.to_string()))?;
        masks_heard.recv().map_err(|e| unheard(e.to_string()))?.map_err(unheard)
    };
    let answer = perform(work, &stop, &begins, &masks_again);
    let body = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    let mut framed = vec![ANSWER];
    framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
    framed.extend_from_slice(&body);
    stream.write_all(&framed)
}

/// Reads the agent's side of the socket on a thread of its own: [`STOP`] sets `stop`, an
/// answer to [`STAGED`] goes to `masks` (a new redactor's secrets: it is made where the old
/// one is let go first, [`super::hand_back`]), the socket's end (the agent gone, or done
/// with this worker) ends the process.
fn watch(mut socket: std::os::unix::net::UnixStream, stop: Arc<AtomicBool>, masks: std::sync::mpsc::Sender<Result<Option<Vec<String>>, String>>) {
    let spawned = std::thread::Builder::new().name("stop-watch".into()).spawn(move || loop {
        let mut byte = [0u8; 1];
        match socket.read(&mut byte) {
            Ok(1) if byte[0] == STOP => stop.store(true, Ordering::SeqCst),
            Ok(1) if byte[0] == SAME => drop(masks.send(Ok(None))),
            Ok(1) if byte[0] == MASKS => drop(masks.send(read_secrets(&mut socket).map(Some))),
            Ok(1) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // SAFETY: ends this process, whose work nobody waits for any more.
            _ => unsafe { libc::_exit(4) },
        }
    });
    if spawned.is_err() {
        // Without the watch no stop is heard; the agent kills the worker at its deadline.
        tracing::warn!("the git worker could not start its stop-watch thread");
    }
}

/// The secrets of the redactor the agent sent after [`MASKS`]: its length, then JSON.
fn read_secrets(socket: &mut std::os::unix::net::UnixStream) -> Result<Vec<String>, String> {
    let mut len = [0u8; 4];
    socket.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(format!("a redactor of {len} bytes, over the {MAX_MESSAGE} it may take"));
    }
    let mut body = vec![0u8; len];
    socket.read_exact(&mut body).map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

fn perform(work: Work, stop: &AtomicBool, begins: &dyn Fn() -> bool, masks_again: &dyn Fn() -> Result<Option<Vec<String>>, RepoError>) -> Answer {
    match work {
        Work::Fetch { dir, source, known, alone } => Answer::Fetched(super::mirror::fetch_into(&dir, &source, known.as_ref(), alone, stop)),
        Work::Usable { dirs } => Answer::Usable(dirs.iter().map(|dir| super::mirror::usable(dir)).collect()),
        Work::Repack { dir, into, at } => Answer::Repacked(super::mirror::combine_packs(&dir, &into, at)),
        Work::Checkout(w) => Answer::CheckedOut(
            super::checkout::create(&w.mirror, &w.fetched, &w.dir, w.branch.as_deref(), &w.url, (w.max_bytes, w.claimed)).and_then(|checkout| {
                let cwd = super::checkout::working_dir(&checkout.dir, w.working_dir.as_deref())?;
                Ok(CheckedOut { commit: checkout.commit.to_string(), cwd, fs: checkout.fs })
            }),
        ),
        Work::HandBack(w) => Answer::HandedBack(super::hand_back(w, stop, begins, masks_again)),
    }
}

/// The worker's log lines go to its stderr (the agent's, inherited through the zygote) with
/// `write(2)`: std's `stderr` has a lock, which another of the agent's threads may have
/// held when a zygote was forked again from the running agent.
struct RawStderr;

impl Write for RawStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writes from a buffer we own to descriptor 2.
        let wrote = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if wrote < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(wrote as usize)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
