//! What the I/O thread itself spent during one poll of plugin code: its CPU time and whether it
//! went off the CPU of its own accord (a blocking call: `sleep`, a blocking read, a lock), read
//! with `getrusage(RUSAGE_THREAD)` (the CPU time is the scheduler's own sum, the one
//! `CLOCK_THREAD_CPUTIME_ID` reads, and the same call gives the voluntary context switches).
//!
//! Wall time alone accuses a handler of what the machine did to it: on a busy machine a thread
//! that is merely preempted (runnable, waiting for a CPU) sees its poll take long. Preemption
//! adds neither CPU time nor voluntary switches, so [`Reading::blocked_since`] judges a poll on
//! those only. It decides nothing: `request` asks it about a poll.
//!
//! A reading is a system call (about 1.5 µs on this project's 2-core VM, as much as
//! `CLOCK_THREAD_CPUTIME_ID` alone): too dear for every poll. So a poll does not take its own:
//! [`baseline`] gives the thread's last one, taken afresh when it is older than
//! [`BASELINE_AGE`] or the thread slept since (parking in the reactor is itself a voluntary
//! switch). A poll is judged (a second reading) only once the wall clock says it took over the
//! limit; its baseline may also count up to [`BASELINE_AGE`] of the thread's CPU time before
//! it, well inside the 20 ms limit. It owns that one thread-local baseline.

use std::cell::Cell;
use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};

use super::clock::Stamp;

/// How old a baseline may be.
pub(super) const BASELINE_AGE: Duration = Duration::from_millis(1);

thread_local! {
    /// The thread's last reading and when it was taken.
    static BASELINE: Cell<Option<(Stamp, Reading)>> = const { Cell::new(None) };
    /// The thread slept since its baseline.
    static PARKED: Cell<bool> = const { Cell::new(false) };
}

/// The I/O thread is about to sleep in its reactor (its runtime's `on_thread_park`).
pub(super) fn note_parked() {
    PARKED.set(true);
}

/// A reading of this thread from at most [`BASELINE_AGE`] before `now`, with no sleep of the
/// thread since: the start of a poll about to run.
pub(super) fn baseline(now: Stamp) -> Option<Reading> {
    let fresh = BASELINE
        .get()
        .filter(|(at, _)| !PARKED.get() && now.since(*at) <= BASELINE_AGE);
    if let Some((_, reading)) = fresh {
        return Some(reading);
    }
    let reading = Reading::now()?;
    BASELINE.set(Some((now, reading)));
    PARKED.set(false);
    Some(reading)
}

/// The thread's CPU time and voluntary context switches at one moment.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reading {
    cpu: Duration,
    voluntary_switches: i64,
}

impl Reading {
    /// The calling thread's reading; `None` if the kernel refuses (never on Linux).
    pub(super) fn now() -> Option<Reading> {
        let usage = getrusage(UsageWho::RUSAGE_THREAD).ok()?;
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec().max(0) as u64)
                + Duration::from_micros(t.tv_usec().max(0) as u64)
        };
        Some(Reading {
            cpu: tv(usage.user_time()) + tv(usage.system_time()),
            voluntary_switches: usage.voluntary_context_switches(),
        })
    }

    /// Whether the thread, between this reading and `later`, during a poll that took `wall`,
    /// held the I/O thread for longer than `limit` by its own doing: it ran on a CPU for longer
    /// than `limit`, or it blocked (went off the CPU voluntarily) in a poll longer than `limit`.
    /// A poll that only waited for a CPU is not accused.
    pub(super) fn blocked_since(&self, later: &Reading, wall: Duration, limit: Duration) -> bool {
        if wall <= limit {
            return false;
        }
        let cpu = later.cpu.saturating_sub(self.cpu);
        cpu > limit || later.voluntary_switches > self.voluntary_switches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(20);

    #[test]
    fn spinning_is_accused_sleeping_is_accused_a_short_wall_never() {
        let start = Reading::now().unwrap();
        let began = std::time::Instant::now();
        while Reading::now().unwrap().cpu.saturating_sub(start.cpu) < LIMIT * 2 {}
        let spun = Reading::now().unwrap();
        assert!(start.blocked_since(&spun, began.elapsed(), LIMIT));

        let start = Reading::now().unwrap();
        std::thread::sleep(LIMIT * 2);
        let slept = Reading::now().unwrap();
        assert!(start.blocked_since(&slept, LIMIT * 2, LIMIT));
        assert!(!start.blocked_since(&slept, LIMIT, LIMIT));
    }

    /// What a reading costs (two per poll of an async handler): `cargo test -p host --release
    /// -- --ignored reading_cost --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn reading_cost() {
        const N: u32 = 200_000;
        let began = std::time::Instant::now();
        for _ in 0..N {
            std::hint::black_box(Reading::now());
        }
        eprintln!("{:?} a reading", began.elapsed() / N);
        let began = std::time::Instant::now();
        for _ in 0..N {
            std::hint::black_box(nix::time::clock_gettime(
                nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID,
            ))
            .ok();
        }
        eprintln!("{:?} a CPU clock reading", began.elapsed() / N);
        let began = std::time::Instant::now();
        for _ in 0..N {
            std::hint::black_box(super::super::clock::monotonic_ns());
        }
        eprintln!("{:?} a monotonic reading", began.elapsed() / N);
    }

    #[test]
    fn a_long_wall_with_little_cpu_and_no_blocking_is_not_accused() {
        let a = Reading {
            cpu: Duration::from_millis(100),
            voluntary_switches: 7,
        };
        let b = Reading {
            cpu: Duration::from_millis(105),
            voluntary_switches: 7,
        };
        assert!(!a.blocked_since(&b, Duration::from_millis(500), LIMIT));
    }
}
