//! systemd's watchdog (`WatchdogSec=` in the agent's unit): the agent tells systemd it is
//! alive, from its runtime thread, at half the interval systemd asks for. An agent whose
//! runtime stops — stopped with SIGSTOP (a job runs as the agent's user and can send it),
//! or stuck — stops telling, and systemd kills it and starts it again, where before it
//! sat there, its jobs held and no new one taken, until a person noticed.
//!
//! Nothing here without systemd: the pings go only where `NOTIFY_SOCKET` points, at the
//! pace `WATCHDOG_USEC` says, and only when `WATCHDOG_PID` (if set) is this process.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// What systemd asked for, read from the environment: where to tell it, and how often.
#[derive(Debug, PartialEq)]
pub struct Asked {
    socket: String,
    every: Duration,
}

/// The watchdog systemd asked this process for, if it did (`get`: the environment).
pub fn asked(get: impl Fn(&str) -> Option<String>, pid: u32) -> Option<Asked> {
    let socket = get("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
    let usec: u64 = get("WATCHDOG_USEC")?.trim().parse().ok().filter(|&u| u > 0)?;
    // Set for the service's main process; a process it started (inheriting the
    // environment) is not the one systemd watches.
    if let Some(watched) = get("WATCHDOG_PID") {
        if watched.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    // Half the interval, as sd_watchdog_enabled(3) advises; never faster than 10 a second.
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    Some(Asked { socket, every })
}

/// Starts the pings on the current runtime when systemd asked for them (logged either
/// way at debug level); `None` when it did not, or the socket cannot be made.
pub fn start() -> Option<tokio::task::JoinHandle<()>> {
    let asked = asked(|name| std::env::var(name).ok(), std::process::id())?;
    let sock = match UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s)) {
        Ok(sock) => sock,
        Err(e) => {
            tracing::warn!(error = %e, "systemd asked for a watchdog, and the socket to tell it on could not be made: it will restart the agent");
            return None;
        }
    };
    tracing::info!(every_ms = asked.every.as_millis() as u64, "telling systemd's watchdog the agent is alive");
    Some(tokio::spawn(async move {
        let mut said_failure = false;
        loop {
            // Non-blocking: a full socket buffer skips one ping, never holds the runtime.
            if let Err(e) = send(&sock, &asked.socket, b"WATCHDOG=1") {
                if !said_failure {
                    tracing::warn!(error = %e, socket = %asked.socket, "could not tell systemd's watchdog the agent is alive");
                    said_failure = true;
                }
            }
            tokio::time::sleep(asked.every).await;
        }
    }))
}

/// One datagram to `socket`: a path, or a name in the abstract namespace (`@name`).
fn send(sock: &UnixDatagram, socket: &str, message: &[u8]) -> std::io::Result<usize> {
    match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(message, &addr)
        }
        None => sock.send_to(message, socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn only_what_systemd_asked_of_this_process() {
        let asked_of = |vars: &[(&str, &str)]| asked(env(vars), 42);
        assert_eq!(asked_of(&[("NOTIFY_SOCKET", "/run/systemd/notify"), ("WATCHDOG_USEC", "30000000")]), Some(Asked { socket: "/run/systemd/notify".into(), every: Duration::from_secs(15) }));
        assert!(asked_of(&[("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "42")]).is_some());
        // Another process's watchdog (inherited), none asked, or nowhere to tell.
        assert_eq!(asked_of(&[("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "7")]), None);
        assert_eq!(asked_of(&[("NOTIFY_SOCKET", "@x")]), None);
        assert_eq!(asked_of(&[("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "0")]), None);
        assert_eq!(asked_of(&[("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "soon")]), None);
        assert_eq!(asked_of(&[("WATCHDOG_USEC", "30000000")]), None);
        // Never faster than 10 pings a second.
        assert_eq!(asked_of(&[("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "2")]).unwrap().every, Duration::from_millis(100));
    }

    /// The pings reach a socket where `NOTIFY_SOCKET` points, a path or an abstract name.
    #[test]
    fn a_ping_reaches_the_socket_by_path_and_by_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let dir = std::env::temp_dir().join(format!("cr-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let by_path = UnixDatagram::bind(&path).unwrap();
        let name = format!("cr-watchdog-{}", std::process::id());
        let by_name = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        send(&sock, path.to_str().unwrap(), b"WATCHDOG=1").unwrap();
        send(&sock, &format!("@{name}"), b"WATCHDOG=1").unwrap();
        let mut buf = [0; 64];
        for receiver in [&by_path, &by_name] {
            let n = receiver.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
