//! The Durable Object `EdgeDurableObject`: one per pool, the host of one [`Edge`]. It
//! translates requests, agent frames, socket closes and alarms into the machine's events,
//! and the machine's effects into storage writes, socket sends and answers on callers'
//! channels.
//!
//! Every event goes the same way: rebuild the machine if this instance has none yet, feed
//! it the event with the time, carry out the effects it returns (the writes first, in one
//! transaction), then put the alarm on its next deadline. Workerd evicts an idle instance
//! after about ten seconds even while hibernated sockets stay open, so the rebuild — jobs
//! from [`Store`], sessions from socket attachments — is the common path, not a recovery
//! path.
//!
//! Handlers take `&self` and may interleave at every `.await`; the machine sits in a
//! `RefCell` that is borrowed only between awaits, never across one.

use crate::exchange;
use crate::sockets::{close_socket, AtHand, Sockets};
use crate::store::Store;
use crate::{entropy, now_ms};
use edge_core::http::{self, Gate, Reply};
use edge_core::config::ConfigError;
use edge_core::machine::Post;
use edge_core::progress::FeedIn;
use edge_core::{split_writes, CallerId, Config, Edge, Effect, Millis, Response};
use futures::channel::oneshot;
use futures::future::{select, Either};
use futures::StreamExt;
use shared::contract::{ApiError, ErrorCode};
use shared::protocol::close;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;
use worker::wasm_bindgen::JsValue;
use worker::{
    console_error, console_log, console_warn, durable_object, Delay, DurableObject, Env, Request, State, WebSocket,
    WebSocketIncomingMessage, WebSocketPair,
};

enum Machine {
    /// This instance has not rebuilt the machine yet.
    Unloaded,
    Ready(Box<Edge>),
    /// A setting is wrong; the message says which. Settings only change with a new
    /// deployment, which starts a new instance, so this is kept.
    Misconfigured(String),
}

/// A caller's channel: the machine's answers for it go here.
enum Channel {
    Once(oneshot::Sender<Response>),
    Stream(FeedIn),
}

#[durable_object]
pub struct EdgeDurableObject {
    state: State,
    env: Env,
    machine: RefCell<Machine>,
    /// The pool this object serves, once a request or its storage said.
    pool: RefCell<Option<String>>,
    callers: RefCell<HashMap<CallerId, Channel>>,
    /// The deadline the alarm was last set to by this instance ([`moves_alarm`]).
    alarm_at: Cell<Option<Millis>>,
    /// POSTs the machine asked for (alerts, callbacks), made before the next alarm is set.
    deliveries: RefCell<Vec<Post>>,
}

impl DurableObject for EdgeDurableObject {
    fn new(state: State, env: Env) -> Self {
        EdgeDurableObject {
            state,
            env,
            machine: RefCell::new(Machine::Unloaded),
            pool: RefCell::new(None),
            callers: RefCell::new(HashMap::new()),
            alarm_at: Cell::new(None),
            deliveries: RefCell::new(Vec::new()),
        }
    }

    async fn fetch(&self, req: Request) -> worker::Result<worker::Response> {
        let path = req.path();
        if self.pool.borrow().is_none() {
            *self.pool.borrow_mut() = req.headers().get(crate::entry::POOL_HEADER).ok().flatten();
        }
        if let Err(message) = self.load(now_ms()) {
            return exchange::respond(http::unavailable(&path, &message));
        }
        let header = |name: &str| req.headers().get(name).ok().flatten();
        // Upgrades the entry refused without asking this object: counted here.
        if let Some(count) = header(crate::entry::REFUSED_HEADER).and_then(|n| n.parse::<u64>().ok()) {
            self.with_edge(|edge| edge.upgrades_refused_before(count));
        }
        let (secret, authorization) = (header("x-runner-secret"), header("authorization"));
        let method = req.inner().method();
        let gate = self.with_edge(|edge| http::preflight(edge.config(), &method, &path, secret.as_deref(), authorization.as_deref()));
        let answer = match gate {
            Some(Gate::Answer(refused)) => {
                let mut req = req;
                exchange::drain_refused(&mut req).await;
                exchange::respond(refused)
            }
            Some(Gate::AgentSocket) => self.accept_agent(&req).await,
            Some(Gate::Handle { read_body }) => self.serve(req, &path, read_body).await,
            None => exchange::respond(not_loaded(&path)),
        };
        // An error here is the host's own (the runtime refused something), never the
        // caller's: answer it in the contract's shape rather than workerd's bare 500.
        answer.or_else(|e| {
            console_error!("path={path} request failed in the host: {e}");
            exchange::respond(http::host_failed(&method, &path, &format!("the edge failed to answer: {e}")))
        })
    }

    async fn alarm(&self) -> worker::Result<worker::Response> {
        // The alarm that woke us is spent.
        self.alarm_at.set(None);
        let now = now_ms();
        if let Err(message) = self.load(now) {
            // An error makes the runtime retry the alarm (with backoff); an Ok would leave
            // every deadline stalled until some other event came.
            console_error!("alarm: the edge cannot run: {message}");
            return Err(worker::Error::RustError(format!("the edge could not load, so the alarm will be retried: {message}")));
        }
        let effects = self.with_edge(|edge| edge.tick(now)).unwrap_or_default();
        self.apply(effects, None);
        self.deliver().await;
        self.schedule(now_ms()).await;
        worker::Response::ok("")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        let now = now_ms();
        // Every socket is tagged at accept; one that is not is a session the machine does
        // not know, and it says what to do with those.
        let session_id = self.sockets().session_id(&ws).unwrap_or_default();
        if let Err(message) = self.load(now) {
            // The message says why (a setting, or storage that did not read) and what to do.
            close_socket(&ws, close::INTERNAL_ERROR, &message);
            return Ok(());
        }
        let effects = match message {
            WebSocketIncomingMessage::String(text) => self.with_edge(|edge| edge.message(now, &session_id, &text)),
            WebSocketIncomingMessage::Binary(_) => self.with_edge(|edge| edge.binary_frame(now, &session_id)),
        };
        self.apply(effects.unwrap_or_default(), Some((&session_id, &ws)));
        self.schedule(now).await;
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, code: usize, reason: String, _was_clean: bool) -> worker::Result<()> {
        let code = u16::try_from(code).unwrap_or(close::PROTOCOL_ERROR);
        self.gone(&ws, Some((code, &reason))).await;
        // Answer the close handshake (the runtime may have done so already).
        let _ = ws.close(Some(1000), Some("closed"));
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, error: worker::Error) -> worker::Result<()> {
        console_log!("agent connection failed: {}", shared::text::peer_words(&error.to_string()));
        self.gone(&ws, None).await;
        Ok(())
    }
}

impl EdgeDurableObject {
    fn sockets(&self) -> Sockets<'_> {
        Sockets::new(&self.state)
    }

    fn store(&self) -> Store {
        Store::new(self.state.storage())
    }

    /// Rebuilds the machine if this instance has none. `Err` says why the edge cannot run.
    fn load(&self, now: Millis) -> Result<(), String> {
        match &*self.machine.borrow() {
            Machine::Ready(_) => return Ok(()),
            Machine::Misconfigured(message) => return Err(message.clone()),
            Machine::Unloaded => {}
        }
        let store = self.store();
        // Which pool: from the request that woke the object (kept in storage for the
        // events that carry none: alarms, agents' frames).
        let known = self.pool.borrow().clone();
        let pool = match store.open().and_then(|()| store.pool(known.as_deref())) {
            Ok(Some(pool)) => pool,
            Ok(None) => return Err("this object has not been told its pool yet; retry".into()),
            Err(e) => {
                console_error!("reading the pool's name failed: {e}");
                return Err(format!("the edge could not read its storage ({e}); retry"));
            }
        };
        *self.pool.borrow_mut() = Some(pool.clone());
        let config = match Config::for_pool(|name| setting(&self.env, name), &pool) {
            Ok(config) => config,
            Err(e) => {
                let message = misconfigured(&e);
                console_error!("pool={pool} {message}");
                *self.machine.borrow_mut() = Machine::Misconfigured(message.clone());
                return Err(message);
            }
        };
        let loaded = store.load().and_then(|jobs| Ok((jobs, store.load_alerts()?)));
        let ((jobs, problems), alerts) = match loaded {
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
        let (sessions, unknown) = self.sockets().restore();
        let (job_count, session_count) = (jobs.len(), sessions.len());
        // A rebuild, not a restart (`Edge::restart`): an agent coming back wakes the evicted
        // object, so a job waiting for its agent waits on from when it went.
        let (edge, effects) = Edge::restore(config, jobs, sessions, alerts, now);
        // What the rebuild decided is stored before the machine serves anything: not kept
        // otherwise (the next event rebuilds it), or a later forget could delete a job whose
        // end was never written.
        let (writes, effects) = split_writes(effects);
        if let Err(e) = self.store().apply(writes) {
            console_error!("storing the rebuild's decisions failed: {e}");
            return Err(format!("the edge could not write its job storage ({e}); retry"));
        }
        console_log!("edge rebuilt: {job_count} jobs from storage, {session_count} agent connections from sockets");
        *self.machine.borrow_mut() = Machine::Ready(Box::new(edge));
        self.apply(effects, None);
        for (tag, ws) in unknown {
            self.apply(Edge::unknown_connection(&tag), Some((&tag, &ws)));
        }
        Ok(())
    }

    /// Runs `f` on the machine (`None` if it is not loaded). The borrow ends with `f`.
    fn with_edge<R>(&self, f: impl FnOnce(&mut Edge) -> R) -> Option<R> {
        match &mut *self.machine.borrow_mut() {
            Machine::Ready(edge) => Some(f(edge)),
            _ => None,
        }
    }

    /// Stores the event's writes in one transaction, then carries out the rest in order —
    /// or, if the store failed, what the machine decides instead.
    fn apply(&self, effects: Vec<Effect>, at_hand: AtHand<'_>) {
        if effects.is_empty() {
            return;
        }
        let (writes, mut rest) = split_writes(effects);
        if let Err(e) = self.store().apply(writes) {
            console_error!("job records could not be stored: {e}");
            rest = self.with_edge(|edge| edge.store_failed(now_ms(), &e)).unwrap_or_default();
        }
        let sockets = self.sockets();
        let mut gone = Vec::new();
        for effect in rest {
            match effect {
                Effect::Send { session, text } => sockets.send(&session, &text, at_hand),
                Effect::Close { session, code, reason } => {
                    console_log!("session={session} closing: {code} {reason}");
                    sockets.close(&session, code, &reason, at_hand);
                }
                Effect::SaveSession(session) => sockets.save_session(&session, at_hand),
                Effect::Answer { caller, response } => {
                    if let Some(Channel::Once(tx)) = self.callers.borrow_mut().remove(&caller) {
                        let _ = tx.send(response);
                    }
                }
                Effect::Stream { caller, chunk } => {
                    let mut callers = self.callers.borrow_mut();
                    if let Some(Channel::Stream(feed)) = callers.get(&caller) {
                        // A follower too far behind is cut (its stream ends, told why), or
                        // its connection went: either way it is let go.
                        if !feed.send(chunk) {
                            callers.remove(&caller);
                            gone.push(caller);
                        }
                    }
                }
                Effect::EndStream { caller } => {
                    self.callers.borrow_mut().remove(&caller);
                }
                Effect::Deliver { caller, job_id, form } => {
                    let record = self.store().load_one(&job_id);
                    let mut record = Some(record);
                    let now = now_ms().into();
                    let delivered = self
                        .with_edge(|edge| edge.delivered(caller, &job_id, form, record.take().expect("read once"), now))
                        .unwrap_or_else(|| Edge::deliver(caller, form, record.take().expect("not given"), now));
                    self.apply(delivered, at_hand);
                }
                Effect::Post(post) => self.deliveries.borrow_mut().push(post),
                Effect::Recall { job_id } => {
                    let record = self.store().load_one(&job_id);
                    let effects = self.with_edge(|edge| edge.recalled(now_ms(), &job_id, record)).unwrap_or_default();
                    self.apply(effects, at_hand);
                }
                Effect::Save(_) | Effect::Forget { .. } | Effect::SaveAlerts(_) => unreachable!("writes were split out"),
            }
        }
        for caller in gone {
            let effects = self.with_edge(|edge| edge.caller_gone(now_ms(), caller)).unwrap_or_default();
            self.apply(effects, at_hand);
        }
    }

    /// Makes the POSTs the machine asked for and tells it how each went (from the alarm).
    /// Each is bounded by [`edge_core::notify::DELIVERY_TIMEOUT_MS`]; other events go on
    /// meanwhile. They go out together, and those other events ask for meanwhile join
    /// them (looked for every [`DELIVERY_POLL_MS`]): made one after another, every callback
    /// and alert waited behind a receiver that never answers, 15 s each time it was tried.
    /// How many is the machine's to bound: it hands out at most
    /// [`edge_core::machine::MAX_CALLBACKS_IN_FLIGHT`] callbacks at once, the next as an
    /// outcome comes back. The machine's deadlines that come meanwhile are met here too.
    ///
    /// One alarm takes new POSTs for [`alarm_budget_ms`] only, then waits for those on
    /// their way (each bounded by the delivery timeout) and returns ([`delivery_round`]):
    /// Cloudflare gives an alarm handler 15 minutes of wall time, and one that kept taking
    /// them while others kept coming ran past it, losing the outcomes on their way (each
    /// posted again: a callback twice). Those left are the next alarm's, set at once
    /// ([`Self::schedule`]).
    async fn deliver(&self) {
        let (started, budget_ms) = (now_ms(), alarm_budget_ms(setting(&self.env, ALARM_BUDGET_SETTING).as_deref()));
        let mut on_their_way = futures::stream::FuturesUnordered::new();
        loop {
            let queued = self.deliveries.borrow().len();
            match delivery_round(now_ms().saturating_sub(started), budget_ms, queued, on_their_way.len()) {
                Round::Take => {
                    for delivery in std::mem::take(&mut *self.deliveries.borrow_mut()) {
                        on_their_way.push(async move {
                            let id = delivery.id.clone();
                            (id, post(delivery).await)
                        });
                    }
                }
                Round::Wait => {}
                Round::Done => {
                    if queued > 0 {
                        console_log!("alarm: {queued} posts left for the next alarm after {budget_ms} ms of taking them");
                    }
                    return;
                }
            }
            let poll = std::pin::pin!(Delay::from(Duration::from_millis(DELIVERY_POLL_MS)));
            if let Either::Left((Some((id, outcome)), _)) = select(on_their_way.next(), poll).await {
                let effects = self.with_edge(|edge| edge.posted(now_ms(), &id, outcome)).unwrap_or_default();
                self.apply(effects, None);
            }
            // The machine's deadlines are met meanwhile: they are this alarm's, which does
            // not end while POSTs are on their way, and a receiver that never answers, sent
            // a new callback before the last was given up, held every one of them (silent
            // agents, timeouts, lost jobs, the queue's waits, retention, retries) for good.
            let now = now_ms();
            if self.with_edge(|edge| edge.next_deadline()).flatten().is_some_and(|at| at <= now) {
                let effects = self.with_edge(|edge| edge.tick(now)).unwrap_or_default();
                self.apply(effects, None);
            }
        }
    }

    /// Puts the alarm on the machine's next deadline — or right away when there are POSTs
    /// to make: the alarm makes them, so no caller's answer waits on someone else's
    /// webhook. Only ever earlier: see [`moves_alarm`].
    async fn schedule(&self, now: Millis) {
        let posts = (!self.deliveries.borrow().is_empty()).then_some(now);
        let Some(at) = posts.or_else(|| self.with_edge(|edge| edge.next_deadline()).flatten()) else { return };
        if !moves_alarm(self.alarm_at.get(), at) {
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
    async fn accept_agent(&self, req: &Request) -> worker::Result<worker::Response> {
        if !exchange::asks_for_websocket(req) {
            return exchange::respond(http::upgrade_required());
        }
        // Cloudflare sets the caller's address here (a client cannot): unproven connections
        // are bounded per source, and a refusal is logged with it.
        let peer = req.headers().get("cf-connecting-ip").ok().flatten().unwrap_or_default();
        // Only a peer that proves an agent's key gets a socket: the runtime copies each
        // message whole (up to 32 MiB) before the core can weigh it against the hello's
        // limit, so a socket given to anyone let anyone fill the isolate's memory. The
        // entry checked it already; checked again here, where the socket is made, so that
        // no way to this object skips it (a refusal here is counted and logged by the
        // machine, as on the native edge).
        let now = now_ms();
        let proof = req.headers().get(shared::envelope::AGENT_PROOF_HEADER).ok().flatten();
        match self.with_edge(|edge| edge.check_upgrade(now, proof.as_deref(), &peer)) {
            Some(Ok(_)) => {}
            Some(Err(refused)) => return exchange::error(&refused),
            None => return exchange::respond(not_loaded("/agent/connect")),
        }
        let seed = match entropy::<64>() {
            Ok(seed) => seed,
            Err(e) => return exchange::error(&ApiError::new(ErrorCode::InternalError, e)),
        };
        let pair = WebSocketPair::new()?;
        // The agent's nonce, for the challenge to sign (the core refuses a dial without one, or of another shape).
        let agent_nonce = req.headers().get(shared::envelope::AGENT_NONCE_HEADER).ok().flatten();
        let Some((session_id, effects)) = self.with_edge(|edge| edge.connect(now, seed, &peer, agent_nonce.as_deref())) else {
            return exchange::respond(not_loaded("/agent/connect"));
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
        worker::Response::from_websocket(pair.client)
    }

    /// Every other request the gate let through: the core routes it; its caller gets its answer (or stream)
    /// from the effects, now or when its job ends.
    async fn serve(&self, mut req: Request, path: &str, read_body: bool) -> worker::Result<worker::Response> {
        let header = |name: &str| req.headers().get(name).ok().flatten();
        let (secret_header, authorization, idempotency_key, last_event_id) =
            (header("x-runner-secret"), header("authorization"), header("idempotency-key"), header("last-event-id"));
        let method = req.inner().method();
        let body = if read_body {
            // The core holds the body against the isolate's bodies in flight, or refuses it
            // unread (429); a body is never read before that.
            let declared = header("content-length").and_then(|length| length.trim().parse().ok());
            // Read within the time its declared length earns it, as on the native edge: a
            // body trickled or never finished is answered 408 and its place let go.
            let intake = self.with_edge(|edge| http::intake(edge.config(), secret_header.as_deref(), authorization.as_deref(), declared));
            match intake {
                Some(Ok(intake)) => {
                    let within_ms = intake.within_ms();
                    exchange::read_body(&mut req, intake, within_ms).await
                }
                Some(Err(crowded)) => {
                    exchange::drain_refused(&mut req).await;
                    return exchange::respond(crowded);
                }
                // Not loaded: answered so, nothing kept.
                None => {
                    exchange::drain_refused(&mut req).await;
                    return exchange::respond(not_loaded(path));
                }
            }
        } else {
            edge_core::body::Body::Bytes(Vec::new())
        };
        let seed = match entropy::<16>() {
            Ok(seed) => seed,
            Err(e) => return exchange::error(&ApiError::new(ErrorCode::InternalError, e)),
        };
        let request = http::Request { method: method.clone(), path: path.to_string(), secret_header, authorization, idempotency_key, last_event_id, body };
        let now = now_ms();
        let Some(handled) = self.with_edge(|edge| http::handle(edge, now, seed, &request)) else {
            return exchange::respond(not_loaded(path));
        };
        // Its body is not held while the effects are carried out.
        drop(request);
        let caller = handled.caller;
        // The caller's channel exists before the effects run: they may answer it.
        match handled.reply {
            Reply::Stream => {
                let (feed, out) = edge_core::progress::follower();
                self.callers.borrow_mut().insert(caller, Channel::Stream(feed));
                self.apply(handled.effects, None);
                self.schedule(now).await;
                let keepalive_ms = self.with_edge(|edge| edge.config().sse_keepalive_ms).unwrap_or(edge_core::progress::SSE_KEEPALIVE_MS);
                exchange::event_stream(out, keepalive_ms)
            }
            // `may_keep_alive` is not read: a Worker keeps no answer alive
            // (`EXECUTE_KEEPALIVE_MS` is the native host's setting, for a Tunnel in front
            // of it; README, "Settings").
            Reply::Once { max_wait_ms, may_keep_alive: _ } => {
                let (tx, rx) = oneshot::channel();
                self.callers.borrow_mut().insert(caller, Channel::Once(tx));
                self.apply(handled.effects, None);
                self.schedule(now).await;
                exchange::respond(self.wait(caller, max_wait_ms, rx, &method, path).await)
            }
        }
    }

    /// Waits for the caller's answer, bounded: a caller that hangs up does not cancel this
    /// future, so without the bound it would pin the object in memory indefinitely.
    async fn wait(&self, caller: CallerId, max_wait_ms: u64, rx: oneshot::Receiver<Response>, method: &str, path: &str) -> Response {
        let delay = std::pin::pin!(Delay::from(Duration::from_millis(max_wait_ms.min(i32::MAX as u64))));
        let rx = match select(rx, delay).await {
            Either::Left((Ok(answer), _)) => return answer,
            Either::Left((Err(_), _)) => None,
            Either::Right(((), rx)) => Some(rx),
        };
        console_warn!("caller={} stopped waiting after {max_wait_ms} ms", caller.0);
        let now = now_ms();
        let effects = self.with_edge(|edge| edge.wait_expired(now, caller)).unwrap_or_default();
        self.apply(effects, None);
        match rx.map(|mut rx| rx.try_recv()) {
            Some(Ok(Some(answer))) => answer,
            _ => http::host_failed(method, path, "the edge lost this request while waiting"),
        }
    }

    /// The agent's connection is gone (`frame`: the close frame it sent, if it did): its
    /// jobs wait for it to come back. The machine logs the agent's going, with the frame.
    async fn gone(&self, ws: &WebSocket, frame: Option<(u16, &str)>) {
        let now = now_ms();
        let Some(session_id) = self.sockets().session_id(ws) else { return };
        if self.load(now).is_err() {
            return;
        }
        let effects = self.with_edge(|edge| edge.peer_closed(now, &session_id, frame)).unwrap_or_default();
        self.apply(effects, Some((&session_id, ws)));
        self.schedule(now).await;
    }
}

/// How often POSTs asked for while others are on their way are sent too ([`EdgeDurableObject::deliver`]).
const DELIVERY_POLL_MS: u64 = 200;

/// How long one alarm takes new POSTs: a third of the 15 minutes of wall time Cloudflare
/// gives an alarm handler, leaving the delivery timeout for the last ones to come back
/// and ample room besides.
const ALARM_BUDGET_MS: Millis = 5 * 60_000;

/// A shorter [`ALARM_BUDGET_MS`], for tests: not documented as a setting. Harmless in
/// production: it can only shorten the budget (at least 1 s), and a shorter one only hands
/// POSTs to the next alarm sooner; a value that is no whole number is ignored.
const ALARM_BUDGET_SETTING: &str = "ALARM_DELIVERY_BUDGET_MS";

/// One alarm's budget for taking POSTs, from [`ALARM_BUDGET_SETTING`] if set.
fn alarm_budget_ms(setting: Option<&str>) -> Millis {
    setting.and_then(|v| v.trim().parse::<Millis>().ok()).map_or(ALARM_BUDGET_MS, |ms| ms.clamp(1_000, ALARM_BUDGET_MS))
}

/// What an alarm's delivery loop does next ([`delivery_round`]).
#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// Send the POSTs asked for, then wait on those on their way.
    Take,
    /// Take none: wait on those on their way.
    Wait,
    /// Return; any left are the next alarm's.
    Done,
}

/// The stop rule of one alarm's delivery loop, `elapsed_ms` into it: POSTs asked for are
/// taken within its budget only; past it the loop waits for those on their way (each
/// bounded by the delivery timeout), then ends.
fn delivery_round(elapsed_ms: Millis, budget_ms: Millis, queued: usize, on_their_way: usize) -> Round {
    match (elapsed_ms < budget_ms && queued > 0, on_their_way > 0) {
        (true, _) => Round::Take,
        (false, true) => Round::Wait,
        (false, false) => Round::Done,
    }
}

/// Whether the alarm, set by this instance for `set` (if it did), must be rewritten for the
/// machine's next deadline `next`: only when that comes sooner. Setting the alarm is a
/// storage operation (under Miniflare a transaction of its own and an fsync), and most
/// deadlines only move later — each agent frame pushes its session's silence deadline on
/// — so rewriting it on every change cost a write per frame: about five per job through
/// `/execute`. An alarm left earlier than needed fires, finds nothing due, and is set
/// again for the deadline of the moment: with agents' heartbeats every 15 s, about one
/// wake-up per 15-30 s instead of a write per frame.
fn moves_alarm(set: Option<Millis>, next: Millis) -> bool {
    set.is_none_or(|at| next < at)
}

/// The answer while this instance has no machine (it could not rebuild it).
fn not_loaded(path: &str) -> Response {
    http::unavailable(path, "the edge is not loaded; retry")
}

/// One POST, bounded in time; its status, or why it failed.
/// The body is let go once the runtime holds its copy (a callback's is up to 2 MiB).
///
/// However the attempt ends — answered, failed, past its time, or this future dropped —
/// the runtime's fetch ends with it ([`AbortOnDrop`]), and an answer's body is not waited
/// for (cancelled unread). Dropping the Rust future alone left the fetch going: its
/// connection stayed open to a receiver that never answers, each new attempt opened
/// another, and since an invocation waits on only a few connections at once (Cloudflare
/// queues the rest), other receivers' callbacks and NOTIFY_URL alerts never went out.
async fn post(delivery: Post) -> edge_core::notify::Outcome {
    let headers = worker::Headers::new();
    for (name, value) in &delivery.headers {
        headers.set(name, value).map_err(|e| e.to_string())?;
    }
    let mut init = worker::RequestInit::new();
    init.with_method(worker::Method::Post)
        .with_headers(headers)
        .with_redirect(worker::RequestRedirect::Manual)
        .with_body(Some(JsValue::from_str(&delivery.body)));
    drop(delivery.body);
    let request = worker::Request::new_with_init(&delivery.url, &init).map_err(|e| e.to_string())?;
    let fetcher = worker::Fetch::Request(request);
    let abort = AbortOnDrop(Some(worker::AbortController::default()));
    let signal = abort.signal();
    let fetch = std::pin::pin!(fetcher.send_with_signal(&signal));
    let limit = std::pin::pin!(Delay::from(Duration::from_millis(edge_core::notify::DELIVERY_TIMEOUT_MS)));
    match select(fetch, limit).await {
        Either::Left((Ok(response), _)) => {
            // Only the status counts: the body is let go unread, not held open.
            if let worker::ResponseBody::Stream(body) = response.body() {
                let _ = body.cancel();
            }
            Ok(response.status_code())
        }
        Either::Left((Err(e), _)) => Err(e.to_string()),
        Either::Right(_) => Err(format!("no answer within {} ms", edge_core::notify::DELIVERY_TIMEOUT_MS)),
    }
}

/// Aborts its fetch when dropped: the connection (and a body still being sent or read)
/// goes with the attempt, whichever way [`post`] returns.
struct AbortOnDrop(Option<worker::AbortController>);

impl AbortOnDrop {
    fn signal(&self) -> worker::AbortSignal {
        self.0.as_ref().map(worker::AbortController::signal).unwrap_or_else(worker::AbortSignal::abort)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(controller) = self.0.take() {
            controller.abort();
        }
    }
}

/// What is said while a setting is wrong (by the entry and by an object).
pub(crate) fn misconfigured(e: &ConfigError) -> String {
    format!(
        "the edge is misconfigured: {e}. Set secrets with `wrangler secret put <NAME>` and settings in \
         wrangler.toml [vars], then deploy again"
    )
}

/// A Worker setting by name: a secret or a var, as [`setting_text`] reads its value.
pub(crate) fn setting(env: &Env, name: &str) -> Option<String> {
    let env: &JsValue = env.as_ref();
    let value = worker::js_sys::Reflect::get(env, &JsValue::from_str(name)).ok()?;
    let binding = if value.is_undefined() || value.is_null() {
        Binding::Absent
    } else if let Some(text) = value.as_string() {
        Binding::Text(text)
    } else if let Some(number) = value.as_f64() {
        Binding::Number(number)
    } else {
        let json = worker::js_sys::JSON::stringify(&value).ok().and_then(|s| s.as_string());
        Binding::Other(json.unwrap_or_else(|| "(a value that is not text)".into()))
    };
    setting_text(binding)
}

/// A binding's value as the Worker gets it.
#[derive(Debug)]
pub(crate) enum Binding {
    Absent,
    Text(String),
    /// A var written as a TOML number.
    Number(f64),
    /// A var written as a TOML boolean, array or table: its JSON text.
    Other(String),
}

/// The text a setting reads: a TOML number's digits, so they count as written; any other
/// value as its JSON text (`true`, `["a", "b"]`), which no setting takes, so the edge stops
/// naming the setting — taken as unset, a wrong type went unsaid: the default applied
/// (`CALLBACK_HOSTS = ["hooks.example"]`: every callback refused as not listed), or a
/// pool's own setting fell back to the edge's (`CALLBACK_HOSTS_GPU`, `MAX_QUEUED_JOBS_GPU`).
pub(crate) fn setting_text(binding: Binding) -> Option<String> {
    match binding {
        Binding::Absent => None,
        Binding::Text(text) => Some(text),
        Binding::Number(number) if number.is_finite() && number.fract() == 0.0 && number.abs() < 9e15 => Some(format!("{}", number as i64)),
        Binding::Number(number) => Some(number.to_string()),
        Binding::Other(json) => Some(json),
    }
}

#[cfg(test)]
mod tests {
    use super::{alarm_budget_ms, delivery_round, moves_alarm, setting_text, Binding, Round, ALARM_BUDGET_MS};

    /// A var of another type than text or number (a TOML boolean, array or table) reads as
    /// its JSON text, refused by the setting it is, not as unset; numbers as their digits.
    #[test]
    fn a_setting_of_another_type_is_not_unset() {
        assert_eq!(setting_text(Binding::Absent), None);
        assert_eq!(setting_text(Binding::Text("7".into())).as_deref(), Some("7"));
        assert_eq!(setting_text(Binding::Number(600_000.0)).as_deref(), Some("600000"));
        assert_eq!(setting_text(Binding::Number(1e20)).as_deref(), Some("100000000000000000000"));
        assert_eq!(setting_text(Binding::Number(1.5)).as_deref(), Some("1.5"));
        assert_eq!(setting_text(Binding::Number(f64::INFINITY)).as_deref(), Some("inf"));
        assert_eq!(setting_text(Binding::Other("true".into())).as_deref(), Some("true"));
        let set = |name: &str, value: Binding| {
            let value = setting_text(value);
            edge_core::Config::from_lookup(|k| match k {
                "RUNNER_SECRET" => Some("0123456789abcdef0123".into()),
                "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".into()),
                "AGENT_PUBLIC_KEYS" => Some("spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".into()),
                _ if k == name => value.clone(),
                _ => None,
            })
        };
        let err = set("MAX_QUEUED_JOBS", Binding::Other("true".into())).unwrap_err().to_string();
        assert!(err.starts_with("MAX_QUEUED_JOBS must be a whole number"), "{err}");
        let err = set("CALLBACK_HOSTS", Binding::Other(r#"["hooks.example"]"#.into())).unwrap_err().to_string();
        assert!(err.contains("CALLBACK_HOSTS"), "{err}");
        assert!(set("MAX_QUEUED_JOBS", Binding::Number(100_000.0)).is_ok());
    }

    #[test]
    fn the_alarm_only_moves_earlier() {
        // None set by this instance (new, or the alarm just fired): set it.
        assert!(moves_alarm(None, 5_000));
        // A deadline that came sooner: move it.
        assert!(moves_alarm(Some(5_000), 4_999));
        // The same deadline, or one that moved later (an agent's frame pushed its silence
        // deadline on): the alarm stays, fires early, and is set again then.
        assert!(!moves_alarm(Some(5_000), 5_000));
        assert!(!moves_alarm(Some(5_000), 35_000));
    }

    /// One alarm takes POSTs within its budget only, then waits for those on their way and
    /// ends, whatever is still asked for: an alarm that took them while others kept coming
    /// ran past the 15 minutes Cloudflare gives it.
    #[test]
    fn an_alarm_stops_taking_posts_after_its_budget() {
        let budget = ALARM_BUDGET_MS;
        // Within the budget: what is asked for goes out; with none, it waits on those on
        // their way, and ends when there are none.
        assert_eq!(delivery_round(0, budget, 3, 0), Round::Take);
        assert_eq!(delivery_round(budget - 1, budget, 1, 8), Round::Take);
        assert_eq!(delivery_round(10, budget, 0, 2), Round::Wait);
        assert_eq!(delivery_round(10, budget, 0, 0), Round::Done);
        // Past it: nothing more is taken, however much is asked for; those on their way are
        // waited for, then the alarm ends.
        assert_eq!(delivery_round(budget, budget, 5, 2), Round::Wait);
        assert_eq!(delivery_round(budget + 60_000, budget, 5, 1), Round::Wait);
        assert_eq!(delivery_round(budget, budget, 5, 0), Round::Done);
        // Taking for the budget, then the delivery timeout for the last to come back, stays
        // well inside an alarm's 15 minutes.
        assert!(ALARM_BUDGET_MS + edge_core::notify::DELIVERY_TIMEOUT_MS < 15 * 60_000 / 2);
    }

    /// The test setting can only shorten the budget; a value that is no number is ignored.
    #[test]
    fn the_alarm_budget_setting_only_shortens_it() {
        assert_eq!(alarm_budget_ms(None), ALARM_BUDGET_MS);
        assert_eq!(alarm_budget_ms(Some("2000")), 2_000);
        assert_eq!(alarm_budget_ms(Some("0")), 1_000);
        assert_eq!(alarm_budget_ms(Some("86400000")), ALARM_BUDGET_MS);
        assert_eq!(alarm_budget_ms(Some("soon")), ALARM_BUDGET_MS);
    }
}
