//! Local files the host trusts: `state_dir` (and its parents), the plugin snapshots in it, and
//! the control socket and pidfile a running master keeps there. Each test is an attack from
//! issue 18, scaled down: a `state_dir` others can write (or another user owns) is refused by
//! `start` and `check`; foreign code under a snapshot's name and size is never served; and a
//! `state_dir` deleted under a running master is recreated, so `status`, `reload` and `stop`
//! reach it again, and a second `start` says who holds the port.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tests::{Host, HostOptions, get, greeting_plugin, host_bin, pid_alive, wait_until};

/// `host -c config args`, bounded by 60 s.
async fn cli(config: &Path, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(host_bin())
        .arg("-c")
        .arg(config)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("host {args:?} did not return within 60 s"))
        .expect("host runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A private directory with `plugin.so` (a copy of the v1 build) and a `host.toml` whose
/// `state_dir` is `state_dir` (relative to it).
fn deployment(state_dir: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("host-it-files-")
        .tempdir()
        .unwrap();
    tests::install(&greeting_plugin("v1"), &dir.path().join("plugin.so"));
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nworkers = 1\nplugin = \"plugin.so\"\nstate_dir = \"{state_dir}\"\n"
        ),
    )
    .unwrap();
    (dir, config)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `start -d` and `check` both refuse with one line naming `state_dir`, the path that failed
/// (`checked`) and `why`; nothing was created in `state_dir`.
async fn refused(config: &Path, state: &Path, checked: &Path, why: &str) {
    for args in [&["start", "-d"][..], &["check"]] {
        let out = cli(config, args).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} must refuse: {err}");
        let expected = format!(
            "refusing state_dir {}: {} is {why}",
            state.display(),
            checked.display()
        );
        assert!(
            err.contains(&expected),
            "{args:?}: {err}\nexpected: {expected}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    for file in ["host.sock", "host.pid", "host.log", "plugins"] {
        assert!(
            !state.join(file).exists(),
            "{file} was created in a refused state_dir"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_others_can_write_or_own_is_refused() {
    // The attack: a world-writable directory prepared by another user.
    let (dir, config) = deployment("open");
    let state = dir.path().join("open");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o777);
    refused(&config, &state, &state, "writable by everyone (mode 0777)").await;

    // A parent others can write, without the sticky bit (`/tmp`'s own is fine: every test dir
    // is in it).
    let (dir, config) = deployment("shared/state");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o777);
    let state = shared.join("state");
    refused(
        &config,
        &state,
        &shared,
        "writable by everyone (mode 0777, without the sticky bit of a root-owned /tmp)",
    )
    .await;
    chmod(&shared, 0o770);
    refused(
        &config,
        &state,
        &shared,
        "writable by its group (mode 0770, without the sticky bit of a root-owned /tmp)",
    )
    .await;
    // Fixed: `check` passes, and `start` creates state_dir with mode 0700.
    chmod(&shared, 0o755);
    let out = cli(&config, &["check"]).await;
    assert!(out.status.success(), "check: {}", stderr(&out));
    let out = cli(&config, &["start", "-d"]).await;
    assert!(out.status.success(), "start: {}", stderr(&out));
    assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
    let out = cli(&config, &["stop"]).await;
    assert!(out.status.success(), "stop: {}", stderr(&out));

    // Owned by another user (not root, not us), even with mode 0700.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: skipping the state_dir owned by another user (it needs chown)");
        return;
    }
    let (dir, config) = deployment("theirs");
    let state = dir.path().join("theirs");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    refused(
        &config,
        &state,
        &state,
        "owned by uid 65534 (not by this user, uid 0, nor root)",
    )
    .await;
    // A sticky, root-owned, world-writable parent (like /tmp) is fine.
    let (dir, config) = deployment("sticky/state");
    let sticky = dir.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    chmod(&sticky, 0o1777);
    let out = cli(&config, &["check"]).await;
    assert!(
        out.status.success(),
        "check under a sticky parent: {}",
        stderr(&out)
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_snapshot_under_the_real_name_and_size_is_not_served() {
    // Two builds, padded to one size (bytes past an ELF file's end are never mapped).
    let mut real = std::fs::read(greeting_plugin("real")).unwrap();
    let mut foreign = std::fs::read(greeting_plugin("foreign")).unwrap();
    let size = real.len().max(foreign.len());
    real.resize(size, 0);
    foreign.resize(size, 0);
    let sha = sha256_hex(&real);
    let work = tempfile::Builder::new()
        .prefix("host-it-snap-")
        .tempdir()
        .unwrap();
    let real_path = work.path().join("real.so");
    std::fs::write(&real_path, &real).unwrap();
    // The attack: the foreign code waits in state_dir under the real plugin's sha256.
    let state = work.path().join("state");
    std::fs::create_dir_all(state.join("plugins")).unwrap();
    chmod(&state, 0o700);
    chmod(&state.join("plugins"), 0o700);
    let planted = state.join(format!("plugins/{sha}.so"));
    std::fs::write(&planted, &foreign).unwrap();
    chmod(&planted, 0o500);
    let log = || std::fs::read_to_string(state.join("host.log")).unwrap_or_default();

    let host = Host::start(
        &real_path,
        HostOptions {
            workers: 1,
            extra: format!("state_dir = \"{}\"\n", state.display()),
            ..HostOptions::default()
        },
    )
    .await;
    let body = host.body("/").await;
    assert!(body.starts_with("real from"), "served: {body}\n{}", log());
    assert!(
        log().contains("the snapshot on disk did not match its name"),
        "{}",
        log()
    );
    assert_eq!(
        std::fs::read(&planted).unwrap(),
        real,
        "replaced by a fresh copy"
    );
    let status = host.status().await;
    assert_eq!(status.workers[0].plugin.as_ref().unwrap().sha256, sha);

    // Again behind the master's back, between reloads of an unchanged plugin file (the path
    // where the file is not read at all): the snapshot is not the file it wrote, so it is
    // checked, and replaced again.
    chmod(&planted, 0o700);
    std::fs::write(&planted, &foreign).unwrap();
    let before = log().matches("did not match its name").count();
    let out = host.cli(&["reload"]).await;
    assert!(out.status.success(), "reload: {}\n{}", stderr(&out), log());
    let body = host.body("/").await;
    assert!(body.starts_with("real from"), "served after reload: {body}");
    assert_eq!(log().matches("did not match its name").count(), before + 1);
    assert_eq!(std::fs::read(&planted).unwrap(), real);
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "stop: {}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_state_dir_is_recreated_and_every_command_reaches_the_master_again() {
    let host = Host::start(
        &greeting_plugin("v1"),
        HostOptions {
            extra: "admin_listen = \"127.0.0.1:0\"".into(),
            ..HostOptions::default()
        },
    )
    .await;
    let status = host.status().await;
    let admin = tests::prom::admin_addr(&status);
    let state = host.dir.path().join("state");

    // The attack: `rm -rf state_dir` under the running master (renamed away first, so the
    // removal is one step the master cannot interleave with).
    let gone = host.dir.path().join("gone");
    std::fs::rename(&state, &gone).unwrap();
    std::fs::remove_dir_all(&gone).unwrap();
    let deleted = Instant::now();
    // `status` reaches the master again within a deadline (the master looks twice a second).
    let mut answered = None;
    while answered.is_none() {
        let out = host.cli(&["status", "--json"]).await;
        if out.status.success() {
            answered = Some(deleted.elapsed());
        } else {
            assert!(
                deleted.elapsed() < Duration::from_secs(10),
                "status still fails 10 s after state_dir was deleted: {}",
                stderr(&out)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "status answered again {} ms after state_dir was deleted",
        answered.unwrap().as_millis()
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("host.sock")), 0o600);
    // The pidfile is back, with the master's pid and its lock: a second `start` is refused.
    wait_until(
        Duration::from_secs(10),
        "the pidfile to be recreated",
        || {
            std::fs::read_to_string(state.join("host.pid"))
                .is_ok_and(|p| p.trim() == host.master_pid.to_string())
        },
    )
    .await;
    let out = host.cli(&["start", "-d"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already running"),
        "second start: {}",
        stderr(&out)
    );

    // Another deployment on the same port: `start` names the master that holds it.
    let (other, other_config) = deployment("state");
    let text = std::fs::read_to_string(&other_config)
        .unwrap()
        .replace("127.0.0.1:0", &host.addr.to_string());
    std::fs::write(&other_config, text).unwrap();
    let out = cli(&other_config, &["start"]).await;
    assert!(!out.status.success());
    let expected = format!(
        "cannot listen on {} (key `listen`): the address is in use by a running host master (pid {}",
        host.addr, host.master_pid
    );
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    drop(other);

    // Counted, once each.
    let text = get(admin, "/metrics").await.unwrap().body;
    assert_eq!(
        tests::metric(
            &text,
            "host_state_dir_repairs_total",
            &["what=\"control_socket\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        tests::metric(&text, "host_state_dir_repairs_total", &["what=\"pidfile\""]),
        1.0,
        "{text}"
    );

    // reload and stop work; stop leaves nothing running.
    let workers = host.worker_pids(None).await;
    host.install_plugin(&greeting_plugin("v2"));
    host.reload_ok().await;
    assert!(host.body("/").await.starts_with("v2 from"));
    let mut pids = host.worker_pids(None).await;
    pids.extend(workers);
    let out = host.cli(&["stop"]).await;
    assert!(out.status.success(), "stop: {}", stderr(&out));
    wait_until(Duration::from_secs(10), "every process to exit", || {
        pids.iter()
            .chain([&host.master_pid])
            .all(|&p| !pid_alive(p))
    })
    .await;
}
