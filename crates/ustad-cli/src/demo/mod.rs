//! The built-in demo worker (`ustad demo-worker`): an HTTP/1.1 hello-world server that follows
//! the worker conventions, used as the reference worker and by the benchmarks.
//!
//! One process serves on one core (a tokio current-thread runtime); run one per core under
//! `ustad run`. On SIGTERM or SIGINT it drains without a single client error:
//!
//! 1. it stops accepting and sends `STOPPING=1`. The listening sockets stay open in the primary
//!    and the other workers, so connections still queued on them go to those;
//! 2. requests in flight finish normally;
//! 3. the next response on each keep-alive connection carries `Connection: close`, after which
//!    hyper closes that connection;
//! 4. a connection still idle `idle_grace` after the drain began is closed then. Closing it at
//!    once would race with the client's next request, which would then fail;
//! 5. once every connection is closed, it exits 0.
//!
//! The drain gives up after `idle_grace` + [`DRAIN_SLACK`], and a second SIGTERM or SIGINT ends
//! it at once; both exit non-zero because connections were cut.

mod conn;

use std::convert::Infallible;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use ustad_worker::{Identity, ListenFd, Notifier};

use self::conn::{Drain, Listener, Server};

/// How long the drain may outlast `idle_grace` before the worker exits anyway: the time left for
/// requests still in flight when the idle connections are closed.
pub(crate) const DRAIN_SLACK: Duration = Duration::from_secs(10);

/// How the demo worker behaves.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// How long a keep-alive connection may stay idle after SIGTERM before it is closed.
    pub(crate) idle_grace: Duration,
}

/// Runs the demo worker until it has drained after SIGTERM or SIGINT.
///
/// # Errors
///
/// When there are no inherited sockets (or they are not TCP or Unix stream listeners), when the
/// environment set by ustad is malformed, when `READY=1` cannot be sent, and when the drain is
/// cut short by a second signal or by its time limit.
pub(crate) fn run(options: Options) -> anyhow::Result<()> {
    let identity = Identity::from_env()?;
    let notifier = Notifier::from_env()?;
    let listeners = ustad_worker::listen_fds().context("cannot take the inherited sockets")?;
    if listeners.is_empty() {
        bail!("no sockets: run me under `ustad run`");
    }
    let listeners = listeners
        .into_iter()
        .map(std_listener)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let server = Server::new(identity.as_ref().map(Identity::id), std::process::id());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(listeners, server, options, notifier.as_ref()))
}

/// A listener from the supervisor, still blocking and outside the runtime.
enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

fn std_listener(fd: ListenFd) -> anyhow::Result<StdListener> {
    let name = fd.name().to_owned();
    let listener = if fd.is_tcp() {
        fd.into_tcp_listener().map(StdListener::Tcp)?
    } else {
        fd.into_unix_listener()
            .map(StdListener::Unix)
            .context("the demo worker serves TCP or Unix stream sockets")?
    };
    // O_NONBLOCK lives on the socket description that the primary and every worker share;
    // setting it here is harmless because all of them use the socket non-blocking too.
    match &listener {
        StdListener::Tcp(listener) => listener.set_nonblocking(true),
        StdListener::Unix(listener) => listener.set_nonblocking(true),
    }
    .with_context(|| format!("cannot make socket {name:?} non-blocking"))?;
    Ok(listener)
}

async fn serve(
    listeners: Vec<StdListener>,
    server: Server,
    options: Options,
    notifier: Option<&Notifier>,
) -> anyhow::Result<()> {
    // Registered before READY=1, so that from then on SIGTERM means "drain", never "die".
    let mut stop = StopSignals::new()?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let drain = Drain::new(drain_rx, options.idle_grace);
    // Every accept loop and connection holds a sender; `recv` returns `None` once all are gone.
    let (open_tx, mut open_rx) = mpsc::channel::<Infallible>(1);
    let server = std::sync::Arc::new(server);

    let mut accept_loops = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let listener = match listener {
            StdListener::Tcp(listener) => {
                Listener::Tcp(tokio::net::TcpListener::from_std(listener)?)
            }
            StdListener::Unix(listener) => {
                Listener::Unix(tokio::net::UnixListener::from_std(listener)?)
            }
        };
        let task = listener.accept_loop(server.clone(), drain.clone(), open_tx.clone());
        accept_loops.push(tokio::spawn(task));
    }
    drop(open_tx);
    if let Some(notifier) = notifier {
        notifier
            .ready()
            .context("cannot send READY=1 to NOTIFY_SOCKET")?;
    }

    let first = stop.recv().await;
    tracing::info!("{first}: draining");
    server.start_draining();
    drain_tx.send_replace(true);
    for accept_loop in accept_loops {
        // Each loop returns at once, dropping its listener; a panic there was already printed.
        let _ = accept_loop.await;
    }
    if let Some(notifier) = notifier {
        if let Err(err) = notifier.stopping() {
            tracing::warn!("cannot send STOPPING=1: {err}");
        }
    }

    let limit = options.idle_grace.saturating_add(DRAIN_SLACK);
    tokio::select! {
        None = open_rx.recv() => {
            tracing::info!("drained: every connection is closed");
            Ok(())
        }
        () = tokio::time::sleep(limit) => {
            bail!("drain timed out after {limit:?} with {} connections open", server.open_connections())
        }
        second = stop.recv() => {
            bail!("{second} while draining: exiting with {} connections open", server.open_connections())
        }
    }
}

/// SIGTERM and SIGINT; tokio keeps the handlers for the life of the process.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    /// Waits for the next signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
