//! One accepted connection's life: hyper serving it (HTTP/1.1 and HTTP/2, with HTTP/2's
//! streams, per-stream send buffer and pings bounded), its socket wrapped so that a write that
//! makes no progress for `send_timeout` ends it ([`send_timeout`]), small writes are joined
//! ([`coalesce`]) and a drain covers every HTTP/2 stream the client sent ([`h2_drain`]), and
//! its end: the idle guard's verdict ([`head_timeout`]), or the drain (`idle_grace` for an
//! HTTP/1 keep-alive client, GOAWAY for HTTP/2).
//!
//! A same-port group's connection may first go to a gateway ([`same_port`]) instead.
//!
//! Owns the connection task and hyper's settings ([`settings`]). Each request goes down to
//! [`request::call`]; it never accepts, never answers a request itself and never decides when
//! to drain.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use super::conn_state::{Connection, ConnectionGuard};
use super::shared::{ConnSettings, Shared};
use super::{coalesce, h2_drain, head_timeout, request, same_port, send_timeout};
use crate::counters::Limit;
use crate::protocol::WorkerSpec;
use crate::ratelimit::RateLimit;

/// HTTP/2 connections are pinged after this long without a frame from the client (or after
/// `keepalive_timeout`, if shorter), and closed when the ping is not answered within
/// [`H2_PING_TIMEOUT`] (or `keepalive_timeout`, if shorter): a vanished peer is found even while
/// a stream stays open with nothing to send.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How this worker serves each connection, from its spec; starts the idle guard's sweep.
pub(super) fn settings(spec: &WorkerSpec) -> ConnSettings {
    let mut http = auto::Builder::new(TokioExecutor::new());
    // The slowloris guard is `head_timeout`'s sweep, not hyper's timer per request.
    http.http1()
        .keep_alive(true)
        .header_read_timeout(None)
        .max_buf_size(spec.max_header_bytes);
    if spec.max_headers != 100 {
        // hyper's default; any other value moves header parsing to the heap, so only when asked.
        http.http1().max_headers(spec.max_headers);
    }
    // What one HTTP/2 connection can make the worker hold for a client that does not read:
    // at most `http2_max_streams` streams, each buffering at most `http2_send_buffer` of its
    // response (hyper's defaults, 200 x 400 KiB, came to ~107 MB with h2's overhead).
    let keepalive = Duration::from_millis(spec.keepalive_timeout_ms.max(1));
    http.http2()
        .max_header_list_size(spec.max_header_bytes as u32)
        .max_concurrent_streams(spec.http2_max_streams.max(1))
        .max_send_buf_size(spec.http2_send_buffer.max(1024))
        .keep_alive_interval(Some(H2_PING_INTERVAL.min(keepalive)))
        .keep_alive_timeout(H2_PING_TIMEOUT.min(keepalive));
    http.http2().timer(TokioTimer::new());
    let send_timeout = Duration::from_millis(spec.send_timeout_ms.max(1));
    let head_timeout = head_timeout::HeadTimeout::start(
        Duration::from_millis(spec.header_read_timeout_ms),
        keepalive,
        send_timeout,
    );
    ConnSettings {
        http,
        head_timeout,
        send_timeout,
        idle_grace: Duration::from_millis(spec.idle_grace_ms),
    }
}

/// Serves `stream` in a task of its own, counted as open until it ends.
pub(super) fn spawn(shared: Arc<Shared>, stream: TcpStream) {
    let guard = ConnectionGuard::new(shared.clone());
    tokio::spawn(async move {
        let _guard = guard;
        if let Some(same_port) = &shared.same_port {
            match same_port.route(&stream, shared.counters).await {
                same_port::Route::Http => {}
                same_port::Route::Done => return,
                same_port::Route::TimedOut => return note_timed_out(&shared, false),
            }
        }
        let _ = stream.set_nodelay(true);
        let conn_state = Arc::new(Connection::new(shared.clone()));
        let service = {
            let conn_state = conn_state.clone();
            hyper::service::service_fn(move |req| request::call(conn_state.clone(), req))
        };
        let settings = &shared.conn;
        let stream = send_timeout::SendTimeout::new(stream, settings.send_timeout, shared.counters);
        let io = coalesce::Coalesce::new(h2_drain::DrainAwareIo::new(stream, shared.drain.flag()));
        let conn = settings
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shared.drain.wait() => {}
            _ = conn_state.watch.expired() => {
                let watch = &conn_state.watch;
                if watch.stalled() {
                    // A response not asked for more for `send_timeout`: the client grants no
                    // flow-control window. Closed, as a write that waits that long is.
                    send_timeout::note_hit(shared.counters, settings.send_timeout);
                    return;
                }
                note_timed_out(&shared, watch.served());
                if !watch.is_h2() {
                    // No request head within `header_read_timeout` (or `keepalive_timeout`
                    // after a request) of going idle: closed without a response, as hyper's
                    // own header timeout does.
                    return;
                }
                // HTTP/2 with no stream open for `keepalive_timeout`: GOAWAY, then close once
                // h2 is done (a stream the client opened meanwhile is served; writes are held
                // to `send_timeout`, so this ends).
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
        }
        // Draining. An HTTP/1 keep-alive client may be about to send its next request on this
        // connection: give it `idle_grace` to do so (its response carries `Connection: close`)
        // before closing an idle connection under it. A new HTTP/2 connection gets its first
        // request served before its GOAWAY (a client does not retry a request refused on a
        // fresh connection); one that served requests gets GOAWAY at once, and `h2_drain`
        // makes sure the final GOAWAY covers every stream the client sent before it saw it.
        if !conn_state.is_h2.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(settings.idle_grace) => {}
                _ = conn_state.first_h2_request.notified() => {}
            }
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    });
}

/// A connection was closed at the idle guard's timeout: counted, and logged at most once a
/// second per cause. `served`: it had served requests (`keepalive_timeout`, or
/// `header_read_timeout` between requests); else it sent no complete request head within
/// `header_read_timeout` of its accept (the slowloris guard).
fn note_timed_out(shared: &Shared, served: bool) {
    static IDLE: RateLimit = RateLimit::per_second();
    static SLOW: RateLimit = RateLimit::per_second();
    let (limit, log, what) = if served {
        (
            Limit::IdleTimeout,
            &IDLE,
            "closed an idle keep-alive connection (keepalive_timeout or header_read_timeout)",
        )
    } else {
        (
            Limit::HeaderReadTimeout,
            &SLOW,
            "closed a connection that sent no complete request head within header_read_timeout",
        )
    };
    if let Some(counters) = shared.counters {
        counters.limit_hit(limit);
    }
    if let Some(suppressed) = log.hit(&std::io::ErrorKind::TimedOut.into()) {
        tracing::info!(suppressed, "{what}");
    }
}
