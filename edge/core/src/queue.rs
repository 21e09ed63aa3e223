//! One pool's queue, fair between callers: a lane per caller, each lane ordered by
//! `priority` (higher first), then age (then the order they came). Callers with queued
//! jobs take turns, the one served least recently first (a caller new to the queue before
//! any served one), so one caller's burst of 500 jobs waits behind — not in front of —
//! another caller's single job.
//! Pure bookkeeping: which job may go where is [`crate::machine`]'s dispatch.

use shared::Millis;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

/// A queued job's place in its lane.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    priority: Reverse<u8>,
    created_at: Millis,
    /// Jobs of one millisecond go in the order they were queued.
    seq: u64,
    id: String,
}

#[derive(Debug, Default, Clone)]
pub struct FairQueue {
    lanes: HashMap<String, BTreeSet<Place>>,
    /// Callers with queued jobs by (when last served, when they came, name): whose turn
    /// is next first.
    turns: BTreeSet<(u64, u64, String)>,
    /// Each waiting caller's key in `turns`.
    turn_of: HashMap<String, (u64, u64)>,
    /// Counts serves and arrivals: the stamps of `turns`.
    clock: u64,
    /// When each caller was last served, also while it has nothing queued: a caller whose
    /// jobs are taken as fast as it sends them must not count as new at each one. Stamps
    /// older than every waiting caller's mean "before everyone" like none, so they are
    /// dropped once there are many ([`FairQueue::forget_old_turns`]).
    last_served: HashMap<String, u64>,
    /// Each queued job's caller, place and the time it gives up waiting.
    places: HashMap<String, (String, Place, Millis)>,
    /// Queued jobs by the time they give up waiting: the next deadline of the queue
    /// without a walk through it.
    expiries: BTreeSet<(Millis, String)>,
    pushed: u64,
}

impl FairQueue {
    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.places.contains_key(id)
    }

    /// Jobs `caller` has waiting.
    pub fn len_of(&self, caller: &str) -> usize {
        self.lanes.get(caller).map_or(0, BTreeSet::len)
    }

    /// Queues a job in its caller's lane, where its priority and age put it (a job put
    /// back after a dispatch that never ran goes back where it was). A caller new to the
    /// queue has its turn after those already waiting.
    pub fn push(&mut self, id: &str, caller: &str, priority: u8, created_at: Millis, expires_at: Millis) {
        if self.places.contains_key(id) {
            return;
        }
        self.pushed += 1;
        let place = Place { priority: Reverse(priority), created_at, seq: self.pushed, id: id.to_string() };
        let lane = self.lanes.entry(caller.to_string()).or_default();
        if lane.is_empty() {
            self.clock += 1;
            let served = self.last_served.get(caller).copied().unwrap_or(0);
            self.turns.insert((served, self.clock, caller.to_string()));
            self.turn_of.insert(caller.to_string(), (served, self.clock));
        }
        lane.insert(place.clone());
        self.places.insert(id.to_string(), (caller.to_string(), place, expires_at));
        self.expiries.insert((expires_at, id.to_string()));
    }

    /// Takes a job out of the queue; false if it was not in it.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some((caller, place, expires_at)) = self.places.remove(id) else { return false };
        self.expiries.remove(&(expires_at, id.to_string()));
        let lane = self.lanes.get_mut(&caller).expect("a queued job's lane exists");
        lane.remove(&place);
        if lane.is_empty() {
            self.lanes.remove(&caller);
            if let Some((served, came)) = self.turn_of.remove(&caller) {
                self.turns.remove(&(served, came, caller));
            }
        }
        true
    }

    /// `caller` was just served: its next turn comes after every other waiting caller's.
    pub fn served(&mut self, caller: &str) {
        self.clock += 1;
        self.last_served.insert(caller.to_string(), self.clock);
        if let Some(key) = self.turn_of.get_mut(caller) {
            self.turns.remove(&(key.0, key.1, caller.to_string()));
            key.0 = self.clock;
            self.turns.insert((key.0, key.1, caller.to_string()));
        }
        if self.last_served.len() > 2 * self.turn_of.len() + 64 {
            self.forget_old_turns();
        }
    }

    /// Drops the serve stamps older than every waiting caller's: such a caller, back in
    /// the queue, goes before all of them either way.
    fn forget_old_turns(&mut self) {
        let oldest = self.turns.first().map_or(u64::MAX, |(served, _, _)| *served);
        let waiting = &self.turn_of;
        self.last_served.retain(|c, served| *served >= oldest || waiting.contains_key(c));
    }

    /// The callers in turn order, each with its jobs in lane order: the order dispatch
    /// looks for a job an agent can take.
    pub fn in_turn(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = &str>)> {
        self.turns.iter().map(|(_, _, c)| (c.as_str(), self.lanes[c].iter().map(|p| p.id.as_str())))
    }

    /// The earliest time a queued job gives up waiting.
    pub fn first_expiry(&self) -> Option<Millis> {
        self.expiries.first().map(|(t, _)| *t)
    }

    /// The queued jobs whose waiting time is over at `now`.
    pub fn expired(&self, now: Millis) -> Vec<String> {
        self.expiries.iter().take_while(|(t, _)| *t <= now).map(|(_, id)| id.clone()).collect()
    }

    /// Every queued job id, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.places.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn order(q: &FairQueue) -> Vec<(String, Vec<String>)> {
        q.in_turn().map(|(c, ids)| (c.to_string(), ids.map(str::to_string).collect())).collect()
    }

    #[test]
    fn lanes_order_by_priority_then_age_and_callers_take_turns() {
        let mut q = FairQueue::default();
        q.push("a1", "a", 0, 1, 10);
        q.push("a2", "a", 0, 2, 5);
        q.push("b1", "b", 0, 3, 7);
        q.push("a3", "a", 9, 4, 9);
        assert_eq!((q.first_expiry(), q.expired(7)), (Some(5), vec!["a2".to_string(), "b1".to_string()]));
        assert_eq!(order(&q), [("a".into(), vec!["a3".into(), "a1".into(), "a2".into()]), ("b".into(), vec!["b1".into()])]);
        q.served("a");
        assert_eq!(order(&q)[0].0, "b");
        // A caller arriving after others were served has its turn before them.
        q.served("b");
        q.push("c1", "c", 0, 5, 50);
        assert_eq!(order(&q).iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), ["c", "a", "b"]);
        q.remove("c1");
        assert!(q.remove("b1") && !q.remove("b1"));
        assert_eq!(order(&q).len(), 1);
        assert_eq!((q.len(), q.len_of("a"), q.len_of("b")), (3, 3, 0));
    }

    proptest! {
        /// Whatever is pushed, removed and served: every queued job is in exactly one
        /// lane, every caller with jobs has exactly one turn, and a caller just served
        /// comes last.
        #[test]
        fn the_queue_stays_consistent(ops in proptest::collection::vec((0u8..3, 0u8..4, 0u8..12, 0u8..10), 1..200)) {
            let mut q = FairQueue::default();
            for (i, (op, caller, job, priority)) in ops.into_iter().enumerate() {
                let caller = format!("c{caller}");
                let id = format!("j{job}");
                match op {
                    0 => q.push(&id, &caller, priority, i as u64, i as u64 + 7),
                    1 => { q.remove(&id); }
                    _ => {
                        q.served(&caller);
                        if q.len_of(&caller) > 0 {
                            prop_assert_eq!(q.in_turn().last().map(|(c, _)| c), Some(caller.as_str()), "served last goes last");
                        }
                    }
                }
                let listed: usize = q.in_turn().map(|(_, ids)| ids.count()).sum();
                prop_assert_eq!(listed, q.len());
                let callers: BTreeSet<&str> = q.in_turn().map(|(c, _)| c).collect();
                prop_assert_eq!(callers.len(), q.turns.len());
                prop_assert!(q.in_turn().all(|(c, _)| q.len_of(c) > 0));
                prop_assert_eq!(q.expiries.len(), q.len());
            }
        }
    }
}
