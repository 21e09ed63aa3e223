//! A scripted stand-in for the Claude Code CLI, for tests and benchmarks. It reads the
//! prompt on stdin like `claude -p` does and prints stream-json shaped like the real
//! CLI's (system/init, assistant, result). Directives in the prompt script its behaviour:
//!
//! `@sleep=MS` wait before answering · `@exit=N` exit code · `@is_error` report an error ·
//! `@auth_error` report a 401 · `@garbage` print non-JSON and no result ·
//! `@spawn_child=PIDFILE` start a long-lived child in the same process group and write its
//! pid to PIDFILE · `@megabytes=N` stream N MiB of assistant text first (in 64 KiB
//! events, `@gap_ms=MS` apart; `@flooded=PATH` then makes the empty file PATH, once all of
//! them went into stdout) · `@lines=N` print N short assistant events (`line 1`, …)
//! at once · `@await=PATH` print an assistant event `waiting for PATH`, then wait until
//! PATH exists (at most 2 minutes; may repeat, in order) ·
//! `@print_env=VAR` answer with the value of VAR · `@print_file_b64=PATH` answer with
//! the base64 of a file on one line · `@print_file_utf16=PATH` answer with a text file as
//! UTF-16LE (as `iconv -t UTF-16LE FILE` prints it: a NUL after each character) · `@base64=PATH` answer with it as coreutils'
//! `base64 FILE` prints it (wrapped at 76 columns), first as a tool's output (a Bash
//! tool_result) · `@print_parent_environ` answer with the agent's
//! `/proc/<ppid>/environ`, or why it cannot be read · `@print_environ_of=PID` the same for
//! any process (Claude's parent is its warden, not the agent) · `@environs_holding=VAR`
//! answer with every other process whose `/proc/<pid>/environ` it can read and that holds
//! VAR (`pid (comm)`, comma-separated, or `none`), as a hostile job looks for secrets ·
//! `@open_ancestors_mem`
//! answer whether `/proc/<pid>/mem` of its warden and of the warden's parent opens · `@race_new_launcher` kill the agent's children (launcher, zygote) and open the memory of those started in their place, as they start · `@print_mode=PATH` answer with a
//! path's permission bits (octal) · `@no_result` end without a result line ·
//! `@ignore_term` ignore SIGTERM (so only SIGKILL stops it) · `@write=PATH` write a text
//! file (relative to the working directory; may repeat) · `@write_binary=PATH` write a few
//! non-text bytes · `@write_env=VAR,PATH` write the value of VAR into a file ·
//! `@write_b64=PATH,BASE64` write the bytes BASE64 encodes (a script, say) into a file ·
//! `@write_random=PATH,MIB` write MIB mebibytes of incompressible bytes ·
//! `@git_add=PATH` stage a file with `git add`, after the writes and before the deletes
//! (may repeat) · `@delete=PATH` delete a file (may repeat) · `@exists=PATH` answer whether PATH exists ·
//! `@git_status` run `git status --short` in the working directory, as Claude Code does
//! when it starts (`@git_status=DIR`: in DIR, relative to it; its outcome is ignored) ·
//! `@git_config=KEY,VALUE` run `git config KEY VALUE` in the checkout, and
//! `@mirror_git_config=KEY,VALUE` in its mirror (found through `objects/info/alternates`),
//! as a job's command could (may repeat) ·
//! `@rate_limited=SECS` end as the real CLI does when the usage window is used up (a
//! rejected `rate_limit_event` resetting in SECS, then a 429 result) · `@usage_warning`
//! report the window at 91 % · `@max_turns` / `@max_budget` stop as `--max-turns` /
//! `--max-budget-usd` do · `@transcript` file the session's transcript as the real CLI
//! does (`$CLAUDE_CONFIG_DIR/projects/<working directory, slugged>/<session id>.jsonl`,
//! a line per prompt) · `@claim_session=ID` after its own `init` line, print another one
//! naming session ID, and name ID on every later line and the result (what a job's
//! command writing to Claude's stdout could do) · `@forge_init=ID` first print an `init`
//! line naming session ID, before its own (what another process writing into Claude's
//! stdout through `/proc/<pid>/fd/1` could do) · `@ignore_session_id` name a session of its
//! own instead of `--session-id`'s (as a CLI without that option would) ·
//! `@open_stdout_of=PID` what a hostile job of the same user tries on another job's
//! Claude: open its `/proc/PID/fd/1` for reading (to steal its lines) and for writing; if
//! the latter opens, write a forged result line into it and SIGKILL PID; answer with how
//! each open went (`read: opened` / `read: refused (ERROR)`, the same for `write`).
//!
//! `--session-id=ID` (or `--session-id ID`) names a new session as the real CLI (2.1.197)
//! does: its transcript is filed under ID. As the CLI, it refuses (on stderr, exit 1) an ID
//! that is not a UUID (`Error: Invalid session ID. Must be a valid UUID.`), one whose
//! transcript exists (`Error: Session ID ID is already in use.`), and the option beside
//! `--resume` without `--fork-session`. Without it the session is `standin-<pid>`.
//!
//! `--resume=ID` continues session ID as the real CLI does: from its transcript under the
//! working directory's project folder (a line is added to it), answering
//! `stand-in answer to: <prompt> (resumed ID after N turns)`; without that transcript it
//! fails as the real CLI does (`No conversation found with session ID: ID`).
//!
//! With `STANDIN_LOG` set, every invocation appends one JSON line (argv, cwd, prompt, its
//! whole environment, so tests can see what Claude would inherit, its pid and start time
//! `at` in ms), and one more (`"end": true`, `at`) when it prints its result.
//!
//! `auth login` imitates the real CLI's login without a TTY (its lines as 2.1.x prints
//! them): it prints an authorization URL and `Paste code here if prompted > `, reads the
//! pasted code from stdin and writes `.credentials.json` (mode 0600) into
//! `$CLAUDE_CONFIG_DIR` (else `~/.claude`), with tokens derived from the code. A code
//! starting with `wrong` fails as a refused code does (`Login failed: …`, exit 1). Its pid
//! goes into `standin-login.pid` in that folder first. With a file `standin-login-mute`
//! there it closes its output and hangs instead.
//!
//! Every start (`--version` and `auth login` too, which the real CLI may spare: the worst
//! case, for tests of who reads that file) first runs the `SessionStart` hook commands of
//! `settings.json` in `$CLAUDE_CONFIG_DIR` (else `~/.claude`), as the real CLI runs a
//! session's hooks: `{"hooks": {"SessionStart": [{"hooks": [{"type": "command",
//! "command": "…"}]}]}}`, each with `sh -c`, its output discarded — only from a file that
//! also says `"standin_runs_hooks": true`, so a developer's own `~/.claude/settings.json`
//! never runs in a test.

use std::io::{Read, Write};

fn directive<'a>(prompt: &'a str, name: &str) -> Option<&'a str> {
    prompt.split_whitespace().find_map(|w| {
        let w = w.strip_prefix('@')?;
        match w.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if w == name => Some(""),
            _ => None,
        }
    })
}

/// Every value of a directive that may repeat.
fn directives<'a>(prompt: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> {
    prompt.split_whitespace().filter_map(move |w| w.strip_prefix('@')?.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

/// `@git_config=KEY,VALUE`: `git config KEY VALUE` in the checkout, as a job's command
/// could run it; `@mirror_git_config=KEY,VALUE` the same in the checkout's mirror, found as
/// a job finds it (the checkout's `objects/info/alternates`).
fn git_config(spec: &str, in_mirror: bool) {
    let (key, value) = spec.split_once(',').expect("@git_config=KEY,VALUE");
    let mut git = std::process::Command::new("git");
    if in_mirror {
        let out = std::process::Command::new("git").args(["rev-parse", "--absolute-git-dir"]).output().expect("git runs");
        let git_dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let alternates = std::fs::read_to_string(std::path::Path::new(&git_dir).join("objects/info/alternates")).expect("a checkout borrows its mirror's objects");
        let mirror = std::path::Path::new(alternates.trim()).parent().expect("the mirror's objects folder").to_path_buf();
        git.arg(format!("--git-dir={}", mirror.display()));
    }
    let status = git.args(["config", key, value]).status().expect("git runs");
    assert!(status.success(), "git config {key} {value}");
}

/// The `SessionStart` hooks of the settings file Claude reads (module doc).
fn run_session_start_hooks() {
    let dir = std::env::var_os("CLAUDE_CONFIG_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".claude")));
    let Some(settings) = dir.and_then(|d| std::fs::read(d.join("settings.json")).ok()) else { return };
    let Ok(settings) = serde_json::from_slice::<serde_json::Value>(&settings) else { return };
    if settings["standin_runs_hooks"] != true {
        return;
    }
    let groups = settings["hooks"]["SessionStart"].as_array().cloned().unwrap_or_default();
    for hook in groups.iter().filter_map(|g| g["hooks"].as_array()).flatten() {
        if let (Some("command"), Some(command)) = (hook["type"].as_str(), hook["command"].as_str()) {
            let _ = std::process::Command::new("sh")
                .args(["-c", command])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn main() {
    run_session_start_hooks();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("0.0.0 (Claude Code stand-in)");
        return;
    }
    if args.len() >= 2 && args[0] == "auth" && args[1] == "login" {
        auth_login();
        return;
    }
    let mut prompt = String::new();
    let _ = std::io::stdin().read_to_string(&mut prompt);
    // One write per line: several stand-ins append to the same log at once, and a line
    // written in pieces could interleave with another's.
    let log = |line: serde_json::Value| {
        if let Ok(path) = std::env::var("STANDIN_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = f.write_all(format!("{line}\n").as_bytes());
            }
        }
    };
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    log(serde_json::json!({
        "argv": args,
        "cwd": std::env::current_dir().ok(),
        "prompt": prompt,
        "claude_config_dir": std::env::var("CLAUDE_CONFIG_DIR").ok(),
        "env": std::env::vars().collect::<std::collections::BTreeMap<String, String>>(),
        "pid": std::process::id(),
        "at": now_ms(),
    }));
    if directive(&prompt, "ignore_term").is_some() {
        // SAFETY: installing SIG_IGN for SIGTERM has no memory effects.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    let resumed = args.iter().find_map(|a| a.strip_prefix("--resume=")).map(String::from);
    let named = args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--session-id") {
        Some("") => Some(args.get(i + 1).cloned().unwrap_or_default()),
        Some(rest) => rest.strip_prefix('=').map(String::from),
        None => None,
    });
    // The real CLI's checks, in its order and words.
    if named.is_some() && resumed.is_some() && !args.iter().any(|a| a == "--fork-session") {
        eprintln!("Error: --session-id can only be used with --continue or --resume if --fork-session is also specified.");
        std::process::exit(1);
    }
    if named.as_deref().is_some_and(|id| !is_uuid(id)) {
        eprintln!("Error: Invalid session ID. Must be a valid UUID.");
        std::process::exit(1);
    }
    let own = format!("standin-{}", std::process::id());
    let named = named.filter(|_| directive(&prompt, "ignore_session_id").is_none());
    let session = resumed.clone().or_else(|| named.clone()).unwrap_or(own);
    let out = std::io::stdout();
    let mut out = out.lock();
    let emit = |out: &mut std::io::StdoutLock, v: serde_json::Value| {
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    };
    // The real CLI files a session under the working directory's project folder, and
    // resumes one only from there.
    let transcript = std::env::var_os("CLAUDE_CONFIG_DIR").zip(std::env::current_dir().ok()).map(|(config, cwd)| {
        let slug: String = cwd.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        std::path::PathBuf::from(config).join("projects").join(slug).join(format!("{session}.jsonl"))
    });
    if let (Some(id), Some(path)) = (&named, &transcript) {
        if path.exists() {
            eprintln!("Error: Session ID {id} is already in use.");
            std::process::exit(1);
        }
    }
    let earlier_turns = match (&resumed, &transcript) {
        (Some(id), path) => match path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            Some(text) => Some(text.lines().count()),
            None => {
                emit(&mut out, serde_json::json!({"type":"result","subtype":"error_during_execution","is_error":true,"errors":[format!("No conversation found with session ID: {id}")],"session_id":id,"num_turns":0,"total_cost_usd":0}));
                std::process::exit(1);
            }
        },
        (None, _) => None,
    };
    if let Some(path) = transcript.filter(|_| resumed.is_some() || directive(&prompt, "transcript").is_some()) {
        let _ = std::fs::create_dir_all(path.parent().expect("a project folder"));
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            let _ = writeln!(f, "{}", serde_json::json!({"type": "user", "session_id": session, "prompt": prompt}));
        }
    }
    if directive(&prompt, "garbage").is_some() {
        let _ = writeln!(out, "Segmentation fault (this is not JSON)");
        let _ = out.flush();
        std::process::exit(directive(&prompt, "exit").and_then(|c| c.parse().ok()).unwrap_or(2));
    }
    if let Some(forged) = directive(&prompt, "forge_init") {
        emit(&mut out, serde_json::json!({"type":"system","subtype":"init","session_id":forged,"tools":["Read","Bash"],"model":"stand-in"}));
    }
    emit(&mut out, serde_json::json!({"type":"system","subtype":"init","session_id":session,"cwd":std::env::current_dir().ok(),"tools":["Read","Bash"],"model":"stand-in","permissionMode":"default"}));
    // What a job's command can do once tools run: print lines that name another session.
    let claimed = directive(&prompt, "claim_session").map(String::from);
    if let Some(other) = &claimed {
        emit(&mut out, serde_json::json!({"type":"system","subtype":"init","session_id":other,"tools":["Read","Bash"],"model":"stand-in"}));
    }
    let session = claimed.unwrap_or(session);
    if let Some(pidfile) = directive(&prompt, "spawn_child") {
        let child = std::process::Command::new("sleep").arg("300").spawn().expect("sleep starts");
        std::fs::write(pidfile, child.id().to_string()).expect("pid file writes");
        std::mem::forget(child);
    }
    if let Some(mb) = directive(&prompt, "megabytes").and_then(|v| v.parse::<usize>().ok()) {
        let chunk = "x".repeat(64 * 1024);
        let gap = directive(&prompt, "gap_ms").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        for _ in 0..mb * 16 {
            emit(&mut out, serde_json::json!({"type":"assistant","session_id":session,"message":{"content":[{"type":"text","text":chunk}]}}));
            std::thread::sleep(std::time::Duration::from_millis(gap));
        }
        if let Some(path) = directive(&prompt, "flooded") {
            let _ = out.flush();
            std::fs::write(path, "").expect("the stand-in writes");
        }
    }
    let say = |out: &mut std::io::StdoutLock, text: &str| {
        emit(out, serde_json::json!({"type":"assistant","session_id":session,"message":{"content":[{"type":"text","text":text}]}}));
    };
    for n in 1..=directive(&prompt, "lines").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0) {
        say(&mut out, &format!("line {n}"));
    }
    for path in directives(&prompt, "await") {
        say(&mut out, &format!("waiting for {path}"));
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !std::path::Path::new(path).exists() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    if let Some(ms) = directive(&prompt, "sleep").and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    for path in directives(&prompt, "write") {
        let path = std::path::Path::new(path);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, format!("written by the stand-in: {}\n", path.display())).expect("the stand-in writes");
    }
    for path in directives(&prompt, "write_binary") {
        std::fs::write(path, [0u8, 1, 2, 0, 255, 254, 0, 7]).expect("the stand-in writes");
    }
    for spec in directives(&prompt, "write_random") {
        let (path, mib) = spec.split_once(',').expect("@write_random=PATH,MIB");
        let mib: usize = mib.parse().expect("@write_random=PATH,MIB");
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("the stand-in writes"));
        // xorshift: incompressible bytes, as a build artifact or a data set would be.
        // Seeded by the path, so two files never share their bytes.
        let mut x = path.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3)) | 1;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            f.write_all(&block).expect("the stand-in writes");
        }
        f.flush().expect("the stand-in writes");
    }
    for spec in directives(&prompt, "write_env") {
        let (var, path) = spec.split_once(',').expect("@write_env=VAR,PATH");
        std::fs::write(path, format!("{}\n", std::env::var(var).unwrap_or_default())).expect("the stand-in writes");
    }
    for spec in directives(&prompt, "write_b64") {
        use base64::Engine;
        let (path, b64) = spec.split_once(',').expect("@write_b64=PATH,BASE64");
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("@write_b64=PATH,BASE64");
        std::fs::write(path, bytes).expect("the stand-in writes");
    }
    for path in directives(&prompt, "git_add") {
        let status = std::process::Command::new("git").args(["add", "--", path]).status().expect("git runs");
        assert!(status.success(), "git add {path}");
    }
    for path in directives(&prompt, "delete") {
        std::fs::remove_file(path).expect("the stand-in deletes");
    }
    if let Some(dir) = directive(&prompt, "git_status") {
        let dir = if dir.is_empty() { "." } else { dir };
        // What it finds does not matter: only what it runs (a hostile repository's hooks).
        let _ = std::process::Command::new("git")
            .args(["status", "--short"])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    for (name, in_mirror) in [("git_config", false), ("mirror_git_config", true)] {
        for spec in directives(&prompt, name) {
            git_config(spec, in_mirror);
        }
    }
    let text = if let Some(path) = directive(&prompt, "exists") {
        format!("{path}: {}", if std::path::Path::new(path).exists() { "present" } else { "absent" })
    } else if let Some(var) = directive(&prompt, "print_env") {
        format!("the value is {}", std::env::var(var).unwrap_or_default())
    } else if let Some(path) = directive(&prompt, "print_file_b64") {
        use base64::Engine;
        let bytes = std::fs::read(path).unwrap_or_default();
        format!("the file is {}", base64::engine::general_purpose::STANDARD.encode(bytes))
    } else if let Some(path) = directive(&prompt, "print_file_utf16") {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        format!("the file is {}", text.chars().flat_map(|c| [c, '\0']).collect::<String>())
    } else if let Some(path) = directive(&prompt, "base64") {
        use base64::Engine;
        let bytes = std::fs::read(path).unwrap_or_default();
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let wrapped: Vec<&str> = b64.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
        let text = format!("the file is\n{}\n", wrapped.join("\n"));
        // As Claude Code shows a Bash tool's output: a user message with a tool_result.
        emit(&mut out, serde_json::json!({"type":"user","session_id":session,"message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_standin","content":text}]}}));
        text
    } else if let Some(pid) = directive(&prompt, "open_stdout_of") {
        let stdout = format!("/proc/{pid}/fd/1");
        let said = |open: std::io::Result<std::fs::File>| match open {
            Ok(_) => "opened".to_string(),
            Err(e) => format!("refused ({e})"),
        };
        // Read-only, never read from: a read would wait for the victim's next line.
        let read = said(std::fs::File::open(&stdout));
        let write = std::fs::OpenOptions::new().write(true).open(&stdout).map(|mut f| {
            let forged = serde_json::json!({"type":"result","subtype":"success","is_error":false,"result":"FORGED by another job","num_turns":1});
            let _ = writeln!(f, "{forged}");
            // The victim must not print its own result after the forged one.
            // SAFETY: a signal to a process of this user.
            unsafe { libc::kill(pid.parse().expect("@open_stdout_of=PID"), libc::SIGKILL) };
            f
        });
        format!("read: {read}; write: {}", said(write))
    } else if let Some(pid) = directive(&prompt, "print_environ_of") {
        match std::fs::read(format!("/proc/{pid}/environ")) {
            Ok(bytes) => format!("environ of {pid}: {}", String::from_utf8_lossy(&bytes).replace('\0', " ")),
            Err(e) => format!("environ of {pid} unreadable: {e}"),
        }
    } else if let Some(var) = directive(&prompt, "environs_holding") {
        let me = std::process::id().to_string();
        let wanted = format!("{var}=");
        let holders: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()) && *pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|&b| b == 0).any(|v| v.starts_with(wanted.as_bytes())))
            })
            .map(|pid| format!("{pid} ({})", std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim()))
            .collect();
        format!("holding {var}: {}", if holders.is_empty() { "none".to_string() } else { holders.join(", ") })
    } else if directive(&prompt, "open_ancestors_mem").is_some() {
        // Its warden and the warden's parent (the launcher), whose memory they share.
        let warden = std::os::unix::process::parent_id();
        let mut said = Vec::new();
        for pid in [Some(warden), parent_of(warden)].into_iter().flatten() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            match std::fs::File::open(format!("/proc/{pid}/mem")) {
                Ok(_) => said.push(format!("mem of {pid} ({}) opened", comm.trim())),
                Err(e) => said.push(format!("mem of {pid} ({}) refused: {e}", comm.trim())),
            }
        }
        said.join("; ")
    } else if directive(&prompt, "race_new_launcher").is_some() {
        // A hostile job: ends every child of the agent (same user): its launcher (its
        // warden's parent) and the zygote the launchers come from. Then watches for the
        // processes the agent starts in their place at the next job and opens their memory
        // while they start. Answers whether that memory could still be read once they had
        // started.
        // Once the launcher has answered this job's start (it would otherwise fail this job).
        std::thread::sleep(std::time::Duration::from_millis(500));
        let warden = std::os::unix::process::parent_id();
        let launcher = parent_of(warden).unwrap_or(0);
        let agent = parent_of(launcher).unwrap_or(0);
        // The agent's children, from each of its threads' lists (quicker than all of /proc).
        let children = || -> Vec<u32> {
            std::fs::read_dir(format!("/proc/{agent}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
                .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
                .collect()
        };
        let old = children();
        for &pid in &old {
            // SAFETY: a signal to a process of this user.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut said = format!("no new launcher's memory opened (killed {old:?})");
        'scan: while std::time::Instant::now() < until {
            for pid in children() {
                if old.contains(&pid) {
                    continue;
                }
                let Ok(mem) = std::fs::File::open(format!("/proc/{pid}/mem")) else { continue };
                let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
                // Long after its start (it is non-dumpable by now): read through the old open.
                std::thread::sleep(std::time::Duration::from_millis(500));
                let refused_now = std::fs::File::open(format!("/proc/{pid}/mem")).is_err();
                let stack = maps.lines().find(|l| l.ends_with("[stack]")).and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok());
                let mut buf = [0u8; 64];
                use std::os::unix::fs::FileExt;
                if let Some(at) = stack {
                    if mem.read_at(&mut buf, at + 4096 * 20).is_ok() {
                        said = format!("launcher {pid}'s memory read after it started (opening it now refused: {refused_now})");
                        break 'scan;
                    }
                }
            }
        }
        said
    } else if directive(&prompt, "print_parent_environ").is_some() {
        let ppid = std::os::unix::process::parent_id();
        match std::fs::read(format!("/proc/{ppid}/environ")) {
            Ok(bytes) => format!("parent environ: {}", String::from_utf8_lossy(&bytes).replace('\0', " ")),
            Err(e) => format!("parent environ unreadable: {e}"),
        }
    } else if let Some(path) = directive(&prompt, "print_mode") {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(m) => format!("mode {:o}", m.permissions().mode() & 0o777),
            Err(e) => format!("no mode: {e}"),
        }
    } else if let (Some(id), Some(turns)) = (&resumed, earlier_turns) {
        format!("stand-in answer to: {} (resumed {id} after {turns} turns)", prompt.trim())
    } else {
        format!("stand-in answer to: {}", prompt.trim())
    };
    emit(&mut out, serde_json::json!({"type":"assistant","session_id":session,"message":{"content":[{"type":"text","text":text}]}}));
    if directive(&prompt, "no_result").is_some() {
        std::process::exit(directive(&prompt, "exit").and_then(|c| c.parse().ok()).unwrap_or(0));
    }
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if let Some(secs) = directive(&prompt, "rate_limited").and_then(|v| v.parse::<u64>().ok()) {
        let resets = now_s + secs;
        emit(&mut out, serde_json::json!({"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":resets,"rateLimitType":"five_hour","isUsingOverage":false},"session_id":session}));
        emit(&mut out, serde_json::json!({"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"You've hit your session limit","session_id":session,"num_turns":1,"total_cost_usd":0}));
        std::process::exit(1);
    }
    if directive(&prompt, "usage_warning").is_some() {
        emit(&mut out, serde_json::json!({"type":"rate_limit_event","rate_limit_info":{"status":"allowed_warning","resetsAt":now_s + 3600,"rateLimitType":"five_hour","utilization":0.91},"session_id":session}));
    }
    for (name, subtype, error) in [("max_turns", "error_max_turns", "Reached maximum number of turns (1)"), ("max_budget", "error_max_budget_usd", "Reached maximum budget ($0.01)")] {
        if directive(&prompt, name).is_some() {
            emit(&mut out, serde_json::json!({"type":"result","subtype":subtype,"is_error":true,"errors":[error],"session_id":session,"num_turns":1,"total_cost_usd":0.01}));
            std::process::exit(1);
        }
    }
    let (is_error, result, status) = if directive(&prompt, "auth_error").is_some() {
        (true, "Failed to authenticate. API Error: 401 {\"type\":\"error\",\"error\":{\"type\":\"authentication_error\",\"message\":\"Invalid bearer token\"}}".to_string(), Some(401))
    } else if directive(&prompt, "is_error").is_some() {
        (true, "API Error: 500 Internal server error".to_string(), Some(500))
    } else {
        (false, text, None)
    };
    log(serde_json::json!({"end": true, "prompt": prompt, "pid": std::process::id(), "at": now_ms()}));
    emit(&mut out, serde_json::json!({
        "type":"result","subtype":"success","is_error":is_error,"result":result,"session_id":session,
        "num_turns":1,"total_cost_usd":0.0123,"duration_ms":5,"api_error_status":status,
    }));
    let code = directive(&prompt, "exit").and_then(|c| c.parse().ok()).unwrap_or(if is_error { 1 } else { 0 });
    std::process::exit(code);
}

fn auth_login() {
    let dir = std::env::var_os("CLAUDE_CONFIG_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".claude"));
    // Its pid goes where the tests find it (before it prints its URL).
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("standin-login.pid"), std::process::id().to_string());
    if dir.join("standin-login-mute").exists() {
        // A login that closes its output and hangs.
        // SAFETY: closing this process's own stdout and stderr; nothing else uses them.
        unsafe {
            libc::close(1);
            libc::close(2);
        }
        std::thread::sleep(std::time::Duration::from_secs(600));
        std::process::exit(0);
    }
    println!("Opening browser to sign in…");
    println!("If the browser didn't open, visit: https://claude.ai/oauth/authorize?code=true&client_id=stand-in&state=standin");
    print!("Paste code here if prompted > ");
    let _ = std::io::stdout().flush();
    let mut code = String::new();
    let _ = std::io::stdin().read_line(&mut code);
    let code = code.trim();
    if code.is_empty() || code.starts_with("wrong") || !code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        eprintln!("Login failed: Invalid authorization code");
        std::process::exit(1);
    }
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let credentials = serde_json::json!({"claudeAiOauth": {
        "accessToken": format!("sk-ant-oat01-standin-{code}"),
        "refreshToken": format!("sk-ant-ort01-standin-{code}"),
        "expiresAt": now_ms + 8 * 3_600_000,
        "refreshTokenExpiresAt": now_ms + 30 * 86_400_000,
        "scopes": ["user:inference"],
        "subscriptionType": "max",
    }});
    use std::os::unix::fs::OpenOptionsExt;
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(dir.join(".credentials.json"))?;
        f.write_all(credentials.to_string().as_bytes())
    });
    if let Err(e) = written {
        eprintln!("\nLogin failed: cannot write {}: {e}", dir.display());
        std::process::exit(1);
    }
    println!("\nLogin successful.");
}

/// A process's parent, from `/proc/<pid>/stat` (the field after the command's closing paren).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `id` is a UUID as the real CLI checks `--session-id`: 8-4-4-4-12 hex digits,
/// either case.
fn is_uuid(id: &str) -> bool {
    id.len() == 36 && id.split('-').map(str::len).eq([8, 4, 4, 4, 12]) && id.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}
