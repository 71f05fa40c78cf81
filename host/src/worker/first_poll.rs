//! The waker of a plugin future's first poll. That poll happens in hyper's service call
//! ([`super::request::call`]), where the request task's own waker is not at hand: most async
//! handlers answer on it, and then the request costs no boxed future at all.
//!
//! Owns the stand-in waker and the [`Relay`] its clones become. The stand-in costs nothing while
//! the future does not keep it. A clone is an `Arc<Relay>`, which forwards each wake to the waker
//! the request's task registers before every later poll ([`Relay::register`]), so a plugin future
//! that keeps only the waker of its first poll (a bug that a task's stable waker would hide) is
//! still woken. It never polls anything itself.

#![allow(unsafe_code)]

use std::mem::ManuallyDrop;
use std::sync::{Arc, OnceLock};
use std::task::{RawWaker, RawWakerVTable, Wake, Waker};

use atomic_waker::AtomicWaker;

/// Where the clones of a first poll's waker send their wakes: to the waker registered last.
#[derive(Default)]
pub struct Relay(AtomicWaker);

impl Relay {
    /// Registers the waker of the poll about to happen, in place of the last one.
    pub fn register(&self, waker: &Waker) {
        self.0.register(waker);
    }
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.0.wake();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake();
    }
}

/// One first poll's stand-in waker, on the stack for the length of that poll.
#[derive(Default)]
pub struct FirstPoll {
    /// Made by the first clone of the waker.
    relay: OnceLock<Arc<Relay>>,
}

impl FirstPoll {
    /// Runs `f` with the stand-in waker.
    pub fn with_waker<R>(&self, f: impl FnOnce(&Waker) -> R) -> R {
        let raw = RawWaker::new(std::ptr::from_ref(self).cast(), &STAND_IN);
        // SAFETY: the vtable's functions meet `RawWaker`'s contract for this data: `self` is
        // borrowed for as long as the waker is (it is lent to `f` only, and never dropped or
        // woken by value: `ManuallyDrop`), and every clone owns what it points to (an
        // `Arc<Relay>`, see `stand_in_clone`). They are thread-safe: `OnceLock` and `Arc`.
        let waker = ManuallyDrop::new(unsafe { Waker::from_raw(raw) });
        f(&waker)
    }

    /// The relay, if the future kept a clone of the waker: the request's task registers its own
    /// waker there before each later poll.
    pub fn into_relay(self) -> Option<Arc<Relay>> {
        self.relay.into_inner()
    }
}

static STAND_IN: RawWakerVTable = RawWakerVTable::new(
    stand_in_clone,
    stand_in_wake,
    stand_in_wake_by_ref,
    stand_in_drop,
);

/// A clone outlives the poll: it is the relay's own waker.
unsafe fn stand_in_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is the `FirstPoll` whose `with_waker` is running (see there).
    let first = unsafe { &*data.cast::<FirstPoll>() };
    let relay = first.relay.get_or_init(Default::default).clone();
    let waker = ManuallyDrop::new(Waker::from(relay));
    RawWaker::new(waker.data(), waker.vtable())
}

/// Never called: the stand-in is only lent, so it cannot be woken by value.
unsafe fn stand_in_wake(_: *const ()) {}

/// A future that wakes itself during its first poll is polled again at once anyway: hyper polls
/// a response future as soon as it has it.
unsafe fn stand_in_wake_by_ref(_: *const ()) {}

/// Never called: the stand-in is not dropped (`ManuallyDrop`), and owns nothing.
unsafe fn stand_in_drop(_: *const ()) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_waker_kept_from_the_first_poll_wakes_the_one_registered_last() {
        let first = FirstPoll::default();
        let kept = first.with_waker(|w| w.clone());
        let relay = first.into_relay().expect("a clone made the relay");
        let a = Arc::new(Count(AtomicUsize::new(0)));
        let b = Arc::new(Count(AtomicUsize::new(0)));
        relay.register(&Waker::from(a.clone()));
        relay.register(&Waker::from(b.clone()));
        kept.wake_by_ref();
        assert_eq!(
            (a.0.load(Ordering::SeqCst), b.0.load(Ordering::SeqCst)),
            (0, 1)
        );
        // The task polls again and registers; a wake from another thread reaches it.
        relay.register(&Waker::from(a.clone()));
        std::thread::spawn(move || kept.wake()).join().unwrap();
        assert_eq!(
            (a.0.load(Ordering::SeqCst), b.0.load(Ordering::SeqCst)),
            (1, 1)
        );
    }

    #[test]
    fn a_first_poll_that_keeps_no_waker_makes_no_relay() {
        let first = FirstPoll::default();
        first.with_waker(|w| w.wake_by_ref());
        assert!(first.into_relay().is_none());
    }
}
