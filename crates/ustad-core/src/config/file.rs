//! `ustad.toml`: the raw file schema, and its translation into a [`Config`] that remembers
//! where each value was written, so validation errors can name the line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use super::value::{
    Budget, ByteSize, Command, DurationValue, IpcProtocol, ListenAddr, LogRateLimit, OutputTarget,
    Readiness, Signal, Size, SocketMode,
};
use super::{
    Config, ConfigError, DEFAULT_BACKLOG, Diagnostic, IpcSpec, Location, PoolSpec, SocketSpec,
    SpanTable,
};

/// Settings that may be given at the top level as defaults for every pool.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    kill_timeout: Option<DurationValue>,
    restart_delay: Option<DurationValue>,
    ready: Option<Readiness>,
    ready_timeout: Option<DurationValue>,
    min_uptime: Option<DurationValue>,
    stop_signal: Option<Signal>,
    ttl: Option<DurationValue>,
    strict: Option<bool>,
    max_surge: Option<Budget>,
    max_unavailable: Option<Budget>,
    silent: Option<bool>,
    max_memory: Option<ByteSize>,
    watchdog: Option<DurationValue>,
    preload: Option<bool>,
    #[serde(default)]
    sockets: IndexMap<Spanned<String>, Spanned<RawSocket>>,
    #[serde(default)]
    pools: IndexMap<Spanned<String>, Spanned<RawPool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocket {
    listen: Spanned<ListenAddr>,
    mode: Option<Spanned<SocketMode>>,
    backlog: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    command: Spanned<Command>,
    size: Option<Spanned<Size>>,
    #[serde(default)]
    sockets: Vec<Spanned<String>>,
    ready: Option<Spanned<Readiness>>,
    ready_timeout: Option<Spanned<DurationValue>>,
    #[serde(default)]
    env: IndexMap<Spanned<String>, EnvValue>,
    cwd: Option<PathBuf>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    oneshot: Option<bool>,
    before_start: Option<Spanned<Command>>,
    before_start_timeout: Option<Spanned<DurationValue>>,
    ttl: Option<Spanned<DurationValue>>,
    strict: Option<Spanned<bool>>,
    max_surge: Option<Spanned<Budget>>,
    max_unavailable: Option<Spanned<Budget>>,
    kill_timeout: Option<DurationValue>,
    restart_delay: Option<DurationValue>,
    min_uptime: Option<DurationValue>,
    stop_signal: Option<Signal>,
    silent: Option<bool>,
    stdout: Option<Spanned<OutputTarget>>,
    stderr: Option<Spanned<OutputTarget>>,
    log_max_size: Option<Spanned<ByteSize>>,
    log_keep: Option<u32>,
    log_rate_limit: Option<Spanned<LogRateLimit>>,
    max_memory: Option<ByteSize>,
    watchdog: Option<Spanned<DurationValue>>,
    ipc: Option<Spanned<IpcProtocol>>,
    stop_grace: Option<Spanned<DurationValue>>,
    preload: Option<bool>,
    watch: Option<Spanned<Vec<PathBuf>>>,
    #[serde(default)]
    watch_ignore: Vec<String>,
}

/// An environment value: a string, or a number or boolean written without quotes
/// (`PORT = 3000`), which is passed on as its text.
#[derive(Debug)]
struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvVisitor;
        impl Visitor<'_> for EnvVisitor {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EnvValue, E> {
                Ok(EnvValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(EnvVisitor)
    }
}

/// At most this many problems are reported from one file.
const MAX_PROBLEMS: usize = 50;

/// Parses and validates `text`, read from `path`. Every problem is reported, not the first
/// only: a line the parser refuses is set aside (blanked, so that positions stay those of
/// the file) and the rest parsed again, until it parses; then what validation finds in the
/// rest is added.
pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let mut diagnostics: Vec<(usize, Diagnostic)> = Vec::new();
    let mut rest = text.to_owned();
    let raw = loop {
        match toml::from_str::<RawConfig>(&rest) {
            Ok(raw) => break Some(raw),
            Err(error) => {
                let message = error.message().to_owned();
                // A field set aside is missing now: not a problem of the file.
                if !diagnostics.is_empty() && message.starts_with("missing field") {
                    break None;
                }
                let Some(span) = error.span() else {
                    diagnostics.push((0, Diagnostic::unlocated(&origin, message)));
                    break None;
                };
                diagnostics.push((
                    span.start,
                    Diagnostic::at_span(&origin, text, span.clone(), message),
                ));
                if diagnostics.len() >= MAX_PROBLEMS || !blank_setting(&mut rest, &span) {
                    break None;
                }
            }
        }
    };
    let base_dir = path.parent().unwrap_or(Path::new("."));
    if let Some(raw) = raw {
        let (config, spans) = resolve(raw, base_dir);
        match config.validate() {
            Ok(()) if diagnostics.is_empty() => return Ok(config),
            Ok(()) => {}
            Err(problems) => {
                diagnostics.extend(problems.into_iter().map(
                    |problem| match spans.get(&problem.at) {
                        Some(span) => (
                            span.start,
                            Diagnostic::at_span(&origin, text, span.clone(), problem.message),
                        ),
                        None => (0, Diagnostic::unlocated(&origin, problem.to_string())),
                    },
                ));
            }
        }
    }
    diagnostics.sort_by_key(|(start, _)| *start);
    Err(ConfigError::Invalid {
        diagnostics: diagnostics.into_iter().map(|(_, d)| d).collect(),
    })
}

/// Blanks the `key = value` line holding `span` in `text` (spaces, so every other position is
/// unchanged), so that parsing can go on past it. `false` when the span is not within one such
/// line (a table header, a value over several lines, a syntax error): nothing more can be found.
fn blank_setting(text: &mut String, span: &std::ops::Range<usize>) -> bool {
    let Some(before) = text.get(..span.start) else {
        return false;
    };
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[start..end];
    let setting = !line.trim_start().starts_with('[')
        && line.contains('=')
        && span.end <= end
        && toml::from_str::<toml::Table>(line).is_ok();
    if !setting {
        return false;
    }
    let blank = " ".repeat(end - start);
    text.replace_range(start..end, &blank);
    true
}

/// Turns the raw file into a [`Config`], applying top-level defaults, and records where each
/// checked value was written.
fn resolve(raw: RawConfig, base_dir: &Path) -> (Config, SpanTable) {
    let mut spans = SpanTable::new();
    let mut config = Config::default();

    for (name, socket) in raw.sockets {
        let name_span = name.span();
        let name = name.into_inner();
        let socket_span = socket.span();
        let socket = socket.into_inner();
        spans.insert(Location::Socket(name.clone()), name_span);
        spans.insert(
            Location::SocketField(name.clone(), "listen"),
            socket.listen.span(),
        );
        if let Some(mode) = &socket.mode {
            spans.insert(Location::SocketField(name.clone(), "mode"), mode.span());
        }
        spans.insert(
            Location::SocketField(name.clone(), "backlog"),
            socket.backlog.as_ref().map_or(socket_span, Spanned::span),
        );
        let spec = SocketSpec {
            listen: socket.listen.into_inner(),
            mode: socket.mode.map(Spanned::into_inner).unwrap_or_default(),
            backlog: socket.backlog.map_or(DEFAULT_BACKLOG, Spanned::into_inner),
        };
        config.sockets.insert(name, spec);
    }

    for (name, pool) in raw.pools {
        let name_span = name.span();
        let name = name.into_inner();
        let pool = pool.into_inner();
        spans.insert(Location::Pool(name.clone()), name_span.clone());
        let field = |field: &'static str| Location::PoolField(name.clone(), field);
        spans.insert(field("command"), pool.command.span());
        let mut spec = PoolSpec::new(pool.command.into_inner());
        if let Some(size) = pool.size {
            spans.insert(field("size"), size.span());
            spec.size = size.into_inner();
        }
        for (index, socket) in pool.sockets.iter().enumerate() {
            spans.insert(Location::PoolSocket(name.clone(), index), socket.span());
        }
        spec.sockets = pool.sockets.into_iter().map(Spanned::into_inner).collect();
        if let Some(ipc) = pool.ipc {
            spans.insert(field("ipc"), ipc.span());
            spec.ipc = Some(IpcSpec::new(ipc.into_inner()));
        }
        if let Some(grace) = pool.stop_grace {
            spans.insert(field("stop_grace"), grace.span());
            spec.stop_grace = grace.into_inner().0;
        }
        // A pool-level value wins over the top-level default, which wins over the built-in one.
        let ready = pool.ready.map(|r| {
            spans.insert(field("ready"), r.span());
            r.into_inner()
        });
        spec.ready = match ready.or(raw.ready) {
            Some(ready) => ready,
            None => config.default_readiness(&spec),
        };
        let ready_timeout = pool.ready_timeout.map(|t| {
            spans.insert(field("ready_timeout"), t.span());
            t.into_inner()
        });
        if let Some(timeout) = ready_timeout.or(raw.ready_timeout) {
            spec.ready_timeout = timeout.0;
        }
        for (key, value) in pool.env {
            spans.insert(
                Location::PoolEnv(name.clone(), key.get_ref().clone()),
                key.span(),
            );
            spec.env.insert(key.into_inner(), value.0);
        }
        spec.cwd = pool.cwd.map(|cwd| base_dir.join(cwd));
        for (index, dependency) in pool.after.iter().enumerate() {
            spans.insert(Location::PoolAfter(name.clone(), index), dependency.span());
        }
        spec.after = pool.after.into_iter().map(Spanned::into_inner).collect();
        spec.oneshot = pool.oneshot.unwrap_or(false);
        if let Some(command) = pool.before_start {
            spans.insert(field("before_start"), command.span());
            spec.before_start = Some(command.into_inner());
        }
        if let Some(timeout) = pool.before_start_timeout {
            spans.insert(field("before_start_timeout"), timeout.span());
            spec.before_start_timeout = timeout.into_inner().0;
        }
        if let Some(user) = pool.user {
            spans.insert(field("user"), user.span());
            spec.user = Some(user.into_inner());
        }
        if let Some(group) = pool.group {
            spans.insert(field("group"), group.span());
            spec.group = Some(group.into_inner());
        }
        let ttl = pool.ttl.map(|t| {
            spans.insert(field("ttl"), t.span());
            t.into_inner()
        });
        spec.ttl = ttl.or(raw.ttl).map(|t| t.0);
        let mut spanned = |key, span: std::ops::Range<usize>| {
            spans.insert(field(key), span);
        };
        if let Some(strict) = pool.strict {
            spanned("strict", strict.span());
            spec.strict = strict.into_inner();
        } else if let Some(strict) = raw.strict {
            spec.strict = strict;
        }
        spec.max_surge = match pool.max_surge {
            Some(surge) => {
                spanned("max_surge", surge.span());
                Some(surge.into_inner())
            }
            None => raw.max_surge,
        };
        spec.max_unavailable = match pool.max_unavailable {
            Some(unavailable) => {
                spanned("max_unavailable", unavailable.span());
                Some(unavailable.into_inner())
            }
            None => raw.max_unavailable,
        };
        spec.silent = pool.silent.or(raw.silent).unwrap_or(spec.silent);
        // A relative log file is relative to this file, as `cwd` is.
        let output = |target: OutputTarget| match target {
            OutputTarget::File(path) => OutputTarget::File(base_dir.join(path)),
            other => other,
        };
        if let Some(stdout) = pool.stdout {
            spans.insert(field("stdout"), stdout.span());
            spec.stdout = output(stdout.into_inner());
        }
        if let Some(stderr) = pool.stderr {
            spans.insert(field("stderr"), stderr.span());
            spec.stderr = output(stderr.into_inner());
        }
        if let Some(size) = pool.log_max_size {
            spans.insert(field("log_max_size"), size.span());
            spec.log_max_size = Some(size.into_inner());
        }
        if let Some(limit) = pool.log_rate_limit {
            spans.insert(field("log_rate_limit"), limit.span());
            spec.log_rate_limit = Some(limit.into_inner());
        }
        if let Some(keep) = pool.log_keep {
            spec.log_keep = keep;
        }
        spec.preload = pool.preload.or(raw.preload).unwrap_or(spec.preload);
        if let Some(watch) = pool.watch {
            spans.insert(field("watch"), watch.span());
            // Relative to this file, as `cwd` is.
            spec.watch = watch
                .into_inner()
                .iter()
                .map(|path| base_dir.join(path))
                .collect();
        }
        spec.watch_ignore = pool.watch_ignore;
        spec.max_memory = pool.max_memory.or(raw.max_memory);
        let watchdog = pool.watchdog.map(|t| {
            spans.insert(field("watchdog"), t.span());
            t.into_inner()
        });
        spec.watchdog = watchdog.or(raw.watchdog).map(|t| t.0);
        if let Some(t) = pool.kill_timeout.or(raw.kill_timeout) {
            spec.kill_timeout = t.0;
        }
        if let Some(t) = pool.restart_delay.or(raw.restart_delay) {
            spec.restart_delay = t.0;
        }
        if let Some(t) = pool.min_uptime.or(raw.min_uptime) {
            spec.min_uptime = t.0;
        }
        spec.stop_signal = pool
            .stop_signal
            .or(raw.stop_signal)
            .unwrap_or(spec.stop_signal);
        // Problems of a field that was not written in this pool point at the pool's name.
        for field_name in [
            "ready",
            "ready_timeout",
            "ttl",
            "watchdog",
            "ipc",
            "stop_grace",
            "strict",
            "max_surge",
            "max_unavailable",
            "silent",
            "log_keep",
            "after",
        ] {
            spans
                .entry(Location::PoolField(name.clone(), field_name))
                .or_insert_with(|| name_span.clone());
        }
        config.pools.insert(name, spec);
    }
    (config, spans)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("/etc/app/ustad.toml")).map_err(|e| e.to_string())
    }

    const FULL: &str = r#"
kill_timeout = "30s"
restart_delay = "1s"

[sockets.http]
listen = "127.0.0.1:8000"
mode = "shared"
backlog = 1024

[sockets.admin]
listen = "unix:/run/app.sock"

[pools.web]
command = ["node", "app.js"]
size = 4
sockets = ["http", "admin"]
ready = "notify"
ready_timeout = "30s"
env = { NODE_ENV = "production", PORT = 3000 }
cwd = "app"
ttl = "1h"
strict = false
kill_timeout = "60s"
restart_delay = "2s"
stop_signal = "SIGTERM"
silent = false

[pools.jobs]
command = "python3 worker.py --queue 'high prio'"
size = "auto"
"#;

    #[test]
    fn every_problem_of_a_file_is_reported_with_its_place() {
        let text = "[pools.web]\ncommand = \"x\"\nsize = -3\nbogus = 1\n\n[pools.jobs]\ncommand = \"y\"\nready = \"sometimes\"\n[pools.cron]\ncommand = \"z\"\nttl = \"0s\"\n";
        let error = load(text).unwrap_err();
        assert!(
            error.contains("ustad.toml:3:8: size must be 0 or more"),
            "{error}"
        );
        assert!(
            error.contains("ustad.toml:4:1: unknown field `bogus`"),
            "{error}"
        );
        assert!(
            error.contains("ustad.toml:8:9: invalid readiness `sometimes`"),
            "{error}"
        );
        // What validation finds in the rest comes too.
        assert!(
            error.contains("ustad.toml:11:7: ttl must be longer than 0s"),
            "{error}"
        );
        // A syntax error ends the search: what follows it cannot be read.
        let error = load("[pools.web\ncommand = \"x\"\n").unwrap_err();
        assert_eq!(error.matches("ustad.toml:").count(), 1, "{error}");
    }

    #[test]
    fn watched_paths_are_relative_to_the_file_and_not_for_oneshot_pools() {
        let config = load(
            "[pools.web]\ncommand = \"node app.js\"\nwatch = [\"src\", \"/srv/shared\"]\nwatch_ignore = [\"dist\"]\n",
        )
        .unwrap();
        let web = &config.pools["web"];
        assert_eq!(
            web.watch,
            [Path::new("/etc/app/src"), Path::new("/srv/shared")]
        );
        assert_eq!(web.watch_ignore, ["dist"]);
        let error = load("[pools.migrate]\ncommand = \"x\"\noneshot = true\nwatch = [\"db\"]\n")
            .unwrap_err();
        assert!(
            error.contains(
                "ustad.toml:4:9: `watch` rolls a pool when its files change, but a `oneshot` pool"
            ),
            "{error}"
        );
    }

    #[test]
    fn the_documented_example_loads_with_defaults_applied() {
        let config = load(FULL).unwrap();
        assert_eq!(config.sockets.len(), 2);
        assert_eq!(
            config.sockets["admin"].listen,
            ListenAddr::Unix("/run/app.sock".into())
        );
        let web = &config.pools["web"];
        assert_eq!(web.command.words(), ["node", "app.js"]);
        assert_eq!(web.size, Size::fixed(4).unwrap());
        assert_eq!(web.sockets, ["http", "admin"]);
        assert_eq!(web.ready, Readiness::Notify);
        assert_eq!(web.env["PORT"], "3000");
        assert_eq!(web.cwd.as_deref(), Some(Path::new("/etc/app/app")));
        assert_eq!(web.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(web.kill_timeout, Duration::from_secs(60));
        assert_eq!(web.restart_delay, Duration::from_secs(2));
        let jobs = &config.pools["jobs"];
        assert_eq!(
            jobs.command.words(),
            ["python3", "worker.py", "--queue", "high prio"]
        );
        assert_eq!(jobs.size, Size::Auto);
        assert_eq!(
            jobs.kill_timeout,
            Duration::from_secs(30),
            "top-level default"
        );
        assert_eq!(
            jobs.restart_delay,
            Duration::from_secs(1),
            "top-level default"
        );
        assert_eq!(config.pools.keys().collect::<Vec<_>>(), ["web", "jobs"]);
        assert_eq!(config.summary(), "2 sockets, 2 pools: web ×4, jobs ×auto");
    }

    /// Each bad config names the file, line and column of the offending value.
    #[test]
    fn every_error_has_file_line_and_column() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[pools.web]\ncommand = [\"a\"]\nsizes = 2\n",
                "ustad.toml:3:1: unknown field `sizes`",
                "unknown key",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nkill_timeout = \"soon\"\n",
                "ustad.toml:3:16: invalid duration `soon`",
                "bad duration",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nkill_timeout = 30\n",
                "ustad.toml:3:16: a duration needs a unit",
                "duration without unit",
            ),
            (
                "[sockets.http]\nlisten = \"127.0.0.1:8000\"\n[pools.web]\ncommand = [\"a\"]\nsockets = [\"htp\"]\n",
                "ustad.toml:5:12: unknown socket `htp` (defined sockets: http)",
                "unknown socket",
            ),
            (
                "[pools.web]\ncommand = []\n",
                "ustad.toml:2:11: the command is empty",
                "empty command",
            ),
            (
                "[pools.web]\ncommand = \"  \"\n",
                "ustad.toml:2:11: the command is empty",
                "blank command string",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nafter = [\"db\"]\n",
                "ustad.toml:3:10: unknown pool `db` (defined pools: web)",
                "unknown dependency",
            ),
            (
                "[pools.a]\ncommand = [\"a\"]\nafter = [\"b\"]\n[pools.b]\ncommand = [\"b\"]\nafter = [\"a\"]\n",
                "ustad.toml:1:8: pools wait for each other and none could start: a → b → a",
                "dependency cycle",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nsize = -1\n",
                "ustad.toml:3:8: size must be 0 or more",
                "negative size",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nsize = 4294967296\n",
                "ustad.toml:3:8: size 4294967296 is more workers than this machine can run processes",
                "size beyond the processes a machine can run",
            ),
            (
                "[sockets.a]\nlisten = \"127.0.0.1:8000\"\n[sockets.b]\nlisten = \"127.0.0.1:8000\"\n[pools.web]\ncommand = [\"a\"]\n",
                "ustad.toml:4:10: `127.0.0.1:8000` is already used by socket `a`",
                "duplicate listen address",
            ),
            (
                "[sockets.a]\nlisten = \"0.0.0.0:8000\"\n[sockets.b]\nlisten = \"127.0.0.1:8000\"\n[pools.web]\ncommand = [\"a\"]\n",
                "ustad.toml:4:10: `127.0.0.1:8000` is already used by socket `a`",
                "wildcard overlaps",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nkill_timeout = \"600000y\"\n",
                "ustad.toml:3:16: invalid duration `600000y`: longer than ustad can count (584542 years at most",
                "duration beyond 64-bit microseconds",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nwatchdog = \"500ns\"\n",
                "ustad.toml:3:12: watchdog must be at least 1us",
                "watchdog below what WATCHDOG_USEC can say",
            ),
            (
                "[pools.web]\nsize = 2\n",
                "ustad.toml:1:1: missing field `command`",
                "missing command",
            ),
            (
                "",
                "ustad.toml: configuration: no pools defined",
                "no pools",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nready = \"yes\"\n",
                "ustad.toml:3:9: invalid readiness `yes`",
                "bad readiness",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nready = \"delay:40s\"\n",
                "ustad.toml:3:9: the ready delay (40s) must be shorter than ready_timeout (30s)",
                "delay longer than timeout",
            ),
            (
                "[pools.\"web:1\"]\ncommand = [\"a\"]\n",
                "ustad.toml:1:8: invalid name `web:1`",
                "bad pool name",
            ),
            (
                "[sockets.u]\nlisten = \"unix:/tmp/x.sock\"\nmode = \"reuseport\"\n[pools.web]\ncommand = [\"a\"]\n",
                "ustad.toml:3:8: mode = \"reuseport\" needs a TCP address",
                "reuseport on unix",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\nstop_signal = \"SIGNOPE\"\n",
                "ustad.toml:3:15: unknown signal `SIGNOPE`",
                "bad signal",
            ),
            (
                "[pools.web]\ncommand = [\"a\"]\n[pools.web]\n",
                "ustad.toml:3:8: duplicate key",
                "duplicate pool",
            ),
            (
                "[pools.web]\ncommand = [\"a\"\n",
                "ustad.toml:2:",
                "syntax error",
            ),
        ];
        for (text, expected, case) in cases {
            let error = Config::from_toml(text, Path::new("ustad.toml"))
                .expect_err(case)
                .to_string();
            assert!(
                error.starts_with(expected),
                "{case}: expected an error starting with\n  {expected}\ngot\n  {error}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = "[pools.web]\ncommand = [\"a\"]\nsockets = [\"x\", \"y\"]\n";
        let error = Config::from_toml(text, Path::new("u.toml")).unwrap_err();
        let ConfigError::Invalid { diagnostics } = error else {
            panic!("expected Invalid")
        };
        let positions: Vec<_> = diagnostics.iter().map(|d| d.position).collect();
        assert_eq!(positions, [Some((3, 12)), Some((3, 17))]);
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let error = Config::from_file("/nonexistent/ustad.toml").unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert!(error.to_string().contains("/nonexistent/ustad.toml"));
    }

    #[test]
    fn preload_is_on_unless_a_pool_or_the_top_level_turns_it_off() {
        let text = "[sockets.http]\nlisten = \"127.0.0.1:0\"\n\n[pools.web]\ncommand = \"node app.js\"\nsockets = [\"http\"]\n\n[pools.go]\ncommand = \"./server\"\nsockets = [\"http\"]\npreload = false\n";
        let config = load(text).unwrap();
        assert!(config.pools["web"].preload);
        assert!(!config.pools["go"].preload);
        let config = load(&format!("preload = false\n{text}")).unwrap();
        assert!(!config.pools["web"].preload, "top-level default");
        let error = load(&text.replace("preload = false", "preload = \"no\"")).unwrap_err();
        assert!(error.contains(":11:11:"), "{error}");
    }

    #[test]
    fn a_round_robin_socket_needs_library_workers() {
        let error = load(
            "[sockets.http]\nlisten = \"127.0.0.1:0\"\nmode = \"round-robin\"\n\n[pools.web]\ncommand = \"app\"\nsockets = [\"http\"]\n",
        )
        .unwrap_err();
        assert!(error.contains(":7:12:"), "{error}");
        assert!(
            error.contains("only workers of the Rust library have"),
            "{error}"
        );
        let mode =
            load("[sockets.http]\nlisten = \"127.0.0.1:0\"\nmode = \"roundrobin\"\n").unwrap_err();
        assert!(mode.contains("\"round-robin\""), "{mode}");
    }

    #[test]
    fn before_start_is_a_command_with_a_timeout_longer_than_zero() {
        let config = load(
            "[pools.web]\ncommand = \"app\"\nbefore_start = \"npm run build\"\nbefore_start_timeout = \"2m\"\n",
        )
        .unwrap();
        let web = &config.pools["web"];
        let hook = web.before_start.as_ref().unwrap();
        assert_eq!(
            (hook.program(), hook.args()),
            ("npm", &["run".to_owned(), "build".to_owned()][..])
        );
        assert_eq!(
            web.before_start_timeout,
            std::time::Duration::from_secs(120)
        );
        let error = load("[pools.web]\ncommand = \"app\"\nbefore_start = []\n").unwrap_err();
        assert!(error.contains(":3:16: the command is empty"), "{error}");
        let error = load(
            "[pools.web]\ncommand = \"app\"\nbefore_start = \"make\"\nbefore_start_timeout = \"0s\"\n",
        )
        .unwrap_err();
        assert!(
            error.contains(":4:24: before_start_timeout must be longer than 0s"),
            "{error}"
        );
    }

    #[test]
    fn a_log_rate_limit_is_lines_per_window() {
        let config =
            load("[pools.web]\ncommand = \"app\"\nlog_rate_limit = \"10000/30s\"\n").unwrap();
        let limit = config.pools["web"].log_rate_limit.unwrap();
        assert_eq!(
            (limit.lines, limit.per),
            (10_000, std::time::Duration::from_secs(30))
        );
        for (text, says) in [
            ("\"fast\"", "expected LINES/DURATION"),
            ("\"0/1s\"", "relays no line at all"),
            ("\"10/0s\"", "longer than 0s"),
            ("\"10/soon\"", "invalid duration"),
        ] {
            let error = load(&format!(
                "[pools.web]\ncommand = \"app\"\nlog_rate_limit = {text}\n"
            ))
            .unwrap_err();
            assert!(error.contains(":3:18:") && error.contains(says), "{error}");
        }
    }
}
