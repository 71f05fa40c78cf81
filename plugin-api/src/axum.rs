//! axum support (feature `axum`): an [`axum::Router`] served as the plugin, and the WebSocket
//! extractor that works inside it.
//!
//! ```no_run
//! use axum::extract::{Path, State};
//! use axum::{Json, Router, routing::get};
//! use plugin_api::{BoxError, WorkerContext};
//!
//! fn build(ctx: &WorkerContext) -> Result<Router, BoxError> {
//!     Ok(Router::new()
//!         .route("/", get(|State(ctx): State<WorkerContext>| async move {
//!             format!("hello from generation {}\n", ctx.generation)
//!         }))
//!         .route("/users/{id}", get(|Path(id): Path<u64>| async move {
//!             Json(serde_json::json!({ "id": id }))
//!         }))
//!         .with_state(ctx.clone()))
//! }
//!
//! plugin_api::export_axum!(build);
//! ```
//!
//! This module owns three things. [`export_axum!`](crate::export_axum) generates the plugin:
//! its `on_worker_start` calls the build function once per worker, and every request is
//! [`Dispatch::Async`](crate::Dispatch) and goes through [`serve`], which hands it to a clone of
//! the router (`tower`'s `oneshot`). [`serve`] converts the bodies both ways without buffering:
//! the request body streams into the handler as the client sends it, and a streamed response
//! (`Sse`, a `Body::from_stream`) streams out, paced by the client; a whole response (`Json`, a
//! `String`) crosses as one piece. [`WebSocketUpgrade`] replaces axum's own extractor, which
//! cannot work here (below).
//!
//! It does not run hyper or `axum::serve`: the host owns the connections, and the router runs
//! inside the plugin's own tokio runtime like any [`Plugin::serve`](crate::Plugin::serve) (so
//! axum's `tokio::time`-based parts, such as the SSE keep-alive, work). What differs from
//! `axum::serve`:
//! - **WebSocket:** axum's `axum::extract::ws::WebSocketUpgrade` (its `ws` feature) wants
//!   hyper's `OnUpgrade` in the request's extensions, which only hyper can make and the host's
//!   hyper cannot lend across the ABI. Every handshake through it is refused with `426 Upgrade
//!   Required` ("WebSocket request couldn't be upgraded since no upgrade state was present").
//!   Use [`WebSocketUpgrade`] from this module: same shape, and its socket is
//!   [`crate::websocket::WebSocket`] (tokio-tungstenite) instead of axum's `WebSocket`.
//! - **`ConnectInfo`:** the host passes no peer address, so `ConnectInfo<SocketAddr>` is
//!   rejected (`500`, missing extension).
//! - **Body limits:** the host's `max_body_bytes` applies to
//!   [`Plugin::handle`](crate::Plugin::handle) only; here axum's own `DefaultBodyLimit` (2 MB
//!   for `Json`, `String`, `Bytes`...) is the limit, and a route that streams the `Body` itself
//!   sets its own.
//! - **Trailers** a response sends are dropped (the ABI carries none).
//!
//! A handler that panics answers `500`, and the worker goes on serving, as with any `serve`.
//! Long-lived responses should end when the worker drains: see
//! [`WorkerContext::draining`](crate::WorkerContext::draining).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use ::axum::extract::FromRequestParts;
use ::axum::response::Response;
use http::request::Parts;
use http_body::Body as _;
use tower::ServiceExt as _;

use crate::Body;
use crate::body::Prefixed;
use crate::websocket::{Handshake, WebSocket};

#[doc(hidden)]
pub use ::axum::Router as __Router;

/// Exports an [`axum::Router`] as this library's plugin: `export_axum!(build)`, where `build`
/// is a `fn(&WorkerContext) -> Result<axum::Router, E>` (any `E` that `?` turns into a
/// [`BoxError`](crate::BoxError)). Call it once, at the crate root of a `cdylib`, instead of
/// [`export_plugin!`](crate::export_plugin).
///
/// `build` runs in each new worker's `on_worker_start` (an error or a panic refuses the build,
/// as with any plugin); give the router its state there (`.with_state(..)`), so it is a
/// `Router<()>`. Every request then goes to [`serve`], in the plugin's own tokio runtime.
#[macro_export]
macro_rules! export_axum {
    ($build:expr) => {
        const _: () = {
            /// The plugin `export_axum!` generates: the router its build function returned.
            struct AxumPlugin($crate::axum::__Router);

            impl $crate::Plugin for AxumPlugin {
                fn on_worker_start(
                    ctx: &$crate::WorkerContext,
                ) -> ::core::result::Result<Self, $crate::BoxError> {
                    ::core::result::Result::Ok(AxumPlugin(($build)(ctx)?))
                }

                fn dispatch(&self, _method: &str, _path: &str) -> $crate::Dispatch {
                    $crate::Dispatch::Async
                }

                fn serve(
                    &self,
                    req: $crate::http::Request<$crate::Body>,
                ) -> impl ::core::future::Future<Output = $crate::http::Response<$crate::Body>>
                + ::core::marker::Send {
                    $crate::axum::serve(self.0.clone(), req)
                }
            }

            $crate::export_plugin!(AxumPlugin);
        };
    };
}

/// Serves one request with `router` (a clone: routers are cheap to clone), converting the
/// bodies both ways without buffering. [`export_axum!`](crate::export_axum) calls it for every
/// request; a plugin that implements [`Plugin`](crate::Plugin) itself may call it from its
/// `serve` for the paths it sends to a router.
pub fn serve(
    router: ::axum::Router,
    req: http::Request<Body>,
) -> impl Future<Output = http::Response<Body>> + Send + 'static {
    let req = req.map(::axum::body::Body::new);
    async move {
        let resp = match router.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        let (parts, body) = resp.into_parts();
        match into_body(body).await {
            Ok(body) => http::Response::from_parts(parts, body),
            Err(e) => {
                tracing::error!(error = %e, "the response body failed before anything was sent; answered 500");
                let mut resp = http::Response::new(Body::from("internal server error\n"));
                *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                resp
            }
        }
    }
}

/// The response body for the host: a body whose whole content is ready at once (`Json`, a
/// `String`, an empty `101`) as bytes, which the host sends in one piece with its
/// `Content-Length`; any other as a stream, read only as fast as the client takes it (and
/// settled like any streamed [`Body`] before it leaves the handler's task). A body that fails
/// before anything was sent is an `Err`.
async fn into_body(mut body: ::axum::body::Body) -> Result<Body, ::axum::Error> {
    if body.is_end_stream() {
        return Ok(Body::empty());
    }
    let Some(len) = body.size_hint().exact() else {
        return Ok(Body::new(body));
    };
    // One poll, never a wait: what is not ready now streams.
    let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
    Ok(match first {
        Poll::Pending => Body::new(body),
        Poll::Ready(None) => Body::empty(),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if data.len() as u64 == len => Body::from(data),
            Ok(data) => Body::new(Prefixed::new(data, body)),
            // Trailers are not passed on.
            Err(_trailers) => Body::new(body),
        },
        Poll::Ready(Some(Err(e))) => return Err(e),
    })
}

/// axum's `WebSocketUpgrade`, for this host: an extractor for a WebSocket handshake, whose
/// [`on_upgrade`](WebSocketUpgrade::on_upgrade) answers `101` and runs a handler with the
/// socket once the host has sent it.
///
/// ```no_run
/// use axum::response::Response;
/// use futures_util::{SinkExt as _, StreamExt as _};
/// use plugin_api::axum::WebSocketUpgrade;
/// use plugin_api::websocket::Message;
///
/// async fn ws(upgrade: WebSocketUpgrade) -> Response {
///     upgrade.on_upgrade(|mut socket| async move {
///         while let Some(Ok(Message::Text(text))) = socket.next().await {
///             if socket.send(Message::Text(text)).await.is_err() {
///                 break;
///             }
///         }
///     })
/// }
/// ```
///
/// The checks are those of [`crate::websocket::upgrade`]: a request that is not a handshake is
/// rejected with `400`, one that cannot be upgraded (HTTP/2, or a host older than ABI 1.3) with
/// `426`. Route it with `get`. No subprotocol is negotiated and no extension
/// (`permessage-deflate`) is offered. axum's own extractor answers every handshake with `426`
/// here (see the [module docs](self)).
pub struct WebSocketUpgrade(Handshake);

impl WebSocketUpgrade {
    /// The `101` response that finishes the handshake; once the host has sent it, `callback`
    /// runs with the socket, in a task on the plugin's runtime. When the worker drains, the
    /// callback should close with [`close_for_restart`](crate::websocket::close_for_restart)
    /// (1012, Service Restart) so that its client reconnects to the new generation.
    pub fn on_upgrade<C, Fut>(self, callback: C) -> Response
    where
        C: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.0.accept(callback).map(::axum::body::Body::new)
    }

    /// The socket's size limits (default [`Limits::default`](crate::websocket::Limits): 1 MiB
    /// messages and frames); a larger incoming message gets Close 1009.
    pub fn limits(mut self, limits: crate::websocket::Limits) -> Self {
        self.0 = self.0.limits(limits);
        self
    }

    /// Sets the largest incoming message, as axum's own extractor does.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        let limits = self.0.limits_mut();
        *limits = limits.max_message(bytes);
        self
    }

    /// Sets the largest incoming frame, as axum's own extractor does.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        let limits = self.0.limits_mut();
        *limits = limits.max_frame(bytes);
        self
    }
}

impl std::fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebSocketUpgrade")
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    /// The `400` or `426` that refuses the handshake.
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        let on_upgrade = parts.extensions.remove::<crate::upgrade::OnUpgrade>();
        Handshake::check(&parts.method, &parts.headers, on_upgrade)
            .map(WebSocketUpgrade)
            .map_err(|refused| (*refused).map(::axum::body::Body::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::axum::Router;
    use ::axum::routing::{get, post};
    use bytes::Bytes;
    use http_body_util::BodyExt as _;

    fn handshake(path: &str) -> http::Request<Body> {
        http::Request::get(path)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Body::empty())
            .unwrap()
    }

    fn router() -> Router {
        Router::new()
            .route("/whole", get(|| async { "whole\n" }))
            .route(
                "/stream",
                get(|| async {
                    let chunks =
                        futures_util::stream::iter(["a", "b"].map(Ok::<_, std::io::Error>));
                    ::axum::body::Body::from_stream(chunks)
                }),
            )
            .route(
                "/echo",
                post(|body: ::axum::body::Body| async move { body }),
            )
            .route(
                "/ws",
                get(|up: WebSocketUpgrade| async move { up.on_upgrade(|_socket| async {}) }),
            )
            .route(
                "/peer",
                get(
                    |peer: ::axum::extract::ConnectInfo<std::net::SocketAddr>| async move {
                        peer.0.to_string()
                    },
                ),
            )
            .route(
                "/axum-ws",
                get(|up: ::axum::extract::ws::WebSocketUpgrade| async move {
                    up.on_upgrade(|_socket| async {})
                }),
            )
    }

    async fn call(req: http::Request<Body>) -> http::Response<Body> {
        serve(router(), req).await
    }

    #[tokio::test]
    async fn a_whole_response_crosses_as_bytes_and_a_stream_as_a_stream() {
        let mut whole = call(http::Request::get("/whole").body(Body::empty()).unwrap()).await;
        assert_eq!(whole.status(), 200);
        assert_eq!(
            whole.body_mut().take_full().as_deref(),
            Some(&b"whole\n"[..])
        );

        let mut stream = call(http::Request::get("/stream").body(Body::empty()).unwrap()).await;
        assert!(stream.body_mut().take_full().is_none());
        let bytes = stream.into_body().to_bytes(1024).await.unwrap();
        assert_eq!(&bytes[..], b"ab");

        let missing = call(http::Request::get("/nope").body(Body::empty()).unwrap()).await;
        assert_eq!(missing.status(), 404);
        // No peer address crosses the ABI: `ConnectInfo` is a missing extension.
        let peer = call(http::Request::get("/peer").body(Body::empty()).unwrap()).await;
        assert_eq!(peer.status(), 500);
    }

    #[tokio::test]
    async fn a_request_body_streams_into_the_handler_and_back() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let req = http::Request::post("/echo")
            .body(Body::from_stream(stream))
            .unwrap();
        let mut body = call(req).await.into_body();
        // The response starts before the request body has ended: nothing is buffered.
        tx.send(Ok(Bytes::from_static(b"one"))).await.unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"one");
        tx.send(Ok(Bytes::from_static(b"two"))).await.unwrap();
        drop(tx);
        assert_eq!(&body.to_bytes(1024).await.unwrap()[..], b"two");
    }

    #[tokio::test]
    async fn the_websocket_extractor_checks_the_handshake() {
        // Not a handshake: 400.
        let plain = call(http::Request::get("/ws").body(Body::empty()).unwrap()).await;
        assert_eq!(plain.status(), 400);
        // A handshake whose connection cannot be upgraded (no OnUpgrade, as over HTTP/2): 426.
        let no_upgrade = call(handshake("/ws")).await;
        assert_eq!(no_upgrade.status(), 426);
    }

    #[tokio::test]
    async fn axums_own_websocket_extractor_answers_426_here() {
        // What the module docs say: without hyper's OnUpgrade in the extensions, axum refuses.
        let resp = call(handshake("/axum-ws")).await;
        assert_eq!(resp.status(), 426);
        let body = resp.into_body().to_bytes(1024).await.unwrap();
        assert!(
            String::from_utf8_lossy(&body).contains("no upgrade state"),
            "{body:?}"
        );
    }
}
