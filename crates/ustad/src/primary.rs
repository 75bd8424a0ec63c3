//! The primary: pools described in code, validated like a config file, supervised by the same
//! engine as the `ustad` command.

use std::time::Duration;

use ustad_core::config::{
    Budget, ByteSize, Command, Config, IpcProtocol, IpcSpec, ListenAddr, PoolSpec, Readiness,
    Signal, Size, SocketMode, SocketSpec,
};
use ustad_core::supervisor::{self, Options};

use crate::cluster::Cluster;
use crate::error::Error;

/// One pool of workers, as [`Primary::pool`] takes it. Every setting of a config file's
/// `[pools.NAME]` has a method here.
#[derive(Debug, Clone)]
pub struct Pool {
    size: Size,
    sockets: Vec<(Option<String>, SocketSpec)>,
    command: Option<Vec<String>>,
    settings: Vec<Setting>,
    errors: Vec<String>,
    max_in_flight: usize,
    /// The `listen(2)` backlog of the pool's sockets, when set.
    backlog: Option<u32>,
}

/// A setting recorded by a builder method, applied to the pool's spec at the end.
#[derive(Debug, Clone)]
enum Setting {
    ReadyTimeout(Duration),
    KillTimeout(Duration),
    RestartDelay(Duration),
    MinUptime(Duration),
    Ttl(Duration),
    Strict(bool),
    StopSignal(Signal),
    Env(String, String),
    Silent(bool),
    MaxMemory(ByteSize),
    Watchdog(Duration),
    MaxMessage(usize),
    Cwd(std::path::PathBuf),
    NodeIpc,
    Ready(Readiness),
    MaxSurge(Budget),
    MaxUnavailable(Budget),
    User(String),
    Group(String),
    After(Vec<String>),
    Oneshot,
    LogRateLimit(ustad_core::config::LogRateLimit),
    BeforeStart(ustad_core::config::Command),
    BeforeStartTimeout(Duration),
}

impl Pool {
    /// A pool of `size` workers (0: defined, started later with `Cluster::scale`).
    pub fn new(size: usize) -> Pool {
        let (size, errors) = (Size::Fixed(size), Vec::new());
        Pool {
            size,
            sockets: Vec::new(),
            command: None,
            settings: Vec::new(),
            errors,
            max_in_flight: 64,
            backlog: None,
        }
    }

    /// A pool with one worker per available core.
    pub fn auto() -> Pool {
        let mut pool = Pool::new(1);
        pool.size = Size::Auto;
        pool
    }

    /// Listens on `address` (`"127.0.0.1:8000"`, `"[::]:8000"`, `"unix:/run/app.sock"`), as a
    /// socket named after the pool, shared by its workers.
    pub fn listen(self, address: &str) -> Pool {
        self.listen_socket(None, address, SocketMode::Shared)
    }

    /// Listens on `address` as a socket called `name` (what `Worker::tcp_listener` takes).
    pub fn listen_as(self, name: &str, address: &str) -> Pool {
        self.listen_socket(Some(name.to_owned()), address, SocketMode::Shared)
    }

    /// Like [`Pool::listen`], but the primary accepts the connections and hands each to a
    /// ready worker over its channel, evenly (Node's `SCHED_RR`); workers take them with
    /// `Worker::accept`. Costs the primary an accept and a `sendmsg` per connection, and
    /// spreads long-lived connections evenly where a shared socket may not.
    pub fn listen_round_robin(self, address: &str) -> Pool {
        self.listen_socket(None, address, SocketMode::RoundRobin)
    }

    /// Like [`Pool::listen`], with one `SO_REUSEPORT` socket per worker.
    pub fn listen_reuseport(self, address: &str) -> Pool {
        self.listen_socket(None, address, SocketMode::ReusePort)
    }

    fn listen_socket(mut self, name: Option<String>, address: &str, mode: SocketMode) -> Pool {
        match address.parse::<ListenAddr>() {
            Ok(listen) => {
                let mut spec = SocketSpec::new(listen);
                spec.mode = mode;
                self.sockets.push((name, spec));
            }
            Err(error) => self.errors.push(error),
        }
        self
    }

    /// Runs this program as the pool's workers instead of re-executing this binary: a worker
    /// in another language that speaks the protocol of `docs/protocol.md` (`USTAD_IPC_FD`).
    pub fn command<S: Into<String>>(mut self, words: impl IntoIterator<Item = S>) -> Pool {
        self.command = Some(words.into_iter().map(Into::into).collect());
        self
    }

    /// Runs the pool's [`command`](Pool::command) as unmodified Node apps over Node's own IPC
    /// channel (`process.send`, `process.on('message')`), as `child_process.fork` opens it:
    /// their `process.send(value)` arrives as [`crate::Event::Message`], and
    /// [`Cluster::send`](crate::Cluster::send) and `broadcast` reach their
    /// `process.on('message')` (requests do not: Node has no replies). A worker is ready when
    /// it calls `process.send('ready')` (PM2's `wait_ready`), and is sent `'shutdown'` a
    /// `stop_grace` (2 s) before its stop signal. See `docs/protocol.md`.
    pub fn node(self) -> Pool {
        self.with(Setting::NodeIpc)
    }

    /// When a new worker counts as ready [default: when it says so: `ready()`, or a Node
    /// worker's `process.send('ready')`]. `Readiness::Listening` for workers that know nothing
    /// of ustad: ready once seen waiting for connections on the pool's socket.
    pub fn ready(self, readiness: Readiness) -> Pool {
        self.with(Setting::Ready(readiness))
    }

    /// Starts this pool only once these pools are ready (every slot serving) or, for a
    /// [`oneshot`](Pool::oneshot) pool, done; it is stopped before them, and rolls after them.
    pub fn after<S: Into<String>>(self, pools: impl IntoIterator<Item = S>) -> Pool {
        self.with(Setting::After(pools.into_iter().map(Into::into).collect()))
    }

    /// Its workers run to completion (a migration): done once every one exited 0, and never
    /// restarted after that; one that fails is tried again, backing off.
    pub fn oneshot(self) -> Pool {
        self.with(Setting::Oneshot)
    }

    /// Relays at most `lines` lines of each worker's output per `per` [default: every line];
    /// the others are dropped, and counted in one line when the next one passes.
    pub fn log_rate_limit(self, lines: u32, per: Duration) -> Pool {
        self.with(Setting::LogRateLimit(ustad_core::config::LogRateLimit {
            lines,
            per,
        }))
    }

    /// Runs this command before each generation of the pool starts (the first start, every
    /// rolling restart), e.g. a build: the workers start once it exits 0; a rolling restart
    /// whose command fails stops, and the old workers serve on. It runs in the pool's `cwd`
    /// with its environment, `USTAD_POOL` and `USTAD_GENERATION`.
    pub fn before_start<S: Into<String>>(mut self, words: impl IntoIterator<Item = S>) -> Pool {
        match ustad_core::config::Command::new(words.into_iter().map(Into::into)) {
            Ok(command) => self.with(Setting::BeforeStart(command)),
            Err(error) => {
                self.errors.push(format!("before_start: {error}"));
                self
            }
        }
    }

    /// How long the [`before_start`](Pool::before_start) command may run before its process
    /// group is killed and it has failed [default: 5 min].
    pub fn before_start_timeout(self, timeout: Duration) -> Pool {
        self.with(Setting::BeforeStartTimeout(timeout))
    }

    /// Runs the pool's workers as this user (a name or a uid), with its groups (Node's `uid`);
    /// the primary must run as root.
    pub fn user(self, user: &str) -> Pool {
        self.with(Setting::User(user.to_owned()))
    }

    /// Runs the pool's workers with this group (a name or a gid) instead of the user's (Node's
    /// `gid`).
    pub fn group(self, group: &str) -> Pool {
        self.with(Setting::Group(group.to_owned()))
    }

    /// Replacements a rolling restart starts at once, beside the workers they replace
    /// [default: 1]: `Budget::Count(4)` or `Budget::Percent(25)`.
    pub fn max_surge(self, budget: Budget) -> Pool {
        self.with(Setting::MaxSurge(budget))
    }

    /// Slots a rolling restart may leave without a serving worker at once [default: 0].
    pub fn max_unavailable(self, budget: Budget) -> Pool {
        self.with(Setting::MaxUnavailable(budget))
    }

    /// How long a new worker may take to call `ready()` [default: 30 s].
    pub fn ready_timeout(self, timeout: Duration) -> Pool {
        self.with(Setting::ReadyTimeout(timeout))
    }

    /// How long a worker may take to stop before its process group is killed [default: 30 s].
    pub fn kill_timeout(self, timeout: Duration) -> Pool {
        self.with(Setting::KillTimeout(timeout))
    }

    /// The pause before a worker that exited on its own is replaced [default: 1 s].
    pub fn restart_delay(self, delay: Duration) -> Pool {
        self.with(Setting::RestartDelay(delay))
    }

    /// A worker that exits sooner than this is a failed start [default: 5 s].
    pub fn min_uptime(self, uptime: Duration) -> Pool {
        self.with(Setting::MinUptime(uptime))
    }

    /// Replace each worker after this long (±10%), rolling.
    pub fn ttl(self, ttl: Duration) -> Pool {
        self.with(Setting::Ttl(ttl))
    }

    /// Never run more than `size` workers, even while replacing one.
    pub fn strict(self) -> Pool {
        self.with(Setting::Strict(true))
    }

    /// The signal that asks a worker to stop [default: SIGTERM], e.g. `"SIGINT"`.
    pub fn stop_signal(mut self, signal: &str) -> Pool {
        match signal.parse() {
            Ok(signal) => self.with(Setting::StopSignal(signal)),
            Err(error) => {
                self.errors.push(error);
                self
            }
        }
    }

    /// The workers' working directory [default: the primary's].
    pub fn cwd(self, dir: impl Into<std::path::PathBuf>) -> Pool {
        self.with(Setting::Cwd(dir.into()))
    }

    /// The `listen(2)` backlog of the sockets this pool listens on [default: 1024; capped by
    /// `net.core.somaxconn`].
    pub fn backlog(mut self, backlog: u32) -> Pool {
        self.backlog = Some(backlog);
        self
    }

    /// An environment variable for the workers.
    pub fn env(self, key: &str, value: &str) -> Pool {
        self.with(Setting::Env(key.to_owned(), value.to_owned()))
    }

    /// Drop the workers' stdout and stderr.
    pub fn silent(self) -> Pool {
        self.with(Setting::Silent(true))
    }

    /// Replace a worker whose memory stays above this (`"512MiB"`), rolling.
    pub fn max_memory(mut self, limit: &str) -> Pool {
        match limit.parse() {
            Ok(limit) => self.with(Setting::MaxMemory(limit)),
            Err(error) => {
                self.errors.push(error);
                self
            }
        }
    }

    /// Workers must call `Worker::heartbeat` this often, else they are killed as hung.
    pub fn watchdog(self, period: Duration) -> Pool {
        self.with(Setting::Watchdog(period))
    }

    /// The largest message, in bytes of JSON, either side accepts [default: 1 MiB; 1 to
    /// 2^32 - 1]. A worker that sends a larger one is cut off and replaced.
    pub fn max_message(self, bytes: usize) -> Pool {
        self.with(Setting::MaxMessage(bytes))
    }

    /// Tasks [`Cluster::dispatch`] sends one worker of this pool before it waits for answers
    /// [default: 64].
    pub fn max_in_flight(mut self, tasks: usize) -> Pool {
        self.max_in_flight = tasks.max(1);
        self
    }

    fn with(mut self, setting: Setting) -> Pool {
        self.settings.push(setting);
        self
    }

    pub(crate) fn in_flight_limit(&self) -> usize {
        self.max_in_flight
    }
}

/// The primary, before it starts: pools are added with [`Primary::pool`].
#[derive(Debug, Default)]
pub struct Primary {
    pools: Vec<(String, Pool)>,
    name: Option<String>,
}

impl Primary {
    /// A primary with no pools yet.
    pub fn new() -> Primary {
        Primary::default()
    }

    /// Adds a pool; workers see `name` as `Worker::pool`. Pools start in the order added.
    pub fn pool(mut self, name: &str, pool: Pool) -> Primary {
        self.pools.push((name.to_owned(), pool));
        self
    }

    /// The instance's name, for `ustad status --name` [default: the program's file name].
    pub fn name(mut self, name: &str) -> Primary {
        self.name = Some(name.to_owned());
        self
    }

    /// The configuration the pools make, checked as a config file would be.
    ///
    /// # Errors
    /// [`Error::Invalid`] with every problem, each naming its pool or socket.
    pub fn config(&self) -> Result<Config, Error> {
        let mut problems = Vec::new();
        let exe = std::env::current_exe()?;
        let mut words = vec![exe.to_string_lossy().into_owned()];
        words.extend(std::env::args().skip(1));
        let command = Command::new(words).map_err(Error::Invalid)?;
        let mut config = Config::default();
        if self.pools.is_empty() {
            problems.push("no pools: add one with Primary::pool".to_owned());
        }
        for (name, pool) in &self.pools {
            problems.extend(pool.errors.iter().map(|e| format!("pool `{name}`: {e}")));
            let command = match &pool.command {
                Some(words) => match Command::new(words.clone()) {
                    Ok(command) => command,
                    Err(error) => {
                        problems.push(format!("pool `{name}`: {error}"));
                        continue;
                    }
                },
                None => command.clone(),
            };
            let mut spec = PoolSpec::new(command);
            spec.size = pool.size;
            spec.ready = Readiness::Notify;
            spec.ipc = Some(IpcSpec::default());
            for setting in &pool.settings {
                match setting.clone() {
                    Setting::ReadyTimeout(t) => spec.ready_timeout = t,
                    Setting::KillTimeout(t) => spec.kill_timeout = t,
                    Setting::RestartDelay(t) => spec.restart_delay = t,
                    Setting::MinUptime(t) => spec.min_uptime = t,
                    Setting::Ttl(t) => spec.ttl = Some(t),
                    Setting::Strict(strict) => spec.strict = strict,
                    Setting::StopSignal(signal) => spec.stop_signal = signal,
                    Setting::Env(key, value) => {
                        spec.env.insert(key, value);
                    }
                    Setting::Silent(silent) => spec.silent = silent,
                    Setting::MaxMemory(limit) => spec.max_memory = Some(limit),
                    Setting::Watchdog(period) => spec.watchdog = Some(period),
                    Setting::MaxMessage(bytes) => {
                        let ipc = spec.ipc.get_or_insert_with(IpcSpec::default);
                        ipc.max_message = bytes;
                    }
                    Setting::Cwd(dir) => spec.cwd = Some(dir),
                    Setting::NodeIpc => {
                        let ipc = spec.ipc.get_or_insert_with(IpcSpec::default);
                        ipc.protocol = IpcProtocol::Node;
                        if spec.ready == Readiness::Notify {
                            spec.ready = Readiness::Message;
                        }
                    }
                    Setting::Ready(readiness) => spec.ready = readiness,
                    Setting::MaxSurge(budget) => spec.max_surge = Some(budget),
                    Setting::User(user) => spec.user = Some(user),
                    Setting::After(pools) => spec.after = pools,
                    Setting::Oneshot => spec.oneshot = true,
                    Setting::LogRateLimit(limit) => spec.log_rate_limit = Some(limit),
                    Setting::BeforeStart(command) => spec.before_start = Some(command),
                    Setting::BeforeStartTimeout(t) => spec.before_start_timeout = t,
                    Setting::Group(group) => spec.group = Some(group),
                    Setting::MaxUnavailable(budget) => spec.max_unavailable = Some(budget),
                }
            }
            for (socket_name, socket) in &pool.sockets {
                let socket_name = socket_name.clone().unwrap_or_else(|| name.clone());
                let mut socket = socket.clone();
                if let Some(backlog) = pool.backlog {
                    socket.backlog = backlog;
                }
                // Pools may share a socket by naming it alike (`listen_as`), as a config
                // file's pools share a `[sockets.NAME]`: the same socket, not two.
                if config
                    .sockets
                    .get(&socket_name)
                    .is_some_and(|s| *s != socket)
                {
                    problems.push(format!(
                        "pool `{name}`: socket `{socket_name}` is declared again, differently \
                         (pools that share a socket must declare it alike)"
                    ));
                }
                config.sockets.insert(socket_name.clone(), socket);
                spec.sockets.push(socket_name);
            }
            config.pools.insert(name.clone(), spec);
        }
        if let Err(found) = config.validate() {
            problems.extend(found.iter().map(ToString::to_string));
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Invalid(problems.join("; ")))
        }
    }

    fn options(&self) -> Options {
        let mut options = Options::default();
        options.name = self.name.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "ustad".to_owned())
        });
        options.control = Some(ustad_core::control::paths::default_socket(&options.name));
        // The program's other children are its own business: no reaping, no sweeping.
        options.subreaper = false;
        options
    }

    /// Supervises the pools until SIGINT or SIGTERM, then stops every worker gracefully.
    /// Messages workers send are dropped: use [`Primary::start`] to talk to them.
    ///
    /// # Errors
    /// An invalid configuration, or a socket that cannot be bound (nothing started then).
    pub fn run(self) -> Result<(), Error> {
        let config = self.config()?;
        let options = self.options();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(supervisor::run(config, options))?;
        Ok(())
    }

    /// Starts the pools and returns a handle to talk to the workers. The supervisor runs on
    /// its own thread until [`Cluster::stop`], SIGINT or SIGTERM.
    ///
    /// Called within a current-thread tokio runtime, the workers' channels run on that
    /// runtime, so that a reply reaches the task waiting for it without a hop to another
    /// thread: the fast choice for a program that exchanges many messages (more than 1,000,000
    /// round trips/s with 1,000 in flight, on 2 cores; docs/benchmarks.md). Otherwise they
    /// run on the supervisor's thread.
    ///
    /// # Caveats
    /// On a current-thread runtime, the channels are read only while the runtime runs: a
    /// program that blocks its thread (a long computation, a blocking call) also holds up its
    /// workers' `ready` and `heartbeat` frames, and a pool with a `watchdog` may take them for
    /// hung. Keep blocking work in `spawn_blocking`, or use a multi-thread runtime. The
    /// channels also live only as long as that runtime: keep it running while the cluster runs.
    ///
    /// # Errors
    /// An invalid configuration, or a socket that cannot be bound (nothing started then).
    pub fn start(self) -> Result<Cluster, Error> {
        let config = self.config()?;
        let limits = self
            .pools
            .iter()
            .map(|(name, pool)| (name.clone(), pool.in_flight_limit()))
            .collect();
        Cluster::start(config, self.options(), limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_reaches_the_pools_spec() {
        let config = Primary::new()
            .pool(
                "web",
                Pool::new(3)
                    .listen_as("http", "127.0.0.1:0")
                    .backlog(64)
                    .cwd("/srv/app")
                    .ttl(Duration::from_secs(3600))
                    .kill_timeout(Duration::from_secs(5))
                    .stop_signal("SIGINT")
                    .max_memory("64MiB")
                    .max_message(4096)
                    .env("MODE", "web"),
            )
            .pool(
                "jobs",
                Pool::new(1).listen_as("http", "127.0.0.1:0").backlog(64),
            )
            .config()
            .unwrap();
        let web = &config.pools["web"];
        assert_eq!(web.size, Size::fixed(3).unwrap());
        assert_eq!(web.cwd.as_deref(), Some(std::path::Path::new("/srv/app")));
        assert_eq!(web.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(web.kill_timeout, Duration::from_secs(5));
        assert_eq!(web.stop_signal, "SIGINT".parse().unwrap());
        assert_eq!(web.max_memory, Some("64MiB".parse().unwrap()));
        assert_eq!(web.ipc.map(|ipc| ipc.max_message), Some(4096));
        assert_eq!(web.env["MODE"], "web");
        assert_eq!(config.sockets["http"].backlog, 64);
        // Both pools name the same socket: one socket, shared, as in a config file.
        assert_eq!(config.sockets.len(), 1);
        assert_eq!(config.pools["jobs"].sockets, ["http"]);
    }

    #[test]
    fn mistakes_are_refused_together_each_naming_its_pool() {
        let error = Primary::new()
            .pool("web", Pool::new(1).listen("nowhere"))
            .pool(
                "jobs",
                Pool::new(1).stop_signal("SIGNOPE").max_memory("lots"),
            )
            .pool(
                "api",
                Pool::new(1).listen_as("web", "127.0.0.1:1").backlog(0),
            )
            .config()
            .unwrap_err()
            .to_string();
        for expected in [
            "pool `web`:",
            "pool `jobs`:",
            "SIGNOPE",
            "lots",
            "backlog must be at least 1",
        ] {
            assert!(error.contains(expected), "{expected:?} in {error}");
        }
        let conflict = Primary::new()
            .pool("a", Pool::new(1).listen_as("http", "127.0.0.1:1"))
            .pool("b", Pool::new(1).listen_as("http", "127.0.0.1:2"))
            .config()
            .unwrap_err()
            .to_string();
        assert!(
            conflict.contains("pool `b`: socket `http` is declared again, differently"),
            "{conflict}"
        );
    }
}
