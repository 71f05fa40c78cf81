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

use std::future::Future;

use http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

pub use tokio_tungstenite::tungstenite::protocol::CloseFrame;
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
pub use tokio_tungstenite::tungstenite::{self, Message};

use crate::Body;
use crate::upgrade::{OnUpgrade, Upgraded};

/// A server-side WebSocket over an upgraded connection.
pub type WebSocket = tokio_tungstenite::WebSocketStream<Upgraded>;

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
    let on_upgrade = crate::upgrade::on(req);
    match Handshake::check(req.method(), req.headers(), on_upgrade) {
        Ok(handshake) => handshake.accept(handler),
        Err(refused) => *refused,
    }
}

/// A checked handshake holding the request's connection: [`upgrade`] and the axum extractor
/// (`crate::axum::WebSocketUpgrade`) share it.
pub(crate) struct Handshake {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
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
        Ok(Handshake { accept, on_upgrade })
    }

    /// The `101` response; once the host has sent it, `handler` runs with the socket in a task
    /// on the plugin's runtime.
    pub(crate) fn accept<F, Fut>(self, handler: F) -> http::Response<Body>
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(io) => {
                    let socket = WebSocket::from_raw_socket(io, Role::Server, None).await;
                    handler(socket).await;
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
