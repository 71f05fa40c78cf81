//! Nothing stalls the master: silent control connections under a low fd limit, configuration
//! values that would overflow, a master that never answers, and workers out of file descriptors.

use std::path::Path;
use std::time::{Duration, Instant};

use host_status::WorkerStateName;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tests::{
    Host, HostOptions, get, greeting_plugin, host_bin, open_fds, pid_alive, set_fd_limit,
    set_soft_fd_limit, wait_until,
};
use tokio::net::{TcpStream, UnixStream};

/// The master's per-connection read deadline (`control::READ_DEADLINE`).
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// Connects to a Unix socket without ever blocking on a full backlog: retries until `deadline`.
async fn connect_unix(path: &Path, deadline: Instant) -> Option<UnixStream> {
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Some(s),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => return None,
        }
    }
}

/// Keeps `n` connected-but-silent connections open on `path` until dropped: whenever the master
/// closes one (read deadline, eviction), another replaces it at once.
struct SilentClients {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl SilentClients {
    async fn start(path: &Path, n: usize) -> SilentClients {
        let mut conns = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(20);
        while conns.len() < n {
            let c = connect_unix(path, deadline)
                .await
                .expect("a silent connection to the control socket");
            conns.push(c);
        }
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let path = path.to_path_buf();
        let task = tokio::spawn(async move {
            let mut reconnects = 0u64;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                for c in &mut conns {
                    let mut buf = [0u8; 64];
                    let closed = match c.try_read(&mut buf) {
                        Ok(_) => true,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    };
                    if closed
                        && let Some(new) =
                            connect_unix(&path, Instant::now() + Duration::from_millis(100)).await
                    {
                        *c = new;
                        reconnects += 1;
                    }
                }
            }
            reconnects
        });
        SilentClients { stop, task }
    }

    async fn finish(self) -> u64 {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_control_connections_under_fd_limit_256_starve_neither_status_nor_supervision() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    set_fd_limit(host.master_pid, 256);
    let socket = host.dir.path().join("state/host.sock");

    let silent = SilentClients::start(&socket, 300).await;
    // The scenario, not a stand-in for a condition: hold them past the master's read deadline,
    // so what follows runs while the master keeps closing silent connections and they come back.
    tokio::time::sleep(READ_DEADLINE + Duration::from_secs(1)).await;
    eprintln!(
        "300 silent connections open; master holds {} fds (limit 256)",
        open_fds(host.master_pid)
    );

    // `status` gets through the silent crowd, within the read deadline + 1 s.
    for _ in 0..3 {
        let t = Instant::now();
        let out = host.cli(&["status", "--json", "--timeout", "10s"]).await;
        let took = t.elapsed();
        assert!(out.status.success(), "status: {}", host.explain(&out));
        eprintln!("status answered in {} ms", took.as_millis());
        assert!(
            took < READ_DEADLINE + Duration::from_secs(1),
            "status took {took:?} with 300 silent control connections"
        );
    }

    // A killed worker is replaced while the silent connections keep coming.
    let status = host.status().await;
    let (slot, pid) = (status.workers[0].slot, status.workers[0].pid);
    let t = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let replaced = host
        .wait_status("a new ready worker in the killed worker's slot", |s| {
            s.workers
                .iter()
                .any(|w| w.slot == slot && w.state == WorkerStateName::Ready && w.pid != pid)
        })
        .await;
    eprintln!(
        "worker {pid} replaced in {} ms; master holds {} fds",
        t.elapsed().as_millis(),
        open_fds(host.master_pid)
    );
    assert_eq!(replaced.workers.len(), 2);
    assert!(host.body("/").await.starts_with("v1 from"));

    let reconnects = silent.finish().await;
    eprintln!("silent connections closed by the master and reopened: {reconnects}");
    assert!(
        reconnects > 0,
        "the master never closed a silent connection"
    );
    let log = host.log();
    let accept_failures = log.matches("control socket accept failed").count();
    assert!(
        accept_failures <= 5,
        "{accept_failures} accept-failure lines:\n{log}"
    );
    assert!(!log.contains("backing off"), "{log}");
}

/// Writes `text` to `dir/host.toml` and returns its path.
fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("host.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn run_host(config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(host_bin());
    cmd.arg("-c").arg(config).args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("host returns within 30 s")
        .expect("host runs")
}

/// The output's stderr is exactly one line naming `config`, `line` and `key`.
fn assert_refused(out: &std::process::Output, config: &Path, line: usize, key: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(&format!("{}:{line}: {key}: ", config.display())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_that_would_overflow_are_refused_by_start_check_and_reload() {
    let huge = "18446744073709551615s";
    let dir = tempfile::tempdir().unwrap();
    for key in ["graceful_timeout", "start_timeout"] {
        let config = write_config(
            dir.path(),
            &format!("listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{key} = \"{huge}\"\n"),
        );
        for args in [&["start"][..], &["start", "-d"], &["check"]] {
            let out = run_host(&config, args).await;
            assert_refused(&out, &config, 3, key);
        }
        let err = String::from_utf8_lossy(&run_host(&config, &["check"]).await.stderr).to_string();
        assert!(err.contains(huge) && err.contains("out of range"), "{err}");
    }
    assert!(
        !dir.path().join("state/host.pid").exists(),
        "nothing was started"
    );

    // Against a running host: `reload` refuses the file, and the master keeps serving.
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let good = std::fs::read_to_string(&host.config).unwrap();
    let line = good
        .lines()
        .position(|l| l.starts_with("graceful_timeout"))
        .unwrap()
        + 1;
    let bad = good.replace(
        "graceful_timeout = \"10s\"",
        &format!("graceful_timeout = \"{huge}\""),
    );
    std::fs::write(&host.config, bad).unwrap();
    let out = host.cli(&["reload"]).await;
    assert_refused(&out, &host.config, line, "graceful_timeout");
    assert!(pid_alive(host.master_pid));
    assert!(host.body("/").await.starts_with("v1 from"));
    std::fs::write(&host.config, good).unwrap();
    host.reload_ok().await;
    assert_eq!(host.status().await.master_pid, host.master_pid);

    let ok = run_host(&host.config, &["check"]).await;
    assert!(ok.status.success(), "{}", host.explain(&ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_gives_up_at_its_timeout_and_says_what_it_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let config = write_config(dir.path(), "state_dir = \"state\"\n");
    let socket = state.join("host.sock");

    // A "master" that accepts and never answers.
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    for (args, waited_for) in [
        (
            &["status", "--timeout", "1s"][..],
            "the master's answer to `status`",
        ),
        (&["reload", "--timeout", "1s"], "the reload to finish"),
        (&["stop", "--timeout", "1s"], "every worker to stop"),
    ] {
        let t = Instant::now();
        let out = run_host(&config, args).await;
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{args:?} gave up after {} ms: {err}", took.as_millis());
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
        assert!(
            err.contains("timed out after 1s waiting for") && err.contains(waited_for),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    mute.abort();
    let _ = mute.await;

    // A "master" that never accepts, with its backlog full: the connect itself is bounded.
    std::fs::remove_file(&socket).unwrap();
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen};
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(&socket).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(200), UnixStream::connect(&socket)).await
    {
        queued.push(s);
        assert!(queued.len() < 100, "the backlog never filled");
    }
    let t = Instant::now();
    let out = run_host(&config, &["status", "--timeout", "1s"]).await;
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "status against a full backlog gave up after {} ms: {err}",
        took.as_millis()
    );
    assert!(
        !out.status.success() && took < Duration::from_secs(5),
        "{err}"
    );
    assert!(
        err.contains("timed out after 1s waiting for the master to accept the connection"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_out_of_fds_log_one_accept_line_per_second_with_a_count() {
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            workers: 2,
            // The held connections must outlast the measurement.
            extra: "header_read_timeout = \"60s\"".into(),
            ..HostOptions::default()
        },
    )
    .await;
    let workers = host.worker_pids(Some(WorkerStateName::Ready)).await;
    for &pid in &workers {
        set_fd_limit(pid, 64);
    }
    // More connections than both workers together can hold; the rest wait in the backlog.
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(TcpStream::connect(host.addr).await.unwrap());
    }
    wait_until(
        Duration::from_secs(10),
        "a worker out of file descriptors",
        || host.log().contains("accept failed"),
    )
    .await;

    // The measurement: accept-failure lines written during a 3 s window.
    let before = host.log().len();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = host.log();
    let window = window.elapsed();
    let lines: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains("accept failed"))
        .collect();
    let allowed = window.as_secs() as usize + 1;
    for pid in &workers {
        let own = lines
            .iter()
            .filter(|l| l.starts_with(&format!("worker[{pid} ")))
            .count();
        eprintln!("worker {pid}: {own} accept-failure lines in {window:?}");
        assert!(
            own <= allowed,
            "worker {pid}: {own} lines in {window:?}:\n{}",
            lines.join("\n")
        );
    }
    let counts: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("accept failed"))
        .filter_map(|l| {
            l.split("suppressed=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    eprintln!("suppressed counts: {counts:?}");
    assert!(
        counts.iter().any(|&n| n > 0),
        "no line carries a count of suppressed failures:\n{}",
        lines.join("\n")
    );

    // Once the connections close, the workers serve again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match get(host.addr, "/").await {
            Ok(reply) if reply.body.starts_with("v1 from") => break,
            other => assert!(
                Instant::now() < deadline,
                "not serving after the connections closed: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_out_of_fds_logs_accept_failures_once_a_second_and_recovers() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    let socket = host.dir.path().join("state/host.sock");
    // Room for two more fds: the control socket runs out almost at once.
    let open = open_fds(host.master_pid) as u64;
    set_soft_fd_limit(host.master_pid, open + 2);
    let out_of_fds = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(connect_unix(&socket, deadline).await.expect("connect"));
    }
    wait_until(
        Duration::from_secs(10),
        "the master to run out of fds on the control socket",
        || host.log().contains("control socket accept failed"),
    )
    .await;

    // `status` still gets an answer while fds are out: the queue moves (read deadline, shedding)
    // and the CLI tries again when the master closed its connection unread.
    let t = Instant::now();
    let out = host.cli(&["status", "--json", "--timeout", "20s"]).await;
    eprintln!(
        "status out of fds answered in {} ms",
        t.elapsed().as_millis()
    );
    assert!(out.status.success(), "{}", host.explain(&out));

    let log = host.log();
    let failures = log.matches("control socket accept failed").count();
    // One line per second at most, plus the first.
    let window = out_of_fds.elapsed().as_secs() as usize + 2;
    eprintln!("{failures} control accept-failure lines");
    assert!(failures <= window, "{failures} lines:\n{log}");
    assert!(log.contains("closed a queued control connection"), "{log}");

    // With fds back, supervision goes on: a killed worker is replaced.
    drop(silent);
    set_soft_fd_limit(host.master_pid, 1024);
    let pid = host.worker_pids(Some(WorkerStateName::Ready)).await[0];
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    host.wait_status("a replacement worker", |s| {
        s.workers.len() == 2
            && s.workers
                .iter()
                .all(|w| w.state == WorkerStateName::Ready && w.pid != pid)
    })
    .await;
}

/// `RLIMIT_NOFILE` (soft, hard) of `pid`, from `/proc/<pid>/limits`.
fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-files line in /proc/{pid}/limits:\n{limits}"));
    let mut numbers = line["Max open files".len()..]
        .split_whitespace()
        .map(|n| n.parse().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_raises_its_soft_fd_limit_to_the_hard_one_and_workers_inherit_it() {
    // A low hard limit (at most 4096, the most this process may set) and a soft one below it.
    let (_, our_hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let hard = our_hard.min(4096);
    let soft = hard / 8;
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            fd_limits: Some((soft, hard)),
            ..HostOptions::default()
        },
    )
    .await;
    assert_eq!(nofile_limits(host.master_pid), (hard, hard));
    let workers = host.worker_pids(Some(WorkerStateName::Ready)).await;
    assert_eq!(workers.len(), 2);
    for pid in workers {
        assert_eq!(nofile_limits(pid), (hard, hard), "worker {pid}");
    }
    let log = host.log();
    assert!(
        log.contains(&format!(
            "raised the open-files limit (RLIMIT_NOFILE) from {soft} to {hard}"
        )),
        "{log}"
    );
    // Below 65536: the operator is told the host will not take many more connections, and how
    // to raise the hard limit.
    let warning = log
        .lines()
        .find(|l| l.contains(&format!("open-files limit is only {hard}")))
        .unwrap_or_else(|| panic!("no low-limit warning:\n{log}"));
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(warning.contains("LimitNOFILE="), "{warning}");
    assert!(warning.contains("ulimit -Hn"), "{warning}");
}
