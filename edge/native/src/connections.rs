//! How many connections the edge holds, and whom it lets go at the cap: a table without
//! I/O (the server feeds it what each connection does; it answers whom to close).
//!
//! Why: a bound on how long a request head may take ([`crate::server::HEADER_READ_TIMEOUT`])
//! does not bound how many connections are open. Anyone who reaches the port, no secret
//! needed, can open them faster than they time out until the process has no file
//! descriptor left: then no agent can reconnect and no caller is answered. So the edge
//! holds at most `MAX_CONNECTIONS`, and at the cap a new connection is not simply refused
//! (that would hand the port to whoever holds the most connections): the connection that
//! has waited longest for a request head is closed to make room. A connection with a
//! request in flight that carries the secret (an `/execute` waiting for its answer, an
//! event stream) and an agent's socket are never chosen — a request without the secret
//! does not count: pipelined and never read, such requests held the cap for anyone; only when every connection is one of those is the new one
//! closed at once. An `/agent/connect` socket that has not proven itself yet is no agent's:
//! whoever holds a proof of an agent's (one played back within its window) can open
//! one, so, once no connection is idle, the oldest of those makes room
//! (else 64 of them, what the core lets wait for a hello, would lock every newcomer out
//! of a small cap until their handshake timed out).
//!
//! A connection busy with a request that carries a secret is never closed for room, so
//! whoever holds a secret could hold every connection (bodies trickled, answers never read)
//! and lock the agents and every other caller out. So those busy connections are bounded
//! by whose secret they carry ([`edge_core::http::Holder`]): all holders together at most
//! the callers' part of the cap, what is left once [`agents_reserve`] is kept for agents'
//! sockets — an agent (re)connecting always finds an idle or unproven connection to replace,
//! or room, whatever callers hold — and each holder (the shared `RUNNER_SECRET`'s callers
//! as one, each named caller, the admin) at most an equal share of that part, so no holder
//! takes another's. Equal, not "half": with three holders or more, two halves would still
//! lock the third out, while equal shares always leave each its own. A request past its
//! holder's bound is refused ([`Over`]: the server answers 429 and closes its connection);
//! nothing busy is ever closed for it, and a request counted busy stays so until its answer
//! went out.

use edge_core::http::Holder;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// File descriptors the default `MAX_CONNECTIONS` leaves for what is not a caller's or an
/// agent's connection: the result callbacks' — the machine has at most
/// [`edge_core::machine::MAX_CALLBACKS_IN_FLIGHT`] posted at once, but the HTTP client
/// keeps its connection to each receiver posted to lately open a while, one per pending
/// callback at most ([`edge_core::machine::MAX_PENDING_CALLBACKS`]) — and 64 for the rest — standard
/// streams, the SQLite database with its WAL, shared memory and journal, the data
/// directory's lock, the runtime's epoll and wake-up descriptors, the listener, alerts to
/// `NOTIFY_URL`, DNS look-ups — with room to spare.
pub const RESERVED_FDS: u64 = edge_core::machine::MAX_PENDING_CALLBACKS as u64 + 64;

/// The default's ceiling, whatever the descriptor limit: each idle connection costs the
/// edge about 14 KiB (BENCHMARKS.md, "Connections"), so a limit of a million descriptors
/// would otherwise let a flood take gigabytes. 16384 is far past what the edge's own bounds
/// let legitimate work hold (queued and running jobs' callers, 64 followers, the agents).
pub const DEFAULT_MAX_CONNECTIONS: u64 = 16_384;

/// Of a cap, the connections callers' requests may never hold busy: kept for agents'
/// sockets, proven or proving. A quarter, at least 1: agents are few (one socket each),
/// and what callers do not hold stays open to anyone's idle connection.
pub fn agents_reserve(cap: usize) -> usize {
    (cap / 4).max(1)
}

/// How often at most the edge logs that it is at the cap.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// `MAX_CONNECTIONS` when it is not set: what the descriptor limit `nofile` leaves after
/// [`RESERVED_FDS`], at most [`DEFAULT_MAX_CONNECTIONS`], and never below 16 (an edge
/// started with a tiny limit still serves a few; it will see accept errors, logged).
pub fn default_cap(nofile: u64) -> usize {
    nofile.saturating_sub(RESERVED_FDS).clamp(16, DEFAULT_MAX_CONNECTIONS) as usize
}

/// `MAX_CONNECTIONS` as set (`None`: unset or blank), checked against the descriptor limit:
/// a cap the limit cannot hold would fail at accept instead of closing idle connections.
pub fn cap_setting(value: Option<&str>, nofile: u64) -> Result<usize, String> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(default_cap(nofile));
    };
    let cap: u64 = value
        .parse()
        .map_err(|_| format!("MAX_CONNECTIONS must be a whole number of connections, got `{value}`"))?;
    // One connection kept for agents ([`agents_reserve`]) and one for callers: with one in
    // all it was the callers' too, and a caller's request in flight locked the agent out.
    if cap < 2 {
        return Err("MAX_CONNECTIONS must be at least 2: one for an agent, one for a caller (unset, it follows the file descriptor limit)".into());
    }
    if cap.saturating_add(RESERVED_FDS) > nofile {
        // Below what the edge keeps for itself and two no value fits: "at most 1" would
        // name one that is refused. Unset, the edge starts at its floor and says when
        // accepts fail.
        let otherwise = match nofile.saturating_sub(RESERVED_FDS) {
            0 | 1 => format!("or leave MAX_CONNECTIONS unset (the edge then holds {}, and logs when accepts fail)", default_cap(nofile)),
            fits => format!("or set MAX_CONNECTIONS to at most {fits}"),
        };
        return Err(format!(
            "MAX_CONNECTIONS={cap} needs {} file descriptors with the edge's own, and the process may open {nofile}: \
             raise the limit (LimitNOFILE= in the systemd unit, `ulimit -Hn`, `--ulimit nofile=` for Docker) {otherwise}",
            cap.saturating_add(RESERVED_FDS),
        ));
    }
    usize::try_from(cap).map_err(|_| format!("MAX_CONNECTIONS={cap} is more than this machine can count"))
}

/// A connection's name in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a request head since the table's tick `since`.
    Idle { since: u64 },
    /// A request read, its answer not yet sent to its end.
    Busy,
    /// Upgraded to an agent's socket, not proven yet, since the tick `since`.
    Unproven { since: u64 },
    /// A proven agent's socket: never closed for room, whatever it does.
    Pinned,
    /// Chosen to make room; its connection is closing and no longer counted.
    Closing,
}

struct Entry<T> {
    state: State,
    /// How its connection is told to close (taken when it is chosen).
    close: Option<T>,
    /// Whose request holds it busy (only while busy).
    holder: Option<Holder>,
}

/// What to do with a connection just accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<T> {
    /// Serve it.
    Open(Id),
    /// Serve it, and close the one `close` reaches: it waited longest for a request head.
    Evict { id: Id, close: T },
    /// Close it at once: every open connection is busy or an agent's.
    Refuse,
}

/// A request refused because its secret's holder holds all it may: what it is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Over {
    pub holder: Holder,
    /// Connections it holds busy (for `whole`, all holders together).
    pub held: usize,
    pub cap: usize,
    /// The callers' part of the cap was reached (all holders together), not the holder's share.
    pub whole: bool,
    /// Its holders' part, and how many holders share it.
    pub callers: usize,
    pub holders: usize,
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Over { holder, held, cap, whole, callers, holders } = self;
        write!(f, "too many connections held by {holder}: ")?;
        // A caller with its own secret is told its own count, never the others' nor its
        // share's number (the share tells how many secrets there are: `named_share`).
        let named = matches!(holder, Holder::Caller(_));
        match (*whole, named) {
            (true, false) => write!(f, "callers together hold {held} busy, all that MAX_CONNECTIONS={cap} leaves them ({} kept for agents)", cap - callers)?,
            (true, true) => write!(f, "callers together hold all that MAX_CONNECTIONS={cap} leaves them busy ({} kept for agents)", cap - callers)?,
            (false, false) => write!(f, "{held} busy, its share of MAX_CONNECTIONS={cap} (the callers' {callers} split among {holders} secrets)")?,
            (false, true) => {
                let share = edge_core::http::named_share(&format!("the callers' {callers} of MAX_CONNECTIONS={cap}"));
                write!(f, "{held} busy, {share}")?;
            }
        }
        f.write_str(
            "; close the connections it leaves waiting (answers not read, bodies not finished) and send this again, \
             or raise MAX_CONNECTIONS",
        )
    }
}

/// What the edge went through at the cap since it last said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    pub evicted: u64,
    pub refused: u64,
    /// Requests refused because their secret's holder held all it may ([`Over`]).
    pub over_share: u64,
    /// Accepts that failed (out of descriptors, say).
    pub failed: u64,
    pub open: usize,
}

/// The open connections. `T` is how a connection is told to close (a channel's sender in
/// the server; anything in the tests).
pub struct Connections<T> {
    cap: usize,
    /// What callers' busy connections may be, all together ([`agents_reserve`] less)…
    callers: usize,
    /// …and each holder's.
    share: usize,
    holders: usize,
    /// Busy connections by holder (a few: one per secret).
    held: HashMap<Holder, usize>,
    entries: HashMap<Id, Entry<T>>,
    /// Idle connections by when they started waiting: the first is the next to go.
    idle: BTreeMap<u64, Id>,
    /// Unproven agent sockets by when they were upgraded: they go once none is idle.
    unproven: BTreeMap<u64, Id>,
    /// Entries not closing: what the cap counts.
    open: usize,
    tick: u64,
    next: u64,
    evicted: u64,
    refused: u64,
    over_share: u64,
    failed: u64,
    warned: Option<Instant>,
}

impl<T> Connections<T> {
    /// `holders`: how many secrets share the callers' part ([`edge_core::http::holders`]).
    /// Each holder's share is at least 1: below one connection per holder (a cap under
    /// about 4/3 of the holders) the callers' part, not the shares, keeps the agents' room.
    pub fn new(cap: usize, holders: usize) -> Self {
        let cap = cap.max(1);
        let callers = cap.saturating_sub(agents_reserve(cap)).max(1);
        let holders = holders.max(1);
        Connections {
            cap,
            callers,
            share: edge_core::http::equal_share(callers, holders),
            holders,
            held: HashMap::new(),
            entries: HashMap::new(),
            idle: BTreeMap::new(),
            unproven: BTreeMap::new(),
            open: 0,
            tick: 0,
            next: 0,
            evicted: 0,
            refused: 0,
            over_share: 0,
            failed: 0,
            warned: None,
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Connections counted against the cap (those closing to make room are not).
    pub fn open(&self) -> usize {
        self.open
    }

    /// A connection was accepted; `close` is how it is told to go if it is chosen later.
    pub fn admit(&mut self, close: T) -> Admit<T> {
        let evicted = if self.open >= self.cap {
            match self.take_oldest_idle() {
                Some(victim) => Some(victim),
                None => {
                    self.refused += 1;
                    return Admit::Refuse;
                }
            }
        } else {
            None
        };
        let id = Id(self.next);
        self.next += 1;
        self.tick += 1;
        self.entries.insert(id, Entry { state: State::Idle { since: self.tick }, close: Some(close), holder: None });
        self.idle.insert(self.tick, id);
        self.open += 1;
        match evicted {
            Some(close) => Admit::Evict { id, close },
            None => Admit::Open(id),
        }
    }

    /// An accept failed (out of descriptors): the connection that waited longest for a
    /// request head is chosen to go, if any is idle.
    pub fn accept_failed(&mut self) -> Option<T> {
        self.failed += 1;
        self.take_oldest_idle()
    }

    fn take_oldest_idle(&mut self) -> Option<T> {
        let (_, id) = self.idle.pop_first().or_else(|| self.unproven.pop_first())?;
        let entry = self.entries.get_mut(&id).expect("idle connections are in the table");
        entry.state = State::Closing;
        self.open -= 1;
        self.evicted += 1;
        entry.close.take()
    }

    /// A request's head was read on `id`, carrying `holder`'s secret: `id` is busy, never
    /// closed for room until its answer went out — unless `holder` holds all it may, then
    /// the request is refused ([`Over`]) and `id` stays as it was (idle: it goes first).
    /// Only an idle connection turns busy: an agent's socket, or one closing, is not
    /// counted (nor one busy already).
    pub fn busy(&mut self, id: Id, holder: Holder) -> Result<(), Over> {
        if !self.entries.get(&id).is_some_and(|e| matches!(e.state, State::Idle { .. })) {
            return Ok(());
        }
        let held = self.held.get(&holder).copied().unwrap_or(0);
        let busy: usize = self.held.values().sum();
        let whole = busy >= self.callers;
        if whole || held >= self.share {
            self.over_share += 1;
            let held = if whole { busy } else { held };
            return Err(Over { holder, held, cap: self.cap, whole, callers: self.callers, holders: self.holders });
        }
        self.set(id, State::Busy);
        *self.held.entry(holder.clone()).or_default() += 1;
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.holder = Some(holder);
        }
        Ok(())
    }

    /// `holder` holds one busy connection fewer.
    fn release(&mut self, holder: Option<Holder>) {
        let Some(holder) = holder else { return };
        if let Some(n) = self.held.get_mut(&holder) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&holder);
            }
        }
    }

    /// `id`'s answer went out to its end: it waits for a request head again. A connection
    /// that was not busy (its request did not prove the secret) keeps its place in line:
    /// a request now and then without the secret does not move it behind callers' idle
    /// keep-alive connections.
    pub fn idle(&mut self, id: Id) {
        if self.entries.get(&id).is_some_and(|e| matches!(e.state, State::Idle { .. })) {
            return;
        }
        self.tick += 1;
        self.set(id, State::Idle { since: self.tick });
    }

    /// `id` is upgraded to an agent's socket, not proven yet; `close` now reaches it (the
    /// socket outlives the HTTP connection's task).
    pub fn upgraded(&mut self, id: Id, close: T) {
        self.tick += 1;
        if self.set(id, State::Unproven { since: self.tick }) {
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.close = Some(close);
            }
        }
    }

    /// `id`'s agent proved itself: its socket is never closed for room from now on.
    pub fn pin(&mut self, id: Id) {
        self.set(id, State::Pinned);
    }

    /// Whether `id` moved to `state`. Closing and pinned connections stay so (a connection
    /// chosen to go is going), and an unproven socket only becomes pinned: its HTTP answer
    /// (the 101) ending does not make it idle.
    fn set(&mut self, id: Id, state: State) -> bool {
        let Some(entry) = self.entries.get_mut(&id) else { return false };
        match (entry.state, state) {
            (State::Closing | State::Pinned, _) => return false,
            (State::Unproven { .. }, State::Idle { .. } | State::Busy | State::Unproven { .. }) => return false,
            (State::Idle { since }, _) => {
                self.idle.remove(&since);
            }
            (State::Unproven { since }, _) => {
                self.unproven.remove(&since);
            }
            (State::Busy, _) => {}
        }
        let was_busy = entry.state == State::Busy;
        entry.state = state;
        match state {
            State::Idle { since } => {
                self.idle.insert(since, id);
            }
            State::Unproven { since } => {
                self.unproven.insert(since, id);
            }
            State::Busy | State::Pinned | State::Closing => {}
        }
        if was_busy && state != State::Busy {
            let holder = self.entries.get_mut(&id).and_then(|e| e.holder.take());
            self.release(holder);
        }
        true
    }

    /// `id`'s socket is closed.
    pub fn closed(&mut self, id: Id) {
        let Some(entry) = self.entries.remove(&id) else { return };
        match entry.state {
            State::Closing => return,
            State::Idle { since } => {
                self.idle.remove(&since);
            }
            State::Unproven { since } => {
                self.unproven.remove(&since);
            }
            State::Busy | State::Pinned => {}
        }
        self.release(entry.holder);
        self.open -= 1;
    }

    /// What to warn about at `now`, at most once per [`WARN_EVERY`]: the connections
    /// evicted and refused since the last warning (`None` if none, or too soon).
    pub fn pressure(&mut self, now: Instant) -> Option<Pressure> {
        if self.evicted == 0 && self.refused == 0 && self.over_share == 0 && self.failed == 0 {
            return None;
        }
        if self.warned.is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY) {
            return None;
        }
        self.warned = Some(now);
        let pressure =
            Pressure { evicted: self.evicted, refused: self.refused, over_share: self.over_share, failed: self.failed, open: self.open };
        (self.evicted, self.refused, self.over_share, self.failed) = (0, 0, 0, 0);
        Some(pressure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `id` turns busy with a request of the pool's secret, within its bound.
    fn busy(table: &mut Connections<u32>, id: Id) {
        table.busy(id, Holder::Pool).expect("within the bound");
    }

    fn opened(table: &mut Connections<u32>, close: u32) -> Id {
        match table.admit(close) {
            Admit::Open(id) => id,
            other => panic!("expected room, got {other:?}"),
        }
    }

    #[test]
    fn below_the_cap_every_connection_is_served() {
        let mut table = Connections::new(3, 1);
        for n in 0..3 {
            opened(&mut table, n);
        }
        assert_eq!(table.open(), 3);
        assert_eq!(table.pressure(Instant::now()), None);
    }

    #[test]
    fn at_the_cap_the_connection_idle_the_longest_makes_room() {
        let mut table = Connections::new(3, 1);
        let a = opened(&mut table, 0);
        let b = opened(&mut table, 1);
        let c = opened(&mut table, 2);
        // a answered a request after b and c started waiting: b has waited longest.
        busy(&mut table, a);
        table.idle(a);
        let Admit::Evict { id: d, close } = table.admit(3) else { panic!("room is made") };
        assert_eq!(close, 1, "b waited longest for a head");
        assert_eq!(table.open(), 3, "b, closing, is not counted");
        // b's socket closes later: nothing counted twice.
        table.closed(b);
        assert_eq!(table.open(), 3);
        let Admit::Evict { close, .. } = table.admit(4) else { panic!("room is made") };
        assert_eq!(close, 2, "then c");
        let Admit::Evict { close, .. } = table.admit(5) else { panic!("room is made") };
        assert_eq!(close, 0, "then a, which waited since its answer");
        let Admit::Evict { close, .. } = table.admit(6) else { panic!("room is made") };
        assert_eq!(close, 3, "then d, the oldest of the new ones");
        let _ = (c, d);
        // An answer on a connection that was never busy (no secret) keeps its place: e,
        // older than f, still goes first.
        let Admit::Evict { id: e, close } = table.admit(7) else { panic!("room is made") };
        assert_eq!(close, 4, "then the oldest new one");
        let Admit::Evict { close, .. } = table.admit(8) else { panic!("room is made") };
        assert_eq!(close, 5);
        table.idle(e);
        let Admit::Evict { close, .. } = table.admit(9) else { panic!("room is made") };
        assert_eq!(close, 6);
        let Admit::Evict { close, .. } = table.admit(10) else { panic!("room is made") };
        assert_eq!(close, 7, "e, answered without being busy, did not move behind the newer ones");
    }

    #[test]
    fn requests_in_flight_and_agents_are_never_chosen_and_then_the_newcomer_is_refused() {
        let mut table = Connections::new(3, 1);
        let execute = opened(&mut table, 0);
        let agent = opened(&mut table, 1);
        let stream = opened(&mut table, 2);
        busy(&mut table, execute);
        busy(&mut table, agent);
        table.upgraded(agent, 10);
        table.pin(agent);
        // The 101's body ends: the agent's socket does not turn idle.
        table.idle(agent);
        busy(&mut table, stream);
        assert_eq!(table.admit(3), Admit::Refuse);
        assert_eq!(table.admit(4), Admit::Refuse);
        // The execute is answered: it is idle, and the next newcomer takes its place.
        table.idle(execute);
        assert!(matches!(table.admit(5), Admit::Evict { close: 0, .. }));
        let pressure = table.pressure(Instant::now()).expect("warned");
        assert_eq!(pressure, Pressure { evicted: 1, refused: 2, over_share: 0, failed: 0, open: 3 });
    }

    #[test]
    fn unproven_agent_sockets_make_room_once_none_is_idle_and_proven_ones_never() {
        let mut table = Connections::new(3, 1);
        let proven = opened(&mut table, 0);
        let silent = opened(&mut table, 1);
        let idle = opened(&mut table, 2);
        for socket in [proven, silent] {
            busy(&mut table, socket);
            table.upgraded(socket, 10 + socket.0 as u32);
            // The 101 went out: still an agent's socket, not idle.
            table.idle(socket);
        }
        table.pin(proven);
        let _ = idle;
        // The idle connection goes first, though the silent socket is older.
        assert!(matches!(table.admit(3), Admit::Evict { close: 2, .. }));
        let newcomer = Id(3);
        busy(&mut table, newcomer);
        // Then the silent socket, reached by the close it was given at its upgrade.
        assert!(matches!(table.admit(4), Admit::Evict { close: 11, .. }));
        busy(&mut table, Id(4));
        // Left: the proven agent and two requests in flight.
        assert_eq!(table.admit(5), Admit::Refuse);
        table.closed(silent);
        assert_eq!(table.open(), 3);
    }

    #[test]
    fn a_closed_connection_frees_its_place() {
        let mut table = Connections::new(2, 1);
        let a = opened(&mut table, 0);
        let b = opened(&mut table, 1);
        busy(&mut table, a);
        table.pin(b);
        table.closed(a);
        let c = opened(&mut table, 2);
        table.closed(b);
        table.closed(c);
        assert_eq!(table.open(), 0);
        // Closing twice, or an unknown id, changes nothing.
        table.closed(c);
        busy(&mut table, c);
        assert_eq!(table.open(), 0);
    }

    #[test]
    fn out_of_descriptors_the_oldest_idle_goes_and_never_a_busy_one() {
        let mut table = Connections::new(10, 1);
        let a = opened(&mut table, 0);
        let _b = opened(&mut table, 1);
        busy(&mut table, a);
        assert_eq!(table.accept_failed(), Some(1));
        assert_eq!(table.accept_failed(), None);
        assert_eq!(table.open(), 1);
        assert_eq!(table.pressure(Instant::now()), Some(Pressure { evicted: 1, refused: 0, over_share: 0, failed: 2, open: 1 }));
    }

    #[test]
    fn warnings_come_at_most_once_per_interval_and_carry_the_counts() {
        let mut table = Connections::new(1, 1);
        let start = Instant::now();
        opened(&mut table, 0);
        assert!(matches!(table.admit(1), Admit::Evict { .. }));
        assert_eq!(table.pressure(start), Some(Pressure { evicted: 1, refused: 0, over_share: 0, failed: 0, open: 1 }));
        assert!(matches!(table.admit(2), Admit::Evict { .. }));
        assert!(matches!(table.admit(3), Admit::Evict { .. }));
        assert_eq!(table.pressure(start + WARN_EVERY / 2), None, "too soon");
        assert_eq!(table.pressure(start + WARN_EVERY), Some(Pressure { evicted: 2, refused: 0, over_share: 0, failed: 0, open: 1 }));
        assert_eq!(table.pressure(start + WARN_EVERY * 3), None, "nothing new");
    }

    fn caller(name: &str) -> Holder {
        Holder::Caller(name.into())
    }

    /// Callers' requests together hold at most the cap less the agents' reserve busy: past
    /// it a request is refused and its connection stays idle (first to go), and at the cap
    /// an agent's connection still finds an idle one to replace.
    #[test]
    fn callers_together_hold_at_most_the_cap_less_the_agents_reserve() {
        assert_eq!((agents_reserve(1), agents_reserve(4), agents_reserve(8), agents_reserve(16_384)), (1, 1, 2, 4096));
        let mut table = Connections::new(8, 1);
        let held: Vec<Id> = (0..6).map(|n| opened(&mut table, n)).collect();
        for &id in &held {
            busy(&mut table, id);
        }
        let extra = opened(&mut table, 6);
        let over = table.busy(extra, Holder::Pool).expect_err("past the callers' part");
        assert!(over.whole && over.held == 6, "{over:?}");
        let _idle = opened(&mut table, 7);
        // At the cap: the refused request's connection, idle, goes first; then the other.
        let Admit::Evict { id: agent, close } = table.admit(8) else { panic!("room for the agent") };
        assert_eq!(close, 6);
        table.upgraded(agent, 18);
        table.pin(agent);
        assert!(matches!(table.admit(9), Admit::Evict { close: 7, .. }));
        // A busy request answered frees its place among the callers'.
        table.idle(held[0]);
        busy(&mut table, Id(9));
        assert_eq!(table.busy(held[0], Holder::Pool).map_err(|o| o.whole), Err(true));
    }

    /// Each holder — a named caller, the shared secret's callers, the admin — holds at most
    /// an equal share of the callers' part: one at its share is refused, and the others
    /// still get theirs. Its place comes back once a request of its is answered, its
    /// connection closed, or upgraded to an agent's socket.
    #[test]
    fn each_holder_holds_at_most_its_share_and_leaves_the_others_theirs() {
        // Cap 8: 2 kept for agents, 6 for callers, 2 for each of 3 holders.
        let mut table = Connections::new(8, 3);
        let alpha: Vec<Id> = (0..3).map(|n| opened(&mut table, n)).collect();
        table.busy(alpha[0], caller("alpha")).unwrap();
        table.busy(alpha[1], caller("alpha")).unwrap();
        let over = table.busy(alpha[2], caller("alpha")).expect_err("past alpha's share");
        assert_eq!(over, Over { holder: caller("alpha"), held: 2, cap: 8, whole: false, callers: 6, holders: 3 });
        for (n, holder) in [caller("beta"), caller("beta"), Holder::Pool, Holder::Pool].into_iter().enumerate() {
            let id = opened(&mut table, 3 + n as u32);
            table.busy(id, holder).expect("another holder's share is its own");
        }
        // Answered, closed, upgraded: each gives alpha a place back.
        table.idle(alpha[0]);
        table.busy(alpha[2], caller("alpha")).expect("alpha's answered request freed its place");
        assert!(table.busy(alpha[0], caller("alpha")).is_err());
        table.closed(alpha[1]);
        table.busy(alpha[0], caller("alpha")).expect("alpha's closed connection freed its place");
        table.upgraded(alpha[0], 99);
        let id = opened(&mut table, 7);
        table.busy(id, caller("alpha")).expect("alpha's upgraded connection freed its place");
        assert_eq!(table.pressure(Instant::now()).map(|p| p.over_share), Some(2));

        // A bigger cap, a bigger share: 16 keeps 4 for agents, 12 for callers, 4 each.
        let mut table = Connections::new(16, 3);
        for n in 0..4 {
            let id = opened(&mut table, n);
            table.busy(id, Holder::Admin).expect("within the admin's share");
        }
        let id = opened(&mut table, 4);
        assert_eq!(table.busy(id, Holder::Admin).map_err(|o| o.held), Err(4));
    }

    /// More holders than the callers' part has connections: each still gets one (a share
    /// of 0 would refuse every request), and the callers' part — not the shares — keeps
    /// the agents' room.
    #[test]
    fn with_more_holders_than_places_the_callers_part_still_keeps_the_agents_room() {
        let mut table = Connections::new(4, 5);
        for (n, name) in ["a", "b", "c"].into_iter().enumerate() {
            let id = opened(&mut table, n as u32);
            table.busy(id, caller(name)).expect("one each");
        }
        let id = opened(&mut table, 3);
        assert!(table.busy(id, caller("d")).is_err_and(|o| o.whole), "the agents' one place is kept");
        assert!(matches!(table.admit(4), Admit::Evict { close: 3, .. }));
    }

    /// What a refused request is told: whose connections, the bound, and what to do.
    #[test]
    fn a_refusal_says_whose_connections_the_bound_and_what_to_do() {
        let share = Over { holder: caller("alpha"), held: 2, cap: 8, whole: false, callers: 6, holders: 3 }.to_string();
        assert!(share.starts_with("too many connections held by caller alpha: 2 busy, its equal share of the callers' 6 of MAX_CONNECTIONS=8"), "{share}");
        assert!(share.contains("close the connections it leaves waiting") && share.contains("raise MAX_CONNECTIONS"), "{share}");
        // A named caller is told its own count, never how many secrets share the callers'
        // part nor how many the others hold busy: either tells how many others there are
        // (rev31-6). The pool's holder, the operator, is told both.
        assert!(!share.contains(" 3 "), "{share}");
        let whole = Over { holder: caller("alpha"), held: 5, cap: 8, whole: true, callers: 6, holders: 3 }.to_string();
        assert!(whole.contains("callers together hold all that MAX_CONNECTIONS=8 leaves them busy (2 kept for agents)") && !whole.contains('5'), "{whole}");
        let whole = Over { holder: Holder::Pool, held: 6, cap: 8, whole: true, callers: 6, holders: 1 }.to_string();
        assert!(whole.contains("held by the callers of the shared RUNNER_SECRET") && whole.contains("(2 kept for agents)"), "{whole}");
        let share = Over { holder: Holder::Pool, held: 2, cap: 8, whole: false, callers: 6, holders: 3 }.to_string();
        assert!(share.contains("split among 3 secrets"), "{share}");
    }

    #[test]
    fn the_default_follows_the_descriptor_limit_within_bounds() {
        assert_eq!(default_cap(1024), 1024 - RESERVED_FDS as usize);
        assert_eq!(default_cap(1 << 20), DEFAULT_MAX_CONNECTIONS as usize);
        assert_eq!(default_cap(100), 16);
        assert_eq!(cap_setting(None, 1024), Ok(default_cap(1024)));
        assert_eq!(cap_setting(Some("  "), 1024), Ok(default_cap(1024)));
        assert_eq!(cap_setting(Some("8"), 1024), Ok(8));
        assert!(cap_setting(Some("eight"), 1024).unwrap_err().contains("whole number"));
        assert!(cap_setting(Some("0"), 1024).unwrap_err().contains("at least 2"));
        assert!(cap_setting(Some("1"), 1024).unwrap_err().contains("at least 2"), "a cap of 1 keeps no room for an agent beside a caller");
        assert_eq!(cap_setting(Some("2"), 1024), Ok(2));
        let too_many = cap_setting(Some("1000"), 1024).unwrap_err();
        assert!(too_many.contains("LimitNOFILE") && too_many.contains(&format!("at most {}", 1024 - RESERVED_FDS)), "{too_many}");
        // A limit below what the edge keeps for itself: no value fits, and none is offered
        // (0 is refused); unset, the edge still starts at the floor.
        let below = cap_setting(Some("16"), 100).unwrap_err();
        assert!(below.contains("LimitNOFILE") && below.contains("unset") && !below.contains("at most 0"), "{below}");
    }
}
