//! Claims on room: a checkout refused for room other jobs hold ([`super::error::RepoError::RoomHeld`])
//! is ended retryable, "retry once those jobs are done". Without more, its retry raced every
//! job started meanwhile, and lost for as long as they overlapped: a mirror of a repository
//! whose jobs overlap is never idle, so never goes for room (rev40b-2). So the refusal
//! leaves a claim of the bytes the checkout needs, kept in the order the claims were made
//! — none when jobs of its own repository and branch hold the room (a claim never holds
//! those back, so it held back only the others, rev45b-2) or the room held was not all
//! counted (rev45b-1; [`super::error::RoomClaim`]). Claims live in the agent's memory: a
//! restart drops them.
//! A job on a repository that starts while a claim of another stands
//! ([`Claims::admit`]) is refused before its fetch ([`super::error::RepoError::RoomClaimed`],
//! retryable too) unless the disk has the claimed bytes free now beside its reserve; then
//! it goes on, and its checkout must leave them ([`leave`]): the room the claimant waits
//! for goes once the jobs running at its refusal end, and no checkout started since takes
//! it. The claimant's retry (the same repository and branch) goes first once no older claim
//! stands, and its claim ends when its checkout is through or it fails otherwise.
//!
//! A claim is bounded: it lapses [`CLAIM_TTL`] after its last refusal (a caller that never
//! retries holds nothing for long), or after its claimant's last job in flight ended, not
//! while one is in flight, from just before its admission to its settling ([`Claims::pin`]: a big repository's
//! fetch and checkout take minutes, rev45d-2), and at most [`MAX_CLAIMS`] stand (a refusal past them
//! leaves none). Not kept from the room: what a fetch adds to a mirror, what running jobs
//! write, jobs without a repository. Pure: the time and the disk's space are passed in.

use super::checkout::fits_with_reserve;
use super::error::RepoError;
use crate::boot_clock::BootInstant;
use crate::workspace::DiskSpace;
use std::time::Duration;

/// How long a claim stands after its claimant's last refusal. A caller that retries with
/// a backoff of up to a minute keeps it; one that never retries blocks the agent's other
/// repository jobs this long at most.
pub const CLAIM_TTL: Duration = Duration::from_secs(120);

/// The most claims that stand at once: each blocks every job behind it, so a flood of
/// refused checkouts does not grow the list (or the wait) without bound.
pub const MAX_CLAIMS: usize = 16;

/// Whose claim: a job's repository and branch (`None`: the default one). The retry of a
/// refused job is a new job (a new id) of the same repository and branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant {
    pub url: String,
    pub branch: Option<String>,
}

impl Claimant {
    /// The claimant a job of `spec` on `url` is: its repository and branch.
    pub fn of(url: &shared::repo::RepoUrl, spec: &shared::job::JobSpec) -> Claimant {
        Claimant { url: url.url(), branch: spec.branch.clone() }
    }
}

#[derive(Debug, Clone)]
struct Claim {
    who: Claimant,
    /// The bytes its checkout was measured to need.
    bytes: u64,
    /// Its last refusal: it lapses [`CLAIM_TTL`] after.
    renewed: BootInstant,
}

/// The claims standing, oldest first, and the claimants with jobs between their admission
/// and their settling (how many each: [`Claims::pin`]).
#[derive(Debug, Default)]
pub struct Claims {
    claims: Vec<Claim>,
    in_flight: Vec<(Claimant, usize)>,
}

/// Whether a job on a repository may go on to its fetch and checkout ([`Claims::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// No claim older than the job's own (any claim, if it has none) stands.
    Go,
    /// Such claims stand, and their room is free now beside the disk's reserve: the job
    /// goes on, its checkout leaving that room ([`leave`]).
    Beside(Claimed),
    /// Such claims stand, and their room is not free now: the job is refused.
    Behind(Claimed),
}

/// The claims standing ahead of a job: `claims` of them, for `bytes` in all, the last
/// lapsing in `lapses_s` seconds unless renewed. Sent with the checkout to the git worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claimed {
    pub claims: usize,
    pub bytes: u64,
    pub lapses_s: u64,
    /// A retry of one of them is fetching or checking out now ([`Claims::pin`]): its claim
    /// stands until that job is settled, and `lapses_s` counts from then (review rev45e, 3:
    /// the words said "within 1 s" of a claim standing up to the job's timeout).
    #[serde(default)]
    pub under_way: bool,
}

impl Claimed {
    /// The refusal of a job on `url` held back by these claims: before its fetch, or at its
    /// checkout with its size `measured`.
    pub fn refusal(self, url: &str, measured: bool) -> RepoError {
        RepoError::RoomClaimed { url: url.to_string(), claims: self.claims, bytes: self.bytes, lapses_s: self.lapses_s, measured, under_way: self.under_way }
    }
}

/// Refuses ([`RepoError::RoomClaimed`]) a checkout of `needed` bytes (measured,
/// `super::checkout::Measured::needed`) that would not leave the `claimed` room on
/// `space`'s disk beside its reserve: it took the room an earlier refused checkout waits
/// for. (One that does not fit at all is refused for room first, `super::checkout::room`.)
pub fn leave(claimed: Option<Claimed>, needed: u64, space: DiskSpace, url: &str) -> Result<(), RepoError> {
    match claimed {
        Some(c) if !fits_with_reserve(needed.saturating_add(c.bytes), space) => {
            Err(c.refusal(url, true))
        }
        _ => Ok(()),
    }
}

impl Claims {
    /// Claims past [`CLAIM_TTL`] since their renewal go, unless a job of their claimant is
    /// in flight ([`Claims::pin`]).
    fn lapse(&mut self, now: BootInstant) {
        let in_flight = &self.in_flight;
        self.claims.retain(|c| now.saturating_duration_since(c.renewed) < CLAIM_TTL || in_flight.iter().any(|(who, _)| who == &c.who));
    }

    /// A job of `who` goes to its fetch and checkout at `now`: `who`'s claim, if any, does
    /// not lapse until [`Claims::unpin`] (a guard's Drop, `Repos::pin_claim`, so a path
    /// that never settles cannot pin it for ever), and then [`CLAIM_TTL`] after its last
    /// renewal. A claim already past its time lapses first: pinned, a late job of its
    /// claimant kept it standing (review rev45e, 4).
    pub fn pin(&mut self, who: &Claimant, now: BootInstant) {
        self.lapse(now);
        match self.in_flight.iter_mut().find(|(w, _)| w == who) {
            Some((_, n)) => *n += 1,
            None => self.in_flight.push((who.clone(), 1)),
        }
    }

    /// A job of `who` pinned by [`Claims::pin`] is settled, or gone.
    pub fn unpin(&mut self, who: &Claimant) {
        if let Some(i) = self.in_flight.iter().position(|(w, _)| w == who) {
            self.in_flight[i].1 -= 1;
            if self.in_flight[i].1 == 0 {
                self.in_flight.swap_remove(i);
            }
        }
    }

    /// Whether any claim stands at `now`: only then is the disk's space asked for
    /// ([`Claims::admit`]).
    pub fn stand(&mut self, now: BootInstant) -> bool {
        self.lapse(now);
        !self.claims.is_empty()
    }

    /// Whether `who`'s job may go on at `now`, the disk holding the workspaces having
    /// `space` (none: not known). A claimant keeps its place as it asks, waiting behind
    /// an older claim or first in line: its claim is renewed (a retry going first whose
    /// fetch outlasted [`CLAIM_TTL`] lost its claim mid-retry, rev45b-3), and stands while
    /// the job is in flight ([`Claims::pin`], rev45d-2: renewed once here, it lapsed then).
    pub fn admit(&mut self, who: &Claimant, now: BootInstant, space: Option<DiskSpace>) -> Admit {
        self.lapse(now);
        let own = self.claims.iter().position(|c| &c.who == who);
        if let Some(own) = own {
            self.claims[own].renewed = now;
        }
        let ahead = &self.claims[..own.unwrap_or(self.claims.len())];
        if ahead.is_empty() {
            return Admit::Go;
        }
        let bytes = ahead.iter().fold(0u64, |sum, c| sum.saturating_add(c.bytes));
        let pinned = |c: &Claim| self.in_flight.iter().any(|(w, _)| w == &c.who);
        let under_way = ahead.iter().any(pinned);
        let lapses = ahead.iter().map(|c| if pinned(c) { CLAIM_TTL } else { CLAIM_TTL.saturating_sub(now.saturating_duration_since(c.renewed)) }).max().unwrap_or_default();
        let claimed = Claimed { claims: ahead.len(), bytes, lapses_s: lapses.as_secs().max(1), under_way };
        match space {
            Some(space) if fits_with_reserve(bytes, space) => Admit::Beside(claimed),
            _ => Admit::Behind(claimed),
        }
    }

    /// `who`'s checkout, needing `bytes`, was refused at `now` for room other jobs hold:
    /// its claim is made (last in line) or renewed (its place kept). Returns whether it
    /// holds one ([`MAX_CLAIMS`] standing: none is made).
    pub fn refused(&mut self, who: &Claimant, bytes: u64, now: BootInstant) -> bool {
        self.lapse(now);
        if let Some(claim) = self.claims.iter_mut().find(|c| &c.who == who) {
            claim.renewed = now;
            claim.bytes = bytes;
            return true;
        }
        if self.claims.len() >= MAX_CLAIMS {
            return false;
        }
        self.claims.push(Claim { who: who.clone(), bytes, renewed: now });
        true
    }

    /// `who`'s job got past its checkout, or ended otherwise than refused for room: its
    /// claim, if any, ends.
    pub fn settled(&mut self, who: &Claimant) {
        self.claims.retain(|c| &c.who != who);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(url: &str, branch: Option<&str>) -> Claimant {
        Claimant { url: url.into(), branch: branch.map(Into::into) }
    }

    /// A disk of 100 MB (a reserve of 5 MB) with `free` bytes free.
    fn disk(free: u64) -> Option<DiskSpace> {
        Some(DiskSpace { free, size: 100_000_000, free_inodes: None, block: 4096 })
    }

    const MB: u64 = 1_000_000;

    #[test]
    fn a_claim_holds_back_later_jobs_and_lets_its_claimant_go_first() {
        let t0 = BootInstant::now();
        let mut claims = Claims::default();
        let (wide, held) = (who("h/wide", None), who("h/held", None));
        assert!(!claims.stand(t0));
        assert_eq!(claims.admit(&held, t0, None), Admit::Go, "no claim: every job goes");
        assert!(claims.refused(&wide, 50 * MB, t0));
        assert!(claims.stand(t0));
        // The job of the repository whose overlapping jobs kept "wide" out waits now: the
        // room is not free (its mirror holds it).
        let later = t0 + Duration::from_secs(1);
        let claimed = Claimed { claims: 1, bytes: 50 * MB, lapses_s: CLAIM_TTL.as_secs() - 1, under_way: false };
        assert_eq!(claims.admit(&held, later, disk(40 * MB)), Admit::Behind(claimed));
        assert_eq!(claims.admit(&held, later, None), Admit::Behind(claimed), "the disk not read: held back");
        // Another branch of the claimant's repository is another checkout.
        assert!(matches!(claims.admit(&who("h/wide", Some("dev")), later, disk(40 * MB)), Admit::Behind(_)));
        assert_eq!(claims.admit(&wide, later, disk(40 * MB)), Admit::Go, "the claimant's retry goes");
        claims.settled(&wide);
        assert_eq!(claims.admit(&held, later, disk(40 * MB)), Admit::Go, "its checkout through, the claim is gone");
    }

    #[test]
    fn a_job_goes_beside_a_claim_whose_room_is_free_and_its_checkout_must_leave_it() {
        let t0 = BootInstant::now();
        let mut claims = Claims::default();
        claims.refused(&who("h/wide", None), 50 * MB, t0);
        // 50 claimed and 5 of reserve: free 55 holds them, 54 does not.
        assert!(matches!(claims.admit(&who("h/x", None), t0, disk(54 * MB)), Admit::Behind(_)));
        let Admit::Beside(claimed) = claims.admit(&who("h/x", None), t0, disk(55 * MB)) else { panic!("held back though the claimed room is free") };
        let space = disk(60 * MB).unwrap();
        leave(Some(claimed), 5 * MB, space, "u").unwrap();
        let err = leave(Some(claimed), 5 * MB + 1, space, "u").unwrap_err();
        assert!(matches!(err, RepoError::RoomClaimed { claims: 1, bytes, .. } if bytes == 50 * MB) && err.retryable(), "{err}");
        assert!(err.to_string().contains("retry"), "{err}");
        leave(None, 55 * MB, space, "u").unwrap();
    }

    #[test]
    fn claims_are_served_oldest_first_and_a_waiting_claimant_keeps_its_place() {
        let t0 = BootInstant::now();
        let mut claims = Claims::default();
        let (a, b) = (who("h/a", None), who("h/b", Some("main")));
        claims.refused(&a, 10, t0);
        claims.refused(&b, 20, t0);
        assert_eq!(claims.admit(&a, t0, None), Admit::Go);
        assert!(matches!(claims.admit(&b, t0, None), Admit::Behind(Claimed { claims: 1, bytes: 10, .. })));
        assert!(matches!(claims.admit(&who("h/c", None), t0, None), Admit::Behind(Claimed { claims: 2, bytes: 30, .. })));
        // b, held behind a, renewed its claim as it asked: past a's lapse, b still stands.
        let late = t0 + CLAIM_TTL.saturating_sub(Duration::from_secs(1));
        assert!(matches!(claims.admit(&b, late, None), Admit::Behind(Claimed { claims: 1, .. })));
        let lapsed = t0 + CLAIM_TTL;
        assert_eq!(claims.admit(&b, lapsed, None), Admit::Go, "a never retried: its claim lapsed");
        assert!(matches!(claims.admit(&a, lapsed, None), Admit::Behind(Claimed { claims: 1, bytes: 20, .. })), "a's retry after its lapse waits behind b");
        // A refusal renews the claim in its place, its bytes as measured now.
        claims.refused(&b, 25, lapsed);
        assert!(matches!(claims.admit(&a, lapsed, None), Admit::Behind(Claimed { claims: 1, bytes: 25, .. })));
    }

    /// rev45b-3: the claimant first in line went on (`Go`) without its claim renewed: a
    /// retry whose fetch outlasted the claim's lapse lost it mid-retry, and a job started
    /// then took the room.
    #[test]
    fn a_claimant_going_first_keeps_its_claim_through_a_slow_retry() {
        let t0 = BootInstant::now();
        let mut claims = Claims::default();
        let wide = who("h/wide", None);
        claims.refused(&wide, 10, t0);
        let retry = t0 + (CLAIM_TTL - Duration::from_secs(1));
        assert_eq!(claims.admit(&wide, retry, None), Admit::Go);
        // Its fetch takes a minute: the claim stands at its checkout, 119 s after its retry.
        let checkout = retry + (CLAIM_TTL - Duration::from_secs(1));
        assert!(matches!(claims.admit(&who("h/x", None), checkout, None), Admit::Behind(Claimed { claims: 1, bytes: 10, .. })), "the claim lapsed mid-retry");
    }

    /// rev45b-4: RoomHeld promised the room was kept for the retry though no claim was made
    /// (16 standing), and RoomClaimed before a job's fetch said the claimed room was what
    /// "this job would have taken", its size not known.
    #[test]
    fn the_words_of_a_refusal_say_whether_the_room_is_kept() {
        use super::super::error::RoomClaim;
        let held = |claim| RepoError::RoomHeld { url: "u".into(), what: "w".into(), held: 0, workspaces: 7, needed: 1, claim }.to_string();
        assert!(held(RoomClaim::Made).contains("keeps jobs started meanwhile from taking that room"), "{}", held(RoomClaim::Made));
        for none in [RoomClaim::TooMany, RoomClaim::OwnJobs, RoomClaim::Uncounted] {
            let said = held(none);
            assert!(!said.contains("keeps jobs") && said.contains("not kept for this job's retry") && said.contains("retry once those jobs are done"), "{said}");
        }
        assert!(held(RoomClaim::Uncounted).contains("at least 7 bytes"), "{}", held(RoomClaim::Uncounted));
        let claimed = |measured| RepoError::RoomClaimed { url: "u".into(), claims: 1, bytes: 5, lapses_s: 9, measured, under_way: false }.to_string();
        assert!(claimed(false).contains("whatever this job's size") && !claimed(false).contains("would have taken"), "{}", claimed(false));
        assert!(claimed(true).contains("which this job would have taken"), "{}", claimed(true));
    }

    #[test]
    fn a_claim_never_retried_lapses_and_the_claims_are_bounded() {
        let t0 = BootInstant::now();
        let mut claims = Claims::default();
        for i in 0..MAX_CLAIMS {
            assert!(claims.refused(&who(&format!("h/{i}"), None), 1, t0));
        }
        assert!(!claims.refused(&who("h/one-too-many", None), 1, t0), "past the bound a refusal leaves no claim");
        assert!(matches!(claims.admit(&who("h/one-too-many", None), t0, None), Admit::Behind(Claimed { claims: MAX_CLAIMS, .. })));
        assert!(!claims.stand(t0 + CLAIM_TTL), "every claim lapsed");
        assert_eq!(claims.admit(&who("h/x", None), t0 + CLAIM_TTL, None), Admit::Go);
        assert!(claims.refused(&who("h/one-too-many", None), 1, t0 + CLAIM_TTL));
    }

    /// rev45d-2: the retry's claim was renewed once, at its admission: a fetch and checkout
    /// longer than CLAIM_TTL (a big repository's, the kind that needs the room) lost it
    /// mid-retry, and a job of another repository took the room. Pinned while in flight, it
    /// stands; unpinned, it lapses as before.
    #[test]
    fn a_retry_whose_fetch_outlasts_claim_ttl_keeps_its_claim() {
        let t0 = BootInstant::now();
        let mut claims = Claims::default();
        let (wide, x) = (who("h/wide", None), who("h/x", None));
        claims.refused(&wide, 10, t0);
        let retry = t0 + Duration::from_secs(30);
        claims.pin(&wide, t0);
        assert_eq!(claims.admit(&wide, retry, None), Admit::Go);
        // Its fetch takes 121 s: a job of another repository starts then.
        let checkout = retry + CLAIM_TTL + Duration::from_secs(1);
        assert!(matches!(claims.admit(&x, checkout, None), Admit::Behind(_)), "the claim lapsed mid-retry");
        // Two jobs of it in flight: the claim stands until both are done.
        claims.pin(&wide, checkout);
        claims.unpin(&wide);
        assert!(claims.stand(checkout), "one of its jobs is still in flight");
        claims.unpin(&wide);
        claims.unpin(&wide);
        assert_eq!(claims.admit(&x, checkout, None), Admit::Go, "no job of it in flight: the claim lapses");
        // A claim past its time when a late job of its claimant is pinned lapses first.
        claims.refused(&wide, 10, t0);
        let late = t0 + CLAIM_TTL + Duration::from_secs(1);
        claims.pin(&wide, late);
        assert!(!claims.stand(late), "a lapsed claim was kept standing by its claimant's late job");
        claims.unpin(&wide);
    }

    /// A job held back by a claim whose claimant's retry is fetching was told the claim
    /// lapses "within 1 s" — once the retry had outlasted `CLAIM_TTL` — though it stands
    /// until that job is settled, up to its timeout: a caller believing it retried in a
    /// tight loop (review rev45e, 3).
    #[test]
    fn a_job_behind_a_claim_whose_retry_is_under_way_is_told_so() {
        let t0 = BootInstant::now();
        let mut claims = Claims::default();
        let (wide, x) = (who("h/wide", None), who("h/x", None));
        claims.refused(&wide, 10, t0);
        claims.pin(&wide, t0);
        assert_eq!(claims.admit(&wide, t0, None), Admit::Go);
        let Admit::Behind(claimed) = claims.admit(&x, t0 + CLAIM_TTL + Duration::from_secs(60), None) else { panic!("the claim lapsed mid-retry") };
        assert!(claimed.under_way && claimed.lapses_s == CLAIM_TTL.as_secs(), "{claimed:?}");
        let words = RepoError::RoomClaimed { url: "u".into(), claims: 1, bytes: 10, lapses_s: claimed.lapses_s, measured: false, under_way: claimed.under_way }.to_string();
        assert!(words.contains("fetching or checking out now") && words.contains("up to its timeout_ms"), "{words}");
        // Not under way: the time left, as before.
        claims.unpin(&wide);
        claims.refused(&wide, 10, t0);
        let Admit::Behind(claimed) = claims.admit(&x, t0 + Duration::from_secs(20), None) else { panic!("the claim lapsed") };
        assert!(!claimed.under_way && claimed.lapses_s == CLAIM_TTL.as_secs() - 20, "{claimed:?}");
    }
}
