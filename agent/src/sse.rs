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
    /// Whether the buffer's end is inside a line, not at its start (where an end of line is an
    /// empty line: the event's end).
    mid_line: bool,
    /// The last chunk ended with a CR, which ended its line.
    after_cr: bool,
    /// Inside an event that outgrew the limit: skip to its end.
    skipping: bool,
    /// The stream's first bytes are read: a byte order mark there, if any, dropped.
    started: bool,
    /// The spec's "last event ID": the last `id:` read, whether or not its block had data
    /// (an event).
    last_id: Option<String>,
}

impl EventStream {
    /// Takes the next chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        // Nothing already in the buffer holds an end of line not read.
        let (mut start, mut i) = (0, self.buffer.len());
        self.buffer.extend_from_slice(chunk);
        // One byte order mark first is no part of the stream (the spec ignores it): read as
        // one, the first line's field was unknown and the first event lost.
        if !self.started {
            const BOM: &[u8] = "\u{feff}".as_bytes();
            if self.buffer.len() < BOM.len() && BOM.starts_with(&self.buffer) {
                return events;
            }
            self.started = true;
            if self.buffer.starts_with(BOM) {
                self.buffer.drain(..BOM.len());
            }
            i = 0;
        }
        // The events are read in place and the buffer cut once, after the last; each byte is
        // looked at once, however the stream is cut. (Cutting each event off the front moved
        // the rest of the chunk each time: a chunk of 7-byte events, which an edge may send,
        // took seconds of CPU per 256 KiB.)
        // A CR that ended the last chunk ended its line: an LF after it is the same end of
        // line (CRLF), not an empty line.
        if self.after_cr && i < self.buffer.len() {
            self.after_cr = false;
            if self.buffer[i] == b'\n' {
                i += 1;
            }
        }
        // Lines end at CRLF, LF or CR, as the spec says, and an empty line ends the event. (A
        // search for `\n\n`, `\r\r` or `\r\n\r\n` missed the mixed ones, `\n\r\n` or `\n\r`:
        // two events were read as one.)
        while let Some(at) = self.buffer[i..].iter().position(|&b| b == b'\n' || b == b'\r') {
            let eol = i + at;
            let len = match (self.buffer[eol], self.buffer.get(eol + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            if at == 0 && !self.mid_line {
                let block = start..eol;
                start = eol + len;
                if !std::mem::take(&mut self.skipping) {
                    events.extend(parse_block(&self.buffer[block], &mut self.last_id));
                }
            }
            self.mid_line = false;
            i = eol + len;
        }
        self.mid_line |= i < self.buffer.len();
        self.buffer.drain(..start);
        if self.buffer.len() > MAX_EVENT_BYTES {
            self.buffer.clear();
            self.skipping = true;
        }
        events
    }

    /// The last `id:` the stream named, to be sent back as `Last-Event-ID` when it is
    /// followed again (the spec's "last event ID": kept from a block without data too,
    /// which is no event; `Some("")` when the stream cleared it). Only ids a header can
    /// carry ([`MAX_ID_BYTES`], visible ASCII) are kept.
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }
}

/// One block's event, if it has data; an `id:` in it goes into `last_id` either way.
fn parse_block(block: &[u8], last_id: &mut Option<String>) -> Option<Event> {
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
            "id" if value.len() <= MAX_ID_BYTES && value.bytes().all(|b| b.is_ascii_graphic()) => {
                id = Some(value.to_string());
                *last_id = Some(value.to_string());
            }
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

    /// An event too large to keep is dropped up to its end, and no further: an end that
    /// came in two chunks (its first LF last in the chunk that passed the limit) was lost
    /// with the buffer, and the event after it dropped too.
    #[test]
    fn the_end_of_an_event_too_large_is_seen_even_when_cut_in_two() {
        let mut s = EventStream::default();
        let mut big = vec![b'x'; MAX_EVENT_BYTES];
        big.extend_from_slice(b"\n");
        assert!(s.push(&big).is_empty());
        assert_eq!(s.push(b"\ndata: next\n\n"), vec![Event { name: None, id: None, data: "next".into() }]);
    }

    /// A byte order mark first (one: the spec's "one leading U+FEFF is ignored") is no part
    /// of the first line, cut wherever: read as one, it made the first field `\u{feff}data`,
    /// unknown, and the first event was lost. Anywhere else it is text.
    #[test]
    fn a_byte_order_mark_first_is_no_part_of_the_stream() {
        let wire = "\u{feff}data: x\n\n\u{feff}data: y\n\ndata: z\u{feff}\n\n".as_bytes();
        let want = vec![Event { name: None, id: None, data: "x".into() }, Event { name: None, id: None, data: "z\u{feff}".into() }];
        for cut in 0..wire.len() {
            let mut s = EventStream::default();
            let mut got = s.push(&wire[..cut]);
            got.extend(s.push(&wire[cut..]));
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    /// The stream as the spec reads it, whole (html.spec.whatwg.org, "Interpreting an event
    /// stream"): lines end at CRLF, LF or CR (a CRLF is one end, not two), an empty line
    /// ends an event, and what follows the last empty line is not one yet. Each event's
    /// fields are read as [`parse_block`] reads them (only its boundaries are the spec's
    /// here): the oracle the parser's chunked reading is held to.
    fn by_the_spec(wire: &[u8]) -> Vec<Event> {
        // One byte order mark first is no part of the stream.
        let wire = wire.strip_prefix("\u{feff}".as_bytes()).unwrap_or(wire);
        let mut events = Vec::new();
        let (mut block_start, mut line_start, mut i) = (0, 0, 0);
        while i < wire.len() {
            let end = match wire[i] {
                b'\r' if wire.get(i + 1) == Some(&b'\n') => 2,
                b'\r' | b'\n' => 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            if i == line_start {
                events.extend(parse_block(&wire[block_start..i], &mut None));
                block_start = i + end;
            }
            i += end;
            line_start = i;
        }
        events
    }

    /// A block with an `id:` and no data is no event, but the spec keeps its id as the last
    /// one: dropped with the block, `submit` followed again from an older id, and the
    /// progress lines between were shown twice.
    #[test]
    fn an_id_without_data_is_still_the_last_id() {
        let mut s = EventStream::default();
        assert_eq!(s.last_id(), None);
        assert_eq!(s.push(b"id: 4\ndata: x\n\n"), vec![Event { name: None, id: Some("4".into()), data: "x".into() }]);
        assert_eq!(s.last_id(), Some("4"));
        assert_eq!(s.push(b"id: 5\n\n: keep-alive\n\n"), vec![]);
        assert_eq!(s.last_id(), Some("5"));
        // An event with no id of its own leaves it; an empty one clears it; one no header
        // can carry is not kept.
        assert_eq!(s.push(b"data: y\n\nid: 1 2\n\n").len(), 1);
        assert_eq!(s.last_id(), Some("5"));
        s.push(b"id\n\n");
        assert_eq!(s.last_id(), Some(""));
    }

    proptest::proptest! {
        /// However the stream is cut into chunks (between a CR and its LF, inside a
        /// character), the events are the spec's for the whole stream: the same ends of
        /// lines and of events, nothing merged, nothing split, nothing lost.
        #[test]
        fn any_chunking_gives_the_specs_events(
            parts in proptest::collection::vec(
                proptest::sample::select(vec!["\u{feff}", "data", "data:", "data: ", "id: 7", "event: e", ": c", "x", "é", "\r", "\n", "\r\n", ":"]),
                0..40,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let wire = parts.concat().into_bytes();
            let want = by_the_spec(&wire);
            let mut whole = EventStream::default();
            proptest::prop_assert_eq!(&whole.push(&wire), &want, "whole: {:?}", String::from_utf8_lossy(&wire));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let mut s = EventStream::default();
            let (mut got, mut from) = (Vec::new(), 0);
            for cut in cuts.into_iter().chain([wire.len()]) {
                got.extend(s.push(&wire[from..cut]));
                from = cut;
            }
            proptest::prop_assert_eq!(&got, &want, "cut: {:?}", String::from_utf8_lossy(&wire));
            // And a byte at a time, an empty chunk after each.
            let mut s = EventStream::default();
            let got: Vec<Event> = wire.iter().flat_map(|b| [s.push(std::slice::from_ref(b)), s.push(&[])]).flatten().collect();
            proptest::prop_assert_eq!(&got, &want, "bytes: {:?}", String::from_utf8_lossy(&wire));
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
