//! The listening socket, built by hand for its backlog: the accept queue of connections the
//! kernel has taken and the edge not yet. At the default (128, what `TcpListener::bind`
//! asks) a burst of agents reconnecting after an edge restart (issue 11: 200 at once)
//! overflowed it, and each SYN dropped cost its agent a second or more (the SYN's
//! retransmission) before it tried again.

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpSocket};

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
