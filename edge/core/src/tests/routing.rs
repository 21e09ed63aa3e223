//! Many agents: labels and `agent_id`, repository affinity, callers taking turns,
//! priorities, pause and resume, `/health` for many, and a property test that none of it
//! ever sends a job past an agent's credit or to an agent it does not fit.

use super::*;
use crate::http::Handled;
use crate::record::Job;
use proptest::prelude::*;
use shared::placement::parse_labels;

pub(super) const A_SECRET: &str = "caller-a-secret-0123456789";
pub(super) const B_SECRET: &str = "caller-b-secret-0123456789";

pub(super) fn pool_config() -> Config {
    Config {
        caller_secrets: vec![("a".into(), A_SECRET.into()), ("b".into(), B_SECRET.into())],
        max_queued_jobs: 1_000,
        max_queued_per_caller: 600,
        ..config()
    }
}

/// Agent `agent` (key `key`) joins with `capacity` slots, these labels and mirrors, and
/// states its slots free.
pub(super) fn enter(edge: &mut Edge, now: u64, agent: &str, key: u8, capacity: u32, labels: &str, mirrors: &[&str]) -> String {
    let (sid, effects) = edge.connect(now, [key + 100; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    let hello = Hello {
        capacity,
        labels: parse_labels(labels).unwrap(),
        mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
        ..hello(agent, nonce, now)
    };
    let effects = edge.message(now, &sid, &hello_text(&hello, &agent_key(key)));
    assert!(closed(&effects).is_none(), "{effects:?}");
    say(edge, now, &sid, credit(capacity, 0));
    sid
}

pub(super) fn three_agents() -> Config {
    Config {
        agents: Keyring::from_keys([
            ("spark".to_string(), agent_key(1).verifying_key()),
            ("laptop".to_string(), agent_key(2).verifying_key()),
            ("gpu".to_string(), agent_key(3).verifying_key()),
        ]),
        ..pool_config()
    }
}

pub(super) fn request(edge: &mut Edge, now: u64, secret: &str, method: &str, path: &str, body: Value) -> Handled {
    let req = Request {
        method: method.into(),
        path: path.into(),
        secret_header: Some(secret.into()),
        authorization: None,
        idempotency_key: None,
        last_event_id: None,
        body: Body::Bytes(if body.is_null() { Vec::new() } else { body.to_string().into_bytes() }),
    };
    http::handle(edge, now, [now as u8; 16], &req)
}

pub(super) fn answer(h: &Handled) -> (u16, Value) {
    answer_to(&h.effects, h.caller).expect("answered")
}

/// `POST /jobs` of `body` with `secret` and the idempotency key `deploy-1`.
fn keyed(secret: &str, body: Value) -> Request {
    Request {
        method: "POST".into(),
        path: "/jobs".into(),
        secret_header: Some(secret.into()),
        authorization: None,
        idempotency_key: Some("deploy-1".into()),
        last_event_id: None,
        body: Body::Bytes(body.to_string().into_bytes()),
    }
}

pub(super) fn submit(edge: &mut Edge, now: u64, secret: &str, body: Value) -> String {
    let h = request(edge, now, secret, "POST", "/jobs", body);
    let (status, body) = answer(&h);
    assert_eq!(status, 202, "{body}");
    body["job_id"].as_str().unwrap().to_string()
}

fn agent_of(edge: &Edge, job: &str) -> Option<String> {
    edge.job(job).and_then(|j| j.agent_id.clone())
}

#[test]
fn labels_and_agent_id_choose_the_agent_and_execute_refuses_what_nobody_offers() {
    let mut edge = Edge::new(three_agents(), 0);
    enter(&mut edge, 0, "spark", 1, 4, "os=linux,gpu=none", &[]);
    enter(&mut edge, 0, "laptop", 2, 1, "os=mac,gpu=none", &[]);
    let mac = submit(&mut edge, 1, SECRET, json!({"prompt": "x", "labels": {"os": "mac"}}));
    assert_eq!(agent_of(&edge, &mac).as_deref(), Some("laptop"), "the only agent offering os=mac, though spark has more slots");
    let pinned = submit(&mut edge, 2, SECRET, json!({"prompt": "x", "agent_id": "spark", "labels": "gpu=none"}));
    assert_eq!(agent_of(&edge, &pinned).as_deref(), Some("spark"));
    // Nobody offers gpu=a100: /execute falls back at once, naming it; POST /jobs waits.
    let h = request(&mut edge, 3, SECRET, "POST", "/execute", json!({"prompt": "x", "labels": "gpu=a100"}));
    let (status, body) = answer(&h);
    assert_eq!((status, body["error_code"].as_str(), body["fallback"].as_bool()), (503, Some("RUNNER_OFFLINE"), Some(true)), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("gpu=a100") && error.contains("laptop (gpu=none,os=mac)"), "{error}");
    let waits = submit(&mut edge, 4, SECRET, json!({"prompt": "x", "labels": "gpu=a100"}));
    assert_eq!(edge.job(&waits).unwrap().state, JobState::Queued);
    // A later job that fits passes it: a job nobody fits holds up nothing behind it.
    let next = submit(&mut edge, 5, SECRET, json!({"prompt": "x"}));
    assert_eq!(agent_of(&edge, &next).as_deref(), Some("spark"));
    // The agent offering it arrives: the waiting job goes to it.
    enter(&mut edge, 6, "gpu", 3, 1, "gpu=a100", &[]);
    assert_eq!(agent_of(&edge, &waits).as_deref(), Some("gpu"));
    // A job for an agent of another pool, or with bad labels, is a caller's mistake.
    for bad in [json!({"prompt": "x", "labels": "gpu"}), json!({"prompt": "x", "agent_id": "a b"}), json!({"prompt": "x", "priority": 10})] {
        let h = request(&mut edge, 7, SECRET, "POST", "/jobs", bad.clone());
        assert_eq!(answer(&h).0, 400, "{bad}");
    }
}

#[test]
fn a_repository_job_goes_to_a_free_agent_holding_its_mirror() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 4, "", &[]);
    enter(&mut edge, 0, "laptop", 2, 1, "", &["github.com/acme/api"]);
    let first = submit(&mut edge, 1, SECRET, json!({"prompt": "x", "repo_url": "acme/api"}));
    assert_eq!(agent_of(&edge, &first).as_deref(), Some("laptop"), "the mirror's holder, though spark has more slots");
    // The holder is full: any free agent takes the next.
    let second = submit(&mut edge, 2, SECRET, json!({"prompt": "x", "repo_url": "https://github.com/acme/api.git"}));
    assert_eq!(agent_of(&edge, &second).as_deref(), Some("spark"));
    // Spark reports the mirror it now holds; the next job of that repository prefers it
    // over a free agent without it.
    say(&mut edge, 3, &spark, AgentMessage::Mirrors { names: vec!["github.com/acme/web".into()] });
    enter(&mut edge, 4, "gpu", 3, 8, "", &[]);
    let third = submit(&mut edge, 5, SECRET, json!({"prompt": "x", "repo_url": "acme/web"}));
    assert_eq!(agent_of(&edge, &third).as_deref(), Some("spark"));
}

#[test]
fn a_burst_from_one_caller_does_not_starve_another() {
    let mut edge = Edge::new(pool_config(), 0);
    let sid = enter(&mut edge, 0, "spark", 1, 2, "", &[]);
    let burst: Vec<String> = (0..500).map(|i| submit(&mut edge, 1 + i, A_SECRET, json!({"prompt": "burst"}))).collect();
    let single = submit(&mut edge, 600, B_SECRET, json!({"prompt": "one"}));
    assert_eq!(edge.job(&single).unwrap().placement.caller.as_deref(), Some("b"));
    // Two of A's run; the first slot that frees goes to B.
    assert_eq!(burst.iter().filter(|j| edge.job(j).unwrap().state != JobState::Queued).count(), 2);
    say(&mut edge, 601, &sid, AgentMessage::Accepted { job_id: burst[0].clone() });
    report(&mut edge, 602, &sid, &burst[0], ok_result());
    say(&mut edge, 602, &sid, credit(1, 2));
    assert_eq!(edge.job(&single).unwrap().state, JobState::Dispatched, "B's job went within agents x slots dispatches");
    // The same holds whoever's names A and B are: the pool secret's, a caller's own
    // secret's, or A's burst spread over names the pool secret made up.
    type Sender = fn(usize) -> (&'static str, Value);
    let a_proven: Sender = |_| (A_SECRET, json!({"prompt": "burst"}));
    let a_named: Sender = |_| (SECRET, json!({"prompt": "burst", "caller": "nightly"}));
    let a_made_up: Sender = |i| (SECRET, json!({"prompt": "burst", "caller": format!("made-up-{}", i % 50)}));
    let b_proven: Sender = |_| (B_SECRET, json!({"prompt": "one"}));
    let b_named: Sender = |_| (SECRET, json!({"prompt": "one", "caller": "ci"}));
    for (a, b) in [(a_named, b_named), (a_named, b_proven), (a_proven, b_named), (a_made_up, b_proven)] {
        let mut edge = Edge::new(pool_config(), 0);
        let sid = enter(&mut edge, 0, "spark", 1, 2, "", &[]);
        let burst: Vec<String> = (0..500).map(|i| { let (secret, body) = a(i); submit(&mut edge, 1 + i as u64, secret, body) }).collect();
        let (secret, body) = b(0);
        let single = submit(&mut edge, 600, secret, body.clone());
        say(&mut edge, 601, &sid, AgentMessage::Accepted { job_id: burst[0].clone() });
        report(&mut edge, 602, &sid, &burst[0], ok_result());
        say(&mut edge, 602, &sid, credit(1, 2));
        assert_eq!(edge.job(&single).unwrap().state, JobState::Dispatched, "{} then {body}", a(0).1);
    }
    // A caller's cap: A may not queue more than MAX_QUEUED_PER_CALLER, B still may.
    let mut capped = Edge::new(Config { max_queued_per_caller: 3, ..pool_config() }, 0);
    for i in 0..3 {
        submit(&mut capped, i, A_SECRET, json!({"prompt": "x"}));
    }
    let h = request(&mut capped, 4, A_SECRET, "POST", "/jobs", json!({"prompt": "x"}));
    let (status, body) = answer(&h);
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains("MAX_QUEUED_PER_CALLER"), "{body}");
    submit(&mut capped, 5, B_SECRET, json!({"prompt": "x"}));
}

/// The queue's caps as an edge started without `MAX_QUEUED_JOBS` or
/// `MAX_QUEUED_PER_CALLER` set has them, with `pool_config`'s callers and agents.
fn default_caps() -> Config {
    let unset = Config::from_lookup(|name| match name {
        "RUNNER_SECRET" => Some(SECRET.into()),
        "EDGE_SIGNING_KEY" => Some("CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=".into()),
        "AGENT_PUBLIC_KEYS" => Some("spark=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=".into()),
        _ => None,
    })
    .unwrap();
    Config { max_queued_jobs: unset.max_queued_jobs, max_queued_per_caller: unset.max_queued_per_caller, ..pool_config() }
}

/// At the default caps one caller filled the whole queue (its cap was the pool's) with
/// jobs nobody could take, and every other caller — the operator too — got 429, even for
/// a job the idle agent would have taken at once (review rev7, 1). Now a job a free agent
/// takes at once is never refused for the queue, and a full queue refuses the owner
/// holding its even share of it, not one holding less.
#[test]
fn one_caller_filling_the_queue_at_the_default_caps_shuts_no_one_else_out() {
    let cfg = default_caps();
    let cap = cfg.max_queued_jobs;
    let mut edge = Edge::new(cfg, 0);
    let sid = enter(&mut edge, 0, "spark", 1, 1, "gpu=none", &[]);
    let mut now = 1;
    // A fills the queue with jobs asking for GPUs nobody offers: they wait QUEUE_TTL_MS.
    for i in 0..cap {
        let id = submit(&mut edge, now, A_SECRET, json!({"prompt": "x", "labels": {"gpu": format!("g{i}")}}));
        assert_eq!(edge.job(&id).unwrap().state, JobState::Queued);
        now += 1;
    }
    let h = request(&mut edge, now, A_SECRET, "POST", "/jobs", json!({"prompt": "x", "labels": {"gpu": "one-more"}}));
    let (status, body) = answer(&h);
    assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "A holds the whole queue: {body}");
    // B's /execute, which the idle agent takes at once, is not refused for A's queue.
    let h = request(&mut edge, now, B_SECRET, "POST", "/execute", json!({"prompt": "b's task"}));
    assert!(answer_to(&h.effects, h.caller).is_none(), "B's /execute was answered at once: {:?}", answer_to(&h.effects, h.caller));
    let order = order_of(&h.effects, &sid, "spark", now);
    assert_eq!(order.spec.prompt, "b's task");
    // The agent is busy now: the operator's job and B's wait, though the queue is full —
    // neither holds any of it.
    now += 1;
    let op = submit(&mut edge, now, SECRET, json!({"prompt": "the operator's"}));
    assert_eq!(edge.job(&op).unwrap().state, JobState::Queued);
    let mut b_queued = 0;
    loop {
        now += 1;
        let h = request(&mut edge, now, B_SECRET, "POST", "/jobs", json!({"prompt": "b's"}));
        match answer(&h) {
            (202, _) => b_queued += 1,
            (429, body) => {
                let error = body["error"].as_str().unwrap();
                assert!(error.contains("MAX_QUEUED_JOBS") && error.contains("`b`"), "{error}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    // Three owners wait (A, B, the pool's secret): B had its even share of the cap.
    assert_eq!(b_queued, cap.div_ceil(3), "B queued {b_queued}");
    assert!(edge.queued() < 2 * cap);
}

/// A caller with its own secret refused for a full queue was told how many jobs waited in
/// all and among how many callers (review rev27, 4): other callers' load, the operator's to
/// read. It is told its own count and share, and the cap, only — each a number of its own
/// here (its 4, its share 2, the cap 6), so a wording that showed one for the other, or
/// anyone else's, is seen. (With its count and share both 2 it could not tell them apart.)
#[test]
fn a_named_callers_queue_full_refusal_names_no_other_count() {
    let mut edge = Edge::new(Config { max_queued_jobs: 6, ..pool_config() }, 0);
    // Labels nobody offers: every job waits.
    let waits = |i: usize| json!({"prompt": "x", "labels": {"gpu": format!("g{i}")}});
    let mut now = 1;
    let mut queue = |edge: &mut Edge, secret: &str, body: Value| {
        now += 1;
        answer(&request(edge, now, secret, "POST", "/jobs", body))
    };
    // a queues 4 while the queue has room; then the pool's secret 3 and b 1, each below
    // its even share as it asks: 8 wait, among 3 owners.
    for i in 0..4 {
        assert_eq!(queue(&mut edge, A_SECRET, waits(i)).0, 202);
    }
    for i in 0..3 {
        let mut job = waits(i);
        job["caller"] = json!("ci");
        assert_eq!(queue(&mut edge, SECRET, job).0, 202);
    }
    assert_eq!(queue(&mut edge, B_SECRET, waits(0)).0, 202);
    assert_eq!(edge.queued(), 8);
    // a holds 4, past its even share of 6 among 3 owners (2).
    let (status, body) = queue(&mut edge, A_SECRET, waits(4));
    assert_eq!(status, 429, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("`a`") && error.contains("MAX_QUEUED_JOBS"), "{error}");
    // Its own count (4) and the cap (6): nothing else — not the 8 waiting, the pool
    // secret's 3, b's 1, the 3 owners, nor its share (2): the cap divided among the owners
    // waiting, it told how many wait (rev31-6).
    let mut numbers: Vec<&str> = error.split(|c: char| !c.is_ascii_digit()).filter(|n| !n.is_empty()).collect();
    numbers.sort();
    numbers.dedup();
    assert_eq!(numbers, ["4", "6"], "{error}");
    assert!(error.contains("at least its even share of it among the callers with jobs waiting"), "{error}");
}

/// Past `MAX_QUEUED_JOBS` each owner may still queue up to its even share of it, the
/// share taken as the owners waiting are counted when it asks: owners coming one after
/// another could take the queue far past the cap, so twice the cap is where every job
/// that would wait is refused. A job a free agent takes at once is not refused, there nor
/// past its caller's cap.
#[test]
fn what_waits_past_the_cap_is_bounded_and_a_job_taken_at_once_never_waits() {
    let callers = ["a", "b", "c"].map(|c| (c.to_string(), format!("caller-{c}-secret-0123456789")));
    let cfg = Config { caller_secrets: callers.to_vec(), max_queued_jobs: 4, max_queued_per_caller: 4, ..pool_config() };
    let mut edge = Edge::new(cfg, 0);
    let sid = enter(&mut edge, 0, "spark", 1, 1, "gpu=none", &[]);
    let mut now = 0;
    let mut queue = |edge: &mut Edge, secret: &str, body: Value| {
        now += 1;
        let h = request(edge, now, secret, "POST", "/jobs", body);
        answer(&h)
    };
    let unfit = json!({"prompt": "x", "labels": "gpu=a100"});
    // a fills the cap; b, then the pool's secret, each take their even share past it.
    for (secret, share) in [(&callers[0].1, 4), (&callers[1].1, 2), (&SECRET.to_string(), 2)] {
        for _ in 0..share {
            assert_eq!(queue(&mut edge, secret, unfit.clone()).0, 202);
        }
        let (status, body) = queue(&mut edge, secret, unfit.clone());
        assert_eq!(status, 429, "{body}");
    }
    assert_eq!(edge.queued(), 8);
    // Twice the cap waits: c, holding none, still gets one in (review rev9: owners'
    // shares can come past twice the cap, and one holding nothing was refused); its
    // second is refused, saying so, as is any owner's that holds some.
    assert_eq!(queue(&mut edge, &callers[2].1, unfit.clone()).0, 202);
    for secret in [&callers[2].1, &callers[0].1] {
        let (status, body) = queue(&mut edge, secret, unfit.clone());
        assert_eq!(status, 429, "{body}");
        assert!(body["error"].as_str().unwrap().contains("twice MAX_QUEUED_JOBS"), "{body}");
    }
    assert_eq!(edge.queued(), 9);
    // A job the idle agent takes at once does not wait: taken, from a too, past its cap.
    let (status, body) = queue(&mut edge, &callers[0].1, json!({"prompt": "runs now"}));
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().unwrap();
    assert_eq!((edge.job(job).unwrap().state, edge.queued()), (JobState::Dispatched, 9));
    let _ = sid;
}

/// Jobs no agent fits were looked at again at every dispatch: a lane whose jobs nobody
/// fits is never served, so it stays first in turn, and the walk's memo of what fits
/// nothing was keyed by the labels asked for, which a caller varies at will (review
/// rev7, 2: 1,000 such jobs made each dispatch ten times dearer). Now each is looked at
/// once, then set aside until the agents taking work, or what they offer, change.
#[test]
fn jobs_no_agent_fits_are_not_walked_at_every_dispatch() {
    let mut edge = Edge::new(Config { max_queued_jobs: 2_000, max_queued_per_caller: 2_000, ..three_agents() }, 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "gpu=none", &[]);
    let unfit = 1_000;
    // A's jobs each ask for something else nobody offers; one names an agent not here.
    let pinned = submit(&mut edge, 1, A_SECRET, json!({"prompt": "x", "agent_id": "laptop"}));
    let mut waiting = vec![pinned.clone()];
    for i in 1..unfit {
        waiting.push(submit(&mut edge, 1 + i as u64, A_SECRET, json!({"prompt": "x", "labels": {"need": format!("n{i}")}})));
    }
    // B's jobs run one after another on spark: each dispatch looks at B's job, not A's.
    let (rounds, before) = (200u64, edge.jobs_walked());
    let mut now = 10_000;
    for _ in 0..rounds {
        now += 1;
        let job = submit(&mut edge, now, B_SECRET, json!({"prompt": "b"}));
        assert_eq!(agent_of(&edge, &job).as_deref(), Some("spark"));
        say(&mut edge, now, &spark, AgentMessage::Accepted { job_id: job.clone() });
        report(&mut edge, now, &spark, &job, ok_result());
        let received = edge.session(&spark).and_then(|s| s.agent()).unwrap().sent;
        say(&mut edge, now, &spark, credit(1, received));
    }
    let walked = edge.jobs_walked() - before;
    assert!(walked <= 2 * rounds, "{rounds} dispatches looked at {walked} queued jobs");
    // An agent that offers what some of them need comes: they are looked at again, once
    // each, and go to it.
    let before = edge.jobs_walked();
    enter(&mut edge, now + 1, "laptop", 2, 2, "need=n7", &[]);
    assert_eq!(agent_of(&edge, &pinned).as_deref(), Some("laptop"));
    assert_eq!(agent_of(&edge, &waiting[7]).as_deref(), Some("laptop"));
    let walked = edge.jobs_walked() - before;
    assert!(walked <= 2 * unfit as u64, "an agent's coming looked at {walked} queued jobs");
    assert_eq!(edge.queued(), unfit - 2);
}

/// Turns go to owners first: a caller with its own secret is one, and every name the
/// pool's secret sends under is one together — its names, made up at will, take one
/// owner's turns between them, round-robin (review rev1).
#[test]
fn the_pool_secrets_names_share_one_owners_turns() {
    let mut edge = Edge::new(pool_config(), 0);
    let sid = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    let mut now = 1;
    // One job runs; behind it a (own secret) queues 5 jobs and the pool's secret 5 under
    // each of 20 names, interleaved.
    let mut running = submit(&mut edge, now, B_SECRET, json!({"prompt": "first"}));
    let mut of = std::collections::HashMap::new();
    for round in 0..5 {
        now += 1;
        of.insert(submit(&mut edge, now, A_SECRET, json!({"prompt": format!("a{round}")})), "a".to_string());
        for n in 0..20 {
            now += 1;
            let name = format!("made-up-{n}");
            of.insert(submit(&mut edge, now, SECRET, json!({"prompt": "m", "caller": name})), name);
        }
    }
    let mut served = Vec::new();
    for received in 1..=20 {
        say(&mut edge, now, &sid, AgentMessage::Accepted { job_id: running.clone() });
        report(&mut edge, now + 1, &sid, &running, ok_result());
        let effects = say(&mut edge, now + 1, &sid, credit(1, received));
        running = order_of(&effects, &sid, "spark", now + 1).header.job_id.clone();
        served.push(of[&running].clone());
        now += 2;
    }
    // a and the pool's secret take turns; a's 5 jobs go within the first 10.
    let a_turns: Vec<usize> = served.iter().enumerate().filter(|(_, c)| *c == "a").map(|(i, _)| i).collect();
    assert_eq!(a_turns.len(), 5, "{served:?}");
    assert!(a_turns.iter().all(|i| *i < 10) && served.windows(2).take(9).all(|w| w[0] != w[1]), "{served:?}");
    // Within the pool secret's share, its names take turns: 15 dispatches, 15 names.
    let names: std::collections::HashSet<&String> = served.iter().filter(|c| *c != "a").collect();
    assert_eq!(names.len(), 15, "{served:?}");
}

#[test]
fn callers_are_named_by_their_secret_or_field_and_priority_orders_their_jobs() {
    let mut edge = Edge::new(pool_config(), 0);
    let low = submit(&mut edge, 0, SECRET, json!({"prompt": "x", "caller": "nightly"}));
    let high = submit(&mut edge, 1, SECRET, json!({"prompt": "x", "caller": "nightly", "priority": 9}));
    assert_eq!(edge.job(&low).unwrap().placement.caller(), "nightly");
    let h = request(&mut edge, 2, A_SECRET, "POST", "/jobs", json!({"prompt": "x", "caller": "b"}));
    assert_eq!(answer(&h).0, 403, "a caller's secret cannot queue as another caller");
    let sid = enter(&mut edge, 3, "spark", 1, 1, "", &[]);
    assert_eq!(edge.job(&high).unwrap().state, JobState::Dispatched, "priority 9 first");
    assert_eq!(edge.job(&low).unwrap().state, JobState::Queued);
    let _ = sid;
    // Pausing agents is the operator's: a caller's own secret may not.
    let h = request(&mut edge, 4, A_SECRET, "POST", "/agents/spark/pause", Value::Null);
    assert_eq!(answer(&h).0, 403);
    let h = request(&mut edge, 4, "not-a-secret-at-all-0000", "POST", "/jobs", json!({"prompt": "x"}));
    assert_eq!(answer(&h).0, 403);
}

#[test]
fn a_pause_outlasts_a_restart_of_the_edge() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 2, "", &[]);
    let h = request(&mut edge, 1, SECRET, "POST", "/agents/spark/pause", Value::Null);
    assert_eq!(answer(&h).0, 200);
    let memory = h.effects.iter().rev().find_map(|e| match e {
        Effect::SaveAlerts(m) => Some((**m).clone()),
        _ => None,
    });
    edge.disconnect(2, &spark);
    // The native host restores no connections: only jobs and the stored memory.
    let (mut edge, _) = Edge::restore(three_agents(), vec![], vec![], memory, 3);
    let spark = enter(&mut edge, 4, "spark", 1, 2, "", &[]);
    let waiting = submit(&mut edge, 5, SECRET, json!({"prompt": "x"}));
    assert_eq!(edge.job(&waiting).unwrap().state, JobState::Queued, "the paused agent took work after the edge restarted");
    assert!(edge.health(6).agents[0].paused);
    let h = request(&mut edge, 7, SECRET, "POST", "/agents/spark/resume", Value::Null);
    assert_eq!(answer(&h).0, 200);
    assert_eq!(edge.job(&waiting).unwrap().session_id.as_deref(), Some(spark.as_str()));
}

#[test]
fn a_paused_agent_finishes_its_jobs_takes_no_new_ones_and_shows_it() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 2, "", &[]);
    let running = submit(&mut edge, 1, SECRET, json!({"prompt": "x"}));
    say(&mut edge, 2, &spark, AgentMessage::Accepted { job_id: running.clone() });
    let h = request(&mut edge, 3, SECRET, "POST", "/agents/spark/pause", Value::Null);
    let (status, body) = answer(&h);
    assert_eq!((status, body["paused"].as_bool(), body["running_jobs"].as_u64()), (200, Some(true), Some(1)), "{body}");
    let waiting = submit(&mut edge, 4, SECRET, json!({"prompt": "x"}));
    assert_eq!(edge.job(&waiting).unwrap().state, JobState::Queued, "a paused agent takes nothing new");
    let h = request(&mut edge, 5, SECRET, "POST", "/execute", json!({"prompt": "x", "agent_id": "spark"}));
    let (status, body) = answer(&h);
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("paused"), "{body}");
    // Its running job finishes as ever.
    report(&mut edge, 6, &spark, &running, ok_result());
    assert_eq!(edge.job(&running).unwrap().state, JobState::Succeeded);
    let health = edge.health(7);
    assert_eq!(health.status, shared::contract::HealthStatus::Unhealthy, "no agent can take work");
    assert!(health.agents[0].paused && !health.agents[0].takes_work);
    // A pause outlasts a reconnect; a resume sends the queued work at once.
    edge.disconnect(8, &spark);
    let spark = enter(&mut edge, 9, "spark", 1, 2, "", &[]);
    assert_eq!(edge.job(&waiting).unwrap().state, JobState::Queued);
    let h = request(&mut edge, 10, SECRET, "POST", "/agents/spark/resume", Value::Null);
    assert_eq!(answer(&h).0, 200);
    assert_eq!(edge.job(&waiting).unwrap().state, JobState::Dispatched);
    assert_eq!(edge.job(&waiting).unwrap().session_id.as_deref(), Some(spark.as_str()));
    let h = request(&mut edge, 11, SECRET, "POST", "/agents/nobody/pause", Value::Null);
    assert_eq!(answer(&h).0, 404);
}

/// An agent that says it is stopping (draining, or a `--one-job` agent with its job) is
/// held back as a paused one is, by its own word and for that connection: its running
/// job finishes, an `/execute` only it could take is refused at once (it queued behind
/// the drain), one another agent fits goes there, `POST /jobs` waits, `/health` shows it.
/// Its next connection takes work again.
#[test]
fn a_stopping_agent_finishes_its_jobs_and_execute_falls_back_at_once() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "gpu=a100", &[]);
    let laptop = enter(&mut edge, 0, "laptop", 2, 1, "", &[]);
    let running = submit(&mut edge, 1, SECRET, json!({"prompt": "x", "agent_id": "spark"}));
    say(&mut edge, 2, &spark, AgentMessage::Accepted { job_id: running.clone() });
    // An `/execute` spark alone fits, queued behind the running job before spark said it
    // stops: it ends when spark says so (its caller falls back), not after the drain.
    let only_spark = json!({"prompt": "x", "agent_id": "spark"}).to_string();
    let only_spark = ExecuteRequest::parse(only_spark.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
    let queued = "w1".to_string();
    edge.submit(3, queued.clone(), only_spark, Mode::Wait).unwrap();
    assert_eq!(edge.job(&queued).unwrap().state, JobState::Queued);
    let effects = pulse(&mut edge, 3, &spark, Beat { stopping: true, ..beat(&[&running], 0, 1) });
    assert!(effects.iter().any(|e| matches!(e, Effect::SaveSession(_))), "kept with the session: {effects:?}");
    let ended = edge.job(&queued).unwrap();
    assert_eq!((ended.state, ended.result.as_ref().and_then(|r| r.error_code)), (JobState::Failed, Some(shared::contract::ErrorCode::RunnerOffline)), "{ended:?}");
    let h = request(&mut edge, 4, SECRET, "POST", "/execute", json!({"prompt": "x", "labels": {"gpu": "a100"}}));
    let (status, body) = answer(&h);
    assert_eq!((status, body["fallback"].as_bool(), body["error_code"].as_str()), (503, Some(true), Some("RUNNER_OFFLINE")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("stopping"), "{body}");
    // One the other agent fits is placed there; a `POST /jobs` for spark waits.
    let h = request(&mut edge, 5, SECRET, "POST", "/execute", json!({"prompt": "x"}));
    assert!(h.effects.iter().any(|e| matches!(e, Effect::Send { session, .. } if *session == laptop)), "sent to laptop");
    let waiting = submit(&mut edge, 6, SECRET, json!({"prompt": "x", "agent_id": "spark"}));
    assert_eq!(edge.job(&waiting).unwrap().state, JobState::Queued);
    let health = edge.health(7);
    let shown = health.agents.iter().find(|a| a.agent_id == "spark").unwrap();
    assert!(shown.stopping && !shown.takes_work && !shown.paused, "{shown:?}");
    report(&mut edge, 8, &spark, &running, ok_result());
    assert_eq!(edge.job(&running).unwrap().state, JobState::Succeeded);
    // Its beats say it until it goes: `stopping` is the beat's, so one that no longer
    // says it (made up on the path, or not) lasts until the next.
    pulse(&mut edge, 8, &spark, Beat { stopping: true, ..beat(&[], 0, 1) });
    assert!(edge.health(8).agents.iter().any(|a| a.stopping));
    // Back on a new connection (the agent started again): the waiting job goes to it.
    edge.disconnect(9, &spark);
    let spark = enter(&mut edge, 10, "spark", 1, 2, "gpu=a100", &[]);
    assert_eq!(edge.job(&waiting).unwrap().session_id.as_deref(), Some(spark.as_str()));
    assert!(!edge.health(11).agents.iter().any(|a| a.stopping));
}

/// A queued `/execute` ends as soon as every agent that fits it is held back, whichever way
/// that comes: the working one leaves (the other paused), or a paused one is all that comes
/// back (rev23 M3: both left it waiting out its whole queue wait).
#[test]
fn a_queued_execute_ends_when_the_only_working_agent_leaves_the_paused_one() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    enter(&mut edge, 0, "laptop", 2, 1, "", &[]);
    let h = request(&mut edge, 1, SECRET, "POST", "/agents/laptop/pause", Value::Null);
    assert_eq!(answer(&h).0, 200);
    let running = submit(&mut edge, 2, SECRET, json!({"prompt": "x"}));
    say(&mut edge, 3, &spark, AgentMessage::Accepted { job_id: running });
    let body = json!({"prompt": "x"}).to_string();
    edge.submit(4, "w1".into(), ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap(), Mode::Wait).unwrap();
    assert_eq!(edge.job("w1").unwrap().state, JobState::Queued, "spark is busy, laptop paused: it waits for spark");
    edge.disconnect(5, &spark);
    // At once, in the tick the disconnect asks for (retried should its writes fail).
    assert_eq!(edge.next_deadline(), Some(5));
    edge.tick(5);
    let ended = edge.job("w1").unwrap();
    assert_eq!((ended.state, ended.result.as_ref().and_then(|r| r.error_code)), (JobState::Failed, Some(shared::contract::ErrorCode::RunnerOffline)), "{ended:?}");
}

/// A queued `/execute` only one agent fits ends RUNNER_OFFLINE, with `fallback`, once that
/// agent has been gone `LOST_AFTER_MS` while others stay: it waited out its whole
/// `timeout_ms` (the shorter wait held only while the whole edge was offline).
#[test]
fn a_queued_execute_ends_once_the_only_agent_that_fits_it_has_been_gone_lost_after_ms() {
    // Heartbeats far apart: laptop stays connected through the test without beating.
    let mut edge = Edge::new(Config { heartbeat_interval_ms: 10 * LOST, ..three_agents() }, 0);
    let spark = spark_busy_and_an_execute_waiting_for_it(&mut edge);
    assert_eq!(edge.job("w1").unwrap().state, JobState::Queued, "spark is busy: it waits for spark");
    edge.disconnect(4, &spark);
    edge.tick(4);
    // A brief reconnect is tolerated: it still waits.
    assert_eq!(edge.job("w1").unwrap().state, JobState::Queued);
    assert_eq!(edge.next_deadline(), Some(4 + LOST), "its wait is cut to LOST_AFTER_MS (the running job's loss is due then too)");
    edge.tick(4 + LOST - 1);
    assert_eq!(edge.job("w1").unwrap().state, JobState::Queued);
    edge.tick(4 + LOST + 1);
    let ended = edge.job("w1").unwrap();
    let result = ended.result.as_ref().unwrap();
    assert_eq!((ended.state, result.error_code), (JobState::Failed, Some(shared::contract::ErrorCode::RunnerOffline)), "{ended:?}");
    assert!(result.error.as_deref().unwrap_or("").contains("spark"), "says whom it waited for: {result:?}");
}

/// Back within `LOST_AFTER_MS`, the agent takes the job that waited for it.
#[test]
fn a_queued_execute_goes_to_its_agent_back_within_lost_after_ms() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = spark_busy_and_an_execute_waiting_for_it(&mut edge);
    edge.disconnect(4, &spark);
    edge.tick(5);
    let spark = enter(&mut edge, 5, "spark", 1, 2, "", &[]);
    assert_eq!(edge.job("w1").unwrap().session_id.as_deref(), Some(spark.as_str()));
}

/// An agent that said it stops and left with nothing running (a drain, a `--one-job`
/// exit) is not down: `/health` stays healthy and does not list it. One that leaves with
/// jobs, or without saying so, is.
#[test]
fn an_agent_that_stopped_on_purpose_is_not_down() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    enter(&mut edge, 0, "laptop", 2, 1, "", &[]);
    pulse(&mut edge, 1, &spark, Beat { stopping: true, ..beat(&[], 1, 0) });
    edge.disconnect(2, &spark);
    let health = edge.health(3);
    assert_eq!(health.status, shared::contract::HealthStatus::Healthy, "{health:?}");
    assert!(!health.agents.iter().any(|a| a.agent_id == "spark"), "{health:?}");
    // Stopping with a job it did not finish: down.
    let spark = enter(&mut edge, 4, "spark", 1, 1, "", &[]);
    let running = submit(&mut edge, 5, SECRET, json!({"prompt": "x", "agent_id": "spark"}));
    say(&mut edge, 6, &spark, AgentMessage::Accepted { job_id: running.clone() });
    pulse(&mut edge, 7, &spark, Beat { stopping: true, ..beat(&[&running], 0, 1) });
    edge.disconnect(8, &spark);
    assert_eq!(edge.health(9).status, shared::contract::HealthStatus::Degraded);
}

#[test]
fn health_lists_every_agent_and_is_degraded_while_one_is_down() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 2, "os=linux", &[]);
    enter(&mut edge, 0, "laptop", 2, 1, "os=mac", &[]);
    let health = edge.health(1);
    assert_eq!((health.status, health.agents_taking_work), (shared::contract::HealthStatus::Healthy, 2));
    assert_eq!(health.agents[0].labels, parse_labels("os=linux").unwrap());
    assert_eq!(health.agents[0].login, "good");
    edge.disconnect(2, &spark);
    let health = edge.health(3);
    assert_eq!(health.status, shared::contract::HealthStatus::Degraded);
    assert_eq!(health.status.http_status(), 200, "one agent can still take work");
    let gone = health.agents.iter().find(|a| a.agent_id == "spark").expect("listed while down");
    assert!(!gone.connected);
    enter(&mut edge, 4, "spark", 1, 2, "os=linux", &[]);
    assert_eq!(edge.health(5).status, shared::contract::HealthStatus::Healthy);
    let summary = edge.pool_summary(5);
    assert_eq!((summary.pool.as_str(), summary.agents_online, summary.queued_jobs), ("default", 2, 0));
}

/// With no agent able to take work because their usage windows are used up, `/health` is
/// 503 and its `usage` says until when, as `/execute`'s `retry_at` does: the window that
/// opens first. It was the usage of whichever agent ranked first — a paused agent with an
/// open window ranked ahead of the held ones, so `usage` said `allowed` on a 503, and of
/// two held agents either one's reset was shown, not the earliest.
#[test]
fn health_with_every_window_used_up_says_the_earliest_reset_whatever_is_paused() {
    use shared::usage::{UsageStatus, UsageWindow};
    let held = |resets_at: u64| Beat {
        oauth: OAuthReport {
            usage: Some(UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(resets_at), utilization: None, seen_at: 0 }),
            ..oauth()
        },
        ..beat(&[], 1, 0)
    };
    for (late, early) in [("spark", "gpu"), ("gpu", "spark")] {
        let mut edge = Edge::new(three_agents(), 0);
        let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
        enter(&mut edge, 0, "laptop", 2, 1, "", &[]);
        let gpu = enter(&mut edge, 0, "gpu", 3, 1, "", &[]);
        let sid = |name: &str| if name == "spark" { spark.clone() } else { gpu.clone() };
        assert_eq!(answer(&request(&mut edge, 1, SECRET, "POST", "/agents/laptop/pause", Value::Null)).0, 200);
        // The early one reports first: the last report is not what decides.
        pulse(&mut edge, 2, &sid(early), held(100_000));
        pulse(&mut edge, 2, &sid(late), held(200_000));
        let (status, body) = answer(&request(&mut edge, 3, SECRET, "POST", "/execute", json!({"prompt": "x"})));
        assert_eq!((status, body["error_code"].as_str()), (503, Some("USAGE_LIMIT")), "{body}");
        assert_eq!(body["retry_at"], shared::time::rfc3339(100_000));
        let health = edge.health(4);
        assert_eq!((health.status.http_status(), health.agents_taking_work), (503, 0));
        let usage = health.usage.expect("usage says until when");
        assert_eq!(usage.status, UsageStatus::Rejected, "{late} late, {early} early");
        assert_eq!(usage.resets_at, Some(shared::time::rfc3339(100_000)), "{late} late, {early} early");
        assert_eq!(health.agent.map(|a| a.agent_id).as_deref(), Some(early));
    }
}

#[test]
fn pools_needs_the_admin_secret() {
    let admin = "admin-secret-0123456789";
    let mut edge = Edge::new(Config { admin_secret: Some(admin.into()), ..pool_config() }, 0);
    let h = request(&mut edge, 0, SECRET, "GET", "/pools", Value::Null);
    let (status, body) = answer(&h);
    assert_eq!(status, 403, "the pool's secret is not the admin's");
    // It says which secret opens it (it said "missing or wrong runner secret" to the
    // holder of the right runner secret).
    assert!(body["error"].as_str().unwrap().contains("ADMIN_SECRET"), "{body}");
    let h = request(&mut edge, 0, admin, "GET", "/pools", Value::Null);
    let (status, body) = answer(&h);
    assert_eq!((status, body["pools"][0]["pool"].as_str()), (200, Some("default")), "{body}");
    let mut closed_edge = Edge::new(pool_config(), 0);
    let h = request(&mut closed_edge, 0, SECRET, "GET", "/pools", Value::Null);
    let (status, body) = answer(&h);
    assert_eq!(status, 403, "no ADMIN_SECRET: closed");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("closed") && error.contains("set ADMIN_SECRET"), "{body}");
    // One refusal whether or not ADMIN_SECRET is set: a caller without it learns nothing
    // of the edge's settings from it.
    let set = request(&mut edge, 0, "not-a-secret-at-all-0123", "GET", "/pools", Value::Null);
    assert_eq!(answer(&set).1["error"].as_str(), Some(error), "{body}");
}

/// `/pools` takes GET alone, and the core's gate says so (405, naming GET) once the admin
/// secret is shown, as it does for any route: a host answers what the gate says and
/// decides no method itself. The Worker listed the pools for a GET and handed any other
/// method on to the default pool's object, past that pool's settings (a bad one answered
/// 500 where the admin asked a wrong method).
#[test]
fn pools_takes_get_alone_and_the_cores_gate_answers_the_rest() {
    use crate::http::{pools_gate, preflight, Gate};
    let admin = "admin-secret-0123456789";
    let cfg = Config { admin_secret: Some(admin.into()), ..pool_config() };
    for method in ["POST", "DELETE", "PUT", "HEAD"] {
        for gate in [pools_gate(method, Some(admin), Some(admin), None), preflight(&cfg, method, "/pools", Some(admin), None)] {
            let Gate::Answer(refused) = gate else { panic!("{method} /pools with the admin secret: not answered") };
            assert_eq!(refused.status, 405, "{method}: {}", refused.body);
            assert!(refused.body.contains("METHOD_NOT_ALLOWED") && refused.body.contains("use GET"), "{method}: {}", refused.body);
        }
        // Without the admin secret, refused for that first, whatever the method.
        let Gate::Answer(refused) = preflight(&cfg, method, "/pools", Some(SECRET), None) else { panic!("{method} /pools with the pool's secret") };
        assert_eq!(refused.status, 403, "{method}: {}", refused.body);
    }
    assert_eq!(pools_gate("GET", Some(admin), Some(admin), None), Gate::Handle { read_body: false });
    assert_eq!(preflight(&cfg, "GET", "/pools", Some(admin), None), Gate::Handle { read_body: false });
}

/// Whose connections a host counts a request's against: the secret's holder — the pool
/// (all its callers as one), a named caller, the admin — or none without a secret. Each
/// is one of `holders`, what a host's share is divided by.
#[test]
fn a_requests_holder_is_whose_secret_it_carries() {
    use crate::http::{holder, holders, Holder};
    let admin = "admin-secret-0123456789";
    let with_admin = Config { admin_secret: Some(admin.into()), ..pool_config() };
    let bearer = format!("Bearer {B_SECRET}");
    assert_eq!(holder(&with_admin, Some(SECRET), None), Some(Holder::Pool));
    assert_eq!(holder(&with_admin, Some(A_SECRET), None), Some(Holder::Caller("a".into())));
    assert_eq!(holder(&with_admin, None, Some(&bearer)), Some(Holder::Caller("b".into())));
    assert_eq!(holder(&with_admin, Some(admin), None), Some(Holder::Admin));
    assert_eq!(holder(&with_admin, Some("not-a-secret-at-all-0123"), None), None);
    assert_eq!(holder(&with_admin, None, None), None);
    assert_eq!(holders(&with_admin), 4, "the pool, a, b and the admin");
    assert_eq!(holders(&config()), 1, "the pool alone");
    assert_eq!(Holder::Caller("a".into()).to_string(), "caller a");
}

/// Pausing an agent the pool does not know said "agent `spark` (it is not in this pool's
/// AGENT_PUBLIC_KEYS) not found; check the URL (routes: /execute, …)": the URL was right,
/// the name was not. It says where the pool's agents are named.
#[test]
fn pausing_an_unknown_agent_says_where_its_agents_are_named() {
    let mut edge = Edge::new(pool_config(), 0);
    let h = request(&mut edge, 0, SECRET, "POST", "/agents/nobody/pause", Value::Null);
    let (status, body) = answer(&h);
    assert_eq!(status, 404, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("`nobody`") && error.contains("GET /health") && !error.contains("routes:"), "{body}");
}

/// A known route with another method said only "GET is not allowed on /execute": it says
/// which methods the route takes.
#[test]
fn a_wrong_method_is_told_the_routes_methods() {
    let mut edge = Edge::new(pool_config(), 0);
    for (method, path, says) in [
        ("GET", "/execute", "use POST"),
        ("DELETE", "/jobs", "use GET or POST"),
        ("POST", "/jobs/abc", "use GET or DELETE"),
        ("POST", "/oauth/status", "use GET"),
        ("GET", "/agents/spark/pause", "use POST"),
        ("POST", "/health", "use GET"),
        ("DELETE", "/", "use GET"),
    ] {
        let h = request(&mut edge, 0, SECRET, method, path, Value::Null);
        let (status, body) = answer(&h);
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert!(body["error"].as_str().unwrap().contains(says), "{method} {path}: {body}");
    }
}

/// One step of the property test below.
#[derive(Debug, Clone)]
enum Step {
    /// A job from caller `caller` needing label value `need` (none when 4; `k=3` only an
    /// agent that reconnected offering it offers), priority `p`.
    Submit { caller: u8, need: u8, priority: u8, repo: bool },
    /// Agent `a` finishes its oldest job and states its slots.
    Finish { a: usize },
    Pause { a: usize, pause: bool },
    /// Agent `a` says in a heartbeat that it is stopping (a drain).
    Stop { a: usize },
    /// Agent `a`, holding nothing, connects again (a restarted agent: no longer stopping);
    /// with `relabel`, offering `k=3` instead of its own label, or its own again.
    Reconnect { a: usize, relabel: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..3, 0u8..5, 0u8..10, any::<bool>()).prop_map(|(caller, need, priority, repo)| Step::Submit { caller, need, priority, repo }),
        2 => (0usize..3).prop_map(|a| Step::Finish { a }),
        1 => (0usize..3, any::<bool>()).prop_map(|(a, pause)| Step::Pause { a, pause }),
        1 => (0usize..3).prop_map(|a| Step::Stop { a }),
        1 => (0usize..3, any::<bool>()).prop_map(|(a, relabel)| Step::Reconnect { a, relabel }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Whatever mix of callers, labels, priorities, mirrors, pauses and agents coming
    /// back offering other labels: no agent ever has more orders than its stated slots, no
    /// job goes to an agent it does not fit or that is paused or stopping, and no job
    /// waits that an agent with a free slot, taking work, fits (one set aside when nobody
    /// fitted it goes when one does). (Turns are the queue's own property test.)
    #[test]
    fn dispatch_keeps_credits_labels_pauses_and_turns(steps in proptest::collection::vec(step(), 1..120)) {
        let mut edge = Edge::new(three_agents(), 0);
        let names = ["spark", "laptop", "gpu"];
        let caps = [2u32, 1, 3];
        let own = ["k=0", "k=1", "k=2"];
        let mut labels = own;
        let mut submitted = Vec::new();
        let mut sids = Vec::new();
        for (i, name) in names.iter().enumerate() {
            sids.push(enter(&mut edge, 0, name, i as u8 + 1, caps[i], labels[i], if i == 1 { &["github.com/o/r"] } else { &[] }));
        }
        let mut held: Vec<Vec<String>> = vec![Vec::new(); 3];
        let mut received = [0u64; 3];
        let mut paused = [false; 3];
        let mut stopping = [false; 3];
        let mut now = 1;
        for step in steps {
            now += 1;
            let mut out: Vec<Effect> = Vec::new();
            match step {
                Step::Submit { caller, need, priority, repo } => {
                    let mut body = json!({"prompt": "x", "caller": format!("c{caller}"), "priority": priority});
                    if need < 4 { body["labels"] = json!(format!("k={need}")); }
                    if repo { body["repo_url"] = json!("o/r"); }
                    let h = request(&mut edge, now, SECRET, "POST", "/jobs", body);
                    if let Some((202, body)) = answer_to(&h.effects, h.caller) {
                        submitted.push(body["job_id"].as_str().unwrap().to_string());
                    }
                    out.extend(h.effects);
                }
                Step::Finish { a } => {
                    if !held[a].is_empty() {
                        let job = held[a].remove(0);
                        out.extend(say(&mut edge, now, &sids[a], AgentMessage::Accepted { job_id: job.clone() }));
                        let msg = AgentMessage::result(&job, &edge.job(&job).unwrap().order_nonce(), ok_result(), &link(&edge, &sids[a]));
                        out.extend(say(&mut edge, now, &sids[a], msg));
                        // A stopping agent says 0; free slots here test the edge's own rule.
                        out.extend(say(&mut edge, now, &sids[a], credit(caps[a] - held[a].len() as u32, received[a])));
                    }
                }
                Step::Stop { a } => {
                    stopping[a] = true;
                    let running: Vec<&str> = held[a].iter().map(String::as_str).collect();
                    let stop = Beat { capacity: caps[a], stopping: true, ..beat(&running, 0, received[a]) };
                    out.extend(pulse(&mut edge, now, &sids[a], stop));
                }
                Step::Reconnect { a, relabel } => {
                    if held[a].is_empty() {
                        if relabel {
                            labels[a] = if labels[a] == "k=3" { own[a] } else { "k=3" };
                        }
                        out.extend(edge.disconnect(now, &sids[a]));
                        // As `enter`, keeping what its first credit sends.
                        let (sid, effects) = edge.connect(now, [200 + a as u8; 64], PEER, Some(AGENT_NONCE));
                        let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
                        let mirrors: &[&str] = if a == 1 { &["github.com/o/r"] } else { &[] };
                        let hello = Hello {
                            capacity: caps[a],
                            labels: parse_labels(labels[a]).unwrap(),
                            mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
                            ..hello(names[a], nonce, now)
                        };
                        let effects = edge.message(now, &sid, &hello_text(&hello, &agent_key(a as u8 + 1)));
                        prop_assert!(closed(&effects).is_none(), "{:?}", effects);
                        sids[a] = sid;
                        stopping[a] = false;
                        received[a] = 0;
                        out.extend(say(&mut edge, now, &sids[a], credit(caps[a], 0)));
                    }
                }
                Step::Pause { a, pause } => {
                    paused[a] = pause;
                    let action = if pause { "pause" } else { "resume" };
                    out.extend(request(&mut edge, now, SECRET, "POST", &format!("/agents/{}/{action}", names[a]), Value::Null).effects);
                }
            }
            // What went out in this step, agent by agent.
            for (a, name) in names.iter().enumerate() {
                for msg in sent(&out, &sids[a]) {
                    let EdgeMessage::Job { envelope } = msg else { continue };
                    let order: JobOrder = open_order(&envelope, Domain::Job, &edge_key().verifying_key(), Audience { agent_id: name, pool: "default" }, now).unwrap();
                    let job = edge.job(&order.header.job_id).unwrap();
                    prop_assert!(!paused[a], "job sent to paused {}", name);
                    prop_assert!(!stopping[a], "job sent to stopping {}", name);
                    prop_assert!(job.placement.fits(name, &parse_labels(labels[a]).unwrap()), "{} does not fit {}", job.id, name);
                    held[a].push(job.id.clone());
                    received[a] += 1;
                }
                prop_assert!(held[a].len() as u32 <= caps[a], "{} holds {} orders with {} slots", name, held[a].len(), caps[a]);
            }
            for id in &submitted {
                let job = edge.job(id).unwrap();
                if job.state != JobState::Queued {
                    continue;
                }
                for (a, name) in names.iter().enumerate() {
                    let free = !paused[a] && !stopping[a] && (held[a].len() as u32) < caps[a];
                    prop_assert!(!free || !job.placement.fits(name, &parse_labels(labels[a]).unwrap()), "{} waits while {} is free and fits it", id, name);
                }
            }
        }
    }
}

/// Another caller's job and a job nobody sent are answered alike, whatever the method:
/// the ownership check came before method routing, so `PUT /jobs/<b's id>` answered 404
/// where `PUT /jobs/<made-up id>` answered 405, and a caller could tell real ids of
/// others from made-up ones.
#[test]
fn another_callers_job_and_a_made_up_one_are_answered_alike_for_every_method() {
    let mut edge = Edge::new(pool_config(), 0);
    let of_b = submit(&mut edge, 0, B_SECRET, json!({"prompt": "b's task"}));
    // The same shape as b's id, one character changed.
    let made_up = format!("{}{}", &of_b[..of_b.len() - 1], if of_b.ends_with('0') { '1' } else { '0' });
    assert!(edge.job(&made_up).is_none());
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        for tail in ["", "/events"] {
            let asked = |edge: &mut Edge, id: &str| {
                let (status, body) = answer(&request(edge, 1, A_SECRET, method, &format!("/jobs/{id}{tail}"), Value::Null));
                (status, body.to_string().replace(id, "<id>"))
            };
            let others = asked(&mut edge, &of_b);
            let nobodys = asked(&mut edge, &made_up);
            assert_eq!(others, nobodys, "{method} /jobs/<id>{tail}: b's job told apart from a made-up one");
        }
    }
    assert_eq!(edge.job(&of_b).unwrap().state, JobState::Queued, "b's job was not cancelled");
}

#[test]
fn a_callers_own_secret_sees_and_cancels_only_its_own_jobs() {
    let mut edge = Edge::new(pool_config(), 0);
    let of_b = submit(&mut edge, 0, B_SECRET, json!({"prompt": "b's task"}));
    let of_a = submit(&mut edge, 1, A_SECRET, json!({"prompt": "a's task"}));
    for (method, path) in [("GET", format!("/jobs/{of_b}")), ("GET", format!("/jobs/{of_b}/events")), ("DELETE", format!("/jobs/{of_b}"))] {
        let h = request(&mut edge, 2, A_SECRET, method, &path, Value::Null);
        assert_eq!(answer(&h).0, 404, "{method} {path}: another caller's job is not a's to see or cancel");
    }
    assert_eq!(edge.job(&of_b).unwrap().state, JobState::Queued, "b's job was not cancelled");
    let h = request(&mut edge, 2, A_SECRET, "GET", "/jobs", Value::Null);
    let (status, list) = answer(&h);
    let ids: Vec<&str> = list["active"].as_array().unwrap().iter().map(|j| j["job_id"].as_str().unwrap()).collect();
    assert_eq!((status, ids), (200, vec![of_a.as_str()]), "a lists only its own jobs");
    // Its own job it sees and cancels; the pool's secret sees and cancels any.
    let h = request(&mut edge, 3, A_SECRET, "GET", &format!("/jobs/{of_a}"), Value::Null);
    assert_eq!(answer(&h).0, 200);
    let h = request(&mut edge, 3, A_SECRET, "DELETE", &format!("/jobs/{of_a}"), Value::Null);
    assert_eq!(answer(&h).0, 202);
    let h = request(&mut edge, 3, SECRET, "GET", &format!("/jobs/{of_b}"), Value::Null);
    assert_eq!(answer(&h).0, 200);
}

#[test]
fn a_callers_own_secret_cannot_relay_a_login() {
    let mut edge = Edge::new(pool_config(), 0);
    // Logging the machine into an account is the operator's, like pausing it.
    for path in ["/oauth/login", "/oauth/login/code"] {
        let h = request(&mut edge, 4, A_SECRET, "POST", path, json!({}));
        assert_eq!(answer(&h).0, 403, "{path} with a caller's own secret");
    }
}

#[test]
fn an_idempotency_key_is_each_callers_own() {
    let mut edge = Edge::new(pool_config(), 0);
    let keyed = |edge: &mut Edge, now: u64, secret: &str, prompt: &str| answer(&http::handle(edge, now, [now as u8; 16], &keyed(secret, json!({"prompt": prompt}))));
    let (status, of_a) = keyed(&mut edge, 0, A_SECRET, "a's task");
    assert_eq!(status, 202);
    // b guessing a's key and task gets a job of its own, not a's (nor its result).
    let (status, of_b) = keyed(&mut edge, 1, B_SECRET, "a's task");
    assert_eq!(status, 202, "{of_b}");
    assert_ne!(of_a["job_id"], of_b["job_id"]);
    // With another task, b's answer names no job of a's.
    let (status, body) = keyed(&mut edge, 2, SECRET, "other");
    assert_eq!(status, 202, "{body}");
    let (status, again) = keyed(&mut edge, 3, A_SECRET, "a's task");
    assert_eq!((status, &again["job_id"]), (200, &of_a["job_id"]), "a's own retry finds its job");
    let (status, conflict) = keyed(&mut edge, 4, B_SECRET, "another task");
    assert_eq!(status, 409);
    assert_eq!(conflict["job_id"], of_b["job_id"], "{conflict}");
}

/// A key is its caller's, and a caller with its own secret is not the pool secret's name
/// of it: a key the pool's secret used for `x` before `x` had a secret does not answer
/// `x`'s own secret with that job (whose holder could have planted it, guessing the key
/// and the task), nor the other way round — a 409, never a second run of the task.
#[test]
fn an_idempotency_key_used_by_the_pools_secret_does_not_answer_the_callers_own() {
    const X_SECRET: &str = "caller-x-secret-0123456789";
    let saved = |h: Handled| -> Vec<Job> {
        h.effects.into_iter().filter_map(|e| if let Effect::Save(j) = e { Some(std::sync::Arc::unwrap_or_clone(j)) } else { None }).collect()
    };
    let mut edge = Edge::new(pool_config(), 0);
    let h = http::handle(&mut edge, 1, [1; 16], &keyed(SECRET, json!({"prompt": "x's task", "caller": "x"})));
    let (status, planted) = answer(&h);
    assert_eq!(status, 202, "{planted}");
    // The edge restarts with `x` given its own secret.
    let after = Config { caller_secrets: vec![("a".into(), A_SECRET.into()), ("x".into(), X_SECRET.into())], ..pool_config() };
    let (mut edge, _) = Edge::restore(after, saved(h), vec![], None, 10);
    let (status, body) = answer(&http::handle(&mut edge, 11, [11; 16], &keyed(X_SECRET, json!({"prompt": "x's task"}))));
    assert_eq!((status, body["error_code"].as_str()), (409, Some("CONFLICT")), "x's own secret is not answered with the pool secret's job: {body}");
    assert!(body["error"].as_str().unwrap().contains("new key"), "says what to do: {body}");
    assert_eq!(edge.queued(), 1, "and nothing new was queued");
    // The pool's secret may no longer name `x` at all (its job stays readable by id).
    let (status, again) = answer(&http::handle(&mut edge, 12, [12; 16], &keyed(SECRET, json!({"prompt": "x's task", "caller": "x"}))));
    assert_eq!(status, 403, "{again}");
    // Before the restart, its retry found its job: the key is refused only across senders.
    let mut edge = Edge::new(pool_config(), 0);
    let first = answer(&http::handle(&mut edge, 1, [1; 16], &keyed(SECRET, json!({"prompt": "x's task", "caller": "x"})))).1;
    let (status, again) = answer(&http::handle(&mut edge, 2, [2; 16], &keyed(SECRET, json!({"prompt": "x's task", "caller": "x"}))));
    assert_eq!((status, &again["job_id"]), (200, &first["job_id"]), "{again}");

    // The other way round: a key `a` used with its own secret, retried after `a`'s secret
    // was taken away (the pool's secret may then name `a`), is not the pool secret's.
    let mut edge = Edge::new(pool_config(), 0);
    let h = http::handle(&mut edge, 1, [1; 16], &keyed(A_SECRET, json!({"prompt": "a's task"})));
    assert_eq!(answer(&h).0, 202);
    let (mut edge, _) = Edge::restore(Config { caller_secrets: vec![], ..pool_config() }, saved(h), vec![], None, 10);
    let (status, body) = answer(&http::handle(&mut edge, 11, [11; 16], &keyed(SECRET, json!({"prompt": "a's task", "caller": "a"}))));
    assert_eq!(status, 409, "{body}");
}

#[test]
fn a_name_with_its_own_secret_belongs_to_that_secret() {
    // Whoever holds the pool's secret cannot send jobs as `a`: neither fill a's queue cap
    // (a's own jobs would be refused) nor take a's turns.
    let mut edge = Edge::new(Config { max_queued_per_caller: 2, ..pool_config() }, 0);
    // Names are one whatever their case: `A` is `a`.
    for (i, (path, name)) in [("/jobs", "a"), ("/execute", "a"), ("/jobs", "A"), ("/execute", "A")].into_iter().enumerate() {
        let h = request(&mut edge, i as u64, SECRET, "POST", path, json!({"prompt": "x", "caller": name}));
        let (status, body) = answer(&h);
        assert_eq!((status, body["error_code"].as_str()), (403, Some("UNAUTHORIZED")), "{path}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("`a`") && error.contains("RUNNER_SECRETS"), "says whose secret to use: {error}");
    }
    assert_eq!(edge.queued(), 0, "nothing was queued as a");
    for (i, name) in [(0, "a"), (1, "A")] {
        // a's own secret may name itself in any case.
        let own = submit(&mut edge, 10 + i, A_SECRET, json!({"prompt": "a's own", "caller": name}));
        assert_eq!(edge.job(&own).unwrap().placement.caller(), "a");
    }
    // b's secret may not either; names without a secret stay the pool secret's to give.
    let h = request(&mut edge, 12, B_SECRET, "POST", "/jobs", json!({"prompt": "x", "caller": "a"}));
    assert_eq!(answer(&h).0, 403);
    let nightly = submit(&mut edge, 13, SECRET, json!({"prompt": "x", "caller": "Nightly"}));
    assert_eq!(edge.job(&nightly).unwrap().placement.caller(), "nightly", "one lane for `Nightly` and `nightly`");

    let unnamed = submit(&mut edge, 14, SECRET, json!({"prompt": "x"}));
    assert_eq!(edge.job(&unnamed).unwrap().placement.caller(), shared::placement::DEFAULT_CALLER);
}

/// Each order names its job's caller as the edge knows it — lowered, `default` for a
/// request that names none — inside the edge's signature: the agent resumes a Claude
/// session only for the caller whose job made it (agent/src/sessions.rs) — and whether
/// that caller is proven.
#[test]
fn a_job_order_names_its_jobs_caller() {
    let mut edge = Edge::new(pool_config(), 0);
    let sid = enter(&mut edge, 0, "spark", 1, 4, "", &[]);
    let cases = [
        (A_SECRET, json!({"prompt": "x", "caller": "A"}), "a", true),
        (B_SECRET, json!({"prompt": "x"}), "b", true),
        (SECRET, json!({"prompt": "x", "caller": "Nightly"}), "nightly", false),
        (SECRET, json!({"prompt": "x"}), shared::placement::DEFAULT_CALLER, false),
    ];
    for (now, (secret, body, caller, proven)) in (1..).zip(cases) {
        let h = request(&mut edge, now, secret, "POST", "/jobs", body);
        assert_eq!(answer(&h).0, 202);
        let order = order_of(&h.effects, &sid, "spark", now);
        // Proven: sent with the caller's own secret. The pool's secret's names are not:
        // its holder may make up any number (agent/src/sessions.rs weighs them as one).
        assert_eq!((order.caller.as_str(), order.caller_proven), (caller, Some(proven)));
    }
}

/// Proven means sent with the caller's own secret, as the job was submitted — not whether
/// its name has a secret when the job is sent. A job the pool's secret named `x` while `x`
/// had none, still queued when the edge restarts with `x` given its own secret, goes out
/// unproven; one `c` sent with its own secret, queued when its secret is taken away, goes
/// out unproven too (the share goes with the secret); `a`'s, whose secret stays, proven.
#[test]
fn whether_a_caller_is_proven_is_decided_when_its_job_is_submitted() {
    const X_SECRET: &str = "caller-x-secret-0123456789";
    const C_SECRET: &str = "caller-c-secret-0123456789";
    let before = Config { caller_secrets: vec![("a".into(), A_SECRET.into()), ("c".into(), C_SECRET.into())], ..pool_config() };
    let mut edge = Edge::new(before, 0);
    let mut saved = std::collections::HashMap::new();
    for (now, (secret, body)) in (1..).zip([(SECRET, json!({"prompt": "x", "caller": "x"})), (C_SECRET, json!({"prompt": "x"})), (A_SECRET, json!({"prompt": "x"}))]) {
        let h = request(&mut edge, now, secret, "POST", "/jobs", body);
        assert_eq!(answer(&h).0, 202);
        for e in h.effects {
            if let Effect::Save(j) = e {
                saved.insert(j.id.clone(), std::sync::Arc::unwrap_or_clone(j));
            }
        }
    }
    let after = Config { caller_secrets: vec![("a".into(), A_SECRET.into()), ("x".into(), X_SECRET.into())], ..pool_config() };
    let (mut edge, _) = Edge::restore(after, saved.into_values().collect(), vec![], None, 10);
    let (sid, effects) = edge.connect(10, [101; 64], PEER, Some(AGENT_NONCE));
    let EdgeMessage::Challenge { nonce, .. } = &sent(&effects, &sid)[0] else { panic!("challenge first") };
    let effects = edge.message(10, &sid, &hello_text(&Hello { capacity: 3, ..hello("spark", nonce, 10) }, &agent_key(1)));
    assert!(closed(&effects).is_none(), "{effects:?}");
    let effects = say(&mut edge, 10, &sid, credit(3, 0));
    let orders: Vec<(String, Option<bool>)> = sent(&effects, &sid)
        .into_iter()
        .filter_map(|m| match m {
            EdgeMessage::Job { envelope } => Some(envelope),
            _ => None,
        })
        .map(|e| open_order::<JobOrder>(&e, Domain::Job, &edge_key().verifying_key(), Audience { agent_id: "spark", pool: "default" }, 10).unwrap())
        .map(|o| (o.caller, o.caller_proven))
        .collect();
    let mut orders = orders;
    orders.sort();
    assert_eq!(orders, [("a".to_string(), Some(true)), ("c".to_string(), Some(false)), ("x".to_string(), Some(false))]);
}

#[test]
fn a_callers_own_secret_sees_its_part_of_health_and_not_the_operators() {
    let mut edge = Edge::new(three_agents(), 0);
    enter(&mut edge, 0, "spark", 1, 1, "os=linux", &[]);
    // spark's one slot runs b's first job; b has two more waiting, a one.
    for i in 0..3 {
        submit(&mut edge, 1 + i, B_SECRET, json!({"prompt": "b's secret plans"}));
    }
    submit(&mut edge, 5, A_SECRET, json!({"prompt": "x"}));
    let h = request(&mut edge, 6, A_SECRET, "GET", "/health", Value::Null);
    let (status, body) = answer(&h);
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["status"].as_str(), body["agents_taking_work"].as_u64()), (Some("healthy"), Some(1)), "{body}");
    assert_eq!(body["agents"], json!([{"agent_id": "spark", "labels": {"os": "linux"}, "takes_work": true}]));
    assert_eq!(body["queued_jobs"], 1, "a's own queue, not the pool's 3: {body}");
    for operators in ["agent", "oauth"] {
        assert!(body.get(operators).is_none(), "{operators} is the operator's: {body}");
    }
    let text = body.to_string();
    assert!(!text.contains("\"b\"") && !text.contains("version") && !text.contains("running_jobs"), "{text}");
    // The operator's secret sees it all; no secret the verdict alone.
    let (_, full) = answer(&request(&mut edge, 7, SECRET, "GET", "/health", Value::Null));
    assert_eq!((full["queued_jobs"].as_u64(), full["agent"]["agent_id"].as_str()), (Some(3), Some("spark")), "{full}");
    let (_, open) = answer(&request(&mut edge, 7, "", "GET", "/health", Value::Null));
    assert_eq!(open, json!({"status": "healthy"}));
    // The login and the counters are the operator's.
    for path in ["/oauth/status", "/metrics"] {
        let (status, body) = answer(&request(&mut edge, 8, A_SECRET, "GET", path, Value::Null));
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("RUNNER_SECRET"), "{body}");
        let h = request(&mut edge, 8, SECRET, "GET", path, Value::Null);
        let status = h.effects.iter().find_map(|e| match e {
            Effect::Answer { caller, response } if *caller == h.caller => Some(response.status),
            _ => None,
        });
        assert_eq!(status, Some(200), "{path} with the pool's secret");
    }
}

/// A heartbeat, MACed on its connection, of an agent with `capacity` slots running
/// `running`, having received `received` orders, with this login.
fn beat_with(edge: &mut Edge, now: u64, sid: &str, capacity: u32, running: &[&str], received: u64, oauth: OAuthReport) -> Vec<Effect> {
    let free = capacity - running.len() as u32;
    let agent = edge.session(sid).and_then(|s| s.agent()).expect("a proven session");
    let beat = Beat {
        challenge: agent.challenge.clone(),
        seq: agent.beat + 1,
        running: running.iter().map(|s| s.to_string()).collect(),
        capacity,
        oauth,
        slots: Slots { free, received },
        claude_version: None,
        stopping: false,
        cannot_start: None,
        finished: Vec::new(),
        more_finished: false,
    };
    say(edge, now, sid, AgentMessage::heartbeat(&beat, &agent.keys.agent_to_edge))
}

fn broken_login() -> OAuthReport {
    OAuthReport { auth_failed: true, ..oauth() }
}

#[test]
fn execute_falls_back_at_once_when_every_agent_that_fits_needs_a_login() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 4, "gpu=none", &[]);
    let gpu = enter(&mut edge, 0, "gpu", 3, 1, "gpu=a100", &[]);
    beat_with(&mut edge, 1, &gpu, 1, &[], 0, broken_login());
    assert_eq!(edge.availability(2), crate::machine::Availability::Ready, "the pool as a whole can work");
    // A gpu job: its only agent cannot log in, so the caller falls back now, told why.
    let h = request(&mut edge, 2, SECRET, "POST", "/execute", json!({"prompt": "x", "labels": "gpu=a100"}));
    let (status, body) = answer(&h);
    assert_eq!((status, body["error_code"].as_str(), body["fallback"].as_bool()), (503, Some("RUNNER_OAUTH_ERROR"), Some(true)), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("gpu (gpu=a100): its Claude OAuth login needs renewing") && !error.contains("spark"), "{error}");
    assert_eq!(edge.queued(), 0, "a job its caller was told to run elsewhere is never queued");
    // Jobs any agent fits go on; POST /jobs for the gpu waits for the new login.
    let h = request(&mut edge, 3, SECRET, "POST", "/execute", json!({"prompt": "x"}));
    assert!(answer_to(&h.effects, h.caller).is_none(), "waits for its result");
    assert_eq!(edge.active_jobs(), 1);
    let waits = submit(&mut edge, 4, SECRET, json!({"prompt": "x", "labels": "gpu=a100"}));
    assert_eq!(edge.job(&waits).unwrap().state, JobState::Queued);
    // A second gpu agent, paused: still nobody that fits can take it, and the answer says
    // each one's reason.
    let mut edge2 = Edge::new(Config { agents: Keyring::from_keys([
        ("gpu".to_string(), agent_key(3).verifying_key()),
        ("gpu2".to_string(), agent_key(4).verifying_key()),
        ("spark".to_string(), agent_key(1).verifying_key()),
    ]), ..pool_config() }, 0);
    enter(&mut edge2, 0, "spark", 1, 4, "gpu=none", &[]);
    let g1 = enter(&mut edge2, 0, "gpu", 3, 1, "gpu=a100", &[]);
    enter(&mut edge2, 0, "gpu2", 4, 1, "gpu=a100", &[]);
    beat_with(&mut edge2, 1, &g1, 1, &[], 0, broken_login());
    let h = request(&mut edge2, 2, SECRET, "POST", "/agents/gpu2/pause", Value::Null);
    assert_eq!(answer(&h).0, 200);
    let (status, body) = answer(&request(&mut edge2, 3, SECRET, "POST", "/execute", json!({"prompt": "x", "labels": "gpu=a100"})));
    assert_eq!((status, body["error_code"].as_str()), (503, Some("RUNNER_OAUTH_ERROR")), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("gpu2 (gpu=a100): paused") && error.contains("gpu (gpu=a100): its Claude OAuth"), "{error}");
    let _ = spark;
}

#[test]
fn a_queued_execute_falls_back_when_the_agents_that_fit_it_lose_their_login() {
    let mut edge = Edge::new(three_agents(), 0);
    enter(&mut edge, 0, "spark", 1, 4, "gpu=none", &[]);
    let gpu = enter(&mut edge, 0, "gpu", 3, 1, "gpu=a100", &[]);
    // The gpu agent's one slot is busy; a second gpu /execute waits for it.
    let busy = submit(&mut edge, 1, SECRET, json!({"prompt": "x", "labels": "gpu=a100"}));
    let h = request(&mut edge, 2, SECRET, "POST", "/execute", json!({"prompt": "x", "labels": "gpu=a100"}));
    assert!(answer_to(&h.effects, h.caller).is_none());
    let detached = submit(&mut edge, 3, SECRET, json!({"prompt": "x", "labels": "gpu=a100"}));
    // Its login breaks: the waiting caller is sent elsewhere now, not at its timeout —
    // though spark, which it does not fit, works.
    say(&mut edge, 4, &gpu, AgentMessage::Accepted { job_id: busy.clone() });
    let effects = beat_with(&mut edge, 5, &gpu, 1, &[busy.as_str()], 1, broken_login());
    let (status, body) = answer_to(&effects, h.caller).expect("the waiting caller is answered");
    assert_eq!((status, body["error_code"].as_str(), body["fallback"].as_bool()), (503, Some("RUNNER_OAUTH_ERROR"), Some(true)), "{body}");
    assert!(body["error"].as_str().unwrap().contains("gpu (gpu=a100)"), "{body}");
    assert_eq!(edge.job(&detached).unwrap().state, JobState::Queued, "POST /jobs waits for the login");
}

#[test]
fn execute_falls_back_with_retry_at_when_the_agents_that_fit_it_used_their_window() {
    use shared::usage::{UsageStatus, UsageWindow};
    let mut edge = Edge::new(three_agents(), 0);
    enter(&mut edge, 0, "spark", 1, 4, "gpu=none", &[]);
    let gpu = enter(&mut edge, 0, "gpu", 3, 1, "gpu=a100", &[]);
    let reset = 3_600_000;
    let usage = UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(reset), utilization: None, seen_at: 0 };
    beat_with(&mut edge, 1, &gpu, 1, &[], 0, OAuthReport { usage: Some(usage), ..oauth() });
    let h = request(&mut edge, 1_000, SECRET, "POST", "/execute", json!({"prompt": "x", "agent_id": "gpu"}));
    let response = h.effects.iter().find_map(|e| match e {
        Effect::Answer { caller, response } if *caller == h.caller => Some(response.clone()),
        _ => None,
    }).expect("answered at once");
    let body: Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!((response.status, body["error_code"].as_str()), (503, Some("USAGE_LIMIT")), "{body}");
    assert_eq!(body["retry_at"].as_str(), Some(shared::time::rfc3339(reset).as_str()));
    assert_eq!(response.headers, vec![("retry-after", "3599".to_string())], "the reset of the agent that fits");
    assert!(body["error"].as_str().unwrap().contains("gpu (gpu=a100): its usage window is used up"), "{body}");
}

#[test]
fn a_held_job_says_its_fitting_agents_login_when_its_wait_runs_out() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 4, "gpu=none", &[]);
    let gpu = enter(&mut edge, 0, "gpu", 3, 1, "gpu=a100", &[]);
    beat_with(&mut edge, 1, &gpu, 1, &[], 0, broken_login());
    let held = submit(&mut edge, 2, SECRET, json!({"prompt": "x", "labels": "gpu=a100"}));
    let mut ended = Vec::new();
    for t in (500..=31_000).step_by(500) {
        beat_with(&mut edge, t, &gpu, 1, &[], 0, broken_login());
        beat_with(&mut edge, t, &spark, 4, &[], 0, oauth());
        ended.extend(finished(&edge.tick(t)));
    }
    let (_, _, body) = ended.iter().find(|(id, _, _)| *id == held).expect("its wait ran out");
    assert_eq!(body["error_code"], "RUNNER_OAUTH_ERROR", "the gpu agent's login, not a plain timeout: {body}");
}

/// `wait_for_usage: false` asks `POST /jobs` to be refused at once "like `/execute`", and
/// `/execute` judges the usage window by the agents that fit the job: a gpu job whose only
/// gpu agent used its window is refused at once, and one already queued ends, though
/// another agent (which the job does not fit) still works — not held for QUEUE_TTL_MS.
#[test]
fn a_job_that_will_not_wait_for_the_window_is_judged_by_the_agents_that_fit_it() {
    use shared::usage::{UsageStatus, UsageWindow};
    let mut edge = Edge::new(three_agents(), 0);
    enter(&mut edge, 0, "spark", 1, 4, "gpu=none", &[]);
    let gpu = enter(&mut edge, 0, "gpu", 3, 1, "gpu=a100", &[]);
    // Queued behind a busy gpu before its window runs out.
    let busy = submit(&mut edge, 1, SECRET, json!({"prompt": "x", "labels": "gpu=a100"}));
    let queued = submit(&mut edge, 2, SECRET, json!({"prompt": "x", "labels": "gpu=a100", "wait_for_usage": false}));
    let waits = submit(&mut edge, 3, SECRET, json!({"prompt": "x", "labels": "gpu=a100"}));
    say(&mut edge, 4, &gpu, AgentMessage::Accepted { job_id: busy.clone() });
    let reset = 3_600_000;
    let usage = UsageWindow { status: UsageStatus::Rejected, kind: Some("five_hour".into()), resets_at: Some(reset), utilization: None, seen_at: 0 };
    let effects = beat_with(&mut edge, 5, &gpu, 1, &[busy.as_str()], 1, OAuthReport { usage: Some(usage), ..oauth() });
    assert_eq!(edge.availability(5), crate::machine::Availability::Ready, "spark still works");
    let ended = finished(&effects);
    let (_, _, body) = ended.iter().find(|(id, _, _)| *id == queued).unwrap_or_else(|| panic!("the job that would not wait ended: {ended:?}"));
    assert_eq!(body["error_code"], "USAGE_LIMIT", "{body}");
    assert_eq!(edge.job(&waits).unwrap().state, JobState::Queued, "a job that waits for the window waits");
    let h = request(&mut edge, 1_000, SECRET, "POST", "/jobs", json!({"prompt": "x", "labels": "gpu=a100", "wait_for_usage": false}));
    let (status, body) = answer(&h);
    assert_eq!((status, body["error_code"].as_str(), body["retry_at"].as_str()), (503, Some("USAGE_LIMIT"), Some(shared::time::rfc3339(reset).as_str())), "{body}");
    // A job spark fits is taken as ever.
    submit(&mut edge, 1_001, SECRET, json!({"prompt": "x", "wait_for_usage": false}));
}

/// The cap on ended jobs kept (`MAX_RETAINED_JOBS`, `MAX_RETAINED_BYTES`) is shared, so
/// what goes first when it is reached is the oldest of the owner holding the most: a
/// caller with its own secret, or everything the pool's secret sent (whatever names it
/// gave), each one owner. One caller's flood of jobs that end at once (submit, cancel)
/// made every other caller's results forgotten before they were read.
#[test]
fn one_callers_flood_of_ended_jobs_does_not_push_out_anothers_results() {
    let mut edge = Edge::new(Config { max_retained_jobs: 4, max_retained_bytes: 1 << 30, ..pool_config() }, 0);
    let ended = |edge: &mut Edge, now: u64, secret: &str, body: Value| {
        let id = submit(edge, now, secret, body);
        let h = request(edge, now, secret, "DELETE", &format!("/jobs/{id}"), Value::Null);
        assert_eq!(answer(&h).0, 202);
        id
    };
    let of_a = ended(&mut edge, 1, A_SECRET, json!({"prompt": "a's task"}));
    let of_pool = ended(&mut edge, 2, SECRET, json!({"prompt": "the pool's task"}));
    let mut of_b = Vec::new();
    for i in 0..10 {
        of_b.push(ended(&mut edge, 10 + i, B_SECRET, json!({"prompt": format!("b's flood {i}")})));
    }
    assert!(edge.job(&of_a).is_some(), "a's result was pushed out by b's flood");
    assert!(edge.job(&of_pool).is_some(), "the pool secret's result was pushed out by b's flood");
    let kept_of_b: Vec<&String> = of_b.iter().filter(|id| edge.job(id).is_some()).collect();
    assert_eq!(kept_of_b, [&of_b[8], &of_b[9]], "b's newest are kept, within the cap");
    // The pool's secret floods under made-up names: one owner, whose oldest go.
    for i in 0..10 {
        ended(&mut edge, 30 + i, SECRET, json!({"prompt": "x", "caller": format!("made-up-{i}")}));
    }
    assert!(edge.job(&of_a).is_some(), "a's result was pushed out by the pool secret's made-up callers");
    assert!(edge.job(&of_pool).is_none(), "the pool secret's own oldest went first");
    // Alone, an owner's oldest goes first, as before.
    let mut edge = Edge::new(Config { max_retained_jobs: 2, max_retained_bytes: 1 << 30, ..pool_config() }, 0);
    let ids: Vec<String> = (0..3).map(|i| ended(&mut edge, i, A_SECRET, json!({"prompt": format!("t{i}")}))).collect();
    assert_eq!(ids.iter().map(|id| edge.job(id).is_some()).collect::<Vec<_>>(), [false, true, true]);
}

/// Event streams are capped in all (`MAX_FOLLOWERS`): a caller with its own secret may hold
/// at most its equal share of them (a third: the pool's callers, a and b), so it cannot
/// take every place and leave the other callers' streams refused (429).
#[test]
fn one_caller_cannot_take_every_event_stream() {
    let mut edge = Edge::new(pool_config(), 0);
    let of_a: Vec<String> = (0..4).map(|i| submit(&mut edge, i, A_SECRET, json!({"prompt": format!("a{i}")}))).collect();
    let mut followed = 0;
    for id in &of_a {
        for _ in 0..crate::progress::MAX_FOLLOWERS_PER_JOB {
            let h = request(&mut edge, 5, A_SECRET, "GET", &format!("/jobs/{id}/events"), Value::Null);
            if h.reply == crate::http::Reply::Stream {
                followed += 1;
            } else {
                let (status, body) = answer(&h);
                assert_eq!(status, 429, "{body}");
                assert!(body["error"].as_str().unwrap().contains("`a`"), "says whose streams: {body}");
            }
        }
    }
    assert_eq!(followed, crate::progress::MAX_FOLLOWERS / 3, "a holds its share of the streams, no more");
    let of_b = submit(&mut edge, 6, B_SECRET, json!({"prompt": "b"}));
    let h = request(&mut edge, 7, B_SECRET, "GET", &format!("/jobs/{of_b}/events"), Value::Null);
    assert_eq!(h.reply, crate::http::Reply::Stream, "b's stream was refused: a holds every place");
    // The pool's secret is the operator's: its streams are held to the caps in all alone.
    let mine = submit(&mut edge, 8, SECRET, json!({"prompt": "mine"}));
    let h = request(&mut edge, 9, SECRET, "GET", &format!("/jobs/{mine}/events"), Value::Null);
    assert_eq!(h.reply, crate::http::Reply::Stream);
}

/// A job's callback is signed with the secret it was sent with: a caller with its own
/// secret (`RUNNER_SECRETS`) does not hold the pool's `RUNNER_SECRET`, so a callback signed
/// with that one it could not check (and could not tell from a forged one) unless the
/// operator gave it the pool's secret — the operator's powers with it.
#[test]
fn a_callback_is_signed_with_the_secret_its_job_was_sent_with() {
    let mut edge = Edge::new(pool_config(), 0);
    let signed = |edge: &mut Edge, now: u64, secret: &str| {
        let id = submit(edge, now, secret, json!({"prompt": "x", "callback_url": "https://hooks.example.com/r"}));
        let h = request(edge, now, secret, "DELETE", &format!("/jobs/{id}"), Value::Null);
        let post = h
            .effects
            .iter()
            .find_map(|e| match e {
                Effect::Post(p) if p.id.starts_with("callback:") => Some(p.clone()),
                _ => None,
            })
            .expect("the callback is posted");
        let header = |name: &str| post.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
        let ts: u64 = header("x-runner-timestamp").parse().unwrap();
        (header("x-runner-signature"), ts, post.body.clone())
    };
    let (signature, ts, body) = signed(&mut edge, 1, A_SECRET);
    assert_eq!(signature, crate::notify::signature(A_SECRET, ts, &body), "a's callback is not signed with a's own secret");
    let (signature, ts, body) = signed(&mut edge, 2, SECRET);
    assert_eq!(signature, crate::notify::signature(SECRET, ts, &body), "the pool secret's job: the pool's secret");
}

/// What a caller put where a job id goes is echoed only if it is a plain id: a path of
/// 100 kB (or an id of odd characters) was repeated whole in the 404's sentence and the
/// `Last-Event-ID` refusal's `job_id`.
#[test]
fn a_made_up_job_id_is_not_echoed_whole() {
    let mut edge = Edge::new(pool_config(), 0);
    let long = "x".repeat(100_000);
    for (path, last_event_id) in [
        (format!("/jobs/{long}"), None),
        (format!("/jobs/{long}/events"), Some("nope")),
        ("/jobs/%0A%0Dx<script>".to_string(), None),
    ] {
        let method = if path.ends_with("events") { "GET" } else { "DELETE" };
        let req = Request {
            method: method.into(),
            path: path.clone(),
            secret_header: Some(SECRET.into()),
            authorization: None,
            idempotency_key: None,
            last_event_id: last_event_id.map(str::to_string),
            body: Body::Bytes(Vec::new()),
        };
        let h = http::handle(&mut edge, 1, [1; 16], &req);
        let (status, body) = answer(&h);
        assert!(status == 404 || status == 400, "{status}");
        let text = body.to_string();
        assert!(text.len() < 1_000 && !text.contains("<script>"), "{path:.40}: {} bytes: {:.300}", text.len(), text);
    }
    let h = request(&mut edge, 1, SECRET, "GET", &format!("/jobs/{long}"), Value::Null);
    assert!(answer(&h).1.to_string().len() < 1_000);
}


/// Callbacks not yet delivered (their receiver down, or never answering) are kept in the
/// edge's memory and stored whole at every change, so each one more made every event
/// that touched them cost more: 5,000 of them wrote half a megabyte per event. They are
/// capped (`MAX_PENDING_CALLBACKS`; a caller with its own secret an equal share of it): past the cap
/// a job asking for a callback is refused 429, one without is taken, and another caller's
/// callbacks are not crowded out.
#[test]
fn callbacks_waiting_for_delivery_are_capped() {
    use crate::machine::MAX_PENDING_CALLBACKS;
    let mut edge = Edge::new(Config { max_retained_jobs: 100_000, ..pool_config() }, 0);
    let ended = |edge: &mut Edge, now: u64, secret: &str, callback: bool| {
        let mut body = json!({"prompt": format!("t{now}")});
        if callback {
            body["callback_url"] = json!("https://hooks.example.com/r");
        }
        let h = request(edge, now, secret, "POST", "/jobs", body);
        let (status, body) = answer(&h);
        if status != 202 {
            return (status, body);
        }
        let id = body["job_id"].as_str().unwrap().to_string();
        let h = request(edge, now, secret, "DELETE", &format!("/jobs/{id}"), Value::Null);
        assert_eq!(answer(&h).0, 202);
        (202, body)
    };
    // A third: the pool's callers, a and b.
    let share = MAX_PENDING_CALLBACKS / 3;
    for i in 0..share as u64 {
        assert_eq!(ended(&mut edge, i, A_SECRET, true).0, 202);
    }
    let (status, body) = ended(&mut edge, 1_000, A_SECRET, true);
    assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("callback"), "{body}");
    assert_eq!(ended(&mut edge, 1_001, A_SECRET, false).0, 202, "without a callback it is taken");
    assert_eq!(ended(&mut edge, 1_002, B_SECRET, true).0, 202, "b's callback is not crowded out by a's");
    let mut taken = 0;
    for i in 0..MAX_PENDING_CALLBACKS as u64 {
        if ended(&mut edge, 2_000 + i, SECRET, true).0 == 202 {
            taken += 1;
        }
    }
    assert_eq!(taken, MAX_PENDING_CALLBACKS - share - 1, "the pool's secret up to the cap in all");
}

/// A job asking for a callback holds its place among the callbacks from when it is taken,
/// not only once it ended: counted only once ended, a caller sent jobs with callbacks while
/// none of its own waited (600 of them here, its whole queue) and cancelled them all at
/// once, and 600 results of one caller then waited for a receiver that is down — past the
/// cap in all, and every other caller's callbacks refused.
#[test]
fn jobs_not_yet_ended_hold_their_callbacks_place() {
    use crate::machine::MAX_PENDING_CALLBACKS;
    let mut edge = Edge::new(pool_config(), 0);
    let body = |i: u64| json!({"prompt": format!("t{i}"), "callback_url": "https://hooks.example.com/r"});
    let mut taken = Vec::new();
    for i in 0..(MAX_PENDING_CALLBACKS as u64) {
        let (status, answer) = answer(&request(&mut edge, i, A_SECRET, "POST", "/jobs", body(i)));
        match status {
            202 => taken.push(answer["job_id"].as_str().unwrap().to_string()),
            _ => assert_eq!((status, answer["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{answer}"),
        }
    }
    assert_eq!(taken.len(), MAX_PENDING_CALLBACKS / 3, "a's jobs with callbacks, queued, are a's callbacks (its third)");
    for id in &taken {
        assert_eq!(answer(&request(&mut edge, 500, A_SECRET, "DELETE", &format!("/jobs/{id}"), Value::Null)).0, 202);
    }
    let (status, body) = answer(&request(&mut edge, 501, B_SECRET, "POST", "/jobs", body(501)));
    assert_eq!(status, 202, "b's callback is not crowded out: {body}");
}

/// A callback of a job sent with a caller's own secret, when the caller no longer has one
/// (taken out of `RUNNER_SECRETS` between the submission and the job's end), is not signed
/// with the pool's secret: its receiver holds no key to check that with, and the caller —
/// perhaps taken out for a reason — would hold a body of its own job's making signed
/// with the operator's secret, which the operator's own receivers take as the edge's.
#[test]
fn a_callback_is_never_signed_with_the_pools_secret_for_a_caller_gone() {
    let saved = |effects: &[Effect]| -> Vec<crate::record::Job> {
        effects.iter().filter_map(|e| if let Effect::Save(j) = e { Some((**j).clone()) } else { None }).collect()
    };
    let mut edge = Edge::new(pool_config(), 0);
    let h = request(&mut edge, 1, A_SECRET, "POST", "/jobs", json!({"prompt": "x", "callback_url": "https://hooks.example.com/r"}));
    let (status, body) = answer(&h);
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    // The edge restarts with `a` taken out of RUNNER_SECRETS; the operator cancels its job.
    let after = Config { caller_secrets: vec![("b".into(), B_SECRET.into())], ..pool_config() };
    let (mut edge, _) = Edge::restore(after, saved(&h.effects), vec![], None, 10);
    let h = request(&mut edge, 11, SECRET, "DELETE", &format!("/jobs/{id}"), Value::Null);
    assert_eq!(answer(&h).0, 202);
    let posts: Vec<&crate::machine::Post> = h.effects.iter().filter_map(|e| if let Effect::Post(p) = e { Some(p) } else { None }).collect();
    for post in &posts {
        let header = |name: &str| post.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
        let ts: u64 = header("x-runner-timestamp").parse().unwrap();
        assert_ne!(header("x-runner-signature"), crate::notify::signature(SECRET, ts, &post.body), "signed with the pool's secret: {}", post.url);
    }
    assert!(posts.is_empty(), "no callback is made that its receiver cannot check: {posts:?}");
    // Nothing is left waiting to be tried again either.
    let later = edge.tick(10_000_000);
    assert!(!later.iter().any(|e| matches!(e, Effect::Post(_) | Effect::Recall { .. })), "{later:?}");
}

/// `POST /jobs` of `body` with `secret` (and `key`) at `now`, and a cancel of the job at once
/// if it was taken (so it ends, queued no longer): the answer to the submit.
fn cancelled_at_once(edge: &mut Edge, now: u64, secret: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let (status, body) = post_job(edge, now, secret, body, key);
    if status == 202 {
        let id = body["job_id"].as_str().unwrap();
        assert_eq!(answer(&request(edge, now, secret, "DELETE", &format!("/jobs/{id}"), Value::Null)).0, 202);
    }
    (status, body)
}

/// `POST /jobs` of `body` with `secret` (and `key`) at `now`: the answer.
fn post_job(edge: &mut Edge, now: u64, secret: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let req = Request {
        method: "POST".into(),
        path: "/jobs".into(),
        secret_header: Some(secret.into()),
        authorization: None,
        idempotency_key: key.map(str::to_string),
        last_event_id: None,
        body: Body::Bytes(body.to_string().into_bytes()),
    };
    // Each job its own id (more of them than one byte of `now` tells apart).
    let mut entropy = [0; 16];
    entropy[..8].copy_from_slice(&now.to_le_bytes());
    answer(&http::handle(edge, now, entropy, &req))
}

/// A caller's callbacks waiting for delivery count in its share (of the cap) for as long
/// as they wait: one whose job was forgotten early (past `MAX_RETAINED_JOBS`, the caller's
/// own flood of ended jobs pushing out its oldest) still waited in the edge's memory, but
/// no longer counted as the caller's, so the caller took places past its share, up to the
/// cap in all, and another caller's callback was refused.
#[test]
fn a_callback_of_a_job_forgotten_early_does_not_leave_its_caller_past_its_share() {
    use crate::machine::MAX_PENDING_CALLBACKS;
    let mut edge = Edge::new(Config { max_retained_jobs: 300, ..pool_config() }, 0);
    let ended = |edge: &mut Edge, now: u64, secret: &str, callback: bool| {
        let mut body = json!({"prompt": format!("t{now}")});
        if callback {
            body["callback_url"] = json!("https://hooks.example.com/r");
        }
        cancelled_at_once(edge, now, secret, body, None).0
    };
    let mut now = 0;
    let mut round = |edge: &mut Edge| {
        // a's callbacks up to its share (their receiver never answers), then a flood of
        // ended jobs that pushes a's oldest — those with callbacks — out.
        while {
            now += 1;
            ended(edge, now, A_SECRET, true) == 202
        } {}
        for _ in 0..400 {
            now += 1;
            assert_eq!(ended(edge, now, A_SECRET, false), 202);
        }
    };
    round(&mut edge);
    round(&mut edge);
    assert_eq!(ended(&mut edge, 1_000_000, B_SECRET, true), 202, "b's callback is not crowded out by a's past its {}", MAX_PENDING_CALLBACKS / 3);
}

/// The 404 for a route the edge does not serve named four of its routes (`/execute`,
/// `/health`, `/oauth/status`, `/jobs`): a caller who mistyped `/oauth/login` or
/// `/metrics` was not shown them. It names every route, and each it names is served:
/// none of them is answered with that 404.
#[test]
fn the_404_names_every_route_the_edge_serves() {
    let mut edge = Edge::new(pool_config(), 0);
    let h = request(&mut edge, 0, SECRET, "GET", "/oauth/logn", Value::Null);
    let (status, body) = answer(&h);
    assert_eq!(status, 404, "{body}");
    let error = body["error"].as_str().unwrap();
    let routes = error.split("(routes: ").nth(1).expect("the routes are named").trim_end_matches(')');
    let routes = routes.split("; agents dial").next().unwrap();
    let named: Vec<(&str, String)> = routes
        .split(", ")
        .map(|route| {
            let (method, path) = route.split_once(' ').unwrap_or_else(|| panic!("`{route}` is not METHOD /path"));
            (method, path.split(' ').next().unwrap().replace("{id}", "x"))
        })
        .collect();
    for must in ["/oauth/login", "/oauth/login/code", "/agents/x/pause", "/agents/x/resume", "/metrics", "/pools", "/", "/jobs/x/events"] {
        assert!(named.iter().any(|(_, path)| path == must), "{must} is not named: {error}");
    }
    for (method, path) in &named {
        let h = request(&mut edge, 0, SECRET, method, path, json!({"prompt": "p", "code": "c", "login_id": "l"}));
        // The page and the metrics answer in HTML and text; an error is JSON.
        let answered = h.effects.iter().find_map(|e| match e {
            Effect::Answer { caller, response } if *caller == h.caller => Some((response.status, response.body.clone())),
            _ => None,
        });
        if let Some((status, body)) = answered {
            assert!(!(status == 404 && body.contains("route")), "{method} {path} is named but not served: {body}");
        }
    }
}

/// The kept keys of forgotten jobs (`spent.rs`) are bounded, and past the bound the oldest
/// key of the owner holding the most goes: caller `a`'s stream of keyed jobs lets go of its
/// own oldest keys, never `b`'s one (whose repeat would then run its task again).
#[test]
fn one_callers_flood_of_keyed_jobs_lets_go_of_its_own_kept_keys_not_anothers() {
    let mut edge = Edge::new(Config { max_retained_jobs: 1, ..pool_config() }, 0);
    let sid = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    let mut sent = 0;
    // Each runs on the agent (only a job that may have run keeps its key), and the next
    // end makes the cap forget it.
    let mut keyed = |edge: &mut Edge, now: u64, secret: &str, key: &str| {
        let (status, body) = post_job(edge, now, secret, json!({"prompt": "the task"}), Some(key));
        if status == 202 {
            sent += 1;
            report(edge, now, &sid, body["job_id"].as_str().unwrap(), ok_result());
            say(edge, now, &sid, credit(1, sent));
        }
        (status, body)
    };
    assert_eq!(keyed(&mut edge, 1, B_SECRET, "b-key").0, 202);
    let cap = crate::machine::MIN_SPENT_KEYS as u64;
    for i in 0..cap + 5 {
        assert_eq!(keyed(&mut edge, 10 + i, A_SECRET, &format!("a-{i}")).0, 202);
    }
    let (status, body) = keyed(&mut edge, 5_000, B_SECRET, "b-key");
    assert_eq!((status, &body["error_code"]), (410, &json!("JOB_FORGOTTEN")), "b's key was let go for a's: {body}");
    assert_eq!(keyed(&mut edge, 5_001, A_SECRET, "a-0").0, 202, "a's oldest key went");
}

/// A disconnect's failed writes are kept, not undone (its socket is gone for good), and
/// it used to end the queued `/execute` jobs its going left to held-back agents only: when
/// its writes failed they ended in memory only, their callers' answers dropped (the caller
/// hung), and the caps could later forget them with their end never written (hostile review
/// rev29, M1). They end in the next tick, at once — an event undone and retried when its
/// writes fail.
#[test]
fn a_disconnect_whose_writes_fail_ends_no_queued_execute_it_leaves_held_back() {
    let mut edge = Edge::new(three_agents(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    enter(&mut edge, 0, "laptop", 2, 1, "", &[]);
    assert_eq!(answer(&request(&mut edge, 1, SECRET, "POST", "/agents/laptop/pause", Value::Null)).0, 200);
    let running = submit(&mut edge, 2, SECRET, json!({"prompt": "x"}));
    say(&mut edge, 3, &spark, AgentMessage::Accepted { job_id: running });
    let waiting = request(&mut edge, 4, SECRET, "POST", "/execute", json!({"prompt": "y"}));
    assert!(answer_to(&waiting.effects, waiting.caller).is_none(), "it waits for spark");
    let w1 = waiting.effects.iter().find_map(|e| if let Effect::Save(job) = e { Some(job.id.clone()) } else { None }).expect("queued");
    let effects = edge.disconnect(5, &spark);
    assert!(answer_to(&effects, waiting.caller).is_none() && effects.iter().any(Effect::is_write));
    // The disconnect's writes (its running job's orphan mark) fail.
    assert!(edge.store_failed(5, "disk I/O error").is_empty());
    assert_eq!(edge.job(&w1).unwrap().state, JobState::Queued, "nothing ended in memory only");
    // The tick's writes fail too: undone, tried again.
    edge.tick(5);
    edge.store_failed(5, "disk I/O error");
    assert_eq!(edge.job(&w1).unwrap().state, JobState::Queued);
    let effects = edge.tick(5 + crate::machine::STORE_RETRY_MS);
    let (status, body) = answer_to(&effects, waiting.caller).expect("its caller is told");
    assert_eq!((status, &body["error_code"], &body["fallback"]), (503, &json!("RUNNER_OFFLINE"), &json!(true)), "{body}");
    assert_eq!(edge.job(&w1).unwrap().state, JobState::Failed);
}

/// `/health` is open to anyone, and the edge answers it on its one thread: the operator's
/// view (every agent with its load, counted over the jobs that run) is built for the
/// operator's secret alone. Without a secret only the verdict is worked out — 200 agents
/// with 4 jobs each cost 5 ms a request when every agent's load was counted over every
/// running job — and a caller's view, `/pools` and `/oauth/status` need no agent's load.
#[test]
fn only_the_operators_health_builds_every_agents_view() {
    use crate::machine::FULL_VIEWS;
    let mut edge = Edge::new(three_agents(), 0);
    enter(&mut edge, 0, "spark", 1, 2, "", &[]);
    enter(&mut edge, 0, "laptop", 2, 2, "", &[]);
    for i in 0..3 {
        submit(&mut edge, 1 + i, B_SECRET, json!({"prompt": "x"}));
    }
    let built = || FULL_VIEWS.with(|n| n.get());
    let before = built();
    for (secret, path, status) in [("", "/health", 200), ("wrong-secret-0000000", "/health", 200), (A_SECRET, "/health", 200), (SECRET, "/oauth/status", 200)] {
        let (got, body) = answer(&request(&mut edge, 5, secret, "GET", path, Value::Null));
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(built(), before, "{path} with {secret:?} built the operator's view: {body}");
    }
    // `GET /pools` (ADMIN_SECRET) asks each pool for its summary.
    assert_eq!(edge.pool_summary(5).agents_taking_work, 2);
    assert_eq!(built(), before, "the pool's summary built the operator's view");
    let (_, body) = answer(&request(&mut edge, 5, SECRET, "GET", "/health", Value::Null));
    assert_eq!(built(), before + 1);
    let load: Vec<u64> = body["agents"].as_array().unwrap().iter().map(|a| a["running_jobs"].as_u64().unwrap()).collect();
    assert_eq!(load.iter().sum::<u64>(), 3, "{body}");
}

/// A caller given its own secret (`RUNNER_SECRETS`) after the pool's secret sent jobs in
/// its name (`"caller": "ci"`) is not their sender: whoever holds the new secret read
/// their prompts and results, followed and cancelled them, since the edge compared names
/// alone. They stay the pool secret's; the new secret reaches only what it sends.
#[test]
fn a_callers_new_secret_reaches_no_job_the_pools_secret_sent_in_its_name() {
    const CI_SECRET: &str = "caller-ci-secret-0123456789";
    let mut edge = Edge::new(pool_config(), 0);
    let spark = enter(&mut edge, 0, "spark", 1, 1, "", &[]);
    let running = submit(&mut edge, 1, SECRET, json!({"prompt": "the pool's plans", "caller": "ci"}));
    let queued = submit(&mut edge, 2, SECRET, json!({"prompt": "more of them", "caller": "ci"}));
    assert_eq!(edge.job(&running).unwrap().session_id.as_deref(), Some(spark.as_str()));
    // The operator gives `ci` its own secret: the edge starts again with it.
    let jobs = [&running, &queued].map(|id| edge.job(id).unwrap().clone()).to_vec();
    let with_ci = Config { caller_secrets: vec![("a".into(), A_SECRET.into()), ("ci".into(), CI_SECRET.into())], ..pool_config() };
    let (mut edge, _) = Edge::restore(with_ci, jobs, vec![], None, 3);
    for id in [&running, &queued] {
        for (method, path) in [("GET", format!("/jobs/{id}")), ("GET", format!("/jobs/{id}/events")), ("DELETE", format!("/jobs/{id}"))] {
            let (status, body) = answer(&request(&mut edge, 4, CI_SECRET, method, &path, Value::Null));
            assert_eq!((status, body["error_code"].as_str()), (404, Some("NOT_FOUND")), "{method} {path}: {body}");
            assert!(!body.to_string().contains("plans"), "{body}");
        }
        assert!(!edge.job(id).unwrap().cancel_requested && !edge.job(id).unwrap().state.is_terminal(), "ci's secret cancelled {id}");
        assert_eq!(answer(&request(&mut edge, 5, SECRET, "GET", &format!("/jobs/{id}"), Value::Null)).0, 200, "still the pool secret's");
    }
    let (_, list) = answer(&request(&mut edge, 6, CI_SECRET, "GET", "/jobs", Value::Null));
    assert_eq!(list["active"], json!([]), "{list}");
    // What ci sends with its own secret is its own.
    let own = submit(&mut edge, 7, CI_SECRET, json!({"prompt": "x"}));
    assert_eq!(answer(&request(&mut edge, 8, CI_SECRET, "GET", &format!("/jobs/{own}"), Value::Null)).0, 200);
    let (_, list) = answer(&request(&mut edge, 8, CI_SECRET, "GET", "/jobs", Value::Null));
    assert_eq!(list["active"].as_array().map(|a| a.len()), Some(1), "{list}");
}

/// The body a host reads for a request is held against the process's bodies in flight by
/// the request's holder: past its share it is refused before any of it is read, 429
/// naming whose bodies and what to do, its connection closed; another holder's body is
/// still read. A request without a secret reads nothing (its answer is the 401).
#[test]
fn a_body_past_its_holders_share_of_the_bodies_in_flight_is_refused_unread() {
    use crate::http::intake;
    // A pool of its own: the process's bodies in flight are shared with every other test.
    // The admin's secret is read no body: it takes no share.
    let admin = Some("admin-secret-0123456789".to_string());
    let config = Config { pool: "bodies-test".into(), max_body_bytes: 1000, max_pending_bytes: 3000, admin_secret: admin, ..pool_config() };
    let held = intake(&config, Some(A_SECRET), None, Some(1000)).expect("a's first body");
    let refused = intake(&config, Some(A_SECRET), None, Some(10)).expect_err("a holds its share: a third of 3000");
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body.contains("RUNNER_BUSY")
            && refused.body.contains("caller a ")
            && refused.body.contains("its equal share of MAX_PENDING_BYTES (3000) among the secrets that share it"),
        "{}",
        refused.body
    );
    assert!(refused.body.contains("finish or close the uploads"), "{}", refused.body);
    // Not the 3 secrets, nor the share as such: either tells a caller how many others
    // there are (rev31-6); the pool's holder, the operator, is told both (below).
    assert!(!refused.body.contains(" 3 ") && !refused.body.contains("split among"), "{}", refused.body);
    assert!(refused.headers.iter().any(|(name, value)| *name == "connection" && value == "close"), "{:?}", refused.headers);
    let others = [intake(&config, Some(B_SECRET), None, Some(1000)), intake(&config, Some(SECRET), None, None)];
    assert!(others.iter().all(Result::is_ok), "b's and the pool's shares are their own");
    let mut anonymous = intake(&config, None, None, Some(1000)).expect("nothing to hold");
    anonymous.chunk(b"{}");
    assert_eq!(anonymous.finish(), crate::body::Body::TooLarge, "nothing kept (`handle` answers 401 from its headers)");
    drop((held, others));
    assert!(intake(&config, Some(A_SECRET), None, Some(1000)).is_ok(), "a's body done, its share is free again");
}

/// A named caller refused for the bodies in flight is told its own bodies' bytes alone, as
/// its jobs' 429s tell it (review rev27, 4): the whole case told it every other caller's
/// together. The pool's secret (the operator's) is told the pool's.
#[test]
fn a_named_caller_refused_for_the_bodies_in_flight_is_told_only_its_own() {
    use crate::http::intake;
    // Bodies up to 1,500 past shares of 1,000: b's and the pool's first bodies fill the whole.
    let config = Config { pool: "bodies-told".into(), max_body_bytes: 1500, max_pending_bytes: 3000, ..pool_config() };
    let others = [intake(&config, Some(B_SECRET), None, Some(1500)).expect("b's first body"), intake(&config, Some(SECRET), None, Some(1500)).expect("the pool's")];
    let refused = intake(&config, Some(A_SECRET), None, Some(10)).expect_err("the pool's bodies are at the whole");
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.body.contains("caller a being read hold 0 bytes") && refused.body.contains("MAX_PENDING_BYTES (3000)"), "{}", refused.body);
    assert!(!refused.body.contains("3000 bytes") && !refused.body.contains("1500"), "the others' bodies are not a's to read: {}", refused.body);
    let operator = intake(&config, Some(SECRET), None, Some(10)).expect_err("the pool's share is held");
    drop(others);
    assert!(operator.body.contains("split among 3 secrets"), "{}", operator.body);
    let full = [intake(&config, Some(B_SECRET), None, Some(1500)).unwrap(), intake(&config, Some(A_SECRET), None, Some(1500)).unwrap()];
    let operator = intake(&config, None, Some(&format!("Bearer {SECRET}")), Some(10)).expect_err("the whole");
    assert!(operator.body.contains("this pool's callers are sending hold 3000 bytes"), "{}", operator.body);
    drop(full);
}

/// Jobs the pool's secret queued as `ci` before `ci` had a secret of its own stay the pool
/// secret's: neither counted in ci's `/health` nor against its MAX_QUEUED_PER_CALLER.
#[test]
fn jobs_the_pool_secret_queued_under_a_name_are_not_the_names_own() {
    const CI_SECRET: &str = "caller-ci-secret-0123456789";
    let mut edge = Edge::new(Config { max_queued_per_caller: 2, ..pool_config() }, 0);
    let mut saved = Vec::new();
    for now in 1..=2 {
        let h = request(&mut edge, now, SECRET, "POST", "/jobs", json!({"prompt": "x", "caller": "ci"}));
        assert_eq!(answer(&h).0, 202);
        saved.extend(h.effects.into_iter().filter_map(|e| if let Effect::Save(j) = e { Some(std::sync::Arc::unwrap_or_clone(j)) } else { None }));
    }
    let after = Config { caller_secrets: vec![("ci".into(), CI_SECRET.into())], max_queued_per_caller: 2, ..pool_config() };
    let (mut edge, _) = Edge::restore(after, saved, vec![], None, 10);
    assert_eq!(edge.queued(), 2);
    let (status, body) = answer(&request(&mut edge, 11, CI_SECRET, "GET", "/health", Value::Null));
    assert_eq!((status, body["queued_jobs"].as_u64()), (503, Some(0)), "no agent yet; none of the 2 is ci's: {body}");
    let h = request(&mut edge, 12, CI_SECRET, "POST", "/jobs", json!({"prompt": "ci's own"}));
    assert_eq!(answer(&h).0, 202, "{:?}", answer(&h).1);
    let (_, body) = answer(&request(&mut edge, 13, CI_SECRET, "GET", "/health", Value::Null));
    assert_eq!(body["queued_jobs"].as_u64(), Some(1), "{body}");
}

/// spark (busy with a job) and laptop connected, and an `/execute` for spark alone (`w1`)
/// queued at 3: the set-up of the tests of a wait for one agent that leaves.
fn spark_busy_and_an_execute_waiting_for_it(edge: &mut Edge) -> String {
    let spark = enter(edge, 0, "spark", 1, 1, "", &[]);
    enter(edge, 0, "laptop", 2, 1, "", &[]);
    let running = submit(edge, 1, SECRET, json!({"prompt": "x", "agent_id": "spark"}));
    say(edge, 2, &spark, AgentMessage::Accepted { job_id: running });
    let only_spark = json!({"prompt": "x", "agent_id": "spark"}).to_string();
    let only_spark = ExecuteRequest::parse(only_spark.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
    edge.submit(3, "w1".into(), only_spark, Mode::Wait).unwrap();
    spark
}
