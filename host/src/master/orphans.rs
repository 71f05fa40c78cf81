//! Processes the workers leave behind. A plugin may fork (and `setsid()`, and fork again); such a
//! process does not die with its worker and, forked without `exec`, it holds the listening
//! socket. The master is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so every such process is
//! reparented to it, not to init, once the worker (or whatever parent it had below the master)
//! exits (any process reparented to the master that it did not start itself counts: one a
//! dev-mode build left running in the background too). Such an orphan is ended at once: SIGTERM, then SIGKILL if it is still there
//! `orphan_grace` later. So nothing a worker started outlives the worker by more than
//! `orphan_grace` (its exit during a reload included), and `stop` reports stopped, and releases
//! the port, only once every one of them is gone.
//!
//! Owns: the subreaper flag; the registry of processes the master starts itself (workers, the
//! new master of `host upgrade`, dev-mode builds), which are never touched here; finding the
//! master's other children (from `/proc`); signalling them by pid (safe: an unreaped child's pid
//! cannot be reused); reaping them with `waitpid` on that one pid (never `waitpid(-1)`, which
//! would take the exit status of a child tokio waits for). It never blocks: `/proc` reads only,
//! on the master's loop, at a worker's exit, on SIGCHLD and at its own deadlines.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::time::Instant;

/// Pids of the children the master started itself.
static OWN: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// Makes this process the subreaper of everything its children start. Logged if refused.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(
            error = %e,
            "cannot become a child subreaper: processes a plugin forks may outlive `host stop`"
        );
    }
}

/// `pid` is a child the master started itself (and waits for): never an orphan. Called on the
/// master's loop right after the spawn, before any sweep can run.
pub fn own(pid: u32) {
    if let Ok(mut own) = OWN.lock() {
        own.get_or_insert_with(HashSet::new).insert(pid);
    }
}

/// The master's own child `pid` was reaped.
pub fn disown(pid: u32) {
    if let Ok(mut own) = OWN.lock()
        && let Some(own) = own.as_mut()
    {
        own.remove(&pid);
    }
}

fn is_own(pid: u32) -> bool {
    OWN.lock()
        .is_ok_and(|own| own.as_ref().is_some_and(|o| o.contains(&pid)))
}

/// The state letter and parent pid of `pid`, from `/proc/<pid>/stat`.
fn state_and_parent(pid: u32) -> Option<(bool, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesized name (which may hold spaces and parentheses).
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    let zombie = fields.next()? == "Z";
    let ppid: u32 = fields.next()?.parse().ok()?;
    Some((zombie, ppid))
}

/// This process's children, each with whether it is a zombie: from each thread's
/// `/proc/self/task/<tid>/children` where the kernel has it (`CONFIG_PROC_CHILDREN`), else from
/// every process's `/proc/<pid>/stat` (slower on a machine with many processes).
fn children_of_self() -> Vec<(u32, bool)> {
    let me = std::process::id();
    let listed: Option<Vec<u32>> = std::fs::read_dir("/proc/self/task").ok().and_then(|tasks| {
        let mut pids = Vec::new();
        for task in tasks.flatten() {
            let text = std::fs::read_to_string(task.path().join("children")).ok()?;
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        Some(pids)
    });
    let candidates: Vec<u32> = match listed {
        Some(pids) => pids,
        None => match std::fs::read_dir("/proc") {
            Ok(dir) => dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .collect(),
            Err(_) => return Vec::new(),
        },
    };
    candidates
        .into_iter()
        .filter_map(|pid| {
            let (zombie, ppid) = state_and_parent(pid)?;
            (ppid == me).then_some((pid, zombie))
        })
        .collect()
}

/// An orphan being ended.
struct Orphan {
    /// When it gets SIGKILL (`None`: it got it).
    kill_at: Option<Instant>,
    /// When the master stops waiting for it (a process in uninterruptible sleep may take long
    /// to die even of SIGKILL).
    give_up_at: Instant,
}

/// The orphans the master is ending, and how many it ended so far.
#[derive(Default)]
pub struct Orphans {
    ending: BTreeMap<u32, Orphan>,
    /// Orphans found (and sent SIGTERM), ever: `/metrics`.
    pub found: u64,
    /// Of those, the ones that needed SIGKILL.
    pub killed: u64,
}

impl Orphans {
    /// Looks at the master's children: reaps orphans that exited, sends SIGTERM to new ones and
    /// SIGKILL to those whose `grace` ran out.
    pub fn sweep(&mut self, now: Instant, grace: Duration) {
        let children: Vec<(u32, bool)> = children_of_self()
            .into_iter()
            .filter(|(pid, _)| !is_own(*pid))
            .collect();
        let present: HashSet<u32> = children.iter().map(|(pid, _)| *pid).collect();
        // Gone without our reaping it (it was someone else's after all): forget it.
        self.ending.retain(|pid, _| present.contains(pid));
        for (pid, zombie) in children {
            let target = Pid::from_raw(pid as i32);
            if zombie {
                // This one pid only, never -1.
                if let Ok(WaitStatus::StillAlive) | Err(_) =
                    waitpid(target, Some(WaitPidFlag::WNOHANG))
                {
                    continue;
                }
                self.ending.remove(&pid);
                continue;
            }
            match self.ending.get_mut(&pid) {
                None => {
                    static FOUND: crate::ratelimit::RateLimit =
                        crate::ratelimit::RateLimit::per_second();
                    if let Some(suppressed) = FOUND.hit(&std::io::ErrorKind::Other.into()) {
                        tracing::warn!(
                            pid,
                            command = %command_of(pid),
                            suppressed,
                            grace = %humantime::format_duration(grace),
                            "a process a worker left behind (forked by its plugin) is still running; ending it: SIGTERM, SIGKILL after orphan_grace"
                        );
                    }
                    let _ = kill(target, Signal::SIGTERM);
                    self.found += 1;
                    self.ending.insert(
                        pid,
                        Orphan {
                            kill_at: Some(now + grace),
                            give_up_at: now + grace * 2 + Duration::from_secs(1),
                        },
                    );
                }
                Some(o) if o.kill_at.is_some_and(|t| t <= now) => {
                    let _ = kill(target, Signal::SIGKILL);
                    o.kill_at = None;
                    self.killed += 1;
                }
                Some(o) if o.kill_at.is_none() && o.give_up_at <= now => {
                    tracing::error!(
                        pid,
                        "a process a worker left behind did not die of SIGKILL; no longer waiting for it"
                    );
                    self.ending.remove(&pid);
                }
                Some(_) => {}
            }
        }
    }

    /// Whether orphans are still being ended.
    pub fn any(&self) -> bool {
        !self.ending.is_empty()
    }

    /// When a sweep is due next: an orphan's SIGKILL, or giving up on it.
    pub fn deadline(&self) -> Option<Instant> {
        self.ending
            .values()
            .map(|o| o.kill_at.unwrap_or(o.give_up_at))
            .min()
    }
}

/// `pid`'s command name, for the log.
fn command_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}
