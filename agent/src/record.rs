//! The format of the agent's slot records (`DATA_DIR/records/<n>`): one file per job slot,
//! overwritten in place, so a job's durable records cost a write and an `fdatasync`
//! into blocks the file already has, instead of creating, syncing and deleting a file.
//!
//! A record file has two regions, each one framed record:
//!
//! - at [`STARTED_AT`], "started": the job and its order's nonce, synced before Claude
//!   gets its prompt; zeroed ([`CLEARED`]) once the edge acknowledged the job's result;
//! - at [`RESULT_AT`], "result": the job's signed result, synced while it travels.
//!
//! The result goes beside the started record, never over it: until the result is durable
//! the started record says the job ran, so a power cut in the middle of writing the result
//! still reports the job lost instead of forgetting it.
//!
//! A frame is `magic (4) | kind (1) | length (4, LE) | checksum (8) | payload`, the
//! checksum the first 8 bytes of SHA-256 over kind, length and payload; the payload is
//! JSON. What a torn write (a power cut mid-write) or any other damage means:
//!
//! - a started region that does not decode ([`Region::Torn`]): the write that made it
//!   was never synced — Claude gets its prompt only after the sync — so that job never
//!   ran; or it is a clear (after the acknowledgement) cut short. Either way nothing is
//!   owed: the slot is free. The record it overwrote needed nothing either: a slot is
//!   reused only once its result is acknowledged or moved to a spool file;
//! - a result region that does not decode, or holds another job's result: the result
//!   never became durable, so the started record's job is reported lost (as when the
//!   agent dies while Claude runs) — if the edge got the result before, it ignores that;
//! - a file without the magic (empty, cleared, or not ours): nothing.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the started record goes; it must fit before [`RESULT_AT`].
pub const STARTED_AT: u64 = 0;
/// Where the result record goes: one page after the started one, so writing one never
/// touches the other's blocks.
pub const RESULT_AT: u64 = 4096;
/// What a clear writes over a started record's magic: the file keeps its blocks.
pub const CLEARED: [u8; 4] = [0; 4];

const MAGIC: &[u8; 4] = b"CRr1";
const HEADER: usize = 4 + 1 + 4 + 8;
/// Larger than any result the agent writes (a WebSocket frame's worth); a length beyond
/// it is damage, refused before anything is allocated for it.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

const STARTED: u8 = 1;
const RESULT: u8 = 2;

/// A job whose Claude may have started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub job_id: String,
    pub order_nonce: String,
}

/// A job's result, as sent (a signed envelope, kept as its JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub job_id: String,
    pub order_nonce: String,
    pub envelope: serde_json::Value,
}

/// What one region of a record file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Region {
    /// No record: never written, cleared, or not the agent's.
    Empty,
    /// A record whose frame or checksum is wrong: a torn write or damage (see the module).
    Torn,
    Started(Started),
    Finished(Finished),
}

/// The framed bytes of a started record.
pub fn started(record: &Started) -> Vec<u8> {
    frame(STARTED, &serde_json::to_vec(record).expect("a started record serialises"))
}

/// The framed bytes of a result record.
pub fn finished(record: &Finished) -> Vec<u8> {
    frame(RESULT, &serde_json::to_vec(record).expect("a result record serialises"))
}

fn checksum(kind: u8, payload: &[u8]) -> [u8; 8] {
    let mut hash = Sha256::new();
    hash.update([kind]);
    hash.update((payload.len() as u32).to_le_bytes());
    hash.update(payload);
    hash.finalize()[..8].try_into().expect("8 bytes")
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(kind, payload));
    out.extend_from_slice(payload);
    out
}

/// How many bytes the record starting with `header` (its first bytes) needs in all, or
/// `None` when there is no record or it cannot be one.
pub fn length(header: &[u8]) -> Option<usize> {
    if header.len() < HEADER || &header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
    (len <= MAX_PAYLOAD).then_some(HEADER + len)
}

/// How much to read first: the header.
pub const HEADER_BYTES: usize = HEADER;

/// Decodes a region from its bytes (at least the whole record; more is ignored).
pub fn decode(bytes: &[u8]) -> Region {
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        return Region::Empty;
    }
    let Some(total) = length(bytes) else { return Region::Torn };
    if bytes.len() < total {
        return Region::Torn;
    }
    let kind = bytes[4];
    let payload = &bytes[HEADER..total];
    if bytes[9..17] != checksum(kind, payload) {
        return Region::Torn;
    }
    let plain = |id: &str| shared::ids::plain_id(id, shared::ids::MAX_JOB_ID);
    match kind {
        STARTED => match serde_json::from_slice::<Started>(payload) {
            Ok(r) if plain(&r.job_id) => Region::Started(r),
            _ => Region::Torn,
        },
        RESULT => match serde_json::from_slice::<Finished>(payload) {
            Ok(r) if plain(&r.job_id) => Region::Finished(r),
            _ => Region::Torn,
        },
        _ => Region::Torn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_start() -> Started {
        Started { job_id: "job-1".into(), order_nonce: "job-1:7".into() }
    }

    fn a_result() -> Finished {
        Finished { job_id: "job-1".into(), order_nonce: "job-1:7".into(), envelope: serde_json::json!({"payload": "{}", "signature": "x"}) }
    }

    #[test]
    fn records_read_back_as_written_with_anything_after_them() {
        let mut bytes = started(&a_start());
        assert_eq!(decode(&bytes), Region::Started(a_start()));
        bytes.extend_from_slice(b"old bytes of a longer record before");
        assert_eq!(decode(&bytes), Region::Started(a_start()));
        assert_eq!(decode(&finished(&a_result())), Region::Finished(a_result()));
        assert_eq!(length(&bytes[..HEADER_BYTES]), Some(started(&a_start()).len()));
    }

    /// A power cut leaves any prefix of the new bytes over the old ones: every such mix
    /// reads as the new record only when it is whole, else as torn or empty — never as
    /// some other job.
    #[test]
    fn a_torn_write_over_an_older_record_is_never_read_as_a_record() {
        let old = finished(&Finished { job_id: "older-job".into(), order_nonce: "older-job:1".into(), envelope: serde_json::json!("x".repeat(300)) });
        let new = started(&a_start());
        for cut in 0..new.len() {
            let mut disk = old.clone();
            disk[..cut].copy_from_slice(&new[..cut]);
            let region = decode(&disk);
            if cut <= 4 {
                // The same magic: the old bytes, still whole.
                assert_eq!(region, Region::Finished(decode_finished(&old)), "cut at {cut}");
            } else {
                // Kind, length or checksum no longer match the bytes: no record.
                assert_eq!(region, Region::Torn, "cut at {cut}");
            }
        }
        let mut whole = old.clone();
        whole[..new.len()].copy_from_slice(&new);
        assert_eq!(decode(&whole), Region::Started(a_start()));
        // A cleared record (its magic zeroed) is empty, however much of the rest stays.
        let mut cleared = new.clone();
        cleared[..4].copy_from_slice(&CLEARED);
        assert_eq!(decode(&cleared), Region::Empty);
        // Half a clear: not a record either.
        cleared[..4].copy_from_slice(b"CR\0\0");
        assert_eq!(decode(&cleared), Region::Empty);
    }

    fn decode_finished(bytes: &[u8]) -> Finished {
        match decode(bytes) {
            Region::Finished(f) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damaged_foreign_and_hostile_bytes_are_refused() {
        let good = started(&a_start());
        // Any single flipped bit after the magic: torn.
        for i in 4..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert_eq!(decode(&bad), Region::Torn, "byte {i} bit {bit}");
            }
        }
        assert_eq!(decode(b""), Region::Empty);
        assert_eq!(decode(b"{\"job_id\":\"x\"}"), Region::Empty, "an older agent's JSON is not a record");
        assert_eq!(decode(&[0; 4096]), Region::Empty);
        // A length beyond any record: refused before anything is read for it.
        let mut huge = good.clone();
        huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(length(&huge), None);
        assert_eq!(decode(&huge), Region::Torn);
        // Truncated: torn.
        assert_eq!(decode(&good[..good.len() - 1]), Region::Torn);
        // Well framed, but a job id that is not plain (it names files): refused.
        let evil = started(&Started { job_id: "../evil".into(), order_nonce: "n".into() });
        assert_eq!(decode(&evil), Region::Torn);
        // Well framed, an unknown kind: refused.
        let mut unknown = good.clone();
        unknown[4] = 9;
        let payload = unknown[HEADER..].to_vec();
        unknown[9..17].copy_from_slice(&checksum(9, &payload));
        assert_eq!(decode(&unknown), Region::Torn);
    }
}
