//! Token redaction. OAuth tokens and API keys must never leave Spark, even if a prompt
//! asks Claude to print them: every byte of Claude's output, errors and events passes
//! through [`Redactor::redact`] before it is sent or stored.

/// What replaces a secret.
pub const MASK: &str = "[REDACTED]";

/// Anthropic tokens all start like this (`sk-ant-oat01-…`, `sk-ant-ort01-…`, `sk-ant-api03-…`);
/// anything of that shape is masked even if we never saw the token itself.
const TOKEN_PREFIX: &str = "sk-ant-";

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// Secrets shorter than 8 characters are ignored: masking them would mangle ordinary
    /// text and they are not real tokens.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Redactor {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 8).collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        mask_token_shapes(&out)
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn mask_token_shapes(text: &str) -> String {
    if !text.contains(TOKEN_PREFIX) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(TOKEN_PREFIX) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_token_char(c)).unwrap_or(tail.len());
        out.push_str(MASK);
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_known_secrets_and_token_shapes() {
        let r = Redactor::new(["my-very-secret-api-key".to_string(), "short".to_string()]);
        let text = "key=my-very-secret-api-key tok=sk-ant-oat01-AbC_d-9 end; short stays";
        assert_eq!(r.redact(text), "key=[REDACTED] tok=[REDACTED] end; short stays");
    }

    #[test]
    fn masks_tokens_inside_json_strings() {
        let r = Redactor::default();
        let line = r#"{"text":"here: sk-ant-ort01-xyz123\n"}"#;
        assert_eq!(r.redact(line), r#"{"text":"here: [REDACTED]\n"}"#);
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let r = Redactor::new(["abcdefghij".to_string()]);
        assert_eq!(r.redact("nothing to see — ünïcode"), "nothing to see — ünïcode");
    }
}
