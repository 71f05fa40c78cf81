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
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};

use super::link::{ClientEvent, ClientId};
use super::router::{HandedClient, Outgoing, ToRouter};
use super::{Gateway, handoff, outbox};
use crate::counters::Limit;
use crate::ratelimit::RateLimit;

/// How long the client may take to answer our Close frame before the socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// tungstenite's read buffer for each client: all of it is touched by the first read, so it
/// is a large part of an idle client's memory (20,000 idle clients: 3.6 KiB each with 512
/// bytes, 4.1 with 1 KiB, 134 with tungstenite's default 128 KiB). The price: a message
/// larger than this takes a read per 512 bytes (a 64 KiB one, 128 reads).
const READ_BUFFER: usize = 512;

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

/// The client's connection with the bytes read before the upgrade put back in front, and where
/// the bytes given to tungstenite stand in the client's frames.
pub(super) struct Replay {
    head: Vec<u8>,
    at: usize,
    inner: TcpStream,
    frames: Frames,
}

impl Replay {
    /// `head`: the bytes read so far, the upgrade request first (its end found here).
    fn new(head: Vec<u8>, inner: TcpStream) -> Replay {
        let request = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(head.len(), |p| p + 4);
        Replay {
            head,
            at: 0,
            inner,
            frames: Frames {
                skip: request,
                ..Frames::default()
            },
        }
    }

    /// A connection handed over between messages: nothing read yet, no request.
    fn established(inner: TcpStream) -> Replay {
        Replay {
            head: Vec::new(),
            at: 0,
            inner,
            frames: Frames::default(),
        }
    }
}

/// Where the bytes read from a client stand in its frames (RFC 6455 section 5.2): a frame
/// header's bytes, a payload's, and whether a fragmented message is under way. Between two
/// messages, once tungstenite has taken every complete frame it was given, it holds no byte of
/// the client's: the connection may then change hands (a hand-over at `host upgrade`).
#[derive(Default)]
struct Frames {
    /// Bytes of the HTTP upgrade request still to come (not frames).
    skip: usize,
    header: [u8; 14],
    /// Bytes of the current frame's header seen.
    have: usize,
    payload_left: u64,
    /// A data frame without FIN was seen, and not yet its final continuation.
    fragmented: bool,
}

impl Frames {
    fn feed(&mut self, mut bytes: &[u8]) {
        let skip = self.skip.min(bytes.len());
        self.skip -= skip;
        bytes = &bytes[skip..];
        while let Some((&b, rest)) = bytes.split_first() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() as u64) as usize;
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = b;
            self.have += 1;
            bytes = rest;
            if self.have >= 2 && self.have == self.header_len() {
                self.frame_begins();
            }
        }
    }

    /// The current header's length, once its second byte is known.
    fn header_len(&self) -> usize {
        let len7 = self.header[1] & 0x7f;
        let extended = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn frame_begins(&mut self) {
        let h = &self.header;
        let len = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
        if opcode < 8 {
            // A data frame or a continuation (control frames may come between fragments).
            self.fragmented = !fin;
        }
        self.payload_left = len;
        self.have = 0;
    }

    fn between_messages(&self) -> bool {
        self.skip == 0 && self.have == 0 && self.payload_left == 0 && !self.fragmented
    }
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
            let bytes = &this.head[this.at..this.at + n];
            this.frames.feed(bytes);
            buf.put_slice(bytes);
            this.at += n;
            if this.at == this.head.len() {
                this.head = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = read {
            this.frames.feed(&buf.filled()[before..]);
        }
        read
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
    // The upgrade's state (the request head, the buffers it was read with) is on the heap only
    // while it runs: a client's task keeps only what its connection needs.
    let Some(mut up) = Box::pin(upgrade(stream, &gateway)).await else {
        return;
    };
    run_to_end(&mut up.ws, &gateway, up.client, &mut up.out, &up.queued).await;
}

/// A client past its `101`, and the slot it holds.
struct Upgraded {
    ws: WebSocketStream<Replay>,
    client: ClientId,
    out: outbox::Receiver,
    queued: Arc<AtomicUsize>,
    _slot: Slot,
}

/// The upgrade: the request head, the limits, the business's answer to the `Connect`, the
/// handshake and what was sent to the client meanwhile. `None`: refused, or gone.
async fn upgrade(stream: TcpStream, gateway: &Arc<Gateway>) -> Option<Upgraded> {
    static CLOSED: RateLimit = RateLimit::per_second();
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
        return None;
    }
    let head = tokio::time::timeout(gateway.handshake_timeout, read_head(&mut stream)).await;
    gateway.upgraded();
    let head = match head {
        Ok(Some(head)) => head,
        // Too slow, too large, or gone: nothing was held.
        _ => return None,
    };
    let Some(connect) = parse_connect(&head) else {
        answer(&mut stream, 400).await;
        return None;
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
        return None;
    }
    let slot = Slot(gateway.clone());
    let client = gateway.client_id();
    let (out_tx, mut out) = outbox::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let open = ToRouter::Open {
        client,
        out: out_tx,
        queued: queued.clone(),
        connect,
    };
    if gateway.router.send(open).is_err() {
        return None;
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
        return None;
    }
    let replay = Replay::new(head, stream);
    let upgrade = tokio_tungstenite::accept_async_with_config(replay, Some(ws_config(gateway)));
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
            return None;
        }
    };
    let within = Duration::from_millis(gateway.spec.ping_timeout_ms);
    for message in early {
        if write_counted(&mut ws, message, &queued, within)
            .await
            .is_err()
        {
            break;
        }
    }
    Some(Upgraded {
        ws,
        client,
        out,
        queued,
        _slot: slot,
    })
}

/// The WebSocket bounds of this gateway's clients. Every message is written at once (each send
/// flushes anyway), so tungstenite's write buffer holds at most what the socket did not take,
/// bounded by the send queue (tungstenite requires the bound above its write buffer's size).
/// Reads go through a [`READ_BUFFER`] buffer: tungstenite's default, 128 KiB, was most of an
/// idle client's memory and, zero-filled before each read, most of a broadcast's CPU.
fn ws_config(gateway: &Gateway) -> WebSocketConfig {
    let spec = &gateway.spec;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(spec.max_message))
        .max_frame_size(Some(spec.max_message))
        .write_buffer_size(0)
        .max_write_buffer_size(spec.send_queue.max(64 << 10))
}

/// Serves a client its predecessor process handed over (`host upgrade`): between two of its
/// messages, with its id, session, uid and groups. A full gateway closes it with 1012 (it
/// comes back as a new client).
pub(super) async fn adopt(stream: TcpStream, state: HandedClient, gateway: Arc<Gateway>) {
    let replay = Replay::established(stream);
    let mut ws =
        WebSocketStream::from_raw_socket(replay, Role::Server, Some(ws_config(&gateway))).await;
    if !gateway.reserve() {
        gateway.limit_hit(Limit::GatewayClients);
        close(&mut ws, CloseCode::Restart, "gateway restarting", true).await;
        return;
    }
    let _slot = Slot(gateway.clone());
    let client = state.client;
    let (out_tx, mut out) = outbox::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let adopt = ToRouter::Adopt {
        out: out_tx,
        queued: queued.clone(),
        state,
    };
    if gateway.router.send(adopt).is_err() {
        return;
    }
    gateway.counters.adopted.fetch_add(1, Ordering::Relaxed);
    run_to_end(&mut ws, &gateway, client, &mut out, &queued).await;
}

/// A client past its upgrade, from its first message to its close (or its hand-over to the
/// successor process).
async fn run_to_end(
    ws: &mut WebSocketStream<Replay>,
    gateway: &Arc<Gateway>,
    client: ClientId,
    out: &mut outbox::Receiver,
    queued: &Arc<AtomicUsize>,
) {
    static CLOSED: RateLimit = RateLimit::per_second();
    let mut conn = Conn {
        ws,
        gateway,
        client,
        out,
        queued,
        closed_by_client: None,
    };
    let why = conn.run().await;
    let said = conn.closed_by_client.take();
    let successor = why == End::Draining && gateway.successor.load(Ordering::Acquire);
    if successor && Box::pin(hand_over(ws, gateway, client, out, queued)).await {
        return;
    }
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
        // A successor serves the port: come back (the clients it could not take over).
        End::Draining if successor => (CloseCode::Restart, "gateway restarting", None),
        End::Draining => (CloseCode::Away, "gateway stopping", None),
        End::PingTimeout => (
            CloseCode::Policy,
            "no pong or reads nothing",
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
    Box::pin(close(ws, code, reason, why != End::PingTimeout)).await;
}

/// How long a draining gateway waits for a client to be between messages (nothing of it
/// buffered, none of its events unhandled) to hand it over; past it, it is closed with 1012.
const HAND_OVER_WAIT: Duration = Duration::from_millis(1500);

/// Hands the client to the successor process bound at this process's hand-off socket's name
/// (`host upgrade`: a process started while this one runs), once tungstenite holds no byte of it, nothing is queued to
/// it and the router has none of its events unhandled: the connection's descriptor and what the
/// client is ([`HandedClient`]) go in one datagram. Meanwhile its messages go to the router and
/// what the router sends it is written, as ever. `false`: not done within [`HAND_OVER_WAIT`], or
/// not taken (the client is the router's again): the caller closes it.
async fn hand_over(
    ws: &mut WebSocketStream<Replay>,
    gateway: &Gateway,
    client: ClientId,
    out: &mut outbox::Receiver,
    queued: &Arc<AtomicUsize>,
) -> bool {
    use futures_util::FutureExt as _;
    use std::os::fd::AsRawFd as _;
    let Some(socket) = gateway.spec.handoff_socket.as_deref() else {
        return false;
    };
    let deadline = Instant::now() + HAND_OVER_WAIT;
    let within = Duration::from_millis(gateway.spec.ping_timeout_ms);
    while Instant::now() < deadline {
        let event = match ws.next().now_or_never() {
            None => None,
            Some(Some(Ok(Message::Text(t)))) => Some(ClientEvent::Text(t.as_str().to_owned())),
            Some(Some(Ok(Message::Binary(b)))) => Some(ClientEvent::Binary(b.to_vec())),
            Some(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
            Some(Some(Ok(Message::Close(_)) | Err(_)) | None) => return false,
        };
        if let Some(event) = event {
            gateway.counters.messages.fetch_add(1, Ordering::Relaxed);
            if gateway
                .router
                .send(ToRouter::Event { client, event })
                .is_err()
            {
                return false;
            }
            continue;
        }
        let write = tokio::time::timeout_at(deadline, write_queued(ws, out, queued, within));
        if !matches!(write.await, Ok(true)) {
            return false;
        }
        let flushed = tokio::time::timeout_at(deadline, ws.flush()).await;
        if ws.get_ref().frames.between_messages() && matches!(flushed, Ok(Ok(()))) {
            let (reply, answer) = oneshot::channel();
            if gateway
                .router
                .send(ToRouter::Export { client, reply })
                .is_err()
            {
                return false;
            }
            if let Ok(Some(state)) = answer.await {
                // What the router queued before it let go is written first.
                let written = async {
                    write_queued(ws, out, queued, within).await && ws.flush().await.is_ok()
                };
                let written = matches!(tokio::time::timeout_at(deadline, written).await, Ok(true));
                let fd = ws.get_ref().inner.as_raw_fd();
                if written && handoff::hand_over(fd, socket, &state).is_ok() {
                    gateway.counters.handed_over.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                let (tx, rx) = outbox::channel();
                *out = rx;
                let adopt = ToRouter::Adopt {
                    out: tx,
                    queued: queued.clone(),
                    state,
                };
                let _ = gateway.router.send(adopt);
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Writes one message queued for the client and takes its bytes off the client's `queued`. A
/// client whose socket takes nothing for `within` (`gateway_ping_timeout`) is as gone as one
/// that answers no ping: [`End::PingTimeout`] (its queue is bounded meanwhile).
async fn write_counted(
    ws: &mut WebSocketStream<Replay>,
    message: Message,
    queued: &AtomicUsize,
    within: Duration,
) -> Result<(), End> {
    let size = message.len();
    let sent = tokio::time::timeout(within, ws.send(message)).await;
    queued.fetch_sub(size, Ordering::AcqRel);
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::PingTimeout),
    }
}

/// Writes the messages the router queued for the client; `false`: it is gone, or the router
/// closes it.
async fn write_queued(
    ws: &mut WebSocketStream<Replay>,
    out: &mut outbox::Receiver,
    queued: &AtomicUsize,
    within: Duration,
) -> bool {
    loop {
        match out.try_recv() {
            Ok(Outgoing::Message(message)) => {
                if write_counted(ws, message, queued, within).await.is_err() {
                    return false;
                }
            }
            Ok(Outgoing::Close(..)) => return false,
            Ok(Outgoing::Accept | Outgoing::Refuse(_)) => {}
            Err(outbox::TryRecvError::Empty) => return true,
            Err(outbox::TryRecvError::Disconnected) => return true,
        }
    }
}

/// Why a client's read loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The client closed, or the connection failed: nothing more to send.
    Gone,
    Draining,
    /// No pong, or no write taken, within `gateway_ping_timeout`.
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
    out: &'a mut outbox::Receiver,
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
                        if let Err(end) = write_counted(self.ws, message, self.queued, timeout).await {
                            return end;
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
                    let ping = self.ws.send(Message::Ping(Default::default()));
                    match tokio::time::timeout(timeout, ping).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return End::Gone,
                        Err(_) => return End::PingTimeout,
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

#[cfg(test)]
mod tests {
    use super::Frames;

    /// A client frame: FIN, opcode, masked payload of `len` bytes (zeros).
    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend((len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend((len as u64).to_be_bytes());
            }
        }
        f.extend([1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    #[test]
    fn frames_know_when_no_message_is_half_read_whatever_the_reads_sizes() {
        let request = b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        // A text message; a fragmented one with a ping between its fragments; a large binary.
        let parts: Vec<(Vec<u8>, bool)> = vec![
            (frame(true, 1, 5), true),
            (frame(false, 1, 3), false),
            (frame(true, 9, 0), false),
            (frame(true, 0, 200), true),
            (frame(true, 2, 70_000), true),
        ];
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let mut frames = Frames {
                skip: request.len(),
                ..Frames::default()
            };
            for piece in request.chunks(chunk) {
                frames.feed(piece);
            }
            assert!(
                frames.between_messages(),
                "after the request, read by {chunk}"
            );
            for (i, (bytes, after)) in parts.iter().enumerate() {
                for piece in bytes.chunks(chunk) {
                    frames.feed(piece);
                    let whole = piece.as_ptr_range().end == bytes.as_ptr_range().end;
                    if !whole {
                        assert!(!frames.between_messages(), "frame {i} half read by {chunk}");
                    }
                }
                assert_eq!(
                    frames.between_messages(),
                    *after,
                    "after frame {i}, read by {chunk}"
                );
            }
        }
    }
}
