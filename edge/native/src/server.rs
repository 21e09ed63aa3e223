//! axum routes over the pool task, and the server's life: bind, serve, shut down.

use crate::pool::{Command, HttpRequest, Outbound, Pool, Reply};
use crate::store::Store;
use crate::now_ms;
use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use edge_core::Config;
use futures_util::{SinkExt, StreamExt};
use shared::protocol::MAX_FRAME_BYTES;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

#[derive(Clone)]
struct Shared {
    pool: mpsc::Sender<Command>,
    config: std::sync::Arc<Config>,
}

/// How much of an oversized body is read (and dropped) so the caller can read its 413
/// instead of a reset connection; past this the connection is simply closed.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

pub struct EdgeOptions {
    pub config: Config,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
}

/// A bound, not yet serving, edge.
pub struct Edge {
    listener: TcpListener,
    shared: Shared,
    pool: Pool,
    commands: mpsc::Receiver<Command>,
    startup: Vec<edge_core::Effect>,
}

impl Edge {
    /// Opens the store, restores the jobs and binds the port.
    pub async fn bind(opts: EdgeOptions) -> anyhow::Result<Edge> {
        let store = Store::open(&opts.data_dir)?;
        let jobs = store.load()?;
        let restored = jobs.len();
        let config = std::sync::Arc::new(opts.config.clone());
        let (machine, startup) = edge_core::Edge::restore(opts.config, jobs, Vec::new(), now_ms());
        let listener = TcpListener::bind(opts.listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {}: {e}; is another edge running there? set LISTEN to a free address", opts.listen)
        })?;
        info!(listen = %listener.local_addr()?, restored, data_dir = %opts.data_dir.display(), "edge ready");
        let (tx, commands) = mpsc::channel(1024);
        Ok(Edge {
            listener,
            shared: Shared { pool: tx, config },
            pool: Pool::new(machine, store),
            commands,
            startup,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listeners have an address")
    }

    /// Serves until `shutdown` resolves; then answers waiting callers, closes agent
    /// connections and stops. Ends with an error if the state machine's task dies.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Edge { listener, shared, pool, commands, startup } = self;
        let mut pool_task = tokio::spawn(pool.run(commands, startup));
        let app = Router::new()
            .route("/agent/connect", any(agent_connect))
            .fallback(any(api))
            .with_state(shared.clone());
        let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
        let pool_tx = shared.pool.clone();
        tokio::spawn(async move {
            shutdown.await;
            let (done, wait) = oneshot::channel();
            if pool_tx.send(Command::Shutdown { done }).await.is_ok() {
                let _ = wait.await;
            }
            let _ = stopped_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // Graceful: in-flight answers (the waiters just told the edge is stopping) go out;
        // the bound covers connections that never close (an agent that does not answer
        // the close).
        // TCP_NODELAY on every connection: agent frames and answers are small and
        // latency-bound; Nagle with delayed ACKs would add ~40 ms per job.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, app.into_make_service()).with_graceful_shutdown(stopped(stopped_rx.clone()));
        let bound = async {
            stopped(stopped_rx).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        let result = tokio::select! {
            r = server => r.map_err(anyhow::Error::from),
            _ = bound => Ok(()),
            r = &mut pool_task => Err(anyhow::anyhow!("the edge's state machine stopped unexpectedly ({r:?}); restart the edge")),
        };
        pool_task.abort();
        if result.is_ok() {
            info!("edge stopped");
        }
        result
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn api(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let secret = header(&parts.headers, "x-runner-secret");
    let authorization = header(&parts.headers, "authorization");
    // Route and secret first: no body is read for a caller without the secret.
    if let Some(refused) =
        edge_core::http::preflight(&shared.config, parts.method.as_str(), parts.uri.path(), secret.as_deref(), authorization.as_deref())
    {
        return into_response(refused);
    }
    let bytes = read_body(body, shared.config.max_body_bytes).await;
    let req = HttpRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        secret_header: secret,
        authorization,
        idempotency_key: header(&parts.headers, "idempotency-key"),
        body: bytes,
    };
    let (tx, rx) = oneshot::channel();
    if shared.pool.send(Command::Http { req, reply: tx }).await.is_err() {
        return stopping();
    }
    let Ok(reply) = rx.await else { return stopping() };
    let response = match reply {
        Reply::Now(r) => r,
        Reply::Stream { chunks } => return event_stream(chunks),
        Reply::Later { job_id, max_wait_ms, answer } => {
            match tokio::time::timeout(Duration::from_millis(max_wait_ms), answer).await {
                Ok(Ok((status, body))) => edge_core::http::Response::json(status, body),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    let _ = shared.pool.send(Command::WaitExpired { job_id, reply: tx }).await;
                    match rx.await {
                        Ok(r) => r,
                        Err(_) => return stopping(),
                    }
                }
            }
        }
    };
    into_response(response)
}

/// A `text/event-stream` answer: the pool's chunks as they come, with a keep-alive comment
/// whenever the job is quiet, until the pool closes the channel.
fn event_stream(chunks: mpsc::UnboundedReceiver<String>) -> Response {
    use edge_core::http::{SSE_CONTENT_TYPE, SSE_KEEPALIVE, SSE_KEEPALIVE_MS};
    let keepalive = Duration::from_millis(SSE_KEEPALIVE_MS);
    let stream = futures_util::stream::unfold(chunks, move |mut chunks| async move {
        let chunk = match tokio::time::timeout(keepalive, chunks.recv()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return None,
            Err(_) => SSE_KEEPALIVE.to_string(),
        };
        Some((Ok::<_, std::convert::Infallible>(chunk), chunks))
    });
    let mut out = Response::new(Body::from_stream(stream));
    out.headers_mut().insert("content-type", SSE_CONTENT_TYPE.parse().expect("static content types parse"));
    out.headers_mut().insert("cache-control", "no-cache".parse().expect("static header parses"));
    out
}

fn into_response(response: edge_core::http::Response) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = (status, response.body).into_response();
    out.headers_mut().insert("content-type", response.content_type.parse().expect("static content types parse"));
    out
}

/// The body, or `None` when it is over `limit`. An oversized body is read on (and
/// dropped) up to [`DRAIN_LIMIT`], so the caller is still listening for the 413.
async fn read_body(body: Body, limit: usize) -> Option<Vec<u8>> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return None };
        seen += chunk.len();
        if seen > limit {
            if seen > DRAIN_LIMIT {
                return None;
            }
            bytes = Vec::new();
            continue;
        }
        bytes.extend_from_slice(&chunk);
    }
    (seen <= limit).then_some(bytes)
}

fn stopping() -> Response {
    let err = shared::contract::ApiError::new(
        shared::contract::ErrorCode::RunnerOffline,
        "the edge is shutting down; retry in a moment or run the task elsewhere",
    );
    (StatusCode::SERVICE_UNAVAILABLE, err.to_json()).into_response()
}

async fn agent_connect(State(shared): State<Shared>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(_) => {
            let mut err = shared::contract::ApiError::invalid(
                "/agent/connect is the agent's WebSocket; run `claude-runner agent` with EDGE_URL pointing here",
            );
            err.status = 426;
            return into_response(edge_core::http::Response::error(err));
        }
    };
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| agent_socket(shared, socket))
}

/// One agent connection: frames in go to the pool; the pool's outbox goes out.
async fn agent_socket(shared: Shared, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut outgoing) = mpsc::unbounded_channel();
    let (tx, rx) = oneshot::channel();
    if shared.pool.send(Command::Connect { outbox, reply: tx }).await.is_err() {
        return;
    }
    let Ok(session) = rx.await else { return };
    let writer = tokio::spawn(async move {
        while let Some(out) = outgoing.recv().await {
            let result = match out {
                Outbound::Text(text) => sink.send(Message::Text(text.into())).await,
                Outbound::Close(code, reason) => {
                    let frame = CloseFrame { code, reason: reason.into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
            };
            if result.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let cmd = Command::Frame { session: session.clone(), text: text.to_string() };
                if shared.pool.send(cmd).await.is_err() {
                    break;
                }
            }
            Ok(Message::Binary(_)) => {
                let _ = shared.pool.send(Command::BinaryFrame { session: session.clone() }).await;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
        if writer.is_finished() {
            break;
        }
    }
    if let Err(e) = shared.pool.send(Command::Disconnect { session: session.clone() }).await {
        warn!(session = %session, error = %e, "pool gone while disconnecting");
    }
    writer.abort();
}
