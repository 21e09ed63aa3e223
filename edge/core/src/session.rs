//! One agent connection. It starts `Challenged` (the edge sent a nonce and waits for the
//! signed hello) and becomes `Ready` once the agent proved who it is. The record is
//! serialisable because the Durable Object keeps it in the WebSocket's attachment, which
//! survives hibernation when the object's memory does not.

use serde::{Deserialize, Serialize};
use shared::envelope::{Domain, Envelope, CLOCK_SKEW_MS};
use shared::keys::Keyring;
use shared::link::{Ephemeral, LinkKeys, Transcript};
use shared::oauth::OAuthReport;
use shared::protocol::{close, Hello, Slots, HANDSHAKE_TIMEOUT_MS, MAX_FRAME_BYTES, MAX_HELLO_BYTES, PROTOCOL_VERSION};
use shared::text::truncate;
use shared::Millis;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// Where the connection comes from, as [`source_of`] names it: unproven connections
    /// are bounded per source.
    #[serde(default)]
    pub source: String,
    /// Edge time ([`crate::clock::Now::at`]), like `last_seen`.
    pub connected_at: Millis,
    pub last_seen: Millis,
    pub phase: Phase,
    /// A frame of a proven agent's on its way (as the host saw its bytes arrive,
    /// [`crate::Edge::arriving`]): until it is whole the connection is not silent. Ends with
    /// the frame; never kept (a host that keeps records does not count bytes).
    #[serde(skip)]
    pub arriving: Option<Arriving>,
    /// When the last frame arrived that the host's socket read whole and the machine has
    /// not handled yet ([`crate::Edge::frame_waiting`]): until it is handled the
    /// connection is not silent from then on. Never kept.
    #[serde(skip)]
    pub waiting: Option<Millis>,
}

/// The bytes of one frame arriving: from `base` (the host's count when it began) at `since`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arriving {
    pub since: Millis,
    pub base: u64,
    /// Heard until: `since` plus the frame's bytes so far at
    /// [`shared::contract::MIN_UPLINK_BYTES_PER_SEC`], never past the last report.
    pub until: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// `ephemeral` is the edge's X25519 key for this connection: its public half goes in
    /// the welcome once the hello verified.
    Challenged { nonce: String, ephemeral: Ephemeral },
    Ready(Agent),
}

/// A proven agent on this connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub agent_id: String,
    pub version: String,
    pub capacity: u32,
    /// The agent's latest statement of its slots (see [`shared::protocol::Slots`]).
    pub slots: Slots,
    /// Job orders sent on this connection; the last one sent is number `sent`.
    pub sent: u64,
    /// This connection's challenge nonce: the agent's heartbeats are bound to it.
    #[serde(default)]
    pub challenge: String,
    /// The `LOST_AFTER_MS` this connection's welcome told the agent, which it starts jobs
    /// by: each job sent on or taken over by the connection keeps it
    /// ([`crate::record::Job::told_lost_after_ms`]). Absent (a record of an edge of
    /// before): the setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_ms: Option<u64>,
    /// This connection's MAC keys, agreed in the handshake ([`shared::link`]): the agent's
    /// reports are checked with one, the edge's result acknowledgements made with the other.
    /// Never defaulted: a record without them reads as no session.
    pub keys: LinkKeys,
    /// The number of the last heartbeat taken on this connection: an older or repeated
    /// one is refused (see [`shared::protocol::Beat`]).
    #[serde(default)]
    pub beat: u64,
    pub oauth: OAuthReport,
    #[serde(default)]
    pub claude_version: Option<String>,
    /// Its labels (`AGENT_LABELS`), from its signed hello.
    #[serde(default, skip_serializing_if = "shared::placement::Labels::is_empty")]
    pub labels: shared::placement::Labels,
    /// The repositories it holds a mirror of (a routing preference; a host short of room
    /// for the record may drop them until the agent's next report).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub mirrors: std::collections::BTreeSet<String>,
    /// An operator paused it (`POST /agents/{id}/pause`): no new jobs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The agent said it takes no new jobs (in its last heartbeat, [`shared::protocol::Beat::stopping`]):
    /// it is draining, or a `--one-job` agent has its job. For this connection only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// The agent said it cannot start jobs now, and why (in its last heartbeat,
    /// [`shared::protocol::Beat::cannot_start`]: its DATA_DIR's disk is full, its process
    /// limit reached): held back as a stopping agent is, until a heartbeat says it can
    /// again. For this connection only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cannot_start: Option<String>,
    /// Until when (edge time) the agent's usage window refuses work; cleared once passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_hold_until: Option<Millis>,
    /// The re-login relayed to this agent, while one is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<LoginRelay>,
    /// The agent instance (its `DATA_DIR`) on this connection, from its signed hello
    /// ([`shared::protocol::Hello::instance`]; `None` from an agent of before the field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// How many frames no agent sends came on this connection (reports not MACed on it,
    /// refusals that name no order): past [`shared::protocol::MAX_UNPROVEN_FRAMES`] they
    /// are counted, not logged. Not kept: after a Worker's hibernation a few more are logged.
    #[serde(skip)]
    pub unproven: u32,
}

/// The most of an agent's reason it cannot start jobs ([`Agent::cannot_start`]) a record
/// short of room keeps ([`Session::shorter_forms`]).
const MAX_CANNOT_START_KEPT: usize = 200;
/// An agent's reason it cannot start jobs as the shortest record keeps it.
const CANNOT_START_CUT: &str = "it cannot start jobs (see its log)";

/// An agent instance as told apart at the edge: `""` for an agent that names none (no
/// valid instance id is empty, [`shared::ids::valid_instance_id`]).
pub fn instance_key(instance: Option<&str>) -> &str {
    instance.unwrap_or("")
}

/// A `claude auth login` the edge relays to an agent: started by `POST /oauth/login`,
/// finished by `POST /oauth/login/code`. Kept in the session record (so the Worker keeps
/// it across evictions); its URL is never logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginRelay {
    pub id: String,
    /// The authorization URL, once the agent's `claude auth login` printed it (a host
    /// that cannot keep a record this long drops it: see `awaiting_code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The agent's signature over `url` ([`shared::protocol::LoginUrlClaim`]), passed on
    /// to whoever asks for the URL as it came; kept and cut with the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_proof: Option<String>,
    /// `claude auth login` printed its URL and waits for the code.
    #[serde(default)]
    pub awaiting_code: bool,
    /// A code was passed on and the outcome is awaited.
    #[serde(default)]
    pub code_sent: bool,
    /// Edge time the relay started.
    #[serde(default)]
    pub started_at: Millis,
    /// Edge time after which the edge gives it up (the agent kills the process by then).
    pub expires_at: Millis,
}

/// The two orders of a relayed login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginStep {
    Start,
    Code,
}

impl LoginRelay {
    /// The nonce of this login's order for `step`.
    pub fn nonce(login_id: &str, step: LoginStep) -> String {
        match step {
            LoginStep::Start => format!("{login_id}:start"),
            LoginStep::Code => format!("{login_id}:code"),
        }
    }

    /// Whether `nonce` is one of the orders the edge sent for this login: its start, and
    /// its code once sent.
    pub fn issued(&self, nonce: &str) -> bool {
        nonce == Self::nonce(&self.id, LoginStep::Start) || (self.code_sent && nonce == Self::nonce(&self.id, LoginStep::Code))
    }
}

impl Agent {
    /// Its instance as jobs and other connections are told apart by: `""` for an agent that
    /// names none, which is one instance of its own ([`shared::protocol::Hello::instance`]).
    pub fn instance_key(&self) -> &str {
        instance_key(self.instance.as_deref())
    }

    /// Takes a report from the agent at `now`: its login and usage window, and until when
    /// (edge time) the window holds work back.
    pub fn report(&mut self, oauth: OAuthReport, now: crate::Now) {
        self.usage_hold_until = oauth
            .usage
            .as_ref()
            .and_then(|u| u.blocked_until())
            .filter(|t| *t > now.wall)
            .map(|t| now.at.saturating_add(t - now.wall));
        self.oauth = oauth;
    }

    /// Whether jobs may be sent to this agent now (credits aside): no operator paused
    /// it, it is not stopping, its login works, its usage window is open and no relayed
    /// login is writing a new one ([`Agent::login_changing`]). Dispatch, `/health` (its
    /// status, `agents_taking_work`, each agent's `takes_work`) and `/execute`'s refusal
    /// all judge by this one predicate.
    pub fn takes_work(&self, now: crate::Now) -> bool {
        !self.held_back() && !self.needs_login(now) && !self.usage_held(now) && !self.login_changing()
    }

    /// Whether a relayed login may be changing this agent's login now: its code was passed
    /// on and the outcome is not in. With the code, `claude auth login` exchanges it and
    /// writes the new login into the folder every job's Claude reads (and refreshes) its
    /// login from: a job started meanwhile would start on the login being replaced. So
    /// work waits for the outcome, which the agent bounds (`relogin.rs`: `FINISH_WAIT`)
    /// and the edge too ([`crate::machine::LOGIN_WAIT_MS`] for the caller, the relay's
    /// `expires_at`). Before the code nothing on the runner changes, and a relay may wait
    /// ten minutes for a code nobody sends (an empty line or Ctrl-C given to
    /// `claude-runner login`, the page closed): that holds no work.
    pub fn login_changing(&self) -> bool {
        self.login.as_ref().is_some_and(|l| l.code_sent)
    }

    /// Kept from new work not by its login: an operator paused it, it is stopping, or it
    /// cannot start jobs (its disk, its process limit: it handed a job back unstarted).
    /// Work does not wait for such an agent, and its login says nothing of whether the
    /// others can work.
    pub fn held_back(&self) -> bool {
        self.paused || self.stopping || self.cannot_start.is_some()
    }

    pub fn needs_login(&self, now: crate::Now) -> bool {
        self.oauth.health(now.wall) == shared::oauth::LoginHealth::Broken
    }

    pub fn usage_held(&self, now: crate::Now) -> bool {
        self.usage_hold_until.is_some_and(|t| t > now.at)
    }
}

impl Agent {
    /// How many more jobs may be sent now: the free slots the agent stated (never more
    /// than its capacity), less the orders sent since that it had not received then.
    pub fn credits(&self) -> u32 {
        let in_flight = self.sent.saturating_sub(self.slots.received);
        let free = u64::from(self.slots.free.min(self.capacity));
        free.saturating_sub(in_flight) as u32
    }

    /// Takes a statement of the agent's slots. `received` cannot be more than was sent (a
    /// confused or hostile agent would otherwise make room it does not have).
    pub fn state(&mut self, slots: Slots) {
        self.slots = Slots { free: slots.free, received: slots.received.min(self.sent) };
    }
}

/// Why a connection is closed; the agent shows the reason to its operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: u16,
    pub reason: String,
}

impl Refused {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Refused { code, reason: reason.into() }
    }
}

impl Session {
    pub fn agent(&self) -> Option<&Agent> {
        match &self.phase {
            Phase::Ready(a) => Some(a),
            Phase::Challenged { .. } => None,
        }
    }

    pub fn agent_mut(&mut self) -> Option<&mut Agent> {
        match &mut self.phase {
            Phase::Ready(a) => Some(a),
            Phase::Challenged { .. } => None,
        }
    }

    pub fn agent_id(&self) -> Option<&str> {
        self.agent().map(|a| a.agent_id.as_str())
    }

    /// This record as a host that keeps at most so many bytes of it (the Worker's socket
    /// attachment) may keep it, in the host's form: `keep` gives a record's form (its
    /// encoding) if the host can keep it, `None` if it is too large — the one check of the
    /// size, each form encoded once. Whole if it is kept, else the first of its shorter
    /// forms ([`Session::shorter_forms`]) that is with as many of its mirror names as fit
    /// beside the rest — the first by name (the edge keeps them as a set, and the agent
    /// reports them in no order of use). `None` if not even the shortest is kept.
    ///
    /// The names are cut, not dropped: the agent tells them again only when its set
    /// changes, so what a record rebuilt after the host's eviction lacks stays lacking
    /// (repository affinity is a preference, not a promise). `keep` must keep a record
    /// whenever it keeps one with more names.
    pub fn fitted<T>(&self, keep: impl Fn(&Session) -> Option<T>) -> Option<T> {
        if let Some(kept) = keep(self) {
            return Some(kept);
        }
        self.shorter_forms().into_iter().find_map(|form| form.with_mirrors_that_fit(&keep))
    }

    /// This record with the most of its first mirror names (by name) that `keep` keeps,
    /// as kept; `None` if it is not kept even with none.
    fn with_mirrors_that_fit<T>(mut self, keep: &impl Fn(&Session) -> Option<T>) -> Option<T> {
        let names: Vec<String> = self.agent().map(|a| a.mirrors.iter().cloned().collect()).unwrap_or_default();
        let first = |session: &mut Session, n: usize| {
            if let Some(agent) = session.agent_mut() {
                agent.mirrors = names[..n].iter().cloned().collect();
            }
        };
        // The most that fit, by halving: a few serialisations of a 2 KB record. Each kept
        // one has more names than the one before, so the last is the most.
        let (mut fitting, mut over) = (None, names.len() + 1);
        let mut low = 0;
        while low < over {
            let n = low + (over - low) / 2;
            first(&mut self, n);
            match keep(&self) {
                Some(kept) => {
                    fitting = Some(kept);
                    low = n + 1;
                }
                None => over = n,
            }
        }
        fitting
    }

    /// Shorter forms of this record, each shorter than the one before (with all its
    /// mirror names: [`Session::fitted`] cuts them to fit each): first the agent's free
    /// text is cut (version, subscription, login problem, why it cannot start jobs); then a
    /// relayed login loses its URL too (the relay goes on: the code can still be sent;
    /// asking for the login again starts a new one); last the CLI's version, and why it
    /// cannot start jobs becomes a fixed sentence (a character outside Latin-1 doubles the
    /// cost of the whole attachment, and the most labels an agent may offer then no longer
    /// fit; every heartbeat brings them back). What the machine decides with — phase,
    /// credits, labels, pause, whether it can start jobs, jobs, the relay's state, the
    /// agent's instance — stays whole in each.
    pub fn shorter_forms(&self) -> Vec<Session> {
        let mut cut = self.clone();
        if let Some(agent) = cut.agent_mut() {
            agent.version = truncate(&agent.version, 64).to_string();
            agent.oauth.subscription_type = agent.oauth.subscription_type.as_deref().map(|s| truncate(s, 64).to_string());
            agent.oauth.problem = agent.oauth.problem.as_deref().map(|s| truncate(s, shared::oauth::MAX_PROBLEM_BYTES).to_string());
            agent.cannot_start = agent.cannot_start.as_deref().map(|s| truncate(s, MAX_CANNOT_START_KEPT).to_string());
        }
        let mut without_url = cut.clone();
        if let Some(login) = without_url.agent_mut().and_then(|a| a.login.as_mut()) {
            login.url = None;
            login.url_proof = None;
        }
        let mut without_version = without_url.clone();
        if let Some(agent) = without_version.agent_mut() {
            agent.claude_version = None;
            // Its words may name a path outside Latin-1; that it cannot start jobs stays.
            if agent.cannot_start.is_some() {
                agent.cannot_start = Some(CANNOT_START_CUT.into());
            }
        }
        vec![cut, without_url, without_version]
    }

    /// The largest frame this connection may send now: little until it proved itself.
    pub fn frame_limit(&self) -> usize {
        match self.phase {
            Phase::Challenged { .. } => MAX_HELLO_BYTES,
            Phase::Ready(_) => MAX_FRAME_BYTES,
        }
    }

    /// How many bytes, framing included, a host may read from this connection in all
    /// before it proves itself; `None` once it has (frames are then bounded one by one by
    /// [`MAX_FRAME_BYTES`]). Hosts that read the socket themselves enforce it, so the
    /// limit holds before a whole frame is in memory.
    pub fn read_budget(&self) -> Option<usize> {
        match self.phase {
            Phase::Challenged { .. } => Some(UNPROVEN_READ_BUDGET),
            Phase::Ready(_) => None,
        }
    }

    /// When the edge must act on this connection if the agent stays silent: a handshake
    /// not finished in time, or for two heartbeat intervals no heartbeat taken, no new
    /// result (`last_seen`), no frame arriving at the floor rate (`arriving`) and none read
    /// since then still waiting for the machine (`waiting`).
    pub fn deadline(&self, heartbeat_interval_ms: u64) -> Millis {
        match self.phase {
            // A hello read in time and waiting to be verified: judged once it is.
            Phase::Challenged { .. } => {
                let due = self.connected_at + HANDSHAKE_TIMEOUT_MS;
                match self.waiting {
                    Some(at) if at <= due => due.max(at.saturating_add(HANDSHAKE_TIMEOUT_MS)),
                    _ => due,
                }
            }
            Phase::Ready(_) => {
                let heard = self.last_seen.max(self.arriving.map_or(0, |a| a.until)).max(self.waiting.unwrap_or(0));
                heard + 2 * heartbeat_interval_ms
            }
        }
    }
}

/// What an unproven connection may send in all: one hello, its framing, a few control
/// frames.
pub const UNPROVEN_READ_BUDGET: usize = MAX_HELLO_BYTES + 4096;

/// The source a peer address counts as: an IPv4 address, or the /64 network of an IPv6
/// one (one host commonly holds a whole /64, so its addresses are one source). A peer
/// the host could not name (no address, a header that is not one) is `unknown`.
pub fn source_of(peer: &str) -> String {
    match peer.trim().parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        Err(_) => "unknown".to_string(),
    }
}

/// Checks an agent's hello against the challenge this connection was given. `wall` is the
/// edge's wall clock: the hello's `issued_at` is the agent's. `domain` is the one it must
/// be signed under: [`Domain::Hello`], or [`Domain::Probe`] for a probe's.
pub fn verify_hello(
    domain: Domain,
    protocol: u32,
    agent_id: &str,
    envelope: &Envelope,
    nonce: &str,
    keyring: &Keyring,
    wall: Millis,
) -> Result<Hello, Refused> {
    if protocol != PROTOCOL_VERSION {
        return Err(Refused::new(
            close::VERSION_MISMATCH,
            format!(
                "protocol version mismatch: the agent speaks v{protocol}, this edge speaks v{PROTOCOL_VERSION}; \
                 run the same claude-runner release on both"
            ),
        ));
    }
    // Checked before the id goes into any reason or log line.
    if !shared::ids::valid_agent_id(agent_id) {
        return Err(Refused::new(
            close::UNAUTHORIZED,
            "the hello's agent id is not a valid agent id (1-64 letters, digits, `-`, `_` or `.`); set AGENT_ID to the id in AGENT_PUBLIC_KEYS",
        ));
    }
    let key = keyring.get(agent_id).ok_or_else(|| {
        Refused::new(
            close::UNAUTHORIZED,
            format!("unknown agent `{agent_id}`: add `{agent_id}=<its public key>` to the edge's AGENT_PUBLIC_KEYS"),
        )
    })?;
    let hello: Hello = envelope.open(domain, key).map_err(|e| {
        Refused::new(
            close::UNAUTHORIZED,
            format!(
                "agent `{agent_id}` failed to prove its identity ({e}); its AGENT_SIGNING_KEY must match its entry in AGENT_PUBLIC_KEYS"
            ),
        )
    })?;
    if hello.agent_id != agent_id || hello.protocol != protocol {
        return Err(Refused::new(close::UNAUTHORIZED, "the signed hello does not match its outer fields"));
    }
    if hello.challenge != nonce {
        return Err(Refused::new(
            close::UNAUTHORIZED,
            "the hello answers another connection's challenge (a replay?); reconnect",
        ));
    }
    // Signed, so the agent's own words, but they go into the edge's records and logs.
    if hello.instance.as_deref().is_some_and(|p| !shared::ids::valid_instance_id(p)) {
        return Err(Refused::new(
            close::PROTOCOL_ERROR,
            "the hello's instance id is not 1-64 letters or digits; run the same claude-runner release on the agent and the edge",
        ));
    }
    let off = hello.issued_at.abs_diff(wall);
    if off > CLOCK_SKEW_MS {
        return Err(Refused::new(
            close::UNAUTHORIZED,
            format!(
                "the agent's clock is {} s away from the edge's ({} s allowed); fix the clock (e.g. enable NTP)",
                whole_seconds(off),
                CLOCK_SKEW_MS / 1000
            ),
        ));
    }
    Ok(hello)
}

/// `ms` in whole seconds, rounded up: a clock said to be off by so many seconds is never
/// said to be within the window it is outside of (60.5 s was said as 60 s, of 60 allowed).
pub fn whole_seconds(ms: Millis) -> u64 {
    ms.div_ceil(1000)
}

/// This connection's MAC keys, from the edge's key `mine` and the X25519 key in the
/// agent's verified `hello`; with the edge's public key for the welcome. A key that gives
/// no shared secret (a low-order point) refuses the agent: its own signed words, so its bug
/// or its signing key misused.
pub fn agree(hello: &Hello, mine: &Ephemeral, pool: &str) -> Result<(String, LinkKeys), Refused> {
    let edge_public = mine.public();
    let transcript = Transcript {
        challenge: &hello.challenge,
        agent_nonce: &hello.agent_nonce,
        agent_public: &hello.ephemeral,
        edge_public: &edge_public,
        agent_id: &hello.agent_id,
        pool,
    };
    match LinkKeys::agree(mine, &hello.ephemeral, &transcript) {
        Ok(keys) => Ok((edge_public, keys)),
        Err(e) => Err(Refused::new(close::UNAUTHORIZED, format!("the hello's connection key is refused ({e}); run a released claude-runner agent"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello's clock off by a fraction of a second past the window is said rounded up:
    /// 60.5 s was said as 60 s, which read as within the 60 allowed.
    #[test]
    fn a_hellos_clock_off_is_said_in_seconds_rounded_up() {
        let now = 1_800_000_000_000;
        for (issued_at, says) in [(now - CLOCK_SKEW_MS - 500, "61 s away"), (now + CLOCK_SKEW_MS + 1, "61 s away"), (now - 90_000, "90 s away")] {
            let hello = crate::tests::hello("spark", "nonce", issued_at);
            let envelope = Envelope::seal(Domain::Hello, &hello, &crate::tests::agent_key(1));
            let refused = verify_hello(Domain::Hello, PROTOCOL_VERSION, "spark", &envelope, "nonce", &crate::tests::config().agents, now).unwrap_err();
            assert!(refused.reason.contains(says) && refused.reason.contains("(60 s allowed)"), "{says:?} not in {}", refused.reason);
        }
    }

    #[test]
    fn sources_are_addresses_and_ipv6_networks() {
        assert_eq!(source_of("203.0.113.7"), "203.0.113.7");
        assert_eq!(source_of(" ::ffff:203.0.113.7 "), "203.0.113.7");
        assert_eq!(source_of("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(source_of("2001:db8:1:2:ffff::1"), source_of("2001:db8:1:2::9"));
        for odd in ["", "evil\nline", "203.0.113.7:443", "x".repeat(10_000).as_str()] {
            assert_eq!(source_of(odd), "unknown", "{odd:?}");
        }
    }

    #[test]
    fn shorter_forms_cut_free_text_then_the_login_url_then_the_cli_version() {
        let login = LoginRelay {
            id: "0123456789abcdef".into(),
            url: Some("https://claude.com/cai/oauth/authorize?code=true".into()),
            url_proof: None,
            awaiting_code: true,
            code_sent: false,
            started_at: 1,
            expires_at: 2,
        };
        let session = Session {
            id: "s".into(),
            source: "203.0.113.7".into(),
            connected_at: 1,
            last_seen: 2,
            arriving: None,
            waiting: None,
            phase: Phase::Ready(Agent {
                agent_id: "spark".into(),
                version: "v".repeat(500),
                capacity: 2,
                slots: Slots { free: 1, received: 3 },
                sent: 4,
                // A real challenge's length.
                challenge: "c".repeat(32),
                keys: shared::link::LinkKeys::derive(&[1; 32], &shared::link::Transcript { challenge: "c", agent_nonce: "n", agent_public: "a", edge_public: "e", agent_id: "spark", pool: "default" }),
                beat: u64::MAX - 1,
                oauth: OAuthReport { problem: Some("p".repeat(5000)), subscription_type: Some("s".repeat(500)), ..OAuthReport::unconfigured(5) },
                claude_version: Some("2.1.197".into()),
                labels: shared::placement::parse_labels("gpu=none,os=linux").unwrap(),
                mirrors: ["github.com/o/r".to_string()].into(),
                paused: true,
                stopping: false,
                cannot_start: None,
                usage_hold_until: None,
                login: Some(login.clone()),
                instance: Some(shared::ids::instance_id([7; shared::ids::INSTANCE_ID_BYTES])),
                unproven: 0,
                lost_after_ms: Some(30_000),
            }),
        };
        let [cut, without_url, without_version] = <[Session; 3]>::try_from(session.shorter_forms()).unwrap();
        let agent = cut.agent().unwrap();
        assert_eq!(agent.mirrors, session.agent().unwrap().mirrors, "mirrors are cut by `fitted`, to what fits");
        assert_eq!((&agent.labels, agent.paused), (&session.agent().unwrap().labels, true), "labels and pause stay");
        assert_eq!((agent.version.len(), agent.oauth.subscription_type.as_ref().unwrap().len()), (64, 64));
        assert_eq!(agent.oauth.problem.as_ref().unwrap().len(), 300);
        assert_eq!(agent.login.as_ref(), Some(&login), "the login is whole in the first form");
        let mut expected = cut.clone();
        expected.agent_mut().unwrap().login.as_mut().unwrap().url = None;
        assert_eq!(without_url, expected, "the second form differs only by the URL");
        expected.agent_mut().unwrap().claude_version = None;
        assert_eq!(without_version, expected, "the third differs from the second only by the CLI version");
        let (whole, kept) = (session.agent().unwrap(), agent);
        assert_eq!((kept.capacity, kept.slots, kept.sent, &kept.agent_id), (whole.capacity, whole.slots, whole.sent, &whole.agent_id));
        assert_eq!(without_version.agent().unwrap().keys, whole.keys, "the connection's keys stay whole in every form");
        assert_eq!(without_version.agent().unwrap().instance, whole.instance, "the agent's instance stays: it tells a duplicate from a reconnect");
    }

    /// A record past the host's budget lost all its mirror names (the agent tells them
    /// again only when its set changes): as many as fit are kept, the first by name.
    #[test]
    fn fitted_keeps_as_many_mirror_names_as_fit() {
        let mut session = Session {
            id: "s".into(),
            source: "203.0.113.7".into(),
            connected_at: 1,
            last_seen: 2,
            arriving: None,
            waiting: None,
            phase: Phase::Challenged { nonce: "c".repeat(32), ephemeral: shared::link::Ephemeral::new([8; 32]) },
        };
        let size = |s: &Session| serde_json::to_string(s).unwrap().len();
        let within = |bound: usize| move |s: &Session| (size(s) <= bound).then(|| s.clone());
        // Not an agent yet: whole, or nothing.
        assert_eq!(session.fitted(within(size(&session))), Some(session.clone()));
        assert_eq!(session.fitted(within(size(&session) - 1)), None);
        session.phase = Phase::Ready(Agent {
            agent_id: "spark".into(),
            version: "0.1.0".into(),
            capacity: 1,
            slots: Slots { free: 1, received: 0 },
            sent: 0,
            challenge: "c".repeat(32),
            keys: shared::link::LinkKeys::derive(&[1; 32], &shared::link::Transcript { challenge: "c", agent_nonce: "n", agent_public: "a", edge_public: "e", agent_id: "spark", pool: "default" }),
            beat: 0,
            oauth: OAuthReport::unconfigured(5),
            claude_version: Some("2.1.197 (Claude Code)".into()),
            labels: Default::default(),
            mirrors: (0..100).map(|i| format!("github.com/acme-corp/service-{i:02}")).collect(),
            paused: false,
            stopping: false,
            cannot_start: None,
            usage_hold_until: None,
            login: None,
            instance: None,
            unproven: 0,
            lost_after_ms: Some(30_000),
        });
        assert_eq!(session.fitted(within(size(&session))), Some(session.clone()), "whole when it fits");
        let mut bare = session.clone();
        bare.agent_mut().unwrap().mirrors.clear();
        for bound in [size(&bare), size(&bare) + 40, 1_000, 2_000, size(&session) - 1] {
            let fitted = session.fitted(within(bound)).unwrap();
            assert!(size(&fitted) <= bound, "{bound}");
            let kept = &fitted.agent().unwrap().mirrors;
            assert!(kept.iter().zip(&session.agent().unwrap().mirrors).all(|(a, b)| a == b), "{bound}: the first by name");
            let mut one_more = fitted.clone();
            one_more.agent_mut().unwrap().mirrors = session.agent().unwrap().mirrors.iter().take(kept.len() + 1).cloned().collect();
            assert!(size(&one_more) > bound, "{bound}: {} kept, one more fits too", kept.len());
            assert_eq!(fitted.agent().unwrap().claude_version, session.agent().unwrap().claude_version, "{bound}: names are cut before the version");
        }
        // Past what even no names fit: the CLI's version goes, and names fit again.
        let fitted = session.fitted(within(size(&bare) - 5)).unwrap();
        assert_eq!(fitted.agent().unwrap().claude_version, None);
        assert!(session.fitted(|_| None::<Session>).is_none());
    }
}
