//! The native edge's clocks, read once per event into an [`edge_core::Now`]: edge time is
//! a monotonic clock mapped onto the wall time at start-up (so it reads like a date, and
//! stored records stay meaningful across a restart, yet never jumps while the process
//! lives); wall time is the system clock.

use edge_core::{Millis, Now};
use std::time::Instant;

/// Copied wherever an event is stamped (a socket's task stamps the frames it reads).
#[derive(Clone, Copy)]
pub struct Clock {
    /// Wall time at start-up: edge time's epoch.
    epoch: Millis,
    start: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock { epoch: runtime::now_ms(), start: Instant::now() }
    }

    pub fn now(&self) -> Now {
        Now { at: self.epoch.saturating_add(self.start.elapsed().as_millis() as Millis), wall: runtime::now_ms() }
    }

    /// When, on the monotonic clock, edge time `at` comes.
    pub fn instant_of(&self, at: Millis) -> Instant {
        self.start + std::time::Duration::from_millis(at.saturating_sub(self.epoch))
    }
}
