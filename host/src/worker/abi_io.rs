//! The host's side of the ABI 1.3 objects that outlive one call: the request body and the
//! upgrade handle the host makes for an async handler, the upgraded connection it hands over
//! after a `101`, and the plugin's streamed response body the host reads.
//!
//! Each object the host makes is a `Box` behind a `RawObject` whose vtable functions live here;
//! the plugin polls them (from its own threads too, one at a time) and drops them exactly once
//! through their `drop`. The two body crossings and the chunks are `plugin-api`'s shared handles
//! ([`plugin_api::ffi::body`], [`plugin_api::ffi::chunk`], whose docs hold the ownership rules):
//! this module adds what is the host's own, the request body's stall timer and counters, and
//! the upgrade objects. Nothing here runs plugin code except through a plugin-made object's
//! vtable. No function here unwinds across the ABI: every entry point catches panics.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::counters::{Counters, Limit};
use std::task::{Context, Poll};
use std::time::Duration;

use async_ffi::FfiContext;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use plugin_api::ffi::body::ForeignBody;
use plugin_api::ffi::{IoVTable, RawBody, RawIo, RawUpgrade, UpgradeVTable, poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

// ---------------------------------------------------------------------------------------------
// The request body, streamed to an async handler.

/// An async request's body as the plugin reads it: hyper's body, with `body_read_timeout` as
/// the longest wait for each next chunk (a stalled upload fails instead of holding its handler).
struct RequestBody {
    incoming: Incoming,
    idle: Duration,
    stalled: Pin<Box<tokio::time::Sleep>>,
    /// Where the bytes read (and a stall past `body_read_timeout`) are counted: the worker's
    /// request counters, if any.
    counted: Option<&'static Counters>,
}

/// The request body as a [`RawBody`] for the plugin (`NONE` when it is empty); the bytes the
/// plugin reads are added to `counted`.
pub fn request_body(
    incoming: Incoming,
    idle: Duration,
    counted: Option<&'static Counters>,
) -> RawBody {
    if incoming.is_end_stream() {
        return RawBody::NONE;
    }
    plugin_api::ffi::body::export(RequestBody {
        incoming,
        idle,
        stalled: Box::pin(tokio::time::sleep(idle)),
        counted,
    })
}

impl plugin_api::ffi::body::Export for RequestBody {}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    /// The message the plugin reads.
    type Error = String;

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        let body = &mut *self;
        match Pin::new(&mut body.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                    let next = tokio::time::Instant::now() + body.idle;
                    body.stalled.as_mut().reset(next);
                    if let Some(c) = body.counted {
                        c.request_bytes()
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(format!("request body: {e}")))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if body.stalled.as_mut().poll(cx).is_ready() {
                    if let Some(c) = body.counted {
                        c.limit_hit(Limit::BodyReadTimeout);
                    }
                    return Poll::Ready(Some(Err(format!(
                        "request body stalled: no data for {} (body_read_timeout)",
                        humantime::format_duration(body.idle)
                    ))));
                }
                Poll::Pending
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upgrades.

/// Keeps an upgraded connection (and the handle that may become one) counted as open, so a
/// drain waits for it; released when the plugin drops it.
pub type OpenGuard = Box<dyn Send>;

/// What the request handler learns about the upgrade handle it gave the plugin.
#[derive(Clone, Default)]
pub struct UpgradeWatch(Arc<AtomicBool>);

impl UpgradeWatch {
    /// Whether the plugin still holds the handle (so it can take the connection after a 101).
    pub fn kept(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

struct UpgradeState {
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    kept: UpgradeWatch,
    guard: Option<OpenGuard>,
}

/// The upgrade handle for an HTTP/1.1 request that asked for one; `guard` keeps the connection
/// counted from now until the plugin drops the handle or the connection it becomes.
pub fn upgrade(
    on_upgrade: hyper::upgrade::OnUpgrade,
    guard: OpenGuard,
) -> (RawUpgrade, UpgradeWatch) {
    let kept = UpgradeWatch(Arc::new(AtomicBool::new(true)));
    let state = Box::new(UpgradeState {
        on_upgrade: Some(on_upgrade),
        kept: kept.clone(),
        guard: Some(guard),
    });
    (
        RawUpgrade {
            state: Box::into_raw(state) as *mut c_void,
            vtable: &UPGRADE,
        },
        kept,
    )
}

static UPGRADE: UpgradeVTable = UpgradeVTable {
    poll_upgraded,
    drop: upgrade_drop,
};

unsafe extern "C" fn poll_upgraded(
    state: *mut c_void,
    cx: *mut FfiContext<'_>,
    out: *mut RawIo,
) -> u8 {
    // SAFETY: the live `Box<UpgradeState>`, polled by one thread at a time; `cx`, `out` valid.
    let (up, cx) = unsafe { (&mut *(state as *mut UpgradeState), &mut *cx) };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        let Some(on_upgrade) = up.on_upgrade.as_mut() else {
            return (poll::ERROR, RawIo::NONE);
        };
        match cx.with_context(|cx| Pin::new(on_upgrade).poll(cx)) {
            Poll::Pending => (poll::PENDING, RawIo::NONE),
            Poll::Ready(Ok(upgraded)) => {
                up.on_upgrade = None;
                let io = Box::new(UpgradedIo {
                    io: TokioIo::new(upgraded),
                    _guard: up.guard.take(),
                });
                (
                    poll::READY,
                    RawIo {
                        state: Box::into_raw(io) as *mut c_void,
                        vtable: &UPGRADED_IO,
                    },
                )
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upgrade did not happen");
                up.on_upgrade = None;
                (poll::ERROR, RawIo::NONE)
            }
        }
    }));
    let (status, io) = polled.unwrap_or((poll::ERROR, RawIo::NONE));
    // SAFETY: valid out-pointer (above).
    unsafe { out.write(io) };
    status
}

unsafe extern "C" fn upgrade_drop(state: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the `Box<UpgradeState>` made by `upgrade`, dropped once by the plugin.
        let up = unsafe { Box::from_raw(state as *mut UpgradeState) };
        up.kept.0.store(false, Ordering::SeqCst);
    });
}

/// An upgraded connection lent to the plugin.
struct UpgradedIo {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _guard: Option<OpenGuard>,
}

static UPGRADED_IO: IoVTable = IoVTable {
    poll_read: io_poll_read,
    poll_write: io_poll_write,
    poll_flush: io_poll_flush,
    poll_shutdown: io_poll_shutdown,
    drop: io_drop,
};

fn io_status<T>(polled: std::thread::Result<Poll<std::io::Result<T>>>, done: impl FnOnce(T)) -> u8 {
    match polled {
        Ok(Poll::Pending) => poll::PENDING,
        Ok(Poll::Ready(Ok(v))) => {
            done(v);
            poll::READY
        }
        Ok(Poll::Ready(Err(e))) => {
            tracing::debug!(error = %e, "upgraded connection failed");
            poll::ERROR
        }
        Err(_) => poll::ERROR,
    }
}

unsafe extern "C" fn io_poll_read(
    state: *mut c_void,
    cx: *mut FfiContext<'_>,
    buf: *mut u8,
    cap: usize,
    done: *mut usize,
) -> u8 {
    // SAFETY: the live `Box<UpgradedIo>` (one thread at a time); `buf` has `cap` writable bytes
    // (initialized by the plugin's `ReadBuf`); `cx` and `done` are valid.
    let (io, cx, buf) = unsafe {
        (
            &mut *(state as *mut UpgradedIo),
            &mut *cx,
            std::slice::from_raw_parts_mut(buf, cap),
        )
    };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        cx.with_context(|cx| {
            let mut rb = ReadBuf::new(buf);
            Pin::new(&mut io.io)
                .poll_read(cx, &mut rb)
                .map_ok(|()| rb.filled().len())
        })
    }));
    // SAFETY: valid out-pointer.
    io_status(polled, |n| unsafe { done.write(n) })
}

unsafe extern "C" fn io_poll_write(
    state: *mut c_void,
    cx: *mut FfiContext<'_>,
    buf: *const u8,
    len: usize,
    done: *mut usize,
) -> u8 {
    // SAFETY: the live `Box<UpgradedIo>`; `buf` has `len` readable bytes; `cx`, `done` valid.
    let (io, cx, buf) = unsafe {
        (
            &mut *(state as *mut UpgradedIo),
            &mut *cx,
            std::slice::from_raw_parts(buf, len),
        )
    };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        cx.with_context(|cx| Pin::new(&mut io.io).poll_write(cx, buf))
    }));
    // SAFETY: valid out-pointer.
    io_status(polled, |n| unsafe { done.write(n) })
}

unsafe extern "C" fn io_poll_flush(state: *mut c_void, cx: *mut FfiContext<'_>) -> u8 {
    // SAFETY: the live `Box<UpgradedIo>`; `cx` valid.
    let (io, cx) = unsafe { (&mut *(state as *mut UpgradedIo), &mut *cx) };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        cx.with_context(|cx| Pin::new(&mut io.io).poll_flush(cx))
    }));
    io_status(polled, |()| ())
}

unsafe extern "C" fn io_poll_shutdown(state: *mut c_void, cx: *mut FfiContext<'_>) -> u8 {
    // SAFETY: the live `Box<UpgradedIo>`; `cx` valid.
    let (io, cx) = unsafe { (&mut *(state as *mut UpgradedIo), &mut *cx) };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        cx.with_context(|cx| Pin::new(&mut io.io).poll_shutdown(cx))
    }));
    io_status(polled, |()| ())
}

unsafe extern "C" fn io_drop(state: *mut c_void) {
    // SAFETY: the `Box<UpgradedIo>` made in `poll_upgraded`, dropped once by the plugin.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(state as *mut UpgradedIo) }));
}

// ---------------------------------------------------------------------------------------------
// The plugin's response bodies.

/// The body of an HTTP response the worker sends: whole, or streamed from the plugin.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Stream(PluginStream),
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> ResponseBody {
        ResponseBody::Full(Some(bytes))
    }

    /// Polls a streamed body (twice at most) before its head is sent: one that is already
    /// complete becomes whole, so it goes out with `Content-Length` in one write instead of
    /// chunked; what a longer one already yielded is kept, in order, for hyper's first polls.
    /// A whole body is left as it is. A body that fails in these polls is an `Err` with its
    /// message: nothing was sent yet, so the caller can still answer `500`.
    pub fn settle(&mut self, cx: &mut Context<'_>) -> Result<(), String> {
        let ResponseBody::Stream(stream) = self else {
            return Ok(());
        };
        let mut first = None;
        loop {
            match stream.poll_plugin(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    *self = ResponseBody::Full(first);
                    return Ok(());
                }
                Poll::Ready(Some(Err(message))) => return Err(message),
                Poll::Ready(Some(Ok(chunk))) if first.is_none() => first = Some(chunk),
                Poll::Ready(Some(Ok(chunk))) => {
                    stream.ahead.extend(first.take().map(Ok));
                    stream.ahead.push_back(Ok(chunk));
                    return Ok(());
                }
            }
        }
        stream.ahead.extend(first.map(Ok));
        Ok(())
    }
}

/// A streamed response body made by the plugin, polled only when hyper can send more; the
/// bytes sent are added to its counter, if it has one.
pub struct PluginStream {
    raw: ForeignBody,
    counter: Option<&'static AtomicU64>,
    /// What [`ResponseBody::settle`] polled before the head was sent, to be sent first.
    ahead: std::collections::VecDeque<Result<Bytes, String>>,
    /// The request's, for the log if the body fails.
    uri: Option<http::Uri>,
    /// Where wakers the plugin kept from the first poll of its `serve` future send their wakes
    /// (see [`first_poll`](super::first_poll)): each poll of the body registers its waker there.
    relay: Option<Arc<super::first_poll::Relay>>,
}

impl PluginStream {
    /// # Safety
    /// `raw` must be a body object made by the plugin (not `NONE`), owned by the caller.
    pub unsafe fn new(raw: RawBody) -> PluginStream {
        PluginStream {
            // SAFETY: the caller's contract.
            raw: unsafe { ForeignBody::from_raw(raw) },
            counter: None,
            ahead: Default::default(),
            uri: None,
            relay: None,
        }
    }

    /// Names the request in the log line of a failure.
    pub fn answers(&mut self, uri: &http::Uri) {
        self.uri = Some(uri.clone());
    }

    /// Counts the bytes of the chunks sent from now on into `counter`.
    pub fn count_into(&mut self, counter: &'static AtomicU64) {
        self.counter = Some(counter);
    }

    /// Sends the wakes of wakers kept from a stand-in (see [`first_poll`](super::first_poll)) to
    /// the waker of each later poll of this body.
    pub fn relay_wakes(&mut self, relay: Arc<super::first_poll::Relay>) {
        self.relay = Some(relay);
    }

    /// The plugin's next chunk, or the message of its error.
    fn poll_plugin(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, String>>> {
        if let Some(relay) = &self.relay {
            relay.register(cx.waker());
        }
        let _serving = self
            .uri
            .as_ref()
            .map(|u| super::callbacks::serving(u.path()));
        self.raw.poll_chunk(cx)
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            ResponseBody::Stream(s) => {
                let polled = match s.ahead.pop_front() {
                    Some(polled) => polled,
                    None => match s.poll_plugin(cx) {
                        Poll::Ready(Some(polled)) => polled,
                        Poll::Ready(None) => return Poll::Ready(None),
                        Poll::Pending => return Poll::Pending,
                    },
                };
                Poll::Ready(Some(match polled {
                    Ok(chunk) => {
                        if let Some(c) = s.counter {
                            c.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                        Ok(Frame::data(chunk))
                    }
                    Err(message) => {
                        let path = s.uri.as_ref().map_or("", |u| u.path());
                        tracing::warn!(error = %message, path, "the plugin's response body failed; the response is cut");
                        Err(message.into())
                    }
                }))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            ResponseBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Stream(s) => match s.raw.exact_len() {
                Some(n) if s.ahead.is_empty() => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}
