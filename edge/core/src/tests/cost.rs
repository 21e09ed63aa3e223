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

/// One job's life, its task carrying `tools` allowed and as many disallowed tools: the
/// allocations of its submission (which sends it), its acceptance, its start and its
/// result.
fn life_with_tools(edge: &mut Edge, sid: &str, n: u64, tools: usize) -> [u64; 4] {
    let job_id = format!("job-{n:05}");
    let names: Vec<String> = (0..tools).map(|i| format!("Tool{i:03}")).collect();
    let body = json!({"prompt": "x", "timeout_ms": 10_000, "allowed_tools": names, "disallowed_tools": names}).to_string();
    let sub = ExecuteRequest::parse(body.as_bytes(), None, Limits { max_timeout_ms: 3_600_000 }).unwrap();
    let (sent, s) = allocations(|| edge.submit(n, job_id.clone(), sub, Mode::Detached).unwrap());
    assert_eq!(order_of(&s.effects, sid, "spark", n).spec.allowed_tools.len(), tools);
    let accepted = AgentMessage::Accepted { job_id: job_id.clone() }.to_text();
    let accepted = allocations(|| edge.message(n, sid, &accepted)).0;
    let started = AgentMessage::started(&job_id, &edge.job(&job_id).unwrap().order_nonce(), &link(edge, sid)).to_text();
    let started = allocations(|| edge.message(n, sid, &started)).0;
    assert!(!edge.job(&job_id).unwrap().unstarted, "the start was taken");
    let result = result_msg(edge, &job_id, ok_result()).to_text();
    let ended = allocations(|| edge.message(n, sid, &result)).0;
    assert!(edge.job(&job_id).unwrap().state.is_terminal(), "the job ended");
    say(edge, n, sid, credit(1, n + 1));
    [sent, accepted, started, ended]
}

/// A job's events cost the edge the same whatever its task holds: the version of its
/// record each event keeps for an undo, the record it saves and the order that sends it
/// share the task, and the header an ended job leaves in memory keeps none of its lists.
/// Copied (issue 11), a task of 2 × 128 tools cost each of its job's events an allocation
/// per tool twice over.
#[test]
fn a_jobs_events_cost_the_same_whatever_its_task_holds() {
    let (mut edge, sid) = ready_edge();
    // The first job warms what every job reuses (maps, buffers).
    life_with_tools(&mut edge, &sid, 0, 0);
    let small = life_with_tools(&mut edge, &sid, 1, 0);
    let large = life_with_tools(&mut edge, &sid, 2, 128);
    // Slack for the buffers a larger task's digest and order are written into (they grow
    // by doubling); a copy of the task is an allocation per tool, 256 here.
    let events = ["submission and order", "acceptance", "start", "result"];
    let grown: Vec<String> = events.iter().zip(small.iter().zip(large)).filter(|(_, (small, large))| *large > **small + 24).map(|(event, (small, large))| format!("{event}: {large} against {small}")).collect();
    assert!(grown.is_empty(), "allocations of a job of 256 tools against one of none: {grown:?}");
}

/// An event that changes a job copies its record once at most, for the version it keeps
/// for an undo (copy on write): the record it saves is the one memory keeps, shared with
/// it. An acceptance and a start each copied it twice (the undo's, the `Save`'s) — with
/// the result's two, a fifth of the edge's allocations in the bench (issue 11).
#[test]
fn an_event_that_changes_a_job_copies_its_record_once() {
    let (mut edge, sid) = ready_edge();
    let s = edge.submit(1, "j1".into(), submission("x", 10_000, None), Mode::Detached).unwrap();
    order_of(&s.effects, &sid, "spark", 1);
    let copy = allocations(|| edge.job("j1").unwrap().clone()).0;
    // The same frame for a job the agent was not sent: read alike, and nothing changes.
    let nothing = AgentMessage::Accepted { job_id: "j0".into() }.to_text();
    let (read, effects) = allocations(|| edge.message(1, &sid, &nothing));
    assert!(effects.is_empty(), "{effects:?}");
    let accepted = AgentMessage::Accepted { job_id: "j1".into() }.to_text();
    let (cost, effects) = allocations(|| edge.message(1, &sid, &accepted));
    assert!(effects.iter().any(|e| matches!(e, Effect::Save(j) if j.state == JobState::Running)), "{effects:?}");
    // Besides the copy: the journal's entry and the effect list.
    assert!(cost <= read + copy + 6, "an acceptance took {cost} allocations: reading it {read}, one copy of the record {copy}");
}

/// One job's events on session `sid`: the allocations of its submission (which sends it),
/// its result and the agent's credit after it.
fn session_costs(edge: &mut Edge, sid: &str, n: u64) -> [u64; 3] {
    let job_id = format!("job-{n:05}");
    let (sent, s) = allocations(|| {
        edge.begin_request(n);
        edge.submit(n, job_id.clone(), submission("x", 10_000, None), Mode::Detached).unwrap()
    });
    order_of(&s.effects, sid, "spark", n);
    say(edge, n, sid, AgentMessage::Accepted { job_id: job_id.clone() });
    let result = result_msg(edge, &job_id, ok_result()).to_text();
    let ended = allocations(|| edge.message(n, sid, &result)).0;
    assert!(edge.job(&job_id).unwrap().state.is_terminal(), "the job ended");
    let credit = credit(1, n + 1).to_text();
    let credited = allocations(|| edge.message(n, sid, &credit)).0;
    [sent, ended, credited]
}

/// A job's events copy its agent's session record — its keys, login, labels and mirrors,
/// an allocation each — once at most, for the undo of an event that changes it: its
/// `SaveSession` shares it, and a result, which only marks the agent as heard from (not
/// undone, as a frame's arrival is not), copies none of it. The order's dispatch and the
/// credit copied it twice each and the result once (issue 11: 6 % of the edge's
/// allocations in the bench).
#[test]
fn a_jobs_events_copy_its_agents_session_once_at_most() {
    let (mut edge, sid) = ready_edge();
    session_costs(&mut edge, &sid, 0);
    let light = session_costs(&mut edge, &sid, 1);
    // 256 mirrors: a copy of the session is some 280 allocations more (the names, and the
    // nodes of the tree that holds them).
    let names: Vec<String> = (0..256).map(|i| format!("repo-{i:03}")).collect();
    say(&mut edge, 2, &sid, AgentMessage::Mirrors { names });
    assert_eq!(edge.session(&sid).unwrap().agent().unwrap().mirrors.len(), 256);
    let heavy = session_costs(&mut edge, &sid, 2);
    let allowed = [1, 0, 1].map(|copies| copies * 300 + 16);
    let events = ["submission and order", "result", "credit"];
    let over: Vec<String> = (0..3).filter(|&i| heavy[i] > light[i] + allowed[i]).map(|i| format!("{}: {} against {}", events[i], heavy[i], light[i])).collect();
    assert!(over.is_empty(), "allocations with 256 mirrors against none, more than one copy of the session: {over:?}");
}

/// Reading an agent's frame costs what reading its fields as a plain struct costs, and
/// nothing more: its `type` is read first, then its fields straight into that kind's
/// variant (`shared/src/frame.rs`). serde's reading of the internally tagged enum buffered
/// every field of the frame first (issue 11: 12 % of the edge's allocations).
#[test]
fn reading_a_frame_costs_what_reading_its_fields_does() {
    let key = MacKey::from_bytes([1; 32]);
    let tagged = |m: &AgentMessage| match m {
        AgentMessage::Result { envelope } | AgentMessage::Started { envelope } | AgentMessage::Event { envelope } => serde_json::to_string(envelope).unwrap(),
        _ => unreachable!(),
    };
    let result = AgentMessage::result("j1", "j1:1", ok_result(), &key);
    let started = AgentMessage::started("j1", "j1:1:0123456789abcdef", &key);
    let event = progress_msg_with(&key, "j1", "j1:1:0123456789abcdef");
    let mut frames: Vec<(AgentMessage, u64)> = Vec::new();
    for m in [result, started, event] {
        let fields = tagged(&m);
        let plain = allocations(|| serde_json::from_str::<shared::envelope::Tagged>(&fields).unwrap()).0;
        frames.push((m, plain));
    }
    frames.push((AgentMessage::Accepted { job_id: "j1".into() }, allocations(|| serde_json::from_str::<String>(r#""j1""#).unwrap()).0));
    frames.push((credit(1, 7), 0));
    let mut over = Vec::new();
    for (message, plain) in frames {
        let text = message.to_text();
        let (cost, read) = allocations(|| shared::protocol::decode::<AgentMessage>(&text));
        assert_eq!(read.as_ref(), Ok(&message));
        if cost > plain {
            over.push(format!("{}…: {cost} allocations, its fields alone {plain}", &text[..text.len().min(40)]));
        }
    }
    assert!(over.is_empty(), "{over:?}");
}

/// A progress batch of three events, MACed with `key`.
fn progress_msg_with(key: &MacKey, job_id: &str, nonce: &str) -> AgentMessage {
    let events = (1..=3).map(|seq| shared::protocol::ProgressEvent { seq, event: json!({"type": "assistant", "message": {"content": [{"type": "text", "text": format!("line {seq}")}]}}) }).collect();
    AgentMessage::progress(job_id, nonce, events, key)
}
