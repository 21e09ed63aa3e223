//! How long the agent waits before it dials the edge again: an exponential, jittered
//! backoff (250 ms doubling, at most 30 s, jitter 0.5 — up to 45 s), started over after a
//! connection that lasted a minute or one the edge closed because it was restarting (said
//! before its welcome, by a peer no key proved yet: once between welcomes), and capped
//! while the agent holds work the edge waits on.
//!
//! Why the cap: the edge gives a job up as `lost` (its caller told to run it elsewhere)
//! when its agent has been away `LOST_AFTER_MS`. After a few short connections the grown
//! backoff (17-19 s in the chaos soak) outlasted a low `LOST_AFTER_MS` (10 s), and jobs
//! that had succeeded were reported lost. The edge says its `LOST_AFTER_MS` in the
//! welcome; while jobs run here, or results wait for the edge's acknowledgement, the agent
//! comes back within a quarter of it, jittered within that cap (between half of it and
//! all of it): the agents of a restarted edge, all holding work, do not redial in
//! lockstep. Without such work the backoff is as before: an edge with nothing to hear from
//! this agent is not dialed more often.
//!
//! The value is kept in DATA_DIR (`lost_after`) and read at the agent's start: an agent
//! started holding results while the edge is unreachable (a host reboot, a drain with the
//! edge down) is capped from its first dial, not from its first welcome (its delay had
//! grown to 30 s by then). A job of the agent's user can write that file: a value only
//! ever lowers a delay, never under the first one, so the worst a planted one does is
//! redial more often while the agent holds work.
//!
//! The cap bounds the sleep, not a dial: one hung dial (a lost SYN, an edge that accepts
//! and says nothing) waited out the whole handshake timeout, 10 s a step, and outlasted a
//! `LOST_AFTER_MS` of 8 s. So while the agent holds work, each step of the handshake is
//! bounded by a quarter of `LOST_AFTER_MS` too, never under [`DIAL_FLOOR`] (a TLS dial
//! over a slow link must still get through): a hung dial leaves time for others. A step
//! that timed out doubles the next dial's bound (until a welcome), so a link slower than a
//! quarter (3 s a step against 8 s) gets through at the second dial, not never. Once
//! the agent has been away longer than `LOST_AFTER_MS` the edge has given that work up,
//! and the full timeout is back — a link slower than the shortened bound is never kept
//! from connecting for good (held results wait for it).

use backoff::backoff::Backoff;
use crate::boot_clock::BootInstant;
use std::time::Duration;

/// The first delay, and the least a capped one is.
const INITIAL: Duration = Duration::from_millis(250);
/// A connection that lasted this long was healthy: the backoff starts over after it.
const HEALTHY: Duration = Duration::from_secs(60);
/// The fallback should the backoff ever say "stop" (it is built never to).
const MOST: Duration = Duration::from_secs(30);
/// The least a handshake step is given while the agent holds work: a TLS dial over a slow
/// or distant link takes a few round trips.
pub const DIAL_FLOOR: Duration = Duration::from_secs(2);
/// Each handshake step's bound otherwise (the edge waits as long for each).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(shared::protocol::HANDSHAKE_TIMEOUT_MS);

/// The least wait a `DUPLICATE` refusal's `retry after` sets. The edge says when the other
/// agent's connection would fall silent (about a heartbeat interval, 15 s by default) or
/// its jobs' orphan deadline; a shorter word is rare and once (that agent about to go
/// silent). Read before any welcome, it is anyone's word at EDGE_URL: one saying `0` after
/// every hello must not have the agent dial, and log at error, four times a second.
const TOLD_LEAST: Duration = Duration::from_secs(2);

/// The wait before the next dial when the edge refused this agent for another one with
/// its AGENT_ID (`DUPLICATE`) and said when it could let it in: that, within
/// [`TOLD_LEAST`] and the backoff's longest (the words are not proven). The backoff does
/// not grow by it.
pub fn told(after: Duration) -> Duration {
    after.clamp(TOLD_LEAST, MOST)
}

/// The agent's reconnect state across connections.
pub struct Reconnect {
    policy: backoff::ExponentialBackoff,
    /// The edge's `LOST_AFTER_MS`, from its last welcome, or before the first one the
    /// value the last welcome before the agent's start said (`None`: an edge of before the
    /// field, or none known).
    lost_after_ms: Option<u64>,
    /// The last connection was closed by the edge because it is restarting.
    edge_restarting: bool,
    /// The last connection was welcomed: the agent is away from the edge from its end.
    connected: bool,
    /// A restart said before a welcome started the backoff over since the last welcome.
    unproven_restart: bool,
    /// When the last welcomed connection ended (the boot clock: the edge counts a suspend).
    away_since: Option<BootInstant>,
    /// Handshake steps that timed out since the last welcome.
    slow_steps: u32,
    /// What the last welcome said is not in DATA_DIR (its write failed).
    unkept: bool,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            policy: backoff::ExponentialBackoff {
                // Both: the crate's default starts at 500 ms, and `initial_interval` is
                // used only from the first reset on.
                current_interval: INITIAL,
                initial_interval: INITIAL,
                randomization_factor: 0.5,
                multiplier: 2.0,
                max_interval: MOST,
                max_elapsed_time: None,
                ..Default::default()
            },
            lost_after_ms: None,
            edge_restarting: false,
            connected: false,
            unproven_restart: false,
            away_since: None,
            slow_steps: 0,
            unkept: false,
        }
    }
}

impl Reconnect {
    /// The state of an agent that starts remembering `remembered`, the `LOST_AFTER_MS` of
    /// the last welcome before its start (`lost_after` keeps it in DATA_DIR): an agent
    /// started holding results while the edge is unreachable (a host reboot) must come
    /// back before the edge gives them up, before any welcome could tell it when. It has
    /// been away at least since its start.
    pub fn remembering(remembered: Option<u64>) -> Self {
        Reconnect { lost_after_ms: remembered, away_since: remembered.map(|_| BootInstant::now()), ..Reconnect::default() }
    }

    /// The edge welcomed the agent and said how long it waits for an agent that holds jobs
    /// (`None`: an edge of before the field, uncapped). True when that is not what the
    /// agent knew, or what it knew could not be kept ([`Reconnect::not_kept`]): the value
    /// to write down.
    pub fn welcomed(&mut self, lost_after_ms: Option<u64>) -> bool {
        self.connected = true;
        self.unproven_restart = false;
        self.slow_steps = 0;
        let unkept = std::mem::take(&mut self.unkept);
        std::mem::replace(&mut self.lost_after_ms, lost_after_ms) != lost_after_ms || unkept
    }

    /// What the last welcome said could not be written down (`lost_after::keep` failed):
    /// the next welcome says it changed, so that it is written again.
    pub fn not_kept(&mut self) {
        self.unkept = true;
    }

    /// The edge closed an established connection saying it is restarting: it is back in a
    /// moment, and the jobs it waits on are given up `LOST_AFTER_MS` after its restart.
    pub fn edge_restarting(&mut self) {
        self.edge_restarting = true;
    }

    /// The edge said it is restarting after the hello, before its welcome (a goodbye or a
    /// close 4005). Words no key proved yet: anything answering at EDGE_URL can say them,
    /// after every hello. So they start the backoff over once between welcomes — an edge
    /// that began to stop during this handshake, once per stop — and not at every dial,
    /// which would have the agent dial every 250 ms for as long as the peer says so.
    pub fn edge_restarting_before_welcome(&mut self) {
        if !std::mem::replace(&mut self.unproven_restart, true) {
            self.edge_restarting = true;
        }
    }

    /// The wait before the next dial, after a connection that lasted `lasted`; `holding`:
    /// the agent runs jobs or keeps results the edge has not acknowledged.
    pub fn next(&mut self, lasted: Duration, holding: bool) -> Duration {
        if std::mem::take(&mut self.connected) {
            self.away_since = Some(BootInstant::now());
        }
        if lasted > HEALTHY || std::mem::take(&mut self.edge_restarting) {
            self.policy.reset();
        }
        let grown = self.policy.next_backoff().unwrap_or(MOST);
        let [jitter] = runtime::entropy::<1>();
        capped(grown, holding, self.lost_after_ms, f64::from(jitter) / 255.0)
    }

    /// A step of this dial's handshake timed out: the next dial's steps get twice as long
    /// (see [`handshake_timeout`]), until a welcome.
    pub fn step_timed_out(&mut self) {
        self.slow_steps = self.slow_steps.saturating_add(1);
    }

    /// The bound on each step of the next handshake (dial, challenge, hello, welcome);
    /// `holding` as for [`Reconnect::next`].
    pub fn handshake_timeout(&self, holding: bool) -> Duration {
        let away = self.away_since.map_or(Duration::ZERO, |since| since.elapsed());
        handshake_timeout(holding, self.lost_after_ms, away, self.slow_steps)
    }
}

/// `grown`, the backoff's delay, kept within a quarter of the edge's `LOST_AFTER_MS`
/// (never under [`INITIAL`]) while the agent holds work, so that it is back well before
/// the edge gives that work up; as it is otherwise, or when the edge did not say. A capped
/// delay is spread by `jitter` (0 to 1) between half the cap (or [`INITIAL`]) and the cap.
pub fn capped(grown: Duration, holding: bool, lost_after_ms: Option<u64>, jitter: f64) -> Duration {
    match lost_after_ms {
        Some(ms) if holding => {
            let cap = Duration::from_millis(ms / 4).max(INITIAL);
            if grown < cap {
                return grown;
            }
            let least = (cap / 2).max(INITIAL);
            least + (cap - least).mul_f64(jitter.clamp(0.0, 1.0))
        }
        _ => grown,
    }
}

/// Each handshake step's bound: a quarter of `LOST_AFTER_MS` (within [`DIAL_FLOOR`] and
/// [`HANDSHAKE_TIMEOUT`]) while the agent holds work and has been `away` less than it, so
/// that a hung dial leaves time for another before the edge gives the work up; doubled for
/// each of the `slow_steps` that timed out since the last welcome (up to the full timeout),
/// so that a link slower than a quarter of it (3 s a step against LOST_AFTER_MS 8 s) gets
/// through at the second dial instead of never within the budget; the full timeout
/// otherwise.
pub fn handshake_timeout(holding: bool, lost_after_ms: Option<u64>, away: Duration, slow_steps: u32) -> Duration {
    match lost_after_ms {
        Some(ms) if holding && away < Duration::from_millis(ms) => {
            let quarter = Duration::from_millis(ms / 4).clamp(DIAL_FLOOR, HANDSHAKE_TIMEOUT);
            quarter.saturating_mul(1u32 << slow_steps.min(8)).min(HANDSHAKE_TIMEOUT)
        }
        _ => HANDSHAKE_TIMEOUT,
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
        assert_eq!(capped(Duration::from_secs(20), true, Some(100), 1.0), INITIAL);
        // Under the cap, the delay is the backoff's.
        assert_eq!(capped(Duration::from_millis(300), true, Some(10_000), 1.0), Duration::from_millis(300));
    }

    /// A capped delay was the cap itself: every agent of a restarted edge that held work
    /// redialed at the same quarter of LOST_AFTER_MS, in lockstep. It is spread below the
    /// cap now, never above it.
    #[test]
    fn a_capped_delay_is_jittered_within_the_cap() {
        let cap = Duration::from_millis(2_000);
        let delays: Vec<Duration> =
            [0.0, 0.25, 0.5, 1.0].iter().map(|&j| capped(Duration::from_secs(20), true, Some(8_000), j)).collect();
        assert_eq!(delays.first(), Some(&Duration::from_millis(1_000)), "half the cap at least");
        assert_eq!(delays.last(), Some(&cap), "the cap at most");
        assert!(delays.windows(2).all(|w| w[0] < w[1]), "spread: {delays:?}");
        // Never above the cap, and never under the first delay, whatever the jitter says.
        assert_eq!(capped(Duration::from_secs(20), true, Some(8_000), 7.0), cap);
        for j in [0.0, 0.5, 1.0] {
            assert_eq!(capped(Duration::from_secs(20), true, Some(1_000), j), INITIAL);
            assert_eq!(capped(Duration::from_secs(20), true, Some(600), j), INITIAL, "(250-ms cap)");
        }
        // A grown delay past a real Reconnect's cap lands within it.
        let mut r = Reconnect::default();
        r.welcomed(Some(8_000));
        for _ in 0..12 {
            let d = r.next(Duration::from_secs(1), true);
            assert!(d <= cap, "{d:?}");
        }
    }

    /// The cap bounded the sleep, not a dial: a hung dial took the handshake's 10 s and
    /// outlasted a LOST_AFTER_MS of 8 s. While the agent holds work, within LOST_AFTER_MS
    /// of losing the edge, each step is bounded by a quarter of it (at least 2 s).
    #[test]
    fn while_holding_work_a_dial_is_bounded_by_a_quarter_of_lost_after_ms() {
        let away = Duration::from_secs(1);
        assert_eq!(handshake_timeout(true, Some(8_000), away, 0), Duration::from_secs(2));
        assert_eq!(handshake_timeout(true, Some(20_000), away, 0), Duration::from_secs(5));
        // Never under the floor, never over the full timeout.
        assert_eq!(handshake_timeout(true, Some(1_000), Duration::from_millis(100), 0), DIAL_FLOOR);
        assert_eq!(handshake_timeout(true, Some(120_000), away, 0), HANDSHAKE_TIMEOUT);
        // Nothing held, an edge that did not say, or the work given up by the edge already
        // (away longer than LOST_AFTER_MS: a slow link must still get through): the full one.
        assert_eq!(handshake_timeout(false, Some(8_000), away, 0), HANDSHAKE_TIMEOUT);
        assert_eq!(handshake_timeout(true, None, away, 0), HANDSHAKE_TIMEOUT);
        assert_eq!(handshake_timeout(true, Some(8_000), Duration::from_secs(9), 0), HANDSHAKE_TIMEOUT);
        // Counted from the end of the last welcomed connection; never welcomed: the full one.
        let mut r = Reconnect::default();
        assert_eq!(r.handshake_timeout(true), HANDSHAKE_TIMEOUT);
        r.welcomed(Some(8_000));
        r.next(Duration::from_secs(1), true);
        assert_eq!(r.handshake_timeout(true), Duration::from_secs(2));
        assert_eq!(r.handshake_timeout(false), HANDSHAKE_TIMEOUT);
    }

    /// rev18: a link that needs 3 s for a handshake step (a satellite hop, a slow TLS
    /// proxy) with LOST_AFTER_MS 8 s: every step bounded at 2 s failed every dial until the
    /// agent had been away 8 s — the edge had given the work up by then — where before the
    /// bound it connected at the first dial. A step that timed out doubles the next dial's
    /// bound (up to the full one), until a welcome: the second dial gets 4 s and connects,
    /// and a hung dial still leaves time for another.
    #[test]
    fn a_step_that_timed_out_doubles_the_next_dials_bound() {
        let mut r = Reconnect::default();
        r.welcomed(Some(8_000));
        r.next(Duration::from_secs(1), true);
        assert_eq!(r.handshake_timeout(true), Duration::from_secs(2));
        r.step_timed_out();
        r.next(Duration::ZERO, true);
        assert_eq!(r.handshake_timeout(true), Duration::from_secs(4), "a 3 s link never gets through within the budget");
        r.step_timed_out();
        assert_eq!(r.handshake_timeout(true), Duration::from_secs(8));
        for _ in 0..40 {
            r.step_timed_out();
        }
        assert_eq!(r.handshake_timeout(true), HANDSHAKE_TIMEOUT, "never over the full timeout");
        // A welcome starts it over.
        r.welcomed(Some(8_000));
        r.next(Duration::from_secs(1), true);
        assert_eq!(r.handshake_timeout(true), Duration::from_secs(2));
    }

    /// soak2: the agent learned `LOST_AFTER_MS` only from the first welcome after its
    /// start, so one started holding results while the edge was unreachable grew its delay
    /// to 30 s (and more, jittered) and the edge gave those results up as lost. It starts
    /// capped by the value the last welcome before its start said (kept in DATA_DIR), and
    /// each dial step is bounded by a quarter of it until it has been away that long since
    /// its start.
    #[test]
    fn an_agent_started_remembering_lost_after_ms_caps_its_delay_before_any_welcome() {
        let mut r = Reconnect::remembering(Some(8_000));
        assert_eq!(r.handshake_timeout(true), Duration::from_secs(2));
        for _ in 0..12 {
            let d = r.next(Duration::from_secs(1), true);
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        // Nothing held: as before.
        assert!(grown(&mut Reconnect::remembering(Some(8_000)), false) >= Duration::from_secs(15));
        // Nothing remembered: never welcomed, uncapped.
        assert!(grown(&mut Reconnect::remembering(None), true) >= Duration::from_secs(15));
        // A welcome from an edge of before the field, after one that said it: uncapped.
        let mut r = Reconnect::remembering(Some(8_000));
        r.welcomed(None);
        assert!(grown(&mut r, true) >= Duration::from_secs(15));
        // A welcome that says another value wins over the remembered one.
        let mut r = Reconnect::remembering(Some(8_000));
        r.welcomed(Some(40_000));
        assert!(grown(&mut r, true) > Duration::from_secs(2));
    }

    /// A job of the agent's user can write the remembered value: the worst a planted one
    /// does is dial more often while the agent holds work. It only ever lowers a delay, to
    /// no less than the first delay (or the backoff's own, if less); a dial step is never
    /// under [`DIAL_FLOOR`], and is the full one once the agent has been away that long.
    #[test]
    fn a_remembered_lost_after_ms_only_lowers_delays_within_bounds() {
        for planted in [0, 1, 4, 1_000, 10_000, u64::MAX] {
            for grown in [100, 250, 400, 1_000, 5_000, 30_000, 45_000].map(Duration::from_millis) {
                for jitter in [0.0, 0.5, 1.0] {
                    let d = capped(grown, true, Some(planted), jitter);
                    assert!(d <= grown && d >= grown.min(INITIAL), "{planted} ms, {grown:?}: {d:?}");
                }
            }
            let held_since_start = handshake_timeout(true, Some(planted), Duration::ZERO, 0);
            assert!((DIAL_FLOOR..=HANDSHAKE_TIMEOUT).contains(&held_since_start), "{planted} ms: {held_since_start:?}");
        }
        let r = Reconnect::remembering(Some(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(r.handshake_timeout(true), HANDSHAKE_TIMEOUT, "away longer than the planted value");
    }

    /// The agent writes the value down only when a welcome changes it.
    #[test]
    fn a_welcome_says_whether_the_remembered_lost_after_ms_changed() {
        let mut r = Reconnect::remembering(Some(8_000));
        assert!(!r.welcomed(Some(8_000)));
        assert!(r.welcomed(Some(10_000)));
        assert!(!r.welcomed(Some(10_000)));
        assert!(r.welcomed(None));
        assert!(!r.welcomed(None));
        let mut r = Reconnect::remembering(None);
        assert!(r.welcomed(Some(10_000)));
    }

    /// rev19: a welcome that changed the value and could not write it down (DATA_DIR full
    /// at that moment) was never written at a later welcome saying the same: the file kept
    /// the old value (120 s where the edge now says 8 s), and an agent restarted holding
    /// results while the edge was down capped its delay from it — 30 s, the jobs lost.
    /// A value not kept is written again at the next welcome, until it is.
    #[test]
    fn a_value_that_could_not_be_kept_is_written_again_at_the_next_welcome() {
        let mut r = Reconnect::remembering(Some(120_000));
        assert!(r.welcomed(Some(8_000)));
        r.not_kept();
        r.next(Duration::from_secs(1), true);
        assert!(r.welcomed(Some(8_000)), "the disk still says 120 s");
        r.next(Duration::from_secs(1), true);
        assert!(!r.welcomed(Some(8_000)), "kept at the last welcome");
        // An edge of before the field, whose removal failed: removed again.
        assert!(r.welcomed(None));
        r.not_kept();
        assert!(r.welcomed(None));
    }

    #[test]
    fn without_work_held_the_delay_grows_as_before() {
        let mut r = Reconnect::default();
        r.welcomed(Some(10_000));
        assert!(grown(&mut r, false) >= Duration::from_secs(15));
        assert_eq!(capped(Duration::from_secs(20), false, Some(10_000), 0.0), Duration::from_secs(20));
    }

    #[test]
    fn an_edge_that_does_not_say_its_lost_after_ms_leaves_the_delay_uncapped() {
        let mut r = Reconnect::default();
        r.welcomed(None);
        assert!(grown(&mut r, true) >= Duration::from_secs(15));
        assert_eq!(capped(Duration::from_secs(20), true, None, 0.0), Duration::from_secs(20));
    }

    /// The first delay was 500 ms ±50 %: `..Default::default()` kept the backoff crate's
    /// 500-ms current interval, and [`INITIAL`] counted only after a reset. A fresh state's
    /// first delay is 250 ms jittered by half either way (checked on many: a 500-ms start
    /// lands there only one time in four).
    #[test]
    fn the_first_delay_is_250_ms_jittered_by_half() {
        for _ in 0..40 {
            let d = Reconnect::default().next(Duration::from_secs(1), false);
            assert!((Duration::from_millis(125)..=Duration::from_millis(375)).contains(&d), "{d:?}");
        }
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

    /// A 4005 before the welcome is the word of whoever answered at EDGE_URL, proven by
    /// no key: a hostile or broken peer answering every hello with it had the agent dial
    /// every 250 ms for ever. It starts the backoff over once between welcomes (an edge
    /// that began to stop during this handshake); again, the backoff grows.
    #[test]
    fn a_restart_said_before_the_welcome_starts_the_backoff_over_once_between_welcomes() {
        let mut r = Reconnect::default();
        r.welcomed(None);
        grown(&mut r, false);
        r.edge_restarting_before_welcome();
        assert!(r.next(Duration::from_millis(10), false) <= Duration::from_millis(375), "the first: over");
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            r.edge_restarting_before_welcome();
            last = r.next(Duration::from_millis(10), false);
        }
        assert!(last >= Duration::from_secs(15), "every hello answered with 4005: dialed again after {last:?}");
        // A welcome proves the edge: its next stop before a welcome starts it over again.
        r.welcomed(None);
        r.next(Duration::from_secs(1), false);
        grown(&mut r, false);
        r.edge_restarting_before_welcome();
        assert!(r.next(Duration::from_millis(10), false) <= Duration::from_millis(375));
        // A stop of an established connection (after a signed welcome) always does.
        grown(&mut r, false);
        r.edge_restarting();
        assert!(r.next(Duration::from_millis(10), false) <= Duration::from_millis(375));
    }

    /// Review: `retry after <ms> ms` in a `DUPLICATE` refusal comes before the welcome, the
    /// word of whoever answered at EDGE_URL: a peer saying `0` after every hello had the
    /// agent dial, and log the refusal at error, every 250 ms for ever. A told wait is
    /// never under two seconds, nor over the backoff's longest.
    #[test]
    fn a_told_wait_is_bounded_whatever_the_peer_says() {
        for ms in [0, 1, 250, 1_999] {
            assert_eq!(told(Duration::from_millis(ms)), Duration::from_secs(2), "{ms}");
        }
        assert_eq!(told(Duration::from_millis(4_950)), Duration::from_millis(4_950));
        assert_eq!(told(Duration::from_millis(u64::MAX)), MOST);
    }
}
