//! Setting the primary up before its loop runs, in an order that matters: the configuration
//! checked and every socket bound before anything starts (a bind error starts nothing), then
//! the control and metrics servers, the subreaper, the signal handlers, the notify socket and
//! the guard. With the options that choose what is set up, and the errors of setting it up.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::guard::Guard;
use super::link::{Lifecycle, Link};
use super::notify::RateLimit;
use super::process_groups::enable_subreaper;
use super::resume::Handover;
use super::round_robin::RoundRobinAcceptor;
use super::upgrade::{Checked, HELD_SIGNALS, Invocation};
use super::usage::Usage;
use super::{Ended, Supervisor};
use crate::config::{Config, ConfigError, Problem};
use crate::control::server::{Call, ControlServer};
use crate::fdstore::FdStore;
use crate::ipc::Kind;
use crate::logbook::LogBook;
use crate::notify::NotifySocket;
use crate::output::{OutputRelay, OutputStyle};
use crate::plan::{Clock, Plan, WorkerId};
use crate::service::ServiceNotifier;
use crate::sockets::{Activation, BindError, Listeners};
use crate::status::ClusterStatus;

/// Re-reads the configuration (on SIGHUP).
pub type Reload = Box<dyn FnMut() -> Result<Config, ConfigError> + Send>;

/// How the supervisor runs.
#[non_exhaustive]
pub struct Options {
    /// Re-reads the configuration on SIGHUP; without it SIGHUP restarts with the running one.
    pub reload: Option<Reload>,
    /// How workers' output is prefixed.
    pub output: OutputStyle,
    /// Become a child subreaper (`PR_SET_CHILD_SUBREAPER`), so that processes escaping a
    /// worker's process group are re-parented to the primary and cleaned up at exit.
    pub subreaper: bool,
    /// Start a guard process that kills the workers' process groups if the primary dies (the
    /// workers themselves die with it in any case, through `PR_SET_PDEATHSIG`).
    pub guard: bool,
    /// The instance's name, shown by `ustad status`.
    pub name: String,
    /// Where to listen for control clients (`ustad status`…); `None`: nowhere.
    pub control: Option<PathBuf>,
    /// The configuration file, shown by `ustad status`.
    pub config_file: Option<PathBuf>,
    /// Where to serve `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
    /// The embedding program's ends, for the Rust library.
    pub link: Option<Link>,
    /// How the primary's program was started, so that `ustad upgrade` can execute a new one
    /// the same way; `None`: upgrades are refused.
    pub invocation: Option<Invocation>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            reload: None,
            output: OutputStyle::default(),
            subreaper: true,
            guard: true,
            name: "ustad".to_owned(),
            control: None,
            config_file: None,
            metrics: None,
            link: None,
            invocation: None,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("reload", &self.reload.is_some())
            .field("output", &self.output)
            .field("subreaper", &self.subreaper)
            .field("guard", &self.guard)
            .field("name", &self.name)
            .field("control", &self.control)
            .field("config_file", &self.config_file)
            .field("metrics", &self.metrics)
            .field("link", &self.link.is_some())
            .field("invocation", &self.invocation)
            .finish()
    }
}

/// Why the supervisor could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// The configuration is invalid.
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
    /// A socket could not be bound; nothing was started.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Setting up the primary failed.
    #[error("cannot {what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// What an upgrade handed over cannot be taken.
    #[error("cannot take over from the previous program: {0}")]
    Resume(String),
    /// The supervisor was called from a multi-threaded runtime.
    #[error(
        "the supervisor must run on a tokio current_thread runtime (workers die with the thread that forked them)"
    )]
    NotCurrentThread,
}

/// What the loop waits on besides the supervisor's own notify socket, and the servers it stops
/// when the cluster has stopped.
pub(super) struct Inputs {
    pub(super) signals: Signals,
    /// Workers' and `before_start` commands' exits, from the task that waits for each.
    pub(super) exited: mpsc::UnboundedReceiver<Ended>,
    /// Requests of control clients.
    pub(super) calls: mpsc::Receiver<Call>,
    /// Requests of the embedding program (Rust library).
    pub(super) link_calls: Option<mpsc::Receiver<Call>>,
    /// Lifecycle frames from library workers' channels.
    pub(super) lifecycle_frames: mpsc::UnboundedReceiver<(WorkerId, Result<Kind, String>)>,
    /// Status requests of the metrics server.
    pub(super) status_requests: mpsc::Receiver<oneshot::Sender<ClusterStatus>>,
    /// Checks of new binaries for upgrades.
    pub(super) upgrade_checked: mpsc::UnboundedReceiver<Checked>,
    /// Changes of watched pools' files.
    pub(super) files_changed: mpsc::UnboundedReceiver<super::watching::Changed>,
    /// The tasks serving control clients and `/metrics`.
    pub(super) servers: Vec<JoinHandle<()>>,
}

/// What a fresh start binds, or an upgrade takes over from the previous program.
struct Bound {
    listeners: Listeners,
    control: Option<ControlServer>,
    metrics: Option<tokio::net::TcpListener>,
    /// `None`: bound by [`assemble`].
    notify: Option<NotifySocket>,
    /// `None`: started by [`assemble`] (when `options.guard`).
    guard: Option<Guard>,
    /// ustad's own service manager.
    service: ServiceNotifier,
    /// What of `listeners` the service manager keeps.
    fd_store: FdStore,
}

/// Sets everything up, in order; no worker is started yet (the loop starts them).
pub(super) fn start(
    config: Config,
    options: Options,
) -> Result<(Supervisor, Inputs), SupervisorError> {
    config.validate().map_err(SupervisorError::Invalid)?;
    config
        .check_privileges()
        .map_err(SupervisorError::Invalid)?;
    on_current_thread()?;
    let service = ServiceNotifier::from_env();
    let fd_store = FdStore::from_env();
    let mut activation = Activation::from_env().map_err(BindError::from)?;
    let stored = activation.take_stored(&config);
    // Before binding: a socket the store still holds would be in the way.
    fd_store.drop_names(&service, stored.dropped());
    let listeners = Listeners::bind_taking(&config, activation, stored)?;
    for (socket, address) in listeners.addresses() {
        info!(event = "listening", socket = %socket, address = %address, "socket {socket} listening on {address}");
    }
    let control = match &options.control {
        Some(path) => {
            Some(ControlServer::bind(path).map_err(setup("listen on the control socket"))?)
        }
        None => None,
    };
    let metrics = options.metrics.map(bind_metrics).transpose()?;
    let plan = Plan::new(&config, seed());
    let bound = Bound {
        listeners,
        control,
        metrics,
        notify: None,
        guard: None,
        service,
        fd_store,
    };
    assemble(config, options, bound, plan, Instant::now())
}

/// Sets up the primary from what its previous program handed over in an upgrade: the same
/// sockets, guard and plan; the workers are adopted by the caller.
pub(super) fn resume(
    handover: &mut Handover,
    options: Options,
) -> Result<(Supervisor, Inputs, Clock), SupervisorError> {
    on_current_thread()?;
    let clock = Clock::now();
    let document = &handover.document;
    let plan = Plan::restore(document.plan.get(), clock)
        .map_err(|error| SupervisorError::Resume(error.to_string()))?;
    let fds = &mut handover.fds;
    let listeners = Listeners::take_over(document.listeners.clone(), fds)
        .map_err(setup("take over the sockets"))?;
    let control = document
        .control
        .clone()
        .map(|control| ControlServer::take_over(control, fds))
        .transpose()
        .map_err(setup("take over the control socket"))?;
    let metrics = document
        .metrics
        .map(|fd| {
            let listener = std::net::TcpListener::from(fds.get(fd, "the metrics socket")?);
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)
        })
        .transpose()
        .map_err(setup("take over the metrics socket"))?;
    let notify = NotifySocket::take_over(document.notify.clone(), fds)
        .map_err(setup("take over the notify socket"))?;
    let guard = document
        .guard
        .as_ref()
        .map(|guard| Guard::take_over(guard, fds))
        .transpose()
        .map_err(setup("take over the guard"))?;
    let started = clock
        .to_instant(document.started_ns)
        .unwrap_or_else(Instant::now);
    let bound = Bound {
        listeners,
        control,
        metrics,
        notify: Some(notify),
        guard,
        service: ServiceNotifier::from_env(),
        // The store holds what the previous program sent: sending it again changes nothing.
        fd_store: FdStore::from_env(),
    };
    let (supervisor, inputs) = assemble(document.config.clone(), options, bound, plan, started)?;
    Ok((supervisor, inputs, clock))
}

fn on_current_thread() -> Result<(), SupervisorError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::CurrentThread
    {
        return Err(SupervisorError::NotCurrentThread);
    }
    Ok(())
}

fn setup(what: &'static str) -> impl Fn(io::Error) -> SupervisorError {
    move |source| SupervisorError::Setup { what, source }
}

/// The rest of the set-up, the same for a fresh start and an upgrade, in order.
fn assemble(
    config: Config,
    options: Options,
    bound: Bound,
    plan: Plan,
    started: Instant,
) -> Result<(Supervisor, Inputs), SupervisorError> {
    let Bound {
        listeners,
        control,
        metrics,
        notify,
        guard,
        service,
        mut fd_store,
    } = bound;
    fd_store.sync(&service, &listeners);
    let control = control.map(Arc::new);
    if let Some(control) = &control {
        info!(event = "control", path = %control.path().display(), "control socket {}", control.path().display());
    }
    let metrics_socket = metrics
        .as_ref()
        .map(|listener| listener.as_fd().try_clone_to_owned())
        .transpose()
        .map_err(setup("serve metrics"))?;
    if options.subreaper {
        enable_subreaper().map_err(setup("become a child subreaper"))?;
    }
    let signals = Signals::new().map_err(setup("install signal handlers"))?;
    // After an upgrade (or a fallback from one), the signals the previous program blocked
    // before its exec are still blocked: with the handlers in place, what came meanwhile is
    // delivered now.
    crate::sys::mask_signals(&HELD_SIGNALS, false).map_err(setup("unblock signals"))?;
    let notify = match notify {
        Some(notify) => notify,
        None => {
            let notify = NotifySocket::bind().map_err(setup("bind the notify socket"))?;
            if config.runs_other_users() {
                notify
                    .open_to_other_users()
                    .map_err(setup("open the notify socket to the pools' users"))?;
            }
            notify
        }
    };
    let mut guard_cleanup = notify.paths().to_vec();
    if let Some(control) = &control {
        guard_cleanup.insert(0, control.path().to_owned());
    }
    let guard = match (options.guard, guard) {
        (_, Some(guard)) => Some(guard),
        (true, None) => {
            Some(Guard::start(&guard_cleanup).map_err(setup("start the guard process"))?)
        }
        (false, None) => None,
    };
    let (exits, exited) = mpsc::unbounded_channel();
    let (upgrade_checks, upgrade_checked) = mpsc::unbounded_channel();
    let (watch_changes, files_changed) = mpsc::unbounded_channel();
    let (calls_tx, calls) = mpsc::channel::<Call>(64);
    let serving = control
        .clone()
        .map(|control| tokio::spawn(async move { control.serve(calls_tx).await }));
    let (status_tx, status_requests) = mpsc::channel::<oneshot::Sender<ClusterStatus>>(16);
    let metrics_server = metrics.map(|listener| {
        tokio::spawn(async move {
            if let Err(error) = crate::metrics::serve(listener, status_tx).await {
                error!("the metrics server stopped: {error}");
            }
        })
    });
    let logbook = LogBook::default();
    let (program, channel_runtime, link_calls) = match options.link {
        Some(Link {
            program,
            runtime,
            calls,
        }) => (Some(program), runtime, Some(calls)),
        None => (None, None, None),
    };
    let (lifecycle, lifecycle_frames): (Lifecycle, _) = mpsc::unbounded_channel();
    let round_robin =
        RoundRobinAcceptor::start(&listeners).map_err(setup("accept on round-robin sockets"))?;
    let mut supervisor = Supervisor {
        program,
        channel_runtime,
        lifecycle,
        channels: HashMap::new(),
        round_robin,
        plan,
        config,
        listeners,
        notify,
        output: OutputRelay::start(options.output, logbook.clone()),
        logbook,
        reload: options.reload,
        service,
        fd_store,
        watching: Default::default(),
        watch_changes,
        name: options.name,
        config_file: options.config_file,
        started,
        usage: Usage::default(),
        subscribers: Vec::new(),
        stop_waiters: Vec::new(),
        reload_waiters: Vec::new(),
        subreaper: options.subreaper,
        aborted: Vec::new(),
        retired_sockets: Vec::new(),
        exits,
        hooks: Default::default(),
        lingering: Vec::new(),
        guard,
        guard_cleanup,
        finished: false,
        rejections: RateLimit::default(),
        listen_watch: Default::default(),
        invocation: options.invocation,
        upgrading: None,
        upgrade_checks,
        upgraded: None,
        control,
        metrics_socket,
    };
    let inputs = Inputs {
        signals,
        exited,
        calls,
        link_calls,
        lifecycle_frames,
        status_requests,
        upgrade_checked,
        files_changed,
        servers: [serving, metrics_server].into_iter().flatten().collect(),
    };
    supervisor.sync_watches();
    Ok((supervisor, inputs))
}

/// Listens for `/metrics` and `/healthz`.
fn bind_metrics(address: SocketAddr) -> Result<tokio::net::TcpListener, SupervisorError> {
    let listener = std::net::TcpListener::bind(address)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)
        })
        .map_err(|error| SupervisorError::Setup {
            what: "serve metrics",
            source: io::Error::new(error.kind(), format!("cannot listen on {address}: {error}")),
        })?;
    let address = listener.local_addr().map_or(address, |a| a);
    info!(event = "metrics", address = %address, "metrics on http://{address}/metrics and /healthz");
    Ok(listener)
}

/// The seed of the plan's `ttl` jitter: differs from one primary to the next.
fn seed() -> u64 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64);
    u64::from(std::process::id()) ^ clock ^ 0x9e37_79b9_7f4a_7c15
}

/// The signals the loop answers (see [`run`](super::run)).
pub(super) struct Signals {
    pub(super) interrupt: SignalStream,
    pub(super) terminate: SignalStream,
    pub(super) hangup: SignalStream,
    pub(super) user1: SignalStream,
    pub(super) user2: SignalStream,
    pub(super) tty_in: SignalStream,
    pub(super) tty_out: SignalStream,
    pub(super) child: SignalStream,
    /// SIGURG: upgrade to the program at the path the primary was started from.
    pub(super) upgrade: SignalStream,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            user1: signal(SignalKind::user_defined1())?,
            user2: signal(SignalKind::user_defined2())?,
            tty_in: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            tty_out: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            child: signal(SignalKind::child())?,
            upgrade: signal(SignalKind::from_raw(libc::SIGURG))?,
        })
    }
}
