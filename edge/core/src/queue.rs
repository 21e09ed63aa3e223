//! One pool's queue, fair between callers: a lane per caller, each lane ordered by
//! `priority` (higher first), then age (then the order they came); callers with queued jobs take turns, so
//! one caller's burst of 500 jobs waits behind — not in front of — another caller's one.
//! Pure bookkeeping: which job may go where is [`crate::machine`]'s dispatch.

use shared::Millis;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};

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
    /// Callers with queued jobs, whose turn is next first.
    turns: VecDeque<String>,
    /// Each queued job's caller and place.
    places: HashMap<String, (String, Place)>,
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
    pub fn push(&mut self, id: &str, caller: &str, priority: u8, created_at: Millis) {
        if self.places.contains_key(id) {
            return;
        }
        self.pushed += 1;
        let place = Place { priority: Reverse(priority), created_at, seq: self.pushed, id: id.to_string() };
        let lane = self.lanes.entry(caller.to_string()).or_default();
        if lane.is_empty() {
            self.turns.push_back(caller.to_string());
        }
        lane.insert(place.clone());
        self.places.insert(id.to_string(), (caller.to_string(), place));
    }

    /// Takes a job out of the queue; false if it was not in it.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some((caller, place)) = self.places.remove(id) else { return false };
        let lane = self.lanes.get_mut(&caller).expect("a queued job's lane exists");
        lane.remove(&place);
        if lane.is_empty() {
            self.lanes.remove(&caller);
            self.turns.retain(|c| *c != caller);
        }
        true
    }

    /// `caller` was just served: its next turn comes after every other waiting caller's.
    pub fn served(&mut self, caller: &str) {
        if let Some(at) = self.turns.iter().position(|c| c == caller) {
            let c = self.turns.remove(at).expect("position is in range");
            self.turns.push_back(c);
        }
    }

    /// The callers in turn order, each with its jobs in lane order: the order dispatch
    /// looks for a job an agent can take.
    pub fn in_turn(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = &str>)> {
        self.turns.iter().map(|c| (c.as_str(), self.lanes[c].iter().map(|p| p.id.as_str())))
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
        q.push("a1", "a", 0, 1);
        q.push("a2", "a", 0, 2);
        q.push("b1", "b", 0, 3);
        q.push("a3", "a", 9, 4);
        assert_eq!(order(&q), [("a".into(), vec!["a3".into(), "a1".into(), "a2".into()]), ("b".into(), vec!["b1".into()])]);
        q.served("a");
        assert_eq!(order(&q)[0].0, "b");
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
                    0 => q.push(&id, &caller, priority, i as u64),
                    1 => { q.remove(&id); }
                    _ => {
                        q.served(&caller);
                        if q.len_of(&caller) > 0 {
                            prop_assert_eq!(q.turns.back(), Some(&caller));
                        }
                    }
                }
                let listed: usize = q.in_turn().map(|(_, ids)| ids.count()).sum();
                prop_assert_eq!(listed, q.len());
                let callers: BTreeSet<&str> = q.in_turn().map(|(c, _)| c).collect();
                prop_assert_eq!(callers.len(), q.turns.len());
                prop_assert!(q.in_turn().all(|(c, _)| q.len_of(c) > 0));
            }
        }
    }
}
