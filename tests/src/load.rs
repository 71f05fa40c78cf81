//! The load generator: clients sending back-to-back `GET path` until stopped (a new connection
//! per request, one kept-alive HTTP/1.1 connection, or one HTTP/2 connection each), counting
//! every outcome into a [`LoadReport`]: each `200` with its time, client and worker, each failure
//! with the client and the worker its connection was on. The one load generator of the tests:
//! what a test needs to know about its requests is recorded here, and the test judges the run
//! (`LoadReport::assert_clean` is the judgement the reload tests share).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clients::{Failure, Sender, connect_with, send};
use crate::wait_until;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new connection per request, `Connection: close`.
    Close,
    /// One connection reused for back-to-back requests; reconnects when the server closes it.
    KeepAlive,
    /// One HTTP/2 (h2c, prior knowledge) connection reused; reconnects after GOAWAY.
    H2,
}

/// How long a load client waits for one answer before it counts the request as failed and
/// drops its connection, as an impatient client does.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(20);

/// A `200`: when it came, to which client, and from which worker.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    pub at: Instant,
    /// The client (0..clients) that sent it.
    pub client: usize,
    /// The worker pid the body names (`... pid N ...`, as the example plugin's `/` says), if it
    /// names one.
    pub worker: Option<u32>,
}

/// A request that got no response (or whose connection could not be opened).
#[derive(Clone, Debug)]
pub struct LoadError {
    pub client: usize,
    /// The worker the client's connection was on, as its last answer there named it: `None` for
    /// a new connection (every one in [`Mode::Close`]) or one whose answers name no worker.
    pub worker: Option<u32>,
    pub error: String,
}

/// What a load run saw.
#[derive(Debug)]
pub struct LoadReport {
    /// The client kind that produced it: it decides which outcomes count as clean.
    pub mode: Mode,
    pub ok: u64,
    pub non_200: Vec<(u16, String)>,
    pub errors: Vec<LoadError>,
    /// Every `200`, in the order they came.
    pub answers: Vec<Answer>,
    /// Count of responses per first body line (which build served them).
    pub first_lines: BTreeMap<String, u64>,
    /// Responses that asked the client to close (keep-alive mode).
    pub closes: u64,
    /// Connections opened.
    pub connects: u64,
    /// Requests the server never processed (HTTP/2 streams refused after GOAWAY); the client
    /// retried them, as HTTP/2 clients do. Not failures, but counted.
    pub unprocessed: Vec<String>,
}

impl LoadReport {
    /// One line for the test's output: every count of the report.
    pub fn summary(&self) -> String {
        format!(
            "{} ok, {} failed, {} non-200, {} unprocessed and retried, {} connections, {} told to close",
            self.ok,
            self.errors.len(),
            self.non_200.len(),
            self.unprocessed.len(),
            self.connects,
            self.closes
        )
    }

    fn new(mode: Mode) -> LoadReport {
        LoadReport {
            mode,
            ok: 0,
            non_200: Vec::new(),
            errors: Vec::new(),
            answers: Vec::new(),
            first_lines: BTreeMap::new(),
            closes: 0,
            connects: 0,
            unprocessed: Vec::new(),
        }
    }

    /// Panics unless every request got a `200`: none failed, and none unprocessed over
    /// HTTP/1. Over HTTP/2 a request the bare client handed its connection after the server's
    /// GOAWAY is refused by the client's own library before it is sent (RFC 9113, 6.8; the
    /// docs/reloads.md, "What clients see during a reload"): counted apart, not a failure.
    pub fn assert_clean(&self) {
        assert!(
            self.errors.is_empty(),
            "{} failed requests, first: {:?}",
            self.errors.len(),
            &self.errors[..self.errors.len().min(3)]
        );
        assert!(
            self.non_200.is_empty(),
            "{} non-200 responses, first: {:?}",
            self.non_200.len(),
            &self.non_200[..self.non_200.len().min(3)]
        );
        assert!(
            self.mode == Mode::H2 || self.unprocessed.is_empty(),
            "unprocessed {:?} requests: {:?}",
            self.mode,
            self.unprocessed
        );
    }

    pub fn total(&self) -> u64 {
        self.ok + self.non_200.len() as u64 + self.errors.len() as u64
    }
}

/// The worker pid a body names: the number after the word `pid` (`pid 123 generation 1 slot 0`).
pub fn served_by(body: &str) -> Option<u32> {
    body.split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)?
        .parse()
        .ok()
}

/// Clients sending back-to-back `GET path` until stopped, counting every outcome. Each request
/// waits [`REQUEST_DEADLINE`] at most.
pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize, mode: Mode, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::new(mode)));
        let tasks = (0..clients)
            .map(|client| {
                let (stop, report) = (stop.clone(), report.clone());
                tokio::spawn(async move {
                    let mut conn: Option<Sender> = None;
                    // The worker the open connection is on, once an answer on it named one.
                    let mut worker = None;
                    while !stop.load(Ordering::Relaxed) {
                        if conn.as_ref().is_some_and(|c| c.is_closed()) {
                            conn = None;
                        }
                        let sender = match conn.as_mut() {
                            Some(s) => s,
                            None => {
                                worker = None;
                                match connect_with(addr, mode == Mode::H2).await {
                                    Ok(s) => {
                                        report.lock().unwrap().connects += 1;
                                        conn.insert(s)
                                    }
                                    Err(error) => {
                                        report.lock().unwrap().errors.push(LoadError {
                                            client,
                                            worker,
                                            error,
                                        });
                                        // Not a spin while connections are refused.
                                        tokio::time::sleep(Duration::from_millis(10)).await;
                                        continue;
                                    }
                                }
                            }
                        };
                        // A keep-alive connection the server closed while idle is not a failed
                        // request (nothing was sent yet): reconnect, as every client does.
                        if sender.ready().await.is_err() {
                            conn = None;
                            continue;
                        }
                        let result = tokio::time::timeout(
                            REQUEST_DEADLINE,
                            send(sender, addr, path, mode == Mode::Close),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(Failure::Failed(format!(
                                "no answer within {REQUEST_DEADLINE:?}"
                            )))
                        });
                        let mut r = report.lock().unwrap();
                        match result {
                            Ok(reply) => {
                                if reply.close || mode == Mode::Close {
                                    conn = None;
                                }
                                if reply.close && mode == Mode::KeepAlive {
                                    r.closes += 1;
                                }
                                if reply.status == 200 {
                                    r.ok += 1;
                                    worker = served_by(&reply.body);
                                    r.answers.push(Answer {
                                        at: Instant::now(),
                                        client,
                                        worker,
                                    });
                                    *r.first_lines
                                        .entry(reply.first_line().to_string())
                                        .or_default() += 1;
                                } else {
                                    r.non_200.push((reply.status, reply.body));
                                }
                            }
                            Err(Failure::Unprocessed(e)) => {
                                r.unprocessed.push(e);
                                conn = None;
                            }
                            Err(Failure::Failed(error)) => {
                                r.errors.push(LoadError {
                                    client,
                                    worker,
                                    error,
                                });
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            report,
            tasks,
        }
    }

    /// Requests answered so far (any outcome).
    pub fn total(&self) -> u64 {
        self.report.lock().unwrap().total()
    }

    /// Whether a `200` has come from worker `pid` (see [`Answer::worker`]).
    pub fn served_by(&self, pid: u32) -> bool {
        self.report
            .lock()
            .unwrap()
            .answers
            .iter()
            .any(|a| a.worker == Some(pid))
    }

    /// Waits until at least `n` more requests than now have completed.
    pub async fn advance(&self, n: u64) {
        let target = self.total() + n;
        wait_until(
            Duration::from_secs(30),
            &format!("{n} more requests under load"),
            || self.total() >= target,
        )
        .await;
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load client panicked");
        }
        Arc::try_unwrap(self.report)
            .expect("clients done")
            .into_inner()
            .unwrap()
    }
}
