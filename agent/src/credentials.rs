//! Claude's login file, `.credentials.json`, as the agent reads it: pure parsing of bytes
//! someone else wrote (Claude Code, a person, a broken disk), so every shape of it is an
//! answer, never a panic. [`crate::redact`] gets the tokens; the report gets the rest.

use serde::Deserialize;
use shared::Millis;

/// Largest credentials file read: a real one is well under 1 KiB.
pub const MAX_BYTES: usize = 1024 * 1024;
/// Longest `subscriptionType` passed on to the edge (it travels in every heartbeat).
const MAX_SUBSCRIPTION_TYPE: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    claude_ai_oauth: Option<Entry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_at: Option<serde_json::Value>,
    refresh_token_expires_at: Option<serde_json::Value>,
    subscription_type: Option<serde_json::Value>,
}

/// A login read from the file. The tokens stay on this machine (for redaction only).
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at: Option<Millis>,
    pub refresh_expires_at: Option<Millis>,
    pub subscription_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CredentialsError {
    #[error("it is over {} MiB; it is not a credentials file", MAX_BYTES / (1024 * 1024))]
    TooLarge,
    /// Where the file stops being what Claude writes, and how. Never serde's own words:
    /// they quote the value they found (a token written in the wrong place, a megabyte a
    /// job wrote), and this error travels to the edge and is shown there.
    #[error("{}, at line {line}, column {column}; run `claude auth login` to rewrite it", what(*.category))]
    NotJson { category: serde_json::error::Category, line: usize, column: usize },
    #[error("it has no claudeAiOauth login; run `claude auth login`")]
    NoLogin,
}

/// How a file that is not Claude's credentials went wrong, in words of no content of it.
fn what(category: serde_json::error::Category) -> &'static str {
    use serde_json::error::Category;
    match category {
        Category::Syntax => "it is not valid JSON",
        Category::Eof => "it is cut short (not whole JSON)",
        Category::Data => "it is JSON, but not shaped as Claude writes its login (a value of the wrong kind)",
        Category::Io => "it could not be read",
    }
}

impl CredentialsError {
    fn not_json(e: &serde_json::Error) -> CredentialsError {
        CredentialsError::NotJson { category: e.classify(), line: e.line(), column: e.column() }
    }
}

/// A timestamp that should be milliseconds; seconds (a common mistake) are converted.
fn millis(v: &Option<serde_json::Value>) -> Option<Millis> {
    let n = v.as_ref()?.as_f64()?;
    if !(n.is_finite() && n > 0.0) {
        return None;
    }
    // `as` saturates: a huge number is a far future, not a wrap-around.
    Some(if n < 100_000_000_000.0 { (n * 1000.0) as Millis } else { n as Millis })
}

/// Reads the file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Credentials, CredentialsError> {
    if bytes.len() > MAX_BYTES {
        return Err(CredentialsError::TooLarge);
    }
    let file: File = serde_json::from_slice(bytes).map_err(|e| CredentialsError::not_json(&e))?;
    let entry = file.claude_ai_oauth.ok_or(CredentialsError::NoLogin)?;
    let access_token = entry.access_token.filter(|t| !t.is_empty()).ok_or(CredentialsError::NoLogin)?;
    let subscription_type = entry
        .subscription_type
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= MAX_SUBSCRIPTION_TYPE && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string);
    Ok(Credentials {
        access_token,
        refresh_token: entry.refresh_token.filter(|t| !t.is_empty()),
        expires_at: millis(&entry.expires_at),
        refresh_expires_at: millis(&entry.refresh_token_expires_at),
        subscription_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_shaped_file() {
        let c = parse(
            br#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-aaaa","refreshToken":"sk-ant-ort01-bbbb",
               "expiresAt":1900000000000,"refreshTokenExpiresAt":1900000000,"scopes":["user:inference"],
               "subscriptionType":"max","rateLimitTier":"x"}}"#,
        )
        .unwrap();
        assert_eq!(c.access_token, "sk-ant-oat01-aaaa");
        assert_eq!(c.refresh_token.as_deref(), Some("sk-ant-ort01-bbbb"));
        assert_eq!(c.expires_at, Some(1_900_000_000_000));
        assert_eq!(c.refresh_expires_at, Some(1_900_000_000_000), "seconds are read as seconds");
        assert_eq!(c.subscription_type.as_deref(), Some("max"));
    }

    #[test]
    fn odd_files_are_errors_or_dropped_fields() {
        use serde_json::error::Category;
        assert_eq!(parse(b"{"), Err(CredentialsError::NotJson { category: Category::Eof, line: 1, column: 1 }));
        assert_eq!(parse(b"{\n x"), Err(CredentialsError::NotJson { category: Category::Syntax, line: 2, column: 2 }));
        for body in ["[]", "null", "1"] {
            assert!(matches!(parse(body.as_bytes()), Err(CredentialsError::NotJson { category: Category::Data, .. })), "{body}");
        }
        for body in [r#"{}"#, r#"{"claudeAiOauth":null}"#, r#"{"claudeAiOauth":{"accessToken":""}}"#] {
            assert_eq!(parse(body.as_bytes()), Err(CredentialsError::NoLogin), "{body}");
        }
        let c = parse(br#"{"claudeAiOauth":{"accessToken":"a","expiresAt":-5,"refreshTokenExpiresAt":1e300,"subscriptionType":"a\nb"}}"#).unwrap();
        assert_eq!((c.expires_at, c.refresh_expires_at, c.subscription_type), (None, Some(u64::MAX), None));
        assert_eq!(parse(&vec![b' '; MAX_BYTES + 1]), Err(CredentialsError::TooLarge));
    }

    /// serde's words for a value of the wrong type quote the value: a token in the wrong
    /// place (`{"claudeAiOauth":"sk-ant-…"}`) reached the login's `problem`, and with it
    /// `/oauth/status`, `/health` and doctor; a megabyte of it took the hello past what the
    /// edge reads. The error says what kind of fault and where, never what the file holds.
    #[test]
    fn an_error_never_quotes_the_file() {
        let secret = "sk-ant-oat01-VERYSECRETVERYSECRET";
        let big = "A".repeat(900_000);
        for body in [
            format!(r#"{{"claudeAiOauth":"{secret}"}}"#),
            format!(r#"{{"claudeAiOauth":{{"accessToken":["{secret}"]}}}}"#),
            format!(r#"{{"claudeAiOauth":{{"{secret}":1,}}}}"#),
            format!(r#"{{"{secret}"#),
            format!(r#"{{"claudeAiOauth":"{big}"}}"#),
            format!(r#"{{"claudeAiOauth":{{"accessToken":"a","expiresAt":1}}, "{big}": x}}"#),
        ] {
            let said = parse(body.as_bytes()).unwrap_err().to_string();
            assert!(!said.contains("VERYSECRET") && !said.contains("AAAA"), "{said}");
            assert!(said.len() < 200 && said.contains("line 1, column") && said.contains("claude auth login"), "{said}");
        }
    }
}
