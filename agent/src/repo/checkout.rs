//! A job's own checkout: a fresh, independent repository in the job's workspace whose
//! objects come from the mirror (`objects/info/alternates`, nothing copied), with its own
//! HEAD, index and refs — not a worktree of the mirror, whose shared state breaks under
//! concurrent jobs. Claude may do anything in it; no other job sees it.

use super::error::{git, local, RepoError};
use super::mirror::Fetched;
use super::settings::{MAX_CHECKOUT_ENTRIES, MAX_CHECKOUT_FILE_BYTES};
use git2::{build::CheckoutBuilder, ErrorClass, ErrorCode, ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};
use std::path::{Path, PathBuf};

pub struct Checkout {
    pub dir: PathBuf,
    /// The commit Claude starts from.
    pub commit: Oid,
    /// What libgit2 found the checkout's file system can hold.
    pub fs: FileSystem,
}

/// What libgit2 found the checkout's file system can hold as it made the checkout (`git
/// init` tries it, and writes the answer into the new repository's config): exec bits
/// (`core.filemode`), symbolic links (`core.symlinks`: without them a link is written as a
/// file holding its target), names told apart only by case (`core.ignorecase`). The
/// hand-back reads the checkout with these, carried from the checkout in memory: its
/// config is the job's to write by then, and with values forced whatever the file system,
/// on one without exec bits or links every such file read as changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileSystem {
    pub filemode: bool,
    pub symlinks: bool,
    pub ignorecase: bool,
}

impl FileSystem {
    /// What libgit2 wrote into the config of the repository at `git_dir` it just made
    /// (before any job could write there); git's defaults for what it left out.
    pub(super) fn detected(git_dir: &Path) -> Result<FileSystem, git2::Error> {
        let config = git2::Config::open(&git_dir.join("config"))?;
        let flag = |key: &str, default: bool| match config.get_bool(key) {
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(default),
            read => read,
        };
        Ok(FileSystem { filemode: flag("core.filemode", true)?, symlinks: flag("core.symlinks", true)?, ignorecase: flag("core.ignorecase", false)? })
    }

    /// These as settings of a repository's config (`section.key`, 0 or 1).
    pub fn settings(&self) -> [(&'static str, i64); 3] {
        [("core.filemode", self.filemode.into()), ("core.symlinks", self.symlinks.into()), ("core.ignorecase", self.ignorecase.into())]
    }
}

/// What `branch` named in the mirror.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// A branch: the checkout gets a local branch of that name.
    Branch(String, Oid),
    /// A tag or a commit: a detached HEAD.
    Detached(Oid),
}

/// The refs `branch` is looked up in: what the fetch found on the server, never the
/// mirror's own refs (a job may have moved or planted them).
struct Refs<'a> {
    mirror: &'a Repository,
    fetched: &'a Fetched,
}

impl Refs<'_> {
    /// The object `name` (`refs/…`) points at.
    fn get(&self, name: &str) -> Option<Oid> {
        self.fetched.refs.get(name).and_then(|hex| Oid::from_str(hex).ok())
    }

    /// The default branch's ref name.
    fn head(&self) -> &str {
        &self.fetched.head
    }

    /// The commit `name` leads to (through an annotated tag).
    fn commit(&self, name: &str) -> Option<Result<Oid, git2::Error>> {
        let id = self.get(name)?;
        Some(self.mirror.find_object(id, None).and_then(|o| o.peel_to_commit()).map(|c| c.id()))
    }
}

/// A failure reading an object the mirror must hold (the commit the fetch's record names,
/// its trees and files): [`RepoError::MirrorBroken`] when the mirror's objects are at fault
/// (missing, or bytes that do not inflate or hash right: a job can overwrite its mirror's
/// packs, found through its checkout's `objects/info/alternates`), so that the next fetch
/// makes the mirror anew ([`super::mirror::Lease::broken`]); every checkout of the
/// commit failed until the agent restarted (rev12, 2).
fn reading(action: &'static str, url: &str, e: git2::Error) -> RepoError {
    // A tag that leads to no commit is the repository's, not the mirror's.
    if matches!(e.class(), ErrorClass::Odb | ErrorClass::Zlib | ErrorClass::Object) && e.code() != ErrorCode::Peel {
        return RepoError::MirrorBroken { url: url.to_string(), detail: super::error::one_line(e.message()) };
    }
    git(action, &e)
}

fn resolve(mirror: &Repository, fetched: &Fetched, branch: Option<&str>, url: &str) -> Result<Start, RepoError> {
    let action = "read the mirror";
    let refs = Refs { mirror, fetched };
    let Some(branch) = branch else {
        let head = refs.head().to_string();
        let commit = refs.commit(&head).ok_or_else(|| local(action, format!("{head} is missing")))?.map_err(|e| reading(action, url, e))?;
        let name = head.strip_prefix("refs/heads/").unwrap_or("main").to_string();
        return Ok(Start::Branch(name, commit));
    };
    let not_found = || RepoError::BranchNotFound { branch: branch.to_string(), url: url.to_string() };
    // By id only (revparse would take a ref of that name first).
    let as_commit = || shared::repo::looks_like_sha(branch).then(|| mirror.find_object_by_prefix(branch, None).and_then(|o| o.peel_to_commit()).ok().map(|c| c.id())).flatten();
    if shared::repo::is_full_sha(branch) {
        // A whole id is that commit, never a ref of that name: anyone who can push can
        // make a branch named after a reviewed commit.
        return as_commit().map(Start::Detached).ok_or_else(not_found);
    }
    let named = match refs.commit(&format!("refs/heads/{branch}")) {
        Some(commit) => Some(("branch", Start::Branch(branch.to_string(), commit.map_err(|e| reading(action, url, e))?))),
        None => match refs.commit(&format!("refs/tags/{branch}")) {
            Some(Ok(commit)) => Some(("tag", Start::Detached(commit))),
            _ => None,
        },
    };
    match (named, as_commit()) {
        (Some((kind, _)), Some(commit)) => Err(RepoError::AmbiguousBranch { branch: branch.to_string(), kind: kind.into(), commit: commit.to_string(), url: url.to_string() }),
        (Some((_, start)), None) => Ok(start),
        (None, Some(commit)) => Ok(Start::Detached(commit)),
        (None, None) => Err(not_found()),
    }
}

/// Makes `dir` (which must not exist yet, or be empty) a checkout of `branch` (default:
/// the default branch the fetch found) with the mirror's objects.
/// `fetched`: what the mirror's last fetch found ([`super::mirror::Lease::fetched`]).
/// `max_bytes`: `REPO_MAX_CHECKOUT_BYTES`; `claimed`: the room it must leave for the
/// claims ahead of its job ([`super::claim::leave`]).
pub fn create(mirror_dir: &Path, fetched: &Fetched, dir: &Path, branch: Option<&str>, url: &str, (max_bytes, claimed): (u64, Option<super::claim::Claimed>)) -> Result<Checkout, RepoError> {
    let action = "check out the repository";
    let mirror = Repository::open_bare(mirror_dir).map_err(|e| git(action, &e))?;
    let start = resolve(&mirror, fetched, branch, url)?;
    let start_commit = match &start {
        Start::Branch(_, commit) | Start::Detached(commit) => *commit,
    };
    let measured = fits(&mirror, start_commit, (max_bytes, MAX_CHECKOUT_FILE_BYTES, MAX_CHECKOUT_ENTRIES), url)?;
    // The workspaces' folder (the job's own is made below): its disk must hold the checkout.
    let workspaces = dir.parent().unwrap_or(dir);
    let space = crate::workspace::disk_space(workspaces).map_err(|e| local(action, e))?;
    room(measured, space, url)?;
    super::claim::leave(claimed, measured.needed(space.block), space, url)?;
    // From here the checkout is written. A full disk met room that was measured free
    // (`room`): what the checkout needs goes with it, for the verdict once it is removed
    // (`runner::full_disk`).
    let filled = |e: RepoError| match e {
        RepoError::DiskFull { detail, .. } => RepoError::DiskFull { detail, needed: Some(measured.needed(space.block)), fetch_needs: None },
        other => other,
    };
    let io = |e: std::io::Error| filled(local(action, e));
    // libgit2 loses the error of a write refused in one of its buffered files (its
    // `filebuf`: the index, written last, or the config): it fails without a word ("no
    // error", of no class), and the disk is asked instead ([`unsaid`]).
    let failed = |e: git2::Error| {
        filled(match e.class() {
            ErrorClass::None => super::error::unsaid(dir, action, "the checkout", measured.index, "its index needs"),
            _ => reading(action, url, e),
        })
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    // No template folder: git's system one is a dozen sample hooks written for nothing.
    let mut init = git2::RepositoryInitOptions::new();
    init.external_template(false);
    let repo = Repository::init_opts(dir, &init).map_err(failed)?;
    let fs = FileSystem::detected(repo.path()).map_err(failed)?;
    let objects = mirror_dir.canonicalize().map_err(io)?.join("objects");
    std::fs::write(repo.path().join("objects/info/alternates"), format!("{}\n", objects.display())).map_err(io)?;
    // Opened again: a repository reads its alternates when opened.
    drop(repo);
    let repo = Repository::open(dir).map_err(failed)?;
    let commit = match &start {
        Start::Branch(name, commit) => {
            let refname = format!("refs/heads/{name}");
            repo.reference(&refname, *commit, true, "claude-runner checkout").map_err(failed)?;
            repo.set_head(&refname).map_err(failed)?;
            *commit
        }
        Start::Detached(commit) => {
            repo.set_head_detached(*commit).map_err(failed)?;
            *commit
        }
    };
    // Written as stored, without `.gitattributes` conversions (`eol=crlf`, `ident`): those
    // change a file's size after `fits` measured it (a file of 1e9 newlines, 4.4 MB packed,
    // was written as 2e9 bytes), and `ident` can make one 11 times larger, so counting a
    // converted file twice would not bound it either. Unconverted files read back as they
    // were (staging cleans LF and an unexpanded `$Id$` to themselves): no change is seen
    // that the job did not make.
    repo.checkout_head(Some(CheckoutBuilder::new().force().disable_filters(true))).map_err(failed)?;
    Ok(Checkout { dir: dir.to_path_buf(), commit, fs })
}

/// `bytes` rounded up to whole `block`s.
pub(super) fn whole_blocks(bytes: u64, block: u64) -> u64 {
    bytes.div_ceil(block.max(1)).saturating_mul(block.max(1))
}

/// What a checkout of a commit writes, as [`fits`] measured it from the objects' headers
/// and its tree's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measured {
    /// The files' bytes.
    pub bytes: u64,
    /// Files and folders (each an inode, and at least a block on most disks).
    pub entries: u64,
    /// The bytes of its index (`.git/index`): [`INDEX_ENTRY_BYTES`] and the path of each
    /// file, padded to 8 bytes, a tree cache entry per folder, header and trailer. 2000
    /// files at paths of 1.2 KB make an index of 2.5 MB (hostile review rev31, 5).
    pub index: u64,
    /// The bytes the names of its files and folders take in their folders' entries
    /// ([`DIRENT_BYTES`] and the name, padded to 4 bytes; "." and ".." in each folder).
    pub names: u64,
}

impl Measured {
    /// The bytes the checkout takes on a disk of `block`-byte blocks: the files' bytes, a
    /// block for each file and folder (sizes round up to whole blocks), the index, the
    /// folders' entries beyond the folder's first block — twice: a folder of many entries
    /// is a tree of blocks indexed by hash on ext4 (htree), each block split in two as it
    /// fills, so as little as half of each is used — and the rest of the `.git` folder
    /// ([`GIT_DIR_BLOCKS`]).
    pub fn needed(&self, block: u64) -> u64 {
        self.bytes
            .saturating_add(self.entries.saturating_mul(block))
            .saturating_add(whole_blocks(self.index, block))
            .saturating_add(self.names.saturating_mul(2))
            .saturating_add(GIT_DIR_BLOCKS.saturating_mul(block))
    }
}

/// Blocks a checkout writes besides its files and index: the rest of its `.git` (config,
/// HEAD, refs, a dozen files and folders from no template) and a margin for what the job
/// writes first.
const GIT_DIR_BLOCKS: u64 = 32;

/// An index entry before its path (git's version 2, which libgit2 writes: times, device,
/// inode, mode, owner, size, object id, flags); the path follows, then 1 to 8 NULs up to a
/// multiple of 8 bytes.
const INDEX_ENTRY_BYTES: u64 = 62;

/// The index's header (12 bytes) and trailer (a hash: 32 bytes with SHA-256).
const INDEX_ENDS_BYTES: u64 = 44;

/// A folder's entry in the index's tree cache beside its name: its counts of entries and
/// subfolders in decimal, and its tree's id (32 bytes at most).
const TREE_CACHE_BYTES: u64 = 64;

/// A folder entry before its name (ext4's: inode, entry length, name length, type); the
/// whole padded to 4 bytes.
const DIRENT_BYTES: u64 = 8;

/// Refuses ([`RepoError::NoRoom`]) a checkout that would not leave `space`'s disk (the
/// workspaces') with a reserve — a twentieth of the disk, at most 256 MiB — for the
/// agent's own records and the job's first writes: what [`Measured::needed`] counts (the
/// files, their folders, the index, the `.git` folder). A checkout that
/// filled the disk failed half-written, and one kept by `KEEP_FAILED_WORKSPACES` left the
/// disk full for every later job, across restarts (hostile review rev25, 2). Other writers
/// (a job beside it) can still fill the disk during the checkout: then it fails
/// [`RepoError::DiskFull`], and is never kept.
pub fn room(measured: Measured, space: crate::workspace::DiskSpace, url: &str) -> Result<(), RepoError> {
    let reserve = reserve(space);
    let needed = measured.needed(space.block);
    if !fits_with_reserve(needed, space) {
        return Err(RepoError::NoRoom {
            url: url.to_string(),
            what: format!("it needs about {needed} bytes, and the disk holding DATA_DIR's workspaces has {} bytes free, of which the runner keeps {reserve} in reserve", space.free),
            needed: Some(needed),
            lower: String::new(),
            uncounted: false,
        });
    }
    // Inodes too: the `.git` folder's few dozen files, and a reserve of as many again.
    let files = measured.entries.saturating_add(64);
    if let Some(free) = space.free_inodes.filter(|free| files.saturating_mul(2) > *free) {
        let what = format!("it has {} files and folders, and the disk holding DATA_DIR's workspaces has room for {free} more", measured.entries);
        return Err(RepoError::NoRoom { url: url.to_string(), what, needed: None, lower: String::new(), uncounted: false });
    }
    Ok(())
}

/// What [`room`] keeps free on a disk besides a checkout: a twentieth of the disk, at most
/// 256 MiB.
fn reserve(space: crate::workspace::DiskSpace) -> u64 {
    (space.size / 20).min(256 << 20)
}

/// Whether a checkout of `needed` bytes ([`Measured::needed`]) leaves `space`'s disk its
/// reserve, as [`room`] asks: also what making room for a refused one aims at
/// (`super::Repos::make_room`).
pub fn fits_with_reserve(needed: u64, space: crate::workspace::DiskSpace) -> bool {
    needed.saturating_add(reserve(space)) <= space.free
}

/// Refuses a commit whose files would take more than `max_bytes` in all
/// (`REPO_MAX_CHECKOUT_BYTES`), or hold one over `max_file` ([`MAX_CHECKOUT_FILE_BYTES`]), before a byte
/// is written: sizes from the objects' headers, nothing read whole. A few packed megabytes
/// (files of zeros) unpacked to gigabytes, and one file of 20 GiB, which libgit2 holds
/// whole in memory as it writes it, took the agent down with every job it ran.
pub(super) fn fits(repo: &Repository, commit: Oid, (max_bytes, max_file, max_entries): (u64, u64, u64), url: &str) -> Result<Measured, RepoError> {
    let action = "measure the checkout";
    let tree = repo.find_commit(commit).and_then(|c| c.tree()).map_err(|e| reading(action, url, e))?;
    let odb = repo.odb().map_err(|e| super::error::git(action, &e))?;
    let (mut total, mut entries, mut refused) = (0u64, 0u64, None);
    // The root folder's "." and "..", and the index's ends.
    let (mut index, mut names) = (INDEX_ENDS_BYTES + TREE_CACHE_BYTES, 2 * (DIRENT_BYTES + 4));
    let walked = tree.walk(TreeWalkMode::PreOrder, |folder, entry| {
        // Entries are counted too: a tree may name one subtree many times, so a few
        // kilobytes made millions of empty files (inodes, and a walk of days).
        entries += 1;
        if entries > max_entries {
            let what = format!("it has more than {max_entries} files and folders");
            refused = Some(RepoError::CheckoutTooBig { url: url.to_string(), commit: commit.to_string(), what });
            return TreeWalkResult::Abort;
        }
        let name = entry.name_bytes().len() as u64;
        names = names.saturating_add((DIRENT_BYTES + name).next_multiple_of(4));
        match entry.kind() {
            Some(ObjectType::Tree) => {
                index = index.saturating_add(name + 1 + TREE_CACHE_BYTES);
                names = names.saturating_add(2 * (DIRENT_BYTES + 4));
            }
            // A file, a link, or a submodule's commit (an empty folder): an index entry.
            _ => index = index.saturating_add((INDEX_ENTRY_BYTES + folder.len() as u64 + name + 8) & !7),
        }
        if entry.kind() != Some(ObjectType::Blob) {
            return TreeWalkResult::Ok;
        }
        let size = match odb.read_header(entry.id()) {
            Ok((size, _)) => size as u64,
            Err(e) => {
                refused = Some(reading(action, url, e));
                return TreeWalkResult::Abort;
            }
        };
        let too_big = |what: String| RepoError::CheckoutTooBig { url: url.to_string(), commit: commit.to_string(), what };
        if size > max_file {
            let name = String::from_utf8_lossy(entry.name_bytes());
            refused = Some(too_big(format!("`{}` is {} MiB", super::error::one_line(&format!("{folder}{name}")), size >> 20)));
            return TreeWalkResult::Abort;
        }
        total = total.saturating_add(size);
        if total > max_bytes {
            refused = Some(too_big(format!("its files take more than REPO_MAX_CHECKOUT_BYTES, {max_bytes} bytes")));
            return TreeWalkResult::Abort;
        }
        TreeWalkResult::Ok
    });
    match (refused, walked) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(reading(action, url, e)),
        (None, Ok(())) => Ok(Measured { bytes: total, entries, index, names }),
    }
}

/// The folder Claude starts in: `working_dir` inside the checkout, after symlinks.
pub fn working_dir(checkout: &Path, dir: Option<&str>) -> Result<PathBuf, RepoError> {
    let Some(dir) = dir.filter(|d| !d.is_empty()) else {
        return checkout.canonicalize().map_err(|e| local("open the checkout", e));
    };
    let bad = |why: &'static str| RepoError::WorkingDir { dir: dir.to_string(), why: why.into() };
    // The edge checked it; the side that touches the disk checks again.
    let rel = shared::contract::checked_working_dir(dir).map_err(|_| bad("is not a relative path inside the repository"))?;
    let root = checkout.canonicalize().map_err(|e| local("open the checkout", e))?;
    let real = root.join(&rel).canonicalize().map_err(|_| bad("does not exist in the repository at this branch"))?;
    if !real.starts_with(&root) {
        return Err(bad("leaves the checkout through a symbolic link"));
    }
    if real.starts_with(root.join(".git")) {
        return Err(bad("is inside the checkout's .git folder"));
    }
    if !real.is_dir() {
        return Err(bad("is not a folder"));
    }
    // Git walking up from Claude's folder takes the first folder shaped as a git directory
    // for a repository, and runs what its `config` names (`core.fsmonitor`) in `git status`
    // (rev25, 1). Claude's git refuses such a find (`safe.bareRepository`, in
    // [`crate::process::claude_environment`]); nor does Claude start in one.
    if let Some(git_dir) = real.ancestors().take_while(|p| *p != root).find(|p| shaped_as_git_dir(p)) {
        let inside = git_dir.strip_prefix(&root).unwrap_or(git_dir).display().to_string();
        return Err(RepoError::WorkingDir {
            dir: dir.to_string(),
            why: format!("is at or inside `{}`, a folder shaped as a git directory (HEAD, objects, refs), which git would take for a repository", super::error::one_line(&inside)).into(),
        });
    }
    Ok(real)
}

/// Whether git would take `dir` for a git directory: a `HEAD`, and `objects` and `refs`
/// folders, here or in the folder its `commondir` names (judged by names alone: a near
/// miss is refused too).
fn shaped_as_git_dir(dir: &Path) -> bool {
    dir.join("HEAD").symlink_metadata().is_ok() && (dir.join("commondir").symlink_metadata().is_ok() || (dir.join("objects").exists() && dir.join("refs").exists()))
}
