//! The agent's Claude login as the edge sees it. The agent reads its credentials and sends
//! an [`OAuthReport`] with each heartbeat; the edge turns it into the [`OAuthStatus`] of
//! `/oauth/status` and `/health` against its own clock.
//!
//! An expired access token is not a problem while a refresh token exists: Claude Code
//! refreshes it itself. Only a login nothing can refresh any more, or one Claude just
//! failed to use, needs a person.

use crate::Millis;
use serde::{Deserialize, Serialize};

/// Where the agent's login comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OAuthSource {
    CredentialsFile,
    OauthTokenEnv,
    ApiKey,
    None,
}

/// The hosts of the sign-in pages `claude auth login` sends a person to, and the only ones
/// whose URL the re-login relay shows (the agent takes, the edge passes on, the page and
/// `claude-runner login` show): a process a job left running can write into the CLI's
/// output before the CLI prints its URL, and anything else it wrote is a phishing link.
/// Claude Code 2.1.197 prints `https://claude.com/cai/oauth/authorize?…` for a
/// subscription and `https://platform.claude.com/oauth/authorize?…` for a Console login,
/// 2.1.33x `https://claude.ai/oauth/authorize?…`, releases before them
/// `console.anthropic.com`; `claude.fedstart.com` is the one other its
/// `CLAUDE_CODE_CUSTOM_OAUTH_URL` accepts for customers.
pub const SIGN_IN_HOSTS: &[&str] = &["claude.ai", "claude.com", "platform.claude.com", "console.anthropic.com", "claude.fedstart.com"];

/// The longest sign-in URL passed on (the CLI's are about 450 bytes).
pub const MAX_SIGN_IN_URL_BYTES: usize = 2048;

/// The paths of the sign-in pages: `/cai/oauth/authorize` for a subscription on
/// claude.com, `/oauth/authorize` for the others (a path merely ending so could be any page).
pub const SIGN_IN_PATHS: &[&str] = &["/oauth/authorize", "/cai/oauth/authorize"];

/// The host of `url` if it is a sign-in page of Anthropic's: `https://`, one word of
/// printable characters, at most [`MAX_SIGN_IN_URL_BYTES`], its authority exactly one of
/// [`SIGN_IN_HOSTS`] (no user, no port), its path exactly one of [`SIGN_IN_PATHS`]. Else
/// why not, in words fit for a log and a person (the host as written, cut and escaped; never the
/// whole URL, which carries the login's state).
pub fn sign_in_host(url: &str) -> Result<&'static str, String> {
    let Some(rest) = url.strip_prefix("https://") else { return Err("it is not an https:// URL".into()) };
    if url.len() > MAX_SIGN_IN_URL_BYTES {
        return Err(format!("it is over {MAX_SIGN_IN_URL_BYTES} bytes"));
    }
    if url.chars().any(|c| c.is_whitespace() || crate::text::acts_on_display(c)) {
        return Err("it is not one word of printable characters".into());
    }
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let Some(host) = SIGN_IN_HOSTS.iter().find(|h| **h == authority) else {
        return Err(format!(
            "its host `{}` is not one of Anthropic's sign-in hosts ({})",
            crate::text::one_line(crate::text::truncate(authority, 100)),
            SIGN_IN_HOSTS.join(", ")
        ));
    };
    if !SIGN_IN_PATHS.contains(&tail.split(['?', '#']).next().unwrap_or_default()) {
        return Err(format!("it is on {host} but not its sign-in page ({})", SIGN_IN_PATHS.join(" or ")));
    }
    Ok(host)
}

/// The longest [`OAuthReport::problem`] an agent sends (and an edge keeps): a few words of
/// what is wrong and what to do, never a file's content.
pub const MAX_PROBLEM_BYTES: usize = 300;

/// What the agent knows of its login. Never carries a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthReport {
    pub source: OAuthSource,
    /// When the access token expires, if known.
    pub expires_at: Option<Millis>,
    /// Whether a refresh token is present.
    pub refreshable: bool,
    /// When the refresh token stops working, if known.
    pub refresh_expires_at: Option<Millis>,
    pub subscription_type: Option<String>,
    /// Claude's last run failed to authenticate (cleared by a later success).
    pub auth_failed: bool,
    /// Why the credentials could not be read, if they could not.
    pub problem: Option<String>,
    pub reported_at: Millis,
    /// The subscription's usage window, as Claude last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::UsageWindow>,
}

impl OAuthReport {
    pub fn unconfigured(now: Millis) -> Self {
        OAuthReport {
            source: OAuthSource::None,
            expires_at: None,
            refreshable: false,
            refresh_expires_at: None,
            subscription_type: None,
            auth_failed: false,
            problem: None,
            reported_at: now,
            usage: None,
        }
    }
}

/// `/oauth/status`, and the `oauth` part of `/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthStatus {
    pub configured: bool,
    pub expired: bool,
    pub expires_at: Option<String>,
    pub hours_remaining: Option<f64>,
    pub source: OAuthSource,
    pub refreshable: bool,
    pub needs_login: bool,
    pub subscription_type: Option<String>,
    pub reported_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The subscription's usage window, when Claude has reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::UsageView>,
    /// What to do next, when something needs a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_step: Option<String>,
}

/// How healthy a login is, for `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginHealth {
    Good,
    /// Works now, needs a person soon.
    AttentionSoon,
    /// Claude cannot authenticate: log in again.
    Broken,
}

/// Below this, a login that cannot refresh itself needs attention (the original service's
/// monitoring advice: alert when `hours_remaining` < 2).
pub const ATTENTION_HOURS: f64 = 2.0;
/// A refresh token this close to its end needs a new login soon.
pub const REFRESH_ATTENTION_MS: Millis = 24 * 3_600_000;

impl OAuthReport {
    pub fn status(&self, now: Millis) -> OAuthStatus {
        let configured = self.source != OAuthSource::None;
        let expired = self.expires_at.is_some_and(|t| t <= now);
        let hours_remaining = self
            .expires_at
            .map(|t| ((t as f64 - now as f64) / 3_600_000.0 * 10.0).floor() / 10.0)
            .map(|h| h.max(0.0));
        OAuthStatus {
            configured,
            expired,
            expires_at: self.expires_at.map(crate::time::rfc3339),
            hours_remaining,
            source: self.source,
            refreshable: self.refreshable,
            needs_login: self.health(now) == LoginHealth::Broken,
            subscription_type: self.subscription_type.clone(),
            reported_at: crate::time::rfc3339(self.reported_at),
            problem: self.problem.clone(),
            usage: self.usage.as_ref().map(|u| u.view(now)),
            next_step: self.next_step(now),
        }
    }

    /// What a person should do about this login now, if anything.
    pub fn next_step(&self, now: Millis) -> Option<String> {
        // Not a bare `claude auth login` "on the runner machine": that logs in to the
        // `~/.claude` of whoever runs it, not to the agent's own CLAUDE_CONFIG_DIR as its
        // own user (compose, systemd, `up`), which README's "First login" spells out.
        const RELOGIN: &str = "log in again: open the edge's page (GET /) and follow \"Log in again\", or run `claude-runner login` from anywhere; \
                               on the runner machine, log in as the agent's user into its CLAUDE_CONFIG_DIR, as README's \"First login\" says";
        match self.health(now) {
            LoginHealth::Broken if self.auth_failed => Some(format!("Claude's last run failed to authenticate (OAuth); {RELOGIN}")),
            LoginHealth::Broken if self.source == OAuthSource::None => Some(format!("Claude is not logged in (OAuth); {RELOGIN}")),
            LoginHealth::Broken => Some(format!("the OAuth login can no longer be refreshed; {RELOGIN}")),
            LoginHealth::AttentionSoon => Some(format!("the OAuth login ends soon; {RELOGIN}")),
            LoginHealth::Good => match self.usage.as_ref().and_then(|u| u.blocked_until().filter(|t| *t > now)) {
                Some(t) => Some(format!(
                    "the subscription's usage window is used up until {}; new work waits for it (or runs elsewhere)",
                    crate::time::rfc3339(t)
                )),
                None => None,
            },
        }
    }

    /// Whether Claude cannot run now because its usage window is used up.
    pub fn usage_blocked(&self, now: Millis) -> bool {
        self.usage.as_ref().is_some_and(|u| u.blocks(now))
    }

    pub fn health(&self, now: Millis) -> LoginHealth {
        if self.source == OAuthSource::None || self.auth_failed {
            return LoginHealth::Broken;
        }
        if self.source != OAuthSource::CredentialsFile {
            // A setup-token or an API key: no expiry we can see.
            return LoginHealth::Good;
        }
        let access_left = self.expires_at.map(|t| t as i64 - now as i64);
        if self.refreshable {
            match self.refresh_expires_at {
                Some(t) if t <= now => LoginHealth::Broken,
                Some(t) if t - now < REFRESH_ATTENTION_MS => LoginHealth::AttentionSoon,
                _ => LoginHealth::Good,
            }
        } else {
            match access_left {
                Some(left) if left <= 0 => LoginHealth::Broken,
                Some(left) if (left as f64) < ATTENTION_HOURS * 3_600_000.0 => LoginHealth::AttentionSoon,
                _ => LoginHealth::Good,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Millis = 3_600_000;

    fn file(expires_at: Millis, refreshable: bool) -> OAuthReport {
        OAuthReport {
            source: OAuthSource::CredentialsFile,
            expires_at: Some(expires_at),
            refreshable,
            refresh_expires_at: None,
            subscription_type: Some("max".into()),
            auth_failed: false,
            problem: None,
            reported_at: 0,
            usage: None,
        }
    }

    #[test]
    fn only_anthropics_sign_in_pages_are_sign_in_urls() {
        for (url, host) in [
            ("https://claude.com/cai/oauth/authorize?code=true&client_id=x", "claude.com"),
            ("https://claude.ai/oauth/authorize?code=true", "claude.ai"),
            ("https://platform.claude.com/oauth/authorize", "platform.claude.com"),
            ("https://console.anthropic.com/oauth/authorize#x", "console.anthropic.com"),
        ] {
            assert_eq!(sign_in_host(url), Ok(host), "{url}");
        }
        for (url, why) in [
            ("https://evil.example/oauth/authorize", "host `evil.example`"),
            ("https://claude.ai@evil.example/oauth/authorize", "host `claude.ai@evil.example`"),
            ("https://claude.ai.evil.example/oauth/authorize", "host `claude.ai.evil.example`"),
            ("https://CLAUDE.AI/oauth/authorize", "host `CLAUDE.AI`"),
            ("https://claude.ai:8443/oauth/authorize", "host `claude.ai:8443`"),
            ("https://claude.ai/x?next=/oauth/authorize", "not its sign-in page"),
            ("https://claude.ai/oauth/authorize/x", "not its sign-in page"),
            ("https://claude.ai/evil/oauth/authorize", "not its sign-in page"),
            ("https://claude.ai/x/cai/oauth/authorize", "not its sign-in page"),
            ("https://claude.ai//oauth/authorize", "not its sign-in page"),
            ("http://claude.ai/oauth/authorize", "not an https"),
            ("javascript:alert(1)", "not an https"),
            ("https://claude.ai/oauth/authorize?\u{202e}x", "printable"),
            ("https://claude.ai/oauth/authorize?a b", "printable"),
        ] {
            let said = sign_in_host(url).unwrap_err();
            assert!(said.contains(why), "{url}: {said}");
        }
        let long = format!("https://claude.ai/oauth/authorize?{}", "x".repeat(MAX_SIGN_IN_URL_BYTES));
        assert!(sign_in_host(&long).unwrap_err().contains("over"));
        let said = sign_in_host(&format!("https://{}/oauth/authorize", "e".repeat(500))).unwrap_err();
        assert!(said.len() < 300, "{said}");
    }

    #[test]
    fn an_expired_access_token_with_a_refresh_token_is_fine() {
        let r = file(10 * H, true);
        let s = r.status(11 * H);
        assert!(s.expired);
        assert!(!s.needs_login);
        assert_eq!(r.health(11 * H), LoginHealth::Good);
    }

    #[test]
    fn without_a_refresh_token_expiry_is_what_counts() {
        let r = file(10 * H, false);
        assert_eq!(r.health(0), LoginHealth::Good);
        assert_eq!(r.health(9 * H), LoginHealth::AttentionSoon);
        assert_eq!(r.health(10 * H), LoginHealth::Broken);
        assert_eq!(r.status(2 * H).hours_remaining, Some(8.0));
        assert!(r.status(10 * H).needs_login);
    }

    #[test]
    fn refresh_token_expiry_and_auth_failures_need_login() {
        let mut r = file(10 * H, true);
        r.refresh_expires_at = Some(100 * H);
        assert_eq!(r.health(50 * H), LoginHealth::Good);
        assert_eq!(r.health(90 * H), LoginHealth::AttentionSoon);
        assert_eq!(r.health(100 * H), LoginHealth::Broken);
        let mut r = file(10 * H, true);
        r.auth_failed = true;
        assert!(r.status(0).needs_login);
        assert!(OAuthReport::unconfigured(0).status(0).needs_login);
        assert!(!OAuthReport::unconfigured(0).status(0).configured);
    }
}
