//! What the agent keeps on disk so that nothing is lost and nothing runs twice:
//!
//! - results, until the edge acknowledges them: a job's result is kept here — signed, as
//!   it is sent — from the moment it is sent ([`Spool::sending`], in memory), and written
//!   and synced while it travels ([`Spool::write_sent`]), so a dropped connection or an
//!   agent restart loses nothing; after reconnecting the agent names the spooled jobs in
//!   its hello and sends them again. (Sending first costs nothing in safety: a power cut
//!   during the sync loses the result either way unless the edge got it, and now it may
//!   have; it saves the sync's time on every job.) A
//!   result that cannot be written (a full or read-only disk) is kept in memory instead —
//!   named and sent the same way — and written when the disk allows;
//! - a "started" marker per job, holding its order's nonce, written (and synced) before
//!   Claude is spawned and removed once its result is kept. A marker left by an agent that
//!   died is found at start-up: that job is reported lost (a result signed bound to the
//!   nonce the marker kept), never started again — the edge may not have heard that it
//!   started, and would otherwise send it again.

use crate::files::write_atomically;
use shared::contract::ErrorCode;
use shared::envelope::Envelope;
use shared::job::JobResult;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

pub struct Spool {
    dir: PathBuf,
    started: PathBuf,
    kept: Mutex<Kept>,
}

/// Results kept in memory.
#[derive(Default)]
struct Kept {
    /// Results the disk refused, until it takes them.
    held: BTreeMap<String, Envelope>,
    /// Results sent and being written: until [`Spool::write_sent`] is done with one, an
    /// acknowledgement takes it from here, and the write then removes the file it made.
    writing: BTreeMap<String, Envelope>,
}

/// A job an earlier run of the agent started and did not finish: its id and the nonce of
/// its order, which the "lost" result that reports it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    pub job_id: String,
    pub order_nonce: String,
}

/// Job ids become file names: only plain ids are allowed.
fn safe_id(id: &str) -> bool {
    shared::ids::plain_id(id, shared::ids::MAX_JOB_ID)
}

/// The result of a job an earlier run of the agent started and did not finish.
pub fn interrupted() -> JobResult {
    JobResult::failure(
        ErrorCode::RunnerLost,
        "the agent stopped (it crashed or was killed) while this job ran; it was not run again: run the task again or elsewhere",
        0,
    )
}

impl Spool {
    /// Opens the spool: results in `dir`, markers in `started`. Returns the spool and the
    /// jobs whose markers a dead agent left without a result: the agent reports each lost
    /// ([`interrupted`], signed, [`Spool::put`], which removes the marker).
    pub fn open(dir: PathBuf, started: PathBuf) -> std::io::Result<(Spool, Vec<Interrupted>)> {
        crate::files::private_dir(&dir)?;
        crate::files::private_dir(&started)?;
        let spool = Spool { dir, started, kept: Mutex::new(Kept::default()) };
        let mut interrupted_jobs = Vec::new();
        for entry in std::fs::read_dir(&spool.started)?.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().filter(|id| safe_id(id)) else { continue };
            if spool.has(id) {
                spool.finished(id);
                continue;
            }
            tracing::warn!(job_id = id, "a job was running when the agent stopped; it is reported lost, not run again");
            // Written by this agent: its order's nonce, a short plain line.
            let nonce = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let nonce = shared::text::truncate(nonce.trim(), shared::ids::MAX_JOB_ID + 16).to_string();
            interrupted_jobs.push(Interrupted { job_id: id.to_string(), order_nonce: nonce });
        }
        Ok((spool, interrupted_jobs))
    }

    fn path(&self, job_id: &str) -> Option<PathBuf> {
        safe_id(job_id).then(|| self.dir.join(format!("{job_id}.json")))
    }

    /// Writes (and syncs) the marker that says this job's Claude may be running, holding
    /// its order's nonce. Nothing may start without it.
    pub fn started(&self, job_id: &str, order_nonce: &str) -> std::io::Result<()> {
        if !safe_id(job_id) {
            return Err(std::io::Error::other("unsafe job id"));
        }
        // Its name and the nonce are the whole record. One fsync, like the result's (whose
        // rename is not synced either): on ext4 (and XFS) syncing a new file commits the
        // journal that holds its directory entry too; a second fsync of the folder cost
        // as much again (about 4 ms on the shared test machine's disk).
        let mut file = std::fs::File::create(self.started.join(job_id))?;
        std::io::Write::write_all(&mut file, order_nonce.as_bytes())?;
        file.sync_all()
    }

    /// The job's result is kept (on disk or in memory): its marker goes.
    fn finished(&self, job_id: &str) {
        let _ = std::fs::remove_file(self.started.join(job_id));
    }

    /// Keeps a result until the edge acknowledges it. If the disk refuses it, it is kept
    /// in memory (and the error returned, for the agent to report); either way it is
    /// named in the next hello and sent again.
    pub fn put(&self, job_id: &str, result: &Envelope) -> std::io::Result<()> {
        self.sending(job_id, result);
        self.write_sent(job_id)
    }

    /// Keeps a result in memory from now on (named in a hello, found by [`Spool::get`]),
    /// before it is sent; [`Spool::write_sent`] then puts it on disk.
    pub fn sending(&self, job_id: &str, result: &Envelope) {
        self.lock().writing.insert(job_id.to_string(), result.clone());
    }

    /// Writes (and syncs) a result kept by [`Spool::sending`], unless the edge has
    /// acknowledged it meanwhile; then the job's "started" marker goes. An error means the
    /// disk refused it: it stays in memory, named and sent until acknowledged.
    pub fn write_sent(&self, job_id: &str) -> std::io::Result<()> {
        let result = self.lock().writing.get(job_id).cloned();
        let written = match (result, self.path(job_id)) {
            (Some(result), Some(path)) => {
                // A result is the one thing that must outlive anything: fsync it.
                let written = write_atomically(&path, &serde_json::to_vec(&result)?, true);
                let mut kept = self.lock();
                if kept.writing.remove(job_id).is_none() {
                    // Acknowledged while it was written: the file is not needed.
                    let _ = std::fs::remove_file(&path);
                    Ok(())
                } else {
                    if written.is_err() {
                        kept.held.insert(job_id.to_string(), result);
                    }
                    written
                }
            }
            (None, Some(_)) => Ok(()),
            (_, None) => {
                self.lock().writing.remove(job_id);
                Err(std::io::Error::other("unsafe job id"))
            }
        };
        self.finished(job_id);
        written
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().expect("spool lock")
    }

    pub fn has(&self, job_id: &str) -> bool {
        {
            let kept = self.lock();
            if kept.held.contains_key(job_id) || kept.writing.contains_key(job_id) {
                return true;
            }
        }
        self.path(job_id).is_some_and(|p| p.exists())
    }

    /// A kept result, if there is one.
    pub fn get(&self, job_id: &str) -> Option<Envelope> {
        {
            let kept = self.lock();
            if let Some(r) = kept.held.get(job_id).or_else(|| kept.writing.get(job_id)) {
                return Some(r.clone());
            }
        }
        let bytes = std::fs::read(self.path(job_id)?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The edge has the result: it goes (from memory, from disk, and from a write under way).
    pub fn remove(&self, job_id: &str) {
        let mut kept = self.lock();
        kept.held.remove(job_id);
        kept.writing.remove(job_id);
        if let Some(path) = self.path(job_id) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Results held in memory, still waiting for the disk.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Every kept result, on disk or held in memory (those are written to disk first if
    /// it now allows). Unreadable files are moved aside rather than resent forever.
    pub fn all(&self) -> Vec<(String, Envelope)> {
        let mut out: BTreeMap<String, Envelope> = BTreeMap::new();
        {
            let mut kept = self.lock();
            let held = &mut kept.held;
            let written: Vec<String> = held
                .iter()
                .filter(|(id, r)| {
                    let bytes = serde_json::to_vec(r).expect("results serialise");
                    self.path(id).is_some_and(|p| write_atomically(&p, &bytes, true).is_ok())
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in written {
                tracing::info!(job_id = %id, "a result held in memory is now on disk");
                held.remove(&id);
            }
            out.extend(held.iter().map(|(id, r)| (id.clone(), r.clone())));
            out.extend(kept.writing.iter().map(|(id, r)| (id.clone(), r.clone())));
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return out.into_iter().collect() };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Envelope>(&b).ok()) {
                Some(r) if safe_id(id) => {
                    out.insert(id.to_string(), r);
                }
                _ => {
                    tracing::warn!(path = %path.display(), "unreadable spooled result moved aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                }
            }
        }
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use shared::protocol::{AgentMessage, ResultReport};

    /// A result as the agent keeps it: signed.
    fn signed(job_id: &str, result: JobResult) -> Envelope {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        match AgentMessage::result(job_id, &format!("{job_id}:1"), result, &key) {
            AgentMessage::Result { envelope } => envelope,
            _ => unreachable!("a result"),
        }
    }

    fn opened(envelope: &Envelope) -> ResultReport {
        serde_json::from_str(&envelope.payload).unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cr-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn keeps_results_until_removed_and_sets_bad_files_aside() {
        let dir = dir("keep");
        let (spool, _) = Spool::open(dir.clone(), dir.join("started")).unwrap();
        let r = signed("job-1", JobResult { success: true, output: "x".into(), ..Default::default() });
        spool.put("job-1", &r).unwrap();
        assert!(spool.put("../evil", &r).is_err());
        std::fs::write(dir.join("junk.json"), "{").unwrap();
        let all = spool.all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, r);
        assert_eq!(spool.get("job-1"), Some(r));
        assert!(dir.join("junk.bad").exists());
        spool.remove("job-1");
        assert!(spool.all().is_empty());
    }

    #[test]
    fn a_job_started_by_an_agent_that_died_is_reported_lost_not_run_again() {
        let dir = dir("started");
        let (spool, interrupted_jobs) = Spool::open(dir.clone(), dir.join("started")).unwrap();
        assert!(interrupted_jobs.is_empty());
        spool.started("ran-half", "ran-half:3").unwrap();
        spool.started("ran-whole", "ran-whole:1").unwrap();
        spool.put("ran-whole", &signed("ran-whole", JobResult { success: true, ..Default::default() })).unwrap();
        drop(spool); // the agent dies here

        let (spool, interrupted_jobs) = Spool::open(dir.clone(), dir.join("started")).unwrap();
        assert_eq!(interrupted_jobs, vec![Interrupted { job_id: "ran-half".into(), order_nonce: "ran-half:3".into() }]);
        // The agent reports it lost (as it does at start-up).
        spool.put("ran-half", &signed("ran-half", interrupted())).unwrap();
        let all = spool.all();
        assert_eq!(all.len(), 2);
        let lost = opened(&spool.get("ran-half").unwrap()).result;
        assert_eq!(lost.error_code, Some(ErrorCode::RunnerLost));
        assert!(opened(&spool.get("ran-whole").unwrap()).result.success);
        // Reported once: the markers are gone.
        assert!(Spool::open(dir.clone(), dir.join("started")).unwrap().1.is_empty());
    }

    #[test]
    fn a_result_the_disk_refuses_is_held_in_memory_and_written_later() {
        let dir = dir("held");
        let (spool, _) = Spool::open(dir.clone(), dir.join("started")).unwrap();
        // A directory where the result's file would go makes the write fail.
        std::fs::create_dir_all(dir.join("job-9.tmp")).unwrap();
        let r = signed("job-9", JobResult { success: true, output: "kept".into(), ..Default::default() });
        assert!(spool.put("job-9", &r).is_err());
        assert!(spool.has("job-9"));
        assert_eq!(spool.held(), 1);
        assert_eq!(spool.all(), vec![("job-9".to_string(), r.clone())], "named and sent again while held");
        std::fs::remove_dir(dir.join("job-9.tmp")).unwrap();
        assert_eq!(spool.all(), vec![("job-9".to_string(), r)]);
        assert_eq!(spool.held(), 0, "written once the disk allowed it");
        assert!(dir.join("job-9.json").exists());
    }

    /// The result is sent before it is written: from then on it is named in a hello and
    /// found again, and an acknowledgement that arrives while it is written leaves no file
    /// behind (nor a marker).
    #[test]
    fn a_result_sent_before_it_is_written_is_kept_and_an_early_ack_leaves_nothing() {
        let dir = dir("sending");
        let (spool, _) = Spool::open(dir.clone(), dir.join("started")).unwrap();
        let r = signed("job-5", JobResult { success: true, output: "on its way".into(), ..Default::default() });
        spool.started("job-5", "job-5:1").unwrap();
        spool.sending("job-5", &r);
        assert_eq!(spool.all(), vec![("job-5".to_string(), r.clone())], "named in a hello while it is written");
        assert_eq!(spool.get("job-5"), Some(r.clone()));
        spool.write_sent("job-5").unwrap();
        assert!(dir.join("job-5.json").exists());
        assert!(!dir.join("started/job-5").exists(), "the marker goes once the result is kept");

        // The edge's acknowledgement comes before the write is done.
        spool.started("job-6", "job-6:1").unwrap();
        spool.sending("job-6", &r);
        spool.remove("job-6");
        spool.write_sent("job-6").unwrap();
        assert!(!dir.join("job-6.json").exists(), "an acknowledged result is not written");
        assert!(!dir.join("started/job-6").exists());
        assert!(!spool.has("job-6"));
    }
}
