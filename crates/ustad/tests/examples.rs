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
        let mut command = Command::new(example(name));
        command.envs(env.iter().copied());
        Running::spawn(command, false)
    }

    /// Runs `command` in a runtime dir of its own; its stdout lines (and its stderr's, with
    /// `stderr`) are what [`Running::line`] looks through.
    fn spawn(mut command: Command, stderr: bool) -> Running {
        let runtime_dir = tempfile::tempdir().unwrap();
        command
            .env("XDG_RUNTIME_DIR", runtime_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        let mut guard = ProcessGuard::spawn(&mut command).expect("spawning the example");
        let (tx, lines) = mpsc::channel();
        let child = guard.child_mut();
        let streams: Vec<Box<dyn std::io::Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for stream in streams {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
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
        self.line_with(&[text])
    }

    /// Waits for a line containing each of `parts`, and returns it.
    #[track_caller]
    fn line_with(&mut self, parts: &[&str]) -> String {
        let fits = |line: &String| parts.iter().all(|part| line.contains(part));
        if let Some(line) = self.seen.iter().find(|l| fits(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if fits(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {parts:?}; saw:\n{}", self.seen.join("\n")),
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

/// The `ustad` command's binary, built with the workspace.
fn ustad_command() -> PathBuf {
    let examples = example("hello_cluster");
    let path = examples
        .parent()
        .and_then(|dir| dir.parent())
        .expect("target/<profile>")
        .join("ustad");
    assert!(
        path.exists(),
        "{} is not built (cargo build -p ustad-cli)",
        path.display()
    );
    path
}

#[test]
fn a_library_worker_runs_under_the_ustad_command_too() {
    // hello_cluster's worker, supervised by `ustad run` instead of its own primary: it finds
    // its listener by name (LISTEN_FDNAMES), says ready with sd_notify and stops on SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ustad.toml");
    let worker = example("hello_cluster");
    std::fs::write(
        &config,
        format!(
            "[sockets.web]\nlisten = \"127.0.0.1:0\"\n\n[pools.web]\ncommand = [{worker:?}]\n\
             size = 2\nsockets = [\"web\"]\nready = \"notify\"\nready_timeout = \"60s\"\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(ustad_command());
    command.arg("run").arg(&config);
    let mut run = Running::spawn(command, true);
    // Ready by its own word (sd_notify), not by a delay: a worker that never said it would be
    // killed after ready_timeout.
    run.line_with(&["web.0 (id 1", "ready after"]);
    run.line_with(&["web.1 (id 2", "ready after"]);
    let address = run.address();
    let mut pids = std::collections::BTreeSet::new();
    let deadline = Instant::now() + TIMEOUT;
    while pids.len() < 2 && Instant::now() < deadline {
        let (code, headers, body) = load::get(address).expect("a response");
        assert_eq!(code, 200);
        assert!(body.starts_with("hello from worker "), "{body}");
        pids.insert(headers["x-worker-pid"].clone());
    }
    assert_eq!(pids.len(), 2, "answered by {pids:?}");
    assert_eq!(run.terminate(), Some(0));
    for worker in ["web.0 (id 1", "web.1 (id 2"] {
        let exit = run.line_with(&[worker, "exited"]);
        assert!(exit.contains("with exit code 0 after"), "{exit}");
    }
}

#[test]
fn a_library_pool_keeps_its_workers_and_channels_when_the_ustad_command_upgrades_itself() {
    // hello_cluster's workers with their message channel (`ipc = "ustad"`: ready is a frame,
    // stop is a frame), under `ustad run`, which replaces its own program while they serve.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ustad.toml");
    let control = dir.path().join("control.sock");
    let worker = example("hello_cluster");
    std::fs::write(
        &config,
        format!(
            "[sockets.web]\nlisten = \"127.0.0.1:0\"\n\n[pools.web]\ncommand = [{worker:?}]\n\
             size = 2\nsockets = [\"web\"]\nipc = \"ustad\"\nready = \"message\"\n"
        ),
    )
    .unwrap();
    let next = dir.path().join("ustad-next");
    std::fs::copy(ustad_command(), &next).unwrap();
    let mut command = Command::new(ustad_command());
    command
        .arg("run")
        .arg("--control")
        .arg(&control)
        .arg(&config);
    let mut run = Running::spawn(command, true);
    run.line_with(&["web.0 (id 1", "ready after"]);
    run.line_with(&["web.1 (id 2", "ready after"]);
    let address = run.address();
    let client = |args: &[&str]| {
        let output = Command::new(ustad_command())
            .args(args)
            .arg("--control")
            .arg(&control)
            .output()
            .expect("running the ustad client");
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let pids = || -> Vec<u64> {
        let status: serde_json::Value =
            serde_json::from_str(&client(&["status", "--json"])).expect("JSON status");
        status["pools"][0]["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["pid"].as_u64().expect("a pid"))
            .collect()
    };
    let before = pids();
    assert_eq!(before.len(), 2);

    let mut options = load::LoadOptions::new(address);
    options.connections = 4;
    options.max_duration = Duration::from_secs(60);
    let load = load::start(options);
    assert!(load.wait_for_ok(100, TIMEOUT), "{}", load.snapshot());
    let said = client(&["upgrade", "--wait", "--binary", next.to_str().unwrap()]);
    assert!(said.contains("2 workers kept, 0 gone"), "{said}");
    let served = load.snapshot().ok;
    assert!(
        load.wait_for_ok(served + 100, TIMEOUT),
        "{}",
        load.snapshot()
    );
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(pids(), before, "the same workers serve");

    // Their channels crossed the exec: a rolling restart stops each with its `stop` frame,
    // and each replacement says ready with its own.
    client(&["restart", "web"]);
    run.line("rolling restart of pool web finished");
    for id in ["(id 1,", "(id 2,"] {
        let exit = run.line_with(&[id, "exited"]);
        assert!(exit.contains("with exit code 0 after"), "{exit}");
    }
    assert_eq!(run.terminate(), Some(0));
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
fn hello_cluster_serves_on_a_unix_socket_with_tokio_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hello.sock");
    let address = format!("unix:{}", path.display());
    let mut run = Running::start("hello_cluster", &[("HELLO_ADDR", address.as_str())]);
    let line = run.line("serving on unix:");
    assert!(line.ends_with(&address), "{line}");
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connects");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("a read timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("hello from worker "), "{response}");
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
