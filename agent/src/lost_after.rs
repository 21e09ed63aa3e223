//! The edge's `LOST_AFTER_MS`, kept in `DATA_DIR` across the agent's restarts: the
//! reconnect delay is capped by it while the agent holds work (`reconnect`), and an agent
//! started holding results while the edge is unreachable has no welcome yet to learn it
//! from. Written (atomically, durably: a host reboot is the case it is for) when a welcome
//! changes it, removed when an edge of before the field welcomes the agent, read at start.
//!
//! A job of the agent's user can write this file: anything but a whole number within the
//! edges' own range reads as unknown, never as an error, and what a planted value can do
//! is bounded where it is used (`reconnect`).

use crate::files::{read_plain, write_atomically};
use std::path::{Path, PathBuf};

/// The file's name in `DATA_DIR`.
const FILE: &str = "edge-lost-after-ms";
/// The most an edge accepts for `LOST_AFTER_MS` (a week).
const MOST: u64 = 7 * 24 * 60 * 60 * 1000;
/// More than any value written here takes.
const MAX_BYTES: usize = 64;

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The value in the file's `bytes`: a whole number of milliseconds, 1 to a week, with
/// surrounding whitespace; anything else is unknown.
pub fn parse(bytes: &[u8]) -> Option<u64> {
    let ms: u64 = std::str::from_utf8(bytes).ok()?.trim().parse().ok()?;
    (1..=MOST).contains(&ms).then_some(ms)
}

/// The value kept in `data_dir`; `None` when there is none, or none that reads (said in
/// the log: the agent then learns it from the edge's next welcome, as before).
pub fn read(data_dir: &Path, agent_id: &str) -> Option<u64> {
    let bytes = match read_plain(&path(data_dir), MAX_BYTES, "remembered LOST_AFTER_MS") {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(agent_id, error = %e, "cannot read the edge's LOST_AFTER_MS kept from its last welcome; the reconnect delay is capped from the next welcome");
            return None;
        }
    };
    let ms = parse(&bytes);
    if ms.is_none() {
        tracing::warn!(agent_id, file = %path(data_dir).display(), "the edge's LOST_AFTER_MS kept from its last welcome is not a whole number of milliseconds from 1 to a week; ignored until the next welcome rewrites it");
    }
    ms
}

/// Keeps `lost_after_ms`, what the last welcome said, in `data_dir` (`None`: the edge did
/// not say, and no value is kept).
pub fn keep(data_dir: &Path, lost_after_ms: Option<u64>) -> std::io::Result<()> {
    match lost_after_ms {
        Some(ms) => write_atomically(&path(data_dir), ms.to_string().as_bytes(), true),
        None => match std::fs::remove_file(path(data_dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_number_of_milliseconds_within_the_edges_range_reads() {
        assert_eq!(parse(b"10000"), Some(10_000));
        assert_eq!(parse(b" 10000\n"), Some(10_000));
        assert_eq!(parse(b"1"), Some(1));
        assert_eq!(parse(MOST.to_string().as_bytes()), Some(MOST));
        for bad in [&b""[..], b"0", b"-5", b"1e4", b"ten", b"\xff\xfe", b"604800001", b"99999999999999999999999"] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_kept_value_reads_back_and_an_edge_that_does_not_say_removes_it() {
        let dir = std::env::temp_dir().join(format!("cr-lost-after-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir, "a"), None, "nothing kept yet");
        keep(&dir, Some(8_000)).unwrap();
        assert_eq!(read(&dir, "a"), Some(8_000));
        keep(&dir, None).unwrap();
        assert_eq!(read(&dir, "a"), None);
        keep(&dir, None).unwrap();
        // Planted: a folder, or garbage, reads as unknown, never a panic.
        std::fs::write(path(&dir), b"soon").unwrap();
        assert_eq!(read(&dir, "a"), None);
        std::fs::remove_file(path(&dir)).unwrap();
        std::fs::create_dir(path(&dir)).unwrap();
        assert_eq!(read(&dir, "a"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A job of the agent's user plants a link or a pipe at the name: a link is not read
    /// through, and the write replaces the link, never the file it names; a pipe is not
    /// waited on (the agent's start would hang for ever).
    #[test]
    fn a_planted_link_or_pipe_is_neither_followed_nor_waited_on() {
        let dir = std::env::temp_dir().join(format!("cr-lost-after-planted-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let other = dir.join("other");
        std::fs::write(&other, b"9000").unwrap();
        std::os::unix::fs::symlink(&other, path(&dir)).unwrap();
        assert_eq!(read(&dir, "a"), None, "read through a link");
        keep(&dir, Some(8_000)).unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"9000", "the write followed the link");
        assert_eq!(read(&dir, "a"), Some(8_000));
        std::fs::remove_file(path(&dir)).unwrap();
        let fifo = std::ffi::CString::new(path(&dir).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path it is given.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(read(&dir, "a"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
