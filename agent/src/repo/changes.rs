//! What a job changed in its checkout, and handing it back: a unified diff of the working
//! tree against the commit Claude started from (new, changed, deleted and renamed files,
//! `.gitignore` respected, binary files as one line, capped) with the list of changed
//! paths, and for `push_branch` the working tree staged, committed and pushed without force.
//!
//! The diff compares the working tree directly, writing nothing; only a push stages.

use super::error::{local, AuthSeen, RepoError, Talk};
use super::mirror::callbacks;
use super::settings::Token;
use git2::{Diff, DiffFindOptions, DiffFormat, DiffOptions, ErrorCode, IndexAddOption, Oid, PushOptions, RemoteRedirect, Repository, Signature};
use shared::job::{ChangeKind, FileChange};
use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// The job's changes, staged.
pub struct Staged {
    repo: Repository,
    base: Oid,
    tree: Oid,
}

/// Objects staging writes (blobs of changed files, trees, the commit) are kept in memory:
/// on a slow disk, a thousand loose-object files cost more than the rest of a push. The
/// push reads them from there.
const IN_MEMORY_PRIORITY: i32 = 1000;

/// The diff a result carries.
#[derive(Debug, Default, PartialEq)]
pub struct Patch {
    pub text: String,
    pub truncated: bool,
    pub files: Vec<FileChange>,
}

/// Stages everything in the checkout's working tree: the tree Claude left behind, to push.
pub fn stage(dir: &Path, base: Oid) -> Result<Staged, RepoError> {
    let action = "collect the job's changes";
    let repo = Repository::open(dir).map_err(|e| local(action, e.message()))?;
    repo.odb().and_then(|odb| odb.add_new_mempack_backend(IN_MEMORY_PRIORITY).map(drop)).map_err(|e| local(action, e.message()))?;
    let tree = {
        let mut index = repo.index().map_err(|e| local(action, e.message()))?;
        index.add_all(["*"], IndexAddOption::DEFAULT, None).map_err(|e| local(action, e.message()))?;
        index.update_all(["*"], None).map_err(|e| local(action, e.message()))?;
        index.write_tree().map_err(|e| local(action, e.message()))?
    };
    Ok(Staged { repo, base, tree })
}

/// The unified diff of everything in the working tree at `dir` against `base`, cut at
/// `max_bytes` (on a line boundary), and every changed path. Reads files; writes nothing.
pub fn patch(dir: &Path, base: Oid, max_bytes: usize) -> Result<Patch, RepoError> {
    let action = "compute the diff";
    let repo = Repository::open(dir).map_err(|e| local(action, e.message()))?;
    let old = repo.find_commit(base).and_then(|c| c.tree()).map_err(|e| local(action, e.message()))?;
    let mut options = DiffOptions::new();
    options.context_lines(3).include_untracked(true).recurse_untracked_dirs(true).show_untracked_content(true);
    // Through the index, whose stat data spare hashing the files nobody touched.
    let mut diff = repo.diff_tree_to_workdir_with_index(Some(&old), Some(&mut options)).map_err(|e| local(action, e.message()))?;
    diff.find_similar(Some(DiffFindOptions::new().renames(true).for_untracked(true))).map_err(|e| local(action, e.message()))?;
    print(&diff, max_bytes)
}

fn print(diff: &Diff<'_>, max_bytes: usize) -> Result<Patch, RepoError> {
    let mut files = Vec::new();
    for delta in diff.deltas() {
        let path = |f: git2::DiffFile| f.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let (status, old_path) = match delta.status() {
            git2::Delta::Added | git2::Delta::Copied | git2::Delta::Untracked => (ChangeKind::Added, None),
            git2::Delta::Deleted => (ChangeKind::Deleted, None),
            git2::Delta::Renamed => (ChangeKind::Renamed, Some(path(delta.old_file()))),
            _ => (ChangeKind::Modified, None),
        };
        let file = if status == ChangeKind::Deleted { delta.old_file() } else { delta.new_file() };
        files.push(FileChange { path: path(file), status, old_path });
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
            return Err(local("compute the diff", e.message()));
        }
    }
    Ok(Patch { text: text.into_inner(), truncated: truncated.get(), files })
}

impl Staged {
    fn diff(&self) -> Result<Diff<'_>, RepoError> {
        let action = "compute the diff";
        let old = self.repo.find_commit(self.base).and_then(|c| c.tree()).map_err(|e| local(action, e.message()))?;
        let new = self.repo.find_tree(self.tree).map_err(|e| local(action, e.message()))?;
        let mut diff = self.repo.diff_tree_to_tree(Some(&old), Some(&new), None).map_err(|e| local(action, e.message()))?;
        diff.find_similar(Some(DiffFindOptions::new().renames(true))).map_err(|e| local(action, e.message()))?;
        Ok(diff)
    }

    /// The diff of what would be pushed (as [`patch`] gives it for the working tree).
    #[cfg(test)]
    pub fn patch(&self, max_bytes: usize) -> Result<Patch, RepoError> {
        print(&self.diff()?, max_bytes)
    }

    /// Whether any line the job added holds text `is_secret` flags (the whole diff is read,
    /// uncapped: nothing may be pushed unseen).
    pub fn adds_secret(&self, is_secret: impl Fn(&str) -> bool) -> Result<bool, RepoError> {
        let diff = self.diff()?;
        let found = Cell::new(false);
        let printed = diff.print(DiffFormat::Patch, |_d, _h, line| {
            if line.origin() == '+' && is_secret(&String::from_utf8_lossy(line.content())) {
                found.set(true);
                return false;
            }
            true
        });
        match printed {
            Err(e) if !found.get() => Err(local("compute the diff", e.message())),
            _ => Ok(found.get()),
        }
    }

    /// Commits the staged tree on top of what Claude left at HEAD (its own commits kept
    /// when they follow the start commit). None when nothing changed since the start.
    pub fn commit(&self, author_name: &str, author_email: &str, message: &str) -> Result<Option<Oid>, RepoError> {
        let action = "commit the job's changes";
        let err = |e: git2::Error| local(action, e.message());
        let head = self.repo.head().and_then(|h| h.peel_to_commit()).ok().map(|c| c.id());
        let parent = match head {
            Some(h) if h == self.base || self.repo.graph_descendant_of(h, self.base).unwrap_or(false) => h,
            _ => self.base,
        };
        let parent = self.repo.find_commit(parent).map_err(err)?;
        if parent.tree_id() == self.tree {
            return Ok((parent.id() != self.base).then(|| parent.id()));
        }
        let tree = self.repo.find_tree(self.tree).map_err(err)?;
        let sig = Signature::now(author_name, author_email).map_err(err)?;
        self.repo.commit(None, &sig, &sig, message, &tree, &[&parent]).map(Some).map_err(err)
    }

    /// Pushes `commit` to `branch` of `url`: never to `default_branch`, never over a
    /// branch tip that is not an ancestor of `commit` (no force), token via callback only,
    /// no redirects followed.
    pub fn push(&self, push: &PushTarget, commit: Oid, abort: &AtomicBool) -> Result<(), RepoError> {
        let action = "push the job's commit";
        let branch = &push.branch;
        if push.default_branch.as_deref() == Some(branch.as_str()) {
            return Err(RepoError::PushToDefault { branch: branch.clone() });
        }
        const LOCAL: &str = "refs/claude-runner/push";
        self.repo.reference(LOCAL, commit, true, "claude-runner push").map_err(|e| local(action, e.message()))?;
        let auth = Cell::new(AuthSeen::default());
        let fail = |e: git2::Error| {
            Talk { url: &push.url, host: &push.host, auth: auth.get(), action, pushing: true }.error(e.code(), e.class(), e.message())
        };
        let mut remote = self.repo.remote_anonymous(&push.url).map_err(|e| local(action, e.message()))?;
        let rejected: RefCell<Option<String>> = RefCell::new(None);
        let mut cb = callbacks(push.token.as_ref(), &push.host, &auth, abort);
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
        let pushed = remote.push(&[format!("{LOCAL}:refs/heads/{branch}")], Some(&mut options));
        drop(options);
        drop(remote);
        if let Err(e) = pushed {
            let lower = e.message().to_ascii_lowercase();
            if e.code() == ErrorCode::NotFastForward || lower.contains("non-fastforward") || lower.contains("not present locally") {
                return Err(RepoError::NotFastForward { branch: branch.clone() });
            }
            return Err(fail(e));
        }
        if let Some(message) = rejected.take() {
            return Err(RepoError::PushRejected { branch: branch.clone(), message });
        }
        Ok(())
    }
}

/// Where `push_branch` goes.
pub struct PushTarget {
    pub url: String,
    pub host: String,
    pub token: Option<Token>,
    pub branch: String,
    /// The repository's default branch, as last fetched.
    pub default_branch: Option<String>,
}
