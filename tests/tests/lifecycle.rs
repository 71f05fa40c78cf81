//! The host's own lifecycle in production: `host upgrade` between two builds of `host` under
//! load, an upgrade to a broken binary (or a build that cannot serve) refused while the old
//! master serves on, the systemd notify protocol recorded from a real datagram socket, and
//! socket activation.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use host_status::WorkerStateName;
use serde_json::Value;
use tests::{
    Host, HostOptions, Load, LoadReport, Mode, example_plugin, host_bin, host_build,
    install_binary, pid_alive, wait_until,
};

/// The new master's pid from `upgrade`'s first line (`upgraded: master pid N serving ...`).
fn new_master_pid(stdout: &[u8]) -> u32 {
    let text = String::from_utf8_lossy(stdout);
    text.split("master pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new master pid in: {text}"))
}

async fn health(host: &Host) -> Value {
    serde_json::from_str(&host.body("/_host/health").await).expect("health is JSON")
}

fn loads(host: &Host) -> Vec<(Mode, Load)> {
    [Mode::Close, Mode::KeepAlive, Mode::H2]
        .into_iter()
        .map(|mode| (mode, Load::start(host.addr, 4, mode, "/")))
        .collect()
}

async fn finish(loads: Vec<(Mode, Load)>) -> Vec<(Mode, LoadReport)> {
    let mut reports = Vec::new();
    for (mode, load) in loads {
        reports.push((mode, load.finish().await));
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_between_two_builds() {
    let new_build = host_build("lifecycle-b");
    // A fixed admin port (one the kernel just had free): the new master must take it over.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            bin: Some(host_bin()),
            extra: format!("admin_listen = \"{admin}\""),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(tests::get(admin, "/metrics").await.unwrap().status, 200);
    let before = host.status().await;
    assert_eq!(before.build, "dev", "{before:?}");
    assert_eq!(health(&host).await["build"], "dev");
    let old_master = host.master_pid;
    let old_workers = host.worker_pids(None).await;

    let loads = loads(&host);
    for (_, load) in &loads {
        load.advance(100).await;
    }
    // A package manager replaces the file; the running master keeps its deleted image.
    install_binary(&new_build, host.bin.as_ref().unwrap());
    // `status` answers throughout: the control socket is renamed over, never missing.
    let polling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poller = {
        let polling = polling.clone();
        let (bin, config) = (host_bin(), host.config.clone());
        tokio::spawn(async move {
            let (mut answered, mut failed) = (0u32, Vec::new());
            while polling.load(std::sync::atomic::Ordering::Relaxed) {
                let out = tokio::process::Command::new(&bin)
                    .arg("-c")
                    .arg(&config)
                    .args(["status", "--json"])
                    .output()
                    .await
                    .unwrap();
                if out.status.success() {
                    answered += 1;
                } else {
                    failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            (answered, failed)
        })
    };
    let out = host.cli(&["upgrade"]).await;
    polling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (answered, failed) = poller.await.unwrap();
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(
        failed.is_empty(),
        "status failed during the upgrade: {failed:?}"
    );
    eprintln!("status answered {answered} times during the upgrade");
    let new_master = new_master_pid(&out.stdout);
    host.master_pid = new_master;
    assert_ne!(new_master, old_master);
    for (_, load) in &loads {
        load.advance(300).await;
    }
    let reports = finish(loads).await;
    let served_by_new: u64 = host.status().await.workers.iter().map(|w| w.requests).sum();
    assert!(
        served_by_new >= 300,
        "the new workers served {served_by_new}"
    );

    // `upgrade` returned once the old master exited; its workers went before it.
    assert!(!pid_alive(old_master), "old master {old_master} still runs");
    for pid in &old_workers {
        assert!(!pid_alive(*pid), "old worker {pid} still runs");
    }
    let after = host.status().await;
    assert_eq!(after.master_pid, new_master);
    assert_eq!(after.build, "lifecycle-b", "{after:?}");
    assert_eq!(after.listen, before.listen);
    let new_workers = host.worker_pids(Some(WorkerStateName::Ready)).await;
    assert_eq!(new_workers.len(), 2);
    assert!(new_workers.iter().all(|p| !old_workers.contains(p)));
    assert_eq!(health(&host).await["build"], "lifecycle-b");
    let pidfile = std::fs::read_to_string(host.dir.path().join("state/host.pid")).unwrap();
    assert_eq!(pidfile.trim(), new_master.to_string());
    // The admin address moved to the new master with the rest (its counters start over).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tests::get(admin, "/metrics").await {
            Ok(r) if r.status == 200 && r.body.contains("host_serving_generation") => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the new master does not serve /metrics on {admin}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (mode, report) in &reports {
        eprintln!("{mode:?}: {}", report.summary());
        report.assert_clean();
    }

    // The new master is a full master: it reloads, and stops with nothing left behind.
    host.reload_ok().await;
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(!pid_alive(new_master));
    assert!(!host.dir.path().join("state/host.sock").exists());
    assert!(!host.dir.path().join("state/host.pid").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_to_a_broken_binary_is_refused_and_the_old_master_serves_on() {
    let mut host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            bin: Some(host_bin()),
            extra: "start_timeout = \"3s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let bin = host.bin.clone().unwrap();
    let master = host.master_pid;
    let workers = host.worker_pids(None).await;
    let loads = loads(&host);
    for (_, load) in &loads {
        load.advance(50).await;
    }

    // 1. Not a host at all: it exits at once.
    let script = host.dir.path().join("broken.sh");
    std::fs::write(&script, "#!/bin/sh\necho 'not a host' >&2\nexit 7\n").unwrap();
    install_binary(&script, &bin);
    let out = host.cli(&["upgrade"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exited with status 7") && stderr.contains("serves on"),
        "{}",
        host.explain(&out)
    );

    // 2. A host that cannot serve: the plugin file on disk is now broken, so the new master's
    //    first generation is refused; the old workers run their own snapshot and serve on.
    install_binary(&host_bin(), &bin);
    let good_plugin = std::fs::read(&host.plugin).unwrap();
    std::fs::write(&host.plugin, "not a shared object").unwrap();
    let out = host.cli(&["upgrade"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upgrade failed") && stderr.contains("plugin.so"),
        "{}",
        host.explain(&out)
    );

    // 3. A binary that hangs: killed at its deadline (start_timeout x (workers + 1) + 5 s).
    std::fs::write(&host.plugin, &good_plugin).unwrap();
    std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
    install_binary(&script, &bin);
    let began = Instant::now();
    let out = host.cli(&["upgrade"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did not take over within 14s"),
        "{}",
        host.explain(&out)
    );
    assert!(began.elapsed() < Duration::from_secs(30));

    for (_, load) in &loads {
        load.advance(50).await;
    }
    for (mode, report) in finish(loads).await {
        eprintln!("{mode:?}: {} ok", report.ok);
        report.assert_clean();
    }
    let status = host.status().await;
    assert_eq!(status.master_pid, master);
    let mut now: Vec<u32> = host.worker_pids(Some(WorkerStateName::Ready)).await;
    now.sort();
    let mut before = workers.clone();
    before.sort();
    assert_eq!(now, before, "the old master's workers were touched");
    // No master but the old one is left (the failed ones and their workers were killed).
    let strays: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != master && pid_alive(*pid))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.starts_with(host.dir.path()))
        })
        .filter(|pid| !workers.contains(pid))
        .map(|pid| pid.to_string())
        .collect();
    assert!(strays.is_empty(), "left behind: {strays:?}");

    // The good binary upgrades fine afterwards.
    install_binary(&host_bin(), &bin);
    let out = host.cli(&["upgrade"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    host.master_pid = new_master_pid(&out.stdout);
}

/// Collects what the host sends to a `NOTIFY_SOCKET` the test bound.
struct NotifySocket {
    sock: tokio::net::UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        NotifySocket {
            sock: tokio::net::UnixDatagram::bind(path).unwrap(),
            seen: Vec::new(),
        }
    }

    /// Receives until `line` is among the lines of the datagrams received since the `from`-th
    /// (10 s at most); returns that datagram.
    async fn until(&mut self, from: usize, line: &str) -> String {
        if let Some(msg) = self.seen[from.min(self.seen.len())..]
            .iter()
            .find(|m| m.lines().any(|l| l == line))
        {
            return msg.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = match tokio::time::timeout(left, self.sock.recv(&mut buf)).await {
                Ok(n) => n.unwrap(),
                Err(_) => panic!("no {line:?} within 10 s; received: {:#?}", self.seen),
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(msg.clone());
            if msg.lines().any(|l| l == line) {
                return msg;
            }
        }
    }

    /// Receives until `n` watchdog pings arrived since the `from`-th datagram (10 s at most).
    async fn pings(&mut self, from: usize, n: usize) {
        let count = |seen: &[String]| {
            seen[from.min(seen.len())..]
                .iter()
                .filter(|m| m.trim() == "WATCHDOG=1")
                .count()
        };
        while count(&self.seen) < n {
            let mark = self.seen.len();
            self.until(mark, "WATCHDOG=1").await;
        }
    }

    /// Everything received so far but watchdog pings, in order.
    fn events(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|m| m.trim() != "WATCHDOG=1")
            .cloned()
            .collect()
    }
}

fn monotonic_usec() -> i128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as i128 * 1_000_000 + t.tv_nsec() as i128 / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_protocol_through_start_reload_upgrade_and_stop() {
    let sock_dir = tempfile::Builder::new()
        .prefix("notify-")
        .tempdir()
        .unwrap();
    let path = sock_dir.path().join("notify.sock");
    let mut notify = NotifySocket::bind(&path);
    let mut host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            bin: Some(host_bin()),
            env: vec![
                ("NOTIFY_SOCKET".into(), path.display().to_string()),
                ("WATCHDOG_USEC".into(), "200000".into()),
            ],
            ..Default::default()
        },
    )
    .await;
    let ready = notify.until(0, "READY=1").await;
    assert!(ready.contains("STATUS=serving http://"), "{ready}");
    // WATCHDOG_USEC=200ms: a ping every 100 ms.
    let mark = notify.seen.len();
    notify.pings(mark, 3).await;

    let before = monotonic_usec();
    let mark = notify.seen.len();
    host.reload_ok().await;
    notify.until(mark, "RELOADING=1").await;
    let mark = notify.seen.len();
    notify.until(mark, "READY=1").await;
    let after = monotonic_usec();
    let events = notify.events();
    let reloading = events
        .iter()
        .find(|m| m.lines().any(|l| l == "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1: {events:#?}"));
    let usec: i128 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading}"))
        .parse()
        .unwrap();
    assert!(
        before <= usec && usec <= after,
        "{before} <= {usec} <= {after}"
    );

    let mark = notify.seen.len();
    let out = host.cli(&["upgrade"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    let new_master = new_master_pid(&out.stdout);
    host.master_pid = new_master;
    let mainpid = format!("MAINPID={new_master}");
    notify.until(mark, &mainpid).await;
    notify.until(mark, "READY=1").await;
    // The new master pings the watchdog now.
    let mark = notify.seen.len();
    notify.pings(mark, 3).await;

    let mark = notify.seen.len();
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    notify.until(mark, "STOPPING=1").await;

    // The whole sequence, in order, without the watchdog pings.
    let keys: Vec<&str> = [
        "READY=1",
        "RELOADING=1",
        "READY=1",
        mainpid.as_str(),
        "READY=1",
        "STOPPING=1",
    ]
    .to_vec();
    let events = notify.events();
    let mut wanted = keys.iter().peekable();
    for line in events.iter().flat_map(|m| m.lines()) {
        assert!(line.contains('='), "malformed notification line {line:?}");
        if wanted.peek().is_some_and(|key| line == **key) {
            wanted.next();
        }
    }
    assert!(
        wanted.peek().is_none(),
        "missing {:?} in {events:#?}",
        wanted.collect::<Vec<_>>()
    );
    assert_eq!(
        events.iter().filter(|m| m.contains("STOPPING=1")).count(),
        1,
        "only the last master stops: {events:#?}"
    );
    assert!(
        events.iter().all(|m| m.contains("STATUS=")),
        "every notification says what happened: {events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_passed_socket() {
    let dir = tempfile::Builder::new()
        .prefix("host-it-")
        .tempdir()
        .unwrap();
    tests::install(&example_plugin(&[]), &dir.path().join("plugin.so"));
    let activated = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = activated.local_addr().unwrap();
    // `listen` names a port another socket holds: binding it would fail, so serving proves the
    // host used the passed socket.
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "workers = 2\nlisten = \"{}\"\nplugin = \"plugin.so\"\nstate_dir = \"state\"\n",
            occupied.local_addr().unwrap()
        ),
    )
    .unwrap();
    let host = tests::Activated::start(dir.path(), activated.as_raw_fd()).await;
    drop(activated);
    let reply = tests::get(addr, "/")
        .await
        .expect("served on the passed socket");
    assert_eq!(reply.status, 200);
    let status = host.status();
    assert_eq!(status.listen, addr.to_string(), "{status:?}");
    assert!(host.log().contains("LISTEN_FDS"), "{}", host.log());
    // The workers got the socket on their own fd 3, and not systemd's variables.
    for w in &status.workers {
        let pid = w.pid;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains("LISTEN_FDS="), "worker {pid}: {environ}");
        assert!(!environ.contains("LISTEN_PID="), "worker {pid}: {environ}");
    }
    // A reload works on it too (the new workers get the same socket).
    let out = host.cli(&["reload"]);
    assert!(out.status.success(), "{}", host.log());
    let reply = tests::get(addr, "/").await.expect("served after a reload");
    assert_eq!(reply.status, 200);

    host.stop().await;
    drop(occupied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_like_the_command() {
    let mut host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            bin: Some(host_bin()),
            ..Default::default()
        },
    )
    .await;
    let old_master = host.master_pid;
    let old_workers = host.worker_pids(None).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_master as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let status = host
        .wait_status("a new master", |s| s.master_pid != old_master)
        .await;
    host.master_pid = status.master_pid;
    wait_until(
        Duration::from_secs(15),
        "the old master and its workers to exit",
        || !pid_alive(old_master) && old_workers.iter().all(|p| !pid_alive(*p)),
    )
    .await;
    assert_eq!(
        host.body("/").await.lines().next(),
        Some("hello from example-plugin 0.1.0")
    );
    assert!(
        host.log().contains("upgrade requested by signal"),
        "{}",
        host.log()
    );
}
