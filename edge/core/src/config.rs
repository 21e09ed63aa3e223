//! Edge settings. Both hosts read the same variable names (README "Configuration");
//! [`Config::from_lookup`] takes a lookup function so the native host passes
//! `std::env::var` and the Worker passes its vars and secrets.
//!
//! Pools: the edge serves the `default` pool (callers' secret `RUNNER_SECRET`, agents
//! `AGENT_PUBLIC_KEYS`) and each pool named in `POOLS`, every one with its own secret and
//! agents (`RUNNER_SECRET_<POOL>`, `AGENT_PUBLIC_KEYS_<POOL>`, see [`pool_suffix`]).
//! A [`Config`] is one pool's settings with the edge's shared ones. A pool that is not
//! listed does not exist. Pools are units of isolation: [`Config::for_pool`] (the Worker,
//! at each request) checks that pool's own settings and the shared ones, and another
//! pool's bad setting costs that pool alone; [`Config::from_lookup`] (the native edge, at
//! start) checks every pool's too ([`Pools::from_lookup`]), and does not start on any.
//!
//! Callers: besides the pool's `RUNNER_SECRET`, `RUNNER_SECRETS` (`name=secret,…`;
//! `RUNNER_SECRETS_<POOL>` for a listed pool) gives named callers their own secrets — the
//! name is then who the caller is, for its turn in the queue and its queue cap, and it is
//! that secret's alone (the pool's secret may not send jobs as it). A pool's
//! limits may be set for it alone: `MAX_QUEUED_JOBS_<POOL>` over `MAX_QUEUED_JOBS`, and so
//! for every number setting, for `NOTIFY_URL` (where its alerts go) and for
//! `CALLBACK_HOSTS` (where its jobs' callbacks may go: a pool's own list replaces the
//! edge's, so one team's hosts are not opened to another's jobs).

use ed25519_dalek::SigningKey;
use shared::keys::{self, Keyring};

#[derive(Clone)]
pub struct Config {
    /// The pool this machine serves; signed into every welcome and order.
    pub pool: String,
    pub runner_secret: String,
    /// Named callers and their own secrets (`RUNNER_SECRETS`).
    pub caller_secrets: Vec<(String, String)>,
    /// Jobs one caller may have waiting before its submissions get 429.
    pub max_queued_per_caller: usize,
    /// The secret of `GET /pools` (`ADMIN_SECRET`); without it the route is closed.
    pub admin_secret: Option<String>,
    pub signing_key: SigningKey,
    pub agents: Keyring,
    /// Every other pool this edge serves, with its agents' keys (none on the native edge,
    /// which serves one): an agent's upgrade proof refused here is tried against them, so
    /// the refusal can name the pool it was signed for ([`crate::upgrade::check_upgrade`]).
    pub other_pools: Vec<(String, Keyring)>,
    pub heartbeat_interval_ms: u64,
    pub lost_after_ms: u64,
    pub max_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub job_retention_ms: u64,
    /// How long a job submitted with `POST /jobs` may wait in the queue for an agent.
    pub queue_ttl_ms: u64,
    /// Jobs waiting for a free agent before submissions get 429.
    pub max_queued_jobs: usize,
    /// Added to a job's `timeout_ms` before the edge gives up on the agent's own report.
    pub timeout_margin_ms: u64,
    /// Ended jobs kept readable at most (the oldest of the caller holding the most go
    /// first, even before `JOB_RETENTION_MS`).
    pub max_retained_jobs: usize,
    /// …and at most this many bytes of their records, about.
    pub max_retained_bytes: u64,
    /// The bytes of the jobs not ended yet (queued, sent, running), about: memory keeps
    /// them whole, so past this a submission gets 429 (a caller with its own secret, past
    /// half of it). At least `max_body_bytes` (unset, it follows it), so one job always fits
    /// beside others.
    pub max_pending_bytes: u64,
    pub edge_version: String,
    /// Where this pool's alerts are posted (an ntfy topic URL, or any webhook taking a
    /// POST): `NOTIFY_URL_<POOL>`, else `NOTIFY_URL`.
    pub notify_url: Option<String>,
    /// Alert when the login will need a person within this many hours.
    pub oauth_warn_hours: f64,
    /// Alert when no agent has been connected for this long.
    pub offline_alert_ms: u64,
    /// The same alert at most once per this long.
    pub notify_min_interval_ms: u64,
    /// Hosts a job's `callback_url` may name.
    pub callback_hosts: Vec<String>,
    /// Silence after which an event stream gets a keep-alive comment (`SSE_KEEPALIVE_MS`,
    /// default and most [`crate::progress::SSE_KEEPALIVE_MS`]). A setting so a test sees
    /// one without waiting 15 s; never longer, since followers (`claude-runner submit`)
    /// take three of the default's silence for a dead connection.
    pub sse_keepalive_ms: u64,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        f.debug_struct("Config")
            .field("pool", &self.pool)
            .field("agents", &self.agents.len())
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("lost_after_ms", &self.lost_after_ms)
            .field("max_timeout_ms", &self.max_timeout_ms)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("job_retention_ms", &self.job_retention_ms)
            .finish_non_exhaustive()
    }
}

/// The shortest `SSE_KEEPALIVE_MS`: shorter, a quiet job's stream is mostly keep-alives.
pub const MIN_SSE_KEEPALIVE_MS: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set; run `claude-runner keygen` and set it as it says")]
    Missing(&'static str),
    #[error("{name} must be a whole number of {unit}, got `{value}`")]
    Number { name: String, unit: &'static str, value: String },
    /// Transparent: the key's error is the whole message, not also its cause (shown
    /// twice on the line the native edge stops with).
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    /// Without its length: on the Worker this error answers every request, and a secret's
    /// length is a measure of it.
    #[error("RUNNER_SECRET is too short: use at least 16 characters, e.g. `openssl rand -hex 32`")]
    WeakSecret,
    /// The value is not repeated: a webhook's URL may hold its token, and on the Worker
    /// this error answers every request, the secret's holders or not.
    #[error("{name} must be an http:// or https:// URL; the value set starts with neither (not shown here: a webhook's URL may hold its token)")]
    Url { name: String },
    /// The entry is not repeated: a webhook's whole URL pasted here may hold its token.
    #[error("{name} has an entry that is not a host or host:port (a scheme, a path, a user or a space; not shown here: a URL may hold a token); list hosts like `hooks.example.com,ci.example.com:8443`")]
    CallbackHost { name: String },
    #[error("{name} is {value}, over the most this edge supports ({max}); lower it")]
    /// `value` as set: it may be past what `u64` holds.
    TooLarge { name: String, value: String, max: u64 },
    /// Refused rather than raised without a word: the edge would not do what was set.
    #[error("{name} must be at least {min} {unit}, got {value}: {why}; set it between {min} and {max} (unset, it is {default})")]
    TooSmall { name: String, value: u64, min: u64, max: u64, default: u64, unit: &'static str, why: &'static str },
    /// Two settings that cannot both hold: named as set, with what to change.
    #[error("{body} ({body_value}) is more than {pending} ({pending_value}): a job that large would be taken only while no other job is pending; set {pending} to at least {body_value}, lower {body}, or unset {pending} (unset, it is at least {body})")]
    BodyPastPending { body: String, body_value: u64, pending: String, pending_value: u64 },
    /// Named as set, with both ways out.
    #[error("{lost} ({lost_value}) is less than twice {heartbeat} ({heartbeat_value}): the edge would give an agent's jobs up (their callers told to run them elsewhere) before the agent can notice a silent edge (two heartbeat intervals), and a job would wait up to an interval for a heartbeat's answer before it starts; set {lost} to at least {least} or {heartbeat} to at most {most} (unset, they are {} and {})", DEFAULT_LOST_AFTER_MS, DEFAULT_HEARTBEAT_INTERVAL_MS)]
    LostBeforeTwoBeats { lost: String, lost_value: u64, heartbeat: String, heartbeat_value: u64, least: u64, most: u64 },
    #[error("{name}: {error}")]
    PoolKeys { name: String, error: keys::KeyError },
    #[error("{0} is not set: every pool in POOLS needs its own callers' secret and agents; set it (e.g. with `wrangler secret put {0}`)")]
    PoolMissing(String),
    /// Without its length, as [`ConfigError::WeakSecret`].
    #[error("{name} is too short: use at least 16 characters, e.g. `openssl rand -hex 32`")]
    PoolWeakSecret { name: String },
    #[error("POOLS entry `{0}` is not a pool name: 1-64 letters, digits, `-` and `_` (the `default` pool is always served and is not listed)")]
    PoolName(String),
    #[error("POOLS names `{0}` and `{1}`, whose settings would have the same names; rename one")]
    PoolClash(String, String),
    #[error("POOLS lists `{0}` twice; list each pool once")]
    PoolTwice(String),
    #[error("{name}: {error}; write it like `ci=<secret>,nightly=<secret>` (names of letters, digits, `-`, `_`; secrets of at least 16 characters)")]
    CallerSecrets { name: String, error: String },
    /// Both pools' settings named, with the fix.
    #[error("{} (pool `{}`) is also {} (pool `{}`): whoever holds it would be both pools' operator; give each pool its own", settings[0], pools[0], settings[1], pools[1])]
    PoolSecretShared { pools: [String; 2], settings: [String; 2] },
    /// Without the secret or where the character is, as [`ConfigError::WeakSecret`].
    #[error("{name} has a character that is not visible ASCII (a space, a control character or a letter past ASCII, such as `é`): HTTP clients send such a header in different bytes and the edge would refuse them; use letters, digits and punctuation only, e.g. `openssl rand -hex 32`")]
    SecretNotAscii { name: String },
    #[error("ADMIN_SECRET is also a pool's RUNNER_SECRET or a caller's secret (RUNNER_SECRETS): give it a value of its own")]
    AdminSecretShared,
    #[error("there is no pool `{0}` on this edge: list it in POOLS and set RUNNER_SECRET_<POOL> and AGENT_PUBLIC_KEYS_<POOL>")]
    UnknownPool(String),
}

pub use shared::ids::{DEFAULT_POOL, MAX_POOL_NAME};

/// One pool: who may call it, and which agents may serve it.
#[derive(Clone)]
pub struct Pool {
    pub name: String,
    pub runner_secret: String,
    pub agents: Keyring,
    /// Named callers' secrets (`RUNNER_SECRETS[_<POOL>]`).
    pub caller_secrets: Vec<(String, String)>,
}

/// Every pool this edge serves, the default one first.
#[derive(Clone)]
pub struct Pools(Vec<Pool>);

/// The suffix of a pool's settings: its name in upper case, `-` as `_` (`team-b` →
/// `RUNNER_SECRET_TEAM_B`).
pub fn pool_suffix(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// A setting's name for `pool`: `base` for the default pool, `base_<POOL>` for another.
fn pool_setting(pool: &str, base: &str) -> String {
    match pool {
        DEFAULT_POOL => base.to_string(),
        _ => format!("{base}_{}", pool_suffix(pool)),
    }
}

/// Settings read as the edge reads them: an empty one is unset.
fn read(get: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name).as_deref().and_then(shared::setting::value).map(str::to_string)
}

/// The names `POOLS` lists, as written (not checked).
fn listed(get: &impl Fn(&str) -> Option<String>) -> Vec<String> {
    let listed = read(get, "POOLS").unwrap_or_default();
    listed.split([',', ' ', '\n']).map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect()
}

/// Whether a secret is only visible ASCII (`!` to `~`). A header's bytes past ASCII are
/// read as UTF-8 on both hosts, but a client may send `é` as UTF-8 or as Latin-1 (curl
/// sends what the shell gives it), and a space or a control may be trimmed or refused on
/// the way: such a secret would work from one client and not another.
fn secret_chars_ok(secret: &str) -> bool {
    secret.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `name` may be a listed pool's: a plain name, not `default`.
fn pool_name_ok(name: &str) -> bool {
    shared::ids::plain_id(name, MAX_POOL_NAME) && name != DEFAULT_POOL
}

impl Pool {
    /// One pool's own settings (`RUNNER_SECRET[_<POOL>]`, `AGENT_PUBLIC_KEYS[_<POOL>]`,
    /// `RUNNER_SECRETS[_<POOL>]`), checked alone: not against the other pools'
    /// ([`check_secrets`]).
    fn read(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Pool, ConfigError> {
        let secrets_name = pool_setting(name, "RUNNER_SECRETS");
        if name == DEFAULT_POOL {
            let runner_secret = read(get, "RUNNER_SECRET").ok_or(ConfigError::Missing("RUNNER_SECRET"))?;
            if runner_secret.len() < 16 {
                return Err(ConfigError::WeakSecret);
            }
            if !secret_chars_ok(&runner_secret) {
                return Err(ConfigError::SecretNotAscii { name: "RUNNER_SECRET".into() });
            }
            let agents = Keyring::parse(&read(get, "AGENT_PUBLIC_KEYS").ok_or(ConfigError::Missing("AGENT_PUBLIC_KEYS"))?)?;
            let caller_secrets = parse_caller_secrets(&secrets_name, read(get, &secrets_name), &runner_secret)?;
            return Ok(Pool { name: name.to_string(), runner_secret, agents, caller_secrets });
        }
        let (secret_name, keys_name) = (pool_setting(name, "RUNNER_SECRET"), pool_setting(name, "AGENT_PUBLIC_KEYS"));
        let runner_secret = read(get, &secret_name).ok_or_else(|| ConfigError::PoolMissing(secret_name.clone()))?;
        if runner_secret.len() < 16 {
            return Err(ConfigError::PoolWeakSecret { name: secret_name });
        }
        if !secret_chars_ok(&runner_secret) {
            return Err(ConfigError::SecretNotAscii { name: secret_name });
        }
        let keys = read(get, &keys_name).ok_or_else(|| ConfigError::PoolMissing(keys_name.clone()))?;
        let agents = Keyring::parse(&keys).map_err(|error| ConfigError::PoolKeys { name: keys_name, error })?;
        let caller_secrets = parse_caller_secrets(&secrets_name, read(get, &secrets_name), &runner_secret)?;
        Ok(Pool { name: name.to_string(), runner_secret, agents, caller_secrets })
    }
}

/// Refuses `pool`'s secrets where one is also another pool's: its RUNNER_SECRET another
/// pool's, a caller's secret of it another pool's RUNNER_SECRET, or another pool's
/// caller's secret its RUNNER_SECRET. Whoever holds such a secret would be a pool's
/// operator (any caller name, pauses, the login relay, every job) while the settings say
/// they are another pool's, or one caller. Among `pools`: those whose settings read.
fn check_secrets(pools: &[Pool], pool: &str) -> Result<(), ConfigError> {
    for of in pools {
        for (caller, secret) in &of.caller_secrets {
            // Its own pool's is refused as it is parsed.
            let Some(other) = pools.iter().find(|other| other.runner_secret == *secret && (of.name == pool || other.name == pool)) else {
                continue;
            };
            let error = format!(
                "the secret of `{caller}` is {}, pool `{}`'s own secret, which would make `{caller}` that pool's operator; give it its own",
                pool_setting(&other.name, "RUNNER_SECRET"),
                other.name
            );
            return Err(ConfigError::CallerSecrets { name: pool_setting(&of.name, "RUNNER_SECRETS"), error });
        }
    }
    let Some(this) = pools.iter().find(|p| p.name == pool) else { return Ok(()) };
    if let Some(other) = pools.iter().find(|p| p.name != pool && p.runner_secret == this.runner_secret) {
        let (mine, theirs) = (pool_setting(pool, "RUNNER_SECRET"), pool_setting(&other.name, "RUNNER_SECRET"));
        return Err(ConfigError::PoolSecretShared { pools: [pool.to_string(), other.name.clone()], settings: [mine, theirs] });
    }
    Ok(())
}

/// `ADMIN_SECRET`, the secret of `GET /pools`, read and checked without any one pool's
/// settings: that route lists every pool, the default one too, offline while its own
/// settings do not read — so its gate cannot hang on them. Compared with the secrets of
/// every pool whose settings read, as the default pool's settings compare it.
pub fn admin_secret(get: impl Fn(&str) -> Option<String>) -> Result<Option<String>, ConfigError> {
    let pools: Vec<Pool> = Pools::each(&get).into_iter().filter_map(|(_, read)| read.ok()).collect();
    read_admin_secret(&get, pools.iter())
}

/// `ADMIN_SECRET` checked alone (16+ characters, visible ASCII) and against the secrets
/// of `compared`: none may be a pool's or a caller's.
fn read_admin_secret<'a>(get: &impl Fn(&str) -> Option<String>, compared: impl Iterator<Item = &'a Pool>) -> Result<Option<String>, ConfigError> {
    let admin_secret = read(get, "ADMIN_SECRET");
    if admin_secret.as_ref().is_some_and(|s| s.len() < 16) {
        return Err(ConfigError::PoolWeakSecret { name: "ADMIN_SECRET".into() });
    }
    if admin_secret.as_ref().is_some_and(|s| !secret_chars_ok(s)) {
        return Err(ConfigError::SecretNotAscii { name: "ADMIN_SECRET".into() });
    }
    if let Some(admin) = &admin_secret {
        let mut shared = compared.flat_map(|p| std::iter::once(&p.runner_secret).chain(p.caller_secrets.iter().map(|(_, s)| s)));
        if shared.any(|s| s == admin) {
            return Err(ConfigError::AdminSecretShared);
        }
    }
    Ok(admin_secret)
}

impl Pools {
    /// Every pool's settings, all checked: `RUNNER_SECRET`, `AGENT_PUBLIC_KEYS`, `POOLS`
    /// and each listed pool's own ([`Pools::each`]), and against each other. For a host
    /// that reads them once at start and should not start on any bad one
    /// ([`Config::from_lookup`]).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Pools, ConfigError> {
        let pools = Pools::each(get).into_iter().map(|(_, read)| read).collect::<Result<Vec<Pool>, ConfigError>>()?;
        for pool in &pools {
            check_secrets(&pools, &pool.name)?;
        }
        Ok(Pools(pools))
    }

    /// The default pool (first) and every name `POOLS` lists, once each, with its own
    /// settings as they read — the one reading of `POOLS` both hosts make: the native edge
    /// refuses to start on any error ([`Pools::from_lookup`]); the Worker serves each pool
    /// apart, and one pool's error is that pool's alone. Refused, naming `POOLS`: an entry
    /// that is no pool name ([`ConfigError::PoolName`]; `default` listed: the default
    /// pool's), a pool listed twice, and two names whose settings would have the same
    /// names ([`ConfigError::PoolClash`], each of the two). Not checked against each other
    /// ([`Config::for_pool`] does, for the pool it reads).
    pub fn each(get: impl Fn(&str) -> Option<String>) -> Vec<(String, Result<Pool, ConfigError>)> {
        let names = listed(&get);
        let not_a_name = |name: &str| ConfigError::PoolName(shared::text::truncate(name, 80).to_string());
        let default = match names.iter().any(|n| n == DEFAULT_POOL) {
            true => Err(not_a_name(DEFAULT_POOL)),
            false => Pool::read(&get, DEFAULT_POOL),
        };
        let mut out = vec![(DEFAULT_POOL.to_string(), default)];
        for (i, name) in names.iter().enumerate() {
            if name == DEFAULT_POOL || names[..i].contains(name) {
                // Its entry is there already, saying so.
                continue;
            }
            let clash = names.iter().find(|other| *other != name && pool_suffix(other) == pool_suffix(name));
            let read = if !pool_name_ok(name) {
                Err(not_a_name(name))
            } else if names[i + 1..].contains(name) {
                Err(ConfigError::PoolTwice(name.clone()))
            } else if let Some(other) = clash {
                Err(ConfigError::PoolClash(other.clone(), name.clone()))
            } else {
                Pool::read(&get, name)
            };
            out.push((name.clone(), read));
        }
        out
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.0.iter().find(|p| p.name == name)
    }

    /// The pools, the default one first.
    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.0.iter()
    }
}

/// Parses `name=secret,…`: names are caller names, secrets at least 16 characters, each
/// name and each secret once, none the pool's own `runner_secret` (that secret is the
/// operator's, which a named caller is not).
fn parse_caller_secrets(setting: &str, text: Option<String>, runner_secret: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let refuse = |error: String| ConfigError::CallerSecrets { name: setting.to_string(), error };
    let mut out: Vec<(String, String)> = Vec::new();
    for (n, part) in text.unwrap_or_default().split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
        // An entry is named by its place, not by what comes before its `=`: written the
        // other way round (`<secret>=ci`) that is the secret, and on the Worker this error
        // answers every request.
        let entry = n + 1;
        let Some((name, secret)) = part.split_once('=') else {
            return Err(refuse(format!("entry {entry} is not `name=secret`")));
        };
        // Lowered as a job's `caller` field is: `CI=…` here and `"caller": "ci"` are one.
        let (name, secret) = (name.trim().to_ascii_lowercase(), secret.trim());
        let name = name.as_str();
        if !shared::placement::valid_caller(name) {
            return Err(refuse(format!("entry {entry} does not start with a caller name (it is `name=secret`, the name first)")));
        }
        if name == shared::placement::DEFAULT_CALLER {
            // The lane of jobs sent with the pool's secret and no `caller`: a secret of its
            // own would share its turns and queue cap with the pool secret's holders.
            return Err(refuse(format!("`{name}` is the caller of jobs sent with the pool's RUNNER_SECRET; name this caller otherwise")));
        }
        if secret.len() < 16 {
            return Err(refuse(format!("the secret of entry {entry} is shorter than 16 characters (it is `name=secret`, the name first)")));
        }
        if !secret_chars_ok(secret) {
            return Err(refuse(format!(
                "the secret of entry {entry} has a character that is not visible ASCII (a space, a control character or a letter past ASCII, such as `é`), \
                 which HTTP clients send in different bytes; use letters, digits and punctuation only"
            )));
        }
        if secret == runner_secret {
            return Err(refuse(format!(
                "the secret of `{name}` is the pool's RUNNER_SECRET, which would make `{name}` the operator; give it its own"
            )));
        }
        if out.iter().any(|(n, s)| n == name || s == secret) {
            return Err(refuse(format!("entry {entry} has a name or a secret given twice (a name is one whatever its case)")));
        }
        out.push((name.to_string(), secret.to_string()));
    }
    Ok(out)
}

const DAY_MS: u64 = 24 * 3_600_000;
const WEEK_MS: u64 = 7 * DAY_MS;

pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 15_000;
pub const DEFAULT_LOST_AFTER_MS: u64 = 120_000;
pub const DEFAULT_MAX_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_JOB_RETENTION_MS: u64 = 24 * 3_600_000;
pub const DEFAULT_QUEUE_TTL_MS: u64 = 15 * 60_000;
pub const DEFAULT_MAX_QUEUED_JOBS: usize = 100;
pub const DEFAULT_TIMEOUT_MARGIN_MS: u64 = shared::protocol::DEFAULT_TIMEOUT_MARGIN_MS;
pub const DEFAULT_OAUTH_WARN_HOURS: u64 = 24;
pub const DEFAULT_OFFLINE_ALERT_MS: u64 = 10 * 60_000;
pub const DEFAULT_NOTIFY_MIN_INTERVAL_MS: u64 = 3_600_000;
/// A Durable Object keeps every ended job's header in memory (about 1 KiB each) and its
/// whole record in storage; 10,000 headers fit its 128 MB of memory many times over.
pub const DEFAULT_MAX_RETAINED_JOBS: usize = 10_000;
/// Records of up to ~2 MiB each (a result, its diff, the task): 1 GiB is 500 of the
/// largest, and far under a Durable Object's storage.
pub const DEFAULT_MAX_RETAINED_BYTES: u64 = 1024 * 1024 * 1024;
/// Jobs not ended are kept whole in memory, and a restart loads them all before it serves:
/// 32 MiB of tasks, with the copies made while they are saved, keep a Durable Object
/// (128 MB) well inside its memory.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 32 * 1024 * 1024;

impl Config {
    /// Whether `caller` has its own secret (`RUNNER_SECRETS`): the pool's secret may not
    /// send as it (`http.rs::with_caller`), and its jobs' orders say it is proven while it
    /// keeps one (`machine/jobs.rs::send_job`).
    pub fn has_own_secret(&self, caller: &str) -> bool {
        self.own_secret(caller).is_some()
    }

    /// `caller`'s own secret (`RUNNER_SECRETS`), if it has one.
    pub fn own_secret(&self, caller: &str) -> Option<&str> {
        self.caller_secrets.iter().find(|(name, _)| name == caller).map(|(_, secret)| secret.as_str())
    }

    /// How many pools this edge serves: this one and [`Config::other_pools`] (one on the
    /// native edge). A Worker's isolate may hold the objects of all of them, and they
    /// share its memory: each has its own part of what the process holds
    /// ([`crate::http::pool_past_its_share`]).
    pub fn pools(&self) -> usize {
        1 + self.other_pools.len()
    }

    /// The default pool's settings (the native edge serves that pool alone).
    /// Every pool's settings are checked too ([`Pools::from_lookup`]): the native edge
    /// reads its settings once, at start, and does not start on any bad one, where an
    /// operator sees it at once.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Pools::from_lookup(&get)?;
        Config::for_pool(get, DEFAULT_POOL)
    }

    /// One pool's settings; [`ConfigError::UnknownPool`] if `POOLS` does not list it. Only
    /// this pool's own settings and the edge's shared ones are checked: another pool's
    /// that do not read cost that pool alone (the Worker reads them at each request, and
    /// pools are units of isolation), and it is left out of what this pool compares with
    /// other pools — the secrets none may share ([`check_secrets`]), the keys an agent's
    /// proof refused here is tried against ([`Config::other_pools`]).
    pub fn for_pool(get: impl Fn(&str) -> Option<String>, pool: &str) -> Result<Config, ConfigError> {
        // A pool `POOLS` does not list is refused on `POOLS` alone, before any pool's settings
        // are read: the Worker keeps only settings that read, so each request to a made-up
        // pool (anyone may send one, without a secret) read and parsed every pool's.
        if pool != DEFAULT_POOL && !listed(&get).iter().any(|name| name == pool) {
            return Err(ConfigError::UnknownPool(shared::text::truncate(pool, 80).to_string()));
        }
        let mut each = Pools::each(&get);
        let Some(at) = each.iter().position(|(name, _)| name == pool) else {
            // Not reached: every listed name has its entry, a bad one its error.
            return Err(ConfigError::UnknownPool(shared::text::truncate(pool, 80).to_string()));
        };
        let this = each.remove(at).1?;
        // This pool first, then the others whose own settings read.
        let all: Vec<Pool> = std::iter::once(this).chain(each.into_iter().filter_map(|(_, read)| read.ok())).collect();
        check_secrets(&all, pool)?;
        // The admin secret sees every pool: as one pool's or caller's secret it would open
        // them all to whoever holds that one. Checked by that pool; the default pool's
        // requests and `GET /pools` ([`admin_secret`]) check it against every pool's.
        let admin_secret = read_admin_secret(&get, all.iter().filter(|p| p.name == pool || pool == DEFAULT_POOL))?;
        let Pool { name, runner_secret, agents, caller_secrets } = all[0].clone();
        let get = |name: &str| get(name).as_deref().and_then(shared::setting::value).map(str::to_string);
        let required = |name: &'static str| get(name).ok_or(ConfigError::Missing(name));
        // A listed pool's own value (`MAX_QUEUED_JOBS_GPU`) before the edge's.
        let own = |name: &str| match name {
            _ if pool == DEFAULT_POOL => get(name),
            _ => get(&format!("{name}_{}", pool_suffix(pool))).or_else(|| get(name)),
        };
        // Which of the two `own` read, for an error to name the setting to fix.
        let own_name = |name: &str| match format!("{name}_{}", pool_suffix(pool)) {
            pooled if pool != DEFAULT_POOL && get(&pooled).is_some() => pooled,
            _ => name.to_string(),
        };
        // Bounds keep every deadline sum far from overflow. A number past what `u64` holds
        // is too large as well, not unreadable: it is a whole number.
        let bounded = |name: &'static str, unit: &'static str, default: u64, max: u64| -> Result<u64, ConfigError> {
            let too_large = |value: String| ConfigError::TooLarge { name: own_name(name), value, max };
            let value = match own(name) {
                None => default,
                Some(v) => match v.parse::<u64>() {
                    Ok(value) => value,
                    Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => return Err(too_large(v)),
                    Err(_) => return Err(ConfigError::Number { name: own_name(name), unit, value: v }),
                },
            };
            if value > max {
                return Err(too_large(value.to_string()));
            }
            Ok(value)
        };
        // A setting with a floor too: below it refused, saying the range, not raised
        // without a word (the edge would not do what was set).
        let between = |name: &'static str, unit: &'static str, default: u64, least: u64, most: u64, why: &'static str| -> Result<u64, ConfigError> {
            match bounded(name, unit, default, most)? {
                value if value < least => Err(ConfigError::TooSmall { name: own_name(name), value, min: least, max: most, default, unit, why }),
                value => Ok(value),
            }
        };
        let max_body_bytes = bounded("MAX_BODY_BYTES", "bytes", DEFAULT_MAX_BODY_BYTES as u64, 64 * 1024 * 1024)?;
        // Unset, it follows a larger MAX_BODY_BYTES (documented up to 64 MiB before this
        // bound came): an edge set so before keeps starting, and keeps taking its largest
        // bodies beside others.
        let max_pending_bytes = between(
            "MAX_PENDING_BYTES",
            "bytes",
            DEFAULT_MAX_PENDING_BYTES.max(max_body_bytes),
            1 << 20,
            1 << 40,
            "less would hold only a few jobs' tasks at once",
        )?;
        // Both set, and a body larger than the bound: such a job would be taken only while
        // nothing else is pending (`pending_full`), which was not what was meant.
        if max_body_bytes > max_pending_bytes {
            return Err(ConfigError::BodyPastPending {
                body: own_name("MAX_BODY_BYTES"),
                body_value: max_body_bytes,
                pending: own_name("MAX_PENDING_BYTES"),
                pending_value: max_pending_bytes,
            });
        }
        let heartbeat_interval_ms = between(
            "HEARTBEAT_INTERVAL_MS",
            "milliseconds",
            DEFAULT_HEARTBEAT_INTERVAL_MS,
            shared::contract::MIN_HEARTBEAT_INTERVAL_MS,
            // Longer, agents would heartbeat at their own most, not as set.
            shared::contract::MAX_HEARTBEAT_INTERVAL_MS,
            "shorter, heartbeats would keep the agent and the edge busy for nothing",
        )?;
        let lost_after_ms = bounded("LOST_AFTER_MS", "milliseconds", DEFAULT_LOST_AFTER_MS, WEEK_MS)?;
        // rev30-1: the agent learns it is cut off only when a beat's ack is two intervals
        // overdue; given up by the edge sooner, a job it held went on to start after the
        // caller had been told to run it elsewhere (the agent's start rule now holds such a
        // start, but jobs would wait for beats' answers, and blips the agent never saw
        // would lose jobs).
        if lost_after_ms < 2 * heartbeat_interval_ms {
            return Err(ConfigError::LostBeforeTwoBeats {
                lost: own_name("LOST_AFTER_MS"),
                lost_value: lost_after_ms,
                heartbeat: own_name("HEARTBEAT_INTERVAL_MS"),
                heartbeat_value: heartbeat_interval_ms,
                least: 2 * heartbeat_interval_ms,
                most: lost_after_ms / 2,
            });
        }
        let nothing_queued = "0 would refuse every job with 429";
        let max_queued_jobs = between("MAX_QUEUED_JOBS", "jobs", DEFAULT_MAX_QUEUED_JOBS as u64, 1, 100_000, nothing_queued)? as usize;
        Ok(Config {
            max_queued_per_caller: between("MAX_QUEUED_PER_CALLER", "jobs", max_queued_jobs as u64, 1, 100_000, nothing_queued)? as usize,
            admin_secret,
            caller_secrets,
            pool: name,
            signing_key: keys::signing_key("EDGE_SIGNING_KEY", &required("EDGE_SIGNING_KEY")?)?,
            agents,
            other_pools: all[1..].iter().map(|p| (p.name.clone(), p.agents.clone())).collect(),
            runner_secret,
            heartbeat_interval_ms,
            lost_after_ms,
            max_timeout_ms: between(
                "MAX_TIMEOUT_MS",
                "milliseconds",
                DEFAULT_MAX_TIMEOUT_MS,
                1_000,
                WEEK_MS,
                "shorter, no job would have the time to start Claude",
            )?,
            max_body_bytes: max_body_bytes as usize,
            job_retention_ms: between(
                "JOB_RETENTION_MS",
                "milliseconds",
                DEFAULT_JOB_RETENTION_MS,
                1_000,
                30 * DAY_MS,
                "shorter, a job would be forgotten as it ends, before its caller reads the result",
            )?,
            queue_ttl_ms: bounded("QUEUE_TTL_MS", "milliseconds", DEFAULT_QUEUE_TTL_MS, WEEK_MS)?,
            max_queued_jobs,
            timeout_margin_ms: bounded("TIMEOUT_MARGIN_MS", "milliseconds", DEFAULT_TIMEOUT_MARGIN_MS, DAY_MS)?,
            max_retained_jobs: between(
                "MAX_RETAINED_JOBS",
                "jobs",
                DEFAULT_MAX_RETAINED_JOBS as u64,
                1,
                1_000_000,
                "0 would forget a job as it ends, before its caller reads the result",
            )? as usize,
            max_retained_bytes: between(
                "MAX_RETAINED_BYTES",
                "bytes",
                DEFAULT_MAX_RETAINED_BYTES,
                1 << 20,
                1 << 40,
                "less would keep little more than the result of the job that ended last",
            )?,
            max_pending_bytes,
            edge_version: env!("CARGO_PKG_VERSION").to_string(),
            notify_url: match own("NOTIFY_URL") {
                Some(url) if url.starts_with("https://") || url.starts_with("http://") => Some(url),
                Some(_) => return Err(ConfigError::Url { name: own_name("NOTIFY_URL") }),
                None => None,
            },
            oauth_warn_hours: bounded("OAUTH_WARN_HOURS", "hours", DEFAULT_OAUTH_WARN_HOURS, 24 * 365)? as f64,
            offline_alert_ms: bounded("OFFLINE_ALERT_MS", "milliseconds", DEFAULT_OFFLINE_ALERT_MS, WEEK_MS)?,
            notify_min_interval_ms: bounded("NOTIFY_MIN_INTERVAL_MS", "milliseconds", DEFAULT_NOTIFY_MIN_INTERVAL_MS, WEEK_MS)?,
            // `none`: no callbacks — how a pool closes them while the edge's list is open
            // (an empty setting is an unset one, here as everywhere).
            callback_hosts: match own("CALLBACK_HOSTS").filter(|v| !v.eq_ignore_ascii_case("none")) {
                None => Vec::new(),
                Some(v) => {
                    let entries = v.split(',').map(str::trim).filter(|h| !h.is_empty());
                    let hosts: Option<Vec<String>> = entries.map(crate::notify::callback_host_entry).collect();
                    hosts.ok_or_else(|| ConfigError::CallbackHost { name: own_name("CALLBACK_HOSTS") })?
                }
            },
            sse_keepalive_ms: between(
                "SSE_KEEPALIVE_MS",
                "milliseconds",
                crate::progress::SSE_KEEPALIVE_MS,
                MIN_SSE_KEEPALIVE_MS,
                crate::progress::SSE_KEEPALIVE_MS,
                "shorter, a quiet job's stream would be mostly keep-alives",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(extra: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            let base = [
                ("RUNNER_SECRET", "0123456789abcdef0123"),
                ("EDGE_SIGNING_KEY", "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="),
                ("AGENT_PUBLIC_KEYS", "spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
            ];
            extra.iter().chain(base.iter()).find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn reads_defaults_and_refuses_bad_values_with_the_name() {
        let cfg = Config::from_lookup(lookup(&[])).unwrap();
        assert_eq!(cfg.heartbeat_interval_ms, DEFAULT_HEARTBEAT_INTERVAL_MS);
        assert_eq!(cfg.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let err = Config::from_lookup(lookup(&[("MAX_TIMEOUT_MS", "18446744073709551615")])).unwrap_err();
        assert!(err.to_string().contains("MAX_TIMEOUT_MS"), "{err}");
        assert_eq!(cfg.sse_keepalive_ms, crate::progress::SSE_KEEPALIVE_MS);
        assert_eq!(Config::from_lookup(lookup(&[("SSE_KEEPALIVE_MS", "300")])).unwrap().sse_keepalive_ms, 300);
        // Longer would have followers take a quiet job for a dead connection.
        let err = Config::from_lookup(lookup(&[("SSE_KEEPALIVE_MS", "15001")])).unwrap_err();
        assert!(err.to_string().contains("SSE_KEEPALIVE_MS") && err.to_string().contains("lower it"), "{err}");
        // Shorter was raised to 100 without a word: refused, saying what to set.
        assert_eq!(Config::from_lookup(lookup(&[("SSE_KEEPALIVE_MS", "100")])).unwrap().sse_keepalive_ms, 100);
        let shorts: [(&str, &'static [(&str, &str)]); 2] = [("0", &[("SSE_KEEPALIVE_MS", "0")]), ("99", &[("SSE_KEEPALIVE_MS", "99")])];
        for (short, settings) in shorts {
            let err = Config::from_lookup(lookup(settings)).unwrap_err().to_string();
            assert!(err.starts_with("SSE_KEEPALIVE_MS must be at least 100 milliseconds") && err.contains(&format!("got {short}")), "{err}");
            assert!(err.contains("set it between 100 and 15000") && err.contains("unset"), "{err}");
        }
        let err = Config::from_lookup(lookup(&[("LOST_AFTER_MS", "soon")])).unwrap_err();
        assert!(err.to_string().contains("LOST_AFTER_MS"), "{err}");
        let err = Config::from_lookup(lookup(&[("RUNNER_SECRET", "short")])).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        let err = Config::from_lookup(|_| None).unwrap_err();
        assert!(err.to_string().contains("keygen"), "{err}");
    }

    /// Each of these was raised to its floor without a word (a heartbeat of 10 ms ran at
    /// 100, a cap of 0 at 1): now refused, naming the setting, its range and its default,
    /// and taken as set at the floor itself. A zero queue cap refused every job with 429.
    #[test]
    fn a_setting_below_its_floor_is_refused_not_raised() {
        let floors: [(&str, &str, u64); 8] = [
            ("JOB_RETENTION_MS", "milliseconds", 1_000),
            ("HEARTBEAT_INTERVAL_MS", "milliseconds", 100),
            ("MAX_TIMEOUT_MS", "milliseconds", 1_000),
            ("MAX_RETAINED_BYTES", "bytes", 1 << 20),
            ("MAX_PENDING_BYTES", "bytes", 1 << 20),
            ("MAX_QUEUED_JOBS", "jobs", 1),
            ("MAX_QUEUED_PER_CALLER", "jobs", 1),
            ("MAX_RETAINED_JOBS", "jobs", 1),
        ];
        for (name, unit, least) in floors {
            let below = (least - 1).to_string();
            let set = [(name, below.as_str())];
            let err = Config::from_lookup(|k| lookup(&[])(k).or_else(|| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{name} must be at least {least} {unit}, got {below}")), "{err}");
            assert!(err.contains(&format!("set it between {least} and")) && err.contains("unset, it is"), "{err}");
            let at = least.to_string();
            let set = [(name, at.as_str())];
            Config::from_lookup(|k| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()).or_else(|| lookup(&[])(k)))
                .unwrap_or_else(|e| panic!("{name}={least}: {e}"));
        }
        let cfg = Config::from_lookup(lookup(&[("HEARTBEAT_INTERVAL_MS", "100"), ("MAX_QUEUED_PER_CALLER", "1")])).unwrap();
        assert_eq!((cfg.heartbeat_interval_ms, cfg.max_queued_per_caller), (100, 1));
        // A pool's own value is named as set.
        let pooled = |k: &str| match k {
            "POOLS" => Some("gpu".to_string()),
            "RUNNER_SECRET_GPU" => Some("fedcba9876543210fedc".to_string()),
            "AGENT_PUBLIC_KEYS_GPU" => lookup(&[])("AGENT_PUBLIC_KEYS"),
            "MAX_QUEUED_JOBS_GPU" => Some("0".to_string()),
            k => lookup(&[])(k),
        };
        let err = Config::for_pool(pooled, "gpu").unwrap_err().to_string();
        assert!(err.starts_with("MAX_QUEUED_JOBS_GPU must be at least 1 jobs, got 0"), "{err}");
    }

    /// The jobs not ended are held to `MAX_PENDING_BYTES`; a body larger than that would be
    /// taken only while nothing else is pending, so such a pair of settings is refused at
    /// the start, naming both as set and what to set — a pool's own included. Unset, the
    /// bound follows a larger MAX_BODY_BYTES: one set up to 64 MiB, as documented before
    /// the bound came, stopped the edge at its next start.
    #[test]
    fn the_largest_body_must_fit_the_bytes_of_jobs_not_ended() {
        let cfg = Config::from_lookup(lookup(&[])).unwrap();
        assert_eq!(cfg.max_pending_bytes, DEFAULT_MAX_PENDING_BYTES);
        assert!(cfg.max_pending_bytes >= cfg.max_body_bytes as u64);
        let upgraded = Config::from_lookup(lookup(&[("MAX_BODY_BYTES", "67108864")])).unwrap();
        assert_eq!(upgraded.max_pending_bytes, 64 << 20, "unset, the bound follows the body limit");
        let smaller = Config::from_lookup(lookup(&[("MAX_BODY_BYTES", "2097152")])).unwrap();
        assert_eq!(smaller.max_pending_bytes, DEFAULT_MAX_PENDING_BYTES);
        let err = Config::from_lookup(lookup(&[("MAX_BODY_BYTES", "67108864"), ("MAX_PENDING_BYTES", "33554432")])).unwrap_err().to_string();
        assert!(
            err.starts_with("MAX_BODY_BYTES (67108864) is more than MAX_PENDING_BYTES (33554432)")
                && err.contains("taken only while no other job is pending")
                && err.contains("set MAX_PENDING_BYTES to at least 67108864, lower MAX_BODY_BYTES, or unset MAX_PENDING_BYTES"),
            "{err}"
        );
        let both = Config::from_lookup(lookup(&[("MAX_BODY_BYTES", "67108864"), ("MAX_PENDING_BYTES", "67108864")])).unwrap();
        assert_eq!((both.max_body_bytes, both.max_pending_bytes), (64 << 20, 64 << 20));
        let pools = two_pools(&[("MAX_PENDING_BYTES_GPU", "2097152"), ("MAX_BODY_BYTES_TEAM_B", "40000000")]);
        assert_eq!(Config::for_pool(&pools, "gpu").unwrap().max_pending_bytes, 2 << 20);
        assert_eq!(Config::for_pool(&pools, "default").unwrap().max_pending_bytes, DEFAULT_MAX_PENDING_BYTES);
        assert_eq!(Config::for_pool(&pools, "team-b").unwrap().max_pending_bytes, 40_000_000);
        let pools = two_pools(&[("MAX_PENDING_BYTES", "33554432"), ("MAX_BODY_BYTES_TEAM_B", "40000000")]);
        let err = Config::for_pool(&pools, "team-b").unwrap_err().to_string();
        assert!(err.starts_with("MAX_BODY_BYTES_TEAM_B (40000000) is more than MAX_PENDING_BYTES (33554432)"), "{err}");
    }

    /// An agent heartbeats at most every 10 minutes, whatever its welcome says (it takes an
    /// edge silent for two intervals for gone): an interval longer than that was taken here
    /// (up to a day) and the agents heartbeat at 10 minutes without a word — six times the
    /// Durable Object wake-ups set for an hour. Refused above what agents keep.
    #[test]
    fn a_heartbeat_longer_than_agents_keep_is_refused() {
        let most = shared::contract::MAX_HEARTBEAT_INTERVAL_MS;
        assert_eq!(most, 600_000);
        let cfg = Config::from_lookup(lookup(&[("HEARTBEAT_INTERVAL_MS", "600000"), ("LOST_AFTER_MS", "1200000")])).unwrap();
        assert_eq!(cfg.heartbeat_interval_ms, most);
        for longer in ["600001", "3600000", "86400000"] {
            let set = [("HEARTBEAT_INTERVAL_MS", longer)];
            let err = Config::from_lookup(|k| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()).or_else(|| lookup(&[])(k)))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("HEARTBEAT_INTERVAL_MS is {longer}, over the most this edge supports (600000)")), "{err}");
        }
    }

    /// rev30-1: an agent takes itself for cut off only once a beat's ack is two heartbeat
    /// intervals overdue. An edge that gave its jobs up sooner (HEARTBEAT_INTERVAL_MS 4 s,
    /// LOST_AFTER_MS 1 s) told a caller to run a job elsewhere while the agent, still
    /// "connected", started it. Refused at the edge's start (the native edge) or at each
    /// request (the Worker), naming both settings as set and what to set.
    #[test]
    fn lost_after_ms_under_two_heartbeat_intervals_is_refused_saying_what_to_set() {
        let err = Config::from_lookup(lookup(&[("HEARTBEAT_INTERVAL_MS", "4000"), ("LOST_AFTER_MS", "1000")])).unwrap_err().to_string();
        assert!(err.starts_with("LOST_AFTER_MS (1000) is less than twice HEARTBEAT_INTERVAL_MS (4000)"), "{err}");
        assert!(err.contains("set LOST_AFTER_MS to at least 8000 or HEARTBEAT_INTERVAL_MS to at most 500"), "{err}");
        assert!(Config::from_lookup(lookup(&[("HEARTBEAT_INTERVAL_MS", "4000"), ("LOST_AFTER_MS", "7999")])).is_err());
        let cfg = Config::from_lookup(lookup(&[("HEARTBEAT_INTERVAL_MS", "4000"), ("LOST_AFTER_MS", "8000")])).unwrap();
        assert_eq!((cfg.heartbeat_interval_ms, cfg.lost_after_ms), (4000, 8000));
        // The defaults hold it; a long interval alone does not.
        let cfg = Config::from_lookup(lookup(&[])).unwrap();
        assert!(cfg.lost_after_ms >= 2 * cfg.heartbeat_interval_ms);
        let err = Config::from_lookup(lookup(&[("HEARTBEAT_INTERVAL_MS", "60001")])).unwrap_err().to_string();
        assert!(err.contains("set LOST_AFTER_MS to at least 120002 or HEARTBEAT_INTERVAL_MS to at most 60000"), "{err}");
        // A pool's own settings are named as set.
        let gpu = |name: &str| match name {
            "POOLS" => Some("gpu".to_string()),
            "RUNNER_SECRET_GPU" => Some("gpu-secret-0123456789".to_string()),
            "AGENT_PUBLIC_KEYS_GPU" => Some("spark=lIeDBBIBzPaGl6mDciZ/XY8hQojwsT8YaVsczgB1MHo=".to_string()),
            "LOST_AFTER_MS_GPU" => Some("1000".to_string()),
            _ => lookup(&[])(name),
        };
        let err = Config::for_pool(gpu, "gpu").unwrap_err().to_string();
        assert!(err.starts_with("LOST_AFTER_MS_GPU (1000) is less than twice HEARTBEAT_INTERVAL_MS (15000)"), "{err}");
    }

    #[test]
    fn each_pool_has_its_own_secret_and_agents_and_unlisted_pools_do_not_exist() {
        const OTHER_KEY: &str = "spark=lIeDBBIBzPaGl6mDciZ/XY8hQojwsT8YaVsczgB1MHo=";
        let pools = &[
            ("POOLS", "gpu, team-b"),
            ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_GPU", OTHER_KEY),
            ("RUNNER_SECRET_TEAM_B", "team-b-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_TEAM_B", "laptop=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
        ];
        let default = Config::from_lookup(lookup(pools)).unwrap();
        assert_eq!((default.pool.as_str(), default.runner_secret.as_str()), ("default", "0123456789abcdef0123"));
        let gpu = Config::for_pool(lookup(pools), "gpu").unwrap();
        assert_eq!(gpu.runner_secret, "gpu-secret-0123456789");
        assert_ne!(gpu.agents.get("spark").unwrap(), default.agents.get("spark").unwrap());
        let team = Config::for_pool(lookup(pools), "team-b").unwrap();
        assert!(team.agents.get("spark").is_none() && team.agents.get("laptop").is_some());
        for unknown in ["other", "GPU", "team_b", ""] {
            assert!(matches!(Config::for_pool(lookup(pools), unknown), Err(ConfigError::UnknownPool(_))), "{unknown}");
        }
        // A listed pool without its settings, a bad or clashing name: the edge says which.
        let err = Config::from_lookup(lookup(&[("POOLS", "gpu")])).unwrap_err();
        assert!(err.to_string().contains("RUNNER_SECRET_GPU"), "{err}");
        let err = Config::from_lookup(lookup(&[("POOLS", "gpu"), ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"), ("AGENT_PUBLIC_KEYS_GPU", "nope")])).unwrap_err();
        assert!(err.to_string().contains("AGENT_PUBLIC_KEYS_GPU"), "{err}");
        for bad in [&[("POOLS", "default")], &[("POOLS", "a.b")], &[("POOLS", "../x")]] {
            assert!(matches!(Config::from_lookup(lookup(bad)), Err(ConfigError::PoolName(_))), "{bad:?}");
        }
        assert!(matches!(Config::from_lookup(lookup(&[("POOLS", "a-b,a_b")])), Err(ConfigError::PoolClash(..))));
    }

    /// Two listed pools (`gpu`, `team-b`) beside the default one, and these settings.
    fn two_pools(settings: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        let pools = lookup(&[
            ("POOLS", "gpu,team-b"),
            ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_GPU", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
            ("RUNNER_SECRET_TEAM_B", "team-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_TEAM_B", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
        ]);
        move |name| settings.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()).or_else(|| pools(name))
    }

    #[test]
    fn a_pool_may_send_its_alerts_elsewhere() {
        let url = |notify, pool| Config::for_pool(two_pools(notify), pool).unwrap().notify_url;
        let both = &[("NOTIFY_URL", "https://ntfy.example/runner"), ("NOTIFY_URL_GPU", "https://ntfy.example/gpu")];
        assert_eq!(url(both, "gpu").as_deref(), Some("https://ntfy.example/gpu"));
        assert_eq!(url(both, "team-b").as_deref(), Some("https://ntfy.example/runner"), "a pool without its own uses the edge's");
        assert_eq!(url(both, "default").as_deref(), Some("https://ntfy.example/runner"), "another pool's is not the default pool's");
        // A pool's own may stand alone.
        let only_gpu = &[("NOTIFY_URL_GPU", "https://ntfy.example/gpu")];
        assert_eq!(url(only_gpu, "gpu").as_deref(), Some("https://ntfy.example/gpu"));
        assert_eq!((url(only_gpu, "default"), url(only_gpu, "team-b")), (None, None));
        // A bad one is named as it was set, and is that pool's problem alone.
        let bad = &[("NOTIFY_URL", "https://ntfy.example/runner"), ("NOTIFY_URL_GPU", "ntfy.example/gpu")];
        let err = Config::for_pool(two_pools(bad), "gpu").unwrap_err();
        assert!(err.to_string().contains("NOTIFY_URL_GPU must be an http"), "{err}");
        assert_eq!(url(bad, "default").as_deref(), Some("https://ntfy.example/runner"));
        let err = Config::for_pool(two_pools(&[("NOTIFY_URL", "ntfy.example")]), "gpu").unwrap_err();
        assert!(err.to_string().contains("NOTIFY_URL must be an http"), "{err}");
        // The bad value is not repeated: a webhook's URL holds its token, and on the Worker
        // this error is every caller's answer, with the secret or without.
        let err = Config::for_pool(two_pools(&[("NOTIFY_URL_GPU", "hooks.example/services/T0/B0/xoxb-webhook-token-123")]), "gpu").unwrap_err().to_string();
        assert!(err.contains("NOTIFY_URL_GPU must be an http") && !err.contains("xoxb-webhook-token-123"), "{err}");
    }

    /// A pool's own `CALLBACK_HOSTS_<POOL>` replaces the edge's list for that pool alone.
    #[test]
    fn a_pool_may_have_its_own_callback_hosts() {
        let pools = two_pools(&[("CALLBACK_HOSTS", "hooks.example, ci.example:8443"), ("CALLBACK_HOSTS_GPU", "GPU-Hooks.example")]);
        let hosts = |pool| Config::for_pool(&pools, pool).unwrap().callback_hosts;
        assert_eq!(hosts("gpu"), ["gpu-hooks.example"], "its own, in place of the edge's");
        assert_eq!(hosts("team-b"), ["hooks.example", "ci.example:8443"], "a pool without its own uses the edge's");
        assert_eq!(hosts("default"), ["hooks.example", "ci.example:8443"], "another pool's list is not the default's");
        // A pool closes its callbacks with `none` (empty is unset: the edge's list).
        let closed = two_pools(&[("CALLBACK_HOSTS", "hooks.example"), ("CALLBACK_HOSTS_GPU", "None")]);
        assert!(Config::for_pool(&closed, "gpu").unwrap().callback_hosts.is_empty());
        assert_eq!(Config::for_pool(&closed, "team-b").unwrap().callback_hosts, ["hooks.example"]);
    }

    /// A pool's own number setting that is wrong is named as it was set, like its
    /// `NOTIFY_URL_<POOL>`: the edge's own may be right, and fixing it would change nothing.
    /// A number past what `u64` holds is a whole number all the same: it was refused as
    /// "must be a whole number", which it is, leaving a person to look for a typo. It is too
    /// large, as one that fits `u64` and passes the most is.
    #[test]
    fn a_number_past_any_bound_is_too_large_not_unreadable() {
        for huge in ["99999999999999999999", "18446744073709551616", "+99999999999999999999"] {
            let set = [("MAX_TIMEOUT_MS", huge)];
            let err = Config::from_lookup(|k| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()).or_else(|| lookup(&[])(k)))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("MAX_TIMEOUT_MS is {huge}, over the most this edge supports (604800000)")), "{err}");
        }
        for unreadable in ["-5", "0x10", "1e6", "1 000", "１０"] {
            let set = [("MAX_TIMEOUT_MS", unreadable)];
            let err = Config::from_lookup(|k| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()).or_else(|| lookup(&[])(k)))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("MAX_TIMEOUT_MS must be a whole number of milliseconds"), "{unreadable}: {err}");
        }
    }

    #[test]
    fn a_pools_wrong_number_is_named_as_set() {
        let pools = lookup(&[
            ("POOLS", "gpu"),
            ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_GPU", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
        ]);
        let with = |name: &'static str, value: &'static str| {
            let pools = &pools;
            move |n: &str| if n == name { Some(value.to_string()) } else { pools(n) }
        };
        let err = Config::for_pool(with("MAX_QUEUED_JOBS_GPU", "lots"), "gpu").unwrap_err().to_string();
        assert!(err.starts_with("MAX_QUEUED_JOBS_GPU must be a whole number"), "{err}");
        let err = Config::for_pool(with("LOST_AFTER_MS_GPU", "999999999999999"), "gpu").unwrap_err().to_string();
        assert!(err.starts_with("LOST_AFTER_MS_GPU is 999999999999999, over the most"), "{err}");
        let err = Config::for_pool(with("LOST_AFTER_MS", "x"), "gpu").unwrap_err().to_string();
        assert!(err.starts_with("LOST_AFTER_MS must be a whole number"), "{err}");
    }

    /// On the Worker a setting's error answers every request, the secrets' holders or not.
    /// An entry of RUNNER_SECRETS written the other way round (`<secret>=ci`) was refused
    /// naming its "caller" — the secret, whole when it is hex (`the secret of `9f…` is
    /// shorter than 16 characters`), its first 40 characters when it is base64 (`` `ab+/…`
    /// is not a caller name``). An entry is named by its place instead.
    #[test]
    fn a_callers_secret_written_first_is_not_shown() {
        const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        const BASE64: &str = "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg";
        for (setting, hidden) in [(format!("ops=ops-secret-0123456789,{HEX}=ci"), HEX), (format!("{BASE64}=ci"), BASE64)] {
            let set = [("RUNNER_SECRETS", setting.as_str())];
            let err = Config::from_lookup(|k| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()).or_else(|| lookup(&[])(k)))
                .unwrap_err()
                .to_string();
            assert!(!err.to_ascii_lowercase().contains(&hidden[..12].to_ascii_lowercase()), "{err}");
            let place = if hidden == HEX { "entry 2" } else { "entry 1" };
            assert!(err.starts_with("RUNNER_SECRETS: ") && err.contains(place) && err.contains("name=secret"), "{err}");
        }
    }

    /// On the Worker a setting's error answers every request, the secrets' holders or not:
    /// a refused secret must be told without any part or measure of it. A short secret was
    /// refused with its length (`too short (11 characters)`), a signing key that is not
    /// base64 with the code and place of its first stray character (`Invalid symbol 33,
    /// offset 7`), one of the wrong size with its decoded length.
    #[test]
    fn a_refused_secret_is_told_without_its_length_or_a_symbol() {
        let gpu = |secret: &'static str| {
            let base = lookup(&[("POOLS", "gpu"), ("AGENT_PUBLIC_KEYS_GPU", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=")]);
            move |name: &str| if name == "RUNNER_SECRET_GPU" { Some(secret.to_string()) } else { base(name) }
        };
        let short = [
            ("RUNNER_SECRET", Config::from_lookup(lookup(&[("RUNNER_SECRET", "abcdefghijk")]))),
            ("RUNNER_SECRET_GPU", Config::for_pool(gpu("abcdefghijk"), "gpu")),
            ("ADMIN_SECRET", Config::from_lookup(lookup(&[("ADMIN_SECRET", "abcdefghijk")]))),
        ];
        for (name, result) in short {
            let err = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with(&format!("{name} is too short")) && err.contains("at least 16"), "{name}: {err}");
            assert!(!err.contains("11") && !err.contains("eleven"), "{name}: the secret's length shown: {err}");
        }
        // `!` (33) at offset 7; then a valid base64 text of 31 bytes.
        for (key, hidden) in [("CQkJCQk!CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=", &["!", "33", "7"][..]), ("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ==", &["31"][..])] {
            let set = [("EDGE_SIGNING_KEY", key)];
            let err = Config::from_lookup(|k| set.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()).or_else(|| lookup(&[])(k)))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("EDGE_SIGNING_KEY ") && err.contains("claude-runner keygen"), "{err}");
            for h in hidden {
                assert!(!err.contains(h), "{key}: `{h}` shown: {err}");
            }
        }
    }

    /// A secret past visible ASCII is read differently by the two hosts' clients (curl sends
    /// `ä` in UTF-8, or in Latin-1 from a Latin-1 shell; a trailing U+00A0 was trimmed on
    /// the native edge alone): refused at load, each setting named, the secret not shown.
    #[test]
    fn secrets_past_visible_ascii_are_refused() {
        let gpu = |name: &'static str, value: &'static str| {
            let base = lookup(&[
                ("POOLS", "gpu"),
                ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"),
                ("AGENT_PUBLIC_KEYS_GPU", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
            ]);
            move |n: &str| if n == name { Some(value.to_string()) } else { base(n) }
        };
        for secret in ["pässwört-0123456789", "secret-0123456789\u{a0}x", "secret 0123456789", "secret\t0123456789"] {
            let leaked = |err: &str| err.contains(secret) || err.contains("0123456789");
            for name in ["RUNNER_SECRET", "ADMIN_SECRET"] {
                let set: &'static [(&'static str, &'static str)] = Box::leak(Box::new([(name, secret)]));
                let err = Config::from_lookup(lookup(set)).err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.starts_with(&format!("{name} has a character that is not visible ASCII")), "{name} {secret:?}: {err}");
                assert!(!leaked(&err), "{err}");
            }
            let err = Config::for_pool(gpu("RUNNER_SECRET_GPU", secret), "gpu").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with("RUNNER_SECRET_GPU has a character that is not visible ASCII") && !leaked(&err), "{secret:?}: {err}");
            let callers: &'static str = Box::leak(format!("ci={secret}").into_boxed_str());
            for (name, read) in [
                ("RUNNER_SECRETS", Config::from_lookup(lookup(Box::leak(Box::new([("RUNNER_SECRETS", callers)]))))),
                ("RUNNER_SECRETS_GPU", Config::for_pool(gpu("RUNNER_SECRETS_GPU", callers), "gpu")),
            ] {
                let err = read.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.starts_with(&format!("{name}: the secret of entry 1 has a character that is not visible ASCII")) && !leaked(&err), "{secret:?}: {err}");
            }
        }
        assert!(Config::from_lookup(lookup(&[("RUNNER_SECRET", "!#$%&'()*+-./0123456789:;<=>?@[]^_`{|}~")])).is_ok());
    }

    #[test]
    fn caller_names_are_one_whatever_their_case() {
        let cfg = Config::from_lookup(lookup(&[("RUNNER_SECRETS", "CI=ci-secret-0123456789")])).unwrap();
        assert_eq!(cfg.caller_secrets, [("ci".to_string(), "ci-secret-0123456789".to_string())]);
        let twice = Config::from_lookup(lookup(&[("RUNNER_SECRETS", "ci=ci-secret-0123456789,Ci=other-secret-0123456789")])).unwrap_err();
        assert!(twice.to_string().contains("given twice"), "{twice}");
        let default = Config::from_lookup(lookup(&[("RUNNER_SECRETS", "Default=ci-secret-0123456789")])).unwrap_err();
        assert!(default.to_string().contains("pool's RUNNER_SECRET"), "{default}");
    }

    #[test]
    fn a_callers_secret_may_not_be_the_pools_own() {
        // It would make that caller the operator (any caller name, pause, the login relay)
        // while the setting says it is one caller.
        let err = Config::from_lookup(lookup(&[("RUNNER_SECRETS", "ci=0123456789abcdef0123")])).unwrap_err();
        assert!(err.to_string().contains("RUNNER_SECRETS") && err.to_string().contains("RUNNER_SECRET"), "{err}");
        let pools = &[
            ("POOLS", "gpu"),
            ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"),
            ("AGENT_PUBLIC_KEYS_GPU", "spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
            ("RUNNER_SECRETS_GPU", "ci=gpu-secret-0123456789"),
        ];
        let err = Config::for_pool(lookup(pools), "gpu").unwrap_err();
        assert!(err.to_string().contains("RUNNER_SECRETS_GPU"), "{err}");
        assert!(Config::from_lookup(lookup(&[("RUNNER_SECRETS", "ci=ci-secret-0123456789")])).is_ok());
        // `default` is the lane of the pool secret's unnamed jobs: a secret of its own
        // would share that lane's turns and cap with whoever holds the pool's secret.
        let err = Config::from_lookup(lookup(&[("RUNNER_SECRETS", "default=ci-secret-0123456789")])).unwrap_err();
        assert!(err.to_string().contains("`default`"), "{err}");
    }

    /// A caller's own secret is a caller's on every pool: as another pool's RUNNER_SECRET
    /// it would make whoever holds it that pool's operator (any caller name, pauses, the
    /// login relay, every job), which the setting never says. Within one pool this was
    /// refused; across pools it was not.
    #[test]
    fn a_callers_secret_is_no_other_pools_own() {
        let pools = |extra: &'static [(&'static str, &'static str)]| {
            let base = lookup(&[
                ("POOLS", "gpu"),
                ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"),
                ("AGENT_PUBLIC_KEYS_GPU", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
            ]);
            move |name: &str| extra.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()).or_else(|| base(name))
        };
        for (extra, named) in [
            (&[("RUNNER_SECRETS_GPU", "ci=0123456789abcdef0123")][..], "RUNNER_SECRETS_GPU"),
            (&[("RUNNER_SECRETS", "ci=gpu-secret-0123456789")][..], "RUNNER_SECRETS"),
        ] {
            for pool in ["default", "gpu"] {
                let err = Config::for_pool(pools(extra), pool).err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.contains(named) && err.contains("`ci`"), "{pool}, {extra:?}: {err}");
            }
        }
        // The same caller's secret on two pools is still one caller's.
        let both = &[("RUNNER_SECRETS", "ci=ci-secret-0123456789"), ("RUNNER_SECRETS_GPU", "ci=ci-secret-0123456789")];
        assert!(Config::for_pool(pools(both), "gpu").is_ok());
    }

    #[test]
    fn the_admin_secret_is_no_pools_or_callers() {
        // It would open every pool's summary to whoever holds that one pool's secret.
        for extra in [
            &[("ADMIN_SECRET", "0123456789abcdef0123")][..],
            &[("ADMIN_SECRET", "ci-secret-0123456789"), ("RUNNER_SECRETS", "ci=ci-secret-0123456789")][..],
        ] {
            let err = Config::from_lookup(lookup(extra)).unwrap_err();
            assert!(err.to_string().contains("ADMIN_SECRET"), "{err}");
        }
        assert!(Config::from_lookup(lookup(&[("ADMIN_SECRET", "admin-secret-0123456789")])).is_ok());
    }

    /// `GET /pools` is gated on ADMIN_SECRET read without the default pool's settings
    /// (`admin_secret`): a bad one of those (a short RUNNER_SECRET) still lets the admin
    /// see the list, while the admin secret is still checked alone and against every
    /// pool's secrets that read.
    #[test]
    fn the_admin_secret_reads_without_any_pools_settings() {
        let gpu = [("POOLS", "gpu"), ("RUNNER_SECRET_GPU", "gpu-secret-0123456789"), ("AGENT_PUBLIC_KEYS_GPU", "rig=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let all: Vec<(&'static str, &'static str)> = extra.iter().chain(gpu.iter()).copied().collect();
            lookup(Box::leak(all.into_boxed_slice()))
        };
        let admin = ("ADMIN_SECRET", "admin-secret-0123456789");
        let broken_default = with(&[admin, ("RUNNER_SECRET", "fifteen-chars-x")]);
        assert!(Config::for_pool(&broken_default, DEFAULT_POOL).is_err());
        assert_eq!(admin_secret(&broken_default).unwrap().as_deref(), Some(admin.1));
        assert_eq!(admin_secret(with(&[])).unwrap(), None);
        let weak = admin_secret(with(&[("ADMIN_SECRET", "short")])).unwrap_err().to_string();
        assert!(weak.contains("ADMIN_SECRET"), "{weak}");
        // Another pool's secret, or the default pool's, is refused as the admin's.
        for shared in ["gpu-secret-0123456789", "0123456789abcdef0123"] {
            let err = admin_secret(with(&[("ADMIN_SECRET", shared)])).unwrap_err();
            assert!(matches!(err, ConfigError::AdminSecretShared), "{err}");
        }
    }

    /// Pools are units of isolation. On the Worker every request read every pool's
    /// settings, so one pool's typo (`AGENT_PUBLIC_KEYS_TEAM_B`), or its secret missing or
    /// short, answered every pool's requests 500/503. Only the pool asked for is checked
    /// strictly now; another pool's errors cost that pool alone (and leave it out of the
    /// upgrade hint that searches other pools). The native edge, which reads its settings
    /// once at start, still refuses any bad one ([`Config::from_lookup`]).
    #[test]
    fn one_pools_bad_setting_costs_that_pool_alone() {
        let cases: [(&'static [(&'static str, &'static str)], &str); 4] = [
            (&[("AGENT_PUBLIC_KEYS_TEAM_B", "rig=not-a-key")], "AGENT_PUBLIC_KEYS_TEAM_B"),
            (&[("RUNNER_SECRET_TEAM_B", "short")], "RUNNER_SECRET_TEAM_B is too short"),
            (&[("RUNNER_SECRET_TEAM_B", "")], "RUNNER_SECRET_TEAM_B is not set"),
            (&[("RUNNER_SECRETS_TEAM_B", "ci")], "RUNNER_SECRETS_TEAM_B"),
        ];
        for (broken, named) in cases {
            let pools = two_pools(broken);
            let err = Config::for_pool(&pools, "team-b").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(named), "{named}: {err}");
            for fine in ["default", "gpu"] {
                let cfg = Config::for_pool(&pools, fine).unwrap_or_else(|e| panic!("{fine} refused for team-b's {named}: {e}"));
                let others: Vec<&str> = cfg.other_pools.iter().map(|(name, _)| name.as_str()).collect();
                assert!(!others.contains(&"team-b"), "{fine}: a broken pool is searched: {others:?}");
                assert!(others.contains(&if fine == "gpu" { "default" } else { "gpu" }), "{fine}: {others:?}");
            }
            // A host that reads its settings once at start refuses every bad one.
            let err = Config::from_lookup(&pools).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(named), "{named}: {err}");
        }
        // The default pool's own settings are its own too.
        let no_default = |name: &str| if name == "RUNNER_SECRET" { None } else { two_pools(&[])(name) };
        assert!(matches!(Config::for_pool(no_default, "default"), Err(ConfigError::Missing("RUNNER_SECRET"))));
        let gpu = Config::for_pool(no_default, "gpu").expect("the default pool's missing secret is its own problem");
        assert_eq!(gpu.other_pools.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["team-b"]);
        // An entry of POOLS that is no pool name costs only itself; one that clashes, the
        // pools it clashes with.
        let odd = |list: &'static str| move |name: &str| if name == "POOLS" { Some(list.to_string()) } else { two_pools(&[])(name) };
        assert!(Config::for_pool(odd("gpu,a.b,team-b"), "gpu").is_ok());
        assert!(Config::for_pool(odd("gpu,a.b,team-b"), "team-b").is_ok());
        assert!(matches!(Config::from_lookup(odd("gpu,a.b,team-b")), Err(ConfigError::PoolName(_))));
        assert!(matches!(Config::for_pool(odd("gpu,team-b,team_b"), "team-b"), Err(ConfigError::PoolClash(..))));
        assert!(Config::for_pool(odd("gpu,team-b,team_b"), "gpu").is_ok());
    }

    /// `POOLS` is read by one rule on both hosts: what the native edge refuses at its start
    /// (an entry that is no pool name, `default` listed, a pool listed twice, two whose
    /// settings would have the same names), the Worker refuses for the pools concerned,
    /// naming `POOLS` — not left out or served as if listed once — and serves the others.
    #[test]
    fn pools_is_read_by_one_rule_on_both_hosts() {
        let odd = |list: &'static str| move |name: &str| if name == "POOLS" { Some(list.to_string()) } else { two_pools(&[])(name) };
        let cases: [(&str, &[&str]); 5] = [
            ("gpu,a.b,team-b", &["a.b"]),
            ("gpu,team-b,gpu", &["gpu"]),
            ("gpu,team-b,default", &["default"]),
            ("gpu,team-b,team_b", &["team-b", "team_b"]),
            ("gpu team-b", &[]),
        ];
        for (list, refused) in cases {
            let each = Pools::each(odd(list));
            for (name, read) in &each {
                match read {
                    Err(e) => assert!(refused.contains(&name.as_str()) && e.to_string().contains("POOLS"), "{list}: {name}: {e}"),
                    Ok(pool) => assert!(!refused.contains(&name.as_str()) && pool.name == *name, "{list}: {name} taken"),
                }
            }
            for name in refused {
                assert_eq!(each.iter().filter(|(n, _)| n == name).count(), 1, "{list}: {name} is reported, once");
                let err = Config::for_pool(odd(list), name).err().map(|e| e.to_string()).unwrap_or_default();
                assert!(err.contains("POOLS"), "{list}: {name}: {err}");
            }
            for fine in ["default", "gpu", "team-b"].into_iter().filter(|n| !refused.contains(n)) {
                assert!(Config::for_pool(odd(list), fine).is_ok(), "{list}: {fine}");
            }
            match Config::from_lookup(odd(list)) {
                Ok(_) => assert!(refused.is_empty(), "{list} taken at start"),
                Err(e) => assert!(!refused.is_empty() && e.to_string().contains("POOLS"), "{list}: {e}"),
            }
        }
    }

    /// Two pools with one RUNNER_SECRET: whoever holds it is both pools' operator, which
    /// neither setting says (a caller's secret that is another pool's was refused already;
    /// this is the same check).
    #[test]
    fn two_pools_may_not_share_a_secret() {
        let pools = two_pools(&[("RUNNER_SECRET_TEAM_B", "gpu-secret-0123456789")]);
        for pool in ["gpu", "team-b"] {
            let err = Config::for_pool(&pools, pool).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("RUNNER_SECRET_GPU") && err.contains("RUNNER_SECRET_TEAM_B") && err.contains("its own"), "{pool}: {err}");
        }
        assert!(Config::for_pool(&pools, "default").is_ok(), "a pool with its own secret is not refused for two others'");
        assert!(Config::from_lookup(&pools).is_err());
        let with_default = two_pools(&[("RUNNER_SECRET_GPU", "0123456789abcdef0123")]);
        let err = Config::for_pool(&with_default, "default").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("RUNNER_SECRET_GPU") && err.contains("RUNNER_SECRET "), "{err}");
    }
}
