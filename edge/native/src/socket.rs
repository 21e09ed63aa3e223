//! The agents' WebSocket (`/agent/connect`): frames in become [`Command`]s for the driver;
//! the driver's [`Outbound`]s go out. Once the edge has closed a connection (or its writes
//! failed), the peer gets [`CLOSE_GRACE`] to answer the close, then the socket is dropped:
//! a peer that never answers cannot keep it open.
//!
//! The upgrade is done here rather than by axum so that the socket's reads are metered
//! ([`Metered`]): until the connection proves itself, the peer may send no more than its
//! session's read budget (a hello's worth), so nobody can make the edge hold megabytes for
//! a connection that has not shown a key.

use crate::driver::{Command, Outbound};
use crate::server::{into_response, AppState, Conn};
use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use shared::protocol::MAX_FRAME_BYTES;
use crate::stall::Peer;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::warn;

/// How long a closed connection waits for the peer's close frame.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// `/agent/connect`, as the core's gate named it: upgraded if it asks to be, else 426.
pub(crate) async fn agent_connect(state: AppState, mut request: Request) -> Response {
    let Some(accept) = accept_key(request.method(), request.headers()) else {
        return into_response(edge_core::http::upgrade_required());
    };
    let Some(upgrade) = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return into_response(edge_core::http::upgrade_required());
    };
    let peer = request.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0 .0.ip().to_string()).unwrap_or_default();
    // Only a peer that proves an agent's key gets a socket (the core decides, as on the
    // Worker): anyone else is answered 401 and its connection stays an HTTP one. Read as
    // the Worker reads it (one helper for every header): a proof sent twice is the two
    // joined, no proof's shape, so a valid one followed by junk is refused here as it is
    // there, and bytes past ASCII are UTF-8 text, refused as malformed. Checked here,
    // off the machine's turn (a signature to verify for whoever dials); only a refusal
    // goes to the machine, which counts and logs it.
    let proof = crate::server::header(request.headers(), shared::envelope::AGENT_PROOF_HEADER);
    if let Err(refused) = edge_core::upgrade::check_upgrade(proof.as_deref(), &state.config, runtime::now_ms()) {
        let _ = state.driver.send(Command::UpgradeRefused { peer, refused: refused.clone() }).await;
        return into_response(edge_core::response::Response::error(refused));
    }
    // An agent's socket from here on (marked before the 101 goes out, so it is never idle
    // in between): closed to make room at MAX_CONNECTIONS only while unproven and only
    // when no connection is idle; never once its agent proved itself (the driver pins it).
    // The agent's nonce, for the challenge to sign (the core refuses a dial without one, or of another shape): read as
    // the Worker reads it.
    let agent_nonce = crate::server::header(request.headers(), shared::envelope::AGENT_NONCE_HEADER);
    let conn = request.extensions().get::<Conn>().cloned();
    let made_room = conn.as_ref().map(Conn::upgraded);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let budget = Arc::new(AtomicUsize::new(edge_core::session::UNPROVEN_READ_BUDGET));
        let read = Arc::new(AtomicU64::new(0));
        let io = Metered { inner: TokioIo::new(upgraded), read: Arc::clone(&read), budget: Arc::clone(&budget) };
        let config = WebSocketConfig::default().max_message_size(Some(MAX_FRAME_BYTES)).max_frame_size(Some(MAX_FRAME_BYTES));
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        agent_socket(state, socket, Dialer { peer, agent_nonce }, budget, read, conn, made_room).await;
    });
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The `Sec-WebSocket-Accept` for a valid WebSocket upgrade request (RFC 6455 §4.2.1),
/// or `None` if the request is not one: the core's [`edge_core::upgrade::is_handshake`],
/// as the Worker asks it, and `Connection: upgrade`, which hyper's upgrade rests on here.
fn accept_key(method: &Method, headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = crate::server::header(headers, "connection").is_some_and(|v| edge_core::http::lists_token(&v, "upgrade"));
    if !connection_upgrade || !edge_core::upgrade::is_handshake(method.as_str(), |name| crate::server::header(headers, name)) {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()
}

/// How often a socket's task looks whether bytes arrived.
const ARRIVING_EVERY: Duration = Duration::from_millis(500);

type Socket = WebSocketStream<Metered<TokioIo<hyper::upgrade::Upgraded>>>;

/// Who dialled, as its upgrade request said: its address, and its nonce for the
/// challenge to sign (the core closes a dial without one).
struct Dialer {
    peer: String,
    agent_nonce: Option<String>,
}

/// One agent connection, from the upgrade to the socket's end.
async fn agent_socket(
    state: AppState,
    socket: Socket,
    Dialer { peer, agent_nonce }: Dialer,
    budget: Arc<AtomicUsize>,
    read: Arc<AtomicU64>,
    conn: Option<Conn>,
    made_room: Option<oneshot::Receiver<()>>,
) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut outgoing) = mpsc::unbounded_channel();
    let (tx, rx) = oneshot::channel();
    let arrivals = Arc::new(Arrivals::default());
    let connect = Command::Connect { outbox, budget, conn, peer, agent_nonce, arrivals: Arc::clone(&arrivals), reply: tx };
    if state.driver.send(connect).await.is_err() {
        return;
    }
    let Ok(session) = rx.await else { return };
    let mut writer = tokio::spawn(async move {
        // What the driver queued meanwhile goes out in the same write (an acknowledgement
        // and the next order, say): one write and one wake-up of the agent, not one each.
        'writing: while let Some(out) = outgoing.recv().await {
            let mut next = Some(out);
            while let Some(out) = next.take() {
                let fed = match out {
                    Outbound::Text(text) => sink.feed(Message::Text(text.into())).await,
                    Outbound::Close(code, reason) => {
                        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                        let _ = sink.send(Message::Close(Some(frame))).await;
                        break 'writing;
                    }
                };
                if fed.is_err() {
                    break 'writing;
                }
                next = outgoing.try_recv().ok();
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    // Frames are read until the peer closes, the link fails (or the peer sends more than
    // its read budget), or — once the writer is done (the edge closed the connection) —
    // the grace for the peer's answer runs out.
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    // Closed to make room (unproven, at MAX_CONNECTIONS); a receiver whose sender is gone
    // means the same. Without a table (no cap) never.
    let made_room = async {
        match made_room {
            Some(closed) => {
                let _ = closed.await;
            }
            None => std::future::pending().await,
        }
    };
    let mut made_room = std::pin::pin!(made_room);
    // The peer's close frame, if it sent one: the edge's log says why an agent left.
    let mut closed_with: Option<(u16, String)> = None;
    // Bytes of a frame not yet whole are told to the machine (`Edge::arriving`): a large
    // result on a slow uplink keeps its connection from being taken for a silent one.
    let mut looked = tokio::time::interval(ARRIVING_EVERY);
    looked.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told = 0;
    loop {
        tokio::select! {
            () = &mut made_room => break,
            _ = looked.tick() => {
                let now = read.load(Ordering::Relaxed);
                if now != told {
                    told = now;
                    if state.driver.send(Command::Arriving { session: session.clone(), read: now }).await.is_err() {
                        break;
                    }
                }
            }
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    arrivals.read_one(state.clock.now().at);
                    let cmd = Command::Frame { session: session.clone(), text: text.to_string() };
                    if state.driver.send(cmd).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    arrivals.read_one(state.clock.now().at);
                    let _ = state.driver.send(Command::BinaryFrame { session: session.clone() }).await;
                }
                Some(Ok(Message::Close(frame))) => {
                    closed_with = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    break;
                }
                Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = &mut writer, if grace.is_none() => grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE))),
            _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => break,
        }
    }
    if let Err(e) = state.driver.send(Command::Disconnect { session: session.clone(), closed_with }).await {
        warn!(session = %session, error = %e, "driver gone while disconnecting");
    }
    writer.abort();
}

/// The frames a socket's task read whole and sent the driver, and when the last arrived
/// (edge time): stamped here, as they come off the socket, not when the driver gets to
/// them — behind a flood of requests a heartbeat can wait in the driver's queue past its
/// connection's deadline ([`edge_core::Edge::frame_waiting`]).
#[derive(Debug, Default)]
pub struct Arrivals {
    frames: AtomicU64,
    last_at: AtomicU64,
}

impl Arrivals {
    fn read_one(&self, at: edge_core::Millis) {
        self.last_at.store(at, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Release);
    }

    /// When the last frame arrived, if any of them is past the `handled` the driver has had.
    pub fn waiting(&self, handled: u64) -> Option<edge_core::Millis> {
        (self.frames.load(Ordering::Acquire) > handled).then(|| self.last_at.load(Ordering::Relaxed))
    }
}

/// A socket whose reads are counted against a budget the driver sets from the session's
/// record ([`edge_core::session::Session::read_budget`]): past it, reads fail and the
/// connection ends.
pub(crate) struct Metered<S> {
    inner: S,
    /// All read so far; the socket's task reports it ([`Command::Arriving`]).
    read: Arc<AtomicU64>,
    budget: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let got = buf.filled().len() - before;
            let read = self.read.fetch_add(got as u64, Ordering::Relaxed).saturating_add(got as u64);
            if read > self.budget.load(Ordering::Relaxed) as u64 {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the peer sent more than an unproven connection may",
                )));
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
