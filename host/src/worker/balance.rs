//! Accept balancing: spreading long-lived connections evenly over the workers that share the
//! listening socket, with the counts every accepting worker publishes in its cell of the worker
//! table (see `worker_table`). Before an accept, a worker holding clearly more connections than
//! the least loaded other one steps aside for a moment ([`Balance::step_aside`]); after a
//! response, it may close one HTTP/1 keep-alive connection so its client reconnects elsewhere
//! ([`Balance::hand_off_one`]).
//!
//! Owns the count of connections that will stay (what it publishes: a connection per request
//! lives microseconds and says nothing about load to come), the publishing, and the hand-off
//! pacing. It never accepts or closes a connection itself: the accept loop and the request path
//! ask it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::clock::Stamp;
use crate::worker_table::{WorkerTable, over_share};

/// How long a worker holding more than its share of connections waits before accepting, so
/// that a burst of reconnects (the keep-alive clients of a drained worker) spreads out instead
/// of landing on whichever worker is on a CPU.
const ACCEPT_STEP_ASIDE: Duration = Duration::from_millis(1);
/// At most this many steps aside in a row...
const ACCEPT_STEP_ASIDE_ROUNDS: u32 = 30;
/// ...and only while the others keep taking connections: after this many steps in which they
/// took none (busy, or hung), accept. 20, not 5: a worker waiting for a CPU on a busy machine
/// takes longer than 5 (or 10) ms to take its connection (WebSockets landed 7:3 on two workers).
const ACCEPT_STEP_ASIDE_IDLE_ROUNDS: u32 = 20;

/// At most one keep-alive connection handed off to a less loaded worker per this long.
const HAND_OFF_EVERY: Duration = Duration::from_millis(100);

/// This worker's side of balancing.
pub(super) struct Balance {
    /// The worker table and this worker's cell in it.
    cell: Option<(WorkerTable, usize)>,
    /// `accept_balance`: without it, nothing is published or handed off, and no step aside.
    enabled: bool,
    /// Open connections that will stay: they carried a request that did not ask to close the
    /// connection after it (HTTP/2, or HTTP/1 keep-alive), or were upgraded.
    staying: AtomicU64,
    /// Cleared for good when the worker stops accepting: its count is no longer published.
    accepting: AtomicBool,
    /// When this worker last closed a keep-alive connection to even out the load
    /// (`monotonic_ns`; 0: never). Read and written through [`Balance::hand_off_due`].
    last_hand_off_ns: AtomicU64,
}

impl Balance {
    /// `cell` is the worker's cell in the worker table, if it has one.
    pub(super) fn new(cell: Option<(WorkerTable, usize)>, enabled: bool) -> Balance {
        Balance {
            cell,
            enabled,
            staying: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            last_hand_off_ns: AtomicU64::new(0),
        }
    }

    /// Whether the accept loop should let a new connection read its first request (and count
    /// itself, if it will stay) before the next accept looks at the counts.
    pub(super) fn enabled(&self) -> bool {
        self.enabled && self.cell.is_some()
    }

    /// This worker's cell, when balancing.
    fn balancing(&self) -> Option<&(WorkerTable, usize)> {
        self.cell.as_ref().filter(|_| self.enabled)
    }

    /// Publishes this worker's count, while it accepts.
    pub(super) fn publish(&self) {
        if let Some((table, cell)) = self.balancing()
            && self.accepting.load(Ordering::Relaxed)
        {
            table.publish(*cell, self.staying.load(Ordering::Relaxed));
        }
    }

    /// A connection will stay (counted until [`Balance::leaves`]).
    pub(super) fn stays(&self) {
        self.staying.fetch_add(1, Ordering::Relaxed);
        self.publish();
    }

    /// A connection counted by [`Balance::stays`] closed.
    pub(super) fn leaves(&self) {
        self.staying.fetch_sub(1, Ordering::Relaxed);
        self.publish();
    }

    /// Whether this worker holds clearly more staying connections than the least loaded other
    /// accepting worker (see [`over_share`]); never without balancing.
    fn ahead_of_least(&self) -> bool {
        let Some((table, cell)) = self.balancing() else {
            return false;
        };
        let staying = self.staying.load(Ordering::Relaxed);
        table
            .least_loaded_other(*cell)
            .is_some_and(|least| over_share(staying, least))
    }

    /// Whether to close this HTTP/1 keep-alive connection (`staying`: counted as staying) after
    /// its response, so its client reconnects to a less loaded worker: this worker holds clearly
    /// more staying connections than the least loaded one, and has not handed one off in the
    /// last [`HAND_OFF_EVERY`]. Bursts that landed unevenly (the step-aside is bounded) even
    /// out this way.
    pub(super) fn hand_off_one(&self, staying: bool) -> bool {
        staying && self.ahead_of_least() && self.hand_off_due(Stamp::now())
    }

    /// Whether [`HAND_OFF_EVERY`] passed since the last hand-off (or there was none); if so,
    /// `now` is the last one from here on.
    fn hand_off_due(&self, now: Stamp) -> bool {
        let last = self.last_hand_off_ns.load(Ordering::Relaxed);
        if last != 0 && now.as_ns().saturating_sub(last) < HAND_OFF_EVERY.as_nanos() as u64 {
            return false;
        }
        self.last_hand_off_ns.store(now.as_ns(), Ordering::Relaxed);
        true
    }

    /// Before an accept: while this worker holds clearly more connections than the least
    /// loaded other accepting worker (which the kernel woke for the same connection), or it is
    /// `retiring` (waiting for its replacement) and another one accepts, wait so that worker
    /// takes it. Bounded, and only while the others are seen taking connections.
    pub(super) async fn step_aside(&self, retiring: impl Fn() -> bool) {
        let Some((table, cell)) = self.balancing() else {
            return;
        };
        let over =
            || (retiring() && table.least_loaded_other(*cell).is_some()) || self.ahead_of_least();
        let (mut others, mut idle) = (table.others_total(*cell), 0);
        for _ in 0..ACCEPT_STEP_ASIDE_ROUNDS {
            if !over() || idle >= ACCEPT_STEP_ASIDE_IDLE_ROUNDS {
                return;
            }
            tokio::time::sleep(ACCEPT_STEP_ASIDE).await;
            let now = table.others_total(*cell);
            idle = if now > others { 0 } else { idle + 1 };
            others = now;
        }
    }

    /// The worker stops accepting (it drains): its count is cleared and stays so.
    pub(super) fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        if let Some((table, cell)) = &self.cell {
            table.clear(*cell);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_offs_are_paced_and_the_first_is_due_at_once() {
        let b = Balance::new(None, false);
        let t0 = Stamp::now();
        assert!(b.hand_off_due(t0), "no hand-off yet: due");
        assert!(!b.hand_off_due(t0), "just handed off: not due");
        let almost = t0.plus(HAND_OFF_EVERY - Duration::from_nanos(1));
        assert!(!b.hand_off_due(almost));
        assert!(b.hand_off_due(t0.plus(HAND_OFF_EVERY)));
        assert!(!b.hand_off_due(t0.plus(HAND_OFF_EVERY)));
    }

    #[test]
    fn without_balancing_nothing_is_published_or_handed_off() {
        let (master, fd) = WorkerTable::create(2).unwrap();
        let worker = WorkerTable::map(&fd, 2).unwrap();
        let b = Balance::new(Some((worker, 0)), false);
        b.stays();
        assert!(!b.enabled() && !b.hand_off_one(true));
        assert_eq!(master.least_loaded_other(1), None);
        let b = Balance::new(Some((worker, 0)), true);
        b.stays();
        assert_eq!(master.least_loaded_other(1), Some(1));
        b.stop_accepting();
        assert_eq!(master.least_loaded_other(1), None, "cleared");
        b.stays();
        assert_eq!(master.least_loaded_other(1), None, "cleared for good");
    }
}
