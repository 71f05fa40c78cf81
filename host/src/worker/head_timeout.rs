//! The idle-connection guard: `header_read_timeout` (the slowloris guard) and
//! `keepalive_timeout`, one sweep per worker, not a timer per request.
//!
//! A connection with nothing in progress (just accepted, or its last response sent in full) must
//! bring a complete request head within the timeout, or it is closed without a response. hyper's
//! own `header_read_timeout` does the same with a timer armed for every head it reads, idle waits
//! between keep-alive requests included: a boxed sleep, a clock read, and a registration in and
//! removal from tokio's timer wheel per request, 4-5% of the CPU time of a short keep-alive
//! request (bench: `bare-hyper` with and without it, loaded side by side on one CPU). Here a
//! request costs two atomic counter updates and one store of a coarse clock, and a task sweeps
//! the worker's connections every quarter of the shorter timeout.
//!
//! A connection is "busy" from a request's head until its response has been sent in full (the
//! response body dropped by hyper); a busy connection is never cut here (a slow request body is
//! `body_read_timeout`'s business, a response the client does not read is `send_timeout`'s). An
//! idle one is closed once idle for longer than its timeout: between 1x and 1.5x of it, given
//! the sweep's period. The timeout is `header_read_timeout` until the connection's first request;
//! after it, an HTTP/1 keep-alive connection is held to the shorter of `header_read_timeout` and
//! `keepalive_timeout`, and an HTTP/2 connection (idle: no stream open) to `keepalive_timeout`
//! (the connection task then sends GOAWAY rather than cutting it).
//!
//! The same sweep finds HTTP/2 responses stalled by a client that grants no flow-control window:
//! a response body that yielded data and is not asked for more for `send_timeout` (hyper polls a
//! body again only when the stream, the connection and the socket can take more) marks its
//! connection stalled, and its task closes it. `send_timeout`'s write deadline does not see
//! this case: with no window nothing is written, so no write waits. Any body of the connection
//! polled counts as progress for all of them. The price: a single chunk that takes longer than
//! `send_timeout` to drain to a slow reader (a 1 MiB chunk below 17 KB/s, with the default) is
//! cut too. HTTP/1 has no window: its writes' deadline is enough, and this check skips it.
//!
//! With no connection at all the sweep sleeps until one arrives, so an idle worker is not woken
//! four times a second for nothing.
//!
//! Owns: the coarse clock, the register of connections, the sweep. Never reads or writes a
//! socket: it marks a connection expired and wakes its task, which closes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;

/// The worker's connections and their coarse clock.
pub struct HeadTimeout {
    timeout_ms: u64,
    /// `keepalive_timeout`: for a connection that served a request.
    keepalive_ms: u64,
    /// `send_timeout`: for a response body waiting to be asked for more.
    send_ms: u64,
    period: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch`, as of the last sweep (or the first connection after the
    /// sweep slept).
    now_ms: AtomicU64,
    register: Mutex<Register>,
    /// Wakes the sweep, asleep while the register is empty.
    wake_sweep: Arc<tokio::sync::Notify>,
    /// Sweeps done so far.
    sweeps: AtomicU64,
}

impl Drop for HeadTimeout {
    fn drop(&mut self) {
        // A sleeping sweep wakes, finds the worker's connections gone, and ends.
        self.wake_sweep.notify_one();
    }
}

#[derive(Default)]
struct Register {
    watches: Vec<Weak<Watch>>,
}

/// One connection's state, shared by its task and the sweep.
pub struct Watch {
    head_timeout: Arc<HeadTimeout>,
    /// Requests whose response has not been sent in full.
    busy: AtomicU32,
    /// The coarse clock when it last became idle.
    idle_since_ms: AtomicU64,
    /// It served a request: held to the keep-alive timeout from then on.
    served: AtomicBool,
    /// HTTP/2: held to `keepalive_timeout` alone.
    h2: AtomicBool,
    /// Response bodies whose last poll yielded data: hyper asks for more once it can send.
    waiting_bodies: AtomicU32,
    /// The coarse clock when a response body of this connection was last polled.
    body_polled_ms: AtomicU64,
    /// Expired because its responses made no progress for `send_timeout`.
    stalled: AtomicBool,
    expired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl HeadTimeout {
    /// Starts the sweep on the current runtime; it ends when the last `Arc` is dropped.
    /// `timeout` is `header_read_timeout`, `keepalive` is `keepalive_timeout`, `send` is
    /// `send_timeout`.
    pub fn start(timeout: Duration, keepalive: Duration, send: Duration) -> Arc<HeadTimeout> {
        let period = (timeout.min(keepalive).min(send) / 4)
            .clamp(Duration::from_millis(1), Duration::from_millis(250));
        let head_timeout = Arc::new(HeadTimeout {
            timeout_ms: timeout.as_millis().max(1) as u64,
            keepalive_ms: keepalive.as_millis().max(1) as u64,
            send_ms: send.as_millis().max(1) as u64,
            period,
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
            register: Mutex::new(Register::default()),
            wake_sweep: Arc::new(tokio::sync::Notify::new()),
            sweeps: AtomicU64::new(0),
        });
        tokio::spawn(sweep(
            Arc::downgrade(&head_timeout),
            period,
            head_timeout.wake_sweep.clone(),
        ));
        head_timeout
    }

    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Registers a connection, idle from now.
    pub fn watch(self: &Arc<Self>) -> Arc<Watch> {
        let mut register = self.register.lock().unwrap_or_else(|e| e.into_inner());
        let first = register.watches.is_empty();
        if first {
            // The sweep may have slept, leaving the coarse clock behind: bring it up to date
            // before anything reads it.
            let now = self.epoch.elapsed().as_millis() as u64;
            self.now_ms.fetch_max(now, Ordering::Relaxed);
        }
        let watch = Arc::new(Watch {
            head_timeout: self.clone(),
            busy: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            waiting_bodies: AtomicU32::new(0),
            body_polled_ms: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            expired: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        register.watches.push(Arc::downgrade(&watch));
        drop(register);
        if first {
            self.wake_sweep.notify_one();
        }
        watch
    }

    /// One pass: advance the clock, expire the idle connections, forget the closed ones. Returns
    /// whether any connection is left.
    fn sweep_once(&self) -> bool {
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        self.now_ms.fetch_max(now, Ordering::Relaxed);
        // Idle since at most one period before the recorded time (the clock is coarse): wait
        // that much longer, so no connection is cut early.
        let slack = self.period.as_millis() as u64;
        let head = self.timeout_ms + slack;
        let keepalive = self.keepalive_ms + slack;
        let kept_alive = head.min(keepalive);
        let send = self.send_ms + slack;
        let mut expired = Vec::new();
        let left = {
            let mut register = self.register.lock().unwrap_or_else(|e| e.into_inner());
            register.watches.retain(|w| {
                let Some(watch) = w.upgrade() else {
                    return false;
                };
                let limit = if watch.h2.load(Ordering::Relaxed) {
                    keepalive
                } else if watch.served.load(Ordering::Relaxed) {
                    kept_alive
                } else {
                    head
                };
                let busy = watch.busy.load(Ordering::SeqCst);
                if busy == 0
                    && now.saturating_sub(watch.idle_since_ms.load(Ordering::SeqCst)) > limit
                {
                    expired.push(watch);
                    return false;
                }
                if busy > 0
                    && watch.h2.load(Ordering::Relaxed)
                    && watch.waiting_bodies.load(Ordering::Relaxed) > 0
                    && now.saturating_sub(watch.body_polled_ms.load(Ordering::Relaxed)) > send
                {
                    watch.stalled.store(true, Ordering::Relaxed);
                    expired.push(watch);
                    return false;
                }
                true
            });
            !register.watches.is_empty()
        };
        for watch in expired {
            watch.expire();
        }
        left
    }
}

async fn sweep(head_timeout: Weak<HeadTimeout>, period: Duration, wake: Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(h) = head_timeout.upgrade() else {
            return;
        };
        let left = h.sweep_once();
        drop(h);
        if !left {
            // `watch` notifies when it adds to an empty register (after this look, or before:
            // the permit is kept), and so does the worker's end.
            wake.notified().await;
            tick.reset();
        }
    }
}

impl Watch {
    /// A request's head arrived: busy until the returned guard drops (with its response body).
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// HTTP/2: held to `keepalive_timeout` (no stream open for that long) from now on.
    pub fn exempt(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    /// Whether it served a request before it went idle (a keep-alive close, not a head timeout).
    pub fn served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether it is an HTTP/2 connection (see [`Watch::exempt`]).
    pub fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    /// Whether it expired because its responses made no progress for `send_timeout`.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    fn expire(&self) {
        self.expired.store(true, Ordering::SeqCst);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Completes when the connection has been idle too long.
    pub fn expired(&self) -> Expired<'_> {
        Expired {
            watch: self,
            registered: None,
        }
    }
}

/// Holds its connection busy (see the module docs).
pub struct Busy(Arc<Watch>);

impl Drop for Busy {
    fn drop(&mut self) {
        let watch = &self.0;
        // Idle from now if this was the last request in progress. The time is stored before
        // the count drops, so the sweep never sees an idle connection with an old time.
        watch
            .idle_since_ms
            .store(watch.head_timeout.now_ms(), Ordering::SeqCst);
        watch.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that holds its connection busy until hyper drops it (sent in full, or the
/// connection gone).
pub struct BusyBody<B> {
    body: B,
    busy: Busy,
    /// Its last poll yielded data (counted in the watch's `waiting_bodies`).
    waiting: bool,
    /// The request's access-log line, given the bytes sent and queued when the body is dropped.
    line: Option<super::access_log::Line>,
}

impl<B> BusyBody<B> {
    pub fn new(body: B, busy: Busy) -> Self {
        BusyBody {
            body,
            busy,
            waiting: false,
            line: None,
        }
    }

    /// Carries the request's access-log line until the body is done.
    pub fn with_line(mut self, line: Option<super::access_log::Line>) -> Self {
        self.line = line;
        self
    }

    fn set_waiting(&mut self, waiting: bool) {
        if self.waiting != waiting {
            self.waiting = waiting;
            let count = &self.busy.0.waiting_bodies;
            if waiting {
                count.fetch_add(1, Ordering::Relaxed);
            } else {
                count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl<B> Drop for BusyBody<B> {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let watch = &this.busy.0;
        watch
            .body_polled_ms
            .store(watch.head_timeout.now_ms(), Ordering::Relaxed);
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        this.set_waiting(matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data()));
        if let (Some(line), Poll::Ready(Some(Ok(frame)))) = (&mut this.line, &polled)
            && let Some(data) = frame.data_ref()
        {
            line.sent(bytes::Buf::remaining(data));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's wait for its expiry: one atomic load per poll, the waker stored once.
pub struct Expired<'a> {
    watch: &'a Watch,
    registered: Option<Waker>,
}

impl Future for Expired<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.watch.expired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        *this.watch.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        this.registered = Some(cx.waker().clone());
        // `expire` sets the flag before it takes the waker: look again.
        if this.watch.expired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for `watch`, idle from now, to expire: not before `timeout`, and within 1.5x of it.
    async fn expires_within_1_to_1_5x(watch: &Watch, timeout: Duration) {
        let began = tokio::time::Instant::now();
        watch.expired().await;
        let took = began.elapsed();
        assert!(took >= timeout && took <= timeout * 3 / 2, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_timeout_and_a_busy_one_never() {
        let h = HeadTimeout::start(
            Duration::from_millis(400),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        let idle = h.watch();
        let busy = h.watch();
        let h2 = h.watch();
        h2.exempt();
        let h2_stream = h2.busy();
        let guard = busy.busy();
        expires_within_1_to_1_5x(&idle, Duration::from_millis(400)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !busy.expired.load(Ordering::SeqCst),
            "a busy connection expired"
        );
        drop(h2_stream);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !h2.expired.load(Ordering::SeqCst),
            "an HTTP/2 connection expired before keepalive_timeout"
        );
        // Idle from the moment its response is done: expires a timeout later, not at once.
        drop(guard);
        let idle_from = tokio::time::Instant::now();
        busy.expired().await;
        assert!(idle_from.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_request_the_keepalive_timeout_holds_http2_and_shortens_http1() {
        let h = HeadTimeout::start(
            Duration::from_secs(10),
            Duration::from_secs(2),
            Duration::from_secs(3600),
        );
        // No request yet: the head timeout, for either protocol.
        let fresh = h.watch();
        // HTTP/2 with no stream open: `keepalive_timeout`, however long the head timeout.
        let h2 = h.watch();
        h2.exempt();
        drop(h2.busy());
        expires_within_1_to_1_5x(&h2, Duration::from_secs(2)).await;
        // HTTP/1 keep-alive: the shorter of the two.
        let h1 = h.watch();
        drop(h1.busy());
        expires_within_1_to_1_5x(&h1, Duration::from_secs(2)).await;
        assert!(h1.served() && h2.is_h2() && !h1.is_h2());
        assert!(!fresh.expired.load(Ordering::SeqCst));
        fresh.expired().await;
        assert!(!fresh.served());
    }

    /// A body whose chunks come one at a time, each once asked for.
    struct Chunks(u32);

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                b"x",
            )))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_not_asked_for_more_for_send_timeout_stalls_its_connection() {
        use http_body_util::BodyExt as _;
        let h = HeadTimeout::start(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            Duration::from_secs(2),
        );
        let watch = h.watch();
        watch.exempt();
        let mut body = BusyBody::new(Chunks(100), watch.busy());
        // Asked for more every second: progress, however long.
        for _ in 0..10 {
            body.frame().await.unwrap().unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(!watch.stalled() && !watch.expired.load(Ordering::SeqCst));
        // Not asked for more (the client grants no window): stalled after 2 to 3 s.
        body.frame().await.unwrap().unwrap();
        let began = tokio::time::Instant::now();
        watch.expired().await;
        assert!(watch.stalled());
        let took = began.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took <= Duration::from_secs(3),
            "{took:?}"
        );
        // A connection whose handler still runs (no body yet) is not stalled.
        drop(body);
        let other = h.watch();
        let _busy = other.busy();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!other.expired.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_connection_the_sweep_sleeps_and_wakes_for_the_next_one() {
        let h = HeadTimeout::start(
            Duration::from_millis(400),
            Duration::from_secs(75),
            Duration::from_secs(60),
        );
        drop(h.watch());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let asleep = h.sweeps.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            h.sweeps.load(Ordering::Relaxed),
            asleep,
            "swept with no connection"
        );
        // The next connection is held to the timeout as before: not early (the clock the sweep
        // left behind is brought up to date), and not much later.
        expires_within_1_to_1_5x(&h.watch(), Duration::from_millis(400)).await;
        assert!(h.sweeps.load(Ordering::Relaxed) > asleep);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_connections_leave_the_register_and_the_sweep_ends_with_the_worker() {
        let h = HeadTimeout::start(
            Duration::from_secs(10),
            Duration::from_secs(75),
            Duration::from_secs(60),
        );
        for _ in 0..100 {
            drop(h.watch());
        }
        let kept = h.watch();
        let _guard = kept.busy();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.register.lock().unwrap().watches.len(), 1);
        // The watch holds the `HeadTimeout` too; with both gone the sweep task returns.
        let weak = Arc::downgrade(&h);
        drop(_guard);
        drop(kept);
        drop(h);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(weak.upgrade().is_none());
    }
}
