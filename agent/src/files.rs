//! Files the agent keeps (results, status, replay memory, `up`'s keys): written so a
//! crash leaves the old or the new content, never half, and readable by the owner only.

use std::path::Path;

/// Writes a file so that a crash leaves either the old or the new content, never half,
/// and (with `durable`) so that it survives a power cut too, at the cost of an fsync.
/// Readable by the owner only: these files hold keys, results and job ids.
pub fn write_atomically(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails part way (a full disk, here a rename that cannot happen) leaves
    /// nothing behind: a half-written temporary file on a full disk would hold the very
    /// space the agent lacks, and nothing else ever removes it.
    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("cr-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("result.json/in-the-way")).unwrap();
        assert!(write_atomically(&dir.join("result.json"), b"{}", true).is_err());
        assert!(!dir.join("result.tmp").exists(), "the temporary file was left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
