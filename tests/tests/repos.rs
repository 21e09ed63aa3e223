//! Jobs on repositories, end to end: the real edge and agent, the stand-in for `claude`,
//! and a git server on 127.0.0.1 over https with a certificate made by the test
//! (`harness::git_server`), one of them demanding a token. The agent trusts that
//! certificate through `SSL_CERT_FILE`, as a real one trusts a private CA.

use harness::git_server::{GitServer, Seed};
use harness::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// An edge, a git server and an agent allowed to use it.
struct Setup {
    _edge: EdgeServer,
    agent: AgentProc,
    client: Client,
    git: GitServer,
}

const TOKEN: &str = "repo-token-0123456789-abcdefghij";

/// `server_token`: the git server demands it. `agent_env`: more agent settings (with
/// `REPO_TOKENS` absent unless given here).
async fn setup(server_token: Option<&str>, agent_env: &[(&str, &str)]) -> Setup {
    setup_with_git(GitServer::start(server_token), agent_env).await
}

/// The usual repository: `main` with a README, a source file, a file to delete and a
/// folder, plus a `feature` branch and a `v1` tag on the first commit.
fn demo(git: &GitServer) -> (Seed, String, String) {
    let seed = git.seed(
        "demo",
        &[("README.md", b"# demo\n"), ("src/lib.rs", b"pub fn one() -> u32 { 1 }\n"), ("old.txt", b"to be deleted\n"), ("docs/guide.md", b"guide\n")],
    );
    let first = seed.git(&["rev-parse", "HEAD"]);
    seed.git(&["tag", "-a", "v1", "-m", "version 1"]);
    seed.git(&["push", "-q", "origin", "v1"]);
    seed.git(&["branch", "feature"]);
    seed.git(&["push", "-q", "origin", "feature"]);
    let second = seed.commit(&[("README.md", b"# demo, second edition\n")], "second");
    (seed, first, second)
}

impl Setup {
    async fn run(&self, body: Value) -> Value {
        let a = self.client.execute(body).await;
        assert_eq!(a.status, 200, "{}", a.text);
        a.body
    }

    fn last_run(&self) -> Value {
        self.agent.claude_runs().pop().expect("claude ran")
    }
}

fn ok(b: &Value) {
    assert_eq!(b["success"], true, "{b:#}");
}

fn repo_error(b: &Value) -> String {
    assert_eq!(b["success"], false, "{b:#}");
    assert_eq!(b["error_code"], "REPO_ERROR", "{b:#}");
    b["error"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_start_from_the_default_branch_a_branch_a_tag_or_a_sha() {
    let s = setup(None, &[]).await;
    let (_seed, first, second) = demo(&s.git);
    let url = s.git.url("demo");

    let b = s.run(json!({"prompt": "@print_file_b64=README.md", "repo_url": url})).await;
    ok(&b);
    assert_eq!(b["commit"], second.as_str(), "the default branch's tip");
    assert_eq!(b["output"], format!("the file is {}", b64(b"# demo, second edition\n")));
    let cwd = s.last_run()["cwd"].as_str().unwrap().to_string();
    assert!(cwd.starts_with(&s.agent.data.path().canonicalize().unwrap().display().to_string()), "{cwd}");

    for branch in ["feature", "v1", &first[..12], first.as_str()] {
        let b = s.run(json!({"prompt": "@print_file_b64=README.md", "repo_url": url, "branch": branch})).await;
        ok(&b);
        assert_eq!(b["commit"], first.as_str(), "{branch}");
        assert_eq!(b["output"], format!("the file is {}", b64(b"# demo\n")), "{branch}");
    }

    let b = s.run(json!({"prompt": "x", "repo_url": url, "branch": "no-such-branch"})).await;
    let e = repo_error(&b);
    assert!(e.contains("`no-such-branch` is neither a branch, a tag nor a commit"), "{e}");
    assert!(s.agent.claude_runs().iter().all(|r| r["prompt"] != "x"), "Claude does not run without its checkout");

    // working_dir is a folder of the checkout.
    let b = s.run(json!({"prompt": "@exists=guide.md", "repo_url": url, "working_dir": "docs"})).await;
    ok(&b);
    assert_eq!(b["output"], "guide.md: present");
    let b = s.run(json!({"prompt": "x", "repo_url": url, "working_dir": "nowhere"})).await;
    assert!(repo_error(&b).contains("does not exist"), "{b}");
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_gets_a_fresh_checkout() {
    let s = setup(None, &[]).await;
    demo(&s.git);
    let url = s.git.url("demo");
    let b = s.run(json!({"prompt": "@write=scratch.txt @delete=README.md", "repo_url": url})).await;
    ok(&b);
    let b = s.run(json!({"prompt": "@exists=scratch.txt", "repo_url": url})).await;
    assert_eq!(b["output"], "scratch.txt: absent", "{b}");
    let b = s.run(json!({"prompt": "@exists=README.md", "repo_url": url})).await;
    assert_eq!(b["output"], "README.md: present", "{b}");
    // And the workspaces are gone once the jobs end.
    let workspaces = s.agent.data.path().join("data/workspaces");
    assert!(eventually(Duration::from_secs(60), || std::fs::read_dir(&workspaces).map(|d| d.count() == 0).unwrap_or(true)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_diff_shows_new_changed_deleted_and_binary_files() {
    let s = setup(None, &[]).await;
    let (_seed, _, second) = demo(&s.git);
    let b = s
        .run(json!({
            "prompt": "@write=src/new.rs @write=README.md @delete=old.txt @write_binary=logo.png",
            "repo_url": s.git.url("demo"), "include_diff": true
        }))
        .await;
    ok(&b);
    assert_eq!(b["commit"], second.as_str());
    let diff = b["diff"].as_str().unwrap();
    assert!(diff.contains("diff --git a/src/new.rs b/src/new.rs\nnew file mode 100644"), "{diff}");
    assert!(diff.contains("+written by the stand-in: src/new.rs"), "{diff}");
    assert!(diff.contains("-# demo, second edition\n+written by the stand-in: README.md"), "{diff}");
    assert!(diff.contains("diff --git a/old.txt b/old.txt\ndeleted file mode 100644") && diff.contains("-to be deleted"), "{diff}");
    assert!(diff.contains("Binary files /dev/null and b/logo.png differ"), "{diff}");
    assert_eq!(b["diff_truncated"], false);
    let mut files: Vec<(String, String)> = b["files_changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["status"].as_str().unwrap().to_string()))
        .collect();
    files.sort();
    let expected = [("README.md", "modified"), ("logo.png", "added"), ("old.txt", "deleted"), ("src/new.rs", "added")];
    assert_eq!(files, expected.map(|(p, k)| (p.to_string(), k.to_string())));
    assert!(b["pushed_commit"].is_null() && b["pushed_branch"].is_null());

    // Without include_diff, no diff; with a tiny MAX_DIFF_BYTES, a cut one.
    let b = s.run(json!({"prompt": "@write=a.txt", "repo_url": s.git.url("demo")})).await;
    assert!(b.get("diff").is_none() && b.get("files_changed").is_none(), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_diff_is_cut_at_max_diff_bytes() {
    let s = setup(None, &[("MAX_DIFF_BYTES", "300")]).await;
    demo(&s.git);
    let prompt: String = (0..20).map(|i| format!("@write=f{i:02}.txt ")).collect();
    let b = s.run(json!({"prompt": prompt, "repo_url": s.git.url("demo"), "include_diff": true})).await;
    ok(&b);
    assert_eq!(b["diff_truncated"], true, "{b}");
    assert!(b["diff"].as_str().unwrap().len() <= 300);
    assert_eq!(b["files_changed"].as_array().unwrap().len(), 20, "every path is listed even when the diff is cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_branch_pushes_a_commit_but_never_to_the_default_branch() {
    let s = setup(None, &[("GIT_AUTHOR_NAME", "Spark Bot"), ("GIT_AUTHOR_EMAIL", "bot@spark.example")]).await;
    let (seed, _, second) = demo(&s.git);
    let url = s.git.url("demo");
    let b = s
        .run(json!({"prompt": "@write=CHANGELOG.md", "repo_url": url, "push_branch": "claude/changelog", "commit_message": "Add a changelog"}))
        .await;
    ok(&b);
    let pushed = b["pushed_commit"].as_str().expect("a commit was pushed").to_string();
    assert_eq!(b["pushed_branch"], "claude/changelog");
    assert_eq!(seed.server_git(&["rev-parse", "refs/heads/claude/changelog"]), pushed, "the server has it");
    assert_eq!(seed.server_git(&["log", "-1", "--format=%an <%ae>|%s|%P", &pushed]), format!("Spark Bot <bot@spark.example>|Add a changelog|{second}"));
    assert_eq!(seed.server_git(&["show", &format!("{pushed}:CHANGELOG.md")]), "written by the stand-in: CHANGELOG.md");

    // The next job on that branch builds on it: a fast-forward. A default message names the job.
    let b = s.run(json!({"prompt": "@write=more.txt", "repo_url": url, "branch": "claude/changelog", "push_branch": "claude/changelog"})).await;
    ok(&b);
    let next = b["pushed_commit"].as_str().unwrap();
    assert_eq!(seed.server_git(&["rev-parse", "refs/heads/claude/changelog"]), next);
    assert_eq!(seed.server_git(&["log", "-1", "--format=%s", next]), format!("Changes by Claude Runner job {}", b["job_id"].as_str().unwrap()));

    // Not onto a branch that went elsewhere (no force), not onto the default branch.
    seed.git(&["checkout", "-q", "-b", "diverged", "feature"]);
    let diverged = seed.commit(&[("elsewhere.txt", b"elsewhere\n")], "elsewhere");
    seed.git(&["checkout", "-q", "main"]);
    let b = s.run(json!({"prompt": "@write=x.txt", "repo_url": url, "push_branch": "diverged"})).await;
    assert!(repo_error(&b).contains("never force-pushes"), "{b}");
    assert_eq!(seed.server_git(&["rev-parse", "refs/heads/diverged"]), diverged, "diverged was not forced");
    let b = s.run(json!({"prompt": "@write=x.txt", "repo_url": url, "push_branch": "main"})).await;
    assert!(repo_error(&b).contains("default branch"), "{b}");
    assert_eq!(seed.server_git(&["rev-parse", "refs/heads/main"]), second, "main never moved");

    // No changes: no commit.
    let b = s.run(json!({"prompt": "nothing to do", "repo_url": url, "push_branch": "claude/empty"})).await;
    ok(&b);
    assert!(b["pushed_commit"].is_null(), "{b}");
    assert_eq!(b["pushed_branch"], "claude/empty");
    assert_eq!(on_server(&seed, "claude/empty"), None);

    // A failed job pushes nothing.
    let b = s.run(json!({"prompt": "@write=y.txt @is_error", "repo_url": url, "push_branch": "claude/failed"})).await;
    assert_eq!(b["error_code"], "CLAUDE_ERROR");
    assert!(b["pushed_commit"].is_null());
}

/// A file Claude staged (`git add`) and then deleted failed the push: the sizes measured
/// before it read every staged path from the working tree, where that one was gone
/// (hostile review s34, 1). The push goes, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_staged_then_deleted_does_not_fail_the_push() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    let prompt = "@write=scratch.txt @write=notes.txt @git_add=scratch.txt @git_add=notes.txt @delete=scratch.txt";
    let b = s.run(json!({"prompt": prompt, "repo_url": s.git.url("demo"), "push_branch": "claude/staged", "include_diff": true})).await;
    ok(&b);
    let pushed = b["pushed_commit"].as_str().expect("a commit was pushed");
    assert_eq!(on_server(&seed, "claude/staged").as_deref(), Some(pushed));
    let files = seed.server_git(&["ls-tree", "-r", "--name-only", pushed]);
    assert!(files.contains("notes.txt") && !files.contains("scratch.txt"), "{files}");
    let listed: Vec<&str> = b["files_changed"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(listed, ["notes.txt"], "{b}");
}

/// The commit the server's `branch` points at, if it has that branch.
fn on_server(seed: &Seed, branch: &str) -> Option<String> {
    let out = std::process::Command::new("git").args(["rev-parse", "--verify", "-q", &format!("refs/heads/{branch}")]).current_dir(&seed.bare).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every file under `dir` that holds `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_needs_the_token_which_never_leaks() {
    let git = GitServer::start(Some(TOKEN));
    let seed = git.seed("private", &[("plan.md", b"plans\n")]);
    let url = git.url("private");
    let right = format!("{}={TOKEN}", git.host());
    let wrong = format!("{}=wrong-token-value-0000000", git.host());

    // Without a token: a clear refusal. With a wrong one: refused, and said so.
    let s = setup_with_git(git, &[]).await;
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    assert!(e.contains("needs authentication and the runner has no token") && e.contains("REPO_TOKENS"), "{e}");
    let s = setup_with_git(s.git, &[("REPO_TOKENS", &wrong)]).await;
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    assert!(e.contains("refused the runner's token"), "{e}");

    // With it: the job runs, the diff comes back, the push goes through.
    let s = setup_with_git(s.git, &[("REPO_TOKENS", &right)]).await;
    let b = s
        .run(json!({
            "prompt": "@write=notes.md @print_env=REPO_TOKENS", "repo_url": url,
            "include_diff": true, "push_branch": "claude/notes"
        }))
        .await;
    ok(&b);
    assert_eq!(b["output"], "the value is ", "Claude's environment has no REPO_TOKENS");
    assert!(b["diff"].as_str().unwrap().contains("notes.md"));
    assert_eq!(seed.server_git(&["rev-parse", "refs/heads/claude/notes"]), b["pushed_commit"].as_str().unwrap());
    assert!(s.git.requests().iter().any(|r| r.authorization.is_some()), "the token went to the git server");
    let mut answers = vec![b];

    // The token's host is no secret (rev25, 4): a file naming the server is pushed, shown
    // in the diff, and an error names the host, none of it masked.
    let named = format!("see {url}\n");
    let prompt = format!("@write_b64=server.txt,{}", b64(named.as_bytes()));
    let b = s.run(json!({"prompt": prompt, "repo_url": url, "include_diff": true, "push_branch": "claude/server"})).await;
    ok(&b);
    assert!(b["diff"].as_str().unwrap().contains(&format!("+see {url}")), "{b:#}");
    assert_eq!(seed.server_git(&["show", "claude/server:server.txt"]), named.trim_end());
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": s.git.url("missing")})).await);
    assert!(e.contains(&s.git.host()) && !e.contains("REDACTED"), "{e}");
    answers.push(b);

    // Claude writes a secret of the machine (its own OAuth token) into the repository:
    // the diff is redacted and nothing is pushed; the diff comes back beside the refusal
    // (it was thrown away with it: `"diff": null`).
    let leak = json!({"prompt": "@write_env=CLAUDE_CODE_OAUTH_TOKEN,leak.txt", "repo_url": url, "include_diff": true, "push_branch": "claude/leak"});
    let b = s.run(leak).await;
    let e = repo_error(&b);
    assert!(e.contains("contain a secret"), "{e}");
    assert!(b["pushed_commit"].is_null());
    assert!(b["diff"].as_str().is_some_and(|d| d.contains("+[REDACTED]")), "{b}");
    let b = s.run(json!({"prompt": "@write_env=CLAUDE_CODE_OAUTH_TOKEN,leak.txt", "repo_url": url, "include_diff": true})).await;
    ok(&b);
    assert!(b["diff"].as_str().unwrap().contains("+[REDACTED]"), "{b}");
    answers.push(b);

    // The token is nowhere: not in answers, the agent's log, what Claude inherited, the
    // mirror's files or anything else under DATA_DIR.
    let text = serde_json::to_string(&answers).unwrap();
    assert!(!text.contains(TOKEN) && !text.contains("test-token-not-real"), "a token leaked into a result: {text}");
    assert!(!s.agent.log().contains(TOKEN), "the token leaked into the agent's log");
    for run in s.agent.claude_runs() {
        let env = &run["env"];
        assert!(env.get("REPO_TOKENS").is_none() && env.get("GITHUB_TOKEN").is_none(), "Claude inherited a token setting: {env}");
        assert!(!run.to_string().contains(TOKEN), "the token reached Claude");
    }
    let data = s.agent.data.path().join("data");
    assert!(data.join("repos").exists());
    assert_eq!(files_containing(&data, TOKEN.as_bytes()), Vec::<String>::new(), "the token is in a file under DATA_DIR");
    let mirror = std::fs::read_dir(data.join("repos")).unwrap().flatten().find(|e| e.path().is_dir()).unwrap().path();
    let config = std::fs::read_to_string(mirror.join("config")).unwrap();
    assert!(!config.contains("[remote") && !config.contains("url"), "a mirror's config names no remote: {config}");
}

/// An edge and an agent using `git`.
async fn setup_with_git(git: GitServer, agent_env: &[(&str, &str)]) -> Setup {
    let keys = Keys::new(&["spark"]);
    let edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let mut opts = AgentOpts::for_edge(&edge, "spark")
        .env("ALLOWED_REPO_HOSTS", &format!("github.com,{}", git.host()))
        .env("SSL_CERT_FILE", &git.cert_file.display().to_string());
    for (k, v) in agent_env {
        opts = opts.env(k, v);
    }
    let agent = AgentProc::start(opts);
    let client = Client::new(&edge.url());
    client.wait_online().await;
    Setup { _edge: edge, agent, client, git }
}

/// Each says what to do; a server that cannot be reached answered `retryable: false`
/// while its words said "then retry" (rev22 5): it is the one that is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_repositories_and_disallowed_hosts_are_clear_repo_errors() {
    let s = setup(None, &[]).await;
    let missing = s.run(json!({"prompt": "x", "repo_url": s.git.url("no-such-repo")})).await;
    let e = repo_error(&missing);
    assert!(e.contains("was not found: check `repo_url`"), "{e}");
    assert_eq!(missing["retryable"], false, "the same request finds no repository later: {missing:#}");
    // A host not in ALLOWED_REPO_HOSTS: refused before any connection is made.
    let before = s.git.requests().len();
    let other = format!("https://localhost:{}/demo.git", s.git.port);
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": other})).await);
    assert!(e.contains(&format!("`localhost:{}` is not allowed", s.git.port)) && e.contains("ALLOWED_REPO_HOSTS"), "{e}");
    assert_eq!(s.git.requests().len(), before, "nothing was fetched from a disallowed host");
    // Nobody listening: a network error that says what to try.
    let nobody = closed_port();
    let closed = format!("https://127.0.0.1:{}/demo.git", nobody.port);
    let s2 = setup_with_git(GitServer::start(None), &[("ALLOWED_REPO_HOSTS", &closed[8..closed.len() - 9])]).await;
    let unreachable = s2.run(json!({"prompt": "x", "repo_url": closed})).await;
    let e = repo_error(&unreachable);
    assert!(e.contains("could not reach") && e.contains("allow_stale"), "{e}");
    // Its words say "then retry": the same request may work once the server answers (or
    // on another runner), and `retryable` says so too.
    assert_eq!(unreachable["retryable"], true, "{unreachable:#}");
    assert!(s.agent.claude_runs().is_empty() && s2.agent.claude_runs().is_empty(), "Claude never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_dir_symlink_cannot_leave_the_checkout() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    std::os::unix::fs::symlink("/etc", seed.work.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../..", seed.work.join("docs/up")).unwrap();
    std::os::unix::fs::symlink("docs", seed.work.join("manual")).unwrap();
    seed.commit(&[], "links");
    let url = s.git.url("demo");
    for dir in ["escape", "docs/up", "escape/ssl"] {
        let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": url, "working_dir": dir})).await);
        assert!(e.contains("leaves the checkout") || e.contains("does not exist"), "{dir}: {e}");
    }
    assert!(s.agent.claude_runs().is_empty(), "Claude never ran outside the checkout");
    // A link that stays inside is fine.
    let b = s.run(json!({"prompt": "@exists=guide.md", "repo_url": url, "working_dir": "manual"})).await;
    assert_eq!(b["output"], "guide.md: present", "{b}");
    assert!(s.last_run()["cwd"].as_str().unwrap().ends_with("/docs"));
}

/// A folder of the repository shaped as a git directory (`HEAD`, `objects/`, `refs/`, and a
/// `config` naming a command as `core.fsmonitor`) ran that command through the `git
/// status` Claude Code runs in its working directory, no tool allowed (hostile review
/// rev25, 1). Such a `working_dir` is refused, and git in Claude's environment uses no
/// repository it was not pointed at explicitly (`safe.bareRepository=explicit`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_shaped_as_a_git_directory_runs_nothing() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    let marks = TempDir::new("fsmonitor-marks");
    let marker = marks.path().join("FSMONITOR_RAN");
    let config = format!("[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tworktree = ..\n\tfsmonitor = \"touch {}; false\"\n", marker.display());
    seed.commit(
        &[("tools/HEAD", b"ref: refs/heads/main\n"), ("tools/config", config.as_bytes()), ("tools/objects/.keep", b"-"), ("tools/refs/.keep", b"-")],
        "a folder shaped as a git directory",
    );
    let url = s.git.url("demo");
    for dir in ["tools", "tools/refs"] {
        let e = repo_error(&s.run(json!({"prompt": "@git_status", "repo_url": url, "working_dir": dir})).await);
        assert!(e.contains("git directory"), "{dir}: {e}");
    }
    assert!(s.agent.claude_runs().is_empty(), "Claude never ran in it");
    // A job's git, walked into that folder, does not take it for a repository either.
    let b = s.run(json!({"prompt": "@git_status=tools", "repo_url": url})).await;
    ok(&b);
    assert!(!marker.exists(), "the repository's command ran through git status");
}

/// A server that names refs without end: libgit2 read the whole list into memory before
/// the refs could be counted, up to the git worker's 4 GiB, and fetched again, taken for a
/// fault of the mirror (hostile review rev25, 5). The list is cut as it is read, and the
/// fetch is not tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_ref_advertisement_is_cut_as_it_is_read() {
    let s = setup(None, &[]).await;
    demo(&s.git);
    s.git.endless_refs(true);
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await);
    assert_cut_said(&e, "fetched");
    let listings = s.git.requests().iter().filter(|r| r.path.ends_with("/info/refs")).count();
    assert_eq!(listings, 1, "the fetch was tried again: {:?}", s.git.requests());
    assert!(s.agent.claude_runs().is_empty());
}

/// That `e` says a list of refs was cut, counted in lines, not in refs (it said "has
/// 1000001 branches and tags", counting each annotated tag's second line and every other
/// ref), that nothing was `done`, and what to do (rev28).
fn assert_cut_said(e: &str, done: &str) {
    assert!(e.contains("list of refs") && e.contains("ran past 1000000 lines") && e.contains(&format!("nothing was {done}")), "{e}");
    assert!(e.contains("delete old tags and branches"), "{e}");
    assert!(!e.contains("branches and tags, more than"), "lines said as refs: {e}");
}

/// A push whose server lists refs without end was cut as a fetch's listing is, but said
/// as the network's failure ("could not reach … send allow_stale", rev28): it says the
/// list was cut and nothing was pushed, and the job's diff still comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_ref_advertisement_on_push_is_cut_and_said_so() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    s.git.endless_push_refs(true);
    let b = s.run(json!({"prompt": "@write=x.txt", "repo_url": s.git.url("demo"), "push_branch": "claude/x", "include_diff": true})).await;
    let e = repo_error(&b);
    assert_cut_said(&e, "pushed");
    assert!(!e.contains("could not reach"), "{e}");
    assert!(b["diff"].as_str().is_some_and(|d| d.contains("x.txt")), "{b}");
    assert_eq!(on_server(&seed, "claude/x"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_on_one_repository_fetch_one_at_a_time_and_both_succeed() {
    let s = setup(None, &[("MAX_CONCURRENT_JOBS", "2")]).await;
    demo(&s.git);
    let url = s.git.url("demo");
    // Slow answers make overlapping fetches certain if the lock were missing.
    s.git.delay(Duration::from_millis(300));
    let (a, b) = tokio::join!(
        s.client.execute(json!({"prompt": "one @sleep=200", "repo_url": url})),
        s.client.execute(json!({"prompt": "two @sleep=200", "repo_url": url})),
    );
    for x in [&a, &b] {
        assert_eq!(x.status, 200);
        ok(&x.body);
    }
    let fetches: Vec<_> = s.git.requests().into_iter().filter(|r| r.service() == "upload-pack").collect();
    assert!(fetches.len() >= 2, "{fetches:#?}");
    for (i, x) in fetches.iter().enumerate() {
        for y in &fetches[i + 1..] {
            assert!(x.ended <= y.started || y.ended <= x.started, "two fetches overlapped: {x:?} and {y:?}");
        }
    }
    // Both Claudes ran at once, each in its own checkout.
    let runs = s.agent.claude_runs();
    assert_eq!(runs.len(), 2);
    assert_ne!(runs[0]["cwd"], runs[1]["cwd"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_mirrors_are_evicted_under_a_tiny_cache_limit() {
    let s = setup(None, &[("REPO_CACHE_MAX_BYTES", "1")]).await;
    demo(&s.git);
    s.git.seed("other", &[("a.txt", b"a\n")]);
    let repos = s.agent.data.path().join("data/repos");
    let names = || -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(&repos).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
        n.sort();
        n
    };
    ok(&s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await);
    let first = names();
    assert_eq!(first.len(), 1, "{first:?}");
    ok(&s.run(json!({"prompt": "x", "repo_url": s.git.url("other")})).await);
    assert!(eventually(Duration::from_secs(60), || { let n = names(); n.len() == 1 && n != first }).await, "the idle mirror was evicted: {:?}", names());
    // The evicted repository comes back when used again.
    ok(&s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await);
    assert!(s.agent.log().contains("mirror evicted"), "{}", s.agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_fetch_is_bounded_by_the_job_timeout() {
    let s = setup(None, &[("MAX_CONCURRENT_JOBS", "2")]).await;
    demo(&s.git);
    s.git.seed("other", &[("a.txt", b"a\n")]);
    let url = s.git.url("demo");
    ok(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    s.git.stall(Some("demo"));
    let started = Instant::now();
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": url, "timeout_ms": 2000})).await);
    assert!(e.contains("did not finish within the job's timeout_ms (2000 ms)"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "ended at the job's timeout, not libgit2's");
    // Another repository is not held up by the hung one.
    ok(&s.run(json!({"prompt": "x", "repo_url": s.git.url("other"), "timeout_ms": 60000})).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_runs_on_the_last_fetched_state_only_with_allow_stale() {
    let s = setup(None, &[]).await;
    let (seed, _, second) = demo(&s.git);
    let url = s.git.url("demo");
    ok(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    // The server loses the repository (a 404 from now on).
    std::fs::rename(&seed.bare, seed.bare.with_extension("moved")).unwrap();
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    assert!(e.contains("was not found"), "{e}");
    let b = s.run(json!({"prompt": "@exists=README.md", "repo_url": url, "allow_stale": true})).await;
    ok(&b);
    assert_eq!(b["commit"], second.as_str(), "the last fetched state");
    assert_eq!(b["output"], "README.md: present");
    // No mirror at all: nothing stale to run on.
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": s.git.url("never-fetched"), "allow_stale": true})).await);
    assert!(e.contains("was not found"), "{e}");
}

/// After a restart with the server gone, the agent has no fetched state of its own: the
/// mirror's refs and `HEAD` on disk are a job's to rewrite (a job moved `main` to its own
/// commit and ran the next caller's stale job on it, rev11 1). A stale run needs a fetch
/// since the agent started, with `push_branch` or without (hostile reviews rev25 L6,
/// rev26 M2, rev11 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_run_needs_a_fetch_since_the_agent_started() {
    let mut s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    let url = s.git.url("demo");
    ok(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    std::fs::rename(&seed.bare, seed.bare.with_extension("moved")).unwrap();
    s.agent.restart();
    s.client.wait_online().await;
    for job in [json!({"prompt": "@write=a.txt", "repo_url": url, "allow_stale": true, "push_branch": "claude/x"}), json!({"prompt": "x", "repo_url": url, "allow_stale": true})] {
        let e = repo_error(&s.run(job).await);
        assert!(e.contains("was not found") && e.contains("`allow_stale` could not help: this agent has no fetched state"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checkouts_are_kept_only_with_keep_failed_workspaces() {
    let s = setup(None, &[("KEEP_FAILED_WORKSPACES", "1")]).await;
    demo(&s.git);
    let url = s.git.url("demo");
    let failed = s.run(json!({"prompt": "@write=half-done.txt @is_error", "repo_url": url})).await;
    assert_eq!(failed["error_code"], "CLAUDE_ERROR");
    let ok_job = s.run(json!({"prompt": "@write=done.txt", "repo_url": url})).await;
    ok(&ok_job);
    let workspaces = s.agent.data.path().join("data/workspaces");
    let kept = workspaces.join(failed["job_id"].as_str().unwrap());
    assert!(kept.join("half-done.txt").exists() && kept.join("README.md").exists(), "the failed checkout is kept for a post-mortem");
    // Removed right after its result is sent (off the job's path).
    let done = workspaces.join(ok_job["job_id"].as_str().unwrap());
    assert!(eventually(Duration::from_secs(60), || !done.exists()).await, "a successful one is not");
    assert!(s.agent.log().contains("workspace kept"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_and_tokens_stay_with_their_host() {
    // The allowed host sends the runner to another server: neither the fetch nor the token
    // may follow.
    let elsewhere = GitServer::start(None);
    elsewhere.seed("demo", &[("README.md", b"elsewhere\n")]);
    let git = GitServer::start(Some(TOKEN));
    git.seed("demo", &[("README.md", b"home\n")]);
    let tokens = format!("{}={TOKEN}", git.host());
    // The agent trusts both servers: only the redirect policy stands in the way.
    let bundle = elsewhere.dir.path().join("both.pem");
    let pems = [&git.cert_file, &elsewhere.cert_file].map(|p| std::fs::read_to_string(p).unwrap());
    std::fs::write(&bundle, pems.concat()).unwrap();
    let s = setup_with_git(git, &[("REPO_TOKENS", &tokens), ("SSL_CERT_FILE", &bundle.display().to_string())]).await;
    // Another host name (libgit2 refuses redirects to other hosts; a port is not one).
    s.git.redirect(Some(&format!("https://localhost:{}", elsewhere.port)));
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await);
    assert!(e.contains("redirect"), "{e}");
    assert!(elsewhere.requests().is_empty(), "nothing went to the other server: {:?}", elsewhere.requests());
    assert!(s.agent.claude_runs().is_empty());

    // Another port of the same host name: libgit2 follows that redirect (its policy is by
    // host name), but the token, bound to host and port, stays home.
    let greedy = GitServer::start(Some(TOKEN));
    greedy.seed("demo", &[("README.md", b"greedy
")]);
    let pems = [&s.git.cert_file, &greedy.cert_file].map(|p| std::fs::read_to_string(p).unwrap());
    std::fs::write(&bundle, pems.concat()).unwrap();
    let s = setup_with_git(s.git, &[("REPO_TOKENS", &tokens), ("SSL_CERT_FILE", &bundle.display().to_string())]).await;
    s.git.redirect(Some(&format!("https://127.0.0.1:{}", greedy.port)));
    repo_error(&s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await);
    assert!(!greedy.requests().is_empty(), "libgit2 followed the redirect (if it no longer does, tighten this test)");
    assert!(greedy.requests().iter().all(|r| r.authorization.is_none()), "the token went to another port: {:?}", greedy.requests());
}

/// The mirror of `s`'s only repository so far.
fn only_mirror(s: &Setup) -> std::path::PathBuf {
    let repos = s.agent.data.path().join("data/repos");
    let mut mirrors: Vec<_> = std::fs::read_dir(repos).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.')).collect();
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    mirrors.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_an_agent_killed_mid_fetch_does_not_block_the_repository() {
    let mut s = setup(None, &[]).await;
    demo(&s.git);
    let url = s.git.url("demo");
    ok(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    // SIGKILL while libgit2 rewrote a ref: its lock file stays (the moment is too short to
    // hit by chance, so the test leaves the lock where libgit2 would have).
    s.agent.kill();
    // The edge must have seen the killed agent go: until then `/health` still says 200 for
    // its old connection, and a job sent in between finds nobody (503).
    s.client.wait_health(503).await;
    std::fs::write(only_mirror(&s).join("refs/heads/main.lock"), "").unwrap();
    s.agent.ensure_running();
    s.client.wait_online().await;
    ok(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    assert!(s.agent.log().contains("removing a file a killed fetch left in a mirror"), "{}", s.agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_left_by_an_agent_killed_mid_job_is_removed_when_it_starts_again() {
    let mut s = setup(None, &[]).await;
    demo(&s.git);
    let job = s.client.submit(json!({"prompt": "@sleep=60000", "repo_url": s.git.url("demo")})).await;
    let job_id = job.body["job_id"].as_str().unwrap().to_string();
    let workspace = s.agent.data.path().join("data/workspaces").join(&job_id);
    assert!(eventually(Duration::from_secs(60), || !s.agent.claude_runs().is_empty()).await);
    assert!(workspace.join("README.md").exists());
    s.agent.kill();
    s.agent.ensure_running();
    s.client.wait_online().await;
    assert_eq!(s.client.wait_job(&job_id, Duration::from_secs(60)).await["state"], "lost");
    assert!(!workspace.exists(), "the lost job's checkout is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_outlasts_the_job_is_reported_as_it_ended_on_the_server() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    // The server takes the push at once and answers after the job's timeout plus the
    // agent's grace for handing changes back (10 s), within the 15 s more the agent waits
    // for a push under way (and libgit2's 30 s wait for an answer). The job has 5 s: with
    // 1 s, the fetch, checkout and Claude outlasted it on a loaded machine, and nothing
    // was pushed at all.
    s.git.delay_push_answers(Duration::from_secs(20));
    let b = s.run(json!({"prompt": "@write=late.txt", "repo_url": s.git.url("demo"), "push_branch": "claude/late", "timeout_ms": 5000})).await;
    let on_server = on_server(&seed, "claude/late").expect("the server took the push");
    // The answer says what happened: the branch moved, so it is not "nothing pushed".
    assert_eq!(b["pushed_commit"], on_server.as_str(), "{b:#}");
    ok(&b);
}

/// A cancel during the hand-back went unheard (the job's stop was Claude's run's alone): a
/// push not yet begun still went out after `DELETE /jobs/{id}` (hostile review of
/// repository jobs, 1). Here the push waits for the server's first answer, its commit not
/// yet on its way, when the cancel comes: nothing is pushed, and the job ends cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_hand_back_stops_a_push_not_yet_begun() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    let a = s.client.submit(json!({"prompt": "@write=late.txt @sleep=3000", "repo_url": s.git.url("demo"), "push_branch": "claude/cancelled", "timeout_ms": 120000})).await;
    let job_id = a.body["job_id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(60), || !s.agent.claude_runs().is_empty()).await);
    s.git.stall(Some("demo"));
    assert!(eventually(Duration::from_secs(60), || s.agent.log().contains("claude finished")).await);
    let d = s.client.send("DELETE", &format!("/jobs/{job_id}"), Some(SECRET), None).await;
    assert_eq!(d.status, 202, "{}", d.text);
    let job = s.client.wait_job(&job_id, Duration::from_secs(60)).await;
    s.git.stall(None);
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(job["result"]["error"].as_str().unwrap().contains("not pushed"), "{job}");
    assert_eq!(on_server(&seed, "claude/cancelled"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_files_are_not_pushed_and_pushes_do_not_hold_them_in_memory() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    let url = s.git.url("demo");
    ok(&s.run(json!({"prompt": "x", "repo_url": url})).await);
    let pid = s.agent.pid().unwrap();
    let before = proc_status_kib(pid, "VmHWM").unwrap();
    // Six files of 15 MiB: pushed, without the agent holding them all in memory at once.
    let prompt: String = (0..6).map(|i| format!("@write_random=data{i}.bin,15 ")).collect();
    let b = s.run(json!({"prompt": prompt, "repo_url": url, "push_branch": "claude/data", "timeout_ms": 120000})).await;
    ok(&b);
    assert_eq!(seed.server_git(&["rev-parse", "refs/heads/claude/data"]), b["pushed_commit"].as_str().unwrap());
    let grown_mib = (proc_status_kib(pid, "VmHWM").unwrap().saturating_sub(before)) / 1024;
    assert!(grown_mib < 60, "pushing 90 MiB of new files took {grown_mib} MiB more memory");
    // The branch goes, so the next job's fetch (every branch) does not bring the 90 MiB
    // back: this test's server packs a whole answer before its first byte (no keep-alive
    // as git's own upload-pack sends), which on a loaded machine outlasted the agent's
    // 30 s read timeout ("SSL error: … Resource temporarily unavailable").
    seed.server_git(&["update-ref", "-d", "refs/heads/claude/data"]);
    // One file over what git servers take (GitHub: 100 MiB): refused before anything is
    // read, with what to do.
    let b = s.run(json!({"prompt": "@write_random=dump.bin,101 @write=notes.txt", "repo_url": url, "push_branch": "claude/dump", "timeout_ms": 120000})).await;
    let e = repo_error(&b);
    assert!(e.contains("dump.bin") && e.contains("100 MiB") && e.contains(".gitignore"), "{e}");
    assert!(b["pushed_commit"].is_null());
    assert_eq!(on_server(&seed, "claude/dump"), None);
}

/// A `REPO_ERROR` sentence names what the job made (a file too big to push), and was sent
/// to the caller, and logged, as it was: a job that named a file after Claude's token
/// (`$CLAUDE_CODE_OAUTH_TOKEN`) got the token out in clear, past the redaction of
/// Claude's output. Every error of a result is masked now, in one place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_error_naming_a_secret_is_redacted() {
    let s = setup(None, &[]).await;
    let (seed, _, _) = demo(&s.git);
    let url = s.git.url("demo");
    let token = s.agent.env_value("CLAUDE_CODE_OAUTH_TOKEN").unwrap();
    let b = s.run(json!({"prompt": format!("@write_random={token}.bin,101"), "repo_url": url, "push_branch": "claude/leak", "timeout_ms": 120000})).await;
    let e = repo_error(&b);
    assert!(e.contains("100 MiB") && !e.contains(&token), "{e}");
    assert!(!b.to_string().contains(&token), "{b:#}");
    assert!(!s.agent.log().contains(&token), "{}", s.agent.log());
    assert_eq!(on_server(&seed, "claude/leak"), None);
    // Empty, under the push's size limit: the name alone went to the server in the tree
    // (hostile review rev22, F1). Refused now, as a secret in the changes is.
    let b = s.run(json!({"prompt": format!("@write_random={token}.bin,0"), "repo_url": url, "push_branch": "claude/leak", "timeout_ms": 120000})).await;
    let e = repo_error(&b);
    assert!(!e.contains(&token) && !b.to_string().contains(&token), "{b:#}");
    assert_eq!(on_server(&seed, "claude/leak"), None, "the token reached the git server as a file name");
}

/// `REPO_MAX_CHECKOUT_BYTES`: a commit whose files take more is refused before Claude
/// runs, saying what to do, and leaves no workspace behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_over_repo_max_checkout_bytes_is_refused() {
    let s = setup(None, &[("REPO_MAX_CHECKOUT_BYTES", "10")]).await;
    demo(&s.git);
    let b = s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await;
    let e = repo_error(&b);
    assert!(e.contains("too large to check out") && e.contains("REPO_MAX_CHECKOUT_BYTES"), "{e}");
    assert!(s.agent.claude_runs().is_empty(), "Claude ran");
    let workspaces = s.agent.data.path().join("data/workspaces");
    assert!(eventually(Duration::from_secs(30), || std::fs::read_dir(&workspaces).map(|d| d.count() == 0).unwrap_or(true)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_words_cannot_forge_log_lines() {
    let s = setup(None, &[]).await;
    demo(&s.git);
    let forged = "2026-01-01T00:00:00.000000Z  INFO claude_runner::runner: pushed job_id=forged";
    s.git.refuse_fetches(Some(&format!("repository disabled\n{forged}\r\x1b[2Kstill the server")));
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await);
    assert!(e.contains("repository disabled"), "{e}");
    assert!(!e.contains(['\n', '\r', '\x1b']), "the error is one line: {e:?}");
    assert!(s.agent.log().lines().all(|l| !l.starts_with(forged)), "a forged line in the log:\n{}", s.agent.log());
}

/// A git server's own words of a full disk (an `ERR` packet: its disk, or a hostile
/// server's words) were read as the runner's full disk: the job was told the repository
/// "needs more free space than the disk holding DATA_DIR has", not retryable (hostile
/// review rev31, 3). Only the runner's own OS says its disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_servers_words_of_a_full_disk_are_not_the_runners_full_disk() {
    let s = setup(None, &[]).await;
    demo(&s.git);
    s.git.refuse_fetches(Some("fatal: unable to create temporary file: No space left on device"));
    let b = s.run(json!({"prompt": "x", "repo_url": s.git.url("demo")})).await;
    let e = repo_error(&b);
    assert!(e.contains("unable to create temporary file") && !e.contains("DATA_DIR"), "the server's words, as the server's: {e}");
    let health = s.client.health_full().await;
    assert_eq!(health.body["agents"][0]["takes_work"], true, "{}", health.text);
    assert!(s.agent.claude_runs().is_empty(), "Claude ran");
}

/// A path of the repository with a full disk's words between quotes of its own
/// (`x'No space left on device'y/.git`, which libgit2's checkout refuses, quoting the
/// path) was read as a full disk, split at each quote; the disk had room, so the job was
/// told another process filled it meanwhile, "retry" — and failed so at every retry
/// (hostile review rev31, 4). A checkout's refusal of a path is never a full disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_naming_a_full_disk_between_quotes_is_no_full_disk() {
    let s = setup(None, &[]).await;
    let seed = s.git.seed("evil", &[("README.md", b"# evil\n")]);
    let script = r#"set -e
b=$(echo hi | git hash-object -w --stdin)
inner=$(printf "100644 blob $b\t.git\n" | git mktree)
outer=$(printf "040000 tree $inner\tx'No space left on device'y\n100644 blob $b\tREADME.md\n" | git mktree)
git update-ref refs/heads/bad $(git commit-tree -m bad $outer)"#;
    let out = std::process::Command::new("sh").arg("-c").arg(script).current_dir(&seed.bare).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = s.run(json!({"prompt": "x", "repo_url": s.git.url("evil"), "branch": "bad"})).await;
    let e = repo_error(&b);
    assert!(!e.contains("DATA_DIR") && !e.contains("filled the disk"), "a path taken for a full disk: {e}");
    assert_eq!(b["retryable"], false, "the same commit fails the same: {b:#}");
    assert!(s.agent.claude_runs().is_empty(), "Claude ran");
}

/// What a job's own git configuration could steer, it steers no more. A `pushInsteadOf`
/// in its checkout's `.git/config` sent the job's commit, with the runner's token, to
/// another repository of the host — onto that one's default branch, past the check made
/// on the requested one; an `insteadOf` in its mirror's config (found through the
/// checkout's alternates) made every later job on the repository, whoever sent it, start
/// from another repository's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_git_config_sends_neither_its_push_nor_later_fetches_elsewhere() {
    let git = GitServer::start(Some(TOKEN));
    let right = format!("{}={TOKEN}", git.host());
    let s = setup_with_git(git, &[("REPO_TOKENS", &right)]).await;
    let (seed, _, second) = demo(&s.git);
    let url = s.git.url("demo");
    // Another repository of the host: the same history, its default branch `prod`.
    let victim = s.git.bare("victim");
    harness::git_server::git(s.git.dir.path(), &["clone", "-q", "--bare", seed.bare.to_str().unwrap(), victim.to_str().unwrap()]);
    harness::git_server::git(&victim, &["branch", "prod", "main"]);
    harness::git_server::git(&victim, &["symbolic-ref", "HEAD", "refs/heads/prod"]);
    harness::git_server::git(&victim, &["config", "http.receivepack", "true"]);
    s.git.seed("evil", &[("README.md", b"# EVIL\n")]);
    let (victim_url, evil_url) = (s.git.url("victim"), s.git.url("evil"));

    let prompt = format!("@write=CHANGELOG.md @git_config=url.{victim_url}.pushInsteadOf,{url} @mirror_git_config=url.{evil_url}.insteadOf,{url}");
    let b = s.run(json!({"prompt": prompt, "repo_url": url, "push_branch": "prod"})).await;
    ok(&b);
    let pushed = b["pushed_commit"].as_str().expect("a commit was pushed");
    assert_eq!(on_server(&seed, "prod").as_deref(), Some(pushed), "the requested repository has the commit");
    assert_eq!(harness::git_server::git(&victim, &["rev-parse", "prod"]), second, "the other repository's default branch moved");

    // A later job on the repository, as another caller would send it.
    let b = s.run(json!({"prompt": "@print_file_b64=README.md", "repo_url": url})).await;
    ok(&b);
    assert_eq!(b["commit"], second.as_str(), "the later job started elsewhere");
    assert_eq!(b["output"], format!("the file is {}", b64(b"# demo, second edition\n")));
    let elsewhere: Vec<String> = s.git.requests().iter().filter(|r| !r.path.starts_with("/demo.git/")).map(|r| format!("{} {}", r.method, r.path)).collect();
    assert!(elsewhere.is_empty(), "the runner talked to other repositories: {elsewhere:?}");
}

/// A `branch` that is a whole sha was looked up as a branch first: anyone who can push
/// could make `refs/heads/<reviewed sha>` and serve other code to a caller pinning the
/// reviewed commit. A whole sha is that commit; a short one that is also a branch's name
/// is refused, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_sha_is_that_commit_even_with_a_branch_of_that_name() {
    let s = setup(None, &[]).await;
    let (seed, first, second) = demo(&s.git);
    let url = s.git.url("demo");
    seed.git(&["push", "-q", "origin", &format!("{second}:refs/heads/{first}"), &format!("{second}:refs/heads/{}", &first[..12])]);
    let b = s.run(json!({"prompt": "@print_file_b64=README.md", "repo_url": url, "branch": first})).await;
    ok(&b);
    assert_eq!(b["commit"], first.as_str(), "the branch named after the pinned commit won");
    assert_eq!(b["output"], format!("the file is {}", b64(b"# demo\n")));
    let e = repo_error(&s.run(json!({"prompt": "x", "repo_url": url, "branch": &first[..12]})).await);
    assert!(e.contains("names both a branch") && e.contains(&first) && e.contains("send the whole sha"), "{e}");
}

/// `https://host/x` and `https://host/x.git` are two repositories on a plain git server,
/// but were one mirror: a job for `x.git` that waited behind a fetch of `x` took that fetch
/// as its own and ran on `x`'s code. Two mirrors now, each fetched for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_and_x_git_are_two_repositories_and_never_share_a_fetch() {
    let s = setup(None, &[("MAX_CONCURRENT_JOBS", "3")]).await;
    let seed = s.git.seed("x", &[("README.md", b"# x.git\n")]);
    let x_git_head = seed.git(&["rev-parse", "HEAD"]);
    // Another repository at `x`, without `.git`, on the same server.
    let other = seed.bare.with_file_name("x");
    harness::git_server::git(s.git.dir.path(), &["init", "-q", "--bare", other.to_str().unwrap()]);
    let work = s.git.dir.path().join("work/x-other");
    std::fs::create_dir_all(&work).unwrap();
    harness::git_server::git(&work, &["init", "-q"]);
    std::fs::write(work.join("README.md"), "# x, another repository\n").unwrap();
    harness::git_server::git(&work, &["add", "-A"]);
    harness::git_server::git(&work, &["commit", "-q", "-m", "other"]);
    harness::git_server::git(&work, &["push", "-q", other.to_str().unwrap(), "HEAD:refs/heads/main"]);
    let x_head = harness::git_server::git(&work, &["rev-parse", "HEAD"]);
    let x_git = s.git.url("x");
    let x = x_git.strip_suffix(".git").unwrap().to_string();
    // Slow fetches: the second job on `x` waits behind the first, the one on `x.git` behind both.
    s.git.delay(Duration::from_millis(400));
    let mut ids = Vec::new();
    for url in [&x, &x, &x_git] {
        let a = s.client.submit(json!({"prompt": "x", "repo_url": url})).await;
        ids.push((url.clone(), a.body["job_id"].as_str().expect("accepted").to_string()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (url, id) in ids {
        let r = s.client.wait_job(&id, Duration::from_secs(60)).await;
        let want = if url == x_git { &x_git_head } else { &x_head };
        assert_eq!(r["result"]["commit"].as_str(), Some(want.as_str()), "a job on {url} ran on the other repository's code: {r:#}");
    }
}

/// A job writes Claude's login into the checkout, base64-encoded (no `sk-ant-` shape), and
/// moves the credentials file away before it ends: the push check's redactor, built from
/// the file as it then stood, knew no token, and the tokens were pushed and shown in the
/// diff (hostile review rev36b, 1). The login the agent has read stays a secret: nothing
/// is pushed, and the diff is masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_written_into_the_checkout_is_not_pushed_once_the_credentials_file_is_hidden() {
    let s = setup(None, &[]).await;
    let (access, refresh) = ("hidden-access-3f9a1c7e5b2d4086-a71e", "hidden-refresh-8e1d6b3a9c7f2054-5c0b");
    let file = json!({"claudeAiOauth": {"accessToken": access, "refreshToken": refresh, "expiresAt": 4_102_444_800_000u64, "scopes": ["user:inference"], "subscriptionType": "max"}}).to_string();
    let path = s.agent.data.path().join("claude-config/.credentials.json");
    std::fs::write(&path, &file).unwrap();
    let (seed, _, _) = demo(&s.git);
    let go = s.agent.data.path().join("go");
    // The stand-in waits for `go` before it writes: the file is hidden by then.
    let prompt = format!("@await={} @write_b64=leak.txt,{}", go.display(), b64(b64(file.as_bytes()).as_bytes()));
    let job = s.client.submit(json!({"prompt": prompt, "repo_url": s.git.url("demo"), "include_diff": true, "push_branch": "claude/leak"})).await;
    let job_id = job.body["job_id"].as_str().expect("accepted").to_string();
    assert!(eventually(Duration::from_secs(30), || !s.agent.claude_runs().is_empty()).await, "{}", s.agent.log());
    std::fs::rename(&path, path.with_file_name("away.json")).unwrap();
    std::fs::write(&go, "").unwrap();
    let done = s.client.wait_job(&job_id, Duration::from_secs(60)).await;
    let error = done["result"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("contain a secret"), "{done:#}");
    assert_eq!(on_server(&seed, "claude/leak"), None, "the login was pushed");
    assert!(done["result"]["diff"].as_str().is_some_and(|d| d.contains("[REDACTED]")), "{done:#}");
    let diff = done["result"]["diff"].as_str().unwrap_or_default();
    let added = diff.lines().filter(|l| l.starts_with('+') && !l.starts_with("+++")).map(|l| &l[1..]).collect::<String>();
    for token in [access, refresh] {
        assert!(!readable_in_base64(&added, token), "the token {token} reached the caller in the diff: {diff}");
    }
}
