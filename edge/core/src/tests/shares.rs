//! What every caller draws on — event streams, repeats waiting on jobs, the bytes of jobs
//! not ended, callbacks waiting — of which a caller with its own secret holds at most an
//! equal share among those who send jobs (the pool secret's callers as one, each named
//! caller): two of them at their shares still leave the operator and a third caller theirs.

use super::routing::{answer, pool_config, A_SECRET, B_SECRET};
use super::*;
use crate::http::Handled;

const C_SECRET: &str = "caller-c-secret-0123456789";
const CALLBACK: &str = "https://hooks.example.com/r";

/// Callers a, b and c with their own secrets; room pending for ten jobs of 4,000 bytes and
/// two of 517 (a 5-byte task).
fn three_callers() -> Config {
    Config {
        caller_secrets: vec![("a".into(), A_SECRET.into()), ("b".into(), B_SECRET.into()), ("c".into(), C_SECRET.into())],
        max_pending_bytes: 40_000 + 2 * 517,
        max_body_bytes: 8_192,
        max_retained_jobs: 100_000,
        ..pool_config()
    }
}

/// A request of `secret` (with idempotency key `key`), each with its own entropy.
fn send(edge: &mut Edge, secret: &str, method: &str, path: &str, key: Option<&str>, body: &Value) -> Handled {
    static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut entropy = [0; 16];
    entropy[..8].copy_from_slice(&SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes());
    let req = Request {
        method: method.into(),
        path: path.into(),
        secret_header: Some(secret.into()),
        authorization: None,
        idempotency_key: key.map(str::to_string),
        last_event_id: None,
        body: Body::Bytes(if body.is_null() { Vec::new() } else { body.to_string().into_bytes() }),
    };
    http::handle(edge, 1, entropy, &req)
}

/// Asserts a 429 `RUNNER_BUSY` that names `says`; its error.
fn assert_busy(h: &Handled, says: &str) -> String {
    let (status, body) = answer(h);
    assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(says), "says {says}: {body}");
    error.to_string()
}

/// `secret`'s caller takes its whole share of each: callbacks waiting (jobs with a
/// callback cancelled at once, their receiver never answering), streams following (one to
/// each of its small jobs, queued), the bytes of jobs not ended (4,000-byte jobs, queued),
/// then repeats waiting on those jobs — each until refused. The refusals, the first of each
/// kind.
fn take_every_share(edge: &mut Edge, secret: &str, name: &str) -> Vec<String> {
    let whose = format!("`{name}`");
    let mut refusals = Vec::new();
    loop {
        let h = send(edge, secret, "POST", "/jobs", None, &json!({"prompt": "t", "callback_url": CALLBACK}));
        if answer(&h).0 != 202 {
            refusals.push(assert_busy(&h, "callback"));
            break;
        }
        let id = answer(&h).1["job_id"].as_str().unwrap().to_string();
        assert_eq!(answer(&send(edge, secret, "DELETE", &format!("/jobs/{id}"), None, &Value::Null)).0, 202);
    }
    // Streams, one to a job — so the share in all, not a reader's part of one job (12 of
    // its 16), is what refuses — on small jobs, until refused.
    let small = json!({"prompt": "t"});
    let (mut jobs, mut streams) = (Vec::new(), 0);
    loop {
        let key = format!("{name}-small-{}", jobs.len());
        let h = send(edge, secret, "POST", "/jobs", Some(&key), &small);
        assert_eq!(answer(&h).0, 202, "{name}'s small job {}: {:?}", jobs.len(), answer(&h).1);
        let id = answer(&h).1["job_id"].as_str().unwrap().to_string();
        jobs.push((id.clone(), key, small.clone()));
        let h = send(edge, secret, "GET", &format!("/jobs/{id}/events"), None, &Value::Null);
        if h.reply != Reply::Stream {
            refusals.push(assert_busy(&h, &whose));
            break;
        }
        streams += 1;
        assert!(streams <= crate::progress::MAX_FOLLOWERS, "{name} took {streams} streams and was never refused");
    }
    let task = json!({"prompt": "x".repeat(3_488)});
    loop {
        let key = format!("{name}-{}", jobs.len());
        let h = send(edge, secret, "POST", "/jobs", Some(&key), &task);
        if answer(&h).0 != 202 {
            refusals.push(assert_busy(&h, "MAX_PENDING_BYTES"));
            break;
        }
        jobs.push((answer(&h).1["job_id"].as_str().unwrap().to_string(), key, task.clone()));
    }
    let (mut waiting, mut refused) = (0, false);
    for (_, key, task) in &jobs {
        for _ in 0..crate::machine::MAX_WAITERS_PER_JOB {
            let h = send(edge, secret, "POST", "/execute", Some(key), task);
            match answer_to(&h.effects, h.caller) {
                None => waiting += 1,
                Some(_) => {
                    let error = assert_busy(&h, &whose);
                    if !refused {
                        refusals.push(error);
                    }
                    refused = true;
                }
            }
        }
    }
    assert!(refused, "{name} had {waiting} repeats waiting and was never refused");
    refusals
}

/// The numbers `text` says, the paths it names (with their job ids) left out.
fn numbers_said(text: &str) -> std::collections::BTreeSet<u64> {
    let words = text.split_whitespace().filter(|word| !word.contains("/jobs/"));
    words.flat_map(|word| word.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect::<Vec<u64>>()).collect()
}

/// rev31-6: a caller with its own secret, refused at each of its shares — callbacks, the
/// bytes of its jobs, streams, repeats —, is told its own count and the bound, never how
/// many secrets share it nor (where it is not its own count) its share's number: both are
/// the bound divided among the secrets, and told either it could work out how many other
/// callers there are. The callbacks' refusal said "among the 4 secrets", the bytes' the
/// share (10258) and the secrets. (The queue's share, the cap divided among the owners
/// waiting: `routing::a_named_callers_queue_full_refusal_names_no_other_count`.)
#[test]
fn a_named_caller_at_its_shares_is_told_neither_how_many_secrets_share_them_nor_its_shares_number() {
    let cfg = three_callers();
    let secrets = crate::http::owners(&cfg) as u64;
    let bytes_share = crate::http::equal_share(cfg.max_pending_bytes, secrets as usize);
    let mut edge = Edge::new(cfg, 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(0, 0));
    let refusals = take_every_share(&mut edge, A_SECRET, "a");
    assert_eq!(refusals.len(), 4, "{refusals:#?}");
    for error in &refusals {
        let said = numbers_said(error);
        assert!(!said.contains(&secrets) && !said.contains(&bytes_share), "{said:?} in: {error}");
    }
}

/// Review rev10: each cap gave a caller with its own secret half of it, so callers a and
/// b at their halves left nothing to anyone else — the operator's stream of its own job
/// was refused, and so were c's, their repeats, a small job and a job with a callback.
/// Each holds an equal share instead.
#[test]
fn two_callers_at_their_shares_leave_the_operator_and_a_third_caller_theirs() {
    let mut edge = Edge::new(three_callers(), 0);
    // An agent without a free slot: jobs wait, and repeats wait on them.
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(0, 0));
    let early = json!({"prompt": "early"});
    let operators = [(SECRET, "the operator"), (C_SECRET, "c")];
    let mut jobs = Vec::new();
    for (secret, who) in operators {
        let (status, body) = answer(&send(&mut edge, secret, "POST", "/jobs", Some("early"), &early));
        assert_eq!(status, 202, "{who}: {body}");
        jobs.push(body["job_id"].as_str().unwrap().to_string());
    }
    take_every_share(&mut edge, A_SECRET, "a");
    take_every_share(&mut edge, B_SECRET, "b");
    // Every refusal is listed, not only the first.
    let mut refused = Vec::new();
    for ((secret, who), id) in operators.into_iter().zip(jobs) {
        let h = send(&mut edge, secret, "GET", &format!("/jobs/{id}/events"), None, &Value::Null);
        if h.reply != Reply::Stream {
            refused.push(format!("{who}'s stream of its job: {:?}", answer_to(&h.effects, h.caller)));
        }
        let h = send(&mut edge, secret, "POST", "/execute", Some("early"), &early);
        if let Some(answer) = answer_to(&h.effects, h.caller) {
            refused.push(format!("{who}'s repeat waiting on its job: {answer:?}"));
        }
        let (status, body) = answer(&send(&mut edge, secret, "POST", "/jobs", None, &json!({"prompt": "small"})));
        if status != 202 {
            refused.push(format!("{who}'s small job: {body}"));
        }
        let (status, body) = answer(&send(&mut edge, secret, "POST", "/jobs", None, &json!({"prompt": "t", "callback_url": CALLBACK})));
        if status != 202 {
            refused.push(format!("{who}'s job with a callback: {body}"));
        }
    }
    assert!(refused.is_empty(), "{refused:#?}");
}
