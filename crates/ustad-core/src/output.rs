//! Relaying workers' stdout and stderr, line by line, with a `pool.slot | ` prefix.
//!
//! Memory stays bounded however much a worker writes: a line longer than [`MAX_LINE`] is cut
//! into several prefixed lines (nothing is dropped), and lines go through a bounded queue to a
//! single writer. When the primary's own output is slow, the queue fills, the readers wait and
//! the workers block in `write` — backpressure, as with any pipe, instead of a buffer that
//! grows until the machine swaps (PM2's daemon is known to reach gigabytes that way).
//!
//! A pool may bound how many lines of each worker are relayed (`log_rate_limit`, as journald's
//! `RateLimitBurst` per `RateLimitIntervalSec`): lines beyond it in a window are dropped and
//! counted, and the count is written as one line when the next window lets a line through or
//! the worker's pipes close. Off by default: an app's own output is its log, every line kept.
//!
//! A worker that says an address is already in use (`EADDRINUSE`, "address already in use")
//! gets the hint given for it logged once per pool (an `address_in_use` warning): what ustad
//! holds and what to do (see [`crate::preload`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter, Interest};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{LogRateLimit, OutputTarget};
use crate::control::protocol::LogLine;
use crate::logbook::LogBook;

/// The longest line relayed in one piece, in bytes.
pub const MAX_LINE: usize = 8 * 1024;
/// Lines queued between the readers and the writer.
const QUEUE: usize = 256;

/// How prefixes look.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputStyle {
    /// Colour prefixes on stdout (it is a terminal).
    pub color_stdout: bool,
    /// Colour prefixes on stderr.
    pub color_stderr: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug)]
struct Line {
    stream: Stream,
    /// Where it goes: the primary's own stream (`None`), or a log file.
    file: Option<Arc<LogFile>>,
    prefix: Arc<Prefix>,
    text: Vec<u8>,
}

/// What the writer is asked to do.
#[derive(Debug)]
enum Relayed {
    Line(Line),
    /// Close every log file, to open it again (by its name) at its next line: an outside
    /// rotator (logrotate) has renamed it.
    Reopen,
}

/// A pool's log file (`stdout = "file:…"`), as its lines say where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// The file.
    pub path: PathBuf,
    /// Rotate it before it grows past this.
    pub max_size: Option<u64>,
    /// Rotated files kept: `path.1` (newest) to `path.N`.
    pub keep: u32,
}

/// Whose output is relayed.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A worker: prefixed `pool.slot`.
    Worker {
        /// Its pool.
        pool: &'a str,
        /// Its slot.
        slot: usize,
        /// Its id.
        id: u64,
    },
    /// A pool's `before_start` command: prefixed `pool.before_start`, slot and id 0 in
    /// `ustad logs --json`.
    BeforeStart {
        /// The pool.
        pool: &'a str,
    },
}

impl std::fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Worker { pool, slot, id } => write!(f, "{pool}.{slot} (id {id})"),
            Source::BeforeStart { pool } => write!(f, "pool {pool}'s before_start"),
        }
    }
}

#[derive(Debug)]
struct Prefix {
    name: String,
    color: u8,
    pool: String,
    slot: usize,
    id: u64,
    /// What to log if the worker says an address is already in use, and whether its pool
    /// had it logged already.
    hint: Option<Arc<Hint>>,
    /// The pool's `log_rate_limit`, counted over both of the worker's streams.
    limit: Option<Mutex<RateWindow>>,
}

/// One worker's lines in the current window of its pool's `log_rate_limit`.
#[derive(Debug)]
struct RateWindow {
    limit: LogRateLimit,
    start: Instant,
    relayed: u32,
    /// Lines dropped in this window and earlier ones, not yet reported.
    suppressed: u64,
}

/// What to do with a line under a rate limit.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Relay it.
    Relay,
    /// Relay it, after a line saying that this many were dropped before it.
    RelayAfterSuppressed(u64),
    /// Drop it.
    Drop,
}

impl RateWindow {
    fn new(limit: LogRateLimit, now: Instant) -> RateWindow {
        RateWindow {
            limit,
            start: now,
            relayed: 0,
            suppressed: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Admit {
        if now.saturating_duration_since(self.start) >= self.limit.per {
            self.start = now;
            self.relayed = 0;
        }
        if self.relayed >= self.limit.lines {
            self.suppressed = self.suppressed.saturating_add(1);
            return Admit::Drop;
        }
        self.relayed += 1;
        match std::mem::take(&mut self.suppressed) {
            0 => Admit::Relay,
            dropped => Admit::RelayAfterSuppressed(dropped),
        }
    }

    /// Lines dropped and not yet reported, now reported.
    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

impl Prefix {
    fn admit(&self) -> Admit {
        match &self.limit {
            None => Admit::Relay,
            Some(window) => window
                .lock()
                .map_or(Admit::Relay, |mut window| window.admit(Instant::now())),
        }
    }

    fn take_suppressed(&self) -> u64 {
        self.limit
            .as_ref()
            .and_then(|window| window.lock().ok().map(|mut w| w.take_suppressed()))
            .unwrap_or(0)
    }

    /// The line that reports `dropped` lines, logged as an `output_suppressed` event too.
    fn suppressed_line(&self, dropped: u64) -> Vec<u8> {
        let limit = self
            .limit
            .as_ref()
            .and_then(|window| window.lock().ok().map(|w| w.limit.to_string()))
            .unwrap_or_default();
        tracing::warn!(
            event = "output_suppressed",
            pool = self.pool,
            slot = self.slot,
            id = self.id,
            lines = dropped,
            "{}: {dropped} lines of output dropped (log_rate_limit {limit})",
            self.name
        );
        format!("ustad: {dropped} lines dropped here (log_rate_limit {limit})").into_bytes()
    }
}

/// The relay: one writer task, and two reader tasks per worker.
#[derive(Debug)]
pub struct OutputRelay {
    queue: mpsc::Sender<Relayed>,
    readers: JoinSet<()>,
    writer: JoinHandle<()>,
    /// Per pool: its `address_in_use` hint, shared by its workers.
    hints: HashMap<String, Arc<Hint>>,
    /// Each worker's pipes (by worker id): stdout, stderr, while their readers hold them.
    pipes: HashMap<u64, [Weak<Pipe>; 2]>,
}

/// A worker's pipe, registered with the runtime.
type Pipe = AsyncFd<OwnedFd>;

impl OutputRelay {
    /// Starts the writer task (on the current tokio runtime).
    /// Every line also goes to `book`, for `ustad logs`.
    pub fn start(style: OutputStyle, book: LogBook) -> OutputRelay {
        let (queue, lines) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(write_lines(
            lines,
            style,
            Some(book),
            tokio::io::stdout(),
            tokio::io::stderr(),
        ));
        OutputRelay {
            queue,
            readers: JoinSet::new(),
            writer,
            hints: HashMap::new(),
            pipes: HashMap::new(),
        }
    }

    /// Relays what is still in the workers' pipes, then flushes. Readers whose pipe is still
    /// held open (by a process that outlived its worker) are given up after `grace`.
    pub async fn finish(self, grace: Duration) {
        let OutputRelay {
            queue,
            mut readers,
            writer,
            hints: _,
            pipes: _,
        } = self;
        drop(queue);
        let drained = tokio::time::timeout(grace, async {
            while readers.join_next().await.is_some() {}
        });
        if drained.await.is_err() {
            readers.shutdown().await;
        }
        let _ = tokio::time::timeout(grace, writer).await;
    }

    /// Closes the pools' log files, to reopen them by name at their next line (SIGUSR1, after
    /// an outside rotator renamed them).
    pub fn reopen(&self) {
        let queue = self.queue.clone();
        tokio::spawn(async move {
            let _ = queue.send(Relayed::Reopen).await;
        });
    }

    /// Relays the output of a child of `source` started with `spec`'s settings: the pipes
    /// it has (a stream that is `inherit` or `null` has none), to a log file for a `file:`
    /// target, under the pool's `log_rate_limit`.
    pub fn attach_child(
        &mut self,
        source: Source<'_>,
        child: &mut tokio::process::Child,
        spec: &crate::config::PoolSpec,
        hint: Option<String>,
    ) {
        let pipe = |pipe: Option<std::io::Result<OwnedFd>>| match pipe? {
            Ok(fd) => Some(fd),
            Err(error) => {
                tracing::error!("cannot relay the output of {source}: {error}");
                None
            }
        };
        let pipes = [
            pipe(child.stdout.take().map(|p| p.into_owned_fd())),
            pipe(child.stderr.take().map(|p| p.into_owned_fd())),
        ];
        self.attach_pipes(source, pipes, spec, hint);
    }

    /// Relays a child's stdout and stderr pipes (those it has) as
    /// [`attach_child`](OutputRelay::attach_child) does; for the pipes of a worker an upgrade
    /// handed over, too.
    pub fn attach_pipes(
        &mut self,
        source: Source<'_>,
        [stdout, stderr]: [Option<OwnedFd>; 2],
        spec: &crate::config::PoolSpec,
        hint: Option<String>,
    ) {
        let (stdout_target, stderr_target) = spec.outputs();
        let log_file = |target: OutputTarget| match target {
            OutputTarget::File(path) => Some(LogFile {
                path,
                max_size: spec.log_max_size.map(|size| size.0),
                keep: spec.log_keep,
            }),
            _ => None,
        };
        self.attach(
            source,
            (stdout, log_file(stdout_target)),
            (stderr, log_file(stderr_target)),
            hint,
            spec.log_rate_limit,
        );
    }

    /// The pipes of worker `id` still relayed (stdout, stderr), marked to survive an
    /// upgrade's exec.
    ///
    /// # Errors
    /// When their flags cannot be changed.
    pub fn hand_over(
        &self,
        id: u64,
        keep: &mut crate::handover::Keep,
    ) -> std::io::Result<[Option<RawFd>; 2]> {
        let mut numbers = [None, None];
        if let Some(pipes) = self.pipes.get(&id) {
            for (number, pipe) in numbers.iter_mut().zip(pipes) {
                if let Some(pipe) = pipe.upgrade() {
                    *number = Some(keep.fd(pipe.get_ref())?);
                }
            }
        }
        Ok(numbers)
    }

    /// Relays a worker's output streams until they close: to the primary's own streams, or,
    /// for a stream with a log file, to that file. `hint` is logged (once for the pool) if the
    /// worker says an address is already in use.
    fn attach(
        &mut self,
        source: Source<'_>,
        (stdout, stdout_file): (Option<OwnedFd>, Option<LogFile>),
        (stderr, stderr_file): (Option<OwnedFd>, Option<LogFile>),
        hint: Option<String>,
        rate_limit: Option<LogRateLimit>,
    ) {
        let (pool, slot, id, name) = match source {
            Source::Worker { pool, slot, id } => (pool, slot, id, format!("{pool}.{slot}")),
            Source::BeforeStart { pool } => (pool, 0, 0, format!("{pool}.before_start")),
        };
        let hint = hint.map(|text| {
            // One copy per pool, whatever its size; a new text (after a reload) starts over.
            match self.hints.get(pool) {
                Some(known) if *known.text == *text => known.clone(),
                _ => {
                    let hint = Arc::new(Hint {
                        text: text.into(),
                        given: AtomicBool::new(false),
                    });
                    self.hints.insert(pool.to_owned(), hint.clone());
                    hint
                }
            }
        });
        // Six distinguishable ANSI colours (31–36), by slot.
        let prefix = Arc::new(Prefix {
            name,
            color: 31 + (slot % 6) as u8,
            pool: pool.to_owned(),
            slot,
            id,
            hint,
            limit: rate_limit.map(|limit| Mutex::new(RateWindow::new(limit, Instant::now()))),
        });
        // Forget readers that are done, so the set does not grow with every restart.
        while self.readers.try_join_next().is_some() {}
        self.pipes
            .retain(|_, pipes| pipes.iter().any(|pipe| pipe.strong_count() > 0));
        let mut registered = [Weak::new(), Weak::new()];
        for (at, (pipe, stream, file)) in [
            (stdout, Stream::Stdout, stdout_file),
            (stderr, Stream::Stderr, stderr_file),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(pipe) = pipe.and_then(register_pipe) else {
                continue;
            };
            registered[at] = Arc::downgrade(&pipe);
            self.readers.spawn(read_lines(
                pipe,
                (stream, file.map(Arc::new)),
                prefix.clone(),
                self.queue.clone(),
            ));
        }
        if id != 0 {
            self.pipes.insert(id, registered);
        }
    }
}

/// A worker's pipe, ready to be read without blocking the supervisor's thread (tokio hands a
/// child's pipe over in blocking mode); `None` if it cannot be.
fn register_pipe(pipe: OwnedFd) -> Option<Arc<Pipe>> {
    rustix::io::ioctl_fionbio(&pipe, true).ok()?;
    crate::sys::register_fd(pipe, Interest::READABLE)
        .ok()
        .map(Arc::new)
}

/// Bytes read from a pipe at once, into a buffer that every reader of the thread shares.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Relays one pipe of a worker, line by line, until it closes.
///
/// A quiet worker costs no buffer: the task waits for its pipe to become readable, reads what
/// is there into the thread's scratch buffer, and keeps only the start of a line that has not
/// ended yet. (A buffer per pipe, 8 KiB twice per worker, was 18 KiB of the primary's memory
/// per worker, most of it for a thousand workers that rarely write.)
async fn read_lines(
    pipe: Arc<Pipe>,
    (stream, file): (Stream, Option<Arc<LogFile>>),
    prefix: Arc<Prefix>,
    queue: mpsc::Sender<Relayed>,
) {
    let mut partial = Vec::new();
    let mut lines = Vec::new();
    let mut open = true;
    while open {
        let Ok(mut ready) = pipe.readable().await else {
            break;
        };
        match ready.try_io(|pipe| read_some(pipe.get_ref(), &mut partial, &mut lines)) {
            Ok(Ok(more)) => open = more,
            Ok(Err(_)) => open = false,
            Err(_would_block) => continue,
        }
        for text in lines.drain(..) {
            hint_if_address_in_use(&prefix, &text);
            let dropped = match prefix.admit() {
                Admit::Drop => continue,
                Admit::Relay => None,
                Admit::RelayAfterSuppressed(dropped) => Some(dropped),
            };
            let line = |text| {
                Relayed::Line(Line {
                    stream,
                    file: file.clone(),
                    prefix: prefix.clone(),
                    text,
                })
            };
            if let Some(dropped) = dropped {
                if queue
                    .send(line(prefix.suppressed_line(dropped)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if queue.send(line(text)).await.is_err() {
                return;
            }
        }
    }
    let mut last = Vec::new();
    if !partial.is_empty() {
        hint_if_address_in_use(&prefix, &partial);
        match prefix.admit() {
            Admit::Drop => {}
            Admit::Relay => last.push(partial),
            Admit::RelayAfterSuppressed(dropped) => {
                last.push(prefix.suppressed_line(dropped));
                last.push(partial);
            }
        }
    }
    // The worker's end: what it had dropped is said now rather than never.
    match prefix.take_suppressed() {
        0 => {}
        dropped => last.push(prefix.suppressed_line(dropped)),
    }
    for text in last {
        let line = Line {
            stream,
            file: file.clone(),
            prefix: prefix.clone(),
            text,
        };
        let _ = queue.send(Relayed::Line(line)).await;
    }
}

/// What to log when a worker of a pool says an address is already in use, and whether it was.
#[derive(Debug)]
struct Hint {
    text: Box<str>,
    given: AtomicBool,
}

/// Logs the worker's hint, once for its pool, if `line` says an address is already in use.
fn hint_if_address_in_use(prefix: &Prefix, line: &[u8]) {
    let Some(hint) = &prefix.hint else {
        return;
    };
    if hint.given.load(Ordering::Relaxed) || !says_address_in_use(line) {
        return;
    }
    if hint.given.swap(true, Ordering::Relaxed) {
        return;
    }
    let text = String::from_utf8_lossy(line);
    tracing::warn!(
        event = "address_in_use",
        pool = %prefix.pool,
        slot = prefix.slot,
        id = prefix.id,
        line = %text.trim_end(),
        "{}: {}",
        prefix.name,
        hint.text
    );
}

/// Whether a line of output reports `EADDRINUSE`, as Node ("EADDRINUSE"), Go, Python, Rust
/// and C programs ("address already in use", strerror's words) spell it.
///
/// Every line of every worker passes here until its pool's hint is given, so it looks for
/// what both spellings hold, a "dd" (either case), in one cheap pass, and compares the
/// phrases only where one is: comparing them at every byte took three quarters of the
/// relay's time (3.9 µs of the primary's CPU per 80-byte line; 0.8 µs since).
fn says_address_in_use(line: &[u8]) -> bool {
    /// "dd" at 1.
    const STRERROR: &[u8] = b"address already in use";
    /// "DD" at 2.
    const ERRNO: &[u8] = b"EADDRINUSE";
    let is_at = |start: Option<usize>, phrase: &[u8]| {
        start
            .and_then(|start| line.get(start..start.checked_add(phrase.len())?))
            .is_some_and(|window| window.eq_ignore_ascii_case(phrase))
    };
    // `| 0x20` folds `D` to `d`, and no other byte to `d`.
    line.windows(2)
        .enumerate()
        .filter(|(_, pair)| (pair[0] | 0x20) == b'd' && (pair[1] | 0x20) == b'd')
        .any(|(at, _)| is_at(at.checked_sub(1), STRERROR) || is_at(at.checked_sub(2), ERRNO))
}

/// One `read` of `pipe` into the scratch buffer, split into complete `lines`; what does not end
/// a line stays in `partial`. `Ok(false)` at the end of the pipe.
fn read_some(
    pipe: &OwnedFd,
    partial: &mut Vec<u8>,
    lines: &mut Vec<Vec<u8>>,
) -> std::io::Result<bool> {
    SCRATCH_BUFFER.with_borrow_mut(|scratch| {
        scratch.resize(SCRATCH, 0);
        let read = rustix::io::read(pipe, &mut scratch[..])?;
        split_lines(partial, &scratch[..read], lines);
        Ok(read > 0)
    })
}

/// Appends `input` to the line begun in `partial`, moving each complete line (without its
/// newline) to `lines`. A line is cut into pieces of [`MAX_LINE`] bytes: nothing is dropped,
/// and no line grows without bound.
fn split_lines(partial: &mut Vec<u8>, mut input: &[u8], lines: &mut Vec<Vec<u8>>) {
    while !input.is_empty() {
        let room = MAX_LINE - partial.len();
        match input.iter().position(|b| *b == b'\n') {
            Some(end) if end <= room => {
                partial.extend_from_slice(&input[..end]);
                lines.push(std::mem::take(partial));
                input = &input[end + 1..];
            }
            _ => {
                let take = input.len().min(room);
                partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if partial.len() >= MAX_LINE {
                    lines.push(std::mem::take(partial));
                }
            }
        }
    }
}

async fn write_lines(
    mut lines: mpsc::Receiver<Relayed>,
    style: OutputStyle,
    book: Option<LogBook>,
    stdout: impl AsyncWrite + Unpin,
    stderr: impl AsyncWrite + Unpin,
) {
    let mut stdout = BufWriter::new(stdout);
    let mut stderr = BufWriter::new(stderr);
    let mut files = LogFiles::default();
    let mut width = 0;
    while let Some(first) = lines.recv().await {
        let mut batch = vec![first];
        // Write whatever else is already queued before flushing, up to a bound.
        while batch.len() < 256 {
            match lines.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |t| t.as_secs_f64());
        for relayed in batch {
            let line = match relayed {
                Relayed::Line(line) => line,
                Relayed::Reopen => {
                    files.close_all();
                    continue;
                }
            };
            if let Some(book) = &book {
                let text = line.text.strip_suffix(b"\r").unwrap_or(&line.text);
                book.record(LogLine {
                    time: now,
                    pool: line.prefix.pool.clone(),
                    slot: line.prefix.slot,
                    id: line.prefix.id,
                    stream: match line.stream {
                        Stream::Stdout => "stdout",
                        Stream::Stderr => "stderr",
                    }
                    .to_owned(),
                    line: String::from_utf8_lossy(text).into_owned(),
                });
            }
            if let Some(file) = &line.file {
                // Aligned per file would need every pool's names: the plain prefix.
                let text = format_line(&line.prefix, 0, false, &line.text);
                files.write(file, &text);
                continue;
            }
            width = width.max(line.prefix.name.len());
            // A closed or failing output (EPIPE) must not stop the relay: the workers would
            // block on full pipes.
            let _ = match line.stream {
                Stream::Stdout => {
                    let text = format_line(&line.prefix, width, style.color_stdout, &line.text);
                    stdout.write_all(&text).await
                }
                Stream::Stderr => {
                    let text = format_line(&line.prefix, width, style.color_stderr, &line.text);
                    stderr.write_all(&text).await
                }
            };
        }
        let _ = stdout.flush().await;
        let _ = stderr.flush().await;
        files.flush();
    }
    files.flush();
}

/// The log files open for writing, by path. Lines are whole when they are written (the
/// relay cut them), and one writer writes them all in order, so a rotation falls between two
/// lines and loses none.
#[derive(Debug, Default)]
struct LogFiles {
    open: std::collections::HashMap<PathBuf, OpenLog>,
    /// Files that could not be opened, already said in the log (until one opens again).
    failing: std::collections::HashSet<PathBuf>,
}

#[derive(Debug)]
struct OpenLog {
    file: std::io::BufWriter<std::fs::File>,
    size: u64,
}

impl LogFiles {
    fn write(&mut self, log: &LogFile, line: &[u8]) {
        let len = line.len() as u64;
        let full = self.open.get(&log.path).is_some_and(|open| {
            log.max_size
                .is_some_and(|max| open.size > 0 && open.size + len > max)
        });
        if full {
            if let Some(mut open) = self.open.remove(&log.path) {
                let _ = std::io::Write::flush(&mut open.file);
            }
            if let Err(error) = rotate(log) {
                tracing::error!(path = %log.path.display(), "cannot rotate log file {}: {error}", log.path.display());
            }
        }
        if !self.open.contains_key(&log.path) {
            match open_log(&log.path) {
                Ok(open) => {
                    self.failing.remove(&log.path);
                    self.open.insert(log.path.clone(), open);
                }
                Err(error) => {
                    if self.failing.insert(log.path.clone()) {
                        tracing::error!(path = %log.path.display(), "cannot write log file {}: {error}; its lines are dropped until it can be opened", log.path.display());
                    }
                    return;
                }
            }
        }
        if let Some(open) = self.open.get_mut(&log.path) {
            if std::io::Write::write_all(&mut open.file, line).is_ok() {
                open.size += len;
            }
        }
    }

    fn flush(&mut self) {
        for open in self.open.values_mut() {
            let _ = std::io::Write::flush(&mut open.file);
        }
    }

    fn close_all(&mut self) {
        self.flush();
        self.open.clear();
    }
}

fn open_log(path: &Path) -> std::io::Result<OpenLog> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok(OpenLog {
        file: std::io::BufWriter::with_capacity(64 * 1024, file),
        size,
    })
}

/// `app.log` → `app.log.1`, `app.log.1` → `app.log.2`, … keeping `keep` of them (none: the
/// file is removed).
fn rotate(log: &LogFile) -> std::io::Result<()> {
    let numbered = |n: u32| {
        let mut name = log.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if log.keep == 0 {
        return std::fs::remove_file(&log.path);
    }
    for n in (1..log.keep).rev() {
        match std::fs::rename(numbered(n), numbered(n + 1)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    std::fs::rename(&log.path, numbered(1))
}

fn format_line(prefix: &Prefix, width: usize, color: bool, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(width + text.len() + 16);
    let name = format!("{:width$}", prefix.name);
    if color {
        out.extend_from_slice(format!("\x1b[{}m{name}\x1b[0m | ", prefix.color).as_bytes());
    } else {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b" | ");
    }
    out.extend_from_slice(text.strip_suffix(b"\r").unwrap_or(text));
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real pipe with `input` written into it (by a thread, as a worker would), then closed:
    /// its read end, in blocking mode as tokio hands a child's pipe over, and the writer to
    /// join.
    fn filled_pipe(input: &[u8]) -> (OwnedFd, std::thread::JoinHandle<()>) {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let mut file = std::fs::File::from(write);
            std::io::Write::write_all(&mut file, &input).unwrap();
        });
        (read, writer)
    }

    /// What the relay makes of `input` written to a real pipe, which is then closed.
    async fn relay(input: &[u8]) -> Vec<Vec<u8>> {
        relay_limited(input, None).await
    }

    /// The same, under a rate limit.
    async fn relay_limited(input: &[u8], limit: Option<LogRateLimit>) -> Vec<Vec<u8>> {
        let (read, writer) = filled_pipe(input);
        let (queue, mut lines) = mpsc::channel(1 << 16);
        let prefix = Arc::new(Prefix {
            name: "web.0".into(),
            color: 31,
            pool: "web".into(),
            slot: 0,
            id: 1,
            hint: None,
            limit: limit.map(|limit| Mutex::new(RateWindow::new(limit, Instant::now()))),
        });
        read_lines(
            register_pipe(read).expect("a pipe"),
            (Stream::Stdout, None),
            prefix,
            queue,
        )
        .await;
        writer.join().unwrap();
        let mut out = Vec::new();
        while let Ok(line) = lines.try_recv() {
            if let Relayed::Line(line) = line {
                out.push(line.text);
            }
        }
        out
    }

    #[tokio::test]
    async fn lines_are_split_at_newlines_and_a_last_partial_line_is_kept() {
        assert_eq!(
            relay(b"one\ntwo\nthree").await,
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn a_rate_window_relays_its_lines_then_counts_the_dropped_until_the_next_window() {
        let start = Instant::now();
        let limit = LogRateLimit {
            lines: 2,
            per: Duration::from_secs(10),
        };
        let mut window = RateWindow::new(limit, start);
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(window.admit(at(0)), Admit::Relay);
        assert_eq!(window.admit(at(1)), Admit::Relay);
        assert_eq!(window.admit(at(2)), Admit::Drop);
        assert_eq!(window.admit(at(9)), Admit::Drop);
        // The next window lets lines through, the first one after the count of the dropped.
        assert_eq!(window.admit(at(10)), Admit::RelayAfterSuppressed(2));
        assert_eq!(window.admit(at(11)), Admit::Relay);
        assert_eq!(window.admit(at(12)), Admit::Drop);
        assert_eq!(window.take_suppressed(), 1);
        assert_eq!(window.take_suppressed(), 0, "reported once");
    }

    #[tokio::test]
    async fn a_worker_over_its_rate_limit_has_the_rest_counted_in_one_line_at_its_end() {
        let input: String = (1..=10).map(|n| format!("line {n}\n")).collect();
        let limit = LogRateLimit {
            lines: 3,
            per: Duration::from_secs(3600),
        };
        let out = relay_limited(input.as_bytes(), Some(limit)).await;
        let out: Vec<String> = out
            .into_iter()
            .map(|line| String::from_utf8(line).unwrap())
            .collect();
        assert_eq!(
            out,
            [
                "line 1",
                "line 2",
                "line 3",
                "ustad: 7 lines dropped here (log_rate_limit 3/1h)"
            ]
        );
    }

    #[test]
    fn a_log_file_rotates_between_lines_and_keeps_the_newest_few() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let log = LogFile {
            path: path.clone(),
            max_size: Some(20),
            keep: 2,
        };
        let mut files = LogFiles::default();
        for n in 0..6 {
            files.write(&log, format!("line {n} .....\n").as_bytes());
        }
        files.flush();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        // 14 bytes a line, 20 at most a file: one line each; two rotated files kept.
        assert_eq!(read("app.log"), "line 5 .....\n");
        assert_eq!(read("app.log.1"), "line 4 .....\n");
        assert_eq!(read("app.log.2"), "line 3 .....\n");
        assert!(!dir.path().join("app.log.3").exists());
        // A line longer than the limit is written whole, in a file of its own.
        files.write(&log, &[b'x'; 50]);
        files.flush();
        assert_eq!(read("app.log").len(), 50);
        // keep = 0: no rotated file at all.
        let none = LogFile { keep: 0, ..log };
        files.write(&none, b"next\n");
        files.flush();
        assert_eq!(read("app.log"), "next\n");
    }

    #[test]
    fn split_lines_keeps_a_partial_line_and_no_memory_once_a_line_ends() {
        let mut partial = Vec::new();
        let mut lines = Vec::new();
        split_lines(&mut partial, b"a\nbc", &mut lines);
        split_lines(&mut partial, b"d\n\ne", &mut lines);
        assert_eq!(lines, [b"a".to_vec(), b"bcd".to_vec(), Vec::new()]);
        assert_eq!(partial, b"e");
        split_lines(&mut partial, b"\n", &mut lines);
        assert_eq!(partial.capacity(), 0, "an idle reader holds no buffer");
    }

    /// A worker that writes a line and then stays quiet must not block the supervisor's thread
    /// in `read` (tokio hands its pipe over in blocking mode).
    #[tokio::test]
    async fn a_quiet_worker_never_blocks_the_thread() {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let (go_on, wait) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            let mut file = std::fs::File::from(write);
            std::io::Write::write_all(&mut file, b"first\n").unwrap();
            wait.recv().unwrap();
            std::io::Write::write_all(&mut file, b"second\n").unwrap();
        });
        let (queue, mut lines) = mpsc::channel(16);
        let prefix = Arc::new(Prefix {
            name: "web.0".into(),
            color: 31,
            pool: "web".into(),
            slot: 0,
            id: 1,
            hint: None,
            limit: None,
        });
        let reader = tokio::spawn(read_lines(
            register_pipe(read).expect("a pipe"),
            (Stream::Stdout, None),
            prefix,
            queue,
        ));
        let text = |relayed: Option<Relayed>| match relayed {
            Some(Relayed::Line(line)) => line.text,
            other => panic!("not a line: {other:?}"),
        };
        assert_eq!(text(lines.recv().await), b"first");
        // The reader waits for more; this task still runs.
        tokio::task::yield_now().await;
        go_on.send(()).unwrap();
        assert_eq!(text(lines.recv().await), b"second");
        writer.join().unwrap();
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn more_than_a_pipe_holds_comes_through_whole_and_in_order() {
        let input: Vec<u8> = (0..20_000)
            .flat_map(|n| format!("line {n}\n").into_bytes())
            .collect();
        let lines = relay(&input).await;
        assert_eq!(lines.len(), 20_000);
        assert_eq!(lines[19_999], b"line 19999");
    }

    #[tokio::test]
    async fn an_endless_line_is_cut_into_bounded_pieces_without_loss() {
        let input = vec![b'x'; MAX_LINE * 3 + 10];
        let lines = relay(&input).await;
        assert_eq!(
            lines.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_LINE, MAX_LINE, MAX_LINE, 10]
        );
    }

    #[test]
    fn prefixes_are_aligned_and_coloured_only_when_asked() {
        let prefix = Prefix {
            name: "web.2".into(),
            color: 33,
            pool: "web".into(),
            slot: 2,
            id: 7,
            hint: None,
            limit: None,
        };
        assert_eq!(format_line(&prefix, 7, false, b"hi\r"), b"web.2   | hi\n");
        assert_eq!(
            format_line(&prefix, 5, true, b"hi"),
            b"\x1b[33mweb.2\x1b[0m | hi\n"
        );
    }

    #[tokio::test]
    async fn the_writer_prefixes_each_stream() {
        let (queue, lines) = mpsc::channel(QUEUE);
        let (out_write, mut out_read) = tokio::io::duplex(1 << 16);
        let (err_write, mut err_read) = tokio::io::duplex(1 << 16);
        let book = LogBook::default();
        let writer = tokio::spawn(write_lines(
            lines,
            OutputStyle::default(),
            Some(book.clone()),
            out_write,
            err_write,
        ));
        let prefix = Arc::new(Prefix {
            name: "jobs.1".into(),
            color: 32,
            pool: "jobs".into(),
            slot: 1,
            id: 4,
            hint: None,
            limit: None,
        });
        let (stdout, out_writer) = filled_pipe(b"to stdout\n");
        read_lines(
            register_pipe(stdout).expect("a pipe"),
            (Stream::Stdout, None),
            prefix.clone(),
            queue.clone(),
        )
        .await;
        let (stderr, err_writer) = filled_pipe(b"to stderr\n");
        read_lines(
            register_pipe(stderr).expect("a pipe"),
            (Stream::Stderr, None),
            prefix,
            queue,
        )
        .await;
        out_writer.join().unwrap();
        err_writer.join().unwrap();
        writer.await.unwrap();
        let mut out = String::new();
        let mut err = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut out_read, &mut out)
            .await
            .unwrap();
        tokio::io::AsyncReadExt::read_to_string(&mut err_read, &mut err)
            .await
            .unwrap();
        assert_eq!(out, "jobs.1 | to stdout\n");
        assert_eq!(err, "jobs.1 | to stderr\n");
        let kept: Vec<_> = book
            .recent(Some("jobs"), 10)
            .iter()
            .map(|l| (l.id, l.stream.clone(), l.line.clone()))
            .collect();
        assert_eq!(
            kept,
            [
                (4, "stdout".to_owned(), "to stdout".to_owned()),
                (4, "stderr".to_owned(), "to stderr".to_owned())
            ]
        );
    }

    #[test]
    fn address_in_use_is_recognised_as_programs_say_it() {
        for line in [
            "Error: listen EADDRINUSE: address already in use :::3000",
            "listen tcp 127.0.0.1:3000: bind: address already in use",
            "OSError: [Errno 98] Address already in use",
            "Error: Os { code: 98, kind: AddrInUse, message: \"Address already in use\" }",
            "EADDRINUSE",
            "address already in use",
            "x ADDRESS ALREADY IN USE",
            "dd address already in use dd",
        ] {
            assert!(says_address_in_use(line.as_bytes()), "{line}");
        }
        for line in [
            "listening on 3000",
            "address in",
            "",
            "d",
            "dd",
            "ADDRESS ALREADY IN US",
            "EADDRINUS",
            "remote address 10.0.0.1, add-on hidden",
        ] {
            assert!(!says_address_in_use(line.as_bytes()), "{line}");
        }
    }
}
