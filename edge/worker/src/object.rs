//! The Durable Object `EdgeDurableObject`: one per pool, the host of one [`Edge`].
//!
//! Every event (HTTP request, agent frame, socket close, alarm) goes the same way: rebuild
//! the machine if this instance has none yet, feed it the event with the time, carry out
//! the effects it returns in order, then put the alarm on its next deadline. Workerd
//! evicts an idle instance after about ten seconds even while hibernated sockets stay
//! open, so the rebuild — jobs from [`Store`], sessions from socket attachments — is the
//! common path, not a recovery path.
//!
//! Handlers take `&self` and may interleave at every `.await`; the machine sits in a
//! `RefCell` that is borrowed only between awaits, never across one.

use crate::exchange;
use crate::sockets::{self, close_socket, AtHand, Sockets};
use crate::store::Store;
use crate::{entropy, now_ms};
use edge_core::http::{self, Body, Outcome};
use edge_core::{Config, Edge, Effect, Millis};
use futures::channel::oneshot;
use futures::future::{select, Either};
use shared::contract::{ApiError, ErrorCode};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;
use worker::wasm_bindgen::JsValue;
use worker::{
    console_error, console_log, console_warn, durable_object, Delay, DurableObject, Env, Request, Response, State,
    WebSocket, WebSocketIncomingMessage, WebSocketPair,
};

/// The answer for a caller waiting on a job: status and JSON body.
type Answer = (u16, String);

enum Machine {
    /// This instance has not rebuilt the machine yet.
    Unloaded,
    Ready(Box<Edge>),
    /// A setting is wrong; the message says which. Settings only change with a new
    /// deployment, which starts a new instance, so this is kept.
    Misconfigured(String),
}

#[durable_object]
pub struct EdgeDurableObject {
    state: State,
    env: Env,
    machine: RefCell<Machine>,
    /// `/execute` callers waiting for their job's `Effect::Finished`.
    waiters: RefCell<HashMap<String, Vec<oneshot::Sender<Answer>>>>,
    /// `GET /jobs/{id}/events` streams, by job.
    followers: RefCell<HashMap<String, Vec<futures::channel::mpsc::UnboundedSender<String>>>>,
    /// The deadline the alarm was last set to by this instance (skips rewriting it).
    alarm_at: Cell<Option<Millis>>,
}

impl DurableObject for EdgeDurableObject {
    fn new(state: State, env: Env) -> Self {
        EdgeDurableObject {
            state,
            env,
            machine: RefCell::new(Machine::Unloaded),
            waiters: RefCell::new(HashMap::new()),
            followers: RefCell::new(HashMap::new()),
            alarm_at: Cell::new(None),
        }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        let path = req.path();
        if let Err(message) = self.load(now_ms()) {
            return exchange::unavailable(&path, &message);
        }
        let answer = if path.trim_end_matches('/') == "/agent/connect" {
            self.accept_agent(&req).await
        } else {
            self.serve(req, &path).await
        };
        // An error here is the host's own (the runtime refused something), never the
        // caller's: answer it in the contract's shape rather than workerd's bare 500.
        answer.or_else(|e| {
            console_error!("path={path} request failed in the host: {e}");
            exchange::error(&ApiError::new(ErrorCode::InternalError, format!("the edge failed to answer: {e}; retry")))
        })
    }

    async fn alarm(&self) -> worker::Result<Response> {
        // The alarm that woke us is spent.
        self.alarm_at.set(None);
        let now = now_ms();
        if let Err(message) = self.load(now) {
            console_error!("alarm: the edge cannot run: {message}");
            return Response::ok("");
        }
        let effects = self.with_edge(|edge| edge.tick(now)).unwrap_or_default();
        self.apply(effects, None);
        self.schedule(now).await;
        Response::ok("")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        let now = now_ms();
        let sockets = self.sockets();
        let Some(session_id) = sockets.session_id(&ws) else {
            close_socket(&ws, sockets::PROTOCOL_ERROR, "this connection has no session; reconnect");
            return Ok(());
        };
        if let Err(message) = self.load(now) {
            close_socket(&ws, sockets::INTERNAL_ERROR, &format!("edge misconfigured: {message}"));
            return Ok(());
        }
        let known = self.with_edge(|edge| edge.session(&session_id).is_some()).unwrap_or(false);
        let effects = match message {
            _ if !known => {
                // Its record was lost (or the machine already closed it): it can never
                // be served, so let the agent reconnect and prove itself again.
                close_socket(&ws, sockets::PROTOCOL_ERROR, "the edge has no record of this connection; reconnect");
                return Ok(());
            }
            WebSocketIncomingMessage::String(text) => {
                self.with_edge(|edge| edge.message(now, &session_id, &text)).unwrap_or_default()
            }
            WebSocketIncomingMessage::Binary(_) => {
                self.with_edge(|edge| edge.binary_frame(now, &session_id)).unwrap_or_default()
            }
        };
        self.apply(effects, Some((&session_id, &ws)));
        self.schedule(now).await;
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, code: usize, reason: String, _was_clean: bool) -> worker::Result<()> {
        self.gone(&ws, &format!("closed by the agent ({code} {reason})")).await;
        // Answer the close handshake (the runtime may have done so already).
        let _ = ws.close(Some(1000), Some("closed"));
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, error: worker::Error) -> worker::Result<()> {
        self.gone(&ws, &format!("failed: {error}")).await;
        Ok(())
    }
}

impl EdgeDurableObject {
    fn sockets(&self) -> Sockets<'_> {
        Sockets::new(&self.state)
    }

    fn store(&self) -> Store {
        Store::new(self.state.storage().sql())
    }

    /// Rebuilds the machine if this instance has none. `Err` says why the edge cannot run.
    fn load(&self, now: Millis) -> Result<(), String> {
        match &*self.machine.borrow() {
            Machine::Ready(_) => return Ok(()),
            Machine::Misconfigured(message) => return Err(message.clone()),
            Machine::Unloaded => {}
        }
        let config = match Config::from_lookup(|name| setting(&self.env, name)) {
            Ok(config) => config,
            Err(e) => {
                let message = format!(
                    "the edge is misconfigured: {e}. Set secrets with `wrangler secret put <NAME>` and settings in \
                     wrangler.toml [vars], then deploy again"
                );
                console_error!("{message}");
                *self.machine.borrow_mut() = Machine::Misconfigured(message.clone());
                return Err(message);
            }
        };
        let store = self.store();
        let (jobs, problems) = match store.open().and_then(|()| store.load()) {
            Ok(loaded) => loaded,
            Err(e) => {
                // Not kept: storage may work on the next event.
                console_error!("loading jobs failed: {e}");
                return Err(format!("the edge could not read its job storage ({e}); retry"));
            }
        };
        for problem in problems {
            console_error!("{problem}");
        }
        let sessions = self.sockets().restore();
        let (job_count, session_count) = (jobs.len(), sessions.len());
        let (edge, effects) = Edge::restore(config, jobs, sessions, now);
        console_log!("edge rebuilt: {job_count} jobs from storage, {session_count} agent connections from sockets");
        *self.machine.borrow_mut() = Machine::Ready(Box::new(edge));
        self.apply(effects, None);
        Ok(())
    }

    /// Runs `f` on the machine (`None` if it is not loaded). The borrow ends with `f`.
    fn with_edge<R>(&self, f: impl FnOnce(&mut Edge) -> R) -> Option<R> {
        match &mut *self.machine.borrow_mut() {
            Machine::Ready(edge) => Some(f(edge)),
            _ => None,
        }
    }

    /// Carries out the machine's effects, in order.
    fn apply(&self, effects: Vec<Effect>, at_hand: AtHand<'_>) {
        if effects.is_empty() {
            return;
        }
        let store = self.store();
        let sockets = self.sockets();
        for effect in effects {
            match effect {
                Effect::Send { session, text } => sockets.send(&session, &text, at_hand),
                Effect::Close { session, code, reason } => {
                    console_log!("session={session} closing: {code} {reason}");
                    sockets.close(&session, code, &reason, at_hand);
                }
                Effect::Save(job) => {
                    if let Err(e) = store.save(&job) {
                        console_error!("job_id={} could not be stored: {e}", job.id);
                    }
                }
                Effect::Forget { job_id } => {
                    if let Err(e) = store.forget(&job_id) {
                        console_error!("job_id={job_id} could not be deleted: {e}");
                    }
                }
                Effect::SaveSession(session) => sockets.save_session(&session, at_hand),
                Effect::Finished { job_id, status, body } => {
                    let followers = self.followers.borrow_mut().remove(&job_id).unwrap_or_default();
                    let end = http::sse_result(&body);
                    for follower in followers {
                        let _ = follower.unbounded_send(end.clone());
                    }
                    let waiting = self.waiters.borrow_mut().remove(&job_id).unwrap_or_default();
                    for waiter in waiting {
                        let _ = waiter.send((status, body.clone()));
                    }
                }
                Effect::Progress { job_id, chunk } => {
                    if let Some(followers) = self.followers.borrow_mut().get_mut(&job_id) {
                        followers.retain(|f| f.unbounded_send(chunk.clone()).is_ok());
                    }
                }
            }
        }
    }

    /// Puts the alarm on the machine's next deadline.
    async fn schedule(&self, now: Millis) {
        let Some(at) = self.with_edge(|edge| edge.next_deadline()).flatten() else { return };
        if self.alarm_at.get() == Some(at) {
            return;
        }
        // Noted before the await so a later event's newer deadline is not overwritten.
        self.alarm_at.set(Some(at));
        let offset = at.saturating_sub(now).clamp(1, i64::MAX as u64) as i64;
        if let Err(e) = self.state.storage().set_alarm(offset).await {
            self.alarm_at.set(None);
            console_error!("setting the alarm failed: {e}");
        }
    }

    /// `GET /agent/connect`: accept the agent's WebSocket and send the challenge.
    async fn accept_agent(&self, req: &Request) -> worker::Result<Response> {
        let upgrade = req.headers().get("upgrade").ok().flatten();
        if !upgrade.is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket")) {
            return exchange::upgrade_required();
        }
        let seed = match entropy::<32>() {
            Ok(seed) => seed,
            Err(e) => return exchange::error(&ApiError::new(ErrorCode::InternalError, e)),
        };
        let pair = WebSocketPair::new()?;
        let now = now_ms();
        let Some((session_id, effects)) = self.with_edge(|edge| edge.connect(now, seed)) else {
            return exchange::unavailable("/agent/connect", "the edge is not loaded; retry");
        };
        if let Err(e) = self.sockets().accept(&pair.server, &session_id) {
            let effects = self.with_edge(|edge| edge.disconnect(now, &session_id)).unwrap_or_default();
            self.apply(effects, None);
            console_error!("session={session_id} could not be accepted: {e}");
            return exchange::error(&ApiError::new(
                ErrorCode::InternalError,
                format!("the edge could not accept the connection ({e}); retry"),
            ));
        }
        console_log!("session={session_id} agent connection opened");
        self.apply(effects, Some((&session_id, &pair.server)));
        self.schedule(now).await;
        Response::from_websocket(pair.client)
    }

    /// Every other request: the core routes it; `/execute` may wait for its job.
    async fn serve(&self, mut req: Request, path: &str) -> worker::Result<Response> {
        let header = |name: &str| req.headers().get(name).ok().flatten();
        let (secret, authorization, idempotency_key) =
            (header("x-runner-secret"), header("authorization"), header("idempotency-key"));
        let method = req.inner().method();
        let limit = self.with_edge(|edge| edge.config().max_body_bytes).unwrap_or(0);
        let body = match exchange::read_body(&mut req, limit).await {
            Ok(body) => body,
            Err(e) => return exchange::error(&ApiError::invalid(format!("the request body could not be read: {e}"))),
        };
        let seed = match entropy::<16>() {
            Ok(seed) => seed,
            Err(e) => return exchange::error(&ApiError::new(ErrorCode::InternalError, e)),
        };
        let request = http::Request {
            method: &method,
            path,
            secret_header: secret.as_deref(),
            authorization: authorization.as_deref(),
            idempotency_key: idempotency_key.as_deref(),
            body: match &body {
                Some(bytes) => Body::Bytes(bytes),
                None => Body::TooLarge,
            },
        };
        let now = now_ms();
        let Some((outcome, effects)) = self.with_edge(|edge| http::handle(edge, now, seed, request)) else {
            return exchange::unavailable(path, "the edge is not loaded; retry");
        };
        // The waiter goes in before the effects run: they may end the job.
        let waiting = match outcome {
            Outcome::Respond(answer) => Err(answer),
            Outcome::Follow { job_id, follow } => {
                let (tx, rx) = futures::channel::mpsc::unbounded::<String>();
                for chunk in follow.backlog {
                    let _ = tx.unbounded_send(chunk);
                }
                match follow.end {
                    Some(end) => {
                        let _ = tx.unbounded_send(end);
                    }
                    None => self.followers.borrow_mut().entry(job_id).or_default().push(tx),
                }
                self.apply(effects, None);
                return exchange::event_stream(rx);
            }
            Outcome::Wait { job_id, max_wait_ms } => {
                let (tx, rx) = oneshot::channel();
                self.waiters.borrow_mut().entry(job_id.clone()).or_default().push(tx);
                Ok((job_id, max_wait_ms, rx))
            }
        };
        self.apply(effects, None);
        self.schedule(now).await;
        match waiting {
            Err(answer) => exchange::respond(answer),
            Ok((job_id, max_wait_ms, rx)) => exchange::respond(self.wait(&job_id, max_wait_ms, rx).await),
        }
    }

    /// Waits for the job's answer, bounded: a caller that hangs up does not cancel this
    /// future, so without the bound it would pin the object in memory indefinitely.
    async fn wait(&self, job_id: &str, max_wait_ms: u64, rx: oneshot::Receiver<Answer>) -> http::Response {
        let delay = std::pin::pin!(Delay::from(Duration::from_millis(max_wait_ms.min(i32::MAX as u64))));
        let answer = match select(rx, delay).await {
            Either::Left((Ok(answer), _)) => Some(answer),
            Either::Left((Err(_), _)) => None,
            Either::Right(((), rx)) => {
                drop(rx);
                None
            }
        };
        if let Some((status, body)) = answer {
            return http::Response::json(status, body);
        }
        // Drop this caller's (and any other abandoned) sender.
        {
            let mut waiters = self.waiters.borrow_mut();
            if let Some(list) = waiters.get_mut(job_id) {
                list.retain(|tx| !tx.is_canceled());
                if list.is_empty() {
                    waiters.remove(job_id);
                }
            }
        }
        console_warn!("job_id={job_id} caller stopped waiting after {max_wait_ms} ms");
        self.with_edge(|edge| http::waited_too_long(edge, job_id)).unwrap_or_else(|| {
            http::Response::error(ApiError::new(ErrorCode::InternalError, "the edge lost its state while waiting; retry"))
        })
    }

    /// The agent's connection is gone: its jobs wait for it to come back.
    async fn gone(&self, ws: &WebSocket, how: &str) {
        let now = now_ms();
        let Some(session_id) = self.sockets().session_id(ws) else { return };
        console_log!("session={session_id} agent connection {how}");
        if self.load(now).is_err() {
            return;
        }
        let effects = self.with_edge(|edge| edge.disconnect(now, &session_id)).unwrap_or_default();
        self.apply(effects, Some((&session_id, ws)));
        self.schedule(now).await;
    }
}

/// A Worker setting by name: a secret or a var. Vars written as TOML numbers arrive as
/// JS numbers; they count too.
pub(crate) fn setting(env: &Env, name: &str) -> Option<String> {
    let env: &JsValue = env.as_ref();
    let value = worker::js_sys::Reflect::get(env, &JsValue::from_str(name)).ok()?;
    if let Some(text) = value.as_string() {
        return Some(text);
    }
    let number = value.as_f64().filter(|n| n.is_finite())?;
    if number.fract() == 0.0 && number.abs() < 9e15 {
        Some(format!("{}", number as i64))
    } else {
        Some(number.to_string())
    }
}
