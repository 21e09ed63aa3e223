//! Behaviour only the native edge has: it is a process the operator stops and starts.
//! (A Durable Object is reset by the platform, where in-flight requests simply end; the
//! contract suite covers what survives that.)

use harness::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_edge_answers_waiting_callers_with_where_to_look() {
    let keys = Keys::new(&["spark"]);
    let mut edge = EdgeServer::start(EdgeKind::Native, &keys, &[]);
    let agent = AgentProc::start(AgentOpts::for_edge(&edge, "spark"));
    let client = Client::new(&edge.url());
    client.wait_online().await;
    let c = client.clone();
    let waiter = tokio::spawn(async move { c.execute(json!({"prompt": "@sleep=4000 keep going"})).await });
    assert!(eventually(Duration::from_secs(10), || !agent.claude_runs().is_empty()).await);
    edge.stop();
    let a = waiter.await.unwrap();
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(a.body["error_code"], "RUNNER_OFFLINE");
    assert_eq!(a.body["fallback"], true);
    let job_id = a.body["job_id"].as_str().expect("the answer names the job").to_string();
    // The job was kept and finishes once the edge is back.
    edge.restart();
    let job = client.wait_job(&job_id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
}
