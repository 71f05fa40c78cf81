//! The dev loop and the papercuts of a real service: a save during a running build cancels it
//! and only the newest build is served; the plugin sees its config file's directory, whether it
//! runs under `host check`, and can await its set-up on its own runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tests::{
    Host, HostOptions, fixture_plugin, get, greeting_plugin, host_bin, install, pid_alive,
    wait_until,
};

/// A build script standing in for cargo: reads `src/version` and `src/delay`, "compiles" for
/// `delay` seconds (a `sleep` in the background of the shell, as cargo runs rustc, its pid in
/// `sleep-<version>.pid`), then installs the prebuilt `<version>.so` as the configured plugin.
const BUILD_SH: &str = r#"set -e
v=$(cat "$SRC/src/version")
sleep "$(cat "$SRC/src/delay")" &
echo $! > "$SRC/sleep-$v.pid"
wait $!
cp "$SRC/$v.so" plugin.so.tmp
mv plugin.so.tmp plugin.so
"#;

fn save(dir: &Path, version: &str, delay_s: u32) {
    std::fs::write(dir.join("src/delay"), delay_s.to_string()).unwrap();
    std::fs::write(dir.join("src/version"), version).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_save_during_a_build_cancels_it_and_only_the_newest_build_is_served() {
    let src = tempfile::Builder::new()
        .prefix("host-devloop-src-")
        .tempdir()
        .unwrap();
    let s = src.path();
    std::fs::create_dir_all(s.join("src")).unwrap();
    for v in ["v0", "v1", "v2"] {
        install(&greeting_plugin(v), &s.join(format!("{v}.so")));
    }
    std::fs::write(s.join("build.sh"), BUILD_SH).unwrap();
    save(s, "v0", 0);
    let extra = format!(
        "build = \"SRC='{dir}' sh '{dir}/build.sh'\"\nwatch_paths = [\"{dir}/src\"]\nwatch_debounce = \"100ms\"",
        dir = s.display()
    );
    let host = Host::start(
        &greeting_plugin("v0"),
        HostOptions {
            extra,
            ..Default::default()
        },
    )
    .await;
    assert!(host.body("/").await.starts_with("v0 from"));

    // Every first line served from now on.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let poller = {
        let (seen, addr) = (seen.clone(), host.addr);
        tokio::spawn(async move {
            loop {
                if let Ok(reply) = get(addr, "/").await {
                    seen.lock().unwrap().push(reply.first_line().to_string());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Save v1: its build "compiles" for 6 s.
    save(s, "v1", 6);
    let v1_pid = s.join("sleep-v1.pid");
    wait_until(Duration::from_secs(30), "the v1 build to start", || {
        std::fs::read_to_string(&v1_pid).is_ok_and(|p| p.ends_with('\n'))
    })
    .await;
    let v1_compiler: u32 = std::fs::read_to_string(&v1_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(v1_compiler));
    // Save v2 while v1 builds: v1's build is cancelled, its compiler killed with its group.
    save(s, "v2", 1);
    wait_until(
        Duration::from_secs(30),
        "v2 served after its own build",
        || {
            seen.lock()
                .unwrap()
                .last()
                .is_some_and(|l| l.starts_with("v2 from"))
        },
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "the v1 build's compiler gone",
        || !pid_alive(v1_compiler),
    )
    .await;
    let log = host.log();
    assert!(log.contains("build cancelled"), "{log}");
    // Past the time v1's build would have ended (6 s), with margin: still v2, and v1 was never
    // served, nor installed as the plugin file.
    tokio::time::sleep(Duration::from_secs(7)).await;
    poller.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|l| !l.starts_with("v1")),
        "a stale build was served: {seen:?}\n{}",
        host.log()
    );
    assert!(seen.last().unwrap().starts_with("v2 from"), "{seen:?}");
    let log = host.log();
    assert!(log.contains("auto-reload: generation 2 serving"), "{log}");
    assert!(!log.contains("generation 3"), "one rollout only:\n{log}");
    assert_eq!(
        std::fs::read(&host.plugin).unwrap(),
        std::fs::read(s.join("v2.so")).unwrap()
    );
}

/// The fixture's report lines (`FIXTURE_START_REPORT`).
fn report_lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plugin_sees_its_config_dir_and_host_check_and_awaits_its_set_up() {
    let plugin = fixture_plugin("");
    // Every command runs from another directory than the config file's.
    let elsewhere = tempfile::Builder::new()
        .prefix("host-devloop-cwd-")
        .tempdir()
        .unwrap();
    let cwd = elsewhere.path();

    // `host check`: the plugin knows, and creates nothing.
    let deploy = tempfile::Builder::new()
        .prefix("host-devloop-check-")
        .tempdir()
        .unwrap();
    let d = deploy.path();
    install(&plugin, &d.join("plugin.so"));
    std::fs::write(
        d.join("host.toml"),
        "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nplugin = \"plugin.so\"\n",
    )
    .unwrap();
    let check_report = d.join("check-report");
    let out = tokio::process::Command::new(host_bin())
        .arg("-c")
        .arg(d.join("host.toml"))
        .arg("check")
        .current_dir(cwd)
        .env("FIXTURE_START_REPORT", &check_report)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        report_lines(&check_report),
        [format!(
            "check=true config_dir={} data={}/data.db awaited=socket+spawn+timer",
            d.display(),
            d.display()
        )]
    );
    assert!(!d.join("data.db").exists() && !cwd.join("data.db").exists());

    // A serving worker: not a check, the same directory, and a task its async set-up spawned
    // still running on the plugin's runtime.
    let report = cwd.join("report");
    let host = Host::start(
        &plugin,
        HostOptions {
            workers: 1,
            env: vec![("FIXTURE_START_REPORT".into(), report.display().to_string())],
            cwd: Some(cwd.to_path_buf()),
            ..Default::default()
        },
    )
    .await;
    let dir = host.config.parent().unwrap().to_path_buf();
    let expected = format!(
        "check=false config_dir={} data={}/data.db awaited=socket+spawn+timer",
        dir.display(),
        dir.display()
    );
    assert_eq!(report_lines(&report), std::slice::from_ref(&expected));
    let context = host.body("/context").await;
    assert!(
        context.starts_with(&format!("{expected} ticks=")),
        "{context}"
    );
    let ticks = |body: &str| -> u64 {
        body.trim()
            .rsplit_once("ticks=")
            .and_then(|(_, n)| n.parse().ok())
            .unwrap()
    };
    let first = ticks(&context);
    let began = std::time::Instant::now();
    loop {
        let now = ticks(&host.body("/context").await);
        if now >= first + 5 {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "the task spawned in block_on stopped ticking at {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dir.join("data.db").exists(),
        "the database is beside host.toml"
    );
    assert!(
        !cwd.join("data.db").exists(),
        "nothing in the current directory"
    );
}
