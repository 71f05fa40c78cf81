//! A business worker's links to its gateways (`WorkerSpec::gateway_links`): one task per
//! gateway process's link socket, which connects (and connects again, with backoff, whenever
//! the link drops), says `Hello`, runs each client event through the [`EventHandler`] and
//! answers `Handled` when it returns, says `Draining` once the worker drains, and carries the
//! `Gateway` handle's commands ([`Links::command`], [`Links::query`]).
//!
//! It owns the business side of the link protocol (`gateway/link.rs`); it never decides what
//! an event means (the handler does) nor where a client's event goes (the gateway's router).
//!
//! Hostile handlers: each event runs in its own task, so a handler that panics still gets its
//! `Handled` (a `Connect` whose handler panicked is refused with `500`): a client is never left
//! waiting on a worker that is alive. A `Handled` goes only to the connection the event came
//! from: after a reconnect the gateway has already given the event to another worker (flagged
//! redelivered), so an answer on the new connection would be for an event it never sent.
//! Commands are sent on every link in the order the handler made them, before its `Handled`,
//! so what a handler sent has left before the gateway counts its event done; at most
//! [`MAX_QUEUED_COMMANDS`] wait per link (a link that is down keeps them for its next
//! connection), past it a command is refused with [`CommandError::Full`]. A send to a uid, a
//! group or everyone, and a count question, is marked for the cluster
//! (`BusinessToGateway::Cluster`) on one link only, the first connected: that gateway alone
//! carries it to the other hosts (`gateway/cluster.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::gateway::link::{
    Answer, BusinessToGateway, ClientEvent, ClientId, GatewayToBusiness, MAX_MEMBERS, Query,
};
use crate::protocol::{Receiver, Sender};

/// Most commands waiting on one link before [`Links::command`] refuses more.
pub const MAX_QUEUED_COMMANDS: usize = 8192;

/// Backoff between connection attempts: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
const BACKOFF_LAST: Duration = Duration::from_secs(1);

/// One client event as the handler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub client: ClientId,
    pub seq: u64,
    pub redelivered: bool,
    pub session: serde_json::Value,
    pub event: ClientEvent,
}

/// What a handler returned: the client's new session (`None`: unchanged) and, for a
/// `Connect`, the HTTP status refusing it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub session: Option<serde_json::Value>,
    pub refuse: Option<u16>,
}

pub type OutcomeFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// The business code, as the links see it (the plugin's event handler).
pub trait EventHandler: Send + Sync + 'static {
    fn handle(&self, event: Event) -> OutcomeFuture;
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommandError {
    #[error("no gateway link is configured")]
    NoGateway,
    #[error("{MAX_QUEUED_COMMANDS} commands already wait on a gateway link")]
    Full,
    #[error("no gateway answered within {0:?}")]
    Timeout(Duration),
}

/// What one link's writer sends: a command (on whichever connection is up) or a `Handled`
/// for the connection `epoch` only.
enum Out {
    Command(BusinessToGateway),
    Handled { epoch: u64, msg: BusinessToGateway },
}

/// One link, as [`Links`] sees it.
struct LinkHandle {
    tx: mpsc::UnboundedSender<Out>,
    /// Commands in `tx` not yet written.
    queued: Arc<AtomicUsize>,
    connected: Arc<AtomicBool>,
}

/// A presence question waiting for its answers.
struct Pending {
    waiting: usize,
    sum: Answer,
    done: Option<oneshot::Sender<Answer>>,
}

type Queries = Arc<std::sync::Mutex<HashMap<u64, Pending>>>;

/// The worker's links: the `Gateway` handle's side (commands and questions) of every link
/// task. Dropping it does not end the tasks; the worker's exit does.
pub struct Links {
    links: Vec<LinkHandle>,
    queries: Queries,
    next_query: AtomicU64,
    /// Events whose handler has not returned yet (a drain waits for 0).
    in_flight: Arc<AtomicUsize>,
}

impl Links {
    /// Starts one task per socket of `sockets`, on the current runtime. `draining` turns
    /// `true` once when the worker drains.
    pub fn start(
        sockets: &[PathBuf],
        pid: u32,
        generation: u64,
        handler: Arc<dyn EventHandler>,
        draining: watch::Receiver<bool>,
    ) -> Links {
        let queries: Queries = Arc::default();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let links = sockets
            .iter()
            .map(|path| {
                let (tx, rx) = mpsc::unbounded_channel();
                let handle = LinkHandle {
                    tx: tx.clone(),
                    queued: Arc::new(AtomicUsize::new(0)),
                    connected: Arc::new(AtomicBool::new(false)),
                };
                let task = LinkTask {
                    path: path.clone(),
                    hello: BusinessToGateway::Hello { pid, generation },
                    handler: handler.clone(),
                    draining: draining.clone(),
                    out_tx: tx,
                    out_rx: rx,
                    queued: handle.queued.clone(),
                    connected: handle.connected.clone(),
                    queries: queries.clone(),
                    in_flight: in_flight.clone(),
                };
                tokio::spawn(task.run());
                handle
            })
            .collect();
        Links {
            links,
            queries,
            next_query: AtomicU64::new(1),
            in_flight,
        }
    }

    /// Sends `command` on the link of the gateway holding its client (a client id's top 16
    /// bits are its gateway's place in `gateway_links`), or on every link when it names no
    /// client or one no link holds (uid and group tables are per gateway process).
    pub fn command(&self, command: BusinessToGateway) -> Result<(), CommandError> {
        if self.links.is_empty() {
            return Err(CommandError::NoGateway);
        }
        let to: Vec<&LinkHandle> =
            match one_client(&command).and_then(|c| self.links.get((c >> 48) as usize)) {
                Some(l) => vec![l],
                None => self.links.iter().collect(),
            };
        if to
            .iter()
            .any(|l| l.queued.load(Ordering::Relaxed) >= MAX_QUEUED_COMMANDS)
        {
            return Err(CommandError::Full);
        }
        // A send to many goes to the other hosts too, through one gateway only (see
        // `BusinessToGateway::Cluster`); a plugin's own `Cluster` never reaches here.
        let mut publisher = is_broadcast(&command).then(|| self.publisher(&to));
        for (i, l) in to.into_iter().enumerate() {
            let command = match publisher {
                Some(p) if p == i => {
                    publisher = None;
                    BusinessToGateway::Cluster(Box::new(command.clone()))
                }
                _ => command.clone(),
            };
            l.queued.fetch_add(1, Ordering::Relaxed);
            if l.tx.send(Out::Command(command)).is_err() {
                l.queued.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Which of `to` carries a command to the cluster: the first connected (else the first).
    fn publisher(&self, to: &[&LinkHandle]) -> usize {
        to.iter()
            .position(|l| l.connected.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Asks every linked gateway `query` and adds up their answers (counts summed, members
    /// joined, at most [`MAX_MEMBERS`]); waits `within` at most.
    pub async fn query(&self, query: Query, within: Duration) -> Result<Answer, CommandError> {
        let up: Vec<&LinkHandle> = self
            .links
            .iter()
            .filter(|l| l.connected.load(Ordering::Relaxed))
            .collect();
        let empty = match query {
            Query::GroupMembers(_) => Answer::Members(Vec::new()),
            _ => Answer::Count(0),
        };
        if self.links.is_empty() {
            return Err(CommandError::NoGateway);
        }
        if up.is_empty() {
            return Err(CommandError::Timeout(Duration::ZERO));
        }
        let id = self.next_query.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        lock(&self.queries).insert(
            id,
            Pending {
                waiting: up.len(),
                sum: empty,
                done: Some(done),
            },
        );
        // A count is the cluster's: one gateway asks the other hosts too and answers the sum.
        let mut publish = !matches!(query, Query::GroupMembers(_));
        for l in up {
            let mut msg = BusinessToGateway::Query {
                id,
                query: query.clone(),
            };
            if std::mem::take(&mut publish) {
                msg = BusinessToGateway::Cluster(Box::new(msg));
            }
            let _ = l.tx.send(Out::Command(msg));
        }
        let got = tokio::time::timeout(within, answer).await;
        lock(&self.queries).remove(&id);
        match got {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(CommandError::Timeout(within)),
        }
    }

    /// Events whose handler has not returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A send to a uid, a group or everyone (what the cluster carries to the other hosts).
fn is_broadcast(command: &BusinessToGateway) -> bool {
    use crate::gateway::link::Target;
    matches!(
        command,
        BusinessToGateway::Send {
            to: Target::Uid(_) | Target::Group(_) | Target::All,
            ..
        }
    )
}

/// A question (not counted in a link's waiting commands), bare or for the cluster.
fn is_query(msg: &BusinessToGateway) -> bool {
    match msg {
        BusinessToGateway::Query { .. } => true,
        BusinessToGateway::Cluster(inner) => is_query(inner),
        _ => false,
    }
}

/// The one client a command is about, if it is about one.
fn one_client(command: &BusinessToGateway) -> Option<ClientId> {
    use crate::gateway::link::Target;
    match command {
        BusinessToGateway::Send {
            to: Target::Client(c),
            ..
        }
        | BusinessToGateway::Bind { client: c, .. }
        | BusinessToGateway::Unbind { client: c }
        | BusinessToGateway::Join { client: c, .. }
        | BusinessToGateway::Leave { client: c, .. }
        | BusinessToGateway::Close { client: c, .. } => Some(*c),
        _ => None,
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds one gateway's answer to question `id`; the last one fires it.
fn answered(queries: &Queries, id: u64, answer: Answer) {
    let mut all = lock(queries);
    let Some(p) = all.get_mut(&id) else { return };
    match (&mut p.sum, answer) {
        (Answer::Count(sum), Answer::Count(n)) => *sum += n,
        (Answer::Members(sum), Answer::Members(more)) => {
            let room = MAX_MEMBERS.saturating_sub(sum.len());
            sum.extend(more.into_iter().take(room));
        }
        // A gateway answering another kind than asked: left out.
        _ => {}
    }
    p.waiting = p.waiting.saturating_sub(1);
    if p.waiting == 0
        && let Some(p) = all.remove(&id)
        && let Some(done) = p.done
    {
        let _ = done.send(p.sum);
    }
}

/// One gateway socket's task.
struct LinkTask {
    path: PathBuf,
    hello: BusinessToGateway,
    handler: Arc<dyn EventHandler>,
    draining: watch::Receiver<bool>,
    out_tx: mpsc::UnboundedSender<Out>,
    out_rx: mpsc::UnboundedReceiver<Out>,
    queued: Arc<AtomicUsize>,
    connected: Arc<AtomicBool>,
    queries: Queries,
    in_flight: Arc<AtomicUsize>,
}

impl LinkTask {
    async fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        let mut epoch = 0u64;
        let mut logged = false;
        loop {
            // A worker that drains links no more: the gateway sends its events elsewhere.
            if *self.draining.borrow() {
                return;
            }
            let stream = match UnixStream::connect(&self.path).await {
                Ok(s) => s,
                Err(e) => {
                    if !logged {
                        tracing::info!(link = %self.path.display(), error = %e, "gateway link not up yet; trying again");
                        logged = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_LAST);
                    continue;
                }
            };
            epoch += 1;
            backoff = BACKOFF_FIRST;
            logged = false;
            self.connected.store(true, Ordering::Relaxed);
            self.serve(stream, epoch).await;
            self.connected.store(false, Ordering::Relaxed);
            tracing::info!(link = %self.path.display(), "gateway link lost");
        }
    }

    /// One connection, until it drops.
    async fn serve(&mut self, stream: UnixStream, epoch: u64) {
        let (rd, wr) = stream.into_split();
        let mut rx = Receiver::<_, GatewayToBusiness>::new(rd);
        let mut tx = Sender::<_, BusinessToGateway>::new(wr);
        if tx.send(&self.hello).await.is_err() {
            return;
        }
        let mut said_draining = false;
        let mut drain_gone = false;
        loop {
            if !said_draining && *self.draining.borrow() {
                said_draining = true;
                if tx.send(&BusinessToGateway::Draining).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                frame = rx.recv() => match frame {
                    Ok(Some(GatewayToBusiness::Event { client, seq, redelivered, session, event })) => {
                        self.spawn_event(epoch, Event { client, seq, redelivered, session, event });
                    }
                    Ok(Some(GatewayToBusiness::Answer { id, answer })) => {
                        answered(&self.queries, id, answer);
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(link = %self.path.display(), error = %e, "gateway link failed");
                        return;
                    }
                },
                out = self.out_rx.recv() => {
                    let Some(out) = out else { return };
                    let msg = match out {
                        Out::Command(msg) => {
                            if !is_query(&msg) {
                                self.queued.fetch_sub(1, Ordering::Relaxed);
                            }
                            msg
                        }
                        // An answer for an earlier connection: that event went elsewhere.
                        Out::Handled { epoch: e, .. } if e != epoch => continue,
                        Out::Handled { msg, .. } => msg,
                    };
                    if tx.send(&msg).await.is_err() {
                        return;
                    }
                }
                changed = self.draining.changed(), if !said_draining && !drain_gone => {
                    drain_gone = changed.is_err();
                }
            }
        }
    }

    /// Runs the handler for `event` in a task of its own; its `Handled` goes out on this link
    /// (connection `epoch`) whether it returned or panicked.
    fn spawn_event(&self, epoch: u64, event: Event) {
        let (client, seq) = (event.client, event.seq);
        let connect = matches!(event.event, ClientEvent::Connect { .. });
        let run = tokio::spawn(self.handler.handle(event));
        let out = self.out_tx.clone();
        let in_flight = self.in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let outcome = match run.await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(client, seq, error = %e, "a gateway event handler panicked; the event counts as handled");
                    Outcome {
                        session: None,
                        refuse: connect.then_some(500),
                    }
                }
            };
            let msg = BusinessToGateway::Handled {
                client,
                seq,
                session: outcome.session,
                refuse: outcome.refuse.filter(|s| (400..=599).contains(s)),
            };
            let _ = out.send(Out::Handled { epoch, msg });
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;
    use tokio::time::timeout;

    const T: Duration = Duration::from_secs(10);

    /// A fresh directory of its own under the system's temporary directory (removed on drop).
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("host-gwlink-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }

        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A stand-in for the plugin: `panic` (and a connect to `/panic`) panics, `slow` waits 200 ms, anything else sends
    /// `echo: <text>` to its client through `links` and bumps the session's `n`.
    struct StandIn {
        links: std::sync::OnceLock<Arc<Links>>,
    }

    impl EventHandler for StandIn {
        fn handle(&self, e: Event) -> OutcomeFuture {
            let links = self.links.get().cloned();
            Box::pin(async move {
                let n = e.session["n"].as_u64().unwrap_or(0) + 1;
                match &e.event {
                    ClientEvent::Text(t) if t == "panic" => panic!("the stand-in panics"),
                    ClientEvent::Connect { path, .. } if path == "/panic" => {
                        panic!("the stand-in panics at a connect")
                    }
                    ClientEvent::Text(t) => {
                        if t == "slow" {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        let send = BusinessToGateway::Send {
                            to: crate::gateway::link::Target::Client(e.client),
                            message: crate::gateway::link::Payload::Text(format!("echo: {t}")),
                            except: vec![],
                        };
                        links.unwrap().command(send).unwrap();
                    }
                    _ => {}
                }
                Outcome {
                    session: Some(serde_json::json!({ "n": n })),
                    refuse: None,
                }
            })
        }
    }

    /// A gateway played by the test: one accepted connection.
    struct FakeGateway {
        rx: Receiver<tokio::net::unix::OwnedReadHalf, BusinessToGateway>,
        tx: Sender<tokio::net::unix::OwnedWriteHalf, GatewayToBusiness>,
    }

    impl FakeGateway {
        async fn accept(l: &UnixListener) -> FakeGateway {
            let (s, _) = timeout(T, l.accept()).await.unwrap().unwrap();
            let (rd, wr) = s.into_split();
            FakeGateway {
                rx: Receiver::new(rd),
                tx: Sender::new(wr),
            }
        }

        async fn next(&mut self) -> BusinessToGateway {
            timeout(T, self.rx.recv()).await.unwrap().unwrap().unwrap()
        }

        async fn event(&mut self, client: u64, seq: u64, text: &str) {
            let e = GatewayToBusiness::Event {
                client,
                seq,
                redelivered: false,
                session: serde_json::json!({"n": seq}),
                event: ClientEvent::Text(text.into()),
            };
            self.tx.send(&e).await.unwrap();
        }
    }

    fn start(sockets: &[PathBuf]) -> (Arc<Links>, watch::Sender<bool>) {
        let handler = Arc::new(StandIn {
            links: std::sync::OnceLock::new(),
        });
        let (drain, draining) = watch::channel(false);
        let links = Arc::new(Links::start(sockets, 7, 3, handler.clone(), draining));
        let _ = handler.links.set(links.clone());
        (links, drain)
    }

    fn handled(client: u64, seq: u64, n: u64) -> BusinessToGateway {
        BusinessToGateway::Handled {
            client,
            seq,
            session: Some(serde_json::json!({ "n": n })),
            refuse: None,
        }
    }

    #[tokio::test]
    async fn a_link_says_hello_answers_after_its_sends_survives_a_panic_and_reconnects() {
        let dir = Dir::new("link");
        let path = dir.path().join("gw-0.sock");
        // The gateway comes up after the worker: the link tries again.
        let (links, _drain) = start(std::slice::from_ref(&path));
        let listener = UnixListener::bind(&path).unwrap();
        let mut gw = FakeGateway::accept(&listener).await;
        assert_eq!(
            gw.next().await,
            BusinessToGateway::Hello {
                pid: 7,
                generation: 3
            }
        );
        gw.event(1, 1, "hi").await;
        assert!(matches!(gw.next().await, BusinessToGateway::Send { .. }));
        assert_eq!(gw.next().await, handled(1, 1, 2));
        gw.event(1, 2, "panic").await;
        assert_eq!(
            gw.next().await,
            BusinessToGateway::Handled {
                client: 1,
                seq: 2,
                session: None,
                refuse: None
            },
            "a handler that panicked still answers"
        );
        let connect = GatewayToBusiness::Event {
            client: 4,
            seq: 1,
            redelivered: false,
            session: serde_json::Value::Null,
            event: ClientEvent::Connect {
                path: "/panic".into(),
                query: String::new(),
                headers: vec![],
            },
        };
        gw.tx.send(&connect).await.unwrap();
        assert_eq!(
            gw.next().await,
            BusinessToGateway::Handled {
                client: 4,
                seq: 1,
                session: None,
                refuse: Some(500)
            },
            "a connect whose handler panicked is refused"
        );
        // The gateway drops the link with an event in flight; its answer is not sent on the
        // next connection (the gateway gave the event to another worker).
        gw.event(2, 1, "slow").await;
        drop(gw);
        let mut gw = FakeGateway::accept(&listener).await;
        assert!(matches!(gw.next().await, BusinessToGateway::Hello { .. }));
        gw.event(3, 1, "again").await;
        // The slow one's send (a command: any connection) may come first; its Handled never.
        let mut got = Vec::new();
        while got.last() != Some(&handled(3, 1, 2)) {
            let m = gw.next().await;
            assert_ne!(
                m,
                handled(2, 1, 2),
                "an answer for the connection that dropped"
            );
            got.push(m);
        }
        let deadline = tokio::time::Instant::now() + T;
        while links.in_flight() > 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_draining_worker_says_so_and_answers_what_it_holds() {
        let dir = Dir::new("drain");
        let path = dir.path().join("gw-0.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (links, drain) = start(std::slice::from_ref(&path));
        let mut gw = FakeGateway::accept(&listener).await;
        assert!(matches!(gw.next().await, BusinessToGateway::Hello { .. }));
        gw.event(1, 1, "slow").await;
        // Once the event is taken (its handler runs 200 ms), drain.
        let deadline = tokio::time::Instant::now() + T;
        while links.in_flight() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the event never reached the handler"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drain.send(true).unwrap();
        let mut got = vec![gw.next().await, gw.next().await, gw.next().await];
        assert_eq!(
            got.pop(),
            Some(handled(1, 1, 2)),
            "the held event is still answered"
        );
        assert!(got.contains(&BusinessToGateway::Draining), "{got:?}");
        // The link dropped while draining: the worker does not link again.
        drop(gw);
        assert!(
            timeout(Duration::from_millis(300), listener.accept())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_query_goes_to_every_gateway_and_the_answers_are_added_up() {
        let dir = Dir::new("query");
        let paths: Vec<PathBuf> = (0..2)
            .map(|i| dir.path().join(format!("gw-{i}.sock")))
            .collect();
        let listeners: Vec<UnixListener> = paths
            .iter()
            .map(|p| UnixListener::bind(p).unwrap())
            .collect();
        let (links, _drain) = start(&paths);
        let mut gws = Vec::new();
        for l in &listeners {
            let mut gw = FakeGateway::accept(l).await;
            assert!(matches!(gw.next().await, BusinessToGateway::Hello { .. }));
            gws.push(gw);
        }
        let deadline = tokio::time::Instant::now() + T;
        while !links
            .links
            .iter()
            .all(|l| l.connected.load(Ordering::Relaxed))
        {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let asking = {
            let links = links.clone();
            tokio::spawn(async move {
                links
                    .query(Query::UidCount("ann".into()), Duration::from_secs(10))
                    .await
            })
        };
        for (i, gw) in gws.iter_mut().enumerate() {
            // The first gateway asks the rest of the cluster as well, the others do not.
            let msg = match (i, gw.next().await) {
                (0, BusinessToGateway::Cluster(inner)) => *inner,
                (0, other) => panic!("the first link's question is not for the cluster: {other:?}"),
                (_, other) => other,
            };
            let BusinessToGateway::Query { id, query } = msg else {
                panic!("not a query: {msg:?}")
            };
            assert_eq!(query, Query::UidCount("ann".into()));
            let answer = GatewayToBusiness::Answer {
                id,
                answer: Answer::Count(i as u64 + 2),
            };
            gw.tx.send(&answer).await.unwrap();
        }
        assert_eq!(asking.await.unwrap(), Ok(Answer::Count(5)));
        // A command about one client goes to its gateway alone (its id's top 16 bits); one
        // about a uid, to every gateway.
        let second = 1u64 << 48 | 5;
        for cmd in [
            BusinessToGateway::Unbind { client: second },
            BusinessToGateway::Unbind { client: 1 },
        ] {
            links.command(cmd).unwrap();
        }
        let uid = BusinessToGateway::Send {
            to: crate::gateway::link::Target::Uid("ann".into()),
            message: crate::gateway::link::Payload::Text("hi".into()),
            except: vec![],
        };
        links.command(uid.clone()).unwrap();
        assert_eq!(gws[0].next().await, BusinessToGateway::Unbind { client: 1 });
        // The first connected link carries it to the cluster, the others only here.
        assert_eq!(
            gws[0].next().await,
            BusinessToGateway::Cluster(Box::new(uid.clone()))
        );
        assert_eq!(
            gws[1].next().await,
            BusinessToGateway::Unbind { client: second }
        );
        assert_eq!(gws[1].next().await, uid);
        // A gateway that does not answer: the question times out.
        let q = links
            .query(Query::GroupCount("r".into()), Duration::from_millis(100))
            .await;
        assert_eq!(q, Err(CommandError::Timeout(Duration::from_millis(100))));
    }
}
