//! Plugin faults never take the service down: a handler that wedges its worker's I/O thread (or
//! a worker stopped with SIGSTOP) is found by the watchdog and replaced; the requests that wedged
//! the workers, left in the listen backlog by clients that gave up, do not wedge the
//! replacements; and a storm of requests that end their worker's process costs those workers,
//! not the service.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use host_status::{StatusReport, WorkerStateName};
use tests::{Host, HostOptions, Load, LoadError, Mode, example_plugin, pid_alive, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One `GET path` on a fresh connection, written by hand with `Connection: close` and read to
/// the end. After `timeout` it gives up and closes its socket, as an impatient client does.
async fn get_within(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no response ({} bytes)", buf.len()))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        Ok((status, body))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Pids of the log lines that contain `what` (the `pid=` field the master writes).
fn logged_pids(log: &str, what: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let digits: String = l
                .split_once(" pid=")?
                .1
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// The timestamp of the first log line that contains every one of `what`.
fn logged_at(log: &str, what: &[&str]) -> Option<SystemTime> {
    let line = log.lines().find(|l| what.iter().all(|w| l.contains(w)))?;
    humantime::parse_rfc3339(line.split_whitespace().nth(1)?).ok()
}

fn ready_pids(status: &StatusReport) -> Vec<u32> {
    tests::worker_pids_in(status, Some(WorkerStateName::Ready))
}

fn shows_hung(status: &StatusReport) -> bool {
    status
        .workers
        .iter()
        .any(|w| w.state == WorkerStateName::Hung)
        || status.slots.iter().any(|s| s.state == "hung")
}

enum Wedge {
    /// `GET /spin?ms=600000`: a handler declared non-blocking that never returns.
    Spin,
    /// `kill -STOP` of one worker.
    Stop,
}

/// 2 workers with `worker_timeout = "2s"` under keep-alive load; one is wedged. It must be
/// logged as hung, killed and replaced within 4 s, while the other keeps answering.
///
/// What the load may lose: each client has one request in flight. The clients whose
/// connection is on the wedged worker wait for it, and lose that request when it is killed
/// (the process dies with it). So may a client whose new connection the worker accepted just
/// before it wedged. Any other failure (a connection known to be on the other worker, a
/// second loss for a client, a non-200) is a bug.
async fn a_wedged_worker_is_replaced(wedge: Wedge) {
    const CLIENTS: usize = 8;
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            workers: 2,
            extra: "worker_timeout = \"2s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let before = host.worker_pids(Some(WorkerStateName::Ready)).await;
    assert_eq!(before.len(), 2);
    let load = Load::start(host.addr, CLIENTS, Mode::KeepAlive, "/");
    // The clients connect in a burst that may land on one worker; the balance spreads them.
    host.wait_status("the load clients on both workers", |s| {
        s.workers.iter().all(|w| w.connections >= 2)
    })
    .await;
    load.advance(200).await;

    let wedged_at = Instant::now();
    let wedged_wall = SystemTime::now();
    let spinning = matches!(wedge, Wedge::Spin);
    let spin = match wedge {
        Wedge::Spin => {
            let addr = host.addr;
            Some(tokio::spawn(async move {
                get_within(addr, "/spin?ms=600000", Duration::from_secs(1)).await
            }))
        }
        Wedge::Stop => {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(before[0] as i32),
                nix::sys::signal::Signal::SIGSTOP,
            )
            .unwrap();
            None
        }
    };

    // Until a new worker is ready: which one was found hung, and whether status showed it.
    let mut saw_hung = false;
    let deadline = wedged_at + Duration::from_secs(10);
    let (hung, replacement, seen_after) = loop {
        let (_, status) = host.raw_status().await;
        saw_hung |= shows_hung(&status);
        let ready = ready_pids(&status);
        let hung = logged_pids(&host.log(), "worker hung").first().copied();
        if let Some(hung) = hung
            && ready.len() == 2
            && !ready.contains(&hung)
            && let Some(new) = ready.iter().find(|p| !before.contains(p))
        {
            break (hung, *new, wedged_at.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "no replacement within 10 s; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if let Wedge::Stop = wedge {
        assert_eq!(hung, before[0], "the stopped worker is the hung one");
    }
    assert!(before.contains(&hung), "{hung} is one of {before:?}");
    let other = *before.iter().find(|p| **p != hung).unwrap();
    // Timed by the master's own log (status polls wait up to 300 ms for the hung worker).
    let log = host.log();
    let since_wedge = |what: &[&str]| {
        logged_at(&log, what)
            .and_then(|t| t.duration_since(wedged_wall).ok())
            .unwrap_or_else(|| panic!("no log line with {what:?}"))
    };
    let found_hung_after = since_wedge(&["worker hung", &format!("pid={hung}")]);
    let replaced_after = since_wedge(&["worker ready", &format!("pid={replacement}")]);
    assert!(
        replaced_after <= Duration::from_secs(4),
        "replaced after {replaced_after:?}, more than worker_timeout + 2 s"
    );
    wait_until(Duration::from_secs(5), "the hung worker to be gone", || {
        !pid_alive(hung)
    })
    .await;
    if let Some(spin) = spin {
        let answer = spin.await.unwrap();
        assert!(answer.is_err(), "the spin never answers: {answer:?}");
    }
    wait_until(Duration::from_secs(10), "the replacement to answer", || {
        load.served_by(replacement)
    })
    .await;
    load.advance(200).await;
    let report = load.finish().await;

    let log = host.log();
    let line = log
        .lines()
        .find(|l| l.contains("worker hung"))
        .expect("a hung line");
    assert!(
        line.contains(&format!("pid={hung}")) && line.contains("worker_timeout 2s"),
        "{line}"
    );
    // The evidence: a spinning worker's line names the request that wedged it; a stopped one's
    // says what it was serving (its clients' requests, or none).
    let named = if spinning {
        "; in flight: GET /spin ("
    } else {
        "; in flight: "
    };
    assert!(line.contains(named), "{line}");
    let answered_while_hung = report
        .answers
        .iter()
        .filter(|a| a.worker == Some(other) && a.at > wedged_at && a.at < wedged_at + seen_after)
        .count();
    assert!(
        answered_while_hung > 0,
        "the other worker answered nothing while one was hung"
    );
    let mut lost_per_client = BTreeMap::<usize, usize>::new();
    for l in &report.errors {
        *lost_per_client.entry(l.client).or_default() += 1;
    }
    let elsewhere: Vec<&LoadError> = report
        .errors
        .iter()
        .filter(|l| l.worker.is_some_and(|s| s != hung))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests lost on workers that were not hung: {elsewhere:?}"
    );
    assert!(
        lost_per_client.values().all(|n| *n <= 1),
        "a client lost more than the one request it had on the hung worker: {:?}",
        report.errors
    );
    assert!(report.non_200.is_empty(), "{:?}", report.non_200);
    eprintln!(
        "found hung after {found_hung_after:?}, replacement ready after {replaced_after:?}, seen in status after {seen_after:?} (status showed hung: {saw_hung}); {} answered, {} of them by the other worker while one was hung; lost with the hung worker: {} of {CLIENTS} clients ({:?})",
        report.ok,
        answered_while_hung,
        report.errors.len(),
        report.errors.first().map(|l| &l.error)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_spins_forever_gets_its_worker_replaced() {
    a_wedged_worker_is_replaced(Wedge::Spin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_worker_is_replaced() {
    a_wedged_worker_is_replaced(Wedge::Stop).await;
}

/// Every worker wedged by `/spin` requests whose clients give up after 1 s (more of them wait
/// in the backlog): the replacements drop those dead requests unread instead of running them,
/// so `/` answers within `worker_timeout` + 2 s and keeps answering. (Without the check at
/// accept, each replacement ran the next dead `/spin` and wedged in turn: 8 hung workers
/// instead of 2.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_whose_clients_are_gone_do_not_wedge_the_replacements() {
    // The watchdog may find a worker as early as `worker_timeout` minus one beat (750 ms here)
    // after it wedged: 3 s leaves every spin's client (gone 1.1 s in) well out of the way.
    const WORKER_TIMEOUT: Duration = Duration::from_secs(3);
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            workers: 2,
            extra: "worker_timeout = \"3s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let addr = host.addr;
    assert_eq!(
        get_within(addr, "/", Duration::from_secs(5))
            .await
            .unwrap()
            .0,
        200
    );

    // 8 spins over 70 ms: the first ones wedge both workers (a wedged worker accepts nothing
    // more), the rest wait in the backlog. Every one of their clients has given up 1.1 s in,
    // before the watchdog can start a replacement.
    let began = Instant::now();
    let mut spins = Vec::new();
    for _ in 0..8 {
        spins.push(tokio::spawn(async move {
            get_within(addr, "/spin?ms=600000", Duration::from_secs(1)).await
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Probe until `/` answers again; each probe gives up after 500 ms (and so joins the
    // backlog's dead connections).
    let (mut probes, mut first_ok) = (0, None);
    while began.elapsed() < Duration::from_secs(10) {
        probes += 1;
        if let Ok((200, _)) = get_within(addr, "/", Duration::from_millis(500)).await {
            first_ok = Some(began.elapsed());
            break;
        }
    }
    let first_ok = first_ok.unwrap_or_else(|| panic!("/ never answered again\n{}", host.log()));
    for spin in spins {
        assert!(spin.await.unwrap().is_err(), "a spin answered");
    }
    assert!(
        first_ok <= WORKER_TIMEOUT + Duration::from_secs(2),
        "/ answered again after {first_ok:?}, more than worker_timeout + 2 s"
    );
    wait_until(
        Duration::from_secs(10),
        "both workers to be found hung",
        || logged_pids(&host.log(), "worker hung").len() >= 2,
    )
    .await;

    // And it stays up: 3 s of requests, every one answered.
    let (mut ok, mut failed) = (0, Vec::new());
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(3) {
        match get_within(addr, "/", Duration::from_secs(2)).await {
            Ok((200, _)) => ok += 1,
            other => failed.push(other),
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    let log = host.log();
    assert_eq!(
        logged_pids(&log, "worker hung").len(),
        2,
        "no replacement was wedged by a dead request"
    );
    assert!(
        log.contains("dropped connections whose client closed before they were accepted"),
        "the dead requests were dropped"
    );
    eprintln!(
        "/ answered again {first_ok:?} after the first spin ({probes} probes), then {ok} of {ok} in 3 s"
    );
}

/// 4 workers, 40 `GET /exit` (each ends its worker's process) over 10 s, while a client sends
/// `GET /` on fresh connections the whole time: at least 98% answered, never a second without
/// an answer, and no slot ever backs off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_crashing_requests_never_empties_the_service() {
    const EXITS: usize = 40;
    let host = Host::start(
        &example_plugin(&[]),
        HostOptions {
            workers: 4,
            ..Default::default()
        },
    )
    .await;
    let addr = host.addr;
    let stop = Arc::new(AtomicBool::new(false));

    // The client: `GET /` on a fresh connection, back to back.
    let client = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut answered, mut failed) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match get_within(addr, "/", Duration::from_secs(2)).await {
                    Ok((200, _)) => answered.push(Instant::now()),
                    other => failed.push(other),
                }
            }
            (answered, failed)
        }
    });
    // `status` the whole time: no slot may show as failing (backing off).
    let watcher = {
        let stop = stop.clone();
        let socket_host = &host;
        async move {
            let (mut polls, mut failing, mut starting) = (0, Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let (_, status) = socket_host.raw_status().await;
                polls += 1;
                for slot in status.slots {
                    match slot.state.as_str() {
                        "failing" => failing.push(slot),
                        "starting" => starting += 1,
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (polls, failing, starting)
        }
    };
    let storm = async {
        let began = Instant::now();
        let mut exits = Vec::new();
        for i in 0..EXITS {
            let at = began + Duration::from_millis(250 * i as u64);
            tokio::time::sleep_until(at.into()).await;
            exits.push(tokio::spawn(async move {
                get_within(addr, "/exit", Duration::from_secs(5)).await
            }));
        }
        tokio::time::sleep_until((began + Duration::from_secs(10)).into()).await;
        let mut unanswered = 0;
        for e in exits {
            if e.await.unwrap().is_err() {
                unanswered += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        (began, unanswered)
    };
    let ((began, unanswered), (polls, failing, starting)) = tokio::join!(storm, watcher);
    let ended = Instant::now();
    let (answered, failed) = client.await.unwrap();

    let total = answered.len() + failed.len();
    let rate = answered.len() as f64 / total as f64;
    let mut gaps: Vec<Duration> = answered.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.push(
        answered
            .first()
            .map_or(ended - began, |t| t.saturating_duration_since(began)),
    );
    gaps.push(answered.last().map_or(ended - began, |t| ended - *t));
    let worst_gap = gaps.into_iter().max().unwrap();

    let status = host.status().await;
    let crashes: Vec<u64> = status.slots.iter().map(|s| s.crashes).collect();
    let log = host.log();
    let died = log
        .lines()
        .filter(|l| l.contains("worker died: exited with status 3"))
        .count();
    eprintln!(
        "{EXITS} /exit in 10 s: {} of {total} GET / answered ({:.2}%), longest gap {worst_gap:?}; crashes per slot {crashes:?}; {polls} status polls, {starting} saw a slot starting, {} failing",
        answered.len(),
        rate * 100.0,
        failing.len()
    );
    assert_eq!(unanswered, EXITS, "every /exit ended its worker");
    assert!(died >= EXITS - 2, "{died} crashes logged for {EXITS} /exit");
    assert_eq!(crashes.iter().sum::<u64>(), died as u64, "{crashes:?}");
    assert!(
        log.contains("slot_crashes="),
        "the log says how often each slot crashed"
    );
    assert!(rate >= 0.98, "{rate}: {:?}", &failed[..failed.len().min(5)]);
    assert!(
        worst_gap <= Duration::from_secs(1),
        "{worst_gap:?} without an answer"
    );
    assert!(failing.is_empty(), "slots backed off: {failing:?}");
    assert_eq!(ready_pids(&status).len(), 4, "{status:?}");
}

/// The guard: a generation whose workers die right after every ready is not respawned as fast
/// as it starts. A slot gets 3 immediate refills, then one per 100 ms; past that it is in a
/// crash loop and backs off like a start failure, while the other slot serves. It recovers
/// once its workers stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generation_that_dies_after_every_ready_backs_off() {
    let (host, marker) = tests::fixture_host_with_marker("FIXTURE_EXIT_MARKER").await;
    let before = host.worker_pids(Some(WorkerStateName::Ready)).await;
    // From now on every new worker ends its process just after it reported ready.
    std::fs::write(&marker, b"exit").unwrap();
    let began = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = host
        .wait_status("the slot to back off as a crash loop", |s| {
            s.slots
                .iter()
                .any(|s| s.state == "failing" && s.failures >= 3)
        })
        .await;
    let elapsed = began.elapsed();
    let log = host.log();
    let failing = status.slots.iter().find(|s| s.state == "failing").unwrap();
    assert!(
        failing
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("crash loop") && e.contains("exited with status 4")),
        "{status:?}"
    );
    // Workers that reported ready after the kill, all in the crash-looping slot: 3 at once,
    // then at most one per 100 ms, then the backoff.
    let restarts = log.lines().filter(|l| l.contains("worker ready")).count() - 2;
    let at_most = 3 + (elapsed.as_millis() / 100) as usize + 1;
    assert!(
        restarts <= at_most,
        "{restarts} restarts in {elapsed:?} (at most {at_most})"
    );
    // The other slot serves throughout.
    assert_eq!(host.body("/").await, "fixture ok\n");

    std::fs::remove_file(&marker).unwrap();
    host.wait_status("the slot to serve again", |s| {
        ready_pids(s).len() == 2 && s.slots.iter().all(|s| s.state == "serving")
    })
    .await;
    eprintln!("crash loop: {restarts} restarts in {elapsed:?} before 3 backoff steps");
}
