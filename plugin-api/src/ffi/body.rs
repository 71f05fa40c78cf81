//! [`RawBody`]'s two handles: [`export`] (a body this side made, polled and dropped by the other
//! side through a vtable here) and [`ForeignBody`] (a body the other side made, owned and polled
//! here). The host exports the request body and imports a plugin's streamed response body; the
//! plugin does the reverse, with the same code.
//!
//! Each chunk crosses as a [`chunk`](super::chunk), freed by its maker. Empty data frames and
//! trailers are not passed on. No function here unwinds across the ABI: each entry point catches
//! panics, and an exported body that panics ends with an `ERROR` chunk naming the panic.

use std::any::Any;
use std::ffi::c_void;
use std::fmt::Display;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use async_ffi::{ContextExt as _, FfiContext};
use bytes::Bytes;
use http_body::Body;

use super::chunk::{self, Chunk};
use super::{BodyVTable, RawBody, RawChunk, poll};

/// What [`export`] needs of a body besides `http_body::Body`: this side's own context around
/// each call into it, and the message of a panic caught in a poll. The defaults add nothing.
pub trait Export: Body<Data = Bytes, Error: Display> + Send + Sized + 'static {
    /// Held around each poll and the drop (the plugin enters its runtime's context).
    fn enter() -> impl Sized {}

    /// The `ERROR` chunk's message (and the log line's) for a panic caught in a poll.
    fn panic_message(payload: &(dyn Any + Send)) -> String {
        format!("body panicked: {}", panic_text(payload))
    }
}

/// Moves `body` across the ABI: the other side polls it through the returned object's vtable
/// (one thread at a time) and drops it exactly once. An error's `Display` becomes the `ERROR`
/// chunk's message.
pub fn export<B: Export>(body: B) -> RawBody {
    RawBody {
        state: Box::into_raw(Box::new(body)).cast(),
        vtable: &Exported::<B>::VTABLE,
    }
}

/// The vtable of an exported `B`, one `static` per body type.
struct Exported<B>(PhantomData<B>);

impl<B: Export> Exported<B> {
    const VTABLE: BodyVTable = BodyVTable {
        poll_chunk: Self::poll_chunk,
        exact_len: Self::exact_len,
        drop: Self::drop,
    };

    unsafe extern "C" fn poll_chunk(
        state: *mut c_void,
        cx: *mut FfiContext<'_>,
        out: *mut RawChunk,
    ) -> u8 {
        let _cx = B::enter();
        // SAFETY: `state` is the `Box<B>` made by `export`, polled by one thread at a time (the
        // ABI's rules); `cx` and `out` are valid for the call.
        let (body, cx) = unsafe { (&mut *state.cast::<B>(), &mut *cx) };
        // SAFETY: `B` stays in its box until `drop`: never moved.
        let mut body = unsafe { Pin::new_unchecked(body) };
        let polled = catch_unwind(AssertUnwindSafe(|| {
            cx.with_context(|cx| {
                loop {
                    match body.as_mut().poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) if data.is_empty() => continue,
                            Ok(data) => return (poll::READY, chunk::lend(data)),
                            Err(_trailers) => continue,
                        },
                        Poll::Ready(Some(Err(e))) => {
                            return (poll::ERROR, chunk::lend_message(e.to_string()));
                        }
                        Poll::Ready(None) => return (poll::END, RawChunk::EMPTY),
                        Poll::Pending => return (poll::PENDING, RawChunk::EMPTY),
                    }
                }
            })
        }));
        let (status, chunk) = polled.unwrap_or_else(|payload| {
            let message = B::panic_message(&*payload);
            tracing::error!("{message}");
            (poll::ERROR, chunk::lend_message(message))
        });
        // SAFETY: a valid out-pointer (above).
        unsafe { out.write(chunk) };
        status
    }

    unsafe extern "C" fn exact_len(state: *const c_void) -> u64 {
        // SAFETY: the live `Box<B>` made by `export`.
        let body = unsafe { &*state.cast::<B>() };
        catch_unwind(AssertUnwindSafe(|| body.size_hint().exact()))
            .ok()
            .flatten()
            .unwrap_or(u64::MAX)
    }

    unsafe extern "C" fn drop(state: *mut c_void) {
        let _cx = B::enter();
        // SAFETY: the `Box<B>` made by `export`; the other side drops it exactly once.
        let body = unsafe { Box::from_raw(state.cast::<B>()) };
        if catch_unwind(AssertUnwindSafe(|| std::mem::drop(body))).is_err() {
            tracing::error!("dropping a body panicked");
        }
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// A body the other side made, owned here: polled for its chunks, dropped through its own vtable.
pub struct ForeignBody(RawBody);

// SAFETY: body objects may be polled and dropped from any thread, one at a time (the ABI's
// rules); polling takes `&mut self`.
unsafe impl Send for ForeignBody {}

impl ForeignBody {
    /// # Safety
    /// `raw` must be a body object the other side made (not `NONE`), owned by the caller.
    pub unsafe fn from_raw(raw: RawBody) -> ForeignBody {
        ForeignBody(raw)
    }

    /// The next chunk (without a copy: given back when its last `Bytes` drops), the end, or the
    /// body's error message.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, String>>> {
        let mut raw = RawChunk::EMPTY;
        let (state, vt) = (self.0.state, self.0.vtable);
        // SAFETY: the live body object (`from_raw`'s contract); `raw` is a valid out-pointer;
        // the maker's function catches panics.
        let status = cx.with_ffi_context(|fcx| unsafe { ((*vt).poll_chunk)(state, fcx, &mut raw) });
        match status {
            poll::PENDING => Poll::Pending,
            poll::END => Poll::Ready(None),
            // SAFETY: a chunk the maker just wrote, now ours.
            poll::READY => Poll::Ready(Some(Ok(unsafe { Chunk::from_raw(raw) }.into_bytes()))),
            // SAFETY: as above (an `ERROR` chunk carries the message).
            _ => Poll::Ready(Some(Err(unsafe { Chunk::from_raw(raw) }.into_message()))),
        }
    }

    /// The body's remaining length, when the maker knows it exactly.
    pub fn exact_len(&self) -> Option<u64> {
        // SAFETY: the live body object; the maker's function catches panics.
        match unsafe { ((*self.0.vtable).exact_len)(self.0.state) } {
            u64::MAX => None,
            n => Some(n),
        }
    }
}

impl Drop for ForeignBody {
    fn drop(&mut self) {
        // SAFETY: the live body object, dropped exactly once, here; the maker catches panics.
        unsafe { ((*self.0.vtable).drop)(self.0.state) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields its chunks one per poll (an empty one in between), then an error or the end.
    struct Chunks(Vec<&'static str>, Option<&'static str>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = String;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, String>>> {
            if self.0.is_empty() {
                return Poll::Ready(self.1.take().map(|e| Err(e.to_string())));
            }
            let next = self.0.remove(0);
            if next == "panic" {
                panic!("in the body");
            }
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                next.as_bytes(),
            )))))
        }
    }

    impl Export for Chunks {}
    impl Export for http_body_util::Full<Bytes> {}

    fn read_all(body: impl Export) -> Vec<Result<Bytes, String>> {
        // SAFETY: exported just here, owned by the handle.
        let mut foreign = unsafe { ForeignBody::from_raw(export(body)) };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut seen = Vec::new();
        while let Poll::Ready(Some(item)) = foreign.poll_chunk(&mut cx) {
            let failed = item.is_err();
            seen.push(item);
            if failed {
                break;
            }
        }
        seen
    }

    #[test]
    fn an_exported_body_reads_back_through_the_abi_chunk_by_chunk() {
        let seen = read_all(Chunks(vec!["a", "", "bc"], None));
        assert_eq!(seen, vec![Ok(Bytes::from("a")), Ok(Bytes::from("bc"))]);
        let seen = read_all(Chunks(vec!["a"], Some("producer failed")));
        assert_eq!(
            seen,
            vec![Ok(Bytes::from("a")), Err("producer failed".to_string())]
        );
        let whole = String::from("whole");
        // SAFETY: exported just here.
        let foreign =
            unsafe { ForeignBody::from_raw(export(http_body_util::Full::new(Bytes::from(whole)))) };
        assert_eq!(foreign.exact_len(), Some(5));
    }

    #[test]
    fn a_body_that_panics_ends_with_an_error_naming_the_panic() {
        let seen = read_all(Chunks(vec!["a", "panic"], None));
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1], Err("body panicked: in the body".to_string()));
    }
}
