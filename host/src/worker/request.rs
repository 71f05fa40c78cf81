//! One request's path through a worker: the built-in `/_host/` routes, the choice between the
//! I/O thread, the blocking pool and the plugin's async `serve`, the body limits, the answer when
//! `graceful_timeout` cuts a request or the blocking pool's queue is full (`503` with
//! `Retry-After`), and the in-flight record each request keeps in the worker table.
//!
//! A request whose client leaves (hyper drops its future: the HTTP/1 connection closed, the
//! HTTP/2 stream reset) cancels its work: a blocking call's pool job is cancelled (see `pool`),
//! and an async handler's future is dropped with it, which stops it at its next await.
//!
//! It never accepts connections, never talks to the master, and calls plugin code only through
//! [`LoadedPlugin`](super::loader::LoadedPlugin). It is the hottest path and depends only
//! downward: on the connection's state ([`Connection`]), the worker's shared parts
//! ([`Shared`]) and the modules that own them (balance, recycling, slow paths, the drain), never
//! on the connection task or the event loop above it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};

use super::abi_io::{self, ResponseBody};
use super::builtin::plain;
use super::calls::Dispatch;
use super::clock::Stamp;
use super::conn_state::{Connection, UpgradeGuard};
use super::first_poll::FirstPoll;
use super::head_timeout;
use super::shared::Shared;
use super::slow_paths::INLINE_LIMIT;
use crate::counters::Limit;
use crate::ratelimit::RateLimit;

/// The warning for requests refused because the blocking pool's queue is full.
static QUEUE_FULL_WARNING: RateLimit = RateLimit::per_second();

/// Counts a request in flight for as long as it is held, and records it in the worker table,
/// where the master finds it if this worker dies or hangs before the request is done. With
/// counters, [`InFlight::answered`] counts its answer; dropped without it, it was cancelled.
/// It holds the request's handle on its connection, so a request that outlives [`call`] carries
/// everything it needs in one place.
struct InFlight {
    conn: Arc<Connection>,
    record: Option<usize>,
    /// When it began; `None` without a worker table (nothing to record or count).
    began: Option<Stamp>,
    answered: bool,
    /// Its access-log line, when there is an access log.
    access: Option<super::access_log::Line>,
}

impl InFlight {
    fn new(conn: Arc<Connection>, method: &http::Method, path: &str) -> Self {
        let shared = &*conn.shared;
        let served = shared.tally.requests.fetch_add(1, Ordering::Relaxed) + 1;
        shared.recycle.served(served);
        shared.tally.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut began = None;
        let record = shared.table.as_ref().and_then(|(table, cell)| {
            let now = Stamp::now();
            began = Some(now);
            table.begin(*cell, method.as_str(), path, now.as_us())
        });
        if let Some(c) = shared.counters {
            c.begin();
        }
        InFlight {
            conn,
            record,
            began,
            answered: false,
            access: None,
        }
    }

    fn shared(&self) -> &Shared {
        &self.conn.shared
    }

    /// Counts the answer: its status class, the time since the request began (until its
    /// response head is ready), and its body bytes (a streamed body counts as it is sent).
    /// `ready` is the clock reading when the response was ready, or `None` to read it here.
    fn answered(&mut self, resp: &mut Response<ResponseBody>, ready: Option<Stamp>) {
        let Some(c) = self.shared().counters else {
            return;
        };
        self.answered = true;
        let now = ready.unwrap_or_else(Stamp::now);
        let us = self.began.map_or(0, |began| now.micros_since(began));
        c.answered(resp.status().as_u16(), us);
        match resp.body_mut() {
            ResponseBody::Full(Some(b)) => c.response_body(b.len() as u64),
            ResponseBody::Full(None) => {}
            ResponseBody::Stream(s) => s.count_into(c.response_bytes()),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let shared = &*self.conn.shared;
        shared.tally.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = shared.counters
            && !self.answered
        {
            c.cancelled();
        }
        if let Some((table, cell)) = &shared.table {
            table.end(*cell, self.record);
        }
    }
}

/// How this request runs: the plugin's answer, unless an "inline" path was caught stalling.
fn dispatch_of(shared: &Shared, req: &Request<Incoming>) -> Dispatch {
    let path = req.uri().path();
    match shared.plugin.dispatch(req.method(), path) {
        Dispatch::Inline if shared.slow_paths.known_slow(path) => Dispatch::Blocking,
        d => d,
    }
}

/// An inline handler, called right here on the I/O thread (it cannot be cut by
/// `graceful_timeout` halfway, so it needs none of the machinery around the other calls) and
/// timed: a path caught holding the I/O thread longer than [`INLINE_LIMIT`] by its own doing
/// (CPU time or a blocking call, [`super::thread_clock`]) runs on the blocking pool from then
/// on ([`super::slow_paths`]: a first slow call makes it a suspect, the next one is judged). `began` is a clock reading taken before (the request's [`InFlight`] one), or `None` to
/// read it here; returns the answer and the clock reading when it was ready, so a request with
/// no body reads the clock twice.
fn call_inline(
    shared: &Shared,
    parts: &http::request::Parts,
    body: &Bytes,
    began: Option<Stamp>,
) -> (Response<ResponseBody>, Stamp) {
    let began = began.unwrap_or_else(Stamp::now);
    let path = parts.uri.path();
    // A path under suspicion is timed by its thread's own clock too (a reading costs a system
    // call, so only then): see `SlowPaths::inline_call_took`.
    let suspect = shared.slow_paths.suspected(path);
    let baseline = suspect
        .then(|| super::thread_clock::baseline(began))
        .flatten();
    let resp = shared.plugin.handle(parts, body, None);
    let ended = Stamp::now();
    let took = ended.since(began);
    if took > INLINE_LIMIT {
        let own_doing = suspect.then(|| match (baseline, super::thread_clock::Reading::now()) {
            (Some(b), Some(e)) => b.blocked_since(&e, took, INLINE_LIMIT),
            // Without readings (never on Linux), the wall clock decides.
            _ => true,
        });
        shared.slow_paths.inline_call_took(path, took, own_doing);
    }
    (sync_answer(resp), ended)
}

/// Reads a request body for a synchronous handler, whole: within `max_body_bytes` and
/// `body_read_timeout`, else the answer that says which.
async fn read_body(shared: &Shared, body: Incoming) -> Result<Bytes, Response<ResponseBody>> {
    let limits = &shared.limits;
    let collect = Limited::new(body, limits.max_body_bytes).collect();
    let Ok(collected) = tokio::time::timeout(limits.body_read_timeout, collect).await else {
        if let Some(c) = shared.counters {
            c.limit_hit(Limit::BodyReadTimeout);
        }
        let mut resp = plain(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {}\n",
                humantime::format_duration(limits.body_read_timeout)
            ),
        );
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(resp.map(ResponseBody::full));
    };
    match collected {
        Ok(collected) => {
            let body = collected.to_bytes();
            if let Some(c) = shared.counters {
                c.request_bytes()
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
            }
            Ok(body)
        }
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            if let Some(c) = shared.counters {
                c.limit_hit(Limit::BodyTooLarge);
            }
            Err(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {} bytes\n", limits.max_body_bytes),
            )
            .map(ResponseBody::full))
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the request body");
            Err(
                plain(StatusCode::BAD_REQUEST, "cannot read the request body\n")
                    .map(ResponseBody::full),
            )
        }
    }
}

/// Calls a synchronous handler with its whole body: on the blocking pool by default; a handler
/// the plugin declares non-blocking runs right here on the I/O thread (no hand-off), unless its
/// path has been caught taking too long.
async fn call_sync(
    shared: &Arc<Shared>,
    parts: http::request::Parts,
    body: Bytes,
    dispatch: Dispatch,
) -> Response<ResponseBody> {
    if dispatch != Dispatch::Inline {
        return on_pool(shared, parts, body).await;
    }
    call_inline(shared, &parts, &body, None).0
}

/// Queues a synchronous handler's call on the blocking pool at once; the future waits for its
/// answer and holds little else (dropped, it cancels the call). A full queue answers `503`.
fn on_pool(
    shared: &Arc<Shared>,
    parts: http::request::Parts,
    body: Bytes,
) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
    let plugin = shared.plugin.clone();
    let uri = parts.uri.clone();
    let running = shared
        .pool
        .run(move |cancel| plugin.handle(&parts, &body, Some(cancel)));
    if let Err(full) = &running {
        if let Some(c) = shared.counters {
            c.limit_hit(Limit::PoolQueueFull);
        }
        if let Some(more) = QUEUE_FULL_WARNING.hit_named("blocking queue full") {
            tracing::warn!(
                queued = full.queued,
                more_refused_not_logged = more,
                path = super::slow_paths::shorten(uri.path()),
                "the blocking pool's queue is full (blocking_queue); answered 503"
            );
        }
    }
    async move {
        let running = match running {
            Ok(running) => running,
            Err(_) => return busy_answer(),
        };
        match running.await {
            Ok(resp) => sync_answer(resp),
            Err(e) => {
                tracing::error!(error = %e, path = uri.path(), "request task failed");
                plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
                    .map(ResponseBody::full)
            }
        }
    }
}

/// `503` with `Retry-After`: the blocking pool's queue is full.
fn busy_answer() -> Response<ResponseBody> {
    let mut resp = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is busy; retry\n",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp.map(ResponseBody::full)
}

/// A synchronous handler's answer, unless it is a `101`, which only `serve` can give.
fn sync_answer(resp: Response<ResponseBody>) -> Response<ResponseBody> {
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

/// An async handler's call: the body streams in as the client sends it (each chunk waited for
/// at most `body_read_timeout`), the response may stream out, and an HTTP/1.1 `Upgrade` request
/// may be taken over after its `101`. Polled in place first (most handlers answer at once), then
/// moved into the request's boxed future if it must wait.
struct AsyncCall {
    parts: http::request::Parts,
    serving: super::calls::ServeCall,
    watch: Option<abi_io::UpgradeWatch>,
    /// Where wakers kept from the first poll in [`call`] send their wakes (see
    /// [`first_poll`](super::first_poll)).
    relay: Option<Arc<super::first_poll::Relay>>,
}

impl AsyncCall {
    fn start(shared: &Arc<Shared>, mut req: Request<Incoming>) -> AsyncCall {
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
        let body = abi_io::request_body(body, shared.limits.body_read_timeout, shared.counters);
        let serving = shared.plugin.serve(&parts, body, upgrade);
        AsyncCall {
            parts,
            serving,
            watch,
            relay: None,
        }
    }

    /// Polls the plugin's future, then settles a streamed body and checks a `101` (see
    /// [`AsyncCall::complete`]): the whole answer, ready or not.
    fn poll_answer(
        &mut self,
        shared: &Shared,
        cx: &mut Context<'_>,
    ) -> Poll<Response<ResponseBody>> {
        let Poll::Ready((resp, _)) = self.poll_serving(shared, cx, None) else {
            return Poll::Pending;
        };
        Poll::Ready(self.complete(resp, cx))
    }

    /// Polls the plugin's future once, and gives its answer with the clock reading when it was
    /// ready. `began` is a clock reading taken just before, or `None` to read it here. Each poll
    /// runs plugin code on the I/O thread: one that blocks stalls every connection of this
    /// worker, so it is named in the log (once per path), judged by the thread's CPU time and
    /// voluntary switches ([`super::thread_clock`]), never by a wall clock a busy machine
    /// stretches.
    fn poll_serving(
        &mut self,
        shared: &Shared,
        cx: &mut Context<'_>,
        began: Option<Stamp>,
    ) -> Poll<(Response<ResponseBody>, Stamp)> {
        if let Some(relay) = &self.relay {
            relay.register(cx.waker());
        }
        let path = self.parts.uri.path();
        let began_at = began.unwrap_or_else(Stamp::now);
        let began = super::thread_clock::baseline(began_at);
        let polled = {
            let _serving = super::callbacks::serving(path);
            Pin::new(&mut self.serving).poll(cx)
        };
        let ended = Stamp::now();
        let took = ended.since(began_at);
        // Judged on what the thread did, not on the wall clock alone: a poll that only waited
        // for a CPU on a busy machine is not the handler's doing.
        if took > INLINE_LIMIT
            && let (Some(began), Some(ended)) = (began, super::thread_clock::Reading::now())
            && began.blocked_since(&ended, took, INLINE_LIMIT)
        {
            shared.slow_paths.note_blocking_poll(path, took);
        }
        polled.map(|resp| (resp, ended))
    }

    /// The answer, from the plugin's response: a streamed body settled (see
    /// [`ResponseBody::settle`], which may poll it with `cx`), a `101` checked.
    fn complete(
        &self,
        mut resp: Response<ResponseBody>,
        cx: &mut Context<'_>,
    ) -> Response<ResponseBody> {
        let path = self.parts.uri.path();
        if let ResponseBody::Stream(s) = resp.body_mut() {
            s.answers(&self.parts.uri);
            if let Some(relay) = &self.relay {
                // The plugin may have polled the body in its first poll, with the stand-in.
                s.relay_wakes(relay.clone());
            }
            if let Err(error) = resp.body_mut().settle(cx) {
                tracing::error!(%error, path, "the plugin's response body failed before anything was sent; answered 500");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
                    .map(ResponseBody::full);
            }
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let why = match &self.watch {
                Some(w) if w.kept() => return resp,
                Some(_) => {
                    "the handler dropped the request's OnUpgrade (keep it: plugin_api::upgrade::on)"
                }
                None if self.parts.version != Version::HTTP_11 => "upgrades exist only in HTTP/1.1",
                None => "the request did not ask for an upgrade",
            };
            return refuse_switch(why);
        }
        resp
    }
}

/// The response future hyper holds for one request: the answer itself when [`call`] could give
/// it at once, else the rest of the request, boxed. Small either way: hyper moves it, and a
/// request answered at once (the common case) costs no allocation.
#[allow(
    clippy::large_enum_variant,
    reason = "boxing the ready answer would cost the allocation this type exists to avoid"
)]
pub(super) enum Answer {
    Ready(Option<Response<head_timeout::BusyBody<ResponseBody>>>),
    Later(Pin<Box<dyn Future<Output = Response<head_timeout::BusyBody<ResponseBody>>> + Send>>),
}

impl Future for Answer {
    type Output = Result<Response<head_timeout::BusyBody<ResponseBody>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Ready(resp) => Poll::Ready(Ok(resp.take().expect("polled after it was ready"))),
            Answer::Later(rest) => rest.as_mut().poll(cx).map(Ok),
        }
    }
}

/// Takes one request. What can be answered without waiting is answered here, synchronously:
/// the built-in routes, an inline handler with no body, and an async handler whose future is
/// ready on its first poll. The rest (a body to read, the blocking pool, an async handler that
/// waits) continues in a boxed future, which `graceful_timeout` can cut.
pub(super) fn call(conn: Arc<Connection>, req: Request<Incoming>) -> Answer {
    let busy = conn.watch.busy();
    let h2 = req.version() == Version::HTTP_2;
    conn.note_request(&req);
    let mut in_flight = InFlight::new(conn, req.method(), req.uri().path());
    in_flight.access = super::access_log::Line::begin(&req, in_flight.began);
    let shared = &in_flight.conn.shared;
    if req.uri().path().starts_with("/_host/") {
        let resp = super::builtin::route(&req).map(ResponseBody::full);
        return Answer::Ready(Some(finish(in_flight, resp, None, busy, h2)));
    }
    let dispatch = dispatch_of(shared, &req);
    if dispatch == Dispatch::Inline && req.body().is_end_stream() {
        let (parts, _) = req.into_parts();
        let (resp, ready) = call_inline(shared, &parts, &Bytes::new(), in_flight.began);
        return Answer::Ready(Some(finish(in_flight, resp, Some(ready), busy, h2)));
    }
    if dispatch == Dispatch::Async {
        let mut call = AsyncCall::start(shared, req);
        // The first poll, here, with a stand-in for the task's waker (see `first_poll`). A whole
        // body needs nothing more: answered here. A stream is settled, and a future that waits
        // is polled, from the boxed rest, with the task's waker.
        let first = FirstPoll::default();
        let polled = first.with_waker(|waker| {
            let cx = &mut Context::from_waker(waker);
            call.poll_serving(shared, cx, in_flight.began)
                .map(|(resp, ready)| match resp.body() {
                    ResponseBody::Stream(_) => (resp, ready, false),
                    ResponseBody::Full(_) => (call.complete(resp, cx), ready, true),
                })
        });
        call.relay = first.into_relay();
        return match polled {
            Poll::Ready((resp, ready, true)) => {
                Answer::Ready(Some(finish(in_flight, resp, Some(ready), busy, h2)))
            }
            Poll::Ready((resp, ready, false)) => {
                let mut resp = Some(resp);
                Answer::Later(Box::pin(async move {
                    let resp = std::future::poll_fn(move |cx| {
                        Poll::Ready(call.complete(resp.take().expect("polled once"), cx))
                    })
                    .await;
                    finish(in_flight, resp, Some(ready), busy, h2)
                }))
            }
            Poll::Pending => Answer::Later(Box::pin(async move {
                let resp = {
                    let shared = &*in_flight.conn.shared;
                    cuttable(
                        shared,
                        std::future::poll_fn(|cx| call.poll_answer(shared, cx)),
                    )
                    .await
                };
                finish(in_flight, resp, None, busy, h2)
            })),
        };
    }
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        // On the blocking pool (an inline handler with no body was answered above): queued now,
        // so the future holds only the wait.
        let answer = on_pool(shared, parts, Bytes::new());
        return Answer::Later(Box::pin(async move {
            let resp = cuttable(&in_flight.conn.shared, answer).await;
            finish(in_flight, resp, None, busy, h2)
        }));
    }
    Answer::Later(Box::pin(async move {
        let mut in_flight = in_flight;
        let shared = in_flight.conn.shared.clone();
        let access = &mut in_flight.access;
        let call = async {
            match read_body(&shared, body).await {
                Ok(body) => {
                    // The body as read: exact even without a `Content-Length`.
                    if let Some(line) = access {
                        line.received(body.len());
                    }
                    call_sync(&shared, parts, body, dispatch).await
                }
                Err(resp) => resp,
            }
        };
        let resp = cuttable(&shared, call).await;
        finish(in_flight, resp, None, busy, h2)
    }))
}

/// Runs a plugin call until it answers, or until `graceful_timeout` is reached with it still
/// running: then a `503` the client can act on instead of a closed connection.
async fn cuttable(
    shared: &Shared,
    answer: impl Future<Output = Response<ResponseBody>>,
) -> Response<ResponseBody> {
    tokio::select! {
        biased;
        resp = answer => resp,
        () = shared.cut.wait() => {
            shared.cut.note_answered();
            let mut resp = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the worker serving this request is shutting down; retry\n",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp.map(ResponseBody::full)
        }
    }
}

/// The last touches on an answer: `Connection: close` when this HTTP/1 connection should end
/// (never on a `101`),
/// the answer counted, and the body tied to the connection's busy mark.
fn finish(
    mut in_flight: InFlight,
    mut resp: Response<ResponseBody>,
    ready: Option<Stamp>,
    busy: head_timeout::Busy,
    h2: bool,
) -> Response<head_timeout::BusyBody<ResponseBody>> {
    let shared = in_flight.shared();
    // A `101` hands the connection over: `Connection: close` would break the handshake (the
    // client needs `Connection: Upgrade`), and the upgraded connection is the plugin's to end.
    let upgrading = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if !h2
        && !upgrading
        && (shared.drain.is_draining()
            || shared.recycle.retiring()
            || shared.balance.hand_off_one(in_flight.conn.staying()))
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    in_flight.answered(&mut resp, ready);
    let line = in_flight.access.take().map(|mut line| {
        line.status(resp.status().as_u16());
        line
    });
    resp.map(|body| head_timeout::BusyBody::new(body, busy).with_line(line))
}
