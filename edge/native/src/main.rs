//! `claude-runner-edge`: the edge as a native server. Configuration comes from the
//! environment (README "Configuration"); `--help` lists it.

use edge_native::{Server, ServerOptions};
use shared::setting::TextSettings;
use std::net::SocketAddr;
use std::path::PathBuf;

const HELP: &str = "claude-runner-edge: the Claude Runner edge as a native server

Environment:
  RUNNER_SECRET          callers' shared secret (X-Runner-Secret)            required
  EDGE_SIGNING_KEY       base64 ed25519 seed that signs jobs                 required
  AGENT_PUBLIC_KEYS      id=base64key,... agents allowed to connect          required
  RUNNER_SECRETS         name=secret,... named callers with their own secrets
  ADMIN_SECRET           the secret of GET /pools (16+ chars; unset: closed)
  LISTEN                 address to serve on             (default 127.0.0.1:8787)
  DATA_DIR               where jobs are stored  (default ~/.local/share/claude-runner/edge)
  HEARTBEAT_INTERVAL_MS, LOST_AFTER_MS, MAX_TIMEOUT_MS, MAX_BODY_BYTES,
  JOB_RETENTION_MS, QUEUE_TTL_MS, MAX_QUEUED_JOBS, MAX_QUEUED_PER_CALLER,
  TIMEOUT_MARGIN_MS, SSE_KEEPALIVE_MS,
  MAX_RETAINED_JOBS, MAX_RETAINED_BYTES, MAX_PENDING_BYTES   limits (see README;
                         LOST_AFTER_MS at least twice HEARTBEAT_INTERVAL_MS)
  NOTIFY_URL             where alerts are posted (ntfy topic or webhook)   (default none)
  OAUTH_WARN_HOURS, OFFLINE_ALERT_MS, NOTIFY_MIN_INTERVAL_MS   when to alert (see README)
  CALLBACK_HOSTS         host,host:port,... where a job's callback_url may point
                         (host: any port)                             (default none)
  MAX_CONNECTIONS        connections held at once; at the cap the one idle longest
                         is closed; callers' requests in flight hold at most 3/4,
                         each secret an equal share of that (429 past it)
                                      (default: the descriptor limit less 320, <= 16384)
  EXECUTE_KEEPALIVE_MS   an /execute not answered within it gets 200 and a space
                         every so often until its JSON (behind a Cloudflare Tunnel,
                         which cuts answers silent for 100 s: 20000) (default off)
  LOG_FORMAT             text | json                                (default text)
  RUST_LOG               log filter                                 (default info)

`claude-runner keygen` makes the keys and prints what to set.";

fn main() {
    // First: the environment holds EDGE_SIGNING_KEY and the callers' secrets, and run as
    // the agent's user (README, "The agent by hand") every job of that user could read a
    // dumpable edge's /proc/<pid>/environ. What is left is the window from the `exec` to here.
    runtime::not_dumpable();
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return;
    }
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("claude-runner-edge {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let env = TextSettings::new(|name| std::env::var_os(name));
    let format = env.get("LOG_FORMAT");
    // Read by the logger itself (`runtime::init_logging`), which takes a value that is not
    // text as unset, the filter `info`, and says nothing.
    env.get("RUST_LOG");
    match env.refuse_any().map_err(anyhow::Error::from).and_then(|()| runtime::log_format(&format.unwrap_or_default()).map_err(anyhow::Error::msg)) {
        Ok(format) => runtime::init_logging(format),
        Err(e) => {
            eprintln!("claude-runner-edge: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = run(&env) {
        eprintln!("claude-runner-edge: {e:#}");
        std::process::exit(1);
    }
}

fn run(env: &TextSettings<impl Fn(&str) -> Option<std::ffi::OsString>>) -> anyhow::Result<()> {
    let options = read_settings(env)?;
    // Said, not refused: a container's edge listens on 0.0.0.0 on purpose (the Dockerfile).
    if let Some(note) = edge_native::listen::reachable_from_the_network(options.listen) {
        tracing::info!(listen = %options.listen, "{note}");
    }
    // One thread: every request and frame goes through the one task that drives the
    // machine, so a second worker only added hand-offs between threads (a futex wake and
    // an epoll round per hop, about a fifth of the edge's CPU per job) and parallelism
    // for nothing but socket reads and writes.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let server = Server::bind(options).await?;
        server.serve(runtime::shutdown_signal()).await
    })
}

/// Every setting the edge reads, checked: a value that is not text is refused before any
/// other error about a setting read (it would read as unset, and be reported as missing,
/// or not at all).
fn read_settings(env: &TextSettings<impl Fn(&str) -> Option<std::ffi::OsString>>) -> anyhow::Result<ServerOptions> {
    let edge_native::EdgeSettings { config, max_connections, execute_keepalive_ms } = edge_native::edge_settings(env, |_| None)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let (listen, data_dir) = host_settings(|name| env.get_os(name), || runtime::home::passwd_home(uid))?;
    Ok(ServerOptions { config, listen, data_dir, max_connections, execute_keepalive_ms })
}

/// `LISTEN` and `DATA_DIR`, the settings only this host reads. Empty is unset, as for
/// every other setting (`LISTEN=` in a systemd `EnvironmentFile` or an `.env`). `DATA_DIR`
/// is made absolute once, here, and its default is under the user's home
/// (`runtime::home`: `HOME` when absolute, else `passwd`'s, the home of this user in the
/// password database): with `HOME` unset, empty or relative (a unit's `Environment=HOME=`),
/// the job store went under whatever folder the edge started in (`/` under systemd).
fn host_settings(
    get: impl Fn(&str) -> Option<std::ffi::OsString>,
    passwd: impl FnOnce() -> Option<PathBuf>,
) -> anyhow::Result<(SocketAddr, PathBuf)> {
    // Trimmed, blank as unset, as edge/core reads every other setting (a value that is not
    // UTF-8, which only a path may be, is taken as it is).
    let get = |name: &str| get(name).as_deref().and_then(shared::setting::os_value).map(std::ffi::OsStr::to_os_string);
    let listen = match get("LISTEN") {
        None => SocketAddr::from(([127, 0, 0, 1], 8787)),
        Some(text) => text
            .to_str()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("LISTEN must be an address like 127.0.0.1:8787, got `{}`", text.to_string_lossy()))?,
    };
    let data_dir = match get("DATA_DIR") {
        Some(dir) => std::path::absolute(PathBuf::from(dir)).map_err(|e| {
            anyhow::anyhow!("DATA_DIR is a relative path and the folder the edge started in cannot be read ({e}): give DATA_DIR as an absolute path")
        })?,
        None => runtime::home::home_from(get("HOME"), passwd)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "HOME is not set (or not an absolute path) and this user has no home folder in the password database: set DATA_DIR, the folder of the edge's job store (e.g. /var/lib/claude-runner-edge)"
                )
            })?
            .join(".local/share/claude-runner/edge"),
    };
    Ok((listen, data_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
    }

    /// `DATA_DIR=` put the job store in the working directory (`/` under systemd), and
    /// `LISTEN=` stopped the start, where every other empty setting is unset.
    #[test]
    fn an_empty_listen_or_data_dir_is_unset() {
        let (listen, data_dir) = host_settings(settings(&[("LISTEN", ""), ("DATA_DIR", ""), ("HOME", "/home/spark")]), no_passwd).unwrap();
        assert_eq!(listen.to_string(), "127.0.0.1:8787");
        assert_eq!(data_dir, PathBuf::from("/home/spark/.local/share/claude-runner/edge"));
        let (listen, data_dir) = host_settings(settings(&[("LISTEN", "[::1]:9000"), ("DATA_DIR", "/var/lib/e")]), no_passwd).unwrap();
        assert_eq!((listen.to_string(), data_dir), ("[::1]:9000".to_string(), PathBuf::from("/var/lib/e")));
        let err = host_settings(settings(&[("LISTEN", "8787")]), no_passwd).unwrap_err().to_string();
        assert!(err.contains("LISTEN must be an address like 127.0.0.1:8787") && err.contains("`8787`"), "{err}");
    }

    fn no_passwd() -> Option<PathBuf> {
        None
    }

    /// With `HOME` unset, empty or relative, the job store went under the folder the edge
    /// started in (`./.local/…`, `/` under systemd): the password database's home is taken,
    /// and with none the start stops, saying to set DATA_DIR. A relative `DATA_DIR` is made
    /// absolute once, from the folder the edge starts in.
    #[test]
    fn the_default_data_dir_is_under_a_real_home_and_a_relative_one_is_made_absolute() {
        let passwd = || Some(PathBuf::from("/home/runner"));
        for home in [None, Some(""), Some("relative/home")] {
            let get = move |name: &str| (name == "HOME").then(|| home.map(std::ffi::OsString::from)).flatten();
            let (_, data_dir) = host_settings(get, passwd).unwrap();
            assert_eq!(data_dir, PathBuf::from("/home/runner/.local/share/claude-runner/edge"), "HOME {home:?}");
            let err = host_settings(get, no_passwd).unwrap_err().to_string();
            assert!(err.contains("HOME is not set") && err.contains("set DATA_DIR"), "{err}");
        }
        let (_, data_dir) = host_settings(settings(&[("DATA_DIR", "edge-data")]), no_passwd).unwrap();
        assert_eq!(data_dir, std::env::current_dir().unwrap().join("edge-data"));
    }

    /// Every other setting is read trimmed, blank as unset (edge/core's config): `DATA_DIR= `
    /// put the job store in a folder named ` ` of the working directory (`/` under systemd),
    /// and `LISTEN= ` or `LISTEN=127.0.0.1:8787 ` (a space an env file kept) stopped the start.
    #[test]
    fn a_blank_listen_or_data_dir_is_unset_and_both_are_read_trimmed() {
        let (listen, data_dir) = host_settings(settings(&[("LISTEN", " "), ("DATA_DIR", " \t"), ("HOME", "/home/spark")]), no_passwd).unwrap();
        assert_eq!(listen.to_string(), "127.0.0.1:8787");
        assert_eq!(data_dir, PathBuf::from("/home/spark/.local/share/claude-runner/edge"));
        let (listen, data_dir) = host_settings(settings(&[("LISTEN", " [::1]:9000 "), ("DATA_DIR", "/var/lib/e ")]), no_passwd).unwrap();
        assert_eq!((listen.to_string(), data_dir), ("[::1]:9000".to_string(), PathBuf::from("/var/lib/e")));
    }

    /// A value that is not UTF-8 was read as unset: refused, named, not shown, before any
    /// other error (RUNNER_SECRET not text was "missing").
    #[test]
    fn a_setting_that_is_not_text_is_refused_by_name() {
        use std::os::unix::ffi::OsStrExt;
        for name in ["NOTIFY_URL", "RUNNER_SECRET", "LOST_AFTER_MS", "MAX_CONNECTIONS", "POOLS"] {
            let env = TextSettings::new(|asked: &str| match asked {
                _ if asked == name => Some(std::ffi::OsStr::from_bytes(b"https://h/caf\xe9-token").to_os_string()),
                "RUNNER_SECRET" => Some("0123456789abcdef0123".into()),
                "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".into()),
                "AGENT_PUBLIC_KEYS" => Some("spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".into()),
                _ => None,
            });
            let err = format!("{:#}", read_settings(&env).err().expect("refused"));
            assert!(err.starts_with(&format!("{name} is not UTF-8 text")), "{name}: {err}");
            assert!(!err.contains("caf") && !err.contains("https"), "the value is shown: {err}");
        }
        let env = TextSettings::new(|asked: &str| (asked == "LOG_FORMAT").then(|| std::ffi::OsString::from("json")));
        assert_eq!(env.get("LOG_FORMAT").as_deref(), Some("json"));
        assert!(env.refuse_any().is_ok());
    }

    /// A bad key was said twice on the one line the edge stops with ("…printed: …printed"):
    /// the settings error wrapped the key's error and named it as its cause as well.
    #[test]
    fn a_bad_setting_is_said_once() {
        let lookup = |name: &str| match name {
            "RUNNER_SECRET" => Some("0123456789abcdef0123".to_string()),
            "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".to_string()),
            "AGENT_PUBLIC_KEYS" => Some("spark=xyz".to_string()),
            _ => None,
        };
        let shown = format!("{:#}", anyhow::Error::from(edge_core::Config::from_lookup(lookup).unwrap_err()));
        assert_eq!(shown.matches("AGENT_PUBLIC_KEYS").count(), 1, "{shown}");
    }

    /// Every setting the edge's core reads (`edge/core/src/config.rs`) and this host's own
    /// are in `--help`, which README's table is held to (`tests/tests/readme.rs`) and
    /// docker-compose.yml and .env.example too (`tests/deploy/check`).
    #[test]
    fn the_help_names_every_setting_the_edge_reads() {
        let asked = std::cell::RefCell::new(Vec::new());
        let required = [
            ("RUNNER_SECRET", "0123456789abcdef0123"),
            ("EDGE_SIGNING_KEY", "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="),
            ("AGENT_PUBLIC_KEYS", "spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="),
        ];
        edge_core::Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_string());
            required.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        })
        .unwrap();
        host_settings(
            |name| {
                asked.borrow_mut().push(name.to_string());
                None
            },
            || Some("/home/runner".into()),
        )
        .unwrap();
        let mut asked = asked.into_inner();
        asked.extend(["MAX_CONNECTIONS", "EXECUTE_KEEPALIVE_MS", "LOG_FORMAT", "RUST_LOG"].map(String::from));
        let listed = |name: &str| HELP.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == name);
        // POOLS: pools are the Worker's (README); HOME: the default DATA_DIR's.
        let missing: Vec<_> = asked.iter().filter(|n| !listed(n) && !["POOLS", "HOME"].contains(&n.as_str())).collect();
        assert!(missing.is_empty(), "read but not in --help: {missing:?}");
    }
}
