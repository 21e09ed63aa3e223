//! Worker requests and responses ⇄ the core's HTTP types. The core decides every status
//! and body; this module reads what it needs from a request (bounded: no more than
//! `MAX_BODY_BYTES` of a body is ever held in memory) and writes its answers out.

use edge_core::body::{Body, Intake, Next};
use edge_core::progress::{Follow, FeedOut};
use futures::StreamExt;
use shared::contract::ApiError;
use worker::{Request, Response};

/// A core answer as a worker response.
pub fn respond(answer: edge_core::Response) -> worker::Result<Response> {
    let mut builder = Response::builder().with_status(answer.status).with_header("content-type", answer.content_type)?;
    for (name, value) in &answer.headers {
        builder = builder.with_header(name, value)?;
    }
    // The text is shared with every caller given the same answer (the waiters of one job);
    // each response copies it once more, into the runtime's memory, as it is sent — the
    // copy made here lives only until then.
    Ok(builder.fixed(answer.body.as_bytes().to_vec()))
}

/// A `text/event-stream` answer carrying the follower's chunks as the runtime takes them,
/// with a keep-alive comment after every `keepalive_ms` the job is quiet
/// (`Config::sse_keepalive_ms`, the native host's rule: a follower such as `submit` tells a
/// quiet job from a dead connection by them, and a proxy in front keeps the stream open),
/// until the object lets the follower go (the job ended, or it fell too far behind).
/// The timer costs nothing to keep the object awake: an open response already does.
pub fn event_stream(out: FeedOut, keepalive_ms: u64) -> worker::Result<Response> {
    let keepalive = std::time::Duration::from_millis(keepalive_ms);
    let stream = futures::stream::unfold(Some(out), move |out| async move {
        let out = out?;
        // Dropped unfired when a chunk comes first (its drop clears the timeout).
        let quiet = std::pin::pin!(worker::Delay::from(keepalive));
        let bytes = match futures::future::select(std::pin::pin!(out.next()), quiet).await {
            futures::future::Either::Left((Follow::Chunk(chunk), _)) => chunk.as_bytes().to_vec(),
            // Cut for falling behind: an error aborts the response.
            futures::future::Either::Left((Follow::Cut, _)) => {
                return Some((Err(worker::Error::RustError("the follower fell too far behind".into())), None))
            }
            futures::future::Either::Left((Follow::End, _)) => return None,
            futures::future::Either::Right(_) => edge_core::progress::SSE_KEEPALIVE.as_bytes().to_vec(),
        };
        Some((Ok::<Vec<u8>, worker::Error>(bytes), Some(out)))
    });
    let mut response = Response::from_stream(stream)?;
    response.headers_mut().set("content-type", edge_core::progress::SSE_CONTENT_TYPE)?;
    response.headers_mut().set("cache-control", "no-cache")?;
    Ok(response)
}

/// Whether the request is a WebSocket handshake ([`edge_core::upgrade::is_handshake`], as
/// the native edge asks it); one that is not is answered 426, before its proof is looked at.
pub fn asks_for_websocket(req: &Request) -> bool {
    edge_core::upgrade::is_handshake(req.inner().method().as_str(), |name| req.headers().get(name).ok().flatten())
}

/// An error answer with the contract's JSON body.
pub fn error(err: &ApiError) -> worker::Result<Response> {
    respond(edge_core::Response::error(err.clone()))
}

/// Hears out a little of a refused request's body ([`Intake::refused`], for at most
/// [`edge_core::body::REFUSAL_DRAIN_MS`]) so its caller reads the refusal rather than a
/// reset connection; nothing is kept.
pub async fn drain_refused(req: &mut Request) {
    read_body(req, Intake::refused(), edge_core::body::REFUSAL_DRAIN_MS).await;
}

/// Reads the body as the core's [`Intake`] says: kept up to its limit, drained past it
/// (never held), a broken upload reported as such, for `within_ms` at most (then it is
/// [`Body::TimedOut`], answered 408 as on the native edge). Why the bound: a body the
/// client trickles, or never finishes, would hold its place among the isolate's bodies in
/// flight (`MAX_PENDING_BYTES`) for as long — one caller could keep every other pool's
/// bodies refused 429. Give a request's body [`edge_core::body::read_within_ms`].
pub async fn read_body(req: &mut Request, mut intake: Intake, within_ms: u64) -> Body {
    let timed_out = {
        let read = std::pin::pin!(take_body(req, &mut intake));
        // Dropped unfired when the body comes first (its drop clears the timeout).
        let bound = std::pin::pin!(worker::Delay::from(std::time::Duration::from_millis(within_ms)));
        matches!(futures::future::select(read, bound).await, futures::future::Either::Right(_))
    };
    if timed_out {
        intake.timed_out(within_ms);
    }
    intake.finish()
}

/// Feeds the body's chunks to `intake` until it has all it wants or the body ends.
async fn take_body(req: &mut Request, intake: &mut Intake) {
    if req.inner().body().is_none() {
        return;
    }
    let mut stream = match req.stream() {
        Ok(stream) => stream,
        Err(e) => return intake.failed(e.to_string()),
    };
    while let Some(chunk) = stream.next().await {
        if intake.take(chunk.as_deref().map_err(|e| e.to_string())) == Next::Stop {
            break;
        }
    }
}
