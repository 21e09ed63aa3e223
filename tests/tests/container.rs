//! The container images, run for real with podman (issue 10): the agent image dialing a
//! native edge on the host and completing a job, its HEALTHCHECK turning healthy, a
//! `stop` that drains, no secret in any process its jobs can read, the first login landing
//! in the login volume, and the edge image serving an agent container. The stand-in is mounted over the image's `claude`, so the
//! containers run exactly their own commands (`claude-runner agent`, `claude auth login`).
//!
//! Runs when `CLAUDE_RUNNER_CONTAINER_IMAGE` (and `CLAUDE_RUNNER_CONTAINER_EDGE_IMAGE`)
//! name the images: `tests/deploy/container` builds them and runs this suite; otherwise
//! each test prints a one-line notice and passes. Containers use `--network host`, so all
//! traffic stays on loopback.

use harness::*;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn images() -> Option<(String, String)> {
    let agent = std::env::var("CLAUDE_RUNNER_CONTAINER_IMAGE").ok();
    let edge = std::env::var("CLAUDE_RUNNER_CONTAINER_EDGE_IMAGE").ok();
    match (agent, edge) {
        (Some(a), Some(e)) => Some((a, e)),
        _ => {
            eprintln!("container test not run: tests/deploy/container builds the images and runs it");
            None
        }
    }
}

/// podman with the project's settings (tests/deploy/containers.conf) unless the caller
/// chose others.
fn podman_command() -> Command {
    let mut cmd = Command::new("podman");
    if std::env::var_os("CONTAINERS_CONF").is_none() {
        cmd.env("CONTAINERS_CONF", repo_root().join("tests/deploy/containers.conf"));
    }
    cmd
}

fn podman(args: &[&str]) -> Output {
    podman_command().args(args).stdin(Stdio::null()).output().expect("podman runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A name no other test run uses.
fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("claude-runner-test-{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A container (or volume) removed when dropped.
struct Ctr {
    name: String,
}

impl Ctr {
    /// `podman run -d --network host` with the stand-in as the image's `claude`.
    fn run(image: &str, env: &[(&str, String)], extra: &[String], what: &str) -> Ctr {
        let name = unique(what);
        let mut args: Vec<String> = ["run", "-d", "--pull=never", "--network", "host", "--name", &name].map(String::from).to_vec();
        args.extend(["-v".into(), format!("{}:/usr/local/bin/claude:ro", bin("claude-standin").display())]);
        for (k, v) in env {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        args.extend(extra.iter().cloned());
        args.push(image.into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman(&refs);
        // Removed on drop even when it never started.
        let ctr = Ctr { name };
        assert!(out.status.success(), "podman run failed: {}", text(&out));
        ctr
    }

    fn logs(&self) -> String {
        text(&podman(&["logs", &self.name]))
    }

    fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", &self.name];
        args.extend(cmd);
        podman(&args)
    }

    fn inspect(&self, format: &str) -> String {
        String::from_utf8_lossy(&podman(&["inspect", "--format", format, &self.name]).stdout).trim().to_string()
    }

    /// Runs the image's HEALTHCHECK now (podman schedules it with systemd timers, which
    /// this machine does not run) until it passes; the container's health status then.
    async fn wait_healthy(&self) -> String {
        let mut last = String::new();
        let healthy = eventually(Duration::from_secs(30), || {
            let out = podman(&["healthcheck", "run", &self.name]);
            last = text(&out);
            out.status.success()
        })
        .await;
        assert!(healthy, "the healthcheck never passed: {last}\n{}", self.logs());
        self.inspect("{{.State.Health.Status}}")
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-v", &self.name]);
    }
}

/// A named volume, removed when dropped.
struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = podman(&["volume", "rm", "-f", &self.0]);
    }
}

fn agent_env(edge_ws: &str, keys: &Keys) -> Vec<(&'static str, String)> {
    vec![
        ("EDGE_URL", edge_ws.to_string()),
        ("AGENT_ID", "spark".into()),
        ("AGENT_SIGNING_KEY", shared::keys::encode_signing(keys.agent("spark"))),
        ("EDGE_PUBLIC_KEY", shared::keys::encode_verifying(&keys.edge.verifying_key())),
        ("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-container-test-token".into()),
    ]
}

/// A native edge on the host and the agent image dialing it (with `extra_env` beside the
/// agent's settings), once the agent is online: the edge, a client of it, the container.
async fn agent_for_a_host_edge(image: &str, extra_env: &[(&'static str, String)]) -> (EdgeServer, Client, Ctr) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let client = Client::new(&edge.url());
    let mut env = agent_env(&edge.ws_url(), &keys);
    env.extend_from_slice(extra_env);
    let agent = Ctr::run(image, &env, &[], "agent");
    client.wait_online().await;
    (edge, client, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_image_runs_a_job_for_a_host_edge_turns_healthy_and_drains_on_stop() {
    let Some((image, _)) = images() else { return };
    let (_edge, client, agent) = agent_for_a_host_edge(&image, &[]).await;

    let a = client.execute(json!({"prompt": "hello from a container", "timeout_ms": 30000})).await;
    assert_eq!(a.status, 200, "{}\n{}", a.text, agent.logs());
    assert_eq!(a.body["success"], true, "{}", a.text);
    assert_eq!(a.body["output"], "stand-in answer to: hello from a container");
    let h = client.health_full().await;
    assert_eq!(h.body["agent"]["claude_version"], "0.0.0 (Claude Code stand-in)", "{}", h.text);

    // The HEALTHCHECK (`claude-runner status --check`) passes, with no port to ask.
    assert_eq!(agent.wait_healthy().await, "healthy");
    // tini is PID 1 and the agent, its child, runs as the image's own non-root user.
    assert_eq!(text(&agent.exec(&["cat", "/proc/1/comm"])).trim(), "tini");
    assert_eq!(agent_user(&agent), "claude-runner 10001");
    let status = text(&agent.exec(&["claude-runner", "status"]));
    assert!(status.contains("connected since"), "{status}");
    // JSON logs, one line per event, naming the agent.
    assert!(agent.logs().lines().any(|l| l.contains("\"connected to the edge\"") && l.contains("spark")), "{}", agent.logs());

    // `podman stop` (= `docker compose stop`) sends SIGTERM through tini: the running job
    // finishes, its result reaches the edge, and the agent exits 0.
    let job = client.submit(json!({"prompt": "@sleep=3000 finish in the container", "timeout_ms": 30000})).await;
    let job = job.body["job_id"].as_str().unwrap().to_string();
    let running = eventually(Duration::from_secs(60), || agent.logs().contains("claude started")).await;
    assert!(running, "{}", agent.logs());
    let stopping = Instant::now();
    let out = podman(&["stop", "-t", "60", &agent.name]);
    assert!(out.status.success(), "{}", text(&out));
    let took = stopping.elapsed();
    assert_eq!(agent.inspect("{{.State.ExitCode}}"), "0", "{}", agent.logs());
    let done = client.wait_job(&job, Duration::from_secs(5)).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", agent.logs());
    assert!(took < Duration::from_secs(30), "stopped once the job was done, not at the stop timeout ({took:?})");
    assert!(agent.logs().contains("agent draining"), "{}", agent.logs());
}

/// The agent's process (tini's child): its name and user id.
fn agent_user(agent: &Ctr) -> String {
    let out = agent.exec(&["sh", "-c", "read -r pid _ </proc/1/task/1/children; echo \"$(cat /proc/$pid/comm) $(stat -c %u /proc/$pid)\""]);
    text(&out).trim().to_string()
}

/// A job runs as the image's user (10001) and can read the environment of every dumpable
/// process of that user. Found in review: PID 1 (tini) ran as that user with the
/// container's whole environment — the agent's key, the tokens — and so did every process
/// `exec` started (the HEALTHCHECK's `status --check`, `docker compose exec agent
/// claude-runner status`) until its first line. Now tini and what `exec` starts run as
/// root, which a job cannot read, and only the agent (non-dumpable) holds the secrets as
/// the jobs' user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_in_the_agent_container_finds_no_secret_in_any_process() {
    let Some((image, _)) = images() else { return };
    let tokens = [("GITHUB_TOKEN", "ghp_container0test0token0000000000000000".into()), ("REPO_TOKENS", "git.example=container-test-repo-token".into())];
    let (_edge, client, agent) = agent_for_a_host_edge(&image, &tokens).await;
    assert_eq!(agent_user(&agent), "claude-runner 10001", "the agent runs as the jobs' user");
    // A process started by `exec`, as the HEALTHCHECK's is, alive while the job looks.
    let out = podman(&["exec", "-d", &agent.name, "sleep", "600"]);
    assert!(out.status.success(), "{}", text(&out));
    let sleeping = eventually(Duration::from_secs(30), || text(&agent.exec(&["sh", "-c", "grep -lx sleep /proc/[0-9]*/comm"])).contains("/comm")).await;
    assert!(sleeping, "the exec'd process never started");

    let a = client.execute(json!({"prompt": "@print_environ_of=1"})).await;
    let out = a.body["output"].as_str().unwrap_or_default().to_string();
    assert!(out.starts_with("environ of 1 unreadable"), "a job read PID 1's environment: {}\n{}", a.text, agent.logs());
    for var in ["AGENT_SIGNING_KEY", "GITHUB_TOKEN", "REPO_TOKENS", "CLAUDE_CODE_OAUTH_TOKEN", "EDGE_PUBLIC_KEY"] {
        let a = client.execute(json!({"prompt": format!("@environs_holding={var}")})).await;
        assert_eq!(a.body["output"], format!("holding {var}: none"), "a job read {var} from another process: {}\n{}", a.text, agent.logs());
    }
    // The HEALTHCHECK, run as root, still reads the agent's status.
    assert_eq!(agent.wait_healthy().await, "healthy");
}

/// What `exec` starts runs as root and must not take its start-up files from where a job
/// writes. Found in review: the image set `HOME=/home/runner` (and `CLAUDE_CONFIG_DIR`, and
/// the working directory) for every process, so a job's `~/.bashrc`, `~/.gitconfig` or
/// `~/.claude/settings.json` ran as root, holding every secret, in the operator's next
/// `docker compose exec agent bash` / `git` / `claude`. Now only the dropped command (the
/// agent, its jobs, `compose run`'s login) has the runner's home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_exec_starts_as_root_reads_nothing_a_job_wrote() {
    let Some((image, _)) = images() else { return };
    let (_edge, client, agent) = agent_for_a_host_edge(&image, &[]).await;

    // The job's own HOME and CLAUDE_CONFIG_DIR are the runner's, and it plants a start-up
    // file of each kind there, each leaving `/tmp/pwned-<kind>-<uid>` when it runs: the
    // shell's, git's (a command every `git status` runs) and Claude's (a hook its every
    // session runs; the stand-in runs it even for `--version`).
    let a = client.execute(json!({"prompt": "@print_env=HOME"})).await;
    assert_eq!(a.body["output"], "the value is /home/runner", "{}\n{}", a.text, agent.logs());
    let a = client.execute(json!({"prompt": "@print_env=CLAUDE_CONFIG_DIR"})).await;
    assert_eq!(a.body["output"], "the value is /home/runner/.claude", "{}\n{}", a.text, agent.logs());
    let hook = json!({"standin_runs_hooks": true, "hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "touch /tmp/pwned-claude-$(id -u)"}]}]}});
    let planted = [
        ("/home/runner/.bashrc", "touch /tmp/pwned-bashrc-$(id -u)\n".to_string()),
        ("/home/runner/.gitconfig", "[core]\n\tfsmonitor = sh -c 'touch /tmp/pwned-gitconfig-$(id -u)' -\n".to_string()),
        ("/home/runner/.claude/settings.json", hook.to_string()),
    ];
    use base64::Engine;
    let writes: Vec<String> = planted.iter().map(|(path, body)| format!("@write_b64={path},{}", base64::engine::general_purpose::STANDARD.encode(body))).collect();
    let a = client.execute(json!({"prompt": writes.join(" ")})).await;
    assert_eq!(a.body["success"], true, "{}\n{}", a.text, agent.logs());

    // What the operator runs in the container as root (README 3a, 3c, Monitoring): a shell,
    // git in a repository of root's, `status`, `doctor` (which starts `claude --version`),
    // `oauth-status`, `claude` itself, and the HEALTHCHECK (`status --check`). Each runs;
    // none runs a file the job wrote.
    let git = "rm -rf /tmp/roots-repo && git init -q /tmp/roots-repo && cd /tmp/roots-repo && echo x >f && git add f && git status --short";
    let root_runs: [(&[&str], &str); 6] = [
        (&["bash", "-ic", "echo shell ran"], "shell ran"),
        (&["sh", "-c", git], "A  f"),
        (&["claude-runner", "status"], "connected since"),
        (&["claude-runner", "doctor"], "0.0.0 (Claude Code stand-in)"),
        (&["claude-runner", "oauth-status"], "\"configured\": true"),
        (&["claude", "--version"], "0.0.0 (Claude Code stand-in)"),
    ];
    for (cmd, says) in root_runs {
        let out = agent.exec(cmd);
        assert!(text(&out).contains(says), "root's {cmd:?} did not run as it should ({says:?}): {}", text(&out));
    }
    // The HEALTHCHECK, run as root with root's HOME, still finds the agent's status.
    assert_eq!(agent.wait_healthy().await, "healthy");
    let out = agent.exec(&["sh", "-c", "ls /tmp/pwned-*-0 2>/dev/null; echo \"$(id -u) $HOME ${CLAUDE_CONFIG_DIR-unset} $(pwd)\""]);
    assert_eq!(text(&out).trim(), "0 /root unset /", "root's exec ran a file the job wrote, or took the job's HOME, CLAUDE_CONFIG_DIR or folder");

    // The runner's shell, git and claude (`exec --user 10001`, README 3a) do read them:
    // the files work.
    let out = agent.exec(&["rm", "-f", "/tmp/pwned-bashrc-10001", "/tmp/pwned-gitconfig-10001", "/tmp/pwned-claude-10001"]);
    assert!(out.status.success(), "{}", text(&out));
    let git = "git init -q /tmp/runners-repo && cd /tmp/runners-repo && echo x >f && git add f && git status --short";
    for cmd in [&["bash", "-ic", "true"][..], &["sh", "-c", git], &["claude", "--version"]] {
        let mut args = vec!["exec", "--user", "10001", &agent.name];
        args.extend(cmd);
        let out = podman(&args);
        assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    }
    let out = agent.exec(&["sh", "-c", "ls /tmp/pwned-*"]);
    assert_eq!(text(&out).trim(), "/tmp/pwned-bashrc-10001\n/tmp/pwned-claude-10001\n/tmp/pwned-gitconfig-10001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_login_lands_in_the_login_volume() {
    let Some((image, _)) = images() else { return };
    let volume = Volume(unique("login"));
    let out = podman(&["volume", "create", &volume.0]);
    assert!(out.status.success(), "{}", text(&out));
    let mount = format!("{}:/home/runner/.claude", volume.0);
    let standin = format!("{}:/usr/local/bin/claude:ro", bin("claude-standin").display());
    // What `docker compose run --rm agent claude auth login` does: the URL is shown, the
    // code pasted on stdin.
    let mut login = podman_command()
        .args(["run", "--rm", "-i", "--no-healthcheck", "--pull=never", "--network", "none", "-v", &mount, "-v", &standin, &image, "claude", "auth", "login"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    login.stdin.take().unwrap().write_all(b"code-from-the-browser\n").unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("https://claude.ai/oauth/authorize"), "{}", text(&out));

    // A new container on the same volume sees the login, as the agent will.
    let out = podman(&["run", "--rm", "--no-healthcheck", "--pull=never", "--network", "none", "-v", &mount, &image, "claude-runner", "oauth-status"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["configured"], true, "{status}");
    assert_eq!(status["source"], "credentials_file", "{status}");
    assert_eq!(status["subscription_type"], "max", "{status}");
    // Owner-only, owned by the image's user.
    let out = podman(&["run", "--rm", "--no-healthcheck", "--pull=never", "--network", "none", "-v", &mount, &image, "stat", "-c", "%u %a", "/home/runner/.claude/.credentials.json"]);
    assert_eq!(text(&out).trim(), "10001 600");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_image_serves_an_agent_container() {
    let Some((image, edge_image)) = images() else { return };
    let keys = Keys::new(&["spark"]);
    let port = free_port();
    let edge_env = [
        ("LISTEN", format!("127.0.0.1:{port}")),
        ("RUNNER_SECRET", SECRET.to_string()),
        ("EDGE_SIGNING_KEY", shared::keys::encode_signing(&keys.edge)),
        ("AGENT_PUBLIC_KEYS", keys.agent_public_keys()),
        ("HEARTBEAT_INTERVAL_MS", "1000".into()),
    ];
    let edge = Ctr::run(&edge_image, &edge_env, &[], "edge");
    let client = Client::new(&format!("http://127.0.0.1:{port}"));
    let up = eventually(Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    assert!(up, "the edge container never listened:\n{}", edge.logs());
    assert_eq!(edge.wait_healthy().await, "healthy");
    assert_eq!(client.health().await.status, 503, "no agent yet");

    let agent = Ctr::run(&image, &agent_env(&format!("ws://127.0.0.1:{port}"), &keys), &[], "agent");
    client.wait_online().await;
    let a = client.execute(json!({"prompt": "edge and agent both in containers"})).await;
    assert_eq!(a.body["success"], true, "{}\n{}\n{}", a.text, edge.logs(), agent.logs());
    assert_eq!(text(&edge.exec(&["id", "-u"])).trim(), "10001");
}

/// The systemd units as shipped, under a real systemd (PID 1 of a Debian container that
/// shares the host's network): the hardened agent connects to a host edge and runs a job,
/// `systemctl stop` drains it to a clean exit, and the hardened edge unit serves.
/// (Inside a container systemd skips the sandboxing that needs namespaces it may not
/// create, such as ProtectHostname; it says so in the journal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_run_harden_and_drain() {
    let Some(_) = images() else { return };
    let Ok(systemd_image) = std::env::var("CLAUDE_RUNNER_CONTAINER_SYSTEMD_IMAGE") else {
        eprintln!("systemd test not run: tests/deploy/container builds its image");
        return;
    };
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let client = Client::new(&edge.url());
    let mounts: Vec<String> = [
        (bin("claude-runner"), "/usr/local/bin/claude-runner"),
        (bin("claude-runner-edge"), "/usr/local/bin/claude-runner-edge"),
        (repo_root().join("agent/systemd/claude-runner-agent.service"), "/etc/systemd/system/claude-runner-agent.service"),
        (repo_root().join("edge/native/systemd/claude-runner-edge.service"), "/etc/systemd/system/claude-runner-edge.service"),
        (bin("claude-standin"), "/usr/local/bin/claude"),
    ]
    .iter()
    .flat_map(|(from, to)| ["-v".to_string(), format!("{}:{to}:ro", from.display())])
    .chain(["--systemd=always".to_string()])
    .collect();
    let host = Ctr::run(&systemd_image, &[], &mounts, "systemd");
    let sh = |script: &str| {
        let out = host.exec(&["sh", "-c", script]);
        assert!(out.status.success(), "{script}\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let booted = eventually(Duration::from_secs(30), || {
        let state = text(&host.exec(&["systemctl", "is-system-running"]));
        state.contains("running") || state.contains("degraded")
    })
    .await;
    assert!(booted, "systemd did not boot:\n{}", host.logs());

    // The README's steps for the agent (the stand-in is the CLI).
    let agent_env = format!(
        "EDGE_URL={}\nAGENT_ID=spark\nAGENT_SIGNING_KEY={}\nEDGE_PUBLIC_KEY={}\nCLAUDE_CODE_OAUTH_TOKEN=sk-ant-oat01-unit-test\nCLAUDE_MODEL=\n",
        edge.ws_url(),
        shared::keys::encode_signing(keys.agent("spark")),
        shared::keys::encode_verifying(&keys.edge.verifying_key()),
    );
    sh(&format!(
        "set -e
         useradd --system --home-dir /var/lib/claude-runner --create-home --shell /usr/sbin/nologin claude-runner
         chmod 0700 /var/lib/claude-runner
         install -d -m 0755 /etc/claude-runner
         install -m 0600 /dev/null /etc/claude-runner/agent.env
         printf '%s' '{agent_env}' > /etc/claude-runner/agent.env
         systemctl daemon-reload && systemctl enable --now claude-runner-agent"
    ));
    client.wait_online().await;
    let a = client.execute(json!({"prompt": "hello from a hardened unit"})).await;
    assert_eq!(a.body["output"], "stand-in answer to: hello from a hardened unit", "{}\n{}", a.text, sh("journalctl -u claude-runner-agent -o cat --no-pager"));
    let status = sh("su -s /bin/sh claude-runner -c 'DATA_DIR=/var/lib/claude-runner/data claude-runner status --check'");
    assert!(status.starts_with("healthy"), "{status}");

    // A job runs as the agent's user, so it can signal the agent: a drain asked by anyone
    // but systemd ends in a clean exit, and the unit starts the agent again (it stayed
    // offline under `Restart=on-failure`).
    let main_pid = || sh("systemctl show -p MainPID --value claude-runner-agent").trim().to_string();
    // The unit's state and its journal (systemd's lines too, timed), for a failure's message.
    let journal = || {
        let state = sh("systemctl show claude-runner-agent -p ActiveState -p SubState -p Result -p NRestarts");
        format!("{state}{}", sh("journalctl -u claude-runner-agent -o short-monotonic --no-pager"))
    };
    // The processes systemd found left in the unit after its main process ended, and
    // killed. After a clean exit there must be none: one dying of its parent-death signal
    // as systemd swept it could be lost track of (cgroup v1), and systemd then waited out
    // TimeoutStopSec (330 s) before the restart or the stop went on.
    let leftovers = || sh("journalctl -u claude-runner-agent -o cat --no-pager").lines().filter(|l| l.contains("Killing process")).count();
    // Whether the agent, sent `signal` by its own user (as a job would), runs again under
    // another pid within `within`.
    let restarted_after = async |signal: &str, within: Duration| {
        let pid = main_pid();
        sh(&format!("su -s /bin/sh claude-runner -c 'kill -{signal} {pid}'"));
        eventually(within, || {
            let now = main_pid();
            now != pid && now != "0"
        })
        .await
    };
    let restarted = restarted_after("TERM", Duration::from_secs(60)).await;
    assert!(restarted, "the agent was not started again:\n{}", journal());
    assert_eq!(leftovers(), 0, "the agent's clean exit left processes for systemd to kill:\n{}", journal());
    client.wait_online().await;
    // Nor can a job freeze it for good: stopped (SIGSTOP), it no longer tells systemd's
    // watchdog it is alive, and is killed and started again (WatchdogSec=30s).
    let second = main_pid();
    // It does tell it: the watchdog's time moves on while the agent lives on (without the
    // pings it moved only when systemd killed and started the agent, 30 s in).
    let pinged = || sh("systemctl show -p WatchdogTimestampMonotonic --value claude-runner-agent").trim().to_string();
    let first_ping = pinged();
    assert!(eventually(Duration::from_secs(60), || pinged() != first_ping).await, "no ping in 60 s");
    assert_eq!(main_pid(), second, "the agent was started again while it ran:\n{}", journal());
    // The bound is the unit's own worst case, not a guess at the machine's speed: the
    // watchdog's interval, then systemd's wait for the processes left in the unit after
    // its SIGKILL (the agent's helpers die with it, by their parent-death signal, as
    // systemd sweeps them: on a cgroup v1 host, as here, systemd can lose track of one
    // and wait out all of TimeoutStopSec), then RestartSec; and a minute more.
    let usec = |property: &str| -> u64 {
        // `systemctl show` writes a span for people ("5min 30s"); systemd-analyze reads it.
        let value = sh(&format!("systemd-analyze timespan \"$(systemctl show -P {property} claude-runner-agent)\""));
        let micros = value.lines().find_map(|l| l.trim().strip_prefix("μs:")).map(str::trim);
        micros.and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("{property}: {value}"))
    };
    let worst = usec("WatchdogUSec") + usec("TimeoutStopUSec") + usec("RestartUSec");
    let restarted = restarted_after("STOP", Duration::from_micros(worst) + Duration::from_secs(60)).await;
    assert!(restarted, "the stopped agent was not started again:\n{}", journal());
    client.wait_online().await;

    // `systemctl stop` drains: the running job finishes, the service ends cleanly.
    let job = client.submit(json!({"prompt": "@sleep=3000 finish under systemd", "timeout_ms": 30000})).await;
    let job = job.body["job_id"].as_str().unwrap().to_string();
    let started = eventually(Duration::from_secs(60), || sh("journalctl -u claude-runner-agent -o cat --no-pager").contains("claude started")).await;
    assert!(started);
    let killed = leftovers();
    sh("systemctl stop claude-runner-agent");
    assert_eq!(client.wait_job(&job, Duration::from_secs(60)).await["state"], "succeeded");
    let shown = sh("systemctl show claude-runner-agent -p Result -p ExecMainStatus");
    assert!(shown.contains("Result=success") && shown.contains("ExecMainStatus=0"), "{shown}\n{}", journal());
    assert_eq!(leftovers(), killed, "the drained agent left processes for systemd to kill:\n{}", journal());
    assert!(sh("journalctl -u claude-runner-agent -o cat --no-pager").contains("agent draining"));

    // The edge unit: a dynamic user, its state directory, serving on LISTEN.
    let port = free_port();
    let edge_env = format!(
        "RUNNER_SECRET={SECRET}\nEDGE_SIGNING_KEY={}\nAGENT_PUBLIC_KEYS={}\nLISTEN=127.0.0.1:{port}\n",
        shared::keys::encode_signing(&keys.edge),
        keys.agent_public_keys()
    );
    sh(&format!(
        "set -e
         install -m 0600 /dev/null /etc/claude-runner/edge.env
         printf '%s' '{edge_env}' > /etc/claude-runner/edge.env
         systemctl enable --now claude-runner-edge"
    ));
    let own_edge = Client::new(&format!("http://127.0.0.1:{port}"));
    let up = eventually(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    assert!(up, "{}", sh("journalctl -u claude-runner-edge -o cat --no-pager"));
    assert_eq!(own_edge.health().await.body["status"], "offline");
    let user = sh("stat -c %U /proc/$(systemctl show -p MainPID --value claude-runner-edge)");
    assert_ne!(user.trim(), "root", "the edge runs as its own user");
    sh("systemctl stop claude-runner-edge");
    let shown = sh("systemctl show claude-runner-edge -p Result -p ExecMainCode -p ExecMainStatus");
    assert!(shown.contains("Result=success"), "{shown}\n{}", sh("journalctl -u claude-runner-edge -o short-monotonic --no-pager"));
}
