//! A job's workspace on disk: a fresh folder under `DATA_DIR/workspaces/<job id>` that no
//! other job sees, the working directory inside it (which must stay inside, after
//! symlinks), and the Claude session an earlier job left, carried over so `session_id`
//! resumes it.

use std::path::{Path, PathBuf};

/// The folder of the jobs' workspaces, `DATA_DIR/workspaces`, made owner-only if need be
/// and named as the kernel names it (symlinks resolved): found once, at the agent's start,
/// so that [`prepare`] resolves nothing per job.
pub fn root(data_dir: &Path) -> std::io::Result<PathBuf> {
    let root = data_dir.join("workspaces");
    crate::files::private_dir(&root)?;
    root.canonicalize()
}

/// What the file system holding a folder has left for the agent's user (`statvfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes the agent's user may still write (`f_bavail` blocks).
    pub free: u64,
    /// The file system's size in bytes.
    pub size: u64,
    /// Files and folders that may still be made (`f_favail`); `None` where the file
    /// system counts none (`f_files` 0: btrfs, some network ones).
    pub free_inodes: Option<u64>,
    /// The unit a file's size is rounded up to (`f_frsize`).
    pub block: u64,
}

/// [`DiskSpace`] of the file system holding `dir`.
pub fn disk_space(dir: &Path) -> std::io::Result<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the type statvfs fills.
    if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled the buffer.
    let stats = unsafe { stats.assume_init() };
    // 64-bit fields on the 64-bit Linux the agent is built for.
    let block = stats.f_frsize.max(1);
    Ok(DiskSpace {
        free: stats.f_bavail.saturating_mul(block),
        size: stats.f_blocks.saturating_mul(block),
        free_inodes: (stats.f_files != 0).then_some(stats.f_favail),
        block,
    })
}

/// A fresh, empty workspace `root/<job_id>` (`root` from [`root`]), and the working
/// directory inside it.
///
/// The workspace is made by one `mkdir` (owner-only: mode 700 under the agent's umask): it
/// cannot be a symlink (a `mkdir` follows none) and, in a `root` with symlinks resolved, it
/// is its own real path. Only a leftover of the same name (a job sent again) is removed
/// first, and only a `working_dir` — made inside it, where a job of the same user could
/// race in a symlink — is resolved and checked. Its errors come as the system gave them
/// (kind and errno): whether one is the agent's want or the job's own, the runner tells
/// (`runner::agents_want`).
pub fn prepare(root: &Path, job_id: &str, working_dir: Option<&str>) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    if !shared::ids::plain_id(job_id, shared::ids::MAX_JOB_ID) {
        return Err(std::io::Error::other("the job id is not a plain name"));
    }
    let workspace = root.join(job_id);
    let fresh = || std::fs::DirBuilder::new().mode(crate::files::PRIVATE_DIR).create(&workspace);
    match fresh() {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A leftover (a folder, or anything else: a link goes, not what it points to).
            // A folder that stays says why (EBUSY, EPERM), not the `unlink`'s EISDIR.
            remove(&workspace).or_else(|e| std::fs::remove_file(&workspace).map_err(|_| e))?;
            fresh()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The folder of workspaces went away under the running agent.
            crate::files::private_dir(root)?;
            fresh()?;
        }
        Err(e) => return Err(e),
    }
    // The edge validated it; check again here, the side that touches the disk.
    let Some(dir) = working_dir else { return Ok(workspace) };
    let dir = shared::contract::checked_working_dir(dir).map_err(|e| std::io::Error::other(e.body.error))?;
    let cwd = workspace.join(&dir);
    std::fs::create_dir_all(&cwd)?;
    let real = cwd.canonicalize()?;
    if !real.starts_with(&workspace) {
        return Err(std::io::Error::other("working_dir leaves the workspace"));
    }
    Ok(real)
}

/// Removes a finished job's workspace. Most jobs leave it empty, and one `rmdir` removes
/// an empty folder; `remove_dir_all` (which opens, lists and stats it) runs only when that
/// is refused.
pub fn remove(workspace: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(workspace) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => crate::files::remove_tree(workspace).or_else(|e| {
            // The job left folders its own user may not list or empty as they are
            // (read-only: a Go module cache, a `chmod -w`; closed: `chmod 000`): they are
            // that user's, so opened up, and removed.
            if e.kind() != std::io::ErrorKind::PermissionDenied {
                return Err(e);
            }
            open_up(workspace);
            crate::files::remove_tree(workspace)
        }),
    }
}

/// Makes every folder under `top` (itself too) readable, writable and searchable by its
/// owner, never through a link (a job's link leads out of its workspace). Iterative: a
/// job may leave a tree deeper than any stack.
fn open_up(top: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut folders = vec![top.to_path_buf()];
    while let Some(dir) = folders.pop() {
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {
                if meta.permissions().mode() & 0o700 != 0o700 {
                    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
                }
            }
            _ => continue,
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                folders.push(entry.path());
            }
        }
    }
}

/// At the agent's start, every workspace under `root` is a leftover: its job was running
/// when the agent was killed (it is reported lost), and a checkout can be gigabytes that
/// nothing else would ever remove. Kept, like a failed job's, when `keep` is set
/// (`KEEP_FAILED_WORKSPACES`). Returns how many were removed.
pub fn clear_leftovers(root: &Path, keep: bool) -> usize {
    if keep {
        return 0;
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if remove(&entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Claude Code files a session under `projects/<its working directory, slugged>/<id>.jsonl`
/// and `--resume` looks only under the current directory's folder. Every job has a fresh
/// workspace, so a session from an earlier job is copied to where this job's Claude looks.
/// Called only for a session [`crate::sessions`] says is the job's caller's: it copies
/// whatever transcript of that name it finds.
pub fn carry_session(config_dir: &Path, session_id: &str, cwd: &Path) -> std::io::Result<()> {
    // The edge allows only plain ids; check again before building paths.
    if !shared::ids::plain_id(session_id, shared::ids::MAX_JOB_ID) {
        return Err(std::io::Error::other("unsafe session id"));
    }
    let projects = config_dir.join("projects");
    let file = format!("{session_id}.jsonl");
    let slug: String = cwd.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let target = projects.join(slug);
    if target.join(&file).exists() {
        return Ok(());
    }
    let source = std::fs::read_dir(&projects)?
        .flatten()
        .map(|dir| dir.path().join(&file))
        // Plain files only, never through a link: Claude writes its transcripts as files,
        // and a link there is a job's — one to `/proc/self/environ`, opened by the agent,
        // is the agent's own environment, secrets and all, which the copy would hand to
        // the job.
        .filter_map(|p| std::fs::symlink_metadata(&p).ok().filter(|m| m.is_file()).map(|m| (p, m.modified().ok())))
        .max_by_key(|(_, modified)| *modified)
        .map(|(p, _)| p);
    let Some(source) = source else { return Ok(()) };
    // Claude's config folder is the agent's user's, so a job's: what is there is opened as
    // a file outside the agent's control (never waiting on a pipe swapped in, never taking
    // a terminal, never through a link swapped in since, a plain file or an error), and
    // copied up to the bound only.
    let too_big = || std::io::Error::other(format!("the transcript of session {session_id} ({}) is over {} MiB: not carried over (start a new session)", source.display(), MAX_TRANSCRIPT_BYTES >> 20));
    let mut from = crate::files::open_plain(&source, false, "session transcript")?;
    if from.metadata()?.len() > MAX_TRANSCRIPT_BYTES {
        return Err(too_big());
    }
    std::fs::create_dir_all(&target)?;
    let to_path = target.join(file);
    // Made new: never written through a link put there.
    let mut to = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(crate::files::PRIVATE_FILE).open(&to_path)?
    };
    // Bounded again while copied: the file may grow meanwhile.
    let copied = std::io::copy(&mut std::io::Read::take(&mut from, MAX_TRANSCRIPT_BYTES + 1), &mut to);
    if !matches!(copied, Ok(n) if n <= MAX_TRANSCRIPT_BYTES) {
        drop(to);
        let _ = std::fs::remove_file(&to_path);
        return Err(copied.err().unwrap_or_else(too_big));
    }
    Ok(())
}

/// The largest session transcript carried to a new workspace: Claude's own run to some
/// megabytes (tool output included); a larger one is a job's plant.
pub const MAX_TRANSCRIPT_BYTES: u64 = 256 << 20;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn sessions_follow_the_job_to_its_new_workspace() {
        let root = std::env::temp_dir().join(format!("cr-session-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let old = root.join("projects/-data-workspaces-job1");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("abc-123.jsonl"), "{\"turn\":1}\n").unwrap();
        let cwd = Path::new("/data/workspaces/job2/sub_dir");
        carry_session(&root, "abc-123", cwd).unwrap();
        let copied = root.join("projects/-data-workspaces-job2-sub-dir/abc-123.jsonl");
        assert_eq!(std::fs::read_to_string(copied).unwrap(), "{\"turn\":1}\n");
        // Unknown sessions are left for Claude to report; hostile ids build no paths.
        assert!(carry_session(&root, "unknown", cwd).is_ok());
        assert!(carry_session(&root, "../../etc/passwd", cwd).is_err());
    }

    /// A transcript of the session's name is a job's to plant (Claude's config folder is the
    /// agent's user's): one as large as the disk (a sparse file costs nothing) was copied
    /// whole, filling the disk and holding the job's start for as long as it took. One over
    /// [`MAX_TRANSCRIPT_BYTES`] is refused with an error that says so, and nothing is copied.
    #[test]
    fn a_transcript_over_the_bound_is_refused_not_copied() {
        let root = std::env::temp_dir().join(format!("cr-session-huge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let old = root.join("projects/-data-workspaces-job1");
        std::fs::create_dir_all(&old).unwrap();
        let planted = std::fs::File::create(old.join("abc-123.jsonl")).unwrap();
        planted.set_len(MAX_TRANSCRIPT_BYTES + 1).unwrap();
        let cwd = Path::new("/data/workspaces/job2");
        let e = carry_session(&root, "abc-123", cwd).expect_err("a transcript over the bound is refused").to_string();
        assert!(e.contains("MiB") && e.contains("abc-123"), "{e}");
        assert!(!root.join("projects/-data-workspaces-job2/abc-123.jsonl").exists(), "copied all the same");
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A transcript of the session's name is a job's to plant, a link too: one to
    /// `/proc/self/environ`, opened by the agent, is the agent's own environment (a process
    /// reads its own, dumpable or not), and it was copied into the new job's project
    /// folder, where that job (and every later one) read the agent's secrets. A link is not
    /// a transcript Claude wrote: nothing is carried through one.
    #[test]
    fn a_transcript_that_is_a_link_is_not_followed() {
        let root = std::env::temp_dir().join(format!("cr-session-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let old = root.join("projects/-data-workspaces-job1");
        std::fs::create_dir_all(&old).unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", old.join("abc-123.jsonl")).unwrap();
        let cwd = Path::new("/data/workspaces/job2");
        let _ = carry_session(&root, "abc-123", cwd);
        let copied = root.join("projects/-data-workspaces-job2/abc-123.jsonl");
        let leaked = std::fs::read(&copied).unwrap_or_default();
        assert!(leaked.is_empty(), "the agent's environment was copied for the job: {} bytes", leaked.len());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn leftover_workspaces_go_unless_failed_ones_are_kept() {
        let root = std::env::temp_dir().join(format!("cr-leftovers-{}", std::process::id()));
        std::fs::create_dir_all(root.join("job-a/src")).unwrap();
        std::fs::create_dir_all(root.join("job-b")).unwrap();
        assert_eq!(clear_leftovers(&root, true), 0);
        assert!(root.join("job-a/src").exists(), "KEEP_FAILED_WORKSPACES keeps them");
        assert_eq!(clear_leftovers(&root, false), 2);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        assert_eq!(clear_leftovers(&root.join("missing"), false), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn workspaces_are_fresh_and_keep_working_dir_inside() {
        let data = std::env::temp_dir().join(format!("cr-ws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let root = super::root(&data).unwrap();
        std::fs::create_dir_all(root.join("job-1/old")).unwrap();
        let cwd = prepare(&root, "job-1", Some("a/b")).unwrap();
        assert!(cwd.ends_with("job-1/a/b"));
        assert!(!root.join("job-1/old").exists(), "a workspace starts empty");
        assert_eq!(prepare(&root, "job-2", None).unwrap(), root.join("job-2"));
        assert!(prepare(&root, "job-1", Some("../x")).is_err());
        assert!(prepare(&root, "job-1", Some("/etc")).is_err());
        assert!(prepare(&root, "../escape", None).is_err());
        remove(&root.join("job-2")).unwrap();
        remove(&root.join("job-1")).unwrap();
        remove(&root.join("job-1")).unwrap();
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "removed, empty or not");
        std::fs::remove_dir_all(&data).unwrap();
    }

    /// Runs `f` on a thread of its own without the capabilities that let root past file
    /// modes (credentials are per thread on Linux): as the agent's ordinary user would.
    pub(crate) fn as_an_ordinary_user<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            #[derive(Clone, Copy, Default)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let mut header = Header { version: 0x2008_0522, pid: 0 };
            let mut data = [Data::default(); 2];
            // SAFETY: capget/capset of this thread, into and from buffers we own.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()), 0);
                // CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2).
                data[0].effective &= !0b110;
                assert_eq!(libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()), 0);
            }
            f()
        })
        .join()
        .unwrap()
    }

    /// A job may leave folders its user cannot remove as they are — read-only ones (a Go
    /// module cache, a `chmod -w`) or closed ones (`chmod 000`), its workspace itself too.
    /// They are the agent user's own: removed anyway, at the job's end and at the next
    /// start; a workspace left there would hold its disk for ever.
    #[test]
    fn a_workspace_with_folders_closed_by_its_job_is_removed_anyway() {
        use std::os::unix::fs::PermissionsExt;
        let data = std::env::temp_dir().join(format!("cr-ws-closed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let root = super::root(&data).unwrap();
        let mode = |path: PathBuf, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        for job in ["job-5", "job-6"] {
            let ws = prepare(&root, job, None).unwrap();
            std::fs::create_dir_all(ws.join("cache/pkg/deep")).unwrap();
            std::fs::write(ws.join("cache/pkg/deep/file"), "x").unwrap();
            std::fs::write(ws.join("cache/pkg/file"), "x").unwrap();
            mode(ws.join("cache/pkg/deep"), 0o500);
            mode(ws.join("cache/pkg"), 0o000);
            mode(ws.clone(), 0o500);
        }
        let (root_in, job) = (root.clone(), root.join("job-5"));
        let (removed, left) = as_an_ordinary_user(move || (remove(&job).map_err(|e| e.to_string()), clear_leftovers(&root_in, false)));
        assert_eq!(removed, Ok(()));
        assert_eq!(left, 1, "the other removed at the next start");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir_all(&data).unwrap();
    }

    /// A chain of `depth` folders `d/d/d/…` under `top`, made through descriptors (a path
    /// that long is more than a system call takes).
    pub(crate) fn folder_chain(top: &Path, depth: usize) {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut dir = std::fs::File::open(top).map(OwnedFd::from).unwrap();
        for _ in 0..depth {
            // SAFETY: mkdirat/openat on a descriptor we own, with a NUL-terminated name.
            unsafe {
                assert_eq!(libc::mkdirat(dir.as_raw_fd(), c"d".as_ptr(), 0o700), 0);
                let fd = libc::openat(dir.as_raw_fd(), c"d".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
                assert!(fd >= 0);
                dir = OwnedFd::from_raw_fd(fd);
            }
        }
    }

    /// A job can leave a chain of folders deeper than any stack (`mkdir -p` a few thousand
    /// levels at a time, `cd`, again). std's `remove_dir_all` recurses once per level: on
    /// the blocking pool's 2 MiB stacks, where a job's workspace is removed, some 15,000
    /// levels overflowed it and the agent aborted, every job it ran lost — and so at every
    /// start, wherever the descriptor limit let the recursion go as deep. Removed on the
    /// heap, with a bounded number of folders open, whatever the depth.
    #[test]
    fn a_workspace_deeper_than_any_stack_is_removed() {
        let data = std::env::temp_dir().join(format!("cr-ws-deep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let root = super::root(&data).unwrap();
        let ws = prepare(&root, "job-7", None).unwrap();
        std::fs::write(ws.join("file"), "x").unwrap();
        folder_chain(&ws, 30_000);
        let removed = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || remove(&ws).map_err(|e| e.to_string()))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(removed, Ok(()));
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir_all(&data).unwrap();
    }

    /// A job can close folders of its workspace (`chmod 000`, `chmod -w`), and the agent
    /// opened them up by path before removing it again: a folder deeper than a path may
    /// name (some 2,000 levels) was never reached, so a chain with two closed folders far
    /// down stayed on the disk, one closed folder less at each attempt (the end of a job,
    /// the agent's next start), as large as the job made it. Folders are opened up as the
    /// removal reaches them, by descriptor.
    #[test]
    fn a_workspace_with_closed_folders_deeper_than_a_path_is_removed() {
        let modes = |depth| match depth {
            1_000 => Some(0o000),
            3_500 => Some(0o500),
            6_000 => Some(0o100),
            _ => None,
        };
        removed_as_an_ordinary_user_with_closed_folders("deep", 8_000, true, modes);
    }

    /// A folder deeper than [`crate::files::remove_tree`] holds open is moved up under the
    /// workspace (`renameat`), and moving a folder to another parent rewrites its `..`:
    /// the folder itself must be writable by its owner. One closed by the job (`chmod -w`,
    /// `chmod 000`) where it is moved was never opened up by descriptor (only its parent
    /// was), so the removal failed there, and the second try, by path, reached it only
    /// once the folders before it had gone: a chain with such folders some 2,000 levels
    /// apart stayed on the disk, one of them less at each try (a job's end, each agent
    /// start). A run of 64 closed folders holds one such place whatever the depth.
    #[test]
    fn a_workspace_with_closed_folders_where_they_are_moved_up_is_removed() {
        let modes = |depth| match depth {
            2_500..2_564 => Some(0o500),
            4_800..4_864 => Some(0o000),
            _ => None,
        };
        removed_as_an_ordinary_user_with_closed_folders("moved", 5_000, false, modes);
    }

    /// Folders deeper than [`crate::files::remove_tree`] holds open are moved up under the
    /// workspace as `.deep-1`, `.deep-2`, …, a name taken tried past at most 64 times: a job
    /// that left 64 such folders of its own, each holding a chain deeper than that, made
    /// every name it tried taken (whichever of them is reached first), so the removal failed
    /// at each try and the workspace stayed on the disk for good.
    #[test]
    fn a_workspace_holding_the_names_folders_are_moved_up_to_is_removed() {
        let data = std::env::temp_dir().join(format!("cr-ws-decoys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let root = super::root(&data).unwrap();
        let ws = prepare(&root, "job-decoys", None).unwrap();
        for n in 1..=64 {
            let mut chain = ws.join(format!(".deep-{n}"));
            for _ in 0..70 {
                chain.push("d");
            }
            std::fs::create_dir_all(&chain).unwrap();
        }
        assert_eq!(remove(&ws).map_err(|e| e.to_string()), Ok(()));
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir_all(&data).unwrap();
    }

    /// Makes a workspace holding a chain of `depth` folders (each with a file when `files`),
    /// closes those `mode_at` gives a mode (after the whole chain is made), and checks that
    /// [`remove`], run without the capabilities that pass over file modes, takes it all.
    fn removed_as_an_ordinary_user_with_closed_folders(name: &str, depth: u32, files: bool, mode_at: impl Fn(u32) -> Option<libc::mode_t>) {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let data = std::env::temp_dir().join(format!("cr-ws-closed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let root = super::root(&data).unwrap();
        let ws = prepare(&root, &format!("job-{name}"), None).unwrap();
        let mut dir = std::fs::File::open(&ws).map(OwnedFd::from).unwrap();
        let mut closed = Vec::new();
        for at in 1..=depth {
            // SAFETY: mkdirat/openat on a descriptor we own, with NUL-terminated names.
            unsafe {
                assert_eq!(libc::mkdirat(dir.as_raw_fd(), c"d".as_ptr(), 0o700), 0);
                if files {
                    assert_eq!(libc::close(libc::openat(dir.as_raw_fd(), c"f".as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o600)), 0);
                }
                let fd = libc::openat(dir.as_raw_fd(), c"d".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
                assert!(fd >= 0);
                dir = OwnedFd::from_raw_fd(fd);
            }
            if let Some(mode) = mode_at(at) {
                closed.push((dir.try_clone().unwrap(), mode));
            }
        }
        for (fd, mode) in closed {
            // SAFETY: fchmod on a descriptor we own.
            assert_eq!(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }, 0);
        }
        drop(dir);
        let removing = ws.clone();
        assert_eq!(as_an_ordinary_user(move || remove(&removing).map_err(|e| e.to_string())), Ok(()));
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir_all(&data).unwrap();
    }

    /// A link left where a workspace goes (by a job of the same user) is taken away, not
    /// followed: the workspace is a fresh folder in its place, and what the link pointed to
    /// is untouched.
    #[test]
    fn a_link_where_a_workspace_goes_is_replaced_not_followed() {
        let data = std::env::temp_dir().join(format!("cr-ws-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let root = super::root(&data).unwrap();
        let elsewhere = data.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("job-3")).unwrap();
        let cwd = prepare(&root, "job-3", None).unwrap();
        assert!(!std::fs::symlink_metadata(&cwd).unwrap().file_type().is_symlink());
        assert!(elsewhere.join("keep").exists());
        std::fs::remove_dir_all(&data).unwrap();
    }

    /// With `DATA_DIR` behind a symlink the workspace is named by its real path (Claude
    /// files sessions under its real working directory), and the folder of workspaces,
    /// removed under a running agent, is made again.
    #[test]
    fn workspaces_are_named_by_their_real_path() {
        let base = std::env::temp_dir().join(format!("cr-ws-real-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let root = super::root(&base.join("link")).unwrap();
        assert_eq!(root, base.join("real/workspaces").canonicalize().unwrap());
        std::fs::remove_dir(&root).unwrap();
        let cwd = prepare(&root, "job-4", None).unwrap();
        assert_eq!(cwd, cwd.canonicalize().unwrap());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
