//! Hosts under test: [`Host`], the real `host` binary started with `start -d` in a private temp
//! dir and driven through its CLI (status, reload, stop) and its control socket; [`Activated`],
//! one started in the foreground the way systemd's socket activation starts it. Every host is
//! killed when dropped, and its log is printed when the test is failing. Status is read into the
//! `host-status` crate's types, the ones the host prints it from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use host_status::{StatusReport, WorkerStateName};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

use crate::build::{fixture_plugin, host_bin, install, install_binary};
use crate::clients::get;
use crate::process::pid_alive;
use crate::wait_until;

/// The pids of a `status --json`'s workers, of those in `state` if given.
pub fn worker_pids_in(status: &StatusReport, state: Option<WorkerStateName>) -> Vec<u32> {
    status
        .workers
        .iter()
        .filter(|w| state.is_none_or(|s| w.state == s))
        .map(|w| w.pid)
        .collect()
}

/// Waits (20 s at most) until every one of `old` (workers a reload replaced) has exited.
pub async fn wait_old_workers_gone(old: &[u32]) {
    wait_until(
        Duration::from_secs(20),
        "old workers to exit after their drain",
        || old.iter().all(|&pid| !pid_alive(pid)),
    )
    .await;
}

/// A host started in its own temp dir with `start -d`. Killed (master and workers) on drop;
/// its log is printed if the test is failing.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The configured plugin path (tests overwrite it with new builds).
    pub plugin: PathBuf,
    pub addr: SocketAddr,
    pub master_pid: u32,
    env: Vec<(String, String)>,
    fd_limits: Option<(u64, u64)>,
    /// The binary `start` ran from, when the test gave one (`HostOptions::bin`): the master's
    /// binary path, which `host upgrade` starts again.
    pub bin: Option<PathBuf>,
    cwd: Option<PathBuf>,
}

/// Options for [`Host::start`].
pub struct HostOptions {
    pub workers: usize,
    /// More config lines.
    pub extra: String,
    /// Environment for the host (its workers inherit it).
    pub env: Vec<(String, String)>,
    /// `RLIMIT_NOFILE` (soft, hard) the CLI, and so the master it starts, begins with.
    pub fd_limits: Option<(u64, u64)>,
    /// A `host` binary to copy into the host's dir (`bin/host`) and run `start` from, so the
    /// master runs from a file the test may replace; other commands run [`host_bin`].
    pub bin: Option<PathBuf>,
    /// More arguments for `start -d` (dev mode's `--build`, `--watch-path`).
    pub start_args: Vec<String>,
    /// The current directory of every CLI command (default: the test's).
    pub cwd: Option<PathBuf>,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            workers: 2,
            extra: String::new(),
            env: Vec::new(),
            fd_limits: None,
            bin: None,
            start_args: Vec::new(),
            cwd: None,
        }
    }
}

impl Host {
    /// Starts a host serving `plugin` (copied into the host's dir) and waits until it serves.
    pub async fn start(plugin: &Path, opts: HostOptions) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("host-it-")
            .tempdir()
            .unwrap();
        let plugin_path = dir.path().join("plugin.so");
        install(plugin, &plugin_path);
        let config = dir.path().join("host.toml");
        // Defaults, unless `extra` sets the key itself.
        let set_in_extra: Vec<&str> = opts
            .extra
            .lines()
            .filter_map(|l| l.split('=').next())
            .map(str::trim)
            .collect();
        // The defaults come first: `extra` may end in a table (`[plugin_config]`).
        let mut text = format!("workers = {}\n", opts.workers);
        for default in [
            "listen = \"127.0.0.1:0\"",
            "plugin = \"plugin.so\"",
            "state_dir = \"state\"",
            "graceful_timeout = \"10s\"",
            "start_timeout = \"10s\"",
            // Reloads roll out at once unless a test judges a canary (`tests/tests/canary.rs`).
            "canary_workers = 0",
        ] {
            let key = default.split(' ').next().unwrap();
            if !set_in_extra.contains(&key) {
                text.push_str(default);
                text.push('\n');
            }
        }
        text.push_str(&opts.extra);
        text.push('\n');
        std::fs::write(&config, text).unwrap();
        let bin = opts.bin.map(|src| {
            std::fs::create_dir_all(dir.path().join("bin")).unwrap();
            let dest = dir.path().join("bin/host");
            install_binary(&src, &dest);
            dest
        });
        let mut host = Host {
            dir,
            config,
            plugin: plugin_path,
            addr: "127.0.0.1:1".parse().unwrap(),
            master_pid: 0,
            env: opts.env,
            fd_limits: opts.fd_limits,
            bin,
            cwd: opts.cwd,
        };
        let mut args = vec!["start", "-d"];
        args.extend(opts.start_args.iter().map(String::as_str));
        let out = host.cli(&args).await;
        assert!(
            out.status.success(),
            "host start -d failed: {}",
            host.explain(&out)
        );
        let status = host.status().await;
        host.master_pid = status.master_pid;
        host.addr = status.listen.parse().unwrap();
        host
    }

    /// `host -c <config> <args>` with this host's environment, killed if dropped.
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let bin = match &self.bin {
            Some(bin) if args.first() == Some(&"start") => bin.clone(),
            _ => host_bin(),
        };
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("-c")
            .arg(&self.config)
            .args(args)
            .envs(self.env.iter().cloned())
            .kill_on_drop(true);
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        if let Some((soft, hard)) = self.fd_limits {
            // SAFETY: the closure runs in the forked child before exec and only calls
            // setrlimit, which is async-signal-safe; it touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        soft,
                        hard,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        cmd
    }

    /// Runs `host -c <config> <args>` and returns its output (bounded by a 60 s deadline).
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
            Ok(out) => out.expect("host runs"),
            Err(_) => panic!("host {args:?} did not return within 60 s\n{}", self.log()),
        }
    }

    /// `host_limit_hits_total{limit="<limit>"}` from `/metrics`, summed over generations. The
    /// host must have been started with `admin_listen` set (`status` reports where).
    pub async fn limit_hits(&self, limit: &str) -> u64 {
        let admin = self.admin_addr().await;
        let reply = get(admin, "/metrics").await.expect("GET /metrics");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let label = format!("limit=\"{limit}\"");
        reply
            .body
            .lines()
            .filter(|l| l.starts_with("host_limit_hits_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Where the master serves `/metrics`. The host must have been started with `admin_listen`
    /// set.
    pub async fn admin_addr(&self) -> SocketAddr {
        self.status()
            .await
            .admin_listen
            .and_then(|a| a.parse().ok())
            .expect("the host was started with admin_listen")
    }

    /// `status --json`, read into the types the host prints it from.
    pub async fn status(&self) -> StatusReport {
        let json = self.status_output().await;
        serde_json::from_slice(&json).unwrap_or_else(|e| {
            panic!(
                "status --json is not a StatusReport: {e}\n{}",
                String::from_utf8_lossy(&json)
            )
        })
    }

    /// `status --json` as printed, untyped: for the tests of the output itself.
    pub async fn status_json(&self) -> Value {
        serde_json::from_slice(&self.status_output().await).expect("status --json is JSON")
    }

    /// What `status --json` printed, once it succeeded.
    async fn status_output(&self) -> Vec<u8> {
        let out = self.cli(&["status", "--json"]).await;
        assert!(
            out.status.success(),
            "host status failed: {}",
            self.explain(&out)
        );
        out.stdout
    }

    /// Polls `status --json` until `cond` holds (10 s at most) and returns that status.
    pub async fn wait_status(
        &self,
        what: &str,
        cond: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status().await;
            if cond(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Pids of the workers in `state`, once there is at least one (10 s at most).
    pub async fn wait_for_workers(&self, state: WorkerStateName) -> Vec<u32> {
        let what = format!("a worker in state {state:?}");
        let status = self
            .wait_status(&what, |s| s.workers.iter().any(|w| w.state == state))
            .await;
        worker_pids_in(&status, Some(state))
    }

    /// Starts `host -c <config> <args>` in the background.
    pub fn spawn_cli(&self, args: &[&str]) -> tokio::task::JoinHandle<Output> {
        let mut cmd = self.command(args);
        tokio::spawn(async move { cmd.output().await.expect("host runs") })
    }

    /// Pids of the workers in `status`, optionally only those in `state`.
    pub async fn worker_pids(&self, state: Option<WorkerStateName>) -> Vec<u32> {
        worker_pids_in(&self.status().await, state)
    }

    /// Waits (10 s at most) until as many workers as in `before` are ready again, one of them
    /// new: a crashed or killed one was replaced. Returns that status.
    pub async fn wait_for_replacement(&self, what: &str, before: &[u32]) -> StatusReport {
        self.wait_status(what, |s| {
            let ready = worker_pids_in(s, Some(WorkerStateName::Ready));
            ready.len() == before.len() && ready.iter().any(|p| !before.contains(p))
        })
        .await
    }

    /// `host reload`, asserting success.
    pub async fn reload_ok(&self) -> Output {
        let out = self.cli(&["reload"]).await;
        assert!(
            out.status.success(),
            "host reload failed: {}",
            self.explain(&out)
        );
        out
    }

    /// `host stop` while `reload` (a background `host reload`) waits: the stop succeeds, the
    /// reload is answered with an error that says the host is stopping, and none of `pids` nor
    /// the master outlives the stop.
    pub async fn stop_during(&self, reload: tokio::task::JoinHandle<Output>, pids: &[u32]) {
        let out = self.cli(&["stop"]).await;
        assert!(out.status.success(), "{}", self.explain(&out));
        let reload = reload.await.unwrap();
        assert!(!reload.status.success(), "{}", self.explain(&reload));
        assert!(
            String::from_utf8_lossy(&reload.stderr).contains("stopping"),
            "{}",
            self.explain(&reload)
        );
        for pid in pids.iter().chain([&self.master_pid]) {
            assert!(!pid_alive(*pid), "pid {pid} outlived stop");
        }
    }

    /// Replaces the configured plugin file with `build`, in place (like `cp`).
    pub fn install_plugin(&self, build: &Path) {
        install(build, &self.plugin);
    }

    /// The body of `GET path` on a new connection; panics (with the host's log) if it fails.
    pub async fn body(&self, path: &str) -> String {
        match get(self.addr, path).await {
            Ok(reply) => reply.body,
            Err(e) => panic!("GET {path} failed: {e}\n{}", self.log()),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/host.log")).unwrap_or_default()
    }

    pub fn explain(&self, out: &Output) -> String {
        format!(
            "status {}\nstdout: {}\nstderr: {}\n--- host log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- host log ({}) ---\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
        if self.master_pid != 0 && pid_alive(self.master_pid) {
            // Workers die with the master (PR_SET_PDEATHSIG).
            let _ = kill(
                Pid::from_raw(self.master_pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Host {
    /// `status` asked over the control socket directly, without starting a CLI process: how
    /// long the master took to answer, and the report (as `status --json` prints it).
    pub async fn raw_status(&self) -> (Duration, StatusReport) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = self.dir.path().join("state/host.sock");
        let began = Instant::now();
        let mut stream = tokio::net::UnixStream::connect(&socket)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}\n{}", socket.display(), self.log()));
        let request = br#""Status""#;
        stream
            .write_all(&(request.len() as u32).to_le_bytes())
            .await
            .unwrap();
        stream.write_all(request).await.unwrap();
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        stream.read_exact(&mut body).await.unwrap();
        let took = began.elapsed();
        let mut answer: Value = serde_json::from_slice(&body).expect("the master answers JSON");
        let report = serde_json::from_value(answer["Status"].take())
            .unwrap_or_else(|e| panic!("the master answers a status report: {e}: {answer}"));
        (took, report)
    }
}

/// A host (2 workers) serving the fixture plugin with the environment variable `var` naming a
/// marker file that does not exist yet: the fixture changes behaviour (crashes at start, exits
/// after ready, ...) while the file exists. Returns the host and the marker's path.
pub async fn fixture_host_with_marker(var: &str) -> (Host, tempfile::TempPath) {
    let marker = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let env = vec![(var.to_string(), marker.display().to_string())];
    std::fs::remove_file(&marker).unwrap();
    let host = Host::start(
        &fixture_plugin(""),
        HostOptions {
            env,
            ..Default::default()
        },
    )
    .await;
    (host, marker)
}

/// A host started in the foreground the way systemd's socket activation starts it: `listener`
/// on fd 3, `LISTEN_FDS=1`, and `LISTEN_PID` the host's own pid (`exec` keeps the shell's). Its
/// config is `dir/host.toml`, its output goes to `dir/foreground.log`; killed when dropped.
pub struct Activated {
    child: tokio::process::Child,
    config: PathBuf,
    log: PathBuf,
}

/// Starts `host -c dir/host.toml start` in the foreground as systemd starts it: through a shell
/// that sets `LISTEN_PID` to the host's own pid (`exec` keeps the shell's) and `env` (more
/// `VAR=value` words), its output to `dir/foreground.log`, with `setup` run in the child before
/// exec (to put the sockets in place). Killed when dropped.
///
/// # Safety
///
/// `setup` runs between fork and exec: it may only make async-signal-safe calls.
pub(crate) unsafe fn spawn_foreground(
    dir: &Path,
    env: &str,
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Activated {
    use std::os::unix::process::CommandExt;
    let config = dir.join("host.toml");
    let log = dir.join("foreground.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("LISTEN_PID=$$ {env} exec \"$0\" \"$@\""))
        .arg(host_bin())
        .arg("-c")
        .arg(&config)
        .arg("start")
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: the caller promises `setup` is async-signal-safe.
    unsafe {
        cmd.pre_exec(setup);
    }
    let child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Activated { child, config, log }
}

impl Activated {
    /// Starts it and waits until its generation 1 serves.
    pub async fn start(dir: &Path, listener: std::os::fd::RawFd) -> Activated {
        // SAFETY: the setup only calls fcntl and dup2, which are async-signal-safe, and touches
        // no memory of the parent.
        let host = unsafe {
            spawn_foreground(dir, "LISTEN_FDS=1", move || {
                if listener == 3 {
                    let flags = nix::libc::fcntl(3, nix::libc::F_GETFD);
                    nix::libc::fcntl(3, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC);
                } else if nix::libc::dup2(listener, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        wait_until(Duration::from_secs(20), "the host to serve", || {
            host.log().contains("generation 1 is serving")
        })
        .await;
        host
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `host -c <config> <args>`, run to its end.
    pub fn cli(&self, args: &[&str]) -> Output {
        std::process::Command::new(host_bin())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// `status --json`, read into the types the host prints it from.
    pub fn status(&self) -> StatusReport {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "host status failed\n{}", self.log());
        serde_json::from_slice(&out.stdout).expect("status --json is a StatusReport")
    }

    /// `host stop`, then waits for the foreground master to exit cleanly.
    pub async fn stop(mut self) {
        let out = self.cli(&["stop"]);
        assert!(out.status.success(), "{}", self.log());
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the foreground master exits after stop")
            .unwrap();
        assert!(exit.success(), "{exit:?}\n{}", self.log());
    }
}
