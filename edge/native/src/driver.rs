//! The task that drives the state machine: it translates [`Command`]s (HTTP requests,
//! agent frames, timers) into the machine's events, and the machine's effects into SQLite
//! writes, socket sends and answers on callers' channels. One owner means no locks and one
//! order of events. The requests and frames queued at once are one group: their writes
//! one transaction, the rest of their effects carried out after it ([`Driver::run`]).

use crate::clock::Clock;
use crate::server::Conn;
use crate::socket::Arrivals;
use crate::store::Store;
use runtime::entropy;
use edge_core::http::{self, Reply};
use edge_core::progress::{FeedIn, FeedOut};
use edge_core::{split_writes, CallerId, Edge, Effect, Response};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Duration, Instant};
use tracing::{error, info};

/// How long a stopping edge waits, at most, for the outcomes of the POSTs on their way
/// when it stopped: each is bounded by [`edge_core::notify::DELIVERY_TIMEOUT_MS`], and its
/// outcome comes back a moment after. Stopped before an outcome is stored, the edge would
/// post the same callback again after its restart. (The systemd unit's `TimeoutStopSec`
/// and the container's `stop_grace_period` leave it this time.)
pub const DRAIN_POSTS: Duration = Duration::from_millis(edge_core::notify::DELIVERY_TIMEOUT_MS + 1_000);

/// How the driver ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// Asked to stop ([`Command::Shutdown`]), with the outcomes of its POSTs stored (or
    /// after [`DRAIN_POSTS`]).
    Stopped,
    /// Every sender of commands was dropped without a stop.
    Orphaned,
}

/// What an agent connection's writer is told to do.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Close(u16, String),
}

/// An HTTP caller's end of its channel.
pub enum Opened {
    /// One answer comes on `answer`; if not within `max_wait_ms`, send
    /// [`Command::WaitExpired`] and keep waiting. `may_keep_alive`: the core's word
    /// ([`Reply::Once`]) that this answer may be kept alive (`EXECUTE_KEEPALIVE_MS`).
    Once { caller: CallerId, max_wait_ms: u64, may_keep_alive: bool, answer: oneshot::Receiver<Response> },
    /// Server-Sent Events chunks until the channel closes; each one taken is counted off
    /// `lag`.
    Stream(FeedOut),
}

pub enum Command {
    Http { req: http::Request, reply: oneshot::Sender<Opened> },
    WaitExpired { caller: CallerId },
    /// The HTTP client hung up.
    CallerGone { caller: CallerId },
    /// An agent connection from `peer` (its address); `budget` is what its socket may
    /// still read before it proves itself.
    /// `arrivals`: the frames its socket's task read, stamped as they came.
    Connect {
        outbox: mpsc::UnboundedSender<Outbound>,
        budget: Arc<AtomicUsize>,
        conn: Option<Conn>,
        peer: String,
        /// The agent's nonce from its upgrade request, for the challenge to sign.
        agent_nonce: Option<String>,
        arrivals: Arc<Arrivals>,
        reply: oneshot::Sender<String>,
    },
    /// An upgrade to `/agent/connect` from `peer` refused (checked where it was read).
    UpgradeRefused { peer: String, refused: shared::contract::ApiError },
    Frame { session: String, text: String },
    /// Bytes arrived on an agent connection: `read` is all read from it so far.
    Arriving { session: String, read: u64 },
    BinaryFrame { session: String },
    /// With the peer's close frame (code, reason), when it sent one.
    Disconnect { session: String, closed_with: Option<(u16, String)> },
    /// The edge is stopping: the machine tells callers and agents what happens next.
    Shutdown { done: oneshot::Sender<()> },
    /// A POST the machine asked for (an alert, a callback) went this way.
    Posted { id: String, outcome: edge_core::notify::Outcome },
}

/// Makes one POST: the status it was answered with, or how it failed. The body is moved
/// into the request, not copied (a callback's is up to 2 MiB).
async fn send(http: &reqwest::Client, delivery: edge_core::machine::Post) -> edge_core::notify::Outcome {
    let mut request = http.post(&delivery.url).body(delivery.body);
    for (name, value) in &delivery.headers {
        request = request.header(name, value);
    }
    match request.send().await {
        Ok(resp) => Ok(resp.status().as_u16()),
        Err(e) => Err(failure(e)),
    }
}

/// How a POST failed, in words that hold no part of its URL: reqwest's own text ends with
/// ` for url (<the URL>)`, and `NOTIFY_URL` or a `callback_url` may hold its token (an
/// ntfy topic, a webhook's path), which the machine would log with each failed attempt.
/// The cause is named only in words fixed in advance — an I/O error's kind (`connection
/// refused`), HTTP's (`connection closed before message completed`), a timeout — never in
/// the words of the layers below, which may name the host (a TLS error does).
fn failure(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let connect = e.is_connect();
    let e = e.without_url();
    let mut why = None;
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>().filter(|io| said_plainly(io.kind())) {
            why = Some(io.kind().to_string());
        } else if let Some(http) = c.downcast_ref::<hyper::Error>() {
            // Its own words only, not its source's.
            why = Some(http.to_string());
        }
        cause = c.source();
    }
    match (timeout, why) {
        (true, _) => format!("{e}: timed out"),
        (false, Some(why)) => format!("{e}: {why}"),
        // A name that does not resolve is an I/O error of no kind std names ("uncategorized
        // error" said nothing); the connector's words would name the host.
        (false, None) if connect => format!("{e}: could not connect (is the host's name right, and does it resolve here? its port open? its TLS certificate valid?)"),
        (false, None) => e.to_string(),
    }
}

/// The I/O error kinds whose name says what happened on a connection.
fn said_plainly(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | AddrNotAvailable | BrokenPipe | TimedOut | UnexpectedEof | HostUnreachable | NetworkUnreachable | NetworkDown | PermissionDenied
    )
}

/// The machine's callers, as channels.
enum Channel {
    Once(oneshot::Sender<Response>),
    Stream(FeedIn),
}

/// The most events stored in one transaction ([`Driver::run`]): what was queued at once,
/// up to this many.
pub const MAX_GROUP: usize = 64;

/// The events handled since the group began, not yet stored: their writes, to store in one
/// transaction, and the rest of their effects, carried out (in order) once it is stored.
#[derive(Default)]
struct Group {
    writes: Vec<Effect>,
    rest: Vec<Effect>,
    /// The group's commands, in order, as they came: if its commit fails, each is handled
    /// again alone (`store_group`).
    events: Vec<Grouped>,
    /// An effect that reads the store or asks the machine again (a record to deliver or
    /// recall) came: the group is stored now, and that effect carried out before the next
    /// event.
    ends: bool,
}

/// A command handled in a group, kept until its commit: a request's caller is sent its
/// channel only once the group is stored, or handed to the request handled again alone.
/// The request and the frame are moved here once handled, not copied before: a retry
/// (the group's commit failed) is rare, and a copy of each request's body and each frame
/// for it cost every grouped event an allocation and a copy of up to the body's size.
enum Grouped {
    Http { req: http::Request, reply: oneshot::Sender<Opened>, caller: CallerId, opened: Opened },
    Frame { session: String, text: String },
}

/// Whether a command may join a group: a request or an agent's frame, the two that every
/// job brings several of. The rest (timers, connections, hang-ups, POSTs' outcomes, a
/// stop) are rare and each is handled alone, its writes in a transaction of their own.
fn joins_group(command: &Command) -> bool {
    matches!(command, Command::Http { .. } | Command::Frame { .. })
}

pub struct Driver {
    /// While events are grouped: what they left to store and to carry out.
    group: Option<Group>,
    edge: Edge,
    store: Store,
    clock: Clock,
    outboxes: HashMap<String, mpsc::UnboundedSender<Outbound>>,
    /// Each connection's read budget, set from its session record.
    budgets: HashMap<String, Arc<AtomicUsize>>,
    /// Each connection's entry among the open connections: pinned once its agent proves
    /// itself, so that it is never closed to make room at MAX_CONNECTIONS.
    conns: HashMap<String, Conn>,
    /// Each connection's frames as its socket read them, and how many the machine has had.
    arrivals: HashMap<String, (Arc<Arrivals>, u64)>,
    callers: HashMap<CallerId, Channel>,
    /// Back to this driver, for the outcome of POSTs made in their own tasks.
    commands: mpsc::WeakSender<Command>,
    /// Made at the first POST (an edge without alerts or callbacks never builds it).
    http: Option<reqwest::Client>,
    /// POSTs handed to their tasks whose outcome has not come back yet.
    posts_on_their_way: usize,
    /// Set by [`Command::Shutdown`]: the driver ends once no POST is on its way, or at
    /// this instant.
    stopping_by: Option<Instant>,
}

impl Driver {
    pub fn new(edge: Edge, store: Store, clock: Clock, commands: mpsc::WeakSender<Command>) -> Driver {
        Driver {
            group: None,
            edge,
            store,
            clock,
            outboxes: HashMap::new(),
            budgets: HashMap::new(),
            conns: HashMap::new(),
            arrivals: HashMap::new(),
            callers: HashMap::new(),
            commands,
            http: None,
            posts_on_their_way: 0,
            stopping_by: None,
        }
    }

    /// Makes one POST in its own task; its outcome comes back as [`Command::Posted`]. The
    /// machine bounds how many are on their way: at most
    /// [`edge_core::machine::MAX_CALLBACKS_IN_FLIGHT`] callbacks, besides a few alerts.
    fn post(&mut self, delivery: edge_core::machine::Post) {
        // Once stopping, none goes out that the stop would not wait for: its attempt is
        // stored as on its way, so it is made after the restart, once.
        if self.stopping_by.is_some() {
            info!(delivery = %delivery.id, "not posted: the edge is stopping; it is posted after the restart");
            return;
        }
        self.posts_on_their_way += 1;
        let http = self
            .http
            .get_or_insert_with(|| {
                reqwest::Client::builder()
                    .timeout(Duration::from_millis(edge_core::notify::DELIVERY_TIMEOUT_MS))
                    // A callback host may not send us elsewhere.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .expect("the HTTP client builds")
            })
            .clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let id = delivery.id.clone();
            let outcome = send(&http, delivery).await;
            if let Some(commands) = commands.upgrade() {
                let _ = commands.send(Command::Posted { id, outcome }).await;
            }
        });
    }

    /// Drives the machine until a stop ([`Command::Shutdown`]) has had the outcomes of the
    /// POSTs on their way then (at most [`DRAIN_POSTS`]), or until no one can send commands.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, startup: Vec<Effect>) -> Ended {
        self.carry_out(startup);
        // One timer, moved only when the machine's next deadline moves: most commands
        // leave it where it was, and a timer made afresh for each would be registered and
        // dropped again every time.
        let idle = || Instant::now() + Duration::from_secs(3600);
        let timer = sleep_until(idle());
        tokio::pin!(timer);
        let mut set_for = None;
        loop {
            if let Some(by) = self.stopping_by {
                if self.posts_on_their_way == 0 {
                    return Ended::Stopped;
                }
                if Instant::now() >= by {
                    error!(
                        posts = self.posts_on_their_way,
                        "stopping without the outcome of the POSTs still on their way; each is made again after the restart"
                    );
                    return Ended::Stopped;
                }
            }
            let deadline = self.edge.next_deadline();
            if deadline != set_for || deadline.is_none() && timer.is_elapsed() {
                let at = deadline.map(|at| Instant::from_std(self.clock.instant_of(at))).unwrap_or_else(idle);
                timer.as_mut().reset(at);
                set_for = deadline;
            }
            let stop_by = self.stopping_by;
            let command = tokio::select! {
                c = commands.recv() => match c {
                    Some(c) => c,
                    None => return Ended::Orphaned,
                },
                () = async { sleep_until(stop_by.expect("only while stopping")).await }, if stop_by.is_some() => continue,
                () = &mut timer => {
                    // Fired: a tick is due (or the idle hour passed); set it again below.
                    set_for = None;
                    self.tell_waiting_frames();
                    let effects = self.edge.tick(self.clock.now());
                    self.carry_out(effects);
                    continue;
                }
            };
            self.handle_grouped(command, &mut commands);
        }
    }

    /// Handles `command` and, if it may be grouped, the commands already queued behind it
    /// that may too (at most [`MAX_GROUP`]; nothing is waited for), storing all their
    /// writes in one transaction: under load each event cost a commit of its own — SQLite's
    /// file locks, a WAL frame per page and its checkpoint share, a third of the edge's CPU
    /// with 8 clients. Nothing of any of them is sent or answered before that commit, as
    /// for one event alone; a failed one undoes them all and each is handled again alone
    /// (`store_group`), as if never grouped. One command queued alone is one event, one
    /// transaction, as before: a sequential caller waits for nothing more.
    fn handle_grouped(&mut self, command: Command, commands: &mut mpsc::Receiver<Command>) {
        if !joins_group(&command) {
            self.handle(command);
            return;
        }
        self.group = Some(Group::default());
        self.edge.group_events();
        self.handle(command);
        let mut held = None;
        let mut grouped = 1;
        while grouped < MAX_GROUP && !self.group.as_ref().is_some_and(|g| g.ends) {
            match commands.try_recv() {
                Ok(next) if joins_group(&next) => {
                    self.handle(next);
                    grouped += 1;
                }
                Ok(next) => {
                    held = Some(next);
                    break;
                }
                Err(_) => break,
            }
        }
        self.store_group();
        if let Some(next) = held {
            self.handle(next);
        }
    }

    /// Stores the group's writes in one transaction, then carries out the rest of its
    /// events' effects in order and sends its callers their channels — or, if the store
    /// failed, has the machine undo the group and handles each of its events again.
    fn store_group(&mut self) {
        let Some(group) = self.group.take() else { return };
        let (writes, none) = split_writes(group.writes);
        debug_assert!(none.is_empty());
        match self.store.apply(&writes) {
            Ok(()) => {
                self.edge.group_stored();
                self.carry_out_rest(group.rest);
                for event in group.events {
                    if let Grouped::Http { reply, caller, opened, .. } = event {
                        self.open(reply, caller, opened);
                    }
                }
            }
            Err(e) => {
                // Undone whole, then each event handled again alone, in its own
                // transaction, as if never grouped: only one whose own writes fail is told
                // so; a read, a repeated key, a heartbeat are served as ever. Nothing of the
                // group had gone out: its effects are dropped, its callers' channels unsent.
                error!(error = %e, events = group.events.len(), "could not write a group of events' job records to SQLite; handling each again alone");
                self.edge.group_failed(self.clock.now(), &e.to_string());
                for event in group.events {
                    match event {
                        Grouped::Http { req, reply, caller, opened } => {
                            self.callers.remove(&caller);
                            drop(opened);
                            self.request(req, reply);
                        }
                        Grouped::Frame { session, text } => self.frame(session, text),
                    }
                }
            }
        }
    }

    /// Sends a request's caller its channel; one that hung up while its request waited
    /// here (its handler, dropped, holds no `HangUp` yet to say so) gives its place — a
    /// waiter's, a follower's — back now, not at the job's end.
    fn open(&mut self, reply: oneshot::Sender<Opened>, caller: CallerId, opened: Opened) {
        if reply.send(opened).is_err() {
            self.callers.remove(&caller);
            let effects = self.edge.caller_gone(self.clock.now(), caller);
            self.carry_out(effects);
        }
    }

    /// Handles one request: its caller's channel made before its effects run (they may
    /// answer it), and sent to the caller once they are stored — at once alone, after the
    /// group's commit in a group.
    fn request(&mut self, req: http::Request, reply: oneshot::Sender<Opened>) {
        let handled = http::handle(&mut self.edge, self.clock.now(), entropy(), &req);
        let opened = match handled.reply {
            Reply::Once { max_wait_ms, may_keep_alive } => {
                let (tx, rx) = oneshot::channel();
                self.callers.insert(handled.caller, Channel::Once(tx));
                Opened::Once { caller: handled.caller, max_wait_ms, may_keep_alive, answer: rx }
            }
            Reply::Stream => {
                let (feed, out) = edge_core::progress::follower();
                self.callers.insert(handled.caller, Channel::Stream(feed));
                Opened::Stream(out)
            }
        };
        self.carry_out(handled.effects);
        match &mut self.group {
            Some(group) => group.events.push(Grouped::Http { req, reply, caller: handled.caller, opened }),
            None => self.open(reply, handled.caller, opened),
        }
    }

    /// Handles one of an agent's frames (counted as handled by the caller, once).
    fn frame(&mut self, session: String, text: String) {
        let effects = self.edge.message(self.clock.now(), &session, &text);
        if let Some(group) = &mut self.group {
            group.events.push(Grouped::Frame { session, text });
        }
        self.carry_out(effects);
    }

    /// Tells the machine, before it judges which connections are silent, which have frames
    /// read that still wait in the queue for it, and since when.
    fn tell_waiting_frames(&mut self) {
        for (session, (arrivals, handled)) in &self.arrivals {
            self.edge.frame_waiting(session, arrivals.waiting(*handled));
        }
    }

    /// One more frame of `session`'s reached the machine.
    fn handled_frame(&mut self, session: &str) {
        if let Some((_, handled)) = self.arrivals.get_mut(session) {
            *handled += 1;
        }
    }

    fn handle(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Http { req, reply } => self.request(req, reply),
            Command::WaitExpired { caller } => {
                let effects = self.edge.wait_expired(now, caller);
                self.carry_out(effects);
            }
            Command::CallerGone { caller } => {
                self.callers.remove(&caller);
                let effects = self.edge.caller_gone(now, caller);
                self.carry_out(effects);
            }
            Command::Connect { outbox, budget, conn, peer, agent_nonce, arrivals, reply } => {
                let (session, effects) = self.edge.connect(now, entropy(), &peer, agent_nonce.as_deref());
                self.arrivals.insert(session.clone(), (arrivals, 0));
                self.outboxes.insert(session.clone(), outbox);
                self.budgets.insert(session.clone(), budget);
                if let Some(conn) = conn {
                    self.conns.insert(session.clone(), conn);
                }
                self.carry_out(effects);
                let _ = reply.send(session);
            }
            Command::UpgradeRefused { peer, refused } => self.edge.upgrade_refused(now, &peer, &refused),
            Command::Frame { session, text } => {
                self.handled_frame(&session);
                self.frame(session, text);
            }
            Command::Arriving { session, read } => self.edge.arriving(now, &session, read),
            Command::BinaryFrame { session } => {
                self.handled_frame(&session);
                let effects = self.edge.binary_frame(now, &session);
                self.carry_out(effects);
            }
            Command::Disconnect { session, closed_with } => {
                self.outboxes.remove(&session);
                self.budgets.remove(&session);
                self.conns.remove(&session);
                self.arrivals.remove(&session);
                let effects = self.edge.peer_closed(now, &session, closed_with.as_ref().map(|(code, reason)| (*code, reason.as_str())));
                self.carry_out(effects);
            }
            Command::Posted { id, outcome } => {
                self.posts_on_their_way = self.posts_on_their_way.saturating_sub(1);
                let effects = self.edge.posted(now, &id, outcome);
                self.carry_out(effects);
            }
            Command::Shutdown { done } => {
                // From here the driver waits for the POSTs on their way (their outcomes
                // stored), and starts none.
                self.stopping_by = Some(Instant::now() + DRAIN_POSTS);
                if self.posts_on_their_way > 0 {
                    info!(posts = self.posts_on_their_way, "edge stopping once the POSTs on their way are answered");
                }
                let effects = self.edge.shutdown(now);
                self.carry_out(effects);
                let _ = done.send(());
            }
        }
    }

    /// Stores the event's writes in one transaction, then carries out the rest in order —
    /// or, if the store failed, what the machine decides instead.
    fn carry_out(&mut self, effects: Vec<Effect>) {
        if let Some(group) = &mut self.group {
            // Grouped: kept until the group is stored (`store_group`).
            for effect in effects {
                if effect.is_write() {
                    group.writes.push(effect);
                } else {
                    group.ends |= matches!(effect, Effect::Deliver { .. } | Effect::Recall { .. });
                    group.rest.push(effect);
                }
            }
            return;
        }
        let (writes, mut rest) = split_writes(effects);
        // On this task, not a blocking thread: the machine must wait for its writes anyway,
        // and handing every write to another thread cost about 0.2 ms of CPU per job. What
        // bounds a stall is SQLite's busy timeout (store::BUSY_TIMEOUT_MS).
        if let Err(e) = self.store.apply(&writes) {
            error!(error = %e, "could not write job records to SQLite; check DATA_DIR's disk space, permissions and that no other process holds the database");
            rest = self.edge.store_failed(self.clock.now(), &e.to_string());
        }
        self.carry_out_rest(rest);
    }

    /// Carries out what is left of events whose writes were stored (or what the machine
    /// decided instead): sends, closes, answers, streams, POSTs, reads of the store.
    fn carry_out_rest(&mut self, rest: Vec<Effect>) {
        let mut gone = Vec::new();
        for effect in rest {
            match effect {
                Effect::Send { session, text } => {
                    if let Some(outbox) = self.outboxes.get(&session) {
                        let _ = outbox.send(Outbound::Text(text));
                    }
                }
                Effect::Close { session, code, reason } => {
                    self.budgets.remove(&session);
                    self.conns.remove(&session);
                    self.arrivals.remove(&session);
                    if let Some(outbox) = self.outboxes.remove(&session) {
                        let _ = outbox.send(Outbound::Close(code, reason));
                    }
                }
                Effect::Answer { caller, response } => {
                    if let Some(Channel::Once(tx)) = self.callers.remove(&caller) {
                        let _ = tx.send(response);
                    }
                }
                Effect::Stream { caller, chunk } => {
                    if let Some(Channel::Stream(feed)) = self.callers.get(&caller) {
                        // A follower too far behind is cut (its stream ends, told why), or
                        // its connection went: either way it is let go.
                        if !feed.send(chunk) {
                            self.callers.remove(&caller);
                            gone.push(caller);
                        }
                    }
                }
                Effect::EndStream { caller } => {
                    self.callers.remove(&caller);
                }
                // Sessions live only as long as this process; nothing to keep but what the
                // record says the socket may read.
                Effect::SaveSession(session) => {
                    if let Some(budget) = self.budgets.get(&session.id) {
                        budget.store(session.read_budget().unwrap_or(usize::MAX), Ordering::Relaxed);
                    }
                    if session.read_budget().is_none() {
                        if let Some(conn) = self.conns.get(&session.id) {
                            conn.pin();
                        }
                    }
                }
                Effect::Deliver { caller, job_id, form } => {
                    let record = self.store.load_one(&job_id).map_err(|e| e.to_string());
                    let delivered = self.edge.delivered(caller, &job_id, form, record, self.clock.now());
                    self.carry_out(delivered);
                }
                Effect::Post(post) => self.post(post),
                Effect::Recall { job_id } => {
                    let record = self.store.load_one(&job_id).map_err(|e| e.to_string());
                    let effects = self.edge.recalled(self.clock.now(), &job_id, record);
                    self.carry_out(effects);
                }
                Effect::Save(_) | Effect::Forget { .. } | Effect::SaveAlerts(_) => unreachable!("writes were split out"),
            }
        }
        for caller in gone {
            let effects = self.edge.caller_gone(self.clock.now(), caller);
            self.carry_out(effects);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::machine::Post;

    /// A follower that hung up while its request waited for the driver (its handler
    /// dropped before it took the answer, so no `HangUp` of its own told the driver) gives
    /// its place back at once: 16 such followers of a quiet queued job held every place of
    /// the job until it ended, and the next follower was refused 429.
    #[tokio::test]
    async fn a_caller_gone_before_its_answer_gives_its_place_back() {
        let (mut driver, dir) = grouped_driver("gone");
        let (reply, opened) = oneshot::channel();
        driver.handle(Command::Http { req: request("POST", "/jobs", r#"{"prompt":"quiet"}"#), reply });
        let Ok(Opened::Once { answer, .. }) = opened.await else { panic!("POST /jobs is answered once") };
        let queued: serde_json::Value = serde_json::from_str(&answer.await.unwrap().body).unwrap();
        let events = format!("/jobs/{}/events", queued["job_id"].as_str().expect("a job id"));
        for _ in 0..edge_core::progress::MAX_FOLLOWERS_PER_JOB {
            let (reply, hung_up) = oneshot::channel();
            drop(hung_up);
            driver.handle(Command::Http { req: request("GET", &events, ""), reply });
        }
        let (reply, opened) = oneshot::channel();
        driver.handle(Command::Http { req: request("GET", &events, ""), reply });
        match opened.await.unwrap() {
            Opened::Stream(_) => {}
            Opened::Once { answer, .. } => panic!("the next follower was refused: {}", answer.await.unwrap().body),
        }
        drop(driver);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn grouped_driver(name: &str) -> (Driver, std::path::PathBuf) {
        let get = |name: &str| {
            let value = match name {
                "RUNNER_SECRET" => "0123456789abcdef0123",
                "EDGE_SIGNING_KEY" => "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=",
                "AGENT_PUBLIC_KEYS" => "spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=",
                _ => return None,
            };
            Some(value.to_string())
        };
        let dir = std::env::temp_dir().join(format!("cr-driver-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let clock = Clock::start();
        let edge = Edge::new(edge_core::Config::from_lookup(get).unwrap(), clock.now());
        let (commands, _rx) = mpsc::channel(1);
        (Driver::new(edge, Store::open(&dir).unwrap(), clock, commands.downgrade()), dir)
    }

    /// Submissions queued together, as a busy pool's are.
    fn queued_submissions(count: usize) -> (mpsc::Receiver<Command>, Vec<oneshot::Receiver<Opened>>) {
        let (tx, rx) = mpsc::channel(16);
        let mut opened = Vec::new();
        for i in 0..count {
            let (reply, answer) = oneshot::channel();
            let req = http::Request {
                method: "POST".into(),
                path: "/jobs".into(),
                secret_header: Some("0123456789abcdef0123".into()),
                authorization: None,
                idempotency_key: None,
                last_event_id: None,
                body: edge_core::body::Body::Bytes(format!(r#"{{"prompt":"job {i}"}}"#).into_bytes()),
            };
            tx.try_send(Command::Http { req, reply }).unwrap();
            opened.push(answer);
        }
        (rx, opened)
    }

    async fn answer(opened: oneshot::Receiver<Opened>) -> (u16, serde_json::Value) {
        let Ok(Opened::Once { answer, .. }) = opened.await else { panic!("answered once") };
        let response = answer.await.unwrap();
        (response.status, serde_json::from_str(&response.body).unwrap())
    }

    /// The requests queued together are stored in one commit, and each is answered only
    /// once it is: every job a caller was told of is in the database, read from another
    /// connection, when its answer comes.
    #[tokio::test]
    async fn requests_queued_together_are_stored_in_one_commit_before_any_is_answered() {
        let (mut driver, dir) = grouped_driver("group");
        let (mut rx, opened) = queued_submissions(3);
        let first = rx.recv().await.unwrap();
        let before = driver.store.commits;
        driver.handle_grouped(first, &mut rx);
        assert!(rx.try_recv().is_err(), "the requests queued behind the first are handled with it");
        assert_eq!(driver.store.commits - before, 1, "one commit for the three");
        let reader = rusqlite::Connection::open(dir.join("edge.sqlite3")).unwrap();
        for opened in opened {
            let (status, body) = answer(opened).await;
            assert_eq!(status, 202, "{body}");
            let id = body["job_id"].as_str().unwrap();
            let stored: i64 = reader.query_row("SELECT count(*) FROM jobs WHERE id = ?1", [id], |r| r.get(0)).unwrap();
            assert_eq!(stored, 1, "job {id} answered before it was stored");
        }
        drop(driver);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A group whose commit fails is undone whole, and each of its callers is told nothing
    /// was done: no job of it exists, in memory or stored.
    #[tokio::test]
    async fn a_group_that_cannot_be_stored_answers_each_caller_and_keeps_nothing() {
        let (mut driver, dir) = grouped_driver("group-fails");
        let (mut rx, opened) = queued_submissions(3);
        let holder = rusqlite::Connection::open(dir.join("edge.sqlite3")).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let first = rx.recv().await.unwrap();
        driver.handle_grouped(first, &mut rx);
        assert!(rx.try_recv().is_err(), "the requests queued behind the first are handled with it");
        for opened in opened {
            let (status, body) = answer(opened).await;
            assert_eq!(status, 500, "{body}");
            assert!(body["error"].as_str().unwrap().contains("nothing was done"), "{body}");
        }
        assert_eq!(driver.edge.queued() + driver.edge.active_jobs(), 0);
        assert_eq!(driver.edge.stats().store_failures, 3);
        holder.execute_batch("ROLLBACK").unwrap();
        assert!(driver.store.load().unwrap().is_empty());
        drop(driver);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn request(method: &str, path: &str, body: &str) -> http::Request {
        http::Request {
            method: method.into(),
            path: path.into(),
            secret_header: Some("0123456789abcdef0123".into()),
            authorization: None,
            idempotency_key: None,
            last_event_id: None,
            body: edge_core::body::Body::Bytes(body.as_bytes().to_vec()),
        }
    }

    /// Reads that share a group with another caller's write whose commit fails are served
    /// as they are alone (hostile review rev41): a stored job's GET is answered 200 and
    /// `/health` with the edge's health, not "nothing was done … run the task elsewhere" (a
    /// job run twice), and a follower's stream stays open for the job's events; only the
    /// write is refused.
    #[tokio::test]
    async fn reads_grouped_with_a_failed_write_are_served_as_alone() {
        let (mut driver, dir) = grouped_driver("group-reads");
        let (reply, opened) = oneshot::channel();
        driver.handle_grouped(Command::Http { req: request("POST", "/jobs", r#"{"prompt":"stored"}"#), reply }, &mut mpsc::channel(1).1);
        let (status, body) = answer(opened).await;
        assert_eq!(status, 202, "{body}");
        let id = body["job_id"].as_str().unwrap().to_string();
        let holder = rusqlite::Connection::open(dir.join("edge.sqlite3")).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let (r1, get) = oneshot::channel();
        tx.try_send(Command::Http { req: request("GET", &format!("/jobs/{id}"), ""), reply: r1 }).unwrap();
        let (r2, health) = oneshot::channel();
        tx.try_send(Command::Http { req: request("GET", "/health", ""), reply: r2 }).unwrap();
        let (r3, follow) = oneshot::channel();
        tx.try_send(Command::Http { req: request("GET", &format!("/jobs/{id}/events"), ""), reply: r3 }).unwrap();
        let (r4, post) = oneshot::channel();
        tx.try_send(Command::Http { req: request("POST", "/jobs", r#"{"prompt":"new"}"#), reply: r4 }).unwrap();
        let first = rx.recv().await.unwrap();
        driver.handle_grouped(first, &mut rx);
        assert!(rx.try_recv().is_err(), "the four were handled together");
        let (status, body) = answer(get).await;
        assert_eq!(status, 200, "a stored job's read: {body}");
        assert_eq!(body["job_id"], id.as_str(), "{body}");
        let (status, body) = answer(health).await;
        // No agent here: the health answer (503, offline), not the store's failure.
        assert_eq!((status, body["status"].as_str()), (503, Some("offline")), "/health: {body}");
        let (status, body) = answer(post).await;
        assert_eq!(status, 500, "{body}");
        assert!(body["error"].as_str().unwrap().contains("nothing was done"), "{body}");
        let Opened::Stream(out) = follow.await.unwrap() else { panic!("the follower is refused") };
        // The job is queued and has no event yet: the stream stays open for them (it was
        // ended, empty and with no error, its headers already sent).
        let next = futures_util::FutureExt::now_or_never(out.next());
        assert!(next.is_none(), "the follower's stream is over: {:?}", next.map(|f| matches!(f, edge_core::progress::Follow::End)));
        assert_eq!(driver.edge.stats().store_failures, 1, "only the write failed");
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(driver.store.load().unwrap().len(), 1, "the first job only");
        drop(driver);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A repeat of a stored job's Idempotency-Key (it makes nothing) grouped with another
    /// caller's write whose commit fails is answered with that job, as alone (hostile
    /// review rev41), not told that no job was queued.
    #[tokio::test]
    async fn a_repeated_key_grouped_with_a_failed_write_is_answered_its_job() {
        let (mut driver, dir) = grouped_driver("group-key");
        let keyed = || http::Request { idempotency_key: Some("k-1".into()), ..request("POST", "/jobs", r#"{"prompt":"keyed"}"#) };
        let (reply, opened) = oneshot::channel();
        driver.handle_grouped(Command::Http { req: keyed(), reply }, &mut mpsc::channel(1).1);
        let (status, body) = answer(opened).await;
        assert_eq!(status, 202, "{body}");
        let id = body["job_id"].as_str().unwrap().to_string();
        let holder = rusqlite::Connection::open(dir.join("edge.sqlite3")).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let (r1, repeat) = oneshot::channel();
        tx.try_send(Command::Http { req: keyed(), reply: r1 }).unwrap();
        let (r2, other) = oneshot::channel();
        tx.try_send(Command::Http { req: request("POST", "/jobs", r#"{"prompt":"other"}"#), reply: r2 }).unwrap();
        let first = rx.recv().await.unwrap();
        driver.handle_grouped(first, &mut rx);
        let (status, body) = answer(repeat).await;
        assert!(status < 300, "{status} {body}");
        assert_eq!(body["job_id"], id.as_str(), "{body}");
        assert_eq!(answer(other).await.0, 500);
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(driver.store.load().unwrap().len(), 1);
        drop(driver);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A failed POST's outcome (which the machine logs with each attempt) names no part of
    /// the URL: its token, path, host or port.
    #[tokio::test]
    async fn a_failed_posts_outcome_holds_no_part_of_its_url() {
        let http = reqwest::Client::new();
        // A port nothing listens on: refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        // One that takes the connection and drops it unanswered.
        let resets = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let resets_port = resets.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((socket, _)) = resets.accept().await {
                drop(socket);
            }
        });
        for port in [closed_port, resets_port] {
            let url = format!("http://127.0.0.1:{port}/topic-tk_S3cr3tT0k3n?auth=tk_Qu3ryT0k3n");
            let post = Post { id: "alert:offline:1".into(), url: url.clone(), body: "x".into(), headers: vec![] };
            let outcome = send(&http, post).await;
            let text = outcome.expect_err("nothing answers");
            for part in ["S3cr3tT0k3n", "Qu3ryT0k3n", "topic", "127.0.0.1", &port.to_string(), "http:"] {
                assert!(!text.contains(part), "{part:?} in {text:?}");
            }
            assert!(!text.is_empty());
        }
    }
}
