//! Shared helpers: where the binaries are, starting clusters in temp dirs, reading events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use ustad_testkit::cluster::{Cluster, LogEvent};
use ustad_testkit::{TEST_WORKER, helper_bin};

/// Generous bound for anything a test waits for.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn ustad() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ustad"))
}

/// A file of `tests/fixtures`, as a path for a command line.
pub(crate) fn fixture(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    path.to_string_lossy().into_owned()
}

pub(crate) fn test_worker() -> String {
    helper_bin(ustad(), TEST_WORKER)
        .to_string_lossy()
        .into_owned()
}

/// A cluster with its own temp dir (which holds reports and config files).
pub(crate) struct Run {
    pub(crate) dir: TempDir,
    pub(crate) cluster: Cluster,
}

impl Run {
    /// `ustad run <args…>` in a fresh temp dir.
    pub(crate) fn start(args: &[&str]) -> Run {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = Cluster::start(ustad(), args, dir.path());
        Run { dir, cluster }
    }

    /// `ustad run ustad.toml` with this config text.
    pub(crate) fn with_config(text: &str) -> Run {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ustad.toml"), text).expect("writing ustad.toml");
        let cluster = Cluster::start(ustad(), &["run", "ustad.toml"], dir.path());
        Run { dir, cluster }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until `count` workers have reported ready (since the start).
    pub(crate) fn wait_ready(&self, count: usize) -> Vec<LogEvent> {
        self.cluster.wait_events(|e| e.is("ready"), count, TIMEOUT)
    }

    pub(crate) fn addr(&self, socket: &str) -> SocketAddr {
        self.cluster.listen_addr(socket)
    }

    /// The primary's control socket, from its `control` event.
    pub(crate) fn control(&self) -> PathBuf {
        let event = self.cluster.wait_event(|e| e.is("control"), TIMEOUT);
        PathBuf::from(event.str("path").expect("the control event has a path"))
    }

    /// Runs `ustad <args…> --control <this cluster's socket>` to completion (bounded).
    pub(crate) fn client(&self, args: &[&str]) -> ClientOutput {
        let control = self.control();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--control", control.to_str().expect("UTF-8 path")]);
        client_in(self.dir.path(), &full, &[])
    }

    /// Stops the primary with SIGTERM and asserts it exits 0.
    pub(crate) fn stop(&mut self) {
        self.cluster
            .signal(ustad_testkit::Signal::TERM)
            .expect("SIGTERM to the primary");
        let status = self.cluster.wait_exit(TIMEOUT);
        assert_eq!(
            status.code(),
            Some(0),
            "primary exit status; stderr:\n{}",
            self.cluster.stderr_tail(40)
        );
    }
}

/// `pid` of an event.
pub(crate) fn pid(event: &LogEvent) -> u32 {
    event
        .u64("pid")
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no pid in {event}"))
}

/// The most workers of `pool` alive at once, from the event sequence (spawned … exited).
pub(crate) fn peak_alive(events: &[LogEvent], pool: &str) -> usize {
    let mut alive = 0usize;
    let mut peak = 0;
    for event in events.iter().filter(|e| e.str("pool") == Some(pool)) {
        if event.is("spawned") {
            alive += 1;
            peak = peak.max(alive);
        } else if event.is("exited") {
            alive -= 1;
        }
    }
    peak
}

/// Pids of the workers of `pool` alive after the events so far.
pub(crate) fn live_pids(events: &[LogEvent], pool: &str) -> BTreeMap<u64, u32> {
    let mut live = BTreeMap::new();
    for event in events.iter().filter(|e| e.str("pool") == Some(pool)) {
        let id = event.u64("id").unwrap_or(0);
        if event.is("spawned") {
            live.insert(id, pid(event));
        } else if event.is("exited") {
            live.remove(&id);
        }
    }
    live
}

/// What a client command printed, and how it exited.
#[derive(Debug)]
pub(crate) struct ClientOutput {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl ClientOutput {
    /// Asserts exit code 0 and returns stdout.
    #[track_caller]
    pub(crate) fn ok(self) -> String {
        assert_eq!(self.code, Some(0), "client failed: {self:#?}");
        self.stdout
    }
}

/// Runs `ustad <args…>` in `dir` with extra environment, to completion (bounded).
pub(crate) fn client_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> ClientOutput {
    run_in(dir, ustad(), args, env)
}

/// Sends a signal to one process.
pub(crate) fn signal_pid(pid: u32, signal: ustad_testkit::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a valid pid");
    rustix::process::kill_process(pid, signal).expect("sending a signal");
}

/// Runs `program <args…>` in `dir` with extra environment, to completion (bounded); its
/// output goes through files in `dir`.
pub(crate) fn run_in(
    dir: &Path,
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> ClientOutput {
    use std::process::{Command, Stdio};
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch = std::env::temp_dir();
    let out_path = scratch.join(format!("ustad-client-{}-{n}.out", std::process::id()));
    let err_path = scratch.join(format!("ustad-client-{}-{n}.err", std::process::id()));
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    let mut guard =
        ustad_testkit::process::ProcessGuard::spawn(&mut command).expect("spawning a client");
    let status = guard
        .wait_timeout(TIMEOUT)
        .unwrap_or_else(|| panic!("`{} {}` did not finish", program.display(), args.join(" ")));
    let output = ClientOutput {
        code: status.code(),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    output
}
