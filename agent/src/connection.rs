//! The agent's one outbound WebSocket: dial, prove who we are, check the edge proves who
//! it is, then carry messages both ways with heartbeats until the connection ends; then
//! dial again after an exponential, jittered backoff. A connection silent for two
//! heartbeat intervals (half-open) is given up on, and so is every send during which the
//! link takes no byte for as long ([`crate::metered`]): a write into a half-open link
//! blocks once the socket's buffer is full, and nothing may hang the agent.

use crate::agent::{Agent, Heard};
use crate::boot_clock::BootInstant;
use crate::metered::{Meter, Metered};
use crate::reconnect::Reconnect;
use crate::uplink::{Outgoing, Receivers};
use futures_util::{SinkExt, StreamExt};
use shared::envelope::{Domain, Envelope};
use shared::protocol::{self, close, AgentMessage, EdgeMessage, Hello, Welcome, PROTOCOL_VERSION};
use shared::text::peer_words;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{error, info, warn};

use crate::reconnect::HANDSHAKE_TIMEOUT;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The agent is stopping.
    Shutdown,
    /// Worth retrying.
    Lost(String),
    /// The dial itself failed: no connection was made to lose (worth retrying).
    Unreached(String),
    /// The edge refused us (a goodbye, a close after the hello, no such pool at EDGE_URL):
    /// retrying only helps once someone fixes the configuration.
    Refused(String),
    /// We refused the edge (it could not prove its key, it welcomed us into another pool,
    /// it spoke another protocol): the fix is on this side's settings as often as the
    /// edge's, and the log must not send the operator to the edge alone.
    Refusing(String),
    /// The edge refused us because another agent (another DATA_DIR) proving this AGENT_ID
    /// is connected or may still run jobs of it ([`close::DUPLICATE`]): retried when the
    /// edge said it could let us in (else with the backoff), so this one takes over once
    /// the other is gone, but said at error every time, with the fix.
    Duplicate(String, Option<Duration>),
}

/// Connects, serves and reconnects until `shutdown` turns true.
pub async fn run(agent: Arc<Agent>, mut uplink: Receivers, mut shutdown: watch::Receiver<bool>) {
    // The last welcome's LOST_AFTER_MS, from before this start: results this agent holds
    // from then are given up by the edge after it, welcome or not.
    let mut reconnect = Reconnect::remembering(crate::lost_after::read(&agent.cfg.data_dir, &agent.cfg.agent_id));
    loop {
        let began = Instant::now();
        // Its reasons may be the words of whoever answered at EDGE_URL (a close frame, a
        // goodbye, a version), heard before or without any proof that it is the edge: one
        // bounded line before they reach the log or the status file.
        // Connected or not, a job starts only while the last frame the edge proved it read
        // was written less than its LOST_AFTER_MS ago, and never once a welcome names it as
        // given up ([`crate::link::Link::start`]). The link is told only that it carries
        // nothing now, for what a start held from here says when it ends.
        let ended = session(&agent, &mut uplink, &mut shutdown, &mut reconnect).await;
        agent.link.carrying(None);
        let end = match ended {
            End::Lost(why) => End::Lost(peer_words(&why)),
            End::Unreached(why) => End::Unreached(peer_words(&why)),
            End::Refused(why) => End::Refused(peer_words(&why)),
            End::Refusing(why) => End::Refusing(peer_words(&why)),
            End::Duplicate(why, after) => End::Duplicate(peer_words(&why), after),
            End::Shutdown => End::Shutdown,
        };
        match &end {
            End::Shutdown => {
                agent.status.disconnected("the agent stopped");
                return;
            }
            End::Lost(why) => warn!(agent_id = %agent.cfg.agent_id, reason = %why, "connection to the edge lost"),
            // The first dial of a start that fails was logged as a connection lost, which
            // there never was.
            End::Unreached(why) => warn!(agent_id = %agent.cfg.agent_id, reason = %why, "could not connect to the edge"),
            End::Refused(why) => error!(agent_id = %agent.cfg.agent_id, reason = %why, "the edge refused this agent"),
            End::Refusing(why) => error!(agent_id = %agent.cfg.agent_id, reason = %why, "this agent refused the edge"),
            End::Duplicate(why, _) => error!(agent_id = %agent.cfg.agent_id, instance = %agent.instance, reason = %why, "another agent with this AGENT_ID, from another DATA_DIR, is connected to the edge or may still run its jobs"),
        }
        if let End::Lost(why) | End::Unreached(why) | End::Refused(why) | End::Refusing(why) | End::Duplicate(why, _) = &end {
            agent.status.disconnected(why);
        }
        // Capped while jobs run here or results wait for the edge: it gives those up as
        // lost after its LOST_AFTER_MS.
        let delay = match &end {
            // The edge said when it could let this agent in: a refusal that says nothing of
            // the edge's health does not grow the backoff (it came 15-45 s late).
            End::Duplicate(_, Some(after)) => crate::reconnect::told(*after),
            _ => reconnect.next(began.elapsed(), agent.holds_work()),
        };
        info!(agent_id = %agent.cfg.agent_id, delay_ms = delay.as_millis() as u64, "reconnecting");
        let wake = tokio::time::sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                _ = shutdown.changed() => return,
                // While offline nothing can be sent; results are on disk and go out after
                // the next hello, credits are recounted then.
                m = uplink.next() => if m.is_none() { return },
            }
        }
    }
}

/// The agent's end of a connection, its writes metered ([`crate::metered`]).
type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<Metered<tokio::net::TcpStream>>>;

/// When `ws`'s link last took bytes.
fn meter(ws: &Socket) -> Meter {
    ws.get_ref().get_ref().meter()
}

/// Dials the edge as `tokio_tungstenite::connect_async_with_config` does (TCP_NODELAY,
/// TLS for `wss`), the socket's writes metered.
async fn dial(request: tokio_tungstenite::tungstenite::handshake::client::Request, config: WebSocketConfig) -> Result<Socket, WsError> {
    use tokio_tungstenite::tungstenite::error::UrlError;
    let uri = request.uri();
    let host = uri.host().ok_or(WsError::Url(UrlError::NoHostName))?;
    // An IPv6 address is bracketed in a URL, not in a socket address.
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).to_string();
    let default_port = match uri.scheme_str() {
        Some("wss") => Some(443),
        Some("ws") => Some(80),
        _ => None,
    };
    let port = uri.port_u16().or(default_port).ok_or(WsError::Url(UrlError::UnsupportedUrlScheme))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(WsError::Io)?;
    tcp.set_nodelay(true).map_err(WsError::Io)?;
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(request, Metered::new(tcp), Some(config), None).await?;
    Ok(ws)
}

/// How the handshake's wait for the edge's next message failed.
enum Cut {
    /// The edge closed the connection with this code.
    Closed(u16, String),
    /// Anything else: an unreadable frame, a broken or dropped connection.
    Broken(String),
}

impl From<Cut> for End {
    fn from(cut: Cut) -> End {
        match cut {
            Cut::Closed(code, reason) => End::Lost(format!("the edge closed the connection: {reason} ({code})")),
            Cut::Broken(why) => End::Lost(why),
        }
    }
}

async fn next_edge_message(ws: &mut Socket) -> Result<EdgeMessage, Cut> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return protocol::decode::<EdgeMessage>(&text).map_err(|e| Cut::Broken(format!("edge sent {e}")));
            }
            Some(Ok(Message::Close(Some(frame)))) => return Err(Cut::Closed(u16::from(frame.code), frame.reason.to_string())),
            Some(Ok(Message::Close(None))) | None => return Err(Cut::Broken("the edge closed the connection".into())),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(Cut::Broken(format!("connection error: {e}"))),
        }
    }
}

/// How a connection the edge ended (a goodbye or a close frame with `code`) after the
/// hello, before its welcome, ended: the edge's refusal of this agent — its key, its
/// version, its labels — unless the edge said it is stopping (4005: it began to stop
/// during this handshake and is back in a moment) or let go of a connection still
/// unproven (4004: its handshake deadline, or room made for newer ones), both passing.
fn ended_before_welcome(agent_id: &str, code: u16, reason: String) -> End {
    match code {
        close::SHUTTING_DOWN | close::SILENT => End::Lost(reason),
        // Said in our own words (what the edge said is not proven yet), with its words after.
        close::DUPLICATE => End::Duplicate(
            format!(
                "the edge refused this connection: another agent, from another DATA_DIR, is connected as `{agent_id}` or may still run jobs of it. \
                 Give each machine its own AGENT_ID and key (`claude-runner keygen`, the public key added to the edge's AGENT_PUBLIC_KEYS), \
                 or stop the other agent; this one keeps retrying and takes over once the other is gone (the edge said: {reason})"
            ),
            retry_after(&reason),
        ),
        _ => End::Refused(reason),
    }
}

/// When a [`close::DUPLICATE`] refusal says the edge could let this agent in: its reason
/// begins `retry after <ms> ms:`. The edge's words, not proven: bounded where used
/// ([`crate::reconnect::told`]).
fn retry_after(reason: &str) -> Option<Duration> {
    let (ms, _) = reason.strip_prefix("retry after ")?.split_once(" ms:")?;
    ms.parse().ok().map(Duration::from_millis)
}

/// Sends one frame, giving up once the link takes no byte for `limit`, or once it is not
/// through by two heartbeat intervals (`limit`) and the bytes not known read at the
/// slowest uplink served, however the link moves ([`bounded`], [`Unanswered::write_by`]).
/// Counts its bytes in `sent`.
async fn send(ws: &mut Socket, msg: &AgentMessage, limit: Duration, sent: &mut Unanswered) -> Result<(), End> {
    let meter = meter(ws);
    let text = msg.to_text();
    sent.wrote(text.len());
    let by = sent.write_by(BootInstant::now());
    within(limit, by, &meter, ws.send(Message::Text(text.into()))).await
}

/// How long the edge may stay silent after `bytes` it is not known to have read
/// ([`Unanswered`]): `limit` (two heartbeat intervals) plus the bytes at
/// [`shared::contract::MIN_UPLINK_BYTES_PER_SEC`]. The socket's buffers take a large
/// result at once, and on a slow uplink the heartbeats behind it — and so the edge's
/// answers — come late by the time those bytes take to go; the edge counts the bytes
/// arriving at that rate as the agent heard.
pub(crate) fn for_bytes(limit: Duration, bytes: usize) -> Duration {
    let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
    limit.saturating_add(Duration::from_millis(bytes.saturating_mul(1000) / shared::contract::MIN_UPLINK_BYTES_PER_SEC))
}

/// What the agent wrote on this connection that the edge is not known to have read, and
/// so when the edge must have answered by ([`Unanswered::silent_at`]). The edge's
/// heartbeat ack names the beat it answers, and the bytes are a stream: it read
/// everything written up to that beat, and nothing is known of what came after. A hop
/// that buffers (ssh -L, a local proxy, a slow uplink's router or kernel queues) takes a
/// large result at once, so the ack of a beat sent before it comes back quickly; taking
/// that ack for "all read" gave the megabytes still in the hop two heartbeat intervals,
/// and the agent dropped its own connection every time, the same result first again
/// after each reconnect.
///
/// Two clocks come out of it. The silence bound: each beat is due answered by its writing,
/// plus two heartbeat intervals, plus the time the bytes ahead of it (not known read when
/// it was written) take at the slowest uplink served — fixed as it is written. rev30-1: a
/// bound of the last ack plus the bytes unanswered *now* grew with every byte written
/// after it, and a hop that cut the edge off and read (and dropped) everything the agent
/// wrote kept an agent whose job printed "connected" for as long as it printed. The away
/// clock ([`crate::link::Link::heard_at`]): an ack proves the edge was there when the
/// beat it answers was written, never later — the allowance is for a slow link to carry
/// the bytes, not time the edge is known present (rev30-2: dated by the allowance, an ack
/// a hop held back behind a megabyte dated the edge 64 s after its beat). Both read the
/// boot clock ([`crate::boot_clock`]): the edge's bounds run on while the machine is
/// suspended (rev34-1).
struct Unanswered {
    /// Two heartbeat intervals: how long an edge that has read a beat may take to answer.
    allowance: Duration,
    /// Told the bytes not known read as they change ([`crate::link::Link::carrying`]): a
    /// start held while the link carries them says so when it ends (rev34-4).
    link: Option<crate::link::Link>,
    /// Bytes written on this connection.
    written: u64,
    /// Of those, the bytes the edge is known to have read.
    read: u64,
    /// When the last frame the edge answered was written: the hello its welcome answers,
    /// then the latest beat an ack answered.
    proven: BootInstant,
    /// The beats not answered yet, in the order sent.
    beats: std::collections::VecDeque<Sent>,
}

/// A heartbeat written and not answered yet.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    /// [`Unanswered::written`] just after it.
    through: u64,
    /// When it was written.
    at: BootInstant,
    /// When its ack is due at the latest ([`Unanswered::beat`]).
    due: BootInstant,
}

impl Unanswered {
    /// Beats remembered: at one a heartbeat interval, more than most allowances last. Past
    /// it the two oldest are taken as one — the later one's number and writing, the earlier
    /// due — so no due is forgotten, and only an ack of the later one answers them.
    const MAX_BEATS: usize = 64;

    /// A connection's count, from its hello (written at `hello_sent`), which the edge's
    /// welcome answered; `allowance` is two heartbeat intervals.
    fn new(allowance: Duration, hello_sent: BootInstant) -> Unanswered {
        Unanswered { allowance, link: None, written: 0, read: 0, proven: hello_sent, beats: Default::default() }
    }

    /// This count, told to `link` as it changes.
    fn telling(mut self, link: crate::link::Link) -> Unanswered {
        self.link = Some(link);
        self.tell();
        self
    }

    fn tell(&self) {
        if let Some(link) = &self.link {
            link.carrying(Some(crate::link::Carrying { bytes: self.written.saturating_sub(self.read), allowance: self.allowance }));
        }
    }

    /// `bytes` are about to be written: counted before the write, which on a slow link
    /// may take minutes, so a start held meanwhile knows what the link carries.
    fn wrote(&mut self, bytes: usize) {
        self.written = self.written.saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
        self.tell();
    }

    /// Heartbeat `seq` was written, handed to the socket at `at` (its bytes counted by
    /// [`Unanswered::wrote`]): its ack is due by then, plus two heartbeat intervals, plus
    /// the bytes not known read at the slowest uplink served. What is written after it
    /// moves that due no later.
    fn beat(&mut self, seq: u64, at: BootInstant) {
        if self.beats.len() == Self::MAX_BEATS {
            if let Some(oldest) = self.beats.pop_front() {
                if let Some(next) = self.beats.front_mut() {
                    next.due = next.due.min(oldest.due);
                }
            }
        }
        self.beats.push_back(Sent { seq, through: self.written, at, due: at + for_bytes(self.allowance, self.bytes()) });
    }

    /// The edge answered heartbeat `answered` (its MAC checked, [`Agent::on_edge_message`]).
    /// One naming a beat not written yet (made, still queued) answers what was written up to
    /// the last one written, no more. Returns when the edge is known to have been there:
    /// when the latest beat the ack answers was written. An ack a hop held back buys no
    /// more than that (rev29-1: acks let out one at a time, every two intervals, kept an
    /// agent "connected" 26 s after the edge had lost it, and its away rule saw no
    /// absence); nor does one held behind bytes a slow link would take long to carry
    /// (rev30-2).
    fn answered(&mut self, answered: u64) -> Option<BootInstant> {
        let mut sent = None;
        while let Some(&Sent { seq, through, at, .. }) = self.beats.front() {
            if seq > answered {
                break;
            }
            self.read = self.read.max(through);
            self.proven = self.proven.max(at);
            sent = Some(at);
            self.beats.pop_front();
        }
        if sent.is_some() {
            self.tell();
        }
        sent
    }

    /// When the edge is silent for too long: the earliest due of a beat not answered. With
    /// none (each one written answered), the last one answered (or the hello) plus the
    /// allowance for what was written since: the next beat, written within an interval
    /// ([`session`]'s ticker has its turn before the uplink), fixes its own due.
    fn silent_at(&self) -> BootInstant {
        match self.beats.iter().map(|b| b.due).min() {
            Some(due) => due,
            None => self.proven + for_bytes(self.allowance, self.bytes()),
        }
    }

    /// Why the connection is given up at [`Unanswered::silent_at`], for the log.
    fn silence(&self) -> String {
        match self.beats.iter().min_by_key(|b| b.due) {
            Some(b) => format!(
                "nothing the edge proved in answer to heartbeat {} within {} ms of its writing (no MACed ack of it or a later one; two heartbeat intervals, and the time the bytes ahead of it take at the slowest uplink served): the edge is gone, or something on the path holds the connection open without it",
                b.seq,
                b.due.saturating_duration_since(b.at).as_millis()
            ),
            None => format!(
                "nothing the edge proved for {} ms (no MACed ack of a heartbeat written since, dated by that beat: two heartbeat intervals, and the time the {} bytes sent since the last heartbeat it answered take at the slowest uplink served)",
                for_bytes(self.allowance, self.bytes()).as_millis(),
                self.bytes()
            ),
        }
    }

    /// When a write begun at `began` must be through, whatever the link takes: the
    /// allowance and the bytes not known read — this write's among them — at the slowest
    /// uplink served. A link that takes a byte now and then is not stuck to [`bounded`]'s
    /// eye, and one that held the agent inside a write so kept it "connected" for as long
    /// as it liked (rev30-1); the edge's acks are read only between writes.
    fn write_by(&self, began: BootInstant) -> BootInstant {
        began + for_bytes(self.allowance, self.bytes())
    }

    /// Bytes written that the edge is not known to have read.
    fn bytes(&self) -> usize {
        usize::try_from(self.written.saturating_sub(self.read)).unwrap_or(usize::MAX)
    }
}

/// The order results kept for the edge go out again in after a reconnect: smallest
/// first. A result of megabytes on a slow uplink takes minutes; sent first (the spool's
/// order is the job ids'), every small one behind it waited for it, and on a link that
/// broke before it was through, for ever, their jobs timing out.
fn resend_order(mut results: Vec<(String, crate::spool::StoredResult)>) -> Vec<(String, crate::spool::StoredResult)> {
    results.sort_by_key(|(_, stored)| stored.payload.len());
    results
}

/// A write to the edge, given up once the link takes no byte for `limit`, or at `by`.
async fn within<T>(limit: Duration, by: BootInstant, meter: &Meter, write: impl std::future::Future<Output = Result<T, WsError>>) -> Result<T, End> {
    bounded(limit, by, meter, write).await.map_err(End::from)
}

/// How a bounded write did not complete.
enum WriteFailed {
    Error(WsError),
    /// The link took no byte of it for this long.
    TimedOut(Duration),
    /// It moved, but was not through after this long: slower than the slowest uplink
    /// served, or a hop that takes a byte now and then to keep the agent in the write.
    TooSlow(Duration),
}

impl From<WriteFailed> for End {
    fn from(failed: WriteFailed) -> End {
        match failed {
            WriteFailed::Error(e) => End::Lost(format!("send failed: {e}")),
            WriteFailed::TimedOut(limit) => {
                End::Lost(format!("the link to the edge took no byte for {} ms of a send: the connection is stuck (half-open?)", limit.as_millis()))
            }
            WriteFailed::TooSlow(took) => End::Lost(format!(
                "a send to the edge was not through after {} ms (two heartbeat intervals, and the bytes not known read at {} bytes/s, the slowest uplink served): \
                 the link is slower than that, or something on the path holds the connection open taking a byte now and then",
                took.as_millis(),
                shared::contract::MIN_UPLINK_BYTES_PER_SEC
            )),
        }
    }
}

/// A write, given up once the link has taken no byte of it for `limit`
/// ([`crate::metered`]): a link that moves, however slowly, is not stuck, and one that
/// takes nothing is found within `limit` whatever is left to send. And given up at `by`
/// however it moves: a hop that takes a byte each interval is never stuck to the meter,
/// and kept the agent inside one write for as long as it liked (rev30-1). Both on the boot
/// clock, as the edge's silence bound runs: a write the machine slept in is given up on
/// resume once its bounds passed meanwhile, not after as long again awake
/// ([`crate::boot_clock`]). A write through at once (most) arms no timer.
async fn bounded<T>(limit: Duration, by: BootInstant, meter: &Meter, write: impl std::future::Future<Output = Result<T, WsError>>) -> Result<T, WriteFailed> {
    tokio::pin!(write);
    let began = BootInstant::now();
    loop {
        let moved = meter.last_taken().max(began);
        tokio::select! {
            biased;
            done = &mut write => return done.map_err(WriteFailed::Error),
            _ = crate::boot_clock::sleep_until(by) => return Err(WriteFailed::TooSlow(by.saturating_duration_since(began))),
            _ = crate::boot_clock::sleep_until(moved + limit) => {
                if meter.last_taken().max(began) == moved {
                    return Err(WriteFailed::TimedOut(limit));
                }
            }
        }
    }
}

/// A handshake step's send (the hello): as [`send`], the link taking no byte for `step`
/// giving it up, and one given up so is a slow step, as a late answer is — the next
/// dial's bound grows (`reconnect`). A hello names every result and running job the agent
/// holds and its mirrors, so on a slow uplink it is the step that takes longest; counted
/// as a failed write only, every dial was given the same short bound and failed alike.
/// Through within the step and its bytes at the slowest uplink served, however it moves.
async fn send_step(ws: &mut Socket, msg: &AgentMessage, step: Duration, reconnect: &mut Reconnect) -> Result<(), End> {
    let text = msg.to_text();
    let bytes = text.len();
    let meter = meter(ws);
    let by = BootInstant::now() + for_bytes(step, bytes);
    bounded(step, by, &meter, ws.send(Message::Text(text.into()))).await.map_err(|failed| match failed {
        WriteFailed::TimedOut(step) => {
            reconnect.step_timed_out();
            End::Lost(format!(
                "the hello ({bytes} bytes) did not go out to the edge: the link took no byte of it for {} ms, a slow or stuck link; the next dial waits longer",
                step.as_millis()
            ))
        }
        WriteFailed::TooSlow(took) => {
            reconnect.step_timed_out();
            End::Lost(format!(
                "the hello ({bytes} bytes) did not go out to the edge within {} ms, a slow or stuck link; the next dial waits longer",
                took.as_millis()
            ))
        }
        failed => failed.into(),
    })
}

/// The most frames one write carries, and the bytes past which it takes no more.
const FRAMES_PER_WRITE: usize = 64;
const BYTES_PER_WRITE: usize = 1024 * 1024;

/// Sends `first` and whatever else is queued by then (up to [`FRAMES_PER_WRITE`]), the
/// agent's own words before progress ([`Receivers::try_next`]), in one write: a job's end
/// queues its result and a statement of the slots together, and one write is one wake-up
/// of the edge instead of two. The progress frames' budget is let go once the write is
/// flushed ([`crate::uplink::Held`]).
/// Gives up when the link takes no byte for `limit`, as a frame sent alone does
/// ([`bounded`]): the bound finds a stuck link, and a batch of large frames on a slow one
/// is not stuck. And when the batch is not through by its start plus two heartbeat
/// intervals and the bytes not known read at the slowest uplink served
/// ([`Unanswered::write_by`]), however the link moves. Returns the last heartbeat sent,
/// read back (our own words, just MACed) for the status file; counts the bytes and
/// heartbeats written in `sent`.
async fn send_queued(
    ws: &mut Socket,
    first: Outgoing,
    uplink: &mut Receivers,
    limit: Duration,
    sent: &mut Unanswered,
) -> Result<Option<shared::protocol::Beat>, End> {
    let meter = meter(ws);
    let began = BootInstant::now();
    let mut beat = None;
    let mut next = Some(first);
    let (mut frames, mut bytes) = (0, 0);
    // Held until the flush: only then has the connection written them.
    let mut written = Vec::new();
    while let Some(Outgoing { msg, held }) = next.take() {
        written.extend(held);
        let text = msg.to_text();
        bytes += text.len();
        // Feeding writes out what no longer fits the buffer: up to this frame and the one before.
        sent.wrote(text.len());
        let fed = BootInstant::now();
        within(limit, sent.write_by(began), &meter, ws.feed(Message::Text(text.into()))).await?;
        if let AgentMessage::Heartbeat { envelope } = &msg {
            let this = serde_json::from_str::<shared::protocol::Beat>(&envelope.payload).ok();
            if let Some(b) = &this {
                sent.beat(b.seq, fed);
            }
            beat = this.or(beat);
        }
        frames += 1;
        // Small frames go together; big ones (results up to 8 MiB) end the batch, so the
        // edge's frames (acks, cancels) are read between them, not after all of them.
        if frames < FRAMES_PER_WRITE && bytes < BYTES_PER_WRITE {
            next = uplink.try_next();
        }
    }
    within(limit, sent.write_by(began), &meter, ws.flush()).await?;
    // Not written (an error above): dropped with `written`, their events counted for the
    // jobs' next markers.
    written.into_iter().for_each(crate::uplink::Held::written);
    Ok(beat)
}

async fn refuse(ws: &mut Socket, code: u16, reason: String) -> End {
    let frame = CloseFrame { code: CloseCode::from(code), reason: close::reason(&reason).into() };
    let _ = timeout(HANDSHAKE_TIMEOUT, ws.close(Some(frame))).await;
    End::Refusing(reason)
}

/// Why a dial failed. A 404 is the edge saying it serves nothing at EDGE_URL — a pool it
/// does not have, or a path that is not the edge's — and a 401 that it did not take the
/// agent's proof (`upgrade::refused`): no retry mends either, said as the edge's refusal,
/// with what to set. Anything else may pass (worth retrying).
fn dial_failed(connect_url: &str, e: &WsError) -> End {
    let WsError::Http(response) = e else {
        let hint = agent_core::edge_url::plain_edge_hint(connect_url, &e.to_string()).map(|h| format!("; {h}")).unwrap_or_default();
        return End::Unreached(format!("cannot reach the edge at {connect_url}: {e}{hint}"));
    };
    // A refused proof (a wrong key, an unknown agent, a clock off): no retry mends it.
    if let Some(why) = crate::upgrade::refused(connect_url, response) {
        return End::Refused(why);
    }
    if response.status().as_u16() != 404 {
        return End::Unreached(format!("cannot reach the edge at {connect_url}: {e}"));
    }
    let pool = connect_url
        .strip_suffix("/agent/connect")
        .and_then(|base| base.rsplit_once("/pool/"))
        .map(|(_, name)| name)
        .filter(|name| shared::ids::plain_id(name, shared::ids::MAX_POOL_NAME));
    End::Refused(match pool {
        Some(pool) => {
            let suffix = pool.to_ascii_uppercase().replace('-', "_");
            format!(
                "the edge answered 404 at {connect_url}: it serves no pool `{pool}`. On the Worker, list `{pool}` in POOLS \
                 and set RUNNER_SECRET_{suffix} and AGENT_PUBLIC_KEYS_{suffix} (this agent's key); a native edge serves one pool, \
                 on its root URL. Or set EDGE_URL to a pool the edge serves (…/pool/<name>, and EDGE_POOL to that name)"
            )
        }
        None => format!(
            "the edge answered 404 at {connect_url}: EDGE_URL must be the edge's own URL (wss://<edge>, or wss://<worker>/pool/<name> \
             for a Worker pool); the agent adds /agent/connect itself"
        ),
    })
}

/// One connection, from dial to end.
/// How much of the edge's frames one read of the socket takes at most. tungstenite
/// zeroes this much of its buffer before every read — the one that finds nothing too —
/// and its default, 128 KiB, was 1.2-1.3 % of the agent's CPU in the bench (2026-12-06),
/// for frames of under 1 KiB (a job order, an ack). A large order takes more reads.
const READ_BUFFER_BYTES: usize = 16 * 1024;

async fn session(
    agent: &Arc<Agent>,
    uplink: &mut Receivers,
    shutdown: &mut watch::Receiver<bool>,
    reconnect: &mut Reconnect,
) -> End {
    let cfg = &agent.cfg;
    // Each step's bound: shorter while jobs or results wait here (see `reconnect`).
    let step = reconnect.handshake_timeout(agent.holds_work());
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(protocol::MAX_FRAME_BYTES))
        .max_frame_size(Some(protocol::MAX_FRAME_BYTES))
        .read_buffer_size(READ_BUFFER_BYTES);
    // TCP_NODELAY: frames are small and latency-bound; Nagle with delayed ACKs would add
    // ~40 ms to a job's round trip.
    // The upgrade carries our proof: the edge gives no socket without it.
    // Fresh on each dial: the edge signs it in its challenge, and again in its welcome.
    let agent_nonce = crate::upgrade::nonce();
    let request = match crate::upgrade::request(&cfg.connect_url, &cfg.agent_id, &cfg.pool, &cfg.signing_key, &agent_nonce) {
        Ok(request) => request,
        Err(e) => return dial_failed(&cfg.connect_url, &e),
    };
    let mut ws = match timeout(step, dial(request, ws_config)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return dial_failed(&cfg.connect_url, &e),
        Err(_) => {
            reconnect.step_timed_out();
            return End::Unreached(format!("no answer from the edge at {} within {} ms", cfg.connect_url, step.as_millis()));
        }
    };

    // 1. The edge's challenge.
    let challenge = match timeout(step, next_edge_message(&mut ws)).await {
        Ok(Ok(m)) => m,
        Ok(Err(cut)) => return cut.into(),
        Err(_) => {
            reconnect.step_timed_out();
            return End::Lost(format!("the edge sent no challenge within {} ms", step.as_millis()));
        }
    };
    let EdgeMessage::Challenge { protocol, nonce: challenge, edge_version, proof, .. } = challenge else {
        return refuse(&mut ws, close::PROTOCOL_ERROR, "expected a challenge from the edge".into()).await;
    };
    if protocol != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version mismatch: the edge (version {edge_version}) speaks v{protocol}, this agent speaks v{PROTOCOL_VERSION}; run the same claude-runner release on both"
        );
        return refuse(&mut ws, close::VERSION_MISMATCH, reason).await;
    }
    // Nothing more is said to whoever answered until it proves it holds the edge's key,
    // for this dial's nonce: the hello names this agent's labels, login, jobs and instance.
    if let Err(reason) = crate::upgrade::edge_proven(&cfg.connect_url, proof.as_deref(), &cfg.edge_public_key, &challenge, &agent_nonce, &cfg.pool) {
        return refuse(&mut ws, close::UNAUTHORIZED, reason).await;
    }

    // 2. Our signed hello, with this connection's X25519 key.
    let ephemeral = shared::link::Ephemeral::new(runtime::entropy());
    // Results named in the order they are sent below; those left out follow all the same.
    let (running, finished, more_finished) = agent.held_for_hello();
    // The login's changes told before the hello's report is read (below).
    let told = agent.reporter.changes();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: cfg.agent_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        challenge: challenge.clone(),
        agent_nonce: agent_nonce.clone(),
        ephemeral: ephemeral.public(),
        issued_at: crate::now_ms(),
        capacity: cfg.capacity(),
        running,
        finished,
        more_finished,
        oauth: agent.oauth_report(),
        claude_version: agent.cli.current(),
        labels: cfg.labels.clone(),
        mirrors: agent.mirrors_for_hello(),
        instance: Some(agent.instance.clone()),
    };
    let envelope = Envelope::seal(Domain::Hello, &hello, &cfg.signing_key);
    let msg = AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: cfg.agent_id.clone(), envelope };
    // A hello too slow to go out lengthens the next dial's bound
    // (`tests::a_hello_that_cannot_go_out_in_time_lengthens_the_next_dials_bound`).
    // The welcome that answers it proves the edge was there no earlier than this.
    let hello_sent = BootInstant::now();
    if let Err(end) = send_step(&mut ws, &msg, step, reconnect).await {
        return end;
    }

    // 3. The edge's signed welcome.
    // An edge stopping now closes this connection with 4005 (goodbye and close, either may
    // be all that gets through), and the backoff starts over as on an established one: an
    // edge already stopping closes a new connection before its challenge, so this is once
    // per stop, and the backoff still grows across a long stop's refused dials. Before the
    // welcome no key proved the words: once between welcomes (`reconnect`).
    let welcome = match timeout(step, next_edge_message(&mut ws)).await {
        Ok(Ok(EdgeMessage::Welcome { envelope })) => envelope,
        Ok(Ok(EdgeMessage::Goodbye { code, reason })) | Ok(Err(Cut::Closed(code, reason))) => {
            if code == close::SHUTTING_DOWN {
                reconnect.edge_restarting_before_welcome();
            }
            return ended_before_welcome(&cfg.agent_id, code, reason);
        }
        Ok(Ok(_)) => return refuse(&mut ws, close::PROTOCOL_ERROR, "expected a welcome from the edge".into()).await,
        Ok(Err(Cut::Broken(why))) => return End::Lost(why),
        Err(_) => {
            reconnect.step_timed_out();
            return End::Lost(format!("the edge did not answer the hello within {} ms", step.as_millis()));
        }
    };
    let welcome: Welcome = match welcome.open(Domain::Welcome, &cfg.edge_public_key) {
        Ok(w) => w,
        Err(e) => {
            let reason = format!(
                "the edge could not prove its identity ({e}): set this agent's EDGE_PUBLIC_KEY to the public half of the edge's \
                 EDGE_SIGNING_KEY, as printed by the `claude-runner keygen` run that made the edge's key"
            );
            return refuse(&mut ws, close::UNAUTHORIZED, reason).await;
        }
    };
    if welcome.agent_nonce != agent_nonce || welcome.agent_id != cfg.agent_id {
        return refuse(&mut ws, close::UNAUTHORIZED, "the edge's welcome answers another connection".into()).await;
    }
    if welcome.pool != cfg.pool {
        let reason = format!(
            "the edge welcomed this agent into pool `{}`, but it serves pool `{}`: point EDGE_URL at .../pool/{} (or set EDGE_POOL to the pool it dials)",
            shared::text::truncate(&welcome.pool, 64),
            cfg.pool,
            cfg.pool
        );
        return refuse(&mut ws, close::UNAUTHORIZED, reason).await;
    }
    // The connection's keys, from the edge's X25519 key in its signed welcome.
    let transcript = shared::link::Transcript {
        challenge: &challenge,
        agent_nonce: &agent_nonce,
        agent_public: &hello.ephemeral,
        edge_public: &welcome.ephemeral,
        agent_id: &cfg.agent_id,
        pool: &cfg.pool,
    };
    let keys = match shared::link::LinkKeys::agree(&ephemeral, &welcome.ephemeral, &transcript) {
        Ok(keys) => keys,
        Err(e) => {
            let reason = format!("the edge's connection key is refused ({e}); run the same claude-runner release on both");
            return refuse(&mut ws, close::UNAUTHORIZED, reason).await;
        }
    };
    let asked = welcome.heartbeat_interval_ms;
    let heartbeat = Duration::from_millis(asked.clamp(shared::contract::MIN_HEARTBEAT_INTERVAL_MS, shared::contract::MAX_HEARTBEAT_INTERVAL_MS));
    if heartbeat.as_millis() != u128::from(asked) {
        // Our edges refuse such a setting at their start: an edge of another release.
        warn!(agent_id = %cfg.agent_id, asked_ms = asked, heartbeat_ms = heartbeat.as_millis() as u64, "the edge asked for a heartbeat interval agents do not keep; heartbeating at the nearest they do");
    }
    // The jobs the edge gave up while this agent was away never start; the others may.
    // Dated by the hello it answers, not by its arrival: a hop may hold it back.
    agent.link.welcomed(welcome.lost_after_ms, welcome.given_up.clone(), hello_sent);
    if reconnect.welcomed(welcome.lost_after_ms) {
        if let Err(e) = crate::lost_after::keep(&cfg.data_dir, welcome.lost_after_ms) {
            // Written again at the next welcome, saying the same or not.
            reconnect.not_kept();
            warn!(agent_id = %cfg.agent_id, error = %e, "cannot keep the edge's LOST_AFTER_MS in DATA_DIR (free space there, or give the agent's user its files back); tried again at the next welcome, and until then a restart caps the reconnect delay from the value kept before, or from its first welcome");
        }
    }
    info!(agent_id = %cfg.agent_id, session = %welcome.session_id, heartbeat_ms = heartbeat.as_millis() as u64, "connected to the edge");
    agent.status.connected(heartbeat.as_millis() as u64);

    // Every send from here on is given up once the link takes no byte for two heartbeat
    // intervals ([`bounded`]): the edge itself drops a connection that silent.
    let limit = 2 * heartbeat;

    // 4. Work. Orders and heartbeats are counted from zero on this connection, and what
    // was queued for the last one is dropped: its statements counted that connection's
    // orders, its heartbeats are bound to it, and its results are in the spool, sent below. Then the free slots, then every result the
    // edge has not acknowledged.
    agent.begin_session(&challenge, keys.clone());
    uplink.clear();
    uplink.patience(heartbeat);
    agent.state_slots();
    // A change of the login or the usage window queues its own heartbeat
    // (`Reporter::tell_with`); one told after the hello read the report and before this
    // connection's keys and queue went with the queue just dropped, or failed to queue.
    if agent.reporter.changes() != told {
        agent.heartbeat();
    }
    // Bytes the edge is not known to have read: the socket's buffers (and any hop's) take
    // a large result at once, and on a slow uplink the heartbeats behind it — and so the
    // edge's answers — come late by the time those bytes take to go ([`for_bytes`]).
    // Counted from the hello the welcome answered: the last frame the edge proved it read
    // (the work loop's clock started after the results resent, however long that took).
    let mut unanswered = Unanswered::new(limit, hello_sent).telling(agent.link.clone());
    for (_, stored) in resend_order(agent.spool.all()) {
        // A heartbeat before each: results of megabytes on a slow uplink go out one after
        // another before the work loop's first beat, and an edge that sees only whole
        // frames (the Worker) hears the agent in its heartbeats.
        agent.heartbeat();
        while let Some(out) = uplink.try_next() {
            if let Err(end) = send_queued(&mut ws, out, uplink, limit, &mut unanswered).await {
                return end;
            }
        }
        let result = AgentMessage::result_text(stored.payload, &keys.agent_to_edge);
        if let Err(end) = send(&mut ws, &result, limit, &mut unanswered).await {
            return end;
        }
    }

    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    // A beat late behind a long write goes once, not once for each interval missed.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reads_in_a_row = 0;
    loop {
        // Judged on the boot clock, as the edge's two intervals run on through a suspend;
        // slept on tokio's, so after a resume it is looked at again within an interval
        // (the ticker) and found past.
        let silent_at = Instant::now() + unanswered.silent_at().saturating_duration_since(BootInstant::now());
        // Biased: a stop is seen first; then a frame that came in during a long write is
        // read before the silence timer is looked at, so a healthy edge is never taken for
        // a silent one (and the timer waits while reads wait their turn). But never more
        // than MAX_READS_IN_A_ROW frames before the rest has its turn: under a steady stream
        // of frames (anyone who can write into the connection can make one) the uplink was
        // never written — no heartbeat, no result — and the edge dropped the agent as silent
        // while it read (rev21, 1). The silence timer before the uplink: a job printing
        // without end kept the uplink ready and the timer was never looked at; and the
        // heartbeat before it, so a beat — each fixing its own due — goes at least once an
        // interval, between writes (rev30-1).
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let frame = CloseFrame { code: CloseCode::from(close::SHUTTING_DOWN), reason: "agent shutting down".into() };
                // Send what the jobs reported while stopping, then close.
                while let Some(out) = uplink.try_next() {
                    if send(&mut ws, &out.msg, limit, &mut unanswered).await.is_err() {
                        break;
                    }
                    if let Some(held) = out.held {
                        held.written();
                    }
                }
                let _ = timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                return End::Shutdown;
            }
            frame = ws.next(), if reads_in_a_row < MAX_READS_IN_A_ROW => {
                reads_in_a_row += 1;
                match frame {
                    Some(Ok(Message::Text(text))) => match protocol::decode::<EdgeMessage>(&text) {
                        Ok(msg) => match agent.on_edge_message(msg) {
                            // Heard only in what the edge proved, new on this connection
                            // (protocol 11): a frame anyone on the path can write, heard, kept
                            // the agent "connected" to an edge that had given it up, and a
                            // job it held started after the edge had ended it `lost` (rev26,
                            // 2). Only the ack of a beat says how much of what was written
                            // the edge has read (a job order or a result's ack may cross
                            // megabytes in a hop).
                            //
                            // Heard as of when the answered beat was written, not when its
                            // ack came (rev29-1): a hop that holds genuine acks back and
                            // lets them out late buys nothing. A job order or a result's ack
                            // carries no such time, so it moves neither clock.
                            Heard::Proven { beat } => {
                                if let Some(sent) = beat.and_then(|beat| unanswered.answered(beat)) {
                                    agent.link.heard_at(sent);
                                }
                            }
                            Heard::Not => {}
                            Heard::Goodbye { code, reason } => {
                                // The goodbye before the close frame: either may be all that
                                // gets through a link cut as the edge stops.
                                if code == close::SHUTTING_DOWN {
                                    reconnect.edge_restarting();
                                }
                                warn!(agent_id = %cfg.agent_id, code, reason = %peer_words(&reason), "the edge is closing the connection");
                                if code == close::UNAUTHORIZED || code == close::VERSION_MISMATCH {
                                    return End::Refused(reason);
                                }
                            }
                            Heard::Handshake => return End::Lost("the edge restarted the handshake mid-session".into()),
                        },
                        Err(e) => {
                            agent.unproven_frame();
                            warn!(agent_id = %cfg.agent_id, error = %peer_words(&e), "unreadable frame from the edge ignored");
                        }
                    },
                    Some(Ok(Message::Close(frame))) => {
                        // Only on an established connection: an edge still stopping closes
                        // each new one so, and the backoff must grow across those.
                        if frame.as_ref().is_some_and(|f| u16::from(f.code) == close::SHUTTING_DOWN) {
                            reconnect.edge_restarting();
                        }
                        let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                        return End::Lost(format!("the edge closed the connection: {why}"));
                    }
                    // No edge sends one.
                    Some(Ok(Message::Binary(_))) => agent.unproven_frame(),
                    // Pings are answered by the socket; neither they nor pongs say the edge is there.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::Lost(format!("connection error: {e}")),
                    None => return End::Lost("the edge closed the connection".into()),
                }
                if let Some(count) = agent.too_many_unproven() {
                    return hang_up(&mut ws, count).await;
                }
            }
            // A beat's ack overdue (after the frames come in by then were read: above).
            _ = tokio::time::sleep_until(silent_at), if reads_in_a_row < MAX_READS_IN_A_ROW => {
                return End::Lost(unanswered.silence());
            }
            // Queued behind what the agent said before it, so the edge reads the agent's
            // states in order. A change of the login or the usage window queues a beat of
            // its own as it happens (`Reporter::tell_with`). An agent that could not start
            // jobs sees first whether it can again (`Agent::check_start`).
            _ = ticker.tick() => {
                reads_in_a_row = 0;
                agent.check_start().await;
                agent.heartbeat();
            }
            // The agent's own words first, then the jobs' progress ([`crate::uplink`]).
            Some(msg) = uplink.next() => {
                reads_in_a_row = 0;
                // Results are kept and go out again after the reconnect.
                let beat = match send_queued(&mut ws, msg, uplink, limit, &mut unanswered).await {
                    Ok(beat) => beat,
                    Err(end) => return end,
                };
                if let Some(beat) = beat {
                    agent.status.beat(&beat.oauth, agent.reporter.fingerprint());
                }
            }
            // Reads had their turn and nothing else was due: read on.
            _ = std::future::ready(()), if reads_in_a_row >= MAX_READS_IN_A_ROW => reads_in_a_row = 0,
        }
    }
}

/// How many frames the work loop reads in a row at most before the uplink, the heartbeat
/// and the silence timer have their turn (a real edge sends a few at a time: orders up to
/// the agent's free slots, acks).
const MAX_READS_IN_A_ROW: u32 = 32;

/// Ends a connection on which `count` frames came that the edge did not prove
/// ([`protocol::MAX_UNPROVEN_FRAMES`]): something on the path writes into it. The
/// close says why (the edge logs it), as does the log, once; the agent dials again, with
/// the backoff of a connection lost (it grows while such connections end at once).
async fn hang_up(ws: &mut Socket, count: u32) -> End {
    let reason = format!("{count} frames the edge did not prove (failed signatures or MACs, copies, unreadable or unknown): hanging up to dial again");
    let frame = CloseFrame { code: CloseCode::from(close::PROTOCOL_ERROR), reason: close::reason(&reason).into() };
    let _ = timeout(HANDSHAKE_TIMEOUT, ws.close(Some(frame))).await;
    End::Lost(format!("{reason}; something on the path to the edge writes into the connection (a TLS-terminating proxy, or plain ws://?)"))
}

/// A hello frame as large as this agent can make one, but for `oauth` and `mirrors`: for
/// tests that what the agent reads from disks a job can write keeps it under
/// [`protocol::MAX_HELLO_BYTES`] (over it, the edge refuses the agent at every connection).
/// Every other piece at its most: the longest agent id, the most running jobs and named
/// results with the longest ids, the longest CLI version line of control characters (each
/// escaped twice: in the payload, then in the envelope), the most labels.
#[cfg(test)]
pub(crate) fn largest_hello(oauth: shared::oauth::OAuthReport, mirrors: Vec<String>) -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let long_id = |i: usize| format!("{i:0>width$}", width = shared::ids::MAX_JOB_ID);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: "a".repeat(64),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        // The edge's own nonce (32 characters): an edge that sent a longer one would only
        // refuse its own connection's hello.
        challenge: "c".repeat(32),
        agent_nonce: crate::upgrade::nonce(),
        ephemeral: shared::link::Ephemeral::new([9; 32]).public(),
        issued_at: u64::MAX,
        capacity: crate::config::MAX_MAX_CONCURRENT_JOBS,
        running: (0..crate::config::MAX_MAX_CONCURRENT_JOBS as usize).map(long_id).collect(),
        finished: (0..protocol::MAX_HELLO_FINISHED).map(long_id).collect(),
        more_finished: true,
        oauth,
        claude_version: Some("\u{1}".repeat(protocol::MAX_CLAUDE_VERSION_BYTES)),
        labels: (0..shared::placement::MAX_LABELS)
            .map(|i| (format!("k{i:0>2}"), "v".repeat(shared::placement::MAX_LABELS_BYTES / shared::placement::MAX_LABELS - 3)))
            .collect(),
        mirrors,
        instance: Some(shared::ids::instance_id([0xff; shared::ids::INSTANCE_ID_BYTES])),
    };
    let envelope = Envelope::seal(Domain::Hello, &hello, &key);
    AgentMessage::Hello { protocol: PROTOCOL_VERSION, agent_id: hello.agent_id.clone(), envelope }.to_text()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A credentials file is the agent's user's to write, and so a job's: one holding a
    /// string of 900 KB where the login goes made the login's `problem` quote it whole, the
    /// hello passed what the edge reads of one (64 KiB), and the agent was refused at every
    /// connection, for good, with no log saying why. Whatever the file, a usage window
    /// Claude printed and the mirror names hold, the hello fits.
    #[test]
    fn a_hello_fits_what_the_edge_reads_whatever_the_agents_files_hold() {
        let dir = std::env::temp_dir().join(format!("cr-hello-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let login = crate::oauth::Login::new(Some(&dir));
        let names = (0..).map(|i| format!("github.com/{}/r{i}", "o".repeat(90))).take_while({
            let mut bytes = 0;
            move |n: &String| {
                bytes += n.len() + 3;
                bytes <= crate::repo::mirror::MAX_NAMES_BYTES
            }
        });
        let mirrors: Vec<String> = names.collect();
        let worst_usage = shared::usage::UsageWindow {
            status: shared::usage::UsageStatus::Rejected,
            kind: Some("\\".repeat(shared::usage::MAX_KIND_BYTES)),
            resets_at: Some(u64::MAX),
            utilization: Some(f64::MAX),
            seen_at: u64::MAX,
        };
        // Each of these decodes to a backslash, a quote and a control character: 3 bytes of
        // the value, over 20 once escaped twice.
        let quoted = r#"\\\"\u0001"#.repeat(90_000);
        for body in [
            format!(r#"{{"claudeAiOauth":"{}"}}"#, "A".repeat(900_000)),
            format!(r#"{{"claudeAiOauth":"{quoted}"}}"#),
            format!(r#"{{"{quoted}"#),
            format!(r#"{{"claudeAiOauth":{{"accessToken":"a","subscriptionType":"{}"}}}}"#, r#"\\\""#.repeat(32)),
        ] {
            std::fs::write(&login.credentials_path, &body).unwrap();
            let reporter = crate::report::Reporter::new(login.clone());
            reporter.saw_usage(worst_usage.clone());
            let frame = largest_hello(reporter.report(), mirrors.clone());
            assert!(frame.len() <= protocol::MAX_HELLO_BYTES, "a hello of {} bytes, over the edge's {}", frame.len(), protocol::MAX_HELLO_BYTES);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// "HTTP error: 404 Not Found", at every retry, was all an agent dialing a pool the edge
    /// does not serve said: the edge refused it, and the reason says what to set.
    #[test]
    fn a_404_at_dial_is_the_edges_refusal_saying_what_to_set() {
        let not_found = || WsError::Http(tokio_tungstenite::tungstenite::http::Response::builder().status(404).body(None).unwrap().into());
        let End::Refused(why) = dial_failed("wss://w.example/pool/team-b/agent/connect", &not_found()) else { panic!("a refusal") };
        for says in ["404", "`team-b`", "POOLS", "RUNNER_SECRET_TEAM_B", "AGENT_PUBLIC_KEYS_TEAM_B", "EDGE_URL", "EDGE_POOL"] {
            assert!(why.contains(says), "{says}: {why}");
        }
        let End::Refused(why) = dial_failed("wss://edge.example/runner/agent/connect", &not_found()) else { panic!("a refusal") };
        assert!(why.contains("EDGE_URL must be the edge's own URL") && !why.contains("POOLS"), "{why}");
        let unavailable = WsError::Http(tokio_tungstenite::tungstenite::http::Response::builder().status(503).body(None).unwrap().into());
        assert!(matches!(dial_failed("wss://e/agent/connect", &unavailable), End::Unreached(_)), "a 503 passes");
        assert!(matches!(dial_failed("wss://e/agent/connect", &WsError::ConnectionClosed), End::Unreached(_)));
    }
    /// After the hello, the edge's goodbye or close is its refusal of this agent — unless it
    /// says it is stopping (4005) or let go of an unproven connection (4004): those were
    /// logged at error as "the edge refused this agent", though the agent retries.
    #[test]
    fn an_edge_stopping_before_its_welcome_is_a_lost_connection_not_a_refusal() {
        for code in [close::SHUTTING_DOWN, close::SILENT] {
            assert!(matches!(ended_before_welcome("spark", code, "restarting".into()), End::Lost(_)), "{code}");
        }
        for code in [close::UNAUTHORIZED, close::VERSION_MISMATCH, close::PROTOCOL_ERROR, close::INTERNAL_ERROR] {
            assert!(matches!(ended_before_welcome("spark", code, "no".into()), End::Refused(_)), "{code}");
        }
    }

    /// Refused because another agent (another DATA_DIR) is connected as this AGENT_ID:
    /// said in the agent's own words, with what to do, and the edge's words after them;
    /// retried when the edge said it could let this one in, within the backoff's bounds.
    #[test]
    fn a_duplicate_refusal_says_what_to_do_and_when_to_retry() {
        let said = "retry after 4950 ms: another agent is connected as `spark` from another DATA_DIR (since 2026-12-04T10:00:00Z)";
        let End::Duplicate(why, after) = ended_before_welcome("spark", close::DUPLICATE, said.into()) else { panic!("a duplicate") };
        for says in ["another agent, from another DATA_DIR, is connected as `spark`", "its own AGENT_ID", "stop the other", "keeps retrying", "since 2026-12-04T10:00:00Z"] {
            assert!(why.contains(says), "{says}: {why}");
        }
        assert_eq!(after, Some(Duration::from_millis(4950)));
        assert_eq!(crate::reconnect::told(Duration::from_millis(4950)), Duration::from_millis(4950));
        // An edge of before, or words that do not say: the backoff.
        for reason in ["another agent process is connected", "retry after soon ms: x", "retry after 5 ms", "retry after -5 ms: x", "retry after 18446744073709551616 ms: x", "retry after  5 ms: x", "retry after 5ms: x"] {
            let End::Duplicate(_, after) = ended_before_welcome("spark", close::DUPLICATE, reason.into()) else { panic!("a duplicate") };
            assert_eq!(after, None, "{reason}");
        }
        // Unproven words: never a dial every millisecond, never a wait past the backoff's most.
        assert_eq!(crate::reconnect::told(Duration::ZERO), Duration::from_secs(2));
        assert_eq!(crate::reconnect::told(Duration::from_secs(86_400)), Duration::from_secs(30));
        let End::Duplicate(_, after) = ended_before_welcome("spark", close::DUPLICATE, format!("retry after {} ms: x", u64::MAX)) else { panic!("a duplicate") };
        assert_eq!(after.map(crate::reconnect::told), Some(Duration::from_secs(30)), "the most u64 holds: the backoff's longest");
    }

    /// An ack says the edge was there when the beat it answers was written, not when the
    /// ack arrived (rev29-1): acks a hop held back and lets out late date the edge's
    /// presence by their beats, so neither the silence bound nor the away rule is reset by
    /// them; an ack again, or of nothing unanswered, dates nothing.
    #[test]
    fn a_held_back_ack_dates_the_edge_by_its_beat_not_by_its_arrival() {
        let mut sent = Unanswered::new(Duration::from_secs(2), BootInstant::now());
        let before = BootInstant::now();
        sent.beat(1, BootInstant::now());
        std::thread::sleep(Duration::from_millis(30));
        sent.beat(2, BootInstant::now());
        let second = BootInstant::now();
        // Beat 1's ack, held back and let out now: the edge was there when beat 1 was
        // written, before beat 2 was.
        std::thread::sleep(Duration::from_millis(30));
        let at = sent.answered(1).expect("beat 1 answered");
        assert!(before <= at && at < second, "dated by its beat");
        assert_eq!(sent.answered(1), None, "an ack again dates nothing");
        let at2 = sent.answered(2).expect("beat 2 answered");
        assert!(at2 >= at && at2 <= second);
        assert_eq!(sent.answered(7), None, "nothing unanswered");
        // The link: heard as of the beat — an old one moves nothing back, and an absence
        // counts from the beat, however late its ack came.
        let link = crate::link::Link::default();
        link.welcomed(Some(20), Vec::new(), BootInstant::now());
        let welcomed = link.last_heard();
        link.heard_at(at);
        assert_eq!(link.last_heard(), welcomed, "heard at the welcome, not moved back to beat 1");
        assert_eq!(link.start("j", None), crate::link::Start::Go, "heard at the welcome, not moved back to beat 1");
        let link = crate::link::Link::default();
        link.welcomed(Some(20), Vec::new(), BootInstant::now());
        std::thread::sleep(Duration::from_millis(30));
        link.heard_at(BootInstant::now().checked_sub(Duration::from_millis(25)).unwrap_or(at2));
        assert!(matches!(link.start("j", None), crate::link::Start::Hold { .. }), "an ack arriving now of a beat 25 ms old: older than 20 ms");
    }

    /// rev30-2: an ack a hop held back, of a beat written behind a large write the hop took
    /// (and passed on) at once, was dated by its arrival, not its beat: up to 64 s per MiB
    /// ahead of it (the allowance a slow link has to carry them, which is no time the edge
    /// is known to have been there). The review's test, as the API now takes the beat's
    /// writing.
    #[test]
    fn rev30_an_ack_held_behind_a_large_write_is_dated_by_its_beat() {
        let mut sent = Unanswered::new(Duration::from_secs(2), BootInstant::now());
        sent.wrote(1 << 20);
        let written = BootInstant::now();
        sent.beat(1, written);
        std::thread::sleep(Duration::from_millis(300));
        let at = sent.answered(1).expect("beat 1 answered");
        assert!(at.saturating_duration_since(written) < Duration::from_millis(50), "dated {:?} after its beat was written", at.saturating_duration_since(written));
    }

    /// rev30-2, the welcome: it proves the edge was there no earlier than the hello it
    /// answers was sent, and a hop may hold it back; dated by its arrival, an agent whose
    /// welcome came late counted its absence from then.
    #[test]
    fn a_welcome_dates_the_edge_by_the_hello_it_answers() {
        let link = crate::link::Link::default();
        let hello_sent = BootInstant::now();
        std::thread::sleep(Duration::from_millis(30));
        link.welcomed(Some(20), Vec::new(), hello_sent);
        assert!(matches!(link.start("j", None), crate::link::Start::Hold { .. }), "a welcome arriving now of a hello 30 ms old: older than 20 ms");
    }

    /// rev30-1: the silence bound was the last ack plus two intervals plus the bytes not
    /// known read *now*, so every byte written after a beat moved it on: a hop that cut the
    /// edge off and read (and dropped) all the agent wrote kept an agent whose job printed
    /// "connected" for as long as it printed, and a job held at its start started after the
    /// edge had told its caller to fall back. Each beat's due is fixed as it is written.
    #[test]
    fn what_is_written_after_a_beat_never_moves_its_due() {
        let allowance = Duration::from_secs(2);
        let hello = BootInstant::now();
        let mut sent = Unanswered::new(allowance, hello);
        // Nothing written: the hello's allowance.
        assert_eq!(sent.silent_at(), hello + allowance);
        let t = hello + Duration::from_millis(500);
        sent.wrote(16 * 1024);
        sent.beat(1, t);
        let due = t + allowance + Duration::from_secs(1);
        assert_eq!(sent.silent_at(), due, "its writing, two intervals, and the 16 KiB ahead of it at 16 KiB/s");
        // A job prints 64 MiB, beats go on, nothing answers: the first beat's due holds.
        for n in 2..100u64 {
            sent.wrote(64 * 1024 * 1024 / 100);
            sent.beat(n, t + Duration::from_millis(100 * n));
            assert_eq!(sent.silent_at(), due, "moved by what was written after beat 1");
        }
        // Past the beats remembered, the oldest due is kept.
        for n in 100..300u64 {
            sent.beat(n, t + Duration::from_millis(100 * n));
        }
        assert_eq!(sent.silent_at(), due, "a forgotten beat's due forgotten");
        // Answered: the next due is the next beat's, fixed as it was written.
        let mut sent = Unanswered::new(allowance, hello);
        sent.beat(1, t);
        sent.wrote(32 * 1024);
        sent.beat(2, t + Duration::from_secs(1));
        sent.wrote(1 << 30);
        assert_eq!(sent.answered(1), Some(t));
        assert_eq!(sent.silent_at(), t + Duration::from_secs(1) + allowance + Duration::from_secs(2));
    }

    /// The silence bound counts what was written after the last beat the edge answered:
    /// the ack of a beat sent before a large result leaves the result unanswered (it may
    /// sit in a hop that took it at once). Any frame from the edge took everything as read,
    /// and the agent dropped its connection two heartbeat intervals after that ack.
    #[test]
    fn the_ack_of_a_beat_answers_what_was_written_up_to_it_only() {
        let mut sent = Unanswered::new(Duration::from_secs(2), BootInstant::now());
        sent.wrote(100);
        sent.beat(1, BootInstant::now());
        sent.wrote(4_000_000);
        sent.wrote(100);
        sent.beat(2, BootInstant::now());
        sent.wrote(50);
        assert_eq!(sent.bytes(), 4_000_250);
        sent.answered(1);
        assert_eq!(sent.bytes(), 4_000_150, "the result after beat 1 is not known read");
        sent.answered(1);
        assert_eq!(sent.bytes(), 4_000_150, "an ack again changes nothing");
        sent.answered(2);
        assert_eq!(sent.bytes(), 50);
        // One naming a beat never sent answers up to the last one sent, no more.
        sent.beat(3, BootInstant::now());
        sent.wrote(70);
        sent.answered(99);
        assert_eq!(sent.bytes(), 70);
        sent.beat(4, BootInstant::now());
        sent.answered(4);
        assert_eq!(sent.bytes(), 0);
        // Beats past the remembered ones: the oldest forgotten, a later ack still answers.
        for seq in 10..10 + 2 * Unanswered::MAX_BEATS as u64 {
            sent.wrote(1);
            sent.beat(seq, BootInstant::now());
        }
        assert_eq!(sent.beats.len(), Unanswered::MAX_BEATS);
        sent.answered(10);
        assert_eq!(sent.bytes(), 2 * Unanswered::MAX_BEATS, "a forgotten beat answers nothing");
        sent.answered(10 + Unanswered::MAX_BEATS as u64);
        assert_eq!(sent.bytes(), Unanswered::MAX_BEATS - 1);
    }

    /// Small results go out again first: a large one on a slow link held every one behind
    /// it (the spool's order is the job ids'), and their jobs timed out.
    #[test]
    fn results_go_out_again_smallest_first() {
        let stored = |id: &str, n: usize| (id.to_string(), crate::spool::StoredResult { payload: "x".repeat(n), not_taken: None });
        let order: Vec<String> = resend_order(vec![stored("a", 4_000_000), stored("b", 10), stored("c", 500), stored("d", 10)]).into_iter().map(|(id, _)| id).collect();
        assert_eq!(order, ["b", "d", "c", "a"]);
    }

    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    /// Frames queued together go out in one write, but the bound on a write is there to
    /// find a stuck link, not a busy one: the link taking no byte for `limit` gives it up,
    /// as when each frame was sent alone. Here an edge that reads steadily, one 64 KiB frame
    /// every 100 ms, takes a write's worth of them ([`BYTES_PER_WRITE`]: 16, over a second
    /// and a half). Bounding the whole batch by one `limit` dropped such a link as "stuck
    /// (half-open?)" — on a slow uplink, a few large results queued together did that again
    /// at every reconnect. The frames past the write's bytes wait for the next write, so the
    /// edge's own frames are read between.
    #[tokio::test]
    async fn a_batch_of_frames_is_bounded_per_frame_not_as_a_whole() {
        const FRAME: usize = 64 * 1024;
        const FRAMES: usize = 64;
        let limit = Duration::from_secs(1);
        // Small socket buffers, so that the kernel does not take the whole batch at once.
        let (mut ws, mut edge) = linked_with_buffers(32 * 1024).await;
        let reader = tokio::spawn(async move {
            let mut read = 0;
            while let Some(Ok(Message::Text(_))) = edge.next().await {
                read += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            read
        });
        let frame = || AgentMessage::OrderRefused { reason: "x".repeat(FRAME) };
        let (tx, _progress, mut uplink) = crate::uplink::channels();
        for _ in 1..FRAMES {
            tx.send(frame()).unwrap();
        }
        let began = Instant::now();
        let sent = send_queued(&mut ws, Outgoing { msg: frame(), held: None }, &mut uplink, limit, &mut Unanswered::new(Duration::from_secs(2), BootInstant::now())).await;
        assert!(began.elapsed() > limit, "the edge took the batch slower than one bound, as meant");
        assert!(sent.is_ok(), "a link that takes every frame within the bound is not stuck: {:?}", sent.err());
        let in_one_write = BYTES_PER_WRITE.div_ceil(FRAME + 40);
        assert_eq!(uplink.len(), FRAMES - in_one_write, "the rest waits for the next write");
        drop(ws);
        assert_eq!(reader.await.unwrap(), in_one_write, "a write's worth arrived, in one batch");
    }

    /// An agent's socket and the edge's end of it over loopback, the edge's receive buffer
    /// and the agent's send buffer set to `bytes`, so that the kernel holds little of what
    /// is sent and not yet read.
    async fn linked_with_buffers(bytes: u32) -> (Socket, WebSocketStream<tokio::net::TcpStream>) {
        let (ws, edge) = linked_raw(bytes).await;
        let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
        (ws, WebSocketStream::from_raw_socket(edge, Role::Server, Some(config)).await)
    }

    /// [`linked_with_buffers`], the edge's end its bare TCP stream.
    async fn linked_raw(bytes: u32) -> (Socket, tokio::net::TcpStream) {
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_recv_buffer_size(bytes).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_send_buffer_size(bytes).unwrap();
        let (client, accepted) = tokio::join!(client.connect(addr), listener.accept());
        let ws: Socket = WebSocketStream::from_raw_socket(MaybeTlsStream::Plain(Metered::new(client.unwrap())), Role::Client, None).await;
        (ws, accepted.unwrap().0)
    }

    /// rev30-1: a hop that takes a little of a write each interval is never "stuck" to the
    /// meter (the link took bytes within the bound), and it kept the agent inside one write
    /// — where no ack is read and the silence bound is not looked at — for as long as it
    /// liked. A write is through by its start, two intervals and its bytes at the slowest
    /// uplink served (16 KiB/s), however the link moves. Here a 64 KiB frame taken at
    /// 4 KiB/s, 1 KiB every 250 ms (the kernel lets the writer on about once a second), the
    /// bound 3 s: given up as too slow after 7 s, where it went on for as long as the hop
    /// let it (16 s here; days at a byte an interval).
    #[tokio::test]
    async fn a_link_that_trickles_does_not_hold_a_write_for_ever() {
        use tokio::io::AsyncReadExt;
        let (mut ws, mut edge) = linked_raw(4 * 1024).await;
        let frame = AgentMessage::OrderRefused { reason: "x".repeat(64 * 1024) };
        let trickle = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(1..) = edge.read(&mut buf).await {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let limit = Duration::from_secs(3);
        let sent = send(&mut ws, &frame, limit, &mut Unanswered::new(limit, BootInstant::now())).await;
        trickle.abort();
        let Err(End::Lost(why)) = sent else { panic!("a write taken at a quarter of the slowest uplink served went on: {:?}", sent.err().map(|e| format!("{e:?}"))) };
        assert!(why.contains("was not through after") && why.contains("a byte now and then"), "{why}");
    }

    /// A send was given up after two heartbeat intervals plus the frame's size at 16 KiB/s
    /// (`MIN_UPLINK_BYTES_PER_SEC`) from its start, and a stuck link under a result of 8 MiB
    /// was found only after nine minutes: a send is given up when the link takes no byte
    /// for the bound, whatever the frame's size. A link that moves at the slowest uplink
    /// served or faster is not given up, though the frame takes longer than the bound;
    /// slower, it is once past its bytes at that rate (rev30-1: one taking a byte now and
    /// then held the agent in the write for good; the edge itself hears a frame arriving
    /// no slower than that rate). Here the edge takes a 64 KiB frame 1 KiB every 30 ms
    /// (about 33 KiB/s; the kernel lets the writer on in bursts, the receive window opening
    /// by halves), the bound 1 s: it goes.
    #[tokio::test]
    async fn a_send_on_a_slow_link_that_moves_is_not_given_up() {
        use tokio::io::AsyncReadExt;
        let (mut ws, mut edge) = linked_raw(4 * 1024).await;
        let frame = AgentMessage::OrderRefused { reason: "x".repeat(64 * 1024) };
        let bytes = frame.to_text().len();
        let reader = tokio::spawn(async move {
            let (mut buf, mut read) = ([0u8; 1024], 0);
            while read < bytes {
                match edge.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            read
        });
        let limit = Duration::from_secs(1);
        let began = Instant::now();
        let sent = send(&mut ws, &frame, limit, &mut Unanswered::new(limit, BootInstant::now())).await;
        assert!(sent.is_ok(), "a link that takes bytes steadily was given up: {:?}", sent.err().map(|e| format!("{e:?}")));
        assert!(began.elapsed() > limit, "the frame took longer than the bound, as meant");
        assert!(reader.await.unwrap() >= bytes, "the whole frame arrived");
    }

    /// A write's give-up counts a suspend, as the edge's silence bound does. Spark slept in
    /// a write into a link the edge then dropped (two intervals of real silence); on resume
    /// the meter's bound, on the monotonic clock, lay its whole length ahead again, and the
    /// agent sat in the dead write that long before it reconnected. Here the edge never
    /// reads, the write is stuck, and the machine sleeps past the bound: the write is given
    /// up on resume, within a fraction of the bound (before the fix: all of it).
    #[tokio::test]
    async fn a_write_stuck_across_a_suspend_is_given_up_on_resume() {
        use crate::boot_clock::tests::Machine;
        let (mut ws, _edge) = linked_with_buffers(4 * 1024).await;
        let taken = meter(&ws);
        let made = taken.last_taken();
        let frame = AgentMessage::OrderRefused { reason: "x".repeat(4 * 1024 * 1024) };
        let limit = Duration::from_secs(20);
        let awake = std::time::Instant::now();
        let mut machine = None;
        let suspend = async {
            // Stuck: the link took the buffers' worth and, never read, takes no more.
            while taken.last_taken() == made {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let m = Machine::install_now();
            m.suspend(2 * limit);
            machine = Some(m);
        };
        let mut unanswered = Unanswered::new(limit, BootInstant::now());
        let (sent, ()) = tokio::join!(send(&mut ws, &frame, limit, &mut unanswered), suspend);
        let awake = awake.elapsed();
        drop(machine);
        assert!(matches!(sent, Err(End::Lost(ref why)) if why.contains("took no byte for 20000 ms")), "{:?}", sent.err().map(|e| format!("{e:?}")));
        assert!(awake < limit, "the write waited its whole bound awake after the suspend ({awake:?}): its give-up did not count the sleep");
    }

    /// A hello that cannot go out within its step (an edge, or a link, that takes nothing)
    /// counts as a slow step: the next dial's bound doubles, as for a late answer. It
    /// counted as a failed write, and every dial got the same short bound.
    #[tokio::test]
    async fn a_hello_that_cannot_go_out_in_time_lengthens_the_next_dials_bound() {
        // The edge's side is never read.
        let (mut ws, _edge) = linked_with_buffers(4 * 1024).await;
        let mut reconnect = Reconnect::default();
        reconnect.welcomed(Some(8_000));
        reconnect.next(Duration::from_secs(1), true);
        let step = reconnect.handshake_timeout(true);
        assert_eq!(step, Duration::from_secs(2));
        // A hello as large as one holding many results and mirrors: more than the buffers.
        let hello = AgentMessage::OrderRefused { reason: "x".repeat(4 * 1024 * 1024) };
        let sent = send_step(&mut ws, &hello, Duration::from_millis(300), &mut reconnect).await;
        assert!(matches!(sent, Err(End::Lost(ref why)) if why.contains("the link took no byte of it for 300 ms")), "{:?}", sent.err().map(|e| format!("{e:?}")));
        assert_eq!(reconnect.handshake_timeout(true), Duration::from_secs(4), "the next dial's bound doubled");
    }
}
