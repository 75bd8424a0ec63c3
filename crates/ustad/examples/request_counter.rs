//! Node's `notifyRequest` example: workers serve HTTP and tell the primary about every
//! request; the primary keeps the count.
//!
//!     cargo run --example request_counter         # then: curl 127.0.0.1:8000; Ctrl-C prints the total
//!
//! `COUNTER_ADDR` changes the address.

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use ustad::{Event, Pool, Role, Worker};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Notice {
    Request { path: String },
}

fn main() -> anyhow::Result<()> {
    let address = std::env::var("COUNTER_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".to_owned());
    let role = ustad::role();
    let runtime = tokio::runtime::Runtime::new()?;
    match role {
        Role::Primary(primary) => runtime.block_on(async {
            let cluster = primary.pool("web", Pool::new(2).listen(&address)).start()?;
            let mut events = cluster.events().expect("first call");
            let mut by_worker: BTreeMap<u64, u64> = BTreeMap::new();
            // Ends when the cluster stops (Ctrl-C, SIGTERM).
            while let Some(event) = events.recv().await {
                match event {
                    Event::Ready(worker) => {
                        println!("worker {} ready (pid {})", worker.id, worker.pid)
                    }
                    Event::Message { worker, message } => {
                        let Notice::Request { .. } = message.decode()?;
                        *by_worker.entry(worker.id.0).or_default() += 1;
                    }
                    _ => {}
                }
            }
            let total: u64 = by_worker.values().sum();
            println!("total requests: {total} {by_worker:?}");
            Ok(())
        }),
        Role::Worker(worker) => runtime.block_on(serve(worker)),
    }
}

async fn serve(worker: Worker) -> anyhow::Result<()> {
    let listener = worker.tokio_tcp_listener("web")?;
    println!(
        "worker {} serving on {}",
        worker.id(),
        listener.local_addr()?
    );
    worker.ready().await?;
    let stopped = worker.stopped();
    tokio::pin!(stopped);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut stopped => return Ok(()),
        };
        let worker = worker.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let worker = worker.clone();
                async move {
                    let path = request.uri().path().to_owned();
                    // Counted before the response goes out, so a client that saw its
                    // response knows the primary has heard of it.
                    let _ = worker.send(&Notice::Request { path }).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"counted\n"))))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
