//! Request counters for `/metrics`: what each worker counts about the requests it serves, kept
//! in its cell of the shared worker table (see `worker_table`) so that the master can read them
//! while the worker runs and, exactly, after it died.
//!
//! Owns the layout of a cell's [`Counters`] (plain atomics), the per-request recording (a few
//! relaxed atomic loads and stores on memory only this worker's I/O thread writes: no lock, no
//! locked instruction, no allocation, no syscall beyond one more read of the vDSO clock the
//! request path already reads), the latency buckets, and [`Totals`],
//! the plain numbers the master adds up. It never maps memory, never talks to the master and
//! never formats metrics: `worker_table` maps, the master folds and `master::admin` exposes.
//!
//! Why shared memory and not messages: counters must never go backwards when a worker is
//! replaced, so the master keeps the final counts of every exited worker. Polling `Stats` would
//! lose the requests served between the last poll and the exit, and a final report in `Exiting`
//! is never sent by a worker that crashes, is killed at its drain deadline or hangs. The cell
//! outlives the process: the master reads it after reaping the worker (every write the worker
//! made is visible then, and nothing writes it any more), adds it to its generation's total,
//! and only then frees the cell for the next worker.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (inclusive) of the latency histogram's buckets, in microseconds; a last bucket
/// (`+Inf`) takes the rest. From 0.5 ms to 10 s: plugin handlers are in-process calls, so the
/// low end matters.
pub const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];
/// Buckets, `+Inf` included.
pub const BUCKETS: usize = BUCKETS_US.len() + 1;
/// Status classes: 1xx to 5xx.
pub const CLASSES: usize = 5;

/// A bound that a client or a plugin ran into, counted per worker in [`Counters`] and shown in
/// `/metrics` as `host_limit_hits{limit="<name>"}`: every resource that a client or a plugin can
/// grow has a bound, a rate-limited log line when it is hit, and this count. New bounds add a
/// variant here (at the end: the position is the index into the cell).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// A request the blocking pool refused because its queue was full (answered `503`).
    PoolQueueFull,
    /// A blocking-pool job dropped before it started because its client had gone.
    PoolAbandoned,
    /// The worker reached `max_connections` and stopped accepting (once each time it does;
    /// connections wait in the backlog or go to other workers meanwhile).
    Connections,
    /// An idle connection (HTTP/1 keep-alive or HTTP/2 with no stream) closed at its timeout.
    IdleTimeout,
    /// A connection closed because a write made no progress for `send_timeout`.
    SendTimeout,
    /// An entry not recorded because a bounded set (slow paths, blocking polls) was full.
    TrackingFull,
    /// A blocking-pool thread not started for waiting work because `blocking_abandoned_threads`
    /// threads still run handlers whose client is gone.
    PoolAbandonedThreads,
    /// A connection closed because no complete request head arrived within
    /// `header_read_timeout` of its accept (the slowloris guard).
    HeaderReadTimeout,
    /// A request body over `max_body_bytes` (answered `413`).
    BodyTooLarge,
    /// A request body not received within `body_read_timeout` (answered `408`).
    BodyReadTimeout,
    /// A plugin metric series refused because the worker holds
    /// [`SERIES`](crate::plugin_metrics::SERIES) already.
    PluginSeries,
    /// An access log line dropped: its queue was full (the disk slower than the requests) or
    /// the write failed (a full disk).
    AccessLogDropped,
    /// A gateway client's upgrade refused (`503`) at `gateway_max_clients`.
    GatewayClients,
    /// A gateway client closed (`1009`) for a message over `gateway_max_message`.
    GatewayMessage,
    /// A gateway client disconnected for answering no ping within `gateway_ping_timeout`.
    GatewayPingTimeout,
    /// A gateway client closed because its unhandled events (1013) or the messages queued for
    /// it (1008) passed `gateway_send_queue`.
    GatewaySendQueue,
    /// A gateway command of the plugin's refused: not one a handle may send, over 512 KiB, or
    /// past the commands one link or one event may hold.
    GatewayCommand,
    /// A gateway session a handler set refused: over 64 KiB, or not JSON (the old one kept).
    GatewaySession,
    /// A gateway event handler dropped at `gateway_event_timeout`.
    GatewayEventTimeout,
    /// A gateway client closed (`1008`) for pinging faster than the gateway answers.
    GatewayPingFlood,
    /// A gateway connection refused (closed) because too many were still sending their
    /// upgrade request.
    GatewayUpgrades,
    /// A same-port WebSocket client no gateway process took (none listening, or every one's
    /// queue full): answered `503` by the plugin worker.
    GatewayHandoff,
}

/// How many [`Limit`] slots a cell has (room for more variants without a layout change).
pub const LIMITS: usize = 30;

impl Limit {
    /// Every variant, in index order.
    pub const ALL: [Limit; 22] = [
        Limit::PoolQueueFull,
        Limit::PoolAbandoned,
        Limit::Connections,
        Limit::IdleTimeout,
        Limit::SendTimeout,
        Limit::TrackingFull,
        Limit::PoolAbandonedThreads,
        Limit::HeaderReadTimeout,
        Limit::BodyTooLarge,
        Limit::BodyReadTimeout,
        Limit::PluginSeries,
        Limit::AccessLogDropped,
        Limit::GatewayClients,
        Limit::GatewayMessage,
        Limit::GatewayPingTimeout,
        Limit::GatewaySendQueue,
        Limit::GatewayCommand,
        Limit::GatewaySession,
        Limit::GatewayEventTimeout,
        Limit::GatewayPingFlood,
        Limit::GatewayUpgrades,
        Limit::GatewayHandoff,
    ];

    /// The `limit` label in `/metrics`.
    pub const fn name(self) -> &'static str {
        match self {
            Limit::PoolQueueFull => "pool_queue_full",
            Limit::PoolAbandoned => "pool_abandoned",
            Limit::Connections => "max_connections",
            Limit::IdleTimeout => "idle_timeout",
            Limit::SendTimeout => "send_timeout",
            Limit::TrackingFull => "tracking_full",
            Limit::PoolAbandonedThreads => "pool_abandoned_threads",
            Limit::HeaderReadTimeout => "header_read_timeout",
            Limit::BodyTooLarge => "max_body_bytes",
            Limit::BodyReadTimeout => "body_read_timeout",
            Limit::PluginSeries => "plugin_series",
            Limit::AccessLogDropped => "access_log_dropped",
            Limit::GatewayClients => "gateway_max_clients",
            Limit::GatewayMessage => "gateway_max_message",
            Limit::GatewayPingTimeout => "gateway_ping_timeout",
            Limit::GatewaySendQueue => "gateway_send_queue",
            Limit::GatewayCommand => "gateway_command",
            Limit::GatewaySession => "gateway_session",
            Limit::GatewayEventTimeout => "gateway_event_timeout",
            Limit::GatewayPingFlood => "gateway_ping_flood",
            Limit::GatewayUpgrades => "gateway_upgrades",
            Limit::GatewayHandoff => "gateway_handoff",
        }
    }
}

const _: () = assert!(Limit::ALL.len() <= LIMITS);

/// One worker's counters: 448 bytes, a multiple of a cache line, so that two workers' cells never
/// share one. Cumulative since the worker started (the master zeroes the cell before it hands it
/// out), except `in_flight`. Only the owning worker writes; anyone may read, at any time.
#[repr(C)]
pub struct Counters {
    /// Requests answered, by status class (index 0: 1xx ... 4: 5xx).
    by_class: [AtomicU64; CLASSES],
    /// Latency histogram, one count per bucket (not cumulative).
    latency: [AtomicU64; BUCKETS],
    latency_sum_us: AtomicU64,
    /// Requests begun and not yet answered or cancelled.
    in_flight: AtomicU64,
    /// Requests whose handler was abandoned before an answer (the client went away).
    cancelled: AtomicU64,
    /// Request body bytes read for handlers.
    request_bytes: AtomicU64,
    /// Response body bytes handlers produced (whole bodies when answered, streamed ones as they
    /// are sent).
    response_bytes: AtomicU64,
    /// How often each [`Limit`] was hit, by its index.
    limit_hits: [AtomicU64; LIMITS],
    /// Handler panics caught at the plugin boundary (each answered `500`).
    panics: AtomicU64,
}

const _: () = assert!(size_of::<Counters>() == 448);

/// Adds `n` (wrapping) to a counter that only one thread ever writes: a relaxed load and a
/// relaxed store, plain moves on x86 and ARM, where `fetch_add` is a locked read-modify-write
/// (`hot_path_cost`, release build, a 2-core VM: 3 ns per request so, 80 to 110 ns with
/// `fetch_add`). Readers in other processes
/// still see whole values, only ever growing. The request counters are written from the
/// worker's I/O thread alone (its runtime is single-threaded: every connection, request and
/// response body poll runs there); `request_bytes`, which the plugin's threads also write
/// while they read a body, uses `fetch_add`.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// The bucket a latency of `us` microseconds falls in.
fn bucket(us: u64) -> usize {
    BUCKETS_US
        .iter()
        .position(|&bound| us <= bound)
        .unwrap_or(BUCKETS_US.len())
}

/// The class index of `status`: 1xx is 0 ... 5xx is 4 (out-of-range codes, which hyper would
/// not send as such, count as 5xx).
fn class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, CLASSES) - 1
}

impl Counters {
    /// A request begins. Called from the worker's I/O thread only (see [`bump`]).
    #[inline]
    pub fn begin(&self) {
        bump(&self.in_flight, 1);
    }

    /// A request begun with [`Counters::begin`] is answered with `status` after `us`
    /// microseconds. From the worker's I/O thread only.
    #[inline]
    pub fn answered(&self, status: u16, us: u64) {
        bump(&self.latency[bucket(us)], 1);
        bump(&self.latency_sum_us, us);
        bump(&self.by_class[class(status)], 1);
        bump(&self.in_flight, u64::MAX); // - 1
    }

    /// A request begun with [`Counters::begin`] ends without an answer. From the worker's I/O
    /// thread only.
    #[inline]
    pub fn cancelled(&self) {
        bump(&self.cancelled, 1);
        bump(&self.in_flight, u64::MAX); // - 1
    }

    /// Request body bytes: also written by the plugin's threads as they read a body, so
    /// with `fetch_add`.
    pub fn request_bytes(&self) -> &AtomicU64 {
        &self.request_bytes
    }

    /// Response body bytes, for a streamed body counted as it is polled (from the I/O thread;
    /// `fetch_add` all the same, once per chunk).
    pub fn response_bytes(&self) -> &AtomicU64 {
        &self.response_bytes
    }

    /// A whole response body of `n` bytes. From the worker's I/O thread only.
    #[inline]
    pub fn response_body(&self, n: u64) {
        bump(&self.response_bytes, n);
    }

    /// A bound was hit. From any thread of the worker (rare: a locked add is fine).
    pub fn limit_hit(&self, limit: Limit) {
        self.limit_hits[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A handler panic caught at the plugin boundary. From any thread of the worker (rare).
    pub fn panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    /// Zeroes every counter: the master's, for a cell no worker holds.
    pub fn reset(&self) {
        let all = self
            .by_class
            .iter()
            .chain(&self.latency)
            .chain(&self.limit_hits)
            .chain([
                &self.latency_sum_us,
                &self.in_flight,
                &self.cancelled,
                &self.request_bytes,
                &self.response_bytes,
                &self.panics,
            ]);
        for c in all {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The counters now. For a live worker each number is exact but they are read one by one
    /// (a request may show in its class and not yet in the histogram); for a dead one, final.
    pub fn read(&self) -> Totals {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            by_class: self.by_class.each_ref().map(load),
            latency: self.latency.each_ref().map(load),
            latency_sum_us: load(&self.latency_sum_us),
            in_flight: load(&self.in_flight),
            cancelled: load(&self.cancelled),
            lost: 0,
            request_bytes: load(&self.request_bytes),
            response_bytes: load(&self.response_bytes),
            limit_hits: self.limit_hits.each_ref().map(load),
            panics: load(&self.panics),
        }
    }
}

/// Counters as plain numbers: one worker's, or a generation's sum.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub by_class: [u64; CLASSES],
    pub latency: [u64; BUCKETS],
    pub latency_sum_us: u64,
    pub in_flight: u64,
    pub cancelled: u64,
    /// Requests that were in flight on a worker when it died: never answered (the master's
    /// count, from `in_flight` at the death).
    pub lost: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// How often each [`Limit`] was hit, by its index.
    pub limit_hits: [u64; LIMITS],
    /// Handler panics caught at the plugin boundary.
    pub panics: u64,
}

impl Totals {
    /// Adds `other` in (wrapping, as Prometheus counters do at 2^64).
    pub fn add(&mut self, other: &Totals) {
        for (a, b) in self.by_class.iter_mut().zip(other.by_class) {
            *a = a.wrapping_add(b);
        }
        for (a, b) in self.latency.iter_mut().zip(other.latency) {
            *a = a.wrapping_add(b);
        }
        for (a, b) in self.limit_hits.iter_mut().zip(other.limit_hits) {
            *a = a.wrapping_add(b);
        }
        for (a, b) in [
            (&mut self.latency_sum_us, other.latency_sum_us),
            (&mut self.in_flight, other.in_flight),
            (&mut self.cancelled, other.cancelled),
            (&mut self.lost, other.lost),
            (&mut self.request_bytes, other.request_bytes),
            (&mut self.response_bytes, other.response_bytes),
            (&mut self.panics, other.panics),
        ] {
            *a = a.wrapping_add(b);
        }
    }

    /// A dead worker's final counters: what was in flight is lost, and nothing is in flight.
    pub fn at_death(mut self) -> Totals {
        self.lost = self.lost.wrapping_add(self.in_flight);
        self.in_flight = 0;
        self
    }

    /// Requests answered, every class.
    #[cfg(test)]
    pub fn answered(&self) -> u64 {
        self.by_class.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeroed() -> Box<Counters> {
        Box::new(Counters {
            by_class: Default::default(),
            latency: Default::default(),
            latency_sum_us: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            limit_hits: Default::default(),
            panics: AtomicU64::new(0),
        })
    }

    /// What the request path adds per request, roughly: `cargo test --release -p host
    /// hot_path_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hot_path_cost() {
        let c = zeroed();
        let n = 10_000_000u64;
        // HOT_PATH_NO_CLOCK=1: the atomics alone.
        let clock = std::env::var_os("HOT_PATH_NO_CLOCK").is_none();
        let began = std::time::Instant::now();
        for i in 0..n {
            c.begin();
            let now = if clock {
                crate::worker::monotonic_ns()
            } else {
                i
            };
            c.answered(200 + (i % 2) as u16, std::hint::black_box(now) % 3000);
            c.response_body(61);
        }
        let ns = began.elapsed().as_nanos() as f64 / n as f64;
        let what = if clock { "clock read, " } else { "" };
        println!("{ns:.1} ns per request ({what}begin, answered, response bytes)");
        assert_eq!(c.read().by_class[1], n);
    }

    #[test]
    fn buckets_and_classes() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(500), 0, "bounds are inclusive, like Prometheus' le");
        assert_eq!(bucket(501), 1);
        assert_eq!(bucket(10_000_000), BUCKETS - 2);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!([101, 200, 304, 404, 503].map(class), [0, 1, 2, 3, 4]);
        assert_eq!(class(999), 4);
    }

    #[test]
    fn counts_add_up_and_survive_a_death() {
        let c = zeroed();
        for (status, us) in [(200, 100), (200, 3_000), (404, 600), (500, 20_000_000)] {
            c.begin();
            c.answered(status, us);
        }
        c.begin();
        c.cancelled();
        c.begin(); // dies with it
        c.response_bytes().fetch_add(10, Ordering::Relaxed);
        let t = c.read();
        assert_eq!(t.by_class, [0, 2, 0, 1, 1]);
        assert_eq!(t.answered(), 4);
        assert_eq!(t.latency.iter().sum::<u64>(), 4);
        assert_eq!(t.latency[BUCKETS - 1], 1);
        assert_eq!(t.latency_sum_us, 20_003_700);
        assert_eq!((t.in_flight, t.cancelled, t.response_bytes), (1, 1, 10));
        c.limit_hit(Limit::SendTimeout);
        assert_eq!(c.read().limit_hits[Limit::SendTimeout as usize], 1);
        let dead = t.clone().at_death();
        assert_eq!((dead.in_flight, dead.lost), (0, 1));
        let mut sum = Totals::default();
        sum.add(&dead);
        sum.add(&dead);
        assert_eq!(sum.answered(), 8);
        assert_eq!(sum.lost, 2);
        c.reset();
        assert_eq!(c.read(), Totals::default());
    }
}
