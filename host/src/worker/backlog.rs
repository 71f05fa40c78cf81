//! Connections whose client is already gone when the worker accepts them. It owns one check
//! made right after `accept` and the rate-limited line that counts what it dropped; it never
//! reads from a connection and never touches one that is still open both ways.
//!
//! Why: requests wait in the listen backlog while every worker is busy (or wedged by a handler
//! that never returns). Their clients time out and close, but the request bytes stay queued
//! behind the FIN, so the next worker to accept would read them and run the handler anyway:
//! a request that wedged the old workers, retried by impatient clients, wedged each replacement
//! as it came up. A connection whose peer has already shut down its side is dropped unread,
//! as nginx aborts a request whose client closed (its 499).
//!
//! The trade-off: a client that half-closes (`shutdown(SHUT_WR)`) right after sending its
//! request, and whose connection waited in the backlog long enough for the FIN to arrive
//! before the accept, is not served. HTTP/1.1 clients do not half-close (RFC 9112 §9.6 asks
//! them to keep reading); a connection accepted before its FIN arrives is served as usual.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Whether the peer of a just-accepted connection has already shut down its sending side (or
/// reset it). Asks `poll` with a zero timeout, so it never waits.
pub(super) fn client_gone(stream: &impl AsFd) -> bool {
    // nix names no `POLLRDHUP`, so it is passed by value; `revents` is `None` when the kernel
    // sets a bit nix has no name for, and POLLRDHUP is the only such bit asked for here.
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP as libc::c_short);
    let mut fds = [PollFd::new(stream.as_fd(), rdhup)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => match fds[0].revents() {
            None => true,
            Some(r) => r.intersects(rdhup | PollFlags::POLLHUP | PollFlags::POLLERR),
        },
        _ => false,
    }
}

/// Counts a connection dropped because its client was gone, and logs at most one line a
/// second with how many were dropped since the last line and in all.
pub(super) fn note_dropped() {
    static TOTAL: AtomicU64 = AtomicU64::new(0);
    static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();
    let total = TOTAL.fetch_add(1, Ordering::Relaxed) + 1;
    let cause = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
    if let Some(suppressed) = LOG.hit(&cause) {
        tracing::warn!(
            dropped = suppressed + 1,
            total,
            "dropped connections whose client closed before they were accepted (requests not read)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};

    #[test]
    fn a_closed_client_is_seen_an_open_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();

        // Sent a request and waits for the answer: served.
        let mut open = TcpStream::connect(addr).unwrap();
        open.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!client_gone(&accepted));

        // Sent a request and gave up (closed) while waiting in the backlog: dropped.
        let mut gone = TcpStream::connect(addr).unwrap();
        gone.write_all(b"GET /spin HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        drop(gone);
        // The FIN is in the kernel's hands once close returns on loopback; poll until seen.
        let (accepted_gone, _) = listener.accept().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !client_gone(&accepted_gone) {
            assert!(std::time::Instant::now() < deadline, "FIN never seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        // A half-close after the request counts as gone too (the documented trade-off).
        let half = TcpStream::connect(addr).unwrap();
        half.shutdown(Shutdown::Write).unwrap();
        let (accepted_half, _) = listener.accept().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !client_gone(&accepted_half) {
            assert!(
                std::time::Instant::now() < deadline,
                "half-close never seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!client_gone(&accepted), "the open one is still open");
        drop(open);
    }
}
