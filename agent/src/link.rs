//! The current connection's keys (protocol 9, [`shared::link`]): what the agent sends is
//! MACed with its agent→edge key as it is queued, and the edge's result acknowledgements
//! are checked with its edge→agent key. One handle, shared by the agent and every job's
//! context; replaced at each connection's handshake. Between connections there is none:
//! what would be queued then is dropped at the next connection's start anyway (results
//! are in the spool and MACed again with the new key as they go out).

use shared::link::{LinkKeys, MacKey};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Link(Arc<Mutex<Option<LinkKeys>>>);

impl Link {
    /// A link that is not an edge connection's (the local canary job's): fresh keys.
    pub fn local() -> Link {
        let keys = LinkKeys { agent_to_edge: MacKey::from_bytes(runtime::entropy()), edge_to_agent: MacKey::from_bytes(runtime::entropy()) };
        let link = Link::default();
        link.set(keys);
        link
    }

    /// A new connection's keys, agreed in its handshake.
    pub fn set(&self, keys: LinkKeys) {
        *self.0.lock().expect("link lock") = Some(keys);
    }

    /// The key the agent MACs its frames with on this connection, if there is one.
    pub fn mine(&self) -> Option<MacKey> {
        self.0.lock().expect("link lock").as_ref().map(|k| k.agent_to_edge.clone())
    }

    /// The key the edge MACs its frames with on this connection, if there is one.
    pub fn edges(&self) -> Option<MacKey> {
        self.0.lock().expect("link lock").as_ref().map(|k| k.edge_to_agent.clone())
    }
}
