//! The agent's side of the re-login relay: a signed order from the edge starts
//! `claude auth login`, its authorization URL goes back to the edge, a second
//! signed order hands it the code the person pasted, and the outcome (with the login as
//! the agent now reads it) goes back too. One login at a time: a new start replaces the
//! one under way. The process is killed after [`CODE_WAIT`] without a code. The URL and
//! the code are never logged; the credentials it writes stay on this machine. Its stdin,
//! stdout and stderr are socket pairs ([`crate::process::stream`]), not pipes: a job (the
//! agent's user) could reopen a pipe of the dumpable CLI through `/proc/<pid>/fd/N`, to
//! read the code as it goes in or write a sign-in URL of its own for the operator.
//!
//! What the real CLI does (checked with 2.1.197, the version the tests pin, inside
//! `unshare -n`; 2.1.332 behaves the same but prints the URL on a line of its own):
//! `claude auth login` (flags `--claudeai`, the default, `--console`, `--sso`, `--email`)
//! needs no TTY. On stdout it prints `Opening browser to sign in…`, then
//! `If the browser didn't open, visit: https://claude.com/cai/oauth/authorize?code=true&…`,
//! then `Paste code here if prompted > ` with no newline, and reads one line from stdin.
//! It exchanges the code at Anthropic's token endpoint (which cannot be pointed elsewhere:
//! `CLAUDE_CODE_CUSTOM_OAUTH_URL` accepts only Anthropic's own hosts), writes
//! `.credentials.json` and prints `Login successful.` (exit 0), or prints
//! `Login failed: <why>` on stderr and exits 1 (offline: `getaddrinfo ECONNREFUSED
//! platform.claude.com`).

use crate::agent::Agent;
use shared::oauth::LoginHealth;
use shared::protocol::{AgentMessage, LoginAction, LoginOrder, LoginReport, LoginState};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How long `claude auth login` may take to print its URL.
pub const URL_WAIT: Duration = Duration::from_secs(60);
/// How long it waits for the code before it is killed.
pub const CODE_WAIT: Duration = Duration::from_secs(600);
/// How long it may take to finish once it has the code.
pub const FINISH_WAIT: Duration = Duration::from_secs(120);
/// Output kept for reading the URL and the failure reason.
const KEEP_BYTES: usize = 64 * 1024;

/// The environment `claude auth login` gets: what it needs to find its config, reach
/// Anthropic (proxies, certificates) and nothing of the agent's own (keys, tokens).
const PASSED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY",
    "https_proxy", "http_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
];

/// The login under way, if any.
#[derive(Default)]
pub struct Relogin {
    current: Mutex<Option<Current>>,
}

struct Current {
    login_id: String,
    /// The code, with the nonce of the order that brought it.
    code: Option<oneshot::Sender<(String, String)>>,
    /// Dropped to stop the login (a newer one replaces it).
    _stop: oneshot::Sender<()>,
}

impl Relogin {
    /// Carries out a verified order.
    pub fn on_order(&self, agent: &Arc<Agent>, order: LoginOrder) {
        let login_id = order.header.job_id.clone();
        let nonce = order.header.nonce.clone();
        match order.action {
            LoginAction::Start => {
                let (code_tx, code_rx) = oneshot::channel();
                let (stop_tx, stop_rx) = oneshot::channel();
                let replaced = self.current.lock().expect("relogin lock").replace(Current { login_id: login_id.clone(), code: Some(code_tx), _stop: stop_tx });
                if let Some(old) = replaced {
                    info!(agent_id = %agent.cfg.agent_id, login_id = %old.login_id, "login replaced by a newer one");
                }
                info!(agent_id = %agent.cfg.agent_id, login_id = %login_id, "starting `claude auth login`");
                tokio::spawn(run(Arc::clone(agent), login_id, nonce, code_rx, stop_rx));
            }
            LoginAction::Code { code } => {
                let sender = {
                    let mut current = self.current.lock().expect("relogin lock");
                    current.as_mut().filter(|c| c.login_id == login_id).and_then(|c| c.code.take())
                };
                match sender.map(|tx| tx.send((code, nonce.clone()))) {
                    Some(Ok(())) => info!(agent_id = %agent.cfg.agent_id, login_id = %login_id, "login code received"),
                    _ => progress(agent, &login_id, &nonce, LoginState::Failed, None, Some("no login with this id is waiting for a code on the agent (it ended or was replaced)".into())),
                }
            }
        }
    }

    /// The login `login_id` ended: forget it (unless a newer one replaced it).
    fn ended(&self, login_id: &str) {
        let mut current = self.current.lock().expect("relogin lock");
        if current.as_ref().is_some_and(|c| c.login_id == login_id) {
            *current = None;
        }
    }
}

/// Tells the edge how the login goes, MACed and bound to the order `order_nonce` it
/// answers (the edge lets held work go on a `LoggedIn`: nobody on the path may forge one).
fn progress(agent: &Agent, login_id: &str, order_nonce: &str, state: LoginState, url: Option<String>, error: Option<String>) {
    let oauth = (state == LoginState::LoggedIn).then(|| agent.reporter.report());
    // The URL under this agent's own key, which the edge cannot make: `claude-runner
    // login` shows no URL the edge (or a hop in front of it) put there instead.
    let url_proof = url.as_ref().map(|url| shared::protocol::LoginUrlClaim::sign(&agent.cfg.signing_key, login_id, &agent.cfg.agent_id, url, crate::now_ms()));
    let report = LoginReport { login_id: login_id.to_string(), order_nonce: order_nonce.to_string(), state, url, error, oauth, url_proof };
    agent.link.seal_and_send(&agent.uplink, |key| AgentMessage::login(&report, key));
}

/// What [`find_url`] found in what `claude auth login` printed so far.
#[derive(Debug, Default)]
pub struct Found {
    /// The sign-in URL, if it printed one.
    pub url: Option<String>,
    /// Why each authorization URL was passed over (words of
    /// [`shared::oauth::sign_in_host`], which name the host, never the whole URL).
    pub refused: Vec<String>,
    /// How many other sign-in URLs (genuine, different from `url`) it holds: each is
    /// another `claude auth login`'s, written here by another process.
    pub others: usize,
}

/// The sign-in URL in what `claude auth login` printed so far: the first `https://` word
/// that is an authorization URL of Anthropic's ([`shared::oauth::sign_in_host`]). Another
/// process may write into the CLI's output too, before the CLI prints its own URL: its
/// stdout is a socket no other process reopens, but one that can trace the CLI can (at
/// `kernel.yama.ptrace_scope` 0 any process of the agent's user, one a job left
/// running). An authorization URL elsewhere is passed over, and other genuine ones are
/// counted ([`written_over`]).
pub fn find_url(printed: &str) -> Found {
    let mut found = Found::default();
    let words = printed.split(|c: char| c.is_whitespace()).map(|w| w.trim_end_matches(['.', ',', ')', '>']));
    for word in words.filter(|w| w.starts_with("https://") && w.contains("/oauth/authorize")) {
        match (shared::oauth::sign_in_host(word), &found.url) {
            (Ok(_), None) => found.url = Some(word.to_string()),
            (Ok(_), Some(first)) if first == word => {}
            (Ok(_), Some(_)) => found.others += 1,
            (Err(why), _) => found.refused.push(why),
        }
    }
    found
}

/// Why the login must stop when what `claude auth login` printed holds more than one
/// sign-in URL: a genuine one of another `claude auth login` (its own state and PKCE)
/// cannot be told from the CLI's own, whichever came first, so neither is trusted.
pub fn written_over(printed: &str) -> Option<String> {
    (find_url(printed).others > 0).then(|| {
        "`claude auth login` printed more than one sign-in URL: another process wrote to this login's output (look for processes the jobs left running, `ps -u` the agent's user, and end them); start the login again".to_string()
    })
}

/// Why a login failed, from what it printed: its last meaningful line, without the code.
pub fn failure_reason(printed: &str, code: &str) -> String {
    // The prompt has no newline: what follows it (its stderr) lands on the same line.
    let line = printed
        .lines()
        .map(|l| l.trim().trim_start_matches("Paste code here if prompted >").trim())
        .rev()
        .find(|l| !l.is_empty() && !l.contains("https://"))
        .unwrap_or("it printed nothing");
    let line = if code.is_empty() { line.to_string() } else { line.replace(code, "[the code]") };
    shared::text::truncate(&line, 300).to_string()
}

/// Kills `claude auth login` and anything it started (its own process group).
fn kill_group(pgid: u32) {
    // Group 0 would be the agent's own.
    if pgid != 0 {
        // SAFETY: kill(2) with a negative pid signals the process group; no memory involved.
        unsafe {
            libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
        }
    }
}

async fn run(agent: Arc<Agent>, login_id: String, start_nonce: String, code_rx: oneshot::Receiver<(String, String)>, stop_rx: oneshot::Receiver<()>) {
    // The outcome answers the newest order of this login: its start, then its code.
    let mut answering = start_nonce;
    let outcome = drive(&agent, &login_id, &mut answering, code_rx, stop_rx).await;
    agent.relogin.ended(&login_id);
    match outcome {
        Ok(()) => {
            // The new login is the person's, not a job's doing.
            agent.login.relayed_login();
            // The new credentials are on disk: tell the edge at once.
            agent.reporter.look();
            let report = agent.reporter.report();
            if report.health(crate::now_ms()) == LoginHealth::Broken {
                let why = "`claude auth login` ended, but the agent still reads no usable login".to_string();
                warn!(agent_id = %agent.cfg.agent_id, login_id = %login_id, "login ended without a usable login");
                progress(&agent, &login_id, &answering, LoginState::Failed, None, Some(why));
            } else {
                info!(agent_id = %agent.cfg.agent_id, login_id = %login_id, "login succeeded");
                progress(&agent, &login_id, &answering, LoginState::LoggedIn, None, None);
            }
        }
        Err(Some(why)) => {
            warn!(agent_id = %agent.cfg.agent_id, login_id = %login_id, reason = %why, "login failed");
            progress(&agent, &login_id, &answering, LoginState::Failed, None, Some(why));
        }
        // Replaced by a newer login: that one reports.
        Err(None) => {}
    }
}

/// Reads an output stream into a shared buffer (the newest [`KEEP_BYTES`]) until it ends.
fn collect(mut output: impl AsyncRead + Unpin + Send + 'static, into: Arc<Mutex<String>>, news: mpsc::UnboundedSender<()>) {
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = output.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut text = into.lock().expect("output lock");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.len() > KEEP_BYTES {
                let keep = shared::text::tail(&text, KEEP_BYTES / 2).to_string();
                *text = keep;
            }
            drop(text);
            let _ = news.send(());
        }
    });
}

/// Runs one login to its end. `Err(None)`: it was replaced.
async fn drive(
    agent: &Agent,
    login_id: &str,
    answering: &mut String,
    code_rx: oneshot::Receiver<(String, String)>,
    mut stop_rx: oneshot::Receiver<()>,
) -> Result<(), Option<String>> {
    let cfg = &agent.cfg;
    let mut cmd = Command::new(&cfg.claude_bin);
    cmd.args(["auth", "login"]).env_clear();
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    // The login goes where the agent reads it (and Claude's jobs do).
    if let Some(dir) = &cfg.claude_config_dir {
        cmd.env("CLAUDE_CONFIG_DIR", dir);
    }
    let stream = |what| crate::process::stream().map_err(|e| Some(format!("could not make `claude auth login`'s {what} ({e}); the agent may be out of file descriptors")));
    let ((mut stdin, stdin_cli), (stdout, stdout_cli), (stderr, stderr_cli)) = (stream("stdin")?, stream("stdout")?, stream("stderr")?);
    // A server has no browser to open; the URL goes to the person instead.
    cmd.env("BROWSER", "true")
        .stdin(stdin_cli)
        .stdout(stdout_cli)
        .stderr(stderr_cli)
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl only sets a flag on the child between fork and exec: the login dies
    // with the agent. restore_in_child is async-signal-safe: the descriptor limit
    // `claude-runner up` started with, not the one it raised.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            runtime::nofile::restore_in_child()
        });
    }
    let spawned = cmd.spawn();
    // The command holds the CLI's ends of its streams: closed now, so that its output ends
    // when the CLI (and what it started) closes it.
    drop(cmd);
    let mut child = spawned.map_err(|e| Some(format!("could not start `{} auth login`: {e}; check CLAUDE_BIN", cfg.claude_bin)))?;
    let pgid = child.id().unwrap_or(0);
    let printed = Arc::new(Mutex::new(String::new()));
    let (news_tx, mut news) = mpsc::unbounded_channel();
    collect(stdout, Arc::clone(&printed), news_tx.clone());
    collect(stderr, Arc::clone(&printed), news_tx);
    let outcome = async {
        // 1. The URL.
        let url_by = tokio::time::Instant::now() + URL_WAIT;
        // Its stdout and stderr both ended: what it printed is all there is, but it may
        // still run (and hang): its exit, the URL wait and a newer login still end it.
        let mut closed = false;
        // Each URL passed over is logged once (by its host: the URL is never logged).
        let mut told = std::collections::HashSet::new();
        let url = loop {
            let found = find_url(&printed.lock().expect("output lock"));
            for why in found.refused {
                if told.insert(why.clone()) {
                    warn!(agent_id = %cfg.agent_id, login_id, reason = %why, "`claude auth login`'s output holds an authorization URL that is not Anthropic's sign-in page (written there by another process?): not passed on");
                }
            }
            if found.others > 0 {
                return Err(written_over(&printed.lock().expect("output lock")));
            }
            if let Some(url) = found.url {
                break url;
            }
            tokio::select! {
                n = news.recv(), if !closed => closed = n.is_none(),
                _ = child.wait() => {
                    // Output may still be on its way.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Some(url) = find_url(&printed.lock().expect("output lock")).url { break url; }
                    return Err(Some(format!("`claude auth login` exited without printing a URL: {}", failure_reason(&printed.lock().expect("output lock"), ""))));
                }
                _ = tokio::time::sleep_until(url_by) => return Err(Some(format!("`claude auth login` printed no authorization URL within {} s", URL_WAIT.as_secs()))),
                _ = &mut stop_rx => return Err(None),
            }
        };
        info!(agent_id = %cfg.agent_id, login_id, "login waits for its code");
        progress(agent, login_id, answering, LoginState::AwaitingCode, Some(url), None);
        // 2. The code. Meanwhile a second sign-in URL (the URL passed on may be the other
        // process's, printed just before the CLI's own) ends the login.
        let mut code_rx = code_rx;
        let code_by = tokio::time::sleep(CODE_WAIT);
        tokio::pin!(code_by);
        let code = loop {
            if let Some(why) = written_over(&printed.lock().expect("output lock")) {
                return Err(Some(why));
            }
            tokio::select! {
                code = &mut code_rx => {
                    let (code, nonce) = code.map_err(|_| None)?;
                    *answering = nonce;
                    break code;
                }
                n = news.recv(), if !closed => closed = n.is_none(),
                _ = &mut code_by => return Err(Some(format!("no code came within {} minutes; start again", CODE_WAIT.as_secs() / 60))),
                _ = &mut stop_rx => return Err(None),
                status = child.wait() => return Err(Some(format!("`claude auth login` ended ({status:?}) before the code came: {}", failure_reason(&printed.lock().expect("output lock"), "")))),
            }
        };
        // With the code, `claude auth login` writes the new login: not while another Claude
        // on this login refreshes the old one (whose write would then replace the new
        // login), and no job starts a refresh until it is done. The gate of every job.
        let _refresher = tokio::select! {
            refresher = agent.gate.admit(&agent.login, login_id) => refresher.map_err(Some)?,
            _ = tokio::time::sleep(FINISH_WAIT) => return Err(Some(format!("another Claude on this login was still refreshing it after {} s; start again", FINISH_WAIT.as_secs()))),
            _ = &mut stop_rx => return Err(None),
        };
        // The last look before the code goes to a `claude auth login`.
        if let Some(why) = written_over(&printed.lock().expect("output lock")) {
            return Err(Some(why));
        }
        stdin.write_all(format!("{code}\n").as_bytes()).await.map_err(|e| Some(format!("could not pass the code on: {e}")))?;
        let _ = stdin.flush().await;
        // 3. The outcome.
        let status = tokio::select! {
            status = child.wait() => status.map_err(|e| Some(format!("lost `claude auth login`: {e}")))?,
            _ = tokio::time::sleep(FINISH_WAIT) => return Err(Some(format!("`claude auth login` did not finish within {} s of getting the code", FINISH_WAIT.as_secs()))),
            _ = &mut stop_rx => return Err(None),
        };
        // Let its output drain so the reason is complete.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if status.success() {
            Ok(())
        } else {
            Err(Some(format!("`claude auth login` failed ({status}): {}", failure_reason(&printed.lock().expect("output lock"), &code))))
        }
    }
    .await;
    kill_group(pgid);
    let _ = child.kill().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_url_in_either_layout() {
        // 2.1.197: the URL on the "visit:" line; 2.1.332: on a line of its own.
        let old = "Opening browser to sign in…\nIf the browser didn't open, visit: https://claude.com/cai/oauth/authorize?code=true&client_id=x&state=y\nPaste code here if prompted > ";
        let new = "Opening browser to sign in…\nIf the browser didn't open, visit:\nhttps://claude.ai/oauth/authorize?code=true&state=z\n\nPaste code here if prompted > ";
        assert_eq!(find_url(old).url.as_deref(), Some("https://claude.com/cai/oauth/authorize?code=true&client_id=x&state=y"));
        assert_eq!(find_url(new).url.as_deref(), Some("https://claude.ai/oauth/authorize?code=true&state=z"));
        assert_eq!(find_url("Opening browser to sign in…\nhttps://example.com/not-this").url, None);
        assert_eq!(find_url("Opening browser").url, None);
    }

    /// A process a job left behind could write into `claude auth login`'s stdout (through
    /// `/proc/<pid>/fd/1` while it was a pipe; one that can trace the CLI still can)
    /// before the CLI prints its URL: the first `https://` word with
    /// `/oauth/authorize` in it went to the operator as the sign-in page. Only a URL on one
    /// of Anthropic's sign-in hosts is taken; the others are passed over (and named).
    #[test]
    fn only_a_url_on_anthropics_sign_in_hosts_is_taken() {
        let real = "https://claude.com/cai/oauth/authorize?code=true&state=y";
        for planted in [
            "https://evil.example/oauth/authorize?code=true",
            "https://claude.ai@evil.example/oauth/authorize?x",
            "https://claude.ai.evil.example/oauth/authorize?x",
            "https://claude.ai:8443/oauth/authorize?x",
            "https://claude.ai/phish?next=/oauth/authorize",
        ] {
            let printed = format!("{planted}\nOpening browser to sign in…\nIf the browser didn't open, visit: {real}\n");
            let found = find_url(&printed);
            assert_eq!(found.url.as_deref(), Some(real), "{planted}");
            assert_eq!(found.refused.len(), 1, "{planted}: {:?}", found.refused);
            assert_eq!(find_url(planted).url, None, "{planted}");
        }
    }

    /// A process a job left running can also write a genuine sign-in URL, of its own
    /// `claude auth login` (its own state and PKCE), before the CLI prints its own: the
    /// first was taken. Two different sign-in URLs in one login's output fail the login.
    #[test]
    fn two_sign_in_urls_fail_the_login() {
        let theirs = "https://claude.ai/oauth/authorize?code=true&state=theirs";
        let ours = "https://claude.com/cai/oauth/authorize?code=true&state=ours";
        let printed = format!("{theirs}\nOpening browser to sign in…\nIf the browser didn't open, visit: {ours}\n");
        let why = written_over(&printed).expect("the login fails");
        assert!(why.contains("another process") && why.contains("left running") && !why.contains("state="), "{why}");
        // The CLI's own URL, printed twice (the same one): one URL.
        assert_eq!(written_over(&format!("visit: {ours}\n{ours}.\n")), None);
        assert_eq!(written_over(&format!("visit: {ours}\n")), None);
        // A URL passed over (not a sign-in page) is not a second one.
        assert_eq!(written_over(&format!("https://claude.ai/x/oauth/authorize?state=theirs\nvisit: {ours}\n")), None);
    }

    #[test]
    fn a_failure_names_the_reason_not_the_code() {
        let printed = "If the browser didn't open, visit: https://claude.com/cai/oauth/authorize?x\nPaste code here if prompted > Login failed: bad code abc123#def\n";
        let why = failure_reason(printed, "abc123#def");
        assert_eq!(why, "Login failed: bad code [the code]");
        assert_eq!(failure_reason("", ""), "it printed nothing");
    }
}
