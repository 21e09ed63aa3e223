//! The agent's socket to the edge, its writes metered: when the link last took a byte.
//! A send is given up once the link has taken none for its bound (two heartbeat
//! intervals), whatever the frame's size ([`crate::connection`]) — as the native edge
//! meters what it reads from an agent (`edge/native/src/socket.rs::Metered`) to hear a
//! large frame arriving as a sign of life.
//!
//! Why: bounded by the frame's size at the slowest uplink served (two intervals and 16
//! KiB/s), a send on a slower link that still moved was given up as stuck, and the same
//! result went first again at every reconnect; and a stuck link under a result of 8 MiB
//! was found only after nine minutes. A link that takes bytes, however slowly, is not
//! stuck; one that takes none for two intervals is, whatever is left to send.
//!
//! Read on the boot clock ([`crate::boot_clock`]): a machine suspended mid-write took no
//! byte all that time, as the edge, whose clock ran on, saw it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use crate::boot_clock::BootInstant;

/// When the socket's writes last took bytes, read while a write is under way.
#[derive(Clone)]
pub struct Meter(Arc<Mutex<BootInstant>>);

impl Meter {
    /// When a write last took bytes (or when the socket was made).
    pub fn last_taken(&self) -> BootInstant {
        *self.0.lock().expect("meter lock")
    }

    fn took(&self) {
        *self.0.lock().expect("meter lock") = BootInstant::now();
    }
}

/// A stream whose writes tell its [`Meter`] when they take bytes.
pub struct Metered<S> {
    inner: S,
    meter: Meter,
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Metered { inner, meter: Meter(Arc::new(Mutex::new(BootInstant::now()))) }
    }

    pub fn meter(&self) -> Meter {
        self.meter.clone()
    }

    fn counted(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = &written {
            if *n > 0 {
                self.meter.took();
            }
        }
        written
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.counted(written)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.counted(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
