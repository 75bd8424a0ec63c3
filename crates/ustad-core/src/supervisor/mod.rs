//! The process layer around the [`Plan`]: binds sockets, spawns and signals workers, reads the
//! notify socket and signals, and feeds everything that happens back to the plan.
//!
//! It runs on a tokio `current_thread` runtime, on the thread that called it, for the life of
//! the primary: `PR_SET_PDEATHSIG` ties each worker to the thread that forked it.

mod control;
mod guard;
mod launch;
mod link;
mod log;
mod notify;
mod process_groups;
mod reload;
mod round_robin;
mod usage;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::config::{Config, ConfigError, Problem, Signal};
use crate::control::server::{Call, ControlServer};
use crate::logbook::LogBook;
use crate::notify::NotifySocket;
use crate::output::{OutputRelay, OutputStyle};
use crate::plan::{Action, Event, ExitStatus, Notice, Phase, Plan, RolloutTrigger, WorkerId};
use crate::sockets::{BindError, Listeners};
use crate::status::ClusterStatus;

use self::guard::Guard;
pub use self::link::{FrameSink, Link, LinkEvent, Program, WorkerInfo};
use self::process_groups::{Lingering, enable_subreaper, signal_group, worker_kill_timeout};

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
    /// The supervisor was called from a multi-threaded runtime.
    #[error(
        "the supervisor must run on a tokio current_thread runtime (workers die with the thread that forked them)"
    )]
    NotCurrentThread,
}

/// Runs the cluster until it is told to stop (SIGINT/SIGTERM) and every worker has exited.
///
/// Binds every socket first: if one cannot be bound, returns [`SupervisorError::Bind`]
/// without starting anything. Signals: SIGINT/SIGTERM stop gracefully (a second one kills at
/// once), SIGHUP reloads and rolls every pool, SIGUSR2 rolls every pool with the running
/// configuration, SIGTTIN/SIGTTOU add/remove a worker of the first pool.
pub async fn run(config: Config, options: Options) -> Result<(), SupervisorError> {
    config.validate().map_err(SupervisorError::Invalid)?;
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::CurrentThread
    {
        return Err(SupervisorError::NotCurrentThread);
    }
    let setup = |what| move |source| SupervisorError::Setup { what, source };
    let listeners = Listeners::bind(&config)?;
    for (socket, address) in listeners.addresses() {
        info!(event = "listening", socket = %socket, address = %address, "socket {socket} listening on {address}");
    }
    let control = match &options.control {
        Some(path) => Some(Arc::new(
            ControlServer::bind(path).map_err(setup("listen on the control socket"))?,
        )),
        None => None,
    };
    if let Some(control) = &control {
        info!(event = "control", path = %control.path().display(), "control socket {}", control.path().display());
    }
    let metrics = match options.metrics {
        Some(address) => {
            let listener = std::net::TcpListener::bind(address)
                .and_then(|listener| {
                    listener.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(listener)
                })
                .map_err(|error| SupervisorError::Setup {
                    what: "serve metrics",
                    source: io::Error::new(
                        error.kind(),
                        format!("cannot listen on {address}: {error}"),
                    ),
                })?;
            let address = listener.local_addr().map_or(address, |a| a);
            info!(event = "metrics", address = %address, "metrics on http://{address}/metrics and /healthz");
            Some(listener)
        }
        None => None,
    };
    if options.subreaper {
        enable_subreaper().map_err(setup("become a child subreaper"))?;
    }
    let mut signals = Signals::new().map_err(setup("install signal handlers"))?;
    let notify = NotifySocket::bind().map_err(setup("bind the notify socket"))?;
    let mut guard_cleanup = notify.paths().to_vec();
    if let Some(control) = &control {
        guard_cleanup.insert(0, control.path().to_owned());
    }
    let guard = match options.guard {
        true => Some(Guard::start(&guard_cleanup).map_err(setup("start the guard process"))?),
        false => None,
    };
    let (exits, mut exited) = mpsc::unbounded_channel();
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64);
    let seed = u64::from(std::process::id()) ^ clock ^ 0x9e37_79b9_7f4a_7c15;
    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let serving = control
        .clone()
        .map(|control| tokio::spawn(async move { control.serve(calls_tx).await }));
    let (status_tx, mut status_requests) = mpsc::channel::<oneshot::Sender<ClusterStatus>>(16);
    let metrics_server = metrics.map(|listener| {
        tokio::spawn(async move {
            if let Err(error) = crate::metrics::serve(listener, status_tx).await {
                error!("the metrics server stopped: {error}");
            }
        })
    });
    let logbook = LogBook::default();
    let (program, channel_runtime, mut link_calls) = match options.link {
        Some(link) => (Some(link.program), link.runtime, Some(link.calls)),
        None => (None, None, None),
    };
    let (lifecycle, mut lifecycle_frames) = mpsc::unbounded_channel();
    let round_robin = round_robin::RoundRobinAcceptor::start(&listeners)
        .map_err(setup("accept on round-robin sockets"))?;
    let mut supervisor = Supervisor {
        program,
        channel_runtime,
        lifecycle,
        channels: std::collections::HashMap::new(),
        round_robin,
        plan: Plan::new(&config, seed),
        config,
        listeners,
        notify,
        output: OutputRelay::start(options.output, logbook.clone()),
        logbook,
        reload: options.reload,
        service: crate::service::ServiceNotifier::from_env(),
        name: options.name,
        config_file: options.config_file,
        started: Instant::now(),
        usage: usage::Usage::default(),
        subscribers: Vec::new(),
        stop_waiters: Vec::new(),
        reload_waiters: Vec::new(),
        subreaper: options.subreaper,
        aborted: Vec::new(),
        retired_sockets: Vec::new(),
        exits,
        lingering: Vec::new(),
        guard,
        guard_cleanup,
        finished: false,
        rejections: notify::RateLimit::default(),
    };
    if let Some(program) = &supervisor.program {
        program.event(LinkEvent::Started);
    }
    let outcome = supervisor.plan.start(Instant::now());
    supervisor.perform(outcome);
    let mut memory_check = tokio::time::interval(usage::MEMORY_INTERVAL);
    memory_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while !(supervisor.finished && supervisor.lingering.is_empty()) {
        let deadline = [
            supervisor.plan.next_deadline(),
            supervisor.lingering_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((id, status)) = exited.recv() => supervisor.on_exit(id, status),
            _ = signals.interrupt.recv() => supervisor.on_stop_signal("SIGINT"),
            _ = signals.terminate.recv() => supervisor.on_stop_signal("SIGTERM"),
            _ = signals.hangup.recv() => supervisor.on_hangup(),
            _ = signals.user2.recv() => {
                info!(event = "signal", signal = "SIGUSR2", "SIGUSR2: rolling restart of every pool");
                supervisor.handle(Event::Rollout { pool: None, trigger: RolloutTrigger::Restart, spec: None });
            }
            _ = signals.tty_in.recv() => supervisor.scale_first_pool(1),
            _ = signals.tty_out.recv() => supervisor.scale_first_pool(-1),
            _ = signals.child.recv() => supervisor.on_child_signal(),
            datagram = supervisor.notify.recv() => supervisor.on_datagram(datagram),
            Some(call) = calls.recv() => supervisor.on_call(call),
            Some(call) = async {
                match &mut link_calls {
                    Some(calls) => calls.recv().await,
                    None => std::future::pending().await,
                }
            } => supervisor.on_call(call),
            Some((id, frame)) = lifecycle_frames.recv() => supervisor.on_lifecycle_frame(id, frame),
            Some(reply) = status_requests.recv() => {
                let _ = reply.send(supervisor.status());
            }
            _ = memory_check.tick(), if supervisor.watches_memory() => supervisor.check_memory(),
            () = sleep => supervisor.on_deadline(),
        }
    }
    for task in [serving, metrics_server].into_iter().flatten() {
        task.abort();
    }
    drop(control);
    if supervisor.subreaper {
        supervisor.kill_adopted_orphans().await;
    }
    if let Some(program) = &supervisor.program {
        program.event(LinkEvent::Stopped);
    }
    supervisor.output.finish(Duration::from_secs(1)).await;
    // Dropping the guard closes its pipe: it exits, and is reaped.
    drop(supervisor.guard.take());
    Ok(())
}

struct Signals {
    interrupt: SignalStream,
    terminate: SignalStream,
    hangup: SignalStream,
    user2: SignalStream,
    tty_in: SignalStream,
    tty_out: SignalStream,
    child: SignalStream,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            user2: signal(SignalKind::user_defined2())?,
            tty_in: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            tty_out: signal(SignalKind::from_raw(libc::SIGTTOU))?,
            child: signal(SignalKind::child())?,
        })
    }
}

struct Supervisor {
    /// The embedding program (Rust library).
    program: Option<Arc<dyn Program>>,
    /// Where library workers' channels run; `None`: here.
    channel_runtime: Option<tokio::runtime::Handle>,
    /// Lifecycle frames from library workers' channels.
    lifecycle: link::Lifecycle,
    /// The outboxes of each library worker's channel.
    channels: std::collections::HashMap<WorkerId, link::Outboxes>,
    /// The acceptors of `round-robin` sockets.
    round_robin: round_robin::RoundRobinAcceptor,
    plan: Plan,
    config: Config,
    listeners: Listeners,
    notify: NotifySocket,
    output: OutputRelay,
    exits: mpsc::UnboundedSender<(WorkerId, ExitStatus)>,
    lingering: Vec<Lingering>,
    logbook: LogBook,
    /// Re-reads the configuration file, when there is one.
    reload: Option<Reload>,
    /// ustad's own `NOTIFY_SOCKET`, when a service manager gave it one.
    service: crate::service::ServiceNotifier,
    name: String,
    config_file: Option<PathBuf>,
    started: Instant,
    usage: usage::Usage,
    /// Clients of `ustad top` / the `events` request.
    subscribers: Vec<mpsc::Sender<crate::control::protocol::Reply>>,
    /// Clients of `ustad stop`, answered when the primary exits (by closing).
    stop_waiters: Vec<mpsc::Sender<crate::control::protocol::Reply>>,
    /// Clients of `ustad reload --wait`.
    reload_waiters: Vec<control::ReloadWaiter>,
    /// A child subreaper: adopted processes are reaped, and stopped at exit.
    subreaper: bool,
    /// Rollouts aborted since the last reload request: pool and why.
    aborted: Vec<(String, String)>,
    /// Sockets a reload removed, closed once no worker uses them.
    retired_sockets: Vec<(String, crate::config::SocketSpec)>,
    guard: Option<Guard>,
    /// What a guard removes when the primary dies (see `Guard::start`).
    guard_cleanup: Vec<PathBuf>,
    finished: bool,
    rejections: notify::RateLimit,
}

impl Supervisor {
    fn handle(&mut self, event: Event) {
        let outcome = self.plan.handle(event, Instant::now());
        self.perform(outcome);
    }

    /// Logs the notices and performs the actions of an outcome, and of the outcomes those
    /// actions lead to.
    fn perform(&mut self, outcome: crate::plan::Outcome) {
        let mut queue = VecDeque::from([outcome]);
        while let Some(outcome) = queue.pop_front() {
            for notice in &outcome.notices {
                log::notice(notice);
                self.publish(notice);
                self.publish_link(notice);
                let (channels, plan, config) = (&self.channels, &self.plan, &self.config);
                self.round_robin.follow(notice, |id| {
                    let outboxes = channels.get(&id)?;
                    let sockets: Vec<String> =
                        plan.worker(id)?
                            .spec()
                            .sockets
                            .iter()
                            .filter(|name| {
                                config.sockets.get(*name).is_some_and(|s| {
                                    s.mode == crate::config::SocketMode::RoundRobin
                                })
                            })
                            .cloned()
                            .collect();
                    Some((sockets, outboxes.conns.clone()))
                });
                if let Notice::Scaled { pool, from, to } = notice {
                    if to < from {
                        self.listeners.release_slots(pool, *to);
                    }
                }
            }
            for action in outcome.actions {
                match action {
                    Action::Spawn {
                        id,
                        pool,
                        slot,
                        generation,
                        spec,
                    } => {
                        let event = self.launch(id, &pool, slot, generation, &spec);
                        queue.push_back(self.plan.handle(event, Instant::now()));
                    }
                    Action::Signal { id, pid, signal } => {
                        // The signal first: a worker that exits on the `stop` frame could
                        // otherwise be killed by the signal as it exits (Python restores the
                        // default handlers as it shuts down), and seem to have died of it.
                        signal_group(pid, signal);
                        if let Some(outboxes) = self.channels.get(&id) {
                            // The time until SIGKILL, as the plan set it (a shutdown with a
                            // timeout shortens it).
                            let deadline = match self.plan.worker(id).map(|w| w.phase) {
                                Some(Phase::Stopping {
                                    kill_at: Some(at), ..
                                }) => at.saturating_duration_since(Instant::now()),
                                _ => worker_kill_timeout(&self.plan, id),
                            };
                            let deadline_ms =
                                u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
                            let _ = outboxes.frames.push_now(&crate::ipc::encode_simple(
                                &crate::ipc::Kind::Stop { deadline_ms },
                            ));
                        }
                    }
                    Action::Kill { pid, .. } => signal_group(pid, Signal::KILL),
                    Action::Exit => self.finished = true,
                }
            }
        }
        if self.service.is_enabled() {
            self.service.update(&self.plan.status(Instant::now()));
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: ExitStatus) {
        self.channels.remove(&id);
        self.linger(id);
        self.handle(Event::Exited { id, status });
        self.settle_lingering(None);
        self.close_retired_sockets();
    }

    fn on_stop_signal(&mut self, name: &str) {
        let immediate = self.plan.is_shutting_down();
        info!(
            event = "signal",
            signal = name,
            "{name}: {}",
            if immediate {
                "stopping now"
            } else {
                "stopping gracefully"
            }
        );
        if immediate {
            self.kill_lingering_now();
        }
        self.service.stopping();
        self.handle(Event::Shutdown {
            immediate,
            timeout: None,
        });
    }

    fn on_hangup(&mut self) {
        info!(
            event = "signal",
            signal = "SIGHUP",
            "SIGHUP: {}",
            if self.reload.is_some() {
                "re-reading the configuration and rolling every pool"
            } else {
                "rolling restart of every pool (no config file to re-read)"
            }
        );
        let reloaded = self.reload(&[], false);
        self.service.reloading();
        self.service.update(&self.plan.status(Instant::now()));
        if let Err(error) = reloaded {
            error!(event = "reload_failed", "{error}");
        }
    }

    fn scale_first_pool(&mut self, delta: isize) {
        let Some((pool, size)) = self.plan.pools().next().map(|(p, s)| (p.to_owned(), s)) else {
            return;
        };
        let signal = if delta > 0 { "SIGTTIN" } else { "SIGTTOU" };
        info!(
            event = "signal",
            signal,
            "{signal}: {} a worker of pool {pool}",
            if delta > 0 { "adding" } else { "removing" }
        );
        let size = size.saturating_add_signed(delta);
        self.handle(Event::Scale { pool, size });
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        let outcome = self.plan.tick(now);
        self.perform(outcome);
        self.settle_lingering(Some(now));
    }

    fn on_child_signal(&mut self) {
        self.replace_lost_guard();
        // Children that are not workers are ours to reap only as a subreaper: in a program
        // that embeds the supervisor (the Rust library), they belong to the program.
        if self.subreaper {
            self.reap_adopted();
        }
        self.settle_lingering(None);
    }
}
