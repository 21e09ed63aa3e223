//! The listening socket, built by hand for its backlog: the accept queue of connections the
//! kernel has taken and the edge not yet. At the default (128, what `TcpListener::bind`
//! asks) a burst of agents reconnecting after an edge restart (issue 11: 200 at once)
//! overflowed it, and each SYN dropped cost its agent a second or more (the SYN's
//! retransmission) before it tried again. And each accepted socket's watch for a peer gone
//! without a word ([`watch_for_vanished_peer`]).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// An accepted connection that carries nothing for this long is probed (TCP keepalive):
/// `/execute` callers wait on a queued job in silence, and one gone without a FIN or a
/// reset (its machine off, its network cut, a NAT that forgot it) was never noticed —
/// the kernel's default probes after two hours — so its job stayed queued and started
/// later, for nobody, though its caller may have run it elsewhere (review rev36a, 3).
/// 30 s: a probe is one empty segment per idle connection, nothing to a peer that is
/// there, and half a minute is well within what NATs and load balancers keep an idle flow.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Probes unanswered before the kernel ends the connection: with the idle time, a vanished
/// peer of a quiet connection is noticed within a minute (30 + 3 × 10 s) — a blip of the
/// network shorter than that (a Wi-Fi roam) costs a live caller nothing.
pub const KEEPALIVE_PROBES: u32 = 3;
/// How long bytes the edge sent may stay unacknowledged before the kernel ends the
/// connection (`TCP_USER_TIMEOUT`, Linux). Keepalive probes only a connection with nothing
/// in flight: an event stream's keep-alive comments, or an `/execute`'s
/// (`EXECUTE_KEEPALIVE_MS`), to a vanished peer sit in the kernel's buffer and are sent
/// again for its retransmission bound, about 15 minutes, holding the stream's place among
/// the followers that long. A peer that is there acknowledges within a round trip — even
/// one that reads nothing (its window closes; `stall.rs` ends that one after 20 s) — so a
/// minute, as for a quiet connection, is generous.
pub const UNACKNOWLEDGED_FOR: Duration = Duration::from_secs(60);

/// Sets an accepted socket to notice a peer gone without a word ([`KEEPALIVE_IDLE`],
/// [`UNACKNOWLEDGED_FOR`]): the kernel then ends the connection, hyper's read or write
/// fails, and the edge lets its caller go (`HangUp`) as for one that closed.
pub fn watch_for_vanished_peer(tcp: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_FOR))?;
    Ok(())
}

/// The backlog asked for whatever `MAX_CONNECTIONS` (the old default): a small cap still
/// takes a burst of newcomers the edge then closes idle ones for.
const LEAST_BACKLOG: usize = 128;

/// Where the kernel says the most a listener's backlog may be (it cuts a larger one down
/// without a word).
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// The backlog for an edge that holds `max_connections`: room for all of them to arrive at
/// once (beyond that, the cap closes connections anyway), at least [`LEAST_BACKLOG`],
/// at most `somaxconn` (the kernel's bound; `None`: unread, the kernel bounds it itself).
pub fn backlog(max_connections: usize, somaxconn: Option<u32>) -> u32 {
    let wanted = u32::try_from(max_connections.max(LEAST_BACKLOG)).unwrap_or(u32::MAX).min(i32::MAX as u32);
    somaxconn.map_or(wanted, |most| wanted.min(most.max(1)))
}

/// The kernel's bound on a listener's backlog, if it can be read.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string(SOMAXCONN).ok()?.trim().parse().ok()
}

/// A listener on `addr` with `backlog`; as `TcpListener::bind` makes one otherwise
/// (`SO_REUSEADDR`, so a restarted edge binds while its old connections linger in
/// TIME_WAIT).
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// What to tell the operator when `LISTEN` (`addr`) takes connections from other machines:
/// anything but a loopback address — `0.0.0.0`, `::`, a LAN address — lets callers on the
/// network reach the edge, and anyone of them with the runner secret runs Claude, with its
/// tools, on the machine of the agent. Allowed (a container's port, a LAN on purpose), but
/// said: `claude-runner up` is a newcomer's and listened on a LAN address without a word.
/// `None` for a loopback address. One wording for both starters of a native edge.
pub fn reachable_from_the_network(addr: SocketAddr) -> Option<String> {
    if addr.ip().is_loopback() {
        return None;
    }
    let which = if addr.ip().is_unspecified() { "every address of this machine" } else { "an address other machines can reach" };
    Some(format!(
        "LISTEN {addr} is {which}: callers on the network can reach this edge, and anyone of them with the runner secret \
         runs Claude, with its tools, on the agent's machine. Set LISTEN=127.0.0.1:{port} to serve this machine alone",
        port = addr.port()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback is quiet; every other address is said, the unspecified ones as such.
    #[test]
    fn an_address_off_loopback_is_said_to_be_reachable() {
        for quiet in ["127.0.0.1:8787", "127.0.0.2:1", "[::1]:8787"] {
            assert_eq!(reachable_from_the_network(quiet.parse().unwrap()), None, "{quiet}");
        }
        for (open, says) in [("0.0.0.0:8787", "every address"), ("[::]:8787", "every address"), ("192.168.1.20:8787", "other machines")] {
            let said = reachable_from_the_network(open.parse().unwrap()).unwrap_or_else(|| panic!("{open} said nothing"));
            assert!(said.contains(says) && said.contains("runner secret") && said.contains("LISTEN=127.0.0.1:8787"), "{said}");
        }
    }

    /// An accepted socket probes a quiet peer after 30 s, three times 10 s apart, and gives
    /// up on bytes unacknowledged for a minute (rev36a, 3: none of it was set).
    #[tokio::test]
    async fn an_accepted_socket_is_watched_for_a_vanished_peer() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let _peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert!(!socket.keepalive().unwrap(), "off until set");
        watch_for_vanished_peer(&tcp).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(UNACKNOWLEDGED_FOR));
    }

    #[test]
    fn the_backlog_follows_the_cap_within_the_kernels_bound() {
        assert_eq!(backlog(700, Some(4096)), 700);
        assert_eq!(backlog(16_384, Some(4096)), 4096);
        assert_eq!(backlog(16_384, None), 16_384);
        // A small cap keeps the old default; a kernel bound below it wins.
        assert_eq!(backlog(2, Some(4096)), 128);
        assert_eq!(backlog(2, Some(64)), 64);
        assert_eq!(backlog(usize::MAX, None), i32::MAX as u32);
        assert_eq!(backlog(700, Some(0)), 1);
    }
}
