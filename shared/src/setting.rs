//! How every program of the project (the agent and its commands, both edges) reads a
//! setting's value: surrounding whitespace dropped and blank as unset, as README and
//! `.env.example` promise — `DATA_DIR= ` or a space after a value, which an env file or a
//! systemd `EnvironmentFile` keeps, must not become a folder named ` ` or a refused start.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};

/// `raw` as meant: trimmed, `None` when blank.
pub fn value(raw: &str) -> Option<&str> {
    Some(raw.trim()).filter(|v| !v.is_empty())
}

/// [`value`] for a setting that may not be text (a path): one that is not UTF-8 is taken
/// as it is.
pub fn os_value(raw: &OsStr) -> Option<&OsStr> {
    match raw.to_str() {
        Some(text) => value(text).map(OsStr::new),
        None => Some(raw),
    }
}

/// The environment (or any lookup of it), read as text settings. `std::env::var(name).ok()`
/// reads a value that is not UTF-8 (a NOTIFY_URL written in Latin-1, a token pasted with a
/// stray byte) as unset: a program started without it, saying nothing, or said it was
/// missing. Such a setting is remembered as it is read, and refused by name.
pub struct TextSettings<G> {
    get_os: G,
    not_text: RefCell<Option<String>>,
}

impl<G: Fn(&str) -> Option<OsString>> TextSettings<G> {
    pub fn new(get_os: G) -> Self {
        TextSettings { get_os, not_text: RefCell::new(None) }
    }

    /// The setting's value; `None` when unset, or not text (see [`TextSettings::refuse_any`]).
    pub fn get(&self, name: &str) -> Option<String> {
        match (self.get_os)(name)?.into_string() {
            Ok(text) => Some(text),
            Err(_) => {
                self.not_text.borrow_mut().get_or_insert_with(|| name.to_string());
                None
            }
        }
    }

    /// The setting's value as it is, for one that may not be text (a path).
    pub fn get_os(&self, name: &str) -> Option<OsString> {
        (self.get_os)(name)
    }

    /// The first setting read that is not text, named.
    pub fn refuse_any(&self) -> Result<(), NotText> {
        match self.not_text.borrow().as_deref() {
            Some(name) => Err(NotText(name.to_string())),
            None => Ok(()),
        }
    }
}

/// A setting whose value is not UTF-8 text, named; never its value (it may be a secret,
/// or a webhook's URL holding one).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} is not UTF-8 text (its value is not shown: it may hold a secret); set it again as plain UTF-8 text, or unset it")]
pub struct NotText(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_read_trimmed_and_blank_is_unset() {
        assert_eq!(value(""), None);
        assert_eq!(value(" \t\n"), None);
        assert_eq!(value(" 127.0.0.1:8787 "), Some("127.0.0.1:8787"));
        assert_eq!(value("/var/lib/my runner"), Some("/var/lib/my runner"), "inner spaces stay");
        assert_eq!(os_value(OsStr::new(" ")), None);
        assert_eq!(os_value(OsStr::new("/srv/data\t")), Some(OsStr::new("/srv/data")));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let not_text = OsStr::from_bytes(b" /srv/\xff ");
            assert_eq!(os_value(not_text), Some(not_text), "a path that is not UTF-8 is taken as it is");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_setting_that_is_not_text_is_remembered_and_refused_by_name_only() {
        use std::os::unix::ffi::OsStrExt;
        let env = TextSettings::new(|name: &str| match name {
            "NOTIFY_URL" => Some(OsStr::from_bytes(b"https://h/caf\xe9-token").to_os_string()),
            "RUST_LOG" => Some(OsStr::from_bytes(b"\xff").to_os_string()),
            "LOG_FORMAT" => Some("json".into()),
            _ => None,
        });
        assert_eq!(env.get("LOG_FORMAT").as_deref(), Some("json"));
        assert_eq!(env.refuse_any(), Ok(()), "nothing refused until a value that is not text is read");
        assert_eq!(env.get("NOTIFY_URL"), None);
        assert_eq!(env.get("RUST_LOG"), None);
        let err = env.refuse_any().unwrap_err().to_string();
        assert!(err.starts_with("NOTIFY_URL is not UTF-8 text"), "the first one read is named: {err}");
        assert!(!err.contains("caf") && !err.contains("https"), "the value is shown: {err}");
        assert!(env.get_os("NOTIFY_URL").is_some(), "a path may still be read as it is");
    }
}
