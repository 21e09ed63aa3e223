//! The agent ⇄ edge WebSocket protocol (ARCHITECTURE.md, "Protocol"). Every frame is one
//! JSON text message with a `type`. A connection goes:
//!
//! 0. the agent's upgrade request carries its proof
//!    ([`crate::envelope::UpgradeProof`], header `X-Runner-Agent-Proof`): without a valid
//!    one the edge answers 401 and there is no connection (a proof can be played back
//!    within its clock window, so the challenge below still proves this connection);
//!    Beside it, the agent's fresh nonce for this dial (header `X-Runner-Agent-Nonce`,
//!    [`crate::envelope::AGENT_NONCE_HEADER`]);
//! 1. edge → [`EdgeMessage::Challenge`] (protocol version, fresh nonce), carrying the
//!    edge's signature over the protocol, its nonce, the agent's nonce and the pool
//!    ([`crate::envelope::ChallengeProof`]). The agent checks it before it sends anything
//!    else: its hello names its labels, login, jobs, instance and mirrors, which whoever
//!    answers at EDGE_URL without the edge's key (a wrong URL, a hijacked name) must not
//!    learn; the agent's nonce is fresh, so a challenge signed for another dial fails. It
//!    refuses an unsigned challenge, saying to upgrade the edge. A dial without a nonce
//!    (an agent of before it, within protocol 10) is closed before any challenge, saying
//!    to upgrade the agent. A hop that ends TLS and relays to the real edge still reads
//!    everything: nothing here hides the frames from the path, only TLS does;
//! 2. agent → [`AgentMessage::Hello`]: a [`Hello`] signed with the agent's key over the
//!    challenge — proof of identity that cannot be replayed on another connection — with
//!    the agent's fresh X25519 key for this connection and the same nonce as its dial's;
//! 3. edge → [`EdgeMessage::Welcome`]: a [`Welcome`] signed with the edge's key over the
//!    agent's nonce, with the edge's fresh X25519 key for this connection (the signature
//!    binds that key, on which the connection's MAC keys rest, to this dial, and names the
//!    pool the edge took the hello into: the challenge's proof came before the hello was
//!    checked, so the welcome is what says it was taken). It lists the jobs of the hello's
//!    `running` the edge will not have this agent run ([`Welcome::given_up`]): the agent
//!    never starts those, and may start the others. Both sides now hold this connection's two MAC keys
//!    ([`crate::link`]): one for what the agent sends, one for what the edge sends
//!    (`claude-runner doctor` sends an [`AgentMessage::Probe`] in step 2 instead, and the
//!    edge closes after its welcome);
//! 4. then work: the agent states its free [`Slots`] (in a `Credit`, and again in every
//!    heartbeat), the edge sends at most that many signed [`EdgeMessage::Job`]s (each bound
//!    to this connection's challenge and numbered on it, [`JobOrder`]); the agent
//!    answers `Accepted` (or a MACed `Rejected`), a MACed `Started` once the job's durable
//!    started record is written and its Claude gets the prompt, streams `Event`s, and sends a `Result`
//!    it keeps on disk until the edge's `ResultAck` (one that says the edge did not take
//!    it — another edge issued that job — keeps it for a later connection). Both sides heartbeat; the agent's
//!    heartbeat — a MACed [`Beat`], bound to this connection and numbered — carries its
//!    OAuth report, the jobs it runs and its slots.
//!
//! What is signed or MACed, and why (see "Signed, MACed or plain" below for the frames
//! that are neither): every frame that can end, requeue or settle a job, or tell the edge
//! what the agent holds.
//!
//! # Signed, MACed or plain
//!
//! Signed (ed25519, each side's long-term key): the agent's hello, the edge's challenge
//! (over the agent's nonce), its welcome and its job, cancel and login orders (each bound to its connection's challenge). These are
//! what anyone holding the signer's public key must be able to check, and an order is what
//! runs code on the agent: it stays signed by `EDGE_SIGNING_KEY` alone.
//!
//! MACed (HMAC-SHA256 with one direction's key of this connection, [`crate::envelope::Tagged`]):
//! the agent's progress, results, login reports, refusals of job orders ([`Rejection`],
//! bound to the order's nonce), starts ([`StartReport`], bound likewise) and heartbeats ([`Beat`], bound to the connection's
//! challenge and numbered) — each can end, requeue or settle a job or a login — and the
//! edge's result acknowledgements and heartbeat acks ([`BeatAck`]: the agent hears the
//! edge in them, see "What the agent hears" below). A MAC costs 1-2 µs where a signature cost ~20 µs to
//! make and ~45 µs to check, on every job. It keeps the promise the signatures kept:
//! the keys come from an X25519 exchange whose two public halves are inside the signed
//! hello and welcome, so only the holder of the agent's `AGENT_SIGNING_KEY` and the holder
//! of the edge's `EDGE_SIGNING_KEY` can have them — not whoever sits on the path, and not
//! whoever holds `RUNNER_SECRET` (a caller's secret takes no part in the handshake). Each
//! direction has its own key, so a frame sent back to its maker fails; each connection has
//! its own, so a frame from another connection fails; and the domain prefix and every
//! binding of the payload (order nonce, challenge, numbering) are MACed as they were
//! signed, so a frame replayed on its own connection is refused as before. What a MAC does
//! not give is proof to a third party (the edge could make one) — nothing relies on that.
//!
//! Plain JSON, because a forgery there decides nothing that a signed or MACed frame does
//! not settle, or only what whoever sits on the path can do anyway by holding frames back:
//!
//! - `Accepted` moves a job from dispatched to running, not started: the edge still
//!   honours the agent's MACed refusal of the job's latest order after it, and a job
//!   running but not started that the agent's hello or beat leaves out is sent again as a
//!   dispatched one is — only the MACed `Started` makes the edge end such a job `lost`
//!   instead. So a made-up `Accepted` changes nothing that matters (nothing is lost or
//!   runs twice by it).
//! - `Credit` states free slots, after every job (the same hot path). A made-up surplus
//!   sends orders the agent refuses, MACed, with `retry` (the jobs go back to the queue);
//!   a made-up shortage holds work back, like holding frames. The edge caps `received` at
//!   what it sent, and settles jobs only on the MACed heartbeat's statement.
//! - `Mirrors` is a routing preference; `OrderRefused` names no job (counted and logged).
//! - None of these keeps a connection alive: the edge hears a proven agent in its MACed
//!   heartbeats alone, so frames made up on the path cannot keep a gone agent
//!   "connected" (its jobs never lost, `/health` saying it is there).
//! - From the edge: the `Goodbye` (the path can close the socket anyway). The `Challenge`
//!   is signed since the edge proves its key in it (above).
//!
//! # What the agent hears
//!
//! The agent takes the edge for there only on frames the edge proved, each new on this
//! connection: the signed welcome, job orders in their connection's sequence, cancels and
//! login orders of a nonce never seen, and MACed acknowledgements — a result's (the first
//! for that job on this connection) and a heartbeat's (for a beat it sent and no ack has
//! answered yet). The edge acks every beat it takes, so a live edge is heard at least
//! every heartbeat interval; two intervals with none and the agent drops the connection
//! and dials again, as the edge drops an agent two intervals silent. Anything else — a
//! frame that fails its signature or MAC, a copy, one that does not read, a kind the agent
//! does not know, a `Goodbye` — is counted, and at [`MAX_UNPROVEN_FRAMES`] the agent hangs
//! up (close `4002`) and dials again. So whoever writes into the connection (a hop that
//! ends TLS, plain `ws://`) cannot keep an agent "connected" to an edge that has given it
//! up: cut off, the agent's away rule (no job starts once it has heard nothing the edge
//! proved for longer than the edge's `LOST_AFTER_MS`) applies (hostile review rev26, 2). A new edge → agent kind therefore needs a new
//! version; the edge still ignores agent kinds it does not know.
//!
//! A peer speaking another [`PROTOCOL_VERSION`] is refused with a close reason naming both
//! versions: agent and edge are upgraded together. Message kinds a peer does not know decode as `Unknown` and are ignored, so
//! new kinds can be added without breaking older peers.

use crate::envelope::{Domain, Envelope, HasHeader, OrderHeader, Refusal, Tagged};
use crate::link::MacKey;
#[cfg(test)]
use ed25519_dalek::SigningKey;
use crate::job::{JobResult, JobSpec};
use crate::oauth::OAuthReport;
use crate::Millis;
use serde::{Deserialize, Serialize};

/// 2: jobs may carry a repository (`repo_url`, `push_branch`…). An agent of version 1 would
/// ignore those fields and run the task in an empty folder, so the versions refuse each other.
/// 3: slots are stated absolutely (free slots and orders received), not as increments.
/// 4: pools signed into welcomes and orders; progress and results signed by the agent,
/// bound to the order they answer.
/// 5: result acknowledgements signed by the edge (an agent of version 4 would take an
/// unsigned one, which anyone on the path could make up to have it drop a result); the
/// re-login relay's reports signed by the agent, bound to the login order they answer;
/// the usage window in the login report.
/// 6: refusals of job orders and heartbeats signed by the agent — a refusal bound to the
/// order it refuses, a heartbeat to the connection's challenge with a sequence number
/// ([`Rejection`], [`Beat`]); refusals that name no order travel apart, unsigned
/// (`OrderRefused`). A version-5 edge would take unsigned ones, which anyone on the path
/// could make up to have a running job sent again (run twice) or ended `lost`.
/// 7: job orders bound to their connection's challenge and numbered on it
/// ([`JobOrder::challenge`], [`JobOrder::order_no`]); the agent takes each number once, in
/// order, on that connection only, and states as `received` the highest it took after its
/// signature verified. A version-6 agent would run an order the path held back from an
/// earlier connection after the edge had sent its job again, and would count a made-up
/// job frame as an order received (so the edge sends a held order's job again, and the
/// held order, let through later, runs it a second time).
/// 8: progress in batches: one signed [`ProgressReport`] carries a run of a job's events,
/// each with its own number ([`ProgressEvent`]), so a burst of Claude's lines costs one
/// signature and one verification. A version-7 edge would not read a batch (and a
/// version-7 agent's single events would not read here).
/// 9: per-connection keys: X25519 keys in the signed hello and welcome, and the agent's
/// reports and the edge's result acknowledgements MACed with keys derived from them
/// instead of signed ([`crate::link`]). A version-8 peer would send signatures where a
/// MAC is expected (and expect them).
/// 10: job orders name their caller ([`JobOrder::caller`]): the agent resumes a Claude
/// session only for the caller whose job made it. A version-9 agent would carry any
/// session it finds on its disk into any caller's job.
/// 10, unchanged: job orders say whether their caller is proven ([`JobOrder::caller_proven`]:
/// sent with its own secret), for the weighing of the agent's session cut. No new version:
/// a version-10 agent of before ignores the field and cuts as it did (each name one owner,
/// no worse than before), and an agent of now reads an order without it as not saying
/// (`None`) and weighs its caller as it did before too, an owner by itself — not as
/// unproven: with every caller of an edge of before unproven, all of a pool's names would
/// be one owner, and any one caller's flood of new sessions would push out every other's.
/// 10, unchanged: the heartbeat ack names the beat it answers (`EdgeMessage::HeartbeatAck`'s
/// `beat`). An agent of before ignores it; one of now, told none by an edge of before,
/// takes what it wrote as read at each ack, as before.
/// 10, unchanged too: a result acknowledgement may say the edge did not take the result
/// ([`Acknowledgement::not_taken`]). No new version: a version-10 agent of before drops
/// the result on it, as it did on every acknowledgement; an edge of before acknowledges
/// every result, as before.
/// 10, unchanged: the challenge signed by the edge over the agent's nonce from the dial
/// ([`crate::envelope::ChallengeProof`]), checked by the agent before its hello. No new
/// version: an agent of before sent no nonce and got an unsigned challenge (until 12); an
/// agent of now refuses an edge of before, whose challenge is unsigned, saying to upgrade
/// the edge (security over compatibility: it would send its hello before any proof).
/// 11: heartbeat acks MACed with the connection's edge→agent key ([`BeatAck`]), and the
/// agent hears the edge only in proven frames (see "What the agent hears"): a version-10
/// edge's plain acks would never be heard, and the agent would drop every connection to it
/// after two heartbeat intervals; a version-10 agent hears any frame, made up or not.
/// 12: the welcome lists the jobs of the hello the edge will not have the agent run
/// ([`Welcome::given_up`]), and the agent, once welcomed, refuses exactly those: it no
/// longer judges by its own clock whether an absence it came back from outlasted the
/// edge's `LOST_AFTER_MS` (it counted from its last frame heard, the edge from when it saw
/// the loss, up to a heartbeat and its silence detection later, so after a blip the edge
/// did not give up the agent still ended waiting jobs "not started", rev29-2). A
/// version-11 edge's welcome names none, and this agent would start a job that edge had
/// ended `lost`. The edge also closes a dial that carries no agent nonce (no release since
/// 11 sends none) rather than challenge it unsigned.
pub const PROTOCOL_VERSION: u32 = 12;

/// Largest frame either side accepts. Results are capped well below this by the agent.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// How long past a job's `timeout_ms` the edge waits for its agent's result unless
/// `TIMEOUT_MARGIN_MS` says otherwise. The agent ends a job's work within it, a push under
/// way included, so that its own answer (which says whether the push landed) comes first.
pub const DEFAULT_TIMEOUT_MARGIN_MS: crate::Millis = 30_000;

/// Largest frame a connection may send before its hello is verified. Whoever holds an
/// agent's upgrade proof (one played back within its window) can open a connection, so
/// until it answers its own challenge it may not make the edge hold more than this. A
/// hello lists the agent's running and unacknowledged jobs: this holds about 1,900.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// How many frames a real peer never sends one side takes on a connection before it acts:
/// the agent hangs up and dials again (orders that fail their signature or are copies,
/// frames that do not read or of a kind it does not know, acknowledgements not MACed on the
/// connection or played back, goodbyes: "What the agent hears" above); the edge logs
/// that many of the agent's (reports not MACed on the connection, refusals that name no
/// order), then only counts them. Whoever can write into the connection (a hop that ends
/// TLS, plain ws://) can write such frames as fast as the link carries them, no key
/// needed: each cost a log line at both ends and a queued refusal at the agent, without
/// bound (hostile review rev21, 1). A few are kept for the operator to see why.
pub const MAX_UNPROVEN_FRAMES: u32 = 8;

/// How long either side waits for each step of the handshake (challenge, hello,
/// welcome) before giving the connection up.
pub const HANDSHAKE_TIMEOUT_MS: crate::Millis = 10_000;

/// Close codes (4000–4999 are application codes in RFC 6455) and close reasons.
pub mod close {
    /// RFC 6455 "internal error": the closing side cannot go on (misconfigured, no storage).
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const VERSION_MISMATCH: u16 = 4000;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const PROTOCOL_ERROR: u16 = 4002;
    pub const REPLACED: u16 = 4003;
    pub const SILENT: u16 = 4004;
    pub const SHUTTING_DOWN: u16 = 4005;
    /// A hello refused because another agent instance (another `DATA_DIR`) proving the same
    /// agent id is still heard from, or may still hold jobs of it ([`super::Hello::instance`]):
    /// the other one's connection and jobs are kept untouched. The reason begins `retry
    /// after <ms> ms:` (the earliest the edge could let it in); the agent retries then, and
    /// the operator gives each machine its own id.
    pub const DUPLICATE: u16 = 4006;
    /// A probe answered ([`super::AgentMessage::Probe`]): the edge closes, its work done.
    pub const PROBED: u16 = 1000;

    /// A close frame carries at most 123 bytes of reason (RFC 6455); a longer one is cut
    /// on a character boundary and marked. The whole reason travels in a `Goodbye` first.
    pub fn reason(text: &str) -> String {
        const MAX: usize = 123;
        if text.len() <= MAX {
            return text.to_string();
        }
        format!("{}...", crate::text::truncate(text, MAX - 3))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn reasons_fit_a_close_frame() {
            assert_eq!(super::reason("short"), "short");
            let long = "é".repeat(100);
            let cut = super::reason(&long);
            assert!(cut.len() <= 123 && cut.ends_with("..."), "{cut}");
        }
    }
}

/// Edge → agent. Written by serde as an internally tagged enum; read by its `type` first
/// ([`crate::frame`], [`EdgeMessageFields`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeMessage {
    Challenge {
        protocol: u32,
        nonce: String,
        edge_version: String,
        server_time: Millis,
        /// The edge's signature over this challenge and the agent's nonce from the upgrade
        /// request ([`crate::envelope::ChallengeProof`]). The edge always sends it (it closes
        /// a dial without a nonce); optional on the wire so that a challenge without it is
        /// read, and refused by the agent, which sends its hello only once it verifies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<String>,
    },
    /// Signed [`Welcome`].
    Welcome { envelope: Envelope },
    /// Signed [`JobOrder`].
    Job { envelope: Envelope },
    /// Signed [`CancelOrder`].
    Cancel { envelope: Envelope },
    /// Signed [`LoginOrder`].
    Login { envelope: Envelope },
    /// The edge has stored this result; the agent may forget it: a signed
    /// [`Acknowledgement`] MACed with the connection's edge→agent key, so that no one on
    /// the path can make the agent drop a result the edge never got.
    ResultAck { envelope: Tagged },
    /// A heartbeat taken: a [`BeatAck`] MACed with the connection's edge→agent key, so that
    /// no one on the path can make the agent hear an edge that is not there.
    HeartbeatAck { envelope: Tagged },
    /// Sent just before the edge closes the socket, with the reason in full (close
    /// frames only carry 123 bytes).
    Goodbye { code: u16, reason: String },
    #[serde(other)]
    Unknown,
}

/// Agent → edge. Written by serde as an internally tagged enum; read by its `type` first
/// ([`crate::frame`], [`AgentMessageFields`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// Signed [`Hello`]. `protocol` and `agent_id` are repeated outside the signature so
    /// the edge can pick the key to verify with and refuse another version by name.
    Hello { protocol: u32, agent_id: String, envelope: Envelope },
    /// A [`Hello`] signed under its own domain ([`Domain::Probe`]) by `claude-runner
    /// doctor`: the edge checks it as it checks a hello, answers with its signed
    /// [`Welcome`] (or refuses it, saying why, as it refuses a hello) and closes the
    /// connection. Nothing else happens: the agent's own connection is not replaced, its
    /// jobs are not reconciled with the probe's empty lists. Why: whether the edge knows
    /// the agent's key, and the agent the edge's, was said only by an agent that then
    /// redialled for ever; a hello could not be sent to ask, since it replaces the
    /// running agent's connection. Its own domain, and its own type: no probe can be
    /// taken for a hello, and an edge that does not know it closes the connection.
    Probe { protocol: u32, agent_id: String, envelope: Envelope },
    /// A MACed [`Beat`]: the agent's login, the jobs it holds and its slots, as of one
    /// moment. Sent every heartbeat interval, and at once when its login or usage window
    /// changes.
    Heartbeat { envelope: Tagged },
    /// The agent's free slots now (sent after the welcome and whenever a job ends).
    Credit { slots: Slots },
    /// The repositories the agent holds a mirror of now (names only), sent when a job
    /// ended: the edge prefers an agent holding a job's repository. An edge that does
    /// not route by it ignores the message.
    Mirrors { names: Vec<String> },
    /// The job verified and is starting. Not signed (see "Signed or not").
    Accepted { job_id: String },
    /// The job's durable started record is written and its Claude gets the prompt now: a
    /// MACed [`StartReport`], bound to the order. Until the edge hears it, a job the agent
    /// accepted had not started: one the agent's next hello (or beat) does not name is sent
    /// again, not ended `lost`. Added without a new version: an edge of before ignores it
    /// (`Unknown`), and ends such a job `lost` as it did.
    Started { envelope: Tagged },
    /// A job order refused, nothing ran: a MACed [`Rejection`], bound to the order.
    Rejected { envelope: Tagged },
    /// An order refused that the agent cannot tie to a job of the edge's: it did not
    /// verify (garbage, a forgery, tampered on the way), it was a replay, or it was a
    /// cancel or login order (refusing those changes no job). Not signed: the edge only
    /// counts and logs it — it names nothing the edge could act on (and past
    /// [`MAX_UNPROVEN_FRAMES`] of a connection's, only counts it).
    OrderRefused { reason: String },
    /// Progress events of a running job, in a batch: a MACed [`ProgressReport`].
    Event { envelope: Tagged },
    /// A job's result: a MACed [`ResultReport`].
    Result { envelope: Tagged },
    /// How a relayed `claude auth login` goes: a MACed [`LoginReport`].
    LoginProgress { envelope: Tagged },
    #[serde(other)]
    Unknown,
}

/// [`EdgeMessage`]'s variants as serde reads them once [`crate::frame`] has its `type`:
/// the same kinds and fields, with their defaults (a `remote` derive, checked by the
/// compiler against [`EdgeMessage`] field for field; a kind left out here would not
/// read, which `every_kind_of_frame_reads_back_as_it_was_written` catches).
#[derive(Deserialize)]
#[serde(remote = "EdgeMessage", rename_all = "snake_case")]
enum EdgeMessageFields {
    Challenge {
        protocol: u32,
        nonce: String,
        edge_version: String,
        server_time: Millis,
        #[serde(default)]
        proof: Option<String>,
    },
    Welcome { envelope: Envelope },
    Job { envelope: Envelope },
    Cancel { envelope: Envelope },
    Login { envelope: Envelope },
    ResultAck { envelope: Tagged },
    HeartbeatAck { envelope: Tagged },
    Goodbye { code: u16, reason: String },
    #[serde(other)]
    Unknown,
}

/// [`AgentMessage`]'s variants as serde reads them once [`crate::frame`] has its `type`
/// (as [`EdgeMessageFields`] for [`EdgeMessage`]).
#[derive(Deserialize)]
#[serde(remote = "AgentMessage", rename_all = "snake_case")]
enum AgentMessageFields {
    Hello { protocol: u32, agent_id: String, envelope: Envelope },
    Probe { protocol: u32, agent_id: String, envelope: Envelope },
    Heartbeat { envelope: Tagged },
    Credit { slots: Slots },
    Mirrors { names: Vec<String> },
    Accepted { job_id: String },
    Started { envelope: Tagged },
    Rejected { envelope: Tagged },
    OrderRefused { reason: String },
    Event { envelope: Tagged },
    Result { envelope: Tagged },
    LoginProgress { envelope: Tagged },
    #[serde(other)]
    Unknown,
}

impl<'de> crate::frame::ByType<'de> for EdgeMessage {
    const NAME: &'static str = "EdgeMessage";
    fn variant<D: serde::Deserializer<'de>>(frame: D) -> Result<Self, D::Error> {
        EdgeMessageFields::deserialize(frame)
    }
}

impl<'de> crate::frame::ByType<'de> for AgentMessage {
    const NAME: &'static str = "AgentMessage";
    fn variant<D: serde::Deserializer<'de>>(frame: D) -> Result<Self, D::Error> {
        AgentMessageFields::deserialize(frame)
    }
}

impl<'de> Deserialize<'de> for EdgeMessage {
    fn deserialize<D: serde::Deserializer<'de>>(frame: D) -> Result<Self, D::Error> {
        crate::frame::read(frame)
    }
}

impl<'de> Deserialize<'de> for AgentMessage {
    fn deserialize<D: serde::Deserializer<'de>>(frame: D) -> Result<Self, D::Error> {
        crate::frame::read(frame)
    }
}

/// The agent's slots, stated absolutely: how many jobs it could start now, and the number
/// of the last job order it had received on this connection when it said so (the highest
/// [`JobOrder::order_no`] whose signature verified; every order numbered up to it either
/// arrived or never will be taken). The edge may send
/// `free - (orders sent - received)` more: orders still on the way are counted against
/// the statement, so a statement that crossed an order never over-fills the agent, and
/// a lost or late statement is made good by the next one (every heartbeat carries one).
/// The agent makes its statements, acceptances, refusals and results under one lock and
/// sends them in that order on one connection, so they reach the edge in the order they
/// were made; `received` starts again at 0 on each connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    pub free: u32,
    pub received: u64,
}

/// What a heartbeat says, MACed by the agent ([`crate::envelope::Domain::Heartbeat`]).
/// The edge settles jobs on it — one the agent should hold and does not is sent again or
/// ended `lost` — so whoever sits on the path may not make one up; and it is bound to
/// this connection (`challenge`) and numbered (`seq`), so one captured earlier — on this
/// connection or another — cannot be played back to say the agent no longer holds a job
/// it took since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beat {
    /// The edge's challenge nonce of this connection ([`EdgeMessage::Challenge`]).
    pub challenge: String,
    /// 1 for the first beat on a connection, then higher each time: the edge takes a beat
    /// only if its number is above the last one it took on the connection.
    pub seq: u64,
    /// Every job the agent holds and has not sent a result for, as of the same moment as
    /// `slots`.
    pub running: Vec<String>,
    pub capacity: u32,
    pub oauth: OAuthReport,
    pub slots: Slots,
    /// The Claude Code CLI's `--version` line (it can change under a running agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claude_version: Option<String>,
    /// The agent takes no new jobs: it is draining before it stops (a stop request), or,
    /// started with `--one-job`, it has its job. A beat goes at once when its door closes
    /// (and after each welcome while it is closed). The edge then refuses an `/execute` only
    /// such agents fit, and ends the queued ones, rather than hold them for an agent going
    /// away (a caller waited out the whole drain, then fell back). MACed, in the beat: a
    /// plain frame saying it, made up on the path, held the agent back for the whole
    /// connection, where a made-up `Credit` lasts until the next beat.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// The agent takes no new jobs because it cannot start them now, and why, in words for
    /// its operator (its DATA_DIR's disk is full, its user's process limit reached): it
    /// handed a job back unstarted, and offers no slot until it could start one again
    /// (a write into DATA_DIR succeeds; after a heartbeat interval). The edge holds it back
    /// as it does a stopping agent, showing the reason (at most
    /// [`crate::text::MAX_PEER_WORDS_BYTES`] of it). Additive: absent from an older agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cannot_start: Option<String>,
    /// The results it holds that the edge has not acknowledged, named as a hello names
    /// them ([`Hello::name_finished`]; `more_finished`: there are more). The edge waits for
    /// such a job's result rather than take it for lost: a frame-aware hop (a TLS proxy,
    /// plain `ws://`) can drop the result frame alone, and the agent sends it again. Empty
    /// from an agent of before the field, which named ended jobs nowhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finished: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more_finished: bool,
}

/// A job order refused, MACed by the agent ([`crate::envelope::Domain::Rejection`]) and
/// bound to the order it refuses: the edge ends the job, or sends it again (`retry`), so
/// whoever sits on the path may not make one up — a made-up `retry` for a job the agent
/// runs would have it sent again and run twice — nor play one back for a later order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub job_id: String,
    /// The nonce of the refused order ([`OrderHeader::nonce`]).
    pub order_nonce: String,
    pub reason: String,
    /// The refusal was about this moment (no free slot), not the order: the edge may
    /// queue the job again.
    #[serde(default)]
    pub retry: bool,
}

/// A job started, MACed by the agent ([`crate::envelope::Domain::Started`]) and bound to
/// the order it answers: sent once its started record is durable, as its Claude gets the
/// prompt. From then on the edge never sends the job again (a Claude may have run it);
/// before it, a job the agent accepted and then no longer names was never started, and is
/// sent again. MACed: one made up on the path would have the edge end `lost` a job whose
/// agent restarted before its start, which it should send again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReport {
    pub job_id: String,
    /// The nonce of the order it answers ([`OrderHeader::nonce`]).
    pub order_nonce: String,
}

/// What the agent signs to answer the challenge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub agent_id: String,
    pub agent_version: String,
    /// The edge's challenge nonce, echoed: binds this proof to this connection.
    pub challenge: String,
    /// The agent's own nonce, which the edge must sign back in its [`Welcome`].
    pub agent_nonce: String,
    /// The agent's fresh X25519 public key for this connection (base64), signed here so
    /// no one on the path can put in another ([`crate::link`]).
    pub ephemeral: String,
    pub issued_at: Millis,
    pub capacity: u32,
    /// Jobs still running on the agent from an earlier connection.
    pub running: Vec<String>,
    /// Jobs whose results wait on the agent's disk for an acknowledgement: at most
    /// [`MAX_HELLO_FINISHED`] of them ([`Hello::name_finished`]).
    pub finished: Vec<String>,
    /// The agent holds more results than `finished` names: a job it does not name may
    /// still have its result on the way, so it is not taken for lost at this hello.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more_finished: bool,
    pub oauth: OAuthReport,
    /// The Claude Code CLI's `--version` line, when the agent could read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claude_version: Option<String>,
    /// The agent's labels (`AGENT_LABELS`): jobs may ask for them.
    #[serde(default, skip_serializing_if = "crate::placement::Labels::is_empty")]
    pub labels: crate::placement::Labels,
    /// The repositories it holds a mirror of (names, [`crate::repo::RepoUrl::name`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    /// Which agent instance this is: random, made once for its `DATA_DIR` and kept there
    /// (`DATA_DIR/instance-id`; the `DATA_DIR` lock allows one agent process at a time), so
    /// the same in every hello of every start ([`crate::ids::valid_instance_id`]). The edge
    /// keeps one connection per agent id. A hello of the same instance is that agent come
    /// back (restarted, or its older connection half-open): it replaces the older
    /// connection at once and settles the agent's jobs. Two instances given the same
    /// `AGENT_ID` and key (a `.env` copied to a second machine) took turns replacing each
    /// other, each hello ending the other's running jobs as lost while they ran: now a
    /// hello of another instance is refused ([`close::DUPLICATE`]) while the other is heard
    /// or may hold a job within its orphan deadline, and once let in it settles none of the
    /// other's jobs. Absent (`None`: an agent of before the field, or a probe) a hello is of
    /// the instance that names none: it replaces only a connection that names none either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// The most jobs an agent runs at once: the top of its `MAX_CONCURRENT_JOBS`. An agent
/// states its capacity in every hello and heartbeat, and names every job it runs: the edge
/// takes a capacity past this as this, and closes a connection whose hello or heartbeat
/// names more running jobs than its agent can hold (`edge/core`, `machine/sessions.rs`).
pub const MAX_CAPACITY: u32 = 64;

/// The most finished jobs a hello names: a spool of results that were never acknowledged
/// (an edge away for long, one that could not open them) can hold any number, and a hello
/// must fit [`MAX_HELLO_BYTES`] — one over it is refused, and the agent could never
/// connect again. At [`crate::ids::MAX_JOB_ID`] bytes a name, escaped twice, some 27 KiB:
/// with 64 running jobs, 16 KiB of mirror names and the labels, the hello still fits. Three
/// times the most jobs an agent runs at once: those that ended while it was away.
pub const MAX_HELLO_FINISHED: usize = 192;

impl Hello {
    /// The `finished` and `more_finished` of a hello, from the results the agent holds (in
    /// the order it sends them after the hello): at most [`MAX_HELLO_FINISHED`] named. The
    /// others stay in the spool and are sent all the same.
    pub fn name_finished(held: impl IntoIterator<Item = String>) -> (Vec<String>, bool) {
        let mut held = held.into_iter();
        let named: Vec<String> = held.by_ref().take(MAX_HELLO_FINISHED).collect();
        (named, held.next().is_some())
    }
}

/// The longest CLI version an edge keeps: a version line, not a document.
pub const MAX_CLAUDE_VERSION_BYTES: usize = 100;

/// A batch of a job's progress events (Claude's stream-json lines, redacted), MACed by
/// the agent once ([`crate::envelope::Domain::Progress`]) and bound to the order it
/// answers: whoever sits on the path between agent and edge cannot make one up or move one
/// to another job. The agent sends each batch before the job's result, on the same
/// connection, so the edge has shown a job's progress when its result comes.
///
/// `E` is how an event is held: a JSON tree where the agent makes and redacts it, the text
/// as the agent wrote it (`Box<RawValue>`, checked to be one JSON value) where the edge
/// only passes it on — the same frames either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressReport<E = serde_json::Value> {
    pub job_id: String,
    /// The nonce of the job's order ([`OrderHeader::nonce`]).
    pub order_nonce: String,
    /// In the order Claude printed them, numbered up: at least one, at most
    /// [`MAX_PROGRESS_EVENTS`].
    pub events: Vec<ProgressEvent<E>>,
}

/// One progress event: its number in the job's run (1, 2, …, the SSE `id:` followers read)
/// and the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent<E = serde_json::Value> {
    pub seq: u64,
    pub event: E,
}

/// A progress event as the edge reads it: the event's JSON text as sent.
pub type RawProgressReport = ProgressReport<Box<serde_json::value::RawValue>>;

/// The `type` of the event that stands, in a job's progress, for events dropped on the way
/// ([`progress_dropped`]): by the agent (its link slower than the job prints), or by the
/// edge (a batch of the agent's it could not show).
pub const PROGRESS_DROPPED_TYPE: &str = "progress_dropped";

/// That event, `{"type":"progress_dropped","events":N}`: numbered as the last event it
/// stands for, so a follower's ids skip the others.
pub fn progress_dropped(events: u64) -> serde_json::Value {
    serde_json::json!({"type": PROGRESS_DROPPED_TYPE, "events": events})
}

/// Most events in one progress batch.
pub const MAX_PROGRESS_EVENTS: usize = 64;

/// Most bytes of Claude's output the agent puts in one progress batch (an event of one
/// line over this is summarised, not sent): the largest batch is no larger than the
/// largest single event of protocol 7.
pub const MAX_PROGRESS_BYTES: usize = 256 * 1024;

/// The largest MACed progress payload the edge opens: room for [`MAX_PROGRESS_BYTES`] of
/// output re-encoded as JSON (escapes can make text several times longer), well under
/// [`MAX_FRAME_BYTES`]. A larger one is refused before its MAC is checked.
pub const MAX_PROGRESS_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// Deepest nesting of objects and arrays in a progress event: the agent sends a deeper
/// one as a summary, and the edge refuses a batch holding one ([`ProgressReport::check`]).
/// Followers read each event as a JSON value, many with a parser that stops at some depth
/// (serde_json, `claude-runner submit`'s, at 128 levels); Claude's own lines nest a few
/// levels, a line a job wrote may nest as deep as it likes.
pub const MAX_EVENT_DEPTH: usize = 100;

/// How deep a progress event nests, as each side holds it.
pub trait Nested {
    /// Whether it nests objects and arrays more than `max` levels deep.
    fn nests_deeper_than(&self, max: usize) -> bool;
}

impl Nested for serde_json::Value {
    /// Looked at no deeper than `max` + 1 levels: a value made in memory may nest deeper
    /// than any parser lets through.
    fn nests_deeper_than(&self, max: usize) -> bool {
        match self {
            serde_json::Value::Array(items) => max == 0 || items.iter().any(|child| child.nests_deeper_than(max - 1)),
            serde_json::Value::Object(map) => max == 0 || map.values().any(|child| child.nests_deeper_than(max - 1)),
            _ => false,
        }
    }
}

impl Nested for Box<serde_json::value::RawValue> {
    /// Read from the text as sent, without parsing it again: the edge passes events on
    /// raw, and serde_json checks a raw value's syntax without its recursion limit, so a
    /// batch of events 100,000 levels deep read whole (review, session 40). One pass over
    /// the bytes: brackets outside strings counted, a string skipped to its closing quote
    /// (a backslash skips the byte after it; JSON's other escapes hold no quote).
    fn nests_deeper_than(&self, max: usize) -> bool {
        nests_deeper_than(self.get().as_bytes(), max)
    }
}

/// Whether JSON text (one value, as serde_json checked it) nests objects and arrays more
/// than `max` levels deep ([`Nested`] of a raw event).
pub fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let (mut depth, mut at) = (0usize, 0usize);
    while at < json.len() {
        match json[at] {
            b'"' => {
                at += 1;
                // To the closing quote: past each backslash and the byte it escapes.
                while at < json.len() && json[at] != b'"' {
                    at += if json[at] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    false
}

/// Why a progress batch is refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchFault {
    #[error("a progress batch with no event")]
    Empty,
    #[error("a progress batch of {0} events, over the {MAX_PROGRESS_EVENTS}-event limit")]
    TooMany(usize),
    #[error("a progress batch whose event {seq} does not follow event {after} (events go numbered up, each once)")]
    OutOfOrder { seq: u64, after: u64 },
    #[error("a progress batch whose event {seq} nests deeper than {MAX_EVENT_DEPTH} levels (the agent sends such an event as a summary)")]
    TooDeep { seq: u64 },
}

impl<E: Nested> ProgressReport<E> {
    /// Whether the batch is one the agent could have made: 1 to [`MAX_PROGRESS_EVENTS`]
    /// events, numbered strictly up from 1 or more, none nesting deeper than
    /// [`MAX_EVENT_DEPTH`].
    pub fn check(&self) -> Result<(), BatchFault> {
        if self.events.is_empty() {
            return Err(BatchFault::Empty);
        }
        if self.events.len() > MAX_PROGRESS_EVENTS {
            return Err(BatchFault::TooMany(self.events.len()));
        }
        let mut after = 0;
        for e in &self.events {
            if e.seq <= after {
                return Err(BatchFault::OutOfOrder { seq: e.seq, after });
            }
            after = e.seq;
        }
        match self.events.iter().find(|e| e.event.nests_deeper_than(MAX_EVENT_DEPTH)) {
            Some(e) => Err(BatchFault::TooDeep { seq: e.seq }),
            None => Ok(()),
        }
    }
}

/// A job's result, MACed by the agent ([`crate::envelope::Domain::Result`]) and bound to
/// the order it answers. The agent keeps its payload until the edge acknowledges it, and
/// MACs it again with each connection's key as it sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultReport {
    pub job_id: String,
    pub order_nonce: String,
    pub result: JobResult,
}

/// How a relayed `claude auth login` goes — its authorization URL once printed, then its
/// outcome with the login as the agent now reads it — MACed by the agent
/// ([`crate::envelope::Domain::LoginReport`]) and bound to the login order it answers: it
/// tells the edge the agent is logged in again (work is let go on it), so whoever sits on
/// the path may not make one up, nor replay one from another login.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginReport {
    pub login_id: String,
    /// The nonce of the login order it answers ([`OrderHeader::nonce`]).
    pub order_nonce: String,
    pub state: LoginState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthReport>,
    /// With `url`: the agent's signature over it ([`LoginUrlClaim`]), which the edge passes
    /// on to `claude-runner login` as it is (additive: an older agent sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_proof: Option<String>,
}

/// What an agent signs, with its own key (`AGENT_SIGNING_KEY`, under
/// [`Domain::LoginUrl`]), over the sign-in URL of a relayed login. The report that carries
/// the URL is MACed with a connection key the edge holds, so the edge — or anything that
/// ends TLS in front of it — could put its own URL there: a genuine sign-in page of
/// Anthropic's for a `claude auth login` it runs itself, whose code the operator would then
/// hand it with the login to their account. Only the agent's key makes this claim, so
/// `claude-runner login` shows a URL only when the claim holds for the agent it names.
///
/// On the wire a claim is `<issued_at>.<base64url signature>` (about 100 characters: the
/// session record that keeps it on the Worker has 2 KiB in all); the login id, the agent
/// id and the URL it covers travel beside it, so a claim moved to another login, agent or
/// URL does not hold.
pub struct LoginUrlClaim;

/// The longest claim read: a time (20 digits), a dot, a signature (86).
pub const MAX_LOGIN_URL_PROOF: usize = 128;

impl LoginUrlClaim {
    pub fn sign(key: &ed25519_dalek::SigningKey, login_id: &str, agent_id: &str, url: &str, issued_at: Millis) -> String {
        use base64::Engine;
        use ed25519_dalek::Signer;
        let sig = key.sign(&Self::signed(login_id, agent_id, url, issued_at));
        format!("{issued_at}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    /// When `agent_id` signed, with `key`, that `url` is login `login_id`'s; else why not.
    /// The time is shown, not checked: an old claim names an old `claude auth login`, whose
    /// code is of no use without that process.
    pub fn check(proof: &str, key: &ed25519_dalek::VerifyingKey, login_id: &str, agent_id: &str, url: &str) -> Result<Millis, String> {
        use base64::Engine;
        let unreadable = || "the agent's signature over the URL is not of its shape".to_string();
        if proof.len() > MAX_LOGIN_URL_PROOF {
            return Err(unreadable());
        }
        let (issued_at, sig) = proof.split_once('.').ok_or_else(unreadable)?;
        if issued_at.is_empty() || issued_at.len() > 20 || !issued_at.bytes().all(|b| b.is_ascii_digit()) {
            return Err(unreadable());
        }
        let issued_at: Millis = issued_at.parse().map_err(|_| unreadable())?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig).ok().and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok()).ok_or_else(unreadable)?;
        key.verify_strict(&Self::signed(login_id, agent_id, url, issued_at), &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| "the agent's signature over the URL does not hold: the URL is not the one its agent printed for this login, or the key is not that agent's".to_string())?;
        Ok(issued_at)
    }

    /// Whether `proof` has a claim's shape (digits, a dot, 86 base64url characters): what
    /// an edge keeps and passes on; anything else costs it room (a character outside
    /// Latin-1 doubles a Worker's whole session record) and proves nothing.
    pub fn well_formed(proof: &str) -> bool {
        let Some((at, sig)) = proof.split_once('.') else { return false };
        (1..=20).contains(&at.len()) && at.bytes().all(|b| b.is_ascii_digit()) && sig.len() == 86 && sig.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    /// The signed bytes: ids are plain (no newline) and the URL a sign-in page's (no
    /// newline either, [`crate::oauth::sign_in_host`]), so no field shifts into another.
    fn signed(login_id: &str, agent_id: &str, url: &str, issued_at: Millis) -> Vec<u8> {
        let mut bytes = Domain::LoginUrl.prefix().to_vec();
        bytes.extend_from_slice(format!("{login_id}\n{agent_id}\n{issued_at}\n{url}").as_bytes());
        bytes
    }
}

/// What the edge signs to answer the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    pub agent_id: String,
    /// The pool the agent joined: it must be the one the agent serves (`EDGE_POOL`).
    pub pool: String,
    pub agent_nonce: String,
    /// The edge's fresh X25519 public key for this connection (base64), signed here.
    pub ephemeral: String,
    pub session_id: String,
    pub heartbeat_interval_ms: u64,
    /// The edge's `LOST_AFTER_MS`: how long it waits for an agent that holds jobs before
    /// it gives them up. An agent holding jobs comes back well within it, however grown
    /// its reconnect backoff. `None` (absent: an edge of before it): no such bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_ms: Option<u64>,
    /// The jobs of the hello's `running` that the edge will not have this agent run: it
    /// ended them (lost while the agent was away, cancelled, timed out), sent them again
    /// (queued, or on another agent), or has no record of them. The agent never starts
    /// these — a caller told to fall back may be running the task elsewhere — and may
    /// start every other job it holds: the edge took those over on this connection. The
    /// edge's word, signed: the agent's own clock cannot say (it counts an absence from
    /// its last frame heard, the edge from when it saw the loss). At most the hello's
    /// `running`, so at most [`MAX_CAPACITY`]. Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub given_up: Vec<String>,
    pub issued_at: Millis,
}

/// A signed job order. `S` is how its task is held: the agent reads its own copy; the edge
/// seals the job record's own (`JobOrder<&JobSpec>`), so sending a job copies none of its
/// task (issue 11) — the same frames either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOrder<S = JobSpec> {
    #[serde(flatten)]
    pub header: OrderHeader,
    /// The challenge nonce of the connection the edge sent it on: the agent takes it on
    /// that connection only, so an order held back on the path and delivered on a later
    /// one — after the edge, on the agent's hello, sent the job again — never runs.
    pub challenge: String,
    /// Its number on that connection (1, 2, … in the order sent): the agent takes each
    /// number once and in order, and states the highest it took as [`Slots::received`].
    pub order_no: u64,
    /// Whose job it is: the edge's name for its caller (lowered, `default` for a request
    /// that names none). Inside the signature, so the path cannot change it: the agent
    /// binds the Claude sessions the job makes to this caller, and resumes a session
    /// (`spec.session_id`) only for the caller it is bound to.
    pub caller: String,
    /// Whether [`JobOrder::caller`] is proven: the job was sent with that caller's own
    /// secret (`RUNNER_SECRETS`), not named by the holder of the pool's `RUNNER_SECRET`,
    /// who may make up any number of names. Inside the signature. Only weighs the agent's
    /// session cut (agent/src/sessions.rs: made-up names share one owner's share), never
    /// whose a session is. `None` (absent: an edge of before it, which cannot say): the
    /// agent weighs the caller as it did before the field, an owner by itself. Read as
    /// unproven instead, every caller of such an edge would share one owner's share, and
    /// one caller's flood of new sessions (its own secret's, no made-up names needed)
    /// would push out every other caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_proven: Option<bool>,
    pub spec: S,
}

impl<S> JobOrder<S> {
    /// Whether this order, verified, may be taken on the connection of `challenge`, where
    /// the highest order number taken so far is `highest`. One the path held back past a
    /// later one (or past the connection's end) is refused: by then the agent's statement
    /// of `received` has the edge settle it as arrived and not held, and send it again.
    pub fn bind(&self, challenge: &str, highest: u64) -> Result<(), Refusal> {
        same_connection(Some(&self.challenge), challenge)?;
        if self.order_no <= highest {
            return Err(Refusal::OutOfOrder { order_no: self.order_no, highest });
        }
        Ok(())
    }
}

/// Whether an order sealed for the connection of `sent_on` may be taken on the one of
/// `challenge`. `None`: an edge of before cancels and logins were bound (added within
/// protocol 10), which names no connection; taken as before. The field is inside the
/// signature, so the path cannot take it off an order of an edge that sets it.
fn same_connection(sent_on: Option<&str>, challenge: &str) -> Result<(), Refusal> {
    match sent_on {
        Some(sent_on) if sent_on != challenge => Err(Refusal::OtherConnection),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelOrder {
    #[serde(flatten)]
    pub header: OrderHeader,
    /// The challenge nonce of the connection the edge sent it on, as a [`JobOrder`]'s: the
    /// agent takes it on that connection only, so a cancel the path held back from one
    /// connection cannot stop a job on the next, within its expiry (the edge sends a
    /// cancel again on each connection while its job runs). Added within protocol 10:
    /// `None` from an edge of before ([`CancelOrder::bind`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    pub reason: String,
}

impl CancelOrder {
    /// Whether this cancel, verified, may be taken on the connection of `challenge`.
    pub fn bind(&self, challenge: &str) -> Result<(), Refusal> {
        same_connection(self.challenge.as_deref(), challenge)
    }
}

/// Where a relayed login stands, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginState {
    /// `claude auth login` printed its URL and waits for the code.
    AwaitingCode,
    LoggedIn,
    Failed,
}

/// Re-login relay: start `claude auth login`, or hand it the code the person pasted.
/// `header.job_id` carries the login's id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginOrder {
    #[serde(flatten)]
    pub header: OrderHeader,
    /// The challenge nonce of the connection the edge sent it on, as a [`CancelOrder`]'s:
    /// a login start or code the path held back cannot be played on the next connection.
    /// Added within protocol 10: `None` from an edge of before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    pub action: LoginAction,
}

impl LoginOrder {
    /// Whether this login order, verified, may be taken on the connection of `challenge`.
    pub fn bind(&self, challenge: &str) -> Result<(), Refusal> {
        same_connection(self.challenge.as_deref(), challenge)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum LoginAction {
    Start,
    Code { code: String },
}

impl<S> HasHeader for JobOrder<S> {
    fn header(&self) -> &OrderHeader {
        &self.header
    }
}
impl HasHeader for CancelOrder {
    fn header(&self) -> &OrderHeader {
        &self.header
    }
}
impl HasHeader for LoginOrder {
    fn header(&self) -> &OrderHeader {
        &self.header
    }
}

impl EdgeMessage {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("edge messages serialise")
    }

    /// The edge stored `agent_id`'s result of `job_id`, MACed with the connection's
    /// edge→agent key.
    pub fn result_ack(job_id: &str, agent_id: &str, key: &MacKey) -> EdgeMessage {
        let ack = Acknowledgement { job_id: job_id.to_string(), agent_id: agent_id.to_string(), not_taken: false };
        EdgeMessage::ResultAck { envelope: Tagged::seal(Domain::ResultAck, &ack, key) }
    }

    /// The edge took heartbeat `beat` of this connection, at `server_time`, MACed with the
    /// connection's edge→agent key.
    pub fn heartbeat_ack(beat: u64, server_time: Millis, key: &MacKey) -> EdgeMessage {
        EdgeMessage::HeartbeatAck { envelope: Tagged::seal(Domain::HeartbeatAck, &BeatAck { beat, server_time }, key) }
    }

    /// The edge did not take `agent_id`'s result of `job_id` ([`Acknowledgement::not_taken`]),
    /// MACed with the connection's edge→agent key.
    pub fn result_not_taken(job_id: &str, agent_id: &str, key: &MacKey) -> EdgeMessage {
        let ack = Acknowledgement { job_id: job_id.to_string(), agent_id: agent_id.to_string(), not_taken: true };
        EdgeMessage::ResultAck { envelope: Tagged::seal(Domain::ResultAck, &ack, key) }
    }
}

/// What an [`EdgeMessage::HeartbeatAck`] MACs. The connection is the key's; `beat` names
/// the heartbeat ([`Beat::seq`]) answered, so one played back is no news: the agent takes
/// each number once, and only for a beat it sent. It also judges the edge's silence from
/// it: what it wrote after that beat may still be on its way (in a hop that buffers — ssh
/// -L, a proxy, a slow uplink's queues), so only the bytes written up to it are known read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeatAck {
    pub beat: u64,
    /// The edge's wall clock as it took the beat.
    pub server_time: Millis,
}

/// What a [`EdgeMessage::ResultAck`] MACs: the job whose result the edge stored, and the
/// agent it tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledgement {
    pub job_id: String,
    pub agent_id: String,
    /// The edge did not take the result — it never issued that job, or not that order of
    /// it, or the job is another agent's — so another edge (the agent moved, its
    /// `EDGE_URL` changed, a tunnel flipped) may be the one waiting for it: the agent
    /// keeps it, sends it no more on this connection, and sends it again on the next.
    /// Added in protocol 10 without a new version: an agent of before reads this as an
    /// acknowledgement and drops the result, as it did; an edge of before never says it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_taken: bool,
}

impl AgentMessage {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("agent messages serialise")
    }

    /// A heartbeat, MACed with the connection's agent→edge key.
    pub fn heartbeat(beat: &Beat, key: &MacKey) -> AgentMessage {
        AgentMessage::Heartbeat { envelope: Tagged::seal(Domain::Heartbeat, beat, key) }
    }

    /// A refusal of the job order `order_nonce`, MACed with the connection's agent→edge key.
    pub fn rejected(job_id: &str, order_nonce: &str, reason: &str, retry: bool, key: &MacKey) -> AgentMessage {
        let rejection = Rejection { job_id: job_id.to_string(), order_nonce: order_nonce.to_string(), reason: reason.to_string(), retry };
        AgentMessage::Rejected { envelope: Tagged::seal(Domain::Rejection, &rejection, key) }
    }

    /// The job `order_nonce` ordered started (its started record is durable), MACed with
    /// the connection's agent→edge key.
    pub fn started(job_id: &str, order_nonce: &str, key: &MacKey) -> AgentMessage {
        let report = StartReport { job_id: job_id.to_string(), order_nonce: order_nonce.to_string() };
        AgentMessage::Started { envelope: Tagged::seal(Domain::Started, &report, key) }
    }

    /// A batch of progress events of the job `order_nonce` ordered, MACed with the
    /// connection's agent→edge key.
    pub fn progress(job_id: &str, order_nonce: &str, events: Vec<ProgressEvent>, key: &MacKey) -> AgentMessage {
        let report = ProgressReport { job_id: job_id.to_string(), order_nonce: order_nonce.to_string(), events };
        AgentMessage::Event { envelope: Tagged::seal(Domain::Progress, &report, key) }
    }

    /// A report on the relayed login the order `report.order_nonce` asked for, MACed with
    /// the connection's agent→edge key.
    pub fn login(report: &LoginReport, key: &MacKey) -> AgentMessage {
        AgentMessage::LoginProgress { envelope: Tagged::seal(Domain::LoginReport, report, key) }
    }

    /// The result of the job `order_nonce` ordered, MACed with the connection's
    /// agent→edge key.
    pub fn result(job_id: &str, order_nonce: &str, result: JobResult, key: &MacKey) -> AgentMessage {
        let report = ResultReport { job_id: job_id.to_string(), order_nonce: order_nonce.to_string(), result };
        AgentMessage::result_text(serde_json::to_string(&report).expect("results serialise"), key)
    }

    /// A result kept as its payload's text (the spool keeps it so: each connection MACs it
    /// with its own key).
    pub fn result_text(payload: String, key: &MacKey) -> AgentMessage {
        AgentMessage::Result { envelope: Tagged::seal_text(Domain::Result, payload, key) }
    }
}

/// Decodes a frame, refusing oversized ones before parsing them.
pub fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    if text.len() > MAX_FRAME_BYTES {
        return Err(format!("frame of {} bytes is over the {MAX_FRAME_BYTES}-byte limit", text.len()));
    }
    serde_json::from_str(text).map_err(|e| format!("unreadable frame: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edge of before `lost_after_ms` welcomes without it: the agent reads no bound
    /// (its backoff uncapped, as then), and a newer edge's bound reads back as sent.
    #[test]
    fn a_welcome_without_lost_after_ms_reads_as_no_bound() {
        let old = r#"{"protocol":1,"agent_id":"spark","pool":"default","agent_nonce":"n","ephemeral":"e","session_id":"s","heartbeat_interval_ms":15000,"issued_at":1}"#;
        let welcome: Welcome = serde_json::from_str(old).unwrap();
        assert_eq!(welcome.lost_after_ms, None);
        let new = Welcome { lost_after_ms: Some(10_000), ..welcome };
        let back: Welcome = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back.lost_after_ms, Some(10_000));
    }

    fn job_order(challenge: &str, order_no: u64) -> JobOrder {
        let header = OrderHeader::new("j1", crate::envelope::Audience { agent_id: "spark", pool: "default" }, 1_000, "j1:1".into());
        let spec: JobSpec = serde_json::from_str(r#"{"prompt":"x","timeout_ms":1000}"#).unwrap();
        JobOrder { header, challenge: challenge.into(), order_no, caller: "default".into(), caller_proven: Some(false), spec }
    }

    /// A spool of results never acknowledged can hold any number: the hello naming them
    /// went over what the edge reads of a hello, it refused it, and the agent never
    /// connected again.
    #[test]
    fn a_hello_from_a_full_spool_fits_what_the_edge_reads_of_one() {
        let held = (0..100_000).map(|n| format!("{n:0>128}"));
        let (finished, more_finished) = Hello::name_finished(held);
        assert!(more_finished && finished.len() == MAX_HELLO_FINISHED, "{}", finished.len());
        assert_eq!(finished[0], format!("{:0>128}", 0), "the first sent are named");
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: "spark".into(),
            agent_version: "t".into(),
            challenge: "c".into(),
            agent_nonce: "n".into(),
            ephemeral: "e".into(),
            issued_at: 1,
            capacity: 64,
            running: (0..64).map(|n| format!("{n:0>128}")).collect(),
            finished,
            more_finished,
            oauth: OAuthReport::unconfigured(1),
            claude_version: None,
            labels: Default::default(),
            mirrors: Vec::new(),
            instance: Some(crate::ids::hex(&[0xff; crate::ids::INSTANCE_ID_BYTES])),
        };
        let envelope = Envelope::seal(Domain::Hello, &hello, &SigningKey::from_bytes(&[7; 32]));
        let text = AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: "spark".into(), envelope }.to_text();
        // With the mirror names and labels at their most too: agent/src/repo/mirror.rs.
        assert!(text.len() <= MAX_HELLO_BYTES, "a hello of {} bytes", text.len());
        // A spool that fits is named whole.
        assert_eq!(Hello::name_finished(["a".to_string(), "b".to_string()]), (vec!["a".to_string(), "b".to_string()], false));
    }

    #[test]
    fn a_job_order_is_taken_on_its_own_connection_once_and_in_order() {
        // A new connection's first order is 1.
        assert_eq!(job_order("c2", 1).bind("c2", 0), Ok(()));
        // A gap (an order held back on the path) is taken: the held one is refused later.
        assert_eq!(job_order("c2", 3).bind("c2", 1), Ok(()));
        assert_eq!(job_order("c2", 2).bind("c2", 3), Err(Refusal::OutOfOrder { order_no: 2, highest: 3 }));
        // The same number again (a replay of the frame).
        assert_eq!(job_order("c2", 3).bind("c2", 3), Err(Refusal::OutOfOrder { order_no: 3, highest: 3 }));
        // An order 0 is never the edge's (it numbers from 1).
        assert_eq!(job_order("c2", 0).bind("c2", 0), Err(Refusal::OutOfOrder { order_no: 0, highest: 0 }));
        // An earlier connection's, whatever its number.
        assert_eq!(job_order("c1", 9).bind("c2", 0), Err(Refusal::OtherConnection));
        assert_eq!(job_order("", 1).bind("c2", 0), Err(Refusal::OtherConnection));
    }

    #[test]
    fn a_job_order_carries_its_connection_inside_the_signature() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let envelope = Envelope::seal(Domain::Job, &job_order("c1", 4), &key);
        let opened: JobOrder = envelope.open(Domain::Job, &key.verifying_key()).unwrap();
        assert_eq!((opened.challenge.as_str(), opened.order_no), ("c1", 4));
        // Moved to another connection or renumbered on the path: the signature breaks.
        for (from, to) in [(r#""challenge":"c1""#, r#""challenge":"c2""#), (r#""order_no":4"#, r#""order_no":5"#)] {
            assert!(envelope.payload.contains(from), "{}", envelope.payload);
            let moved = Envelope { payload: envelope.payload.replace(from, to), sig: envelope.sig.clone() };
            assert!(moved.open::<JobOrder>(Domain::Job, &key.verifying_key()).is_err());
        }
        // An order without them (a version-6 edge's) does not decode.
        let old = serde_json::json!({"job_id":"j1","agent_id":"spark","pool":"default","issued_at":1,"expires_at":2,"nonce":"n","spec":{"prompt":"x","timeout_ms":1000}});
        assert!(serde_json::from_value::<JobOrder>(old).is_err());
    }

    #[test]
    fn a_job_order_carries_its_caller_inside_the_signature() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let order = JobOrder { caller: "a".into(), ..job_order("c1", 1) };
        let envelope = Envelope::seal(Domain::Job, &order, &key);
        assert_eq!(envelope.open::<JobOrder>(Domain::Job, &key.verifying_key()).unwrap().caller, "a");
        // Changed on the path to another caller (to resume that caller's sessions): the
        // signature breaks.
        let moved = Envelope { payload: envelope.payload.replace(r#""caller":"a""#, r#""caller":"b""#), sig: envelope.sig.clone() };
        assert_ne!(moved.payload, envelope.payload);
        assert!(moved.open::<JobOrder>(Domain::Job, &key.verifying_key()).is_err());
        // A version-9 edge's order names no caller: it does not decode (the versions
        // refuse each other at the handshake anyway).
        let mut old = serde_json::to_value(&order).unwrap();
        old.as_object_mut().unwrap().remove("caller");
        assert!(serde_json::from_value::<JobOrder>(old).is_err());
    }

    /// Whether the caller is proven weighs the agent's session cut: a holder of the pool's
    /// secret on the path turning its made-up names into proven ones (each then an owner
    /// by itself) breaks the signature; an order of an edge that does not send it does not
    /// say (`None`), which is not unproven.
    #[test]
    fn a_job_order_carries_whether_its_caller_is_proven_inside_the_signature() {
        let key = SigningKey::from_bytes(&[7; 32]);
        for proven in [true, false] {
            let order = JobOrder { caller: "a".into(), caller_proven: Some(proven), ..job_order("c1", 1) };
            let envelope = Envelope::seal(Domain::Job, &order, &key);
            assert_eq!(envelope.open::<JobOrder>(Domain::Job, &key.verifying_key()).unwrap().caller_proven, Some(proven));
            let (from, to) = (format!(r#""caller_proven":{proven}"#), format!(r#""caller_proven":{}"#, !proven));
            assert!(envelope.payload.contains(&from), "{}", envelope.payload);
            let flipped = Envelope { payload: envelope.payload.replace(&from, &to), sig: envelope.sig.clone() };
            assert!(flipped.open::<JobOrder>(Domain::Job, &key.verifying_key()).is_err(), "flipped to {}", !proven);
            let dropped = Envelope { payload: envelope.payload.replace(&format!(",{from}"), ""), sig: envelope.sig.clone() };
            assert_ne!(dropped.payload, envelope.payload);
            assert!(dropped.open::<JobOrder>(Domain::Job, &key.verifying_key()).is_err(), "left out");
        }
        // An edge of before the field, signing its own order: it decodes, saying nothing.
        let mut old = serde_json::to_value(JobOrder { caller: "a".into(), caller_proven: Some(true), ..job_order("c1", 1) }).unwrap();
        old.as_object_mut().unwrap().remove("caller_proven");
        let envelope = Envelope::seal(Domain::Job, &old, &key);
        let opened: JobOrder = envelope.open(Domain::Job, &key.verifying_key()).unwrap();
        assert_eq!((opened.caller.as_str(), opened.caller_proven), ("a", None));
    }

    /// A heartbeat ack names its beat inside the edge's MAC on the connection: one made
    /// up on the path (plain, as before protocol 11, or MACed with any other key — the
    /// agent's own direction's, another connection's) does not open, nor does one whose
    /// beat was changed.
    #[test]
    fn a_heartbeat_ack_is_macd_by_the_edge_on_its_connection() {
        let (edge, other) = (MacKey::from_bytes([4; 32]), MacKey::from_bytes([5; 32]));
        let m = EdgeMessage::heartbeat_ack(3, 5, &edge);
        let EdgeMessage::HeartbeatAck { envelope } = decode::<EdgeMessage>(&m.to_text()).unwrap() else { panic!("{m:?}") };
        assert_eq!(envelope.open::<BeatAck>(Domain::HeartbeatAck, &edge), Ok(BeatAck { beat: 3, server_time: 5 }));
        assert!(envelope.open::<BeatAck>(Domain::HeartbeatAck, &other).is_err());
        assert!(envelope.open::<Acknowledgement>(Domain::ResultAck, &edge).is_err(), "not a result's ack");
        let changed = Tagged { payload: envelope.payload.replace(r#""beat":3"#, r#""beat":4"#), mac: envelope.mac.clone() };
        assert_ne!(changed.payload, envelope.payload);
        assert!(changed.open::<BeatAck>(Domain::HeartbeatAck, &edge).is_err());
        assert!(decode::<EdgeMessage>(r#"{"type":"heartbeat_ack","server_time":5,"beat":3}"#).is_err(), "a plain ack is not one");
    }

    #[test]
    fn unknown_kinds_decode_as_unknown() {
        let m: AgentMessage = decode(r#"{"type":"telemetry_v9","x":1}"#).unwrap();
        assert_eq!(m, AgentMessage::Unknown);
        let m: EdgeMessage = decode(r#"{"type":"shiny"}"#).unwrap();
        assert_eq!(m, EdgeMessage::Unknown);
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for text in ["", "{", "null", r#"{"type":"credit","slots":-1}"#, r#"{"type":"credit","slots":{"free":-1,"received":0}}"#, r#"{"type":"credit"}"#] {
            assert!(decode::<AgentMessage>(text).is_err(), "{text}");
        }
        let huge = format!(r#"{{"type":"credit","slots":{{"free":1,"received":0}},"pad":"{}"}}"#, "x".repeat(MAX_FRAME_BYTES));
        assert!(decode::<AgentMessage>(&huge).unwrap_err().contains("limit"));
    }

    /// Cancels and login orders are bound to their connection as job orders are (rev21,
    /// 4), additively: one of an edge of before names no connection and is taken as before.
    #[test]
    fn cancels_and_logins_are_taken_on_their_own_connection_only() {
        let header = OrderHeader { job_id: "j".into(), agent_id: "spark".into(), pool: "default".into(), issued_at: 1, expires_at: 2, nonce: "n".into() };
        let cancel = |challenge: Option<&str>| CancelOrder { header: header.clone(), challenge: challenge.map(String::from), reason: "stop".into() };
        let login = |challenge: Option<&str>| LoginOrder { header: header.clone(), challenge: challenge.map(String::from), action: LoginAction::Start };
        assert_eq!((cancel(Some("c2")).bind("c2"), login(Some("c2")).bind("c2")), (Ok(()), Ok(())));
        assert_eq!((cancel(Some("c1")).bind("c2"), login(Some("c1")).bind("c2")), (Err(Refusal::OtherConnection), Err(Refusal::OtherConnection)));
        assert_eq!((cancel(Some("")).bind("c2"), login(Some("")).bind("c2")), (Err(Refusal::OtherConnection), Err(Refusal::OtherConnection)));
        // An edge of before: no field, taken as before.
        let before = r#"{"job_id":"j","agent_id":"spark","pool":"default","issued_at":1,"expires_at":2,"nonce":"n","reason":"stop"}"#;
        let read: CancelOrder = serde_json::from_str(before).unwrap();
        assert_eq!((read.challenge.as_deref(), read.bind("c2")), (None, Ok(())));
        let before = serde_json::to_string(&login(None)).unwrap();
        assert!(!before.contains("challenge"), "{before}");
        let read: LoginOrder = serde_json::from_str(&before).unwrap();
        assert_eq!(read.bind("c2"), Ok(()));
    }

    /// The "not taken" answer is additive: a taking acknowledgement is the frame it was
    /// (an edge of before sends the same, an agent of before reads it), and one of an edge
    /// of before, without the field, reads as taken.
    #[test]
    fn a_not_taken_answer_is_additive_to_the_acknowledgement() {
        let key = MacKey::from_bytes([1; 32]);
        let EdgeMessage::ResultAck { envelope } = EdgeMessage::result_ack("j", "spark", &key) else { unreachable!() };
        assert_eq!(envelope.payload, r#"{"job_id":"j","agent_id":"spark"}"#);
        let EdgeMessage::ResultAck { envelope } = EdgeMessage::result_not_taken("j", "spark", &key) else { unreachable!() };
        let ack: Acknowledgement = envelope.open(Domain::ResultAck, &key).unwrap();
        assert!(ack.not_taken);
        #[derive(Deserialize)]
        struct Before {
            job_id: String,
            agent_id: String,
        }
        let before: Before = serde_json::from_str(&envelope.payload).expect("an agent of before reads it");
        assert_eq!((before.job_id.as_str(), before.agent_id.as_str()), ("j", "spark"));
        let old: Acknowledgement = serde_json::from_str(r#"{"job_id":"j","agent_id":"spark"}"#).unwrap();
        assert!(!old.not_taken);
    }

    #[test]
    fn round_trips() {
        let m = AgentMessage::Credit { slots: Slots { free: 2, received: 7 } };
        assert_eq!(decode::<AgentMessage>(&m.to_text()).unwrap(), m);
        let key = MacKey::from_bytes([1; 32]);
        let m = AgentMessage::result("j1", "j1:1", JobResult::default(), &key);
        let AgentMessage::Result { envelope } = decode::<AgentMessage>(&m.to_text()).unwrap() else { panic!("a result") };
        let report: ResultReport = envelope.open(Domain::Result, &key).unwrap();
        assert_eq!((report.job_id.as_str(), report.order_nonce.as_str()), ("j1", "j1:1"));
        assert!(envelope.open::<ResultReport>(Domain::Progress, &key).is_err(), "a result is not progress");
        assert!(envelope.open::<ResultReport>(Domain::Result, &MacKey::from_bytes([2; 32])).is_err(), "another key");
        let login = LoginReport { login_id: "l1".into(), order_nonce: "l1:start".into(), state: LoginState::AwaitingCode, url: None, error: None, oauth: None, url_proof: None };
        let AgentMessage::LoginProgress { envelope } = decode::<AgentMessage>(&AgentMessage::login(&login, &key).to_text()).unwrap() else { panic!("a login report") };
        assert_eq!(envelope.open::<LoginReport>(Domain::LoginReport, &key).unwrap(), login);
        assert!(envelope.open::<LoginReport>(Domain::Result, &key).is_err(), "a login report is not a result");
        let m = EdgeMessage::result_ack("j", "spark", &key);
        assert_eq!(decode::<EdgeMessage>(&m.to_text()).unwrap(), m);
        let EdgeMessage::ResultAck { envelope } = m else { unreachable!() };
        assert!(envelope.open::<Acknowledgement>(Domain::Result, &key).is_err(), "an acknowledgement is not a result");
        // A result kept as text and MACed again is the same frame.
        let AgentMessage::Result { envelope } = AgentMessage::result("j1", "j1:1", JobResult::default(), &key) else { unreachable!() };
        assert_eq!(AgentMessage::result_text(envelope.payload.clone(), &key), AgentMessage::Result { envelope });
    }

    /// One frame of every kind each side sends (a kind added to an enum must be added
    /// here: the `match` below does not compile without it).
    fn every_kind() -> (Vec<AgentMessage>, Vec<EdgeMessage>) {
        let key = MacKey::from_bytes([1; 32]);
        let envelope = Envelope { payload: r#"{"a":"\"quoted\""}"#.into(), sig: "c2ln".into() };
        let tagged = Tagged::seal_text(Domain::Result, r#"{"job_id":"j\u00e9"}"#.into(), &key);
        let agent = vec![
            AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: "spark".into(), envelope: envelope.clone() },
            AgentMessage::Probe { protocol: 3, agent_id: "doctor".into(), envelope: envelope.clone() },
            AgentMessage::Heartbeat { envelope: tagged.clone() },
            AgentMessage::Credit { slots: Slots { free: 2, received: 7 } },
            AgentMessage::Mirrors { names: vec!["github.com/a/b".into(), "c".into()] },
            AgentMessage::Accepted { job_id: "j1".into() },
            AgentMessage::Started { envelope: tagged.clone() },
            AgentMessage::Rejected { envelope: tagged.clone() },
            AgentMessage::OrderRefused { reason: "bad \"order\"\n".into() },
            AgentMessage::Event { envelope: tagged.clone() },
            AgentMessage::Result { envelope: tagged.clone() },
            AgentMessage::LoginProgress { envelope: tagged.clone() },
            AgentMessage::Unknown,
        ];
        let edge = vec![
            EdgeMessage::Challenge { protocol: 11, nonce: "n".into(), edge_version: "1".into(), server_time: 5, proof: Some("p".into()) },
            EdgeMessage::Challenge { protocol: 11, nonce: "n".into(), edge_version: "1".into(), server_time: 5, proof: None },
            EdgeMessage::Welcome { envelope: envelope.clone() },
            EdgeMessage::Job { envelope: envelope.clone() },
            EdgeMessage::Cancel { envelope: envelope.clone() },
            EdgeMessage::Login { envelope },
            EdgeMessage::ResultAck { envelope: tagged.clone() },
            EdgeMessage::HeartbeatAck { envelope: tagged },
            EdgeMessage::Goodbye { code: 4002, reason: "why".into() },
            EdgeMessage::Unknown,
        ];
        for m in &agent {
            match m {
                AgentMessage::Hello { .. } | AgentMessage::Probe { .. } | AgentMessage::Heartbeat { .. } | AgentMessage::Credit { .. } => {}
                AgentMessage::Mirrors { .. } | AgentMessage::Accepted { .. } | AgentMessage::Started { .. } | AgentMessage::Rejected { .. } => {}
                AgentMessage::OrderRefused { .. } | AgentMessage::Event { .. } | AgentMessage::Result { .. } => {}
                AgentMessage::LoginProgress { .. } | AgentMessage::Unknown => {}
            }
        }
        for m in &edge {
            match m {
                EdgeMessage::Challenge { .. } | EdgeMessage::Welcome { .. } | EdgeMessage::Job { .. } | EdgeMessage::Cancel { .. } => {}
                EdgeMessage::Login { .. } | EdgeMessage::ResultAck { .. } | EdgeMessage::HeartbeatAck { .. } => {}
                EdgeMessage::Goodbye { .. } | EdgeMessage::Unknown => {}
            }
        }
        (agent, edge)
    }

    /// What either side writes, the other reads back as it was, every kind of frame
    /// (`crate::frame` reads each kind's fields by its own list of them).
    #[test]
    fn every_kind_of_frame_reads_back_as_it_was_written() {
        let (agent, edge) = every_kind();
        for m in agent {
            let text = m.to_text();
            assert!(text.starts_with(r#"{"type":""#), "{text}");
            assert_eq!(decode::<AgentMessage>(&text), Ok(m), "{text}");
        }
        for m in edge {
            let text = m.to_text();
            assert!(text.starts_with(r#"{"type":""#), "{text}");
            assert_eq!(decode::<EdgeMessage>(&text), Ok(m), "{text}");
        }
    }

    /// A frame reads the same whatever the order of its fields, or as a list, as serde's
    /// reading of an internally tagged enum took it: only what an agent and an edge write
    /// (`type` first) is read without buffering its fields.
    #[test]
    fn a_frame_reads_alike_whatever_the_order_of_its_fields() {
        let credit = AgentMessage::Credit { slots: Slots { free: 1, received: 3 } };
        for text in [
            r#"{"type":"credit","slots":{"free":1,"received":3}}"#,
            r#" { "slots" : {"received":3,"free":1} , "type" : "credit" } "#,
            r#"{"pad":[1,{"x":null}],"type":"credit","slots":{"free":1,"received":3},"more":"x"}"#,
            r#"{"t\u0079pe":"cr\u0065dit","slots":{"free":1,"received":3}}"#,
            r#"["credit",{"free":1,"received":3}]"#,
        ] {
            assert_eq!(decode::<AgentMessage>(text), Ok(credit.clone()), "{text}");
        }
        let goodbye = EdgeMessage::Goodbye { code: 4002, reason: "r".into() };
        assert_eq!(decode::<EdgeMessage>(r#"{"reason":"r","code":4002,"type":"goodbye"}"#), Ok(goodbye));
        for text in [r#"{"x":{"y":[1,2]},"type":"telemetry_v9"}"#, r#"{"type":"telemetry_v9","x":{"y":[1,2]}}"#, r#"["shiny"]"#] {
            assert_eq!(decode::<AgentMessage>(text), Ok(AgentMessage::Unknown), "{text}");
        }
        // What no kind reads is passed over, its JSON checked but not decoded (serde's
        // buffering refused these: a number past f64's range, a lone surrogate, a value
        // nested past 128 levels).
        let credit_with = |junk: &str| format!(r#"{{"type":"credit","slots":{{"free":1,"received":3,"x":{junk}}},"y":{junk}}}"#);
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for junk in ["1e999", r#""\ud800""#, &deep] {
            assert_eq!(decode::<AgentMessage>(&credit_with(junk)), Ok(credit.clone()), "{junk}");
            assert_eq!(decode::<AgentMessage>(&format!(r#"{{"y":{junk},"type":"credit","slots":{{"free":1,"received":3}}}}"#)), Ok(credit.clone()), "{junk}");
        }
        assert!(decode::<AgentMessage>(r#"{"type":"credit","slots":{"free":1e999,"received":3}}"#).is_err(), "a value read is decoded");
    }

    /// What serde refused of a frame is refused still, in its words: a `type` missing or
    /// given twice (first or not), a field missing, repeated or of the wrong kind, a
    /// `type` that is no name. (Where in the frame is now said too, for what the fields'
    /// own reading finds.)
    #[test]
    fn a_hostile_frame_is_refused_in_serdes_words() {
        for (text, words) in [
            (r#"{}"#, "missing field `type`"),
            (r#"{"slots":{"free":1,"received":3}}"#, "missing field `type`"),
            (r#"{"type":"credit","slots":{"free":1,"received":3},"type":"credit"}"#, "duplicate field `type`"),
            (r#"{"slots":{"free":1,"received":3},"type":"credit","type":"mirrors"}"#, "duplicate field `type`"),
            (r#"{"type":"credit"}"#, "missing field `slots`"),
            (r#"{"received":3,"type":"credit"}"#, "missing field `slots`"),
            (r#"{"type":"credit","slots":{"free":1,"received":3},"slots":{"free":1,"received":3}}"#, "duplicate field `slots`"),
            (r#"{"slots":{"free":1,"received":3},"slots":{"free":1,"received":3},"type":"credit"}"#, "duplicate field `slots`"),
            (r#"{"type":"credit","slots":{"free":-1,"received":0}}"#, "invalid value: integer `-1`"),
            (r#"{"slots":{"free":-1,"received":0},"type":"credit"}"#, "invalid value: integer `-1`"),
            (r#"{"type":"accepted","job_id":7}"#, "invalid type: integer `7`, expected a string"),
            (r#"{"type":["credit"],"slots":{"free":1,"received":3}}"#, "invalid type: sequence"),
            (r#"[]"#, "missing field `type`"),
            (r#"["shiny",1,2]"#, "invalid length 2, expected 0 elements in sequence"),
            (r#"["credit",{"free":1,"received":3},5]"#, "invalid length 2, expected 1 element in sequence"),
            (r#"{"envelope":{"payload":"p","mac":"m","payload":"q"},"type":"event"}"#, "duplicate field `payload`"),
            (r#"{"envelope":{"payload":"p"},"type":"event"}"#, "missing field `mac`"),
            (r#""credit""#, "invalid type: string \"credit\", expected internally tagged enum AgentMessage"),
            (r#"{"type":"credit","slots":{"free":1,"received":3}"#, "EOF while parsing an object"),
        ] {
            let err = decode::<AgentMessage>(text).expect_err(text);
            assert!(err.starts_with("unreadable frame: ") && err.contains(words), "{text}: {err}");
        }
    }

    /// A relayed login's sign-in URL is shown only under its agent's own signature: one
    /// by another key (an edge's made-up claim), for another login or agent, or over
    /// another URL (an edge's own `claude auth login`'s page) does not hold (rev21-2).
    #[test]
    fn a_login_url_holds_only_under_its_agents_key() {
        let agent = SigningKey::from_bytes(&[7; 32]);
        let url = "https://claude.ai/oauth/authorize?code=true&state=agents";
        let proof = LoginUrlClaim::sign(&agent, "l1", "spark", url, 1_796_000_000_000);
        assert!(proof.len() <= MAX_LOGIN_URL_PROOF, "{proof}");
        let key = agent.verifying_key();
        assert_eq!(LoginUrlClaim::check(&proof, &key, "l1", "spark", url), Ok(1_796_000_000_000));
        let by_another = LoginUrlClaim::sign(&SigningKey::from_bytes(&[8; 32]), "l1", "spark", url, 1);
        assert!(LoginUrlClaim::check(&by_another, &key, "l1", "spark", url).unwrap_err().contains("does not hold"));
        let attackers = "https://claude.ai/oauth/authorize?code=true&state=attackers";
        assert!(LoginUrlClaim::check(&proof, &key, "l1", "spark", attackers).unwrap_err().contains("does not hold"));
        assert!(LoginUrlClaim::check(&proof, &key, "l2", "spark", url).is_err(), "another login");
        assert!(LoginUrlClaim::check(&proof, &key, "l1", "rig", url).is_err(), "another agent");
        let (at, sig) = proof.split_once('.').unwrap();
        assert!(LoginUrlClaim::check(&format!("{}.{sig}", at.parse::<u64>().unwrap() + 1), &key, "l1", "spark", url).is_err(), "another time");
        for garbage in ["", ".", "1.", ".abc", "x.abc", &"9".repeat(200), &format!("1.{}", "A".repeat(86))] {
            assert!(LoginUrlClaim::check(garbage, &key, "l1", "spark", url).is_err(), "{garbage}");
        }
        assert!(LoginUrlClaim::well_formed(&proof));
        for bad in ["", "1.", &format!("1.{}", "A".repeat(85)), &format!("1.{}é", "A".repeat(85)), &format!("1x.{}", "A".repeat(86)), &format!("{}.{}", "1".repeat(21), "A".repeat(86))] {
            assert!(!LoginUrlClaim::well_formed(bad), "{bad}");
        }
    }

    fn batch(seqs: &[u64]) -> ProgressReport {
        let events = seqs.iter().map(|&seq| ProgressEvent { seq, event: serde_json::json!({"n": seq}) }).collect();
        ProgressReport { job_id: "j1".into(), order_nonce: "j1:1".into(), events }
    }

    #[test]
    fn a_progress_batch_is_numbered_up_and_bounded() {
        assert_eq!(batch(&[1]).check(), Ok(()));
        assert_eq!(batch(&[4, 5, 9]).check(), Ok(()), "gaps: events summarised or lost offline");
        assert_eq!(batch(&[]).check(), Err(BatchFault::Empty));
        assert_eq!(batch(&[2, 1]).check(), Err(BatchFault::OutOfOrder { seq: 1, after: 2 }));
        assert_eq!(batch(&[1, 2, 2]).check(), Err(BatchFault::OutOfOrder { seq: 2, after: 2 }));
        assert_eq!(batch(&[0]).check(), Err(BatchFault::OutOfOrder { seq: 0, after: 0 }));
        let most: Vec<u64> = (1..=MAX_PROGRESS_EVENTS as u64).collect();
        assert_eq!(batch(&most).check(), Ok(()));
        let over: Vec<u64> = (1..=MAX_PROGRESS_EVENTS as u64 + 1).collect();
        assert_eq!(batch(&over).check(), Err(BatchFault::TooMany(MAX_PROGRESS_EVENTS + 1)));
    }

    /// An event nesting deeper than [`MAX_EVENT_DEPTH`] makes its batch one the agent never
    /// sends, read raw as the edge reads it: the edge no longer read events into values
    /// (serde_json's 128 levels), and passed on a hostile agent's 100,000 levels to every
    /// follower, whose parser gave up on them.
    #[test]
    fn a_progress_batch_with_an_event_past_the_depth_is_refused_raw() {
        let nested = |depth: usize| format!(r#"{{"type":"user","x":{}1{}}}"#, "[".repeat(depth - 1), "]".repeat(depth - 1));
        let raw = |events: &[(u64, String)]| {
            let events: Vec<String> = events.iter().map(|(seq, e)| format!(r#"{{"seq":{seq},"event":{e}}}"#)).collect();
            serde_json::from_str::<RawProgressReport>(&format!(r#"{{"job_id":"j1","order_nonce":"j1:1","events":[{}]}}"#, events.join(","))).expect("read raw, as the edge does")
        };
        assert_eq!(raw(&[(1, nested(MAX_EVENT_DEPTH))]).check(), Ok(()));
        assert_eq!(raw(&[(1, "{}".into()), (2, nested(MAX_EVENT_DEPTH + 1))]).check(), Err(BatchFault::TooDeep { seq: 2 }));
        assert_eq!(raw(&[(1, nested(100_000))]).check(), Err(BatchFault::TooDeep { seq: 1 }), "read raw whatever its depth");
        // Brackets inside strings are text, escaped quotes and backslashes included.
        let quoted = format!(r#"{{"a":"{}\"{}\\","b":[[1]]}}"#, "[{".repeat(200), "]".repeat(50));
        assert_eq!(raw(&[(1, quoted)]).check(), Ok(()));
        let deep = MAX_EVENT_DEPTH + 1;
        let keys = format!(r#"{{"[\"":{}0{}}}"#, r#"{"}]":"#.repeat(deep - 1), "}".repeat(deep - 1));
        assert_eq!(raw(&[(1, keys)]).check(), Err(BatchFault::TooDeep { seq: 1 }));
        // The agent's own events, as values: the same depth.
        assert_eq!(batch_of(serde_json::from_str(&nested(MAX_EVENT_DEPTH)).unwrap()).check(), Ok(()));
        assert_eq!(batch_of(serde_json::from_str(&nested(MAX_EVENT_DEPTH + 1)).unwrap()).check(), Err(BatchFault::TooDeep { seq: 1 }));
    }

    fn batch_of(event: serde_json::Value) -> ProgressReport {
        ProgressReport { job_id: "j1".into(), order_nonce: "j1:1".into(), events: vec![ProgressEvent { seq: 1, event }] }
    }

    /// Any JSON value: the scan of its text, compact or pretty, says what its tree says,
    /// at every depth asked.
    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        // Strings full of what the scan must not take for structure.
        let text = proptest::string::string_regex(r#"[\[\]{}"\\a ,:\n\u{e9}]{0,8}"#).unwrap().boxed();
        let leaf = prop_oneof![Just(serde_json::Value::Null), any::<bool>().prop_map(serde_json::Value::from), any::<i32>().prop_map(serde_json::Value::from), text.clone().prop_map(serde_json::Value::from)];
        leaf.prop_recursive(12, 64, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::vec((text.clone(), inner), 0..4).prop_map(|pairs| serde_json::Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]

        #[test]
        fn the_raw_depth_scan_agrees_with_the_value(value in json()) {
            for text in [serde_json::to_string(&value).unwrap(), serde_json::to_string_pretty(&value).unwrap()] {
                let raw: Box<serde_json::value::RawValue> = serde_json::from_str(&text).unwrap();
                for max in 0..14 {
                    proptest::prop_assert_eq!(raw.nests_deeper_than(max), value.nests_deeper_than(max), "at {}: {}", max, text);
                }
            }
        }
    }

    #[test]
    fn a_progress_batch_is_maced_once_for_all_its_events() {
        let key = MacKey::from_bytes([3; 32]);
        let report = batch(&[1, 2, 3]);
        let AgentMessage::Event { envelope } = decode(&AgentMessage::progress("j1", "j1:1", report.events.clone(), &key).to_text()).unwrap() else {
            panic!("progress")
        };
        assert_eq!(envelope.open::<ProgressReport>(Domain::Progress, &key).unwrap(), report);
        // An event moved, dropped or renumbered on the path breaks the MAC.
        for (from, to) in [(r#""seq":2"#, r#""seq":7"#), (r#""n":3"#, r#""n":4"#), (r#""order_nonce":"j1:1""#, r#""order_nonce":"j1:2""#)] {
            assert!(envelope.payload.contains(from), "{}", envelope.payload);
            let altered = Tagged { payload: envelope.payload.replace(from, to), mac: envelope.mac.clone() };
            assert!(altered.open::<ProgressReport>(Domain::Progress, &key).is_err(), "{to}");
        }
        // A version-7 single event does not read as a batch.
        let old = serde_json::json!({"job_id": "j1", "order_nonce": "j1:1", "seq": 1, "event": {"n": 1}});
        assert!(serde_json::from_value::<ProgressReport>(old).is_err());
    }

    #[test]
    fn refusals_and_heartbeats_are_maced_in_their_own_domains() {
        let key = MacKey::from_bytes([1; 32]);
        let AgentMessage::Rejected { envelope } = decode(&AgentMessage::rejected("j1", "j1:2", "no free slot", true, &key).to_text()).unwrap() else {
            panic!("a refusal")
        };
        let refusal: Rejection = envelope.open(Domain::Rejection, &key).unwrap();
        assert_eq!((refusal.job_id.as_str(), refusal.order_nonce.as_str(), refusal.retry), ("j1", "j1:2", true));
        assert!(envelope.open::<Rejection>(Domain::Result, &key).is_err(), "a refusal is not a result");
        let beat = Beat {
            challenge: "c".into(),
            seq: 7,
            running: vec!["j1".into()],
            capacity: 2,
            oauth: OAuthReport::unconfigured(0),
            slots: Slots { free: 1, received: 3 },
            claude_version: None,
            stopping: true,
            cannot_start: None,
            finished: vec!["j0".into()],
            more_finished: true,
        };
        let AgentMessage::Heartbeat { envelope } = decode(&AgentMessage::heartbeat(&beat, &key).to_text()).unwrap() else { panic!("a heartbeat") };
        assert_eq!(envelope.open::<Beat>(Domain::Heartbeat, &key).unwrap(), beat);
        for other in [Domain::Progress, Domain::Hello, Domain::Rejection] {
            assert!(envelope.open::<Beat>(other, &key).is_err(), "{other:?}");
        }
        // A version-5 heartbeat or refusal (plain fields, no envelope) does not read.
        for old in [
            r#"{"type":"heartbeat","running":[],"capacity":1,"oauth":{},"slots":{"free":1,"received":0}}"#,
            r#"{"type":"rejected","job_id":"j1","reason":"x","retry":true}"#,
        ] {
            assert!(decode::<AgentMessage>(old).is_err(), "{old}");
        }
    }
}

