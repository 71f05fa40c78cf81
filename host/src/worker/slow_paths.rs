//! The worker's memory of handlers that stalled its I/O thread: paths whose "non-blocking"
//! handler was caught taking longer than [`INLINE_LIMIT`] (they run on the blocking pool from
//! then on), and paths whose async handler blocked in one poll (named in the log once).
//!
//! An inline call is judged as an async poll is, on what its thread did (its CPU time or a
//! blocking call, `thread_clock`), never on a wall clock a busy machine stretches: moved for a
//! preemption, a healthy path would cost a pool hand-off on every request for the rest of the
//! worker's life. A reading of the thread's clock costs a system call, too dear for every call,
//! so a path earns it: its first call slower than the limit by the wall clock makes it a
//! *suspect* (nothing else happens), and a suspect's calls are timed by the thread's clock
//! too; the first of them caught holding the thread by its own doing moves the path. A handler
//! that really blocks thus stalls the thread twice, not once, before it is moved.
//!
//! Owns the three sets and their bounds. A client chooses the paths (up to `max_header_bytes` each),
//! so no set may grow with them: each holds at most `max_slow_paths` entries, kept as keyed
//! 64-bit hashes of the paths, not the paths (8 bytes an entry, whatever the path's length). A
//! path met once a set is full is not remembered (counted as `Limit::TrackingFull`): a slow one
//! keeps running inline. Two paths with the same hash (rare, and not choosable: the key is
//! random per worker) share an entry: a fast one may run on the pool, which only costs a thread
//! hand-off. The warnings are rate-limited: at most one line a second per kind, each carrying how
//! many it stands for. It never decides where a request runs (`request` does) and never
//! forgets an entry: a worker's life is bounded by reloads and recycling.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::counters::{Counters, Limit};
use crate::ratelimit::RateLimit;

/// An inline handler slower than this stalled the I/O thread: its path goes to the blocking pool
/// from then on. A poll of an async handler longer than this is named in the log.
pub(super) const INLINE_LIMIT: Duration = Duration::from_millis(20);

static SLOW_WARNING: RateLimit = RateLimit::per_second();
static BLOCKING_WARNING: RateLimit = RateLimit::per_second();
static FULL_WARNING: RateLimit = RateLimit::per_second();

pub(super) struct SlowPaths {
    /// The most paths each set remembers.
    max: usize,
    keys: RandomState,
    /// Hashes of paths whose "non-blocking" handler was caught taking too long.
    slow: Mutex<HashSet<u64>>,
    any_slow: AtomicBool,
    /// Hashes of paths whose inline call once took longer than the limit by the wall clock.
    suspects: Mutex<HashSet<u64>>,
    any_suspect: AtomicBool,
    /// Hashes of paths whose async handler blocked in one poll (logged once each).
    blocking: Mutex<HashSet<u64>>,
    counters: Option<&'static Counters>,
}

/// What [`SlowPaths::remember`] did.
enum Remembered {
    New,
    Known,
    Full,
}

impl SlowPaths {
    pub(super) fn new(max: usize, counters: Option<&'static Counters>) -> SlowPaths {
        SlowPaths {
            max,
            keys: RandomState::new(),
            slow: Mutex::default(),
            any_slow: AtomicBool::new(false),
            suspects: Mutex::default(),
            any_suspect: AtomicBool::new(false),
            blocking: Mutex::default(),
            counters,
        }
    }

    /// Whether `path`'s "non-blocking" handler was caught taking too long.
    pub(super) fn known_slow(&self, path: &str) -> bool {
        self.any_slow.load(Ordering::Relaxed)
            && self
                .slow
                .lock()
                .is_ok_and(|set| set.contains(&self.keys.hash_one(path)))
    }

    /// Whether `path`'s inline calls are to be timed by the thread's clock (one relaxed load
    /// while no path is a suspect).
    pub(super) fn suspected(&self, path: &str) -> bool {
        self.any_suspect.load(Ordering::Relaxed)
            && self
                .suspects
                .lock()
                .is_ok_and(|set| set.contains(&self.keys.hash_one(path)))
    }

    /// An inline call for `path` took `took`, over the limit by the wall clock. `own_doing`:
    /// what the thread's clock said, for a suspect (`None`: not timed so, the path was no
    /// suspect yet).
    pub(super) fn inline_call_took(&self, path: &str, took: Duration, own_doing: Option<bool>) {
        match own_doing {
            None => {
                if let Remembered::New = self.remember(&self.suspects, path) {
                    self.any_suspect.store(true, Ordering::Relaxed);
                    tracing::debug!(
                        path = shorten(path),
                        took_ms = took.as_millis() as u64,
                        "an inline call took longer than the limit; its path's next calls are timed by the thread's clock"
                    );
                }
            }
            Some(true) => self.mark_slow(path, took),
            // Kept waiting for a CPU: the machine's doing, not the handler's.
            Some(false) => {}
        }
    }

    /// A "non-blocking" handler took `took` for `path`: it runs on the blocking pool from now on.
    fn mark_slow(&self, path: &str, took: Duration) {
        match self.remember(&self.slow, path) {
            Remembered::New => {
                self.any_slow.store(true, Ordering::Relaxed);
                if let Some(more) = SLOW_WARNING.hit_named("slow inline handler") {
                    tracing::warn!(
                        path = shorten(path),
                        took_ms = took.as_millis() as u64,
                        more_paths_not_logged = more,
                        "a handler the plugin declared non-blocking stalled the I/O thread; this path now runs on the blocking pool"
                    );
                }
            }
            Remembered::Known | Remembered::Full => {}
        }
    }

    /// An async handler's future blocked the I/O thread in one poll: logged once per path (at
    /// most one line a second).
    pub(super) fn note_blocking_poll(&self, path: &str, took: Duration) {
        if let Remembered::New = self.remember(&self.blocking, path)
            && let Some(more) = BLOCKING_WARNING.hit_named("blocking poll")
        {
            tracing::warn!(
                path = shorten(path),
                took_ms = took.as_millis() as u64,
                more_paths_not_logged = more,
                "an async handler blocked the I/O thread in one poll, stalling every connection of this worker; move blocking work to tokio::task::spawn_blocking"
            );
        }
    }

    fn remember(&self, set: &Mutex<HashSet<u64>>, path: &str) -> Remembered {
        let key = self.keys.hash_one(path);
        let Ok(mut set) = set.lock() else {
            return Remembered::Known;
        };
        if set.contains(&key) {
            return Remembered::Known;
        }
        if set.len() >= self.max {
            drop(set);
            if let Some(c) = self.counters {
                c.limit_hit(Limit::TrackingFull);
            }
            if let Some(more) = FULL_WARNING.hit_named("tracking full") {
                tracing::warn!(
                    path = shorten(path),
                    max_slow_paths = self.max,
                    more_not_kept = more,
                    "too many distinct slow paths to remember (max_slow_paths); this one is not kept"
                );
            }
            return Remembered::Full;
        }
        set.insert(key);
        Remembered::New
    }
}

/// At most 200 bytes of a path for a log line (a client may send 64 KiB ones).
pub(super) fn shorten(path: &str) -> &str {
    let mut end = path.len().min(200);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_set_keeps_at_most_max_paths() {
        const MAX_PATHS: usize = 64;
        let paths = SlowPaths::new(MAX_PATHS, None);
        for i in 0..MAX_PATHS + 100 {
            paths.mark_slow(&format!("/p/{i}"), Duration::from_millis(30));
            paths.note_blocking_poll(&format!("/p/{i}"), Duration::from_millis(30));
        }
        assert_eq!(paths.slow.lock().unwrap().len(), MAX_PATHS);
        assert_eq!(paths.blocking.lock().unwrap().len(), MAX_PATHS);
        assert!(paths.known_slow("/p/0"));
        assert!(paths.known_slow(&format!("/p/{}", MAX_PATHS - 1)));
        assert!(!paths.known_slow(&format!("/p/{}", MAX_PATHS)));
        assert!(!paths.known_slow("/other"));
    }

    #[test]
    fn long_paths_are_shortened_on_a_char_boundary() {
        let long = "é".repeat(150);
        let short = shorten(&long);
        assert!(short.len() <= 200 && long.starts_with(short));
        assert_eq!(shorten("/a"), "/a");
    }
}
