//! `claude-runner up`: the newcomer's one command. A native edge on 127.0.0.1 and an agent
//! connected to it, in one process; keys and a runner secret are made on the first run and
//! kept under `DATA_DIR/up`, so the curl line printed stays valid across restarts.

use crate::config::{default_agent_id, AgentConfig, LocalArgs, UpState};
use crate::keygen::{runner_secret, KeySet};
use crate::files::{private_dir, write_durably};
use shared::keys;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the local edge listens.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:8787", value_parser = crate::setting_value::address("LISTEN", "127.0.0.1:8787"))]
    pub listen: SocketAddr,
    /// Jobs the agent runs at once.
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value_t = 1, value_parser = crate::config::max_concurrent_jobs())]
    pub max_concurrent_jobs: u32,
    #[command(flatten)]
    pub work: crate::config::WorkArgs,
    #[command(flatten)]
    pub local: LocalArgs,
    #[command(flatten)]
    pub repos: crate::repo::settings::RepoArgs,
}

/// `up.json` in `dir`, read, or made when absent. `new_folders`: how many folders (`dir`
/// and its parents) this run made for it, synced with it ([`write_durably`]).
fn load_or_create(dir: &Path, new_folders: usize) -> anyhow::Result<UpState> {
    let path = dir.join("up.json");
    // Owner-only, folder and file: they hold both signing keys and the runner secret. One
    // left open by an older version is closed now rather than refused: `up` is the
    // newcomer's command.
    let new_folders = new_folders + private_dir(dir)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        // Read and checked as `login` reads it too (`UpState::read`): a job runs as this
        // user, and what is printed from here becomes a command line the operator pastes.
        return UpState::read(&path).map_err(|why| anyhow::anyhow!("{} is damaged ({why}); delete it to make new keys", path.display()));
    }
    let state = UpState { keys: KeySet::generate(), runner_secret: runner_secret(), agent_id: default_agent_id() };
    // Created owner-only: it holds both signing keys. Durable, its name too, and the name of
    // every folder made for it (a first `up` makes DATA_DIR and its missing parents): after
    // a power cut the next `up` must find these keys, not make others. DATA_DIR at least,
    // as before: its `up` may be a folder an earlier run made, and stopped before this file.
    write_durably(&path, &serde_json::to_vec_pretty(&state)?, new_folders.max(1)).map_err(|e| cannot_keep(&path, &e))?;
    Ok(state)
}

/// Why `up.json` could not be written, with the file and what to do: a full disk said only
/// "No space left on device (os error 28)".
fn cannot_keep(path: &Path, e: &std::io::Error) -> anyhow::Error {
    let what = if crate::files::disk_full(e) { crate::files::FREE_SPACE } else { "set DATA_DIR to a folder of yours that can be written" };
    anyhow::anyhow!("cannot write {}, where `up` keeps its keys and runner secret ({e}): {what}, and start `claude-runner up` again", path.display())
}

/// The shell line `up` prints that sets what `claude-runner submit` reads. The secret is
/// quoted as in the curl lines: bare, one beginning with `~` (which [`crate::config::plain_secret`]
/// allows, and a job can write into up.json) was tilde-expanded by the shell, and the
/// operator exported another secret than the edge's.
/// Printed for the address the edge listens on (`LISTEN`) as this machine reaches it
/// ([`reached_at`]). One that is not this machine's loopback (`LISTEN=192.168.1.5:8787`) is
/// plaintext http:// that `submit` and `login` refuse without ALLOW_INSECURE_EDGE=1: a
/// comment after the line says so, rather than a line that pasted, fails.
fn export_line(addr: SocketAddr, secret: &str) -> String {
    let addr = reached_at(addr);
    let line = format!("export CLAUDE_RUNNER_URL=http://{addr} RUNNER_SECRET='{secret}'");
    if addr.ip().is_loopback() {
        return line;
    }
    format!(
        "{line}\n  # http://{addr} is not this machine's loopback: submit and login send the secret over plain http:// \
         only to 127.0.0.1, so add ALLOW_INSECURE_EDGE=1 to the line if the path to it is private, or listen on 127.0.0.1"
    )
}

/// The address to reach an edge listening on `addr` at from this machine: for every
/// address (`LISTEN=0.0.0.0:8787`, `[::]:8787`), the loopback one. Printed as it was,
/// `http://0.0.0.0:8787` was refused by `submit` as "not this machine".
fn reached_at(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port())),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    }
}

/// The `status` line to paste: with `up`'s `DATA_DIR` when it is not the default, which a
/// plain `claude-runner status` in another shell reads (it said no agent ever ran there).
fn runner_in(runner: &str, command: &str, data_dir: &Path, default: &Path) -> String {
    if data_dir == default {
        return format!("{runner} {command}");
    }
    format!("DATA_DIR={} {runner} {command}", shell_word(&data_dir.to_string_lossy()))
}

/// `text` as one word for a POSIX shell: as it is when nothing in it is special, else in
/// single quotes.
pub(crate) fn shell_word(text: &str) -> String {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b)) {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// How the lines `up` prints name this program: `claude-runner` when that is what the shell
/// finds on PATH (`on_path`), else the path of the running executable (`exe`), quoted for a
/// shell. After `cargo run` the binary is in `target/`, and a pasted `claude-runner submit`
/// was "command not found" — or ran another, older claude-runner found on PATH.
fn runner_command(exe: Option<PathBuf>, on_path: Option<PathBuf>) -> String {
    let canonical = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    match exe.map(canonical) {
        Some(exe) if on_path.map(canonical).as_ref() != Some(&exe) => shell_word(&exe.to_string_lossy()),
        _ => "claude-runner".to_string(),
    }
}

/// The command that logs Claude in where this agent looks for the login: the binary
/// CLAUDE_BIN names, into the folder CLAUDE_CONFIG_DIR names. A plain `claude auth login`
/// ran another binary, or put the login in ~/.claude, where this agent does not read it.
fn login_command(claude_bin: &str, config_dir: Option<&Path>) -> String {
    let login = format!("{} auth login", shell_word(claude_bin));
    match config_dir {
        Some(dir) => format!("CLAUDE_CONFIG_DIR={} {login}", shell_word(&dir.to_string_lossy())),
        None => login,
    }
}

/// Settings of `claude-runner agent` and of `claude-runner-edge` that `up` does not read:
/// it uses its own keys, runner secret, agent id and edge, from `up.json`.
const NOT_READ_BY_UP: &[&str] = &[
    "RUNNER_SECRET", "EDGE_SIGNING_KEY", "AGENT_PUBLIC_KEYS", "AGENT_ID", "EDGE_URL", "EDGE_POOL", "AGENT_SIGNING_KEY", "AGENT_KEY_FILE", "EDGE_PUBLIC_KEY",
];

/// Those of [`NOT_READ_BY_UP`] set in `lookup` (blank is unset). A RUNNER_SECRET that is
/// `up`'s own is not one: `up`'s export line sets it, and `submit` reads it.
fn ignored_settings(lookup: impl Fn(&str) -> Option<std::ffi::OsString>, own_secret: &str) -> Vec<&'static str> {
    NOT_READ_BY_UP
        .iter()
        .copied()
        .filter(|name| {
            let Some(raw) = lookup(name) else { return false };
            shared::setting::os_value(&raw).is_some_and(|value| !(*name == "RUNNER_SECRET" && value == own_secret))
        })
        .collect()
}

/// One line on the settings `up` was given and does not read: set for `up`, each was
/// taken without a word, and a job signed or a secret sent with them was refused.
fn ignored_notice(names: &[&str], up_json: &Path) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    let list = names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    let edge_only = names.iter().any(|n| matches!(*n, "EDGE_SIGNING_KEY" | "AGENT_PUBLIC_KEYS"));
    Some(format!(
        "{list} {are} set here and `up` does not read {them}: it uses its own keys, runner secret and agent id, kept in {path}, \
         and its own edge. `claude-runner agent` is the command that reads {them}, to dial an edge of your own{edge}; unset {them} for `up`.",
        are = if names.len() == 1 { "is" } else { "are" },
        them = if names.len() == 1 { "it" } else { "them" },
        path = up_json.display(),
        edge = if edge_only { " (`claude-runner-edge` reads EDGE_SIGNING_KEY and AGENT_PUBLIC_KEYS)" } else { "" },
    ))
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if crate::process::find_binary(&args.local.claude_bin).is_none() {
        eprintln!("{}", crate::process::install_claude(&args.local.claude_bin));
        std::process::exit(1);
    }
    let root = args.local.data_dir().join("up");
    // Held for the whole run, and taken before `up.json` is read or made: a second `up` on
    // this folder found it taken only at the edge's lock, after it had made new keys where
    // the file was missing (deleted, or not yet written by the first), keys the running
    // one did not use and every later `up` would.
    let made = private_dir(&root)?;
    let _one_up = runtime::hold_lock(&root.join("up.lock"))
        .map_err(|e| {
            let what = if crate::files::disk_full(&e) { crate::files::FREE_SPACE } else { "set DATA_DIR to a writable folder" };
            anyhow::anyhow!("cannot use DATA_DIR {}: {e}; {what}", args.local.data_dir().display())
        })?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "another `claude-runner up` is running with DATA_DIR {} (it holds {}, let go when it exits: do not delete the file): stop it first, or give this one a DATA_DIR and a LISTEN of its own (e.g. DATA_DIR=/tmp/up2 LISTEN=127.0.0.1:{} claude-runner up)",
                args.local.data_dir().display(),
                root.join("up.lock").display(),
                // The first one's port is likely the default: the next one up.
                args.listen.port().checked_add(1).filter(|_| args.listen.port() != 0).unwrap_or(8788)
            )
        })?;
    let state = load_or_create(&root, made)?;
    // The edge's settings, read as the edge reads them: one that is not text is refused
    // by name, not taken as unset (a NOTIFY_URL in Latin-1 meant no alerts, said nowhere).
    let env = shared::setting::TextSettings::new(|name| std::env::var_os(name));
    let agent_public_keys = format!("{}={}", state.agent_id, state.keys.agent_public_key);
    let edge_native::EdgeSettings { config, max_connections, execute_keepalive_ms } = edge_native::edge_settings(&env, |name| match name {
        "RUNNER_SECRET" => Some(state.runner_secret.clone()),
        "EDGE_SIGNING_KEY" => Some(state.keys.edge_signing_key.clone()),
        "AGENT_PUBLIC_KEYS" => Some(agent_public_keys.clone()),
        _ => None,
    })?;
    let (labels, drain_timeout) = args.work.resolve()?;
    let edge = edge_native::Server::bind(edge_native::ServerOptions { config, listen: args.listen, data_dir: root.join("edge"), max_connections, execute_keepalive_ms }).await?;
    let addr = edge.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let edge_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    };
    let edge_task = tokio::spawn(edge.serve(edge_stop));

    let agent_key = keys::signing_key("agent key", &state.keys.agent_signing_key)?;
    // Everything `up` holds is a secret a job must not print.
    let mut secrets = crate::config::key_forms(&state.keys.agent_signing_key, &agent_key);
    secrets.extend([state.runner_secret.clone(), state.keys.edge_signing_key.clone()]);
    secrets.extend(crate::config::secret_values(|name| std::env::var(name).ok()));
    let agent_cfg = AgentConfig {
        connect_url: format!("ws://{addr}/agent/connect"),
        agent_id: state.agent_id.clone(),
        pool: shared::ids::DEFAULT_POOL.to_string(),
        signing_key: agent_key,
        edge_public_key: keys::verifying_key("edge key", &state.keys.edge_public_key)?,
        claude_bin: args.local.claude_bin.clone(),
        claude_config_dir: args.local.login.claude_config_dir.clone(),
        data_dir: crate::config::up_agent_dir(&args.local.data_dir()),
        max_concurrent_jobs: args.max_concurrent_jobs,
        claude_model: args.local.claude_model.clone(),
        job_env_allow: crate::config::job_env_allow(&args.local.job_env_allow)?,
        secrets,
        repos: args.repos.clone().resolve()?,
        drain_timeout,
        labels,
        one_job: false,
    };
    // A newcomer's first job is refused when Claude is not logged in here: said now, with
    // how to log in, rather than only in the 503 the printed curl line then gets. Read as
    // the agent will start: with a failed authentication its last run left standing.
    let now = crate::now_ms();
    let reporter = crate::report::Reporter::new(crate::oauth::Login::new(args.local.claude_config_dir()));
    reporter.resume(crate::status::read(&agent_cfg.data_dir).ok().flatten().as_ref(), now);
    let login = reporter.report().status(now);
    // The lines to paste name this program as the shell will find it.
    let runner = runner_command(std::env::current_exe().ok(), crate::process::find_binary("claude-runner"));
    let claude_login = login_command(&args.local.claude_bin, args.local.claude_config_dir());
    let login_note = match (login.needs_login, login.configured) {
        (false, _) => String::new(),
        (true, false) => format!(
            "
  Claude is not logged in on this machine: /execute is refused (503 RUNNER_OAUTH_ERROR) and
  POST /jobs waits until it is. Log in from another terminal (the agent sees the new login
  within seconds), either here:
    {claude_login}
  or through the edge (the agent runs the login), after the export line below:
    {runner_login}
  Or set CLAUDE_CODE_OAUTH_TOKEN (from `{setup_token}`) and start `up` again.
",
            setup_token = format!("{} setup-token", shell_word(&args.local.claude_bin)),
            // In `up`'s DATA_DIR: `login` finds there the agent's key that checks the URL.
            runner_login = runner_in(&runner, "login", &args.local.data_dir(), &crate::config::default_data_dir()),
        ),
        (true, true) => format!(
            "
  Claude's login on this machine needs a person: /execute is refused (503 RUNNER_OAUTH_ERROR)
  and POST /jobs waits until then. {}.{}
",
            shared::text::one_line(login.next_step.as_deref().unwrap_or("log in from another terminal")),
            // The shared words point to README's "First login"; `up` knows this machine's.
            format!(" Here that login is `{claude_login}`."),
        ),
    };
    // Said, not refused: each is a choice someone may make on purpose.
    if let Some(note) = ignored_notice(&ignored_settings(|name| std::env::var_os(name), &state.runner_secret), &crate::config::up_state_file(&args.local.data_dir())) {
        eprintln!("claude-runner up: {note}");
    }
    if let Some(warning) = edge_native::listen::reachable_from_the_network(addr) {
        eprintln!("claude-runner up: warning: {warning}.");
    }
    // The lines to paste name the address this machine reaches the edge at. The secret
    // reaches curl on its standard input (`-H @-`, from the shell's own `printf`): as
    // `-H "X-Runner-Secret: $RUNNER_SECRET"` the shell put it in curl's command line, which
    // every local user can read in /proc while curl runs.
    let listening = addr;
    let addr = reached_at(listening);
    println!(
        "Claude Runner is up: edge http://{addr}, agent `{id}` connecting to it.
{login_note}
  {export}

  printf 'X-Runner-Secret: %s\\n' \"$RUNNER_SECRET\" | curl -s -H @- -X POST http://{addr}/execute \\
    -H 'Content-Type: application/json' -d '{{\"prompt\": \"Write a haiku about home servers\"}}'

  printf 'X-Runner-Secret: %s\\n' \"$RUNNER_SECRET\" | curl -s -H @- http://{addr}/health

  {runner} submit \"Write a haiku about home servers\"

The status page: http://{addr}/ (it asks for the secret); `{status}` shows the agent.
Keys and secret: {keys_path} (kept for the next run). Ctrl-C stops both (running jobs finish first).",
        id = state.agent_id,
        export = export_line(listening, &state.runner_secret),
        status = runner_in(&runner, "status", &args.local.data_dir(), &crate::config::default_data_dir()),
        keys_path = crate::config::up_state_file(&args.local.data_dir()).display(),
    );
    let result = crate::serve::serve(agent_cfg, crate::drain::stop_requests()).await;
    let _ = stop_tx.send(true);
    let _ = edge_task.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::plain_secret;

    /// The export line, pasted into a shell, sets the very secret `up` holds, whatever
    /// characters [`crate::config::plain_secret`] lets through (a `~` first was expanded to a home folder).
    /// `up` with a `DATA_DIR` of its own names it in the `status` line to paste: a plain
    /// `status` in another shell reads the default folder and found no agent.
    #[test]
    fn the_status_line_names_a_data_dir_that_is_not_the_default() {
        let default = Path::new("/home/me/.local/share/claude-runner");
        assert_eq!(runner_in("claude-runner", "status", default, default), "claude-runner status");
        assert_eq!(runner_in("claude-runner", "status", Path::new("/tmp/standin-up"), default), "DATA_DIR=/tmp/standin-up claude-runner status");
        assert_eq!(runner_in("claude-runner", "status", Path::new("/tmp/it's here"), default), "DATA_DIR='/tmp/it'\\''s here' claude-runner status");
    }

    #[test]
    fn the_export_line_sets_the_secret_as_it_is() {
        for secret in ["~root/0123456789abcdef", "a+b/c=d~e-f_g.h0123456789"] {
            assert!(plain_secret(secret), "{secret}");
            let line = export_line("127.0.0.1:8787".parse().unwrap(), secret);
            let out = std::process::Command::new("bash").arg("-c").arg(format!("{line}\nprintf %s \"$RUNNER_SECRET\"")).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), secret, "{line}");
        }
    }

    /// `LISTEN=0.0.0.0:8787` (or `[::]`) printed `export CLAUDE_RUNNER_URL=http://0.0.0.0:8787`,
    /// which `submit` refuses as "not this machine": the line names the loopback address
    /// instead, which `submit` takes; a specific address of the network is printed with
    /// what `submit` needs to reach it.
    #[test]
    fn the_export_line_names_an_address_submit_takes() {
        let url = |line: &str| line.split_whitespace().find_map(|w| w.strip_prefix("CLAUDE_RUNNER_URL=")).unwrap().to_string();
        for (listen, reached) in [("0.0.0.0:8787", "http://127.0.0.1:8787"), ("[::]:8787", "http://[::1]:8787"), ("127.0.0.1:9", "http://127.0.0.1:9")] {
            let line = export_line(listen.parse().unwrap(), "s");
            assert_eq!(url(&line), reached, "{line}");
            let edge = crate::submit::EdgeArgs { edge: Some(url(&line)), secret: Some("s".into()), allow_insecure_edge: false };
            assert!(edge.resolve().is_ok(), "{line}");
            assert_eq!(line.lines().count(), 1, "{line}");
        }
        let line = export_line("192.168.1.5:8787".parse().unwrap(), "s");
        assert_eq!(url(&line), "http://192.168.1.5:8787");
        assert!(line.lines().nth(1).is_some_and(|note| note.trim_start().starts_with('#') && note.contains("ALLOW_INSECURE_EDGE=1")), "{line}");
    }

    /// Each word pasted into a shell is the text itself, whatever it holds.
    #[test]
    fn a_shell_word_reads_back_as_itself() {
        assert_eq!(shell_word("/work/x/target/release/claude-runner"), "/work/x/target/release/claude-runner");
        for text in ["/home/a b/claude", "it's", "$(touch /tmp/owned)", "~root", ""] {
            let word = shell_word(text);
            let out = std::process::Command::new("bash").arg("-c").arg(format!("printf %s {word}")).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), text, "{word}");
        }
    }

    /// After `cargo run` nothing named claude-runner is on PATH (or another one is): the
    /// pasted `claude-runner submit …` failed. The path of this executable is printed then.
    #[test]
    fn the_lines_to_paste_name_this_executable_unless_path_finds_it() {
        let dir = dir("runner-command");
        let exe = dir.join("claude-runner");
        std::fs::write(&exe, "").unwrap();
        let spaced = dir.join("my builds");
        std::fs::create_dir_all(&spaced).unwrap();
        std::fs::write(spaced.join("claude-runner"), "").unwrap();
        let link = dir.join("bin-link");
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        let shown = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
        assert_eq!(runner_command(Some(exe.clone()), None), shown(&exe), "nothing on PATH");
        assert_eq!(runner_command(Some(exe.clone()), Some(spaced.join("claude-runner"))), shown(&exe), "another on PATH");
        assert_eq!(runner_command(Some(exe.clone()), Some(exe.clone())), "claude-runner");
        assert_eq!(runner_command(Some(exe.clone()), Some(link)), "claude-runner", "a link to this one is this one");
        assert_eq!(runner_command(Some(spaced.join("claude-runner")), None), format!("'{}'", shown(&spaced.join("claude-runner"))));
        assert_eq!(runner_command(None, None), "claude-runner");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `claude auth login` ran the default binary into ~/.claude, where an agent with
    /// CLAUDE_BIN or CLAUDE_CONFIG_DIR set does not look.
    #[test]
    fn the_login_command_is_this_machines_binary_and_folder() {
        assert_eq!(login_command("claude", None), "claude auth login");
        assert_eq!(login_command("/opt/claude-2/bin/claude", None), "/opt/claude-2/bin/claude auth login");
        assert_eq!(login_command("claude", Some(Path::new("/srv/claude config"))), "CLAUDE_CONFIG_DIR='/srv/claude config' claude auth login");
    }

    /// The agent's and the edge's settings were taken without a word by `up`, which uses its
    /// own: each set is named, once, with where `up`'s are and which command reads them.
    #[test]
    fn settings_up_does_not_read_are_named() {
        let env = |pairs: &'static [(&'static str, &'static str)]| move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.into());
        let secret = "a".repeat(64);
        assert!(ignored_settings(env(&[("CLAUDE_BIN", "claude"), ("DATA_DIR", "/d"), ("AGENT_ID", " ")]), &secret).is_empty(), "blank is unset");
        let set = ignored_settings(env(&[("AGENT_ID", "spark"), ("EDGE_URL", "wss://e"), ("RUNNER_SECRET", "theirs-0123456789")]), &secret);
        assert_eq!(set, ["RUNNER_SECRET", "AGENT_ID", "EDGE_URL"]);
        let notice = ignored_notice(&set, Path::new("/d/up/up.json")).unwrap();
        for says in ["`RUNNER_SECRET`, `AGENT_ID`, `EDGE_URL` are set", "/d/up/up.json", "`claude-runner agent` is the command that reads them"] {
            assert!(notice.contains(says), "{says}: {notice}");
        }
        assert!(!notice.contains('\n'), "one line: {notice}");
        // The secret the export line set is up's own: nothing ignored.
        let own: &'static str = Box::leak(secret.clone().into_boxed_str());
        let pairs: &'static [(&'static str, &'static str)] = Box::leak(vec![("RUNNER_SECRET", own)].into_boxed_slice());
        assert!(ignored_settings(env(pairs), &secret).is_empty());
        assert!(ignored_notice(&["EDGE_SIGNING_KEY"], Path::new("/u")).unwrap().contains("`claude-runner-edge` reads"));
        assert_eq!(ignored_notice(&[], Path::new("/u")), None);
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cr-up-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `up` prints its runner secret inside a curl line the operator pastes into a shell,
    /// and its `up.json` is a job's to rewrite (the same user): a secret that closes the
    /// quote and runs a command, or an agent id of control characters, is refused, and the
    /// file is never waited on (a pipe) nor read whole (a file as large as the disk).
    #[test]
    fn a_state_file_a_job_rewrote_is_refused_not_printed() {
        let dir = dir("hostile");
        let made = load_or_create(&dir, 0).unwrap();
        assert!(plain_secret(&made.runner_secret) && shared::ids::valid_agent_id(&made.agent_id));
        let again = load_or_create(&dir, 0).unwrap();
        assert_eq!((again.runner_secret, again.agent_id), (made.runner_secret.clone(), made.agent_id.clone()));
        let path = dir.join("up.json");
        let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        value["runner_secret"] = "0123456789abcdef' ; touch /tmp/owned ; echo '".into();
        std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
        let e = load_or_create(&dir, 0).err().expect("a secret that leaves its quotes is refused").to_string();
        assert!(e.contains("runner_secret") && e.contains("delete it"), "{e}");
        value["runner_secret"] = made.runner_secret.clone().into();
        value["agent_id"] = "spark\u{1b}]52;c;ZXZpbA==\u{7}".into();
        std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
        assert!(load_or_create(&dir, 0).err().expect("an agent id of control characters is refused").to_string().contains("agent_id"));
        std::fs::remove_file(&path).unwrap();
        crate::files::pipe_at(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let reading = dir.clone();
        std::thread::spawn(move || tx.send(load_or_create(&reading, 0).is_err()).unwrap());
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(60)), Ok(true), "a pipe as up.json is refused, not waited on");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![b' '; crate::config::MAX_UP_STATE_BYTES + 1]).unwrap();
        assert!(load_or_create(&dir, 0).err().unwrap().to_string().contains("damaged"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `up`'s agent took neither AGENT_LABELS nor DRAIN_TIMEOUT_MS (its `--help` listed
    /// neither, and the agent's table in README names both): a job asking for a label
    /// waited for ever, and a stop handed running jobs back only after 5 minutes.
    #[test]
    fn up_takes_the_agents_labels_and_drain_timeout() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        use clap::Parser;
        let parsed = Cli::try_parse_from(["up", "--agent-labels", "gpu=a100,os=linux", "--drain-timeout-ms", "1500"]).unwrap();
        let (labels, drain) = parsed.up.work.resolve().unwrap();
        assert_eq!(labels, shared::placement::parse_labels("gpu=a100,os=linux").unwrap());
        assert_eq!(drain, std::time::Duration::from_millis(1500));
        let (labels, drain) = Cli::try_parse_from(["up"]).unwrap().up.work.resolve().unwrap();
        assert!(labels.is_empty());
        assert_eq!(drain, std::time::Duration::from_millis(crate::config::DEFAULT_DRAIN_TIMEOUT_MS));
        let bad = Cli::try_parse_from(["up", "--agent-labels", "gpu"]).unwrap().up.work.resolve().unwrap_err().to_string();
        assert!(bad.contains("AGENT_LABELS"), "{bad}");
    }

    /// The keys in `up.json` are a job's to rewrite too, and reach the edge's settings as
    /// they are (`AGENT_PUBLIC_KEYS={agent_id}={agent_public_key}`): a public key of
    /// `KEY,other=KEY2` had the edge accept a second agent, and a key that is not the
    /// signing key's ended in an agent that never connected, with advice to paste what
    /// `keygen` printed. Each public key must be its signing key's, as `up` made them.
    #[test]
    fn keys_a_job_rewrote_are_refused() {
        let dir = dir("keys");
        let made = load_or_create(&dir, 0).unwrap();
        let path = dir.join("up.json");
        let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let other = KeySet::generate();
        let rewrites = [
            ("agent_public_key", format!("{},intruder={}", made.keys.agent_public_key, other.agent_public_key)),
            ("agent_public_key", other.agent_public_key.clone()),
            ("edge_public_key", other.edge_public_key.clone()),
            ("edge_signing_key", other.edge_signing_key.clone()),
            ("agent_signing_key", "not base64 \u{1b}]0;x\u{7}".to_string()),
        ];
        for (field, text) in rewrites {
            let mut bad = value.clone();
            bad[field] = text.clone().into();
            std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
            let e = load_or_create(&dir, 0).err().unwrap_or_else(|| panic!("{field} = {text:?} is taken")).to_string();
            assert!(e.contains("damaged") && e.contains(field), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
