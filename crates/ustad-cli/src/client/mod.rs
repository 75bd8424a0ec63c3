//! The client commands (`ustad status`, `reload`, `scale`, `restart`, `stop`, `logs`): each
//! finds the running instance, sends one request over its control socket and prints the
//! answer.

mod table;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ustad_core::config::value::format_duration;
use ustad_core::control::client::{self, Answer};
use ustad_core::control::paths::Target;
use ustad_core::control::protocol::{Progress, Reply, Request};

use crate::exit::Failure;

fn connect(target: &Target, request: &Request) -> Result<Answer, Failure> {
    let path = target.resolve().map_err(Failure::runtime)?;
    client::send(&path, request).map_err(|e| Failure::runtime(e.to_string()))
}

/// Sends a request and prints its final answer (`done` → stdout, `error` → exit 1).
fn simple(target: &Target, request: &Request) -> ExitCode {
    let result = connect(target, request).and_then(|answer| {
        answer
            .finish(|_| {})
            .map_err(|e| Failure::runtime(e.to_string()))
    });
    finish(result)
}

fn finish(result: Result<Reply, Failure>) -> ExitCode {
    match result {
        Ok(Reply::Done { message }) => {
            if !message.is_empty() {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
        Ok(Reply::Error { message }) => Failure::runtime(message).report(),
        Ok(other) => Failure::runtime(format!("unexpected answer: {other:?}")).report(),
        Err(failure) => failure.report(),
    }
}

/// `ustad status [--json]`.
pub(crate) fn status(target: &Target, json: bool) -> ExitCode {
    let reply = connect(target, &Request::Status {}).and_then(|answer| {
        answer
            .finish(|_| {})
            .map_err(|e| Failure::runtime(e.to_string()))
    });
    match reply {
        Ok(Reply::Status(status)) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serializes")
                );
            } else {
                let color = std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
                print!("{}", table::render(&status, color));
            }
            ExitCode::SUCCESS
        }
        other => finish(other),
    }
}

/// `ustad reload [POOL…] [--wait]`.
pub(crate) fn reload(target: &Target, pools: Vec<String>, wait: bool) -> ExitCode {
    let answer = match connect(target, &Request::Reload { pools, wait }) {
        Ok(answer) => answer,
        Err(failure) => return failure.report(),
    };
    let live = std::io::stderr().is_terminal();
    let mut bars = ProgressBars::default();
    let result = answer
        .finish(|reply| {
            if let Reply::Progress(progress) = reply {
                bars.update(progress, live);
            }
        })
        .map_err(|e| Failure::runtime(e.to_string()));
    bars.end(live);
    finish(result)
}

/// `ustad upgrade [--binary PATH] [--wait]`: the primary checks the new binary and, if it
/// takes it, executes it in place and closes the connection as it does; with `--wait`, the
/// new program is asked for its `upgrade` record.
pub(crate) fn upgrade(target: &Target, binary: Option<PathBuf>, wait: bool) -> ExitCode {
    let path = match target.resolve() {
        Ok(path) => path,
        Err(error) => return Failure::runtime(error).report(),
    };
    let before = match status_of(&path) {
        Ok(status) => status,
        Err(failure) => return failure.report(),
    };
    let count = before.upgrade.as_ref().map_or(0, |upgrade| upgrade.count);
    let answer = match client::send(&path, &Request::Upgrade { binary }) {
        Ok(answer) => answer,
        Err(error) => return Failure::runtime(error.to_string()).report(),
    };
    match answer.finish(|_| {}) {
        Ok(Reply::Error { message }) => return Failure::runtime(message).report(),
        Ok(other) => {
            return Failure::runtime(format!("unexpected answer: {other:?}")).report();
        }
        // The connection closed without an answer: the primary executed the new program.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(error) => return Failure::runtime(error.to_string()).report(),
    }
    if !wait {
        println!(
            "ustad (pid {}) is executing the new program; `ustad status` shows the upgrade",
            before.pid
        );
        return ExitCode::SUCCESS;
    }
    // Requests wait in the control socket's backlog while the program changes.
    let deadline = std::time::Instant::now() + UPGRADE_WAIT;
    loop {
        match status_of(&path) {
            Ok(status) => match status.upgrade {
                Some(upgrade) if upgrade.count > count => {
                    println!(
                        "upgraded ustad {} → {} in place (pid {}): {} workers kept, {} gone; the control socket waited {:.1} ms",
                        upgrade.from,
                        status.version,
                        status.pid,
                        upgrade.workers_kept,
                        upgrade.workers_lost,
                        upgrade.switch_ms
                    );
                    return ExitCode::SUCCESS;
                }
                _ => {
                    return Failure::runtime(format!(
                        "ustad (pid {}) answers, but without a new upgrade: the new program could not take over (see ustad's log)",
                        status.pid
                    ))
                    .report();
                }
            },
            Err(failure) if std::time::Instant::now() >= deadline => return failure.report(),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// How long `upgrade --wait` waits for the new program.
const UPGRADE_WAIT: Duration = Duration::from_secs(30);

fn status_of(path: &std::path::Path) -> Result<ustad_core::status::ClusterStatus, Failure> {
    let reply = client::send(path, &Request::Status {})
        .and_then(|answer| answer.finish(|_| {}))
        .map_err(|e| Failure::runtime(e.to_string()))?;
    match reply {
        Reply::Status(status) => Ok(status),
        Reply::Error { message } => Err(Failure::runtime(message)),
        other => Err(Failure::runtime(format!("unexpected answer: {other:?}"))),
    }
}

/// Progress of `reload --wait`: one line per pool, redrawn in place on a terminal.
#[derive(Default)]
struct ProgressBars {
    pools: Vec<Progress>,
    drawn: usize,
}

impl ProgressBars {
    fn update(&mut self, progress: Progress, live: bool) {
        match self.pools.iter_mut().find(|p| p.pool == progress.pool) {
            Some(known) => *known = progress.clone(),
            None => self.pools.push(progress.clone()),
        }
        let mut err = std::io::stderr().lock();
        if live {
            // Back to the first line of the bars, then redraw them all.
            if self.drawn > 0 {
                let _ = write!(err, "\x1b[{}A", self.drawn);
            }
            for pool in &self.pools {
                let _ = writeln!(err, "\x1b[2K{}", bar(pool));
            }
            self.drawn = self.pools.len();
        } else {
            let _ = writeln!(err, "{}", bar(&progress));
        }
    }

    fn end(&mut self, _live: bool) {
        let _ = std::io::stderr().flush();
    }
}

fn bar(progress: &Progress) -> String {
    const WIDTH: usize = 30;
    let filled = (progress.replaced * WIDTH)
        .checked_div(progress.size)
        .unwrap_or(0)
        .min(WIDTH);
    format!(
        "{:<12} [{}{}] {}/{} {}",
        progress.pool,
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        progress.replaced,
        progress.size,
        progress.state
    )
}

/// `ustad scale POOL N|+N|-N`.
pub(crate) fn scale(target: &Target, pool: String, size: &str) -> ExitCode {
    let text = size.trim();
    let request = if let Some(delta) = text
        .strip_prefix('+')
        .or(text.strip_prefix('-').map(|_| text))
    {
        match delta.parse::<i64>() {
            Ok(delta) => Request::Scale {
                pool,
                size: None,
                delta: Some(delta),
            },
            Err(_) => return bad_size(size),
        }
    } else {
        match text.parse::<usize>() {
            Ok(n) => Request::Scale {
                pool,
                size: Some(n),
                delta: None,
            },
            Err(_) => return bad_size(size),
        }
    };
    simple(target, &request)
}

fn bad_size(size: &str) -> ExitCode {
    Failure::usage(format!(
        "invalid size `{size}`: expected a number of workers, +N or -N"
    ))
    .report()
}

/// `ustad restart POOL|WORKER_ID`.
pub(crate) fn restart(target: &Target, what: &str) -> ExitCode {
    let request = match what.parse::<u64>() {
        Ok(id) => Request::Restart {
            pool: None,
            worker: Some(id),
        },
        Err(_) => Request::Restart {
            pool: Some(what.to_owned()),
            worker: None,
        },
    };
    simple(target, &request)
}

/// `ustad stop [--timeout D]`: asks, then waits until the primary has exited.
pub(crate) fn stop(target: &Target, timeout: Option<Duration>) -> ExitCode {
    let request = Request::Stop {
        timeout: timeout.map(format_duration),
        worker: None,
    };
    let mut answer = match connect(target, &request) {
        Ok(answer) => answer,
        Err(failure) => return failure.report(),
    };
    match answer.next_reply() {
        Ok(Some(Reply::Done { message })) => eprintln!("{message}"),
        Ok(Some(Reply::Error { message })) => return Failure::runtime(message).report(),
        Ok(other) => return Failure::runtime(format!("unexpected answer: {other:?}")).report(),
        Err(error) => return Failure::runtime(error.to_string()).report(),
    }
    // The primary closes the connection when it exits.
    loop {
        match answer.next_reply() {
            Ok(None) | Err(_) => break,
            Ok(Some(_)) => {}
        }
    }
    println!("stopped");
    ExitCode::SUCCESS
}

/// `ustad stop WORKER_ID`: that worker only, not replaced.
pub(crate) fn stop_worker(target: &Target, id: u64) -> ExitCode {
    let request = Request::Stop {
        timeout: None,
        worker: Some(id),
    };
    simple(target, &request)
}

/// `ustad kill POOL|WORKER_ID [SIGNAL]`.
pub(crate) fn kill(target: &Target, what: &str, signal: &str) -> ExitCode {
    let (pool, worker) = match what.parse::<u64>() {
        Ok(id) => (None, Some(id)),
        Err(_) => (Some(what.to_owned()), None),
    };
    let request = Request::Kill {
        pool,
        worker,
        signal: Some(signal.to_owned()),
    };
    simple(target, &request)
}

/// `ustad events [--json]`: one line per event until the primary exits.
pub(crate) fn events(target: &Target, json: bool) -> ExitCode {
    let mut answer = match connect(target, &Request::Events {}) {
        Ok(answer) => answer,
        Err(failure) => return failure.report(),
    };
    let mut out = std::io::stdout().lock();
    loop {
        match answer.next_reply() {
            Ok(Some(Reply::Event(event))) => {
                let line = if json {
                    serde_json::to_string(&event).expect("an event serializes")
                } else {
                    event.message.clone()
                };
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // stdout closed (`ustad events | head`): done.
                    return ExitCode::SUCCESS;
                }
            }
            Ok(Some(Reply::Error { message })) => return Failure::runtime(message).report(),
            Ok(Some(_)) => {}
            // The primary exited: the stream is over.
            Ok(None) => return ExitCode::SUCCESS,
            Err(error) => return Failure::runtime(error.to_string()).report(),
        }
    }
}

/// `ustad logs [POOL] [-f] [-n N]`.
pub(crate) fn logs(target: &Target, pool: Option<String>, lines: usize, follow: bool) -> ExitCode {
    let request = Request::Logs {
        pool,
        lines,
        follow,
    };
    let mut answer = match connect(target, &request) {
        Ok(answer) => answer,
        Err(failure) => return failure.report(),
    };
    let mut out = std::io::stdout().lock();
    loop {
        match answer.next_reply() {
            Ok(Some(Reply::Log(line))) => {
                let written = writeln!(out, "{}.{} | {}", line.pool, line.slot, line.line)
                    .and_then(|()| if follow { out.flush() } else { Ok(()) });
                if written.is_err() {
                    // stdout closed (`ustad logs -f | head`): done.
                    return ExitCode::SUCCESS;
                }
            }
            Ok(Some(Reply::Done { .. })) => return ExitCode::SUCCESS,
            Ok(Some(Reply::Error { message })) => return Failure::runtime(message).report(),
            Ok(Some(_)) => {}
            Ok(None) if follow => {
                return Failure::runtime("ustad stopped").report();
            }
            Ok(None) => return ExitCode::SUCCESS,
            Err(error) => return Failure::runtime(error.to_string()).report(),
        }
    }
}
