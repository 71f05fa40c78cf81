//! ABI 1.7, the host's side: the functions behind the plugin's `Gateway` handle
//! ([`GATEWAY_VTABLE`], passed in `HostContext::gateway` to a worker with gateway links) and
//! the plugin's event handler as the links see it ([`PluginEvents`]).
//!
//! Plugin code is hostile: a command is parsed and checked here (only the sends, binds, joins
//! and closes a handle may make; at most [`MAX_COMMAND`] bytes, so no link frame overflows),
//! a session past [`MAX_SESSION`] or not JSON is ignored (the old one kept, logged), a refusal
//! outside 400 to 599 becomes 500, and nothing here unwinds into the plugin. Each such mistake
//! is logged at most once a second and counted (`host_limit_hits`: `gateway_command`,
//! `gateway_session`).
//!
//! A command made through an event's handle ([`GATEWAY_VTABLE`]'s `event_command`, with the
//! token the event was passed with) is held by the links until that handler returns (see
//! `gateway_link`'s exactly-once sends).

#![allow(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_ffi::{FfiFuture, FutureExt as _};
use plugin_api::ffi::{
    self, GatewayVTable, RawChunk, RawGatewayAnswer, RawGatewayEvent, RawStr, gateway_status,
};

use super::gateway_link::{CommandError, Event, EventHandler, Links, Outcome, OutcomeFuture};
use super::loader::LoadedPlugin;
use crate::counters::Limit;
use crate::gateway::link::{BusinessToGateway, Query};

/// Largest command a plugin may send (its JSON): a link frame holds it with room to spare.
pub const MAX_COMMAND: usize = crate::protocol::MAX_FRAME / 2;
/// Largest session a handler may set (its JSON).
pub const MAX_SESSION: usize = 64 * 1024;
/// Longest a presence question may wait, whatever the plugin asks.
const MAX_QUERY_WAIT: Duration = Duration::from_secs(30);

/// The plugin's gateway mistakes, logged at most once a second each.
static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::per_second();

/// Logs one mistake of the plugin's (`what`), at most once a second.
fn warn(what: &'static str) {
    if let Some(suppressed) = LOG.hit_named(what) {
        tracing::warn!(suppressed, "{what}");
    }
}

/// This worker's links and the runtime they run on, once started.
static LINKS: OnceLock<(Arc<Links>, tokio::runtime::Handle)> = OnceLock::new();

/// What `HostContext::gateway` points to in a worker with gateway links.
pub static GATEWAY_VTABLE: GatewayVTable = GatewayVTable {
    command,
    query,
    event_command,
};

/// Makes `links` the target of the plugin's `Gateway` handle (once; call on the runtime the
/// links run on). Until then the handle answers `NO_GATEWAY`.
pub fn serve_handle(links: Arc<Links>) {
    let _ = LINKS.set((links, tokio::runtime::Handle::current()));
}

fn status(e: CommandError) -> u8 {
    match e {
        CommandError::NoGateway => gateway_status::NO_GATEWAY,
        CommandError::Full => gateway_status::FULL,
        CommandError::Timeout(_) => gateway_status::TIMEOUT,
    }
}

/// Parses one command of the plugin's; `None` for anything a `Gateway` handle may not send.
fn parse_command(bytes: &[u8]) -> Option<BusinessToGateway> {
    if bytes.len() > MAX_COMMAND {
        return None;
    }
    match serde_json::from_slice(bytes).ok()? {
        c @ (BusinessToGateway::Send { .. }
        | BusinessToGateway::Bind { .. }
        | BusinessToGateway::Unbind { .. }
        | BusinessToGateway::Join { .. }
        | BusinessToGateway::Leave { .. }
        | BusinessToGateway::Close { .. }) => Some(c),
        // `Hello`, `Handled`, `Draining` and `Query` are the links' own.
        _ => None,
    }
}

extern "C" fn command(json: RawStr) -> u8 {
    checked_command(None, json)
}

extern "C" fn event_command(token: u64, json: RawStr) -> u8 {
    checked_command(Some(token), json)
}

/// Parses and checks a command of the plugin's and gives it to the links: held for the
/// event `token`'s handler, or sent at once.
fn checked_command(token: Option<u64>, json: RawStr) -> u8 {
    catch_unwind(|| {
        let Some((links, _)) = LINKS.get() else {
            return gateway_status::NO_GATEWAY;
        };
        // SAFETY: the plugin passes a view valid for this call (the ABI's rule).
        let Some(command) = parse_command(unsafe { json.as_bytes() }) else {
            links.limit_hit(Limit::GatewayCommand);
            warn("refused a gateway command of the plugin's: not a send, bind, unbind, join, leave or close, or over 512 KiB");
            return gateway_status::BAD;
        };
        let sent = match token {
            Some(token) => links.event_command(token, command),
            None => links.command(command),
        };
        match sent {
            Ok(()) => gateway_status::OK,
            Err(e) => {
                if e == CommandError::Full {
                    links.limit_hit(Limit::GatewayCommand);
                    warn("refused a gateway command: 8192 commands already wait on a gateway link, or its event's handler made 8192 commands or 8 MiB");
                }
                status(e)
            }
        }
    })
    .unwrap_or(gateway_status::BAD)
}

/// Counts a session the plugin set that was refused.
fn session_refused() {
    if let Some((links, _)) = LINKS.get() {
        links.limit_hit(Limit::GatewaySession);
    }
}

fn answer(status: u8, json: Option<Vec<u8>>) -> RawGatewayAnswer {
    RawGatewayAnswer {
        status,
        json: json.map_or(RawChunk::EMPTY, |j| ffi::chunk::lend(j.into())),
    }
}

extern "C" fn query(json: RawStr, timeout_ns: u64) -> FfiFuture<RawGatewayAnswer> {
    let asked = catch_unwind(AssertUnwindSafe(|| {
        let (links, rt) = LINKS.get().ok_or(gateway_status::NO_GATEWAY)?;
        // SAFETY: the plugin passes a view valid for this call.
        let bytes = unsafe { json.as_bytes() };
        let query: Query = (bytes.len() <= MAX_COMMAND)
            .then(|| serde_json::from_slice(bytes).ok())
            .flatten()
            .ok_or(gateway_status::BAD)?;
        let within = Duration::from_nanos(timeout_ns).min(MAX_QUERY_WAIT);
        // The links' timers and channels are the host's tokio: the question runs on the
        // host's runtime, and the plugin's future (polled on the plugin's) waits for it.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let links = links.clone();
        rt.spawn(async move {
            let _ = tx.send(links.query(query, within).await);
        });
        Ok(rx)
    }));
    match asked {
        Ok(Ok(rx)) => async move {
            match rx.await {
                Ok(Ok(a)) => answer(gateway_status::OK, serde_json::to_vec(&a).ok()),
                Ok(Err(e)) => answer(status(e), None),
                Err(_) => answer(gateway_status::TIMEOUT, None),
            }
        }
        .into_ffi(),
        Ok(Err(code)) => std::future::ready(answer(code, None)).into_ffi(),
        Err(_) => std::future::ready(answer(gateway_status::BAD, None)).into_ffi(),
    }
}

/// The plugin's `on_gateway_event`, as the links call it. Holds the plugin weakly: once the
/// worker stops it (every event answered), an event that still arrives gets no handler
/// (`None`): it is never answered, and the gateway gives it to another worker when this
/// one's link drops.
pub struct PluginEvents {
    plugin: Weak<LoadedPlugin>,
}

impl PluginEvents {
    /// `None` when the plugin handles no gateway events (older than ABI 1.7, or it says so).
    pub fn new(plugin: &Arc<LoadedPlugin>) -> Option<PluginEvents> {
        plugin.hooks.on_gateway_event.map(|_| PluginEvents {
            plugin: Arc::downgrade(plugin),
        })
    }
}

impl EventHandler for PluginEvents {
    fn handle(&self, event: Event) -> Option<OutcomeFuture> {
        let plugin = self.plugin.upgrade()?;
        let hook = plugin.hooks.on_gateway_event?;
        let session = serde_json::to_vec(&event.session).unwrap_or_else(|_| b"null".to_vec());
        let json = serde_json::to_vec(&event.event).unwrap_or_default();
        let raw = RawGatewayEvent {
            client: event.client,
            seq: event.seq,
            redelivered: event.redelivered,
            session: RawStr::new(&session),
            event: RawStr::new(&json),
            token: event.token,
        };
        // SAFETY: `state` is live while `plugin` is (the worker stops it only once no event
        // runs); `raw` and its views are valid for the call; the shim catches panics.
        let fut = unsafe { hook(plugin.state, &raw) };
        Some(Box::pin(async move {
            let out = fut.await;
            drop(plugin);
            // SAFETY: the outcome's chunk moved to us; `Chunk` frees it through its own
            // function, on the plugin's side.
            let bytes = unsafe { ffi::chunk::Chunk::from_raw(out.session) }.into_bytes();
            let session = match out.session_set {
                false => None,
                true if bytes.len() > MAX_SESSION => {
                    session_refused();
                    warn("a gateway handler set a session over 64 KiB; the old one is kept");
                    None
                }
                true => match serde_json::from_slice(&bytes) {
                    Ok(s) => Some(s),
                    Err(_) => {
                        session_refused();
                        warn(
                            "a gateway handler set a session that is not JSON; the old one is kept",
                        );
                        None
                    }
                },
            };
            let refuse = match out.refuse {
                0 => None,
                s @ 400..=599 => Some(s),
                _ => Some(500),
            };
            Outcome { session, refuse }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_may_send_only_the_handles_commands() {
        // The log lines say 512 KiB and 64 KiB.
        assert_eq!((MAX_COMMAND, MAX_SESSION), (512 * 1024, 64 * 1024));
        let ok = br#"{"Send":{"to":{"Group":"room"},"message":{"Text":"hi"},"except":[5]}}"#;
        assert!(parse_command(ok).is_some());
        assert!(parse_command(br#"{"Bind":{"client":5,"uid":"ann"}}"#).is_some());
        assert!(parse_command(br#"{"Close":{"client":5,"code":1000,"reason":""}}"#).is_some());
        for bad in [
            &br#"{"Handled":{"client":5,"seq":1}}"#[..],
            br#"{"Hello":{"pid":1,"generation":1}}"#,
            br#""Draining""#,
            br#"{"Query":{"id":1,"query":{"UidCount":"a"}}}"#,
            b"not json",
        ] {
            assert!(
                parse_command(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = format!(
            r#"{{"Send":{{"to":"All","message":{{"Text":"{}"}},"except":[]}}}}"#,
            "x".repeat(MAX_COMMAND)
        );
        assert!(parse_command(huge.as_bytes()).is_none());
    }

    #[test]
    fn without_links_the_handle_says_no_gateway() {
        assert_eq!(
            command(RawStr::new(br#"{"Unbind":{"client":1}}"#)),
            gateway_status::NO_GATEWAY
        );
    }
}
