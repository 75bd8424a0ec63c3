//! `test-worker`: a worker process for ustad's integration tests, with modes chosen by flags.
//!
//! With no flags it sends `READY=1` (if `NOTIFY_SOCKET` is set), then sleeps until SIGTERM or
//! SIGINT and exits 0. `READY=1` is sent only once the signal handlers are installed and the
//! HTTP server (with `--serve-http`) is accepting, so a test may signal a worker as soon as it is
//! ready. At start it prints `test-worker <id> started pid=<pid>` on stdout and
//! `test-worker <id> stderr pid=<pid>` on stderr, where `<id>` is `USTAD_WORKER_ID` (or `-`).
//! It reports each signal it handles on stderr (`test-worker <id> got SIGTERM, …`).
//!
//! Run `test-worker --help` for the flags.

use std::convert::Infallible;
use std::io::Write;
use std::net::TcpListener as StdTcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use ustad_proto::env::{
    LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID, NOTIFY_SOCKET, USTAD_WORKER_ID, USTAD_WORKER_INDEX,
};
use ustad_testkit::report::{self, FdProbe, Take, WorkerReport};

const USAGE: &str = "\
usage: test-worker [FLAGS]

  --ready-after <ms>         send READY=1 over NOTIFY_SOCKET after <ms> (default 0)
  --never-ready              send no READY=1
  --notify <STATE>           send this raw datagram after the ready delay (repeatable),
                             e.g. STATUS=hello or USTAD_REQUEST=restart
  --crash-after <ms>         exit with --exit-code (default 1) after <ms>
  --exit-code <n>            the code for --crash-after (alone: exit with it at once)
  --ignore-term              ignore SIGTERM and SIGINT (they are reported on stderr)
  --exit-on-term-after <ms>  on SIGTERM, keep running (and draining) <ms>, then exit 0
  --grandchild               spawn a grandchild in our process group (test-worker
                             --ignore-term --never-ready --quiet) and report its pid
  --report <path>            write a JSON report atomically; {pid}, {id} and {index} in the
                             path are replaced by the pid, USTAD_WORKER_ID, USTAD_WORKER_INDEX
  --env-report <NAME>        also report this environment variable (repeatable)
  --serve-http               serve HTTP/1.1 on the inherited fd 3: 200 with X-Worker-Pid;
                             on SIGTERM stop accepting, answer each connection's next request
                             with Connection: close, close idle ones after 200 ms, exit 0
  --bind <ADDR>              with --serve-http: bind ADDR itself (std's TcpListener::bind,
                             or UnixListener::bind for unix:PATH) instead of taking fd 3,
                             as a program that knows nothing of ustad; {port} in ADDR is
                             replaced by $PORT
  --flood-stdout             write ~100-byte lines to stdout as fast as possible, and every
                             10000 lines 1 MiB without a newline
  --sleep                    just sleep until a signal (the default)
  --quiet                    no start lines (used for the grandchild)
";

/// Writes one line to stderr in a single `write`, so that lines of processes sharing the pipe
/// do not interleave (`eprintln!` writes each formatted piece separately).
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// How long a draining HTTP connection waits for one more request before it is closed.
const IDLE_GRACE: Duration = Duration::from_millis(200);
/// The longest a draining HTTP server waits for its connections before exiting anyway.
const DRAIN_CAP: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Args {
    ready_after: Duration,
    never_ready: bool,
    notify: Vec<String>,
    crash_after: Option<Duration>,
    exit_code: Option<i32>,
    ignore_term: bool,
    exit_on_term_after: Option<Duration>,
    grandchild: bool,
    report: Option<String>,
    env_report: Vec<String>,
    serve_http: bool,
    bind: Option<String>,
    flood_stdout: bool,
    quiet: bool,
}

fn parse_args(raw: &[String]) -> Result<Args, String> {
    let mut args = Args::default();
    let mut iter = raw.iter();
    while let Some(flag) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let millis = |name: &str, v: String| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{name} {v:?}: {e}"))
        };
        match flag.as_str() {
            "--ready-after" => args.ready_after = millis(flag, value(flag)?)?,
            "--never-ready" => args.never_ready = true,
            "--notify" => args.notify.push(value(flag)?),
            "--crash-after" => args.crash_after = Some(millis(flag, value(flag)?)?),
            "--exit-code" => {
                let v = value(flag)?;
                args.exit_code = Some(v.parse().map_err(|e| format!("{flag} {v:?}: {e}"))?);
            }
            "--ignore-term" => args.ignore_term = true,
            "--exit-on-term-after" => args.exit_on_term_after = Some(millis(flag, value(flag)?)?),
            "--grandchild" => args.grandchild = true,
            "--report" => args.report = Some(value(flag)?),
            "--env-report" => args.env_report.push(value(flag)?),
            "--serve-http" => args.serve_http = true,
            "--bind" => args.bind = Some(value(flag)?),
            "--flood-stdout" => args.flood_stdout = true,
            "--sleep" => {}
            "--quiet" => args.quiet = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// Who this worker is, for output lines and HTTP headers.
#[derive(Debug)]
struct Identity {
    pid: u32,
    id: String,
}

fn main() -> ExitCode {
    // Before anything opens an fd of its own.
    let open_fds = report::open_fds();
    let raw_args: Vec<String> = std::env::args().skip(1).collect();
    if raw_args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&raw_args) {
        Ok(args) => args,
        Err(e) => {
            say!("test-worker: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let me = Arc::new(Identity {
        pid: std::process::id(),
        id: std::env::var(USTAD_WORKER_ID).unwrap_or_else(|_| "-".to_owned()),
    });

    // The environment as received: `listenfd` removes LISTEN_FDS and LISTEN_PID below.
    let env = report::REPORTED_ENV
        .iter()
        .copied()
        .chain(args.env_report.iter().map(String::as_str))
        .map(|name| (name.to_owned(), std::env::var(name).ok()))
        .collect();
    let listen_fd_count = std::env::var(LISTEN_FDS)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0)
        .clamp(0, 1024);
    let listen_fds: Vec<FdProbe> = (3..3 + listen_fd_count).map(report::probe_fd).collect();

    // The strict reading first: it only sets close-on-exec on the fds, it takes nothing.
    let (sd_notify_listen_fds, sd_notify_error) = match sd_notify::listen_fds() {
        Ok(fds) => (Some(fds.collect::<Vec<_>>()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    // Then the relaxed one. `ListenFd::from_env` removes variables from the environment, which
    // is only sound while the process has a single thread: it does here.
    let mut listenfd = listenfd::ListenFd::from_env();
    let listenfd_count = listenfd.len();
    let mut listener: Option<OwnedFd> = None;
    let listenfd_tcp_listener_0 = match listenfd.take_tcp_listener(0) {
        Ok(Some(tcp)) => {
            listener = Some(OwnedFd::from(tcp));
            Take::Ok
        }
        Ok(None) => Take::None,
        Err(e) => Take::Error(e.to_string()),
    };

    let stdin_target = std::fs::read_link("/proc/self/fd/0")
        .ok()
        .map(|t| t.to_string_lossy().into_owned());
    let stdin_is_dev_null = stdin_target.as_deref() == Some("/dev/null");

    if !args.quiet {
        // Not `println!`, which panics if stdout is closed.
        let _ = writeln!(
            std::io::stdout(),
            "test-worker {} started pid={}",
            me.id,
            me.pid
        );
        say!("test-worker {} stderr pid={}", me.id, me.pid);
    }

    let grandchild_pid = args.grandchild.then(spawn_grandchild).flatten();

    if let Some(template) = &args.report {
        let report = WorkerReport {
            pid: me.pid,
            ppid: rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs()),
            pgid: rustix::process::getpgid(None)
                .map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs()),
            args: raw_args.clone(),
            cwd: std::env::current_dir()
                .ok()
                .map(|d| d.to_string_lossy().into_owned()),
            env,
            listen_fds,
            sd_notify_listen_fds,
            sd_notify_error,
            listenfd_count,
            listenfd_tcp_listener_0,
            stdin_target,
            stdin_is_dev_null,
            grandchild_pid,
            open_fds,
        };
        let path = report::expand_report_path(
            template,
            me.pid,
            report.env(USTAD_WORKER_ID),
            report.env(USTAD_WORKER_INDEX),
        );
        if let Err(e) = report.write_atomic(&path) {
            say!("test-worker {}: writing {}: {e}", me.id, path.display());
            return ExitCode::from(2);
        }
    }

    let http = if let (true, Some(address)) = (args.serve_http, &args.bind) {
        match bind_itself(address) {
            Ok(listener) => Some(listener),
            Err(e) => {
                say!("test-worker {}: cannot bind {address}: {e}", me.id);
                return ExitCode::from(1);
            }
        }
    } else if args.serve_http {
        // Whatever listenfd gave, or fd 3 itself if listenfd refused it (say, LISTEN_PID names
        // another process): serving must not depend on what the report is there to check.
        let fd = listener.or_else(|| report::dup_fd(3));
        let is_unix = report::probe_fd(3).family.as_deref() == Some("unix");
        match fd {
            Some(fd) if is_unix => Some(Listener::Unix(StdUnixListener::from(fd))),
            Some(fd) => Some(Listener::Tcp(StdTcpListener::from(fd))),
            None => {
                say!("test-worker {}: --serve-http but fd 3 is not open", me.id);
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            say!("test-worker {}: building a runtime: {e}", me.id);
            return ExitCode::from(2);
        }
    };
    runtime.block_on(run(args, me, http))
}

/// Binds `address` as a program that knows nothing of ustad would (`{port}` is `$PORT`), and
/// says where it listens.
fn bind_itself(address: &str) -> std::io::Result<Listener> {
    let port = std::env::var("PORT").unwrap_or_default();
    let address = address.replace("{port}", &port);
    let listener = match address.strip_prefix("unix:") {
        Some(path) => Listener::Unix(StdUnixListener::bind(path)?),
        None => Listener::Tcp(StdTcpListener::bind(address.as_str())?),
    };
    let local = match &listener {
        Listener::Tcp(tcp) => tcp.local_addr()?.to_string(),
        Listener::Unix(unix) => format!("{:?}", unix.local_addr()?),
    };
    say!("test-worker bound {address} itself: listening on {local}");
    Ok(listener)
}

/// Spawns `test-worker --ignore-term --never-ready --quiet` in our process group.
fn spawn_grandchild() -> Option<u32> {
    let exe = std::env::current_exe().ok()?;
    let spawned = Command::new(exe)
        .args(["--ignore-term", "--never-ready", "--quiet"])
        .env_remove(NOTIFY_SOCKET)
        .env_remove(LISTEN_FDS)
        .env_remove(LISTEN_PID)
        .env_remove(LISTEN_FDNAMES)
        .stdin(Stdio::null())
        .spawn();
    match spawned {
        // Never waited for: if it outlives us it is reparented, which is the point.
        Ok(child) => Some(child.id()),
        Err(e) => {
            say!("test-worker: spawning the grandchild: {e}");
            None
        }
    }
}

enum Listener {
    Tcp(StdTcpListener),
    Unix(StdUnixListener),
}

async fn run(args: Args, me: Arc<Identity>, http: Option<Listener>) -> ExitCode {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            say!("test-worker {}: installing signal handlers: {e}", me.id);
            return ExitCode::from(2);
        }
    };

    if args.crash_after.is_some() || args.exit_code.is_some() {
        let me = Arc::clone(&me);
        let (delay, code) = (
            args.crash_after.unwrap_or_default(),
            args.exit_code.unwrap_or(1),
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            say!("test-worker {} exiting with code {code}", me.id);
            std::process::exit(code);
        });
    }

    if args.flood_stdout {
        let id = me.id.clone();
        std::thread::spawn(move || flood_stdout(&id));
    }

    let (drain_tx, drain_rx) = watch::channel(false);
    let mut server = match http {
        Some(listener) => match serve_http(listener, drain_rx, Arc::clone(&me)) {
            Ok(server) => Some(server),
            Err(e) => {
                say!("test-worker {}: serving HTTP: {e}", me.id);
                return ExitCode::from(2);
            }
        },
        None => None,
    };

    // Last, so that READY=1 means: signal handlers installed and HTTP (if any) accepting.
    {
        let me = Arc::clone(&me);
        let (delay, ready, notify) = (args.ready_after, !args.never_ready, args.notify);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if ready {
                send_notify(&me, NotifyState::Ready);
            }
            for state in &notify {
                send_notify(&me, NotifyState::Custom(state));
            }
        });
    }

    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if args.ignore_term {
            say!("test-worker {} got {name}, ignoring it", me.id);
            continue;
        }
        say!("test-worker {} got {name}, stopping", me.id);
        let _ = drain_tx.send(true);
        if let Some(delay) = args.exit_on_term_after {
            tokio::time::sleep(delay).await;
        } else if let Some(server) = server.take() {
            let _ = tokio::time::timeout(DRAIN_CAP, server).await;
        }
        say!("test-worker {} exiting with code 0", me.id);
        // Not a return: the flood thread may be blocked writing to a full pipe.
        std::process::exit(0);
    }
}

fn send_notify(me: &Identity, state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        say!("test-worker {}: sd_notify: {e}", me.id);
    }
}

/// Writes to stdout as fast as the reader takes it, until stdout is closed.
fn flood_stdout(id: &str) {
    let long_line = vec![b'x'; 1024 * 1024];
    let mut stdout = std::io::stdout();
    let mut batch = Vec::with_capacity(64 * 1024);
    for n in 0u64.. {
        // Pad to about 100 bytes per line.
        let _ = writeln!(
            batch,
            "flood {id} {n:>12} abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz"
        );
        if n % 10_000 == 100 {
            batch.extend_from_slice(&long_line);
        }
        if batch.len() >= 64 * 1024 {
            // The lock is taken per batch, so other output can interleave between batches.
            if stdout.write_all(&batch).is_err() {
                return;
            }
            batch.clear();
        }
    }
}

/// Starts the HTTP server; the returned task ends once it has drained after `drain` turned true.
fn serve_http(
    listener: Listener,
    drain: watch::Receiver<bool>,
    me: Arc<Identity>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // O_NONBLOCK is shared with every process holding this socket; tokio needs it.
    match listener {
        Listener::Tcp(std) => {
            std.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(std)?;
            Ok(tokio::spawn(async move {
                let accept = {
                    let listener = &listener;
                    move || async move {
                        let (stream, _) = listener.accept().await?;
                        let _ = stream.set_nodelay(true);
                        Ok(stream)
                    }
                };
                let connections = accept_until_drain(&drain, &me, accept).await;
                // Stop holding the socket as soon as we stop accepting.
                drop(listener);
                connections.join_all().await;
            }))
        }
        Listener::Unix(std) => {
            std.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(std)?;
            Ok(tokio::spawn(async move {
                let accept = {
                    let listener = &listener;
                    move || async move { Ok(listener.accept().await?.0) }
                };
                let connections = accept_until_drain(&drain, &me, accept).await;
                drop(listener);
                connections.join_all().await;
            }))
        }
    }
}

/// Accepts and serves connections until draining starts; returns the connections still open.
async fn accept_until_drain<S, F, A>(
    drain: &watch::Receiver<bool>,
    me: &Arc<Identity>,
    mut accept: A,
) -> JoinSet<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Future<Output = std::io::Result<S>>,
    A: FnMut() -> F,
{
    let mut connections = JoinSet::new();
    let mut draining = drain.clone();
    loop {
        tokio::select! {
            _ = draining_started(&mut draining) => return connections,
            accepted = accept() => match accepted {
                Ok(stream) => {
                    connections.spawn(serve_connection(stream, drain.clone(), Arc::clone(me)));
                }
                Err(e) => {
                    say!("test-worker {}: accept: {e}", me.id);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection<S>(stream: S, drain: watch::Receiver<bool>, me: Arc<Identity>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let closing = drain.clone();
    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
        let close = *closing.borrow();
        let me = Arc::clone(&me);
        async move { Ok::<_, Infallible>(hello(&me, close)) }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut drain = drain;
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = draining_started(&mut drain) => {}
    }
    // Draining: a client about to send its next request gets it answered with
    // `Connection: close`, which ends the connection without losing the request. Closing an idle
    // connection right away would race with that request.
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(IDLE_GRACE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(DRAIN_CAP, conn).await;
}

/// Returns once draining has started (the guard `wait_for` returns must not be held across an
/// await in a spawned task: it is not `Send`).
async fn draining_started(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

fn hello(me: &Identity, close: bool) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(200)
        .header("X-Worker-Pid", me.pid.to_string())
        .header("X-Worker-Id", me.id.as_str())
        .header(CONTENT_TYPE, "text/plain");
    if close {
        response = response.header(CONNECTION, "close");
    }
    response
        .body(Full::new(Bytes::from(format!(
            "hello from {} (pid {})\n",
            me.id, me.pid
        ))))
        .expect("a valid response")
}
