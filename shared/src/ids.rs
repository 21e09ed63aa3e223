//! Identifiers both sides make, check or print: agent ids, plain ids (jobs, sessions,
//! pools) and hex. One definition each, so the edge, the Worker and the agent accept and
//! refuse exactly the same names.

/// Agent ids travel in URLs, logs and job envelopes: keep them short and plain.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A plain id of at most `max` bytes: letters, digits, `-` and `_`. Job ids (which
/// become file names on the agent), Claude session ids and pool names are plain ids.
pub fn plain_id(id: &str, max: usize) -> bool {
    !id.is_empty() && id.len() <= max && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// The pool of an edge's requests that name none, and of agents that name none
/// (`EDGE_POOL`).
pub const DEFAULT_POOL: &str = "default";
/// Longest pool name; a pool name is a plain id.
pub const MAX_POOL_NAME: usize = 64;

/// Longest job id anyone accepts.
pub const MAX_JOB_ID: usize = 128;

/// A job id as a log line or an answer may show it: itself if it is a plain id, else `-`.
/// What a peer sent in place of an id (newlines, control characters, megabytes) never
/// reaches a log.
pub fn shown_job_id(id: &str) -> &str {
    if plain_id(id, MAX_JOB_ID) {
        id
    } else {
        "-"
    }
}

/// Random bytes in an agent's instance id ([`crate::protocol::Hello::instance`]): enough
/// that two `DATA_DIR`s never draw the same.
pub const INSTANCE_ID_BYTES: usize = 16;

/// An agent's instance id as made from `random` ([`INSTANCE_ID_BYTES`] of them): lower-case hex.
pub fn instance_id(random: [u8; INSTANCE_ID_BYTES]) -> String {
    hex(&random)
}

/// An instance id the edge takes into its records and logs: 1-64 letters or digits. The
/// agent makes its own as [`instance_id`]; anything else in a signed hello is the agent's
/// bug, refused with the hello.
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_agent_id("spark-1.home_a"));
        assert!(!valid_agent_id("") && !valid_agent_id("a b") && !valid_agent_id(&"x".repeat(65)));
        assert!(plain_id("0190abc-def_1", MAX_JOB_ID));
        assert!(!plain_id("../x", MAX_JOB_ID) && !plain_id("a.b", 10) && !plain_id("abc", 2) && !plain_id("", 5));
        assert_eq!(hex(&[0, 1, 0xab, 0xff]), "0001abff");
        assert_eq!(shown_job_id("0190abc-def_1"), "0190abc-def_1");
        assert_eq!(shown_job_id("j1\n2026-01-01 INFO forged"), "-");
        assert!(valid_instance_id(&instance_id([0xab; INSTANCE_ID_BYTES])) && instance_id([0xab; INSTANCE_ID_BYTES]).len() == 32);
        assert!(!valid_instance_id("") && !valid_instance_id("a-b") && !valid_instance_id(&"a".repeat(65)));
    }
}
