//! Results kept on disk until the edge acknowledges them. A job's result is written here
//! — signed, as it is sent — before it is sent, so a dropped connection or an agent
//! restart loses nothing: after reconnecting the agent names the spooled jobs in its hello
//! and sends them again, the same bytes.

use shared::envelope::Envelope;
use crate::files::write_atomically;
use std::path::PathBuf;

pub struct Spool {
    dir: PathBuf,
}

/// Job ids become file names: only plain ids are allowed.
fn safe_id(id: &str) -> bool {
    shared::ids::plain_id(id, shared::ids::MAX_JOB_ID)
}

impl Spool {
    pub fn open(dir: PathBuf) -> std::io::Result<Spool> {
        std::fs::create_dir_all(&dir)?;
        Ok(Spool { dir })
    }

    fn path(&self, job_id: &str) -> Option<PathBuf> {
        safe_id(job_id).then(|| self.dir.join(format!("{job_id}.json")))
    }

    pub fn put(&self, job_id: &str, result: &Envelope) -> std::io::Result<()> {
        let path = self.path(job_id).ok_or_else(|| std::io::Error::other("unsafe job id"))?;
        // A result is the one thing that must outlive anything: fsync it.
        write_atomically(&path, &serde_json::to_vec(result)?, true)
    }

    pub fn has(&self, job_id: &str) -> bool {
        self.path(job_id).is_some_and(|p| p.exists())
    }

    pub fn remove(&self, job_id: &str) {
        if let Some(path) = self.path(job_id) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Every spooled result. Unreadable files are moved aside rather than resent forever.
    pub fn all(&self) -> Vec<(String, Envelope)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return out };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Envelope>(&b).ok()) {
                Some(r) if safe_id(id) => out.push((id.to_string(), r)),
                _ => {
                    tracing::warn!(path = %path.display(), "unreadable spooled result moved aside");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_results_until_removed_and_sets_bad_files_aside() {
        let dir = std::env::temp_dir().join(format!("cr-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::open(dir.clone()).unwrap();
        let r = Envelope { payload: "{\"job_id\":\"job-1\"}".into(), sig: "c2ln".into() };
        spool.put("job-1", &r).unwrap();
        assert!(spool.put("../evil", &r).is_err());
        std::fs::write(dir.join("junk.json"), "{").unwrap();
        let all = spool.all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, r);
        assert!(dir.join("junk.bad").exists());
        spool.remove("job-1");
        assert!(spool.all().is_empty());
    }
}
