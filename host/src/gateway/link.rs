//! The link between a gateway process and a business worker: the typed frames each side sends
//! over the gateway's link socket (`state_dir/gateway/<group>-<slot>.sock`), framed as
//! `protocol.rs` frames are (a little-endian `u32` length, then JSON, at most
//! [`MAX_FRAME`](crate::protocol::MAX_FRAME)).
//!
//! It owns the vocabulary only: what the router does with each frame is [`super::router`]'s.
//! The event protocol (see `docs/design/gateway.md`): the gateway sends a client's events one
//! at a time, each with the client's sequence number and session; the worker answers `Handled`
//! once its handler returned (with the session, if it changed); an event whose worker left
//! before answering goes to another worker with `redelivered` set.

use serde::{Deserialize, Serialize};

/// A client of a gateway group: the gateway process's slot in the top 16 bits, so a send to
/// one client goes to the one process that holds it.
pub type ClientId = u64;

/// What a client did, in the order it did it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientEvent {
    /// The upgrade: path, query and headers of the request.
    Connect {
        path: String,
        query: String,
        headers: Vec<(String, String)>,
    },
    Text(String),
    Binary(Vec<u8>),
    /// The client left (its close code and reason; 1006 when it just disconnected).
    Close {
        code: u16,
        reason: String,
    },
}

impl ClientEvent {
    /// Bytes the event holds in a gateway's queue.
    pub fn size(&self) -> usize {
        match self {
            ClientEvent::Connect {
                path,
                query,
                headers,
            } => {
                path.len()
                    + query.len()
                    + headers
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>()
            }
            ClientEvent::Text(t) => t.len(),
            ClientEvent::Binary(b) => b.len(),
            ClientEvent::Close { reason, .. } => reason.len(),
        }
    }
}

/// From a gateway process to a business worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GatewayToBusiness {
    /// One client event to handle; answer with [`BusinessToGateway::Handled`].
    Event {
        client: ClientId,
        seq: u64,
        /// Sent before to a worker that left without answering: it may have run already.
        redelivered: bool,
        session: serde_json::Value,
        event: ClientEvent,
    },
    /// The answer to [`BusinessToGateway::Query`] `id`, for this gateway process's clients
    /// (a worker adds up the answers of every gateway).
    Answer { id: u64, answer: Answer },
}

/// Whom a send reaches (on this gateway process).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Target {
    Client(ClientId),
    /// Every client bound to this uid.
    Uid(String),
    /// Every member of this group.
    Group(String),
    All,
}

/// A presence question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Query {
    /// How many clients are bound to the uid.
    UidCount(String),
    /// How many clients the group has.
    GroupCount(String),
    /// The group's clients (at most [`MAX_MEMBERS`]).
    GroupMembers(String),
}

/// Most client ids one [`Answer::Members`] carries.
pub const MAX_MEMBERS: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    Count(u64),
    Members(Vec<ClientId>),
}

/// A message for a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    Text(String),
    Binary(Vec<u8>),
}

/// From a business worker to a gateway process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BusinessToGateway {
    /// First on a link: who the worker is (for the log).
    Hello {
        pid: u32,
        generation: u64,
    },
    /// The handler of the client's event `seq` returned; `session`: its new session. For a
    /// `Connect`, `refuse` answers the upgrade with that HTTP status (400 to 599) instead of
    /// the `101`.
    Handled {
        client: ClientId,
        seq: u64,
        #[serde(default)]
        session: Option<serde_json::Value>,
        #[serde(default)]
        refuse: Option<u16>,
    },
    /// The worker drains: no new events; those it has are still answered (or redelivered if
    /// the link drops first).
    Draining,
    /// Send a message to a client, a uid, a group or everyone, except the clients listed.
    Send {
        to: Target,
        message: Payload,
        #[serde(default)]
        except: Vec<ClientId>,
    },
    /// Bind a client to a uid (one uid per client: a new one replaces the old).
    Bind {
        client: ClientId,
        uid: String,
    },
    Unbind {
        client: ClientId,
    },
    /// Add a client to a group, or take it out.
    Join {
        client: ClientId,
        group: String,
    },
    Leave {
        client: ClientId,
        group: String,
    },
    /// A presence question, answered with [`GatewayToBusiness::Answer`].
    Query {
        id: u64,
        query: Query,
    },
    /// Close one client with a code and reason.
    Close {
        client: ClientId,
        code: u16,
        reason: String,
    },
    /// A `Send` to a uid, a group or everyone, or a count `Query`, that this gateway also
    /// carries to the other hosts of its cluster (`cluster`): a worker wraps a command so on
    /// one link only, so each command is published once. Without a cluster: the command alone.
    Cluster(Box<BusinessToGateway>),
}
