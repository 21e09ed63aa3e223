//! Worker requests and responses ⇄ the core's HTTP types. The core decides every status
//! and body; this module reads what it needs from a request (bounded: a body over
//! `MAX_BODY_BYTES` is never held in memory) and writes its answers out.

use futures::StreamExt;
use shared::contract::{ApiError, ErrorCode};
use worker::{Request, Response};

/// A core answer as a worker response.
pub fn respond(answer: edge_core::http::Response) -> worker::Result<Response> {
    Ok(Response::builder()
        .with_status(answer.status)
        .with_header("content-type", answer.content_type)?
        .fixed(answer.body.into_bytes()))
}

/// An error answer with the contract's JSON body.
pub fn error(err: &ApiError) -> worker::Result<Response> {
    respond(edge_core::http::Response::error(err.clone()))
}

/// The answer while the edge cannot run (a setting is wrong, or storage failed): 500 with
/// `INTERNAL_ERROR`, or 503 on `/health` so health checks read it as "not usable".
pub fn unavailable(path: &str, message: &str) -> worker::Result<Response> {
    let mut err = ApiError::new(ErrorCode::InternalError, message);
    if path.trim_end_matches('/') == "/health" {
        err.status = 503;
    }
    error(&err)
}

/// `/agent/connect` without a WebSocket upgrade.
pub fn upgrade_required() -> worker::Result<Response> {
    let mut err = ApiError::invalid(
        "/agent/connect is the agents' WebSocket endpoint: it needs `Upgrade: websocket` (run `claude-runner agent` with EDGE_URL pointing here)",
    );
    err.status = 426;
    error(&err)
}

/// Whether a declared `Content-Length` already exceeds the limit (the body need not be read).
pub fn declared_too_large(content_length: Option<&str>, limit: usize) -> bool {
    content_length
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|len| len > limit as u64)
}

/// Reads the body up to `limit` bytes. `Ok(None)`: it is larger (reading stopped there).
pub async fn read_body(req: &mut Request, limit: usize) -> Result<Option<Vec<u8>>, String> {
    let declared = req.headers().get("content-length").ok().flatten();
    if declared_too_large(declared.as_deref(), limit) {
        return Ok(None);
    }
    if req.inner().body().is_none() {
        return Ok(Some(Vec::new()));
    }
    let mut stream = req.stream().map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_lengths() {
        assert!(!declared_too_large(None, 10));
        assert!(!declared_too_large(Some("10"), 10));
        assert!(declared_too_large(Some(" 11 "), 10));
        // Unreadable values are left to the bounded read.
        assert!(!declared_too_large(Some("lots"), 10));
    }
}
