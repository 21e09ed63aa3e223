//! What the edge posts to the world, decided in pure code: alerts to `NOTIFY_URL` (an
//! ntfy topic, or any webhook taking a POST; a pool's own `NOTIFY_URL_<POOL>` if set) and
//! a job's result to its `callback_url`.
//! The machine observes conditions and asks [`decide`] which alerts to send; it posts
//! through the host ([`crate::Effect::Post`]) and retries with [`backoff`].
//!
//! The edge posts, not the agent: the offline alert can only come from the edge, the
//! callback is signed with the caller's secret (the pool's, or the caller's own), which
//! the agent does not hold, and the edge
//! sees every agent's login and usage window.
//!
//! Alerts are edge-triggered and rate-limited: one is sent when its condition starts
//! (not again while it lasts), and at most one per [`AlertKind`] and agent per
//! `NOTIFY_MIN_INTERVAL_MS`. A used-up usage window that opens again sends its own
//! alert. Alert texts are made here from the condition alone: never a token, a prompt or
//! an output. An alert of a pool other than `default` names its pool ([`alert_request`]).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use shared::Millis;
use shared::contract::JobView;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The login will need a person within `OAUTH_WARN_HOURS`.
    LoginSoon,
    /// Claude cannot authenticate: a person must log in now.
    LoginNeeded,
    /// The subscription's usage window is used up.
    UsageRejected,
    /// It opened again.
    UsageReset,
    /// No agent has been connected for `OFFLINE_ALERT_MS`.
    Offline,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::LoginSoon => "login_soon",
            AlertKind::LoginNeeded => "login_needed",
            AlertKind::UsageRejected => "usage_rejected",
            AlertKind::UsageReset => "usage_reset",
            AlertKind::Offline => "offline",
        }
    }

    /// ntfy's priority (1–5) and tags, which other webhooks may ignore.
    fn priority(self) -> (&'static str, &'static str) {
        match self {
            AlertKind::LoginNeeded => ("5", "rotating_light"),
            AlertKind::Offline => ("4", "warning"),
            AlertKind::LoginSoon | AlertKind::UsageRejected => ("3", "hourglass"),
            AlertKind::UsageReset => ("2", "white_check_mark"),
        }
    }
}

/// One condition as the machine sees it now.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub kind: AlertKind,
    /// The agent it is about (empty for the pool).
    pub agent: String,
    pub active: bool,
    /// The alert's text if it is sent.
    pub message: String,
}

/// An alert to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub agent: String,
    pub message: String,
}

/// What alerting remembers, stored with the edge (so a restart, or the Worker's object
/// leaving memory, neither repeats an alert nor forgets how long the agent is away) — and
/// the rest of the edge's memory that is no job's: callbacks on their way, the last usage
/// window, pauses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    /// Conditions that are on and were alerted (`kind:agent`).
    pub raised: BTreeSet<String>,
    /// When each alert was last sent (edge time).
    pub last_sent: BTreeMap<String, Millis>,
    /// Since when no agent is connected (edge time).
    #[serde(default)]
    pub offline_since: Option<Millis>,
    /// Result callbacks not yet taken, by job (kept here, not in the job's record: an
    /// ended job's record is written once).
    #[serde(default)]
    pub callbacks: BTreeMap<String, CallbackState>,
    /// Until when (edge time) the last agent to report said its usage window is used up.
    /// Jobs held for the window's reset go on waiting for it while no agent is connected
    /// (a network blip, the agent's restart, or the edge's own: the native host restores
    /// no connections), instead of expiring after `QUEUE_TTL_MS`.
    #[serde(default)]
    pub usage_hold: Option<Millis>,
    /// Agents an operator paused, by id: a pause outlasts the agent's reconnects and the
    /// edge's restarts (the native host restores no connections).
    #[serde(default)]
    pub paused: BTreeSet<String>,
    /// Alerts on their way to `NOTIFY_URL`, by delivery id. Kept here, as callbacks are:
    /// an alert's condition is `raised` when it is decided, so one whose post failed is
    /// never decided again, and would be lost with the machine's memory (the Worker's
    /// object leaves it after some seconds idle, the native edge at a restart).
    #[serde(default)]
    pub alert_posts: BTreeMap<String, AlertDelivery>,
    /// Agents that were connected and went away, since when (edge time): `/health` lists
    /// them as down for an hour. Kept here so the Worker, rebuilt from storage every few
    /// seconds, shows them as the native edge does.
    #[serde(default)]
    pub departed: BTreeMap<String, Millis>,
}

/// A job's result callback on its way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackState {
    pub url: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// When (edge time) to try again: after a failure, or when the host never said how
    /// the last attempt went.
    pub next_at: Millis,
    /// Handed to the host (posted, or its record being read back to post) and not heard
    /// of yet: one of the `MAX_CALLBACKS_IN_FLIGHT`. Not stored: what a restarted edge's
    /// host had in flight is gone with it.
    #[serde(skip)]
    pub in_flight: bool,
}

/// An alert on its way: what to post to `NOTIFY_URL` (the URL itself is not kept: it is
/// the setting's at each attempt, and a webhook URL may hold its token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertDelivery {
    /// The condition it tells of (`kind:agent`): a post still on its way when the
    /// condition ends is dropped, not told late ("no agent connected" with one back).
    #[serde(default)]
    pub key: String,
    /// When it was decided (edge time): past [`ALERT_STALE_MS`] it is given up, however
    /// many attempts are left (a restart a day later must not post a day-old alert).
    #[serde(default)]
    pub decided_at: Millis,
    pub body: String,
    pub headers: Vec<(String, String)>,
    /// Attempts made so far.
    pub attempts: u32,
    /// When (edge time) to try again: after a failure, or when the host never said how
    /// the last attempt went.
    pub next_at: Millis,
}

impl AlertDelivery {
    /// The first attempt of `alert`'s post, made `now`.
    pub fn new(alert: &Alert, body: String, headers: Vec<(String, String)>, now: Millis) -> AlertDelivery {
        AlertDelivery { key: key(alert.kind, &alert.agent), decided_at: now, body, headers, attempts: 1, next_at: now.saturating_add(UNHEARD_AFTER_MS) }
    }

    /// Too old to tell: decided longer ago than its attempts could take.
    pub fn stale(&self, now: Millis) -> bool {
        now.saturating_sub(self.decided_at) > ALERT_STALE_MS
    }
}

/// How long an alert may wait for delivery: about its eight attempts' backoff and
/// timeouts (6 minutes), with room for an edge restarted in between. Past it, what it
/// says ("for 10 seconds") is no longer news but history.
pub const ALERT_STALE_MS: Millis = 15 * 60_000;

fn key(kind: AlertKind, agent: &str) -> String {
    format!("{}:{agent}", kind.as_str())
}

impl AlertState {
    /// Whether `kind`'s alert about `agent` (empty for the pool) was raised and its
    /// condition has not been seen to end.
    pub fn is_raised(&self, kind: AlertKind, agent: &str) -> bool {
        self.raised.contains(&key(kind, agent))
    }
}

/// Which alerts to send now, given what is observed; updates `state`. A condition not
/// observed (its agent is away) keeps its state.
pub fn decide(state: &mut AlertState, now: Millis, observed: &[Observation], min_interval: Millis) -> Vec<Alert> {
    let mut out = Vec::new();
    let mut send = |state: &mut AlertState, kind: AlertKind, agent: &str, message: &str| {
        let k = key(kind, agent);
        if state.last_sent.get(&k).is_some_and(|t| now.saturating_sub(*t) < min_interval) {
            return;
        }
        state.last_sent.insert(k, now);
        out.push(Alert { kind, agent: agent.to_string(), message: message.to_string() });
    };
    for o in observed {
        let k = key(o.kind, &o.agent);
        match (o.active, state.raised.contains(&k)) {
            (true, false) => {
                state.raised.insert(k);
                send(state, o.kind, &o.agent, &o.message);
            }
            (false, true) => {
                state.raised.remove(&k);
                // Its post, if still on its way, would now say what is no longer so
                // (and a "used up" retried after "open again" would be read last).
                state.alert_posts.retain(|_, p| p.key != k);
                if o.kind == AlertKind::UsageRejected {
                    send(state, AlertKind::UsageReset, &o.agent, &o.message);
                }
            }
            _ => {}
        }
    }
    out
}

/// The POST of one alert of `pool`: a plain-text body (what ntfy shows) and ntfy's headers.
/// An alert of a pool other than the default one names it — in the title, the text and
/// `X-Claude-Runner-Pool` — since pools may share one `NOTIFY_URL`, and an agent's id or
/// "no agent connected" alone does not say which pool to look at.
pub fn alert_request(alert: &Alert, pool: &str) -> (String, Vec<(String, String)>) {
    let (priority, tags) = alert.kind.priority();
    let what = match alert.kind {
        AlertKind::LoginSoon => "login ends soon",
        AlertKind::LoginNeeded => "log in again",
        AlertKind::UsageRejected => "usage window used up",
        AlertKind::UsageReset => "usage window open again",
        AlertKind::Offline => "agent offline",
    };
    let named = pool != shared::ids::DEFAULT_POOL;
    let (title, body) = match named {
        true => (format!("Claude Runner, pool {pool}: {what}"), format!("Pool `{pool}`: {}", alert.message)),
        false => (format!("Claude Runner: {what}"), alert.message.clone()),
    };
    let mut headers = vec![
        ("content-type".to_string(), "text/plain; charset=utf-8".to_string()),
        ("title".to_string(), title),
        ("priority".to_string(), priority.to_string()),
        ("tags".to_string(), tags.to_string()),
        ("x-claude-runner-alert".to_string(), alert.kind.as_str().to_string()),
    ];
    if named {
        headers.push(("x-claude-runner-pool".to_string(), pool.to_string()));
    }
    (body, headers)
}

/// The most bytes of a callback's body: a view larger than this (a large diff, an output
/// past what the agent cuts it to) is sent without its long parts ([`callback_body`]).
pub const MAX_CALLBACK_BODY_BYTES: usize = 2 * 1024 * 1024;

/// What a callback's body left out of the job's view to stay within
/// [`MAX_CALLBACK_BODY_BYTES`], and where the whole is read.
#[derive(Debug, Clone, Serialize)]
struct Partial {
    /// Of `diff`, `files_changed`, `output`, `error` (a text: cut), or the whole `result`.
    left_out: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_bytes_left_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_bytes_left_out: Option<u64>,
    /// `GET /jobs/{id}` (under `/pool/<name>` for another pool than the default one).
    whole: String,
}

#[derive(Serialize)]
struct CallbackBody<'a> {
    #[serde(flatten)]
    view: &'a JobView,
    #[serde(skip_serializing_if = "Option::is_none")]
    partial: Option<&'a Partial>,
}

/// The body of a callback: the job's view (`GET /jobs/{id}`'s answer) whole when it is at
/// most [`MAX_CALLBACK_BODY_BYTES`]; else without its `diff`, then without its
/// `files_changed`, then with its `output` and then its `error` cut, until it fits (a
/// result whose other fields alone pass the bound, which no agent's does, goes whole) —
/// with `partial` saying what was left out and where to read the whole (`pool` says
/// where). Bounded so that the callbacks in flight at once are bounded in bytes, not only
/// in count ([`crate::machine::MAX_CALLBACKS_IN_FLIGHT`]).
pub fn callback_body(mut view: JobView, pool: &str) -> String {
    let text = |view: &JobView, partial: Option<&Partial>| serde_json::to_string(&CallbackBody { view, partial }).expect("views serialise");
    let whole = text(&view, None);
    if whole.len() <= MAX_CALLBACK_BODY_BYTES || view.result.is_none() {
        return whole;
    }
    drop(whole);
    let place = match pool {
        shared::ids::DEFAULT_POOL => String::new(),
        pool => format!("/pool/{pool}"),
    };
    let mut partial = Partial { left_out: Vec::new(), output_bytes_left_out: None, error_bytes_left_out: None, whole: format!("GET {place}/jobs/{}", view.job_id) };
    let fits = |view: &JobView, partial: &Partial| text(view, Some(partial)).len() <= MAX_CALLBACK_BODY_BYTES;
    fn result(view: &mut JobView) -> &mut shared::job::JobResult {
        &mut view.result.as_mut().expect("checked above").result
    }
    if result(&mut view).diff.take().is_some() {
        partial.left_out.push("diff");
    }
    if !fits(&view, &partial) && result(&mut view).files_changed.take().is_some() {
        partial.left_out.push("files_changed");
    }
    for field in ["output", "error"] {
        if fits(&view, &partial) {
            break;
        }
        let mut value = match field {
            "output" => std::mem::take(&mut result(&mut view).output),
            _ => result(&mut view).error.take().unwrap_or_default(),
        };
        // The room it has: the bound less the rest, with what `partial` will say of it at
        // its widest.
        let mut widest = partial.clone();
        widest.left_out.push(field);
        *widest.left_of(field) = Some(u64::MAX);
        let room = MAX_CALLBACK_BODY_BYTES.saturating_sub(text(&view, Some(&widest)).len());
        let kept = longest_prefix_within(&value, room);
        if kept < value.len() {
            partial.left_out.push(field);
            *partial.left_of(field) = Some((value.len() - kept) as u64);
            value.truncate(kept);
        }
        match field {
            "output" => result(&mut view).output = value,
            _ => result(&mut view).error = Some(value).filter(|v| !v.is_empty()),
        }
    }
    if !fits(&view, &partial) {
        // Only fields an agent has no reason to fill so (its session id, a branch name):
        // the result goes, the view's other fields stay.
        view.result = None;
        partial = Partial { left_out: vec!["result"], output_bytes_left_out: None, error_bytes_left_out: None, ..partial };
    }
    text(&view, Some(&partial))
}

impl Partial {
    fn left_of(&mut self, field: &str) -> &mut Option<u64> {
        match field {
            "output" => &mut self.output_bytes_left_out,
            _ => &mut self.error_bytes_left_out,
        }
    }
}

/// The length of the longest start of `text` (cut at a character's boundary) whose JSON
/// string, quotes aside, takes at most `room` bytes as serde_json writes it: `"`, `\\` and
/// `\b \t \n \f \r` two bytes each, other control characters six (`\u00XX`), the
/// rest as they are.
fn longest_prefix_within(text: &str, room: usize) -> usize {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        used += match c {
            '"' | '\\' | '\u{8}' | '\t' | '\n' | '\u{c}' | '\r' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used > room {
            return at;
        }
    }
    text.len()
}

/// Tries of one delivery, at most.
pub const MAX_ATTEMPTS: u32 = 8;
/// How long a host may take over one POST before the machine counts it failed.
pub const DELIVERY_TIMEOUT_MS: Millis = 15_000;
/// When an attempt the host never told of is tried again (it held its place until then).
/// Later than [`DELIVERY_TIMEOUT_MS`]: the host's own timer on the attempt starts a moment
/// after the machine handed it out, and until the host gives it up its connection is still
/// open. Free at the same moment, the place went to a new attempt while the old one's
/// connection still stood: one more open to the receiver than its share.
pub const UNHEARD_AFTER_MS: Millis = DELIVERY_TIMEOUT_MS + 5_000;

/// The wait after failed attempt number `attempt` (1, 2, …): 2 s, 4 s, 8 s, … up to five
/// minutes.
pub fn backoff(attempt: u32) -> Millis {
    (1_000u64 << attempt.min(20)).min(300_000)
}

/// How an attempt went, as the host saw it.
pub type Outcome = Result<u16, String>;

/// Whether to try again after this outcome: not after a success, and not after a refusal
/// that will not change (4xx other than 408 and 429).
pub fn retry_after(outcome: &Outcome) -> bool {
    match outcome {
        Ok(status) if (200..300).contains(status) => false,
        Ok(408 | 429) => true,
        Ok(status) if (400..500).contains(status) => false,
        _ => true,
    }
}

/// A host's words on a failed POST as the machine logs them: one line of at most 200
/// bytes, every URL in it (`scheme://…`) left out, since `NOTIFY_URL` and a `callback_url`
/// may hold their token. The hosts keep the URL out of their own words (the native edge's
/// HTTP client names it); this holds for words they did not foresee (a platform's error).
pub fn failure_words(text: &str) -> String {
    let scheme_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.');
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = rest[..at].char_indices().rev().find(|(_, c)| !scheme_char(*c)).map_or(0, |(i, c)| i + c.len_utf8());
        // A URL ends only at white space: `(`, `)`, `'` and a backtick are left as they
        // are in its path and query, so ending it at one left what follows (the token
        // after `cb(v2)?token=`) in the line.
        let tail = &rest[at + 3..];
        let run = tail.find(char::is_whitespace).unwrap_or(tail.len());
        // Quoted or bracketed (`(https://…): refused`): the closer and the punctuation
        // after it are kept when nothing but punctuation follows the last closer.
        let closer = match rest[..start].chars().next_back() {
            Some('(') => Some(')'),
            Some('<') => Some('>'),
            Some(c @ ('"' | '\'' | '`')) => Some(c),
            _ => None,
        };
        let kept = closer.and_then(|c| tail[..run].rfind(c)).filter(|&i| !tail[i..run].chars().any(char::is_alphanumeric));
        out.push_str(&rest[..start]);
        out.push_str("<url>");
        rest = &tail[kept.unwrap_or(run)..];
    }
    out.push_str(rest);
    shared::text::one_line(shared::text::truncate(&out, 200))
}

/// `X-Runner-Signature` of a callback: `sha256=` and the hex HMAC-SHA256, keyed with the
/// secret the job was sent with (the pool's, or its caller's own), of `{timestamp}.{body}`
/// (the timestamp is `X-Runner-Timestamp`).
pub fn signature(secret: &str, timestamp: Millis, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", shared::ids::hex(&mac.finalize().into_bytes()))
}

/// Hosts whose plain `http://` a callback may use: this machine only (tests, a local
/// receiver); anywhere else it must be `https://`.
const LOOPBACK: &[&str] = &["127.0.0.1", "localhost", "[::1]"];

/// A `CALLBACK_HOSTS` entry as [`check_callback`] matches it — its host name lowered, an
/// internationalised one in its punycode form (`bücher.example` → `xn--bcher-kva.example`)
/// — or `None` if it is none it can match: a host name or an IP address (IPv6 in
/// brackets), and at most a port after it; no scheme, path, user or space, which would
/// match no `callback_url` at all.
pub fn callback_host_entry(entry: &str) -> Option<String> {
    let entry = match entry.is_ascii() {
        true => entry.to_ascii_lowercase(),
        false => {
            let (host, port) = entry.rsplit_once(':').filter(|(_, p)| p.is_ascii()).unwrap_or((entry, ""));
            let host = ascii_host(host)?;
            match port {
                "" if !entry.ends_with(':') => host,
                _ => format!("{host}:{port}"),
            }
        }
    };
    is_callback_host_entry(&entry).then_some(entry)
}

/// A host name as the URL parser that posts takes it (WHATWG's domain to ASCII: lowered,
/// an internationalised name in punycode); `None` if it is no domain name.
fn ascii_host(host: &str) -> Option<String> {
    idna::domain_to_ascii_cow(host.as_bytes(), idna::AsciiDenyList::URL).ok().map(|h| h.into_owned()).filter(|h| !h.is_empty())
}

fn is_callback_host_entry(entry: &str) -> bool {
    // `[v6]` or a name, then `:port` or nothing.
    let (host_ok, rest) = match entry.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((inner, rest)) => (!inner.is_empty() && inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'), rest),
            None => return false,
        },
        None => {
            let end = entry.find(':').unwrap_or(entry.len());
            let host = &entry[..end];
            // `_` too: Docker Compose service and container names have it, and URLs take it.
            (!host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')), &entry[end..])
        }
    };
    let port_ok = match rest.strip_prefix(':') {
        None => rest.is_empty(),
        Some(port) => port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0),
    };
    host_ok && port_ok
}

/// Checks a `callback_url` against `CALLBACK_HOSTS`: `https://` (or `http://` on
/// loopback) to a host on the list. Returns what to fix.
pub fn check_callback(url: &str, allowed: &[String]) -> Result<(), String> {
    let (scheme, host, port) = callback_parts(url)?;
    match scheme {
        "https" => {}
        "http" if LOOPBACK.contains(&host.as_str()) => {}
        _ => return Err("`callback_url` must be an https:// URL".into()),
    }
    // An entry `host` allows any port of that host; `host:port` that port only.
    let listed = |entry: &String| match (entry.eq_ignore_ascii_case(&host), port) {
        (true, _) => true,
        (false, Some(port)) => entry.eq_ignore_ascii_case(&format!("{host}:{port}")),
        (false, None) => false,
    };
    if !allowed.iter().any(listed) {
        return Err(format!(
            "`callback_url`'s host `{host}` is not allowed: the edge's CALLBACK_HOSTS lists the hosts results may be posted to"
        ));
    }
    Ok(())
}

/// The receiver a `callback_url` posts to, for sharing out the places of the callbacks in
/// flight: its host, lowercased (punycode for an internationalised name), whatever its
/// port — a `CALLBACK_HOSTS` entry without a port allows every port of its host, and one
/// machine answering on many ports is still one receiver. `None` for a URL
/// [`check_callback`] refuses.
pub fn callback_receiver(url: &str) -> Option<String> {
    callback_parts(url).ok().map(|(_, host, _)| host)
}

/// A `callback_url`'s scheme, host (lowercased, punycode) and port, if it names one.
fn callback_parts(url: &str) -> Result<(&str, String, Option<&str>), String> {
    let (scheme, rest) = url.split_once("://").ok_or("`callback_url` must be an https:// URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("`callback_url` must not carry user or password".into());
    }
    let written = if authority.starts_with('[') {
        authority.split_inclusive(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    // What follows the host is its port, if any (`:` and digits, checked by the URL
    // parser that posts; here only compared).
    let port = authority[written.len()..].strip_prefix(':').filter(|p| !p.is_empty());
    if written.is_empty() {
        return Err("`callback_url` has no host".into());
    }
    // An internationalised name is posted to its punycode form, which the list holds.
    let host = match written.is_ascii() {
        true => written.to_ascii_lowercase(),
        false => ascii_host(written).ok_or("`callback_url`'s host is not a valid domain name")?,
    };
    Ok((scheme, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The room a cut output is given is counted as serde_json writes the text.
    #[test]
    fn a_texts_json_length_is_counted_as_serde_json_writes_it() {
        let all: String = (0u32..0x300).filter_map(char::from_u32).chain("😀\"\\é".chars()).collect();
        for end in (0..=all.len()).filter(|i| all.is_char_boundary(*i)) {
            let prefix = &all[..end];
            let written = serde_json::to_string(prefix).unwrap().len() - 2;
            assert_eq!(longest_prefix_within(prefix, written), prefix.len(), "{prefix:?}");
            if !prefix.is_empty() {
                assert!(longest_prefix_within(prefix, written - 1) < prefix.len(), "{prefix:?}");
            }
        }
    }

    fn obs(kind: AlertKind, active: bool) -> Observation {
        Observation { kind, agent: "spark".into(), active, message: format!("{kind:?} {active}") }
    }

    #[test]
    fn an_alert_goes_once_when_its_condition_starts() {
        let mut s = AlertState::default();
        assert_eq!(decide(&mut s, 0, &[obs(AlertKind::LoginNeeded, true)], 1_000).len(), 1);
        for t in 1..10 {
            assert!(decide(&mut s, t * 10_000, &[obs(AlertKind::LoginNeeded, true)], 1_000).is_empty(), "not again while it lasts");
        }
        // Unobserved (the agent is away): remembered, not re-sent when it comes back.
        assert!(decide(&mut s, 200_000, &[], 1_000).is_empty());
        assert!(decide(&mut s, 210_000, &[obs(AlertKind::LoginNeeded, true)], 1_000).is_empty());
        // It ends and starts again: sent again.
        assert!(decide(&mut s, 220_000, &[obs(AlertKind::LoginNeeded, false)], 1_000).is_empty());
        assert_eq!(decide(&mut s, 230_000, &[obs(AlertKind::LoginNeeded, true)], 1_000).len(), 1);
    }

    #[test]
    fn flapping_conditions_are_rate_limited() {
        let mut s = AlertState::default();
        let mut sent = 0;
        for t in 0..100u64 {
            sent += decide(&mut s, t * 1_000, &[obs(AlertKind::LoginNeeded, t % 2 == 0)], 60_000).len();
        }
        assert_eq!(sent, 2, "one per minute over 100 s");
    }

    #[test]
    fn a_window_that_opens_again_says_so() {
        let mut s = AlertState::default();
        let sent = decide(&mut s, 0, &[obs(AlertKind::UsageRejected, true)], 1_000);
        assert_eq!(sent[0].kind, AlertKind::UsageRejected);
        let sent = decide(&mut s, 5_000, &[obs(AlertKind::UsageRejected, false)], 1_000);
        assert_eq!(sent.iter().map(|a| a.kind).collect::<Vec<_>>(), vec![AlertKind::UsageReset]);
        assert!(decide(&mut s, 6_000, &[obs(AlertKind::UsageRejected, false)], 1_000).is_empty());
        let (body, headers) = alert_request(&sent[0], "default");
        assert_eq!(body, "UsageRejected false");
        assert!(headers.contains(&("x-claude-runner-alert".to_string(), "usage_reset".to_string())));
    }

    #[test]
    fn an_alert_of_another_pool_than_the_default_names_it() {
        let alert = Alert { kind: AlertKind::Offline, agent: String::new(), message: "No agent has been connected".into() };
        let header = |headers: &[(String, String)], name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let (body, headers) = alert_request(&alert, "default");
        assert_eq!(body, "No agent has been connected");
        assert_eq!(header(&headers, "title").as_deref(), Some("Claude Runner: agent offline"));
        assert_eq!(header(&headers, "x-claude-runner-pool"), None);
        let (body, headers) = alert_request(&alert, "team-b");
        assert_eq!(body, "Pool `team-b`: No agent has been connected");
        assert_eq!(header(&headers, "title").as_deref(), Some("Claude Runner, pool team-b: agent offline"));
        assert_eq!(header(&headers, "x-claude-runner-pool").as_deref(), Some("team-b"));
    }

    #[test]
    fn retries_back_off_and_stop_on_refusals() {
        assert_eq!((backoff(1), backoff(2), backoff(3)), (2_000, 4_000, 8_000));
        assert_eq!(backoff(30), 300_000);
        assert!(!retry_after(&Ok(204)));
        assert!(retry_after(&Ok(500)) && retry_after(&Ok(429)) && retry_after(&Err("refused".into())));
        assert!(!retry_after(&Ok(404)) && !retry_after(&Ok(400)));
    }

    #[test]
    fn a_failed_posts_words_keep_no_url() {
        let said = "error sending request for url (https://ntfy.example/tk_S3cr3t?auth=Qu3ry): connection refused";
        assert_eq!(failure_words(said), "error sending request for url (<url>): connection refused");
        let said = "TypeError: Fetch API cannot load: http://[::1]:8080/hook/tk_S3cr3t\nnext line";
        assert_eq!(failure_words(said), "TypeError: Fetch API cannot load: <url>\\nnext line");
        assert_eq!(failure_words("é https://h/x https://h/y"), "é <url> <url>");
        assert_eq!(failure_words("connection reset"), "connection reset");
        // Left out before the cut: a URL cut short would keep its start.
        let long = format!("{} https://ntfy.example/tk_S3cr3t", "x".repeat(190));
        assert!(!failure_words(&long).contains("ntfy"), "{}", failure_words(&long));
    }

    /// `(`, `)`, `'` and a backtick are left unencoded in a URL's path and query: a URL
    /// ended at one of them left its token in the line.
    #[test]
    fn a_url_with_brackets_or_quotes_in_it_is_left_out_whole() {
        for said in [
            "TypeError: Fetch API cannot load: https://hook.example/cb(v2)?token=tk_S3cr3t",
            "TypeError: Fetch API cannot load: https://hook.example/cb?x='a'&token=tk_S3cr3t",
            "error (https://u:p(ss@hook.example/tk_S3cr3t): refused",
            "error (https://hook.example/a)tk_S3cr3t: refused",
            "'https://hook.example/it's/tk_S3cr3t'",
        ] {
            let words = failure_words(said);
            assert!(!words.contains("S3cr3t") && !words.contains("hook"), "{said} -> {words}");
        }
        assert_eq!(failure_words("error (https://h/x(1)): refused"), "error (<url>): refused");
        // Any mix of text, brackets and wide characters: no panic.
        let parts = ["://", "é", "😀", "(", ")", " ", "h", "'", "\n"];
        for a in parts {
            for b in parts {
                for c in parts {
                    for d in parts {
                        let _ = failure_words(&format!("{a}{b}{c}{d}"));
                    }
                }
            }
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(shared::ids::hex(&mac.finalize().into_bytes()), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let sig = signature("secret", 1_700_000_000_000, "{}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert_ne!(sig, signature("secret", 1_700_000_000_001, "{}"), "the timestamp is signed");
        assert_ne!(sig, signature("other", 1_700_000_000_000, "{}"));
    }

    #[test]
    fn callbacks_go_only_to_allowed_hosts_over_https() {
        let allowed = vec!["hooks.example.com".to_string(), "127.0.0.1".to_string()];
        assert!(check_callback("https://hooks.example.com/runner?x=1", &allowed).is_ok());
        assert!(check_callback("https://HOOKS.example.com:8443/r", &allowed).is_ok());
        assert!(check_callback("http://127.0.0.1:9999/cb", &allowed).is_ok());
        for bad in [
            "http://hooks.example.com/r",
            "https://evil.example.com/r",
            "https://hooks.example.com.evil.com/r",
            "https://user:pw@hooks.example.com/r",
            "https://evil.com@hooks.example.com/r",
            "ftp://hooks.example.com/r",
            "hooks.example.com/r",
            "https:///r",
            "http://127.0.0.2/cb",
        ] {
            assert!(check_callback(bad, &allowed).is_err(), "{bad}");
        }
        assert!(check_callback("https://hooks.example.com/r", &[]).is_err(), "nothing is allowed by default");
    }

    #[test]
    fn a_host_port_entry_allows_that_port_only() {
        let allowed = vec!["hooks.example.com:8443".to_string(), "[::1]:9000".to_string()];
        assert!(check_callback("https://hooks.example.com:8443/r", &allowed).is_ok());
        assert!(check_callback("https://HOOKS.example.com:8443/r", &allowed).is_ok());
        assert!(check_callback("http://[::1]:9000/cb", &allowed).is_ok());
        for bad in ["https://hooks.example.com/r", "https://hooks.example.com:9443/r", "http://[::1]:9001/cb", "http://[::1]/cb"] {
            assert!(check_callback(bad, &allowed).is_err(), "{bad}");
        }
    }
}
