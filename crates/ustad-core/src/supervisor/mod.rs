//! The process layer around the [`Plan`]: binds sockets, spawns and signals workers, reads the
//! notify socket and signals, and feeds everything that happens back to the plan.
//!
//! It runs on a tokio `current_thread` runtime, on the thread that called it, for the life of
//! the primary: `PR_SET_PDEATHSIG` ties each worker to the thread that forked it.
//!
//! Here: the loop, and the dispatch of what it hears to the plan and back. Beside it, a room
//! per concern: `setup` (what is bound and started before the loop, in order), `launch`
//! (starting a worker), `hooks` (pools' `before_start` commands), `notify` (datagrams from workers), `process_groups` (what is left of
//! workers: lingering groups, adopted orphans, the guard), `usage` (CPU and memory, status),
//! `control` (clients), `reload`, `round_robin` (the acceptor of `round-robin` sockets) and
//! `link` (the Rust library's side).

mod control;
mod guard;
mod hooks;
mod launch;
mod link;
mod listen_watch;
mod log;
mod notify;
mod process_groups;
mod reload;
mod resume;
mod round_robin;
mod setup;
mod upgrade;
mod usage;
mod watching;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info};

use crate::config::{Config, Signal, SocketSpec};
use crate::control::protocol::Reply;
use crate::logbook::LogBook;
use crate::notify::NotifySocket;
use crate::output::OutputRelay;
use crate::plan::{
    Action, Event, ExitStatus, Notice, Outcome, Phase, Plan, RolloutTrigger, WorkerId,
};
use crate::service::ServiceNotifier;
use crate::sockets::Listeners;

use self::guard::Guard;
pub use self::link::{FrameSink, Link, LinkEvent, Program};
use self::process_groups::{Lingering, signal_group, worker_kill_timeout};
pub use self::resume::{Handover, HandoverError, take_back_children};
use self::setup::Inputs;
pub use self::setup::{Options, Reload, SupervisorError};
pub use self::upgrade::{CHECK_FLAG, Capabilities, HANDOVER_FLAG, Invocation};

/// Runs the cluster until it is told to stop (SIGINT/SIGTERM) and every worker has exited.
///
/// Binds every socket first: if one cannot be bound, returns [`SupervisorError::Bind`]
/// without starting anything. Signals: SIGINT/SIGTERM stop gracefully (a second one kills at
/// once), SIGHUP reloads and rolls every pool, SIGUSR2 rolls every pool with the running
/// configuration, SIGUSR1 reopens the pools' log files, SIGTTIN/SIGTTOU add/remove a worker of
/// the first pool.
pub async fn run(config: Config, options: Options) -> Result<(), SupervisorError> {
    let (mut supervisor, inputs) = setup::start(config, options)?;
    if let Some(program) = &supervisor.program {
        program.event(LinkEvent::Started);
    }
    let outcome = supervisor.plan.start(Instant::now());
    supervisor.perform(outcome);
    run_loop(supervisor, inputs).await
}

/// Carries on from where the previous program of this process left off, in an upgrade
/// (`ustad upgrade`): the same plan, sockets and guard, its workers adopted.
///
/// # Errors
/// When what was handed over cannot be taken (see [`take_back_children`] for what to do
/// then).
pub async fn resume(mut handover: Handover, options: Options) -> Result<(), SupervisorError> {
    let (mut supervisor, inputs, clock) = setup::resume(&mut handover, options)?;
    let adopted = supervisor.adopt(&mut handover, clock);
    let left = handover.fds.untaken();
    if !left.is_empty() {
        tracing::warn!("upgrade: fds {left:?} were handed over but not taken; closed");
    }
    let kept = adopted.len();
    let lost = handover.document.workers.len().saturating_sub(kept);
    for worker in adopted {
        supervisor.watch_adopted(worker);
    }
    let record = resume::upgrade_record(&handover, clock, kept, lost);
    info!(
        event = "upgraded",
        from = %record.from,
        to = crate::VERSION,
        workers = kept,
        lost,
        switch_ms = record.switch_ms,
        "upgraded from ustad {} to {} in place (pid {}): {kept} workers kept, {lost} gone; nothing answered for {:.1} ms",
        record.from,
        crate::VERSION,
        std::process::id(),
        record.switch_ms
    );
    supervisor.upgraded = Some(record);
    drop(handover);
    // The service manager saw RELOADING=1 from the old program: the new one serves.
    let now = Instant::now();
    let status = supervisor.plan.status(now);
    supervisor
        .service
        .ready(&crate::service::summary(&status, false));
    let outcome = supervisor.plan.tick(now);
    supervisor.perform(outcome);
    run_loop(supervisor, inputs).await
}

/// The loop, until every worker has stopped.
async fn run_loop(mut supervisor: Supervisor, inputs: Inputs) -> Result<(), SupervisorError> {
    let Inputs {
        mut signals,
        mut exited,
        mut calls,
        mut link_calls,
        mut lifecycle_frames,
        mut status_requests,
        mut upgrade_checked,
        mut files_changed,
        servers,
    } = inputs;
    let mut memory_check = tokio::time::interval(usage::MEMORY_INTERVAL);
    memory_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while !(supervisor.finished && supervisor.lingering.is_empty()) {
        let deadline = [
            supervisor.plan.next_deadline(),
            supervisor.lingering_deadline(),
            supervisor.listen_watch.next_look(),
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(ended) = exited.recv() => supervisor.on_ended(ended),
            _ = signals.interrupt.recv() => supervisor.on_stop_signal("SIGINT"),
            _ = signals.terminate.recv() => supervisor.on_stop_signal("SIGTERM"),
            _ = signals.hangup.recv() => supervisor.on_hangup(),
            _ = signals.user1.recv() => {
                info!(event = "signal", signal = "SIGUSR1", "SIGUSR1: reopening the pools' log files");
                supervisor.output.reopen();
            }
            _ = signals.user2.recv() => {
                info!(event = "signal", signal = "SIGUSR2", "SIGUSR2: rolling restart of every pool");
                supervisor.handle(Event::Rollout { pool: None, trigger: RolloutTrigger::Restart, spec: None });
            }
            _ = signals.tty_in.recv() => supervisor.scale_first_pool(1),
            _ = signals.tty_out.recv() => supervisor.scale_first_pool(-1),
            _ = signals.child.recv() => supervisor.on_child_signal(),
            _ = signals.upgrade.recv() => {
                info!(event = "signal", signal = "SIGURG", "SIGURG: upgrading to the program ustad was started from");
                supervisor.upgrade_request(None, None);
            }
            Some(checked) = upgrade_checked.recv() => {
                if let Some(pending) = supervisor.on_upgrade_checked(checked) {
                    // Exits already reported go into the plan first: a worker reaped by now
                    // could not be handed over.
                    while let Ok(ended) = exited.try_recv() {
                        supervisor.on_ended(ended);
                    }
                    supervisor.upgrade_now(pending);
                }
            }
            datagram = supervisor.notify.recv() => supervisor.on_datagram(datagram),
            Some(changed) = files_changed.recv() => supervisor.on_files_changed(changed),
            Some(call) = calls.recv() => supervisor.on_call(call),
            Some(call) = async {
                match &mut link_calls {
                    Some(calls) => calls.recv().await,
                    None => std::future::pending().await,
                }
            } => supervisor.on_call(call),
            Some((id, frame)) = lifecycle_frames.recv() => supervisor.on_lifecycle_frame(id, frame),
            Some(reply) = status_requests.recv() => {
                let _ = reply.send(supervisor.status());
            }
            _ = memory_check.tick(), if supervisor.watches_memory() => supervisor.check_memory(),
            () = sleep => supervisor.on_deadline(),
        }
        // Sockets added, closed or bound for a slot: the service manager's copies follow.
        supervisor
            .fd_store
            .sync(&supervisor.service, &supervisor.listeners);
    }
    for task in servers {
        task.abort();
    }
    drop(supervisor.control.take());
    if supervisor.subreaper {
        supervisor.kill_adopted_orphans().await;
    }
    if let Some(program) = &supervisor.program {
        program.event(LinkEvent::Stopped);
    }
    supervisor.output.finish(Duration::from_secs(1)).await;
    // Dropping the guard closes its pipe: it exits, and is reaped.
    drop(supervisor.guard.take());
    Ok(())
}

/// The process layer's state: what the loop's handlers (here and in the rooms beside) act on.
struct Supervisor {
    /// The embedding program (Rust library).
    program: Option<Arc<dyn Program>>,
    /// Where library workers' channels run; `None`: here.
    channel_runtime: Option<tokio::runtime::Handle>,
    /// Lifecycle frames from library workers' channels.
    lifecycle: link::Lifecycle,
    /// The outboxes of each library worker's channel.
    channels: HashMap<WorkerId, link::Outboxes>,
    /// The acceptor of `round-robin` sockets.
    round_robin: round_robin::RoundRobinAcceptor,
    plan: Plan,
    /// The configuration running (the last one reloaded).
    config: Config,
    listeners: Listeners,
    notify: NotifySocket,
    output: OutputRelay,
    /// Where each child's exit-watching task reports.
    exits: mpsc::UnboundedSender<Ended>,
    /// Pools' `before_start` commands that run.
    hooks: hooks::Running,
    /// Process groups of exited workers whose other members have until a deadline.
    lingering: Vec<Lingering>,
    logbook: LogBook,
    /// Re-reads the configuration file, when there is one.
    reload: Option<Reload>,
    /// ustad's own `NOTIFY_SOCKET`, when a service manager gave it one.
    service: ServiceNotifier,
    /// The sockets the service manager keeps for ustad, when it has an fd store.
    fd_store: crate::fdstore::FdStore,
    /// The tasks watching pools' files (`watch`).
    watching: watching::Watching,
    /// Where they report.
    watch_changes: mpsc::UnboundedSender<watching::Changed>,
    /// The instance's name, for `ustad status`.
    name: String,
    config_file: Option<PathBuf>,
    started: Instant,
    usage: usage::Usage,
    /// Clients of `ustad top` / the `events` request.
    subscribers: Vec<mpsc::Sender<Reply>>,
    /// Clients of `ustad stop`, answered when the primary exits (by closing).
    stop_waiters: Vec<mpsc::Sender<Reply>>,
    /// Clients of `ustad reload --wait`.
    reload_waiters: Vec<control::ReloadWaiter>,
    /// A child subreaper: adopted processes are reaped, and stopped at exit.
    subreaper: bool,
    /// Rollouts aborted since the last reload request: pool and why.
    aborted: Vec<(String, String)>,
    /// Sockets a reload removed, closed once no worker uses them.
    retired_sockets: Vec<(String, SocketSpec)>,
    guard: Option<Guard>,
    /// What a guard removes when the primary dies (see `Guard::start`).
    guard_cleanup: Vec<PathBuf>,
    /// The plan said every worker has stopped: the loop ends once no group lingers.
    finished: bool,
    /// How often rejected notify datagrams are logged.
    rejections: notify::RateLimit,
    /// Starting workers of `ready = "listening"` pools, until they are seen listening.
    listen_watch: listen_watch::ListenWatch,
    /// How the primary was started, for `ustad upgrade`.
    invocation: Option<upgrade::Invocation>,
    /// An upgrade whose new binary is being checked.
    upgrading: Option<upgrade::Pending>,
    /// Where checks of new binaries report.
    upgrade_checks: mpsc::UnboundedSender<upgrade::Checked>,
    /// The last upgrade, for `status`.
    upgraded: Option<crate::status::UpgradeStatus>,
    /// The control server (its socket file goes with it).
    control: Option<Arc<crate::control::server::ControlServer>>,
    /// A copy of the metrics server's socket, to hand over in an upgrade.
    metrics_socket: Option<std::os::fd::OwnedFd>,
}

/// A child the loop waits for ended.
enum Ended {
    /// A worker.
    Worker(WorkerId, ExitStatus),
    /// A pool's `before_start` command, run for a generation.
    Hook {
        pool: Arc<str>,
        generation: u64,
        pid: u32,
        status: ExitStatus,
    },
}

impl Supervisor {
    fn handle(&mut self, event: Event) {
        let outcome = self.plan.handle(event, Instant::now());
        self.perform(outcome);
    }

    /// Logs the notices and performs the actions of an outcome, and of the outcomes those
    /// actions lead to.
    fn perform(&mut self, outcome: Outcome) {
        let mut queue = VecDeque::from([outcome]);
        while let Some(outcome) = queue.pop_front() {
            for notice in &outcome.notices {
                log::notice(notice);
                self.publish(notice);
                self.publish_link(notice);
                let (channels, plan, config) = (&self.channels, &self.plan, &self.config);
                self.round_robin.follow(notice, |id| {
                    let outboxes = channels.get(&id)?;
                    let sockets: Vec<String> =
                        plan.worker(id)?
                            .spec()
                            .sockets
                            .iter()
                            .filter(|name| {
                                config.sockets.get(*name).is_some_and(|s| {
                                    s.mode == crate::config::SocketMode::RoundRobin
                                })
                            })
                            .cloned()
                            .collect();
                    Some((sockets, outboxes.conns.clone()))
                });
                if let Notice::Ready { worker, .. }
                | Notice::Stopping { worker, .. }
                | Notice::Killed { worker, .. }
                | Notice::Exited { worker, .. } = notice
                {
                    self.listen_watch.forget(worker.id);
                }
                if let Notice::Scaled { pool, from, to } = notice {
                    if to < from {
                        self.listeners.release_slots(pool, *to);
                    }
                }
            }
            for action in outcome.actions {
                match action {
                    Action::Spawn {
                        id,
                        pool,
                        slot,
                        generation,
                        spec,
                    } => {
                        let event = self.launch(id, &pool, slot, generation, &spec);
                        queue.push_back(self.plan.handle(event, Instant::now()));
                    }
                    Action::Signal { id, pid, signal } => {
                        // The signal first: a worker that exits on the `stop` frame could
                        // otherwise be killed by the signal as it exits (Python restores the
                        // default handlers as it shuts down), and seem to have died of it.
                        signal_group(pid, signal);
                        let ustads = self.channels.get(&id).filter(|outboxes| {
                            outboxes.protocol == crate::config::IpcProtocol::Ustad
                        });
                        if let Some(outboxes) = ustads {
                            // The time until SIGKILL, as the plan set it (a shutdown with a
                            // timeout shortens it).
                            let deadline = match self.plan.worker(id).map(|w| w.phase) {
                                Some(Phase::Stopping {
                                    kill_at: Some(at), ..
                                }) => at.saturating_duration_since(Instant::now()),
                                _ => worker_kill_timeout(&self.plan, id),
                            };
                            let deadline_ms =
                                u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
                            let _ = outboxes.frames.push_now(&crate::ipc::encode_simple(
                                &crate::ipc::Kind::Stop { deadline_ms },
                            ));
                        }
                    }
                    Action::AskToStop { id } => {
                        if let Some(outboxes) = self.channels.get(&id) {
                            let _ = outboxes.frames.push_now(&crate::ipc::node::shutdown_line());
                        }
                    }
                    Action::Kill { pid, .. } => signal_group(pid, Signal::KILL),
                    Action::RunHook {
                        pool,
                        generation,
                        spec,
                    } => {
                        if let Some(event) = self.run_hook(&pool, generation, &spec) {
                            queue.push_back(self.plan.handle(event, Instant::now()));
                        }
                    }
                    Action::StopHook { pool, generation } => self.stop_hook(&pool, generation),
                    Action::Exit => self.finished = true,
                }
            }
        }
        if self.service.is_enabled() {
            self.service.update(&self.plan.status(Instant::now()));
        }
    }

    fn on_ended(&mut self, ended: Ended) {
        match ended {
            Ended::Worker(id, status) => self.on_exit(id, status),
            Ended::Hook {
                pool,
                generation,
                pid,
                status,
            } => self.on_hook_exit(pool, generation, pid, status),
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: ExitStatus) {
        self.channels.remove(&id);
        self.linger(id);
        self.handle(Event::Exited { id, status });
        self.settle_lingering(None);
        self.close_retired_sockets();
    }

    fn on_stop_signal(&mut self, name: &str) {
        let immediate = self.plan.is_shutting_down();
        info!(
            event = "signal",
            signal = name,
            "{name}: {}",
            if immediate {
                "stopping now"
            } else {
                "stopping gracefully"
            }
        );
        if immediate {
            self.kill_lingering_now();
        }
        self.service.stopping();
        self.handle(Event::Shutdown {
            immediate,
            timeout: None,
        });
    }

    fn on_hangup(&mut self) {
        info!(
            event = "signal",
            signal = "SIGHUP",
            "SIGHUP: {}",
            if self.reload.is_some() {
                "re-reading the configuration and rolling every pool"
            } else {
                "rolling restart of every pool (no config file to re-read)"
            }
        );
        let reloaded = self.reload(&[]);
        self.service.reloading();
        self.service.update(&self.plan.status(Instant::now()));
        if let Err(error) = reloaded {
            error!(event = "reload_failed", "{error}");
        }
    }

    fn scale_first_pool(&mut self, delta: isize) {
        let Some((pool, size)) = self.plan.pools().next().map(|(p, s)| (p.to_owned(), s)) else {
            return;
        };
        let signal = if delta > 0 { "SIGTTIN" } else { "SIGTTOU" };
        info!(
            event = "signal",
            signal,
            "{signal}: {} a worker of pool {pool}",
            if delta > 0 { "adding" } else { "removing" }
        );
        let size = size.saturating_add_signed(delta);
        self.handle(Event::Scale { pool, size });
    }

    fn on_deadline(&mut self) {
        let now = Instant::now();
        for seen in self.listen_watch.look(now, crate::listening::find) {
            self.handle(seen);
        }
        let outcome = self.plan.tick(now);
        self.perform(outcome);
        self.settle_lingering(Some(now));
    }

    fn on_child_signal(&mut self) {
        self.replace_lost_guard();
        // Children that are not workers are ours to reap only as a subreaper: in a program
        // that embeds the supervisor (the Rust library), they belong to the program.
        if self.subreaper {
            self.reap_adopted();
        }
        self.settle_lingering(None);
    }
}
