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
pub fn write_atomically(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Made new, never opened as found: a job (the agent's user) may have put a pipe
        // there — an open for writing waits for a reader for ever — or a link. A leftover
        // of a crash goes the same way.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(PRIVATE_FILE).open(&tmp)?;
        // `mode` is masked by the umask.
        f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // Half a file on a full disk holds the space that was lacking.
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
pub fn open_plain_with(path: &Path, mut options: std::fs::OpenOptions, what: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let not_plain = || std::io::Error::other(format!("{} is not a {what} (not a plain file): move it out of the way", path.display()));
    let file = options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| if e.raw_os_error() == Some(libc::ENXIO) { not_plain() } else { named(e) })?;
    if !file.metadata().map_err(named)?.is_file() {
        return Err(not_plain());
    }
    Ok(file)
}

/// Reads a small file the agent keeps, opened as [`open_plain`] opens it (never through a
/// link, never waiting on a pipe): at most `max` bytes, or an error naming it when it holds
/// more (a job can make any file of the agent's user as large as the disk).
pub fn read_plain(path: &Path, max: usize, what: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_plain(path, false, what)?.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Err(std::io::Error::other(format!("{} is over {max} bytes: it is not a {what}", path.display())));
    }
    Ok(bytes)
}

/// Creates `dir` (and missing parents) owner-only, and makes an existing one owner-only
/// (an older version, or another umask, may have left it open).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(dir)?;
    restrict(dir, PRIVATE_DIR)
}

/// Takes group and other permissions off `path` if it has any. Returns whether it had.
pub fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    let current = std::fs::metadata(path)?.permissions().mode();
    if current & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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

    /// A write that fails part way (a full disk, here a rename that cannot happen) leaves
    /// nothing behind: a half-written temporary file on a full disk would hold the very
    /// space the agent lacks, and nothing else ever removes it.
    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("cr-files-failed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("result.json/in-the-way")).unwrap();
        assert!(write_atomically(&dir.join("result.json"), b"{}", true).is_err());
        assert!(!dir.join("result.tmp").exists(), "the temporary file was left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
