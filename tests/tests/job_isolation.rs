//! What a job can reach of the agent that runs it, tried the way a hostile prompt would:
//! the agent's secrets in Claude's environment, the agent's own `/proc/<pid>/environ`, its
//! key printed from a file, its files and folders. And the agent's refusals at start: a
//! key file others can read or one inside DATA_DIR, a key on the command line, plaintext
//! `ws://` to a host that is not this machine. Real binaries, the stand-in for `claude`.

use base64::Engine;
use harness::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Setup {
    _edge: EdgeServer,
    agent: AgentProc,
    client: Client,
}

async fn setup(agent_env: &[(&str, &str)], wrapper: Vec<String>) -> Setup {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    for (k, v) in agent_env {
        opts = opts.env(k, v);
    }
    opts.wrapper = wrapper;
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    client.wait_online().await;
    Setup { _edge: edge, agent, client }
}

async fn output(s: &Setup, prompt: &str) -> String {
    let a = s.client.execute(json!({"prompt": prompt, "timeout_ms": 60000})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["success"], true, "{}\n{}", a.text, s.agent.log());
    a.body["output"].as_str().unwrap_or_default().to_string()
}

const SECRETS: &[(&str, &str)] = &[
    ("RUNNER_SECRET", "runner-secret-in-the-agents-env-0123456789"),
    ("EDGE_SIGNING_KEY", "ZWRnZS1zaWduaW5nLWtleS1pbi10aGUtYWdlbnRzLWVudg=="),
    ("GITHUB_TOKEN", "ghp_githubtokenintheagentsenv0123456789"),
    ("REPO_TOKENS", "git.example.com=repotokenintheagentsenv0123456789"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sees_none_of_the_agents_secrets() {
    let mut env: Vec<(&str, &str)> = SECRETS.to_vec();
    env.extend([("JOB_ENV_ALLOW", "STANDIN_LOG,EXTRA_ALLOWED"), ("EXTRA_ALLOWED", "yes"), ("NOT_ALLOWED", "no")]);
    let s = setup(&env, Vec::new()).await;

    // `printenv` for each: nothing there, not even masked.
    for var in ["AGENT_SIGNING_KEY", "RUNNER_SECRET", "EDGE_SIGNING_KEY", "GITHUB_TOKEN", "REPO_TOKENS", "NOT_ALLOWED"] {
        assert_eq!(output(&s, &format!("@print_env={var}")).await, "the value is ", "{var} reached the job");
    }
    assert_eq!(output(&s, "@print_env=EXTRA_ALLOWED").await, "the value is yes", "JOB_ENV_ALLOW passes what it names");
    let env: Vec<String> = s.agent.claude_runs()[0]["env"].as_object().expect("the stand-in logs its environment").keys().cloned().collect();
    for var in ["AGENT_SIGNING_KEY", "RUNNER_SECRET", "EDGE_SIGNING_KEY", "GITHUB_TOKEN", "REPO_TOKENS", "NOT_ALLOWED", "DATA_DIR", "EDGE_URL"] {
        assert!(!env.contains(&var.to_string()), "{var} in Claude's environment: {env:?}");
    }
    for var in ["HOME", "PATH", "CLAUDE_CONFIG_DIR", "CLAUDE_CODE_OAUTH_TOKEN", "EXTRA_ALLOWED"] {
        assert!(env.contains(&var.to_string()), "{var} missing from Claude's environment: {env:?}");
    }

    // Found some other way (here: copies in a file the job can read), each is still masked.
    let file = s.agent.data.path().join("leaked.txt");
    // REPO_TOKENS' value is `host=token`: the token is the secret.
    let mut leaked: Vec<String> = SECRETS.iter().map(|(_, v)| v.split_once("com=").map_or(*v, |(_, t)| t).to_string()).collect();
    leaked.push(s.agent.env_value("AGENT_SIGNING_KEY").expect("the harness gives the agent its key"));
    std::fs::write(&file, leaked.join("\n")).unwrap();
    let out = output(&s, &format!("@base64={}", file.display())).await;
    for (i, secret) in leaked.iter().enumerate() {
        assert!(!readable_in_base64(&out, secret), "secret {i} readable in the job's output: {out}");
    }
    assert!(out.contains("[REDACTED]"), "{out}");
}

/// Claude's login as a credentials file (the login in use: it goes before the token
/// variable the harness sets), its path, the file's text and its two tokens.
fn credentials_login(s: &Setup) -> (std::path::PathBuf, String, [&'static str; 2]) {
    let tokens = ["hidden-access-3f9a1c7e5b2d4086-a71e", "hidden-refresh-8e1d6b3a9c7f2054-5c0b"];
    let file = json!({"claudeAiOauth": {"accessToken": tokens[0], "refreshToken": tokens[1], "expiresAt": 4_102_444_800_000u64, "scopes": ["user:inference"], "subscriptionType": "max"}});
    let path = s.agent.data.path().join("claude-config/.credentials.json");
    std::fs::write(&path, file.to_string()).unwrap();
    (path, file.to_string(), tokens)
}

/// Every string in an event's JSON.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(text) => out.push(text.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|item| strings(item, out)),
        serde_json::Value::Object(fields) => fields.values().for_each(|field| strings(field, out)),
        _ => {}
    }
}

/// A job moves Claude's credentials file away (Read and Write tools do it as well as a
/// shell), then prints the tokens it read before, base64-encoded (no `sk-ant-` shape left):
/// the redactor, built again from the file as it then stood, had no token to mask, and the
/// tokens reached the caller in the progress events and the result (hostile review rev36b,
/// 1). A login the agent has read stays masked for the agent's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_stays_masked_when_a_job_hides_the_credentials_file() {
    let s = setup(&[], Vec::new()).await;
    let (path, file, tokens) = credentials_login(&s);
    // The copy the job made of the file before it hid it.
    let copy = s.agent.data.path().join("copy.json");
    std::fs::write(&copy, &file).unwrap();
    let go = s.agent.data.path().join("go");
    let job = s.client.submit(json!({"prompt": format!("@await={} @base64={}", go.display(), copy.display()), "timeout_ms": 60000})).await;
    let job_id = job.body["job_id"].as_str().expect("accepted").to_string();
    assert!(eventually(Duration::from_secs(30), || !s.agent.claude_runs().is_empty()).await, "{}", s.agent.log());
    std::fs::rename(&path, path.with_file_name("away.json")).unwrap();
    // The agent looks at the file again at a line 2 s after its last look (the runner's
    // REDACTOR_REFRESH): the tokens come after that.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    std::fs::write(&go, "").unwrap();
    let (_, _, events) = s.client.follow(&job_id).await;
    let done = s.client.wait_job(&job_id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let mut said = Vec::new();
    for (_, data) in &events {
        strings(&serde_json::from_str(data).unwrap_or(serde_json::Value::String(data.clone())), &mut said);
    }
    strings(&done, &mut said);
    for text in &said {
        for token in tokens {
            assert!(!readable_in_base64(text, token) && !text.contains(token), "the token {token} reached the caller: {text}");
        }
    }
    assert!(said.iter().any(|text| text.starts_with("the file is") && text.contains("[REDACTED]")), "the file never came back: {said:?}");
}

/// A job that writes logins of its own into Claude's credentials file can push the real
/// one out of the agent's memory, or keep a refreshed one out of it, and print it unmasked
/// (hostile review rev39). A run that brings more logins than Claude's refresh makes is
/// tampering: nothing of it comes back — not the tokens, not its output, not its events
/// from then on — and its result says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_writing_logins_of_its_own_into_the_credentials_file_is_withheld() {
    let s = setup(&[], Vec::new()).await;
    let changed = || s.agent.log().matches("Claude's credentials changed").count();
    let before = changed();
    let (path, file, tokens) = credentials_login(&s);
    // The agent reads the real login before the job starts, as it would have at its start.
    assert!(eventually(Duration::from_secs(10), || changed() > before).await, "{}", s.agent.log());
    let copy = s.agent.data.path().join("copy.json");
    std::fs::write(&copy, &file).unwrap();
    let go = s.agent.data.path().join("go");
    let job = s.client.submit(json!({"prompt": format!("@await={} @base64={}", go.display(), copy.display()), "timeout_ms": 60000})).await;
    let job_id = job.body["job_id"].as_str().expect("accepted").to_string();
    assert!(eventually(Duration::from_secs(30), || !s.agent.claude_runs().is_empty()).await, "{}", s.agent.log());
    // Three logins of the job's own, each seen by the agent (it looks at the file every
    // second and logs each change) before the next.
    for n in 0..3 {
        let changes = changed();
        let own = json!({"claudeAiOauth": {"accessToken": format!("own-access-{n}-5e2c9a71d3b8"), "refreshToken": format!("own-refresh-{n}-4f1a8b2e6d0c"), "expiresAt": 4_102_444_800_000u64}});
        std::fs::write(&path, own.to_string()).unwrap();
        assert!(eventually(Duration::from_secs(10), || changed() > changes).await, "{}", s.agent.log());
    }
    std::fs::remove_file(&path).unwrap();
    // The runner looks before each line whether a login was met (`oauth::Login::changed`).
    std::fs::write(&go, "").unwrap();
    let (_, _, events) = s.client.follow(&job_id).await;
    let done = s.client.wait_job(&job_id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "failed", "{done}");
    let result = if done["result"].is_object() { &done["result"] } else { &done };
    assert_eq!(result["error_code"], "CLAUDE_ERROR", "{done}");
    let error = result["error"].as_str().unwrap_or_default();
    assert!(error.contains("withheld") && error.contains("3 logins"), "{done}");
    let mut said = Vec::new();
    for (_, data) in &events {
        strings(&serde_json::from_str(data).unwrap_or(serde_json::Value::String(data.clone())), &mut said);
    }
    strings(&done, &mut said);
    assert!(!said.iter().any(|text| text.starts_with("the file is")), "the job's output came back: {said:?}");
    for text in &said {
        for token in tokens {
            assert!(!readable_in_base64(text, token) && !text.contains(token), "the token {token} reached the caller: {text}");
        }
    }
    assert!(s.agent.log().contains("withheld"), "{}", s.agent.log());
}

/// The memory of logins filled before a job began (here by logins written while no job
/// ran): every job is withheld until a restart, its events from its first line too. The
/// runner asked whether the job was withheld only when it built its redactor again, which
/// it now does only once the login changed: a job started on a full memory sent all its
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_on_a_full_login_memory_sends_no_events() {
    let s = setup(&[], Vec::new()).await;
    let changed = || s.agent.log().matches("Claude's credentials changed").count();
    let (path, file, _tokens) = credentials_login(&s);
    // One past the agent's `oauth::REMEMBERED` (its binary's, not a library's to import).
    const REMEMBERED: usize = 128;
    for n in 0..=REMEMBERED {
        let changes = changed();
        let own = json!({"claudeAiOauth": {"accessToken": format!("full-access-{n:03}-5e2c9a71d3b8"), "refreshToken": format!("full-refresh-{n:03}-4f1a8b2e6d0c"), "expiresAt": 4_102_444_800_000u64}});
        std::fs::write(&path, own.to_string()).unwrap();
        assert!(eventually(Duration::from_secs(10), || changed() > changes).await, "{}", s.agent.log());
    }
    let changes = changed();
    std::fs::write(&path, &file).unwrap();
    assert!(eventually(Duration::from_secs(10), || changed() > changes).await, "{}", s.agent.log());
    // Settled (`oauth::SETTLED`): nothing the job's runner looks at changes while it runs.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let job = s.client.submit(json!({"prompt": "printed-while-the-memory-is-full", "timeout_ms": 60000})).await;
    let job_id = job.body["job_id"].as_str().expect("accepted").to_string();
    let (_, _, events) = s.client.follow(&job_id).await;
    let done = s.client.wait_job(&job_id, Duration::from_secs(60)).await;
    let result = if done["result"].is_object() { &done["result"] } else { &done };
    assert!(result["error"].as_str().unwrap_or_default().contains("restart the agent"), "{done}");
    let mut said = Vec::new();
    for (_, data) in &events {
        strings(&serde_json::from_str(data).unwrap_or(serde_json::Value::String(data.clone())), &mut said);
    }
    assert!(!said.iter().any(|text| text.contains("printed-while-the-memory-is-full")), "the events of a job on a full memory came back: {said:?}");
}

/// A file printed as UTF-16 (`iconv -t UTF-16LE`) has a NUL beside each character: no
/// form of a token matched through them, and the tokens came back whole (hostile review
/// rev36b, 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_printed_as_utf16_is_masked() {
    let s = setup(&[], Vec::new()).await;
    let (path, _, tokens) = credentials_login(&s);
    let out = output(&s, &format!("@print_file_utf16={}", path.display())).await;
    let read = out.replace('\0', "");
    for token in tokens {
        assert!(!read.contains(&token[..16]), "the token {token} reached the caller as UTF-16: {read}");
    }
    assert!(read.contains("claudeAiOauth") && read.contains("[REDACTED]"), "{read}");
}

/// A secret with a space in it (a passphrase) was never masked, even printed plain: the
/// text is read past its whitespace, the secret's forms kept theirs (hostile review rev38, 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_with_a_space_is_masked_printed_plain() {
    let secret = "correct horse battery staple of the agent 2026";
    let s = setup(&[("RUNNER_SECRET", secret)], Vec::new()).await;
    let file = s.agent.data.path().join("leaked.txt");
    std::fs::write(&file, format!("the passphrase is {secret}.")).unwrap();
    let out = output(&s, &format!("@print_file_utf16={}", file.display())).await;
    let read = out.replace('\0', "");
    assert!(!read.contains("battery staple") && !read.contains("horse battery"), "the secret reached the caller: {read}");
    assert!(read.contains("the passphrase is") && read.contains("[REDACTED]"), "{read}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_read_the_agents_process() {
    // Root holds CAP_SYS_PTRACE (and CAP_SYS_ADMIN and CAP_PERFMON, either of which also
    // lets this kernel read a non-dumpable process), which read any process whatever it
    // says. The protection is for the user the agent runs as, so as root the test drops
    // those capabilities from the agent and everything it starts.
    let wrapper = if is_root() { vec!["setpriv".to_string(), "--bounding-set=-sys_ptrace,-sys_admin,-perfmon".to_string()] } else { Vec::new() };
    let s = setup(&[], wrapper).await;
    // Claude's parent is its warden, a child of the launcher (whose environment is zeroed):
    // the agent is its grandparent's parent, so it is named by its pid.
    let agent = s.agent.pid().unwrap();
    let out = output(&s, &format!("@print_environ_of={agent}")).await;
    assert!(out.starts_with(&format!("environ of {agent} unreadable")), "the job read the agent's environment: {out}");
    assert!(!out.contains("AGENT_SIGNING_KEY"), "{out}");
    let out = output(&s, "@print_parent_environ").await;
    assert!(out.starts_with("parent environ unreadable"), "the job read its warden's environment: {out}");
}

/// The wardens run in the launcher's memory (`clone(CLONE_VM)`): a job (the same user)
/// must not reach it through its warden, nor the launcher's directly. Dumpable 0 is a flag
/// of that memory, set once by the launcher; `/proc/<pid>/mem` is the way in it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_open_its_wardens_or_the_launchers_memory() {
    let wrapper = if is_root() { vec!["setpriv".to_string(), "--bounding-set=-sys_ptrace,-sys_admin,-perfmon".to_string()] } else { Vec::new() };
    let s = setup(&[], wrapper).await;
    let out = output(&s, "@open_ancestors_mem").await;
    assert_eq!(out.matches("refused").count(), 2, "a job opened its warden's or the launcher's memory: {out}");
    assert!(!out.contains("opened"), "{out}");
    let launcher = s.agent.pid().unwrap();
    // The second is the launcher, the agent's child (not the agent itself).
    assert!(!out.contains(&format!("mem of {launcher} ")), "{out}");
}

/// Another caller's job runs as the same user: it must neither read a running Claude's
/// output nor write into it. Found in review: Claude's stdout was a pipe, which any process
/// of the agent's user reopens through `/proc/<pid>/fd/1` (Claude is dumpable after its
/// `exec`); a job wrote a forged `result` line into another job's Claude, killed it, and
/// the agent signed the forgery as that caller's answer (`success: true`). Claude's
/// stdin, stdout and stderr are now socket ends, which `/proc` does not reopen (ENXIO).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_read_or_forge_another_jobs_claude_output() {
    let s = setup(&[("MAX_CONCURRENT_JOBS", "2")], Vec::new()).await;
    let dir = TempDir::new("forge");
    let go = dir.path().join("go");
    let victim = s.client.submit(json!({"prompt": format!("@await={} the victim's own work", go.display()), "timeout_ms": 60000})).await;
    assert_eq!(victim.status, 202, "{}", victim.text);
    let victim_job = victim.body["job_id"].as_str().expect("a job id").to_string();
    assert!(eventually(Duration::from_secs(60), || !s.agent.claude_runs().is_empty()).await, "{}", s.agent.log());
    let pid = s.agent.claude_runs()[0]["pid"].as_i64().expect("the stand-in logs its pid");
    let attacker = output(&s, &format!("@open_stdout_of={pid}")).await;
    std::fs::write(&go, "").unwrap();
    let done = s.client.wait_job(&victim_job, Duration::from_secs(60)).await;
    let result = &done["result"];
    assert!(!result["output"].as_str().unwrap_or_default().contains("FORGED"), "another job forged this one's result: {done}");
    assert_eq!((&done["state"], &result["success"]), (&json!("succeeded"), &json!(true)), "{done}\n{}", s.agent.log());
    assert!(result["output"].as_str().unwrap_or_default().contains("the victim's own work"), "{done}");
    assert!(attacker.starts_with("read: refused") && attacker.contains("; write: refused"), "a job opened another job's Claude's stdout: {attacker}");
}

/// The zygote is forked before the agent reads any secret, and zeroes the environment it
/// was copied with, so that it — and every launcher cloned from it, every warden and every
/// Claude before its `exec`, which share a launcher's memory — holds none of the agent's
/// secrets: a process that has none to lose is the second line after non-dumpable. Found
/// in review: the fork came after `Cli::parse`, which copies `AGENT_SIGNING_KEY` (clap's
/// `env`) onto the heap, and after `tidy_settings`, whose `var_os` copies every
/// setting's value; the key was in the zygote's and the launcher's heap for their lives.
/// Read as root (CAP_SYS_PTRACE reads a non-dumpable process); as another user it cannot
/// look, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zygote_and_its_launchers_hold_none_of_the_agents_secrets() {
    if !is_root() {
        eprintln!("skipped: reading a non-dumpable process's memory needs root");
        return;
    }
    let s = setup(&SECRETS[..1], Vec::new()).await;
    // A job has run: the launcher has served a request.
    output(&s, "hello").await;
    let key = s.agent.env_value("AGENT_SIGNING_KEY").expect("the harness gives the agent its key");
    let raw = base64::engine::general_purpose::STANDARD.decode(&key).unwrap();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("AGENT_SIGNING_KEY", key.clone().into_bytes()),
        ("the decoded signing key", raw),
        ("RUNNER_SECRET", SECRETS[0].1.as_bytes().to_vec()),
    ];
    // Claude's login is each job's to have (in its environment, which passes through the
    // launcher); the zygote has seen no job.
    let login = s.agent.env_value("CLAUDE_CODE_OAUTH_TOKEN").unwrap().into_bytes();
    let agent = s.agent.pid().unwrap();
    let mut looked = Vec::new();
    for pid in process_tree(agent) {
        let word = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let word = word.split(|&b| b == 0).nth(1).map(|w| String::from_utf8_lossy(w).into_owned()).unwrap_or_default();
        if word != "__zygote" && word != "__launcher" {
            continue;
        }
        looked.push(word.clone());
        let memory = writable_memory(pid);
        let zygote = word == "__zygote";
        for (name, secret) in secrets.iter().chain(zygote.then_some(&("CLAUDE_CODE_OAUTH_TOKEN", login.clone()))) {
            assert!(!memory.windows(secret.len()).any(|w| w == &secret[..]), "the {word} ({pid}) holds {name}");
        }
    }
    looked.sort();
    assert_eq!(looked, ["__launcher", "__zygote"], "the agent's zygote and launcher");
}

/// Every writable mapping of a process (heap, stacks, data), concatenated.
fn writable_memory(pid: u32) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut all = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut region = vec![0u8; (end - start) as usize];
        // A region that cannot be read (a guard page's neighbour) is skipped.
        if mem.seek(SeekFrom::Start(start)).is_ok() && mem.read_exact(&mut region).is_ok() {
            all.extend_from_slice(&region);
        }
    }
    all
}

/// A launcher that was exec'd is dumpable from its `exec` until its first `prctl`: a job
/// (same user) that ended the launcher (its warden's parent) and watched for the one the
/// agent started in its place opened that one's memory while it started, and read it for
/// ever after (an open `/proc/<pid>/mem` is not checked again) — every warden's and every
/// Claude's before its `exec` too, as they share it. It failed 4 runs of 4 in review (the
/// window was 2-27 ms, debug build, loaded machine, no Yama). Since the fix every launcher
/// is cloned from the zygote, forked from the non-dumpable agent, with no `exec`: never
/// dumpable. The job here kills the zygote too, so the replacement zygote (forked from the
/// running agent) is raced as well; and the next job still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_open_a_new_launchers_memory_as_it_starts() {
    let wrapper = if is_root() { vec!["setpriv".to_string(), "--bounding-set=-sys_ptrace,-sys_admin,-perfmon,-dac_override,-dac_read_search".to_string()] } else { Vec::new() };
    let s = setup(&[("MAX_CONCURRENT_JOBS", "2")], wrapper).await;
    let agent = s.agent.pid().expect("the agent runs");
    let helpers = || -> Vec<u32> {
        let named = |pid: &u32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            matches!(cmdline.split(|&b| b == 0).nth(1), Some(b"__launcher" | b"__zygote"))
        };
        process_tree(agent).into_iter().filter(named).collect()
    };
    let old = helpers();
    assert_eq!(old.len(), 2, "the agent's launcher and zygote: {old:?}");
    // It scans 20 s for new launchers: its timeout leaves room for a loaded machine.
    let hostile = s.client.submit(json!({"prompt": "@race_new_launcher", "timeout_ms": 60000})).await;
    assert_eq!(hostile.status, 202, "{}", hostile.text);
    let hostile_id = hostile.body["job_id"].as_str().unwrap().to_string();
    // The hostile job has ended the launcher and the zygote; the next job's start brings
    // new ones. Seen, not assumed after a fixed 2 s: a slower start of the hostile job
    // (a loaded machine) had the next one start before the kill, or be cut by it.
    let ended = eventually(Duration::from_secs(60), || old.iter().all(|pid| !alive(*pid as i32))).await;
    assert!(ended, "the hostile job never ended the launcher and the zygote {old:?}: {}", s.agent.log());
    let next = s.client.execute(json!({"prompt": "hello", "timeout_ms": 60000})).await;
    let done = s.client.wait_job(&hostile_id, Duration::from_secs(90)).await;
    let out = done["result"]["output"].as_str().or(done["output"].as_str()).unwrap_or_default().to_string();
    assert!(!out.contains("memory read"), "a job read the new launcher's memory: {out}\n{done}");
    assert!(out.contains("no new launcher's memory opened"), "{out}\n{done}");
    assert_eq!(next.body["success"], true, "a new zygote and launcher run the next job: {}\n{}", next.text, s.agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_files_and_folders_are_owner_only() {
    let s = setup(&[], Vec::new()).await;
    assert_eq!(output(&s, "@print_mode=.").await, "mode 700", "the job's workspace");
    let data = s.agent.data.path().join("data");
    let mode = |p: &str| std::fs::metadata(data.join(p)).map(|m| m.permissions().mode() & 0o777).unwrap_or_else(|e| panic!("{p}: {e}"));
    for dir in ["", "workspaces", "spool"] {
        assert_eq!(mode(dir), 0o700, "DATA_DIR/{dir}");
    }
    assert!(eventually(Duration::from_secs(60), || data.join("seen-orders.log").exists()).await);
    for file in ["status.json", "seen-orders.log"] {
        assert_eq!(mode(file), 0o600, "DATA_DIR/{file}");
    }
}

/// Runs `claude-runner agent` with `env` (and `args`) inside a network namespace of its
/// own, so nothing it dials can leave even if a check failed; returns its exit status
/// (None if it kept running for 60 s) and what it printed.
fn start_refused(env: &[(&str, String)], args: &[&str]) -> (Option<bool>, String) {
    let netns = if is_root() { "-n" } else { "-rn" };
    let mut cmd = Command::new("unshare");
    cmd.arg(netns).arg(bin("claude-runner")).arg("agent").args(args);
    for var in ["AGENT_SIGNING_KEY", "AGENT_KEY_FILE", "EDGE_URL", "EDGE_PUBLIC_KEY", "DATA_DIR", "ALLOW_INSECURE_EDGE"] {
        cmd.env_remove(var);
    }
    let mut child = cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str()))).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status.success());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    (status, format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn base_env(data: &TempDir) -> Vec<(&'static str, String)> {
    vec![
        ("EDGE_URL", "ws://127.0.0.1:9".to_string()),
        ("EDGE_PUBLIC_KEY", shared::keys::encode_verifying(&random_key().verifying_key())),
        ("DATA_DIR", data.path().join("data").display().to_string()),
        ("CLAUDE_BIN", bin("claude-standin").display().to_string()),
    ]
}

#[test]
fn a_key_file_others_can_read_or_inside_data_dir_is_refused() {
    let data = TempDir::new("keyfile");
    let key = data.path().join("agent.key");
    std::fs::write(&key, shared::keys::encode_signing(&random_key())).unwrap();
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut env = base_env(&data);
        env.push(("AGENT_KEY_FILE", key.display().to_string()));
        let (status, out) = start_refused(&env, &[]);
        assert_eq!(status, Some(false), "mode {mode:o} accepted: {out}");
        assert!(out.contains(&format!("chmod 600 {}", key.display())), "{out}");
    }
    // Private, but where the jobs are.
    let inside = data.path().join("data/agent.key");
    std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
    std::fs::write(&inside, shared::keys::encode_signing(&random_key())).unwrap();
    std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut env = base_env(&data);
    env.push(("AGENT_KEY_FILE", inside.display().to_string()));
    let (status, out) = start_refused(&env, &[]);
    assert_eq!(status, Some(false), "{out}");
    assert!(out.contains("inside DATA_DIR"), "{out}");
    // On the command line, where every local user can read it.
    let (status, out) = start_refused(&base_env(&data), &["--agent-signing-key", &shared::keys::encode_signing(&random_key())]);
    assert_eq!(status, Some(false), "{out}");
    assert!(out.contains("command line") && out.contains("AGENT_KEY_FILE"), "{out}");
}

#[test]
fn plaintext_to_a_host_beyond_loopback_is_refused() {
    let data = TempDir::new("insecure");
    let mut env = base_env(&data);
    env.retain(|(k, _)| *k != "EDGE_URL");
    env.push(("EDGE_URL", "ws://10.0.0.1:8787".to_string()));
    env.push(("AGENT_SIGNING_KEY", shared::keys::encode_signing(&random_key())));
    let (status, out) = start_refused(&env, &[]);
    assert_eq!(status, Some(false), "{out}");
    assert!(out.contains("ALLOW_INSECURE_EDGE=1") && out.contains("wss://"), "{out}");
}

/// Claude starts as a fresh process would (it is forked by a warden, forked by the
/// launcher, which ignores some signals and blocks SIGCHLD): only its three streams open,
/// no signal blocked, the agent's umask, a process group of its own, and its warden a
/// non-dumpable process with no environment left (zeroed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_starts_with_only_its_pipes_and_no_signal_blocked() {
    // The agent starts with a descriptor it does not know of, not close-on-exec (as a shell
    // or a supervisor may leave it one): Claude must not get it. And with the last signal
    // (SIGRTMAX, 64) ignored, which an ignoring parent passes on: Claude must not inherit it.
    let wrapper = ["bash", "-c", "exec 7</dev/null; trap '' 64; exec \"$@\"", "wrap"].map(String::from).to_vec();
    let s = setup(&[], wrapper).await;
    let a = s.client.submit(json!({"prompt": "@sleep=5000 look at me"})).await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert!(eventually(Duration::from_secs(60), || !s.agent.claude_runs().is_empty()).await, "{}", s.agent.log());
    let claude = s.agent.claude_runs()[0]["pid"].as_i64().unwrap();
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{claude}/fd")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    fds.sort();
    let status = std::fs::read_to_string(format!("/proc/{claude}/status")).unwrap();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(&format!("{name}:\t"))).unwrap_or_default().to_string();
    let stat = std::fs::read_to_string(format!("/proc/{claude}/stat")).unwrap();
    let after: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let (ppid, pgrp): (i64, i64) = (after[1].parse().unwrap(), after[2].parse().unwrap());
    assert_eq!(fds, ["0", "1", "2"], "{:?}", fds.iter().map(|fd| std::fs::read_link(format!("/proc/{claude}/fd/{fd}"))).collect::<Vec<_>>());
    // Sockets, not pipes: another job cannot reopen them through `/proc/<pid>/fd/N`.
    for fd in &fds {
        let target = std::fs::read_link(format!("/proc/{claude}/fd/{fd}")).unwrap();
        assert!(target.to_string_lossy().starts_with("socket:["), "fd {fd} is {}", target.display());
    }
    assert_eq!(field("SigBlk"), "0000000000000000");
    // The stand-in is a Rust program: Rust ignores SIGPIPE itself before main. Nothing else
    // is ignored (before the fix glibc's own 32 and 33 were, as posix_spawn left them).
    assert_eq!(field("SigIgn"), "0000000000001000");
    assert_eq!(field("Umask"), "0077");
    assert_eq!(pgrp, claude, "its own process group");
    // The warden's memory is the launcher's, a copy of the zygote's, a copy of the agent's:
    // its environment area is the agent's, zeroed (the kernel cannot be told it is empty
    // without CAP_SYS_RESOURCE).
    let warden_env = std::fs::read(format!("/proc/{ppid}/environ"));
    assert!(warden_env.as_ref().map_or(true, |e| e.iter().all(|&b| b == 0)), "{warden_env:?}");
}

/// A caller's value holding a NUL byte (JSON allows `\u0000`; `append_system_prompt` was
/// only capped in length) must not cut the launcher's request — NUL-separated — into an
/// extra field: before the fix the rest of the value became one of Claude's environment
/// variables (an `ANTHROPIC_BASE_URL` of the caller's choosing, a `NODE_OPTIONS`). The
/// edge now refuses it (400); the agent refuses such a field too, should one reach it
/// (`launcher::tests::a_field_holding_a_nul_is_refused_not_split_in_two`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_callers_value_cannot_set_claudes_environment() {
    let s = setup(&[], Vec::new()).await;
    let body = json!({"prompt": "@print_env=INJECTED_BY_CALLER", "append_system_prompt": "be brief\u{0}INJECTED_BY_CALLER=yes", "timeout_ms": 15000});
    let a = s.client.execute(body).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.body["error"].as_str().unwrap_or_default().contains("NUL"), "{}", a.text);
    assert!(s.agent.claude_runs().is_empty(), "claude ran: {:?}", s.agent.claude_runs());
}

/// A native edge and an agent whose Claude is the script `claude`, and the answer to one
/// job that succeeded through them (both kept running for the caller to look at).
async fn one_job_with(claude: std::path::PathBuf) -> (EdgeServer, AgentProc, Answer) {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    opts.claude_bin = claude;
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let a = client.execute(json!({"prompt": "@exit=0", "timeout_ms": 60000})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["success"], true, "{}\n{}", a.text, agent.log());
    (edge, agent, a)
}

/// Claude's end is read from its warden's four status bytes, not the status pipe's close:
/// they must still mean that nothing of the job runs. A Claude that ends by itself while a
/// process it left in a session of its own (`setsid`, its output closed: nothing holds
/// Claude's pipes) keeps writing into the workspace: that writer is dead by the time the
/// caller has the answer (the warden kills and reaps Claude's whole tree before it writes
/// the status), and the workspace goes after it with nothing written back into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_claude_leaves_in_its_workspace_is_dead_when_the_caller_has_the_answer() {
    let dir = TempDir::new("left-behind");
    let pidfile = dir.path().join("writer.pid");
    let script = dir.path().join("claude");
    std::fs::write(
        &script,
        format!(
            // Only in a job's workspace (not for the agent's `--version`), and for 30 s at
            // most whatever happens.
            "#!/bin/sh\ncase \"$PWD\" in */workspaces/*)\n\
             setsid sh -c 'echo $$ > {pid}; i=0; while [ $i -lt 3000 ]; do echo x >> left-behind.txt; sleep 0.01; i=$((i+1)); done' </dev/null >/dev/null 2>&1 &\n\
             while [ ! -s {pid} ]; do sleep 0.01; done;;\nesac\nexec {standin} \"$@\"\n",
            pid = pidfile.display(),
            standin = bin("claude-standin").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_edge, agent, a) = one_job_with(script).await;
    let writer: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(!alive(writer), "the writer Claude left behind ({writer}) still runs when the caller has the answer");
    let workspace = agent.data.path().join("data/workspaces").join(a.body["job_id"].as_str().unwrap());
    assert!(eventually(Duration::from_secs(60), || !workspace.exists()).await, "the job's workspace {} stays", workspace.display());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!workspace.exists(), "nothing wrote the workspace back after its removal");
}

/// A chain of processes, each in a session (and group) of its own, each the parent of the
/// next: killing the warden's children and their groups reached one level of it per round,
/// the next level only once its parent died and it was handed to the warden. The warden
/// gave up after 200 rounds, and a job that left a chain 300 deep (hostile review rev11)
/// kept about 100 of them running, its result a success. Each round now walks the whole
/// tree, so a chain of any depth dies with its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_processes_deeper_than_the_wardens_rounds_dies_with_its_job() {
    const DEPTH: usize = 300;
    let dir = TempDir::new("chain");
    let pids = dir.path().join("chain.pids");
    let chain = dir.path().join("chain");
    // Each level notes its pid, starts the next in a session of its own, and becomes a
    // sleep (for 60 s at most whatever happens).
    std::fs::write(
        &chain,
        format!("#!/bin/sh\necho $$ >> '{pids}'\n[ \"$1\" -gt 1 ] && setsid '{me}' $(($1 - 1)) </dev/null >/dev/null 2>&1 &\nexec sleep 60\n", pids = pids.display(), me = chain.display()),
    )
    .unwrap();
    let script = dir.path().join("claude");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$PWD\" in */workspaces/*)\n\
             setsid '{chain}' {DEPTH} </dev/null >/dev/null 2>&1 &\n\
             while [ \"$(wc -l < '{pids}' 2>/dev/null || echo 0)\" -lt {DEPTH} ]; do sleep 0.05; done;;\nesac\nexec {standin} \"$@\"\n",
            chain = chain.display(),
            pids = pids.display(),
            standin = bin("claude-standin").display()
        ),
    )
    .unwrap();
    for file in [&chain, &script] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Whatever the outcome, nothing of the chain outlives the test.
    struct Reap(std::path::PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            for pid in std::fs::read_to_string(&self.0).unwrap_or_default().lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill with a pid this test's chain noted.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _reap = Reap(pids.clone());
    let _ran = one_job_with(script).await;
    let noted: Vec<i32> = std::fs::read_to_string(&pids).unwrap().lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(noted.len(), DEPTH, "the whole chain was started");
    let left: Vec<i32> = noted.into_iter().filter(|pid| alive(*pid)).collect();
    assert!(left.is_empty(), "{} of the chain's {DEPTH} processes outlived their job: {left:?}", left.len());
}

/// `claude --version`, which the agent runs at its start and again whenever the binary
/// changes (an upgrade), is a process of the agent's user that nothing makes non-dumpable:
/// any other process of that user (a job's, or one a job left behind) may read its
/// `/proc/<pid>/environ` while it runs — `kernel.yama.ptrace_scope` does not guard that
/// read. Found in review: it got the agent's whole environment, `AGENT_SIGNING_KEY`
/// and every other secret with it. It gets what Claude's runs do of it, no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_probe_gets_none_of_the_agents_secrets() {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let dir = TempDir::new("version-probe");
    let seen = dir.path().join("version-env");
    let claude = dir.path().join("claude");
    let script = format!("#!/bin/sh\n[ \"$1\" = --version ] && env > '{}'\nexec '{}' \"$@\"\n", seen.display(), bin("claude-standin").display());
    std::fs::write(&claude, script).unwrap();
    std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut opts = AgentOpts::for_edge(&edge, "spark");
    opts.claude_bin = claude;
    for (k, v) in SECRETS {
        opts = opts.env(k, v);
    }
    let agent = AgentProc::start(opts);
    Client::new(&edge.url()).wait_online().await;
    // Read before the first hello.
    let env = std::fs::read_to_string(&seen).expect("the agent ran `claude --version`");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    let mut secrets: Vec<String> = SECRETS.iter().map(|(_, v)| v.to_string()).collect();
    secrets.push(agent.env_value("AGENT_SIGNING_KEY").unwrap());
    secrets.push(agent.env_value("CLAUDE_CODE_OAUTH_TOKEN").unwrap());
    for secret in secrets {
        assert!(!env.contains(&secret), "`claude --version` was given {secret:?}:\n{env}");
    }
}

/// Hostile review rev40a, 1: the runner redacted events with the redactor it built at
/// Claude's start and re-read the login only at a line 2 s after its last look. A job that
/// makes a new login appear (Claude's refresh forced early: the real tokens written back
/// with a past expiry and `claude -p` run; here the harness writes it) and prints the file
/// within those 2 s sent the new, live login out in its events, and, one new login, was
/// not withheld. The runner now looks with each line whether the login may have changed
/// (`oauth::Login::changed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refreshed_and_printed_at_once_is_masked_in_the_events() {
    let s = setup(&[], Vec::new()).await;
    let changed = || s.agent.log().matches("Claude's credentials changed").count();
    let before = changed();
    let (path, _file, _tokens) = credentials_login(&s);
    assert!(eventually(Duration::from_secs(10), || changed() > before).await, "{}", s.agent.log());
    let go = s.agent.data.path().join("go");
    let job = s.client.submit(json!({"prompt": format!("@await={} @base64={}", go.display(), path.display()), "timeout_ms": 60000})).await;
    let job_id = job.body["job_id"].as_str().expect("accepted").to_string();
    assert!(eventually(Duration::from_secs(30), || !s.agent.claude_runs().is_empty()).await, "{}", s.agent.log());
    let fresh = ["refreshed-access-6b1f0e2d9c8a7354-d2c1", "refreshed-refresh-0a9b8c7d6e5f4321-77e3"];
    let file = json!({"claudeAiOauth": {"accessToken": fresh[0], "refreshToken": fresh[1], "expiresAt": 4_102_444_800_000u64, "scopes": ["user:inference"], "subscriptionType": "max"}});
    std::fs::write(&path, file.to_string()).unwrap();
    std::fs::write(&go, "").unwrap();
    let (_, _, events) = s.client.follow(&job_id).await;
    let done = s.client.wait_job(&job_id, Duration::from_secs(60)).await;
    let mut in_events = Vec::new();
    for (_, data) in &events {
        strings(&serde_json::from_str(data).unwrap_or(serde_json::Value::String(data.clone())), &mut in_events);
    }
    let leaked: Vec<&str> = fresh.iter().copied().filter(|token| in_events.iter().any(|text| readable_in_base64(text, token) || text.contains(token))).collect();
    // The job ran to its end and printed the file: an empty stream would mask nothing.
    assert_eq!(done["state"], "succeeded", "{done}\n{}", s.agent.log());
    assert!(!in_events.is_empty(), "the job's events carried nothing: {events:?}");
    assert!(leaked.is_empty(), "the live refreshed login reached the caller in the events: {leaked:?}; job {}", done["state"]);
}
