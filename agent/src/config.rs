//! The agent's settings: each is an environment variable and a `--flag` (README
//! "Configuration"), checked once at start with errors that say what to fix.

use crate::edge_url;
use clap::Args;
use serde::{Deserialize, Serialize};
use ed25519_dalek::{SigningKey, VerifyingKey};
use shared::keys;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The edge to dial: ws://host:port or wss://host (http/https are accepted too).
    #[arg(long, env = "EDGE_URL")]
    pub edge_url: Option<String>,
    /// This agent's id, as listed in the edge's AGENT_PUBLIC_KEYS (default: hostname).
    #[arg(long, env = "AGENT_ID")]
    pub agent_id: Option<String>,
    /// base64 ed25519 seed of this agent, from the environment only: the flag is refused,
    /// since a command line is readable by every local user (or use AGENT_KEY_FILE).
    #[arg(long, env = "AGENT_SIGNING_KEY", hide_env_values = true)]
    pub agent_signing_key: Option<String>,
    /// File holding AGENT_SIGNING_KEY.
    #[arg(long, env = "AGENT_KEY_FILE")]
    pub agent_key_file: Option<PathBuf>,
    /// base64 public key of the edge: only jobs it signed run.
    #[arg(long, env = "EDGE_PUBLIC_KEY")]
    pub edge_public_key: Option<String>,
    /// The edge pool this agent serves (its EDGE_URL ends in /pool/<name> for any other
    /// than `default`): orders and welcomes from another pool are refused.
    #[arg(long, env = "EDGE_POOL", default_value = shared::ids::DEFAULT_POOL)]
    pub edge_pool: String,
    #[command(flatten)]
    pub local: LocalArgs,
    /// Jobs run at once.
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value_t = 1, value_parser = max_concurrent_jobs())]
    pub max_concurrent_jobs: u32,
    /// Accept plaintext ws:// to a host that is not this machine (only on a private path).
    #[arg(long, env = "ALLOW_INSECURE_EDGE", value_parser = crate::setting_value::switch("ALLOW_INSECURE_EDGE"),
          default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub allow_insecure_edge: bool,
    #[command(flatten)]
    pub repos: crate::repo::settings::RepoArgs,
    #[command(flatten)]
    pub work: WorkArgs,
    /// Take one job, then exit once its result is delivered (an ephemeral worker).
    #[arg(long)]
    pub one_job: bool,
}

/// How a serving agent takes work and gives it up: `agent`'s and `up`'s.
#[derive(Debug, Clone, Args)]
pub struct WorkArgs {
    /// On a stop (SIGTERM), how long running jobs may take to finish before they are
    /// handed back to the edge, in milliseconds.
    #[arg(long, env = "DRAIN_TIMEOUT_MS", default_value_t = DEFAULT_DRAIN_TIMEOUT_MS,
          value_parser = crate::setting_value::whole("DRAIN_TIMEOUT_MS", "milliseconds", 0, None, DEFAULT_DRAIN_TIMEOUT_MS))]
    pub drain_timeout_ms: u64,
    /// Labels jobs may ask for, `key=value,…` (e.g. `model=opus,gpu=none,os=linux`).
    #[arg(long, env = "AGENT_LABELS", default_value = "")]
    pub agent_labels: String,
}

impl WorkArgs {
    /// The labels offered to jobs and the drain timeout, checked.
    pub fn resolve(&self) -> anyhow::Result<(shared::placement::Labels, std::time::Duration)> {
        let labels = shared::placement::parse_labels(&self.agent_labels)
            .map_err(|e| anyhow::anyhow!("AGENT_LABELS: {e}; write them like `model=opus,gpu=none`"))?;
        Ok((labels, std::time::Duration::from_millis(self.drain_timeout_ms)))
    }
}

/// The most jobs an agent runs at once: the most the edge lets an agent hold.
pub const MAX_MAX_CONCURRENT_JOBS: u32 = shared::protocol::MAX_CAPACITY;

/// `MAX_CONCURRENT_JOBS`'s value parser: `agent`'s and `up`'s.
pub fn max_concurrent_jobs() -> impl Fn(&str) -> Result<u32, String> + Clone + Send + Sync + 'static {
    crate::setting_value::whole("MAX_CONCURRENT_JOBS", "jobs", 1, Some(MAX_MAX_CONCURRENT_JOBS), 1)
}

/// Five minutes: the default `timeout_ms` of a job.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 300_000;

/// Settings about this machine only: `agent`'s, `up`'s and `doctor`'s.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// The Claude Code binary.
    #[arg(long, env = "CLAUDE_BIN", default_value = crate::process::DEFAULT_CLAUDE_BIN)]
    pub claude_bin: String,
    #[command(flatten)]
    pub login: ClaudeLoginArgs,
    /// Model for jobs that do not name one.
    #[arg(long, env = "CLAUDE_MODEL")]
    pub claude_model: Option<String>,
    /// More of the agent's environment variables that Claude may see, comma-separated
    /// (e.g. `NPM_CONFIG_REGISTRY,PIP_INDEX_URL`); see README "What a job can see".
    #[arg(long, env = "JOB_ENV_ALLOW", default_value = "")]
    pub job_env_allow: String,
}

/// Claude's login and the agent's folder: all `oauth-status` reads.
#[derive(Debug, Clone, Args)]
pub struct ClaudeLoginArgs {
    /// Claude's config folder (holds .credentials.json; default ~/.claude). A relative path
    /// is taken from the folder the command starts in.
    #[arg(long, env = "CLAUDE_CONFIG_DIR", value_parser = absolute_folder("CLAUDE_CONFIG_DIR"))]
    pub claude_config_dir: Option<PathBuf>,
    #[command(flatten)]
    pub dir: DataDirArgs,
}

/// The agent's folder: all `status` reads.
#[derive(Debug, Clone, Args)]
pub struct DataDirArgs {
    /// Workspaces and the result spool (default ~/.local/share/claude-runner; `up` keeps
    /// its keys, edge and agent in DATA_DIR/up). A relative path is taken from the folder
    /// the command starts in.
    #[arg(long, env = "DATA_DIR", value_parser = absolute_folder("DATA_DIR"))]
    pub data_dir: Option<PathBuf>,
}

/// A folder setting, read as an absolute path: a relative one is taken from the folder the
/// command starts in, once, as it starts. Kept relative, `CLAUDE_CONFIG_DIR=claude` was
/// the agent's `./claude` and each job's Claude's `claude` in its workspace (its working
/// directory: no login there, and one a job could put), and `doctor` run from elsewhere
/// read a third. Any bytes, as a path may be ([`refuse_settings_not_text`] knows a path by
/// the type parsed).
fn absolute_folder(name: &'static str) -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::PathBufValueParser::new().try_map(move |path: PathBuf| {
        std::path::absolute(&path).map_err(|e| {
            format!("{name} is a relative path and the folder this command started in cannot be read ({e}): give {name} as an absolute path")
        })
    })
}

impl LocalArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.login.dir.data_dir()
    }

    pub fn claude_config_dir(&self) -> Option<&Path> {
        self.login.claude_config_dir.as_deref()
    }

    /// [`DataDirArgs::running_agent_dir`].
    pub fn running_agent_dir(&self) -> PathBuf {
        self.login.dir.running_agent_dir()
    }
}

/// `DATA_DIR` when it is not set.
pub fn default_data_dir() -> PathBuf {
    home().join(".local/share/claude-runner")
}

impl DataDirArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// The `DATA_DIR` of the agent that `status`, `agent --drain`, `oauth-status` and
    /// `doctor` ask about: `DATA_DIR` itself once an agent has run there, else that of the
    /// agent of `claude-runner up` run with this `DATA_DIR`, when it has — so a newcomer's
    /// `status` beside `up` finds `up`'s agent rather than saying none ever ran.
    ///
    /// A live agent comes first, known by its folder's lock (held for its whole life, seen
    /// in /proc/locks, which a job cannot write): an agent stopped long ago in `DATA_DIR`
    /// left its status.json there, and a job of `up`'s agent can write one; neither may
    /// hide `up`'s running agent.
    pub fn running_agent_dir(&self) -> PathBuf {
        let data_dir = self.data_dir();
        if crate::drain::lock_taken(&data_dir) {
            return data_dir;
        }
        if crate::drain::lock_taken(&up_agent_dir(&data_dir)) {
            return up_agent_dir(&data_dir);
        }
        if !agent_has_run(&data_dir) && agent_has_run(&up_agent_dir(&data_dir)) {
            return up_agent_dir(&data_dir);
        }
        data_dir
    }
}

/// The home folder the defaults are under (`DATA_DIR`'s, Claude's ~/.claude): `HOME`, or
/// where it is unset (or not an absolute path: a service manager, `env -i`, a cron job),
/// the home of this user in the password database, where Claude (Node's `os.homedir()`)
/// looks too. It was /root for every user: a user's agent wrote into root's folder, or
/// could not. With neither, a default cannot be had: the command stops, saying what to
/// set (only a command that needs one calls this).
pub fn home() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    runtime::home::this_users(std::env::var_os("HOME")).unwrap_or_else(|| {
        eprintln!(
            "claude-runner: HOME is not set (or not an absolute path) and user {uid} has no home folder in the password database: set HOME, or set DATA_DIR (and CLAUDE_CONFIG_DIR, Claude's login folder)"
        );
        std::process::exit(2)
    })
}

/// Makes `HOME` the home [`home`] takes where it is set but is no absolute path (empty, or
/// relative: a unit's `Environment=HOME=`): the agent took the password database's, while
/// its children took `HOME` as it was — each job's Claude (Node's `os.homedir()` is `HOME`
/// whenever it is set) read and wrote `.claude` in the job's workspace, its working
/// directory, and `claude auth login` in the agent's. Unset, it stays unset: Claude then
/// asks the password database too. Call it before any thread starts (it changes the
/// environment).
pub fn settle_home() {
    let Some(set) = std::env::var_os("HOME") else { return };
    if Path::new(&set).is_absolute() {
        return;
    }
    if let Some(home) = runtime::home::this_users(Some(set)) {
        std::env::set_var("HOME", home);
    }
}

/// Where `claude-runner up` run with `DATA_DIR` keeps its keys and runner secret.
pub fn up_state_file(data_dir: &Path) -> PathBuf {
    data_dir.join("up").join("up.json")
}

/// `up.json` ([`up_state_file`]): the keys and runner secret `claude-runner up` made on its
/// first run, kept for the next. `up` reads it, and so does `login` (`signin.rs`), which
/// checks a sign-in URL against `up`'s agent's key when its secret is `up`'s: both through
/// [`UpState::read`], which `up` is not needed to build.
#[derive(Serialize, Deserialize)]
pub struct UpState {
    #[serde(flatten)]
    pub keys: crate::keygen::KeySet,
    pub runner_secret: String,
    pub agent_id: String,
}

/// The most `up.json` holds: its keys and secret take well under 1 KiB.
pub const MAX_UP_STATE_BYTES: usize = 64 * 1024;

impl UpState {
    /// `up.json` at `path`, read as a file the agent keeps (bounded, never through a link,
    /// never waiting on a pipe) and checked as `up` makes it: it is a job's to rewrite (a
    /// job runs as this user), and what is read from it becomes a command line the
    /// operator pastes (`up`) and the key a sign-in URL is trusted by (`login`). `Err`:
    /// why it is not one (each caller says what to do).
    pub fn read(path: &Path) -> Result<UpState, String> {
        let bytes = crate::files::read_private(path, MAX_UP_STATE_BYTES, "claude-runner up state").map_err(|e| e.to_string())?;
        let state: UpState = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if !shared::ids::valid_agent_id(&state.agent_id) {
            return Err("its agent_id is not a plain name".into());
        }
        if !plain_secret(&state.runner_secret) {
            return Err("its runner_secret is not 16-256 letters, digits or `-_.+/=~`".into());
        }
        // The public keys reach the edge's settings as they are (`AGENT_PUBLIC_KEYS`, where
        // a `,` adds an agent): each must be its signing key's, as `up` made them.
        for (signing, public, names) in [
            (&state.keys.edge_signing_key, &state.keys.edge_public_key, "edge_signing_key and edge_public_key"),
            (&state.keys.agent_signing_key, &state.keys.agent_public_key, "agent_signing_key and agent_public_key"),
        ] {
            if !keys::signing_key("key", signing).is_ok_and(|key| keys::encode_verifying(&key.verifying_key()) == *public) {
                return Err(format!("its {names} are not a key pair"));
            }
        }
        Ok(state)
    }
}

/// A runner secret `up` may print inside the single quotes of a shell line: `up` makes 64
/// hex digits, and one set by hand may use the characters of base64 and of URLs too.
pub fn plain_secret(secret: &str) -> bool {
    (16..=256).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+/=~".contains(&b))
}

/// Where `claude-runner up` run with `DATA_DIR` keeps its agent's files.
pub fn up_agent_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("up").join("agent")
}

/// Whether `dir` is the agent's folder of a `claude-runner up` ([`up_agent_dir`] of a
/// `DATA_DIR` that holds `up`'s keys): its agent is started again by `up`, not by `agent`.
pub fn is_up_agent_dir(dir: &Path) -> bool {
    let Some(data_dir) = dir.parent().and_then(Path::parent) else { return false };
    up_agent_dir(data_dir) == dir && std::fs::symlink_metadata(up_state_file(data_dir)).is_ok()
}

/// Whether an agent has run with this `DATA_DIR` (it left its status file there).
pub fn agent_has_run(data_dir: &Path) -> bool {
    std::fs::symlink_metadata(data_dir.join(crate::status::FILE_NAME)).is_ok()
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub connect_url: String,
    pub agent_id: String,
    /// The pool this agent serves (`EDGE_POOL`).
    pub pool: String,
    pub signing_key: SigningKey,
    pub edge_public_key: VerifyingKey,
    pub claude_bin: String,
    pub claude_config_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub max_concurrent_jobs: u32,
    pub claude_model: Option<String>,
    /// The operator's extra variables passed to Claude (`JOB_ENV_ALLOW`).
    pub job_env_allow: Vec<String>,
    /// Secrets of the agent itself — its key, secrets of the edge or of git it was given —
    /// that the redactor masks besides the login's tokens, should a job find them anyway.
    pub secrets: Vec<String>,
    pub repos: crate::repo::settings::RepoSettings,
    /// How long a stop waits for running jobs before handing them back.
    pub drain_timeout: std::time::Duration,
    /// Labels offered to jobs (`AGENT_LABELS`).
    pub labels: shared::placement::Labels,
    /// Exit after one job (`--one-job`).
    pub one_job: bool,
}

/// Makes every setting read as meant (`shared::setting`): a blank one (`CLAUDE_MODEL=`,
/// `DATA_DIR= ` in an `.env` file or a systemd `EnvironmentFile`) unset, as people writing
/// those files expect and the edges read theirs, and every other trimmed. Clap would take
/// an empty value and refuse it, take ` ` as a folder named ` `, and refuse ` 2` as a
/// number. Every variable a flag of `cli` reads is covered, in every subcommand. Call it
/// before any thread starts (it changes the environment).
pub fn tidy_settings(cli: &clap::Command) {
    for (name, value) in settings_as_meant(cli, |name| std::env::var_os(name)) {
        match value {
            None => std::env::remove_var(&name),
            Some(value) => std::env::set_var(&name, value),
        }
    }
}

/// The settings of `cli` whose value in `lookup` is not as meant, each with the value it
/// should have (`None`: unset).
fn settings_as_meant(
    cli: &clap::Command,
    lookup: impl Fn(&std::ffi::OsStr) -> Option<std::ffi::OsString>,
) -> Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> {
    setting_names(cli, |_| true)
        .into_iter()
        .filter_map(|name| {
            let raw = lookup(&name)?;
            let meant = shared::setting::os_value(&raw).map(std::ffi::OsStr::to_os_string);
            (meant.as_ref() != Some(&raw)).then_some((name, meant))
        })
        .collect()
}

/// The variables the flags of `cli` read, in every subcommand, those `keep` keeps, sorted.
fn setting_names(cli: &clap::Command, keep: impl Fn(&clap::Arg) -> bool + Copy) -> Vec<std::ffi::OsString> {
    fn names(cmd: &clap::Command, keep: impl Fn(&clap::Arg) -> bool + Copy, out: &mut Vec<std::ffi::OsString>) {
        out.extend(cmd.get_arguments().filter(|a| keep(a)).filter_map(|a| a.get_env().map(|e| e.to_os_string())));
        for sub in cmd.get_subcommands() {
            names(sub, keep, out);
        }
    }
    let mut settings = Vec::new();
    names(cli, keep, &mut settings);
    settings.sort();
    settings.dedup();
    settings
}

/// The commands that read the agent's secrets ([`SECRET_VARS`]) themselves: Claude's
/// tokens through `oauth::Login`, the rest to redact.
const READS_SECRETS: &[&str] = &["agent", "up", "doctor", "oauth-status"];

/// The command asked for: clap's (`parsed`), or where clap could not parse the arguments (a
/// setting it refused), the first argument that names one (a prompt that names a command,
/// `submit agent`, is submit's).
pub fn asked_command<'a>(cli: &'a clap::Command, args: &[std::ffi::OsString], parsed: Option<&str>) -> Option<&'a clap::Command> {
    match parsed {
        Some(name) => cli.find_subcommand(name),
        None => args.iter().skip(1).find_map(|a| a.to_str().and_then(|a| cli.find_subcommand(a))),
    }
}

/// Refuses, by name, a setting the command `args` asks for (`parsed`: its name, when clap
/// could parse them) reads whose value is not UTF-8
/// text: every variable a flag of that command (or a global one) reads as text — a path
/// may be any bytes —, the secrets it reads itself ([`READS_SECRETS`]) and `RUST_LOG`
/// (every command logs). Clap refused such a flag's value without saying which ("invalid
/// UTF-8 was detected in one or more arguments"); a token read by the agent
/// (`CLAUDE_CODE_OAUTH_TOKEN`, `ANTHROPIC_API_KEY`) was taken as unset — Claude ran without
/// it and it was not among the values redacted — and `RUST_LOG` as the filter `info`, each
/// saying nothing. Settings only other commands read are not looked at: a stray byte in
/// `GIT_AUTHOR_NAME` does not stop `status` or `submit`, which never read it. The native
/// edge refuses its settings the same way.
pub fn refuse_settings_not_text(
    cli: &clap::Command,
    args: &[std::ffi::OsString],
    parsed: Option<&str>,
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(), shared::setting::NotText> {
    let text = |a: &clap::Arg| {
        let parser = a.get_value_parser().type_id();
        parser != clap::builder::ValueParser::path_buf().type_id() && parser != clap::builder::ValueParser::os_string().type_id()
    };
    let asked = asked_command(cli, args, parsed);
    let mut names: Vec<std::ffi::OsString> =
        cli.get_arguments().filter(|a| text(a)).filter_map(|a| a.get_env().map(|e| e.to_os_string())).collect();
    if let Some(command) = asked {
        names.extend(setting_names(command, text));
        if READS_SECRETS.contains(&command.get_name()) {
            names.extend(SECRET_VARS.iter().map(std::ffi::OsString::from));
        }
    }
    names.push("RUST_LOG".into());
    let env = shared::setting::TextSettings::new(lookup);
    for name in names {
        env.get(&name.to_string_lossy());
    }
    env.refuse_any()
}

/// Variables that may hold a secret of the agent or of its edge, git or Anthropic account.
/// None is passed to Claude (not even through `JOB_ENV_ALLOW`); each value is redacted.
pub const SECRET_VARS: &[&str] = &[
    "AGENT_SIGNING_KEY",
    "RUNNER_SECRET",
    "EDGE_SIGNING_KEY",
    "GITHUB_TOKEN",
    "REPO_TOKENS",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_API_KEY",
];

/// The values of [`SECRET_VARS`] in `lookup`; of `REPO_TOKENS` (`host=token,…`) only its
/// tokens. Its whole value made its host names secrets too: the redactor masks any long
/// enough piece of a secret, so a host of 12 characters or more was masked in diffs and
/// errors, and a push of a file naming it was refused as holding a secret (rev25, 4).
/// An entry without `=` is refused when the agent starts (`repo::settings`).
pub fn secret_values(lookup: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut secrets = Vec::new();
    for name in SECRET_VARS {
        let Some(value) = lookup(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) else { continue };
        if *name == "REPO_TOKENS" {
            let tokens = value.split(',').filter_map(|entry| entry.split_once('=')).map(|(_, token)| token.trim().to_string());
            secrets.extend(tokens.filter(|t| !t.is_empty()));
            continue;
        }
        secrets.push(value);
    }
    secrets
}

/// The forms of an agent key worth masking: as written, and the seed in standard base64
/// and hex (should a job print it decoded).
pub fn key_forms(text: &str, key: &SigningKey) -> Vec<String> {
    vec![text.trim().to_string(), keys::encode_signing(key), shared::ids::hex(&key.to_bytes())]
}

/// `JOB_ENV_ALLOW` → names, refusing the agent's secrets and names that are not names.
pub fn job_env_allow(list: &str) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if SECRET_VARS.contains(&name) || name == "AGENT_KEY_FILE" {
            anyhow::bail!(
                "JOB_ENV_ALLOW names {name}, a secret of the agent: a job must never see it (Claude's login is passed to it by the agent when it needs one); remove it from JOB_ENV_ALLOW"
            );
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || name.as_bytes()[0].is_ascii_digit() {
            anyhow::bail!("JOB_ENV_ALLOW entry `{name}` is not a variable name; list names like `NPM_CONFIG_REGISTRY,PIP_INDEX_URL`");
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// Why a key file may not be used, if it may not: readable by others (any user could
/// become this agent), or inside `DATA_DIR`, where the jobs' workspaces are.
pub fn key_file_problem(path: &Path, mode: u32, data_dir: &Path) -> Option<String> {
    if mode & 0o077 != 0 {
        return Some(format!(
            "AGENT_KEY_FILE {} can be read or changed by other users (mode {:o}): anyone who reads it can act as this agent. Fix it with `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    if real(path).starts_with(real(data_dir)) {
        return Some(format!(
            "AGENT_KEY_FILE {} is inside DATA_DIR {}, beside the jobs' workspaces; move it outside (e.g. /etc/claude-runner/agent.key, mode 600, owned by the agent's user)",
            path.display(),
            data_dir.display()
        ));
    }
    None
}

/// Refuses a secret ([`SECRET_VARS`]) given as a flag to the command `matches` holds
/// (parsed with `cli`): every local user, and every job (the agent's user), can read a
/// process's command line in /proc for its whole life, and a job must never see the
/// agent's secrets (README, What a job can see). Such a setting is taken from the
/// environment (or a file, where there is one) only; the error names it.
pub fn refuse_secret_flags(cli: &clap::Command, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let Some((name, given)) = matches.subcommand() else { return Ok(()) };
    let Some(command) = cli.find_subcommand(name) else { return Ok(()) };
    for arg in command.get_arguments() {
        let (Some(env), Some(flag)) = (arg.get_env().and_then(|e| e.to_str()), arg.get_long()) else { continue };
        if SECRET_VARS.contains(&env) && given.value_source(arg.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine) {
            let file = if env == "AGENT_SIGNING_KEY" { " or use AGENT_KEY_FILE (a file of mode 600)" } else { "" };
            anyhow::bail!(
                "--{flag} puts a secret in the process's command line, which every local user (and every job) can read: set {env} in the environment instead{file}"
            );
        }
    }
    Ok(())
}

/// The machine's hostname, made into a valid agent id.
pub fn default_agent_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() { "spark".into() } else { id }
}

impl AgentConfig {
    /// How many jobs this agent runs at once, as it tells the edge: `MAX_CONCURRENT_JOBS`,
    /// or one for a `--one-job` agent, which takes one job in all (offering more had the
    /// edge send orders it could only refuse, each refusal counting toward the edge's
    /// limit of sends per job).
    pub fn capacity(&self) -> u32 {
        if self.one_job { self.max_concurrent_jobs.min(1) } else { self.max_concurrent_jobs }
    }

    /// Settings to run a job on this machine with no edge (the canary): the local ones
    /// from `local`; the keys are fresh and never used, as nothing is dialled.
    pub fn local_only(local: &LocalArgs, agent_id: String) -> AgentConfig {
        let unused = SigningKey::from_bytes(&runtime::entropy());
        AgentConfig {
            connect_url: String::new(),
            agent_id,
            pool: shared::ids::DEFAULT_POOL.to_string(),
            edge_public_key: unused.verifying_key(),
            signing_key: unused,
            claude_bin: local.claude_bin.clone(),
            claude_config_dir: local.login.claude_config_dir.clone(),
            data_dir: local.data_dir(),
            max_concurrent_jobs: 1,
            claude_model: local.claude_model.clone(),
            // `agent` refuses a bad list at start; `doctor` names it.
            job_env_allow: job_env_allow(&local.job_env_allow).unwrap_or_default(),
            secrets: secret_values(|name| std::env::var(name).ok()),
            repos: crate::repo::settings::RepoSettings::default(),
            drain_timeout: std::time::Duration::ZERO,
            labels: Default::default(),
            one_job: false,
        }
    }
}

impl AgentArgs {
    pub fn agent_id(&self) -> String {
        self.agent_id.clone().unwrap_or_else(default_agent_id)
    }

    /// The text of the agent's signing key, from AGENT_SIGNING_KEY or AGENT_KEY_FILE.
    pub fn signing_key_text(&self) -> anyhow::Result<String> {
        match (&self.agent_signing_key, &self.agent_key_file) {
            (Some(k), _) => Ok(k.clone()),
            (None, Some(path)) => {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("cannot read AGENT_KEY_FILE {}: {e}", path.display()))?;
                if let Some(problem) = key_file_problem(path, meta.permissions().mode(), &self.local.data_dir()) {
                    anyhow::bail!(problem);
                }
                // Bounded and never waiting on a pipe: the file is the agent's user's, a job's to
                // write (a key is 44 characters).
                // Its errors name the file.
                let bytes = crate::files::read_named(path, 64 * 1024, "key file").map_err(|e| anyhow::anyhow!("cannot read AGENT_KEY_FILE: {e}"))?;
                String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("AGENT_KEY_FILE {} is not text; put the key `claude-runner keygen` printed in it", path.display()))
            }
            (None, None) => anyhow::bail!("set AGENT_SIGNING_KEY or AGENT_KEY_FILE (`claude-runner keygen` makes one)"),
        }
    }

    pub fn resolve(self) -> anyhow::Result<AgentConfig> {
        let key_text = self.signing_key_text()?;
        let agent_id = self.agent_id();
        if !shared::ids::valid_agent_id(&agent_id) {
            anyhow::bail!("AGENT_ID `{agent_id}` is not valid: use 1-64 letters, digits, `-`, `_` or `.`");
        }
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > MAX_MAX_CONCURRENT_JOBS {
            anyhow::bail!("MAX_CONCURRENT_JOBS must be between 1 and {MAX_MAX_CONCURRENT_JOBS}");
        }
        let edge_url = self.edge_url.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "EDGE_URL is not set: set it to the edge, e.g. wss://claude-runner-edge.<you>.workers.dev (with docker compose's tunnel profile: ws://edge:8787, and ALLOW_INSECURE_EDGE=1)"
            )
        })?;
        let edge_public_key = self.edge_public_key.as_deref().ok_or_else(|| {
            anyhow::anyhow!("set EDGE_PUBLIC_KEY (printed by `claude-runner keygen` next to EDGE_SIGNING_KEY)")
        })?;
        if !shared::ids::plain_id(&self.edge_pool, shared::ids::MAX_POOL_NAME) {
            anyhow::bail!(
                "EDGE_POOL `{}` is not a pool name: 1-{} letters, digits, `-` and `_`",
                shared::text::truncate(&self.edge_pool, 80),
                shared::ids::MAX_POOL_NAME
            );
        }
        let (labels, drain_timeout) = self.work.resolve()?;
        let signing_key = keys::signing_key("AGENT_SIGNING_KEY", &key_text)?;
        let mut secrets = key_forms(&key_text, &signing_key);
        secrets.extend(secret_values(|name| std::env::var(name).ok()));
        Ok(AgentConfig {
            connect_url: edge_url::connect_url(edge_url, self.allow_insecure_edge)?,
            job_env_allow: job_env_allow(&self.local.job_env_allow)?,
            secrets,
            agent_id,
            pool: self.edge_pool,
            signing_key,
            edge_public_key: keys::verifying_key("EDGE_PUBLIC_KEY", edge_public_key)?,
            data_dir: self.local.data_dir(),
            claude_bin: self.local.claude_bin,
            claude_config_dir: self.local.login.claude_config_dir,
            max_concurrent_jobs: self.max_concurrent_jobs,
            claude_model: self.local.claude_model,
            repos: self.repos.resolve()?,
            drain_timeout,
            labels,
            one_job: self.one_job,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `up.json` is a job's to rewrite (the agent's user), and `up` and `login` read it
    /// through one reader: whatever the file holds — wrong types, another program's JSON,
    /// no JSON, nesting past any depth, more than its bound, a folder, nothing — the
    /// reader says why it is no `up.json` of `up`'s, and never panics.
    #[test]
    fn an_up_state_file_that_is_not_ups_is_refused_with_why() {
        let dir = harness::TempDir::new("config-up-state");
        let path = dir.path().join("up.json");
        let made = UpState { keys: crate::keygen::KeySet::generate(), runner_secret: "0123456789abcdef".into(), agent_id: "spark".into() };
        let good = serde_json::to_value(&made).unwrap();
        std::fs::write(&path, good.to_string()).unwrap();
        let read = UpState::read(&path).expect("up's own file");
        assert_eq!((read.agent_id.as_str(), read.runner_secret.as_str()), ("spark", "0123456789abcdef"));
        let with = |field: &str, value: serde_json::Value| {
            let mut state = good.clone();
            state[field] = value;
            state.to_string().into_bytes()
        };
        let mut without_key = good.clone();
        without_key.as_object_mut().unwrap().remove("agent_public_key");
        let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        let mut padded = good.to_string().into_bytes();
        padded.resize(MAX_UP_STATE_BYTES + 1, b' ');
        for (what, bytes, why) in [
            ("a number for the secret", with("runner_secret", serde_json::json!(5)), "invalid type"),
            ("a list for the agent id", with("agent_id", serde_json::json!(["spark"])), "invalid type"),
            ("an object for a key", with("agent_public_key", serde_json::json!({"k": 1})), "invalid type"),
            ("a key left out", without_key.to_string().into_bytes(), "missing field"),
            ("another program's JSON", br#"{"name":"x","version":1}"#.to_vec(), "missing field"),
            ("a list", b"[1,2,3]".to_vec(), "invalid type"),
            ("null", b"null".to_vec(), "invalid type"),
            ("no text", vec![0xff, 0xfe, 0, 1], "expected value"),
            ("nothing", Vec::new(), "EOF"),
            ("nesting past any depth", deep.into_bytes(), "recursion limit"),
            ("more than its bound", padded, "over 65536 bytes"),
            ("a secret of control characters", with("runner_secret", "0123456789abcdef\u{1b}]0;x\u{7}".into()), "runner_secret"),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let e = UpState::read(&path).err().unwrap_or_else(|| panic!("{what} was read as up's"));
            assert!(e.contains(why), "{what}: {e}");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(UpState::read(&path).is_err(), "no file");
        std::fs::create_dir(&path).unwrap();
        assert!(UpState::read(&path).err().unwrap().contains("not a plain file"), "a folder");
    }

    /// An agent once run in DATA_DIR (long stopped: its status.json stays) and `up` running
    /// now with that DATA_DIR: `status` showed the stopped agent and `--drain` said there was
    /// nothing to drain, beside `up`'s live agent. The agent holding its folder's lock is
    /// the one asked about; so a status.json a job plants in DATA_DIR (a job of `up`'s agent
    /// can write there) no longer turns them away from `up`'s agent either.
    #[test]
    fn the_live_agent_of_up_is_found_beside_a_stopped_one_in_data_dir() {
        let dir = std::env::temp_dir().join(format!("cr-config-running-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let up = up_agent_dir(&dir);
        std::fs::create_dir_all(&up).unwrap();
        std::fs::write(dir.join(crate::status::FILE_NAME), b"{}").unwrap();
        std::fs::write(up.join(crate::status::FILE_NAME), b"{}").unwrap();
        let local = LocalArgs {
            claude_bin: "claude".into(),
            login: ClaudeLoginArgs { claude_config_dir: None, dir: DataDirArgs { data_dir: Some(dir.clone()) } },
            claude_model: None,
            job_env_allow: String::new(),
        };
        assert_eq!(local.running_agent_dir(), dir, "neither runs: DATA_DIR's, as before");
        let held = runtime::hold_lock(&up.join(crate::agent::DATA_LOCK)).unwrap().expect("nobody else holds it");
        let found = local.running_agent_dir();
        // DATA_DIR's own live agent is asked about first.
        let own = runtime::hold_lock(&dir.join(crate::agent::DATA_LOCK)).unwrap().expect("nobody else holds it");
        let own_found = local.running_agent_dir();
        drop((held, own));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((found, own_found), (up, dir));
    }

    /// `DATA_DIR=' '` was a folder named ` ` (for `status` and the agent alike) and
    /// `MAX_CONCURRENT_JOBS=' 2'` stopped the start: every command's settings, a
    /// subcommand's own included, are read trimmed, blank as unset.
    #[test]
    fn every_commands_settings_are_read_trimmed_and_blank_is_unset() {
        let cli = clap::Command::new("claude-runner")
            .arg(clap::Arg::new("log").long("log").env("LOG_FORMAT"))
            .subcommand(clap::Command::new("status").arg(clap::Arg::new("dir").long("dir").env("DATA_DIR")))
            .subcommand(
                clap::Command::new("agent")
                    .arg(clap::Arg::new("dir").long("dir").env("DATA_DIR"))
                    .arg(clap::Arg::new("jobs").long("jobs").env("MAX_CONCURRENT_JOBS"))
                    .arg(clap::Arg::new("model").long("model").env("CLAUDE_MODEL"))
                    .subcommand(clap::Command::new("deeper").arg(clap::Arg::new("s").long("s").env("RUNNER_SECRET"))),
            );
        let lookup = |name: &std::ffi::OsStr| {
            let value = match name.to_str()? {
                "DATA_DIR" => " ",
                "MAX_CONCURRENT_JOBS" => " 2\t",
                "CLAUDE_MODEL" => "opus",
                "RUNNER_SECRET" => "",
                "LOG_FORMAT" => "json ",
                _ => return None,
            };
            Some(std::ffi::OsString::from(value))
        };
        let os = |v: &str| std::ffi::OsString::from(v);
        assert_eq!(
            settings_as_meant(&cli, lookup),
            vec![
                (os("DATA_DIR"), None),
                (os("LOG_FORMAT"), Some(os("json"))),
                (os("MAX_CONCURRENT_JOBS"), Some(os("2"))),
                (os("RUNNER_SECRET"), None),
            ]
        );
    }

    /// A value that is not UTF-8 is refused by name (never shown), whichever of the
    /// command's text settings or secrets holds it; a path may be any bytes; a setting the
    /// command does not read is not looked at.
    #[test]
    fn a_setting_that_is_not_text_is_refused_by_name() {
        use std::os::unix::ffi::OsStrExt;
        let cli = <crate::Cli as clap::CommandFactory>::command();
        let args = |a: &[&str]| std::iter::once("claude-runner").chain(a.iter().copied()).map(std::ffi::OsString::from).collect::<Vec<_>>();
        let not_text = || std::ffi::OsStr::from_bytes(b"tok-\xe9-0123456789").to_os_string();
        assert_eq!(refuse_settings_not_text(&cli, &args(&["agent"]), None, |_| Some("text".into())), Ok(()));
        let refused: [(&[&str], &str); 15] = [
            (&["agent"], "CLAUDE_CODE_OAUTH_TOKEN"),
            (&["agent"], "ANTHROPIC_API_KEY"),
            (&["agent"], "ANTHROPIC_AUTH_TOKEN"),
            (&["agent"], "GITHUB_TOKEN"),
            (&["agent"], "REPO_TOKENS"),
            (&["agent"], "AGENT_SIGNING_KEY"),
            (&["agent"], "EDGE_URL"),
            (&["--log-format", "json", "agent", "--drain"], "CLAUDE_MODEL"),
            (&["agent"], "MAX_CONCURRENT_JOBS"),
            (&["status"], "LOG_FORMAT"),
            (&["status"], "RUST_LOG"),
            (&["submit", "agent"], "CLAUDE_RUNNER_URL"),
            (&["submit", "hi"], "RUNNER_SECRET"),
            (&["doctor"], "ANTHROPIC_API_KEY"),
            (&["oauth-status"], "CLAUDE_CODE_OAUTH_TOKEN"),
        ];
        for (command, name) in refused {
            let err = refuse_settings_not_text(&cli, &args(command), None, |asked| (asked == name).then(not_text)).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{name} is not UTF-8 text")), "{command:?} {name}: {err}");
            assert!(!err.contains("tok-") && !err.contains("0123456789"), "the value is shown: {err}");
        }
        let taken: [(&[&str], &str); 7] = [
            (&["agent"], "DATA_DIR"),
            (&["agent"], "CLAUDE_CONFIG_DIR"),
            (&["agent"], "AGENT_KEY_FILE"),
            (&["status"], "GIT_AUTHOR_NAME"),
            (&["status"], "ANTHROPIC_API_KEY"),
            (&["submit", "agent"], "GITHUB_TOKEN"),
            (&["keygen"], "EDGE_URL"),
        ];
        for (command, name) in taken {
            assert_eq!(refuse_settings_not_text(&cli, &args(command), None, |asked| (asked == name).then(not_text)), Ok(()), "{command:?} {name}");
        }
        // What clap parsed is the command: `--log-format agent status` is status (and its
        // LOG_FORMAT is refused by clap), not agent.
        let key = |asked: &str| (asked == "ANTHROPIC_API_KEY").then(not_text);
        assert_eq!(refuse_settings_not_text(&cli, &args(&["--log-format", "agent", "status"]), Some("status"), key), Ok(()));
        assert!(refuse_settings_not_text(&cli, &args(&["--log-format", "agent", "status"]), None, key).is_err(), "unparsed, the first name is taken");
    }

    #[test]
    fn key_files_must_be_private_and_outside_the_jobs_reach() {
        let data = Path::new("/srv/runner");
        let key = Path::new("/etc/claude-runner/agent.key");
        assert_eq!(key_file_problem(key, 0o100600, data), None);
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let problem = key_file_problem(key, 0o100000 | mode, data).expect("refused");
            assert!(problem.contains("chmod 600 /etc/claude-runner/agent.key"), "{problem}");
        }
        let inside = key_file_problem(Path::new("/srv/runner/workspaces/agent.key"), 0o600, data).expect("refused");
        assert!(inside.contains("inside DATA_DIR"), "{inside}");
    }

    #[test]
    fn secrets_are_never_passed_on_and_always_redacted() {
        assert_eq!(job_env_allow(" NPM_CONFIG_REGISTRY, PIP_INDEX_URL,,").unwrap(), ["NPM_CONFIG_REGISTRY", "PIP_INDEX_URL"]);
        for bad in ["AGENT_SIGNING_KEY", "X,RUNNER_SECRET", "GITHUB_TOKEN", "AGENT_KEY_FILE", "A-B", "1X", "A=B"] {
            assert!(job_env_allow(bad).is_err(), "{bad}");
        }
        let env = |name: &str| match name {
            "RUNNER_SECRET" => Some("runner-secret-0123456789".to_string()),
            "REPO_TOKENS" => Some("git.example.com=tok-aaaaaaaaaaaa, other.host=tok-bbbbbbbbbbbb".to_string()),
            "GITHUB_TOKEN" => Some("  ".to_string()),
            _ => None,
        };
        let secrets = secret_values(env);
        for s in ["runner-secret-0123456789", "tok-aaaaaaaaaaaa", "tok-bbbbbbbbbbbb"] {
            assert!(secrets.iter().any(|x| x == s), "{s} in {secrets:?}");
        }
        assert!(!secrets.iter().any(|s| s.trim().is_empty()));
        // The hosts are no secret: nothing naming them is masked or refused (rev25, 4).
        assert!(!secrets.iter().any(|s| s.contains("git.example.com") || s.contains("other.host")), "{secrets:?}");
    }

    /// Every flag whose value is hidden in `--help` (a secret) reads one of SECRET_VARS,
    /// so that the one refusal covers it: a secret flag added later is refused too.
    #[test]
    fn every_secret_flag_is_refused() {
        use clap::CommandFactory;
        let cli = crate::Cli::command();
        let mut seen = 0;
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments().filter(|a| a.is_hide_env_values_set()) {
                let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
                assert!(SECRET_VARS.contains(&env), "{} --{:?} hides {env}, which SECRET_VARS lacks", sub.get_name(), arg.get_long());
                let flag = format!("--{}=x", arg.get_long().unwrap());
                let mut argv = vec!["claude-runner", sub.get_name(), &flag];
                if sub.get_name() == "submit" {
                    argv.push("hello");
                }
                let matches = cli.clone().try_get_matches_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
                let refused = refuse_secret_flags(&cli, &matches).err().unwrap_or_else(|| panic!("{argv:?} taken")).to_string();
                assert!(refused.contains(&format!("set {env} in the environment")), "{refused}");
                seen += 1;
            }
        }
        assert!(seen >= 10, "agent's and doctor's three, up's two, submit's and login's one: {seen}");
    }

    /// A relative `CLAUDE_CONFIG_DIR` is made absolute as the command starts, from where it
    /// starts: kept relative, each job's Claude read it in its own workspace. Taken as a
    /// path still (any bytes).
    #[test]
    fn a_relative_claude_config_dir_is_taken_from_where_the_command_starts() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            login: ClaudeLoginArgs,
        }
        let here = std::env::current_dir().unwrap();
        let parsed = Cli::try_parse_from(["x", "--claude-config-dir", "rel/claude"]).unwrap();
        assert_eq!(parsed.login.claude_config_dir, Some(here.join("rel/claude")));
        let parsed = Cli::try_parse_from(["x", "--claude-config-dir", "/srv/claude"]).unwrap();
        assert_eq!(parsed.login.claude_config_dir, Some(PathBuf::from("/srv/claude")));
        use std::os::unix::ffi::OsStrExt;
        let bytes = std::ffi::OsStr::from_bytes(b"/srv/\xff");
        let parsed = Cli::try_parse_from([std::ffi::OsStr::new("x"), std::ffi::OsStr::new("--claude-config-dir"), bytes]).unwrap();
        assert_eq!(parsed.login.claude_config_dir.as_deref(), Some(std::path::Path::new(bytes)));
        // DATA_DIR too: the workspaces' paths under it reach the launcher, each job's
        // Claude and git, which run in other folders.
        let parsed = Cli::try_parse_from(["x", "--data-dir", "rel/data"]).unwrap();
        assert_eq!(parsed.login.dir.data_dir, Some(here.join("rel/data")));
    }
}
