//! The chaos soak from the command line (see `harness::chaos`): prints its report as JSON
//! and exits 1 if a promise did not hold.
//!
//! `cargo run --release -p claude-runner-tests --bin soak -- --jobs 1000 --edge native`
//! Options: `--jobs N` (1000), `--callers N` (6), `--seconds S` (stop submitting after S,
//! 600), `--seed N` (1), `--edge native|worker`, `--no-faults`, `--json PATH`.

use harness::chaos::{soak, SoakOptions};
use harness::EdgeKind;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let mut opts = SoakOptions::default();
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--jobs" => opts.jobs = value()?.parse()?,
            "--callers" => opts.callers = value()?.parse()?,
            "--seconds" => opts.max = Duration::from_secs(value()?.parse()?),
            "--seed" => opts.seed = value()?.parse()?,
            "--edge" => {
                opts.kind = match value()?.as_str() {
                    "native" => EdgeKind::Native,
                    "worker" => EdgeKind::Worker,
                    other => anyhow::bail!("--edge is native or worker, not {other}"),
                }
            }
            "--no-faults" => opts.faults = false,
            "--json" => json = Some(value()?),
            other => anyhow::bail!("unknown option {other}; see the header of tests/src/bin/soak.rs"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(soak(opts));
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = json {
        std::fs::write(path, &text)?;
    }
    if !report.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
