//! Cutting text to a byte budget without splitting a character (close reasons of 123
//! bytes, socket attachments, storage rows and result caps all need it), and outside text
//! made one line for a log ([`one_line`], and [`peer_words`] for what a peer said).

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

/// The most of a peer's words a log line or a close reason carries.
pub const MAX_PEER_WORDS_BYTES: usize = 1024;

/// What the other side of a connection said (an error quoting its frame, its goodbye), as
/// it is logged and repeated: one line of at most [`MAX_PEER_WORDS_BYTES`]. The agent and
/// the edge hear each other, and anyone on the path, the same way.
pub fn peer_words(text: &str) -> String {
    one_line(truncate(text, MAX_PEER_WORDS_BYTES))
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

    #[test]
    fn a_peer_is_heard_in_one_bounded_line() {
        assert_eq!(peer_words("bye\nINFO forged line\r"), "bye\\nINFO forged line\\r");
        let long = "é".repeat(MAX_PEER_WORDS_BYTES);
        let heard = peer_words(&long);
        assert!(heard.len() <= MAX_PEER_WORDS_BYTES && long.starts_with(&heard));
    }
}
