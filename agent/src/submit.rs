//! `claude-runner submit`: send a task to an edge, show Claude's progress live (from
//! `GET /jobs/{id}/events`), then print the result. Exit status: 0 when the task
//! succeeded, 1 when it ran and failed, 2 when the edge could not take it, the result
//! could not be brought back (the edge lost, a stdout it cannot write), or for a usage error.

use crate::follow::{Next, Schedule};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// What Claude should do; `-` or nothing reads it from stdin.
    pub prompt: Option<String>,
    #[command(flatten)]
    pub edge: EdgeArgs,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub max_turns: Option<u32>,
    /// A tool Claude may use without asking; repeat for more.
    #[arg(long = "allowed-tool")]
    pub allowed_tools: Vec<String>,
    /// A tool Claude must not use; repeat for more.
    #[arg(long = "disallowed-tool")]
    pub disallowed_tools: Vec<String>,
    #[arg(long)]
    pub permission_mode: Option<String>,
    #[arg(long)]
    pub append_system_prompt: Option<String>,
    /// Continue an earlier result's session.
    #[arg(long)]
    pub session_id: Option<String>,
    #[arg(long)]
    pub working_dir: Option<String>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Print the whole result as JSON instead of Claude's final text.
    #[arg(long)]
    pub json: bool,
    /// Do not show progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// How long to keep following the job while the edge brings nothing (restarting, out
    /// of reach) before giving up: seconds, or 90s, 10m, 2h; 0 never gives up.
    #[arg(long, env = "CLAUDE_RUNNER_FOLLOW_FOR", default_value = crate::follow::DEFAULT_FOLLOW_FOR, value_parser = crate::follow::parse_budget)]
    pub follow_for: std::time::Duration,
}

/// Where `submit` and `login` reach the edge. Optional to clap, so that a missing one is
/// named by the setting the README uses, with where to find it: clap's own error names
/// only `--edge <EDGE>` and `--secret <SECRET>`.
#[derive(Debug, clap::Args)]
pub struct EdgeArgs {
    /// The edge's HTTP(S) URL, e.g. https://claude-runner-edge.<you>.workers.dev
    #[arg(long, env = "CLAUDE_RUNNER_URL")]
    pub edge: Option<String>,
    /// The runner secret (the pool's, or a caller's own), from the environment only: the
    /// flag is refused, since a command line is readable by every local user.
    #[arg(long, env = "RUNNER_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Send the secret over plaintext http:// to a host that is not this machine too (only
    /// on a private path: a VPN, an SSH tunnel). A value only as `--allow-insecure-edge=1`:
    /// a word after the flag is the prompt (it was taken as the flag's value, and refused).
    #[arg(long, env = "ALLOW_INSECURE_EDGE", value_parser = crate::setting_value::switch("ALLOW_INSECURE_EDGE"),
          default_value = "false", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub allow_insecure_edge: bool,
}

impl EdgeArgs {
    /// The edge's URL (without a trailing `/`) and the secret, or what to set.
    pub fn resolve(&self) -> Result<(String, String), String> {
        let Some(edge) = &self.edge else {
            return Err("no edge to talk to: set CLAUDE_RUNNER_URL (or --edge) to the edge's URL, \
                        e.g. https://claude-runner-edge.<you>.workers.dev, or http://127.0.0.1:8787 for `claude-runner up`"
                .into());
        };
        let Some(secret) = &self.secret else {
            // Where `up` run with this environment's DATA_DIR keeps it: the default folder
            // was named whatever DATA_DIR said.
            let data_dir = crate::config::DataDirArgs { data_dir: std::env::var_os("DATA_DIR").map(std::path::PathBuf::from) }.data_dir();
            return Err(missing_secret(&crate::config::up_state_file(&data_dir)));
        };
        let write_it = "write it whole, e.g. http://127.0.0.1:8787 or https://claude-runner-edge.<you>.workers.dev";
        // Refused here, before anything is sent: as a request's error it read as "the
        // exchange broke; the task may have been queued". Read once, by the parser reqwest
        // dials with: every check below is of the address dialled (read by hand,
        // `http:///edge.example.com` had no host, so it passed for this machine, and
        // `http://evil.com\@127.0.0.1` had 127.0.0.1, where the parser dials evil.com).
        // Not shown when it does not parse: where its password ends is then not known.
        let mut url = reqwest::Url::parse(edge.trim()).map_err(|e| {
            format!("CLAUDE_RUNNER_URL (--edge) is not a valid URL ({e}); it is not shown, as it may hold a password: {write_it}")
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            // Only its scheme is shown: what follows it may be `user:password@host`.
            return Err(format!(
                "CLAUDE_RUNNER_URL (--edge) is not an http(s) URL (it starts with `{}:`): {write_it}",
                shared::text::one_line(shared::text::truncate(url.scheme(), 40))
            ));
        }
        let carries_userinfo = !url.username().is_empty() || url.password().is_some();
        // Every message about the URL shows it so: a password in it is not for the screen.
        // (An http(s) URL always has a host, which takes a user name and a password.)
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let shown = shared::text::one_line(url.as_str().trim_end_matches('/'));
        if carries_userinfo {
            return Err(format!(
                "CLAUDE_RUNNER_URL (--edge) `{shown}` carries a user name or password: the edge reads none there; \
                 give the runner secret as RUNNER_SECRET and the URL without it"
            ));
        }
        // The paths the commands add (`/jobs`, `/oauth/login`) go after the URL's: after a
        // query or a fragment they would be part of it.
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("CLAUDE_RUNNER_URL (--edge) `{shown}` has a query or a fragment (`?`, `#`): the edge reads none; {write_it}"));
        }
        if let Some(host) = agent_core::edge_url::dialled_in_plaintext_beyond_this_machine(&url).filter(|_| !self.allow_insecure_edge) {
            return Err(format!(
                "CLAUDE_RUNNER_URL (--edge) `{shown}` is plaintext http:// to `{}`, which is not this machine: the runner secret, \
                 the task and its result would cross the network unencrypted. Use https:// (e.g. https://claude-runner-edge.<you>.workers.dev, \
                 or TLS in front of a native edge), or set ALLOW_INSECURE_EDGE=1 if the path is private (a VPN, an SSH tunnel)",
                shared::text::one_line(&host)
            ));
        }
        if reqwest::header::HeaderValue::from_str(secret).is_err() {
            return Err("RUNNER_SECRET is not valid in an HTTP header (it holds a line break or another control \
                        character): nothing was sent; set it in the environment to the secret alone, as `claude-runner keygen` \
                        or `up` printed it"
                .into());
        }
        // The address checked is the address dialled: the parser's own reading of it.
        Ok((url.as_str().trim_end_matches('/').to_string(), secret.clone()))
    }
}

/// `url` without the user name and password of its authority (`user:password@`), if any:
/// how an edge's URL may be shown.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let authority = rest.find(['/', '?', '#']).map_or(rest, |end| &rest[..end]);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The one HTTP client of the commands that send the runner secret to the edge at `base`
/// (`submit`, `login`). It follows no redirect: one turned a task into a GET of another
/// address (whose answer was taken for the edge's), and `login`'s code and the secret went
/// wherever it led; the answer is said instead ([`redirected`]). Its connection gets
/// [`CONNECT_TIME`]. A plain `http://` edge is dialled directly, whatever HTTP_PROXY or
/// ALL_PROXY say: through a proxy the secret crossed the network in plain text (even for
/// `http://127.0.0.1`, which a proxy elsewhere cannot reach anyway), the very thing the
/// rule for http:// forbids. An `https://` edge goes through HTTPS_PROXY (ALL_PROXY) when
/// set, as a network that allows no other way out needs: TLS still keeps the secret from it.
pub(crate) fn edge_client(base: &str) -> anyhow::Result<reqwest::Client> {
    let client = reqwest::Client::builder().connect_timeout(CONNECT_TIME).redirect(reqwest::redirect::Policy::none());
    Ok(if base.starts_with("http://") { client.no_proxy() } else { client }.build()?)
}

/// What a redirect (a 3xx) the edge's address answered with says, for a client that
/// follows none ([`edge_client`]): where it sends, and what to do if that is the edge.
/// `None` for an answer that is not one.
pub(crate) fn redirected(answer: &reqwest::Response) -> Option<String> {
    let status = answer.status();
    if !status.is_redirection() {
        return None;
    }
    let to = answer.headers().get(reqwest::header::LOCATION).and_then(|to| to.to_str().ok()).unwrap_or("nowhere said");
    Some(format!(
        "it answered {status}, sending it to {}; claude-runner follows no redirect (the runner secret would go along): \
         if that is the edge's own address, set --edge (CLAUDE_RUNNER_URL) to it",
        shared::text::one_line(shared::text::truncate(&without_userinfo(to), 200))
    ))
}

/// What to do without a runner secret: set one, or take `up`'s from `up_json`.
fn missing_secret(up_json: &std::path::Path) -> String {
    format!(
        "no runner secret: set RUNNER_SECRET in the environment; `claude-runner up` prints its own when it starts and keeps it in {} (`runner_secret`)",
        up_json.display()
    )
}

/// The edge's words for refusing a request (its `error`). The edge's 403 says to send the
/// secret in a header, which `submit` and `login` do already: theirs is the secret they
/// were given, so that is what a 403 says to check.
pub(crate) fn refusal(status: u16, answer: &Value) -> String {
    let error = answer["error"].as_str().unwrap_or("no readable answer");
    match status {
        403 => format!("{error} (the secret sent is RUNNER_SECRET: check it)"),
        _ => error.to_string(),
    }
}

/// Why a request to the edge failed, its causes included: reqwest's own line ("error
/// sending request for url (…)") leaves out the one that says what to do ("Connection
/// refused": the edge is not running there; a name that does not resolve; a certificate).
pub(crate) fn request_error(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    // https:// to a plain-http edge: rustls's words name no fix.
    if let Some(hint) = e.url().and_then(|url| agent_core::edge_url::plain_edge_hint(url.as_str().trim_end_matches('/'), &text)) {
        text = format!("{text}; {hint}");
    }
    text
}

/// Whether the server at `base`, an http:// URL whose request broke with no answer, speaks
/// TLS, and what to do if so: a TLS port closes a plain request unread (nothing of it was
/// taken, let alone queued), which read as an edge that broke after it took the task. Asked
/// with a request of no secret and no task (`GET /health`) to the same host and port over
/// https://, directly (as the request that broke went: a proxy's TLS would answer for it),
/// the certificate unchecked: only whether TLS answers is asked.
pub(crate) async fn speaks_tls(base: &str) -> Option<String> {
    let (https, health) = tls_probe(base)?;
    let probe = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .ok()?;
    probe.get(health).send().await.ok()?;
    Some(format!("the server at {base} speaks TLS, not plain http, and read nothing of the request: set --edge (CLAUDE_RUNNER_URL) to {https}"))
}

/// For an http:// `base`: the same address over https://, and its `/health`, on the same
/// port. A URL without a port is dialled on 80: asked on 443 (https's own), another server
/// answered, and a task a plain server on 80 had read was said not to be queued.
fn tls_probe(base: &str) -> Option<(String, reqwest::Url)> {
    let mut url = reqwest::Url::parse(base).ok().filter(|url| url.scheme() == "http")?;
    let port = url.port_or_known_default();
    // In this order: set first, 80 is http's own port and dropped, and https's 443 taken.
    url.set_scheme("https").ok()?;
    url.set_port(port).ok()?;
    let https = url.as_str().trim_end_matches('/').to_string();
    url.set_path(&format!("{}/health", url.path().trim_end_matches('/')));
    Some((https, url))
}

fn fail(message: String) -> anyhow::Result<i32> {
    Ok(fail_with(message))
}

/// Says why `submit` gives up (on stderr, whatever becomes of that write: this is the last
/// word) and gives its exit status, 2.
fn fail_with(message: String) -> i32 {
    let _ = writeln!(std::io::stderr(), "{}", failure_line(&message));
    2
}

/// The most of an edge's answer (other than an event stream) `submit` and `login` read: its
/// answers are a few hundred bytes; one without end would otherwise be held whole.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// How long the body of an edge's answer (other than an event stream) may take to arrive,
/// from its head: the edge sends its few hundred bytes at once, and even
/// [`MAX_ANSWER_BYTES`] take seconds on a slow link. Without it an answer whose head came
/// and then nothing (or a byte now and then) held `submit`, which has no time limit of its
/// own, for good.
pub(crate) const ANSWER_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// How long `submit` waits for its connection to the edge (name, TCP, TLS), well within
/// [`ANSWER_TIME`]: an address that takes none (a firewall that drops it, a host gone)
/// surely never got the task, and is said to be unreachable; without a time of its own the
/// answer's ran out first, and the task was said to be perhaps queued on an edge never reached.
const CONNECT_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest a followed job's event stream may be silent: three of the edges' keep-alive
/// intervals (they send one after at most [`shared::contract::SSE_KEEPALIVE_MS`] of
/// silence). Past it the connection is taken for dead and the job followed again.
const FOLLOW_SILENCE: std::time::Duration = std::time::Duration::from_millis(3 * shared::contract::SSE_KEEPALIVE_MS);

/// What to do when the task went out but its answer did not come back whole: the edge may
/// have queued it, and sending it again under another key would run it twice. Every task
/// goes with a key (`key`: `--idempotency-key`, or one made up for it), so the way to send
/// it again safely is always there to say.
fn may_be_queued(key: &str) -> String {
    format!(
        "the task may have been queued all the same: send it again with --idempotency-key {} (the edge answers with the first job, \
         so it runs once), or look for it with `GET /jobs`",
        crate::up::shell_word(key)
    )
}

/// A key made up for a task sent without `--idempotency-key`: 128 random bits.
fn made_up_key() -> String {
    format!("submit-{}", shared::ids::hex(&crate::keygen::random_bytes::<16>()))
}

/// The slowest upload a task's time allows for: 16 KiB/s (the edge takes 1 MiB by default,
/// so some 64 s more).
const SLOWEST_UPLOAD_BYTES_PER_S: usize = 16 * 1024;

/// An edge's answer as JSON, read up to [`MAX_ANSWER_BYTES`] within [`ANSWER_TIME`]: a
/// longer one, a slower one, one cut off or one that is not JSON is `Null` (shown as "no
/// readable answer").
pub(crate) async fn read_answer(mut resp: reqwest::Response) -> Value {
    let give_up_at = tokio::time::Instant::now() + ANSWER_TIME;
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout_at(give_up_at, resp.chunk()).await {
            Ok(Ok(Some(chunk))) if body.len() + chunk.len() <= MAX_ANSWER_BYTES => body.extend_from_slice(&chunk),
            Ok(Ok(None)) => return serde_json::from_slice(&body).unwrap_or(Value::Null),
            // Too long, too slow, or cut off.
            _ => return Value::Null,
        }
    }
}

/// What `submit` prints when it gives up. The message carries the edge's words (its
/// `error`, a job id, a state): shown as one line with its control characters escaped
/// ([`shared::text::one_line`], line breaks too), since an edge, or whatever answers at its
/// address, is outside too.
fn failure_line(message: &str) -> String {
    format!("claude-runner submit: {}", shared::text::one_line(message))
}

/// Text from a job (Claude's words: whatever the prompt, the repository or its tools'
/// output put in them) as a terminal may be given it: each control character but a line
/// break or a tab shown as its escape (`\u{1b}`), so that none can move the cursor, print
/// over what was shown, or reach the terminal's clipboard or title (OSC 52, OSC 0); and so
/// the bidi controls ([`shared::text::acts_on_display`]), which reorder what is shown.
fn for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if shared::text::acts_on_display(c) && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// One progress event as a line for a person, if it says something worth showing.
fn describe(event: &Value) -> Option<String> {
    describe_raw(event).map(|line| for_terminal(&line))
}

fn describe_raw(event: &Value) -> Option<String> {
    match event["type"].as_str()? {
        "system" if event["subtype"] == "init" => Some(format!("· session {} ({})", event["session_id"].as_str()?, event["model"].as_str().unwrap_or("?"))),
        "assistant" => {
            let parts: Vec<String> = event["message"]["content"]
                .as_array()?
                .iter()
                .filter_map(|c| match c["type"].as_str()? {
                    "text" => Some(c["text"].as_str()?.trim().to_string()),
                    "tool_use" => Some(format!("→ {} {}", c["name"].as_str()?, c["input"].to_string().chars().take(120).collect::<String>())),
                    _ => None,
                })
                .filter(|p| !p.is_empty())
                .collect();
            (!parts.is_empty()).then(|| parts.join("\n"))
        }
        "system" if event["subtype"] == "api_retry" => Some(format!("· API retry {}", event["attempt"])),
        agent_core::progress::DROPPED_TYPE => Some(format!(
            "· {} progress events dropped: the job printed faster than the link from its agent to the edge carries (its result is whole)",
            event["events"].as_u64()?
        )),
        _ => None,
    }
}

pub async fn run(args: SubmitArgs) -> anyhow::Result<i32> {
    // Before the prompt: one read from stdin is not waited out only to be told this.
    let (base, secret) = match args.edge.resolve() {
        Ok(edge) => edge,
        Err(what) => return fail(what),
    };
    let prompt = match args.prompt.as_deref() {
        Some(p) if p != "-" => p.to_string(),
        _ => {
            use std::io::IsTerminal;
            let stdin = std::io::stdin();
            // At a terminal, a `submit` with no prompt otherwise waits, saying nothing.
            if stdin.is_terminal() {
                eprintln!("· reading the prompt from stdin (Ctrl-D to end)…");
            }
            let mut text = String::new();
            // Exit 2, as clap's usage errors: 1 says the task ran and failed.
            if let Err(e) = stdin.lock().read_to_string(&mut text) {
                let what = if e.kind() == std::io::ErrorKind::InvalidData { "is not UTF-8 text".to_string() } else { format!("could not be read ({e})") };
                return fail(format!("the prompt on stdin {what}: nothing was sent"));
            }
            text
        }
    };
    let mut body = json!({"prompt": prompt});
    let fields = [
        ("timeout_ms", args.timeout_ms.map(Value::from)),
        ("model", args.model.clone().map(Value::from)),
        ("max_turns", args.max_turns.map(Value::from)),
        ("permission_mode", args.permission_mode.clone().map(Value::from)),
        ("append_system_prompt", args.append_system_prompt.clone().map(Value::from)),
        ("session_id", args.session_id.clone().map(Value::from)),
        ("working_dir", args.working_dir.clone().map(Value::from)),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            body[name] = v;
        }
    }
    // Always a key: an answer lost on the way back (a reset, a proxy giving up) left a task
    // sent without one impossible to send again safely.
    let key = args.idempotency_key.clone().unwrap_or_else(made_up_key);
    body["idempotency_key"] = Value::from(key.as_str());
    if !args.allowed_tools.is_empty() {
        body["allowed_tools"] = json!(args.allowed_tools);
    }
    if !args.disallowed_tools.is_empty() {
        body["disallowed_tools"] = json!(args.disallowed_tools);
    }
    let http = edge_client(&base)?;
    // The edge answers a task at once: the exchange is given ANSWER_TIME and its upload's
    // time at the slowest link's pace (an edge that took the task and never answered held
    // `submit`, which has no time limit, for good).
    let within = ANSWER_TIME + std::time::Duration::from_secs((serde_json::to_vec(&body)?.len() / SLOWEST_UPLOAD_BYTES_PER_S) as u64);
    let post = || tokio::time::timeout(within, http.post(format!("{base}/jobs")).header("X-Runner-Secret", &secret).json(&body).send());
    let mut sent = post().await;
    let mut retried = false;
    // An exchange that broke after the connection was made (a reset, a connection closed
    // before the answer) is sent once more, under the same key: the edge answers with the
    // job the first one made, if it made one, so the task runs once either way.
    if matches!(&sent, Ok(Err(e)) if !e.is_connect() && !e.is_builder()) {
        tracing::debug!("the exchange with the edge broke; sending the task again under its key");
        sent = post().await;
        retried = true;
    }
    let accepted = match sent {
        Ok(Ok(r)) => r,
        // The first send reached the edge: what it did with the task is not known.
        Ok(Err(e)) if e.is_connect() && retried => {
            return fail(format!("the exchange with the edge at {base} broke, and it could not be reached again: {}; {}", request_error(&e), may_be_queued(&key)))
        }
        Ok(Err(e)) if e.is_connect() => return fail(format!("cannot reach the edge at {base}: {}; check --edge (CLAUDE_RUNNER_URL)", request_error(&e))),
        Ok(Err(e)) if e.is_builder() => {
            return fail(format!("could not make the request to the edge at {base} ({}): nothing was sent; check --edge (CLAUDE_RUNNER_URL)", request_error(&e)))
        }
        Ok(Err(e)) => {
            if let Some(tls) = speaks_tls(&base).await {
                return fail(format!("the exchange with the edge at {base} broke: {}; {tls} (the task was not queued)", request_error(&e)));
            }
            return fail(format!("the exchange with the edge at {base} broke (twice): {}; {}", request_error(&e), may_be_queued(&key)));
        }
        Err(_) => return fail(format!("no answer from the edge at {base} within {} s; {}", within.as_secs(), may_be_queued(&key))),
    };
    let status = accepted.status();
    if let Some(why) = redirected(&accepted) {
        return fail(format!("the edge at {base} did not take the task: {why}"));
    }
    let answer = read_answer(accepted).await;
    let Some(job_id) = answer["job_id"].as_str().filter(|_| status.is_success()).map(str::to_string) else {
        let error = refusal(status.as_u16(), &answer);
        if status.is_success() {
            return fail(format!("the edge took the task ({status}) but sent no readable answer; {}", may_be_queued(&key)));
        }
        // The edge's own refusals say why; a 5xx that does not is a gateway's between here
        // and the edge (a proxy that gave up waiting): the task may have reached the edge.
        if status.is_server_error() && answer["error"].as_str().is_none() {
            return fail(format!("no answer of the edge's: {status} from whatever answers at {base} (a proxy in between?); {}", may_be_queued(&key)));
        }
        // An edge's own 5xx is a failure of its own, not a refusal: its words say whether
        // the task may have been queued (the native edge's storage failure: nothing was).
        if status.is_server_error() {
            return fail(format!("the edge failed to take the task ({status}): {error}"));
        }
        return fail(format!("the edge refused the task ({status}): {error}"));
    };
    // The id goes into the follow's path: one with `/`, `..` or `?` sent the follow, secret
    // and all, elsewhere on the edge's host (another service behind the same proxy). The
    // edges give plain ids.
    if !shared::ids::plain_id(&job_id, shared::ids::MAX_JOB_ID) {
        return fail(format!(
            "the edge took the task ({status}) but answered with a job id that is not one an edge gives (`{}`): not followed; look for the job with GET /jobs",
            shared::text::truncate(&job_id, 80)
        ));
    }
    if !args.quiet {
        eprintln!("· job {}", shared::text::one_line(&format!("{job_id} ({})", answer["state"].as_str().unwrap_or("queued"))));
    }
    // Why a queued job waits (a login to renew, no agent that fits…), said as the edge
    // first judged it, then again whenever that changes, until the job starts. Told only
    // `queued`, a person waited out QUEUE_TTL_MS for a login nobody knew was needed.
    let _waiting = (!args.quiet && answer["state"] == "queued").then(|| {
        let said = answer.get("waiting_for").filter(|w| !w.is_null()).cloned();
        if let Some(line) = said.as_ref().and_then(waiting_line) {
            eprintln!("{line}");
        }
        Watch(tokio::spawn(watch_waiting(http.clone(), format!("{base}/jobs/{job_id}"), secret.clone(), said)))
    });
    // Follow until the result; if the stream breaks (an edge restart) or stays silent past
    // FOLLOW_SILENCE (a half-open connection: the edge's host died, a NAT dropped the flow),
    // follow again from the last event read (`Last-Event-ID`), so no progress line is shown
    // twice: the job is kept, and a finished one answers with its result at once. When to
    // follow again, and when to give up, is the schedule's (`follow.rs`), which also says
    // when the follow under way is cut for it (`Schedule::cut_at`): biased, so that a
    // follow that starts as the budget ends is not even tried.
    let mut last_id: Option<String> = None;
    let mut schedule = Schedule::new(Some(args.follow_for).filter(|budget| !budget.is_zero()), Instant::now());
    // When a cut last fired long after it was due (`follow::overslept`): `submit` had not
    // run, and what the edge sent meanwhile is read before any cut.
    let mut woke: Option<Instant> = None;
    'follows: loop {
        // Its head comes at once (the stream itself may be quiet for as long as the job runs).
        let mut follow = http.get(format!("{base}/jobs/{job_id}/events")).header("X-Runner-Secret", &secret);
        if let Some(id) = &last_id {
            follow = follow.header("Last-Event-ID", id);
        }
        let cut = schedule.cut_at(woke);
        let sent = tokio::select! {
            biased;
            () = until(cut) => {
                if overslept(cut) {
                    woke = Some(Instant::now());
                    continue;
                }
                break;
            }
            sent = tokio::time::timeout(ANSWER_TIME, follow.send()) => sent,
        };
        // The stream, or why this follow brought nothing (said once when the edge is lost).
        let answered = match sent {
            Ok(Ok(r)) if r.status().is_success() => Ok(r),
            // The edge restarting behind a proxy (a Tunnel's 502), or failing for a moment:
            // no answer of the job's, so a follow that brought nothing, as a refused connection.
            Ok(Ok(r)) if r.status().is_server_error() => Err(r.status().to_string()),
            // Too many followers of this job (or of all jobs) for a moment: the streams of
            // followers gone away (submit's own earlier ones among them) are let go by the
            // edge in time; giving up at once told a caller its running job was lost.
            Ok(Ok(r)) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => Err(r.status().to_string()),
            Ok(Ok(r)) => return fail(format!("following job {job_id} failed ({}); read it with GET /jobs/{job_id}", r.status())),
            Ok(Err(e)) if e.is_connect() => Err("no connection".to_string()),
            Ok(Err(_)) => Err("the exchange broke".to_string()),
            Err(_) => Err(format!("no answer within {} s", ANSWER_TIME.as_secs())),
        };
        let resp = match answered {
            Ok(resp) => resp,
            Err(why) if follow_again(&mut schedule, &why, &job_id, args.quiet).await => continue,
            Err(_) => break,
        };
        let mut stream = resp.bytes_stream();
        let mut events = crate::sse::EventStream::default();
        let (mut brought_bytes, opened) = (false, Instant::now());
        let lasted = || opened.elapsed() >= std::time::Duration::from_millis(shared::contract::SSE_KEEPALIVE_MS);
        // When the stream last spoke: its head, then each byte.
        let mut heard = opened;
        // Ended, broken, or silent past every keep-alive (`silent`): follow again.
        let silent = loop {
            let cut = schedule.cut_at(Some(heard));
            let next = tokio::select! {
                biased;
                () = until(cut) => {
                    if overslept(cut) {
                        heard = Instant::now();
                        continue;
                    }
                    break 'follows;
                }
                next = tokio::time::timeout(FOLLOW_SILENCE, stream.next()) => next,
            };
            let chunk = match next {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) | Ok(Some(Err(_))) => break false,
                Err(_) => break true,
            };
            heard = Instant::now();
            brought_bytes = true;
            if lasted() {
                brought(&mut schedule, &job_id, args.quiet);
            }
            let read = events.push(&chunk);
            // Followed again from the last id the stream named (an event's, or a block's
            // without data, as the spec keeps it). An empty `id:` clears it (as an
            // EventSource's does): the stream is then followed from its start, not with an
            // empty Last-Event-ID the edges refuse.
            if let Some(id) = events.last_id() {
                last_id = Some(id.to_string()).filter(|id| !id.is_empty());
            }
            for event in read {
                let Ok(value) = serde_json::from_str::<Value>(&event.data) else {
                    // The edge gives a finished job's result to every follow: one that cannot
                    // be read comes again each time, and was followed for ever.
                    if event.name.as_deref() == Some("result") {
                        return fail(format!("the edge sent job {job_id}'s result in a form submit cannot read; read it with GET /jobs/{job_id}"));
                    }
                    continue;
                };
                // Only an event read brings something: an unreadable one (no edge sends it),
                // counted so, reset the budget at each follow of a garbage stream, for ever.
                brought(&mut schedule, &job_id, args.quiet);
                match event.name.as_deref() {
                    Some("progress") if !args.quiet => {
                        if let Some(line) = describe(&value) {
                            eprintln!("{line}");
                        }
                    }
                    Some("result") => return Ok(finish(&value, args.json, &job_id)),
                    _ => {}
                }
            }
        };
        // A stream that brought an event, or stayed open a keep-alive interval (a quiet
        // job's, ended by an edge's restart or broken by a Tunnel's cut), was worth
        // following, however often; one that stopped at once with no event (the edges'
        // `: … retry` when the job's record cannot be read), ended or cut, brought nothing:
        // answered so at once, it was followed for ever. (Cut at once was counted as worth
        // following, so a network that reset each stream after its first bytes held
        // `submit` for ever, saying nothing.) Told to the schedule as soon as known, above,
        // so that the edge is said to be back before the progress it brings. One taken for
        // dead (silent past FOLLOW_SILENCE) lasted only to its last byte, seen above: its
        // silence after it is no sign of life (counted so, a stream wedged after its first
        // comment reset the budget at each follow, and `submit` held for ever).
        if brought_bytes && !silent && lasted() {
            brought(&mut schedule, &job_id, args.quiet);
        }
        let why = if silent { format!("no byte for {} s", FOLLOW_SILENCE.as_secs()) } else { "the stream stopped with no event it could read".to_string() };
        if !follow_again(&mut schedule, &why, &job_id, args.quiet).await {
            break;
        }
    }
    let budget = crate::follow::shown(args.follow_for);
    fail(format!(
        "lost the edge while following job {job_id}: nothing from it for {budget}; read it later with GET /jobs/{job_id} \
         (the edge keeps it), or give submit a longer --follow-for (CLAUDE_RUNNER_FOLLOW_FOR) to wait longer"
    ))
}

/// How often `submit` asks why its queued job waits, until the job leaves the queue.
const WAITING_POLL: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest reason shown: the edge's sentences are far shorter.
const MAX_WAITING_BYTES: usize = 600;

/// A task that ends with `submit`'s follow, however that ends.
struct Watch(tokio::task::JoinHandle<()>);

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A job's `waiting_for` as `submit` says it: one line, its control characters escaped
/// (the edge's words), bounded.
fn waiting_line(waiting: &Value) -> Option<String> {
    let message = waiting["message"].as_str().filter(|m| !m.trim().is_empty())?;
    Some(format!("· waiting: {}", shared::text::one_line(shared::text::truncate(message.trim(), MAX_WAITING_BYTES))))
}

/// Reads the job's view every [`WAITING_POLL`] while it is queued and says its
/// `waiting_for` when that changes from what was `said`. A view that cannot be read is
/// asked again later: the follow, not this, tells of a lost edge.
async fn watch_waiting(http: reqwest::Client, url: String, secret: String, mut said: Option<Value>) {
    loop {
        tokio::time::sleep(WAITING_POLL).await;
        let Ok(Ok(view)) = tokio::time::timeout(ANSWER_TIME, http.get(&url).header("X-Runner-Secret", &secret).send()).await else {
            continue;
        };
        if !view.status().is_success() {
            continue;
        }
        let view = read_answer(view).await;
        if view["state"].as_str().is_some_and(|state| state != "queued") {
            return;
        }
        let waiting = view.get("waiting_for").filter(|w| !w.is_null()).cloned();
        if waiting.is_none() || waiting == said {
            continue;
        }
        if let Some(line) = waiting.as_ref().and_then(waiting_line) {
            eprintln!("{line}");
        }
        said = waiting;
    }
}

/// Whether the cut `at` that just fired came long after it was due ([`crate::follow::overslept`]).
fn overslept(at: Option<Instant>) -> bool {
    at.is_some_and(|at| crate::follow::overslept(at, Instant::now()))
}

/// Waits until `at`; for ever if `None` (no budget: nothing is cut). Slept as a duration:
/// tokio rounds a deadline up by adding to it, which overflows (a panic) for one at the
/// clock's end, and takes a duration past its own as far in the future.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep(at.saturating_duration_since(Instant::now())).await,
        None => std::future::pending().await,
    }
}

/// Asks `schedule` what to do now that a follow ended (`why` it brought nothing, if it
/// did not), says once that the edge is lost, and waits: false when it is time to give up.
async fn follow_again(schedule: &mut Schedule, why: &str, job_id: &str, quiet: bool) -> bool {
    match schedule.ended(Instant::now(), u32::from_le_bytes(runtime::entropy())) {
        Next::Follow { after, lost } => {
            if lost && !quiet {
                eprintln!("· lost the edge ({why}); following job {} again…", shared::text::one_line(job_id));
            }
            tokio::time::sleep(after).await;
            true
        }
        Next::GiveUp => false,
    }
}

/// Tells `schedule` that the follow under way brought something; says so once if the edge
/// had been lost, so the progress lines that follow are not read as the old stream's.
fn brought(schedule: &mut Schedule, job_id: &str, quiet: bool) {
    if schedule.brought(Instant::now()) && !quiet {
        eprintln!("· the edge is back: following job {} again", shared::text::one_line(job_id));
    }
}

/// Prints the job's result (`--json`: whole) and says how the task ended; its exit status.
/// A result that could not be written (a full disk, a closed pipe) is said, with where to
/// read it, and exits 2 as a follow given up does: it ended 0 with the result lost.
fn finish(result: &Value, as_json: bool, job_id: &str) -> i32 {
    if let Err(e) = print_result(&mut std::io::stdout().lock(), result, as_json) {
        // A reader that went away on purpose (`submit … | head -1`) ends it as it ends any
        // tool: quietly, by SIGPIPE.
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            crate::end_as_a_closed_pipe_ends_a_tool();
        }
        return fail_with(format!("could not write the result ({e}); read it with GET /jobs/{job_id}"));
    }
    if result["success"] == true {
        return 0;
    }
    eprintln!("{}", task_failed_line(result));
    if result["fallback"] == true { 2 } else { 1 }
}

fn print_result(out: &mut (impl Write + std::io::IsTerminal), result: &Value, as_json: bool) -> std::io::Result<()> {
    if as_json {
        // The job's words with DEL and the C1 controls escaped too (serde leaves them): the
        // same JSON, safe to a terminal as well.
        writeln!(out, "{}", crate::status::json_for_terminal(&serde_json::to_string_pretty(result).unwrap_or_default()))?;
    } else if let Some(text) = result["output"].as_str().filter(|t| !t.is_empty()) {
        // To a terminal, shown safe; to a file or a pipe, as Claude wrote it.
        let text = if out.is_terminal() { for_terminal(text).into() } else { std::borrow::Cow::Borrowed(text) };
        writeln!(out, "{text}")?;
    }
    out.flush()
}

/// The line `submit` ends a failed task with: one line, its error's line breaks escaped too
/// (the job's words, or an edge's: a line of their choosing after it read as `submit`'s).
fn task_failed_line(result: &Value) -> String {
    failure_line(&format!(
        "the task failed ({}): {}",
        result["error_code"].as_str().unwrap_or("?"),
        result["error"].as_str().unwrap_or("no error text")
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// Why a job waits is the edge's words: said on one line, escaped, bounded.
    #[test]
    fn why_a_job_waits_is_one_line_of_the_edges_words() {
        let line = super::waiting_line(&json!({"code": "login", "message": "log in\n\u{1b}]52;c;eA==\u{7}"})).unwrap();
        assert!(line.starts_with("· waiting: log in") && !line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert!(super::waiting_line(&json!(null)).is_none());
        assert!(super::waiting_line(&json!({"code": "busy", "message": " "})).is_none());
        assert!(super::waiting_line(&json!({"message": "x".repeat(5000)})).unwrap().len() < 700);
    }

    /// Claude's words come from the prompt, the repository and what its tools printed: a
    /// job can put terminal control sequences in them, and `submit` printed them raw to the
    /// operator's terminal — to set its clipboard (OSC 52), its title, or move the cursor
    /// and print over what was shown ("all tests passed" over a failure). A person's line
    /// shows them as text instead.
    #[test]
    fn a_jobs_words_reach_the_terminal_without_their_control_sequences() {
        let text = "3 failed\x1b]52;c;ZXZpbA==\x07\x1b[2K\rall tests passed\u{9b}31m";
        let event = json!({"type":"assistant","message":{"content":[{"type":"text","text": text}]}});
        let shown = super::describe(&event).unwrap();
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{shown:?}");
        assert!(shown.contains("3 failed") && shown.contains("all tests passed"));
        // Not control characters, but they reorder or break what is shown.
        let text = "approved\u{202e}deppots\u{2066}x\u{2069}\u{2028}line";
        let event = json!({"type":"assistant","message":{"content":[{"type":"text","text": text}]}});
        let shown = super::describe(&event).unwrap();
        assert!(!shown.contains(['\u{202e}', '\u{2066}', '\u{2069}', '\u{2028}']), "{shown:?}");
        assert!(shown.contains("approved") && shown.contains("line"), "{shown:?}");
    }

    /// Where the agent dropped a flooding job's progress (the link to the edge slower than
    /// the job printed), its marker said nothing in `submit`: the person following saw
    /// lines missing without a word. It says how many events were dropped, and why.
    #[test]
    fn dropped_progress_is_said() {
        let event = json!({"type": agent_core::progress::DROPPED_TYPE, "events": 412});
        let shown = super::describe(&event).expect("shown");
        assert!(shown.contains("412 progress events") && shown.contains("dropped"), "{shown}");
    }

    /// The edge's 403 says "send it in the X-Runner-Secret header", which `submit` does:
    /// what its user can fix is the secret it was given.
    #[test]
    fn a_refused_secret_says_which_setting_to_check() {
        let answer = json!({"success": false, "error": "missing or wrong runner secret: send it in the X-Runner-Secret header (or Authorization: Bearer)", "error_code": "UNAUTHORIZED"});
        let line = super::refusal(403, &answer);
        assert!(line.starts_with("missing or wrong runner secret") && line.contains("the secret sent is RUNNER_SECRET: check it"), "{line}");
        let busy = json!({"error": "the queue is full"});
        assert_eq!(super::refusal(429, &busy), "the queue is full");
        assert_eq!(super::refusal(400, &json!("<html>")), "no readable answer");
    }

    fn resolved(edge: &str, secret: &str, allow_insecure_edge: bool) -> Result<(String, String), String> {
        super::EdgeArgs { edge: Some(edge.into()), secret: Some(secret.into()), allow_insecure_edge }.resolve()
    }

    /// Plain http:// carries the runner secret only to this machine, unless
    /// ALLOW_INSECURE_EDGE=1, as the agent's ws://.
    #[test]
    fn the_secret_goes_over_plain_http_only_to_this_machine() {
        for ok in ["http://127.0.0.1:8787", "http://localhost:8787/", "http://[::1]:8787", "https://edge.example.com"] {
            assert!(resolved(ok, "s", false).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.1:8787", "http://edge.example.com", "http://127.0.0.1.evil.com"] {
            let err = resolved(bad, "s", false).unwrap_err();
            assert!(err.contains("not this machine") && err.contains("https://") && err.contains("ALLOW_INSECURE_EDGE=1"), "{bad}: {err}");
            assert!(resolved(bad, "s", true).is_ok(), "{bad} with ALLOW_INSECURE_EDGE=1");
        }
    }

    /// A secret with a line break, or a URL reqwest cannot read, failed as the request's
    /// builder error, said as "the task may have been queued all the same"; a URL with a
    /// password in it was shown whole in every message. Each is refused before anything is
    /// sent, saying which setting is wrong, and no password is shown.
    #[test]
    fn a_secret_or_url_that_cannot_be_sent_is_refused_by_name() {
        let err = resolved("http://127.0.0.1:8787", "s3cret\nX-Other: 1", false).unwrap_err();
        assert!(err.contains("RUNNER_SECRET") && err.contains("not valid in an HTTP header") && !err.contains("s3cret"), "{err}");
        let err = resolved("http://127.0.0.1:8787:99", "s", false).unwrap_err();
        assert!(err.contains("CLAUDE_RUNNER_URL") && err.contains("not a valid URL"), "{err}");
        for url in ["https://me:hunter2@edge.example.com", "me:hunter2@edge.example.com", "http://me:hunter2@[::1"] {
            let err = resolved(url, "s", false).unwrap_err();
            assert!(err.contains("CLAUDE_RUNNER_URL") && !err.contains("hunter2"), "{url}: {err}");
        }
        assert!(resolved("https://me:hunter2@edge.example.com", "s", false).unwrap_err().contains("RUNNER_SECRET"));
    }

    /// `--secret` is refused (a command line is every local user's to read:
    /// `config::refuse_secret_flags`), yet the refusal of a secret that cannot be sent said
    /// "RUNNER_SECRET (--secret)", as if the flag were a way to give it. What `submit` and
    /// `login` say of the secret names the variable alone, and where to set it.
    #[test]
    fn what_is_said_of_the_secret_names_no_flag_for_it() {
        let cannot_be_sent = resolved("http://127.0.0.1:8787", "s3cret\nX-Other: 1", false).unwrap_err();
        let missing = super::EdgeArgs { edge: Some("http://127.0.0.1:8787".into()), secret: None, allow_insecure_edge: false }.resolve().unwrap_err();
        let refused = super::refusal(403, &json!({"error": "missing or wrong runner secret"}));
        for said in [&cannot_be_sent, &missing, &refused] {
            assert!(said.contains("RUNNER_SECRET") && !said.contains("--secret"), "{said}");
        }
        assert!(cannot_be_sent.contains("in the environment") && missing.contains("in the environment"), "{cannot_be_sent} / {missing}");
    }

    /// The loopback check read the URL by hand, the client by the URL parser, and they
    /// disagreed: `http:///edge.example.com:8787` had no host to the check (so passed for
    /// this machine) and is edge.example.com to the parser; `http://evil.com\@127.0.0.1`
    /// was 127.0.0.1 to the check and is evil.com to the parser (`\` ends the host). Both
    /// are refused now, and what is dialled is the URL as parsed.
    #[test]
    fn the_host_checked_is_the_host_dialled() {
        for bad in ["http:///edge.example.com:8787", "http://evil.com\\@127.0.0.1:8787", "HTTP://Edge.Example.com", "http://127.0.0.2.nip.io"] {
            let err = resolved(bad, "s", false).unwrap_err();
            assert!(err.contains("not this machine") && err.contains("ALLOW_INSECURE_EDGE=1"), "{bad}: {err}");
        }
        for (ok, base) in [
            ("http://LOCALHOST:8787/", "http://localhost:8787"),
            ("http://2130706433:8787", "http://127.0.0.1:8787"),
            ("http://[::ffff:127.0.0.1]:8787/edge/", "http://[::ffff:7f00:1]:8787/edge"),
            ("HTTPS://Edge.Example.com:443", "https://edge.example.com"),
        ] {
            assert_eq!(resolved(ok, "s", false).map(|(base, _)| base), Ok(base.to_string()), "{ok}");
        }
        // The paths the commands add would go into a query or a fragment.
        for bad in ["http://127.0.0.1:8787/?x=1", "http://127.0.0.1:8787#top"] {
            assert!(resolved(bad, "s", false).unwrap_err().contains("query or a fragment"), "{bad}");
        }
    }

    /// A URL that did not parse was shown with the part before its first `/`, `?` or `#`
    /// taken for the host: a password with one of them in it was shown whole. A URL that
    /// does not parse is not shown at all, and one that does without its user info.
    #[test]
    fn a_url_that_is_refused_shows_no_password() {
        for url in [
            "https://me:hun#ter2@edge.example.com",
            "https://me:hun/ter2@edge.example.com",
            "https://me:hun?ter2@edge.example.com:99999",
            "https://me:hunter2@edge.example.com/x?y#z",
            "http://me:hunter2@10.0.0.1",
            "me:hunter2@edge.example.com",
        ] {
            let err = resolved(url, "s", false).unwrap_err();
            assert!(err.contains("CLAUDE_RUNNER_URL") && !err.contains("hunter2") && !err.contains("hun") && !err.contains("ter2"), "{url}: {err}");
        }
    }

    /// The https probe of a broken exchange asks the port the request went to: for
    /// `http://host` that is 80, where it asked 443 (https's own), so a server there that
    /// speaks TLS had `submit` say "the task was not queued" of a task a plain server on
    /// 80 had read.
    #[test]
    fn the_tls_probe_asks_the_port_the_request_went_to() {
        let probe = |base: &str| super::tls_probe(base).map(|(https, health)| (https, health.to_string()));
        assert_eq!(probe("http://127.0.0.1"), Some(("https://127.0.0.1:80".into(), "https://127.0.0.1:80/health".into())));
        assert_eq!(probe("http://localhost:8787/edge"), Some(("https://localhost:8787/edge".into(), "https://localhost:8787/edge/health".into())));
        assert_eq!(probe("http://[::1]:443"), Some(("https://[::1]".into(), "https://[::1]/health".into())));
        assert_eq!(probe("https://127.0.0.1"), None);
    }

    /// `--allow-insecure-edge` took the word after it as its value: `submit
    /// --allow-insecure-edge "fix the bug"` was refused as an invalid value. That word is
    /// the prompt; a value is given only as `--allow-insecure-edge=…`.
    #[test]
    fn the_insecure_edge_flag_leaves_the_prompt_alone() {
        use clap::Parser;
        let submit = |args: &[&str]| match crate::Cli::try_parse_from([&["claude-runner", "submit"], args].concat()).map(|cli| cli.command) {
            Ok(crate::Command::Submit(args)) => (args.prompt, args.edge.allow_insecure_edge),
            Ok(_) => panic!("{args:?}: not read as submit"),
            Err(e) => panic!("{args:?}: {e}"),
        };
        assert_eq!(submit(&["--allow-insecure-edge", "fix the bug"]), (Some("fix the bug".into()), true));
        assert_eq!(submit(&["fix the bug", "--allow-insecure-edge"]), (Some("fix the bug".into()), true));
        assert_eq!(submit(&["--allow-insecure-edge=0", "fix the bug"]), (Some("fix the bug".into()), false));
    }

    /// The edge's own words (its `error` when it refuses a task) are shown the same way.
    #[test]
    fn the_edges_words_reach_the_terminal_without_their_control_sequences() {
        let shown = super::failure_line("the edge refused the task (400): bad\x1b]0;owned\x07\rok");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("bad") && shown.contains("ok"));
    }

    /// The line `submit` gives up with is one line: a line break in the edge's words (its
    /// `error`) printed a line of the edge's choosing after it, as if `submit`'s own.
    #[test]
    fn the_edges_words_stay_on_the_line_submit_gives_up_with() {
        let shown = super::failure_line("the edge refused the task (400): busy\nclaude-runner submit: done, nothing to do");
        assert_eq!(shown.lines().count(), 1, "{shown}");
        assert!(shown.contains("busy") && shown.contains("nothing to do"), "{shown}");
    }

    /// The line a failed task ends with is one line too: its error (the job's words, an
    /// edge's) with a line break printed a line of their choosing after it, as if
    /// `submit`'s own, as the edge's refusal did before 3f49520.
    #[test]
    fn a_failed_tasks_error_stays_on_its_line() {
        let result = json!({"success": false, "error_code": "CLAUDE_ERROR\nx", "error": "boom\nclaude-runner submit: the task succeeded"});
        let shown = super::task_failed_line(&result);
        assert_eq!(shown.lines().count(), 1, "{shown}");
        assert!(shown.contains("boom") && shown.contains("the task succeeded"), "{shown}");
    }
}
