//! An HTTP/1.1 load checker that counts every failed request, to prove that restarts and
//! rollouts lose nothing.
//!
//! [`start`] runs `connections` concurrent clients on a thread of their own, each sending
//! `GET /` over and over, until [`LoadHandle::stop`] is called, `max_duration` has passed, or
//! `max_requests` have been sent.
//!
//! # What counts
//!
//! Every request that was *sent* ends as exactly one of:
//!
//! - **ok**: a complete response with status 200 (body read to the end);
//! - **failed**:
//!   - the TCP connect failed or timed out (counted as one failed request, since the request it
//!     was for could not be sent; retried after 10 ms);
//!   - the request was written (wholly or in part) and the connection was then reset or closed
//!     before a complete response arrived, including mid-body;
//!   - the response status was not 200;
//!   - the response could not be parsed;
//!   - no complete response within `request_timeout`.
//!
//! Not failures, and not counted at all:
//!
//! - a response with `Connection: close` (or an HTTP/1.0 response without keep-alive): the
//!   client simply opens a new connection for its next request;
//! - a keep-alive connection that the server closed *before* the next request was handed to it
//!   (hyper reports the connection closed and gives the request back unsent): the client
//!   reconnects and sends it there.
//!
//! Note the race a server must avoid during a graceful stop: if it closes an idle keep-alive
//! connection just as the client's next request is on the wire, that request was sent and is a
//! failure, as it would be for a real client. A server that drains by answering the next request
//! with `Connection: close` (as `test-worker --serve-http` does) loses nothing.
//!
//! `by_pid` counts ok responses by their `X-Worker-Pid` header (responses without it are not in
//! the map).

use std::collections::{BTreeMap, HashMap};
use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONNECTION, HOST};
use hyper::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle as TaskHandle;

/// How many distinct error messages a report keeps.
const MAX_ERRORS: usize = 20;
/// The pause after a failed connect, so a refused port does not spin.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// What load to generate.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Concurrent connections (each with one request in flight at a time).
    pub connections: usize,
    /// Reuse each connection for request after request (until the server says
    /// `Connection: close`); if false, every request goes on a fresh connection and says
    /// `Connection: close` itself.
    pub keep_alive: bool,
    /// Stop starting new requests after this long.
    pub max_duration: Duration,
    /// Stop after this many requests (ok + failed); `None` for no limit.
    pub max_requests: Option<u64>,
    /// How long a connect, or a request until its complete response, may take before it counts
    /// as failed.
    pub request_timeout: Duration,
}

impl LoadOptions {
    /// 4 keep-alive connections to `addr`, for at most 30 s, with a 10 s request timeout.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            connections: 4,
            keep_alive: true,
            max_duration: Duration::from_secs(30),
            max_requests: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Counts so far (from [`LoadHandle::snapshot`]) or in total (from [`LoadHandle::stop`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests answered with a complete 200 response.
    pub ok: u64,
    /// Requests that failed (see the [module docs](self)).
    pub failed: u64,
    /// The first 20 distinct error messages.
    pub errors: Vec<String>,
    /// Ok responses by their `X-Worker-Pid` header.
    pub by_pid: BTreeMap<u32, u64>,
    /// TCP connections successfully opened.
    pub connections_opened: u64,
    /// Time from [`start`] until the load stopped (or until the snapshot).
    pub elapsed: Duration,
}

impl LoadReport {
    /// `ok + failed`.
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok={} failed={} connections_opened={} elapsed={:?} by_pid={:?}",
            self.ok, self.failed, self.connections_opened, self.elapsed, self.by_pid
        )?;
        for error in &self.errors {
            write!(f, "\n  error: {error}")?;
        }
        Ok(())
    }
}

/// Running load, from [`start`]. Dropping it stops the load too.
#[derive(Debug)]
pub struct LoadHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    options: LoadOptions,
    started: Instant,
    deadline: Instant,
    stop: AtomicBool,
    /// Requests reserved against `max_requests`: outcomes counted plus requests in flight.
    reserved: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    connections_opened: AtomicU64,
    detail: Mutex<Detail>,
}

#[derive(Debug, Default)]
struct Detail {
    errors: Vec<String>,
    by_pid: BTreeMap<u32, u64>,
    finished: Option<Instant>,
}

impl Shared {
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    /// Claims one request of the `max_requests` budget.
    fn reserve(&self) -> bool {
        match self.options.max_requests {
            None => true,
            Some(max) => self
                .reserved
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    fn release(&self) {
        if self.options.max_requests.is_some() {
            self.reserved.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn record_ok(&self, pid: Option<u32>) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        if let Some(pid) = pid {
            *self.detail().by_pid.entry(pid).or_default() += 1;
        }
    }

    fn record_failure(&self, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut detail = self.detail();
        if detail.errors.len() < MAX_ERRORS && !detail.errors.contains(&error) {
            detail.errors.push(error);
        }
    }

    fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn report(&self) -> LoadReport {
        let detail = self.detail();
        LoadReport {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            errors: detail.errors.clone(),
            by_pid: detail.by_pid.clone(),
            connections_opened: self.connections_opened.load(Ordering::Relaxed),
            elapsed: detail.finished.unwrap_or_else(Instant::now) - self.started,
        }
    }
}

/// Starts generating load on a new thread (with a current-thread tokio runtime).
///
/// # Panics
///
/// If `options.connections` is 0, or the thread or runtime cannot be created.
pub fn start(options: LoadOptions) -> LoadHandle {
    assert!(
        options.connections > 0,
        "load: connections must be at least 1"
    );
    let started = Instant::now();
    let shared = Arc::new(Shared {
        deadline: started + options.max_duration,
        options,
        started,
        stop: AtomicBool::new(false),
        reserved: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        connections_opened: AtomicU64::new(0),
        detail: Mutex::new(Detail::default()),
    });
    let thread_shared = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("load".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building the load runtime");
            runtime.block_on(async {
                let mut clients = tokio::task::JoinSet::new();
                for _ in 0..thread_shared.options.connections {
                    clients.spawn(client(Arc::clone(&thread_shared)));
                }
                while clients.join_next().await.is_some() {}
            });
            thread_shared.detail().finished = Some(Instant::now());
        })
        .expect("spawning the load thread");
    LoadHandle {
        shared,
        thread: Some(thread),
    }
}

impl LoadHandle {
    /// The counts so far.
    pub fn snapshot(&self) -> LoadReport {
        self.shared.report()
    }

    /// Whether the load has stopped by itself (`max_duration` or `max_requests` reached).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits (polling every 5 ms) until at least `n` requests were ok; false on timeout or if the
    /// load stopped first.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.ok.load(Ordering::Relaxed) >= n {
                return true;
            }
            if Instant::now() >= deadline || self.is_finished() {
                return self.shared.ok.load(Ordering::Relaxed) >= n;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops starting new requests, waits for those in flight (each bounded by
    /// `request_timeout`), and returns the final counts.
    pub fn stop(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.join();
        self.shared.report()
    }

    /// Waits for the load to stop by itself (at `max_duration` or `max_requests`), and returns
    /// the final counts.
    pub fn wait(mut self) -> LoadReport {
        self.join();
        self.shared.report()
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Aborts the connection task when the client is done with the connection.
struct AbortOnDrop(TaskHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How one request ended.
enum Exchange {
    /// A complete response.
    Done {
        status: u16,
        pid: Option<u32>,
        /// The server will close the connection after this response.
        close: bool,
    },
    /// The connection was closed before the request was handed to it: not sent.
    NotSent,
    /// Sent, then failed.
    Failed(String),
}

/// Why a connection was given up.
enum ConnectionEnd {
    /// Open a new one (the reservation, if still held, carries over).
    Reconnect { reserved: bool },
    /// The load is over.
    Stop,
}

/// One client: connection after connection, request after request.
async fn client(shared: Arc<Shared>) {
    let mut reserved = false;
    loop {
        if shared.should_stop() {
            break;
        }
        if !reserved {
            if !shared.reserve() {
                break;
            }
            reserved = true;
        }
        let connect = tokio::time::timeout(
            shared.options.request_timeout,
            TcpStream::connect(shared.options.addr),
        )
        .await;
        let stream = match connect {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                reserved = false;
                shared.record_failure(format!("connect: {e}"));
                tokio::time::sleep(CONNECT_RETRY).await;
                continue;
            }
            Err(_) => {
                reserved = false;
                shared.record_failure("connect: timed out".to_owned());
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.connections_opened.fetch_add(1, Ordering::Relaxed);
        match connection(&shared, stream, reserved).await {
            ConnectionEnd::Reconnect { reserved: still } => reserved = still,
            ConnectionEnd::Stop => {
                reserved = false;
                break;
            }
        }
    }
    if reserved {
        shared.release();
    }
}

/// Sends requests on one connection until it must be replaced or the load is over.
async fn connection(shared: &Shared, stream: TcpStream, mut reserved: bool) -> ConnectionEnd {
    let (mut sender, conn) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        TokioIo::new(stream),
    )
    .await
    {
        Ok(parts) => parts,
        // An HTTP/1 handshake does no I/O: this does not really happen.
        Err(e) => {
            shared.record_failure(format!("handshake: {}", chain(&e)));
            return ConnectionEnd::Reconnect { reserved: false };
        }
    };
    // Connection errors surface through the request that was in flight.
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let timeout = shared.options.request_timeout;
    loop {
        if !reserved {
            if shared.should_stop() || !shared.reserve() {
                return ConnectionEnd::Stop;
            }
            reserved = true;
        }
        // Closed by the server before we sent anything (an idle keep-alive timeout, or the end
        // of a graceful drain): not a failure, just reconnect.
        match tokio::time::timeout(timeout, sender.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return ConnectionEnd::Reconnect { reserved },
        }
        let request = build_request(shared.options.addr, shared.options.keep_alive);
        let exchange = match tokio::time::timeout(timeout, exchange(&mut sender, request)).await {
            Ok(exchange) => exchange,
            Err(_) => Exchange::Failed(format!("no complete response within {timeout:?}")),
        };
        match exchange {
            Exchange::NotSent => return ConnectionEnd::Reconnect { reserved },
            Exchange::Failed(error) => {
                shared.record_failure(error);
                return ConnectionEnd::Reconnect { reserved: false };
            }
            Exchange::Done { status, pid, close } => {
                reserved = false;
                if status == 200 {
                    shared.record_ok(pid);
                } else {
                    shared.record_failure(format!("status {status}"));
                }
                if close || !shared.options.keep_alive {
                    return ConnectionEnd::Reconnect { reserved: false };
                }
            }
        }
    }
}

fn build_request(addr: SocketAddr, keep_alive: bool) -> Request<Empty<Bytes>> {
    let mut request = Request::builder().uri("/").header(HOST, addr.to_string());
    if !keep_alive {
        request = request.header(CONNECTION, "close");
    }
    request.body(Empty::new()).expect("a valid request")
}

async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    request: Request<Empty<Bytes>>,
) -> Exchange {
    let response = match sender.try_send_request(request).await {
        Ok(response) => response,
        Err(mut e) => {
            if e.take_message().is_some() {
                return Exchange::NotSent;
            }
            return Exchange::Failed(format!("request: {}", chain(e.error())));
        }
    };
    let status = response.status().as_u16();
    let pid = header_str(&response, "x-worker-pid").and_then(|v| v.trim().parse().ok());
    let close = will_close(&response);
    match response.into_body().collect().await {
        Ok(_) => Exchange::Done { status, pid, close },
        Err(e) => Exchange::Failed(format!("response body: {}", chain(&e))),
    }
}

fn header_str<'a, B>(response: &'a Response<B>, name: &str) -> Option<&'a str> {
    response.headers().get(name)?.to_str().ok()
}

/// Whether the server closes the connection after this response.
fn will_close<B>(response: &Response<B>) -> bool {
    let has_token = |token: &str| {
        response
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match response.version() {
        Version::HTTP_10 => !has_token("keep-alive"),
        _ => has_token("close"),
    }
}

/// An error and its sources, joined with `: `.
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One `GET /` on a fresh connection (with `Connection: close`), with a 10 s timeout.
///
/// Returns the status, the headers (lower-case names; repeated headers joined with `, `) and the
/// body (lossy UTF-8). Runs on a thread of its own, so it can be called from anywhere, async
/// tests included.
///
/// # Errors
///
/// A description of what failed: connect, request, body or timeout.
pub fn get(addr: SocketAddr) -> Result<(u16, HashMap<String, String>, String), String> {
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("building a runtime: {e}"))?;
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), get_async(addr))
                .await
                .unwrap_or_else(|_| Err("no response within 10s".to_owned()))
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the request thread panicked".to_owned()))
}

async fn get_async(addr: SocketAddr) -> Result<(u16, HashMap<String, String>, String), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {}", chain(&e)))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender
        .send_request(build_request(addr, false))
        .await
        .map_err(|e| format!("request: {}", chain(&e)))?;
    let status = response.status().as_u16();
    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {}", chain(&e)))?
        .to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}
