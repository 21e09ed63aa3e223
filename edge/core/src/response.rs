//! What a caller is answered: status, content type, extra headers and body. The machine
//! makes these for the callers it answers later (a finished `/execute`, a refused write);
//! the HTTP routing makes them for everything answered at once.

use shared::contract::ApiError;
use shared::Millis;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// Headers beyond the content type (`Retry-After`, the page's security headers).
    pub headers: Vec<(&'static str, String)>,
    /// Shared, not copied: the callers waiting on one job (its `/execute` caller and those
    /// repeating its idempotency key) are each given the same result text, so that many of
    /// them cost pointers, not one copy of a result of up to megabytes each — in the one
    /// event that answers them all, and in the host's queue of answers to write.
    pub body: Arc<str>,
}

impl Response {
    pub fn json(status: u16, body: impl Into<Arc<str>>) -> Response {
        Response { status, content_type: "application/json", headers: Vec::new(), body: body.into() }
    }

    pub fn error(err: ApiError) -> Response {
        Response::json(err.status, err.to_json())
    }

    /// An error that says when to try again: the body's `retry_at` and a `Retry-After`
    /// header in seconds from `now` (wall time).
    pub fn retry_later(err: ApiError, retry_at: Millis, now: Millis) -> Response {
        let secs = retry_at.saturating_sub(now).div_ceil(1000).max(1);
        Response::error(err).with_header("retry-after", secs.to_string())
    }

    pub fn text(status: u16, content_type: &'static str, body: impl Into<Arc<str>>) -> Response {
        Response { status, content_type, headers: Vec::new(), body: body.into() }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let r = Response::retry_later(ApiError::usage_limit(10_500), 10_500, 1_000);
        assert_eq!(r.status, 503);
        assert_eq!(r.headers, vec![("retry-after", "10".to_string())]);
        let r = Response::retry_later(ApiError::usage_limit(0), 0, 1_000);
        assert_eq!(r.headers[0].1, "1", "never 0: the caller would retry at once");
    }
}
