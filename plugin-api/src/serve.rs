//! The ABI 1.3 shims for async handlers: `dispatch`, `serve` and `on_drain`.
//!
//! `serve` turns the host's request into an `http::Request<Body>`, calls [`Plugin::serve`], and
//! hands the host an FFI-safe future (`async_ffi`) that, each time the host polls it, enters the
//! plugin's runtime and polls the handler inside `catch_unwind`: a panic resolves to a `500`
//! for that request, never an unwind across the ABI.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use async_ffi::{FfiFuture, FutureExt as _};
use bytes::Bytes;
use http::StatusCode;

use crate::ffi::{RawAsyncRequest, RawAsyncResponse, RawBody, RawStr, dispatch as codes};
use crate::{Body, Dispatch, Plugin};

pub(crate) unsafe extern "C" fn dispatch<P: Plugin>(
    state: *const std::ffi::c_void,
    method: RawStr,
    path: RawStr,
) -> u8 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `state` is live until `on_worker_stop`; the strings are borrowed for this call.
        let plugin = unsafe { &*(state as *const P) };
        let (method, path) = unsafe { (method.as_bytes(), path.as_bytes()) };
        match (std::str::from_utf8(method), std::str::from_utf8(path)) {
            (Ok(m), Ok(p)) => match plugin.dispatch(m, p) {
                Dispatch::Inline => codes::INLINE,
                Dispatch::Blocking => codes::BLOCKING,
                Dispatch::Async => codes::ASYNC,
            },
            _ => codes::BLOCKING,
        }
    }))
    .unwrap_or(codes::BLOCKING)
}

pub(crate) unsafe extern "C" fn on_drain(_state: *const std::ffi::c_void) {
    let _ = catch_unwind(crate::runtime::begin_drain);
}

pub(crate) unsafe extern "C" fn serve<P: Plugin>(
    state: *const std::ffi::c_void,
    req: *const RawAsyncRequest,
) -> FfiFuture<RawAsyncResponse> {
    let _rt = crate::runtime::enter();
    // SAFETY: the host passes a valid request; `body` and `upgrade` move to us here, exactly once.
    // Its `name_codes` exist when the host sent its table of header names (ABI 1.6).
    let (head, body, upgrade, name_codes) = unsafe {
        let req = &*req;
        (
            &req.head,
            std::ptr::read(&req.body),
            std::ptr::read(&req.upgrade),
            match crate::ffi::head::host_names().is_some() {
                true => req.name_codes,
                false => std::ptr::null(),
            },
        )
    };
    // SAFETY: both objects were made by the host and are ours now.
    let body = unsafe { Body::from_host(body) };
    let upgrade =
        (!upgrade.is_none()).then(|| unsafe { crate::upgrade::OnUpgrade::from_host(upgrade) });
    let started = catch_unwind(AssertUnwindSafe(|| {
        let parts = crate::export::to_parts(head, name_codes)?;
        let mut req = http::Request::from_parts(parts, body);
        if let Some(up) = upgrade {
            req.extensions_mut().insert(up);
        }
        // SAFETY: `state` is the plugin value, which the host keeps alive until every future it
        // got from `serve` is dropped (`on_worker_stop` runs after the last one).
        let plugin: &'static P = unsafe { &*(state as *const P) };
        Ok::<_, String>(plugin.serve(req))
    }));
    match started {
        Ok(Ok(fut)) => Guarded {
            fut: std::mem::ManuallyDrop::new(fut),
        }
        .into_ffi(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "request could not be converted");
            std::future::ready(into_raw(plain(StatusCode::BAD_REQUEST, "bad request\n"))).into_ffi()
        }
        Err(payload) => std::future::ready(panicked(&*payload)).into_ffi(),
    }
}

fn plain(status: StatusCode, text: &'static str) -> http::Response<Body> {
    let mut resp = http::Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    resp
}

fn panicked(payload: &(dyn std::any::Any + Send)) -> RawAsyncResponse {
    crate::export::report_panic();
    tracing::error!(
        panic = %crate::export::describe_panic(payload),
        "handler panicked; answered 500"
    );
    into_raw(plain(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal server error\n",
    ))
}

/// The handler's response with its body settled (see [`Body::settle`]): one that fails before
/// anything was sent becomes a `500`.
fn settled(resp: http::Response<Body>, cx: &mut Context<'_>) -> http::Response<Body> {
    let (parts, mut body) = resp.into_parts();
    match body.settle(cx) {
        Ok(()) => http::Response::from_parts(parts, body),
        Err(e) => {
            tracing::error!(error = %e, "the response body failed before anything was sent; answered 500");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
        }
    }
}

/// Moves a response to the host: a whole body inline, any other as a stream.
fn into_raw(resp: http::Response<Body>) -> RawAsyncResponse {
    let (parts, mut body) = resp.into_parts();
    let (whole, stream) = match body.take_full() {
        Some(bytes) => (bytes, RawBody::NONE),
        None => (Bytes::new(), crate::body::export(body)),
    };
    RawAsyncResponse {
        head: crate::export::raw_response(parts, whole),
        stream,
    }
}

/// Polls (and drops) the handler's future inside the plugin's runtime, and polls it inside
/// `catch_unwind`.
struct Guarded<F> {
    fut: std::mem::ManuallyDrop<F>,
}

impl<F> Drop for Guarded<F> {
    fn drop(&mut self) {
        // A request the client gave up on is dropped by the host, on its thread: tokio
        // resources in the future may need the plugin runtime's context to deregister.
        let _rt = crate::runtime::enter();
        // SAFETY: dropped exactly once, here; never used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.fut) }
    }
}

impl<F: Future<Output = http::Response<Body>>> Future for Guarded<F> {
    type Output = RawAsyncResponse;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RawAsyncResponse> {
        let _rt = crate::runtime::enter();
        // SAFETY: a structural pin projection: `fut` is never moved out of `Guarded` (its `Drop`
        // drops it in place).
        let fut = unsafe { self.map_unchecked_mut(|g| &mut *g.fut) };
        match catch_unwind(AssertUnwindSafe(|| {
            fut.poll(cx).map(|resp| settled(resp, cx))
        })) {
            Ok(Poll::Ready(resp)) => Poll::Ready(into_raw(resp)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(panicked(&*payload)),
        }
    }
}
