//! One pool's queue, fair between owners, then between callers: a lane per caller, each
//! lane ordered by `priority` (higher first), then age (then the order they came).
//! Turns go first to owners — each caller with its own secret (`RUNNER_SECRETS`) is one,
//! and every name the pool's secret sends under is one together (the names are its to
//! make up: twenty of them take one owner's turns, not twenty) — then, within an owner,
//! to its callers. At both levels the one served least recently goes first (one new to
//! the queue before any served one), so one caller's burst of 500 jobs waits behind — not
//! in front of — another caller's single job, whoever's names they are.
//! Pure bookkeeping: which job may go where is [`crate::machine`]'s dispatch, which may
//! also set a job aside ([`FairQueue::set_aside`]): still queued, counted and expiring, but
//! out of its lane, so the walk for the next job to send no longer passes it.

use shared::Millis;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};

/// A queued job's place in its lane.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    priority: Reverse<u8>,
    created_at: Millis,
    /// Jobs of one millisecond go in the order they were queued.
    seq: u64,
    id: String,
}

/// A lane's key: its owner, then its caller's name.
type Lane = (String, String);

/// Turn-taking among keys (owners, or one owner's callers) with jobs queued: the one
/// served least recently first.
#[derive(Debug, Default, Clone)]
struct Turns {
    /// Keys with queued jobs by (when last served, when they came, key): whose turn is
    /// next first.
    order: BTreeSet<(u64, u64, String)>,
    /// Each waiting key's place in `order`.
    waiting: HashMap<String, (u64, u64)>,
    /// When each key was last served, also while it has nothing queued: a caller whose
    /// jobs are taken as fast as it sends them must not count as new at each one. Stamps
    /// older than every waiting key's mean "before everyone" like none, so they are
    /// dropped once there are many ([`Turns::forget_old`]).
    last_served: HashMap<String, u64>,
}

impl Turns {
    /// `key` has jobs queued again (`now`: the queue's clock): its turn comes after those
    /// of the keys already waiting that were served since it was.
    fn arrive(&mut self, key: &str, now: u64) {
        let served = self.last_served.get(key).copied().unwrap_or(0);
        self.order.insert((served, now, key.to_string()));
        self.waiting.insert(key.to_string(), (served, now));
    }

    /// `key` has no jobs queued any more.
    fn leave(&mut self, key: &str) {
        if let Some((served, came)) = self.waiting.remove(key) {
            self.order.remove(&(served, came, key.to_string()));
        }
    }

    /// `key` was just served (`now`: the queue's clock): its next turn comes after every
    /// other waiting key's.
    fn served(&mut self, key: &str, now: u64) {
        self.last_served.insert(key.to_string(), now);
        if let Some(place) = self.waiting.get_mut(key) {
            self.order.remove(&(place.0, place.1, key.to_string()));
            place.0 = now;
            self.order.insert((place.0, place.1, key.to_string()));
        }
        if self.last_served.len() > 2 * self.waiting.len() + 64 {
            self.forget_old();
        }
    }

    /// Drops the serve stamps older than every waiting key's: such a key, back in the
    /// queue, goes before all of them either way.
    fn forget_old(&mut self) {
        let oldest = self.order.first().map_or(u64::MAX, |(served, _, _)| *served);
        let waiting = &self.waiting;
        self.last_served.retain(|k, served| *served >= oldest || waiting.contains_key(k));
    }

    /// The waiting keys, whose turn is next first.
    fn in_turn(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|(_, _, k)| k.as_str())
    }
}

/// One owner's part of the queue.
#[derive(Debug, Default, Clone)]
struct Owner {
    /// Its callers with jobs queued, in turn (kept while it has none queued, for its
    /// callers' serve stamps: owners are few, the callers with a secret of their own and
    /// the pool's secret).
    turns: Turns,
    /// Its callers' lanes, by name.
    lanes: HashMap<String, BTreeSet<Place>>,
}

#[derive(Debug, Default, Clone)]
pub struct FairQueue {
    /// The owners with jobs queued, in turn.
    turns: Turns,
    owners: HashMap<String, Owner>,
    /// Jobs queued per lane — caller name as one owner's: a caller's cap and its
    /// `/health`. Not per name alone: jobs the pool's secret queued under a name before
    /// the name had a secret of its own stay the pool secret's, and fill neither.
    per_lane: HashMap<Lane, usize>,
    /// Jobs queued per owner: who holds how much of a full queue.
    per_owner: HashMap<String, usize>,
    /// Counts serves and arrivals: the stamps of the turns.
    clock: u64,
    /// Each queued job's owner and caller, place and the time it gives up waiting.
    places: HashMap<String, (Lane, Place, Millis)>,
    /// Queued jobs by the time they give up waiting: the next deadline of the queue
    /// without a walk through it.
    expiries: BTreeSet<(Millis, String)>,
    /// Queued jobs set aside: in `places`, not in their lanes.
    aside: HashSet<String>,
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

    /// Jobs caller `name` of owner `owner` (`crate::machine::share`) has waiting: a
    /// name's jobs sent with its own secret and those the pool's secret sent under it are
    /// counted apart.
    pub fn len_of(&self, owner: &str, name: &str) -> usize {
        self.per_lane.get(&(owner.to_string(), name.to_string())).copied().unwrap_or(0)
    }

    /// Jobs owner `owner` (`crate::machine::share_of`) has waiting, whatever its callers.
    pub fn len_of_owner(&self, owner: &str) -> usize {
        self.per_owner.get(owner).copied().unwrap_or(0)
    }

    /// How many owners have jobs waiting.
    pub fn owners_waiting(&self) -> usize {
        self.per_owner.len()
    }

    /// Queues a job of `owner` (`crate::machine::share_of`) in the lane of its caller
    /// `name`, where its priority and age put it (a job put back after a dispatch that
    /// never ran goes back where it was). An owner or caller new to the queue has its turn
    /// after those already waiting that were not served since it last was.
    pub fn push(&mut self, id: &str, owner: &str, name: &str, priority: u8, created_at: Millis, expires_at: Millis) {
        if self.places.contains_key(id) {
            return;
        }
        self.pushed += 1;
        let place = Place { priority: Reverse(priority), created_at, seq: self.pushed, id: id.to_string() };
        self.into_lane(owner, name, place.clone());
        *self.per_lane.entry((owner.to_string(), name.to_string())).or_default() += 1;
        *self.per_owner.entry(owner.to_string()).or_default() += 1;
        self.places.insert(id.to_string(), ((owner.to_string(), name.to_string()), place, expires_at));
        self.expiries.insert((expires_at, id.to_string()));
    }

    /// Puts a queued job in its lane, where its place says; the lane has its turn again
    /// if it had none.
    fn into_lane(&mut self, owner: &str, name: &str, place: Place) {
        let of = self.owners.entry(owner.to_string()).or_default();
        let lane = of.lanes.entry(name.to_string()).or_default();
        if lane.is_empty() {
            self.clock += 1;
            if of.turns.waiting.is_empty() {
                self.turns.arrive(owner, self.clock);
            }
            of.turns.arrive(name, self.clock);
        }
        lane.insert(place);
    }

    /// Takes a job out of its lane; a lane left empty has no turn, nor an owner left
    /// with no lane.
    fn out_of_lane(&mut self, owner: &str, name: &str, place: &Place) {
        let of = self.owners.get_mut(owner).expect("a queued job's owner is kept");
        let lane = of.lanes.get_mut(name).expect("a queued job's lane exists");
        lane.remove(place);
        if lane.is_empty() {
            of.lanes.remove(name);
            of.turns.leave(name);
            if of.turns.waiting.is_empty() {
                self.turns.leave(owner);
            }
        }
    }

    /// Sets a queued job aside: it stays queued (counted, expiring, removable) but leaves
    /// its lane, so [`FairQueue::in_turn`] no longer lists it, until
    /// [`FairQueue::put_back`]. False if it was not queued, or already aside.
    pub fn set_aside(&mut self, id: &str) -> bool {
        let Some(((owner, name), place, _)) = self.places.get(id).cloned() else { return false };
        if !self.aside.insert(id.to_string()) {
            return false;
        }
        self.out_of_lane(&owner, &name, &place);
        true
    }

    /// Puts every job set aside back in its lane, where its place says (a lane new to the
    /// turns then has its turn as any returning one: after those served since it was).
    pub fn put_back(&mut self) {
        for id in std::mem::take(&mut self.aside) {
            let ((owner, name), place, _) = self.places[&id].clone();
            self.into_lane(&owner, &name, place);
        }
    }

    /// How many queued jobs are set aside.
    pub fn aside(&self) -> usize {
        self.aside.len()
    }

    /// Moves a queued job's end of wait (its wait grew: an `/execute` job kept as a
    /// `POST /jobs` one), its place kept. Nothing if it is not queued.
    pub fn retime(&mut self, id: &str, expires_at: Millis) {
        let Some((_, _, at)) = self.places.get_mut(id) else { return };
        let old = std::mem::replace(at, expires_at);
        self.expiries.remove(&(old, id.to_string()));
        self.expiries.insert((expires_at, id.to_string()));
    }

    /// Takes a job out of the queue; false if it was not in it.
    pub fn remove(&mut self, id: &str) -> bool {
        self.take(id).is_some()
    }

    /// Takes a job out of the queue to send it: its owner and its caller were served, so
    /// their next turns come after every other waiting one's. False if it was not queued.
    pub fn dispatched(&mut self, id: &str) -> bool {
        let Some((owner, name)) = self.take(id) else { return false };
        self.clock += 1;
        self.turns.served(&owner, self.clock);
        self.owners.get_mut(&owner).expect("a queued job's owner is kept").turns.served(&name, self.clock);
        true
    }

    /// Takes a job out of every index; its owner and caller, if it was queued.
    fn take(&mut self, id: &str) -> Option<Lane> {
        let (lane, place, expires_at) = self.places.remove(id)?;
        self.expiries.remove(&(expires_at, id.to_string()));
        fn drop_one<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
            if let Some(n) = counts.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(key);
                }
            }
        }
        drop_one(&mut self.per_lane, &lane);
        drop_one(&mut self.per_owner, &lane.0);
        let (owner, name) = lane;
        if !self.aside.remove(id) {
            self.out_of_lane(&owner, &name, &place);
        }
        Some((owner, name))
    }

    /// The lanes in turn order — the owners in turn, each owner's callers in turn — each
    /// as (owner, caller, its jobs in lane order, those set aside left out): the order
    /// dispatch looks for a job an agent can take. Each step is a map look-up or a step in an ordered set: no walk
    /// of the queue to find whose turn it is.
    pub fn in_turn(&self) -> impl Iterator<Item = (&str, &str, impl Iterator<Item = &str>)> {
        self.turns.in_turn().flat_map(move |owner| {
            let of = &self.owners[owner];
            of.turns.in_turn().map(move |name| (owner, name, of.lanes[name].iter().map(|p| p.id.as_str())))
        })
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
        q.in_turn().map(|(_, c, ids)| (c.to_string(), ids.map(str::to_string).collect())).collect()
    }

    fn callers(q: &FairQueue) -> Vec<&str> {
        q.in_turn().map(|(_, c, _)| c).collect()
    }

    /// The first job in turn order, sent.
    fn dispatch(q: &mut FairQueue) -> String {
        let (name, id) = {
            let (_, name, mut ids) = q.in_turn().next().expect("a job queued");
            (name.to_string(), ids.next().unwrap().to_string())
        };
        assert!(q.dispatched(&id));
        name
    }

    #[test]
    fn lanes_order_by_priority_then_age_and_callers_take_turns() {
        let mut q = FairQueue::default();
        q.push("a1", "a", "a", 0, 1, 10);
        q.push("a2", "a", "a", 0, 2, 5);
        q.push("b1", "b", "b", 0, 3, 7);
        q.push("a3", "a", "a", 9, 4, 9);
        assert_eq!((q.first_expiry(), q.expired(7)), (Some(5), vec!["a2".to_string(), "b1".to_string()]));
        assert_eq!(order(&q), [("a".into(), vec!["a3".into(), "a1".into(), "a2".into()]), ("b".into(), vec!["b1".into()])]);
        assert!(q.dispatched("a3") && !q.dispatched("a3"));
        assert_eq!(callers(&q), ["b", "a"]);
        // A caller arriving after others were served has its turn before them.
        q.push("b2", "b", "b", 0, 5, 50);
        assert!(q.dispatched("b1"));
        q.push("c1", "c", "c", 0, 5, 50);
        assert_eq!(callers(&q), ["c", "a", "b"]);
        q.remove("c1");
        assert!(q.remove("b2") && !q.remove("b2"));
        assert_eq!(order(&q).len(), 1);
        assert_eq!((q.len(), q.len_of("a", "a"), q.len_of("b", "b")), (2, 2, 0));
    }

    /// Turns go to owners first, then to an owner's callers: the pool secret's twenty
    /// made-up names (owner `""`) take one owner's turns between them, not twenty.
    #[test]
    fn owners_take_turns_then_their_callers() {
        let mut q = FairQueue::default();
        for round in 0..3 {
            q.push(&format!("a{round}"), "a", "a", 0, round, 100);
            for n in 0..20 {
                q.push(&format!("m{n}-{round}"), "", &format!("m{n}"), 0, round, 100);
            }
        }
        let served: Vec<String> = (0..6).map(|_| dispatch(&mut q)).collect();
        assert_eq!(served, ["a", "m0", "a", "m1", "a", "m2"]);
        // a has nothing left: the pool's names go on in turn, each once before any twice.
        let served: Vec<String> = (0..20).map(|_| dispatch(&mut q)).collect();
        assert_eq!(served.iter().collect::<BTreeSet<_>>().len(), 20, "{served:?}");
        assert_eq!(served[..17], (3..20).map(|n| format!("m{n}")).collect::<Vec<_>>()[..]);
        // A name of the pool secret's with the name of a caller that has its own secret
        // (queued before the name was given one) is a lane of the pool secret's; the
        // owner new to the queue goes first.
        q.push("x-pool", "", "x", 0, 9, 100);
        q.push("x-own", "x", "x", 0, 9, 100);
        assert_eq!((q.len_of("", "x"), q.len_of("x", "x")), (1, 1), "counted apart");
        assert_eq!(q.in_turn().filter(|(_, c, _)| *c == "x").map(|(o, _, _)| o).collect::<Vec<_>>(), ["x", ""]);
    }

    proptest! {
        /// Whatever is pushed, removed, sent, set aside and put back: every queued job is
        /// in exactly one lane or aside,
        /// every owner with jobs has exactly one turn and its callers' lanes follow each
        /// other, and an owner just served comes last, its caller last among its own.
        #[test]
        fn the_queue_stays_consistent(ops in proptest::collection::vec((0u8..5, 0u8..5, 0u8..12, 0u8..10), 1..200)) {
            let mut q = FairQueue::default();
            // c0 and c1 have secrets of their own; the pool's secret's names are one owner.
            let owner_of = |c: &str| if c == "c0" || c == "c1" { c.to_string() } else { String::new() };
            for (i, (op, caller, job, priority)) in ops.into_iter().enumerate() {
                let caller = format!("c{caller}");
                let id = format!("j{job}");
                match op {
                    0 => q.push(&id, &owner_of(&caller), &caller, priority, i as u64, i as u64 + 7),
                    1 => { q.remove(&id); }
                    3 => {
                        let queued_in_lane = q.contains(&id) && !q.aside.contains(&id);
                        prop_assert_eq!(q.set_aside(&id), queued_in_lane);
                    }
                    4 => q.put_back(),
                    _ => {
                        if let Some(((owner, name), _, _)) = q.places.get(&id).cloned() {
                            prop_assert!(q.dispatched(&id));
                            if !q.owners[&owner].turns.waiting.is_empty() {
                                prop_assert_eq!(q.in_turn().last().map(|(o, _, _)| o), Some(owner.as_str()), "served last goes last");
                                let own: Vec<&str> = q.in_turn().filter(|(o, _, _)| *o == owner).map(|(_, c, _)| c).collect();
                                if q.owners[&owner].lanes.contains_key(&name) {
                                    prop_assert_eq!(own.last().copied(), Some(name.as_str()), "its caller last among its own");
                                }
                            }
                        }
                    }
                }
                let listed: Vec<&str> = q.in_turn().flat_map(|(_, _, ids)| ids).collect();
                prop_assert_eq!(listed.len() + q.aside(), q.len());
                prop_assert!(listed.iter().all(|id| !q.aside.contains(*id)), "a job set aside is not listed");
                let lanes: Vec<(&str, &str)> = q.in_turn().map(|(o, c, _)| (o, c)).collect();
                prop_assert_eq!(lanes.iter().collect::<BTreeSet<_>>().len(), lanes.len(), "one turn a lane");
                let mut owners: Vec<&str> = lanes.iter().map(|(o, _)| *o).collect();
                owners.dedup();
                prop_assert_eq!(owners.len(), q.turns.waiting.len(), "an owner's lanes follow each other");
                prop_assert!(lanes.iter().all(|(o, c)| *o == owner_of(c) && q.len_of(o, c) > 0));
                prop_assert_eq!(q.expiries.len(), q.len());
                let mut held: HashMap<&str, usize> = HashMap::new();
                for ((owner, _), _, _) in q.places.values() {
                    *held.entry(owner.as_str()).or_default() += 1;
                }
                prop_assert_eq!(q.owners_waiting(), held.len());
                prop_assert!(held.iter().all(|(o, n)| q.len_of_owner(o) == *n), "each owner's count is its jobs'");
            }
        }
    }
}
