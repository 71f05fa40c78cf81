//! The worker's monotonic clock: CLOCK_MONOTONIC, the clock the master stamps `--spawned-at-ns`
//! with and reads request ages against (its in-flight records are in microseconds of it).
//!
//! Owns [`Stamp`], one reading of it. A reading that a caller may or may not have taken already
//! is an `Option<Stamp>`: `None` says "none was taken, read it now", never a 0. It never keeps
//! time of its own: the coarse clock of the idle guard is `head_timeout`'s, the thread's CPU
//! time is `thread_clock`'s.

use std::time::Duration;

/// CLOCK_MONOTONIC in nanoseconds (0 if the kernel refused the read: never on Linux).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// One reading of the monotonic clock (see [`monotonic_ns`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Stamp(u64);

impl Stamp {
    /// The clock, read now.
    pub(super) fn now() -> Stamp {
        Stamp(monotonic_ns())
    }

    /// In nanoseconds.
    pub(super) fn as_ns(self) -> u64 {
        self.0
    }

    /// In microseconds (the worker table's unit).
    pub(super) fn as_us(self) -> u64 {
        self.0 / 1000
    }

    /// How long after `earlier` this reading was; zero if it was not after it.
    pub(super) fn since(self, earlier: Stamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Whole microseconds after `earlier` this reading was; 0 if it was not after it.
    pub(super) fn micros_since(self, earlier: Stamp) -> u64 {
        self.0.saturating_sub(earlier.0) / 1000
    }

    /// This reading moved on by `d` (for tests that must not wait for the clock).
    #[cfg(test)]
    pub(super) fn plus(self, d: Duration) -> Stamp {
        Stamp(self.0 + d.as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_go_forward_and_differences_saturate() {
        let a = Stamp::now();
        let b = Stamp::now();
        assert!(b >= a);
        assert_eq!(a.since(b.max(Stamp(a.0 + 1))), Duration::ZERO);
        assert_eq!(
            Stamp(5_000).since(Stamp(2_000)),
            Duration::from_nanos(3_000)
        );
        assert_eq!(Stamp(5_000).as_us(), 5);
    }
}
