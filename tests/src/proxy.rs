//! A TCP proxy on loopback for fault injection between agents and an edge. Each accepted
//! connection is piped to the target port in both directions; on command the proxy
//! black-holes one direction of every live connection (bytes are read and dropped, no
//! FIN or RST passes: a true half-open link, as after a network cut), or resets every
//! connection (RST both ways), or pauses one direction (nothing more is read from its
//! sender, whose writes block once the sockets' buffers are full, as on a link slower than
//! the sender: a stall, then [`Proxy::resume`]). New connections start healthy.
//!
//! A cut may also wait for an event on the link itself ([`Proxy::blackhole_when`]): the
//! first bytes one way that carry a pattern (the edge's WebSocket frames to the agent are
//! not masked, so an order's `{"type":"job"` shows as such) cut the other way before they
//! pass — no fixed wait for the moment to arrive.
//!
//! One direction may be throttled ([`Proxy::throttle`]): every connection, live or new,
//! passes at most so many bytes a second that way, as a slow uplink does. And it may read
//! ahead ([`Proxy::read_ahead`]): take what its sender writes at once, up to so many
//! bytes held, and pass it on at the throttled rate — as ssh -L, a local proxy or a slow
//! uplink's deep buffers do, where a sender's large write is done long before its bytes
//! arrive.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Agent (client) → edge (target).
    Up,
    /// Edge → agent.
    Down,
}

/// A cut waiting for a pattern to pass.
struct Watch {
    pattern: Vec<u8>,
    mute: Arc<AtomicBool>,
}

type Watched = Arc<Mutex<Option<Watch>>>;

struct Link {
    up: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    /// Whether each direction (up, down) is paused.
    paused: [Arc<tokio::sync::watch::Sender<bool>>; 2],
    /// What each direction's pump watches for (up, down).
    watches: [Watched; 2],
    fds: [RawFd; 2],
    tasks: Vec<JoinHandle<()>>,
}

/// Bytes a second each direction (up, down) passes at most; 0: as fast as it goes. And the
/// bytes each reads ahead of what it passed; 0: none.
#[derive(Default)]
struct Pace {
    rates: [AtomicU64; 2],
    ahead: [AtomicU64; 2],
    /// Bytes taken from each direction's senders, over every connection.
    taken: [AtomicU64; 2],
}

type Rates = Arc<Pace>;

pub struct Proxy {
    port: u16,
    links: Arc<Mutex<Vec<Link>>>,
    rates: Rates,
    accepted: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let port = listener.local_addr().unwrap().port();
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let rates: Rates = Arc::default();
        let (l, a, r) = (links.clone(), accepted.clone(), rates.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let fds = [client.as_raw_fd(), server.as_raw_fd()];
                let (up, down) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let ended = Arc::new(tokio::sync::Notify::new());
                let watches: [Watched; 2] = Default::default();
                let paused = [Arc::new(tokio::sync::watch::channel(false).0), Arc::new(tokio::sync::watch::channel(false).0)];
                let tasks = vec![
                    tokio::spawn(pump(cr, sw, up.clone(), watches[0].clone(), paused[0].subscribe(), (r.clone(), 0), ended.clone())),
                    tokio::spawn(pump(sr, cw, down.clone(), watches[1].clone(), paused[1].subscribe(), (r.clone(), 1), ended)),
                ];
                let mut links = l.lock().unwrap();
                links.retain(|link| link.tasks.iter().any(|t| !t.is_finished()));
                links.push(Link { up, down, paused, watches, fds, tasks });
            }
        });
        Proxy { port, links, rates, accept, accepted }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on every connection, live or new, passes at most `bytes_per_sec` going
    /// `direction` (0: no limit), as a slow link does.
    pub fn throttle(&self, direction: Direction, bytes_per_sec: u64) {
        self.rates.rates[(direction == Direction::Down) as usize].store(bytes_per_sec, Ordering::Relaxed);
    }

    /// From now on every connection, live or new, reads what goes `direction` as soon as
    /// it comes, holding up to `bytes` not passed yet (0: none, as before), and passes it
    /// on at the throttled rate ([`Proxy::throttle`]): its sender's writes end long before
    /// the bytes arrive. A connection reading ahead is no longer paused by
    /// [`Proxy::pause`].
    pub fn read_ahead(&self, direction: Direction, bytes: u64) {
        self.rates.ahead[(direction == Direction::Down) as usize].store(bytes, Ordering::Relaxed);
    }

    /// Bytes taken so far from what goes `direction` (read from its senders, over every
    /// connection), passed on or not yet: with [`Proxy::read_ahead`], a sign that a large
    /// write is done, its bytes in the proxy.
    pub fn taken(&self, direction: Direction) -> u64 {
        self.rates.taken[(direction == Direction::Down) as usize].load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Live connections.
    pub fn live(&self) -> usize {
        self.links.lock().unwrap().iter().filter(|l| l.tasks.iter().any(|t| !t.is_finished())).count()
    }

    /// From now on, every live connection drops what goes `direction`.
    pub fn blackhole(&self, direction: Direction) -> usize {
        let links = self.links.lock().unwrap();
        for link in links.iter() {
            match direction {
                Direction::Up => link.up.store(true, Ordering::Relaxed),
                Direction::Down => link.down.store(true, Ordering::Relaxed),
            }
        }
        links.len()
    }

    /// On every live connection, the first bytes going `seen` that carry `pattern` make it
    /// drop what goes `mute` from then on, as [`Proxy::blackhole`] — before those bytes
    /// pass, so nothing the far end sends in answer to them gets through. Returns the
    /// connections armed.
    pub fn blackhole_when(&self, seen: Direction, pattern: &str, mute: Direction) -> usize {
        let links = self.links.lock().unwrap();
        for link in links.iter() {
            let flag = match mute {
                Direction::Up => link.up.clone(),
                Direction::Down => link.down.clone(),
            };
            let watch = &link.watches[(seen == Direction::Down) as usize];
            *watch.lock().unwrap() = Some(Watch { pattern: pattern.as_bytes().to_vec(), mute: flag });
        }
        links.len()
    }

    /// From now on, every live connection stops reading what goes `direction` (it waits in
    /// the sockets' buffers, and the sender's writes block once they are full), until
    /// [`Proxy::resume`]. Returns the connections paused.
    pub fn pause(&self, direction: Direction) -> usize {
        self.set_paused(direction, true)
    }

    /// Every connection paused `direction` passes it again.
    pub fn resume(&self, direction: Direction) -> usize {
        self.set_paused(direction, false)
    }

    fn set_paused(&self, direction: Direction, paused: bool) -> usize {
        let links = self.links.lock().unwrap();
        for link in links.iter() {
            link.paused[(direction == Direction::Down) as usize].send_replace(paused);
        }
        links.len()
    }

    /// Resets every live connection: both peers get an RST.
    pub fn reset(&self) -> usize {
        let mut links = self.links.lock().unwrap();
        let n = links.len();
        for link in links.drain(..) {
            for fd in link.fds {
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                // SAFETY: setsockopt on a socket this link still owns (its tasks hold it).
                unsafe {
                    libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&linger as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as u32);
                }
            }
            // Dropping the halves closes the sockets, with an RST thanks to the linger.
            for task in link.tasks {
                task.abort();
            }
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().unwrap().drain(..) {
            for task in link.tasks {
                task.abort();
            }
        }
    }
}

/// Copies `from` to `to` until `from` ends; once `holed`, reads and drops instead, and
/// passes no end of stream either; while `paused`, reads nothing. Bytes that carry what
/// `watch` waits for set its cut before they pass.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    holed: Arc<AtomicBool>,
    watch: Watched,
    mut paused: tokio::sync::watch::Receiver<bool>,
    (rates, way): (Rates, usize),
    ended: Arc<tokio::sync::Notify>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // The end of what passed before, for a pattern split between two reads.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        if rates.ahead[way].load(Ordering::Relaxed) > 0 {
            read_ahead(&mut from, &mut to, &holed, &watch, (&rates, way), &mut tail).await;
            break;
        }
        if paused.wait_for(|p| !*p).await.is_err() {
            break;
        }
        // Throttled: a tenth of a second's worth at a time, then the rest of that tenth.
        let rate = rates.rates[way].load(Ordering::Relaxed);
        let most = match rate {
            0 => buf.len(),
            rate => usize::try_from(rate / 10).unwrap_or(usize::MAX).clamp(1, buf.len()),
        };
        let n = match from.read(&mut buf[..most]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        rates.taken[way].fetch_add(n as u64, Ordering::Relaxed);
        if rate > 0 {
            tokio::time::sleep(std::time::Duration::from_micros(n as u64 * 1_000_000 / rate)).await;
        }
        watch_for(&watch, &mut tail, &buf[..n]);
        if holed.load(Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if holed.load(Ordering::Relaxed) {
        // A dead link passes nothing, not even its end: the write half stays open until
        // the other direction is over too.
        ended.notified().await;
    } else {
        let _ = to.shutdown().await;
    }
    ended.notify_one();
}

/// [`pump`] reading ahead ([`Proxy::read_ahead`]) until `from` ends and what it held is
/// passed (or `to` fails): reads while it holds less than the read-ahead, and passes a
/// tenth of a second's worth at a time at the throttled rate.
async fn read_ahead(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    holed: &AtomicBool,
    watch: &Watched,
    (rates, way): (&Pace, usize),
    tail: &mut Vec<u8>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut held = std::collections::VecDeque::<u8>::new();
    let mut open = true;
    let mut next = tokio::time::Instant::now();
    while open || !held.is_empty() {
        let ahead = usize::try_from(rates.ahead[way].load(Ordering::Relaxed)).unwrap_or(usize::MAX).max(1);
        let room = ahead.saturating_sub(held.len()).min(buf.len());
        tokio::select! {
            read = from.read(&mut buf[..room]), if open && room > 0 => match read {
                Ok(0) | Err(_) => open = false,
                Ok(n) => {
                    rates.taken[way].fetch_add(n as u64, Ordering::Relaxed);
                    watch_for(watch, tail, &buf[..n]);
                    if !holed.load(Ordering::Relaxed) {
                        held.extend(&buf[..n]);
                    }
                }
            },
            _ = tokio::time::sleep_until(next), if !held.is_empty() => {
                let rate = rates.rates[way].load(Ordering::Relaxed);
                let n = match rate {
                    0 => held.len(),
                    rate => usize::try_from(rate / 10).unwrap_or(usize::MAX).clamp(1, held.len()),
                };
                let chunk: Vec<u8> = held.drain(..n).collect();
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
                if rate > 0 {
                    next = tokio::time::Instant::now() + std::time::Duration::from_micros(n as u64 * 1_000_000 / rate);
                }
            }
        }
    }
}

/// Looks for what `watch` waits for in `chunk`, after `tail` (the end of what passed
/// before it); when found, makes its cut and ends the watch.
fn watch_for(watch: &Watched, tail: &mut Vec<u8>, chunk: &[u8]) {
    let mut armed = watch.lock().unwrap();
    let Some(w) = armed.as_ref() else {
        tail.clear();
        return;
    };
    tail.extend_from_slice(chunk);
    if tail.windows(w.pattern.len().max(1)).any(|win| win == w.pattern.as_slice()) {
        w.mute.store(true, Ordering::Relaxed);
        *armed = None;
        tail.clear();
    } else {
        let keep = w.pattern.len().saturating_sub(1);
        tail.drain(..tail.len().saturating_sub(keep));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_split_between_reads_still_cuts_once() {
        let mute = Arc::new(AtomicBool::new(false));
        let watch: Watched = Arc::new(Mutex::new(Some(Watch { pattern: br#"{"type":"job""#.to_vec(), mute: mute.clone() })));
        let mut tail = Vec::new();
        watch_for(&watch, &mut tail, b"\x81\x7e\x01\x00{\"type\":\"heartbeat_ack\"}\x81\x7e{\"ty");
        assert!(!mute.load(Ordering::Relaxed));
        watch_for(&watch, &mut tail, b"pe\":\"j");
        assert!(!mute.load(Ordering::Relaxed));
        watch_for(&watch, &mut tail, b"ob\",\"envelope\":{}}");
        assert!(mute.load(Ordering::Relaxed), "the order was seen");
        assert!(watch.lock().unwrap().is_none(), "a watch cuts once");
    }
}
