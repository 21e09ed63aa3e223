//! The chaos soak's short form (see `harness::chaos`; BENCHMARKS.md has the long runs):
//! jobs through two agents while their links to the edge are black-holed and reset, and
//! agents and the edge are killed and stopped at random, the edge keeps a single ended job
//! (MAX_RETAINED_JOBS=1), and the agents' usage windows are used up and reset. Every promise
//! is checked at the end; a broken one fails the test with the soak's report.

use harness::chaos::{soak, SoakOptions, MIN_FAULTS, MIN_USAGE_HOLDS};
use harness::EdgeKind;
use std::time::Duration;

async fn short_soak(kind: EdgeKind, jobs: usize) {
    let options = SoakOptions { kind, jobs, callers: 6, max: Duration::from_secs(240), seed: std::process::id() as u64, faults: true, usage: true };
    let report = soak(options).await;
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    assert!(report.problems.is_empty(), "{text}");
    assert!(report.faults.values().sum::<u64>() >= MIN_FAULTS, "too few faults to mean anything: {text}");
    assert!(report.usage_holds >= MIN_USAGE_HOLDS, "no usage phase held the work (its agents away each time?): {text}");
    assert!(report.forgotten > 0, "the edge forgot no job under MAX_RETAINED_JOBS=1: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_edge_keeps_its_promises_under_chaos() {
    short_soak(EdgeKind::Native, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(worker_tests), ignore = "needs the built Worker: run tests/run (it sets CLAUDE_RUNNER_WORKER_TESTS=1)")]
async fn the_worker_keeps_its_promises_under_chaos() {
    harness::require_worker_bundle();
    short_soak(EdgeKind::Worker, 100).await;
}
