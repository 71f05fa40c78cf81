//! `send_timeout`: a connection whose writes make no progress for that long is closed.
//!
//! A client that stops reading (a tiny receive window over HTTP/1, a 2^31 HTTP/2 window and no
//! reads, an upgraded WebSocket it never reads) fills the kernel's send buffer; from then on
//! every write is refused and, without a deadline, the connection and whatever its responses
//! buffer stay forever. This wrapper starts a timer when a write is refused (`Pending`) and
//! stops it at the next write that moves a byte; if it fires first, the write fails with
//! `TimedOut`, which ends the connection in hyper (and an upgraded one in the plugin's hands).
//! As nginx's `send_timeout`: the time between two successful writes, not for a whole response.
//!
//! A write that goes through at once costs nothing more than the call; the timer (one boxed
//! `Sleep` per connection, made the first time a write waits) is armed only while one waits.
//!
//! A client that grants no HTTP/2 flow-control window makes no write wait (nothing is written):
//! `head_timeout`'s sweep finds those, and counts and logs them through [`note_hit`].
//!
//! Owns: the deadline on one connection's writes, its count (`Limit::SendTimeout`) and its
//! rate-limited log line. Never reads, reorders or buffers bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::counters::{Counters, Limit};

pub(crate) struct SendTimeout<T> {
    io: T,
    timeout: Duration,
    /// Made the first time a write waits; armed while one waits.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    timed_out: bool,
    counters: Option<&'static Counters>,
}

impl<T> SendTimeout<T> {
    pub(crate) fn new(io: T, timeout: Duration, counters: Option<&'static Counters>) -> Self {
        SendTimeout {
            io,
            timeout,
            timer: None,
            armed: false,
            timed_out: false,
            counters,
        }
    }

    fn error() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "send_timeout: the client read nothing for too long",
        )
    }

    /// What a write (or flush) returned: progress disarms, a wait arms the timer and polls it.
    fn after<R>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match res {
            Poll::Pending => {}
            ready => {
                self.armed = false;
                return ready;
            }
        }
        let deadline = Instant::now() + self.timeout;
        let timer = match &mut self.timer {
            Some(timer) if self.armed => timer,
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timed_out = true;
        note_hit(self.counters, self.timeout);
        Poll::Ready(Err(Self::error()))
    }
}

/// A connection closed at `send_timeout` (here, or by `head_timeout`'s sweep for a response
/// stalled without a window): counted, and logged at most once a second.
pub(crate) fn note_hit(counters: Option<&'static Counters>, timeout: Duration) {
    if let Some(counters) = counters {
        counters.limit_hit(Limit::SendTimeout);
    }
    static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();
    if let Some(suppressed) = LOG.hit(&io::ErrorKind::TimedOut.into()) {
        tracing::warn!(
            timeout = %humantime::format_duration(timeout),
            suppressed,
            "closed a connection whose client took nothing for send_timeout"
        );
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(Self::error()));
        }
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(Self::error()));
        }
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(Self::error()));
        }
        let res = Pin::new(&mut this.io).poll_flush(cx);
        this.after(cx, res)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(Self::error()));
        }
        let res = Pin::new(&mut this.io).poll_shutdown(cx);
        this.after(cx, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_timeout_fails_and_progress_resets_it() {
        let (a, mut b) = tokio::io::duplex(16);
        let mut io = SendTimeout::new(a, Duration::from_secs(60), None);
        io.write_all(&[0; 16]).await.unwrap();
        // The peer reads a little every 50 s: each read is progress, so no timeout.
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
            b
        });
        io.write_all(&[0; 48]).await.unwrap();
        let _b = reader.await.unwrap();
        // Now nobody reads: the next write fails after 60 s, not before.
        let began = Instant::now();
        let err = io.write_all(&[0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = began.elapsed();
        assert!(
            took >= Duration::from_secs(60) && took < Duration::from_secs(61),
            "{took:?}"
        );
        // And every later write fails at once.
        assert!(io.write(&[0]).await.is_err());
    }
}
