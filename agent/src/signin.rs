//! `claude-runner login`: log the runner's Claude in again from any terminal. The edge
//! relays `claude auth login` to the agent (`POST /oauth/login`); this prints the URL to
//! open, reads the code the sign-in page shows, and sends it (`POST /oauth/login/code`).
//! Exit status: 0 logged in, 1 the login failed, 2 the edge could not start it (or the URL
//! could not be shown, the code not read).

use serde_json::{json, Value};
use crate::status::say;
use std::io::{BufRead, Write};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub edge: crate::submit::EdgeArgs,
    /// The agent to log in (default: the one that needs it).
    #[arg(long)]
    pub agent_id: Option<String>,
    /// The agents' public keys, `id=key,…` as the edge has them: the sign-in URL is shown
    /// only under its agent's signature. Unset, `up`'s own agent's key is used when the
    /// secret is `up`'s; else the URL is trusted from the edge (said once).
    #[arg(long, env = "AGENT_PUBLIC_KEYS")]
    pub agent_public_keys: Option<String>,
    /// Show the sign-in URL without an agent key to check it against: trusting the edge
    /// and whatever is in front of it (a hop ending TLS could show its own sign-in page and
    /// take the code with your account).
    #[arg(long)]
    pub trust_edge_url: bool,
}

/// How old an agent's claim over a sign-in URL may be: a relayed login waits 10 minutes
/// for its code, and `login` run again shows the same URL; with clocks some minutes apart.
const CLAIM_MAX_AGE_MS: u64 = 20 * 60 * 1000;
/// How far ahead of this machine's clock a claim may be dated (the agent's clock ahead).
const CLAIM_MAX_AHEAD_MS: u64 = 5 * 60 * 1000;

/// Whose signatures a sign-in URL is checked against: the keys given, or `up`'s own agent's
/// when the secret is `up`'s (its `up.json` under this environment's `DATA_DIR`); `None`:
/// none known, the URL is trusted from the edge.
fn trusted_keys(given: Option<&str>, secret: &str) -> Result<Option<shared::keys::Keyring>, String> {
    if let Some(text) = given {
        return shared::keys::Keyring::parse(text)
            .map(Some)
            .map_err(|e| format!("AGENT_PUBLIC_KEYS (or --agent-public-keys) does not read: {e}; give it as the edge has it, `id=base64 key,…`"));
    }
    let data_dir = crate::config::DataDirArgs { data_dir: std::env::var_os("DATA_DIR").map(std::path::PathBuf::from) }.data_dir();
    Ok(up_agent_key(&crate::config::up_state_file(&data_dir), secret))
}

/// `up`'s agent and its public key, from `up.json` at `path`, when `up` holds `secret`:
/// then this command talks to that `up`'s edge, whose agent is that one. A file `up`
/// would refuse as damaged ([`crate::config::UpState::read`]) gives none.
fn up_agent_key(path: &std::path::Path, secret: &str) -> Option<shared::keys::Keyring> {
    let state = crate::config::UpState::read(path).ok()?;
    if state.runner_secret != secret {
        return None;
    }
    let key = shared::keys::verifying_key("up's agent_public_key", &state.keys.agent_public_key).ok()?;
    Some(shared::keys::Keyring::from_keys([(state.agent_id, key)]))
}

/// Whether the URL the edge passed on is the one agent `agent` signed for login
/// `login_id`, by the keys known, recently by this machine's clock `now`. `Ok(None)`: no
/// key known (the caller decides whether the edge is trusted); `Ok(Some(_))`: checked.
fn url_signed(keys: Option<&shared::keys::Keyring>, answer: &Value, login_id: &str, agent: &str, url: &str, now: u64) -> Result<Option<()>, String> {
    let Some(keys) = keys else { return Ok(None) };
    let Some(key) = keys.get(agent) else {
        return Err(format!("the edge names agent `{agent}`, whose public key is not in AGENT_PUBLIC_KEYS; add it (`{agent}=<its public key>`, as the edge has it) or name the agent with --agent-id"));
    };
    let Some(proof) = answer["url_proof"].as_str() else {
        return Err("the edge passed on no signature of the agent's over the URL (an agent older than this command signs none: upgrade it; or the edge, or something in front of it, put its own URL there)".into());
    };
    let issued_at = shared::protocol::LoginUrlClaim::check(proof, key, login_id, agent, url)?;
    // An old claim names an old `claude auth login`, whose code is of no use without that
    // process; still, a URL shown as the agent's is one of this login's.
    if issued_at.saturating_add(CLAIM_MAX_AGE_MS) < now || issued_at > now.saturating_add(CLAIM_MAX_AHEAD_MS) {
        return Err(format!(
            "the agent signed this URL at {} by its clock, not within the last 20 minutes by this machine's (a URL of an old login played back; or a clock far off: check both)",
            shared::time::rfc3339(issued_at)
        ));
    }
    Ok(Some(()))
}

/// Why a request to the edge brought no answer of its.
enum Unanswered {
    /// The exchange failed (why).
    Failed(String),
    /// Its address answered with a redirect, not followed ([`crate::submit::redirected`]).
    Redirected(String),
}

/// The relay answers once the agent's `claude auth login` has printed its URL, or has the
/// outcome: allow for the edge's own wait.
const RELAY_TIME: std::time::Duration = std::time::Duration::from_secs(150);

/// POSTs `body` to the edge at `base`, at `path`.
async fn post(http: &reqwest::Client, base: &str, path: &str, secret: &str, body: Value) -> Result<(u16, Value), Unanswered> {
    let resp = match http.post(format!("{base}{path}")).header("X-Runner-Secret", secret).json(&body).timeout(RELAY_TIME).send().await {
        Ok(resp) => resp,
        Err(e) => {
            let why = crate::submit::request_error(&e);
            return Err(Unanswered::Failed(match crate::submit::speaks_tls(base).await {
                Some(tls) => format!("{why}; {tls}"),
                None => why,
            }));
        }
    };
    if let Some(why) = crate::submit::redirected(&resp) {
        return Err(Unanswered::Redirected(why));
    }
    let status = resp.status().as_u16();
    Ok((status, crate::submit::read_answer(resp).await))
}

pub async fn run(args: LoginArgs) -> anyhow::Result<i32> {
    match run_to(&mut std::io::stderr(), &mut std::io::stdout(), &mut std::io::stdin().lock(), args).await {
        // The URL not written (stdout a file on a full disk), the code not read (stdin not
        // text): said as the edge's failures are, with exit 2, not main's exit 1, which
        // says the login failed. A closed pipe still ends it quietly, in main.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() != std::io::ErrorKind::BrokenPipe) => {
            let _ = writeln!(std::io::stderr(), "claude-runner login: could not show the sign-in URL or read the code ({}); run `claude-runner login` again", shared::text::one_line(&e.to_string()));
            Ok(2)
        }
        ended => ended,
    }
}

/// The edge's words for a login that failed, as this command says them: the edge tells
/// its HTTP callers to start again with `POST /oauth/login`, which from a terminal is
/// running `claude-runner login` again.
fn as_the_cli_says(edge_words: &str) -> String {
    edge_words
        .replace("Start again with POST /oauth/login", "Run `claude-runner login` again")
        .replace("start again with POST /oauth/login", "run `claude-runner login` again")
}

/// [`run`], its messages written to `err` and the URL to `out`, each as one line with its
/// control characters escaped ([`crate::status::say`]): they carry the edge's words (its
/// `error`, the agent's id, the URL), and an edge, or whatever answers at its address, is
/// outside.
async fn run_to(err: &mut impl Write, out: &mut impl Write, input: &mut impl BufRead, args: LoginArgs) -> anyhow::Result<i32> {
    let (base, secret) = match args.edge.resolve() {
        Ok(edge) => edge,
        Err(what) => {
            say(err, format!("claude-runner login: {what}"))?;
            return Ok(2);
        }
    };
    // Before anything is started on the agent: keys that do not read, or none and no leave
    // to trust the edge, start no `claude auth login` there.
    let keys = match trusted_keys(args.agent_public_keys.as_deref(), &secret) {
        Ok(Some(keys)) => Some(keys),
        Ok(None) if args.trust_edge_url => None,
        Ok(None) => {
            say(err, "claude-runner login: no agent key to check the sign-in URL against, so nothing was started: set AGENT_PUBLIC_KEYS to the agent's `id=public key` as the edge has it (`claude-runner keygen` printed it; with `up`, set DATA_DIR to up's), or pass --trust-edge-url to trust the edge and whatever is in front of it with your login".into())?;
            return Ok(2);
        }
        Err(why) => {
            say(err, format!("claude-runner login: {why}"))?;
            return Ok(2);
        }
    };
    let http = crate::submit::edge_client(&base)?;
    let body = match &args.agent_id {
        Some(id) => json!({"agent_id": id}),
        None => json!({}),
    };
    let (status, start) = match post(&http, &base, "/oauth/login", &secret, body).await {
        Ok(answer) => answer,
        Err(Unanswered::Failed(e)) => {
            say(err, format!("claude-runner login: cannot reach the edge at {base}: {e}; check --edge (CLAUDE_RUNNER_URL)"))?;
            return Ok(2);
        }
        Err(Unanswered::Redirected(why)) => {
            say(err, format!("claude-runner login: the edge at {base} did not start a login: {why}"))?;
            return Ok(2);
        }
    };
    let (Some(login_id), Some(url)) = (start["login_id"].as_str(), start["url"].as_str()) else {
        say(err, format!("claude-runner login: the edge could not start a login ({status}): {}", as_the_cli_says(&crate::submit::refusal(status, &start))))?;
        return Ok(2);
    };
    // The edge passes on only a sign-in page of Anthropic's; checked again here, where it
    // is shown, since whatever answers at the edge's address is outside.
    let host = match shared::oauth::sign_in_host(url) {
        Ok(host) => host,
        Err(why) => {
            say(err, format!("claude-runner login: the edge's sign-in URL is not shown: {why}; run `claude-runner login` again, and check that CLAUDE_RUNNER_URL is your edge"))?;
            return Ok(2);
        }
    };
    let agent = start["agent_id"].as_str().unwrap_or("?");
    if let Some(asked) = args.agent_id.as_deref().filter(|asked| *asked != agent) {
        // The login is the agent's that takes the code: another's would log in with the
        // account meant for the one asked (a shared machine given a personal login).
        say(err, format!("claude-runner login: the edge started a login on agent `{agent}`, not on `{asked}` as asked: no code read; run `claude-runner login --agent-id {asked}` again, and check CLAUDE_RUNNER_URL is your edge"))?;
        return Ok(2);
    }
    // Only the agent's own key vouches for the URL: the report that carried it to the edge
    // is MACed with a key the edge holds, so an edge (or a hop ending TLS in front of it)
    // could show a genuine sign-in page of its own `claude auth login`, and take the code
    // with the operator's account (rev21-2).
    let vouched = match url_signed(keys.as_ref(), &start, login_id, agent, url, crate::now_ms()) {
        Ok(Some(())) => format!(", signed by agent {agent}'s key"),
        Ok(None) => {
            say(err, "note: --trust-edge-url: the URL is not checked, trusted from the edge and whatever is in front of it".into())?;
            String::new()
        }
        Err(why) => {
            say(err, format!("claude-runner login: the sign-in URL is not shown: {why}. Do not sign in through a URL the edge gave; check CLAUDE_RUNNER_URL and AGENT_PUBLIC_KEYS, then run `claude-runner login` again"))?;
            return Ok(2);
        }
    };
    say(err, format!("Open this URL in a browser (Anthropic's sign-in page, on {host}{vouched}), sign in, and paste the code it shows (agent {agent}):"))?;
    say(out, url.to_string())?;
    write!(err, "Code: ")?;
    err.flush()?;
    let mut code = String::new();
    input.read_line(&mut code)?;
    let code = code.trim();
    if code.is_empty() {
        say(err, "claude-runner login: no code given: nothing changed on the runner, and work goes on; its login waits 10 minutes for a code (`claude-runner login` again shows the same URL), then is given up".into())?;
        return Ok(1);
    }
    let (status, done) = match post(&http, &base, "/oauth/login/code", &secret, json!({"login_id": login_id, "code": code})).await {
        Ok(answer) => answer,
        Err(Unanswered::Failed(e)) => {
            say(err, format!("claude-runner login: lost the edge while sending the code: {e}; check GET /oauth/status"))?;
            return Ok(2);
        }
        Err(Unanswered::Redirected(why)) => {
            say(err, format!("claude-runner login: the edge at {base} did not take the code: {why}; run `claude-runner login` again"))?;
            return Ok(2);
        }
    };
    if done["state"] == "logged_in" {
        let oauth = &done["oauth"];
        let (source, kind) = (oauth["source"].as_str().unwrap_or("?"), oauth["subscription_type"].as_str().unwrap_or("subscription"));
        say(err, format!("Logged in: {source} ({kind}), work runs again."))?;
        return Ok(0);
    }
    say(err, format!("claude-runner login: the login failed ({status}): {}", as_the_cli_says(done["error"].as_str().unwrap_or("no readable answer"))))?;
    Ok(1)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An edge that answers every request with `status` and `body`, at a loopback address.
    async fn edge_answering(status: u16, body: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = vec![0; 64 * 1024];
                let _ = conn.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    /// A login that failed on the runner was told to "Start again with POST /oauth/login",
    /// the edge's words for its HTTP callers: from the terminal, run `claude-runner login`
    /// again.
    #[tokio::test]
    async fn a_failed_login_says_to_run_login_again() {
        // One answer for both requests: the login started (its id and URL), then failed.
        let body = serde_json::json!({
            "login_id": "l1", "url": "https://claude.ai/oauth/authorize?x", "state": "failed",
            "error": "the login on the runner failed: bad code. Start again with POST /oauth/login (or log in on the runner machine as README's \"First login\" says)",
        });
        let edge = super::LoginArgs {
            edge: crate::submit::EdgeArgs { edge: Some(edge_answering(502, body.to_string()).await), secret: Some("s".into()), allow_insecure_edge: false },
            agent_id: None,
            agent_public_keys: None,
            trust_edge_url: true,
        };
        let (mut err, mut out) = (Vec::new(), Vec::new());
        assert_eq!(super::run_to(&mut err, &mut out, &mut &b"a-code\n"[..], edge).await.unwrap(), 1);
        let said = String::from_utf8(err).unwrap();
        assert!(said.contains("bad code. Run `claude-runner login` again (or log in on the runner machine as README's \"First login\" says)"), "{said}");
        assert!(!said.contains("POST /oauth/login"), "{said}");
    }

    /// The URL is the sign-in page's only if it is on one of Anthropic's sign-in hosts,
    /// which is shown plainly beside it; any other (an edge's, or a URL planted in the
    /// runner's `claude auth login` output) is not shown at all.
    #[tokio::test]
    async fn only_a_sign_in_url_of_anthropics_is_shown_and_its_host_named() {
        let run = |url: &'static str| async move {
            let body = serde_json::json!({"login_id": "l1", "url": url, "agent_id": "spark", "state": "logged_in", "oauth": {}});
            let edge = super::LoginArgs {
                edge: crate::submit::EdgeArgs { edge: Some(edge_answering(200, body.to_string()).await), secret: Some("s".into()), allow_insecure_edge: false },
                agent_id: None,
                agent_public_keys: None,
                trust_edge_url: true,
            };
            let (mut err, mut out) = (Vec::new(), Vec::new());
            let code = super::run_to(&mut err, &mut out, &mut &b"a-code\n"[..], edge).await.unwrap();
            (code, String::from_utf8(err).unwrap(), String::from_utf8(out).unwrap())
        };
        let (code, err, out) = run("https://claude.ai/oauth/authorize?code=true").await;
        assert_eq!((code, out.trim()), (0, "https://claude.ai/oauth/authorize?code=true"), "{err}");
        assert!(err.contains("claude.ai"), "{err}");
        let (code, err, out) = run("https://evil.example/oauth/authorize?code=true").await;
        assert_eq!((code, out.as_str()), (2, ""), "{err}");
        assert!(err.contains("evil.example") && err.contains("claude.ai"), "{err}");
    }

    /// `login` printed the edge's words (its `error` when it refuses, the agent's id, the
    /// URL) raw to the operator's terminal, as `submit` did before 7a3aac0: an edge, or
    /// whatever answers at its address, is outside, and could set the terminal's
    /// clipboard (OSC 52) or title, or print over what was shown. Escaped, as `status`
    /// shows the status file.
    #[tokio::test]
    async fn the_edges_words_reach_the_terminal_without_their_control_sequences() {
        let body = serde_json::json!({"error": "no agent\x1b]52;c;ZXZpbA==\x07\x1b[2K\rfine"}).to_string();
        let edge = super::LoginArgs {
            edge: crate::submit::EdgeArgs { edge: Some(edge_answering(503, body).await), secret: Some("s".into()), allow_insecure_edge: false },
            agent_id: None,
            agent_public_keys: None,
            trust_edge_url: true,
        };
        let (mut err, mut out) = (Vec::new(), Vec::new());
        assert_eq!(super::run_to(&mut err, &mut out, &mut &b""[..], edge).await.unwrap(), 2);
        let shown = String::from_utf8([err, out].concat()).unwrap();
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
        assert!(shown.contains("no agent") && shown.contains("fine"), "{shown}");
    }

    /// An edge (or a hop ending TLS in front of it) answered with a genuine sign-in page of
    /// its own `claude auth login` — Anthropic's host, the attacker's PKCE state — and the
    /// operator's code went to it with their account (rev21-2). With the agent's key known,
    /// a URL without the agent's signature, with another key's, or with the agent's over
    /// another URL is not shown, and no code is read.
    #[tokio::test]
    async fn a_url_the_agent_did_not_sign_is_not_shown_and_no_code_is_read() {
        use ed25519_dalek::SigningKey;
        let agent = SigningKey::from_bytes(&[7; 32]);
        let keys = format!("spark={}", shared::keys::encode_verifying(&agent.verifying_key()));
        let url = "https://claude.ai/oauth/authorize?code=true&state=agents";
        let attackers = "https://claude.ai/oauth/authorize?code=true&state=attackers";
        let now = crate::now_ms();
        let signed_at = |key: &SigningKey, over: &str, at: u64| shared::protocol::LoginUrlClaim::sign(key, "l1", "spark", over, at);
        let signed = |key: &SigningKey, over: &str| signed_at(key, over, now);
        struct Run {
            shown: &'static str,
            proof: Option<String>,
            keys: Option<String>,
            trust: bool,
            asked: Option<&'static str>,
        }
        let run = |r: Run| async move {
            let mut body = serde_json::json!({"login_id": "l1", "url": r.shown, "agent_id": "spark", "state": "logged_in", "oauth": {}});
            if let Some(proof) = r.proof {
                body["url_proof"] = proof.into();
            }
            let edge = super::LoginArgs {
                edge: crate::submit::EdgeArgs { edge: Some(edge_answering(200, body.to_string()).await), secret: Some("s".into()), allow_insecure_edge: false },
                agent_id: r.asked.map(str::to_string),
                agent_public_keys: r.keys,
                trust_edge_url: r.trust,
            };
            let (mut err, mut out, mut input) = (Vec::new(), Vec::new(), &b"operators-code\n"[..]);
            let code = super::run_to(&mut err, &mut out, &mut input, edge).await.unwrap();
            (code, String::from_utf8(err).unwrap(), String::from_utf8(out).unwrap(), input.is_empty())
        };
        let keyed = |shown, proof| Run { shown, proof, keys: Some(keys.clone()), trust: false, asked: None };
        let other = SigningKey::from_bytes(&[8; 32]);
        for (what, r) in [
            ("no signature", keyed(attackers, None)),
            ("another key's", keyed(attackers, Some(signed(&other, attackers)))),
            ("the agent's, over its own URL", keyed(attackers, Some(signed(&agent, url)))),
            ("garbage", keyed(attackers, Some("1.xyz".to_string()))),
            ("the agent's, an hour old (played back)", keyed(url, Some(signed_at(&agent, url, now - 3_600_000)))),
            ("the agent's, an hour ahead", keyed(url, Some(signed_at(&agent, url, now + 3_600_000)))),
        ] {
            let (code, err, out, code_read) = run(r).await;
            assert_eq!((code, out.as_str(), code_read), (2, "", false), "{what}: {err}");
            assert!(err.contains("is not shown"), "{what}: {err}");
        }
        // An agent the keys do not name: not shown either.
        let rig_only = format!("rig={}", shared::keys::encode_verifying(&agent.verifying_key()));
        let (code, err, _, code_read) = run(Run { keys: Some(rig_only), ..keyed(url, Some(signed(&agent, url))) }).await;
        assert_eq!((code, code_read), (2, false), "{err}");
        assert!(err.contains("spark"), "{err}");
        // Keys that do not read: said, nothing shown.
        let (code, err, _, _) = run(Run { keys: Some("spark".into()), ..keyed(url, Some(signed(&agent, url))) }).await;
        assert!(code == 2 && err.contains("AGENT_PUBLIC_KEYS"), "{err}");
        // Another agent than the one asked for, even signed by its own key: not shown (rev23-3).
        let (code, err, out, code_read) = run(Run { asked: Some("rig"), ..keyed(url, Some(signed(&agent, url))) }).await;
        assert_eq!((code, out.as_str(), code_read), (2, "", false), "{err}");
        assert!(err.contains("not on `rig`"), "{err}");
        // The agent's own signature over the URL shown, now: shown, said so, the code read.
        let (code, err, out, code_read) = run(keyed(url, Some(signed(&agent, url)))).await;
        assert_eq!((code, out.trim(), code_read), (0, url, true), "{err}");
        assert!(err.contains("signed by agent spark's key"), "{err}");
        // No key known: nothing shown, nothing started, what to set said (rev23-1)...
        let (code, err, out, code_read) = run(Run { shown: url, proof: None, keys: None, trust: false, asked: None }).await;
        assert_eq!((code, out.as_str(), code_read), (2, "", false), "{err}");
        assert!(err.contains("AGENT_PUBLIC_KEYS") && err.contains("--trust-edge-url") && err.contains("nothing was started"), "{err}");
        // ...unless told to trust the edge: shown, with a note saying so.
        let (code, err, out, _) = run(Run { shown: url, proof: None, keys: None, trust: true, asked: None }).await;
        assert_eq!((code, out.trim()), (0, url), "{err}");
        assert!(err.contains("trusted from the edge"), "{err}");
    }

    /// `up`'s own agent's key is known without a setting when the secret is `up`'s: the
    /// login of a newcomer's `up` is checked too.
    #[test]
    fn ups_agent_key_is_known_when_the_secret_is_ups() {
        let dir = harness::TempDir::new("signin-up-key");
        let path = dir.path().join("up.json");
        let agent = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let keys = crate::keygen::KeySet {
            agent_signing_key: shared::keys::encode_signing(&agent),
            agent_public_key: shared::keys::encode_verifying(&agent.verifying_key()),
            ..crate::keygen::KeySet::generate()
        };
        let state = crate::config::UpState { keys, runner_secret: "up-secret-0123456789".into(), agent_id: "spark".into() };
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let keys = super::up_agent_key(&path, "up-secret-0123456789").expect("up's agent");
        assert_eq!(keys.get("spark"), Some(&agent.verifying_key()));
        assert!(super::up_agent_key(&path, "another-secret-0123456789").is_none(), "another edge's secret");
        assert!(super::up_agent_key(&dir.path().join("none.json"), "up-secret-0123456789").is_none());
    }

    /// `up.json` is a job's to rewrite (the same user), and `login` trusts a sign-in URL by
    /// the key it finds there: it reads the file as `up` does, checked. An
    /// `agent_public_key` of `KEY,intruder=KEY2` (which `up` refuses) had `login` trust a
    /// second agent's signature too.
    #[test]
    fn ups_state_a_job_rewrote_gives_no_key() {
        let dir = harness::TempDir::new("signin-up-rewritten");
        let path = dir.path().join("up.json");
        let (keys, intruder) = (crate::keygen::KeySet::generate(), crate::keygen::KeySet::generate());
        let mut state = serde_json::to_value(&keys).unwrap();
        state["runner_secret"] = "up-secret-0123456789".into();
        state["agent_id"] = "spark".into();
        std::fs::write(&path, state.to_string()).unwrap();
        assert!(super::up_agent_key(&path, "up-secret-0123456789").is_some_and(|k| k.len() == 1 && k.get("spark").is_some()));
        state["agent_public_key"] = format!("{},intruder={}", keys.agent_public_key, intruder.agent_public_key).into();
        std::fs::write(&path, state.to_string()).unwrap();
        assert!(super::up_agent_key(&path, "up-secret-0123456789").is_none(), "a second agent's key was taken from up.json");
    }
}
