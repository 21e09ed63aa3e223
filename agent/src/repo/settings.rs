//! The agent's repository settings (`ALLOWED_REPO_HOSTS`, `GITHUB_TOKEN`, `REPO_TOKENS`,
//! `REPO_CACHE_MAX_BYTES`, `KEEP_FAILED_WORKSPACES`, `MAX_DIFF_BYTES`, `GIT_AUTHOR_NAME`,
//! `GIT_AUTHOR_EMAIL`), checked once at start, and the two questions asked of them per
//! job: may this host be used, and which token opens it.

use clap::Args;
use shared::repo::{RepoUrl, GITHUB};
use std::collections::HashMap;
use std::fmt;

pub const DEFAULT_CACHE_MAX_BYTES: u64 = 20 * 1024 * 1024 * 1024;
/// What one fetch may receive: a server can stream an endless pack, which filled the disk
/// holding DATA_DIR (and the result spool) within the job's timeout.
pub const DEFAULT_MAX_FETCH_BYTES: u64 = 20 * 1024 * 1024 * 1024;
pub const DEFAULT_MAX_DIFF_BYTES: usize = 5 * 1024 * 1024;
/// What a job's checkout may hold in all: a few packed megabytes can unpack to gigabytes
/// (files of zeros), which filled the disk beside the mirrors.
pub const DEFAULT_MAX_CHECKOUT_BYTES: u64 = 20 * 1024 * 1024 * 1024;
/// The largest file a checkout writes: libgit2 holds each file whole in memory as it
/// writes it, so one of 20 GiB (some 20 MB packed) took the agent, and every job it ran,
/// down with it.
pub const MAX_CHECKOUT_FILE_BYTES: u64 = 1024 * 1024 * 1024;
/// The most files and folders a checkout makes: a tree naming one subtree ten times, ten
/// levels deep, is a few kilobytes and 10^10 empty files.
pub const MAX_CHECKOUT_ENTRIES: u64 = 1_000_000;
pub const DEFAULT_AUTHOR_NAME: &str = "Claude Runner";
pub const DEFAULT_AUTHOR_EMAIL: &str = "claude-runner@localhost";
/// The largest `MAX_DIFF_BYTES`: a result must fit one WebSocket frame with room to spare.
pub const MAX_MAX_DIFF_BYTES: usize = 6 * 1024 * 1024;

#[derive(Debug, Clone, Args)]
pub struct RepoArgs {
    /// Hosts `repo_url` may name, comma-separated (`host` or `host:port`).
    #[arg(long, env = "ALLOWED_REPO_HOSTS", default_value = GITHUB)]
    pub allowed_repo_hosts: String,
    /// Token for private repositories on github.com, from the environment only: the flag
    /// is refused, since a command line is readable by every local user.
    #[arg(long, env = "GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<String>,
    /// Tokens for other hosts: `host=token,…` (`host` as in ALLOWED_REPO_HOSTS), from the
    /// environment only: the flag is refused, since a command line is readable by every
    /// local user.
    #[arg(long, env = "REPO_TOKENS", hide_env_values = true)]
    pub repo_tokens: Option<String>,
    /// Size the repository mirrors may take before the least recently used are removed.
    #[arg(long, env = "REPO_CACHE_MAX_BYTES", default_value_t = DEFAULT_CACHE_MAX_BYTES,
          value_parser = crate::setting_value::whole("REPO_CACHE_MAX_BYTES", "bytes", 0, None, DEFAULT_CACHE_MAX_BYTES))]
    pub repo_cache_max_bytes: u64,
    /// Bytes one fetch of a repository may receive; past it the fetch fails.
    #[arg(long, env = "REPO_MAX_FETCH_BYTES", default_value_t = DEFAULT_MAX_FETCH_BYTES,
          value_parser = crate::setting_value::whole("REPO_MAX_FETCH_BYTES", "bytes", 1, None, DEFAULT_MAX_FETCH_BYTES))]
    pub repo_max_fetch_bytes: u64,
    /// Size of the files a job's checkout may hold in all (each file at most 1 GiB).
    #[arg(long, env = "REPO_MAX_CHECKOUT_BYTES", default_value_t = DEFAULT_MAX_CHECKOUT_BYTES,
          value_parser = crate::setting_value::whole("REPO_MAX_CHECKOUT_BYTES", "bytes", 1, None, DEFAULT_MAX_CHECKOUT_BYTES))]
    pub repo_max_checkout_bytes: u64,
    /// Keep a failed job's checkout under DATA_DIR/workspaces for a post-mortem.
    /// (`1`, `true`, `yes` or `on`).
    #[arg(long, env = "KEEP_FAILED_WORKSPACES", action = clap::ArgAction::SetTrue, value_parser = crate::setting_value::switch("KEEP_FAILED_WORKSPACES"))]
    pub keep_failed_workspaces: bool,
    /// Largest `diff` a result carries; longer ones are cut (`diff_truncated`).
    #[arg(long, env = "MAX_DIFF_BYTES", default_value_t = DEFAULT_MAX_DIFF_BYTES,
          value_parser = crate::setting_value::whole("MAX_DIFF_BYTES", "bytes", 1, Some(MAX_MAX_DIFF_BYTES), DEFAULT_MAX_DIFF_BYTES))]
    pub max_diff_bytes: usize,
    /// Author of the commits `push_branch` makes.
    #[arg(long, env = "GIT_AUTHOR_NAME", default_value = DEFAULT_AUTHOR_NAME)]
    pub git_author_name: String,
    #[arg(long, env = "GIT_AUTHOR_EMAIL", default_value = DEFAULT_AUTHOR_EMAIL)]
    pub git_author_email: String,
}

/// A token, kept out of `Debug` output so no log line can print it by accident.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Token(String);

impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([REDACTED])")
    }
}

#[derive(Debug, Clone)]
pub struct RepoSettings {
    pub allowed_hosts: Vec<String>,
    /// Host (as in [`RepoUrl::host`]) → token.
    tokens: HashMap<String, Token>,
    pub cache_max_bytes: u64,
    pub max_fetch_bytes: u64,
    pub max_checkout_bytes: u64,
    pub keep_failed_workspaces: bool,
    pub max_diff_bytes: usize,
    pub author_name: String,
    pub author_email: String,
}

impl RepoArgs {
    pub fn resolve(self) -> anyhow::Result<RepoSettings> {
        let allowed_hosts = parse_hosts(&self.allowed_repo_hosts)?;
        let tokens = parse_tokens(self.repo_tokens.as_deref().unwrap_or(""), self.github_token.as_deref())?;
        if self.max_diff_bytes == 0 || self.max_diff_bytes > MAX_MAX_DIFF_BYTES {
            anyhow::bail!("MAX_DIFF_BYTES must be between 1 and {MAX_MAX_DIFF_BYTES}");
        }
        for (what, value) in [("GIT_AUTHOR_NAME", &self.git_author_name), ("GIT_AUTHOR_EMAIL", &self.git_author_email)] {
            if value.trim().is_empty() || value.len() > 256 || value.chars().any(|c| c.is_control() || "<>".contains(c)) {
                anyhow::bail!("{what} must be 1 to 256 characters without `<`, `>` or control characters");
            }
        }
        Ok(RepoSettings {
            allowed_hosts,
            tokens,
            cache_max_bytes: self.repo_cache_max_bytes,
            max_fetch_bytes: self.repo_max_fetch_bytes,
            max_checkout_bytes: self.repo_max_checkout_bytes,
            keep_failed_workspaces: self.keep_failed_workspaces,
            max_diff_bytes: self.max_diff_bytes,
            author_name: self.git_author_name,
            author_email: self.git_author_email,
        })
    }
}

impl Default for RepoSettings {
    /// The defaults of every setting: github.com only, no tokens.
    fn default() -> RepoSettings {
        RepoSettings {
            allowed_hosts: vec![GITHUB.to_string()],
            tokens: HashMap::new(),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            max_fetch_bytes: DEFAULT_MAX_FETCH_BYTES,
            max_checkout_bytes: DEFAULT_MAX_CHECKOUT_BYTES,
            keep_failed_workspaces: false,
            max_diff_bytes: DEFAULT_MAX_DIFF_BYTES,
            author_name: DEFAULT_AUTHOR_NAME.to_string(),
            author_email: DEFAULT_AUTHOR_EMAIL.to_string(),
        }
    }
}

impl RepoSettings {
    pub fn host_allowed(&self, url: &RepoUrl) -> bool {
        self.allowed_hosts.iter().any(|h| h == url.host())
    }

    pub fn token_for(&self, host: &str) -> Option<&Token> {
        self.tokens.get(host)
    }

    /// Every token, for the redactor.
    pub fn token_values(&self) -> impl Iterator<Item = &str> {
        self.tokens.values().map(Token::expose)
    }
}

/// A host entry as [`RepoUrl`] would write it: lower case, `:443` left out.
fn normal_host(entry: &str) -> anyhow::Result<String> {
    let entry = entry.trim();
    // Borrow the URL parser's rules for hosts.
    let url = RepoUrl::parse(&format!("https://{entry}/x"))
        .map_err(|_| anyhow::anyhow!("`{entry}` is not a host or host:port"))?;
    Ok(url.host().to_string())
}

fn parse_hosts(text: &str) -> anyhow::Result<Vec<String>> {
    text.split(',')
        .filter(|h| !h.trim().is_empty())
        .map(|h| normal_host(h).map_err(|e| anyhow::anyhow!("ALLOWED_REPO_HOSTS: {e}; list hosts like `github.com,git.example.com:8443`")))
        .collect()
}

fn parse_tokens(text: &str, github_token: Option<&str>) -> anyhow::Result<HashMap<String, Token>> {
    let mut tokens = HashMap::new();
    if let Some(t) = github_token.map(str::trim).filter(|t| !t.is_empty()) {
        tokens.insert(GITHUB.to_string(), Token(t.to_string()));
    }
    for entry in text.split(',').filter(|e| !e.trim().is_empty()) {
        // Never echo the entry: it holds a token.
        let Some((host, token)) = entry.split_once('=') else {
            anyhow::bail!("REPO_TOKENS: an entry has no `=`; write `host=token,…`");
        };
        let host = normal_host(host).map_err(|e| anyhow::anyhow!("REPO_TOKENS: {e}; write `host=token,…`"))?;
        let token = token.trim();
        if token.is_empty() || token.chars().any(|c| c.is_control() || c.is_whitespace()) {
            anyhow::bail!("REPO_TOKENS: the token for {host} is empty or has spaces");
        }
        tokens.insert(host, Token(token.to_string()));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(hosts: &str, github: Option<&str>, tokens: Option<&str>) -> RepoArgs {
        RepoArgs {
            allowed_repo_hosts: hosts.into(),
            github_token: github.map(String::from),
            repo_tokens: tokens.map(String::from),
            repo_cache_max_bytes: 1,
            repo_max_fetch_bytes: 1,
            repo_max_checkout_bytes: 1,
            keep_failed_workspaces: false,
            max_diff_bytes: 100,
            git_author_name: "A".into(),
            git_author_email: "a@b".into(),
        }
    }

    #[test]
    fn hosts_and_tokens() {
        let s = args("github.com, Git.Example.com:8443 ,git.other.org:443", Some("ghp_x"), Some("git.example.com:8443=tok1,git.other.org=tok2"))
            .resolve()
            .unwrap();
        assert_eq!(s.allowed_hosts, ["github.com", "git.example.com:8443", "git.other.org"]);
        assert!(s.host_allowed(&RepoUrl::parse("a/b").unwrap()));
        assert!(s.host_allowed(&RepoUrl::parse("https://git.example.com:8443/a/b").unwrap()));
        assert!(!s.host_allowed(&RepoUrl::parse("https://git.example.com/a/b").unwrap()), "the port is part of the host");
        assert!(!s.host_allowed(&RepoUrl::parse("https://evil.com/a/b").unwrap()));
        assert_eq!(s.token_for("github.com").unwrap().expose(), "ghp_x");
        assert_eq!(s.token_for("git.example.com:8443").unwrap().expose(), "tok1");
        assert_eq!(s.token_for("git.other.org").unwrap().expose(), "tok2");
        assert!(s.token_for("git.example.com").is_none());
        assert!(!format!("{s:?}").contains("tok1"), "tokens stay out of Debug output");
    }

    #[test]
    fn bad_settings_say_what_to_fix_without_echoing_tokens() {
        for (hosts, tokens) in [("bad host", None), ("", Some("nohost")), ("", Some("bad host=secret-tok")), ("", Some("h.com= "))] {
            let err = args(hosts, None, tokens).resolve().unwrap_err().to_string();
            assert!(!err.contains("secret-tok"), "{err}");
            assert!(err.contains("ALLOWED_REPO_HOSTS") || err.contains("REPO_TOKENS"), "{err}");
        }
        let mut a = args("github.com", None, None);
        a.max_diff_bytes = 0;
        assert!(a.resolve().is_err());
    }
}
