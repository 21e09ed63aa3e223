//! Cutting text to a byte budget without splitting a character (close reasons of 123
//! bytes, socket attachments, storage rows and result caps all need it), and outside text
//! made one line for a log.

/// The longest prefix of `text` of at most `max` bytes.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// The longest suffix of `text` of at most `max` bytes.
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    &text[cut..]
}

/// Text from outside (a peer's words, a path Claude chose) as one line: control characters
/// escaped, so it can neither end the log line it is written in and forge the next one, nor
/// drive a terminal.
pub fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_splits_a_character() {
        let s = "aé€😀z";
        for max in 0..=s.len() + 1 {
            assert!(truncate(s, max).len() <= max);
            assert!(tail(s, max).len() <= max);
            assert!(s.starts_with(truncate(s, max)));
            assert!(s.ends_with(tail(s, max)));
        }
        assert_eq!(truncate(s, 3), "aé");
        assert_eq!(tail(s, 5), "😀z");
    }
}
