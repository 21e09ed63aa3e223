//! The mirror cache: one bare mirror per repository under `DATA_DIR/repos`, fetched with
//! git2 (never a `git` subprocess) when a job uses it.
//!
//! - One fetch at a time per repository: a per-repository async lock, held until the git
//!   worker that fetches ([`super::worker`]) is dead — answered, or killed with the job that
//!   gave up on it — never while it may still write. Jobs on different repositories fetch
//!   in parallel.
//! - A fetch runs while other jobs' checkouts open and read the mirror (they hold a
//!   [`Lease`], not the lock): at each of its steps the mirror stays a repository libgit2
//!   opens, its objects and `HEAD`, `refs` and `config` there ([`reset_files`]).
//! - A job that waited while another fetched *after* it asked takes that fetch's result
//!   instead of fetching again.
//! - A failed fetch with a usable mirror runs the job on the last fetched state only when
//!   the job allows it (`allow_stale`), and only on a state this agent fetched since it
//!   started ([`Fetched`], in memory).
//! - Every job holds a [`Lease`] on its mirror until it ends; after each fetch the least
//!   recently used mirrors without a lease go until the cache fits `REPO_CACHE_MAX_BYTES`.
//! - Tokens reach libgit2 only through the credentials callback: no remote is ever
//!   written into a mirror's config (fetches use anonymous remotes), no URL carries one.
//! - A job can find its mirror (its checkout's `objects/info/alternates` names it) and
//!   write to it, as the agent's user. So a fetch reads no git config file ([`own_config`]),
//!   each use puts back the mirror's config file and removes what the agent never writes
//!   there ([`reset_files`]), the refs a fetch negotiates with are only those the agent's
//!   last fetch found (kept in memory, [`Fetched`]; none after a restart: the mirror is
//!   made anew), and a checkout resolves `branch` against that record, never against the
//!   mirror's refs on disk.

use super::error::{local, one_line, AuthSeen, RepoError, Talk};
use super::layout::{self, MirrorUse, NAME_FILE, USED_FILE};
use super::settings::Token;
use super::worker::{self, Answer, FetchAnswer, Work};
use git2::{AutotagOption, Cred, CredentialType, Direction, ErrorClass, FetchOptions, Oid, RemoteCallbacks, RemoteRedirect, Repository};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{info, warn};

/// What a mirror keeps of its repository.
const REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
/// libgit2 gives up on a server that accepts no connection, or sends nothing, this long.
/// A job's own timeout ends its wait sooner; this bounds the fetch thread left behind.
const CONNECT_TIMEOUT_MS: i32 = 15_000;
const READ_TIMEOUT_MS: i32 = 30_000;
/// The most branches and tags one fetch may bring. Each is kept in the agent's memory
/// ([`Fetched`], for as long as the mirror stays) and written into the mirror: a
/// repository of 200,000 tags took 35 MB of the agent's memory, and each of its fetches
/// held its lock for minutes (rev11, 3).
pub const MAX_FETCH_REFS: usize = 100_000;

/// Where a repository comes from, as a fetch needs it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Source {
    /// [`shared::repo::RepoUrl::name`].
    pub name: String,
    pub url: String,
    /// [`shared::repo::RepoUrl::host`]: named in errors.
    pub host: String,
    pub token: Option<Token>,
    /// The most bytes a fetch of it may receive (`REPO_MAX_FETCH_BYTES`).
    pub max_bytes: u64,
}

pub struct MirrorCache {
    root: PathBuf,
    max_bytes: u64,
    entries: Mutex<HashMap<String, Entry>>,
    /// One eviction pass at a time.
    evicting: Mutex<()>,
    /// Counts the changes to the set of mirrors (a fetch that may have made or removed
    /// one, an eviction, a removal at start), each counted once it is done.
    changes: AtomicU64,
    /// The names as last read from disk, and the count of changes they reflect: every
    /// job's end asks for them (a job that made or evicted a mirror changes what the edge
    /// is told), and only a change makes the folders be read again.
    names: Mutex<Option<(u64, Vec<String>)>>,
    /// Packs a mirror holds before it is repacked ([`layout::REPACK_AT_PACKS`]).
    repack_at: usize,
    /// A repack runs (one at a time, whatever the mirror: it takes a core).
    repacking: AtomicBool,
}

#[derive(Default)]
struct Entry {
    /// Leases and running fetches.
    users: usize,
    lock: Arc<tokio::sync::Mutex<FetchState>>,
    /// A repack of the mirror runs ([`MirrorCache::repack`]): it is not evicted meanwhile.
    repacking: bool,
    /// The packs the mirror held when its last repack failed (or ran past
    /// [`REPACK_WITHIN`]): the next is tried once it holds twice as many, not at every fetch.
    repack_failed_at: Option<usize>,
}

impl Entry {
    /// A job holds the mirror or waits for it, or a repack reads it: it is not evicted.
    fn in_use(&self) -> bool {
        self.users > 0 || self.repacking
    }
}

#[derive(Default)]
struct FetchState {
    /// The last successful fetch, while the mirror holds what it found.
    last: Option<LastFetch>,
}

/// A successful fetch: when it started, and what it found.
struct LastFetch {
    started: Instant,
    found: Arc<Fetched>,
}

/// What a fetch found on the server: the refs the mirror holds after it, and the default
/// branch. The agent's own record, in memory: a job can move the mirror's refs on disk
/// between a fetch and a later job's checkout, not this. The next fetch puts these back as
/// the mirror's refs before it negotiates ([`put_back_refs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fetched {
    /// `refs/heads/…` and `refs/tags/…`, each to its object's id in hex: read as a
    /// `git2::Oid` only in a git worker, since the agent runs no libgit2 (its set-up writes
    /// the environment and takes locks a zygote forked again from the agent would copy).
    pub refs: HashMap<String, String>,
    /// `refs/heads/<default branch>`.
    pub head: String,
}

impl Fetched {
    /// Only what a checkout of `branch` looks up (the ref it may name, as a branch or a
    /// tag, and the default branch's): a repository may have a million tags, and the
    /// checkout's request need not carry them.
    pub fn for_checkout(&self, branch: Option<&str>) -> Fetched {
        let mut names = vec![self.head.clone()];
        if let Some(branch) = branch {
            names.extend([format!("refs/heads/{branch}"), format!("refs/tags/{branch}")]);
        }
        let refs = names.into_iter().filter_map(|name| self.refs.get(&name).cloned().map(|id| (name, id))).collect();
        Fetched { refs, head: self.head.clone() }
    }
}

/// Keeps a mirror from being evicted while it lives.
struct Hold {
    cache: Arc<MirrorCache>,
    folder: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut entries = self.cache.entries.lock().expect("mirror entries");
        if let Some(e) = entries.get_mut(&self.folder) {
            e.users = e.users.saturating_sub(1);
        }
    }
}

/// A job's hold on its repository's mirror.
pub struct Lease {
    hold: Hold,
    pub dir: PathBuf,
    /// The fetch failed and the job runs on the last fetched state (`allow_stale`).
    pub stale: bool,
    /// How long bringing the mirror up to date took (waiting for another job's fetch included).
    pub fetch_ms: u64,
    /// What the fetch the job runs on found (a stale lease's too: with no fetch since the
    /// agent started, [`MirrorCache::acquire`] refuses a stale run).
    pub fetched: Arc<Fetched>,
    /// Given to a job: its end stamps the mirror's last use. A lease of a fetch that
    /// failed is not (a mirror that cannot be used was stamped as just used, and so was
    /// evicted last).
    used: bool,
}

impl Lease {
    /// The repository's default branch (`main`), as the fetch found it.
    pub fn default_branch(&self) -> Option<String> {
        self.fetched.head.strip_prefix("refs/heads/").map(str::to_string)
    }

    /// A checkout from this lease failed on the mirror's objects
    /// ([`RepoError::MirrorBroken`]): the record of the fetch it ran on is let go, unless a
    /// later fetch replaced it, so that the next fetch makes the mirror anew (when no other
    /// job uses it) rather than starting from objects that cannot be read.
    pub async fn broken(&self) {
        let lock = {
            let entries = self.hold.cache.entries.lock().expect("mirror entries");
            entries.get(&self.hold.folder).map(|e| Arc::clone(&e.lock))
        };
        let Some(lock) = lock else { return };
        let mut state = lock.lock().await;
        if state.last.as_ref().is_some_and(|last| Arc::ptr_eq(&last.found, &self.fetched)) {
            warn!(mirror = %self.dir.display(), "the mirror's objects cannot be read; the next fetch makes it anew");
            state.last = None;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.used {
            return;
        }
        // Last use, for the eviction order; losing it only makes the mirror look older.
        // Made anew, not opened as found: a pipe a job put there would hold this thread.
        let _ = crate::files::write_atomically(&self.dir.join(USED_FILE), crate::now_ms().to_string().as_bytes(), false);
    }
}

impl MirrorCache {
    pub fn open(root: PathBuf, max_bytes: u64) -> std::io::Result<Arc<MirrorCache>> {
        std::fs::create_dir_all(&root)?;
        // Leftovers of an eviction or a repack cut short.
        for entry in std::fs::read_dir(&root)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".evicted-") || name.starts_with(REPACK_SCRATCH) {
                let _ = crate::files::remove_tree(&entry.path());
            }
        }
        Ok(Arc::new(MirrorCache {
            root,
            max_bytes,
            entries: Mutex::new(HashMap::new()),
            evicting: Mutex::new(()),
            changes: AtomicU64::new(0),
            names: Mutex::new(None),
            repack_at: layout::REPACK_AT_PACKS,
            repacking: AtomicBool::new(false),
        }))
    }

    /// This cache with mirrors repacked past `at` packs instead (`usize::MAX`: never), for
    /// the tests and the benchmark of many fetches.
    #[cfg(test)]
    pub fn repacked_at(root: PathBuf, max_bytes: u64, at: usize) -> std::io::Result<Arc<MirrorCache>> {
        let mut cache = MirrorCache::open(root, max_bytes)?;
        Arc::get_mut(&mut cache).expect("just made").repack_at = at;
        Ok(cache)
    }

    /// The folder of the mirrors.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The set of mirrors may have changed (counted once the change is done on disk).
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// After a restart: what a killed agent left in its mirrors goes. libgit2's lock files
    /// (`*.lock`) would make every later fetch of the repository fail ("failed to lock
    /// file"), its temporary files (`*_git2_*`, such as a pack being received) only take
    /// space, and a mirror whose first fetch never finished has nothing to run on. Only for
    /// the agent itself, at start: no fetch of this cache runs yet, and no other process
    /// fetches into it.
    pub async fn recover(&self) {
        let mut kept = Vec::new();
        for entry in std::fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let dir = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') || !dir.is_dir() {
                continue;
            }
            let folder = entry.file_name().to_string_lossy().into_owned();
            if read_name(&dir).is_none_or(|name| layout::folder(&name) != folder) {
                warn!(mirror = %dir.display(), "removing a mirror whose name file does not name it (an older agent's, or put there)");
                let _ = crate::files::remove_tree(&dir);
                self.changed();
                continue;
            }
            remove_odd_entries(&dir);
            clear_leftovers(&dir);
            kept.push(dir);
        }
        if kept.is_empty() {
            return;
        }
        // Opening each takes libgit2, so a worker: one for all of them, given a minute (a
        // FIFO planted since the walk above would hold the agent's start).
        let checked = tokio::time::timeout(RECOVER_WITHIN, worker::run(Work::Usable { dirs: kept.clone() }, (), "check the mirrors", None)).await;
        let usable = match checked {
            Ok((Ok(Answer::Usable(usable)), ())) if usable.len() == kept.len() => usable,
            other => {
                let error = match other {
                    Ok((Err(e), ())) => e.to_string(),
                    Ok((Ok(other), ())) => other.unexpected("check the mirrors").to_string(),
                    Err(_) => format!("no answer within {RECOVER_WITHIN:?}"),
                };
                warn!(error, "could not check the mirrors at start; each is checked at its next fetch");
                return;
            }
        };
        for (dir, usable) in kept.into_iter().zip(usable) {
            if !usable {
                warn!(mirror = %dir.display(), "removing a mirror whose first fetch never finished");
                let _ = crate::files::remove_tree(&dir);
                self.changed();
            }
        }
    }

    fn hold(self: &Arc<Self>, folder: &str) -> (Hold, Arc<tokio::sync::Mutex<FetchState>>) {
        let mut entries = self.entries.lock().expect("mirror entries");
        let entry = entries.entry(folder.to_string()).or_default();
        entry.users += 1;
        (Hold { cache: Arc::clone(self), folder: folder.to_string() }, Arc::clone(&entry.lock))
    }

    /// Brings the repository's mirror up to date (or creates it) and holds it for a job.
    /// The fetch runs in a git worker ([`super::worker`]): dropping the future kills it, and
    /// the repository's fetch lock goes only once it is dead.
    pub async fn acquire(self: &Arc<Self>, source: Source, allow_stale: bool) -> Result<Lease, RepoError> {
        let folder = layout::folder(&source.name);
        let (hold, lock) = self.hold(&folder);
        let asked = Instant::now();
        let dir = self.root.join(&folder);
        // Given to the job only with what a fetch found: a lease dropped unmade (an error)
        // lets go of its hold without stamping the mirror's last use.
        let lease = |fetched, stale| Lease { hold, dir: dir.clone(), stale, fetch_ms: asked.elapsed().as_millis() as u64, fetched, used: true };
        let guard = lock.lock_owned().await;
        if let Some(last) = guard.last.as_ref().filter(|last| last.started >= asked) {
            return Ok(lease(Arc::clone(&last.found), false));
        }
        // A mirror whose name file names another repository (a job can rewrite it) is made
        // again by the fetch: not under another job that holds it or waits for it (a
        // checkout borrows its objects), which it removed mid-job.
        let others = self.entries.lock().expect("mirror entries").get(&folder).is_some_and(|e| e.users > 1);
        if others && dir.exists() && read_name(&dir).as_deref() != Some(source.name.as_str()) {
            return Err(local("fetch the repository", format!("the mirror folder {folder} names another repository and other jobs use it, so it is neither used nor made again now: retry once they ended")));
        }
        let (fetch_hold, _) = self.hold(&folder);
        let started = Instant::now();
        // The refs the fetch starts from are the agent's record, none else; with none (no
        // fetch since the agent started) the mirror is made anew, unless another job waits
        // for it (it then keeps its objects, not its refs).
        let known = guard.last.as_ref().map(|last| Fetched::clone(&last.found));
        let work = Work::Fetch { dir: dir.clone(), source: source.clone(), known, alone: !others };
        let held = FetchHeld { guard: Some(guard), hold: Some(fetch_hold), dir: dir.clone(), succeeded: false };
        let (answer, mut held) = worker::run(work, held, "fetch the repository", None).await;
        let guard = held.guard.as_mut().expect("held until dropped");
        let answer = match answer {
            Ok(Answer::Fetched(answer)) => answer,
            // A worker lost (a job killed it) or that answered something else: the mirror is
            // as a fetch of this agent's left it, if one did.
            Ok(other) => FetchAnswer { result: Err(other.unexpected("fetch the repository")), usable: guard.last.is_some(), packs: 0 },
            Err(e) => FetchAnswer { result: Err(e), usable: guard.last.is_some(), packs: 0 },
        };
        let FetchAnswer { result, usable, packs } = answer;
        let result = match result {
            Ok(found) => {
                let found = Arc::new(found);
                guard.last = Some(LastFetch { started, found: Arc::clone(&found) });
                self.repack_past_threshold(&folder, packs);
                Ok(found)
            }
            Err(e) => {
                if !usable {
                    // The mirror went (or never held the record's commits): the record goes with it.
                    guard.last = None;
                }
                // What a stale run would start from.
                Err((e, guard.last.as_ref().map(|last| Arc::clone(&last.found))))
            }
        };
        held.succeeded = result.is_ok();
        // A failed fetch's leftovers are cleared, still under the lock, before the
        // eviction pass weighs the cache.
        held.let_go().await;
        // A first fetch made the mirror, or a failed one removed it.
        self.changed();
        let cache = Arc::clone(self);
        tokio::task::spawn_blocking(move || cache.evict(crate::now_ms()));
        match result {
            Ok(found) => Ok(lease(found, false)),
            Err((e, _)) if !allow_stale => Err(e),
            // A failure of this machine's (its disk full or read-only, its files) is the
            // runner's to judge as without `allow_stale` (`runner::full_disk`, `local_fault`:
            // a disk that takes no write holds the agent back, the job handed back), not a
            // server's that a fetched state could stand in for (rev31-2).
            Err((e @ (RepoError::DiskFull { .. } | RepoError::NoRoom { .. } | RepoError::Git { .. }), None)) => Err(e),
            // Only what this agent fetched is run on: the refs on disk are a job's to move.
            Err((e, None)) => {
                let cause = match e {
                    RepoError::Network { url, detail } => format!("could not reach {url} ({detail})"),
                    e => e.to_string(),
                };
                Err(RepoError::NoStaleState { cause, url: source.url.clone() })
            }
            Err((e, Some(last))) => {
                warn!(repo = %source.name, error = %e, "fetch failed; the job runs on the mirror's last fetched state (allow_stale)");
                Ok(lease(last, true))
            }
        }
    }

    /// After a fetch of the mirror `folder` left it with `packs` packs: past the threshold
    /// ([`layout::REPACK_AT_PACKS`]) a repack starts beside the jobs ([`MirrorCache::repack`]),
    /// unless one runs (of any mirror) or the mirror's last one failed at more than half
    /// as many packs.
    fn repack_past_threshold(self: &Arc<Self>, folder: &str, packs: usize) {
        if packs < self.repack_at {
            return;
        }
        {
            let mut entries = self.entries.lock().expect("mirror entries");
            let Some(entry) = entries.get_mut(folder) else { return };
            if entry.repacking || entry.repack_failed_at.is_some_and(|at| packs < at.saturating_mul(2)) {
                return;
            }
            if self.repacking.swap(true, Ordering::SeqCst) {
                return;
            }
            entry.repacking = true;
        }
        let mut running = Repacking { cache: Arc::clone(self), folder: folder.to_string(), failed_at: None };
        tokio::spawn(async move {
            let (cache, folder) = (Arc::clone(&running.cache), running.folder.clone());
            match cache.repack(&folder, cache.repack_at, REPACK_WITHIN).await {
                Ok(Some((before, after, ms))) => info!(mirror = %folder, packs_before = before, packs_after = after, ms, "mirror repacked"),
                Ok(None) => {}
                Err(e) => {
                    warn!(mirror = %folder, error = %e, packs, "the mirror could not be repacked; it is tried again once it holds twice as many packs");
                    running.failed(packs);
                }
            }
        });
    }

    /// Combines packs of the mirror `folder`, when it holds `at` or more, into one: built by a git worker into a scratch
    /// folder beside the mirrors ([`combine_packs`]) while jobs go on, given `within` (then killed,
    /// the mirror untouched); then put in place under the repository's fetch lock, so no
    /// fetch writes meanwhile ([`put_in_place`]). Every object of the packs combined is in
    /// the new pack, so a job reading the mirror meanwhile (its checkout borrows its
    /// objects) finds each still: libgit2 and git look in the pack folder again for an
    /// object whose pack went. The packs (pack count before, after) and the time it took;
    /// None when there was nothing to combine, or the mirror was made anew meanwhile.
    pub async fn repack(&self, folder: &str, at: usize, within: std::time::Duration) -> Result<Option<(usize, usize, u64)>, String> {
        let started = Instant::now();
        let dir = self.root.join(folder);
        let scratch = self.root.join(format!("{REPACK_SCRATCH}{folder}"));
        let made = {
            let fresh = {
                let scratch = scratch.clone();
                move || {
                    let _ = crate::files::remove_tree(&scratch);
                    crate::files::private_dir(&scratch).map(drop)
                }
            };
            tokio::task::spawn_blocking(fresh).await.map_err(|e| e.to_string())?.map_err(|e| format!("could not make {}: {e}", scratch.display()))?;
            let work = Work::Repack { dir: dir.clone(), into: scratch.clone(), at };
            // Past `within` the worker is killed (dropped with the future); only then is
            // its scratch folder removed, below.
            match tokio::time::timeout(within, worker::run(work, (), "repack the mirror", None)).await {
                Ok((Ok(Answer::Repacked(made)), ())) => made.map_err(|e| e.to_string()),
                Ok((Ok(other), ())) => Err(other.unexpected("repack the mirror").to_string()),
                Ok((Err(e), ())) => Err(e.to_string()),
                Err(_) => Err(format!("not done within {within:?}; what it made is thrown away")),
            }
        };
        let placed = match made {
            Ok(Some(made)) => {
                let lock = {
                    let entries = self.entries.lock().expect("mirror entries");
                    entries.get(folder).map(|e| Arc::clone(&e.lock))
                };
                // No entry: evicted meanwhile (it cannot be while this runs), nothing to do.
                let guard = match lock {
                    Some(lock) => Some(lock.lock_owned().await),
                    None => None,
                };
                let (dir_after, dir, scratch) = (dir.clone(), dir.clone(), scratch.clone());
                let placed = tokio::task::spawn_blocking(move || guard.map(|_guard| put_in_place(&dir, &scratch, &made)));
                match placed.await.map_err(|e| e.to_string())? {
                    Some(placed) => placed.map(|before| before.map(|before| (before, list_packs(&dir_after.join("objects/pack")).len()))),
                    None => Ok(None),
                }
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let _ = tokio::task::spawn_blocking(move || crate::files::remove_tree(&scratch)).await;
        placed.map(|counts| counts.map(|(before, after)| (before, after, started.elapsed().as_millis() as u64)))
    }

    /// Waits while a repack runs (the tests: a fetch may have started one).
    #[cfg(test)]
    pub async fn repacks_done(&self) {
        while self.repacking.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The repositories this cache holds a mirror of (names only, no size walk): what an
    /// edge routing jobs to agents that already hold a repository needs.
    pub fn mirror_names(&self) -> Vec<String> {
        let changes = self.changes.load(Ordering::SeqCst);
        if let Some((seen, names)) = self.names.lock().expect("mirror names").as_ref() {
            if *seen == changes {
                return names.clone();
            }
        }
        let names = self.read_names();
        *self.names.lock().expect("mirror names") = Some((changes, names.clone()));
        names
    }

    /// [`MirrorCache::mirror_names`] read from disk whatever the count of changes says: for
    /// a new connection's hello, once per connection, so that a mirror copied in or removed
    /// by hand (or by a job of the agent's user) under a running agent is told to the edge
    /// at the next connection at the latest.
    pub fn mirror_names_from_disk(&self) -> Vec<String> {
        self.changed();
        self.mirror_names()
    }

    /// The names of the mirrors on disk, as the edge may be told them: only a name that is
    /// its own folder's and a repository's (as the agent writes them: anything else was put
    /// there; a folder may be named anything, and a control character takes 7 bytes in the
    /// hello, so counting a name's bytes bounds nothing else), at most
    /// [`shared::placement::MAX_MIRRORS`] (all the edge keeps) and [`MAX_NAMES_BYTES`] in
    /// all, so that they never take a hello past what the edge reads of one.
    fn read_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let folder = e.file_name().into_string().ok().filter(|f| !f.starts_with('.'))?;
                read_name(&e.path()).filter(|name| layout::folder(name) == folder && shared::repo::could_be_name(name))
            })
            .collect();
        names.sort();
        let mut bytes = 0;
        names.truncate(shared::placement::MAX_MIRRORS);
        names.retain(|name| {
            bytes += name.len() + 3;
            bytes <= MAX_NAMES_BYTES
        });
        names
    }

    /// Whether the cache keeps what a fetch of the repository `name` found (false while a
    /// fetch holds it: a test asks between fetches, and a held lock says nothing).
    #[cfg(test)]
    pub fn holds_fetched(&self, name: &str) -> bool {
        let entries = self.entries.lock().expect("mirror entries");
        entries.get(&layout::folder(name)).is_some_and(|e| e.lock.try_lock().is_ok_and(|state| state.last.is_some()))
    }

    /// Removes least recently used mirrors no job holds until the cache fits.
    pub fn evict(&self, now: shared::Millis) {
        let Ok(_one) = self.evicting.try_lock() else { return };
        let mirrors = self.on_disk(now, true);
        let sizes: HashMap<String, u64> = mirrors.iter().map(|m| (m.folder.clone(), m.bytes)).collect();
        for folder in layout::evictions(mirrors, self.max_bytes) {
            if let Some(name) = self.remove_idle(&folder, now) {
                info!(repo = %name, bytes = sizes.get(&folder).copied().unwrap_or(0), max_bytes = self.max_bytes, "mirror evicted (REPO_CACHE_MAX_BYTES)");
            }
        }
    }

    /// Removes the idle mirrors (no job holds one, none fetches it) other than the folder
    /// `keep`, least recently used first, until `enough` (asked with how many went so far)
    /// says there is room: for a job whose fetch or checkout of `keep`'s repository ran out
    /// of room on the disk holding `on` (`runner`), before that is judged. None when the
    /// mirrors are on another disk. Returns how many went.
    pub fn evict_for_room(&self, keep: &str, on: &Path, enough: &dyn Fn(usize) -> bool, now: shared::Millis) -> usize {
        if !same_disk(on, &self.root) {
            return 0;
        }
        // After any pass under way: it may free the room by itself.
        let _one = self.evicting.lock().expect("eviction");
        let mut evicted = 0;
        for folder in layout::idle_oldest_first(self.on_disk(now, false), keep) {
            if enough(evicted) {
                break;
            }
            if let Some(name) = self.remove_idle(&folder, now) {
                info!(repo = %name, "mirror evicted: a job's repository ran out of room on its disk");
                evicted += 1;
            }
        }
        evicted
    }

    /// The mirrors on disk as the eviction sees them (`sized`: with the bytes each takes,
    /// a walk of its folder).
    fn on_disk(&self, now: shared::Millis, sized: bool) -> Vec<MirrorUse> {
        let mut mirrors = Vec::new();
        for entry in std::fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let folder = entry.file_name().to_string_lossy().into_owned();
            if folder.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let last_used = crate::files::read_plain(&entry.path().join(USED_FILE), 32, "mirror's last use")
                .ok()
                .and_then(|t| String::from_utf8(t).ok()?.trim().parse().ok())
                .unwrap_or(now);
            let bytes = if sized { disk_bytes(&entry.path()) } else { 0 };
            mirrors.push(MirrorUse { bytes, last_used, in_use: false, folder });
        }
        let entries = self.entries.lock().expect("mirror entries");
        for m in &mut mirrors {
            m.in_use = entries.get(&m.folder).is_some_and(Entry::in_use);
        }
        mirrors
    }

    /// The bytes of the mirrors of repositories other than the folder `keep`'s: those idle
    /// (evictable for room, `evict_for_room`) and those a job holds or fetches now (not,
    /// until that job is done), and `keep`'s own. Walks every mirror: on the blocking pool.
    pub fn others_bytes(&self, keep: &str, now: shared::Millis) -> OthersBytes {
        let mut bytes = OthersBytes::default();
        for m in self.on_disk(now, true) {
            let sum = match (m.folder == keep, m.in_use) {
                (true, _) => &mut bytes.own,
                (false, true) => &mut bytes.in_use,
                (false, false) => &mut bytes.idle,
            };
            *sum = sum.saturating_add(m.bytes);
        }
        bytes
    }

    /// Removes the mirror `folder` unless a job holds it or waits for it now: its
    /// repository's name, once it went.
    fn remove_idle(&self, folder: &str, now: shared::Millis) -> Option<String> {
        let dir = self.root.join(folder);
        let name = read_name(&dir).unwrap_or_else(|| folder.to_string());
        // Moved aside under the lock, so a job arriving now finds no half-deleted mirror.
        let trash = self.root.join(format!(".evicted-{folder}-{now}"));
        {
            let mut entries = self.entries.lock().expect("mirror entries");
            if entries.get(folder).is_some_and(Entry::in_use) {
                return None;
            }
            if let Err(e) = std::fs::rename(&dir, &trash) {
                warn!(repo = %name.trim(), error = %e, "could not evict a mirror");
                return None;
            }
            // What its last fetch found goes with it (no job holds or waits for its lock).
            entries.remove(folder);
        }
        self.changed();
        let _ = crate::files::remove_tree(&trash);
        Some(name.trim().to_string())
    }
}

/// A repack started by [`MirrorCache::repack_past_threshold`]: once it ends, however (a
/// panic too), the mirror and the cache take the next one.
struct Repacking {
    cache: Arc<MirrorCache>,
    folder: String,
    /// The packs at which it failed, if it did.
    failed_at: Option<usize>,
}

impl Repacking {
    /// It failed at `packs` packs: the next waits until there are twice as many.
    fn failed(&mut self, packs: usize) {
        self.failed_at = Some(packs);
    }
}

impl Drop for Repacking {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.cache.entries.lock() {
            if let Some(entry) = entries.get_mut(&self.folder) {
                entry.repacking = false;
                entry.repack_failed_at = self.failed_at;
            }
        }
        self.cache.repacking.store(false, Ordering::SeqCst);
    }
}

/// What a fetch holds until its worker is dead: the repository's fetch lock and a hold on
/// the mirror. Let go after a fetch that failed, or was killed with its job, it first
/// clears what the fetch left in the mirror, still under the lock: a pack being received
/// stayed (827 MB from a server streaming without end) until the next fetch of the same
/// repository or the agent's restart, which might never come.
struct FetchHeld {
    guard: Option<tokio::sync::OwnedMutexGuard<FetchState>>,
    hold: Option<Hold>,
    dir: PathBuf,
    succeeded: bool,
}

impl FetchHeld {
    /// Lets go, once any clearing is done.
    async fn let_go(mut self) {
        if let Some(clear) = self.clearing() {
            let _ = tokio::task::spawn_blocking(clear).await;
        }
    }

    /// The clearing to run (off the runtime thread: it walks the mirror), which lets go
    /// of the lock and the hold at its end; None after a fetch that succeeded.
    fn clearing(&mut self) -> Option<impl FnOnce() + Send + 'static> {
        if self.succeeded {
            return None;
        }
        let (guard, hold, dir) = (self.guard.take(), self.hold.take(), self.dir.clone());
        Some(move || {
            clear_leftovers(&dir);
            drop((guard, hold));
        })
    }
}

impl Drop for FetchHeld {
    fn drop(&mut self) {
        // Killed with its job: the future is gone, so the clearing goes to the blocking pool.
        if let Some(clear) = self.clearing() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(clear)),
                Err(_) => clear(),
            }
        }
    }
}

/// How long a repack may take ([`MirrorCache::repack`]): it runs beside the jobs, which do
/// not wait for it, on a core of its own; libgit2 computes the deltas of what it packs
/// again, which for a large repository's whole history takes minutes. Past it, it is given
/// up, and tried again only once the mirror holds twice as many packs.
const REPACK_WITHIN: std::time::Duration = std::time::Duration::from_secs(300);

/// The start of the scratch folders' names (beside the mirrors, `.`-led as the cache's
/// own) where repacks write their pack before it goes in place.
const REPACK_SCRATCH: &str = ".repack-";

/// The packs of a pack folder (`objects/pack`): the names (`pack-<hex>`) of those with both
/// a `.pack` and an `.idx` file, plain files, and the bytes of each pack. (libgit2 lists a
/// pack by its index, and takes one without its pack for none.)
fn list_packs(pack_dir: &Path) -> Vec<(String, u64)> {
    let plain = |path: &Path| std::fs::symlink_metadata(path).ok().filter(|m| m.is_file());
    let mut packs: Vec<(String, u64)> = std::fs::read_dir(pack_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let base = name.strip_suffix(".pack").filter(|b| b.starts_with("pack-"))?.to_string();
            let bytes = plain(&e.path())?.len();
            plain(&pack_dir.join(format!("{base}.idx")))?;
            Some((base, bytes))
        })
        .collect();
    packs.sort();
    packs
}

/// The object ids a pack's index (`.idx`, version 2, SHA-1: what libgit2 writes) names:
/// its header, then the fan-out table whose last entry is the count, then the ids, sorted.
/// Read as a file a job may have put there (no pipe waited on), and only as far as the ids.
fn pack_ids(idx: &Path) -> Result<Vec<Oid>, String> {
    use std::io::Read;
    let mut file = crate::files::open_plain(idx, false, "pack index").map_err(|e| e.to_string())?;
    let mut head = [0u8; 8 + 256 * 4];
    file.read_exact(&mut head).map_err(|e| format!("{}: {e}", idx.display()))?;
    if head[..8] != [0xff, b't', b'O', b'c', 0, 0, 0, 2] {
        return Err(format!("{} is not a pack index of version 2", idx.display()));
    }
    let count = u32::from_be_bytes(head[8 + 255 * 4..].try_into().expect("4 bytes")) as usize;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    // Each id, its CRC and its offset: a count the file cannot hold is not read.
    if (count as u64).saturating_mul(28) > len {
        return Err(format!("{} names more objects than it holds", idx.display()));
    }
    let mut ids = vec![0u8; count * 20];
    file.read_exact(&mut ids).map_err(|e| format!("{}: {e}", idx.display()))?;
    ids.chunks(20).map(|id| Oid::from_bytes(id).map_err(|e| e.message().to_string())).collect()
}

/// In the git worker: when the mirror at `dir` holds `at` packs or more, packs the objects
/// of those [`layout::packs_to_combine`] chooses into one pack in `into` (a scratch folder
/// of the agent's), leaving the mirror as it is: the agent puts the pack in place
/// ([`put_in_place`]). libgit2 reads the objects from the mirror's object folder alone, as
/// an object database opened without the mirror's config or refs (a job can write those).
/// Objects the packs kept hold too are left out (a fetch's pack repeats the objects its
/// deltas start from).
pub(super) fn combine_packs(dir: &Path, into: &Path, at: usize) -> Result<Option<super::worker::Repacked>, RepoError> {
    let action = "repack the mirror";
    let pack_dir = dir.join("objects/pack");
    let packs = list_packs(&pack_dir);
    let combined = layout::packs_to_combine(&packs, at);
    if combined.is_empty() {
        return Ok(None);
    }
    let mut kept = HashSet::new();
    for (name, _) in packs.iter().filter(|(name, _)| !combined.contains(name)) {
        kept.extend(pack_ids(&pack_dir.join(format!("{name}.idx"))).map_err(|e| local(action, e))?);
    }
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    for name in &combined {
        for id in pack_ids(&pack_dir.join(format!("{name}.idx"))).map_err(|e| local(action, e))? {
            if !kept.contains(&id) && seen.insert(id) {
                ids.push(id);
            }
        }
    }
    let odb = git2::Odb::new().map_err(|e| super::error::git(action, &e))?;
    let objects = dir.join("objects");
    let objects = objects.to_str().ok_or_else(|| local(action, "the mirror's path is not UTF-8"))?;
    odb.add_disk_alternate(objects).map_err(|e| super::error::git(action, &e))?;
    let repo = Repository::from_odb(odb).map_err(|e| super::error::git(action, &e))?;
    let mut builder = repo.packbuilder().map_err(|e| super::error::git(action, &e))?;
    // One core: it runs beside the jobs.
    builder.set_threads(1);
    for id in &ids {
        builder.insert_object(*id, None).map_err(|e| super::error::git(action, &e))?;
    }
    builder.write(into, 0).map_err(|e| super::error::git(action, &e))?;
    let made = list_packs(into);
    let [(name, _)] = made.as_slice() else {
        return Err(local(action, format!("the repack left {} packs, not one", made.len())));
    };
    Ok(Some(super::worker::Repacked { name: name.clone(), combined, objects: ids.len() }))
}

/// Puts the pack a repack `made` in `scratch` in place in the mirror at `dir`, then removes
/// the packs it combined: the count of packs before. Under the repository's fetch lock (no
/// fetch writes meanwhile). Whatever point this is cut at (the agent killed), every object
/// stays in some pack: the new pack goes in before any old one goes, its pack file before
/// its index (an index names a pack that is there), and each old index before its pack.
/// A mirror made anew meanwhile (a fetch's, its packs gone) is left alone: None.
fn put_in_place(dir: &Path, scratch: &Path, made: &super::worker::Repacked) -> Result<Option<usize>, String> {
    let pack_dir = dir.join("objects/pack");
    let packs = list_packs(&pack_dir);
    let here = |name: &String| packs.iter().any(|(p, _)| p == name);
    if !made.combined.iter().all(here) {
        return Ok(None);
    }
    let moved = |ext: &str| std::fs::rename(scratch.join(format!("{}.{ext}", made.name)), pack_dir.join(format!("{}.{ext}", made.name)));
    // A pack of that name holds those very objects (its name is their hash): it stays as it
    // is, read by jobs, never overwritten by another layout of them.
    if !here(&made.name) {
        moved("pack").and_then(|()| moved("idx")).map_err(|e| format!("could not put the new pack in place: {e}"))?;
    }
    for old in made.combined.iter().filter(|old| **old != made.name) {
        for ext in ["idx", "pack", "rev", "bitmap", "keep", "mtimes", "promisor"] {
            let _ = std::fs::remove_file(pack_dir.join(format!("{old}.{ext}")));
        }
    }
    // A multi-pack index (git's, never libgit2's: put there by a job) would name packs gone.
    for midx in ["multi-pack-index", "multi-pack-index.bitmap", "multi-pack-index.rev"] {
        let _ = std::fs::remove_file(pack_dir.join(midx));
    }
    Ok(Some(packs.len()))
}

/// How long the agent's start waits for the check of its mirrors ([`MirrorCache::recover`]).
const RECOVER_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// The most bytes of mirror names an agent tells the edge (in its hello, whose whole the
/// edge reads only up to `MAX_HELLO_BYTES`, 64 KiB): some hundreds of names.
pub(crate) const MAX_NAMES_BYTES: usize = 16 * 1024;

/// The repository name kept in the mirror at `dir` ([`NAME_FILE`]), if it holds one: read
/// as a file the agent keeps ([`crate::files::read_plain`]), since a job can put anything
/// there, a pipe or a file as large as the disk.
fn read_name(dir: &Path) -> Option<String> {
    let bytes = crate::files::read_plain(&dir.join(NAME_FILE), shared::repo::MAX_REPO_URL + 16, "mirror name").ok()?;
    String::from_utf8(bytes).ok().map(|name| name.trim().to_string())
}

/// libgit2's process-wide options: timeouts for servers that accept nothing or send
/// nothing, and no config file outside a repository's own is looked for — the agent's
/// user's `~/.gitconfig`, `$XDG_CONFIG_HOME/git/config`, the system's — since a job of that
/// user can write (or make a FIFO of) each, and libgit2 opens them as it opens any
/// repository, before [`own_config`] can replace them: a FIFO there hung every fetch.
pub fn set_timeouts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: these set process-wide libgit2 options, once, at the mirror cache's opening,
    // before any repository is opened by the agent.
    ONCE.call_once(|| unsafe {
        let _ = git2::opts::set_server_connect_timeout_in_milliseconds(CONNECT_TIMEOUT_MS);
        let _ = git2::opts::set_server_timeout_in_milliseconds(READ_TIMEOUT_MS);
        // Packs are read through mapped windows, up to 8 GiB of them by default: more than
        // a git worker's whole address space (`worker::MAX_WORKER_MEMORY`).
        let _ = git2::opts::set_mwindow_mapped_limit(1 << 30);
        for level in [git2::ConfigLevel::System, git2::ConfigLevel::XDG, git2::ConfigLevel::Global, git2::ConfigLevel::ProgramData] {
            let _ = git2::opts::set_search_path(level, "");
        }
    });
    super::advert::register();
}

/// Bytes a folder takes on disk ([`crate::files::disk_usage`], unbounded: a mirror is the
/// agent's).
pub(crate) fn disk_bytes(dir: &Path) -> u64 {
    crate::files::disk_usage(&[dir.to_path_buf()], crate::files::WalkBudget::UNBOUNDED).bytes
}

/// Removes from a mirror what the agent never writes into one and libgit2 would open and
/// wait on: a FIFO (or a link to one) a job put at `packed-refs` or a ref hung every later
/// fetch of the repository, and, through [`MirrorCache::recover`], the agent's start.
fn remove_odd_entries(dir: &Path) {
    let odd = crate::files::odd_entries(dir, usize::MAX).unwrap_or_default();
    if let Some(first) = odd.first() {
        warn!(mirror = %dir.display(), count = odd.len(), first = %first.display(), "removing what is neither a file nor a folder (or cannot be read) from a mirror: a job's doing");
    }
    for entry in odd {
        // An unreadable folder goes whole (remove_tree opens it up as it goes).
        let is_dir = std::fs::symlink_metadata(&entry).is_ok_and(|m| m.is_dir());
        let _ = if is_dir { crate::files::remove_tree(&entry) } else { std::fs::remove_file(&entry) };
    }
}

/// What a job's fetch (killed with the job) or a killed agent left in the mirror at `dir`:
/// libgit2's lock files (`*.lock`) would make every later fetch of the repository fail
/// ("failed to lock file"), its temporary files (`*_git2_*`, such as a pack being
/// received) only take space. Only where no fetch runs: at the agent's start, or under the
/// repository's fetch lock, whose last holder is dead.
fn clear_leftovers(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let (path, name) = (entry.path(), entry.file_name().to_string_lossy().into_owned());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if name.ends_with(".lock") || name.contains("_git2_") || crate::files::is_temporary(&entry.file_name()) {
                info!(file = %path.display(), "removing a file a killed fetch left in a mirror");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// In the git worker: [`fetch`], then what the agent needs of the mirror when it failed.
/// `known` is what the agent's last fetch found (the only refs the fetch starts from);
/// `alone`, that no other job holds or waits for the mirror, so it may be made anew. A fetch
/// that fails for a reason of the mirror's own (its refs, its objects: a job can write
/// there) is tried once more from no refs at all, the mirror made anew when `alone`. A
/// mirror that does not hold the commits of `known` (a first fetch that failed, one made
/// anew) leaves nothing worth keeping (or listing): removed.
pub(super) fn fetch_into(dir: &Path, source: &Source, known: Option<&Fetched>, alone: bool, abort: &AtomicBool) -> FetchAnswer {
    clear_leftovers(dir);
    let mut result = fetch(dir, source, known, alone && known.is_none(), abort);
    if let Err(Failed { error, mirror: true }) = &result {
        if !abort.load(Ordering::SeqCst) {
            warn!(repo = %source.name, error = %error, remade = alone, "the fetch failed on what the mirror holds; fetching once more from no refs");
            result = fetch(dir, source, None, alone, abort);
        }
    }
    let result = result.map_err(|f| f.error);
    let usable = result.is_ok() || known.is_some_and(|k| holds(dir, k));
    if !usable {
        let _ = crate::files::remove_tree(dir);
    }
    let packs = if result.is_ok() { list_packs(&dir.join("objects/pack")).len() } else { 0 };
    FetchAnswer { result, usable, packs }
}

/// Whether a mirror has a commit to start from (its `HEAD`'s: at the agent's start).
pub(super) fn usable(dir: &Path) -> bool {
    Repository::open_bare(dir).is_ok_and(|r| r.head().and_then(|h| h.peel_to_commit()).is_ok())
}

/// Whether the mirror at `dir` holds the commit `known`'s default branch leads to.
fn holds(dir: &Path, known: &Fetched) -> bool {
    let Some(id) = known.refs.get(&known.head).and_then(|id| Oid::from_str(id).ok()) else { return false };
    Repository::open_bare(dir).is_ok_and(|r| r.find_object(id, None).and_then(|o| o.peel_to_commit()).is_ok())
}

/// A fetch that failed, and whether on what the mirror holds (a ref, an object: a job can
/// write them) rather than on the server, the network or the disk.
struct Failed {
    error: RepoError,
    mirror: bool,
}

impl From<RepoError> for Failed {
    fn from(error: RepoError) -> Failed {
        Failed { error, mirror: false }
    }
}

impl Failed {
    /// A step on the mirror's refs or objects that failed.
    fn in_mirror(error: RepoError) -> Failed {
        let mirror = matches!(error, RepoError::Git { .. });
        Failed { error, mirror }
    }

    /// A full disk met by a fetch estimated to need `needs` bytes (`layout::fetch_needs`).
    fn needing(mut self, needs: Option<u64>) -> Failed {
        if let RepoError::DiskFull { fetch_needs, .. } = &mut self.error {
            *fetch_needs = needs;
        }
        self
    }
}

/// Whether the folders `a` and `b` are on one disk (one file system): only then does a
/// mirror that goes free room for a step on the other. Unknown (either unreadable): no.
pub fn same_disk(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let disk = |dir: &Path| std::fs::metadata(dir).map(|m| m.dev()).ok();
    disk(a).is_some() && disk(a) == disk(b)
}

/// What the mirrors of other repositories than a job's take ([`MirrorCache::others_bytes`]),
/// and the job's own (`own`: never freed for it, its checkout borrows from it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OthersBytes {
    pub idle: u64,
    pub in_use: u64,
    pub own: u64,
}

/// A mirror's config file, as the agent leaves it: what `git init --bare` writes. libgit2
/// reads some of it as it opens the repository (the format, `extensions.*`).
const MIRROR_CONFIG: &str = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n";

/// Puts back what a job may have changed in the mirror at `dir` and the agent reads: the
/// config file (a `url.*.insteadOf` there poisoned every later fetch of the repository,
/// for every caller) and `HEAD` (to `head`), and removes what the agent never writes into
/// a mirror: `objects/info/alternates` (objects from elsewhere), `info/grafts` and
/// `shallow` (history rewritten), and every ref. libgit2's negotiation walks every ref
/// under `refs/`, and a job's were taken in: one to an object the mirror lacks, or a folder
/// where a branch or tag was, failed every later fetch of the repository, for good (rev11,
/// 1). The agent's own refs are put back once the mirror is open ([`put_back_refs`]).
/// Each goes whatever a job made of it: a folder where a file was (`mkdir packed-refs`)
/// failed every later fetch ("Is a directory"), the mirror kept (rev12, 1).
fn reset_files(dir: &Path, head: &str) -> Result<(), RepoError> {
    let action = "restore the mirror";
    remove_odd_entries(dir);
    let remove = |name: &str| {
        let removed = match crate::files::remove_tree(&dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(local(action, e)),
            _ => Ok(()),
        };
        reset_step(dir);
        removed
    };
    let write = |name: &str, text: &[u8]| {
        let written = crate::files::write_atomically(&dir.join(name), text, false).map_err(|e| local(action, e));
        reset_step(dir);
        written
    };
    // Written anew below, by a rename, which a folder in their place would refuse.
    for written in ["config", "HEAD"] {
        if std::fs::symlink_metadata(dir.join(written)).is_ok_and(|m| m.is_dir()) {
            remove(written)?;
        }
    }
    write("config", MIRROR_CONFIG.as_bytes())?;
    for planted in ["objects/info/alternates", "info/grafts", "shallow", "commondir", "gitdir", "packed-refs"] {
        remove(planted)?;
    }
    // `refs` is emptied, never removed: other jobs' checkouts open the mirror while this
    // fetch runs (they hold a lease, not the fetch lock), and libgit2 takes a folder
    // without `refs` for no repository — a checkout that opened it in that instant failed
    // "path is not a repository". Only a `refs` that is no folder of the mirror's own (a
    // job's file or link) goes whole, the mirror no repository for an instant then.
    let refs = dir.join("refs");
    let emptied = std::fs::symlink_metadata(&refs).is_ok_and(|m| m.is_dir()) && crate::files::empty_tree(&refs).is_ok();
    reset_step(dir);
    if !emptied {
        remove("refs")?;
    }
    for folder in ["refs/heads", "refs/tags"] {
        std::fs::create_dir_all(dir.join(folder)).map_err(|e| local(action, e))?;
        reset_step(dir);
    }
    write("HEAD", format!("ref: {head}\n").as_bytes())
}

#[cfg(test)]
thread_local! {
    /// Run after each change [`reset_files`] makes to a mirror, on its thread: a test
    /// checks out from the mirror there, as another job's checkout may at that instant.
    pub(super) static AFTER_RESET_STEP: std::cell::RefCell<Option<Box<dyn FnMut(&Path)>>> = const { std::cell::RefCell::new(None) };
}

/// A step of [`reset_files`] is done (for the tests' [`AFTER_RESET_STEP`]).
fn reset_step(_dir: &Path) {
    #[cfg(test)]
    AFTER_RESET_STEP.with(|step| {
        if let Some(step) = step.borrow_mut().as_mut() {
            step(_dir);
        }
    });
}

/// Writes the refs of `known` (the agent's last fetch) whose objects the mirror holds as the
/// mirror's refs, in one `packed-refs` file: the fetch negotiates from them, so it brings
/// only what is new. A mirror with no refs (none known) is fetched whole.
fn put_back_refs(repo: &Repository, dir: &Path, known: Option<&Fetched>) -> Result<(), RepoError> {
    let action = "restore the mirror's refs";
    let Some(known) = known else { return Ok(()) };
    let odb = repo.odb().map_err(|e| super::error::git(action, &e))?;
    let mut refs: Vec<(&str, Oid)> = known
        .refs
        .iter()
        .filter(|(name, _)| (name.starts_with("refs/heads/") || name.starts_with("refs/tags/")) && git2::Reference::is_valid_name(name))
        .filter_map(|(name, id)| Some((name.as_str(), Oid::from_str(id).ok()?)))
        .filter(|(_, id)| odb.exists(*id))
        .collect();
    refs.sort_unstable();
    let mut text = String::from("# pack-refs with: sorted \n");
    for (name, id) in refs {
        text.push_str(&format!("{id} {name}\n"));
    }
    crate::files::write_atomically(&dir.join("packed-refs"), text.as_bytes(), false).map_err(|e| local(action, e))
}

/// The mirror of the repository `name` at `dir`, made when missing, with the refs of
/// `known` only ([`reset_files`], [`put_back_refs`]). One whose name file names another
/// repository (an older agent's, which kept `x` and `x.git` in one mirror; or one put
/// there) is not trusted but made again; so is one when `remake` (no fetch of it since the
/// agent started: without refs its objects would only be fetched again beside themselves).
fn open_or_create(dir: &Path, name: &str, known: Option<&Fetched>, remake: bool) -> Result<Repository, RepoError> {
    if dir.exists() && read_name(dir).as_deref() != Some(name) {
        warn!(repo = %name, found = %read_name(dir).as_deref().map(one_line).unwrap_or_default(), "the mirror's name file names another repository; making it again");
        crate::files::remove_tree(dir).map_err(|e| local("remove a mirror of another repository", e))?;
    }
    if dir.exists() && remake {
        info!(repo = %name, "making the mirror anew: the agent has not fetched it since it started, so none of its refs on disk is the agent's");
        crate::files::remove_tree(dir).map_err(|e| local("remove a mirror to make it anew", e))?;
    }
    let head = known.map_or("refs/heads/main", |k| k.head.as_str());
    if dir.exists() {
        reset_files(dir, head)?;
        match Repository::open_bare(dir) {
            Ok(repo) => {
                put_back_refs(&repo, dir, known)?;
                return Ok(repo);
            }
            Err(e) => {
                warn!(repo = %name, error = %e.message(), "the mirror is unreadable; making it again");
                crate::files::remove_tree(dir).map_err(|e| local("remove a broken mirror", e))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| local("create the mirror", e))?;
    std::fs::write(dir.join(NAME_FILE), name).map_err(|e| local("create the mirror", e))?;
    drop(Repository::init_bare(dir).map_err(|e| super::error::git("create the mirror", &e))?);
    reset_files(dir, head)?;
    Repository::open_bare(dir).map_err(|e| super::error::git("create the mirror", &e))
}

/// Makes `repo` read the agent's settings `entries` (`section.key`, integers) and nothing
/// else: not its config file, not `~/.gitconfig`, `$XDG_CONFIG_HOME/git/config` or the
/// system's. Jobs run as the agent's user and can write each of those (a checkout's own
/// `.git/config`, a mirror's through the checkout's `objects/info/alternates`), and libgit2
/// takes from them, for a fetch or a push, `url.*.insteadOf` / `pushInsteadOf` (where the
/// token goes) and `pack.*` (a push's memory). The settings are written to a memfd, which
/// no other process can open (the agent is not dumpable), read, and kept as a snapshot.
pub fn own_config(repo: &Repository, entries: &[(&str, i64)]) -> Result<(), git2::Error> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let mut text = String::new();
    for (key, value) in entries {
        let (section, name) = key.split_once('.').ok_or_else(|| git2::Error::from_str("a setting without a section"))?;
        text.push_str(&format!("[{section}]\n\t{name} = {value}\n"));
    }
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"claude-runner-git-config".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(git2::Error::from_str(&format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` is that new descriptor, open and owned by nothing else: the File owns it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(text.as_bytes()).map_err(|e| git2::Error::from_str(&e.to_string()))?;
    let config = git2::Config::open(Path::new(&format!("/proc/self/fd/{fd}")))?.snapshot()?;
    drop(file);
    repo.set_config(&config)
}

/// Whether `url` (as libgit2 is about to send credentials to it) is on `host`.
fn on_host(url: &str, host: &str) -> bool {
    shared::repo::RepoUrl::parse(url).is_ok_and(|u| u.host() == host)
}

/// Callbacks for one conversation with a git server on `host`: the token (once; asked
/// again means refused; never for another host), and an abort switch checked as data arrives.
pub fn callbacks<'a>(token: Option<&'a Token>, host: &'a str, auth: &'a Cell<AuthSeen>, abort: &'a AtomicBool) -> RemoteCallbacks<'a> {
    let mut cb = RemoteCallbacks::new();
    let offered = Cell::new(false);
    cb.credentials(move |url, _user, allowed| {
        let mut seen = auth.get();
        let result = match token {
            // Redirects are not followed; should one be, the token still goes to its own
            // host only.
            Some(_) if !on_host(url, host) => Err(git2::Error::from_str("the server sent the runner to another host")),
            Some(t) if !offered.get() && allowed.contains(CredentialType::USER_PASS_PLAINTEXT) => {
                offered.set(true);
                // GitHub's name for a token login; other servers take any user name.
                Cred::userpass_plaintext("x-access-token", t.expose())
            }
            Some(_) => {
                seen.token_refused = true;
                Err(git2::Error::from_str("the server refused the token"))
            }
            None => {
                seen.needed_without_token = true;
                Err(git2::Error::from_str("the server asks for credentials and the runner has no token for it"))
            }
        };
        auth.set(seen);
        result
    });
    cb.transfer_progress(move |_| !abort.load(Ordering::SeqCst));
    cb.push_transfer_progress(move |_, _, _| {});
    cb
}

/// Fetches every branch and tag of `source` into the mirror at `dir` (creating it, or
/// anew when `remake`) from the refs of `known`, prunes what the server no longer has, and
/// points the mirror's HEAD at the server's default branch. Returns what it found.
fn fetch(dir: &Path, source: &Source, known: Option<&Fetched>, remake: bool, abort: &AtomicBool) -> Result<Fetched, Failed> {
    let started = Instant::now();
    // A job can leave in the mirror what the agent cannot put back (a folder it cannot
    // remove): the second try makes the mirror anew when it may.
    let repo = open_or_create(dir, &source.name, known, remake).map_err(Failed::in_mirror)?;
    let auth = Cell::new(AuthSeen::default());
    let action = "fetch the repository";
    let fail = |e: git2::Error| {
        if let Some(cut) = super::advert::cut_error(&source.url, "fetched") {
            return Failed::from(cut);
        }
        let error = Talk { url: &source.url, host: &source.host, auth: auth.get(), action, pushing: false }.error(e.code(), e.class(), e.message());
        // Only the talk with the server can fail for the server's or the network's reasons;
        // anything else read the mirror (its negotiation walks the refs' commits, the pack
        // may be indexed against its objects), which a job can write: a commit's bytes
        // overwritten in a pack fail as zlib's, and were taken as the server's (rev12, 2).
        // Memory running out is no fault of the mirror's either: fetched again, an endless
        // ref advertisement took the worker to its limit twice (rev25, 5).
        let server = matches!(e.class(), ErrorClass::Net | ErrorClass::Http | ErrorClass::Ssl | ErrorClass::Ssh | ErrorClass::Callback | ErrorClass::NoMemory);
        if server { Failed::from(error) } else { Failed::in_mirror(error) }
    };
    // No config file steers the fetch: a job could have written any of them.
    // A redirect could lead off ALLOWED_REPO_HOSTS: none is followed to another host
    // (libgit2's policy is by host name), from the first request on. The connection below
    // takes this setting (libgit2's default there follows the first request's redirect);
    // the download, its own `follow_redirects`.
    own_config(&repo, &[("http.followRedirects", 0)]).map_err(|e| super::error::git(action, &e))?;
    let mut remote = repo.remote_anonymous(&source.url).map_err(|e| super::error::git(action, &e))?;
    if remote.url_bytes() != source.url.as_bytes() || remote.pushurl_bytes().is_some() {
        return Err(local(action, format!("a git setting made the fetch of {} go to {}: nothing was fetched; remove the setting (url.*.insteadOf)", source.url, one_line(&String::from_utf8_lossy(remote.url_bytes())))).into());
    }
    // The refs are counted as the server advertises them, before anything is downloaded, on
    // the connection the download then takes: counted after it, a repository of too many
    // refs sent its whole pack (up to REPO_MAX_FETCH_BYTES) at every fetch, under the
    // repository's lock, before being refused (rev12, 3).
    super::advert::reset();
    let mut connection = remote.connect_auth(Direction::Fetch, Some(callbacks(source.token.as_ref(), &source.host, &auth, abort)), None).map_err(fail)?;
    let heads = connection.list().map_err(fail)?;
    // git2 reads each advertised name as UTF-8 and panics on one that is not (a git server
    // chooses its refs' names): such a ref is left out, here and below from the mirror, so
    // that one odd name anywhere on the server does not stop every fetch of the repository.
    // Quietly: the panic hook would log each as the worker's failure.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let read: Vec<Option<(String, Oid)>> = heads.iter().map(|h| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (h.name().to_string(), h.oid()))).ok()).collect();
    std::panic::set_hook(hook);
    let unreadable = read.iter().filter(|r| r.is_none()).count();
    if unreadable > 0 {
        warn!(repo = %source.name, count = unreadable, "the server advertises refs whose names are not UTF-8; they are left out");
    }
    let advertised: Vec<(String, Oid)> = read.into_iter().flatten().filter(|(name, _)| (name.starts_with("refs/heads/") || name.starts_with("refs/tags/")) && !name.ends_with("^{}")).collect();
    let default_branch = connection.default_branch().ok().and_then(|b| b.as_str().ok().map(str::to_string));
    if advertised.is_empty() {
        return Err(RepoError::Empty { url: source.url.clone() }.into());
    }
    if advertised.len() > MAX_FETCH_REFS {
        return Err(RepoError::TooManyRefs { url: source.url.clone(), count: advertised.len(), max: MAX_FETCH_REFS }.into());
    }
    // What the server sends is counted as it arrives: past the cap the fetch stops (a
    // server streaming a pack without end filled the disk within the job's timeout).
    let over = Cell::new(false);
    // The pack's bytes, its whole objects and all its objects as they arrive: what its
    // write and its index's need.
    let received = Cell::new((0u64, 0u64, 0u64));
    let fail = |e: git2::Error| {
        let (pack, whole, objects) = received.get();
        let failed = match e.class() {
            _ if over.get() => RepoError::FetchTooBig { url: source.url.clone(), max_bytes: source.max_bytes }.into(),
            // libgit2 loses the error of a refused write of the pack's index (a buffered
            // file): the disk is asked instead, never "no error".
            ErrorClass::None => Failed::from(super::error::unsaid(dir, action, "the fetch", pack.saturating_add(layout::pack_index_bytes(objects)), "its pack and the pack's index need")),
            _ => fail(e),
        };
        // Out of room with a pack under way: how far it got says what room to make.
        failed.needing((objects > 0).then(|| layout::fetch_needs(pack, whole, objects, source.max_bytes)))
    };
    let mut cb = callbacks(source.token.as_ref(), &source.host, &auth, abort);
    cb.transfer_progress(|progress| {
        received.set((progress.received_bytes() as u64, progress.received_objects() as u64, progress.total_objects() as u64));
        if progress.received_bytes() as u64 > source.max_bytes {
            over.set(true);
        }
        !over.get() && !abort.load(Ordering::SeqCst)
    });
    let mut options = FetchOptions::new();
    options
        .remote_callbacks(cb)
        .download_tags(AutotagOption::None)
        .update_fetchhead(false)
        .follow_redirects(RemoteRedirect::None);
    // Downloads only what the mirror lacks; nothing at all when it is up to date. No ref is
    // written here (libgit2's update of the tips is left out): only below.
    connection.remote().download(&REFSPECS, Some(&mut options)).map_err(fail)?;
    drop(connection);
    drop(remote);
    let wanted: HashSet<&str> = advertised.iter().map(|(n, _)| n.as_str()).collect();
    let in_mirror = |e: git2::Error| Failed::in_mirror(super::error::git(action, &e));
    for (name, oid) in &advertised {
        // Unchanged since the refs were put back: not written again (a repository may have
        // a hundred thousand tags).
        if repo.refname_to_id(name).ok() != Some(*oid) {
            repo.reference(name, *oid, true, "claude-runner fetch").map_err(in_mirror)?;
        }
    }
    let mut stale = Vec::new();
    for glob in ["refs/heads/*", "refs/tags/*"] {
        for mut r in repo.references_glob(glob).map_err(in_mirror)?.flatten() {
            match r.name() {
                Ok(name) if !wanted.contains(name) => stale.push(name.to_string()),
                Ok(_) => {}
                // Not UTF-8 (the fetch wrote what the server had): no job can name it.
                Err(_) => {
                    let _ = r.delete();
                }
            }
        }
    }
    for name in stale {
        if let Ok(mut r) = repo.find_reference(&name) {
            let _ = r.delete();
        }
    }
    let head = default_branch
        .filter(|b| wanted.contains(b.as_str()))
        .or_else(|| ["refs/heads/main", "refs/heads/master"].into_iter().find(|b| wanted.contains(b)).map(String::from))
        .or_else(|| advertised.iter().map(|(n, _)| n.clone()).find(|n| n.starts_with("refs/heads/")));
    let Some(head) = head else {
        return Err(RepoError::Empty { url: source.url.clone() }.into());
    };
    repo.set_head(&head).map_err(in_mirror)?;
    info!(repo = %source.name, refs = advertised.len(), ms = started.elapsed().as_millis() as u64, "mirror fetched");
    Ok(Fetched { refs: advertised.into_iter().map(|(name, oid)| (name, oid.to_string())).collect(), head })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the mirrors go in the agent's hello, which the edge takes only up to
    /// `MAX_HELLO_BYTES` (64 KiB) before the agent has proved itself: over it, the agent is
    /// refused at every connection, for good (the mirrors stay on disk across restarts).
    /// The names were read whole from every folder of `DATA_DIR/repos`, which a job (the
    /// agent's user) can fill: one name file of 100 KB, or some thousands of mirrors (made
    /// by hand, or the agent's own in a cache of many small repositories), kept the agent
    /// off the edge; a pipe in place of a name file froze the thread reading it. What goes
    /// is what the edge keeps anyway: plausible names (each its own folder's), bounded.
    #[test]
    fn the_mirror_names_in_a_hello_fit_it_whatever_the_folders_hold() {
        let root = std::env::temp_dir().join(format!("cr-mirror-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cache = MirrorCache::open(root.clone(), u64::MAX).unwrap();
        let plant = |folder: &str, name: &str| {
            std::fs::create_dir_all(root.join(folder)).unwrap();
            std::fs::write(root.join(folder).join(NAME_FILE), name).unwrap();
        };
        plant("big", &"a".repeat(100_000));
        for i in 0..3000 {
            let name = format!("github.com/some-owner/a-repository-{i}");
            plant(&layout::folder(&name), &name);
        }
        std::fs::create_dir_all(root.join("pipe")).unwrap();
        crate::files::pipe_at(&root.join("pipe").join(NAME_FILE));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cache.mirror_names_from_disk());
        });
        let Ok(mirrors) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
            panic!("reading the mirror names waited on a pipe put in place of a name file");
        };
        assert!(!mirrors.is_empty() && mirrors.len() <= shared::placement::MAX_MIRRORS, "{} names", mirrors.len());
        assert!(mirrors.iter().all(|n| n.starts_with("github.com/some-owner/a-repository-")));
        assert_fits_a_hello(mirrors);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// That a hello with `mirrors`, and the rest as large as an agent makes it, is one the
    /// edge reads.
    fn assert_fits_a_hello(mirrors: Vec<String>) {
        let frame = crate::connection::largest_hello(shared::oauth::OAuthReport::unconfigured(1), mirrors);
        let max = shared::protocol::MAX_HELLO_BYTES;
        assert!(frame.len() <= max, "a hello of {} bytes, over the edge's {max}", frame.len());
    }

    /// A name passed if it was its own folder's; but a folder may be named anything, and a
    /// name of control characters (or quotes, or backslashes) takes up to 7 bytes a byte
    /// in the hello, escaped in its payload then again in its envelope: a job that made
    /// some hundred folders of them, each with its own name, took the hello past the
    /// edge's 64 KiB again, at every connection, for good. Only a repository's name, as
    /// the agent writes one, is told.
    #[test]
    fn a_mirror_name_that_no_repository_has_is_not_told() {
        let root = std::env::temp_dir().join(format!("cr-mirror-odd-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cache = MirrorCache::open(root.clone(), u64::MAX).unwrap();
        let mut planted = 0;
        for i in 0..200u8 {
            let name = format!("{}{i}", "\u{1}".repeat(140));
            let folder = layout::folder(&name);
            if std::fs::create_dir(root.join(&folder)).is_ok() {
                std::fs::write(root.join(&folder).join(NAME_FILE), &name).unwrap();
                planted += 1;
            }
        }
        let real = "github.com/some-owner/a-repository";
        std::fs::create_dir(root.join(layout::folder(real))).unwrap();
        std::fs::write(root.join(layout::folder(real)).join(NAME_FILE), real).unwrap();
        assert_eq!(planted, 200);
        let mirrors = cache.mirror_names_from_disk();
        assert_fits_a_hello(mirrors.clone());
        assert_eq!(mirrors, vec![real.to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn tokens_go_to_their_own_host_only() {
        assert!(super::on_host("https://github.com/a/b", "github.com"));
        assert!(super::on_host("https://git.example.com:8443/a/b.git", "git.example.com:8443"));
        assert!(!super::on_host("https://git.example.com:9999/a/b.git", "git.example.com:8443"), "another port");
        assert!(!super::on_host("https://evil.example/a/b.git", "github.com"));
        assert!(!super::on_host("http://github.com/a/b", "github.com"), "not over plain http");
    }
}
