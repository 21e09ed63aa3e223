//! README's "Configuration" tables against what the binaries read: every setting the
//! agent's and the native edge's `--help` name is in its table with the same default, and
//! every name a table gives is one that program reads. A setting added, renamed or given a
//! new default in the code without the README (or the other way round) fails here, not in
//! an operator's `.env`. (The edge's `--help` is held to what `edge/core/src/config.rs`
//! reads by `claude-runner-edge`'s own unit test.)

use harness::bin;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

const README: &str = include_str!("../../README.md");

/// One row of a settings table: the names its first cell gives, and its default cell.
struct Row {
    names: Vec<String>,
    default: String,
}

/// The rows of README's "Configuration" table that follows the line starting with `intro`.
fn table(intro: &str) -> Vec<Row> {
    let section = README.split("\n## Configuration\n").nth(1).expect("README has a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    let after = section.split(&format!("\n{intro}")).nth(1).unwrap_or_else(|| panic!("README's Configuration has no table after `{intro}`"));
    after
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // the head and its rule
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
            Row { names: setting_names(cells[0]), default: cells.last().unwrap().trim().to_string() }
        })
        .collect()
}

/// The setting names in backticks in `text` (`NAME`, not `NAME_<POOL>` or `--flag`).
fn setting_names(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| t.starts_with(|c: char| c.is_ascii_uppercase()) && t.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'))
        .map(str::to_string)
        .collect()
}

fn help(program: &str, args: &[&str]) -> String {
    let out = Command::new(bin(program)).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{program} {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// A clap `--help`'s settings: each `[env: NAME]` with its `[default: …]`, if any.
fn clap_settings(help: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    // One option per block: a block starts at a line naming a flag.
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        match line.trim_start() {
            l if l.starts_with("--") || (l.starts_with('-') && l.as_bytes().get(2) == Some(&b',')) => blocks.push(line.to_string()),
            l => {
                if let Some(block) = blocks.last_mut() {
                    block.push(' ');
                    block.push_str(l);
                }
            }
        }
    }
    for block in blocks {
        let Some(env) = block.split("[env: ").nth(1) else { continue };
        let name = env.split(['=', ']']).next().unwrap().to_string();
        let default = block.split("[default: ").nth(1).map(|d| d.split(']').next().unwrap().trim_matches('"').to_string());
        out.insert(name, default);
    }
    out
}

fn documented(rows: &[Row]) -> BTreeMap<String, String> {
    rows.iter().flat_map(|row| row.names.iter().map(|n| (n.clone(), row.default.clone()))).collect()
}

#[test]
fn the_agents_settings_table_is_what_the_agent_reads() {
    let rows = table("Agent (`claude-runner agent`");
    let readme = documented(&rows);
    let reads = clap_settings(&help("claude-runner", &["agent"]));
    assert!(reads.contains_key("EDGE_URL") && reads.contains_key("LOG_FORMAT"), "the --help was not read: {reads:?}");
    // Read by the logger (RUST_LOG) and by OpenSSL/libgit2 (SSL_CERT_FILE), not by a flag.
    let not_flags: BTreeSet<&str> = ["RUST_LOG", "SSL_CERT_FILE"].into();
    let mut problems = Vec::new();
    for (name, default) in &reads {
        match (readme.get(name), default.as_deref()) {
            (None, _) => problems.push(format!("the agent reads {name}, which README's agent table does not name")),
            // No default, or one the table words (`off` for false, `none` for empty).
            (Some(_), None | Some("") | Some("false")) => {}
            (Some(cell), Some(default)) if !cell.contains(&format!("`{default}`")) && !cell.split(|c: char| !c.is_ascii_alphanumeric() && c != '.').any(|w| w == default) => {
                problems.push(format!("{name}: the agent's default is `{default}`, README's table says `{cell}`"))
            }
            _ => {}
        }
    }
    for name in readme.keys().filter(|n| !reads.contains_key(*n) && !not_flags.contains(n.as_str())) {
        problems.push(format!("README's agent table names {name}, which `claude-runner agent` does not read"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_edges_settings_table_is_what_the_native_edge_reads() {
    let rows = table("Edge (`claude-runner-edge`");
    let readme = documented(&rows);
    let help = help("claude-runner-edge", &[]);
    let listed = help.split("Environment:").nth(1).expect("the edge's --help lists its environment");
    let mut problems = Vec::new();
    let mut reads = BTreeSet::new();
    for line in listed.lines() {
        let names: Vec<&str> = line
            .split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .filter(|w| w.len() > 3 && w.contains('_') || *w == "LISTEN")
            .collect();
        // A default on the line of a single setting: `(default X)`.
        let default = line.split("(default ").nth(1).map(|d| d.trim_end().trim_end_matches(')').to_string());
        for name in &names {
            reads.insert(name.to_string());
            match (readme.get(*name), &default) {
                (None, _) => problems.push(format!("the native edge reads {name}, which README's edge table does not name")),
                (Some(cell), Some(default)) if names.len() == 1 && !default.starts_with(':') && !cell.contains(default.as_str()) => {
                    problems.push(format!("{name}: the native edge's --help says default `{default}`, README's table says `{cell}`"))
                }
                _ => {}
            }
        }
    }
    assert!(reads.contains("RUNNER_SECRET") && reads.contains("SSE_KEEPALIVE_MS"), "the --help was not read: {reads:?}");
    // The Worker's alone (README says so in the row): the native edge serves one pool.
    for name in readme.keys().filter(|n| !reads.contains(*n) && *n != "POOLS") {
        problems.push(format!("README's edge table names {name}, which `claude-runner-edge --help` does not"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The agent's and the native edge's code reading a variable itself (`env::var("NAME")`,
/// not through a flag): README names each, so no setting is known only to whoever reads
/// the source. (Test code is left out: its variables are the tests' own.)
#[test]
fn every_variable_the_code_reads_itself_is_in_the_readme() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    let mut dirs: Vec<_> = ["agent/src", "edge/native/src", "edge/core/src", "shared/src", "shared/runtime/src"].iter().map(|d| root.join(d)).collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() && name != "tests" {
                dirs.push(path);
            } else if name.ends_with(".rs") && name != "tests.rs" {
                files.push(path);
            }
        }
    }
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Up to the file's test module, if any (`pub(crate)` when other modules' tests use
        // its helpers).
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap().split("#[cfg(test)]\npub(crate) mod tests").next().unwrap();
        for call in ["var(\"", "var_os(\""] {
            for rest in code.split(call).skip(1) {
                let name = rest.split('"').next().unwrap();
                if name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') && !README.contains(&format!("`{name}`")) {
                    problems.push(format!("{} reads {name}, which README never names", file.strip_prefix(&root).unwrap().display()));
                }
            }
        }
    }
    assert!(files.len() > 50, "the sources were not found: {files:?}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `tests/run --no-wroker` took the mistyped option for a test filter and ran the whole
/// setup (25 minutes on a fresh machine) before matching no test. An unknown option is
/// refused at once with the usage, and `--help` lists what it accepts; both before any
/// step starts.
#[test]
fn tests_run_refuses_an_unknown_option_at_once() {
    use std::os::unix::process::CommandExt;
    let run = |arg: &str| {
        let mut child = Command::new("bash")
            .arg(harness::repo_root().join("tests/run"))
            .arg(arg)
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                // SAFETY: signalling the process group this test started.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                panic!("tests/run {arg} went on to its steps");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, out, err) = run("--no-wroker");
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("unknown option --no-wroker") && err.contains("usage: tests/run"), "{err}");
    assert!(!out.contains("=="), "a step started: {out}");
    let (code, out, _) = run("--help");
    assert_eq!(code, Some(0));
    for option in ["--no-worker", "--no-fuzz", "--help", "-- ..."] {
        assert!(out.contains(option), "{option}: {out}");
    }
}

/// README's text under the heading line that starts with `heading` (`## …`, `### …`), up to
/// the next heading of any level.
fn section(heading: &str) -> &'static str {
    let after = README.split(&format!("\n{heading}")).nth(1).unwrap_or_else(|| panic!("README has no heading `{heading}`"));
    let body = after.split_once('\n').map_or("", |(_, body)| body);
    // Headings only outside code blocks: a `# comment` in a shell block is none.
    let mut in_code = false;
    let mut end = body.len();
    let mut at = 0;
    for line in body.split_inclusive('\n') {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            end = at;
            break;
        }
        at += line.len();
    }
    &body[..end]
}

/// README's first command, `up`, builds git2 with https, which builds openssl-sys against
/// the system's OpenSSL: a C compiler, pkg-config and OpenSSL's headers. README named them
/// only for `tests/run`, so a newcomer's first `cargo run` failed in openssl-sys (rev22 4).
/// They are named where `up` is introduced, before `tests/run`'s own needs.
#[test]
fn the_first_command_names_what_it_builds_with() {
    let intro = section("## The two commands");
    let before_tests = intro.split("`tests/run` needs").next().unwrap();
    for needed in ["C compiler", "pkg-config", "OpenSSL", "sudo apt-get install build-essential pkg-config libssl-dev"] {
        assert!(before_tests.contains(needed), "README's introduction of `up` does not name {needed}");
    }
}

/// A caller Worker on workers.dev fetching the edge's Worker on workers.dev of the same
/// account is refused by Cloudflare (error 1042, a Worker fetching a Worker of the same
/// zone) unless the caller has the `global_fetch_strictly_public` compatibility flag or a
/// service binding, or the edge is on a hostname of another zone (rev22 1). README's
/// callers' section says what the caller needs.
#[test]
fn the_callers_section_says_what_a_worker_needs_to_reach_the_edge() {
    let callers = section("### 4. Callers");
    for needed in ["1042", "global_fetch_strictly_public", "compatibility_flags", "service binding", "another zone"] {
        assert!(callers.contains(needed), "README §4 does not name {needed}");
    }
}
