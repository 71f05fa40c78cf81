//! Balance after a reload: keep-alive clients that reconnect when their old worker drains spread
//! over the new workers instead of piling onto the first one to wake.

use std::collections::BTreeMap;
use std::time::Duration;

use host_status::{StatusReport, WorkerStateName};
use tests::{Host, HostOptions, Load, Mode, greeting_plugin};

const WORKERS: usize = 4;
const CLIENTS: usize = 32;
const WINDOW: Duration = Duration::from_secs(5);

/// The tests of this file measure shares of the CPU: one at a time (the WebSocket test's busy
/// loop would skew the other's).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `requests` per ready worker, by pid.
fn ready_requests(status: &StatusReport) -> BTreeMap<u32, u64> {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateName::Ready)
        .map(|w| (w.pid, w.requests))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_spread_over_the_new_workers_after_a_reload() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (v1, v2) = (greeting_plugin("v1"), greeting_plugin("v2"));
    let host = Host::start(
        &v1,
        HostOptions {
            workers: WORKERS,
            ..Default::default()
        },
    )
    .await;
    let load = Load::start(host.addr, CLIENTS, Mode::KeepAlive, "/");
    load.advance(1000).await;

    let old = host.worker_pids(None).await;
    host.install_plugin(&v2);
    host.reload_ok().await;
    tests::wait_old_workers_gone(&old).await;

    // A fixed window on purpose: the question is how the settled connections share the work.
    let before = ready_requests(&host.status().await);
    tokio::time::sleep(WINDOW).await;
    let after_status = host.status().await;
    let after = ready_requests(&after_status);
    let connections: Vec<u64> = after_status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateName::Ready)
        .map(|w| w.connections)
        .collect();
    let report = load.finish().await;

    assert_eq!(before.len(), WORKERS, "ready workers: {before:?}");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same workers served the whole window"
    );
    let served: Vec<u64> = before.iter().map(|(pid, n)| after[pid] - n).collect();
    let (min, max) = (*served.iter().min().unwrap(), *served.iter().max().unwrap());
    eprintln!(
        "requests per worker over {WINDOW:?} after the reload: {served:?} (max/min {:.2}), \
         connections {connections:?}; {} connections opened, {} failed",
        max as f64 / min.max(1) as f64,
        report.connects,
        report.errors.len()
    );
    assert!(
        report.errors.is_empty(),
        "failed: {:?}",
        report.errors.first()
    );
    assert!(min > 0, "a worker served nothing: {served:?}");
    assert!(max <= 2 * min, "unbalanced: {served:?}");
}

/// Open connections per ready worker, by pid.
fn ready_connections(status: &StatusReport) -> BTreeMap<u32, u64> {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerStateName::Ready)
        .map(|w| (w.pid, w.connections))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_spread_over_the_new_workers_after_a_reload() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const SOCKETS: u64 = 10;
    let host = Host::start(
        &tests::example_plugin(&[]),
        HostOptions {
            workers: 2,
            ..Default::default()
        },
    )
    .await;
    let old = host.worker_pids(None).await;
    host.install_plugin(&tests::example_plugin(&[("EXAMPLE_GREETING", "v2")]));
    host.reload_ok().await;
    tests::wait_old_workers_gone(&old).await;
    let new = host.wait_for_workers(WorkerStateName::Ready).await;
    assert_eq!(new.len(), 2);
    // As on a busy machine: one worker shares its CPU with a busy loop, so the other, always
    // on a CPU when a connection arrives, wins every race to accept it unless it steps aside.
    // The loop runs at a lower priority: the starved worker loses the race to accept (it must
    // preempt the loop first) but is not kept off its CPU for the 20 ms a worker ahead steps
    // aside, which a loop of equal priority did once in a CI run beside other tests (7:3).
    let cpu = tests::first_allowed_cpu();
    tests::starve(new[0], &cpu, 0);
    let hogs = tests::Hogs::start(&cpu, 1);
    hogs.renice(10);
    hogs.wait_spinning().await;

    // One after another, each in use (an echo answered) before the next connects.
    let mut sockets = Vec::new();
    for i in 0..SOCKETS {
        let mut ws = tests::ws_connect(host.addr).await;
        assert_eq!(
            tests::ws_echo(&mut ws, &format!("{i}")).await,
            format!("gen=2 {i}")
        );
        sockets.push(ws);
    }
    let status = host
        .wait_status("every socket counted", |s| {
            ready_connections(s).values().sum::<u64>() == SOCKETS
        })
        .await;
    let split: Vec<u64> = ready_connections(&status).into_values().collect();
    eprintln!("{SOCKETS} WebSocket clients after a reload landed {split:?}");
    assert_eq!(split.len(), 2, "{status:?}");
    assert!(
        split.iter().all(|&n| n <= 6),
        "upgraded connections piled onto one worker: {split:?}"
    );
    drop(sockets);
    drop(hogs);
}
