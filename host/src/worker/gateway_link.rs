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
//!
//! Exactly-once sends: the commands an event's handler makes ([`Links::event_command`], with
//! the event's token) are held until it returns, then go to the event's own gateway as
//! [`BusinessToGateway::Held`] frames right before its `Handled`, on the same connection; that
//! gateway applies them at the `Handled`, or drops them with the event if the link drops first
//! (the redelivery makes them again): all or none, once. Those for other gateways (a send to a
//! uid, a group or everyone spans them) are queued on their links just before the `Handled`:
//! at least once (a worker killed between the two makes them again at the redelivery). At most
//! [`MAX_QUEUED_COMMANDS`] commands and [`MAX_HELD`] bytes an event, past it
//! [`CommandError::Full`]. Other commands (an HTTP handler's, [`Links::command`]) leave at once,
//! in the order made; at most [`MAX_QUEUED_COMMANDS`] wait per link (a link that is down keeps
//! them for its next connection), past it [`CommandError::Full`].
//!
//! A handler that does not return within `gateway_event_timeout` is dropped: its event counts
//! as handled (a `Connect` is refused `504`), logged at most once a second and counted
//! (`host_limit_hits{limit="gateway_event_timeout"}`). A new worker waits (a bounded time,
//! [`Links::welcomed`]) until every gateway answered its `Hello` before it says `Ready`.
//!
//! A send to a uid, a group or everyone is marked for the cluster (`BusinessToGateway::Cluster`)
//! on one link only: for an event's commands, its own gateway's (inside its `Held` frames, so it
//! is published once, at the `Handled`); for other commands, the first connected link. That
//! gateway alone carries it to the other hosts (`gateway/cluster.rs`); a count question is
//! marked the same way.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::counters::{Counters, Limit};
use crate::gateway::link::{
    Answer, BusinessToGateway, ClientEvent, ClientId, GatewayToBusiness, MAX_HELD, MAX_MEMBERS,
    Query,
};
use crate::protocol::{MAX_BATCH, MAX_FRAME, Receiver, Sender};
use crate::ratelimit::RateLimit;

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
    /// Names the event to [`Links::event_command`] while its handler runs (unique in the
    /// worker, never 0).
    pub token: u64,
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
    /// The event's handler, or `None` when it can run no more (the plugin was stopped): the
    /// event is then never answered, and the gateway gives it to another worker once this
    /// one's link drops.
    fn handle(&self, event: Event) -> Option<OutcomeFuture>;
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

/// What one link's writer sends: a command (on whichever connection is up) or a `Handled`,
/// after its event's `Held` commands, for the connection `epoch` only.
enum Out {
    Command(BusinessToGateway),
    Handled {
        epoch: u64,
        held: Vec<BusinessToGateway>,
        msg: BusinessToGateway,
    },
}

/// One link, as [`Links`] and every link task see it.
struct LinkHandle {
    tx: mpsc::UnboundedSender<Out>,
    /// Commands in `tx` not yet written.
    queued: AtomicUsize,
    /// `Handled` answers in `tx` not yet written: a drain waits for those of a connected link
    /// (a worker that exited with them unwritten would see its events redelivered).
    unwritten: AtomicUsize,
    connected: AtomicBool,
    /// Its gateway answered this connection's `Hello`.
    welcomed: AtomicBool,
}

/// The commands of the events whose handler runs, by token, with their bytes.
type HeldCommands = Arc<std::sync::Mutex<HashMap<u64, (Vec<BusinessToGateway>, usize)>>>;

/// What every link task shares.
struct Common {
    links: Vec<LinkHandle>,
    queries: Queries,
    held: HeldCommands,
    next_token: AtomicU64,
    /// Events whose handler has not returned yet (a drain waits for 0).
    in_flight: AtomicUsize,
    /// A handler that has not returned by then is dropped (`gateway_event_timeout`).
    event_timeout: Duration,
    /// The worker's cell, for `host_limit_hits`.
    counters: Option<&'static Counters>,
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
    common: Arc<Common>,
    next_query: AtomicU64,
}

/// Where a worker's links go and how its events run.
pub struct LinkSettings {
    pub pid: u32,
    pub generation: u64,
    /// `gateway_event_timeout`.
    pub event_timeout: Duration,
    /// The worker's cell, for `host_limit_hits`.
    pub counters: Option<&'static Counters>,
}

impl Links {
    /// Starts one task per socket of `sockets`, on the current runtime. `draining` turns
    /// `true` once when the worker drains.
    pub fn start(
        sockets: &[PathBuf],
        settings: &LinkSettings,
        handler: Arc<dyn EventHandler>,
        draining: watch::Receiver<bool>,
    ) -> Links {
        let (handles, receivers): (Vec<_>, Vec<_>) = sockets
            .iter()
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let handle = LinkHandle {
                    tx,
                    queued: AtomicUsize::new(0),
                    unwritten: AtomicUsize::new(0),
                    connected: AtomicBool::new(false),
                    welcomed: AtomicBool::new(false),
                };
                (handle, rx)
            })
            .unzip();
        let common = Arc::new(Common {
            links: handles,
            queries: Arc::default(),
            held: Arc::default(),
            next_token: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            event_timeout: settings.event_timeout,
            counters: settings.counters,
        });
        for (index, (path, rx)) in sockets.iter().zip(receivers).enumerate() {
            let task = LinkTask {
                index,
                path: path.clone(),
                hello: BusinessToGateway::Hello {
                    pid: settings.pid,
                    generation: settings.generation,
                },
                handler: handler.clone(),
                draining: draining.clone(),
                out_rx: rx,
                common: common.clone(),
            };
            tokio::spawn(task.run());
        }
        Links {
            common,
            next_query: AtomicU64::new(1),
        }
    }

    /// Sends `command` on the link of the gateway holding its client (a client id's top 16
    /// bits are its gateway's place in `gateway_links`), or on every link when it names no
    /// client or one no link holds (uid and group tables are per gateway process).
    pub fn command(&self, command: BusinessToGateway) -> Result<(), CommandError> {
        let links = &self.common.links;
        if links.is_empty() {
            return Err(CommandError::NoGateway);
        }
        let to = route(links, &command);
        if to
            .clone()
            .any(|i| links[i].queued.load(Ordering::Relaxed) >= MAX_QUEUED_COMMANDS)
        {
            return Err(CommandError::Full);
        }
        // A send to many goes to the other hosts too, through one gateway only (see
        // `BusinessToGateway::Cluster`); a plugin's own `Cluster` never reaches here.
        let publisher = is_broadcast(&command).then(|| publisher(links, to.clone()));
        for i in to {
            match publisher {
                Some(p) if p == i => queue(
                    &links[i],
                    BusinessToGateway::Cluster(Box::new(command.clone())),
                ),
                _ => queue(&links[i], command.clone()),
            }
        }
        Ok(())
    }

    /// A command of the handler of the event `token` ([`Event::token`]): held until the
    /// handler returns (see the module doc), at most [`MAX_QUEUED_COMMANDS`] and [`MAX_HELD`]
    /// bytes an event. Once the handler returned (a task it left behind), it leaves at once,
    /// as [`Links::command`]'s do.
    pub fn event_command(
        &self,
        token: u64,
        command: BusinessToGateway,
    ) -> Result<(), CommandError> {
        if self.common.links.is_empty() {
            return Err(CommandError::NoGateway);
        }
        let mut held = lock(&self.common.held);
        let Some((commands, bytes)) = held.get_mut(&token) else {
            drop(held);
            return self.command(command);
        };
        let size = command.size();
        if commands.len() >= MAX_QUEUED_COMMANDS || *bytes + size > MAX_HELD {
            return Err(CommandError::Full);
        }
        *bytes += size;
        commands.push(command);
        Ok(())
    }

    /// Waits until every link's gateway answered its `Hello`, `within` at most; whether they
    /// all did.
    pub async fn welcomed(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let all = self
                .common
                .links
                .iter()
                .all(|l| l.welcomed.load(Ordering::Relaxed));
            if all || tokio::time::Instant::now() >= deadline {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Counts a bound the plugin hit (`host_limit_hits`).
    pub fn limit_hit(&self, limit: Limit) {
        if let Some(c) = self.common.counters {
            c.limit_hit(limit);
        }
    }

    /// Asks every linked gateway `query` and adds up their answers (counts summed, members
    /// joined, at most [`MAX_MEMBERS`]); waits `within` at most.
    pub async fn query(&self, query: Query, within: Duration) -> Result<Answer, CommandError> {
        let up: Vec<&LinkHandle> = self
            .common
            .links
            .iter()
            .filter(|l| l.connected.load(Ordering::Relaxed))
            .collect();
        let empty = match query {
            Query::GroupMembers(_) => Answer::Members(Vec::new()),
            _ => Answer::Count(0),
        };
        if self.common.links.is_empty() {
            return Err(CommandError::NoGateway);
        }
        if up.is_empty() {
            return Err(CommandError::Timeout(Duration::ZERO));
        }
        let id = self.next_query.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        lock(&self.common.queries).insert(
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
        lock(&self.common.queries).remove(&id);
        match got {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(CommandError::Timeout(within)),
        }
    }

    /// Events whose handler has not returned, or whose `Handled` a connected link has not
    /// written yet (a drain ends once both are done).
    pub fn in_flight(&self) -> usize {
        let unwritten: usize = (self.common.links.iter())
            .filter(|l| l.connected.load(Ordering::Relaxed))
            .map(|l| l.unwritten.load(Ordering::Relaxed))
            .sum();
        self.common.in_flight.load(Ordering::Relaxed) + unwritten
    }
}

/// The links `command` goes to: the one holding its client, or all.
fn route(links: &[LinkHandle], command: &BusinessToGateway) -> std::ops::Range<usize> {
    match one_client(command).map(|c| (c >> 48) as usize) {
        Some(i) if i < links.len() => i..i + 1,
        _ => 0..links.len(),
    }
}

/// Queues a command on one link.
fn queue(link: &LinkHandle, command: BusinessToGateway) {
    link.queued.fetch_add(1, Ordering::Relaxed);
    if link.tx.send(Out::Command(command)).is_err() {
        link.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An event's commands for its own gateway as `Held` frames, each well under a link frame
/// (a command is at most half a frame: `gateway_abi::MAX_COMMAND`).
fn held_frames(
    client: ClientId,
    seq: u64,
    commands: Vec<BusinessToGateway>,
) -> Vec<BusinessToGateway> {
    // Most events make a few small commands: one frame, without measuring them (a command's
    // JSON is at most 6 times its size, an escaped byte, plus its names).
    let most: usize = commands.iter().map(|c| 6 * c.size() + 256).sum();
    if commands.is_empty() {
        return Vec::new();
    }
    if most <= MAX_FRAME / 4 {
        return vec![BusinessToGateway::Held {
            client,
            seq,
            commands,
        }];
    }
    let mut frames = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for command in commands {
        let size = serde_json::to_vec(&command).map_or(MAX_FRAME, |j| j.len());
        if !chunk.is_empty() && bytes + size > MAX_FRAME / 4 {
            frames.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(command);
    }
    if !chunk.is_empty() {
        frames.push(chunk);
    }
    frames
        .into_iter()
        .map(|commands| BusinessToGateway::Held {
            client,
            seq,
            commands,
        })
        .collect()
}

/// Which of `to` carries a command to the cluster: the first connected (else the first).
fn publisher(links: &[LinkHandle], to: std::ops::Range<usize>) -> usize {
    to.clone()
        .find(|&i| links[i].connected.load(Ordering::Relaxed))
        .unwrap_or(to.start)
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

/// One gateway socket's task: link `index` of [`Common::links`].
struct LinkTask {
    index: usize,
    path: PathBuf,
    hello: BusinessToGateway,
    handler: Arc<dyn EventHandler>,
    draining: watch::Receiver<bool>,
    out_rx: mpsc::UnboundedReceiver<Out>,
    common: Arc<Common>,
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
            let me = &self.common.links[self.index];
            me.connected.store(true, Ordering::Relaxed);
            self.serve(stream, epoch).await;
            let me = &self.common.links[self.index];
            me.connected.store(false, Ordering::Relaxed);
            me.welcomed.store(false, Ordering::Relaxed);
            tracing::info!(link = %self.path.display(), "gateway link lost");
        }
    }

    /// One connection, until it drops.
    async fn serve(&mut self, stream: UnixStream, epoch: u64) {
        let (rd, wr) = stream.into_split();
        let rd = tokio::io::BufReader::with_capacity(crate::gateway::LINK_READ_BUFFER, rd);
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
                        self.spawn_event(epoch, Event { client, seq, redelivered, session, event, token: 0 });
                    }
                    Ok(Some(GatewayToBusiness::Answer { id, answer })) => {
                        answered(&self.common.queries, id, answer);
                    }
                    Ok(Some(GatewayToBusiness::Welcome)) => {
                        self.common.links[self.index].welcomed.store(true, Ordering::Relaxed);
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(link = %self.path.display(), error = %e, "gateway link failed");
                        return;
                    }
                },
                out = self.out_rx.recv() => {
                    let Some(out) = out else { return };
                    // What is waiting at a wake-up goes in one write.
                    let me = &self.common.links[self.index];
                    let mut next = Some(out);
                    let mut answers = 0;
                    let mut fed = true;
                    while let Some(out) = next.take() {
                        let frames = match out {
                            Out::Command(msg) => {
                                if !is_query(&msg) {
                                    me.queued.fetch_sub(1, Ordering::Relaxed);
                                }
                                vec![msg]
                            }
                            // An answer for an earlier connection: that event went elsewhere,
                            // and its commands with it (the redelivery makes them again).
                            Out::Handled { epoch: e, .. } if e != epoch => {
                                me.unwritten.fetch_sub(1, Ordering::Relaxed);
                                Vec::new()
                            }
                            Out::Handled { mut held, msg, .. } => {
                                answers += 1;
                                held.push(msg);
                                held
                            }
                        };
                        fed = fed && frames.iter().all(|f| tx.feed(f).is_ok());
                        if fed && tx.pending() < MAX_BATCH {
                            next = self.out_rx.try_recv().ok();
                        }
                    }
                    let written = fed && tx.flush().await.is_ok();
                    me.unwritten.fetch_sub(answers, Ordering::Relaxed);
                    if !written {
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
    /// (connection `epoch`), after the commands it made, whether it returned, panicked or
    /// passed `gateway_event_timeout`.
    fn spawn_event(&self, epoch: u64, mut event: Event) {
        static TIMED_OUT: RateLimit = RateLimit::per_second();
        let (client, seq) = (event.client, event.seq);
        let connect = matches!(event.event, ClientEvent::Connect { .. });
        let common = self.common.clone();
        let index = self.index;
        let token = common.next_token.fetch_add(1, Ordering::Relaxed);
        event.token = token;
        lock(&common.held).insert(token, (Vec::new(), 0));
        let Some(handler) = self.handler.handle(event) else {
            lock(&common.held).remove(&token);
            return;
        };
        common.in_flight.fetch_add(1, Ordering::Relaxed);
        let run = tokio::spawn(handler);
        tokio::spawn(async move {
            let stop = run.abort_handle();
            let outcome = match tokio::time::timeout(common.event_timeout, run).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    tracing::warn!(client, seq, error = %e, "a gateway event handler panicked; the event counts as handled");
                    Outcome {
                        session: None,
                        refuse: connect.then_some(500),
                    }
                }
                Err(_) => {
                    // Dropped (at its next poll, on the runtime): what it made so far is sent.
                    stop.abort();
                    if let Some(c) = common.counters {
                        c.limit_hit(Limit::GatewayEventTimeout);
                    }
                    if let Some(suppressed) = TIMED_OUT.hit_named("gateway_event_timeout") {
                        tracing::warn!(
                            client,
                            seq,
                            suppressed,
                            timeout_ms = common.event_timeout.as_millis() as u64,
                            "a gateway event handler did not return within gateway_event_timeout; dropped, the event counts as handled (a connect is refused 504)"
                        );
                    }
                    Outcome {
                        session: None,
                        refuse: connect.then_some(504),
                    }
                }
            };
            let (commands, _) = lock(&common.held).remove(&token).unwrap_or_default();
            let mut own = Vec::new();
            for command in commands {
                let to = route(&common.links, &command);
                // A send to many reaches the other hosts from the event's own gateway, at
                // its `Handled` (once, as the rest of what the handler made there).
                let broadcast = is_broadcast(&command);
                if to == (index..index + 1) {
                    own.push(match broadcast {
                        true => BusinessToGateway::Cluster(Box::new(command)),
                        false => command,
                    });
                    continue;
                }
                for i in to {
                    if i != index {
                        queue(&common.links[i], command.clone());
                    } else if broadcast {
                        own.push(BusinessToGateway::Cluster(Box::new(command.clone())));
                    } else {
                        own.push(command.clone());
                    }
                }
            }
            let msg = BusinessToGateway::Handled {
                client,
                seq,
                session: outcome.session,
                refuse: outcome.refuse.filter(|s| (400..=599).contains(s)),
            };
            let held = held_frames(client, seq, own);
            let link = &common.links[index];
            link.unwritten.fetch_add(1, Ordering::Relaxed);
            if link.tx.send(Out::Handled { epoch, held, msg }).is_err() {
                link.unwritten.fetch_sub(1, Ordering::Relaxed);
            }
            common.in_flight.fetch_sub(1, Ordering::Relaxed);
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

    /// A stand-in for the plugin: `panic` (and a connect to `/panic`) panics, `slow` waits 200 ms,
    /// `hang` (and a connect to `/hang`) never returns, `all` sends to everyone, anything else
    /// sends `echo: <text>` to its client through `links` (as the event's commands) and bumps
    /// the session's `n`.
    struct StandIn {
        links: std::sync::OnceLock<Arc<Links>>,
    }

    impl EventHandler for StandIn {
        fn handle(&self, e: Event) -> Option<OutcomeFuture> {
            let links = self.links.get().cloned();
            Some(Box::pin(async move {
                let n = e.session["n"].as_u64().unwrap_or(0) + 1;
                match &e.event {
                    ClientEvent::Text(t) if t == "panic" => panic!("the stand-in panics"),
                    ClientEvent::Connect { path, .. } if path == "/panic" => {
                        panic!("the stand-in panics at a connect")
                    }
                    ClientEvent::Connect { path, .. } if path == "/hang" => {
                        std::future::pending::<()>().await
                    }
                    ClientEvent::Text(t) => {
                        let to = match t.as_str() {
                            "all" => crate::gateway::link::Target::All,
                            _ => crate::gateway::link::Target::Client(e.client),
                        };
                        let send = BusinessToGateway::Send {
                            to,
                            message: crate::gateway::link::Payload::Text(format!("echo: {t}")),
                            except: vec![],
                        };
                        let links = links.unwrap();
                        links.event_command(e.token, send).unwrap();
                        match t.as_str() {
                            "slow" => tokio::time::sleep(Duration::from_millis(200)).await,
                            "hang" => std::future::pending::<()>().await,
                            _ => {}
                        }
                    }
                    _ => {}
                }
                Outcome {
                    session: Some(serde_json::json!({ "n": n })),
                    refuse: None,
                }
            }))
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
        let settings = LinkSettings {
            pid: 7,
            generation: 3,
            event_timeout: Duration::from_millis(500),
            counters: None,
        };
        let links = Arc::new(Links::start(sockets, &settings, handler.clone(), draining));
        let _ = handler.links.set(links.clone());
        (links, drain)
    }

    /// Client `client`'s first event: a connect to `path`.
    fn connect_event(client: u64, path: &str) -> GatewayToBusiness {
        GatewayToBusiness::Event {
            client,
            seq: 1,
            redelivered: false,
            session: serde_json::Value::Null,
            event: ClientEvent::Connect {
                path: path.into(),
                query: String::new(),
                headers: vec![],
            },
        }
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
        // Not welcomed until the gateway answers the Hello.
        assert!(!links.welcomed(Duration::from_millis(50)).await);
        gw.tx.send(&GatewayToBusiness::Welcome).await.unwrap();
        assert!(links.welcomed(T).await);
        // The handler's send comes held for its event, right before its Handled.
        gw.event(1, 1, "hi").await;
        assert!(
            matches!(gw.next().await, BusinessToGateway::Held { client: 1, seq: 1, commands } if commands.len() == 1)
        );
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
        let connect = connect_event(4, "/panic");
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
        // The slow one's send and its Handled went with its connection: neither comes here.
        let mut got = Vec::new();
        while got.last() != Some(&handled(3, 1, 2)) {
            let m = gw.next().await;
            assert_ne!(
                m,
                handled(2, 1, 2),
                "an answer for the connection that dropped"
            );
            assert!(
                !matches!(m, BusinessToGateway::Held { client: 2, .. }),
                "the commands of an event the connection that dropped held: {m:?}"
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

    /// Links to two gateways played by the test (in `dir`), each past its `Hello`.
    async fn two_gateways(
        dir: &Dir,
    ) -> (
        Vec<UnixListener>,
        Arc<Links>,
        watch::Sender<bool>,
        Vec<FakeGateway>,
    ) {
        let paths: Vec<PathBuf> = (0..2)
            .map(|i| dir.path().join(format!("gw-{i}.sock")))
            .collect();
        let listeners: Vec<UnixListener> = paths
            .iter()
            .map(|p| UnixListener::bind(p).unwrap())
            .collect();
        let (links, drain) = start(&paths);
        let mut gws = Vec::new();
        for l in &listeners {
            let mut gw = FakeGateway::accept(l).await;
            assert!(matches!(gw.next().await, BusinessToGateway::Hello { .. }));
            gws.push(gw);
        }
        (listeners, links, drain, gws)
    }

    #[tokio::test]
    async fn a_query_goes_to_every_gateway_and_the_answers_are_added_up() {
        let dir = Dir::new("query");
        let (_listeners, links, _drain, mut gws) = two_gateways(&dir).await;
        let deadline = tokio::time::Instant::now() + T;
        while !links
            .common
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

    #[tokio::test]
    async fn an_events_commands_go_with_its_handled_others_at_once_and_a_hung_handler_is_dropped() {
        let dir = Dir::new("held");
        let (_listeners, links, _drain, mut gws) = two_gateways(&dir).await;
        // A send to everyone from gateway 0's event: gateway 1 gets it as a plain command (at
        // least once), gateway 0 held for the event (and marked for the cluster), then its
        // Handled.
        gws[0].event(1, 1, "all").await;
        let BusinessToGateway::Send { .. } = gws[1].next().await else {
            panic!("gateway 1 gets the send as a plain command")
        };
        let BusinessToGateway::Held {
            client: 1,
            seq: 1,
            commands,
        } = gws[0].next().await
        else {
            panic!("gateway 0 gets the send held for its event")
        };
        // Marked for the cluster there: the event's own gateway publishes it, once.
        assert!(
            matches!(&commands[..], [BusinessToGateway::Cluster(c)] if matches!(**c, BusinessToGateway::Send { .. })),
            "{commands:?}"
        );
        assert_eq!(gws[0].next().await, handled(1, 1, 2));
        // A command with no running event's token (an HTTP handler's) leaves at once.
        let unbind = BusinessToGateway::Unbind { client: 5 };
        links.event_command(0, unbind.clone()).unwrap();
        assert_eq!(gws[0].next().await, unbind);

        // A handler that never returns is dropped at gateway_event_timeout (500 ms here): what
        // it made goes, and its event counts as handled; a connect is refused 504.
        let started = tokio::time::Instant::now();
        gws[0].event(1, 2, "hang").await;
        assert!(matches!(
            gws[0].next().await,
            BusinessToGateway::Held {
                client: 1,
                seq: 2,
                ..
            }
        ));
        assert_eq!(
            gws[0].next().await,
            BusinessToGateway::Handled {
                client: 1,
                seq: 2,
                session: None,
                refuse: None
            }
        );
        assert!(started.elapsed() >= Duration::from_millis(500));
        let connect = connect_event(4, "/hang");
        gws[0].tx.send(&connect).await.unwrap();
        assert_eq!(
            gws[0].next().await,
            BusinessToGateway::Handled {
                client: 4,
                seq: 1,
                session: None,
                refuse: Some(504)
            }
        );
        let deadline = tokio::time::Instant::now() + T;
        while links.in_flight() > 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The commands one event may hold are bounded.
        let token = 1 << 40;
        lock(&links.common.held).insert(token, (Vec::new(), 0));
        let big = BusinessToGateway::Send {
            to: crate::gateway::link::Target::All,
            message: crate::gateway::link::Payload::Binary(vec![0; MAX_HELD / 2]),
            except: vec![],
        };
        assert_eq!(links.event_command(token, big.clone()), Ok(()));
        assert_eq!(links.event_command(token, big), Err(CommandError::Full));
    }

    #[test]
    fn held_frames_stay_well_under_a_link_frame() {
        let command = |n: usize| BusinessToGateway::Send {
            to: crate::gateway::link::Target::Client(1),
            message: crate::gateway::link::Payload::Text("x".repeat(n)),
            except: vec![],
        };
        let commands = vec![
            command(100_000),
            command(400_000),
            command(10),
            command(300_000),
        ];
        assert_eq!(held_frames(1, 2, Vec::new()), vec![]);
        assert_eq!(held_frames(1, 2, vec![command(10)]).len(), 1);
        let frames = held_frames(1, 2, commands.clone());
        assert_eq!(frames.len(), 4, "{}", frames.len());
        let mut again = Vec::new();
        for f in frames {
            assert!(serde_json::to_vec(&f).unwrap().len() < MAX_FRAME);
            let BusinessToGateway::Held {
                client: 1,
                seq: 2,
                commands,
            } = f
            else {
                panic!("not held")
            };
            again.extend(commands);
        }
        assert_eq!(again, commands, "in order, none lost");
    }
}
