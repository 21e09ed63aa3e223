//! Signed envelopes. The signer serialises the payload once and signs *those exact bytes*
//! behind a domain-separation prefix; the envelope carries the bytes as a string, so the
//! verifier checks what was sent, not a re-serialisation of it. The prefix names what the
//! payload is (a job, a cancel, an agent's hello…), so a signature made for one kind of
//! message can never be passed off as another.
//!
//! [`Envelope`] carries an ed25519 signature (orders, hello, welcome: anyone holding the
//! signer's public key can check it); [`Tagged`] carries a MAC with one direction's key
//! of one connection ([`crate::link`]): the agent's reports and the edge's result
//! acknowledgements after the handshake. Both sign or MAC the same prefixed bytes.

use crate::keys;
use crate::link::{MacKey, MAC_BYTES};
use crate::Millis;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a signature is for. The prefix is part of the signed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// Edge → agent: run this job.
    Job,
    /// Edge → agent: stop this job.
    Cancel,
    /// Edge → agent: start or finish a `claude auth login`.
    Login,
    /// Agent → edge: answer to the edge's challenge.
    Hello,
    /// Edge → agent: answer to the agent's nonce, proving the edge holds its key.
    Welcome,
    /// Agent → edge: a running job's progress event.
    Progress,
    /// Agent → edge: a job's result.
    Result,
    /// Agent → edge: how a relayed `claude auth login` goes.
    LoginReport,
    /// Edge → agent: a result is stored; the agent may forget it.
    ResultAck,
    /// Agent → edge: a job order refused, nothing ran.
    Rejection,
    /// Agent → edge: a heartbeat (its login, the jobs it holds, its slots).
    Heartbeat,
    /// Agent → edge: a job's started record is durable, its Claude gets the prompt.
    Started,
    /// The agent → its own disk: a result kept until acknowledged, sealed so that one
    /// changed there is not sent (never on the wire).
    KeptResult,
    /// The agent → its own disk: which caller a Claude session belongs to, sealed so that
    /// a job cannot make one up or change one (never on the wire).
    KeptSession,
    /// Agent → edge: a hello that asks only whether the keys agree (`claude-runner
    /// doctor`), never taken for an agent's connection ([`crate::protocol::AgentMessage::Probe`]).
    Probe,
    /// Agent → edge: the proof on the WebSocket upgrade to `/agent/connect`, checked
    /// before the edge gives the peer a socket ([`UpgradeProof`]).
    Upgrade,
    /// Agent → whoever runs `claude-runner login`: the sign-in URL of a relayed login is
    /// the one this agent's `claude auth login` printed, signed with the agent's own key
    /// ([`crate::protocol::LoginUrlClaim`]). The edge passes it on and cannot make one.
    LoginUrl,
    /// Edge → agent: the challenge of a connection, signed over the agent's own nonce from
    /// its upgrade request ([`ChallengeProof`]): the edge proves its key before the agent
    /// says anything but its upgrade proof.
    Challenge,
    /// Edge → agent: a heartbeat of this connection was taken ([`crate::protocol::BeatAck`]):
    /// the agent hears the edge in these, so no one on the path can make one up.
    HeartbeatAck,
}

impl Domain {
    pub fn prefix(self) -> &'static [u8] {
        match self {
            Domain::Job => b"claude-runner/v1/job\n",
            Domain::Cancel => b"claude-runner/v1/cancel\n",
            Domain::Login => b"claude-runner/v1/login\n",
            Domain::Hello => b"claude-runner/v1/agent-hello\n",
            Domain::Welcome => b"claude-runner/v1/edge-welcome\n",
            Domain::Progress => b"claude-runner/v1/agent-progress\n",
            Domain::Result => b"claude-runner/v1/agent-result\n",
            Domain::LoginReport => b"claude-runner/v1/agent-login\n",
            Domain::ResultAck => b"claude-runner/v1/edge-result-ack\n",
            Domain::Rejection => b"claude-runner/v1/agent-rejection\n",
            Domain::Heartbeat => b"claude-runner/v1/agent-heartbeat\n",
            Domain::KeptResult => b"claude-runner/v9/kept-result\n",
            Domain::KeptSession => b"claude-runner/v10/kept-session\n",
            Domain::Probe => b"claude-runner/v10/agent-probe\n",
            Domain::Upgrade => b"claude-runner/v10/agent-upgrade\n",
            Domain::Started => b"claude-runner/v10/agent-started\n",
            Domain::LoginUrl => b"claude-runner/v10/agent-login-url\n",
            Domain::Challenge => b"claude-runner/v10/edge-challenge\n",
            Domain::HeartbeatAck => b"claude-runner/v11/edge-heartbeat-ack\n",
        }
    }
}

/// A payload and its signature, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The signed JSON text, exactly as signed.
    pub payload: String,
    /// base64 of the 64-byte ed25519 signature over `prefix ‖ payload`.
    pub sig: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("the signature is not valid base64 of 64 bytes")]
    MalformedSignature,
    #[error("the signature does not match the payload and the expected key")]
    BadSignature,
    #[error("the MAC is not valid base64 of 32 bytes")]
    MalformedMac,
    #[error("the MAC does not match the payload and this connection's key (altered on the way, or made for another connection or direction)")]
    BadMac,
    #[error("the signed payload is not the expected message: {0}")]
    MalformedPayload(String),
}

fn signed_bytes(domain: Domain, payload: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(domain.prefix().len() + payload.len());
    bytes.extend_from_slice(domain.prefix());
    bytes.extend_from_slice(payload.as_bytes());
    bytes
}

impl Envelope {
    pub fn seal<T: Serialize>(domain: Domain, payload: &T, key: &SigningKey) -> Envelope {
        let payload = serde_json::to_string(payload).expect("payload types serialise");
        let sig = key.sign(&signed_bytes(domain, &payload));
        Envelope { payload, sig: keys::encode(&sig.to_bytes()) }
    }

    /// Checks the signature first and only then parses the payload, so nothing an
    /// attacker wrote is interpreted before it is authenticated.
    pub fn open<T: DeserializeOwned>(&self, domain: Domain, key: &VerifyingKey) -> Result<T, EnvelopeError> {
        let sig = keys::decode(&self.sig)
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .ok_or(EnvelopeError::MalformedSignature)?;
        key.verify(&signed_bytes(domain, &self.payload), &Signature::from_bytes(&sig))
            .map_err(|_| EnvelopeError::BadSignature)?;
        serde_json::from_str(&self.payload).map_err(|e| EnvelopeError::MalformedPayload(e.to_string()))
    }
}

/// The request header that carries an agent's [`UpgradeProof`] on its dial of
/// `/agent/connect`.
pub const AGENT_PROOF_HEADER: &str = "x-runner-agent-proof";

/// The longest proof header an edge reads: an agent id (64), a time (20 digits), a
/// signature (86), two dots, and room to spare. Anything longer is refused unread.
pub const MAX_AGENT_PROOF: usize = 256;

/// An agent's proof, on the WebSocket upgrade itself, that it holds the key of an agent
/// in the pool's `AGENT_PUBLIC_KEYS`: `<agent_id>.<unix ms>.<base64url signature>`, signed
/// under [`Domain::Upgrade`] over the pool, the agent id and the time. It only decides
/// whether the edge gives the peer a socket at all (so nobody without a key makes the edge
/// hold a frame): it can be replayed within its clock window, so the hello still answers
/// the connection's own challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeProof<'a> {
    /// Not yet checked to be a valid agent id: the peer's words until it is.
    pub agent_id: &'a str,
    /// The agent's wall clock when it signed, in unix ms.
    pub issued_at: Millis,
    sig: [u8; 64],
}

impl<'a> UpgradeProof<'a> {
    /// The header value for `agent_id` dialing `pool` at `issued_at` (its wall clock).
    pub fn sign(key: &SigningKey, pool: &str, agent_id: &str, issued_at: Millis) -> String {
        let sig = key.sign(&signed_bytes(Domain::Upgrade, &upgrade_payload(pool, agent_id, issued_at)));
        format!("{agent_id}.{issued_at}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    /// Reads a header value; `None` when it is not of the proof's shape. An agent id may
    /// hold dots, the time and the signature cannot: the last two dots split it.
    pub fn parse(text: &'a str) -> Option<UpgradeProof<'a>> {
        if text.len() > MAX_AGENT_PROOF {
            return None;
        }
        let (rest, sig) = text.rsplit_once('.')?;
        let (agent_id, issued_at) = rest.rsplit_once('.')?;
        if issued_at.is_empty() || issued_at.len() > 20 || !issued_at.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let issued_at = issued_at.parse().ok()?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok().and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())?;
        Some(UpgradeProof { agent_id, issued_at, sig })
    }

    /// Whether `key` signed this proof for `pool`.
    pub fn verify(&self, pool: &str, key: &VerifyingKey) -> bool {
        let signed = signed_bytes(Domain::Upgrade, &upgrade_payload(pool, self.agent_id, self.issued_at));
        key.verify(&signed, &Signature::from_bytes(&self.sig)).is_ok()
    }
}

/// What an upgrade proof signs: pool and agent ids are plain ids (no newline), so the
/// three fields cannot be shifted into one another.
fn upgrade_payload(pool: &str, agent_id: &str, issued_at: Millis) -> String {
    format!("{pool}\n{agent_id}\n{issued_at}")
}

/// The request header that carries the agent's fresh nonce on its dial of
/// `/agent/connect`, for the edge to sign in its challenge ([`ChallengeProof`]).
pub const AGENT_NONCE_HEADER: &str = "x-runner-agent-nonce";

/// The agent's nonce for one dial, from 24 fresh random bytes (32 characters of base64):
/// what every dialer of `/agent/connect` sends — the agent, `doctor`, and the tests' and
/// benchmark's scale agents.
pub fn agent_nonce(entropy: [u8; 24]) -> String {
    keys::encode(&entropy)
}

/// Whether `text` may be an agent's nonce: 16 to 64 characters of standard base64 (the
/// agent sends 24 random bytes, 32 characters, [`agent_nonce`]). Anything else — a header sent twice (its
/// values joined with `, `), a newline — is refused unread: it would be signed.
pub fn valid_agent_nonce(text: &str) -> bool {
    (16..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// The edge's proof, in its challenge, that it holds the key the agent trusts
/// (`EDGE_PUBLIC_KEY`): an ed25519 signature under [`Domain::Challenge`] over the
/// protocol, the challenge nonce, the agent's nonce from this dial's upgrade request
/// ([`AGENT_NONCE_HEADER`]) and the pool. The agent checks it before it sends its hello
/// (its labels, login, jobs, instance, mirrors), so whoever answers at EDGE_URL without
/// the edge's key — a wrong URL, a hijacked name — learns none of them; and since the
/// agent's nonce is fresh on each dial, a challenge signed for an earlier connection
/// proves nothing on this one.
pub struct ChallengeProof;

impl ChallengeProof {
    /// base64 of the signature.
    pub fn sign(key: &SigningKey, protocol: u32, challenge: &str, agent_nonce: &str, pool: &str) -> String {
        keys::encode(&key.sign(&Self::signed(protocol, challenge, agent_nonce, pool)).to_bytes())
    }

    /// Whether `proof` is `key`'s signature over these.
    pub fn verify(proof: &str, key: &VerifyingKey, protocol: u32, challenge: &str, agent_nonce: &str, pool: &str) -> bool {
        let Some(sig) = keys::decode(proof).and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok()) else {
            return false;
        };
        key.verify_strict(&Self::signed(protocol, challenge, agent_nonce, pool), &Signature::from_bytes(&sig)).is_ok()
    }

    /// The signed bytes. The nonces are base64 and the pool a plain id (none holds a
    /// newline), so no field shifts into another.
    fn signed(protocol: u32, challenge: &str, agent_nonce: &str, pool: &str) -> Vec<u8> {
        signed_bytes(Domain::Challenge, &format!("{protocol}\n{challenge}\n{agent_nonce}\n{pool}"))
    }
}

/// A payload and its MAC under one direction's key of one connection, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tagged {
    /// The JSON text, exactly as MACed.
    pub payload: String,
    /// base64 of the 32-byte HMAC-SHA256 over `prefix ‖ payload`.
    pub mac: String,
}

impl Tagged {
    pub fn seal<T: Serialize>(domain: Domain, payload: &T, key: &MacKey) -> Tagged {
        Tagged::seal_text(domain, serde_json::to_string(payload).expect("payload types serialise"), key)
    }

    /// MACs a payload kept as text (a spooled result, sent again on a new connection).
    pub fn seal_text(domain: Domain, payload: String, key: &MacKey) -> Tagged {
        let mac = key.tag(domain.prefix(), payload.as_bytes());
        Tagged { payload, mac: keys::encode(&mac) }
    }

    /// Checks the MAC (in constant time) first and only then parses the payload.
    pub fn open<T: DeserializeOwned>(&self, domain: Domain, key: &MacKey) -> Result<T, EnvelopeError> {
        let mac = keys::decode(&self.mac).filter(|b| b.len() == MAC_BYTES).ok_or(EnvelopeError::MalformedMac)?;
        if !key.check(domain.prefix(), self.payload.as_bytes(), &mac) {
            return Err(EnvelopeError::BadMac);
        }
        serde_json::from_str(&self.payload).map_err(|e| EnvelopeError::MalformedPayload(e.to_string()))
    }
}

/// The header every edge order (job, cancel, login) carries inside its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderHeader {
    pub job_id: String,
    /// The agent this order is for; any other agent must refuse it.
    pub agent_id: String,
    /// The pool it comes from: an agent serves one pool (`EDGE_POOL`) and refuses another's.
    pub pool: String,
    pub issued_at: Millis,
    pub expires_at: Millis,
    /// Unique per envelope: the agent remembers nonces until they expire to refuse replays.
    pub nonce: String,
}

impl OrderHeader {
    /// An order issued at `issued_at` (the edge's wall clock), valid for [`ORDER_TTL_MS`].
    pub fn new(job_id: &str, to: Audience<'_>, issued_at: Millis, nonce: String) -> OrderHeader {
        OrderHeader {
            job_id: job_id.to_string(),
            agent_id: to.agent_id.to_string(),
            pool: to.pool.to_string(),
            issued_at,
            expires_at: issued_at.saturating_add(ORDER_TTL_MS),
            nonce,
        }
    }
}

/// Whom an order is for: one agent, serving one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audience<'a> {
    pub agent_id: &'a str,
    pub pool: &'a str,
}

/// Clock skew the agent tolerates between its clock and the edge's.
pub const CLOCK_SKEW_MS: Millis = 60_000;

/// How long an order stays valid after the edge issues it.
pub const ORDER_TTL_MS: Millis = 60_000;

/// Why an agent refuses an order. Reported to the edge, which logs it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("bad signature: {0} (is the agent's EDGE_PUBLIC_KEY the public half of the edge's EDGE_SIGNING_KEY?)")]
    Signature(EnvelopeError),
    #[error("the order is for agent `{for_agent}`, not this agent `{me}`")]
    WrongAgent { for_agent: String, me: String },
    #[error("the order comes from pool `{from_pool}`, but this agent serves pool `{mine}` (EDGE_POOL)")]
    WrongPool { from_pool: String, mine: String },
    #[error("the order expired at {expires_at} ms; the agent's clock says {now} ms (check both clocks)")]
    Expired { expires_at: Millis, now: Millis },
    #[error("the order was issued at {issued_at} ms, in the future of the agent's clock {now} ms (check both clocks)")]
    FromTheFuture { issued_at: Millis, now: Millis },
    #[error("replayed order: nonce `{nonce}` was already used")]
    Replay { nonce: String },
    #[error("the order was sent on another connection to the edge (replayed, or held back on the path): nothing ran; the edge sends its job again if it still should")]
    OtherConnection,
    #[error("order {order_no} arrived after order {highest} on this connection (replayed, or held back or reordered on the path): nothing ran")]
    OutOfOrder { order_no: u64, highest: u64 },
}

/// Verifies an order's signature, audience and freshness. Replays are the caller's to
/// refuse (it needs memory of past nonces).
pub fn open_order<T: DeserializeOwned + HasHeader>(
    envelope: &Envelope,
    domain: Domain,
    edge_key: &VerifyingKey,
    me: Audience<'_>,
    now: Millis,
) -> Result<T, Refusal> {
    let order: T = envelope.open(domain, edge_key).map_err(Refusal::Signature)?;
    check_order(order.header(), me, now)?;
    Ok(order)
}

/// An order's audience and freshness, once its signature verified.
pub fn check_order(h: &OrderHeader, me: Audience<'_>, now: Millis) -> Result<(), Refusal> {
    if h.agent_id != me.agent_id {
        return Err(Refusal::WrongAgent { for_agent: h.agent_id.clone(), me: me.agent_id.to_string() });
    }
    if h.pool != me.pool {
        return Err(Refusal::WrongPool { from_pool: h.pool.clone(), mine: me.pool.to_string() });
    }
    if now > h.expires_at.saturating_add(CLOCK_SKEW_MS) {
        return Err(Refusal::Expired { expires_at: h.expires_at, now });
    }
    if h.issued_at > now.saturating_add(CLOCK_SKEW_MS) {
        return Err(Refusal::FromTheFuture { issued_at: h.issued_at, now });
    }
    Ok(())
}

pub trait HasHeader {
    fn header(&self) -> &OrderHeader;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SPARK: Audience<'static> = Audience { agent_id: "spark", pool: "default" };

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Order {
        #[serde(flatten)]
        header: OrderHeader,
        what: String,
    }
    impl HasHeader for Order {
        fn header(&self) -> &OrderHeader {
            &self.header
        }
    }

    fn order(agent: &str, issued_at: Millis) -> Order {
        Order {
            header: OrderHeader {
                job_id: "j1".into(),
                agent_id: agent.into(),
                pool: "default".into(),
                issued_at,
                expires_at: issued_at + ORDER_TTL_MS,
                nonce: "n1".into(),
            },
            what: "run".into(),
        }
    }

    #[test]
    fn opens_what_was_sealed() {
        let k = key(1);
        let env = Envelope::seal(Domain::Job, &order("spark", 1000), &k);
        let o: Order = open_order(&env, Domain::Job, &k.verifying_key(), SPARK, 2000).unwrap();
        assert_eq!(o.what, "run");
    }

    #[test]
    fn refuses_another_key() {
        let env = Envelope::seal(Domain::Job, &order("spark", 1000), &key(2));
        let err = open_order::<Order>(&env, Domain::Job, &key(1).verifying_key(), SPARK, 2000).unwrap_err();
        assert_eq!(err, Refusal::Signature(EnvelopeError::BadSignature));
    }

    #[test]
    fn refuses_a_tampered_payload() {
        let k = key(1);
        let mut env = Envelope::seal(Domain::Job, &order("spark", 1000), &k);
        env.payload = env.payload.replace("run", "rm!");
        let err = open_order::<Order>(&env, Domain::Job, &k.verifying_key(), SPARK, 2000).unwrap_err();
        assert_eq!(err, Refusal::Signature(EnvelopeError::BadSignature));
        // Even re-serialising the same value differently (whitespace) breaks the signature:
        // the signed bytes are the sent bytes.
        let mut env = Envelope::seal(Domain::Job, &order("spark", 1000), &k);
        env.payload = env.payload.replace(",", ", ");
        assert!(open_order::<Order>(&env, Domain::Job, &k.verifying_key(), SPARK, 2000).is_err());
    }

    #[test]
    fn refuses_a_signature_from_another_domain() {
        let k = key(1);
        let env = Envelope::seal(Domain::Cancel, &order("spark", 1000), &k);
        let err = open_order::<Order>(&env, Domain::Job, &k.verifying_key(), SPARK, 2000).unwrap_err();
        assert_eq!(err, Refusal::Signature(EnvelopeError::BadSignature));
    }

    #[test]
    fn refuses_another_agents_order() {
        let k = key(1);
        let env = Envelope::seal(Domain::Job, &order("laptop", 1000), &k);
        let err = open_order::<Order>(&env, Domain::Job, &k.verifying_key(), SPARK, 2000).unwrap_err();
        assert!(matches!(err, Refusal::WrongAgent { .. }));
    }

    #[test]
    fn refuses_another_pools_order() {
        let k = key(1);
        let env = Envelope::seal(Domain::Job, &order("spark", 1000), &k);
        let other = Audience { agent_id: "spark", pool: "gpu" };
        let err = open_order::<Order>(&env, Domain::Job, &k.verifying_key(), other, 2000).unwrap_err();
        assert_eq!(err, Refusal::WrongPool { from_pool: "default".into(), mine: "gpu".into() });
    }

    #[test]
    fn applies_clock_skew_both_ways() {
        let k = key(1);
        let env = Envelope::seal(Domain::Job, &order("spark", 1_000_000), &k);
        let open = |now| open_order::<Order>(&env, Domain::Job, &k.verifying_key(), SPARK, now);
        let expires = 1_000_000 + ORDER_TTL_MS;
        assert!(open(expires + CLOCK_SKEW_MS).is_ok());
        assert!(matches!(open(expires + CLOCK_SKEW_MS + 1), Err(Refusal::Expired { .. })));
        assert!(open(1_000_000 - CLOCK_SKEW_MS).is_ok());
        assert!(matches!(open(1_000_000 - CLOCK_SKEW_MS - 1), Err(Refusal::FromTheFuture { .. })));
    }

    #[test]
    fn a_mac_opens_only_under_its_key_domain_and_bytes() {
        let k = MacKey::from_bytes([1; 32]);
        let tagged = Tagged::seal(Domain::Result, &json!({"job_id": "j1"}), &k);
        assert_eq!(tagged.open::<serde_json::Value>(Domain::Result, &k).unwrap(), json!({"job_id": "j1"}));
        // A flipped byte of the payload, or of the MAC.
        let mut flipped = tagged.clone();
        flipped.payload = flipped.payload.replace("j1", "j2");
        assert_eq!(flipped.open::<serde_json::Value>(Domain::Result, &k), Err(EnvelopeError::BadMac));
        let mut mac = keys::decode(&tagged.mac).unwrap();
        mac[7] ^= 1;
        let flipped = Tagged { mac: keys::encode(&mac), ..tagged.clone() };
        assert_eq!(flipped.open::<serde_json::Value>(Domain::Result, &k), Err(EnvelopeError::BadMac));
        // Another key, another domain.
        assert_eq!(tagged.open::<serde_json::Value>(Domain::Result, &MacKey::from_bytes([2; 32])), Err(EnvelopeError::BadMac));
        for other in [Domain::Progress, Domain::Heartbeat, Domain::ResultAck, Domain::Job] {
            assert_eq!(tagged.open::<serde_json::Value>(other, &k), Err(EnvelopeError::BadMac), "{other:?}");
        }
        // Malformed MACs: not base64, too short, too long, a signature's length.
        for mac in ["", "!!!", &keys::encode(&[0; 31]), &keys::encode(&[0; 33]), &keys::encode(&[0; 64])] {
            let bad = Tagged { mac: mac.to_string(), ..tagged.clone() };
            assert_eq!(bad.open::<serde_json::Value>(Domain::Result, &k), Err(EnvelopeError::MalformedMac), "{mac}");
        }
        // The MAC is checked before the payload is read.
        let garbage = Tagged::seal_text(Domain::Result, "not json".into(), &k);
        assert!(matches!(garbage.open::<serde_json::Value>(Domain::Result, &k), Err(EnvelopeError::MalformedPayload(_))));
        assert_eq!(garbage.open::<serde_json::Value>(Domain::Result, &MacKey::from_bytes([2; 32])), Err(EnvelopeError::BadMac));
    }

    #[test]
    fn a_challenge_proof_holds_only_for_its_key_nonces_protocol_and_pool() {
        let k = key(1);
        let proof = ChallengeProof::sign(&k, 10, "challenge-nonce", "agent-nonce-0123", "default");
        let vk = k.verifying_key();
        assert!(ChallengeProof::verify(&proof, &vk, 10, "challenge-nonce", "agent-nonce-0123", "default"));
        assert!(!ChallengeProof::verify(&proof, &key(2).verifying_key(), 10, "challenge-nonce", "agent-nonce-0123", "default"));
        assert!(!ChallengeProof::verify(&proof, &vk, 10, "challenge-nonce", "another-agent-nonce", "default"));
        assert!(!ChallengeProof::verify(&proof, &vk, 10, "another-challenge", "agent-nonce-0123", "default"));
        assert!(!ChallengeProof::verify(&proof, &vk, 11, "challenge-nonce", "agent-nonce-0123", "default"));
        assert!(!ChallengeProof::verify(&proof, &vk, 10, "challenge-nonce", "agent-nonce-0123", "gpu"));
        // Another kind's signature over the same bytes is not a challenge's.
        let sig = k.sign(&signed_bytes(Domain::Welcome, "10\nchallenge-nonce\nagent-nonce-0123\ndefault"));
        assert!(!ChallengeProof::verify(&keys::encode(&sig.to_bytes()), &vk, 10, "challenge-nonce", "agent-nonce-0123", "default"));
        for garbage in ["", "!!!", "AAAA", &"A".repeat(200)] {
            assert!(!ChallengeProof::verify(garbage, &vk, 10, "challenge-nonce", "agent-nonce-0123", "default"));
        }
    }

    #[test]
    fn agent_nonces_are_plain_base64_of_bounded_length() {
        assert!(valid_agent_nonce(&keys::encode(&[7; 24])));
        for bad in ["", "short", &"A".repeat(65), "AAAAAAAAAAAAAAAA, AAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAA\nAAAA"] {
            assert!(!valid_agent_nonce(bad), "{bad:?}");
        }
    }

    #[test]
    fn refuses_garbage_signatures_without_panicking() {
        let k = key(1);
        for sig in ["", "!!!", "AAAA", &"A".repeat(200)] {
            let env = Envelope { payload: json!({"x":1}).to_string(), sig: sig.to_string() };
            assert!(env.open::<serde_json::Value>(Domain::Job, &k.verifying_key()).is_err());
        }
    }
}
