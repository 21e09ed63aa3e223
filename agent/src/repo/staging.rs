//! The job's working tree staged into its checkout's index, no file read by its path.
//!
//! libgit2's `add_all` read each file it staged by its path, after points a process the
//! job left running can hold at a FIFO (the `.gitattributes` and `.gitignore` files libgit2
//! opens as it goes): a file measured small and swapped for a huge one meanwhile was read
//! whole — into the git worker's memory, up to its 4 GiB — and one swapped for a FIFO was
//! waited on (hostile review s34 reporev, 3). libgit2 is not handed the working tree at
//! all now (the checkout is opened as a bare repository: `changes::open_checkout`). What
//! changed is listed here ([`list`]): tracked files by their `lstat` data against the
//! index's, untracked ones by a listing of our own, each folder and each `.gitignore`
//! opened from a descriptor ([`super::untracked`]). Each file is then opened here, beneath
//! the checkout, from its descriptor ([`crate::files::open_beneath`]), refused by its
//! `fstat` size over what a push carries, read to at most that, given its `.gitattributes`
//! conversions ([`cleaned`]) — the attributes read by libgit2 from the `.gitattributes`
//! files as staged (from the index: a bare repository has no other), which are staged
//! first ([`Plan::stage`]) —, and put in the index as a blob. A submodule is staged as the
//! commit its folder's HEAD names, read here too ([`submodule_head`]): libgit2 ran a
//! status of the submodule's own repository (its config, index, HEAD, its changed files,
//! all by path, all the job's to write) and staged it by its path, which a FIFO swapped in
//! held (hostile review s35).
//!
//! The diff a job asks for (`include_diff`) is the staged tree's (`changes::Staged::patch`):
//! one reading of the working tree for the diff and the push. What only a push cannot
//! carry — a file over [`MAX_PUSH_FILE_BYTES`], a FIFO where a tracked file was, a
//! repository the job made inside the checkout — is kept aside ([`Plan::unpushable`]) and
//! refuses the push, while the diff shows what it can: a file too big as a binary change,
//! unread ([`OVERSIZED`]).

use super::changes::{too_big, MAX_PUSH_FILE_BYTES};
use super::checkout::FileSystem;
use super::error::{local, one_line, RepoError};
use crate::files::Beneath;
use git2::{Binding, Delta, FileMode, Index, IndexEntry, IndexTime, ObjectType, Oid, Repository};
use std::ffi::{c_char, c_int, c_void, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

const ACTION: &str = "collect the job's changes";

const BLOB: u32 = 0o100644;
const BLOB_EXECUTABLE: u32 = 0o100755;
const LINK: u32 = 0o120000;
const GITLINK: u32 = 0o160000;

/// The most a file git writes in a submodule's repository and staging reads — its `HEAD`,
/// a loose ref — holds: one line, a ref at most.
const MAX_GIT_FILE_BYTES: u64 = 4096;
/// The most of a `.git` file git reads (`read_gitfile_gently`: a bigger one names no
/// repository), and what the runner reads of a `commondir` (git writes a path there).
const MAX_DOT_GIT_BYTES: u64 = 1 << 20;
/// The most a submodule's `packed-refs` staging reads holds (a line per branch and tag).
const MAX_PACKED_REFS_BYTES: u64 = 64 << 20;
/// The most the submodule pass reads of all the submodules' git files together: two
/// `packed-refs` as big as one may be. A checkout with many submodules each holding a big
/// `packed-refs` cost that many times 64 MiB of reading.
const MAX_SUBMODULE_BYTES: u64 = 2 * MAX_PACKED_REFS_BYTES;

/// What a file over [`MAX_PUSH_FILE_BYTES`] is staged as, unread, for the diff: binary (a
/// NUL byte), so the diff says only that it changed. A tree holding it is never pushed
/// (the push is refused: [`Plan::unpushable`]).
const OVERSIZED: &[u8] = b"\0claude-runner: a file over what a push carries, not read\n";
/// What a file past what staging reads ([`Plan::stage`]'s budget) is staged as, unread,
/// for the diff: binary, so the diff says only that it changed (and that it was cut). A
/// tree holding it is never pushed.
const UNREAD: &[u8] = b"\0claude-runner: a file past what the runner reads of the changes, not read\n";

/// What [`Plan::stage`] found as it read the files.
pub(super) struct Staging {
    /// Why the push may not carry the staged tree (the first reason).
    pub unpushable: Option<RepoError>,
    /// Files were staged unread, past the bytes staging reads: at least this many bytes
    /// were there to read.
    pub unread: Option<u64>,
}

/// What staging does to the index, path by path (in the index's order), decided before any
/// file is read.
pub(super) struct Plan {
    steps: Vec<(Vec<u8>, Step)>,
    /// What the files staged from the working tree measured as listed (`lstat`), and those
    /// Claude staged itself (`git add`) by their objects' headers.
    pub bytes: u64,
    /// Why the staged tree may not be pushed, found as the changes were listed: a file over
    /// what a push carries (staged as [`OVERSIZED`]), a repository the job made inside the
    /// checkout (not staged), a FIFO, socket or device where a tracked file was (staged as
    /// the file's deletion, as libgit2's diff showed it). The first found; [`Plan::stage`]
    /// may find one too.
    pub unpushable: Option<RepoError>,
}

enum Step {
    /// Read from the working tree and staged, with what the index held at the path.
    Take(Option<Held>),
    /// Gone from the working tree (or a folder now): out of the index.
    Remove,
    /// A submodule whose folder's HEAD moved: staged as the commit it names, found as the
    /// changes were listed ([`submodule_head`]), its path never opened again.
    Submodule(Oid),
}

/// What the index held at a path staged from the working tree: its stage-0 entry
/// (`tracked`), else a conflict's side. Its mode is the one a file keeps on a file system
/// without exec bits or links; a tracked file read unchanged keeps its entry.
#[derive(Clone, Copy)]
struct Held {
    mode: u32,
    id: Oid,
    tracked: bool,
}

/// Keeps the first reason a push may not carry the staged tree.
fn keep_first(unpushable: &mut Option<RepoError>, why: RepoError) {
    unpushable.get_or_insert(why);
}

/// A file of `size` bytes at `path`, too big for a push: kept aside as the reason the
/// push is refused.
fn measured(unpushable: &mut Option<RepoError>, path: &[u8], size: u64) {
    if let Err(why) = too_big(&shown(path), size) {
        keep_first(unpushable, why);
    }
}

/// The index of `repo` (a checkout opened without a working tree) and what staging its
/// working tree, at `workdir`, into it takes, measured before any file is read. `abort`
/// stops it between two submodules, or two folders listed.
///
/// Each tracked file or link is looked at by its `lstat` data, as libgit2 tells a change
/// ([`may_differ`]): one whose stat data changed is read as it is staged; one gone is taken
/// out; a FIFO, socket or device where one was is kept aside ([`Plan::unpushable`]). A
/// path left in conflict (a merge Claude did not finish) is taken from the working tree,
/// whole; a submodule's, refused ([`RepoError::SubmoduleConflicted`]). A submodule whose
/// folder's HEAD names another commit than the index is told here ([`submodule_head`]);
/// one gone, or a file or link now, too. What the index does not hold is listed by
/// [`super::untracked::list`] (`.gitignore` respected).
///
/// Measured in the working tree, by `lstat` (a link's own size, never through a linked
/// folder: git sees the link, not what is beyond it): each file staged from there. A
/// tracked file whose size is still the index's may be one only touched: one over the
/// limit is told as it is read ([`holds_blob`]). A file only staged (Claude's `git add`,
/// the working tree as staged) counts by its object's header, its blob unread. A file gone
/// from the working tree is carried by no push, staged or not: it counts nothing. `head`:
/// the commit HEAD named as the hand-back began, read once ([`super::changes::stage_for`]).
pub(super) fn list(repo: &Repository, head: Option<Oid>, workdir: &Path, fs: FileSystem, abort: &AtomicBool) -> Result<(Index, Plan), RepoError> {
    let err = |e: git2::Error| super::error::git(ACTION, &e);
    let failed = |path: &[u8], e: std::io::Error| local(ACTION, format!("{}: {e}", shown(path)));
    let given_up = || match abort.load(Ordering::SeqCst) {
        true => Err(local(ACTION, "given up")),
        false => Ok(()),
    };
    given_up()?;
    // Before the index is read: an entry written no earlier than the index may hide a change.
    let written = std::fs::symlink_metadata(repo.path().join("index")).ok().map(|m| (m.mtime() as i32, m.mtime_nsec() as u32));
    let index = repo.index().map_err(err)?;
    let mut steps = Vec::new();
    let mut bytes = 0;
    let mut unpushable = None;
    let mut stat = crate::files::StatBeneath::new(workdir);
    let mut tracked = super::untracked::Tracked::new(fs);
    let mut submodule_bytes_left = MAX_SUBMODULE_BYTES;
    let mut take = |path: &[u8], held: Option<Held>, size: u64, steps: &mut Vec<(Vec<u8>, Step)>, unpushable: &mut Option<RepoError>| {
        measured(unpushable, path, size);
        if size <= MAX_PUSH_FILE_BYTES {
            bytes += size;
        }
        steps.push((path.to_vec(), Step::Take(held)));
    };
    let mut last_conflict: Option<Vec<u8>> = None;
    for entry in index.iter() {
        tracked.add(&entry.path, entry.mode == GITLINK);
        if stage_of(&entry) != 0 {
            // Its sides follow one another: the path is looked at once.
            if last_conflict.as_deref() == Some(entry.path.as_slice()) {
                continue;
            }
            last_conflict = Some(entry.path.clone());
            let sides: Vec<IndexEntry> = (1..=3).filter_map(|stage| index.get_path(as_path(&entry.path), stage)).collect();
            match stat.lstat(as_path(&entry.path)).map_err(|e| failed(&entry.path, e))? {
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR && sides.iter().any(|s| s.mode == GITLINK) => {
                    return Err(RepoError::SubmoduleConflicted { path: shown(&entry.path) });
                }
                Some(st) if matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFLNK) => take(&entry.path, conflicted(&index, &entry.path), st.st_size as u64, &mut steps, &mut unpushable),
                // Gone, or a folder now (what it holds is untracked).
                None => steps.push((entry.path.clone(), Step::Remove)),
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => steps.push((entry.path.clone(), Step::Remove)),
                Some(st) => {
                    keep_first(&mut unpushable, RepoError::Unstageable { path: shown(&entry.path), what: kind(st.st_mode).into() });
                    steps.push((entry.path.clone(), Step::Remove));
                }
            }
        } else if checked_here(&entry) {
            match stat.lstat(as_path(&entry.path)).map_err(|e| failed(&entry.path, e))? {
                Some(st) if matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFLNK) => {
                    if may_differ(&entry, &st, fs, written) {
                        let size = st.st_size as u64;
                        // Another size than the index's: changed for sure (libgit2's rule).
                        // The same: maybe only touched, told as it is read.
                        let changed_size = size as u32 != entry.file_size && entry.file_size != 0;
                        take(&entry.path, Some(Held { mode: entry.mode, id: entry.id, tracked: true }), if changed_size { size } else { size.min(MAX_PUSH_FILE_BYTES) }, &mut steps, &mut unpushable);
                    }
                }
                // Gone, or a folder now (what it holds is untracked).
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => steps.push((entry.path.clone(), Step::Remove)),
                None => steps.push((entry.path.clone(), Step::Remove)),
                // git refuses it too ("can only add regular files, symbolic links or
                // git-directories"); libgit2's diff showed the file deleted.
                Some(st) => {
                    keep_first(&mut unpushable, RepoError::Unstageable { path: shown(&entry.path), what: kind(st.st_mode).into() });
                    steps.push((entry.path.clone(), Step::Remove));
                }
            }
        } else if entry.mode == GITLINK && not_skipped(&entry) {
            match stat.lstat(as_path(&entry.path)).map_err(|e| failed(&entry.path, e))? {
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    // The job's stop is heard between two submodules.
                    given_up()?;
                    let head = submodule_head(workdir, &entry.path, &mut submodule_bytes_left)?;
                    if let Some(head) = head.filter(|head| *head != entry.id) {
                        steps.push((entry.path.clone(), Step::Submodule(head)));
                    }
                }
                None => steps.push((entry.path.clone(), Step::Remove)),
                // The submodule's folder turned into a file or a link.
                Some(st) if matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFLNK) => take(&entry.path, None, st.st_size as u64, &mut steps, &mut unpushable),
                Some(st) => return Err(RepoError::Unstageable { path: shown(&entry.path), what: kind(st.st_mode).into() }),
            }
        }
    }
    let found = super::untracked::list(workdir, &tracked, abort)?;
    if let Some(repository) = found.repositories.first() {
        keep_first(&mut unpushable, RepoError::NestedRepository { path: shown(repository) });
    }
    for (path, size) in &found.files {
        take(path, None, *size, &mut steps, &mut unpushable);
    }
    bytes += staged_bytes(repo, head, &index, &steps, &mut unpushable)?;
    steps.sort_by(|(a, _), (b, _)| a.cmp(b));
    Ok((index, Plan { steps, bytes, unpushable }))
}

/// The conflict stage of an index entry (0: none).
fn stage_of(entry: &IndexEntry) -> u16 {
    // The conflict stage's bits (`GIT_INDEX_ENTRY_STAGEMASK`), which git2 does not name.
    (entry.flags & 0x3000) >> 12
}

/// What the index holds that Claude staged itself (against HEAD) and the working tree does
/// not change, by its objects' headers; one over [`MAX_PUSH_FILE_BYTES`] is kept aside.
fn staged_bytes(repo: &Repository, head: Option<Oid>, index: &Index, steps: &[(Vec<u8>, Step)], unpushable: &mut Option<RepoError>) -> Result<u64, RepoError> {
    let err = |e: git2::Error| super::error::git(ACTION, &e);
    let odb = repo.odb().map_err(err)?;
    let head = head.and_then(|id| repo.find_commit(id).and_then(|c| c.tree()).ok());
    let from_tree: std::collections::HashSet<&[u8]> = steps.iter().map(|(path, _)| path.as_slice()).collect();
    let mut bytes = 0;
    for delta in repo.diff_tree_to_index(head.as_ref(), Some(index), None).map_err(err)?.deltas() {
        let new = delta.new_file();
        // A submodule's entry names a commit of another repository: no object here.
        if delta.status() == Delta::Deleted || new.id().is_zero() || new.mode() == FileMode::Commit {
            continue;
        }
        let Some(path) = new.path_bytes().filter(|p| !from_tree.contains(p)) else { continue };
        let size = odb.read_header(new.id()).map_err(err)?.0 as u64;
        measured(unpushable, path, size);
        bytes += size.min(MAX_PUSH_FILE_BYTES);
    }
    Ok(bytes)
}

/// What [`list`] measured, for the tests: a file over what a push carries is an error.
#[cfg(test)]
pub(super) fn changed_bytes(repo: &Repository, workdir: &Path, fs: FileSystem) -> Result<u64, RepoError> {
    let head = repo.head().and_then(|h| h.peel_to_commit()).ok().map(|c| c.id());
    let plan = list(repo, head, workdir, fs, &AtomicBool::new(false))?.1;
    match plan.unpushable {
        Some(e @ RepoError::FileTooBig { .. }) => Err(e),
        _ => Ok(plan.bytes),
    }
}

impl Plan {
    /// Stages the working tree at `workdir` into `index` of `repo` as planned; what the push
    /// may not carry is returned (the first reason: [`Plan::unpushable`]'s, else one found
    /// as a file was read). `abort` stops it between two files. At most `budget` bytes of
    /// the files are read: past it a file is staged unread ([`UNREAD`]; a tracked one of its
    /// blob's size is hashed from its descriptor and left unchanged when it is), and told
    /// ([`Staging::unread`]).
    ///
    /// The `.gitattributes` files go first, as they are in the working tree: the
    /// conversions each other file is given ([`cleaned`]) come from them as staged (libgit2
    /// reads the attributes of a repository without a working tree from its index), as git
    /// reads them from the working tree. Each is then given its own conversions too.
    pub(super) fn stage(self, repo: &Repository, index: &mut Index, workdir: &Path, fs: FileSystem, budget: u64, abort: &AtomicBool) -> Result<Staging, RepoError> {
        let err = |e: git2::Error| super::error::git(ACTION, &e);
        let given_up = || match abort.load(Ordering::SeqCst) {
            true => Err(local(ACTION, "given up")),
            false => Ok(()),
        };
        given_up()?;
        let mut unpushable = self.unpushable;
        let mut reading = Reading { left: budget, budget, unread: None };
        let is_attributes = |path: &[u8]| path.rsplit(|b| *b == b'/').next() == Some(b".gitattributes".as_slice());
        let (attributes, others): (Vec<_>, Vec<_>) = self.steps.into_iter().partition(|(path, _)| is_attributes(path));
        let mut raw = Vec::new();
        for (path, step) in attributes {
            given_up()?;
            match step {
                Step::Take(held) => match read(repo, workdir, &path, held, fs, &mut unpushable, &mut reading)? {
                    Read::File { mode, bytes } => {
                        put(repo, index, &path, mode, &bytes, held)?;
                        raw.push((path, mode, bytes, held));
                    }
                    other => other.put(repo, index, &path, held)?,
                },
                Step::Remove => index.remove_path(as_path(&path)).map_err(err)?,
                Step::Submodule(head) => index.add(&entry(path, GITLINK, head, 0)).map_err(err)?,
            }
        }
        for (path, mode, bytes, held) in raw {
            let clean = cleaned(repo, &path, bytes.clone()).map_err(err)?;
            if clean != bytes {
                put(repo, index, &path, mode, &clean, held)?;
            }
        }
        for (path, step) in others {
            given_up()?;
            match step {
                Step::Remove => index.remove_path(as_path(&path)).map_err(err)?,
                Step::Submodule(head) => index.add(&entry(path, GITLINK, head, 0)).map_err(err)?,
                Step::Take(held) => match read(repo, workdir, &path, held, fs, &mut unpushable, &mut reading)? {
                    Read::File { mode, bytes } => put(repo, index, &path, mode, &cleaned(repo, &path, bytes).map_err(err)?, held)?,
                    other => other.put(repo, index, &path, held)?,
                },
            }
        }
        Ok(Staging { unpushable, unread: reading.unread })
    }
}

/// What is left of the bytes [`Plan::stage`] reads of the files.
struct Reading {
    left: u64,
    budget: u64,
    /// At least how many bytes there were to read, once a file was passed over.
    unread: Option<u64>,
}

impl Reading {
    /// A file of (at least) `size` bytes passed over, unread.
    fn passed_over(&mut self, size: u64) {
        let seen = self.budget - self.left + size;
        self.unread = Some(self.unread.map_or(seen, |u| u.max(seen)));
    }
}

/// What [`read`] found at a path of the working tree.
enum Read {
    /// Gone since it was listed: out of the index, as a listing now would find it.
    Gone,
    /// Left as the index holds it (a tracked file over what a push carries, only touched).
    Unchanged,
    /// A plain file: its mode and its bytes, as read (no conversion yet).
    File { mode: u32, bytes: Vec<u8> },
    /// A link (its target), or a file over what a push carries ([`OVERSIZED`]): staged
    /// as it is.
    Blob { mode: u32, blob: Vec<u8> },
}

impl Read {
    /// Puts what was read (not a [`Read::File`], which has its conversions first) in the index.
    fn put(self, repo: &Repository, index: &mut Index, path: &[u8], held: Option<Held>) -> Result<(), RepoError> {
        match self {
            Read::Gone => index.remove_path(as_path(path)).map_err(|e| super::error::git(ACTION, &e)),
            Read::Unchanged => Ok(()),
            Read::File { mode, bytes } | Read::Blob { mode, blob: bytes } => put(repo, index, path, mode, &bytes, held),
        }
    }
}

/// The entry `path` of the working tree at `workdir` as it is now, read from a descriptor:
/// a plain file (at most [`MAX_PUSH_FILE_BYTES`]; one bigger is [`OVERSIZED`], unread, and
/// kept aside in `unpushable`), a link (its target), nothing when it is gone. A FIFO,
/// socket or device swapped in since the listing is kept aside too, and the path is left
/// out; a folder is an error (the listing found a file: something the job started is
/// still at work).
fn read(repo: &Repository, workdir: &Path, path: &[u8], held: Option<Held>, fs: FileSystem, unpushable: &mut Option<RepoError>, reading: &mut Reading) -> Result<Read, RepoError> {
    use std::io::{Read as _, Seek};
    let failed = |e: std::io::Error| local(ACTION, format!("{}: {e}", shown(path)));
    let file = match crate::files::open_beneath(workdir, as_path(path)).map_err(failed)? {
        None => return Ok(Read::Gone),
        Some(Beneath::Link(target)) => return link(path, target),
        Some(Beneath::File(file)) => file,
        Some(Beneath::Other(libc::S_IFDIR)) => {
            return Err(local(ACTION, format!("{} turned from a file into a folder as it was staged: a command the job started may still be running; run the job again", shown(path))));
        }
        Some(Beneath::Other(other)) => {
            keep_first(unpushable, RepoError::Unstageable { path: shown(path), what: kind(other).into() });
            return Ok(Read::Gone);
        }
    };
    let meta = file.metadata().map_err(failed)?;
    let mode = file_mode(meta.mode(), held, fs);
    let oversized = |unpushable: &mut Option<RepoError>, size: u64| {
        measured(unpushable, path, size);
        Ok(Read::Blob { mode, blob: OVERSIZED.to_vec() })
    };
    let tracked = held.filter(|h| h.tracked && h.mode == mode);
    if meta.len() > MAX_PUSH_FILE_BYTES {
        if tracked.is_some_and(|h| holds_blob(repo, &file, h.id).unwrap_or(false)) {
            return Ok(Read::Unchanged);
        }
        return oversized(unpushable, meta.len());
    }
    // Past what is left to read: unread (a tracked file only touched, hashed, is unchanged).
    let unread = |reading: &mut Reading, size: u64| {
        if tracked.is_some_and(|h| holds_blob(repo, &file, h.id).unwrap_or(false)) {
            return Ok(Read::Unchanged);
        }
        reading.passed_over(size);
        Ok(Read::Blob { mode, blob: UNREAD.to_vec() })
    };
    if meta.len() > reading.left {
        return unread(reading, meta.len());
    }
    let cap = MAX_PUSH_FILE_BYTES.min(reading.left);
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte more than may be read: a file growing as it is read is told.
    (&file).take(cap + 1).read_to_end(&mut bytes).map_err(failed)?;
    if bytes.len() as u64 > MAX_PUSH_FILE_BYTES {
        return oversized(unpushable, bytes.len() as u64);
    }
    if bytes.len() as u64 > cap {
        let size = bytes.len() as u64;
        drop(bytes);
        (&file).seek(std::io::SeekFrom::Start(0)).map_err(failed)?;
        return unread(reading, size);
    }
    reading.left -= bytes.len() as u64;
    Ok(Read::File { mode, bytes })
}

/// A link at `path` holding `target`, as staged.
fn link(path: &[u8], target: Vec<u8>) -> Result<Read, RepoError> {
    // libgit2 refuses a link named `.gitmodules` (git reads it as the submodules' list).
    let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
    if is_gitmodules(name) {
        return Err(local(ACTION, format!("invalid path: '{}' (a link named .gitmodules)", shown(path))));
    }
    Ok(Read::Blob { mode: LINK, blob: target })
}

/// Puts `blob` in the index at `path` with `mode`, and in `repo`'s object store; a tracked
/// file read unchanged keeps its entry (and its stat data). Past what staging keeps in
/// memory (`changes::IN_MEMORY_MAX_BYTES`) the blob is a loose object on the checkout's
/// disk, and libgit2 says nothing of a write a full disk refused: the disk is asked
/// ([`super::error::wrote`]).
fn put(repo: &Repository, index: &mut Index, path: &[u8], mode: u32, blob: &[u8], held: Option<Held>) -> Result<(), RepoError> {
    let err = |e: git2::Error| super::error::git(ACTION, &e);
    if let Some(held) = held.filter(|h| h.tracked && h.mode == mode) {
        if Oid::hash_object(ObjectType::Blob, blob).map_err(err)? == held.id {
            return Ok(());
        }
    }
    index
        .add_frombuffer(&entry(path.to_vec(), mode, Oid::ZERO_SHA1, blob.len() as u32), blob)
        .map_err(|e| super::error::wrote(&repo.path().join("objects"), ACTION, &e, "the job's changes", loose_object_bytes(blob.len()), "a file staged needs"))
}

/// At most what `bytes` take as a loose object: zlib's worst case (its stored blocks, 5
/// bytes a 16 KiB) and the object's header.
pub(super) fn loose_object_bytes(bytes: usize) -> u64 {
    let bytes = bytes as u64;
    bytes.saturating_add(bytes / 16_384 * 5).saturating_add(64)
}

/// An index entry of `path`, without stat data (git reads none of a blob added from
/// memory, nor of a submodule).
fn entry(path: Vec<u8>, mode: u32, id: Oid, file_size: u32) -> IndexEntry {
    IndexEntry {
        ctime: IndexTime::new(0, 0),
        mtime: IndexTime::new(0, 0),
        dev: 0,
        ino: 0,
        mode,
        uid: 0,
        gid: 0,
        file_size,
        id,
        flags: 0,
        flags_extended: 0,
        path,
    }
}

/// Whether the working tree's entry, of `lstat` data `st`, may not be the index's `entry`
/// any more: libgit2's test (its diff's `maybe_modified`) — where it hashed the file when
/// only its times, inode or owner differ (or it is no older than the index, `written`), it
/// is read here. Modes as the file system holds them: without exec bits the index's bits,
/// without links a file where a link was is the link.
fn may_differ(entry: &IndexEntry, st: &libc::stat, fs: FileSystem, written: Option<(i32, u32)>) -> bool {
    let mut mode = match st.st_mode & libc::S_IFMT {
        libc::S_IFLNK => LINK,
        _ if st.st_mode & 0o100 != 0 => BLOB_EXECUTABLE,
        _ => BLOB,
    };
    if entry.mode == LINK && mode != LINK && !fs.symlinks {
        mode = LINK;
    }
    if !fs.filemode && mode != LINK && entry.mode != LINK {
        mode = entry.mode;
    }
    let mtime = (st.st_mtime as i32, st.st_mtime_nsec as u32);
    let same_time = |t: IndexTime, (s, ns): (i32, u32)| t.seconds() == s && t.nanoseconds() == ns;
    mode != entry.mode
        || entry.file_size != st.st_size as u32
        || !same_time(entry.mtime, mtime)
        || !same_time(entry.ctime, (st.st_ctime as i32, st.st_ctime_nsec as u32))
        || entry.ino != st.st_ino as u32
        || entry.uid != st.st_uid
        || entry.gid != st.st_gid
        || written.is_some_and(|w| w.0 != 0 && mtime >= w)
}

/// The mode git gives a plain file of `st_mode` (its `fstat`) where the index held `held`:
/// executable as its owner's exec bit says — on a file system without exec bits, the mode
/// held (a new file: not executable); without links, a link held stays one (libgit2 writes
/// a link there as a file holding its target).
fn file_mode(st_mode: u32, held: Option<Held>, fs: FileSystem) -> u32 {
    match held.map(|h| h.mode) {
        Some(LINK) if !fs.symlinks => LINK,
        Some(held @ (BLOB | BLOB_EXECUTABLE)) if !fs.filemode => held,
        _ if !fs.filemode => BLOB,
        _ if st_mode & 0o100 != 0 => BLOB_EXECUTABLE,
        _ => BLOB,
    }
}

/// Whether the index entry is a tracked file or link whose working-tree state is checked
/// here ([`may_differ`]): not a submodule, not a conflict's side, not one marked "assumed
/// unchanged" or "skip worktree" (libgit2 leaves those as they are).
fn checked_here(entry: &IndexEntry) -> bool {
    not_skipped(entry) && matches!(entry.mode, BLOB | BLOB_EXECUTABLE | LINK)
}

/// Whether the index entry is staged (no conflict's side) and its working tree looked at:
/// not marked "assumed unchanged" or "skip worktree".
fn not_skipped(entry: &IndexEntry) -> bool {
    // The conflict stage's bits (`GIT_INDEX_ENTRY_STAGEMASK`), which git2 does not name.
    let stage = entry.flags & 0x3000;
    let skipped = entry.flags & git2::IndexEntryFlag::VALID.bits() != 0 || entry.flags_extended & git2::IndexEntryExtendedFlag::SKIP_WORKTREE.bits() != 0;
    stage == 0 && !skipped
}

/// The commit HEAD names in the repository of the submodule folder `sub` (beneath
/// `workdir`), as git reads it to stage a submodule — `None` where git finds none and
/// leaves the submodule as the index holds it: no `.git` (not checked out), a HEAD gone or
/// naming a branch without a commit. What is `left` of [`MAX_SUBMODULE_BYTES`] bounds
/// what it reads, and is taken down by it.
///
/// Read by a pass of its own, never libgit2's, which opened the submodule's repository by
/// path (its config, index, `info/attributes`), each of them the job's to write, as a
/// FIFO: `sub/.git` (a folder, or a file naming one, `gitdir: <path>`, which must be
/// inside the checkout — as `git submodule` makes it, in the checkout's `.git/modules`),
/// its `commondir` if any (that walk shared with the listing's `is_repository`:
/// [`GitFiles::git_dir`], [`GitFiles::common_dir`]), `HEAD` and the ref it names (loose, else in `packed-refs`),
/// each opened from a descriptor beneath the checkout ([`crate::files::open_beneath`]:
/// `O_NOFOLLOW`, `O_NONBLOCK`), refused by its `fstat` size, read to at most that. A FIFO,
/// link or device there, a file too big for what git writes, one git would not have
/// written, is refused, saying which ([`RepoError::Submodule`]); so is a link on the way
/// to one (git makes none there; followed, one could lead outside the checkout, or be
/// swapped for another as it is read: the pass goes through folders only), where it left
/// the submodule at the index's commit without a word. A repository keeping its refs in a
/// reftable (`git clone --ref-format=reftable`) is refused, saying so
/// ([`RepoError::SubmoduleReftable`]): the pass reads git's files of refs only.
fn submodule_head(workdir: &Path, sub: &[u8], left: &mut u64) -> Result<Option<Oid>, RepoError> {
    let refused = |why: String| RepoError::Submodule { path: shown(sub), why };
    let mut files = GitFiles { workdir, left };
    // Whatever git would make of a `.git` or `commondir` not followed, it is refused.
    let Some(gitdir) = files.git_dir(as_path(sub)).map_err(|e| refused(e.why))? else { return Ok(None) };
    // A linked worktree's refs are in the repository it names (`commondir`).
    let common = files.common_dir(&gitdir).map_err(|e| refused(e.why))?;
    // Its HEAD there names `refs/heads/.invalid`, which no git reads as a ref.
    let table = common.join("reftable");
    if let Ok(Some(Beneath::Other(libc::S_IFDIR))) = crate::files::open_beneath(workdir, &table) {
        return Err(RepoError::SubmoduleReftable { path: shown(sub), table: shown_path(&table) });
    }
    // HEAD, then the refs it leads to (git follows at most 5).
    let mut file = gitdir.join("HEAD");
    let mut name = b"HEAD".to_vec();
    for _ in 0..=5 {
        let text = match files.read(&file, MAX_GIT_FILE_BYTES).map_err(refused)? {
            Some(text) => text,
            None if name == b"HEAD" => return Ok(None),
            None => return files.packed_ref(&common.join("packed-refs"), &name).map_err(refused),
        };
        let text = trimmed(&text);
        if let Some(id) = commit_id(text) {
            return Ok(Some(id).filter(|id| !id.is_zero()));
        }
        // git takes `ref:` with or without spaces after it.
        let target = text.strip_prefix(b"ref:").map(<[u8]>::trim_ascii_start).filter(|r| r.starts_with(b"refs/") && std::str::from_utf8(r).is_ok_and(git2::Reference::is_valid_name));
        let Some(target) = target else { return Err(refused(format!("`{}` holds neither a commit nor a ref", shown_path(&file)))) };
        name = target.to_vec();
        file = common.join(as_path(&name));
    }
    Err(refused(format!("`{}` leads through more than 5 refs", shown_path(&gitdir.join("HEAD")))))
}

/// The files git writes in repositories — submodules', and those the job made inside the
/// checkout ([`super::untracked`]) —, read beneath `workdir`: each bounded, and all of them
/// together at most what is `left` (of [`MAX_SUBMODULE_BYTES`] for the submodule pass).
/// Refusals are in words, naming the file.
pub(super) struct GitFiles<'a> {
    workdir: &'a Path,
    left: &'a mut u64,
}

/// A `.git` or `commondir` the walk to a repository's files did not follow
/// ([`GitFiles::git_dir`], [`GitFiles::common_dir`]): why, naming it, and whether git reads
/// it and finds no repository there (`no_repository`) — otherwise git cannot read it (or
/// dies on it), or it leads where the runner does not go (a link, outside the checkout).
/// Each caller makes of it what git's rules for it say.
pub(super) struct Unfollowed {
    pub why: String,
    pub no_repository: bool,
}

impl<'a> GitFiles<'a> {
    pub(super) fn new(workdir: &'a Path, left: &'a mut u64) -> GitFiles<'a> {
        GitFiles { workdir, left }
    }

    /// The git directory of the folder `folder` (beneath `workdir`), as git finds it
    /// (`read_gitfile_gently`): its `.git` folder, or the folder a `.git` file names
    /// (`gitdir: <path>`), which must be inside the checkout ([`beneath`]). `None` when
    /// there is no `.git`. A FIFO, socket or device there, a file of other words, or one
    /// bigger than git reads, is no repository to git.
    pub(super) fn git_dir(&mut self, folder: &Path) -> Result<Option<std::path::PathBuf>, Unfollowed> {
        let dot_git = folder.join(".git");
        let unread = |why: String| Unfollowed { why, no_repository: false };
        let none = |why: String| Unfollowed { why, no_repository: true };
        let file = match crate::files::open_beneath(self.workdir, &dot_git).map_err(|e| unread(format!("`{}`: {e}", shown_path(&dot_git))))? {
            None => return Ok(None),
            Some(Beneath::Other(libc::S_IFDIR)) => return Ok(Some(dot_git)),
            Some(Beneath::File(file)) => file,
            Some(Beneath::Link(_)) => return Err(unread(format!("`{}` is a link", shown_path(&dot_git)))),
            // git's `stat` finds no file there, nor a folder holding `HEAD`.
            Some(Beneath::Other(other)) => return Err(none(format!("`{}` is {}", shown_path(&dot_git), kind(other)))),
        };
        let text = self.read_whole(&dot_git, file)?;
        let named = text.strip_prefix(b"gitdir: ").map(line).filter(|named| !named.is_empty());
        let named = named.ok_or_else(|| none(format!("`{}` names no repository (`gitdir: <path>`)", shown_path(&dot_git))))?;
        let gitdir = beneath(self.workdir, folder, named).ok_or_else(|| unread(format!("`{}` names a repository outside the checkout", shown_path(&dot_git))))?;
        Ok(Some(gitdir))
    }

    /// The folder holding the refs and objects of the repository whose git directory is
    /// `gitdir` (`get_common_dir`): the one its `commondir` names (a linked worktree's),
    /// which must be inside the checkout, else `gitdir` itself. A `commondir` that cannot
    /// be read is never taken for no repository: git dies on one.
    pub(super) fn common_dir(&mut self, gitdir: &Path) -> Result<std::path::PathBuf, Unfollowed> {
        let rel = gitdir.join("commondir");
        let unread = |why: String| Unfollowed { why, no_repository: false };
        let file = match crate::files::open_beneath(self.workdir, &rel).map_err(|e| unread(format!("`{}`: {e}", shown_path(&rel))))? {
            None => {
                return match link_on_the_way(self.workdir, &rel) {
                    Some(link) => Err(unread(format!("`{}` is a link", shown_path(&link)))),
                    None => Ok(gitdir.to_path_buf()),
                }
            }
            Some(Beneath::File(file)) => file,
            Some(Beneath::Link(_)) => return Err(unread(format!("`{}` is a link", shown_path(&rel)))),
            Some(Beneath::Other(libc::S_IFDIR)) => return Err(unread(format!("`{}` is a folder", shown_path(&rel)))),
            Some(Beneath::Other(other)) => return Err(unread(format!("`{}` is {}", shown_path(&rel), kind(other)))),
        };
        let text = self.read_whole(&rel, file).map_err(|e| unread(e.why))?;
        beneath(self.workdir, gitdir, line(&text)).ok_or_else(|| unread(format!("`{}` names a repository outside the checkout", shown_path(&rel))))
    }

    /// What `file` (the plain file at `rel`) holds, read whole as git reads a `.git` file:
    /// at most [`MAX_DOT_GIT_BYTES`] (a bigger one is no repository to git), and exactly its
    /// `fstat` size (less or more: it changed as it was read, a read that failed).
    fn read_whole(&mut self, rel: &Path, file: std::fs::File) -> Result<Vec<u8>, Unfollowed> {
        use std::io::Read;
        let unread = |why: String| Unfollowed { why, no_repository: false };
        let failed = |e: std::io::Error| unread(format!("`{}`: {e}", shown_path(rel)));
        let size = file.metadata().map_err(failed)?.len();
        if size > MAX_DOT_GIT_BYTES {
            return Err(Unfollowed { why: format!("`{}` is {size} bytes, more than git reads of one", shown_path(rel)), no_repository: true });
        }
        if size > *self.left {
            return Err(unread(self.over()));
        }
        let mut text = Vec::new();
        file.take(size + 1).read_to_end(&mut text).map_err(failed)?;
        if text.len() as u64 != size {
            return Err(unread(format!("`{}` changed as it was read", shown_path(rel))));
        }
        self.count(size).map_err(unread)?;
        Ok(text)
    }

    /// The plain file `rel`, open: `None` when it is gone or a folder (git finds no such
    /// file there); refused when it is anything else but a plain file, or over `max` bytes
    /// by its `fstat` size, or over what is left to read, or when a folder on the way to
    /// it is a link.
    fn open(&self, rel: &Path, max: u64) -> Result<Option<std::fs::File>, String> {
        let failed = |e: std::io::Error| format!("`{}`: {e}", shown_path(rel));
        match crate::files::open_beneath(self.workdir, rel).map_err(failed)? {
            None => match link_on_the_way(self.workdir, rel) {
                Some(link) => Err(format!("`{}` is a link", shown_path(&link))),
                None => Ok(None),
            },
            Some(Beneath::Other(libc::S_IFDIR)) => Ok(None),
            Some(Beneath::File(file)) => {
                let size = file.metadata().map_err(failed)?.len();
                if size > max {
                    return Err(format!("`{}` is {size} bytes, more than git writes there", shown_path(rel)));
                }
                if size > *self.left {
                    return Err(self.over());
                }
                Ok(Some(file))
            }
            Some(Beneath::Link(_)) => Err(format!("`{}` is a link", shown_path(rel))),
            Some(Beneath::Other(other)) => Err(format!("`{}` is {}", shown_path(rel), kind(other))),
        }
    }

    /// What the plain file `rel` holds ([`GitFiles::open`]), at most `max` bytes.
    fn read(&mut self, rel: &Path, max: u64) -> Result<Option<Vec<u8>>, String> {
        match self.open(rel, max)? {
            Some(file) => self.read_from(rel, file, max).map(Some),
            None => Ok(None),
        }
    }

    /// What `file` (at `rel`) holds, at most `max` bytes: one grown past that as it is
    /// read is refused.
    fn read_from(&mut self, rel: &Path, file: std::fs::File, max: u64) -> Result<Vec<u8>, String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        file.take(max.min(*self.left) + 1).read_to_end(&mut bytes).map_err(|e| format!("`{}`: {e}", shown_path(rel)))?;
        if bytes.len() as u64 > max {
            return Err(format!("`{}` is over {max} bytes, more than git writes there", shown_path(rel)));
        }
        self.count(bytes.len() as u64)?;
        Ok(bytes)
    }

    /// Takes `bytes` read off what is left.
    fn count(&mut self, bytes: u64) -> Result<(), String> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                *self.left = left;
                Ok(())
            }
            None => Err(self.over()),
        }
    }

    fn over(&self) -> String {
        format!("the git files of the submodules read up to it are over {} MiB together, more than the runner reads of them", MAX_SUBMODULE_BYTES >> 20)
    }

    /// The ref `name` in the `packed-refs` file `rel`: `None` when it is not there (a
    /// branch without a commit). Read a line at a time, at most [`MAX_PACKED_REFS_BYTES`],
    /// a line at most what a ref takes ([`MAX_GIT_FILE_BYTES`]).
    fn packed_ref(&mut self, rel: &Path, name: &[u8]) -> Result<Option<Oid>, String> {
        use std::io::{BufRead, Read};
        let Some(file) = self.open(rel, MAX_PACKED_REFS_BYTES)? else { return Ok(None) };
        let failed = |e: std::io::Error| format!("`{}`: {e}", shown_path(rel));
        let mut reader = std::io::BufReader::new(file.take(MAX_PACKED_REFS_BYTES));
        let mut line = Vec::new();
        // `<id> <name>` lines; `#` a header, `^` the commit of the tag above.
        loop {
            line.clear();
            let n = (&mut reader).take(MAX_GIT_FILE_BYTES + 1).read_until(b'\n', &mut line).map_err(failed)?;
            if n == 0 {
                return Ok(None);
            }
            self.count(n as u64)?;
            if n as u64 > MAX_GIT_FILE_BYTES {
                return Err(format!("`{}` holds a line of more than {MAX_GIT_FILE_BYTES} bytes, longer than git writes there", shown_path(rel)));
            }
            if let Some((id, rest)) = trimmed(&line).split_at_checked(40) {
                if rest.strip_prefix(b" ") == Some(name) {
                    return Ok(commit_id(id).filter(|id| !id.is_zero()));
                }
            }
        }
    }
}

/// The first folder on the way to `rel` beneath `workdir` that is a link, if any: where
/// [`crate::files::open_beneath`] found nothing, since it goes through folders only.
fn link_on_the_way(workdir: &Path, rel: &Path) -> Option<std::path::PathBuf> {
    let mut stat = crate::files::StatBeneath::new(workdir);
    let mut on_the_way = std::path::PathBuf::new();
    for part in rel.parent()?.components() {
        on_the_way.push(part);
        match stat.lstat(&on_the_way) {
            Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
            Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => return Some(on_the_way),
            // Gone, or a file: no such folder, as git finds it.
            _ => return None,
        }
    }
    None
}

/// `text` without the line end (and spaces) git leaves after it.
fn trimmed(text: &[u8]) -> &[u8] {
    text.trim_ascii_end()
}

/// A path read from a `.git` file or a `commondir`, without the line ends git cuts there
/// (`\n`, `\r`), spaces kept: a path may end with one.
fn line(mut text: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = text {
        text = rest;
    }
    text
}

/// The commit a ref's `text` names, if it is one: 40 hex digits (`Oid::from_str` would
/// take fewer, padded).
fn commit_id(text: &[u8]) -> Option<Oid> {
    let hex = std::str::from_utf8(text).ok().filter(|t| t.len() == 40 && t.bytes().all(|b| b.is_ascii_hexdigit()))?;
    Oid::from_str(hex).ok()
}

/// The path `named` (from a file in the folder `base`, beneath `workdir`) as a path beneath
/// `workdir`, or `None` when it leads outside. Resolved by its names alone (`..` takes the
/// folder before): the folders on the way are opened from descriptors, never through a
/// link ([`crate::files::open_beneath`]), so none leads elsewhere. An absolute path is
/// taken inside the checkout as its folder is named, or named without links.
pub(super) fn beneath(workdir: &Path, base: &Path, named: &[u8]) -> Option<std::path::PathBuf> {
    use std::path::Component;
    let named = as_path(named);
    let joined = match named.is_absolute() {
        true => {
            let real = std::fs::canonicalize(workdir).ok();
            let rest = named.strip_prefix(workdir).ok().or_else(|| real.as_deref().and_then(|real| named.strip_prefix(real).ok()))?;
            rest.to_path_buf()
        }
        false => base.join(named),
    };
    let mut inside = std::path::PathBuf::new();
    for part in joined.components() {
        match part {
            Component::Normal(name) => inside.push(name),
            Component::CurDir => {}
            Component::ParentDir if inside.pop() => {}
            _ => return None,
        }
    }
    Some(inside)
}

/// What the index holds of a path left in conflict: "ours", else "theirs", else the base.
fn conflicted(index: &Index, path: &[u8]) -> Option<Held> {
    [2, 3, 1].into_iter().find_map(|stage| index.get_path(as_path(path), stage)).map(|e| Held { mode: e.mode, id: e.id, tracked: false })
}

/// Whether `file`, over what a push carries, holds the blob `id` byte for byte (as the
/// checkout wrote it): a tracked file only touched, which git would find unchanged. Hashed
/// from the descriptor a chunk at a time, never more than the blob's size.
fn holds_blob(repo: &Repository, mut file: &std::fs::File, id: Oid) -> std::io::Result<bool> {
    use sha1::{Digest, Sha1};
    use std::io::Read;
    let Ok((size, _)) = repo.odb().and_then(|odb| odb.read_header(id)) else { return Ok(false) };
    let mut hash = Sha1::new();
    hash.update(format!("blob {size}\0"));
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size as u64;
    while left > 0 {
        let n = file.read(&mut chunk[..left.min(1 << 20) as usize])?;
        if n == 0 {
            return Ok(false);
        }
        hash.update(&chunk[..n]);
        left -= n as u64;
    }
    // A byte more: longer than the blob.
    Ok(file.read(&mut [0u8])? == 0 && hash.finalize().as_slice() == id.as_bytes())
}

/// `bytes`, read from the working tree's file at `path`, as git stores them: the
/// `.gitattributes` conversions libgit2 applies as it adds a file from its path (`text`,
/// `eol`, `crlf`: CRLF to LF; `ident`), which `Index::add_frombuffer` does not. libgit2
/// loads them for the path (reading the attribute files, as `add_all` did) and runs them
/// over the bytes read here. git2 binds neither call: they are libgit2's own, below.
fn cleaned(repo: &Repository, path: &[u8], bytes: Vec<u8>) -> Result<Vec<u8>, git2::Error> {
    struct Filters(*mut c_void);
    impl Drop for Filters {
        fn drop(&mut self) {
            // SAFETY: a list `git_filter_list_load` made, or NULL (which it passes over), freed once.
            unsafe { git_filter_list_free(self.0) }
        }
    }
    let c_path = std::ffi::CString::new(path).map_err(|_| git2::Error::from_str("a path with a NUL byte"))?;
    let mut filters = Filters(std::ptr::null_mut());
    // SAFETY: `repo` is open for the call; `filters` receives a new list or NULL, which its
    // Drop frees; the path is NUL-terminated.
    let code = unsafe { git_filter_list_load(&mut filters.0, repo.raw().cast(), std::ptr::null_mut(), c_path.as_ptr(), GIT_FILTER_TO_ODB, GIT_FILTER_DEFAULT) };
    if code < 0 {
        return Err(git2::Error::last_error(code));
    }
    if filters.0.is_null() {
        return Ok(bytes);
    }
    let out = git2::Buf::new();
    // SAFETY: `out` is a git_buf git2 owns and disposes of; the input is `bytes`, of its length.
    let code = unsafe { git_filter_list_apply_to_buffer(out.raw().cast(), filters.0, bytes.as_ptr().cast(), bytes.len()) };
    if code < 0 {
        return Err(git2::Error::last_error(code));
    }
    drop(bytes);
    Ok(out.to_vec())
}

/// Whether `name` (one path component) is a name git reads as `.gitmodules` (its NTFS and
/// HFS spellings too): libgit2's own test.
fn is_gitmodules(name: &[u8]) -> bool {
    // SAFETY: a pointer and length of a live slice; libgit2 reads only those bytes.
    unsafe { git_path_is_gitfile(name.as_ptr().cast(), name.len(), GIT_PATH_GITFILE_GITMODULES, GIT_PATH_FS_GENERIC) == 1 }
}

// libgit2's own calls that git2 does not bind (`git2/filter.h`, `git2/sys/path.h`), from the
// library git2 links.
const GIT_FILTER_TO_ODB: c_int = 1;
const GIT_FILTER_DEFAULT: u32 = 0;
const GIT_PATH_GITFILE_GITMODULES: c_int = 1;
const GIT_PATH_FS_GENERIC: c_int = 0;
extern "C" {
    fn git_filter_list_load(filters: *mut *mut c_void, repo: *mut c_void, blob: *mut c_void, path: *const c_char, mode: c_int, flags: u32) -> c_int;
    fn git_filter_list_apply_to_buffer(out: *mut c_void, filters: *mut c_void, data: *const c_char, len: usize) -> c_int;
    fn git_filter_list_free(filters: *mut c_void);
    fn git_path_is_gitfile(path: *const c_char, len: usize, gitfile: c_int, fs: c_int) -> c_int;
}

/// What a file system entry that is not a file, a link or a folder is, in words.
pub(super) fn kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR | libc::S_IFBLK => "a device",
        _ => "neither a file nor a link",
    }
}

fn as_path(path: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(path))
}

/// A path (a name Claude chose) as one line of text.
pub(super) fn shown(path: &[u8]) -> String {
    one_line(&String::from_utf8_lossy(path))
}

fn shown_path(path: &Path) -> String {
    shown(path.as_os_str().as_bytes())
}
