//! A running `ustad` primary under test, whose JSON log events tests wait on with deadlines.
//!
//! The primary logs one JSON object per line on stderr (`--log-format json`), each with at least
//! `level`, `message` and `event` keys, for instance
//! `{"event":"listening","socket":"web","address":"127.0.0.1:40123",…}` or
//! `{"event":"ready","pool":"web","slot":0,"id":"web.0","pid":1234,…}`. Lines that are not JSON
//! objects (worker output relayed as `web.0 | text`) are kept as plain lines only.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde_json::Value;
use ustad_proto::env::{LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID, NOTIFY_SOCKET, USTAD_WORKER_ID};

use crate::DEFAULT_TIMEOUT;
use crate::process::{self, ProcessGuard};

/// Lines kept per stream; older ones are dropped (a worker flooding its output must not exhaust
/// the test's memory). Events are all kept.
const MAX_RETAINED_LINES: usize = 10_000;
/// Bytes kept of one line; the rest is replaced by a `… [N bytes]` marker.
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines of stderr quoted in panic messages.
const TAIL_LINES: usize = 50;
/// How long [`Cluster::wait_exit`] waits for the output pipes to drain after the exit.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// One JSON log line of the primary.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    /// The whole JSON object.
    pub raw: Value,
}

impl LogEvent {
    /// A field: top-level first, then under `fields` (where `tracing-subscriber`'s JSON format
    /// puts event fields unless told to flatten them).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw
            .get(key)
            .or_else(|| self.raw.get("fields")?.get(key))
    }

    /// The `event` field (`""` if missing).
    pub fn event(&self) -> &str {
        self.str("event").unwrap_or("")
    }

    /// Whether the `event` field is `name`.
    pub fn is(&self, name: &str) -> bool {
        self.event() == name
    }

    /// A string field.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// A non-negative integer field (a JSON number, or a string holding one).
    pub fn u64(&self, key: &str) -> Option<u64> {
        match self.get(key)? {
            Value::String(s) => s.parse().ok(),
            v => v.as_u64(),
        }
    }

    /// An integer field (a JSON number, or a string holding one).
    pub fn i64(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::String(s) => s.parse().ok(),
            v => v.as_i64(),
        }
    }

    /// A boolean field.
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }
}

impl fmt::Display for LogEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.raw)
    }
}

/// A running `ustad` primary, spawned by [`Cluster::start`].
///
/// Background threads read its stdout and stderr line by line; the `wait_*` methods block on a
/// condition variable until a matching line or event arrives (no polling), and panic with the
/// last 50 stderr lines on timeout, or as soon as stderr closes without a match.
///
/// On drop, the primary's process group and the process groups of its children are killed with
/// SIGKILL; if the test is panicking, the last 50 stderr lines are printed first.
///
/// # Caveats
///
/// The primary is spawned through [`ProcessGuard`]: create the cluster on the test's own thread
/// (the parent-death signal is tied to the spawning thread).
pub struct Cluster {
    guard: ProcessGuard,
    pid: u32,
    dir: PathBuf,
    shared: Arc<Shared>,
    status: Option<ExitStatus>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("pid", &self.pid)
            .field("dir", &self.dir)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    stdout_changed: Condvar,
    stderr_changed: Condvar,
}

#[derive(Default)]
struct State {
    stdout: Lines,
    stderr: Lines,
    events: Vec<LogEvent>,
}

#[derive(Default)]
struct Lines {
    retained: VecDeque<String>,
    /// Lines read so far, including those no longer retained.
    total: u64,
    closed: bool,
}

impl Lines {
    /// The retained lines from absolute line number `from` on, with their numbers.
    fn since(&self, from: u64) -> impl Iterator<Item = (u64, &String)> {
        let first = self.total - self.retained.len() as u64;
        let skip = from.saturating_sub(first);
        self.retained
            .iter()
            .enumerate()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .map(move |(i, line)| (first + i as u64, line))
    }

    fn tail(&self, n: usize) -> String {
        let skip = self.retained.len().saturating_sub(n);
        let mut out = String::new();
        for line in self.retained.iter().skip(skip) {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl State {
    fn lines(&self, stream: Stream) -> &Lines {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn condvar(&self, stream: Stream) -> &Condvar {
        match stream {
            Stream::Stdout => &self.stdout_changed,
            Stream::Stderr => &self.stderr_changed,
        }
    }
}

impl Cluster {
    /// Spawns `ustad --log-format json <args…>` with working directory `dir`, stdin from
    /// `/dev/null`, stdout and stderr piped to the fixture.
    ///
    /// `args` is the rest of the command line, for instance
    /// `["run", "-w", "2", "-l", "127.0.0.1:0", "--", "/path/to/test-worker", "--serve-http"]`.
    /// The primary inherits the test's environment with `XDG_RUNTIME_DIR` set to `dir` (so
    /// its control socket is `dir/ustad/NAME.sock`), minus the socket-activation and notify
    /// variables (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, `NOTIFY_SOCKET`), which would
    /// otherwise leak in from a test runner started by systemd.
    ///
    /// # Panics
    ///
    /// If the binary cannot be spawned.
    #[track_caller]
    pub fn start(ustad_bin: &Path, args: &[&str], dir: &Path) -> Self {
        Self::start_with_env(ustad_bin, args, dir, &[])
    }

    /// [`Cluster::start`] with extra environment variables for the primary (and so its workers).
    ///
    /// # Panics
    ///
    /// If the binary cannot be spawned.
    #[track_caller]
    pub fn start_with_env(
        ustad_bin: &Path,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(ustad_bin);
        cmd.arg("--log-format").arg("json").args(args);
        for name in [LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES, NOTIFY_SOCKET] {
            cmd.env_remove(name);
        }
        // The control socket goes to $XDG_RUNTIME_DIR/ustad/NAME.sock: one directory per
        // test, so that clusters of different tests never meet.
        cmd.env("XDG_RUNTIME_DIR", dir);
        for (name, value) in env {
            cmd.env(name, value);
        }
        Self::start_command(cmd, dir)
    }

    /// Spawns a prepared `cmd` as the primary, with working directory `dir`, stdin from
    /// `/dev/null`, and stdout and stderr piped to the fixture: for what
    /// [`Cluster::start_with_env`] cannot say, such as handing the primary sockets of its own
    /// ([`crate::process::pass_fds`]) through a shell that sets `LISTEN_PID` to its own pid
    /// before it execs ustad.
    ///
    /// `cmd` must run `ustad --log-format json …`; its environment is used as it is.
    ///
    /// # Panics
    ///
    /// If the command cannot be spawned.
    #[track_caller]
    pub fn start_command(mut cmd: Command, dir: &Path) -> Self {
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ProcessGuard::spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("spawning {}: {e}", cmd.get_program().to_string_lossy()));
        let pid = guard.pid();
        let shared = Arc::new(Shared::default());
        let child = guard.child_mut();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for (stream, reader) in [
            (Stream::Stdout, Box::new(stdout) as Box<dyn Read + Send>),
            (Stream::Stderr, Box::new(stderr)),
        ] {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("ustad-{}", stream.name()))
                .spawn(move || read_stream(reader, &shared, stream))
                .expect("spawning a reader thread");
        }
        Self {
            guard,
            pid,
            dir: dir.to_owned(),
            shared,
            status: None,
        }
    }

    /// The primary's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The primary's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends `sig` to the primary (only).
    ///
    /// # Errors
    ///
    /// `ESRCH` if the primary has exited and been reaped.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        self.guard.signal(sig)
    }

    /// Every JSON event logged so far, in order.
    pub fn events(&self) -> Vec<LogEvent> {
        self.shared.lock().events.clone()
    }

    /// How many JSON events have been logged so far: pass it to [`Cluster::wait_event_since`]
    /// to wait only for what happens next.
    pub fn event_count(&self) -> usize {
        self.shared.lock().events.len()
    }

    /// The retained stdout lines (the last 10 000; long lines are cut at 16 KiB).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.shared.lock().stdout.retained.iter().cloned().collect()
    }

    /// The retained stderr lines, JSON events included (the last 10 000; long lines are cut at
    /// 16 KiB).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.shared.lock().stderr.retained.iter().cloned().collect()
    }

    /// The last `n` stderr lines, indented, for messages.
    pub fn stderr_tail(&self, n: usize) -> String {
        self.shared.lock().stderr.tail(n)
    }

    /// Waits for the first event (since the start) that matches `pred`.
    ///
    /// # Panics
    ///
    /// On timeout, or if stderr closes with no match; the message quotes the last 50 stderr lines.
    #[track_caller]
    pub fn wait_event(&self, pred: impl Fn(&LogEvent) -> bool, timeout: Duration) -> LogEvent {
        self.wait_event_since(0, pred, timeout)
    }

    /// Waits for the first event matching `pred` among events number `since` and later (see
    /// [`Cluster::event_count`]).
    ///
    /// # Panics
    ///
    /// On timeout, or if stderr closes with no match; the message quotes the last 50 stderr lines.
    #[track_caller]
    pub fn wait_event_since(
        &self,
        since: usize,
        pred: impl Fn(&LogEvent) -> bool,
        timeout: Duration,
    ) -> LogEvent {
        let mut next = since;
        self.wait_until(Stream::Stderr, timeout, "a matching event", |state| {
            let found = state.events.get(next..)?.iter().find(|e| pred(e)).cloned();
            next = state.events.len().max(since);
            found
        })
    }

    /// Waits until `count` events (since the start) match `pred`, and returns the first `count`.
    ///
    /// # Panics
    ///
    /// On timeout, or if stderr closes first; the message quotes the last 50 stderr lines.
    #[track_caller]
    pub fn wait_events(
        &self,
        pred: impl Fn(&LogEvent) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Vec<LogEvent> {
        let mut next = 0;
        let mut found = Vec::new();
        let what = format!("{count} matching events");
        self.wait_until(Stream::Stderr, timeout, &what, |state| {
            for event in &state.events[next..] {
                if found.len() < count && pred(event) {
                    found.push(event.clone());
                }
            }
            next = state.events.len();
            (found.len() >= count).then(|| std::mem::take(&mut found))
        })
    }

    /// Waits for the `listening` event of socket `socket_name` and returns its address.
    ///
    /// # Panics
    ///
    /// After [`DEFAULT_TIMEOUT`], or if the address is not an IP socket address.
    #[track_caller]
    pub fn listen_addr(&self, socket_name: &str) -> SocketAddr {
        let event = self.wait_event(
            |e| e.is("listening") && e.str("socket") == Some(socket_name),
            DEFAULT_TIMEOUT,
        );
        let address = event
            .str("address")
            .unwrap_or_else(|| panic!("listening event without an address: {event}"));
        address
            .parse()
            .unwrap_or_else(|e| panic!("listening address {address:?} is not ip:port ({e})"))
    }

    /// Waits for a stdout line (since the start, among those retained) that matches `pred`.
    ///
    /// # Panics
    ///
    /// On timeout, or if stdout closes with no match.
    #[track_caller]
    pub fn wait_stdout_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.wait_line(Stream::Stdout, pred, timeout)
    }

    /// Waits for a stderr line (since the start, among those retained) that matches `pred`.
    ///
    /// # Panics
    ///
    /// On timeout, or if stderr closes with no match.
    #[track_caller]
    pub fn wait_stderr_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.wait_line(Stream::Stderr, pred, timeout)
    }

    #[track_caller]
    fn wait_line(&self, stream: Stream, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let mut next = 0;
        let what = format!("a matching {} line", stream.name());
        self.wait_until(stream, timeout, &what, |state| {
            let lines = state.lines(stream);
            let found = lines
                .since(next)
                .find(|(_, line)| pred(line))
                .map(|(_, line)| line.clone());
            next = lines.total;
            found
        })
    }

    /// Waits up to `timeout` for the primary to exit, then up to 2 s more for its output pipes
    /// to close (so that [`Cluster::stderr_lines`] is complete), and returns its exit status.
    ///
    /// # Panics
    ///
    /// If the primary is still running after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let Some(status) = self.guard.wait_timeout(timeout) else {
            panic!(
                "ustad (pid {}) still running after {timeout:?}; last stderr lines:\n{}",
                self.pid,
                self.stderr_tail(TAIL_LINES)
            );
        };
        self.status = Some(status);
        let deadline = Instant::now() + DRAIN_AFTER_EXIT;
        let mut state = self.shared.lock();
        // Worker processes that inherited the pipes may keep them open; do not wait for them long.
        while !(state.stdout.closed && state.stderr.closed) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .shared
                .stderr_changed
                .wait_timeout(state, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        status
    }

    /// The exit status, if the primary has exited (reaps it).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.guard.try_wait().ok().flatten();
        }
        self.status
    }

    /// Blocks until `check` returns `Some`, re-running it each time `stream` changes.
    #[track_caller]
    fn wait_until<T>(
        &self,
        stream: Stream,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(found) = check(&state) {
                return found;
            }
            let closed = state.lines(stream).closed;
            let now = Instant::now();
            if closed || now >= deadline {
                let tail = state.stderr.tail(TAIL_LINES);
                drop(state);
                let why = if closed {
                    format!("ustad's {} closed (did it exit?)", stream.name())
                } else {
                    format!("timed out after {timeout:?}")
                };
                panic!(
                    "waiting for {what} from ustad (pid {}): {why}; last stderr lines:\n{tail}",
                    self.pid
                );
            }
            state = self
                .shared
                .condvar(stream)
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Kills the primary's process group and its children's process groups.
    fn kill_everything(&mut self) {
        let own_group = rustix::process::getpgrp()
            .as_raw_nonzero()
            .get()
            .unsigned_abs();
        let mut victims = Vec::new();
        if self.try_exit_status().is_none() {
            victims = process::children_of(self.pid);
        }
        self.guard.kill();
        // Workers usually lead their own process groups, which killing the primary's group
        // misses.
        for (pid, pgrp) in victims {
            if pgrp != own_group && pgrp != self.pid {
                kill_group(pgrp);
            }
            kill_pid(pid);
        }
        // Workers orphaned by an earlier exit of the primary: only those that still carry the
        // worker id they were spawned with (guards against pid reuse).
        let spawned: Vec<(u32, String)> = self
            .shared
            .lock()
            .events
            .iter()
            .filter(|e| e.is("spawned"))
            .filter_map(|e| Some((u32::try_from(e.u64("pid")?).ok()?, e.str("id")?.to_owned())))
            .collect();
        for (pid, id) in spawned {
            if process::pid_alive(pid) && has_env(pid, USTAD_WORKER_ID, &id) {
                if let Some(stat) = process::proc_stat(pid) {
                    let pgrp = stat.pgrp;
                    if pgrp == pid && pgrp != own_group {
                        kill_group(pgrp);
                    }
                }
                kill_pid(pid);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- last {TAIL_LINES} stderr lines of ustad (pid {}) ---\n{}",
                self.pid,
                self.stderr_tail(TAIL_LINES)
            );
        }
        self.kill_everything();
    }
}

fn kill_group(pgrp: u32) {
    if let Some(pgid) = i32::try_from(pgrp).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
    }
}

fn kill_pid(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

/// Whether process `pid` was started with `name=value` in its environment.
fn has_env(pid: u32, name: &str, value: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{name}={value}");
    environ
        .split(|&b| b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

fn read_stream(reader: Box<dyn Read + Send>, shared: &Shared, stream: Stream) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let full_len = match read_line_capped(&mut reader, &mut buf, MAX_LINE_BYTES) {
            Ok(Some(len)) => len,
            Ok(None) | Err(_) => break,
        };
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let mut line = String::from_utf8_lossy(&buf).into_owned();
        if full_len > MAX_LINE_BYTES {
            line.push_str(&format!("… [{full_len} bytes]"));
        }
        let event = (stream == Stream::Stderr && line.starts_with('{'))
            .then(|| serde_json::from_str::<Value>(&line).ok())
            .flatten()
            .filter(Value::is_object)
            .map(|raw| LogEvent { raw });
        let mut state = shared.lock();
        let lines = match stream {
            Stream::Stdout => &mut state.stdout,
            Stream::Stderr => &mut state.stderr,
        };
        if lines.retained.len() == MAX_RETAINED_LINES {
            lines.retained.pop_front();
        }
        lines.retained.push_back(line);
        lines.total += 1;
        if let Some(event) = event {
            state.events.push(event);
        }
        drop(state);
        shared.condvar(stream).notify_all();
    }
    let mut state = shared.lock();
    match stream {
        Stream::Stdout => state.stdout.closed = true,
        Stream::Stderr => state.stderr.closed = true,
    }
    drop(state);
    shared.stdout_changed.notify_all();
    shared.stderr_changed.notify_all();
}

/// Reads one line (up to and including `\n`), keeping at most `cap` bytes of it in `out`.
/// Returns the line's full length, or `None` at end of input.
fn read_line_capped(
    reader: &mut impl BufRead,
    out: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<usize>> {
    let mut total = 0;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok((total > 0).then_some(total));
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let keep = cap.saturating_sub(out.len()).min(chunk.len());
        out.extend_from_slice(&chunk[..keep]);
        let used = chunk.len();
        total += used;
        reader.consume(used);
        if done {
            return Ok(Some(total));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_lines_keep_their_full_length() {
        let input = format!("short\n{}\nlast", "x".repeat(100));
        let mut reader = BufReader::with_capacity(7, input.as_bytes());
        let mut out = Vec::new();
        assert_eq!(
            read_line_capped(&mut reader, &mut out, 10).unwrap(),
            Some(6)
        );
        assert_eq!(out, b"short\n");
        out.clear();
        assert_eq!(
            read_line_capped(&mut reader, &mut out, 10).unwrap(),
            Some(101)
        );
        assert_eq!(out, b"xxxxxxxxxx");
        out.clear();
        assert_eq!(
            read_line_capped(&mut reader, &mut out, 10).unwrap(),
            Some(4)
        );
        assert_eq!(out, b"last");
        out.clear();
        assert_eq!(read_line_capped(&mut reader, &mut out, 10).unwrap(), None);
    }

    #[test]
    fn log_event_fields_top_level_or_nested() {
        let flat = LogEvent {
            raw: serde_json::json!({"event": "ready", "pid": 12, "slot": "3"}),
        };
        assert!(flat.is("ready"));
        assert_eq!(flat.u64("pid"), Some(12));
        assert_eq!(flat.u64("slot"), Some(3));
        let nested = LogEvent {
            raw: serde_json::json!({"level": "INFO", "fields": {"event": "stopped"}}),
        };
        assert_eq!(nested.event(), "stopped");
        assert_eq!(nested.str("level"), Some("INFO"));
        assert_eq!(nested.str("missing"), None);
    }
}
