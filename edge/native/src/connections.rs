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
//! anyone can open one, so, once no connection is idle, the oldest of those makes room
//! (else 64 of them, what the core lets wait for a hello, would lock every newcomer out
//! of a small cap until their handshake timed out).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// File descriptors the default `MAX_CONNECTIONS` leaves for what is not a caller's or an
/// agent's connection: the result callbacks the machine may post at once
/// ([`edge_core::machine::MAX_PENDING_CALLBACKS`]), and 64 for the rest — standard
/// streams, the SQLite database with its WAL, shared memory and journal, the data
/// directory's lock, the runtime's epoll and wake-up descriptors, the listener, alerts to
/// `NOTIFY_URL`, DNS look-ups — with room to spare.
pub const RESERVED_FDS: u64 = edge_core::machine::MAX_PENDING_CALLBACKS as u64 + 64;

/// The default's ceiling, whatever the descriptor limit: each idle connection costs the
/// edge about 14 KiB (BENCHMARKS.md, "Connections"), so a limit of a million descriptors
/// would otherwise let a flood take gigabytes. 16384 is far past what the edge's own bounds
/// let legitimate work hold (queued and running jobs' callers, 64 followers, the agents).
pub const DEFAULT_MAX_CONNECTIONS: u64 = 16_384;

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
    if cap == 0 {
        return Err("MAX_CONNECTIONS must be at least 1 (unset, it follows the file descriptor limit)".into());
    }
    if cap.saturating_add(RESERVED_FDS) > nofile {
        // Below what the edge keeps for itself no value fits: "at most 0" would name one
        // that is refused. Unset, the edge starts at its floor and says when accepts fail.
        let otherwise = match nofile.saturating_sub(RESERVED_FDS) {
            0 => format!("or leave MAX_CONNECTIONS unset (the edge then holds {}, and logs when accepts fail)", default_cap(nofile)),
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

/// What the edge went through at the cap since it last said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    pub evicted: u64,
    pub refused: u64,
    /// Accepts that failed (out of descriptors, say).
    pub failed: u64,
    pub open: usize,
}

/// The open connections. `T` is how a connection is told to close (a channel's sender in
/// the server; anything in the tests).
pub struct Connections<T> {
    cap: usize,
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
    failed: u64,
    warned: Option<Instant>,
}

impl<T> Connections<T> {
    pub fn new(cap: usize) -> Self {
        Connections {
            cap: cap.max(1),
            entries: HashMap::new(),
            idle: BTreeMap::new(),
            unproven: BTreeMap::new(),
            open: 0,
            tick: 0,
            next: 0,
            evicted: 0,
            refused: 0,
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
        self.entries.insert(id, Entry { state: State::Idle { since: self.tick }, close: Some(close) });
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

    /// A request's head was read on `id`.
    pub fn busy(&mut self, id: Id) {
        self.set(id, State::Busy);
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
        self.open -= 1;
    }

    /// What to warn about at `now`, at most once per [`WARN_EVERY`]: the connections
    /// evicted and refused since the last warning (`None` if none, or too soon).
    pub fn pressure(&mut self, now: Instant) -> Option<Pressure> {
        if self.evicted == 0 && self.refused == 0 && self.failed == 0 {
            return None;
        }
        if self.warned.is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY) {
            return None;
        }
        self.warned = Some(now);
        let pressure = Pressure { evicted: self.evicted, refused: self.refused, failed: self.failed, open: self.open };
        (self.evicted, self.refused, self.failed) = (0, 0, 0);
        Some(pressure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(table: &mut Connections<u32>, close: u32) -> Id {
        match table.admit(close) {
            Admit::Open(id) => id,
            other => panic!("expected room, got {other:?}"),
        }
    }

    #[test]
    fn below_the_cap_every_connection_is_served() {
        let mut table = Connections::new(3);
        for n in 0..3 {
            opened(&mut table, n);
        }
        assert_eq!(table.open(), 3);
        assert_eq!(table.pressure(Instant::now()), None);
    }

    #[test]
    fn at_the_cap_the_connection_idle_the_longest_makes_room() {
        let mut table = Connections::new(3);
        let a = opened(&mut table, 0);
        let b = opened(&mut table, 1);
        let c = opened(&mut table, 2);
        // a answered a request after b and c started waiting: b has waited longest.
        table.busy(a);
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
        let mut table = Connections::new(3);
        let execute = opened(&mut table, 0);
        let agent = opened(&mut table, 1);
        let stream = opened(&mut table, 2);
        table.busy(execute);
        table.busy(agent);
        table.upgraded(agent, 10);
        table.pin(agent);
        // The 101's body ends: the agent's socket does not turn idle.
        table.idle(agent);
        table.busy(stream);
        assert_eq!(table.admit(3), Admit::Refuse);
        assert_eq!(table.admit(4), Admit::Refuse);
        // The execute is answered: it is idle, and the next newcomer takes its place.
        table.idle(execute);
        assert!(matches!(table.admit(5), Admit::Evict { close: 0, .. }));
        let pressure = table.pressure(Instant::now()).expect("warned");
        assert_eq!(pressure, Pressure { evicted: 1, refused: 2, failed: 0, open: 3 });
    }

    #[test]
    fn unproven_agent_sockets_make_room_once_none_is_idle_and_proven_ones_never() {
        let mut table = Connections::new(3);
        let proven = opened(&mut table, 0);
        let silent = opened(&mut table, 1);
        let idle = opened(&mut table, 2);
        for socket in [proven, silent] {
            table.busy(socket);
            table.upgraded(socket, 10 + socket.0 as u32);
            // The 101 went out: still an agent's socket, not idle.
            table.idle(socket);
        }
        table.pin(proven);
        let _ = idle;
        // The idle connection goes first, though the silent socket is older.
        assert!(matches!(table.admit(3), Admit::Evict { close: 2, .. }));
        let newcomer = Id(3);
        table.busy(newcomer);
        // Then the silent socket, reached by the close it was given at its upgrade.
        assert!(matches!(table.admit(4), Admit::Evict { close: 11, .. }));
        table.busy(Id(4));
        // Left: the proven agent and two requests in flight.
        assert_eq!(table.admit(5), Admit::Refuse);
        table.closed(silent);
        assert_eq!(table.open(), 3);
    }

    #[test]
    fn a_closed_connection_frees_its_place() {
        let mut table = Connections::new(2);
        let a = opened(&mut table, 0);
        let b = opened(&mut table, 1);
        table.busy(a);
        table.pin(b);
        table.closed(a);
        let c = opened(&mut table, 2);
        table.closed(b);
        table.closed(c);
        assert_eq!(table.open(), 0);
        // Closing twice, or an unknown id, changes nothing.
        table.closed(c);
        table.busy(c);
        assert_eq!(table.open(), 0);
    }

    #[test]
    fn out_of_descriptors_the_oldest_idle_goes_and_never_a_busy_one() {
        let mut table = Connections::new(10);
        let a = opened(&mut table, 0);
        let _b = opened(&mut table, 1);
        table.busy(a);
        assert_eq!(table.accept_failed(), Some(1));
        assert_eq!(table.accept_failed(), None);
        assert_eq!(table.open(), 1);
        assert_eq!(table.pressure(Instant::now()), Some(Pressure { evicted: 1, refused: 0, failed: 2, open: 1 }));
    }

    #[test]
    fn warnings_come_at_most_once_per_interval_and_carry_the_counts() {
        let mut table = Connections::new(1);
        let start = Instant::now();
        opened(&mut table, 0);
        assert!(matches!(table.admit(1), Admit::Evict { .. }));
        assert_eq!(table.pressure(start), Some(Pressure { evicted: 1, refused: 0, failed: 0, open: 1 }));
        assert!(matches!(table.admit(2), Admit::Evict { .. }));
        assert!(matches!(table.admit(3), Admit::Evict { .. }));
        assert_eq!(table.pressure(start + WARN_EVERY / 2), None, "too soon");
        assert_eq!(table.pressure(start + WARN_EVERY), Some(Pressure { evicted: 2, refused: 0, failed: 0, open: 1 }));
        assert_eq!(table.pressure(start + WARN_EVERY * 3), None, "nothing new");
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
        assert!(cap_setting(Some("0"), 1024).unwrap_err().contains("at least 1"));
        let too_many = cap_setting(Some("1000"), 1024).unwrap_err();
        assert!(too_many.contains("LimitNOFILE") && too_many.contains(&format!("at most {}", 1024 - RESERVED_FDS)), "{too_many}");
        // A limit below what the edge keeps for itself: no value fits, and none is offered
        // (0 is refused); unset, the edge still starts at the floor.
        let below = cap_setting(Some("16"), 100).unwrap_err();
        assert!(below.contains("LimitNOFILE") && below.contains("unset") && !below.contains("at most 0"), "{below}");
    }
}
