//! `claude-runner login`: log the runner's Claude in again from any terminal. The edge
//! relays `claude auth login` to the agent (`POST /oauth/login`); this prints the URL to
//! open, reads the code the sign-in page shows, and sends it (`POST /oauth/login/code`).
//! Exit status: 0 logged in, 1 the login failed, 2 the edge could not start it.

use serde_json::{json, Value};
use std::io::{BufRead, Write};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The edge's HTTP(S) URL, e.g. https://claude-runner-edge.<you>.workers.dev
    #[arg(long, env = "CLAUDE_RUNNER_URL")]
    pub edge: String,
    #[arg(long, env = "RUNNER_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The agent to log in (default: the one that needs it).
    #[arg(long)]
    pub agent_id: Option<String>,
}

async fn post(http: &reqwest::Client, url: &str, secret: &str, body: Value) -> Result<(u16, Value), String> {
    let resp = http.post(url).header("X-Runner-Secret", secret).json(&body).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

pub async fn run(args: LoginArgs) -> anyhow::Result<i32> {
    let base = args.edge.trim_end_matches('/');
    // The relay answers once the agent's `claude auth login` has printed its URL, or has
    // the outcome: allow for the edge's own wait.
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(150)).build()?;
    let body = match &args.agent_id {
        Some(id) => json!({"agent_id": id}),
        None => json!({}),
    };
    let (status, start) = match post(&http, &format!("{base}/oauth/login"), &args.secret, body).await {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("claude-runner login: cannot reach the edge at {base}: {e}; check --edge (CLAUDE_RUNNER_URL)");
            return Ok(2);
        }
    };
    let (Some(login_id), Some(url)) = (start["login_id"].as_str(), start["url"].as_str()) else {
        eprintln!("claude-runner login: the edge could not start a login ({status}): {}", start["error"].as_str().unwrap_or("no readable answer"));
        return Ok(2);
    };
    eprintln!("Open this URL in a browser, sign in, and paste the code it shows (agent {}):", start["agent_id"].as_str().unwrap_or("?"));
    println!("{url}");
    eprint!("Code: ");
    let _ = std::io::stderr().flush();
    let mut code = String::new();
    std::io::stdin().lock().read_line(&mut code)?;
    let code = code.trim();
    if code.is_empty() {
        eprintln!("claude-runner login: no code given; the login on the runner is given up in 10 minutes (or start again)");
        return Ok(1);
    }
    let (status, done) = match post(&http, &format!("{base}/oauth/login/code"), &args.secret, json!({"login_id": login_id, "code": code})).await {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("claude-runner login: lost the edge while sending the code: {e}; check GET /oauth/status");
            return Ok(2);
        }
    };
    if done["state"] == "logged_in" {
        let oauth = &done["oauth"];
        eprintln!(
            "Logged in: {} ({}), work runs again.",
            oauth["source"].as_str().unwrap_or("?"),
            oauth["subscription_type"].as_str().unwrap_or("subscription")
        );
        return Ok(0);
    }
    eprintln!("claude-runner login: the login failed ({status}): {}", done["error"].as_str().unwrap_or("no readable answer"));
    Ok(1)
}
