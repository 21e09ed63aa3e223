//! How the agent's benches measure: in CPU time of the bench's thread (on a shared
//! machine, wall time measures the neighbours too), the median of `runs` after `warm_ups`.
//! A folder with `mod.rs`, so Cargo does not take it for a bench of its own.

/// This thread's CPU time, in seconds.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// MiB/s of `run` over `bytes`: the median of `runs` timed runs after `warm_ups`.
pub fn median_mib_s(bytes: usize, warm_ups: usize, runs: usize, run: impl FnMut()) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / median_seconds(warm_ups, runs, run)
}

/// Seconds of `run`: the median of `runs` timed runs after `warm_ups`.
pub fn median_seconds(warm_ups: usize, runs: usize, mut run: impl FnMut()) -> f64 {
    for _ in 0..warm_ups {
        run();
    }
    let mut times: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t = cpu_seconds();
            run();
            cpu_seconds() - t
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
