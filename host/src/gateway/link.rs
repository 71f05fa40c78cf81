//! The link between a gateway process and a business worker: the typed frames each side sends
//! over the gateway's link socket (`state_dir/gateway/<group>-<slot>.sock`), framed as
//! `protocol.rs` frames are (a little-endian `u32` length, then JSON, at most
//! [`MAX_FRAME`](crate::protocol::MAX_FRAME); binary payloads as base64).
//!
//! It owns the vocabulary only: what the router does with each frame is [`super::router`]'s.
//! The event protocol (see `docs/design/gateway.md`): the gateway sends a client's events one
//! at a time, each with the client's sequence number and session; the worker answers `Handled`
//! once its handler returned (with the session, if it changed), right after the commands the
//! handler made (`Held`, applied at the `Handled`); an event whose worker left before
//! answering goes to another worker with `redelivered` set. A worker's `Hello` is answered
//! `Welcome`.

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
    /// Base64 in the frame ([`plugin_api::gateway::base64_bytes`]).
    Binary(#[serde(with = "plugin_api::gateway::base64_bytes")] Vec<u8>),
    /// The client left (its close code and reason; 1006 when it just disconnected).
    Close {
        code: u16,
        reason: String,
    },
}

/// Most bytes of commands one event's handler may make (their [`BusinessToGateway::size`]);
/// the worker refuses more (`Full`), and a gateway drops what passes it.
pub const MAX_HELD: usize = 8 << 20;

impl BusinessToGateway {
    /// Bytes the command holds (its payload and names), about what it costs a gateway.
    pub fn size(&self) -> usize {
        match self {
            BusinessToGateway::Send {
                to,
                message,
                except,
            } => {
                let to = match to {
                    Target::Uid(s) | Target::Group(s) => s.len(),
                    Target::Client(_) | Target::All => 8,
                };
                to + message.size() + except.len() * 8
            }
            BusinessToGateway::Bind { uid: s, .. }
            | BusinessToGateway::Join { group: s, .. }
            | BusinessToGateway::Leave { group: s, .. }
            | BusinessToGateway::Close { reason: s, .. } => 8 + s.len(),
            BusinessToGateway::Held { commands, .. } => {
                16 + commands.iter().map(BusinessToGateway::size).sum::<usize>()
            }
            BusinessToGateway::Cluster(inner) => 8 + inner.size(),
            _ => 16,
        }
    }
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
    /// The answer to [`BusinessToGateway::Hello`]: the link is up, events may come (a new
    /// business worker waits for it from every gateway, a bounded time, before it is ready).
    Welcome,
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
    /// Base64 in the frame, as [`ClientEvent::Binary`].
    Binary(#[serde(with = "plugin_api::gateway::base64_bytes")] Vec<u8>),
}

impl Payload {
    /// Its bytes.
    pub fn size(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Binary(b) => b.len(),
        }
    }
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
    /// Commands the handler of the client's event `seq` made, applied (in order, before the
    /// `Handled`) when its `Handled` comes on this link, and dropped with the event if the link
    /// drops first: the redelivered event makes them again. So a gateway applies an event's
    /// commands exactly once, all or none. Only sends, binds, unbinds, joins, leaves and
    /// closes are applied; at most [`MAX_HELD`] bytes an event.
    Held {
        client: ClientId,
        seq: u64,
        commands: Vec<BusinessToGateway>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_payloads_cross_the_link_as_base64() {
        // 64 KiB of noise: 87,471 bytes on the link as base64 (the whole event frame);
        // 233,814 as the JSON array of numbers it was before.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let event = GatewayToBusiness::Event {
            client: 1,
            seq: 2,
            redelivered: false,
            session: serde_json::Value::Null,
            event: ClientEvent::Binary(bytes.clone()),
        };
        let frame = serde_json::to_vec(&event).unwrap();
        let as_array = serde_json::to_vec(&bytes).unwrap().len();
        eprintln!(
            "64 KiB binary event: {} bytes as base64, {as_array} as an array",
            frame.len()
        );
        assert!(frame.len() < 64 * 1024 * 4 / 3 + 200, "{}", frame.len());
        assert!(as_array > 3 * 64 * 1024);
        assert_eq!(
            serde_json::from_slice::<GatewayToBusiness>(&frame).unwrap(),
            event
        );
        let send = BusinessToGateway::Send {
            to: Target::All,
            message: Payload::Binary(bytes),
            except: vec![],
        };
        let json = serde_json::to_vec(&send).unwrap();
        assert!(json.len() < 64 * 1024 * 4 / 3 + 200);
        assert_eq!(
            serde_json::from_slice::<BusinessToGateway>(&json).unwrap(),
            send
        );
    }
}
