//! One job's life on Spark: a fresh workspace (or, with `repo_url`, a fresh checkout from
//! [`crate::repo`], and afterwards its diff and push), the refresh gate, Claude run through
//! [`crate::process`], each stdout line redacted and forwarded as a progress event, and a
//! result that always comes back — a missing binary, a crash or garbage output become a
//! clear failure, never a hang. The runner sees only its [`JobContext`], not the agent.

use crate::claude::{self, Ending, Session, Transcript};
use crate::config::AgentConfig;
use crate::link::{Carrying, GivenUp, Start};
use crate::oauth::{JobWatch, Login, RefreshGate};
use crate::process::{self, Launch, Stop};
use crate::progress_clock::ProgressClock;
use agent_core::progress::Batch;
use crate::redact::Carry;
use crate::spool::{NotRecorded, Spool};
use crate::repo::error::{RepoError, RoomClaim};
use crate::repo::Repos;
use crate::sessions::{self, Owner, Sessions};
use crate::workspace;
use shared::contract::ErrorCode;
use shared::job::{JobResult, JobSpec};
use shared::protocol::{Nested, ProgressEvent, MAX_EVENT_DEPTH};
use std::path::{Path, PathBuf};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use crate::boot_clock::{self, BootInstant};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
use tracing::{info, warn};

/// Largest progress event forwarded; bigger ones are summarised. As large as a whole
/// batch may be, so one event always fits one.
const MAX_EVENT_BYTES: usize = shared::protocol::MAX_PROGRESS_BYTES;
/// Most of an event's `type` a summary of it keeps.
const MAX_SUMMARY_TYPE_BYTES: usize = 64;
/// What is forwarded of an event whose line is over [`MAX_EVENT_BYTES`], and its size: its
/// `type` cut to [`MAX_SUMMARY_TYPE_BYTES`] (Claude's are short words; a line a job wrote
/// may be all `type`, 16 MiB of it), and the line's size.
fn summarised(event: &serde_json::Value, line_bytes: usize) -> (serde_json::Value, usize) {
    let kind = shared::text::truncate(event["type"].as_str().unwrap_or_default(), MAX_SUMMARY_TYPE_BYTES);
    let summary = serde_json::json!({"type": kind, "truncated": true, "bytes": line_bytes});
    let bytes = summary.to_string().len();
    (summary, bytes)
}

/// What is forwarded of an event read from a line of `line_bytes`, and its size: the event,
/// or its summary ([`summarised`]) when the line is over [`MAX_EVENT_BYTES`] or the event
/// nested deeper than [`MAX_EVENT_DEPTH`]: the edge refuses a batch holding a deeper one
/// (`ProgressReport::check`), and followers' parsers stop at some depth. Claude's own lines
/// nest a few levels; a line a job wrote may nest as deep as the agent reads.
fn forwarded(event: serde_json::Value, line_bytes: usize) -> (serde_json::Value, usize) {
    if line_bytes > MAX_EVENT_BYTES || event.nests_deeper_than(MAX_EVENT_DEPTH) {
        summarised(&event, line_bytes)
    } else {
        (event, line_bytes)
    }
}

/// What a job needs from the agent, and nothing more.
#[derive(Clone)]
pub struct JobContext {
    pub cfg: Arc<AgentConfig>,
    pub login: Arc<Login>,
    /// The agent's environment as Claude may inherit it ([`process::inherited_environment`]).
    pub inherited_env: Arc<[(std::ffi::OsString, std::ffi::OsString)]>,
    pub gate: RefreshGate,
    /// Progress events go out here, under the job's budget (dropped while the agent is
    /// offline, or past the budget while the link is slower than Claude prints).
    pub progress: crate::uplink::JobProgress,
    /// The current connection's keys: progress is MACed with them.
    pub link: crate::link::Link,
    /// Told of the usage window as Claude reports it, mid-run.
    pub reporter: Arc<crate::report::Reporter>,
    /// Where the job's "started" marker is written before Claude is spawned (None for a
    /// job no edge knows of, such as `doctor --canary`'s).
    pub spool: Option<Arc<Spool>>,
    /// Where the agent tells the edge the job started, once that marker is durable (None
    /// for a job no edge knows of).
    pub uplink: Option<tokio::sync::mpsc::UnboundedSender<shared::protocol::AgentMessage>>,
    /// Repository mirrors, for jobs with a `repo_url`.
    pub repos: Arc<Repos>,
    /// The nonce of the job's order: every progress batch is MACed bound to it.
    pub order_nonce: String,
    /// When waiting progress batches go (one clock for all jobs).
    pub progress_clock: Arc<ProgressClock>,
    /// The folder of the jobs' workspaces, symlinks resolved ([`workspace::root`]).
    pub workspaces: Arc<PathBuf>,
    /// Whose each Claude session is (None for a job no edge knows of, which resumes none).
    pub sessions: Option<Arc<Sessions>>,
    /// The job's caller (named in its signed order) and pool: it may resume only their
    /// sessions, and the session it ends in becomes theirs.
    pub owner: Owner,
}

/// After Claude, the diff and the push get the rest of the job's time and this much more.
/// The edge waits `TIMEOUT_MARGIN_MS` (30 s by default) beyond `timeout_ms`: this, the
/// wait for a push under way ([`crate::repo::HAND_BACK_ABANDON`]) and the read of a
/// killed worker's last words end within it, with time to send the result, so the
/// agent's answer (whether the push landed) comes before the edge's TIMEOUT.
const FINISH_GRACE: Duration = Duration::from_secs(10);
/// The largest result JSON: one WebSocket frame, less room for the message around it.
pub(crate) const MAX_RESULT_BYTES: usize = shared::protocol::MAX_FRAME_BYTES - 64 * 1024;

/// A job run to its end.
pub struct Ended {
    /// Its (redacted) result.
    pub result: JobResult,
    /// The Claude session to record as the job's caller's ([`Transcript::recorded`]): the
    /// one the agent started Claude in, never one read from Claude's output.
    pub session: Option<String>,
    /// Its workspace, to clean up once the result is on its way (removing it is off the
    /// job's path).
    pub leftover: Leftover,
    /// Set when the job never started because the agent cannot start jobs now (its
    /// DATA_DIR's disk is full, its process limit reached): `result` is then not the
    /// job's, and the job goes back to the edge unstarted ([`crate::agent`]).
    pub cannot_start: Option<CannotStart>,
}

/// Why the agent could not start a job, through no fault of the job: it goes back to the
/// edge unstarted (its Claude never got the prompt), to run on another agent or later,
/// and this agent takes no work until it could start one again.
#[derive(Debug, Clone, PartialEq)]
pub struct CannotStart {
    /// What went wrong and what to do, for the operator (`/health`, the log).
    pub why: String,
    /// Whether DATA_DIR's disk is the trouble: work resumes once a write there succeeds.
    /// Otherwise (the process limit, memory) it resumes after a heartbeat interval.
    pub disk: bool,
    /// Whether the mirrors' folder is among the folders that took no write (a job on a
    /// repository needs it as well): work resumes once it takes one too.
    pub repos: bool,
}

/// Runs the job to its end.
pub async fn run(ctx: &JobContext, job_id: &str, spec: JobSpec, stop: oneshot::Receiver<Stop>) -> Ended {
    let workspace = ctx.workspaces.join(job_id);
    // Room this job holds until its workspace is removed: another job refused for room
    // beside it is told so ([`full_disk`]).
    let held = ctx.repos.hold_workspace(&workspace, &spec);
    let mut checkout_done = None;
    let mut cannot_start = None;
    let mut no_room = false;
    // From before anything of the job runs to its end: see `oauth::JobWatch`. Dropped at
    // this function's end, once the job's processes are gone.
    let watch = ctx.login.watch_job();
    let (mut result, session) = run_in(ctx, job_id, spec, stop, &workspace, &watch, &mut checkout_done, &mut cannot_start, &mut no_room).await;
    scrub(&mut result, || ctx.login.redactor(crate::now_ms()));
    let keep = kept(&result, ctx.cfg.repos.keep_failed_workspaces, cannot_start.is_some(), no_room);
    let leftover = Leftover { workspace, keep, job_id: job_id.to_string(), agent_id: ctx.cfg.agent_id.clone(), checkout_done, held: Some(held) };
    Ended { result, session, leftover, cannot_start }
}

/// The result of a job found tampering with Claude's login (`oauth::JobWatch::tampering`
/// says `why`): nothing of its own, and not to be run again as it is.
fn withheld(why: String, duration_ms: u64) -> JobResult {
    JobResult { retryable: Some(false), ..JobResult::failure(ErrorCode::ClaudeError, why, duration_ms) }
}

/// Whether a job's workspace is kept (`KEEP_FAILED_WORKSPACES`, `keep_failed`): a failed
/// job's is, for a post-mortem. A job that never started (`unstarted`) leaves nothing worth
/// keeping; nor does a checkout that failed for want of room (`no_room`): kept, its half
/// filled the disk for every later job, across restarts (rev25, 2).
fn kept(result: &JobResult, keep_failed: bool, unstarted: bool, no_room: bool) -> bool {
    !result.success && keep_failed && !unstarted && !no_room
}

/// Masks the secrets in the words of a result that are not Claude's output (redacted as
/// it is read, [`run_in`]): the error, which can carry a path or a name the job chose (a
/// file named after `$CLAUDE_CODE_OAUTH_TOKEN` too large to push was named in the
/// `REPO_ERROR` sentence, and reached the caller in clear) or a git server's words, and
/// the changed files' paths, a rename's old one included. One place, after every way a
/// job ends, so no error set on the way out is missed. The redactor is asked for only
/// when there is something to mask (reading the login is a file read): not for a plain
/// job that succeeded.
fn scrub(result: &mut JobResult, redactor: impl FnOnce() -> std::sync::Arc<crate::redact::Redactor>) {
    if result.error.is_none() && result.files_changed.is_none() {
        return;
    }
    let redactor = redactor();
    if let Some(error) = result.error.as_mut() {
        *error = redactor.redact(error);
    }
    for file in result.files_changed.iter_mut().flatten() {
        file.path = redactor.redact(&file.path);
        if let Some(old) = file.old_path.as_mut() {
            *old = redactor.redact(old);
        }
    }
}

/// A finished job's workspace.
#[must_use = "a job's workspace is removed by clean_up"]
pub struct Leftover {
    workspace: PathBuf,
    keep: bool,
    job_id: String,
    agent_id: String,
    /// Resolves once a checkout into the workspace has ended: one cut off by the job's
    /// timeout or a cancel goes on writing until then ([`crate::repo::Repos::prepare`]).
    checkout_done: Option<oneshot::Receiver<()>>,
    /// The job's hold on the room its workspace takes, let go once it is removed (or
    /// kept): dropped with this, after [`Leftover::clean_up_now`]'s removal.
    held: Option<crate::repo::WorkspaceHold>,
}

impl Leftover {
    /// Removes the workspace, unless the job failed and `KEEP_FAILED_WORKSPACES` is set.
    /// (If the agent stops before, its next start removes it.)
    pub async fn clean_up(self) {
        let _ = tokio::task::spawn_blocking(move || self.clean_up_now()).await;
    }

    /// [`Leftover::clean_up`], blocking: for a caller already off the async threads.
    pub fn clean_up_now(mut self) {
        if let Some(done) = self.checkout_done.take() {
            // Sent nothing: resolves (as an error) when the checkout's work is dropped.
            let _ = done.blocking_recv();
        }
        if self.keep {
            info!(job_id = %self.job_id, agent_id = %self.agent_id, workspace = %self.workspace.display(), "workspace kept");
        } else {
            if let Err(e) = workspace::remove(&self.workspace) {
                warn!(job_id = %self.job_id, agent_id = %self.agent_id, workspace = %self.workspace.display(), error = %e, "the job's workspace could not be removed: remove it by hand (the agent tries again at its next start)");
            }
        }
        // Removed (or kept, a failed job's for good): no longer room a running job holds.
        drop(self.held.take());
    }
}

/// The job's result, and the session to record as its caller's (none when Claude did not run).
#[allow(clippy::too_many_arguments)]
async fn run_in(
    ctx: &JobContext,
    job_id: &str,
    spec: JobSpec,
    mut stop: oneshot::Receiver<Stop>,
    workspace: &Path,
    watch: &JobWatch,
    checkout_done: &mut Option<oneshot::Receiver<()>>,
    cannot_start: &mut Option<CannotStart>,
    no_room: &mut bool,
) -> (JobResult, Option<String>) {
    let workspace = workspace.to_path_buf();
    // On the boot clock, as the edge's own timeout runs: a suspend counts against the
    // job's time ([`crate::boot_clock`]).
    let started = BootInstant::now();
    // Every wait before Claude counts against the job's timeout, and a cancel ends it.
    let deadline = started + Duration::from_millis(spec.timeout_ms);
    // First: a job that may not resume its session does nothing else (no checkout, no
    // Claude spend).
    if let Some(session) = &spec.session_id {
        if let Err(why) = may_resume(ctx, session) {
            let caller = &ctx.owner.caller;
            warn!(job_id, agent_id = %ctx.cfg.agent_id, session_id = shared::ids::shown_job_id(session), caller = %caller, reason = %why, "session not resumed: the job fails before Claude runs");
            return (JobResult::failure(ErrorCode::InvalidRequest, sessions::unknown_to(session, caller), started.elapsed().as_millis() as u64), None);
        }
    }
    let (cwd, repo) = match &spec.repo_url {
        None => match workspace::prepare(&ctx.workspaces, job_id, spec.working_dir.as_deref()) {
            Ok(dir) => (dir, None),
            Err(e) => {
                // The agent's want (the disk, or its own folder): no fault of the job's,
                // which goes back unstarted. Anything else is the job's own, and it fails
                // alone: a leftover of it that cannot be removed (EPERM, EBUSY), a
                // `working_dir` the file system refuses (rev26-1: ENAMETOOLONG).
                if agents_want(ctx, &e).await {
                    let root = workspace.parent().unwrap_or(&workspace);
                    let why = format!("it cannot make a job's workspace in {} ({e}): free space on that folder's disk (or make it writable)", root.display());
                    *cannot_start = Some(CannotStart { why, disk: true, repos: false });
                    let error = format!("could not prepare the job's workspace {}: {e}; check DATA_DIR's disk space", workspace.display());
                    return (JobResult::failure(ErrorCode::InternalError, error, 0), None);
                }
                warn!(job_id, agent_id = %ctx.cfg.agent_id, error = %e, "the job's workspace could not be prepared: the job fails alone");
                let error = format!(
                    "could not prepare the job's workspace {}: {e}; check its working_dir, or remove by hand what an earlier run of the job left there",
                    workspace.display()
                );
                return (JobResult::failure(ErrorCode::InternalError, error, 0), None);
            }
        },
        Some(url) => {
            // Rounds of room made from idle mirrors so far for the fetch and for the
            // checkout (`Repos::make_room`): each step has its own.
            let mut rounds = [0u32; 2];
            let mut evicted = 0;
            // The job's time ended at `checking_out`: after rounds of room, the full disk
            // is said, not only a slow server (rev37-4).
            let timed_out = |checking_out: bool, rounds: [u32; 2], evicted: usize| {
                let timeout_ms = spec.timeout_ms;
                match (rounds, checking_out) {
                    ([0, 0], true) => RepoError::CheckoutTimedOut { url: url.clone(), timeout_ms },
                    ([0, 0], false) => RepoError::FetchTimedOut { url: url.clone(), timeout_ms },
                    (rounds, checking_out) => {
                        let step = if checking_out { "checkout" } else { "fetch" };
                        RepoError::RoomTimedOut { url: url.clone(), step: step.into(), timeout_ms, rounds: rounds[0] + rounds[1], evicted }
                    }
                }
            };
            // Its claim, if it has one, stands until it is settled below (rev45d-2).
            let _pinned = ctx.repos.pin_claim(&spec);
            let (prepared, checked_out) = loop {
                let checking_out = Arc::new(AtomicBool::new(false));
                let (done_tx, done_rx) = oneshot::channel();
                *checkout_done = Some(done_rx);
                let signals = crate::repo::CheckoutSignals { started: Arc::clone(&checking_out), done: done_tx };
                let leftover = workspace.clone();
                let attempt = async {
                    // A leftover of the same job (sent again), or of the try before, goes,
                    // as `workspace::prepare` removes one. (The try before's checkout has
                    // ended.) Under the stop and the deadline too: cut off, the removal
                    // ends on its own (rev37-5).
                    let _ = tokio::task::spawn_blocking(move || workspace::remove(&leftover)).await;
                    ctx.repos.prepare(&spec, &workspace, signals).await
                };
                // The deadline first (`biased`): a checkout that ends as the deadline passes
                // (on resume after a suspend past it) does not go on to start Claude.
                let prepared = tokio::select! {
                    biased;
                    _ = boot_clock::sleep_until(deadline) => Err(Err(timed_out(checking_out.load(Ordering::SeqCst), rounds, evicted))),
                    s = &mut stop => Err(Ok(Stop::ending_unstarted(s))),
                    prepared = attempt => prepared.map_err(Err),
                };
                // Out of room: idle mirrors of other repositories go first, as many as the
                // step is taken to need, and it is tried again (a fetch, whose need is an
                // estimate, a bounded number of times), before the job is refused or handed
                // back for the room a cache took (rev28-5).
                match prepared {
                    Err(Err(e @ (RepoError::DiskFull { .. } | RepoError::NoRoom { .. }))) => {
                        let step = checking_out.load(Ordering::SeqCst);
                        let round = &mut rounds[usize::from(step)];
                        *round += 1;
                        let round = *round;
                        // Under the stop and the deadline: a cancel, a drain or the job's
                        // end waited for the evictions (rev37-5), which end on their own.
                        let made = tokio::select! {
                            made = ctx.repos.make_room(url, step, &e, &ctx.workspaces, round) => made,
                            s = &mut stop => break (Err(Ok(Stop::ending_unstarted(s))), step),
                            _ = boot_clock::sleep_until(deadline) => break (Err(Err(timed_out(step, rounds, evicted))), step),
                        };
                        let needs = made.needs.map_or_else(|| "unknown".to_string(), |n| n.to_string());
                        if !made.could_fit {
                            info!(job_id, agent_id = %ctx.cfg.agent_id, round, needs, "out of room for the repository, which could not fit even with every idle mirror gone: none evicted");
                        }
                        if made.evicted == 0 {
                            break (Err(Err(e)), step);
                        }
                        evicted += made.evicted;
                        info!(job_id, agent_id = %ctx.cfg.agent_id, evicted = made.evicted, round, needs, "out of room for the repository: idle mirrors evicted, trying again");
                    }
                    prepared => break (prepared, checking_out.load(Ordering::SeqCst)),
                }
            };
            match prepared {
                Ok(p) => {
                    ctx.repos.settle_claim(&spec, None);
                    info!(job_id, agent_id = %ctx.cfg.agent_id, commit = %p.commit(), stale = p.stale(), fetch_ms = p.fetch_ms(), ms = started.elapsed().as_millis() as u64, "repository checked out");
                    (p.cwd.clone(), Some(p))
                }
                Err(ended) => {
                    let mut ended = match ended {
                        Err(e @ (RepoError::DiskFull { .. } | RepoError::NoRoom { .. })) => Err(full_disk(ctx, &spec, url, checked_out, &workspace, e, cannot_start).await),
                        Err(e @ RepoError::Git { .. }) => Err(local_fault(ctx, &workspace, e, cannot_start).await),
                        other => other,
                    };
                    // A refusal for room other jobs hold claims it for the retry (`repo::claim`).
                    ctx.repos.settle_claim(&spec, ended.as_mut().err());
                    let ms = started.elapsed().as_millis() as u64;
                    let result = match ended {
                        Ok(ending) => not_run(ending, started),
                        Err(e) => {
                            *no_room = matches!(
                                e,
                                RepoError::DiskFull { .. }
                                    | RepoError::TooBigForDisk { .. }
                                    | RepoError::NoRoom { .. }
                                    | RepoError::RoomHeld { .. }
                                    | RepoError::RoomClaimed { .. }
                                    | RepoError::FilledMeanwhile { .. }
                                    | RepoError::FetchFilledMeanwhile { .. }
                                    | RepoError::RoomTimedOut { .. }
                            );
                            // Redacted for the log too: a path or a server's words.
                            let said = ctx.login.redactor(crate::now_ms()).redact(&e.to_string());
                            warn!(job_id, agent_id = %ctx.cfg.agent_id, error = %said, "the repository could not be prepared");
                            JobResult { retryable: Some(e.retryable()), ..JobResult::failure(ErrorCode::RepoError, said, ms) }
                        }
                    };
                    return (result, None);
                }
            }
        }
    };
    if let Some(session) = &spec.session_id {
        if let Err(e) = carry_session(&ctx.login.config_dir, session, &cwd).await {
            warn!(job_id, session_id = %session, error = %e, "could not carry the session over; Claude will say it is unknown");
        }
    }
    // While the token is stale only one job starts; see oauth::RefreshGate.
    // Err(Ok(_)): the job's end, its deadline or a stop; Err(Err(_)): another process held
    // the refresh lock too long; the gate says who.
    // The deadline first (`biased`): a select picks at random among the branches ready, and
    // a gate that opens as the deadline passes (on resume after a suspend past it) started
    // Claude after the edge had told its caller TIMEOUT (rev37-1). It ends as the start
    // rule ends a job too late, by the one `too_late`.
    let admitted = tokio::select! {
        biased;
        _ = boot_clock::sleep_until(deadline) => Err(Ok(too_late(ctx, job_id, started, deadline))),
        s = &mut stop => {
            let ending = Stop::ending_unstarted(s);
            info!(job_id, agent_id = %ctx.cfg.agent_id, ending = ?ending, "job ended while waiting for the login refresh");
            Err(Ok(not_run(ending, started)))
        }
        refresher = ctx.gate.admit(&ctx.login, job_id) => refresher.map_err(Err),
    };
    // The start rule (a link cut, or kept up by a hop without the edge, during the checkout
    // or the wait for the refresh gate): see `start_rule`, which also ends a job whose
    // deadline has passed. Checked again, with the deadline, right before the prompt.
    if admitted.is_ok() {
        if let Err(result) = start_rule(ctx, job_id, started, deadline, &mut stop, None).await {
            return (result, None);
        }
    }
    let (mut result, session) = match admitted {
        Ok(refresher) => {
            let ran = loop {
                match run_claude(ctx, job_id, &spec, &cwd, deadline, &mut stop, started, watch, cannot_start).await {
                    Some(ran) => break ran,
                    // Held at the check right before the prompt: Claude was killed unprompted
                    // and its started record cleared. The start waits as at the first check,
                    // for a frame the edge proved written from now, and Claude starts anew.
                    None => {
                        if let Err(result) = start_rule(ctx, job_id, started, deadline, &mut stop, Some(BootInstant::now())).await {
                            break (result, None);
                        }
                    }
                }
            };
            drop(refresher);
            ran
        }
        Err(Ok(ended)) => (ended, None),
        // Not an OAuth error: the login is fine, a process keeps it from being refreshed
        // (the gate warned once, naming it).
        Err(Err(stalled)) => {
            info!(job_id, agent_id = %ctx.cfg.agent_id, "job failed: the refresh lock is held by a process that does not refresh");
            (JobResult::failure(ErrorCode::ClaudeError, stalled, started.elapsed().as_millis() as u64), None)
        }
    };
    // Re-read: the tokens may have been rotated while Claude ran.
    let redactor = ctx.login.redactor(crate::now_ms());
    // A job that wrote logins of its own into Claude's credentials file gives nothing
    // back: not its output, its diff or its push (a commit can carry a token in a form
    // the redactor does not read), nor a session to resume.
    if let Some(why) = watch.tampering() {
        warn!(job_id, agent_id = %ctx.cfg.agent_id, "the job's output, diff and push are withheld: Claude's credentials file changed into more logins than Claude's refresh makes while it ran");
        return (withheld(why, started.elapsed().as_millis() as u64), None);
    }
    result.output = redactor.redact(&result.output);
    if let Some(prepared) = repo {
        hand_back(ctx, job_id, &spec, prepared, deadline, &mut stop, &mut result).await;
        result.duration_ms = started.elapsed().as_millis() as u64;
        crate::repo::fit_result(&mut result, MAX_RESULT_BYTES);
    }
    (result, session)
}

/// Whether `e` is the disk's failing, whatever folder met it: full or over quota
/// ([`crate::files::disk_full`]: ENOSPC, EDQUOT), read-only (EROFS), or failing (EIO).
/// Named here, by the runner, the one side that tells the agent's want from the job's:
/// any other error is the disk's only when the agent's own folders take no write either
/// ([`agents_want`]).
fn the_disks(e: &std::io::Error) -> bool {
    crate::files::disk_full(e) || e.kind() == std::io::ErrorKind::ReadOnlyFilesystem || e.raw_os_error() == Some(libc::EIO)
}

/// Whether a failure `e` on the way to a job's start is the agent's want, not the job's:
/// the disk's ([`the_disks`]), or any error while the folders every job needs take no
/// write ([`job_folders_take_writes`]: their permissions, a file in their place, a folder
/// gone). Then the job goes back unstarted and the agent takes no work until they do
/// ([`CannotStart`]). Anything else — EPERM or EBUSY on a leftover of the job, a name the
/// file system refuses — is the job's own: it fails alone, and the agent takes the next.
async fn agents_want(ctx: &JobContext, e: &std::io::Error) -> bool {
    the_disks(e) || job_folders_take_writes(&ctx.workspaces, ctx.spool.as_ref(), None).await.is_err()
}

/// Whether the folders a job needs take a write now (its workspace's, its started
/// record's when it has one, and the mirrors' (`repos`) for a job on a repository, whose
/// fetch writes there, on a disk of its own or not): an agent held back for want of disk
/// takes work again once they do ([`crate::agent::Agent::check_start`]), and a job whose
/// fetch or checkout filled the disk is handed back while they do not ([`full_disk`]).
/// The one test write of all: on the blocking pool, as a file is made, synced and removed
/// in each folder, and as the spool tries the write of the next job's started record
/// ([`Spool::takes_writes`]). The error names the folder (or record file) that took none.
pub async fn job_folders_take_writes(workspaces: &Path, spool: Option<&Arc<Spool>>, repos: Option<&Path>) -> std::io::Result<()> {
    let dirs: Vec<PathBuf> = [Some(workspaces), repos].into_iter().flatten().map(Path::to_path_buf).collect();
    let spool = spool.cloned();
    tokio::task::spawn_blocking(move || {
        for dir in &dirs {
            crate::files::probe_write(dir).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        spool.map_or(Ok(()), |spool| spool.takes_writes())
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// A full disk met by a job's fetch or checkout (`checking_out`) of `url`, once idle
/// mirrors were evicted for room and the step tried again (`Repos::make_room`), or none
/// could be. What the checkout wrote goes
/// first; then the write that tells an agent held back for want of disk when it may take
/// work again ([`job_folders_take_writes`]) says whose want it is. Still full: the
/// agent's — no job could start — and this one goes back unstarted ([`CannotStart`]), as
/// one without room for its workspace does (its error is then not the job's). Room again:
/// a checkout measured to need no more than is free now met another writer, and the job
/// ends retryable ([`RepoError::FilledMeanwhile`]); so does a fetch estimated to fit with
/// the reserve in what is free now, or in that and the room other jobs hold now — the
/// mirrors of other repositories in use, the workspaces of other jobs
/// ([`RepoError::FetchFilledMeanwhile`]: rev37-2, two fetches at once, each fitting
/// alone); else the repository's — it needs more than the disk has free, and would fill
/// it again here ([`full_disk_verdict`]), told to lower the cache only while idle mirrors
/// of others are kept. A checkout refused before it was written for want of room
/// ([`RepoError::NoRoom`], `checkout::room`) is judged the same way: on a disk that takes
/// no write it is the agent's want; one that fits beside nothing held — that room gone,
/// with the idle mirrors — ends retryable ([`RepoError::RoomHeld`]: it goes once those
/// jobs are done, and the refusal claims it for the retry, `repo::claim`; rev40b-1, beside
/// another job of its own repository, whose workspace no mirror showed); else the repository's, and its error names the bytes needed and free
/// (and the cache only while idle mirrors of others are kept). Mirrors and workspaces
/// count only on the disk the step needs room on.
async fn full_disk(ctx: &JobContext, spec: &JobSpec, url: &str, checking_out: bool, workspace: &Path, error: RepoError, cannot_start: &mut Option<CannotStart>) -> RepoError {
    let takes_writes = disk_probed(ctx, workspace, cannot_start).await;
    if !takes_writes {
        return error;
    }
    // What is known of the step's need: a checkout's measured (refused before it was
    // written, or written and filling the disk), a fetch's estimated from how far it got
    // (none: the disk was full before its pack began, and it wrote next to nothing).
    let need = match (&error, checking_out) {
        (RepoError::NoRoom { needed, .. }, _) => needed.map(Need::Refused),
        (RepoError::DiskFull { needed, .. }, true) => needed.map(Need::Measured),
        (RepoError::DiskFull { fetch_needs, .. }, false) => Some(Need::Estimated(fetch_needs.unwrap_or(0))),
        _ => return error,
    };
    // On the disk the step wrote to. Room held there: the mirrors of other repositories
    // in use (the job's own is not: its checkout borrows from it, so it never goes for
    // the job), and the workspaces of the other jobs (rev40b-1: one of the same
    // repository's held room no mirror showed).
    let on = if checking_out { ctx.workspaces.as_path() } else { ctx.repos.root() };
    let mirrors = match crate::repo::mirror::same_disk(on, ctx.repos.root()) {
        true => ctx.repos.others_bytes(url).await,
        false => crate::repo::mirror::OthersBytes::default(),
    };
    // Counted in part (a walk cut short), the room they hold is judged at its most
    // ([`held_at_most`]): judged on what was counted, less than they hold, a repository
    // that fits once they are done was called too big, not retryable (rev45d-1). No claim
    // is made for room not known (rev45b-1).
    let counted = ctx.repos.other_workspaces_bytes(workspace, on, spec).await;
    let workspaces = counted.bytes;
    let space = workspace::disk_space(on).ok();
    let uncounted = !counted.complete;
    let mut others = crate::repo::mirror::OthersBytes { in_use: mirrors.in_use.saturating_add(workspaces), ..mirrors };
    if let (true, Some(space)) = (uncounted, space) {
        others.in_use = others.in_use.max(held_at_most(space, mirrors.own).saturating_sub(others.idle));
    }
    let (detail, needed) = match error {
        RepoError::DiskFull { detail, needed, .. } => (detail, needed),
        RepoError::NoRoom { url, what, needed, .. } => {
            return match full_disk_verdict(need, space, others) {
                FullDisk::Meanwhile { .. } => {
                    // Beside its own repository's job, a claim would hold back only the
                    // other repositories, never the job it waits for (rev45b-2).
                    let claim = match (uncounted, counted.own_jobs) {
                        (true, _) => RoomClaim::Uncounted,
                        (false, true) => RoomClaim::OwnJobs,
                        (false, false) => RoomClaim::Wanted,
                    };
                    RepoError::RoomHeld { url, what, held: mirrors.in_use, workspaces, needed: needed.unwrap_or_default(), claim }
                }
                FullDisk::TooBig => ctx.repos.no_room(url, what, needed, others.idle > 0, uncounted),
            };
        }
        other => return other,
    };
    match full_disk_verdict(need, space, others) {
        FullDisk::TooBig => ctx.repos.too_big_for_disk(url, checking_out, detail, others.idle > 0, uncounted),
        FullDisk::Meanwhile { held } => {
            let free = space.map_or(0, |space| space.free);
            match need {
                Some(Need::Estimated(needs)) => {
                    let held = held.then_some(crate::repo::error::HeldRoom { workspaces, mirrors: mirrors.in_use, uncounted });
                    RepoError::FetchFilledMeanwhile { url: url.to_string(), detail, needs, free, held }
                }
                _ => RepoError::FilledMeanwhile { url: url.to_string(), detail, needed: needed.unwrap_or_default(), free },
            }
        }
    }
}

/// The most the other jobs may hold on a disk of `space` where the job's own mirror takes
/// `own` bytes: all it holds but that mirror — for a walk of their workspaces cut short
/// ([`full_disk`]), a bound that needs no walk. More than they hold (the runner's data,
/// other programs' files, the blocks kept for root), so a verdict on it may say "retry" to
/// a repository that never fits, never "too big" to one that fits once they are done.
fn held_at_most(space: workspace::DiskSpace, own: u64) -> u64 {
    space.size.saturating_sub(space.free).saturating_sub(own)
}

/// What a step that filled the disk is known to need ([`full_disk_verdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// A checkout's, measured before it was written.
    Measured(u64),
    /// A fetch's, estimated from how far it got (`repo::layout::fetch_needs`).
    Estimated(u64),
    /// A checkout's, measured and refused before it was written (`RepoError::NoRoom`).
    Refused(u64),
}

/// Whose want a full disk met by a job's fetch or checkout that takes writes again is,
/// once what the step wrote is removed. (A disk that takes none is the agent's want: the
/// job goes back unstarted, [`full_disk`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FullDisk {
    /// The repository needs more than the disk has free: REPO_ERROR, not retryable.
    TooBig,
    /// Room enough for the step is free again (`held`: counting the room other jobs hold
    /// now — the mirrors of other repositories in use, the other jobs' workspaces — a
    /// fetch's or a refused checkout's only): another writer filled the disk meanwhile, or
    /// holds the room the step needs. The job ends retryable.
    Meanwhile { held: bool },
}

/// The verdict on a full disk that takes writes again, or a checkout refused for room,
/// from the step's `need` and the disk's `space` now, and the bytes of other repositories'
/// mirrors on that disk (`others`: idle, and in use, with the other jobs' workspaces there
/// — all that other jobs hold). A checkout measured to need no more than is free met
/// another writer. A fetch estimated to fit with the reserve in what is free, or in that
/// and the held room (which goes once its jobs are done),
/// did too: judged "too big" whatever its estimate, a repository fitting the disk alone
/// failed for good beside another job's fetch (rev37-2). A refused checkout that fits
/// beside nothing held (every other mirror gone, idle and held, and the other jobs'
/// workspaces: the idle mirrors made room already, or could not make enough alone) waits
/// only for those jobs: judged "too big", it failed for good beside another job's mirror
/// (evict2's leftover), or its workspace (rev40b-1). Anything else is too big for the disk.
fn full_disk_verdict(need: Option<Need>, space: Option<workspace::DiskSpace>, others: crate::repo::mirror::OthersBytes) -> FullDisk {
    use crate::repo::layout::could_fit;
    match (need, space) {
        (Some(Need::Measured(needed)), Some(space)) if needed <= space.free => FullDisk::Meanwhile { held: false },
        (Some(Need::Estimated(needs)), Some(space)) if crate::repo::checkout::fits_with_reserve(needs, space) => FullDisk::Meanwhile { held: false },
        (Some(Need::Estimated(needs)), Some(space)) if could_fit(needs, space, others.in_use) => FullDisk::Meanwhile { held: true },
        (Some(Need::Refused(needed)), Some(space)) if others.in_use > 0 && could_fit(needed, space, others.idle.saturating_add(others.in_use)) => {
            FullDisk::Meanwhile { held: true }
        }
        _ => FullDisk::TooBig,
    }
}

/// Any other local failure of a job's fetch or checkout (`RepoError::Git`: a read-only
/// remount, EIO, a workspaces folder made unwritable) asks the same write as a full disk
/// ([`full_disk`]): refused, the disk is the agent's want and the job goes back unstarted,
/// as a job without its workspace does — it ended REPO_ERROR, and the agent took the next
/// and failed it the same (rev28-3). Taken, the failure is the job's, as it was.
async fn local_fault(ctx: &JobContext, workspace: &Path, e: RepoError, cannot_start: &mut Option<CannotStart>) -> RepoError {
    disk_probed(ctx, workspace, cannot_start).await;
    e
}

/// Removes what a failed checkout wrote into `workspace`, then tries the write of
/// [`job_folders_take_writes`]: whether it took. Refused, the agent is held back for want
/// of disk (`cannot_start`: the job goes back unstarted) until one does.
async fn disk_probed(ctx: &JobContext, workspace: &Path, cannot_start: &mut Option<CannotStart>) -> bool {
    let leftover = workspace.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || workspace::remove(&leftover)).await;
    let Err(e) = job_folders_take_writes(&ctx.workspaces, ctx.spool.as_ref(), Some(ctx.repos.root())).await else { return true };
    let why = format!("it cannot fetch or check out a job's repository (a write in {e}): free space on that folder's disk (or make it writable)");
    *cannot_start = Some(CannotStart { why, disk: true, repos: true });
    false
}

/// The start rule ([`crate::link::Link::start`]), checked before a job's started record is
/// written and again right before Claude gets its prompt: `Ok` once the prompt may go.
/// The edge gives a job up `LOST_AFTER_MS` after it lost the agent and tells an
/// `/execute` caller to fall back: started then, the task would run twice. So a job starts
/// only while the last frame the edge proved it read was written less than that ago —
/// connected or not (rev30-1: a hop that cut the edge off and read all the agent wrote kept
/// it "connected", and a job held at the refresh gate started after its caller had been
/// told to fall back). Otherwise its start is held, not ended (the edge may still hold
/// it: a blip, a slow ack), until the edge proves it is there in a frame written after the
/// check (`held`: since when; `None` at the first check), and ends at its deadline, when
/// cancelled, or when a welcome names it as given up; the result then says it never
/// started. The deadline decides before a `Go`: a job whose deadline passed before the
/// rule was looked at (on resume from a suspend past it) ends TIMEOUT, never started
/// ([`too_late`]), as at the refresh gate.
async fn start_rule(
    ctx: &JobContext,
    job_id: &str,
    started: BootInstant,
    deadline: BootInstant,
    stop: &mut oneshot::Receiver<Stop>,
    mut held: Option<BootInstant>,
) -> Result<(), JobResult> {
    loop {
        // Enabled before the look: an ack that comes between the two is not missed.
        let proven = ctx.link.proven();
        tokio::pin!(proven);
        proven.as_mut().enable();
        let (heard, lost_after_ms) = match ctx.link.start(job_id, held) {
            Start::Go if BootInstant::now() >= deadline => return Err(too_late(ctx, job_id, started, deadline)),
            Start::Go => {
                if held.is_some() {
                    info!(job_id, agent_id = %ctx.cfg.agent_id, "the edge proved it is there again: the job held before its start goes on");
                }
                return Ok(());
            }
            Start::GivenUp(why) => return Err(gave_up_result(ctx, job_id, started, &why)),
            Start::Hold { heard, lost_after_ms } => (heard, lost_after_ms),
        };
        let looked = BootInstant::now();
        if held.is_none() {
            held = Some(looked);
            warn!(
                job_id, agent_id = %ctx.cfg.agent_id, heard_ms = heard.map(|h| h.as_millis() as u64), lost_after_ms, carrying_bytes = ctx.link.carried().map(|c| c.bytes),
                "job held before its start: nothing the edge proved is younger than its LOST_AFTER_MS, so it may have given the job up; it starts once the edge answers a heartbeat written from now, and ends not started at its deadline"
            );
        }
        // The deadline first (`biased`): held until it, the job ends as held, whatever came
        // with it.
        tokio::select! {
            biased;
            _ = boot_clock::sleep_until(deadline) => {
                let away = heard.map(|h| h + looked.elapsed());
                return Err(gave_up_result(ctx, job_id, started, &GivenUp::Away { away, lost_after_ms, carrying: ctx.link.carried() }));
            }
            s = &mut *stop => {
                let ending = Stop::ending_unstarted(s);
                info!(job_id, agent_id = %ctx.cfg.agent_id, ending = ?ending, "job ended while its start was held");
                return Err(not_run(ending, started));
            }
            _ = &mut proven => {}
        }
    }
}

/// The end of a job whose deadline passed before Claude got its prompt (at the refresh
/// gate, [`start_rule`], the last look before the prompt in [`run_claude`]): TIMEOUT,
/// saying Claude never ran.
/// Not `RUNNER_LOST`: that says the edge may have given the job up and its caller been
/// told to fall back; here the edge held it, and ends it TIMEOUT at the same deadline.
fn too_late(ctx: &JobContext, job_id: &str, started: BootInstant, deadline: BootInstant) -> JobResult {
    let after_ms = deadline.saturating_duration_since(started).as_millis() as u64;
    info!(job_id, agent_id = %ctx.cfg.agent_id, timeout_ms = after_ms, "job not started: its deadline passed before Claude got its prompt");
    not_run(Ending::TimedOutUnstarted { after_ms }, started)
}

/// The result of a job that ended before Claude ran (a cancel, the agent's drain, its
/// deadline), as `ending` says, after the time since it `started`.
fn not_run(ending: Ending, started: BootInstant) -> JobResult {
    claude::result(&Transcript::default(), ending, "", started.elapsed().as_millis() as u64)
}

/// The end of a job the edge gave up, or may have ([`start_rule`]), and why it is taken so.
fn gave_up_result(ctx: &JobContext, job_id: &str, started: BootInstant, why: &GivenUp) -> JobResult {
    let why = match *why {
        GivenUp::Named => {
            warn!(job_id, agent_id = %ctx.cfg.agent_id, "job not started: the edge gave it up while this agent was away (its welcome said so)");
            "not started: the edge had given the job up while this agent was away (its welcome said so: it ended the job, or sent it elsewhere); run it again if it did not end".to_string()
        }
        GivenUp::Away { away, lost_after_ms, carrying } => {
            let away_ms = away.map(|a| a.as_millis() as u64);
            warn!(job_id, agent_id = %ctx.cfg.agent_id, away_ms, lost_after_ms, carrying_bytes = carrying.map(|c| c.bytes), "job not started: held at its start until its deadline (nothing the edge proved was younger than LOST_AFTER_MS)");
            away_words(away, lost_after_ms, carrying)
        }
    };
    // Retryable: nothing ran, nothing was pushed (unsaid, the edge would warn of a push).
    JobResult { retryable: Some(true), ..JobResult::lost(why, started.elapsed().as_millis() as u64) }
}

/// What a job held at its start until its deadline ([`GivenUp::Away`]) says. Connected
/// with bytes the edge has not answered yet, "heard nothing from the edge" was untrue
/// (rev34-4): a large result on a slow but healthy link holds every answer of the edge's
/// behind it — a frame is whole, so no heartbeat goes inside it — and the edge, reading
/// it, was there. The agent cannot tell that edge from a hop that reads and drops (rev30-1),
/// so the job still does not start; its words say which it was not known to be. Those
/// words only when the bytes could account for the silence ([`Carrying::accounts_for`]):
/// a frozen edge behind an open connection, two heartbeats unanswered, was told as a
/// large upload (rev35); it is told as silence, the connection still open.
fn away_words(away: Option<Duration>, lost_after_ms: u64, carrying: Option<Carrying>) -> String {
    let heard = away.map_or("nothing the edge proved".to_string(), |a| format!("the last frame the edge proved it read was written {} ms before", a.as_millis()));
    match carrying {
        Some(c) if away.is_some_and(|a| c.accounts_for(a)) => format!(
            "not started: the connection to the edge was up, but carrying {} bytes this agent had written (a large result or output, at the link's speed) \
             that the edge had not confirmed reading, and no answer of the edge's can come back ahead of them: nothing proved within the {lost_after_ms} ms \
             (LOST_AFTER_MS) after which the edge gives a job up that it still held this one ({heard}), so its start was held until its deadline. \
             The edge was not known gone. Run it again; a timeout_ms longer than the upload ahead of it lets such a job wait it out and start \
             (a faster uplink, or a longer LOST_AFTER_MS on the edge, makes the hold rarer)",
            c.bytes
        ),
        Some(Carrying { bytes, .. }) if bytes > 0 => format!(
            "not started: this agent heard nothing from the edge in the {lost_after_ms} ms (LOST_AFTER_MS) after which the edge gives a job up, and held the job's start until its deadline ({heard}; \
             the connection was still open, the {bytes} bytes written on it unanswered, too few to account for the silence at the slowest uplink served); run it again"
        ),
        _ => format!(
            "not started: this agent heard nothing from the edge in the {lost_after_ms} ms (LOST_AFTER_MS) after which the edge gives a job up, and held the job's start until its deadline ({heard}); run it again"
        ),
    }
}

/// Puts a repository job's commit, diff and push into its result. A diff is given even
/// when Claude failed (it shows what was left half done); a push only when it succeeded.
/// A cancel heard meanwhile (`stop`, not yet used up by Claude's run) stops a push not
/// yet begun, and the job ends cancelled; a push under way is waited for, and the result
/// says how it ended.
#[allow(clippy::too_many_arguments)]
async fn hand_back(
    ctx: &JobContext,
    job_id: &str,
    spec: &JobSpec,
    prepared: crate::repo::Prepared,
    deadline: BootInstant,
    stop: &mut oneshot::Receiver<Stop>,
    result: &mut JobResult,
) {
    result.commit = Some(prepared.commit());
    let mut wanted = spec.clone();
    if !result.success {
        wanted.push_branch = None;
    }
    let handing = Instant::now();
    let give_up_at = deadline.max(BootInstant::now()) + FINISH_GRACE;
    // A stop already heard (it ended Claude's run) is not waited for again: its job failed,
    // so it pushes nothing.
    let mut heard = None;
    let cancel: Option<crate::repo::worker::Cancel<'_>> = (!stop.is_terminated()).then(|| {
        let heard = &mut heard;
        Box::pin(async move { *heard = Some(Stop::ending(stop.await)) }) as crate::repo::worker::Cancel<'_>
    });
    // Its redactor is built in there, right before the git worker stages the changes.
    let finished = prepared.finish(&ctx.repos, &wanted, job_id, &ctx.login, give_up_at, cancel).await;
    // A push's failure comes with the diff made before it.
    let (outcome, failed) = match finished {
        Ok(mut outcome) => {
            let failed = outcome.error.take();
            (outcome, failed)
        }
        Err(e) => (crate::repo::Outcome::default(), Some(e)),
    };
    if wanted.include_diff || wanted.push_branch.is_some() {
        info!(job_id, agent_id = %ctx.cfg.agent_id, ok = failed.is_none(), ms = handing.elapsed().as_millis() as u64, "changes handed back");
    }
    if let Some(patch) = outcome.patch {
        result.diff = Some(patch.text);
        result.diff_truncated = Some(patch.truncated);
        result.files_changed = Some(patch.files);
        result.files_changed_truncated = Some(patch.files_truncated);
    }
    if outcome.pushed_branch.is_some() {
        info!(job_id, agent_id = %ctx.cfg.agent_id, branch = outcome.pushed_branch.as_deref().unwrap_or(""), commit = outcome.pushed_commit.as_deref().unwrap_or("none"), "pushed");
    }
    result.pushed_commit = outcome.pushed_commit;
    result.pushed_branch = outcome.pushed_branch;
    match failed {
        // Stopped by the cancel before its push began: nothing was pushed, and the job
        // ends as a cancel ends it.
        Some(RepoError::HandBackTooSlow { .. }) if heard.is_some() => {
            let ending = heard.take().expect("heard");
            info!(job_id, agent_id = %ctx.cfg.agent_id, ending = ?ending, "the job's push was stopped before it began");
            let ended = claude::result(&Transcript::default(), ending, "", 0);
            result.success = false;
            result.error_code = ended.error_code;
            result.retryable = ended.retryable;
            result.error = ended.error.map(|e| format!("{e}; its changes were not pushed"));
        }
        Some(e) => {
            // Redacted for the log too: it may name a file the job made.
            let said = ctx.login.redactor(crate::now_ms()).redact(&e.to_string());
            warn!(job_id, agent_id = %ctx.cfg.agent_id, error = %said, "could not hand back the job's changes");
            crate::repo::tell_hand_back_failed(result, said);
        }
        None => {}
    }
}

/// Whether the job may resume `session` ([`Sessions::check`]: a lookup in memory).
fn may_resume(ctx: &JobContext, session: &str) -> Result<(), sessions::Refused> {
    match &ctx.sessions {
        Some(records) => records.check(session, &ctx.owner, crate::now_ms()),
        None => Err(sessions::Refused::NoRecord),
    }
}

/// [`workspace::carry_session`], in the blocking pool: it lists every project folder
/// Claude made here (one per job's workspace, so it grows with every job run) and copies a
/// transcript of up to [`workspace::MAX_TRANSCRIPT_BYTES`], and the agent's one runtime
/// thread carries every job's progress and the heartbeats meanwhile.
async fn carry_session(config_dir: &Path, session: &str, cwd: &Path) -> std::io::Result<()> {
    let (config_dir, session, cwd) = (config_dir.to_path_buf(), session.to_string(), cwd.to_path_buf());
    tokio::task::spawn_blocking(move || workspace::carry_session(&config_dir, &session, &cwd))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// Runs Claude in the job's session ([`Session::of`]): its result, and the session to record
/// as the caller's; `None` when the start rule held the start right before the prompt
/// (Claude killed unprompted, its started record cleared: [`start_rule`]).
#[allow(clippy::too_many_arguments)]
async fn run_claude(
    ctx: &JobContext,
    job_id: &str,
    spec: &JobSpec,
    cwd: &std::path::Path,
    deadline: BootInstant,
    stop: &mut oneshot::Receiver<Stop>,
    started: BootInstant,
    watch: &JobWatch,
    cannot_start: &mut Option<CannotStart>,
) -> Option<(JobResult, Option<String>)> {
    let cfg = &ctx.cfg;
    let mut job_env = Vec::new();
    if let Some(dir) = &cfg.claude_config_dir {
        job_env.push(("CLAUDE_CONFIG_DIR".to_string(), dir.clone().into_os_string()));
    }
    let env = process::claude_environment(&ctx.inherited_env, ctx.login.claude_env(crate::now_ms()), job_env);
    let session = Session::of(spec, runtime::entropy);
    let launch = Launch { program: &cfg.claude_bin, args: claude::args(spec, cfg.claude_model.as_deref(), &session), cwd, env, stdin: spec.prompt.clone() };
    // Built again before any line once the login may have changed (`oauth::Login::changed`:
    // a login met since, or the credentials file changed): Claude may rotate the tokens
    // mid-job, and a job can make a new login appear and print the file at once.
    let (mut redactor, mut looked) = ctx.login.redactor_looked(crate::now_ms());
    // Set once the job is found tampering with the login (`oauth::JobWatch`), asked now
    // (a memory of logins full before the job began withholds every job) and with each
    // new redactor (tampering is a login met, which builds one): no event is forwarded
    // from then on.
    let mut withholding = watch.tampering().is_some();
    let mut transcript = Transcript::of(session);
    let mut carry = Carry::default();
    let mut seq = 0u64;
    // Events wait here for their batch (agent_core::progress). The batches are sent from
    // this task, beside Claude's run, on the progress clock's ticks, and the last one when
    // the run ends: every batch is on the uplink before this returns, so before the job's
    // result.
    let batch = Mutex::new(Batch::default());
    let opened = Notify::new();
    let send = |events| ctx.progress.forward(&ctx.link, job_id, &ctx.order_nonce, events);
    let on_line = |line: &[u8]| {
        if ctx.login.changed(&looked) {
            (redactor, looked) = ctx.login.redactor_looked(crate::now_ms());
            if !withholding && watch.tampering().is_some() {
                withholding = true;
                warn!(job_id, agent_id = %ctx.cfg.agent_id, "Claude's credentials file changed into more logins than Claude's refresh makes while the job ran: its events are withheld from now");
            }
        }
        // Redacted as decoded text: each JSON string unescaped, redacted, re-encoded.
        let event = match redactor.redact_line(&String::from_utf8_lossy(line), &mut carry) {
            Ok(value) => transcript.value(value),
            Err(text) => transcript.text(&text),
        };
        if let Some(event) = event.filter(|_| !withholding) {
            // A rejected window waits for the run's end (`Transcript::used_up`): a process
            // that can trace Claude (at `ptrace_scope` 0 a job's) can write this line. Other
            // states hold nothing back and go to the edge at once.
            let window = shared::usage::UsageWindow::from_event(&event, crate::now_ms());
            if let Some(window) = window.filter(|w| w.status != shared::usage::UsageStatus::Rejected) {
                ctx.reporter.saw_usage(window);
            }
            seq += 1;
            let (event, bytes) = forwarded(event, line.len());
            let mut batch = batch.lock().expect("batch lock");
            let opens = batch.is_empty();
            batch.push(seq, event, bytes, send);
            if opens && !batch.is_empty() {
                opened.notify_one();
            }
        }
    };
    let tell = || ctx.progress.tell(&ctx.link, job_id, &ctx.order_nonce, false);
    let timer = send_on_ticks(&batch, &opened, &ctx.progress_clock, &ctx.progress, send, tell);
    // Durably before Claude gets its prompt: if the agent dies now, its next run reports
    // the job lost instead of letting the edge send it again (it may not have heard it
    // started). Written on a trip thread (crate::trips) while Claude starts, which then gives
    // Claude its prompt (process::run).
    // Set when the last look, once the record was written and Claude spawned, said no:
    // the deadline passed, or the start rule said never (given up) or not now (held).
    let not_now = Arc::new(std::sync::OnceLock::new());
    // Set when the records refused the job's started record: the agent's want, whatever
    // the error (`NotRecorded::Records`) — it holds the agent back until the records take
    // the test write ([`job_folders_take_writes`]). Asked whether its folders took a write
    // instead, the agent failed every job alone while one record file took none (a folder
    // put in its place: EISDIR, and the folder took the write). A record refused for the
    // job's own id or nonce, or a start cut short, fails the job alone.
    let records_refused = Arc::new(std::sync::OnceLock::new());
    let ready = {
        let (spool, link, not_now, records_refused) = (ctx.spool.clone(), ctx.link.clone(), Arc::clone(&not_now), Arc::clone(&records_refused));
        let (job_id, nonce) = (job_id.to_string(), ctx.order_nonce.clone());
        move || {
            if let Some(spool) = spool {
                spool.started(&job_id, &nonce).map_err(|e| match e {
                    NotRecorded::Order(_) => format!("could not record that the job starts ({e}), so it was not started; the job's order itself is refused here, not for want of DATA_DIR"),
                    NotRecorded::Records(_) => {
                        let _ = records_refused.set(());
                        format!("could not record that the job starts ({e}), so it was not started; free space in DATA_DIR or fix what the error names there (its permissions, a file in the way), then retry")
                    }
                })?;
            }
            // The last moment before the prompt (written by this thread as this returns,
            // with no wait between): the deadline passed (the record's write, or a
            // suspend, took the rest of it), or the rule saying no, Claude is killed
            // unprompted, as when the record failed.
            if BootInstant::now() >= deadline {
                let _ = not_now.set(LastLook::Late);
                return Err("not started: its deadline passed".to_string());
            }
            match link.start(&job_id, None) {
                Start::Go => Ok(()),
                no => {
                    let _ = not_now.set(LastLook::Rule(no));
                    Err("not started by the start rule".to_string())
                }
            }
        }
    };
    // Told once the record is durable and Claude was spawned: until the edge hears it, it
    // sends the job again if the agent no longer names it (restarted before this), rather
    // than end it lost — and a job whose spawn failed for want of processes goes back
    // unstarted ([`CannotStart`]), which the edge never does once it heard `Started`.
    let told = || {
        if let Some(uplink) = &ctx.uplink {
            ctx.link.seal_and_send(uplink, |key| shared::protocol::AgentMessage::started(job_id, &ctx.order_nonce, key));
        }
    };
    // A record made after the job ended (its start stuck on a DATA_DIR write past its
    // deadline, a cancel or the drain: process::run) goes, on the thread that made it: its
    // job's result may have gone already, and a restart would report it lost.
    let unready = {
        let (spool, job_id) = (ctx.spool.clone(), job_id.to_string());
        move || {
            if let Some(spool) = spool {
                spool.unstart(&job_id);
            }
        }
    };
    let run = process::run(launch, job_id, deadline, spec.timeout_ms, stop, ready, unready, told, on_line);
    let finished = tokio::select! {
        finished = run => finished,
        never = timer => match never {},
    };
    // Whatever ended the run (its end, a cancel, the timeout, Claude's death), what Claude
    // printed goes out.
    let last = batch.lock().expect("batch lock").take();
    let last_went = last.is_some();
    if let Some(events) = last {
        send(events);
    }
    // And how many events were dropped since the last batch that went, if any were.
    ctx.progress.tell(&ctx.link, job_id, &ctx.order_nonce, true);
    if last_went {
        // The connection's task (on the agent's one runtime thread) sends this batch now,
        // and the edge takes it in while the result is made here, rather than after it.
        tokio::task::yield_now().await;
    }
    // Not started at the last look right before the prompt: Claude was killed unprompted.
    // Its started record goes, so a restart does not report the job lost as if it had run;
    // too late or given up, the result says why; held, the caller holds the start (`None`).
    // Not when the job ended first, its start stuck (process::run: its deadline, a stop —
    // heard, not waited for again): that ending is the job's.
    if let (Ending::NotStarted(_), Some(no)) = (&finished.ending, not_now.get()) {
        if let Some(spool) = ctx.spool.clone() {
            let id = job_id.to_string();
            let _ = tokio::task::spawn_blocking(move || spool.unstart(&id)).await;
        }
        return match no {
            LastLook::Late => Some((too_late(ctx, job_id, started, deadline), None)),
            LastLook::Rule(Start::GivenUp(why)) => Some((gave_up_result(ctx, job_id, started, why), None)),
            LastLook::Rule(_) => None,
        };
    }
    // Claude never ran, for want of what the agent needs to start any job: the job goes
    // back unstarted (a job no edge knows of, such as the canary's, fails as it is).
    if ctx.uplink.is_some() {
        match &finished.ending {
            Ending::NotStarted(e) if records_refused.get().is_some() => {
                *cannot_start = Some(CannotStart { why: e.clone(), disk: true, repos: false });
            }
            Ending::NoRoom(e) => {
                let why = format!("it cannot start Claude ({e}): too many processes of its user (its process limit) or too little memory; it tries again after a heartbeat");
                *cannot_start = Some(CannotStart { why, disk: false, repos: false });
            }
            _ => {}
        }
    }
    let stderr = ctx.login.redactor(crate::now_ms()).redact(&finished.stderr);
    let duration_ms = started.elapsed().as_millis() as u64;
    let result = claude::result(&transcript, finished.ending, &stderr, duration_ms);
    info!(job_id, agent_id = %cfg.agent_id, success = result.success, error_code = ?result.error_code, duration_ms, lines = transcript.lines, "claude finished");
    // Told before the result goes, so the edge holds its next work for this agent first.
    match transcript.used_up(&result) {
        Some(window) => ctx.reporter.saw_usage(shared::usage::UsageWindow { seen_at: crate::now_ms(), ..window.clone() }),
        None if transcript.usage.as_ref().is_some_and(|u| u.status == shared::usage::UsageStatus::Rejected) => warn!(
            job_id, agent_id = %cfg.agent_id, error_code = ?result.error_code,
            "Claude's output said the usage window is used up, but the run did not end on the usage limit: not believed (a process that can trace Claude can write into its stdout)"
        ),
        None => {}
    }
    let ours = transcript.session.as_ref().map_or("-", Session::id);
    let session = match transcript.recorded() {
        Ok(session) => {
            if let Some(named) = &transcript.named_other {
                warn!(job_id, agent_id = %cfg.agent_id, session_id = %ours, named = shared::ids::shown_job_id(named), "a line of Claude's output named another session (written by the job, or by another process into Claude's stdout); ignored: the job's session is the one the agent started Claude in");
            }
            session.map(String::from)
        }
        Err(named) => {
            warn!(job_id, agent_id = %cfg.agent_id, session_id = %ours, named = shared::ids::shown_job_id(named), "Claude's init line named a session other than the one the agent started it in, so the job's session is not recorded and cannot be resumed (its result names the agent's); if every job says this, the Claude CLI does not take --session-id: update it");
            None
        }
    };
    Some((result, session))
}

/// Why the last look right before Claude's prompt ([`run_claude`]) did not let it go.
enum LastLook {
    /// The job's deadline had passed.
    Late,
    /// The start rule said never, or not now.
    Rule(Start),
}

/// Sends what `batch` holds at each tick of the progress clock that comes while it holds
/// something; `opened` is told when it starts to. A marker for dropped events waiting
/// with no batch to go with it (Claude fell quiet after a flood, or what went was lost
/// with a connection) goes alone at a tick once the job's budget has room, so followers
/// hear of a gap while Claude is quiet. Runs as long as the job's run (it ends only by
/// being dropped).
async fn send_on_ticks(
    batch: &Mutex<Batch>,
    opened: &Notify,
    clock: &Arc<ProgressClock>,
    progress: &crate::uplink::JobProgress,
    send: impl Fn(Vec<ProgressEvent>),
    tell: impl Fn(),
) -> Infallible {
    loop {
        let waits = !batch.lock().expect("batch lock").is_empty() || progress.marker_waits();
        if !waits {
            tokio::select! {
                _ = opened.notified() => {}
                _ = progress.dropped() => {}
            }
            continue;
        }
        clock.next_tick().await;
        let events = batch.lock().expect("batch lock").take();
        match events {
            Some(events) => send(events),
            None => tell(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{full_disk_verdict, the_disks, FullDisk, Need};
    use crate::repo::mirror::OthersBytes;

    /// Other repositories' mirrors on the disk, all held by jobs (`in_use` bytes).
    fn held(in_use: u64) -> OthersBytes {
        OthersBytes { idle: 0, in_use, own: 0 }
    }
    use crate::workspace::DiskSpace;

    /// The disk's own failings are named by their kind (errno, or the kind a wrapped error
    /// keeps): full, over quota, read-only, failing. Any other error — EPERM or EBUSY on a
    /// leftover, a name the file system refuses, a folder closed to its user — is not, and
    /// is the agent's only if its own folders take no write (`agents_want`).
    /// rev34-4: a job held at its start until its deadline while the connection carried
    /// bytes the edge had not answered says so — the edge was not known gone — not that
    /// the agent heard nothing from the edge; cut off (no connection), it says that.
    #[test]
    fn a_start_held_behind_bytes_in_flight_says_so() {
        let ms = Duration::from_millis;
        let result = Some(Carrying { bytes: 1_000_000, allowance: ms(2_000) });
        let busy = away_words(Some(ms(12_590)), 3_000, result);
        assert!(busy.contains("carrying 1000000 bytes") && busy.contains("The edge was not known gone") && !busy.contains("heard nothing"), "{busy}");
        assert!(busy.contains("written 12590 ms before") && busy.contains("(LOST_AFTER_MS)") && busy.contains("Run it again"), "{busy}");
        for cut in [None, Some(Carrying { bytes: 0, allowance: ms(2_000) })] {
            let said = away_words(None, 3_000, cut);
            assert!(said.starts_with("not started: this agent heard nothing from the edge in the 3000 ms") && said.ends_with("run it again"), "{said}");
        }
    }

    /// rev35: the edge frozen (its host keeps the connection and takes the agent's bytes),
    /// two heartbeats in flight (801 bytes each) and nothing heard for 2.8 s, with beats a
    /// second apart: those bytes go in 0.1 s at the slowest uplink served, and cannot be
    /// why nothing came back. Told as silence, the connection still open; not a large
    /// result, nor "a longer timeout_ms waits it out".
    #[test]
    fn a_start_held_behind_a_few_heartbeats_is_told_as_silence() {
        let ms = Duration::from_millis;
        let beats = Some(Carrying { bytes: 1_652, allowance: ms(2_000) });
        let said = away_words(Some(ms(2_777)), 2_000, beats);
        assert!(said.starts_with("not started: this agent heard nothing from the edge in the 2000 ms") && said.ends_with("run it again"), "{said}");
        assert!(said.contains("connection was still open") && said.contains("1652 bytes") && !said.contains("large result") && !said.contains("timeout_ms"), "{said}");
        // Just within what the bytes take (2000 ms + 1652 B at 16 KiB/s = 100 ms): they may be why.
        assert!(away_words(Some(ms(2_100)), 2_000, beats).contains("carrying 1652 bytes"));
        assert!(!away_words(Some(ms(2_101)), 2_000, beats).contains("carrying 1652 bytes"));
    }

    #[test]
    fn the_disks_failings_are_named_by_their_kind() {
        for errno in [libc::ENOSPC, libc::EDQUOT, libc::EROFS, libc::EIO] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(the_disks(&e), "{e}");
        }
        assert!(the_disks(&std::io::Error::new(std::io::ErrorKind::StorageFull, "named: no room")));
        assert!(the_disks(&std::io::Error::new(std::io::ErrorKind::ReadOnlyFilesystem, "named: read-only")));
        for errno in [libc::EPERM, libc::EBUSY, libc::EACCES, libc::ENAMETOOLONG, libc::ENOTDIR, libc::ELOOP, libc::EISDIR, libc::ENOTEMPTY] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(!the_disks(&e), "{e}");
        }
        assert!(!the_disks(&std::io::Error::other("the job id is not a plain name")));
    }

    /// A checkout is measured before a byte is written, and refused when it does not fit
    /// the free space: one that still filled the disk, with room for it once removed, met
    /// another writer. It was judged too big for the disk for good, not retryable
    /// (rev28-2): a 10 KiB checkout with 1 MiB free. (A disk that takes no write is the
    /// agent's before any verdict: `full_disk`.)
    #[test]
    fn a_full_disk_is_the_repositorys_or_another_writers() {
        let space = |free: u64| Some(DiskSpace { free, size: 16 << 20, free_inodes: None, block: 4096 });
        let meanwhile = FullDisk::Meanwhile { held: false };
        assert_eq!(full_disk_verdict(Some(Need::Measured(10 << 10)), space(1 << 20), held(0)), meanwhile);
        assert_eq!(full_disk_verdict(Some(Need::Measured(2 << 20)), space(1 << 20), held(0)), FullDisk::TooBig);
        // The free space unknown, or the checkout's need: as before.
        assert_eq!(full_disk_verdict(Some(Need::Measured(10 << 10)), None, held(0)), FullDisk::TooBig);
        assert_eq!(full_disk_verdict(None, space(1 << 20), held(0)), FullDisk::TooBig);
    }

    /// rev37-2: two jobs fetching different repositories at once on a disk of 16 MiB, each
    /// about 9: the one that filled it was judged too big for the disk, not retryable,
    /// whatever its estimate, and told to lower the cache for the other's fetch under way.
    /// A fetch estimated to fit with the reserve (0.8 MiB here) in what is free again, or
    /// in that and the mirrors other jobs hold now, met another writer: retryable.
    #[test]
    fn a_fetch_that_fits_beside_what_other_jobs_hold_filled_the_disk_meanwhile() {
        let space = |free: u64| Some(DiskSpace { free, size: 16 << 20, free_inodes: None, block: 4096 });
        let (alone, beside) = (FullDisk::Meanwhile { held: false }, FullDisk::Meanwhile { held: true });
        // The other's fetch failed too, or went elsewhere: 15 MiB free again.
        assert_eq!(full_disk_verdict(Some(Need::Estimated(9 << 20)), space(15 << 20), held(0)), alone);
        // The other's mirror (9 MiB) held by its job: 6 free, and the two fit.
        assert_eq!(full_disk_verdict(Some(Need::Estimated(9 << 20)), space(6 << 20), held(9 << 20)), beside);
        // Past the free space and every held mirror, or the whole disk: too big.
        assert_eq!(full_disk_verdict(Some(Need::Estimated(9 << 20)), space(6 << 20), held(0)), FullDisk::TooBig);
        assert_eq!(full_disk_verdict(Some(Need::Estimated(20 << 20)), space(15 << 20), held(1 << 20)), FullDisk::TooBig);
        // Nothing of its pack had come (no estimate, next to nothing written): room again is
        // another writer's doing.
        assert_eq!(full_disk_verdict(Some(Need::Estimated(0)), space(1 << 20), held(0)), alone);
    }

    /// evict2's leftover: a checkout refused before it was written (`NoRoom`) beside the
    /// mirror another job holds was judged too big for the disk, not retryable, though it
    /// fits once that mirror goes: 5 MiB needed on a disk of 16 with 4 free, another job's
    /// mirror of 6 held. Beside nothing held it fits: retryable; past that too, or with
    /// nothing held to wait for (the idle mirrors made what room they could), too big.
    #[test]
    fn a_checkout_refused_beside_what_other_jobs_hold_waits_for_them() {
        let space = |free: u64| Some(DiskSpace { free, size: 16 << 20, free_inodes: None, block: 4096 });
        let refused = Some(Need::Refused(5 << 20));
        assert_eq!(full_disk_verdict(refused, space(4 << 20), held(6 << 20)), FullDisk::Meanwhile { held: true });
        // Idle mirrors left (the step was judged before any went) count with the held.
        assert_eq!(full_disk_verdict(refused, space(4 << 20), OthersBytes { idle: 1 << 20, in_use: 1 << 20, own: 0 }), FullDisk::Meanwhile { held: true });
        assert_eq!(full_disk_verdict(refused, space(4 << 20), OthersBytes { idle: 6 << 20, in_use: 0, own: 0 }), FullDisk::TooBig);
        assert_eq!(full_disk_verdict(refused, space(4 << 20), held(1 << 20)), FullDisk::TooBig);
        assert_eq!(full_disk_verdict(Some(Need::Refused(20 << 20)), space(4 << 20), held(12 << 20)), FullDisk::TooBig);
        assert_eq!(full_disk_verdict(refused, None, held(6 << 20)), FullDisk::TooBig);
    }

    #[test]
    fn a_checkout_that_failed_for_want_of_room_is_never_kept() {
        let failed = JobResult::failure(ErrorCode::RepoError, "no room", 1);
        assert!(super::kept(&failed, true, false, false), "a failed job's workspace is kept for a post-mortem");
        assert!(!super::kept(&failed, true, false, true), "a checkout that filled the disk is not");
        assert!(!super::kept(&failed, true, true, false) && !super::kept(&failed, false, false, false));
    }


    /// A workspace is removed only once the checkout into it has ended: one cut off by the
    /// job's timeout or a cancel went on writing while the folder was removed, which then
    /// stayed (`Directory not empty`), a checkout's worth of disk a time (hostile review of
    /// repositories, F4).
    #[test]
    fn a_workspace_is_removed_once_the_checkout_into_it_has_ended() {
        let root = std::env::temp_dir().join(format!("leftover-{}", std::process::id()));
        let workspace = root.join("job");
        std::fs::create_dir_all(&workspace).unwrap();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let writing = {
            let workspace = workspace.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                std::fs::write(workspace.join("late.txt"), "written after the job ended").unwrap();
                drop(done_tx);
            })
        };
        let leftover = Leftover { workspace: workspace.clone(), keep: false, job_id: "j".into(), agent_id: "a".into(), checkout_done: Some(done_rx), held: None };
        leftover.clean_up_now();
        writing.join().unwrap();
        assert!(!workspace.exists(), "the workspace outlived its checkout");
        let _ = std::fs::remove_dir_all(&root);
    }


    /// Every word of a result that is not Claude's output is masked, a rename's old path
    /// too (the diff's redaction left it); a plain success never reads the login.
    #[test]
    fn scrub_masks_the_error_and_each_path_and_reads_the_login_only_when_needed() {
        let secret = "sk-ant-oat01-scrub-0123456789";
        let redactor = || std::sync::Arc::new(crate::redact::Redactor::new([secret.to_string()]));
        let mut result = JobResult::failure(ErrorCode::RepoError, format!("`{secret}.bin` is 101 MiB"), 1);
        result.files_changed = Some(vec![shared::job::FileChange {
            path: format!("new-{secret}"),
            status: shared::job::ChangeKind::Renamed,
            old_path: Some(format!("old-{secret}")),
        }]);
        scrub(&mut result, redactor);
        assert!(!serde_json::to_string(&result).unwrap().contains(secret), "{result:?}");
        assert_eq!(result.error.as_deref(), Some("`[REDACTED].bin` is 101 MiB"));
        let mut plain = JobResult { success: true, output: secret.into(), ..Default::default() };
        scrub(&mut plain, || panic!("the login read for a plain success"));
        assert_eq!(plain.output, secret, "Claude's output is redacted as it is read, not here");
    }

    use super::*;
    use shared::protocol::AgentMessage;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The hand-back stopped at the job's deadline plus 20 s and waited 60 s more for a
    /// push under way, against the edge's 30 s margin: the edge told the caller TIMEOUT,
    /// retryable, and the push landed after (hostile review of repository jobs, 1). The
    /// agent's whole hand-back now ends within the default margin, with 2 s to spare for
    /// the result's way to the edge, after the result's wait for its own progress (twice
    /// `MAX_RESULT_WAIT_MS` at most).
    #[test]
    fn a_hand_back_ends_within_the_edges_default_margin() {
        let waits_for_its_progress = 2 * Duration::from_millis(crate::uplink::MAX_RESULT_WAIT_MS);
        let bound = FINISH_GRACE + crate::repo::HAND_BACK_ABANDON + crate::repo::worker::DRAINED_WITHIN + waits_for_its_progress + Duration::from_secs(2);
        assert!(bound <= Duration::from_millis(shared::protocol::DEFAULT_TIMEOUT_MARGIN_MS), "the hand-back may end {bound:?} past timeout_ms");
    }

    /// An event line over [`MAX_EVENT_BYTES`] is forwarded as a summary, which kept the
    /// event's `type` whole: a job could write its own lines into Claude's stdout
    /// (`/proc/<pid>/fd/1` while it was a pipe; now a process that can trace Claude can),
    /// and one line of 16 MiB (the most a line may be) that was all
    /// `type` made a batch the edge refuses unread (over 4 MiB), or a frame over its 8 MiB
    /// limit, at which it closed the agent's connection: every other job's progress and
    /// orders on it went with it, once a line, as often as the job liked.
    #[test]
    fn the_summary_of_an_event_too_large_to_forward_is_small() {
        use shared::protocol::{MAX_FRAME_BYTES, MAX_PROGRESS_BYTES, MAX_PROGRESS_PAYLOAD_BYTES};
        let kind = r"\u0001".repeat(process::MAX_LINE_BYTES / 6 - 4);
        let line = format!(r#"{{"type":"{kind}"}}"#);
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let (summary, bytes) = summarised(&event, line.len());
        assert!(bytes <= MAX_PROGRESS_BYTES, "a summary of {bytes} bytes");
        assert_eq!(summary["truncated"], true);
        assert_eq!(summary["bytes"], line.len());
        let events = vec![ProgressEvent { seq: 1, event: summary }];
        let AgentMessage::Event { envelope } = AgentMessage::progress("j", "j:1", events, &shared::link::MacKey::from_bytes([7; 32])) else {
            unreachable!()
        };
        assert!(envelope.payload.len() <= MAX_PROGRESS_PAYLOAD_BYTES, "a payload of {} bytes", envelope.payload.len());
        let frame = AgentMessage::Event { envelope }.to_text();
        assert!(frame.len() <= MAX_FRAME_BYTES, "a frame of {} bytes", frame.len());
    }

    /// serde_json reads at most 127 levels of nesting (its recursion limit), and an event
    /// sits 3 levels down in its batch: a line a job wrote 126 levels deep was forwarded as
    /// it was, and the edge could not read its batch (`recursion limit exceeded`) and
    /// dropped it whole, with every other event in it, and no word of a gap (hostile review
    /// of the output, 3). Too deep an event goes as a summary; one of ordinary depth as it is.
    #[test]
    fn a_batch_with_a_deeply_nested_event_reads_on_the_edge() {
        use shared::envelope::Domain;
        use shared::protocol::RawProgressReport;
        let nested = |depth: usize| format!(r#"{{"type":"user","x":{}1{}}}"#, "[".repeat(depth - 1), "]".repeat(depth - 1));
        let key = shared::link::MacKey::from_bytes([7; 32]);
        for (depth, whole) in [(126, false), (100, true)] {
            let line = nested(depth);
            let event: serde_json::Value = serde_json::from_str(&line).expect("the agent reads the line");
            let (event, bytes) = forwarded(event, line.len());
            assert!(bytes <= MAX_EVENT_BYTES);
            let others = ProgressEvent { seq: 1, event: serde_json::json!({"type": "assistant"}) };
            let AgentMessage::Event { envelope } = AgentMessage::progress("j", "j:1", vec![others, ProgressEvent { seq: 2, event }], &key) else {
                unreachable!()
            };
            // As the edge opens it (edge/core's `read_report`: each event's text kept as
            // sent), and as a follower then reads the event (a JSON value).
            let report = envelope.open::<RawProgressReport>(Domain::Progress, &key);
            let report = report.unwrap_or_else(|e| panic!("{depth} levels deep: the edge cannot read the batch: {e}"));
            assert_eq!(report.events.len(), 2);
            let event: serde_json::Value = serde_json::from_str(report.events[1].event.get()).unwrap_or_else(|e| panic!("{depth} levels deep: a follower cannot read the event: {e}"));
            let event = &event;
            assert_eq!((event["type"].as_str(), event["truncated"].is_null()), (Some("user"), whole), "{depth} levels deep: {}", shared::text::truncate(&event.to_string(), 200));
        }
    }

    /// Carrying a session over lists every project folder Claude made on this machine (one
    /// per job's workspace: thousands, in time) and copies a transcript of any size. On
    /// the agent's one runtime thread that held every other job's progress and the
    /// heartbeats for as long: it goes to the blocking pool, and the thread's other tasks
    /// run meanwhile.
    #[tokio::test]
    async fn carrying_a_session_leaves_the_runtime_thread_to_the_other_tasks() {
        let root = std::env::temp_dir().join(format!("cr-carry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (config, cwd) = (root.join("config"), root.join("workspaces/job-2"));
        std::fs::create_dir_all(config.join("projects/-old-workspace")).unwrap();
        std::fs::create_dir_all(&cwd).unwrap();
        let transcript = "{\"turn\":1}\n".repeat(1 << 20);
        std::fs::write(config.join("projects/-old-workspace/abc-123.jsonl"), &transcript).unwrap();
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = tokio::spawn({
            let ticks = Arc::clone(&ticks);
            async move {
                loop {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            }
        });
        tokio::task::yield_now().await;
        // The carry can end before this thread polls it once: the system may pause this
        // thread between the copy's start and the first look at it for longer than the copy
        // takes (seen once in CI, with the tests running in parallel on two cores). Carried
        // on this thread, no try lets the ticker run; off it, a try fails only when so
        // paused, and five in a row do not happen.
        let slug: String = cwd.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let copy = config.join("projects").join(slug).join("abc-123.jsonl");
        let mut during = 0;
        for _ in 0..5 {
            let _ = std::fs::remove_file(&copy);
            let before = ticks.load(Ordering::SeqCst);
            carry_session(&config, "abc-123", &cwd).await.unwrap();
            during = ticks.load(Ordering::SeqCst) - before;
            if during > 0 {
                break;
            }
        }
        ticker.abort();
        let copied = std::fs::read_to_string(&copy).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(copied.len(), transcript.len(), "the session was carried over whole");
        assert!(during > 0, "the runtime thread's other tasks ran while the session was carried over");
    }
}
