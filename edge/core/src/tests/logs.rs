//! The machine's log lines, captured on the test's thread: `LEVEL message key=value…`.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, Once};
use tracing::field::{Field, Visit};
use tracing::{span, Event, Metadata, Subscriber};

/// Lines logged on this thread while it lives.
pub(crate) struct Capture {
    lines: Arc<Mutex<Vec<String>>>,
    /// The capture this one stands in for on its thread, back when it ends.
    outer: Option<Arc<Mutex<Vec<String>>>>,
    /// Its thread's: ended there.
    _thread: std::marker::PhantomData<*const ()>,
}

thread_local! {
    /// Where this thread's lines go: its innermost capture's.
    static CAPTURING: RefCell<Option<Arc<Mutex<Vec<String>>>>> = const { RefCell::new(None) };
}

/// One subscriber for the whole test process, each thread's lines kept by its own capture.
/// A subscriber per capturing thread (`set_default`) lost lines: tracing-core keeps per
/// place (callsite) whether anyone logs there, and while a single such subscriber was
/// alive it asked only the thread first logging at a place — another test's, subscribed to
/// nothing — and kept "never" for it (`a_line_first_logged_on_another_thread…`). With one
/// global subscriber every place is always logged.
pub(crate) fn capture() -> Capture {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        tracing::subscriber::set_global_default(Lines).expect("no other global subscriber in the edge core's tests");
        // A place first logged by another thread while this was being set may have been
        // judged by no subscriber at all: judged again.
        tracing::callsite::rebuild_interest_cache();
    });
    let lines = Arc::new(Mutex::new(Vec::new()));
    let outer = CAPTURING.with(|capturing| capturing.replace(Some(Arc::clone(&lines))));
    Capture { lines, outer, _thread: std::marker::PhantomData }
}

impl Capture {
    pub(crate) fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let outer = self.outer.take();
        // A thread ending runs this after its own thread-locals may be gone.
        let _ = CAPTURING.try_with(|capturing| capturing.replace(outer));
    }
}

struct Lines;

impl Subscriber for Lines {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let Some(lines) = CAPTURING.try_with(|capturing| capturing.borrow().clone()).ok().flatten() else { return };
        let mut line = Line::default();
        event.record(&mut line);
        lines.lock().unwrap().push(format!("{} {}{}", event.metadata().level(), line.message, line.rest));
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[derive(Default)]
struct Line {
    message: String,
    rest: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

/// A line logged on a capturing thread at a place (a callsite) another thread, capturing
/// nothing, logged at first is captured. Each capture was a subscriber of its thread only
/// (`set_default`); with one alive, tracing-core asks only the first-logging thread's
/// subscriber whether the place is ever logged — none, so "never" was kept for it, and the
/// capturing thread's line there was dropped: `a_callback_host_taken_out…` lost its
/// "callback given up" lines about 1 run in 12 under parallel tests.
#[test]
fn a_line_first_logged_on_another_thread_is_still_captured() {
    fn log(n: u32) {
        tracing::warn!(n, "logged at one place by two threads");
    }
    let logs = capture();
    std::thread::spawn(|| log(1)).join().unwrap();
    log(2);
    let lines = logs.lines();
    assert_eq!(lines, ["WARN logged at one place by two threads n=2"], "only this thread's line, and it");
}
