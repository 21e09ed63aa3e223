//! The agents' WebSockets, accepted with the hibernation API so the object can leave
//! memory while they stay open. Each socket carries its session id as its tag (how an
//! effect for a session finds its socket, in this instance or a later one) and the
//! session's record as its attachment (how a rebuilt machine gets its sessions back: the
//! record lives exactly as long as the connection).
//!
//! The attachment is the record's JSON text rather than a structured-clone object: JSON
//! keeps every `u64` exact and reads back with the same serde code as everywhere else.
//! Attachments are limited to 2,048 bytes, so a record too long for that loses the
//! agent's free-text fields (version, login problem) before it is stored.

use edge_core::session::Session;
use shared::protocol::close;
use worker::wasm_bindgen::JsValue;
use worker::{console_error, console_warn, State, WebSocket};

/// The attachment of a socket the edge has closed: a rebuild skips it even if the runtime
/// still lists it while the close handshake finishes.
const CLOSED: &str = "closed";
/// Serialized attachments may not exceed 2,048 bytes; keep a margin for the framing.
const ATTACHMENT_BUDGET: usize = 2_000;

pub struct Sockets<'a> {
    state: &'a State,
}

/// A socket already in hand (the one an event arrived on, or the one being accepted), so
/// effects for its session need no lookup.
pub type AtHand<'a> = Option<(&'a str, &'a WebSocket)>;

impl<'a> Sockets<'a> {
    pub fn new(state: &'a State) -> Sockets<'a> {
        Sockets { state }
    }

    /// Accepts a new agent connection for hibernation, tagged with its session id.
    pub fn accept(&self, ws: &WebSocket, session_id: &str) -> Result<(), String> {
        self.state
            .as_raw()
            .accept_websocket_with_tags(ws.as_ref(), vec![JsValue::from_str(session_id)])
            .map_err(js_text)
    }

    /// The session id a socket was tagged with.
    pub fn session_id(&self, ws: &WebSocket) -> Option<String> {
        self.state.as_raw().get_tags(ws.as_ref()).ok()?.into_iter().next()
    }

    fn find(&self, session_id: &str, at_hand: AtHand<'_>) -> Option<WebSocket> {
        if let Some((id, ws)) = at_hand {
            if id == session_id {
                return Some(ws.clone());
            }
        }
        let found = self.state.as_raw().get_websockets_with_tag(session_id).ok()?;
        found.into_iter().next().map(WebSocket::from)
    }

    pub fn send(&self, session_id: &str, text: &str, at_hand: AtHand<'_>) {
        match self.find(session_id, at_hand) {
            Some(ws) => {
                if let Err(e) = ws.send_with_str(text) {
                    console_warn!("session={session_id} send failed: {e}");
                }
            }
            None => console_warn!("session={session_id} has no open socket; message dropped"),
        }
    }

    pub fn close(&self, session_id: &str, code: u16, reason: &str, at_hand: AtHand<'_>) {
        if let Some(ws) = self.find(session_id, at_hand) {
            close_socket(&ws, code, reason);
        }
    }

    /// Keeps the session's record in its socket's attachment.
    pub fn save_session(&self, session: &Session, at_hand: AtHand<'_>) {
        let Some(ws) = self.find(&session.id, at_hand) else {
            console_warn!("session={} has no open socket; record not kept", session.id);
            return;
        };
        let stored = encode_session(session).and_then(|text| ws.serialize_attachment(text).map_err(|e| e.to_string()));
        if let Err(e) = stored {
            // The machine still has it; only a rebuild would see the older record.
            console_error!("session={} record not kept in its attachment: {e}", session.id);
        }
    }

    /// The sessions of the sockets still open, for rebuilding the machine, and the sockets
    /// whose record is missing or unreadable (by tag): the machine does not know those.
    pub fn restore(&self) -> (Vec<Session>, Vec<(String, WebSocket)>) {
        let sockets = match self.state.as_raw().get_websockets() {
            Ok(s) => s,
            Err(e) => {
                console_error!("listing the object's WebSockets failed: {}", js_text(e));
                return (Vec::new(), Vec::new());
            }
        };
        let (mut sessions, mut unknown) = (Vec::new(), Vec::new());
        for ws in sockets.into_iter().map(WebSocket::from) {
            let tag = self.session_id(&ws);
            match read_attachment(&ws, tag.as_deref()) {
                Restored::Session(session) => sessions.push(*session),
                Restored::Closed => {}
                Restored::Unreadable(why) => {
                    console_warn!("session={} has no usable record: {why}", tag.as_deref().unwrap_or("?"));
                    unknown.push((tag.unwrap_or_default(), ws));
                }
            }
        }
        (sessions, unknown)
    }
}

enum Restored {
    Session(Box<Session>),
    Closed,
    Unreadable(String),
}

fn read_attachment(ws: &WebSocket, tag: Option<&str>) -> Restored {
    let text = match ws.deserialize_attachment::<String>() {
        Ok(Some(text)) => text,
        Ok(None) => return Restored::Unreadable("it has no attachment".into()),
        Err(e) => return Restored::Unreadable(format!("its attachment is not a record: {e}")),
    };
    if text == CLOSED {
        return Restored::Closed;
    }
    match decode_session(&text, tag) {
        Ok(session) => Restored::Session(Box::new(session)),
        Err(why) => Restored::Unreadable(why),
    }
}

/// Closes a socket, marking it closed first (see [`CLOSED`]). Errors — the socket may be
/// closed already — are of no consequence.
pub fn close_socket(ws: &WebSocket, code: u16, reason: &str) {
    let _ = ws.serialize_attachment(CLOSED);
    if ws.close(Some(code), Some(close::reason(reason))).is_err() {
        let _ = ws.close(None, None::<&str>);
    }
}

/// The session record as attachment text, within the attachment budget: the record
/// whole, or the form of it that fits ([`Session::fitted`], which checks the size: free
/// text cut, as many mirror names as fit, …).
pub fn encode_session(session: &Session) -> Result<String, String> {
    let kept = |s: &Session| serde_json::to_string(s).ok().filter(|text| attachment_cost(text) <= ATTACHMENT_BUDGET);
    session.fitted(kept).ok_or_else(|| match serde_json::to_string(session) {
        Ok(whole) => format!("the record is {} bytes, over the 2,048-byte attachment limit", whole.len()),
        Err(e) => e.to_string(),
    })
}

/// Reads a record back, checking it belongs to the socket's tag.
pub fn decode_session(text: &str, tag: Option<&str>) -> Result<Session, String> {
    let session: Session = serde_json::from_str(text).map_err(|e| format!("its record does not read ({e})"))?;
    if tag != Some(session.id.as_str()) {
        return Err(format!("its record is for session {} but it is tagged {}", session.id, tag.unwrap_or("(none)")));
    }
    Ok(session)
}

/// Bytes the runtime's serializer uses for this string: one per character when all are
/// Latin-1, else two per UTF-16 unit.
fn attachment_cost(text: &str) -> usize {
    if text.chars().all(|c| (c as u32) < 256) {
        text.chars().count()
    } else {
        text.encode_utf16().count() * 2
    }
}

fn js_text(value: JsValue) -> String {
    value.as_string().unwrap_or_else(|| format!("{value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::session::{Agent, Phase};
    use shared::oauth::OAuthReport;

    fn ready(problem: &str) -> Session {
        Session {
            id: "0011223344556677".into(),
            source: "2001:db8:1:2::/64".into(),
            connected_at: u64::MAX - 1,
            last_seen: 1_700_000_000_000,
            arriving: None,
            waiting: None,
            phase: Phase::Ready(Agent {
                agent_id: "spark".into(),
                version: "1.2.3".into(),
                capacity: 2,
                slots: shared::protocol::Slots { free: 1, received: 3 },
                sent: 4,
                // A real challenge's length.
                challenge: "c".repeat(32),
                keys: shared::link::LinkKeys::derive(&[1; 32], &shared::link::Transcript { challenge: "c", agent_nonce: "n", agent_public: "a", edge_public: "e", agent_id: "spark", pool: "default" }),
                beat: u64::MAX - 1,
                oauth: OAuthReport { problem: Some(problem.into()), ..OAuthReport::unconfigured(5) },
                // As long as the core lets it be, in the costliest characters.
                claude_version: Some("😀".repeat(shared::protocol::MAX_CLAUDE_VERSION_BYTES / 4)),
                usage_hold_until: None,
                login: None,
                labels: Default::default(),
                mirrors: Default::default(),
                paused: false,
                stopping: false,
                cannot_start: None,
                // As an agent makes it: the record keeps it in every form.
                instance: Some(shared::ids::instance_id([0xff; shared::ids::INSTANCE_ID_BYTES])),
                unproven: 0,
                lost_after_ms: Some(30_000),
            }),
        }
    }

    #[test]
    fn the_most_labels_fit_and_mirrors_are_cut_first() {
        // As many labels as an agent may offer (512 bytes of keys and values), a full list
        // of mirrors, a paused agent in the middle of a relayed login, the costliest
        // version string: the labels and the pause stay, the mirrors are cut to what fits.
        let mut session = relaying(&"😀".repeat(shared::protocol::MAX_CLAUDE_VERSION_BYTES / 4));
        let agent = session.agent_mut().unwrap();
        agent.labels = (0..8).map(|i| (format!("key{i:02}-{}", "k".repeat(26)), "v".repeat(32))).collect();
        shared::placement::check_labels(&agent.labels).expect("within the labels' bounds");
        agent.mirrors = (0..shared::placement::MAX_MIRRORS).map(|i| format!("github.com/owner/repository-{i}")).collect();
        agent.paused = true;
        // The longest reason it cannot start jobs the edge keeps, in costly characters.
        agent.cannot_start = Some(shared::text::peer_words(&"é".repeat(shared::text::MAX_PEER_WORDS_BYTES)));
        let text = encode_session(&session).expect("fits");
        assert!(attachment_cost(&text) <= ATTACHMENT_BUDGET);
        let back = decode_session(&text, Some("0011223344556677")).unwrap();
        let agent = back.agent().unwrap();
        assert_eq!(agent.labels, session.agent().unwrap().labels);
        assert!(agent.paused && agent.mirrors.len() < shared::placement::MAX_MIRRORS);
        assert!(agent.cannot_start.is_some(), "an agent that cannot start jobs takes work after an eviction");
        assert!(agent.mirrors.iter().zip(&session.agent().unwrap().mirrors).all(|(a, b)| a == b), "the first by name");
        assert_eq!(agent.keys, session.agent().unwrap().keys, "the connection's keys survive what the session survives");
        // A few mirrors fit whole.
        let mut small = ready("none");
        small.agent_mut().unwrap().mirrors = ["github.com/acme/api".to_string()].into();
        let text = encode_session(&small).unwrap();
        assert_eq!(decode_session(&text, Some("0011223344556677")).unwrap(), small);
    }

    /// Repository affinity outlives the object's eviction: a record whose mirror names
    /// passed the attachment's budget lost them all (some 30 names of 31 characters did),
    /// and the agent tells them again only when its set changes. As many as fit are kept,
    /// the first by name.
    #[test]
    fn a_long_mirror_list_is_cut_to_what_fits_not_dropped() {
        let mut session = ready("none");
        session.agent_mut().unwrap().claude_version = Some("2.1.197 (Claude Code)".into());
        let names: Vec<String> = (0..60).map(|i| format!("github.com/acme-corp/service-{i:02}")).collect();
        assert_eq!(names[0].len(), 31);
        session.agent_mut().unwrap().mirrors = names.iter().cloned().collect();
        let text = encode_session(&session).unwrap();
        assert!(attachment_cost(&text) <= ATTACHMENT_BUDGET);
        let back = decode_session(&text, Some("0011223344556677")).unwrap();
        let kept: Vec<&String> = back.agent().unwrap().mirrors.iter().collect();
        assert!(kept.len() >= 30, "{} of 60 mirror names kept", kept.len());
        assert!(kept.iter().zip(&names).all(|(k, n)| *k == n), "the first by name are kept: {kept:?}");
        // As many as fit: one more would not.
        let mut more = back.clone();
        more.agent_mut().unwrap().mirrors.insert(names[kept.len()].clone());
        assert!(attachment_cost(&serde_json::to_string(&more).unwrap()) > ATTACHMENT_BUDGET);
        // Everything else is whole.
        let mut whole = back.clone();
        whole.agent_mut().unwrap().mirrors = session.agent().unwrap().mirrors.clone();
        assert_eq!(whole, session);
    }

    /// A ready session in the middle of a relayed login, with a usage window reported.
    fn relaying(claude_version: &str) -> Session {
        let mut s = ready("none");
        let agent = s.agent_mut().unwrap();
        agent.claude_version = Some(claude_version.into());
        agent.usage_hold_until = Some(u64::MAX - 1);
        agent.oauth.usage = Some(shared::usage::UsageWindow {
            status: shared::usage::UsageStatus::Rejected,
            kind: Some("seven_day_overage_included".into()),
            resets_at: Some(1_796_150_081_000),
            utilization: Some(0.999),
            seen_at: 1_796_150_000_000,
        });
        // As long as a real one (about 450 characters), and more.
        let url = format!("https://claude.com/cai/oauth/authorize?code=true&{}", "x".repeat(600));
        agent.login = Some(edge_core::session::LoginRelay {
            id: "0123456789abcdef".into(),
            url: Some(url),
            // As long as a real one (a time and an ed25519 signature, base64url).
            url_proof: Some(format!("1796150000000.{}", "A".repeat(86))),
            awaiting_code: true,
            code_sent: false,
            started_at: u64::MAX - 1,
            expires_at: u64::MAX - 1,
        });
        s
    }

    #[test]
    fn a_relayed_login_keeps_its_url_or_at_least_its_state() {
        let session = relaying("2.1.197 (Claude Code)");
        let text = encode_session(&session).unwrap();
        assert!(attachment_cost(&text) <= ATTACHMENT_BUDGET);
        assert_eq!(decode_session(&text, Some("0011223344556677")).unwrap(), session, "a real record fits whole");
        // With the costliest version string the URL goes, the relay stays.
        let session = relaying(&"😀".repeat(shared::protocol::MAX_CLAUDE_VERSION_BYTES / 4));
        let text = encode_session(&session).unwrap();
        assert!(attachment_cost(&text) <= ATTACHMENT_BUDGET);
        let back = decode_session(&text, Some("0011223344556677")).unwrap();
        let login = back.agent().unwrap().login.clone().unwrap();
        assert!(login.url.is_none() && login.url_proof.is_none() && login.awaiting_code && login.id == "0123456789abcdef");
    }

    #[test]
    fn records_round_trip_exactly() {
        let session = ready("none");
        let text = encode_session(&session).unwrap();
        assert_eq!(decode_session(&text, Some("0011223344556677")).unwrap(), session);
        // Between challenge and hello the edge's X25519 key waits in the record.
        let challenged = Session {
            phase: Phase::Challenged { nonce: "c".repeat(32), ephemeral: shared::link::Ephemeral::new([8; 32]) },
            ..ready("none")
        };
        let text = encode_session(&challenged).unwrap();
        assert_eq!(decode_session(&text, Some("0011223344556677")).unwrap(), challenged);
        // A record without its keys (a protocol-8 edge's) is no session.
        let mut old: serde_json::Value = serde_json::from_str(&encode_session(&session).unwrap()).unwrap();
        old["phase"].as_object_mut().unwrap().remove("keys");
        assert!(decode_session(&old.to_string(), Some("0011223344556677")).is_err());
    }

    #[test]
    fn a_record_must_match_its_tag() {
        let text = encode_session(&ready("x")).unwrap();
        assert!(decode_session(&text, Some("ffff")).is_err());
        assert!(decode_session(&text, None).is_err());
        assert!(decode_session("{\"not\":1}", Some("0011223344556677")).is_err());
        assert!(decode_session(CLOSED, Some("0011223344556677")).is_err());
    }

    #[test]
    fn long_free_text_is_shortened_to_fit() {
        let text = encode_session(&ready(&"é".repeat(5000))).unwrap();
        assert!(attachment_cost(&text) <= ATTACHMENT_BUDGET);
        let back = decode_session(&text, Some("0011223344556677")).unwrap();
        assert_eq!(back.agent().unwrap().oauth.problem.as_ref().unwrap().len(), 300);
        let text = encode_session(&ready(&"😀".repeat(5000))).unwrap();
        assert!(attachment_cost(&text) <= ATTACHMENT_BUDGET);
    }
}
