//! The current connection's keys (protocol 9, [`shared::link`]): what the agent sends is
//! MACed with its agent→edge key as it is queued, and the edge's result acknowledgements
//! are checked with its edge→agent key. One handle, shared by the agent and every job's
//! context; replaced at each connection's handshake. Between connections the last one's
//! keys stay: what is queued then is dropped at the next connection's start anyway
//! (results are in the spool and MACed again with the new key as they go out).
//!
//! A frame is queued only while the connection whose key MACed it is the current one
//! ([`Link::send`]): one MACed just before a reconnect's handshake and queued just after
//! it would fail its MAC on the new connection, and the edge would count the agent's own
//! words as a forgery from the path (`claude_runner_reports_refused_total`). On the
//! agent's one runtime thread a frame is made and queued with no yield in between, so
//! this holds by construction there; the check keeps it for any frame made off that
//! thread, or under a runtime with more threads (the agent had two until 7d208e4).
//!
//! It also keeps what the start rule reads ([`Link::start`]): when the edge last proved
//! it was there (the writing of the last frame of the agent's it answered, never an
//! arrival), the last welcome's `LOST_AFTER_MS`, and the jobs that welcome said the edge
//! gave up; and it wakes the jobs whose start the rule holds when the edge proves it is
//! there again ([`Link::proven`]). What the connection wrote and the edge has not answered
//! yet ([`Link::carrying`]) is kept only for what a start held until its deadline says. The connection's silence bound is another clock
//! (`connection.rs`, `Unanswered`): it gives a slow link the time its bytes take, which
//! is no time the edge is known to have been there (rev30-2). Every time here is a
//! [`crate::boot_clock`] reading, which counts a suspend as the edge does (rev34-1).

use shared::link::{LinkKeys, MacKey};
use shared::protocol::AgentMessage;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use crate::boot_clock::BootInstant;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Default)]
pub struct Link(Arc<Shared>);

#[derive(Default)]
struct Shared {
    current: Mutex<Current>,
    /// Told whenever the edge proves it was there (a welcome, a new ack), and whenever a
    /// welcome says which jobs it gave up: the starts the rule holds look again.
    proven: tokio::sync::Notify,
}

#[derive(Default)]
struct Current {
    keys: Option<LinkKeys>,
    /// Counts the connections whose keys were set: which one a [`Sealed`] frame is for.
    connection: u64,
    /// When the edge last proved it was there: the writing of the latest frame of the agent's
    /// it answered (the hello its welcome answers, a beat an ack answers).
    last_heard: Option<BootInstant>,
    /// The last welcome's `LOST_AFTER_MS` (`None`: an edge of before the field).
    lost_after_ms: Option<u64>,
    /// The jobs the last welcome said the edge gave up ([`shared::protocol::Welcome::given_up`]):
    /// never started, connected or not. Replaced at each welcome: a job still held is in
    /// the next hello, and the next welcome names it again if the edge still will not have
    /// it run.
    welcome_gave_up: HashSet<String>,
    /// The bytes the connection up now wrote that the edge is not known to have read
    /// (`connection.rs`, `Unanswered::bytes`), told as they are written and as acks come;
    /// `None` while no connection is up. Only for saying why a start was held: no answer
    /// of the edge's can come back ahead of them, and an ended job said "heard nothing
    /// from the edge" while the link carried a large result and the edge was there
    /// (rev34-4). Never a reason to start: a hop that reads and drops everything takes
    /// bytes as well as the edge does (rev30-1).
    carrying: Option<Carrying>,
    /// Tests: the checks [`Link::start`] answers as it is before the link is cut off and
    /// nothing the edge proved is fresh ([`Link::away_at_check`]).
    #[cfg(test)]
    away_at_check: Option<u32>,
}

/// The start rule: a job's prompt is written only while the last frame the edge proved
/// it read was written less than its `LOST_AFTER_MS` before `now` — and, for a start held
/// since `held` (the check that held it), written after that check. The edge gives a job
/// up `LOST_AFTER_MS` after it lost the agent, which is no earlier than the agent's last
/// frame it read: a job started under this rule is one the edge still holds for it,
/// connected or not. "Connected" is the agent's own view, and a hop that cut the edge off
/// and read (and dropped) all the agent wrote kept it so, its silence bound grown with
/// every byte (rev30-1): a job held at its start started after the edge had told its
/// caller to fall back. An edge that says no `LOST_AFTER_MS` (of before the field), or a
/// link never welcomed (the canary's), holds nothing.
pub fn fresh(last_heard: Option<BootInstant>, lost_after_ms: Option<u64>, held: Option<BootInstant>, now: BootInstant) -> bool {
    let Some(lost_after_ms) = lost_after_ms else { return true };
    last_heard.is_some_and(|heard| now.saturating_duration_since(heard) < Duration::from_millis(lost_after_ms) && held.is_none_or(|held| heard > held))
}

/// What the start rule says of a job now ([`Link::start`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Its prompt may be written.
    Go,
    /// Never: the edge's last welcome named it ([`GivenUp::Named`]).
    GivenUp(GivenUp),
    /// Not now: the last frame the edge proved it read was written `heard` ago (`None`:
    /// none), not less than `lost_after_ms`, or before the check that held the start.
    Hold { heard: Option<Duration>, lost_after_ms: u64 },
}

/// Why a job must not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GivenUp {
    /// Held until its deadline ([`Start::Hold`]): nothing the edge proved was fresh for
    /// `away` (`None`: never), longer than its `lost_after_ms` — after which it gives the
    /// job up. `carrying`: the bytes the connection, up at the deadline, had written that
    /// the edge was not known to have read ([`Link::carrying`]; `None`: no connection).
    Away { away: Option<Duration>, lost_after_ms: u64, carrying: Option<Carrying> },
    /// The edge's welcome named the job: it ended it, or has it elsewhere.
    Named,
}

/// What the connection up wrote that the edge is not known to have read ([`Link::carrying`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carrying {
    pub bytes: u64,
    /// The connection's allowance for an edge that read a beat to answer it (two
    /// heartbeat intervals): silence up to it needs no bytes in flight to explain it.
    pub allowance: Duration,
}

impl Carrying {
    /// Whether these bytes could account for `away` of silence: the allowance and their
    /// time at the slowest uplink served ([`crate::connection::for_bytes`], the silence
    /// bound's own measure) come to at least `away`. rev35: two heartbeats (1.6 kB) in
    /// flight to an edge frozen for seconds were told as "a large result or output, at the
    /// link's speed".
    pub fn accounts_for(&self, away: Duration) -> bool {
        let bytes = usize::try_from(self.bytes).unwrap_or(usize::MAX);
        self.bytes > 0 && crate::connection::for_bytes(self.allowance, bytes) >= away
    }
}

/// A frame MACed with one connection's key, for [`Link::send`].
pub struct Sealed {
    connection: u64,
    msg: AgentMessage,
}

impl Link {
    /// A link that is not an edge connection's (the local canary job's): fresh keys.
    pub fn local() -> Link {
        let keys = LinkKeys { agent_to_edge: MacKey::from_bytes(runtime::entropy()), edge_to_agent: MacKey::from_bytes(runtime::entropy()) };
        let link = Link::default();
        link.set(keys);
        link
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.0.current.lock().expect("link lock")
    }

    /// A new connection's keys, agreed in its handshake.
    pub fn set(&self, keys: LinkKeys) {
        let mut current = self.lock();
        current.keys = Some(keys);
        current.connection += 1;
    }

    /// The edge welcomed the agent, saying its `LOST_AFTER_MS` and the jobs of the hello
    /// it gave up (`given_up`), in answer to the hello sent at `hello_sent`: heard then, not
    /// as the welcome arrived (a hop may have held it back, rev30-2). The jobs it gave up
    /// never start, although the agent is connected again (the edge's stray-cancel for them
    /// may come late: it is read after the results resent, a few a heartbeat). Every other
    /// job held may: the edge took it over. The agent's own count of the absence is not
    /// asked (rev29-2: it counts from its last frame heard, the edge from when it saw the
    /// loss, later, and after a blip the edge had not given up the agent took jobs for
    /// given up).
    pub fn welcomed(&self, lost_after_ms: Option<u64>, given_up: Vec<String>, hello_sent: BootInstant) {
        {
            let mut current = self.lock();
            let heard = current.last_heard.map_or(hello_sent, |last| last.max(hello_sent));
            (current.last_heard, current.lost_after_ms) = (Some(heard), lost_after_ms);
            current.welcome_gave_up = given_up.into_iter().collect();
        }
        self.0.proven.notify_waiters();
    }

    /// When the edge last proved it was there (the sending of the hello its welcome
    /// answered, or the writing of a beat its ack answered): the away rule's clock.
    #[cfg(test)]
    pub fn last_heard(&self) -> Option<BootInstant> {
        self.lock().last_heard
    }

    /// The edge proved, in a heartbeat ack new on this connection
    /// ([`crate::agent::Agent::on_edge_message`]), that it was there at `at`, when the beat
    /// it answers was written: heard then, never moving the last frame heard back. Frames
    /// anyone on the path can write are not heard, or a hop that cut the edge off could
    /// keep the agent from ever being away; and an ack a hop held back dates only its beat.
    pub fn heard_at(&self, at: BootInstant) {
        {
            let mut current = self.lock();
            current.last_heard = Some(current.last_heard.map_or(at, |last| last.max(at)));
        }
        self.0.proven.notify_waiters();
    }

    /// Told when the edge next proves it was there, or a welcome names the jobs it gave up:
    /// for a start the rule holds ([`Start::Hold`]) to look again. Made (and enabled) before
    /// the look, so that nothing told between the two is missed.
    pub fn proven(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.proven.notified()
    }

    /// Whether job `job_id` may start now — [`fresh`], for a start held since `held` — or
    /// never: the last welcome named it as given up (ended, or sent elsewhere). Checked
    /// before a job's started record is written and again right before Claude gets its
    /// prompt (its repository checkout or the refresh gate may have outlasted a cut link,
    /// or a hop that keeps the connection up without the edge). The edge gave up a job the
    /// rule holds, or is about to, and told an `/execute` caller to fall back: started
    /// then, the task would run twice.
    pub fn start(&self, job_id: &str, held: Option<BootInstant>) -> Start {
        #[cfg_attr(not(test), allow(unused_mut))]
        let mut current = self.lock();
        #[cfg(test)]
        if let Some(checks) = current.away_at_check.as_mut() {
            match checks.checked_sub(1) {
                Some(left) => *checks = left,
                None => {
                    current.away_at_check = None;
                    let now = BootInstant::now();
                    current.last_heard = Some(now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
                    current.lost_after_ms = current.lost_after_ms.map(|ms| ms.min(1_000));
                }
            }
        }
        if current.welcome_gave_up.contains(job_id) {
            return Start::GivenUp(GivenUp::Named);
        }
        let now = BootInstant::now();
        if fresh(current.last_heard, current.lost_after_ms, held, now) {
            return Start::Go;
        }
        Start::Hold { heard: current.last_heard.map(|heard| now.saturating_duration_since(heard)), lost_after_ms: current.lost_after_ms.unwrap_or_default() }
    }

    /// Tests: nothing the edge proved is fresh (heard a second ago, `LOST_AFTER_MS` at most
    /// a second) as its check after the next `checks` is made: a window between two
    /// checks, forced.
    #[cfg(test)]
    pub fn away_at_check(&self, checks: u32) {
        self.lock().away_at_check = Some(checks);
    }

    /// What the connection up now wrote that the edge is not known to have read (`None`:
    /// the connection ended): told by the connection as it writes and as acks come.
    pub fn carrying(&self, now: Option<Carrying>) {
        self.lock().carrying = now;
    }

    /// [`Link::carrying`], as last told.
    pub fn carried(&self) -> Option<Carrying> {
        self.lock().carrying
    }

    /// The key the agent MACs its frames with on this connection, if there is one.
    pub fn mine(&self) -> Option<MacKey> {
        self.lock().keys.as_ref().map(|k| k.agent_to_edge.clone())
    }

    /// The key the edge MACs its frames with on this connection, if there is one.
    pub fn edges(&self) -> Option<MacKey> {
        self.lock().keys.as_ref().map(|k| k.edge_to_agent.clone())
    }

    /// A frame `make` MACs with this connection's key (outside the lock: a large result
    /// takes milliseconds), or `None` before the first connection.
    pub fn seal(&self, make: impl FnOnce(&MacKey) -> AgentMessage) -> Option<Sealed> {
        let (connection, key) = {
            let current = self.lock();
            (current.connection, current.keys.as_ref()?.agent_to_edge.clone())
        };
        Some(Sealed { connection, msg: make(&key) })
    }

    /// Queues a sealed frame, unless another connection's keys came since it was made
    /// (then it is dropped: it would fail its MAC there, and what it says is either sent
    /// again — a result, from the spool — or was about the connection that ended). The
    /// lock is held while it is queued, so a frame is queued before the next connection's
    /// keys are set (and dropped with the rest of the old queue) or not at all.
    pub fn send(&self, uplink: &UnboundedSender<AgentMessage>, sealed: Sealed) -> bool {
        self.send_with(vec![sealed], |msgs| msgs.into_iter().all(|msg| uplink.send(msg).is_ok()))
    }

    /// [`Link::send`] of frames that go together or not at all (a job's progress, on its
    /// queue, [`crate::uplink::JobProgress`]): `queue` is handed them while the lock is
    /// held, if all were made with the current connection's key.
    pub fn send_with(&self, sealed: Vec<Sealed>, queue: impl FnOnce(Vec<AgentMessage>) -> bool) -> bool {
        let current = self.lock();
        sealed.iter().all(|s| s.connection == current.connection) && queue(sealed.into_iter().map(|s| s.msg).collect())
    }

    /// [`Link::seal`] then [`Link::send`].
    pub fn seal_and_send(&self, uplink: &UnboundedSender<AgentMessage>, make: impl FnOnce(&MacKey) -> AgentMessage) -> bool {
        self.seal(make).is_some_and(|sealed| self.send(uplink, sealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::envelope::Domain;
    use shared::protocol::ResultReport;

    fn keys(n: u8) -> LinkKeys {
        LinkKeys { agent_to_edge: MacKey::from_bytes([n; 32]), edge_to_agent: MacKey::from_bytes([n + 100; 32]) }
    }

    fn result(key: &MacKey) -> AgentMessage {
        let report = ResultReport { job_id: "j1".into(), order_nonce: "j1:1".into(), result: Default::default() };
        AgentMessage::result_text(serde_json::to_string(&report).unwrap(), key)
    }

    /// The start rule: a job starts only while the last frame the edge proved it read was
    /// written less than LOST_AFTER_MS ago — connected or not: rev30-1, a hop that cut the
    /// edge off and read everything kept the agent "connected", and a job held at its start
    /// started after the edge had given it up. A start held since a check goes only on a
    /// frame written after that check.
    #[test]
    fn a_job_starts_only_while_a_frame_the_edge_proved_is_younger_than_lost_after_ms() {
        let heard = BootInstant::now();
        let after = |ms| heard + Duration::from_millis(ms);
        assert!(fresh(Some(heard), Some(8_000), None, after(7_999)));
        // Just as old as LOST_AFTER_MS, or older: the edge may have given the job up.
        assert!(!fresh(Some(heard), Some(8_000), None, after(8_000)));
        assert!(!fresh(Some(heard), Some(8_000), None, after(20_000)));
        // Held since a check: a frame written before it, however young, does not let it go;
        // one written after does, while younger than LOST_AFTER_MS.
        assert!(!fresh(Some(heard), Some(8_000), Some(after(1)), after(2)));
        assert!(!fresh(Some(heard), Some(8_000), Some(heard), after(2)));
        assert!(fresh(Some(after(5)), Some(8_000), Some(heard), after(10)));
        assert!(!fresh(Some(after(5)), Some(8_000), Some(heard), after(8_005)), "let out late: older than LOST_AFTER_MS by now");
        // Nothing heard yet: held. An edge that does not say its LOST_AFTER_MS, or a link
        // never welcomed (the canary's): nothing to judge by.
        assert!(!fresh(None, Some(8_000), None, after(1)));
        assert!(fresh(Some(heard), None, None, after(1_000_000)));
        assert!(fresh(None, None, Some(heard), after(1)));
        assert_eq!(Link::local().start("j", None), Start::Go);
        // A link: heard as the welcome's hello was sent, then by the acks' beats.
        let link = Link::default();
        link.welcomed(Some(20), Vec::new(), BootInstant::now());
        assert_eq!(link.start("j", None), Start::Go);
        std::thread::sleep(Duration::from_millis(25));
        let Start::Hold { heard: Some(ago), lost_after_ms: 20 } = link.start("j", None) else { panic!("held") };
        assert!(ago >= Duration::from_millis(25), "{ago:?}");
        let held = BootInstant::now();
        link.heard_at(held.checked_sub(Duration::from_millis(1)).unwrap_or(held));
        assert!(matches!(link.start("j", Some(held)), Start::Hold { .. }), "a beat written before the check");
        link.heard_at(BootInstant::now());
        assert_eq!(link.start("j", Some(held)), Start::Go, "a beat written after it, answered");
    }

    /// rev34-1: the rule's ages count a suspend. Spark slept with a job at the refresh
    /// gate; the edge, whose clock ran on, gave the job up `LOST_AFTER_MS` later and told
    /// its caller to fall back; on resume the monotonic clock had moved a few seconds and
    /// the job started: run twice. Here the machine's clocks are the test's: a suspend
    /// moves the boot clock and not the monotonic one.
    #[test]
    fn a_suspend_holds_a_job_the_edge_gave_up_meanwhile() {
        let machine = crate::boot_clock::tests::Machine::install();
        let link = Link::default();
        link.welcomed(Some(30_000), Vec::new(), BootInstant::now());
        machine.run(Duration::from_secs(2));
        link.heard_at(BootInstant::now());
        machine.run(Duration::from_secs(1));
        assert_eq!(link.start("j", None), Start::Go, "heard a second ago");
        // Suspended for a minute (the edge gave the job up after 30 s of it), then awake for
        // a second: the monotonic clock says the edge was heard 2 s ago.
        machine.suspend(Duration::from_secs(60));
        machine.run(Duration::from_secs(1));
        let Start::Hold { heard: Some(ago), lost_after_ms: 30_000 } = link.start("j", None) else {
            panic!("a job started after a suspend longer than LOST_AFTER_MS: the edge had given it up")
        };
        assert_eq!(ago, Duration::from_secs(62));
        // Held since that check: the edge answering a beat written after it lets it go.
        let held = BootInstant::now();
        machine.run(Duration::from_millis(10));
        link.heard_at(BootInstant::now());
        assert_eq!(link.start("j", Some(held)), Start::Go);
    }

    /// A held start wakes when the edge proves it is there (a new ack, a welcome): told,
    /// not found by polling.
    #[tokio::test]
    async fn a_held_start_is_woken_by_the_edges_proof() {
        let link = Link::default();
        link.welcomed(Some(60_000), Vec::new(), BootInstant::now());
        let proven = link.proven();
        tokio::pin!(proven);
        proven.as_mut().enable();
        let heard = link.clone();
        tokio::spawn(async move { heard.heard_at(BootInstant::now()) });
        tokio::time::timeout(Duration::from_secs(60), proven).await.expect("woken by the ack");
    }

    /// Welcomed again, the welcome says which jobs the edge gave up; the rest start by the
    /// rule. rev29-2: after a blip the edge did not give the agent up for (it counts from
    /// when it saw the loss, up to a heartbeat and its silence detection after the agent's
    /// last frame heard), the agent's count of the absence had passed LOST_AFTER_MS, and a
    /// job accepted before it ended "not started: the edge had given the job up" — untrue:
    /// the edge had taken the job over on the new connection.
    #[test]
    fn once_welcomed_again_only_the_jobs_the_welcome_names_are_given_up() {
        let link = Link::default();
        link.set(keys(1));
        link.welcomed(Some(0), Vec::new(), BootInstant::now());
        // LOST_AFTER_MS 0: nothing is ever fresh enough.
        assert!(matches!(link.start("kept", None), Start::Hold { lost_after_ms: 0, .. }));
        // Welcomed again: the edge took `kept` over and gave `ended` up.
        link.welcomed(Some(60_000), vec!["ended".into()], BootInstant::now());
        assert_eq!(link.start("kept", None), Start::Go, "the edge did not give it up: it starts");
        assert_eq!(link.start("ended", None), Start::GivenUp(GivenUp::Named));
        // Each welcome says anew (a job still held is in the hello it answers).
        link.welcomed(Some(60_000), Vec::new(), BootInstant::now());
        assert_eq!(link.start("ended", None), Start::Go);
    }

    /// The race of a job ending while the agent reconnects: its result MACed with the
    /// ended connection's key, the new connection's keys set (and the old queue dropped),
    /// then the result queued. It must not go out on the new connection, where the edge
    /// would refuse it as a forgery; the spool sends it there under the new key.
    #[test]
    fn a_frame_made_with_an_ended_connections_key_is_never_queued_on_the_next() {
        let (uplink, mut queued) = tokio::sync::mpsc::unbounded_channel();
        let link = Link::default();
        assert!(link.seal(result).is_none() && !link.seal_and_send(&uplink, result), "no connection yet");
        link.set(keys(1));
        let made_before = link.seal(result).unwrap();
        link.set(keys(2));
        assert!(!link.send(&uplink, made_before));
        assert!(queued.try_recv().is_err(), "a frame with the ended connection's MAC was queued");
        assert!(link.seal_and_send(&uplink, result));
        let Ok(AgentMessage::Result { envelope }) = queued.try_recv() else { panic!("the result, queued") };
        assert!(envelope.open::<ResultReport>(Domain::Result, &keys(2).agent_to_edge).is_ok(), "MACed with the current key");
    }
}
