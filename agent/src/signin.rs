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
    say(err, format!("Open this URL in a browser (Anthropic's sign-in page, on {host}), sign in, and paste the code it shows (agent {agent}):"))?;
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
            "error": "the login on the runner failed: bad code. Start again with POST /oauth/login (or `claude auth login` on the runner)",
        });
        let edge = super::LoginArgs {
            edge: crate::submit::EdgeArgs { edge: Some(edge_answering(502, body.to_string()).await), secret: Some("s".into()), allow_insecure_edge: false },
            agent_id: None,
        };
        let (mut err, mut out) = (Vec::new(), Vec::new());
        assert_eq!(super::run_to(&mut err, &mut out, &mut &b"a-code\n"[..], edge).await.unwrap(), 1);
        let said = String::from_utf8(err).unwrap();
        assert!(said.contains("bad code. Run `claude-runner login` again (or `claude auth login` on the runner)"), "{said}");
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
        };
        let (mut err, mut out) = (Vec::new(), Vec::new());
        assert_eq!(super::run_to(&mut err, &mut out, &mut &b""[..], edge).await.unwrap(), 2);
        let shown = String::from_utf8([err, out].concat()).unwrap();
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
        assert!(shown.contains("no agent") && shown.contains("fine"), "{shown}");
    }
}
