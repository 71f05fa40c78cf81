//! One syscall in a plugin takes down neither the master, nor the listening socket, nor
//! outlives `host stop` (issue 18, findings 6 to 8). Each test loads a fixture plugin that makes
//! the call (`tests/fixtures/fixture-plugin`: the `truncate-table` and `ctor-shutdown-listener`
//! builds, and the hostile routes of every build) into the real `host` binary and talks to it
//! over real sockets:
//!
//! - truncating the shared worker table (its fd found through `/proc`, in an ELF constructor and
//!   in `on_worker_start`) fails: the master lives and serves;
//! - `shutdown(3, SHUT_RD)` in a handler: the master re-arms the socket and new connections are
//!   served again within seconds; `status` and `/metrics` count the recovery;
//! - a socket that cannot be re-armed (a child of the plugin took the port) is reported down by
//!   `status` and `/metrics`, `reload` and `upgrade` do not report success, and it is re-armed
//!   once the port is free;
//! - the same in a constructor: the canary is refused, the old generation serves on;
//! - the same on a socket systemd passed (`LISTEN_FDS`): re-armed too;
//! - `close(3)` in a handler: that worker is replaced, and no request fails;
//! - a forked `setsid()` child that ignores SIGTERM and holds the listener: ended when its worker
//!   leaves at a reload, and at `host stop`, after which `host start` gets the same port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use host_status::WorkerStateName;
use tests::{
    Host, HostOptions, fixture_plugin, get, pid_alive, wait_old_workers_gone, wait_until,
    worker_pids_in,
};

/// The value of the unlabeled sample `name`, or of the first whose labels contain `labels`.
async fn metric(admin: SocketAddr, name: &str, labels: &str) -> f64 {
    let reply = get(admin, "/metrics").await.expect("GET /metrics");
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply
        .body
        .lines()
        .find(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with(' ')
                    || (l[name.len()..].starts_with('{') && l.contains(labels)))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in:\n{}", reply.body))
}

/// SIGKILLs a process the test's plugin started, when dropped (forgotten once it is gone).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn with_admin(extra: &str) -> HostOptions {
    HostOptions {
        extra: format!("admin_listen = \"127.0.0.1:0\"\n{extra}"),
        ..HostOptions::default()
    }
}

/// Waits (`within`) until a new connection gets `fixture ok`; returns how long it took.
async fn served_again(host: &Host, within: Duration) -> Duration {
    let began = Instant::now();
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), get(host.addr, "/")).await
            && r.status == 200
            && r.body == "fixture ok\n"
        {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < within,
            "no new connection served within {within:?}\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` requests, each on a new connection, every one answered `fixture ok`.
async fn all_served(host: &Host, n: usize) {
    for i in 0..n {
        let r = get(host.addr, "/")
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", host.log()));
        assert_eq!(r.body, "fixture ok\n", "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncating_the_worker_table_does_not_kill_the_master() {
    let report = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let mut opts = with_admin("");
    opts.env = vec![(
        "FIXTURE_REPORT".into(),
        report.to_str().unwrap().to_string(),
    )];
    let host = Host::start(&fixture_plugin("truncate-table"), opts).await;
    let admin = host.admin_addr().await;
    // A reload runs the attack again in every new worker, with the master reading the table.
    host.reload_ok().await;
    all_served(&host, 20).await;
    assert!(metric(admin, "host_http_requests_total", "class=\"2xx\"").await >= 20.0);
    assert!(
        pid_alive(host.master_pid),
        "the master died\n{}",
        host.log()
    );

    let text = std::fs::read_to_string(&report).unwrap();
    // Both hooks of all four workers ran the attack; it found the table only in the master
    // (its own fd was closed before its constructor ran), and every truncation failed.
    assert!(text.matches("constructor").count() >= 4, "{text}");
    assert!(text.contains("on_worker_start"), "{text}");
    assert!(
        !text.contains("constructor self") && !text.contains("on_worker_start self"),
        "a worker still held the table's fd while its plugin ran:\n{text}"
    );
    assert!(
        text.contains("parent"),
        "the attack never found the table:\n{text}"
    );
    assert!(!text.contains("truncate: ok"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_shut_down_by_a_handler_is_re_armed() {
    let host = Host::start(&fixture_plugin(""), with_admin("")).await;
    let admin = host.admin_addr().await;
    assert_eq!(host.status().await.listener.recoveries, 0);

    let r = get(host.addr, "/shutdown-listener").await.unwrap();
    assert_eq!(r.status, 200);
    let took = served_again(&host, Duration::from_secs(10)).await;
    eprintln!("served again {took:?} after the shutdown");
    all_served(&host, 50).await;

    let status = host.status().await;
    let listener = &status.listener;
    assert!(listener.up, "{status:?}");
    assert!(listener.recoveries >= 1, "{status:?}");
    assert!(
        listener
            .last_recovery
            .as_deref()
            .unwrap()
            .contains("no longer listens"),
        "{status:?}"
    );
    assert!(metric(admin, "host_listener_recoveries_total", "").await >= 1.0);
    assert_eq!(metric(admin, "host_listener_up", "").await, 1.0);
    assert!(host.log().contains("re-armed it"), "{}", host.log());
    // Nothing else had to change: the same workers serve, and a reload succeeds.
    host.reload_ok().await;
    all_served(&host, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_that_cannot_be_re_armed_is_reported_down() {
    // The thief ignores SIGTERM: with this grace it outlives its worker's drain at the reload.
    let host = Host::start(&fixture_plugin(""), with_admin("orphan_grace = \"60s\"")).await;
    let admin = host.admin_addr().await;
    // A child of the plugin shuts the socket down and listens on its address itself.
    let r = get(host.addr, "/steal-listener").await.unwrap();
    let thief: u32 = r.body.trim().parse().unwrap();
    // Killed however the test ends: it ignores SIGTERM and would outlive a failed test.
    let _thief = KillOnDrop(thief);
    let status = host
        .wait_status("the listener reported down", |s| !s.listener.up)
        .await;
    let error = status.listener.error.as_deref().unwrap();
    assert!(error.contains("re-arming it failed"), "{status:?}");
    assert_eq!(metric(admin, "host_listener_up", "").await, 0.0);
    let text = host.cli(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("listener DOWN"),
        "{}",
        host.explain(&text)
    );
    // Neither an upgrade nor a reload reports success meanwhile.
    let out = host.cli(&["upgrade"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listening socket is down"),
        "{}",
        host.explain(&out)
    );
    let out = host.cli(&["reload"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no connection reaches it"),
        "{}",
        host.explain(&out)
    );
    // Once the thief is gone, the next check re-arms the socket.
    drop(_thief);
    served_again(&host, Duration::from_secs(10)).await;
    let status = host.status().await;
    assert!(status.listener.up, "{status:?}");
    assert!(status.listener.recoveries >= 1, "{status:?}");
    assert_eq!(metric(admin, "host_listener_up", "").await, 1.0);
    host.reload_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_whose_constructor_shuts_the_listener_down_is_refused() {
    let host = Host::start(&fixture_plugin(""), with_admin("")).await;
    let before = host.status().await;
    host.install_plugin(&fixture_plugin("ctor-shutdown-listener"));
    let out = host.cli(&["reload"]).await;
    assert!(!out.status.success(), "{}", host.explain(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broke the listening socket"),
        "{}",
        host.explain(&out)
    );
    served_again(&host, Duration::from_secs(10)).await;
    all_served(&host, 20).await;
    let status = host.status().await;
    assert_eq!(status.generation, before.generation, "{status:?}");
    assert_eq!(
        worker_pids_in(&status, Some(WorkerStateName::Ready)),
        worker_pids_in(&before, Some(WorkerStateName::Ready)),
        "the old generation's workers serve on"
    );
    assert!(status.listener.recoveries >= 1, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_listener_fd_was_closed_is_replaced() {
    let host = Host::start(&fixture_plugin(""), HostOptions::default()).await;
    let before = host.worker_pids(Some(WorkerStateName::Ready)).await;
    let r = get(host.addr, "/close-listener-fd").await.unwrap();
    let broken: u32 = r.body.trim().parse().unwrap();
    assert!(before.contains(&broken));
    // Requests keep coming, each on a new connection (the broken worker is woken by each and
    // finds its fd gone); none fails, and the broken worker is replaced.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    loop {
        all_served(&host, 5).await;
        sent += 5;
        let ready = host.worker_pids(Some(WorkerStateName::Ready)).await;
        if ready.len() == before.len() && !ready.contains(&broken) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker {broken} was not replaced; ready: {ready:?}\n{}",
            host.log()
        );
    }
    eprintln!("replaced after {sent} requests");
    wait_old_workers_gone(&[broken]).await;
    all_served(&host, 20).await;
    assert!(host.log().contains("replacing it"), "{}", host.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forked_child_is_ended_at_reload_and_at_stop() {
    // A fixed port: `host start` must get it again after `stop`.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = Host::start(
        &fixture_plugin(""),
        with_admin(&format!(
            "listen = \"127.0.0.1:{port}\"\norphan_grace = \"300ms\""
        )),
    )
    .await;
    let admin = host.admin_addr().await;
    let fork = || async {
        let r = get(host.addr, "/fork-holder").await.unwrap();
        let pid: u32 = r.body.trim().parse().unwrap();
        assert!(pid > 0 && pid_alive(pid), "{}", r.body);
        pid
    };

    // A worker that leaves at a reload takes what it forked with it.
    let first = fork().await;
    let _first = KillOnDrop(first);
    let old = host.worker_pids(None).await;
    host.reload_ok().await;
    wait_old_workers_gone(&old).await;
    wait_until(
        Duration::from_secs(10),
        "the child of a drained worker to be ended",
        || !pid_alive(first),
    )
    .await;
    // Gone: its pid may be reused, never kill it again.
    std::mem::forget(_first);
    assert!(
        metric(admin, "host_orphans_ended_total", "signal=\"SIGKILL\"").await >= 1.0,
        "it ignores SIGTERM"
    );

    // `stop` answers once the child is gone, and the port is free again.
    let second = fork().await;
    let _second = KillOnDrop(second);
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
    assert!(!pid_alive(second), "the forked child outlived `host stop`");
    std::mem::forget(_second);
    let out = host.cli(&["start", "-d"]).await;
    assert!(
        out.status.success(),
        "host start on the same port: {}",
        host.explain(&out)
    );
    all_served(&host, 5).await;
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "{}", host.explain(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_passed_by_systemd_is_re_armed_too() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::Builder::new()
        .prefix("host-it-")
        .tempdir()
        .unwrap();
    tests::install(&fixture_plugin(""), &dir.path().join("plugin.so"));
    let activated = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = activated.local_addr().unwrap();
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "workers = 2\nlisten = \"{addr}\"\nplugin = \"plugin.so\"\nstate_dir = \"state\"\n"
        ),
    )
    .unwrap();
    let host = tests::Activated::start(dir.path(), activated.as_raw_fd()).await;
    // Only the host holds the socket now.
    drop(activated);
    let r = get(addr, "/shutdown-listener").await.unwrap();
    assert_eq!(r.status, 200, "{}", host.log());
    let began = Instant::now();
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), get(addr, "/")).await
            && r.body == "fixture ok\n"
        {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "not served again:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = host.status();
    assert!(status.listener.activated, "{status:?}");
    assert!(status.listener.up, "{status:?}");
    assert!(status.listener.recoveries >= 1, "{status:?}");
    host.stop().await;
}
