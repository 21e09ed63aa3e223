//! `claude-runner keygen`: the two key pairs (edge, agent) and a runner secret, printed
//! with where each goes.

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use shared::keys::{encode_signing, encode_verifying};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeySet {
    pub edge_signing_key: String,
    pub edge_public_key: String,
    pub agent_signing_key: String,
    pub agent_public_key: String,
}

pub use runtime::entropy as random_bytes;

pub fn runner_secret() -> String {
    shared::ids::hex(&random_bytes::<32>())
}

impl KeySet {
    pub fn generate() -> KeySet {
        let edge = SigningKey::from_bytes(&random_bytes());
        let agent = SigningKey::from_bytes(&random_bytes());
        KeySet {
            edge_signing_key: encode_signing(&edge),
            edge_public_key: encode_verifying(&edge.verifying_key()),
            agent_signing_key: encode_signing(&agent),
            agent_public_key: encode_verifying(&agent.verifying_key()),
        }
    }
}

/// How `keygen` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Grouped by where each value goes, with the `wrangler secret put` lines.
    Text,
    /// The four keys as one JSON object, for scripts.
    Json,
    /// `NAME=value` lines to append to docker-compose's `.env` (later lines win there),
    /// for an edge and an agent on the same machine (the compose file's tunnel mode).
    Env,
}

pub fn print(keys: &KeySet, agent_id: &str, format: Format) {
    let secret = runner_secret();
    match format {
        Format::Text => {}
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(keys).expect("keys serialise"));
            return;
        }
        Format::Env => {
            println!(
                "# made by `claude-runner keygen --env`; keep this file private
RUNNER_SECRET={secret}
EDGE_SIGNING_KEY={}
AGENT_PUBLIC_KEYS={agent_id}={}
AGENT_ID={agent_id}
AGENT_SIGNING_KEY={}
EDGE_PUBLIC_KEY={}",
                keys.edge_signing_key, keys.agent_public_key, keys.agent_signing_key, keys.edge_public_key
            );
            return;
        }
    }
    println!("{}", grouped(keys, agent_id, &secret));
}

/// The text form: each value under where it goes.
fn grouped(keys: &KeySet, agent_id: &str, secret: &str) -> String {
    format!(
        "# ── On the edge (claude-runner-edge environment, or Worker secrets) ──
RUNNER_SECRET={secret}
EDGE_SIGNING_KEY={edge_signing}
AGENT_PUBLIC_KEYS={agent_id}={agent_public}

# Cloudflare Worker: the same three as secrets
echo '{secret}' | npx wrangler secret put RUNNER_SECRET
echo '{edge_signing}' | npx wrangler secret put EDGE_SIGNING_KEY
echo '{agent_id}={agent_public}' | npx wrangler secret put AGENT_PUBLIC_KEYS

# ── On Spark (claude-runner agent environment) ──
AGENT_ID={agent_id}
AGENT_SIGNING_KEY={agent_signing}
EDGE_PUBLIC_KEY={edge_public}
EDGE_URL=wss://<your edge host>

# ── Callers (sandbox-executor, curl) ──
X-Runner-Secret: {secret}

# Keep EDGE_SIGNING_KEY and AGENT_SIGNING_KEY secret; the public keys may be shared.
# Several agents in one pool: run keygen again for each other agent and take only its
# AGENT_ID, AGENT_SIGNING_KEY and AGENT_PUBLIC_KEYS entry (joined to the edge's with a
# comma); every agent keeps the first run's EDGE_PUBLIC_KEY: the edge has one signing key.",
        edge_signing = keys.edge_signing_key,
        edge_public = keys.edge_public_key,
        agent_signing = keys.agent_signing_key,
        agent_public = keys.agent_public_key,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Run keygen per agent and join their entries" gave each later agent the
    /// EDGE_PUBLIC_KEY of an edge key nobody set, so it refused the edge; the hint says
    /// which values of a later run to use and which to keep.
    #[test]
    fn the_hint_for_more_agents_keeps_the_edges_key() {
        let text = grouped(&KeySet::generate(), "spark", "s");
        let hint = text.lines().skip_while(|l| !l.contains("Several agents")).collect::<Vec<_>>().join(" ");
        assert!(hint.contains("AGENT_PUBLIC_KEYS") && hint.contains("EDGE_PUBLIC_KEY") && hint.contains("first"), "{hint}");
    }

    #[test]
    fn generated_keys_pair_up() {
        let k = KeySet::generate();
        let edge = shared::keys::signing_key("e", &k.edge_signing_key).unwrap();
        assert_eq!(encode_verifying(&edge.verifying_key()), k.edge_public_key);
        let agent = shared::keys::signing_key("a", &k.agent_signing_key).unwrap();
        assert_eq!(encode_verifying(&agent.verifying_key()), k.agent_public_key);
        assert_ne!(k.edge_signing_key, k.agent_signing_key);
        assert_eq!(runner_secret().len(), 64);
    }
}
