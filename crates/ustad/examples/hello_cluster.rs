//! Node's cluster "hello world": one HTTP port, one worker per core, each worker the same
//! binary as the primary.
//!
//!     cargo run --example hello_cluster            # then: curl 127.0.0.1:8000
//!     HELLO_ADDR=127.0.0.1:9000 cargo run --example hello_cluster
//!     HELLO_MODE=round-robin cargo run --example hello_cluster    # or reuseport
//!
//! With `HELLO_MODE=round-robin` the primary accepts the connections and hands them to the
//! workers in turn (Node's default), instead of the workers accepting from a shared socket.
//! Ctrl-C stops the workers gracefully, then the primary.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ustad::{Pool, Role, Worker};

fn main() -> anyhow::Result<()> {
    let address = std::env::var("HELLO_ADDR").unwrap_or_else(|_| "127.0.0.1:8000".to_owned());
    match ustad::role() {
        Role::Primary(primary) => {
            println!("primary {} serving http://{address}/", std::process::id());
            let mode = std::env::var("HELLO_MODE").unwrap_or_default();
            let pool = match mode.as_str() {
                "round-robin" => Pool::auto().listen_round_robin(&address),
                "reuseport" => Pool::auto().listen_reuseport(&address),
                _ => Pool::auto().listen(&address),
            };
            primary.pool("web", pool).run()?;
        }
        Role::Worker(worker) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(serve(worker))?,
    }
    Ok(())
}

fn round_robin() -> bool {
    std::env::var("HELLO_MODE").is_ok_and(|mode| mode == "round-robin")
}

async fn serve(worker: Worker) -> anyhow::Result<()> {
    let pid = std::process::id();
    // Round-robin: connections come from the primary; shared: from the socket.
    let listener = if round_robin() {
        println!(
            "worker {} (pid {pid}) takes handed connections",
            worker.id()
        );
        None
    } else {
        let listener = worker.tokio_tcp_listener("web")?;
        println!(
            "worker {} (pid {pid}) serving on {}",
            worker.id(),
            listener.local_addr()?
        );
        Some(listener)
    };
    let body = Bytes::from(format!("hello from worker {} (pid {pid})\n", worker.id()));
    worker.ready().await?;
    let stopped = worker.stopped();
    tokio::pin!(stopped);
    loop {
        let next = async {
            match &listener {
                Some(listener) => Ok::<_, anyhow::Error>(Some(listener.accept().await?.0)),
                None => match worker.accept().await? {
                    Some(handed) => Ok(Some(handed.into_tokio_tcp()?)),
                    None => Ok(None),
                },
            }
        };
        let stream = tokio::select! {
            stream = next => match stream? {
                Some(stream) => stream,
                None => break,
            },
            _ = &mut stopped => break,
        };
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                let mut response = Response::new(Full::new(body.clone()));
                response.headers_mut().insert("x-worker-pid", pid.into());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    Ok(())
}
