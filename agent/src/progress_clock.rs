//! One clock for the progress batches of every job ([`agent_core::progress`]): it ticks
//! every [`PROGRESS_BATCH_MS`] while batches wait, and at each tick every waiting batch
//! goes — so a batch's first event waits at most that long.
//!
//! Why one clock and not a timer per batch: a tokio timer set sooner than the runtime's
//! next wake-up wakes the thread parked on the I/O driver to say so (an eventfd write, an
//! `epoll_wait` and futex calls more per job, measured with strace), and a job of the
//! stand-in, done in 2 ms, would pay that for a timer that never fires. The clock's wake-ups
//! are 20 a second, whatever the job rate, while jobs print; it stops after a second with
//! no batch waiting, and the next batch starts it again.

use agent_core::progress::PROGRESS_BATCH_MS;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Ticks with no batch waiting after which the clock stops.
const IDLE_TICKS: u32 = 20;

#[derive(Default)]
pub struct ProgressClock {
    /// Batches waiting for the next tick.
    waiting: AtomicUsize,
    /// Whether a ticking task runs.
    ticking: AtomicBool,
    tick: Notify,
}

impl ProgressClock {
    /// Waits for the next tick, starting the clock if it is stopped. Cancel-safe: a wait
    /// given up (the job's run ended first) no longer counts.
    pub async fn next_tick(self: &Arc<Self>) {
        let tick = self.tick.notified();
        tokio::pin!(tick);
        // Registered before it is counted, so no tick in between is missed.
        tick.as_mut().enable();
        let _waiting = Waiting::count(&self.waiting);
        if !self.ticking.swap(true, SeqCst) {
            tokio::spawn(Arc::clone(self).run());
        }
        tick.await;
    }

    async fn run(self: Arc<Self>) {
        let period = Duration::from_millis(PROGRESS_BATCH_MS);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle = 0;
        loop {
            ticks.tick().await;
            self.tick.notify_waiters();
            idle = if self.waiting.load(SeqCst) == 0 { idle + 1 } else { 0 };
            if idle >= IDLE_TICKS {
                self.ticking.store(false, SeqCst);
                // A batch that came in between saw the clock ticking and did not start it:
                // this one goes on, unless another has started meanwhile.
                if self.waiting.load(SeqCst) == 0 || self.ticking.swap(true, SeqCst) {
                    return;
                }
                idle = 0;
            }
        }
    }
}

/// One batch counted as waiting, for as long as this lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, SeqCst);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds for waits that should end far sooner: a failure, not a measure.
    const GIVE_UP: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn waits_end_on_a_tick_and_the_clock_stops_when_idle_and_starts_again() {
        let clock = Arc::new(ProgressClock::default());
        tokio::time::timeout(GIVE_UP, clock.next_tick()).await.expect("a tick");
        assert!(clock.ticking.load(SeqCst));
        // Two waiting at once end on the same tick.
        let both = futures_util::future::join(clock.next_tick(), clock.next_tick());
        tokio::time::timeout(GIVE_UP, both).await.expect("a tick for both");
        // A wait given up no longer counts.
        let _ = tokio::time::timeout(Duration::from_millis(1), clock.next_tick()).await;
        assert_eq!(clock.waiting.load(SeqCst), 0);
        // Idle, it stops (after IDLE_TICKS ticks); the next wait starts it again.
        let stopped = async {
            while clock.ticking.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(GIVE_UP, stopped).await.expect("the clock stops when no batch waits");
        tokio::time::timeout(GIVE_UP, clock.next_tick()).await.expect("a tick after a restart");
        assert!(clock.ticking.load(SeqCst));
    }
}
