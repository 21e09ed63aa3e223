//! Where a job may run and whose it is: agent labels (`AGENT_LABELS`, `key=value,…`), the
//! `labels` and `agent_id` a job asks for, the caller it belongs to (its fair share of the
//! queue) and its `priority` within that caller's jobs. Pure and checked the same way on
//! both sides: the agent checks its own labels at start, the edge a caller's request.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An agent's labels, or the labels a job needs (all must match).
pub type Labels = BTreeMap<String, String>;

/// Most labels an agent offers or a job asks for.
pub const MAX_LABELS: usize = 16;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 32;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 64;
/// Most bytes of label keys and values together (an agent's labels travel in every
/// record of its connection, which the Worker keeps in 2 KiB).
pub const MAX_LABELS_BYTES: usize = 512;
/// Highest `priority` (0 is the default and the lowest; higher runs first).
pub const MAX_PRIORITY: u8 = 9;
/// The caller of a request made with the pool's own `RUNNER_SECRET` and no `caller` field.
pub const DEFAULT_CALLER: &str = "default";
/// Longest caller name.
pub const MAX_CALLER: usize = 64;
/// Most mirror names an agent's report is taken with (the rest are ignored: affinity is a
/// preference, not a promise).
pub const MAX_MIRRORS: usize = 512;

/// Why labels were refused (completed by the field's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LabelError(pub String);

fn word_ok(word: &str, max: usize) -> bool {
    !word.is_empty() && word.len() <= max && word.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks labels given as a map: at most [`MAX_LABELS`], keys and values of letters,
/// digits, `.`, `_` and `-` (so they read the same in a header, a log line and the
/// `key=value` form).
pub fn check_labels(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError(format!("at most {MAX_LABELS} labels")));
    }
    if labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() > MAX_LABELS_BYTES {
        return Err(LabelError(format!("at most {MAX_LABELS_BYTES} bytes of keys and values in all")));
    }
    for (k, v) in labels {
        if !word_ok(k, MAX_LABEL_KEY) {
            return Err(LabelError(format!(
                "label key `{}` must be 1-{MAX_LABEL_KEY} letters, digits, `.`, `_` or `-`",
                crate::text::truncate(k, 40)
            )));
        }
        if !word_ok(v, MAX_LABEL_VALUE) {
            return Err(LabelError(format!(
                "label `{k}` has value `{}`: values are 1-{MAX_LABEL_VALUE} letters, digits, `.`, `_` or `-`",
                crate::text::truncate(v, 70)
            )));
        }
    }
    Ok(())
}

/// Parses `key=value,key=value` (spaces around parts ignored; empty text is no labels).
pub fn parse_labels(text: &str) -> Result<Labels, LabelError> {
    let mut labels = Labels::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(LabelError(format!("`{}` is not `key=value`", crate::text::truncate(part, 40))));
        };
        let (k, v) = (k.trim(), v.trim());
        if labels.insert(k.to_string(), v.to_string()).is_some() {
            return Err(LabelError(format!("label `{}` is given twice", crate::text::truncate(k, 40))));
        }
    }
    check_labels(&labels)?;
    Ok(labels)
}

/// Labels as `key=value,…` (for messages and logs).
pub fn show_labels(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Whether an agent offering `offered` can take a job needing `needed`.
pub fn satisfies(offered: &Labels, needed: &Labels) -> bool {
    needed.iter().all(|(k, v)| offered.get(k) == Some(v))
}

/// Whether `name` may name a caller (in `caller` or `RUNNER_SECRETS`).
pub fn valid_caller(name: &str) -> bool {
    crate::ids::plain_id(name, MAX_CALLER)
}

/// A job's placement: which agents may take it, whose it is and how urgent among that
/// caller's jobs. Stored with the job; the agent never sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Labels the agent must offer, every one.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Only this agent may take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Whose job it is (the edge fills it in from the secret or the `caller` field),
    /// lowered: read back lowered too, so a job an older edge stored as `CI` is `ci`'s (its
    /// idempotency key, its queue lane and cap, its lists) like the jobs sent since.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lowered")]
    pub caller: Option<String>,
    /// 0-9; higher runs first among the caller's queued jobs.
    #[serde(default)]
    pub priority: u8,
}

fn lowered<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(|name| name.to_ascii_lowercase()))
}

impl Placement {
    /// The caller whose turn this job waits for.
    pub fn caller(&self) -> &str {
        self.caller.as_deref().unwrap_or(DEFAULT_CALLER)
    }

    /// Whether an agent `agent_id` offering `labels` may take the job.
    pub fn fits(&self, agent_id: &str, labels: &Labels) -> bool {
        self.agent_id.as_deref().is_none_or(|id| id == agent_id) && satisfies(labels, &self.labels)
    }

    /// What the job needs, as a person reads it: `agent spark, labels gpu=a100`.
    pub fn needs(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = &self.agent_id {
            parts.push(format!("agent `{id}`"));
        }
        if !self.labels.is_empty() {
            parts.push(format!("labels {}", show_labels(&self.labels)));
        }
        parts.join(" and ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_check_and_match() {
        let l = parse_labels(" model=opus, gpu=none ,os=linux").unwrap();
        assert_eq!(show_labels(&l), "gpu=none,model=opus,os=linux");
        assert!(parse_labels("").unwrap().is_empty());
        for bad in ["model", "a=b,a=c", "=x", "k=", "k=v w", "k=v\nw", &format!("{}=v", "k".repeat(33))] {
            assert!(parse_labels(bad).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
        assert!(parse_labels(&many.join(",")).is_err());
        let need = parse_labels("gpu=none").unwrap();
        assert!(satisfies(&l, &need) && satisfies(&l, &Labels::new()));
        assert!(!satisfies(&Labels::new(), &need));
        assert!(!satisfies(&l, &parse_labels("gpu=a100").unwrap()));
    }

    #[test]
    fn placement_fits_agent_and_labels() {
        let p = Placement { agent_id: Some("spark".into()), labels: parse_labels("os=linux").unwrap(), ..Default::default() };
        let linux = parse_labels("os=linux").unwrap();
        assert!(p.fits("spark", &linux));
        assert!(!p.fits("laptop", &linux));
        assert!(!p.fits("spark", &Labels::new()));
        assert_eq!(p.needs(), "agent `spark` and labels os=linux");
        assert_eq!(Placement::default().caller(), DEFAULT_CALLER);
    }
}
