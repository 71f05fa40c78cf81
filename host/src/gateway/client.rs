//! One WebSocket client of a gateway process: the upgrade (refused with `503` at
//! `gateway_max_clients`, bounded by `header_read_timeout`), then reading its messages with
//! message and frame sizes bounded, a ping after `gateway_ping_interval` of silence and a
//! disconnect when nothing answers within `gateway_ping_timeout`, and the close codes: `1009`
//! for an oversized message, `1007` for invalid UTF-8 in a text message, `1002` for a protocol
//! error, `1001` when the gateway drains.
//!
//! It owns the connection and the client's slot (released when the task ends). It never decides
//! anything about other clients. Passing the client's events to a business worker is the next
//! phase (see `docs/design/gateway.md`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};

use super::Gateway;
use crate::counters::Limit;
use crate::ratelimit::RateLimit;

/// How long the client may take to answer our Close frame before the socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

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
    let mut slot = None;
    // The callback's type is tungstenite's `Callback`: its error is the response it sends.
    #[allow(clippy::result_large_err)]
    let check = |_: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if gateway.reserve() {
            slot = Some(Slot(gateway.clone()));
            return Ok(response);
        }
        gateway.counters.refused.fetch_add(1, Ordering::Relaxed);
        gateway.limit_hit(Limit::GatewayClients);
        if let Some(suppressed) = CLOSED.hit_named("gateway_max_clients") {
            tracing::warn!(
                max_clients = gateway.spec.max_clients,
                suppressed,
                "gateway refused a client: at gateway_max_clients (503)"
            );
        }
        let mut refusal = ErrorResponse::new(Some("too many clients\n".into()));
        *refusal.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        Err(refusal)
    };
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config));
    let mut ws = match tokio::time::timeout(gateway.handshake_timeout, upgrade).await {
        Ok(Ok(ws)) => ws,
        // Not a WebSocket upgrade, too slow, or refused: nothing was held.
        Ok(Err(_)) | Err(_) => return,
    };
    let Some(_slot) = slot else { return };
    let why = read_loop(&mut ws, &gateway).await;
    let (code, reason, counter) = match why {
        End::Gone => return,
        End::Draining => (CloseCode::Away, "gateway restarting", None),
        End::PingTimeout => (
            CloseCode::Policy,
            "no pong",
            Some(&gateway.counters.ping_timeouts),
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
    close(&mut ws, code, reason, why != End::PingTimeout).await;
}

/// Why a client's read loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The client closed, or the connection failed: nothing more to send.
    Gone,
    Draining,
    PingTimeout,
    TooBig,
    BadUtf8,
    Protocol,
}

/// Reads the client's frames until it leaves, breaks a bound, goes silent, or the gateway drains.
async fn read_loop(ws: &mut WebSocketStream<TcpStream>, gateway: &Gateway) -> End {
    let interval = Duration::from_millis(gateway.spec.ping_interval_ms);
    let timeout = Duration::from_millis(gateway.spec.ping_timeout_ms);
    let mut draining = gateway.draining.clone();
    let mut heard = Instant::now();
    let mut pinged: Option<Instant> = None;
    loop {
        if *draining.borrow_and_update() {
            return End::Draining;
        }
        let wake = match pinged {
            None => heard + interval,
            Some(at) => at + timeout,
        };
        tokio::select! {
            frame = ws.next() => {
                heard = Instant::now();
                pinged = None;
                match frame {
                    Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                        gateway.counters.messages.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    // tungstenite answers the Close; the stream ends after it.
                    Some(Ok(Message::Close(_))) => {}
                    Some(Err(WsError::Capacity(
                        CapacityError::MessageTooLong { .. } | CapacityError::TooManyHeaders,
                    ))) => return End::TooBig,
                    Some(Err(WsError::Utf8(_))) => return End::BadUtf8,
                    Some(Err(WsError::Protocol(_))) => return End::Protocol,
                    Some(Err(_)) | None => return End::Gone,
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if pinged.is_some() {
                    return End::PingTimeout;
                }
                pinged = Some(Instant::now());
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    return End::Gone;
                }
            }
            _ = draining.changed() => {}
        }
    }
}

/// Sends a Close frame and, when `wait`, reads until the client answers it (at most
/// [`CLOSE_WAIT`]); then the socket is dropped.
async fn close(ws: &mut WebSocketStream<TcpStream>, code: CloseCode, reason: &str, wait: bool) {
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
