//! Who may follow a job (`GET /jobs/{id}/events`): the places of a job and of the edge are
//! parted between the readers — the pool's secret (the operator's) and a caller's own — so
//! that a caller holding its job's secret cannot lock the operator out of following it
//! (review rev36a-4). The bounds per job and in all stay.

use super::routing::{answer, pool_config, request, submit, A_SECRET};
use super::*;
use crate::http::{Handled, Reply};
use crate::progress::{MAX_FOLLOWERS, MAX_FOLLOWERS_PER_JOB, OPERATOR_FOLLOWERS};

fn follow(edge: &mut Edge, secret: &str, job: &str) -> Handled {
    request(edge, 5, secret, "GET", &format!("/jobs/{job}/events"), Value::Null)
}

/// Whether `stream`'s follow was taken; panics with the answer if it was not.
fn taken(h: &Handled) -> bool {
    assert_eq!(h.reply, Reply::Stream, "refused: {:?}", answer_to(&h.effects, h.caller));
    true
}

/// Caller a opens as many streams of its job as the job takes; the operator (the pool's
/// secret) still follows it, with its own places, and the job holds no more streams than
/// its bound.
#[test]
fn a_caller_cannot_lock_the_operator_out_of_following_its_job() {
    let mut edge = Edge::new(pool_config(), 0);
    let job = submit(&mut edge, 1, A_SECRET, json!({"prompt": "a's"}));
    for _ in 0..MAX_FOLLOWERS_PER_JOB {
        follow(&mut edge, A_SECRET, &job);
    }
    for _ in 0..OPERATOR_FOLLOWERS {
        taken(&follow(&mut edge, SECRET, &job));
    }
    assert_eq!(edge.callers_waiting(), MAX_FOLLOWERS_PER_JOB, "the job's bound holds");
}

/// Caller a holds its share of all streams on its other jobs; the operator still follows
/// the one a shares it with: the operator's streams are not counted in a's share.
#[test]
fn a_caller_at_its_share_cannot_lock_the_operator_out_of_its_jobs() {
    let mut edge = Edge::new(pool_config(), 0);
    let (mut held, mut i) = (0, 0);
    let mut jobs = Vec::new();
    // Until a is refused for its share (21 of 64 with a, b and the pool secret).
    loop {
        let job = submit(&mut edge, 10 + i, A_SECRET, json!({"prompt": format!("a{i}")}));
        i += 1;
        let h = follow(&mut edge, A_SECRET, &job);
        jobs.push(job);
        if h.reply != Reply::Stream {
            let (status, body) = answer(&h);
            assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{body}");
            let error = body["error"].as_str().unwrap();
            assert!(error.contains("`a`") && error.contains("equal share"), "says whose streams and why: {error}");
            assert!(error.contains("GET /jobs/"), "says what to do: {error}");
            break;
        }
        held += 1;
        assert!(held <= MAX_FOLLOWERS, "a was never refused");
    }
    assert_eq!(held, MAX_FOLLOWERS / 3, "a holds its share");
    for job in &jobs {
        taken(&follow(&mut edge, SECRET, job));
    }
}

/// A reader at its part of a job is refused (429), told whose streams fill it and what
/// to do; the others' parts stay theirs: a's streams of its job leave the operator its
/// places, and the operator's leave a its own.
#[test]
fn a_reader_at_its_part_of_a_job_is_refused_and_the_other_keeps_its_own() {
    let mut edge = Edge::new(pool_config(), 0);
    let job = submit(&mut edge, 1, A_SECRET, json!({"prompt": "a's"}));
    let mut held = Vec::new();
    let refused = loop {
        let h = follow(&mut edge, A_SECRET, &job);
        if h.reply != Reply::Stream {
            break h;
        }
        held.push(h.caller);
    };
    assert_eq!(held.len(), MAX_FOLLOWERS_PER_JOB - OPERATOR_FOLLOWERS);
    let (status, body) = answer(&refused);
    assert_eq!((status, body["error_code"].as_str(), body["job_id"].as_str()), (429, Some("RUNNER_BUSY"), Some(job.as_str())), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("`a`") && error.contains(&format!("GET /jobs/{job}")) && error.contains("close one"), "{error}");
    assert!(!error.contains(&OPERATOR_FOLLOWERS.to_string()), "tells a the operator's places: {error}");
    // The operator's places, to the job's bound, and not one past it.
    for _ in 0..OPERATOR_FOLLOWERS {
        taken(&follow(&mut edge, SECRET, &job));
    }
    let (status, body) = answer(&follow(&mut edge, SECRET, &job));
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&format!("GET /jobs/{job}")), "{body}");
    assert_eq!(edge.callers_waiting(), MAX_FOLLOWERS_PER_JOB, "the job's bound holds");
    // One of a's that leaves makes room for a's next, not for the operator's.
    edge.caller_gone(6, held[0]);
    assert_eq!(answer(&follow(&mut edge, SECRET, &job)).0, 429);
    taken(&follow(&mut edge, A_SECRET, &job));
}

/// The bounds stay: with as many callers with their own secrets as the edge's streams allow
/// each a place or two, they together leave the operator its own places in all, and the
/// streams never pass the edge's bound, whatever the readers do.
#[test]
fn callers_together_leave_the_operator_its_places_and_the_bounds_hold() {
    // 31 callers: a share of 2 each, 62 together; 70: a share of 1 each (at least one), 70.
    for callers in [31, 70] {
        callers_leave_the_operator_its_places(callers);
    }
}

fn callers_leave_the_operator_its_places(callers: usize) {
    let names: Vec<(String, String)> = (0..callers).map(|i| (format!("c{i}"), format!("caller-{i:02}-secret-0123456789"))).collect();
    let mut edge = Edge::new(Config { caller_secrets: names.clone(), ..pool_config() }, 0);
    let mut refused = 0;
    for (i, (_, secret)) in names.iter().enumerate() {
        let job = submit(&mut edge, 10 + i as u64, secret, json!({"prompt": "x"}));
        for _ in 0..4 {
            let h = follow(&mut edge, secret, &job);
            if h.reply != Reply::Stream {
                assert_eq!(answer(&h).0, 429);
                refused += 1;
            }
            assert!(edge.callers_waiting() <= MAX_FOLLOWERS);
        }
    }
    assert!(refused > 0, "the callers were never refused");
    let held = edge.callers_waiting();
    assert!(held < MAX_FOLLOWERS, "the callers took every stream ({held})");
    let mine = submit(&mut edge, 2, SECRET, json!({"prompt": "mine"}));
    for _ in 0..MAX_FOLLOWERS - held {
        taken(&follow(&mut edge, SECRET, &mine));
    }
    assert!(MAX_FOLLOWERS - held >= OPERATOR_FOLLOWERS, "the operator had {} places", MAX_FOLLOWERS - held);
    assert_eq!(answer(&follow(&mut edge, SECRET, &mine)).0, 429, "the edge's bound");
    assert_eq!(edge.callers_waiting(), MAX_FOLLOWERS);
}
