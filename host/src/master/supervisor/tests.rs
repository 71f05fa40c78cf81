//! The supervisor's rollout and health decisions, without a process: a fake [`Effects`] records
//! what the transitions do, and tokio's paused clock stands in for time, so each test runs in
//! milliseconds. Events go in as the master's loop feeds them ([`Supervisor::handle`], then
//! [`Supervisor::on_timer`] at a deadline); each test asserts the exact effects, in order (what
//! was spawned, told to drain, killed, noticed), and what the callers were answered.

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::rollout::{SnapshotSource, Taken};
use super::*;
use crate::master::snapshot::{self, Snapshot};
use crate::protocol::{ControlResponse, MasterToWorker, StatusReport};

/// One effect, workers named by the pid the fake gave them. The spec every new worker is sent
/// is checked by the fake (exactly one, right after its spawn), not listed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Did {
    Spawn {
        pid: u32,
        slot: u32,
        generation: u64,
    },
    Drain(u32),
    Kill(u32),
    /// A snapshot taken off the loop, by ticket.
    Snapshot(u64),
    /// A [`Notice`], by kind.
    Notice(&'static str),
    /// `host start -d`'s line.
    Started(String),
}

#[derive(Default)]
struct World {
    did: Vec<Did>,
    pids: BTreeMap<WorkerId, u32>,
    /// Pids that were sent their spec.
    specs: HashSet<u32>,
    next_pid: u32,
}

/// The fake [`Effects`]: records, and does nothing.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn pid(&self, id: WorkerId) -> u32 {
        self.0.lock().unwrap().pids[&id]
    }
}

impl Effects for Fake {
    fn spawn_worker(&mut self, w: WorkerLaunch<'_>) -> std::io::Result<u32> {
        let mut world = self.0.lock().unwrap();
        let pid = 100 + world.next_pid;
        world.next_pid += 1;
        world.pids.insert(w.id, pid);
        world.did.push(Did::Spawn {
            pid,
            slot: w.slot,
            generation: w.generation,
        });
        Ok(pid)
    }

    fn send(&mut self, id: WorkerId, order: MasterToWorker) -> bool {
        let pid = self.pid(id);
        let mut world = self.0.lock().unwrap();
        match order {
            MasterToWorker::Start(spec) => {
                assert_eq!(
                    world.did.last(),
                    Some(&Did::Spawn {
                        pid,
                        slot: spec.slot,
                        generation: spec.generation
                    }),
                    "a spec right after its spawn"
                );
                assert!(world.specs.insert(pid), "one spec per worker");
            }
            MasterToWorker::Drain => world.did.push(Did::Drain(pid)),
            MasterToWorker::QueryStats => {}
        }
        true
    }

    fn kill(&mut self, id: WorkerId) {
        let pid = self.pid(id);
        self.0.lock().unwrap().did.push(Did::Kill(pid));
    }

    fn reaped(&mut self, _: WorkerId) {}

    fn take_snapshot(&mut self, ticket: u64, _: SnapshotSource, _: Arc<AtomicBool>) {
        self.0.lock().unwrap().did.push(Did::Snapshot(ticket));
    }

    fn prune_snapshots(&mut self, _: &HashSet<PathBuf>) {}

    fn notice(&mut self, notice: Notice) {
        let kind = match notice {
            Notice::Serving { .. } => "serving",
            Notice::StartFailed { .. } => "start_failed",
            Notice::Reloading { .. } => "reloading",
            Notice::Reloaded { .. } => "reloaded",
            Notice::Stopping => "stopping",
            Notice::Status(_) => "status",
            Notice::HandedOver { .. } => "handed_over",
        };
        self.0.lock().unwrap().did.push(Did::Notice(kind));
    }

    fn started(&mut self, line: &str) {
        self.0
            .lock()
            .unwrap()
            .did
            .push(Did::Started(line.to_string()));
    }

    fn successor_exe(&self) -> Option<String> {
        None
    }

    fn launch_successor(&mut self, _: &TcpListener, _: Duration) -> Result<u32, String> {
        Err("no successor in tests".into())
    }

    fn cancel_successor(&mut self) {}

    fn sweep_orphans(&mut self, _: Instant, _: Duration) {}

    fn orphans_pending(&self) -> (bool, Option<Instant>) {
        (false, None)
    }

    fn orphans_ended(&self) -> (u64, u64) {
        (0, 0)
    }

    fn rss_bytes(&self, _: u32) -> u64 {
        0
    }
}

/// A supervisor driven by hand.
struct Test {
    sup: Supervisor,
    fake: Fake,
}

const SPAWN: fn(u32, u32, u64) -> Did = |pid, slot, generation| Did::Spawn {
    pid,
    slot,
    generation,
};

fn exit_code(code: i32) -> std::process::ExitStatus {
    std::process::ExitStatus::from_raw(code << 8)
}

fn killed_by(signal: i32) -> std::process::ExitStatus {
    std::process::ExitStatus::from_raw(signal)
}

impl Test {
    /// Two workers (unless `config` says otherwise), started and serving generation 1 as pids
    /// 100 and 101.
    fn started(config: &str) -> Test {
        let workers = match config.lines().any(|l| l.starts_with("workers")) {
            true => "",
            false => "workers = 2\n",
        };
        let text = format!("plugin = \"app.so\"\n{workers}{config}");
        let cfg = crate::config::Config::parse(Path::new("/srv/app/host.toml"), &text).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake = Fake::default();
        let sup = Supervisor::new(Arc::new(cfg), listener, Box::new(fake.clone()));
        let mut t = Test { sup, fake };
        t.sup.begin(RolloutKind::Start, Vec::new());
        t.snapshot(1, 'a');
        let workers = t.sup.cfg.workers as u32;
        for n in 0..workers {
            t.ready(100 + n);
        }
        let mut expected = vec![Did::Snapshot(1)];
        expected.extend((0..workers).map(|n| SPAWN(100 + n, n, 1)));
        expected.extend([
            Did::Notice("serving"),
            Did::Started(format!(
                "serving http://{} with {workers} workers (generation 1, master pid {})",
                t.sup.cfg.listen,
                std::process::id()
            )),
        ]);
        assert_eq!(t.did(), expected);
        t
    }

    /// What the supervisor did since the last call.
    fn did(&self) -> Vec<Did> {
        std::mem::take(&mut self.fake.0.lock().unwrap().did)
    }

    fn id(&self, pid: u32) -> WorkerId {
        let world = self.fake.0.lock().unwrap();
        *world
            .pids
            .iter()
            .find(|(_, p)| **p == pid)
            .unwrap_or_else(|| panic!("no worker {pid}"))
            .0
    }

    fn event(&mut self, ev: Event) {
        self.sup.handle(ev);
        self.sup.recheck_listener_if_down();
    }

    fn from(&mut self, pid: u32, msg: WorkerToMaster) {
        let id = self.id(pid);
        self.event(Event::Worker { id, msg });
    }

    fn ready(&mut self, pid: u32) {
        let plugin = PluginInfo {
            name: "app".into(),
            version: "1.0.0".into(),
            api_version: "1.5".into(),
            sha256: String::new(),
        };
        let startup = StartupTimings::default();
        self.from(pid, WorkerToMaster::Ready { plugin, startup });
    }

    fn exited(&mut self, pid: u32, status: std::process::ExitStatus) {
        let id = self.id(pid);
        self.event(Event::Exited {
            id,
            status: Ok(status),
        });
    }

    /// The drain is acknowledged and the worker exits cleanly.
    fn drained(&mut self, pid: u32) {
        self.from(pid, WorkerToMaster::Draining);
        self.exited(pid, exit_code(0));
    }

    /// The snapshot of ticket `ticket` arrives: a plugin whose sha256 is `sha` 64 times.
    fn snapshot(&mut self, ticket: u64, sha: char) {
        let sha256: String = std::iter::repeat_n(sha, 64).collect();
        let taken = Taken {
            snapshot: Snapshot {
                path: PathBuf::from(format!("/srv/app/state/plugins/{sha256}.so")),
                sha256,
                size: 1,
                taken: snapshot::Taken::Copied,
            },
            config: PluginConfig::default(),
            ignored_keys: Vec::new(),
        };
        self.event(Event::SnapshotTaken {
            ticket,
            result: Ok(taken),
        });
    }

    fn control(&mut self, request: ControlRequest) -> oneshot::Receiver<ControlResponse> {
        let (reply, answer) = oneshot::channel();
        self.event(Event::Control { request, reply });
        answer
    }

    /// `host reload` of a new build, whose first worker (pid 102, slot 0) became ready and
    /// replaced slot 0's old worker (told to drain); returns the caller's answer to come, and
    /// what was done past that.
    fn reload_first_ready(&mut self) -> (oneshot::Receiver<ControlResponse>, Vec<Did>) {
        let reload = self.control(ControlRequest::Reload);
        self.snapshot(2, 'b');
        self.ready(102);
        let did = self.did();
        let first = [
            Did::Notice("reloading"),
            Did::Snapshot(2),
            SPAWN(102, 0, 2),
            Did::Drain(100),
        ];
        assert_eq!(did[..first.len().min(did.len())], first);
        (reload, did[first.len()..].to_vec())
    }

    /// Lets `by` pass on the paused clock and runs the timers, as the loop does at a deadline.
    async fn after(&mut self, by: Duration) {
        tokio::time::advance(by).await;
        self.sup.on_timer(Instant::now());
        self.sup.recheck_listener_if_down();
    }

    fn status(&mut self) -> StatusReport {
        let (reply, mut answer) = oneshot::channel();
        self.sup.answer_status(reply);
        match answer.try_recv() {
            Ok(ControlResponse::Status(s)) => *s,
            other => panic!("not a status: {other:?}"),
        }
    }

    /// Asserts that `status` shows exactly these workers, each ready: (pid, generation).
    fn assert_ready(&mut self, expected: &[(u32, u64)]) {
        let mut w: Vec<_> = self
            .status()
            .workers
            .iter()
            .map(|w| (w.pid, w.generation, w.state))
            .collect();
        w.sort_by_key(|w| w.0);
        let expected: Vec<_> = expected
            .iter()
            .map(|&(pid, generation)| (pid, generation, WorkerStateName::Ready))
            .collect();
        assert_eq!(w, expected);
    }
}

/// The answer a caller got, which must have come by now.
fn answer(rx: &mut oneshot::Receiver<ControlResponse>) -> ControlResponse {
    rx.try_recv().expect("answered")
}

/// The report of a reload to generation 2 that failed, saying `why`, with generation 1 still
/// serving: its caller must have been told by now.
fn failed(rx: &mut oneshot::Receiver<ControlResponse>, why: &str) -> crate::protocol::ReloadReport {
    let report = match answer(rx) {
        ControlResponse::ReloadFailed(report) => report,
        other => panic!("not a failed rollout: {other:?}"),
    };
    assert_eq!((report.generation, report.serving_generation), (2, 1));
    assert!(
        report.error.as_deref().is_some_and(|e| e.contains(why)),
        "no {why:?} in {report:?}"
    );
    report
}

fn unanswered(rx: &mut oneshot::Receiver<ControlResponse>) -> bool {
    matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
}

#[tokio::test(start_paused = true)]
async fn a_canary_that_cannot_start_is_refused_and_no_old_worker_is_touched() {
    let mut t = Test::started("");
    let mut reload = t.control(ControlRequest::Reload);
    assert_eq!(t.did(), [Did::Notice("reloading"), Did::Snapshot(2)]);
    t.snapshot(2, 'b');
    assert_eq!(t.did(), [SPAWN(102, 0, 2)]);
    t.from(
        102,
        WorkerToMaster::StartFailed {
            reason: "on_worker_start returned an error".into(),
        },
    );
    assert_eq!(t.did(), [Did::Kill(102), Did::Notice("reloaded")]);
    let report = failed(&mut reload, "on_worker_start returned an error");
    assert!(report.drained_pids.is_empty());
    t.exited(102, killed_by(9));
    assert_eq!(t.did(), []);
    let status = t.status();
    assert_eq!(status.generation, 1);
    t.assert_ready(&[(100, 1), (101, 1)]);
    // The refused build is remembered; the number was used (its snapshot was taken).
    assert_eq!(t.sup.last_refused.as_ref().map(|(s, _)| &s[..1]), Some("b"));
    let _again = t.control(ControlRequest::Reload);
    assert_eq!(t.did(), [Did::Notice("reloading"), Did::Snapshot(3)]);
    t.snapshot(3, 'c');
    assert_eq!(t.did(), [SPAWN(103, 0, 3)]);
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_fails_past_its_canary_reverts_the_moved_slots_new_before_old() {
    let mut t = Test::started("canary_workers = 0\n");
    // Slot 0 moved: its old worker drains, and slot 1's candidate starts.
    let (mut reload, did) = t.reload_first_ready();
    assert_eq!(did, [SPAWN(103, 1, 2)]);
    t.drained(100);
    assert_eq!(t.did(), []);
    // Slot 1's candidate fails: killed, and slot 0 goes back to generation 1, new before old.
    t.exited(103, exit_code(1));
    assert_eq!(t.did(), [SPAWN(104, 0, 1)]);
    assert!(unanswered(&mut reload), "answered when the revert is done");
    t.ready(104);
    assert_eq!(t.did(), [Did::Drain(102)]);
    t.drained(102);
    assert_eq!(t.did(), [Did::Notice("reloaded")]);
    let report = failed(&mut reload, "worker exited with status 1 during start");
    assert_eq!(report.started_pids, [102, 104]);
    assert_eq!(report.drained_pids, [100, 102]);
    assert_eq!(t.status().generation, 1);
    t.assert_ready(&[(101, 1), (104, 1)]);
}

#[tokio::test(start_paused = true)]
async fn reloads_asked_during_a_reload_wait_for_it_and_share_one_rollout() {
    let mut t = Test::started("workers = 1\ncanary_workers = 0\n");
    let mut first = t.control(ControlRequest::Reload);
    assert_eq!(t.did(), [Did::Notice("reloading"), Did::Snapshot(2)]);
    let mut second = t.control(ControlRequest::Reload);
    let mut third = t.control(ControlRequest::Reload);
    assert_eq!(t.did(), [], "queued: no snapshot, no worker");
    t.snapshot(2, 'b');
    t.ready(101);
    t.drained(100);
    assert!(matches!(answer(&mut first), ControlResponse::Reloaded(r) if r.generation == 2));
    assert!(unanswered(&mut second) && unanswered(&mut third));
    // The two queued requests begin one rollout together, right after the first.
    assert_eq!(
        t.did(),
        [
            SPAWN(101, 0, 2),
            Did::Drain(100),
            Did::Notice("reloaded"),
            Did::Notice("reloading"),
            Did::Snapshot(3)
        ]
    );
    t.snapshot(3, 'c');
    t.ready(102);
    t.drained(101);
    assert_eq!(
        t.did(),
        [SPAWN(102, 0, 3), Did::Drain(101), Did::Notice("reloaded")]
    );
    for rx in [&mut second, &mut third] {
        assert!(matches!(answer(rx), ControlResponse::Reloaded(r) if r.generation == 3));
    }
    t.assert_ready(&[(102, 3)]);
}

#[tokio::test(start_paused = true)]
async fn stop_during_a_rollout_kills_the_candidate_drains_the_rest_and_refuses_the_queue() {
    let mut t = Test::started("canary_workers = 0\n");
    let (mut reload, did) = t.reload_first_ready();
    assert_eq!(did, [SPAWN(103, 1, 2)]);
    let mut queued = t.control(ControlRequest::Rollback);
    assert_eq!(t.did(), []);
    let mut stop = t.control(ControlRequest::Stop);
    assert_eq!(
        t.did(),
        [
            Did::Notice("stopping"),
            Did::Kill(103),
            Did::Notice("reloaded"),
            Did::Drain(101),
            Did::Drain(102)
        ]
    );
    assert!(
        matches!(answer(&mut reload), ControlResponse::ReloadFailed(r)
        if r.error.as_deref() == Some("interrupted: host is stopping"))
    );
    assert!(
        matches!(answer(&mut queued), ControlResponse::Refused { reason }
        if reason == "host is stopping")
    );
    // A reload now is refused at once; stopped once every worker is gone.
    let mut late = t.control(ControlRequest::Reload);
    assert!(matches!(answer(&mut late), ControlResponse::Refused { .. }));
    for pid in [100, 101, 102] {
        t.drained(pid);
    }
    assert!(
        t.sup.finished().is_none(),
        "the killed candidate is not reaped yet"
    );
    t.exited(103, killed_by(9));
    assert!(matches!(t.sup.finished(), Some(Ok(Exit::Stopped))));
    assert!(matches!(answer(&mut stop), ControlResponse::Stopped { .. }));
    assert_eq!(t.did(), []);
}

#[tokio::test(start_paused = true)]
async fn a_recycle_asked_during_a_reload_is_merged_into_it() {
    let mut t = Test::started("canary_workers = 0\n");
    let _reload = t.control(ControlRequest::Reload);
    t.snapshot(2, 'b');
    t.did();
    // Worker 100 asks to be replaced while the reload is about to replace it anyway.
    let recycle_me = || WorkerToMaster::RecycleMe {
        reason: "max_requests".into(),
        by_plugin: false,
    };
    t.from(100, recycle_me());
    assert_eq!(t.did(), [], "waits for the reload");
    t.ready(102);
    t.drained(100);
    t.ready(103);
    t.drained(101);
    assert_eq!(
        t.did(),
        [
            Did::Drain(100),
            SPAWN(103, 1, 2),
            Did::Drain(101),
            Did::Notice("reloaded")
        ],
        "no recycle of its own after the reload"
    );
    // Outside a rollout, a recycle is a one-slot rollout onto the same generation.
    t.from(103, recycle_me());
    assert_eq!(t.did(), [SPAWN(104, 1, 2)]);
    t.from(102, recycle_me());
    assert_eq!(t.did(), [], "one recycle at a time");
    t.ready(104);
    t.drained(103);
    assert_eq!(t.did(), [Did::Drain(103), SPAWN(105, 0, 2)]);
    t.ready(105);
    t.drained(102);
    assert_eq!(t.did(), [Did::Drain(102)]);
    let status = t.status();
    assert_eq!(status.generation, 2);
    assert_eq!(
        status.slots.iter().map(|s| s.recycles).collect::<Vec<_>>(),
        [1, 1]
    );
    assert_eq!(
        status.last_reload.map(|r| r.kind).as_deref(),
        Some("reload"),
        "a recycle is not a reload"
    );
}

/// Two workers, a canary of one judged for 30 s.
const CANARY: &str = "canary_workers = 1\ncanary_analysis = \"30s\"\nworker_timeout = \"1s\"\n";

#[tokio::test(start_paused = true)]
async fn a_canary_that_crashes_is_condemned_and_its_slot_reverted() {
    let mut t = Test::started(CANARY);
    let (mut reload, did) = t.reload_first_ready();
    assert_eq!(
        did,
        [Did::Notice("status")],
        "held for the analysis after one worker"
    );
    assert!(t.sup.judging.is_some());
    t.drained(100);
    t.from(101, WorkerToMaster::Heartbeat);
    // The canary dies while serving: its slot is refilled at once, then the verdict.
    t.exited(102, killed_by(11));
    assert_eq!(t.did(), [SPAWN(103, 0, 2)]);
    t.after(Duration::ZERO).await;
    assert_eq!(
        t.did(),
        [Did::Notice("status"), SPAWN(104, 0, 1)],
        "condemned: slot 0 goes back to generation 1"
    );
    assert!(unanswered(&mut reload));
    // The refill is ready first and serves the slot; the revert's worker replaces it.
    t.ready(103);
    t.ready(104);
    assert_eq!(t.did(), [Did::Drain(103)]);
    assert!(unanswered(&mut reload));
    t.drained(103);
    assert_eq!(t.did(), [Did::Notice("reloaded")]);
    let report = failed(&mut reload, "judged worse than generation 1");
    let verdict = report.verdict.expect("a verdict");
    assert_eq!(
        (verdict.generation, verdict.outcome.as_str()),
        (2, "rolled_back")
    );
    assert_eq!(verdict.canary.crashes, 1);
    assert!(
        verdict.reason.contains("crashed or hung"),
        "{}",
        verdict.reason
    );
    assert_eq!(t.sup.last_verdict.as_ref().map(|v| v.generation), Some(2));
    t.assert_ready(&[(101, 1), (104, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_hung_canary_is_killed_condemned_and_its_slot_reverted() {
    let mut t = Test::started(CANARY);
    let (mut reload, did) = t.reload_first_ready();
    assert_eq!(did, [Did::Notice("status")]);
    t.drained(100);
    // The old worker beats; the canary falls silent past worker_timeout.
    t.after(Duration::from_millis(600)).await;
    t.from(101, WorkerToMaster::Heartbeat);
    t.after(Duration::from_millis(300)).await;
    assert_eq!(t.did(), [], "silent for 900 ms: not hung yet");
    t.after(Duration::from_millis(200)).await;
    assert_eq!(
        t.did(),
        [
            Did::Kill(102),
            SPAWN(103, 0, 2),
            Did::Notice("status"),
            SPAWN(104, 0, 1)
        ],
        "killed as hung, its slot refilled, then condemned"
    );
    assert_eq!(t.status().slots[0].state, "hung");
    t.ready(104);
    t.exited(102, killed_by(9));
    t.from(103, WorkerToMaster::StartFailed { reason: "x".into() });
    assert_eq!(t.did(), [Did::Notice("reloaded"), Did::Kill(103)]);
    let report = failed(&mut reload, "judged worse than generation 1");
    let verdict = report.verdict.expect("a verdict");
    assert_eq!(
        (verdict.outcome.as_str(), verdict.canary.crashes),
        ("rolled_back", 1)
    );
    assert_eq!(t.status().slots[0].state, "serving");
}
