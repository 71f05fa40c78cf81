//! Dev mode's build command (config `build`, `start --build`): `sh -c CMD` in `cfg.build_dir`
//! (the config file's directory, or the current directory for `--build`).
//!
//! It runs in two places. Once at `host start`, before the master exists ([`at_start`]: blocking,
//! in the process that starts the master, its output streamed to the terminal; a failure refuses
//! the start). Then after each source change, for the watcher ([`run`]: a child process awaited
//! asynchronously, so the master's single-threaded loop goes on answering `status`, signals and
//! workers meanwhile, in a process group of its own that is killed whole when the watcher cancels
//! the build or goes away). Each finished build's outcome is a [`BuildReport`] naming its first
//! error line, which the master keeps for `status` until a later build succeeds; a cancelled
//! build reports nothing.
//!
//! It never reloads (the watcher asks the supervisor for that) and never reads the plugin.

use std::io::{BufRead as _, Write as _};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::protocol::BuildReport;

/// Longest error line kept for `status`.
const MAX_ERROR_LINE: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot run the build command `{command}` in {dir}")]
    Spawn {
        command: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the build at start failed ({status}): {first_error}; not starting (`{command}` in {dir})"
    )]
    Failed {
        command: String,
        dir: PathBuf,
        status: ExitStatus,
        first_error: String,
    },
}

/// The line of a build's output that says what went wrong: the first one that starts with
/// `error` (cargo's and rustc's), else the last non-empty one; at most [`MAX_ERROR_LINE`] bytes.
pub fn first_error_line(output: &str) -> Option<String> {
    let mut lines = output.lines().map(str::trim).filter(|l| !l.is_empty());
    let line = lines
        .clone()
        .find(|l| l.to_ascii_lowercase().starts_with("error"))
        .or_else(|| lines.next_back())?;
    let mut end = line.len().min(MAX_ERROR_LINE);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(line[..end].to_string())
}

fn command(command: &str, dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the build once, before the master starts: its output goes to this process's stderr as
/// it comes (stdout included), and a failure is an error naming the first error line.
pub fn at_start(build: &str, dir: &Path) -> Result<Duration, BuildError> {
    let spawn_err = |source| BuildError::Spawn {
        command: build.to_string(),
        dir: dir.to_path_buf(),
        source,
    };
    eprintln!("building: {build} (in {})", dir.display());
    let began = Instant::now();
    let stdout = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(spawn_err)?;
    let mut child = command(build, dir)
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // Shown as it comes, and kept for the first error line.
    let mut seen = String::new();
    if let Some(pipe) = child.stderr.take() {
        let mut terminal = std::io::stderr();
        for line in std::io::BufReader::new(pipe)
            .split(b'\n')
            .map_while(Result::ok)
        {
            let _ = terminal.write_all(&line);
            let _ = terminal.write_all(b"\n");
            seen.push_str(&String::from_utf8_lossy(&line));
            seen.push('\n');
        }
    }
    let status = child.wait().map_err(spawn_err)?;
    if status.success() {
        return Ok(began.elapsed());
    }
    Err(BuildError::Failed {
        command: build.to_string(),
        dir: dir.to_path_buf(),
        status,
        first_error: first_error_line(&seen).unwrap_or_else(|| "no output".into()),
    })
}

/// How a build after a source change ended.
#[derive(Debug)]
pub enum Outcome {
    /// It ran to its end, well or not.
    Done(BuildReport),
    /// A newer change came first: its whole process group was killed, and nothing it made
    /// may be rolled out.
    Cancelled,
}

/// The build's process group (the shell is its leader, and cargo, rustc and build scripts are
/// in it), SIGKILLed when dropped armed: a cancelled build, or a watcher that ends (the master
/// stops), leaves no compiler running. What a build script moved to a session of its own is
/// reparented to the master and ended there (see `master::orphans`).
struct Group(Option<nix::unistd::Pid>);

impl Group {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn read_all(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_end(&mut out).await;
    }
    out
}

/// Runs the build after a source change, as a child process this task awaits (the master's loop
/// is not held up), in a process group of its own; logs its outcome and, when it fails, its
/// output line by line. When `cancel` resolves first, the whole group is killed and reaped, and
/// the outcome is [`Outcome::Cancelled`].
pub async fn run(build: &str, dir: &Path, cancel: impl std::future::Future) -> Outcome {
    tracing::info!(command = build, "building");
    let started_at = unix_now();
    let began = Instant::now();
    let mut cmd = tokio::process::Command::from(command(build, dir));
    cmd.kill_on_drop(true)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = match cmd.spawn() {
        Ok(mut child) => {
            // The master's own child, not an orphan a worker left behind.
            let pid = child.id();
            if let Some(pid) = pid {
                crate::master::orphans::own(pid);
            }
            // `process_group(0)`: the group's id is the shell's pid.
            let mut group = Group(pid.map(|p| nix::unistd::Pid::from_raw(p as i32)));
            let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
            let finished = {
                let ran = async {
                    let (out, err, status) =
                        tokio::join!(read_all(stdout), read_all(stderr), child.wait());
                    status.map(|status| std::process::Output {
                        status,
                        stdout: out,
                        stderr: err,
                    })
                };
                tokio::select! {
                    output = ran => Some(output),
                    _ = cancel => None,
                }
            };
            let Some(output) = finished else {
                // The pipes may stay open in a process that left the group: only the shell,
                // which SIGKILL surely ends, is awaited.
                group.kill();
                let _ = child.wait().await;
                if let Some(pid) = pid {
                    crate::master::orphans::disown(pid);
                }
                let took = began.elapsed();
                tracing::info!(command = build, took = %humantime::format_duration(Duration::from_millis(took.as_millis() as u64)), "build cancelled: the sources changed again; building anew");
                return Outcome::Cancelled;
            };
            // The shell was reaped: its pid (the group's id) may be reused from now on.
            group.0 = None;
            if let Some(pid) = pid.filter(|_| output.is_ok()) {
                crate::master::orphans::disown(pid);
            }
            output
        }
        Err(e) => Err(e),
    };
    let elapsed = began.elapsed();
    let took = humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64));
    let error = match output {
        Ok(out) if out.status.success() => {
            tracing::info!(command = build, took = %took, "build succeeded");
            None
        }
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            // The build's own report, line by line, as the developer would see it in a terminal.
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                tracing::warn!(target: "build", "{line}");
            }
            tracing::warn!(command = build, took = %took, status = %out.status, "build failed; still serving the previous build");
            Some(
                first_error_line(&text).unwrap_or_else(|| format!("{} with no output", out.status)),
            )
        }
        Err(e) => {
            tracing::error!(command = build, error = %e, "cannot run the build command");
            Some(format!(
                "cannot run the build command in {}: {e}",
                dir.display()
            ))
        }
    };
    Outcome::Done(BuildReport {
        ok: error.is_none(),
        command: build.to_string(),
        started_at,
        duration_ms: elapsed.as_millis() as u64,
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_line_is_the_compilers() {
        let cargo = "   Compiling p v0.1.0 (/x)\nerror: expected one of `!` or `::`, found `does`\n --> src/lib.rs:1:6\n\nerror: could not compile `p`\n";
        assert_eq!(
            first_error_line(cargo).as_deref(),
            Some("error: expected one of `!` or `::`, found `does`")
        );
        assert_eq!(
            first_error_line("make: *** [all] Stop.\n\n").as_deref(),
            Some("make: *** [all] Stop.")
        );
        assert_eq!(first_error_line("\n  \n"), None);
        let long = format!("error: {}", "é".repeat(400));
        assert!(first_error_line(&long).unwrap().len() <= MAX_ERROR_LINE);
    }

    #[tokio::test]
    async fn a_cancelled_build_leaves_no_process_of_its_group_running() {
        let dir = std::env::temp_dir().join(format!("host-build-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A compiler stand-in in the background of the shell, as cargo runs rustc.
        let script = "sleep 30 & echo $! > pid; wait";
        let cancel = tokio::time::sleep(Duration::from_millis(300));
        let began = Instant::now();
        let outcome = run(script, &dir, cancel).await;
        assert!(matches!(outcome, Outcome::Cancelled), "{outcome:?}");
        assert!(began.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(dir.join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed with its group (a zombie waiting for this test process, its subreaper, or gone).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            if matches!(state, None | Some('Z') | Some('X')) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the build's sleep {pid} still runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let done = run("true", &dir, std::future::pending::<()>()).await;
        assert!(matches!(done, Outcome::Done(ref r) if r.ok), "{done:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_build_at_start_names_its_first_error() {
        let dir = std::env::temp_dir();
        let err = at_start("echo 'error: broken here' >&2; exit 3", &dir).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("error: broken here") && msg.contains("3"),
            "{msg}"
        );
        assert!(at_start("true", &dir).is_ok());
    }
}
