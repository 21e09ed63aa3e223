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
    max_body_bytes: usize,
}

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
        let max_body_bytes = opts.config.max_body_bytes;
        let (machine, startup) = edge_core::Edge::restore(opts.config, jobs, Vec::new(), now_ms());
        let listener = TcpListener::bind(opts.listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {}: {e}; is another edge running there? set LISTEN to a free address", opts.listen)
        })?;
        info!(listen = %listener.local_addr()?, restored, data_dir = %opts.data_dir.display(), "edge ready");
        let (tx, commands) = mpsc::channel(1024);
        Ok(Edge {
            listener,
            shared: Shared { pool: tx, max_body_bytes },
            pool: Pool::new(machine, store),
            commands,
            startup,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listeners have an address")
    }

    /// Serves until `shutdown` resolves, then closes agent connections and stops.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Edge { listener, shared, pool, commands, startup } = self;
        let pool_task = tokio::spawn(pool.run(commands, startup));
        let app = Router::new()
            .route("/agent/connect", any(agent_connect))
            .fallback(any(api))
            .with_state(shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let pool_tx = shared.pool.clone();
        tokio::spawn(async move {
            shutdown.await;
            let (done, wait) = oneshot::channel();
            if pool_tx.send(Command::Shutdown { done }).await.is_ok() {
                let _ = wait.await;
            }
            // Give writers a moment to send the close frames.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = stop_tx.send(());
        });
        let server = axum::serve(listener, app.into_make_service());
        tokio::select! {
            r = server => r?,
            _ = stop_rx => info!("edge stopped"),
        }
        pool_task.abort();
        Ok(())
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn api(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, shared.max_body_bytes).await.ok().map(|b| b.to_vec());
    let req = HttpRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        secret_header: header(&parts.headers, "x-runner-secret"),
        authorization: header(&parts.headers, "authorization"),
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
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = (status, response.body).into_response();
    out.headers_mut().insert("content-type", response.content_type.parse().expect("static content types parse"));
    out
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
            let err = shared::contract::ApiError::invalid(
                "/agent/connect is the agent's WebSocket; run `claude-runner agent` with EDGE_URL pointing here",
            );
            let mut r = Response::new(Body::from(err.to_json()));
            *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
            return r;
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
                // The protocol is JSON text; treat binary as a protocol error.
                let cmd = Command::Frame { session: session.clone(), text: "<binary frame>".into() };
                let _ = shared.pool.send(cmd).await;
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
