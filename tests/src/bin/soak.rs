//! The chaos soak from the command line (see `harness::chaos`): prints its report as JSON
//! and exits 1 if a promise did not hold.
//!
//! `cargo run --release -p claude-runner-tests --bin soak -- --jobs 1000 --edge native`
//! Options: `soak --help`.

use harness::chaos::{soak, SoakOptions};
use harness::EdgeKind;
use std::time::Duration;

const USAGE: &str = "Usage: soak [OPTIONS]

The chaos soak (tests/src/chaos.rs): jobs from several callers through an edge and two
agents while links are cut and the agents and the edge are killed and started again, the
edge keeping as few ended jobs as it may (MAX_RETAINED_JOBS=1), and the agents' usage
windows used up and reset; then it checks every job ended once, and that its waiter or
callback heard that end. Prints its report as JSON; exits 1 if a promise did not
hold, 2 on a bad option. Build the binaries first (cargo build --bins).

Options:
  --jobs N          jobs to submit                               (default 1000)
  --callers N       callers submitting at once                   (default 6)
  --seconds S       stop submitting after S seconds              (default 600)
  --seed N          the faults' random seed                      (default 1)
  --edge KIND       native | worker                              (default native)
  --no-faults       no faults: a baseline run
  --no-usage        no usage-window phases (agents' Claude used up, work held)
  --json PATH       also write the report to PATH
  -h, --help        print this";

/// What the command line asks for.
enum Ask {
    Help,
    Soak { opts: SoakOptions, json: Option<String> },
}

/// The command line, read; an error says which option is wrong and how.
fn parse(mut args: impl Iterator<Item = String>) -> Result<Ask, String> {
    let mut opts = SoakOptions::default();
    let mut json = None;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        fn number<T: std::str::FromStr>(arg: &str, text: String) -> Result<T, String> {
            text.parse().map_err(|_| format!("{arg} takes a whole number, not `{text}`"))
        }
        match arg.as_str() {
            "-h" | "--help" => return Ok(Ask::Help),
            "--jobs" => opts.jobs = number(&arg, value()?)?,
            "--callers" => opts.callers = number(&arg, value()?)?,
            "--seconds" => opts.max = Duration::from_secs(number(&arg, value()?)?),
            "--seed" => opts.seed = number(&arg, value()?)?,
            "--edge" => {
                opts.kind = match value()?.as_str() {
                    "native" => EdgeKind::Native,
                    "worker" => EdgeKind::Worker,
                    other => return Err(format!("--edge is native or worker, not `{other}`")),
                }
            }
            "--no-faults" => opts.faults = false,
            "--no-usage" => opts.usage = false,
            "--json" => json = Some(value()?),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    Ok(Ask::Soak { opts, json })
}

fn main() -> anyhow::Result<()> {
    let (opts, json) = match parse(std::env::args().skip(1)) {
        Ok(Ask::Soak { opts, json }) => (opts, json),
        Ok(Ask::Help) => {
            println!("{USAGE}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("soak: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// `soak --help` printed "Error: unknown option --help" and, with RUST_BACKTRACE set, a
    /// backtrace. It prints the usage; a bad option says which and shows the usage, once.
    #[test]
    fn help_prints_the_usage_and_a_bad_option_says_what_is_wrong() {
        let run = |args: &[&str]| Command::new(harness::bin("soak")).args(args).env("RUST_BACKTRACE", "1").output().unwrap();
        for help in ["--help", "-h"] {
            let out = run(&[help]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && out.stderr.is_empty(), "{help}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
            for option in ["Usage: soak", "--jobs", "--callers", "--seconds", "--seed", "--edge", "--no-faults", "--no-usage", "--json"] {
                assert!(stdout.contains(option), "{option}: {stdout}");
            }
        }
        for (args, says) in [(&["--jobs", "many"][..], "--jobs"), (&["--edge", "cloud"], "native or worker"), (&["--frobnicate"], "--frobnicate"), (&["--seed"], "needs a value")] {
            let out = run(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(says) && stderr.contains("Usage: soak") && !stderr.contains("backtrace"), "{args:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{args:?}");
        }
    }
}
