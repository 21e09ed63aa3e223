//! A job's blocking trips — the launcher's spawn, the started record and the prompt, the
//! end's records — on threads of the agent's own, not tokio's blocking pool (issue 11,
//! BENCHMARKS.md "The per-job hot path", session 43).
//!
//! Why not `spawn_blocking`: tokio's pool wakes an idle thread through its condition
//! variable while still holding the pool's lock, so the woken thread, at once on the other
//! core, sleeps again on that lock until the runtime thread lets go: two switches a trip,
//! and two thirds of the agent's waits on a contended lock (session 42's futex call
//! chains). Here each idle thread waits on a slot of its own: a trip is put in that slot,
//! the lock let go, and only then the thread unparked, so it wakes once and runs. The
//! answer comes back by a tokio oneshot (one wake of the runtime thread, as before).
//!
//! Threads are made as trips need them and kept idle afterwards, most recently idle used
//! first: their number is the most trips ever under way at once (a job's start has two,
//! its launcher's spawn and its record, beside each other), so a slow trip — a disk sync,
//! the launcher busy for seconds — never holds up another job's. A thread that cannot be
//! made (the user's process limit) leaves the trip to tokio's pool, as before. Trips that
//! take turns anyway — the launcher's spawns, one at a time behind its lock — go to a
//! [`Lane`] of their own instead: one thread that takes them in order, so none sleeps on
//! that lock. Rare or slow work (repositories, evictions, leftovers at start) stays on
//! `spawn_blocking`.
//!
//! A trip that panics answers [`Cut`], as a `JoinError` did, and its thread goes on; a
//! trip's future dropped before its answer lets the trip run to its end all the same, as
//! `spawn_blocking` does (a started record, a result's write are never cut in half).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// A trip ended without an answer: it panicked (a bug: the panic is in the agent's log),
/// or the runtime it was sent from is gone.
#[derive(Debug)]
pub struct Cut;

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("it panicked (a bug: see the agent's log)")
    }
}

/// A trip, given the thread that runs it (none on tokio's pool) to make idle again.
type Task = Box<dyn FnOnce(Option<&Arc<Worker>>) + Send>;

/// One of the agent's trip threads, as the runtime thread hands it work.
struct Worker {
    /// The trips handed to it, in order (a pool thread's holds one at a time; a
    /// [`Lane`]'s queues); locked by the runtime thread to put one in and by the worker
    /// to take it, never while the other is woken.
    next: Mutex<VecDeque<Task>>,
    thread: std::thread::Thread,
}

/// The idle threads, most recently idle last. Each push and pop is a few instructions
/// under the lock: the runtime thread pops as it sends a trip, a worker pushes itself
/// back before it answers, so the two rarely meet (and then spin, not sleep).
static IDLE: Mutex<Vec<Arc<Worker>>> = Mutex::new(Vec::new());

/// Runs `trip` on one of the agent's trip threads; its answer, or [`Cut`] if it panicked.
/// The trip is handed over at this call, not when the future is first polled (as
/// `spawn_blocking` does): a job's start sends its two trips, then awaits them in turn.
/// Inside the trip the caller's runtime is entered (as on a blocking-pool thread), so what
/// it calls finds it (`Handle::try_current`: the status file's write behind).
pub fn run<R: Send + 'static>(trip: impl FnOnce() -> R + Send + 'static) -> impl std::future::Future<Output = Result<R, Cut>> {
    let (task, answer) = task(trip, true);
    if let Err(task) = hand(task) {
        fallback(task);
    }
    answer
}

/// One thread of the agent's own for trips that take turns anyway: the launcher starts one
/// Claude at a time, behind its lock. Each start on a pool thread of its own slept on that
/// lock while another's exchange ran (two thirds of the agent's waits on a contended lock
/// once the blocking pool's were gone); queued here, the lane's thread takes the next start
/// as it ends the last, and is woken only when it had none.
pub struct Lane {
    name: &'static str,
    /// Its thread, once one could be made.
    worker: Mutex<Option<Arc<Worker>>>,
    /// How many of its next attempts to make its thread fail, as at the user's process
    /// limit (tests only).
    #[cfg(test)]
    refuse: std::sync::atomic::AtomicUsize,
}

impl Lane {
    pub const fn new(name: &'static str) -> Lane {
        Lane {
            name,
            worker: Mutex::new(None),
            #[cfg(test)]
            refuse: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Runs `trip` on the lane's thread after the trips handed to it before: as [`run`].
    /// A thread that could not be made (the user's process limit, used up by a job for a
    /// while) is tried again at the next trip: only this one goes to tokio's pool, not
    /// every launch for the agent's life.
    pub fn run<R: Send + 'static>(&self, trip: impl FnOnce() -> R + Send + 'static) -> impl std::future::Future<Output = Result<R, Cut>> {
        let (task, answer) = task(trip, false);
        let worker = {
            let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
            if worker.is_none() {
                *worker = self.spawn();
            }
            worker.clone()
        };
        match worker {
            Some(worker) => give(&worker, task),
            None => fallback(task),
        }
        answer
    }

    fn spawn(&self) -> Option<Arc<Worker>> {
        #[cfg(test)]
        if self.refuse.fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return None;
        }
        spawn(self.name)
    }
}

/// `trip` as a task for a thread (made idle again after it when `pooled`), and its answer.
fn task<R: Send + 'static>(trip: impl FnOnce() -> R + Send + 'static, pooled: bool) -> (Task, impl std::future::Future<Output = Result<R, Cut>>) {
    let (tx, rx) = oneshot::channel();
    let runtime = tokio::runtime::Handle::try_current().ok();
    let task: Task = Box::new(move |me| {
        let answer = {
            let _entered = runtime.as_ref().map(|runtime| runtime.enter());
            catch_unwind(AssertUnwindSafe(trip))
        };
        // Idle again before the answer wakes the runtime thread: its next trip finds this
        // thread without waiting for it to push itself back.
        if let Some(me) = me.filter(|_| pooled) {
            IDLE.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(me));
        }
        if let Ok(answer) = answer {
            let _ = tx.send(answer);
        }
        // A panic drops `tx`: the caller hears `Cut`.
    });
    (task, async move { rx.await.map_err(|_| Cut) })
}

/// No thread of our own: tokio's pool. A task it never runs (the runtime stopping) is
/// dropped, and with it its answer's sender.
fn fallback(task: Task) {
    drop(tokio::task::spawn_blocking(move || task(None)));
}

/// Gives `task` to an idle thread, or to a new one; the task back if no thread could be
/// made.
fn hand(task: Task) -> Result<(), Task> {
    let idle = IDLE.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let worker = match idle {
        Some(worker) => worker,
        None => match spawn("claude-runner-trip") {
            Some(worker) => worker,
            None => return Err(task),
        },
    };
    give(&worker, task);
    Ok(())
}

/// Puts `task` in `worker`'s slot and wakes it, after the lock is let go: the thread wakes
/// to a slot it takes at once. (A thread not parked is not woken: `unpark` leaves it a
/// token, no system call.)
fn give(worker: &Worker, task: Task) {
    worker.next.lock().unwrap_or_else(|e| e.into_inner()).push_back(task);
    worker.thread.unpark();
}

/// A new trip thread, parked until its first trip.
fn spawn(name: &str) -> Option<Arc<Worker>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Worker>>(1);
    let made = std::thread::Builder::new().name(name.into()).spawn(move || {
        let me = Arc::new(Worker { next: Mutex::new(VecDeque::new()), thread: std::thread::current() });
        let _ = tx.send(Arc::clone(&me));
        drop(tx);
        loop {
            let next = me.next.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
            match next {
                // Panics are caught inside the task: the thread goes on.
                Some(task) => task(Some(&me)),
                // A token left by an unpark makes this return at once; a spurious return
                // finds the slot empty and parks again.
                None => std::thread::park(),
            }
        }
    });
    match made {
        Ok(_) => rx.recv().ok(),
        Err(e) => {
            tracing::warn!(error = %e, "could not make a thread for a job's blocking work: tokio's blocking pool does it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A trip's answer comes back, and a panicking trip answers `Cut` without taking its
    /// thread down: the next trips still run, on the threads there are.
    #[tokio::test]
    async fn a_panicking_trip_answers_cut_and_the_threads_go_on() {
        assert_eq!(run(|| 7).await.unwrap(), 7);
        for _ in 0..4 {
            assert!(run(|| -> u32 { panic!("a bug in a trip") }).await.is_err());
            assert_eq!(run(|| "after").await.unwrap(), "after");
        }
    }

    /// One trip waiting on another's work never holds it up: a trip blocked (a slow sync,
    /// a busy launcher) does not keep the next job's trip from a thread. With one shared
    /// thread, or a trip queued behind a busy one, this never ends (the bound only keeps a
    /// broken build from hanging the suite).
    #[tokio::test]
    async fn a_blocked_trip_does_not_hold_up_another() {
        let waits: Vec<_> = (0..8)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                (tx, tokio::spawn(run(move || rx.recv().is_ok())))
            })
            .collect();
        // Eight trips are blocked; each of these runs all the same and lets one go.
        for (tx, _) in &waits {
            let tx = tx.clone();
            tokio::time::timeout(Duration::from_secs(60), run(move || tx.send(()).unwrap()))
                .await
                .expect("a trip was held up behind a blocked one")
                .unwrap();
        }
        for (_, waiting) in waits {
            assert!(waiting.await.unwrap().unwrap());
        }
    }

    /// A trip starts when it is asked for, not when its answer is awaited: a job's start
    /// asks for the launcher's spawn and its record, then awaits the spawn first. Were a
    /// trip handed over only once polled, the first would wait here for the second forever
    /// (the bound only keeps a broken build from hanging the suite).
    #[tokio::test]
    async fn a_trip_starts_when_asked_not_when_awaited() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let first = run(move || rx.recv().is_ok());
        let second = run(move || tx.send(()).is_ok());
        assert!(tokio::time::timeout(Duration::from_secs(60), first).await.expect("the second trip never started").unwrap());
        assert!(second.await.unwrap());
    }

    /// A lane runs its trips one after another in the order they were asked for, and a
    /// panic in one answers `Cut` without keeping the next from running.
    #[tokio::test]
    async fn a_lane_runs_its_trips_in_turn_and_goes_on_after_a_panic() {
        static LANE: Lane = Lane::new("claude-runner-test-lane");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = {
            let order = Arc::clone(&order);
            LANE.run(move || {
                rx.recv().unwrap();
                order.lock().unwrap().push(1);
            })
        };
        let panics = LANE.run(|| -> u32 { panic!("a bug in a trip") });
        let third = {
            let order = Arc::clone(&order);
            LANE.run(move || order.lock().unwrap().push(3))
        };
        tx.send(()).unwrap();
        first.await.unwrap();
        assert!(panics.await.is_err());
        third.await.unwrap();
        assert_eq!(*order.lock().unwrap(), [1, 3]);
    }

    /// Review rev38, finding 6: a lane whose thread could not be made at its first trip
    /// (a job had used up the user's process limit) sent every later one to tokio's pool
    /// for the agent's life. Its thread is tried again at the next trip.
    #[tokio::test]
    async fn a_lane_whose_thread_could_not_be_made_tries_again() {
        static LANE: Lane = Lane::new("claude-runner-test-lane-again");
        let on = || std::thread::current().name().map(str::to_string);
        LANE.refuse.store(1, std::sync::atomic::Ordering::SeqCst);
        assert_ne!(LANE.run(on).await.unwrap().as_deref(), Some("claude-runner-test-lane-again"), "its thread was refused: the trip ran on tokio's pool");
        assert_eq!(LANE.run(on).await.unwrap().as_deref(), Some("claude-runner-test-lane-again"), "the lane did not try its thread again");
    }

    /// Inside a trip the caller's runtime is entered: what the trip calls may spawn on it
    /// (the status file's write behind), as on a blocking-pool thread.
    #[tokio::test]
    async fn a_trip_finds_its_callers_runtime() {
        let spawned = run(|| tokio::runtime::Handle::try_current().map(|runtime| runtime.spawn(async { 5 }))).await.unwrap();
        assert_eq!(spawned.expect("the runtime entered").await.unwrap(), 5);
    }

    /// A trip whose caller went away (its job's task dropped) still runs to its end: a
    /// started record or a result's write is never cut in half.
    #[tokio::test]
    async fn a_trip_runs_to_its_end_when_its_caller_is_gone() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let caller = tokio::spawn(run(move || {
            started_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            done_tx.send(()).unwrap();
        }));
        started_rx.await.unwrap();
        caller.abort();
        let _ = caller.await;
        go_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(60), done_rx).await.expect("the trip ran").unwrap();
    }
}
