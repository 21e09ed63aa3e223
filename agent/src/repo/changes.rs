//! What a job changed in its checkout, and handing it back: the working tree staged
//! ([`stage`], see [`super::staging`]), a unified diff of it against the commit Claude
//! started from (new, changed, deleted and renamed files, `.gitignore` respected, binary
//! files as one line, capped) with the list of changed paths, and for `push_branch` the
//! staged tree committed and pushed without force.
//!
//! The diff is the staged tree's ([`Staged::patch`]): the working tree is read once, from
//! descriptors, for the diff and the push alike. libgit2's own diff of the working tree
//! read each file by its path (a FIFO swapped in held it, a huge file was read whole).

use super::checkout::FileSystem;
use super::error::{git, local, one_line, AuthSeen, RepoError, Talk};
use super::mirror::{callbacks, own_config};
use super::settings::Token;
use super::staging;
use crate::redact;
use git2::{Diff, DiffFindOptions, DiffFormat, DiffOptions, ErrorCode, Oid, PushOptions, RemoteRedirect, Repository, Signature};
use shared::job::{ChangeKind, FileChange};
use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The job's changes, staged.
pub struct Staged {
    repo: Repository,
    base: Oid,
    /// What Claude left at HEAD, read once as the changes were staged: the commits the
    /// checks read and the push carries are those under it. HEAD is in the checkout's
    /// `.git`, the job's to write: read again at each step, a process the job left that
    /// moved it after the search for secrets had a commit pushed that it never read
    /// (review rev45a-1).
    head: Option<Oid>,
    tree: Oid,
    fs: FileSystem,
    /// Why the staged tree may not be pushed, though its diff is shown: a file over
    /// [`MAX_PUSH_FILE_BYTES`] (staged unread), a FIFO where a tracked file was, a
    /// repository the job made inside the checkout ([`super::staging::Plan::unpushable`]).
    unpushable: Option<RepoError>,
    /// Files were staged unread, past what staging reads ([`MAX_DIFF_READ_BYTES`] for a
    /// diff alone): the diff says it was cut.
    cut: bool,
}

/// Objects staging writes (blobs of changed files, trees, the commit) are kept in memory
/// when the changed files are small together: on a slow disk, a thousand loose-object
/// files cost more than the rest of a push. The push reads them from there.
const IN_MEMORY_PRIORITY: i32 = 1000;
const IN_MEMORY_MAX_BYTES: u64 = 64 << 20;
/// The most of the working tree's files a hand-back without a push (`include_diff` alone)
/// reads, all kept in memory: nothing of them is written to the checkout's object store.
/// Past it each file is staged unread ([`super::staging`]'s `UNREAD`), shown as a binary
/// change, and the diff says it was cut. A diff shows at most `MAX_DIFF_BYTES` (6 MiB):
/// a job writing 20 GB of output had it all written to DATA_DIR's disk for that.
pub const MAX_DIFF_READ_BYTES: u64 = IN_MEMORY_MAX_BYTES;
/// The most of the working tree's files a push carries together: more is refused, by the
/// sizes listed, before any file is read ([`RepoError::ChangesTooBig`]); each file read
/// counts, so files grown since are refused as they are read. A push's blobs past
/// [`IN_MEMORY_MAX_BYTES`] are written to the checkout's object store, on DATA_DIR's disk.
pub const MAX_PUSH_BYTES: u64 = 1 << 30;
/// The largest file a push carries: git servers refuse bigger ones (GitHub: 100 MiB), and
/// a push holds a file in memory about twice over.
pub const MAX_PUSH_FILE_BYTES: u64 = 100 << 20;
/// libgit2's delta search keeps whole objects in memory; above this size an object is
/// sent as it is. (libgit2 1.9 reads this limit from `pack.deltaCacheSize`, later ones
/// may read `core.bigFileThreshold`; both are set.)
const DELTA_MAX_OBJECT_BYTES: i64 = 8 << 20;
const DELTA_WINDOW_BYTES: i64 = 32 << 20;

/// The diff a result carries.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Patch {
    pub text: String,
    pub truncated: bool,
    pub files: Vec<FileChange>,
    /// `files` stops at [`MAX_FILES_CHANGED`] or [`MAX_FILES_CHANGED_BYTES`].
    pub files_truncated: bool,
}

/// The most paths `files_changed` lists. A job can change any number (150,000 files with
/// 2 KB paths made the git worker hold 1.2 GB and the agent 600 MB, for a list the result's
/// frame then cut to 2,343 without a word).
pub const MAX_FILES_CHANGED: usize = 50_000;
/// The most bytes the listed paths take as JSON in a result's frame (where each `"` and
/// `\` of the JSON takes two): a quarter of the frame, with the diff beside it.
pub const MAX_FILES_CHANGED_BYTES: usize = shared::protocol::MAX_FRAME_BYTES / 4;

/// Opens the checkout at `dir` after Claude ran, once its `.git` is a folder holding only
/// files and folders: libgit2 opens what it finds there by path (config, HEAD, refs, the
/// index, `commondir`, a `.git` file naming another folder, `info/attributes`), and a FIFO
/// a job put there blocked the job's hand-back for ever — its slot, the agent's drain and
/// exit with it. Its config is the agent's again first ([`put_back_config`]).
///
/// Opened as a bare repository, without the working tree: libgit2 reads nothing of it
/// (staging lists and reads it from descriptors, [`super::staging`]), and takes the
/// attributes from the index, as staged.
fn open_checkout(dir: &Path, fs: FileSystem, action: &'static str) -> Result<Repository, RepoError> {
    let dot_git = dir.join(".git");
    let shown = |odd: &Path| one_line(&odd.strip_prefix(dir).unwrap_or(odd).display().to_string());
    // A folder (not a link, not a `.git` file naming another) before anything is written in it.
    if !std::fs::symlink_metadata(&dot_git).map_err(|e| local(action, e))?.is_dir() {
        return Err(RepoError::OddGitEntry { path: shown(&dot_git) });
    }
    put_back_config(&dot_git, fs).map_err(|e| local(action, e))?;
    let mut odd = crate::files::odd_entries(&dot_git, 1).map_err(|e| local(action, e))?;
    // `commondir` sends libgit2 to another folder for config, refs and objects.
    odd.extend(["commondir", "gitdir"].map(|f| dot_git.join(f)).into_iter().filter(|p| std::fs::symlink_metadata(p).is_ok()));
    if let Some(odd) = odd.first() {
        return Err(RepoError::OddGitEntry { path: shown(odd) });
    }
    // libgit2 reads it whole, by path, for the attributes of each file staged or diffed.
    let attributes = dot_git.join("info/attributes");
    if let Ok(meta) = std::fs::symlink_metadata(&attributes) {
        if meta.len() > super::untracked::MAX_IGNORE_BYTES {
            return Err(local(action, format!("the checkout's `.git/info/attributes` is {} bytes, more than git reads of one ({} MiB): ask Claude not to change the repository's .git folder", meta.len(), super::untracked::MAX_IGNORE_BYTES >> 20)));
        }
    }
    // The `.git` folder itself, as a bare repository: no search upward, no `.git` file,
    // and neither `core.worktree` nor `core.bare` of its config (the job's to write) read.
    let err = |e: git2::Error| git(action, &e);
    let repo = Repository::open_bare(&dot_git).map_err(err)?;
    // No config at all from here on but what libgit2 found the file system can hold: the
    // checkout's `core.symlinks = false` had a link read as the file it names,
    // `core.attributesFile`, `core.excludesFile` and `filter.*` run or read what the job
    // chose (the user's and the system's files are not searched: see
    // `mirror::set_timeouts`).
    own_config(&repo, &fs.settings()).map_err(err)?;
    Ok(repo)
}

/// Replaces the checkout's config (in `git`, its `.git` folder) with the agent's — what
/// libgit2 wrote as it made the checkout, `fs` as it found the file system — whole and at
/// once (a temporary renamed over it: what was there is never opened; a folder there goes
/// first). libgit2 reads that file as it opens the repository, before [`own_config`]
/// replaces what it read, and opens what it includes (`include.path`, `includeIf`): a FIFO
/// named there held the hand-back until the job's time, a file outside chose how the
/// checkout is read (an extension libgit2 refuses failed it). One put there again after
/// this (Claude's processes are gone by then) holds only the git worker.
fn put_back_config(git: &Path, fs: FileSystem) -> std::io::Result<()> {
    let FileSystem { filemode, symlinks, ignorecase } = fs;
    let text = format!("[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tfilemode = {filemode}\n\tsymlinks = {symlinks}\n\tignorecase = {ignorecase}\n");
    let config = git.join("config");
    // A job may leave `.git` read-only or closed, as any folder of its workspace: the
    // diff, which wrote nothing there before, then failed. It is the agent's user's.
    crate::files::open_up_folder(git)?;
    if std::fs::symlink_metadata(&config).is_ok_and(|m| m.is_dir()) {
        crate::files::remove_tree(&config)?;
    }
    crate::files::write_atomically(&config, text.as_bytes(), false)
}

/// Stages everything in the checkout's working tree: the tree Claude left behind, for its
/// diff and to push. Each file is read from a descriptor, to at most what a push carries,
/// never by its path (see [`super::staging`]); what a push may not carry is kept aside
/// ([`Staged::pushable`]). `abort` stops it between two files. For the tests: the
/// hand-back stages with [`stage_for`].
#[cfg(test)]
pub fn stage(dir: &Path, base: Oid, fs: FileSystem, abort: &AtomicBool) -> Result<Staged, RepoError> {
    stage_then(dir, base, fs, true, abort, || ())
}

/// [`stage`] for a push (`push`), or for a diff alone: then at most [`MAX_DIFF_READ_BYTES`]
/// of the files is read, kept in memory, the rest staged unread (the diff says it was cut),
/// and nothing of them written to the checkout's object store. A push of more than
/// [`MAX_PUSH_BYTES`] is staged as a diff alone, and refused.
pub fn stage_for(dir: &Path, base: Oid, fs: FileSystem, push: bool, abort: &AtomicBool) -> Result<Staged, RepoError> {
    stage_then(dir, base, fs, push, abort, || ())
}

/// [`stage_for`], running `listed` once the changes are listed and measured, before any
/// file is read (the tests' hold there, as a process the job left running may swap a file).
pub(super) fn stage_then(dir: &Path, base: Oid, fs: FileSystem, push: bool, abort: &AtomicBool, listed: impl FnOnce()) -> Result<Staged, RepoError> {
    let action = "collect the job's changes";
    let repo = open_checkout(dir, fs, action)?;
    // HEAD once, for every step after: see `Staged::head`.
    let head = repo.head().and_then(|h| h.peel_to_commit()).ok().map(|c| c.id());
    // Sizes first, from the file system: nothing too big is ever read.
    let (mut index, mut plan) = staging::list(&repo, head, dir, fs, abort)?;
    let too_much = |bytes: u64| RepoError::ChangesTooBig { mib: bytes.div_ceil(1 << 20), max_mib: MAX_PUSH_BYTES >> 20 };
    if push && plan.bytes > MAX_PUSH_BYTES {
        plan.unpushable.get_or_insert(too_much(plan.bytes));
    }
    let pushing = push && plan.unpushable.is_none();
    let budget = if pushing { MAX_PUSH_BYTES } else { MAX_DIFF_READ_BYTES };
    if !pushing || plan.bytes <= IN_MEMORY_MAX_BYTES {
        repo.odb().and_then(|odb| odb.add_new_mempack_backend(IN_MEMORY_PRIORITY).map(drop)).map_err(|e| git(action, &e))?;
    }
    listed();
    let staging::Staging { mut unpushable, unread } = plan.stage(&repo, &mut index, dir, fs, budget, abort)?;
    // Files grown past the push's bytes since they were measured: never pushed unread.
    if let Some(at_least) = unread.filter(|_| pushing) {
        unpushable.get_or_insert(too_much(at_least));
    }
    // Trees are loose objects too past what is kept in memory: each entry's mode, name and id.
    let trees: usize = index.iter().map(|e| e.path.len() + 32).sum();
    let tree = index.write_tree().map_err(|e| super::error::wrote(&repo.path().join("objects"), action, &e, "the job's changes", staging::loose_object_bytes(trees), "their trees need"))?;
    let head = head.filter(|&head| head == base || repo.graph_descendant_of(head, base).unwrap_or(false));
    Ok(Staged { repo, base, head, tree, fs, unpushable, cut: unread.is_some() })
}

pub(super) fn too_big(path: &str, bytes: u64) -> Result<(), RepoError> {
    match bytes > MAX_PUSH_FILE_BYTES {
        true => Err(RepoError::FileTooBig { path: one_line(path), mib: bytes.div_ceil(1 << 20), max_mib: MAX_PUSH_FILE_BYTES >> 20 }),
        false => Ok(()),
    }
}

/// The unified diff of everything in the working tree at `dir` against `base`, as a
/// hand-back makes it ([`Staged::patch`]), for the tests.
#[cfg(test)]
pub fn patch(dir: &Path, base: Oid, fs: FileSystem, max_bytes: usize) -> Result<Patch, RepoError> {
    stage_for(dir, base, fs, false, &AtomicBool::new(false))?.patch(max_bytes)
}

pub(super) fn print(diff: &Diff<'_>, max_bytes: usize) -> Result<Patch, RepoError> {
    let mut files = Vec::new();
    let (mut files_bytes, mut files_truncated) = (0, false);
    for delta in diff.deltas() {
        let path = |f: git2::DiffFile| f.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let (status, old_path) = match delta.status() {
            git2::Delta::Added | git2::Delta::Copied | git2::Delta::Untracked => (ChangeKind::Added, None),
            git2::Delta::Deleted => (ChangeKind::Deleted, None),
            git2::Delta::Renamed => (ChangeKind::Renamed, Some(path(delta.old_file()))),
            _ => (ChangeKind::Modified, None),
        };
        let file = if status == ChangeKind::Deleted { delta.old_file() } else { delta.new_file() };
        let change = FileChange { path: path(file), status, old_path };
        files_bytes += framed_bytes(&change);
        if files.len() == MAX_FILES_CHANGED || files_bytes > MAX_FILES_CHANGED_BYTES {
            files_truncated = true;
            break;
        }
        files.push(change);
    }
    let text = RefCell::new(String::new());
    let truncated = Cell::new(false);
    let printed = diff.print(DiffFormat::Patch, |_delta, _hunk, line| {
        let content = String::from_utf8_lossy(line.content());
        let prefix = matches!(line.origin(), '+' | '-' | ' ').then(|| line.origin());
        let need = content.len() + prefix.map_or(0, |_| 1);
        let mut text = text.borrow_mut();
        if text.len() + need > max_bytes {
            truncated.set(true);
            return false;
        }
        if let Some(p) = prefix {
            text.push(p);
        }
        text.push_str(&content);
        true
    });
    if let Err(e) = printed {
        if !truncated.get() {
            return Err(git("compute the diff", &e));
        }
    }
    Ok(Patch { text: text.into_inner(), truncated: truncated.get(), files, files_truncated })
}

/// The bytes `change` takes in a result's frame: its JSON, each `"` and `\` twice.
fn framed_bytes(change: &FileChange) -> usize {
    serde_json::to_string(change).map_or(usize::MAX / 2, |text| 1 + text.len() + text.bytes().filter(|b| matches!(b, b'"' | b'\\')).count())
}

impl Staged {
    fn diff(&self) -> Result<Diff<'_>, RepoError> {
        let action = "compute the diff";
        let old = self.repo.find_commit(self.base).and_then(|c| c.tree()).map_err(|e| git(action, &e))?;
        let new = self.repo.find_tree(self.tree).map_err(|e| git(action, &e))?;
        let mut options = DiffOptions::new();
        // A blob over what a push carries is binary, its content never loaded: one Claude
        // staged itself (`git add`), which the push refuses.
        options.context_lines(3).max_size(MAX_PUSH_FILE_BYTES as i64);
        let mut diff = self.repo.diff_tree_to_tree(Some(&old), Some(&new), Some(&mut options)).map_err(|e| git(action, &e))?;
        diff.find_similar(Some(DiffFindOptions::new().renames(true))).map_err(|e| git(action, &e))?;
        Ok(diff)
    }

    /// The unified diff of the staged tree — the working tree, as read — against the start
    /// commit, cut at `max_bytes` (on a line boundary), and every changed path: a job's
    /// `include_diff`. A file over what a push carries shows as a binary change, unread, as
    /// does one past what staging read (then the diff is cut: `truncated`).
    pub fn patch(&self, max_bytes: usize) -> Result<Patch, RepoError> {
        let mut patch = print(&self.diff()?, max_bytes)?;
        patch.truncated |= self.cut;
        Ok(patch)
    }

    /// Whether the push may carry the staged tree: the first reason it may not, kept aside
    /// as it was staged (a file over [`MAX_PUSH_FILE_BYTES`], a FIFO where a tracked file
    /// was, a repository inside the checkout), else every file of the tree and of Claude's
    /// own commits under [`MAX_PUSH_FILE_BYTES`] ([`Staged::check_sizes`]). Before anything
    /// reads a file's content for the push (the search for secrets reads each whole).
    pub fn pushable(&self) -> Result<(), RepoError> {
        if let Some(why) = &self.unpushable {
            return Err(why.clone());
        }
        self.check_sizes()
    }

    /// Whether anything the push would carry holds text `is_secret` flags: a line the job
    /// added, a file's name (a rename's old one too), a binary file's bytes, and in Claude's
    /// own commits each one's — and its message and names: a token committed and taken out
    /// again by a later commit still travels in the history. The whole diffs are read,
    /// uncapped: nothing may be pushed unseen.
    pub fn adds_secret(&self, is_secret: impl Fn(&str) -> bool) -> Result<bool, RepoError> {
        if added_lines_hold(&self.repo, &self.diff()?, &is_secret)? {
            return Ok(true);
        }
        for (commit, diff) in self.own_commits()? {
            let (author, committer) = (commit.author(), commit.committer());
            // The whole header, not only the names: any other line (`gpgsig`, `mergetag`,
            // one made up) travels with the commit too.
            let said = [commit.message_bytes(), commit.raw_header_bytes(), author.name_bytes(), author.email_bytes(), committer.name_bytes(), committer.email_bytes()];
            if said.iter().any(|text| is_secret(&String::from_utf8_lossy(text))) || added_lines_hold(&self.repo, &diff, &is_secret)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Claude's own commits that the push carries, each with its diff against its first
    /// parent (a first commit: against nothing).
    fn own_commits(&self) -> Result<Vec<(git2::Commit<'_>, Diff<'_>)>, RepoError> {
        let err = |e: git2::Error| git("compute the diff", &e);
        let Some(head) = self.head.filter(|h| *h != self.base) else { return Ok(Vec::new()) };
        let mut walk = self.repo.revwalk().map_err(err)?;
        walk.push(head).map_err(err)?;
        walk.hide(self.base).map_err(err)?;
        let mut out = Vec::new();
        for id in walk {
            let commit = self.repo.find_commit(id.map_err(err)?).map_err(err)?;
            let parent = commit.parents().next().map(|p| p.tree()).transpose().map_err(err)?;
            let diff = self.repo.diff_tree_to_tree(parent.as_ref(), Some(&commit.tree().map_err(err)?), None).map_err(err)?;
            out.push((commit, diff));
        }
        Ok(out)
    }

    /// Every file the push would carry over [`MAX_PUSH_FILE_BYTES`] is an error: the staged
    /// tree's and those of Claude's own commits, which the working tree no longer shows (a
    /// 2 GB file committed was read whole, for secrets, before the push refused it). Sizes
    /// from the object headers; nothing is read. The diffs look for no renames: that reads
    /// the files.
    fn check_sizes(&self) -> Result<(), RepoError> {
        let err = |e: git2::Error| git("collect the job's changes", &e);
        let odb = self.repo.odb().map_err(err)?;
        let old = self.repo.find_commit(self.base).and_then(|c| c.tree()).map_err(err)?;
        let new = self.repo.find_tree(self.tree).map_err(err)?;
        let staged = self.repo.diff_tree_to_tree(Some(&old), Some(&new), None).map_err(err)?;
        let own = self.own_commits()?;
        for diff in std::iter::once(&staged).chain(own.iter().map(|(_, d)| d)) {
            for delta in diff.deltas().filter(|d| !d.new_file().id().is_zero() && d.status() != git2::Delta::Deleted) {
                // A submodule's entry names a commit of another repository: no object here.
                if delta.new_file().mode() == git2::FileMode::Commit {
                    continue;
                }
                let (bytes, _) = odb.read_header(delta.new_file().id()).map_err(err)?;
                too_big(&delta.new_file().path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(), bytes as u64)?;
            }
        }
        Ok(())
    }

    /// Commits the staged tree on top of what Claude left at HEAD (its own commits kept
    /// when they follow the start commit). None when nothing changed since the start.
    pub fn commit(&self, author_name: &str, author_email: &str, message: &str) -> Result<Option<Oid>, RepoError> {
        // Never a commit of a tree the push may not carry (a file staged unread).
        self.pushable()?;
        let action = "commit the job's changes";
        let err = |e: git2::Error| git(action, &e);
        let parent = self.head.unwrap_or(self.base);
        let parent = self.repo.find_commit(parent).map_err(err)?;
        if parent.tree_id() == self.tree {
            return Ok((parent.id() != self.base).then(|| parent.id()));
        }
        let tree = self.repo.find_tree(self.tree).map_err(err)?;
        let sig = Signature::now(author_name, author_email).map_err(err)?;
        let needs = staging::loose_object_bytes(message.len() + 2 * (author_name.len() + author_email.len()) + 256);
        self.repo.commit(None, &sig, &sig, message, &tree, &[&parent]).map(Some).map_err(|e| super::error::wrote(&self.repo.path().join("objects"), action, &e, "the job's commit", needs, "the commit needs"))
    }

    /// Pushes `commit` to `branch` of `url`: never to `default_branch`, never over a
    /// branch tip that is not an ancestor of `commit` (no force), token via callback only,
    /// no redirects followed.
    ///
    /// `begins` is called at the last moment the push can stop (libgit2's push negotiation):
    /// after it nothing more stops it, and the server may take it. `false` from it (nobody
    /// heard) stops it there. A push that fails after it is in doubt
    /// ([`RepoError::PushInDoubt`]) unless the server said no.
    pub fn push(&self, push: &PushTarget, commit: Oid, abort: &AtomicBool, begins: &dyn Fn() -> bool) -> Result<(), RepoError> {
        let action = "push the job's commit";
        let branch = &push.branch;
        if push.default_branch.as_deref() == Some(branch.as_str()) {
            return Err(RepoError::PushToDefault { branch: branch.clone() });
        }
        self.repo.reference(PUSH_REF, commit, true, "claude-runner push").map_err(|e| git(action, &e))?;
        let auth = Cell::new(AuthSeen::default());
        let fail = |e: git2::Error| {
            Talk { url: &push.url, host: &push.host, auth: auth.get(), action, pushing: true }.error(e.code(), e.class(), e.message())
        };
        // The checkout's config is the job's to write: none of it is read (see
        // `open_checkout`), or its `pushInsteadOf` would send the commit, and the token,
        // elsewhere; the pack limits join what the file system can hold.
        let pack = [("pack.deltaCacheSize", DELTA_MAX_OBJECT_BYTES), ("core.bigFileThreshold", DELTA_MAX_OBJECT_BYTES), ("pack.windowMemory", DELTA_WINDOW_BYTES)];
        let settings: Vec<_> = self.fs.settings().into_iter().chain(pack).collect();
        own_config(&self.repo, &settings).map_err(|e| git(action, &e))?;
        let mut remote = self.repo.remote_anonymous(&push.url).map_err(|e| git(action, &e))?;
        // What libgit2 would talk to, checked whatever it read: exactly the requested URL.
        let (url, pushurl) = (remote.url_bytes().to_vec(), remote.pushurl_bytes().map(<[u8]>::to_vec));
        if url != push.url.as_bytes() || pushurl.as_ref().is_some_and(|p| p != push.url.as_bytes()) {
            let went = String::from_utf8_lossy(pushurl.as_deref().unwrap_or(&url)).into_owned();
            return Err(RepoError::PushRedirected { url: push.url.clone(), to: one_line(&went) });
        }
        let rejected: RefCell<Option<String>> = RefCell::new(None);
        let began = Cell::new(false);
        let mut cb = callbacks(push.token.as_ref(), &push.host, &auth, abort);
        let moved: Cell<Option<Oid>> = Cell::new(None);
        // The last moment to stop: after it nothing more stops the push, and the server may take it.
        cb.push_negotiation(|updates| {
            // libgit2 read `PUSH_REF` again, by its path in the job's `.git`, once the
            // server told its branches: a process the job left that pointed it at a commit
            // of its own had that pushed, unchecked. Only `commit` goes.
            if let Some(other) = updates.iter().map(|u| u.dst()).find(|&id| id != commit) {
                moved.set(Some(other));
                return Err(git2::Error::from_str("the push's ref was moved"));
            }
            match abort.load(Ordering::SeqCst) || !begins() {
                true => Err(git2::Error::from_str("the push was given up before it started")),
                false => {
                    began.set(true);
                    Ok(())
                }
            }
        });
        cb.push_update_reference(|_refname, status| {
            if let Some(message) = status {
                *rejected.borrow_mut() = Some(message.to_string());
            }
            Ok(())
        });
        let mut options = PushOptions::new();
        options.remote_callbacks(cb).follow_redirects(RemoteRedirect::None);
        // No `+`: libgit2 refuses a branch tip that is not an ancestor of the commit, and the
        // server's compare-and-swap on the old tip closes the race with another push.
        // The server's list of refs is counted as it is read (`super::advert`), as a fetch's.
        super::advert::reset();
        let pushed = remote.push(&[format!("{PUSH_REF}:refs/heads/{branch}")], Some(&mut options));
        drop(options);
        drop(remote);
        if let Some(other) = moved.get() {
            return Err(local(action, format!("the push's ref in the checkout's `.git` was moved to another commit ({other}) as the push began, and nothing was pushed: a process the job left behind changed it. Run the job again, and make sure nothing it starts outlives it")));
        }
        if let Err(e) = pushed {
            // Cut before the negotiation: nothing went out.
            if let Some(cut) = super::advert::cut_error(&push.url, "pushed").filter(|_| !began.get()) {
                return Err(cut);
            }
            let lower = e.message().to_ascii_lowercase();
            if e.code() == ErrorCode::NotFastForward || lower.contains("non-fastforward") || lower.contains("not present locally") {
                return Err(RepoError::NotFastForward { branch: branch.clone() });
            }
            let detail = one_line(e.message());
            let said = fail(e);
            // Once the commit may have gone out, only the server's own "no" (to the
            // request, before it reads any of it) says nothing landed: a reset, a timeout,
            // a 5xx may come after the server updated the branch.
            let refused = matches!(said, RepoError::NoToken { .. } | RepoError::TokenRefused { .. } | RepoError::NotFound { .. } | RepoError::Redirected { .. });
            if began.get() && !refused {
                return Err(RepoError::PushInDoubt { url: push.url.clone(), branch: branch.clone(), detail });
            }
            return Err(said);
        }
        if let Some(message) = rejected.take() {
            return Err(RepoError::PushRejected { branch: branch.clone(), message: one_line(&message) });
        }
        Ok(())
    }
}

/// The checkout's ref naming the commit pushed: libgit2 pushes a ref, and looks it up by
/// its path (`.git/refs/claude-runner/push`) once the server has told its branches.
pub(super) const PUSH_REF: &str = "refs/claude-runner/push";

/// Whether a line `diff` adds holds text `is_secret` flags.
fn added_lines_hold(repo: &Repository, diff: &Diff<'_>, is_secret: &impl Fn(&str) -> bool) -> Result<bool, RepoError> {
    // The names first: a file named after a token (`$CLAUDE_CODE_OAUTH_TOKEN.bin`, even
    // empty) went to the server in the tree, since only added lines were read.
    let named = |path: Option<&Path>| path.is_some_and(|p| is_secret(&p.to_string_lossy()));
    if diff.deltas().any(|d| named(d.new_file().path()) || named(d.old_file().path())) {
        return Ok(true);
    }
    let found = Cell::new(false);
    let failed: RefCell<Option<git2::Error>> = RefCell::new(None);
    let printed = diff.print(DiffFormat::Patch, |delta, _h, line| {
        let hit = match line.origin() {
            '+' => is_secret(&String::from_utf8_lossy(line.content())),
            // A binary file prints as one "Binary files differ" line, no added lines: its
            // bytes are read (a push carries none over MAX_PUSH_FILE_BYTES), as text.
            'B' => match repo.find_blob(delta.new_file().id()) {
                Ok(blob) => binary_holds(blob.content(), is_secret),
                // A deleted binary file carries nothing new.
                Err(_) if delta.new_file().id().is_zero() => false,
                Err(e) => {
                    *failed.borrow_mut() = Some(e);
                    return false;
                }
            },
            _ => false,
        };
        if hit {
            found.set(true);
            return false;
        }
        true
    });
    if let Some(e) = failed.into_inner() {
        return Err(git("read a binary file of the changes", &e));
    }
    match printed {
        Err(e) if !found.get() => Err(git("compute the diff", &e)),
        _ => Ok(found.get()),
    }
}

/// Whether a binary file's bytes hold what `is_secret` flags, read as its text: each run
/// of printable ASCII (a token, and every encoding the redactor knows, is one), the bytes
/// the redactor reads past kept as they are ([`redact::read_past`]: NULs, so UTF-16 text
/// reads as its ASCII), anything else a line break — a window of
/// [`BINARY_WINDOW`] at a time, overlapping by [`BINARY_OVERLAP`] so no secret is split
/// unseen. Whole and lossily decoded, six random files of 15 MiB took the agent 530 MiB.
pub(super) fn binary_holds(bytes: &[u8], is_secret: &impl Fn(&str) -> bool) -> bool {
    let mut start = 0;
    loop {
        let end = (start + BINARY_WINDOW).min(bytes.len());
        let text: String = bytes[start..end]
            .iter()
            .map(|&b| if (0x20..0x7f).contains(&b) || redact::read_past(b) { b as char } else { '\n' })
            .collect();
        if is_secret(&text) {
            return true;
        }
        if end == bytes.len() {
            return false;
        }
        start = end - BINARY_OVERLAP;
    }
}

/// How much of a binary file is read as text at once.
const BINARY_WINDOW: usize = 1 << 20;
/// How far windows overlap: more than any secret, in any of its encodings, is long.
const BINARY_OVERLAP: usize = 16 * 1024;

/// Where `push_branch` goes.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct PushTarget {
    pub url: String,
    pub host: String,
    pub token: Option<Token>,
    pub branch: String,
    /// The repository's default branch, as last fetched.
    pub default_branch: Option<String>,
}
