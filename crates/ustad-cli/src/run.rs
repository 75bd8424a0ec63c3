//! `ustad run`: turns a config file, flags or the demo defaults into a [`Config`] and runs
//! the supervisor on a current-thread runtime.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ustad_core::config::{
    Command, Config, ConfigError, Diagnostic, ListenAddr, Location, PoolSpec, Readiness, Size,
    SocketMode, SocketSpec,
};
use ustad_core::output::OutputStyle;
use ustad_core::supervisor::{self, Options, SupervisorError};

use crate::cli::{PoolFlags, RunArgs};
use crate::exit::{Failure, USAGE};

/// The address the demo listens on unless `--listen` says otherwise.
pub(crate) const DEMO_LISTEN: &str = "127.0.0.1:8000";

/// Where the configuration came from, which decides what SIGHUP re-reads.
pub(crate) enum Source {
    File(PathBuf),
    Flags,
}

/// Builds the configuration `ustad run` was asked for: a single argument ending in `.toml`
/// is a config file; anything else is the command of a one-pool cluster; nothing is the demo.
pub(crate) fn config_from_args(args: &RunArgs) -> Result<(Config, Source), Failure> {
    match source_of(args)? {
        Source::Flags => {
            let config = config_from_flags(&args.pool, &args.args)?;
            Ok((config, Source::Flags))
        }
        Source::File(path) => {
            let config = Config::from_file(&path).map_err(config_failure)?;
            Ok((config, Source::File(path)))
        }
    }
}

/// Where the configuration comes from, without reading it.
fn source_of(args: &RunArgs) -> Result<Source, Failure> {
    let config_file = match args.args.as_slice() {
        [only] if only.ends_with(".toml") => Some(PathBuf::from(only)),
        [first, rest @ ..] if first.ends_with(".toml") => {
            return Err(Failure::usage(format!(
                "a config file takes no command (got `{}` after {first}); give the command in the pool's `command`",
                rest.join(" ")
            )));
        }
        _ => None,
    };
    let Some(path) = config_file else {
        return Ok(Source::Flags);
    };
    let given = args.pool.given();
    if !given.is_empty() {
        return Err(Failure::usage(format!(
            "{} cannot be combined with a config file; set these in {} instead",
            given.join(", "),
            path.display()
        )));
    }
    Ok(Source::File(path))
}

fn config_failure(error: ConfigError) -> Failure {
    match error {
        ConfigError::Read { .. } => Failure::usage(error.to_string()),
        ConfigError::Invalid { .. } => Failure {
            code: USAGE,
            message: error.to_string(),
        },
        _ => Failure::usage(error.to_string()),
    }
}

/// The one-pool configuration that flags describe; without a command, the demo.
pub(crate) fn config_from_flags(flags: &PoolFlags, command: &[String]) -> Result<Config, Failure> {
    let demo = command.is_empty();
    let command = if demo {
        let exe = std::env::current_exe().map_err(|e| {
            Failure::runtime(format!(
                "cannot find the ustad executable to run the demo worker: {e}"
            ))
        })?;
        Command::new([exe.to_string_lossy().into_owned(), "demo-worker".to_owned()])
    } else {
        Command::new(command.iter().cloned())
    }
    .map_err(|e| Failure::usage(format!("command: {e}")))?;

    let mut config = Config::default();
    let listens: Vec<String> = if demo && flags.listen.is_empty() {
        vec![DEMO_LISTEN.to_owned()]
    } else {
        flags.listen.clone()
    };
    for (index, listen) in listens.iter().enumerate() {
        let (name, address) = match listen.split_once('=') {
            Some((name, address)) => (name.to_owned(), address),
            None if index == 0 => ("listen".to_owned(), listen.as_str()),
            None => (format!("listen{index}"), listen.as_str()),
        };
        let address: ListenAddr = address
            .parse()
            .map_err(|e| Failure::usage(format!("--listen {listen}: {e}")))?;
        let mut socket = SocketSpec::new(address);
        if flags.reuseport {
            socket.mode = SocketMode::ReusePort;
        }
        if let Some(backlog) = flags.backlog {
            socket.backlog = backlog;
        }
        if config.sockets.insert(name.clone(), socket).is_some() {
            return Err(Failure::usage(format!(
                "--listen: the name `{name}` is given twice"
            )));
        }
    }
    if flags.reuseport && listens.is_empty() {
        return Err(Failure::usage("--reuseport needs --listen".to_owned()));
    }

    let mut pool = PoolSpec::new(command);
    pool.sockets = config.sockets.keys().cloned().collect();
    pool.size = flags.workers.unwrap_or(if demo {
        Size::Auto
    } else {
        Size::fixed(1).expect("1 > 0")
    });
    pool.ready = match flags.ready {
        Some(ready) => ready,
        None if demo => Readiness::Notify,
        None => config.default_readiness(&pool),
    };
    if let Some(t) = flags.ready_timeout {
        pool.ready_timeout = t;
    }
    if let Some(t) = flags.kill_timeout {
        pool.kill_timeout = t;
    }
    if let Some(t) = flags.restart_delay {
        pool.restart_delay = t;
    }
    if let Some(t) = flags.min_uptime {
        pool.min_uptime = t;
    }
    pool.ttl = flags.ttl;
    pool.max_memory = flags.max_memory;
    pool.watchdog = flags.watchdog;
    pool.strict = flags.strict;
    pool.max_surge = flags.max_surge;
    pool.max_unavailable = flags.max_unavailable;
    pool.silent = flags.silent;
    pool.preload = !flags.no_preload;
    if let Some(protocol) = flags.ipc {
        pool.ipc = Some(ustad_core::config::IpcSpec::new(protocol));
    }
    if let Some(grace) = flags.stop_grace {
        pool.stop_grace = grace;
    }
    if let Some(signal) = flags.stop_signal {
        pool.stop_signal = signal;
    }
    for entry in &flags.env {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(Failure::usage(format!("--env {entry}: expected KEY=VALUE")));
        };
        pool.env.insert(key.to_owned(), value.to_owned());
    }
    pool.cwd = flags.cwd.clone();
    pool.watch = flags
        .watch
        .iter()
        .map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone()))
        .collect();
    pool.watch_ignore = flags.watch_ignore.clone();
    pool.user = flags.user.clone();
    if let Some(target) = &flags.stdout {
        pool.stdout = target.clone();
    }
    if let Some(target) = &flags.stderr {
        pool.stderr = target.clone();
    }
    pool.log_max_size = flags.log_max_size;
    pool.log_rate_limit = flags.log_rate_limit;
    if let Some(keep) = flags.log_keep {
        pool.log_keep = keep;
    }
    pool.group = flags.group.clone();
    pool.before_start = flags.before_start.clone();
    if let Some(timeout) = flags.before_start_timeout {
        pool.before_start_timeout = timeout;
    }
    let name = flags
        .pool
        .clone()
        .unwrap_or_else(|| if demo { "web" } else { "app" }.to_owned());
    config.pools.insert(name, pool);

    config.validate().map_err(|problems| {
        let diagnostics: Vec<Diagnostic> = problems
            .iter()
            .map(|p| Diagnostic::unlocated(flag_for(&p.at), p.message.clone()))
            .collect();
        Failure::usage(
            diagnostics
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })?;
    Ok(config)
}

/// The flag that sets what a problem is about.
fn flag_for(location: &Location) -> String {
    match location {
        Location::Socket(_) | Location::SocketField(_, "listen") | Location::PoolSocket(..) => {
            "--listen".to_owned()
        }
        Location::SocketField(_, field) => format!("--{field}"),
        Location::Pool(_) => "--pool".to_owned(),
        Location::PoolField(_, field) => format!("--{}", field.replace('_', "-")),
        Location::PoolEnv(..) => "--env".to_owned(),
        _ => "command line".to_owned(),
    }
}

/// Runs the supervisor until it stops.
pub(crate) fn run(
    config: Config,
    source: Source,
    args: &RunArgs,
    output: OutputStyle,
) -> Result<(), Failure> {
    raise_priority(args);
    let options = options_for(&config, &source, args, output);
    install_preload(None);
    runtime()?
        .block_on(supervisor::run(config, options))
        .map_err(supervisor_failure)
}

/// Carries on as the primary whose previous program handed its state over in the memfd
/// `handover` (an upgrade: `ustad upgrade` executed this program in place). If the state
/// cannot be taken, the previous program's workers are stopped gracefully and the cluster
/// starts afresh from the command line's configuration: never left unsupervised.
pub(crate) fn resume(handover: i32, args: &RunArgs, output: OutputStyle) -> Result<(), Failure> {
    raise_priority(args);
    let source = source_of(args)?;
    let mut handover = supervisor::Handover::read(handover);
    install_preload(handover.as_mut().ok().and_then(|h| h.take_preload()));
    let runtime = runtime()?;
    let why = match handover {
        Ok(handover) => {
            let config = handover.config().clone();
            let options = options_for(&config, &source, args, output);
            match runtime.block_on(supervisor::resume(handover, options)) {
                Ok(()) => return Ok(()),
                Err(error @ (SupervisorError::Resume(_) | SupervisorError::Setup { .. })) => {
                    error.to_string()
                }
                Err(error) => return Err(supervisor_failure(error)),
            }
        }
        Err(error) => error.to_string(),
    };
    tracing::error!(
        event = "upgrade_failed",
        "upgrade: {why}; stopping the previous program's workers and starting afresh from the configuration"
    );
    supervisor::take_back_children(std::time::Duration::from_secs(10));
    let (config, source) = config_from_args(args)?;
    let options = options_for(&config, &source, args, output);
    runtime
        .block_on(supervisor::run(config, options))
        .map_err(supervisor_failure)
}

/// `ustad --upgrade-check run …`: a primary asks this binary, before executing it in place,
/// whether it can take over (the command line parsed; the version and state versions said).
pub(crate) fn upgrade_check(command: &crate::cli::Command) -> ExitCode {
    if !matches!(command, crate::cli::Command::Run(_)) {
        return Failure::usage(
            "--upgrade-check is asked with `ustad run`'s command line".to_owned(),
        )
        .report();
    }
    match serde_json::to_string(&supervisor::Capabilities::this_program()) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(error) => Failure::runtime(error.to_string()).report(),
    }
}

/// Runs the primary above its workers (`--primary-nice`), and says how it runs.
fn raise_priority(args: &RunArgs) {
    match ustad_core::priority::raise_primary(args.primary_nice) {
        priority @ ustad_core::priority::Priority::Raised { already: false, .. } => {
            tracing::debug!(event = "priority", "{priority}");
        }
        ustad_core::priority::Priority::Raised { already: true, .. } => {}
        priority @ ustad_core::priority::Priority::Kept { .. } if args.primary_nice == 0 => {
            tracing::debug!(event = "priority", "{priority}");
        }
        priority @ ustad_core::priority::Priority::Kept { .. } => {
            tracing::info!(event = "priority", "{priority}");
        }
    }
}

/// How this program was started, for `ustad upgrade` to start its successor the same way.
fn invocation() -> Option<supervisor::Invocation> {
    let mut argv = std::env::args_os();
    let arg0 = argv.next()?;
    let handover = format!("{}=", supervisor::HANDOVER_FLAG);
    let args: Vec<_> = argv
        .filter(|arg| !arg.to_string_lossy().starts_with(&handover))
        .collect();
    // After a package manager replaced the file, the kernel names the running one
    // "… (deleted)": the new binary is at the path without it.
    let exe = std::env::current_exe().ok()?;
    let exe = match exe
        .to_str()
        .and_then(|path| path.strip_suffix(" (deleted)"))
    {
        Some(path) => PathBuf::from(path),
        None => exe,
    };
    Some(supervisor::Invocation { exe, arg0, args })
}

fn supervisor_failure(error: SupervisorError) -> Failure {
    match error {
        SupervisorError::Invalid(_) => Failure::usage(error.to_string()),
        _ => Failure::runtime(error.to_string()),
    }
}

/// The primary's runtime.
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    // One thread: workers die with the thread that forked them (PR_SET_PDEATHSIG). Writing
    // to ustad's stdout and stderr (the relay of workers' output) is the only blocking work,
    // one write at a time per stream: two threads at most, gone after a second of quiet (tokio's
    // default, 512 threads kept for 10 s, showed as threads appearing after each reload).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the runtime: {e}")))
}

/// The supervisor's options for `config`, as `ustad run`'s flags set them.
fn options_for(config: &Config, source: &Source, args: &RunArgs, output: OutputStyle) -> Options {
    let mut options = Options::default();
    options.invocation = invocation();
    options.name = instance_name(args, source, config);
    options.control = Some(
        args.control
            .clone()
            .unwrap_or_else(|| ustad_core::control::paths::default_socket(&options.name)),
    );
    options.metrics = args.metrics;
    options.reload = match source {
        Source::File(path) => {
            let path = path.clone();
            Some(Box::new(move || Config::from_file(&path)))
        }
        Source::Flags => None,
    };
    if let Source::File(path) = source {
        options.config_file = Some(std::path::absolute(path).unwrap_or_else(|_| path.clone()));
    }
    options.output = output;
    options
}

/// Makes the embedded preload library loadable and gives it to the engine, for pools with
/// `preload` on (see `ustad_core::preload`), which keeps its memfd open for the primary's life;
/// at the number of `at`, the previous program's memfd, after an upgrade. Without it ustad
/// still runs: workers get their sockets as fd 3, 4, … only.
fn install_preload(at: Option<std::os::fd::OwnedFd>) {
    match crate::preload::materialise(at) {
        Ok(Some(materialised)) => {
            let library = &materialised.library;
            tracing::debug!(event = "preload", path = %library.path.display(), "preload library at {}", library.path.display());
            if let Some(error) = &materialised.shared_error {
                tracing::warn!(
                    event = "preload_unavailable",
                    "cannot give the preload library to workers of other users ({error}): those of a pool with `user` or `group` that bind their own port will not get ustad's sockets (they can take fd 3)"
                );
            }
            let _ = ustad_core::preload::set_library(library.clone());
            if let Some(memfd) = materialised.memfd {
                let _ = ustad_core::preload::keep_memfd(memfd);
            }
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(
                event = "preload_unavailable",
                "cannot make the preload library loadable ({error}): programs that bind their own port will not get ustad's sockets (they can take fd 3)"
            );
        }
    }
}

/// `--name`, else the config file's stem, `demo` for the demo, or the pool's name.
fn instance_name(args: &RunArgs, source: &Source, config: &Config) -> String {
    if let Some(name) = &args.name {
        return name.clone();
    }
    match source {
        Source::File(path) => path
            .file_stem()
            .map_or_else(|| "ustad".to_owned(), |s| s.to_string_lossy().into_owned()),
        Source::Flags if args.args.is_empty() => "demo".to_owned(),
        Source::Flags => config
            .pools
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| "ustad".to_owned()),
    }
}

/// `ustad check FILE`.
pub(crate) fn check(path: &Path) -> Result<ExitCode, Failure> {
    let config = Config::from_file(path).map_err(config_failure)?;
    println!("{}: ok ({})", path.display(), config.summary());
    for (name, pool) in &config.pools {
        if let Err(error) = ustad_core::spawn::resolve_program(pool) {
            eprintln!("warning: pool `{name}`: {error}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command as Sub};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, Failure> {
        let cli = Cli::try_parse_from(args).map_err(|e| Failure::usage(e.to_string()))?;
        let Sub::Run(run) = cli.command else {
            panic!("not run")
        };
        config_from_args(&run).map(|(config, _)| config)
    }

    #[test]
    fn the_demo_is_the_default() {
        let config = parse(&["ustad", "run"]).unwrap();
        let web = &config.pools["web"];
        assert_eq!(web.command.args(), ["demo-worker"]);
        assert_eq!(web.size, Size::Auto);
        assert_eq!(web.ready, Readiness::Notify);
        assert_eq!(config.sockets["listen"].listen.to_string(), DEMO_LISTEN);
    }

    #[test]
    fn flags_describe_one_pool() {
        let config = parse(&[
            "ustad",
            "run",
            "-w",
            "4",
            "-l",
            "127.0.0.1:9000",
            "-l",
            "admin=unix:/tmp/a.sock",
            "--reuseport",
            "--ready",
            "delay:1s",
            "--kill-timeout",
            "5s",
            "-e",
            "A=b",
            "--",
            "node",
            "app.js",
        ]);
        // reuseport on a unix socket is refused, naming the flag.
        let error = config.unwrap_err();
        assert!(
            error.message.contains("--mode") || error.message.contains("reuseport"),
            "{}",
            error.message
        );

        let config = parse(&[
            "ustad",
            "run",
            "-w",
            "4",
            "-l",
            "127.0.0.1:9000",
            "-e",
            "A=b",
            "--",
            "node",
            "app.js",
        ])
        .unwrap();
        let app = &config.pools["app"];
        assert_eq!(app.command.words(), ["node", "app.js"]);
        assert_eq!(app.size, Size::fixed(4).unwrap());
        assert_eq!(app.sockets, ["listen"]);
        assert_eq!(app.env["A"], "b");
        // A pool with a socket is ready when it is seen listening on it, unless told otherwise.
        assert_eq!(app.ready, Readiness::Listening);
        let config = parse(&["ustad", "run", "--", "python3", "jobs.py"]).unwrap();
        assert_eq!(config.pools["app"].ready, Readiness::None);
        // A program that binds the address itself gets ustad's socket, unless told otherwise.
        assert!(app.preload);
        let config = parse(&[
            "ustad",
            "run",
            "-l",
            "127.0.0.1:0",
            "--no-preload",
            "--",
            "go-app",
        ]);
        assert!(!config.unwrap().pools["app"].preload);
    }

    #[test]
    fn flags_and_a_config_file_never_silently_disagree() {
        let error = parse(&["ustad", "run", "ustad.toml", "-w", "2"]).unwrap_err();
        assert_eq!(error.code, USAGE);
        assert!(
            error
                .message
                .contains("--workers cannot be combined with a config file"),
            "{}",
            error.message
        );
        let error = parse(&["ustad", "run", "ustad.toml", "--", "node"]).unwrap_err();
        assert!(
            error.message.contains("a config file takes no command"),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_command_needs_dashes_only_for_its_own_flags() {
        let config = parse(&["ustad", "run", "node", "app.js"]).unwrap();
        assert_eq!(config.pools["app"].command.words(), ["node", "app.js"]);
        let config = parse(&["ustad", "run", "node", "app.js", "-w", "2"]).unwrap();
        assert_eq!(config.pools["app"].size, Size::fixed(2).unwrap());
        assert!(parse(&["ustad", "run", "node", "--inspect", "app.js"]).is_err());
        let config = parse(&[
            "ustad",
            "run",
            "-w",
            "2",
            "--",
            "node",
            "--inspect",
            "app.js",
        ])
        .unwrap();
        assert_eq!(
            config.pools["app"].command.words(),
            ["node", "--inspect", "app.js"]
        );
    }

    #[test]
    fn bad_flag_values_name_the_flag() {
        let error = parse(&["ustad", "run", "-w", "many"]).unwrap_err();
        assert!(
            error.message.contains("--workers") && error.message.contains("invalid size"),
            "{}",
            error.message
        );
        let error = parse(&["ustad", "run", "--ready", "delay:40s"]).unwrap_err();
        assert!(error.message.contains("--ready"), "{}", error.message);
        let error = parse(&["ustad", "run", "-l", "nowhere"]).unwrap_err();
        assert!(
            error.message.contains("--listen nowhere"),
            "{}",
            error.message
        );
    }
}
