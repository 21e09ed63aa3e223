//! `claude-runner up`: the newcomer's one command. A native edge on 127.0.0.1 and an agent
//! connected to it, in one process; keys and a runner secret are made on the first run and
//! kept under `DATA_DIR/up`, so the curl line printed stays valid across restarts.

use crate::config::{default_agent_id, AgentConfig, LocalArgs};
use crate::keygen::{runner_secret, KeySet};
use crate::files::{private_dir, write_atomically};
use serde::{Deserialize, Serialize};
use shared::keys;
use std::net::SocketAddr;
use std::path::Path;

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

#[derive(Serialize, Deserialize)]
struct UpState {
    #[serde(flatten)]
    keys: KeySet,
    runner_secret: String,
    agent_id: String,
}

fn load_or_create(dir: &Path) -> anyhow::Result<UpState> {
    let path = dir.join("up.json");
    // Owner-only, folder and file: they hold both signing keys and the runner secret. One
    // left open by an older version is closed now rather than refused: `up` is the
    // newcomer's command.
    private_dir(dir)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        // Read as a file the agent keeps (bounded, never through a link, never waiting on a
        // pipe), and checked: a job runs as this user, and what is printed from here
        // becomes a command line the operator pastes.
        let damaged = |why: String| anyhow::anyhow!("{} is damaged ({why}); delete it to make new keys", path.display());
        let bytes = crate::files::read_private(&path, MAX_STATE_BYTES, "claude-runner up state").map_err(|e| damaged(e.to_string()))?;
        let state: UpState = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        if !shared::ids::valid_agent_id(&state.agent_id) {
            return Err(damaged("its agent_id is not a plain name".into()));
        }
        if !plain_secret(&state.runner_secret) {
            return Err(damaged("its runner_secret is not 16-256 letters, digits or `-_.+/=~`".into()));
        }
        // The public keys reach the edge's settings as they are (`AGENT_PUBLIC_KEYS`, where
        // a `,` adds an agent): each must be its signing key's, as `up` made them.
        for (signing, public, names) in [
            (&state.keys.edge_signing_key, &state.keys.edge_public_key, "edge_signing_key and edge_public_key"),
            (&state.keys.agent_signing_key, &state.keys.agent_public_key, "agent_signing_key and agent_public_key"),
        ] {
            if !keys::signing_key("key", signing).is_ok_and(|key| keys::encode_verifying(&key.verifying_key()) == *public) {
                return Err(damaged(format!("its {names} are not a key pair")));
            }
        }
        return Ok(state);
    }
    let state = UpState { keys: KeySet::generate(), runner_secret: runner_secret(), agent_id: default_agent_id() };
    // Created owner-only: it holds both signing keys.
    write_atomically(&path, &serde_json::to_vec_pretty(&state)?, true)?;
    Ok(state)
}

/// The most `up.json` holds: its keys and secret take well under 1 KiB.
const MAX_STATE_BYTES: usize = 64 * 1024;

/// A runner secret `up` may print inside the single quotes of a shell line: `up` makes 64
/// hex digits, and one set by hand may use the characters of base64 and of URLs too.
fn plain_secret(secret: &str) -> bool {
    (16..=256).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+/=~".contains(&b))
}

/// The shell line `up` prints that sets what `claude-runner submit` reads. The secret is
/// quoted as in the curl lines: bare, one beginning with `~` (which [`plain_secret`]
/// allows, and a job can write into up.json) was tilde-expanded by the shell, and the
/// operator exported another secret than the edge's.
fn export_line(addr: SocketAddr, secret: &str) -> String {
    format!("export CLAUDE_RUNNER_URL=http://{addr} RUNNER_SECRET='{secret}'")
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
    private_dir(&root)?;
    let _one_up = runtime::hold_lock(&root.join("up.lock"))
        .map_err(|e| anyhow::anyhow!("cannot use DATA_DIR {}: {e}; set DATA_DIR to a writable folder", args.local.data_dir().display()))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "another `claude-runner up` is running with DATA_DIR {} (it holds {}, let go when it exits: do not delete the file): stop it first, or give this one a DATA_DIR of its own",
                args.local.data_dir().display(),
                root.join("up.lock").display()
            )
        })?;
    let state = load_or_create(&root)?;
    // The edge's settings, read as the edge reads them: one that is not text is refused
    // by name, not taken as unset (a NOTIFY_URL in Latin-1 meant no alerts, said nowhere).
    let env = shared::setting::TextSettings::new(|name| std::env::var_os(name));
    let agent_public_keys = format!("{}={}", state.agent_id, state.keys.agent_public_key);
    let (config, max_connections) = edge_native::edge_settings(&env, |name| match name {
        "RUNNER_SECRET" => Some(state.runner_secret.clone()),
        "EDGE_SIGNING_KEY" => Some(state.keys.edge_signing_key.clone()),
        "AGENT_PUBLIC_KEYS" => Some(agent_public_keys.clone()),
        _ => None,
    })?;
    let (labels, drain_timeout) = args.work.resolve()?;
    let edge = edge_native::Server::bind(edge_native::ServerOptions { config, listen: args.listen, data_dir: root.join("edge"), max_connections }).await?;
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
    let login_note = match (login.needs_login, login.configured) {
        (false, _) => String::new(),
        (true, false) => "
  Claude is not logged in on this machine: /execute is refused (503 RUNNER_OAUTH_ERROR) and
  POST /jobs waits until it is. Run `claude auth login` in another terminal (the agent sees
  the new login within seconds), or set CLAUDE_CODE_OAUTH_TOKEN (from `claude setup-token`)
  and start `up` again.
"
        .to_string(),
        (true, true) => format!(
            "
  Claude's login on this machine needs a person: /execute is refused (503 RUNNER_OAUTH_ERROR)
  and POST /jobs waits until then. {}.
",
            shared::text::one_line(login.next_step.as_deref().unwrap_or("run `claude auth login` in another terminal"))
        ),
    };
    println!(
        "Claude Runner is up: edge http://{addr}, agent `{id}` connected to it.
{login_note}
  curl -s -X POST http://{addr}/execute \\
    -H 'Content-Type: application/json' -H 'X-Runner-Secret: {secret}' \\
    -d '{{\"prompt\": \"Write a haiku about home servers\"}}'

  curl -s -H 'X-Runner-Secret: {secret}' http://{addr}/health

  {export}
  claude-runner submit \"Write a haiku about home servers\"

The status page: http://{addr}/ (it asks for the secret); `claude-runner status` shows the agent.
Keys and secret: {keys_path} (kept for the next run). Ctrl-C stops both (running jobs finish first).",
        id = state.agent_id,
        secret = state.runner_secret,
        export = export_line(addr, &state.runner_secret),
        keys_path = root.join("up.json").display(),
    );
    let result = crate::serve::serve(agent_cfg, crate::drain::stop_requests()).await;
    let _ = stop_tx.send(true);
    let _ = edge_task.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The export line, pasted into a shell, sets the very secret `up` holds, whatever
    /// characters [`plain_secret`] lets through (a `~` first was expanded to a home folder).
    #[test]
    fn the_export_line_sets_the_secret_as_it_is() {
        for secret in ["~root/0123456789abcdef", "a+b/c=d~e-f_g.h0123456789"] {
            assert!(plain_secret(secret), "{secret}");
            let line = export_line("127.0.0.1:8787".parse().unwrap(), secret);
            let out = std::process::Command::new("bash").arg("-c").arg(format!("{line}\nprintf %s \"$RUNNER_SECRET\"")).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), secret, "{line}");
        }
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
        let made = load_or_create(&dir).unwrap();
        assert!(plain_secret(&made.runner_secret) && shared::ids::valid_agent_id(&made.agent_id));
        let again = load_or_create(&dir).unwrap();
        assert_eq!((again.runner_secret, again.agent_id), (made.runner_secret.clone(), made.agent_id.clone()));
        let path = dir.join("up.json");
        let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        value["runner_secret"] = "0123456789abcdef' ; touch /tmp/owned ; echo '".into();
        std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
        let e = load_or_create(&dir).err().expect("a secret that leaves its quotes is refused").to_string();
        assert!(e.contains("runner_secret") && e.contains("delete it"), "{e}");
        value["runner_secret"] = made.runner_secret.clone().into();
        value["agent_id"] = "spark\u{1b}]52;c;ZXZpbA==\u{7}".into();
        std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
        assert!(load_or_create(&dir).err().expect("an agent id of control characters is refused").to_string().contains("agent_id"));
        std::fs::remove_file(&path).unwrap();
        crate::files::pipe_at(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let reading = dir.clone();
        std::thread::spawn(move || tx.send(load_or_create(&reading).is_err()).unwrap());
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(60)), Ok(true), "a pipe as up.json is refused, not waited on");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![b' '; MAX_STATE_BYTES + 1]).unwrap();
        assert!(load_or_create(&dir).err().unwrap().to_string().contains("damaged"));
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
        let made = load_or_create(&dir).unwrap();
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
            let e = load_or_create(&dir).err().unwrap_or_else(|| panic!("{field} = {text:?} is taken")).to_string();
            assert!(e.contains("damaged") && e.contains(field), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
