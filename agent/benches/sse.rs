//! Throughput of `submit`'s event-stream parser (`agent_core::sse`) on what an edge may
//! send it, in the chunks a connection brings (408 KiB, the most hyper's read buffer grows to on a
//! fast link): a job's progress replayed (events of some 200 bytes), and the worst a
//! hostile or broken edge can choose, events of 7 bytes (`data:` and a blank line).
//! Median of 7 runs after 2 warm-ups, in CPU time of the thread.
//!
//! Beside it, what the edge spends on each of the same events before it passes them on:
//! the scan of its nesting (`shared::protocol::nests_deeper_than`, every byte looked at),
//! per event, and on the largest event an agent may send, 256 KiB of brackets and strings.
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
    let tiny_mib_s = median_mib_s(tiny.len(), || {
        parse(tiny.as_bytes(), CHUNK);
    });
    // The edge's nesting check of each event's text (`data:` of the replay above).
    let events: Vec<&str> = progress.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let event_bytes: usize = events.iter().map(|e| e.len()).sum();
    let depth = shared::protocol::MAX_EVENT_DEPTH;
    assert!(events.iter().all(|e| !shared::protocol::nests_deeper_than(e.as_bytes(), depth)));
    let scanned = median_mib_s(event_bytes, || {
        for e in &events {
            std::hint::black_box(shared::protocol::nests_deeper_than(std::hint::black_box(e.as_bytes()), depth));
        }
    });
    let per_event_ns = event_bytes as f64 / events.len() as f64 / (scanned * 1048576.0) * 1e9;
    let largest: String = format!("[{}]", r#""a\"[{",[{"x":1}],"#.repeat(shared::protocol::MAX_PROGRESS_BYTES / 20));
    let worst = median_mib_s(largest.len(), || {
        std::hint::black_box(shared::protocol::nests_deeper_than(std::hint::black_box(largest.as_bytes()), depth));
    });
    println!("submit's event-stream parser, {} KiB chunks:", CHUNK / 1024);
    println!("  progress replayed ({:.2} MiB, 8000 events):      {replay:.0} MiB/s", progress.len() as f64 / 1048576.0);
    println!("  7-byte events ({:.2} MiB, {} events, worst case): {tiny_mib_s:.1} MiB/s", tiny.len() as f64 / 1048576.0, tiny.len() / 7);
    println!("the edge's nesting check of each event (MAX_EVENT_DEPTH {depth}):");
    println!("  the replay's {} events ({} bytes each):           {scanned:.0} MiB/s, {per_event_ns:.0} ns an event", events.len(), event_bytes / events.len());
    println!("  one event of {} KiB, brackets in strings and out:  {worst:.0} MiB/s", largest.len() / 1024);
}
