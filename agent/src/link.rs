//! The current connection's keys (protocol 9, [`shared::link`]): what the agent sends is
//! MACed with its agent→edge key as it is queued, and the edge's result acknowledgements
//! are checked with its edge→agent key. One handle, shared by the agent and every job's
//! context; replaced at each connection's handshake. Between connections the last one's
//! keys stay: what is queued then is dropped at the next connection's start anyway
//! (results are in the spool and MACed again with the new key as they go out).
//!
//! A frame is queued only while the connection whose key MACed it is the current one
//! ([`Link::send`]): one MACed just before a reconnect's handshake and queued just after
//! it would fail its MAC on the new connection, and the edge would count the agent's own
//! words as a forgery from the path (`claude_runner_reports_refused_total`). On the
//! agent's one runtime thread a frame is made and queued with no yield in between, so
//! this holds by construction there; the check keeps it for any frame made off that
//! thread, or under a runtime with more threads (the agent had two until 7d208e4).

use shared::link::{LinkKeys, MacKey};
use shared::protocol::AgentMessage;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Default)]
pub struct Link(Arc<Mutex<Current>>);

#[derive(Default)]
struct Current {
    keys: Option<LinkKeys>,
    /// Counts the connections whose keys were set: which one a [`Sealed`] frame is for.
    connection: u64,
}

/// A frame MACed with one connection's key, for [`Link::send`].
pub struct Sealed {
    connection: u64,
    msg: AgentMessage,
}

impl Link {
    /// A link that is not an edge connection's (the local canary job's): fresh keys.
    pub fn local() -> Link {
        let keys = LinkKeys { agent_to_edge: MacKey::from_bytes(runtime::entropy()), edge_to_agent: MacKey::from_bytes(runtime::entropy()) };
        let link = Link::default();
        link.set(keys);
        link
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.0.lock().expect("link lock")
    }

    /// A new connection's keys, agreed in its handshake.
    pub fn set(&self, keys: LinkKeys) {
        let mut current = self.lock();
        current.keys = Some(keys);
        current.connection += 1;
    }

    /// The key the agent MACs its frames with on this connection, if there is one.
    pub fn mine(&self) -> Option<MacKey> {
        self.lock().keys.as_ref().map(|k| k.agent_to_edge.clone())
    }

    /// The key the edge MACs its frames with on this connection, if there is one.
    pub fn edges(&self) -> Option<MacKey> {
        self.lock().keys.as_ref().map(|k| k.edge_to_agent.clone())
    }

    /// A frame `make` MACs with this connection's key (outside the lock: a large result
    /// takes milliseconds), or `None` before the first connection.
    pub fn seal(&self, make: impl FnOnce(&MacKey) -> AgentMessage) -> Option<Sealed> {
        let (connection, key) = {
            let current = self.lock();
            (current.connection, current.keys.as_ref()?.agent_to_edge.clone())
        };
        Some(Sealed { connection, msg: make(&key) })
    }

    /// Queues a sealed frame, unless another connection's keys came since it was made
    /// (then it is dropped: it would fail its MAC there, and what it says is either sent
    /// again — a result, from the spool — or was about the connection that ended). The
    /// lock is held while it is queued, so a frame is queued before the next connection's
    /// keys are set (and dropped with the rest of the old queue) or not at all.
    pub fn send(&self, uplink: &UnboundedSender<AgentMessage>, sealed: Sealed) -> bool {
        self.send_with(vec![sealed], |msgs| msgs.into_iter().all(|msg| uplink.send(msg).is_ok()))
    }

    /// [`Link::send`] of frames that go together or not at all (a job's progress, on its
    /// queue, [`crate::uplink::JobProgress`]): `queue` is handed them while the lock is
    /// held, if all were made with the current connection's key.
    pub fn send_with(&self, sealed: Vec<Sealed>, queue: impl FnOnce(Vec<AgentMessage>) -> bool) -> bool {
        let current = self.lock();
        sealed.iter().all(|s| s.connection == current.connection) && queue(sealed.into_iter().map(|s| s.msg).collect())
    }

    /// [`Link::seal`] then [`Link::send`].
    pub fn seal_and_send(&self, uplink: &UnboundedSender<AgentMessage>, make: impl FnOnce(&MacKey) -> AgentMessage) -> bool {
        self.seal(make).is_some_and(|sealed| self.send(uplink, sealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::envelope::Domain;
    use shared::protocol::ResultReport;

    fn keys(n: u8) -> LinkKeys {
        LinkKeys { agent_to_edge: MacKey::from_bytes([n; 32]), edge_to_agent: MacKey::from_bytes([n + 100; 32]) }
    }

    fn result(key: &MacKey) -> AgentMessage {
        let report = ResultReport { job_id: "j1".into(), order_nonce: "j1:1".into(), result: Default::default() };
        AgentMessage::result_text(serde_json::to_string(&report).unwrap(), key)
    }

    /// The race of a job ending while the agent reconnects: its result MACed with the
    /// ended connection's key, the new connection's keys set (and the old queue dropped),
    /// then the result queued. It must not go out on the new connection, where the edge
    /// would refuse it as a forgery; the spool sends it there under the new key.
    #[test]
    fn a_frame_made_with_an_ended_connections_key_is_never_queued_on_the_next() {
        let (uplink, mut queued) = tokio::sync::mpsc::unbounded_channel();
        let link = Link::default();
        assert!(link.seal(result).is_none() && !link.seal_and_send(&uplink, result), "no connection yet");
        link.set(keys(1));
        let made_before = link.seal(result).unwrap();
        link.set(keys(2));
        assert!(!link.send(&uplink, made_before));
        assert!(queued.try_recv().is_err(), "a frame with the ended connection's MAC was queued");
        assert!(link.seal_and_send(&uplink, result));
        let Ok(AgentMessage::Result { envelope }) = queued.try_recv() else { panic!("the result, queued") };
        assert!(envelope.open::<ResultReport>(Domain::Result, &keys(2).agent_to_edge).is_ok(), "MACed with the current key");
    }
}
