//! Rate-limited logging of repeated I/O errors: the first occurrence of a cause is logged at
//! once, then at most one line per cause per second, carrying how many occurrences were
//! suppressed since the last line. A cause is the errno (or the error kind when there is none),
//! or a name the caller gives ([`RateLimit::hit_named`]) for a bound that is not an I/O error.
//!
//! Used where an error can repeat as fast as a loop spins, such as `accept` failing with
//! `EMFILE`: the log stays readable and the count says how bad it was. It decides only whether
//! to log; the caller still backs off.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What makes two errors "the same cause".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Errno(i32),
    Kind(io::ErrorKind),
    Named(&'static str),
}

impl Cause {
    fn of(e: &io::Error) -> Cause {
        e.raw_os_error().map_or(Cause::Kind(e.kind()), Cause::Errno)
    }
}

struct Entry {
    cause: Cause,
    last_logged: Instant,
    suppressed: u64,
}

/// Per-cause rate limit; `const`, so it can live in a `static` at the one place that logs.
pub(crate) struct RateLimit {
    every: Duration,
    causes: Mutex<Vec<Entry>>,
}

impl RateLimit {
    /// At most one line per cause per second.
    pub(crate) const fn per_second() -> RateLimit {
        RateLimit {
            every: Duration::from_secs(1),
            causes: Mutex::new(Vec::new()),
        }
    }

    /// Records one occurrence of `e`. `Some(n)` means "log it now", `n` being how many of the
    /// same cause were suppressed since the last line (0 for the first).
    pub(crate) fn hit(&self, e: &io::Error) -> Option<u64> {
        self.hit_at(Cause::of(e), Instant::now())
    }

    /// Records one occurrence of the cause called `name` (a bound hit, a warning that repeats),
    /// as [`RateLimit::hit`] does for an error.
    pub(crate) fn hit_named(&self, name: &'static str) -> Option<u64> {
        self.hit_at(Cause::Named(name), Instant::now())
    }

    fn hit_at(&self, cause: Cause, now: Instant) -> Option<u64> {
        let mut causes = self.causes.lock().unwrap_or_else(|p| p.into_inner());
        match causes.iter_mut().find(|c| c.cause == cause) {
            None => {
                causes.push(Entry {
                    cause,
                    last_logged: now,
                    suppressed: 0,
                });
                Some(0)
            }
            Some(c) if now.saturating_duration_since(c.last_logged) >= self.every => {
                c.last_logged = now;
                Some(std::mem::take(&mut c.suppressed))
            }
            Some(c) => {
                c.suppressed += 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_at_once_then_one_per_second_per_cause_with_the_count() {
        let limit = RateLimit::per_second();
        let emfile = Cause::Errno(24);
        let enfile = Cause::Errno(23);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(limit.hit_at(emfile, ms(0)), Some(0));
        // 60 more within the second: none logged.
        for i in 1..=60 {
            assert_eq!(limit.hit_at(emfile, ms(i * 10)), None);
        }
        // Another cause is not held back by the first.
        assert_eq!(limit.hit_at(enfile, ms(700)), Some(0));
        assert_eq!(limit.hit_at(emfile, ms(1000)), Some(60));
        assert_eq!(limit.hit_at(emfile, ms(1500)), None);
        assert_eq!(limit.hit_at(emfile, ms(2000)), Some(1));
        assert_eq!(limit.hit_at(enfile, ms(2000)), Some(0));
    }

    #[test]
    fn causes_are_errnos() {
        let a = io::Error::from_raw_os_error(24);
        let b = io::Error::from_raw_os_error(24);
        let other = io::Error::new(io::ErrorKind::TimedOut, "x");
        assert_eq!(Cause::of(&a), Cause::of(&b));
        assert_ne!(Cause::of(&a), Cause::of(&other));
    }
}
