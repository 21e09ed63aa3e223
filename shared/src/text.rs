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

/// Text from outside (a peer's words, a path Claude chose) as one line: every character
/// that [`acts_on_display`] escaped, so it can neither end the log line it is written in and
/// forge the next one, nor drive a terminal, nor reorder what is shown.
pub fn one_line(text: &str) -> String {
    text.chars().map(|c| if acts_on_display(c) { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Whether `c` acts on how text is shown rather than being shown: a control character
/// (Cc: line breaks, ESC, the C1 controls a terminal takes as CSI and OSC), a bidi override,
/// embedding, isolate or mark (U+202A-202E, U+2066-2069, U+200E, U+200F, U+061C: words that
/// reorder a line, "Trojan Source"), or the line and paragraph separators (U+2028, U+2029).
/// The one rule of what every escaping of outside text for a person or a log escapes.
pub fn acts_on_display(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{61c}' | '\u{2028}' | '\u{2029}')
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

    /// Bidi overrides and isolates, the marks and the line and paragraph separators are
    /// not control characters (Cc) but act on how a line is shown: an edge's or a job's
    /// words could reorder what an operator reads ("Trojan Source") or break its line.
    #[test]
    fn words_that_reorder_or_break_a_line_are_escaped() {
        for c in ['\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', '\u{200e}', '\u{200f}', '\u{61c}', '\u{2028}', '\u{2029}'] {
            let shown = one_line(&format!("ok {c} done"));
            assert!(!shown.contains(c), "{c:?} passed: {shown:?}");
            assert!(shown.starts_with("ok ") && shown.ends_with(" done"), "{shown:?}");
        }
        assert_eq!(one_line("déjà vu — ok"), "déjà vu — ok");
    }

    #[test]
    fn a_peer_is_heard_in_one_bounded_line() {
        assert_eq!(peer_words("bye\nINFO forged line\r"), "bye\\nINFO forged line\\r");
        let long = "é".repeat(MAX_PEER_WORDS_BYTES);
        let heard = peer_words(&long);
        assert!(heard.len() <= MAX_PEER_WORDS_BYTES && long.starts_with(&heard));
    }
}
