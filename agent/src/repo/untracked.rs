//! What the job's working tree holds that the index does not: its untracked files, as
//! `git add -A` finds them, listed here from descriptors beneath the checkout, each folder's
//! `.gitignore` read here too.
//!
//! libgit2's listing opened the `.gitignore` of each folder it went through by its path: a
//! FIFO there (put by the job, or swapped in by a process it left running) held the git
//! worker until the job's time, a link there was followed (to a FIFO or a huge file
//! outside), a huge one was read whole. Here each folder is opened from its parent
//! (`openat`, `O_NOFOLLOW`), each `.gitignore` opened beneath the checkout without waiting
//! ([`crate::files::open_beneath`]) and refused, naming it, when it is not a plain file or
//! is over [`MAX_IGNORE_BYTES`]; its rules are matched by gitoxide's `gix-ignore`, which
//! follows git's. libgit2 is not handed the working tree at all.

use super::checkout::FileSystem;
use super::error::{local, RepoError};
use super::staging::{kind, shown, GitFiles};
use crate::files::{Beneath, Folder};
use gix_ignore::glob::pattern::Case;
use gix_ignore::glob::search::pattern::List;
use gix_ignore::search::Ignore;
use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const ACTION: &str = "collect the job's changes";

/// The most the `.gitignore` files of a listing (and `.git/info/exclude`) hold together, and
/// one of them: git reads none bigger (it passes over one of 100 MiB or more).
pub(super) const MAX_IGNORE_BYTES: u64 = 100 << 20;
/// The deepest folder listed: each level holds a descriptor open as the folders below it
/// are listed. No repository nests so deep; a job's chain of folders is refused, not
/// followed until the descriptors run out.
const MAX_DEPTH: usize = 256;

/// The paths the index holds, as the listing looks them up (folded to lower case on a file
/// system that ignores case, as libgit2 compared them).
pub(super) struct Tracked {
    /// Files, links and conflicts' sides.
    files: HashSet<Vec<u8>>,
    /// Submodules: their folders are not listed.
    gitlinks: HashSet<Vec<u8>>,
    /// Every folder holding something the index holds.
    folders: HashSet<Vec<u8>>,
    fold: bool,
}

impl Tracked {
    pub(super) fn new(fs: FileSystem) -> Tracked {
        Tracked { files: HashSet::new(), gitlinks: HashSet::new(), folders: HashSet::new(), fold: fs.ignorecase }
    }

    pub(super) fn add(&mut self, path: &[u8], gitlink: bool) {
        let path = self.key(path);
        for (i, b) in path.iter().enumerate() {
            if *b == b'/' {
                self.folders.insert(path[..i].to_vec());
            }
        }
        match gitlink {
            true => self.gitlinks.insert(path),
            false => self.files.insert(path),
        };
    }

    fn key(&self, path: &[u8]) -> Vec<u8> {
        match self.fold {
            true => path.to_ascii_lowercase(),
            false => path.to_vec(),
        }
    }
}

/// What [`list`] found.
#[derive(Default)]
pub(super) struct Listing {
    /// Untracked files and links, not ignored, with their `lstat` sizes.
    pub files: Vec<(Vec<u8>, u64)>,
    /// Untracked folders holding a `.git`: repositories the job made inside the checkout.
    pub repositories: Vec<Vec<u8>>,
}

/// The untracked files and links of the working tree at `workdir`, `.gitignore` (and
/// `.git/info/exclude`) respected as git respects them: folders ignored are not listed
/// (those holding something tracked are, all they hold untracked being ignored), a file
/// or link only where the index holds nothing, a FIFO, socket or device passed over (git
/// stores none), a submodule's folder not listed, an untracked folder that is a repository
/// of its own as git tells one ([`is_repository`]) named and not listed; one holding a
/// `.git` that is no repository is listed, its `.git` left out, as `git add -A` does. `abort` stops it between two folders.
pub(super) fn list(workdir: &Path, tracked: &Tracked, abort: &AtomicBool) -> Result<Listing, RepoError> {
    let failed = |path: &[u8], e: std::io::Error| local(ACTION, format!("{}: {e}", if path.is_empty() { ".".to_string() } else { shown(path) }));
    let case = if tracked.fold { Case::Fold } else { Case::Sensitive };
    let mut left = MAX_IGNORE_BYTES;
    let mut rules = gix_ignore::Search::default();
    // The lowest precedence: the repository's own list, then each folder's, the deepest last.
    if let Some(bytes) = read_ignore_file(workdir, b".git/info/exclude", &mut left)? {
        rules.patterns.push(List::from_bytes(&bytes, PathBuf::from(".git/info/exclude"), None, Ignore::default()));
    }
    let is_ignored = |rules: &gix_ignore::Search, path: &[u8], is_dir: bool| rules.pattern_matching_relative_path(path.into(), Some(is_dir), case).is_some_and(|m| !m.pattern.is_negative());
    let mut found = Listing::default();
    let root = Folder::open(workdir).map_err(|e| failed(b"", e))?;
    let mut stack = vec![Frame::enter(root, Vec::new(), false, workdir, &mut rules, &mut left)?];
    loop {
        let Some(frame) = stack.last_mut() else { break };
        let Some((name, st)) = frame.entries.next() else {
            if stack.pop().is_some_and(|f| f.has_rules) {
                rules.patterns.pop();
            }
            continue;
        };
        // Git's own folder, at any depth: git lists none.
        if (tracked.fold && name.as_bytes().eq_ignore_ascii_case(b".git")) || name.as_bytes() == b".git" {
            continue;
        }
        let mut path = frame.prefix.clone();
        path.extend_from_slice(name.as_bytes());
        let key = tracked.key(&path);
        let parent_ignored = frame.ignored;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if tracked.gitlinks.contains(&key) {
                    continue;
                }
                let holds_tracked = tracked.folders.contains(&key);
                let ignored = parent_ignored || is_ignored(&rules, &path, true);
                if ignored && !holds_tracked {
                    continue;
                }
                if abort.load(Ordering::SeqCst) {
                    return Err(local(ACTION, "given up"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(local(ACTION, format!("`{}` is more than {MAX_DEPTH} folders deep, deeper than the runner lists a working tree: have Claude remove it (or list it in .gitignore)", shown(&path))));
                }
                let frame = stack.last().expect("a frame above");
                let child = match frame.folder.open_child(&name) {
                    Ok(child) => child,
                    // Gone, swapped for a file or a link since it was listed, or closed to
                    // its owner: libgit2 passed over a folder it could not open, as git does
                    // (not opened up, as a removal's open does: a listing changes nothing).
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EACCES)) => continue,
                    Err(e) => return Err(failed(&path, e)),
                };
                if !holds_tracked && child.holds(c".git") && is_repository(workdir, &path) {
                    found.repositories.push(path);
                    continue;
                }
                path.push(b'/');
                stack.push(Frame::enter(child, path, ignored, workdir, &mut rules, &mut left)?);
            }
            libc::S_IFREG | libc::S_IFLNK => {
                if tracked.files.contains(&key) || tracked.gitlinks.contains(&key) || parent_ignored || is_ignored(&rules, &path, false) {
                    continue;
                }
                found.files.push((path, st.st_size as u64));
            }
            _ => {}
        }
    }
    Ok(found)
}

/// What git reads of a `HEAD` to tell a repository (`validate_headref`).
const HEAD_BYTES: u64 = 255;

/// Whether the untracked folder `path` beneath `workdir`, holding an entry `.git`, is a
/// repository of its own as `git add -A` tells one (`is_nonbare_repository_dir`): its `.git`
/// a folder git takes for a repository ([`is_git_directory`]), or a file starting `gitdir: `
/// naming one, or a file git cannot open or read whole. Anything else there — a file of
/// other words, an empty folder a failed clone left, a FIFO, socket or device — is no
/// repository: git lists what the folder holds (not `.git`), and so does the listing. (The
/// listing counted any `.git` as one: the folder's files were left out of the diff and
/// the push was refused; hostile review rev9, 1.)
///
/// The `.git` and `commondir` are read as the submodule pass reads them
/// ([`GitFiles::git_dir`], [`GitFiles::common_dir`]): opened beneath the checkout from
/// descriptors, without waiting, bounded as git bounds them. Where git would follow a link
/// (`.git`, `commondir`, or `objects` and `refs`, a link) or a path outside the checkout (a
/// `gitdir:` or `commondir` naming one), and where git gives up (a `commondir` it cannot
/// read), the runner does not look: it counts the folder as a repository, left out, which
/// refuses the push naming it.
fn is_repository(workdir: &Path, path: &[u8]) -> bool {
    // Each file is bounded on its own: git bounds no listing's reads together.
    let mut left = u64::MAX;
    let mut files = GitFiles::new(workdir, &mut left);
    match files.git_dir(Path::new(std::ffi::OsStr::from_bytes(path))) {
        Ok(None) => false,
        Ok(Some(gitdir)) => is_git_directory(workdir, &mut files, &gitdir),
        // git takes a `.git` it cannot open or read for a repository.
        Err(e) => !e.no_repository,
    }
}

/// Whether the folder `gitdir` beneath `workdir` is a git directory as git's
/// `is_git_directory` tells one: a `HEAD` naming a ref under `refs/` (`ref: refs/…`, or a
/// link to `refs/…`) or starting with a commit id, and `objects` and `refs` (in the folder
/// its `commondir` names, if it has one) that git can enter.
fn is_git_directory(workdir: &Path, files: &mut GitFiles, gitdir: &Path) -> bool {
    use std::io::Read;
    let head = match crate::files::open_beneath(workdir, &gitdir.join("HEAD")) {
        Ok(Some(Beneath::Link(target))) => target.starts_with(b"refs/"),
        Ok(Some(Beneath::File(file))) => {
            let mut text = Vec::new();
            match file.take(HEAD_BYTES).read_to_end(&mut text) {
                Err(_) => false,
                Ok(_) => match text.strip_prefix(b"ref:") {
                    Some(rest) => rest.trim_ascii_start().starts_with(b"refs/"),
                    None => text.len() >= 40 && text[..40].iter().all(u8::is_ascii_hexdigit),
                },
            }
        }
        _ => false,
    };
    if !head {
        return false;
    }
    // Read after `HEAD`, as git reads it: one git dies on is counted a repository.
    let Ok(common) = files.common_dir(gitdir) else { return true };
    // `access(X_OK)`: a folder, or a file with an execute bit; a link git follows is
    // counted as one.
    let mut stat = crate::files::StatBeneath::new(workdir);
    let enterable = |stat: &mut crate::files::StatBeneath, name: &str| match stat.lstat(&common.join(name)) {
        Ok(Some(st)) => matches!(st.st_mode & libc::S_IFMT, libc::S_IFDIR | libc::S_IFLNK) || st.st_mode & 0o111 != 0,
        Ok(None) => false,
        Err(_) => true,
    };
    enterable(&mut stat, "objects") && enterable(&mut stat, "refs")
}

/// A folder being listed.
struct Frame {
    folder: Folder,
    /// Its path beneath the checkout, with a `/` after it (empty: the checkout).
    prefix: Vec<u8>,
    /// Ignored itself, or inside an ignored folder: all it holds untracked is ignored.
    ignored: bool,
    /// Its `.gitignore`'s rules are the last of the search's.
    has_rules: bool,
    entries: std::vec::IntoIter<(CString, libc::stat)>,
}

impl Frame {
    /// The folder `folder` at `prefix`, its `.gitignore` read (unless it is ignored: then
    /// nothing untracked in it is listed, whatever the rules say) and added to `rules`,
    /// its entries looked at.
    fn enter(folder: Folder, prefix: Vec<u8>, ignored: bool, workdir: &Path, rules: &mut gix_ignore::Search, left: &mut u64) -> Result<Frame, RepoError> {
        let mut has_rules = false;
        if !ignored {
            let file = [prefix.as_slice(), b".gitignore"].concat();
            if let Some(bytes) = read_ignore_file(workdir, &file, left)? {
                rules.patterns.push(List::from_bytes(&bytes, PathBuf::from(std::ffi::OsStr::from_bytes(&file)), Some(Path::new("")), Ignore::default()));
                has_rules = true;
            }
        }
        let entries = folder.entries().map_err(|e| local(ACTION, format!("{}: {e}", if prefix.is_empty() { ".".to_string() } else { shown(&prefix[..prefix.len() - 1]) })))?;
        Ok(Frame { folder, prefix, ignored, has_rules, entries: entries.into_iter() })
    }
}

/// The ignore rules at `rel` (a `.gitignore`, `.git/info/exclude`) beneath `workdir`, read
/// from a descriptor opened without waiting: `None` when there is none — gone, a folder,
/// or a link (git follows none there). A FIFO, socket or device is refused, naming it, as
/// is a file over what git reads of one, or over what is `left` of [`MAX_IGNORE_BYTES`].
fn read_ignore_file(workdir: &Path, rel: &[u8], left: &mut u64) -> Result<Option<Vec<u8>>, RepoError> {
    use std::io::Read;
    let refused = |why: String| RepoError::IgnoreFile { path: shown(rel), why };
    let failed = |e: std::io::Error| local(ACTION, format!("{}: {e}", shown(rel)));
    let file = match crate::files::open_beneath(workdir, Path::new(std::ffi::OsStr::from_bytes(rel))).map_err(failed)? {
        None | Some(Beneath::Link(_)) | Some(Beneath::Other(libc::S_IFDIR)) => return Ok(None),
        Some(Beneath::Other(other)) => return Err(refused(format!("is {}", kind(other)))),
        Some(Beneath::File(file)) => file,
    };
    let size = file.metadata().map_err(failed)?.len();
    let max_mib = MAX_IGNORE_BYTES >> 20;
    if size > MAX_IGNORE_BYTES {
        return Err(refused(format!("is {size} bytes, more than git reads of one ({max_mib} MiB)")));
    }
    if size > *left {
        return Err(refused(format!("is {size} bytes, more than is left of the {max_mib} MiB the runner reads of a working tree's ignore files together")));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // One byte more than is left: a file growing as it is read is told.
    file.take(*left + 1).read_to_end(&mut bytes).map_err(failed)?;
    if bytes.len() as u64 > *left {
        return Err(refused(format!("grew past the {max_mib} MiB the runner reads of a working tree's ignore files together as it was read")));
    }
    *left -= bytes.len() as u64;
    Ok(Some(bytes))
}
