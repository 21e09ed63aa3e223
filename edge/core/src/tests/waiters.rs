//! `/execute` callers waiting on a job: how many a job, a caller and the edge take when an
//! idempotency key is repeated, that they share one answer, and what a repeat is told
//! while no agent is connected.

use super::routing::{answer, pool_config, A_SECRET, B_SECRET};
use super::*;
use crate::http::Handled;
use crate::machine::{MAX_WAITERS_PER_JOB, MAX_WAITING_REPEATS};

fn keyed(edge: &mut Edge, now: u64, path: &str, secret: &str, key: &str, body: &Value) -> Handled {
    let req = Request {
        method: "POST".into(),
        path: path.into(),
        secret_header: Some(secret.into()),
        authorization: None,
        idempotency_key: Some(key.into()),
        last_event_id: None,
        body: Body::Bytes(body.to_string().into_bytes()),
    };
    static SEED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let seed = SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    http::handle(edge, now, [seed; 16], &req)
}

/// `POST /jobs` with `key`: the job's id.
fn queued(edge: &mut Edge, secret: &str, key: &str) -> String {
    let h = keyed(edge, 1, "/jobs", secret, key, &json!({"prompt": key}));
    let (status, body) = answer(&h);
    assert_eq!(status, 202, "{body}");
    body["job_id"].as_str().unwrap().to_string()
}

/// `POST /execute` repeating `key`: its caller if it waits, else its answer.
fn repeat(edge: &mut Edge, secret: &str, key: &str) -> Result<CallerId, (u16, Value)> {
    let h = keyed(edge, 2, "/execute", secret, key, &json!({"prompt": key}));
    match answer_to(&h.effects, h.caller) {
        None => Ok(h.caller),
        Some(answer) => Err(answer),
    }
}

/// A caller repeating the key of its job with `/execute` waits on it — up to
/// [`MAX_WAITERS_PER_JOB`] callers; the next is answered 429 at once, told where to read
/// the job instead. When the job ends, every waiter is given the same answer, one body
/// shared by all, not a copy each.
#[test]
fn waiters_on_one_job_are_capped_and_share_one_answer() {
    let mut edge = Edge::new(Config { max_body_bytes: 64 * 1024, ..pool_config() }, 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(1, 0));
    let id = queued(&mut edge, A_SECRET, "k");
    let waiters: Vec<CallerId> = (0..MAX_WAITERS_PER_JOB).map(|_| repeat(&mut edge, A_SECRET, "k").expect("waits")).collect();
    let (status, refused) = repeat(&mut edge, A_SECRET, "k").unwrap_err();
    assert_eq!((status, refused["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{refused}");
    assert_eq!(refused["job_id"], id.as_str());
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains(&format!("GET /jobs/{id}")) && error.contains(&MAX_WAITERS_PER_JOB.to_string()), "{error}");
    assert!(refused.get("fallback").is_none(), "the job runs: running the task elsewhere too would run it twice: {refused}");
    // One that hangs up makes room.
    assert!(edge.caller_gone(2, waiters[0]).is_empty(), "others wait");
    let last = repeat(&mut edge, A_SECRET, "k").expect("room was made");

    say(&mut edge, 3, &sid, AgentMessage::Accepted { job_id: id.clone() });
    let big = JobResult { output: "x".repeat(1024 * 1024), ..ok_result() };
    let effects = report(&mut edge, 4, &sid, &id, big);
    let bodies: Vec<(CallerId, &str)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Answer { caller, response } => Some((*caller, &*response.body)),
            _ => None,
        })
        .collect();
    let mut answered: Vec<CallerId> = bodies.iter().map(|(c, _)| *c).collect();
    answered.sort();
    let mut expected: Vec<CallerId> = waiters[1..].iter().copied().chain([last]).collect();
    expected.sort();
    assert_eq!(answered, expected, "each waiter still there is answered once");
    assert!(bodies[0].1.len() > 1024 * 1024);
    assert!(bodies.iter().all(|(_, b)| b.as_ptr() == bodies[0].1.as_ptr()), "every waiter holds its own copy of the result");
}

/// A caller with its own secret holds at most its equal share of [`MAX_WAITING_REPEATS`]
/// (a third: the pool's callers, a and b) places repeating
/// the keys of its jobs, over all of them; another caller's repeats still wait, and a new
/// `/execute` of its own is never refused for them: its job's one waiter is not a repeat.
#[test]
fn one_caller_cannot_take_every_waiting_place() {
    let mut edge = Edge::new(pool_config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(0, 0));
    let share = MAX_WAITING_REPEATS / 3;
    let jobs = share / MAX_WAITERS_PER_JOB + 1;
    let mut waiting = 0;
    for j in 0..jobs {
        let key = format!("a{j}");
        queued(&mut edge, A_SECRET, &key);
        for _ in 0..MAX_WAITERS_PER_JOB {
            match repeat(&mut edge, A_SECRET, &key) {
                Ok(_) => waiting += 1,
                Err((status, body)) => {
                    assert_eq!(status, 429, "{body}");
                    assert!(body["error"].as_str().unwrap().contains("`a`"), "says whose: {body}");
                }
            }
        }
    }
    assert_eq!(waiting, share, "a holds its share of the places, no more");
    queued(&mut edge, B_SECRET, "b");
    assert!(repeat(&mut edge, B_SECRET, "b").is_ok(), "b's repeat was refused: a holds every place");
    assert!(repeat(&mut edge, A_SECRET, "a new task").is_ok(), "a's own new /execute was refused");
}

/// The repeats of all callers together wait on at most [`MAX_WAITING_REPEATS`] places (the
/// pool secret's, one share for everyone it names, are held to this and the per-job cap).
#[test]
fn waiting_repeats_are_capped_in_all() {
    let mut edge = Edge::new(pool_config(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(0, 0));
    let jobs = MAX_WAITING_REPEATS / MAX_WAITERS_PER_JOB;
    for j in 0..jobs {
        let key = format!("p{j}");
        queued(&mut edge, SECRET, &key);
        for _ in 0..MAX_WAITERS_PER_JOB {
            repeat(&mut edge, SECRET, &key).expect("within the caps");
        }
    }
    queued(&mut edge, SECRET, "one more");
    let (status, body) = repeat(&mut edge, SECRET, "one more").unwrap_err();
    assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{body}");
    assert!(body["error"].as_str().unwrap().contains(&MAX_WAITING_REPEATS.to_string()), "{body}");
    // A new `/execute` still waits on its own job.
    assert!(repeat(&mut edge, SECRET, "a new task").is_ok(), "a new /execute was refused for others' repeats");
}

/// `/execute` repeating the key of a `POST /jobs` job still queued while no agent is
/// connected is answered at once — not after the job's wait in the queue — with 503
/// `RUNNER_OFFLINE`, the job's id and no `fallback`: the job stays queued and runs when an
/// agent comes, so running the task elsewhere too would run it twice; the answer says to
/// follow it, or cancel it first.
#[test]
fn a_repeat_of_a_queued_job_while_offline_is_answered_at_once() {
    let mut edge = Edge::new(pool_config(), 0);
    let id = queued(&mut edge, A_SECRET, "k");
    let (status, body) = repeat(&mut edge, A_SECRET, "k").expect_err("answered at once");
    assert_eq!((status, body["error_code"].as_str()), (503, Some("RUNNER_OFFLINE")), "{body}");
    assert_eq!(body["job_id"], id.as_str());
    assert!(body.get("fallback").is_none(), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(&format!("GET /jobs/{id}")) && error.contains(&format!("DELETE /jobs/{id}")), "{error}");
    assert_eq!(edge.job(&id).unwrap().state, JobState::Queued, "the job stays queued");
    assert_eq!(edge.callers_waiting(), 0);
    // Once an agent is there, the repeat waits for the job's end, as before.
    let (sid, _) = join(&mut edge, 3, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 3, &sid, credit(0, 0));
    assert!(repeat(&mut edge, A_SECRET, "k").is_ok());
}
