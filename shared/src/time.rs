//! Timestamps as RFC 3339 text (`2026-01-20T10:30:00Z`), computed without a clock or a
//! date library so it stays pure and wasm-friendly.

use crate::Millis;

/// Formats milliseconds since the epoch as RFC 3339 UTC with second precision.
pub fn rfc3339(ms: Millis) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// A duration as a person says it, at the precision that matters for its size:
/// "45 seconds", "1 minute", "12 minutes", "2 hours 5 minutes". An alert that said
/// "0 minutes" for a threshold under a minute told the reader nothing.
pub fn spoken(ms: u64) -> String {
    fn unit(n: u64, one: &str) -> String {
        format!("{n} {one}{}", if n == 1 { "" } else { "s" })
    }
    let secs = ms / 1000;
    match secs {
        0..=59 => unit(secs, "second"),
        60..=3_599 => unit(secs / 60, "minute"),
        _ if (secs % 3_600) / 60 == 0 => unit(secs / 3_600, "hour"),
        _ => format!("{} {}", unit(secs / 3_600, "hour"), unit((secs % 3_600) / 60, "minute")),
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_said_at_their_own_scale() {
        assert_eq!(spoken(0), "0 seconds");
        assert_eq!(spoken(1_000), "1 second");
        assert_eq!(spoken(30_000), "30 seconds");
        assert_eq!(spoken(60_000), "1 minute");
        assert_eq!(spoken(5 * 60_000 + 59_999), "5 minutes");
        assert_eq!(spoken(3_600_000), "1 hour");
        assert_eq!(spoken(2 * 3_600_000 + 5 * 60_000), "2 hours 5 minutes");
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_737_369_000_000), "2025-01-20T10:30:00Z");
        // A leap day and the end of a year.
        assert_eq!(rfc3339(1_709_208_000_000), "2024-02-29T12:00:00Z");
        assert_eq!(rfc3339(1_767_225_599_999), "2025-12-31T23:59:59Z");
    }
}
