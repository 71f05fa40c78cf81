//! The worker's blocking pool: where the plugin handlers that may block run
//! ([`Dispatch::Blocking`](super::loader::Dispatch)), off the I/O thread, and how their answers
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
//! A panicking job is caught and reported as [`JobError::Panicked`]. A future dropped before its
//! job finished leaves the job to run; the result is dropped on the pool thread.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
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

type Job = Box<dyn FnOnce() + Send>;

struct Inner {
    state: Mutex<State>,
    /// Where idle threads park.
    idle_cond: Condvar,
    max_threads: usize,
    idle_timeout: Duration,
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
    shutdown: bool,
}

impl Pool {
    /// A pool of at most `max_threads` threads, each leaving after `idle_timeout` without work.
    /// Must be called on the tokio runtime whose tasks will await its jobs (the I/O runtime):
    /// its kicker and deliverer tasks run there.
    pub fn new(max_threads: usize, idle_timeout: Duration) -> Pool {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            idle_cond: Condvar::new(),
            max_threads: max_threads.max(1),
            idle_timeout,
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

    /// Runs `f` on a pool thread; the future resolves to its result. Dropping the future does
    /// not stop `f`: its result is dropped when it returns.
    pub fn run<F, T>(&self, f: F) -> Running<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::Waiting(None)),
        });
        let completer = Completer {
            slot: Some(slot.clone()),
            inner: self.inner.clone(),
        };
        let job: Job = Box::new(move || {
            // `f` is consumed by the call: what it captured is dropped before the result is
            // handed back, so the awaiting side never sees it still referenced.
            let result = catch_unwind(AssertUnwindSafe(f))
                .map_err(|payload| JobError::Panicked(describe_panic(&*payload)));
            completer.complete(result);
        });
        let kick = {
            let mut st = self.inner.lock();
            st.queue.push_back(job);
            st.searching == 0
        };
        // A thread awake looking for work takes it (or wakes another, see `work`); otherwise
        // the kicker wakes one once this tick's other submissions are in too.
        if kick && !self.inner.kick_asked.swap(true, Ordering::SeqCst) {
            self.inner.kick.notify_one();
        }
        Running { slot }
    }

    /// Threads alive.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.inner.lock().threads
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
        } else if st.threads < self.max_threads {
            st.threads += 1;
            st.searching += 1;
            Wake::Start
        } else {
            Wake::None // all busy: the first to finish takes the next job
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
            st.searching -= 1;
            let wake = inner.wake_if_unattended(&mut st);
            drop(st);
            inner.carry_out(wake);
            job();
            st = inner.lock();
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

/// A job's result, once it has run.
pub struct Running<T> {
    slot: Arc<Slot<T>>,
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
        drop(old);
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

    /// Counts its drops.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn results_arrive() {
        let pool = Pool::new(1024, Duration::from_secs(60));
        let running: Vec<_> = (0..200u64).map(|i| pool.run(move || i * 2)).collect();
        for (i, r) in running.into_iter().enumerate() {
            assert_eq!(r.await.unwrap(), i as u64 * 2);
        }
        // One at a time too: each submission in a tick of its own.
        for i in 0..20u64 {
            assert_eq!(pool.run(move || i + 1).await.unwrap(), i + 1);
        }
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_the_pool_goes_on() {
        let pool = Pool::new(1, Duration::from_secs(60));
        let err = pool
            .run(|| -> u32 { panic!("boom in a job") })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, JobError::Panicked(m) if m.contains("boom in a job")),
            "{err}"
        );
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn jobs_that_block_run_in_parallel() {
        let pool = Pool::new(1024, Duration::from_secs(60));
        let began = Instant::now();
        let running: Vec<_> = (0..16)
            .map(|_| pool.run(|| std::thread::sleep(Duration::from_millis(200))))
            .collect();
        for r in running {
            r.await.unwrap();
        }
        let took = began.elapsed();
        // One after another they would take 3.2 s.
        assert!(took < Duration::from_millis(1200), "took {took:?}");
    }

    #[tokio::test]
    async fn a_dropped_future_leaves_its_job_to_finish_and_drops_the_result() {
        let pool = Pool::new(1024, Duration::from_secs(60));
        let drops = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let counted = drops.clone();
        let mut running = Box::pin(pool.run(move || {
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
            Counted(counted)
        }));
        // Polled once (its waker registered), then dropped while the job still runs.
        tokio::select! {
            biased;
            _ = &mut running => panic!("the job cannot have finished"),
            _ = std::future::ready(()) => {}
        }
        drop(running);
        go_tx.send(()).unwrap();
        until("the result is dropped", || {
            drops.load(Ordering::SeqCst) == 1
        })
        .await;
        // The pool still serves.
        assert_eq!(pool.run(|| 1).await.unwrap(), 1);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dropping_the_pool_fails_queued_jobs_and_does_not_wait_for_busy_threads() {
        let pool = Pool::new(1, Duration::from_secs(60));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (began_tx, began_rx) = mpsc::channel::<()>();
        let busy = pool.run(move || {
            began_tx.send(()).unwrap();
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
        });
        until("the first job runs", || began_rx.try_recv().is_ok()).await;
        let queued = pool.run(|| 2);
        drop(pool); // returns although a thread is busy
        assert!(matches!(queued.await, Err(JobError::Lost)));
        go_tx.send(()).unwrap();
        busy.await.unwrap();
    }

    #[tokio::test]
    async fn idle_threads_leave() {
        let pool = Pool::new(1024, Duration::from_millis(50));
        let running: Vec<_> = (0..4)
            .map(|_| pool.run(|| std::thread::sleep(Duration::from_millis(50))))
            .collect();
        for r in running {
            r.await.unwrap();
        }
        assert!(pool.threads() >= 1);
        until("every thread left", || pool.threads() == 0).await;
        // And new ones start when work comes again.
        assert_eq!(pool.run(|| 3).await.unwrap(), 3);
    }
}
