//! How long the agent waits before it dials the edge again: an exponential, jittered
//! backoff (250 ms doubling, at most 30 s, jitter 0.5 — up to 45 s), started over after a
//! connection that lasted a minute or one the edge closed because it was restarting, and
//! capped while the agent holds work the edge waits on.
//!
//! Why the cap: the edge gives a job up as `lost` (its caller told to run it elsewhere)
//! when its agent has been away `LOST_AFTER_MS`. After a few short connections the grown
//! backoff (17-19 s in the chaos soak) outlasted a low `LOST_AFTER_MS` (10 s), and jobs
//! that had succeeded were reported lost. The edge says its `LOST_AFTER_MS` in the
//! welcome; while jobs run here, or results wait for the edge's acknowledgement, the agent
//! comes back within a quarter of it. Without such work the backoff is as before: an edge
//! with nothing to hear from this agent is not dialed more often.

use backoff::backoff::Backoff;
use std::time::Duration;

/// The first delay, and the least a capped one is.
const INITIAL: Duration = Duration::from_millis(250);
/// A connection that lasted this long was healthy: the backoff starts over after it.
const HEALTHY: Duration = Duration::from_secs(60);
/// The fallback should the backoff ever say "stop" (it is built never to).
const MOST: Duration = Duration::from_secs(30);

/// The agent's reconnect state across connections.
pub struct Reconnect {
    policy: backoff::ExponentialBackoff,
    /// The edge's `LOST_AFTER_MS`, from its last welcome (`None`: never welcomed, or an
    /// edge of before the field).
    lost_after_ms: Option<u64>,
    /// The last connection was closed by the edge because it is restarting.
    edge_restarting: bool,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            policy: backoff::ExponentialBackoff {
                initial_interval: INITIAL,
                randomization_factor: 0.5,
                multiplier: 2.0,
                max_interval: MOST,
                max_elapsed_time: None,
                ..Default::default()
            },
            lost_after_ms: None,
            edge_restarting: false,
        }
    }
}

impl Reconnect {
    /// The edge welcomed the agent and said how long it waits for an agent that holds jobs.
    pub fn welcomed(&mut self, lost_after_ms: Option<u64>) {
        self.lost_after_ms = lost_after_ms;
    }

    /// The edge closed an established connection saying it is restarting: it is back in a
    /// moment, and the jobs it waits on are given up `LOST_AFTER_MS` after its restart.
    pub fn edge_restarting(&mut self) {
        self.edge_restarting = true;
    }

    /// The wait before the next dial, after a connection that lasted `lasted`; `holding`:
    /// the agent runs jobs or keeps results the edge has not acknowledged.
    pub fn next(&mut self, lasted: Duration, holding: bool) -> Duration {
        if lasted > HEALTHY || std::mem::take(&mut self.edge_restarting) {
            self.policy.reset();
        }
        let grown = self.policy.next_backoff().unwrap_or(MOST);
        capped(grown, holding, self.lost_after_ms)
    }
}

/// `grown`, the backoff's delay, kept within a quarter of the edge's `LOST_AFTER_MS`
/// (never under [`INITIAL`]) while the agent holds work, so that it is back well before
/// the edge gives that work up; as it is otherwise, or when the edge did not say.
pub fn capped(grown: Duration, holding: bool, lost_after_ms: Option<u64>) -> Duration {
    match lost_after_ms {
        Some(ms) if holding => grown.min(Duration::from_millis(ms / 4).max(INITIAL)),
        _ => grown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several short connections in a row: the delay grows to at least half of 30 s (the
    /// most, less the jitter).
    fn grown(r: &mut Reconnect, holding: bool) -> Duration {
        for _ in 0..12 {
            r.next(Duration::from_secs(1), holding);
        }
        r.next(Duration::from_secs(1), holding)
    }

    #[test]
    fn a_grown_delay_is_capped_to_a_quarter_of_lost_after_ms_while_the_agent_holds_work() {
        let mut r = Reconnect::default();
        r.welcomed(Some(10_000));
        assert!(grown(&mut r, true) <= Duration::from_millis(2_500));
        // Never under the first delay, however low LOST_AFTER_MS is.
        assert_eq!(capped(Duration::from_secs(20), true, Some(100)), INITIAL);
        // Under the cap, the delay is the backoff's.
        assert_eq!(capped(Duration::from_millis(300), true, Some(10_000)), Duration::from_millis(300));
    }

    #[test]
    fn without_work_held_the_delay_grows_as_before() {
        let mut r = Reconnect::default();
        r.welcomed(Some(10_000));
        assert!(grown(&mut r, false) >= Duration::from_secs(15));
        assert_eq!(capped(Duration::from_secs(20), false, Some(10_000)), Duration::from_secs(20));
    }

    #[test]
    fn an_edge_that_does_not_say_its_lost_after_ms_leaves_the_delay_uncapped() {
        let mut r = Reconnect::default();
        r.welcomed(None);
        assert!(grown(&mut r, true) >= Duration::from_secs(15));
        assert_eq!(capped(Duration::from_secs(20), true, None), Duration::from_secs(20));
    }

    #[test]
    fn the_edge_restarting_or_a_long_connection_starts_the_backoff_over() {
        let mut r = Reconnect::default();
        grown(&mut r, false);
        r.edge_restarting();
        // The first delay, jittered by half either way.
        assert!(r.next(Duration::from_secs(1), false) <= Duration::from_millis(375));
        // Only once: the next short connection grows it again.
        assert!(r.next(Duration::from_secs(1), false) >= Duration::from_millis(250));
        grown(&mut r, false);
        assert!(r.next(Duration::from_secs(61), false) <= Duration::from_millis(375));
    }
}
