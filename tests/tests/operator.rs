//! The operator's commands, run as a user would: `keygen`, `up`.

use harness::*;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_an_edge_and_a_connected_agent() {
    use std::io::BufRead;
    let data = TempDir::new("up");
    let log = std::fs::File::create(data.path().join("up.log")).unwrap();
    let mut child = Command::new(bin("claude-runner"))
        .arg("up")
        .env("CLAUDE_BIN", bin("claude-standin"))
        .env("DATA_DIR", data.path())
        .env("LISTEN", "127.0.0.1:0")
        .env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    // Everything `up` prints, line by line, as it prints it.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("up prints where it listens");
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in `{first}`"))
        .trim_end_matches(',')
        .to_string();
    let client = Client::new(&base);
    client.wait_online().await;
    // The secret it made is the one it printed in the curl line.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(data.path().join("up/up.json")).unwrap()).unwrap();
    let secret = state["runner_secret"].as_str().unwrap();
    let printed: Vec<String> = rx.try_iter().collect();
    assert!(printed.iter().any(|l| l.contains(&format!("X-Runner-Secret: {secret}"))), "{printed:?}");
    let a = client.send("POST", "/execute", Some(secret), Some(json!({"prompt": "hello from up"}).to_string().into_bytes())).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["output"], "stand-in answer to: hello from up");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "up stops cleanly on SIGTERM");
}
