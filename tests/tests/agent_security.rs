//! The agent against an edge the test controls: it speaks the real protocol, then tries
//! to make the agent run what it must not — orders signed by another key, tampered,
//! addressed to another agent, expired, from the future, replayed — and checks each is
//! refused with a reason and never reaches `claude`; signed jobs naming hostile
//! repositories, which never reach git. Also: an edge that cannot prove its identity,
//! another protocol version, and a silent (half-open) edge.

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use harness::*;
use shared::envelope::{ChallengeProof, Domain, Envelope, OrderHeader, Tagged};
use shared::link::{Ephemeral, LinkKeys, MacKey, Transcript};
use shared::job::JobSpec;
use shared::keys::encode_verifying;
use shared::protocol::{AgentMessage, Beat, EdgeMessage, Hello, JobOrder, ProgressReport, Rejection, ResultReport, StartReport, Welcome, PROTOCOL_VERSION};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A scripted edge on a loopback port.
struct FakeEdge {
    listener: TcpListener,
    edge_key: SigningKey,
    agent_key: SigningKey,
    /// The last connection's challenge and the number of job orders made for it: an
    /// order is bound to both, as the edge's are.
    connection: std::sync::Mutex<(String, u64)>,
    /// The last connection's keys, agreed in its handshake.
    link: std::sync::Mutex<Option<LinkKeys>>,
    /// The heartbeat interval its welcome names: the agent leaves an edge silent for two.
    heartbeat_ms: u64,
    /// The agent's nonce on the last dial accepted (`X-Runner-Agent-Nonce`).
    dialled: std::sync::Mutex<Option<String>>,
    /// The `LOST_AFTER_MS` its welcome names (`None`: it names none).
    lost_after_ms: Option<u64>,
}

/// The heartbeat interval of a fake edge whose test is not about heartbeats. This edge
/// answers no heartbeat by itself, so with 500 ms the agent left it whenever the test sent
/// nothing for 1 s — while a job ran, while it waited for a file — which a loaded machine
/// exceeded.
const QUIET_HEARTBEAT_MS: u64 = 600_000;

impl FakeEdge {
    async fn new() -> FakeEdge {
        FakeEdge::with_heartbeat(QUIET_HEARTBEAT_MS).await
    }

    /// A fake edge whose welcome names `heartbeat_ms`: for the tests of heartbeats, of
    /// leaving a silent edge and of a send's bound (two intervals).
    async fn with_heartbeat(heartbeat_ms: u64) -> FakeEdge {
        FakeEdge {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            edge_key: random_key(),
            agent_key: random_key(),
            connection: Default::default(),
            link: Default::default(),
            heartbeat_ms,
            dialled: Default::default(),
            lost_after_ms: None,
        }
    }

    /// The edge's answer to heartbeat `beat` of the last connection, as the edge makes it.
    fn ack(&self, beat: &Beat) -> Message {
        Message::Text(EdgeMessage::heartbeat_ack(beat.seq, now(), &self.link().edge_to_agent).to_text().into())
    }

    /// The agent's next frame on `ws` (within a minute; the connection ending fails the
    /// test with the agent's log), a heartbeat answered as the edge answers it first.
    async fn next_answering_beats(&self, ws: &mut Ws, agent: &AgentProc) -> Result<AgentMessage, serde_json::Error> {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("a frame within 60 s");
        let Some(Ok(Message::Text(text))) = frame else { panic!("the connection ended: {frame:?}\n{}", agent.log()) };
        let message = serde_json::from_str::<AgentMessage>(&text);
        if let Ok(AgentMessage::Heartbeat { envelope }) = &message {
            let beat: Beat = envelope.open(Domain::Heartbeat, &self.link().agent_to_edge).unwrap();
            ws.send(self.ack(&beat)).await.unwrap();
        }
        message
    }

    /// Takes the agent's connections and closes them at once, for `wait`: no edge answers
    /// at its URL.
    async fn refuse_for(&self, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            loop {
                if let Ok((tcp, _)) = self.listener.accept().await {
                    drop(tcp);
                }
            }
        })
        .await;
    }

    /// The last connection's keys.
    fn link(&self) -> LinkKeys {
        self.link.lock().unwrap().clone().expect("a connection was welcomed")
    }

    fn url(&self) -> String {
        format!("ws://{}", self.listener.local_addr().unwrap())
    }

    fn start_agent(&self) -> AgentProc {
        self.start_agent_with(&[])
    }

    fn start_agent_with(&self, env: &[(&str, &str)]) -> AgentProc {
        let opts = AgentOpts {
            id: "spark",
            key: self.agent_key.clone(),
            edge_public: encode_verifying(&self.edge_key.verifying_key()),
            edge_ws: self.url(),
            claude_bin: bin("claude-standin"),
            extra_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            wrapper: Vec::new(),
        };
        AgentProc::start(opts)
    }

    async fn accept(&self) -> Ws {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(60), self.listener.accept()).await.expect("the agent dials").unwrap();
        let (ws, nonce) = accept_agent(tcp).await.unwrap();
        *self.dialled.lock().unwrap() = nonce;
        ws
    }

    /// The agent's nonce on the last dial accepted.
    fn dialled(&self) -> Option<String> {
        self.dialled.lock().unwrap().clone()
    }

    /// The challenge this edge sends on the last dial accepted: signed over its nonce.
    fn challenge(&self, protocol: u32, nonce: &str) -> EdgeMessage {
        challenge(&self.edge_key, protocol, nonce, self.dialled().as_deref(), "default")
    }

    /// A result as the agent MACed it on the last connection (the test fails if it did not).
    fn report(&self, envelope: &Tagged) -> ResultReport {
        envelope.open(Domain::Result, &self.link().agent_to_edge).expect("a result MACed by the agent on this connection")
    }

    /// The order a refusal names — signed by the agent, bound to the order's nonce — or
    /// `None` for a refusal that names none (`OrderRefused`).
    fn named(&self, m: &AgentMessage) -> Option<Rejection> {
        match m {
            AgentMessage::Rejected { envelope } => {
                let key = self.link().agent_to_edge;
                assert!(envelope.open::<Rejection>(Domain::Rejection, &random_link()).is_err());
                assert!(envelope.open::<Rejection>(Domain::Result, &key).is_err(), "a refusal is not a result");
                Some(envelope.open(Domain::Rejection, &key).expect("a refusal MACed by the agent"))
            }
            AgentMessage::OrderRefused { .. } => None,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Accepts a connection and runs the handshake; `welcome_key` signs the welcome.
    async fn handshake(&self, welcome_key: &SigningKey, protocol: u32) -> (Ws, Option<Hello>) {
        self.handshake_into(welcome_key, protocol, "default").await
    }

    /// The handshake, welcoming the agent into `pool`.
    async fn handshake_into(&self, welcome_key: &SigningKey, protocol: u32, pool: &str) -> (Ws, Option<Hello>) {
        self.handshake_via(protocol, pool, |welcome| Envelope::seal(Domain::Welcome, &welcome, welcome_key)).await
    }

    /// The handshake, with the welcome's envelope as `seal` makes it (signed, altered on
    /// the path…) from the welcome the edge would send.
    async fn handshake_via(&self, protocol: u32, pool: &str, seal: impl FnOnce(Welcome) -> Envelope) -> (Ws, Option<Hello>) {
        let edge_key = self.edge_key.clone();
        let prove = move |challenge: &str, agent_nonce: Option<&str>| {
            agent_nonce.map(|agent_nonce| ChallengeProof::sign(&edge_key, protocol, challenge, agent_nonce, "default"))
        };
        self.handshake_proving(protocol, pool, prove, seal).await
    }

    /// The handshake, with the challenge's proof as `prove` makes it from the challenge's
    /// nonce and the agent's nonce of this dial (the edge's signature, another key's, a
    /// signature played back from another connection, none).
    async fn handshake_proving(
        &self,
        protocol: u32,
        pool: &str,
        prove: impl Fn(&str, Option<&str>) -> Option<String>,
        seal: impl FnOnce(Welcome) -> Envelope,
    ) -> (Ws, Option<Hello>) {
        // Fresh per connection, as the edge's: heartbeats are bound to it.
        let nonce = shared::keys::encode(&random_key().to_bytes()[..24]);
        // A connection still queued from an agent process that is gone (restarted, say)
        // breaks at once: the live agent's is the next one.
        let mut ws = loop {
            let mut ws = self.accept().await;
            let proof = prove(&nonce, self.dialled().as_deref());
            let challenge = EdgeMessage::Challenge { protocol, nonce: nonce.clone(), edge_version: "fake".into(), server_time: now(), proof };
            if ws.send(Message::Text(challenge.to_text().into())).await.is_ok() {
                break ws;
            }
        };
        let hello = match recv(&mut ws).await {
            Some(AgentMessage::Hello { envelope, .. }) => envelope.open::<Hello>(Domain::Hello, &self.agent_key.verifying_key()).unwrap(),
            _ => return (ws, None),
        };
        assert_eq!(hello.challenge, nonce);
        let ephemeral = Ephemeral::new(runtime::entropy());
        let transcript = Transcript {
            challenge: &nonce,
            agent_nonce: &hello.agent_nonce,
            agent_public: &hello.ephemeral,
            edge_public: &ephemeral.public(),
            agent_id: &hello.agent_id,
            pool,
        };
        *self.link.lock().unwrap() = Some(LinkKeys::agree(&ephemeral, &hello.ephemeral, &transcript).expect("the agent's key is a usable X25519 key"));
        *self.connection.lock().unwrap() = (nonce, 0);
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION,
            agent_id: hello.agent_id.clone(),
            pool: pool.into(),
            agent_nonce: hello.agent_nonce.clone(),
            ephemeral: ephemeral.public(),
            session_id: "s1".into(),
            heartbeat_interval_ms: self.heartbeat_ms,
            lost_after_ms: self.lost_after_ms,
            given_up: Vec::new(),
            issued_at: now(),
        };
        let envelope = seal(welcome);
        ws.send(Message::Text(EdgeMessage::Welcome { envelope }.to_text().into())).await.unwrap();
        (ws, Some(hello))
    }
}

/// A key no connection has.
fn random_link() -> MacKey {
    MacKey::from_bytes(runtime::entropy())
}

/// A cancel of job `long` on `spark`, issued at `t` for a minute, sealed with `key`, with
/// `nonce`, bound to `challenge`'s connection if given.
fn cancel_of_long(key: &SigningKey, t: u64, nonce: &str, challenge: Option<&str>) -> String {
    let order = shared::protocol::CancelOrder {
        header: OrderHeader {
            job_id: "long".into(),
            agent_id: "spark".into(),
            pool: "default".into(),
            issued_at: t,
            expires_at: t + 60_000,
            nonce: nonce.into(),
        },
        challenge: challenge.map(str::to_string),
        reason: "stop".into(),
    };
    EdgeMessage::Cancel { envelope: Envelope::seal(Domain::Cancel, &order, key) }.to_text()
}

/// The next refusal the agent sends (`Rejected` or `OrderRefused`), past anything else.
async fn next_refusal(ws: &mut Ws) -> AgentMessage {
    loop {
        match recv(ws).await.expect("a refusal") {
            m @ (AgentMessage::Rejected { .. } | AgentMessage::OrderRefused { .. }) => return m,
            _ => continue,
        }
    }
}

/// The next agent message, skipping heartbeats; None when the socket ends or 60 s pass.
async fn recv(ws: &mut Ws) -> Option<AgentMessage> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.ok()??;
        match frame {
            Ok(Message::Text(t)) => match serde_json::from_str::<AgentMessage>(&t).ok()? {
                AgentMessage::Heartbeat { .. } => continue,
                m => return Some(m),
            },
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

fn spec(prompt: &str) -> JobSpec {
    JobSpec {
        prompt: prompt.into(),
        repo_url: None,
        branch: None,
        working_dir: None,
        timeout_ms: 10_000,
        allowed_tools: vec![],
        disallowed_tools: vec![],
        max_turns: None,
        model: None,
        permission_mode: None,
        append_system_prompt: None,
        session_id: None,
        include_diff: false,
        max_budget_usd: None,
        allow_stale: false,
        push_branch: None,
        commit_message: None,
    }
}

impl FakeEdge {
    /// The next job order on the last connection, as the edge makes them: bound to the
    /// connection's challenge, numbered in the order made.
    /// An order to agent `spark` from `caller`, resuming `session` when given.
    fn order_for(&self, caller: &str, session: Option<&str>, job_id: &str, issued_at: u64, prompt: &str) -> JobOrder {
        let mut o = self.order(job_id, "spark", issued_at, issued_at + 60_000, prompt);
        o.caller = caller.into();
        o.spec.session_id = session.map(String::from);
        o
    }

    fn order(&self, job_id: &str, agent: &str, issued_at: u64, expires_at: u64, prompt: &str) -> JobOrder {
        let mut connection = self.connection.lock().unwrap();
        connection.1 += 1;
        JobOrder { challenge: connection.0.clone(), order_no: connection.1, ..order(job_id, agent, issued_at, expires_at, prompt) }
    }
}

/// A job order bound to no connection (its challenge empty, numbered 0).
fn order(job_id: &str, agent: &str, issued_at: u64, expires_at: u64, prompt: &str) -> JobOrder {
    JobOrder {
        challenge: String::new(),
        order_no: 0,
        header: OrderHeader {
            job_id: job_id.into(),
            agent_id: agent.into(),
            pool: "default".into(),
            issued_at,
            expires_at,
            nonce: format!("{job_id}:1"),
        },
        caller: "default".into(),
        caller_proven: Some(false),
        spec: spec(prompt),
    }
}

async fn send_job(ws: &mut Ws, envelope: Envelope) {
    ws.send(Message::Text(EdgeMessage::Job { envelope }.to_text().into())).await.unwrap();
}

/// Sends a job and returns the agent's answer to it (Rejected or Accepted…Result).
async fn answer(ws: &mut Ws, envelope: Envelope) -> AgentMessage {
    send_job(ws, envelope).await;
    loop {
        match recv(ws).await.expect("the agent answers") {
            // Credits, progress, results and mirror reports of earlier jobs are not the
            // answer to this one.
            AgentMessage::Credit { .. } | AgentMessage::Started { .. } | AgentMessage::Event { .. } | AgentMessage::Result { .. } | AgentMessage::Mirrors { .. } => continue,
            m => return m,
        }
    }
}

/// A refusal's reason (read, not verified: [`FakeEdge::named`] verifies).
fn rejected(m: &AgentMessage) -> String {
    match m {
        AgentMessage::Rejected { envelope } => serde_json::from_str::<Rejection>(&envelope.payload).expect("a refusal").reason,
        AgentMessage::OrderRefused { reason } => reason.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_misdirected_expired_and_replayed_jobs_never_run() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();

    // Signed by a key that is not the edge's. The refusal names no job: the id inside is
    // the forger's word, and the edge settles a job its agent refuses by name.
    let forged = Envelope::seal(Domain::Job, &edge.order("forged", "spark", t, t + 60_000, "@forged"), &random_key());
    let refusal = answer(&mut ws, forged).await;
    assert!(rejected(&refusal).contains("signature"));
    assert!(edge.named(&refusal).is_none(), "{refusal:?}");

    // The edge's signature, but the payload changed after signing.
    let mut tampered = Envelope::seal(Domain::Job, &edge.order("tampered", "spark", t, t + 60_000, "harmless"), &edge.edge_key);
    tampered.payload = tampered.payload.replace("harmless", "@tampered");
    assert!(rejected(&answer(&mut ws, tampered).await).contains("signature"));

    // A signature made for another kind of message (a cancel) presented as a job.
    let cross = Envelope::seal(Domain::Cancel, &edge.order("cross", "spark", t, t + 60_000, "@cross"), &edge.edge_key);
    assert!(rejected(&answer(&mut ws, cross).await).contains("signature"));

    // For another agent: signed by the edge, so the id is the edge's own and is named.
    let other = Envelope::seal(Domain::Job, &edge.order("other", "laptop", t, t + 60_000, "@other"), &edge.edge_key);
    let refusal = answer(&mut ws, other).await;
    assert!(rejected(&refusal).contains("laptop"));
    let named = edge.named(&refusal).expect("named, signed");
    assert_eq!((named.job_id.as_str(), named.order_nonce.as_str(), named.retry), ("other", "other:1", false));

    // From another pool of the same edge (signed with the edge's key all the same).
    let mut elsewhere = edge.order("elsewhere", "spark", t, t + 60_000, "@elsewhere");
    elsewhere.header.pool = "gpu".into();
    let elsewhere = Envelope::seal(Domain::Job, &elsewhere, &edge.edge_key);
    assert!(rejected(&answer(&mut ws, elsewhere).await).contains("pool `gpu`"));

    // Expired beyond the 60 s skew allowance.
    let expired = Envelope::seal(Domain::Job, &edge.order("expired", "spark", t - 200_000, t - 130_000, "@expired"), &edge.edge_key);
    assert!(rejected(&answer(&mut ws, expired).await).contains("expired"));

    // Issued in the future beyond the allowance.
    let future = Envelope::seal(Domain::Job, &edge.order("future", "spark", t + 120_000, t + 180_000, "@future"), &edge.edge_key);
    assert!(rejected(&answer(&mut ws, future).await).contains("future"));

    // Not even an envelope.
    let junk = Envelope { payload: "{}".into(), sig: "not base64!".into() };
    assert!(!rejected(&answer(&mut ws, junk).await).is_empty());

    // A good job runs, and its progress and result come signed by the agent's key, bound
    // to the order they answer.
    let good = Envelope::seal(Domain::Job, &edge.order("good", "spark", t, t + 60_000, "legit"), &edge.edge_key);
    assert!(matches!(answer(&mut ws, good.clone()).await, AgentMessage::Accepted { .. }));
    let agent_key = edge.link().agent_to_edge;
    let mut progress = 0;
    // Its start first — once its started record is durable, before anything Claude printed —
    // MACed and bound to the order: until the edge hears it, a job the agent no longer
    // names after a restart is sent again rather than ended lost.
    let mut started = false;
    loop {
        match recv(&mut ws).await.expect("a result") {
            AgentMessage::Started { envelope } => {
                assert!(envelope.open::<StartReport>(Domain::Started, &edge.link().edge_to_agent).is_err(), "the edge's direction");
                let report: StartReport = envelope.open(Domain::Started, &agent_key).expect("MACed by the agent");
                assert_eq!((report.job_id.as_str(), report.order_nonce.as_str()), ("good", "good:1"));
                assert!(!started && progress == 0, "once, before its progress");
                started = true;
            }
            AgentMessage::Event { envelope } => {
                assert!(started, "its start before its progress");
                let report: ProgressReport = envelope.open(Domain::Progress, &agent_key).expect("MACed by the agent");
                assert!(envelope.open::<ProgressReport>(Domain::Progress, &edge.link().edge_to_agent).is_err(), "the edge's direction");
                assert_eq!((report.job_id.as_str(), report.order_nonce.as_str()), ("good", "good:1"));
                assert_eq!(report.check(), Ok(()), "a batch the edge takes");
                progress += report.events.len();
            }
            AgentMessage::Result { envelope } => {
                assert!(envelope.open::<ResultReport>(Domain::Result, &random_link()).is_err());
                let report: ResultReport = envelope.open(Domain::Result, &agent_key).expect("MACed by the agent");
                assert_eq!((report.job_id.as_str(), report.order_nonce.as_str()), ("good", "good:1"));
                assert!(report.result.success);
                break;
            }
            _ => continue,
        }
    }
    assert!(progress >= 3, "init, the answer, the result line");
    // …once: the same envelope again is a replay, which names no job (its first copy is
    // the one that counts; a replay must not settle it).
    let refusal = answer(&mut ws, good.clone()).await;
    assert!(rejected(&refusal).contains("replay"));
    assert!(edge.named(&refusal).is_none(), "{refusal:?}");

    let runs = agent.claude_runs();
    assert_eq!(runs.len(), 1, "only the legitimate job ran: {runs:?}");
    assert_eq!(runs[0]["prompt"], "legit");
    drop(ws);

    // An order from before a restart is refused too (it was another connection's; the
    // agent also remembers nonces across a restart).
    let mut agent = agent;
    agent.restart();
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(rejected(&answer(&mut ws, good).await).contains("replay"));
    assert_eq!(agent.claude_runs().len(), 1);
}

/// An edge that signs whatever it is given (a bug, or an edge in the wrong hands) cannot
/// make the agent fetch from a local path, another scheme or a host it does not allow, run
/// git options, or leave the checkout: the agent checks the repository fields again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_jobs_with_hostile_repositories_never_reach_git_or_claude() {
    let git = harness::git_server::GitServer::start(None);
    git.seed("demo", &[("README.md", b"# demo\n")]);
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent_with(&[("ALLOWED_REPO_HOSTS", &git.host()), ("SSL_CERT_FILE", &git.cert_file.display().to_string())]);
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    let marker = agent.data.path().join("pwned");
    let cases = [
        ("file", format!("file://{}", agent.data.path().display()), None),
        ("path", agent.data.path().display().to_string(), None),
        ("option", format!("--upload-pack=touch {}", marker.display()), None),
        ("ext", format!("ext::sh -c touch% {}", marker.display()), None),
        ("ssh", "git@github.com:a/b.git".to_string(), None),
        ("creds", "https://user:secret@github.com/a/b".to_string(), None),
        ("host", "https://git.evil.example/a/b.git".to_string(), None),
        ("workdir", git.url("demo"), Some("../../..")),
        ("absolute", git.url("demo"), Some("/etc")),
    ];
    for (id, url, working_dir) in cases {
        let mut o = edge.order(id, "spark", t, t + 60_000, "@write=pwned");
        o.spec.repo_url = Some(url.clone());
        o.spec.working_dir = working_dir.map(String::from);
        let envelope = Envelope::seal(Domain::Job, &o, &edge.edge_key);
        assert!(matches!(answer(&mut ws, envelope).await, AgentMessage::Accepted { .. }), "{id}");
        let result = loop {
            match recv(&mut ws).await.expect("a result") {
                AgentMessage::Result { envelope } => {
                    let report = edge.report(&envelope);
                    if report.job_id == id {
                        break report.result;
                    }
                }
                _ => continue,
            }
        };
        assert!(!result.success, "{id}: {result:?}");
        assert_eq!(result.error_code, Some(shared::contract::ErrorCode::RepoError), "{id}: {result:?}");
        let error = result.error.unwrap_or_default();
        assert!(error.contains("repo_url") || error.contains("ALLOWED_REPO_HOSTS") || error.contains("working_dir"), "{id}: {error}");
    }
    assert!(agent.claude_runs().is_empty(), "Claude never ran");
    assert!(!marker.exists(), "no command ran");
    let mirrors: Vec<String> = std::fs::read_dir(agent.data.path().join("data/repos")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(mirrors, [format!("127.0.0.1@{}+demo.git.git", git.port)], "only the allowed repository was fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_edge_can_cancel_a_job() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let t = now();
    let job = Envelope::seal(Domain::Job, &edge.order("long", "spark", t, t + 60_000, "@sleep=400 long"), &edge.edge_key);
    assert!(matches!(answer(&mut ws, job).await, AgentMessage::Accepted { .. }));
    let cancel = |key: &SigningKey, nonce: &str| cancel_of_long(key, t, nonce, None);
    // A cancel signed by someone else is refused, and the refusal names no job: a garbage
    // cancel must not fail the job it names.
    ws.send(Message::Text(cancel(&random_key(), "c1").into())).await.unwrap();
    let refusal = next_refusal(&mut ws).await;
    assert!(rejected(&refusal).contains("signature"), "{refusal:?}");
    assert!(edge.named(&refusal).is_none(), "a refusal of an unverified cancel named a job");
    // The job runs to its end untouched.
    let result = loop {
        match recv(&mut ws).await.expect("the result") {
            AgentMessage::Result { envelope } => break edge.report(&envelope).result,
            _ => continue,
        }
    };
    assert!(result.success, "{result:?}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_cannot_prove_its_identity_gets_no_service() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (mut ws, _) = edge.handshake(&random_key(), PROTOCOL_VERSION).await;
    // The agent closes instead of granting credit.
    assert!(recv(&mut ws).await.is_none(), "the agent must hang up");
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("EDGE_PUBLIC_KEY")).await, "{}", agent.log());
    // Even a correctly signed job sent now goes nowhere.
    let t = now();
    let job = Envelope::seal(Domain::Job, &edge.order("j", "spark", t, t + 60_000, "x"), &edge.edge_key);
    let _ = ws.send(Message::Text(EdgeMessage::Job { envelope: job }.to_text().into())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(agent.claude_runs().is_empty());
}

/// The edge's X25519 key in the welcome swapped on the path for one whose secret the path
/// knows: the edge's signature breaks, and the agent hangs up. Signed by the edge but a
/// low-order point (no shared secret): refused too. Either way no key is agreed, and no
/// job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_whose_connection_key_was_swapped_or_gives_no_secret_is_refused() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let mallory = Ephemeral::new(runtime::entropy()).public();
    let (mut ws, hello) = edge
        .handshake_via(PROTOCOL_VERSION, "default", |welcome| {
            let envelope = Envelope::seal(Domain::Welcome, &welcome, &edge.edge_key);
            assert!(envelope.payload.contains(&welcome.ephemeral));
            Envelope { payload: envelope.payload.replace(&welcome.ephemeral, &mallory), ..envelope }
        })
        .await;
    assert!(hello.is_some());
    assert!(recv(&mut ws).await.is_none(), "the agent must hang up");
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("the edge could not prove its identity")).await, "{}", agent.log());
    // The agent refused the edge, not the other way round: the operator is pointed at
    // this agent's EDGE_PUBLIC_KEY, from the keygen run that made the edge's key.
    let log = agent.log();
    assert!(log.contains("this agent refused the edge") && log.contains("keygen") && !log.contains("the edge refused this agent"), "{log}");
    drop(ws);
    let low_order = shared::keys::encode(&[0; 32]);
    let (mut ws, hello) = edge
        .handshake_via(PROTOCOL_VERSION, "default", |welcome| Envelope::seal(Domain::Welcome, &Welcome { ephemeral: low_order, ..welcome }, &edge.edge_key))
        .await;
    assert!(hello.is_some());
    assert!(recv(&mut ws).await.is_none(), "the agent must hang up");
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("connection key is refused")).await, "{}", agent.log());
    let t = now();
    let job = Envelope::seal(Domain::Job, &edge.order("j", "spark", t, t + 60_000, "x"), &edge.edge_key);
    let _ = ws.send(Message::Text(EdgeMessage::Job { envelope: job }.to_text().into())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(agent.claude_runs().is_empty());
}

/// An agent of the default pool welcomed into another pool of the same edge (as when the
/// same agent id and key are listed in two pools) hangs up: its orders would be another
/// pool's callers' work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_welcomed_into_another_pool_hangs_up() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake_into(&edge.edge_key, PROTOCOL_VERSION, "other").await;
    assert!(hello.is_some());
    assert!(recv(&mut ws).await.is_none(), "the agent must hang up");
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("EDGE_POOL")).await, "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("this agent refused the edge") && !log.contains("the edge refused this agent"), "{log}");
    let t = now();
    let job = Envelope::seal(Domain::Job, &edge.order("j", "spark", t, t + 60_000, "x"), &edge.edge_key);
    let _ = ws.send(Message::Text(EdgeMessage::Job { envelope: job }.to_text().into())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(agent.claude_runs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_is_refused_by_name() {
    // 11: an edge from before its welcome named the jobs it gave up (this agent would start
    // a job that edge had ended `lost`).
    assert_eq!(PROTOCOL_VERSION, 12);
    for other in [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let edge = FakeEdge::new().await;
        let agent = edge.start_agent();
        let (_ws, hello) = edge.handshake(&edge.edge_key, other).await;
        assert!(hello.is_none(), "no hello to an edge of version {other}");
        let named = format!("speaks v{other}, this agent speaks v{PROTOCOL_VERSION}");
        assert!(eventually(Duration::from_secs(60), || agent.log().contains(&named)).await, "{}", agent.log());
    }
}

/// Whoever answers at EDGE_URL before proving itself the edge (a man in the middle, a
/// hijacked name) chooses the words of its challenge, goodbye and close frames: none of them
/// may start a line of the agent's log (forging an entry) or reach it unbounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unproven_edges_words_cannot_forge_the_agents_log_lines() {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    const FORGED: &str = "\n2026-01-01T00:00:00.000000Z ERROR claude_runner: FORGED";
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    // A challenge of another protocol version, its version a forged line and a megabyte.
    let mut ws = edge.accept().await;
    let edge_version = format!("9.9{FORGED}{}", "x".repeat(1 << 20));
    let challenge = EdgeMessage::Challenge { protocol: PROTOCOL_VERSION + 1, nonce: "n".into(), edge_version, server_time: now(), proof: None };
    ws.send(Message::Text(challenge.to_text().into())).await.unwrap();
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("protocol version mismatch")).await, "{}", agent.log());
    drop(ws);
    // A goodbye instead of a welcome.
    let mut ws = edge.accept().await;
    let challenge = edge.challenge(PROTOCOL_VERSION, "n");
    ws.send(Message::Text(challenge.to_text().into())).await.unwrap();
    assert!(matches!(recv(&mut ws).await, Some(AgentMessage::Hello { .. })));
    let goodbye = EdgeMessage::Goodbye { code: 4001, reason: format!("go away{FORGED}") };
    ws.send(Message::Text(goodbye.to_text().into())).await.unwrap();
    drop(ws);
    // A close frame instead of a challenge.
    let mut ws = edge.accept().await;
    let frame = CloseFrame { code: CloseCode::from(4001), reason: "bye\nERROR FORGED".into() };
    let _ = ws.close(Some(frame)).await;
    drop(ws);
    let _ws = edge.accept().await;
    let log = agent.log();
    assert!(log.matches("go away").count() >= 1 && log.contains("bye"), "{log}");
    for line in log.lines() {
        let shown = shared::text::truncate(line, 300);
        assert!(!line.contains("FORGED") || line.contains(" WARN ") || line.contains(" ERROR claude_runner::connection"), "a line the edge wrote: {shown}");
        assert!(!line.starts_with("2026-01-01") && !line.starts_with("ERROR FORGED"), "a line the edge wrote: {shown}");
        assert!(line.len() < 16 * 1024, "an unproven edge's words logged unbounded ({} bytes)", line.len());
    }
}

/// Every text frame the agent sends on `ws` until it closes it (or 60 s pass).
async fn all_said(ws: &mut Ws) -> Vec<String> {
    let mut said = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
        match frame {
            Message::Text(t) => said.push(t.to_string()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    said
}

/// Whoever answers at EDGE_URL without the edge's key — a wrong URL, a hop that ends TLS,
/// a hijacked name with a valid certificate — gets the agent's connection but never its
/// hello: not its labels, its login, the ids of the jobs it holds, its instance. Its
/// challenge, unsigned (an edge of before, or anyone) or signed with another key, ends the
/// connection with a line saying what to check, and the agent dials again (with its
/// backoff). The real edge then hears all of it. Before, the hello went to whoever sent a
/// challenge, and the edge proved its key only in the welcome that answered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoever_answers_without_the_edges_key_hears_no_hello() {
    let edge = FakeEdge::new().await;
    let mut agent = edge.start_agent_with(&[("AGENT_LABELS", "secret-label=yes")]);
    // A result held on the agent's disk, unacknowledged: its job id is named in hellos.
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let t = now();
    let job = Envelope::seal(Domain::Job, &edge.order("held-job", "spark", t, t + 60_000, "x"), &edge.edge_key);
    send_job(&mut ws, job).await;
    loop {
        if let AgentMessage::Result { .. } = recv(&mut ws).await.expect("the job's result") {
            break;
        }
    }
    drop(ws);
    let impostor = random_key();
    let cases: [(&str, Box<dyn Fn(&str, Option<&str>) -> Option<String>>); 2] = [
        ("upgrade the edge", Box::new(|_: &str, _: Option<&str>| None)),
        (
            "EDGE_PUBLIC_KEY",
            Box::new(|c: &str, n: Option<&str>| n.map(|n| ChallengeProof::sign(&impostor, PROTOCOL_VERSION, c, n, "default"))),
        ),
    ];
    for (said_in_log, prove) in cases {
        let mut ws = edge.accept().await;
        let agent_nonce = edge.dialled().expect("the agent sends its nonce on the upgrade");
        let challenge = EdgeMessage::Challenge {
            protocol: PROTOCOL_VERSION,
            nonce: "challenge-nonce-0123456789".into(),
            edge_version: "impostor".into(),
            server_time: now(),
            proof: prove("challenge-nonce-0123456789", Some(&agent_nonce)),
        };
        ws.send(Message::Text(challenge.to_text().into())).await.unwrap();
        let said = all_said(&mut ws).await;
        assert!(said.is_empty(), "the agent told whoever answered: {said:?}");
        assert!(eventually(Duration::from_secs(60), || agent.log().contains(said_in_log)).await, "{said_in_log}: {}", agent.log());
    }
    let log = agent.log();
    assert!(log.contains("this agent refused the edge") && log.contains("EDGE_URL") && log.contains("was sent nothing"), "{log}");
    // The real edge, proving its key, hears the hello — and what it would have leaked.
    let (_ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let hello = hello.expect("a hello to the edge that proved its key");
    assert!(hello.finished.contains(&"held-job".to_string()), "{hello:?}");
    assert!(serde_json::to_string(&hello.labels).unwrap().contains("secret-label"), "{hello:?}");
    agent.stop();
}

/// A challenge signed by the edge for an earlier connection — played back by whoever
/// recorded it — proves nothing on this one: the agent's nonce is fresh on each dial, and
/// the signature covers it. The agent sends nothing and hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_signed_for_another_connection_is_refused() {
    let edge = FakeEdge::new().await;
    let mut agent = edge.start_agent();
    let recorded = std::sync::Mutex::new(None);
    let edge_key = edge.edge_key.clone();
    let prove = |challenge: &str, agent_nonce: Option<&str>| {
        let proof = agent_nonce.map(|n| ChallengeProof::sign(&edge_key, PROTOCOL_VERSION, challenge, n, "default"));
        *recorded.lock().unwrap() = Some((challenge.to_string(), proof.clone()));
        proof
    };
    let (ws, hello) = edge.handshake_proving(PROTOCOL_VERSION, "default", prove, |w| Envelope::seal(Domain::Welcome, &w, &edge.edge_key)).await;
    assert!(hello.is_some());
    drop(ws);
    let (nonce, proof) = recorded.lock().unwrap().clone().unwrap();
    assert!(proof.is_some(), "the agent sent a nonce");
    let mut ws = edge.accept().await;
    let replayed = EdgeMessage::Challenge { protocol: PROTOCOL_VERSION, nonce, edge_version: "fake".into(), server_time: now(), proof };
    ws.send(Message::Text(replayed.to_text().into())).await.unwrap();
    let said = all_said(&mut ws).await;
    assert!(said.is_empty(), "the agent answered a played-back challenge: {said:?}");
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("played back")).await, "{}", agent.log());
    // The edge, signing this dial's nonce, is answered.
    let (_ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some());
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_edge_is_left_within_two_heartbeats_and_redialed() {
    let edge = FakeEdge::with_heartbeat(500).await;
    let agent = edge.start_agent();
    let (ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    // Keep the TCP connection open but never answer: a half-open edge (heartbeat 500 ms).
    let started = std::time::Instant::now();
    let (_ws2, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "left too early ({took:?}): the edge was only quiet, not gone");
    assert!(agent.log().contains("two heartbeat intervals"), "{}", agent.log());
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_waits_on_disk_until_the_edge_acknowledges_it() {
    let edge = FakeEdge::new().await;
    let mut agent = edge.start_agent();
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let t = now();
    let job = Envelope::seal(Domain::Job, &edge.order("keep", "spark", t, t + 60_000, "remember me"), &edge.edge_key);
    send_job(&mut ws, job).await;
    let first = loop {
        if let Some(AgentMessage::Result { envelope }) = recv(&mut ws).await {
            break envelope;
        }
    };
    let first_link = edge.link();
    // No acknowledgement; the connection drops. The next hello names the result and the
    // agent sends it again, MACed with the new connection's key.
    drop(ws);
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert_eq!(hello.unwrap().finished, vec!["keep".to_string()]);
    let (again, again_frame) = loop {
        match recv(&mut ws).await.expect("the result again") {
            AgentMessage::Result { envelope } => break (edge.report(&envelope), envelope),
            _ => continue,
        }
    };
    assert_eq!(again_frame.payload, first.payload, "the same result, kept as sent");
    assert_ne!(again_frame.mac, first.mac, "MACed anew");
    // The first connection's frame played back on this one fails its MAC.
    assert!(first.open::<ResultReport>(Domain::Result, &edge.link().agent_to_edge).is_err(), "another connection's MAC");
    assert!(first.open::<ResultReport>(Domain::Result, &first_link.agent_to_edge).is_ok());
    assert_eq!((again.job_id.as_str(), again.order_nonce.as_str()), ("keep", "keep:1"));
    assert_eq!(again.result.output, "stand-in answer to: remember me");
    // An acknowledgement made up on the path (the edge never got the result): plain, MACed
    // with another key, with the earlier connection's key, or with the agent's own
    // direction's key (one of its frames sent back). The result stays and goes out again
    // after the next reconnect.
    let data = agent.data.path().join("data");
    let kept = || slot_record_names(&data, 0, "keep") == (true, true);
    assert!(kept(), "the result is in its slot's record");
    ws.send(Message::Text(r#"{"type":"result_ack","job_id":"keep"}"#.into())).await.unwrap();
    for key in [random_link(), first_link.edge_to_agent.clone(), edge.link().agent_to_edge] {
        ws.send(Message::Text(EdgeMessage::result_ack("keep", "spark", &key).to_text().into())).await.unwrap();
    }
    let refused = || agent.log().matches("acknowledgement not MACed by the edge on this connection").count();
    assert!(eventually(Duration::from_secs(60), || refused() == 3 || !kept()).await, "{}", agent.log());
    assert!(kept(), "a forged acknowledgement made the agent drop its result");
    ws.send(Message::Text(EdgeMessage::result_ack("keep", "spark", &edge.link().edge_to_agent).to_text().into())).await.unwrap();
    // The edge's own acknowledgement clears the record's "started" region: nothing is
    // owed, and a restarted agent names nothing.
    assert!(eventually(Duration::from_secs(60), || !slot_record_names(&data, 0, "keep").0).await);
    agent.kill();
    agent.restart();
    drop(ws);
    let (_ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.unwrap().finished.is_empty(), "an acknowledged result came back after a restart");
    assert_eq!(agent.claude_runs().len(), 1, "ran once");
}

/// Issue 11's slot records: the edge has not acknowledged a result when it sends the next
/// job, and the agent's one slot record must take the new job: the unacknowledged result
/// moves to a spool file of its own first. The agent is then killed while the new job
/// runs: after the restart it names both, sends the first one's result and reports the
/// second lost — neither is lost, neither runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_moved_out_of_its_slot_survives_a_crash_during_the_next_job() {
    let edge = FakeEdge::new().await;
    // The spool's debug line says when the first result is held in its slot (in memory as
    // well as on disk): a job sent before that takes a record file of its own instead.
    let mut agent = edge.start_agent_with(&[("RUST_LOG", "info,claude_runner::spool=debug")]);
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let t = now();
    send_job(&mut ws, Envelope::seal(Domain::Job, &edge.order("first", "spark", t, t + 60_000, "unacknowledged"), &edge.edge_key)).await;
    while !matches!(recv(&mut ws).await.expect("the first result"), AgentMessage::Result { .. }) {}
    let data = agent.data.path().join("data");
    assert!(eventually(Duration::from_secs(60), || slot_record_names(&data, 0, "first") == (true, true)).await, "{}", agent.log());
    let held = || agent.log().contains("result kept in its slot record until the edge acknowledges it");
    assert!(eventually(Duration::from_secs(60), held).await, "{}", agent.log());
    send_job(&mut ws, Envelope::seal(Domain::Job, &edge.order("second", "spark", t, t + 60_000, "@sleep=60000 cut short"), &edge.edge_key)).await;
    assert!(eventually(Duration::from_secs(60), || agent.claude_runs().len() == 2).await, "{}", agent.log());
    assert!(data.join("spool/first.json").exists(), "moved out of the slot\n{}", agent.log());
    assert_eq!(slot_record_names(&data, 0, "second"), (true, false));
    agent.kill();
    drop(ws);
    agent.restart();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let mut named = hello.unwrap().finished;
    named.sort();
    assert_eq!(named, vec!["first".to_string(), "second".to_string()]);
    let mut results = std::collections::BTreeMap::new();
    while results.len() < 2 {
        if let AgentMessage::Result { envelope } = recv(&mut ws).await.expect("the kept results") {
            let report = edge.report(&envelope);
            results.insert(report.job_id.clone(), report);
        }
    }
    assert_eq!(results["first"].result.output, "stand-in answer to: unacknowledged");
    assert_eq!(results["second"].order_nonce, "second:1");
    assert_eq!(results["second"].result.error_code, Some(shared::contract::ErrorCode::RunnerLost));
    assert_eq!(agent.claude_runs().len(), 2, "each ran once");
}

/// A link that goes half-open right after the welcome, while the agent is sending the
/// results it kept: every send is bounded, so the agent gives the link up and dials again
/// instead of hanging until the kernel gives up (~15 min). A send is given up once the
/// link takes no byte for two intervals, whatever its size: the bound grew with the frame
/// (two intervals and its size at 16 KiB/s, 65 s for each 1 MiB result here), and the
/// agent dialled again only after the minute this waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_link_right_after_the_welcome_does_not_hang_the_agent() {
    let edge = FakeEdge::with_heartbeat(500).await;
    let agent = edge.start_agent();
    // Results waiting in the spool: far more than the socket buffers hold.
    let spool = agent.data.path().join("data/spool");
    std::fs::create_dir_all(&spool).unwrap();
    let big = shared::job::JobResult { success: true, output: "x".repeat(1024 * 1024), ..Default::default() };
    for i in 0..32 {
        // Kept as a protocol-8 agent kept them: signed envelopes, bound to their orders.
        // This agent sends their payloads, MACed with each connection's key.
        let id = format!("kept-{i:02}");
        let report = ResultReport { job_id: id.clone(), order_nonce: format!("{id}:1"), result: big.clone() };
        let envelope = Envelope::seal(Domain::Result, &report, &edge.agent_key);
        std::fs::write(spool.join(format!("{id}.json")), serde_json::to_vec(&envelope).unwrap()).unwrap();
    }
    // The welcome goes out, then this edge never reads again.
    let (_stuck, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert_eq!(hello.unwrap().finished.len(), 32);
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "the agent dialled again: {}", agent.log());
    assert!(agent.log().contains("connection is stuck"), "{}", agent.log());
    // On a link that works, the results come through.
    let mut results = 0;
    while results < 32 {
        match recv(&mut ws).await.expect("the kept results") {
            AgentMessage::Result { envelope } => {
                assert_eq!(edge.report(&envelope).result.output.len(), 1024 * 1024);
                results += 1;
            }
            _ => continue,
        }
    }
}

/// An order for a job the agent already has is answered, not dropped: the edge learns at
/// once that it runs (or how it ended), and it never starts twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_for_a_job_already_here_is_answered_and_never_runs_twice() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let t = now();
    let attempt = |n: u32| {
        let mut o = edge.order("twice", "spark", t, t + 60_000, "@sleep=300 once");
        o.header.nonce = format!("twice:{n}");
        Envelope::seal(Domain::Job, &o, &edge.edge_key)
    };
    assert!(matches!(answer(&mut ws, attempt(1)).await, AgentMessage::Accepted { .. }));
    // Sent again while it runs: it runs here.
    assert!(matches!(answer(&mut ws, attempt(2)).await, AgentMessage::Accepted { job_id } if job_id == "twice"));
    let first = loop {
        match recv(&mut ws).await.expect("the result") {
            AgentMessage::Result { envelope } => break edge.report(&envelope),
            _ => continue,
        }
    };
    // Sent again once it ended (its result not yet acknowledged): the result again.
    send_job(&mut ws, attempt(3)).await;
    let again = loop {
        match recv(&mut ws).await.expect("the result again") {
            AgentMessage::Result { envelope } => break edge.report(&envelope),
            AgentMessage::Accepted { .. } => panic!("started again"),
            _ => continue,
        }
    };
    // The same signed result, bound to the order that ran it.
    assert_eq!(again, first);
    assert_eq!(again.order_nonce, "twice:1");
    assert_eq!(agent.claude_runs().len(), 1, "ran once");
}

/// Protocol 6: a heartbeat settles jobs at the edge, and a refusal ends or requeues one,
/// so both are signed by the agent; each heartbeat names its connection's challenge and a
/// number that starts at 1 on each connection and only grows (the edge takes none older
/// than the last); a refusal of an order it could tie to a job names that order's nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_refusals_are_signed_bound_and_numbered() {
    let edge = FakeEdge::with_heartbeat(500).await;
    let agent = edge.start_agent();
    let mut challenges = Vec::new();
    for connection in 0..2 {
        let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
        let hello = hello.unwrap_or_else(|| panic!("connection {connection}: {}", agent.log()));
        if connection == 0 {
            // One slot (MAX_CONCURRENT_JOBS 1), taken: the next order is refused for the
            // moment, signed and bound to its own nonce.
            let t = now();
            let long = Envelope::seal(Domain::Job, &edge.order("long", "spark", t, t + 60_000, "@sleep=1500 long"), &edge.edge_key);
            assert!(matches!(answer(&mut ws, long).await, AgentMessage::Accepted { .. }));
            let extra = Envelope::seal(Domain::Job, &edge.order("extra", "spark", t, t + 60_000, "extra"), &edge.edge_key);
            let refusal = answer(&mut ws, extra).await;
            let named = edge.named(&refusal).expect("a refusal of a verified order is signed and named");
            assert_eq!((named.job_id.as_str(), named.order_nonce.as_str(), named.retry), ("extra", "extra:1", true), "{}", named.reason);
        }
        let mut seqs = Vec::new();
        while seqs.len() < 3 {
            let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("a heartbeat within 60 s");
            let Some(Ok(Message::Text(text))) = frame else { panic!("connection {connection} ended: {frame:?}\n{}", agent.log()) };
            let Ok(AgentMessage::Heartbeat { envelope }) = serde_json::from_str::<AgentMessage>(&text) else { continue };
            let key = edge.link().agent_to_edge;
            assert!(envelope.open::<Beat>(Domain::Heartbeat, &random_link()).is_err());
            assert!(envelope.open::<Beat>(Domain::Heartbeat, &edge.link().edge_to_agent).is_err(), "the edge's direction");
            assert!(envelope.open::<Beat>(Domain::Progress, &key).is_err(), "a heartbeat is not progress");
            let beat: Beat = envelope.open(Domain::Heartbeat, &key).expect("MACed by the agent on this connection");
            assert_eq!(beat.challenge, hello.challenge, "bound to this connection's challenge");
            seqs.push(beat.seq);
            // Answered, as the edge does, so the agent does not leave a silent edge.
            ws.send(edge.ack(&beat)).await.unwrap();
        }
        assert_eq!(seqs, [1, 2, 3], "numbered from 1 on each connection");
        challenges.push(hello.challenge);
        drop(ws);
    }
    assert_ne!(challenges[0], challenges[1]);
    let runs = agent.claude_runs();
    assert_eq!(runs.len(), 1, "the refused order never ran: {runs:?}");
}

/// An order the path held back from one connection and delivers on the next, after the
/// edge (rightly, on the agent's hello) sent the job again and the agent ran it: the
/// held order is still signed, unexpired and of a nonce the agent never saw, so — unless
/// the agent ties orders to their connection — it runs the job a second time. The edge
/// reads the second result as a duplicate; the caller never knows Claude ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_held_back_from_an_earlier_connection_never_runs_a_job_twice() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let t = now();
    let attempt = |n: u32| {
        let mut o = edge.order("held", "spark", t, t + 60_000, "run me once");
        o.header.nonce = format!("held:{n}");
        Envelope::seal(Domain::Job, &o, &edge.edge_key)
    };
    // Connection 1: the edge sends attempt 1; the path keeps it and cuts the connection.
    let (ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let held = attempt(1);
    drop(ws);
    // Connection 2: the hello names no such job, so the edge sends it again (attempt 2);
    // it runs, its result is stored and acknowledged.
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.unwrap().running.is_empty());
    assert!(matches!(answer(&mut ws, attempt(2)).await, AgentMessage::Accepted { .. }));
    loop {
        if let Some(AgentMessage::Result { envelope }) = recv(&mut ws).await {
            assert_eq!(edge.report(&envelope).order_nonce, "held:2");
            break;
        }
    }
    ws.send(Message::Text(EdgeMessage::result_ack("held", "spark", &edge.link().edge_to_agent).to_text().into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The path now delivers the order it held: refused, and so never started (its answer
    // waited for, not a fixed 2 s in which a loaded machine might not yet have started it).
    let refusal = answer(&mut ws, held).await;
    assert!(!rejected(&refusal).is_empty(), "{refusal:?}");
    assert_eq!(agent.claude_runs().len(), 1, "the job ran twice: {:?}\n{}", agent.claude_runs(), agent.log());
}

/// Within one connection: the path holds an order back and slips in a frame of its own
/// in its place. The agent counts every job frame in `received`, so its next signed
/// heartbeat tells the edge the order arrived and is not held — the edge sends the job
/// again (another agent, or this one), and the held order, delivered later, runs it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_made_up_on_the_path_never_counts_as_an_order_received() {
    let edge = FakeEdge::with_heartbeat(500).await;
    let _agent = edge.start_agent();
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    // The edge's order 1 is held on the path; in its place a job frame no one signed.
    let mut forged = edge.order("forged", "spark", now(), now() + 60_000, "x");
    forged.header.nonce = "forged:1".into();
    let forged = Envelope::seal(Domain::Job, &forged, &random_key());
    assert!(edge.named(&answer(&mut ws, forged).await).is_none());
    let beat = loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("a heartbeat");
        let Some(Ok(Message::Text(text))) = frame else { panic!("ended: {frame:?}") };
        if let Ok(AgentMessage::Heartbeat { envelope }) = serde_json::from_str::<AgentMessage>(&text) {
            break envelope.open::<Beat>(Domain::Heartbeat, &edge.link().agent_to_edge).unwrap();
        }
    };
    // No order of the edge's reached the agent: a statement of 1 received would have the
    // edge settle the held order as "arrived and dropped", and send its job again.
    assert_eq!(beat.slots.received, 0, "a forged frame counted as an order received: {beat:?}");
}

/// Within one connection the path delivers order 2 before order 1 (it held 1 back): the
/// agent takes 2, states `received` 2 — so the edge settles 1 as arrived and not held, and
/// sends its job again — and refuses 1 when it comes, naming no job (a copy of an order it
/// took must not settle that job), so 1 never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_let_through_after_a_later_one_never_runs() {
    let edge = FakeEdge::with_heartbeat(500).await;
    let agent = edge.start_agent_with(&[("MAX_CONCURRENT_JOBS", "2")]);
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let t = now();
    let first = Envelope::seal(Domain::Job, &edge.order("first", "spark", t, t + 60_000, "first"), &edge.edge_key);
    let second = Envelope::seal(Domain::Job, &edge.order("second", "spark", t, t + 60_000, "@sleep=1500 second"), &edge.edge_key);
    assert!(matches!(answer(&mut ws, second.clone()).await, AgentMessage::Accepted { .. }));
    let refusal = answer(&mut ws, first).await;
    assert!(rejected(&refusal).contains("order 1 arrived after order 2"), "{refusal:?}");
    assert!(edge.named(&refusal).is_none(), "{refusal:?}");
    // The taken order played back while its job runs: refused, naming no job (named, it
    // would have the edge end or send again a running job).
    let refusal = answer(&mut ws, second).await;
    assert!(edge.named(&refusal).is_none(), "{refusal:?}");
    let beat = loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("a heartbeat");
        let Some(Ok(Message::Text(text))) = frame else { panic!("ended: {frame:?}") };
        if let Ok(AgentMessage::Heartbeat { envelope }) = serde_json::from_str::<AgentMessage>(&text) {
            break envelope.open::<Beat>(Domain::Heartbeat, &edge.link().agent_to_edge).unwrap();
        }
    };
    assert_eq!((beat.slots.received, beat.running.as_slice()), (2, ["second".to_string()].as_slice()), "{beat:?}");
    let runs: Vec<String> = agent.claude_runs().iter().map(|r| r["prompt"].as_str().unwrap_or_default().to_string()).collect();
    // (The refusal is made before anything starts: nothing of `first` can start later.)
    assert!(!runs.iter().any(|p| p == "first"), "the order let through late ran: {runs:?}");
}

impl FakeEdge {
    /// Sends `order` (signed by the edge) and returns its result, acknowledged.
    async fn result_of(&self, ws: &mut Ws, order: JobOrder) -> shared::job::JobResult {
        let id = order.header.job_id.clone();
        let accepted = answer(ws, Envelope::seal(Domain::Job, &order, &self.edge_key)).await;
        assert!(matches!(accepted, AgentMessage::Accepted { .. }), "{id}: {accepted:?}");
        loop {
            if let AgentMessage::Result { envelope } = recv(ws).await.expect("a result") {
                let report = self.report(&envelope);
                let ack = EdgeMessage::result_ack(&report.job_id, "spark", &self.link().edge_to_agent);
                ws.send(Message::Text(ack.to_text().into())).await.unwrap();
                if report.job_id == id {
                    return report.result;
                }
            }
        }
    }
}

/// A Claude session is resumed only for the caller that the agent's own sealed record
/// names (the caller comes in the edge's signed order). Another caller's job, a session no
/// job made (a transcript put in Claude's folder by hand), a record made up or changed in
/// the log (a job can write `DATA_DIR`) — heeded neither at once nor after a restart —, a
/// hostile id in a signed order: each job fails before Claude runs, saying to resume only
/// sessions one's own jobs returned, and no transcript is copied. The owner resumes its
/// own, after a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_resumed_only_for_the_caller_its_sealed_record_names() {
    use shared::contract::ErrorCode;
    let edge = FakeEdge::new().await;
    let mut agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    let order = |id: &str, caller: &str, session: Option<&str>, prompt: &str| edge.order_for(caller, session, id, t, prompt);
    let made = edge.result_of(&mut ws, order("made", "a", None, "@transcript the word is kiwi")).await;
    assert!(made.success, "{made:?}");
    let session = made.session_id.clone().expect("a session");
    let (data, projects) = (agent.data.path().join("data"), agent.data.path().join("claude-config/projects"));
    let log = data.join("sessions.log");
    // Written while the result travels.
    assert!(eventually(Duration::from_secs(60), || recorded(&log, &session)).await, "the agent recorded whose the session is");
    let sealed = std::fs::read_to_string(&log).unwrap();
    let copies = |id: &str| {
        let file = format!("{id}.jsonl");
        std::fs::read_dir(&projects).unwrap().flatten().filter(|d| d.path().join(&file).exists()).count()
    };
    assert_eq!(copies(&session), 1);
    let refused = |result: &shared::job::JobResult, caller: &str| {
        assert!(!result.success, "{result:?}");
        assert_eq!(result.error_code, Some(ErrorCode::InvalidRequest), "{result:?}");
        let error = result.error.clone().unwrap_or_default();
        assert!(error.contains(&format!("unknown to caller `{caller}`")) && error.contains("your own jobs"), "{error}");
    };

    // Another caller, knowing the id.
    refused(&edge.result_of(&mut ws, order("b-1", "b", Some(&session), "which word?")).await, "b");
    // A session no job made: a transcript put there by hand (the operator's own run).
    std::fs::create_dir_all(projects.join("-home-operator")).unwrap();
    std::fs::write(projects.join("-home-operator/by-hand-1.jsonl"), "{}\n").unwrap();
    refused(&edge.result_of(&mut ws, order("hand-1", "a", Some("by-hand-1"), "go on")).await, "a");
    // …with a record made up for it, in the record's shape, and a's record changed to
    // name b, its MAC kept: added to the log as a job could.
    let payload = serde_json::json!({"session_id": "by-hand-1", "caller": "a", "pool": "default", "job_id": "x", "used_at": t}).to_string();
    let forged = serde_json::json!({"payload": payload, "mac": shared::keys::encode(&[7; 32])}).to_string();
    let changed = sealed.replace(r#"\"caller\":\"a\""#, r#"\"caller\":\"b\""#);
    assert_ne!(changed, sealed);
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut file, format!("{forged}\n{changed}").as_bytes()).unwrap();
    refused(&edge.result_of(&mut ws, order("hand-2", "a", Some("by-hand-1"), "go on")).await, "a");
    refused(&edge.result_of(&mut ws, order("b-2", "b", Some(&session), "which word?")).await, "b");
    // Nor when the agent reads the log again at its start.
    agent.restart();
    drop(ws);
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    refused(&edge.result_of(&mut ws, order("hand-3", "a", Some("by-hand-1"), "go on")).await, "a");
    refused(&edge.result_of(&mut ws, order("b-3", "b", Some(&session), "which word?")).await, "b");
    // Hostile ids in an order the edge signed: nothing is looked up with them.
    let long = "a".repeat(129);
    for (i, id) in ["../../records/0", "..", long.as_str(), "sé"].into_iter().enumerate() {
        let result = edge.result_of(&mut ws, order(&format!("hostile-{i}"), "a", Some(id), "x")).await;
        assert_eq!(result.error_code, Some(ErrorCode::InvalidRequest), "{id:?}: {result:?}");
        assert!(result.error.unwrap().contains("session `-`"), "the id is not repeated");
    }
    // A caller name that is not a plain name is refused (it would reach a log line).
    let odd = Envelope::seal(Domain::Job, &order("odd", "a\nINFO forged", None, "x"), &edge.edge_key);
    assert!(rejected(&answer(&mut ws, odd).await).contains("caller"));
    assert_eq!(agent.claude_runs().len(), 1, "Claude ran for a's first job only");
    assert_eq!((copies(&session), copies("by-hand-1")), (1, 1), "no transcript was copied");
    let said = agent.log();
    for why in ["the session is caller `a`'s", "no record of the session", "not sealed by this agent"] {
        assert!(said.contains(why), "the operator's log says why ({why}): {said}");
    }

    // a resumes its session (its record survived the restart and the lines after it),
    // carried into the new workspace.
    let resumed = edge.result_of(&mut ws, order("a-2", "a", Some(&session), "which word?")).await;
    assert!(resumed.success, "{resumed:?}");
    assert_eq!(resumed.output, format!("stand-in answer to: which word? (resumed {session} after 1 turns)"));
    assert_eq!(copies(&session), 2);
}

/// Whether the session log at `log` holds a record of session `id` (sealed or not).
/// A crash point: the agent is killed the moment a job's result reaches the edge. The
/// record of whose the job's Claude session is was written after the result went (after
/// its spool write and its sync), so a kill then lost it: the caller had the result and
/// its session id, and the restarted agent refused to resume it (no record). It is
/// appended before the result goes. (Against the old order this failed one run in three
/// here, the spool's sync on this disk being short; agent.rs's unit test
/// `a_jobs_session_is_recorded_before_its_result_goes` looks at the order itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_a_kill_of_the_agent_as_its_result_arrives() {
    let edge = FakeEdge::new().await;
    let mut agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    let made = edge.result_of(&mut ws, edge.order_for("a", None, "made", t, "@transcript the word is kiwi")).await;
    agent.kill();
    assert!(made.success, "{made:?}");
    let session = made.session_id.clone().expect("a session");
    let log = agent.data.path().join("data/sessions.log");
    assert!(recorded(&log, &session), "killed as the result arrived, the agent had not recorded whose the session is");
    drop(ws);
    agent.ensure_running();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let resumed = edge.result_of(&mut ws, edge.order_for("a", Some(&session), "a-2", t, "which word?")).await;
    assert!(resumed.success, "{resumed:?}\n{}", agent.log());
    assert_eq!(resumed.output, format!("stand-in answer to: which word? (resumed {session} after 1 turns)"));
}

fn recorded(log: &std::path::Path, id: &str) -> bool {
    std::fs::read_to_string(log).unwrap_or_default().contains(&format!(r#"\"session_id\":\"{id}\""#))
}

/// A job's output after Claude's first line is the job's to shape (a command can write to
/// Claude's stdout): a job that names another session there — a second `init` line, the
/// result line — must not have that session recorded as its caller's. Here a's record is
/// gone (a job can empty the session log), so nothing else would keep b from taking a's
/// session over and resuming a's conversation. The session recorded, and returned, is the
/// one Claude's own first line named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_a_job_only_names_in_its_output_is_not_recorded_as_its_callers() {
    use shared::contract::ErrorCode;
    let edge = FakeEdge::new().await;
    let mut agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    let order = |id: &str, caller: &str, session: Option<&str>, prompt: &str| edge.order_for(caller, session, id, t, prompt);
    let log = agent.data.path().join("data/sessions.log");
    let recorded = |id: &str| recorded(&log, id);
    let made = edge.result_of(&mut ws, order("a-1", "a", None, "@transcript the word is kiwi")).await;
    let theirs = made.session_id.clone().expect("a session");
    assert!(eventually(Duration::from_secs(60), || recorded(&theirs)).await, "a's session recorded");
    // Emptied by a job, then read by the agent at its next start: a's session is no one's.
    std::fs::write(&log, "").unwrap();
    agent.restart();
    drop(ws);
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());

    let claim = format!("@transcript @claim_session={theirs} hello");
    let claimed = edge.result_of(&mut ws, order("b-1", "b", None, &claim)).await;
    assert!(claimed.success, "{claimed:?}");
    let own = claimed.session_id.clone().expect("b's own session");
    assert_ne!(own, theirs, "the session returned is the one Claude's first line named");
    assert!(eventually(Duration::from_secs(60), || recorded(&own)).await, "b's own session recorded");
    assert!(!recorded(&theirs), "a's session was not recorded as b's");
    let stolen = edge.result_of(&mut ws, order("b-2", "b", Some(&theirs), "which word?")).await;
    assert_eq!(stolen.error_code, Some(ErrorCode::InvalidRequest), "{stolen:?}");
    assert!(!stolen.output.contains("kiwi"), "{stolen:?}");
    // (a lost its record with the log: README says so.)
    let lost = edge.result_of(&mut ws, order("a-2", "a", Some(&theirs), "which word?")).await;
    assert_eq!(lost.error_code, Some(ErrorCode::InvalidRequest), "{lost:?}");
    // b resumes its own.
    let resumed = edge.result_of(&mut ws, order("b-3", "b", Some(&own), "go on")).await;
    assert!(resumed.success, "{resumed:?}");
    assert_eq!(resumed.output, format!("stand-in answer to: go on (resumed {own} after 1 turns)"));
}

/// Another job of the same user can write into a running Claude's stdout
/// (`/proc/<pid>/fd/1`) before Claude prints its own first line: an `init` line naming a
/// session the writer chose. The agent named the session itself (`--session-id`), so the
/// caller's session stays the one Claude ran in: it is recorded and resumed, and the
/// forged id is not the caller's. (Before, the first line named the session recorded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_first_init_line_does_not_name_the_callers_session() {
    use shared::contract::ErrorCode;
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    let order = |id: &str, caller: &str, session: Option<&str>, prompt: &str| edge.order_for(caller, session, id, t, prompt);
    let log = agent.data.path().join("data/sessions.log");
    let recorded = |id: &str| recorded(&log, id);
    let forged = "0badc0de-0000-4000-8000-00000000f00d";
    let made = edge.result_of(&mut ws, order("a-1", "a", None, &format!("@forge_init={forged} @transcript the word is kiwi"))).await;
    assert!(made.success, "{made:?}");
    let session = made.session_id.clone().expect("a session");
    assert_ne!(session, forged, "the forged line does not name the caller's session");
    // The id the agent passed Claude, and the one the transcript is filed under.
    let runs = agent.claude_runs();
    let argv: Vec<String> = serde_json::from_value(runs[0]["argv"].clone()).unwrap();
    assert!(argv.contains(&format!("--session-id={session}")), "{argv:?}");
    assert!(eventually(Duration::from_secs(60), || recorded(&session)).await, "the caller's session recorded");
    assert!(!recorded(forged), "the forged session was not recorded");
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("named another session")).await, "the operator's log says so: {}", agent.log());

    let resumed = edge.result_of(&mut ws, order("a-2", "a", Some(&session), "which word?")).await;
    assert!(resumed.success, "{resumed:?}");
    assert_eq!(resumed.output, format!("stand-in answer to: which word? (resumed {session} after 1 turns)"));
    assert_eq!(resumed.session_id.as_deref(), Some(session.as_str()));
    let theirs = edge.result_of(&mut ws, order("a-3", "a", Some(forged), "which word?")).await;
    assert_eq!(theirs.error_code, Some(ErrorCode::InvalidRequest), "{theirs:?}");
    assert_eq!(agent.claude_runs().len(), 2, "Claude did not run for the forged session");
}

/// A Claude that does not run in the session the agent named (a CLI that ignores
/// `--session-id`): its result names the agent's session, which is not recorded (it is
/// not the one Claude ran in), so resuming it is refused; the operator's log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_that_names_another_session_has_its_session_not_recorded() {
    use shared::contract::ErrorCode;
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    let order = |id: &str, session: Option<&str>, prompt: &str| edge.order_for("a", session, id, t, prompt);
    let made = edge.result_of(&mut ws, order("a-1", None, "@ignore_session_id @transcript the word is kiwi")).await;
    assert!(made.success, "{made:?}");
    let session = made.session_id.clone().expect("the agent's session");
    let argv: Vec<String> = serde_json::from_value(agent.claude_runs()[0]["argv"].clone()).unwrap();
    assert!(argv.contains(&format!("--session-id={session}")), "{argv:?}");
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("is not recorded")).await, "{}", agent.log());
    let log = agent.data.path().join("data/sessions.log");
    assert!(!recorded(&log, &session));
    let refused = edge.result_of(&mut ws, order("a-2", Some(&session), "which word?")).await;
    assert_eq!(refused.error_code, Some(ErrorCode::InvalidRequest), "{refused:?}");
}

/// Anyone who can write into the agent's connection after the welcome (a hop that ends
/// TLS, plain ws:// with ALLOW_INSECURE_EDGE) writes job frames no one signed, as fast as
/// it can. Each used to cost the agent a log line and a queued refusal, and its reads went
/// first so nothing it queued was written: its memory and log grew without bound and its
/// heartbeats stopped, so the edge dropped it as silent while it believed it was
/// connected (hostile review rev21, 1). A real edge never sends such a frame: after a few
/// the agent hangs up, saying so, and dials again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unsigned_orders_ends_the_connection_and_the_agent_dials_again() {
    const FRAMES: usize = 50_000;
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let (ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let (mut sink, mut stream) = ws.split();
    let frame = r#"{"type":"job","envelope":{"payload":"","sig":""}}"#;
    // Written non-stop, whatever the agent does meanwhile; stops once the agent has gone.
    let writer = tokio::spawn(async move {
        let mut written = 0;
        while written < FRAMES {
            if sink.feed(Message::Text(frame.into())).await.is_err() {
                break;
            }
            written += 1;
            if written % 256 == 0 && sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.flush().await;
        written
    });
    // Everything the agent sends until it ends the connection.
    let (mut refused, mut closed) = (0, None);
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        match frame {
            Err(_) => panic!("the agent neither closed the connection nor ended it within 60 s ({refused} refusals)\n{}", shared::text::truncate(&agent.log(), 20_000)),
            Ok(Some(Ok(Message::Text(text)))) => {
                if let Ok(AgentMessage::OrderRefused { .. }) = serde_json::from_str::<AgentMessage>(&text) {
                    refused += 1;
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                closed = frame.map(|f| f.reason.to_string());
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
        }
    }
    let written = writer.await.unwrap();
    assert!(refused < 100, "{refused} refusals sent for {written} frames");
    let why = closed.expect("the agent closes with a reason");
    assert!(why.contains("signature"), "{why}");
    // It dials again (a new connection, a new challenge), and its log says it once.
    let (_ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let log = agent.log();
    assert!(log.lines().filter(|l| l.contains("order refused")).count() < 100, "{}", shared::text::truncate(&log, 20_000));
    assert_eq!(log.matches("hanging up").count(), 1, "{}", shared::text::truncate(&log, 20_000));
}

/// A cancel is bound to its connection as a job order is: one the path held back from
/// connection 1 and delivers on connection 2, within its two minutes, is refused and
/// stops nothing (hostile review rev21, 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_held_back_from_an_earlier_connection_is_refused() {
    let edge = FakeEdge::new().await;
    let agent = edge.start_agent();
    let t = now();
    let cancel = |challenge: &str| cancel_of_long(&edge.edge_key, t, &format!("long:cancel:{challenge}"), Some(challenge));
    // Connection 1: the path keeps a cancel the edge sealed for it, and cuts the connection.
    let (ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let held = cancel(&hello.expect("a hello").challenge);
    drop(ws);
    // Connection 2: a job runs until the test lets it end; the held cancel arrives.
    let (mut ws, _) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    let go = agent.data.path().join("go");
    let job = Envelope::seal(Domain::Job, &edge.order("long", "spark", t, t + 60_000, &format!("@await={} long", go.display())), &edge.edge_key);
    assert!(matches!(answer(&mut ws, job).await, AgentMessage::Accepted { .. }));
    ws.send(Message::Text(held.into())).await.unwrap();
    let refusal = next_refusal(&mut ws).await;
    assert!(rejected(&refusal).contains("another connection"), "{refusal:?}");
    assert!(edge.named(&refusal).is_none(), "{refusal:?}");
    // The job was not stopped: it ends as it would have.
    std::fs::write(&go, b"").unwrap();
    let result = loop {
        match recv(&mut ws).await.expect("the result") {
            AgentMessage::Result { envelope } => break edge.report(&envelope).result,
            _ => continue,
        }
    };
    assert!(result.success, "{result:?}");
}

/// Hostile review rev26, 2: a hop (plain ws://, or one that ends TLS) let the handshake
/// through, cut the edge off, and wrote `{"type":"junk"}` into the agent's side a few times
/// a second. The edge closed the silent connection and ended the agent's jobs `lost`
/// (their callers told to fall back); the agent heard "frames", stayed connected, never
/// dialled again, and so never applied its away rule: a job held at the refresh gate
/// started after the edge had ended it — the task ran twice. Now only frames the edge
/// proved count as heard: the agent drops such a connection within a few heartbeats, and
/// the held job, let through the gate once the edge has given it up, does not start: its
/// start is held (nothing the edge proved is fresh), and the welcome that brings the agent
/// back names it as given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_a_hop_makes_up_neither_keep_the_agent_connected_nor_start_a_job_the_edge_gave_up() {
    const LOST_AFTER_MS: u64 = 1_500;
    let edge = FakeEdge { lost_after_ms: Some(LOST_AFTER_MS), ..FakeEdge::with_heartbeat(1_000).await };
    let agent = edge.start_agent_with(&[("CLAUDE_CODE_OAUTH_TOKEN", "")]);
    // A login due a refresh, which another process holds the lock to make: the job waits.
    let config = agent.data.path().join("claude-config");
    let mut other = stale_login_with_the_refresh_held(&config).await;
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    // Its time is not what ends it: a minute (the test's steps take a few seconds).
    let mut order = edge.order("held", "spark", t, t + 60_000, "held at the gate");
    order.spec.timeout_ms = 60_000;
    send_job(&mut ws, Envelope::seal(Domain::Job, &order, &edge.edge_key)).await;
    // The edge answers every beat until the job waits at the gate.
    let waits = || agent.log().lines().any(|l| l.contains("another process lets a Claude refresh this login") && l.contains("held"));
    while !waits() {
        let _ = edge.next_answering_beats(&mut ws, &agent).await;
    }
    // The hop cuts the edge off: nothing answers the agent's beats, and junk comes twice a
    // second.
    let (mut sink, mut stream) = ws.split();
    let junk = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if sink.send(Message::Text(r#"{"type":"junk"}"#.into())).await.is_err() {
                break;
            }
        }
    });
    let mut beats = 0;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), stream.next()).await.expect("a frame within 60 s");
        match frame {
            Some(Ok(Message::Text(text))) => {
                if let Ok(AgentMessage::Heartbeat { .. }) = serde_json::from_str::<AgentMessage>(&text) {
                    beats += 1;
                    assert!(beats <= 3, "the agent still on the connection {beats} heartbeats after the edge was cut off\n{}", agent.log());
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    junk.abort();
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("connection to the edge lost")).await, "{}", agent.log());
    // No edge answers any more: the agent is away longer than the LOST_AFTER_MS it was told.
    edge.refuse_for(Duration::from_millis(LOST_AFTER_MS + 1_000)).await;
    // The other process is done: the login is fresh, the lock free, and the job goes on to
    // its start, which it must not make.
    let fresh = serde_json::json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-fresh-0123456789", "refreshToken": "sk-ant-ort01-fresh-0123456789", "expiresAt": 4_000_000_000_000u64}});
    std::fs::write(config.join(".credentials.json"), fresh.to_string()).unwrap();
    drop(other.stdin.take());
    other.wait().unwrap();
    // It is held at its start (nothing the edge proved is younger than LOST_AFTER_MS).
    let held = || agent.log().contains("job held before its start") || !agent.claude_runs().is_empty();
    for _ in 0..300 {
        if held() {
            break;
        }
        edge.refuse_for(Duration::from_millis(200)).await;
    }
    assert!(agent.claude_runs().is_empty(), "the job started after the edge gave it up: {:?}\n{}", agent.claude_runs(), agent.log());
    // An edge answers again, its welcome naming the job it ended: the job's result says it
    // never started.
    let (mut ws, hello) = edge
        .handshake_via(PROTOCOL_VERSION, "default", |welcome| Envelope::seal(Domain::Welcome, &Welcome { given_up: vec!["held".into()], ..welcome }, &edge.edge_key))
        .await;
    assert!(hello.is_some(), "{}", agent.log());
    let result = loop {
        match recv(&mut ws).await.expect("the held job's result") {
            AgentMessage::Result { envelope } => break edge.report(&envelope).result,
            _ => continue,
        }
    };
    assert_eq!(result.error_code, Some(shared::contract::ErrorCode::RunnerLost), "{result:?}");
    assert!(result.error.as_deref().unwrap_or_default().contains("not started"), "{result:?}");
    assert!(agent.claude_runs().is_empty(), "{:?}", agent.claude_runs());
}

/// rev29-2: a blip the edge did not give the agent's jobs up for, but longer than its
/// LOST_AFTER_MS by the agent's own count (which starts at the agent's last frame heard;
/// the edge's at when it saw the loss, up to a heartbeat and its silence detection later).
/// Two jobs wait at the refresh gate; the link is cut, and the agent is welcomed back only
/// past LOST_AFTER_MS, by a welcome naming one of them as given up. That one never starts,
/// and says why; the other, which the edge took over, starts and succeeds. The agent judged
/// by its own count and ended both "not started: the edge had given the job up" — untrue
/// for the second (seen failing so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_after_a_blip_the_agent_starts_the_jobs_the_welcome_does_not_name_as_given_up() {
    const LOST_AFTER_MS: u64 = 1_500;
    let edge = FakeEdge { lost_after_ms: Some(LOST_AFTER_MS), ..FakeEdge::with_heartbeat(1_000).await };
    let agent = edge.start_agent_with(&[("CLAUDE_CODE_OAUTH_TOKEN", ""), ("MAX_CONCURRENT_JOBS", "2")]);
    // A login due a refresh, which another process holds the lock to make: the jobs wait.
    let config = agent.data.path().join("claude-config");
    let mut other = stale_login_with_the_refresh_held(&config).await;
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    for id in ["kept", "gone"] {
        let mut order = edge.order(id, "spark", t, t + 60_000, &format!("job {id}"));
        order.spec.timeout_ms = 60_000;
        send_job(&mut ws, Envelope::seal(Domain::Job, &order, &edge.edge_key)).await;
    }
    // The edge answers every beat until both wait at the gate.
    let waits = |id: &str| agent.log().lines().any(|l| l.contains("another process lets a Claude refresh this login") && l.contains(id));
    while !(waits("kept") && waits("gone")) {
        let _ = edge.next_answering_beats(&mut ws, &agent).await;
    }
    // The link goes; no edge answers for longer than LOST_AFTER_MS by the agent's count.
    drop(ws);
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("connection to the edge lost")).await, "{}", agent.log());
    edge.refuse_for(Duration::from_millis(LOST_AFTER_MS + 1_000)).await;
    // Back: the edge gave `gone` up, and took `kept` over.
    let (mut ws, hello) = edge
        .handshake_via(PROTOCOL_VERSION, "default", |welcome| Envelope::seal(Domain::Welcome, &Welcome { given_up: vec!["gone".into()], ..welcome }, &edge.edge_key))
        .await;
    let hello = hello.unwrap_or_else(|| panic!("no hello\n{}", agent.log()));
    assert_eq!(hello.running.len(), 2, "both still held: {:?}", hello.running);
    // The other process is done: the login is fresh, the lock free, and both go on to
    // their start.
    let fresh = serde_json::json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-fresh-0123456789", "refreshToken": "sk-ant-ort01-fresh-0123456789", "expiresAt": 4_000_000_000_000u64}});
    std::fs::write(config.join(".credentials.json"), fresh.to_string()).unwrap();
    drop(other.stdin.take());
    other.wait().unwrap();
    let mut results = std::collections::HashMap::new();
    while results.len() < 2 {
        if let Ok(AgentMessage::Result { envelope }) = edge.next_answering_beats(&mut ws, &agent).await {
            let report = edge.report(&envelope);
            results.insert(report.job_id, report.result);
        }
    }
    let runs: Vec<String> = agent.claude_runs().iter().map(|r| r["prompt"].to_string()).collect();
    let kept = &results["kept"];
    assert!(kept.success, "the job the edge took over did not run: {kept:?}\n{}", agent.log());
    assert_eq!(runs.iter().filter(|p| p.contains("job kept")).count(), 1, "{runs:?}");
    assert!(!runs.iter().any(|p| p.contains("job gone")), "the job the edge gave up started: {runs:?}\n{}", agent.log());
    let gone = &results["gone"];
    assert_eq!((gone.error_code, gone.retryable), (Some(shared::contract::ErrorCode::RunnerLost), Some(true)), "{gone:?}");
    assert!(gone.error.as_deref().unwrap_or_default().contains("not started: the edge had given the job up while this agent was away (its welcome said so"), "{gone:?}");
}

/// Hostile review rev30, 1: a hop cut the edge off and went on reading — and dropping —
/// everything the agent wrote, answering nothing and making up no frame. The agent's
/// silence bound was the last ack, two intervals, and the bytes not known read *now* at
/// 16 KiB/s: every byte a printing job wrote moved it on, so the agent stayed "connected"
/// for as long as its job printed (the edge had ended the job `lost` long before), and a
/// job held at its start started after the edge had told its caller to fall back. Each
/// beat's ack is now due by its writing, two intervals and the bytes ahead of it, fixed as
/// it is written: the agent leaves within a few heartbeats of the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_reads_everything_and_answers_nothing_does_not_keep_a_printing_agent_connected() {
    let edge = FakeEdge::with_heartbeat(1_000).await;
    let agent = edge.start_agent();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    // 64 KiB of output a second for a minute: 4 s of allowance at 16 KiB/s each second.
    let mut order = edge.order("chatty", "spark", t, t + 60_000, "chatty @megabytes=4 @gap_ms=1000");
    order.spec.timeout_ms = 120_000;
    send_job(&mut ws, Envelope::seal(Domain::Job, &order, &edge.edge_key)).await;
    // The edge answers every beat until the job has printed a few times.
    let mut printed = 0;
    while printed < 3 {
        if let Ok(AgentMessage::Event { .. }) = edge.next_answering_beats(&mut ws, &agent).await {
            printed += 1;
        }
    }
    // The hop cuts the edge off: it reads all the agent writes and answers nothing.
    let (mut beats, mut bytes) = (0, 0);
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("a frame within 60 s");
        match frame {
            Some(Ok(Message::Text(text))) => {
                bytes += text.len();
                if let Ok(AgentMessage::Heartbeat { .. }) = serde_json::from_str::<AgentMessage>(&text) {
                    beats += 1;
                    assert!(beats <= 20, "the agent still on the connection {beats} heartbeats after the edge was cut off ({bytes} bytes sunk since)\n{}", agent.log());
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    assert!(eventually(Duration::from_secs(60), || agent.log().contains("nothing the edge proved in answer to heartbeat")).await, "{}", agent.log());
}

/// Hostile review rev30, 1, end to end in the review's shape: a job prints (64 KiB four
/// times a second); another waits at the refresh gate; a hop cuts the edge off and reads —
/// and drops — everything the agent writes, answering nothing. The edge ends the waiting
/// job `lost` after its LOST_AFTER_MS and tells its `/execute` caller to fall back; the
/// agent, whose bound on the edge's silence still allows for the bytes it wrote, is
/// "connected" for seconds more, and the old rule (asked only while disconnected) let the
/// job start when the gate opened: the task ran twice. The start rule asks whether the
/// last frame the edge proved it read was written less than LOST_AFTER_MS ago, connected
/// or not: the job is held; once the agent is back, the welcome names it as given up, and
/// it ends "not started".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_at_its_start_does_not_start_while_a_hop_keeps_the_agent_connected_without_the_edge() {
    const LOST_AFTER_MS: u64 = 2_000;
    let edge = FakeEdge { lost_after_ms: Some(LOST_AFTER_MS), ..FakeEdge::with_heartbeat(1_000).await };
    let agent = edge.start_agent_with(&[("CLAUDE_CODE_OAUTH_TOKEN", ""), ("MAX_CONCURRENT_JOBS", "2")]);
    let config = agent.data.path().join("claude-config");
    std::fs::create_dir_all(&config).unwrap();
    let fresh = serde_json::json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-fresh-0123456789", "refreshToken": "sk-ant-ort01-fresh-0123456789", "expiresAt": 4_000_000_000_000u64}});
    std::fs::write(config.join(".credentials.json"), fresh.to_string()).unwrap();
    let (mut ws, hello) = edge.handshake(&edge.edge_key, PROTOCOL_VERSION).await;
    assert!(hello.is_some(), "{}", agent.log());
    let t = now();
    let mut chatty = edge.order("chatty", "spark", t, t + 60_000, "chatty @megabytes=6 @gap_ms=250");
    chatty.spec.timeout_ms = 120_000;
    send_job(&mut ws, Envelope::seal(Domain::Job, &chatty, &edge.edge_key)).await;
    // The edge answers every beat while the first job prints, and the second waits at the
    // gate (a login due a refresh, which another process holds the lock to make).
    let answer = |text: &str| match serde_json::from_str::<AgentMessage>(text) {
        Ok(AgentMessage::Heartbeat { envelope }) => Some(edge.ack(&envelope.open(Domain::Heartbeat, &edge.link().agent_to_edge).unwrap())),
        _ => None,
    };
    let mut other = None;
    let waits = || agent.log().lines().any(|l| l.contains("another process lets a Claude refresh this login") && l.contains("held"));
    while !waits() {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("a frame within 60 s");
        let Some(Ok(Message::Text(text))) = frame else { panic!("the connection ended: {frame:?}\n{}", agent.log()) };
        if let Some(ack) = answer(&text) {
            ws.send(ack).await.unwrap();
        }
        if other.is_none() && agent.claude_runs().iter().any(|r| r["prompt"].to_string().contains("chatty")) {
            other = Some(stale_login_with_the_refresh_held(&config).await);
            let t = now();
            let mut held = edge.order("held", "spark", t, t + 60_000, "held at the gate");
            held.spec.timeout_ms = 60_000;
            send_job(&mut ws, Envelope::seal(Domain::Job, &held, &edge.edge_key)).await;
        }
    }
    // The hop cuts the edge off: it reads all the agent writes and answers nothing.
    let cut = std::time::Instant::now();
    let (sink, mut stream) = ws.split();
    let sinking = tokio::spawn(async move {
        while let Some(Ok(_)) = stream.next().await {}
        drop(sink);
    });
    // Past LOST_AFTER_MS (the edge has ended the job and told its caller to fall back), the
    // other process is done: the login fresh, the lock free, and the job goes on to its
    // start, which it must not make.
    tokio::time::sleep(Duration::from_millis(LOST_AFTER_MS + 1_000)).await;
    std::fs::write(config.join(".credentials.json"), fresh.to_string()).unwrap();
    let mut other = other.expect("the lock was taken");
    drop(other.stdin.take());
    other.wait().unwrap();
    let ran_held = || agent.claude_runs().iter().any(|r| r["prompt"].to_string().contains("held at the gate"));
    let held = || agent.log().contains("job held before its start");
    assert!(eventually(Duration::from_secs(60), || held() || ran_held()).await, "{}", agent.log());
    assert!(!ran_held(), "the job started {:?} after the cut, with the edge gone for longer than LOST_AFTER_MS\n{}", cut.elapsed(), agent.log());
    // The agent leaves the sunk connection, and is back: the welcome names the job as given up.
    let (mut ws, hello) = edge
        .handshake_via(PROTOCOL_VERSION, "default", |welcome| Envelope::seal(Domain::Welcome, &Welcome { given_up: vec!["held".into()], ..welcome }, &edge.edge_key))
        .await;
    sinking.abort();
    let hello = hello.unwrap_or_else(|| panic!("no hello\n{}", agent.log()));
    assert!(hello.running.iter().any(|id| id == "held"), "{:?}", hello.running);
    let result = loop {
        match recv(&mut ws).await.expect("the held job's result") {
            AgentMessage::Result { envelope } => {
                let report = edge.report(&envelope);
                if report.job_id == "held" {
                    break report.result;
                }
            }
            _ => continue,
        }
    };
    assert_eq!((result.error_code, result.retryable), (Some(shared::contract::ErrorCode::RunnerLost), Some(true)), "{result:?}");
    assert!(result.error.as_deref().unwrap_or_default().starts_with("not started"), "{result:?}");
    assert!(!ran_held(), "{:?}", agent.claude_runs());
}
