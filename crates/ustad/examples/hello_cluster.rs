//! Node's cluster "hello world": one HTTP port, one worker per core, each worker the same
//! binary as the primary.
//!
//!     cargo run --example hello_cluster            # then: curl 127.0.0.1:8000
//!     HELLO_ADDR=127.0.0.1:9000 cargo run --example hello_cluster
//!     HELLO_MODE=round-robin cargo run --example hello_cluster    # or reuseport
//!     HELLO_ADDR=unix:/tmp/hello.sock cargo run --example hello_cluster
//!                                  # then: curl --unix-socket /tmp/hello.sock http://x/
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

/// Where a worker's connections come from.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
    /// Handed over by the primary (round-robin).
    Handed,
}

async fn serve(worker: Worker) -> anyhow::Result<()> {
    let pid = std::process::id();
    // Round-robin: connections come from the primary; shared: from the socket.
    let listener = if round_robin() {
        println!(
            "worker {} (pid {pid}) takes handed connections",
            worker.id()
        );
        Listener::Handed
    } else if std::env::var("HELLO_ADDR").is_ok_and(|a| a.starts_with("unix:")) {
        let listener = worker.tokio_unix_listener("web")?;
        let path = listener.local_addr()?;
        let path = path.as_pathname().map(|p| p.display().to_string());
        println!(
            "worker {} (pid {pid}) serving on unix:{}",
            worker.id(),
            path.unwrap_or_default()
        );
        Listener::Unix(listener)
    } else {
        let listener = worker.tokio_tcp_listener("web")?;
        println!(
            "worker {} (pid {pid}) serving on {}",
            worker.id(),
            listener.local_addr()?
        );
        Listener::Tcp(listener)
    };
    let body = Bytes::from(format!("hello from worker {} (pid {pid})\n", worker.id()));
    worker.ready().await?;
    let stopped = worker.stopped();
    tokio::pin!(stopped);
    loop {
        let next = async {
            match &listener {
                Listener::Tcp(listener) => {
                    let (stream, _) = listener.accept().await?;
                    spawn_connection(stream, body.clone(), pid);
                }
                Listener::Unix(listener) => {
                    let (stream, _) = listener.accept().await?;
                    spawn_connection(stream, body.clone(), pid);
                }
                Listener::Handed => match worker.accept().await? {
                    Some(handed) => spawn_connection(handed.into_tokio_tcp()?, body.clone(), pid),
                    None => return Ok(false),
                },
            }
            Ok::<_, anyhow::Error>(true)
        };
        tokio::select! {
            more = next => if !more? { break },
            _ = &mut stopped => break,
        }
    }
    Ok(())
}

/// Serves one connection's requests.
fn spawn_connection<S>(stream: S, body: Bytes, pid: u32)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
