//! How a connection's writes reach its socket: small vectored writes go out as one `write`.
//!
//! hyper hands a response to the socket as a vectored write: the head in one buffer, each body
//! chunk in another. For a small response the kernel then walks two or three pieces for a few
//! hundred bytes; copying them into one buffer first and making a plain `write` costs less CPU
//! per request (2-6% for the example's short responses, in pairs of servers loaded at the same
//! time on one CPU).
//! Writes whose pieces add up to more than [`COALESCE_MAX`] bytes pass through as they are, so a
//! large or streamed body is never copied here.
//!
//! Owns: the shape of the write calls. Never reorders, holds back or adds bytes: what a call
//! reports written is a prefix of what it was given, as for the socket itself.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Vectored writes of at most this many bytes in all are copied into one buffer.
pub const COALESCE_MAX: usize = 4096;

thread_local! {
    /// One buffer per thread (the worker's I/O thread): nothing is kept in it between calls.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(COALESCE_MAX));
}

/// Wraps a connection's I/O; reads pass through untouched.
pub struct Coalesce<T> {
    io: T,
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Self {
        Coalesce { io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
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
        let io = &mut self.get_mut().io;
        let pieces = bufs.iter().filter(|b| !b.is_empty()).count();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if pieces < 2 || total > COALESCE_MAX {
            return Pin::new(io).poll_write_vectored(cx, bufs);
        }
        SCRATCH.with(|scratch| {
            // A re-entrant call (none is known) would find the buffer taken: write as given.
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return Pin::new(&mut *io).poll_write_vectored(cx, bufs);
            };
            scratch.clear();
            for b in bufs {
                scratch.extend_from_slice(b);
            }
            Pin::new(&mut *io).poll_write(cx, &scratch)
        })
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

    /// Records each write call it gets: (vectored?, bytes).
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(bool, Vec<u8>)>,
        /// Accept at most this many bytes per call (a socket with little room).
        room: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.room.map_or(buf.len(), |r| r.min(buf.len()));
            self.get_mut().calls.push((false, buf[..n].to_vec()));
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = self.room.map_or(all.len(), |r| r.min(all.len()));
            self.get_mut().calls.push((true, all[..n].to_vec()));
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write_vectored(io: &mut Coalesce<Recorder>, bufs: &[&[u8]]) -> usize {
        let slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match Pin::new(io).poll_write_vectored(&mut cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn small_pieces_go_out_in_one_plain_write_and_large_ones_as_given() {
        let mut io = Coalesce::new(Recorder::default());
        assert_eq!(
            write_vectored(&mut io, &[b"HTTP/1.1 200 OK\r\n\r\n", b"hello"]),
            24
        );
        let big = vec![7u8; COALESCE_MAX];
        assert_eq!(write_vectored(&mut io, &[b"head", &big]), 4 + big.len());
        assert_eq!(write_vectored(&mut io, &[b"", b"alone"]), 5);
        let calls = &io.io.calls;
        assert_eq!(calls[0], (false, b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec()));
        assert!(calls[1].0, "a write over COALESCE_MAX stays vectored");
        assert_eq!(calls[1].1.len(), 4 + big.len());
        assert!(calls[2].0, "a single non-empty piece is passed through");
    }

    #[test]
    fn a_short_write_reports_the_prefix_written() {
        let mut io = Coalesce::new(Recorder {
            room: Some(3),
            ..Default::default()
        });
        assert_eq!(write_vectored(&mut io, &[b"ab", b"cdef"]), 3);
        assert_eq!(io.io.calls[0], (false, b"abc".to_vec()));
    }

    #[tokio::test]
    async fn bytes_arrive_whole_and_in_order_over_a_real_pipe() {
        let (client, server) = tokio::io::duplex(64);
        let mut io = Coalesce::new(server);
        let writer = tokio::spawn(async move {
            for i in 0..200u32 {
                let head = format!("{i}:");
                let slices = [io::IoSlice::new(head.as_bytes()), io::IoSlice::new(b"xyz;")];
                let mut written = 0;
                let total = head.len() + 4;
                while written < total {
                    // Vectored writes of what is left, as hyper makes them.
                    let rest: Vec<u8> = slices
                        .iter()
                        .flat_map(|s| s.iter().copied())
                        .skip(written)
                        .collect();
                    let (a, b) = rest.split_at(rest.len() / 2);
                    written += io
                        .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
                        .await
                        .unwrap();
                }
            }
            io.shutdown().await.unwrap();
        });
        let mut client = client;
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        writer.await.unwrap();
        let want: String = (0..200u32).map(|i| format!("{i}:xyz;")).collect();
        assert_eq!(got, want);
    }
}
