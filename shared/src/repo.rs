//! Repositories as both sides check them: the `repo_url` a caller may send, the git names
//! it may use (`branch`, `push_branch`), and the name of a repository's mirror. Pure; the
//! agent does the git work, and the edge refuses a bad address before anything is queued.
//!
//! A `repo_url` is `owner/repo` (GitHub) or `https://host[:port]/path[.git]` and nothing
//! else: no other scheme (`file:`, `ssh:`, `git:`, `http:`), no scp-like `git@host:path`,
//! no local path, no credentials in the URL, no query, no percent-escapes, no `.`/`..`
//! segments and no part starting with `-` (git would read it as an option).

use std::fmt;

/// Longest `repo_url` accepted.
pub const MAX_REPO_URL: usize = 512;
/// Longest git name (`branch`, `push_branch`) accepted.
pub const MAX_REF_NAME: usize = 255;
/// Longest `commit_message` accepted.
pub const MAX_COMMIT_MESSAGE: usize = 64 * 1024;
/// The host an `owner/repo` address means.
pub const GITHUB: &str = "github.com";

/// A checked repository address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoUrl {
    /// Lower-case host, with `:port` when one was given.
    host: String,
    /// The path without its leading `/` (and without a trailing `/`), as given.
    path: String,
}

/// Why a `repo_url` was refused (the sentence is completed by [`RepoUrlError::fmt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrlError(pub String);

impl fmt::Display for RepoUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`repo_url` {}; send `owner/repo` (GitHub) or `https://host/owner/repo.git`", self.0)
    }
}

impl std::error::Error for RepoUrlError {}

fn refuse<T>(why: impl Into<String>) -> Result<T, RepoUrlError> {
    Err(RepoUrlError(why.into()))
}

/// One part of a repository path: letters, digits, `.`, `_`, `-`, `~`; not `.`, `..`,
/// and not starting with `-`.
fn path_segment_ok(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && !segment.starts_with('-')
        && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~'))
}

impl RepoUrl {
    pub fn parse(text: &str) -> Result<RepoUrl, RepoUrlError> {
        let text = text.trim();
        if text.is_empty() {
            return refuse("is empty");
        }
        if text.len() > MAX_REPO_URL {
            return refuse(format!("is longer than {MAX_REPO_URL} bytes"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return refuse("contains a space or a control character");
        }
        if text.starts_with('-') {
            return refuse("must not start with `-`");
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            return RepoUrl::shorthand(text);
        };
        if !scheme.eq_ignore_ascii_case("https") {
            return refuse(format!("uses `{scheme}://`; only https is allowed"));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return refuse("must not carry credentials (`user@` or `user:token@`); the runner machine's GITHUB_TOKEN or REPO_TOKENS give access");
        }
        let host = checked_host(authority)?;
        if path.contains(['?', '#']) {
            return refuse("must not have a query or fragment");
        }
        if path.contains('%') {
            return refuse("must not use percent-escapes");
        }
        let path = path.strip_suffix('/').unwrap_or(path);
        if path.is_empty() {
            return refuse("names no repository path");
        }
        if path.split('/').count() > 16 {
            return refuse("has too many path parts");
        }
        if !path.split('/').all(path_segment_ok) {
            return refuse(
                "has a path part that is empty, `.`, `..`, starts with `-`, or uses characters other than letters, digits, `.`, `_`, `-`, `~`",
            );
        }
        Ok(RepoUrl { host, path: path.to_string() })
    }

    /// `owner/repo` on GitHub.
    fn shorthand(text: &str) -> Result<RepoUrl, RepoUrlError> {
        if text.contains(':') || text.starts_with('/') || text.starts_with('.') || text.starts_with('~') {
            return refuse("is neither `owner/repo` nor an https URL (local paths, `file:` and ssh addresses are not allowed)");
        }
        let parts: Vec<&str> = text.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| path_segment_ok(p)) {
            return refuse("is neither `owner/repo` nor an https URL");
        }
        Ok(RepoUrl { host: GITHUB.to_string(), path: text.to_string() })
    }

    /// The host, with `:port` when the URL named one: what `ALLOWED_REPO_HOSTS` and
    /// `REPO_TOKENS` entries are compared with.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host without its port.
    pub fn host_name(&self) -> &str {
        self.host.split(':').next().unwrap_or(&self.host)
    }

    /// The URL git talks to.
    pub fn url(&self) -> String {
        format!("https://{}/{}", self.host, self.path)
    }

    /// The repository's name: host and path, so that two names are one repository exactly
    /// when the server says so. It is what the agent keys its mirror on, and what it reports
    /// when asked which mirrors it holds. On github.com a trailing `.git` goes (GitHub serves
    /// `repo` and `repo.git` as one repository and refuses names ending in `.git`), so
    /// `owner/repo`, `https://github.com/owner/repo` and `…/repo.git` share one mirror; on
    /// any other host the path stays as given, since a plain git server may hold `x` and
    /// `x.git` as two repositories, and a job for one must never run on the other's code.
    pub fn name(&self) -> String {
        let path = match self.host == GITHUB {
            true => self.path.strip_suffix(".git").filter(|p| !p.is_empty() && !p.ends_with('/')).unwrap_or(&self.path),
            false => &self.path,
        };
        format!("{}/{}", self.host, path)
    }
}

/// Whether `name` could be a repository's name as [`RepoUrl::name`] makes them (a host, a
/// port, a path): at most [`MAX_REPO_URL`] bytes of letters, digits and `. _ - ~ : /`,
/// none of which JSON escapes. What an agent tells the edge of its mirrors, and what the
/// edge keeps of what it is told: any other name matches no job's repository.
pub fn could_be_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_REPO_URL && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-~:/".contains(&b))
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// `host` or `host:port`: a DNS name or IPv4 address (letters, digits, `.`, `-`), lower-cased.
fn checked_host(authority: &str) -> Result<String, RepoUrlError> {
    let (name, port) = match authority.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (authority, None),
    };
    if name.is_empty() {
        return refuse("names no host");
    }
    if name.starts_with(['-', '.']) || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')) {
        return refuse(format!("has a host `{name}` that is not a DNS name or IPv4 address"));
    }
    let name = name.to_ascii_lowercase();
    match port {
        None => Ok(name),
        Some(p) => match p.parse::<u16>() {
            // https's own port is the same host as no port.
            Ok(443) => Ok(name),
            Ok(n) if n > 0 && !p.starts_with('0') => Ok(format!("{name}:{n}")),
            _ => refuse(format!("has a port `{p}` that is not a number from 1 to 65535")),
        },
    }
}

/// A name git accepts for a branch or tag (the rules of `git check-ref-format`, a little
/// stricter): printable ASCII without space, `~ ^ : ? * [ \`; no `..`, `//`, `@{`; not
/// starting with `-`, `/` or `.`; no part starting with `.`; not ending with `/`, `.` or
/// `.lock`. A commit sha passes too. Returns why when it does not.
pub fn ref_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_REF_NAME {
        return Some("must be 1 to 255 characters");
    }
    if name.starts_with('-') {
        return Some("must not start with `-`");
    }
    if name.bytes().any(|b| !b.is_ascii_graphic() || matches!(b, b'~' | b'^' | b':' | b'?' | b'*' | b'[' | b'\\')) {
        return Some("may not contain spaces, control characters, non-ASCII or any of `~ ^ : ? * [ \\`");
    }
    if name.contains("..") || name.contains("//") || name.contains("@{") || name == "@" {
        return Some("may not contain `..`, `//` or `@{`, nor be `@`");
    }
    if name.starts_with('/') || name.ends_with('/') || name.ends_with('.') || name.ends_with(".lock") {
        return Some("may not start or end with `/`, nor end with `.` or `.lock`");
    }
    if name.split('/').any(|part| part.starts_with('.')) {
        return Some("may not have a part starting with `.`");
    }
    None
}

/// Whether `text` looks like a commit id (abbreviated to at least 7 hex digits, or whole).
pub fn looks_like_sha(text: &str) -> bool {
    ((7..=40).contains(&text.len()) || is_full_sha(text)) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `text` is a whole commit id: 40 hex digits (SHA-1) or 64 (SHA-256). Such a
/// `branch` means that commit and nothing else, even when a branch or tag has that name
/// (anyone who can push can make one, and serve other code to a caller pinning a commit).
pub fn is_full_sha(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_github_shorthand_and_https_urls() {
        let r = RepoUrl::parse("octo-org/hello.world").unwrap();
        assert_eq!(r.host(), "github.com");
        assert_eq!(r.url(), "https://github.com/octo-org/hello.world");
        assert_eq!(r.name(), "github.com/octo-org/hello.world");

        let r = RepoUrl::parse(" https://GitLab.Example.com:8443/group/sub/project.git/ ").unwrap();
        assert_eq!(r.host(), "gitlab.example.com:8443");
        assert_eq!(r.host_name(), "gitlab.example.com");
        assert_eq!(r.url(), "https://gitlab.example.com:8443/group/sub/project.git");
        assert_eq!(r.name(), "gitlab.example.com:8443/group/sub/project.git");

        assert_eq!(RepoUrl::parse("https://github.com:443/a/b").unwrap().host(), "github.com");

        // One mirror for the three spellings of a GitHub repository.
        let names: Vec<String> = ["a/b", "https://github.com/a/b", "HTTPS://github.com/a/b.git"]
            .iter()
            .map(|u| RepoUrl::parse(u).unwrap().name())
            .collect();
        assert!(names.iter().all(|n| n == "github.com/a/b"), "{names:?}");
        // Elsewhere `x` and `x.git` may be two repositories: two names, two mirrors.
        let (x, x_git) = (RepoUrl::parse("https://git.example.com/team/x").unwrap(), RepoUrl::parse("https://git.example.com/team/x.git").unwrap());
        assert_ne!(x.name(), x_git.name());
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "file:///etc",
            "file:/etc/passwd",
            "/srv/git/repo",
            "./repo",
            "../repo",
            "~/repo",
            "-uhelp",
            "--upload-pack=touch /tmp/x",
            "git@github.com:a/b.git",
            "ssh://git@github.com/a/b",
            "git://github.com/a/b",
            "http://github.com/a/b",
            "ext::sh -c touch% /tmp/pwned",
            "https://user:token@github.com/a/b",
            "https://token@github.com/a/b",
            "https://github.com",
            "https://github.com/",
            "https:///a/b",
            "https://github.com/a/../b",
            "https://github.com/a/./b",
            "https://github.com/a//b",
            "https://github.com/-a/b",
            "https://github.com/a/b?x=1",
            "https://github.com/a/b#frag",
            "https://github.com/a/%2e%2e/b",
            "https://github.com:0/a/b",
            "https://github.com:99999/a/b",
            "https://github.com:x/a/b",
            "https://-github.com/a/b",
            "https://[::1]/a/b",
            "https://git hub.com/a/b",
            "https://github.com/a/b\nx",
            "https://github.com/a/b c",
            "a",
            "a/b/c",
            "a/..",
            "a/-b",
            "a:b/c",
        ] {
            let err = RepoUrl::parse(bad).expect_err(bad);
            assert!(err.to_string().starts_with("`repo_url` "), "{bad}: {err}");
        }
        assert!(RepoUrl::parse(&format!("a/{}", "b".repeat(MAX_REPO_URL))).is_err());
    }

    #[test]
    fn checks_git_names() {
        for ok in ["main", "feature/x-1", "v1.2.3", "release_2026", "0123abc", "a@b"] {
            assert_eq!(ref_name_problem(ok), None, "{ok}");
        }
        for bad in [
            "", "-x", "--force", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b", "/a", "a/", "a//b",
            "a.", "a.lock", ".a", "a/.b", "@", "a@{1}", "é", "a\tb",
        ] {
            assert!(ref_name_problem(bad).is_some(), "{bad:?}");
        }
        assert!(ref_name_problem(&"a".repeat(256)).is_some());
        assert!(looks_like_sha("0123abc") && looks_like_sha(&"f".repeat(40)));
        assert!(!looks_like_sha("main") && !looks_like_sha("012345") && !looks_like_sha(&"f".repeat(41)));
        assert!(is_full_sha(&"f".repeat(40)) && is_full_sha(&"0".repeat(64)) && looks_like_sha(&"0".repeat(64)));
        assert!(!is_full_sha(&"f".repeat(39)) && !is_full_sha(&"f".repeat(41)) && !is_full_sha(&"g".repeat(40)));
    }
}
