//! The load checker against small in-process servers that misbehave in known ways.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use ustad_testkit::load::{self, LoadOptions};

#[derive(Clone, Copy)]
enum Mode {
    /// 200 with `X-Worker-Pid: 42`; every `close_every`-th response on a connection says
    /// `Connection: close`.
    Hello { close_every: Option<u64> },
    /// This status for everything.
    Status(u16),
    /// Read a request, then close the connection without answering.
    NoReply,
}

/// A server on its own runtime, shut down on drop.
struct TestServer {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl TestServer {
    fn start(mode: Mode) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, mode));
            }
        });
        Self {
            addr,
            _runtime: runtime,
        }
    }
}

async fn serve(mut stream: tokio::net::TcpStream, mode: Mode) {
    let (close_every, status) = match mode {
        Mode::NoReply => {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return;
        }
        Mode::Hello { close_every } => (close_every, 200),
        Mode::Status(status) => (None, status),
    };
    let served = Arc::new(AtomicU64::new(0));
    let service = service_fn(move |_request| {
        let n = served.fetch_add(1, Ordering::Relaxed) + 1;
        let mut response = Response::builder()
            .status(status)
            .header("X-Worker-Pid", "42");
        if close_every.is_some_and(|every| n % every == 0) {
            response = response.header("Connection", "close");
        }
        let response = response.body(Full::new(Bytes::from_static(b"hi"))).unwrap();
        async move { Ok::<_, Infallible>(response) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn options(addr: SocketAddr, max_requests: u64) -> LoadOptions {
    LoadOptions {
        connections: 3,
        max_requests: Some(max_requests),
        ..LoadOptions::new(addr)
    }
}

#[test]
fn keep_alive_load_counts_every_request() {
    let server = TestServer::start(Mode::Hello { close_every: None });
    let report = load::start(options(server.addr, 300)).wait();
    assert_eq!(report.ok, 300, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(report.by_pid.get(&42), Some(&300));
    assert_eq!(report.connections_opened, 3, "{report}");
}

#[test]
fn without_keep_alive_every_request_has_its_connection() {
    let server = TestServer::start(Mode::Hello { close_every: None });
    let report = load::start(LoadOptions {
        keep_alive: false,
        ..options(server.addr, 60)
    })
    .wait();
    assert_eq!((report.ok, report.failed), (60, 0), "{report}");
    assert_eq!(report.connections_opened, 60, "{report}");
}

/// `Connection: close` is the polite way to end a keep-alive connection: no failure.
#[test]
fn connection_close_is_not_a_failure() {
    let server = TestServer::start(Mode::Hello {
        close_every: Some(3),
    });
    let report = load::start(options(server.addr, 300)).wait();
    assert_eq!((report.ok, report.failed), (300, 0), "{report}");
    assert!(report.connections_opened >= 100, "{report}");
}

/// Reading a request and closing without an answer fails every request.
#[test]
fn a_close_after_the_request_is_a_failure() {
    let server = TestServer::start(Mode::NoReply);
    let report = load::start(options(server.addr, 30)).wait();
    assert_eq!((report.ok, report.failed), (0, 30), "{report}");
    assert!(!report.errors.is_empty());
    assert!(report.errors.len() <= 20);
}

#[test]
fn a_non_200_status_is_a_failure() {
    let server = TestServer::start(Mode::Status(503));
    let report = load::start(options(server.addr, 30)).wait();
    assert_eq!((report.ok, report.failed), (0, 30), "{report}");
    assert_eq!(report.errors, vec!["status 503".to_owned()]);
}

#[test]
fn a_refused_connect_is_a_failure() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The listener is closed: nothing listens there any more.
    let report = load::start(LoadOptions {
        connections: 1,
        max_duration: Duration::from_millis(200),
        ..LoadOptions::new(addr)
    })
    .wait();
    assert_eq!(report.ok, 0);
    assert!(report.failed > 0, "{report}");
    assert!(report.errors[0].starts_with("connect:"), "{report}");
    assert!(report.elapsed < Duration::from_secs(5), "{report}");
}

#[test]
fn stop_ends_unbounded_load_promptly() {
    let server = TestServer::start(Mode::Hello { close_every: None });
    let handle = load::start(LoadOptions::new(server.addr));
    assert!(handle.wait_for_ok(100, Duration::from_secs(20)));
    assert!(handle.snapshot().ok >= 100);
    let report = handle.stop();
    assert!(report.ok >= 100, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.elapsed < Duration::from_secs(20), "{report}");
}

#[test]
fn get_returns_status_headers_and_body() {
    let server = TestServer::start(Mode::Hello { close_every: None });
    let (status, headers, body) = load::get(server.addr).unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-worker-pid"], "42");
    assert_eq!(body, "hi");

    let closed = TestServer::start(Mode::NoReply);
    let error = load::get(closed.addr).unwrap_err();
    assert!(error.starts_with("request:"), "{error}");
}
