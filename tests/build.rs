//! The Worker variants of the contract suite need the built Worker and Node; `tests/run`
//! sets CLAUDE_RUNNER_WORKER_TESTS=1 once it has built them. Without it those tests are
//! marked ignored (visible in the summary) rather than passing vacuously.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(worker_tests)");
    println!("cargo::rerun-if-env-changed=CLAUDE_RUNNER_WORKER_TESTS");
    if std::env::var("CLAUDE_RUNNER_WORKER_TESTS").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=worker_tests");
    }
}
