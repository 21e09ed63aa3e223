//! Files and folders the agent keeps (results, status, replay memory, workspaces, `up`'s
//! keys): written so a crash leaves the old or the new content, never half, and readable
//! by the owner only — they hold keys, prompts, results and job ids.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Owner-only modes.
pub const PRIVATE_FILE: u32 = 0o600;
pub const PRIVATE_DIR: u32 = 0o700;

/// Writes a file so that a crash leaves either the old or the new content, never half,
/// and (with `durable`) so that it survives a power cut too, at the cost of an fsync.
///
/// Written through a temporary of its own beside it ([`temporary_name`]), made new (never
/// opened as found: a job, the agent's user, may have put a pipe or a link anywhere) and
/// renamed over `path`: with one fixed name (`<path>.tmp`), a folder a job made there
/// failed every later write of `path`, and two writers of one path removed each other's.
/// What a crash leaves is removed by [`remove_leftovers`] at the agent's start.
pub fn write_atomically(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = Temporary::beside(path)?;
    tmp.file.write_all(bytes)?;
    if durable {
        tmp.file.sync_all()?;
    }
    tmp.rename()
}

/// [`write_atomically`], durable: the new content and its name survive a power cut. The
/// file's fsync keeps its bytes; its name, given by the rename, is the folder's, which is
/// synced too — without that a power cut could leave the folder as before the rename (the
/// old file, or none: `up` then made new keys, and every printed secret and key pasted
/// elsewhere went stale). `new_folders` of its ancestors were made for it (by
/// [`private_dir`]) and are synced too, each in its parent, so the path itself survives.
pub fn write_durably(path: &Path, bytes: &[u8], new_folders: usize) -> std::io::Result<()> {
    write_atomically(path, bytes, true)?;
    sync_up(path.parent(), new_folders + 1)
}

/// Syncs `folder` and the `levels - 1` folders above it, each holding the name of the one
/// below: what makes the names of a new file's folder and of `levels - 1` new folders on
/// its path ([`private_dir`]'s count) survive a power cut.
pub fn sync_up(mut folder: Option<&Path>, levels: usize) -> std::io::Result<()> {
    for _ in 0..levels {
        let Some(dir) = folder else { break };
        // A relative path's first folder is named in the working directory: "" is there.
        if dir.as_os_str().is_empty() {
            return sync_folder(Path::new("."));
        }
        sync_folder(dir)?;
        folder = dir.parent();
    }
    Ok(())
}

/// A file [`write_atomically`] writes, not yet renamed over its `path`: for a writer that
/// fills it in steps (the session log's compaction, most of it off the log's lock).
/// Removed if dropped before [`Temporary::rename`]: half a file on a full disk holds the
/// very space that was lacking, and nothing else removes it while the agent runs.
pub struct Temporary {
    pub file: std::fs::File,
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    renamed: bool,
}

impl Temporary {
    /// Makes the temporary of `path` ([`temporary_name`]), owner-only.
    pub fn beside(path: &Path) -> std::io::Result<Temporary> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
        let mut tries = 0;
        let (tmp, file) = loop {
            let tmp = path.with_file_name(temporary_name(name));
            // create_new (O_EXCL): never follows a link, never opens what is there.
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(PRIVATE_FILE).custom_flags(libc::O_NOCTTY).open(&tmp) {
                Ok(file) => break (tmp, file),
                // A name a job took beforehand (it cannot guess one, but may try many).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(e),
            }
        };
        let tmp = Temporary { file, path: path.to_path_buf(), tmp, renamed: false };
        // `mode` is masked by the umask.
        tmp.file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))?;
        Ok(tmp)
    }

    /// Renames it over its path: from now on the path holds what was written into it.
    pub fn rename(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.renamed {
            // Ours: made O_EXCL under a name of its own.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The name of one write's temporary for the file `name`: `.<name>.<16 hex>.tmp`, random,
/// so that no two writes share one and a job cannot take it beforehand.
fn temporary_name(name: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.tmp", shared::ids::hex(&runtime::entropy::<8>())));
    tmp
}

/// Whether `name` is a temporary [`write_atomically`] makes ([`temporary_name`]).
pub fn is_temporary(name: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let name = name.as_bytes();
    let Some(rest) = name.strip_prefix(b".").and_then(|n| n.strip_suffix(b".tmp")) else { return false };
    let Some(dot) = rest.len().checked_sub(17) else { return false };
    dot > 0 && rest[dot] == b'.' && rest[dot + 1..].iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Removes from `dir` the temporaries of [`write_atomically`] a crash left (only files and
/// links of their names, never a folder, never through a link). Only where no write may be
/// under way: at the agent's start, with DATA_DIR's lock held (a write's own temporary
/// would go from under it). Returns how many it removed.
pub fn remove_leftovers(dir: &Path) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        // file_type does not follow a link; remove_file of a link removes the link.
        if is_temporary(&entry.file_name()) && entry.file_type().is_ok_and(|t| !t.is_dir()) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Opens a file the agent keeps (`what` names it in errors: "slot record", "session
/// record") — for reading, or for writing (made on its first use) — as a plain file, or
/// fails with an error that names it: never through a link (a record is read from and
/// written into its own file only), and never waiting on a pipe put there (an open waits
/// for the other end, and would hold every job's start with it): a folder, a link or a
/// pipe there is no record. The error keeps the kind of the open's (`NotFound`).
pub fn open_plain(path: &Path, write: bool, what: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    if write {
        options.write(true).create(true).truncate(false).mode(PRIVATE_FILE);
    } else {
        options.read(true);
    }
    open_plain_with(path, options, what)
}

/// [`open_plain`] with the caller's `options` (appending, say).
pub fn open_plain_with(path: &Path, options: std::fs::OpenOptions, what: &str) -> std::io::Result<std::fs::File> {
    open_checked(path, options, false, &format!("{} is not a {what} (not a plain file): move it out of the way", path.display()))
}

/// Reads a small file the agent keeps, opened as [`open_plain`] opens it (never through a
/// link, never waiting on a pipe): at most `max` bytes, or an error naming it when it holds
/// more (a job can make any file of the agent's user as large as the disk).
pub fn read_plain(path: &Path, max: usize, what: &str) -> std::io::Result<Vec<u8>> {
    read_at_most(open_plain(path, false, what)?, path, max, what)
}

/// [`read_plain`], and the file read made owner-only if it was not (one left open by an
/// older version, or another umask), through the descriptor read ([`restrict`]).
pub fn read_private(path: &Path, max: usize, what: &str) -> std::io::Result<Vec<u8>> {
    let file = open_plain(path, false, what)?;
    restrict(&file, PRIVATE_FILE)?;
    read_at_most(file, path, max, what)
}

/// Opens for reading a file the operator or Claude names (`AGENT_KEY_FILE`, Claude's
/// credentials), as [`open_plain`] opens one the agent keeps but through a link (secret
/// mounts are links, and Claude's own file may be one): never waiting on a pipe, a plain
/// file or an error naming it with `next_step`. Such a file is the agent's user's, so a
/// job can put anything there.
pub fn open_named(path: &Path, what: &str, next_step: &str) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    open_checked(path, options, true, &format!("{} is not a {what} (not a plain file): {next_step}", path.display()))
}

/// Reads a small file [`open_named`] opens: at most `max` bytes.
pub fn read_named(path: &Path, max: usize, what: &str) -> std::io::Result<Vec<u8>> {
    read_at_most(open_named(path, what, &format!("put the {what} back"))?, path, max, what)
}

/// The one open of [`open_plain_with`] and [`open_named`]: without waiting (an open of a
/// pipe waits for its other end, for ever), never taking a terminal for the session's,
/// through a link only when `follow`, and only a
/// plain file (else `not_plain`); other errors name the path and keep their kind
/// (`NotFound`).
fn open_checked(path: &Path, mut options: std::fs::OpenOptions, follow: bool, not_plain: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let refused = || std::io::Error::other(not_plain.to_string());
    let file = options
        // O_NOCTTY: a terminal put in a file's place, opened by a session leader without
        // one (the agent under a service manager), would become its controlling terminal.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | if follow { 0 } else { libc::O_NOFOLLOW })
        .open(path)
        // A pipe without a reader, opened for writing: ENXIO.
        .map_err(|e| if e.raw_os_error() == Some(libc::ENXIO) { refused() } else { named(e) })?;
    if !file.metadata().map_err(named)?.is_file() {
        return Err(refused());
    }
    Ok(file)
}

fn read_at_most(file: std::fs::File, path: &Path, max: usize, what: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    // Named like the open's errors, so every error of a read names its file once.
    file.take(max as u64 + 1).read_to_end(&mut bytes).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if bytes.len() > max {
        return Err(std::io::Error::other(format!("{} is over {max} bytes: it is not a {what}", path.display())));
    }
    Ok(bytes)
}

/// How much [`disk_usage`] walks: at most `entries` files and folders, and until `until`
/// (none: no end).
#[derive(Debug, Clone, Copy)]
pub struct WalkBudget {
    pub entries: u64,
    pub until: Option<std::time::Instant>,
}

impl WalkBudget {
    /// No bound: for the agent's own trees (the mirrors), which no job fills with files.
    pub const UNBOUNDED: WalkBudget = WalkBudget { entries: u64::MAX, until: None };
}

/// What [`disk_usage`] found: `bytes` on disk, and whether it walked everything
/// (`complete`; else its budget ran out, and the rest is not counted).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub complete: bool,
}

/// Files of more than one name [`disk_usage`] remembers, to count each once: past them a
/// file's further names count again (too much, never too little: room counted as held).
const MAX_LINKED_FILES: usize = 1 << 16;

/// The bytes the trees under `tops` take on disk (each entry's blocks, folders' too; links
/// not followed), within `budget`: a job's workspace is the job's to fill, and a walk of a
/// million files it made took the agent's time, and one file of a thousand names (hard
/// links) counted a thousand times. A file of several names counts once (its device and
/// inode remembered, [`MAX_LINKED_FILES`] at most), across all the trees. An entry that
/// vanishes or cannot be read is passed over.
pub fn disk_usage(tops: &[std::path::PathBuf], budget: WalkBudget) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut usage = Usage { bytes: 0, complete: false };
    let mut walked = 0u64;
    let mut linked = std::collections::HashSet::new();
    let mut stack = tops.to_vec();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            walked += 1;
            if walked > budget.entries || budget.until.is_some_and(|until| std::time::Instant::now() >= until) {
                return usage;
            }
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.nlink() > 1 && linked.len() < MAX_LINKED_FILES && !linked.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.bytes = usage.bytes.saturating_add(meta.blocks().saturating_mul(512));
        }
    }
    usage.complete = true;
    usage
}

/// The entries under `top` (a folder, not followed if it is a link) that an `open` by
/// path could wait on, or lead elsewhere from — FIFOs, devices, symbolic links — and the
/// folders that cannot be read (a job's `chmod 000`: what is inside is unknown); at most
/// `max` of them. Sockets are left (opening one fails at once). Why: libgit2 opens what it
/// finds in a repository's folder by path, and a FIFO a job put there (the agent's user can
/// write its checkout's `.git`, and its mirror through the checkout's alternates) blocked
/// that open for ever — the job, its slot, every later fetch of the repository, and the
/// agent's exit and start with it. An entry that vanishes during the walk is passed over;
/// no error stops the walk (one unreadable folder hid every FIFO beside it).
pub fn odd_entries(top: &Path, max: usize) -> std::io::Result<Vec<std::path::PathBuf>> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    if !std::fs::symlink_metadata(top)?.is_dir() {
        found.push(top.to_path_buf());
        return Ok(found);
    }
    let mut stack = vec![top.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            found.push(dir);
            if found.len() >= max {
                return Ok(found);
            }
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if !kind.is_file() && !kind.is_socket() {
                found.push(entry.path());
                if found.len() >= max {
                    return Ok(found);
                }
            }
        }
    }
    Ok(found)
}

/// What `lstat` says of entries under the folder `top` (a link itself, never what it
/// names), each reached through folders only ([`parent_beneath`]). The folder holding the
/// last one stays open, so the entries of a folder, looked up one after another (as an
/// index lists them), cost one `fstatat` each, not an open of each of their parents (which
/// made a checkout of 100,000 files take a second more to stage).
pub struct StatBeneath<'a> {
    top: &'a Path,
    held: Option<(std::path::PathBuf, std::os::fd::OwnedFd)>,
}

impl<'a> StatBeneath<'a> {
    pub fn new(top: &'a Path) -> StatBeneath<'a> {
        StatBeneath { top, held: None }
    }

    /// What `lstat` says of the entry `rel`: `None` when it is gone, or when one of its
    /// parents is not a folder (git sees a link there, not what is beyond it).
    pub fn lstat(&mut self, rel: &Path) -> std::io::Result<Option<libc::stat>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let name = match (&self.held, rel.file_name()) {
            (Some((held, _)), Some(name)) if held == parent => std::ffi::CString::new(name.as_bytes()).map_err(std::io::Error::other)?,
            _ => {
                self.held = None;
                let Some((folder, name)) = parent_beneath(self.top, rel)? else { return Ok(None) };
                self.held = Some((parent.to_path_buf(), folder));
                name
            }
        };
        let (_, folder) = self.held.as_ref().expect("held above");
        // SAFETY: fstatat relative to a folder we own, not following a link; `st` is written by it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatat(folder.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            let e = std::io::Error::last_os_error();
            return if gone(&e) { Ok(None) } else { Err(e) };
        }
        Ok(Some(st))
    }
}

/// The entry `rel` under a folder, as [`open_beneath`] found it.
#[derive(Debug)]
pub enum Beneath {
    /// A plain file, open for reading.
    File(std::fs::File),
    /// A symbolic link: the path it holds, never followed.
    Link(Vec<u8>),
    /// Anything else — a folder, a FIFO, a socket, a device —: its file type (`S_IFMT` bits).
    Other(libc::mode_t),
}

/// Opens the entry `rel` under the folder `top` as it is now, reached through folders only
/// ([`parent_beneath`]): a plain file open for reading, a link's own target (never
/// followed), or what else it is, never opened to wait on — `O_NONBLOCK`: an open of a FIFO
/// by path waits for a writer, for ever, and a process the job left running can put one at
/// any name between a listing and the open. The file type comes from the open descriptor,
/// so the file read is the one looked at. `None` when it is gone, or a parent is not a folder.
pub fn open_beneath(top: &Path, rel: &Path) -> std::io::Result<Option<Beneath>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::FileTypeExt;
    let Some((folder, name)) = parent_beneath(top, rel)? else { return Ok(None) };
    // O_NOCTTY: a terminal put there would become the session's, opened by a session
    // leader without one (the git worker).
    const FLAGS: libc::c_int = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: openat relative to a folder we own, with a NUL-terminated name.
    let fd = unsafe { libc::openat(folder.as_raw_fd(), name.as_ptr(), FLAGS) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // O_NOFOLLOW met a link: what it holds.
            Some(libc::ELOOP) => match read_link_at(&folder, &name) {
                Ok(target) => Ok(Some(Beneath::Link(target))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            // A socket (an open of one fails at once).
            Some(libc::ENXIO) => Ok(Some(Beneath::Other(libc::S_IFSOCK))),
            _ if gone(&e) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: a new descriptor, owned by nothing else.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let kind = file.metadata()?.file_type();
    Ok(Some(match kind {
        k if k.is_file() => Beneath::File(file),
        k if k.is_dir() => Beneath::Other(libc::S_IFDIR),
        k if k.is_fifo() => Beneath::Other(libc::S_IFIFO),
        k if k.is_char_device() => Beneath::Other(libc::S_IFCHR),
        k if k.is_block_device() => Beneath::Other(libc::S_IFBLK),
        _ => Beneath::Other(libc::S_IFSOCK),
    }))
}

/// What the link `name` in `folder` holds: at most what a path can be (`PATH_MAX`; Linux
/// makes no longer link).
fn read_link_at(folder: &std::os::fd::OwnedFd, name: &std::ffi::CStr) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut target = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat relative to a folder we own, with a NUL-terminated name, into a
    // buffer of the length given.
    let n = unsafe { libc::readlinkat(folder.as_raw_fd(), name.as_ptr(), target.as_mut_ptr().cast(), target.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize >= target.len() {
        return Err(std::io::Error::other("a link longer than a path can be"));
    }
    target.truncate(n as usize);
    Ok(target)
}

/// Whether `e`, from an open beneath a folder, says the entry is not there as a path through
/// folders: gone, or a parent that is not a folder (a file, or a link `O_NOFOLLOW` stopped at).
fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP))
}

/// The folder holding the entry `rel` under the folder `top`, open (`O_PATH`), and the
/// entry's name in it — reached through folders only: each parent is opened from the one
/// before (`openat`, `O_NOFOLLOW`), so a link among them is not followed (git sees the
/// link, not what is beyond it), nor one a process the job left running swaps in
/// meanwhile. `None` when a parent is gone or is not a folder. `rel` holds plain names only.
fn parent_beneath(top: &Path, rel: &Path) -> std::io::Result<Option<(std::os::fd::OwnedFd, std::ffi::CString)>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const FLAGS: libc::c_int = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let c_name = |name: &std::ffi::OsStr| std::ffi::CString::new(name.as_bytes()).map_err(std::io::Error::other);
    let mut names = Vec::new();
    for part in rel.components() {
        match part {
            std::path::Component::Normal(name) => names.push(c_name(name)?),
            _ => return Err(std::io::Error::other(format!("{} is not a path inside a folder", rel.display()))),
        }
    }
    let Some(last) = names.pop() else { return Err(std::io::Error::other("an empty path names no file")) };
    let top = c_name(top.as_os_str())?;
    // SAFETY: open with a NUL-terminated path; the descriptor is owned at once below.
    let fd = unsafe { libc::open(top.as_ptr(), FLAGS) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned by nothing else.
    let mut folder = unsafe { OwnedFd::from_raw_fd(fd) };
    for name in names {
        // SAFETY: openat relative to a folder we own, with a NUL-terminated name.
        let fd = unsafe { libc::openat(folder.as_raw_fd(), name.as_ptr(), FLAGS) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return if gone(&e) { Ok(None) } else { Err(e) };
        }
        // SAFETY: as above.
        folder = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok(Some((folder, last)))
}

/// Removes `top` and everything under it, never through a link (a link goes, not what it
/// points to), as `std::fs::remove_dir_all` does — but without recursing: std recurses
/// once per level, and a job can leave a chain of folders deeper than any stack (std's
/// overflowed the blocking pool's 2 MiB at some 15,000 levels, and the agent aborted).
/// Folders are opened by descriptor from their parent (`openat`, `O_NOFOLLOW`), so a
/// process the job left running cannot swap a link in to lead the removal elsewhere; at
/// most [`MAX_OPEN_LEVELS`] are open at once, and a folder deeper than that is moved up
/// under `top` (`renameat`, the entry itself) and removed from there. A folder closed to
/// its owner (a job's `chmod 000`, `chmod -w`: the tree is the agent's user's) is opened up
/// as it is reached, by descriptor: by path, one deeper than a path may name was never
/// reached.
pub fn remove_tree(top: &Path) -> std::io::Result<()> {
    if !std::fs::symlink_metadata(top)?.is_dir() {
        return std::fs::remove_file(top);
    }
    empty(Folder::open(top)?)?;
    std::fs::remove_dir(top)
}

/// Removes everything under the folder `top`, as [`remove_tree`] does, and keeps `top`
/// itself: for a folder whose absence, however short, someone else may see (a mirror's
/// `refs`, without which libgit2 takes the mirror for no repository). `top` is never a
/// link (refused, ELOOP or ENOTDIR: what it points to is not emptied); closed to its owner
/// (a job's `chmod 000`), it is opened up first.
pub fn empty_tree(top: &Path) -> std::io::Result<()> {
    let root = match Folder::open(top) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            open_up_folder(top)?;
            Folder::open(top)?
        }
        opened => opened?,
    };
    empty(root)
}

/// Empties the folder `root` (for [`remove_tree`] and [`empty_tree`]).
fn empty(root: Folder) -> std::io::Result<()> {
    // The folders being emptied, below `root`, each with its name in its parent.
    let mut open: Vec<(Folder, std::ffi::CString)> = Vec::new();
    let mut moved: u64 = 0;
    let mut moved_in_pass = false;
    loop {
        let here = open.last().map_or(&root, |(f, _)| f);
        let Some((name, is_dir)) = here.next()? else {
            match open.pop() {
                Some((emptied, name)) => {
                    drop(emptied);
                    let parent = open.last().map_or(&root, |(f, _)| f);
                    parent.unlink(&name, true)?;
                }
                // Folders moved up after `root` was first listed may not have been seen.
                None if moved_in_pass => {
                    moved_in_pass = false;
                    root.rewind();
                }
                None => break,
            }
            continue;
        };
        if !is_dir {
            here.unlink(&name, false)?;
            continue;
        }
        if open.len() >= MAX_OPEN_LEVELS {
            // Moved under `top` by a free name, one a job cannot have taken beforehand: with
            // `.deep-1`, `.deep-2`, … a job's 64 such folders, each deeper than the levels
            // held open, had every name tried taken and the removal fail at each try. A
            // name taken all the same (a job watching the folder) is tried past.
            let mut tries = 0;
            loop {
                moved += 1;
                tries += 1;
                let to = std::ffi::CString::new(format!(".deep-{moved}-{}", shared::ids::hex(&runtime::entropy::<8>()))).expect("no NUL");
                match here.rename_to(&name, &root, &to) {
                    Ok(()) => break,
                    Err(e) if tries < 64 && matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR)) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => return Err(e),
                }
            }
            moved_in_pass = true;
            continue;
        }
        match here.open_child_to_remove(&name) {
            Ok(child) => open.push((child, name)),
            // Gone, or no longer a folder (swapped for a file or a link): listed again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => here.unlink(&name, false)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Folders [`remove_tree`] holds open at most.
const MAX_OPEN_LEVELS: usize = 64;
/// The mode [`remove_tree`] gives a folder closed to its owner, to empty it.
const OPENED_UP: libc::mode_t = 0o700;

/// Opens the folder at `path` up to its owner (read, write, search) when a job closed it
/// (`chmod -w`, `chmod 000`: the folder is the agent's user's), never through a link: the
/// libc refuses to change a link's mode rather than follow it.
pub fn open_up_folder(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    if std::fs::symlink_metadata(path)?.permissions().mode() & OPENED_UP == OPENED_UP {
        return Ok(());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: fchmodat with a NUL-terminated path, not following a link.
    if unsafe { libc::fchmodat(libc::AT_FDCWD, c_path.as_ptr(), OPENED_UP, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A folder open by descriptor, never through a link, for what it holds: listed, looked
/// at, removed ([`remove_tree`]), or listed as a working tree (`repo::untracked`).
pub(crate) struct Folder(std::ptr::NonNull<libc::DIR>);

impl Folder {
    /// `O_NOFOLLOW`: a link in a folder's place is refused (ELOOP), not followed.
    /// `O_NONBLOCK`: what is opened is looked at before anything waits on it (a FIFO put
    /// where a folder was fails `O_DIRECTORY` at once).
    const FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;

    pub(crate) fn open(path: &Path) -> std::io::Result<Folder> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: open with a NUL-terminated path; the descriptor is handed to `from_fd`.
        Self::from_fd(unsafe { libc::open(path.as_ptr(), Self::FLAGS) })
    }

    fn from_fd(fd: libc::c_int) -> std::io::Result<Folder> {
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is an open folder we own; `fdopendir` takes it over (closed on failure
        // by us, on success by `closedir`).
        let dir = unsafe { libc::fdopendir(fd) };
        match std::ptr::NonNull::new(dir) {
            Some(dir) => Ok(Folder(dir)),
            None => {
                let e = std::io::Error::last_os_error();
                // SAFETY: closes the descriptor fdopendir did not take.
                unsafe { libc::close(fd) };
                Err(e)
            }
        }
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: a DIR we own.
        unsafe { libc::dirfd(self.0.as_ptr()) }
    }

    /// The folder `name` in this one, never through a link; one closed to its owner fails
    /// (EACCES), its mode left as it is: a listing only reads (`repo::untracked` passes
    /// over such a folder, as git does, and changes nothing of the job's working tree).
    pub(crate) fn open_child(&self, name: &std::ffi::CStr) -> std::io::Result<Folder> {
        // SAFETY: openat relative to a folder we own, with a NUL-terminated name.
        Self::from_fd(unsafe { libc::openat(self.fd(), name.as_ptr(), Self::FLAGS) })
    }

    /// [`Folder::open_child`] for a removal: a folder closed by the job (`chmod 000`) is
    /// opened up, never through a link (the libc refuses to change a link's mode rather
    /// than follow it), and opened again — it is going anyway.
    fn open_child_to_remove(&self, name: &std::ffi::CStr) -> std::io::Result<Folder> {
        match self.open_child(name) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                // SAFETY: fchmodat relative to a folder we own, with a NUL-terminated name.
                if unsafe { libc::fchmodat(self.fd(), name.as_ptr(), OPENED_UP, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
                    return Err(e);
                }
                self.open_child(name)
            }
            opened => opened,
        }
    }

    /// Runs `change` (of what this folder holds); refused as the folder is closed to its
    /// owner (`chmod -w` by the job: a Go module cache is so), opens it up and runs it again.
    fn opened_up(&self, change: impl Fn() -> libc::c_int) -> std::io::Result<()> {
        if change() == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // SAFETY: fchmod of a folder we own, by its descriptor.
        if e.raw_os_error() != Some(libc::EACCES) || unsafe { libc::fchmod(self.fd(), OPENED_UP) } != 0 {
            return Err(e);
        }
        if change() == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }

    /// What `lstat` says of the entry `name` (a link itself, never what it names); `None`
    /// when it is gone or cannot be looked at.
    fn lstat(&self, name: &std::ffi::CStr) -> Option<libc::stat> {
        // SAFETY: fstatat relative to a folder we own, not following a link; `st` is written by it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstatat(self.fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } == 0).then_some(st)
    }

    /// Whether this folder holds an entry `name` (of any kind, a link not followed).
    pub(crate) fn holds(&self, name: &std::ffi::CStr) -> bool {
        self.lstat(name).is_some()
    }

    /// The next entry (not `.` or `..`): its name and its `d_type`.
    fn read(&self) -> std::io::Result<Option<(std::ffi::CString, u8)>> {
        loop {
            // SAFETY: readdir on a DIR we own; errno is cleared first to tell its end from
            // an error. The entry is copied out before the next call.
            let entry = unsafe {
                *libc::__errno_location() = 0;
                libc::readdir(self.0.as_ptr())
            };
            if entry.is_null() {
                let e = std::io::Error::last_os_error();
                return if e.raw_os_error() == Some(0) { Ok(None) } else { Err(e) };
            }
            // SAFETY: a non-null entry from readdir, valid until the next call.
            let (name, kind) = unsafe { (std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()).to_owned(), (*entry).d_type) };
            if name.as_bytes() != b"." && name.as_bytes() != b".." {
                return Ok(Some((name, kind)));
            }
        }
    }

    /// The next entry (not `.` or `..`): its name and whether it is a folder (not a link).
    fn next(&self) -> std::io::Result<Option<(std::ffi::CString, bool)>> {
        let Some((name, kind)) = self.read()? else { return Ok(None) };
        let is_dir = match kind {
            libc::DT_DIR => true,
            libc::DT_UNKNOWN => self.lstat(&name).is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR),
            _ => false,
        };
        Ok(Some((name, is_dir)))
    }

    /// Its entries (not `.` or `..`), sorted by name, each with what `lstat` says of it;
    /// one gone or that cannot be looked at since it was listed is left out.
    pub(crate) fn entries(&self) -> std::io::Result<Vec<(std::ffi::CString, libc::stat)>> {
        let mut entries = Vec::new();
        while let Some((name, _)) = self.read()? {
            if let Some(st) = self.lstat(&name) {
                entries.push((name, st));
            }
        }
        entries.sort_by(|(a, _), (b, _)| a.cmp(b));
        Ok(entries)
    }

    /// Removes the entry `name` (a folder, empty, when `folder`); one already gone is fine.
    fn unlink(&self, name: &std::ffi::CStr, folder: bool) -> std::io::Result<()> {
        let flags = if folder { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: unlinkat relative to a folder we own, with a NUL-terminated name.
        match self.opened_up(|| unsafe { libc::unlinkat(self.fd(), name.as_ptr(), flags) }) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            unlinked => unlinked,
        }
    }

    fn rename_to(&self, name: &std::ffi::CStr, to_dir: &Folder, to: &std::ffi::CStr) -> std::io::Result<()> {
        // SAFETY: renameat between folders we own, with NUL-terminated names.
        let rename = || unsafe { libc::renameat(self.fd(), name.as_ptr(), to_dir.fd(), to.as_ptr()) };
        if rename() == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EACCES) {
            return Err(e);
        }
        // Moved to another parent, a folder has its `..` rewritten: it must be open to its
        // owner too, not only the folders it leaves and enters (a job's `chmod -w` or
        // `chmod 000` of it, where it is moved up, failed the removal there). Never through
        // a link, as in `open_child_to_remove`.
        // SAFETY: fchmod / fchmodat of folders we own, by descriptor, with a NUL-terminated name.
        unsafe {
            libc::fchmod(self.fd(), OPENED_UP);
            libc::fchmod(to_dir.fd(), OPENED_UP);
            libc::fchmodat(self.fd(), name.as_ptr(), OPENED_UP, libc::AT_SYMLINK_NOFOLLOW);
        }
        if rename() == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }

    fn rewind(&self) {
        // SAFETY: a DIR we own.
        unsafe { libc::rewinddir(self.0.as_ptr()) }
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        // SAFETY: a DIR we own, closed once.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

/// Makes a pipe at `path`, as a job of the agent's user can put one in place of any file
/// the agent keeps (tests of what the agent does then).
#[cfg(test)]
pub(crate) fn pipe_at(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Syncs the folder `dir` (the names made or removed in it). Opened only as a folder: the
/// agent's user (a job) can swap a folder of the agent's for a link to a terminal or a pipe,
/// and an open of those takes the terminal for the session's or waits for ever.
pub fn sync_folder(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_NOCTTY).open(dir)?.sync_all()?;
    #[cfg(test)]
    SYNCED.with(|synced| synced.borrow_mut().push(dir.to_path_buf()));
    Ok(())
}

#[cfg(test)]
thread_local! {
    static SYNCED: std::cell::RefCell<Vec<std::path::PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The folders this thread synced ([`sync_folder`]) since it last asked: what a test's
/// writes made durable beside their files.
#[cfg(test)]
pub(crate) fn synced_folders() -> Vec<std::path::PathBuf> {
    SYNCED.with(|synced| std::mem::take(&mut *synced.borrow_mut()))
}

/// Creates `dir` (and missing parents) owner-only, and makes an existing one owner-only
/// (an older version, or another umask, may have left it open).
///
/// The folder is opened and its mode changed through that descriptor: what is changed is
/// the folder whose mode was read. A link there is followed (an operator may put a folder
/// of the agent's on another disk that way). A folder closed to its user (a job's
/// `chmod 000`, `chmod -w`) is opened up to owner-only too, or the agent could not start.
///
/// Returns how many folders it made (`dir` and its missing parents), for
/// [`write_durably`]: each one's name is in its parent, which a durable file under it syncs.
pub fn private_dir(dir: &Path) -> std::io::Result<usize> {
    private_dir_through(dir, "/proc/self/fd")
}

/// [`private_dir`], a folder closed to its user changed through its link in `fd_links`
/// (/proc/self/fd).
fn private_dir_through(dir: &Path, fd_links: &str) -> std::io::Result<usize> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let named = |e: std::io::Error| unusable_folder(dir, e);
    // Counted before: the mkdir says nothing of what it made. (A folder another process
    // makes meanwhile is counted too, and synced for nothing.)
    let missing = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && std::fs::symlink_metadata(a).is_err()).count();
    std::fs::DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(dir).map_err(named)?;
    let private = |mode: u32| mode & 0o777 == PRIVATE_DIR;
    // Changed by its descriptor where it opens for reading (no /proc needed).
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_NOCTTY).open(dir) {
        Ok(folder) => {
            if !private(folder.metadata().map_err(named)?.permissions().mode()) {
                folder.set_permissions(std::fs::Permissions::from_mode(PRIVATE_DIR)).map_err(named)?;
            }
            return Ok(missing);
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(named(e)),
    }
    // Closed to its user: O_PATH opens it whatever its mode.
    let folder = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_DIRECTORY).open(dir).map_err(named)?;
    if !private(folder.metadata().map_err(named)?.permissions().mode()) {
        // fchmod refuses an O_PATH descriptor; its /proc/self/fd link names the same folder.
        std::fs::set_permissions(format!("{fd_links}/{}", folder.as_raw_fd()), std::fs::Permissions::from_mode(PRIVATE_DIR)).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{} is closed to its owner and cannot be opened up ({e}; is /proc mounted?): chmod 700 it", dir.display()))
        })?;
    }
    Ok(missing)
}

/// Why the folder `dir` cannot be made or used, with what to do (keeping `e`'s kind). What a
/// job can put at the name (a fifo, a file, a link to a folder not the user's) stops the
/// agent's start: the error says which name, and to remove it. A full disk is said as one:
/// ext4 refuses a `mkdir` with ENOSPC once its blocks or inodes are used up, and the first
/// `up` on such a disk was told to remove what stood in the place of DATA_DIR/up. So is a
/// read-only disk, or a parent this user cannot write: the folder cannot be made there.
fn unusable_folder(dir: &Path, e: std::io::Error) -> std::io::Error {
    // A read-only disk, or a parent this user cannot write with nothing at the name: the
    // folder cannot be made there, and nothing is to be removed. (EPERM and EACCES are one
    // kind: a folder of another owner, refused its chmod, stands at its name.)
    let cannot_make = e.kind() == std::io::ErrorKind::ReadOnlyFilesystem
        || (e.kind() == std::io::ErrorKind::PermissionDenied && std::fs::symlink_metadata(dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound));
    let what = if disk_full(&e) {
        format!("cannot make {} ({e}): {FREE_SPACE}", dir.display())
    } else if cannot_make {
        format!("cannot make {} ({e}): set DATA_DIR to a folder this user can write, on a disk that is not read-only", dir.display())
    } else {
        format!("{} ({e}): it must be a folder of the agent's user, or absent: remove what stands in its place", dir.display())
    };
    std::io::Error::new(e.kind(), what)
}

/// The errnos of a full disk and of a full quota: one list, read by [`disk_full`] as the
/// kinds std gives them, and by `repo::error::disk_full` as the OS's words for them (in
/// libgit2's messages).
pub const DISK_FULL_ERRNOS: [i32; 2] = [libc::ENOSPC, libc::EDQUOT];

/// Whether `e` is a full disk, or a full quota ([`DISK_FULL_ERRNOS`]): by its kind, which the
/// errors that name a path ([`private_dir`]'s, `runtime::hold_lock`'s) keep.
pub fn disk_full(e: &std::io::Error) -> bool {
    DISK_FULL_ERRNOS.iter().any(|&errno| std::io::Error::from_raw_os_error(errno).kind() == e.kind())
}

/// Whether `dir` takes a write now: a small file made, written, synced and removed
/// there (an agent that could not start a job for want of disk finds by this when it can
/// again). Made new, never through a link: a job of the agent's user may have put one in
/// its place.
pub fn probe_write(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(".probe-write");
    let _ = std::fs::remove_file(&path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .and_then(|mut file| {
            // A block's worth: a full disk may still take an empty file (a free inode).
            file.write_all(&[0u8; 4096])?;
            file.sync_all()
        });
    let _ = std::fs::remove_file(&path);
    written
}

/// What to do about a full disk under DATA_DIR ([`disk_full`]).
pub const FREE_SPACE: &str = "the disk (or your quota) is full: free some space there, or set DATA_DIR to a folder on another disk";

/// Takes group and other permissions off the open `file` if it has any: by its
/// descriptor, never by its path, which a job (the agent's user) can swap for a link to
/// another file of the user's between the open and the change (a script would lose its
/// execute bits, a page its readers).
pub fn restrict(file: &std::fs::File, mode: u32) -> std::io::Result<()> {
    let current = file.metadata()?.permissions().mode();
    if current & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn disk_usage_counts_a_file_of_many_names_once_and_stops_at_its_budget() {
        let root = std::env::temp_dir().join(format!("cr-files-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(a.join("deep")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("deep/big"), vec![7u8; 1 << 20]).unwrap();
        let one = disk_usage(&[a.clone()], WalkBudget::UNBOUNDED);
        assert!(one.complete && one.bytes >= 1 << 20, "{one:?}");
        // A hundred more names of it, in this tree and another: the same bytes.
        for i in 0..50 {
            std::fs::hard_link(a.join("deep/big"), a.join(format!("name-{i}"))).unwrap();
            std::fs::hard_link(a.join("deep/big"), b.join(format!("name-{i}"))).unwrap();
        }
        let both = disk_usage(&[a.clone(), b.clone()], WalkBudget::UNBOUNDED);
        assert!(both.complete && both.bytes < one.bytes + (1 << 20), "counted once per name: {both:?}, one name {one:?}");
        // Out of entries, or of time: cut short, and said so.
        let cut = disk_usage(&[a.clone(), b.clone()], WalkBudget { entries: 10, until: None });
        assert!(!cut.complete && cut.bytes <= both.bytes, "{cut:?}");
        let late = disk_usage(&[a.clone()], WalkBudget { entries: u64::MAX, until: Some(std::time::Instant::now()) });
        assert_eq!(late, Usage { bytes: 0, complete: false });
        assert_eq!(disk_usage(&[root.join("gone")], WalkBudget::UNBOUNDED), Usage { bytes: 0, complete: true });
        std::fs::remove_dir_all(&root).unwrap();
    }
    use super::*;

    #[test]
    fn folders_and_files_are_owner_only_even_if_they_existed_open() {
        let root = std::env::temp_dir().join(format!("cr-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&root.join("a/b")).unwrap();
        private_dir(&root).unwrap();
        for dir in [root.clone(), root.join("a"), root.join("a/b")] {
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700, "{}", dir.display());
        }
        std::fs::write(root.join("f.tmp"), "old").unwrap();
        std::fs::set_permissions(root.join("f.tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&root.join("f.json"), b"new", false).unwrap();
        assert_eq!(std::fs::metadata(root.join("f.json")).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A folder emptied in place stays, whatever it held (a folder closed to its owner, a
    /// link, which goes, not what it names), and one that is a link is refused, what it
    /// names left as it was: a mirror's `refs` is emptied so ([`crate::repo::mirror`]).
    #[test]
    fn a_folder_emptied_in_place_stays_and_is_never_emptied_through_a_link() {
        let root = std::env::temp_dir().join(format!("cr-files-empty-{}", std::process::id()));
        let _ = remove_tree(&root);
        let (top, elsewhere) = (root.join("refs"), root.join("elsewhere"));
        std::fs::create_dir_all(top.join("heads/main.d/deeper")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("kept"), "kept").unwrap();
        std::fs::write(top.join("heads/main"), "0123").unwrap();
        std::os::unix::fs::symlink(&elsewhere, top.join("link")).unwrap();
        std::fs::set_permissions(top.join("heads/main.d"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o000)).unwrap();
        empty_tree(&top).unwrap();
        assert!(std::fs::symlink_metadata(&top).unwrap().is_dir(), "the folder stays");
        assert_eq!(std::fs::read_dir(&top).unwrap().count(), 0, "and holds nothing");
        std::os::unix::fs::symlink(&elsewhere, root.join("a-link")).unwrap();
        assert!(empty_tree(&root.join("a-link")).is_err(), "a link is refused");
        assert_eq!(std::fs::read_to_string(elsewhere.join("kept")).unwrap(), "kept", "what a link names is left as it was");
        remove_tree(&root).unwrap();
    }

    /// The folders made are counted, for the durable file that goes under them
    /// ([`write_durably`] syncs each in its parent).
    #[test]
    fn the_folders_made_are_counted() {
        let root = std::env::temp_dir().join(format!("cr-files-count-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        assert_eq!(private_dir(&root.join("a/b/c")).unwrap(), 3);
        assert_eq!(private_dir(&root.join("a/b/c")).unwrap(), 0);
        assert_eq!(private_dir(&root.join("a/d")).unwrap(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A disk too full for a folder (ext4's ENOSPC at `mkdir`, a full quota's EDQUOT) was
    /// said as something standing in the folder's place, to be removed. It is said as a
    /// full disk, naming the folder. (The operator test fills a tmpfs's inodes; here the
    /// error is the helper's own.)
    #[test]
    fn a_full_disk_is_said_as_one() {
        let dir = Path::new("/data/claude-runner/up");
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = unusable_folder(dir, std::io::Error::from_raw_os_error(errno));
            let said = e.to_string();
            assert!(said.contains("cannot make /data/claude-runner/up") && said.contains("is full") && said.contains("free some space"), "{said}");
            assert!(!said.contains("remove what stands"), "{said}");
            assert!(disk_full(&e), "the kind is kept: {said}");
        }
        let said = unusable_folder(dir, std::io::Error::from_raw_os_error(libc::EEXIST)).to_string();
        assert!(said.contains("remove what stands in its place"), "{said}");
        let said = unusable_folder(dir, std::io::Error::from_raw_os_error(libc::EROFS)).to_string();
        assert!(said.contains("cannot make /data/claude-runner/up") && said.contains("set DATA_DIR") && !said.contains("remove what stands"), "{said}");
    }

    /// What a job (the agent's user) can put at the name of one of the agent's folders — a
    /// fifo, a file, a link to a folder of another owner — stops the agent's start; the
    /// error said only "File exists" or "Operation not permitted" (with DATA_DIR, not the
    /// folder), so the operator could not tell what to remove.
    #[test]
    fn what_stands_in_a_folders_place_is_named() {
        let root = std::env::temp_dir().join(format!("cr-files-inplace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let fifo = root.join("spool");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-ended path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        std::fs::write(root.join("records"), b"").unwrap();
        // A folder of another owner, where the tests run as root: / itself, mode 755.
        let theirs = root.join("started");
        std::os::unix::fs::symlink("/", &theirs).unwrap();
        let said: Vec<String> = ["spool", "records"].iter().map(|n| private_dir(&root.join(n)).unwrap_err().to_string()).collect();
        let foreign = (unsafe { libc::geteuid() } != 0).then(|| private_dir(&theirs).unwrap_err().to_string());
        std::fs::remove_dir_all(&root).unwrap();
        for (said, name) in said.iter().zip(["spool", "records"]) {
            assert!(said.contains(&root.join(name).display().to_string()) && said.contains("remove"), "{said}");
        }
        if let Some(said) = foreign {
            assert!(said.contains(&theirs.display().to_string()), "{said}");
        }
    }

    /// Without /proc (a chroot, a container that does not mount it) a folder left open by
    /// an older version or another umask is still made owner-only: b44c542 changed every
    /// folder's mode through /proc/self/fd, so such an agent could no longer start
    /// ("No such file or directory"), where the descriptor's fchmod had done it before.
    #[test]
    fn an_open_folder_is_made_private_without_proc() {
        let root = std::env::temp_dir().join(format!("cr-files-noproc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let made = private_dir_through(&root, "/no-proc-here/self/fd").map_err(|e| e.to_string());
        let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!((made, mode), (Ok(0), PRIVATE_DIR));
    }

    /// A job (the agent's user) can close a folder of the agent's to that user (`chmod 000
    /// DATA_DIR/workspaces`). Opened for its descriptor (41c826f), such a folder was refused
    /// (EACCES) and the agent could not start again; it is opened up to owner-only instead.
    #[test]
    fn a_folder_closed_to_its_user_is_opened_up_not_refused() {
        let root = std::env::temp_dir().join(format!("cr-files-closed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let closed = root.join("workspaces");
        std::fs::create_dir_all(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o000)).unwrap();
        let made = crate::workspace::tests::as_an_ordinary_user({
            let closed = closed.clone();
            move || private_dir(&closed).map_err(|e| e.to_string())
        });
        let mode = std::fs::metadata(&closed).unwrap().permissions().mode() & 0o777;
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!((made, mode), (Ok(0), PRIVATE_DIR));
    }

    /// A job (the agent's user) swaps a file the agent read for a link to another file of
    /// the user's (a script, a page a web server serves) between the read and the taking
    /// of group and other permissions: the permissions are taken off the file read, never
    /// off what the link names.
    #[test]
    fn permissions_are_taken_off_the_file_read_not_a_link_swapped_in() {
        let dir = std::env::temp_dir().join(format!("cr-files-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (path, victim) = (dir.join("up.json"), dir.join("tool.sh"));
        std::fs::write(&path, "{}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&victim, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let read = open_plain(&path, false, "state").unwrap();
        std::fs::rename(&path, dir.join("moved.json")).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        restrict(&read, PRIVATE_FILE).unwrap();
        drop(read);
        assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o755, "the link's target was changed");
        assert_eq!(std::fs::metadata(dir.join("moved.json")).unwrap().permissions().mode() & 0o777, 0o600, "the file read was left open");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job (the agent's user) can put a terminal where a file outside the agent's
    /// control is named (Claude's credentials file): opened by a session leader without a
    /// controlling terminal (the agent under a service manager), it became that session's
    /// controlling terminal — its hangup and job-control signals the job's to send. The
    /// open refuses it and leaves the session without one.
    #[test]
    fn a_terminal_in_place_of_a_named_file_never_becomes_the_controlling_one() {
        // SAFETY: a pseudo-terminal pair, its follower's name read before anything else runs
        // in this test; the fork's child only opens files and exits.
        unsafe {
            let leader = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(leader >= 0 && libc::grantpt(leader) == 0 && libc::unlockpt(leader) == 0);
            let name = std::ffi::CStr::from_ptr(libc::ptsname(leader)).to_str().unwrap().to_string();
            let child = libc::fork();
            if child == 0 {
                libc::setsid();
                let refused = open_named(Path::new(&name), "Claude credentials file", "put it back").is_err();
                let tty = libc::open(c"/dev/tty".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
                libc::_exit(if !refused { 2 } else if tty >= 0 { 3 } else { 0 });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(child, &mut status, 0), child);
            libc::close(leader);
            let code = libc::WEXITSTATUS(status);
            assert!(code != 2, "the terminal was taken for a file");
            assert!(code != 3, "the terminal became the session's controlling terminal");
            assert_eq!(code, 0);
        }
    }

    /// What a process the job left running can put at a name staging opens: a FIFO is
    /// returned as one, at once (an open by path waited for a writer, for ever); a link is
    /// its target, never followed; under a linked folder there is nothing; a file is open.
    #[test]
    fn open_beneath_never_waits_on_a_fifo_nor_follows_a_link() {
        use std::os::unix::ffi::OsStrExt;
        let root = std::env::temp_dir().join(format!("cr-files-beneath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("top/dir")).unwrap();
        std::fs::write(root.join("outside"), "outside").unwrap();
        std::fs::write(root.join("top/dir/file"), "inside").unwrap();
        pipe_at(&root.join("top/dir/fifo"));
        std::os::unix::fs::symlink(root.join("outside"), root.join("top/dir/link")).unwrap();
        std::os::unix::fs::symlink(root.join("top/dir"), root.join("top/linked")).unwrap();
        let top = root.join("top");
        let opened = |rel: &str| open_beneath(&top, Path::new(rel)).unwrap();
        let file = match opened("dir/file") {
            Some(Beneath::File(file)) => std::io::read_to_string(file).unwrap(),
            other => panic!("{other:?}"),
        };
        let fifo = opened("dir/fifo");
        let link = opened("dir/link");
        let (through, gone) = (opened("linked/file"), opened("dir/none"));
        let mut stat = StatBeneath::new(&top);
        let sizes: Vec<_> = ["dir/file", "dir/link", "linked/file", "dir/none", "dir/file"].iter().map(|rel| stat.lstat(Path::new(rel)).unwrap().map(|st| st.st_size)).collect();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(file, "inside");
        assert!(matches!(fifo, Some(Beneath::Other(libc::S_IFIFO))), "{fifo:?}");
        assert!(matches!(&link, Some(Beneath::Link(target)) if target == root.join("outside").as_os_str().as_bytes()), "{link:?}");
        assert!(through.is_none() && gone.is_none(), "{through:?} {gone:?}");
        assert_eq!(sizes, [Some(6), Some(root.join("outside").as_os_str().len() as i64), None, None, Some(6)]);
    }

    /// A write that fails part way (a full disk, here a rename that cannot happen) leaves
    /// nothing behind: a half-written temporary file on a full disk would hold the very
    /// space the agent lacks, and nothing else ever removes it.
    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("cr-files-failed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("result.json/in-the-way")).unwrap();
        assert!(write_atomically(&dir.join("result.json"), b"{}", true).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(left, vec![std::ffi::OsString::from("result.json")], "the temporary file was left behind");
    }

    /// What a crash leaves of a write (its temporary) is removed at the start; nothing else
    /// is: not a folder of a temporary's name (a job's), not what a link there names, not
    /// the files themselves or names that only look alike.
    #[test]
    fn a_crash_s_temporaries_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("cr-files-leftovers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = |name: &str| temporary_name(std::ffi::OsStr::new(name)).into_string().unwrap();
        let (left, folder, link) = (tmp("status.json"), tmp("sessions.log"), tmp("up.json"));
        std::fs::write(dir.join(&left), "half").unwrap();
        std::fs::create_dir(dir.join(&folder)).unwrap();
        std::fs::write(dir.join("victim"), "kept").unwrap();
        std::os::unix::fs::symlink(dir.join("victim"), dir.join(&link)).unwrap();
        let kept = ["status.json", "status.tmp", ".status.json.tmp", ".status.json.0123456789ABCDEF.tmp", "..0123456789abcdef.tmp", ".x.0123456789abcde.tmp"];
        for name in kept {
            std::fs::write(dir.join(name), "theirs").unwrap();
        }
        let removed = remove_leftovers(&dir);
        let mut names: Vec<String> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        names.sort();
        let victim = std::fs::read_to_string(dir.join("victim"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut expected: Vec<String> = kept.iter().map(|n| n.to_string()).chain([folder, "victim".to_string()]).collect();
        expected.sort();
        assert_eq!((removed, names, victim.ok()), (2, expected, Some("kept".to_string())));
    }

    /// A job (the agent's user) makes a folder where the write's temporary file went
    /// (`status.tmp` in DATA_DIR, when it was `<path>.tmp`): remove_file cannot remove it,
    /// and every later write of that file failed. Each write makes a name of its own.
    #[test]
    fn a_folder_planted_where_a_temporary_went_stops_no_write() {
        let dir = std::env::temp_dir().join(format!("cr-files-planted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("status.tmp/in-the-way")).unwrap();
        std::fs::create_dir_all(dir.join(".status.json.tmp/in-the-way")).unwrap();
        let written = (0..2).map(|n| write_atomically(&dir.join("status.json"), format!("{n}").as_bytes(), false).map_err(|e| e.to_string())).collect::<Vec<_>>();
        let content = std::fs::read_to_string(dir.join("status.json")).ok();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!((written, content), (vec![Ok(()), Ok(())], Some("1".to_string())));
    }
}
