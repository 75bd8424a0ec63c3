//! Every example runs as a user would run it, as a real cluster of its own processes, and does
//! what its documentation says.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use ustad_testkit::Signal;
use ustad_testkit::load;
use ustad_testkit::process::ProcessGuard;

const TIMEOUT: Duration = Duration::from_secs(30);

/// An example's binary, built by `cargo test` next to the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(path.exists(), "{} is not built", path.display());
    path
}

/// A running example: its process group, and its stdout lines.
struct Running {
    guard: ProcessGuard,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    _runtime_dir: TempDir,
}

impl Running {
    fn start(name: &str, env: &[(&str, &str)]) -> Running {
        let runtime_dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(example(name));
        command
            .env("XDG_RUNTIME_DIR", runtime_dir.path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut guard = ProcessGuard::spawn(&mut command).expect("spawning the example");
        let stdout = guard.child_mut().stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            guard,
            lines,
            seen: Vec::new(),
            _runtime_dir: runtime_dir,
        }
    }

    /// Waits for a stdout line containing `text`, and returns it.
    #[track_caller]
    fn line(&mut self, text: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(text)) {
            return line.clone();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {text:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The address in a worker's "serving on ADDR" line.
    fn address(&mut self) -> SocketAddr {
        let line = self.line("serving on ");
        line.rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .expect("an address")
    }

    fn wait(&mut self) -> Option<i32> {
        let status = self.guard.wait_timeout(TIMEOUT).expect("the example exits");
        // Lines printed right before the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        status.code()
    }

    fn terminate(&mut self) -> Option<i32> {
        self.guard.signal(Signal::TERM).unwrap();
        self.wait()
    }
}

#[test]
fn hello_cluster_serves_from_several_workers_and_stops_on_sigterm() {
    let mut run = Running::start("hello_cluster", &[("HELLO_ADDR", "127.0.0.1:0")]);
    let address = run.address();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pids = std::collections::BTreeSet::new();
    let deadline = Instant::now() + TIMEOUT;
    while pids.len() < workers.min(2) && Instant::now() < deadline {
        // New connections each time: the kernel hands them to whichever worker accepts.
        let (code, headers, body) = load::get(address).expect("a response");
        assert_eq!(code, 200);
        assert!(body.starts_with("hello from worker "), "{body}");
        pids.insert(headers["x-worker-pid"].clone());
    }
    assert!(pids.len() >= workers.min(2), "answered by {pids:?}");
    assert_eq!(run.terminate(), Some(0));
}

#[test]
fn pools_runs_three_pools_each_with_its_own_code() {
    let mut run = Running::start(
        "pools",
        &[("POOLS_ADDR", "127.0.0.1:0"), ("POOLS_RUN_FOR", "2s")],
    );
    assert_eq!(run.wait(), Some(0), "{}", run.seen.join("\n"));
    let summary = run.line("summary:");
    let ticks: u64 = summary
        .rsplit("ticks=")
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap();
    assert!(
        summary.starts_with("summary: web=4 jobs=2 crons=1 "),
        "{summary}"
    );
    // A tick every 200 ms for most of 2 s.
    assert!(ticks >= 3, "{summary}");
    let answers = run
        .seen
        .iter()
        .filter(|l| l.contains("answered Echoed"))
        .count();
    assert_eq!(answers, 2, "{}", run.seen.join("\n"));
}

#[test]
fn task_queue_loses_no_task_when_a_worker_is_killed() {
    let mut run = Running::start("task_queue", &[("TASKS", "300")]);
    assert_eq!(run.wait(), Some(0), "{}", run.seen.join("\n"));
    run.line("killing worker");
    run.line("all 300 tasks answered, each once");
}

#[test]
fn request_counter_counts_every_request() {
    let mut run = Running::start("request_counter", &[("COUNTER_ADDR", "127.0.0.1:0")]);
    let address = run.address();
    run.line("ready");
    for _ in 0..50 {
        let (code, _, _) = load::get(address).expect("a response");
        assert_eq!(code, 200);
    }
    assert_eq!(run.terminate(), Some(0));
    let total = run.line("total requests:");
    assert!(total.starts_with("total requests: 50 "), "{total}");
}

#[test]
fn request_restart_replaces_the_worker_that_asks_without_a_failed_request() {
    let mut run = Running::start(
        "request_restart",
        &[("RESTART_ADDR", "127.0.0.1:0"), ("RESTART_AFTER", "3")],
    );
    let address = run.address();
    run.line("worker 1 ready");
    let mut pids = Vec::new();
    for _ in 0..3 {
        let (code, headers, _) = load::get(address).expect("a response");
        assert_eq!(code, 200);
        pids.push(headers["x-worker-pid"].clone());
    }
    // The third request made worker 1 ask; its successor takes over once ready.
    run.line("worker 2 ready in slot 0");
    run.line("worker 1 stopping: the worker asked to be replaced");
    run.line("worker 1 exited");
    let (code, headers, _) = load::get(address).expect("a response");
    assert_eq!(code, 200);
    assert_ne!(headers["x-worker-pid"], pids[0]);
    assert_eq!(run.terminate(), Some(0));
}
