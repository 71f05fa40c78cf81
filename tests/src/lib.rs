//! Helpers for the integration tests: build the real `host` binary and real plugin `.so` files
//! with a nested `cargo build`, start hosts in private temp dirs, drive them with real HTTP
//! clients, and explain failures (every host's log is printed when a test fails).
//!
//! Nested builds use their own target dir (`target/it`): the outer `cargo test` holds the lock on
//! `target/`. Builds are serialized across test binaries with a file lock, so two tests never
//! race on one artifact.

pub mod groups;
pub mod prom;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;
use tokio::net::TcpStream;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The nested builds' own target dir.
pub fn nested_target() -> PathBuf {
    workspace().join("target").join("it")
}

/// Runs `cargo build` in the nested target dir under a cross-process lock, with `env` set.
/// Returns the artifact path (relative to the profile dir) copied to `dest`.
/// Runs `cargo <args>` from `cwd` with `CARGO_TARGET_DIR=target` and `env`, under a lock shared
/// by every test process (nested builds never race), and panics with cargo's output if it fails.
pub fn cargo(target: &Path, cwd: &Path, args: &[&str], env: &[(&str, &str)]) {
    std::fs::create_dir_all(nested_target()).unwrap();
    let lock_file = std::fs::File::create(nested_target().join(".build-lock")).unwrap();
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("build lock");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(cwd)
        .args(args)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("EXAMPLE_GREETING")
        .env_remove("EXAMPLE_FAIL_START")
        .env_remove("EXAMPLE_START_DELAY_MS")
        .env_remove("FIXTURE")
        .env_remove("HOST_BUILD_ID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} {env:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `package` in the nested target dir and copies `artifact` to `dest` (via a rename, so
/// `dest` is never seen half-written).
fn cargo_build(package: &str, env: &[(&str, &str)], artifact: &str, dest: &Path) {
    let target = nested_target();
    cargo(
        &target,
        &workspace(),
        &["build", "--quiet", "-p", package],
        env,
    );
    let tmp = dest.with_extension("tmp");
    std::fs::copy(target.join("debug").join(artifact), &tmp).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

/// The `host` binary, built once per test process.
pub fn host_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dest = nested_target().join("host-under-test");
        cargo_build("host", &[], "host", &dest);
        dest
    })
    .clone()
}

/// The `host` binary built with `HOST_BUILD_ID=id` (what `status` and `/_host/health` report as
/// `build`), built once per test process. It shares the nested target dir with [`host_bin`], so
/// cargo rebuilds the `host` crate (only) when the id changes between the two.
pub fn host_build(id: &str) -> PathBuf {
    static CACHE: OnceLock<Mutex<BTreeMap<String, PathBuf>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(id) {
        return p.clone();
    }
    let dest = nested_target().join(format!("host-build-{id}"));
    cargo_build("host", &[("HOST_BUILD_ID", id)], "host", &dest);
    cache.insert(id.to_string(), dest.clone());
    dest
}

/// Puts a copy of `src` at `dest` the way a package manager does: written beside it, then
/// renamed over it (a new inode; a master running the old file keeps it, and its
/// `/proc/<pid>/exe` reads "(deleted)").
pub fn install_binary(src: &Path, dest: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dest.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

/// A build of the example plugin with the given build-time environment, cached per process.
pub fn example_plugin(env: &[(&str, &str)]) -> PathBuf {
    static CACHE: OnceLock<Mutex<BTreeMap<String, PathBuf>>> = OnceLock::new();
    let key: String = env.iter().map(|(k, v)| format!("{k}={v};")).collect();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&key) {
        return p.clone();
    }
    let name: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dest = nested_target().join(format!("example-plugin-{name}.so"));
    cargo_build("example-plugin", env, "libexample_plugin.so", &dest);
    cache.insert(key, dest.clone());
    dest
}

/// The fixture plugin (`tests/fixtures/fixture-plugin`) built with `FIXTURE=kind` (`""` for
/// the working one).
pub fn fixture_plugin(kind: &str) -> PathBuf {
    static CACHE: OnceLock<Mutex<BTreeMap<String, PathBuf>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(kind) {
        return p.clone();
    }
    let dest = nested_target().join(format!("fixture-plugin-{kind}.so"));
    let env: &[(&str, &str)] = if kind.is_empty() {
        &[]
    } else {
        &[("FIXTURE", kind)]
    };
    cargo_build("fixture-plugin", env, "libfixture_plugin.so", &dest);
    cache.insert(kind.to_string(), dest.clone());
    dest
}

/// The axum example plugin (`example-axum`: an `axum::Router` exported with
/// `plugin_api::export_axum!`), built once per process.
pub fn axum_plugin() -> PathBuf {
    static BUILD: OnceLock<PathBuf> = OnceLock::new();
    BUILD
        .get_or_init(|| {
            let dest = nested_target().join("example-axum.so");
            cargo_build("example-axum", &[], "libexample_axum.so", &dest);
            dest
        })
        .clone()
}

/// The example plugin built with `EXAMPLE_GREETING=greeting`.
pub fn greeting_plugin(greeting: &str) -> PathBuf {
    example_plugin(&[("EXAMPLE_GREETING", greeting)])
}

/// Waits until `cond` holds, checking every 10 ms, or panics with `what` after `timeout`.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `pid` is a running process. A zombie counts as gone: a daemonized master is
/// reparented to PID 1, which in some sandboxes never reaps it.
/// The pids of a `status --json`'s workers, of those in `state` if given.
pub fn worker_pids_in(status: &Value, state: Option<&str>) -> Vec<u32> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| state.is_none_or(|s| w["state"] == s))
        .map(|w| w["pid"].as_u64().unwrap() as u32)
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
        host.master_pid = status["master_pid"].as_u64().unwrap() as u32;
        host.addr = status["listen"].as_str().unwrap().parse().unwrap();
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
        let admin: SocketAddr = self.status().await["admin_listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("the host was started with admin_listen");
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

    /// `status --json`, parsed.
    pub async fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]).await;
        assert!(
            out.status.success(),
            "host status failed: {}",
            self.explain(&out)
        );
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Polls `status --json` until `cond` holds (10 s at most) and returns that status.
    pub async fn wait_status(&self, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status().await;
            if cond(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {status}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Pids of the workers in `state`, once there is at least one (10 s at most).
    pub async fn wait_for_workers(&self, state: &str) -> Vec<u32> {
        let what = format!("a worker in state {state}");
        let status = self
            .wait_status(&what, |s| {
                s["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w["state"] == state)
            })
            .await;
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == state)
            .map(|w| w["pid"].as_u64().unwrap() as u32)
            .collect()
    }

    /// Starts `host -c <config> <args>` in the background.
    pub fn spawn_cli(&self, args: &[&str]) -> tokio::task::JoinHandle<Output> {
        let mut cmd = self.command(args);
        tokio::spawn(async move { cmd.output().await.expect("host runs") })
    }

    /// Pids of the workers in `status`, optionally only those in `state`.
    pub async fn worker_pids(&self, state: Option<&str>) -> Vec<u32> {
        worker_pids_in(&self.status().await, state)
    }

    /// Waits (10 s at most) until as many workers as in `before` are ready again, one of them
    /// new: a crashed or killed one was replaced. Returns that status.
    pub async fn wait_for_replacement(&self, what: &str, before: &[u32]) -> Value {
        self.wait_status(what, |s| {
            let ready = worker_pids_in(s, Some("ready"));
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

/// Writes `src`'s bytes over `dest` in place, as `cp` does (same inode when it exists), mode
/// 0644 whatever the umask (the host refuses plugin files others can write).
pub fn install(src: &Path, dest: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dest, std::fs::read(src).unwrap()).unwrap();
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o644)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// HTTP clients

/// One GET's outcome.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub close: bool,
    pub retry_after: Option<String>,
}

impl Reply {
    pub fn first_line(&self) -> &str {
        self.body.lines().next().unwrap_or("")
    }
}

/// A client connection: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }
}

async fn connect_with(addr: SocketAddr, h2: bool) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }
}

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    connect_with(addr, false).await
}

/// Why a request got no response.
#[derive(Debug)]
enum Failure {
    /// The server never processed it (an HTTP/2 stream refused after GOAWAY, or a connection
    /// closed before the request was written): clients retry these by spec.
    Unprocessed(String),
    Failed(String),
}

async fn send(
    sender: &mut Sender,
    addr: SocketAddr,
    path: &str,
    close: bool,
) -> Result<Reply, Failure> {
    let resp = match sender {
        Sender::H1(s) => {
            let mut req = http::Request::get(path).header(http::header::HOST, addr.to_string());
            if close {
                req = req.header(http::header::CONNECTION, "close");
            }
            s.send_request(req.body(Empty::new()).unwrap()).await
        }
        Sender::H2(s) => {
            let req =
                http::Request::get(format!("http://{addr}{path}")).version(http::Version::HTTP_2);
            s.send_request(req.body(Empty::new()).unwrap()).await
        }
    }
    .map_err(|e| {
        // An HTTP/2 stream failed with GOAWAY was above the server's last processed stream id
        // (RFC 9113, 6.8): never processed. `Canceled` means it was never sent.
        let refused = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .is_some_and(|h| h.is_go_away() && h.is_remote());
        if e.is_canceled() || refused {
            Failure::Unprocessed(format!("request: {e:?}"))
        } else {
            Failure::Failed(format!("request: {e:?}"))
        }
    })?;
    let status = resp.status().as_u16();
    let close = resp
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Failed(format!("body: {e}")))?
        .to_bytes();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
        retry_after,
    })
}

/// One GET on a new connection with `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let mut sender = connect(addr).await?;
    send(&mut sender, addr, path, true)
        .await
        .map_err(|e| format!("{e:?}"))
}

/// GETs of `paths` one after the other on one kept-alive connection (so one worker answers
/// them all), the last with `Connection: close`.
pub async fn get_on_one_connection(addr: SocketAddr, paths: &[&str]) -> Result<Vec<Reply>, String> {
    let mut sender = connect(addr).await?;
    let mut replies = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let reply = send(&mut sender, addr, path, i + 1 == paths.len())
            .await
            .map_err(|e| format!("GET {path}: {e:?}"))?;
        if reply.close && i + 1 < paths.len() {
            return Err(format!("GET {path}: the server closed the connection"));
        }
        replies.push(reply);
    }
    Ok(replies)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new connection per request, `Connection: close`.
    Close,
    /// One connection reused for back-to-back requests; reconnects when the server closes it.
    KeepAlive,
    /// One HTTP/2 (h2c, prior knowledge) connection reused; reconnects after GOAWAY.
    H2,
}

/// What a load run saw.
#[derive(Debug)]
pub struct LoadReport {
    /// The client kind that produced it: it decides which outcomes count as clean.
    pub mode: Mode,
    pub ok: u64,
    pub non_200: Vec<(u16, String)>,
    pub errors: Vec<String>,
    /// Count of responses per first body line (which build served them).
    pub first_lines: BTreeMap<String, u64>,
    /// Responses that asked the client to close (keep-alive mode).
    pub closes: u64,
    /// Connections opened.
    pub connects: u64,
    /// Requests the server never processed (HTTP/2 streams refused after GOAWAY); the client
    /// retried them, as HTTP/2 clients do. Not failures, but counted.
    pub unprocessed: Vec<String>,
}

impl LoadReport {
    /// One line for the test's output: every count of the report.
    pub fn summary(&self) -> String {
        format!(
            "{} ok, {} failed, {} non-200, {} unprocessed and retried, {} connections, {} told to close",
            self.ok,
            self.errors.len(),
            self.non_200.len(),
            self.unprocessed.len(),
            self.connects,
            self.closes
        )
    }

    fn new(mode: Mode) -> LoadReport {
        LoadReport {
            mode,
            ok: 0,
            non_200: Vec::new(),
            errors: Vec::new(),
            first_lines: BTreeMap::new(),
            closes: 0,
            connects: 0,
            unprocessed: Vec::new(),
        }
    }

    /// Panics unless every request got a `200`: none failed, and none unprocessed over
    /// HTTP/1. Over HTTP/2 a request the bare client handed its connection after the server's
    /// GOAWAY is refused by the client's own library before it is sent (RFC 9113, 6.8; the
    /// README's "What clients see during a reload"): counted apart, not a failure.
    pub fn assert_clean(&self) {
        assert!(
            self.errors.is_empty(),
            "{} failed requests, first: {:?}",
            self.errors.len(),
            &self.errors[..self.errors.len().min(3)]
        );
        assert!(
            self.non_200.is_empty(),
            "{} non-200 responses, first: {:?}",
            self.non_200.len(),
            &self.non_200[..self.non_200.len().min(3)]
        );
        assert!(
            self.mode == Mode::H2 || self.unprocessed.is_empty(),
            "unprocessed {:?} requests: {:?}",
            self.mode,
            self.unprocessed
        );
    }

    pub fn total(&self) -> u64 {
        self.ok + self.non_200.len() as u64 + self.errors.len() as u64
    }
}

/// Clients sending back-to-back `GET path` until stopped, counting every outcome.
pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize, mode: Mode, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::new(mode)));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, report) = (stop.clone(), report.clone());
                tokio::spawn(async move {
                    let mut conn: Option<Sender> = None;
                    while !stop.load(Ordering::Relaxed) {
                        if conn.as_ref().is_some_and(|c| c.is_closed()) {
                            conn = None;
                        }
                        let sender = match conn.as_mut() {
                            Some(s) => s,
                            None => match connect_with(addr, mode == Mode::H2).await {
                                Ok(s) => {
                                    report.lock().unwrap().connects += 1;
                                    conn.insert(s)
                                }
                                Err(e) => {
                                    report.lock().unwrap().errors.push(e);
                                    continue;
                                }
                            },
                        };
                        // A keep-alive connection the server closed while idle is not a failed
                        // request (nothing was sent yet): reconnect, as every client does.
                        if sender.ready().await.is_err() {
                            conn = None;
                            continue;
                        }
                        let result = send(sender, addr, path, mode == Mode::Close).await;
                        let mut r = report.lock().unwrap();
                        match result {
                            Ok(reply) => {
                                if reply.close || mode == Mode::Close {
                                    conn = None;
                                }
                                if reply.close && mode == Mode::KeepAlive {
                                    r.closes += 1;
                                }
                                if reply.status == 200 {
                                    r.ok += 1;
                                    *r.first_lines
                                        .entry(reply.first_line().to_string())
                                        .or_default() += 1;
                                } else {
                                    r.non_200.push((reply.status, reply.body));
                                }
                            }
                            Err(Failure::Unprocessed(e)) => {
                                r.unprocessed.push(e);
                                conn = None;
                            }
                            Err(Failure::Failed(e)) => {
                                r.errors.push(e);
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            report,
            tasks,
        }
    }

    /// Requests answered so far (any outcome).
    pub fn total(&self) -> u64 {
        self.report.lock().unwrap().total()
    }

    /// Waits until at least `n` more requests than now have completed.
    pub async fn advance(&self, n: u64) {
        let target = self.total() + n;
        wait_until(
            Duration::from_secs(30),
            &format!("{n} more requests under load"),
            || self.total() >= target,
        )
        .await;
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load client panicked");
        }
        Arc::try_unwrap(self.report)
            .expect("clients done")
            .into_inner()
            .unwrap()
    }
}

impl Host {
    /// `status` asked over the control socket directly, without starting a CLI process: how
    /// long the master took to answer, and the report (as `status --json` prints it).
    pub async fn raw_status(&self) -> (Duration, Value) {
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
        let answer: Value = serde_json::from_slice(&body).expect("the master answers JSON");
        (took, answer["Status"].clone())
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

// ---------------------------------------------------------------------------------------------
// WebSocket (tokio-tungstenite, a real client)

/// A client WebSocket.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens `ws://addr/ws` and checks the `101`.
pub async fn ws_connect(addr: SocketAddr) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `text` and returns the text message that answers it (10 s at most).
pub async fn ws_echo(ws: &mut Ws, text: &str) -> String {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(text.into())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(reply)))) => reply.to_string(),
        other => panic!("expected an echo, got {other:?}"),
    }
}

/// Reads until the server's Close frame (10 s at most per message) and returns its code.
pub async fn ws_close_code(
    ws: &mut Ws,
) -> Option<tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode> {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

/// The WebSocket reload round trip, for a one-worker host whose `/ws` echoes `gen=N text`:
/// echoes from generation 1; a reload closes the socket with 1012 (Service Restart); a new
/// socket reaches generation 2; and the old worker (`old_pid`), held by nothing else, exits well
/// before `graceful_timeout` (10 s).
pub async fn ws_across_reload(host: &Host, old_pid: u32) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let mut ws = ws_connect(host.addr).await;
    assert_eq!(ws_echo(&mut ws, "hi").await, "gen=1 hi");
    assert_eq!(ws_echo(&mut ws, "again").await, "gen=1 again");
    host.reload_ok().await;
    assert_eq!(ws_close_code(&mut ws).await, Some(CloseCode::Restart));
    drop(ws);
    let mut ws = ws_connect(host.addr).await;
    assert_eq!(ws_echo(&mut ws, "back").await, "gen=2 back");
    wait_until(Duration::from_secs(8), "the old worker to exit", || {
        !pid_alive(old_pid)
    })
    .await;
    ws.close(None).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Server-sent events

/// A server-sent event stream, read event by event.
pub struct Events {
    body: hyper::body::Incoming,
    pending: String,
}

impl Events {
    pub async fn open(addr: SocketAddr) -> Events {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("/events")
            .header(http::header::HOST, "t")
            .header(http::header::ACCEPT, "text/event-stream")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "text/event-stream"
        );
        assert_eq!(resp.headers()[http::header::TRANSFER_ENCODING], "chunked");
        Events {
            body: resp.into_body(),
            pending: String::new(),
        }
    }

    /// The next event (up to its blank line), or `None` at a clean end of the stream. A
    /// transport error, or 10 s without a frame, fails the test.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.pending.find("\n\n") {
                let event = self.pending[..i].to_string();
                self.pending.drain(..i + 2);
                return Some(event);
            }
            match tokio::time::timeout(Duration::from_secs(10), self.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => panic!("event stream failed: {e}"),
                Err(_) => panic!("no event within 10 s"),
            }
        }
    }
}

/// The sum of the samples of `name` (a counter's `_total` included) whose labels contain every
/// `key="value"` of `with`, in a `/metrics` text.
pub fn metric(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
