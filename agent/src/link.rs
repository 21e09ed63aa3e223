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
//! It also keeps what the away rule reads ([`Link::given_up`]): whether a welcomed
//! connection is up, when the edge last proved it was there ([`Link::last_heard`]: the
//! writing of the last frame of the agent's it answered, never an arrival), and the jobs
//! the last welcome said the edge gave up. The connection's silence bound is another
//! clock (`connection.rs`, `Unanswered`): it gives a slow link the time its bytes take,
//! which is no time the edge is known to have been there (rev30-2).

use shared::link::{LinkKeys, MacKey};
use shared::protocol::AgentMessage;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Default)]
pub struct Link(Arc<Mutex<Current>>);

#[derive(Default)]
struct Current {
    keys: Option<LinkKeys>,
    /// Counts the connections whose keys were set: which one a [`Sealed`] frame is for.
    connection: u64,
    /// A welcomed connection is up (the agent has not seen it end).
    connected: bool,
    /// When the edge last proved it was there: the writing of the latest frame of the agent's
    /// it answered (the hello its welcome answers, a beat an ack answers).
    last_heard: Option<Instant>,
    /// The last welcome's `LOST_AFTER_MS` (`None`: an edge of before the field).
    lost_after_ms: Option<u64>,
    /// The jobs the last welcome said the edge gave up ([`shared::protocol::Welcome::given_up`]):
    /// never started, connected or not. Replaced at each welcome: a job still held is in
    /// the next hello, and the next welcome names it again if the edge still will not have
    /// it run.
    welcome_gave_up: HashSet<String>,
    /// Tests: the checks [`Link::given_up`] answers as it is before the link is cut off and
    /// given up ([`Link::away_at_check`]).
    #[cfg(test)]
    away_at_check: Option<u32>,
}

/// How long the agent has been away from the edge at `now`, if the edge may have given up
/// the jobs it holds by then: no welcomed connection, and nothing heard from the edge for
/// longer than its `LOST_AFTER_MS`. The edge counts its wait from when it lost the agent,
/// which is no earlier than the agent's last frame from it (later by up to a heartbeat and
/// its silence detection), so this may say it a little before the edge does, never after:
/// a job then does not start, and ends "not started", never run twice. While a connection
/// is up nothing is judged so: the welcome said which jobs the edge gave up.
pub fn away_past(connected: bool, last_heard: Option<Instant>, lost_after_ms: Option<u64>, now: Instant) -> Option<Duration> {
    if connected {
        return None;
    }
    let away = now.saturating_duration_since(last_heard?);
    (away > Duration::from_millis(lost_after_ms?)).then_some(away)
}

/// Why a job must not start ([`Link::given_up`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GivenUp {
    /// Away from the edge, no connection up: nothing heard from it for `away`, longer than
    /// its `lost_after_ms` — after which it gives the job up.
    Away { away: Duration, lost_after_ms: u64 },
    /// The edge's welcome named the job: it ended it, or has it elsewhere.
    Named,
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
        self.0.lock().expect("link lock")
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
    pub fn welcomed(&self, lost_after_ms: Option<u64>, given_up: Vec<String>, hello_sent: Instant) {
        let mut current = self.lock();
        let heard = current.last_heard.map_or(hello_sent, |last| last.max(hello_sent));
        (current.connected, current.last_heard, current.lost_after_ms) = (true, Some(heard), lost_after_ms);
        current.welcome_gave_up = given_up.into_iter().collect();
    }

    /// When the edge last proved it was there (the sending of the hello its welcome
    /// answered, or the writing of a beat its ack answered): the away rule's clock.
    #[cfg(test)]
    pub fn last_heard(&self) -> Option<Instant> {
        self.lock().last_heard
    }

    /// Heard now (tests: as [`Link::heard_at`] with an ack's beat written now).
    #[cfg(test)]
    pub fn heard(&self) {
        self.heard_at(Instant::now());
    }

    /// The edge proved, in a heartbeat ack new on this connection
    /// ([`crate::agent::Agent::on_edge_message`]), that it was there at `at`, when the beat
    /// it answers was written: heard then, never moving the last frame heard back. Frames
    /// anyone on the path can write are not heard, or a hop that cut the edge off could
    /// keep the agent from ever being away; and an ack a hop held back dates only its beat.
    pub fn heard_at(&self, at: Instant) {
        let mut current = self.lock();
        current.last_heard = Some(current.last_heard.map_or(at, |last| last.max(at)));
    }

    /// The connection ended (or none was made): the agent is away from the edge, counted
    /// from the last frame it heard.
    pub fn away(&self) {
        self.lock().connected = false;
    }

    /// Whether job `job_id` must not start: the last welcome named it ([`GivenUp::Named`]),
    /// or no connection is up and the agent has heard nothing from the edge for longer than
    /// its `LOST_AFTER_MS` ([`away_past`], [`GivenUp::Away`]). Checked before a job starts
    /// (its repository checkout or the refresh gate may have outlasted a cut link). The
    /// edge ended such a job `lost` and told an `/execute` caller to fall back (or is about
    /// to): started now, the task would run twice.
    pub fn given_up(&self, job_id: &str) -> Option<GivenUp> {
        #[cfg_attr(not(test), allow(unused_mut))]
        let mut current = self.lock();
        #[cfg(test)]
        if let Some(checks) = current.away_at_check.as_mut() {
            match checks.checked_sub(1) {
                Some(left) => *checks = left,
                None => {
                    current.away_at_check = None;
                    let now = Instant::now();
                    (current.connected, current.lost_after_ms) = (false, Some(0));
                    current.last_heard = Some(now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
                }
            }
        }
        if current.welcome_gave_up.contains(job_id) {
            return Some(GivenUp::Named);
        }
        let away = away_past(current.connected, current.last_heard, current.lost_after_ms, Instant::now())?;
        Some(GivenUp::Away { away, lost_after_ms: current.lost_after_ms.unwrap_or_default() })
    }

    /// Tests: the link is cut off and given up (away a second past `LOST_AFTER_MS` 0) as
    /// its check after the next `checks` is made: a window between two checks, forced.
    #[cfg(test)]
    pub fn away_at_check(&self, checks: u32) {
        self.lock().away_at_check = Some(checks);
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

    /// An agent cut off from the edge while a job it accepted was still checking out its
    /// repository started the job after the edge had ended it `lost` (its caller told to
    /// fall back): the task ran twice. Past `LOST_AFTER_MS` without the edge it must not
    /// start; connected, or away less, nothing changes.
    #[test]
    fn a_job_is_given_up_only_once_the_agent_has_been_away_longer_than_lost_after_ms() {
        let heard = Instant::now();
        let after = |ms| heard + Duration::from_millis(ms);
        // Away longer than LOST_AFTER_MS: given up, and for how long it was away.
        assert_eq!(away_past(false, Some(heard), Some(8_000), after(8_001)), Some(Duration::from_millis(8_001)));
        // Away less, or just that long: the edge may still wait for it.
        assert_eq!(away_past(false, Some(heard), Some(8_000), after(7_999)), None);
        assert_eq!(away_past(false, Some(heard), Some(8_000), after(8_000)), None);
        // Connected: nothing changes, however long since the last frame (a heartbeat
        // interval longer than LOST_AFTER_MS).
        assert_eq!(away_past(true, Some(heard), Some(8_000), after(20_000)), None);
        // An edge that does not say its LOST_AFTER_MS, or never heard (the canary's link).
        assert_eq!(away_past(false, Some(heard), None, after(1_000_000)), None);
        assert_eq!(away_past(false, None, Some(8_000), after(1_000_000)), None);
        assert!(Link::local().given_up("j").is_none());
    }

    /// Away, the agent's own clock says whether the edge gave its jobs up; welcomed again,
    /// only the welcome does. rev29-2: after a blip the edge did not give the agent up for
    /// (it counts from when it saw the loss, up to a heartbeat and its silence detection
    /// after the agent's last frame heard), the agent's count of the absence had passed
    /// LOST_AFTER_MS, and a job accepted before it ended "not started: the edge had given
    /// the job up" — untrue: the edge had taken the job over on the new connection.
    #[test]
    fn once_welcomed_again_only_the_jobs_the_welcome_names_are_given_up() {
        let link = Link::default();
        link.set(keys(1));
        link.welcomed(Some(0), Vec::new(), Instant::now());
        link.heard();
        assert!(link.given_up("kept").is_none(), "connected");
        link.away();
        // LOST_AFTER_MS 0: given up once any time at all has passed away.
        std::thread::sleep(Duration::from_millis(2));
        let Some(GivenUp::Away { away, lost_after_ms: 0 }) = link.given_up("kept") else { panic!("away past LOST_AFTER_MS") };
        assert!(away >= Duration::from_millis(2), "{away:?}");
        // Welcomed again: the edge took `kept` over and gave `ended` up. By the agent's
        // count both were given up; only the edge knows.
        link.welcomed(Some(60_000), vec!["ended".into()], Instant::now());
        assert_eq!(link.given_up("kept"), None, "the edge did not give it up: it starts");
        assert_eq!(link.given_up("ended"), Some(GivenUp::Named));
        // Cut off again: the job named still never starts; the other only once away past
        // the new LOST_AFTER_MS.
        link.away();
        assert_eq!(link.given_up("ended"), Some(GivenUp::Named));
        assert_eq!(link.given_up("kept"), None, "away less than LOST_AFTER_MS");
        // Each welcome says anew (a job still held is in the hello it answers).
        link.welcomed(Some(60_000), Vec::new(), Instant::now());
        assert_eq!(link.given_up("ended"), None);
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
