//! Files the agent keeps (results, status, replay memory, `up`'s keys): written so a
//! crash leaves the old or the new content, never half, and readable by the owner only.

use std::path::Path;

/// Writes a file so that a crash leaves either the old or the new content, never half,
/// and (with `durable`) so that it survives a power cut too, at the cost of an fsync.
/// Readable by the owner only: these files hold keys, results and job ids.
pub fn write_atomically(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)
}
