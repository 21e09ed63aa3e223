//! The server's life — bind, serve, stop — and its HTTP side: axum requests become
//! [`Command::Http`] for the driver, and the machine's answers become axum responses.

use crate::clock::Clock;
use crate::connections::{Admit, Connections, Id, Over};
use crate::driver::{Command, Driver, Ended, Opened, DRAIN_POSTS};
use crate::socket;
use crate::stall::Peer;
use crate::store::Store;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use edge_core::body::{Intake, Next};
use edge_core::http::Gate;
use edge_core::progress::{FeedOut, Follow, SSE_CONTENT_TYPE, SSE_KEEPALIVE};
use edge_core::{CallerId, Config};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// What every request handler holds: the way to the driver, and the settings it needs
/// before the driver sees the request (auth and body limits).
#[derive(Clone)]
pub(crate) struct AppState {
    pub driver: mpsc::Sender<Command>,
    pub config: Arc<Config>,
    /// `EXECUTE_KEEPALIVE_MS` ([`crate::execute_keepalive`]).
    pub execute_keepalive: Option<Duration>,
    /// The driver's clock: agents' sockets stamp the frames they read with it.
    pub clock: Clock,
}

pub struct ServerOptions {
    pub config: Config,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `MAX_CONNECTIONS` as set (`None`: unset), checked here against the descriptor limit
    /// in force: only this host holds sockets, and both the edge's binary and
    /// `claude-runner up` start it through here, each reading its settings as text.
    pub max_connections: Option<String>,
    /// `EXECUTE_KEEPALIVE_MS` as read ([`crate::execute_keepalive`]; `None`: off).
    pub execute_keepalive_ms: Option<u64>,
}

/// A bound, not yet serving, edge server.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    driver: Driver,
    commands: mpsc::Receiver<Command>,
    startup: Vec<edge_core::Effect>,
    max_connections: usize,
}

impl Server {
    /// Opens the store, restores the jobs and binds the port.
    pub async fn bind(opts: ServerOptions) -> anyhow::Result<Server> {
        let mut store = Store::open(&opts.data_dir)?;
        let jobs = store.load()?;
        let alerts = store.load_alerts()?;
        let restored = jobs.len();
        let config = Arc::new(opts.config.clone());
        let clock = Clock::start();
        // A process start: the edge was down, so every job waiting for its agent waits again
        // from now (the core's `Resumed::AfterDowntime`).
        let (machine, startup) = edge_core::Edge::restart(opts.config, jobs, alerts, clock.now());
        // What the restart decided (jobs whose callers are gone ended, orphans marked, the
        // caps) is stored before anything is served: served on unstored decisions, a later
        // forget could delete a job whose end was never written (the model test found it).
        let (writes, startup) = edge_core::split_writes(startup);
        store.apply(&writes).map_err(|e| {
            anyhow::anyhow!(
                "cannot store what the restart decided in {} ({e}): check that folder's disk space and permissions, and that no other process holds its database; nothing was served",
                opts.data_dir.display()
            )
        })?;
        // Before anything is opened here; MAX_CONNECTIONS (its default, and its check)
        // follows the limit in force.
        let nofile = match runtime::nofile::raise() {
            Ok((before, after)) => {
                if before < after {
                    info!(from = before, to = after, "raised the file descriptor limit (soft) to its hard limit");
                }
                after
            }
            Err(e) => {
                let nofile = runtime::nofile::soft();
                warn!(error = %e, nofile, "could not raise the file descriptor limit to its hard limit; MAX_CONNECTIONS follows the soft one");
                nofile
            }
        };
        let max_connections = crate::connections::cap_setting(opts.max_connections.as_deref(), nofile)
            .map_err(anyhow::Error::msg)?;
        let backlog = crate::listen::backlog(max_connections, crate::listen::somaxconn());
        let listener = crate::listen::listen(opts.listen, backlog).map_err(|e| {
            anyhow::anyhow!("cannot listen on {}: {e}; is another edge running there? set LISTEN to a free address", opts.listen)
        })?;
        let callbacks = machine.callbacks_pending();
        info!(listen = %listener.local_addr()?, restored, callbacks, data_dir = %opts.data_dir.display(), max_connections, nofile, backlog, "edge ready");
        let (tx, commands) = mpsc::channel(1024);
        let driver = Driver::new(machine, store, clock, tx.downgrade());
        Ok(Server {
            listener,
            state: AppState { driver: tx, config, clock, execute_keepalive: opts.execute_keepalive_ms.map(Duration::from_millis) },
            driver,
            commands,
            startup,
            max_connections,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listeners have an address")
    }

    /// Serves until `shutdown` resolves; then the machine answers waiting callers and
    /// closes agent connections, and the server stops. Ends with an error if the driver
    /// task dies.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Server { listener, state, driver, commands, startup, max_connections } = self;
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
        // Graceful: the answers the machine just gave go out; the bound covers
        // connections that never close.
        let holders = edge_core::http::holders(&state.config);
        let server = serve_connections(listener, Connections::new(max_connections, holders), app, stopped_rx.clone());
        let bound = async {
            stopped(stopped_rx).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        tokio::pin!(server, bound);
        // The driver ends after the stop once the POSTs on their way are answered: then
        // the answers it gave are still served out.
        let mut driver_stopped = false;
        let result = loop {
            tokio::select! {
                () = &mut server => break Ok(()),
                _ = &mut bound => break Ok(()),
                r = &mut driver_task, if !driver_stopped => match r {
                    Ok(Ended::Stopped) => driver_stopped = true,
                    r => break Err(anyhow::anyhow!("the edge's state machine stopped unexpectedly ({r:?}); restart the edge")),
                },
            }
        };
        // A callback on its way when the edge stopped has its outcome stored before the
        // edge exits; exited first, the restart would post it again. The driver bounds
        // the wait itself (DRAIN_POSTS); this bound only guards against a driver that
        // does not.
        if result.is_ok() && !driver_stopped {
            if tokio::time::timeout(DRAIN_POSTS + Duration::from_secs(1), &mut driver_task).await.is_err() {
                warn!("the edge's state machine did not stop in time; stopping it");
            }
        }
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

/// How much of a request's head a connection may send (hyper's read buffer, at most): past
/// it the head is answered 431 and the connection closed. The largest head the edge needs
/// — the secret, an `Idempotency-Key` of 256 characters, an agent's proof, the upgrade's
/// headers, with room for a browser's cookies — is a few KiB. hyper's default (about
/// 400 KiB) let anyone, no secret needed, make each unfinished head hold that much:
/// 2,000 connections took the edge from 17 to 822 MB.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves each connection `listener` accepts with `app` until `stopped` turns true, then
/// lets each finish what it is answering (hyper's graceful shutdown) and returns once all
/// are closed. Each request carries its connection's peer address ([`Peer`]): unproven
/// agent connections are bounded per source. At most `table`'s cap are held
/// ([`crate::connections`]): at the cap the one idle longest is closed to make room.
async fn serve_connections(
    listener: TcpListener,
    table: Connections<oneshot::Sender<()>>,
    app: Router,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
    // A connection whose peer's side reads EOF is closed, as hyper does by default: that
    // EOF is how a caller that closed is noticed (its waiting `/execute` let go, its queued
    // job ended before it starts). A half-close (`shutdown(SHUT_WR)`) looks the same, so a
    // client that half-closes after its request gets no answer — README says not to; kept
    // open instead, every caller that closed would hold its place, and its queued job would
    // start, until the job's end or a write failed (review rev36a, 3).
    http.half_close(false);
    let table: Table = Arc::new(Mutex::new(table));
    let refusal = refusal();
    // Each connection's task holds a clone; once the last is dropped every one has ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    // What happened at the cap since the last warning is said once its 10 s are up, even if
    // nothing happens after: else the rest of a flood that stopped went unsaid.
    let mut said = tokio::time::interval(crate::connections::WARN_EVERY);
    said.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = accept(&listener, &table) => accepted,
            _ = said.tick() => {
                warn_at_cap(&table, None);
                continue;
            }
            () = until_stopped(&mut stopped) => break,
        };
        let (close, closed) = oneshot::channel::<()>();
        let admitted = lock(&table).admit(close);
        let (id, evicted) = match admitted {
            Admit::Open(id) => (id, false),
            Admit::Evict { id, close } => {
                let _ = close.send(());
                (id, true)
            }
            Admit::Refuse => {
                // Every connection is busy or an agent's: this one is closed at once, told
                // why if its socket takes the bytes now (never waited for), so that a
                // caller can tell a full edge from a dead one. What it sent is read first,
                // as far as it is there (64 KiB at most: a peer that keeps sending cannot
                // hold the accept loop), so the close is more often a FIN than a reset that
                // could discard the answer.
                let _ = tcp.try_write(refusal.as_bytes());
                let mut sent = [0u8; 4096];
                for _ in 0..16 {
                    if !matches!(tcp.try_read(&mut sent), Ok(n) if n > 0) {
                        break;
                    }
                }
                drop(tcp);
                warn_at_cap(&table, None);
                continue;
            }
        };
        if let Err(e) = crate::listen::watch_for_vanished_peer(&tcp) {
            // Served all the same: only a peer gone without a word goes unnoticed longer.
            warn!(peer = %addr, error = %e, "could not set TCP keepalive on a connection");
        }
        let conn = Conn { id, table: Arc::clone(&table) };
        let io = Held { io: crate::stall::watch(tcp), _slot: Slot(conn.clone()) };
        let app = app.clone().layer(axum::Extension(ConnectInfo(Peer(addr)))).layer(axum::Extension(conn.clone()));
        let tower = hyper_util::service::TowerToHyperService::new(app);
        let service = hyper::service::service_fn(move |request| {
            use hyper::service::Service as _;
            // Not busy yet: `api` says so once the request proved the secret.
            let answer = tower.call(request);
            let conn = conn.clone();
            async move { answer.await.map(|response| response.map(|body| Answering { body, conn })) }
        });
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service).with_upgrades();
        let (open, mut stopped) = (open.clone(), stopped.clone());
        tokio::spawn(async move {
            let _open = open;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                // Chosen to make room (only ever while idle: no request is cut): the
                // connection and its socket are dropped. First, so that nothing of the
                // connection runs once it is chosen. Only a sent close counts: the sender
                // is dropped, unsent, when the connection upgrades to an agent's socket
                // (the socket's task is given its own), and the 101 must still go out.
                biased;
                Ok(()) = closed => {}
                _ = connection.as_mut() => {}
                () = until_stopped(&mut stopped) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        if evicted {
            warn_at_cap(&table, None);
            // The chosen connection's task closes its socket before the next accept: the
            // cap holds for descriptors, not only in the table.
            tokio::task::yield_now().await;
        }
    }
    // Stopping: no new connection is taken (they are refused, not left in the backlog).
    drop(listener);
    drop(open);
    let _ = all_closed.recv().await;
}

/// The next connection. An accept that fails for want of descriptors or memory (EMFILE,
/// ENFILE, ENOBUFS, ENOMEM) leaves the connection in the backlog: the connection idle
/// longest is closed to make room, or, none being idle, the edge waits a second (as hyper
/// did) before trying again — never a busy loop, never the server's end. (axum's own
/// accept slept too, but said nothing: its logging is a feature this build leaves out.)
async fn accept(listener: &TcpListener, table: &Table) -> (TcpStream, SocketAddr) {
    // When a failure of the listener itself was last said.
    let mut said: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) if out_of_resources(&e) => {
                let freed = lock(table).accept_failed();
                warn_at_cap(table, Some(&e));
                let wait = match freed {
                    Some(close) => {
                        let _ = close.send(());
                        Duration::from_millis(10)
                    }
                    None => Duration::from_secs(1),
                };
                tokio::time::sleep(wait).await;
            }
            // One pending connection's own trouble (the peer gave up before it was taken,
            // a protocol error, a firewall's EPERM): nothing of the edge's to free, and
            // not "raise MAX_CONNECTIONS". A short pause keeps an error that repeats from
            // spinning the accept loop.
            Err(e) if one_connections_trouble(&e) => {
                tracing::debug!(error = %e, "a connection failed before it was accepted");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // The listener's own (EBADF, EINVAL, ENOTSOCK, EFAULT, an error the system does
            // not name): every accept will fail alike. Said, at most once per WARN_EVERY,
            // and tried again each second — it was taken for a connection's and only
            // logged at debug, so an edge that took no connection any more said nothing
            // and woke a thousand times a second.
            Err(e) => {
                if !said.is_some_and(|at| at.elapsed() < crate::connections::WARN_EVERY) {
                    said = Some(Instant::now());
                    tracing::error!(error = %e, "accepting connections fails: the edge takes no new connection (no caller, no agent reconnecting) while this lasts; restart the edge (its jobs and agents carry on)");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Whether an accept failed because the process or the system ran out of something a
/// connection needs (descriptors, buffers, memory) — what closing an idle connection can
/// help — rather than because of that one connection.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Whether an accept failed for one pending connection's own trouble, which the next
/// accept does not share: Linux's accept passes a pending connection's network error on
/// (ENETDOWN, EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH,
/// to be retried as EAGAIN, says accept(2)), a peer that gave up (ECONNABORTED, ECONNRESET),
/// a firewall's refusal (EPERM), a signal (EINTR). Anything else is the listener's.
fn one_connections_trouble(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::ECONNREFUSED
                | libc::ETIMEDOUT
                | libc::EPERM
                | libc::EINTR
                | libc::EAGAIN
                | libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// What a connection refused at the cap is sent: `runner_busy` (429), as the edge answers
/// any request it has no room for, with its error body.
fn refusal() -> String {
    let error = shared::contract::ApiError::new(
        shared::contract::ErrorCode::RunnerBusy,
        "the edge holds MAX_CONNECTIONS connections and every one is busy or an agent's; retry in a moment or run the task elsewhere",
    );
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let body = error.to_json();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Too Many Requests"),
        body.len()
    )
}

/// One line at most per [`crate::connections::WARN_EVERY`], with what happened since the last.
fn warn_at_cap(table: &Table, error: Option<&std::io::Error>) {
    let (pressure, cap) = {
        let mut table = lock(table);
        (table.pressure(Instant::now()), table.cap())
    };
    let Some(p) = pressure else { return };
    let error = error.map(ToString::to_string);
    warn!(
        open = p.open,
        max_connections = cap,
        evicted = p.evicted,
        refused = p.refused,
        over_share = p.over_share,
        accept_failed = p.failed,
        error,
        "too many connections: idle ones closed to make room (evicted), new ones closed while all were busy (refused), \
         requests refused because their secret's holder held its share busy (over_share), accepts failed \
         (accept_failed); if this is your traffic raise MAX_CONNECTIONS and the descriptor limit \
         (LimitNOFILE=), else find the source (`ss -tn state established`) and block it"
    );
}

type Table = Arc<Mutex<Connections<oneshot::Sender<()>>>>;

/// The table, even if a task panicked holding it: its counts stay coherent (each change is
/// one call), and an edge that stopped accepting would be worse.
fn lock(table: &Table) -> std::sync::MutexGuard<'_, Connections<oneshot::Sender<()>>> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connection's entry in the table, as its requests carry it: what they do moves it
/// between idle and busy, and an agent's socket pins it.
#[derive(Clone)]
pub struct Conn {
    id: Id,
    table: Table,
}

impl Conn {
    /// A request of `holder`'s holds the connection busy, unless `holder` holds all it may.
    fn busy(&self, holder: edge_core::http::Holder) -> Result<(), Over> {
        lock(&self.table).busy(self.id, holder)
    }

    /// The connection becomes an agent's socket, not proven yet: the receiver says when it
    /// is closed to make room (the socket outlives the HTTP connection's task).
    pub(crate) fn upgraded(&self) -> oneshot::Receiver<()> {
        let (close, closed) = oneshot::channel();
        lock(&self.table).upgraded(self.id, close);
        closed
    }

    /// The agent proved itself: its socket is never closed to make room.
    pub(crate) fn pin(&self) {
        lock(&self.table).pin(self.id);
    }
}

/// The connection's place in the table, freed when its socket is closed: it is dropped
/// with the socket, which an agent's upgraded connection keeps after hyper lets go.
struct Slot(Conn);

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.0.table).closed(self.0.id);
    }
}

/// The socket with its [`Slot`].
struct Held<T> {
    io: T,
    _slot: Slot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Held<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Held<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An answer's body; once it is sent to its end (hyper drops it) or given up, its
/// connection waits for a request head again. An event stream is busy as long as it flows
/// (only a request that proved the secret made its connection busy: see `api`).
struct Answering<B> {
    body: B,
    conn: Conn,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Answering<B> {
    fn drop(&mut self) {
        lock(&self.conn.table).idle(self.conn.id);
    }
}

/// Resolves once `stopped` is true (or its sender is gone).
async fn until_stopped(stopped: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// A header's value as the Worker reads it: under workerd each value's bytes are UTF-8,
/// a byte sequence that is not decoded as U+FFFD, so both hosts see the same text (read
/// here as Latin-1, one character a byte, `Idempotency-Key: <100 × é>` was 200 characters
/// of 400 bytes, too long here and taken there, and a secret followed by byte A0 was
/// let in here, its U+00A0 trimmed, and refused there). `to_str` refused bytes past ASCII
/// outright, and a header so sent was taken for none (an `Idempotency-Key` ignored, a
/// retry run twice). A header sent more than once is its values joined with `, `, as
/// Fetch's `get` joins them: the first alone let `X-Runner-Secret: <secret>` then
/// `X-Runner-Secret: <other>` in here while the Worker refused it.
pub(crate) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let mut joined = String::from_utf8_lossy(values.next()?.as_bytes()).into_owned();
    for value in values {
        joined.push_str(", ");
        joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
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
            // Not only a cleanup: it ends the queued `/execute` job of a caller that may now
            // run the task elsewhere. A full queue must not drop it, so it waits its turn.
            if let Err(mpsc::error::TrySendError::Full(command)) = self.driver.try_send(Command::CallerGone { caller }) {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let driver = self.driver.clone();
                    runtime.spawn(async move {
                        let _ = driver.send(command).await;
                    });
                }
            }
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
    // Only a request that proved the secret holds its connection against MAX_CONNECTIONS
    // (an `/execute` waiting, an event stream): anyone's else stays idle, closed first to
    // make room, even while its answer cannot go out — else a peer without the secret that
    // pipelines requests and reads the answers a few bytes at a time held its connection
    // busy for ever, and enough of them locked every newcomer out (429), agents included.
    // A secret's holder holds at most its share: past it the request is refused, so that
    // no caller's script holding connections locks out the agents or the other callers.
    if matches!(gate, Gate::Handle { .. }) {
        let holder = edge_core::http::holder(&state.config, secret.as_deref(), authorization.as_deref());
        if let (Some(holder), Some(conn)) = (holder, parts.extensions.get::<Conn>()) {
            if let Err(over) = conn.busy(holder) {
                warn_at_cap(&conn.table, None);
                return over_share(over, &parts.headers, body).await;
            }
        }
    }
    let read = match gate {
        Gate::Answer(refused) => {
            // A little of the body is heard out (bounded, nothing kept) so the caller reads
            // its refusal rather than a reset connection.
            read_body(body, Intake::refused(), edge_core::body::REFUSAL_DRAIN_MS).await;
            return into_response(refused);
        }
        Gate::AgentSocket => return socket::agent_connect(state, Request::from_parts(parts, body)).await,
        Gate::Handle { read_body } => read_body,
    };
    let body = if read {
        // hyper's body knows its `Content-Length` (exact), and none for a chunked one.
        let declared = axum::body::HttpBody::size_hint(&body).exact();
        match edge_core::http::intake(&state.config, secret.as_deref(), authorization.as_deref(), declared) {
            Ok(intake) => {
                // A head that arrived and a body that never does (a `Content-Length` never
                // reached, an `Expect: 100-continue` answered and nothing sent) is answered
                // 408 and its connection closed, rather than held busy for ever.
                let within_ms = intake.within_ms();
                read_body(body, intake, within_ms).await
            }
            Err(crowded) => return refuse_unread(crowded, &parts.headers, body).await,
        }
    } else {
        edge_core::body::Body::Bytes(Vec::new())
    };
    let req = edge_core::http::Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        secret_header: secret,
        authorization,
        idempotency_key: header(&parts.headers, "idempotency-key"),
        last_event_id: header(&parts.headers, "last-event-id"),
        body,
    };
    let (tx, rx) = oneshot::channel();
    if state.driver.send(Command::Http { req, reply: tx }).await.is_err() {
        return into_response(edge_core::http::shutting_down());
    }
    let Ok(opened) = rx.await else { return into_response(edge_core::http::shutting_down()) };
    match opened {
        Opened::Stream(out) => event_stream(out, state.config.sse_keepalive_ms),
        Opened::Once { caller, max_wait_ms, may_keep_alive, mut answer } => {
            let mut hang_up = HangUp { caller: Some(caller), driver: state.driver.clone() };
            let max_wait = Duration::from_millis(max_wait_ms);
            // Which answers may be kept alive is the core's to say (an `/execute` waiting
            // for its job, `Reply::Once`); whether to, and how often, this host's setting.
            let keepalive = state.execute_keepalive.filter(|every| may_keep_alive && *every < max_wait);
            if let Some(every) = keepalive {
                match tokio::time::timeout(every, &mut answer).await {
                    Ok(answered) => {
                        hang_up.caller = None;
                        return match answered {
                            Ok(response) => into_response(response),
                            Err(_) => into_response(edge_core::http::shutting_down()),
                        };
                    }
                    Err(_) => return kept_alive(answer, hang_up, max_wait - every, every),
                }
            }
            let answered = match tokio::time::timeout(max_wait, &mut answer).await {
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

/// An `/execute` not answered within `EXECUTE_KEEPALIVE_MS` (`every`): `200` with the
/// JSON content type now, a space at once and after every `every` of silence, then the
/// answer's JSON — whatever its status would have been, which the body says (`success`,
/// `error_code`, `fallback`): both existing callers read those from the body of a 2xx
/// (docs: README, "Tunnel"). A proxy that cuts an answer silent for 100 s (Cloudflare's,
/// in front of a Tunnel) then passes one that takes longer. JSON allows the spaces before
/// the value. The wait is the same as without: `WaitExpired` after `max_wait` more, then
/// the machine's answer; a caller that hangs up drops the stream, and with it `hang_up`,
/// which tells the machine as it does unkept.
fn kept_alive(answer: oneshot::Receiver<edge_core::Response>, hang_up: HangUp, max_wait: Duration, every: Duration) -> Response {
    struct Waiting {
        answer: oneshot::Receiver<edge_core::Response>,
        hang_up: HangUp,
        expires: Option<tokio::time::Instant>,
    }
    let waiting = Waiting { answer, hang_up, expires: Some(tokio::time::Instant::now() + max_wait) };
    // The first space at once: the head alone may sit in a proxy's buffer.
    let first = futures_util::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b" ")) });
    let rest = futures_util::stream::unfold(Some(waiting), move |waiting| async move {
        let mut w = waiting?;
        let tick = tokio::time::sleep(every);
        tokio::pin!(tick);
        loop {
            let expiry = async {
                match w.expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                answered = &mut w.answer => {
                    w.hang_up.caller = None;
                    let response = answered.unwrap_or_else(|_| edge_core::http::shutting_down());
                    return Some((Ok(axum::body::Bytes::from_owner(SharedText(response.body))), None));
                }
                _ = expiry => {
                    w.expires = None;
                    if let Some(caller) = w.hang_up.caller {
                        let _ = w.hang_up.driver.send(Command::WaitExpired { caller }).await;
                    }
                }
                _ = &mut tick => return Some((Ok(axum::body::Bytes::from_static(b" ")), Some(w))),
            }
        }
    });
    let mut out = Response::new(Body::from_stream(first.chain(rest)));
    out.headers_mut().insert("content-type", "application/json".parse().expect("static content types parse"));
    out.headers_mut().insert("cache-control", "no-cache".parse().expect("static header parses"));
    out
}

/// The answer to a request whose secret's holder holds all the connections it may
/// ([`Over`]): 429 `RUNNER_BUSY` saying whose and what to do, and its connection closed
/// (never read, the answer still leaves the connection idle, first to go at the cap).
async fn over_share(over: Over, headers: &HeaderMap, body: Body) -> Response {
    let error = shared::contract::ApiError::new(shared::contract::ErrorCode::RunnerBusy, over.to_string());
    refuse_unread(edge_core::Response::error(error).with_header("connection", "close".into()), headers, body).await
}

/// `refused`, the answer to a request whose body is not read (its holder is past a share:
/// [`over_share`], [`edge_core::http::intake`]); it says `connection: close`, and hyper
/// closes the connection once it is written. As with a refusal before the body
/// ([`Gate::Answer`]), a little of the body is heard out so the caller reads the answer
/// rather than a reset — unless the request waits for `100 Continue`: reading would tell it
/// to send the body it need not send.
async fn refuse_unread(refused: edge_core::Response, headers: &HeaderMap, body: Body) -> Response {
    let expects_continue = header(headers, "expect").is_some_and(|e| e.trim().eq_ignore_ascii_case("100-continue"));
    if !expects_continue {
        read_body(body, Intake::refused(), edge_core::body::REFUSAL_DRAIN_MS).await;
    }
    into_response(refused)
}

/// A `text/event-stream` answer: the follower's chunks as the connection takes them, with
/// a keep-alive comment after every `keepalive_ms` the job is quiet
/// (`Config::sse_keepalive_ms`), until the driver lets the follower go.
fn event_stream(out: FeedOut, keepalive_ms: u64) -> Response {
    let keepalive = Duration::from_millis(keepalive_ms);
    let stream = futures_util::stream::unfold(Some(out), move |out| async move {
        let out = out?;
        let chunk = match tokio::time::timeout(keepalive, out.next()).await {
            Ok(Follow::Chunk(chunk)) => chunk.to_string(),
            // Cut for falling behind: an error aborts the connection — once hyper has had a
            // turn to write what it holds. An abort drops hyper's buffer, and a follower cut
            // before its first write (a reconnect given its backlog as a flood came in) saw
            // no answer at all, not even the line saying why and what to do. One yield is
            // enough: the body pending, hyper flushes (or finds the peer not reading); the
            // next poll aborts, so a peer that does not read is still let go at once.
            Ok(Follow::Cut) => {
                tokio::task::yield_now().await;
                return Some((Err(std::io::Error::other("the follower fell too far behind")), None));
            }
            Ok(Follow::End) => return None,
            Err(_) => SSE_KEEPALIVE.to_string(),
        };
        Some((Ok(chunk), Some(out)))
    });
    let mut out = Response::new(Body::from_stream(stream));
    out.headers_mut().insert("content-type", SSE_CONTENT_TYPE.parse().expect("static content types parse"));
    out.headers_mut().insert("cache-control", "no-cache".parse().expect("static header parses"));
    out
}

/// A core answer's shared text as bytes a response body can hold without a copy.
struct SharedText(std::sync::Arc<str>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

pub(crate) fn into_response(response: edge_core::Response) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // The body the core shares among every caller given the same answer (the waiters of
    // one job) is written from that one allocation, not copied for each connection.
    let mut out = (status, axum::body::Bytes::from_owner(SharedText(response.body))).into_response();
    out.headers_mut().insert("content-type", response.content_type.parse().expect("static content types parse"));
    for (name, value) in response.headers {
        // The core makes these values; one that is not a valid header value is dropped.
        if let Ok(value) = value.parse() {
            out.headers_mut().insert(name, value);
        }
    }
    out
}

/// Reads the body as the core's [`Intake`] says: kept up to the limit, drained past it,
/// for `within_ms` at most (then it is [`edge_core::body::Body::TimedOut`]).
async fn read_body(body: Body, mut intake: Intake, within_ms: u64) -> edge_core::body::Body {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(within_ms);
    let mut stream = body.into_data_stream();
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(chunk)) => {
                if intake.take(chunk.as_deref().map_err(|e| e.to_string())) == Next::Stop {
                    break;
                }
            }
            Ok(None) => break,
            Err(_) => {
                intake.timed_out(within_ms);
                break;
            }
        }
    }
    intake.finish()
}

#[cfg(test)]
mod tests {
    /// Only running out of descriptors, buffers or memory makes the edge close an idle
    /// connection for room and tell the operator to raise MAX_CONNECTIONS; every accept
    /// error did, so a firewall's EPERM or a peer's EPROTO each cost a caller its
    /// connection and a misleading warning.
    #[test]
    fn only_running_out_of_resources_frees_a_connection() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(super::out_of_resources(&std::io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EPROTO, libc::EPERM, libc::ENETDOWN, libc::EHOSTUNREACH, libc::ECONNABORTED, libc::ECONNRESET] {
            assert!(!super::out_of_resources(&std::io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }

    /// A follower cut before its connection wrote anything (a reconnect given a backlog
    /// while a flood of progress came in, before its task ran) still reads the answer's
    /// head and the line saying why and what to do: the abort had dropped hyper's buffered
    /// head with it, and the follower saw a connection closed before any answer.
    #[tokio::test]
    async fn a_follower_cut_before_its_first_write_still_reads_why() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (feed, out) = edge_core::progress::follower();
        assert!(feed.send("id: 1\nevent: progress\ndata: {}\n\n".into()));
        let flood: String = "x".repeat(edge_core::progress::MAX_FOLLOWER_LAG_BYTES);
        assert!(!feed.send(flood.into()), "the flood cuts the follower");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let out = std::sync::Mutex::new(Some(out));
        let serve = tokio::spawn(async move {
            let (io, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |_request| {
                let out = out.lock().unwrap().take().expect("one request");
                std::future::ready(Ok::<_, std::convert::Infallible>(super::event_stream(out, 60_000)))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(io), service).await;
        });
        let mut peer = tokio::net::TcpStream::connect(addr).await.unwrap();
        peer.write_all(b"GET /jobs/j/events HTTP/1.1\r\nhost: edge\r\n\r\n").await.unwrap();
        let mut read = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), peer.read_to_end(&mut read)).await;
        let read = String::from_utf8_lossy(&read);
        assert!(read.starts_with("HTTP/1.1 200"), "{read:?}");
        assert!(read.contains(": cut: this stream fell more than"), "{read:?}");
        assert!(!read.contains("xxxx"), "what it had yet to read went with the cut");
        drop(feed);
        serve.await.unwrap();
    }

    /// A listener that is broken fails every accept alike: its error is not taken for one
    /// pending connection's (said at debug level and retried every millisecond, for ever,
    /// while the edge took no connection). A listener shut down answers EINVAL.
    #[tokio::test]
    async fn a_broken_listeners_error_is_not_taken_for_one_connections() {
        use std::os::fd::AsRawFd;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // SAFETY: shutdown of the socket this test opened, nothing else.
        assert_eq!(unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) }, 0);
        let failed = listener.accept().await.expect_err("a shut-down listener takes nothing");
        assert!(!super::one_connections_trouble(&failed), "{failed}");
        assert!(!super::out_of_resources(&failed), "{failed}");
        for errno in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK, libc::EFAULT] {
            assert!(!super::one_connections_trouble(&std::io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EPROTO, libc::EPERM, libc::ENETDOWN, libc::EHOSTUNREACH, libc::ECONNABORTED, libc::ECONNRESET] {
            assert!(super::one_connections_trouble(&std::io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }
}
