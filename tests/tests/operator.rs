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
        .env("LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("npm install -g @anthropic-ai/claude-code"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_an_edge_and_a_connected_agent() {
    let data = TempDir::new("up");
    let port = free_port();
    let log = std::fs::File::create(data.path().join("up.log")).unwrap();
    let mut child = Command::new(bin("claude-runner"))
        .arg("up")
        .env("CLAUDE_BIN", bin("claude-standin"))
        .env("DATA_DIR", data.path())
        .env("LISTEN", format!("127.0.0.1:{port}"))
        .env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-up-test-token")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let client = Client::new(&format!("http://127.0.0.1:{port}"));
    assert!(eventually(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await);
    client.wait_online().await;
    // The secret it made is the one it printed in the curl line.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(data.path().join("up/up.json")).unwrap()).unwrap();
    let secret = state["runner_secret"].as_str().unwrap();
    let a = client.send("POST", "/execute", Some(secret), Some(json!({"prompt": "hello from up"}).to_string().into_bytes())).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["output"], "stand-in answer to: hello from up");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut out = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains(&format!("X-Runner-Secret: {secret}")), "{out}");
    assert!(status.success(), "up stops cleanly on SIGTERM");
}
