//! `EDGE_URL` → the URL the agent dials. Plaintext `ws://` carries the agent's session
//! (every job's prompt and result) readable and forgeable on the way, so it is accepted
//! only to a loopback host, or when the operator says `ALLOW_INSECURE_EDGE=1`. `submit` and
//! `login` hold `CLAUDE_RUNNER_URL`'s `http://`, which carries the runner secret, to the same
//! rule, read from the URL as their HTTP client parses it
//! ([`dialled_in_plaintext_beyond_this_machine`]), with the same [`is_loopback`].

use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeUrlError {
    #[error("EDGE_URL must start with wss:// (or ws:// for a local edge), got `{0}`")]
    Scheme(String),
    #[error("EDGE_URL `{0}` has no host")]
    NoHost(String),
    #[error(
        "EDGE_URL `{url}` is plaintext ws:// to `{host}`, which is not this machine: jobs, results and the agent's session would cross the network unencrypted. \
         Use wss:// (e.g. wss://claude-runner-edge.<you>.workers.dev, or TLS in front of a native edge), or set ALLOW_INSECURE_EDGE=1 if the path is private (a VPN, an SSH tunnel)"
    )]
    Insecure { url: String, host: String },
    #[error(
        "EDGE_URL `{0}` carries a user name or password (not shown here): the edge reads none there (the agent proves itself with AGENT_SIGNING_KEY), \
         and the agent would write it into its log and status file; set EDGE_URL without it"
    )]
    UserInfo(String),
}

/// `ws(s)://host[:port][/prefix]` (or http/https) → the `/agent/connect` URL.
/// `allow_insecure` is `ALLOW_INSECURE_EDGE=1`.
/// A user name or password in it (`user:password@`) is refused: the edge reads none (the
/// agent proves itself with its key), and the URL is logged at every dial and written to
/// the status file. No error shows them.
pub fn connect_url(edge_url: &str, allow_insecure: bool) -> Result<String, EdgeUrlError> {
    let shown = without_userinfo(edge_url.trim());
    let url = edge_url.trim().trim_end_matches('/');
    let (secure, rest) = if let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("wss://")) {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("ws://")) {
        (false, rest)
    } else {
        return Err(EdgeUrlError::Scheme(shown));
    };
    if authority(rest).contains('@') {
        return Err(EdgeUrlError::UserInfo(shown));
    }
    host_of(rest).ok_or_else(|| EdgeUrlError::NoHost(shown.clone()))?;
    if let Some(host) = plaintext_beyond_this_machine(url).filter(|_| !allow_insecure) {
        return Err(EdgeUrlError::Insecure { url: shown, host: host.to_string() });
    }
    let scheme = if secure { "wss" } else { "ws" };
    Ok(if rest.ends_with("/agent/connect") { format!("{scheme}://{rest}") } else { format!("{scheme}://{rest}/agent/connect") })
}

/// The host a plaintext URL (`ws://`, `http://`) goes to when it is not this machine (a
/// loopback host): what it carries would cross the network readable and forgeable. `None`
/// for a TLS URL (`wss://`, `https://`), a loopback one, or one with no host. The agent's
/// check of `EDGE_URL` (which it dials as written here), allowed past it by
/// `ALLOW_INSECURE_EDGE=1`.
pub fn plaintext_beyond_this_machine(url: &str) -> Option<&str> {
    let url = url.trim();
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("ws://"))?;
    host_of(rest).filter(|host| !is_loopback(host))
}

/// The host a plaintext `http://` (or `ws://`) URL, as parsed (`url` is the address the
/// client dials: `submit`'s and `login`'s `CLAUDE_RUNNER_URL`), goes to when it is not this
/// machine ([`is_loopback`]); `"no host"` when it names none. `None` for any other scheme.
/// Decided from the parsed host, not from the text: read by hand, `http:///edge.example.com`
/// had no host (so passed for this machine) and `http://evil.com\@127.0.0.1` had 127.0.0.1,
/// where the parser dials edge.example.com and evil.com.
pub fn dialled_in_plaintext_beyond_this_machine(url: &reqwest::Url) -> Option<String> {
    if !matches!(url.scheme(), "http" | "ws") {
        return None;
    }
    // As parsed, a host is canonical: a name in lower case, an IPv4 address in dotted
    // decimal (`127.1` and `2130706433` read as 127.0.0.1, as dialled), an IPv6 one in brackets.
    let Some(host) = url.host_str() else { return Some("no host".to_string()) };
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!is_loopback(bare)).then(|| host.to_string())
}

/// What to do when a TLS dial to `url` failed with `error` because the server answered in
/// plain text: rustls says "received corrupt message of type InvalidContentType", which
/// names neither cause nor fix. A local edge (`claude-runner up`'s, a native edge without
/// TLS in front) speaks plain http:// and ws://. `None` for any other failure.
pub fn plain_edge_hint(url: &str, error: &str) -> Option<String> {
    if !error.contains("InvalidContentType") {
        return None;
    }
    let (plain, rest) = if let Some(rest) = url.strip_prefix("https://") {
        ("http", rest)
    } else {
        ("ws", url.strip_prefix("wss://")?)
    };
    Some(format!(
        "the server at {url} answered in plain text, not TLS: a local edge (`claude-runner up`, or `claude-runner-edge` with no TLS in front) is {plain}://{rest}",
        rest = rest.strip_suffix("/agent/connect").unwrap_or(rest)
    ))
}

/// The authority of `authority[/path]` (`[user[:password]@]host[:port]`).
fn authority(rest: &str) -> &str {
    rest.split(['/', '?', '#']).next().unwrap_or_default()
}

/// `url` as an error may show it: without the user name and password of its authority
/// (what comes before its last `@`), with or without a scheme.
fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = authority(rest).rsplit_once('@').map_or(rest, |(userinfo, _)| &rest[userinfo.len() + 1..]);
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest.to_string(),
    }
}

/// The host of `authority[/path]`: without user info, port or IPv6 brackets.
fn host_of(rest: &str) -> Option<&str> {
    let authority = authority(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// `localhost`, 127.0.0.0/8 and ::1 (also as an IPv4-mapped address). Other names are not
/// trusted to resolve to this machine.
pub fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An https:// or wss:// URL for a plain-text edge failed with rustls's "received
    /// corrupt message of type InvalidContentType": the hint gives the plain URL.
    #[test]
    fn a_tls_dial_to_a_plain_edge_is_told_the_plain_url() {
        let rustls = "error sending request: received corrupt message of type InvalidContentType";
        let https = plain_edge_hint("https://127.0.0.1:8787", rustls).unwrap();
        assert!(https.contains("is http://127.0.0.1:8787") && https.contains("claude-runner up"), "{https}");
        let wss = plain_edge_hint("wss://127.0.0.1:8787/agent/connect", rustls).unwrap();
        assert!(wss.ends_with("is ws://127.0.0.1:8787"), "{wss}");
        assert_eq!(plain_edge_hint("http://127.0.0.1:8787", rustls), None);
        assert_eq!(plain_edge_hint("https://e.example", "Connection refused (os error 111)"), None);
    }

    #[test]
    fn builds_the_connect_url() {
        assert_eq!(connect_url("wss://edge.example.com", false).unwrap(), "wss://edge.example.com/agent/connect");
        assert_eq!(connect_url("https://e.x/", false).unwrap(), "wss://e.x/agent/connect");
        assert_eq!(connect_url("ws://127.0.0.1:8787/agent/connect", false).unwrap(), "ws://127.0.0.1:8787/agent/connect");
        assert!(matches!(connect_url("ftp://x", false), Err(EdgeUrlError::Scheme(_))));
        assert!(matches!(connect_url("127.0.0.1:8787", false), Err(EdgeUrlError::Scheme(_))));
        assert!(matches!(connect_url("wss://:443/x", false), Err(EdgeUrlError::NoHost(_))));
    }

    #[test]
    fn plaintext_only_to_loopback_unless_allowed() {
        for ok in ["ws://localhost:8787", "ws://127.0.0.1", "ws://127.8.9.10:1/x", "http://[::1]:8787", "ws://[::ffff:127.0.0.1]:1"] {
            assert!(connect_url(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "ws://10.0.0.1",
            "ws://10.0.0.1:8787/agent/connect",
            "http://edge.example.com",
            "ws://localhost.evil.com",
            "ws://0.0.0.0:8787",
            "ws://[::2]:1",
        ] {
            let err = connect_url(bad, false).unwrap_err();
            assert!(matches!(err, EdgeUrlError::Insecure { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("ALLOW_INSECURE_EDGE=1"));
            assert!(connect_url(bad, true).is_ok(), "{bad} with ALLOW_INSECURE_EDGE=1");
        }
    }

    /// A password in EDGE_URL (`wss://user:pass@host`) was logged at every dial and written
    /// to status.json, and never used (the agent proves itself with its key). A user name
    /// or password there is refused at the start, naming the setting and never showing
    /// them; so too beside a loopback host, where ALLOW_INSECURE_EDGE is not asked.
    #[test]
    fn a_user_name_or_password_in_edge_url_is_refused_and_not_shown() {
        for url in ["wss://user:hunter2@edge.example.com", "wss://hunter2@edge.example.com/pool/p", "https://:hunter2@e.x", "ws://u:hunter2@127.0.0.1:8787", "ws://127.0.0.1@evil.com"] {
            for allow_insecure in [false, true] {
                let err = connect_url(url, allow_insecure).unwrap_err();
                assert!(matches!(err, EdgeUrlError::UserInfo(_)), "{url}: {err}");
                let said = err.to_string();
                assert!(said.contains("EDGE_URL") && said.contains("without"), "{said}");
                assert!(!said.contains("hunter2") && !said.contains("user:") && !said.contains("127.0.0.1@"), "{said}");
            }
        }
        let said = connect_url("wss://user:hunter2@edge.example.com/x", false).unwrap_err().to_string();
        assert!(said.contains("`wss://edge.example.com/x`"), "{said}");
        // Nor is a password shown by the other refusals.
        for url in ["user:hunter2@edge.example.com", "ftp://user:hunter2@edge.example.com"] {
            let said = connect_url(url, false).unwrap_err().to_string();
            assert!(!said.contains("hunter2"), "{said}");
        }
        // An `@` past the authority is the path's.
        assert!(connect_url("wss://edge.example.com/pool/a@b", false).is_ok());
    }
}
