//! A bound on a git server's ref advertisement, counted as it is read. libgit2 reads the
//! whole advertisement into memory before `Connection::list` returns: a server that
//! streamed refs without end took a git worker to its 4 GiB (`worker::MAX_WORKER_MEMORY`)
//! before the count of [`super::mirror::MAX_FETCH_REFS`] could be made, and N jobs took
//! N × 4 GiB (hostile review rev25, 5).
//!
//! How: `https` is registered (in the git worker, once) as libgit2's own smart HTTP
//! transport, whose subtransport is libgit2's own (`git_smart_subtransport_http`) wrapped:
//! the stream of a ref listing (`GIT_SERVICE_UPLOADPACK_LS`, `…RECEIVEPACK_LS`) counts its
//! pkt-lines and bytes as they pass and fails past [`MAX_LINES`] or [`MAX_BYTES`]. Every
//! other stream, and every other part of a conversation (TLS trust, credentials,
//! redirects, proxies, timeouts), is libgit2's, untouched.

use libgit2_sys as raw;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Pkt-lines one advertisement may hold: every ref a server names (pull requests' too, on
/// some hosts) and each annotated tag's peeled line, well past twice
/// [`super::mirror::MAX_FETCH_REFS`], which is counted on the branches and tags after.
pub const MAX_LINES: usize = 1_000_000;
/// Bytes one advertisement may take: a million refs of names 200 bytes long.
pub const MAX_BYTES: usize = 256 << 20;

/// Lines counted when the last advertisement was cut (0: none was). One git operation runs
/// at a time in a git worker.
static CUT_AT_LINES: AtomicUsize = AtomicUsize::new(0);

/// Clears [`cut`]'s answer before a conversation.
pub fn reset() {
    CUT_AT_LINES.store(0, Ordering::SeqCst);
}

/// The lines counted, if the last advertisement was cut at a bound.
pub fn cut() -> Option<usize> {
    Some(CUT_AT_LINES.load(Ordering::SeqCst)).filter(|n| *n > 0)
}

/// The error of a conversation with `url` whose advertisement was cut ([`cut`]), if it
/// was: nothing was `done` ("fetched", "pushed"). libgit2's own words for it are a
/// network error's, and a push's showed as "could not reach" the server (rev28).
pub fn cut_error(url: &str, done: &'static str) -> Option<super::error::RepoError> {
    cut().map(|lines| super::error::RepoError::RefListCut {
        url: url.to_string(),
        lines,
        max_lines: MAX_LINES,
        max_bytes: MAX_BYTES,
        max_refs: super::mirror::MAX_FETCH_REFS,
        done: done.into(),
    })
}

extern "C" {
    // libgit2's HTTP subtransport (`git2/sys/transport.h`), which libgit2-sys does not
    // declare.
    fn git_smart_subtransport_http(out: *mut *mut raw::git_smart_subtransport, owner: *mut raw::git_transport, param: *mut c_void) -> c_int;
}

/// Our subtransport's definition, as libgit2's own for HTTP (`rpc`: one request per step).
struct Definition(raw::git_smart_subtransport_definition);
// SAFETY: a constant (its pointer is null) that libgit2 only reads.
unsafe impl Sync for Definition {}
static DEFINITION: Definition = Definition(raw::git_smart_subtransport_definition { callback: Some(subtransport), rpc: 1, param: std::ptr::null_mut() });

/// Registers the counting transport for `https` in this process (once; a second call does
/// nothing). Only the git worker talks to servers.
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The transports' list is libgit2's: initialised first (git2 does it on its first use).
        raw::init();
        // SAFETY: a NUL-terminated prefix and a callback of the type libgit2 calls.
        let rc = unsafe { raw::git_transport_register(c"https".as_ptr(), Some(transport), std::ptr::null_mut()) };
        if rc != 0 {
            tracing::warn!(rc, "the bound on ref advertisements could not be registered; libgit2's https transport is used as it is");
        }
    });
}

extern "C" fn transport(out: *mut *mut raw::git_transport, owner: *mut raw::git_remote, _param: *mut c_void) -> c_int {
    // SAFETY: libgit2's own smart transport, given our definition, which lives for ever.
    unsafe { raw::git_transport_smart(out, owner, &DEFINITION.0 as *const _ as *mut c_void) }
}

/// Our subtransport: libgit2's HTTP one, whose ref listings are counted.
#[repr(C)]
struct Counting {
    parent: raw::git_smart_subtransport,
    inner: *mut raw::git_smart_subtransport,
}

extern "C" fn subtransport(out: *mut *mut raw::git_smart_subtransport, owner: *mut raw::git_transport, param: *mut c_void) -> c_int {
    let mut inner = std::ptr::null_mut();
    // SAFETY: libgit2 makes its HTTP subtransport for `owner`, as its own definition would.
    let rc = unsafe { git_smart_subtransport_http(&mut inner, owner, param) };
    if rc != 0 {
        return rc;
    }
    let counting = Box::new(Counting { parent: raw::git_smart_subtransport { action: Some(action), close: Some(close), free: Some(free) }, inner });
    // SAFETY: libgit2 gave `out` to be written; `parent` is the first field (repr(C)).
    unsafe { *out = Box::into_raw(counting) as *mut raw::git_smart_subtransport };
    0
}

extern "C" fn action(out: *mut *mut raw::git_smart_subtransport_stream, sub: *mut raw::git_smart_subtransport, url: *const c_char, service: raw::git_smart_service_t) -> c_int {
    // SAFETY: `sub` is a `Counting` we made (its first field).
    let inner = unsafe { (*(sub as *mut Counting)).inner };
    let mut stream = std::ptr::null_mut();
    // SAFETY: libgit2's subtransport, called as libgit2 would.
    let rc = unsafe { ((*inner).action.expect("libgit2's action"))(&mut stream, inner, url, service) };
    if rc != 0 {
        return rc;
    }
    let listing = matches!(service, raw::GIT_SERVICE_UPLOADPACK_LS | raw::GIT_SERVICE_RECEIVEPACK_LS);
    if !listing {
        // SAFETY: libgit2 gave `out` to be written.
        unsafe { *out = stream };
        return 0;
    }
    let counted = Box::new(Counted {
        parent: raw::git_smart_subtransport_stream { subtransport: sub, read: Some(read), write: Some(write), free: Some(free_stream) },
        inner: stream,
        lines: Lines::default(),
    });
    // SAFETY: as above; `parent` is the first field.
    unsafe { *out = Box::into_raw(counted) as *mut raw::git_smart_subtransport_stream };
    0
}

extern "C" fn close(sub: *mut raw::git_smart_subtransport) -> c_int {
    // SAFETY: `sub` is a `Counting` we made.
    let inner = unsafe { (*(sub as *mut Counting)).inner };
    // SAFETY: libgit2's subtransport, called as libgit2 would.
    unsafe { (*inner).close.map_or(0, |close| close(inner)) }
}

extern "C" fn free(sub: *mut raw::git_smart_subtransport) {
    // SAFETY: `sub` is a `Counting` we made with `Box::into_raw`, freed once, here.
    let counting = unsafe { Box::from_raw(sub as *mut Counting) };
    // SAFETY: libgit2's subtransport, freed as libgit2 would.
    unsafe {
        if let Some(free) = (*counting.inner).free {
            free(counting.inner);
        }
    }
}

/// A ref listing's stream, counted.
#[repr(C)]
struct Counted {
    parent: raw::git_smart_subtransport_stream,
    inner: *mut raw::git_smart_subtransport_stream,
    lines: Lines,
}

extern "C" fn read(stream: *mut raw::git_smart_subtransport_stream, buffer: *mut c_char, size: usize, bytes_read: *mut usize) -> c_int {
    // SAFETY: `stream` is a `Counted` we made.
    let counted = unsafe { &mut *(stream as *mut Counted) };
    // SAFETY: libgit2's stream, read as libgit2 would.
    let rc = unsafe { ((*counted.inner).read.expect("libgit2's read"))(counted.inner, buffer, size, bytes_read) };
    if rc != 0 {
        return rc;
    }
    // SAFETY: the inner read wrote `*bytes_read` bytes (at most `size`) into `buffer`.
    let got = unsafe { std::slice::from_raw_parts(buffer as *const u8, (*bytes_read).min(size)) };
    if counted.lines.take(got) {
        CUT_AT_LINES.store(counted.lines.lines.max(1), Ordering::SeqCst);
        let message = format!("the server's list of refs passed {MAX_LINES} lines or {MAX_BYTES} bytes");
        let message = std::ffi::CString::new(message).expect("no NUL");
        // SAFETY: a NUL-terminated message, copied by libgit2.
        unsafe { raw::git_error_set_str(raw::GIT_ERROR_NET as c_int, message.as_ptr()) };
        return -1;
    }
    0
}

extern "C" fn write(stream: *mut raw::git_smart_subtransport_stream, buffer: *const c_char, len: usize) -> c_int {
    // SAFETY: `stream` is a `Counted` we made; libgit2's stream, written as libgit2 would.
    unsafe {
        let inner = (*(stream as *mut Counted)).inner;
        ((*inner).write.expect("libgit2's write"))(inner, buffer, len)
    }
}

extern "C" fn free_stream(stream: *mut raw::git_smart_subtransport_stream) {
    // SAFETY: a `Counted` we made with `Box::into_raw`, freed once, here.
    let counted = unsafe { Box::from_raw(stream as *mut Counted) };
    // SAFETY: libgit2's stream, freed as libgit2 would.
    unsafe {
        if let Some(free) = (*counted.inner).free {
            free(counted.inner);
        }
    }
}

/// Pkt-lines counted as their bytes pass: each is a 4-hex-digit length (of the whole line;
/// `0000`-`0003` are markers without a payload) and its payload.
#[derive(Default)]
struct Lines {
    lines: usize,
    bytes: usize,
    /// Hex digits of the length being read.
    head: Vec<u8>,
    /// Payload bytes still to pass of the current line.
    left: usize,
}

impl Lines {
    /// Counts `bytes`; true once past a bound. A length that is not hex is left for
    /// libgit2 to refuse.
    fn take(&mut self, mut bytes: &[u8]) -> bool {
        self.bytes = self.bytes.saturating_add(bytes.len());
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (4 - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.head.len() == 4 {
                let len = std::str::from_utf8(&self.head).ok().and_then(|h| usize::from_str_radix(h, 16).ok()).unwrap_or(0);
                self.head.clear();
                if len >= 4 {
                    self.lines += 1;
                    self.left = len - 4;
                }
            }
        }
        self.lines > MAX_LINES || self.bytes > MAX_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkt_lines_are_counted_across_reads() {
        let mut l = Lines::default();
        let text = b"001e# service=git-upload-pack\n0000003d0123456789012345678901234567890123456789 refs/heads/main\n";
        // Byte by byte: split anywhere, counted the same.
        for b in text.iter() {
            assert!(!l.take(std::slice::from_ref(b)));
        }
        assert_eq!((l.lines, l.left, l.head.len()), (2, 0, 0));
        let line = b"0009abcd\n";
        let mut l = Lines::default();
        let many: Vec<u8> = line.iter().copied().cycle().take(line.len() * MAX_LINES).collect();
        assert!(!l.take(&many));
        assert!(l.take(line), "one line past the bound");
    }
}
