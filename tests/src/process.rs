//! Processes seen from outside: whether a pid is alive, its open-files limit and open fds, and
//! CPU contention (busy loops pinned to a CPU, a worker made to wait for it). Nothing here
//! knows what a host is.

use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::wait_until;

/// Whether `pid` is a running process. A zombie counts as gone: a daemonized master is
/// reparented to PID 1, which in some sandboxes never reaps it.
pub fn pid_alive(pid: u32) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// File descriptor limits

/// `prlimit(pid, RLIMIT_NOFILE, new)`: sets the limit if `new` is given; returns the old one.
fn prlimit_nofile(pid: u32, new: Option<nix::libc::rlimit>) -> nix::libc::rlimit {
    let mut old = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new_ptr = new.as_ref().map_or(std::ptr::null(), |n| n as *const _);
    // SAFETY: prlimit reads `*new_ptr` (a valid rlimit that outlives the call, or null) and
    // writes the old limit into `old`, a valid rlimit we own.
    let rc = unsafe { nix::libc::prlimit(pid as i32, nix::libc::RLIMIT_NOFILE, new_ptr, &mut old) };
    assert_eq!(
        rc,
        0,
        "prlimit({pid}, RLIMIT_NOFILE, {:?}): {}",
        new.map(|n| (n.rlim_cur, n.rlim_max)),
        std::io::Error::last_os_error()
    );
    old
}

/// Sets `pid`'s RLIMIT_NOFILE, soft and hard, to `limit` (as `prlimit --nofile=N:N` does): from
/// now on that process cannot open an fd numbered `limit` or higher, and its children inherit it.
pub fn set_fd_limit(pid: u32, limit: u64) {
    prlimit_nofile(
        pid,
        Some(nix::libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        }),
    );
}

/// Sets only `pid`'s soft RLIMIT_NOFILE, keeping its hard limit, so it can be raised again.
pub fn set_soft_fd_limit(pid: u32, soft: u64) {
    let old = prlimit_nofile(pid, None);
    prlimit_nofile(
        pid,
        Some(nix::libc::rlimit {
            rlim_cur: soft.min(old.rlim_max),
            rlim_max: old.rlim_max,
        }),
    );
}

/// How many fds `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ---------------------------------------------------------------------------------------------
// CPU contention: a worker made to wait for a CPU, as on a busy machine

/// The CPUs this process may run on, first of them.
pub fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    list.trim().split([',', '-']).next().unwrap().to_string()
}

/// Busy loops pinned to `cpu`, killed (by their own pid) when dropped.
pub struct Hogs(Vec<std::process::Child>);

impl Hogs {
    pub fn start(cpu: &str, n: usize) -> Hogs {
        Hogs(
            (0..n)
                .map(|_| {
                    std::process::Command::new("taskset")
                        .args(["-c", cpu, "sh", "-c", "while :; do :; done"])
                        .spawn()
                        .expect("taskset")
                })
                .collect(),
        )
    }
}

impl Hogs {
    /// Gives every loop priority `nice` (a loop of lower priority still keeps its CPU busy, but
    /// a task woken there preempts it at once).
    pub fn renice(&self, nice: i32) {
        for c in &self.0 {
            let ok = std::process::Command::new("renice")
                .args(["-n", &nice.to_string(), "-p", &c.id().to_string()])
                .output()
                .unwrap();
            assert!(ok.status.success(), "renice: {ok:?}");
        }
    }

    /// Waits until every loop has run on its CPU (the shell exec'd and spinning).
    pub async fn wait_spinning(&self) {
        let ticks = |pid: u32| -> u64 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after_comm = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
            // utime is field 14; after the comm it is the 12th.
            after_comm
                .split_whitespace()
                .nth(11)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        wait_until(Duration::from_secs(20), "the busy loops spinning", || {
            self.0.iter().all(|c| ticks(c.id()) >= 10)
        })
        .await;
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pins every thread of `pid` to `cpu` and gives each, and its scheduling group (the worker
/// runs in a session of its own: with autogroups, nice weighs only inside one), priority `nice`
/// (19: busy loops on that CPU keep it waiting for a CPU most of the time).
pub fn starve(pid: u32, cpu: &str, nice: i32) {
    if std::path::Path::new(&format!("/proc/{pid}/autogroup")).exists() {
        std::fs::write(format!("/proc/{pid}/autogroup"), nice.to_string())
            .expect("nice the worker's autogroup");
    }
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", cpu, &pid.to_string()])
        .output()
        .unwrap();
    assert!(ok.status.success(), "taskset: {ok:?}");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().into_string().unwrap();
        let ok = std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p", &tid])
            .output()
            .unwrap();
        assert!(ok.status.success(), "renice: {ok:?}");
    }
}
