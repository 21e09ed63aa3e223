//! A TCP proxy on loopback for fault injection between agents and an edge. Each accepted
//! connection is piped to the target port in both directions; on command the proxy
//! black-holes one direction of every live connection (bytes are read and dropped, no
//! FIN or RST passes: a true half-open link, as after a network cut), or resets every
//! connection (RST both ways). New connections start healthy.

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

struct Link {
    up: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    fds: [RawFd; 2],
    tasks: Vec<JoinHandle<()>>,
}

pub struct Proxy {
    port: u16,
    links: Arc<Mutex<Vec<Link>>>,
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
        let (l, a) = (links.clone(), accepted.clone());
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
                let tasks = vec![
                    tokio::spawn(pump(cr, sw, up.clone(), ended.clone())),
                    tokio::spawn(pump(sr, cw, down.clone(), ended)),
                ];
                let mut links = l.lock().unwrap();
                links.retain(|link| link.tasks.iter().any(|t| !t.is_finished()));
                links.push(Link { up, down, fds, tasks });
            }
        });
        Proxy { port, links, accepted, accept }
    }

    pub fn port(&self) -> u16 {
        self.port
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
/// passes no end of stream either.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    holed: Arc<AtomicBool>,
    ended: Arc<tokio::sync::Notify>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
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
