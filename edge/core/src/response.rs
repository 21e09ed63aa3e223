//! What a caller is answered: status, content type and body. The machine makes these for
//! the callers it answers later (a finished `/execute`, a refused write); the HTTP routing
//! makes them for everything answered at once.

use shared::contract::ApiError;

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response { status, content_type: "application/json", body }
    }

    pub fn error(err: ApiError) -> Response {
        Response::json(err.status, err.to_json())
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response { status, content_type, body }
    }
}
