//! The agent's instance id, kept in `DATA_DIR` (`shared::protocol::Hello::instance`):
//! made once for the folder, read at every start, sent in every hello. The edge lets the
//! same instance in at once (that agent restarted, or its older connection half-open: the
//! `DATA_DIR` lock allows one agent process at a time) and refuses another one proving the
//! same AGENT_ID while that one may still run jobs of it.
//!
//! Written durably (a host reboot must not make the agent a stranger to the edge, which
//! would keep it out until its own jobs' orphan deadlines passed). A job of the agent's
//! user can write the file: anything but a valid id reads as none, and a new one is made
//! and kept — the edge then only takes this agent for another instance, which is safe.

use crate::files::{read_plain, write_durably};
use std::path::{Path, PathBuf};

/// The file's name in `DATA_DIR`.
const FILE: &str = "instance-id";
/// More than any id written here takes.
const MAX_BYTES: usize = 128;

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The id kept in `data_dir`, or a new one, kept there, when there is none that reads (a
/// first start, or the file lost or changed: said in the log). One that cannot be kept is
/// used for this start and said in the log: the next start makes another.
pub fn open(data_dir: &Path, agent_id: &str) -> String {
    match read_plain(&path(data_dir), MAX_BYTES, "agent instance id") {
        Ok(bytes) => match std::str::from_utf8(&bytes).map(str::trim) {
            Ok(id) if shared::ids::valid_instance_id(id) => return id.to_string(),
            _ => tracing::warn!(agent_id, file = %path(data_dir).display(), "the agent's instance id kept in DATA_DIR is not 1-64 letters or digits; a new one replaces it (the edge takes this agent for another one until the jobs it had there end)"),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(agent_id, error = %e, "cannot read the agent's instance id kept in DATA_DIR; a new one replaces it (the edge takes this agent for another one until the jobs it had there end)"),
    }
    let id = shared::ids::instance_id(runtime::entropy());
    if let Err(e) = write_durably(&path(data_dir), id.as_bytes(), 0) {
        tracing::warn!(agent_id, error = %e, file = %path(data_dir).display(), "cannot keep the agent's instance id in DATA_DIR: after a restart the edge takes this agent for another one until the jobs it had there end; make DATA_DIR writable");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made once, then the same at every start (the edge lets a restart in at once); what
    /// does not read as an id is replaced, never an error.
    #[test]
    fn the_id_is_made_once_kept_and_replaced_only_when_unreadable() {
        let dir = std::env::temp_dir().join(format!("cr-instance-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = open(&dir, "a");
        assert!(shared::ids::valid_instance_id(&first) && first.len() == 2 * shared::ids::INSTANCE_ID_BYTES, "{first}");
        assert_eq!(open(&dir, "a"), first, "kept across starts");
        assert_eq!(std::fs::read_to_string(path(&dir)).unwrap(), first);
        for planted in [&b"not-an-id"[..], b"", b"\xff\xfe", &[b'a'; 200]] {
            std::fs::write(path(&dir), planted).unwrap();
            let made = open(&dir, "a");
            assert!(shared::ids::valid_instance_id(&made) && made != first, "{made}");
            assert_eq!(open(&dir, "a"), made, "the new one is kept");
        }
        // A link planted at the name (to another agent's id, say) is not followed, and a
        // pipe is not waited on: each is replaced by a new id of its own, the link's target
        // untouched.
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, &first).unwrap();
        std::fs::remove_file(path(&dir)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, path(&dir)).unwrap();
        let made = open(&dir, "a");
        assert!(shared::ids::valid_instance_id(&made) && made != first, "{made}");
        assert!(std::fs::symlink_metadata(path(&dir)).unwrap().is_file() && std::fs::read_to_string(&elsewhere).unwrap() == first);
        std::fs::remove_file(path(&dir)).unwrap();
        let fifo = std::ffi::CString::new(path(&dir).into_os_string().into_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let made = open(&dir, "a");
        assert!(shared::ids::valid_instance_id(&made) && std::fs::symlink_metadata(path(&dir)).unwrap().is_file(), "{made}");
        assert_eq!(open(&dir, "a"), made);
        // A folder planted at the name: a new id for this start, no panic.
        std::fs::remove_file(path(&dir)).unwrap();
        std::fs::create_dir(path(&dir)).unwrap();
        assert!(shared::ids::valid_instance_id(&open(&dir, "a")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
