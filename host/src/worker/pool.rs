//! The worker's blocking pool: where the plugin handlers that may block run
//! ([`Dispatch::Blocking`](super::calls::Dispatch)), off the I/O thread, and how their answers
//! come back to it.
//!
//! Owns: its threads (started on demand up to a maximum, parked while idle, gone after an idle
//! timeout), the queue of jobs waiting for a thread, and the two hand-offs: jobs to the threads
//! and results back to the awaiting futures. It never decides what runs on it, never joins a
//! thread (a handler stuck in plugin code must not hold the worker's exit up: the process exits
//! under it), and never wakes a thread, or the I/O thread, once per job when one wake can do
//! for a batch:
//!
//! - Submitting pushes the job on the queue and, unless a pool thread is already awake looking
//!   for work, signals the pool's *kicker* task on the I/O runtime. That is a local wake: tokio's
//!   current-thread scheduler puts the kicker at the back of its run queue (`Core::push_task`,
//!   no syscall), behind the connection tasks the same I/O poll already woke, so the kicker runs
//!   once those have submitted their jobs too and wakes one pool thread for the whole batch.
//! - A pool thread that takes a job while more are queued and no other thread is awake to take
//!   them wakes one more before running its job (the "one searching thread" rule of Go's and
//!   tokio's schedulers): jobs that really block fan out across threads one wake at a time,
//!   while on a busy CPU a batch of quick ones is drained by the first thread.
//! - A finished job's result goes in its slot; its future's waker goes on a list, and the
//!   pool's *deliverer* task on the I/O runtime is woken only if it has not been since it last
//!   emptied the list. That task wakes each waiting future from the I/O thread: local wakes. So
//!   a batch of completions costs the I/O thread one remote wake (tokio's inject queue and an
//!   eventfd write), not one each.
//!
//! A panicking job is caught and reported as [`JobError::Panicked`].
//!
//! Bounds (a client that leaves must not keep the pool busy):
//! - The queue: a job is refused ([`Full`]) when the jobs waiting for a thread would exceed
//!   `max_queue` beyond what the free threads can take at once. The caller answers `503`.
//! - Abandoned jobs: a future dropped before its job finished (the client closed its HTTP/1
//!   connection or reset its HTTP/2 stream, or `graceful_timeout` cut it) *cancels* the job. A
//!   job no thread has started never starts: it is dropped from the queue (counted as
//!   `Limit::PoolAbandoned`). A job already running learns it through its [`Cancel`] (the plugin
//!   sees it as `plugin_api::Cancellation`) and, whether or not the handler looks, stops
//!   counting against `max_threads`: a new thread may start for live work, up to
//!   `max_threads + max_abandoned` threads in all. A thread whose abandoned job ends while more
//!   than `max_threads` threads are live leaves. Its result is dropped on the pool thread.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Why a job gave no result.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the handler panicked: {0}")]
    Panicked(String),
    /// Dropped unrun: the pool shut down, or could not start a single thread.
    #[error("the job was dropped before it ran")]
    Lost,
}

/// The pool. Dropping it lets idle threads go and drops the queued jobs; busy threads finish
/// their job and exit (they are never joined).
pub struct Pool {
    inner: Arc<Inner>,
    tasks: [JoinHandle<()>; 2],
}

/// The pool's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Threads running live jobs (or idle), at most.
    pub max_threads: usize,
    /// Jobs waiting beyond what free threads can take at once, at most.
    pub max_queue: usize,
    /// Threads still running a job whose future was dropped, beyond `max_threads`, at most.
    pub max_abandoned: usize,
}

/// A job refused because the queue is full.
#[derive(Debug, thiserror::Error)]
#[error("the blocking pool's queue is full ({queued} jobs waiting)")]
pub struct Full {
    pub queued: usize,
}

/// A job's cancellation: set when its future is dropped before it finished. What the plugin's
/// handler polls or waits on (through the loader's cancellation vtable).
pub struct Cancel {
    /// Set under the pool's lock (see [`Inner::abandon`]).
    cancelled: AtomicBool,
    /// [`QUEUED`], [`RUNNING`] or [`DONE`]; changed under the pool's lock only.
    phase: AtomicU8,
    /// Where [`Cancel::wait`] sleeps.
    lock: Mutex<()>,
    cond: Condvar,
}

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

impl Cancel {
    fn new() -> Cancel {
        Cancel {
            cancelled: AtomicBool::new(false),
            phase: AtomicU8::new(QUEUED),
            lock: Mutex::new(()),
            cond: Condvar::new(),
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Waits until cancelled or `timeout` passed; whether it was cancelled.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.is_cancelled() {
                return true;
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return false;
            }
            guard = self
                .cond
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wakes the waiters: called after `cancelled` was set. Taking the lock first means a waiter
    /// that saw it unset is already waiting on the condvar.
    fn wake(&self) {
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
        self.cond.notify_all();
    }
}

struct Job {
    cancel: Arc<Cancel>,
    run: JobFn,
}

type JobFn = Box<dyn FnOnce(&Arc<Cancel>) + Send>;

struct Inner {
    state: Mutex<State>,
    /// Where idle threads park.
    idle_cond: Condvar,
    limits: Limits,
    idle_timeout: Duration,
    /// Where abandoned jobs dropped unrun are counted (`Limit::PoolAbandoned`).
    counters: Option<&'static crate::counters::Counters>,
    /// The runtime the pool's threads enter, so jobs see the same tokio context as on tokio's
    /// own blocking pool.
    runtime: Option<tokio::runtime::Handle>,
    /// Set from the first submission that asks the kicker for a thread until the kicker runs.
    kick_asked: AtomicBool,
    kick: Notify,
    /// Wakers of futures whose job finished, for the deliverer to wake.
    done: Mutex<Done>,
    /// Set from the first completion pushed on `done` until the deliverer empties it.
    deliver_asked: AtomicBool,
    deliver: Notify,
}

#[derive(Default)]
struct Done {
    wakers: Vec<Waker>,
    /// The pool was dropped, and with it the deliverer.
    closed: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Threads alive.
    threads: usize,
    /// Threads parked and not yet told to wake.
    idle: usize,
    /// Wakes sent to parked threads that none of them has taken yet.
    notified: usize,
    /// Threads awake and not running a job: each will look at the queue before it parks.
    /// Counted from the moment it is woken (or started).
    searching: usize,
    /// Threads running a job.
    running: usize,
    /// Of those, jobs whose future was dropped: they do not count against `max_threads`.
    abandoned: usize,
    /// Jobs on the queue whose future was dropped (removed when a thread meets them, or in one
    /// sweep once they are half the queue).
    queued_abandoned: usize,
    shutdown: bool,
}

impl Pool {
    /// A pool within `limits`, each thread leaving after `idle_timeout` without work; jobs
    /// dropped unrun count in `counters`.
    /// Must be called on the tokio runtime whose tasks will await its jobs (the I/O runtime):
    /// its kicker and deliverer tasks run there.
    pub fn new(
        limits: Limits,
        idle_timeout: Duration,
        counters: Option<&'static crate::counters::Counters>,
    ) -> Pool {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            idle_cond: Condvar::new(),
            limits: Limits {
                max_threads: limits.max_threads.max(1),
                ..limits
            },
            idle_timeout,
            counters,
            runtime: tokio::runtime::Handle::try_current().ok(),
            kick_asked: AtomicBool::new(false),
            kick: Notify::new(),
            done: Mutex::new(Done::default()),
            deliver_asked: AtomicBool::new(false),
            deliver: Notify::new(),
        });
        let kicker = tokio::spawn(kicker(inner.clone()));
        let deliverer = tokio::spawn(deliverer(inner.clone()));
        Pool {
            inner,
            tasks: [kicker, deliverer],
        }
    }

    /// Runs `f` on a pool thread, unless the queue is full; the future resolves to its result.
    /// `f` gets the job's [`Cancel`]. Dropping the future cancels the job: never started if it
    /// still waits, else `f` runs on (it may look at its `Cancel`) and its result is dropped.
    pub fn run<F, T>(&self, f: F) -> Result<Running<T>, Full>
    where
        F: FnOnce(&Arc<Cancel>) -> T + Send + 'static,
        T: Send + 'static,
    {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::Waiting(None)),
        });
        let completer = Completer {
            slot: Some(slot.clone()),
            inner: self.inner.clone(),
        };
        let cancel = Arc::new(Cancel::new());
        let job = Job {
            cancel: cancel.clone(),
            run: Box::new(move |cancel| {
                // `f` is consumed by the call: what it captured is dropped before the result is
                // handed back, so the awaiting side never sees it still referenced.
                let result = catch_unwind(AssertUnwindSafe(|| f(cancel)))
                    .map_err(|payload| JobError::Panicked(describe_panic(&*payload)));
                completer.complete(result);
            }),
        };
        let kick = {
            let mut st = self.inner.lock();
            let queued = st.queue.len() - st.queued_abandoned;
            if queued >= self.inner.free_threads(&st) + self.inner.limits.max_queue {
                drop(st);
                // Outside the lock: the job reports `Lost` to a slot no one awaits.
                drop(job);
                return Err(Full { queued });
            }
            st.queue.push_back(job);
            st.searching == 0
        };
        // A thread awake looking for work takes it (or wakes another, see `work`); otherwise
        // the kicker wakes one once this tick's other submissions are in too.
        if kick && !self.inner.kick_asked.swap(true, Ordering::SeqCst) {
            self.inner.kick.notify_one();
        }
        Ok(Running {
            slot,
            cancel,
            inner: self.inner.clone(),
        })
    }

    /// Threads alive.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.inner.lock().threads
    }

    /// Threads running an abandoned job.
    #[cfg(test)]
    fn abandoned(&self) -> usize {
        self.inner.lock().abandoned
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let queued = {
            let mut st = self.inner.lock();
            st.shutdown = true;
            st.queued_abandoned = 0;
            std::mem::take(&mut st.queue)
        };
        self.inner.idle_cond.notify_all();
        // Outside the lock: each dropped job reports `Lost` to its future.
        drop(queued);
        // The deliverer is gone: from now on each job that finishes wakes its future itself.
        let stranded = {
            let mut done = self.inner.lock_done();
            done.closed = true;
            std::mem::take(&mut done.wakers)
        };
        stranded.into_iter().for_each(Waker::wake);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock and no code under it panics: poisoning cannot happen, but
        // would not make the counts wrong either.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_done(&self) -> MutexGuard<'_, Done> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more thread looking at the queue: a parked one, else a new one while under
    /// the maximum. The caller carries the [`Wake`] out once it has released the lock (woken
    /// under it, a thread that gets the CPU at once would only block on the lock).
    #[must_use]
    fn wake_one(&self, st: &mut State) -> Wake {
        if st.idle > 0 {
            st.idle -= 1;
            st.notified += 1;
            st.searching += 1;
            Wake::Parked
        } else if self.may_start(st) {
            st.threads += 1;
            st.searching += 1;
            Wake::Start
        } else {
            if st.threads - st.abandoned < self.limits.max_threads {
                // Room for live work, but the abandoned threads are at their cap.
                self.abandoned_cap_hit(st);
            }
            Wake::None // all busy: the first to finish takes the next job
        }
    }

    /// Whether one more thread may start: fewer than `max_threads` threads not running an
    /// abandoned job, and fewer than `max_threads + max_abandoned` in all.
    fn may_start(&self, st: &State) -> bool {
        let l = &self.limits;
        st.threads - st.abandoned < l.max_threads
            && st.threads < l.max_threads.saturating_add(l.max_abandoned)
    }

    /// Jobs that threads could take at once: under both thread bounds, less the jobs running.
    fn free_threads(&self, st: &State) -> usize {
        let l = &self.limits;
        let live = l.max_threads.saturating_sub(st.running - st.abandoned);
        let all = l
            .max_threads
            .saturating_add(l.max_abandoned)
            .saturating_sub(st.running);
        live.min(all)
    }

    /// A job's future was dropped before its result came: cancels the job. Still queued, it
    /// never starts; running, it no longer counts against `max_threads` (a thread may start for
    /// the queue). Called from the awaiting side, under no lock.
    fn abandon(self: &Arc<Self>, cancel: &Cancel) {
        let (wake, swept) = {
            let mut st = self.lock();
            cancel.cancelled.store(true, Ordering::Release);
            match cancel.phase.load(Ordering::Relaxed) {
                QUEUED => {
                    st.queued_abandoned += 1;
                    // Swept in one go once they are half the queue: it stays within twice its
                    // live jobs, at O(1) per job.
                    let swept: VecDeque<Job> = if st.queued_abandoned * 2 > st.queue.len() {
                        let (kept, swept) = std::mem::take(&mut st.queue)
                            .into_iter()
                            .partition(|j| !j.cancel.is_cancelled());
                        st.queue = kept;
                        st.queued_abandoned = 0;
                        swept
                    } else {
                        VecDeque::new()
                    };
                    (Wake::None, swept)
                }
                RUNNING => {
                    st.abandoned += 1;
                    (self.wake_if_unattended(&mut st), VecDeque::new())
                }
                _ => (Wake::None, VecDeque::new()),
            }
        };
        cancel.wake();
        self.carry_out(wake);
        self.count_abandoned(swept.len());
        // Outside the lock: each reports `Lost` to a slot no one awaits.
        drop(swept);
    }

    /// Work waits because `max_abandoned` threads run abandoned jobs: counted, and logged at
    /// most once a second.
    fn abandoned_cap_hit(&self, st: &State) {
        static WARNING: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();
        if let Some(c) = self.counters {
            c.limit_hit(crate::counters::Limit::PoolAbandonedThreads);
        }
        if let Some(more) = WARNING.hit_named("abandoned threads at cap") {
            tracing::warn!(
                abandoned = st.abandoned,
                queued = st.queue.len() - st.queued_abandoned,
                more_not_logged = more,
                "the blocking pool's threads all run handlers whose client is gone (blocking_abandoned_threads); waiting work starts when one ends"
            );
        }
    }

    fn count_abandoned(&self, n: usize) {
        if let Some(c) = self.counters {
            for _ in 0..n {
                c.limit_hit(crate::counters::Limit::PoolAbandoned);
            }
        }
    }

    /// Wakes a thread if the queue holds jobs and none is looking at it: to be carried out
    /// with the lock released.
    #[must_use]
    fn wake_if_unattended(&self, st: &mut State) -> Wake {
        if !st.queue.is_empty() && st.searching == 0 {
            self.wake_one(st)
        } else {
            Wake::None
        }
    }

    fn carry_out(self: &Arc<Self>, wake: Wake) {
        match wake {
            Wake::None => {}
            // Any parked thread will do: each takes a wake only if `notified` counts one.
            Wake::Parked => self.idle_cond.notify_one(),
            Wake::Start => self.start_thread(),
        }
    }

    /// Starts a thread that `wake_one` counted.
    fn start_thread(self: &Arc<Self>) {
        let inner = self.clone();
        let started = std::thread::Builder::new()
            .name("host-pool".into())
            .spawn(move || work(inner));
        if let Err(e) = started {
            let orphans = {
                let mut st = self.lock();
                st.threads -= 1;
                st.searching -= 1;
                // With no thread at all, queued jobs would wait forever: fail them instead.
                if st.threads == 0 {
                    st.queued_abandoned = 0;
                    std::mem::take(&mut st.queue)
                } else {
                    VecDeque::new()
                }
            };
            tracing::error!(error = %e, failed_jobs = orphans.len(), "cannot start a blocking-pool thread");
        }
    }
}

/// Waits for the first submission of a tick (see the module doc) and wakes a thread for the
/// queue unless one is already looking at it.
async fn kicker(inner: Arc<Inner>) {
    loop {
        inner.kick.notified().await;
        // Cleared before looking, so a submission after the look signals again.
        inner.kick_asked.store(false, Ordering::SeqCst);
        let wake = inner.wake_if_unattended(&mut inner.lock());
        inner.carry_out(wake);
    }
}

/// Wakes the futures whose job finished, from the I/O thread.
async fn deliverer(inner: Arc<Inner>) {
    let mut batch = Vec::new();
    loop {
        inner.deliver.notified().await;
        // Cleared before taking the list, so a completion after the take signals again.
        inner.deliver_asked.store(false, Ordering::SeqCst);
        std::mem::swap(&mut inner.lock_done().wakers, &mut batch);
        for waker in batch.drain(..) {
            waker.wake();
        }
    }
}

/// What [`Inner::wake_one`] decided.
enum Wake {
    None,
    Parked,
    Start,
}

/// A pool thread. Counted as searching by whoever started it.
fn work(inner: Arc<Inner>) {
    let _runtime = inner.runtime.as_ref().map(|rt| rt.enter());
    let mut st = inner.lock();
    loop {
        if !st.shutdown
            && let Some(job) = st.queue.pop_front()
        {
            if job.cancel.is_cancelled() {
                // Its client left before any thread took it: never started.
                st.queued_abandoned -= 1;
                drop(st);
                inner.count_abandoned(1);
                drop(job);
                st = inner.lock();
                continue;
            }
            job.cancel.phase.store(RUNNING, Ordering::Relaxed);
            st.running += 1;
            st.searching -= 1;
            let wake = inner.wake_if_unattended(&mut st);
            drop(st);
            inner.carry_out(wake);
            let Job { cancel, run } = job;
            run(&cancel);
            st = inner.lock();
            st.running -= 1;
            if cancel.is_cancelled() {
                st.abandoned -= 1;
            }
            cancel.phase.store(DONE, Ordering::Relaxed);
            if st.threads - st.abandoned > inner.limits.max_threads {
                // One started while this one ran an abandoned job: one too many now.
                st.threads -= 1;
                return;
            }
            st.searching += 1;
            continue;
        }
        st.searching -= 1;
        if st.shutdown {
            st.threads -= 1;
            return;
        }
        // Park until woken, or leave after `idle_timeout`. The counts are of anonymous threads:
        // any parked thread may take a wake meant for "one idle thread".
        st.idle += 1;
        let deadline = Instant::now() + inner.idle_timeout;
        loop {
            if st.notified > 0 {
                st.notified -= 1;
                break; // counted as searching by the waker
            }
            let now = Instant::now();
            if st.shutdown || now >= deadline {
                st.idle -= 1;
                st.threads -= 1;
                return;
            }
            st = inner
                .idle_cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

struct Slot<T> {
    state: Mutex<SlotState<T>>,
}

enum SlotState<T> {
    /// The job runs or waits; the waker of the future's last poll.
    Waiting(Option<Waker>),
    Done(Result<T, JobError>),
    /// The result was taken, or the future dropped.
    Gone,
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, SlotState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hands a job's result to its future. Dropped without completing (the job was dropped
/// unrun), it reports [`JobError::Lost`].
struct Completer<T> {
    slot: Option<Arc<Slot<T>>>,
    inner: Arc<Inner>,
}

impl<T> Completer<T> {
    fn complete(mut self, result: Result<T, JobError>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<T, JobError>) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let mut state = slot.lock();
        match std::mem::replace(&mut *state, SlotState::Gone) {
            SlotState::Waiting(waker) => {
                *state = SlotState::Done(result);
                drop(state);
                if let Some(waker) = waker {
                    self.inner.deliver(waker);
                }
            }
            // The future is gone: so is the result (outside the lock).
            SlotState::Done(_) | SlotState::Gone => {
                drop(state);
                drop(result);
            }
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        self.finish(Err(JobError::Lost));
    }
}

impl Inner {
    /// Queues a finished job's waker for the deliverer, waking it if it is not already.
    fn deliver(&self, waker: Waker) {
        let mut done = self.lock_done();
        if done.closed {
            drop(done);
            waker.wake();
            return;
        }
        done.wakers.push(waker);
        drop(done);
        if !self.deliver_asked.swap(true, Ordering::SeqCst) {
            self.deliver.notify_one();
        }
    }
}

/// A job's result, once it has run. Dropped before, it cancels the job.
pub struct Running<T> {
    slot: Arc<Slot<T>>,
    cancel: Arc<Cancel>,
    inner: Arc<Inner>,
}

impl<T> Future for Running<T> {
    type Output = Result<T, JobError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.slot.lock();
        match &mut *state {
            SlotState::Waiting(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            SlotState::Done(_) => match std::mem::replace(&mut *state, SlotState::Gone) {
                SlotState::Done(result) => Poll::Ready(result),
                _ => unreachable!("matched Done just above"),
            },
            // Polled after it was ready.
            SlotState::Gone => Poll::Ready(Err(JobError::Lost)),
        }
    }
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        // A result already there is dropped here, outside the lock; one to come is dropped by
        // the pool thread.
        let old = std::mem::replace(&mut *self.slot.lock(), SlotState::Gone);
        let waiting = matches!(old, SlotState::Waiting(_));
        drop(old);
        if waiting {
            self.inner.abandon(&self.cancel);
        }
    }
}

fn describe_panic(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a payload that is not a string".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    /// Waits (on the runtime, so the pool's tasks run) until `cond` holds; fails after 10 s.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn limits(max_threads: usize) -> Limits {
        Limits {
            max_threads,
            max_queue: 1 << 20,
            max_abandoned: 1024,
        }
    }

    fn pool(max_threads: usize) -> Pool {
        Pool::new(limits(max_threads), Duration::from_secs(60), None)
    }

    /// Submits, with a queue that has room.
    fn run<T: Send + 'static>(
        pool: &Pool,
        f: impl FnOnce(&Arc<Cancel>) -> T + Send + 'static,
    ) -> Running<T> {
        pool.run(f).expect("the queue has room")
    }

    /// Counts its drops.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn results_arrive() {
        let pool = pool(1024);
        let running: Vec<_> = (0..200u64).map(|i| run(&pool, move |_| i * 2)).collect();
        for (i, r) in running.into_iter().enumerate() {
            assert_eq!(r.await.unwrap(), i as u64 * 2);
        }
        // One at a time too: each submission in a tick of its own.
        for i in 0..20u64 {
            assert_eq!(run(&pool, move |_| i + 1).await.unwrap(), i + 1);
        }
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_the_pool_goes_on() {
        let pool = pool(1);
        let err = run(&pool, |_| -> u32 { panic!("boom in a job") })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, JobError::Panicked(m) if m.contains("boom in a job")),
            "{err}"
        );
        assert_eq!(run(&pool, |_| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn jobs_that_block_run_in_parallel() {
        let pool = pool(1024);
        let began = Instant::now();
        let running: Vec<_> = (0..16)
            .map(|_| run(&pool, |_| std::thread::sleep(Duration::from_millis(200))))
            .collect();
        for r in running {
            r.await.unwrap();
        }
        let took = began.elapsed();
        // One after another they would take 3.2 s.
        assert!(took < Duration::from_millis(1200), "took {took:?}");
    }

    #[tokio::test]
    async fn a_dropped_future_leaves_a_running_job_to_finish_and_drops_the_result() {
        let pool = pool(1024);
        let drops = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (began_tx, began_rx) = mpsc::channel::<()>();
        let counted = drops.clone();
        let mut running = Box::pin(run(&pool, move |_| {
            began_tx.send(()).unwrap();
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
            Counted(counted)
        }));
        // Polled once (its waker registered), then dropped while the job runs.
        tokio::select! {
            biased;
            _ = &mut running => panic!("the job cannot have finished"),
            _ = std::future::ready(()) => {}
        }
        until("the job runs", || began_rx.try_recv().is_ok()).await;
        drop(running);
        go_tx.send(()).unwrap();
        until("the result is dropped", || {
            drops.load(Ordering::SeqCst) == 1
        })
        .await;
        // The pool still serves.
        assert_eq!(run(&pool, |_| 1).await.unwrap(), 1);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dropping_the_pool_fails_queued_jobs_and_does_not_wait_for_busy_threads() {
        let pool = pool(1);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (began_tx, began_rx) = mpsc::channel::<()>();
        let busy = run(&pool, move |_| {
            began_tx.send(()).unwrap();
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
        });
        until("the first job runs", || began_rx.try_recv().is_ok()).await;
        let queued = run(&pool, |_| 2);
        drop(pool); // returns although a thread is busy
        assert!(matches!(queued.await, Err(JobError::Lost)));
        go_tx.send(()).unwrap();
        busy.await.unwrap();
    }

    #[tokio::test]
    async fn idle_threads_leave() {
        let pool = Pool::new(limits(1024), Duration::from_millis(50), None);
        let running: Vec<_> = (0..4)
            .map(|_| run(&pool, |_| std::thread::sleep(Duration::from_millis(50))))
            .collect();
        for r in running {
            r.await.unwrap();
        }
        assert!(pool.threads() >= 1);
        until("every thread left", || pool.threads() == 0).await;
        // And new ones start when work comes again.
        assert_eq!(run(&pool, |_| 3).await.unwrap(), 3);
    }

    /// A job that blocks until told (or 10 s), and says when it began.
    fn blocker(pool: &Pool) -> (Running<()>, mpsc::Sender<()>, mpsc::Receiver<()>) {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (began_tx, began_rx) = mpsc::channel::<()>();
        let running = run(pool, move |_| {
            began_tx.send(()).unwrap();
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
        });
        (running, go_tx, began_rx)
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_room_comes_back() {
        let limits = Limits {
            max_threads: 1,
            max_queue: 2,
            max_abandoned: 0,
        };
        let pool = Pool::new(limits, Duration::from_secs(60), None);
        let (busy, go, began) = blocker(&pool);
        until("the first job runs", || began.try_recv().is_ok()).await;
        let queued: Vec<_> = (0..2).map(|i| run(&pool, move |_| i)).collect();
        let Err(full) = pool.run(|_| 9) else {
            panic!("a third waiting job was queued");
        };
        assert_eq!(full.queued, 2);
        go.send(()).unwrap();
        busy.await.unwrap();
        for (i, r) in queued.into_iter().enumerate() {
            assert_eq!(r.await.unwrap(), i);
        }
        assert_eq!(run(&pool, |_| 3).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_queued_job_whose_future_is_dropped_never_runs() {
        let pool = pool(1);
        let (busy, go, began) = blocker(&pool);
        until("the first job runs", || began.try_recv().is_ok()).await;
        let ran = Arc::new(AtomicUsize::new(0));
        let queued: Vec<_> = (0..10)
            .map(|_| {
                let ran = ran.clone();
                run(&pool, move |_| ran.fetch_add(1, Ordering::SeqCst))
            })
            .collect();
        drop(queued);
        go.send(()).unwrap();
        busy.await.unwrap();
        assert_eq!(run(&pool, |_| 5).await.unwrap(), 5);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        // Swept from the queue, not just skipped: a full queue counts live jobs only.
        assert_eq!(pool.inner.lock().queue.len(), 0);
    }

    #[tokio::test]
    async fn a_running_job_sees_its_cancel() {
        let pool = pool(1);
        let (began_tx, began_rx) = mpsc::channel::<()>();
        let (saw_tx, saw_rx) = mpsc::channel::<bool>();
        let running = run(&pool, move |cancel| {
            began_tx.send(()).unwrap();
            saw_tx.send(cancel.wait(Duration::from_secs(10))).unwrap();
        });
        until("the job runs", || began_rx.try_recv().is_ok()).await;
        let dropped = Instant::now();
        drop(running);
        let saw = saw_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(saw, "the job's wait ended without the cancel");
        assert!(dropped.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn abandoned_running_jobs_stop_holding_threads_up_to_a_cap() {
        let limits = Limits {
            max_threads: 1,
            max_queue: 16,
            max_abandoned: 1,
        };
        let pool = Pool::new(limits, Duration::from_secs(60), None);
        // A job that ignores its cancel, abandoned: the next job gets a thread of its own.
        let (stuck, go_stuck, began) = blocker(&pool);
        until("the first job runs", || began.try_recv().is_ok()).await;
        drop(stuck);
        assert_eq!(run(&pool, |_| 1).await.unwrap(), 1);
        assert_eq!(pool.abandoned(), 1);
        assert_eq!(pool.threads(), 2);
        // A second one abandoned reaches `max_threads + max_abandoned`: the next job waits.
        let (stuck2, go_stuck2, began2) = blocker(&pool);
        until("the second job runs", || began2.try_recv().is_ok()).await;
        drop(stuck2);
        let waiting = run(&pool, |_| 2);
        let mut waiting = Box::pin(waiting);
        let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
        assert!(early.is_err(), "a third thread started past the cap");
        assert_eq!(pool.threads(), 2);
        go_stuck.send(()).unwrap();
        assert_eq!(waiting.await.unwrap(), 2);
        go_stuck2.send(()).unwrap();
        until("the threads left over leave", || {
            pool.abandoned() == 0 && pool.threads() == 1
        })
        .await;
    }
}
