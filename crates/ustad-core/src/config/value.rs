//! The value types of a configuration, each parsed from the one string syntax that the config
//! file, the command-line flags and the library builder all share.
//!
//! Every type here implements `FromStr` with an error message that says what was expected, and
//! `Deserialize` through it, so a bad value in `ustad.toml` is reported at its own line and
//! column, and the same bad value in a flag names the flag (clap uses the same `FromStr`).

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The longest duration ustad takes, for any setting or request: 2^64 − 2 microseconds, a
/// little over 584,542 years.
///
/// Why this bound: systemd counts every span of time in 64-bit microseconds (`usec_t`, whose
/// all-ones value means infinity), and that is how a worker is told its watchdog
/// (`WATCHDOG_USEC`). Within it, no deadline the primary computes (the monotonic clock's now,
/// plus a timeout, plus up to 10% of `ttl` jitter) can overflow an `Instant`, which counts
/// signed 64-bit seconds: 292 billion years of room. Longer durations (humantime reads up to
/// 2^64 seconds) used to be taken and then panicked the primary when it computed a deadline,
/// e.g. `kill_timeout = "500000000000y"` at the first stop.
pub const MAX_DURATION: Duration = Duration::from_micros(u64::MAX - 1);

/// Parses a human duration: `"30s"`, `"1m30s"`, `"500ms"`, `"1h"`; at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed == "0" {
        return Ok(Duration::ZERO);
    }
    let duration = humantime::parse_duration(trimmed).map_err(|error| {
        format!("invalid duration `{text}` ({error}); expected a number with a unit, like \"30s\", \"500ms\" or \"1m30s\"")
    })?;
    check_duration(duration).map_err(|why| format!("invalid duration `{text}`: {why}"))
}

/// `duration`, if it is at most [`MAX_DURATION`]; else what to say about it.
pub fn check_duration(duration: Duration) -> Result<Duration, String> {
    if duration <= MAX_DURATION {
        Ok(duration)
    } else {
        Err(format!(
            "longer than ustad can count ({} years at most: time is kept in 64-bit microseconds, as systemd keeps it and tells workers their watchdog)",
            MAX_DURATION.as_secs() / SECONDS_PER_YEAR
        ))
    }
}

/// A year as humantime reads `1y`: 365.25 days.
const SECONDS_PER_YEAR: u64 = 31_557_600;

/// Formats a duration the way the config file spells it (`1m 30s`, `500ms`).
pub fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_owned();
    }
    humantime::format_duration(duration).to_string()
}

/// A duration as written in the config file: a string such as `"30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurationValue(pub(crate) Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"30s\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<DurationValue, E> {
                parse_duration(text).map(DurationValue).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<DurationValue, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{n}s\" or \"{n}ms\" instead of {n}"
                )))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<DurationValue, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{n}s\" instead of {n}"
                )))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// An amount of memory: `"512MiB"`, `"1.5G"`, `"200M"`, `"1000000"` (bytes).
///
/// `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024 (as PM2's
/// `max_memory_restart` reads `200M`); `KB`, `MB`, `GB`, `TB` are powers of 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<ByteSize, String> {
        let invalid = || {
            format!(
                "invalid amount of memory `{text}`: expected a number with a unit, like \"512MiB\", \"1.5G\" or \"800MB\""
            )
        };
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: f64 = number.parse().map_err(|_| invalid())?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => return Err(invalid()),
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("amount of memory `{text}` is too large"));
        }
        if bytes < 1.0 {
            return Err(format!("amount of memory `{text}` must be at least 1 byte"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (unit, size) in UNITS {
            if self.0 >= size {
                let value = self.0 as f64 / size as f64;
                return if self.0 % size == 0 {
                    write!(f, "{}{unit}", self.0 / size)
                } else {
                    write!(f, "{value:.1}{unit}")
                };
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// The kernel's ceiling on `kernel.pid_max` on 64-bit Linux (`PID_MAX_LIMIT`): no system runs
/// more processes than this, whatever it is configured to.
pub const PID_MAX_LIMIT: usize = 4_194_304;

/// The most workers one pool may have on this machine: no more than it can run processes at
/// all (`kernel.pid_max` and `kernel.threads-max`; every worker is at least one). Read once.
pub fn max_workers() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        };
        [
            read("/proc/sys/kernel/pid_max"),
            read("/proc/sys/kernel/threads-max"),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(PID_MAX_LIMIT)
        .min(PID_MAX_LIMIT)
    })
}

/// A number of workers given as a count or as a share of a pool's size: `2`, `"25%"`
/// (`max_surge`, `max_unavailable`, as Kubernetes spells them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// This many.
    Count(usize),
    /// This percentage of the pool's size (0 to 100).
    Percent(u8),
}

impl Budget {
    /// The count for a pool of `size`: a percentage rounds up when `round_up` (a surge of 10%
    /// of 4 workers is 1), down otherwise (10% of 4 may be unavailable: none).
    pub fn of(self, size: usize, round_up: bool) -> usize {
        match self {
            Budget::Count(n) => n,
            Budget::Percent(percent) => {
                let scaled = size.saturating_mul(usize::from(percent));
                if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                }
            }
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Count(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(text: &str) -> Result<Budget, String> {
        let text = text.trim();
        let invalid = || {
            format!(
                "invalid `{text}`: expected a number of workers (like 2) or a share of the pool's size (like \"25%\")"
            )
        };
        match text.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Budget::Percent(p)),
                _ => Err(format!("invalid `{text}`: a share is 0% to 100%")),
            },
            None => text
                .parse::<usize>()
                .map(Budget::Count)
                .map_err(|_| invalid()),
        }
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BudgetVisitor;
        impl Visitor<'_> for BudgetVisitor {
            type Value = Budget;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of workers, or a share of the pool's size like \"25%\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Budget, E> {
                usize::try_from(n)
                    .map(Budget::Count)
                    .map_err(|_| E::custom(format!("{n} workers: expected 0 or more")))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Budget, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(BudgetVisitor)
    }
}

/// How many workers a pool runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Exactly this many; 0 is a pool defined but not started (scale it up to start it).
    Fixed(usize),
    /// One per core available to this process (`std::thread::available_parallelism`).
    Auto,
}

impl Size {
    /// The number of workers this size means on this machine.
    pub fn count(self) -> usize {
        match self {
            Size::Fixed(n) => n,
            Size::Auto => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        }
    }

    /// A fixed size (0: defined, not started).
    pub fn fixed(n: usize) -> Option<Size> {
        Some(Size::Fixed(n))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Fixed(n) => write!(f, "{n}"),
            Size::Auto => f.write_str("auto"),
        }
    }
}

fn size_from_int(n: i64) -> Result<Size, String> {
    if n < 0 {
        return Err(format!(
            "size must be 0 or more (got {n}); 0 defines the pool without starting it"
        ));
    }
    usize::try_from(n)
        .ok()
        .and_then(Size::fixed)
        .ok_or_else(|| format!("size {n} is too large"))
}

impl FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Size, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Size::Auto);
        }
        match text.parse::<i64>() {
            Ok(n) => size_from_int(n),
            Err(_) => Err(format!(
                "invalid size `{text}`: expected a number of workers (0 or more) or \"auto\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of workers or \"auto\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                size_from_int(n).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Size, E> {
                if text.trim().parse::<i64>().is_ok() {
                    return Err(E::custom(format!(
                        "write the size as a number, without quotes: size = {}",
                        text.trim()
                    )));
                }
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// When a freshly started worker counts as ready to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The worker sends `READY=1` over `NOTIFY_SOCKET` (the sd_notify protocol).
    Notify,
    /// The primary sees a process of the worker wait for connections on one of its pool's
    /// sockets (see [`crate::listening`]): the worker does nothing. The default for pools with
    /// sockets that workers accept on.
    Listening,
    /// The worker says so over its message channel: a Node app's `process.send('ready')`
    /// (`ipc = "node"`, PM2's `wait_ready`), a library worker's `ready()`.
    Message,
    /// The worker is ready this long after it was spawned.
    Delay(Duration),
    /// The worker is ready as soon as it is spawned.
    None,
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readiness::Notify => f.write_str("notify"),
            Readiness::Listening => f.write_str("listening"),
            Readiness::Message => f.write_str("message"),
            Readiness::Delay(d) => write!(f, "delay:{}", format_duration(*d)),
            Readiness::None => f.write_str("none"),
        }
    }
}

impl Readiness {
    /// Whether the worker's readiness is seen (it says so, or is seen listening) rather than
    /// assumed (at spawn, or after a delay). A worker whose readiness was seen and that dies
    /// later is replaced at once; one assumed ready must first stay up `min_uptime`.
    pub fn is_observed(self) -> bool {
        matches!(
            self,
            Readiness::Notify | Readiness::Listening | Readiness::Message
        )
    }
}

impl FromStr for Readiness {
    type Err = String;
    fn from_str(text: &str) -> Result<Readiness, String> {
        let trimmed = text.trim();
        match trimmed {
            "notify" => Ok(Readiness::Notify),
            "listening" => Ok(Readiness::Listening),
            "message" => Ok(Readiness::Message),
            "none" => Ok(Readiness::None),
            _ => match trimmed.strip_prefix("delay:") {
                Some(delay) => parse_duration(delay).map(Readiness::Delay),
                None => Err(format!(
                    "invalid readiness `{text}`: expected \"listening\", \"notify\", \"message\", \"delay:DURATION\" (like \"delay:2s\") or \"none\""
                )),
            },
        }
    }
}

/// Where a worker's stdout or stderr goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OutputTarget {
    /// Read by the primary and printed on its own stdout or stderr with a `web.2 | ` prefix,
    /// and kept for `ustad logs`.
    #[default]
    Relay,
    /// The primary's own stdout or stderr, written by the worker itself (no prefix, nothing
    /// kept for `ustad logs`).
    Inherit,
    /// `/dev/null`.
    Null,
    /// Appended to this file by the primary, with the prefix, rotated by size when the pool
    /// says so (`log_max_size`), reopened on SIGUSR1; kept for `ustad logs` too.
    File(PathBuf),
}

impl fmt::Display for OutputTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputTarget::Relay => f.write_str("relay"),
            OutputTarget::Inherit => f.write_str("inherit"),
            OutputTarget::Null => f.write_str("null"),
            OutputTarget::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl FromStr for OutputTarget {
    type Err = String;
    fn from_str(text: &str) -> Result<OutputTarget, String> {
        let text = text.trim();
        match text {
            "relay" => Ok(OutputTarget::Relay),
            "inherit" => Ok(OutputTarget::Inherit),
            "null" => Ok(OutputTarget::Null),
            _ => match text.strip_prefix("file:") {
                Some(path) if !path.trim().is_empty() => {
                    Ok(OutputTarget::File(PathBuf::from(path.trim())))
                }
                Some(_) => Err("`file:` needs a path, like \"file:/var/log/app.log\"".to_owned()),
                None => Err(format!(
                    "invalid output `{text}`: expected \"relay\", \"inherit\", \"null\" or \"file:PATH\""
                )),
            },
        }
    }
}

/// At most `lines` lines of a worker's output relayed `per` window (journald's
/// `RateLimitBurst`/`RateLimitIntervalSec`): written `"10000/30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRateLimit {
    /// Lines relayed in one window.
    pub lines: u32,
    /// The window.
    pub per: Duration,
}

impl fmt::Display for LogRateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.lines, format_duration(self.per))
    }
}

impl FromStr for LogRateLimit {
    type Err = String;
    fn from_str(text: &str) -> Result<LogRateLimit, String> {
        let invalid = || {
            format!("invalid log rate limit `{text}`: expected LINES/DURATION, like \"10000/30s\"")
        };
        let (lines, per) = text.trim().split_once('/').ok_or_else(invalid)?;
        let lines: u32 = lines.trim().parse().map_err(|_| invalid())?;
        let per = parse_duration(per).map_err(|why| format!("{}: {why}", invalid()))?;
        if lines == 0 {
            return Err(format!(
                "log rate limit `{text}` relays no line at all; use stdout = \"null\" for that"
            ));
        }
        if per.is_zero() {
            return Err(format!(
                "log rate limit `{text}` needs a window longer than 0s"
            ));
        }
        check_duration(per).map_err(|why| format!("log rate limit `{text}`: {why}"))?;
        Ok(LogRateLimit { lines, per })
    }
}

/// What a pool's message channel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpcProtocol {
    /// ustad's framed protocol (`docs/protocol.md`): the Rust library's workers, and workers in
    /// other languages that speak it (`USTAD_IPC_FD`).
    #[default]
    Ustad,
    /// Node's own IPC channel (`NODE_CHANNEL_FD`, JSON lines), as `child_process.fork` opens
    /// it: an unmodified Node app's `process.send()` and `process.on('message')`.
    Node,
}

impl fmt::Display for IpcProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpcProtocol::Ustad => "ustad",
            IpcProtocol::Node => "node",
        })
    }
}

impl FromStr for IpcProtocol {
    type Err = String;
    fn from_str(text: &str) -> Result<IpcProtocol, String> {
        match text.trim() {
            "node" => Ok(IpcProtocol::Node),
            "ustad" => Ok(IpcProtocol::Ustad),
            _ => Err(format!(
                "invalid ipc `{text}`: expected \"node\" (Node's process.send) or \"ustad\" (docs/protocol.md)"
            )),
        }
    }
}

/// Where a socket listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP address: `127.0.0.1:8000`, `[::]:8000`. Port 0 picks a free port.
    Tcp(SocketAddr),
    /// A Unix stream socket path: `unix:/run/app.sock`.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<ListenAddr, String> {
        let trimmed = text.trim();
        if let Some(path) = trimmed.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a path, like \"unix:/run/app.sock\"".to_owned());
            }
            // sun_path holds 108 bytes including the terminating NUL.
            if path.len() > 107 {
                return Err(format!(
                    "unix socket path is {} bytes long; Linux allows at most 107",
                    path.len()
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        trimmed.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!(
                "invalid listen address `{text}`: expected IP:PORT (\"127.0.0.1:8000\", \"[::]:8000\") or \"unix:/path/to.sock\""
            )
        })
    }
}

/// How a socket is shared among the workers that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketMode {
    /// One listening socket; every worker accepts from it.
    #[default]
    Shared,
    /// One `SO_REUSEPORT` socket per slot; the kernel spreads connections across them.
    ReusePort,
    /// The primary accepts and hands each connection to a ready worker over its message
    /// channel (Node's `SCHED_RR`), evening out long-lived connections: library pools only.
    RoundRobin,
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketMode::Shared => "shared",
            SocketMode::ReusePort => "reuseport",
            SocketMode::RoundRobin => "round-robin",
        })
    }
}

impl FromStr for SocketMode {
    type Err = String;
    fn from_str(text: &str) -> Result<SocketMode, String> {
        match text.trim() {
            "shared" => Ok(SocketMode::Shared),
            "reuseport" => Ok(SocketMode::ReusePort),
            "round-robin" => Ok(SocketMode::RoundRobin),
            _ => Err(format!(
                "invalid socket mode `{text}`: expected \"shared\", \"reuseport\" or \"round-robin\""
            )),
        }
    }
}

/// A signal, by name (`"SIGTERM"`, `"TERM"`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(i32);

/// The signals a user may name, with their Linux numbers.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ABRT", libc::SIGABRT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("WINCH", libc::SIGWINCH),
];

impl Signal {
    /// SIGTERM, the default stop signal.
    pub const TERM: Signal = Signal(libc::SIGTERM);
    /// SIGKILL.
    pub const KILL: Signal = Signal(libc::SIGKILL);
    /// SIGINT.
    pub const INT: Signal = Signal(libc::SIGINT);
    /// SIGQUIT.
    pub const QUIT: Signal = Signal(libc::SIGQUIT);
    /// SIGABRT.
    pub const ABRT: Signal = Signal(libc::SIGABRT);

    /// The signal's number.
    pub fn number(self) -> i32 {
        self.0
    }

    /// The signal for a number, if it is a valid one (1..=64).
    pub fn from_number(number: i32) -> Option<Signal> {
        (1..=64).contains(&number).then_some(Signal(number))
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match SIGNALS.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => write!(f, "SIG{name}"),
            None => write!(f, "signal {}", self.0),
        }
    }
}

/// Written as its number (as text, which [`FromStr`] reads back): a name is not known for every
/// number.
impl serde::Serialize for Signal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl FromStr for Signal {
    type Err = String;
    fn from_str(text: &str) -> Result<Signal, String> {
        let trimmed = text.trim();
        if let Ok(number) = trimmed.parse::<i32>() {
            return Signal::from_number(number)
                .ok_or_else(|| format!("invalid signal number {number}"));
        }
        let upper = trimmed.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        SIGNALS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, number)| Signal(*number))
            .ok_or_else(|| {
                format!(
                    "unknown signal `{text}`: expected a name such as \"SIGTERM\", \"SIGINT\" or \"SIGQUIT\""
                )
            })
    }
}

/// The program a pool runs and its arguments. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command(Vec<String>);

impl Command {
    /// A command from its words; an error if there are none or the program is empty.
    pub fn new<I, S>(words: I) -> Result<Command, String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let words: Vec<String> = words.into_iter().map(Into::into).collect();
        match words.first() {
            None => Err("the command is empty: name the program to run".to_owned()),
            Some(program) if program.trim().is_empty() => {
                Err("the command's program is an empty string".to_owned())
            }
            Some(_) if words.iter().any(|w| w.contains('\0')) => {
                Err("the command contains a NUL byte".to_owned())
            }
            Some(_) => Ok(Command(words)),
        }
    }

    /// Splits a command line the way a POSIX shell would split words (quotes, escapes), but
    /// runs no shell: no variables, globs or pipes.
    pub fn parse_line(line: &str) -> Result<Command, String> {
        let words = shell_words::split(line)
            .map_err(|error| format!("cannot split command `{line}`: {error}"))?;
        Command::new(words)
    }

    /// The program: a path, or a name looked up in `PATH`.
    pub fn program(&self) -> &str {
        &self.0[0]
    }

    /// The arguments after the program.
    pub fn args(&self) -> &[String] {
        &self.0[1..]
    }

    /// All words, program first.
    pub fn words(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shell_words::join(&self.0))
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandVisitor;
        impl<'de> Visitor<'de> for CommandVisitor {
            type Value = Command;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a command: an array of strings, or one string split like a shell line")
            }
            fn visit_str<E: de::Error>(self, line: &str) -> Result<Command, E> {
                Command::parse_line(line).map_err(E::custom)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Command, A::Error> {
                let mut words = Vec::new();
                while let Some(word) = seq.next_element::<String>()? {
                    words.push(word);
                }
                Command::new(words).map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_any(CommandVisitor)
    }
}

macro_rules! deserialize_from_str {
    ($($ty:ty => $what:literal),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct FromStrVisitor;
                impl Visitor<'_> for FromStrVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, text: &str) -> Result<$ty, E> {
                        text.parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(FromStrVisitor)
            }
        }
    )*};
}

deserialize_from_str! {
    Readiness => "\"listening\", \"notify\", \"message\", \"delay:DURATION\" or \"none\"",
    IpcProtocol => "\"node\" or \"ustad\"",
    OutputTarget => "\"relay\", \"inherit\", \"null\" or \"file:PATH\"",
    ListenAddr => "a listen address string like \"127.0.0.1:8000\" or \"unix:/run/app.sock\"",
    SocketMode => "\"shared\", \"reuseport\" or \"round-robin\"",
    Signal => "a signal name string like \"SIGTERM\"",
    ByteSize => "an amount of memory string like \"512MiB\"",
    LogRateLimit => "a rate string like \"10000/30s\"",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units_and_accept_compound_forms() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(
            parse_duration("30")
                .unwrap_err()
                .contains("expected a number with a unit")
        );
        assert!(parse_duration("soon").is_err());
    }

    /// Found by review, confirmed by `fuzz/fuzz_targets/config.rs`: humantime reads up to 2^64
    /// seconds, and the plan's `now + kill_timeout` (or a `stop` request's timeout) panicked
    /// on the overflow of `Instant` beyond 2^63.
    #[test]
    fn durations_are_bounded_by_what_64_bit_microseconds_hold() {
        assert_eq!(
            parse_duration("584542y"),
            Ok(Duration::from_secs(584_542 * SECONDS_PER_YEAR))
        );
        let error = parse_duration("584543y").unwrap_err();
        assert!(
            error.starts_with(
                "invalid duration `584543y`: longer than ustad can count (584542 years at most"
            ),
            "{error}"
        );
        assert!(parse_duration("500000000000y").is_err());
        assert_eq!(check_duration(MAX_DURATION), Ok(MAX_DURATION));
        assert!(check_duration(MAX_DURATION + Duration::from_nanos(1)).is_err());
        assert!(check_duration(Duration::MAX).is_err());
        // What the bound is for: a deadline beyond every duration still fits an `Instant`,
        // and `WATCHDOG_USEC` fits systemd's `usec_t`.
        let far = MAX_DURATION.mul_f64(1.1) + MAX_DURATION;
        assert!(std::time::Instant::now().checked_add(far).is_some());
        assert!(u64::try_from(MAX_DURATION.as_micros()).is_ok_and(|us| us < u64::MAX));
        // What ustad writes, it reads back.
        assert_eq!(
            parse_duration(&format_duration(MAX_DURATION)),
            Ok(MAX_DURATION)
        );
    }

    #[test]
    fn size_is_a_count_or_auto() {
        assert_eq!("4".parse::<Size>(), Ok(Size::fixed(4).unwrap()));
        assert_eq!("auto".parse::<Size>(), Ok(Size::Auto));
        // 0: defined, started later by scaling.
        assert_eq!("0".parse::<Size>(), Ok(Size::Fixed(0)));
        assert!("-2".parse::<Size>().unwrap_err().contains("0 or more"));
        assert!("lots".parse::<Size>().is_err());
        assert!(Size::Auto.count() >= 1);
    }

    #[test]
    fn readiness_forms() {
        assert_eq!("notify".parse::<Readiness>(), Ok(Readiness::Notify));
        assert_eq!("listening".parse::<Readiness>(), Ok(Readiness::Listening));
        assert_eq!(Readiness::Listening.to_string(), "listening");
        assert_eq!("none".parse::<Readiness>(), Ok(Readiness::None));
        assert_eq!(
            "delay:2s".parse::<Readiness>(),
            Ok(Readiness::Delay(Duration::from_secs(2)))
        );
        assert!("delay:".parse::<Readiness>().is_err());
        assert!("ready".parse::<Readiness>().unwrap_err().contains("notify"));
        assert_eq!(
            Readiness::Delay(Duration::from_secs(2)).to_string(),
            "delay:2s"
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:8000".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:8000".parse().unwrap()))
        );
        assert_eq!(
            "[::]:8000".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("[::]:8000".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/app.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/run/app.sock".into()))
        );
        assert!("localhost:8000".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!(
            format!("unix:/{}", "a".repeat(120))
                .parse::<ListenAddr>()
                .is_err()
        );
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!("SIGTERM".parse::<Signal>(), Ok(Signal::TERM));
        assert_eq!("term".parse::<Signal>(), Ok(Signal::TERM));
        assert_eq!("15".parse::<Signal>(), Ok(Signal::TERM));
        assert_eq!("SIGQUIT".parse::<Signal>().unwrap().to_string(), "SIGQUIT");
        assert!("SIGFOO".parse::<Signal>().is_err());
        assert!("0".parse::<Signal>().is_err());
    }

    #[test]
    fn commands_split_like_a_shell_but_run_none() {
        let command = Command::parse_line("python3 -c 'print(1)'").unwrap();
        assert_eq!(command.program(), "python3");
        assert_eq!(command.args(), ["-c", "print(1)"]);
        assert!(Command::parse_line("").is_err());
        assert!(Command::parse_line("'unclosed").is_err());
        assert!(Command::new(Vec::<String>::new()).is_err());
        assert!(Command::new([""]).is_err());
    }

    #[test]
    fn memory_amounts_in_binary_and_decimal_units() {
        assert_eq!("512MiB".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("200M".parse(), Ok(ByteSize(200 << 20)));
        assert_eq!("1.5G".parse(), Ok(ByteSize(3 << 29)));
        assert_eq!("800MB".parse(), Ok(ByteSize(800_000_000)));
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!(" 2 gib ".parse(), Ok(ByteSize(2 << 30)));
        assert!("lots".parse::<ByteSize>().unwrap_err().contains("`lots`"));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("0".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.5GiB");
        assert_eq!(ByteSize(100).to_string(), "100B");
    }
}
