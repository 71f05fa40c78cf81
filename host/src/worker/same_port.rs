//! Same port: in a plugin group that a gateway group takes WebSocket clients from
//! (`upgrade_from`), each new connection's first request line is looked at, without reading it,
//! before hyper serves the connection. `GET <upgrade_path>` passes the connection, unread, to a
//! process of that gateway group ([`handoff::pass`]), which reads the upgrade request itself;
//! anything else is served here as usual.
//!
//! Owns that decision and its bounds: only the first request of a connection is looked at (a
//! later one on a keep-alive connection reaches the plugin), at most the longest path plus the
//! method's bytes are peeked, within `header_read_timeout`; a connection no gateway process
//! takes is answered `503` and counted (`host_limit_hits{limit="gateway_handoff"}`). It never
//! reads from the connection and never serves HTTP.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::counters::{Counters, Limit};
use crate::gateway::handoff;
use crate::protocol::GatewayHandoff;
use crate::ratelimit::RateLimit;

/// What became of a connection.
pub(super) enum Route {
    /// Not for a gateway: serve it here.
    Http,
    /// A gateway process has it now (or it was answered `503`, or the client left).
    Done,
    /// No first request line within `header_read_timeout`: close it.
    TimedOut,
}

/// This worker's same-port paths.
pub(super) struct SamePort {
    routes: Vec<GatewayHandoff>,
    /// Bytes to peek: enough for `GET `, the longest path, and the byte after it.
    peek: usize,
    timeout: Duration,
    /// Where the next hand-off starts looking (round robin over a group's processes).
    next: AtomicUsize,
}

/// What the bytes seen so far say.
#[derive(Debug, PartialEq)]
enum Decision {
    NeedMore,
    Http,
    /// To the route at this index.
    Gateway(usize),
}

impl SamePort {
    /// `None` when no gateway takes clients from this worker's group.
    pub(super) fn new(routes: &[GatewayHandoff], timeout: Duration) -> Option<SamePort> {
        let longest = routes.iter().map(|r| r.path.len()).max()?;
        Some(SamePort {
            routes: routes.to_vec(),
            peek: b"GET ".len() + longest + 1,
            timeout,
            next: AtomicUsize::new(0),
        })
    }

    /// Looks at `stream`'s first request line and passes it to a gateway if it asks for one of
    /// the routes' paths.
    pub(super) async fn route(&self, stream: &TcpStream, counters: Option<&Counters>) -> Route {
        let mut buf = vec![0u8; self.peek];
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut seen = 0;
        let decision = loop {
            match tokio::time::timeout_at(deadline, peek_more(stream, &mut buf, seen)).await {
                Err(_) => return Route::TimedOut,
                Ok(Err(_)) | Ok(Ok(0)) => return Route::Done,
                Ok(Ok(n)) => seen = n,
            }
            match decide(&buf[..seen], seen == buf.len(), &self.routes) {
                Decision::NeedMore => continue,
                decision => break decision,
            }
        };
        let Decision::Gateway(i) = decision else {
            return Route::Http;
        };
        let sockets = &self.routes[i].sockets;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = handoff::pass(stream.as_raw_fd(), sockets, start) {
            static FAILED: RateLimit = RateLimit::per_second();
            if let Some(c) = counters {
                c.limit_hit(Limit::GatewayHandoff);
            }
            if let Some(suppressed) = FAILED.hit(&e) {
                tracing::warn!(
                    path = %self.routes[i].path,
                    error = %e,
                    suppressed,
                    "no gateway process took a WebSocket client: answered 503"
                );
            }
            unavailable(stream).await;
        }
        Route::Done
    }
}

/// Waits until the socket holds more than `seen` bytes, then peeks them (0: the client
/// closed).
async fn peek_more(stream: &TcpStream, buf: &mut [u8], seen: usize) -> std::io::Result<usize> {
    let fd = stream.as_raw_fd();
    loop {
        stream.readable().await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = recv(fd, buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)?;
            if n > seen || n == 0 {
                Ok(n)
            } else {
                // Nothing new: clear the readiness and wait for the next bytes.
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        });
        match peeked {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// `GET <path>` with `path` one of the routes' (the query not counted), from the first bytes
/// of a connection; `full`: no more will be looked at.
fn decide(bytes: &[u8], full: bool, routes: &[GatewayHandoff]) -> Decision {
    const GET: &[u8] = b"GET ";
    if bytes.len() < GET.len() {
        return match GET.starts_with(bytes) {
            true if !full => Decision::NeedMore,
            _ => Decision::Http,
        };
    }
    if !bytes.starts_with(GET) {
        return Decision::Http;
    }
    let target = &bytes[GET.len()..];
    let Some(end) = target
        .iter()
        .position(|b| matches!(b, b' ' | b'?' | b'\r' | b'\n'))
    else {
        return if full {
            Decision::Http
        } else {
            Decision::NeedMore
        };
    };
    let path = &target[..end];
    routes
        .iter()
        .position(|r| r.path.as_bytes() == path)
        .map_or(Decision::Http, Decision::Gateway)
}

/// Answers `503` to a client no gateway took (it sent an upgrade request; it gets a status).
async fn unavailable(stream: &TcpStream) {
    const ANSWER: &[u8] =
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let write = async {
        let mut at = 0;
        while at < ANSWER.len() {
            stream.writable().await?;
            match stream.try_write(&ANSWER[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<GatewayHandoff> {
        ["/chat", "/ws/live"]
            .iter()
            .map(|p| GatewayHandoff {
                path: p.to_string(),
                sockets: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn only_a_get_of_a_routed_path_goes_to_a_gateway() {
        let r = routes();
        let d = |bytes: &[u8], full| decide(bytes, full, &r);
        assert_eq!(d(b"GET /chat HTTP/1.1\r\n", false), Decision::Gateway(0));
        assert_eq!(d(b"GET /chat?room=a HTTP/1.1", false), Decision::Gateway(0));
        assert_eq!(d(b"GET /ws/live ", false), Decision::Gateway(1));
        assert_eq!(d(b"GET /chat/x HTTP/1.1", false), Decision::Http);
        assert_eq!(d(b"GET /cha HTTP/1.1", false), Decision::Http);
        assert_eq!(d(b"POST /chat HTTP/1.1", false), Decision::Http);
        assert_eq!(d(b"PRI * HTTP/2.0\r\n", false), Decision::Http);
        assert_eq!(d(b"P", false), Decision::Http, "decided on the first byte");
        // Partial: wait for more, unless nothing more will be looked at.
        assert_eq!(d(b"GE", false), Decision::NeedMore);
        assert_eq!(d(b"GET /ch", false), Decision::NeedMore);
        assert_eq!(d(b"GET /chatroom", true), Decision::Http);
        assert_eq!(d(b"", false), Decision::NeedMore);
    }
}
