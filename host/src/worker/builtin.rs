//! The built-in `/_host/` routes and the host's own plain answers: compiled into `host`, so
//! they stay frozen across reloads. Owns the host's version as the routes report it. It never
//! calls plugin code.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};

/// The host's version, compiled into the binary: part of the frozen "start script".
pub const HOST_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Which build of `host` this is: `HOST_BUILD_ID` at compile time, `dev` when unset. `status`
/// and `/_host/health` report it, so an upgrade can be seen to have happened.
pub const HOST_BUILD: &str = match option_env!("HOST_BUILD_ID") {
    Some(id) => id,
    None => "dev",
};

/// A `text/plain` answer with `status`.
pub(super) fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The answer of a built-in route (a path under `/_host/`).
pub(super) fn route<B>(req: &Request<B>) -> Response<Bytes> {
    match req.uri().path() {
        "/_host/health"
            if req.method() == http::Method::GET || req.method() == http::Method::HEAD =>
        {
            let mut resp = plain(
                StatusCode::OK,
                format!(
                    "{{\"status\":\"ok\",\"host_version\":\"{HOST_VERSION}\",\"version\":\"{HOST_VERSION}\",\"build\":\"{HOST_BUILD}\"}}\n"
                ),
            );
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        "/_host/health" => plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        _ => plain(StatusCode::NOT_FOUND, "no such built-in route\n"),
    }
}
