//! Server-Sent Events framing, for `claude-runner submit` following a job's progress from
//! an edge it does not control: bytes arrive in arbitrary chunks (a character or a line
//! may be split between two), and a hostile or broken server may send anything, so the
//! buffer is bounded and nothing panics.

/// One event: its `event:` name (if any), its `id:` (if it had one the edge could be
/// sent back, [`MAX_ID_BYTES`]) and its `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

/// Longest `id:` kept, to be sent back as `Last-Event-ID` (the edge's are `12` or `2.12`);
/// a longer one, or one that no header may carry, is not kept.
pub const MAX_ID_BYTES: usize = 64;

/// Largest event kept; a longer one is dropped whole (the edge's largest is a result of a
/// few MiB).
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Turns a byte stream into events.
#[derive(Debug, Default)]
pub struct EventStream {
    buffer: Vec<u8>,
    /// Inside an event that outgrew the limit: skip to its end.
    skipping: bool,
}

impl EventStream {
    /// Takes the next chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        // Only the tail can hold the start of a separator split by the previous chunk.
        let mut from = self.buffer.len().saturating_sub(3);
        self.buffer.extend_from_slice(chunk);
        // Where the first event not yet taken starts: the events are read in place and the
        // buffer cut once, after the last. (Cutting each off the front moved the rest of
        // the chunk each time: a chunk of 7-byte events, which an edge may send, took
        // seconds of CPU per 256 KiB.)
        let mut start = 0;
        while let Some((end, sep)) = find_blank_line(&self.buffer[from..]).map(|(i, n)| (from + i, n)) {
            let block = start..end;
            start = end + sep;
            from = start;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            if let Some(event) = parse_block(&self.buffer[block]) {
                events.push(event);
            }
        }
        self.buffer.drain(..start);
        if self.buffer.len() > MAX_EVENT_BYTES {
            self.buffer.clear();
            self.skipping = true;
        }
        events
    }
}

/// The first blank line (`\n\n`, `\r\n\r\n` or `\r\r`): its index and length.
fn find_blank_line(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'\n', b'\n') | (b'\r', b'\r') => return Some((i, 2)),
            (b'\r', b'\n') if bytes.get(i + 2..i + 4) == Some(b"\r\n") => return Some((i, 4)),
            _ => i += 1,
        }
    }
    None
}

fn parse_block(block: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(block);
    let mut name = None;
    let mut id = None;
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        // A line starting with `:` is a comment (the edge's keep-alives).
        let (field, value) = match line.split_once(':') {
            Some(("", _)) => continue,
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => name = Some(value.to_string()),
            // Visible ASCII only: it goes back in a header.
            "id" if value.len() <= MAX_ID_BYTES && value.bytes().all(|b| b.is_ascii_graphic()) => id = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    Some(Event { name, id, data: data? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id `submit` could not send back as `Last-Event-ID` (too long, a control
    /// character, a space, past ASCII) is not kept; the event still is.
    #[test]
    fn only_ids_a_header_can_carry_are_kept() {
        let long = "9".repeat(MAX_ID_BYTES + 1);
        for (id, kept) in [("2.12", true), (long.as_str(), false), ("1\u{7f}", false), ("1 2", false), ("١٢", false)] {
            let got = EventStream::default().push(format!("id: {id}\ndata: x\n\n").as_bytes());
            assert_eq!(got, vec![Event { name: None, id: kept.then(|| id.to_string()), data: "x".into() }], "{id:?}");
        }
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let wire = "id: 1\nevent: progress\ndata: {\"t\":\"é\"}\n\n: keep-alive\n\nevent: result\r\ndata: a\r\ndata: b\r\n\r\n";
        let want = vec![
            Event { name: Some("progress".into()), id: Some("1".into()), data: "{\"t\":\"é\"}".into() },
            Event { name: Some("result".into()), id: None, data: "a\nb".into() },
        ];
        for cut in 0..wire.len() {
            let mut s = EventStream::default();
            let mut got = s.push(&wire.as_bytes()[..cut]);
            got.extend(s.push(&wire.as_bytes()[cut..]));
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    #[test]
    fn an_endless_event_is_dropped_not_kept() {
        let mut s = EventStream::default();
        let big = vec![b'x'; MAX_EVENT_BYTES / 4 + 1];
        for _ in 0..4 {
            assert!(s.push(&big).is_empty());
        }
        assert!(s.buffer.is_empty());
        assert!(s.push(b"\n\ndata: next\n\n") == vec![Event { name: None, id: None, data: "next".into() }]);
    }
}
