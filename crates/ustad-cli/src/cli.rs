//! The command line: subcommands and flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ustad_core::config::value::parse_duration;
use ustad_core::config::{Budget, ByteSize, IpcProtocol, OutputTarget, Readiness, Signal, Size};

/// Run any program as a supervised cluster of worker processes: shared sockets, readiness,
/// restarts, zero-downtime rolling restarts, graceful stop.
#[derive(Debug, Parser)]
#[command(name = "ustad", version, about, long_about = None, max_term_width = 100)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,

    /// Log format for ustad's own messages (on stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "USTAD_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,

    /// Colour the output prefixes and log levels.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub(crate) color: ColorChoice,

    /// (internal) Carry on as the primary whose state is in this memfd: an upgrade.
    #[arg(long, hide = true)]
    pub(crate) handover: Option<i32>,

    /// (internal) Say which ustad this is and which state it reads, having checked the rest
    /// of the command line, and exit: asked of a new binary before an upgrade to it.
    #[arg(long, hide = true)]
    pub(crate) upgrade_check: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a cluster: from a config file, from flags and a command, or the built-in demo.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Validate a config file: exit 0 if it is valid, 2 with every problem otherwise.
    Check {
        /// The config file.
        config: PathBuf,
    },
    /// Show the pools and workers of a running cluster.
    Status {
        /// Print JSON (the control protocol's `status` object) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Rolling restart: re-read the config file (applying what changed) and replace the
    /// workers of every pool, or of the named ones, one slot at a time.
    Reload {
        /// Roll only these pools (changed pools roll in any case).
        pools: Vec<String>,
        /// Wait until the rolls are over, showing progress; exit 1 if one stopped.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Replace ustad's own program in place, keeping every worker running (same pids, same
    /// sockets, no request lost): after installing a new version of ustad. The new binary is
    /// checked first; if it is refused, nothing changes. `kill -URG <primary pid>` does the
    /// same for scripts that cannot reach the control socket.
    Upgrade {
        /// The new binary; by default the path the running primary was started from.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Wait until the new program has taken over, and show what it kept.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Grow or shrink a pool: `ustad scale web 4`, `ustad scale web +1`.
    Scale {
        /// The pool.
        pool: String,
        /// The new size, or a change: +N / -N.
        #[arg(allow_hyphen_values = true)]
        size: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Replace a pool's workers (rolling), or one worker by id.
    Restart {
        /// A pool name or a worker id.
        #[arg(value_name = "POOL|WORKER_ID")]
        what: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Stop every worker gracefully; the primary exits once they are gone. With a worker
    /// id: stop that one worker, not replaced (its slot stays empty until `ustad restart
    /// POOL` or `ustad scale`).
    Stop {
        /// Only this worker.
        #[arg(value_name = "WORKER_ID")]
        worker: Option<u64>,
        /// Give workers this long before they are killed, instead of their kill_timeout.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Send a signal to a worker's process group, or to every worker of a pool (a worker it
    /// ends is replaced, as any worker that dies).
    Kill {
        /// A pool name or a worker id.
        #[arg(value_name = "POOL|WORKER_ID")]
        what: String,
        /// The signal: SIGTERM, TERM, SIGUSR1…
        #[arg(default_value = "SIGTERM")]
        signal: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Follow what happens in the cluster, one line per event (spawned, ready, exited with its
    /// code or signal, rollouts…), for scripts and hooks.
    Events {
        /// One JSON object per line, with the event's fields as keys.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Recent output of the workers (kept by the primary), then, with -f, new lines.
    Logs {
        /// Only this pool.
        pool: Option<String>,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many recent lines.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// A live view of pools, workers and events; quit with q.
    Top {
        /// Refresh period.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// The built-in hello-world HTTP worker (what `ustad run` runs without a command).
    #[command(hide = true)]
    DemoWorker {
        /// How long an idle keep-alive connection is kept open after SIGTERM.
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        idle_grace: Duration,
    },
}

const RUN_EXAMPLES: &str = "\
Examples:
  ustad run                                      demo: hello workers, one per core, on 127.0.0.1:8000
  ustad run -w 4 -l 127.0.0.1:8000 -- node app.js
  ustad run ustad.toml                           several named pools from a config file

Signals to the primary:
  SIGINT, SIGTERM   stop every worker gracefully, then exit (a second one kills them at once)
  SIGHUP            re-read the config file and replace every worker, one slot at a time
  SIGUSR2           replace every worker, one slot at a time, with the same configuration
  SIGTTIN, SIGTTOU  add / remove one worker of the first pool";

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// A config file (`ustad.toml`), or the command each worker runs. Put `--` before a
    /// command that has flags of its own. With neither, ustad runs its built-in demo HTTP
    /// worker.
    #[arg(value_name = "CONFIG | COMMAND")]
    pub(crate) args: Vec<String>,

    #[command(flatten)]
    pub(crate) pool: PoolFlags,

    /// The instance's name, for `ustad status --name` and the control socket's file name
    /// [default: the config file's name without .toml, `demo` for the demo, else the pool's
    /// name].
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// Where to listen for control commands [default:
    /// $XDG_RUNTIME_DIR/ustad/NAME.sock, or /tmp/ustad-UID/NAME.sock].
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,

    /// Serve Prometheus metrics on /metrics and a health check on /healthz at this address,
    /// e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<std::net::SocketAddr>,

    /// The primary's own nice value, below its workers' (they start at 0) so that it answers,
    /// restarts and upgrades promptly while they keep every core busy. Needs root
    /// (CAP_SYS_NICE) or an RLIMIT_NICE that allows it (LimitNICE= in a systemd unit); the
    /// primary says so and stays at 0 otherwise. 0 leaves it as started, as does a primary
    /// started at another nice value.
    #[arg(
        long,
        value_name = "N",
        default_value_t = ustad_core::priority::DEFAULT_NICE,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(-20..=0)
    )]
    pub(crate) primary_nice: i32,
}

/// Which running instance a command talks to.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct TargetArgs {
    /// The instance's name (see `ustad run --name`) [default: the only one running].
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// The instance's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    pub(crate) control: Option<PathBuf>,
}

impl TargetArgs {
    pub(crate) fn target(&self) -> ustad_core::control::paths::Target {
        ustad_core::control::paths::Target {
            control: self.control.clone(),
            name: self.name.clone(),
        }
    }
}

/// Flags that describe the single pool of a cluster started without a config file.
#[derive(Debug, Args, Default)]
pub(crate) struct PoolFlags {
    /// Number of workers, or `auto` for one per core [default: auto for the demo, 1 otherwise].
    #[arg(short = 'w', long, value_name = "N|auto")]
    pub(crate) workers: Option<Size>,

    /// Listen on this address and pass the socket to every worker as fd 3, 4, …
    /// (`127.0.0.1:8000`, `[::]:8000`, `unix:/run/app.sock`; `NAME=ADDR` names it in
    /// LISTEN_FDNAMES). Repeatable.
    #[arg(short = 'l', long, value_name = "[NAME=]ADDR")]
    pub(crate) listen: Vec<String>,

    /// Give each worker its own SO_REUSEPORT socket instead of sharing one.
    #[arg(long)]
    pub(crate) reuseport: bool,

    /// Listen backlog.
    #[arg(long, value_name = "N")]
    pub(crate) backlog: Option<u32>,

    /// The pool's name, used in log prefixes and USTAD_POOL [default: web for the demo, app
    /// otherwise].
    #[arg(long, value_name = "NAME")]
    pub(crate) pool: Option<String>,

    /// When a worker is ready: `listening` (ustad sees it wait for connections on its
    /// socket), `notify` (it sends READY=1), `message` (with --ipc node: it calls
    /// process.send('ready')), `delay:2s`, or `none` [default: notify for the demo; listening
    /// with --listen; none otherwise].
    #[arg(long, value_name = "MODE")]
    pub(crate) ready: Option<Readiness>,

    /// Kill a worker that is not ready this long after it started [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) ready_timeout: Option<Duration>,

    /// Time a worker gets to stop after the stop signal before its group is killed
    /// [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) kill_timeout: Option<Duration>,

    /// Pause before replacing a worker that exited on its own [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) restart_delay: Option<Duration>,

    /// A worker that exits sooner than this after it started is a failed start
    /// (restarts back off) [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) min_uptime: Option<Duration>,

    /// Replace each worker after this long (±10%), by rolling replacement.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) ttl: Option<Duration>,

    /// Replace a worker (rolling) whose process group's memory (RSS) stays above this,
    /// e.g. 512MiB.
    #[arg(long, value_name = "SIZE")]
    pub(crate) max_memory: Option<ByteSize>,

    /// Workers must send WATCHDOG=1 (sd_notify) this often, else they are killed as hung and
    /// replaced; they get WATCHDOG_USEC.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) watchdog: Option<Duration>,

    /// Never run more than the pool's size, even while replacing (stop, then start).
    #[arg(long)]
    pub(crate) strict: bool,

    /// Replacements a rolling restart starts at once: a count or a share of the pool (25%)
    /// [default: 1].
    #[arg(long, value_name = "N|P%")]
    pub(crate) max_surge: Option<Budget>,

    /// Slots a rolling restart may leave without a serving worker at once [default: 0].
    #[arg(long, value_name = "N|P%")]
    pub(crate) max_unavailable: Option<Budget>,

    /// The signal that asks a worker to stop [default: SIGTERM].
    #[arg(long, value_name = "SIGNAL")]
    pub(crate) stop_signal: Option<Signal>,

    /// Open a message channel to each worker: `node` is Node's own (process.send and
    /// process.on('message'), as child_process.fork opens it), for PM2's conventions:
    /// process.send('ready'), and the 'shutdown' message before the stop signal.
    #[arg(long, value_name = "PROTOCOL")]
    pub(crate) ipc: Option<IpcProtocol>,

    /// With --ipc node: the time between the 'shutdown' message and the stop signal
    /// [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) stop_grace: Option<Duration>,

    /// Discard the workers' stdout and stderr.
    #[arg(long)]
    pub(crate) silent: bool,

    /// Where the workers' stdout goes: relay (prefixed, on ustad's stdout), inherit (ustad's
    /// stdout, written by the worker), null, or file:PATH [default: relay].
    #[arg(long, value_name = "TARGET")]
    pub(crate) stdout: Option<OutputTarget>,

    /// Where the workers' stderr goes, as --stdout [default: relay].
    #[arg(long, value_name = "TARGET")]
    pub(crate) stderr: Option<OutputTarget>,

    /// Rotate a file:PATH output before it grows past this (e.g. 50MiB).
    #[arg(long, value_name = "SIZE")]
    pub(crate) log_max_size: Option<ByteSize>,

    /// Rotated log files kept (PATH.1 … PATH.N) [default: 5].
    #[arg(long, value_name = "N")]
    pub(crate) log_keep: Option<u32>,

    /// Relay at most LINES lines of each worker's output per DURATION (e.g. 10000/30s); the
    /// rest are dropped and counted in one line [default: every line].
    #[arg(long, value_name = "LINES/DURATION")]
    pub(crate) log_rate_limit: Option<ustad_core::config::LogRateLimit>,

    /// Do not load ustad's preload library into the workers: a program that binds its own port
    /// then binds it for itself (and PORT is not set). By default, with --listen, a program
    /// that binds one of the addresses gets ustad's socket instead.
    #[arg(long)]
    pub(crate) no_preload: bool,

    /// Set an environment variable for the workers. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub(crate) env: Vec<String>,

    /// The workers' working directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) cwd: Option<PathBuf>,

    /// Roll the workers when a file changes here (a directory: anything below it); repeatable.
    /// Names starting with `.`, node_modules and __pycache__ are passed over.
    #[arg(long, value_name = "PATH")]
    pub(crate) watch: Vec<PathBuf>,

    /// With --watch: pass over files and directories of this name too (repeatable).
    #[arg(long, value_name = "NAME")]
    pub(crate) watch_ignore: Vec<String>,

    /// Run the workers as this user (name or uid), with its groups; ustad must be root.
    #[arg(long, value_name = "USER")]
    pub(crate) user: Option<String>,

    /// Run the workers with this group (name or gid) instead of the user's.
    #[arg(long, value_name = "GROUP")]
    pub(crate) group: Option<String>,

    /// Run this command before each generation starts (the first start, every rolling
    /// restart), e.g. "npm run build": workers start once it exits 0; a rollout whose
    /// command fails stops, the old workers serving on.
    #[arg(long, value_name = "COMMAND", value_parser = ustad_core::config::Command::parse_line)]
    pub(crate) before_start: Option<ustad_core::config::Command>,

    /// How long the --before-start command may run before it is killed [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) before_start_timeout: Option<Duration>,
}

impl PoolFlags {
    /// The flags given, by name, for the "cannot combine with a config file" error.
    pub(crate) fn given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let mut note = |set: bool, name| {
            if set {
                given.push(name);
            }
        };
        note(self.workers.is_some(), "--workers");
        note(!self.listen.is_empty(), "--listen");
        note(self.reuseport, "--reuseport");
        note(self.backlog.is_some(), "--backlog");
        note(self.pool.is_some(), "--pool");
        note(self.ready.is_some(), "--ready");
        note(self.ready_timeout.is_some(), "--ready-timeout");
        note(self.kill_timeout.is_some(), "--kill-timeout");
        note(self.restart_delay.is_some(), "--restart-delay");
        note(self.min_uptime.is_some(), "--min-uptime");
        note(self.ttl.is_some(), "--ttl");
        note(self.max_memory.is_some(), "--max-memory");
        note(self.watchdog.is_some(), "--watchdog");
        note(self.strict, "--strict");
        note(self.max_surge.is_some(), "--max-surge");
        note(self.max_unavailable.is_some(), "--max-unavailable");
        note(self.stop_signal.is_some(), "--stop-signal");
        note(self.ipc.is_some(), "--ipc");
        note(self.stop_grace.is_some(), "--stop-grace");
        note(self.silent, "--silent");
        note(self.stdout.is_some(), "--stdout");
        note(self.stderr.is_some(), "--stderr");
        note(self.log_max_size.is_some(), "--log-max-size");
        note(self.log_keep.is_some(), "--log-keep");
        note(self.log_rate_limit.is_some(), "--log-rate-limit");
        note(self.no_preload, "--no-preload");
        note(self.before_start.is_some(), "--before-start");
        note(
            self.before_start_timeout.is_some(),
            "--before-start-timeout",
        );
        note(!self.env.is_empty(), "--env");
        note(self.cwd.is_some(), "--cwd");
        note(!self.watch.is_empty(), "--watch");
        note(!self.watch_ignore.is_empty(), "--watch-ignore");
        note(self.user.is_some(), "--user");
        note(self.group.is_some(), "--group");
        given
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per event, with the event's fields as keys.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorChoice {
    /// When the output is a terminal and NO_COLOR is unset.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}
