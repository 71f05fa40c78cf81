//! One WebSocket client of a gateway process: the upgrade (its request head read here, at most
//! 16 KiB within `header_read_timeout`, at most `MAX_UPGRADING` connections at once, else
//! `503`; refused with `503` at `gateway_max_clients`; then the business answers its
//! `Connect`, with the `101` or an HTTP status), then reading its messages with message and
//! frame sizes bounded, a ping after `gateway_ping_interval` of silence and a disconnect when
//! nothing answers within `gateway_ping_timeout`, and the close codes: `1009` for an oversized
//! message, `1007` for invalid UTF-8 in a text message, `1002` for a protocol error, `1008` for
//! more than [`MAX_PINGS`] pings a second, `1001` when the gateway drains.
//!
//! It owns the connection and the client's slot (released when the task ends). Its events
//! (connect, each message, close) go to the [`router`](super::router) in the order they came;
//! what the router sends back (messages, a close) is written here. It never decides which
//! worker handles what, nor anything about other clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};

use super::Gateway;
use super::link::{ClientEvent, ClientId};
use super::router::{Outgoing, ToRouter};
use crate::counters::Limit;
use crate::ratelimit::RateLimit;

/// How long the client may take to answer our Close frame before the socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Largest request head a client may send.
const MAX_HEAD: usize = 16 << 10;

/// Most pings a client may send within [`PING_WINDOW`] (each one is answered); past it the
/// client is closed with `1008`, logged and counted (`gateway_ping_flood`).
pub(super) const MAX_PINGS: u32 = 20;
pub(super) const PING_WINDOW: Duration = Duration::from_secs(1);

/// Reads up to the end of the request head (`\r\n\r\n`), at most [`MAX_HEAD`] bytes; what came
/// with it stays in the buffer. `None`: the client left, or sent too much.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(head);
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
}

/// The `Connect` event of a WebSocket upgrade request; `None`: not one.
fn parse_connect(head: &[u8]) -> Option<ClientEvent> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let upgrade = request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade") && h.value.eq_ignore_ascii_case(b"websocket")
    });
    if request.method != Some("GET") || !upgrade {
        return None;
    }
    let target = request.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(ClientEvent::Connect {
        path: path.to_string(),
        query: query.to_string(),
        headers: request
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    })
}

/// Answers the upgrade request with `status` and no body, instead of the `101`.
async fn answer(stream: &mut TcpStream, status: u16) {
    use tokio::io::AsyncWriteExt as _;
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let text =
        format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = tokio::time::timeout(CLOSE_WAIT, stream.write_all(text.as_bytes())).await;
}

/// The client's connection with the bytes read before the upgrade put back in front.
pub(super) struct Replay {
    head: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl tokio::io::AsyncRead for Replay {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.at);
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            if this.at == this.head.len() {
                this.head = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Replay {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A client slot, given back when dropped.
struct Slot(Arc<Gateway>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Serves one client from its TCP connection to its end.
pub(super) async fn serve(stream: TcpStream, gateway: Arc<Gateway>) {
    static CLOSED: RateLimit = RateLimit::per_second();
    let spec = &gateway.spec;
    let config = WebSocketConfig::default()
        .max_message_size(Some(spec.max_message))
        .max_frame_size(Some(spec.max_message))
        .max_write_buffer_size(spec.send_queue.max(64 << 10));
    // The request head is read here (bounded in size and time, and in how many connections
    // send one at once), so that the business answers the `Connect` before the `101`.
    let mut stream = stream;
    if !gateway.upgrading() {
        gateway.counters.refused.fetch_add(1, Ordering::Relaxed);
        gateway.limit_hit(Limit::GatewayUpgrades);
        if let Some(suppressed) = CLOSED.hit_named("gateway upgrading") {
            tracing::warn!(
                max = gateway.max_upgrading(),
                suppressed,
                "gateway refused a connection (503): too many still sending their upgrade request"
            );
        }
        answer(&mut stream, 503).await;
        return;
    }
    let head = tokio::time::timeout(gateway.handshake_timeout, read_head(&mut stream)).await;
    gateway.upgraded();
    let head = match head {
        Ok(Some(head)) => head,
        // Too slow, too large, or gone: nothing was held.
        _ => return,
    };
    let Some(connect) = parse_connect(&head) else {
        answer(&mut stream, 400).await;
        return;
    };
    if !gateway.reserve() {
        gateway.counters.refused.fetch_add(1, Ordering::Relaxed);
        gateway.limit_hit(Limit::GatewayClients);
        if let Some(suppressed) = CLOSED.hit_named("gateway_max_clients") {
            tracing::warn!(
                max_clients = gateway.spec.max_clients,
                suppressed,
                "gateway refused a client: at gateway_max_clients (503)"
            );
        }
        answer(&mut stream, 503).await;
        return;
    }
    let _slot = Slot(gateway.clone());
    let client = gateway.client_id();
    let (out_tx, mut out) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let open = ToRouter::Open {
        client,
        out: out_tx,
        queued: queued.clone(),
        connect,
    };
    if gateway.router.send(open).is_err() {
        return;
    }
    // The business's answer to the `Connect` (the router holds it at most `gateway_hold`
    // while no worker is linked). Messages sent to the client meanwhile wait for the upgrade
    // (counted in `queued`, so bounded).
    let wait = Duration::from_millis(gateway.spec.hold_ms) + gateway.handshake_timeout;
    let mut early = Vec::new();
    let verdict = tokio::time::timeout(wait, async {
        loop {
            match out.recv().await {
                Some(Outgoing::Accept) => return Ok(()),
                Some(Outgoing::Refuse(status)) => return Err((status, false)),
                Some(Outgoing::Message(m)) => early.push(m),
                Some(Outgoing::Close(..)) | None => return Err((503, false)),
            }
        }
    })
    .await
    .unwrap_or(Err((503, true)));
    if let Err((status, still_known)) = verdict {
        if still_known {
            // The router still has it: it leaves once its events are handled.
            let _ = gateway.router.send(ToRouter::Event {
                client,
                event: ClientEvent::Close {
                    code: 1006,
                    reason: String::new(),
                },
            });
        }
        answer(&mut stream, status).await;
        return;
    }
    let replay = Replay {
        head,
        at: 0,
        inner: stream,
    };
    let upgrade = tokio_tungstenite::accept_async_with_config(replay, Some(config));
    let mut ws = match tokio::time::timeout(gateway.handshake_timeout, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(_)) | Err(_) => {
            let _ = gateway.router.send(ToRouter::Event {
                client,
                event: ClientEvent::Close {
                    code: 1006,
                    reason: String::new(),
                },
            });
            return;
        }
    };
    for message in early {
        let size = message.len();
        let sent = ws.send(message).await;
        queued.fetch_sub(size, Ordering::AcqRel);
        if sent.is_err() {
            break;
        }
    }
    let mut conn = Conn {
        ws: &mut ws,
        gateway: &gateway,
        client,
        out: &mut out,
        queued: &queued,
        closed_by_client: None,
    };
    let why = conn.run().await;
    let said = conn.closed_by_client.take();
    let (code, reason, counter) = match why {
        End::Gone => {
            let (code, reason) = said.unwrap_or((1006, String::new()));
            let _ = gateway.router.send(ToRouter::Event {
                client,
                event: ClientEvent::Close { code, reason },
            });
            return;
        }
        End::ByRouter(code, reason) => (CloseCode::from(code), reason, None),
        End::Draining => (CloseCode::Away, "gateway restarting", None),
        End::PingTimeout => (
            CloseCode::Policy,
            "no pong",
            Some(&gateway.counters.ping_timeouts),
        ),
        End::PingFlood => (
            CloseCode::Policy,
            "ping flood",
            Some(&gateway.counters.bad_input),
        ),
        End::TooBig => (
            CloseCode::Size,
            "message too big",
            Some(&gateway.counters.too_big),
        ),
        End::BadUtf8 => (
            CloseCode::Invalid,
            "invalid UTF-8",
            Some(&gateway.counters.bad_input),
        ),
        End::Protocol => (
            CloseCode::Protocol,
            "protocol error",
            Some(&gateway.counters.bad_input),
        ),
    };
    match why {
        End::TooBig => gateway.limit_hit(Limit::GatewayMessage),
        End::PingTimeout => gateway.limit_hit(Limit::GatewayPingTimeout),
        End::PingFlood => gateway.limit_hit(Limit::GatewayPingFlood),
        _ => {}
    }
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = CLOSED.hit_named(reason) {
            tracing::info!(
                code = u16::from(code),
                reason,
                suppressed,
                "gateway closed a client"
            );
        }
    }
    let _ = gateway.router.send(ToRouter::Event {
        client,
        event: ClientEvent::Close {
            code: code.into(),
            reason: reason.into(),
        },
    });
    close(&mut ws, code, reason, why != End::PingTimeout).await;
}

/// Why a client's read loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The client closed, or the connection failed: nothing more to send.
    Gone,
    Draining,
    PingTimeout,
    /// More than [`MAX_PINGS`] pings within [`PING_WINDOW`].
    PingFlood,
    TooBig,
    BadUtf8,
    Protocol,
    /// The router closes it (1008, 1011, 1013, or the application's code).
    ByRouter(u16, &'static str),
}

/// A client past its upgrade, as the read loop sees it.
struct Conn<'a> {
    ws: &'a mut WebSocketStream<Replay>,
    gateway: &'a Gateway,
    client: ClientId,
    out: &'a mut mpsc::UnboundedReceiver<Outgoing>,
    queued: &'a AtomicUsize,
    /// The client's own Close frame (code, reason), if it sent one.
    closed_by_client: Option<(u16, String)>,
}

impl Conn<'_> {
    /// Reads the client's frames (each message to the router) and writes what the router sends,
    /// until the client leaves, breaks a bound, goes silent, the router closes it, or the
    /// gateway drains.
    async fn run(&mut self) -> End {
        let gateway = self.gateway;
        let interval = Duration::from_millis(gateway.spec.ping_interval_ms);
        let timeout = Duration::from_millis(gateway.spec.ping_timeout_ms);
        let mut draining = gateway.draining.clone();
        let mut heard = Instant::now();
        let mut pinged: Option<Instant> = None;
        // The client's pings in the current window: (its start, how many).
        let mut pings = (heard, 0u32);
        loop {
            if *draining.borrow_and_update() {
                return End::Draining;
            }
            let wake = match pinged {
                None => heard + interval,
                Some(at) => at + timeout,
            };
            tokio::select! {
                frame = self.ws.next() => {
                    heard = Instant::now();
                    pinged = None;
                    let event = match frame {
                        Some(Ok(Message::Text(t))) => ClientEvent::Text(t.as_str().to_owned()),
                        Some(Ok(Message::Binary(b))) => ClientEvent::Binary(b.to_vec()),
                        // Each ping is answered (tungstenite queues the pong): a flood is bounded.
                        Some(Ok(Message::Ping(_))) => {
                            if heard >= pings.0 + PING_WINDOW {
                                pings = (heard, 0);
                            }
                            pings.1 += 1;
                            if pings.1 > MAX_PINGS {
                                return End::PingFlood;
                            }
                            continue;
                        }
                        Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
                        // tungstenite answers the Close; the stream ends after it.
                        Some(Ok(Message::Close(frame))) => {
                            self.closed_by_client = Some(frame.map_or((1005, String::new()), |f| {
                                (f.code.into(), f.reason.as_str().to_owned())
                            }));
                            continue;
                        }
                        Some(Err(WsError::Capacity(
                            CapacityError::MessageTooLong { .. } | CapacityError::TooManyHeaders,
                        ))) => return End::TooBig,
                        Some(Err(WsError::Utf8(_))) => return End::BadUtf8,
                        Some(Err(WsError::Protocol(_))) => return End::Protocol,
                        Some(Err(_)) | None => return End::Gone,
                    };
                    gateway.counters.messages.fetch_add(1, Ordering::Relaxed);
                    let event = ToRouter::Event { client: self.client, event };
                    if gateway.router.send(event).is_err() {
                        return End::Draining;
                    }
                }
                order = self.out.recv() => match order {
                    Some(Outgoing::Message(message)) => {
                        let size = message.len();
                        let sent = self.ws.send(message).await;
                        self.queued.fetch_sub(size, Ordering::AcqRel);
                        if sent.is_err() {
                            return End::Gone;
                        }
                    }
                    Some(Outgoing::Close(code, reason)) => return End::ByRouter(code, reason),
                    // Answers to the `Connect`: past the upgrade already.
                    Some(Outgoing::Accept | Outgoing::Refuse(_)) => {}
                    None => return End::Draining,
                },
                () = tokio::time::sleep_until(wake) => {
                    if pinged.is_some() {
                        return End::PingTimeout;
                    }
                    pinged = Some(Instant::now());
                    if self.ws.send(Message::Ping(Default::default())).await.is_err() {
                        return End::Gone;
                    }
                }
                _ = draining.changed() => {}
            }
        }
    }
}

/// Sends a Close frame and, when `wait`, reads until the client answers it (at most
/// [`CLOSE_WAIT`]); then the socket is dropped.
async fn close(ws: &mut WebSocketStream<Replay>, code: CloseCode, reason: &str, wait: bool) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let answered = async {
        if ws.close(Some(frame)).await.is_err() || !wait {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, answered).await;
}
