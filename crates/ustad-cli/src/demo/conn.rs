//! Accepting and serving connections, and each connection's part of the drain.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

static X_WORKER_PID: HeaderName = HeaderName::from_static("x-worker-pid");

/// What every connection shares: the canned response and the drain flag.
#[derive(Debug)]
pub(super) struct Server {
    body: Bytes,
    pid: HeaderValue,
    /// Set when the drain begins; from then on every response says `Connection: close`.
    draining: AtomicBool,
    open: AtomicUsize,
}

impl Server {
    pub(super) fn new(worker_id: Option<u64>, pid: u32) -> Self {
        let worker = worker_id.map_or_else(|| "?".to_owned(), |id| id.to_string());
        Server {
            body: Bytes::from(format!("hello from worker {worker} (pid {pid})\n")),
            pid: HeaderValue::from(pid),
            draining: AtomicBool::new(false),
            open: AtomicUsize::new(0),
        }
    }

    pub(super) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(super) fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn respond(&self) -> Response<Full<Bytes>> {
        // `Full` has an exact size, so hyper adds Content-Length.
        let mut response = Response::new(Full::new(self.body.clone()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(X_WORKER_PID.clone(), self.pid.clone());
        if self.draining.load(Ordering::Relaxed) {
            // hyper closes the connection once this response is written.
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The drain as seen by one task: whether it has begun, and the idle grace.
#[derive(Debug, Clone)]
pub(super) struct Drain {
    started: watch::Receiver<bool>,
    idle_grace: Duration,
}

impl Drain {
    pub(super) fn new(started: watch::Receiver<bool>, idle_grace: Duration) -> Self {
        Drain {
            started,
            idle_grace,
        }
    }

    /// Resolves once the drain has begun (at once if it already has).
    async fn started(&mut self) {
        // An error means the sender is gone, i.e. the worker is exiting: as good as draining.
        let _ = self.started.wait_for(|started| *started).await;
    }
}

/// Counts a connection as open until dropped.
struct OpenGuard {
    server: Arc<Server>,
    _open: mpsc::Sender<Infallible>,
}

impl OpenGuard {
    fn new(server: Arc<Server>, open: mpsc::Sender<Infallible>) -> Self {
        server.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard {
            server,
            _open: open,
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.server.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A listening socket inherited from the supervisor.
pub(super) enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Accepts connections and spawns a task for each, until the drain begins; then returns,
    /// closing this process's copy of the socket.
    pub(super) async fn accept_loop(
        self,
        server: Arc<Server>,
        drain: Drain,
        open: mpsc::Sender<Infallible>,
    ) {
        // The connections get `drain`; this loop watches its own copy.
        let mut stop = drain.clone();
        loop {
            let accepted = tokio::select! {
                biased;
                () = stop.started() => return,
                accepted = self.accept(&server, &drain, &open) => accepted,
            };
            match accepted {
                Ok(()) => {
                    // Let the new connection's task run before accepting the next one. Without
                    // this, the worker that wakes first takes everything queued on a shared
                    // socket (wrk's 64 connections all went to one of 2 workers), because an
                    // accept costs far less than the other worker's wake-up.
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(err) if is_transient(&err) => continue,
                Err(err) => {
                    // Out of fds or memory: retrying at once would spin, so back off briefly.
                    tracing::warn!("accept failed: {err}");
                    tokio::select! {
                        () = stop.started() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }

    async fn accept(
        &self,
        server: &Arc<Server>,
        drain: &Drain,
        open: &mpsc::Sender<Infallible>,
    ) -> io::Result<()> {
        let guard = || OpenGuard::new(server.clone(), open.clone());
        match self {
            Listener::Tcp(listener) => {
                let (stream, _) = listener.accept().await?;
                // Responses are written whole: Nagle's algorithm would only delay them.
                stream.set_nodelay(true)?;
                tokio::spawn(serve_connection(stream, drain.clone(), guard()));
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(serve_connection(stream, drain.clone(), guard()));
            }
        }
        Ok(())
    }
}

/// Errors that concern one connection that the peer already gave up on, not the listener.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Serves one connection until the client closes it or the drain does.
async fn serve_connection<I>(io: I, mut drain: Drain, guard: OpenGuard)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let server = guard.server.clone();
    let service = service_fn(
        move |_: Request<Incoming>| -> Ready<Result<_, Infallible>> { ready(Ok(server.respond())) },
    );
    let conn = http1::Builder::new()
        // No timer: idle keep-alive connections stay open until the drain closes them.
        .header_read_timeout(None)
        // Pipelined requests get their responses in one write.
        .pipeline_flush(true)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = pin!(conn);

    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = drain.started() => {
            // From now on responses carry `Connection: close`, so a busy connection ends after
            // its next response. An idle one gets `idle_grace` to send a last request.
            tokio::select! {
                result = conn.as_mut() => result,
                () = tokio::time::sleep(drain.idle_grace) => {
                    // Closes the connection if idle, else once the request in flight is answered.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(err) = result {
        // A client that vanishes mid-request is the client's business.
        tracing::debug!("connection ended with an error: {err}");
    }
    drop(guard);
}
