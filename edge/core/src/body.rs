//! Reading a request body: how much is kept, how much of an oversized one is read on, and
//! what an upload that broke off means. Hosts feed the chunks they receive to an
//! [`Intake`] and stop when it says so; the [`Body`] it ends with is what the HTTP routing
//! answers from, so both hosts answer an oversized or broken upload the same way.
//!
//! Bodies being read are bounded together, not only each alone: every [`Intake`] of a
//! request holds its bytes against the process's bodies in flight ([`Bound`]), so that a
//! caller holding many uploads half sent — each one allowed, held until its time is up —
//! cannot take the edge's memory (a Worker isolate's 128 MB), nor another caller's part, nor
//! another pool's.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// How much of an oversized body is read (and dropped, never held) so the caller is still
/// listening when its 413 comes: answering while the caller still sends makes the
/// connection reset, and the caller would see a network error instead of what to fix.
/// Past this the caller is simply cut off.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// How much of a refused request's body (no secret, unknown route) is read, and for how
/// long, before the refusal is answered. Nothing is kept; the bound is small so a caller
/// without the secret cannot make the edge read or wait, yet large enough that a caller
/// that sent an ordinary small request with a wrong secret reads its 403 rather than a
/// reset connection (a runtime that answers while request bytes sit unread may reset it).
pub const REFUSAL_DRAIN_LIMIT: usize = 16 * 1024;
pub const REFUSAL_DRAIN_MS: u64 = 1_000;

/// How long a body may take at the least, counted from when the host starts reading it
/// (its request's head read): as long as a head may take (the native edge's
/// `HEADER_READ_TIMEOUT`), so a small body on a slow link is never cut short.
pub const BODY_FLOOR_MS: u64 = 30_000;

/// The slowest a body may arrive past [`BODY_FLOOR_MS`], in bytes a second: 64 kbit/s, a
/// poor mobile link. A 1 MiB body (`MAX_BODY_BYTES`'s default) gets 158 s in all.
pub const BODY_MIN_BYTES_PER_SEC: u64 = 8 * 1024;

/// How long a host waits for a body of `declared` bytes (its `Content-Length`; `None` for a
/// chunked one), the edge keeping at most `limit` (`MAX_BODY_BYTES`), before it gives up on
/// it ([`Intake::timed_out`]). Why: a request whose head arrived and whose body never does
/// (a `Content-Length` never reached, a body trickled a byte a minute, an `Expect:
/// 100-continue` answered and nothing sent) held its connection — busy, a caller's with the
/// secret — for ever. The time grows with the body so an honest slow upload finishes; a
/// body of unknown length, or one past the limit (only heard out so its 413 is read), is
/// given the limit's time: past the limit, nothing it sends is kept anyway.
pub fn read_within_ms(declared: Option<u64>, limit: usize) -> u64 {
    let expected = declared.unwrap_or(limit as u64).min(limit as u64);
    BODY_FLOOR_MS.saturating_add(expected.saturating_mul(1000) / BODY_MIN_BYTES_PER_SEC)
}

/// A request body as the edge saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Bytes(Vec<u8>),
    /// Over `MAX_BODY_BYTES`: answered 413.
    TooLarge,
    /// The upload broke off or could not be read: answered 400, send it again.
    Broken(String),
    /// The body did not arrive within the `ms` the host gave it ([`read_within_ms`]):
    /// answered 408 and its connection closed, send it again.
    TimedOut { ms: u64 },
}

/// What the host does after feeding a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read the next chunk.
    Read,
    /// Stop reading and answer now (the body is over the drain limit).
    Stop,
}

/// The bodies being read in this process — on the Worker its isolate, whose memory every
/// object in it shares — counted together and by holder ([`Intake::reserve`]).
#[derive(Debug)]
pub struct InFlight(Mutex<Held>);

#[derive(Debug)]
struct Held {
    /// By holder, as the host names it (pool and secret): only holders with bytes in flight.
    by_holder: BTreeMap<String, usize>,
    /// By pool (a Worker's isolate serves several): only pools with bytes in flight.
    by_pool: BTreeMap<String, usize>,
    /// Each pool's whole ([`Bound::whole`]: pools may have their own values), as its
    /// latest body reserved said: the process may hold what the largest of those with
    /// bytes in flight lets in ([`crate::http::pool_past_its_share`]).
    whole_by_pool: BTreeMap<String, usize>,
}

impl Held {
    fn add(&mut self, pool: &str, holder: &str, bytes: usize) {
        for (map, key) in [(&mut self.by_holder, holder), (&mut self.by_pool, pool)] {
            *map.entry(key.to_string()).or_default() += bytes;
        }
    }

    fn take(&mut self, pool: &str, holder: &str, bytes: usize) {
        for (map, key) in [(&mut self.by_holder, holder), (&mut self.by_pool, pool)] {
            if let Some(mine) = map.get_mut(key) {
                *mine = mine.saturating_sub(bytes);
                if *mine == 0 {
                    map.remove(key);
                }
            }
        }
        if !self.by_pool.contains_key(pool) {
            self.whole_by_pool.remove(pool);
        }
    }
}

/// Every body being read in this process.
static IN_FLIGHT: InFlight = InFlight::new();

impl InFlight {
    pub(crate) const fn new() -> InFlight {
        InFlight(Mutex::new(Held { by_holder: BTreeMap::new(), by_pool: BTreeMap::new(), whole_by_pool: BTreeMap::new() }))
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // A panic elsewhere leaves counts, never a half-made entry: go on with them.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The bytes in flight: all, and `holder`'s.
    #[cfg(test)]
    fn bytes(&self, holder: &str) -> (usize, usize) {
        let held = self.lock();
        (held.by_pool.values().sum(), held.by_holder.get(holder).copied().unwrap_or(0))
    }
}

/// What the bodies being read may hold: `whole` bytes together (`MAX_PENDING_BYTES`: what
/// the jobs they become may hold too), each of the `holders` sharing it (the pool's
/// callers as one and each named caller: [`crate::http::owners`], the secrets a body is
/// read for) an equal share ([`crate::http::equal_share`]) — and always one body, if the
/// whole has room for it (a share may be less than `MAX_BODY_BYTES`). The `pools` the edge
/// serves ([`crate::config::Config::pools`]) share the process's bodies as they share its
/// jobs not ended: `whole` in all, each its own part ([`crate::http::pool_past_its_share`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub whole: usize,
    pub holders: usize,
    pub pools: usize,
}

impl Bound {
    pub fn share(&self) -> usize {
        crate::http::equal_share(self.whole, self.holders)
    }

    /// The pool's own part of the process's bodies in flight ([`crate::http::own_part`]).
    pub fn own_part(&self) -> usize {
        usize::try_from(crate::http::own_part(bytes(self.whole), self.pools)).unwrap_or(usize::MAX)
    }
}

/// A count of bytes in memory, as the rule the pools share counts them.
fn bytes(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A body refused before any of it is read, for the bodies in flight: 429.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crowded {
    /// What the body would hold ([`Intake::reserve`]).
    pub wanted: usize,
    /// What its holder's bodies hold already.
    pub mine: usize,
    /// What its pool's bodies hold already.
    pub ours: usize,
    /// Which bound it would pass.
    pub past: Past,
    pub bound: Bound,
}

/// The bound a body refused for the bodies in flight would pass ([`Crowded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Past {
    /// Its holder's equal share ([`Bound::share`]).
    Share,
    /// Its pool's whole ([`Bound::whole`]).
    Whole,
    /// Its pool's own part of the process's bodies ([`Bound::own_part`]), the other pools
    /// holding or keeping the rest.
    Part,
    /// Within its pool's own part, the bound the pools share: another pool holds a body
    /// let in alone larger than the room its part leaves ([`crate::http::PastShare::within`]).
    Beside,
}

/// What one body holds of the bodies in flight; given back when it is dropped (its body
/// finished, refused, or its connection gone).
#[derive(Debug)]
struct Charge {
    in_flight: &'static InFlight,
    pool: String,
    holder: String,
    bytes: usize,
}

impl Charge {
    /// The body holds `bytes` now, more than reserved only if it outgrew what its host said
    /// it would be: counted whatever the bound, as that memory is held anyway.
    fn cover(&mut self, bytes: usize) {
        if bytes <= self.bytes {
            return;
        }
        let more = bytes - self.bytes;
        self.in_flight.lock().add(&self.pool, &self.holder, more);
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.in_flight.lock().take(&self.pool, &self.holder, self.bytes);
    }
}

/// One body being read.
#[derive(Debug)]
pub struct Intake {
    limit: usize,
    drain: usize,
    bytes: Vec<u8>,
    /// What its buffer may grow to before it outgrows its reservation.
    reserved: usize,
    /// Its part of the bodies in flight (none for a refused request's: nothing is kept).
    charge: Option<Charge>,
    seen: usize,
    broken: Option<String>,
    timed_out: Option<u64>,
}

impl Intake {
    /// A body of an uncounted limit, for tests of what is kept.
    #[cfg(test)]
    pub(crate) fn new(limit: usize) -> Intake {
        Intake::with(limit, DRAIN_LIMIT, limit, None)
    }

    fn with(limit: usize, drain: usize, reserved: usize, charge: Option<Charge>) -> Intake {
        Intake { limit, drain, bytes: Vec::new(), reserved, charge, seen: 0, broken: None, timed_out: None }
    }

    /// The body of a request about to be refused: nothing kept, at most
    /// [`REFUSAL_DRAIN_LIMIT`] read (hosts also stop after [`REFUSAL_DRAIN_MS`]).
    pub fn refused() -> Intake {
        Intake::with(0, REFUSAL_DRAIN_LIMIT, 0, None)
    }

    /// A body of `holder`'s (the host's name for it: pool and secret) to be read, at most
    /// `limit` (`MAX_BODY_BYTES`) kept: it holds `min(declared, limit)` of the process's
    /// bodies in flight from the start (`declared` is its `Content-Length`; `None`, a
    /// chunked body, holds the limit), or it is refused ([`Crowded`]) before any of it is
    /// read. Reserved up front, not charged as it comes: a body refused half way would
    /// have been read for nothing, and its buffer grows to the reservation and no further,
    /// where a growing buffer doubled — a 1 MiB body held nearly 2.
    pub fn reserve(limit: usize, declared: Option<u64>, pool: &str, holder: &str, bound: Bound) -> Result<Intake, Crowded> {
        Intake::reserve_in(&IN_FLIGHT, limit, declared, pool, holder, bound)
    }

    pub(crate) fn reserve_in(
        in_flight: &'static InFlight,
        limit: usize,
        declared: Option<u64>,
        pool: &str,
        holder: &str,
        bound: Bound,
    ) -> Result<Intake, Crowded> {
        let wanted = declared.map_or(limit, |d| usize::try_from(d).unwrap_or(usize::MAX).min(limit));
        let mut held = in_flight.lock();
        let mine = held.by_holder.get(holder).copied().unwrap_or(0);
        let ours = held.by_pool.get(pool).copied().unwrap_or(0);
        let crowded = |past: Past| Crowded { wanted, mine, ours, past, bound };
        // A holder with nothing in flight may always start one body, if its pool's whole
        // has room.
        if mine > 0 && mine.saturating_add(wanted) > bound.share() {
            return Err(crowded(Past::Share));
        }
        if ours.saturating_add(wanted) > bound.whole {
            return Err(crowded(Past::Whole));
        }
        // The pools of one process (a Worker's isolate) share it as they share its jobs
        // not ended ([`crate::http::pool_past_its_share`]; review rev27, 1: one pool's
        // uploads filled it, and every other pool's bodies were refused; then the process
        // held twice the whole).
        let whole_of = |p: &str| held.whole_by_pool.get(p).copied().unwrap_or(bound.whole);
        let others: Vec<crate::http::OtherPool> = held
            .by_pool
            .iter()
            .filter(|(p, _)| *p != pool)
            .map(|(p, n)| crate::http::OtherPool { holds: bytes(*n), bound: bytes(whole_of(p)) })
            .collect();
        if let Some(past) = crate::http::pool_past_its_share(bytes(ours), &others, bytes(wanted), bytes(bound.whole), bound.pools) {
            return Err(crowded(if past.within { Past::Beside } else { Past::Part }));
        }
        held.add(pool, holder, wanted);
        held.whole_by_pool.insert(pool.to_string(), bound.whole);
        drop(held);
        let charge = Charge { in_flight, pool: pool.to_string(), holder: holder.to_string(), bytes: wanted };
        Ok(Intake::with(limit, DRAIN_LIMIT, wanted, Some(charge)))
    }

    /// The time this body is given to arrive: [`read_within_ms`] of what it reserved (its
    /// declared length, at most the limit; the limit for a chunked one). Both hosts stop
    /// reading then and answer 408.
    pub fn within_ms(&self) -> u64 {
        read_within_ms(Some(self.reserved as u64), self.limit)
    }

    pub fn chunk(&mut self, chunk: &[u8]) -> Next {
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.limit {
            // Over the limit: nothing more is kept (nor held against the bodies in flight),
            // but the caller is heard out.
            self.bytes = Vec::new();
            self.charge = None;
            return if self.seen > self.drain { Next::Stop } else { Next::Read };
        }
        let needed = self.bytes.len() + chunk.len();
        if needed > self.bytes.capacity() {
            // Doubling, as a growing buffer does, but never past the reservation unless
            // the body outgrows it.
            let to = needed.max(self.bytes.capacity().saturating_mul(2)).min(self.reserved.max(needed));
            self.bytes.reserve_exact(to - self.bytes.len());
            let capacity = self.bytes.capacity();
            if let Some(charge) = &mut self.charge {
                charge.cover(capacity);
            }
        }
        self.bytes.extend_from_slice(chunk);
        Next::Read
    }

    /// What a host's body stream gave next: a chunk, or the error it broke off with.
    pub fn take(&mut self, next: Result<&[u8], String>) -> Next {
        match next {
            Ok(chunk) => self.chunk(chunk),
            Err(why) => {
                self.failed(why);
                Next::Stop
            }
        }
    }

    /// The upload failed (the connection broke, the runtime refused the stream).
    pub fn failed(&mut self, why: impl Into<String>) {
        self.broken.get_or_insert_with(|| why.into());
    }

    /// The body did not arrive within the `ms` the host gave it ([`read_within_ms`]).
    pub fn timed_out(&mut self, ms: u64) {
        self.timed_out.get_or_insert(ms);
    }

    pub fn finish(self) -> Body {
        // Too large wins: the caller must shorten it whatever else went wrong.
        if self.seen > self.limit {
            Body::TooLarge
        } else if let Some(ms) = self.timed_out {
            Body::TimedOut { ms }
        } else if let Some(why) = self.broken {
            Body::Broken(why)
        } else {
            Body::Bytes(self.bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_body_within_the_limit() {
        let mut i = Intake::new(5);
        assert_eq!(i.chunk(b"ab"), Next::Read);
        assert_eq!(i.chunk(b"cde"), Next::Read);
        assert_eq!(i.finish(), Body::Bytes(b"abcde".to_vec()));
    }

    /// Two bodies of the limit each, on a bound of one and a half: the second is refused
    /// before any of it is read, until the first is done. Before, each body was its own
    /// buffer and nothing bounded them together: 400 uploads held half sent took a native
    /// edge to 770 MiB, and a Worker isolate past its 128 MB.
    #[test]
    fn bodies_in_flight_are_held_to_the_bound_together() {
        static IN_FLIGHT: InFlight = InFlight::new();
        let limit = 1000;
        let bound = Bound { whole: limit * 3 / 2, holders: 2, pools: 1 };
        let reserve = |holder: &str, declared: Option<u64>| Intake::reserve_in(&IN_FLIGHT, limit, declared, "p", holder, bound);
        let mut first = reserve("a", Some(limit as u64)).expect("the first fits");
        assert_eq!(first.chunk(&vec![b' '; limit]), Next::Read);
        let crowded = reserve("b", Some(limit as u64)).expect_err("the second would pass the bound");
        assert_eq!((crowded.wanted, crowded.ours, crowded.past), (limit, limit, Past::Whole));
        assert!(reserve("b", None).is_err(), "a chunked body holds the limit");
        let small = reserve("b", Some(400)).expect("a body within what is left fits");
        assert_eq!(first.finish(), Body::Bytes(vec![b' '; limit]));
        drop(small);
        assert_eq!(IN_FLIGHT.bytes("a"), (0, 0), "finished and dropped bodies hold nothing");
        let mut second = reserve("b", Some(limit as u64)).expect("the first is done");
        second.chunk(&vec![b' '; limit + 1]);
        assert_eq!(IN_FLIGHT.bytes("b"), (0, 0), "an oversized body, drained, holds nothing");
    }

    /// Each holder may hold an equal share: one at its share is refused, saying so, while
    /// the others still get theirs; one with nothing in flight always gets one body, even a
    /// body larger than its share, if the whole has room.
    #[test]
    fn each_holder_holds_an_equal_share_and_always_one_body() {
        static IN_FLIGHT: InFlight = InFlight::new();
        let bound = Bound { whole: 3000, holders: 3, pools: 1 };
        let reserve = |holder: &str, declared: u64| Intake::reserve_in(&IN_FLIGHT, 1500, Some(declared), "p", holder, bound);
        let a = [reserve("a", 600).unwrap(), reserve("a", 400).unwrap()];
        let crowded = reserve("a", 1).expect_err("a holds its share");
        assert_eq!((crowded.mine, crowded.past, crowded.bound.share()), (1000, Past::Share, 1000));
        let b = reserve("b", 1000).expect("b's share is its own");
        let c = reserve("c", 1000).expect("c's share is its own");
        drop((a, b, c));
        let big = reserve("a", 1500).expect("a body past the share, with nothing else of a's in flight");
        assert!(reserve("a", 1).is_err());
        let b = reserve("b", 1000).expect("b's share is its own");
        assert_eq!(reserve("c", 1000).unwrap_err().past, Past::Whole, "the whole is full: 2500 held");
        drop((big, b));
    }

    /// A Worker's isolate reads the bodies of every pool in it: one pool's uploads filled
    /// the whole and every other pool's bodies were refused (review rev27, 1), then the
    /// pools together held up to twice it. Each pool has its own part (here two pools,
    /// 1,000 each of 4,000), the process holds the whole at most, and a pool's uploads
    /// take the rest only as far as the other pools' parts are kept for them.
    #[test]
    fn the_pools_of_one_process_share_its_bodies_in_flight() {
        static IN_FLIGHT: InFlight = InFlight::new();
        let bound = Bound { whole: 4000, holders: 1, pools: 2 };
        assert_eq!(bound.own_part(), 1000);
        let reserve = |pool: &str, declared: u64| Intake::reserve_in(&IN_FLIGHT, 1500, Some(declared), pool, &format!("{pool}/callers"), bound);
        let gpu = [reserve("gpu", 1500).unwrap(), reserve("gpu", 1500).unwrap()];
        let crowded = reserve("gpu", 1).expect_err("team-b's part is kept for it");
        assert_eq!((crowded.ours, crowded.past), (3000, Past::Part));
        let team = reserve("team-b", 1000).expect("team-b's own part");
        assert_eq!(IN_FLIGHT.bytes("team-b/callers"), (4000, 1000), "the whole, and no more");
        assert_eq!(reserve("team-b", 1).unwrap_err().past, Past::Part, "past its part, and nothing left");
        drop(gpu);
        let more = reserve("team-b", 1500).expect("gpu's bodies arrived");
        let after = reserve("team-b", 500).expect("what gpu leaves of the rest");
        assert_eq!(reserve("team-b", 1).unwrap_err().past, Past::Part, "gpu's part kept for it");
        let back = reserve("gpu", 1000).expect("gpu's own part, whatever team-b holds");
        drop((team, more, after, back));
        assert_eq!(IN_FLIGHT.bytes("team-b/callers"), (0, 0));
    }

    /// rev35-3: a body within its pool's own part is refused only while another pool's body
    /// let in alone (nothing was held) is larger than the room its part leaves the others;
    /// the pool is told that, not that it "would take this pool's bodies past its own part".
    #[test]
    fn a_body_within_its_part_refused_beside_one_let_in_alone_is_told_so() {
        static IN_FLIGHT: InFlight = InFlight::new();
        let bound = Bound { whole: 4000, holders: 1, pools: 2 };
        let reserve = |pool: &str, declared: u64| Intake::reserve_in(&IN_FLIGHT, 4000, Some(declared), pool, pool, bound);
        let alone = reserve("gpu", 3500).expect("alone, larger than the 3000 team-b's part leaves");
        let crowded = reserve("team-b", 600).expect_err("the process would pass the whole");
        assert_eq!((crowded.ours, crowded.past), (0, Past::Beside));
        let said = crate::http::bodies_crowded(&crate::http::Holder::Pool, &crowded);
        assert!(said.contains("within this pool's own part (1000) of MAX_PENDING_BYTES (4000)") && !said.contains("past its own part"), "{said}");
        assert!(said.contains("another pool is sending a body larger") && said.contains("once that body has arrived") && !said.contains("3500"), "{said}");
        drop(alone);
        drop(reserve("team-b", 600).expect("gpu's body arrived"));
    }

    /// Pools of one process with values of their own (`MAX_PENDING_BYTES_GPU`): each still
    /// starts bodies within its own part whatever the others hold (review rev32, 2: team-b,
    /// holding nothing, was refused its own part once gpu's bodies passed team-b's value).
    #[test]
    fn a_pool_of_a_smaller_whole_gets_its_own_part_beside_a_pool_of_a_larger_one() {
        static IN_FLIGHT: InFlight = InFlight::new();
        let (large, small) = (Bound { whole: 40_000, holders: 1, pools: 2 }, Bound { whole: 4_000, holders: 1, pools: 2 });
        let reserve = |pool: &str, declared: u64, bound: Bound| Intake::reserve_in(&IN_FLIGHT, 10_000, Some(declared), pool, pool, bound);
        let gpu: Vec<Intake> = (0..3).map(|_| reserve("gpu", 10_000, large).expect("gpu's own part and the rest")).collect();
        assert_eq!(reserve("gpu", 1, large).unwrap_err().past, Past::Part, "team-b's part kept for it, by gpu's value");
        let team = reserve("team-b", 1_000, small).expect("team-b's own part, whatever gpu holds");
        assert_eq!(reserve("team-b", 1, small).unwrap_err().past, Past::Part, "past it, team-b is held to its own value");
        assert_eq!(IN_FLIGHT.bytes("team-b").0, 31_000);
        drop((gpu, team));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]

        /// Many pools sending bodies of any size up to the limit, and dropping them in any
        /// order: the bodies in flight never hold more than the whole, and a pool within
        /// its own part always starts a body that keeps it there.
        #[test]
        fn the_pools_bodies_in_flight_stay_within_the_whole(
            pools in 2usize..8,
            steps in proptest::collection::vec((0usize..8, 1usize..=1000, proptest::bool::ANY), 1..200),
        ) {
            static IN_FLIGHT: InFlight = InFlight::new();
            let bound = Bound { whole: 3000, holders: 1, pools };
            let own = bound.own_part();
            let mut held: Vec<(usize, usize, Intake)> = Vec::new();
            for (pool, size, drop_one) in steps {
                let pool = pool % pools;
                if drop_one && !held.is_empty() {
                    held.remove(size % held.len());
                    continue;
                }
                let name = format!("p{pool}");
                let ours: usize = held.iter().filter(|(p, _, _)| *p == pool).map(|(_, n, _)| n).sum();
                match Intake::reserve_in(&IN_FLIGHT, 1000, Some(size as u64), &name, &name, bound) {
                    Ok(intake) => held.push((pool, size, intake)),
                    Err(crowded) => proptest::prop_assert!(ours + size > own, "p{pool} refused {size} within its own part: {crowded:?}"),
                }
                let total: usize = held.iter().map(|(_, n, _)| n).sum();
                proptest::prop_assert!(total <= bound.whole, "{total} bytes in flight, past {}", bound.whole);
                proptest::prop_assert_eq!(IN_FLIGHT.bytes("").0, total);
            }
        }
    }

    /// A body's buffer grows to its declared length and no further: it never holds twice
    /// what it keeps, and it is counted at what it holds.
    #[test]
    fn a_body_never_holds_more_than_it_declared() {
        static IN_FLIGHT: InFlight = InFlight::new();
        let bound = Bound { whole: 1 << 20, holders: 1, pools: 1 };
        let mut body = Intake::reserve_in(&IN_FLIGHT, 1 << 20, Some(100_000), "p", "pool", bound).unwrap();
        for _ in 0..1000 {
            body.chunk(&[b'x'; 100]);
        }
        assert_eq!(body.bytes.capacity(), 100_000);
        assert_eq!(IN_FLIGHT.bytes("pool"), (100_000, 100_000));
        // A runtime that let through more than the declared length: what is held is counted.
        body.chunk(&[b'x'; 100]);
        assert_eq!(IN_FLIGHT.bytes("pool").0, body.bytes.capacity());
        drop(body);
        assert_eq!(IN_FLIGHT.bytes("pool"), (0, 0));
    }

    #[test]
    fn drains_an_oversized_body_up_to_the_drain_limit() {
        let mut i = Intake::new(5);
        assert_eq!(i.chunk(b"abcdef"), Next::Read);
        assert_eq!(i.chunk(&vec![0; DRAIN_LIMIT]), Next::Stop);
        assert_eq!(i.finish(), Body::TooLarge);
    }

    #[test]
    fn a_refused_request_is_read_only_a_little() {
        let mut i = Intake::refused();
        assert_eq!(i.chunk(b"{\"prompt\":\"x\"}"), Next::Read, "a small body is heard out");
        assert_eq!(i.chunk(&vec![0; REFUSAL_DRAIN_LIMIT]), Next::Stop);
    }

    /// A body is given 30 s, and more the longer it says it is, as far as the limit: the
    /// time a 64 kbit/s link takes to send it.
    #[test]
    fn a_body_is_given_a_floor_and_more_the_longer_it_is_up_to_the_limit() {
        let mib = 1024 * 1024;
        assert_eq!(read_within_ms(Some(0), mib), BODY_FLOOR_MS);
        assert_eq!(read_within_ms(Some(100), mib), BODY_FLOOR_MS + 12);
        assert_eq!(read_within_ms(Some(mib as u64), mib), 158_000, "1 MiB at 8 KiB/s, and the floor");
        assert_eq!(read_within_ms(None, mib), 158_000, "a chunked body: the limit's time");
        assert_eq!(read_within_ms(Some(u64::MAX), mib), 158_000, "past the limit: the limit's time");
        assert_eq!(read_within_ms(Some(64 * mib as u64), 64 * mib), 30_000 + 8_192_000);
    }

    /// A body whose time ran out is `TimedOut`, unless it was too large already (then the
    /// caller must shorten it, whatever else).
    #[test]
    fn a_body_that_timed_out_is_timed_out_unless_it_was_too_large_already() {
        let mut i = Intake::new(5);
        i.chunk(b"ab");
        i.timed_out(30_012);
        i.failed("a later error");
        assert_eq!(i.finish(), Body::TimedOut { ms: 30_012 });
        let mut i = Intake::new(1);
        i.chunk(b"ab");
        i.timed_out(30_000);
        assert_eq!(i.finish(), Body::TooLarge);
    }

    #[test]
    fn a_broken_upload_is_broken_unless_it_was_too_large_already() {
        let mut i = Intake::new(5);
        i.chunk(b"ab");
        i.failed("connection reset");
        assert_eq!(i.finish(), Body::Broken("connection reset".into()));
        let mut i = Intake::new(1);
        i.chunk(b"ab");
        i.failed("connection reset");
        assert_eq!(i.finish(), Body::TooLarge);
    }
}
