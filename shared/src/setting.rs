//! How every program of the project (the agent and its commands, both edges) reads a
//! setting's value: surrounding whitespace dropped and blank as unset, as README and
//! `.env.example` promise — `DATA_DIR= ` or a space after a value, which an env file or a
//! systemd `EnvironmentFile` keeps, must not become a folder named ` ` or a refused start.

use std::ffi::OsStr;

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
}
