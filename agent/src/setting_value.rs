//! How the agent's number and switch settings are read from their text: clap's own
//! parsers refused `MAX_CONCURRENT_JOBS=abc` with "invalid digit found in string" and a
//! switch with "value was not a boolean", naming the setting but not what to write. These
//! say the setting, what is wrong with the value, and what to write (its range, and what
//! it is unset). A value is quoted on one bounded line: it is not a secret (these settings
//! hold none), but it is whatever was set.

use std::fmt::Display;
use std::num::{IntErrorKind, ParseIntError};
use std::str::FromStr;

/// The value as quoted in a refusal.
fn quoted(value: &str) -> String {
    shared::text::one_line(shared::text::truncate(value, 80))
}

/// The value parser of the whole-number setting `name`, in `unit`s, from `least` to
/// `most` (`None`: as large as it holds), `default` when unset.
pub fn whole<T>(name: &'static str, unit: &'static str, least: T, most: Option<T>, default: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr<Err = ParseIntError> + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |value: &str| {
        let range = match most {
            Some(most) => format!("from {least} to {most}"),
            None => format!("of {least} or more"),
        };
        let refused = |problem: String| format!("{name}: `{}` {problem}; write a whole number of {unit} {range} (unset, it is {default})", quoted(value));
        let n: T = value.parse().map_err(|e: ParseIntError| match e.kind() {
            IntErrorKind::PosOverflow => refused(match most {
                Some(most) => format!("is over {most}"),
                None => "is larger than any this setting holds".into(),
            }),
            _ => refused("is not a whole number".into()),
        })?;
        if n < least {
            return Err(refused(format!("is under {least}")));
        }
        match most {
            Some(most) if n > most => Err(refused(format!("is over {most}"))),
            _ => Ok(n),
        }
    }
}

/// The value parser of the on/off setting `name`, off when unset: the words clap's own
/// took (`1`, `true`, `yes`, `on`, `y`, `t`; `0`, `false`, `no`, `off`, `n`, `f`), in any case.
pub fn switch(name: &'static str) -> impl Fn(&str) -> Result<bool, String> + Clone + Send + Sync + 'static {
    move |value: &str| match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "y" | "t" => Ok(true),
        "0" | "false" | "no" | "off" | "n" | "f" => Ok(false),
        _ => Err(format!("{name}: `{}` is neither on nor off; write 1, true, yes or on (or 0, false, no or off; unset, it is off)", quoted(value))),
    }
}

/// The value parser of the address setting `name` (`host:port`, the host an IP address),
/// `default` when unset.
pub fn address(name: &'static str, default: &'static str) -> impl Fn(&str) -> Result<std::net::SocketAddr, String> + Clone + Send + Sync + 'static {
    move |value: &str| {
        value.parse().map_err(|_| format!("{name}: `{}` is not an IP address and port; write one like {default} or [::1]:8787 (unset, it is {default})", quoted(value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_number_says_what_is_wrong_and_what_to_write() {
        let jobs = whole::<u32>("MAX_CONCURRENT_JOBS", "jobs", 1, Some(64), 1);
        assert_eq!(jobs("8"), Ok(8));
        assert_eq!(jobs("abc").unwrap_err(), "MAX_CONCURRENT_JOBS: `abc` is not a whole number; write a whole number of jobs from 1 to 64 (unset, it is 1)");
        assert!(jobs("0").unwrap_err().contains("`0` is under 1"));
        assert!(jobs("65").unwrap_err().contains("`65` is over 64"));
        assert!(jobs("99999999999").unwrap_err().contains("is over 64"));
        let drain = whole::<u64>("DRAIN_TIMEOUT_MS", "milliseconds", 0, None, 300_000);
        assert_eq!(drain("0"), Ok(0));
        assert!(drain("99999999999999999999").unwrap_err().contains("larger than any this setting holds; write a whole number of milliseconds of 0 or more"));
        let long = "9x".repeat(200);
        assert!(drain(&long).unwrap_err().len() < 300, "a value is quoted bounded");
    }

    #[test]
    fn a_refused_address_says_what_to_write() {
        let listen = address("LISTEN", "127.0.0.1:8787");
        assert_eq!(listen("[::1]:9000").map(|a| a.port()), Ok(9000));
        assert_eq!(listen("8787").unwrap_err(), "LISTEN: `8787` is not an IP address and port; write one like 127.0.0.1:8787 or [::1]:8787 (unset, it is 127.0.0.1:8787)");
    }

    #[test]
    fn a_switch_takes_the_words_it_took_and_says_them_otherwise() {
        let keep = switch("KEEP_FAILED_WORKSPACES");
        for on in ["1", "true", "YES", "On", "y", "t"] {
            assert_eq!(keep(on), Ok(true), "{on}");
        }
        for off in ["0", "false", "No", "OFF", "n", "f"] {
            assert_eq!(keep(off), Ok(false), "{off}");
        }
        assert!(keep("maybe").unwrap_err().starts_with("KEEP_FAILED_WORKSPACES: `maybe` is neither on nor off; write 1, true, yes or on"));
    }
}
