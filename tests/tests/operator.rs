//! The operator's commands, run as a user would: `keygen`, `up`.

use harness::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn keygen_json_prints_two_matching_key_pairs() {
    let out = Command::new(bin("claude-runner")).args(["keygen", "--json"]).output().unwrap();
    assert!(out.status.success());
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let edge = shared::keys::signing_key("edge", keys["edge_signing_key"].as_str().unwrap()).unwrap();
    let agent = shared::keys::signing_key("agent", keys["agent_signing_key"].as_str().unwrap()).unwrap();
    assert_eq!(shared::keys::encode_verifying(&edge.verifying_key()), keys["edge_public_key"]);
    assert_eq!(shared::keys::encode_verifying(&agent.verifying_key()), keys["agent_public_key"]);
    assert_eq!(keys.as_object().unwrap().len(), 4);
}

#[test]
fn keygen_says_where_each_key_goes() {
    let out = Command::new(bin("claude-runner")).args(["keygen", "--agent-id", "spark"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in ["EDGE_SIGNING_KEY=", "AGENT_PUBLIC_KEYS=spark=", "AGENT_SIGNING_KEY=", "EDGE_PUBLIC_KEY=", "RUNNER_SECRET=", "wrangler secret put"] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

/// keygen prints the agent id inside single-quoted shell lines the operator pastes
/// (`echo 'id=key' | npx wrangler secret put AGENT_PUBLIC_KEYS`) and into an env file: an id
/// that closes the quote, breaks the line or is no agent id at all was printed as it was,
/// and the keys made for it were refused later by the edge. Refused at once, saying why.
#[test]
fn keygen_refuses_an_agent_id_that_is_not_one() {
    for bad in ["spark' ; touch /tmp/owned ; echo '", "spark\nRUNNER_SECRET=known", "a=b,c", "spark\u{1b}]0;x\u{7}"] {
        let out = Command::new(bin("claude-runner")).args(["keygen", "--agent-id", bad]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.stdout.is_empty(), "{bad:?} printed: {}", String::from_utf8_lossy(&out.stdout));
        assert!(err.contains("not valid") && !err.trim_end().chars().any(char::is_control), "{err:?}");
    }
}

#[test]
fn keygen_env_prints_matching_settings_for_an_env_file() {
    let out = Command::new(bin("claude-runner")).args(["keygen", "--env", "--agent-id", "spark"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let settings: std::collections::HashMap<&str, &str> =
        text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split_once('=').expect("NAME=value lines only")).collect();
    assert_eq!(settings.len(), 6, "{text}");
    assert_eq!(settings["AGENT_ID"], "spark");
    assert_eq!(settings["RUNNER_SECRET"].len(), 64);
    let edge = shared::keys::signing_key("edge", settings["EDGE_SIGNING_KEY"]).unwrap();
    let agent = shared::keys::signing_key("agent", settings["AGENT_SIGNING_KEY"]).unwrap();
    assert_eq!(shared::keys::encode_verifying(&edge.verifying_key()), settings["EDGE_PUBLIC_KEY"]);
    assert_eq!(format!("spark={}", shared::keys::encode_verifying(&agent.verifying_key())), settings["AGENT_PUBLIC_KEYS"]);
}

/// A secret given as a flag is in the process's command line, which every local user and
/// every job (the agent's user) can read in /proc for the process's whole life: only
/// `--agent-signing-key` was refused; `--github-token`, `--repo-tokens` (`agent`, `up`,
/// `doctor`) and `--secret` (`submit`, `login`) were taken. Each is refused, in both
/// forms, naming the variable to set instead; that variable is still read.
#[test]
fn a_secret_given_as_a_flag_is_refused_and_its_variable_taken() {
    let data = TempDir::new("secret-flags");
    let value = "ghp_secret-on-the-command-line-0123456789";
    let closed = closed_port();
    // Each stops early where the secret is taken: no Claude to run, an edge that is not there.
    let run = |command: &str, args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = Command::new(bin("claude-runner"));
        cmd.arg(command).args(args);
        if command == "submit" {
            cmd.arg("hello");
        }
        for var in ["AGENT_SIGNING_KEY", "AGENT_KEY_FILE", "EDGE_URL", "EDGE_PUBLIC_KEY", "GITHUB_TOKEN", "REPO_TOKENS", "RUNNER_SECRET"] {
            cmd.env_remove(var);
        }
        let out = cmd
            .envs(env)
            .env("DATA_DIR", data.path())
            .env("LISTEN", "127.0.0.1:0")
            .env("CLAUDE_BIN", "claude-that-does-not-exist")
            .env("CLAUDE_RUNNER_URL", format!("http://127.0.0.1:{}", closed.port))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let cases = [
        ("agent", "--github-token", "GITHUB_TOKEN"),
        ("agent", "--repo-tokens", "REPO_TOKENS"),
        ("agent", "--agent-signing-key", "AGENT_SIGNING_KEY"),
        ("up", "--github-token", "GITHUB_TOKEN"),
        ("up", "--repo-tokens", "REPO_TOKENS"),
        ("doctor", "--github-token", "GITHUB_TOKEN"),
        ("submit", "--secret", "RUNNER_SECRET"),
        ("login", "--secret", "RUNNER_SECRET"),
    ];
    for (command, flag, var) in cases {
        let given = if var == "REPO_TOKENS" { format!("git.example.com={value}") } else { value.to_string() };
        let joined = format!("{flag}={given}");
        for args in [vec![flag, given.as_str()], vec![joined.as_str()]] {
            let (code, err) = run(command, &args, None);
            assert_eq!(code, Some(2), "{command} {args:?}: {err}");
            assert!(
                err.contains(&format!("{flag} puts a secret in the process's command line")) && err.contains(&format!("set {var} in the environment")),
                "{command} {args:?}: {err}"
            );
            assert!(!err.contains(value), "the refusal repeats the secret: {err}");
        }
        // From the environment it is taken: what stops the command is something else.
        let (_, err) = run(command, &[], Some((var, &given)));
        assert!(!err.contains("command line") && !err.contains(&format!("set {var}")), "{command} with {var} set: {err}");
    }
}

/// `up.json` (both key pairs and the runner secret) was written with an fsync of the file
/// and none of its folder: after a power cut the folder could still lack the rename, and
/// the next `up` made new keys, unlike every secret and key printed before. The folder it
/// is in and every folder `up` made for it (a first `up` makes DATA_DIR and its missing
/// parents too: only DATA_DIR/up and DATA_DIR were synced, and a folder above could be lost
/// with everything under it) are synced after the rename, each in its parent. Seen with
/// strace; `up` stops right after (its port is taken).
#[test]
fn ups_keys_are_synced_with_the_folders_that_name_them() {
    let data = TempDir::new("up-durable");
    let data_dir = data.path().join("new/deeper");
    up_syncs_every_folder_it_made(&data, data_dir.as_os_str(), "the folder holding the first one up made");
}

/// A relative DATA_DIR's first folder is named in the folder `up` starts in: write_durably
/// walked the path's parents up to the empty one and stopped there, so the working
/// directory, which holds the name of the first folder `up` made, was never synced, and a
/// power cut could lose the keys with every folder under it.
#[test]
fn ups_keys_are_synced_with_the_folders_that_name_them_from_a_relative_data_dir() {
    let data = TempDir::new("up-durable-rel");
    up_syncs_every_folder_it_made(&data, "new/deeper".as_ref(), "the working directory, holding the first folder up made");
}

/// Runs `up` under strace in `data` with `DATA_DIR` (`data`/new/deeper, given as
/// `data_dir`), its port taken so it stops right after writing up.json, and checks that
/// every folder from DATA_DIR/up to `data` itself (`top`: what holds the first folder up
/// made) is synced after up.json's rename.
fn up_syncs_every_folder_it_made(data: &TempDir, data_dir: &std::ffi::OsStr, top: &str) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let trace = data.path().join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-y", "-qq", "-e", "trace=fsync,rename,renameat,renameat2", "-o"])
        .arg(&trace)
        .arg(bin("claude-runner"))
        .arg("up")
        .current_dir(data.path())
        .env("CLAUDE_BIN", bin("claude-standin"))
        .env("DATA_DIR", data_dir)
        .env("LISTEN", taken.local_addr().unwrap().to_string())
        .output()
        .expect("strace runs (Debian: apt-get install strace)");
    assert!(data.path().join("new/deeper/up/up.json").exists(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let renamed = lines.iter().position(|l| l.contains("rename") && l.contains("/up/up.json\"")).unwrap_or_else(|| panic!("no rename of up.json: {log}"));
    let synced = |dir: &std::path::Path| lines[renamed..].iter().any(|l| l.contains("fsync(") && l.contains(&format!("<{}>)", dir.display())));
    let real = std::fs::canonicalize(data.path()).unwrap();
    for (dir, what) in [("new/deeper/up", "DATA_DIR/up"), ("new/deeper", "DATA_DIR"), ("new", "DATA_DIR's parent, made by up"), ("", top)] {
        let dir = if dir.is_empty() { real.clone() } else { real.join(dir) };
        assert!(synced(&dir), "{what} ({}) is not synced after the rename: {log}", dir.display());
    }
}

/// Runs `up` with DATA_DIR `data` after `script` (`sh -c`, `$0` the agent's binary, which
/// it `exec`s with `up`) made DATA_DIR a mount of the test's own, in a mount namespace.
fn up_in_a_mount_of_its_own(data: &TempDir, script: &str, env: &[(&str, &Path)]) -> std::process::Output {
    let mount_ns = if unsafe { libc::geteuid() } == 0 { "-m" } else { "-rm" };
    Command::new("unshare")
        .args([mount_ns, "sh", "-c", script])
        .arg(bin("claude-runner"))
        .env("CLAUDE_BIN", bin("claude-standin"))
        .env("DATA_DIR", data.path())
        .env("LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A full disk at `up`'s first start said only "No space left on device (os error 28)":
/// which file, and what to do, are said. DATA_DIR is a full tmpfs in a mount namespace of
/// the test's own.
#[test]
fn up_on_a_full_disk_names_its_file_and_what_to_do() {
    let data = TempDir::new("up-full");
    let out = up_in_a_mount_of_its_own(&data, r#"mount -t tmpfs -o size=256k tmpfs "$DATA_DIR" && { head -c 1m /dev/zero > "$DATA_DIR/fill" 2>/dev/null; exec "$0" up; }"#, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let file = data.path().join("up/up.json");
    assert!(err.contains(&format!("cannot write {}", file.display())) && err.contains("free some space there, or set DATA_DIR"), "{err}");
}

/// A disk too full to make a folder (ext4 says ENOSPC at `mkdir` once its blocks or inodes
/// are used up) stopped the first `up` at DATA_DIR/up with "it must be a folder of the
/// agent's user, or absent: remove what stands in its place", where nothing stood. It says
/// the disk is full, and where. DATA_DIR is a tmpfs of the test's own with every inode
/// used (`nr_inodes`), in a mount namespace.
#[test]
fn up_on_a_disk_too_full_for_a_folder_says_so() {
    let data = TempDir::new("up-no-inodes");
    let out = up_in_a_mount_of_its_own(&data, r#"mount -t tmpfs -o size=1m,nr_inodes=4 tmpfs "$DATA_DIR" && { i=0; while touch "$DATA_DIR/f$i" 2>/dev/null; do i=$((i+1)); done; exec "$0" up; }"#, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let folder = data.path().join("up");
    assert!(err.contains(&folder.display().to_string()) && err.contains("is full") && err.contains("free some space"), "{err}");
    assert!(!err.contains("remove what stands in its place"), "{err}");
}

/// A disk that fills while the agent works: its status file goes stale, and `status
/// --check` (the container's HEALTHCHECK) said "it looks stuck; restart it" — which cannot
/// help — while the agent's log said nothing (the failed writes were at debug level). It
/// says the disk is full and what to do, and the log says why the file is not written.
/// DATA_DIR is a tmpfs of the test's own, filled once `up` is healthy.
#[test]
fn a_disk_filled_under_a_working_agent_is_named_by_status_check() {
    status_check_once_the_disk_fills("size=8m", r#"head -c 16m /dev/zero > "$DATA_DIR/fill" 2>/dev/null"#);
}

/// The same with the disk's inodes used up (a job that made many empty files): blocks are
/// left, and "looks stuck; restart it" was said.
#[test]
fn a_disk_out_of_inodes_under_a_working_agent_is_named_by_status_check() {
    status_check_once_the_disk_fills("size=64m,nr_inodes=400", r#"mkdir "$DATA_DIR/many"; i=0; while touch "$DATA_DIR/many/f$i" 2>/dev/null; do i=$((i+1)); done"#);
}

/// `up` on a tmpfs DATA_DIR of the test's own (`mount_options`), `fill` run once it is
/// healthy: `status --check` then says the disk is full and what to do, and the agent's
/// log why the status file is not written.
fn status_check_once_the_disk_fills(mount_options: &str, fill: &str) {
    let data = TempDir::new("up-fills");
    let logs = TempDir::new("up-fills-logs");
    let script = format!(
        r#"mount -t tmpfs -o {mount_options} tmpfs "$DATA_DIR" && {{
        HEARTBEAT_INTERVAL_MS=1000 "$0" up > "$LOGS/up.log" 2>&1 & up=$!
        i=0; until "$0" status --check > "$LOGS/check" 2>&1; do
            i=$((i+1)); if [ $i -gt 600 ]; then echo "never healthy: $(cat "$LOGS/check")"; kill $up; exit 3; fi; sleep 0.1
        done
        {fill}
        i=0; while "$0" status --check > "$LOGS/check" 2>&1; do
            i=$((i+1)); if [ $i -gt 1200 ]; then break; fi; sleep 0.1
        done
        kill -INT $up; wait $up; cat "$LOGS/check"
    }}"#
    );
    let out = up_in_a_mount_of_its_own(&data, &script, &[("LOGS", logs.path())]);
    let said = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(logs.path().join("up.log")).unwrap_or_default();
    assert!(said.starts_with("unhealthy:") && said.contains("full") && said.contains("free some space"), "{said}\n{log}");
    assert!(!said.contains("restart it"), "{said}");
    assert!(log.contains("could not write the status file") && log.contains("free some space"), "{log}");
}

/// A DATA_DIR on a read-only disk (or under a folder this user cannot write) cannot hold
/// the folder `up` makes: the refusal said "it must be a folder of the agent's user, or
/// absent: remove what stands in its place", where nothing stood, as it said of a full disk.
/// It says the folder cannot be made there and to set DATA_DIR to one this user can write.
/// DATA_DIR is a read-only tmpfs in a mount namespace of the test's own.
#[test]
fn up_on_a_read_only_disk_says_the_folder_cannot_be_made() {
    let data = TempDir::new("up-read-only");
    let out = up_in_a_mount_of_its_own(&data, r#"mount -t tmpfs -o ro tmpfs "$DATA_DIR" && exec "$0" up"#, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let folder = data.path().join("up");
    assert!(err.contains(&format!("cannot make {}", folder.display())) && err.contains("set DATA_DIR"), "{err}");
    assert!(!err.contains("remove what stands in its place"), "{err}");
}

/// With HOME unset (a service manager, `env -i`, cron) every user's default folders were
/// root's: /root/.local/share/claude-runner and /root/.claude. They are under the user's
/// home in the password database. Run as `nobody` when the test is root (root's home is
/// /root either way), else as this user.
#[test]
fn without_home_the_default_folders_are_the_users_own() {
    use std::os::unix::process::CommandExt;
    let root = unsafe { libc::geteuid() } == 0;
    let uid: u32 = if root { 65534 } else { unsafe { libc::geteuid() } };
    let getent = Command::new("getent").args(["passwd", &uid.to_string()]).output().unwrap();
    let entry = String::from_utf8(getent.stdout).unwrap();
    let home = entry.trim_end().split(':').nth(5).unwrap_or_else(|| panic!("no passwd entry for {uid}")).to_string();
    assert_ne!(home, "/root");
    let mut cmd = Command::new(bin("claude-runner"));
    cmd.arg("oauth-status").env_remove("HOME").env_remove("DATA_DIR").env_remove("CLAUDE_CONFIG_DIR").env_remove("CLAUDE_CODE_OAUTH_TOKEN").env_remove("ANTHROPIC_API_KEY");
    if root {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("read in {home}/.claude (")), "{err}");
}

#[test]
fn up_without_claude_says_how_to_install_it() {
    let data = TempDir::new("up-noclaude");
    let out = Command::new(bin("claude-runner"))
        .arg("up")
        .env("CLAUDE_BIN", "claude-that-does-not-exist")
        .env("DATA_DIR", data.path())
        .env("LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("npm install -g @anthropic-ai/claude-code"), "{err}");
    // CLAUDE_BIN names another binary than the default: that one is not found, and
    // CLAUDE_BIN is the first thing to check (a typo such as `claud`).
    assert!(err.contains("No binary `claude-that-does-not-exist` was found") && err.contains("Check CLAUDE_BIN"), "{err}");
}

/// `up` keeps its edge's jobs in `DATA_DIR/up/edge/edge.sqlite3`; a file there that is
/// not a job store stopped it with "file is not a database" alone. It names the file and
/// says what to do, as the edge's own binary does.
#[test]
fn up_with_a_job_store_that_is_not_a_database_names_it_and_what_to_do() {
    use std::os::unix::fs::DirBuilderExt;
    let data = TempDir::new("up-garbage");
    let edge = data.path().join("up/edge");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&edge).unwrap();
    let store = edge.join("edge.sqlite3");
    std::fs::write(&store, b"not a database, whatever its name says. ".repeat(200)).unwrap();
    let out = Command::new(bin("claude-runner"))
        .arg("up")
        .env("CLAUDE_BIN", bin("claude-standin"))
        .env("DATA_DIR", data.path())
        .env("LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{} is not an edge's job store", store.display())) && err.contains("move it aside"), "{err}");
}

/// A running `claude-runner up` with `DATA_DIR` in `data`: its edge's URL, and every line
/// it prints to stdout, as it prints them.
struct Up {
    child: std::process::Child,
    base: String,
    /// Its first line: where it listens.
    first: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Up {
    /// `up` with the stand-in for Claude and these settings besides.
    fn start(data: &TempDir, env: &[(&str, &str)]) -> Up {
        Up::start_with_nofile(data, env, None)
    }

    /// [`Up::start`], its soft descriptor limit set to `soft_nofile` (if given) before it
    /// starts, as a shell's `ulimit -Sn` would.
    fn start_with_nofile(data: &TempDir, env: &[(&str, &str)], soft_nofile: Option<u64>) -> Up {
        Up::start_with(data, env, soft_nofile, None)
    }

    /// [`Up::start`], started in the folder `cwd`.
    fn start_in(data: &TempDir, env: &[(&str, &str)], cwd: &std::path::Path) -> Up {
        Up::start_with(data, env, None, Some(cwd))
    }

    fn start_with(data: &TempDir, env: &[(&str, &str)], soft_nofile: Option<u64>, cwd: Option<&std::path::Path>) -> Up {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(data.path().join("up.log")).unwrap();
        let mut command = Command::new(bin("claude-runner"));
        if let Some(soft) = soft_nofile {
            // SAFETY: getrlimit and setrlimit only, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit.rlim_cur = soft as libc::rlim_t;
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .arg("up")
            .env("CLAUDE_BIN", bin("claude-standin"))
            .env("DATA_DIR", data.path())
            .env("LISTEN", "127.0.0.1:0")
            .env_remove("CLAUDE_CODE_OAUTH_TOKEN")
            .env_remove("ANTHROPIC_API_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(60)).expect("up prints where it listens");
        let base = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in `{first}`"))
            .trim_end_matches(',')
            .to_string();
        Up { child, base, first, lines }
    }

    /// What it printed after its first line, up to its last (how to stop it).
    fn printed(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(60)) {
            let last = line.contains("Ctrl-C");
            out.push(line);
            if last {
                break;
            }
        }
        out
    }
}

/// `claude-runner up` kept the soft descriptor limit it was started with (1024 on Debian
/// and under systemd): its edge's default MAX_CONNECTIONS followed it, and a larger one
/// failed with EMFILE under load. It raises it to the hard limit as the edge's own binary
/// does, saying both figures; the Claude runs it starts keep the limit it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_raises_its_descriptor_limit_to_the_hard_one() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    let hard = limit.rlim_max as u64;
    assert!(hard > 512, "this test needs a hard descriptor limit above 512 (it is {hard})");
    let data = TempDir::new("up-nofile");
    let mut up = Up::start_with_nofile(&data, &[("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token")], Some(512));
    let _ = up.printed();
    Client::new(&up.base).wait_online().await;
    // A job's Claude reads its own limits.
    let out = Command::new(bin("claude-runner"))
        .args(["submit", "--quiet", "@print_file_b64=/proc/self/limits"])
        .env("CLAUDE_RUNNER_URL", &up.base)
        .env("RUNNER_SECRET", up_secret(&data))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    let b64 = shown.trim().strip_prefix("the file is ").unwrap_or_else(|| panic!("{shown}{}", String::from_utf8_lossy(&out.stderr)));
    use base64::Engine;
    let limits = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap();
    let open_files: Vec<&str> = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(open_files[3], "512", "a job's Claude got the raised limit: {limits}");
    let log = std::fs::read_to_string(data.path().join("up.log")).unwrap();
    let _ = up.child.kill();
    let _ = up.child.wait();
    let ready = log.lines().find(|l| l.contains("edge ready")).unwrap_or_else(|| panic!("no `edge ready` line: {log}"));
    assert!(ready.contains(&format!("nofile={hard}")), "the limit was not raised to {hard}: {ready}\n{log}");
    let raised = log.lines().find(|l| l.contains("descriptor limit")).unwrap_or_else(|| panic!("no line on the descriptor limit: {log}"));
    assert!(raised.contains("from=512") && raised.contains(&format!("to={hard}")), "{raised}");
}

/// The runner secret `up` made and keeps in `DATA_DIR/up/up.json`.
fn up_secret(data: &TempDir) -> String {
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(data.path().join("up/up.json")).unwrap()).unwrap();
    state["runner_secret"].as_str().unwrap().to_string()
}

/// An empty Claude config folder in `data` (no login in it).
fn claude_dir_in(data: &TempDir) -> std::path::PathBuf {
    let dir = data.path().join("claude");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `up`'s agent ignored AGENT_LABELS: a job asking for the label found no agent for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ups_agent_offers_the_labels_of_agent_labels() {
    let data = TempDir::new("up-labels");
    let up = Up::start(&data, &[("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token"), ("AGENT_LABELS", "gpu=a100")]);
    let _ = up.printed();
    let client = Client::new(&up.base);
    client.wait_online().await;
    let secret = up_secret(&data);
    let health = client.send("GET", "/health", Some(&secret), None).await;
    assert_eq!(health.body["agents"][0]["labels"], json!({"gpu": "a100"}), "{}", health.text);
    let a = client.send("POST", "/execute", Some(&secret), Some(json!({"prompt": "on a100", "labels": "gpu=a100"}).to_string().into_bytes())).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_an_edge_and_a_connected_agent() {
    let data = TempDir::new("up");
    let mut up = Up::start(&data, &[("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token")]);
    let base = up.base.clone();
    let client = Client::new(&base);
    client.wait_online().await;
    // The secret it made is the one it printed in the curl line.
    let secret = &up_secret(&data);
    let printed = up.printed();
    // Printed before the agent's first dial: it is connecting, not yet connected.
    assert!(up.first.ends_with("connecting to it."), "{}", up.first);
    // The curl lines read the secret the export line sets: pasted in order, as printed,
    // they reach the edge; none holds the secret itself (a pasted line is kept in the
    // shell's history), and none puts it in curl's command line either, which every local
    // user can read in /proc while curl runs (a `curl` first on PATH here writes down its
    // arguments, then runs the real one).
    let export_at = printed.iter().position(|l| l.trim_start().starts_with("export ")).expect("an export line");
    let health = printed.iter().position(|l| l.contains("/health")).expect("a curl line for /health");
    assert!(export_at < health && printed[export_at..health].iter().any(|l| l.contains("/execute")), "{printed:?}");
    assert!(!printed.iter().any(|l| l.contains("curl") && l.contains(secret.as_str())), "{printed:?}");
    let real_curl = String::from_utf8(Command::new("sh").args(["-c", "command -v curl"]).output().unwrap().stdout).unwrap();
    let wrapper = data.path().join("wrapper");
    std::fs::create_dir_all(&wrapper).unwrap();
    let argv_log = data.path().join("curl-argv.log");
    let script = format!("#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexec '{}' \"$@\"\n", argv_log.display(), real_curl.trim());
    std::fs::write(wrapper.join("curl"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(wrapper.join("curl"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pasted = Command::new("bash")
        .arg("-c")
        .arg(printed[export_at..=health].join("\n"))
        .env("PATH", format!("{}:{}", wrapper.display(), std::env::var("PATH").unwrap_or_default()))
        .env_remove("RUNNER_SECRET")
        .output()
        .unwrap();
    let answers = String::from_utf8_lossy(&pasted.stdout);
    assert!(answers.contains("stand-in answer to: Write a haiku about home servers") && answers.contains("\"status\""), "{printed:?} {answers} {}", String::from_utf8_lossy(&pasted.stderr));
    let argv = std::fs::read_to_string(&argv_log).unwrap_or_default();
    assert_eq!(argv.lines().count(), 2, "both curl lines ran: {argv}");
    assert!(!argv.contains(secret.as_str()), "the secret is in curl's command line: {argv}");
    assert!(!printed.iter().any(|l| l.contains("not logged in")), "{printed:?}");
    // `submit` finds the edge the way `up` says, as it says.
    let export = format!("export CLAUDE_RUNNER_URL={base} RUNNER_SECRET='{secret}'");
    assert!(printed.iter().any(|l| l.trim() == export), "{printed:?}");
    // Not on the test's PATH: named by its path, which a shell runs as it is pasted.
    let this = std::fs::canonicalize(bin("claude-runner")).unwrap();
    assert!(printed.iter().any(|l| l.trim() == format!("{} submit \"Write a haiku about home servers\"", this.display())), "{printed:?}");
    let submit = Command::new(bin("claude-runner"))
        .args(["submit", "hello from submit"])
        .env("CLAUDE_RUNNER_URL", &base)
        .env("RUNNER_SECRET", secret)
        .output()
        .unwrap();
    assert!(submit.status.success(), "{}", String::from_utf8_lossy(&submit.stderr));
    assert_eq!(String::from_utf8_lossy(&submit.stdout).trim(), "stand-in answer to: hello from submit");
    let a = client.send("POST", "/execute", Some(secret), Some(json!({"prompt": "hello from up"}).to_string().into_bytes())).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["output"], "stand-in answer to: hello from up");
    // Its keys, the edge's database and the agent's files are the owner's alone.
    let mode = |p: &str| std::fs::metadata(data.path().join(p)).map(|m| m.permissions().mode() & 0o777).unwrap();
    assert_eq!(mode("up"), 0o700);
    assert_eq!(mode("up/up.json"), 0o600);
    for dir in ["up/edge", "up/agent", "up/agent/workspaces"] {
        assert_eq!(mode(dir) & 0o077, 0, "{dir} is open to others");
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(up.child.id() as i32, libc::SIGTERM) };
    let status = up.child.wait().unwrap();
    assert!(status.success(), "up stops cleanly on SIGTERM");
}

/// A second `up` on the same `DATA_DIR` while one runs (or two first ones at once) read and
/// wrote `up.json` before it found the edge's folder taken: with the file gone (deleted to
/// make new keys, as `up` advises for a damaged one, or not yet written by the other) it
/// made new keys and a new secret there, then failed, and the running `up` went on with
/// the secret it had printed while the file, and so every later `up`, held another. The
/// second is refused before it touches `up.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_up_on_the_same_data_dir_leaves_the_first_ones_keys() {
    let data = TempDir::new("up-twice");
    let mut first = Up::start(&data, &[("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token")]);
    Client::new(&first.base).wait_online().await;
    std::fs::remove_file(data.path().join("up/up.json")).unwrap();
    let second = Command::new(bin("claude-runner"))
        .arg("up")
        .env("CLAUDE_BIN", bin("claude-standin"))
        .env("DATA_DIR", data.path())
        .env("LISTEN", "127.0.0.1:0")
        .env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token")
        .output()
        .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) };
    assert!(first.child.wait().unwrap().success(), "the first up stops cleanly on SIGTERM");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("another"), "{err}");
    // A DATA_DIR of its own is not enough: the first holds the port.
    assert!(err.contains("a DATA_DIR and a LISTEN of its own"), "{err}");
    assert!(!data.path().join("up/up.json").exists(), "the second up wrote keys the first does not use: {err}");
}

/// A newcomer with Claude Code installed but not logged in: `up` started, printed a curl
/// line, and every job was refused (`503 RUNNER_OAUTH_ERROR`) with nothing said at the start.
/// It says so when it starts, and how to log in.
#[test]
fn up_without_a_login_says_so_and_how_to_log_in() {
    let data = TempDir::new("up-nologin");
    let claude_dir = claude_dir_in(&data);
    // This one's PATH finds it as `claude-runner`: the lines to paste say so.
    let path = format!("{}:{}", bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    let env = [("CLAUDE_CONFIG_DIR", claude_dir.to_str().unwrap()), ("PATH", &path), ("AGENT_ID", "someone-else"), ("EDGE_URL", "ws://127.0.0.1:9")];
    let up = Up::start(&data, &env);
    let printed = up.printed().join("\n");
    // The login where this agent reads it: CLAUDE_BIN's binary into CLAUDE_CONFIG_DIR (a
    // plain `claude auth login` logged another binary into ~/.claude), or through the edge.
    let login = format!("CLAUDE_CONFIG_DIR={} {} auth login", claude_dir.display(), bin("claude-standin").display());
    assert!(printed.contains("not logged in") && printed.contains(&format!("\n    {login}\n")), "{printed}");
    // In up's DATA_DIR: `login` finds there the key that checks the URL.
    let login_line = format!("\n    DATA_DIR={} claude-runner login\n", data.path().display());
    assert!(printed.contains(&login_line) && printed.contains("\n  claude-runner submit \""), "{printed}");
    // The agent's settings it was given and does not read are named, once, on stderr.
    let log = std::fs::read_to_string(data.path().join("up.log")).unwrap();
    let notices: Vec<&str> = log.lines().filter(|l| l.contains("does not read")).collect();
    assert_eq!(notices.len(), 1, "{log}");
    for says in ["`AGENT_ID`, `EDGE_URL` are set", "up/up.json", "`claude-runner agent` is the command that reads them"] {
        assert!(notices[0].contains(says), "{says}: {log}");
    }
}

/// A login that failed to authenticate stays failed across a restart while the
/// credentials are the same (the agent takes the mark over from its status file): `up`
/// started again said nothing of it, and the next job was refused. It says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_started_again_after_a_failed_login_says_so() {
    let data = TempDir::new("up-authfailed");
    let claude_dir = claude_dir_in(&data);
    let env = [("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-test-token-not-real-0123456789"), ("CLAUDE_CONFIG_DIR", claude_dir.to_str().unwrap())];
    let mut up = Up::start(&data, &env);
    let client = Client::new(&up.base);
    client.wait_online().await;
    let secret = &up_secret(&data);
    let a = client.send("POST", "/execute", Some(secret), Some(json!({"prompt": "@auth_error"}).to_string().into_bytes())).await;
    assert_eq!(a.body["error_code"], "RUNNER_OAUTH_ERROR", "{}", a.text);
    let printed = up.printed();
    assert!(!printed.iter().any(|l| l.contains("needs a person")), "{printed:?}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(up.child.id() as i32, libc::SIGTERM) };
    assert!(up.child.wait().unwrap().success());
    let again = Up::start(&data, &env);
    let printed = again.printed().join("\n");
    let login = format!("CLAUDE_CONFIG_DIR={} {} auth login", claude_dir.display(), bin("claude-standin").display());
    assert!(printed.contains("needs a person") && printed.contains(&format!("Here that login is `{login}`.")), "{printed}");
}

/// `up`'s agent keeps its files under `DATA_DIR/up/agent`: `claude-runner status` and
/// `agent --drain` with the same `DATA_DIR` said no agent had ever run while `up` ran, and
/// `oauth-status` and `doctor` did not show its usage window. They find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_drain_and_the_login_lines_find_the_agent_up_runs() {
    let data = TempDir::new("up-status");
    let claude_dir = claude_dir_in(&data);
    let token = "sk-ant-oat01-test-token-not-real-0123456789";
    let mut up = Up::start(&data, &[("CLAUDE_CODE_OAUTH_TOKEN", token), ("CLAUDE_CONFIG_DIR", claude_dir.to_str().unwrap())]);
    let client = Client::new(&up.base);
    client.wait_online().await;
    let secret = &up_secret(&data);
    let a = client.send("POST", "/execute", Some(secret), Some(json!({"prompt": "@rate_limited=3600"}).to_string().into_bytes())).await;
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    // The status file is rewritten when the report goes out (in the background: looked
    // for up to 60 s, not 100 tries some 5 s in all, which a loaded machine could exceed).
    let mut seen = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let (_, status, _) = oauth_status(&claude_dir, data.path(), Some(token));
        if status["usage"]["status"] == "rejected" {
            seen = status;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen["usage"]["type"], "five_hour", "{seen}");
    let (_, out) = doctor(&[
        ("CLAUDE_CONFIG_DIR", claude_dir.display().to_string()),
        ("DATA_DIR", data.path().display().to_string()),
        ("CLAUDE_BIN", bin("claude-standin").display().to_string()),
        ("CLAUDE_CODE_OAUTH_TOKEN", token.to_string()),
    ]);
    assert!(out.contains("warn  usage") && out.contains("used up until"), "{out}");
    // Its key and edge checks are not an agent's beside `up` (which has keys of its own):
    // not checked, saying why, and not failed (they were three FAILs, and exit 1).
    assert!(out.contains("--    agent key, edge key, edge: not checked: beside `claude-runner up`") && !out.contains("FAIL"), "{out}");
    assert!(out.contains("The checks that apply beside `up` passed"), "{out}");
    let command = |args: &[&str]| {
        let out = Command::new(bin("claude-runner")).args(args).env("DATA_DIR", data.path()).env_remove("CLAUDE_BIN").output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, out) = command(&["status"]);
    assert!(ok && out.contains("connected since"), "{out}");
    let (ok, out) = command(&["agent", "--drain"]);
    assert!(ok && out.contains("has stopped"), "{out}");
    assert!(up.child.wait().unwrap().success(), "up exits 0 once drained");
    // Stopped, it says how to start it again: with `up`, too.
    let (ok, out) = command(&["status"]);
    assert!(!ok && out.contains("not running") && out.contains("claude-runner up"), "{out}");
}

/// `up` started with `CLAUDE_CONFIG_DIR=/x` reads its login in /x; `oauth-status` and
/// `doctor` run from another shell without that setting read ~/.claude. They took the
/// folder the agent's status file names instead — a file a job can write: a job named a
/// folder of its own (a lookalike login shown as the agent's; `doctor --canary` would run
/// its settings' hooks as the operator), and a line break in the name printed lines of the
/// job's choosing as doctor's. They read this shell's folder, and name the status file's
/// as its word, on one line, escaped. (The agent is held still with SIGSTOP while the
/// file is planted, so that its next heartbeat does not write over it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_status_and_doctor_read_this_shells_login_and_name_the_agents() {
    let data = TempDir::new("up-config-dir");
    let claude_dir = claude_dir_in(&data);
    let far = 4_102_444_800_000u64;
    let creds = json!({"claudeAiOauth": {"accessToken": "sk-ant-oat01-folder", "refreshToken": "sk-ant-ort01-folder", "expiresAt": far, "scopes": ["user:inference"]}});
    std::fs::write(claude_dir.join(".credentials.json"), creds.to_string()).unwrap();
    let up = Up::start(&data, &[("CLAUDE_CONFIG_DIR", claude_dir.to_str().unwrap())]);
    Client::new(&up.base).wait_online().await;
    // The status file names the agent's folder once written after the start (in the
    // background: online at the edge first, under load).
    let status_file = data.path().join("up/agent/status.json");
    let named = eventually(Duration::from_secs(60), || std::fs::read_to_string(&status_file).is_ok_and(|s| s.contains(claude_dir.to_str().unwrap()))).await;
    assert!(named, "the status file never named the agent's Claude folder");
    // This shell: no CLAUDE_CONFIG_DIR, a home with no login in it.
    let home = TempDir::new("up-config-dir-home");
    let run = |command: &str| {
        let out = Command::new(bin("claude-runner"))
            .arg(command)
            .env("DATA_DIR", data.path())
            .env("HOME", home.path())
            .env("CLAUDE_BIN", bin("claude-standin"))
            .env_remove("CLAUDE_CONFIG_DIR")
            .env_remove("CLAUDE_CODE_OAUTH_TOKEN")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("EDGE_URL")
            .env_remove("AGENT_SIGNING_KEY")
            .env_remove("EDGE_PUBLIC_KEY")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let read_in = format!("read in {}/.claude (CLAUDE_CONFIG_DIR is not set here)", home.path().display());
    let agents_word = |dir: &str| format!("the running agent's status file says it reads its login in {dir}, which is not read here");
    let (code, out, err) = run("oauth-status");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!((code, &status["configured"]), (Some(1), &json!(false)), "this shell's folder holds no login: {out}{err}");
    assert!(err.contains(&read_in) && err.contains(&agents_word(claude_dir.to_str().unwrap())), "{err}");

    // A job's word: a folder of its own, with a lookalike login, named to break the line.
    let lookalike = data.path().join("lookalike\n  ok    login: forged");
    std::fs::create_dir_all(&lookalike).unwrap();
    std::fs::write(lookalike.join(".credentials.json"), creds.to_string()).unwrap();
    let status_file = data.path().join("up/agent/status.json");
    let escaped = agents_word(&shared::text::one_line(lookalike.to_str().unwrap()));
    // Written over the running agent's file (a stopped agent's file is not taken as a
    // running one's), until both commands read it before the agent's next write.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (oauth, doctor) = loop {
        let mut planted: serde_json::Value = serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
        planted["claude_config_dir"] = lookalike.to_str().unwrap().into();
        let staged = status_file.with_extension("planted");
        std::fs::write(&staged, planted.to_string()).unwrap();
        std::fs::rename(&staged, &status_file).unwrap();
        let (oauth, doctor) = (run("oauth-status"), run("doctor"));
        if (oauth.2.contains(&escaped) && doctor.1.contains(&escaped)) || std::time::Instant::now() > deadline {
            break (oauth, doctor);
        }
    };
    let (code, out, err) = oauth;
    let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!((code, &status["configured"]), (Some(1), &json!(false)), "the job's folder was read: {out}{err}");
    assert!(err.contains(&read_in) && err.contains(&escaped), "{err}");
    let (code, out, err) = doctor;
    let login = out.lines().find(|l| l.contains(" login: ")).unwrap_or_default();
    assert!(code == Some(1) && login.trim_start().starts_with("FAIL") && login.contains(&read_in), "{code:?} {out}{err}");
    assert!(login.contains(&escaped), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("  ok    login: forged")), "a line of the job's: {out}");

    // Set here, this shell's folder is the one read and named (the agent's named beside it).
    let out = Command::new(bin("claude-runner")).arg("oauth-status").env("DATA_DIR", data.path()).env("CLAUDE_CONFIG_DIR", &claude_dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains(&format!("read in {} (CLAUDE_CONFIG_DIR)", claude_dir.display())), "{err}");
}

/// The agent, its jobs and `oauth-status` must agree on where Claude's login is. A relative
/// `CLAUDE_CONFIG_DIR` was read by the agent against the folder it started in, and by
/// each job's Claude against the job's workspace (its working directory), where no login
/// is, and a job could put one; it is made absolute once, as the command starts. A `HOME`
/// that is set but empty or relative (a unit's `Environment=HOME=`) was no home to the
/// agent, which took the password database's, but reached each job as it was: Claude
/// (Node's `os.homedir()` is `HOME` when set) read `.claude` in the workspace. Jobs are
/// given the home the agent uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_claude_config_dir_and_a_homeless_home_mean_the_same_to_agent_and_jobs() {
    let uid = unsafe { libc::geteuid() };
    let getent = Command::new("getent").args(["passwd", &uid.to_string()]).output().unwrap();
    let entry = String::from_utf8(getent.stdout).unwrap();
    let passwd_home = entry.trim_end().split(':').nth(5).unwrap_or_else(|| panic!("no passwd entry for {uid}")).to_string();
    for home in ["", "relative/home"] {
        let data = TempDir::new("up-relative-config");
        std::fs::create_dir_all(data.path().join("claude-rel")).unwrap();
        let env = [("HOME", home), ("CLAUDE_CONFIG_DIR", "claude-rel"), ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token")];
        let up = Up::start_in(&data, &env, data.path());
        let client = Client::new(&up.base);
        client.wait_online().await;
        let secret = up_secret(&data);
        let value_of = |var: &'static str| {
            let client = &client;
            let secret = &secret;
            async move {
                let a = client.send("POST", "/execute", Some(secret), Some(json!({"prompt": format!("@print_env={var}")}).to_string().into_bytes())).await;
                assert_eq!(a.status, 200, "{}", a.text);
                a.body["output"].as_str().unwrap_or_default().trim_start_matches("the value is ").to_string()
            }
        };
        let config_dir = data.path().join("claude-rel");
        assert_eq!(value_of("CLAUDE_CONFIG_DIR").await, config_dir.display().to_string(), "HOME={home:?}");
        assert_eq!(value_of("HOME").await, passwd_home, "HOME={home:?}: the job's home is not the agent's");
        // `oauth-status` in the same shell, the same folder: the one the agent reads.
        let out = Command::new(bin("claude-runner")).arg("oauth-status").envs(env).env("DATA_DIR", data.path()).current_dir(data.path()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("read in {} (CLAUDE_CONFIG_DIR)", config_dir.display())) && !err.contains("status file says"), "{err}");
        // Without CLAUDE_CONFIG_DIR, the password database's home, as the agent's.
        let out = Command::new(bin("claude-runner")).arg("oauth-status").env("HOME", home).env_remove("CLAUDE_CONFIG_DIR").env("DATA_DIR", data.path()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("read in {passwd_home}/.claude (")), "HOME={home:?}: {err}");
    }
}

fn doctor(env: &[(&str, String)]) -> (bool, String) {
    doctor_with(&[], env)
}

fn doctor_with(args: &[&str], env: &[(&str, String)]) -> (bool, String) {
    let out = Command::new(bin("claude-runner"))
        .arg("doctor")
        .args(args)
        .env_remove("EDGE_URL")
        .env_remove("AGENT_SIGNING_KEY")
        .env_remove("EDGE_PUBLIC_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_good_setup_and_names_the_fix_for_a_bad_one() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let claude_dir = TempDir::new("doctor-claude");
    let good = vec![
        ("EDGE_URL", edge.ws_url()),
        ("AGENT_ID", "spark".to_string()),
        ("AGENT_SIGNING_KEY", shared::keys::encode_signing(keys.agent("spark"))),
        ("EDGE_PUBLIC_KEY", shared::keys::encode_verifying(&keys.edge.verifying_key())),
        ("CLAUDE_BIN", bin("claude-standin").display().to_string()),
        ("CLAUDE_CONFIG_DIR", claude_dir.path().display().to_string()),
        ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-doctor".to_string()),
    ];
    let (ok, out) = doctor(&good);
    assert!(ok, "{out}");
    assert!(out.contains("All checks passed"), "{out}");
    assert!(out.contains(&format!("spark={}", shared::keys::encode_verifying(&keys.agent("spark").verifying_key()))), "{out}");

    // No login, no such binary, an edge that is not there, a broken key.
    let nobody = closed_port();
    let bad = vec![
        ("EDGE_URL", format!("ws://127.0.0.1:{}", nobody.port)),
        ("AGENT_SIGNING_KEY", "not-base64!".to_string()),
        ("EDGE_PUBLIC_KEY", shared::keys::encode_verifying(&keys.edge.verifying_key())),
        ("CLAUDE_BIN", "/nonexistent/claude".to_string()),
        ("CLAUDE_CONFIG_DIR", claude_dir.path().display().to_string()),
    ];
    let (ok, out) = doctor(&bad);
    assert!(!ok, "{out}");
    for fix in ["npm install -g @anthropic-ai/claude-code", "claude auth login", "claude-runner keygen", "check EDGE_URL"] {
        assert!(out.contains(fix), "`{fix}` missing:\n{out}");
    }
}

/// `doctor` asks the edge whether the keys agree, with a probe the edge answers without
/// touching the agent's own connection. Before, it said "All checks passed" for an
/// EDGE_PUBLIC_KEY of another edge, or an AGENT_ID the edge does not know, and the agent
/// then redialled for ever. A job running on `spark` through doctor's probes of `spark`
/// ends well on the connection it started on. And an agent that refuses the edge's welcome
/// says why in its close frame, which the edge's log now shows (it said "agent
/// disconnected", nothing more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_keys_against_the_edge_and_leaves_the_running_agent_alone() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let job = client.submit(serde_json::json!({"prompt": "@sleep=3000 through doctor"})).await;
    let job_id = job.body["job_id"].as_str().unwrap_or_else(|| panic!("{}", job.text)).to_string();
    let claude_dir = TempDir::new("doctor-probe");
    let other = Keys::new(&["spark"]);
    let setup = |agent_id: &str, edge_public: String| {
        vec![
            ("EDGE_URL", edge.ws_url()),
            ("AGENT_ID", agent_id.to_string()),
            ("AGENT_SIGNING_KEY", shared::keys::encode_signing(keys.agent("spark"))),
            ("EDGE_PUBLIC_KEY", edge_public),
            ("CLAUDE_BIN", bin("claude-standin").display().to_string()),
            ("CLAUDE_CONFIG_DIR", claude_dir.path().display().to_string()),
            ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-doctor".to_string()),
        ]
    };
    let edge_public = shared::keys::encode_verifying(&keys.edge.verifying_key());
    let (ok, out) = doctor(&setup("spark", edge_public.clone()));
    assert!(ok && out.contains("ok    keys: the edge knows agent `spark`") && out.contains("All checks passed"), "{out}");

    let (ok, out) = doctor(&setup("spark", shared::keys::encode_verifying(&other.edge.verifying_key())));
    // Refused at the challenge, which the edge signs with its own key: no probe is sent.
    assert!(!ok && out.contains("FAIL  edge key: the challenge is not signed by the key in this agent's EDGE_PUBLIC_KEY") && out.contains("keygen"), "{out}");
    assert!(!out.contains("All checks passed"), "{out}");

    let (ok, out) = doctor(&setup("spork", edge_public));
    assert!(!ok && out.contains("FAIL  agent key: the edge refuses agent `spork`") && out.contains("AGENT_PUBLIC_KEYS"), "{out}");

    // Three probes later the job ends well, run once, on spark's first connection.
    let done = client.wait_job(&job_id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(agent.claude_runs().len(), 1);
    let log = agent.log();
    assert_eq!(log.matches("connected to the edge").count(), 1, "the agent's connection was never replaced: {log}");
    assert!(edge.log().contains("keys checked by a probe"), "{}", edge.log());

    // An agent holding another edge's public key refuses the challenge; the edge says why.
    // The first goes first: a second process proving `spark` while it is heard is refused
    // before any welcome.
    drop(agent);
    assert!(eventually(Duration::from_secs(30), || edge.log().contains("agent disconnected")).await, "{}", edge.log());
    let _wrong = AgentProc::start(AgentOpts { edge_public: shared::keys::encode_verifying(&other.edge.verifying_key()), ..AgentOpts::for_edge(&edge, "spark") });
    assert!(
        eventually(Duration::from_secs(60), || edge.log().lines().any(|l| l.contains("agent disconnected before its hello") && l.contains("EDGE_PUBLIC_KEY"))).await,
        "{}",
        edge.log()
    );
}

/// `doctor` prints what `claude --version` says (a `claude` a job put on the agent's PATH,
/// or wrote over), and the usage window of the status file (a job's to write), raw to the
/// operator's terminal, as `status` did before cb1b97e: a job could set its clipboard
/// (OSC 52) or title, or print over what was shown. Each line is shown with its control
/// characters escaped.
#[test]
fn what_doctor_shows_of_outside_words_reaches_the_terminal_without_their_control_sequences() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("doctor-words");
    let claude = dir.path().join("claude");
    std::fs::write(&claude, "#!/bin/sh\nprintf '2.1.300\\033]52;c;ZXZpbA==\\007\\033[2K\\r (Claude Code)\\n'\n").unwrap();
    std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (_, out) = doctor(&[
        ("CLAUDE_BIN", claude.display().to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("CLAUDE_CONFIG_DIR", dir.path().display().to_string()),
    ]);
    assert!(out.contains("2.1.300"), "{out}");
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
}

/// `doctor` shows each line of a check's detail escaped, but a detail of several lines is
/// shown as several: the usage window's type (the status file's, a job's to write) and the
/// edge's version (what the edge says in its challenge) went in whole, so a line break in
/// them printed a line of the job's choosing as one of doctor's own ("  ok   login: …").
/// Outside words are shown on their line.
#[test]
fn doctor_shows_outside_words_on_their_own_line() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let usage = json!({"status": "rejected", "kind": "five_hour\n  ok   forged: all good", "resets_at": now + 3_600_000, "seen_at": now});
    let shown = shown_with_usage("doctor", "doctor-lines", usage);
    assert!(shown.contains("five_hour"), "{shown}");
    assert!(!shown.lines().any(|l| l.starts_with("  ok   forged")), "{shown}");
}

/// What a failing `claude --version` printed on stderr (a `claude` a job put on the agent's
/// PATH, or wrote over) went into doctor's detail whole, and doctor shows a detail of
/// several lines as several: a line break there printed a line of the job's choosing as
/// one of doctor's own ("  ok    agent key: …"), as the usage window's type did before
/// b49f464. It is shown on its line.
#[test]
fn what_a_failing_claude_prints_stays_on_doctors_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("doctor-stderr");
    let claude = dir.path().join("claude");
    std::fs::write(&claude, "#!/bin/sh\nprintf 'broken\\n  ok    forged: all good\\n' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, out) = doctor(&[
        ("CLAUDE_BIN", claude.display().to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("CLAUDE_CONFIG_DIR", dir.path().display().to_string()),
    ]);
    assert!(!ok && out.contains("broken") && out.contains("forged: all good"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("  ok    forged")), "{out}");
}

/// A command's error is printed as the process ends (`claude-runner: …`), and some carry
/// outside words: serde names the variant it did not know, raw, so a status file a job
/// wrote (the agent's user) with `"source": "\u001b]52;…"` had `status` and `agent --drain`
/// print the sequence to the operator's terminal as they refused the file. The error is
/// shown as one line with its control characters escaped.
#[test]
fn a_commands_error_reaches_the_terminal_without_the_control_sequences_it_quotes() {
    let dir = TempDir::new("error-words");
    let source = "\u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[2K\r\u{9b}2J\u{9d}0;owned\u{9c}";
    let login = json!({"source": source, "expires_at": null, "refreshable": false, "refresh_expires_at": null,
        "subscription_type": null, "auth_failed": false, "problem": null, "reported_at": 0});
    let status = json!({"agent_id": "spark", "edge": "", "pid": 1, "connected": true, "since": "", "last_error": null,
        "running": [], "updated_at": "", "login": login});
    std::fs::write(dir.path().join("status.json"), status.to_string()).unwrap();
    for args in [&["status"][..], &["status", "--check"], &["agent", "--drain"]] {
        let out = Command::new(bin("claude-runner")).args(args).env("DATA_DIR", dir.path()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("unknown variant"), "{args:?}: {err}");
        assert!(!err.trim_end_matches('\n').chars().any(char::is_control), "{args:?}: {err:?}");
    }
}

/// `AGENT_KEY_FILE` is the agent's user's (mode 600, owned by it), so a job can write it,
/// and replace it where its folder is the user's too: it was read whole and waited on, so
/// a pipe there held `doctor` (and the agent's start) for good, and a file as large as the
/// disk was read into memory. It is read bounded, never waiting on a pipe (a link is
/// followed: secret mounts are links).
#[test]
fn a_key_file_a_job_replaced_with_a_pipe_is_refused_not_waited_on() {
    let dir = TempDir::new("key-pipe");
    let key = dir.path().join("agent.key");
    let c = std::ffi::CString::new(key.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let env = vec![
        ("AGENT_KEY_FILE", key.display().to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("CLAUDE_CONFIG_DIR", dir.path().display().to_string()),
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(doctor(&env)).unwrap());
    let Ok((ok, out)) = rx.recv_timeout(Duration::from_secs(60)) else {
        // Lets the doctor still waiting on the pipe go (it reads nothing).
        let _ = std::fs::OpenOptions::new().write(true).open(&key);
        panic!("doctor waits on a pipe as AGENT_KEY_FILE");
    };
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL  agent key") && out.contains("not a plain file"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_whether_the_agent_runs_and_is_connected() {
    let keys = Keys::new(&["spark"]);
    // Heartbeats a second apart: the status file's rewrite at each is looked for below.
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[QUICK_HEARTBEATS]);
    let mut agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    Client::new(&edge.url()).wait_online().await;
    let data_dir = agent.data.path().join("data");
    let status = || {
        let out = Command::new(bin("claude-runner")).arg("status").env("DATA_DIR", &data_dir).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let check = || status_check(&data_dir);
    let mut last = (false, String::new());
    assert!(eventually(Duration::from_secs(60), || { last = status(); last.0 }).await, "{}", last.1);
    assert!(last.1.contains("connected since"), "{}", last.1);
    let (ok, out) = check();
    assert!(ok, "{out}");
    assert!(out.starts_with("healthy: agent spark is connected"), "{out}");
    // The file is rewritten at every heartbeat (1 s here), not only on changes.
    let written = || std::fs::metadata(data_dir.join("status.json")).unwrap().modified().unwrap();
    let before = written();
    assert!(eventually(Duration::from_secs(60), || written() > before).await, "status.json is refreshed by heartbeats");
    // Stopped (SIGSTOP: by hand, or by one of its jobs), it is unhealthy at once, whatever
    // its file says, and said to be stopped, with what to do; resumed, healthy again.
    let pid = agent.pid().expect("the agent runs");
    agent.signal(libc::SIGSTOP);
    let mut stopped = (true, String::new());
    assert!(eventually(Duration::from_secs(60), || { stopped = check(); !stopped.0 }).await, "{}", stopped.1);
    agent.signal(libc::SIGCONT);
    assert!(stopped.1.starts_with(&format!("unhealthy: agent spark (pid {pid}) is stopped")) && stopped.1.contains(&format!("kill -CONT {pid}")), "{}", stopped.1);
    let mut again = (false, String::new());
    assert!(eventually(Duration::from_secs(60), || { again = check(); again.0 }).await, "{}", again.1);
    agent.stop();
    let (ok, out) = status();
    assert!(!ok);
    assert!(out.contains("not running"), "{out}");
    let (ok, out) = check();
    assert!(!ok, "{out}");
    assert!(out.starts_with("unhealthy: agent spark (pid"), "{out}");
}

/// `status --check`, the container's health check, for the agent of `data_dir`: one line,
/// the verdict in the exit code.
fn status_check(data_dir: &Path) -> (bool, String) {
    let out = Command::new(bin("claude-runner")).args(["status", "--check"]).env("DATA_DIR", data_dir).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A job runs as the agent's user: it can stop the agent (SIGSTOP), move `DATA_DIR/agent.lock`
/// aside and start an agent of its own on the same DATA_DIR — the same program, connected
/// to an edge of its choosing, holding the new `agent.lock` and writing a fresh status.json
/// that names it. `status --check` still finds the stopped agent, by the agent's shared
/// lock of DATA_DIR itself (`drain::hold_folder`), which the job cannot move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_check_finds_a_stopped_agent_whose_lock_file_a_job_replaced() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[QUICK_HEARTBEATS]);
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    Client::new(&edge.url()).wait_online().await;
    let data_dir = agent.data.path().join("data");
    let pid = agent.pid().expect("the agent runs");
    let mut last = (false, String::new());
    assert!(eventually(Duration::from_secs(60), || { last = status_check(&data_dir); last.0 }).await, "{}", last.1);
    // Stopped, unhealthy; resumed, healthy again.
    let stopped = |said: &str| said.starts_with(&format!("unhealthy: agent spark (pid {pid}) is stopped")) && said.contains(&format!("kill -CONT {pid}"));
    agent.signal(libc::SIGSTOP);
    assert!(eventually(Duration::from_secs(60), || { last = status_check(&data_dir); stopped(&last.1) }).await, "{}", last.1);
    agent.signal(libc::SIGCONT);
    assert!(eventually(Duration::from_secs(60), || { last = status_check(&data_dir); last.0 }).await, "{}", last.1);

    // Stopped again, and the job's agent in its place: the lock file swapped, the status
    // file its own (connected, fresh, naming it).
    agent.signal(libc::SIGSTOP);
    assert!(eventually(Duration::from_secs(60), || { last = status_check(&data_dir); stopped(&last.1) }).await, "{}", last.1);
    std::fs::rename(data_dir.join("agent.lock"), data_dir.join("agent.lock.aside")).unwrap();
    let its_edge = EdgeServer::start(EdgeKind::Native, &keys, &[QUICK_HEARTBEATS]);
    let impostor = AgentProc::start(AgentOpts::for_edge(&its_edge, "spark").env("DATA_DIR", &data_dir.display().to_string()));
    Client::new(&its_edge.url()).wait_online().await;
    let impostor_pid = impostor.pid().expect("the job's agent runs");
    let names_the_impostor = || {
        let status: serde_json::Value = serde_json::from_slice(&std::fs::read(data_dir.join("status.json")).unwrap_or_default()).unwrap_or_default();
        status["pid"] == impostor_pid && status["connected"] == true
    };
    assert!(eventually(Duration::from_secs(60), names_the_impostor).await, "{}", impostor.log());
    let (healthy, said) = status_check(&data_dir);
    agent.signal(libc::SIGCONT);
    assert!(!healthy && stopped(&said), "a job's agent on a swapped lock file passed for the stopped one: {said}");
}

#[test]
fn status_check_without_an_agent_is_unhealthy() {
    let data = TempDir::new("status-none");
    let out = Command::new(bin("claude-runner")).args(["status", "--check"]).env("DATA_DIR", data.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("No agent has run"));
}

/// `claude-runner <command> <args>` started against `edge` with the secret, its standard
/// streams piped.
fn against_the_edge(edge: &EdgeServer, command: &str, args: &[&str]) -> std::process::Child {
    Command::new(bin("claude-runner"))
        .arg(command)
        .args(args)
        .env("CLAUDE_RUNNER_URL", edge.url())
        .env("RUNNER_SECRET", SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `submit` and `login` without the edge's URL or the secret: clap's "required arguments
/// were not provided: --edge <EDGE> --secret <SECRET>" named neither setting the README
/// uses (`CLAUDE_RUNNER_URL`, `RUNNER_SECRET`) nor where `up` keeps its secret. Each
/// missing one is named, with where to find it; the exit status is the usage error's (2).
#[test]
fn submit_and_login_without_the_edge_or_the_secret_name_the_settings() {
    for command in ["submit", "login"] {
        for (set, missing, says) in [
            (None, "CLAUDE_RUNNER_URL", "http://127.0.0.1:8787"),
            (Some(("CLAUDE_RUNNER_URL", "http://127.0.0.1:9")), "RUNNER_SECRET", "/srv/runner/up/up.json"),
        ] {
            // `up` with this DATA_DIR keeps its secret there, not in the default folder.
            let out = Command::new(bin("claude-runner"))
                .args(if command == "submit" { ["submit", "hello"] } else { ["login", "--trust-edge-url"] })
                .env_remove("CLAUDE_RUNNER_URL")
                .env_remove("RUNNER_SECRET")
                .env("DATA_DIR", "/srv/runner")
                .envs(set)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command}: {err}");
            assert!(err.contains(missing) && err.contains(says), "{command} without {missing}: {err}");
        }
    }
}

/// An edge URL without its scheme said only "builder error", and an edge that is not
/// running "error sending request for url (…)": the first says how to write it, the second
/// why the request failed (reqwest keeps that in the error's sources).
#[test]
fn submit_and_login_say_why_the_edge_cannot_be_reached() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    for command in ["submit", "login"] {
        for (url, says) in [(closed.to_string(), "http://"), (format!("http://{closed}"), "Connection refused")] {
            let out = Command::new(bin("claude-runner"))
                .args(if command == "submit" { ["submit", "hello"] } else { ["login", "--trust-edge-url"] })
                .env("CLAUDE_RUNNER_URL", &url)
                .env("RUNNER_SECRET", SECRET)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command}: {err}");
            assert!(err.contains(says), "{command} to {url}: {err}");
        }
    }
}

/// `submit` and `login` read the edge's answer whole (`reqwest`'s `json()`), however long:
/// an edge, or whatever answers at its address, that sends an answer without end had
/// `submit` (which has no time limit) hold all of it. Here the answer goes on past 8 MiB and
/// then stays open: an answer of more than the bound is refused as unreadable (exit 2)
/// rather than waited out.
#[test]
fn submit_refuses_an_edge_answer_without_end() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let edge = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = vec![0; 64 * 1024];
        let _ = conn.read(&mut request);
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n");
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
        for _ in 0..128 {
            if conn.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
        // Held open until submit lets go of it.
        let _ = conn.read(&mut request);
    });
    let out = submit_hello_to(addr, "submit still reads an answer without end");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no readable answer"), "{err}");
    edge.join().unwrap();
}

/// The bound on the edge's answer (53cbe0c) is of its bytes only: an edge, or whatever
/// answers at its address, that sends the answer's head and then nothing (or a byte now and
/// then) still had `submit`, which has no time limit, wait for good. The answer's body is
/// given a time to arrive in (30 s from its head), then refused as unreadable.
#[test]
fn submit_refuses_an_edge_answer_that_stops_coming() {
    let (code, err) = submit_to_an_edge_that_stops(b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"job_id\": ");
    assert_eq!(code, Some(2), "{err}");
    // A 2xx head: the edge took the task. Not "refused": it may be queued, and sending it
    // again without a key would run it twice.
    assert!(err.contains("no readable answer") && !err.contains("refused"), "{err}");
    assert!(err.contains("may have been queued") && err.contains("--idempotency-key"), "{err}");
}

/// A task's answer lost on the way back (the connection closed before it) left a task sent
/// without `--idempotency-key` impossible to send again safely. Every task goes with a key
/// (one made up when none is given), and an exchange that broke is sent once more under it:
/// the edge answers with the job the first one made, so the task runs once.
#[test]
fn submit_sends_a_broken_exchange_again_under_the_same_key() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let edge = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        for answer in [None, Some("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 74\r\n\r\n{\"success\":false,\"error\":\"made-up refusal\",\"error_code\":\"INVALID_REQUEST\"}")] {
            let Ok((mut conn, _)) = listener.accept() else { break };
            // The whole request: its head, then the body its length announces.
            let mut request = Vec::new();
            let mut buf = [0; 64 * 1024];
            let body = loop {
                let n = conn.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    // The test's own knock: submit sent nothing more.
                    return bodies;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                let Some(end) = text.find("\r\n\r\n") else { continue };
                let length: usize = text.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())).unwrap();
                if request.len() >= end + 4 + length {
                    break String::from_utf8_lossy(&request[end + 4..end + 4 + length]).into_owned();
                }
            };
            bodies.push(serde_json::from_str::<serde_json::Value>(&body).unwrap());
            match answer {
                // Closed with the task taken and no answer.
                None => drop(conn),
                Some(answer) => conn.write_all(answer.as_bytes()).unwrap(),
            }
        }
        bodies
    });
    let out = submit_hello_to(addr, "submit did not give up");
    // Lets the edge's thread go if submit sent the task once only.
    drop(std::net::TcpStream::connect(addr));
    let bodies = edge.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("made-up refusal"), "the second send was not made or not answered: {err}\n{bodies:?}");
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    let key = bodies[0]["idempotency_key"].as_str().expect("a key made up for the task");
    assert!(key.starts_with("submit-") && key.len() > 20, "{key}");
    assert_eq!(bodies[1]["idempotency_key"], bodies[0]["idempotency_key"]);
    assert_eq!(bodies[1]["prompt"], "hello");
}

/// Nor did anything bound the wait for the answer's head: an edge that took the task and
/// never answered held `submit` for good. The exchange is given 30 s and a time for the
/// task's upload (at 16 KiB/s), then given up as the edge not reached.
#[test]
fn submit_gives_up_on_an_edge_that_never_answers() {
    let (code, err) = submit_to_an_edge_that_stops(b"");
    assert_eq!(code, Some(2), "{err}");
    // The task went out whole: the edge may have queued it, so the error says how not to
    // run it twice rather than that the edge was not reached.
    assert!(err.contains("no answer") && err.contains("may have been queued") && err.contains("--idempotency-key"), "{err}");
}

/// A gateway between `submit` and the edge (a reverse proxy, a tunnel) that gives up on the
/// edge's answer says 502 or 504 with no answer of the edge's: the task went out and the
/// edge may have queued it. It was called refused, and sending it again ran it twice.
#[test]
fn submit_does_not_call_a_gateways_timeout_a_refusal() {
    let (code, err) = submit_to_an_edge_that_stops(b"HTTP/1.1 504 Gateway Timeout\r\ncontent-type: text/html\r\ncontent-length: 20\r\n\r\n<html>timeout</html>");
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("refused") && err.contains("504"), "{err}");
    assert!(err.contains("may have been queued") && err.contains("--idempotency-key"), "{err}");
}

/// An edge's own 5xx (the Worker's "lost this request while waiting", which says the task
/// may have been queued) was called a refusal, which reads as "nothing was queued".
#[test]
fn submit_does_not_call_an_edges_own_failure_a_refusal() {
    let body = r#"{"success":false,"error":"the edge lost this request while waiting; the task may have been queued all the same: look for it with `GET /jobs` before sending it again","error_code":"INTERNAL_ERROR"}"#;
    let answer = format!("HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let (code, err) = submit_to_an_edge_that_stops(Box::leak(answer.into_bytes().into_boxed_slice()));
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("refused") && err.contains("500") && err.contains("may have been queued"), "{err}");
}

/// An edge address that takes no connection (a firewall that drops it, a host gone: here
/// a listener whose queue is full, so its SYNs go unanswered) never got the task. `submit`
/// had no time for the connection of its own: its answer's time ran out first, and it said
/// the task may have been queued and to look for it on an edge it never reached.
#[test]
fn submit_says_an_edge_that_takes_no_connection_was_not_reached() {
    use std::os::unix::io::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // SAFETY: listen(2) again on a listening socket of this test's: its queue takes one.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let mut queued = Vec::new();
    while let Ok(conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        queued.push(conn);
        assert!(queued.len() < 100, "the listener's queue never fills");
    }
    let out = submit_hello_to(addr, "submit still waits for a connection");
    drop((listener, queued));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot reach the edge") && !err.contains("may have been queued"), "{err}");
}

/// An address that answers the task with a redirect (plain http to a host that sends
/// everything to https) did not take it: the client followed the 301 as a GET of the new
/// address, read whatever answered there (a job list) and said the task may have been
/// queued, where it surely was not; and it sent the secret wherever the redirect led.
#[test]
fn submit_says_a_redirect_did_not_take_the_task() {
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let heard = asked.clone();
    let addr = edge_that_answers(move |head, addr| {
        heard.lock().unwrap().push(head.lines().next().unwrap_or_default().to_string());
        if head.starts_with("POST") {
            format!("HTTP/1.1 301 Moved Permanently\r\nlocation: http://{addr}/elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        } else {
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"jobs\":[]}".to_string()
        }
    });
    let out = submit_hello_to(addr, "submit still waits on a redirect");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("301") && err.contains("/elsewhere") && !err.contains("may have been queued"), "{err}");
    assert_eq!(asked.lock().unwrap().len(), 1, "the redirect was followed: {:?}", asked.lock().unwrap());
}

/// The job id the edge answers with goes into the follow's path: one such as `../admin`
/// (a hostile edge, or whatever answers at its address) sent the follow, secret and all,
/// to another path of that host — another service behind the same proxy. An id no edge
/// gives (edges' ids are plain: letters, digits, `-`, `_`) is not followed.
#[test]
fn submit_follows_no_job_id_that_is_not_plain() {
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let heard = asked.clone();
    let addr = edge_that_answers(move |head, _| {
        heard.lock().unwrap().push(head.lines().next().unwrap_or_default().to_string());
        let body = r#"{"job_id":"../../admin/reset?x=","state":"queued"}"#;
        format!("HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
    });
    let out = submit_hello_with(addr, &["--follow-for", "3"], "submit still follows an id that is not plain");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("GET /jobs") && err.contains("not one an edge gives"), "{err}");
    assert_eq!(asked.lock().unwrap().len(), 1, "the id was followed: {:?}", asked.lock().unwrap());
}

/// A long job's stream may break many times (a Tunnel's cuts, edge restarts): `submit` gave
/// up after ten follows over the whole job, however much each brought, and a job still
/// running was reported as the edge lost. Only follows that bring nothing count now.
#[test]
fn submit_keeps_following_a_stream_that_breaks_often_but_answers() {
    // Each follow brings an event, then the stream breaks; the twelfth brings the result.
    let addr = edge_that_answers_follows(|n, _| {
        let events = if n < 12 {
            format!("id: {n}\nevent: progress\ndata: {{\"type\":\"system\"}}\n\n")
        } else {
            "id: 12\nevent: result\ndata: {\"success\":true,\"output\":\"done after twelve follows\"}\n\n".to_string()
        };
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{events}")
    });
    let out = submit_hello_to(addr, "submit still follows a stream that ended");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done after twelve follows", "{err}");
}

/// An edge at `addr` (returned) that answers each request with `answer(its head, addr)`, a
/// whole HTTP answer, then closes the connection.
fn edge_that_answers(mut answer: impl FnMut(&str, std::net::SocketAddr) -> String + Send + 'static) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut request = vec![0; 64 * 1024];
            let n = conn.read(&mut request).unwrap_or(0);
            let answer = answer(&String::from_utf8_lossy(&request[..n]), addr);
            let _ = conn.write_all(answer.as_bytes());
        }
    });
    addr
}

/// An edge at `addr` (returned) that takes the task as job `j1` and answers the `n`th follow
/// of its events (from 1) with `follow(n, its request's head)`, a whole HTTP answer, then
/// closes the connection.
fn edge_that_answers_follows(follow: impl Fn(u32, &str) -> String + Send + 'static) -> std::net::SocketAddr {
    let mut follows = 0;
    edge_that_answers(move |head, _| {
        if head.starts_with("POST") {
            TAKEN_AS_J1.to_string()
        } else {
            follows += 1;
            follow(follows, head)
        }
    })
}

/// The fake edges' answer to the task: taken, as job `j1`.
const TAKEN_AS_J1: &str = "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 32\r\nconnection: close\r\n\r\n{\"job_id\":\"j1\",\"state\":\"queued\"}";

/// An edge at `addr` (returned) that takes the task as job `j1` and hands each follow's
/// connection, its request read, to `follow` on a thread of its own (which may hold it).
fn edge_that_holds_follows(follow: impl Fn(std::net::TcpStream) + Send + Sync + 'static) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let follow = std::sync::Arc::new(follow);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let follow = follow.clone();
            std::thread::spawn(move || {
                let mut request = vec![0; 64 * 1024];
                let n = conn.read(&mut request).unwrap_or(0);
                if request[..n].starts_with(b"POST") {
                    let _ = conn.write_all(TAKEN_AS_J1.as_bytes());
                } else {
                    follow(conn);
                }
            });
        }
    });
    addr
}

/// An edge whose stream of a job ends at once with a comment every time (the edges' answer
/// when the job's record cannot be read: `: … retry`, then the end) brought bytes, so no
/// follow counted towards giving up, and `submit` followed it every 2 s for ever. A stream
/// that ends with no event brings nothing: given up on after `--follow-for` (3 s here).
#[test]
fn submit_gives_up_on_a_stream_that_ends_with_no_event_every_time() {
    let addr = edge_that_answers_follows(|_, _| {
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n: the edge could not read the job's record (disk); retry\n\n".into()
    });
    submit_given_up_on(addr, "3", "submit followed a stream that never brings an event for ever");
}

/// The same answer cut at once instead of ended (its body shorter than its length: a
/// network that resets the flow after the first segment, a hostile edge) was taken for a
/// stream that "broke after it answered", worth following, and `submit` followed it every
/// 2 s for ever, saying nothing. A stream that brought no event is worth following only if
/// it lasted a keep-alive interval, however it stopped.
#[test]
fn submit_gives_up_on_a_stream_that_breaks_at_once_with_no_event_every_time() {
    let addr = edge_that_answers_follows(|_, _| {
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 4096\r\nconnection: close\r\n\r\n: the edge could not read the job's record (disk); retry\n\n".into()
    });
    submit_given_up_on(addr, "3", "submit followed a stream cut at once with no event for ever");
}

/// A stream whose first bytes (a comment, no event) came at once and then nothing, not
/// even a keep-alive, until `submit` took the connection for dead (45 s of silence: an
/// edge whose stream is wedged, a path that lets the head and first segment through and
/// then drops the flow) was counted as one that "stayed open a keep-alive interval", worth
/// following: each follow reset the budget, and `submit` held for ever, never saying the
/// edge was lost. Silence is no sign of life: such a follow brings nothing. (About 20 s:
/// the budget and a keep-alive window.)
#[test]
fn submit_gives_up_on_a_stream_that_goes_silent_after_its_first_bytes_every_time() {
    use std::io::{Read, Write};
    let addr = edge_that_holds_follows(|mut conn| {
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n: hello\n\n");
        // Held open and silent until submit lets go.
        while conn.read(&mut [0; 1024]).is_ok_and(|n| n > 0) {}
    });
    let err = submit_given_up_on(addr, "3", "submit followed a stream silent after its first bytes for ever");
    assert!(err.contains("nothing from it for 3 s"), "{err}");
}

/// The follow under way when `--follow-for` ran out was let finish before `submit` asked
/// whether to give up: a stream silent after its first bytes was held until taken for dead
/// (45 s without a byte), so `submit` gave up some 40 s past a 5 s budget; here the edge
/// let go first (at 40 s), the end counted as a sign of life, and `submit` followed on. It
/// is cut once the budget and a keep-alive window (20 s) have passed with nothing, while
/// the edge still holds it open. (About 20 s.)
#[test]
fn submit_gives_up_on_a_silent_stream_while_it_is_still_open() {
    // Below submit's 45 s for a dead stream: the old rule waited the silence out, and the
    // edge ended the stream first.
    let (err, end) = submit_given_up_on_a_held_follow(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n: hello\n\n", 40);
    assert_eq!(end, HeldFollow::LetGoBySubmit, "the stream was not cut while open: {err}");
}

/// The same with a follow whose answer does not come (an edge restarting behind a proxy
/// that holds the request): it was given its 30 s for an answer past the budget; it is cut
/// as the budget ends.
#[test]
fn submit_gives_up_on_a_follow_with_no_answer_while_it_waits() {
    // Below submit's 30 s for a follow's answer.
    let (err, end) = submit_given_up_on_a_held_follow(b"", 25);
    assert_eq!(end, HeldFollow::LetGoBySubmit, "the follow was not cut while it waited: {err}");
}

/// `submit` stopped while it follows (Ctrl-Z, `docker pause`, a frozen cgroup, a starved
/// machine) past `--follow-for` and a keep-alive window: the cut, due while it was stopped,
/// fired the moment it ran again, before the result the edge sent meanwhile (waiting in
/// its socket) was read, and it gave up ("lost the edge … nothing from it") with the result
/// there (since 79c88ec; before, the stream was read on). A cut that fires long after it
/// was due is no silence `submit` saw: what came meanwhile is read first. (About 30 s.)
#[test]
fn submit_stopped_past_its_budget_reads_the_result_that_came_meanwhile() {
    use std::io::{Read, Write};
    let (headed, head_sent) = std::sync::mpsc::channel();
    let (resume, stopped) = std::sync::mpsc::channel::<()>();
    let stopped = std::sync::Mutex::new(Some(stopped));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut request = vec![0; 64 * 1024];
            let n = conn.read(&mut request).unwrap_or(0);
            if request[..n].starts_with(b"POST") {
                let body = r#"{"job_id":"j1","state":"queued"}"#;
                let _ = write!(conn, "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                continue;
            }
            let Some(stopped) = stopped.lock().unwrap().take() else {
                let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                continue;
            };
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n: hello\n\n");
            let _ = headed.send(());
            // The result comes while submit is stopped; the stream stays open.
            let _ = stopped.recv();
            let _ = conn.write_all(b"id: 1\nevent: result\ndata: {\"success\":true,\"output\":\"came while stopped\"}\n\n");
            std::thread::spawn(move || {
                let mut rest = [0; 1024];
                while conn.read(&mut rest).is_ok_and(|n| n > 0) {}
            });
        }
    });
    let submit = Command::new(bin("claude-runner"))
        .env("RUNNER_SECRET", SECRET)
        .args(["submit", "--edge", &format!("http://{addr}"), "--follow-for", "1s", "hello"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = submit.id() as libc::pid_t;
    head_sent.recv_timeout(Duration::from_secs(60)).expect("submit never followed");
    // Its head read (a moment), then stopped past the budget and the keep-alive window (20 s).
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signals to the child this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    resume.send(()).unwrap();
    std::thread::sleep(Duration::from_secs(30));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(submit.wait_with_output().unwrap()).unwrap());
    let Ok(out) = rx.recv_timeout(Duration::from_secs(120)) else {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("submit held a result for ever");
    };
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("came while stopped"), "{stdout}");
}

/// How the first follow of [`submit_given_up_on_a_held_follow`] ended.
#[derive(Debug, PartialEq)]
enum HeldFollow {
    Open,
    LetGoBySubmit,
    EndedByTheEdge,
}

/// `submit --follow-for 5s` against an edge that answers the first follow with `first`
/// (the start of an answer, or nothing) and then holds it silent for `hold_s` seconds or
/// until `submit` lets go, whichever comes first, and every later follow with a 502: what
/// `submit` said giving up, and how that first follow ended.
fn submit_given_up_on_a_held_follow(first: &'static [u8], hold_s: u64) -> (String, HeldFollow) {
    use std::io::{Read, Write};
    let held = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = held.clone();
    let addr = edge_that_holds_follows(move |mut conn| {
        // Only the first follow is held (a later one would write over how it ended).
        {
            let mut first_follow = seen.lock().unwrap();
            if first_follow.is_some() {
                let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                return;
            }
            *first_follow = Some(HeldFollow::Open);
        }
        let _ = conn.write_all(first);
        conn.set_read_timeout(Some(Duration::from_secs(hold_s))).unwrap();
        let end = loop {
            match conn.read(&mut [0; 1024]) {
                Ok(0) => break HeldFollow::LetGoBySubmit,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break HeldFollow::EndedByTheEdge,
                Err(_) => break HeldFollow::LetGoBySubmit,
            }
        };
        *seen.lock().unwrap() = Some(end);
    });
    let err = submit_given_up_on(addr, "5s", "submit followed an edge that holds its follow for ever");
    assert!(err.contains("nothing from it for 5 s"), "{err}");
    // The edge's thread sees the end a moment after submit's.
    for _ in 0..100 {
        if held.lock().unwrap().as_ref() != Some(&HeldFollow::Open) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = held.lock().unwrap().take().expect("never followed");
    (err, end)
}

/// `submit --follow-for <follow_for>` against the edge at `addr` (job `j1`), which never
/// answers a follow with anything that counts: it gives up (exit 2), saying it lost the edge
/// and where to read the job. What it said on stderr, for the test's own checks.
fn submit_given_up_on(addr: std::net::SocketAddr, follow_for: &str, stuck: &str) -> String {
    let out = submit_hello_with(addr, &["--follow-for", follow_for], stuck);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("lost the edge while following job j1") && err.contains("GET /jobs/j1"), "{err}");
    err
}

/// A result event that is not JSON was passed over, the stream ended, and the edge (which
/// answers a finished job's follow with its result) gave the same again: `submit` followed
/// it for ever. It now says the result could not be read, and where to read it.
#[test]
fn submit_says_an_unreadable_result_was_sent_and_stops() {
    let addr = edge_that_answers_follows(|_, _| {
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nevent: result\ndata: {\"success\":tr\n\n".into()
    });
    let out = submit_hello_to(addr, "submit followed an edge that sends an unreadable result for ever");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("result") && err.contains("GET /jobs/j1"), "{err}");
}

/// An edge whose every follow ends at once after an event no edge sends (its data not
/// JSON: garbage, a page that happens to hold `data:` lines) brought "an event", so each
/// follow reset `--follow-for` and `submit` followed it every second for ever, saying
/// nothing. An event `submit` cannot read brings nothing.
#[test]
fn submit_gives_up_on_a_stream_of_unreadable_events_every_time() {
    let addr = edge_that_answers_follows(|n, _| {
        format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nid: {n}\nevent: progress\ndata: <html>garbage\n\n")
    });
    let err = submit_given_up_on(addr, "3", "submit followed an edge that sends only unreadable events for ever");
    assert!(err.contains("nothing from it for 3 s"), "{err}");
}

/// An event's empty `id:` clears the id to resume from (as a browser's EventSource does):
/// `submit` kept the empty text and sent `Last-Event-ID:` with nothing in it, which the
/// edges refuse (400: not an id the stream sends), and gave up on the job.
#[test]
fn submit_follows_again_from_the_start_after_an_empty_id() {
    let addr = edge_that_answers_follows(|n, head| match n {
        1 => "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nid: 3\nevent: progress\ndata: {}\n\nid:\nevent: progress\ndata: {}\n\n".into(),
        _ if head.to_ascii_lowercase().contains("last-event-id") => {
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
        }
        _ => "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nevent: result\ndata: {\"success\":true,\"output\":\"done from the start\"}\n\n".into(),
    });
    let out = submit_hello_to(addr, "submit did not end after an empty id then the result");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done from the start", "{err}");
}

/// A block with an `id:` and no data is no event, but the spec keeps its id as the last
/// one: `submit` dropped it with the block and followed again from the event before (the
/// progress between shown twice). The follow after it carries that id.
#[test]
fn submit_follows_again_from_an_id_without_data() {
    let addr = edge_that_answers_follows(|n, head| match n {
        1 => "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nid: 3\nevent: progress\ndata: {}\n\nid: 7\n\n".into(),
        _ if head.to_ascii_lowercase().contains("last-event-id: 7\r\n") => {
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nevent: result\ndata: {\"success\":true,\"output\":\"done from 7\"}\n\n".into()
        }
        _ => "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into(),
    });
    let out = submit_hello_to(addr, "submit did not end after an id without data then the result");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done from 7", "{err}");
}

/// An edge restarted behind a proxy (a Cloudflare Tunnel's 502 while the native edge comes
/// back, a Worker's 503) answered a follow with a 5xx, and `submit` gave up on a job that
/// ran on: a 5xx is a follow that brought nothing, followed again as a refused connection is.
#[test]
fn submit_follows_again_after_a_5xx_on_its_follow() {
    let addr = edge_that_answers_follows(|n, _| match n {
        1 => "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into(),
        _ => "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nevent: result\ndata: {\"success\":true,\"output\":\"done after a 502\"}\n\n".into(),
    });
    let out = submit_hello_to(addr, "submit did not end after a 502 then the result");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done after a 502", "{err}");
}

/// An edge that has too many followers for a moment answers a follow 429 (on a Worker, a
/// follower gone away is counted until an event is sent to it): `submit` gave up at once
/// on a job that ran well, saying to read it later.
#[test]
fn submit_follows_again_after_a_429_on_its_follow() {
    let addr = edge_that_answers_follows(|n, _| {
        if n < 3 {
            let body = r#"{"success":false,"error":"16 streams already follow job j1","error_code":"RUNNER_BUSY"}"#;
            format!("HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
        } else {
            let events = "id: 1\nevent: result\ndata: {\"success\":true,\"output\":\"done after two 429s\"}\n\n";
            format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{events}")
        }
    });
    let out = submit_hello_to(addr, "submit still follows after 429s");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done after two 429s", "{err}");
}

/// An edge that stays away (here its follows are answered 502, as a Tunnel does while the
/// edge behind it is down): `submit` followed it ten times 2 s apart, then gave up, saying
/// nothing in between; an edge restart of more than some 20 s lost it its job. It now
/// follows again further and further apart for `--follow-for` (10 min unless set; 3 s
/// here), says once that it lost the edge, and gives up saying how to wait longer.
#[test]
fn submit_gives_up_after_follow_for_on_an_edge_that_stays_away() {
    let follows = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = follows.clone();
    let addr = edge_that_answers_follows(move |n, _| {
        counted.store(n, std::sync::atomic::Ordering::SeqCst);
        "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
    });
    let err = submit_given_up_on(addr, "3s", "submit followed an edge away for good past --follow-for");
    assert!(err.contains("nothing from it for 3 s") && err.contains("--follow-for"), "{err}");
    assert!(follows.load(std::sync::atomic::Ordering::SeqCst) >= 2, "never followed again: {err}");
    let lost: Vec<&str> = err.lines().filter(|l| l.starts_with("· lost the edge")).collect();
    assert_eq!(lost, ["· lost the edge (502 Bad Gateway); following job j1 again…"], "{err}");
    // The same, from the environment; and a time that is none is refused, saying how to write one.
    let out = Command::new(bin("claude-runner"))
        .env("RUNNER_SECRET", SECRET)
        .args(["submit", "--edge", &format!("http://{addr}"), "hello"])
        .env("CLAUDE_RUNNER_FOLLOW_FOR", "ten minutes")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ten minutes") && err.contains("10m"), "{err}");
}

/// `submit hello` against an edge that reads the request, writes `answer`, then holds the
/// connection open and silent until `submit` lets go of it: `submit`'s exit code and stderr.
fn submit_to_an_edge_that_stops(answer: &'static [u8]) -> (Option<i32>, String) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let edge = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = vec![0; 64 * 1024];
        let _ = conn.read(&mut request);
        let _ = conn.write_all(answer);
        while conn.read(&mut request).is_ok_and(|n| n > 0) {}
    });
    let out = submit_hello_to(addr, "submit still waits on an edge that stopped answering");
    edge.join().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `submit hello` to the edge at `addr`, given two minutes to give up by itself (killed and
/// `stuck` said if it does not).
fn submit_hello_to(addr: std::net::SocketAddr, stuck: &str) -> std::process::Output {
    submit_hello_with(addr, &[], stuck)
}

/// [`submit_hello_to`] with more of `submit`'s options (`args`).
fn submit_hello_with(addr: std::net::SocketAddr, args: &[&str], stuck: &str) -> std::process::Output {
    let child = Command::new(bin("claude-runner"))
        .env("RUNNER_SECRET", SECRET)
        .args(["submit", "--edge", &format!("http://{addr}"), "hello"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()).unwrap());
    let Ok(out) = rx.recv_timeout(Duration::from_secs(120)) else {
        // SAFETY: kill of the child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("{stuck}");
    };
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_shows_progress_and_prints_the_result() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let _agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    Client::new(&edge.url()).wait_online().await;
    let submit = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = against_the_edge(&edge, "submit", args);
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, out, err) = submit(&["@sleep=500 hello there", "--model", "claude-test"], "");
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(out.trim(), "stand-in answer to: @sleep=500 hello there");
    assert!(err.contains("· job "), "{err}");
    assert!(err.contains("· session ") && err.contains("(stand-in)"), "progress was shown: {err}");

    // The prompt from stdin, the result as JSON.
    let (code, out, _) = submit(&["-", "--json", "--quiet"], "from stdin");
    assert_eq!(code, Some(0));
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["output"], "stand-in answer to: from stdin");
    // As JSON, the job's words carry DEL and the C1 control characters escaped too (JSON
    // escapes only those below 0x20; U+009B is CSI to a terminal): the same JSON.
    let (code, out, _) = submit(&["-", "--json", "--quiet"], "from stdin\u{9b}2J\u{9d}0;owned\u{9c}");
    assert_eq!(code, Some(0));
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(result["output"], "stand-in answer to: from stdin\u{9b}2J\u{9d}0;owned\u{9c}");

    let (code, _, err) = submit(&["@is_error"], "");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("CLAUDE_ERROR"), "{err}");

    let wrong = Command::new(bin("claude-runner")).args(["submit", "x"]).env("CLAUDE_RUNNER_URL", edge.url()).env("RUNNER_SECRET", "wrong").output().unwrap();
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{err}");
    assert!(err.contains("403"), "{err}");
}

#[test]
fn empty_settings_count_as_unset() {
    // As an .env file or a systemd EnvironmentFile leaves them: `CLAUDE_MODEL=`.
    let claude_dir = TempDir::new("empty-settings");
    let out = Command::new(bin("claude-runner"))
        .arg("oauth-status")
        .env("HOME", claude_dir.path())
        .env("CLAUDE_CONFIG_DIR", "")
        .env("CLAUDE_MODEL", "")
        .env("DATA_DIR", "")
        .env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-empty-settings")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("oauth_token_env"), "{text}");
}

/// A blank setting is unset and every setting is read trimmed, as `.env.example` says and
/// the edges read theirs: `DATA_DIR=' '` (a space an env file or a systemd
/// `EnvironmentFile` kept) was a folder named ` ` of the working directory, for `status`
/// and the agent alike, and `MAX_CONCURRENT_JOBS=' 2'` stopped the agent's start.
#[test]
fn a_blank_data_dir_is_unset_for_status() {
    let home = TempDir::new("blank-data-dir-status");
    let out = Command::new(bin("claude-runner"))
        .arg("status")
        .current_dir(home.path())
        .env("HOME", home.path())
        .env("DATA_DIR", " ")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let default = home.path().join(".local/share/claude-runner");
    assert!(text.contains(&format!("DATA_DIR={} ", default.display())), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reads_its_settings_trimmed_and_a_blank_data_dir_as_unset() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let cwd = TempDir::new("blank-data-dir-agent");
    let home = cwd.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    // In a folder of its own (`env -C`), where a folder named ` ` would show.
    let mut opts = AgentOpts::for_edge(&edge, "spark").env("DATA_DIR", " ").env("HOME", &home.display().to_string());
    opts = opts.env("MAX_CONCURRENT_JOBS", " 2 ").env("AGENT_LABELS", " model=opus ");
    opts.wrapper = vec!["env".into(), "-C".into(), cwd.path().display().to_string()];
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    assert!(
        eventually(Duration::from_secs(60), || home.join(".local/share/claude-runner/status.json").exists()).await,
        "the agent keeps its status in HOME's default DATA_DIR: {}",
        agent.log()
    );
    client.wait_online().await;
    assert!(!cwd.path().join(" ").exists(), "a folder named ` ` was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_runs_a_job_through_the_cli_and_fails_one_that_changed_its_output() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let dir = TempDir::new("canary");
    let log = dir.path().join("standin.log");
    let mut env = vec![
        ("EDGE_URL", edge.ws_url()),
        ("AGENT_ID", "spark".to_string()),
        ("AGENT_SIGNING_KEY", shared::keys::encode_signing(keys.agent("spark"))),
        ("EDGE_PUBLIC_KEY", shared::keys::encode_verifying(&keys.edge.verifying_key())),
        ("CLAUDE_BIN", bin("claude-standin").display().to_string()),
        ("CLAUDE_CONFIG_DIR", dir.path().join("claude").display().to_string()),
        ("DATA_DIR", dir.path().join("data").display().to_string()),
        ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-canary".to_string()),
        ("STANDIN_LOG", log.display().to_string()),
        // Claude gets an allow-listed environment; the stand-in's log is the test's.
        ("JOB_ENV_ALLOW", "STANDIN_LOG".to_string()),
    ];
    let (ok, out) = doctor_with(&["--canary"], &env);
    assert!(ok, "{out}");
    assert!(out.contains("ok    canary: a job ran end to end"), "{out}");
    // It went through the job runner: Claude got a job's command line, in a workspace.
    let run: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&log).unwrap().lines().next().unwrap()).unwrap();
    assert!(run["argv"].as_array().unwrap().iter().any(|a| a == "stream-json"), "{run}");
    assert!(run["argv"].as_array().unwrap().iter().any(|a| a == "--max-turns=1"), "{run}");
    assert!(run["cwd"].as_str().unwrap().contains("/workspaces/canary-"), "{run}");
    assert!(run["prompt"].as_str().unwrap().contains("health check"), "{run}");

    // A CLI whose output is no longer stream-json (as a breaking release might print).
    let changed = dir.path().join("claude-changed");
    std::fs::write(&changed, "#!/bin/sh\ncat >/dev/null\necho 'Hello! Here is your answer: ok'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&changed, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.retain(|(k, _)| *k != "CLAUDE_BIN");
    env.push(("CLAUDE_BIN", changed.display().to_string()));
    let (ok, out) = doctor_with(&["--canary"], &env);
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL  canary: no `system`/`init` line"), "{out}");
    assert!(out.contains("go back to the last version that passed"), "{out}");
}

fn oauth_status(claude_dir: &std::path::Path, data_dir: &std::path::Path, token: Option<&str>) -> (i32, serde_json::Value, String) {
    let mut cmd = Command::new(bin("claude-runner"));
    cmd.arg("oauth-status")
        .env("CLAUDE_CONFIG_DIR", claude_dir)
        .env("DATA_DIR", data_dir)
        .env_remove("ANTHROPIC_API_KEY")
        .env("CLAUDE_CODE_OAUTH_TOKEN", token.unwrap_or(""));
    let out = cmd.output().unwrap();
    let status = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `oauth-status` prints its reading as JSON, with the usage window of the status file (a
/// job's to write, as the agent's user) in it. JSON escapes the control characters below
/// 0x20, not DEL nor the C1 ones (U+0080-U+009F: U+009B is CSI, U+009D OSC), which
/// terminals act on as on their ESC forms: a job could clear the operator's screen or set
/// its title when the operator looked. They are escaped too (`\u009b`: the same JSON).
#[test]
fn oauth_status_shows_the_status_files_words_without_their_control_sequences() {
    let kind = "five_hour\u{9b}2J\u{9d}0;owned\u{9c}\u{7f}";
    // Seen now: a window still used up, which the agent takes over as it starts.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let shown = oauth_status_with_usage("oauth-words", json!({"status": "rejected", "kind": kind, "resets_at": 4_000_000_000_000u64, "seen_at": now}));
    assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
    let read: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(read["usage"]["type"], kind, "{shown}");
}

/// The usage window `oauth-status` (and `doctor`) show from the running agent's status
/// file is read back as the agent reads it at a restart (`UsageWindow::read_back`): the file
/// is a job's to write, and a window "seen" in the year 33000, or a type of 100 kB, is
/// shown as the agent would hold it — blocking at most five hours from now, its type cut.
#[test]
fn oauth_status_shows_the_status_files_usage_window_as_the_agent_reads_it_back() {
    let far = 1_000_000_000_000_000u64;
    let usage = json!({"status": "rejected", "kind": "x".repeat(100_000), "resets_at": far, "seen_at": far});
    let shown = oauth_status_with_usage("oauth-window", usage);
    let read: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert!(read["usage"]["type"].as_str().unwrap().len() <= 64, "{}", &shown[..shown.len().min(300)]);
    let resets = read["usage"]["resets_at"].as_str().unwrap();
    assert!(resets.starts_with("20"), "shown as blocking until {resets}");
}

/// What `claude-runner oauth-status` prints while a running agent's status file (written
/// here, as a job could) holds `usage` as its login's usage window.
fn oauth_status_with_usage(name: &str, usage: serde_json::Value) -> String {
    shown_with_usage("oauth-status", name, usage)
}

/// What `claude-runner <command>` prints while a running agent's status file holds `usage`
/// as its login's usage window: written here first, as a job could (the agent's user can),
/// then taken over by the agent as it starts (read back) and kept in its own — a file the
/// command takes as a live agent's only when the agent is (`status::live_agent`: this
/// program, holding DATA_DIR's locks; a planted file naming a look-alike is not).
fn shown_with_usage(command: &str, name: &str, usage: serde_json::Value) -> String {
    let dir = TempDir::new(name);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let login = json!({"source": "none", "expires_at": null, "refreshable": false, "refresh_expires_at": null,
        "subscription_type": null, "auth_failed": false, "problem": null, "reported_at": 0, "usage": usage});
    let planted = json!({"agent_id": "spark", "edge": "", "pid": 0, "connected": false, "since": "", "last_error": null,
        "running": [], "updated_at": "", "login": login});
    std::fs::write(data.join("status.json"), planted.to_string()).unwrap();
    // An agent of the folder, its edge away (nothing listens on port 9 here: it retries).
    let keys = Keys::new(&["spark"]);
    let opts = AgentOpts {
        id: "spark",
        key: keys.agent("spark").clone(),
        edge_public: shared::keys::encode_verifying(&keys.edge.verifying_key()),
        edge_ws: "ws://127.0.0.1:9".into(),
        claude_bin: bin("claude-standin"),
        extra_env: Vec::new(),
        wrapper: Vec::new(),
    };
    let mut agent = AgentProc::start(opts.env("DATA_DIR", data.to_str().unwrap()));
    let taken_over = || {
        let status: serde_json::Value = std::fs::read(data.join("status.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        status["pid"] != 0 && status["login"]["usage"].is_object()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !taken_over() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(taken_over(), "the agent did not take the usage window over into its status file: {}", agent.log());
    let out = Command::new(bin("claude-runner"))
        .arg(command)
        .env_remove("EDGE_URL")
        .env_remove("AGENT_SIGNING_KEY")
        .env_remove("EDGE_PUBLIC_KEY")
        .env("CLAUDE_CONFIG_DIR", dir.path())
        .env("DATA_DIR", &data)
        .env_remove("ANTHROPIC_API_KEY")
        .env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-test-token-not-real-0123456789")
        .output()
        .unwrap();
    agent.kill();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn oauth_status_shows_every_credential_state_with_what_to_do() {
    let claude = TempDir::new("oauth-states");
    let data = TempDir::new("oauth-states-data");
    let creds = claude.path().join(".credentials.json");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let h = 3_600_000u64;
    let file = |access_at: u64, refresh: bool, refresh_at: Option<u64>| {
        let mut entry = json!({"accessToken": "sk-ant-oat01-state", "expiresAt": access_at, "scopes": ["user:inference"], "subscriptionType": "pro"});
        if refresh {
            entry["refreshToken"] = json!("sk-ant-ort01-state");
        }
        if let Some(t) = refresh_at {
            entry["refreshTokenExpiresAt"] = json!(t);
        }
        std::fs::write(&creds, json!({"claudeAiOauth": entry}).to_string()).unwrap();
    };
    // (credentials, token env) → (exit code, needs_login, source, next step mentions)
    let cases: Vec<(Box<dyn Fn()>, Option<&str>, i32, bool, &str, Option<&str>)> = vec![
        (Box::new(|| {}), None, 1, true, "none", Some("not logged in")),
        (Box::new(|| {}), Some("sk-ant-oat01-env"), 0, false, "oauth_token_env", None),
        (Box::new(|| file(now + 8 * h, true, None)), None, 0, false, "credentials_file", None),
        (Box::new(|| file(now - h, true, None)), None, 0, false, "credentials_file", None),
        (Box::new(|| file(now + h, false, None)), None, 0, false, "credentials_file", Some("ends soon")),
        (Box::new(|| file(now - h, false, None)), None, 1, true, "credentials_file", Some("can no longer be refreshed")),
        (Box::new(|| file(now + 8 * h, true, Some(now + 2 * h))), None, 0, false, "credentials_file", Some("ends soon")),
        (Box::new(|| file(now - h, true, Some(now - 1))), None, 1, true, "credentials_file", Some("can no longer be refreshed")),
        (Box::new(|| std::fs::write(&creds, "{not json").unwrap()), None, 1, true, "none", Some("not logged in")),
    ];
    for (i, (prepare, token, code, needs_login, source, next)) in cases.into_iter().enumerate() {
        let _ = std::fs::remove_file(&creds);
        prepare();
        let (exit, status, stderr) = oauth_status(claude.path(), data.path(), token);
        assert_eq!(exit, code, "case {i}: {status} {stderr}");
        assert_eq!(status["needs_login"], needs_login, "case {i}: {status}");
        assert_eq!(status["source"], source, "case {i}: {status}");
        match next {
            Some(words) => {
                assert!(status["next_step"].as_str().unwrap_or("").contains(words), "case {i}: {status}");
                assert!(stderr.contains("Next:") && stderr.contains("claude-runner login"), "case {i}: {stderr}");
            }
            None => assert!(status.get("next_step").is_none(), "case {i}: {status}"),
        }
        assert!(!status.to_string().contains("sk-ant"), "no token printed: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_status_and_doctor_show_the_running_agents_usage_window() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let a = client.execute(json!({"prompt": "@rate_limited=3600"})).await;
    assert_eq!(a.body["error_code"], "USAGE_LIMIT", "{}", a.text);
    let claude_dir = agent.data.path().join("claude-config");
    let data_dir = agent.data.path().join("data");
    // The status file is rewritten when the report goes out (in the background: up to 60 s).
    let mut seen = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let (_, status, _) = oauth_status(&claude_dir, &data_dir, Some("sk-ant-oat01-test-token-not-real-0123456789"));
        if status["usage"]["status"] == "rejected" {
            seen = status;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen["usage"]["type"], "five_hour", "{seen}");
    assert!(seen["next_step"].as_str().unwrap().contains("usage window is used up"), "{seen}");
    let (_, out) = doctor(&[
        ("CLAUDE_CONFIG_DIR", claude_dir.display().to_string()),
        ("DATA_DIR", data_dir.display().to_string()),
        ("CLAUDE_BIN", bin("claude-standin").display().to_string()),
        ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-test-token-not-real-0123456789".to_string()),
    ]);
    assert!(out.contains("warn  usage") && out.contains("used up until"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_from_a_terminal_relays_the_url_and_the_code() {
    use std::io::Write;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark").env("CLAUDE_CODE_OAUTH_TOKEN", ""));
    let client = Client::new(&edge.url());
    client.wait_needs_login().await;
    // With the agent's public key, as the edge has it: the URL is shown only under the
    // agent's own signature, which came through the edge untouched.
    let agent_keys = keys.agent_public_keys();
    let mut child = against_the_edge(&edge, "login", &["--agent-public-keys", &agent_keys]);
    // The URL comes on stdout; then the code goes in.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut url = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut url).unwrap();
    assert!(url.trim().starts_with("https://claude.ai/oauth/authorize?"), "{url}");
    child.stdin.take().unwrap().write_all(b"good-terminal-code\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Logged in") && err.contains("credentials_file"), "{err}");
    assert!(err.contains("signed by agent spark's key") && !err.contains("trusted from the edge"), "{err}");
    client.wait_online().await;
    assert!(agent.data.path().join("claude-config/.credentials.json").exists());
    // Without a reachable edge it says so (exit 2).
    let nobody = closed_port();
    let out = Command::new(bin("claude-runner"))
        .args(["login", "--trust-edge-url"])
        .env("CLAUDE_RUNNER_URL", format!("http://127.0.0.1:{}", nobody.port))
        .env("RUNNER_SECRET", SECRET)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the edge"));
}

/// `echo | claude-runner login`: the login is started on the runner and no code comes
/// (an empty line, as Ctrl-C or a closed page leave it too). Nothing on the runner changed,
/// so work goes on: `/health` says the agent takes work and an `/execute` runs at once —
/// before, both said healthy while every `/execute` waited its whole `timeout_ms` for the
/// ten minutes the relay waited for its code, and ended TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_given_no_code_holds_no_work() {
    use std::io::Write;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let _agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let agent_keys = keys.agent_public_keys();
    let mut child = against_the_edge(&edge, "login", &["--agent-public-keys", &agent_keys]);
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no code given") && err.contains("work goes on"), "{err}");
    // The relay waits for its code on the edge, and holds nothing.
    let h = client.health_full().await;
    assert_eq!((h.status, &h.body["status"], &h.body["agents_taking_work"]), (200, &json!("healthy"), &json!(1)), "{}", h.text);
    let a = client.execute(json!({"prompt": "while a login waits for a code nobody sends", "timeout_ms": 60_000})).await;
    assert_eq!((a.status, &a.body["success"]), (200, &json!(true)), "{}", a.text);
    // Asked again, the edge shows the same login, still waiting for its code.
    let again = client.send("POST", "/oauth/login", Some(SECRET), None).await;
    assert_eq!((again.status, &again.body["state"]), (200, &json!("awaiting_code")), "{}", again.text);
}

/// How a follow of `submit`'s breaks mid-job (between the proxy's `submit` side and the edge).
#[derive(Clone, Copy)]
enum Break {
    /// Every connection is reset: the stream ends with an error at once.
    Reset,
    /// Nothing more comes down any live connection, and no end either: a half-open
    /// connection, as when the edge's host died or a NAT dropped the flow.
    Silence,
}

/// `submit` through a proxy to the native edge, its follow of the job broken (`how`) while
/// Claude waits: `submit` follows again from the last event it read (`Last-Event-ID`), so
/// every progress line shows once, and the result comes. Before, a broken follow began
/// again from the stream's start (each line shown again), and a silent one held `submit`
/// for good. Both: submit's stderr and stdout.
async fn submit_through_a_break(how: Break) -> (String, String) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let _agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    Client::new(&edge.url()).wait_online().await;
    let port: u16 = edge.url().rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let proxy = harness::proxy::Proxy::start(port).await;
    let dir = TempDir::new("submit-break");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let prompt = format!("@await={} @await={} through a break", one.display(), two.display());
    let submit = Submitting::start(&["--edge", &format!("http://127.0.0.1:{}", proxy.port()), &prompt]);
    assert!(eventually(Duration::from_secs(60), submit.shown(format!("waiting for {}", one.display()))).await, "{}", submit.said());
    let before = proxy.accepted();
    match how {
        Break::Reset => assert!(proxy.reset() > 0),
        Break::Silence => assert!(proxy.blackhole(harness::proxy::Direction::Down) > 0),
    }
    // Claude goes on while submit is cut off; what it says then is read after the break.
    std::fs::write(&one, "").unwrap();
    assert!(eventually(Duration::from_secs(120), || proxy.accepted() > before).await, "submit never followed again: {}", submit.said());
    assert!(eventually(Duration::from_secs(60), submit.shown(format!("waiting for {}", two.display()))).await, "{}", submit.said());
    std::fs::write(&two, "").unwrap();
    let (status, stdout, err) = submit.end(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}\n{err}");
    (err, stdout)
}

/// `claude-runner submit <args>` with the test secret, what it says on stderr read line by
/// line as it comes, so a test can wait for a line and then act (break the network, stop
/// the edge).
struct Submitting {
    child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Submitting {
    fn start(args: &[&str]) -> Submitting {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(bin("claude-runner"))
            .env("RUNNER_SECRET", SECRET)
            .arg("submit")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let seen = lines.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                seen.lock().unwrap().push(line);
            }
        });
        Submitting { child, lines, reader }
    }

    /// Whether a line said so far contains `what` (for [`eventually`]).
    fn shown(&self, what: String) -> impl Fn() -> bool {
        let lines = self.lines.clone();
        move || lines.lock().unwrap().iter().any(|l| l.contains(&what))
    }

    /// What it said so far, one line each.
    fn said(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Its end, waited for up to `within`: how it exited, its stdout, and all it said.
    async fn end(mut self, within: Duration) -> (std::process::ExitStatus, String, String) {
        let mut stdout = String::new();
        let read = async {
            use tokio::io::AsyncReadExt;
            self.child.stdout.take().unwrap().read_to_string(&mut stdout).await.unwrap();
            self.child.wait().await.unwrap()
        };
        let status = tokio::time::timeout(within, read).await.expect("submit ended");
        self.reader.await.unwrap();
        let said = self.lines.lock().unwrap().join("\n");
        (status, stdout, said)
    }
}

fn each_progress_line_once(err: &str, stdout: &str) {
    assert!(stdout.trim().starts_with("stand-in answer to: @await=") && stdout.trim().ends_with("through a break"), "{stdout}");
    let lines: Vec<&str> = err.lines().collect();
    for line in &lines {
        assert_eq!(lines.iter().filter(|l| *l == line).count(), 1, "shown more than once: {line:?}\n{err}");
    }
    assert!(err.contains("· session "), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follows_a_broken_stream_again_from_its_last_event() {
    let (err, out) = submit_through_a_break(Break::Reset).await;
    each_progress_line_once(&err, &out);
}

/// The silence is waited out for three keep-alive intervals (45 s) before `submit` follows
/// again: this test takes about a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follows_a_silent_stream_again_from_its_last_event() {
    let (err, out) = submit_through_a_break(Break::Silence).await;
    each_progress_line_once(&err, &out);
}

/// The edge restarts while `submit` follows a running job (stopped, away a while, started
/// again on its port and storage): `submit` says once that it lost the edge, follows again
/// further and further apart (no line a try), says once the edge is back, reads on from
/// its last event and prints the result. Before, it gave up after ten follows 2 s apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_rides_through_an_edge_restart() {
    let keys = Keys::new(&["spark"]);
    // The agent's own reconnects back off too (to 11 s and more after some 6 s away): a
    // 5 s LOST_AFTER_MS lost the job before it came back.
    let mut edge = EdgeServer::start(EdgeKind::Native, &keys, &[("LOST_AFTER_MS", "120000")]);
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    Client::new(&edge.url()).wait_online().await;
    let dir = TempDir::new("submit-restart");
    let go = dir.path().join("go");
    let prompt = format!("@await={} across an edge restart", go.display());
    let submit = Submitting::start(&["--edge", &edge.url(), "--follow-for", "2m", &prompt]);
    assert!(eventually(Duration::from_secs(60), submit.shown(format!("waiting for {}", go.display()))).await, "{}", submit.said());
    edge.stop();
    assert!(eventually(Duration::from_secs(60), submit.shown("· lost the edge".into())).await, "{}", submit.said());
    // Away for several fruitless follows, longer than the old rule's ten 2 s apart (some
    // 20 s: 6 s passed with it too, so the ride through was never tested); Claude ends
    // meanwhile, its result kept by the agent.
    std::fs::write(&go, "").unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;
    edge.restart();
    let (status, stdout, err) = submit.end(Duration::from_secs(120)).await;
    assert!(status.success(), "{status}\n{err}\n{}\n{}", edge.log(), agent.log());
    assert_eq!(stdout.trim(), format!("stand-in answer to: {prompt}"), "{err}");
    let said = |what: &str| err.lines().filter(|l| l.starts_with(what)).count();
    assert_eq!((said("· lost the edge"), said("· the edge is back")), (1, 1), "{err}");
    let job = err.lines().find_map(|l| l.strip_prefix("· job ")?.split(' ').next()).unwrap();
    assert!(err.contains(&format!("following job {job} again…")), "{err}");
    assert!(err.find("· lost the edge") < err.find("· the edge is back"), "{err}");
    for line in err.lines() {
        assert_eq!(err.lines().filter(|l| *l == line).count(), 1, "shown more than once: {line:?}\n{err}");
    }
}

/// A number or switch setting clap refused named the setting but not what to write
/// (`MAX_CONCURRENT_JOBS=abc`: "invalid digit found in string"; a switch: "value was not a
/// boolean"). Each refusal says the setting, what is wrong with the value and what to
/// write (its range, and what it is unset), before anything else is checked.
#[test]
fn a_refused_setting_says_what_to_write() {
    let cases: [(&[&str], &str, &str, &[&str]); 9] = [
        (&["up"], "LISTEN", "8787", &["is not an IP address and port", "like 127.0.0.1:8787", "unset, it is 127.0.0.1:8787"]),
        (&["agent"], "MAX_CONCURRENT_JOBS", "abc", &["is not a whole number", "from 1 to 64", "unset, it is 1"]),
        (&["agent"], "MAX_CONCURRENT_JOBS", "0", &["is under 1", "from 1 to 64"]),
        (&["agent"], "MAX_CONCURRENT_JOBS", "-3", &["is not a whole number", "from 1 to 64"]),
        (&["up"], "MAX_CONCURRENT_JOBS", "99999999999", &["is over 64", "from 1 to 64"]),
        (&["agent"], "DRAIN_TIMEOUT_MS", "5m", &["is not a whole number", "milliseconds", "unset, it is 300000"]),
        (&["agent"], "MAX_DIFF_BYTES", "0", &["is under 1", "from 1 to 6291456", "unset, it is 5242880"]),
        (&["agent"], "REPO_CACHE_MAX_BYTES", "20G", &["is not a whole number", "bytes"]),
        (&["agent"], "KEEP_FAILED_WORKSPACES", "maybe", &["is neither on nor off", "1, true, yes or on", "unset, it is off"]),
    ];
    for (command, name, value, says) in cases {
        let data = TempDir::new("setting");
        let out = Command::new(bin("claude-runner")).args(command).env("DATA_DIR", data.path()).env(name, value).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}={value}: {err}");
        assert!(err.contains(&format!("{name}: `{value}`")), "{name}={value} is not named with its value:\n{err}");
        for said in says {
            assert!(err.contains(said), "{name}={value}: not `{said}`:\n{err}");
        }
        assert!(!err.contains("invalid digit") && !err.contains("not a boolean") && !err.contains("invalid socket address"), "{name}={value}:\n{err}");
    }
    let out = Command::new(bin("claude-runner")).arg("agent").env("ALLOW_INSECURE_EDGE", "sure").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ALLOW_INSECURE_EDGE: `sure` is neither on nor off") && err.contains("unset, it is off"), "{err}");
}

/// A value that is not UTF-8 was refused by clap without a name ("invalid UTF-8 was
/// detected in one or more arguments"), and a token the agent reads itself
/// (`ANTHROPIC_API_KEY`, `CLAUDE_CODE_OAUTH_TOKEN`) or an edge setting `up` reads
/// (`NOTIFY_URL`) was taken as unset, saying nothing. Each is now refused by name, its
/// value never shown; a folder setting may still be any bytes.
#[test]
fn a_setting_that_is_not_text_is_refused_by_name() {
    use std::os::unix::ffi::OsStrExt;
    let not_text = std::ffi::OsStr::from_bytes(b"tok-caf\xe9-0123456789");
    let cases: [(&[&str], &str); 5] = [
        (&["agent"], "ANTHROPIC_API_KEY"),
        (&["agent"], "CLAUDE_CODE_OAUTH_TOKEN"),
        (&["agent"], "CLAUDE_MODEL"),
        (&["status"], "RUST_LOG"),
        (&["submit", "hello"], "RUNNER_SECRET"),
    ];
    for (command, name) in cases {
        let data = TempDir::new("not-text");
        let out = Command::new(bin("claude-runner")).args(command).env("DATA_DIR", data.path()).env(name, not_text).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {err}");
        assert!(err.contains(&format!("{name} is not UTF-8 text")), "{name} is not named:\n{err}");
        assert!(!err.contains("tok-") && !err.contains("0123456789"), "{name}'s value is shown:\n{err}");
    }
    // `up` reads the edge's settings: NOTIFY_URL in Latin-1 meant no alerts, said nowhere.
    let data = TempDir::new("not-text-up");
    let fake = TempDir::new("not-text-bin");
    std::os::unix::fs::symlink(bin("claude-standin"), fake.path().join("claude")).unwrap();
    let path = format!("{}:{}", fake.path().display(), std::env::var("PATH").unwrap_or_default());
    // Bounded: before, `up` started and served.
    let out = Command::new("timeout")
        .args(["30".as_ref(), bin("claude-runner").as_os_str(), "up".as_ref()])
        .env("PATH", path)
        .env("DATA_DIR", data.path())
        .env("LISTEN", "127.0.0.1:0")
        .env("NOTIFY_URL", not_text)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("NOTIFY_URL is not UTF-8 text"), "up:\n{err}");
    // A setting the command does not read is not looked at, and help and the version
    // answer whatever the settings hold.
    for command in [&["status"][..], &["--version"], &["agent", "--help"]] {
        let out = Command::new(bin("claude-runner"))
            .args(command)
            .env("DATA_DIR", data.path())
            .env("GIT_AUTHOR_NAME", std::ffi::OsStr::from_bytes(b"Ren\xe9"))
            .env("ANTHROPIC_API_KEY", not_text)
            .env("CLAUDE_MODEL", if command[0] == "status" { "opus".as_ref() } else { not_text })
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("not UTF-8") && !err.contains("invalid UTF-8"), "{command:?}:\n{err}");
        if command[0] != "status" {
            assert!(out.status.success(), "{command:?}:\n{err}");
        }
    }
    // Clap's own error comes first where it has one of its own: `--log-format agent
    // status` is a bad LOG_FORMAT, not an agent whose key is not text.
    let out = Command::new(bin("claude-runner"))
        .args(["--log-format", "agent", "status"])
        .env("DATA_DIR", data.path())
        .env("ANTHROPIC_API_KEY", not_text)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("LOG_FORMAT must be") && !err.contains("ANTHROPIC_API_KEY"), "{err}");
    // A folder may be any bytes: the status command starts and says no agent ran there.
    let out = Command::new(bin("claude-runner")).arg("status").env("DATA_DIR", data.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"))).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!err.contains("not UTF-8"), "a folder setting was refused:\n{err}");
}

/// `claude-runner keygen | head -1` panicked ("failed printing to stdout: Broken pipe",
/// exit 101), and `status` ended saying "Broken pipe". Each command whose output is for a
/// person or a pipe ends quietly when its reader has gone, as Unix tools do: by SIGPIPE or
/// its own exit status, saying nothing. Its stdout here is a pipe whose reader closed before
/// it started, so its first write finds it closed, whatever the timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_each_command_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let _agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    Client::new(&edge.url()).wait_online().await;
    let data = TempDir::new("closed-stdout");
    let commands: &[&[&str]] = &[
        &["keygen"], &["keygen", "--json"], &["keygen", "--env"], &["oauth-status"], &["status"], &["status", "--check"],
        &["doctor"], &["--help"], &["--version"], &["submit", "a task whose answer has nowhere to go"],
    ];
    for args in commands {
        let mut ends = [0; 2];
        // SAFETY: pipe writes two descriptors into the array; each is then owned once.
        assert_eq!(unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        drop(reader);
        let out = Command::new(bin("claude-runner"))
            .args(*args)
            .env("DATA_DIR", data.path())
            .env("CLAUDE_CONFIG_DIR", data.path().join("claude"))
            .env("CLAUDE_RUNNER_URL", edge.url())
            .env("RUNNER_SECRET", SECRET)
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?} said: {err}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {err}");
        assert!(out.status.code().is_some() || out.status.signal() == Some(libc::SIGPIPE), "{args:?}: {:?}", out.status);
    }
}

/// `https://` to a plain-http edge (`up`'s) said only rustls's "received corrupt message of
/// type InvalidContentType": `submit` and `login` now say to use http://.
#[test]
fn submit_and_login_over_https_to_a_plain_edge_are_told_to_use_http() {
    let plain = edge_that_answers(|_, _| "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".into());
    for command in ["submit", "login"] {
        let out = Command::new(bin("claude-runner"))
            .args(if command == "submit" { ["submit", "hello"] } else { ["login", "--trust-edge-url"] })
            .env("CLAUDE_RUNNER_URL", format!("https://{plain}"))
            .env("RUNNER_SECRET", SECRET)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(err.contains(&format!("is http://{plain}")), "{command}: {err}");
    }
}

/// An agent whose first dial fails logged "connection to the edge lost", for a connection
/// there never was: a dial that connects to nothing says it could not connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_that_never_connected_is_not_called_a_lost_connection() {
    let keys = Keys::new(&["spark"]);
    let nobody = closed_port();
    let opts = AgentOpts {
        id: "spark",
        key: keys.agent("spark").clone(),
        edge_public: shared::keys::encode_verifying(&keys.edge.verifying_key()),
        edge_ws: format!("ws://127.0.0.1:{}", nobody.port),
        claude_bin: bin("claude-standin"),
        extra_env: Vec::new(),
        wrapper: Vec::new(),
    }
    .env("RUST_LOG", "info");
    let agent = AgentProc::start(opts);
    assert!(eventually(Duration::from_secs(30), || agent.log().contains("reconnecting")).await, "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("could not connect to the edge") && !log.contains("connection to the edge lost"), "{log}");
}

/// `login` followed redirects (up to ten), sending the runner secret and then the sign-in
/// code to wherever the edge's address sent it: here a 307 to another port. It follows
/// none now, as `submit` (one client for both), and says where the answer sent it.
#[test]
fn login_follows_no_redirect_to_another_host() {
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = elsewhere.local_addr().unwrap();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noted = reached.clone();
    std::thread::spawn(move || {
        for _ in elsewhere.incoming() {
            noted.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let edge = edge_that_answers(move |_, _| {
        format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{to}/oauth/login\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    });
    let out = Command::new(bin("claude-runner"))
        .args(["login", "--trust-edge-url"])
        .env("CLAUDE_RUNNER_URL", format!("http://{edge}"))
        .env("RUNNER_SECRET", SECRET)
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("307") && err.contains(&to.to_string()) && err.contains("follows no redirect"), "{err}");
    assert!(!reached.load(std::sync::atomic::Ordering::SeqCst), "the redirect was followed to {to}: {err}");
}

/// `submit` and `login` sent the runner secret (and the task, the sign-in code) over plain
/// http:// to any host, where the agent refuses plaintext ws:// beyond this machine unless
/// ALLOW_INSECURE_EDGE=1: the same rule, the same check (`edge_url`), before anything is sent.
#[test]
fn submit_and_login_send_the_secret_over_plain_http_only_to_this_machine() {
    for command in ["submit", "login"] {
        let out = Command::new(bin("claude-runner"))
            .args(if command == "submit" { ["submit", "hello"] } else { ["login", "--trust-edge-url"] })
            .env("CLAUDE_RUNNER_URL", "http://192.0.2.1:8787")
            .env("RUNNER_SECRET", SECRET)
            .env_remove("ALLOW_INSECURE_EDGE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(err.contains("not this machine") && err.contains("https://") && err.contains("ALLOW_INSECURE_EDGE=1"), "{command}: {err}");
    }
}

/// http:// to a TLS port (an edge behind TLS, its URL written with the wrong scheme): the
/// server closes the request unread, and `submit` said the task "may have been queued all
/// the same", which it surely was not. It asks whether the port speaks TLS, and says so.
#[test]
fn submit_and_login_to_a_tls_port_over_http_say_to_use_https() {
    let tls = harness::git_server::GitServer::start(None);
    for command in ["submit", "login"] {
        let out = Command::new(bin("claude-runner"))
            .args(if command == "submit" { ["submit", "hello"] } else { ["login", "--trust-edge-url"] })
            .env("CLAUDE_RUNNER_URL", format!("http://127.0.0.1:{}", tls.port))
            .env("RUNNER_SECRET", SECRET)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(err.contains("speaks TLS") && err.contains(&format!("https://127.0.0.1:{}", tls.port)), "{command}: {err}");
        assert!(!err.contains("may have been queued"), "{command}: {err}");
    }
}

/// A stdout on a full disk (`/dev/full`).
fn full() -> Stdio {
    Stdio::from(std::fs::File::create("/dev/full").unwrap())
}

/// `submit > result.txt` on a full disk lost the result and exited 0 (its writes' errors
/// were dropped): it says it could not write the result, where to read it, and exits 2.
#[test]
fn submit_says_a_result_it_cannot_write() {
    let edge = edge_that_answers_follows(|_, _| {
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nid: 1\nevent: result\ndata: {\"success\":true,\"output\":\"the answer\"}\n\n"
            .to_string()
    });
    for args in [&[][..], &["--json"]] {
        let out = Command::new(bin("claude-runner"))
            .args(["submit", "--edge", &format!("http://{edge}"), "hello"])
            .env("RUNNER_SECRET", SECRET)
            .args(args)
            .stdout(full())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("could not write the result") && err.contains("GET /jobs/j1"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `keygen > keys.env` on a full disk panicked ("failed printing to stdout", exit 101),
/// as any failed print but to a closed pipe did: it says it could not write, and exits 1.
#[test]
fn keygen_says_a_stdout_it_cannot_write() {
    let out = Command::new(bin("claude-runner")).args(["keygen"]).stdout(full()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("could not write to stdout") && !err.contains("panicked"), "{err}");
}

/// A prompt on stdin that is not UTF-8 ended with exit 1, which says the task ran and
/// failed: it is a usage error (2), and nothing was sent.
#[test]
fn submit_refuses_a_prompt_that_is_not_text() {
    use std::io::Write;
    let mut child = Command::new(bin("claude-runner"))
        .args(["submit", "--edge", "http://127.0.0.1:9"])
        .env("RUNNER_SECRET", SECRET)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"caf\xe9\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not UTF-8") && err.contains("nothing was sent"), "{err}");
}

/// `doctor` waited for the probe's answer 10 s from each frame: an edge that sent its
/// challenge and then a binary frame every 100 ms held it for ever. One deadline bounds
/// the whole wait (the handshake's, 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_gives_up_on_an_edge_that_answers_the_probe_with_noise() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let keys = Keys::new(&["spark"]);
    let edge_key = keys.edge.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let edge_key = edge_key.clone();
            tokio::spawn(async move {
                let Ok((mut ws, agent_nonce)) = accept_agent(tcp).await else { return };
                // Signed: an edge that proves its key, then sends only noise.
                let challenge = challenge(&edge_key, shared::protocol::PROTOCOL_VERSION, "AAAA", agent_nonce.as_deref(), "default");
                if ws.send(Message::text(challenge.to_text())).await.is_err() {
                    return;
                }
                while ws.send(Message::binary(vec![0u8])).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    let claude_dir = TempDir::new("doctor-noise");
    let env = vec![
        ("EDGE_URL", format!("ws://{addr}")),
        ("AGENT_ID", "spark".to_string()),
        ("AGENT_SIGNING_KEY", shared::keys::encode_signing(keys.agent("spark"))),
        ("EDGE_PUBLIC_KEY", shared::keys::encode_verifying(&keys.edge.verifying_key())),
        ("CLAUDE_BIN", bin("claude-standin").display().to_string()),
        ("CLAUDE_CONFIG_DIR", claude_dir.path().display().to_string()),
        ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-doctor".to_string()),
    ];
    let started = std::time::Instant::now();
    let doctor = tokio::task::spawn_blocking(move || doctor(&env));
    let Ok(done) = tokio::time::timeout(Duration::from_secs(40), doctor).await else {
        panic!("doctor still waits on an edge that sends only noise");
    };
    let (_, out) = done.unwrap();
    assert!(out.contains("keys: the keys were not checked") && out.contains("did not answer within 10 s"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}

/// `login` with its stdout a file on a full disk: the URL could not be written, and the
/// error reached main, which exits 1, "the login failed". It says what could not be done
/// and exits 2, as when the edge could not start the login; no panic.
#[test]
fn login_says_a_url_it_cannot_write() {
    let edge = edge_that_answers(|_, _| {
        let body = r#"{"login_id":"l1","url":"https://claude.ai/oauth/authorize?x","agent_id":"spark","state":"awaiting_code"}"#;
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
    });
    let out = Command::new(bin("claude-runner"))
        .args(["login", "--trust-edge-url"])
        .env("CLAUDE_RUNNER_URL", format!("http://{edge}"))
        .env("RUNNER_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(full())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("could not show the sign-in URL") && err.contains("claude-runner login") && !err.contains("panicked"), "{err}");
}

/// `submit` with no prompt at a terminal waited on stdin, saying nothing: it says it reads
/// the prompt from stdin and how to end it. Its stdin here is a pseudo-terminal.
#[test]
fn submit_at_a_terminal_says_it_reads_the_prompt_from_stdin() {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: a new pseudo-terminal pair, each end owned at once by a File.
    let (mut terminal, line) = unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0 && libc::grantpt(master) == 0 && libc::unlockpt(master) == 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_owned();
        let line = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        assert!(line >= 0);
        (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(line))
    };
    let child = Command::new(bin("claude-runner"))
        .args(["submit", "--edge", "http://127.0.0.1:9"])
        .env("RUNNER_SECRET", SECRET)
        .stdin(Stdio::from(line))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A line, then Ctrl-D: the end of the prompt.
    terminal.write_all(b"hello\n\x04").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reading the prompt from stdin (Ctrl-D to end)"), "{err}");
    // Then on to the edge (none here).
    assert!(err.contains("cannot reach the edge"), "{err}");
}

/// reqwest reads HTTP_PROXY (ALL_PROXY, and their lower-case forms) and makes no exception
/// for loopback: with one set, `submit` and `login` sent a plain http:// edge's requests,
/// the runner secret in their head, to the proxy in plain text, even for http://127.0.0.1;
/// and the https probe of a broken exchange asked the proxy (HTTPS_PROXY), whose TLS
/// answered for the edge. A plain http:// edge is dialled directly: nothing reaches the proxy.
#[test]
fn submit_and_login_send_nothing_of_a_plain_edges_through_a_proxy() {
    use std::sync::{Arc, Mutex};
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let through_proxy = Arc::new(Mutex::new(Vec::<String>::new()));
    let noted = through_proxy.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        for conn in proxy.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut head = vec![0; 4096];
            let n = conn.read(&mut head).unwrap_or(0);
            noted.lock().unwrap().push(String::from_utf8_lossy(&head[..n]).into_owned());
        }
    });
    // An edge that reads each request and closes it unanswered: the exchange breaks, and
    // the probe asks whether the port speaks TLS.
    let reached_edge = Arc::new(Mutex::new(Vec::<String>::new()));
    let noted = reached_edge.clone();
    let edge = edge_that_answers(move |head, _| {
        noted.lock().unwrap().push(head.to_string());
        String::new()
    });
    for command in ["submit", "login"] {
        let mut run = Command::new(bin("claude-runner"));
        run.args(if command == "submit" { ["submit", "hello"] } else { ["login", "--trust-edge-url"] })
            .env("CLAUDE_RUNNER_URL", format!("http://{edge}"))
            .env("RUNNER_SECRET", SECRET)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .stdin(Stdio::null());
        for proxy in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            run.env(proxy, &proxy_url);
        }
        let out = run.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(err.contains(&format!("http://{edge}")) && !err.contains("speaks TLS"), "{command}: {err}");
    }
    assert_eq!(*through_proxy.lock().unwrap(), Vec::<String>::new(), "requests reached the proxy");
    let reached_edge = reached_edge.lock().unwrap();
    assert!(reached_edge.iter().any(|head| head.starts_with("POST /jobs") && head.contains(SECRET)), "the edge was not dialled directly: {reached_edge:?}");
    assert!(reached_edge.iter().any(|head| head.starts_with("POST /oauth/login")), "{reached_edge:?}");
}

/// A setting `submit` or `login` reads that is not UTF-8 text was refused with exit 1,
/// which for `submit` says the task ran and failed; a wrong setting is their usage error, 2.
#[test]
fn submit_and_login_refuse_a_setting_that_is_not_text_as_a_usage_error() {
    use std::os::unix::ffi::OsStrExt;
    let not_text = std::ffi::OsStr::from_bytes(b"caf\xe9");
    for command in ["submit", "login"] {
        for name in ["CLAUDE_RUNNER_URL", "RUNNER_SECRET", "ALLOW_INSECURE_EDGE"] {
            let out = Command::new(bin("claude-runner"))
                .args(if command == "submit" { ["submit", "hello"] } else { ["login", "--trust-edge-url"] })
                .env("CLAUDE_RUNNER_URL", "http://127.0.0.1:9")
                .env("RUNNER_SECRET", SECRET)
                .env(name, not_text)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} with {name} not text: {err}");
            assert!(err.contains(&format!("{name} is not UTF-8 text")), "{command}: {err}");
        }
    }
}
