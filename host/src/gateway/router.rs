//! The gateway's router: which business worker gets each client event, and what happens when a
//! worker answers, drains or leaves. One task owns it (the gateway process's), fed by the client
//! tasks and the link tasks through [`ToRouter`]; it does no I/O itself: what it sends goes
//! into the clients' and links' channels, so its decisions are tested without sockets.
//!
//! The rules (`docs/design/gateway.md`): a client's events are sent one at a time, in order,
//! each with the next sequence number; the next goes once the worker answered `Handled`. A
//! client sticks to one worker while it can; a worker that drains keeps the event it has (it
//! answers it) and gets no new ones; a worker whose link drops before answering loses its
//! events to another worker, flagged `redelivered`. The commands a handler made come `Held`
//! for its event and are applied at its `Handled` (or dropped with it when its link drops
//! first): all or none, once. With no worker at all, a client's events wait up to
//! `gateway_hold`; then the client is closed with 1011 and counted. Every queue is bounded:
//! unhandled events per client by `gateway_send_queue` bytes (past it: 1013), messages queued
//! to a client by the same (past it: 1008), an event's held commands by [`MAX_HELD`] bytes.
//! A send to many clients builds its WebSocket message once; they share its bytes.
//!
//! It also keeps who is who: the uid each client is bound to and the groups it joined (a uid or
//! group name at most [`MAX_NAME`] bytes, at most [`MAX_GROUPS`] groups a client), sends to a
//! client, a uid, a group or everyone (with exclusions), and answers presence questions for this
//! process's clients. With a cluster ([`super::cluster`]), a command a worker marked for it
//! (`BusinessToGateway::Cluster`) is also handed to the cluster's queue, and what other hosts
//! send or ask is applied to this process's clients.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::link::{
    Answer, BusinessToGateway, ClientEvent, ClientId, GatewayToBusiness, MAX_HELD, MAX_MEMBERS,
    Payload, Query, Target,
};
use super::outbox;
use crate::counters::Limit;
use crate::ratelimit::RateLimit;

/// What the router tells a client's task.
#[derive(Debug, PartialEq)]
pub(crate) enum Outgoing {
    /// The business took its `Connect`: answer the upgrade with `101`.
    Accept,
    /// The business refused its `Connect`: answer the upgrade with this status.
    Refuse(u16),
    /// A message, built once for all its recipients (its bytes are shared, not copied).
    Message(Message),
    /// Close it (before the upgrade: `503`).
    Close(u16, &'static str),
}

/// A link's number within its gateway process.
pub(crate) type LinkId = u64;

/// What the client and link tasks tell the router.
pub(crate) enum ToRouter {
    /// A client upgraded: its channel, the bytes queued in it, and its `Connect` event.
    Open {
        client: ClientId,
        out: outbox::Sender,
        queued: Arc<AtomicUsize>,
        connect: ClientEvent,
    },
    Event {
        client: ClientId,
        event: ClientEvent,
    },
    LinkUp {
        link: LinkId,
        tx: mpsc::UnboundedSender<GatewayToBusiness>,
    },
    Link {
        link: LinkId,
        msg: BusinessToGateway,
    },
    LinkDown {
        link: LinkId,
    },
    /// A client its predecessor process handed over (`host upgrade`): its state, and no
    /// `Connect` (the business saw that one already).
    Adopt {
        out: outbox::Sender,
        queued: Arc<AtomicUsize>,
        state: HandedClient,
    },
    /// Hand a client over to a successor process: its state if none of its events is
    /// unhandled (it is then forgotten here, with no `Close` event), else `None`.
    Export {
        client: ClientId,
        reply: oneshot::Sender<Option<HandedClient>>,
    },
    /// From the other hosts of the cluster.
    Cluster(super::cluster::FromCluster),
}

/// What a client is, as one gateway process hands it to its successor: enough that the
/// business sees the same client (id, session, uid, groups) go on.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct HandedClient {
    pub(crate) client: ClientId,
    pub(crate) session: serde_json::Value,
    pub(crate) next_seq: u64,
    pub(crate) uid: Option<String>,
    pub(crate) groups: Vec<String>,
}

/// What the router counts (mirrored into the process's counters by its task).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RouterStats {
    /// Events sent again after their worker left.
    pub(crate) redelivered: u64,
    /// Clients closed with 1011 after `gateway_hold` without a worker.
    pub(crate) held_closed: u64,
    /// Clients closed because a queue passed `gateway_send_queue`.
    pub(crate) overflowed: u64,
    /// Events waiting for, or at, a worker.
    pub(crate) unhandled: u64,
    /// Of `overflowed`, those whose unhandled events passed it (1013; the rest: 1008).
    pub(crate) unhandled_overflowed: u64,
    /// Bytes queued to clients, not yet written (read at each tick).
    pub(crate) queued_bytes: u64,
}

struct Pending {
    seq: u64,
    event: ClientEvent,
    redelivered: bool,
}

struct Client {
    out: outbox::Sender,
    queued: Arc<AtomicUsize>,
    session: serde_json::Value,
    next_seq: u64,
    queue: VecDeque<Pending>,
    queue_bytes: usize,
    /// The link its events go to while it can take them.
    link: Option<LinkId>,
    /// The link holding the front event, unanswered.
    in_flight: Option<LinkId>,
    /// The commands its handler made so far ([`BusinessToGateway::Held`]), applied at its
    /// `Handled`, dropped if the link drops first; and their bytes.
    held: Vec<BusinessToGateway>,
    held_bytes: usize,
    /// Since when its front event waits for any worker.
    held_since: Option<Instant>,
    /// Its `Close` event is queued: it leaves once that is handled.
    closing: bool,
    uid: Option<String>,
    groups: BTreeSet<String>,
}

impl Client {
    /// A client with no event queued, no uid and no group yet.
    fn new(
        out: outbox::Sender,
        queued: Arc<AtomicUsize>,
        session: serde_json::Value,
        next_seq: u64,
    ) -> Client {
        Client {
            out,
            queued,
            session,
            next_seq,
            queue: VecDeque::new(),
            queue_bytes: 0,
            link: None,
            in_flight: None,
            held: Vec::new(),
            held_bytes: 0,
            held_since: None,
            closing: false,
            uid: None,
            groups: BTreeSet::new(),
        }
    }
}

struct Link {
    tx: mpsc::UnboundedSender<GatewayToBusiness>,
    draining: bool,
    clients: usize,
}

/// See the module doc.
pub(crate) struct Router {
    hold: Duration,
    queue_max: usize,
    clients: HashMap<ClientId, Client>,
    links: BTreeMap<LinkId, Link>,
    uids: HashMap<String, BTreeSet<ClientId>>,
    groups: HashMap<String, BTreeSet<ClientId>>,
    pub(crate) stats: RouterStats,
    cell: Option<&'static crate::counters::Counters>,
    /// The other hosts, when `cluster` is set.
    cluster: Option<super::cluster::Cluster>,
}

static CLOSED: RateLimit = RateLimit::per_second();
static REFUSED: RateLimit = RateLimit::per_second();

/// Longest uid or group name.
pub(crate) const MAX_NAME: usize = 256;
/// Most groups one client joins.
pub(crate) const MAX_GROUPS: usize = 256;

impl Router {
    pub(crate) fn new(
        hold: Duration,
        queue_max: usize,
        cell: Option<&'static crate::counters::Counters>,
    ) -> Router {
        Router {
            hold,
            queue_max,
            clients: HashMap::new(),
            links: BTreeMap::new(),
            uids: HashMap::new(),
            groups: HashMap::new(),
            stats: RouterStats::default(),
            cell,
            cluster: None,
        }
    }

    /// Carries the commands marked for the cluster to the other hosts from now on.
    pub(crate) fn set_cluster(&mut self, cluster: super::cluster::Cluster) {
        self.cluster = Some(cluster);
    }

    pub(crate) fn handle(&mut self, msg: ToRouter, now: Instant) {
        match msg {
            ToRouter::Open {
                client,
                out,
                queued,
                connect,
            } => {
                let c = Client::new(out, queued, serde_json::Value::Null, 0);
                self.clients.insert(client, c);
                self.event(client, connect, now);
            }
            ToRouter::Event { client, event } => self.event(client, event, now),
            ToRouter::LinkUp { link, tx } => {
                self.links.insert(
                    link,
                    Link {
                        tx,
                        draining: false,
                        clients: 0,
                    },
                );
                let held: Vec<ClientId> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| c.held_since.is_some())
                    .map(|(id, _)| *id)
                    .collect();
                for id in held {
                    self.dispatch(id, now);
                }
            }
            ToRouter::Link { link, msg } => self.link_said(link, msg, now),
            ToRouter::LinkDown { link } => self.link_down(link, now),
            ToRouter::Adopt { out, queued, state } => self.adopt(out, queued, state),
            ToRouter::Export { client, reply } => {
                let _ = reply.send(self.export(client));
            }
            ToRouter::Cluster(msg) => self.cluster_said(msg),
        }
    }

    /// What another host sent or asked, or the answer to a question this process asked.
    fn cluster_said(&mut self, msg: super::cluster::FromCluster) {
        use super::cluster::FromCluster;
        match msg {
            FromCluster::Send { to, message } => {
                if let Some(cluster) = &self.cluster {
                    cluster.applied();
                }
                // Exclusions are client ids of the sending host: none applies here.
                let message = message.into_message();
                for id in self.recipients(&to) {
                    // A clone shares the bytes: a broadcast holds its message once.
                    self.send(id, message.clone());
                }
            }
            FromCluster::Ask { reply, id, query } => {
                if let Some(cluster) = &self.cluster {
                    cluster.applied();
                }
                if let (Some(cluster), Answer::Count(n)) = (&self.cluster, self.answer(&query)) {
                    cluster.answer(reply, id, n);
                }
            }
            FromCluster::Answered { link, id, count } => {
                if let Some(l) = self.links.get(&link) {
                    let answer = Answer::Count(count);
                    let _ = l.tx.send(GatewayToBusiness::Answer { id, answer });
                }
            }
        }
    }

    /// This process's answer to a presence question.
    fn answer(&self, query: &Query) -> Answer {
        match query {
            Query::UidCount(uid) => Answer::Count(self.uids.get(uid).map_or(0, |s| s.len() as u64)),
            Query::GroupCount(g) => Answer::Count(self.groups.get(g).map_or(0, |s| s.len() as u64)),
            Query::GroupMembers(g) => Answer::Members(
                self.groups
                    .get(g)
                    .into_iter()
                    .flatten()
                    .take(MAX_MEMBERS)
                    .copied()
                    .collect(),
            ),
        }
    }

    /// Takes in a client handed over by the predecessor process (an id already here: closed
    /// with 1012, to come back as a new client).
    fn adopt(&mut self, out: outbox::Sender, queued: Arc<AtomicUsize>, state: HandedClient) {
        let id = state.client;
        if self.clients.contains_key(&id) {
            let _ = out.send(Outgoing::Close(1012, "gateway restarting"));
            return;
        }
        let c = Client::new(out, queued, state.session, state.next_seq);
        self.clients.insert(id, c);
        self.bind(id, state.uid);
        for group in state.groups {
            self.join(id, group);
        }
    }

    /// See [`ToRouter::Export`].
    fn export(&mut self, id: ClientId) -> Option<HandedClient> {
        let c = self.clients.get(&id)?;
        if !c.queue.is_empty() || c.in_flight.is_some() || !c.held.is_empty() || c.closing {
            return None;
        }
        let c = self.remove(id)?;
        Some(HandedClient {
            client: id,
            session: c.session,
            next_seq: c.next_seq,
            uid: c.uid,
            groups: c.groups.into_iter().collect(),
        })
    }

    /// Closes the clients whose events waited `gateway_hold` for a worker, and counts the
    /// events unhandled (here, not at each step: it reads every client).
    pub(crate) fn tick(&mut self, now: Instant) {
        let expired: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.held_since.is_some_and(|t| now >= t + self.hold))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(c) = self.remove(id) {
                let _ = c.out.send(Outgoing::Close(1011, "no business worker"));
                self.stats.held_closed += 1;
                if let Some(suppressed) = CLOSED.hit_named("gateway_hold") {
                    tracing::warn!(
                        suppressed,
                        hold_ms = self.hold.as_millis() as u64,
                        "gateway closed a client (1011): no business worker took its events within gateway_hold"
                    );
                }
            }
        }
        self.count_unhandled();
    }

    fn count_unhandled(&mut self) {
        self.stats.unhandled = self.clients.values().map(|c| c.queue.len() as u64).sum();
        self.stats.queued_bytes = self
            .clients
            .values()
            .map(|c| c.queued.load(Ordering::Relaxed) as u64)
            .sum();
    }

    fn event(&mut self, id: ClientId, event: ClientEvent, now: Instant) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.closing {
            return;
        }
        let size = event.size();
        let close = matches!(event, ClientEvent::Close { .. });
        if !close && c.queue_bytes + size > self.queue_max {
            self.overflow(id, 1013, "too many unhandled messages");
            return;
        }
        c.closing = close;
        c.queue_bytes += size;
        c.queue.push_back(Pending {
            seq: c.next_seq,
            event,
            redelivered: false,
        });
        c.next_seq += 1;
        self.dispatch(id, now);
    }

    /// Sends the client's front event to a worker, unless one is in flight; holds it when no
    /// worker can take it; lets the client go once its `Close` was handled.
    fn dispatch(&mut self, id: ClientId, now: Instant) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        if c.in_flight.is_some() {
            return;
        }
        let Some(front) = c.queue.front() else {
            if c.closing {
                self.remove(id);
            }
            return;
        };
        let usable = |l: &LinkId| self.links.get(l).is_some_and(|l| !l.draining);
        let link = c.link.filter(usable).or_else(|| {
            self.links
                .iter()
                .filter(|(_, l)| !l.draining)
                .min_by_key(|(_, l)| l.clients)
                .map(|(id, _)| *id)
        });
        let Some(link) = link else {
            let c = self.clients.get_mut(&id).expect("present");
            c.held_since.get_or_insert(now);
            return;
        };
        let event = GatewayToBusiness::Event {
            client: id,
            seq: front.seq,
            redelivered: front.redelivered,
            session: c.session.clone(),
            event: front.event.clone(),
        };
        let old = c.link;
        if old != Some(link) {
            if let Some(l) = old.and_then(|o| self.links.get_mut(&o)) {
                l.clients = l.clients.saturating_sub(1);
            }
            if let Some(l) = self.links.get_mut(&link) {
                l.clients += 1;
            }
        }
        let sent = self.links[&link].tx.send(event).is_ok();
        let c = self.clients.get_mut(&id).expect("present");
        c.link = Some(link);
        c.in_flight = Some(link);
        c.held_since = None;
        if !sent {
            // Its writer is gone (the worker left): it gets no new events, and this one stays
            // in flight there until the link's reader ends ([`ToRouter::LinkDown`]), after
            // every answer the worker sent before it left was read; then it is redelivered.
            // Declaring the link down here would redeliver events whose answers are still
            // on their way: a duplicate.
            if let Some(l) = self.links.get_mut(&link) {
                l.draining = true;
            }
        }
    }

    fn link_said(&mut self, link: LinkId, msg: BusinessToGateway, now: Instant) {
        match msg {
            BusinessToGateway::Hello { .. } => {
                if let Some(l) = self.links.get(&link) {
                    let _ = l.tx.send(GatewayToBusiness::Welcome);
                }
            }
            BusinessToGateway::Held {
                client,
                seq,
                commands,
            } => self.hold(link, client, seq, commands),
            BusinessToGateway::Handled {
                client,
                seq,
                session,
                refuse,
            } => {
                let Some(c) = self.clients.get_mut(&client) else {
                    return;
                };
                // Only the answer of the worker that holds the front event counts: a late one
                // from a worker that lost it is ignored.
                if c.in_flight != Some(link) || c.queue.front().is_none_or(|p| p.seq != seq) {
                    return;
                }
                // The event's commands first, all of them (they may close the client, or
                // overflow its queue: then it is gone).
                let held = std::mem::take(&mut c.held);
                c.held_bytes = 0;
                for command in held {
                    self.link_said(link, command, now);
                }
                let Some(c) = self.clients.get_mut(&client) else {
                    return;
                };
                let done = c.queue.pop_front().expect("front");
                c.queue_bytes -= done.event.size();
                c.in_flight = None;
                if let ClientEvent::Connect { .. } = done.event {
                    match refuse {
                        Some(status) => {
                            let status = if (400..600).contains(&status) {
                                status
                            } else {
                                403
                            };
                            let _ = c.out.send(Outgoing::Refuse(status));
                            // It never upgraded: no `Close` event follows.
                            self.remove(client);
                            return;
                        }
                        None => {
                            let _ = c.out.send(Outgoing::Accept);
                        }
                    }
                }
                if let Some(session) = session {
                    let size = serde_json::to_vec(&session).map_or(usize::MAX, |v| v.len());
                    if size <= self.queue_max {
                        c.session = session;
                    } else if let Some(suppressed) = CLOSED.hit_named("gateway session") {
                        tracing::warn!(
                            size,
                            suppressed,
                            "a session over gateway_send_queue bytes was not kept"
                        );
                    }
                }
                self.dispatch(client, now);
            }
            BusinessToGateway::Draining => {
                if let Some(l) = self.links.get_mut(&link) {
                    l.draining = true;
                }
                // Clients with nothing in flight there move on their next event; those with
                // one move once it is answered (or the link drops).
            }
            BusinessToGateway::Send {
                to,
                message,
                except,
            } => {
                let except: BTreeSet<ClientId> = except.into_iter().collect();
                let message = message.into_message();
                for id in self.recipients(&to) {
                    if !except.contains(&id) {
                        // A clone shares the bytes: a broadcast holds its message once.
                        self.send(id, message.clone());
                    }
                }
            }
            BusinessToGateway::Bind { client, uid } => self.bind(client, Some(uid)),
            BusinessToGateway::Unbind { client } => self.bind(client, None),
            BusinessToGateway::Join { client, group } => self.join(client, group),
            BusinessToGateway::Leave { client, group } => {
                if let Some(c) = self.clients.get_mut(&client)
                    && c.groups.remove(&group)
                {
                    forget(&mut self.groups, &group, client);
                }
            }
            BusinessToGateway::Query { id, query } => {
                let answer = self.answer(&query);
                if let Some(l) = self.links.get(&link) {
                    let _ = l.tx.send(GatewayToBusiness::Answer { id, answer });
                }
            }
            BusinessToGateway::Cluster(command) => match *command {
                BusinessToGateway::Send {
                    to,
                    message,
                    except,
                } => {
                    if let Some(cluster) = &self.cluster {
                        cluster.publish(to.clone(), message.clone());
                    }
                    let send = BusinessToGateway::Send {
                        to,
                        message,
                        except,
                    };
                    self.link_said(link, send, now);
                }
                BusinessToGateway::Query { id, query } => {
                    let local = self.answer(&query);
                    let asked = match (&mut self.cluster, &local) {
                        (Some(cluster), Answer::Count(n)) => {
                            cluster.ask(link, id, query.clone(), *n)
                        }
                        _ => false,
                    };
                    if !asked && let Some(l) = self.links.get(&link) {
                        let _ = l.tx.send(GatewayToBusiness::Answer { id, answer: local });
                    }
                }
                // Only sends and questions cross hosts; a wrapped anything else (or a wrapper
                // in a wrapper) is applied here alone.
                BusinessToGateway::Cluster(inner) => self.link_said(link, *inner, now),
                other => self.link_said(link, other, now),
            },
            BusinessToGateway::Close {
                client,
                code,
                reason: _,
            } => {
                if let Some(c) = self.clients.get(&client) {
                    let code = if (3000..5000).contains(&code) || code == 1000 {
                        code
                    } else {
                        1000
                    };
                    let _ = c
                        .out
                        .send(Outgoing::Close(code, "closed by the application"));
                }
            }
        }
    }

    /// The clients a send to `to` reaches, in id order.
    fn recipients(&self, to: &Target) -> Vec<ClientId> {
        let mut ids: Vec<ClientId> = match to {
            Target::Client(id) => vec![*id],
            Target::Uid(uid) => self.uids.get(uid).into_iter().flatten().copied().collect(),
            Target::Group(g) => self.groups.get(g).into_iter().flatten().copied().collect(),
            Target::All => self.clients.keys().copied().collect(),
        };
        ids.sort_unstable();
        ids
    }

    /// Binds a client to `uid` (replacing its uid), or unbinds it.
    fn bind(&mut self, id: ClientId, uid: Option<String>) {
        if uid.as_ref().is_some_and(|u| u.len() > MAX_NAME) {
            refused("a uid over 256 bytes");
            return;
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if let Some(old) = std::mem::replace(&mut c.uid, uid.clone()) {
            forget(&mut self.uids, &old, id);
        }
        if let Some(uid) = uid {
            self.uids.entry(uid).or_default().insert(id);
        }
    }

    fn join(&mut self, id: ClientId, group: String) {
        if group.len() > MAX_NAME {
            refused("a group name over 256 bytes");
            return;
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.groups.len() >= MAX_GROUPS && !c.groups.contains(&group) {
            refused("a client in 256 groups already");
            return;
        }
        if c.groups.insert(group.clone()) {
            self.groups.entry(group).or_default().insert(id);
        }
    }

    /// Keeps the commands the handler of `client`'s event `seq` made, if `link` holds that
    /// event (else they are a lost event's, and dropped), within [`MAX_HELD`] bytes.
    fn hold(&mut self, link: LinkId, client: ClientId, seq: u64, commands: Vec<BusinessToGateway>) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        if c.in_flight != Some(link) || c.queue.front().is_none_or(|p| p.seq != seq) {
            return;
        }
        for command in commands {
            let size = command.size();
            let allowed = match &command {
                // A send to many, marked for the cluster (published at the `Handled`).
                BusinessToGateway::Cluster(inner) => {
                    matches!(**inner, BusinessToGateway::Send { .. })
                }
                other => matches!(
                    other,
                    BusinessToGateway::Send { .. }
                        | BusinessToGateway::Bind { .. }
                        | BusinessToGateway::Unbind { .. }
                        | BusinessToGateway::Join { .. }
                        | BusinessToGateway::Leave { .. }
                        | BusinessToGateway::Close { .. }
                ),
            };
            if !allowed {
                refused("an event's held command that is not a send, bind, join or close");
            } else if c.held_bytes + size > MAX_HELD {
                // The worker keeps to the same bound: only a worker gone wrong gets here.
                if let Some(cell) = self.cell {
                    cell.limit_hit(Limit::GatewayCommand);
                }
                refused("an event's commands over 8 MiB");
            } else {
                c.held_bytes += size;
                c.held.push(command);
            }
        }
    }

    /// Queues a message for a client, within `gateway_send_queue` bytes.
    fn send(&mut self, id: ClientId, message: Message) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let size = message.len();
        if c.queued.load(Ordering::Acquire) + size > self.queue_max {
            self.overflow(id, 1008, "send queue full");
            return;
        }
        c.queued.fetch_add(size, Ordering::AcqRel);
        let _ = c.out.send(Outgoing::Message(message));
    }

    /// Closes a client whose queue passed its bound; it leaves the router at once.
    fn overflow(&mut self, id: ClientId, code: u16, why: &'static str) {
        if let Some(c) = self.remove(id) {
            let _ = c.out.send(Outgoing::Close(code, why));
            self.stats.overflowed += 1;
            if code == 1013 {
                self.stats.unhandled_overflowed += 1;
            }
            if let Some(cell) = self.cell {
                cell.limit_hit(Limit::GatewaySendQueue);
            }
            if let Some(suppressed) = CLOSED.hit_named(why) {
                tracing::warn!(
                    code,
                    suppressed,
                    "gateway closed a client: {why} (gateway_send_queue)"
                );
            }
        }
    }

    /// A worker's link is gone: its unanswered events go to other workers, flagged.
    fn link_down(&mut self, link: LinkId, now: Instant) {
        if self.links.remove(&link).is_none() {
            return;
        }
        let mut moved = Vec::new();
        for (id, c) in &mut self.clients {
            if c.link == Some(link) {
                c.link = None;
            }
            if c.in_flight == Some(link) {
                c.in_flight = None;
                // What its handler made is dropped with it: the redelivery makes it again.
                c.held.clear();
                c.held_bytes = 0;
                if let Some(front) = c.queue.front_mut() {
                    front.redelivered = true;
                }
                self.stats.redelivered += 1;
                moved.push(*id);
            }
        }
        moved.sort_unstable();
        for id in moved {
            self.dispatch(id, now);
        }
    }

    fn remove(&mut self, id: ClientId) -> Option<Client> {
        let c = self.clients.remove(&id)?;
        if let Some(uid) = &c.uid {
            forget(&mut self.uids, uid, id);
        }
        for g in &c.groups {
            forget(&mut self.groups, g, id);
        }
        if let Some(l) = c.link.and_then(|l| self.links.get_mut(&l)) {
            l.clients = l.clients.saturating_sub(1);
        }
        Some(c)
    }
}

impl Payload {
    /// The WebSocket message, whose clones share its bytes.
    fn into_message(self) -> Message {
        match self {
            Payload::Text(t) => Message::Text(t.into()),
            Payload::Binary(b) => Message::Binary(b.into()),
        }
    }
}

/// Takes `id` out of `name`'s set, and the set out of `map` once empty.
fn forget(map: &mut HashMap<String, BTreeSet<ClientId>>, name: &str, id: ClientId) {
    if let Some(set) = map.get_mut(name) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(name);
        }
    }
}

/// Logs (at most once a second) a command refused at a bound.
fn refused(what: &'static str) {
    if let Some(suppressed) = REFUSED.hit_named(what) {
        tracing::warn!(suppressed, "gateway refused a business command: {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> ClientEvent {
        ClientEvent::Text(s.into())
    }

    struct Fixture {
        router: Router,
        now: Instant,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                router: Router::new(Duration::from_secs(1), 1000, None),
                now: Instant::now(),
            }
        }
        fn link(&mut self, id: LinkId) -> mpsc::UnboundedReceiver<GatewayToBusiness> {
            let (tx, rx) = mpsc::unbounded_channel();
            self.router
                .handle(ToRouter::LinkUp { link: id, tx }, self.now);
            rx
        }
        fn client(&mut self, id: ClientId) -> outbox::Receiver {
            let (out, rx) = outbox::channel();
            let connect = ClientEvent::Connect {
                path: "/chat".into(),
                query: String::new(),
                headers: Vec::new(),
            };
            let queued = Arc::default();
            self.router.handle(
                ToRouter::Open {
                    client: id,
                    out,
                    queued,
                    connect,
                },
                self.now,
            );
            rx
        }
        fn send(&mut self, client: ClientId, event: ClientEvent) {
            self.router
                .handle(ToRouter::Event { client, event }, self.now);
        }
        fn handled(&mut self, link: LinkId, client: ClientId, seq: u64) {
            let msg = BusinessToGateway::Handled {
                client,
                seq,
                session: Some(serde_json::json!({ "seen": seq })),
                refuse: None,
            };
            self.router.handle(ToRouter::Link { link, msg }, self.now);
        }
    }

    /// (client, seq, redelivered, event) of each event waiting in `rx`.
    fn events(
        rx: &mut mpsc::UnboundedReceiver<GatewayToBusiness>,
    ) -> Vec<(u64, u64, bool, ClientEvent)> {
        let mut out = Vec::new();
        while let Ok(GatewayToBusiness::Event {
            client,
            seq,
            redelivered,
            event,
            ..
        }) = rx.try_recv()
        {
            out.push((client, seq, redelivered, event));
        }
        out
    }

    #[test]
    fn one_event_in_flight_per_client_in_order_with_the_session() {
        let mut f = Fixture::new();
        let mut a = f.link(1);
        let _c = f.client(7);
        f.send(7, text("one"));
        f.send(7, text("two"));
        let got = events(&mut a);
        assert_eq!(got.len(), 1, "only the connect is in flight: {got:?}");
        assert_eq!(got[0].1, 0);
        f.handled(1, 7, 0);
        assert_eq!(events(&mut a), vec![(7, 1, false, text("one"))]);
        // A stale or wrong answer changes nothing.
        f.handled(1, 7, 0);
        f.handled(2, 7, 1);
        assert_eq!(events(&mut a), vec![]);
        f.handled(1, 7, 1);
        let Ok(GatewayToBusiness::Event { seq, session, .. }) = a.try_recv() else {
            panic!("expected the next event");
        };
        assert_eq!((seq, session), (2, serde_json::json!({ "seen": 1 })));
        f.router.tick(f.now);
        assert_eq!(f.router.stats.unhandled, 1);
    }

    #[test]
    fn a_lost_link_redelivers_flagged_to_another_and_a_draining_one_keeps_its_event() {
        let mut f = Fixture::new();
        let mut a = f.link(1);
        let _c = f.client(7);
        f.handled(1, 7, 0);
        f.send(7, text("m1"));
        assert_eq!(
            events(&mut a),
            vec![
                (
                    7,
                    0,
                    false,
                    ClientEvent::Connect {
                        path: "/chat".into(),
                        query: String::new(),
                        headers: Vec::new()
                    }
                ),
                (7, 1, false, text("m1"))
            ]
        );
        let mut b = f.link(2);
        f.router.handle(ToRouter::LinkDown { link: 1 }, f.now);
        assert_eq!(events(&mut b), vec![(7, 1, true, text("m1"))]);
        assert_eq!(f.router.stats.redelivered, 1);
        // b drains: it answers what it has; the next event goes to c.
        let mut c = f.link(3);
        f.router.handle(
            ToRouter::Link {
                link: 2,
                msg: BusinessToGateway::Draining,
            },
            f.now,
        );
        f.send(7, text("m2"));
        assert_eq!(events(&mut c), vec![]);
        f.handled(2, 7, 1);
        assert_eq!(events(&mut c), vec![(7, 2, false, text("m2"))]);
        assert_eq!(events(&mut b), vec![]);
    }

    #[test]
    fn with_no_worker_events_wait_for_the_hold_then_the_client_is_closed_1011() {
        let mut f = Fixture::new();
        let mut out = f.client(7);
        f.send(7, text("m1"));
        f.router.tick(f.now + Duration::from_millis(900));
        assert!(out.try_recv().is_err());
        // A worker in time gets the events, in order.
        let mut a = f.link(1);
        assert_eq!(events(&mut a).len(), 1);
        f.handled(1, 7, 0);
        assert_eq!(events(&mut a), vec![(7, 1, false, text("m1"))]);
        // Another client, with no worker past the hold: 1011.
        f.router.handle(ToRouter::LinkDown { link: 1 }, f.now);
        let mut out8 = f.client(8);
        f.router.tick(f.now + Duration::from_secs(1));
        assert_eq!(
            out8.try_recv().unwrap(),
            Outgoing::Close(1011, "no business worker")
        );
        assert_eq!(out.try_recv().unwrap(), Outgoing::Accept);
        assert_eq!(
            out.try_recv().unwrap(),
            Outgoing::Close(1011, "no business worker")
        );
        assert_eq!(f.router.stats.held_closed, 2);
    }

    #[test]
    fn queues_are_bounded() {
        let mut f = Fixture::new();
        let mut out = f.client(7);
        f.send(7, text(&"x".repeat(600)));
        f.send(7, text(&"x".repeat(600)));
        assert_eq!(
            out.try_recv().unwrap(),
            Outgoing::Close(1013, "too many unhandled messages")
        );
        let _a = f.link(1);
        let mut out = f.client(8);
        let big = "y".repeat(600);
        for _ in 0..2 {
            let msg = BusinessToGateway::Send {
                to: Target::Client(8),
                message: Payload::Text(big.clone()),
                except: Vec::new(),
            };
            f.router.handle(ToRouter::Link { link: 1, msg }, f.now);
        }
        assert_eq!(
            out.try_recv().unwrap(),
            Outgoing::Message(Message::Text(big.into()))
        );
        assert_eq!(
            out.try_recv().unwrap(),
            Outgoing::Close(1008, "send queue full")
        );
        assert_eq!(f.router.stats.overflowed, 2);
    }

    fn said(f: &mut Fixture, msg: BusinessToGateway) {
        f.router.handle(ToRouter::Link { link: 1, msg }, f.now);
    }

    fn texts(rx: &mut outbox::Receiver) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Outgoing::Message(Message::Text(t))) = rx.try_recv() {
            out.push(t.as_str().to_owned());
        }
        out
    }

    #[test]
    fn what_is_marked_for_the_cluster_is_applied_here_once_and_other_hosts_sends_too() {
        use crate::gateway::cluster::FromCluster;
        let mut f = Fixture::new();
        let mut a = f.link(1);
        let mut c7 = f.client(7);
        let mut c8 = f.client(8);
        for client in [7, 8] {
            let group = "room".into();
            said(&mut f, BusinessToGateway::Join { client, group });
        }
        let _ = events(&mut a);
        // Without a cluster, a marked send or question is the command alone.
        let send = BusinessToGateway::Send {
            to: Target::Group("room".into()),
            message: Payload::Text("hi".into()),
            except: vec![8],
        };
        said(&mut f, BusinessToGateway::Cluster(Box::new(send)));
        let query = BusinessToGateway::Query {
            id: 4,
            query: Query::GroupCount("room".into()),
        };
        said(&mut f, BusinessToGateway::Cluster(Box::new(query)));
        assert_eq!(texts(&mut c7), ["hi"]);
        assert!(texts(&mut c8).is_empty());
        let answer = GatewayToBusiness::Answer {
            id: 4,
            answer: Answer::Count(2),
        };
        assert_eq!(a.try_recv().ok(), Some(answer));
        // Another host's send reaches the group here (its exclusions are its own clients'
        // ids, so none applies); the cluster's sum for a question goes to the asking link.
        let from = |msg| ToRouter::Cluster(msg);
        let remote = FromCluster::Send {
            to: Target::Group("room".into()),
            message: Payload::Text("from afar".into()),
        };
        f.router.handle(from(remote), f.now);
        assert_eq!(texts(&mut c7), ["from afar"]);
        assert_eq!(texts(&mut c8), ["from afar"]);
        let sum = FromCluster::Answered {
            link: 1,
            id: 5,
            count: 9,
        };
        f.router.handle(from(sum), f.now);
        let answer = GatewayToBusiness::Answer {
            id: 5,
            answer: Answer::Count(9),
        };
        assert_eq!(a.try_recv().ok(), Some(answer));
    }

    #[test]
    fn uids_groups_sends_with_exclusions_and_presence() {
        let mut f = Fixture::new();
        let mut a = f.link(1);
        let mut c7 = f.client(7);
        let mut c8 = f.client(8);
        let mut c9 = f.client(9);
        let bind = |client, uid: &str| BusinessToGateway::Bind {
            client,
            uid: uid.into(),
        };
        let join = |client, group: &str| BusinessToGateway::Join {
            client,
            group: group.into(),
        };
        said(&mut f, bind(7, "ann"));
        said(&mut f, bind(8, "ann"));
        said(&mut f, bind(9, "bob"));
        said(&mut f, join(7, "room"));
        said(&mut f, join(9, "room"));
        let send = |to, text: &str, except: Vec<ClientId>| BusinessToGateway::Send {
            to,
            message: Payload::Text(text.into()),
            except,
        };
        said(&mut f, send(Target::Uid("ann".into()), "to ann", vec![]));
        said(
            &mut f,
            send(Target::Group("room".into()), "to room", vec![7]),
        );
        said(&mut f, send(Target::All, "to all", vec![8]));
        said(&mut f, send(Target::Client(9), "to 9", vec![]));
        assert_eq!(texts(&mut c7), ["to ann", "to all"]);
        assert_eq!(texts(&mut c8), ["to ann"]);
        assert_eq!(texts(&mut c9), ["to room", "to all", "to 9"]);

        // Presence, answered on the asking link.
        let _ = events(&mut a);
        let ask = |id, query| BusinessToGateway::Query { id, query };
        said(&mut f, ask(1, Query::UidCount("ann".into())));
        said(&mut f, ask(2, Query::GroupMembers("room".into())));
        said(&mut f, ask(3, Query::GroupCount("nobody".into())));
        let answers: Vec<_> = std::iter::from_fn(|| a.try_recv().ok()).collect();
        assert_eq!(
            answers,
            [
                GatewayToBusiness::Answer {
                    id: 1,
                    answer: Answer::Count(2)
                },
                GatewayToBusiness::Answer {
                    id: 2,
                    answer: Answer::Members(vec![7, 9])
                },
                GatewayToBusiness::Answer {
                    id: 3,
                    answer: Answer::Count(0)
                },
            ]
        );

        // A new uid replaces the old; leave, unbind; a client that leaves is forgotten.
        said(&mut f, bind(8, "cat"));
        said(
            &mut f,
            BusinessToGateway::Leave {
                client: 9,
                group: "room".into(),
            },
        );
        said(&mut f, BusinessToGateway::Unbind { client: 9 });
        f.handled(1, 7, 0);
        f.send(
            7,
            ClientEvent::Close {
                code: 1000,
                reason: String::new(),
            },
        );
        f.handled(1, 7, 1);
        assert!(!f.router.uids.contains_key("ann") && f.router.groups.is_empty());
        assert_eq!(f.router.uids.keys().collect::<Vec<_>>(), ["cat"]);

        // Bounds: names, and groups per client.
        said(&mut f, bind(8, &"u".repeat(MAX_NAME + 1)));
        assert_eq!(f.router.clients[&8].uid.as_deref(), Some("cat"));
        for g in 0..MAX_GROUPS + 5 {
            said(&mut f, join(8, &format!("g{g}")));
        }
        assert_eq!(f.router.clients[&8].groups.len(), MAX_GROUPS);
        assert_eq!(f.router.groups.len(), MAX_GROUPS);
    }

    #[test]
    fn a_link_whose_writer_is_gone_keeps_its_event_until_its_answers_are_read() {
        let mut f = Fixture::new();
        let a = f.link(1);
        drop(a);
        let _c = f.client(7);
        // The worker's answer, read after its writer failed, still counts: no duplicate.
        f.handled(1, 7, 0);
        let mut b = f.link(2);
        f.send(7, text("m1"));
        assert_eq!(events(&mut b), vec![(7, 1, false, text("m1"))]);
        assert_eq!(f.router.stats.redelivered, 0);
        // And an event it never answered goes on when its reader ends.
        let mut f = Fixture::new();
        drop(f.link(1));
        let _c = f.client(7);
        let mut b = f.link(2);
        assert_eq!(events(&mut b), vec![]);
        f.router.handle(ToRouter::LinkDown { link: 1 }, f.now);
        assert_eq!(events(&mut b).len(), 1);
        assert_eq!(f.router.stats.redelivered, 1);
    }

    #[test]
    fn a_connect_is_accepted_or_refused_by_its_answer() {
        let mut f = Fixture::new();
        let _a = f.link(1);
        let mut yes = f.client(7);
        let mut no = f.client(8);
        f.handled(1, 7, 0);
        let msg = BusinessToGateway::Handled {
            client: 8,
            seq: 0,
            session: None,
            refuse: Some(401),
        };
        said(&mut f, msg);
        assert_eq!(yes.try_recv().unwrap(), Outgoing::Accept);
        assert_eq!(no.try_recv().unwrap(), Outgoing::Refuse(401));
        assert!(f.router.clients.contains_key(&7) && !f.router.clients.contains_key(&8));
    }

    #[test]
    fn an_events_held_commands_apply_at_its_handled_or_go_with_a_lost_link() {
        let mut f = Fixture::new();
        let mut a = f.link(1);
        said(
            &mut f,
            BusinessToGateway::Hello {
                pid: 1,
                generation: 1,
            },
        );
        assert_eq!(a.try_recv().unwrap(), GatewayToBusiness::Welcome);
        let mut c7 = f.client(7);
        f.handled(1, 7, 0);
        assert_eq!(c7.try_recv().unwrap(), Outgoing::Accept);
        let _ = events(&mut a);
        let echo = |text: &str| BusinessToGateway::Send {
            to: Target::Client(7),
            message: Payload::Text(text.into()),
            except: vec![],
        };
        let held = |seq, commands| BusinessToGateway::Held {
            client: 7,
            seq,
            commands,
        };
        f.send(7, text("m1"));
        assert_eq!(events(&mut a), vec![(7, 1, false, text("m1"))]);
        said(&mut f, held(1, vec![echo("one"), echo("two")]));
        // Held for another event, or another link's: dropped.
        said(&mut f, held(0, vec![echo("stale")]));
        f.router.handle(
            ToRouter::Link {
                link: 2,
                msg: held(1, vec![echo("not its link")]),
            },
            f.now,
        );
        // Only the links' own commands are applied.
        said(
            &mut f,
            held(
                1,
                vec![BusinessToGateway::Query {
                    id: 1,
                    query: Query::UidCount("x".into()),
                }],
            ),
        );
        assert_eq!(
            texts(&mut c7),
            Vec::<String>::new(),
            "nothing before the Handled"
        );
        f.handled(1, 7, 1);
        assert_eq!(texts(&mut c7), ["one", "two"]);
        assert!(a.try_recv().is_err(), "the held question was not answered");

        // The link drops after the event's commands came, before its Handled: none applied;
        // the redelivery's own commands are, once.
        let mut b = f.link(2);
        f.send(7, text("m2"));
        said(&mut f, held(2, vec![echo("m2 first")]));
        f.router.handle(ToRouter::LinkDown { link: 1 }, f.now);
        assert_eq!(events(&mut b), vec![(7, 2, true, text("m2"))]);
        f.router.handle(
            ToRouter::Link {
                link: 2,
                msg: held(2, vec![echo("m2 again")]),
            },
            f.now,
        );
        f.handled(2, 7, 2);
        assert_eq!(texts(&mut c7), ["m2 again"]);
    }
}
