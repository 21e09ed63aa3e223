//! The HTTP contract on top of the machine. A host turns its request into a [`Request`],
//! calls [`handle`], carries out the effects and either answers at once or — for
//! `/execute` — waits for the job's [`crate::Effect::Finished`]. Auth, size limits,
//! routing, validation and every status code live here, once, for both hosts.

use crate::job::Mode;
use crate::machine::{hex, Edge, Effect};
use crate::Config;
use shared::contract::{Accepted, ApiError, ErrorCode, ExecuteRequest, Limits};
use shared::Millis;
use subtle::ConstantTimeEq;

/// The parts of an HTTP request the edge looks at.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// `X-Runner-Secret`.
    pub secret_header: Option<&'a str>,
    /// `Authorization`.
    pub authorization: Option<&'a str>,
    /// `Idempotency-Key`.
    pub idempotency_key: Option<&'a str>,
    pub body: Body<'a>,
}

pub enum Body<'a> {
    Bytes(&'a [u8]),
    /// The host stopped reading past `MAX_BODY_BYTES`.
    TooLarge,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response { status, content_type: "application/json", body }
    }

    pub fn error(err: ApiError) -> Response {
        Response::json(err.status, err.to_json())
    }
}

#[derive(Debug)]
pub enum Outcome {
    Respond(Response),
    /// Hold the request open until `Effect::Finished` for this job (the machine ends
    /// every job by its deadline); answer [`waited_too_long`] if `max_wait_ms` passes.
    Wait { job_id: String, max_wait_ms: u64 },
    /// Answer 200 `text/event-stream`: write `follow.backlog`, then each
    /// `Effect::Progress` chunk of the job, then [`sse_result`] of its `Finished` body,
    /// and close (or write `follow.end` at once and close, when the job is over). While
    /// nothing happens, write [`SSE_KEEPALIVE`] every [`SSE_KEEPALIVE_MS`] so proxies
    /// (a Cloudflare Tunnel cuts a silent response at ~100 s) keep the stream open.
    Follow { job_id: String, follow: crate::machine::Follow },
}

/// Whether the request carries the runner secret, compared in constant time.
pub fn authorized(secret: &str, req: &Request) -> bool {
    let bearer = req
        .authorization
        .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")));
    [req.secret_header, bearer]
        .into_iter()
        .flatten()
        .any(|given| bool::from(given.trim().as_bytes().ct_eq(secret.as_bytes())))
}

pub const SSE_CONTENT_TYPE: &str = "text/event-stream";
pub const SSE_KEEPALIVE: &str = ": keep-alive\n\n";
pub const SSE_KEEPALIVE_MS: u64 = 15_000;

/// One progress event (one of Claude's stream-json lines) as an SSE chunk.
pub fn sse_progress(seq: u64, event: &serde_json::Value) -> String {
    format!("id: {seq}\nevent: progress\ndata: {event}\n\n")
}

/// The last chunk of a job's stream: its `/execute` answer body.
pub fn sse_result(body: &str) -> String {
    // `data:` lines cannot hold a newline; the bodies are single-line JSON already.
    format!("event: result\ndata: {}\n\n", body.replace('\n', " "))
}

/// The answer a request gets before its body is read, if that answer is a refusal: an
/// unknown route (404) or a missing or wrong secret (403). Hosts call it first so nobody
/// can make the edge read a large body without the secret; [`handle`] calls it too.
pub fn preflight(config: &Config, method: &str, path: &str, secret_header: Option<&str>, authorization: Option<&str>) -> Option<Response> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    // The agents' WebSocket proves itself inside the protocol, not with the secret.
    let open = matches!((method, segments.as_slice()), ("GET" | "HEAD", ["health"] | [""] | []) | (_, ["agent", "connect"]));
    if open {
        return None;
    }
    let known = matches!(
        segments.as_slice(),
        ["execute"] | ["oauth", "status"] | ["jobs"] | ["jobs", _] | ["jobs", _, "events"] | ["metrics"]
    );
    if !known {
        return Some(Response::error(ApiError::not_found(&format!("route {method} {path}"))));
    }
    let probe = Request { method, path, secret_header, authorization, idempotency_key: None, body: Body::Bytes(&[]) };
    if !authorized(&config.runner_secret, &probe) {
        return Some(Response::error(ApiError::unauthorized()));
    }
    None
}

/// The answer while the edge cannot run at all (a setting is wrong, storage failed):
/// 500 `INTERNAL_ERROR` saying what to fix, but 503 on `/health`, so health checks read it
/// as "not usable" like any other outage.
pub fn unavailable(path: &str, message: &str) -> Response {
    let mut err = ApiError::new(ErrorCode::InternalError, message);
    if path.trim_end_matches('/') == "/health" {
        err.status = 503;
    }
    Response::error(err)
}

/// The answer to a caller still waiting on a job when the edge stops: the job is kept
/// (and its agent's result will be stored), so say where to find it.
pub fn edge_stopping(job_id: &str) -> Response {
    Response::error(
        ApiError::new(
            ErrorCode::RunnerOffline,
            format!("the edge is restarting; the job is kept: follow it with GET /jobs/{job_id}, or run the task elsewhere"),
        )
        .with_job(job_id),
    )
}

/// Routes one request. `entropy` makes the id of a new job.
pub fn handle(edge: &mut Edge, now: Millis, entropy: [u8; 16], req: Request) -> (Outcome, Vec<Effect>) {
    let respond = |r: Response| (Outcome::Respond(r), Vec::new());
    let path = req.path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = req.method;

    // Routes without auth.
    match (method, segments.as_slice()) {
        ("GET" | "HEAD", ["health"]) => {
            let health = edge.health(now);
            let status = health.status.http_status();
            return respond(Response::json(status, to_json(&health)));
        }
        ("GET" | "HEAD", [""] | []) => {
            return respond(Response {
                status: 200,
                content_type: "text/plain; charset=utf-8",
                body: "claude-runner edge: POST /execute, GET /health, GET /oauth/status, /jobs (X-Runner-Secret)\n".into(),
            })
        }
        _ => {}
    }
    if let Some(refused) = preflight(edge.config(), method, req.path, req.secret_header, req.authorization) {
        return respond(refused);
    }
    let body = match req.body {
        Body::Bytes(b) if b.len() <= edge.config().max_body_bytes => b,
        _ => return respond(Response::error(ApiError::too_large(edge.config().max_body_bytes))),
    };
    let limits = Limits { max_timeout_ms: edge.config().max_timeout_ms };
    match (method, segments.as_slice()) {
        ("POST", ["execute"]) => {
            let submission = match ExecuteRequest::parse(body, req.idempotency_key, limits) {
                Ok(s) => s,
                Err(e) => return respond(Response::error(e)),
            };
            let timeout_ms = submission.spec.timeout_ms;
            match edge.submit(now, job_id(now, entropy), submission, Mode::Wait) {
                Err(e) => respond(Response::error(e)),
                Ok(s) => {
                    if let Some((status, body)) = edge.job(&s.job_id).and_then(|j| j.answer()) {
                        return (Outcome::Respond(Response::json(status, body)), s.effects);
                    }
                    let cfg = edge.config();
                    // The machine ends the job by then; this bound only guards the host.
                    let max_wait_ms = timeout_ms
                        .saturating_mul(2)
                        .saturating_add(cfg.timeout_margin_ms)
                        .saturating_add(cfg.lost_after_ms)
                        .saturating_add(60_000);
                    (Outcome::Wait { job_id: s.job_id, max_wait_ms }, s.effects)
                }
            }
        }
        ("POST", ["jobs"]) => {
            let submission = match ExecuteRequest::parse(body, req.idempotency_key, limits) {
                Ok(s) => s,
                Err(e) => return respond(Response::error(e)),
            };
            match edge.submit(now, job_id(now, entropy), submission, Mode::Detached) {
                Err(e) => respond(Response::error(e)),
                Ok(s) => {
                    let state = edge.job(&s.job_id).map(|j| j.state).expect("submitted jobs exist");
                    let status = if s.existing { 200 } else { 202 };
                    let body = to_json(&Accepted { job_id: s.job_id, state });
                    (Outcome::Respond(Response::json(status, body)), s.effects)
                }
            }
        }
        ("GET", ["jobs", id, "events"]) => match edge.follow(id) {
            Some(follow) => (Outcome::Follow { job_id: id.to_string(), follow }, Vec::new()),
            None => respond(Response::error(ApiError::job_not_found(id))),
        },
        ("GET", ["jobs", id]) => match edge.job(id) {
            Some(job) => respond(Response::json(200, to_json(&job.view()))),
            None => respond(Response::error(ApiError::job_not_found(id))),
        },
        ("DELETE", ["jobs", id]) => match edge.cancel(now, id) {
            Ok(effects) => {
                let view = edge.job(id).map(|j| j.view()).expect("cancelled jobs exist");
                (Outcome::Respond(Response::json(202, to_json(&view))), effects)
            }
            Err(e) => respond(Response::error(e)),
        },
        ("GET", ["oauth", "status"]) => match edge.oauth_status(now) {
            Some(status) => respond(Response::json(200, to_json(&status))),
            None => respond(Response::error(ApiError::new(
                ErrorCode::RunnerOffline,
                "no agent has reported its login yet; start `claude-runner agent` on the runner machine",
            ))),
        },
        ("GET", ["metrics"]) => respond(Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics(edge),
        }),
        _ => respond(Response::error(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {}", req.path),
        ))),
    }
}

/// The answer when a host's own wait bound passes before the job ended (it should not).
pub fn waited_too_long(edge: &Edge, job_id: &str) -> Response {
    match edge.job(job_id).and_then(|j| j.answer()) {
        Some((status, body)) => Response::json(status, body),
        None => Response::error(
            ApiError::new(
                ErrorCode::Timeout,
                format!("the job is still running; follow it with GET /jobs/{job_id}"),
            )
            .with_job(job_id),
        ),
    }
}

/// Job ids sort by creation time: 12 hex digits of milliseconds, then 16 of entropy.
fn job_id(now: Millis, entropy: [u8; 16]) -> String {
    format!("{now:012x}{}", hex(&entropy[..8]))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("views serialise")
}

fn metrics(edge: &Edge) -> String {
    let mut out = String::new();
    let mut line = |name: &str, help: &str, kind: &str, samples: Vec<(String, u64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let s = &edge.stats;
    line("claude_runner_jobs_submitted_total", "Jobs accepted.", "counter", vec![(String::new(), s.submitted)]);
    line(
        "claude_runner_jobs_finished_total",
        "Jobs ended, by final state.",
        "counter",
        s.finished.iter().map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v)).collect(),
    );
    line("claude_runner_orders_rejected_total", "Orders the agent refused.", "counter", vec![(String::new(), s.rejected_orders)]);
    line("claude_runner_agents_refused_total", "Agent connections refused.", "counter", vec![(String::new(), s.refused_agents)]);
    line("claude_runner_jobs_queued", "Jobs waiting for an agent.", "gauge", vec![(String::new(), edge.queued() as u64)]);
    line("claude_runner_jobs_active", "Jobs dispatched or running.", "gauge", vec![(String::new(), edge.active_jobs() as u64)]);
    line("claude_runner_agents_connected", "Agents connected.", "gauge", vec![(String::new(), edge.health(0).agents.len() as u64)]);
    out
}
