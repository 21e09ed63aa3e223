//! The server's life — bind, serve, stop — and its HTTP side: axum requests become
//! [`Command::Http`] for the driver, and the machine's answers become axum responses.

use crate::clock::Clock;
use crate::driver::{Command, Driver, Opened};
use crate::socket;
use crate::stall::{Peer, Watching};
use crate::store::Store;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use edge_core::body::{Intake, Next};
use edge_core::http::Gate;
use edge_core::progress::{Chunk, Lag, SSE_CONTENT_TYPE, SSE_KEEPALIVE};
use edge_core::{CallerId, Config};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

/// What every request handler holds: the way to the driver, and the settings it needs
/// before the driver sees the request (auth and body limits).
#[derive(Clone)]
pub(crate) struct AppState {
    pub driver: mpsc::Sender<Command>,
    pub config: Arc<Config>,
}

pub struct ServerOptions {
    pub config: Config,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
}

/// A bound, not yet serving, edge server.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    driver: Driver,
    commands: mpsc::Receiver<Command>,
    startup: Vec<edge_core::Effect>,
}

impl Server {
    /// Opens the store, restores the jobs and binds the port.
    pub async fn bind(opts: ServerOptions) -> anyhow::Result<Server> {
        let store = Store::open(&opts.data_dir)?;
        let jobs = store.load()?;
        let alerts = store.load_alerts()?;
        let restored = jobs.len();
        let config = Arc::new(opts.config.clone());
        let clock = Clock::start();
        let (machine, startup) = edge_core::Edge::restore(opts.config, jobs, Vec::new(), alerts, clock.now());
        let listener = TcpListener::bind(opts.listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {}: {e}; is another edge running there? set LISTEN to a free address", opts.listen)
        })?;
        info!(listen = %listener.local_addr()?, restored, data_dir = %opts.data_dir.display(), "edge ready");
        let (tx, commands) = mpsc::channel(1024);
        let driver = Driver::new(machine, store, clock, tx.downgrade());
        Ok(Server {
            listener,
            state: AppState { driver: tx, config },
            driver,
            commands,
            startup,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listeners have an address")
    }

    /// Serves until `shutdown` resolves; then the machine answers waiting callers and
    /// closes agent connections, and the server stops. Ends with an error if the driver
    /// task dies.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Server { listener, state, driver, commands, startup } = self;
        let mut driver_task = tokio::spawn(driver.run(commands, startup));
        // One handler: the core's gate decides what a request is (the agents' socket
        // included) before anything of its body is read.
        let app = Router::new().fallback(any(api)).with_state(state.clone());
        let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
        let driver_tx = state.driver.clone();
        tokio::spawn(async move {
            shutdown.await;
            let (done, wait) = oneshot::channel();
            if driver_tx.send(Command::Shutdown { done }).await.is_ok() {
                let _ = wait.await;
            }
            let _ = stopped_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // TCP_NODELAY on every connection, and a peer that takes nothing for long is let go
        // (stall::Watching).
        let listener = Watching(listener);
        // Graceful: the answers the machine just gave go out; the bound covers
        // connections that never close.
        let server = serve_connections(listener, app, stopped_rx.clone());
        let bound = async {
            stopped(stopped_rx).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        let result = tokio::select! {
            () = server => Ok(()),
            _ = bound => Ok(()),
            r = &mut driver_task => Err(anyhow::anyhow!("the edge's state machine stopped unexpectedly ({r:?}); restart the edge")),
        };
        driver_task.abort();
        if result.is_ok() {
            info!("edge stopped");
        }
        result
    }
}

/// How long a connection may take to send a request's head, counted from when the edge
/// starts waiting for it (the connection's start, or the end of its previous answer): a
/// peer that sends nothing, or a header line now and then and never the end of the head,
/// is let go. `axum::serve` gives hyper no timer, so it had no such bound, and whoever
/// reached the port could hold connections until the edge ran out of file descriptors.
/// (A request whose head is read is not timed by this: an `/execute` waits for minutes.)
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves each connection `listener` accepts with `app` until `stopped` turns true, then
/// lets each finish what it is answering (hyper's graceful shutdown) and returns once all
/// are closed. Each request carries its connection's peer address ([`Peer`]): unproven
/// agent connections are bounded per source.
async fn serve_connections(mut listener: Watching, app: Router, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    // Each connection's task holds a clone; once the last is dropped every one has ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        let (io, addr) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = until_stopped(&mut stopped) => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone().layer(axum::Extension(ConnectInfo(Peer(addr)))));
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service).with_upgrades();
        let (open, mut stopped) = (open.clone(), stopped.clone());
        tokio::spawn(async move {
            let _open = open;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = until_stopped(&mut stopped) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    // Stopping: no new connection is taken (they are refused, not left in the backlog).
    drop(listener);
    drop(open);
    let _ = all_closed.recv().await;
}

/// Resolves once `stopped` is true (or its sender is gone).
async fn until_stopped(stopped: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// A header's value as the Worker reads it (a Fetch `ByteString`: each byte one character,
/// Latin-1), so both hosts see the same key: `to_str` refused bytes past ASCII, and a
/// header so sent was taken for none (an `Idempotency-Key` ignored, a retry run twice).
/// A header sent more than once is its values joined with `, `, as Fetch's `get` joins
/// them: the first alone let `X-Runner-Secret: <secret>` then `X-Runner-Secret: <other>`
/// in here while the Worker refused it.
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let mut joined: String = values.next()?.as_bytes().iter().map(|&b| char::from(b)).collect();
    for value in values {
        joined.push_str(", ");
        joined.extend(value.as_bytes().iter().map(|&b| char::from(b)));
    }
    Some(joined)
}

/// Tells the driver when the client hangs up before its answer came (axum drops the
/// handler), so the machine stops keeping it.
struct HangUp {
    caller: Option<CallerId>,
    driver: mpsc::Sender<Command>,
}

impl Drop for HangUp {
    fn drop(&mut self) {
        if let Some(caller) = self.caller {
            // A full queue only delays the cleanup to the job's end.
            let _ = self.driver.try_send(Command::CallerGone { caller });
        }
    }
}

async fn api(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let secret = header(&parts.headers, "x-runner-secret");
    let authorization = header(&parts.headers, "authorization");
    // Route and secret first: no body is read for a caller without the secret, nor for a
    // route that takes none.
    let gate = edge_core::http::preflight(&state.config, parts.method.as_str(), parts.uri.path(), secret.as_deref(), authorization.as_deref());
    let read = match gate {
        Gate::Answer(refused) => {
            // A little of the body is heard out (bounded, nothing kept) so the caller reads
            // its refusal rather than a reset connection.
            let drain = Duration::from_millis(edge_core::body::REFUSAL_DRAIN_MS);
            let _ = tokio::time::timeout(drain, read_body(body, Intake::refused())).await;
            return into_response(refused);
        }
        Gate::AgentSocket => return socket::agent_connect(state, Request::from_parts(parts, body)).await,
        Gate::Handle { read_body } => read_body,
    };
    let req = edge_core::http::Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        secret_header: secret,
        authorization,
        idempotency_key: header(&parts.headers, "idempotency-key"),
        last_event_id: header(&parts.headers, "last-event-id"),
        body: if read { read_body(body, Intake::new(state.config.max_body_bytes)).await } else { edge_core::body::Body::Bytes(Vec::new()) },
    };
    let (tx, rx) = oneshot::channel();
    if state.driver.send(Command::Http { req, reply: tx }).await.is_err() {
        return into_response(edge_core::http::shutting_down());
    }
    let Ok(opened) = rx.await else { return into_response(edge_core::http::shutting_down()) };
    match opened {
        Opened::Stream { chunks, lag } => event_stream(chunks, lag, state.config.sse_keepalive_ms),
        Opened::Once { caller, max_wait_ms, mut answer } => {
            let mut hang_up = HangUp { caller: Some(caller), driver: state.driver.clone() };
            let answered = match tokio::time::timeout(Duration::from_millis(max_wait_ms), &mut answer).await {
                Ok(answered) => answered,
                Err(_) => {
                    let _ = state.driver.send(Command::WaitExpired { caller }).await;
                    answer.await
                }
            };
            hang_up.caller = None;
            match answered {
                Ok(response) => into_response(response),
                // The driver is gone: the edge is stopping.
                Err(_) => into_response(edge_core::http::shutting_down()),
            }
        }
    }
}

/// A `text/event-stream` answer: the chunks as the connection takes them (each counted
/// off `lag`), with a keep-alive comment after every `keepalive_ms` the job is quiet
/// (`Config::sse_keepalive_ms`), until the driver closes the channel.
fn event_stream(chunks: mpsc::UnboundedReceiver<Chunk>, lag: Lag, keepalive_ms: u64) -> Response {
    let keepalive = Duration::from_millis(keepalive_ms);
    let stream = futures_util::stream::unfold(Some(chunks), move |chunks| {
        let lag = lag.clone();
        async move {
            let mut chunks = chunks?;
            let chunk = match tokio::time::timeout(keepalive, chunks.recv()).await {
                Ok(Some(chunk)) => {
                    lag.taken(chunk.len());
                    chunk.to_string()
                }
                // Dropped for falling behind: an error aborts the connection.
                Ok(None) if lag.cut() => return Some((Err(std::io::Error::other("the follower fell too far behind")), None)),
                Ok(None) => return None,
                Err(_) => SSE_KEEPALIVE.to_string(),
            };
            Some((Ok(chunk), Some(chunks)))
        }
    });
    let mut out = Response::new(Body::from_stream(stream));
    out.headers_mut().insert("content-type", SSE_CONTENT_TYPE.parse().expect("static content types parse"));
    out.headers_mut().insert("cache-control", "no-cache".parse().expect("static header parses"));
    out
}

pub(crate) fn into_response(response: edge_core::Response) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = (status, response.body).into_response();
    out.headers_mut().insert("content-type", response.content_type.parse().expect("static content types parse"));
    for (name, value) in response.headers {
        // The core makes these values; one that is not a valid header value is dropped.
        if let Ok(value) = value.parse() {
            out.headers_mut().insert(name, value);
        }
    }
    out
}

/// Reads the body as the core's [`Intake`] says: kept up to the limit, drained past it.
async fn read_body(body: Body, mut intake: Intake) -> edge_core::body::Body {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        if intake.take(chunk.as_deref().map_err(|e| e.to_string())) == Next::Stop {
            break;
        }
    }
    intake.finish()
}
