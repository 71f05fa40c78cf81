//! The read side of one accepted connection, arranged so that an HTTP/2 drain loses no stream.
//!
//! h2 (under hyper) shuts a connection down the RFC 9113 §6.8 way: a GOAWAY with the largest
//! stream id and a PING; when the PING's ACK comes back it sends the final GOAWAY naming the last
//! stream it processed, and ignores every later one. The round trip is meant to cover streams
//! the client opened before it saw the first GOAWAY. It does not quite: clients (h2 among them)
//! write a PING ACK ahead of request HEADERS they had already queued, so those streams arrive
//! just behind the ACK, are ignored, and the client reports them failed with
//! `GoAway(NO_ERROR)`, which hyper-util's pooled client (and so reqwest) does not retry. Seen
//! with the worker's h2 logging: every failed request of a pooled client across five reloads
//! matched one "ignoring HEADERS" after the final GOAWAY.
//!
//! So this wrapper follows HTTP/2 frame boundaries on the bytes it reads (frame headers only,
//! nine bytes a frame) and, once the worker drains, holds the first PING ACK back until the
//! connection has been quiet for [`QUIET`] (at most [`MAX_HOLD`]), handing hyper the frames that
//! arrived behind it first. The final GOAWAY then covers them. HTTP/1 connections pass through
//! untouched once their first bytes show they are not HTTP/2.
//!
//! Owns: the order of the bytes read from one connection. Never writes, never parses a frame's
//! payload, and never decides when to drain.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;
const PING_FRAME: usize = FRAME_HEADER + 8;
/// A held PING ACK goes to hyper once no byte arrived for this long...
pub(crate) const QUIET: Duration = Duration::from_millis(50);
/// ...or this long after it arrived, whichever comes first.
pub(crate) const MAX_HOLD: Duration = Duration::from_millis(500);

/// What the first bytes of a connection said it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    /// Nothing decisive yet.
    Unknown,
    Http1,
    Http2,
}

struct Held {
    frame: [u8; PING_FRAME],
    since: Instant,
    timer: Pin<Box<Sleep>>,
}

pub(crate) struct DrainAwareIo<T> {
    io: T,
    draining: Arc<AtomicBool>,
    /// Preface bytes matched so far, while the protocol is unknown.
    preface_matched: usize,
    proto: Proto,
    /// The header of the frame being handed over, when it was split across reads.
    header: [u8; FRAME_HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to hand over.
    payload_left: usize,
    /// Bytes read from the socket, not yet handed to hyper (only while draining).
    backlog: BytesMut,
    /// Leading bytes of `backlog` to hand over without inspection (a released PING ACK).
    verbatim: usize,
    held: Option<Held>,
    held_once: bool,
    last_read: Instant,
    eof: bool,
}

impl<T> DrainAwareIo<T> {
    pub(crate) fn new(io: T, draining: Arc<AtomicBool>) -> Self {
        DrainAwareIo {
            io,
            draining,
            preface_matched: 0,
            proto: Proto::Unknown,
            header: [0; FRAME_HEADER],
            header_len: 0,
            payload_left: 0,
            backlog: BytesMut::new(),
            verbatim: 0,
            held: None,
            held_once: false,
            last_read: Instant::now(),
            eof: false,
        }
    }

    /// Follows protocol detection and frame boundaries over bytes handed to hyper.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.proto {
                Proto::Http1 => return,
                Proto::Unknown => {
                    if bytes[0] != PREFACE[self.preface_matched] {
                        self.proto = Proto::Http1;
                        return;
                    }
                    self.preface_matched += 1;
                    bytes = &bytes[1..];
                    if self.preface_matched == PREFACE.len() {
                        self.proto = Proto::Http2;
                    }
                }
                Proto::Http2 if self.payload_left > 0 => {
                    let n = self.payload_left.min(bytes.len());
                    self.payload_left -= n;
                    bytes = &bytes[n..];
                }
                Proto::Http2 => {
                    self.header[self.header_len] = bytes[0];
                    self.header_len += 1;
                    bytes = &bytes[1..];
                    if self.header_len == FRAME_HEADER {
                        self.payload_left = payload_len(&self.header);
                        self.header_len = 0;
                    }
                }
            }
        }
    }

    fn at_frame_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0 && self.verbatim == 0
    }

    fn release_at(&self) -> Option<Instant> {
        let held = self.held.as_ref()?;
        Some((self.last_read.max(held.since) + QUIET).min(held.since + MAX_HOLD))
    }

    /// Moves a held PING ACK to the front of the backlog once it is due.
    fn release_if_due(&mut self, now: Instant) {
        let due = self.eof || self.release_at().is_some_and(|t| t <= now);
        if due && self.at_frame_boundary() {
            if let Some(held) = self.held.take() {
                let mut front = BytesMut::with_capacity(PING_FRAME + self.backlog.len());
                front.extend_from_slice(&held.frame);
                front.extend_from_slice(&self.backlog);
                self.backlog = front;
                self.verbatim = PING_FRAME;
            }
        }
    }

    /// Hands bytes from the backlog to hyper, whole frame headers at a time, holding back the
    /// first PING ACK. Returns how many bytes it handed over.
    fn deliver(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let mut delivered = 0;
        while buf.remaining() > 0 && !self.backlog.is_empty() {
            if self.verbatim > 0 {
                let n = self.verbatim.min(buf.remaining()).min(self.backlog.len());
                buf.put_slice(&self.backlog[..n]);
                self.backlog.advance(n);
                self.verbatim -= n;
                delivered += n;
            } else if self.payload_left > 0 || self.header_len > 0 {
                // The middle of a frame whose start hyper already has.
                let want = if self.header_len > 0 {
                    FRAME_HEADER - self.header_len
                } else {
                    self.payload_left
                };
                let n = want.min(buf.remaining()).min(self.backlog.len());
                let chunk = self.backlog.split_to(n);
                buf.put_slice(&chunk);
                self.observe(&chunk);
                delivered += n;
            } else {
                // A frame boundary: look at the whole header before handing any of it over.
                if self.backlog.len() < FRAME_HEADER {
                    break;
                }
                let len = payload_len(&self.backlog[..FRAME_HEADER]);
                let (kind, flags) = (self.backlog[3], self.backlog[4]);
                if kind == PING && flags & ACK != 0 && len == 8 && !self.held_once {
                    if self.backlog.len() < PING_FRAME {
                        break;
                    }
                    let mut frame = [0; PING_FRAME];
                    frame.copy_from_slice(&self.backlog[..PING_FRAME]);
                    self.backlog.advance(PING_FRAME);
                    let now = Instant::now();
                    self.held = Some(Held {
                        frame,
                        since: now,
                        timer: Box::pin(tokio::time::sleep_until(now + QUIET)),
                    });
                    self.held_once = true;
                    continue;
                }
                // Not a held frame: hand it over, the header split if `buf` is that small.
                let n = FRAME_HEADER.min(buf.remaining());
                let header = self.backlog.split_to(n);
                buf.put_slice(&header);
                self.observe(&header);
                delivered += n;
            }
        }
        delivered
    }
}

fn payload_len(header: &[u8]) -> usize {
    (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2])
}

impl<T: AsyncRead + Unpin> DrainAwareIo<T> {
    fn poll_read_held(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            self.release_if_due(Instant::now());
            if self.deliver(buf) > 0 {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                if self.held.is_some() {
                    // Forced out at end of stream, behind what is left.
                    self.payload_left = 0;
                    self.header_len = 0;
                    continue;
                }
                // Whatever is left is a partial frame header: hand it over, then end.
                let n = self.backlog.len().min(buf.remaining());
                buf.put_slice(&self.backlog[..n]);
                self.backlog.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        self.eof = true;
                    } else {
                        self.backlog.extend_from_slice(rb.filled());
                        self.last_read = Instant::now();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let Some(at) = self.release_at() else {
                        return Poll::Pending;
                    };
                    if at <= Instant::now() {
                        // Due, but mid-frame: the rest of the frame releases it.
                        return Poll::Pending;
                    }
                    let held = self.held.as_mut().expect("release_at implies held");
                    held.timer.as_mut().reset(at);
                    ready!(held.timer.as_mut().poll(cx));
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DrainAwareIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.proto == Proto::Http1 {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let slow = this.proto == Proto::Http2
            && (this.draining.load(Ordering::Relaxed)
                || !this.backlog.is_empty()
                || this.held.is_some());
        if slow {
            return this.poll_read_held(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let filled = buf.filled();
        // Cheap: a byte compare per preface byte, then one look per frame header.
        let fresh = &filled[before..];
        if !fresh.is_empty() {
            // `observe` needs `&mut self` while `fresh` borrows `buf`, not `self`: fine.
            this.observe(fresh);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DrainAwareIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Reads what the wrapper hands over until `want` bytes arrived.
    async fn read_n(io: &mut DrainAwareIo<tokio::io::DuplexStream>, want: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 3]; // tiny reads: every split point gets exercised
        while out.len() < want {
            let n = io.read(&mut buf).await.unwrap();
            assert!(n > 0, "early end of stream after {out:?}");
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_ack_during_a_drain_goes_behind_the_frames_that_follow_it() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let draining = Arc::new(AtomicBool::new(false));
        let mut io = DrainAwareIo::new(server, draining.clone());

        let settings = frame(0x4, 0, 0, &[]);
        let headers1 = frame(0x1, 0x5, 1, b"abcdefghij");
        client.write_all(PREFACE).await.unwrap();
        client.write_all(&settings).await.unwrap();
        client.write_all(&headers1).await.unwrap();
        let n = PREFACE.len() + settings.len() + headers1.len();
        let got = read_n(&mut io, n).await;
        assert_eq!(&got[..24], PREFACE);
        assert_eq!(io.proto, Proto::Http2);

        // The worker drains; the client's ACK arrives ahead of a stream it had queued.
        draining.store(true, Ordering::Relaxed);
        let ack = frame(PING, ACK, 0, &[7; 8]);
        let headers3 = frame(0x1, 0x5, 3, b"0123456789abcdef");
        client.write_all(&ack).await.unwrap();
        client.write_all(&headers3).await.unwrap();
        let got = read_n(&mut io, headers3.len()).await;
        assert_eq!(got, headers3, "the stream behind the ACK comes first");
        let started = Instant::now();
        let got = read_n(&mut io, ack.len()).await;
        assert_eq!(got, ack, "then the ACK, once the connection is quiet");
        assert!(started.elapsed() >= QUIET - Duration::from_millis(1));

        // A later PING ACK is not held.
        client.write_all(&ack).await.unwrap();
        let started = Instant::now();
        assert_eq!(read_n(&mut io, ack.len()).await, ack);
        assert!(started.elapsed() < QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_ack_is_released_after_max_hold_even_under_traffic() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let draining = Arc::new(AtomicBool::new(true));
        let mut io = DrainAwareIo::new(server, draining);
        client.write_all(PREFACE).await.unwrap();
        read_n(&mut io, PREFACE.len()).await;
        let ack = frame(PING, ACK, 0, &[1; 8]);
        client.write_all(&ack).await.unwrap();
        let data = frame(0x0, 0, 1, &[9; 4]);
        let started = Instant::now();
        let mut got = Vec::new();
        // A frame every 10 ms: never quiet for QUIET.
        let released = loop {
            client.write_all(&data).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut buf = [0u8; 64];
            while let Ok(n) =
                tokio::time::timeout(Duration::from_millis(1), io.read(&mut buf)).await
            {
                got.extend_from_slice(&buf[..n.unwrap()]);
            }
            if let Some(at) = got.windows(ack.len()).position(|w| w == ack) {
                break at;
            }
            assert!(started.elapsed() < MAX_HOLD * 2, "ACK never released");
        };
        assert!(started.elapsed() >= MAX_HOLD - Duration::from_millis(20));
        // Every frame in front of the ACK is whole.
        assert_eq!(released % data.len(), 0);
        assert!(released > 0);
    }

    #[tokio::test]
    async fn http1_passes_through_untouched() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut io = DrainAwareIo::new(server, Arc::new(AtomicBool::new(true)));
        let req = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        client.write_all(req).await.unwrap();
        assert_eq!(read_n(&mut io, req.len()).await, req);
        assert_eq!(io.proto, Proto::Http1);
    }
}
