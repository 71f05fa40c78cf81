//! The business side of a gateway group (ABI 1.7): the events of the WebSocket clients a
//! gateway holds ([`Plugin::on_gateway_event`](crate::Plugin::on_gateway_event)), each with its
//! [`EventContext`] (the client, its session, a refusal), and the [`Gateway`] handle that sends
//! to clients, uids, groups and everyone, binds uids, joins groups, closes clients and asks
//! who is online. No `unsafe` here for plugin authors: the crossing is in the shim below and
//! in [`crate::ffi::GatewayVTable`].
//!
//! Commands and questions cross as JSON in the link's own forms (`host/src/gateway/link.rs`),
//! so the host passes them on without translating.

use std::ffi::c_void;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_ffi::{FfiFuture, FutureExt as _};
use serde::{Deserialize, Serialize};

use crate::ffi::{GatewayVTable, RawGatewayEvent, RawGatewayOutcome, RawStr, gateway_status};
use crate::{BoxError, Plugin};

/// A gateway client: unique among the clients of the gateways this worker links to.
pub type ClientId = u64;

/// What a client did, in the order it did it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GatewayEvent {
    /// The WebSocket upgrade: the request's path, query (without `?`) and headers. Refuse it
    /// with [`EventContext::refuse`]; otherwise the client gets its `101`.
    Connect {
        path: String,
        query: String,
        headers: Vec<(String, String)>,
    },
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(#[serde(with = "base64_bytes")] Vec<u8>),
    /// The client left: its close code and reason (1006 when it just disconnected).
    Close { code: u16, reason: String },
}

/// A message for a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Text(String),
    Binary(#[serde(with = "base64_bytes")] Vec<u8>),
}

/// Binary payloads in the gateway's JSON (the link's frames and the ABI's events and
/// commands): a base64 string, 4 bytes for 3 (a JSON array of numbers took 3.6 for 1). An
/// array of numbers is still read. One implementation, used by the host's link too.
#[doc(hidden)]
pub mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("base64 or an array of bytes")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                STANDARD.decode(v).map_err(E::custom)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_any(Bytes)
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Message {
        Message::Text(s.to_owned())
    }
}

impl From<String> for Message {
    fn from(s: String) -> Message {
        Message::Text(s)
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Message {
        Message::Binary(b)
    }
}

/// One event's client, session and answer. Cheap to clone (the clones share the session), so
/// it may move into tasks the handler awaits; what is set once the handler returns counts.
#[derive(Clone, Debug)]
pub struct EventContext {
    client: ClientId,
    seq: u64,
    redelivered: bool,
    /// The host's name for this event (0: none, as in the plugin's own tests).
    token: u64,
    state: Arc<Mutex<Answer>>,
}

#[derive(Debug, Default)]
struct Answer {
    session: serde_json::Value,
    session_set: bool,
    refuse: u16,
}

impl EventContext {
    /// A context as the host would give it (for the plugin's own tests).
    pub fn new(client: ClientId, seq: u64, redelivered: bool, session: serde_json::Value) -> Self {
        EventContext {
            client,
            seq,
            redelivered,
            token: 0,
            state: Arc::new(Mutex::new(Answer {
                session,
                ..Answer::default()
            })),
        }
    }

    pub fn client(&self) -> ClientId {
        self.client
    }

    /// The client's event number (from 1, in the order the client acted).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// This event went before to a worker that left without answering: its handler may have
    /// run already (make what it does idempotent, or check the session).
    pub fn is_redelivered(&self) -> bool {
        self.redelivered
    }

    /// The client's session as JSON (`null` until a handler sets one).
    pub fn session_json(&self) -> serde_json::Value {
        lock(&self.state).session.clone()
    }

    /// The client's session as `T`; `None` while none is set or it is not a `T`.
    pub fn session<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        let state = lock(&self.state);
        if state.session.is_null() {
            return None;
        }
        T::deserialize(&state.session).ok()
    }

    /// Replaces the client's session; the gateway keeps it once the handler returns, for every
    /// later event of the client on any worker (reloads included).
    pub fn set_session<T: Serialize>(&self, session: &T) -> Result<(), BoxError> {
        let value = serde_json::to_value(session)?;
        let mut state = lock(&self.state);
        state.session = value;
        state.session_set = true;
        Ok(())
    }

    /// For a `Connect`: answers the upgrade with `status` (400 to 599; others become 403)
    /// instead of the `101`. Ignored for other events.
    pub fn refuse(&self, status: u16) {
        lock(&self.state).refuse = if (400..=599).contains(&status) {
            status
        } else {
            403
        };
    }

    /// The refusal status set so far, if any.
    pub fn refused(&self) -> Option<u16> {
        Some(lock(&self.state).refuse).filter(|s| *s != 0)
    }

    /// The gateway handle whose commands belong to this event (the one `on_gateway_event`
    /// gets): they leave with the event's answer, so the event's gateway applies them exactly
    /// once, even when the event is redelivered. `None` without a gateway.
    pub fn gateway(&self) -> Option<Gateway> {
        Gateway::get().map(|gw| Gateway {
            token: self.token,
            ..gw
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a [`Gateway`] call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayError {
    /// No gateway group names this worker's group, or the host is older than ABI 1.7.
    NoGateway,
    /// Too many commands already wait on a gateway link.
    Full,
    /// No gateway answered in time.
    Timeout,
    /// The host refused the command or question.
    Refused,
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GatewayError::NoGateway => "this worker has no gateway",
            GatewayError::Full => "too many commands already wait on a gateway link",
            GatewayError::Timeout => "no gateway answered in time",
            GatewayError::Refused => "the host refused the gateway command",
        })
    }
}

impl std::error::Error for GatewayError {}

fn status_error(status: u8) -> Result<(), GatewayError> {
    match status {
        gateway_status::OK => Ok(()),
        gateway_status::NO_GATEWAY => Err(GatewayError::NoGateway),
        gateway_status::FULL => Err(GatewayError::Full),
        gateway_status::TIMEOUT => Err(GatewayError::Timeout),
        _ => Err(GatewayError::Refused),
    }
}

static HOST_GATEWAY: OnceLock<&'static GatewayVTable> = OnceLock::new();

/// Keeps the host's gateway functions (from a 1.7 host's context; `ptr` may be null).
pub(crate) fn install(ptr: *const GatewayVTable) {
    // SAFETY: the host passes null or a `'static` vtable (the ABI's rule for this field).
    if let Some(vt) = unsafe { ptr.as_ref() } {
        let _ = HOST_GATEWAY.set(vt);
    }
}

/// The link's commands, as `host/src/gateway/link.rs` spells them.
#[derive(Serialize)]
enum Command<'a> {
    Send {
        to: Target<'a>,
        message: &'a Message,
        except: &'a [ClientId],
    },
    Bind {
        client: ClientId,
        uid: &'a str,
    },
    Unbind {
        client: ClientId,
    },
    Join {
        client: ClientId,
        group: &'a str,
    },
    Leave {
        client: ClientId,
        group: &'a str,
    },
    Close {
        client: ClientId,
        code: u16,
        reason: &'a str,
    },
}

#[derive(Serialize)]
enum Target<'a> {
    Client(ClientId),
    Uid(&'a str),
    Group(&'a str),
    All,
}

#[derive(Serialize)]
enum Query<'a> {
    UidCount(&'a str),
    GroupCount(&'a str),
    GroupMembers(&'a str),
}

#[derive(Deserialize)]
enum Presence {
    Count(u64),
    Members(Vec<ClientId>),
}

/// The gateway, as the business code sees it: usable in gateway events and in any handler or
/// task of the plugin (an HTTP `POST /notify` pushing to a uid, say). Every send reaches the
/// clients of every gateway process this worker links to, in the order made.
///
/// The handle an event's handler gets (or [`EventContext::gateway`]) belongs to that event:
/// its commands are held until the handler returns and go with the event's answer, so the
/// gateway holding the event's client applies them exactly once, all or none, even when the
/// worker dies and the event is redelivered; other gateways (a send to a uid, a group or
/// everyone reaches them too) get them at least once. [`Gateway::get`]'s handle (an HTTP
/// handler's) sends at once.
#[derive(Clone, Copy, Debug)]
pub struct Gateway {
    vt: &'static GatewayVTable,
    /// The event whose commands these are (0: none).
    token: u64,
}

impl std::fmt::Debug for GatewayVTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayVTable")
    }
}

/// How long a presence question waits for the gateways' answers.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

impl Gateway {
    /// The worker's gateway, or `None` when it has none (no gateway group names its group, or
    /// the host is older than ABI 1.7). Valid once `on_worker_start` began.
    pub fn get() -> Option<Gateway> {
        HOST_GATEWAY.get().map(|vt| Gateway { vt, token: 0 })
    }

    fn command(&self, command: &Command<'_>) -> Result<(), GatewayError> {
        let json = serde_json::to_vec(command).map_err(|_| GatewayError::Refused)?;
        let json = RawStr::new(&json);
        status_error(match self.token {
            0 => (self.vt.command)(json),
            token => (self.vt.event_command)(token, json),
        })
    }

    fn send(
        &self,
        to: Target<'_>,
        message: &Message,
        except: &[ClientId],
    ) -> Result<(), GatewayError> {
        self.command(&Command::Send {
            to,
            message,
            except,
        })
    }

    /// Sends `message` to one client.
    pub fn send_to_client(
        &self,
        client: ClientId,
        message: impl Into<Message>,
    ) -> Result<(), GatewayError> {
        self.send(Target::Client(client), &message.into(), &[])
    }

    /// Sends `message` to every client bound to `uid`, except those in `except`.
    pub fn send_to_uid(
        &self,
        uid: &str,
        message: impl Into<Message>,
        except: &[ClientId],
    ) -> Result<(), GatewayError> {
        self.send(Target::Uid(uid), &message.into(), except)
    }

    /// Sends `message` to every member of `group`, except those in `except`.
    pub fn send_to_group(
        &self,
        group: &str,
        message: impl Into<Message>,
        except: &[ClientId],
    ) -> Result<(), GatewayError> {
        self.send(Target::Group(group), &message.into(), except)
    }

    /// Sends `message` to every client, except those in `except`.
    pub fn send_to_all(
        &self,
        message: impl Into<Message>,
        except: &[ClientId],
    ) -> Result<(), GatewayError> {
        self.send(Target::All, &message.into(), except)
    }

    /// Binds `client` to `uid` (one uid a client: a new one replaces the old).
    pub fn bind(&self, client: ClientId, uid: &str) -> Result<(), GatewayError> {
        self.command(&Command::Bind { client, uid })
    }

    pub fn unbind(&self, client: ClientId) -> Result<(), GatewayError> {
        self.command(&Command::Unbind { client })
    }

    /// Adds `client` to `group` (names at most 256 bytes, 256 groups a client).
    pub fn join(&self, client: ClientId, group: &str) -> Result<(), GatewayError> {
        self.command(&Command::Join { client, group })
    }

    pub fn leave(&self, client: ClientId, group: &str) -> Result<(), GatewayError> {
        self.command(&Command::Leave { client, group })
    }

    /// Closes `client` with `code` and `reason`.
    pub fn close(&self, client: ClientId, code: u16, reason: &str) -> Result<(), GatewayError> {
        self.command(&Command::Close {
            client,
            code,
            reason,
        })
    }

    async fn query(&self, query: Query<'_>) -> Result<Presence, GatewayError> {
        let json = serde_json::to_vec(&query).map_err(|_| GatewayError::Refused)?;
        let answer = (self.vt.query)(RawStr::new(&json), QUERY_TIMEOUT.as_nanos() as u64).await;
        // SAFETY: the answer's chunk moved to us (the ABI's rule); freed when dropped.
        let bytes = unsafe { crate::ffi::chunk::Chunk::from_raw(answer.json) }.into_bytes();
        status_error(answer.status)?;
        serde_json::from_slice(&bytes).map_err(|_| GatewayError::Refused)
    }

    /// How many clients are bound to `uid`, on every linked gateway.
    pub async fn uid_count(&self, uid: &str) -> Result<u64, GatewayError> {
        match self.query(Query::UidCount(uid)).await? {
            Presence::Count(n) => Ok(n),
            Presence::Members(m) => Ok(m.len() as u64),
        }
    }

    /// Whether any client is bound to `uid`.
    pub async fn is_online(&self, uid: &str) -> Result<bool, GatewayError> {
        Ok(self.uid_count(uid).await? > 0)
    }

    /// How many clients `group` has.
    pub async fn group_count(&self, group: &str) -> Result<u64, GatewayError> {
        match self.query(Query::GroupCount(group)).await? {
            Presence::Count(n) => Ok(n),
            Presence::Members(m) => Ok(m.len() as u64),
        }
    }

    /// The clients of `group` (at most 10,000 from each gateway process).
    pub async fn group_members(&self, group: &str) -> Result<Vec<ClientId>, GatewayError> {
        match self.query(Query::GroupMembers(group)).await? {
            Presence::Members(m) => Ok(m),
            Presence::Count(_) => Ok(Vec::new()),
        }
    }
}

/// The vtable entry for `P`: `None` unless it says it handles gateway events.
pub(crate) const fn entry<P: Plugin>() -> Option<
    unsafe extern "C" fn(*const c_void, *const RawGatewayEvent) -> FfiFuture<RawGatewayOutcome>,
> {
    if P::GATEWAY_EVENTS {
        Some(on_gateway_event::<P>)
    } else {
        None
    }
}

fn outcome(cx: &EventContext, panicked: bool) -> RawGatewayOutcome {
    let state = lock(&cx.state);
    let session = match state.session_set {
        true => crate::ffi::chunk::lend(
            serde_json::to_vec(&state.session)
                .unwrap_or_default()
                .into(),
        ),
        false => crate::ffi::RawChunk::EMPTY,
    };
    RawGatewayOutcome {
        session_set: state.session_set,
        session,
        refuse: if panicked { 500 } else { state.refuse },
        panicked,
    }
}

fn panicked_outcome(payload: &(dyn std::any::Any + Send)) -> RawGatewayOutcome {
    crate::export::report_panic();
    tracing::error!(
        panic = %crate::export::describe_panic(payload),
        "gateway event handler panicked"
    );
    RawGatewayOutcome {
        session_set: false,
        session: crate::ffi::RawChunk::EMPTY,
        refuse: 500,
        panicked: true,
    }
}

unsafe extern "C" fn on_gateway_event<P: Plugin>(
    state: *const c_void,
    event: *const RawGatewayEvent,
) -> FfiFuture<RawGatewayOutcome> {
    let _rt = crate::runtime::enter();
    let started = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host passes an event valid for this call; its views are copied here.
        let raw = unsafe { &*event };
        let (session, ev) = unsafe { (raw.session.as_bytes(), raw.event.as_bytes()) };
        let session: serde_json::Value =
            serde_json::from_slice(session).unwrap_or(serde_json::Value::Null);
        let ev: GatewayEvent =
            serde_json::from_slice(ev).map_err(|e| format!("bad gateway event: {e}"))?;
        let gw = Gateway::get().ok_or_else(|| "no gateway".to_string())?;
        let gw = Gateway {
            token: raw.token,
            ..gw
        };
        let mut cx = EventContext::new(raw.client, raw.seq, raw.redelivered, session);
        cx.token = raw.token;
        // SAFETY: `state` is the plugin value, which the host keeps alive until every future
        // it got is dropped (as for `serve`).
        let plugin: &'static P = unsafe { &*(state as *const P) };
        let fut = plugin.on_gateway_event(gw, cx.clone(), ev);
        Ok::<_, String>((cx, fut))
    }));
    match started {
        Ok(Ok((cx, fut))) => Guarded {
            fut: std::mem::ManuallyDrop::new(fut),
            cx,
        }
        .into_ffi(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "gateway event not handled");
            std::future::ready(RawGatewayOutcome {
                session_set: false,
                session: crate::ffi::RawChunk::EMPTY,
                refuse: 400,
                panicked: false,
            })
            .into_ffi()
        }
        Err(payload) => std::future::ready(panicked_outcome(&*payload)).into_ffi(),
    }
}

/// Polls (and drops) the handler's future inside the plugin's runtime and `catch_unwind`.
struct Guarded<F> {
    fut: std::mem::ManuallyDrop<F>,
    cx: EventContext,
}

impl<F> Drop for Guarded<F> {
    fn drop(&mut self) {
        let _rt = crate::runtime::enter();
        // SAFETY: dropped exactly once, here; never used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.fut) }
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = RawGatewayOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RawGatewayOutcome> {
        let _rt = crate::runtime::enter();
        // SAFETY: a structural pin projection: `fut` is never moved out (its `Drop` drops it
        // in place); `cx` is not pinned and only read.
        let this = unsafe { self.get_unchecked_mut() };
        let fut = unsafe { Pin::new_unchecked(&mut *this.fut) };
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(())) => Poll::Ready(outcome(&this.cx, false)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(panicked_outcome(&*payload)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response, WorkerContext, ffi};

    static COMMANDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    extern "C" fn fake_command(json: RawStr) -> u8 {
        // SAFETY: borrowed for the call.
        let text = String::from_utf8(unsafe { json.as_bytes() }.to_vec()).unwrap();
        let full = text.contains("\"Group\":\"full\"");
        lock(&COMMANDS).push(text);
        match full {
            true => gateway_status::FULL,
            false => gateway_status::OK,
        }
    }

    extern "C" fn fake_query(json: RawStr, _timeout_ns: u64) -> FfiFuture<ffi::RawGatewayAnswer> {
        // SAFETY: borrowed for the call.
        let text = String::from_utf8(unsafe { json.as_bytes() }.to_vec()).unwrap();
        let answer = match text.as_str() {
            r#"{"UidCount":"ann"}"# => Some(r#"{"Count":2}"#),
            r#"{"GroupMembers":"room"}"# => Some(r#"{"Members":[7,9]}"#),
            _ => None,
        };
        let raw = match answer {
            Some(a) => ffi::RawGatewayAnswer {
                status: gateway_status::OK,
                json: ffi::chunk::lend(bytes::Bytes::from(a)),
            },
            None => ffi::RawGatewayAnswer {
                status: gateway_status::TIMEOUT,
                json: ffi::RawChunk::EMPTY,
            },
        };
        std::future::ready(raw).into_ffi()
    }

    extern "C" fn fake_event_command(token: u64, json: RawStr) -> u8 {
        // SAFETY: borrowed for the call.
        let text = String::from_utf8(unsafe { json.as_bytes() }.to_vec()).unwrap();
        lock(&COMMANDS).push(format!("event {token}: {text}"));
        gateway_status::OK
    }

    static FAKE: GatewayVTable = GatewayVTable {
        command: fake_command,
        query: fake_query,
        event_command: fake_event_command,
    };

    struct Chat;

    impl Plugin for Chat {
        const GATEWAY_EVENTS: bool = true;

        fn on_worker_start(_ctx: &WorkerContext) -> Result<Self, BoxError> {
            Ok(Chat)
        }

        fn handle(&self, _req: Request) -> Response {
            Response::new(bytes::Bytes::new())
        }

        async fn on_gateway_event(&self, gw: Gateway, cx: EventContext, event: GatewayEvent) {
            #[derive(Serialize, Deserialize, Default)]
            struct Session {
                n: u64,
            }
            match event {
                GatewayEvent::Connect { path, .. } if path == "/no" => cx.refuse(403),
                GatewayEvent::Connect { .. } => {}
                GatewayEvent::Text(t) if t == "panic" => panic!("asked to"),
                GatewayEvent::Text(t) => {
                    tokio::task::yield_now().await;
                    let mut s: Session = cx.session().unwrap_or_default();
                    s.n += 1;
                    gw.send_to_group("room", format!("{t} {}", s.n), &[cx.client()])
                        .unwrap();
                    gw.bind(cx.client(), "ann").unwrap();
                    cx.set_session(&s).unwrap();
                }
                GatewayEvent::Binary(_) | GatewayEvent::Close { .. } => {}
            }
        }
    }

    struct Plain;

    impl Plugin for Plain {
        fn on_worker_start(_ctx: &WorkerContext) -> Result<Self, BoxError> {
            Ok(Plain)
        }
    }

    fn run(client: u64, session: &str, event: &str) -> (Option<String>, u16, bool) {
        crate::runtime::start().unwrap();
        install(&FAKE);
        let entry = entry::<Chat>().expect("Chat handles gateway events");
        let state = Box::into_raw(Box::new(Chat)) as *const c_void;
        let fut = {
            // The views die before the future is polled: the shim copies what it keeps.
            let (session, event) = (session.to_owned(), event.to_owned());
            let raw = RawGatewayEvent {
                client,
                seq: 1,
                redelivered: false,
                session: RawStr::new(session.as_bytes()),
                event: RawStr::new(event.as_bytes()),
                token: 9,
            };
            // SAFETY: `state` is a live `Chat` and `raw` is valid for the call.
            unsafe { entry(state, &raw) }
        };
        let out = crate::runtime::block_on(fut);
        // SAFETY: made above, no future uses it any more.
        drop(unsafe { Box::from_raw(state as *mut Chat) });
        // SAFETY: the outcome's chunk moved to us.
        let session = unsafe { ffi::chunk::Chunk::from_raw(out.session) }.into_bytes();
        let session = out
            .session_set
            .then(|| String::from_utf8(session.to_vec()).unwrap());
        (session, out.refuse, out.panicked)
    }

    #[test]
    fn only_a_plugin_that_says_so_handles_gateway_events() {
        assert!(entry::<Plain>().is_none());
        assert!(entry::<Chat>().is_some());
        assert!(crate::export::vtable::<Plain>().on_gateway_event.is_none());
    }

    #[test]
    fn an_event_reads_and_sets_the_session_and_its_commands_cross_as_link_json() {
        let (session, refuse, panicked) = run(5, r#"{"n":41}"#, r#"{"Text":"hi"}"#);
        assert_eq!(session.as_deref(), Some(r#"{"n":42}"#));
        assert_eq!((refuse, panicked), (0, false));
        // The handler's commands belong to its event (the host's token for it).
        let sent = lock(&COMMANDS).clone();
        assert!(
            sent.contains(
                &r#"event 9: {"Send":{"to":{"Group":"room"},"message":{"Text":"hi 42"},"except":[5]}}"#
                    .to_string()
            ),
            "{sent:?}"
        );
        assert!(sent.contains(&r#"event 9: {"Bind":{"client":5,"uid":"ann"}}"#.to_string()));
        // No session yet: the handler starts from its default.
        let (session, ..) = run(6, "null", r#"{"Text":"yo"}"#);
        assert_eq!(session.as_deref(), Some(r#"{"n":1}"#));
    }

    #[test]
    fn a_connect_may_be_refused_and_leaves_the_session_alone() {
        let connect = |path: &str| {
            format!(r#"{{"Connect":{{"path":"{path}","query":"a=1","headers":[["x","y"]]}}}}"#)
        };
        assert_eq!(run(1, "null", &connect("/no")), (None, 403, false));
        assert_eq!(run(1, "null", &connect("/chat")), (None, 0, false));
    }

    #[test]
    fn a_panicking_handler_answers_panicked_and_a_bad_event_is_refused() {
        assert_eq!(run(2, "null", r#"{"Text":"panic"}"#), (None, 500, true));
        assert_eq!(run(2, "null", r#"{"Nonsense":1}"#), (None, 400, false));
    }

    #[test]
    fn presence_and_refused_commands_reach_the_caller() {
        crate::runtime::start().unwrap();
        install(&FAKE);
        let gw = Gateway::get().unwrap();
        assert_eq!(gw.send_to_group("full", "x", &[]), Err(GatewayError::Full));
        crate::runtime::block_on(async {
            assert_eq!(gw.is_online("ann").await, Ok(true));
            assert_eq!(gw.group_members("room").await, Ok(vec![7, 9]));
            assert_eq!(gw.group_count("nobody").await, Err(GatewayError::Timeout));
        });
    }

    #[test]
    fn a_refusal_is_an_error_status_and_clones_share_the_answer() {
        let cx = EventContext::new(1, 1, false, serde_json::Value::Null);
        assert_eq!(cx.refused(), None);
        assert_eq!(cx.session::<u32>(), None);
        let kept = cx.clone();
        cx.refuse(200);
        assert_eq!(kept.refused(), Some(403));
        cx.refuse(429);
        assert_eq!(kept.refused(), Some(429));
        cx.set_session(&7u32).unwrap();
        assert_eq!(kept.session::<u32>(), Some(7));
    }

    #[test]
    fn the_events_json_is_the_links() {
        // The host sends `ClientEvent` as `host/src/gateway/link.rs` spells it.
        let e: GatewayEvent =
            serde_json::from_str(r#"{"Close":{"code":1000,"reason":"bye"}}"#).unwrap();
        assert_eq!(
            e,
            GatewayEvent::Close {
                code: 1000,
                reason: "bye".into()
            }
        );
        // Binary payloads are base64 (an array of numbers is still read).
        let e: GatewayEvent = serde_json::from_str(r#"{"Binary":"AQI="}"#).unwrap();
        assert_eq!(e, GatewayEvent::Binary(vec![1, 2]));
        let e: GatewayEvent = serde_json::from_str(r#"{"Binary":[1,2]}"#).unwrap();
        assert_eq!(e, GatewayEvent::Binary(vec![1, 2]));
        assert_eq!(
            serde_json::to_string(&Message::Binary(vec![1, 2])).unwrap(),
            r#"{"Binary":"AQI="}"#
        );
        assert!(serde_json::from_str::<Message>(r#"{"Binary":"not base64!"}"#).is_err());
    }
}
