//! When `submit` follows a job's event stream again, and when it gives up: pure, the clock
//! and the dice passed in, so that an edge away for minutes is tested in no time.
//!
//! A follow that brought something (an event, or a stream that stayed open a keep-alive
//! interval) is followed again soon after it ends: streams break (a Tunnel's cut, an edge
//! restarted) however well the job runs. Follows that bring nothing (no answer, a 5xx or
//! `429`, a stream that stopped at once with no event) are tried again further and further
//! apart, 1 s, 2 s, 4 s … at most 30 s, each jittered so that the `submit`s of many jobs do
//! not all follow again at once when their edge comes back; `submit` gives up only once no
//! follow has brought anything for the budget (`--follow-for`, [`DEFAULT_FOLLOW_FOR`]),
//! cutting the follow under way then ([`Schedule::cut_at`]). Ten
//! fruitless follows 2 s apart (some 20 s) gave up on a job through any restart longer than
//! that (an image pulled, a host rebooted, a Tunnel reconnecting) while the edge kept it.

use std::time::{Duration, Instant};

/// The wait before following again after a follow that brought something, and after the
/// first that brought nothing; doubled after each fruitless follow up to [`LONGEST_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// The longest wait between follows: an edge back after a long absence is followed again
/// within it.
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// How long a stream's silence may last and the stream still be an edge talking: the
/// edges send a keep-alive after at most [`shared::contract::SSE_KEEPALIVE_MS`] of it, and
/// one sent on time may come some seconds later still (the edge's timer, a Tunnel, a
/// retransmitted segment). Past it a keep-alive is overdue; past three intervals `submit`
/// takes the connection for dead.
pub const KEEPALIVE_WINDOW: Duration = Duration::from_millis(shared::contract::SSE_KEEPALIVE_MS + 5_000);

/// How late a cut may fire and still be one `submit` waited through: a timer fires within
/// milliseconds, on a loaded machine within a second or two. Later, `submit` was not
/// running (stopped with Ctrl-Z, a paused container, a frozen cgroup): see [`overslept`].
pub const LATE_CUT: Duration = Duration::from_secs(5);

/// How long `submit` follows an edge that brings nothing unless told (`--follow-for`, as
/// written there): an edge's restart (an image pulled, a host rebooted) takes minutes.
pub const DEFAULT_FOLLOW_FOR: &str = "10m";

/// What to do once a follow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Follow again after `after`. `lost`: this follow was the first in a row to bring
    /// nothing (the edge is away: say so once, not at every try).
    Follow { after: Duration, lost: bool },
    /// No follow has brought anything for the whole budget.
    GiveUp,
}

/// The follows of one job: since when none has brought anything, and how many in a row.
#[derive(Debug)]
pub struct Schedule {
    /// `None`: never give up.
    budget: Option<Duration>,
    /// When a follow last brought something (or the job was taken): the last event or byte
    /// that counted, or the end of a stream the edge ended (told by [`Schedule::brought`]),
    /// never the end of a silence (a stream taken for dead brought nothing in it).
    since: Instant,
    /// Follows in a row that brought nothing.
    fruitless: u32,
    /// Whether the follow under way has brought something.
    brought: bool,
}

impl Schedule {
    /// The follows of a job the edge took at `now`; `budget` `None` never gives up.
    pub fn new(budget: Option<Duration>, now: Instant) -> Schedule {
        Schedule { budget, since: now, fruitless: 0, brought: false }
    }

    /// The follow under way brought something at `now` (called as often as it does). True
    /// once, when it is the first to since follows brought nothing: the edge is back.
    pub fn brought(&mut self, now: Instant) -> bool {
        self.brought = true;
        self.since = now;
        std::mem::take(&mut self.fruitless) > 0
    }

    /// When the follow under way is cut and `submit` gives up (`None`: never, no budget):
    /// once nothing was brought for the budget, and, if a stream is open, once it has been
    /// silent for [`KEEPALIVE_WINDOW`] too. `heard`: when that stream last spoke (its head,
    /// then each byte), `None` while there is none (connecting, waiting for the head).
    /// Without it the follow under way finished first, a connection attempt's 30 s or a
    /// silent stream's 45 s after the budget; a stream whose last byte is within the
    /// window is an edge still talking, and its next keep-alive (once the stream has
    /// lasted an interval, every byte brings something) moves the budget on.
    /// A budget whose end is past the clock's (`--follow-for` takes any `u64` of seconds)
    /// never runs out: `None`, as no budget.
    pub fn cut_at(&self, heard: Option<Instant>) -> Option<Instant> {
        let end = self.since.checked_add(self.budget?)?;
        Some(heard.and_then(|heard| heard.checked_add(KEEPALIVE_WINDOW)).map_or(end, |window| end.max(window)))
    }

    /// The follow under way ended at `now`; `dice` is a random number (the jitter).
    pub fn ended(&mut self, now: Instant, dice: u32) -> Next {
        if std::mem::take(&mut self.brought) {
            // The budget counts from what the stream last brought, not from its start (one
            // that ran an hour is no reason to give up at the first follow after it), nor
            // from its end: one taken for dead ends 45 s of silence after its last byte,
            // and counted from then `submit` gave up that much after `--follow-for`.
            return Next::Follow { after: jittered(FIRST_WAIT, dice), lost: false };
        }
        self.fruitless = self.fruitless.saturating_add(1);
        let away = now.saturating_duration_since(self.since);
        let wait = jittered(FIRST_WAIT.saturating_mul(1 << (self.fruitless - 1).min(16)).min(LONGEST_WAIT), dice);
        let after = match self.budget {
            Some(budget) if away >= budget => return Next::GiveUp,
            // The last follow comes as the budget ends, not up to a wait after it.
            Some(budget) => wait.min(budget - away),
            None => wait,
        };
        Next::Follow { after, lost: self.fruitless == 1 }
    }
}

/// Whether a cut due at `cut` ([`Schedule::cut_at`]) that fired at `now` came past
/// [`LATE_CUT`]: `submit` did not run meanwhile, so the silence is none it saw — what the
/// edge sent then (the result, as often as not) waits unread in its socket, and cut there
/// it was lost. The follow under way is given a keep-alive window from `now` instead.
pub fn overslept(cut: Instant, now: Instant) -> bool {
    now.saturating_duration_since(cut) > LATE_CUT
}

/// Between half of `wait` and all of it, by `dice` ("equal jitter"): never in lockstep
/// with other `submit`s, never much sooner than the schedule says.
fn jittered(wait: Duration, dice: u32) -> Duration {
    let half = wait / 2;
    half + half.mul_f64(f64::from(dice) / f64::from(u32::MAX))
}

/// `--follow-for`: whole seconds (`600`), or a number with `s`, `m` or `h` (`90s`, `10m`,
/// `2h`); `0` (zero: never give up) as well.
pub fn parse_budget(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let per = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        _ => 0,
    };
    let seconds = number.parse::<u64>().ok().filter(|_| per > 0).and_then(|n| n.checked_mul(per));
    match seconds {
        Some(s) => Ok(Duration::from_secs(s)),
        None => Err(format!(
            "`{text}` is not a time to follow for: write seconds (600) or a number with s, m or h (90s, 10m, 2h); \
             0 follows until the result however long the edge is away"
        )),
    }
}

/// A budget as a person reads it: `10 min`, `90 s`, `2 h`.
pub fn shown(budget: Duration) -> String {
    match budget.as_secs() {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOON: u32 = 0;
    const DEFAULT_BUDGET: Duration = Duration::from_secs(600);
    const LATE: u32 = u32::MAX;

    /// Follows that bring nothing, each at once (a refused connection): the waits a
    /// schedule gives, with the clock moved by each, until it gives up; and when.
    fn away_until_given_up(budget: Option<Duration>, dice: u32, most: usize) -> (Vec<Duration>, Option<Duration>) {
        let start = Instant::now();
        let mut schedule = Schedule::new(budget, start);
        let (mut now, mut waits) = (start, Vec::new());
        for _ in 0..most {
            match schedule.ended(now, dice) {
                Next::Follow { after, .. } => {
                    waits.push(after);
                    now += after;
                }
                Next::GiveUp => return (waits, Some(now - start)),
            }
        }
        (waits, None)
    }

    #[test]
    fn fruitless_follows_back_off_to_thirty_seconds() {
        let secs = |d: Vec<Duration>| d.iter().map(Duration::as_secs_f64).collect::<Vec<_>>();
        let (waits, _) = away_until_given_up(None, LATE, 8);
        assert_eq!(secs(waits), [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
        // Jittered down to half, never below.
        let (waits, _) = away_until_given_up(None, SOON, 8);
        assert_eq!(secs(waits), [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]);
        let (waits, _) = away_until_given_up(None, LATE / 2, 8);
        for (wait, most) in waits.iter().zip([1, 2, 4, 8, 16, 30, 30, 30]) {
            assert!(wait.as_secs_f64() > most as f64 / 2.0 && wait.as_secs_f64() < most as f64, "{waits:?}");
        }
    }

    /// The old rule gave up after ten fruitless follows 2 s apart, some 20 s: an edge away
    /// for minutes (an image pulled, a host rebooted) lost `submit` its job.
    #[test]
    fn an_edge_away_for_minutes_is_followed_until_the_budget_ends() {
        for dice in [SOON, LATE / 3, LATE] {
            let (waits, gave_up) = away_until_given_up(Some(DEFAULT_BUDGET), dice, 10_000);
            assert_eq!(gave_up, Some(DEFAULT_BUDGET), "dice {dice}: {waits:?}");
            assert!(waits.len() > 10 && waits.iter().all(|w| *w <= LONGEST_WAIT), "{waits:?}");
        }
        // A short budget: the last follow comes as it ends.
        let (waits, gave_up) = away_until_given_up(Some(Duration::from_secs(3)), LATE, 100);
        assert_eq!((waits, gave_up), (vec![Duration::from_secs(1), Duration::from_secs(2)], Some(Duration::from_secs(3))));
        // No budget: never.
        assert_eq!(away_until_given_up(None, LATE, 10_000).1, None);
    }

    /// Follows that each take their time to bring nothing (a connection attempt that waits
    /// out its limit) count their time too: the budget is of the clock, not of tries.
    #[test]
    fn slow_fruitless_follows_count_their_time() {
        let start = Instant::now();
        let mut schedule = Schedule::new(Some(Duration::from_secs(60)), start);
        let mut now = start + Duration::from_secs(40);
        let Next::Follow { after, .. } = schedule.ended(now, LATE) else { panic!("gave up at 40 s of 60") };
        now += after + Duration::from_secs(40);
        assert_eq!(schedule.ended(now, LATE), Next::GiveUp);
    }

    /// Only the first fruitless follow in a row says the edge is lost, and only the first
    /// follow to bring something after it says it is back: one line each, not one a try.
    #[test]
    fn the_edge_is_said_lost_once_and_back_once() {
        let start = Instant::now();
        let mut schedule = Schedule::new(Some(DEFAULT_BUDGET), start);
        let mut now = start;
        assert!(!schedule.brought(now), "the first follow's events are no return");
        now += Duration::from_secs(3600);
        schedule.brought(now);
        assert_eq!(schedule.ended(now, LATE), Next::Follow { after: FIRST_WAIT, lost: false });
        let mut lost = Vec::new();
        for _ in 0..5 {
            match schedule.ended(now, LATE) {
                Next::Follow { after, lost: said } => {
                    lost.push(said);
                    now += after;
                }
                Next::GiveUp => panic!("gave up after {now:?}"),
            }
        }
        assert_eq!(lost, [true, false, false, false, false]);
        assert!(schedule.brought(now), "back");
        assert!(!schedule.brought(now), "said once");
        // Back: the backoff and the budget start over from what this stream last brought.
        now += Duration::from_secs(3600);
        schedule.brought(now);
        assert_eq!(schedule.ended(now, LATE), Next::Follow { after: FIRST_WAIT, lost: false });
        assert_eq!(schedule.ended(now, LATE), Next::Follow { after: FIRST_WAIT, lost: true });
        assert_eq!(schedule.ended(now + DEFAULT_BUDGET - Duration::from_secs(1), LATE), Next::Follow { after: Duration::from_secs(1), lost: false });
        assert_eq!(schedule.ended(now + DEFAULT_BUDGET, LATE), Next::GiveUp);
    }

    /// A stream that ran for an hour and broke is not a reason to give up at the first
    /// follow after it that brings nothing: the budget counts from the last thing it
    /// brought (its keep-alives all along, its end when the edge ended it).
    #[test]
    fn the_budget_counts_from_the_last_stream_that_ran() {
        let start = Instant::now();
        let mut schedule = Schedule::new(Some(Duration::from_secs(60)), start);
        schedule.brought(start);
        let end = start + Duration::from_secs(3600);
        schedule.brought(end);
        assert_eq!(schedule.ended(end, LATE), Next::Follow { after: FIRST_WAIT, lost: false });
        assert!(matches!(schedule.ended(end + Duration::from_secs(1), LATE), Next::Follow { lost: true, .. }));
    }

    /// A stream taken for dead ends some 45 s after its last byte (`submit`'s
    /// FOLLOW_SILENCE): the budget counted from that end, so `submit` gave up 45 s late.
    /// Its silence brought nothing: the budget counts from its last byte.
    #[test]
    fn the_budget_counts_from_a_dead_streams_last_byte_not_its_end() {
        let start = Instant::now();
        let budget = Duration::from_secs(60);
        let mut schedule = Schedule::new(Some(budget), start);
        let last_byte = start + Duration::from_secs(3600);
        schedule.brought(last_byte);
        let taken_for_dead = last_byte + Duration::from_secs(45);
        assert_eq!(schedule.ended(taken_for_dead, LATE), Next::Follow { after: FIRST_WAIT, lost: false });
        // Fruitless follows from then on, each at once: given up a minute after the last byte.
        let mut now = taken_for_dead + FIRST_WAIT;
        while let Next::Follow { after, .. } = schedule.ended(now, LATE) {
            now += after;
        }
        assert_eq!(now, last_byte + budget);
    }

    /// The follow under way when the budget runs out was let finish before the schedule
    /// was asked: a connection attempt (up to 30 s), a stream silent after its head (45 s
    /// before taken for dead), so `submit` gave up that much after `--follow-for`. It is
    /// cut as the budget ends: one with no stream yet at once, one whose stream spoke
    /// within the keep-alive window once that window has passed too.
    #[test]
    fn the_follow_under_way_is_cut_as_the_budget_ends() {
        let start = Instant::now();
        let budget = Duration::from_secs(60);
        let mut schedule = Schedule::new(Some(budget), start);
        // Connecting, or waiting for the head: cut at the budget's end, and the schedule
        // agrees it is time to give up.
        assert_eq!(schedule.cut_at(None), Some(start + budget));
        assert_eq!(schedule.ended(start + budget, LATE), Next::GiveUp);
        // A stream whose head came 10 s before the end and nothing since: an edge still
        // talking until a keep-alive is overdue, then cut.
        let head = start + budget - Duration::from_secs(10);
        assert_eq!(schedule.cut_at(Some(head)), Some(head + KEEPALIVE_WINDOW));
        // A stream that spoke long before the end: cut at the end.
        assert_eq!(schedule.cut_at(Some(start)), Some(start + budget));
        // What a follow brings moves the end.
        let event = start + Duration::from_secs(3600);
        schedule.brought(event);
        assert_eq!(schedule.cut_at(Some(event)), Some(event + budget));
        assert_eq!(schedule.cut_at(None), Some(event + budget));
        // No budget: never.
        assert_eq!(Schedule::new(None, start).cut_at(Some(start)), None);
        assert_eq!(Schedule::new(None, start).cut_at(None), None);
    }

    /// A budget shorter than a keep-alive interval cuts no stream that keeps talking: a
    /// quiet job's stream, its head at once and a keep-alive each interval, each of them
    /// (after the first interval) bringing something.
    #[test]
    fn a_short_budget_cuts_no_stream_that_keeps_talking() {
        let start = Instant::now();
        let keepalive = Duration::from_millis(shared::contract::SSE_KEEPALIVE_MS);
        let mut schedule = Schedule::new(Some(Duration::from_secs(5)), start);
        let mut heard = start;
        for n in 1..=20 {
            // Each keep-alive a little late, but within the window.
            let next = heard + keepalive + KEEPALIVE_WINDOW.saturating_sub(keepalive) / 2;
            assert!(schedule.cut_at(Some(heard)).unwrap() > next, "keep-alive {n} cut");
            schedule.brought(next);
            heard = next;
        }
        // Silent past the window: cut.
        assert_eq!(schedule.cut_at(Some(heard)), Some(heard + KEEPALIVE_WINDOW));
        assert!(KEEPALIVE_WINDOW > keepalive && KEEPALIVE_WINDOW < 3 * keepalive, "between one interval and dead");
    }

    /// `--follow-for` takes any number of seconds `u64` holds (`CLAUDE_RUNNER_FOLLOW_FOR`
    /// too): the cut, the budget's end as an `Instant`, overflowed the clock and `submit`
    /// panicked once the job was taken ("overflow when adding duration to instant"). A
    /// budget past the clock's end never runs out: nothing is cut.
    #[test]
    fn a_budget_past_the_clocks_end_cuts_nothing() {
        let start = Instant::now();
        for text in ["18446744073709551615", "5124095576030431h"] {
            let budget = parse_budget(text).unwrap();
            let mut schedule = Schedule::new(Some(budget), start);
            assert_eq!(schedule.cut_at(None), None, "{text}");
            assert_eq!(schedule.cut_at(Some(start)), None, "{text}");
            assert_eq!(schedule.ended(start, LATE), Next::Follow { after: FIRST_WAIT, lost: true });
        }
    }

    /// A cut that fires on time, or a loaded machine's second or two late, is one `submit`
    /// waited through; one that fires long after it was due is not.
    #[test]
    fn only_a_cut_long_past_its_time_is_overslept() {
        let cut = Instant::now();
        assert!(!overslept(cut, cut));
        assert!(!overslept(cut, cut - Duration::from_secs(1)));
        assert!(!overslept(cut, cut + LATE_CUT));
        assert!(overslept(cut, cut + LATE_CUT + Duration::from_millis(1)));
        assert!(LATE_CUT < KEEPALIVE_WINDOW);
    }

    #[test]
    fn follow_for_reads_seconds_or_a_unit() {
        let secs = |s: u64| Ok(Duration::from_secs(s));
        assert_eq!(parse_budget("600"), secs(600));
        assert_eq!(parse_budget("90s"), secs(90));
        assert_eq!(parse_budget("10m"), secs(600));
        assert_eq!(parse_budget("10min"), secs(600));
        assert_eq!(parse_budget("2h"), secs(7200));
        assert_eq!(parse_budget("0"), secs(0));
        assert_eq!(parse_budget("0m"), secs(0));
        for bad in ["", "m", "-5", "1.5m", "10 d", "ten", "99999999999999999999", "18446744073709551615h"] {
            let err = parse_budget(bad).unwrap_err();
            assert!(err.contains("90s, 10m, 2h") && err.contains("0 follows"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_budget_reads_as_a_person_writes_it() {
        assert_eq!(parse_budget(DEFAULT_FOLLOW_FOR), Ok(DEFAULT_BUDGET));
        assert_eq!(shown(DEFAULT_BUDGET), "10 min");
        assert_eq!(shown(Duration::from_secs(90)), "90 s");
        assert_eq!(shown(Duration::from_secs(3)), "3 s");
        assert_eq!(shown(Duration::from_secs(7200)), "2 h");
        assert_eq!(shown(Duration::from_secs(5400)), "90 min");
    }
}
