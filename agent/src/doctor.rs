//! `claude-runner doctor`: checks what the agent needs — the Claude binary, its login,
//! the keys, the edge — and says how to fix each problem it finds; with `--canary`, also
//! runs one tiny real job through the CLI ([`crate::canary`]).

use crate::config::AgentArgs;
use crate::edge_url::connect_url;
use crate::process::{find_binary, install_claude};
use futures_util::StreamExt;
use shared::envelope::{Domain, Envelope};
use shared::keys;
use shared::oauth::OAuthReport;
use shared::protocol::{close, AgentMessage, EdgeMessage, Hello, Welcome, PROTOCOL_VERSION};
use tokio_tungstenite::tungstenite::Message;
use std::time::Duration;

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: impl AsRef<str>) {
        say("  ok   ", what, detail.as_ref());
    }
    fn warn(&self, what: &str, detail: impl AsRef<str>) {
        say("  warn ", what, detail.as_ref());
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>) {
        self.failures += 1;
        say("  FAIL ", what, detail.as_ref());
    }
}

/// Prints one check's outcome, each of its lines with its control characters escaped: a
/// detail carries outside words (what a `claude` on the PATH, perhaps a job's, says of its
/// version; the status file's usage window, a job's to write; the edge's answers), which
/// could otherwise drive the operator's terminal (its clipboard with OSC 52, its title).
fn say(tag: &str, what: &str, detail: &str) {
    let lines: Vec<String> = detail.lines().map(shared::text::one_line).collect();
    println!("{tag} {what}: {}", lines.join("\n"));
}

/// Runs every check (and the canary job if asked); true when none failed.
pub async fn run(args: AgentArgs, canary: bool) -> bool {
    let mut r = Report { failures: 0 };
    println!("claude-runner doctor");

    match find_binary(&args.local.claude_bin) {
        None => r.fail("claude binary", install_claude(&args.local.claude_bin)),
        Some(path) => match crate::cli_version::probe(&path).await {
            Ok(version) => r.ok("claude binary", format!("{} ({version})", path.display())),
            Err(e) => r.fail("claude binary", e),
        },
    }

    let (login, read_in) = crate::report::local_login(args.local.claude_config_dir(), &args.local.running_agent_dir());
    let status = crate::report::local_report(&login, &args.local.running_agent_dir()).status(crate::now_ms());
    let source = serde_json::to_value(status.source).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    if let Some(problem) = &status.problem {
        r.warn("login", problem);
    }
    if status.needs_login {
        let next = status.next_step.clone().unwrap_or_default();
        r.fail("login", format!("Claude cannot authenticate ({source}, {read_in}): {next}; or set CLAUDE_CODE_OAUTH_TOKEN from `claude setup-token`"));
    } else {
        let expiry = match (&status.expires_at, status.refreshable) {
            (Some(at), true) => format!(", access token until {at} (refreshed by Claude as needed)"),
            (Some(at), false) => format!(", valid until {at}: no refresh token, log in again before then"),
            (None, _) => String::new(),
        };
        r.ok("login", format!("{source}{expiry}, {read_in}"));
    }
    match &status.usage {
        Some(u) if u.status == shared::usage::UsageStatus::Rejected => r.warn(
            "usage",
            format!(
                "the subscription's usage window{} is used up until {}: jobs wait for the reset (POST /jobs) or fall back (/execute)",
                // On its line: the status file's, a job's to write (a line break in it printed
                // a line of the job's choosing as one of doctor's).
                u.kind.as_deref().map(|k| format!(" ({})", shared::text::one_line(k))).unwrap_or_default(),
                u.resets_at.as_deref().unwrap_or("its reset")
            ),
        ),
        Some(u) if u.status == shared::usage::UsageStatus::AllowedWarning => r.warn(
            "usage",
            format!("the usage window is nearly used up{}", u.utilization.map(|x| format!(" ({:.0} %)", x * 100.0)).unwrap_or_default()),
        ),
        Some(_) => r.ok("usage", "the usage window is open"),
        None => r.ok("usage", "no usage limit reported by the running agent"),
    }

    if let Err(e) = crate::config::job_env_allow(&args.local.job_env_allow) {
        r.fail("JOB_ENV_ALLOW", e.to_string());
    }
    let agent_id = args.agent_id();
    // Beside `up`, with none of an agent's own settings, these three checks are about an
    // agent that does not exist: `up` keeps its keys in its own folder. Said as such, not
    // as three failures a newcomer's first `doctor` took for `up` being broken.
    let up_data = args.local.data_dir().join("up");
    let beside_up = args.edge_url.is_none()
        && args.agent_signing_key.is_none()
        && args.agent_key_file.is_none()
        && args.edge_public_key.is_none()
        && crate::config::agent_has_run(&crate::config::up_agent_dir(&args.local.data_dir()));
    if beside_up {
        let why = format!(
            "not checked: beside `claude-runner up`, which keeps its own in {}; set EDGE_URL, AGENT_SIGNING_KEY and \
             EDGE_PUBLIC_KEY to check an agent of your own (`claude-runner status` shows up's)",
            up_data.join("up.json").display()
        );
        say("  --   ", "agent key, edge key, edge", &why);
    } else {
        let agent_key = match args.signing_key_text() {
            Err(e) => {
                r.fail("agent key", e.to_string());
                None
            }
            Ok(text) => match keys::signing_key("AGENT_SIGNING_KEY", &text) {
                Ok(key) => {
                    r.ok(
                        "agent key",
                        format!("the edge's AGENT_PUBLIC_KEYS must contain `{agent_id}={}`", keys::encode_verifying(&key.verifying_key())),
                    );
                    Some(key)
                }
                Err(e) => {
                    r.fail("agent key", e.to_string());
                    None
                }
            },
        };
        let edge_key = match &args.edge_public_key {
            None => {
                r.fail("edge key", "EDGE_PUBLIC_KEY is not set; it is printed by `claude-runner keygen` next to EDGE_SIGNING_KEY");
                None
            }
            Some(text) => match keys::verifying_key("EDGE_PUBLIC_KEY", text) {
                Ok(key) => {
                    r.ok("edge key", "EDGE_PUBLIC_KEY is a valid public key");
                    Some(key)
                }
                Err(e) => {
                    r.fail("edge key", e.to_string());
                    None
                }
            },
        };
        let probe = match (agent_key, edge_key) {
            (Some(signing_key), Some(edge_public_key)) => Some(Probe { agent_id: agent_id.clone(), signing_key, edge_public_key, pool: args.edge_pool.clone() }),
            _ => None,
        };
        match &args.edge_url {
            None => r.fail("edge", "EDGE_URL is not set; e.g. wss://claude-runner-edge.<you>.workers.dev"),
            Some(url) => match connect_url(url, args.allow_insecure_edge) {
                Err(e) => r.fail("edge", e.to_string()),
                Ok(url) => match reach(&url, probe.as_ref()).await {
                    Ok((detail, keys)) => {
                        r.ok("edge", detail);
                        match keys {
                            Some(Ok(agreed)) => r.ok("keys", agreed),
                            Some(Err(KeysRefused::Fail(what, why))) => r.fail(what, why),
                            Some(Err(KeysRefused::Unchecked(why))) => r.warn("keys", why),
                            None => {}
                        }
                    }
                    Err(e) => r.fail("edge", e),
                },
            },
        }
    }
    if canary {
        match crate::canary::run(&args.local, agent_id.clone()).await {
            Ok(detail) => r.ok("canary", detail),
            Err(problems) => {
                for problem in problems {
                    r.fail("canary", problem);
                }
            }
        }
    }
    if r.failures == 0 && beside_up {
        println!("The checks that apply beside `up` passed. `claude-runner status` shows whether up's agent is connected.");
    } else if r.failures == 0 {
        println!("All checks passed. `claude-runner status` shows whether the running agent is connected.");
    } else {
        println!("{} check(s) failed; fix them and run `claude-runner doctor` again.", r.failures);
        // Beside `up`, with some of an agent's settings but not all: `up` keeps its own,
        // and its agent is not the one these checks are about.
        if args.edge_url.is_none() && !beside_up && crate::config::agent_has_run(&crate::config::up_agent_dir(&args.local.data_dir())) {
            println!(
                "(`claude-runner up` runs with keys of its own, in {}: these checks are for an agent you set up \
                 yourself; `claude-runner status` shows up's.)",
                up_data.display()
            );
        }
    }
    r.failures == 0
}

/// Each step of the dial, and of the probe, is bounded as the agent's handshake is.
const HANDSHAKE: Duration = Duration::from_millis(shared::protocol::HANDSHAKE_TIMEOUT_MS);

/// What the probe needs: the agent's identity as the agent would present it.
struct Probe {
    agent_id: String,
    signing_key: ed25519_dalek::SigningKey,
    edge_public_key: ed25519_dalek::VerifyingKey,
    pool: String,
}

/// Why the keys were not found to agree: a check that fails (which one, why), or an edge
/// that could not be asked.
enum KeysRefused {
    Fail(&'static str, String),
    Unchecked(String),
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Dials the edge and reads its challenge; with `probe`, answers it with a probe
/// ([`AgentMessage::Probe`]): the edge checks the agent's key as it checks a hello and
/// signs a welcome with its own, and the agent's running connection, if any, is left
/// alone (a hello would replace it). Returns what the edge is, and what the probe found.
async fn reach(url: &str, probe: Option<&Probe>) -> Result<(String, Option<Result<String, KeysRefused>>), String> {
    // With the agent's key, the upgrade carries its proof, as the agent's own dial does;
    // without it the edge refuses the socket, which still shows it is there.
    // The probe's nonce, for the edge to sign in its challenge as it does the agent's.
    let agent_nonce = crate::upgrade::nonce();
    let request = match probe {
        Some(p) => crate::upgrade::request(url, &p.agent_id, &p.pool, &p.signing_key, &agent_nonce),
        None => tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url),
    };
    let request = request.map_err(|e| format!("cannot dial {url}: {e}; check EDGE_URL"))?;
    let dial = tokio_tungstenite::connect_async(request);
    let (mut ws, _) = match tokio::time::timeout(HANDSHAKE, dial).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) if response.status().as_u16() == 401 => {
            let reached = format!("{url} answers, and opens agent connections only to agents that prove their key");
            let why = crate::upgrade::refused(url, &response).map(|why| shared::text::peer_words(&why)).unwrap_or_default();
            let refused = |p: &Probe| Err(KeysRefused::Fail("agent key", format!("the edge refuses agent `{}`: {why}", p.agent_id)));
            return Ok((reached, probe.map(refused)));
        }
        Ok(Err(e)) => return Err(format!("cannot reach {url}: {e}; check EDGE_URL and that the edge is deployed")),
        Err(_) => return Err(format!("no answer from {url} within {} s; check EDGE_URL and the network", HANDSHAKE.as_secs())),
    };
    let first = tokio::time::timeout(HANDSHAKE, ws.next()).await;
    let reached = match first {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<EdgeMessage>(&text) {
            Ok(EdgeMessage::Challenge { protocol, edge_version, nonce, proof, .. }) if protocol == PROTOCOL_VERSION => {
                Ok((format!("{url} answers (edge {}, protocol v{protocol})", shared::text::one_line(&edge_version)), nonce, proof))
            }
            Ok(EdgeMessage::Challenge { protocol, edge_version, .. }) => Err(format!(
                "{url} speaks protocol v{protocol} (edge {}), this agent v{PROTOCOL_VERSION}: run the same claude-runner release on both",
                shared::text::one_line(&edge_version)
            )),
            _ => Err(format!("{url} answered, but not as a claude-runner edge; check EDGE_URL")),
        },
        _ => Err(format!("{url} accepted the connection but sent no challenge; check EDGE_URL points at a claude-runner edge")),
    };
    let outcome = match (reached, probe) {
        (Ok((detail, challenge, proof)), Some(probe)) => {
            let proven = crate::upgrade::edge_proven(url, proof.as_deref(), &probe.edge_public_key, &challenge, &agent_nonce, &probe.pool);
            let checked = match proven {
                Ok(()) => ask(&mut ws, url, &challenge, &agent_nonce, probe).await,
                // The agent sends no hello to such an edge: the probe asks nothing either.
                Err(why) => Err(KeysRefused::Fail("edge key", why)),
            };
            Ok((detail, Some(checked)))
        }
        (Ok((detail, ..)), None) => Ok((detail, None)),
        (Err(e), _) => Err(e),
    };
    // Bounded too: the close frame waits for room in a connection the edge may not read.
    let _ = tokio::time::timeout(CLOSE_TIME, ws.close(None)).await;
    outcome
}

/// How long doctor tries to close its connection politely before it leaves it.
const CLOSE_TIME: Duration = Duration::from_secs(2);

/// Sends the probe on a challenged connection and reads the edge's answer.
async fn ask(ws: &mut WsStream, url: &str, challenge: &str, agent_nonce: &str, probe: &Probe) -> Result<String, KeysRefused> {
    let ephemeral = shared::link::Ephemeral::new(runtime::entropy());
    let now = crate::now_ms();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: probe.agent_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        challenge: challenge.to_string(),
        agent_nonce: agent_nonce.to_string(),
        ephemeral: ephemeral.public(),
        issued_at: now,
        capacity: 0,
        running: Vec::new(),
        finished: Vec::new(),
        more_finished: false,
        oauth: OAuthReport::unconfigured(now),
        claude_version: None,
        labels: Default::default(),
        mirrors: Vec::new(),
        // A probe is no agent process: it replaces and refuses nothing.
        instance: None,
    };
    let envelope = Envelope::seal(Domain::Probe, &hello, &probe.signing_key);
    let frame = AgentMessage::Probe { protocol: PROTOCOL_VERSION, agent_id: probe.agent_id.clone(), envelope }.to_text();
    let unanswered = |why: String| KeysRefused::Unchecked(format!("the keys were not checked against the edge: {why}"));
    match tokio::time::timeout(HANDSHAKE, futures_util::SinkExt::send(ws, Message::text(frame))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(unanswered(format!("the probe could not be sent ({e})"))),
        Err(_) => return Err(unanswered(format!("the probe could not be sent within {} s", HANDSHAKE.as_secs()))),
    }
    // One deadline for the whole wait, as the agent's handshake has: a time for each frame
    // started again at each ping or binary frame, and an edge that sent one every few
    // seconds held doctor for ever.
    let answer_by = tokio::time::Instant::now() + HANDSHAKE;
    let answer = loop {
        match tokio::time::timeout_at(answer_by, ws.next()).await {
            Err(_) => return Err(unanswered(format!("{url} did not answer within {} s", HANDSHAKE.as_secs()))),
            Ok(None) | Ok(Some(Err(_))) => return Err(unanswered(format!("{url} closed the connection without a word"))),
            Ok(Some(Ok(Message::Close(frame)))) => {
                let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((0, String::new()));
                break EdgeMessage::Goodbye { code, reason };
            }
            Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<EdgeMessage>(&text) {
                Ok(message) => break message,
                Err(_) => return Err(unanswered(format!("{url} answered the probe with something else than a welcome"))),
            },
            Ok(Some(Ok(_))) => continue,
        }
    };
    match answer {
        EdgeMessage::Welcome { envelope } => {
            let welcome: Welcome = envelope.open(Domain::Welcome, &probe.edge_public_key).map_err(|e| {
                KeysRefused::Fail(
                    "edge key",
                    format!(
                        "the edge's welcome does not verify with EDGE_PUBLIC_KEY ({e}): the edge signs with another key; set \
                         EDGE_PUBLIC_KEY to the public half of the edge's EDGE_SIGNING_KEY, as printed by the `claude-runner keygen` \
                         run that made it"
                    ),
                )
            })?;
            if welcome.agent_nonce != agent_nonce || welcome.agent_id != probe.agent_id {
                return Err(KeysRefused::Fail("edge key", "the edge's welcome answers another connection; run doctor again".into()));
            }
            if welcome.pool != probe.pool {
                return Err(KeysRefused::Fail(
                    "edge",
                    format!(
                        "the edge welcomes this agent into pool `{}`, but it serves pool `{}`: point EDGE_URL at .../pool/{} (or set EDGE_POOL to the pool it dials)",
                        shared::text::truncate(&welcome.pool, 64),
                        probe.pool,
                        probe.pool
                    ),
                ));
            }
            Ok(format!(
                "the edge knows agent `{}` by this AGENT_SIGNING_KEY, and its welcome verifies with EDGE_PUBLIC_KEY (pool `{}`)",
                probe.agent_id, probe.pool
            ))
        }
        // Only a refusal of the agent's identity is the agent key's fault; anything else (an
        // edge stopping, one that closed the probe to make room, an edge of before probes,
        // which closes a connection whose first word is not a hello) leaves it unchecked.
        EdgeMessage::Goodbye { code: close::UNAUTHORIZED, reason } => {
            Err(KeysRefused::Fail("agent key", format!("the edge refuses agent `{}`: {}", probe.agent_id, shared::text::peer_words(&reason))))
        }
        EdgeMessage::Goodbye { code: close::VERSION_MISMATCH, reason } => Err(KeysRefused::Fail("edge", shared::text::peer_words(&reason))),
        EdgeMessage::Goodbye { code: close::PROTOCOL_ERROR, .. } => {
            Err(unanswered("the edge did not take the probe (an edge of an older release?); the agent's own connection will say".into()))
        }
        EdgeMessage::Goodbye { code, reason } => Err(unanswered(format!("{url} closed the probe ({code} {})", shared::text::peer_words(&reason)))),
        _ => Err(unanswered(format!("{url} answered the probe with something else than a welcome"))),
    }
}
