//! Throughput of `submit`'s event-stream parser (`agent_core::sse`) on what an edge may
//! send it, in the chunks a connection brings (408 KiB, the most hyper's read buffer grows to on a
//! fast link): a job's progress replayed (events of some 200 bytes), and the worst a
//! hostile or broken edge can choose, events of 7 bytes (`data:` and a blank line).
//! Median of 7 runs after 2 warm-ups, in CPU time of the thread.
//!
//!     cargo bench -p claude-runner --bench sse

mod measure;

use agent_core::sse::EventStream;

/// Median of 7 runs after 2 warm-ups ([`measure::median_mib_s`]).
fn median_mib_s(bytes: usize, run: impl FnMut()) -> f64 {
    measure::median_mib_s(bytes, 2, 7, run)
}

/// `wire` through a fresh parser, `chunk` bytes at a time: the events it gave.
fn parse(wire: &[u8], chunk: usize) -> usize {
    let mut stream = EventStream::default();
    wire.chunks(chunk).map(|c| std::hint::black_box(stream.push(c)).len()).sum()
}

fn main() {
    const CHUNK: usize = 8192 + 4096 * 100;
    let progress: String = (0..8000)
        .map(|n| {
            format!(
                "id: {n}\nevent: progress\ndata: {{\"type\":\"assistant\",\"message\":{{\"content\":[{{\"type\":\"text\",\"text\":\"step {n}: read the file, ran the tests, all green so far\"}}]}},\"session_id\":\"0b6c1e8a-5d2f-4c3b-9a7e-1f2d3c4b5a69\"}}\n\n"
            )
        })
        .collect();
    let tiny = "data:\n\n".repeat(2 * 1024 * 1024 / 7);
    assert_eq!(parse(progress.as_bytes(), CHUNK), 8000);
    assert_eq!(parse(tiny.as_bytes(), CHUNK), tiny.len() / 7);
    let replay = median_mib_s(progress.len(), || {
        parse(progress.as_bytes(), CHUNK);
    });
    let worst = median_mib_s(tiny.len(), || {
        parse(tiny.as_bytes(), CHUNK);
    });
    println!("submit's event-stream parser, {} KiB chunks:", CHUNK / 1024);
    println!("  progress replayed ({:.2} MiB, 8000 events):      {replay:.0} MiB/s", progress.len() as f64 / 1048576.0);
    println!("  7-byte events ({:.2} MiB, {} events, worst case): {worst:.1} MiB/s", tiny.len() as f64 / 1048576.0, tiny.len() / 7);
}
