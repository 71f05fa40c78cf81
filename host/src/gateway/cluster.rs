//! The gateway's cluster link (`cluster = "redis://HOST:PORT"`): sends to a uid, a group or
//! everyone, and presence counts, reach the clients of every host, through Redis pub/sub.
//!
//! Every gateway process of every host subscribes to one channel, `host-gateway:<business>`
//! (the business group's name: the hosts of a cluster serve one business), and to a reply
//! channel of its own. A worker wraps each send to many, and each count question, in
//! `BusinessToGateway::Cluster` on one link only, so exactly one gateway of the host publishes
//! it ([`Cluster::publish`], [`Cluster::ask`]); every gateway of the other hosts applies what it
//! reads ([`FromCluster`]); those of the same host (the same node: host name, master pid and
//! its start time) skip it, their workers already told them. A question says where to answer;
//! `PUBLISH`'s receiver count says how many answers to wait for, within [`QUERY_DEADLINE`].
//! Uids and group names are data inside the JSON messages, never channel names.
//!
//! It owns the Redis connections (a subscriber, a multiplexed one to publish), their
//! reconnection (backoff from [`BACKOFF_FIRST`] to [`BACKOFF_LAST`], subscriptions made again)
//! and its bounds: at most [`MAX_QUEUED`] messages wait to be published, as many read from
//! Redis wait for the router, and a message is at most [`MAX_MESSAGE`] bytes (past any: a
//! counted error), every Redis call has [`CALL_DEADLINE`], and a `PING` every [`HEALTH_EVERY`]
//! finds a Redis that stopped answering. While Redis is down, local delivery goes on (the router's, untouched);
//! what would cross hosts fails with a counted error and a rate-limited log line, and a count
//! question gets this host's answer. It never touches a client: the router applies what it
//! reads. Client ids are per host, so a send's exclusions and a group's members stay local.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::link::{Payload, Query, Target};
use super::router::{LinkId, ToRouter};
use crate::ratelimit::RateLimit;

/// Every Redis call (connect, subscribe, a batch of publishes) ends within this, or fails.
pub(crate) const CALL_DEADLINE: Duration = Duration::from_secs(1);
/// How long a count question waits for the other hosts (the plugin's own deadline is 2 s).
pub(crate) const QUERY_DEADLINE: Duration = Duration::from_secs(1);
/// Most messages waiting to be published, and most read from Redis waiting for the router.
pub(crate) const MAX_QUEUED: usize = 4096;
/// Largest message published or read (a 512 KiB send, JSON-escaped, fits).
pub(crate) const MAX_MESSAGE: usize = 2 << 20;
/// Most questions of this process waiting for answers at once.
const MAX_ASKING: usize = 1024;
/// Most messages published in one round trip.
const BATCH: usize = 64;
/// How often an idle link checks that Redis still answers.
const HEALTH_EVERY: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);

/// Why something did not cross hosts (`gateway_cluster_errors_total{cause=...}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Redis is not reachable: the message was dropped.
    Down,
    /// [`MAX_QUEUED`] messages waited already (to be published, or to be applied here).
    QueueFull,
    /// Over [`MAX_MESSAGE`] bytes.
    TooBig,
    /// A count question's answers did not all come within [`QUERY_DEADLINE`].
    QueryTimeout,
    /// A message read from Redis that is not ours or is malformed.
    BadMessage,
}

impl Cause {
    pub(crate) const ALL: [Cause; 5] = [
        Cause::Down,
        Cause::QueueFull,
        Cause::TooBig,
        Cause::QueryTimeout,
        Cause::BadMessage,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Cause::Down => "down",
            Cause::QueueFull => "queue_full",
            Cause::TooBig => "too_big",
            Cause::QueryTimeout => "query_timeout",
            Cause::BadMessage => "bad_message",
        }
    }
}

/// The link's state and counts, read for `status` and `/metrics`.
#[derive(Default)]
pub(crate) struct ClusterCounters {
    /// A cluster is configured.
    pub(crate) configured: std::sync::atomic::AtomicBool,
    /// 1 while subscribed and able to publish.
    pub(crate) up: AtomicU64,
    /// Messages published (sends, questions, answers).
    pub(crate) published: AtomicU64,
    /// Messages read from other hosts and applied.
    pub(crate) received: AtomicU64,
    /// Times the link came up after being down (the first connection included).
    pub(crate) connects: AtomicU64,
    /// Messages read from Redis that the router has not applied yet.
    pub(crate) unapplied: AtomicU64,
    /// By [`Cause`], in [`Cause::ALL`] order.
    pub(crate) errors: [AtomicU64; 5],
}

impl ClusterCounters {
    pub(crate) fn error(&self, cause: Cause) -> u64 {
        self.errors[cause as usize].load(Ordering::Relaxed)
    }

    fn count(&self, cause: Cause) {
        self.errors[cause as usize].fetch_add(1, Ordering::Relaxed);
        static LOG: RateLimit = RateLimit::per_second();
        if let Some(suppressed) = LOG.hit_named(cause.name()) {
            let why = match cause {
                Cause::Down => "Redis is not reachable",
                Cause::QueueFull => "too many messages wait for Redis",
                Cause::TooBig => "the message is too big",
                Cause::QueryTimeout => "not every host answered in time",
                Cause::BadMessage => "a message read from Redis is malformed",
            };
            tracing::warn!(
                cause = cause.name(),
                suppressed,
                "gateway cluster: not sent across hosts: {why}"
            );
        }
    }
}

/// What goes between hosts, as JSON on the channels.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The host that published it ([`node_id`]).
    node: String,
    body: Body,
}

#[derive(Debug, Serialize, Deserialize)]
enum Body {
    /// A send to a uid, a group or everyone.
    Send {
        to: Target,
        message: Payload,
    },
    /// A count question; answer [`Body::Answer`] on `reply`.
    Ask {
        reply: String,
        id: u64,
        query: Query,
    },
    Answer {
        id: u64,
        count: u64,
    },
}

/// What the cluster task tells the router.
#[derive(Debug)]
pub(crate) enum FromCluster {
    /// Another host's send: to this process's clients.
    Send { to: Target, message: Payload },
    /// Another host's question: answer [`Cluster::answer`] with this process's count.
    Ask {
        reply: String,
        id: u64,
        query: Query,
    },
    /// The cluster-wide count for link `link`'s question `id` (this host's included).
    Answered { link: LinkId, id: u64, count: u64 },
}

/// What the router asks of the cluster task.
enum Out {
    Publish(Vec<u8>),
    /// Publish a question on the channel; then wait for its answers, adding them to `local`.
    Ask {
        bytes: Vec<u8>,
        id: u64,
        link: LinkId,
        link_query: u64,
        local: u64,
    },
    Reply {
        channel: String,
        bytes: Vec<u8>,
    },
}

/// The router's side: queues what goes to the other hosts (never waits).
pub(crate) struct Cluster {
    tx: mpsc::Sender<Out>,
    node: Arc<str>,
    reply: Arc<str>,
    next_ask: u64,
    pub(crate) counters: Arc<ClusterCounters>,
}

impl Cluster {
    /// Starts the link's task on the current runtime; what it reads goes to `router`.
    pub(crate) fn start(
        url: &str,
        business: &str,
        link_index: u32,
        master_pid: u32,
        counters: Arc<ClusterCounters>,
        router: mpsc::UnboundedSender<ToRouter>,
    ) -> Cluster {
        let node: Arc<str> = node_id(master_pid).into();
        let channel = format!("host-gateway:{business}");
        let reply: Arc<str> = format!("{channel}:reply:{node}:{link_index}").into();
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        counters.configured.store(true, Ordering::Relaxed);
        let task = Task {
            url: url.to_string(),
            channel,
            reply: reply.clone(),
            node: node.clone(),
            counters: counters.clone(),
            router,
            rx,
            tx: tx.downgrade(),
            asking: HashMap::new(),
        };
        tokio::spawn(task.run());
        tracing::info!(node = %node, "gateway cluster node");
        Cluster {
            tx,
            node,
            reply,
            next_ask: 1,
            counters,
        }
    }

    /// The router applied a message read from Redis ([`FromCluster::Send`] or `Ask`).
    pub(crate) fn applied(&self) {
        let _ = self
            .counters
            .unapplied
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Publishes a send to a uid, a group or everyone for the other hosts.
    pub(crate) fn publish(&self, to: Target, message: Payload) {
        if matches!(to, Target::Client(_)) {
            return;
        }
        if !names_ok(&to, None) {
            // No client has such a name (binds and joins refuse it): nothing to reach.
            return;
        }
        if let Some(bytes) = self.encode(Body::Send { to, message }) {
            self.queue(Out::Publish(bytes));
        }
    }

    /// Asks the other hosts `query` for link `link`'s question `link_query`; the sum (with
    /// `local`) comes back as [`FromCluster::Answered`]. `false`: it cannot be asked now (a
    /// counted error): answer `local` at once.
    pub(crate) fn ask(&mut self, link: LinkId, link_query: u64, query: Query, local: u64) -> bool {
        if self.counters.up.load(Ordering::Relaxed) == 0 {
            self.counters.count(Cause::Down);
            return false;
        }
        let id = self.next_ask;
        self.next_ask += 1;
        let body = Body::Ask {
            reply: self.reply.to_string(),
            id,
            query,
        };
        let Some(bytes) = self.encode(body) else {
            return false;
        };
        self.queue(Out::Ask {
            bytes,
            id,
            link,
            link_query,
            local,
        })
    }

    /// Answers another host's question with this process's count.
    pub(crate) fn answer(&self, reply: String, id: u64, count: u64) {
        if let Some(bytes) = self.encode(Body::Answer { id, count }) {
            self.queue(Out::Reply {
                channel: reply,
                bytes,
            });
        }
    }

    fn encode(&self, body: Body) -> Option<Vec<u8>> {
        let envelope = Envelope {
            node: self.node.to_string(),
            body,
        };
        match serde_json::to_vec(&envelope) {
            Ok(bytes) if bytes.len() <= MAX_MESSAGE => Some(bytes),
            _ => {
                self.counters.count(Cause::TooBig);
                None
            }
        }
    }

    fn queue(&self, out: Out) -> bool {
        if self.counters.up.load(Ordering::Relaxed) == 0 {
            self.counters.count(Cause::Down);
            return false;
        }
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.count(Cause::QueueFull);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.counters.count(Cause::Down);
                false
            }
        }
    }
}

/// Whether the uid or group names of a target and a question are within
/// [`MAX_NAME`](super::router::MAX_NAME) bytes.
fn names_ok(to: &Target, query: Option<&Query>) -> bool {
    let name = |n: &str| n.len() <= super::router::MAX_NAME;
    let target = match to {
        Target::Uid(n) | Target::Group(n) => name(n),
        Target::Client(_) | Target::All => true,
    };
    target
        && query.is_none_or(|q| match q {
            Query::UidCount(n) | Query::GroupCount(n) | Query::GroupMembers(n) => name(n),
        })
}

/// This host as the cluster knows it: the host name, the master's pid and the master's start
/// time (so every gateway process of one master agrees, and a later master differs).
fn node_id(master_pid: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(64)
        .collect();
    // Field 22 of /proc/PID/stat, after the command's closing parenthesis.
    let started = std::fs::read_to_string(format!("/proc/{master_pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(19).map(str::to_string)
        })
        .unwrap_or_default();
    format!("{host}:{master_pid}:{started}")
}

/// A question of this process waiting for the other hosts' answers.
struct Asking {
    link: LinkId,
    link_query: u64,
    sum: u64,
    waiting: u64,
    deadline: Instant,
}

/// The task owning the Redis connections.
struct Task {
    url: String,
    channel: String,
    reply: Arc<str>,
    node: Arc<str>,
    counters: Arc<ClusterCounters>,
    router: mpsc::UnboundedSender<ToRouter>,
    rx: mpsc::Receiver<Out>,
    /// Its own queue's sender, for answers to this host's questions (weak: the task ends once
    /// the router's [`Cluster`] is gone).
    tx: mpsc::WeakSender<Out>,
    asking: HashMap<u64, Asking>,
}

static LINK_LOG: RateLimit = RateLimit::per_second();

impl Task {
    async fn run(mut self) {
        let client = match redis::Client::open(self.url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                // The config checked the URL's form; this is what Redis's client refuses.
                tracing::error!(error = %e, "gateway cluster: cannot use the cluster URL; this host is alone");
                while let Some(out) = self.rx.recv().await {
                    self.fail(out);
                }
                return;
            }
        };
        let mut backoff = BACKOFF_FIRST;
        loop {
            match tokio::time::timeout(CALL_DEADLINE, self.connect(&client)).await {
                Ok(Ok((messages, conn))) => {
                    backoff = BACKOFF_FIRST;
                    self.counters.up.store(1, Ordering::Relaxed);
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(channel = %self.channel, "gateway cluster link up");
                    let why = self.serve(messages, conn).await;
                    self.counters.up.store(0, Ordering::Relaxed);
                    self.give_up_asking();
                    if let Some(suppressed) = LINK_LOG.hit_named("cluster lost") {
                        tracing::warn!(
                            suppressed,
                            "gateway cluster link lost ({why}); local delivery goes on, reconnecting"
                        );
                    }
                }
                Ok(Err(e)) => {
                    if let Some(suppressed) = LINK_LOG.hit_named("cluster connect") {
                        tracing::warn!(error = %e, suppressed, "gateway cluster: cannot reach Redis; retrying");
                    }
                }
                Err(_) => {
                    if let Some(suppressed) = LINK_LOG.hit_named("cluster connect") {
                        tracing::warn!(
                            suppressed,
                            "gateway cluster: Redis did not answer within {CALL_DEADLINE:?}; retrying"
                        );
                    }
                }
            }
            // Down: what is queued fails (counted) until the next try.
            let until = Instant::now() + backoff;
            loop {
                tokio::select! {
                    out = self.rx.recv() => match out {
                        Some(out) => self.fail(out),
                        None => return,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    async fn connect(
        &self,
        client: &redis::Client,
    ) -> redis::RedisResult<(redis::aio::PubSubStream, redis::aio::MultiplexedConnection)> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CALL_DEADLINE))
            .set_response_timeout(Some(CALL_DEADLINE));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        pubsub.subscribe(&*self.reply).await?;
        Ok((pubsub.into_on_message(), conn))
    }

    /// One connection, until Redis fails: what it reads to the router, what is queued to
    /// Redis (in batches, in order). Returns why it ended.
    async fn serve(
        &mut self,
        mut messages: redis::aio::PubSubStream,
        mut conn: redis::aio::MultiplexedConnection,
    ) -> String {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health = tokio::time::interval_at(Instant::now() + HEALTH_EVERY, HEALTH_EVERY);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                msg = messages.next() => match msg {
                    Some(msg) => self.read(&msg),
                    None => return "the subscription ended".into(),
                },
                n = self.rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return "the gateway is stopping".into();
                    }
                    if let Err(e) = self.publish(&mut conn, &mut batch).await {
                        return e;
                    }
                }
                _ = tick.tick() => self.expire(Instant::now()),
                // A Redis that hangs is found even by a host that publishes nothing.
                _ = health.tick() => {
                    let ping = redis::cmd("PING");
                    match tokio::time::timeout(CALL_DEADLINE, ping.query_async::<String>(&mut conn)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return format!("PING failed: {e}"),
                        Err(_) => return format!("no answer to PING within {CALL_DEADLINE:?}"),
                    }
                }
            }
        }
    }

    /// Publishes `batch` in one round trip; a question waits for as many answers as `PUBLISH`
    /// reached subscribers. On failure, each message of the batch is a counted error.
    async fn publish(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
        batch: &mut Vec<Out>,
    ) -> Result<(), String> {
        let mut pipe = redis::pipe();
        for out in batch.iter() {
            let (channel, bytes) = match out {
                Out::Publish(bytes) | Out::Ask { bytes, .. } => (self.channel.as_str(), bytes),
                Out::Reply { channel, bytes } => (channel.as_str(), bytes),
            };
            pipe.cmd("PUBLISH").arg(channel).arg(bytes.as_slice());
        }
        let sent = tokio::time::timeout(CALL_DEADLINE, pipe.query_async::<Vec<u64>>(conn)).await;
        let receivers = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                for out in batch.drain(..) {
                    self.fail(out);
                }
                return Err(format!("publish failed: {e}"));
            }
            Err(_) => {
                for out in batch.drain(..) {
                    self.fail(out);
                }
                return Err(format!("publish took over {CALL_DEADLINE:?}"));
            }
        };
        let now = Instant::now();
        for (out, reached) in batch.drain(..).zip(receivers) {
            self.counters.published.fetch_add(1, Ordering::Relaxed);
            if let Out::Ask {
                id,
                link,
                link_query,
                local,
                ..
            } = out
            {
                let asking = Asking {
                    link,
                    link_query,
                    sum: local,
                    // Every subscriber answers, this host's own with 0.
                    waiting: reached,
                    deadline: now + QUERY_DEADLINE,
                };
                if reached == 0 || self.asking.len() >= MAX_ASKING {
                    self.done(asking);
                } else {
                    self.asking.insert(id, asking);
                }
            }
        }
        Ok(())
    }

    /// One message read from Redis.
    fn read(&mut self, msg: &redis::Msg) {
        let bytes = msg.get_payload_bytes();
        let envelope =
            match (bytes.len() <= MAX_MESSAGE).then(|| serde_json::from_slice::<Envelope>(bytes)) {
                Some(Ok(e)) => e,
                _ => return self.counters.count(Cause::BadMessage),
            };
        let mine = *envelope.node == *self.node;
        let to_router = match envelope.body {
            // This host's gateways had it from their workers.
            Body::Send { .. } if mine => return,
            Body::Send { to, .. } if matches!(to, Target::Client(_)) || !names_ok(&to, None) => {
                return self.counters.count(Cause::BadMessage);
            }
            Body::Send { to, message } => FromCluster::Send { to, message },
            Body::Ask { reply, id, .. } if mine => {
                // This host counted itself through its links: it answers 0, but answers (the
                // asker waits for as many answers as `PUBLISH` reached).
                self.reply_now(reply, id, 0);
                return;
            }
            Body::Ask { reply, id, query } => {
                let ours = reply.starts_with(&format!("{}:reply:", self.channel));
                if !ours || reply.len() > 512 || !names_ok(&Target::All, Some(&query)) {
                    return self.counters.count(Cause::BadMessage);
                }
                FromCluster::Ask { reply, id, query }
            }
            Body::Answer { id, count } => {
                if let Some(a) = self.asking.get_mut(&id) {
                    a.sum = a.sum.saturating_add(count);
                    a.waiting = a.waiting.saturating_sub(1);
                    if a.waiting == 0 {
                        let a = self.asking.remove(&id).expect("present");
                        self.done(a);
                    }
                }
                return;
            }
        };
        if self.counters.unapplied.load(Ordering::Relaxed) >= MAX_QUEUED as u64 {
            return self.counters.count(Cause::QueueFull);
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.counters.unapplied.fetch_add(1, Ordering::Relaxed);
        let _ = self.router.send(ToRouter::Cluster(to_router));
    }

    /// Answers a question of this host's own (0: it counted itself) without the router.
    fn reply_now(&self, reply: String, id: u64, count: u64) {
        let envelope = Envelope {
            node: self.node.to_string(),
            body: Body::Answer { id, count },
        };
        let (Ok(bytes), Some(tx)) = (serde_json::to_vec(&envelope), self.tx.upgrade()) else {
            return;
        };
        // Into its own queue: published with the next batch (a full queue: counted).
        let out = Out::Reply {
            channel: reply,
            bytes,
        };
        if tx.try_send(out).is_err() {
            self.counters.count(Cause::QueueFull);
        }
    }

    fn done(&self, a: Asking) {
        let _ = self.router.send(ToRouter::Cluster(FromCluster::Answered {
            link: a.link,
            id: a.link_query,
            count: a.sum,
        }));
    }

    /// Questions past their deadline are answered with what came (a counted error).
    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .asking
            .iter()
            .filter(|(_, a)| now >= a.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(a) = self.asking.remove(&id) {
                self.counters.count(Cause::QueryTimeout);
                self.done(a);
            }
        }
    }

    /// The link dropped: every question waiting is answered with what came.
    fn give_up_asking(&mut self) {
        for (_, a) in std::mem::take(&mut self.asking) {
            self.counters.count(Cause::Down);
            self.done(a);
        }
    }

    /// What could not be published: counted; a question gets this host's answer.
    fn fail(&mut self, out: Out) {
        self.counters.count(Cause::Down);
        if let Out::Ask {
            link,
            link_query,
            local,
            ..
        } = out
        {
            self.done(Asking {
                link,
                link_query,
                sum: local,
                waiting: 0,
                deadline: Instant::now(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gateway_of_one_master_is_one_node() {
        let me = std::process::id();
        assert_eq!(node_id(me), node_id(me));
        assert_ne!(node_id(me), node_id(1));
        assert!(node_id(me).contains(&format!(":{me}:")), "{}", node_id(me));
    }

    #[tokio::test]
    async fn with_redis_unreachable_what_would_cross_hosts_is_counted_and_nothing_waits() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let counters = Arc::new(ClusterCounters::default());
        let (router, _rx) = mpsc::unbounded_channel();
        let url = format!("redis://127.0.0.1:{port}");
        let mut cluster =
            Cluster::start(&url, "app", 0, std::process::id(), counters.clone(), router);
        let text = |n: usize| Payload::Text("x".repeat(n));
        cluster.publish(Target::Group("room".into()), text(5));
        assert_eq!(counters.error(Cause::Down), 1);
        // A question gets this host's answer at once.
        assert!(!cluster.ask(1, 7, Query::UidCount("ann".into()), 3));
        assert_eq!(counters.error(Cause::Down), 2);
        // Too big, whatever the link's state; a name no client can have: nothing to send.
        cluster.publish(Target::All, text(MAX_MESSAGE));
        assert_eq!(counters.error(Cause::TooBig), 1);
        cluster.publish(
            Target::Uid("u".repeat(super::super::router::MAX_NAME + 1)),
            text(1),
        );
        cluster.publish(Target::Client(1), text(1));
        assert_eq!(counters.error(Cause::Down), 2);
        assert_eq!(counters.up.load(Ordering::Relaxed), 0);
        assert!(counters.configured.load(Ordering::Relaxed));
    }
}
