//! What one job costs the machine, counted in this thread's heap allocations (no clock):
//! it must not grow with what a connection has done before (issue 11's per-job hot path).

use super::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting each thread's allocations (tests run on threads of
/// their own, so a test counts only its own work).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: an allocation while the thread's locals are torn down is not counted.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// This thread's allocations while `f` runs.
fn allocations<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (ALLOCATIONS.with(Cell::get) - before, out)
}

/// One job through the ready agent `spark` of session `sid`, one at a time: submitted,
/// sent, accepted, its result. Returns the allocations of the result's event.
fn one_job(edge: &mut Edge, now: u64, sid: &str, n: u64) -> u64 {
    let job_id = format!("job-{n:05}");
    let s = edge.submit(now, job_id.clone(), submission("x", 10_000, None), Mode::Detached).unwrap();
    assert_eq!(order_of(&s.effects, sid, "spark", now).header.job_id, job_id);
    say(edge, now, sid, AgentMessage::Accepted { job_id: job_id.clone() });
    let msg = result_msg(edge, &job_id, ok_result());
    let text = msg.to_text();
    let (cost, effects) = allocations(|| edge.message(now, sid, &text));
    assert!(sent(&effects, sid).iter().any(|m| matches!(m, EdgeMessage::ResultAck { .. })), "{effects:?}");
    say(edge, now, sid, credit(1, n + 1));
    cost
}

/// A connection that has run a thousand jobs costs each new job's result what its tenth
/// cost. The result's event keeps the session's version before it for an undo
/// (`storage.rs`); the jobs whose results were heard on the connection (up to 1,024 job
/// ids) were kept in that record, so each event copied them all — about 3,000 allocations
/// a job, ten times the rest of the edge's, in the bench.
#[test]
fn a_jobs_result_costs_the_same_after_a_thousand_jobs_on_the_connection() {
    let (mut edge, sid) = ready_edge();
    let mut early = 0;
    for n in 0..1_000 {
        let cost = one_job(&mut edge, 1 + n, &sid, n);
        if n == 10 {
            early = cost;
        }
        if n == 999 {
            // Slack for the maps that grow with the jobs retained (a rehash is one
            // allocation); a copy per result heard is hundreds.
            assert!(cost <= early + 32, "the 1,000th job's result took {cost} allocations, the 11th's {early}");
        }
    }
}

/// A job's progress event costs the edge the same whatever is in it. The edge shows each
/// event as the agent sent it (an SSE line, kept for followers who come later): it was
/// read into a JSON tree, an allocation per string, array and object in it, and written
/// out again.
#[test]
fn a_progress_events_cost_does_not_grow_with_what_is_in_it() {
    let (mut edge, sid) = ready_edge();
    let s = edge.submit(1, "j1".into(), submission("x", 10_000, None), Mode::Detached).unwrap();
    order_of(&s.effects, &sid, "spark", 1);
    say(&mut edge, 1, &sid, AgentMessage::Accepted { job_id: "j1".into() });
    let mut cost_of = |seq: u64, event: Value| {
        let text = progress_msg(&edge, "j1", seq, event).to_text();
        allocations(|| edge.message(2, &sid, &text)).0
    };
    let small = cost_of(1, json!({"type": "assistant", "text": "hi"}));
    let parts: Vec<Value> = (0..200).map(|i| json!({"type": "text", "text": format!("part {i}")})).collect();
    let large = cost_of(2, json!({"type": "assistant", "message": {"content": parts}}));
    assert!(large <= small + 16, "an event of 200 parts took {large} allocations, one of two fields {small}");
}
