//! The master never blocks on plugin file I/O: a FIFO, a device, a huge file or a full disk
//! behind the plugin path is refused (or copied) off the master's event loop, while `status`,
//! signals and crash replacement go on being answered.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use host_status::{StatusReport, WorkerStateName};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tests::{Host, HostOptions, greeting_plugin, pid_alive, wait_until};

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
}

/// The one line a failed CLI command printed, checked to be one line naming the plugin file.
fn one_line_error(host: &Host, out: &std::process::Output) -> String {
    assert!(!out.status.success(), "{}", host.explain(out));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {}", host.explain(out));
    err
}

/// Names of the files in `state_dir/plugins`.
fn snapshot_files(host: &Host) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(host.dir.path().join("state/plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Ready workers as (pid, generation).
fn ready_workers(status: &StatusReport) -> Vec<(u32, u64)> {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateName::Ready)
        .map(|w| (w.pid, w.generation))
        .collect()
}

/// `plugin`'s bytes followed by `zeros` zero bytes, mode 0644: still a valid plugin (loaders
/// map only the segments the headers name), as large as wanted.
fn padded_plugin(plugin: &Path, zeros: u64, dest: &Path) {
    let _ = std::fs::remove_file(dest);
    std::fs::copy(plugin, dest).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(dest).unwrap();
    f.set_len(f.metadata().unwrap().len() + zeros).unwrap();
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fifo_plugin_is_refused_at_once_and_the_master_stays_responsive() {
    let host = Host::start(&greeting_plugin("v1"), HostOptions::default()).await;
    std::fs::remove_file(&host.plugin).unwrap();
    nix::unistd::mkfifo(
        &host.plugin,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();

    let began = Instant::now();
    let out = host.cli(&["reload"]).await;
    let took = began.elapsed();
    let err = one_line_error(&host, &out);
    assert!(
        err.contains("plugin.so is a FIFO, not a regular file"),
        "{}",
        host.explain(&out)
    );
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    eprintln!("reload of a FIFO refused in {took:?}: {err}");

    // The master still answers, and still replaces a dead worker.
    let status = host.status().await;
    assert!(!status.last_reload.unwrap().ok);
    let before = host.worker_pids(Some(WorkerStateName::Ready)).await;
    sigkill(before[0]);
    host.wait_status("a replacement worker", |s| {
        let ready = ready_workers(s);
        ready.len() == 2 && ready.iter().any(|(p, _)| !before.contains(p))
    })
    .await;

    // SIGTERM stops it.
    let pids = host.worker_pids(None).await;
    kill(Pid::from_raw(host.master_pid as i32), Signal::SIGTERM).unwrap();
    wait_until(
        Duration::from_secs(20),
        "the master and workers to exit",
        || {
            pids.iter()
                .chain([&host.master_pid])
                .all(|p| !pid_alive(*p))
        },
    )
    .await;

    // `start -d` with the FIFO as its plugin refuses with the reason instead of hanging.
    let began = Instant::now();
    let out = host.cli(&["start", "-d"]).await;
    let took = began.elapsed();
    let err = one_line_error(&host, &out);
    assert!(
        err.contains("host did not start") && err.contains("plugin.so is a FIFO"),
        "{}",
        host.explain(&out)
    );
    assert!(took < Duration::from_secs(10), "start -d took {took:?}");
    let out = host.cli(&["status"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", host.explain(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_plugin_is_snapshotted_off_the_event_loop() {
    let v1 = greeting_plugin("v1");
    let host = Host::start(&v1, HostOptions::default()).await;
    // 200 MB past the end of a real plugin: the ELF check passes, the copy takes a while.
    padded_plugin(&greeting_plugin("v2"), 200 << 20, &host.plugin);
    let snapshotting = |host: &Host| host.log().matches("snapshotting the plugin file").count();
    let rolled_out = |host: &Host, generation: u64| {
        host.log().lines().any(|l| {
            l.contains("rolling out a new generation")
                && l.contains(&format!("generation={generation} "))
        })
    };
    let started = snapshotting(&host);

    let began = Instant::now();
    let reload = host.spawn_cli(&["reload"]);
    wait_until(Duration::from_secs(10), "the snapshot to begin", || {
        snapshotting(&host) > started
    })
    .await;
    let victim = host.worker_pids(Some(WorkerStateName::Ready)).await[0];
    sigkill(victim);
    let (mut raw_max, mut cli_max, mut polls) = (Duration::ZERO, Duration::ZERO, 0u32);
    let mut replaced_during_snapshot = None;
    let wall = loop {
        if reload.is_finished() {
            break began.elapsed();
        }
        let (took, status) = host.raw_status().await;
        raw_max = raw_max.max(took);
        polls += 1;
        if polls % 5 == 0 {
            let t = Instant::now();
            host.status().await;
            cli_max = cli_max.max(t.elapsed());
        }
        if replaced_during_snapshot.is_none() {
            let ready = ready_workers(&status);
            if ready.len() == 2 && ready.iter().all(|(p, _)| *p != victim) {
                // The replacement serves; was the snapshot still being taken?
                replaced_during_snapshot = Some(!rolled_out(&host, 2));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = reload.await.unwrap();
    assert!(out.status.success(), "{}", host.explain(&out));
    let status = host.status().await;
    let duration_ms = status.last_reload.unwrap().duration_ms;
    let log = host.log();
    let snapshot_ms: u64 = log
        .lines()
        .find(|l| l.contains("rolling out a new generation") && l.contains("generation=2 "))
        .and_then(|l| l.split("snapshot_ms=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the log says how long the snapshot took");
    eprintln!(
        "200 MB reload: wall {wall:?}, reported {duration_ms} ms, snapshot {snapshot_ms} ms; \
         status during it: {polls} raw answers, max {raw_max:?}; `host status` CLI max {cli_max:?}"
    );
    assert_eq!(
        replaced_during_snapshot,
        Some(true),
        "the killed worker was replaced while the snapshot was still being taken"
    );
    assert!(
        raw_max < Duration::from_millis(100),
        "the master took {raw_max:?} to answer a status during the snapshot"
    );
    assert!(
        duration_ms >= snapshot_ms,
        "the reported duration ({duration_ms} ms) covers the snapshot ({snapshot_ms} ms)"
    );
    assert!(
        duration_ms as u128 <= wall.as_millis() && wall.as_millis() - (duration_ms as u128) < 1500,
        "the reported duration ({duration_ms} ms) is the reload's wall time ({wall:?}) less the CLI's own start"
    );
    assert!(host.body("/").await.starts_with("v2 from"));

    // An unchanged file is not read again: the master says so for this generation (the
    // behaviour, not its timing, is what is asserted; the time is printed).
    let t = Instant::now();
    host.reload_ok().await;
    let unchanged = t.elapsed();
    eprintln!("reload of the unchanged 200 MB file: {unchanged:?}");
    let rolled = |generation: u32| {
        host.log()
            .lines()
            .find(|l| {
                l.contains("rolling out a new generation")
                    && l.contains(&format!("generation={generation} "))
            })
            .map(str::to_string)
            .unwrap_or_default()
    };
    assert!(
        rolled(2).contains("snapshot=\"read and copied\""),
        "the changed file was read and copied: {}",
        rolled(2)
    );
    assert!(
        rolled(3).contains("snapshot=\"unchanged file, not read\""),
        "the unchanged file was reused without reading: {}",
        rolled(3)
    );

    // Stop while the same bytes are being read again (a chmod moves the file's ctime, so it is
    // no longer known unchanged): the waiting reload gets an error and the rollout never starts.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&host.plugin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let started = snapshotting(&host);
    let pids = host.worker_pids(None).await;
    let reload = host.spawn_cli(&["reload"]);
    wait_until(
        Duration::from_secs(10),
        "the second snapshot to begin",
        || snapshotting(&host) > started,
    )
    .await;
    host.stop_during(reload, &pids).await;
    assert!(
        !rolled_out(&host, 4),
        "no rollout started after stop:\n{}",
        host.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_plugins_and_devices_are_refused_without_being_copied() {
    let v1 = greeting_plugin("v1");
    let limit = std::fs::metadata(&v1).unwrap().len() + (1 << 20);
    let host = Host::start(
        &v1,
        HostOptions {
            extra: format!("max_plugin_bytes = {limit}\nallow_writable_plugin = true"),
            ..Default::default()
        },
    )
    .await;
    let kept = snapshot_files(&host);
    assert_eq!(kept.len(), 1, "{kept:?}");

    padded_plugin(&v1, 2 << 20, &host.plugin);
    let out = host.cli(&["reload"]).await;
    let err = one_line_error(&host, &out);
    assert!(
        err.contains(&format!(
            "plugin.so is larger than max_plugin_bytes ({limit} bytes)"
        )),
        "{}",
        host.explain(&out)
    );
    assert_eq!(snapshot_files(&host), kept, "nothing was written");

    // /dev/zero would fill state_dir if it were read: refused from its metadata.
    std::fs::remove_file(&host.plugin).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &host.plugin).unwrap();
    let began = Instant::now();
    let out = host.cli(&["reload"]).await;
    let err = one_line_error(&host, &out);
    assert!(
        err.contains("plugin.so is a character device"),
        "{}",
        host.explain(&out)
    );
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(snapshot_files(&host), kept, "nothing was written");
    assert_eq!(
        host.worker_pids(Some(WorkerStateName::Ready)).await.len(),
        2
    );
}

/// A tmpfs mounted over a directory, unmounted (lazily: workers may still map files in it)
/// on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` (with the reason printed) where mounting is not permitted.
    fn mount(at: &Path, bytes: u64) -> Option<Tmpfs> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700")])
            .arg("tmpfs")
            .arg(at)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Tmpfs(at.to_path_buf())),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs to fill ({}); needs root",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The disk is full: a small tmpfs mounted over `state_dir/plugins` (root only; skipped
/// otherwise), holding the serving snapshot and a file that fills the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_is_a_snapshot_write_error_and_kept_bytes_still_reload() {
    let (v1, v2) = (greeting_plugin("v1"), greeting_plugin("v2"));
    let host = Host::start(&v1, HostOptions::default()).await;
    let plugins = host.dir.path().join("state/plugins");
    let kept = snapshot_files(&host);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let serving = std::fs::read(plugins.join(&kept[0])).unwrap();
    let Some(_tmpfs) = Tmpfs::mount(&plugins, serving.len() as u64 + (256 << 10)) else {
        return;
    };
    std::fs::write(plugins.join(&kept[0]), &serving).unwrap();
    std::fs::set_permissions(
        plugins.join(&kept[0]),
        std::fs::Permissions::from_mode(0o500),
    )
    .unwrap();
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(plugins.join("filler")).unwrap();
        let chunk = vec![1u8; 64 << 10];
        let full = loop {
            if let Err(e) = filler.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(full.raw_os_error(), Some(nix::libc::ENOSPC), "{full}");
    }

    host.install_plugin(&v2);
    let out = host.cli(&["reload"]).await;
    let err = one_line_error(&host, &out);
    assert!(
        err.contains(&format!("cannot write snapshot {}/", plugins.display()))
            && err.contains("No space left on device")
            && !err.contains("cannot read plugin file"),
        "{}",
        host.explain(&out)
    );
    eprintln!("full disk: {err}");
    let mut files = kept.clone();
    files.push("filler".into());
    files.sort();
    assert_eq!(
        snapshot_files(&host),
        files,
        "the temporary file was removed"
    );

    // The serving bytes are already snapshotted: reloading them needs no space.
    host.install_plugin(&v1);
    let out = host.reload_ok().await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("generation 2 serving"),
        "{}",
        host.explain(&out)
    );
    assert!(host.body("/").await.starts_with("v1 from"));
    assert_eq!(snapshot_files(&host), files);
}
