//! What the two native binaries (`claude-runner` and `claude-runner-edge`) need from the
//! operating system, in one place: the wall clock, fresh entropy, being non-dumpable,
//! logging to stderr, the stop signals and the lock that makes a data folder one process's
//! own, and the descriptor limit ([`nofile`]). The `shared` crate stays pure (it builds for wasm32 too); the
//! Worker has its own clock and entropy from the Workers runtime.

pub mod home;
pub mod nofile;

/// Makes this process non-dumpable: a process of the same user can then neither read its
/// `/proc/<pid>/environ` (where both binaries' secrets are given) nor its memory, nor trace
/// it; only root or a holder of CAP_SYS_PTRACE can. Both binaries call it first in `main`:
/// from the `exec` until here a process of the same user could still read them (README,
/// "What a job can see").
pub fn not_dumpable() {
    // SAFETY: prctl changes a process attribute only; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// Milliseconds since the epoch, from the system clock. For timestamps people read and
/// for expiry checks against the other side's clock; durations use a monotonic clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Fresh random bytes for ids and nonces.
pub fn entropy<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes
}

/// Takes the lock that makes a folder one process's own, held for as long as the returned
/// file stays open (the kernel lets it go when the process ends, however it ends; `exec`'d
/// children do not inherit it: std opens files close-on-exec). `None`: another process
/// holds it. The file is created owner-only and never followed through a symlink; opened
/// without blocking, so a FIFO put in its place is refused rather than hanging the start.
pub fn hold_lock(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let file = open_plain_for_writing(path, false)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Opens `path` for writing, created owner-only when absent, as a plain file or not at all
/// (an error naming it): opened without blocking, so a FIFO put in its place is refused
/// rather than waited on (an open for writing waits for a reader); through a link only
/// when `follow`.
pub fn open_plain_for_writing(path: &std::path::Path, follow: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let named = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{} ({e}): it must be a plain file the process's user may write, or absent", path.display()))
    };
    let not_plain = || named(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a plain file"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | if follow { 0 } else { libc::O_NOFOLLOW })
        .open(path)
        // A FIFO without a reader: ENXIO.
        .map_err(|e| if e.raw_os_error() == Some(libc::ENXIO) { not_plain() } else { named(e) })?;
    if !file.metadata().map_err(named)?.is_file() {
        return Err(not_plain());
    }
    Ok(file)
}

/// Held by a test while it forks a child, and by the lock tests while they hold a lock: a
/// child forked meanwhile holds every descriptor of this process until its `exec` (close
/// on exec closes them only then), the lock's with them, and the lock was still held after
/// its holder let it go (seen once in CI).
#[cfg(test)]
pub(crate) static FORKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod lock_tests {
    /// A FIFO where the lock goes: refused at once, naming the file (an `open` for writing
    /// blocks on a FIFO until a reader comes).
    #[test]
    fn a_fifo_in_the_locks_place_is_refused_not_waited_on() {
        let dir = std::env::temp_dir().join(format!("cr-lock-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("edge.lock");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we made.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = super::hold_lock(&path).err().expect("a FIFO was taken as the lock");
        assert!(e.to_string().contains("plain file") && e.to_string().contains("edge.lock"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_lock_is_one_holders_until_it_is_let_go() {
        let _forking = super::FORKING.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("cr-lock-once-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let first = super::hold_lock(&dir.join("x.lock")).unwrap().expect("free");
        assert!(super::hold_lock(&dir.join("x.lock")).unwrap().is_none(), "held twice");
        drop(first);
        assert!(super::hold_lock(&dir.join("x.lock")).unwrap().is_some(), "not let go");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogFormat {
    Text,
    Json,
}

/// `LOG_FORMAT` as set: `text` (also unset, or empty as an unset compose variable is) or
/// `json`, in any case. Anything else is refused, not taken as text: a log shipper
/// waiting for JSON lines got text without a word.
pub fn log_format(value: &str) -> Result<LogFormat, String> {
    match value.trim() {
        v if v.is_empty() || v.eq_ignore_ascii_case("text") => Ok(LogFormat::Text),
        v if v.eq_ignore_ascii_case("json") => Ok(LogFormat::Json),
        _ => Err(format!("LOG_FORMAT must be `text` or `json`, got `{}`; unset, it is text", shared::text::one_line(shared::text::truncate(value, 80)))),
    }
}

#[cfg(test)]
mod log_format_tests {
    use super::{log_format, LogFormat};

    /// Anything but `json` was taken as text without a word (`JSON`, `jsonl`, a typo): a
    /// log shipper waiting for JSON lines got text. Refused, saying the two; unset (or
    /// empty, as an unset compose variable is) is text.
    #[test]
    fn a_log_format_that_is_neither_is_refused_not_taken_as_text() {
        for (value, format) in [("", LogFormat::Text), ("text", LogFormat::Text), ("json", LogFormat::Json), (" JSON ", LogFormat::Json), ("Text", LogFormat::Text)] {
            assert_eq!(log_format(value), Ok(format), "{value:?}");
        }
        for value in ["jsonl", "xml", "js on"] {
            let err = log_format(value).unwrap_err();
            assert!(err.starts_with(&format!("LOG_FORMAT must be `text` or `json`, got `{value}`")), "{err}");
        }
    }
}

/// Logs to stderr, one line per event: `text` (colour only on a terminal) or `json`,
/// filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let _ = LOGGING.set(format);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // `try_init` also sends the `log` crate's records (rustls', tungstenite's) to it.
    let _ = tracing_subscriber::util::SubscriberInitExt::try_init(logger(format, ansi, std::io::stderr));
}

/// The format [`init_logging`] was given, if it was called: a helper process of the agent's
/// logs as the agent does.
pub fn logging_format() -> Option<LogFormat> {
    LOGGING.get().copied()
}

static LOGGING: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// [`init_logging`]'s logger, writing to `writer` (colours when `ansi`): for a process that
/// makes it its thread's default (`tracing::dispatcher::with_default`) rather than the
/// global one.
pub fn logger<W>(format: LogFormat, ansi: bool, writer: W) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_timer(Stamp).with_writer(writer).with_ansi(ansi);
    if format == LogFormat::Json {
        tracing::Dispatch::new(builder.json().finish())
    } else {
        tracing::Dispatch::new(builder.finish())
    }
}

/// The log lines' timestamps, as tracing-subscriber's own `SystemTime` timer writes them
/// (`2026-12-02T10:39:41.123456Z`, UTC, microseconds), with the date and time of day
/// worked out once a second instead of for every line: the edge writes four lines per
/// job, and working out and writing the whole date for each was about a seventh of the
/// edge's logging CPU (1.1 of 7.3 % of its samples in a profile under `bench`).
struct Stamp;

thread_local! {
    /// The second last written, and its text up to the seconds' digits.
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

impl tracing_subscriber::fmt::time::FormatTime for Stamp {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        SECOND.with(|second| {
            let mut second = second.borrow_mut();
            if second.0 != now.as_secs() {
                let text = shared::time::rfc3339(now.as_secs().saturating_mul(1000));
                *second = (now.as_secs(), text.trim_end_matches('Z').to_string());
            }
            write!(w, "{}.{:06}Z", second.1, now.subsec_micros())
        })
    }
}

/// Resolves on SIGINT or SIGTERM: how both binaries learn to stop.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handlers install");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;

    /// The same text as tracing-subscriber's own timer, second after second.
    #[test]
    fn log_timestamps_read_as_the_subscribers_own() {
        let shape = |text: &str| -> String { text.chars().map(|c| if c.is_ascii_digit() { '0' } else { c }).collect() };
        let theirs = || {
            let mut text = String::new();
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut text)).unwrap();
            text
        };
        for _ in 0..3 {
            let before = theirs();
            let mut ours = String::new();
            Stamp.format_time(&mut Writer::new(&mut ours)).unwrap();
            let after = theirs();
            assert_eq!(shape(&ours), shape(&before), "{ours} against {before}");
            // One format, so the text's order is time's order.
            assert!(before <= ours && ours <= after, "{before} <= {ours} <= {after}");
            std::thread::sleep(std::time::Duration::from_millis(600));
        }
    }
}
