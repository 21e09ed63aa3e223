//! Reading a request body: how much is kept, how much of an oversized one is read on, and
//! what an upload that broke off means. Hosts feed the chunks they receive to an
//! [`Intake`] and stop when it says so; the [`Body`] it ends with is what the HTTP routing
//! answers from, so both hosts answer an oversized or broken upload the same way.

/// How much of an oversized body is read (and dropped, never held) so the caller is still
/// listening when its 413 comes: answering while the caller still sends makes the
/// connection reset, and the caller would see a network error instead of what to fix.
/// Past this the caller is simply cut off.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// How much of a refused request's body (no secret, unknown route) is read, and for how
/// long, before the refusal is answered. Nothing is kept; the bound is small so a caller
/// without the secret cannot make the edge read or wait, yet large enough that a caller
/// that sent an ordinary small request with a wrong secret reads its 403 rather than a
/// reset connection (a runtime that answers while request bytes sit unread may reset it).
pub const REFUSAL_DRAIN_LIMIT: usize = 16 * 1024;
pub const REFUSAL_DRAIN_MS: u64 = 1_000;

/// How long a body may take at the least, counted from when the host starts reading it
/// (its request's head read): as long as a head may take (the native edge's
/// `HEADER_READ_TIMEOUT`), so a small body on a slow link is never cut short.
pub const BODY_FLOOR_MS: u64 = 30_000;

/// The slowest a body may arrive past [`BODY_FLOOR_MS`], in bytes a second: 64 kbit/s, a
/// poor mobile link. A 1 MiB body (`MAX_BODY_BYTES`'s default) gets 158 s in all.
pub const BODY_MIN_BYTES_PER_SEC: u64 = 8 * 1024;

/// How long a host waits for a body of `declared` bytes (its `Content-Length`; `None` for a
/// chunked one), the edge keeping at most `limit` (`MAX_BODY_BYTES`), before it gives up on
/// it ([`Intake::timed_out`]). Why: a request whose head arrived and whose body never does
/// (a `Content-Length` never reached, a body trickled a byte a minute, an `Expect:
/// 100-continue` answered and nothing sent) held its connection — busy, a caller's with the
/// secret — for ever. The time grows with the body so an honest slow upload finishes; a
/// body of unknown length, or one past the limit (only heard out so its 413 is read), is
/// given the limit's time: past the limit, nothing it sends is kept anyway.
pub fn read_within_ms(declared: Option<u64>, limit: usize) -> u64 {
    let expected = declared.unwrap_or(limit as u64).min(limit as u64);
    BODY_FLOOR_MS.saturating_add(expected.saturating_mul(1000) / BODY_MIN_BYTES_PER_SEC)
}

/// A request body as the edge saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Bytes(Vec<u8>),
    /// Over `MAX_BODY_BYTES`: answered 413.
    TooLarge,
    /// The upload broke off or could not be read: answered 400, send it again.
    Broken(String),
    /// The body did not arrive within the `ms` the host gave it ([`read_within_ms`]):
    /// answered 408 and its connection closed, send it again.
    TimedOut { ms: u64 },
}

/// What the host does after feeding a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read the next chunk.
    Read,
    /// Stop reading and answer now (the body is over the drain limit).
    Stop,
}

/// One body being read.
#[derive(Debug)]
pub struct Intake {
    limit: usize,
    drain: usize,
    bytes: Vec<u8>,
    seen: usize,
    broken: Option<String>,
    timed_out: Option<u64>,
}

impl Intake {
    /// `limit` is `MAX_BODY_BYTES`.
    pub fn new(limit: usize) -> Intake {
        Intake { limit, drain: DRAIN_LIMIT, bytes: Vec::new(), seen: 0, broken: None, timed_out: None }
    }

    /// The body of a request about to be refused: nothing kept, at most
    /// [`REFUSAL_DRAIN_LIMIT`] read (hosts also stop after [`REFUSAL_DRAIN_MS`]).
    pub fn refused() -> Intake {
        Intake { limit: 0, drain: REFUSAL_DRAIN_LIMIT, bytes: Vec::new(), seen: 0, broken: None, timed_out: None }
    }

    pub fn chunk(&mut self, chunk: &[u8]) -> Next {
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.limit {
            // Over the limit: nothing more is kept, but the caller is heard out.
            self.bytes = Vec::new();
            return if self.seen > self.drain { Next::Stop } else { Next::Read };
        }
        self.bytes.extend_from_slice(chunk);
        Next::Read
    }

    /// What a host's body stream gave next: a chunk, or the error it broke off with.
    pub fn take(&mut self, next: Result<&[u8], String>) -> Next {
        match next {
            Ok(chunk) => self.chunk(chunk),
            Err(why) => {
                self.failed(why);
                Next::Stop
            }
        }
    }

    /// The upload failed (the connection broke, the runtime refused the stream).
    pub fn failed(&mut self, why: impl Into<String>) {
        self.broken.get_or_insert_with(|| why.into());
    }

    /// The body did not arrive within the `ms` the host gave it ([`read_within_ms`]).
    pub fn timed_out(&mut self, ms: u64) {
        self.timed_out.get_or_insert(ms);
    }

    pub fn finish(self) -> Body {
        // Too large wins: the caller must shorten it whatever else went wrong.
        if self.seen > self.limit {
            Body::TooLarge
        } else if let Some(ms) = self.timed_out {
            Body::TimedOut { ms }
        } else if let Some(why) = self.broken {
            Body::Broken(why)
        } else {
            Body::Bytes(self.bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_body_within_the_limit() {
        let mut i = Intake::new(5);
        assert_eq!(i.chunk(b"ab"), Next::Read);
        assert_eq!(i.chunk(b"cde"), Next::Read);
        assert_eq!(i.finish(), Body::Bytes(b"abcde".to_vec()));
    }

    #[test]
    fn drains_an_oversized_body_up_to_the_drain_limit() {
        let mut i = Intake::new(5);
        assert_eq!(i.chunk(b"abcdef"), Next::Read);
        assert_eq!(i.chunk(&vec![0; DRAIN_LIMIT]), Next::Stop);
        assert_eq!(i.finish(), Body::TooLarge);
    }

    #[test]
    fn a_refused_request_is_read_only_a_little() {
        let mut i = Intake::refused();
        assert_eq!(i.chunk(b"{\"prompt\":\"x\"}"), Next::Read, "a small body is heard out");
        assert_eq!(i.chunk(&vec![0; REFUSAL_DRAIN_LIMIT]), Next::Stop);
    }

    /// A body is given 30 s, and more the longer it says it is, as far as the limit: the
    /// time a 64 kbit/s link takes to send it.
    #[test]
    fn a_body_is_given_a_floor_and_more_the_longer_it_is_up_to_the_limit() {
        let mib = 1024 * 1024;
        assert_eq!(read_within_ms(Some(0), mib), BODY_FLOOR_MS);
        assert_eq!(read_within_ms(Some(100), mib), BODY_FLOOR_MS + 12);
        assert_eq!(read_within_ms(Some(mib as u64), mib), 158_000, "1 MiB at 8 KiB/s, and the floor");
        assert_eq!(read_within_ms(None, mib), 158_000, "a chunked body: the limit's time");
        assert_eq!(read_within_ms(Some(u64::MAX), mib), 158_000, "past the limit: the limit's time");
        assert_eq!(read_within_ms(Some(64 * mib as u64), 64 * mib), 30_000 + 8_192_000);
    }

    /// A body whose time ran out is `TimedOut`, unless it was too large already (then the
    /// caller must shorten it, whatever else).
    #[test]
    fn a_body_that_timed_out_is_timed_out_unless_it_was_too_large_already() {
        let mut i = Intake::new(5);
        i.chunk(b"ab");
        i.timed_out(30_012);
        i.failed("a later error");
        assert_eq!(i.finish(), Body::TimedOut { ms: 30_012 });
        let mut i = Intake::new(1);
        i.chunk(b"ab");
        i.timed_out(30_000);
        assert_eq!(i.finish(), Body::TooLarge);
    }

    #[test]
    fn a_broken_upload_is_broken_unless_it_was_too_large_already() {
        let mut i = Intake::new(5);
        i.chunk(b"ab");
        i.failed("connection reset");
        assert_eq!(i.finish(), Body::Broken("connection reset".into()));
        let mut i = Intake::new(1);
        i.chunk(b"ab");
        i.failed("connection reset");
        assert_eq!(i.finish(), Body::TooLarge);
    }
}
