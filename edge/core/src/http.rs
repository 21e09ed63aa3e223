//! The HTTP contract on top of the machine: auth, routing, bodies, and every status code,
//! once for both hosts. A host reads a request into a [`Request`] (its body through a
//! [`crate::body::Intake`]), calls [`handle`], and gets the caller's id, the kind of
//! answer to expect ([`Reply`]) and the effects to carry out — among which, for most
//! requests, the answer itself ([`Effect::Answer`]). The few answers a host gives without
//! the machine (a refusal before the body is read, no WebSocket upgrade, the edge gone)
//! are made here too.

use crate::body::{Body, Bound, Crowded, Intake, Past};
use crate::clock::Now;
use crate::machine::{CallerId, Edge, Effect};
use crate::progress;
use crate::record::Mode;
use crate::response::Response;
use crate::Config;
use shared::contract::{Accepted, ApiError, ErrorCode, ExecuteRequest, Limits, PublicHealth};
use shared::ids::hex;
use shared::job::JobState;
use shared::Millis;
use subtle::ConstantTimeEq;

/// The parts of an HTTP request the edge looks at.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// `X-Runner-Secret`.
    pub secret_header: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// `Last-Event-ID`: where a follower of `GET /jobs/{id}/events` resumes.
    pub last_event_id: Option<String>,
    pub body: Body,
}

/// A request, handled: the host keeps a channel for `caller`, then carries out `effects`.
#[derive(Debug)]
pub struct Handled {
    pub caller: CallerId,
    pub reply: Reply,
    pub effects: Vec<Effect>,
}

/// What the caller of a request is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// One [`Effect::Answer`], often among this very request's effects, at the latest when
    /// its job ends (the machine ends every job by its deadline). If none came within
    /// `max_wait_ms`, the host calls [`Edge::wait_expired`], which answers.
    /// `may_keep_alive`: this is the caller of `POST /execute` waiting for its job — the one
    /// synchronous wait existing callers make through a proxy that cuts an answer silent
    /// too long (a Cloudflare Tunnel). A host that can (the native one, with
    /// `EXECUTE_KEEPALIVE_MS`) may send the head and whitespace before the answer; every
    /// other answer goes as it is (an `/execute` refused at once has its answer already).
    /// Said here, where the route is read, so that every path the route reads as
    /// `/execute` (`//execute`, `/execute/`) is kept alive alike and no host reads it again.
    Once { max_wait_ms: u64, may_keep_alive: bool },
    /// A `text/event-stream` (200, [`crate::progress::SSE_CONTENT_TYPE`]): each
    /// [`Effect::Stream`] chunk until [`Effect::EndStream`]. While nothing comes the host
    /// writes [`crate::progress::SSE_KEEPALIVE`] after every
    /// [`crate::Config::sse_keepalive_ms`] of silence (both hosts: followers count on it).
    Stream,
}

/// The secrets a request carries (its `X-Runner-Secret` and its `Authorization: Bearer`),
/// each hashed once: every configured secret is then compared with these digests, so a
/// request's cost does not grow with its headers' size times the number of secrets.
struct Presented(Vec<[u8; 32]>);

impl Presented {
    fn of(secret_header: Option<&str>, authorization: Option<&str>) -> Presented {
        let bearer = authorization.and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")));
        Presented([secret_header, bearer].into_iter().flatten().map(|given| digest(ows_trimmed(given))).collect())
    }

    /// Whether one of them is `secret`, in a time that tells nothing of either: digests
    /// are compared, in constant time. Comparing the texts themselves (`ct_eq` on slices)
    /// answers at once when the lengths differ, which tells a caller timing its guesses
    /// the secret's length.
    fn carries(&self, secret: &str) -> bool {
        let secret = digest(secret);
        self.0.iter().any(|given| bool::from(given.ct_eq(&secret)))
    }
}

/// `text` without the whitespace HTTP allows around a header's value (OWS: spaces and
/// tabs, RFC 9110 §5.6.3), as the Worker's runtime strips it; `str::trim` took Unicode
/// whitespace too, so a secret followed by U+00A0 was let in on the native edge and
/// refused on the Worker.
pub fn ows_trimmed(text: &str) -> &str {
    text.trim_matches([' ', '\t'])
}

/// Whether a comma-separated header value (`Upgrade`, `Connection`) lists `token`, in any
/// case.
pub fn lists_token(value: &str, token: &str) -> bool {
    value.split(',').any(|part| ows_trimmed(part).eq_ignore_ascii_case(token))
}

fn digest(text: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).into()
}

/// Who a request is from, by the secret it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The pool's `RUNNER_SECRET`: the operator, or a caller that names itself (or not)
    /// with the `caller` field.
    Pool,
    /// A named caller's own secret (`RUNNER_SECRETS`): it is that caller.
    Caller(String),
}

/// Who carries one of the pool's secrets; every secret is compared, each in constant time.
pub fn who(config: &Config, secret_header: Option<&str>, authorization: Option<&str>) -> Option<Who> {
    let presented = Presented::of(secret_header, authorization);
    let mut found = presented.carries(&config.runner_secret).then_some(Who::Pool);
    for (name, secret) in &config.caller_secrets {
        if presented.carries(secret) && found.is_none() {
            found = Some(Who::Caller(name.clone()));
        }
    }
    found
}

/// The admin secret of `GET /pools`.
pub fn admin(config: &Config, secret_header: Option<&str>, authorization: Option<&str>) -> bool {
    carries_admin(config.admin_secret.as_deref(), secret_header, authorization)
}

fn carries_admin(admin_secret: Option<&str>, secret_header: Option<&str>, authorization: Option<&str>) -> bool {
    admin_secret.is_some_and(|s| Presented::of(secret_header, authorization).carries(s))
}

/// The gate of `/pools`, from `ADMIN_SECRET` alone ([`crate::config::admin_secret`] reads
/// it without any pool's settings, so the Worker can list a pool whose own settings do
/// not read): a `GET` handled for its holder, another method a `405` (as any route's,
/// after the secret), anything else refused. The whole decision: a host answers what it
/// says, and lists the pools only on [`Gate::Handle`].
pub fn pools_gate(method: &str, admin_secret: Option<&str>, secret_header: Option<&str>, authorization: Option<&str>) -> Gate {
    if carries_admin(admin_secret, secret_header, authorization) {
        let segments = ["pools"];
        if !methods_of(&segments).contains(&method) {
            return Gate::Answer(Response::error(method_not_allowed(method, "/pools", &segments)));
        }
        return Gate::Handle { read_body: false };
    }
    // Said plainly (the holder of the right runner secret was told it was wrong), and
    // the same whether or not ADMIN_SECRET is set: a caller without it learns nothing
    // of the edge's settings.
    let mut refused = ApiError::unauthorized();
    refused.body.error = "GET /pools needs ADMIN_SECRET, not a pool's or a caller's secret: send it in the X-Runner-Secret header \
                          (or Authorization: Bearer); an edge without ADMIN_SECRET keeps the route closed: set ADMIN_SECRET \
                          (16+ characters, a value of its own) in the edge's settings to open it"
        .into();
    Gate::Answer(Response::error(refused))
}

/// Whose secret a request carries, as a host counts what it spends on each: the pool's
/// `RUNNER_SECRET` (all its callers together: the secret does not tell them apart), one
/// named caller's own (`RUNNER_SECRETS`), or the admin's. `None`: no secret of the edge's,
/// and a host spends nothing on the request's behalf past its own bounds (the native edge
/// keeps its connection against MAX_CONNECTIONS only for a holder, and each holder to its
/// share of them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holder {
    Pool,
    Caller(String),
    Admin,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Pool => f.write_str("the callers of the shared RUNNER_SECRET"),
            Holder::Caller(name) => write!(f, "caller {name}"),
            Holder::Admin => f.write_str("the holder of ADMIN_SECRET"),
        }
    }
}

/// Who holds the request's secret, if any (the pool's first, as [`who`] decides; the
/// admin's only if it is neither the pool's nor a caller's).
pub fn holder(config: &Config, secret_header: Option<&str>, authorization: Option<&str>) -> Option<Holder> {
    match who(config, secret_header, authorization) {
        Some(Who::Pool) => Some(Holder::Pool),
        Some(Who::Caller(name)) => Some(Holder::Caller(name)),
        None => admin(config, secret_header, authorization).then_some(Holder::Admin),
    }
}

/// How many holders `config` has: the pool, each named caller, the admin if its secret is
/// set. A host that shares something out among them equally divides by this
/// ([`equal_share`]).
pub fn holders(config: &Config) -> usize {
    owners(config) + usize::from(config.admin_secret.is_some())
}

/// How many of the [`holders`] send jobs, and so hold what comes with them — their event
/// streams, the repeats waiting on them, their bytes until they end, their callbacks: the
/// pool's callers as one, and each named caller (`ADMIN_SECRET` sends none). The machine
/// shares those out among them ([`crate::machine`], `Edge::caller_share`).
pub fn owners(config: &Config) -> usize {
    1 + config.caller_secrets.len()
}

/// Another pool counted in the process, as [`pool_past_its_share`] weighs it: what it
/// holds, and its own value of the bound (`MAX_PENDING_BYTES_<POOL>`, or the edge's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtherPool {
    pub holds: u64,
    pub bound: u64,
}

/// Whether a pool of one process (a Worker's isolate, whose memory every pool in it
/// shares) may take `new` more bytes of a bound the pools share — the jobs not ended
/// (`machine/pending.rs`) and the bodies being read ([`crate::body`]) both ask this — or
/// the part it is refused past. `ours`: what the pool holds; `others`: each other pool
/// counted in the process, what it holds and its value; `bound`: the pool's own value;
/// `pools`: the pools the edge serves ([`Config::pools`]: one on the native edge, where
/// the rule is the bound alone).
///
/// Each pool has a part of its own, [`own_part`]: half its value split evenly among the
/// pools. A pool may always fill its own part, and past it take what the others leave,
/// but never what the others have not filled of their own parts. So the process holds at
/// most the bound (the pools' parts, filled or not, and what they took past them), and no
/// pool's jobs or uploads shut another's out of its own part. Before (review rev27, then
/// the session 40 note), the process held up to twice the bound — a pool holding nothing
/// always got one more in — 64 MiB of jobs by default, and as much again of bodies, in a
/// 128 MB isolate. What replaces "a pool holding nothing always gets a job in": a pool
/// always gets jobs in up to its own part, and a larger one when the others leave room
/// for it.
///
/// Pools may have values of their own (`MAX_PENDING_BYTES_GPU`, or a pool's
/// `MAX_BODY_BYTES` raising its unset value). A pool past its own part is held to its own
/// value for the whole process; within its part, to the largest value of the pools
/// counted: those are what the process may hold, by the operator's word for the pool that
/// filled it. Before (review rev32, 2), a pool within its part was held to its own value
/// too: a pool of 32 MiB holding nothing was refused its own part once one of 1 GiB had
/// filled the isolate, and told it was past it. Each pool past its part keeps the others'
/// parts by its own (`kept` below); a smaller pool's part is less than the part a larger
/// one keeps, and a larger one's part fits beside what a smaller one may hold, so the
/// process still holds the largest value at most.
///
/// One exception keeps "a job always fits when none is pending": with nothing held in
/// the process, one job fits whatever its size (its overhead may take it past the bound,
/// or it may be larger than the rest the other pools' parts leave). While such a job is
/// held the process is still held to the bound (or to that job alone), and the others get
/// what is left of their parts.
pub fn pool_past_its_share(ours: u64, others: &[OtherPool], new: u64, bound: u64, pools: usize) -> Option<PastShare> {
    let own = own_part(bound, pools);
    // An edge of one pool (the native edge) shares its process with no other: what the
    // process counts of others is not this edge's, and the pool's own bound is the rule.
    let others = if pools > 1 { others } else { &[] };
    let held = others.iter().map(|other| other.holds).fold(ours, u64::saturating_add);
    if held == 0 {
        return None;
    }
    // What the other pools have not filled of their own parts: theirs less what those
    // counted hold of them (one not counted holds nothing here, or is not in this process
    // yet). Never more than the pools the edge serves: one of another setting (a test's, a
    // pool since taken out of `POOLS`) keeps nothing.
    let kept = own.saturating_mul(pools.saturating_sub(1) as u64);
    let unfilled = kept.saturating_sub(others.iter().map(|other| other.holds.min(own)).fold(0, u64::saturating_add));
    let past = held.saturating_add(new);
    // Within its own part a pool always has room — but for a job let in alone past the rest.
    let within = ours.saturating_add(new) <= own;
    let fits = match within {
        true => past <= others.iter().map(|other| other.bound).fold(bound, u64::max),
        false => past <= bound && past.saturating_add(unfilled) <= bound,
    };
    (!fits).then_some(PastShare { own, unfilled, within })
}

/// A pool's own part of a bound its process shares among `pools` ([`pool_past_its_share`]):
/// half of it split evenly, the whole with one pool (whose own part is all it holds).
pub fn own_part(bound: u64, pools: usize) -> u64 {
    match pools {
        0 | 1 => bound,
        _ => equal_share(bound / 2, pools),
    }
}

/// Why [`pool_past_its_share`] refused: the pool is past its own part, and the process
/// would pass the bound with what the other pools have not filled of theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PastShare {
    /// The pool's own part ([`own_part`]).
    pub own: u64,
    /// What the other pools have not filled of their own parts, kept for them.
    pub unfilled: u64,
    /// The pool was within its own part with the new bytes: refused only because another
    /// pool holds a job (a body) let in alone, when nothing was held, larger than the room
    /// the others' parts leave it — the process would pass the bound the pools share. It
    /// is told so, not that it would pass its own part (rev35-3).
    pub within: bool,
}

/// How a caller with its own secret is told the bound it met, its [`equal_share`] of `of`
/// (what every caller draws on, with its value: "MAX_PENDING_BYTES (33554432)"): in words
/// alone. The share is `of` divided among the secrets ([`owners`], [`holders`]), so its
/// number, like the count of secrets, tells how many other callers there are — the
/// operator's to read (review rev27, 4; rev31-6). Its own count, said beside it, is its own.
pub fn named_share(of: &str) -> String {
    format!("its equal share of {of} among the secrets that share it")
}

/// One holder's share of `all` shared equally among `holders`, at least 1. Equal shares,
/// not "half each": with three holders or more, two halves would leave the third nothing
/// (review rev10), while equal shares always leave each its own.
pub fn equal_share<T>(all: T, holders: usize) -> T
where
    T: Copy + Ord + From<u8> + TryFrom<usize> + std::ops::Div<Output = T>,
{
    let one = T::from(1);
    // A count of holders fits the counts shared (places and bytes: `usize`, `u64`).
    let holders = T::try_from(holders).ok().filter(|h| *h >= one).unwrap_or(one);
    (all / holders).max(one)
}

/// What a host does with a request before it reads anything of its body. Nothing is read
/// for a caller without the secret, nor for a route that takes no body: a body is only
/// ever read for an authorised `POST` to a route that takes one (`/execute`, `/jobs`,
/// `/oauth/login`, `/oauth/login/code`).
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// Answer this at once; the body is not read.
    Answer(Response),
    /// `/agent/connect` (with or without a trailing `/`): the agents' WebSocket, which
    /// proves itself inside the protocol, not with the secret. Upgrade it, else
    /// [`upgrade_required`].
    AgentSocket,
    /// Hand the request to [`handle`], with its body read first if `read_body` (through a
    /// [`crate::body::Intake`]), else with an empty one.
    Handle { read_body: bool },
}

/// Decides a request's fate from its method, path and auth headers alone. Hosts call it
/// first, before touching the body; [`handle`] calls it too.
pub fn preflight(config: &Config, method: &str, path: &str, secret_header: Option<&str>, authorization: Option<&str>) -> Gate {
    let segments = crate::path::segments(path);
    match (method, segments.as_slice()) {
        (_, ["agent", "connect"]) => return Gate::AgentSocket,
        // Open to anyone; `/health` says more to a caller with the secret.
        ("GET" | "HEAD", ["health"] | [""] | []) => return Gate::Handle { read_body: false },
        (_, ["health"] | [""] | []) => return Gate::Answer(Response::error(method_not_allowed(method, path, &segments))),
        _ => {}
    }
    if segments.as_slice() == ["pools"] {
        return pools_gate(method, config.admin_secret.as_deref(), secret_header, authorization);
    }
    // Pausing agents, logging the machine into an account, and reading its login and
    // its counters are the operator's: a named caller's own secret reaches its own jobs
    // and `/health`'s caller view, no more.
    let operator = matches!(
        segments.as_slice(),
        ["agents", _, "pause" | "resume"] | ["oauth", "login"] | ["oauth", "login", "code"] | ["oauth", "status"] | ["metrics"]
    );
    let known = operator
        || matches!(
            segments.as_slice(),
            ["execute"] | ["jobs"] | ["jobs", _] | ["jobs", _, "events"]
        );
    if !known {
        return Gate::Answer(Response::error(ApiError::not_found(&format!("route {method} {}", shown_path(path)))));
    }
    match who(config, secret_header, authorization) {
        None => return Gate::Answer(Response::error(ApiError::unauthorized())),
        Some(Who::Caller(_)) if operator => {
            let mut refused = ApiError::unauthorized();
            refused.body.error = format!(
                "{method} {} is the operator's: it needs the pool's RUNNER_SECRET, not a caller's own secret \
                 (a caller's secret reaches its own jobs and GET /health)",
                shown_path(path)
            );
            return Gate::Answer(Response::error(refused));
        }
        Some(_) => {}
    }
    // Decided from the method and route alone, before [`handle`] looks a job up: asked
    // after that, a job of another caller (404) was told apart from a made-up id (405).
    if !methods_of(&segments).contains(&method) {
        return Gate::Answer(Response::error(method_not_allowed(method, path, &segments)));
    }
    let takes_body = matches!(segments.as_slice(), ["execute"] | ["jobs"] | ["oauth", "login"] | ["oauth", "login", "code"]);
    Gate::Handle { read_body: method == "POST" && takes_body }
}

/// A path as echoed in an answer: at most 200 bytes of it.
fn shown_path(path: &str) -> &str {
    shared::text::truncate(path, 200)
}

/// The answer while the edge cannot run at all (a setting is wrong, storage failed):
/// 500 `INTERNAL_ERROR` saying what to fix, but 503 on `/health`, so health checks read it
/// as "not usable" like any other outage.
pub fn unavailable(path: &str, message: &str) -> Response {
    let mut err = ApiError::new(ErrorCode::InternalError, message);
    if crate::path::segments(path) == ["health"] {
        err.status = 503;
    }
    Response::error(err)
}

/// The answer when the host failed while answering a request the machine may already have
/// taken (the runtime refused something, an object could not be reached, the answer was
/// lost): a task sent to `POST /execute` or `POST /jobs` may have been queued all the same,
/// so "retry" alone would have a caller run it twice; the caller is told to look first
/// (or resend with the same `Idempotency-Key`, which the edge answers with the first job).
pub fn host_failed(method: &str, path: &str, what: &str) -> Response {
    let segments = crate::path::segments(path);
    let next = if method == "POST" && matches!(segments.as_slice(), ["execute"] | ["jobs"]) {
        "the task may have been queued all the same: look for it with `GET /jobs` before sending it again \
         (or send it again with the same `Idempotency-Key`: the edge answers with the first job)"
    } else {
        "retry"
    };
    unavailable(path, &format!("{what}; {next}"))
}

/// `/agent/connect` without a WebSocket upgrade.
pub fn upgrade_required() -> Response {
    let mut err = ApiError::invalid(
        "/agent/connect is the agents' WebSocket endpoint: it needs a WebSocket handshake (a GET with `Connection: Upgrade`, \
         `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`, as WebSocket clients send); run `claude-runner agent` with EDGE_URL pointing here",
    );
    err.status = 426;
    Response::error(err)
}

/// A request whose body did not arrive within the `ms` its host gave it
/// ([`crate::body::read_within_ms`]): 408, and its connection closed (the rest of the body
/// may still come: the next request could not be told from it). `INVALID_REQUEST`, as an
/// upload that broke off: nothing was done, and the same request sent whole succeeds.
pub fn body_timed_out(ms: u64) -> Response {
    let mut err = ApiError::invalid(format!(
        "the request body did not arrive within {} s (the edge gives a body {} s, and 1 s more for each {} KiB it declares); \
         send the request again, its body whole",
        ms.div_ceil(1000),
        crate::body::BODY_FLOOR_MS / 1000,
        crate::body::BODY_MIN_BYTES_PER_SEC / 1024,
    ));
    err.status = 408;
    Response::error(err).with_header("connection", "close".into())
}

/// How a host reads the body of a request [`preflight`] said to read
/// ([`Gate::Handle`] with `read_body`): an [`Intake`] holding `min(declared, MAX_BODY_BYTES)`
/// of the bodies this process (a Worker's isolate) is reading, or — past its holder's
/// share of them, or past all of them together — the answer to give instead, before any
/// of the body is read: 429 `RUNNER_BUSY` saying whose bodies and what to do, its
/// connection closed (the body was not read: what comes next could not be told from a
/// request). The bodies together are bounded by `MAX_PENDING_BYTES`, what the jobs they
/// become may hold too, and each holder ([`holder`]: the pool's callers as one, each named
/// caller — the secrets a body is read for, [`owners`]) gets an equal share. `declared` is the body's
/// `Content-Length` (`None`: chunked). A request without a secret of the edge's reads
/// nothing: [`handle`] refuses it from its headers.
pub fn intake(config: &Config, secret_header: Option<&str>, authorization: Option<&str>, declared: Option<u64>) -> Result<Intake, Response> {
    let Some(holder) = holder(config, secret_header, authorization) else {
        return Ok(Intake::refused());
    };
    // Pools of a Worker share its isolate: each counts its own holders, and the pools
    // share the bytes of all as its holders share a pool's (`Intake::reserve`).
    let name = format!("{}/{holder}", config.pool);
    let bound = Bound { whole: usize::try_from(config.max_pending_bytes).unwrap_or(usize::MAX), holders: owners(config), pools: config.pools() };
    Intake::reserve(config.max_body_bytes, declared, &config.pool, &name, bound).map_err(|crowded| {
        tracing::debug!(pool = %config.pool, holder = %holder, mine = crowded.mine, ours = crowded.ours, past = ?crowded.past, "request body refused: the bodies in flight are at their bound");
        Response::error(ApiError::new(ErrorCode::RunnerBusy, bodies_crowded(&holder, &crowded))).with_header("connection", "close".into())
    })
}

/// What a caller refused for the bodies in flight ([`intake`]) is told: a named caller its
/// own bodies' bytes alone (as the jobs' 429s since review rev27, 4) and its share in
/// words ([`named_share`]), the pool's callers (its holder is the pool's operator) the
/// pool's; never the other pools'.
pub(crate) fn bodies_crowded(holder: &Holder, crowded: &Crowded) -> String {
    let Crowded { wanted, mine, ours, past, bound } = crowded;
    let whole = bound.whole;
    let own = format!("the request bodies of {holder} being read hold {mine} bytes of this edge's memory");
    let held = match holder {
        Holder::Caller(_) => own.clone(),
        Holder::Pool | Holder::Admin => format!("the request bodies this pool's callers are sending hold {ours} bytes of this edge's memory"),
    };
    let again = "send this again once some have arrived (uploads left unfinished are let go when their time is up)";
    let share = match holder {
        Holder::Caller(_) => named_share(&format!("MAX_PENDING_BYTES ({whole})")),
        Holder::Pool | Holder::Admin => format!("its share: MAX_PENDING_BYTES ({whole}) split among {} secrets ({})", bound.holders, bound.share()),
    };
    match past {
        Past::Share => format!("{own}, and this one's {wanted} more would pass {share}; finish or close the uploads it leaves unfinished and send this again"),
        Past::Whole => format!("{held}, and this one's {wanted} more would take this pool's bodies past MAX_PENDING_BYTES ({whole}), which bounds them together; {again}"),
        Past::Beside => format!(
            "{held}, and this one's {wanted} more is within this pool's own part ({}) of MAX_PENDING_BYTES ({whole}), but would take the bodies \
             of the {} pools this edge reads in one memory (a Worker isolate's) past the bound they share: another pool is sending a body \
             larger than the room its own part leaves the others (let in alone, as one always is when nothing is held); send this again \
             once that body has arrived",
            bound.own_part(),
            bound.pools
        ),
        Past::Part => format!(
            "{held}, and this one's {wanted} more would take this pool's bodies past its own part ({}) of MAX_PENDING_BYTES ({whole}), which \
             bounds the bodies of the {} pools this edge reads in one memory (a Worker isolate's) together, while the other pools \
             hold or keep the rest; {again}",
            bound.own_part(),
            bound.pools
        ),
    }
}

/// The answer to a request that arrives while the edge stops (the machine is gone).
pub fn shutting_down() -> Response {
    Response::error(crate::machine::shutting_down())
}

/// Routes one request; it is one event of the machine. `entropy` makes the id of a new job.
pub fn handle(edge: &mut Edge, now: impl Into<Now>, entropy: [u8; 16], req: &Request) -> Handled {
    let now = now.into();
    let caller = edge.begin_request(now);
    let once = Reply::Once { max_wait_ms: 60_000, may_keep_alive: false };
    let answer = |response: Response, mut effects: Vec<Effect>| {
        effects.push(Effect::Answer { caller, response });
        Handled { caller, reply: once, effects }
    };
    let segments = crate::path::segments(&req.path);
    let method = req.method.as_str();

    match preflight(edge.config(), method, &req.path, req.secret_header.as_deref(), req.authorization.as_deref()) {
        Gate::Answer(refused) => return answer(refused, Vec::new()),
        Gate::AgentSocket => return answer(upgrade_required(), Vec::new()),
        Gate::Handle { .. } => {}
    }
    // Routes open to anyone.
    match (method, segments.as_slice()) {
        ("GET" | "HEAD", ["health"]) => {
            // Without a secret only the verdict: which agents, versions, jobs and login
            // details an edge has is nobody else's business — nor is the work of counting
            // every agent's load done for it (anyone may ask, as often as they like). A
            // named caller sees what it needs to send work or fall back, and its own
            // queue; the operator all.
            let (status, body) = match who(edge.config(), req.secret_header.as_deref(), req.authorization.as_deref()) {
                Some(Who::Pool) => {
                    let health = edge.health(now);
                    (health.status, to_json(&health))
                }
                Some(Who::Caller(name)) => {
                    let health = edge.caller_health(now, &name);
                    (health.status, to_json(&health))
                }
                None => {
                    let status = edge.health_status(now);
                    (status, to_json(&PublicHealth { status }))
                }
            };
            return answer(Response::json(status.http_status(), body), Vec::new());
        }
        ("GET" | "HEAD", [""] | []) => return answer(crate::page::page(), Vec::new()),
        _ => {}
    }
    let body = match &req.body {
        Body::Bytes(b) if b.len() <= edge.config().max_body_bytes => b.as_slice(),
        Body::Broken(why) => {
            let err = ApiError::invalid(format!("the request body could not be read ({why}); send the request again"));
            return answer(Response::error(err), Vec::new());
        }
        Body::TimedOut { ms } => return answer(body_timed_out(*ms), Vec::new()),
        _ => return answer(Response::error(ApiError::too_large(edge.config().max_body_bytes)), Vec::new()),
    };
    let limits = Limits { max_timeout_ms: edge.config().max_timeout_ms };
    let key = req.idempotency_key.as_deref();
    let who = who(edge.config(), req.secret_header.as_deref(), req.authorization.as_deref());
    let parse = |edge: &Edge, body: &[u8]| ExecuteRequest::parse(body, key, limits).and_then(|s| with_caller(edge.config(), s, who.as_ref()));
    // A named caller's own secret reaches the jobs it sent only: another's — and one the
    // pool's secret sent in its name — is unknown to it.
    let own = |job: &crate::record::Job| match &who {
        Some(Who::Caller(name)) => job.sent_by_own_secret_of(name),
        _ => true,
    };
    if let ["jobs", id, ..] = segments.as_slice() {
        if edge.job(id).is_some_and(|job| !own(job)) {
            return answer(Response::error(ApiError::job_not_found(id)), Vec::new());
        }
    }
    match (method, segments.as_slice()) {
        ("POST", ["execute"]) => {
            let submission = match parse(edge, body) {
                Ok(s) => s,
                Err(e) => return answer(Response::error(e), Vec::new()),
            };
            let timeout_ms = submission.spec.timeout_ms;
            let placement = submission.placement.clone();
            match edge.submit(now, job_id(now.at, entropy), submission, Mode::Wait) {
                Err(e) => answer(edge.refusal_response(now, e, &placement), Vec::new()),
                Ok(submitted) => {
                    let mut effects = submitted.effects;
                    if let Err(refused) = edge.wait_for(caller, &submitted.job_id, &mut effects) {
                        return answer(Response::error(refused), effects);
                    }
                    let cfg = edge.config();
                    // The machine ends the job by then; this bound only guards the host.
                    let max_wait_ms = timeout_ms
                        .saturating_mul(2)
                        .saturating_add(cfg.timeout_margin_ms)
                        .saturating_add(cfg.lost_after_ms)
                        .saturating_add(60_000);
                    Handled { caller, reply: Reply::Once { max_wait_ms, may_keep_alive: true }, effects }
                }
            }
        }
        ("POST", ["jobs"]) => {
            let submission = match parse(edge, body) {
                Ok(s) => s,
                Err(e) => return answer(Response::error(e), Vec::new()),
            };
            let placement = submission.placement.clone();
            match edge.submit(now, job_id(now.at, entropy), submission, Mode::Detached) {
                Err(e) => answer(edge.refusal_response(now, e, &placement), Vec::new()),
                Ok(submitted) => {
                    let job = edge.job(&submitted.job_id).expect("submitted jobs exist");
                    let (state, waiting_for) = (job.state, (job.state == JobState::Queued).then(|| edge.waiting_for(now, &job.placement)));
                    let status = if submitted.existing { 200 } else { 202 };
                    let body = to_json(&Accepted { job_id: submitted.job_id, state, waiting_for });
                    answer(Response::json(status, body), submitted.effects)
                }
            }
        }
        ("GET", ["jobs"]) => {
            let caller = match &who {
                Some(Who::Caller(name)) => Some(name.as_str()),
                _ => None,
            };
            answer(Response::json(200, to_json(&edge.job_list(now, caller))), Vec::new())
        }
        ("POST", ["oauth", "login"]) => {
            let effects = edge.start_login(now, caller, entropy, body);
            Handled { caller, reply: Reply::Once { max_wait_ms: crate::machine::LOGIN_WAIT_MS, may_keep_alive: false }, effects }
        }
        ("POST", ["oauth", "login", "code"]) => {
            let effects = edge.send_login_code(now, caller, body);
            Handled { caller, reply: Reply::Once { max_wait_ms: crate::machine::LOGIN_WAIT_MS, may_keep_alive: false }, effects }
        }
        ("GET", ["jobs", id, "events"]) => {
            let after = match req.last_event_id.as_deref().map(|text| (text, progress::parse_event_id(text))) {
                None => None,
                Some((_, Some(at))) => Some(at),
                Some((text, None)) => {
                    let error = ApiError::new(
                        ErrorCode::InvalidRequest,
                        format!(
                            "Last-Event-ID `{}` is not an id this stream sends (a number such as 12, or 2.12 for a job's second attempt); \
                             send the `id:` of the last event read, or none to read the stream from the start",
                            shared::text::truncate(text, 40)
                        ),
                    );
                    return answer(Response::error(error.with_job(shared::ids::shown_job_id(id))), Vec::new());
                }
            };
            // The places of streams are parted by whose secret opens them (`Edge::follow`).
            let Some(reader) = &who else { return answer(Response::error(ApiError::unauthorized()), Vec::new()) };
            let mut effects = Vec::new();
            match edge.follow(caller, id, reader, after, &mut effects) {
                Ok(()) => Handled { caller, reply: Reply::Stream, effects },
                Err(refused) => answer(Response::error(refused), effects),
            }
        }
        ("GET", ["jobs", id]) => match edge.job(id) {
            // An ended job's view is shared by its readers while their answers are on their
            // way (`Edge::give_ended`): a flood of reads holds one copy of its result.
            Some(job) if job.header_only || job.state.is_terminal() => {
                let mut effects = Vec::new();
                edge.give_ended(caller, id, crate::record::Form::View, &mut effects);
                Handled { caller, reply: once, effects }
            }
            Some(job) => answer(Response::json(200, to_json(&edge.job_view(now, job))), Vec::new()),
            None => answer(Response::error(ApiError::job_not_found(id)), Vec::new()),
        },
        ("DELETE", ["jobs", id]) => match edge.cancel(now, id) {
            Ok(effects) => {
                // The job ended by the cancel is kept by the caps (`keep_within_caps`); were it
                // not, the caller still hears that the cancel was taken.
                let view = edge.job(id).map(|j| to_json(&j.view(now))).unwrap_or_else(|| serde_json::json!({"job_id": id, "state": "cancelled"}).to_string());
                answer(Response::json(202, view), effects)
            }
            Err(e) => answer(Response::error(e), Vec::new()),
        },
        ("GET", ["oauth", "status"]) => match edge.oauth_status(now) {
            Some(status) => answer(Response::json(200, to_json(&status)), Vec::new()),
            None => answer(
                Response::error(ApiError::new(
                    ErrorCode::RunnerOffline,
                    "no agent has reported its login yet; start `claude-runner agent` on the runner machine",
                )),
                Vec::new(),
            ),
        },
        ("POST", ["agents", id, action @ ("pause" | "resume")]) => match edge.pause(now, id, *action == "pause") {
            Ok((view, effects)) => answer(Response::json(200, to_json(&view)), effects),
            Err(e) => answer(Response::error(e), Vec::new()),
        },
        ("GET", ["pools"]) => {
            let list = shared::contract::PoolList { pools: vec![edge.pool_summary(now)] };
            answer(Response::json(200, to_json(&list)), Vec::new())
        }
        ("GET", ["metrics"]) => answer(Response::text(200, "text/plain; version=0.0.4", edge.metrics()), Vec::new()),
        _ => answer(Response::error(method_not_allowed(method, &req.path, &segments)), Vec::new()),
    }
}

/// The `405` of a route the edge knows, asked with a method it does not take: it names
/// those it takes.
fn method_not_allowed(method: &str, path: &str, segments: &[&str]) -> ApiError {
    let error = format!("{method} is not allowed on {}: use {}", shown_path(path), methods_of(segments).join(" or "));
    ApiError::new(ErrorCode::MethodNotAllowed, error)
}

/// The methods a route the edge knows takes ([`preflight`] answers any other `405`, and
/// [`pools_gate`] `/pools`'s), as its `405` names them. `/health` and `/` have their own
/// gate.
fn methods_of(segments: &[&str]) -> &'static [&'static str] {
    match segments {
        ["jobs"] => &["GET", "POST"],
        ["jobs", _] => &["GET", "DELETE"],
        ["execute"] | ["oauth", "login"] | ["oauth", "login", "code"] | ["agents", _, _] => &["POST"],
        ["health"] | [""] | [] => &["GET", "HEAD"],
        _ => &["GET"],
    }
}

/// A submission with its caller settled. A caller name that has its own secret
/// (`RUNNER_SECRETS`) belongs to that secret: a named caller's secret names it (a `caller`
/// field naming another is refused), and the pool's secret may name any caller but those
/// — it cannot fill their queue cap or take their turns. Refusals are 403s that say which
/// secret to use.
fn with_caller(config: &Config, mut submission: shared::contract::Submission, who: Option<&Who>) -> Result<shared::contract::Submission, ApiError> {
    let refuse = |error: String| {
        let mut err = ApiError::unauthorized();
        err.body.error = error;
        err
    };
    let said = submission.placement.caller.clone();
    match (who, said) {
        (Some(Who::Caller(name)), Some(said)) if said != *name => Err(refuse(format!(
            "this secret is caller `{name}`'s; leave `caller` out or send `{name}` (another caller's jobs need that caller's own secret)"
        ))),
        (Some(Who::Caller(name)), _) => {
            submission.placement.caller = Some(name.clone());
            submission.caller_proven = true;
            Ok(submission)
        }
        (_, Some(said)) if config.has_own_secret(&said) => Err(refuse(format!(
            "caller `{said}` has its own secret (RUNNER_SECRETS): send its jobs with that secret; \
             the pool's RUNNER_SECRET may name only callers without one"
        ))),
        _ => Ok(submission),
    }
}

/// Job ids sort by creation time: 12 hex digits of milliseconds, then 16 of entropy.
fn job_id(now: Millis, entropy: [u8; 16]) -> String {
    format!("{now:012x}{}", hex(&entropy[..8]))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("views serialise")
}
