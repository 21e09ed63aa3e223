//! The phone page at `GET /`: one small HTML document with its style and script inline,
//! no framework and nothing fetched from elsewhere. It asks for the runner secret once and
//! keeps it in a JavaScript variable only (sent as the `X-Runner-Secret` header, never in
//! a URL, a cookie or storage), then shows the agent, its login and usage window, the jobs
//! (with a cancel button) and walks through a re-login.
//!
//! The Content-Security-Policy allows exactly the page's own inline script and style (by
//! their SHA-256), requests to this origin only, and nothing else: no other script, no
//! frames, no forms posted anywhere, no base URL.

use crate::response::Response;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const HTML: &str = include_str!("index.html");
const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

struct Page {
    html: String,
    csp: String,
}

fn csp_hash(text: &str) -> String {
    format!("'sha256-{}'", shared::keys::encode(&Sha256::digest(text.as_bytes())))
}

fn built() -> &'static Page {
    static PAGE: OnceLock<Page> = OnceLock::new();
    PAGE.get_or_init(|| Page {
        html: HTML.replacen("/*STYLE*/", STYLE, 1).replacen("/*SCRIPT*/", SCRIPT, 1),
        csp: format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            csp_hash(SCRIPT),
            csp_hash(STYLE)
        ),
    })
}

/// `GET /`.
pub fn page() -> Response {
    let page = built();
    Response::text(200, "text/html; charset=utf-8", page.html.clone())
        .with_header("content-security-policy", page.csp.clone())
        .with_header("x-content-type-options", "nosniff".into())
        .with_header("referrer-policy", "no-referrer".into())
        .with_header("cache-control", "no-store".into())
        .with_header("x-frame-options", "DENY".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_its_script_and_style_and_a_policy_allowing_only_them() {
        let r = page();
        assert_eq!(r.status, 200);
        assert!(r.body.contains(SCRIPT) && r.body.contains(STYLE));
        assert!(!r.body.contains("/*SCRIPT*/") && !r.body.contains("/*STYLE*/"));
        let csp = &r.headers.iter().find(|(n, _)| *n == "content-security-policy").unwrap().1;
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert!(csp.contains(&csp_hash(SCRIPT)) && csp.contains(&csp_hash(STYLE)), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        // Nothing from elsewhere: no external script, style, font or image.
        for needle in ["src=\"http", "href=\"http", "@import", "url(http", "localStorage", "sessionStorage", "document.cookie"] {
            assert!(!r.body.contains(needle), "{needle}");
        }
    }
}
