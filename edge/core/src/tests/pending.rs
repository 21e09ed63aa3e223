//! The bytes of the jobs not ended yet — queued, sent, running — which memory keeps whole
//! and a restore loads whole: held to `MAX_PENDING_BYTES` (an equal share of it for a
//! caller with its own secret), counted as jobs come, end, are cancelled, and come back at a restore.

use super::routing::{answer, pool_config, request, A_SECRET, B_SECRET};
use super::*;

/// A task of `prompt_bytes`: a job of 512 bytes more ([`crate::record::Job::approximate_bytes`]).
fn task(prompt_bytes: usize) -> Value {
    json!({"prompt": "x".repeat(prompt_bytes), "timeout_ms": 60_000})
}

/// Room for two jobs of a 3,000-byte task (3,512 bytes each), not three.
fn bounded() -> Config {
    Config { max_pending_bytes: 10_000, max_body_bytes: 8_192, max_queued_jobs: 100, ..config() }
}

/// The refusal of a submission past the bound: 429 `RUNNER_BUSY` (as every busy refusal:
/// retryable, no `fallback`), naming the setting.
fn assert_refused(h: &http::Handled, names: &str) {
    let (status, body) = answer_to(&h.effects, h.caller).expect("answered at once");
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error_code"], "RUNNER_BUSY", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("MAX_PENDING_BYTES") && error.contains(names) && error.contains("retry when"), "{error}");
}

fn queued(edge: &mut Edge, now: u64, body: Value) -> String {
    let h = call(edge, now, "POST", "/jobs", body);
    let (status, body) = answer_to(&h.effects, h.caller).expect("answered");
    assert_eq!(status, 202, "{body}");
    body["job_id"].as_str().unwrap().to_string()
}

/// ~100 `POST /jobs` of 1 MiB prompts kept ~100 MiB of tasks in a Durable Object's memory
/// (128 MB), and every event after loaded them all again: the pool was down until its
/// storage was wiped. Past `MAX_PENDING_BYTES` a submission is refused, `/execute` too; a
/// cancel and a job's end make room again.
#[test]
fn the_bytes_of_jobs_not_ended_are_bounded() {
    let mut edge = Edge::new(bounded(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(1, 0));
    let running = queued(&mut edge, 1, task(3_000));
    assert_eq!(edge.job(&running).unwrap().state, JobState::Dispatched, "sent jobs count too");
    let waiting = queued(&mut edge, 2, task(3_000));
    assert_eq!(edge.job(&waiting).unwrap().state, JobState::Queued);
    assert_refused(&call(&mut edge, 3, "POST", "/jobs", task(3_000)), "run the task elsewhere");
    assert_refused(&call(&mut edge, 3, "POST", "/execute", task(3_000)), "run the task elsewhere");
    // A task that still fits is taken: the bound is on bytes, not jobs.
    let small = queued(&mut edge, 4, task(2_000));
    assert_refused(&call(&mut edge, 4, "POST", "/jobs", task(100)), "MAX_PENDING_BYTES (10000)");

    // A cancelled job makes room.
    edge.cancel(5, &small).unwrap();
    let again = queued(&mut edge, 6, task(2_000));
    assert_refused(&call(&mut edge, 6, "POST", "/jobs", task(100)), "run the task elsewhere");
    // So does a job's end; once ended, what memory keeps of it is its header, outside the
    // bound (MAX_RETAINED_BYTES keeps those).
    report(&mut edge, 7, &sid, &running, ok_result());
    assert_eq!(edge.job(&running).unwrap().state, JobState::Succeeded);
    queued(&mut edge, 8, task(3_000));
    assert_refused(&call(&mut edge, 8, "POST", "/jobs", task(3_000)), "run the task elsewhere");
    for id in [waiting, again] {
        edge.cancel(9, &id).unwrap();
    }
    queued(&mut edge, 10, task(3_000));
}

/// A caller with its own secret holds its equal share of the bound at most (a third: the
/// pool's callers, a and b), so it cannot take it all and leave the others refused; the
/// pool secret's jobs (its holder is the operator) are held to the whole bound alone.
#[test]
fn a_caller_with_its_own_secret_holds_its_share_of_the_bound() {
    let mut edge = Edge::new(Config { max_pending_bytes: 10_000, max_body_bytes: 8_192, ..pool_config() }, 0);
    let job = |edge: &mut Edge, now: u64, secret: &str, body: Value| {
        let h = request(edge, now, secret, "POST", "/jobs", body);
        answer(&h)
    };
    assert_eq!(job(&mut edge, 1, A_SECRET, task(3_000)).0, 202);
    let h = request(&mut edge, 2, A_SECRET, "POST", "/jobs", task(3_000));
    let (status, body) = answer(&h);
    assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("caller `a`") && error.contains("its equal share of MAX_PENDING_BYTES (10000) among the secrets that share it"), "{error}");
    // Neither its share (3333) nor the 3 secrets: either tells it how many others there are (rev31-6).
    assert!(!error.contains("3333") && !error.contains(" 3 "), "{error}");
    // The other callers still may: b with its own share, the pool's secret up to the whole.
    assert_eq!(job(&mut edge, 3, B_SECRET, task(3_000)).0, 202);
    assert_eq!(job(&mut edge, 4, SECRET, json!({"prompt": "x".repeat(2_000), "caller": "nightly"})).0, 202);
    let (status, body) = job(&mut edge, 5, SECRET, task(1_000));
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains("MAX_PENDING_BYTES (10000)"), "{body}");
}

/// A restore loads the jobs not ended and counts them, sent ones included; the queued
/// `/execute` jobs it ends (their callers are gone) count no more.
#[test]
fn a_restore_counts_the_jobs_not_ended() {
    let cfg = Config { max_pending_bytes: 12_000, ..bounded() };
    let mut edge = Edge::new(cfg.clone(), 0);
    let (sid, _) = join(&mut edge, 0, "spark", &agent_key(1), vec![], 1);
    say(&mut edge, 0, &sid, credit(1, 0));
    let prompt = "x".repeat(3_000);
    let mut saved = std::collections::HashMap::new();
    for (id, mode) in [("sent", Mode::Detached), ("waiting", Mode::Detached), ("execute", Mode::Wait)] {
        for e in edge.submit(1, id.into(), submission(&prompt, 60_000, None), mode).unwrap().effects {
            if let Effect::Save(job) = e {
                saved.insert(job.id.clone(), std::sync::Arc::unwrap_or_clone(job));
            }
        }
    }
    assert_eq!(edge.job("sent").unwrap().state, JobState::Dispatched);
    assert!(edge.submit(2, "fourth".into(), submission(&prompt, 60_000, None), Mode::Detached).is_err());

    // Rebuilt: the machine before is let go (its jobs leave the process's count, see
    // `every_pool_of_one_process_together_is_held_to_the_bound`).
    drop(edge);
    let (mut edge, _) = Edge::restore(cfg, saved.into_values().collect(), vec![], None, 100);
    assert!(edge.job("execute").unwrap().state.is_terminal(), "a queued /execute job ends at a restore");
    // 2 × 3,512 bytes are left: one more fits, and then no more.
    edge.submit(101, "after".into(), submission(&prompt, 60_000, None), Mode::Detached).unwrap();
    let refused = edge.submit(102, "past".into(), submission(&prompt, 60_000, None), Mode::Detached).unwrap_err();
    assert_eq!((refused.status, refused.body.error_code), (429, shared::contract::ErrorCode::RunnerBusy));
    assert!(refused.body.error.contains("MAX_PENDING_BYTES"), "{}", refused.body.error);
    // The restored jobs' ends free their bytes as a new job's does.
    edge.cancel(103, "waiting").unwrap();
    edge.submit(104, "then".into(), submission(&prompt, 60_000, None), Mode::Detached).unwrap();
}

/// A restore that ends every queued `/execute` job (their callers are gone) held about
/// three copies of `MAX_PENDING_BYTES` at once (a review's finding): memory kept each ended
/// job whole until the next event beside the whole copy in its `Save`, and the Worker
/// encoded every saved record as JSON before its transaction. Now memory keeps only the
/// headers at once and the hosts encode one record at a time, so what is held is the
/// `Save`s and one record's JSON. (A tick's journal also keeps each job's version before
/// it ended until the next event, for the undo of a write that failed; a restore, never
/// undone, keeps none: `a_restore_keeps_no_undo_copy_of_the_jobs_it_ends`.)
#[test]
fn a_restore_ending_every_pending_job_holds_one_copy_of_them() {
    let cfg = config();
    let prompt = "x".repeat(1 << 20);
    let jobs: Vec<crate::record::Job> = (0..30)
        .map(|i| {
            let s = submission(&prompt, 60_000, None);
            crate::record::Job::new(format!("j{i:02}"), s.spec, Mode::Wait, None, i)
        })
        .collect();
    let counted: u64 = jobs.iter().map(|j| j.approximate_bytes()).sum();
    assert!(counted <= cfg.max_pending_bytes, "within the bound: {counted}");
    let (edge, effects) = Edge::restore(cfg, jobs, vec![], None, 100);
    let saves: Vec<&crate::record::Job> = effects.iter().filter_map(|e| if let Effect::Save(j) = e { Some(&**j) } else { None }).collect();
    assert_eq!(saves.len(), 30, "every one ended, and is stored whole");
    assert!(saves.iter().all(|j| j.state.is_terminal() && j.spec.prompt.len() == prompt.len()));
    let saved: usize = saves.iter().map(|j| j.spec.prompt.len()).sum();
    let kept: usize = (0..30).map(|i| edge.job(&format!("j{i:02}")).unwrap().spec.prompt.len()).sum();
    let json = saves.iter().map(|j| serde_json::to_string(j).unwrap().len()).max().unwrap();
    let held = kept + saved + json;
    assert!(held <= counted as usize + (2 << 20), "{} MiB held at once for {} MiB counted", held >> 20, counted >> 20);
    // What memory keeps of them still answers for them.
    let header = edge.job("j00").unwrap();
    assert!(header.header_only && header.approximate_bytes() > 1 << 20, "an ended job's header keeps the whole record's size");
}

/// [`bounded`] for the pool `name` of an edge serving `names`: each pool's object keeps
/// its own entry in the process's count.
fn pool_of(name: &str, names: &[&str]) -> Config {
    let others = names.iter().filter(|n| **n != name);
    let other_pools = others.map(|n| (n.to_string(), shared::keys::Keyring::from_keys(std::iter::empty()))).collect();
    Config { pool: name.into(), other_pools, ..bounded() }
}

/// [`pool_of`] an edge serving gpu and team-b: each pool's own part of the process's
/// 10,000 bytes is 2,500 (half of it split between the two).
fn pool(name: &str) -> Config {
    pool_of(name, &["gpu", "team-b"])
}

/// How long after its machine's last event a pool counts for the others: a minute (four
/// heartbeat intervals are less here).
const COUNTED_FOR: u64 = 60_000;

/// The refusal of a pool past its own part of what the process holds, saying so with the
/// pool's or the caller's own bytes (`held`) and never the other pools'.
fn assert_past_its_part(h: &http::Handled, held: &str) -> String {
    assert_refused(h, "own part (2500) of MAX_PENDING_BYTES (10000)");
    let error = answer_to(&h.effects, h.caller).unwrap().1["error"].as_str().unwrap().to_string();
    assert!(error.contains(held) && error.contains("2 pools"), "{error}");
    error
}

/// A Worker's memory is its isolate's, which the objects of several pools may share: with
/// POOLS=gpu,team-b three objects held three times MAX_PENDING_BYTES; then (review rev27,
/// 1) one pool filling it refused every other pool; then, shared as owners share the
/// queue, the pools held up to twice it (64 MiB by default, in a 128 MB isolate). Every
/// pool's jobs together are held to it, counted as they come and go, and a machine let go
/// (a rebuild) takes its jobs out of the count. Each pool has its own part (half the
/// bound split among the pools), which it always gets whatever the others hold, and takes
/// the rest only as far as the other pools' parts are kept for them.
#[test]
fn every_pool_of_one_process_together_is_held_to_the_bound() {
    let mut gpu = Edge::new(pool("gpu"), 0);
    let mut team = Edge::new(pool("team-b"), 0);
    // gpu takes its own part and what team-b leaves of the rest: 7,024 of 10,000, team-b's
    // 2,500 kept for it.
    let first = queued(&mut gpu, 1, task(3_000));
    let second = queued(&mut gpu, 1, task(3_000));
    assert_past_its_part(&call(&mut gpu, 1, "POST", "/jobs", task(1_000)), "this pool's jobs not ended yet hold 7024 bytes");
    // team-b's own part is there whatever gpu holds; past it the process would pass the bound.
    queued(&mut team, 2, task(1_900));
    let error = assert_past_its_part(&call(&mut team, 2, "POST", "/jobs", task(100)), "this pool's jobs not ended yet hold 2412 bytes");
    assert!(!error.contains("7024") && !error.contains("9436"), "gpu's bytes are gpu's: {error}");
    assert_past_its_part(&call(&mut gpu, 2, "POST", "/jobs", task(100)), "7024");
    // One pool's jobs that end make room in the other.
    for id in [first, second] {
        gpu.cancel(3, &id).unwrap();
    }
    let more = queued(&mut team, 4, task(3_000));
    // A pool's machine rebuilt from its records: the old one's jobs leave the count, the
    // restored ones' come back.
    let record = team.job(&more).unwrap().clone();
    drop(team);
    queued(&mut gpu, 5, task(3_000));
    queued(&mut gpu, 5, task(1_000));
    let (team, _) = Edge::restore(pool("team-b"), vec![record], vec![], None, 6);
    assert_past_its_part(&call(&mut gpu, 7, "POST", "/jobs", task(1_000)), "5024");
    drop(team);
    queued(&mut gpu, 8, task(1_000));
}

/// Many pools, large jobs: the pools in turn send jobs as large as the others' parts
/// leave room for (5,625 of 10,000: a larger one fits only alone), then smaller ones, and
/// the process never holds more than the bound (before, a pool holding nothing always got
/// one in, past twice it) — while every pool still gets its own part (10,000 / 2 / 8 =
/// 625: a 612-byte job) whatever the others sent first.
#[test]
fn many_pools_sending_large_jobs_hold_the_bound_at_most_and_each_its_own_part() {
    let names: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut pools: Vec<Edge> = names.iter().map(|name| Edge::new(pool_of(name, &names), 0)).collect();
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); pools.len()];
    let held = |pools: &[Edge], ids: &[Vec<String>]| -> u64 {
        pools.iter().zip(ids).map(|(edge, ids)| ids.iter().map(|id| edge.job(id).unwrap().approximate_bytes()).sum::<u64>()).sum()
    };
    let mut now = 1;
    for prompt in [5_000, 3_000, 1_000, 100] {
        for _ in 0..3 {
            for i in 0..pools.len() {
                now += 1;
                let h = call(&mut pools[i], now, "POST", "/jobs", task(prompt));
                let (status, body) = answer_to(&h.effects, h.caller).expect("answered at once");
                match status {
                    202 => ids[i].push(body["job_id"].as_str().unwrap().to_string()),
                    _ => assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{body}"),
                }
                let all = held(&pools, &ids);
                assert!(all <= 10_000, "the process holds {all} bytes, past MAX_PENDING_BYTES (10000)");
            }
        }
    }
    // Each pool holding less than its own part gets a 612-byte job in, however full the process.
    for (i, edge) in pools.iter_mut().enumerate() {
        let ours: u64 = ids[i].iter().map(|id| edge.job(id).unwrap().approximate_bytes()).sum();
        if ours == 0 {
            queued(edge, now + 1, task(100));
        }
    }
    assert!(held(&pools, &ids) <= 10_000);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, failure_persistence: None, ..Default::default() })]

    /// The rule the pools of one process share a bound by, on its own: any number of pools
    /// taking and giving back sizes in any order, each up to what the others' parts leave
    /// (a larger one fits only alone: [`a_job_larger_than_the_others_leave_fits_alone`]),
    /// each pool with a value of its own or all with one. The process never holds more than
    /// the largest value, nor a pool past its own part more than its own, and a pool that
    /// stays within its own part is never refused.
    #[test]
    fn the_pools_rule_holds_the_bound_and_each_pools_own_part(
        pools in 1usize..10,
        bounds in proptest::collection::vec(1_000u64..100_000, 10),
        one_value in proptest::bool::ANY,
        steps in proptest::collection::vec((0usize..10, 1u64..=1_000_000, proptest::bool::ANY), 1..300),
    ) {
        let bound = |pool: usize| if one_value { bounds[0] } else { bounds[pool] };
        let largest = (0..pools).map(bound).max().unwrap();
        let mut held: Vec<Vec<u64>> = vec![Vec::new(); pools];
        for (pool, size, give_back) in steps {
            let pool = pool % pools;
            if give_back {
                held[pool].pop();
                continue;
            }
            let own = http::own_part(bound(pool), pools);
            let size = size % (bound(pool) - own * (pools as u64 - 1)) + 1;
            let ours: u64 = held[pool].iter().sum();
            let others: Vec<http::OtherPool> = (0..pools)
                .filter(|p| *p != pool)
                .map(|p| http::OtherPool { holds: held[p].iter().sum::<u64>(), bound: bound(p) })
                .filter(|other| other.holds > 0)
                .collect();
            let all = ours + others.iter().map(|other| other.holds).sum::<u64>();
            match http::pool_past_its_share(ours, &others, size, bound(pool), pools) {
                None => {
                    held[pool].push(size);
                    proptest::prop_assert!(ours + size <= own || all == 0 || all + size <= bound(pool), "past its part, past its own value");
                }
                Some(past) => {
                    proptest::prop_assert!(ours + size > own, "a pool within its own part ({own}) refused: {ours} + {size} ({all} held)");
                    proptest::prop_assert_eq!(past.own, own);
                }
            }
            let after: u64 = held.iter().flatten().sum();
            proptest::prop_assert!(after <= largest, "{after} held, past the largest value {largest} (before: {all})");
        }
    }
}

/// Pools of one process with values of their own (`MAX_PENDING_BYTES_GPU`, or a pool's
/// `MAX_BODY_BYTES` raising its unset bound): each still gets its own part whatever the
/// others hold. Before (review rev32, 2), each pool judged the whole process by its own
/// value: after gpu (100,000) filled the process past 10,000, team-b (10,000), holding
/// nothing, was refused its own part and told it was past it.
#[test]
fn a_pool_of_a_smaller_value_gets_its_own_part_beside_a_pool_of_a_larger_one() {
    let mut gpu = Edge::new(Config { max_pending_bytes: 100_000, ..pool("gpu") }, 0);
    let mut team = Edge::new(pool("team-b"), 0);
    let gpus: Vec<String> = (0..8).map(|_| queued(&mut gpu, 1, task(7_000))).collect();
    let held = |edge: &Edge, ids: &[String]| ids.iter().map(|id| edge.job(id).unwrap().approximate_bytes()).sum::<u64>();
    assert!(held(&gpu, &gpus) > 60_000);
    // team-b's own part: 2,500 of its 10,000.
    let first = queued(&mut team, 2, task(1_000));
    // Past it, team-b is held to its own value for the whole process, which gpu's jobs pass.
    assert_past_its_part(&call(&mut team, 3, "POST", "/jobs", task(1_000)), "this pool's jobs not ended yet hold 1512 bytes");
    // The process is held to the largest value of its pools: gpu still keeps team-b's part
    // by its own (25,000 of 100,000) and takes no more than the rest.
    let mut gpus = gpus;
    for now in 4..100 {
        let h = call(&mut gpu, now, "POST", "/jobs", task(1_000));
        match answer_to(&h.effects, h.caller).expect("answered at once") {
            (202, body) => gpus.push(body["job_id"].as_str().unwrap().to_string()),
            (status, body) => {
                assert_eq!((status, body["error_code"].as_str()), (429, Some("RUNNER_BUSY")), "{body}");
                break;
            }
        }
    }
    let all = held(&gpu, &gpus) + held(&team, &[first]);
    assert!(all > 70_000 && all <= 100_000, "the process holds {all}: gpu takes the rest of its 100,000 but team-b's part");
}

/// A job always fits when nothing is pending: one larger than what the other pools' parts
/// leave (or past the bound by its overhead) gets in alone; while it is held the process
/// stays within the bound (or that job alone), the others getting what is left.
#[test]
fn a_job_larger_than_the_others_leave_fits_alone() {
    // Two pools of 10,000: 2,500 each, so 7,500 is the most a pool takes beside the other's part.
    let other = |holds| http::OtherPool { holds, bound: 10_000 };
    assert_eq!(http::own_part(10_000, 2), 2_500);
    assert_eq!(http::pool_past_its_share(0, &[], 10_500, 10_000, 2), None, "alone, past the bound by its overhead");
    assert_eq!(http::pool_past_its_share(0, &[], 9_000, 10_000, 2), None, "alone");
    assert!(http::pool_past_its_share(0, &[other(9_000)], 2_000, 10_000, 2).is_some(), "the bound first");
    assert_eq!(http::pool_past_its_share(0, &[other(9_000)], 1_000, 10_000, 2), None, "what is left of its part");
    assert!(http::pool_past_its_share(9_000, &[], 1, 10_000, 2).is_some(), "the other's part kept");
    assert!(http::pool_past_its_share(100, &[], 9_000, 10_000, 2).is_some(), "not alone");
}

/// rev35-3: a pool within its own part is refused only while another pool holds a job
/// let in alone (nothing was pending) larger than the room its part leaves the others: the
/// process would pass the bound the pools share. It was told this one "would take this
/// pool past its own part", untrue (team-b held nothing); it is told it is within its
/// part, what holds the rest, and to retry when that job has ended.
#[test]
fn a_pool_within_its_part_refused_beside_a_job_let_in_alone_is_told_so() {
    let mut gpu = Edge::new(pool("gpu"), 0);
    let mut team = Edge::new(pool("team-b"), 0);
    let big = queued(&mut gpu, 1, task(8_000));
    assert!(gpu.job(&big).unwrap().approximate_bytes() > 7_500, "larger than the room team-b's part (2500) leaves");
    let h = call(&mut team, 2, "POST", "/jobs", task(1_000));
    assert_refused(&h, "within this pool's own part (2500) of MAX_PENDING_BYTES (10000)");
    let error = answer_to(&h.effects, h.caller).unwrap().1["error"].as_str().unwrap().to_string();
    assert!(!error.contains("past its own part") && error.contains("this pool's jobs not ended yet hold 0 bytes"), "{error}");
    assert!(error.contains("another pool holds a job larger") && error.contains("retry when that job has ended") && error.contains("2 pools"), "{error}");
    assert!(!error.contains("8512") && !error.contains("8000"), "gpu's bytes are gpu's: {error}");
    gpu.cancel(3, &big).unwrap();
    queued(&mut team, 4, task(1_000));
}

/// Two pools whose machines go on handling events (an agent's heartbeats, ticks) are
/// counted together for as long as they do, however long that is.
#[test]
fn pools_whose_machines_handle_events_are_counted_together_for_good() {
    // Queued jobs that wait as long as the test goes on.
    let waiting = |name: &str| Config { queue_ttl_ms: 24 * 3_600_000, ..pool(name) };
    let mut gpu = Edge::new(waiting("gpu"), 0);
    let mut team = Edge::new(waiting("team-b"), 0);
    // team-b past its part (2,500) by 1,012: left out, its part alone would be kept for it,
    // and gpu's 1,512 more would fit.
    queued(&mut team, 1, task(3_000));
    queued(&mut gpu, 1, task(3_000));
    queued(&mut gpu, 1, task(1_000));
    let mut now = 1;
    for _ in 0..5 {
        now += COUNTED_FOR - 1;
        team.tick(now);
        assert_past_its_part(&call(&mut gpu, now, "POST", "/jobs", task(1_000)), "5024");
    }
}

/// A Worker's object may be rebuilt in another isolate, leaving its machine in the one
/// before, never dropped and never to handle an event again: its entry stays there. It
/// counts for the others only for a while after its last event; from then on it is left
/// out (what that costs is memory past its part, never a refusal), and each pool alone
/// still has its own bound.
#[test]
fn a_pool_whose_machine_went_elsewhere_stops_counting_for_the_others() {
    let mut gone = Edge::new(pool("gpu"), 0);
    queued(&mut gone, 1, task(3_000));
    // Rebuilt in another isolate: this one never hears of it again.
    std::mem::forget(gone);
    let mut team = Edge::new(pool("team-b"), 0);
    // team-b past its part: past the bound with gpu's 3,512, it is refused.
    queued(&mut team, 2, task(3_000));
    queued(&mut team, 2, task(2_000));
    assert_past_its_part(&call(&mut team, 1 + COUNTED_FOR, "POST", "/jobs", task(100)), "6024");
    queued(&mut team, 2 + COUNTED_FOR, task(100));
    assert_refused(&call(&mut team, 3 + COUNTED_FOR, "POST", "/jobs", task(3_000)), "run the task elsewhere");
}

/// The machine before a rebuild, let go only after the rebuilt one restored its jobs (a
/// Worker's garbage collector, if ever), or still handed a change (an undo, a cancel):
/// neither takes anything from the count its pool's newest machine keeps.
#[test]
fn a_rebuilt_machines_predecessor_changes_nothing_of_its_count() {
    let mut gpu = Edge::new(pool("gpu"), 0);
    let mut before = Edge::new(pool("team-b"), 0);
    let kept = queued(&mut before, 1, task(3_000));
    let record = before.job(&kept).unwrap().clone();
    let (rebuilt, _) = Edge::restore(pool("team-b"), vec![record], vec![], None, 2);
    before.cancel(3, &kept).unwrap();
    drop(before);
    // gpu past its part (2,500): the rebuilt machine's 3,512 still count.
    queued(&mut gpu, 4, task(3_000));
    queued(&mut gpu, 4, task(2_000));
    assert_past_its_part(&call(&mut gpu, 5, "POST", "/jobs", task(100)), "6024");
    drop(rebuilt);
    queued(&mut gpu, 6, task(100));
}

/// On the Worker a pool's object is rebuilt after every eviction (workerd evicts an idle
/// instance within about ten seconds, hibernated sockets or not: `object.rs`), and the
/// instance evicted is never dropped: a wasm-bindgen object's Rust memory is freed only by
/// a `FinalizationRegistry`, which workerd takes away unless the `enable_weak_ref`
/// compatibility flag is set (wrangler.toml did not; workers-rs issue 722), and even then
/// only when the garbage collector gets to it, after the new instance has restored. So
/// `Pending::drop` does not run for the machine let go, and the process's count keeps its
/// jobs beside the rebuilt machine's, the same jobs: each eviction of an object with jobs
/// pending adds them again (a running job's agent heartbeat every 15 s wakes it), until
/// every pool of the isolate is refused with nothing pending — against "a job always fits
/// when none is pending" (README).
#[test]
fn a_machine_evicted_and_never_dropped_leaves_its_jobs_counted_once() {
    let mut evicted = Edge::new(bounded(), 0);
    let kept = queued(&mut evicted, 1, task(3_000));
    let record = evicted.job(&kept).unwrap().clone();
    // Evicted: its memory is never freed, its destructors never run.
    std::mem::forget(evicted);
    let (mut rebuilt, _) = Edge::restore(bounded(), vec![record], vec![], None, 2);
    // 3,512 bytes pending in this process: 3,512 more fit (7,024 of 10,000).
    let h = call(&mut rebuilt, 3, "POST", "/jobs", task(3_000));
    assert_eq!(answer_to(&h.effects, h.caller).unwrap().0, 202, "one job pending, counted twice: {:?}", answer_to(&h.effects, h.caller));
    // Nothing pending at all: a job of any size up to MAX_BODY_BYTES fits.
    let second = answer_to(&h.effects, h.caller).unwrap().1["job_id"].as_str().unwrap().to_string();
    for id in [kept, second] {
        rebuilt.cancel(4, &id).unwrap();
    }
    let h = call(&mut rebuilt, 5, "POST", "/jobs", task(7_000));
    assert_eq!(answer_to(&h.effects, h.caller).unwrap().0, 202, "nothing pending, yet refused: {:?}", answer_to(&h.effects, h.caller));
}

/// A restore is never undone — `store_failed` keeps it (the hosts store its writes before
/// serving anything, and serve nothing when that fails) — yet each job it ends is
/// journalled whole for an undo (`job_mut`), until the next event. A restore ending every
/// queued `/execute` job so held them twice while the host wrote their `Save`s (on the
/// Worker two copies of up to MAX_PENDING_BYTES, 64 MiB of an isolate's 128 MB, beside the
/// headers), not once as `a_restore_ending_every_pending_job_holds_one_copy_of_them` says.
#[test]
fn a_restore_keeps_no_undo_copy_of_the_jobs_it_ends() {
    let prompt = "x".repeat(1 << 20);
    let jobs: Vec<crate::record::Job> = (0..30)
        .map(|i| crate::record::Job::new(format!("j{i:02}"), submission(&prompt, 60_000, None).spec, Mode::Wait, None, i))
        .collect();
    let (edge, effects) = Edge::restore(config(), jobs, vec![], None, 100);
    assert_eq!(effects.iter().filter(|e| matches!(e, Effect::Save(_))).count(), 30);
    let journalled = edge.journalled_bytes();
    assert!(journalled < 1 << 20, "{} MiB of whole records journalled for an undo that never comes", journalled >> 20);
}
