//! WebSocket on top of [`crate::upgrade`], with `tokio-tungstenite` (feature `websocket`).
//!
//! ```no_run
//! # use plugin_api::{Body, websocket::{self, Message}};
//! # use futures_util::{SinkExt, StreamExt};
//! fn ws(mut req: http::Request<Body>) -> http::Response<Body> {
//!     websocket::upgrade(&mut req, |mut socket| async move {
//!         while let Some(Ok(Message::Text(text))) = socket.next().await {
//!             if socket.send(Message::Text(text)).await.is_err() {
//!                 break;
//!             }
//!         }
//!     })
//! }
//! ```
//!
//! The handshake is checked here (RFC 6455 §4.2.1); the socket task runs on the plugin's
//! runtime. When the worker drains, a handler should close with [`close_for_restart`] (code
//! 1012, Service Restart) so its client reconnects to the new generation.
//!
//! **Limits.** tungstenite's defaults (64 MiB messages, 16 MiB frames, a 128 KiB read buffer
//! touched on the first read) let one client hold 61 MiB of the worker with a fragmented
//! message it never finishes, and make every idle socket cost 138 KiB. Here a socket is made
//! with [`Limits::default`]: messages up to [`MAX_MESSAGE`] (1 MiB), frames up to [`MAX_FRAME`]
//! (as large), a [`READ_BUFFER`] (4 KiB) read buffer, and at most [`MAX_WRITE_BUFFER`] of
//! outgoing frames buffered ahead of the socket. A larger incoming message or frame is refused:
//! the client gets Close 1009 (Message Too Big) and the handler gets the error
//! (`tungstenite::Error::Capacity`) as the stream's last item. Choose other limits with
//! [`upgrade_with`] (or `WebSocketUpgrade::limits` under axum).
//!
//! Owns the handshake checks, the socket's limits and the 1009 answer. Never reads or writes
//! the connection itself outside the socket (the host owns it, and its `send_timeout`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_core::Stream;
use futures_sink::Sink;

use http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub use tokio_tungstenite::tungstenite::protocol::CloseFrame;
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
pub use tokio_tungstenite::tungstenite::{self, Message};

use crate::Body;
use crate::upgrade::{OnUpgrade, Upgraded};

/// The largest incoming message by default: 1 MiB. A chat line, a JSON event or an RPC call fits
/// many times over; bulk transfers belong in HTTP bodies, which stream.
pub const MAX_MESSAGE: usize = 1 << 20;
/// The largest incoming frame by default: as large as a message. Browsers send every message as
/// one frame, so a smaller frame limit would refuse messages the message limit allows; the
/// memory a client can hold is bounded by the message limit either way.
pub const MAX_FRAME: usize = MAX_MESSAGE;
/// The read buffer: 4 KiB, touched on the first read. Larger frames grow it while they arrive.
pub const READ_BUFFER: usize = 4 << 10;
/// Outgoing frames are written to the connection once this much is buffered (or on flush).
pub const WRITE_BUFFER: usize = 4 << 10;
/// At most this much of outgoing frames buffered ahead of a connection that does not take
/// them: a send past it fails (`tungstenite::Error::WriteBufferFull`).
pub const MAX_WRITE_BUFFER: usize = 2 * MAX_MESSAGE + WRITE_BUFFER;

/// A WebSocket's size limits. [`Limits::default`] is what [`upgrade`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest incoming message, in bytes (all of its frames together).
    pub max_message: usize,
    /// Largest incoming frame, in bytes (payload). At most `max_message`.
    pub max_frame: usize,
    /// Read buffer, in bytes: the least a socket holds once it has read.
    pub read_buffer: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message: MAX_MESSAGE,
            max_frame: MAX_FRAME,
            read_buffer: READ_BUFFER,
        }
    }
}

impl Limits {
    /// Sets the largest incoming message (at least 1 byte; the frame limit follows it down).
    pub fn max_message(mut self, bytes: usize) -> Limits {
        self.max_message = bytes.max(1);
        self.max_frame = self.max_frame.min(self.max_message);
        self
    }

    /// Sets the largest incoming frame (at least 1 byte, at most the message limit).
    pub fn max_frame(mut self, bytes: usize) -> Limits {
        self.max_frame = bytes.clamp(1, self.max_message);
        self
    }

    /// Sets the read buffer (256 bytes to 1 MiB).
    pub fn read_buffer(mut self, bytes: usize) -> Limits {
        self.read_buffer = bytes.clamp(256, 1 << 20);
        self
    }

    /// tungstenite's settings; the fields are public, so they are brought into range here too.
    fn config(self) -> WebSocketConfig {
        let message = self.max_message.max(1);
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer.clamp(256, 1 << 20))
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(message.saturating_mul(2).saturating_add(WRITE_BUFFER))
            .max_message_size(Some(message))
            .max_frame_size(Some(self.max_frame.clamp(1, message)))
    }
}

/// A server-side WebSocket over an upgraded connection: tokio-tungstenite's `WebSocketStream`
/// (a `Stream` of incoming messages and a `Sink` of outgoing ones, its methods reachable
/// through `Deref`), which answers a message or frame over its [`Limits`] with Close 1009.
pub struct WebSocket {
    inner: tokio_tungstenite::WebSocketStream<Upgraded>,
    /// The limit error to yield once the 1009 Close is out (or could not be sent).
    refused: Option<(tungstenite::Error, Refusal)>,
}

#[derive(Clone, Copy)]
enum Refusal {
    /// The Close frame is still to be queued.
    Queue,
    /// Queued: flushing it.
    Flush,
}

impl WebSocket {
    /// The tokio-tungstenite socket underneath.
    pub fn into_inner(self) -> tokio_tungstenite::WebSocketStream<Upgraded> {
        self.inner
    }

    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &mut self.inner;
        loop {
            let Some((_, step)) = &mut self.refused else {
                return Poll::Ready(());
            };
            match step {
                Refusal::Queue => match ready!(Pin::new(&mut *inner).poll_ready(cx)) {
                    Ok(()) => {
                        let close = Message::Close(Some(CloseFrame {
                            code: CloseCode::Size,
                            reason: "message too big".into(),
                        }));
                        if Pin::new(&mut *inner).start_send(close).is_err() {
                            return Poll::Ready(());
                        }
                        *step = Refusal::Flush;
                    }
                    Err(_) => return Poll::Ready(()),
                },
                // Done or failed, either way: the client's connection is its own business now
                // (the host's `send_timeout` bounds a flush to a client that does not read).
                Refusal::Flush => {
                    let _ = ready!(Pin::new(&mut *inner).poll_flush(cx));
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// Logs a refused message: at most one line a second (a client can send one refused message
/// per megabyte), with how many were not logged since the last.
fn log_refusal(e: &tungstenite::Error) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_SECOND.load(Ordering::Relaxed);
    if now > last
        && LAST_SECOND
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::warn!(error = %e, suppressed, "refused a WebSocket message over its limit with Close 1009");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for WebSocket {
    type Target = tokio_tungstenite::WebSocketStream<Upgraded>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for WebSocket {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebSocket")
    }
}

impl Stream for WebSocket {
    type Item = Result<Message, tungstenite::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.refused.is_none() {
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Err(e @ tungstenite::Error::Capacity(_))) => {
                    log_refusal(&e);
                    this.refused = Some((e, Refusal::Queue));
                }
                other => return Poll::Ready(other),
            }
        }
        ready!(this.poll_refusal(cx));
        Poll::Ready(this.refused.take().map(|(e, _)| Err(e)))
    }
}

impl Sink<Message> for WebSocket {
    type Error = tungstenite::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        Pin::new(&mut self.get_mut().inner).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// The Close frame a handler sends when its worker drains: 1012, Service Restart.
pub fn close_for_restart() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Restart,
        reason: "service restart".into(),
    }))
}

fn has_token(headers: &http::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn refuse(status: StatusCode, why: &'static str) -> http::Response<Body> {
    let mut resp = http::Response::new(Body::from(why));
    *resp.status_mut() = status;
    resp
}

/// Checks that `req` is a WebSocket handshake, takes its connection, and returns the `101`
/// response to send; once the host has sent it, `handler` runs with the socket (in a task on
/// the plugin's runtime). A request that is not a handshake gets a `400` (or `426` when it
/// cannot be upgraded at all: HTTP/2, or a host older than ABI 1.3) and `handler` never runs.
pub fn upgrade<B, F, Fut>(req: &mut http::Request<B>, handler: F) -> http::Response<Body>
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    upgrade_with(req, Limits::default(), handler)
}

/// [`upgrade`], with other [`Limits`] than the defaults.
pub fn upgrade_with<B, F, Fut>(
    req: &mut http::Request<B>,
    limits: Limits,
    handler: F,
) -> http::Response<Body>
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let on_upgrade = crate::upgrade::on(req);
    match Handshake::check(req.method(), req.headers(), on_upgrade) {
        Ok(handshake) => handshake.limits(limits).accept(handler),
        Err(refused) => *refused,
    }
}

/// A checked handshake holding the request's connection: [`upgrade`] and the axum extractor
/// (`crate::axum::WebSocketUpgrade`) share it.
pub(crate) struct Handshake {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
    limits: Limits,
}

impl Handshake {
    /// Checks the handshake (RFC 6455 §4.2.1) of a request whose connection is `on_upgrade`
    /// (taken out of its extensions); otherwise the response that refuses it (`400`, or `426`
    /// when it cannot be upgraded).
    pub(crate) fn check(
        method: &http::Method,
        headers: &http::HeaderMap,
        on_upgrade: Option<OnUpgrade>,
    ) -> Result<Handshake, Box<http::Response<Body>>> {
        if method != http::Method::GET
            || !has_token(headers, header::UPGRADE, "websocket")
            || !has_token(headers, header::CONNECTION, "upgrade")
        {
            return Err(refuse(StatusCode::BAD_REQUEST, "not a WebSocket handshake\n").into());
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            let mut resp = refuse(StatusCode::BAD_REQUEST, "unsupported WebSocket version\n");
            resp.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return Err(resp.into());
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n").into());
        };
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header value");
        let Some(on_upgrade) = on_upgrade else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded (HTTP/1.1 required)\n",
            )
            .into());
        };
        Ok(Handshake {
            accept,
            on_upgrade,
            limits: Limits::default(),
        })
    }

    /// The socket's limits.
    pub(crate) fn limits(mut self, limits: Limits) -> Handshake {
        self.limits = limits;
        self
    }

    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn limits_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }

    /// The `101` response; once the host has sent it, `handler` runs with the socket in a task
    /// on the plugin's runtime.
    pub(crate) fn accept<F, Fut>(self, handler: F) -> http::Response<Body>
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (on_upgrade, config) = (self.on_upgrade, self.limits.config());
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(io) => {
                    let inner = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        io,
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    handler(WebSocket {
                        inner,
                        refused: None,
                    })
                    .await;
                }
                Err(e) => tracing::debug!(error = %e, "WebSocket upgrade did not happen"),
            }
        });
        let mut resp = http::Response::new(Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_stay_consistent() {
        let l = Limits::default();
        assert_eq!((l.max_message, l.max_frame), (1 << 20, 1 << 20));
        let l = Limits::default().max_message(1000);
        assert_eq!((l.max_message, l.max_frame), (1000, 1000));
        let l = Limits::default().max_frame(usize::MAX);
        assert_eq!(l.max_frame, l.max_message);
        let l = Limits::default().max_message(0).read_buffer(0);
        assert_eq!((l.max_message, l.max_frame, l.read_buffer), (1, 1, 256));
        let c = Limits::default().config();
        assert_eq!(c.read_buffer_size, READ_BUFFER);
        let c = Limits {
            max_message: usize::MAX,
            max_frame: 0,
            read_buffer: 0,
        }
        .config();
        assert_eq!((c.max_frame_size, c.read_buffer_size), (Some(1), 256));
        assert!(c.max_write_buffer_size > c.write_buffer_size);
        assert!(c.max_write_buffer_size > c.write_buffer_size + MAX_MESSAGE);
    }
}
