//! Memory of order nonces, so a captured order replayed later is refused. A nonce is
//! kept until its order could no longer pass the expiry check anyway (expiry plus the
//! clock-skew allowance); the memory is on disk so an agent restart does not forget.

use crate::spool::write_atomically;
use shared::envelope::CLOCK_SKEW_MS;
use shared::Millis;
use std::collections::HashMap;
use std::path::PathBuf;

pub struct ReplayGuard {
    path: PathBuf,
    seen: HashMap<String, Millis>,
}

impl ReplayGuard {
    pub fn open(path: PathBuf) -> ReplayGuard {
        // A missing or damaged file is an empty memory: expiry still bounds replays to
        // the skew window, and this is logged.
        let seen = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "replay memory unreadable; starting empty");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        };
        ReplayGuard { path, seen }
    }

    /// Records a nonce. False if it was seen before (a replay).
    pub fn admit(&mut self, nonce: &str, expires_at: Millis, now: Millis) -> bool {
        self.seen.retain(|_, exp| exp.saturating_add(CLOCK_SKEW_MS) >= now);
        if self.seen.contains_key(nonce) {
            return false;
        }
        self.seen.insert(nonce.to_string(), expires_at);
        if let Err(e) = serde_json::to_vec(&self.seen).map_err(std::io::Error::other).and_then(|b| write_atomically(&self.path, &b)) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not save replay memory");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_nonce_twice_even_after_a_restart() {
        let path = std::env::temp_dir().join(format!("cr-replay-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut g = ReplayGuard::open(path.clone());
        assert!(g.admit("n1", 1_000, 0));
        assert!(!g.admit("n1", 1_000, 10));
        let mut g = ReplayGuard::open(path.clone());
        assert!(!g.admit("n1", 1_000, 20), "remembered across restarts");
        // Past expiry + skew the memory is pruned (the expiry check refuses it by then).
        assert!(g.admit("n1", 1_000, 1_000 + CLOCK_SKEW_MS + 1));
    }
}
