//! Connections whose peer stopped taking bytes: each accepted socket is watched, and one
//! that could not be written to for [`WRITE_STALL_MS`] is ended with an error, so its
//! connection task, its file descriptor and whatever was queued for it go.
//!
//! Why: a follower (`GET /jobs/{id}/events`) that stops reading is dropped from its job
//! once it falls too far behind, but its connection only ends when its stream is polled,
//! and hyper polls it only when the socket takes bytes — never, for a peer that never
//! reads again. Each dropped follower also frees its place among the 64, so without this
//! a caller could stall followers one after another and pile up connections and their
//! queues without bound. A peer that reads, however slowly, makes progress and is kept.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// How long a write may wait for a peer that takes nothing before the connection is ended:
/// far past any pause of a live reader (a loaded machine, a Tunnel's buffering), far
/// short of letting stalled connections accumulate.
pub const WRITE_STALL_MS: u64 = 20_000;

/// An accepted connection as the edge serves it: TCP_NODELAY (agent frames and answers are
/// small and latency-bound; Nagle with delayed ACKs would add ~40 ms per job), watched for
/// a stalled peer.
pub fn watch(tcp: TcpStream) -> Watched<TcpStream> {
    let _ = tcp.set_nodelay(true);
    Watched::new(tcp, Duration::from_millis(WRITE_STALL_MS))
}

/// A caller's or agent's address, as the connection's info.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// An I/O stream whose writes fail once they have waited `limit` without the peer taking
/// a byte.
pub struct Watched<T> {
    io: T,
    limit: Duration,
    /// Set when a write first finds the peer taking nothing; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> Watched<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        Watched { io, limit, stalled: None }
    }

    /// What a write that made no progress answers: still waiting, or the error that ends
    /// the connection once it has waited too long.
    fn waited<R>(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer took nothing for {} ms; connection ended", limit.as_millis()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.waited(cx, written)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.waited(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        self.waited(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_after_the_limit_and_progress_resets_it() {
        let limit = Duration::from_millis(300);
        // A pipe whose reader takes nothing once its 64 bytes are full.
        let (writer, mut reader) = tokio::io::duplex(64);
        let mut watched = Watched::new(writer, limit);
        watched.write_all(&[1; 64]).await.unwrap();
        // A write finds the pipe full: the wait starts. Looked at once, not raced against a
        // timer of its own: a test thread paused past the limit (a loaded machine) saw both
        // timers due, and the write's, polled first, failed the test.
        let blocked = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut watched).poll_write(cx, &[2; 8]))).await;
        assert!(blocked.is_pending(), "the pipe is full");
        // The reader takes a little: progress, and the wait starts over. Past the first
        // wait's limit, so a wait that did not start over would end the next write at once.
        let mut some = [0u8; 8];
        reader.read_exact(&mut some).await.unwrap();
        tokio::time::sleep(limit).await;
        watched.write_all(&[3; 8]).await.expect("the peer took bytes: not stalled");
        // Full again and never read: the write fails, once it has waited the limit.
        let started = tokio::time::Instant::now();
        let err = watched.write_all(&[4; 8]).await.expect_err("a stalled peer ends the write");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit);
    }
}
