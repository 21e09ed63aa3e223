//! Memory of order nonces, so a captured order replayed later is refused. A nonce is
//! kept until its order could no longer pass the expiry check anyway (expiry plus the
//! clock-skew allowance). The memory is an append-only file (one `nonce expiry` line per
//! order, compacted now and then) so an agent restart does not forget, and recording a
//! nonce costs one small write, not a rewrite: the file stays open for appending. (Not
//! synced, kept open or not: an agent killed loses nothing written, a power cut can lose
//! the last few nonces, each of which matters only until its order expires.)

use shared::envelope::CLOCK_SKEW_MS;
use shared::Millis;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

pub struct ReplayGuard {
    path: PathBuf,
    seen: HashMap<String, Millis>,
    /// Lines in the file, live or not: compaction is due when most are dead.
    lines: usize,
    /// The file, open for appending (opened again after a compaction or a failed write).
    log: Option<std::fs::File>,
    /// When the memory was last pruned of dead nonces: at most every [`PRUNE_EVERY`], not
    /// at every order (a walk over every live nonce).
    pruned_at: Millis,
}

/// Far more than the file holds after its compactions (the orders of the last two minutes
/// and some 1,000 lines more); a larger one is not the agent's, and read as no memory.
const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;

/// How often dead nonces are pruned from memory. A dead nonce kept a little longer refuses
/// nothing: it is looked up with its expiry.
const PRUNE_EVERY: Millis = 1_000;

impl ReplayGuard {
    pub fn open(path: PathBuf) -> ReplayGuard {
        // A missing or damaged file is an empty memory: expiry still bounds replays to
        // the skew window. Damaged lines are skipped. Read as a file the agent keeps (never
        // waiting on a pipe, bounded); anything else a job put in its place goes, or no
        // nonce could be kept again.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
            let _ = std::fs::remove_file(&path);
        }
        // Nonces say which jobs ran when: owner-only, like every file of the agent.
        let bytes = crate::files::read_private(&path, MAX_FILE_BYTES, "replay memory").unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut seen = HashMap::new();
        let mut lines = 0;
        for line in text.lines() {
            lines += 1;
            if let Some((nonce, expiry)) = line.rsplit_once(' ') {
                if let Ok(expiry) = expiry.parse() {
                    seen.insert(nonce.to_string(), expiry);
                }
            }
        }
        ReplayGuard { path, seen, lines, log: None, pruned_at: 0 }
    }

    /// Whether a nonce expiring at `expires_at` may still pass the expiry check at `now`.
    fn live(expires_at: Millis, now: Millis) -> bool {
        expires_at.saturating_add(CLOCK_SKEW_MS) >= now
    }

    /// Appends `line` to the open file (opening it first if need be).
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if self.log.is_none() {
            let mut options = std::fs::OpenOptions::new();
            options.create(true).append(true).mode(crate::files::PRIVATE_FILE);
            // Never through a link, never waiting on a pipe: this runs at an order, on the
            // runtime thread.
            self.log = Some(crate::files::open_plain_with(&self.path, options, "replay memory")?);
        }
        let written = self.log.as_mut().expect("just opened").write_all(line);
        if written.is_err() {
            // Opened again at the next order: the file may have been moved or repaired.
            self.log = None;
        }
        written
    }

    /// Records a nonce. False if it was seen before (a replay).
    pub fn admit(&mut self, nonce: &str, expires_at: Millis, now: Millis) -> bool {
        if now.abs_diff(self.pruned_at) >= PRUNE_EVERY {
            self.seen.retain(|_, exp| Self::live(*exp, now));
            self.pruned_at = now;
        }
        if self.seen.get(nonce).is_some_and(|exp| Self::live(*exp, now)) {
            return false;
        }
        self.seen.insert(nonce.to_string(), expires_at);
        // Nonces are the edge's `id:attempt` text; a newline would break the file format.
        let line = format!("{} {expires_at}\n", nonce.replace(['\n', '\r'], "_"));
        let written = if self.lines > 1024 && self.lines > 2 * self.seen.len() {
            self.compact(now)
        } else {
            self.append(line.as_bytes())
        };
        match written {
            Ok(()) => self.lines += 1,
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "could not save replay memory"),
        }
        true
    }

    fn compact(&mut self, now: Millis) -> std::io::Result<()> {
        // The file is replaced: appends go to the new one.
        self.log = None;
        self.seen.retain(|_, exp| Self::live(*exp, now));
        let text: String = self.seen.iter().map(|(n, e)| format!("{n} {e}\n")).collect();
        crate::files::write_atomically(&self.path, text.as_bytes(), false)?;
        self.lines = self.seen.len().saturating_sub(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cr-replay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn refuses_a_nonce_twice_even_after_a_restart() {
        let path = path("restart");
        let mut g = ReplayGuard::open(path.clone());
        assert!(g.admit("n1", 1_000, 0));
        assert!(!g.admit("n1", 1_000, 10));
        let mut g = ReplayGuard::open(path.clone());
        assert!(!g.admit("n1", 1_000, 20), "remembered across restarts");
        // Past expiry + skew the memory is pruned (the expiry check refuses it by then).
        assert!(g.admit("n1", 1_000, 1_000 + CLOCK_SKEW_MS + 1));
    }

    /// Dead nonces are pruned at most every second, yet one is never taken for a replay
    /// once its order is past expiry and skew, pruned or not; and the file kept open for
    /// appending gets every nonce, across a compaction.
    #[test]
    fn a_dead_nonce_not_yet_pruned_is_no_replay() {
        let path = path("lazy");
        let mut g = ReplayGuard::open(path.clone());
        let now = 5 * CLOCK_SKEW_MS;
        assert!(g.admit("old", 1_000, now), "pruned the first time");
        assert!(g.admit("a", now, now));
        assert!(!g.admit("a", now, now + 10), "live: a replay");
        // A prune just before "a" dies keeps it; 20 ms later, with no prune since, it is
        // dead and in memory still.
        assert!(g.admit("b", now + CLOCK_SKEW_MS, now + CLOCK_SKEW_MS - 10));
        assert!(g.seen.contains_key("a"));
        assert!(g.admit("a", now + CLOCK_SKEW_MS, now + CLOCK_SKEW_MS + 10), "dead, though not pruned: not a replay");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().map(|l| l.split(' ').next().unwrap()).collect::<Vec<_>>(), ["old", "a", "b", "a"]);
    }

    #[test]
    fn compacts_without_forgetting_live_nonces() {
        let path = path("compact");
        let mut g = ReplayGuard::open(path.clone());
        for i in 0..3000u64 {
            // Each nonce lives 10 ms past the skew window: most are dead by the end.
            assert!(g.admit(&format!("n{i}"), i, i + CLOCK_SKEW_MS - 5));
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 3000, "compacted: {lines} lines");
        let mut g = ReplayGuard::open(path.clone());
        assert!(!g.admit("n2999", 2999, 2999 + CLOCK_SKEW_MS - 5), "the newest nonce survived compaction");
    }

    /// A job (the agent's user) can put a pipe where the memory is kept: reading it at the
    /// start, or opening it to append at an order (on the runtime thread, under the lock
    /// of every job's state), waited for a writer or a reader for ever. It is put out of
    /// the way at the start, and never waited on.
    #[test]
    fn a_pipe_in_place_of_the_memory_holds_nothing() {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path("fifo");
        crate::files::pipe_at(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let opened = path.clone();
        std::thread::spawn(move || {
            let mut g = ReplayGuard::open(opened.clone());
            let _ = tx.send(g.admit("n1", 1_000, 0));
        });
        let Ok(admitted) = rx.recv_timeout(std::time::Duration::from_secs(60)) else {
            let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&path);
            panic!("the replay memory waited on a pipe put in its place");
        };
        assert!(admitted);
        let mut g = ReplayGuard::open(path.clone());
        assert!(!g.admit("n1", 1_000, 10), "remembered across a restart: the pipe went, a file took its place");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_damaged_file_is_read_as_far_as_it_goes() {
        let path = path("damaged");
        std::fs::write(&path, "good 99999999999999\ngarbage\n\u{0}\u{1}\n").unwrap();
        let mut g = ReplayGuard::open(path);
        assert!(!g.admit("good", 1, 0));
        assert!(g.admit("garbage", 1, 0));
    }
}
