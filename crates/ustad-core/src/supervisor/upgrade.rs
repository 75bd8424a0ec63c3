//! Upgrading ustad itself: the primary replaces its own program with `execve`, in place, so
//! that it keeps its pid. Its workers stay its children (their `PR_SET_PDEATHSIG` does not
//! fire: the thread that forked them does not exit), a service manager's main pid and
//! `NOTIFY_SOCKET` stay right, and every fd not marked close-on-exec stays open.
//!
//! The old program's side is here: the request, the check of the new binary (it runs, it is
//! a ustad that reads this state version and accepts this command line), the handover
//! document, and the exec. The document ([`Document`]) is JSON in a memfd whose number the
//! new program gets as `--handover=FD`; it lists every fd handed over, and the new program
//! (`resume`) takes them back and carries on with the same plan.
//!
//! What crosses the exec, and why each is safe, is in `docs/design.md` ("Upgrading ustad
//! itself"). In short: sockets, the notify and control sockets, the guard's pipe, and each
//! worker's output pipes and message channel cross as fds; the plan, the configuration and the
//! recent log lines cross as the document; the signals the primary answers are blocked from
//! just before the exec until the new program has its handlers (the mask and what is pending
//! survive `execve`; handlers do not). Anything that goes wrong before the exec changes
//! nothing: the fds are close-on-exec again, the signals unblocked, and the client told why.

use std::ffi::{CString, OsString};
use std::io::{self, Seek, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::Supervisor;
use super::guard::HandedGuard;
use crate::config::{Config, SocketMode};
use crate::control::protocol::{LogLine, Reply};
use crate::handover::Keep;
use crate::notify::HandedNotify;
use crate::plan::{Clock, STATE_VERSION};
use crate::sockets::HandedListeners;
use crate::status::UpgradeStatus;

/// The argument that tells a new program where its handover document is: `--handover=FD`.
pub const HANDOVER_FLAG: &str = "--handover";
/// The argument that asks a binary what it is, before an upgrade to it: it prints its
/// [`Capabilities`] as one JSON line and exits 0, having parsed the rest of the command line.
pub const CHECK_FLAG: &str = "--upgrade-check";
/// How long the new binary has to answer [`CHECK_FLAG`].
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The signals the primary answers, blocked across the exec (see [`crate::sys`]'s
/// `mask_signals`).
pub(super) const HELD_SIGNALS: [i32; 9] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGCHLD,
    libc::SIGURG,
];

/// How the primary's program was started, to start its successor the same way.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The program, as it was found when the primary started (the default new binary: a
    /// package manager that replaced the file leaves the new one at this path).
    pub exe: PathBuf,
    /// `argv[0]`.
    pub arg0: OsString,
    /// The arguments after `argv[0]`, without any `--handover`.
    pub args: Vec<OsString>,
}

/// What a binary says of itself when asked with [`CHECK_FLAG`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Its version.
    pub ustad: String,
    /// The versions of the state document it reads.
    pub state_versions: Vec<u32>,
}

impl Capabilities {
    /// This program's.
    pub fn this_program() -> Capabilities {
        Capabilities {
            ustad: crate::VERSION.to_owned(),
            state_versions: vec![STATE_VERSION],
        }
    }
}

/// An upgrade asked for, while its binary is being checked.
#[derive(Debug)]
pub(super) struct Pending {
    binary: PathBuf,
    replies: Option<mpsc::Sender<Reply>>,
    requested: Instant,
    /// The check's process, while it runs.
    check_pid: Option<u32>,
}

impl Pending {
    fn refuse(&self, why: &str) {
        refuse(self.replies.as_ref(), why);
    }
}

/// Logs why an upgrade does not happen, and tells the client that asked for it, if any.
fn refuse(replies: Option<&mpsc::Sender<Reply>>, why: &str) {
    error!(event = "upgrade_refused", "upgrade refused: {why}");
    if let Some(replies) = replies {
        let _ = replies.try_send(Reply::error(format!("upgrade refused: {why}")));
    }
}

/// The result of a check, for the loop.
pub(super) type Checked = (PathBuf, Result<Capabilities, String>);

/// One worker's part of the document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct HandedWorker {
    pub(super) id: u64,
    pub(super) pid: u32,
    /// A pidfd of it, opened by the old program: its parent, which has not reaped it, so the
    /// pid still names this process and no other (not read back from `/proc`).
    pub(super) pidfd: RawFd,
    /// Its stdout and stderr pipes, while relayed.
    pub(super) pipes: [Option<RawFd>; 2],
    /// The primary's end of its message channel.
    pub(super) channel: Option<RawFd>,
}

/// The handover document: everything the new program needs that is not in its own binary.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Document {
    /// [`STATE_VERSION`]; read first.
    pub(super) version: u32,
    /// The version of ustad that wrote it.
    pub(super) from: String,
    /// The new program.
    pub(super) binary: PathBuf,
    /// `CLOCK_MONOTONIC` (ns) when it was written, and when the upgrade was asked for.
    pub(super) written_ns: i64,
    pub(super) requested_ns: i64,
    /// Every fd handed over (but the document's own memfd, named by `--handover=FD`).
    pub(super) fds: Vec<RawFd>,
    /// The plan's own document (`Plan::snapshot`).
    pub(super) plan: Box<RawValue>,
    /// The configuration running.
    pub(super) config: Config,
    /// When the primary started (`CLOCK_MONOTONIC`, ns).
    pub(super) started_ns: i64,
    pub(super) listeners: HandedListeners,
    pub(super) notify: HandedNotify,
    pub(super) control: Option<(RawFd, PathBuf)>,
    pub(super) metrics: Option<RawFd>,
    pub(super) guard: Option<HandedGuard>,
    pub(super) workers: Vec<HandedWorker>,
    /// Process groups of exited workers, and when what is left of them is killed (ns).
    pub(super) lingering: Vec<(u32, i64)>,
    /// Rollouts aborted since the last reload request.
    pub(super) aborted: Vec<(String, String)>,
    /// The recent lines of workers' output (`ustad logs`).
    pub(super) log: Vec<LogLine>,
    /// Upgrades before this one.
    pub(super) upgrades: u32,
    /// The preload library's memfd, which workers name by its number (absent from documents of
    /// programs that did not hand it over).
    #[serde(default)]
    pub(super) preload: Option<RawFd>,
}

impl Supervisor {
    /// `ustad upgrade` (or SIGURG, with `replies` `None`): checks the new binary in a task
    /// whose answer comes back to the loop ([`Supervisor::on_upgrade_checked`]).
    pub(super) fn upgrade_request(
        &mut self,
        binary: Option<PathBuf>,
        replies: Option<mpsc::Sender<Reply>>,
    ) {
        let refused = |why: String| refuse(replies.as_ref(), &why);
        if self.upgrading.is_some() {
            return refused("an upgrade is already being checked".to_owned());
        }
        let Some(invocation) = &self.invocation else {
            return refused(
                "this primary was not started by the `ustad` command (a program that embeds ustad upgrades by restarting)"
                    .to_owned(),
            );
        };
        if let Some(why) = self.why_not_upgrade() {
            return refused(why);
        }
        let binary = match binary {
            Some(binary) => std::path::absolute(&binary).unwrap_or(binary),
            None => invocation.exe.clone(),
        };
        info!(
            event = "upgrade_check",
            binary = %binary.display(),
            "upgrade: checking {}",
            binary.display()
        );
        let checked = self.upgrade_checks.clone();
        // Spawned here, so that its pid is known before it can exit: a subreaper reaps the
        // children it does not know (`reap_adopted`).
        let (check, check_pid) = match spawn_check(&binary, &invocation.args) {
            Ok(spawned) => spawned,
            Err(why) => return refused(why),
        };
        self.upgrading = Some(Pending {
            binary: binary.clone(),
            replies,
            requested: Instant::now(),
            check_pid,
        });
        tokio::spawn(async move {
            let result = check_binary(&binary, check).await;
            let _ = checked.send((binary, result));
        });
    }

    /// Whether `pid` is the check of an upgrade's new binary.
    pub(super) fn is_upgrade_check(&self, pid: u32) -> bool {
        self.upgrading
            .as_ref()
            .is_some_and(|pending| pending.check_pid == Some(pid))
    }

    /// What keeps the primary from upgrading now, if anything.
    fn why_not_upgrade(&self) -> Option<String> {
        if self.plan.is_shutting_down() {
            return Some("ustad is stopping".to_owned());
        }
        if self.program.is_some() {
            return Some("a program embeds this primary".to_owned());
        }
        if let Some(pool) = self.hooks.keys().next() {
            return Some(format!(
                "pool {pool}'s before_start command runs; try again once it has finished"
            ));
        }
        if !self.reload_waiters.is_empty() {
            return Some(
                "a `reload --wait` client waits for its rollout; try again once it has its answer"
                    .to_owned(),
            );
        }
        if let Some((name, _)) = self
            .config
            .sockets
            .iter()
            .find(|(_, spec)| spec.mode == SocketMode::RoundRobin)
        {
            return Some(format!(
                "socket {name} is round-robin: the primary accepts its connections, and those it holds would be lost (use shared or reuseport to upgrade in place)"
            ));
        }
        None
    }

    /// The new binary answered (or not): refuses, or returns the upgrade to perform (the
    /// loop then calls [`Supervisor::upgrade_now`]).
    pub(super) fn on_upgrade_checked(&mut self, (binary, result): Checked) -> Option<Pending> {
        let pending = self.upgrading.take()?;
        let refusal = match result {
            Err(why) => Some(why),
            Ok(capabilities) if !capabilities.state_versions.contains(&STATE_VERSION) => {
                Some(format!(
                    "{} is ustad {} and reads state versions {:?}, not this primary's version {STATE_VERSION}: it could not take over the workers",
                    binary.display(),
                    capabilities.ustad,
                    capabilities.state_versions
                ))
            }
            Ok(_) => self.why_not_upgrade(),
        };
        match refusal {
            Some(why) => {
                pending.refuse(&why);
                None
            }
            None => Some(pending),
        }
    }

    /// Executes the new program. Returns only if that failed, having said why.
    pub(super) fn upgrade_now(&mut self, pending: Pending) {
        self.service.reloading();
        let error = self.exec_upgrade(&pending);
        // Still here: nothing changed.
        self.service.update(&self.plan.status(Instant::now()));
        pending.refuse(&format!(
            "cannot execute {}: {error}",
            pending.binary.display()
        ));
    }

    /// Writes the document, keeps the fds across the exec and executes the new program.
    /// Returns only on failure, having undone what it did.
    fn exec_upgrade(&mut self, pending: &Pending) -> io::Error {
        let Some(invocation) = &self.invocation else {
            return io::Error::other("no invocation");
        };
        let mut keep = Keep::default();
        let prepared = self
            .handover_document(pending, &mut keep)
            .and_then(|document| write_memfd(&document, &mut keep));
        let memfd = match prepared {
            Ok(memfd) => memfd,
            Err(error) => {
                keep.undo();
                return error;
            }
        };
        let argv = match exec_argv(invocation, memfd.as_raw_fd()) {
            Ok(argv) => argv,
            Err(error) => {
                keep.undo();
                return error;
            }
        };
        let program = match CString::new(pending.binary.as_os_str().as_bytes()) {
            Ok(program) => program,
            Err(error) => {
                keep.undo();
                return io::Error::new(io::ErrorKind::InvalidInput, error);
            }
        };
        info!(
            event = "upgrading",
            binary = %pending.binary.display(),
            workers = self.plan.workers().count(),
            "upgrade: executing {} in place (pid {}), keeping {} workers",
            pending.binary.display(),
            std::process::id(),
            self.plan.workers().count()
        );
        if let Err(error) = crate::sys::mask_signals(&HELD_SIGNALS, true) {
            keep.undo();
            return error;
        }
        let error = crate::sys::exec_in_place(&program, &argv);
        let _ = crate::sys::mask_signals(&HELD_SIGNALS, false);
        keep.undo();
        drop(memfd);
        error
    }

    /// The document, with every fd it names marked to survive the exec.
    fn handover_document(&self, pending: &Pending, keep: &mut Keep) -> io::Result<String> {
        let clock = Clock::now();
        let plan = self.plan.snapshot(clock).map_err(io::Error::other)?;
        let listeners = self.listeners.hand_over(keep)?;
        let notify = self.notify.hand_over(keep)?;
        let control = self
            .control
            .as_ref()
            .map(|control| control.hand_over(keep))
            .transpose()?;
        let metrics = self
            .metrics_socket
            .as_ref()
            .map(|socket| keep.fd(socket))
            .transpose()?;
        let guard = self
            .guard
            .as_ref()
            .map(|guard| guard.hand_over(keep))
            .transpose()?;
        let preload = crate::preload::memfd()
            .map(|memfd| keep.fd(memfd))
            .transpose()?;
        let mut workers = Vec::new();
        for worker in self.plan.workers() {
            let Some(pid) = worker.pid else { continue };
            // Gone already (reaped by now: its exit is on its way to the loop): not listed,
            // the new program counts it as exited.
            let Some(pidfd) = open_pidfd(pid) else {
                continue;
            };
            let pidfd = keep.own(pidfd)?;
            let pipes = self.output.hand_over(worker.id.0, keep)?;
            let channel = self
                .channels
                .get(&worker.id)
                .and_then(|outboxes| outboxes.socket.upgrade())
                .map(|socket| keep.fd(&*socket))
                .transpose()?;
            workers.push(HandedWorker {
                id: worker.id.0,
                pid,
                pidfd,
                pipes,
                channel,
            });
        }
        let document = Document {
            version: STATE_VERSION,
            from: crate::VERSION.to_owned(),
            binary: pending.binary.clone(),
            written_ns: clock.to_monotonic(Instant::now()),
            requested_ns: clock.to_monotonic(pending.requested),
            fds: keep.numbers().to_vec(),
            plan: RawValue::from_string(plan).map_err(io::Error::other)?,
            config: self.config.clone(),
            started_ns: clock.to_monotonic(self.started),
            listeners,
            notify,
            control,
            metrics,
            guard,
            workers,
            lingering: self
                .lingering
                .iter()
                .map(|l| (l.pgid, clock.to_monotonic(l.deadline)))
                .collect(),
            aborted: self.aborted.clone(),
            log: self
                .logbook
                .recent(None, usize::MAX)
                .iter()
                .map(|line| (**line).clone())
                .collect(),
            upgrades: self.upgraded.as_ref().map_or(0, |u| u.count),
            preload,
        };
        serde_json::to_string(&document).map_err(io::Error::other)
    }
}

/// A pidfd of the worker `pid`, a child of this process; `None` when it is gone.
fn open_pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Puts `document` in a memfd kept across the exec; its number goes last in `fds`.
fn write_memfd(document: &str, keep: &mut Keep) -> io::Result<std::fs::File> {
    let fd = rustix::fs::memfd_create("ustad-handover", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(document.as_bytes())?;
    file.rewind()?;
    keep.fd(&file)?;
    Ok(file)
}

/// The new program's argv: `argv[0]`, `--handover=FD`, then the primary's own arguments.
fn exec_argv(invocation: &Invocation, memfd: RawFd) -> io::Result<Vec<CString>> {
    let handover = format!("{HANDOVER_FLAG}={memfd}");
    std::iter::once(invocation.arg0.as_bytes())
        .chain(std::iter::once(handover.as_bytes()))
        .chain(invocation.args.iter().map(|arg| arg.as_bytes()))
        .map(|arg| CString::new(arg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e)))
        .collect()
}

/// Starts `binary --upgrade-check ARGS…`.
fn spawn_check(
    binary: &Path,
    args: &[OsString],
) -> Result<(tokio::process::Child, Option<u32>), String> {
    let mut command = tokio::process::Command::new(binary);
    command
        .arg(CHECK_FLAG)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // The primary waits on it: at the primary's priority, not its workers'.
    crate::sys::keep_priority(&mut command);
    let child = command
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", binary.display()))?;
    let pid = child.id();
    Ok((child, pid))
}

/// Reads what the new binary says it is.
async fn check_binary(binary: &Path, child: tokio::process::Child) -> Result<Capabilities, String> {
    let shown = binary.display();
    let output = match tokio::time::timeout(CHECK_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => return Err(format!("cannot run {shown}: {error}")),
        Err(_) => {
            return Err(format!(
                "{shown} did not answer `{CHECK_FLAG}` within {}s",
                CHECK_TIMEOUT.as_secs()
            ));
        }
    };
    let said = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let line = text.lines().next().unwrap_or("").trim().to_owned();
        if line.chars().count() > 200 {
            format!("{}…", line.chars().take(200).collect::<String>())
        } else {
            line
        }
    };
    if !output.status.success() {
        return Err(format!(
            "{shown} is not a ustad that can take over this primary (`{CHECK_FLAG}` with this command line: {}{})",
            output.status,
            match said(&output.stderr) {
                line if line.is_empty() => String::new(),
                line => format!(": {line}"),
            }
        ));
    }
    serde_json::from_slice::<Capabilities>(
        output.stdout.split(|&b| b == b'\n').next().unwrap_or(&[]),
    )
    .map_err(|_| {
        format!(
            "{shown} is not a ustad that can take over this primary (it answered `{CHECK_FLAG}` with {:?})",
            said(&output.stdout)
        )
    })
}

/// The record of an upgrade, for `status`.
pub(super) fn record(
    document: &Document,
    switch_ms: f64,
    kept: usize,
    lost: usize,
) -> UpgradeStatus {
    UpgradeStatus {
        count: document.upgrades.saturating_add(1),
        from: document.from.clone(),
        binary: document.binary.clone(),
        time: super::control::unix_now(),
        switch_ms,
        workers_kept: kept,
        workers_lost: lost,
    }
}
