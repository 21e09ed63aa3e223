//! `claude-runner doctor`: checks what the agent needs — the Claude binary, its login,
//! the keys, the edge — and says how to fix each problem it finds; with `--canary`, also
//! runs one tiny real job through the CLI ([`crate::canary`]).

use crate::config::AgentArgs;
use crate::edge_url::connect_url;
use crate::process::{find_binary, install_claude};
use futures_util::StreamExt;
use shared::keys;
use shared::protocol::{EdgeMessage, PROTOCOL_VERSION};
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

    let login = crate::oauth::Login::new(args.local.claude_config_dir());
    let status = crate::report::local_report(&login, &args.local.running_agent_dir()).status(crate::now_ms());
    let source = serde_json::to_value(status.source).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    if let Some(problem) = &status.problem {
        r.warn("login", problem);
    }
    if status.needs_login {
        let next = status.next_step.clone().unwrap_or_default();
        r.fail("login", format!("Claude cannot authenticate ({source}): {next}; or set CLAUDE_CODE_OAUTH_TOKEN from `claude setup-token`"));
    } else {
        let expiry = match (&status.expires_at, status.refreshable) {
            (Some(at), true) => format!(", access token until {at} (refreshed by Claude as needed)"),
            (Some(at), false) => format!(", valid until {at}: no refresh token, log in again before then"),
            (None, _) => String::new(),
        };
        r.ok("login", format!("{source}{expiry}"));
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
    match args.signing_key_text() {
        Err(e) => r.fail("agent key", e.to_string()),
        Ok(text) => match keys::signing_key("AGENT_SIGNING_KEY", &text) {
            Ok(key) => r.ok(
                "agent key",
                format!("the edge's AGENT_PUBLIC_KEYS must contain `{agent_id}={}`", keys::encode_verifying(&key.verifying_key())),
            ),
            Err(e) => r.fail("agent key", e.to_string()),
        },
    }
    match &args.edge_public_key {
        None => r.fail("edge key", "EDGE_PUBLIC_KEY is not set; it is printed by `claude-runner keygen` next to EDGE_SIGNING_KEY"),
        Some(text) => match keys::verifying_key("EDGE_PUBLIC_KEY", text) {
            Ok(_) => r.ok("edge key", "EDGE_PUBLIC_KEY is a valid public key"),
            Err(e) => r.fail("edge key", e.to_string()),
        },
    }

    match &args.edge_url {
        None => r.fail("edge", "EDGE_URL is not set; e.g. wss://claude-runner-edge.<you>.workers.dev"),
        Some(url) => match connect_url(url, args.allow_insecure_edge) {
            Err(e) => r.fail("edge", e.to_string()),
            Ok(url) => match reach(&url).await {
                Ok(detail) => r.ok("edge", detail),
                Err(e) => r.fail("edge", e),
            },
        },
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
    if r.failures == 0 {
        println!("All checks passed. `claude-runner status` shows whether the running agent is connected.");
    } else {
        println!("{} check(s) failed; fix them and run `claude-runner doctor` again.", r.failures);
        // Beside `up`, a newcomer's doctor has none of the settings it checks: `up` keeps
        // its own, and its agent is not the one these checks are about.
        if args.edge_url.is_none() && crate::config::agent_has_run(&crate::config::up_agent_dir(&args.local.data_dir())) {
            println!(
                "(`claude-runner up` runs with keys of its own, in {}: these checks are for an agent you set up \
                 yourself; `claude-runner status` shows up's.)",
                args.local.data_dir().join("up").display()
            );
        }
    }
    r.failures == 0
}

/// Dials the edge and reads its challenge. It does not answer it: proving the agent's key
/// would replace the connection of an agent already running with this id.
const HANDSHAKE: Duration = Duration::from_millis(shared::protocol::HANDSHAKE_TIMEOUT_MS);

async fn reach(url: &str) -> Result<String, String> {
    let dial = tokio_tungstenite::connect_async(url);
    let (mut ws, _) = match tokio::time::timeout(HANDSHAKE, dial).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return Err(format!("cannot reach {url}: {e}; check EDGE_URL and that the edge is deployed")),
        Err(_) => return Err(format!("no answer from {url} within {} s; check EDGE_URL and the network", HANDSHAKE.as_secs())),
    };
    let first = tokio::time::timeout(HANDSHAKE, ws.next()).await;
    let _ = ws.close(None).await;
    match first {
        Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) => match serde_json::from_str::<EdgeMessage>(&text) {
            Ok(EdgeMessage::Challenge { protocol, edge_version, .. }) if protocol == PROTOCOL_VERSION => {
                Ok(format!("{url} answers (edge {}, protocol v{protocol})", shared::text::one_line(&edge_version)))
            }
            Ok(EdgeMessage::Challenge { protocol, edge_version, .. }) => Err(format!(
                "{url} speaks protocol v{protocol} (edge {}), this agent v{PROTOCOL_VERSION}: run the same claude-runner release on both",
                shared::text::one_line(&edge_version)
            )),
            _ => Err(format!("{url} answered, but not as a claude-runner edge; check EDGE_URL")),
        },
        _ => Err(format!("{url} accepted the connection but sent no challenge; check EDGE_URL points at a claude-runner edge")),
    }
}
