//! [`Body`]: the body of an async request or response, whole or streamed, and its crossing of
//! the ABI in both directions.
//!
//! A request body made by the host arrives as a [`RawBody`] and is read here chunk by chunk,
//! each chunk given back to the host when dropped (no copy). A response body is exported the
//! same way: the host polls it only when the connection can take more, so a slow client slows
//! the producer. Both crossings are the shared handles of [`ffi::body`](crate::ffi::body); this
//! module adds what is the plugin's own: its runtime's context around each poll and drop, and a
//! panic's location in the message ([`Export`](crate::ffi::body::Export)).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::BoxError;
use crate::ffi::RawBody;
use crate::ffi::body::ForeignBody;

/// The body of an async request or response: empty, whole, or a stream of chunks.
///
/// Build one from bytes or a string (`Body::from("hi")`), from a `Stream` of chunks
/// ([`Body::from_stream`]) or from any [`http_body::Body`] ([`Body::new`]). Read one with
/// [`Body::to_bytes`] (with a size limit) or frame by frame with [`BodyExt::frame`].
pub struct Body(Inner);

enum Inner {
    Full(Option<Bytes>),
    Host(ForeignBody),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

/// Why [`Body::to_bytes`] failed.
#[derive(Debug)]
pub enum BodyError {
    /// The body is longer than the limit given.
    TooLarge { limit: usize },
    /// The client went away, stalled past the host's `body_read_timeout`, or the producer failed.
    Read(BoxError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => write!(f, "body exceeds {limit} bytes"),
            BodyError::Read(e) => write!(f, "cannot read the body: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

impl Body {
    /// No body.
    pub fn empty() -> Body {
        Body(Inner::Full(None))
    }

    /// Wraps any `http_body::Body` with `Bytes` chunks (an `axum::body::Body`, a
    /// `StreamBody`...).
    pub fn new<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Body(Inner::Boxed(body.map_err(Into::into).boxed_unsync()))
    }

    /// A body streamed from `stream`: each item is sent as it comes (chunked on HTTP/1.1, DATA
    /// frames on HTTP/2), and the stream is polled only as fast as the client reads. An `Err`
    /// item aborts the response (the client sees a truncated body, not a clean end).
    pub fn from_stream<S, T, E>(stream: S) -> Body
    where
        S: futures_core::Stream<Item = Result<T, E>> + Send + 'static,
        T: Into<Bytes>,
        E: Into<BoxError>,
    {
        Body::new(StreamBody(stream))
    }

    /// Reads the whole body into memory, failing once it exceeds `limit` bytes: the limit a
    /// streaming route sets for itself (the host's `max_body_bytes` applies to [`Plugin::handle`](crate::Plugin::handle)).
    pub async fn to_bytes(self, limit: usize) -> Result<Bytes, BodyError> {
        http_body_util::Limited::new(self, limit)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    BodyError::TooLarge { limit }
                } else {
                    BodyError::Read(e)
                }
            })
    }

    /// The whole body, when it is known without polling (built from bytes).
    pub(crate) fn take_full(&mut self) -> Option<Bytes> {
        match &mut self.0 {
            Inner::Full(b) => Some(b.take().unwrap_or_default()),
            _ => None,
        }
    }

    /// Polls a streamed response body twice at most (enough for one chunk and the end) with the
    /// handler's context, before the response goes to the host: a body that has already ended becomes
    /// whole, so the host sends it with its length and never calls back into the plugin for
    /// it; a longer one keeps the chunks polled here in front of the rest. An error here comes
    /// before anything was sent. Whole bodies, and a request body passed back as the
    /// response, are left as they are.
    pub(crate) fn settle(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        if !matches!(self.0, Inner::Boxed(_)) {
            return Ok(());
        }
        let mut ahead = std::collections::VecDeque::new();
        for _ in 0..2 {
            match Pin::new(&mut *self).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    // At most one chunk came before the end (two polls).
                    self.0 = Inner::Full(ahead.pop_front());
                    return Ok(());
                }
                Poll::Ready(Some(Err(e))) => return Err(e),
                Poll::Ready(Some(Ok(frame))) => {
                    // Empty chunks carry nothing; trailers are not passed on.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        ahead.push_back(data);
                    }
                }
            }
        }
        if !ahead.is_empty() {
            let rest = std::mem::take(self);
            *self = Body::new(Prefixed { ahead, rest });
        }
        Ok(())
    }

    /// The host's request body (`NONE`: empty).
    ///
    /// # Safety
    /// `raw` must be a body object made by the host, owned by the caller.
    pub(crate) unsafe fn from_host(raw: RawBody) -> Body {
        if raw.is_none() {
            Body::empty()
        } else {
            // SAFETY: the caller's contract.
            Body(Inner::Host(unsafe { ForeignBody::from_raw(raw) }))
        }
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::empty()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Inner::Full(_) => "Body(full)",
            Inner::Host(_) => "Body(request stream)",
            Inner::Boxed(_) => "Body(stream)",
        })
    }
}

macro_rules! body_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Body {
            fn from(v: $t) -> Body {
                Body(Inner::Full(Some(Bytes::from(v))))
            }
        }
    )*};
}
body_from!(Bytes, String, &'static str, &'static [u8], Vec<u8>);

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Inner::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Inner::Host(h) => h
                .poll_chunk(cx)
                .map(|c| c.map(|c| c.map(Frame::data).map_err(Into::into))),
            Inner::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Inner::Host(_) => false,
            Inner::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Host(h) => h
                .exact_len()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            Inner::Boxed(b) => b.size_hint(),
        }
    }
}

/// Chunks already polled, then the rest of the body.
pub(crate) struct Prefixed<B> {
    ahead: std::collections::VecDeque<Bytes>,
    rest: B,
}

impl<B> Prefixed<B> {
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn new(first: Bytes, rest: B) -> Self {
        Prefixed {
            ahead: [first].into(),
            rest,
        }
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.ahead.pop_front() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead: u64 = self.ahead.iter().map(|b| b.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// A `Stream` of chunks as an `http_body::Body`.
struct StreamBody<S>(S);

impl<S, T, E> http_body::Body for StreamBody<S>
where
    S: futures_core::Stream<Item = Result<T, E>>,
    T: Into<Bytes>,
{
    type Data = Bytes;
    type Error = E;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        // SAFETY: `StreamBody` is a transparent wrapper; the stream is never moved out of it.
        let stream = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        stream
            .poll_next(cx)
            .map(|item| item.map(|r| r.map(|c| Frame::data(c.into()))))
    }
}

/// Exports a response body to the host as a [`RawBody`].
pub(crate) fn export(body: Body) -> RawBody {
    crate::ffi::body::export(body)
}

/// A response body as the host polls it: inside the plugin runtime's context, a panic named
/// with its location.
impl crate::ffi::body::Export for Body {
    fn enter() -> impl Sized {
        crate::runtime::enter()
    }

    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        format!(
            "response body panicked: {}",
            crate::export::describe_panic(payload)
        )
    }
}
