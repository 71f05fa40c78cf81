//! HTTP/2 clients across reloads: the pooled client reqwest is built on (hyper-util's legacy
//! `Client`, HTTP/2 prior knowledge, no retry logic of the test's own) and `h2load` lose no
//! request while workers drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tests::{Host, HostOptions, greeting_plugin};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pooled_h2_client_loses_nothing_across_reloads() {
    let (v1, v2) = (greeting_plugin("v1"), greeting_plugin("v2"));
    let host = Host::start(&v1, HostOptions::default()).await;
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri: http::Uri = format!("http://{}/", host.addr).parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (client, uri, stop, ok, errors) = (
                client.clone(),
                uri.clone(),
                stop.clone(),
                ok.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let outcome = match client.get(uri.clone()).await {
                        Ok(resp) => {
                            let status = resp.status();
                            match resp.into_body().collect().await {
                                Ok(_) if status == 200 => Ok(()),
                                Ok(_) => Err(format!("status {status}")),
                                Err(e) => Err(format!("body: {e:?}")),
                            }
                        }
                        Err(e) => Err(format!("request: {e:?}")),
                    };
                    match outcome {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            0
                        }
                    };
                }
            })
        })
        .collect();

    // Five reloads spread over ten seconds, as an operator's deploys would land.
    let began = Instant::now();
    for (i, build) in [&v2, &v1, &v2, &v1, &v2].into_iter().enumerate() {
        tokio::time::sleep_until((began + Duration::from_secs(2 * i as u64 + 1)).into()).await;
        host.install_plugin(build);
        host.reload_ok().await;
        eprintln!("reload {} done at {:?}", i + 1, began.elapsed());
    }
    tokio::time::sleep_until((began + Duration::from_secs(10)).into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    eprintln!(
        "pooled h2 client: {} ok, {} failed over {:?}",
        ok.load(Ordering::Relaxed),
        errors.len(),
        began.elapsed()
    );
    assert!(
        errors.is_empty(),
        "{} failed requests, first ones: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(host.status().await["generation"], 6);
}
