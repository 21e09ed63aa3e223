//! Fuzz targets: every decoder that takes bytes from outside, driven through the same
//! functions the binaries use. Each target takes arbitrary bytes and must neither panic
//! nor hang, whatever they are; where a property is cheap to state it is asserted too.
//!
//! - [`http`]: the edge's HTTP contract — body parsing and validation
//!   (`shared::contract`), auth and routing (`edge_core::http`).
//! - [`agent_frames`]: frames an agent connection sends the edge, before and after a
//!   valid handshake, with a job to report on; and reports (progress, results) MACed with
//!   the connection's key, so what follows a valid MAC is fuzzed too.
//! - [`connections`]: unproven connections from arbitrary peers (the address a host
//!   passes, `CF-Connecting-IP` on the Worker): the bounds on them hold, and the real
//!   agent always gets in.
//! - [`wire`]: `shared::protocol::decode` of both message kinds, their round trip, and
//!   that it takes what serde's own reading of them took.
//! - [`edge_orders`]: frames the edge sends the agent: signed envelopes and
//!   `open_order`, with forged and with valid signatures.
//! - [`credentials`]: Claude's `.credentials.json`.
//! - [`slot_records`]: the agent's slot record files (`DATA_DIR/records/<n>`), torn or not.
//! - [`claude_stream`]: Claude's stream-json lines through redaction, `Transcript` and
//!   the result.
//! - [`redaction`]: the redactor on arbitrary text: no panic, no secret out.
//! - [`sse`]: Server-Sent Events framing, whatever the chunking.
//! - [`config`]: the edge's settings (pools too), keys, the keyring and `EDGE_URL`.
//!
//! `tests/fuzz/run` runs them under libFuzzer (coverage-guided); `cargo test -p
//! claude-runner-fuzz` runs them on the committed seeds and on random inputs (proptest),
//! which is the fallback where libFuzzer cannot be built.

use agent_core::claude::{self, Ending, Transcript};
use agent_core::redact::Redactor;
use ed25519_dalek::SigningKey;
use edge_core::body::Body;
use edge_core::http::{self, Reply, Request};
use edge_core::record::{Job, Mode};
use edge_core::session::Session;
use edge_core::{Config, Edge, Effect};
use shared::contract::{ExecuteRequest, Limits};
use shared::envelope::{open_order, Audience, Domain, Envelope, OrderHeader, Tagged};
use shared::protocol::{AgentMessage, CancelOrder, EdgeMessage, Hello, JobOrder, LoginOrder, Slots, Welcome, PROTOCOL_VERSION};
use std::sync::OnceLock;

/// A fuzz target: takes any bytes, must not panic or hang.
pub type Target = fn(&[u8]);

/// Every target by name, for the libFuzzer binary and the runner script.
pub const TARGETS: &[(&str, Target)] = &[
    ("http", http),
    ("agent_frames", agent_frames),
    ("connections", connections),
    ("wire", wire),
    ("edge_orders", edge_orders),
    ("credentials", credentials),
    ("slot_records", slot_records),
    ("claude_stream", claude_stream),
    ("redaction", redaction),
    ("sse", sse),
    ("config", config),
];

pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

const NOW: u64 = 1_800_000_000_000;
const SECRET: &str = "fuzz-runner-secret-0123456789";
const AGENT: &str = "spark";
/// Orders for the fuzzed agent: `spark`, in the default pool.
const ME: Audience<'static> = Audience { agent_id: AGENT, pool: "default" };
/// The address the scripted agent connects from.
const PEER: &str = "192.0.2.1";

/// The nonce the scripted agent dials with (`X-Runner-Agent-Nonce`), made as the agent
/// makes its own: the edge closes a dial without one.
fn agent_nonce() -> String {
    shared::envelope::agent_nonce([6; 24])
}

// Keys and settings are made once: deriving a key costs more than most inputs.
fn edge_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[7; 32]))
}

fn agent_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[9; 32]))
}

fn edge_config() -> Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let agents = format!("{AGENT}={}", shared::keys::encode_verifying(&agent_key().verifying_key()));
            let edge = shared::keys::encode_signing(edge_key());
            Config::from_lookup(|name| match name {
                "RUNNER_SECRET" => Some(SECRET.to_string()),
                "EDGE_SIGNING_KEY" => Some(edge.clone()),
                "AGENT_PUBLIC_KEYS" => Some(agents.clone()),
                _ => None,
            })
            .expect("the fuzz edge's settings are valid")
        })
        .clone()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An HTTP request: `flags, method selector` then NUL-separated path, secret,
/// authorization, idempotency key and body.
pub fn http(data: &[u8]) {
    let (head, rest) = data.split_at(data.len().min(2));
    let mut parts = rest.splitn(5, |b| *b == 0);
    // Hosts hand over paths as they come in a request line: starting with `/`.
    let path = format!("/{}", text(parts.next().unwrap_or_default()).trim_start_matches('/'));
    let secret = parts.next().map(text);
    let authorization = parts.next().map(text);
    let idempotency_key = parts.next().map(text);
    let body = parts.next().unwrap_or_default();
    let flags = head.first().copied().unwrap_or(0);
    let method = ["GET", "POST", "DELETE", "PUT", "HEAD", "PATCH"][head.get(1).copied().unwrap_or(0) as usize % 6];
    let limits = Limits { max_timeout_ms: 3_600_000 };
    if let Ok(submission) = ExecuteRequest::parse(body, idempotency_key.as_deref(), limits) {
        // What validation let through is what the agent will run: it must hold there too.
        if let Some(dir) = &submission.spec.working_dir {
            assert!(shared::contract::checked_working_dir(dir).is_ok(), "{dir:?}");
        }
        let _ = claude::args(&submission.spec, None, &claude::Session::of(&submission.spec, || [7; 16]));
    }
    // The secret's text as an agent's proof on the upgrade to `/agent/connect`: a 401,
    // never a panic, and a way in only for an agent the edge lists (the seeds hold one).
    if let Some(proof) = &secret {
        match edge_core::upgrade::check_upgrade(Some(proof), &edge_config(), NOW) {
            Ok(agent_id) => assert_eq!(agent_id, AGENT, "{proof:?}"),
            Err(refused) => assert_eq!(refused.status, 401, "{proof:?}"),
        }
    }
    let secret = if flags & 1 == 1 { Some(SECRET.to_string()) } else { secret };
    let mut edge = Edge::new(edge_config(), NOW);
    if flags & 2 == 2 {
        let _ = edge.connect(NOW, [3; 64], PEER, Some(&agent_nonce()));
    }
    // The contract's rule, stated apart from the code under test: the secret in
    // `X-Runner-Secret`, or as `Authorization: Bearer`.
    let bearer = authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")));
    let authorized = [secret.as_deref(), bearer].into_iter().flatten().any(|given| given.trim() == SECRET);
    let req = Request {
        method: method.to_string(),
        path: path.clone(),
        secret_header: secret,
        authorization,
        // Flag 16: the idempotency key's text is sent as `Last-Event-ID` instead.
        last_event_id: if flags & 16 == 16 { idempotency_key.clone() } else { None },
        idempotency_key,
        body: match flags & 12 {
            4 => Body::TooLarge,
            8 => Body::Broken("the upload broke off".into()),
            _ => Body::Bytes(body.to_vec()),
        },
    };
    let handled = http::handle(&mut edge, NOW, [1; 16], &req);
    if !authorized {
        // Without the secret nothing but the open routes (README: the page, /health,
        // the agents' socket) answers with content.
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let open = matches!(segments.as_slice(), [] | [""] | ["health"] | ["agent", "connect"]);
        assert_eq!(handled.reply, Reply::Once { max_wait_ms: 60_000, may_keep_alive: false }, "{method} {path:?} without the secret got a stream");
        for effect in &handled.effects {
            match effect {
                Effect::Answer { caller, response } if *caller == handled.caller => {
                    let status = response.status;
                    assert!(!(200..300).contains(&status) || open, "{method} {path:?} answered {status} without the secret");
                }
                Effect::Answer { .. } | Effect::Send { .. } | Effect::Close { .. } | Effect::SaveSession(_) => {}
                other => panic!("{method} {path:?} without the secret changed something: {other:?}"),
            }
        }
    }
}

/// The challenge nonce the edge sent on a new connection dialled with [`agent_nonce`], if
/// the edge proved its key in it: checked as the agent checks it before its hello
/// (`ChallengeProof::verify`, which the agent's `upgrade::edge_proven` asks).
fn proven_challenge(effects: &[Effect]) -> Option<String> {
    let (nonce, proof) = effects.iter().find_map(|e| match e {
        Effect::Send { text, .. } => match shared::protocol::decode::<EdgeMessage>(text) {
            Ok(EdgeMessage::Challenge { nonce, proof, .. }) => Some((nonce, proof)),
            _ => None,
        },
        _ => None,
    })?;
    let key = edge_key().verifying_key();
    shared::envelope::ChallengeProof::verify(&proof?, &key, PROTOCOL_VERSION, &nonce, &agent_nonce(), "default").then_some(nonce)
}

/// A connection that passed the handshake (and the job `j1`, queued before it), made
/// once: verifying a hello costs more than most inputs, so later inputs start from the
/// saved records, as a restarted host does.
fn ready_records() -> &'static (Session, Job) {
    static READY: OnceLock<(Session, Job)> = OnceLock::new();
    READY.get_or_init(|| {
        let mut edge = Edge::new(edge_config(), NOW);
        let submission = ExecuteRequest::parse(br#"{"prompt":"fuzz","timeout_ms":60000}"#, None, Limits { max_timeout_ms: 3_600_000 })
            .expect("a valid body");
        let job = match edge.submit(NOW, "j1".into(), submission, Mode::Detached) {
            Ok(submitted) => submitted.effects.into_iter().find_map(|e| match e {
                Effect::Save(job) => Some(std::sync::Arc::unwrap_or_clone(job)),
                _ => None,
            }),
            Err(e) => panic!("{e:?}"),
        };
        let (session, effects) = edge.connect(NOW, [3; 64], PEER, Some(&agent_nonce()));
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: AGENT.into(),
            agent_version: "fuzz".into(),
            challenge: proven_challenge(&effects).expect("a challenge the edge proved"),
            agent_nonce: agent_nonce(),
            ephemeral: shared::link::Ephemeral::new([4; 32]).public(),
            issued_at: NOW,
            capacity: 2,
            running: vec![],
            finished: vec![],
            more_finished: false,
            oauth: shared::oauth::OAuthReport::unconfigured(NOW),
            claude_version: Some("2.1.197 (Claude Code)".into()),
            labels: Default::default(),
            mirrors: Vec::new(),
            instance: None,
        };
        let envelope = Envelope::seal(Domain::Hello, &hello, agent_key());
        let frame = AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: AGENT.into(), envelope }.to_text();
        let ready = edge.message(NOW, &session, &frame).into_iter().rev().find_map(|e| match e {
            Effect::SaveSession(s) if s.agent().is_some() => Some(std::sync::Arc::unwrap_or_clone(s)),
            _ => None,
        });
        (ready.expect("the handshake passes"), job.expect("the job is saved"))
    })
}

/// Frames from one agent connection, `0xff`-separated after a flags byte: bit 0 starts
/// from a connection past a valid handshake, bit 1 with a job `j1` queued; with bit 2 each
/// frame is instead the payload of a report the agent MACed — progress, with bit 3 a
/// result, with bit 4 a report on a relayed login; with bit 5 a refusal of an order, with
/// bits 5 and 3 a heartbeat — so the edge's reading of verified reports is fuzzed too.
/// (The ready connection's challenge, which a heartbeat must name, is in the seeds.) With bits 0 and 4 a relayed login is under way first (its id
/// [`FUZZ_LOGIN_ID`], its start order's nonce `<id>:start`), so a login report can name it.
pub fn agent_frames(data: &[u8]) {
    let (flags, frames) = match data.split_first() {
        Some((f, rest)) => (*f, rest),
        None => (0, data),
    };
    let mut now = NOW;
    let (mut edge, session) = if flags & 1 == 1 {
        let (session, job) = ready_records().clone();
        let jobs = if flags & 2 == 2 { vec![job] } else { vec![] };
        let id = session.id.clone();
        (Edge::restore(edge_config(), jobs, vec![session], None, now).0, id)
    } else {
        let mut edge = Edge::new(edge_config(), now);
        if flags & 2 == 2 {
            let (_, job) = ready_records().clone();
            edge = Edge::restore(edge_config(), vec![job], vec![], None, now).0;
        }
        let (session, _) = edge.connect(now, [3; 64], PEER, Some(&agent_nonce()));
        (edge, session)
    };
    if flags & 7 == 7 {
        // `j1` goes to the agent (its first order, `j1:1`), so signed reports can name it.
        let _ = edge.message(now, &session, &AgentMessage::Credit { slots: shared::protocol::Slots { free: 1, received: 0 } }.to_text());
    }
    if flags & 17 == 17 {
        let caller = edge.begin_request(now);
        let _ = edge.start_login(now, caller, FUZZ_LOGIN_ENTROPY, b"");
    }
    for frame in frames.split(|b| *b == 0xff) {
        now += 1_000;
        let frame = if flags & 4 == 4 {
            let domain = match flags & 56 {
                0 => Domain::Progress,
                8 => Domain::Result,
                16 => Domain::Started,
                32 => Domain::Rejection,
                40 => Domain::Heartbeat,
                _ => Domain::LoginReport,
            };
            // MACed with the connection's key, as the agent does (a connection that is not
            // past its handshake has none: any key is then as good as another's).
            let key = edge.session(&session).and_then(|s| s.agent()).map_or(shared::link::MacKey::from_bytes([4; 32]), |a| a.keys.agent_to_edge.clone());
            let envelope = shared::envelope::Tagged::seal_text(domain, text(frame), &key);
            match domain {
                Domain::Result => AgentMessage::Result { envelope },
                Domain::LoginReport => AgentMessage::LoginProgress { envelope },
                Domain::Rejection => AgentMessage::Rejected { envelope },
                Domain::Heartbeat => AgentMessage::Heartbeat { envelope },
                Domain::Started => AgentMessage::Started { envelope },
                _ => AgentMessage::Event { envelope },
            }
            .to_text()
        } else {
            text(frame)
        };
        let refused_before = edge.stats().refused_reports;
        let _ = edge.message(now, &session, &frame);
        if flags & 5 == 5 {
            // MACed with the connection's own key: never counted as a forgery.
            assert_eq!(edge.stats().refused_reports, refused_before);
        }
    }
    let _ = edge.health(now);
    let _ = edge.tick(now + 3_600_000);
}

/// The entropy the `agent_frames` target starts its relayed login with, and so its id.
const FUZZ_LOGIN_ENTROPY: [u8; 16] = [5; 16];
/// The id of that login (the first 8 bytes of its entropy in hex).
pub const FUZZ_LOGIN_ID: &str = "0505050505050505";

/// Unproven connections from arbitrary peers, NUL-separated: each is taken (an older
/// unproven one closed to make room), no source ever holds more than its share, no more
/// wait than the edge's bound, and the agent — connecting at any point, from any of those
/// peers — gets in with its hello.
pub fn connections(data: &[u8]) {
    use edge_core::machine::{MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_SOURCE};
    let mut edge = Edge::new(edge_config(), NOW);
    let mut now = NOW;
    // The unproven connections, and where each comes from, as the effects tell.
    let mut unproven: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    // A few hundred connections show every bound; more would only slow the fuzzer.
    for (i, peer) in data.split(|b| *b == 0).take(300).enumerate() {
        now += 1;
        let peer = text(peer);
        let source = edge_core::session::source_of(&peer);
        assert!(source == "unknown" || source.parse::<std::net::IpAddr>().is_ok() || source.ends_with("::/64"), "{source}");
        let mut entropy = [0u8; 64];
        entropy[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let (session, effects) = edge.connect(now, entropy, &peer, Some(&agent_nonce()));
        for effect in &effects {
            if let Effect::Close { session, .. } = effect {
                unproven.remove(session);
            }
        }
        unproven.insert(session.clone(), source);
        assert_eq!(unproven.len(), edge.unproven_connections());
        assert!(unproven.len() <= MAX_PENDING_HANDSHAKES);
        let mut per_source: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for source in unproven.values() {
            *per_source.entry(source).or_default() += 1;
        }
        assert!(per_source.values().all(|n| *n <= MAX_PENDING_PER_SOURCE), "{per_source:?}");
        if i % 7 == 3 {
            // The agent, from this peer: its hello right after its challenge gets it in.
            let nonce = proven_challenge(&effects).expect("a challenge the edge proved");
            let hello = Hello {
                protocol: PROTOCOL_VERSION,
                agent_id: AGENT.into(),
                agent_version: "fuzz".into(),
                challenge: nonce,
                agent_nonce: agent_nonce(),
                ephemeral: shared::link::Ephemeral::new([4; 32]).public(),
                issued_at: now,
                capacity: 1,
                running: vec![],
                finished: vec![],
                more_finished: false,
                oauth: shared::oauth::OAuthReport::unconfigured(now),
                claude_version: None,
                labels: Default::default(),
                mirrors: Vec::new(),
                instance: None,
            };
            let frame = AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: AGENT.into(), envelope: Envelope::seal(Domain::Hello, &hello, agent_key()) }.to_text();
            let _ = edge.message(now, &session, &frame);
            assert!(edge.session(&session).and_then(|s| s.agent()).is_some(), "the agent was kept out");
            unproven.remove(&session);
            let _ = edge.disconnect(now, &session);
        }
    }
}

/// One frame, decoded as each side would; what decodes re-encodes to the same message,
/// and reads as serde's own reading of an internally tagged enum read it (every field
/// buffered first, [`SerdeAgentMessage`]): the same frames taken, as the same messages.
pub fn wire(data: &[u8]) {
    let frame = text(data);
    let agent = shared::protocol::decode::<AgentMessage>(&frame);
    if let Ok(m) = &agent {
        assert_eq!(shared::protocol::decode::<AgentMessage>(&m.to_text()).as_ref(), Ok(m));
    }
    let serdes = as_serde_read(&frame, |de| SerdeAgentMessage::deserialize(de));
    read_alike(&frame, &agent, &serdes);
    let edge = shared::protocol::decode::<EdgeMessage>(&frame);
    if let Ok(m) = &edge {
        assert_eq!(shared::protocol::decode::<EdgeMessage>(&m.to_text()).as_ref(), Ok(m));
    }
    let serdes = as_serde_read(&frame, |de| SerdeEdgeMessage::deserialize(de));
    read_alike(&frame, &edge, &serdes);
}

/// Both took the frame, as the same message, or both refused it — but for a value no
/// kind reads (`shared/src/frame.rs`): serde's reading decoded every value of the frame
/// and refused one that does not decode (a number past `f64`'s range, a lone surrogate
/// escape) or that nests past serde_json's 128 levels; ours passes over a field it does
/// not read as serde passes over any struct's unknown field, its JSON checked only, at
/// any depth. A value a kind reads is decoded by both, so such a refusal with ours taking
/// the frame can only be of one no kind reads.
fn read_alike<T: PartialEq + std::fmt::Debug>(frame: &str, ours: &Result<T, String>, serdes: &Result<T, serde_json::Error>) {
    const UNDECODED: &[&str] = &["number out of range", "lone leading surrogate in hex escape", "invalid unicode code point", "unexpected end of hex escape", "recursion limit exceeded"];
    match (ours, serdes) {
        (Ok(m), Ok(s)) => assert_eq!(m, s, "{frame:?}"),
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) if UNDECODED.iter().any(|w| e.to_string().starts_with(w)) => {}
        _ => panic!("{frame:?}: ours {ours:?}, serde's {serdes:?}"),
    }
}

/// A frame read whole by `read`, as `serde_json::from_str` reads one (nothing after it).
fn as_serde_read<'a, T>(
    frame: &'a str,
    read: impl FnOnce(&mut serde_json::Deserializer<serde_json::de::StrRead<'a>>) -> Result<T, serde_json::Error>,
) -> Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(frame);
    let m = read(&mut de)?;
    de.end()?;
    Ok(m)
}

/// serde's own reading of [`AgentMessage`], as the enum derived it before frames were read
/// by their `type` first (`shared/src/frame.rs`): the reference [`wire`] holds that one to.
#[derive(serde::Deserialize)]
#[serde(remote = "AgentMessage", tag = "type", rename_all = "snake_case")]
enum SerdeAgentMessage {
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

/// [`SerdeAgentMessage`] for [`EdgeMessage`].
#[derive(serde::Deserialize)]
#[serde(remote = "EdgeMessage", tag = "type", rename_all = "snake_case")]
enum SerdeEdgeMessage {
    Challenge {
        protocol: u32,
        nonce: String,
        edge_version: String,
        server_time: u64,
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

/// What the agent does with an edge frame: decode it, open the envelope. With the first
/// byte odd, the rest is signed by the edge's key as a job, a cancel, a welcome or a login
/// payload,
/// so what follows a valid signature is fuzzed too.
pub fn edge_orders(data: &[u8]) {
    let key = edge_key().verifying_key();
    let (flags, rest) = match data.split_first() {
        Some((f, rest)) => (*f, rest),
        None => (0, data),
    };
    let payload = text(rest);
    if flags & 1 == 0 {
        match shared::protocol::decode::<EdgeMessage>(&payload) {
            Ok(EdgeMessage::Job { envelope }) => run_order(open_order::<JobOrder>(&envelope, Domain::Job, &key, ME, NOW)),
            Ok(EdgeMessage::Cancel { envelope }) => {
                let _ = open_order::<CancelOrder>(&envelope, Domain::Cancel, &key, ME, NOW);
            }
            Ok(EdgeMessage::Welcome { envelope }) => {
                let _ = envelope.open::<Welcome>(Domain::Welcome, &key);
            }
            Ok(EdgeMessage::Login { envelope }) => {
                let _ = open_order::<LoginOrder>(&envelope, Domain::Login, &key, ME, NOW);
            }
            _ => {}
        }
        return;
    }
    let domain = [Domain::Job, Domain::Cancel, Domain::Welcome, Domain::Login][(flags >> 1) as usize % 4];
    let sig = ed25519_dalek::Signer::sign(edge_key(), &[domain.prefix(), payload.as_bytes()].concat());
    let envelope = Envelope { payload, sig: shared::keys::encode(&sig.to_bytes()) };
    match domain {
        Domain::Job => run_order(open_order::<JobOrder>(&envelope, domain, &key, ME, NOW)),
        Domain::Cancel => {
            if let Ok(order) = open_order::<CancelOrder>(&envelope, domain, &key, ME, NOW) {
                assert_eq!((order.header.agent_id.as_str(), order.header.pool.as_str()), (AGENT, "default"));
            }
        }
        Domain::Login => {
            if let Ok(order) = open_order::<LoginOrder>(&envelope, domain, &key, ME, NOW) {
                assert_eq!((order.header.agent_id.as_str(), order.header.pool.as_str()), (AGENT, "default"));
            }
        }
        _ => {
            let _ = envelope.open::<Welcome>(domain, &key);
        }
    }
}

/// What the agent derives from an order that verified.
fn run_order(order: Result<JobOrder, shared::envelope::Refusal>) {
    let Ok(order) = order else { return };
    // Taken on its connection only, each number once and in order.
    if order.bind("fuzz-connection", 0).is_ok() {
        assert!(order.challenge == "fuzz-connection" && order.order_no >= 1);
    }
    assert!(order.bind("fuzz-connection", u64::MAX).is_err());
    let OrderHeader { agent_id, pool, expires_at, .. } = &order.header;
    assert_eq!((agent_id.as_str(), pool.as_str()), (AGENT, "default"));
    assert!(NOW <= expires_at.saturating_add(shared::envelope::CLOCK_SKEW_MS));
    let _ = claude::args(&order.spec, Some("model"), &claude::Session::of(&order.spec, || [7; 16]));
    if let Some(dir) = &order.spec.working_dir {
        let _ = shared::contract::checked_working_dir(dir);
    }
}

pub fn credentials(data: &[u8]) {
    if let Ok(c) = agent_core::credentials::parse(data) {
        assert!(!c.access_token.is_empty());
    }
}

/// A slot record file's region as the agent reads it back: whatever it decodes to
/// encodes back to a record that decodes the same, and no prefix of it (a write cut
/// short) decodes to a record.
pub fn slot_records(data: &[u8]) {
    use agent_core::record::{decode, finished, length, started, Region};
    let again = match decode(data) {
        Region::Started(r) => started(&r),
        Region::Finished(r) => finished(&r),
        Region::Empty | Region::Torn => return,
    };
    assert_eq!(decode(&again), decode(data));
    assert_eq!(length(&again), Some(again.len()));
    for cut in [again.len() - 1, again.len() / 2] {
        assert!(matches!(decode(&again[..cut]), Region::Torn | Region::Empty));
    }
}

/// Secrets the stream targets hide; none may come out whole.
const SECRETS: &[&str] = &["sk-ant-oat01-fuzzaccesstoken0123456789abcdef", "opaque-refresh-value-fedcba9876543210", "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="];

/// Claude's stdout, line by line, as the job runner handles it.
fn redactor() -> &'static Redactor {
    static REDACTOR: OnceLock<Redactor> = OnceLock::new();
    REDACTOR.get_or_init(|| Redactor::new(SECRETS.iter().map(|s| s.to_string())))
}

pub fn claude_stream(data: &[u8]) {
    let redactor = redactor();
    // In a session, so that lines naming sessions are looked at as in a job.
    let mut transcript = Transcript::of(claude::Session::New(claude::uuid_v4([7; 16])));
    let mut carry = agent_core::redact::Carry::default();
    for line in data.split(|b| *b == b'\n') {
        let event = match redactor.redact_line(&text(line), &mut carry) {
            Ok(value) => transcript.value(value),
            Err(raw) => transcript.text(&raw),
        };
        if let Some(event) = event {
            let shown = event.to_string();
            for s in SECRETS {
                assert!(!shown.contains(s), "{s} in {shown}");
            }
        }
    }
    let endings = [
        Ending::Exited(Some(0)),
        Ending::Exited(None),
        Ending::TimedOut { after_ms: 5 },
        Ending::Cancelled { reason: "fuzz".into() },
        Ending::AgentStopping,
        Ending::AgentStoppingUnstarted,
        Ending::SpawnFailed("fuzz".into()),
    ];
    // The session recorded is the agent's or none, whatever the lines named.
    let ours = claude::uuid_v4([7; 16]);
    assert!(matches!(transcript.recorded(), Ok(None) | Err(_)) || transcript.recorded() == Ok(Some(ours.as_str())));
    for ending in endings {
        let r = claude::result(&transcript, ending, &text(data), 1);
        assert!(r.session_id.is_none() || r.session_id.as_deref() == Some(ours.as_str()));
        assert!(r.output.len() <= claude::MAX_OUTPUT_BYTES + 100);
        assert_eq!(r.success, r.error_code.is_none());
    }
}

/// Arbitrary text, alone and as lines of a stream: no panic (masks land on character
/// boundaries), no secret out whole.
pub fn redaction(data: &[u8]) {
    let redactor = redactor();
    let input = text(data);
    let mut outputs = vec![redactor.redact(&input)];
    let mut carry = agent_core::redact::Carry::default();
    for line in input.split('\n') {
        outputs.push(match redactor.redact_line(line, &mut carry) {
            Ok(value) => value.to_string(),
            Err(raw) => raw,
        });
    }
    for out in &outputs {
        for s in SECRETS {
            assert!(!out.contains(s), "{s} in {out}");
        }
    }
}

/// The same bytes cut in two anywhere give the same events as in one piece.
pub fn sse(data: &[u8]) {
    let (cut, rest) = match data.split_first() {
        Some((c, rest)) => (*c as usize, rest),
        None => (0, data),
    };
    let whole = agent_core::sse::EventStream::default().push(rest);
    let at = if rest.is_empty() { 0 } else { cut % (rest.len() + 1) };
    let mut stream = agent_core::sse::EventStream::default();
    let mut parts = stream.push(&rest[..at]);
    parts.extend(stream.push(&rest[at..]));
    assert_eq!(whole, parts);
}

/// Settings as text: the edge's (NUL-separated values, in order), keys, the keyring and
/// `EDGE_URL`.
pub fn config(data: &[u8]) {
    const NAMES: &[&str] = &[
        "RUNNER_SECRET",
        "EDGE_SIGNING_KEY",
        "AGENT_PUBLIC_KEYS",
        "HEARTBEAT_INTERVAL_MS",
        "LOST_AFTER_MS",
        "MAX_TIMEOUT_MS",
        "MAX_BODY_BYTES",
        "JOB_RETENTION_MS",
        "QUEUE_TTL_MS",
        "MAX_QUEUED_JOBS",
        "TIMEOUT_MARGIN_MS",
        "SSE_KEEPALIVE_MS",
        "MAX_QUEUED_PER_CALLER",
        "MAX_PENDING_BYTES",
        "POOLS",
        "RUNNER_SECRET_GPU",
        "AGENT_PUBLIC_KEYS_GPU",
    ];
    let values: Vec<String> = data.split(|b| *b == 0).map(text).collect();
    let lookup = |name: &str| NAMES.iter().position(|n| *n == name).and_then(|i| values.get(i).cloned());
    if let Ok(cfg) = Config::from_lookup(lookup) {
        assert!(cfg.runner_secret.len() >= 16);
        assert_eq!(cfg.pool, "default");
        let _ = Edge::new(cfg, NOW).health(NOW);
    }
    if let Ok(pools) = edge_core::config::Pools::from_lookup(lookup) {
        for pool in pools.iter() {
            assert!(pool.runner_secret.len() >= 16 && shared::ids::plain_id(&pool.name, shared::ids::MAX_POOL_NAME));
        }
        // A pool exists exactly when it is listed (or the default one).
        for name in ["default", "gpu", "other"] {
            let found = Config::for_pool(lookup, name);
            assert_eq!(pools.get(name).is_some(), found.is_ok() || !matches!(found, Err(edge_core::config::ConfigError::UnknownPool(_))), "{name}");
        }
    }
    for v in &values {
        let _ = shared::keys::signing_key("fuzz", v);
        let _ = shared::keys::verifying_key("fuzz", v);
        let _ = shared::keys::Keyring::parse(v);
        for allow in [false, true] {
            if let Ok(url) = agent_core::edge_url::connect_url(v, allow) {
                assert!(url.ends_with("/agent/connect"));
                assert!(allow || url.starts_with("wss://") || url.starts_with("ws://"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The committed seeds of a target (`tests/fuzz/seeds/<target>/`).
    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        files.sort();
        files.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    #[test]
    fn every_target_has_seeds_and_takes_them() {
        for (name, run) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "tests/fuzz/seeds/{name}/ has no seeds");
            for seed in seeds {
                run(&seed);
            }
        }
    }

    /// The seeds of signed refusals and heartbeats read as what they stand for, and the
    /// heartbeats name the ready connection's challenge: else they would only fuzz the
    /// edge's refusal of them.
    #[test]
    fn the_signed_refusal_and_heartbeat_seeds_reach_the_edge_whole() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/agent_frames");
        let frames = |name: &str| -> (u8, Vec<Vec<u8>>) {
            let data = std::fs::read(dir.join(name)).unwrap();
            (data[0], data[1..].split(|b| *b == 0xff).map(<[u8]>::to_vec).collect())
        };
        let (flags, refusals) = frames("signed-rejection");
        assert_eq!(flags & 63, 1 | 2 | 4 | 32);
        let refusal: shared::protocol::Rejection = serde_json::from_slice(&refusals[0]).unwrap();
        assert_eq!(refusal.order_nonce, "j1:1");
        let (flags, beats) = frames("signed-heartbeats");
        assert_eq!(flags & 63, 1 | 2 | 4 | 8 | 32);
        let challenge = &ready_records().0.agent().expect("a ready session").challenge;
        for beat in beats {
            let beat: shared::protocol::Beat = serde_json::from_slice(&beat).unwrap();
            assert_eq!(&beat.challenge, challenge);
        }
    }

    /// The signed job seed reads as a job order of the current protocol (its connection,
    /// number and caller too): else it would only fuzz the agent's refusal of it.
    #[test]
    fn the_signed_job_seed_is_a_whole_job_order() {
        let data = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/edge_orders/signed-job")).unwrap();
        assert_eq!(data[0] & 1, 1, "signed by the edge's key");
        let order: JobOrder = serde_json::from_slice(&data[1..]).unwrap();
        assert_eq!(order.bind("fuzz-connection", 0), Ok(()));
        assert_eq!(order.caller, "ci");
        assert_eq!(shared::envelope::check_order(&order.header, ME, NOW), Ok(()));
    }

    /// The `http` seed whose secret is `spark`'s proof on the upgrade (made apart from the
    /// code, with Python's `cryptography`): the edge lets it in, so mutations of it reach
    /// every check of a proof, and the proof's bytes are what the README says.
    #[test]
    fn the_upgrade_proof_seed_lets_spark_in() {
        let data = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/http/upgrade-proof")).unwrap();
        let proof = String::from_utf8(data[2..].splitn(2, |b| *b == 0).nth(1).unwrap().to_vec()).unwrap();
        assert_eq!(edge_core::upgrade::check_upgrade(Some(&proof), &edge_config(), NOW), Ok(AGENT.to_string()));
        assert_eq!(shared::envelope::UpgradeProof::sign(agent_key(), "default", AGENT, NOW), proof);
    }

    /// A target and one of its seeds with bytes changed, cut or repeated: random inputs
    /// near the valid ones.
    fn mutated() -> impl Strategy<Value = (usize, Vec<u8>)> {
        (0..TARGETS.len()).prop_flat_map(|t| {
            let seeds = seeds(TARGETS[t].0);
            (Just(t), 0..seeds.len(), proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..4), 0..8)).prop_map(move |(t, i, edits)| {
                let mut bytes = seeds[i].clone();
                for (at, byte, kind) in edits {
                    let at = at as usize % (bytes.len() + 1);
                    match kind {
                        0 if at < bytes.len() => bytes[at] = byte,
                        1 => bytes.insert(at, byte),
                        2 => bytes.truncate(at),
                        _ => bytes.extend_from_within(at..),
                    }
                }
                (t, bytes)
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn targets_take_random_bytes(target in 0..TARGETS.len(), data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            (TARGETS[target].1)(&data);
        }

        #[test]
        fn targets_take_mutated_seeds((target, data) in mutated()) {
            (TARGETS[target].1)(&data);
        }
    }
}
