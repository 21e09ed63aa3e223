//! Token redaction. OAuth tokens and API keys must never leave Spark, even if a prompt
//! asks Claude to print them: every byte of Claude's output, errors and events passes
//! through [`Redactor::redact`] before it is sent or stored.
//!
//! Besides the tokens as they are, it masks the forms a tool would most likely print them
//! in: base64 (as in `base64 ~/.claude/.credentials.json`, at each of the three byte
//! alignments, standard and URL-safe), hex, and reversed. No list of encodings is
//! complete; this one covers the accidents and the obvious attempts.

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
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 8).flat_map(|s| encodings(&s)).collect();
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

/// A secret and the forms it takes inside encoded text.
fn encodings(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    use base64::Engine;
    let bytes = secret.as_bytes();
    let mut forms = vec![
        secret.to_string(),
        secret.chars().rev().collect(),
        shared::ids::hex(bytes),
        shared::ids::hex(bytes).to_ascii_uppercase(),
    ];
    // Inside a longer base64 text the secret starts at one of three byte offsets. Encode it
    // behind 0-2 filler bytes and keep only the characters that do not depend on its
    // neighbours: drop the group holding filler, and a last group it does not fill.
    for offset in 0..3 {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(bytes);
        let skip_front = if offset == 0 { 0 } else { 4 };
        let whole_groups = padded.len() / 3;
        for engine in [&STANDARD, &URL_SAFE] {
            let text = engine.encode(&padded);
            let core = &text[skip_front..whole_groups * 4];
            if core.len() >= 8 {
                forms.push(core.to_string());
            }
        }
    }
    forms
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
    fn masks_tokens_printed_in_base64_hex_or_reversed() {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        let token = "oauth-access-token-abcdefghijklmnopqrstuvwxyz";
        let r = Redactor::new([token.to_string()]);
        for prefix in ["", "x", "xy", "{\"claudeAiOauth\":{\"accessToken\":\""] {
            let file = format!("{prefix}{token}\",\"more\":1}}");
            let encoded = STANDARD.encode(file.as_bytes());
            let out = r.redact(&encoded);
            assert!(out.contains(MASK), "base64 at offset {}: {out}", prefix.len() % 3);
            // What is left cannot be decoded back into the token.
            let left: String = out.replace(MASK, "");
            let decoded = String::from_utf8_lossy(&STANDARD.decode(left.trim_end_matches('=')).unwrap_or_default()).into_owned();
            assert!(!decoded.contains(&token[4..token.len() - 4]), "{decoded}");
        }
        let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
        assert_eq!(r.redact(&hex), MASK);
        assert_eq!(r.redact(&token.chars().rev().collect::<String>()), MASK);
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let r = Redactor::new(["abcdefghij".to_string()]);
        assert_eq!(r.redact("nothing to see — ünïcode"), "nothing to see — ünïcode");
    }
}
