//! Secret redaction. OAuth tokens, API keys and the agent's own secrets must never leave
//! Spark, even if a prompt asks Claude to print them: every line of Claude's output, its
//! errors and its events pass through a [`Redactor`] before they are sent or stored.
//!
//! It works on the *decoded* text: each string of a stream-json line after JSON
//! unescaping (then re-encoded), and inside it, second-level escapes decoded too (`%XX`,
//! `\uXXXX`, `\xHH`, `\/`) with line breaks, spaces and NULs ignored (wrapped base64, hex
//! dumps, `\n` inside JSON, UTF-16 text) — in a secret's plain forms too, so one with a space is found. There it looks for the secrets in the forms a tool prints them —
//! plain, reversed, hex (as `xxd`, `xxd -p`, `xxd -e`, `od -x`, `od -t x4`, `hexdump -C`
//! print it), octal (`od`, `od -b`), base64 at
//! each byte alignment (standard and URL-safe), base32 likewise — and masks not only whole copies but any
//! piece of [`MIN_FRAGMENT`] bytes or more, so a cut-off token, a prefix, or an `xxd`
//! text column is masked too. A [`Carry`] holds the end of each field's text between
//! stream lines, so a secret split across two lines is found as well.
//!
//! This stops accidents and the obvious attempts. It cannot stop a job that is allowed to
//! run commands from sending a secret out some other way (README "What a job can see").

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;

/// What replaces a secret.
pub const MASK: &str = "[REDACTED]";

/// Anthropic tokens all start like this (`sk-ant-oat01-…`, `sk-ant-ort01-…`, `sk-ant-api03-…`);
/// anything of that shape is masked even if we never saw the token itself.
const TOKEN_PREFIX: &str = "sk-ant-";

/// Secrets shorter than this are ignored: masking them would mangle ordinary text, and
/// they are not real tokens.
pub const MIN_SECRET: usize = 8;

/// The shortest piece of a secret, in bytes of the secret, that is masked wherever it is
/// found (as a prefix, a middle part, an `xxd` column…). Shorter secrets only whole.
pub const MIN_FRAGMENT: usize = 12;

/// The fragment length for a secret of `len` bytes: [`MIN_FRAGMENT`], or half a short
/// secret (so a piece that leaks is always under half of it), never under [`MIN_SECRET`].
pub fn fragment_len(len: usize) -> usize {
    (len / 2).clamp(MIN_SECRET, MIN_FRAGMENT).min(len)
}

/// Bits in each window set's quick filter, at the least: most text positions are rejected
/// by one look into this table, which stays in the CPU's cache.
const FILTER_BITS: u32 = 18;

/// Bits in a quick filter, at the most (512 KiB): past it a look costs a trip to memory.
const MAX_FILTER_BITS: u32 = 22;

/// Bits of quick filter for each window a set holds, at the least. A filter of a fixed
/// size filled up as the secrets grew: the login memory masks up to a month of Claude's
/// logins (`oauth::REMEMBERED`, some 90 refresh tokens, hundreds of thousands of windows),
/// and a filter with most bits set sends most text positions on to the table.
const FILTER_BITS_PER_WINDOW: usize = 16;

/// The bits of a quick filter for `windows` windows: [`FILTER_BITS`] for a few secrets,
/// more for many ([`FILTER_BITS_PER_WINDOW`]), at most [`MAX_FILTER_BITS`].
fn filter_bits(windows: usize) -> u32 {
    windows.saturating_mul(FILTER_BITS_PER_WINDOW).next_power_of_two().trailing_zeros().clamp(FILTER_BITS, MAX_FILTER_BITS)
}
const BASE: u64 = 0x9E37_79B9_7F4A_7C15;

/// All windows of one width from every form of every secret.
#[derive(Debug, Clone)]
struct WindowSet {
    width: usize,
    /// `BASE^(width-1)`, to roll the first byte out.
    top: u64,
    /// `64 - ` the filter's bits: a hash's top bits pick its bit.
    shift: u32,
    filter: Vec<u64>,
    /// Window hash → (form, offset), to check a hit byte by byte.
    windows: HashMap<u64, (u32, u32)>,
}

impl WindowSet {
    /// A set of `width` for `windows` windows (its filter's size: [`filter_bits`]).
    fn new(width: usize, windows: usize) -> WindowSet {
        let top = (1..width).fold(1u64, |p, _| p.wrapping_mul(BASE));
        let bits = filter_bits(windows);
        WindowSet { width, top, shift: 64 - bits, filter: vec![0; 1 << (bits - 6)], windows: HashMap::with_capacity(windows) }
    }

    fn slot(&self, hash: u64) -> (usize, u64) {
        let bit = hash >> self.shift;
        ((bit >> 6) as usize, 1 << (bit & 63))
    }

    fn add(&mut self, form: u32, bytes: &[u8]) {
        for (offset, window) in bytes.windows(self.width).enumerate() {
            let hash = hash(window);
            let (word, bit) = self.slot(hash);
            self.filter[word] |= bit;
            self.windows.entry(hash).or_insert((form, offset as u32));
        }
    }

    /// Adds every stretch of `text` covered by windows of this set to `found`.
    fn scan(&self, text: &[u8], forms: &[Vec<u8>], found: &mut Vec<(usize, usize)>) {
        let w = self.width;
        if text.len() < w {
            return;
        }
        let mut h = hash(&text[..w]);
        let mut i = 0;
        loop {
            let (word, bit) = self.slot(h);
            if self.filter[word] & bit != 0 {
                if let Some(&(form, offset)) = self.windows.get(&h) {
                    let window = &forms[form as usize][offset as usize..offset as usize + w];
                    if window == &text[i..i + w] {
                        // Extend the last stretch if this window touches it (it may be
                        // another set's, further on: then start a new one).
                        match found.last_mut() {
                            Some((start, end)) if *start <= i && *end >= i => *end = (*end).max(i + w),
                            _ => found.push((i, i + w)),
                        }
                    }
                }
            }
            if i + w >= text.len() {
                break;
            }
            h = h.wrapping_sub((text[i] as u64).wrapping_mul(self.top)).wrapping_mul(BASE).wrapping_add(text[i + w] as u64);
            i += 1;
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |h, &b| h.wrapping_mul(BASE).wrapping_add(b as u64))
}

/// Sent to another process (the git worker's hand-back, `repo::worker`) as the secrets it
/// was made from, and made again there (in one [`Layer`]).
///
/// Its secrets are in layers, each with its own window tables, scanned alike: a redactor
/// for a set that differs from another's by a few secrets shares the other's layer and
/// builds one of the few ([`Redactor::layered`]). The agent's login memory masks a month
/// of logins (tens of milliseconds to build), and the credentials file may hold tokens of
/// no remembered login (a job's junk, new at each write): each such write built the
/// whole redactor anew for the next line of every job's output (review rev45c, 2).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(from = "Vec<String>")]
pub struct Redactor {
    layers: Vec<std::sync::Arc<Layer>>,
    /// The widest window of any layer: how much of a field's end a [`Carry`] keeps.
    widest: usize,
}

/// Some of a [`Redactor`]'s secrets, and the windows of their forms.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    /// What it was made from.
    secrets: Vec<String>,
    forms: Vec<Vec<u8>>,
    sets: Vec<WindowSet>,
    widest: usize,
}

/// Text in the middle of being redacted: the decoded bytes and, for each, the stretch of
/// the original text it came from (one byte, unless escapes were decoded: `escaped`, and
/// then each byte's end is in `ends`). Its buffers are kept for the next text
/// ([`Scratch`]).
#[derive(Debug, Default)]
struct Decoded {
    bytes: Vec<u8>,
    starts: Vec<u32>,
    ends: Vec<u32>,
    escaped: bool,
}

impl Decoded {
    fn start(&self, k: usize) -> usize {
        self.starts[k] as usize
    }

    fn end(&self, k: usize) -> usize {
        if self.escaped {
            self.ends[k] as usize
        } else {
            self.starts[k] as usize + 1
        }
    }
}

/// The buffers of the two readings of a text ([`decode`]), kept from one field to the
/// next: a job's lines have dozens of strings and keys, and each made its own before.
#[derive(Debug, Default)]
struct Scratch {
    plain: Decoded,
    escaped: Decoded,
}

/// The most bytes of text whose buffers a [`Scratch`] keeps for the next line (they take
/// nine bytes a byte, in two readings): a job's one long line does not hold its size for
/// the rest of the job.
const SCRATCH_KEPT: usize = 16 * 1024;

impl Scratch {
    fn let_go_of_large(&mut self) {
        for decoded in [&mut self.plain, &mut self.escaped] {
            if decoded.bytes.capacity() > SCRATCH_KEPT {
                *decoded = Decoded::default();
            }
        }
    }

    /// The bytes its buffers hold.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        [&self.plain, &self.escaped].iter().map(|d| d.bytes.capacity() + 4 * (d.starts.capacity() + d.ends.capacity())).sum()
    }
}

/// Its secrets alone, from where they are: serde's `into` cloned the whole redactor (its
/// window tables: hundreds of MiB with many long tokens) on the agent's runtime thread to
/// send a list of strings (review rev45a-3).
impl serde::Serialize for Redactor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.secrets())
    }
}

impl From<Vec<String>> for Redactor {
    fn from(secrets: Vec<String>) -> Redactor {
        Redactor::new(secrets)
    }
}

impl Redactor {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Redactor {
        Redactor::of_layers(vec![std::sync::Arc::new(Layer::new(secrets))])
    }

    /// The secrets of `base` (shared, not built again) and `extra` (built now): the masks of
    /// both.
    pub fn layered(base: &std::sync::Arc<Layer>, extra: impl IntoIterator<Item = String>) -> Redactor {
        let extra = Layer::new(extra);
        let layers = if extra.secrets.is_empty() { vec![base.clone()] } else { vec![base.clone(), std::sync::Arc::new(extra)] };
        Redactor::of_layers(layers)
    }

    fn of_layers(layers: Vec<std::sync::Arc<Layer>>) -> Redactor {
        let widest = layers.iter().map(|layer| layer.widest).max().unwrap_or(0);
        Redactor { layers, widest }
    }

    /// What it was made from (those long enough to mask), layer by layer.
    pub fn secrets(&self) -> impl Iterator<Item = &String> {
        self.layers.iter().flat_map(|layer| &layer.secrets)
    }

    /// Its first layer: the one [`Redactor::new`] built, or the base it was layered on.
    pub fn base(&self) -> Option<&std::sync::Arc<Layer>> {
        self.layers.first()
    }
}

impl Layer {
    /// The windows of every form of each of `secrets` long enough to mask ([`MIN_SECRET`]).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Layer {
        let secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= MIN_SECRET).collect();
        let mut by_width: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
        for secret in &secrets {
            let fragment = fragment_len(secret.len());
            for (form, chars_per_byte, slack) in encodings(secret, fragment) {
                // A window spans `fragment` bytes of the secret in this form's characters
                // (less the bytes the form may lose at the edges of a piece).
                let width = (((fragment - slack) as f64) * chars_per_byte).ceil() as usize;
                let width = width.min(form.len());
                if width >= MIN_SECRET {
                    by_width.entry(width).or_default().push(form);
                }
            }
        }
        let mut redactor = Layer { secrets: secrets.clone(), ..Layer::default() };
        let mut widths: Vec<usize> = by_width.keys().copied().collect();
        widths.sort_unstable();
        for width in widths {
            let mut forms = by_width.remove(&width).unwrap_or_default();
            forms.sort();
            forms.dedup();
            let windows = forms.iter().map(|form| form.len().saturating_sub(width) + 1).sum();
            let mut set = WindowSet::new(width, windows);
            for form in forms {
                set.add(redactor.forms.len() as u32, &form);
                redactor.forms.push(form);
            }
            redactor.widest = redactor.widest.max(width);
            redactor.sets.push(set);
        }
        redactor
    }
}

impl Redactor {
    /// Redacts one text on its own (a result, an error, stderr).
    pub fn redact(&self, text: &str) -> String {
        self.redact_after(&mut Scratch::default(), None, text).into_owned()
    }

    /// Redacts `text`; with `end`, as the continuation of what `end` holds (the decoded
    /// end of the same field on the previous line, already sent): a secret that starts
    /// there and ends here is masked here, and `end` is then the new decoded end to carry.
    /// The text itself when nothing in it changes (most texts), a copy otherwise.
    fn redact_after<'a>(&self, scratch: &mut Scratch, end: Option<&mut Vec<u8>>, text: &'a str) -> Cow<'a, str> {
        if self.widest == 0 || text.is_empty() {
            return mask_token_shapes(text);
        }
        let before: &[u8] = end.as_deref().map_or(&[], Vec::as_slice);
        // Two readings: with spaces and line breaks left out, and with escapes decoded
        // too (only when there is one: a `%` or `\` right before a secret must not hide
        // it from the first).
        let Scratch { plain, escaped: escaped_buf } = scratch;
        decode(before, text, false, plain);
        let escaped: Option<&Decoded> = if has_escapes(text) {
            decode(before, text, true, escaped_buf);
            Some(escaped_buf)
        } else {
            None
        };
        let before_len = before.len();
        let mut spans = Vec::new();
        for decoded in std::iter::once(&*plain).chain(escaped) {
            let mut found = Vec::new();
            if decoded.bytes.len() >= MIN_SECRET {
                for layer in &self.layers {
                    for set in &layer.sets {
                        set.scan(&decoded.bytes, &layer.forms, &mut found);
                    }
                }
            }
            // Back to the original text, leaving out what belonged to the earlier line.
            spans.extend(found.iter().filter(|(_, end)| *end > before_len).map(|&(start, end)| {
                let start = start.max(before_len);
                (decoded.start(start), decoded.end(end - 1))
            }));
        }
        spans.sort_unstable();
        // The end of this text (after the earlier one's, if this is short) goes on, in
        // the buffer the earlier end was in.
        if let Some(end) = end {
            let keep = self.widest.saturating_sub(1);
            end.clear();
            end.extend_from_slice(&plain.bytes[plain.bytes.len().saturating_sub(keep)..]);
        }
        // At most one copy of the text, made by whichever step changes it (most change
        // nothing).
        match mask(text, &spans) {
            Cow::Borrowed(text) => mask_token_shapes(text),
            Cow::Owned(masked) => match mask_token_shapes(&masked) {
                Cow::Owned(shaped) => Cow::Owned(shaped),
                Cow::Borrowed(_) => Cow::Owned(masked),
            },
        }
    }

    /// Redacts one line of Claude's stdout: a JSON value has each string (and key)
    /// redacted as decoded text; anything else is redacted as text. `carry` links the
    /// lines of one job.
    pub fn redact_line(&self, line: &str, carry: &mut Carry) -> Result<Value, String> {
        let redacted = match serde_json::from_str::<Value>(line.trim()) {
            Ok(mut value) => {
                let mut path = String::new();
                self.redact_value(&mut value, &mut path, carry);
                Ok(value)
            }
            Err(_) => Err(self.redact_field(line, "", carry).into_owned()),
        };
        carry.scratch.let_go_of_large();
        redacted
    }

    fn redact_field<'a>(&self, text: &'a str, path: &str, carry: &mut Carry) -> Cow<'a, str> {
        // Paths come from Claude's output, as long as a line: a field is known by its
        // path's hash (keyed per job: a job cannot make two paths share one on purpose),
        // and a flood of distinct keys must not grow memory.
        let path = carry.paths.hash_one(path);
        if carry.ends.len() > MAX_CARRIED_FIELDS && !carry.ends.contains_key(&path) {
            carry.ends.clear();
        }
        match carry.ends.get_mut(&path) {
            // Its end is kept even when it is now empty, as it was.
            Some(end) => self.redact_after(&mut carry.scratch, Some(end), text),
            None => {
                let mut end = Vec::new();
                let out = self.redact_after(&mut carry.scratch, Some(&mut end), text);
                if !end.is_empty() {
                    carry.ends.insert(path, end);
                }
                out
            }
        }
    }

    fn redact_value(&self, value: &mut Value, path: &mut String, carry: &mut Carry) {
        match value {
            Value::String(s) => {
                let changed = match self.redact_field(s, path, carry) {
                    Cow::Owned(changed) => Some(changed),
                    Cow::Borrowed(_) => None,
                };
                if let Some(changed) = changed {
                    *s = changed;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_value(v, path, carry)),
            Value::Object(map) => {
                // Each value redacted in place, in the keys' order; the object is made
                // again only if a key changes (most never do), as it always was before:
                // in order, a later key taking the place of an earlier one it now equals.
                let mut renamed = false;
                for (key, v) in map.iter_mut() {
                    let len = path.len();
                    path.push('.');
                    path.push_str(key);
                    self.redact_value(v, path, carry);
                    path.truncate(len);
                    renamed |= matches!(self.redact_after(&mut carry.scratch, None, key), Cow::Owned(_));
                }
                if renamed {
                    for (key, v) in std::mem::take(map) {
                        map.insert(self.redact(&key), v);
                    }
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

/// Fields whose ends a [`Carry`] keeps at most.
const MAX_CARRIED_FIELDS: usize = 1024;

/// The decoded end of each field (by the hash of its path in the JSON, array positions
/// left out) of the lines seen so far: one per job. At most [`MAX_CARRIED_FIELDS`] ends
/// of under [`Redactor`]'s widest window each: a few tens of KiB, whatever the lines.
#[derive(Debug, Default)]
pub struct Carry {
    ends: HashMap<u64, Vec<u8>>,
    paths: std::collections::hash_map::RandomState,
    scratch: Scratch,
}

#[cfg(test)]
impl Carry {
    /// The bytes of the paths and ends it holds.
    fn held_bytes(&self) -> usize {
        self.ends.values().map(|end| std::mem::size_of::<u64>() + end.len()).sum()
    }
}

/// A secret and the forms it takes inside encoded text, each with how many characters of
/// the form one byte of the secret takes, and how many bytes of a piece the form may lose
/// at its edges. Percent-, `\u`- and `\x`-escapes are decoded before matching, so they
/// need no form of their own.
fn encodings(text: &str, fragment: usize) -> Vec<(Vec<u8>, f64, usize)> {
    let secret = text.as_bytes();
    // The text is matched with what [`read_past`] passes over left out, so the secret's
    // plain forms are too: a secret with a space in it (a passphrase, a token pasted with
    // one) was never found, even printed plain (hostile review rev38, 4). Its encoded forms
    // are of its bytes as they are (a tool encodes the space too) and hold no whitespace.
    let kept = |chars: &mut dyn Iterator<Item = char>| chars.filter(|c| !c.is_ascii() || !read_past(*c as u8)).collect::<String>().into_bytes();
    let mut forms = vec![(kept(&mut text.chars()), 1.0, 0), (kept(&mut text.chars().rev()), 1.0, 0)];
    // Hex forms share one window width (one pass over the text): that of `od -x`, which
    // prints little-endian 16-bit words — each pair of bytes swapped, at either parity of
    // the secret's offset in the file — so a piece cut by the end of an `od` line may start
    // and end in a word shared with a neighbour: up to 3 bytes lost.
    let hex = shared::ids::hex(secret);
    forms.push((hex.to_ascii_uppercase().into_bytes(), 2.0, 3));
    forms.push((hex.into_bytes(), 2.0, 3));
    for parity in 0..2 {
        let swapped: Vec<u8> = secret[parity..].chunks_exact(2).flat_map(|p| [p[1], p[0]]).collect();
        forms.push((shared::ids::hex(&swapped).into_bytes(), 2.0, 3));
    }
    // Inside a longer base64 text the secret starts at one of three byte offsets. Encode it
    // behind 0-2 filler bytes and keep only the characters that do not depend on its
    // neighbours: drop the group holding filler, and a last group it does not fill.
    for offset in 0..3 {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(secret);
        let skip_front = if offset == 0 { 0 } else { 4 };
        let whole_groups = padded.len() / 3;
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let text = engine.encode(&padded);
            if whole_groups * 4 > skip_front {
                forms.push((text.as_bytes()[skip_front..whole_groups * 4].to_vec(), 4.0 / 3.0, 0));
            }
        }
    }
    // base32 (`base32`, `basenc --base32hex`) likewise, at each of five byte offsets in
    // groups of five bytes to eight characters. A byte of slack gives it the hex forms'
    // window width (one pass fewer over the text: 15 % of the throughput).
    for offset in 0..5 {
        let mut padded = vec![0u8; offset];
        padded.extend_from_slice(secret);
        let skip_front = if offset == 0 { 0 } else { 8 };
        let whole_groups = padded.len() / 5;
        for alphabet in [BASE32, BASE32_HEX] {
            if whole_groups * 8 > skip_front {
                forms.push((base32(&padded[..whole_groups * 5], alphabet)[skip_front..].to_vec(), 8.0 / 5.0, 1));
            }
        }
    }
    // `od -t x4` (and `xxd -e`): little-endian 32-bit words, at each of four parities; a
    // piece may lose up to 3 bytes to a word shared with a neighbour at either end (so
    // 6 bytes of slack, but a window is never under 6 bytes: 12 digits).
    let slack = 6.min(fragment.saturating_sub(6));
    for parity in 0..4 {
        let swapped: Vec<u8> = secret[parity.min(secret.len())..].chunks_exact(4).flat_map(|w| [w[3], w[2], w[1], w[0]]).collect();
        forms.push((shared::ids::hex(&swapped).into_bytes(), 2.0, slack));
    }
    // Octal, as `od -b` (three digits a byte) and `od` with no options (six digits a
    // little-endian word, at either parity). Octal windows span half a fragment (six bytes,
    // eighteen digits): long runs of octal digits are rare in ordinary text, and so they
    // share the hex forms' window width.
    let octal = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:03o}")).collect::<String>().into_bytes();
    forms.push((octal(secret), 1.5, 0));
    for parity in 0..2 {
        let words: String = secret[parity.min(secret.len())..].chunks_exact(2).map(|p| format!("{:06o}", u16::from_le_bytes([p[0], p[1]]))).collect();
        forms.push((words.into_bytes(), 1.5, 0));
    }
    forms
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const BASE32_HEX: &[u8; 32] = b"0123456789ABCDEFGHIJKLMNOPQRSTUV";

/// Whole five-byte groups in base32, without padding.
fn base32(bytes: &[u8], alphabet: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() / 5 * 8);
    for group in bytes.chunks_exact(5) {
        let n = group.iter().fold(0u64, |n, &b| n << 8 | b as u64);
        out.extend((0..8).rev().map(|i| alphabet[(n >> (5 * i) & 31) as usize]));
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    Some(hex_value(*pair.first()?)? << 4 | hex_value(*pair.get(1)?)?)
}

/// Bytes the redactor reads past, as if they were not there: whitespace (wrapped base64, a
/// hex dump's columns, `\n` in JSON) and NUL (text printed as UTF-16, `iconv -t UTF-16LE`,
/// has one between the characters of a token). The push check reads a binary file by the
/// same rule ([`crate::repo`]'s `binary_holds`).
pub fn read_past(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0)
}

/// `text` read for matching, after `before`: what [`read_past`] passes over left out (as
/// it is once decoded) and, with `escapes`, its `\n`, `\r`, `\t` escapes too, and `%XX`,
/// `\xHH`, `\uXXXX` (with surrogate pairs), `\/`, `\\`, `\"`, `\'` decoded.
fn decode(before: &[u8], text: &str, escapes: bool, into: &mut Decoded) {
    let t = text.as_bytes();
    let Decoded { bytes, starts, ends, escaped } = into;
    *escaped = escapes;
    bytes.clear();
    starts.clear();
    ends.clear();
    bytes.reserve(before.len() + t.len());
    starts.reserve(before.len() + t.len());
    bytes.extend_from_slice(before);
    starts.resize(before.len(), 0);
    let space = read_past;
    if !escapes {
        for (i, &b) in t.iter().enumerate() {
            if !space(b) {
                bytes.push(b);
                starts.push(i as u32);
            }
        }
        return;
    }
    ends.resize(before.len(), 0);
    let mut i = 0;
    while i < t.len() {
        let (unit, out): (usize, Option<u32>) = match t[i] {
            b if space(b) => (1, None),
            b'%' => match t.get(i + 1..i + 3).and_then(hex_byte) {
                Some(b) => (3, Some(b as u32)),
                None => (1, Some(b'%' as u32)),
            },
            b'\\' => match t.get(i + 1) {
                Some(b'n' | b'r' | b't') => (2, None),
                Some(b'/' | b'\\' | b'"' | b'\'') => (2, Some(t[i + 1] as u32)),
                Some(b'x') => match t.get(i + 2..i + 4).and_then(hex_byte) {
                    Some(b) => (4, Some(b as u32)),
                    None => (1, Some(b'\\' as u32)),
                },
                Some(b'u') => match unicode_escape(&t[i..]) {
                    Some((len, c)) => (len, Some(c as u32 | 0x8000_0000)),
                    None => (1, Some(b'\\' as u32)),
                },
                _ => (1, Some(b'\\' as u32)),
            },
            b => (1, Some(b as u32)),
        };
        let (start, end) = (i as u32, (i + unit) as u32);
        let mut push = |b: u8| {
            // An escaped NUL (`\u0000`, `%00`, `\x00`) is passed over as a raw one is.
            if read_past(b) {
                return;
            }
            bytes.push(b);
            starts.push(start);
            ends.push(end);
        };
        match out {
            None => {}
            // A decoded character: its UTF-8 bytes.
            Some(c) if c & 0x8000_0000 != 0 => {
                let ch = char::from_u32(c & 0x7fff_ffff).unwrap_or(char::REPLACEMENT_CHARACTER);
                ch.encode_utf8(&mut [0u8; 4]).bytes().for_each(&mut push);
            }
            Some(b) => push(b as u8),
        }
        i += unit;
    }
}

/// Whether `text` holds anything [`decode`] would unescape (most text does not, and is
/// then read once).
fn has_escapes(text: &str) -> bool {
    let t = text.as_bytes();
    t.iter().enumerate().any(|(i, &b)| match b {
        b'%' => t.get(i + 1..i + 3).and_then(hex_byte).is_some(),
        b'\\' => matches!(t.get(i + 1), Some(b'n' | b'r' | b't' | b'/' | b'\\' | b'"' | b'\'' | b'x' | b'u')),
        _ => false,
    })
}

/// `\uXXXX` (or a surrogate pair `\uD8XX\uDCXX`) at the start of `t`: its length and
/// character.
fn unicode_escape(t: &[u8]) -> Option<(usize, char)> {
    let unit = |at: usize| -> Option<u32> {
        if t.get(at..at + 2)? != b"\\u" {
            return None;
        }
        t.get(at + 2..at + 6)?.iter().try_fold(0u32, |n, &b| Some(n << 4 | hex_value(b)? as u32))
    };
    let first = unit(0)?;
    match first {
        0xD800..=0xDBFF => {
            let second = unit(6).filter(|s| (0xDC00..=0xDFFF).contains(s))?;
            char::from_u32(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)).map(|c| (12, c))
        }
        0xDC00..=0xDFFF => None,
        _ => char::from_u32(first).map(|c| (6, c)),
    }
}

/// `text` with the (sorted) byte spans replaced by [`MASK`], widened to whole characters.
fn mask<'a>(text: &'a str, spans: &[(usize, usize)]) -> Cow<'a, str> {
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for &(start, end) in spans {
        let (mut start, mut end) = (start.min(text.len()), end.min(text.len()));
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        while !text.is_char_boundary(end) {
            end += 1;
        }
        // Touching or overlapping the previous mask: one mask for both.
        if done > 0 && start <= done {
            done = done.max(end);
            continue;
        }
        out.push_str(&text[done..start]);
        out.push_str(MASK);
        done = end;
    }
    out.push_str(&text[done..]);
    Cow::Owned(out)
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn mask_token_shapes(text: &str) -> Cow<'_, str> {
    if !text.contains(TOKEN_PREFIX) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(TOKEN_PREFIX) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_token_char(c)).unwrap_or(tail.len());
        out.push_str(MASK);
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests;
