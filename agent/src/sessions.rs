//! Whose each Claude session is. A job's `session_id` resumes an earlier Claude session
//! (README, `session_id`): its transcript is on this agent's disk, under Claude's
//! `projects/` folder, and the resumed job reads it and acts on it. So a session is
//! resumed only for the caller whose job made it, in the same pool: when a job ends with a
//! session id, the agent records the job's caller — named by the edge inside the signed
//! order ([`shared::protocol::JobOrder::caller`]) — and its pool for that session, in
//! `DATA_DIR/sessions/<session id>`; a job asking to resume a session runs only if that
//! record names its own caller and pool. Anything else — another caller's session, one the
//! operator ran by hand with the same Claude config dir, one made before the agent kept
//! records, a record changed on the disk — fails the job before its workspace is made and
//! before Claude runs (no Claude spend on a job that cannot do what it asked), with the
//! same words whether or not the session exists ([`unknown_to`]): a caller learns nothing
//! of other callers' sessions.
//!
//! Why the binding lives here and not in the edge: the transcript is here and only here (a
//! session can be resumed on the agent that ran it, nowhere else), the edge forgets a job
//! at the end of its retention while Claude keeps transcripts for 30 days, and the edge
//! would need a table for it in both of its hosts. The edge only names the caller in the
//! order it signs anyway.
//!
//! Forgery: a job that runs commands runs as the agent's user and can write `DATA_DIR`.
//! So each record is sealed as the spool seals kept results ([`crate::spool::Seal`]): an
//! HMAC-SHA256 ([`Domain::KeptSession`]) under a key derived from the agent's signing key,
//! which such a job cannot read when the key comes from a file only root reads (README,
//! "What a job can see"). A record names its session, so one copied under another
//! session's name is not trusted either. A job can delete records (their sessions then
//! cannot be resumed); it cannot add one, or change whose one is. And a session recorded
//! for one caller stays theirs: a later job of another caller that ends naming the same
//! session (its output is the job's to shape) does not take it over.
//!
//! Bounds: a record is trusted for [`MAX_AGE_MS`] (30 days) after the last job that used
//! its session ended — Claude Code deletes transcripts older than that by default
//! (`cleanupPeriodDays`), so an older record would guard nothing — and removed once older;
//! and at most [`MAX_RECORDS`] are kept, the least recently used going first, so a flood
//! of jobs cannot fill the disk with them. One small file per session, written without a
//! sync (a record lost in a power cut costs its owner a resume, never another caller a
//! refusal) in the trip off the runtime thread that writes the job's result. Until it is
//! written it is held in memory, so a resume that arrives first is not refused.

use crate::files::{open_plain, write_atomically};
use shared::envelope::{Domain, Tagged};
use shared::ids::{plain_id, MAX_JOB_ID};
use shared::link::MacKey;
use shared::Millis;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How long after the last job that used it a session's record is trusted and kept: Claude
/// Code's own default for keeping transcripts (`cleanupPeriodDays`, 30).
pub const MAX_AGE_MS: Millis = 30 * 24 * 3_600_000;
/// Most records kept (a few hundred bytes each). Past it the least recently used go, down
/// to nine tenths of it, so that the folder is not listed at every job's end.
pub const MAX_RECORDS: usize = 100_000;
/// How often records past their age are looked for, at most (and at the agent's start).
const SWEEP_EVERY_MS: Millis = 3_600_000;
/// A record is a few hundred bytes: anything larger is not one, and is not read whole.
const MAX_RECORD_BYTES: u64 = 4096;

/// Whose a job is, for its sessions: its caller (from the signed order) and the pool the
/// agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub caller: String,
    pub pool: String,
}

/// What a record holds, sealed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Record {
    session_id: String,
    caller: String,
    pool: String,
    /// The last job that used the session (for the operator reading the folder).
    job_id: String,
    /// When that job ended (the agent's wall clock, ms).
    used_at: Millis,
}

/// Why a session is not resumed for a caller: logged for the operator. The caller is told
/// only [`unknown_to`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the session id is not a plain id")]
    NotPlain,
    #[error("no record of the session: not made by a job of this agent (by hand, or before the agent recorded sessions), or its record was removed")]
    NoRecord,
    #[error("its record cannot be read: {0}")]
    Unreadable(String),
    #[error("its record is not sealed by this agent (made or changed on the disk, or sealed under another signing key)")]
    Forged,
    #[error("its record is another session's")]
    OtherSession,
    #[error("the session is caller `{0}`'s")]
    OtherCaller(String),
    #[error("the session was made in pool `{0}`")]
    OtherPool(String),
    #[error("its record is older than 30 days")]
    Expired,
}

/// What the caller is told when its job asks to resume a session that is not its own.
pub fn unknown_to(session_id: &str, caller: &str) -> String {
    let shown = if plain_id(session_id, MAX_JOB_ID) { session_id } else { "-" };
    format!(
        "session `{shown}` is unknown to caller `{caller}` in this pool, so it was not resumed and nothing ran: \
         resume only a session_id your own jobs returned (sessions made before the runner recorded them cannot be \
         resumed), or leave session_id out to start a new conversation"
    )
}

/// The key that seals session records, from the agent's signing key.
pub fn key(agent_key: &ed25519_dalek::SigningKey) -> MacKey {
    crate::spool::kept_key(agent_key, b"claude-runner/v10/session-seal-key")
}

/// The records of one agent's sessions.
pub struct Sessions {
    dir: PathBuf,
    key: MacKey,
    /// Sessions whose jobs ended and whose records are not written yet.
    pending: Mutex<HashMap<String, Owner>>,
    /// Held while a record is written: two jobs ending in the same session write one
    /// after the other (their temporary file is the same).
    upkeep: Mutex<Upkeep>,
    /// [`MAX_RECORDS`] (smaller in tests).
    cap: usize,
}

struct Upkeep {
    /// Records in the folder (as of the last sweep, and those written since).
    count: usize,
    swept_at: Millis,
}

impl Sessions {
    /// The records in `dir` (made owner-only if need be), sealed with `key`
    /// ([`crate::spool::kept_key`]); those past their age, or over the cap, are removed now.
    pub fn open(dir: PathBuf, key: MacKey, now: Millis) -> std::io::Result<Sessions> {
        crate::files::private_dir(&dir)?;
        let sessions = Sessions { dir, key, pending: Mutex::default(), upkeep: Mutex::new(Upkeep { count: 0, swept_at: now }), cap: MAX_RECORDS };
        let count = sessions.sweep();
        sessions.upkeep.lock().expect("upkeep lock").count = count;
        Ok(sessions)
    }

    /// Whether `owner`'s job may resume `session_id`. Blocking (reads a file).
    pub fn check(&self, session_id: &str, owner: &Owner, now: Millis) -> Result<(), Refused> {
        if !plain_id(session_id, MAX_JOB_ID) {
            return Err(Refused::NotPlain);
        }
        // A live record on the disk decides: it is the session's first owner's (see
        // `record`). Without one, a job that ended and whose record is not written yet.
        let (caller, pool) = match self.read(session_id, now) {
            Ok(record) => (record.caller, record.pool),
            Err(e @ Refused::Unreadable(_)) => return Err(e),
            Err(why) => match self.pending.lock().expect("pending lock").get(session_id) {
                Some(o) => (o.caller.clone(), o.pool.clone()),
                None => return Err(why),
            },
        };
        if pool != owner.pool {
            return Err(Refused::OtherPool(pool));
        }
        if caller != owner.caller {
            return Err(Refused::OtherCaller(caller));
        }
        Ok(())
    }

    /// A job of `owner` ended in `session_id`: held in memory at once (its result may reach
    /// the caller, and the caller's next job this agent, before the record is on the disk),
    /// written by [`Sessions::record`].
    pub fn ended(&self, session_id: &str, owner: &Owner) {
        if plain_id(session_id, MAX_JOB_ID) {
            self.pending.lock().expect("pending lock").entry(session_id.to_string()).or_insert_with(|| owner.clone());
        }
    }

    /// Writes the record of `session_id` for `owner`, whose job `job_id` used it last, at
    /// `now` — unless a live record of another owner is there: the session stays theirs
    /// (returned). Blocking.
    pub fn record(&self, session_id: &str, owner: &Owner, job_id: &str, now: Millis) -> std::io::Result<Option<Owner>> {
        if !plain_id(session_id, MAX_JOB_ID) {
            return Err(std::io::Error::other("the session id is not a plain id; not recorded"));
        }
        let mut upkeep = self.upkeep.lock().expect("upkeep lock");
        // Another owner's job that ended in it first, not yet written, holds it too.
        let first = self.pending.lock().expect("pending lock").get(session_id).filter(|o| *o != owner).cloned();
        if first.is_some() {
            return Ok(first);
        }
        let record = Record {
            session_id: session_id.to_string(),
            caller: owner.caller.clone(),
            pool: owner.pool.clone(),
            job_id: job_id.to_string(),
            used_at: now,
        };
        let sealed = serde_json::to_vec(&Tagged::seal(Domain::KeptSession, &record, &self.key)).expect("records serialise");
        let path = self.path(session_id);
        let written = match new_file(&path) {
            // Nearly every job: a new session, one file made and written (a torn one reads
            // as no record; the owner's next job in the session writes it again).
            Ok(mut file) => {
                upkeep.count += 1;
                file.write_all(&sealed).map(|()| None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match self.read(session_id, now) {
                Ok(r) if r.caller != owner.caller || r.pool != owner.pool => Ok(Some(Owner { caller: r.caller, pool: r.pool })),
                // A resumed session (its time renewed), or a record not to be trusted.
                _ => write_atomically(&path, &sealed, false).map(|()| None),
            },
            Err(e) => Err(e),
        };
        // Written or not (a full disk), memory does not keep it: the session is then no
        // one's until a job of its owner ends in it again.
        self.pending.lock().expect("pending lock").remove(session_id);
        if upkeep.count > self.cap || now.saturating_sub(upkeep.swept_at) >= SWEEP_EVERY_MS {
            upkeep.count = self.sweep();
            upkeep.swept_at = now;
        }
        written
    }

    /// The record's path: only ever for a plain id (checked by every caller).
    fn path(&self, session_id: &str) -> PathBuf {
        debug_assert!(plain_id(session_id, MAX_JOB_ID));
        self.dir.join(session_id)
    }

    /// The live record of `session_id`, if this agent sealed it for that session.
    fn read(&self, session_id: &str, now: Millis) -> Result<Record, Refused> {
        let file = match open_plain(&self.path(session_id), false, "session record") {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Refused::NoRecord),
            Err(e) => return Err(Refused::Unreadable(e.to_string())),
        };
        let mut bytes = Vec::new();
        file.take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Refused::Unreadable(e.to_string()))?;
        if bytes.len() as u64 > MAX_RECORD_BYTES {
            return Err(Refused::Forged);
        }
        let sealed: Tagged = serde_json::from_slice(&bytes).map_err(|_| Refused::Forged)?;
        let record: Record = sealed.open(Domain::KeptSession, &self.key).map_err(|_| Refused::Forged)?;
        if record.session_id != session_id {
            return Err(Refused::OtherSession);
        }
        if record.used_at.saturating_add(MAX_AGE_MS) < now {
            return Err(Refused::Expired);
        }
        Ok(record)
    }

    /// Removes what is in the folder past [`MAX_AGE_MS`] (by its modification time: when
    /// it was written, on the system's clock, which set it), then the least recently
    /// written past [`MAX_RECORDS`], down to nine tenths of it. Returns how many are left.
    /// A job could change a record's time (it could as well delete it): that only takes a
    /// resume from its owner.
    fn sweep(&self) -> usize {
        let oldest = SystemTime::now() - Duration::from_millis(MAX_AGE_MS);
        let mut kept: Vec<(SystemTime, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            // The entry itself, never what a link leads to.
            let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else { continue };
            if modified < oldest {
                remove(&path);
            } else {
                kept.push((modified, path));
            }
        }
        if kept.len() > self.cap {
            kept.sort_unstable_by_key(|(modified, _)| *modified);
            let excess = kept.len() - self.cap * 9 / 10;
            for (_, path) in kept.drain(..excess) {
                remove(&path);
            }
        }
        kept.len()
    }
}

/// Makes a new owner-only file at `path` (`AlreadyExists` if anything is there, a link too).
fn new_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(crate::files::PRIVATE_FILE).open(path)
}

/// Removes a file from the folder (a folder a job put there too).
fn remove(path: &Path) {
    if std::fs::remove_file(path).is_err() {
        let _ = std::fs::remove_dir_all(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_800_000_000_000;

    struct Folder(PathBuf);
    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn folder(name: &str) -> Folder {
        let dir = std::env::temp_dir().join(format!("cr-sessions-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Folder(dir)
    }

    fn key(n: u8) -> MacKey {
        super::key(&ed25519_dalek::SigningKey::from_bytes(&[n; 32]))
    }

    fn owner(caller: &str) -> Owner {
        Owner { caller: caller.into(), pool: "default".into() }
    }

    fn opened(dir: &Folder) -> Sessions {
        Sessions::open(dir.0.clone(), key(1), NOW).unwrap()
    }

    #[test]
    fn a_session_is_resumed_only_by_the_caller_whose_job_made_it_in_its_pool() {
        let dir = folder("owner");
        let sessions = opened(&dir);
        assert_eq!(sessions.record("s-1", &owner("a"), "job-1", NOW).unwrap(), None);
        assert_eq!(sessions.check("s-1", &owner("a"), NOW + 1), Ok(()));
        assert_eq!(sessions.check("s-1", &owner("b"), NOW + 1), Err(Refused::OtherCaller("a".into())));
        let gpu = Owner { caller: "a".into(), pool: "gpu".into() };
        assert_eq!(sessions.check("s-1", &gpu, NOW + 1), Err(Refused::OtherPool("default".into())));
        // Kept across a restart of the agent (the same key).
        let again = opened(&dir);
        assert_eq!(again.check("s-1", &owner("a"), NOW + 2), Ok(()));
        // Sessions nobody recorded: no record.
        assert_eq!(again.check("s-2", &owner("a"), NOW), Err(Refused::NoRecord));
        // Expired 30 days after its last use; used again, it lives on.
        assert_eq!(again.check("s-1", &owner("a"), NOW + MAX_AGE_MS + 1), Err(Refused::Expired));
        again.record("s-1", &owner("a"), "job-2", NOW + MAX_AGE_MS).unwrap();
        assert_eq!(again.check("s-1", &owner("a"), NOW + MAX_AGE_MS + 1), Ok(()));
    }

    /// A later job of another caller ending in the same session (its output said so) does
    /// not take the session over; an expired or untrusted record does not hold it.
    #[test]
    fn a_session_stays_its_first_owners() {
        let dir = folder("first");
        let sessions = opened(&dir);
        sessions.record("s-1", &owner("a"), "job-1", NOW).unwrap();
        assert_eq!(sessions.record("s-1", &owner("b"), "job-2", NOW + 1).unwrap(), Some(owner("a")));
        assert_eq!(sessions.check("s-1", &owner("b"), NOW + 2), Err(Refused::OtherCaller("a".into())));
        assert_eq!(sessions.record("s-1", &owner("b"), "job-3", NOW + MAX_AGE_MS + 1).unwrap(), None, "a's expired");
        assert_eq!(sessions.check("s-1", &owner("b"), NOW + MAX_AGE_MS + 2), Ok(()));
    }

    /// Between a job's end and its record on the disk, the session is its caller's already:
    /// the caller's next job may come first. Still not another caller's.
    #[test]
    fn a_session_is_its_callers_before_its_record_is_written() {
        let dir = folder("pending");
        let sessions = opened(&dir);
        sessions.ended("s-1", &owner("a"));
        assert_eq!(sessions.check("s-1", &owner("a"), NOW), Ok(()));
        assert_eq!(sessions.check("s-1", &owner("b"), NOW), Err(Refused::OtherCaller("a".into())));
        sessions.ended("s-1", &owner("b"));
        assert_eq!(sessions.check("s-1", &owner("b"), NOW), Err(Refused::OtherCaller("a".into())), "the first one holds");
        // b's record written before a's: still a's.
        assert_eq!(sessions.record("s-1", &owner("b"), "job-2", NOW).unwrap(), Some(owner("a")));
        sessions.record("s-1", &owner("a"), "job-1", NOW).unwrap();
        assert_eq!(sessions.check("s-1", &owner("b"), NOW), Err(Refused::OtherCaller("a".into())));
        assert!(sessions.pending.lock().unwrap().is_empty());
        // A record on the disk decides over what memory holds.
        sessions.record("s-2", &owner("a"), "job-2", NOW).unwrap();
        sessions.ended("s-2", &owner("b"));
        assert_eq!(sessions.check("s-2", &owner("b"), NOW), Err(Refused::OtherCaller("a".into())));
    }

    /// A job can write `DATA_DIR`: a record it makes, changes or moves is not trusted, nor
    /// one sealed under another agent key; nor is anything that is not a plain file.
    #[test]
    fn a_forged_changed_or_moved_record_is_not_trusted() {
        let dir = folder("forged");
        let sessions = opened(&dir);
        let path = |id: &str| dir.0.join(id);
        sessions.record("s-a", &owner("a"), "job-1", NOW).unwrap();
        let sealed = std::fs::read_to_string(path("s-a")).unwrap();
        // Made by hand, in the record's shape, with no MAC or a made-up one.
        let forged = |mac: &str| {
            let payload = serde_json::json!({"session_id":"s-b","caller":"b","pool":"default","job_id":"j","used_at":NOW}).to_string();
            serde_json::json!({"payload": payload, "mac": mac}).to_string()
        };
        for text in [forged(""), forged(&shared::keys::encode(&[0; 32])), "{".into(), String::new()] {
            std::fs::write(path("s-b"), text).unwrap();
            assert_eq!(sessions.check("s-b", &owner("b"), NOW), Err(Refused::Forged));
        }
        // a's record with its caller changed to b, its MAC kept.
        let changed = sealed.replace(r#"\"caller\":\"a\""#, r#"\"caller\":\"b\""#);
        assert_ne!(changed, sealed);
        std::fs::write(path("s-a"), &changed).unwrap();
        assert_eq!(sessions.check("s-a", &owner("b"), NOW), Err(Refused::Forged));
        // a's record copied under another session's name.
        std::fs::write(path("s-a"), &sealed).unwrap();
        std::fs::write(path("s-c"), &sealed).unwrap();
        assert_eq!(sessions.check("s-c", &owner("a"), NOW), Err(Refused::OtherSession));
        // Sealed by another agent's key (or this one's before its key changed).
        let other = Sessions::open(dir.0.join("other"), key(2), NOW).unwrap();
        other.record("s-d", &owner("b"), "job-9", NOW).unwrap();
        std::fs::copy(dir.0.join("other/s-d"), path("s-d")).unwrap();
        assert_eq!(sessions.check("s-d", &owner("b"), NOW), Err(Refused::Forged));
        // A huge file is not read whole.
        std::fs::write(path("s-e"), vec![b' '; 1 << 20]).unwrap();
        assert_eq!(sessions.check("s-e", &owner("b"), NOW), Err(Refused::Forged));
        // A link to a's good record, a folder, a pipe: not records (and nothing waits).
        std::os::unix::fs::symlink(path("s-a"), path("s-f")).unwrap();
        std::fs::create_dir(path("s-g")).unwrap();
        assert_eq!(unsafe { libc::mkfifo(std::ffi::CString::new(path("s-h").as_os_str().as_encoded_bytes()).unwrap().as_ptr(), 0o600) }, 0);
        for id in ["s-f", "s-g", "s-h"] {
            assert!(matches!(sessions.check(id, &owner("a"), NOW), Err(Refused::Unreadable(_))), "{id}");
        }
        // And a's own record still works.
        assert_eq!(sessions.check("s-a", &owner("a"), NOW), Ok(()));
        // A forged record does not keep the session from its real owner's next record.
        assert_eq!(sessions.record("s-b", &owner("c"), "job-3", NOW).unwrap(), None);
        assert_eq!(sessions.check("s-b", &owner("c"), NOW), Ok(()));
    }

    /// Session ids are the caller's words: nothing but a plain id builds a path.
    #[test]
    fn hostile_session_ids_build_no_path() {
        let dir = folder("hostile");
        let sessions = opened(&dir);
        let long = "a".repeat(MAX_JOB_ID + 1);
        for id in ["../records/0", "..", "a/b", "", "sé", "s\u{202e}1", "s 1", "s.1", long.as_str(), "s\n1"] {
            assert_eq!(sessions.check(id, &owner("a"), NOW), Err(Refused::NotPlain), "{id:?}");
            sessions.ended(id, &owner("a"));
            assert!(sessions.record(id, &owner("a"), "job-1", NOW).is_err(), "{id:?}");
            let said = unknown_to(id, "a");
            assert!(said.contains("session `-`") && said.contains("your own jobs"), "{said}");
        }
        assert!(sessions.pending.lock().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0, "nothing written");
    }

    #[test]
    fn records_go_after_30_days_and_past_the_cap() {
        let dir = folder("sweep");
        let sessions = opened(&dir);
        let old = std::fs::File::create(dir.0.join("old")).unwrap();
        old.set_modified(SystemTime::now() - Duration::from_millis(MAX_AGE_MS + 60_000)).unwrap();
        std::fs::write(dir.0.join("young"), "x").unwrap();
        assert_eq!(sessions.sweep(), 1);
        let now = runtime::now_ms();
        assert!(!dir.0.join("old").exists() && dir.0.join("young").exists());
        // Over the cap: the least recently written go, down to nine tenths of it (here a
        // cap of 100 rather than MAX_RECORDS), when a record is written past it.
        let dir = folder("cap");
        let mut sessions = Sessions::open(dir.0.clone(), key(1), now).unwrap();
        sessions.cap = 100;
        let start = SystemTime::now() - Duration::from_secs(3_600);
        for i in 0..100 {
            let f = std::fs::File::create(dir.0.join(format!("s-{i}"))).unwrap();
            f.set_modified(start + Duration::from_secs(i)).unwrap();
        }
        sessions.upkeep.lock().unwrap().count = 100;
        sessions.record("s-100", &owner("a"), "job-1", now).unwrap();
        assert_eq!(sessions.upkeep.lock().unwrap().count, 90);
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 90);
        assert!(!dir.0.join("s-10").exists() && dir.0.join("s-11").exists() && dir.0.join("s-100").exists(), "the oldest went");
    }
}
