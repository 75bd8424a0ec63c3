//! dutch-master's self-healing worker: after an error it cannot recover from, a worker asks to
//! be replaced. The primary starts a successor, waits until it is ready, and only then stops
//! the one that asked, so no request fails.
//!
//!     cargo run --example request_restart         # every 5th request "breaks" its worker
//!
//! `RESTART_ADDR` changes the address, `RESTART_AFTER` the number of requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ustad::{Event, Pool, Role, Worker};

fn main() -> anyhow::Result<()> {
    let address = std::env::var("RESTART_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".to_owned());
    let role = ustad::role();
    let runtime = tokio::runtime::Runtime::new()?;
    match role {
        Role::Primary(primary) => runtime.block_on(async {
            let cluster = primary.pool("web", Pool::new(1).listen(&address)).start()?;
            let mut events = cluster.events().expect("first call");
            while let Some(event) = events.recv().await {
                match event {
                    Event::Ready(w) => {
                        println!("worker {} ready in slot {} (pid {})", w.id, w.slot, w.pid)
                    }
                    Event::Stopping { worker, reason } => {
                        println!("worker {} stopping: {reason}", worker.id);
                    }
                    Event::Exited { worker, status, .. } => {
                        println!("worker {} exited: {status}", worker.id);
                    }
                    _ => {}
                }
            }
            Ok(())
        }),
        Role::Worker(worker) => runtime.block_on(serve(worker)),
    }
}

async fn serve(worker: Worker) -> anyhow::Result<()> {
    let after: u64 = std::env::var("RESTART_AFTER")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let listener = worker.tokio_tcp_listener("web")?;
    println!(
        "worker {} serving on {}",
        worker.id(),
        listener.local_addr()?
    );
    worker.ready().await?;
    let served = Arc::new(AtomicU64::new(0));
    let pid = std::process::id();
    let stopped = worker.stopped();
    tokio::pin!(stopped);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut stopped => return Ok(()),
        };
        let (worker, served) = (worker.clone(), served.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                let (worker, served) = (worker.clone(), served.clone());
                async move {
                    let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == after {
                        // Say, a corrupted cache: this worker keeps serving until its
                        // successor is ready, then stops gracefully.
                        eprintln!(
                            "worker {} broke after {n} requests: asking to be replaced",
                            worker.id()
                        );
                        let _ = worker.request_restart().await;
                    }
                    let mut response =
                        Response::new(Full::new(Bytes::from(format!("served by pid {pid}\n"))));
                    response.headers_mut().insert("x-worker-pid", pid.into());
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
