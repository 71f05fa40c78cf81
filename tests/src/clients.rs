//! Real HTTP clients (hyper's, over TCP): one GET on a new connection, GETs on one kept-alive
//! connection, HTTP/2 with prior knowledge, and a server-sent event stream read event by event.
//! What a request's outcome means (processed or not) is decided here, once, for these and for
//! the load generator (`crate::load`). This module never starts a host.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One GET's outcome.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub close: bool,
    pub retry_after: Option<String>,
}

impl Reply {
    pub fn first_line(&self) -> &str {
        self.body.lines().next().unwrap_or("")
    }
}

/// A client connection: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
pub(crate) enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    pub(crate) async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }
}

pub(crate) async fn connect_with(addr: SocketAddr, h2: bool) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }
}

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    connect_with(addr, false).await
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server never processed it (an HTTP/2 stream refused after GOAWAY, or a connection
    /// closed before the request was written): clients retry these by spec.
    Unprocessed(String),
    Failed(String),
}

pub(crate) async fn send(
    sender: &mut Sender,
    addr: SocketAddr,
    path: &str,
    close: bool,
) -> Result<Reply, Failure> {
    let resp = match sender {
        Sender::H1(s) => {
            let mut req = http::Request::get(path).header(http::header::HOST, addr.to_string());
            if close {
                req = req.header(http::header::CONNECTION, "close");
            }
            s.send_request(req.body(Empty::new()).unwrap()).await
        }
        Sender::H2(s) => {
            let req =
                http::Request::get(format!("http://{addr}{path}")).version(http::Version::HTTP_2);
            s.send_request(req.body(Empty::new()).unwrap()).await
        }
    }
    .map_err(|e| {
        // An HTTP/2 stream failed with GOAWAY was above the server's last processed stream id
        // (RFC 9113, 6.8): never processed. `Canceled` means it was never sent.
        let refused = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .is_some_and(|h| h.is_go_away() && h.is_remote());
        if e.is_canceled() || refused {
            Failure::Unprocessed(format!("request: {e:?}"))
        } else {
            Failure::Failed(format!("request: {e:?}"))
        }
    })?;
    let status = resp.status().as_u16();
    let close = resp
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Failed(format!("body: {e}")))?
        .to_bytes();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
        retry_after,
    })
}

/// One GET on a new connection with `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let mut sender = connect(addr).await?;
    send(&mut sender, addr, path, true)
        .await
        .map_err(|e| format!("{e:?}"))
}

/// GETs of `paths` one after the other on one kept-alive connection (so one worker answers
/// them all), the last with `Connection: close`.
pub async fn get_on_one_connection(addr: SocketAddr, paths: &[&str]) -> Result<Vec<Reply>, String> {
    let mut sender = connect(addr).await?;
    let mut replies = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let reply = send(&mut sender, addr, path, i + 1 == paths.len())
            .await
            .map_err(|e| format!("GET {path}: {e:?}"))?;
        if reply.close && i + 1 < paths.len() {
            return Err(format!("GET {path}: the server closed the connection"));
        }
        replies.push(reply);
    }
    Ok(replies)
}

/// A server-sent event stream, read event by event.
pub struct Events {
    body: hyper::body::Incoming,
    pending: String,
}

impl Events {
    pub async fn open(addr: SocketAddr) -> Events {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("/events")
            .header(http::header::HOST, "t")
            .header(http::header::ACCEPT, "text/event-stream")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "text/event-stream"
        );
        assert_eq!(resp.headers()[http::header::TRANSFER_ENCODING], "chunked");
        Events {
            body: resp.into_body(),
            pending: String::new(),
        }
    }

    /// The next event (up to its blank line), or `None` at a clean end of the stream. A
    /// transport error, or 10 s without a frame, fails the test.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.pending.find("\n\n") {
                let event = self.pending[..i].to_string();
                self.pending.drain(..i + 2);
                return Some(event);
            }
            match tokio::time::timeout(Duration::from_secs(10), self.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => panic!("event stream failed: {e}"),
                Err(_) => panic!("no event within 10 s"),
            }
        }
    }
}
