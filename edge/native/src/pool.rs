//! The task that owns the state machine. HTTP handlers and WebSocket connections send it
//! [`Command`]s; it feeds them to the machine with the time, carries out the effects
//! (socket sends, SQLite writes, answers to waiting callers) and sleeps until the
//! machine's next deadline. One owner means no locks and one order of events.

use crate::store::Store;
use crate::{entropy, now_ms};
use edge_core::http::{self, Outcome, Response};
use edge_core::{Edge, Effect};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Duration, Instant};
use tracing::{error, warn};

/// What a connection's writer is told to do.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Close(u16, String),
}

/// An HTTP request, owned, for the pool task.
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub secret_header: Option<String>,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    /// `None`: the body was over `MAX_BODY_BYTES`.
    pub body: Option<Vec<u8>>,
}

/// The pool's answer to an HTTP request.
pub enum Reply {
    Now(Response),
    /// The job's answer arrives on the receiver; the caller bounds the wait.
    Later { job_id: String, max_wait_ms: u64, answer: oneshot::Receiver<(u16, String)> },
    /// Server-Sent Events: chunks until the channel closes (the job ended).
    Stream { chunks: mpsc::UnboundedReceiver<String> },
}

pub enum Command {
    Http { req: HttpRequest, reply: oneshot::Sender<Reply> },
    WaitExpired { job_id: String, reply: oneshot::Sender<Response> },
    Connect { outbox: mpsc::UnboundedSender<Outbound>, reply: oneshot::Sender<String> },
    Frame { session: String, text: String },
    BinaryFrame { session: String },
    Disconnect { session: String },
    /// Close every agent connection (the edge is stopping).
    Shutdown { done: oneshot::Sender<()> },
}

pub struct Pool {
    edge: Edge,
    store: Store,
    outboxes: HashMap<String, mpsc::UnboundedSender<Outbound>>,
    waiters: HashMap<String, Vec<oneshot::Sender<(u16, String)>>>,
    /// `GET /jobs/{id}/events` streams, by job.
    followers: HashMap<String, Vec<mpsc::UnboundedSender<String>>>,
}

impl Pool {
    pub fn new(edge: Edge, store: Store) -> Pool {
        Pool { edge, store, outboxes: HashMap::new(), waiters: HashMap::new(), followers: HashMap::new() }
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, startup: Vec<Effect>) {
        self.apply(startup);
        loop {
            let deadline = self.edge.next_deadline().map(|at| {
                let now = now_ms();
                Instant::now() + Duration::from_millis(at.saturating_sub(now))
            });
            let command = tokio::select! {
                c = commands.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
                _ = sleep_until(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))) => {
                    let effects = self.edge.tick(now_ms());
                    self.apply(effects);
                    continue;
                }
            };
            self.handle(command);
        }
    }

    fn handle(&mut self, command: Command) {
        let now = now_ms();
        match command {
            Command::Http { req, reply } => {
                let request = http::Request {
                    method: &req.method,
                    path: &req.path,
                    secret_header: req.secret_header.as_deref(),
                    authorization: req.authorization.as_deref(),
                    idempotency_key: req.idempotency_key.as_deref(),
                    body: match &req.body {
                        Some(b) => http::Body::Bytes(b),
                        None => http::Body::TooLarge,
                    },
                };
                let (outcome, effects) = http::handle(&mut self.edge, now, entropy(), request);
                // Register the waiter before carrying out effects: they may finish the job.
                let answer = match outcome {
                    Outcome::Respond(r) => Reply::Now(r),
                    Outcome::Wait { job_id, max_wait_ms } => {
                        let (tx, rx) = oneshot::channel();
                        self.waiters.entry(job_id.clone()).or_default().push(tx);
                        Reply::Later { job_id, max_wait_ms, answer: rx }
                    }
                    Outcome::Follow { job_id, follow } => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        for chunk in follow.backlog {
                            let _ = tx.send(chunk);
                        }
                        match follow.end {
                            // Over already: the stream is that one chunk.
                            Some(end) => {
                                let _ = tx.send(end);
                            }
                            None => self.followers.entry(job_id).or_default().push(tx),
                        }
                        Reply::Stream { chunks: rx }
                    }
                };
                self.apply(effects);
                let _ = reply.send(answer);
            }
            Command::WaitExpired { job_id, reply } => {
                let _ = reply.send(http::waited_too_long(&self.edge, &job_id));
            }
            Command::Connect { outbox, reply } => {
                let (session, effects) = self.edge.connect(now, entropy());
                self.outboxes.insert(session.clone(), outbox);
                self.apply(effects);
                let _ = reply.send(session);
            }
            Command::Frame { session, text } => {
                let effects = self.edge.message(now, &session, &text);
                self.apply(effects);
            }
            Command::BinaryFrame { session } => {
                let effects = self.edge.binary_frame(now, &session);
                self.apply(effects);
            }
            Command::Disconnect { session } => {
                self.outboxes.remove(&session);
                let effects = self.edge.disconnect(now, &session);
                self.apply(effects);
            }
            Command::Shutdown { done } => {
                for (job_id, waiters) in self.waiters.drain() {
                    let answer = http::edge_stopping(&job_id);
                    for waiter in waiters {
                        let _ = waiter.send((answer.status, answer.body.clone()));
                    }
                }
                // Followers' streams end; they can reconnect to the restarted edge.
                self.followers.clear();
                for (_, outbox) in self.outboxes.drain() {
                    let _ = outbox.send(Outbound::Close(
                        shared::protocol::close::SHUTTING_DOWN,
                        "the edge is restarting; reconnect shortly".into(),
                    ));
                }
                let _ = done.send(());
            }
        }
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        // Store first, in one transaction per event, so nothing is announced before it is
        // durable.
        let saves: Vec<&edge_core::job::Job> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Save(job) => Some(&**job),
                _ => None,
            })
            .collect();
        let forgets: Vec<&str> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Forget { job_id } => Some(job_id.as_str()),
                _ => None,
            })
            .collect();
        if let Err(e) = self.store.apply(&saves, &forgets) {
            error!(error = %e, "could not write job records to SQLite; check DATA_DIR's disk space and permissions");
        }
        for effect in effects {
            match effect {
                Effect::Send { session, text } => {
                    if let Some(outbox) = self.outboxes.get(&session) {
                        let _ = outbox.send(Outbound::Text(text));
                    }
                }
                Effect::Close { session, code, reason } => {
                    if let Some(outbox) = self.outboxes.remove(&session) {
                        let _ = outbox.send(Outbound::Close(code, reason));
                    }
                }
                Effect::Finished { job_id, status, body } => {
                    if let Some(followers) = self.followers.remove(&job_id) {
                        let end = http::sse_result(&body);
                        for follower in followers {
                            let _ = follower.send(end.clone());
                        }
                    }
                    for waiter in self.waiters.remove(&job_id).unwrap_or_default() {
                        let _ = waiter.send((status, body.clone()));
                    }
                }
                Effect::Progress { job_id, chunk } => {
                    if let Some(followers) = self.followers.get_mut(&job_id) {
                        followers.retain(|f| f.send(chunk.clone()).is_ok());
                    }
                }
                Effect::Save(_) | Effect::Forget { .. } | Effect::SaveSession(_) => {}
            }
        }
        if self.waiters.len() > 10_000 {
            warn!(waiters = self.waiters.len(), "many callers waiting");
        }
    }
}
