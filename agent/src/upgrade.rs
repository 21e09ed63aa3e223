//! The agent's proof on its dial of `/agent/connect` (`X-Runner-Agent-Proof`, signed with
//! `AGENT_SIGNING_KEY` for the pool: `shared::envelope::UpgradeProof`), without which the
//! edge gives no socket, and the edge's 401 refusal of it read into what to fix; the
//! agent's fresh nonce beside it (`X-Runner-Agent-Nonce`), and the check of the edge's
//! signature over it in the challenge ([`edge_proven`]), before the agent says anything
//! more. The agent's connection and `claude-runner doctor`'s probe both dial through here.

use ed25519_dalek::{SigningKey, VerifyingKey};
use shared::contract::{ErrorBody, ErrorCode};
use shared::envelope::{ChallengeProof, UpgradeProof, AGENT_NONCE_HEADER, AGENT_PROOF_HEADER};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Response};
use tokio_tungstenite::tungstenite::Error as WsError;

/// A fresh nonce for one dial: the edge signs it in its challenge ([`edge_proven`]), and
/// its welcome over it again.
pub fn nonce() -> String {
    shared::envelope::agent_nonce(runtime::entropy())
}

/// The upgrade request to `url` for `agent_id` of `pool`, carrying a proof made now and
/// `agent_nonce` ([`nonce`]) for the edge to sign.
pub fn request(url: &str, agent_id: &str, pool: &str, key: &SigningKey, agent_nonce: &str) -> Result<Request, WsError> {
    let mut request = url.into_client_request()?;
    let proof = UpgradeProof::sign(key, pool, agent_id, crate::now_ms());
    let value = HeaderValue::from_str(&proof).map_err(|e| WsError::HttpFormat(e.into()))?;
    request.headers_mut().insert(AGENT_PROOF_HEADER, value);
    let value = HeaderValue::from_str(agent_nonce).map_err(|e| WsError::HttpFormat(e.into()))?;
    request.headers_mut().insert(AGENT_NONCE_HEADER, value);
    Ok(request)
}

/// Whether the challenge that answered the dial of `url` carrying `agent_nonce` proves
/// the edge: `proof` must be `edge_key`'s signature over this challenge, this nonce,
/// this protocol and `pool` ([`ChallengeProof`]). Until it is, whoever answered is
/// anyone — a wrong EDGE_URL, a hop that ends TLS, a hijacked name — and is told nothing
/// (no hello: no labels, login, jobs, instance or mirrors). `Err` says what to check.
pub fn edge_proven(url: &str, proof: Option<&str>, edge_key: &VerifyingKey, challenge: &str, agent_nonce: &str, pool: &str) -> Result<(), String> {
    let protocol = shared::protocol::PROTOCOL_VERSION;
    match proof {
        Some(proof) if ChallengeProof::verify(proof, edge_key, protocol, challenge, agent_nonce, pool) => Ok(()),
        // The cause first: a close frame carries 123 bytes of it to the edge's log.
        Some(_) => Err(format!(
            "the challenge is not signed by the key in this agent's EDGE_PUBLIC_KEY for this dial (another key, or a signature \
             played back from another connection): whoever answered at {url} did not prove it is the edge, and was sent nothing. \
             Check that EDGE_URL points at your edge (not another server, a proxy that ends TLS, or a wrong DNS name) and that \
             EDGE_PUBLIC_KEY is the public half of the edge's EDGE_SIGNING_KEY, as printed by the `claude-runner keygen` run that \
             made it"
        )),
        None => Err(format!(
            "the challenge is unsigned: upgrade the edge (claude-runner-edge, or the Worker) to this agent's release — an older \
             edge does not prove its key before the agent's hello — or check that EDGE_URL points at your edge; whoever answered \
             at {url} was sent nothing"
        )),
    }
}

/// What a `401` to the dial of `url` means, for the operator: `None` for any other answer.
/// The edge's own words come first when its body says them (a JSON `error` with
/// `AGENT_PROOF_*`); they are whoever answered at `url`'s, unproven, so the caller bounds
/// them to a line. Without a body (cut, or not the edge's) it says what to check.
pub fn refused(url: &str, response: &Response<Option<Vec<u8>>>) -> Option<String> {
    if response.status().as_u16() != 401 {
        return None;
    }
    let said = response.body().as_deref().and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok());
    Some(match said {
        Some(body) if body.error_code == ErrorCode::AgentProofRequired => format!(
            "the edge at {url} answered 401 AGENT_PROOF_REQUIRED, though this agent sent its proof (the {AGENT_PROOF_HEADER} header): \
             something between the agent and the edge drops that header (a proxy?); let it through"
        ),
        Some(body) if body.error_code == ErrorCode::AgentProofInvalid => {
            format!("the edge at {url} refused this agent's proof (401 AGENT_PROOF_INVALID): {}", body.error)
        }
        _ => format!(
            "the edge at {url} answered 401: it did not take this agent's proof; check that AGENT_SIGNING_KEY matches this agent's \
             entry in the edge's AGENT_PUBLIC_KEYS, that EDGE_POOL names the pool EDGE_URL dials, and the clocks of both"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::contract::ApiError;
    use tokio_tungstenite::tungstenite::http;

    fn answer(status: u16, body: Option<Vec<u8>>) -> Response<Option<Vec<u8>>> {
        let mut response = http::Response::new(body);
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        response
    }

    fn body(code: ErrorCode, error: &str) -> Option<Vec<u8>> {
        Some(serde_json::to_vec(&ApiError::new(code, error).body).unwrap())
    }

    #[test]
    fn the_request_carries_a_proof_the_edges_check_takes() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let nonce = nonce();
        let request = request("ws://127.0.0.1:1/pool/gpu/agent/connect", "spark", "gpu", &key, &nonce).unwrap();
        assert_eq!(request.headers().get(AGENT_NONCE_HEADER).unwrap().to_str().unwrap(), nonce);
        assert!(shared::envelope::valid_agent_nonce(&nonce), "{nonce}");
        let proof = request.headers().get(AGENT_PROOF_HEADER).unwrap().to_str().unwrap();
        let parsed = UpgradeProof::parse(proof).unwrap();
        assert_eq!(parsed.agent_id, "spark");
        assert!(parsed.verify("gpu", &key.verifying_key()));
        assert!(!parsed.verify("default", &key.verifying_key()));
        assert!(parsed.issued_at.abs_diff(crate::now_ms()) < 60_000);
    }

    #[test]
    fn a_401_says_what_to_fix_and_anything_else_is_not_a_refusal_of_the_proof() {
        let url = "wss://edge.example/agent/connect";
        assert_eq!(refused(url, &answer(404, None)), None);
        assert_eq!(refused(url, &answer(403, body(ErrorCode::Unauthorized, "x"))), None);
        let invalid = refused(url, &answer(401, body(ErrorCode::AgentProofInvalid, "agent `spark`'s clock is 90 s behind"))).unwrap();
        assert!(invalid.contains("AGENT_PROOF_INVALID") && invalid.contains("90 s behind"), "{invalid}");
        let stripped = refused(url, &answer(401, body(ErrorCode::AgentProofRequired, "upgrade"))).unwrap();
        assert!(stripped.contains("drops that header"), "{stripped}");
        for unreadable in [None, Some(b"{\"succ".to_vec()), Some(b"<html>".to_vec())] {
            let why = refused(url, &answer(401, unreadable)).unwrap();
            assert!(why.contains("AGENT_SIGNING_KEY matches") && why.contains("clocks"), "{why}");
        }
    }
}
