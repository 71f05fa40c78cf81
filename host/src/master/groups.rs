//! Worker groups: one [`Supervisor`] per `[[group]]` of the config file, under one master.
//!
//! Each group's supervisor is the whole state machine of a one-group host (its listener,
//! workers, generations and snapshots, canary, rollback, crash policy, watchdog, recycling,
//! worker table), with an event channel of its own: its workers, its snapshots, its watcher and
//! its upgrade launcher talk to it alone, so nothing one group does (a refused canary, a crash
//! storm, a hung worker) is ever an event of another. They run as tasks of the master's one
//! thread.
//!
//! This module owns the routing of what is shared: it takes the master's events (signals,
//! control requests, metrics scrapes, SIGCHLD) and hands each to its group, or to every group
//! (`SIGHUP`, stop, status, `/metrics`: answers are gathered and merged off this loop, in
//! tasks), and it folds the groups' [`Notice`]s into the master's (serving once every group
//! serves; one `STATUS=` line naming every group; a start that failed in one group stops the
//! others). It never supervises a worker and never decides a rollout.
//!
//! The first group is the lead: `host upgrade` (and `SIGUSR2`) goes to it, and it hands every
//! group's listener to the new master; once it handed over, the other groups drain too.
//! Requests without a group name (from a client of before groups) go to the lead as well,
//! except `status`, `stop` and `upgrade`, which are the master's.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::supervisor::{Event, Exit, Notice, SignalAction, Supervisor};
use crate::config::Config;
use crate::protocol::{ControlRequest, ControlResponse};

/// One group's supervisor, as the router sees it.
pub(crate) struct Member {
    pub name: String,
    /// From a `[[group]]` table (else the file's one group: its metrics carry no `group`).
    pub explicit: bool,
    /// Its supervisor's own event channel.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A group's supervisor with its channel, ready to run.
pub(crate) struct Prepared {
    pub cfg: Arc<Config>,
    pub supervisor: Supervisor,
    pub events: mpsc::UnboundedSender<Event>,
    pub rx: mpsc::UnboundedReceiver<Event>,
    /// What its supervisor's `Effects` (`master::system`) tell the master.
    pub notices: mpsc::UnboundedReceiver<Notice>,
}

/// The groups' notices, folded into the master's.
struct Notices {
    /// Each group's last status line (`None`: not serving yet).
    status: Vec<Option<String>>,
    names: Vec<String>,
    out: mpsc::UnboundedSender<Notice>,
    start_notify: Option<std::fs::File>,
    serving: bool,
    failed: bool,
    /// `STOPPING=1` was sent, or is not to be (the lead handed over).
    stopping_told: bool,
}

impl Notices {
    /// One line for every group: the group's own line when there is one group.
    fn line(&self) -> String {
        if self.names.len() == 1 {
            return self.status[0].clone().unwrap_or_default();
        }
        self.names
            .iter()
            .zip(&self.status)
            .map(|(name, s)| {
                let s = s.as_deref().unwrap_or("starting");
                format!("{name}: {}", s.strip_prefix("serving ").unwrap_or(s))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn notify_started(&mut self, line: &str) {
        use std::io::Write as _;
        if let Some(mut f) = self.start_notify.take() {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Folds group `i`'s notice in; returns what the other groups must do (stop: a group could
    /// not start, or the lead handed over).
    fn fold(&mut self, i: usize, notice: Notice) -> Option<&'static str> {
        let out = self.out.clone();
        let send = |n: Notice| {
            let _ = out.send(n);
        };
        match notice {
            Notice::Serving { status } => {
                self.status[i] = Some(status);
                if !self.serving && !self.failed && self.status.iter().all(Option::is_some) {
                    self.serving = true;
                    let line = self.line();
                    let notify = match self.names.len() {
                        1 => line.clone(),
                        _ => format!("serving {line}"),
                    };
                    self.notify_started(&notify);
                    send(Notice::Serving { status: line });
                }
                None
            }
            Notice::StartFailed { reason } => {
                let reason = match self.names.len() {
                    1 => reason,
                    _ => format!("group {:?}: {reason}", self.names[i]),
                };
                if self.failed {
                    return None;
                }
                self.failed = true;
                self.notify_started(&format!("error: {reason}"));
                send(Notice::StartFailed { reason });
                Some("another group could not start")
            }
            Notice::Reloading { status } => {
                self.status[i] = Some(status);
                send(Notice::Reloading {
                    status: self.line(),
                });
                None
            }
            Notice::Reloaded { status } => {
                self.status[i] = Some(status);
                send(Notice::Reloaded {
                    status: self.line(),
                });
                None
            }
            Notice::Status(status) => {
                self.status[i] = Some(status);
                send(Notice::Status(self.line()));
                None
            }
            // Once: every group stops together, and not after a hand-over.
            Notice::Stopping => {
                if !self.stopping_told {
                    self.stopping_told = true;
                    send(Notice::Stopping);
                }
                None
            }
            Notice::HandedOver { new_pid } => {
                self.stopping_told = true;
                send(Notice::HandedOver { new_pid });
                Some("handed over to a new master")
            }
        }
    }
}

/// Runs every group's supervisor and routes the master's events until every group is done.
/// Returns the lead's exit, or the first group's failure.
pub(crate) async fn run(
    prepared: Vec<Prepared>,
    mut events: mpsc::UnboundedReceiver<Event>,
    notices: Option<mpsc::UnboundedSender<Notice>>,
    start_notify: Option<std::fs::File>,
) -> Result<Exit, String> {
    let (notice_tx, mut notice_rx) = mpsc::unbounded_channel::<(usize, Notice)>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Result<Exit, String>)>();
    let mut members = Vec::new();
    let mut relays = Vec::new();
    let (out, _keep) = match notices {
        Some(tx) => (tx, None),
        None => {
            let (tx, rx) = mpsc::unbounded_channel();
            (tx, Some(rx))
        }
    };
    let mut folded = Notices {
        status: vec![None; prepared.len()],
        names: prepared.iter().map(|p| p.cfg.group.clone()).collect(),
        out,
        start_notify,
        serving: false,
        failed: false,
        stopping_told: false,
    };
    for (i, p) in prepared.into_iter().enumerate() {
        let mut rx = p.notices;
        let notice_tx = notice_tx.clone();
        // Ends once the group's supervisor is gone (its sender with it), every notice passed on.
        relays.push(tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                if notice_tx.send((i, n)).is_err() {
                    break;
                }
            }
        }));
        let supervisor = p.supervisor;
        // A file without groups logs as before groups.
        let span = match p.cfg.explicit_group {
            true => tracing::info_span!("group", group = %p.cfg.group),
            false => tracing::Span::none(),
        };
        let done_tx = done_tx.clone();
        let rx = p.rx;
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let outcome = supervisor.run(rx).await;
                let _ = done_tx.send((i, outcome));
            },
            span,
        ));
        members.push(Member {
            name: p.cfg.group.clone(),
            explicit: p.cfg.explicit_group,
            events: p.events,
        });
    }
    drop(notice_tx);
    let mut outcomes: Vec<Option<Result<Exit, String>>> = members.iter().map(|_| None).collect();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => route(&members, ev),
                None => return Err("the event channel closed".into()),
            },
            Some((i, notice)) = notice_rx.recv() => {
                if let Some(why) = folded.fold(i, notice) {
                    stop_others(&members, i, why);
                }
            }
            Some((i, outcome)) = done_rx.recv() => {
                if outcome.is_err() {
                    stop_others(&members, i, "another group failed");
                }
                outcomes[i] = Some(outcome);
                if outcomes.iter().all(Option::is_some) {
                    break;
                }
            }
        }
    }
    // Let the last notices through before the master's side tasks end.
    for relay in relays {
        let _ = relay.await;
    }
    while let Ok((i, notice)) = notice_rx.try_recv() {
        folded.fold(i, notice);
    }
    let outcomes: Vec<Result<Exit, String>> = outcomes.into_iter().flatten().collect();
    if let Some(Err(reason)) = outcomes.iter().find(|o| o.is_err()) {
        return Err(reason.clone());
    }
    Ok(match outcomes.first() {
        Some(Ok(exit)) => *exit,
        _ => Exit::Stopped,
    })
}

fn stop_others(members: &[Member], except: usize, why: &'static str) {
    for (i, m) in members.iter().enumerate() {
        if i != except {
            let _ = m.events.send(Event::Signal(SignalAction::Stop(why)));
        }
    }
}

/// Hands one of the master's events to its group, or to every group.
fn route(members: &[Member], ev: Event) {
    let lead = &members[0];
    match ev {
        Event::Signal(SignalAction::Upgrade(name)) => {
            upgrade_when_settled(members, Event::Signal(SignalAction::Upgrade(name)));
        }
        Event::Signal(action) => {
            for m in members {
                let _ = m.events.send(Event::Signal(action));
            }
        }
        // The master is one subreaper for every group: what workers leave behind is the
        // master's, so one group (the lead) sweeps it all and counts it once; `stop` answers
        // once every group stopped, the lead's wait for those orphans included.
        Event::ChildSignal => {
            let _ = lead.events.send(Event::ChildSignal);
        }
        Event::Metrics { reply } => {
            let asks = ask_all(members, |reply| Event::Metrics { reply });
            let explicit = members.iter().any(|m| m.explicit);
            tokio::spawn(async move {
                let mut reports = Vec::new();
                for (name, rx) in asks {
                    if let Ok(mut report) = rx.await {
                        if !explicit {
                            reports.push(report);
                            continue;
                        }
                        for g in &mut report.generations {
                            g.group.clone_from(&name);
                        }
                        report.group = name;
                        reports.push(report);
                    }
                }
                let mut reports = reports.into_iter();
                if let Some(mut first) = reports.next() {
                    first.more = reports.collect();
                    let _ = reply.send(first);
                }
            });
        }
        Event::Control { request, reply } => route_control(members, request, reply),
        // The groups' own events never reach the master's channel; pass one on to the lead.
        other => {
            let _ = lead.events.send(other);
        }
    }
}

/// Passes `upgrade` (the request or the signal) to the lead, which hands every group over,
/// unless another group is rolling out: the lead refuses during its own rollouts, and the
/// others' would be cut short by the hand-over. Asked off this loop, in a task.
fn upgrade_when_settled(members: &[Member], upgrade: Event) {
    if members.len() == 1 {
        let _ = members[0].events.send(upgrade);
        return;
    }
    let lead = members[0].events.clone();
    let asks = ask_all(&members[1..], |reply| Event::Control {
        request: ControlRequest::Status,
        reply,
    });
    tokio::spawn(async move {
        for (name, rx) in asks {
            if let Ok(ControlResponse::Status(report)) = rx.await
                && report.rolling_out
            {
                let reason = format!(
                    "group {name:?}: a rollout is under way; upgrade once it is over (`host status`)"
                );
                tracing::warn!("upgrade refused: {reason}");
                if let Event::Control { reply, .. } = upgrade {
                    let _ = reply.send(ControlResponse::Refused { reason });
                }
                return;
            }
        }
        let _ = lead.send(upgrade);
    });
}

/// Asks every group with `make`; the answers come back on the receivers, in group order.
fn ask_all<T>(
    members: &[Member],
    make: impl Fn(oneshot::Sender<T>) -> Event,
) -> Vec<(String, oneshot::Receiver<T>)> {
    members
        .iter()
        .filter_map(|m| {
            let (tx, rx) = oneshot::channel();
            m.events.send(make(tx)).ok()?;
            Some((m.name.clone(), rx))
        })
        .collect()
}

fn route_control(
    members: &[Member],
    request: ControlRequest,
    reply: oneshot::Sender<ControlResponse>,
) {
    match request {
        ControlRequest::Group { group, request } => {
            match members.iter().find(|m| m.name == group) {
                Some(m) => {
                    let _ = m.events.send(Event::Control {
                        request: *request,
                        reply,
                    });
                }
                None => {
                    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
                    let _ = reply.send(ControlResponse::Refused {
                        reason: format!("no group named {group:?} (groups: {})", names.join(", ")),
                    });
                }
            }
        }
        ControlRequest::Status => {
            let asks = ask_all(members, |reply| Event::Control {
                request: ControlRequest::Status,
                reply,
            });
            tokio::spawn(async move {
                let mut reports = Vec::new();
                for (_, rx) in asks {
                    if let Ok(ControlResponse::Status(report)) = rx.await {
                        reports.push(*report);
                    }
                }
                let Some(first) = reports.first() else {
                    let _ = reply.send(ControlResponse::Refused {
                        reason: "the master is shutting down".into(),
                    });
                    return;
                };
                let mut merged = first.clone();
                merged.groups = reports;
                let _ = reply.send(ControlResponse::Status(Box::new(merged)));
            });
        }
        ControlRequest::Stop => {
            let asks = ask_all(members, |reply| Event::Control {
                request: ControlRequest::Stop,
                reply,
            });
            tokio::spawn(async move {
                let mut last = None;
                for (_, rx) in asks {
                    if let Ok(answer) = rx.await {
                        last = Some(answer);
                    }
                }
                if let Some(answer) = last {
                    let _ = reply.send(answer);
                }
            });
        }
        ControlRequest::Upgrade => upgrade_when_settled(
            members,
            Event::Control {
                request: ControlRequest::Upgrade,
                reply,
            },
        ),
        // A request from a client that names no group: the lead's.
        request => {
            let _ = members[0].events.send(Event::Control { request, reply });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notices(names: &[&str]) -> (Notices, mpsc::UnboundedReceiver<Notice>) {
        let (out, rx) = mpsc::unbounded_channel();
        let folded = Notices {
            status: vec![None; names.len()],
            names: names.iter().map(|n| n.to_string()).collect(),
            out,
            start_notify: None,
            serving: false,
            failed: false,
            stopping_told: false,
        };
        (folded, rx)
    }

    fn serving(status: &str) -> Notice {
        Notice::Serving {
            status: status.into(),
        }
    }

    #[test]
    fn ready_once_every_group_serves_with_one_status_naming_each() {
        let (mut n, mut rx) = notices(&["api", "gateway"]);
        assert_eq!(n.fold(1, serving("serving http://b with 1 workers")), None);
        assert!(rx.try_recv().is_err(), "READY before every group serves");
        assert_eq!(n.fold(0, serving("serving http://a with 2 workers")), None);
        match rx.try_recv() {
            Ok(Notice::Serving { status }) => assert_eq!(
                status,
                "api: http://a with 2 workers; gateway: http://b with 1 workers"
            ),
            other => panic!("{other:?}"),
        }
        n.fold(
            1,
            Notice::Reloading {
                status: "reloading".into(),
            },
        );
        match rx.try_recv() {
            Ok(Notice::Reloading { status }) => {
                assert_eq!(status, "api: http://a with 2 workers; gateway: reloading")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_group_reads_as_before_groups() {
        let (mut n, mut rx) = notices(&["default"]);
        n.fold(0, serving("serving http://a with 2 workers"));
        match rx.try_recv() {
            Ok(Notice::Serving { status }) => assert_eq!(status, "serving http://a with 2 workers"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_start_stops_the_others_once_and_stopping_is_told_once() {
        let (mut n, mut rx) = notices(&["api", "gateway"]);
        let failed = |reason: &str| Notice::StartFailed {
            reason: reason.into(),
        };
        assert!(n.fold(1, failed("boom")).is_some());
        match rx.try_recv() {
            Ok(Notice::StartFailed { reason }) => assert_eq!(reason, "group \"gateway\": boom"),
            other => panic!("{other:?}"),
        }
        assert!(n.fold(0, failed("stopped")).is_none());
        // Never READY after a failure, even if the other group serves.
        n.fold(0, serving("serving http://a"));
        n.fold(0, Notice::Stopping);
        n.fold(1, Notice::Stopping);
        let rest: Vec<Notice> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert!(matches!(rest.as_slice(), [Notice::Stopping]), "{rest:?}");
    }

    #[test]
    fn a_hand_over_stops_the_other_groups_without_stopping_the_unit() {
        let (mut n, mut rx) = notices(&["api", "gateway"]);
        assert!(n.fold(0, Notice::HandedOver { new_pid: 7 }).is_some());
        n.fold(1, Notice::Stopping);
        let seen: Vec<Notice> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert!(
            matches!(seen.as_slice(), [Notice::HandedOver { new_pid: 7 }]),
            "{seen:?}"
        );
    }
}
