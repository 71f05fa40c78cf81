//! An example gateway plugin: a chat. A gateway group holds the WebSocket clients (on `/chat`)
//! and this plugin, run by the business group behind it, handles their messages: rooms are the
//! gateway's groups, nicknames its uids, and each client's session (its nick and rooms, the
//! [`Session`] struct) is kept by the gateway, so a `host reload` of this plugin disconnects
//! nobody and forgets nothing. `example-chat/host.toml` serves it (see the README's Gateway
//! section).
//!
//! The text protocol, one command per text message (tests and `bench/run.sh gateway` drive it):
//!
//! - `echo TEXT`: the sender alone gets `gen=G TEXT`, G the generation of the worker that
//!   handled it;
//! - `nick NAME`: binds the client to uid NAME and keeps it in the session; answers `nick NAME`;
//! - `join ROOM`: joins the room; answers `joined ROOM`; `leave ROOM` answers `left ROOM`;
//! - `say ROOM TEXT`: every member of ROOM, the sender included, gets `ROOM NICK: TEXT`;
//! - `to NAME TEXT`: every connection of uid NAME gets `from NICK: TEXT`;
//! - `session`: answers the session as JSON (`{"nick":"ann","rooms":["lobby"]}`).
//!
//! Anything else gets one line `error: ...` (a binary message, an unknown command, a name that
//! is not 1 to [`MAX_NAME`] letters, digits, `_`, `-` or `.`, a [`MAX_ROOMS`]th room, `say` in a
//! room not joined, `say` or `to` before `nick`, `to` a name no one has). A redelivered event
//! (its worker left before answering) is handled again; what the first run sent was applied
//! only if its answer arrived, so the sender's own gateway process applies each handler's
//! sends once, while another gateway process (a `say` to members held by several) may see a
//! `say` or `to` twice.
//!
//! HTTP, on the business group's own listener:
//!
//! - `GET /`: a self-contained page to try the chat in a browser. It connects to
//!   `[plugin_config]`'s `ws_url` when set, else to `ws://<the page's host>:<ws_port>/chat`
//!   when `ws_port` is set, else to its own address's `/chat` (`example-chat/host.toml`'s
//!   gateway takes `/chat` on the chat group's port: same port).
//! - `POST /rooms/{room}/notify`: pushes its body (UTF-8, at most [`MAX_NOTIFY`] bytes) into the
//!   room as `ROOM: BODY`, through the `Gateway` handle from an HTTP handler; answers
//!   `sent to N clients` (the room's size), `400`, `405`, `413`, or `503` when the worker has
//!   no gateway.
//!
//! Each refusal is counted in `/metrics` as `chat_refused_total{reason}` (`command`: unknown or
//! malformed, `name`, `rooms`, `nick_first`, `not_member`, `offline`, `binary`, `notify`) and
//! logged at most once a second per worker.
//!
//! It never blocks a handler, keeps nothing about a client itself (that is in the sessions and
//! the gateway's tables) and has no `unsafe`.

#![deny(unsafe_code)]

use plugin_api::gateway::{EventContext, Gateway, GatewayEvent};
use plugin_api::http::{self, Method, StatusCode};
use plugin_api::http_body_util::{BodyExt as _, Limited};
use plugin_api::metrics::Counter;
use plugin_api::{Body, BoxError, Bytes, Dispatch, Plugin, Request, Response, WorkerContext};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest nick or room name, in bytes.
pub const MAX_NAME: usize = 32;
/// Most rooms one client may be in.
pub const MAX_ROOMS: usize = 16;
/// Largest `POST /rooms/{room}/notify` body.
pub const MAX_NOTIFY: usize = 16 * 1024;

/// What the chat accepts in `[plugin_config]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatConfig {
    /// The WebSocket URL the page connects to (`ws://chat.example.com/chat`).
    #[serde(default)]
    ws_url: Option<String>,
    /// Without `ws_url`: the gateway's port on the page's own host; unset, the page's own
    /// address (a same-port gateway, `upgrade_from`).
    #[serde(default)]
    ws_port: Option<u16>,
}

/// A client's session, kept by the gateway across reloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub nick: Option<String>,
    pub rooms: Vec<String>,
}

pub struct Chat {
    generation: u64,
    /// The page, with its WebSocket address filled in.
    page: Bytes,
    /// `chat_refused_total{reason}`, in [`REASONS`] order.
    refused: Vec<Counter>,
}

/// Why input was refused: the `reason` label of `chat_refused_total`.
const REASONS: [&str; 8] = [
    "command",
    "name",
    "rooms",
    "nick_first",
    "not_member",
    "offline",
    "binary",
    "notify",
];

/// What one command does: the line answered to the sender (if any), the session to keep (if
/// changed), and why it was refused (a [`REASONS`] entry).
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    answer: Option<String>,
    session: Option<Session>,
    refused: Option<&'static str>,
}

impl Outcome {
    fn answer(line: impl Into<String>) -> Outcome {
        Outcome {
            answer: Some(line.into()),
            ..Outcome::default()
        }
    }

    fn refuse(reason: &'static str, why: impl std::fmt::Display) -> Outcome {
        Outcome {
            refused: Some(reason),
            ..Outcome::answer(format!("error: {why}"))
        }
    }
}

/// A nick or room name: 1 to [`MAX_NAME`] bytes of ASCII letters, digits, `_`, `-`, `.`.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(allowed) {
        return Err(format!(
            "a {what} is 1 to {MAX_NAME} letters, digits, '_', '-' or '.'"
        ));
    }
    Ok(())
}

/// One text message's command, split from its arguments.
#[derive(Debug, PartialEq)]
enum Command<'a> {
    Echo(&'a str),
    Nick(&'a str),
    Join(&'a str),
    Leave(&'a str),
    Say(&'a str, &'a str),
    To(&'a str, &'a str),
    Session,
}

const USAGE: &str =
    "commands: echo TEXT, nick NAME, join ROOM, leave ROOM, say ROOM TEXT, to NAME TEXT, session";

/// A command, or why it is refused: a [`REASONS`] entry and the error line's text.
fn parse(text: &str) -> Result<Command<'_>, (&'static str, String)> {
    let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
    let name_then_text = |what: &str| match rest.split_once(' ') {
        Some((name, text)) if !text.is_empty() => {
            check_name(what, name).map_err(|e| ("name", e))?;
            Ok((name, text))
        }
        _ => Err((
            "command",
            format!("usage: {verb} {} TEXT", what.to_uppercase()),
        )),
    };
    let one_name = |what: &str| match check_name(what, rest) {
        Ok(()) => Ok(rest),
        Err(_) if rest.is_empty() => {
            Err(("command", format!("usage: {verb} {}", what.to_uppercase())))
        }
        Err(e) => Err(("name", e)),
    };
    Ok(match verb {
        "echo" => Command::Echo(rest),
        "nick" => Command::Nick(one_name("name")?),
        "join" => Command::Join(one_name("room")?),
        "leave" => Command::Leave(one_name("room")?),
        "say" => {
            let (room, text) = name_then_text("room")?;
            Command::Say(room, text)
        }
        "to" => {
            let (name, text) = name_then_text("name")?;
            Command::To(name, text)
        }
        "session" if rest.is_empty() => Command::Session,
        _ => {
            let verb: String = verb.chars().take(MAX_NAME).collect();
            return Err(("command", format!("unknown command {verb:?}; {USAGE}")));
        }
    })
}

impl Chat {
    /// Runs one text command of `client`, whose session is `session`.
    async fn command(&self, gw: Gateway, client: u64, session: &Session, text: &str) -> Outcome {
        let command = match parse(text) {
            Ok(c) => c,
            Err((reason, why)) => return Outcome::refuse(reason, why),
        };
        let sent = match command {
            Command::Echo(text) => {
                return Outcome::answer(format!("gen={} {text}", self.generation));
            }
            Command::Session => {
                let json = serde_json::to_string(session).unwrap_or_else(|_| "{}".into());
                return Outcome::answer(json);
            }
            Command::Nick(name) => gw.bind(client, name).map(|()| Outcome {
                session: Some(Session {
                    nick: Some(name.to_owned()),
                    ..session.clone()
                }),
                ..Outcome::answer(format!("nick {name}"))
            }),
            Command::Join(room) => {
                let known = session.rooms.iter().any(|r| r == room);
                if !known && session.rooms.len() >= MAX_ROOMS {
                    let why = format!("at most {MAX_ROOMS} rooms; leave one first");
                    return Outcome::refuse("rooms", why);
                }
                gw.join(client, room).map(|()| {
                    let mut session = session.clone();
                    if !known {
                        session.rooms.push(room.to_owned());
                    }
                    Outcome {
                        session: Some(session),
                        ..Outcome::answer(format!("joined {room}"))
                    }
                })
            }
            Command::Leave(room) => gw.leave(client, room).map(|()| {
                let mut session = session.clone();
                session.rooms.retain(|r| r != room);
                Outcome {
                    session: Some(session),
                    ..Outcome::answer(format!("left {room}"))
                }
            }),
            Command::Say(room, text) => {
                let Some(nick) = &session.nick else {
                    return Outcome::refuse("nick_first", "set a nick first: nick NAME");
                };
                if !session.rooms.iter().any(|r| r == room) {
                    return Outcome::refuse("not_member", format!("join {room} first"));
                }
                gw.send_to_group(room, format!("{room} {nick}: {text}"), &[])
                    .map(|()| Outcome::default())
            }
            Command::To(name, text) => {
                let Some(nick) = &session.nick else {
                    return Outcome::refuse("nick_first", "set a nick first: nick NAME");
                };
                match gw.is_online(name).await {
                    Ok(false) => {
                        return Outcome::refuse("offline", format!("no one is called {name}"));
                    }
                    Ok(true) => gw
                        .send_to_uid(name, format!("from {nick}: {text}"), &[])
                        .map(|()| Outcome::default()),
                    Err(e) => Err(e),
                }
            }
        };
        // The gateway refused or is unreachable: the host counted and logged it.
        sent.unwrap_or_else(|e| Outcome::answer(format!("error: {e}")))
    }

    /// `POST /rooms/{room}/notify`; a `4xx` is counted as a `notify` refusal.
    async fn notify(&self, req: http::Request<Body>, room: &str) -> http::Response<Body> {
        let resp = self.notify_inner(req, room).await;
        if resp.status().is_client_error() {
            self.refused("notify", resp.status().as_str());
        }
        resp
    }

    async fn notify_inner(&self, req: http::Request<Body>, room: &str) -> http::Response<Body> {
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
        }
        if let Err(e) = check_name("room", room) {
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
        let Some(gw) = Gateway::get() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "this worker has no gateway\n".into(),
            );
        };
        let body = match Limited::new(req.into_body(), MAX_NOTIFY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<plugin_api::http_body_util::LengthLimitError>() => {
                let why = format!("the body is over {MAX_NOTIFY} bytes\n");
                return text(StatusCode::PAYLOAD_TOO_LARGE, why);
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")),
        };
        let Ok(body) = std::str::from_utf8(&body) else {
            return text(StatusCode::BAD_REQUEST, "the body is not UTF-8\n".into());
        };
        let sent = match gw.send_to_group(room, format!("{room}: {body}"), &[]) {
            Ok(()) => gw.group_count(room).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(n) => text(StatusCode::OK, format!("sent to {n} clients\n")),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        }
    }
}

impl Chat {
    /// Counts a refusal and logs it, at most one line a second for the worker.
    fn refused(&self, reason: &'static str, why: &str) {
        static LOGGED_AT: AtomicU64 = AtomicU64::new(0);
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.refused[i].inc();
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if LOGGED_AT.swap(now, Ordering::Relaxed) != now {
            tracing::info!(
                reason,
                why,
                "chat input refused (at most one line a second)"
            );
        }
    }
}

fn text(status: StatusCode, body: String) -> http::Response<Body> {
    let mut resp = http::Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp
}

/// The page, its WebSocket address filled in as a JS string literal (`null`: the page's host).
fn page(config: &ChatConfig) -> Bytes {
    let url = match &config.ws_url {
        Some(u) => serde_json::to_string(u).unwrap_or_else(|_| "null".into()),
        None => "null".into(),
    };
    Bytes::from(
        include_str!("page.html")
            .replace("__WS_URL__", &url.replace("</", "<\\/"))
            .replace(
                "__WS_PORT__",
                &config.ws_port.map_or("null".into(), |p| p.to_string()),
            ),
    )
}

impl Plugin for Chat {
    const GATEWAY_EVENTS: bool = true;

    fn on_worker_start(ctx: &WorkerContext) -> Result<Self, BoxError> {
        let config: ChatConfig = ctx.config()?;
        let refused = REASONS
            .iter()
            .map(|r| {
                let help = "chat input refused with an error answer, by reason";
                Counter::new("chat_refused", help, &[("reason", r)])
            })
            .collect();
        Ok(Chat {
            generation: ctx.generation,
            page: page(&config),
            refused,
        })
    }

    async fn on_gateway_event(&self, gw: Gateway, cx: EventContext, event: GatewayEvent) {
        let client = cx.client();
        let text = match event {
            GatewayEvent::Connect { path, .. } => {
                if path != "/chat" {
                    cx.refuse(404);
                }
                return;
            }
            GatewayEvent::Close { .. } => return,
            GatewayEvent::Binary(_) => {
                self.refused("binary", "a binary message");
                let _ = gw.send_to_client(client, "error: text commands only");
                return;
            }
            GatewayEvent::Text(t) => t,
        };
        let session: Session = cx.session().unwrap_or_default();
        let outcome = self.command(gw, client, &session, &text).await;
        if let (Some(reason), Some(line)) = (outcome.refused, &outcome.answer) {
            self.refused(reason, line);
        }
        if let Some(s) = &outcome.session
            && let Err(e) = cx.set_session(s)
        {
            tracing::error!(error = %e, "session not kept");
        }
        if let Some(line) = outcome.answer
            && let Err(e) = gw.send_to_client(client, line)
        {
            tracing::warn!(error = %e, client, "answer not sent");
        }
    }

    fn dispatch(&self, _method: &str, path: &str) -> Dispatch {
        match path {
            "/" => Dispatch::Inline,
            _ => Dispatch::Async,
        }
    }

    fn handle(&self, req: Request) -> Response {
        let mut resp = Response::new(self.page.clone());
        if req.method() != Method::GET && req.method() != Method::HEAD {
            *resp.body_mut() = Bytes::from_static(b"use GET\n");
            *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            return resp;
        }
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/html; charset=utf-8"),
        );
        resp
    }

    async fn serve(&self, req: http::Request<Body>) -> http::Response<Body> {
        let path = req.uri().path().to_owned();
        match path
            .strip_prefix("/rooms/")
            .and_then(|p| p.strip_suffix("/notify"))
        {
            Some(room) => self.notify(req, room).await,
            None => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

plugin_api::export_plugin!(Chat);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_are_one_line_errors() {
        assert_eq!(parse("echo a b"), Ok(Command::Echo("a b")));
        assert_eq!(parse("echo"), Ok(Command::Echo("")));
        assert_eq!(parse("nick ann"), Ok(Command::Nick("ann")));
        assert_eq!(parse("say r hi there"), Ok(Command::Say("r", "hi there")));
        assert_eq!(parse("to bob yo"), Ok(Command::To("bob", "yo")));
        assert_eq!(parse("session"), Ok(Command::Session));
        for bad in [
            "",
            "nick",
            "nick a b",
            "join",
            "say r",
            "say r ",
            "to bob",
            "session x",
            "dance",
            &format!("nick {}", "n".repeat(MAX_NAME + 1)),
            "join r\u{e9}",
            "join a/b",
        ] {
            let (reason, e) = parse(bad).expect_err(bad);
            assert!(REASONS.contains(&reason), "{bad:?}: {reason}");
            assert!(!e.contains('\n'), "{bad:?}: {e}");
        }
        assert!(parse(&"x".repeat(100_000)).unwrap_err().1.len() < 200);
        assert_eq!(parse("join a/b").unwrap_err().0, "name");
        assert_eq!(parse("join").unwrap_err().0, "command");
        assert!(parse(&format!("nick {}", "n".repeat(MAX_NAME))).is_ok());
    }

    #[test]
    fn the_page_quotes_its_ws_url() {
        let config = ChatConfig {
            ws_url: Some("ws://x/</script>\"".into()),
            ws_port: Some(9),
        };
        let page = String::from_utf8(page(&config).to_vec()).unwrap();
        assert!(page.contains(r#""ws://x/<\/script>\"""#), "{page}");
        assert!(!page.contains("__WS_"));
    }
}
