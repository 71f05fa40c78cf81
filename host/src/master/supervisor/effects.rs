//! The supervisor's seam to the world: every side effect a transition has (exec a worker, send it
//! an order, kill it, take or prune a snapshot, tell the rest of the master something, start a
//! new master for `host upgrade`, end the processes workers left behind, read a worker's RSS)
//! goes through [`Effects`]. The transitions decide; an `Effects` does.
//!
//! A trait rather than a list of actions the transitions return: several effects answer at once
//! (a spawn gives a pid or an error, and the next decision depends on which), so with a list the
//! answers would have to come back as events, and the order of decisions would change. The
//! master's `System` (`master/system.rs`) does what the supervisor always did; the
//! unit tests' fake records each call, and with tokio's paused clock drives the rollout and
//! health decisions without a process.
//!
//! Time is not an effect: deadlines are state (see [`Supervisor::next_deadline`]) and the loop
//! sleeps until the nearest, on tokio's clock. This module holds the trait and what it is given;
//! it never does anything itself.
//!
//! [`Supervisor::next_deadline`]: super::Supervisor

use std::collections::HashSet;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::time::Instant;

use super::rollout::SnapshotSource;
use super::{Notice, WorkerId};
use crate::protocol::MasterToWorker;

/// A worker to start: its id (what its messages and its exit come back as), and what it inherits.
pub(crate) struct WorkerLaunch<'a> {
    pub id: WorkerId,
    pub slot: u32,
    pub generation: u64,
    /// The shared listening socket (fd 3 in the worker).
    pub listener: &'a TcpListener,
    /// The worker table, when the worker has a cell in it.
    pub table: Option<&'a OwnedFd>,
}

/// What the supervisor's transitions do to the world. See the module doc.
pub(crate) trait Effects: Send {
    /// Starts a worker process; its messages come back as `Event::Worker` and its exit as
    /// `Event::Exited`, both with `worker.id`. Returns its pid.
    fn spawn_worker(&mut self, worker: WorkerLaunch<'_>) -> std::io::Result<u32>;

    /// Sends `order` to worker `id`; `false` if its channel is closed.
    fn send(&mut self, id: WorkerId, order: MasterToWorker) -> bool;

    /// SIGKILLs worker `id` (through whatever owns its process, so never a recycled pid).
    fn kill(&mut self, id: WorkerId);

    /// Worker `id` was reaped: what reached it can go.
    fn reaped(&mut self, id: WorkerId);

    /// Takes a rollout's snapshot off the master's loop; the result comes back as
    /// `Event::SnapshotTaken` with `ticket`. `cancel` set: abandoned, stop early.
    fn take_snapshot(&mut self, ticket: u64, source: SnapshotSource, cancel: Arc<AtomicBool>);

    /// Deletes the snapshot files no kept generation and no live worker uses (`keep`).
    fn prune_snapshots(&mut self, keep: &HashSet<PathBuf>);

    /// Tells the rest of the master (systemd, a take-over) what happened.
    fn notice(&mut self, notice: Notice);

    /// The first generation serves, or could not start: `line` for `host start -d`.
    fn started(&mut self, line: &str);

    /// The binary `host upgrade` would start, or `None` when this master cannot start one.
    fn successor_exe(&self) -> Option<String>;

    /// Starts a new master on `listener` for `host upgrade`; `Event::Upgraded` says how it went
    /// (within `deadline`). Returns its pid.
    fn launch_successor(
        &mut self,
        listener: &TcpListener,
        deadline: Duration,
    ) -> Result<u32, String>;

    /// Abandons the new master under way (it is killed).
    fn cancel_successor(&mut self);

    /// Ends the processes workers left behind: SIGTERM, SIGKILL after `grace`, reaped.
    fn sweep_orphans(&mut self, now: Instant, grace: Duration);

    /// Whether orphans are still being ended, and when the next sweep is due.
    fn orphans_pending(&self) -> (bool, Option<Instant>);

    /// Orphans ended, and of those killed, ever (for `/metrics`).
    fn orphans_ended(&self) -> (u64, u64);

    /// Resident set size of `pid`, in bytes (0 when unknown).
    fn rss_bytes(&self, pid: u32) -> u64;
}
