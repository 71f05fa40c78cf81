//! Request counters for `/metrics`: what each worker counts about the requests it serves, kept
//! in its cell of the shared worker table (see `accept_table`) so that the master can read them
//! while the worker runs and, exactly, after it died.
//!
//! Owns the layout of a cell's [`Counters`] (plain atomics), the per-request recording (a few
//! relaxed atomic adds on memory only this worker writes: no lock, no allocation, no syscall
//! beyond the vDSO clock the request path already reads), the latency buckets, and [`Totals`],
//! the plain numbers the master adds up. It never maps memory, never talks to the master and
//! never formats metrics: `accept_table` maps, the master folds and `master::admin` exposes.
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

/// One worker's counters: 256 bytes, a multiple of a cache line, so that two workers' cells never
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
    _reserved: [AtomicU64; 7],
}

const _: () = assert!(size_of::<Counters>() == 256);

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
    /// A request begins.
    #[inline]
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request begun with [`Counters::begin`] is answered with `status` after `us`
    /// microseconds.
    #[inline]
    pub fn answered(&self, status: u16, us: u64) {
        self.latency[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.by_class[class(status)].fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A request begun with [`Counters::begin`] ends without an answer.
    #[inline]
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn request_bytes(&self) -> &AtomicU64 {
        &self.request_bytes
    }

    pub fn response_bytes(&self) -> &AtomicU64 {
        &self.response_bytes
    }

    /// Zeroes every counter: the master's, for a cell no worker holds.
    pub fn reset(&self) {
        let all = self.by_class.iter().chain(&self.latency).chain([
            &self.latency_sum_us,
            &self.in_flight,
            &self.cancelled,
            &self.request_bytes,
            &self.response_bytes,
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
        for (a, b) in [
            (&mut self.latency_sum_us, other.latency_sum_us),
            (&mut self.in_flight, other.in_flight),
            (&mut self.cancelled, other.cancelled),
            (&mut self.lost, other.lost),
            (&mut self.request_bytes, other.request_bytes),
            (&mut self.response_bytes, other.response_bytes),
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
            _reserved: Default::default(),
        })
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
