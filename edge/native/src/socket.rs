//! The agents' WebSocket (`/agent/connect`): frames in become [`Command`]s for the driver;
//! the driver's [`Outbound`]s go out. Once the edge has closed a connection (or its writes
//! failed), the peer gets [`CLOSE_GRACE`] to answer the close, then the socket is dropped:
//! a peer that never answers cannot keep it open.

use crate::driver::{Command, Outbound};
use crate::server::{into_response, AppState};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use shared::protocol::MAX_FRAME_BYTES;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// How long a closed connection waits for the peer's close frame.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// `/agent/connect`, as the core's gate named it.
pub(crate) async fn agent_connect(state: AppState, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(_) => return into_response(edge_core::http::upgrade_required()),
    };
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| agent_socket(state, socket))
}

/// One agent connection, from the upgrade to the socket's end.
async fn agent_socket(state: AppState, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut outgoing) = mpsc::unbounded_channel();
    let (tx, rx) = oneshot::channel();
    if state.driver.send(Command::Connect { outbox, reply: tx }).await.is_err() {
        return;
    }
    let Ok(session) = rx.await else { return };
    let mut writer = tokio::spawn(async move {
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
    // Frames are read until the peer closes, the link fails, or — once the writer is done
    // (the edge closed the connection) — the grace for the peer's answer runs out.
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let cmd = Command::Frame { session: session.clone(), text: text.to_string() };
                    if state.driver.send(cmd).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let _ = state.driver.send(Command::BinaryFrame { session: session.clone() }).await;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = &mut writer, if grace.is_none() => grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE))),
            _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => break,
        }
    }
    if let Err(e) = state.driver.send(Command::Disconnect { session: session.clone() }).await {
        warn!(session = %session, error = %e, "driver gone while disconnecting");
    }
    writer.abort();
}
