//! The phone page (`GET /`) in real headless Chromium, on both edges: it loads under its
//! Content-Security-Policy with nothing from elsewhere, keeps the secret in memory, shows
//! an offline agent as offline, walks a re-login through a stand-in `claude auth login`,
//! cancels a job, and shows a paused agent beside a working one. The browser is driven by `tests/page/page.mjs` (Debian's `chromium`
//! through npm's `playwright-core`); screenshots at phone size (390×844) are saved under
//! `target/screenshots/page-<edge>/`.
//!
//! Runs when `CHROMIUM` and `PLAYWRIGHT_CORE` are set (`tests/run` installs both and sets
//! them); otherwise each test prints a one-line notice and passes.

use harness::*;
use std::path::PathBuf;
use std::time::Duration;

/// The browser and its driver, or None (after a notice).
fn browser() -> Option<(String, String)> {
    match (std::env::var("CHROMIUM"), std::env::var("PLAYWRIGHT_CORE")) {
        (Ok(c), Ok(p)) if !c.is_empty() && !p.is_empty() => Some((c, p)),
        _ => {
            eprintln!("page test not run: set CHROMIUM and PLAYWRIGHT_CORE (tests/run does)");
            None
        }
    }
}

fn screenshots(kind: EdgeKind) -> PathBuf {
    let target = bin_dir().parent().map(|p| p.to_path_buf()).unwrap_or_else(std::env::temp_dir);
    target.join("screenshots").join(format!("page-{kind:?}").to_lowercase())
}

async fn drive(kind: EdgeKind, edge: &EdgeServer, scenario: &str, browser: &(String, String)) {
    drive_at(kind, edge, "/", scenario, browser).await
}

async fn drive_at(kind: EdgeKind, edge: &EdgeServer, page_path: &str, scenario: &str, (chromium, playwright): &(String, String)) {
    let script = repo_root().join("tests/page/page.mjs");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(&script)
        .arg(scenario)
        .env("PAGE_URL", edge.url())
        .env("RUNNER_SECRET", SECRET)
        .env("SCREENSHOTS", screenshots(kind))
        .env("CHROMIUM", chromium)
        .env("PLAYWRIGHT_CORE", playwright)
        .env("LOGIN_CODE", "good-page-code")
        .env("PAGE_PATH", page_path)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output()).await.expect("the page test ends within 5 minutes").unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{scenario} on the {kind:?} edge:\n{text}\nedge log:\n{}", edge.log());
    eprintln!("{text}");
}

async fn the_page_shows_an_offline_agent_and_walks_a_relogin(kind: EdgeKind) {
    let Some(browser) = browser() else { return };
    let keys = Keys::new(&["spark", "spark2"]);
    let edge = EdgeServer::start(kind, &keys, &[]);
    drive(kind, &edge, "offline", &browser).await;
    // Opened at `//` (the edge serves the page at any path of slashes): its requests still
    // go to this edge, not to `//health`, a host named `health`, with the secret.
    drive_at(kind, &edge, "//", "offline", &browser).await;

    // An agent without a login, and a job waiting for one.
    let _agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark").env("CLAUDE_CODE_OAUTH_TOKEN", ""));
    let client = Client::new(&edge.url());
    client.wait_needs_login().await;
    let held = client.submit(json!({"prompt": "@sleep=60000 waits for the login"})).await;
    assert_eq!(held.status, 202, "{}", held.text);
    drive(kind, &edge, "relogin", &browser).await;
    let job = client.wait_job(held.body["job_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(job["state"], "cancelled", "{job}");

    // A second agent, paused by the operator: the page lists both, each with its state.
    let _second = AgentProc::start(AgentOpts::for_edge(&edge, "spark2"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.health_full().await.body["agents"].as_array().map_or(0, |a| a.iter().filter(|a| a["connected"] == true).count()) < 2 {
        assert!(std::time::Instant::now() < deadline, "the second agent never showed up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let paused = client.send("POST", "/agents/spark2/pause", Some(SECRET), None).await;
    assert_eq!(paused.status, 200, "{}", paused.text);
    drive(kind, &edge, "paused", &browser).await;
    for name in ["offline-2-status", "relogin-2-needs-login", "relogin-5-cancelled", "paused-2-agents"] {
        assert!(screenshots(kind).join(format!("{name}.png")).exists(), "{name}.png saved");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_page() {
    the_page_shows_an_offline_agent_and_walks_a_relogin(EdgeKind::Native).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn worker_page() {
    require_worker_bundle();
    the_page_shows_an_offline_agent_and_walks_a_relogin(EdgeKind::Worker).await
}
