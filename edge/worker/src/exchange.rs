//! Worker requests and responses ⇄ the core's HTTP types. The core decides every status
//! and body; this module reads what it needs from a request (bounded: no more than
//! `MAX_BODY_BYTES` of a body is ever held in memory) and writes its answers out.

use futures::StreamExt;
use shared::contract::ApiError;
use worker::{Request, Response};

/// A core answer as a worker response.
pub fn respond(answer: edge_core::http::Response) -> worker::Result<Response> {
    Ok(Response::builder()
        .with_status(answer.status)
        .with_header("content-type", answer.content_type)?
        .fixed(answer.body.into_bytes()))
}

/// A `text/event-stream` answer carrying the chunks until the sender side is dropped
/// (the job ended). Unlike the native host it sends no keep-alive comments: a Worker's
/// response is not cut for silence the way an origin behind a Tunnel is.
pub fn event_stream(chunks: futures::channel::mpsc::UnboundedReceiver<String>) -> worker::Result<Response> {
    let stream = chunks.map(|chunk| Ok::<Vec<u8>, worker::Error>(chunk.into_bytes()));
    let mut response = Response::from_stream(stream)?;
    response.headers_mut().set("content-type", edge_core::http::SSE_CONTENT_TYPE)?;
    response.headers_mut().set("cache-control", "no-cache")?;
    Ok(response)
}

/// An error answer with the contract's JSON body.
pub fn error(err: &ApiError) -> worker::Result<Response> {
    respond(edge_core::http::Response::error(err.clone()))
}

/// The answer while the edge cannot run (a setting is wrong, or storage failed): 500 with
/// `INTERNAL_ERROR`, or 503 on `/health` so health checks read it as "not usable".
pub fn unavailable(path: &str, message: &str) -> worker::Result<Response> {
    respond(edge_core::http::unavailable(path, message))
}

/// `/agent/connect` without a WebSocket upgrade.
pub fn upgrade_required() -> worker::Result<Response> {
    let mut err = ApiError::invalid(
        "/agent/connect is the agents' WebSocket endpoint: it needs `Upgrade: websocket` (run `claude-runner agent` with EDGE_URL pointing here)",
    );
    err.status = 426;
    error(&err)
}

/// How much of an oversized body is read (and dropped) before giving up on the caller.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Reads the body, keeping at most `limit` bytes. `Ok(None)`: it is larger. An oversized
/// body is still read to its end (and dropped chunk by chunk, never held): answering while
/// the caller is still sending makes the runtime reset the connection, and the caller would
/// see a network error instead of the 413 that tells it what to fix.
pub async fn read_body(req: &mut Request, limit: usize) -> Result<Option<Vec<u8>>, String> {
    if req.inner().body().is_none() {
        return Ok(Some(Vec::new()));
    }
    let mut stream = req.stream().map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    let mut too_large = false;
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        seen += chunk.len();
        if too_large {
            // Drained up to a bound; past it the caller is just cut off.
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        if body.len() + chunk.len() > limit {
            too_large = true;
            body = Vec::new();
            continue;
        }
        body.extend_from_slice(&chunk);
    }
    Ok((!too_large).then_some(body))
}
