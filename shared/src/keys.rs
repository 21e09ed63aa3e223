//! Key encoding: every key is base64 (standard alphabet) of 32 bytes — an ed25519 seed for
//! a signing key, the point for a public key. `AGENT_PUBLIC_KEYS` is `id=key,id=key`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Says what kind of fault, never which character or where: the text may be a
    /// signing key, and on the Worker this error answers every request.
    #[error("{what} is not valid base64: {fault}; paste the value `claude-runner keygen` printed")]
    Base64 { what: &'static str, fault: &'static str },
    /// Without the length it has: that is a measure of what may be a secret.
    #[error("{what} is not 32 bytes once decoded, as every key is; paste the whole value `claude-runner keygen` printed")]
    Length { what: &'static str },
    #[error("{what} is not a valid ed25519 public key; paste the value `claude-runner keygen` printed")]
    Point { what: &'static str },
    /// Entries are named by their place (from 1), never shown: on the Worker this error
    /// answers every request, and a signing key pasted there by mistake would be shown.
    #[error("AGENT_PUBLIC_KEYS entry {entry} must look like `agent-id=base64key`")]
    Entry { entry: usize },
    #[error("AGENT_PUBLIC_KEYS entry {entry} does not start with an agent id: write it like `agent-id=base64key`, the id 1-64 letters, digits, `-`, `_` or `.`")]
    AgentId { entry: usize },
    #[error("AGENT_PUBLIC_KEYS names agent `{id}` twice")]
    Duplicate { id: String },
    #[error("AGENT_PUBLIC_KEYS is empty: add `agent-id=base64key` for each agent (see `claude-runner keygen`)")]
    Empty,
}

fn decode32(what: &'static str, text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|e| KeyError::Base64 { what, fault: base64_fault(&e) })?;
    bytes.as_slice().try_into().map_err(|_| KeyError::Length { what })
}

/// What is wrong with text that is not base64, without the symbol or the offset the
/// decoder's own message quotes.
fn base64_fault(e: &base64::DecodeError) -> &'static str {
    match e {
        base64::DecodeError::InvalidByte(..) => {
            "it holds a character base64 does not use (it takes A-Z, a-z, 0-9, + and /, with = only at the end; no spaces, quotes, - or _)"
        }
        base64::DecodeError::InvalidLength(_) => "its length is not one base64 text has: a character is missing or one too many",
        base64::DecodeError::InvalidLastSymbol(..) => "its last character before the = padding is not one a key ends with: it was cut or changed",
        base64::DecodeError::InvalidPadding => "its = padding at the end is missing or wrong",
    }
}

pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn decode(text: &str) -> Option<Vec<u8>> {
    STANDARD.decode(text).ok()
}

/// Parses a base64 seed (as in `EDGE_SIGNING_KEY`, `AGENT_SIGNING_KEY`).
pub fn signing_key(what: &'static str, text: &str) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&decode32(what, text)?))
}

/// Parses a base64 public key (as in `EDGE_PUBLIC_KEY`).
pub fn verifying_key(what: &'static str, text: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_bytes(&decode32(what, text)?).map_err(|_| KeyError::Point { what })
}

pub fn encode_signing(key: &SigningKey) -> String {
    encode(key.as_bytes())
}

pub fn encode_verifying(key: &VerifyingKey) -> String {
    encode(key.as_bytes())
}

use crate::ids::valid_agent_id;

/// The agents an edge accepts: `AGENT_PUBLIC_KEYS`.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: BTreeMap<String, VerifyingKey>,
}

impl Keyring {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        for (n, entry) in text.split([',', '\n']).map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            // A key pasted alone splits at its base64 padding into an "id" and nothing.
            let (id, key) = entry.split_once('=').filter(|(_, key)| !key.trim().is_empty()).ok_or(KeyError::Entry { entry: n + 1 })?;
            let id = id.trim();
            if !valid_agent_id(id) {
                return Err(KeyError::AgentId { entry: n + 1 });
            }
            let key = verifying_key("an AGENT_PUBLIC_KEYS key", key)?;
            if keys.insert(id.to_string(), key).is_some() {
                return Err(KeyError::Duplicate { id: id.to_string() });
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { keys })
    }

    pub fn from_keys(keys: impl IntoIterator<Item = (String, VerifyingKey)>) -> Self {
        Self { keys: keys.into_iter().collect() }
    }

    pub fn get(&self, agent_id: &str) -> Option<&VerifyingKey> {
        self.keys.get(agent_id)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn round_trips_keys() {
        let k = key(7);
        let text = encode_signing(&k);
        assert_eq!(signing_key("k", &text).unwrap().as_bytes(), k.as_bytes());
        let p = encode_verifying(&k.verifying_key());
        assert_eq!(verifying_key("p", &p).unwrap(), k.verifying_key());
    }

    #[test]
    fn rejects_bad_keys_with_guidance() {
        assert!(matches!(signing_key("k", "%%%"), Err(KeyError::Base64 { .. })));
        let short = encode(&[1u8; 31]);
        assert_eq!(signing_key("k", &short).unwrap_err(), KeyError::Length { what: "k" });
        assert!(signing_key("k", "").is_err());
    }

    #[test]
    fn parses_keyring() {
        let a = encode_verifying(&key(1).verifying_key());
        let b = encode_verifying(&key(2).verifying_key());
        let ring = Keyring::parse(&format!(" spark={a}, laptop-2={b} ")).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.get("spark"), Some(&key(1).verifying_key()));
        assert!(ring.get("other").is_none());
    }

    #[test]
    fn rejects_bad_keyrings() {
        let a = encode_verifying(&key(1).verifying_key());
        assert_eq!(Keyring::parse("").unwrap_err(), KeyError::Empty);
        assert!(matches!(Keyring::parse("spark"), Err(KeyError::Entry { .. })));
        assert!(matches!(Keyring::parse(&format!("../x={a}")), Err(KeyError::AgentId { .. })));
        assert!(matches!(Keyring::parse(&format!("a={a},a={a}")), Err(KeyError::Duplicate { .. })));
        assert!(Keyring::parse("a=AAAA").is_err());
    }

    /// A public key pasted without its `id=`: its base64 padding `=` split it into an "id"
    /// and an empty key, refused as "32 bytes once decoded, got 0", which names neither
    /// the entry's form nor what is missing.
    #[test]
    fn a_key_without_its_id_is_refused_as_an_entry_without_one() {
        let a = encode_verifying(&key(1).verifying_key());
        assert!(a.ends_with('='));
        for text in [a.clone(), format!("spark={a},{a}")] {
            let err = Keyring::parse(&text).unwrap_err();
            assert!(matches!(err, KeyError::Entry { .. }) && err.to_string().contains("agent-id=base64key"), "{text}: {err}");
        }
    }

    /// AGENT_PUBLIC_KEYS is a Worker secret, and on the Worker its error answers every
    /// request: a signing (private) key pasted there bare, with no `agent-id=` before it,
    /// was shown back whole as the "agent id" before its padding `=` (43 of its 44
    /// characters: all of the key), or as the entry when it has no padding. An entry is
    /// named by its place instead.
    #[test]
    fn a_key_pasted_without_its_agent_id_is_not_shown() {
        let spark = encode_verifying(&key(1).verifying_key());
        const PRIVATE: &str = "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=";
        for (text, entry) in [(format!("spark={spark},{PRIVATE}"), 2), (PRIVATE.trim_end_matches('=').to_string(), 1)] {
            let err = Keyring::parse(&text).unwrap_err().to_string();
            assert!(!err.contains(&PRIVATE[..12]), "{err}");
            assert!(err.starts_with(&format!("AGENT_PUBLIC_KEYS entry {entry} ")) && err.contains("agent-id=base64key"), "{err}");
        }
    }
}
