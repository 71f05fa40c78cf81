//! One request's path through a worker: the built-in `/_host/` routes, the choice between the
//! I/O thread, the blocking pool and the plugin's async `serve`, the body limits, the answer when
//! `graceful_timeout` cuts a request, and the in-flight record each request keeps in the worker
//! table. It never accepts connections, never talks to the master, and calls plugin code only
//! through [`LoadedPlugin`].

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};

use super::abi_io::{self, ResponseBody};
use super::loader::Dispatch;
use super::{
    Connection, HOST_BUILD, HOST_VERSION, INLINE_LIMIT, Shared, UpgradeGuard, head_timeout,
    monotonic_ns,
};

/// Counts a request in flight for as long as it is held, and records it in the worker table,
/// where the master finds it if this worker dies or hangs before the request is done. With
/// counters, [`InFlight::answered`] counts its answer; dropped without it, it was cancelled.
struct InFlight<'a> {
    shared: &'a Shared,
    record: Option<usize>,
    /// CLOCK_MONOTONIC (ns) when it began; 0 without a worker table.
    began_ns: u64,
    answered: bool,
}

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared, method: &http::Method, path: &str) -> Self {
        let served = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if served == shared.recycle_after {
            let base = shared.recycle_after.saturating_sub(shared.recycle_jitter);
            let reason = format!(
                "served {served} requests (max_requests {base} + jitter {})",
                shared.recycle_jitter
            );
            let _ = shared.recycle_tx.send((reason, false));
        }
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut began_ns = 0;
        let record = shared.accept_table.as_ref().and_then(|(table, cell)| {
            began_ns = monotonic_ns();
            table.begin(*cell, method.as_str(), path, began_ns / 1000)
        });
        if let Some(c) = shared.counters {
            c.begin();
        }
        InFlight {
            shared,
            record,
            began_ns,
            answered: false,
        }
    }

    /// Counts the answer: its status class, the time since the request began (until its
    /// response head is ready), and its body bytes (a streamed body counts as it is sent).
    /// `ready_ns` is the clock reading when the response was ready, or 0 to read it here.
    fn answered(&mut self, resp: &mut Response<ResponseBody>, ready_ns: u64) {
        let Some(c) = self.shared.counters else {
            return;
        };
        self.answered = true;
        let now = if ready_ns == 0 {
            monotonic_ns()
        } else {
            ready_ns
        };
        let us = now.saturating_sub(self.began_ns) / 1000;
        c.answered(resp.status().as_u16(), us);
        match resp.body_mut() {
            ResponseBody::Full(Some(b)) => c.response_body(b.len() as u64),
            ResponseBody::Full(None) => {}
            ResponseBody::Stream(s) => s.count_into(c.response_bytes()),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = self.shared.counters
            && !self.answered
        {
            c.cancelled();
        }
        if let Some((table, cell)) = &self.shared.accept_table {
            table.end(*cell, self.record);
        }
    }
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The built-in routes: compiled into `host`, so they stay frozen across reloads.
fn builtin(req: &Request<Incoming>) -> Response<Bytes> {
    match req.uri().path() {
        "/_host/health"
            if req.method() == http::Method::GET || req.method() == http::Method::HEAD =>
        {
            let mut resp = plain(
                StatusCode::OK,
                format!(
                    "{{\"status\":\"ok\",\"host_version\":\"{HOST_VERSION}\",\"version\":\"{HOST_VERSION}\",\"build\":\"{HOST_BUILD}\"}}\n"
                ),
            );
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        "/_host/health" => plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        _ => plain(StatusCode::NOT_FOUND, "no such built-in route\n"),
    }
}

/// How this request runs: the plugin's answer, unless an "inline" path was caught stalling.
fn dispatch_of(shared: &Shared, req: &Request<Incoming>) -> Dispatch {
    let path = req.uri().path();
    match shared.plugin.dispatch(req.method(), path) {
        Dispatch::Inline if shared.known_slow(path) => Dispatch::Blocking,
        d => d,
    }
}

/// An inline handler with no body to read: called right here, synchronously (it cannot be cut
/// by `graceful_timeout` halfway, so it needs none of the machinery around the other calls).
/// `began_ns` is when the request began (its [`InFlight`] clock reading, or 0 for none); returns
/// the response and the clock reading when it was ready, so one request reads the clock twice.
fn call_inline(
    shared: &Shared,
    req: Request<Incoming>,
    began_ns: u64,
) -> (Response<ResponseBody>, u64) {
    let (parts, _) = req.into_parts();
    let began_ns = if began_ns == 0 {
        monotonic_ns()
    } else {
        began_ns
    };
    let resp = shared.plugin.handle(&parts, &Bytes::new());
    let ended_ns = monotonic_ns();
    let took = Duration::from_nanos(ended_ns.saturating_sub(began_ns));
    if took > INLINE_LIMIT {
        shared.mark_slow(parts.uri.path(), took);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let refused = refuse_switch(
            "it came from a synchronous `handle` (upgrades need `serve`, Dispatch::Async)",
        );
        return (refused, ended_ns);
    }
    (resp, ended_ns)
}

async fn call_plugin(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    dispatch: Dispatch,
) -> Response<ResponseBody> {
    if dispatch == Dispatch::Async {
        return call_async(shared, req).await;
    }
    let (parts, body) = req.into_parts();
    let body = if body.is_end_stream() {
        Bytes::new() // most GETs: nothing to read or buffer
    } else {
        let collect = Limited::new(body, shared.max_body_bytes).collect();
        let Ok(collected) = tokio::time::timeout(shared.body_read_timeout, collect).await else {
            let mut resp = plain(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {}\n",
                    humantime::format_duration(shared.body_read_timeout)
                ),
            );
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp.map(ResponseBody::full);
        };
        match collected {
            Ok(collected) => {
                let body = collected.to_bytes();
                if let Some(c) = shared.counters {
                    c.request_bytes()
                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                }
                body
            }
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {} bytes\n", shared.max_body_bytes),
                )
                .map(ResponseBody::full);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the request body");
                return plain(StatusCode::BAD_REQUEST, "cannot read the request body\n")
                    .map(ResponseBody::full);
            }
        }
    };
    // Handlers may block, so by default each call runs on the blocking pool. A handler the plugin
    // declares non-blocking runs right here on the I/O thread (no hand-off), unless its path has
    // been caught taking too long.
    let resp = if dispatch == Dispatch::Inline {
        let began = std::time::Instant::now();
        let resp = shared.plugin.handle(&parts, &body);
        let took = began.elapsed();
        if took > INLINE_LIMIT {
            shared.mark_slow(parts.uri.path(), took);
        }
        resp
    } else {
        let plugin = shared.plugin.clone();
        let path = parts.uri.path().to_string();
        match shared.pool.run(move || plugin.handle(&parts, &body)).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::error!(error = %e, path, "request task failed");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
                    .map(ResponseBody::full);
            }
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return refuse_switch(
            "it came from a synchronous `handle` (upgrades need `serve`, Dispatch::Async)",
        );
    }
    resp
}

/// A `101 Switching Protocols` the host cannot honour is never sent: `500`, and the log says why.
fn refuse_switch(why: &str) -> Response<ResponseBody> {
    tracing::error!(
        "the plugin answered 101 Switching Protocols, which the host cannot honour: {why}; answered 500"
    );
    plain(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal server error: an upgrade the server cannot perform\n",
    )
    .map(ResponseBody::full)
}

/// An async handler: the body streams in as the client sends it (each chunk waited for at most
/// `body_read_timeout`), the response may stream out, and an HTTP/1.1 `Upgrade` request may be
/// taken over after its `101`.
async fn call_async(shared: &Arc<Shared>, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let wants_upgrade =
        req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
    let on_upgrade = wants_upgrade
        .then(|| req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    let (upgrade, watch) = match on_upgrade {
        Some(on) => {
            let (raw, watch) = abi_io::upgrade(on, Box::new(UpgradeGuard::new(shared)));
            (raw, Some(watch))
        }
        None => (plugin_api::ffi::RawUpgrade::NONE, None),
    };
    let (parts, body) = req.into_parts();
    let counted = shared.counters.map(|c| c.request_bytes());
    let body = abi_io::request_body(body, shared.body_read_timeout, counted);
    let serving = shared.plugin.serve(&parts, body, upgrade);
    tokio::pin!(serving);
    // Each poll runs plugin code on the I/O thread: one that blocks stalls every connection
    // of this worker, so it is named in the log (once per path).
    let mut resp = std::future::poll_fn(|cx| {
        let _serving = super::loader::serving(parts.uri.path());
        let began = std::time::Instant::now();
        let polled = serving.as_mut().poll(cx);
        let took = began.elapsed();
        if took > INLINE_LIMIT {
            shared.note_blocking_poll(parts.uri.path(), took);
        }
        polled
    })
    .await;
    if let ResponseBody::Stream(s) = resp.body_mut() {
        s.answers(&parts.uri);
        let settled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(resp.body_mut().settle(cx))).await;
        if let Err(error) = settled {
            tracing::error!(%error, path = parts.uri.path(), "the plugin's response body failed before anything was sent; answered 500");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
                .map(ResponseBody::full);
        }
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        match watch {
            Some(w) if w.kept() => {}
            Some(_) => {
                return refuse_switch(
                    "the handler dropped the request's OnUpgrade (keep it: plugin_api::upgrade::on)",
                );
            }
            None if parts.version != Version::HTTP_11 => {
                return refuse_switch("upgrades exist only in HTTP/1.1");
            }
            None => return refuse_switch("the request did not ask for an upgrade"),
        }
    }
    resp
}

pub(super) async fn handle(
    conn: Arc<Connection>,
    req: Request<Incoming>,
) -> Result<Response<head_timeout::BusyBody<ResponseBody>>, Infallible> {
    let busy = conn.watch.busy();
    let shared = &conn.shared;
    let h2 = req.version() == Version::HTTP_2;
    if h2 && !conn.is_h2.swap(true, Ordering::Relaxed) {
        conn.watch.exempt();
        conn.first_h2_request.notify_one();
    }
    conn.note_request(&req);
    let mut in_flight = InFlight::new(shared, req.method(), req.uri().path());
    // When the response was ready, if already read from the clock.
    let mut ready_ns = 0;
    let mut resp = if req.uri().path().starts_with("/_host/") {
        builtin(&req).map(ResponseBody::full)
    } else if let dispatch = dispatch_of(shared, &req)
        && !(dispatch == Dispatch::Inline && req.body().is_end_stream())
    {
        let mut cut = shared.cut_rx.clone();
        tokio::select! {
            biased;
            resp = call_plugin(shared, req, dispatch) => resp,
            Ok(_) = cut.wait_for(|c| *c) => {
                // `graceful_timeout` reached with this request still running: an answer the
                // client can act on instead of a closed connection.
                shared.cut_answered.fetch_add(1, Ordering::SeqCst);
                let mut resp = plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the worker serving this request is shutting down; retry\n",
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                resp.map(ResponseBody::full)
            }
        }
    } else {
        let (resp, ended_ns) = call_inline(shared, req, in_flight.began_ns);
        ready_ns = ended_ns;
        resp
    };
    if !h2
        && (shared.draining.load(Ordering::Relaxed)
            || shared.retiring.load(Ordering::Relaxed)
            || shared.hand_off_one(&conn))
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    in_flight.answered(&mut resp, ready_ns);
    Ok(resp.map(|body| head_timeout::BusyBody::new(body, busy)))
}
