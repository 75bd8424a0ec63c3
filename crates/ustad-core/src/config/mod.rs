//! The configuration model: named sockets and named pools, as the supervisor consumes them.
//!
//! A [`Config`] comes from `ustad.toml` ([`Config::from_file`]), from command-line flags, or
//! from code; all three end in [`Config::validate`], so they accept and refuse the same things.
//! Single values (durations, sizes, addresses…) are checked when they are parsed (see
//! [`value`]); `validate` checks what involves several of them (a pool naming an unknown
//! socket, two sockets on one address…). Problems are reported by [`Location`], which the file
//! loader turns into line and column.

mod error;
mod file;
mod state;
pub mod value;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use indexmap::IndexMap;

pub use error::{ConfigError, Diagnostic};
pub use value::{
    Budget, ByteSize, Command, IpcProtocol, ListenAddr, LogRateLimit, OutputTarget, Readiness,
    Signal, Size, SocketMode,
};

/// Default `kill_timeout`: how long a worker may take to stop before it is killed.
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `restart_delay`: the pause before a worker that exited on its own is replaced.
pub const DEFAULT_RESTART_DELAY: Duration = Duration::from_secs(1);
/// Default `ready_timeout`: how long a new worker may take to become ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `min_uptime`: a worker that exits sooner counts as a failed start (backoff grows).
pub const DEFAULT_MIN_UPTIME: Duration = Duration::from_secs(5);
/// Default `stop_grace`: with `ipc = "node"`, the time between the `'shutdown'` message and the
/// stop signal.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a pool's `before_start` command may run before it is killed and counts as failed.
pub const DEFAULT_BEFORE_START_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `log_keep`: rotated files kept per log file.
pub const DEFAULT_LOG_KEEP: u32 = 5;
/// Default listen backlog.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// A whole cluster: the sockets the primary binds and the pools of workers it runs.
/// Serialisable for the primary's state document (`plan::snapshot`), not as a file format.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// Listening sockets by name, in the order they were declared.
    pub sockets: IndexMap<String, SocketSpec>,
    /// Pools by name, in the order they were declared (the first is the one SIGTTIN/SIGTTOU
    /// scale).
    pub pools: IndexMap<String, PoolSpec>,
}

/// A listening socket the primary binds and hands to workers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketSpec {
    /// Where it listens.
    #[serde(with = "state::text")]
    pub listen: ListenAddr,
    /// One socket for all workers, or one `SO_REUSEPORT` socket per slot.
    #[serde(with = "state::text")]
    pub mode: SocketMode,
    /// The `listen(2)` backlog (capped by `net.core.somaxconn`).
    pub backlog: u32,
}

impl SocketSpec {
    /// A shared socket with the default backlog.
    pub fn new(listen: ListenAddr) -> SocketSpec {
        SocketSpec {
            listen,
            mode: SocketMode::Shared,
            backlog: DEFAULT_BACKLOG,
        }
    }
}

/// One pool: a command run as `size` interchangeable workers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolSpec {
    /// What each worker runs.
    #[serde(with = "state::words")]
    pub command: Command,
    /// How many workers.
    #[serde(with = "state::text")]
    pub size: Size,
    /// The sockets each worker receives, as fds 3, 4, … in this order.
    pub sockets: Vec<String>,
    /// When a new worker counts as ready.
    #[serde(with = "state::text")]
    pub ready: Readiness,
    /// A worker not ready this long after it was spawned is killed (a failed start).
    pub ready_timeout: Duration,
    /// Extra environment, on top of the primary's own.
    pub env: IndexMap<String, String>,
    /// The workers' working directory (default: the primary's).
    pub cwd: Option<PathBuf>,
    /// The user the workers run as (a name or a uid), with that user's groups; ustad must be
    /// root.
    pub user: Option<String>,
    /// The group the workers run as (a name or a gid), instead of the user's own.
    pub group: Option<String>,
    /// Pools this one waits for: it starts once each is ready (every slot serving) or, for a
    /// `oneshot` pool, done; it stops before them.
    pub after: Vec<String>,
    /// Its workers run to completion (migrations, a build): done when every one exited 0,
    /// never restarted after that; one that fails is tried again, backing off.
    pub oneshot: bool,
    /// A command run before each generation of the pool starts (its first start, every
    /// rolling restart and reload), as its workers would run (same `cwd`, `env`, user), e.g.
    /// an asset build. Workers of that generation start once it exited 0; when it fails, a
    /// rollout is stopped (the old workers serve on) and a first start is tried again, backing
    /// off.
    #[serde(with = "state::words_opt")]
    pub before_start: Option<Command>,
    /// How long `before_start` may run before its process group is killed (a failure).
    pub before_start_timeout: Duration,
    /// Recycle each worker after this long (±10% jitter), by rolling replacement.
    pub ttl: Option<Duration>,
    /// Never run more than `size` workers, even while replacing one (stop, then start): the
    /// same as `max_surge = 0`, `max_unavailable = 1`.
    pub strict: bool,
    /// Replacements a rollout starts at once, beside the workers they replace (default 1).
    #[serde(with = "state::text_opt")]
    pub max_surge: Option<Budget>,
    /// Slots a rollout may leave without a serving worker at once (default 0).
    #[serde(with = "state::text_opt")]
    pub max_unavailable: Option<Budget>,
    /// How long a worker may take to stop after `stop_signal` before its group is killed.
    pub kill_timeout: Duration,
    /// The pause before a worker that exited on its own is replaced.
    pub restart_delay: Duration,
    /// A worker that exits sooner than this after it was spawned counts as a failed start.
    pub min_uptime: Duration,
    /// The signal that asks a worker to stop gracefully.
    pub stop_signal: Signal,
    /// With `ipc = "node"`: a worker is sent `'shutdown'` over its channel this long before
    /// its stop signal (PM2's `shutdown_with_message`), so that an app may drain on the message.
    pub stop_grace: Duration,
    /// Drop the workers' stdout and stderr instead of relaying them (both `null`).
    pub silent: bool,
    /// Where the workers' stdout goes.
    #[serde(with = "state::text")]
    pub stdout: OutputTarget,
    /// Where the workers' stderr goes.
    #[serde(with = "state::text")]
    pub stderr: OutputTarget,
    /// Rotate a `file:` output once it would grow past this.
    #[serde(with = "state::bytes_opt")]
    pub log_max_size: Option<ByteSize>,
    /// Rotated files kept (`app.log.1` … `app.log.N`).
    pub log_keep: u32,
    /// At most this many lines of each worker's relayed output (or `file:`) per window; the
    /// others are dropped and counted in one `suppressed` line. `None`: every line.
    #[serde(with = "state::text_opt")]
    pub log_rate_limit: Option<LogRateLimit>,
    /// Replace a worker (rolling) whose process group's RSS stays above this.
    #[serde(with = "state::bytes_opt")]
    pub max_memory: Option<ByteSize>,
    /// A worker must send `WATCHDOG=1` at least this often (it gets `WATCHDOG_USEC`), else it
    /// is considered hung: killed with SIGABRT, then SIGKILL, and replaced.
    pub watchdog: Option<Duration>,
    /// Give each worker a message channel to the primary (`USTAD_IPC_FD`, see
    /// `docs/protocol.md`), carrying frames of at most `max_message` bytes. Set by the Rust
    /// library for its own workers.
    pub ipc: Option<IpcSpec>,
    /// Load the preload library into the workers (`LD_PRELOAD`) when the pool has sockets, so
    /// that a program binding one of their addresses itself gets ustad's socket (and set
    /// `PORT` when exactly one of them is TCP). On by default; it does nothing for statically
    /// linked programs (Go), which take fd 3 instead. See `ustad_core::spawn`.
    pub preload: bool,
    /// Files and directories (directories with everything below them) whose changes roll the
    /// pool, as a reload of it would: the new code is started and must become ready before an
    /// old worker stops (see [`crate::watch`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<PathBuf>,
    /// Names of files and directories that `watch` passes over, besides those it always does
    /// (names starting with `.`, `node_modules`, `__pycache__`, and backups ending in `~`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch_ignore: Vec<String>,
}

/// A pool's message channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IpcSpec {
    /// What it speaks.
    #[serde(with = "state::text")]
    pub protocol: IpcProtocol,
    /// The largest frame (or, for Node, line) either side accepts, in bytes.
    pub max_message: usize,
}

impl IpcSpec {
    /// A channel speaking `protocol`, with the default `max_message`.
    pub fn new(protocol: IpcProtocol) -> IpcSpec {
        IpcSpec {
            protocol,
            max_message: crate::ipc::DEFAULT_MAX_FRAME,
        }
    }
}

impl Default for IpcSpec {
    fn default() -> IpcSpec {
        IpcSpec::new(IpcProtocol::Ustad)
    }
}

impl PoolSpec {
    /// A pool of one worker running `command`, with every other setting at its default.
    pub fn new(command: Command) -> PoolSpec {
        PoolSpec {
            command,
            size: Size::fixed(1).expect("1 is not zero"),
            sockets: Vec::new(),
            ready: Readiness::None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            env: IndexMap::new(),
            cwd: None,
            user: None,
            group: None,
            after: Vec::new(),
            oneshot: false,
            before_start: None,
            before_start_timeout: DEFAULT_BEFORE_START_TIMEOUT,
            ttl: None,
            strict: false,
            max_surge: None,
            max_unavailable: None,
            kill_timeout: DEFAULT_KILL_TIMEOUT,
            restart_delay: DEFAULT_RESTART_DELAY,
            min_uptime: DEFAULT_MIN_UPTIME,
            stop_signal: Signal::TERM,
            stop_grace: DEFAULT_STOP_GRACE,
            silent: false,
            stdout: OutputTarget::Relay,
            stderr: OutputTarget::Relay,
            log_max_size: None,
            log_keep: DEFAULT_LOG_KEEP,
            log_rate_limit: None,
            max_memory: None,
            watchdog: None,
            ipc: None,
            preload: true,
            watch: Vec::new(),
            watch_ignore: Vec::new(),
        }
    }
}

impl PoolSpec {
    /// Where the workers' stdout and stderr go (`silent` makes both `null`).
    pub fn outputs(&self) -> (OutputTarget, OutputTarget) {
        if self.silent {
            return (OutputTarget::Null, OutputTarget::Null);
        }
        (self.stdout.clone(), self.stderr.clone())
    }

    /// How far a rollout of a pool of `size` may go at once: (`max_surge`, `max_unavailable`)
    /// as counts. `strict` is `(0, 1)`; the defaults `(1, 0)`.
    pub fn rollout_budget(&self, size: usize) -> (usize, usize) {
        let (surge, unavailable) = match (self.strict, self.max_surge, self.max_unavailable) {
            (true, None, None) => (Budget::Count(0), Budget::Count(1)),
            (_, surge, unavailable) => (
                surge.unwrap_or(Budget::Count(1)),
                unavailable.unwrap_or(Budget::Count(0)),
            ),
        };
        (surge.of(size, true), unavailable.of(size, false).min(size))
    }
}

/// Where in a configuration a problem is: the file loader maps it to a line and column, the
/// command line to a flag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Location {
    /// The configuration as a whole.
    Config,
    /// The declaration of a socket.
    Socket(String),
    /// One setting of a socket.
    SocketField(String, &'static str),
    /// The declaration of a pool.
    Pool(String),
    /// One setting of a pool.
    PoolField(String, &'static str),
    /// The n-th entry of a pool's `sockets` list.
    PoolSocket(String, usize),
    /// The n-th entry of a pool's `after` list.
    PoolAfter(String, usize),
    /// One variable of a pool's `env`.
    PoolEnv(String, String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Config => f.write_str("configuration"),
            Location::Socket(name) => write!(f, "socket `{name}`"),
            Location::SocketField(name, field) => write!(f, "socket `{name}`, `{field}`"),
            Location::Pool(name) => write!(f, "pool `{name}`"),
            Location::PoolField(name, field) => write!(f, "pool `{name}`, `{field}`"),
            Location::PoolSocket(name, index) => write!(f, "pool `{name}`, `sockets[{index}]`"),
            Location::PoolAfter(name, index) => write!(f, "pool `{name}`, `after[{index}]`"),
            Location::PoolEnv(name, key) => write!(f, "pool `{name}`, env `{key}`"),
        }
    }
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where it is.
    pub at: Location,
    /// What is wrong, and what to do about it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Names of pools and sockets appear in log prefixes, environment variables and
/// `LISTEN_FDNAMES` (which is `:`-separated): keep them to a safe alphabet.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid name `{name}`: use 1 to 64 letters, digits, `_`, `-` or `.`"
        ))
    }
}

/// Whether two TCP listen addresses would collide when bound without `SO_REUSEPORT`.
fn tcp_addresses_collide(a: &SocketAddr, b: &SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    // On Linux `[::]` is dual-stack by default, so it overlaps every IPv4 address too.
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Config, ConfigError> {
        let path = path.into();
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::from_toml(&text, &path)
    }

    /// Parses and validates config text; `path` names it in errors and anchors relative `cwd`s.
    pub fn from_toml(text: &str, path: &std::path::Path) -> Result<Config, ConfigError> {
        file::parse(text, path)
    }

    /// Checks everything that involves more than one value. Every problem is returned, not
    /// just the first.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |at: Location, message: String| problems.push(Problem { at, message });

        if self.pools.is_empty() {
            problem(
                Location::Config,
                "no pools defined: add a `[pools.NAME]` table with a `command`".to_owned(),
            );
        }

        let mut seen_listen: Vec<(&str, &ListenAddr)> = Vec::new();
        for (name, socket) in &self.sockets {
            if let Err(message) = check_name(name) {
                problem(Location::Socket(name.clone()), message);
            }
            if socket.backlog == 0 {
                problem(
                    Location::SocketField(name.clone(), "backlog"),
                    "backlog must be at least 1".to_owned(),
                );
            }
            if socket.mode == SocketMode::ReusePort && matches!(socket.listen, ListenAddr::Unix(_))
            {
                problem(
                    Location::SocketField(name.clone(), "mode"),
                    "mode = \"reuseport\" needs a TCP address; Linux does not balance Unix sockets with SO_REUSEPORT".to_owned(),
                );
            }
            for (other_name, other) in &seen_listen {
                let collide = match (&socket.listen, other) {
                    (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => tcp_addresses_collide(a, b),
                    (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
                    _ => false,
                };
                if collide {
                    problem(
                        Location::SocketField(name.clone(), "listen"),
                        format!(
                            "`{}` is already used by socket `{other_name}` ({other}); each address can be bound once",
                            socket.listen
                        ),
                    );
                }
            }
            seen_listen.push((name, &socket.listen));
        }

        for (name, pool) in &self.pools {
            if let Err(message) = check_name(name) {
                problem(Location::Pool(name.clone()), message);
            }
            for (index, dependency) in pool.after.iter().enumerate() {
                let at = Location::PoolAfter(name.clone(), index);
                if dependency == name {
                    problem(at, format!("pool `{name}` cannot wait for itself"));
                } else if !self.pools.contains_key(dependency) {
                    let names: Vec<&str> = self.pools.keys().map(String::as_str).collect();
                    problem(
                        at,
                        format!(
                            "unknown pool `{dependency}` (defined pools: {})",
                            names.join(", ")
                        ),
                    );
                }
            }
            if let Some(cycle) = self.cycle_from(name) {
                problem(
                    Location::PoolField(name.clone(), "after"),
                    format!(
                        "pools wait for each other and none could start: {}",
                        cycle.join(" → ")
                    ),
                );
            }
            let max = value::max_workers();
            if pool.size.count() > max {
                problem(
                    Location::PoolField(name.clone(), "size"),
                    format!(
                        "size {} is more workers than this machine can run processes (at most {max}: kernel.pid_max, kernel.threads-max)",
                        pool.size
                    ),
                );
            }
            for (index, socket) in pool.sockets.iter().enumerate() {
                let handed = self
                    .sockets
                    .get(socket)
                    .is_some_and(|s| s.mode == SocketMode::RoundRobin);
                let speaks_ustad = pool
                    .ipc
                    .is_some_and(|ipc| ipc.protocol == IpcProtocol::Ustad);
                if handed && !speaks_ustad {
                    problem(
                        Location::PoolSocket(name.clone(), index),
                        format!(
                            "socket `{socket}` is `round-robin`: the primary hands its connections to workers over their message channel, which only workers of the Rust library have; use mode = \"shared\" or \"reuseport\""
                        ),
                    );
                }
                if !self.sockets.contains_key(socket) {
                    let known = if self.sockets.is_empty() {
                        "no sockets are defined; add a `[sockets.NAME]` table".to_owned()
                    } else {
                        let names: Vec<&str> = self.sockets.keys().map(String::as_str).collect();
                        format!("defined sockets: {}", names.join(", "))
                    };
                    problem(
                        Location::PoolSocket(name.clone(), index),
                        format!("unknown socket `{socket}` ({known})"),
                    );
                } else if pool.sockets[..index].contains(socket) {
                    problem(
                        Location::PoolSocket(name.clone(), index),
                        format!("socket `{socket}` is listed twice"),
                    );
                }
            }
            if pool.ready_timeout.is_zero() {
                problem(
                    Location::PoolField(name.clone(), "ready_timeout"),
                    "ready_timeout must be longer than 0s".to_owned(),
                );
            }
            if pool.ready == Readiness::Listening && self.listened_sockets(pool).next().is_none() {
                problem(
                    Location::PoolField(name.clone(), "ready"),
                    "ready = \"listening\" needs a socket the workers accept on (\"shared\" or \"reuseport\"); add one to `sockets`, or use \"notify\", \"delay:2s\" or \"none\"".to_owned(),
                );
            }
            if pool.oneshot && !pool.watch.is_empty() {
                problem(
                    Location::PoolField(name.clone(), "watch"),
                    "`watch` rolls a pool when its files change, but a `oneshot` pool runs to completion and is never rolled".to_owned(),
                );
            }
            if pool.ready == Readiness::Message && pool.ipc.is_none() {
                problem(
                    Location::PoolField(name.clone(), "ready"),
                    "ready = \"message\" needs a message channel to hear it on: set ipc = \"node\" for a Node app that calls process.send('ready')".to_owned(),
                );
            }
            if let Readiness::Delay(delay) = pool.ready {
                if delay >= pool.ready_timeout {
                    problem(
                        Location::PoolField(name.clone(), "ready"),
                        format!(
                            "the ready delay ({}) must be shorter than ready_timeout ({})",
                            value::format_duration(delay),
                            value::format_duration(pool.ready_timeout)
                        ),
                    );
                }
            }
            if pool.watchdog.is_some_and(|watchdog| watchdog.is_zero()) {
                problem(
                    Location::PoolField(name.clone(), "watchdog"),
                    "watchdog must be longer than 0s (leave it out to turn it off)".to_owned(),
                );
            } else if pool
                .watchdog
                .is_some_and(|watchdog| watchdog < Duration::from_micros(1))
            {
                problem(
                    Location::PoolField(name.clone(), "watchdog"),
                    "watchdog must be at least 1us: workers are told it in microseconds (WATCHDOG_USEC), where 0 turns it off".to_owned(),
                );
            }
            if let Some(ipc) = pool.ipc {
                let wire_max = usize::try_from(u32::MAX).unwrap_or(usize::MAX);
                if ipc.max_message == 0 || ipc.max_message > wire_max {
                    problem(
                        Location::PoolField(name.clone(), "max_message"),
                        format!(
                            "max_message must be 1 to {wire_max} bytes: a frame's length is 4 bytes on the wire (docs/protocol.md), got {}",
                            ipc.max_message
                        ),
                    );
                }
            }
            // The file and the flags refuse longer durations as they read them; a configuration
            // built in code is checked here.
            let delay = match pool.ready {
                Readiness::Delay(delay) => Some(delay),
                _ => None,
            };
            for (field, duration) in [
                ("ready", delay),
                ("ready_timeout", Some(pool.ready_timeout)),
                ("ttl", pool.ttl),
                ("kill_timeout", Some(pool.kill_timeout)),
                ("restart_delay", Some(pool.restart_delay)),
                ("min_uptime", Some(pool.min_uptime)),
                ("stop_grace", Some(pool.stop_grace)),
                ("watchdog", pool.watchdog),
                ("before_start_timeout", Some(pool.before_start_timeout)),
            ] {
                if let Some(Err(why)) = duration.map(value::check_duration) {
                    problem(
                        Location::PoolField(name.clone(), field),
                        format!("{field} is {why}"),
                    );
                }
            }
            if pool.silent
                && (pool.stdout != OutputTarget::Relay || pool.stderr != OutputTarget::Relay)
            {
                problem(
                    Location::PoolField(name.clone(), "silent"),
                    "silent means stdout = \"null\" and stderr = \"null\": give either silent or the outputs".to_owned(),
                );
            }
            if pool.log_max_size.is_some_and(|size| size.0 < 1024) {
                problem(
                    Location::PoolField(name.clone(), "log_max_size"),
                    "log_max_size must be at least 1KiB (a line is cut at 8KiB)".to_owned(),
                );
            }
            if pool.log_keep > 1000 {
                problem(
                    Location::PoolField(name.clone(), "log_keep"),
                    format!(
                        "log_keep = {} keeps too many files; at most 1000",
                        pool.log_keep
                    ),
                );
            }
            if let Some(limit) = pool.log_rate_limit {
                // A file's text was checked as it was read; the library builds the value.
                if let Err(why) = limit.to_string().parse::<LogRateLimit>() {
                    problem(Location::PoolField(name.clone(), "log_rate_limit"), why);
                }
            }
            if pool.strict && (pool.max_surge.is_some() || pool.max_unavailable.is_some()) {
                problem(
                    Location::PoolField(name.clone(), "strict"),
                    "strict means max_surge = 0 and max_unavailable = 1: give either strict or the two budgets".to_owned(),
                );
            } else if pool.rollout_budget(pool.size.count()) == (0, 0) {
                let at = match pool.max_surge {
                    Some(_) => "max_surge",
                    None => "max_unavailable",
                };
                problem(
                    Location::PoolField(name.clone(), at),
                    format!(
                        "a rollout could never start: with max_surge = {} and max_unavailable = {} for {} workers, no replacement may start beside an old worker and no old worker may stop first",
                        pool.max_surge.unwrap_or(Budget::Count(1)),
                        pool.max_unavailable.unwrap_or(Budget::Count(0)),
                        pool.size
                    ),
                );
            }
            if pool.before_start.is_some() && pool.before_start_timeout.is_zero() {
                problem(
                    Location::PoolField(name.clone(), "before_start_timeout"),
                    "before_start_timeout must be longer than 0s: the command would be killed as it starts".to_owned(),
                );
            }
            if pool.ttl.is_some_and(|ttl| ttl.is_zero()) {
                problem(
                    Location::PoolField(name.clone(), "ttl"),
                    "ttl must be longer than 0s (leave it out to never recycle)".to_owned(),
                );
            }
            for (key, value) in &pool.env {
                if key.is_empty() || key.contains('=') || key.contains('\0') {
                    problem(
                        Location::PoolEnv(name.clone(), key.clone()),
                        format!("invalid environment variable name `{key}`"),
                    );
                } else if value.contains('\0') {
                    problem(
                        Location::PoolEnv(name.clone(), key.clone()),
                        format!("the value of `{key}` contains a NUL byte"),
                    );
                }
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// A chain of `after` that leads from `start` back to it, if one does: `a → b → a`.
    fn cycle_from(&self, start: &str) -> Option<Vec<String>> {
        let mut path = vec![start.to_owned()];
        let mut visited = std::collections::HashSet::new();
        fn walk(
            config: &Config,
            start: &str,
            path: &mut Vec<String>,
            visited: &mut std::collections::HashSet<String>,
        ) -> bool {
            let current = path.last().cloned().unwrap_or_default();
            let Some(pool) = config.pools.get(&current) else {
                return false;
            };
            for next in &pool.after {
                if next == start {
                    path.push(next.clone());
                    return true;
                }
                if next != &current && visited.insert(next.clone()) {
                    path.push(next.clone());
                    if walk(config, start, path, visited) {
                        return true;
                    }
                    path.pop();
                }
            }
            false
        }
        walk(self, start, &mut path, &mut visited).then_some(path)
    }

    /// Whether a pool runs as another user or group.
    pub fn runs_other_users(&self) -> bool {
        self.pools
            .values()
            .any(|pool| pool.user.is_some() || pool.group.is_some())
    }

    /// Pools that run as another user or group need ustad to be root: one problem per pool
    /// that does, when it is not (checked where the cluster starts and reloads, not by
    /// `ustad check`, which may run as anyone).
    pub fn check_privileges(&self) -> Result<(), Vec<Problem>> {
        if crate::accounts::can_switch_users() {
            return Ok(());
        }
        let uid = rustix::process::geteuid().as_raw();
        let problems: Vec<Problem> = self
            .pools
            .iter()
            .filter(|(_, pool)| pool.user.is_some() || pool.group.is_some())
            .map(|(name, pool)| Problem {
                at: Location::PoolField(
                    name.clone(),
                    if pool.user.is_some() { "user" } else { "group" },
                ),
                message: format!(
                    "running workers as {} needs ustad to run as root; it runs as uid {uid}",
                    match (&pool.user, &pool.group) {
                        (Some(user), Some(group)) => format!("user `{user}` and group `{group}`"),
                        (Some(user), None) => format!("user `{user}`"),
                        (None, Some(group)) => format!("group `{group}`"),
                        (None, None) => unreachable!("filtered"),
                    }
                ),
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The sockets a pool uses, with their specs, in fd order.
    pub fn pool_sockets<'a>(
        &'a self,
        pool: &'a PoolSpec,
    ) -> impl Iterator<Item = (&'a str, &'a SocketSpec)> + 'a {
        pool.sockets
            .iter()
            .filter_map(|name| self.sockets.get(name).map(|spec| (name.as_str(), spec)))
    }

    /// The sockets of a pool that its workers accept on themselves (`shared` and `reuseport`;
    /// not `round-robin`, whose connections the primary accepts): those a worker is seen
    /// listening on with `ready = "listening"`.
    pub fn listened_sockets<'a>(
        &'a self,
        pool: &'a PoolSpec,
    ) -> impl Iterator<Item = (&'a str, &'a SocketSpec)> + 'a {
        self.pool_sockets(pool)
            .filter(|(_, socket)| socket.mode != SocketMode::RoundRobin)
    }

    /// The readiness a pool gets when none is configured: `listening` when its workers accept
    /// on sockets of their own, `none` otherwise.
    pub fn default_readiness(&self, pool: &PoolSpec) -> Readiness {
        match self.listened_sockets(pool).next() {
            Some(_) => Readiness::Listening,
            None => Readiness::None,
        }
    }

    /// A one-line summary: `2 sockets, 3 pools: web ×4, jobs ×2, cron ×1`.
    pub fn summary(&self) -> String {
        let pools: Vec<String> = self
            .pools
            .iter()
            .map(|(name, pool)| format!("{name} ×{}", pool.size))
            .collect();
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        format!(
            "{}, {}: {}",
            plural(self.sockets.len(), "socket"),
            plural(self.pools.len(), "pool"),
            pools.join(", ")
        )
    }
}

/// Source positions of a parsed file's values, by location (byte ranges into the text).
pub(crate) type SpanTable = HashMap<Location, std::ops::Range<usize>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration built in code (the Rust library's builder) skips the parsers' bound on
    /// durations: `validate` names each setting beyond it.
    #[test]
    fn durations_set_in_code_are_bounded_too() {
        let mut spec = PoolSpec::new(Command::new(["app"]).unwrap());
        spec.kill_timeout = Duration::MAX;
        spec.ttl = Some(value::MAX_DURATION + Duration::from_micros(1));
        spec.ready = Readiness::Delay(Duration::from_secs(1));
        let mut config = Config::default();
        config.pools.insert("web".to_owned(), spec.clone());
        let problems = config.validate().unwrap_err();
        let fields: Vec<String> = problems.iter().map(|p| p.at.to_string()).collect();
        assert_eq!(fields, ["pool `web`, `ttl`", "pool `web`, `kill_timeout`"]);
        assert!(
            problems[1]
                .message
                .starts_with("kill_timeout is longer than ustad can count"),
            "{}",
            problems[1].message
        );

        spec.kill_timeout = value::MAX_DURATION;
        spec.ttl = Some(value::MAX_DURATION);
        config.pools.insert("web".to_owned(), spec);
        assert_eq!(config.validate(), Ok(()));
    }

    /// The Rust library sets `max_message`: a frame's length must be able to say it, and a
    /// limit of 0 would cut off every worker at its first frame.
    #[test]
    fn max_message_is_what_a_frame_header_can_say() {
        let mut config = Config::default();
        for (max, valid) in [
            (0, false),
            (1, true),
            (u32::MAX as usize, true),
            (usize::MAX, false),
        ] {
            let mut spec = PoolSpec::new(Command::new(["app"]).unwrap());
            spec.ipc = Some(IpcSpec {
                protocol: IpcProtocol::Ustad,
                max_message: max,
            });
            config.pools.insert("web".to_owned(), spec);
            match config.validate() {
                Ok(()) => assert!(valid, "{max}"),
                Err(problems) => {
                    assert!(!valid, "{max}");
                    assert_eq!(problems[0].at.to_string(), "pool `web`, `max_message`");
                    assert!(problems[0].message.contains("4 bytes on the wire"));
                }
            }
        }
    }
}
