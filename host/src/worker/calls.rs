//! The per-request calls across the ABI on a [`LoadedPlugin`]: how a request runs
//! (`dispatch`), the synchronous `handle`, the async `serve` (its future polled as a
//! [`ServeCall`]), `on_drain`; and the host's response built from the plugin's.
//!
//! The request's head crosses as borrowed views of hyper's parts, with each header name's code
//! for a plugin that reads them (ABI 1.6), made with `plugin-api`'s shared handles
//! ([`plugin_api::ffi::head`]); the response's headers are copied back and checked with them.
//! A whole response body is handed to hyper without a copy and given back to the plugin when
//! hyper drops it; a streamed one is [`abi_io`](super::abi_io)'s. Loading the plugin is
//! [`loader`](super::loader)'s; nothing here opens a library or reads its header.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::catch_unwind;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use plugin_api::ffi::head::{self, Values};
use plugin_api::ffi::{
    self, RawAsyncRequest, RawAsyncResponse, RawBody, RawHandleRequest, RawHeader, RawRequest,
    RawResponse, RawStr, RawUpgrade,
};

use super::abi_io::{PluginStream, ResponseBody};
use super::callbacks::{plugin_panicked, serving};
use super::loader::LoadedPlugin;
use super::pool::Cancel;

/// How a request runs (the plugin's `dispatch`, or `may_block` for plugins before ABI 1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    Inline,
    Blocking,
    Async,
}

/// Calls `f` with a borrowed [`RawRequest`] view of `parts` and `body`, and the header names'
/// codes when `coded` (a plugin that reads them), else null.
fn with_raw_head<T>(
    parts: &http::request::Parts,
    body: &Bytes,
    coded: bool,
    f: impl FnOnce(&RawRequest, *const u8) -> T,
) -> T {
    // Views into `parts`, on the stack for up to 16 headers.
    let headers = head::views::<[RawHeader; 16]>(&parts.headers);
    let codes = match coded {
        true => head::codes::<[u8; 16]>(&parts.headers),
        false => Default::default(),
    };
    let codes_ptr = match coded {
        true => codes.as_ptr(),
        false => std::ptr::null(),
    };
    let uri_owned;
    let uri: &str = match (parts.uri.scheme(), parts.uri.path_and_query()) {
        (None, Some(pq)) => pq.as_str(),
        _ => {
            uri_owned = parts.uri.to_string();
            &uri_owned
        }
    };
    let req = RawRequest {
        method: RawStr::new(parts.method.as_str().as_bytes()),
        uri: RawStr::new(uri.as_bytes()),
        version: head::version_code(parts.version),
        headers: headers.as_ptr(),
        headers_len: headers.len(),
        body: RawStr::new(body),
    };
    f(&req, codes_ptr)
}

/// Polls a plugin future, turning a panic that escaped it (the plugin-side shim already catches
/// the handler's) into `None` instead of unwinding through the worker.
struct NoUnwind<F>(F);

impl<F: Future + Unpin> Future for NoUnwind<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(&mut self.0).poll(cx)
        })) {
            Ok(p) => p.map(Some),
            Err(_) => std::task::Poll::Ready(None),
        }
    }
}

/// One call of the plugin's async `serve`: resolves to the host's response (a `500` if the
/// plugin's future panicked across the ABI). `Unpin`, so it can be polled where it was made and
/// moved afterwards; it owns everything it needs, and the plugin state stays alive until the
/// worker exits, after every request is done.
pub struct ServeCall {
    fut: NoUnwind<async_ffi::FfiFuture<RawAsyncResponse>>,
    free: unsafe extern "C" fn(*mut c_void),
}

impl Future for ServeCall {
    type Output = http::Response<ResponseBody>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let free = self.free;
        std::pin::Pin::new(&mut self.fut)
            .poll(cx)
            .map(|raw| match raw {
                // SAFETY: `raw` is what the plugin's `serve` future resolved to, now ours.
                Some(raw) => unsafe { response_from(raw.head, raw.stream, free) },
                None => {
                    plugin_panicked();
                    tracing::error!("the plugin's future panicked across the ABI; answered 500");
                    let mut resp = http::Response::new(ResponseBody::full(Bytes::from_static(
                        b"internal server error\n",
                    )));
                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    resp
                }
            })
    }
}

/// Builds the host's response from the plugin's: headers copied into host memory, the body
/// lent without a copy (whole) or streamed (`stream`), freed on the plugin's side when done.
///
/// # Safety
/// `raw` and `stream` must come from the plugin whose `free_response` is `free`, owned by the
/// caller.
unsafe fn response_from(
    raw: RawResponse,
    stream: RawBody,
    free: unsafe extern "C" fn(*mut c_void),
) -> http::Response<ResponseBody> {
    // From here on, the plugin's allocation is owned by `owned` and freed when it drops.
    let owned = PluginBody {
        body: raw.body,
        owner: raw.owner,
        free,
    };
    let status = StatusCode::from_u16(raw.status).unwrap_or_else(|_| {
        tracing::error!(
            status = raw.status,
            "plugin returned an invalid status code; answering 500"
        );
        StatusCode::INTERNAL_SERVER_ERROR
    });
    // SAFETY: `headers` points to `headers_len` views, valid until `owned` drops; the fields are
    // copied into host memory here, and checked.
    let (_, map) = unsafe {
        let fields = head::fields(raw.headers, raw.headers_len);
        head::read_headers(fields, None, b"", Values::Checked, |name| {
            tracing::warn!(name = %String::from_utf8_lossy(name), "plugin returned an invalid header; dropped");
            Ok::<(), std::convert::Infallible>(())
        })
    }
    .unwrap_or_else(|never| match never {});
    let body = if stream.is_none() {
        ResponseBody::full(Bytes::from_owner(owned))
    } else {
        drop(owned);
        // SAFETY: the plugin's body object, now ours (the caller's contract).
        ResponseBody::Stream(unsafe { PluginStream::new(stream) })
    };
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = map;
    resp
}

/// A response body owned by the plugin, handed to hyper without a copy and given back to the
/// plugin to free when hyper drops it.
struct PluginBody {
    body: RawStr,
    owner: *mut c_void,
    free: unsafe extern "C" fn(*mut c_void),
}

// SAFETY: the plugin's response memory is plain heap memory not tied to the thread that made it,
// and `free_response` may be called from any thread (the ABI's ownership rules).
unsafe impl Send for PluginBody {}

impl AsRef<[u8]> for PluginBody {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: valid until `free_response(owner)`, which only `drop` calls.
        unsafe { self.body.as_bytes() }
    }
}

impl Drop for PluginBody {
    fn drop(&mut self) {
        // SAFETY: `owner` came from this plugin's `handle` and is freed exactly once, here.
        unsafe { (self.free)(self.owner) }
    }
}

impl LoadedPlugin {
    /// How a request with this method and path runs.
    pub fn dispatch(&self, method: &http::Method, path: &str) -> Dispatch {
        let (m, p) = (
            RawStr::new(method.as_str().as_bytes()),
            RawStr::new(path.as_bytes()),
        );
        match (&self.hooks.async_hooks, self.hooks.may_block) {
            // SAFETY: `state` is live; the strings are borrowed for the call; the shim catches panics.
            (Some(h), _) => match unsafe { (h.dispatch)(self.state, m, p) } {
                ffi::dispatch::INLINE => Dispatch::Inline,
                ffi::dispatch::ASYNC => Dispatch::Async,
                _ => Dispatch::Blocking,
            },
            // SAFETY: as above.
            (None, Some(may_block)) => match unsafe { may_block(self.state, m, p) } {
                false => Dispatch::Inline,
                true => Dispatch::Blocking,
            },
            (None, None) => Dispatch::Blocking,
        }
    }

    /// Tells the plugin its worker drains (ABI 1.3; older plugins are not told).
    pub fn on_drain(&self) {
        if let Some(h) = &self.hooks.async_hooks {
            // SAFETY: `state` is live; the shim catches panics.
            unsafe { (h.on_drain)(self.state) }
        }
    }

    /// Calls the plugin's `handle`, with the request's cancellation when it has one (a pool
    /// job's). Blocks for as long as the handler does.
    pub fn handle(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        cancel: Option<&Arc<Cancel>>,
    ) -> http::Response<ResponseBody> {
        let _serving = serving(parts.uri.path());
        with_raw_head(
            parts,
            body,
            self.hooks.reads_name_codes,
            |head, name_codes| {
                let ext = RawHandleRequest {
                    // SAFETY: a bitwise copy of views that outlive the call.
                    head: unsafe { std::ptr::read(head) },
                    cancel: cancel.map_or(std::ptr::null(), |c| Arc::as_ptr(c).cast()),
                    name_codes,
                };
                let mut raw = RawResponse::EMPTY;
                let req = (&raw const ext).cast::<RawRequest>();
                // SAFETY: `state` is live (only `stop` frees it, taking `self` by value), `req` and
                // everything it points to outlive the call (the token's `Arc` too: `cancel` is
                // borrowed for it), and `raw` is a valid out-pointer. A plugin older than 1.4 reads
                // the pointer as its `RawRequest`, the first field.
                unsafe { (self.hooks.handle)(self.state, req, &mut raw) };
                // SAFETY: `raw` was just written by the plugin's `handle`.
                unsafe { self.response(raw, RawBody::NONE) }
            },
        )
    }

    /// Starts the plugin's async `serve` (ABI 1.3 plugins; [`Dispatch::Async`] is never returned
    /// for others). `body` and `upgrade` move to the plugin. The future owns everything it needs:
    /// the plugin state stays alive until the worker exits, after every request is done.
    pub fn serve(
        &self,
        parts: &http::request::Parts,
        body: RawBody,
        upgrade: RawUpgrade,
    ) -> ServeCall {
        let hooks = self
            .hooks
            .async_hooks
            .as_ref()
            .expect("dispatch said async");
        let serve = hooks.serve;
        let state = self.state;
        let _serving = serving(parts.uri.path());
        let coded = self.hooks.reads_name_codes;
        let fut = with_raw_head(parts, &Bytes::new(), coded, move |head, name_codes| {
            let req = RawAsyncRequest {
                // SAFETY: a bitwise copy of views that outlive the call.
                head: unsafe { std::ptr::read(head) },
                body,
                upgrade,
                name_codes,
            };
            // SAFETY: `state` is live; `req`'s views outlive the call, and its objects move to
            // the plugin; the shim catches panics.
            unsafe { serve(state, &req) }
        });
        ServeCall {
            fut: NoUnwind(fut),
            free: self.hooks.free_response,
        }
    }

    /// # Safety
    /// `raw` and `stream` must come from this plugin and be owned by the caller.
    unsafe fn response(&self, raw: RawResponse, stream: RawBody) -> http::Response<ResponseBody> {
        // SAFETY: forwarded.
        unsafe { response_from(raw, stream, self.hooks.free_response) }
    }
}
