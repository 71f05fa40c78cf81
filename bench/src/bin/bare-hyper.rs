//! The baseline: a hyper server answering what a `host` worker answers for `GET /`, minus the
//! plugin: the auto HTTP/1 + HTTP/2 builder with hyper's own header-read timer (the worker keeps
//! the same protections, h2c and a slowloris guard, but guards with one sweep per worker instead
//! of that timer), the example plugin's body and content type, one current-thread runtime unless
//! `--threads` says otherwise. `--plain-h1`: HTTP/1 only, no timer and no header timeout, the
//! cheapest hyper server (an anchor for what the HTTP stack costs). `--no-header-timer`: the
//! auto builder without the header timer, to tell the two costs apart.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18181")]
    addr: SocketAddr,
    /// Runtime threads; 1 means a current-thread runtime, like a host worker's I/O thread.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// HTTP/1 only, without the header-read timer.
    #[arg(long)]
    plain_h1: bool,
    /// Without the header-read timer (and the timer it needs).
    #[arg(long)]
    no_header_timer: bool,
}

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = format!(
        "hello from example-plugin 0.1.0\npid {} generation 0 slot 0\n",
        std::process::id()
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

fn main() {
    let args = Args::parse();
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .expect("bind");
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1().keep_alive(true);
        let mut plain = hyper::server::conn::http1::Builder::new();
        plain.keep_alive(true);
        if args.no_header_timer {
            http.http1().header_read_timeout(None);
        } else {
            http.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
        }
        let http = std::sync::Arc::new(http);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            if args.plain_h1 {
                let conn =
                    plain.serve_connection(TokioIo::new(stream), hyper::service::service_fn(hello));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                continue;
            }
            let http = http.clone();
            tokio::spawn(async move {
                let _ = http
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(hello))
                    .await;
            });
        }
    });
}
