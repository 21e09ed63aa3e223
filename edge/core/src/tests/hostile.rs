//! What a caller without the secret, an unproven connection or a forging path between
//! agent and edge can make the edge do: as little as possible (issue 7).

use super::*;
use crate::http::Gate;

fn gate(method: &str, path: &str, secret: Option<&str>) -> Gate {
    http::preflight(&config(), method, path, secret, None)
}

#[test]
fn no_body_is_read_before_auth_nor_for_a_route_that_takes_none() {
    // The agents' socket, with or without a trailing slash, never goes to the general
    // handler (which would read a body).
    for path in ["/agent/connect", "/agent/connect/", "/agent/connect//"] {
        for method in ["GET", "POST"] {
            assert_eq!(gate(method, path, None), Gate::AgentSocket, "{method} {path}");
        }
    }
    for (method, path) in [("POST", "/execute"), ("POST", "/jobs"), ("POST", "/nope"), ("POST", "/agent"), ("DELETE", "/jobs/x")] {
        assert!(matches!(gate(method, path, None), Gate::Answer(_)), "{method} {path} without the secret");
    }
    for (method, path) in [("GET", "/health"), ("HEAD", "/health/"), ("GET", "/")] {
        assert_eq!(gate(method, path, None), Gate::Handle { read_body: false }, "{method} {path}");
    }
    for (method, path, read) in [
        ("POST", "/execute", true),
        ("POST", "/jobs/", true),
        ("GET", "/jobs/x", false),
        ("DELETE", "/jobs/x", false),
        ("GET", "/execute", false),
        ("GET", "/metrics", false),
        ("POST", "/oauth/status", false),
    ] {
        assert_eq!(gate(method, path, Some(SECRET)), Gate::Handle { read_body: read }, "{method} {path}");
    }
    // A long path is not echoed whole.
    let Gate::Answer(answer) = gate("GET", &format!("/{}", "x".repeat(10_000)), None) else { panic!("404") };
    assert_eq!(answer.status, 404);
    assert!(answer.body.len() < 1_000, "{}", answer.body.len());
}

#[test]
fn health_without_the_secret_is_the_verdict_alone() {
    let (mut edge, _) = ready_edge();
    let health = |edge: &mut Edge, secret: Option<&str>| {
        let req = Request {
            method: "GET".into(),
            path: "/health".into(),
            secret_header: secret.map(str::to_string),
            authorization: None,
            idempotency_key: None,
            body: Body::Bytes(Vec::new()),
        };
        let handled = http::handle(edge, 0, [0; 16], req);
        answer_to(&handled.effects, handled.caller).unwrap()
    };
    for secret in [None, Some("wrong-secret-0000000")] {
        let (status, body) = health(&mut edge, secret);
        assert_eq!(status, 200);
        assert_eq!(body, json!({"status": "healthy"}), "{secret:?}");
    }
    let (status, body) = health(&mut edge, Some(SECRET));
    assert_eq!(status, 200);
    assert_eq!(body["agent"]["agent_id"], "spark");
    assert_eq!(body["oauth"]["source"], "oauth_token_env");
    let mut offline = Edge::new(config(), 0);
    assert_eq!(health(&mut offline, None), (503, json!({"status": "offline"})));
}
