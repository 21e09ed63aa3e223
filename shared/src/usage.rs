//! The subscription's usage window, as Claude Code reports it. The CLI reads the
//! `anthropic-ratelimit-unified-*` headers of every `/v1/messages` answer (`…-status`,
//! `…-reset` in epoch seconds, `…-representative-claim`, and per window `…-5h-utilization`,
//! `…-5h-reset`, `…-7d-*`, `…-overage-*`) and prints a stream-json line when the state
//! changes:
//!
//! `{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1796150081,
//! "rateLimitType":"five_hour",…}}` — `status` is `allowed`, `allowed_warning` or
//! `rejected`; `utilization` (0–1) comes with warnings.
//!
//! The agent keeps the newest such state ([`UsageWindow`]) and reports it with its login
//! (a rejected one only when its run ended on the usage limit: `agent::runner`); the edge
//! holds work while a window is rejected and lets it go at `resets_at`, at the latest
//! [`MAX_RESET_MS`] after it was seen. `claude-runner agent --clear-usage` opens a window
//! the operator knows to be open.

use crate::Millis;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageStatus {
    Allowed,
    AllowedWarning,
    Rejected,
}

/// The newest usage state the agent saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageWindow {
    pub status: UsageStatus,
    /// `five_hour`, `seven_day`, … (the CLI's `rateLimitType`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// When the window resets (wall time, ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Millis>,
    /// How much of the window is used, 0–1, when the CLI said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// When the agent saw it (wall time, ms).
    pub seen_at: Millis,
}

/// A rejected window with no reset time named is assumed to last this long (the shortest
/// window Claude subscriptions have is five hours; a later successful run clears it).
pub const UNKNOWN_RESET_MS: Millis = 5 * 3_600_000;

/// The longest a rejected window is believed to block after it was seen: a day more than
/// the longest window Claude subscriptions have (seven days). A reset named later than
/// that is not the CLI's word (a process that can trace Claude can write into its stdout,
/// at `ptrace_scope` 0 a job's) and counts as this.
pub const MAX_RESET_MS: Millis = 8 * 86_400_000;

/// Most of a window's `type` kept (Claude's are short words: `five_hour`, `seven_day`).
pub const MAX_KIND_BYTES: usize = 64;

/// `/health`'s `usage` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageView {
    pub status: UsageStatus,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub resets_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
}

impl UsageWindow {
    /// Reads one of Claude's stream-json lines: `Some` for a `rate_limit_event` that
    /// carries a status this code knows, `None` for anything else.
    pub fn from_event(event: &Value, now: Millis) -> Option<UsageWindow> {
        if event.get("type")?.as_str()? != "rate_limit_event" {
            return None;
        }
        let info = event.get("rate_limit_info")?;
        let status: UsageStatus = serde_json::from_value(info.get("status")?.clone()).ok()?;
        let kind = info.get("rateLimitType").and_then(Value::as_str).map(|k| crate::text::truncate(k, MAX_KIND_BYTES).to_string());
        // Epoch seconds in the CLI's output; a value already in ms is taken as such.
        let resets_at = info.get("resetsAt").and_then(Value::as_f64).filter(|s| s.is_finite() && *s > 0.0).map(|s| {
            if s < 100_000_000_000.0 { (s * 1000.0) as Millis } else { s as Millis }
        });
        let utilization = info.get("utilization").and_then(Value::as_f64).filter(|u| u.is_finite() && *u >= 0.0);
        Some(UsageWindow { status, kind, resets_at, utilization, seen_at: now })
    }

    /// A window read back from where it was kept (the agent's status file, which a job can
    /// write) as one read from Claude at `now` could be: seen no later than `now` (a window
    /// "seen" in the future would outlast the cut at [`MAX_RESET_MS`] after it was seen),
    /// its `type` cut to [`MAX_KIND_BYTES`].
    pub fn read_back(self, now: Millis) -> UsageWindow {
        let kind = self.kind.map(|k| crate::text::truncate(&k, MAX_KIND_BYTES).to_string());
        UsageWindow { seen_at: self.seen_at.min(now), kind, ..self }
    }

    /// Until when (wall time) the window refuses work, if it does.
    pub fn blocked_until(&self) -> Option<Millis> {
        let latest = self.seen_at.saturating_add(MAX_RESET_MS);
        (self.status == UsageStatus::Rejected).then(|| self.resets_at.unwrap_or(self.seen_at.saturating_add(UNKNOWN_RESET_MS)).min(latest))
    }

    /// Whether the window refuses work at wall time `now`.
    pub fn blocks(&self, now: Millis) -> bool {
        self.blocked_until().is_some_and(|t| t > now)
    }

    /// As shown to people at wall time `now`: a rejected window whose reset has passed
    /// shows as allowed.
    pub fn view(&self, now: Millis) -> UsageView {
        let status = if self.status == UsageStatus::Rejected && !self.blocks(now) { UsageStatus::Allowed } else { self.status };
        UsageView {
            status,
            kind: self.kind.clone(),
            resets_at: self.blocked_until().or(self.resets_at).map(crate::time::rfc3339),
            utilization: self.utilization,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_clis_rate_limit_events() {
        // As 2.1.197 prints it for a 429 with the window rejected.
        let line = json!({"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1796150081,
            "rateLimitType":"five_hour","overageStatus":"rejected","isUsingOverage":false},"session_id":"s"});
        // Seen an hour before its reset.
        let w = UsageWindow::from_event(&line, 1_796_146_481_000).unwrap();
        assert_eq!(w.status, UsageStatus::Rejected);
        assert_eq!(w.resets_at, Some(1_796_150_081_000));
        assert_eq!(w.kind.as_deref(), Some("five_hour"));
        assert!(w.blocks(1_796_150_080_999) && !w.blocks(1_796_150_081_000));
        assert_eq!(w.view(1_796_150_081_000).status, UsageStatus::Allowed, "after the reset it shows allowed");
        let warn = json!({"type":"rate_limit_event","rate_limit_info":{"status":"allowed_warning","resetsAt":1796150108,
            "rateLimitType":"five_hour","utilization":0.91}});
        let w = UsageWindow::from_event(&warn, 0).unwrap();
        assert_eq!(w.utilization, Some(0.91));
        assert!(!w.blocks(0));
        for other in [json!({"type":"assistant"}), json!({"type":"rate_limit_event"}),
                      json!({"type":"rate_limit_event","rate_limit_info":{"status":"exploded"}}), json!(5)] {
            assert!(UsageWindow::from_event(&other, 0).is_none(), "{other}");
        }
        let no_reset = UsageWindow { status: UsageStatus::Rejected, kind: None, resets_at: None, utilization: None, seen_at: 10 };
        assert_eq!(no_reset.blocked_until(), Some(10 + UNKNOWN_RESET_MS));
    }

    /// A line in Claude's output is not only Claude's: a process that can trace Claude (at
    /// `ptrace_scope` 0 any of the agent's user, a job's) can write into its stdout (through
    /// `/proc/<pid>/fd/1` too, while it was a pipe), and a CLI could one day
    /// give the time in another unit. A rejected window said to reset in the year 33000
    /// held every caller's work on the agent until then — kept across its restarts, as a
    /// used-up window is. No subscription window is longer than seven days: a window
    /// blocks no longer than [`MAX_RESET_MS`] after it was seen, whatever it says.
    #[test]
    fn a_window_blocks_no_longer_than_the_longest_window() {
        let now = 1_796_150_000_000;
        let line = json!({"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1e15,"rateLimitType":"seven_day"}});
        let w = UsageWindow::from_event(&line, now).unwrap();
        assert!(w.blocks(now + MAX_RESET_MS - 1));
        assert!(!w.blocks(now + MAX_RESET_MS), "blocked until {:?}", w.blocked_until());
        // A window that says less is taken at its word.
        let soon = json!({"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1_796_150_600}});
        assert_eq!(UsageWindow::from_event(&soon, now).unwrap().blocked_until(), Some(1_796_150_600_000));
    }
}
