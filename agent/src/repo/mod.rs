//! Jobs on repositories (`repo_url`): a mirror per repository fetched with git2, a fresh
//! checkout per job, and the job's changes handed back as a diff or a pushed branch.
//!
//! - [`settings`]: `ALLOWED_REPO_HOSTS`, the tokens, the cache limit, the diff cap, the
//!   commit author.
//! - [`layout`]: pure decisions of the cache — mirror folder names, what to evict.
//! - [`claim`]: pure: the room a checkout refused beside other jobs claims for its retry.
//! - [`error`]: every failure as a sentence that says what to do (`REPO_ERROR`).
//! - [`mirror`]: the mirror cache (git2 fetches, per-repository locks, leases, eviction).
//! - [`checkout`]: a job's independent checkout from a mirror; `working_dir` inside it.
//! - [`changes`]: staging, the diff, `files_changed`, the commit and the push.
//! - [`staging`]: the working tree into the index, each file read from a descriptor (never
//!   by its path), measured first; [`untracked`]: its untracked files, listed from
//!   descriptors, `.gitignore` read there too.
//! - [`worker`]: the process each of those libgit2 operations runs in, killed when the job
//!   no longer waits for it.
//!
//! URL rules live in `shared::repo`, so the edge refuses a bad address before queueing.

mod advert;
pub mod changes;
pub mod claim;
pub mod checkout;
pub mod error;
pub mod layout;
pub mod mirror;
pub mod settings;
mod staging;
mod untracked;
pub mod worker;

use crate::redact::Redactor;
use changes::PushTarget;
use error::{local, RepoError};
use mirror::{Lease, MirrorCache, Source};
pub use worker::Outcome;
use worker::{Answer, Cancel, CheckoutWork, Gone, HandBackWork, PushWork, Stop, Work};
use settings::RepoSettings;
use shared::job::{JobResult, JobSpec};
use shared::repo::RepoUrl;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Repos {
    pub settings: RepoSettings,
    cache: Arc<MirrorCache>,
    /// The workspaces of the jobs running now (and of those ended whose workspace is not
    /// yet removed), each with how many jobs hold it and whose it is (a job's repository
    /// and branch: none without `repo_url`): room they hold on their disk, which goes once
    /// they are done ([`Repos::hold_workspace`], [`Repos::other_workspaces_bytes`]).
    workspaces: Held,
    /// The checkouts refused for room other jobs hold, each claiming it for its retry
    /// ([`claim`]): jobs started meanwhile wait ([`Repos::prepare`]).
    claims: std::sync::Mutex<claim::Claims>,
}

/// The most files and folders [`Repos::other_workspaces_bytes`] walks: a few seconds of
/// `stat`s at most on a local disk.
pub const WORKSPACES_WALK: u64 = 200_000;

/// How long [`Repos::other_workspaces_bytes`] walks at most, on a slow disk too.
pub const WORKSPACES_WALK_TIME: std::time::Duration = std::time::Duration::from_secs(2);

type Held = Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, (usize, Option<claim::Claimant>)>>>;

/// A job's pin on its claimant's claim ([`Repos::pin_claim`]): released when dropped, however
/// the job's fetch and checkout ended (a cancel, a panic), so none pins a claim for ever.
pub struct ClaimPin<'a> {
    repos: &'a Repos,
    who: Option<claim::Claimant>,
}

impl Drop for ClaimPin<'_> {
    fn drop(&mut self) {
        if let Some(who) = &self.who {
            self.repos.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unpin(who);
        }
    }
}

/// The room the workspaces of other jobs hold on a disk ([`Repos::other_workspaces_bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeldWorkspaces {
    /// The bytes counted: all they take when `complete`, else what the walk counted
    /// before its budget ran out (less than they take, never more).
    pub bytes: u64,
    /// Whether the walk counted every one of them.
    pub complete: bool,
    /// Whether one of them is a job's of the asking job's repository and branch: room a
    /// claim of its own would not keep from that repository's later jobs (`claim`).
    pub own_jobs: bool,
}

/// A job's hold on its workspace, from before it is made until it is removed (or kept):
/// counted meanwhile as room that job holds ([`Repos::other_workspaces_bytes`]).
pub struct WorkspaceHold {
    workspaces: Held,
    dir: PathBuf,
}

impl Drop for WorkspaceHold {
    fn drop(&mut self) {
        let mut held = self.workspaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((count, _)) = held.get_mut(&self.dir) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.dir);
            }
        }
    }
}

/// What the runner learns of a job's checkout ([`Repos::prepare`]): `started` once it
/// began, and `done` dropped once it has ended (its receiver then resolves), however the
/// job ended meanwhile.
pub struct CheckoutSignals {
    pub started: Arc<AtomicBool>,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// What [`Repos::make_room`] did: how many idle mirrors went, for what need (bytes: a
/// checkout's measured, a fetch's estimated; none known); `could_fit` false when none went
/// because the step could not fit even with every idle mirror gone ([`layout::could_fit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MadeRoom {
    pub evicted: usize,
    pub needs: Option<u64>,
    pub could_fit: bool,
}

/// How long a hand-back given up at the job's end (plus its grace) is waited for before
/// the job ends without knowing how its push ended. With the grace it ends within the
/// edge's default margin (see `runner::FINISH_GRACE`): a push that landed later would
/// land after the edge had told the caller the job timed out.
pub(crate) const HAND_BACK_ABANDON: std::time::Duration = std::time::Duration::from_secs(15);

/// A job's repository, checked out and ready for Claude.
pub struct Prepared {
    lease: Lease,
    url: RepoUrl,
    /// The job's checkout.
    pub dir: PathBuf,
    /// The commit Claude starts from.
    commit: String,
    /// What the checkout's file system can hold ([`checkout::FileSystem`]).
    fs: checkout::FileSystem,
    /// Where Claude starts: `working_dir` inside the checkout.
    pub cwd: PathBuf,
}

impl Repos {
    pub fn open(data_dir: &Path, settings: RepoSettings) -> std::io::Result<Repos> {
        let cache = MirrorCache::open(data_dir.join("repos"), settings.cache_max_bytes)?;
        Ok(Repos { settings, cache, workspaces: Arc::default(), claims: Default::default() })
    }

    /// Counts the job workspace `dir` as room a running job holds until the hold drops
    /// (once the workspace is removed, or kept for a post-mortem), `spec`'s: whose room it
    /// is ([`Repos::claimant`]).
    pub fn hold_workspace(&self, dir: &Path, spec: &JobSpec) -> WorkspaceHold {
        let mut held = self.workspaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.entry(dir.to_path_buf()).or_insert_with(|| (0, Self::claimant(spec))).0 += 1;
        WorkspaceHold { workspaces: Arc::clone(&self.workspaces), dir: dir.to_path_buf() }
    }

    /// The bytes the workspaces of jobs other than the one in `own` take on the disk
    /// holding `on` ([`Repos::hold_workspace`]): room that goes once those jobs are done,
    /// as a mirror a job holds may then go for room (`runner::full_disk`: a checkout
    /// refused beside another job of its own repository was judged too big for the disk,
    /// rev40b-1). Walked on the blocking pool within [`WORKSPACES_WALK`] entries and
    /// [`WORKSPACES_WALK_TIME`] (the workspaces are the jobs' to fill with files), a file
    /// of many names counted once ([`crate::files::disk_usage`]). A walk cut short says so
    /// (`complete` false) with what it counted, less than is held: the caller then takes
    /// the held room at its most (`runner::held_at_most`: the disk's used bytes less the
    /// job's own mirror, never that mirror as held, rev45b-1) and claims nothing (a claim
    /// on a guess held back every other repository). `own_jobs` is asked of `spec`'s
    /// repository and branch.
    pub async fn other_workspaces_bytes(&self, own: &Path, on: &Path, spec: &JobSpec) -> HeldWorkspaces {
        self.other_workspaces_bytes_within(own, on, spec, WORKSPACES_WALK).await
    }

    /// [`Repos::other_workspaces_bytes`] walking at most `entries` files and folders.
    async fn other_workspaces_bytes_within(&self, own: &Path, on: &Path, spec: &JobSpec, entries: u64) -> HeldWorkspaces {
        let who = Self::claimant(spec);
        let dirs: Vec<(PathBuf, bool)> = {
            let held = self.workspaces.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mine = |whose: &Option<claim::Claimant>| who.is_some() && whose == &who;
            held.iter().filter(|(dir, _)| dir.as_path() != own).map(|(dir, (_, whose))| (dir.clone(), mine(whose))).collect()
        };
        let none = HeldWorkspaces { bytes: 0, complete: true, own_jobs: false };
        if dirs.is_empty() {
            return none;
        }
        let (on, own) = (on.to_path_buf(), own.to_path_buf());
        let walk = move || {
            let dirs: Vec<(PathBuf, bool)> = dirs.into_iter().filter(|(dir, _)| mirror::same_disk(dir, &on)).collect();
            let own_jobs = dirs.iter().any(|(_, mine)| *mine);
            let dirs: Vec<PathBuf> = dirs.into_iter().map(|(dir, _)| dir).collect();
            let budget = crate::files::WalkBudget { entries, until: Some(std::time::Instant::now() + WORKSPACES_WALK_TIME) };
            let usage = crate::files::disk_usage(&dirs, budget);
            if !usage.complete {
                tracing::warn!(workspace = %own.display(), walked_bytes = usage.bytes, "the walk of other jobs' workspaces ran out of its budget: the room they hold is taken at its most (the disk's used bytes less this job's mirror), and claimed for no retry");
            }
            HeldWorkspaces { bytes: usage.bytes, complete: usage.complete, own_jobs }
        };
        tokio::task::spawn_blocking(walk).await.unwrap_or(HeldWorkspaces { complete: false, ..none })
    }

    /// Whose claim on room a job of `spec` would make or wait behind ([`claim`]): its
    /// repository (as the agent names it) and branch. None without a valid `repo_url`.
    pub(crate) fn claimant(spec: &JobSpec) -> Option<claim::Claimant> {
        let url = RepoUrl::parse(spec.repo_url.as_deref()?).ok()?;
        Some(claim::Claimant::of(&url, spec))
    }

    /// Pins the claim of `spec`'s repository and branch while a job of it fetches and checks
    /// out ([`claim::Claims::pin`]): until the guard is dropped, after [`Repos::settle_claim`].
    pub fn pin_claim(&self, spec: &JobSpec) -> ClaimPin<'_> {
        let who = Self::claimant(spec);
        if let Some(who) = &who {
            self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pin(who, crate::boot_clock::BootInstant::now());
        }
        ClaimPin { repos: self, who }
    }

    /// Whether `who`'s job, to be checked out into `workspace`, may go on ([`claim::Claims::admit`]).
    /// The disk is read (on the blocking pool) only while a claim stands.
    async fn admit(&self, who: claim::Claimant, workspace: &Path) -> claim::Admit {
        let now = crate::boot_clock::BootInstant::now;
        if !self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stand(now()) {
            return claim::Admit::Go;
        }
        let workspaces = workspace.parent().unwrap_or(workspace).to_path_buf();
        let space = tokio::task::spawn_blocking(move || crate::workspace::disk_space(&workspaces).ok()).await.ok().flatten();
        self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner).admit(&who, now(), space)
    }

    /// How a job of `spec` whose fetch and checkout ended (`refused`: the error it ended
    /// with; none, checked out) bears on the claims ([`claim`]): refused for room other
    /// jobs hold ([`RepoError::RoomHeld`]) whose verdict allows a claim
    /// ([`error::RoomClaim::Wanted`]), it claims that room for its retry (its place kept if
    /// it has a claim), and the error says whether it does; refused so without one (held
    /// by its own repository's jobs, or counted in part only), its claim, if any, ends;
    /// held back by an older claim ([`RepoError::RoomClaimed`]), its own
    /// claim stays as [`Repos::prepare`] renewed it; through, or ended any other way (a
    /// cancel, another error), its claim ends.
    pub fn settle_claim(&self, spec: &JobSpec, refused: Option<&mut RepoError>) {
        let Some(who) = Self::claimant(spec) else { return };
        let mut claims = self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match refused {
            Some(RepoError::RoomHeld { needed, claim, .. }) => {
                if *claim == error::RoomClaim::Wanted {
                    let made = claims.refused(&who, *needed, crate::boot_clock::BootInstant::now());
                    *claim = if made { error::RoomClaim::Made } else { error::RoomClaim::TooMany };
                } else {
                    // A claim made at an earlier refusal would be renewed at each retry
                    // ([`claim::Claims::admit`]), holding the other repositories back for
                    // room that claim does not keep.
                    claims.settled(&who);
                }
            }
            Some(RepoError::RoomClaimed { .. }) => {}
            _ => claims.settled(&who),
        }
    }

    /// What a job is told of `REPO_CACHE_MAX_BYTES` when its repository does not fit the
    /// disk: named only while idle mirrors of other repositories stay on that disk
    /// (`idle_others`): lowered, fewer of them take it. One a job holds or fetches now is
    /// that job's, and goes for room once it is done (rev37-2); with none at all, lowering
    /// the cache frees nothing (rev40b-1).
    fn lower_cache(&self, idle_others: bool) -> String {
        match idle_others {
            true => format!(", lower REPO_CACHE_MAX_BYTES ({} bytes: the mirrors of other repositories kept on that disk)", self.settings.cache_max_bytes),
            false => String::new(),
        }
    }

    /// [`RepoError::NoRoom`] with its words on the cache ([`Repos::lower_cache`]) set, and
    /// on room other jobs hold counted in part only (`uncounted`).
    pub fn no_room(&self, url: String, what: String, needed: Option<u64>, idle_others: bool, uncounted: bool) -> RepoError {
        RepoError::NoRoom { url, what, needed, lower: self.lower_cache(idle_others), uncounted }
    }

    /// Clears what an agent killed mid-fetch left in the mirrors (see
    /// [`MirrorCache::recover`]). Only the agent calls it, once, before its first job.
    pub async fn recover(&self) {
        self.cache.recover().await;
    }

    /// The mirrors' folder, `DATA_DIR/repos`.
    pub fn root(&self) -> &Path {
        self.cache.root()
    }

    /// The repositories whose mirror this agent holds (names as `shared::repo::RepoUrl::name`).
    pub fn mirror_names(&self) -> Vec<String> {
        self.cache.mirror_names()
    }

    /// [`Repos::mirror_names`] as the disk has them now (for a hello: see
    /// [`MirrorCache::mirror_names_from_disk`]).
    pub fn mirror_names_from_disk(&self) -> Vec<String> {
        self.cache.mirror_names_from_disk()
    }

    fn source(&self, url: &RepoUrl) -> Source {
        Source {
            name: url.name(),
            url: url.url(),
            host: url.host().to_string(),
            token: self.settings.token_for(url.host()).cloned(),
            max_bytes: self.settings.max_fetch_bytes,
        }
    }

    /// The error of a job whose fetch (`checking_out` false) or checkout of `repo_url`
    /// filled the disk, though it had room once what it wrote was removed: the repository
    /// needs more than the disk has free. `REPO_CACHE_MAX_BYTES` is named when the cache
    /// keeps mirrors of other repositories (lowered, fewer of them take that disk).
    /// `uncounted`: judged on room other jobs hold counted in part only.
    pub fn too_big_for_disk(&self, repo_url: &str, checking_out: bool, detail: String, idle_others: bool, uncounted: bool) -> RepoError {
        let lower = self.lower_cache(idle_others);
        let step = if checking_out { "checkout" } else { "fetch" };
        RepoError::TooBigForDisk { url: repo_url.to_string(), detail, lower, step: step.into(), uncounted }
    }

    /// What the mirrors of repositories other than `repo_url`'s take on disk, idle and in
    /// use ([`MirrorCache::others_bytes`]): for the verdict on a full disk (`runner::full_disk`).
    pub async fn others_bytes(&self, repo_url: &str) -> mirror::OthersBytes {
        let keep = RepoUrl::parse(repo_url).map(|u| layout::folder(&u.name())).unwrap_or_default();
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || cache.others_bytes(&keep, crate::now_ms())).await.unwrap_or_default()
    }

    /// Makes room for a job whose fetch (`checking_out` false) or checkout of `repo_url` ran
    /// out of it (`error`, a [`RepoError::DiskFull`] or [`RepoError::NoRoom`]) for the
    /// `round`th time: idle mirrors of other repositories on that disk go, least recently
    /// used first, as much as [`layout::room_to_make`] says — until the checkout's measured
    /// need fits with its reserve (`checkout::fits_with_reserve`); for a fetch, until what
    /// it is estimated to need from how far it got does (`layout::fetch_needs`), at least
    /// one mirror a round, every idle one at its last. None goes when that need could not
    /// fit even with every idle mirror gone ([`layout::could_fit`]): the step is judged at
    /// once. Returns how many went (none: trying again would end the same) and the need they
    /// went for. The mirrors are a cache, and a job refused (or an agent held back) for the
    /// room they took was refused for nothing (rev28-5); but the cache emptied for one large
    /// fetch made every other repository's next job clone cold, and emptied for one that
    /// could never fit bought nothing (rev37-3).
    pub async fn make_room(&self, repo_url: &str, checking_out: bool, error: &RepoError, workspaces: &Path, round: u32) -> MadeRoom {
        let none = MadeRoom { evicted: 0, needs: None, could_fit: true };
        let needs = match error {
            RepoError::DiskFull { needed, .. } if checking_out => *needed,
            RepoError::DiskFull { fetch_needs, .. } => *fetch_needs,
            // Short of files and folders, not bytes: the mirrors free few of those.
            RepoError::NoRoom { needed: None, .. } => return none,
            RepoError::NoRoom { needed, .. } => *needed,
            _ => return none,
        };
        let Some(room) = layout::room_to_make(checking_out, needs, round) else { return none };
        let keep = RepoUrl::parse(repo_url).map(|u| layout::folder(&u.name())).unwrap_or_default();
        let on = if checking_out { workspaces.to_path_buf() } else { self.cache.root().to_path_buf() };
        let cache = Arc::clone(&self.cache);
        let made = tokio::task::spawn_blocking(move || {
            let now = crate::now_ms();
            // Judged before any goes: a fetch estimated past the whole disk (a hostile count
            // of objects announced) emptied the cache, then failed all the same (rev37-3).
            let hopeless = needs.is_some_and(|needs| crate::workspace::disk_space(&on).is_ok_and(|space| !layout::could_fit(needs, space, cache.others_bytes(&keep, now).idle)));
            if hopeless {
                return MadeRoom { evicted: 0, needs, could_fit: false };
            }
            let enough = |evicted: usize| match room {
                layout::Room::All => false,
                layout::Room::Bytes { bytes, at_least_one } => {
                    (evicted > 0 || !at_least_one) && crate::workspace::disk_space(&on).is_ok_and(|space| checkout::fits_with_reserve(bytes, space))
                }
            };
            MadeRoom { evicted: cache.evict_for_room(&keep, &on, &enough, now), needs, could_fit: true }
        });
        made.await.unwrap_or(MadeRoom { needs, ..none })
    }

    /// Checks the host, holds the job back while an older claim on room stands
    /// ([`claim`]: [`RepoError::RoomClaimed`]), brings the mirror up to date and makes the job's checkout in
    /// `workspace` (which must be empty), each in a git worker ([`worker`]). Dropping the
    /// future kills the worker at work; `checkout` says when a checkout began and when it
    /// has ended, its worker dead: the workspace is removed only then, and the mirror's
    /// lease is held until then (a checkout cut off by a timeout or a cancel once went on
    /// writing into a folder being removed, which stayed, its mirror open to eviction).
    pub async fn prepare(&self, spec: &JobSpec, workspace: &Path, checkout: CheckoutSignals) -> Result<Prepared, RepoError> {
        let text = spec.repo_url.as_deref().unwrap_or_default();
        // The edge checked it; the side that fetches checks again.
        let url = RepoUrl::parse(text).map_err(|e| local("read repo_url", e))?;
        if !self.settings.host_allowed(&url) {
            return Err(RepoError::HostNotAllowed { host: url.host().to_string() });
        }
        // Before the fetch: its lease would keep the mirror it reads from going for room
        // a refused checkout claims, its checkout take the room freed (rev40b-2).
        let claimed = self.admit(claim::Claimant::of(&url, spec), workspace).await;
        if let claim::Admit::Behind(c) = claimed {
            return Err(c.refusal(&url.url(), false));
        }
        let lease = self.cache.acquire(self.source(&url), spec.allow_stale).await?;
        if let Some(branch) = &spec.push_branch {
            // Refused before Claude runs, not after it worked for nothing. Which branch is the
            // default one only this job's fetch says (the mirror's `HEAD` is a job's to
            // rewrite, and an earlier fetch's answer may be out of date).
            if lease.stale {
                return Err(RepoError::PushNeedsFetch { url: url.url() });
            }
            if lease.default_branch().as_deref() == Some(branch.as_str()) {
                return Err(RepoError::PushToDefault { branch: branch.clone() });
            }
        }
        let work = CheckoutWork {
            mirror: lease.dir.clone(),
            fetched: lease.fetched.for_checkout(spec.branch.as_deref()),
            dir: workspace.to_path_buf(),
            branch: spec.branch.clone(),
            url: url.url(),
            max_bytes: self.settings.max_checkout_bytes,
            working_dir: spec.working_dir.clone(),
            claimed: match claimed {
                claim::Admit::Beside(c) => Some(c),
                _ => None,
            },
        };
        let CheckoutSignals { started, done } = checkout;
        started.store(true, Ordering::SeqCst);
        // `done` and the lease go once the worker is dead (answered, or killed with this
        // future): the workspace is the runner's again then.
        let (answer, (done, lease)) = worker::run(Work::Checkout(work), (done, lease), "check out the repository", None).await;
        drop(done);
        match answer? {
            Answer::CheckedOut(made) => {
                let made = match made {
                    Err(e @ RepoError::MirrorBroken { .. }) => {
                        // The next fetch makes the mirror anew instead of every job failing.
                        lease.broken().await;
                        return Err(e);
                    }
                    made => made?,
                };
                Ok(Prepared { lease, url, dir: workspace.to_path_buf(), commit: made.commit, fs: made.fs, cwd: made.cwd })
            }
            other => Err(other.unexpected("check out the repository")),
        }
    }
}

impl Prepared {
    /// The commit Claude started from.
    pub fn commit(&self) -> String {
        self.commit.clone()
    }

    /// The job ran on the mirror's last fetched state because a fetch failed.
    pub fn stale(&self) -> bool {
        self.lease.stale
    }

    /// How long bringing the mirror up to date took.
    pub fn fetch_ms(&self) -> u64 {
        self.lease.fetch_ms
    }

    /// After Claude: the diff (`include_diff`) and the push (`push_branch`). `login`'s
    /// redactor masks the diff and refuses to push changes that hold a token: built here,
    /// right before the git worker stages the changes, and looked at again once they are
    /// staged ([`masks_again`]).
    ///
    /// At `give_up_at`, or once `cancel` resolves (the job cancelled), the work is told to
    /// stop at its next step (a push not yet under way never starts) and is then waited
    /// for: a push the server is already taking ends first, so the answer says what
    /// happened, and nothing lands after it.
    pub async fn finish(self, repos: &Repos, spec: &JobSpec, job_id: &str, login: &crate::oauth::Login, give_up_at: crate::boot_clock::BootInstant, cancel: Option<Cancel<'_>>) -> Result<Outcome, RepoError> {
        if !spec.include_diff && spec.push_branch.is_none() {
            return Ok(Outcome::default());
        }
        // Built now, not at Claude's end: the output's redaction and the checks since took
        // time in which a process the job left could make a new login appear (hostile
        // review rev40a, 4).
        let (redactor, looked) = login.redactor_looked(crate::now_ms());
        let settings = &repos.settings;
        let source = repos.source(&self.url);
        let push = spec.push_branch.clone().map(|branch| PushWork {
            target: PushTarget { url: source.url.clone(), host: source.host.clone(), token: source.token.clone(), branch, default_branch: self.lease.default_branch() },
            author_name: settings.author_name.clone(),
            author_email: settings.author_email.clone(),
            message: spec.commit_message.clone().unwrap_or_else(|| format!("Changes by Claude Runner job {job_id}")),
        });
        let work = HandBackWork {
            dir: self.dir.clone(),
            base: self.commit.clone(),
            fs: self.fs,
            diff_max_bytes: spec.include_diff.then_some(settings.max_diff_bytes),
            push,
            redactor,
        };
        // At `give_up_at` the worker is asked to stop; a push under way is waited for, so
        // the result says how it ended on the server; bounded, since libgit2 may not return
        // (a server sending a byte at a time): then the worker is killed. A worker given up
        // on, or lost (a job killed it), once it said its push was going out may have
        // pushed; before that, nothing was.
        let stop = Stop {
            at: give_up_at,
            cancel,
            then_within: HAND_BACK_ABANDON,
            gone: hand_back_gone(source.url.clone(), spec.push_branch.is_some()),
            masks_again: Some(masks_again(login, looked)),
        };
        // The lease (the mirror the checkout borrows objects from) is held until the worker is dead.
        let (answer, _lease) = worker::run(Work::HandBack(work), self.lease, "collect the job's changes", Some(stop)).await;
        match answer? {
            Answer::HandedBack(outcome) => outcome,
            other => Err(other.unexpected("collect the job's changes")),
        }
    }
}

/// A hand-back's redactor again once the worker has staged the changes, if `login` changed
/// since the one sent with the work was built (`looked`): a login that appeared meanwhile
/// (a process the job left writes it into the credentials file) may be in what was staged,
/// and was in the diff unmasked, and pushed (review rev42-4). The same look as the one
/// before each line of Claude's output ([`crate::oauth::Login::changed`]).
pub(crate) fn masks_again(login: &crate::oauth::Login, looked: crate::oauth::Looked) -> worker::MasksAgain<'_> {
    Box::new(move || login.changed(&looked).then(|| login.redactor(crate::now_ms())))
}

/// What a job is told of a hand-back's worker that went without an answer ([`Gone`]): a
/// push may have reached the server `url` only if one was asked for and the worker had said
/// it was going out; otherwise nothing was pushed.
fn hand_back_gone(url: String, push_asked: bool) -> Box<dyn Fn(Gone) -> RepoError + Send + Sync> {
    Box::new(move |gone| {
        let url = url.clone();
        match gone {
            Gone::GivenUp { pushing } if pushing && push_asked => RepoError::HandBackAbandoned { url },
            Gone::GivenUp { .. } => RepoError::HandBackTooSlow { url },
            Gone::Died { pushing, .. } if pushing && push_asked => RepoError::HandBackLost { url },
            Gone::Died { error, .. } => error,
        }
    })
}

/// In the git worker: the job's working tree staged once ([`changes::stage`]), its diff
/// (`include_diff`, masked by `redactor`, or by the one `masks_again` gives once staged)
/// made from what was staged, then its commit and push (`push_branch`). A push that fails leaves the diff in the outcome, beside its error
/// (it was thrown away with it, a refusal for a secret too).
///
/// A diff asked for is made whatever the agent's stop (`abort`), as when the diff read the
/// working tree itself: the stop is the push's, heard before each of its steps. Staging
/// for it is bounded: a diff alone reads at most [`changes::MAX_DIFF_READ_BYTES`] of the
/// files, kept in memory (the rest shown unread, the diff cut), a push
/// [`changes::MAX_PUSH_BYTES`] (more is refused, and staged as for a diff alone).
fn hand_back(work: HandBackWork, abort: &AtomicBool, begins: &dyn Fn() -> bool, masks_again: &dyn Fn() -> Result<Option<Vec<String>>, RepoError>) -> Result<Outcome, RepoError> {
    let HandBackWork { dir, base, fs, diff_max_bytes, push, redactor } = work;
    let base = git2::Oid::from_str(&base).map_err(|e| error::git("collect the job's changes", &e))?;
    let mut outcome = Outcome::default();
    let unstopped = AtomicBool::new(false);
    // A diff alone reads at most `MAX_DIFF_READ_BYTES` of the files and writes none of them
    // to disk; a push at most `MAX_PUSH_BYTES`.
    let staged = match changes::stage_for(&dir, base, fs, push.is_some(), if diff_max_bytes.is_some() { &unstopped } else { abort }) {
        Ok(staged) => staged,
        // No diff asked for: the push's failure, as any other of its steps'.
        Err(e) if diff_max_bytes.is_none() => {
            let given_up = abort.load(Ordering::SeqCst);
            outcome.error = Some(match push {
                Some(push) if given_up => RepoError::HandBackTooSlow { url: push.target.url },
                _ => e,
            });
            return Ok(outcome);
        }
        Err(e) => return Err(e),
    };
    // A login that appeared while the changes were staged is not in the redactor built
    // before: the agent looks again, and the diff and the push's check use its new one.
    // The old one let go before the new one is made: both at once took twice the memory.
    let redactor = match masks_again()? {
        Some(secrets) => {
            drop(redactor);
            Arc::new(Redactor::new(secrets))
        }
        None => redactor,
    };
    if let Some(max_bytes) = diff_max_bytes {
        let mut patch = staged.patch(max_bytes)?;
        // The paths are redacted with the result's other words (`runner::scrub`).
        patch.text = redactor.redact(&patch.text);
        outcome.patch = Some(patch);
    }
    if let Some(push) = push {
        let branch = push.target.branch.clone();
        match push_changes(&staged, push, &redactor, abort, begins) {
            Ok(commit) => {
                outcome.pushed_commit = commit;
                outcome.pushed_branch = Some(branch);
            }
            Err(e) => outcome.error = Some(e),
        }
    }
    Ok(outcome)
}

/// The job's commit of `staged` and its push (`push_branch`), refused when they would carry
/// a secret, or what a push may not ([`changes::Staged::pushable`]): the commit pushed
/// (None when nothing changed). `abort` (the agent's stop) is checked before each step: a
/// push not yet under way never starts. `begins` tells the agent a push is about to go out
/// (see [`changes::Staged::push`]).
fn push_changes(staged: &changes::Staged, push: PushWork, redactor: &Redactor, abort: &AtomicBool, begins: &dyn Fn() -> bool) -> Result<Option<String>, RepoError> {
    let PushWork { target, author_name, author_email, message } = push;
    let given_up = || abort.load(Ordering::SeqCst);
    let too_slow = || RepoError::HandBackTooSlow { url: target.url.clone() };
    if given_up() {
        return Err(too_slow());
    }
    staged.pushable()?;
    if staged.adds_secret(|line| redactor.redact(line) != line)? {
        return Err(RepoError::SecretInChanges);
    }
    let Some(commit) = staged.commit(&author_name, &author_email, &message)? else { return Ok(None) };
    if given_up() {
        return Err(too_slow());
    }
    // Given up meanwhile, a push in doubt stays in doubt: it may have landed.
    staged.push(&target, commit, abort, begins).map_err(|e| if given_up() && !matches!(e, RepoError::PushInDoubt { .. }) { too_slow() } else { e })?;
    Ok(Some(commit.to_string()))
}

/// Tells `result` that handing back the job's changes failed (`said`, redacted): a REPO_ERROR
/// for a job Claude did, after the failure already told for one it did not (which stays the
/// result's own: its code, its words first).
pub fn tell_hand_back_failed(result: &mut JobResult, said: String) {
    if result.success {
        result.success = false;
        result.error_code = Some(shared::contract::ErrorCode::RepoError);
        result.error = Some(said);
        return;
    }
    let told = result.error.take().filter(|e| !e.is_empty());
    let also = format!("the job's changes could not be handed back either: {said}");
    result.error = Some(told.map_or(also.clone(), |told| format!("{told}; {also}")));
}

/// Shrinks a result that would not fit in `max_bytes` of its frame (a WebSocket frame,
/// with room for the message around it): the diff is cut further (`diff_truncated`), then
/// the file list. JSON escaping can make a diff under `MAX_DIFF_BYTES` larger than the
/// frame — twice over: see [`framed_len`].
pub fn fit_result(result: &mut JobResult, max_bytes: usize) {
    for _ in 0..8 {
        let size = framed_len(result);
        if size <= max_bytes {
            return;
        }
        let over = size - max_bytes;
        match &mut result.diff {
            Some(diff) if !diff.is_empty() => {
                let keep = diff.len().saturating_sub(over + 1024);
                let cut = shared::text::truncate(diff, keep);
                // On a line boundary, as MAX_DIFF_BYTES cuts.
                let cut = cut.rfind('\n').map_or("", |i| &cut[..=i]);
                *diff = cut.to_string();
                result.diff_truncated = Some(true);
            }
            _ => match &mut result.files_changed {
                Some(files) if !files.is_empty() => {
                    files.truncate(files.len() / 2);
                    result.files_changed_truncated = Some(true);
                }
                _ => return,
            },
        }
    }
}

/// The bytes `result` takes in its frame. Its JSON text goes as the payload of a MACed
/// envelope ([`shared::envelope::Tagged`]), a JSON string itself, where each `"` and `\`
/// of the text takes two bytes (serde_json leaves no raw control character in it to be
/// escaped again): a diff of quotes and backslashes takes four bytes a character there.
fn framed_len(result: &JobResult) -> usize {
    serde_json::to_string(result).map_or(usize::MAX, |text| text.len() + text.bytes().filter(|b| matches!(b, b'"' | b'\\')).count())
}

#[cfg(test)]
mod tests;
