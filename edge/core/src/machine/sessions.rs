//! Agent connections: the handshake, then what a proven agent says — heartbeats, credits,
//! acceptances, progress, results — and what happens when it reconnects or goes away.

use super::login::{Told, CANNOT_START_WHY};
use super::storage::Origin;
use super::{Edge, Effect};
use crate::clock::Now;
use crate::record::Job;
use crate::session::{self, Agent, Arriving, Phase, Refused, Session};
use shared::contract::{ApiError, ErrorCode, MIN_UPLINK_BYTES_PER_SEC};
use shared::envelope::{Domain, Envelope, EnvelopeError, Tagged};
use shared::link::{Ephemeral, LinkKeys};
use shared::ids::{hex, shown_job_id};
use shared::job::{JobResult, JobState};
use shared::keys;
use shared::Millis;
use shared::oauth::OAuthReport;
use shared::protocol::{self, close, AgentMessage, Beat, EdgeMessage, Hello, LoginReport, ProgressEvent, RawProgressReport, Rejection, ResultReport, Slots, StartReport, Welcome, MAX_CAPACITY, MAX_HELLO_FINISHED, PROTOCOL_VERSION};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use tracing::{debug, info, warn};

/// Connections that have not answered their challenge yet, at most. Past it a new one is
/// still taken, and an older unproven one closed: anyone may open connections, so a
/// bound that refused the newest would let them lock the real agent out.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Unproven connections from one source ([`session::source_of`]), at most.
pub const MAX_PENDING_PER_SOURCE: usize = 16;

/// Jobs an agent holds that the edge has no record of, cancelled at most in one hello or
/// heartbeat (the rest in the next ones, in turn; see [`Edge::stop_ended`]).
pub const MAX_STRAY_CANCELS: usize = 8;
/// A job sent this many times ([`crate::record::Job::attempts`]: every order of it counts,
/// one lost with its connection and sent again too, not only those refused) ends at its
/// next refusal (with `retry`) instead of being sent again: agents that cannot start it (a
/// full disk, a process limit) hand it back ([`shared::protocol::Beat::cannot_start`]), and
/// each holds itself back first, but one that heals between tries, or several, could pass
/// it round for ever.
pub const MAX_JOB_SENDS: u32 = 16;

/// Why a hello or heartbeat (`what`) naming `running` jobs as running, from an agent that
/// states `capacity`, closes its connection, if it does. No agent runs more jobs than its
/// capacity, nor than [`MAX_CAPACITY`]: a list past that is a broken agent or its key in
/// other hands, and each name in it costs the edge work (and named a job the edge did not
/// know, a signed cancel — 100,000 made-up names in one 3 MB beat took the native edge's
/// one driver thread 2.75 s, every beat). Closed rather than cut short: a cut list would
/// leave jobs it drops taken for gone.
fn overfull(what: &str, running: usize, capacity: u32) -> Option<Refused> {
    let most = capacity.min(MAX_CAPACITY);
    (running > most as usize).then(|| {
        Refused::new(
            close::PROTOCOL_ERROR,
            format!(
                "a {what} naming {running} running jobs, more than the agent's capacity of {most} (MAX_CONCURRENT_JOBS, at most {MAX_CAPACITY}): \
                 no agent runs more; upgrade the agent, or check who else holds its key"
            ),
        )
    })
}

/// A frame on a connection the machine does not know (it closed it, or its record was
/// lost with the host's memory) can never be served: the agent reconnects and proves
/// itself again.
const UNKNOWN_SESSION: &str = "the edge has no record of this connection; reconnect";

/// Why an unproven connection was closed to make room for a newer one.
const EVICTED: &str =
    "too many connections were waiting to prove themselves and this one had waited longest; reconnect and send the signed hello at once";

impl Edge {
    /// A WebSocket opened on `/agent/connect` by `peer` (its address, as the host knows
    /// it), whose upgrade request carried `agent_nonce` (the `X-Runner-Agent-Nonce`
    /// header, as the host read it). `entropy` makes the session id and the challenge
    /// nonce (its first 32 bytes) and the edge's X25519 key for this connection (the last
    /// 32). The challenge carries the edge's signature over the nonce
    /// ([`shared::envelope::ChallengeProof`]): the agent says nothing more until it holds.
    /// Without a nonce (an agent of within protocol 10, before it: no release since 11
    /// dials without one) the connection is closed, saying to upgrade the agent; it got an
    /// unsigned challenge until protocol 12.
    pub fn connect(&mut self, now: impl Into<Now>, entropy: [u8; 64], peer: &str, agent_nonce: Option<&str>) -> (String, Vec<Effect>) {
        let now = now.into();
        let id = hex(&entropy[..8]);
        self.begin(Origin::Session(id.clone()), Some(now));
        if self.stopping {
            let reason = "the edge is restarting; reconnect shortly".to_string();
            return (id.clone(), vec![Effect::Close { session: id, code: close::SHUTTING_DOWN, reason }]);
        }
        // The peer's words, and they would be signed: only a nonce's shape is.
        let agent_nonce = match agent_nonce {
            Some(n) if shared::envelope::valid_agent_nonce(n) => n,
            Some(_) => {
                let source = session::source_of(peer);
                warn!(session = %id, source = %source, "agent connection with a malformed agent nonce; closing it");
                // Short enough for a close frame (123 bytes), which is all such a peer gets.
                let reason = close::reason("X-Runner-Agent-Nonce is not 16-64 characters of base64, sent once: run an agent of the edge's release");
                return (id.clone(), vec![Effect::Close { session: id, code: close::PROTOCOL_ERROR, reason }]);
            }
            None => {
                let source = session::source_of(peer);
                warn!(session = %id, source = %source, "agent connection without an agent nonce (an agent older than the edge); closing it");
                // A close frame's 123 bytes: the agent of before reads it as a refusal.
                let reason = close::reason("no X-Runner-Agent-Nonce: this agent is older than the edge; upgrade claude-runner on the agent");
                return (id.clone(), vec![Effect::Close { session: id, code: close::VERSION_MISMATCH, reason }]);
            }
        };
        let source = session::source_of(peer);
        let mut effects = Vec::new();
        if let Some(victim) = self.pending_victim(&source) {
            let from = self.sessions.get(&victim).map(|s| s.source.clone()).unwrap_or_default();
            warn!(session = %victim, source = %from, "too many unproven agent connections; closing the one waiting longest");
            self.close(now, &victim, Refused::new(close::SILENT, EVICTED), &mut effects);
        }
        let nonce = keys::encode(&entropy[8..32]);
        let ephemeral = Ephemeral::new(entropy[32..].try_into().expect("32 bytes"));
        let session = Session {
            id: id.clone(),
            source,
            connected_at: now.at,
            last_seen: now.at,
            arriving: None,
            waiting: None,
            phase: Phase::Challenged { nonce: nonce.clone(), ephemeral },
        };
        let proof = Some(shared::envelope::ChallengeProof::sign(&self.cfg.signing_key, PROTOCOL_VERSION, &nonce, agent_nonce, &self.cfg.pool));
        let challenge = EdgeMessage::Challenge {
            protocol: PROTOCOL_VERSION,
            nonce,
            edge_version: self.cfg.edge_version.clone(),
            server_time: now.wall,
            proof,
        };
        self.insert_session(session);
        effects.push(self.save_session(&id));
        effects.push(Effect::Send { session: id.clone(), text: challenge.to_text() });
        (id, effects)
    }

    /// An upgrade to `/agent/connect` from `peer` (its address) carrying `proof` (the
    /// `X-Runner-Agent-Proof` header, its values joined with `, `): `Ok` is the agent's id,
    /// and the host may accept the socket ([`Edge::connect`]); `Err` is the 401 to answer,
    /// counted and logged ([`Edge::upgrade_refused`]).
    pub fn check_upgrade(&mut self, now: impl Into<Now>, proof: Option<&str>, peer: &str) -> Result<String, ApiError> {
        let now = now.into();
        crate::upgrade::check_upgrade(proof, &self.cfg, now.wall).inspect_err(|refused| self.upgrade_refused(now, peer, refused))
    }

    /// An upgrade from `peer` refused with `refused` (by [`crate::upgrade::check_upgrade`],
    /// which a host may run where it reads the request, off the machine's turn): counted
    /// in `claude_runner_agents_refused_total`, logged with a bound ([`crate::upgrade::Refusals`]).
    pub fn upgrade_refused(&mut self, now: impl Into<Now>, peer: &str, refused: &ApiError) {
        let now = now.into();
        self.begin(Origin::Quiet, Some(now));
        self.upgrades.note(now.wall, &self.cfg.pool, peer, refused);
        let counted = self.upgrades.take();
        self.agents_refused(counted);
    }

    /// Upgrades refused before they reached the machine, already logged where they were
    /// (the Worker's entry, which refuses them without asking the pool's object): counted.
    pub fn upgrades_refused_before(&mut self, count: u64) {
        self.begin(Origin::Quiet, None);
        self.agents_refused(count);
    }

    /// Adds to `claude_runner_agents_refused_total`, saturating: the Worker's object adds
    /// whatever count its entry hands it, and a counter never panics or wraps to 0.
    fn agents_refused(&mut self, count: u64) {
        let stats = self.stats_mut();
        stats.refused_agents = stats.refused_agents.saturating_add(count);
    }

    /// Connections that have not proven themselves yet.
    pub fn unproven_connections(&self) -> usize {
        self.sessions.values().filter(|s| s.agent().is_none()).count()
    }

    /// The unproven connection to close so one more from `source` fits: the oldest of that
    /// source once it has its fill, else — when all unproven connections together have
    /// theirs — the oldest of the source with the most of them. Whoever floods the edge
    /// with silent connections thus closes its own, while an agent's connection, which
    /// proves itself within one round trip, is never the oldest for long.
    fn pending_victim(&self, source: &str) -> Option<String> {
        let pending: Vec<&Session> = self.sessions.values().map(|s| &**s).filter(|s| s.agent().is_none()).collect();
        let mut per_source: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &pending {
            *per_source.entry(s.source.as_str()).or_default() += 1;
        }
        let oldest_of = |sources: &[&str]| {
            pending
                .iter()
                .filter(|s| sources.contains(&s.source.as_str()))
                .min_by_key(|s| (s.connected_at, s.id.as_str()))
                .map(|s| s.id.clone())
        };
        if per_source.get(source).copied().unwrap_or(0) >= MAX_PENDING_PER_SOURCE {
            return oldest_of(&[source]);
        }
        if pending.len() < MAX_PENDING_HANDSHAKES {
            return None;
        }
        let most = per_source.values().copied().max().unwrap_or(0);
        let crowded: Vec<&str> = per_source.iter().filter(|(_, n)| **n == most).map(|(s, _)| *s).collect();
        oldest_of(&crowded)
    }

    /// The connection closed (or errored). Its jobs wait for the agent to come back.
    pub fn disconnect(&mut self, now: impl Into<Now>, session_id: &str) -> Vec<Effect> {
        self.peer_closed(now, session_id, None)
    }

    /// The connection closed, with the peer's close frame when it sent one (`code`,
    /// `reason`): logged with the disconnection, since an agent that refuses the edge (its
    /// welcome signed with another key than the agent's EDGE_PUBLIC_KEY) says why only
    /// there, and the edge's log said "agent disconnected" and nothing else.
    pub fn peer_closed(&mut self, now: impl Into<Now>, session_id: &str, frame: Option<(u16, &str)>) -> Vec<Effect> {
        let now = now.into();
        self.begin(Origin::Disconnect, Some(now));
        let mut effects = Vec::new();
        let was_working = self.session(session_id).and_then(|s| s.agent()).is_some_and(|a| !a.held_back());
        self.drop_session_closed(now, session_id, frame, &mut effects);
        // The agents left that fit a queued `/execute` may all be paused or stopping now:
        // it ends, as a new one is refused — in the next tick, at once: ended here, a
        // failed write would leave it ended in memory only, its caller's answer dropped.
        // (Not where the edge closes a connection itself: a replaced one's agent is back on
        // the newer connection.)
        if was_working && !self.queue.is_empty() {
            self.held_back_due = Some(now.at);
        }
        effects
    }

    /// Lists an agent as gone since now (`/health` shows it down for
    /// [`super::DOWN_SHOWN_MS`]), or no longer. Stored with alerting's memory, so the
    /// Worker's rebuilt machine shows it too; those listed longer than that go then.
    fn note_departed(&mut self, now: Now, agent_id: &str, gone: bool, effects: &mut Vec<Effect>) {
        let before = self.alerts.clone();
        let departed = &mut self.alerts.departed;
        departed.retain(|_, t| t.saturating_add(super::DOWN_SHOWN_MS) > now.at);
        match gone {
            true => departed.insert(agent_id.to_string(), now.at),
            false => departed.remove(agent_id),
        };
        if self.alerts != before {
            self.note_alerts(before);
            effects.push(Effect::SaveAlerts(Box::new(self.alerts.clone())));
        }
    }

    fn drop_session(&mut self, now: Now, session_id: &str, effects: &mut Vec<Effect>) {
        self.drop_session_closed(now, session_id, None, effects);
    }

    fn drop_session_closed(&mut self, now: Now, session_id: &str, frame: Option<(u16, &str)>, effects: &mut Vec<Effect>) {
        let Some(session) = self.remove_session(session_id) else { return };
        let Some(agent) = session.agent() else {
            // An agent that refused the edge before its hello (a challenge not signed by
            // its EDGE_PUBLIC_KEY, say) says why only here. Its words, unproven: one
            // bounded line, and only from a peer that passed the upgrade's proof.
            if let Some((code, reason)) = frame.filter(|(_, reason)| !reason.is_empty()) {
                info!(session = session_id, source = %session.source, code, reason = %shared::text::peer_words(reason), "agent disconnected before its hello");
            }
            return;
        };
        match frame {
            // The peer's words, not signed: one bounded line.
            Some((code, reason)) => {
                info!(agent_id = %agent.agent_id, session = session_id, code, reason = %shared::text::peer_words(reason), "agent disconnected")
            }
            None => info!(agent_id = %agent.agent_id, session = session_id, "agent disconnected"),
        }
        if let Some(relay) = agent.login.clone() {
            self.login_lost(&relay, effects);
        }
        let agent_id = agent.agent_id.clone();
        let orphans: Vec<String> = self
            .active
            .iter()
            .filter(|id| {
                let job = &self.jobs[*id];
                job.session_id.as_deref() == Some(session_id) && job.orphaned_at.is_none()
            })
            .cloned()
            .collect();
        if !self.ready().any(|(_, a)| a.agent_id == agent_id) {
            // An agent that said it stops and leaves with no job on it (a drain, a
            // `--one-job` exit) stopped on purpose: not down. Listed down, a pool of
            // one-job workers kept `/health` degraded for good, each key listed an hour.
            // A crash, a kill, or leaving with jobs still on it is down.
            let stopped = agent.stopping && orphans.is_empty();
            if stopped {
                info!(agent_id = %agent_id, session = session_id, "agent stopped");
            }
            self.note_departed(now, &agent_id, !stopped, effects);
        }
        for id in orphans {
            self.job_mut(&id).expect("active jobs exist").orphaned_at = Some(now.at);
            effects.push(self.save(&id));
        }
        if !self.is_online() {
            self.offline_since = Some(now.at);
        }
        self.note_unfit(now);
        self.observe(now, effects);
    }

    /// Says goodbye (the whole reason) and closes the connection (the reason cut to fit).
    pub(super) fn close(&mut self, now: Now, session_id: &str, refused: Refused, effects: &mut Vec<Effect>) {
        let goodbye = EdgeMessage::Goodbye { code: refused.code, reason: refused.reason.clone() };
        effects.push(Effect::Send { session: session_id.to_string(), text: goodbye.to_text() });
        let reason = close::reason(&refused.reason);
        effects.push(Effect::Close { session: session_id.to_string(), code: refused.code, reason });
        self.drop_session(now, session_id, effects);
    }

    /// What to do with a connection the machine has no record of: a frame on one, or a
    /// socket a host finds without a readable record.
    pub fn unknown_connection(session_id: &str) -> Vec<Effect> {
        debug!(session = session_id, "a connection the edge does not know; closing it");
        vec![Effect::Close { session: session_id.to_string(), code: close::PROTOCOL_ERROR, reason: UNKNOWN_SESSION.into() }]
    }

    /// A binary frame from an agent connection: not part of the protocol, so the
    /// connection is closed like any other protocol error.
    pub fn binary_frame(&mut self, now: impl Into<Now>, session_id: &str) -> Vec<Effect> {
        let now = now.into();
        self.begin(Origin::Session(session_id.to_string()), Some(now));
        if !self.sessions.contains_key(session_id) {
            return Self::unknown_connection(session_id);
        }
        let mut effects = Vec::new();
        warn!(session = session_id, "binary frame from agent");
        let reason = "binary frames are not part of the protocol; send JSON text frames";
        self.close(now, session_id, Refused::new(close::PROTOCOL_ERROR, reason), &mut effects);
        effects
    }

    /// A text frame from an agent connection.
    pub fn message(&mut self, now: impl Into<Now>, session_id: &str, text: &str) -> Vec<Effect> {
        let now = now.into();
        self.begin(Origin::Session(session_id.to_string()), Some(now));
        let mut effects = Vec::new();
        // Not journaled: a later last_seen is right whatever else is undone.
        let Some(session) = self.sessions.get_mut(session_id).map(Arc::make_mut) else {
            return Self::unknown_connection(session_id);
        };
        // A proven agent is heard in its heartbeats alone ([`Edge::take_beat`]): any other
        // frame anyone on the path can make or play back, and would keep a gone agent
        // "connected" — its jobs never lost, `/health` saying it is there.
        if session.agent().is_none() {
            session.last_seen = now.at;
        }
        // The frame that was arriving is whole: it counts as life only if it is (a new
        // heartbeat or result, below). So is the credit of a frame waiting its turn.
        session.arriving = None;
        session.waiting = None;
        if text.len() > session.frame_limit() {
            // Before the hello is verified only a hello's worth: anyone can open connections.
            let (limit, source) = (session.frame_limit(), session.source.clone());
            warn!(session = session_id, source = %source, bytes = text.len(), limit, "frame over this connection's limit");
            let reason = format!("a frame of {} bytes is over this connection's limit of {limit} bytes (before the hello is verified, only a hello fits)", text.len());
            self.close(now, session_id, Refused::new(close::PROTOCOL_ERROR, reason), &mut effects);
            return effects;
        }
        let msg = match protocol::decode::<AgentMessage>(text) {
            Ok(m) => m,
            Err(e) => {
                // The error may quote the frame (an unknown variant), which anyone on the
                // path, or any peer before its hello, chose: one bounded line, in the log
                // and in the close reason (which a host may log too).
                let shown = shared::text::peer_words(&e);
                warn!(session = session_id, agent_id = session.agent_id().unwrap_or("-"), error = %shown, "unreadable frame from agent");
                self.close(now, session_id, Refused::new(close::PROTOCOL_ERROR, shown), &mut effects);
                return effects;
            }
        };
        let challenged = match &session.phase {
            Phase::Challenged { nonce, ephemeral } => Some((nonce.clone(), ephemeral.clone())),
            Phase::Ready(_) => None,
        };
        let (domain, probe, protocol, agent_id, envelope) = match (&challenged, msg) {
            (Some(_), AgentMessage::Hello { protocol, agent_id, envelope }) => (Domain::Hello, false, protocol, agent_id, envelope),
            (Some(_), AgentMessage::Probe { protocol, agent_id, envelope }) => (Domain::Probe, true, protocol, agent_id, envelope),
            (Some(_), _) => {
                let refused = Refused::new(close::PROTOCOL_ERROR, "the first message must be a signed hello");
                self.close(now, session_id, refused, &mut effects);
                return effects;
            }
            (None, msg) => {
                self.agent_message(now, session_id, msg, &mut effects);
                return effects;
            }
        };
        let (nonce, ephemeral) = challenged.expect("matched above");
        let verified = session::verify_hello(domain, protocol, &agent_id, &envelope, &nonce, &self.cfg.agents, now.wall)
            .and_then(|hello| session::agree(&hello, &ephemeral, &self.cfg.pool).map(|keys| (hello, keys)));
        match verified {
            Ok((hello, (edge_public, _))) if probe => self.answer_probe(now, session_id, &hello, edge_public, &mut effects),
            Ok((hello, (edge_public, keys))) => self.welcome(now, session_id, hello, edge_public, keys, &mut effects),
            Err(refused) => {
                self.agents_refused(1);
                // The id is the peer's own words until verified: logged only if it is one.
                let shown = if shared::ids::valid_agent_id(&agent_id) { agent_id.as_str() } else { "-" };
                warn!(agent_id = shown, session = session_id, probe, reason = %refused.reason, "agent refused");
                self.close(now, session_id, refused, &mut effects);
            }
        }
        effects
    }

    /// The signed welcome answering a verified hello (or probe) on this connection: over
    /// the agent's nonce, with the edge's X25519 key for it, listing the jobs of the hello
    /// the agent must not start (`given_up`, [`Edge::given_up`]).
    fn welcome_for(&self, now: Now, session_id: &str, hello: &Hello, edge_public: String, given_up: Vec<String>) -> Effect {
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION,
            agent_id: hello.agent_id.clone(),
            pool: self.cfg.pool.clone(),
            agent_nonce: hello.agent_nonce.clone(),
            ephemeral: edge_public,
            session_id: session_id.to_string(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            lost_after_ms: Some(self.cfg.lost_after_ms),
            given_up,
            issued_at: now.wall,
        };
        let envelope = Envelope::seal(Domain::Welcome, &welcome, &self.cfg.signing_key);
        Effect::Send { session: session_id.to_string(), text: EdgeMessage::Welcome { envelope }.to_text() }
    }

    /// A verified probe: the welcome an agent would get (signed over the probe's nonce, so
    /// whoever sent it can check the edge's key as the agent does), then the connection
    /// closed. The session never becomes an agent's: no older connection is replaced, no
    /// job reconciled, nothing saved, the agent not counted as connected.
    fn answer_probe(&mut self, now: Now, session_id: &str, hello: &Hello, edge_public: String, effects: &mut Vec<Effect>) {
        // A probe names no jobs (and settles none): nothing to list.
        effects.push(self.welcome_for(now, session_id, hello, edge_public, Vec::new()));
        info!(agent_id = %hello.agent_id, session = session_id, "an agent's keys checked by a probe (claude-runner doctor); its connection, if any, is untouched");
        let done = Refused::new(close::PROBED, "probe answered: the keys agree; this connection was only a check");
        self.close(now, session_id, done, effects);
    }

    fn welcome(&mut self, now: Now, session_id: &str, hello: Hello, edge_public: String, keys: LinkKeys, effects: &mut Vec<Effect>) {
        let agent_id = hello.agent_id.clone();
        // Signed by the agent, so its own words, but checked like a caller's: they go
        // into records, answers and logs.
        if let Err(e) = shared::placement::check_labels(&hello.labels) {
            let refused = Refused::new(close::PROTOCOL_ERROR, format!("AGENT_LABELS refused: {e}; fix AGENT_LABELS on the agent"));
            self.close(now, session_id, refused, effects);
            return;
        }
        if let Some(refused) = overfull("hello", hello.running.len(), hello.capacity) {
            warn!(agent_id = %agent_id, session = session_id, running = hello.running.len(), capacity = hello.capacity, "agent refused: its hello names more running jobs than it can hold");
            self.close(now, session_id, refused, effects);
            return;
        }
        // At most MAX_HELLO_FINISHED results named are taken; past them (the agent said it
        // holds more, or sent more than it may) a job not named may have its result on the
        // way: it is left to it, or to its orphan deadline.
        let named = hello.finished.iter().take(MAX_HELLO_FINISHED);
        let held: BTreeSet<&str> = hello.running.iter().chain(named).map(String::as_str).collect();
        if let Some(refused) = self.duplicate(now, &hello, &held) {
            self.agents_refused(1);
            let instance = hello.instance.as_deref().unwrap_or("-");
            warn!(agent_id = %agent_id, session = session_id, instance, reason = %refused.reason, "agent refused: another instance of the same agent id is connected or may hold its jobs");
            self.close(now, session_id, refused, effects);
            return;
        }
        let paused = self.alerts.paused.contains(&agent_id);
        // One connection per agent: a newer one from the same instance (or another, once
        // the older fell silent and its jobs' orphan deadlines passed, [`Edge::duplicate`])
        // means the older is dead or half-open.
        let older: Vec<String> = self
            .ready()
            .filter(|(_, a)| a.agent_id == agent_id)
            .map(|(id, _)| id.clone())
            .collect();
        for old in older {
            let refused = Refused::new(close::REPLACED, "replaced by a newer connection of the same agent");
            self.close(now, &old, refused, effects);
        }
        // Only after the older connection closed: this one is not ready yet, so its close
        // listed the agent as gone.
        self.note_departed(now, &agent_id, false, effects);
        // What `welcome_for` tells it below.
        let lost_after_ms = Some(self.cfg.lost_after_ms);
        let session = self.session_mut(session_id).expect("session exists");
        session.phase = Phase::Ready(Agent {
            agent_id: agent_id.clone(),
            version: hello.agent_version.clone(),
            // Held to the most an agent runs: free slots are counted up to it.
            capacity: hello.capacity.min(MAX_CAPACITY),
            slots: Slots::default(),
            sent: 0,
            // Verified equal to the challenge this connection was given.
            challenge: hello.challenge.clone(),
            keys,
            beat: 0,
            oauth: OAuthReport::unconfigured(now.wall),
            claude_version: hello.claude_version.as_deref().map(claude_version),
            labels: hello.labels.clone(),
            mirrors: mirror_names(&hello.mirrors),
            paused,
            stopping: false,
            cannot_start: None,
            usage_hold_until: None,
            login: None,
            instance: hello.instance.clone(),
            unproven: 0,
            lost_after_ms,
        });
        session.agent_mut().expect("just made ready").report(hello.oauth.clone(), now);
        let hold = session.agent().and_then(|a| a.usage_hold_until);
        effects.push(self.save_session(session_id));
        // The welcome goes here, first on the connection, but is made once the hello's jobs
        // are settled: it lists those the agent must not start.
        let welcome_at = effects.len();
        self.last_oauth = Some((agent_id.clone(), hello.oauth.clone()));
        self.keep_usage_hold(hold, effects);
        self.offline_since = None;
        self.note_unfit(now);
        info!(agent_id = %agent_id, session = session_id, version = %hello.agent_version, capacity = hello.capacity.min(MAX_CAPACITY), "agent connected");
        let all_named = !hello.more_finished && hello.finished.len() <= MAX_HELLO_FINISHED;
        self.reconcile(now, session_id, &agent_id, &held, Heard::Hello { all_named }, effects);
        let given_up = self.given_up(session_id, &hello.running);
        if !given_up.is_empty() {
            info!(agent_id = %agent_id, session = session_id, jobs = ?given_up, "the agent holds jobs the edge gave up or has elsewhere; its welcome tells it not to start them");
        }
        effects.insert(welcome_at, self.welcome_for(now, session_id, &hello, edge_public, given_up));
        self.stop_ended(now, session_id, &agent_id, &hello.running, 0, effects);
        if paused {
            // Back paused (restored after an edge restart, or paused while away).
            self.end_held_back_waits(now, effects);
        }
        self.settle_queue(now, effects);
        self.observe(now, effects);
    }

    /// The `LOST_AFTER_MS` the welcome of this (ready) connection told its agent, which a
    /// job sent on it or taken over by it keeps ([`Job::told_lost_after_ms`]).
    pub(super) fn told_lost_after_ms(&self, session_id: &str) -> Option<u64> {
        let told = self.sessions.get(session_id).and_then(|s| s.agent()).and_then(|a| a.lost_after_ms);
        Some(told.unwrap_or(self.cfg.lost_after_ms))
    }

    /// The jobs a hello names running (`running`) that the edge, its jobs settled
    /// ([`Edge::reconcile`]), does not hold as this connection's: ended (lost while the
    /// agent was away, cancelled, timed out), sent again (queued, or on another agent),
    /// another instance's, or unknown to it. Its welcome lists them ([`Welcome::given_up`]),
    /// and the agent never starts them: only the edge knows whether it gave a job up — the
    /// agent counts an absence from its last frame heard, the edge from when it saw the
    /// loss, up to a heartbeat and its silence detection later (rev29-2). Every other job
    /// named is this connection's, and the agent may start it. At most the hello's
    /// `running`, which [`overfull`] bounds.
    fn given_up(&self, session_id: &str, running: &[String]) -> Vec<String> {
        let ours = |id: &str| self.active.contains(id) && self.jobs.get(id).is_some_and(|job| job.session_id.as_deref() == Some(session_id));
        running.iter().filter(|id| !ours(id)).cloned().collect()
    }

    /// Why a verified hello must be refused because another instance of its agent id
    /// (another `DATA_DIR`, [`shared::protocol::Hello::instance`]; one that names none is
    /// an instance of its own) may still be at work, if it must: while a connection of
    /// that instance is heard from (its silence deadline, [`crate::session::Session::deadline`],
    /// not passed), and while a job it was sent or took over may still be with it — until
    /// the job's orphan deadline, `LOST_AFTER_MS` after its connection went (counted from
    /// now while that connection is open). Letting the hello in then would end those jobs
    /// as lost while they run, or send them to this one too, and the two would take turns
    /// replacing each other. So it is refused, nothing of the other's touched, and told
    /// when to try again (`retry after <ms> ms`, first: a close reason is cut short).
    /// A hello of the same instance (that agent restarted, or its older connection
    /// half-open: the `DATA_DIR` lock allows one process at a time) is never refused here,
    /// nor kept out by a job it would settle ([`settles`]: one of before the field that it
    /// names, `named`).
    fn duplicate(&self, now: Now, hello: &Hello, named: &BTreeSet<&str>) -> Option<Refused> {
        let instance = session::instance_key(hello.instance.as_deref());
        let hb = self.cfg.heartbeat_interval_ms;
        let heard = self
            .sessions
            .values()
            .filter_map(|s| s.agent().map(|a| (s, a)))
            .filter(|(s, a)| a.agent_id == hello.agent_id && a.instance_key() != instance && s.deadline(hb) > now.at)
            .map(|(s, _)| (s.deadline(hb), s.connected_at))
            .max();
        let held = self
            .active
            .iter()
            .map(|id| &self.jobs[id])
            .filter(|job| job.agent_id.as_deref() == Some(hello.agent_id.as_str()))
            .filter(|job| !settles(job, instance, named))
            .map(|job| job.orphaned_at.unwrap_or(now.at).saturating_add(job.lost_after_ms(self.cfg.lost_after_ms)))
            .filter(|&deadline| deadline > now.at)
            .max();
        // When the edge's answer could change with nothing more heard: the other's silence
        // deadline while it is heard (it may then go quiet, and only its jobs keep this one
        // out), else the last of its jobs' orphan deadlines.
        let until = heard.map(|(deadline, _)| deadline).or(held)?;
        let retry = until - now.at;
        let what = match heard {
            Some((_, connected_at)) => {
                format!("another agent is connected as `{}` from another DATA_DIR (since {})", hello.agent_id, shared::time::rfc3339(now.wall_of(connected_at)))
            }
            None => format!(
                "jobs of `{}` may still be with another agent proving it from another DATA_DIR (the edge waits LOST_AFTER_MS, {} ms, for an agent gone with its jobs)",
                hello.agent_id, self.cfg.lost_after_ms
            ),
        };
        Some(Refused::new(
            close::DUPLICATE,
            format!("retry after {retry} ms: {what}; give each machine its own AGENT_ID and key, or stop the other agent"),
        ))
    }

    /// Takes an agent's report of its login and usage window.
    pub(super) fn take_report(&mut self, now: Now, session_id: &str, oauth: OAuthReport, effects: &mut Vec<Effect>) {
        let session = self.session_mut(session_id).expect("session exists");
        let agent = session.agent_mut().expect("ready session");
        let agent_id = agent.agent_id.clone();
        let was = (agent.needs_login(now), agent.usage_held(now));
        agent.report(oauth.clone(), now);
        let is = (agent.needs_login(now), agent.usage_held(now));
        let hold = agent.usage_hold_until;
        if was != is {
            info!(agent_id = %agent_id, needs_login = is.0, usage_limited = is.1, "agent's login or usage window changed");
        }
        effects.push(self.save_session(session_id));
        self.last_oauth = Some((agent_id, oauth));
        self.keep_usage_hold(hold, effects);
        self.observe(now, effects);
    }

    /// What the agent says it holds (`held`: jobs it runs, or whose result it still has to
    /// send), against what the edge has it doing; disagreements are settled at once:
    ///
    /// - a job it holds is its, on this connection (taken over after a reconnect, with
    ///   the caller's cancel sent again if there was one);
    /// - a job it should hold but does not: if it never started it is sent again (or
    ///   ended, see [`Edge::send_again`]) — never received, or accepted (or named by the
    ///   agent while the edge had it dispatched) and not said started ([`Job::unstarted`]:
    ///   the agent names every job it has a durable started record of, made before its
    ///   Claude gets the prompt); if it may have run (the agent said `Started`, or the edge
    ///   cannot tell), it is lost — the agent restarted.
    ///
    /// At a hello every job of the agent's is accounted for (the hello is made after its
    /// earlier connection ended) — unless it could not name every result it holds
    /// ([`Heard::Hello`]`{ all_named: false }`): then a job it did not name is left to its
    /// result, sent after the hello, or to its orphan deadline. In a heartbeat only orders
    /// numbered up to `received` on this connection had reached the agent; since the agent
    /// sends its results, refusals and statements in the order it makes them, a job the
    /// statement leaves out was neither running nor finished then.
    fn reconcile(&mut self, now: Now, session_id: &str, agent_id: &str, held: &BTreeSet<&str>, heard: Heard, effects: &mut Vec<Effect>) {
        let instance = self.sessions[session_id].agent().expect("ready session").instance_key().to_string();
        // Another instance's jobs (another DATA_DIR proving the same id, let in once their
        // orphan deadlines passed, [`Edge::duplicate`]) are not this one's to settle: they
        // end by that deadline, never sent to this one.
        let mine: Vec<String> = self
            .active
            .iter()
            .filter(|id| self.jobs[*id].agent_id.as_deref() == Some(agent_id))
            .filter(|id| settles(&self.jobs[*id], &instance, held))
            .cloned()
            .collect();
        for id in mine {
            let job = &self.jobs[&id];
            let here = job.session_id.as_deref() == Some(session_id);
            if held.contains(id.as_str()) {
                if here && job.state == JobState::Running {
                    continue;
                }
                info!(job_id = %id, agent_id, session = session_id, "the agent holds this job");
                let resend_cancel = !here && job.cancel_requested;
                let told = self.told_lost_after_ms(session_id);
                let job = self.job_mut(&id).expect("active jobs exist");
                if !here {
                    job.session_id = Some(session_id.to_string());
                    job.instance = Some(instance.clone());
                    job.told_lost_after_ms = told;
                    job.orphaned_at = None;
                    job.order_no = 0;
                }
                if job.state == JobState::Dispatched {
                    job.state = JobState::Running;
                    job.started_at = Some(now.at);
                    // Named, but never said started (its `Started` would have made it
                    // running): as after an `Accepted`, it may not have started, and a
                    // later hello that leaves it out sends it again. Ending it `lost` there
                    // lost a job that never ran — its `Accepted` lost with a connection,
                    // the agent restarted before the start (found by the model).
                    job.unstarted = true;
                }
                effects.push(self.save(&id));
                if resend_cancel {
                    self.send_cancel(now, session_id, agent_id, &id, "cancelled by the caller", effects);
                }
                continue;
            }
            let missing = match heard {
                Heard::Hello { all_named } => all_named,
                Heard::Beat { received, all_named } => all_named && here && job.order_no <= received,
            };
            if !missing {
                continue;
            }
            if job.state == JobState::Dispatched {
                // Sent, but the agent never got it (or refused it): nothing ran.
                info!(job_id = %id, agent_id, "the agent does not have a job it was sent");
                self.send_again(now, &id, effects);
            } else if job.unstarted {
                // Accepted, but never said started: its started record was never written
                // (the agent writes it, durably, before its Claude gets the prompt, and
                // names every job it has one of until its result is acknowledged), so its
                // Claude never got the prompt — the agent restarted while it fetched the
                // repository or waited for the login refresh.
                info!(job_id = %id, agent_id, "the agent no longer has a job it accepted but never started");
                self.send_again(now, &id, effects);
            } else {
                warn!(job_id = %id, agent_id, "the agent no longer has a job it ran");
                let result = JobResult::lost("the agent restarted and no longer has this job; run the task again", job.elapsed(now.at));
                self.finish(now, &id, result, effects);
            }
        }
    }

    /// Jobs the agent runs that the edge already ended (cancelled, timed out, lost), has
    /// no record of, or has queued or on another agent must stop: nobody can receive their
    /// result. (An agent comes to hold a job the edge has elsewhere only by an order held
    /// back on the path and let through late, after the edge sent the job again: its copy
    /// stops now, not at its end beside the other run.)
    ///
    /// `running` is at most the agent's capacity ([`overfull`]). A job the edge has a
    /// record of is the edge's own: each is cancelled at once. Of the ids it has no record
    /// of — a job the caps forgot while its agent was away, or names made up by whoever
    /// holds the agent's key — at most [`MAX_STRAY_CANCELS`] are, starting at a place
    /// that moves on with `turn` (the heartbeat's number; 0 at the hello): an agent still
    /// running them names them again in its next beats, so each is told within a few,
    /// and a made-up list costs a few signatures a beat, not one for every name.
    fn stop_ended(&mut self, now: Now, session_id: &str, agent_id: &str, running: &[String], turn: u64, effects: &mut Vec<Effect>) {
        let mut strays = Vec::new();
        for id in running {
            let reason = match self.job(id) {
                Some(job) if job.state.is_terminal() => "the edge already ended this job",
                Some(job) if job.agent_id.as_deref() == Some(agent_id) => continue,
                Some(_) => "the edge has this job queued or on another agent (this order reached the agent late)",
                None => {
                    strays.push(id);
                    continue;
                }
            };
            self.send_cancel(now, session_id, agent_id, id, reason, effects);
        }
        if strays.is_empty() {
            return;
        }
        let n = strays.len();
        let start = (turn % n as u64) as usize * MAX_STRAY_CANCELS % n;
        let now_told = n.min(MAX_STRAY_CANCELS);
        if n > now_told {
            warn!(agent_id, session = session_id, unknown = n, cancelled = now_told, "the agent runs jobs the edge has no record of; some cancelled now, the rest at its next heartbeats");
        }
        for id in strays.into_iter().cycle().skip(start).take(now_told) {
            self.send_cancel(now, session_id, agent_id, id, "the edge has no record of this job", effects);
        }
    }

    fn agent_message(&mut self, now: Now, session_id: &str, msg: AgentMessage, effects: &mut Vec<Effect>) {
        let agent_id = self.sessions[session_id].agent_id().expect("ready session").to_string();
        match msg {
            AgentMessage::Heartbeat { envelope } => {
                // It settles jobs (reconciliation): the agent's own, for this connection, newer
                // than the last one taken — or nothing.
                let Some(beat) = self.open_report::<Beat>(session_id, &agent_id, &envelope, Domain::Heartbeat) else { return };
                let Some(Beat { running, capacity, oauth, slots, claude_version: version, stopping, cannot_start, seq, finished, more_finished, .. }) = self.take_beat(now, session_id, &agent_id, beat) else { return };
                if let Some(refused) = overfull("heartbeat", running.len(), capacity) {
                    warn!(agent_id = %agent_id, session = session_id, running = running.len(), capacity, "a heartbeat names more running jobs than its agent can hold; closing the connection");
                    self.close(now, session_id, refused, effects);
                    return;
                }
                let session = self.session_mut(session_id).expect("session exists");
                let agent = session.agent_mut().expect("ready session");
                // Its words, bounded: shown in /health and the refusals that name it.
                let cannot_start = cannot_start.map(|why| shared::text::peer_words(&why));
                let began_stopping = (stopping && !agent.stopping) || (cannot_start.is_some() && agent.cannot_start.is_none());
                if agent.stopping != stopping {
                    info!(agent_id = %agent_id, session = session_id, stopping, "{}", if stopping { "agent stopping: it takes no new jobs, its running ones finish" } else { "agent takes work again" });
                }
                if agent.cannot_start.is_some() != cannot_start.is_some() {
                    match &cannot_start {
                        Some(why) => warn!(agent_id = %agent_id, session = session_id, reason = %why, "agent cannot start jobs: it takes no new ones until it can"),
                        None => info!(agent_id = %agent_id, session = session_id, "agent can start jobs again"),
                    }
                }
                agent.stopping = stopping;
                agent.cannot_start = cannot_start;
                agent.capacity = capacity.min(MAX_CAPACITY);
                agent.state(slots);
                if let Some(v) = version {
                    agent.claude_version = Some(claude_version(&v));
                }
                self.take_report(now, session_id, oauth, effects);
                // Naming the beat: the agent then knows what it wrote before it was read, and
                // gives what it wrote since the time it takes to come. MACed: the agent hears
                // the edge only in what it proves (protocol 11), and every beat taken is
                // answered, so a live edge is heard every heartbeat interval.
                let key = &self.sessions[session_id].agent().expect("ready session").keys.edge_to_agent;
                let ack = EdgeMessage::heartbeat_ack(seq, now.wall, key);
                effects.push(Effect::Send { session: session_id.to_string(), text: ack.to_text() });
                // A result it holds is on its way (or was dropped on the path and is sent
                // again): that job is not lost.
                let held: BTreeSet<&str> = running.iter().chain(finished.iter().take(MAX_HELLO_FINISHED)).map(String::as_str).collect();
                let heard = Heard::Beat { received: slots.received, all_named: !more_finished };
                self.reconcile(now, session_id, &agent_id, &held, heard, effects);
                self.stop_ended(now, session_id, &agent_id, &running, seq, effects);
                // A login that works again, or a usage window that opened, lets held work go;
                // one that stopped working sends /execute callers elsewhere, as does an agent
                // that stops.
                if began_stopping {
                    self.end_held_back_waits(now, effects);
                }
                self.settle_queue(now, effects);
            }
            AgentMessage::Credit { slots } => {
                let session = self.session_mut(session_id).expect("session exists");
                session.agent_mut().expect("ready session").state(slots);
                effects.push(self.save_session(session_id));
                self.dispatch(now, effects);
            }
            AgentMessage::Accepted { job_id } => {
                if self.own_active_job(&job_id, &agent_id).is_some_and(|j| j.state == JobState::Dispatched) {
                    let job = self.job_mut(&job_id).expect("active jobs exist");
                    job.state = JobState::Running;
                    job.started_at = Some(now.at);
                    // Not started until the agent's MACed `Started` says so (a plain frame
                    // anyone on the path could make up must not count as that).
                    job.unstarted = true;
                    info!(job_id = %job_id, agent_id = %agent_id, "job running");
                    effects.push(self.save(&job_id));
                }
            }
            AgentMessage::Started { envelope } => {
                // From now on the job is never sent again: its Claude may have the prompt.
                let Some(report) = self.open_report::<StartReport>(session_id, &agent_id, &envelope, Domain::Started) else { return };
                let StartReport { job_id: id, order_nonce } = report;
                let latest = self.own_active_job(&id, &agent_id).is_some_and(|j| j.attempt_of(&order_nonce) == Some(j.attempts));
                if !latest {
                    if self.unproven_logged(session_id, &agent_id) {
                        warn!(job_id = shown_job_id(&id), agent_id = %agent_id, "a start of an order that is not its job's latest ignored (replayed, or the job moved on)");
                    }
                    return;
                }
                // Its `Accepted` may be held back on the path, or lost with a connection.
                let job = &self.jobs[&id];
                let accepted = job.state == JobState::Dispatched;
                if accepted || job.unstarted {
                    let job = self.job_mut(&id).expect("active jobs exist");
                    if accepted {
                        job.state = JobState::Running;
                        job.started_at = Some(now.at);
                    }
                    job.unstarted = false;
                    info!(job_id = %id, agent_id = %agent_id, "job started: its Claude has the prompt");
                    effects.push(self.save(&id));
                }
            }
            AgentMessage::Rejected { envelope } => {
                // It ends or requeues a job: the agent's own, for the job's latest order.
                let Some(refusal) = self.open_report::<Rejection>(session_id, &agent_id, &envelope, Domain::Rejection) else { return };
                let Rejection { job_id: id, order_nonce, reason, retry } = refusal;
                self.stats_mut().rejected_orders += 1;
                // Running too: nothing the agent sends makes a job running between its
                // refusal of the latest order and that order, but an `Accepted` made up on
                // the path could (see `shared::protocol`, "Signed or not").
                let latest = self.own_active_job(&id, &agent_id).is_some_and(|j| j.attempt_of(&order_nonce) == Some(j.attempts));
                if !latest {
                    // The path can play the agent's own refusal back as often as it likes.
                    if self.unproven_logged(session_id, &agent_id) {
                        warn!(job_id = shown_job_id(&id), agent_id = %agent_id, reason = ?reason, retry, "a refusal of an order that is not its job's latest ignored (replayed, or the job moved on)");
                    }
                    return;
                }
                warn!(job_id = shown_job_id(&id), agent_id = %agent_id, reason = ?reason, retry, "agent refused an order");
                let sends = self.job(&id).map_or(0, |j| j.attempts);
                if retry && sends >= MAX_JOB_SENDS {
                    // Handed back by agent after agent (each holds itself back before it
                    // does: see `Beat::cannot_start`), or refused for want of a slot again
                    // and again: it ends with the last agent's words rather than go round.
                    // Its sends as counted: some may have been lost with a connection.
                    // The agent's words (its folders, its disk's errors) are the operator's
                    // alone, as in every other answer about a job's agents (review rev32, 1).
                    let last = match self.job(&id).map(|j| self.told_to(&j.placement)) {
                        Some(Told::Caller) => CANNOT_START_WHY.to_string(),
                        _ => shared::text::peer_words(&reason),
                    };
                    let result = JobResult::failure(
                        ErrorCode::RunnerOffline,
                        format!(
                            "the job was sent to agents {sends} times (an order lost with its connection counts too) and never started; the last one refused it: {last}. Submit it again later, or run it elsewhere"
                        ),
                        0,
                    );
                    // It never ran (each send before was refused or never received, and
                    // taken back): a repeat of its key makes a new job.
                    self.job_mut(&id).expect("active jobs exist").take_back();
                    self.finish(now, &id, result, effects);
                } else if retry {
                    self.send_again(now, &id, effects);
                    // An `/execute` caller does not wait for agents that are all held back
                    // (the one that refused it may have just said it cannot start jobs).
                    self.end_held_back_wait(now, &id, effects);
                    self.dispatch(now, effects);
                } else {
                    let result = JobResult::failure(
                        ErrorCode::JobRejected,
                        format!(
                            "the agent refused the job: {reason}. Check that the agent's EDGE_PUBLIC_KEY matches this edge's EDGE_SIGNING_KEY and that both clocks are right, then retry"
                        ),
                        0,
                    );
                    self.finish(now, &id, result, effects);
                }
            }
            AgentMessage::OrderRefused { reason } => {
                // Names no job: counted and logged, nothing else (anyone on the path could send it).
                self.stats_mut().rejected_orders += 1;
                if self.unproven_logged(session_id, &agent_id) {
                    warn!(agent_id = %agent_id, reason = ?shared::text::peer_words(&reason), "agent refused an order it could not tie to a job");
                }
            }
            AgentMessage::Event { envelope } => {
                // A batch of events under one MAC (protocol 8, MACed since 9): bounded before
                // it is checked, checked whole after, then each event shown as if it came alone.
                if envelope.payload.len() > protocol::MAX_PROGRESS_PAYLOAD_BYTES {
                    let (bytes, limit) = (envelope.payload.len(), protocol::MAX_PROGRESS_PAYLOAD_BYTES);
                    warn!(agent_id = %agent_id, session = session_id, bytes, limit, "a progress batch over the size limit refused unread");
                    return;
                }
                let report = match self.read_report::<RawProgressReport>(session_id, &agent_id, &envelope, Domain::Progress) {
                    Ok(report) => report,
                    Err(Unread::Malformed) => {
                        // The agent's own MAC over what reads as no batch: what can still be
                        // read of it is whose events were lost.
                        if let Ok(unread) = serde_json::from_str::<UnreadBatch>(&envelope.payload) {
                            let last_seq = unread.events.iter().filter_map(|e| e.get("seq").and_then(serde_json::Value::as_u64)).max();
                            self.progress_lost(&agent_id, &unread.job_id, &unread.order_nonce, unread.events.len(), last_seq, effects);
                        }
                        return;
                    }
                    Err(Unread::Refused) => return,
                };
                if let Err(fault) = report.check() {
                    // The agent's own MAC over a batch it never makes — numbered down or
                    // twice, too many events, an event nesting past MAX_EVENT_DEPTH (read
                    // raw, nothing else bounds its depth: a follower's parser would give up
                    // on it) — its bug, or its key misused; none of its events is shown,
                    // and their loss is.
                    warn!(job_id = shown_job_id(&report.job_id), agent_id = %agent_id, session = session_id, error = %fault, "a progress batch refused: its events are told to followers as dropped");
                    let last_seq = report.events.iter().map(|e| e.seq).max();
                    self.progress_lost(&agent_id, &report.job_id, &report.order_nonce, report.events.len(), last_seq, effects);
                    return;
                }
                let RawProgressReport { job_id, order_nonce, events } = report;
                let Some(attempt) = self.own_active_job(&job_id, &agent_id).and_then(|j| j.attempt_of(&order_nonce)) else {
                    // Late (the job ended or moved on), or played back from another order.
                    debug!(job_id = shown_job_id(&job_id), agent_id = %agent_id, events = events.len(), "progress for no running order of this agent's ignored");
                    return;
                };
                for ProgressEvent { seq, event } in &events {
                    self.announce_progress(&job_id, (attempt, *seq), event.get(), effects);
                }
            }
            AgentMessage::Result { envelope } => {
                // Nothing is done with, nor acknowledged for, a result the agent did not MAC
                // on this connection.
                let Some(report) = self.open_report::<ResultReport>(session_id, &agent_id, &envelope, Domain::Result) else { return };
                let (job_id, result) = (report.job_id, report.result);
                let shown = shown_job_id(&job_id);
                self.result_heard(now, session_id, &job_id);
                // A result this edge did not take is answered "not taken", not acknowledged:
                // another edge may have issued that job (the agent moved, its EDGE_URL
                // changed, a tunnel flipped), and the agent keeps the result for it —
                // sending it no more on this connection.
                let taken = match self.job(&job_id) {
                    Some(job) if job.agent_id.as_deref() != Some(agent_id.as_str()) && !job.state.is_terminal() => {
                        warn!(job_id = shown, agent_id = %agent_id, "result for a job of another agent not taken");
                        false
                    }
                    Some(job) if !job.issued(&report.order_nonce) => {
                        warn!(job_id = shown, agent_id = %agent_id, "result for an order this edge never sent not taken");
                        false
                    }
                    Some(job) if job.state.is_terminal() => {
                        debug!(job_id = shown, agent_id = %agent_id, "duplicate result acknowledged");
                        true
                    }
                    Some(_) => {
                        self.finish(now, &job_id, result, effects);
                        true
                    }
                    None => {
                        warn!(job_id = shown, agent_id = %agent_id, "result for a job this edge does not know not taken");
                        false
                    }
                };
                // Answered in every case so the agent stops sending it on this connection —
                // but only once the result is stored: the answer goes out after this
                // event's writes.
                let key = &self.sessions[session_id].agent().expect("ready session").keys.edge_to_agent;
                let answer = if taken { EdgeMessage::result_ack(&job_id, &agent_id, key) } else { EdgeMessage::result_not_taken(&job_id, &agent_id, key) };
                effects.push(Effect::Send { session: session_id.to_string(), text: answer.to_text() });
            }
            AgentMessage::Mirrors { names } => {
                let session = self.session_mut(session_id).expect("session exists");
                session.agent_mut().expect("ready session").mirrors = mirror_names(&names);
                effects.push(self.save_session(session_id));
            }
            AgentMessage::LoginProgress { envelope } => {
                // It can log the agent in again (and let held work go): MACed, like results.
                let Some(report) = self.open_report::<LoginReport>(session_id, &agent_id, &envelope, Domain::LoginReport) else { return };
                self.login_progress(now, session_id, report, effects);
            }
            AgentMessage::Unknown => {
                debug!(agent_id = %agent_id, "message kind not handled by this edge ignored");
            }
            AgentMessage::Hello { .. } | AgentMessage::Probe { .. } => {
                let refused = Refused::new(close::PROTOCOL_ERROR, "hello sent twice");
                self.close(now, session_id, refused, effects);
            }
        }
    }

    /// The challenge of a ready session's connection: every order sent on it is bound to
    /// it (the agent takes an order on that connection only).
    pub(super) fn session_challenge(&self, session_id: &str) -> Option<String> {
        self.sessions.get(session_id).and_then(|s| s.agent()).map(|a| a.challenge.clone())
    }

    /// A report (progress, a result, a login report, a refusal, a heartbeat) as its agent
    /// MACed it on this connection, or `None` — counted and logged — when the MAC is not
    /// this connection's agent→edge one: made up, altered on the way, taken from another
    /// connection or sent back from the edge's own frames. The connection stays: whoever
    /// forged it is on the path, not the agent, and the agent's own reports still count.
    fn open_report<T: serde::de::DeserializeOwned>(&mut self, session_id: &str, agent_id: &str, envelope: &Tagged, domain: Domain) -> Option<T> {
        self.read_report(session_id, agent_id, envelope, domain).ok()
    }

    /// [`Edge::open_report`], saying why a report was not read.
    fn read_report<T: serde::de::DeserializeOwned>(&mut self, session_id: &str, agent_id: &str, envelope: &Tagged, domain: Domain) -> Result<T, Unread> {
        let key = &self.sessions[session_id].agent().expect("ready session").keys.agent_to_edge;
        match envelope.open::<T>(domain, key) {
            Ok(report) => Ok(report),
            // The agent's own MAC over something it should not have sent: its bug, not a
            // forgery.
            Err(EnvelopeError::MalformedPayload(why)) => {
                warn!(agent_id = %agent_id, session = session_id, kind = ?domain, error = %why, "a report the agent MACed does not read; ignored (a progress batch's events are told to followers as dropped)");
                Err(Unread::Malformed)
            }
            Err(e) => {
                self.stats_mut().refused_reports += 1;
                if self.unproven_logged(session_id, agent_id) {
                    warn!(agent_id = %agent_id, session = session_id, kind = ?domain, error = %e, "a report not MACed by the agent on this connection refused (forged, altered on the way, or replayed from another connection)");
                }
                Err(Unread::Refused)
            }
        }
    }

    /// `events` of a progress batch the agent MACed for `job_id`'s order `order_nonce` that
    /// the edge cannot show (no batch the agent makes, or no batch at all): lost, and told
    /// as the agent tells its own drops — one [`protocol::progress_dropped`] event for the
    /// job, numbered as the last of them (`last_seq`: the agent numbers on past it, so its
    /// next events still go through), shown and kept as any event is. A batch for no
    /// running order of this agent's, or with no number to give the marker, is only logged.
    fn progress_lost(&mut self, agent_id: &str, job_id: &str, order_nonce: &str, events: usize, last_seq: Option<u64>, effects: &mut Vec<Effect>) {
        let Some(attempt) = self.own_active_job(job_id, agent_id).and_then(|j| j.attempt_of(order_nonce)) else {
            debug!(job_id = shown_job_id(job_id), agent_id = %agent_id, events, "an unreadable progress batch for no running order of this agent's ignored");
            return;
        };
        let Some(seq) = last_seq.filter(|_| events > 0) else { return };
        debug!(job_id = %job_id, agent_id = %agent_id, events, seq, "progress events of the agent's that cannot be shown told to followers as dropped");
        self.announce_progress(job_id, (attempt, seq), &protocol::progress_dropped(events as u64).to_string(), effects);
    }

    /// Whether a frame no agent sends (one not MACed on its connection, a refusal naming no
    /// order, one of the agent's own played back), on a ready session, is logged: the first
    /// [`shared::protocol::MAX_UNPROVEN_FRAMES`] of its connection are; the one after them
    /// says the rest are only counted (the metrics count each). Whoever can write into the
    /// connection writes them as fast as the link carries them (rev21, 1).
    fn unproven_logged(&mut self, session_id: &str, agent_id: &str) -> bool {
        // Not journaled: a count for the log, whatever else is undone.
        let Some(agent) = self.sessions.get_mut(session_id).and_then(|s| Arc::make_mut(s).agent_mut()) else { return true };
        agent.unproven = agent.unproven.saturating_add(1);
        if agent.unproven == shared::protocol::MAX_UNPROVEN_FRAMES + 1 {
            warn!(
                agent_id = %agent_id, session = session_id, logged = shared::protocol::MAX_UNPROVEN_FRAMES,
                "more frames no agent sends on this connection (something on the path writes into it?): only counted from now on (claude_runner_reports_refused_total, claude_runner_orders_rejected_total)"
            );
        }
        agent.unproven <= shared::protocol::MAX_UNPROVEN_FRAMES
    }

    /// A result the agent MACed on this connection: the agent is there — it may have taken
    /// longer than two heartbeat intervals to arrive, on a slow uplink, with no heartbeat
    /// able to pass it — if it is the first result for that job heard on this connection
    /// (the path can play one back, as it can a heartbeat).
    fn result_heard(&mut self, now: Now, session_id: &str, job_id: &str) {
        /// Past this many, the list starts again (each result may count once more).
        const MAX_RESULTS_HEARD: usize = 1024;
        if !self.results_heard.contains_key(session_id) {
            self.results_heard.insert(session_id.to_string(), HashSet::new());
        }
        let heard = self.results_heard.get_mut(session_id).expect("just made");
        if heard.len() >= MAX_RESULTS_HEARD {
            heard.clear();
        }
        if heard.insert(job_id.to_string()) {
            // Not journaled, like `last_seen` in `message`: right whatever else is undone.
            if let Some(session) = self.sessions.get_mut(session_id) {
                Arc::make_mut(session).last_seen = now.at;
            }
        }
    }

    /// Whether a frame this connection's socket read whole waits for the machine's turn,
    /// and when the last of those arrived (edge time, as the socket stamped it): a host
    /// that reads sockets apart from the machine (the native edge) says so before each
    /// [`Edge::tick`]. A heartbeat read in time but still queued behind a flood of requests
    /// is not the agent's silence: the connection is judged once its frames are handled
    /// (`message` ends the credit). Bounded by the host's queue, never by the frame's
    /// content: what turns out to be nothing new earns nothing. Hosts that hand each frame
    /// to the machine as it arrives (the Worker: a `webSocketMessage` event) never call it.
    pub fn frame_waiting(&mut self, session_id: &str, arrived_at: Option<Millis>) {
        if let Some(session) = self.sessions.get_mut(session_id).map(Arc::make_mut) {
            // Not journaled, like `last_seen`.
            session.waiting = arrived_at;
        }
    }

    /// Bytes arriving on a proven connection: `read` is all the host has read from it so
    /// far, while a frame is not yet whole. A result of megabytes on a slow uplink takes
    /// longer than two heartbeat intervals, and no heartbeat passes it: the connection is
    /// not silent while it arrives at [`MIN_UPLINK_BYTES_PER_SEC`] or faster. At most a
    /// frame's worth (`MAX_FRAME_BYTES` at that rate) of life for bytes that do not end in
    /// a heartbeat or a new result (the credit ends with the frame). Hosts that see only
    /// whole frames (the Worker) do not call it.
    pub fn arriving(&mut self, now: impl Into<Now>, session_id: &str, read: u64) {
        let now: Now = now.into();
        let Some(session) = self.sessions.get_mut(session_id).map(Arc::make_mut) else { return };
        if session.agent().is_none() {
            return;
        }
        // Not journaled, like `last_seen`.
        // The first look only marks where the frame began: bytes read before it may be of a
        // frame already whole (and counted, or not, as such).
        let arriving = session.arriving.get_or_insert(Arriving { since: now.at, base: read, until: 0 });
        let bytes = read.saturating_sub(arriving.base);
        if bytes > 0 {
            let earned = bytes.saturating_mul(1000) / MIN_UPLINK_BYTES_PER_SEC;
            arriving.until = arriving.until.max(arriving.since.saturating_add(earned).min(now.at));
        }
    }

    /// A verified heartbeat, if it is for this connection and newer than the last one taken
    /// (which it then becomes, and the moment the agent was last heard); else `None`,
    /// logged (the agent's own MAC on this connection, so not counted as a forgery, like
    /// progress shown already): one captured on the path
    /// and played back, here or on another connection, could say the agent no longer
    /// holds a job it took since.
    fn take_beat(&mut self, now: Now, session_id: &str, agent_id: &str, beat: Beat) -> Option<Beat> {
        let session = self.session_mut(session_id).expect("ready session");
        let agent = session.agent_mut().expect("ready session");
        let why = if beat.challenge != agent.challenge {
            "it was made for another connection"
        } else if beat.seq <= agent.beat {
            "it is not newer than the last one taken (replayed)"
        } else {
            agent.beat = beat.seq;
            // The agent's own word, new on this connection: it is there.
            session.last_seen = now.at;
            return Some(beat);
        };
        if self.unproven_logged(session_id, agent_id) {
            warn!(agent_id = %agent_id, session = session_id, seq = beat.seq, why, "a heartbeat refused");
        }
        None
    }

    fn own_active_job(&self, job_id: &str, agent_id: &str) -> Option<&Job> {
        self.job(job_id).filter(|j| !j.state.is_terminal() && j.agent_id.as_deref() == Some(agent_id))
    }
}

/// Whether what agent instance `instance` ([`session::instance_key`]) says of the jobs it
/// holds (`held`, as [`Edge::reconcile`] takes it) settles `job` of its agent id: a job of
/// that instance, or kept by an edge of before the field (`None`: any instance), or — the
/// one change of instance on a machine that can be told apart — a job an agent of before
/// the field had (`""`) that it names: that agent upgraded, its spool reporting every job
/// it had started. Such a job it does not name may be with another machine, and so may
/// any job of another instance it names: a copy of that instance's `DATA_DIR` with its
/// `instance-id` removed names the jobs its spool was running when copied.
fn settles(job: &Job, instance: &str, held: &BTreeSet<&str>) -> bool {
    match job.instance.as_deref() {
        None => true,
        Some(i) if i == instance => true,
        Some(i) => i == session::instance_key(None) && held.contains(job.id.as_str()),
    }
}

/// Why a MACed report of the agent's was not read ([`Edge::read_report`]).
enum Unread {
    /// Not MACed by the agent on this connection: nothing in it is the agent's word.
    Refused,
    /// MACed by the agent, but not the report it should be.
    Malformed,
}

/// What the edge can still read of a progress payload the agent MACed that is no
/// [`ProgressReport`]: whose events they were, how many, and their numbers where they read.
#[derive(serde::Deserialize)]
struct UnreadBatch {
    job_id: String,
    order_nonce: String,
    #[serde(default)]
    events: Vec<serde_json::Value>,
}

/// What an agent said of the jobs it holds, for [`Edge::reconcile`]: its hello (naming every
/// result it holds, or not), or a heartbeat's statement, made when it had received the
/// orders of this connection up to `received`.
#[derive(Clone, Copy)]
enum Heard {
    Hello { all_named: bool },
    /// `all_named`: it named every result it holds (else one it left out may be one).
    Beat { received: u64, all_named: bool },
}

/// The mirror names an agent reported, as the edge keeps them: at most
/// [`shared::placement::MAX_MIRRORS`], each a plausible repository name
/// ([`shared::repo::could_be_name`]: others can match no job's repository anyway).
fn mirror_names(names: &[String]) -> BTreeSet<String> {
    names
        .iter()
        .filter(|n| shared::repo::could_be_name(n))
        .take(shared::placement::MAX_MIRRORS)
        .cloned()
        .collect()
}

/// An agent's CLI version as the edge keeps and shows it: one bounded line.
fn claude_version(reported: &str) -> String {
    let line = reported.lines().next().unwrap_or_default().trim();
    shared::text::truncate(line, shared::protocol::MAX_CLAUDE_VERSION_BYTES).to_string()
}
