//! The plan driven with synthetic time and pretend processes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{Command, Config, PoolSpec, Readiness, Signal, Size};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

fn pool(size: usize, ready: Readiness) -> PoolSpec {
    let mut spec = PoolSpec::new(Command::new(["app"]).unwrap());
    spec.size = Size::fixed(size).unwrap();
    spec.ready = ready;
    spec.ready_timeout = 10 * S;
    spec.kill_timeout = 5 * S;
    spec.restart_delay = S;
    spec.min_uptime = 5 * S;
    spec
}

fn config(pools: &[(&str, PoolSpec)]) -> Config {
    let mut config = Config::default();
    for (name, spec) in pools {
        config.pools.insert((*name).to_owned(), spec.clone());
    }
    config
}

/// A pretend process layer: spawns succeed at once with made-up pids, signals are recorded,
/// and processes exit only when the test says so.
struct Sim {
    plan: Plan,
    now: Instant,
    next_pid: u32,
    notices: Vec<Notice>,
    signals: Vec<(WorkerId, Signal)>,
    kills: Vec<WorkerId>,
    /// Workers told over their channel to stop.
    asked: Vec<WorkerId>,
    spawns: Vec<(WorkerId, String, usize, u64)>,
    alive: BTreeMap<WorkerId, String>,
    exited: bool,
    /// Per pool: the most workers alive at once.
    peak: BTreeMap<String, usize>,
    /// `before_start` runs started (pool, generation), in order; the test ends each.
    hooks: Vec<(String, u64)>,
    /// `before_start` runs the plan had killed.
    stopped_hooks: Vec<(String, u64)>,
}

impl Sim {
    fn new(config: &Config) -> Sim {
        let mut plan = Plan::new(config, 7);
        let now = Instant::now();
        let outcome = plan.start(now);
        let mut sim = Sim {
            plan,
            now,
            next_pid: 1000,
            notices: Vec::new(),
            signals: Vec::new(),
            kills: Vec::new(),
            asked: Vec::new(),
            spawns: Vec::new(),
            alive: BTreeMap::new(),
            exited: false,
            peak: BTreeMap::new(),
            hooks: Vec::new(),
            stopped_hooks: Vec::new(),
        };
        sim.apply(outcome);
        sim
    }

    fn apply(&mut self, outcome: Outcome) {
        let mut queue = vec![outcome];
        while let Some(outcome) = queue.pop() {
            self.notices.extend(outcome.notices);
            for action in outcome.actions {
                match action {
                    Action::Spawn {
                        id,
                        pool,
                        slot,
                        generation,
                        ..
                    } => {
                        self.spawns.push((id, pool.to_string(), slot, generation));
                        self.alive.insert(id, pool.to_string());
                        let alive = self.alive.values().filter(|p| **p == *pool).count();
                        let peak = self.peak.entry(pool.to_string()).or_default();
                        *peak = (*peak).max(alive);
                        self.next_pid += 1;
                        let event = Event::Spawned {
                            id,
                            pid: self.next_pid,
                        };
                        queue.push(self.plan.handle(event, self.now));
                    }
                    Action::Signal { id, signal, .. } => self.signals.push((id, signal)),
                    Action::Kill { id, .. } => self.kills.push(id),
                    Action::AskToStop { id } => self.asked.push(id),
                    Action::RunHook {
                        pool, generation, ..
                    } => self.hooks.push((pool.to_string(), generation)),
                    Action::StopHook { pool, generation } => {
                        self.stopped_hooks.push((pool.to_string(), generation));
                    }
                    Action::Exit => self.exited = true,
                }
            }
        }
        // The process layer ticks whenever a deadline has passed.
        if self.plan.next_deadline().is_some_and(|d| d <= self.now) {
            let outcome = self.plan.tick(self.now);
            self.apply(outcome);
        }
        assert!(
            self.plan.next_deadline().is_none_or(|d| d > self.now),
            "a deadline is left in the past after tick"
        );
    }

    fn handle(&mut self, event: Event) {
        let outcome = self.plan.handle(event, self.now);
        self.apply(outcome);
    }

    /// Moves time forward, ticking at every deadline on the way.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while let Some(deadline) = self.plan.next_deadline().filter(|d| *d <= end) {
            self.now = deadline;
            let outcome = self.plan.tick(self.now);
            self.apply(outcome);
        }
        self.now = end;
    }

    fn exit(&mut self, id: WorkerId, status: ExitStatus) {
        self.alive.remove(&id);
        self.handle(Event::Exited { id, status });
    }

    fn ready(&mut self, id: WorkerId) {
        self.handle(Event::Message {
            id,
            message: WorkerMessage::Ready,
        });
    }

    fn message(&mut self, id: WorkerId, message: WorkerMessage) {
        self.handle(Event::Message { id, message });
    }

    /// Exits every worker that was signalled or killed and is still alive.
    fn exit_stopped(&mut self) {
        let stopped: Vec<WorkerId> = self
            .signals
            .iter()
            .map(|(id, _)| *id)
            .chain(self.kills.iter().copied())
            .filter(|id| self.alive.contains_key(id))
            .collect();
        for id in stopped {
            if self.alive.contains_key(&id) {
                self.exit(id, ExitStatus::Code(0));
            }
        }
    }

    /// Live workers of a pool: (slot, id, generation, ready).
    fn workers(&self, pool: &str) -> Vec<(usize, WorkerId, u64, bool)> {
        let mut workers: Vec<_> = self
            .plan
            .workers()
            .filter(|w| self.alive.get(&w.id).is_some_and(|p| p == pool))
            .map(|w| {
                (
                    w.slot,
                    w.id,
                    w.generation,
                    matches!(w.phase, Phase::Ready { .. }),
                )
            })
            .collect();
        workers.sort();
        workers
    }

    /// Ids of ready workers that hold their slot (not stopping).
    fn serving(&self, pool: &str) -> Vec<WorkerId> {
        self.plan
            .workers()
            .filter(|w| self.alive.get(&w.id).is_some_and(|p| p == pool))
            .filter(|w| matches!(w.phase, Phase::Ready { .. }))
            .map(|w| w.id)
            .collect()
    }

    fn starting(&self) -> Vec<WorkerId> {
        self.plan
            .workers()
            .filter(|w| matches!(w.phase, Phase::Starting { .. }))
            .map(|w| w.id)
            .collect()
    }

    fn count(&self, f: impl Fn(&Notice) -> bool) -> usize {
        self.notices.iter().filter(|n| f(n)).count()
    }

    fn restart_delays(&self) -> Vec<(Duration, u32)> {
        self.notices
            .iter()
            .filter_map(|n| match n {
                Notice::RestartScheduled {
                    delay, failures, ..
                } => Some((*delay, *failures)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn start_fills_every_slot_of_every_pool_with_increasing_ids() {
    let sim = Sim::new(&config(&[
        ("web", pool(3, Readiness::None)),
        ("jobs", pool(2, Readiness::None)),
    ]));
    let spawned: Vec<_> = sim
        .spawns
        .iter()
        .map(|(id, p, s, g)| (id.0, p.as_str(), *s, *g))
        .collect();
    assert_eq!(
        spawned,
        [
            (1, "web", 0, 1),
            (2, "web", 1, 1),
            (3, "web", 2, 1),
            (4, "jobs", 0, 1),
            (5, "jobs", 1, 1)
        ]
    );
    assert_eq!(
        sim.serving("web").len(),
        3,
        "ready = none: ready once spawned"
    );
}

#[test]
fn notify_workers_are_ready_only_on_ready_and_killed_at_ready_timeout() {
    let mut sim = Sim::new(&config(&[("web", pool(2, Readiness::Notify))]));
    assert!(sim.serving("web").is_empty());
    sim.ready(WorkerId(1));
    assert_eq!(sim.serving("web"), [WorkerId(1)]);

    sim.advance(10 * S - MS);
    assert!(sim.kills.is_empty());
    sim.advance(MS);
    assert_eq!(
        sim.kills,
        [WorkerId(2)],
        "not ready within ready_timeout: killed"
    );
    sim.exit(WorkerId(2), ExitStatus::Signal(9));
    assert_eq!(sim.restart_delays(), [(S, 1)]);
    sim.advance(S);
    assert_eq!(
        sim.spawns.last().map(|s| (s.0, s.2)),
        Some((WorkerId(3), 1)),
        "same slot"
    );
}

#[test]
fn delay_readiness() {
    let mut sim = Sim::new(&config(&[("web", pool(1, Readiness::Delay(2 * S)))]));
    sim.advance(2 * S - MS);
    assert!(sim.serving("web").is_empty());
    sim.advance(MS);
    assert_eq!(sim.serving("web"), [WorkerId(1)]);
}

#[test]
fn failed_starts_back_off_exponentially_up_to_a_cap() {
    let mut spec = pool(1, Readiness::None);
    spec.restart_delay = S;
    let mut sim = Sim::new(&config(&[("web", spec)]));
    for _ in 0..10 {
        let id = *sim.serving("web").first().expect("a worker was started");
        sim.advance(100 * MS);
        sim.exit(id, ExitStatus::Code(1));
        let (delay, _) = *sim.restart_delays().last().unwrap();
        sim.advance(delay);
    }
    let delays: Vec<u64> = sim
        .restart_delays()
        .iter()
        .map(|(d, _)| d.as_secs())
        .collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
    let failures: Vec<u32> = sim.restart_delays().iter().map(|(_, f)| *f).collect();
    assert_eq!(failures, (1..=10).collect::<Vec<_>>());
}

#[test]
fn a_worker_that_stayed_up_resets_the_backoff() {
    let mut sim = Sim::new(&config(&[("web", pool(1, Readiness::None))]));
    sim.advance(MS);
    sim.exit(WorkerId(1), ExitStatus::Code(1));
    sim.advance(S);
    sim.advance(MS);
    sim.exit(WorkerId(2), ExitStatus::Code(1));
    sim.advance(2 * S);
    sim.advance(6 * S); // past min_uptime
    sim.exit(WorkerId(3), ExitStatus::Signal(9));
    // Up past min_uptime, it had served: replaced at once, and the backoff is reset.
    assert_eq!(
        sim.restart_delays(),
        [(S, 1), (2 * S, 2), (Duration::ZERO, 0)]
    );
    let crash = sim.count(|n| {
        matches!(
            n,
            Notice::Exited {
                cause: ExitCause::Crashed,
                ..
            }
        )
    });
    assert_eq!(crash, 3);
}

#[test]
fn restart_delay_zero_restarts_at_once_then_backs_off_from_100ms() {
    let mut spec = pool(1, Readiness::None);
    spec.restart_delay = Duration::ZERO;
    let mut sim = Sim::new(&config(&[("web", spec)]));
    for _ in 0..4 {
        let id = sim.serving("web")[0];
        sim.exit(id, ExitStatus::Code(1));
        sim.advance(S);
    }
    let delays: Vec<u128> = sim
        .restart_delays()
        .iter()
        .map(|(d, _)| d.as_millis())
        .collect();
    assert_eq!(delays, [0, 200, 400, 800]);
}

#[test]
fn spawn_failure_is_a_failed_start() {
    let mut sim = Sim::new(&config(&[("web", pool(1, Readiness::None))]));
    // Pretend the next spawn fails.
    sim.exit(WorkerId(1), ExitStatus::Code(1));
    sim.advance(S);
    let id = WorkerId(2);
    let outcome = sim.plan.handle(
        Event::SpawnFailed {
            id,
            error: "not found".into(),
        },
        sim.now,
    );
    sim.apply(outcome);
    assert!(
        sim.notices
            .iter()
            .any(|n| matches!(n, Notice::SpawnFailed { .. }))
    );
    assert_eq!(sim.restart_delays().last(), Some(&(2 * S, 2)));
}

fn node_pool(size: usize, grace: Duration) -> PoolSpec {
    let mut spec = pool(size, Readiness::Message);
    spec.ipc = Some(crate::config::IpcSpec::new(
        crate::config::IpcProtocol::Node,
    ));
    spec.stop_grace = grace;
    spec
}

#[test]
fn a_node_worker_is_told_to_shut_down_then_signalled_after_its_grace() {
    let mut sim = Sim::new(&config(&[("web", node_pool(1, 2 * S))]));
    sim.ready(WorkerId(1));
    rollout(&mut sim);
    sim.ready(WorkerId(2));
    assert_eq!(sim.asked, [WorkerId(1)], "'shutdown' at once");
    assert!(sim.signals.is_empty(), "no signal yet");
    sim.advance(2 * S - MS);
    assert!(sim.signals.is_empty());
    sim.advance(MS);
    assert_eq!(
        sim.signals,
        [(WorkerId(1), Signal::TERM)],
        "the signal after the grace"
    );
    // It exits on its own before its kill_timeout (5 s): no SIGKILL.
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    sim.advance(10 * S);
    assert!(sim.kills.is_empty());
}

#[test]
fn a_node_worker_that_exits_on_the_message_gets_no_signal() {
    let mut sim = Sim::new(&config(&[("web", node_pool(1, 2 * S))]));
    sim.ready(WorkerId(1));
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    assert_eq!(sim.asked, [WorkerId(1)]);
    sim.advance(500 * MS);
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    sim.advance(10 * S);
    assert!(sim.signals.is_empty() && sim.kills.is_empty());
    assert!(sim.exited);
}

#[test]
fn a_shorter_shutdown_timeout_brings_a_node_workers_signal_forward() {
    let mut sim = Sim::new(&config(&[("web", node_pool(1, 4 * S))]));
    sim.ready(WorkerId(1));
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: Some(S),
    });
    sim.advance(S);
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
    assert_eq!(
        sim.kills,
        [WorkerId(1)],
        "and the kill, at the same deadline"
    );
}

#[test]
fn a_hung_node_worker_or_a_zero_grace_gets_its_signal_at_once() {
    let mut spec = node_pool(1, Duration::ZERO);
    let mut sim = Sim::new(&config(&[("web", spec.clone())]));
    sim.ready(WorkerId(1));
    sim.handle(Event::Replace { id: WorkerId(1) });
    sim.ready(WorkerId(2));
    assert_eq!(sim.asked, [WorkerId(1)]);
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
    spec.stop_grace = 2 * S;
    spec.watchdog = Some(S);
    let mut sim = Sim::new(&config(&[("web", spec)]));
    sim.ready(WorkerId(1));
    sim.advance(S);
    assert!(sim.asked.is_empty(), "a hung worker is not asked");
    assert_eq!(sim.signals, [(WorkerId(1), Signal::ABRT)]);
}

#[test]
fn a_worker_stopped_by_an_operator_leaves_its_slot_empty_until_restart_or_scale() {
    let mut sim = ready_pool(2, false);
    sim.handle(Event::StopWorker { id: WorkerId(2) });
    assert_eq!(sim.signals, [(WorkerId(2), Signal::TERM)]);
    sim.exit_stopped();
    sim.advance(60 * S);
    assert!(sim.starting().is_empty(), "not refilled");
    assert_eq!(sim.serving("web"), [WorkerId(1)]);
    let status = sim.plan.status(sim.now);
    let waiting = &status[0].waiting;
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].slot, waiting[0].stopped), (1, true));
    assert_eq!(waiting[0].next_attempt_secs, None);
    // Twice is refused, as is a worker that is gone.
    let again = sim
        .plan
        .handle(Event::StopWorker { id: WorkerId(2) }, sim.now);
    assert!(again.refusal().is_some_and(|why| why.contains("no worker")));
    // A restart of the pool fills it (and rolls the rest).
    rollout(&mut sim);
    assert_eq!(sim.workers("web").iter().filter(|w| w.0 == 1).count(), 1);
    finish(&mut sim);
    assert_eq!(sim.serving("web").len(), 2);
    // So does scaling.
    let id = sim.serving("web")[0];
    sim.handle(Event::StopWorker { id });
    sim.exit_stopped();
    sim.handle(Event::Scale {
        pool: "web".into(),
        size: 3,
    });
    for id in sim.starting() {
        sim.ready(id);
    }
    assert_eq!(sim.serving("web").len(), 3);
}

/// Rolls a pool of `size` whose workers take `boot` to be ready and `drain` to exit after
/// their stop signal, with this budget; checks at every step that no more than
/// `size + surge` workers are alive and no fewer than `size - unavailable` slots serve.
/// Returns how long the rollout took.
fn batched_rollout(
    size: usize,
    surge: Option<crate::config::Budget>,
    unavailable: Option<crate::config::Budget>,
    expect: (usize, usize),
) -> Duration {
    let boot = S;
    let drain = 200 * MS;
    let mut spec = pool(size, Readiness::Notify);
    spec.max_surge = surge;
    spec.max_unavailable = unavailable;
    assert_eq!(spec.rollout_budget(size), expect);
    let (surge, unavailable) = expect;
    let mut sim = Sim::new(&config(&[("web", spec)]));
    for id in sim.starting() {
        sim.ready(id);
    }
    let started = sim.now;
    rollout(&mut sim);
    let mut booting: Vec<(WorkerId, Instant)> = Vec::new();
    let mut draining: Vec<(WorkerId, Instant)> = Vec::new();
    let mut step = 0;
    while sim.plan.status(sim.now)[0].rollout.is_some() {
        step += 1;
        assert!(step < 100_000, "the rollout never finished");
        let now = sim.now;
        for id in sim.starting() {
            if !booting.iter().any(|(b, _)| *b == id) {
                booting.push((id, now + boot));
            }
        }
        for (id, _) in &sim.signals {
            if sim.alive.contains_key(id) && !draining.iter().any(|(d, _)| d == id) {
                draining.push((*id, now + drain));
            }
        }
        let ready: Vec<WorkerId> = booting
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|b| b.0)
            .collect();
        booting.retain(|(_, at)| *at > now);
        for id in ready {
            sim.ready(id);
        }
        let gone: Vec<WorkerId> = draining
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|d| d.0)
            .collect();
        draining.retain(|(_, at)| *at > now);
        for id in gone {
            sim.exit(id, ExitStatus::Code(0));
        }
        let alive = sim.alive.values().filter(|p| *p == "web").count();
        assert!(
            alive <= size + surge,
            "{alive} alive, budget {size} + {surge}"
        );
        let serving = sim.plan.status(sim.now)[0].ready;
        assert!(
            serving + unavailable >= size,
            "{serving} serving, budget {size} - {unavailable}"
        );
        sim.advance(50 * MS);
    }
    assert_eq!(sim.serving("web").len(), size);
    assert!(
        sim.workers("web").iter().filter(|w| w.3).all(|w| w.2 == 2),
        "every serving worker is new"
    );
    sim.now.saturating_duration_since(started)
}

#[test]
fn rollouts_in_batches_respect_max_surge_and_max_unavailable_throughout() {
    use crate::config::Budget::{Count, Percent};
    // The default: one at a time, 100 steps of boot + drain for 100 workers.
    let one_by_one = batched_rollout(100, None, None, (1, 0));
    // 10% surge: ten batches.
    let batches = batched_rollout(100, Some(Percent(10)), None, (10, 0));
    assert!(
        batches * 8 < one_by_one,
        "{batches:?} in batches, {one_by_one:?} one by one"
    );
    // Surge and unavailability together, and strict's equivalent.
    batched_rollout(10, Some(Count(2)), Some(Count(2)), (2, 2));
    batched_rollout(10, Some(Count(0)), Some(Percent(20)), (0, 2));
    batched_rollout(3, Some(Count(0)), Some(Count(1)), (0, 1));
    // Percentages round up for the surge, down for the unavailable.
    batched_rollout(4, Some(Percent(10)), Some(Percent(10)), (1, 0));
}

#[test]
fn strict_is_no_surge_and_one_unavailable_and_a_budget_of_nothing_is_refused() {
    let mut spec = pool(4, Readiness::Notify);
    spec.strict = true;
    assert_eq!(spec.rollout_budget(4), (0, 1));
    spec.max_surge = Some(crate::config::Budget::Count(2));
    let mut config = config(&[("web", spec.clone())]);
    let problems = config.validate().unwrap_err();
    assert!(
        problems[0].message.contains("give either strict"),
        "{problems:?}"
    );
    spec.strict = false;
    spec.max_surge = Some(crate::config::Budget::Count(0));
    config.pools.insert("web".into(), spec);
    let problems = config.validate().unwrap_err();
    assert!(
        problems[0].message.contains("could never start"),
        "{problems:?}"
    );
}

fn named(sim: &Sim, pool: &str) -> Vec<(WorkerId, u64)> {
    sim.spawns
        .iter()
        .filter(|s| s.1 == pool)
        .map(|s| (s.0, s.3))
        .collect()
}

/// `migrate` (oneshot, 1), `cache` (2, notify), and `web` (2) after both.
fn graph() -> Sim {
    let mut migrate = pool(1, Readiness::None);
    migrate.oneshot = true;
    let cache = pool(2, Readiness::Notify);
    let mut web = pool(2, Readiness::Notify);
    web.after = vec!["migrate".into(), "cache".into()];
    Sim::new(&config(&[
        ("web", web),
        ("migrate", migrate),
        ("cache", cache),
    ]))
}

#[test]
fn a_pool_starts_after_its_oneshot_is_done_and_its_long_running_pools_are_ready() {
    let mut sim = graph();
    assert!(named(&sim, "web").is_empty(), "web waits");
    let waiting = sim.notices.iter().find_map(|n| match n {
        Notice::Waiting { pool, on } if &**pool == "web" => Some(on.clone()),
        _ => None,
    });
    assert_eq!(
        waiting.map(|on| on.iter().map(ToString::to_string).collect::<Vec<_>>()),
        Some(vec!["migrate".to_owned(), "cache".to_owned()])
    );
    assert_eq!(
        sim.plan.status(sim.now)[0].waiting_for,
        ["migrate", "cache"]
    );
    // The caches get ready; the migration is still running.
    for (id, _) in named(&sim, "cache") {
        sim.ready(id);
    }
    assert!(named(&sim, "web").is_empty());
    // The migration exits 0: done, never run again; web starts.
    let (migration, _) = named(&sim, "migrate")[0];
    sim.advance(30 * S);
    sim.exit(migration, ExitStatus::Code(0));
    assert_eq!(named(&sim, "web").len(), 2);
    assert!(sim.count(|n| matches!(n, Notice::PoolDone { .. })) == 1);
    sim.advance(120 * S);
    assert_eq!(
        named(&sim, "migrate").len(),
        1,
        "not restarted after success"
    );
    let status = sim.plan.status(sim.now);
    assert!(status[1].done && status[0].waiting_for.is_empty());
    assert_eq!(
        status[1].restarts.get("done"),
        None,
        "a success is no restart"
    );
}

#[test]
fn a_failing_oneshot_is_retried_backing_off_and_keeps_its_dependants_waiting() {
    let mut sim = graph();
    for (id, _) in named(&sim, "cache") {
        sim.ready(id);
    }
    // Failing after a long run is still a failure for a oneshot worker.
    sim.advance(60 * S);
    let (first, _) = named(&sim, "migrate")[0];
    sim.exit(first, ExitStatus::Code(1));
    assert_eq!(sim.restart_delays().last(), Some(&(S, 1)));
    sim.advance(S);
    let (second, _) = named(&sim, "migrate")[1];
    sim.exit(second, ExitStatus::Code(1));
    assert_eq!(sim.restart_delays().last(), Some(&(2 * S, 2)));
    assert!(named(&sim, "web").is_empty());
    assert_eq!(sim.plan.status(sim.now)[0].waiting_for, ["migrate"]);
}

#[test]
fn a_rollout_reruns_the_oneshot_first_and_dependants_roll_after_it() {
    let mut sim = graph();
    for (id, _) in named(&sim, "cache") {
        sim.ready(id);
    }
    let (migration, _) = named(&sim, "migrate")[0];
    sim.exit(migration, ExitStatus::Code(0));
    for (id, _) in named(&sim, "web") {
        sim.ready(id);
    }
    let before = sim.spawns.len();
    rollout(&mut sim);
    // The migration runs again (generation 2); web does not roll until it is done.
    let runs = named(&sim, "migrate");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].1, 2);
    assert!(
        sim.spawns[before..].iter().all(|s| s.1 != "web"),
        "web waits for the migration"
    );
    sim.exit(runs[1].0, ExitStatus::Code(0));
    // cache rolls meanwhile, web after it.
    finish(&mut sim);
    assert!(named(&sim, "web").iter().any(|(_, g)| *g == 2));
    assert!(sim.plan.status(sim.now).iter().all(|p| p.rollout.is_none()));
}

#[test]
fn a_graceful_shutdown_stops_dependants_before_the_pools_they_wait_for() {
    let mut sim = graph();
    for (id, _) in named(&sim, "cache") {
        sim.ready(id);
    }
    let (migration, _) = named(&sim, "migrate")[0];
    sim.exit(migration, ExitStatus::Code(0));
    for (id, _) in named(&sim, "web") {
        sim.ready(id);
    }
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    let stopped = |sim: &Sim| -> Vec<String> {
        sim.signals
            .iter()
            .map(|(id, _)| sim.alive.get(id).cloned().unwrap_or_else(|| "gone".into()))
            .collect()
    };
    assert_eq!(stopped(&sim), ["web", "web"], "web first");
    sim.exit_stopped();
    assert_eq!(sim.signals.len(), 4, "then cache");
    sim.exit_stopped();
    assert!(sim.exited);
}

#[test]
fn a_pool_of_size_0_is_defined_not_started_and_scaled_up_later() {
    let mut sim = Sim::new(&config(&[("jobs", pool(0, Readiness::None))]));
    assert!(sim.spawns.is_empty());
    sim.handle(Event::Scale {
        pool: "jobs".into(),
        size: 2,
    });
    assert_eq!(sim.spawns.len(), 2);
    sim.handle(Event::Scale {
        pool: "jobs".into(),
        size: 0,
    });
    assert_eq!(sim.signals.len(), 2, "scaled back to nothing");
}

/// The worker now in a slot of pool `web`.
fn in_slot(sim: &Sim, slot: usize) -> Option<WorkerId> {
    sim.workers("web")
        .into_iter()
        .find(|(s, ..)| *s == slot)
        .map(|(_, id, ..)| id)
}

#[test]
fn a_worker_seen_ready_is_replaced_at_once_whatever_its_uptime() {
    let mut sim = ready_pool(2, false);
    // Killed 100 ms after it was ready, long before min_uptime (5 s).
    let mut sim2 = Sim::new(&config(&[("web", pool(1, Readiness::Notify))]));
    sim2.advance(100 * MS);
    sim2.ready(WorkerId(1));
    sim2.advance(100 * MS);
    sim2.exit(WorkerId(1), ExitStatus::Signal(9));
    assert_eq!(sim2.restart_delays(), [(Duration::ZERO, 0)]);
    assert_eq!(
        sim2.starting(),
        [WorkerId(2)],
        "replaced in the same instant"
    );
    // A worker up for hours too.
    sim.advance(3600 * S);
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    assert_eq!(sim.restart_delays(), [(Duration::ZERO, 0)]);
    assert_eq!(sim.starting(), [WorkerId(3)]);
}

#[test]
fn a_worker_assumed_ready_must_stay_up_min_uptime_to_count_as_serving() {
    // `none`: ready at spawn is an assumption; dying at 100 ms is a failed start.
    let mut sim = Sim::new(&config(&[("web", pool(1, Readiness::None))]));
    sim.advance(100 * MS);
    sim.exit(WorkerId(1), ExitStatus::Code(1));
    assert_eq!(sim.restart_delays(), [(S, 1)]);
    // A worker that never became ready fails its start, whatever the readiness.
    let mut sim = Sim::new(&config(&[("web", pool(1, Readiness::Listening))]));
    sim.advance(6 * S);
    sim.exit(WorkerId(1), ExitStatus::Code(1));
    assert_eq!(sim.restart_delays(), [(S, 1)]);
}

#[test]
fn ready_workers_dying_faster_than_one_per_slot_a_second_wait_a_little_capped_at_a_second() {
    let mut sim = ready_pool(2, false);
    let mut delays = Vec::new();
    // Kill whichever worker holds slot 0 as soon as it is ready, 12 times in a row.
    for _ in 0..12 {
        let id = in_slot(&sim, 0).unwrap();
        if sim.starting().contains(&id) {
            sim.ready(id);
        }
        sim.advance(10 * MS);
        sim.exit(id, ExitStatus::Signal(11));
        delays.push(sim.restart_delays().last().unwrap().0);
        sim.advance(delays.last().copied().unwrap());
    }
    let ms = |n: u64| Duration::from_millis(n);
    // Deaths at 10, 20, 30, 140, 350 and 760 ms: two (the pool's size) in a second at once,
    // then 100 ms doubling; the 7th, at 1.57 s, opens a new window.
    assert_eq!(
        delays,
        [
            ms(0),
            ms(0),
            ms(100),
            ms(200),
            ms(400),
            ms(800),
            ms(0),
            ms(0),
            ms(100),
            ms(200),
            ms(400),
            ms(800),
        ]
    );
    assert!(
        sim.restart_delays()
            .iter()
            .all(|(_, failures)| *failures == 0)
    );
    // With a longer run of deaths in one window the delay stops growing at 1 s.
    let mut deaths = ReadyDeaths::default();
    let now = Instant::now();
    let delays: Vec<Duration> = (0..8).map(|_| deaths.record(now, 1)).collect();
    assert_eq!(delays, [ms(0), ms(100), ms(200), ms(400), ms(800), S, S, S]);
}

#[test]
fn chaos_kills_every_300ms_never_leave_the_pool_empty_and_it_refills_at_once_after() {
    // 4 workers that take 100 ms to become ready; one is killed every 300 ms for 10 s.
    let mut sim = Sim::new(&config(&[("web", pool(4, Readiness::Notify))]));
    let boot = 100 * MS;
    let mut booting: Vec<(WorkerId, Instant)> = Vec::new();
    let mut min_serving = usize::MAX;
    for step in 0..(10_000 / 10) {
        for id in sim.starting() {
            if !booting.iter().any(|(b, _)| *b == id) {
                booting.push((id, sim.now + boot));
            }
        }
        let now = sim.now;
        let due: Vec<WorkerId> = booting
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(id, _)| *id)
            .collect();
        booting.retain(|(_, at)| *at > now);
        for id in due {
            sim.ready(id);
        }
        if step >= 50 {
            min_serving = min_serving.min(sim.serving("web").len());
        }
        if step % 30 == 0 {
            let serving = sim.serving("web");
            if let Some(id) = serving.get(step / 30 % serving.len().max(1)) {
                sim.exit(*id, ExitStatus::Signal(9));
            }
        }
        sim.advance(10 * MS);
    }
    assert!(
        min_serving >= 2,
        "at most one killed and one booting: {min_serving}"
    );
    assert!(
        sim.restart_delays()
            .iter()
            .all(|(delay, _)| delay.is_zero()),
        "3.3 kills a second in a pool of 4 is under the budget"
    );
    // The kills stop: every slot serves again one boot later.
    sim.advance(boot);
    for id in sim.starting() {
        sim.ready(id);
    }
    assert_eq!(sim.serving("web").len(), 4);
}

#[test]
fn listening_makes_a_listening_pool_ready_once_and_is_reported_for_others() {
    let socket: Arc<str> = Arc::from("http");
    let mut sim = Sim::new(&config(&[
        ("web", pool(1, Readiness::Listening)),
        ("api", pool(1, Readiness::Notify)),
    ]));
    sim.advance(120 * MS);
    for id in [WorkerId(1), WorkerId(2)] {
        sim.handle(Event::Listening {
            id,
            socket: socket.clone(),
            how: crate::listening::Wait::Epoll,
            process: 1,
        });
    }
    assert_eq!(sim.serving("web"), [WorkerId(1)]);
    assert!(
        sim.serving("api").is_empty(),
        "notify pools wait for READY=1"
    );
    let seen: Vec<(WorkerId, Duration)> = sim
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Listening { worker, after, .. } => Some((worker.id, *after)),
            _ => None,
        })
        .collect();
    assert_eq!(seen, [(WorkerId(1), 120 * MS), (WorkerId(2), 120 * MS)]);
    let ready = sim.count(|n| matches!(n, Notice::Ready { .. }));
    sim.handle(Event::Listening {
        id: WorkerId(1),
        socket: socket.clone(),
        how: crate::listening::Wait::Accept,
        process: 1,
    });
    assert_eq!(
        sim.count(|n| matches!(n, Notice::Listening { .. })),
        2,
        "once"
    );
    assert_eq!(sim.count(|n| matches!(n, Notice::Ready { .. })), ready);
    assert_eq!(
        sim.plan.worker(WorkerId(1)).unwrap().seen_listening,
        Some((sim.now, socket))
    );
}

#[test]
fn a_listening_worker_never_seen_is_killed_at_ready_timeout_and_a_rollout_to_it_stops() {
    let mut sim = Sim::new(&config(&[("web", pool(2, Readiness::Listening))]));
    for id in sim.starting() {
        sim.handle(Event::Listening {
            id,
            socket: Arc::from("http"),
            how: crate::listening::Wait::Epoll,
            process: 1,
        });
    }
    assert_eq!(sim.serving("web").len(), 2);
    rollout(&mut sim);
    let replacement = sim.starting()[0];
    sim.advance(10 * S);
    assert!(sim.kills.contains(&replacement));
    assert!(sim.signals.is_empty(), "no old worker was asked to stop");
    assert_eq!(sim.serving("web").len(), 2);
    assert_eq!(sim.count(|n| matches!(n, Notice::RolloutAborted { .. })), 1);
}

fn ready_pool(size: usize, strict: bool) -> Sim {
    let mut spec = pool(size, Readiness::Notify);
    spec.strict = strict;
    let mut sim = Sim::new(&config(&[("web", spec)]));
    for id in sim.starting() {
        sim.ready(id);
    }
    sim.advance(10 * S);
    sim
}

fn rollout(sim: &mut Sim) {
    sim.handle(Event::Rollout {
        pool: None,
        trigger: RolloutTrigger::Restart,
        spec: None,
    });
}

/// Drives a rollout to the end: every new worker becomes ready, every stopped one exits.
fn finish(sim: &mut Sim) {
    for _ in 0..100 {
        for id in sim.starting() {
            sim.ready(id);
        }
        sim.exit_stopped();
        if sim.starting().is_empty()
            && sim
                .signals
                .iter()
                .all(|(id, _)| !sim.alive.contains_key(id))
        {
            break;
        }
    }
}

#[test]
fn rolling_restart_replaces_one_slot_at_a_time_ready_before_stop() {
    let mut sim = ready_pool(3, false);
    rollout(&mut sim);
    // Only slot 0's replacement starts; nobody is stopped yet.
    assert_eq!(sim.starting(), [WorkerId(4)]);
    assert!(sim.signals.is_empty());
    sim.advance(5 * S);
    assert_eq!(
        sim.starting(),
        [WorkerId(4)],
        "no second replacement while one is starting"
    );
    sim.ready(WorkerId(4));
    assert_eq!(
        sim.signals,
        [(WorkerId(1), Signal::TERM)],
        "old one stopped once the new one is ready"
    );
    assert!(
        sim.starting().is_empty(),
        "next slot waits until the old worker has exited"
    );
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    assert_eq!(sim.starting(), [WorkerId(5)]);
    assert_eq!(sim.spawns.last().map(|s| s.2), Some(1), "slot 1 next");
    finish(&mut sim);
    let workers = sim.workers("web");
    assert_eq!(
        workers.iter().map(|w| (w.0, w.2, w.3)).collect::<Vec<_>>(),
        [(0, 2, true), (1, 2, true), (2, 2, true)]
    );
    assert_eq!(sim.peak["web"], 4, "never more than one extra worker");
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::RolloutFinished {
            generation: 2,
            replaced: 3,
            ..
        }
    )));
    let stops: Vec<_> = sim
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Stopping { worker, reason, .. } => Some((worker.id.0, *reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        stops,
        [
            (1, StopReason::Rollout),
            (2, StopReason::Rollout),
            (3, StopReason::Rollout)
        ]
    );
}

#[test]
fn a_replacement_that_never_gets_ready_stops_the_rollout_and_keeps_the_old_workers() {
    let mut sim = ready_pool(3, false);
    rollout(&mut sim);
    sim.ready(WorkerId(4));
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    // Slot 1's replacement hangs.
    sim.advance(10 * S);
    assert_eq!(sim.kills, [WorkerId(5)]);
    sim.exit(WorkerId(5), ExitStatus::Signal(9));
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::RolloutAborted {
            generation: 2,
            replaced: 1,
            size: 3,
            ..
        }
    )));
    sim.advance(60 * S);
    assert!(
        sim.starting().is_empty(),
        "no further replacement after the abort"
    );
    let mut serving = sim.serving("web");
    serving.sort();
    assert_eq!(serving, [WorkerId(2), WorkerId(3), WorkerId(4)]);
    assert_eq!(
        sim.signals.len(),
        1,
        "no old worker but the first was stopped"
    );
    // A crash of an old worker is restarted with the live (old) generation.
    sim.exit(WorkerId(2), ExitStatus::Code(1));
    sim.advance(S);
    assert_eq!(sim.spawns.last().map(|s| (s.2, s.3)), Some((1, 1)));
}

#[test]
fn a_replacement_that_crashes_stops_the_rollout() {
    let mut sim = ready_pool(2, false);
    rollout(&mut sim);
    sim.exit(WorkerId(3), ExitStatus::Code(3));
    assert!(
        sim.notices
            .iter()
            .any(|n| matches!(n, Notice::RolloutAborted { replaced: 0, .. }))
    );
    assert!(sim.signals.is_empty());
    assert_eq!(sim.serving("web").len(), 2);
}

#[test]
fn strict_rollout_stops_first_and_never_exceeds_size() {
    let mut sim = ready_pool(3, true);
    rollout(&mut sim);
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
    assert!(
        sim.starting().is_empty(),
        "strict: the slot is refilled only after the old exits"
    );
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    assert_eq!(sim.starting(), [WorkerId(4)]);
    finish(&mut sim);
    assert_eq!(sim.peak["web"], 3);
    assert!(sim.workers("web").iter().all(|w| w.2 == 2 && w.3));
}

#[test]
fn rollout_requests_during_a_rollout_are_coalesced() {
    let mut sim = ready_pool(3, false);
    rollout(&mut sim);
    sim.ready(WorkerId(4));
    rollout(&mut sim);
    rollout(&mut sim);
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::RolloutStarted {
            generation: 4,
            superseded: Some(3),
            ..
        }
    )));
    finish(&mut sim);
    assert_eq!(sim.peak["web"], 4, "still at most one extra worker");
    assert!(
        sim.workers("web").iter().all(|w| w.2 == 4),
        "everyone runs the newest generation"
    );
    assert_eq!(
        sim.count(|n| matches!(n, Notice::RolloutFinished { .. })),
        1
    );
}

#[test]
fn a_rollout_with_new_settings_uses_them_and_makes_them_live() {
    let mut sim = ready_pool(2, false);
    let mut spec = pool(2, Readiness::Notify);
    spec.command = Command::new(["app", "--v2"]).unwrap();
    let spec = Arc::new(spec);
    sim.handle(Event::Rollout {
        pool: Some("web".into()),
        trigger: RolloutTrigger::Reload,
        spec: Some(spec),
    });
    finish(&mut sim);
    // A crash afterwards restarts (at once: it was serving) with the new command.
    let id = sim.serving("web")[0];
    sim.advance(10 * S);
    sim.exit(id, ExitStatus::Code(1));
    let (replacement, _, _, generation) = sim.spawns.last().cloned().unwrap();
    assert_eq!(generation, 2);
    assert_eq!(
        sim.plan.worker(replacement).unwrap().spec().command.words(),
        ["app", "--v2"]
    );
}

#[test]
fn rollout_of_an_unknown_pool_is_refused() {
    let mut sim = ready_pool(1, false);
    sim.handle(Event::Rollout {
        pool: Some("nope".into()),
        trigger: RolloutTrigger::Restart,
        spec: None,
    });
    assert!(
        sim.notices
            .iter()
            .any(|n| matches!(n, Notice::Refused { .. }))
    );
    assert!(sim.starting().is_empty());
}

#[test]
fn a_crash_of_the_old_worker_during_its_replacement_needs_no_extra_restart() {
    let mut sim = ready_pool(1, false);
    rollout(&mut sim);
    sim.advance(S);
    sim.exit(WorkerId(1), ExitStatus::Signal(9));
    sim.advance(3 * S);
    assert_eq!(
        sim.starting(),
        [WorkerId(2)],
        "no restart while the replacement is starting"
    );
    sim.ready(WorkerId(2));
    assert_eq!(sim.serving("web"), [WorkerId(2)]);
    assert!(
        sim.notices
            .iter()
            .any(|n| matches!(n, Notice::RolloutFinished { .. }))
    );
}

#[test]
fn stop_escalates_to_sigkill_after_kill_timeout() {
    let mut sim = ready_pool(1, false);
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
    sim.advance(5 * S - MS);
    assert!(sim.kills.is_empty());
    sim.advance(MS);
    assert_eq!(sim.kills, [WorkerId(1)]);
    assert!(!sim.exited);
    sim.exit(WorkerId(1), ExitStatus::Signal(9));
    assert!(sim.exited);
}

#[test]
fn graceful_shutdown_stops_everyone_and_restarts_nobody() {
    let mut sim = Sim::new(&config(&[
        ("web", pool(2, Readiness::None)),
        ("jobs", pool(1, Readiness::Notify)),
    ]));
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    assert_eq!(sim.signals.len(), 3, "starting workers are stopped too");
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    sim.exit(WorkerId(2), ExitStatus::Code(1));
    sim.advance(60 * S);
    assert_eq!(sim.spawns.len(), 3, "nothing restarted during shutdown");
    assert!(!sim.exited);
    sim.exit(WorkerId(3), ExitStatus::Code(0));
    assert!(sim.exited);
}

#[test]
fn a_second_shutdown_kills_at_once() {
    let mut sim = ready_pool(2, false);
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    assert!(
        sim.kills.is_empty(),
        "a repeated graceful request changes nothing"
    );
    sim.handle(Event::Shutdown {
        immediate: true,
        timeout: None,
    });
    assert_eq!(sim.kills, [WorkerId(1), WorkerId(2)]);
}

#[test]
fn scaling_adds_slots_and_stops_the_highest_ones() {
    let mut sim = ready_pool(2, false);
    sim.handle(Event::Scale {
        pool: "web".into(),
        size: 4,
    });
    assert_eq!(
        sim.spawns.iter().map(|s| s.2).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    sim.handle(Event::Scale {
        pool: "web".into(),
        size: 1,
    });
    let stopped: Vec<_> = sim
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Stopping {
                worker,
                reason: StopReason::Scale,
                ..
            } => Some(worker.slot),
            _ => None,
        })
        .collect();
    assert_eq!(stopped, [3, 2, 1]);
    sim.handle(Event::Scale {
        pool: "web".into(),
        size: usize::MAX,
    });
    assert!(
        sim.notices
            .iter()
            .any(|n| matches!(n, Notice::Refused { .. }))
    );
    sim.exit_stopped();
    assert_eq!(sim.plan.workers().count(), 1);
}

#[test]
fn regrowing_a_slot_waits_for_its_stopping_worker() {
    let mut sim = ready_pool(2, false);
    sim.handle(Event::Scale {
        pool: "web".into(),
        size: 1,
    });
    sim.handle(Event::Scale {
        pool: "web".into(),
        size: 2,
    });
    assert_eq!(sim.spawns.len(), 2, "slot 1's old worker is still draining");
    sim.exit(WorkerId(2), ExitStatus::Code(0));
    assert_eq!(sim.spawns.len(), 3);
}

#[test]
fn ttl_recycles_each_worker_by_rolling_replacement_with_jitter() {
    let mut spec = pool(3, Readiness::None);
    spec.ttl = Some(100 * S);
    let mut sim = Sim::new(&config(&[("web", spec)]));
    sim.advance(90 * S - MS);
    assert_eq!(sim.spawns.len(), 3, "nothing before ttl - 10%");
    // Let the replacements go through as they come.
    for _ in 0..200 {
        sim.advance(S);
        sim.exit_stopped();
    }
    let ttl_stops: Vec<_> = sim
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Stopping {
                worker,
                reason: StopReason::Ttl,
                ..
            } => Some(worker.id),
            _ => None,
        })
        .collect();
    for original in [WorkerId(1), WorkerId(2), WorkerId(3)] {
        assert!(
            ttl_stops.contains(&original),
            "{original} recycled: {ttl_stops:?}"
        );
    }
    assert!(
        ttl_stops.len() >= 3,
        "every original worker recycled: {ttl_stops:?}"
    );
    assert!(sim.peak["web"] <= 4);
    let queued = sim.count(|n| {
        matches!(
            n,
            Notice::ReplaceQueued {
                reason: StopReason::Ttl,
                ..
            }
        )
    });
    assert!(queued >= 3);
}

#[test]
fn ttl_jitter_stays_within_ten_percent_and_varies() {
    let mut plan = Plan::new(&Config::default(), 12345);
    let samples: Vec<Duration> = (0..1000).map(|_| plan.jitter(100 * S)).collect();
    assert!(samples.iter().all(|d| *d >= 90 * S && *d <= 110 * S));
    let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
    assert!(distinct.len() > 900);
}

#[test]
fn a_worker_asking_for_restart_is_replaced_after_its_successor_is_ready() {
    let mut sim = ready_pool(2, false);
    sim.message(WorkerId(2), WorkerMessage::RequestRestart);
    assert_eq!(sim.starting(), [WorkerId(3)]);
    assert_eq!(sim.spawns.last().map(|s| s.2), Some(1));
    assert!(sim.signals.is_empty());
    sim.ready(WorkerId(3));
    assert_eq!(sim.signals, [(WorkerId(2), Signal::TERM)]);
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::Stopping {
            reason: StopReason::Requested,
            ..
        }
    )));
}

#[test]
fn a_worker_announcing_stopping_gets_a_successor_and_its_exit_is_not_a_crash() {
    let mut sim = ready_pool(1, false);
    sim.message(WorkerId(1), WorkerMessage::Stopping);
    assert_eq!(sim.starting(), [WorkerId(2)]);
    sim.exit(WorkerId(1), ExitStatus::Code(0));
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::Exited {
            cause: ExitCause::Announced,
            ..
        }
    )));
    assert_eq!(
        sim.spawns.len(),
        2,
        "its exit does not start a second successor"
    );
    sim.ready(WorkerId(2));
    assert_eq!(sim.serving("web"), [WorkerId(2)]);
}

#[test]
fn a_failed_ttl_replacement_keeps_the_worker_and_tries_again_later() {
    let mut spec = pool(1, Readiness::Notify);
    spec.ttl = Some(100 * S);
    let mut sim = Sim::new(&config(&[("web", spec)]));
    sim.ready(WorkerId(1));
    sim.advance(111 * S);
    assert_eq!(sim.starting(), [WorkerId(2)]);
    sim.exit(WorkerId(2), ExitStatus::Code(1));
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::ReplaceAbandoned {
            reason: StopReason::Ttl,
            ..
        }
    )));
    assert_eq!(sim.serving("web"), [WorkerId(1)]);
    sim.advance(111 * S);
    assert_eq!(
        sim.starting(),
        [WorkerId(3)],
        "tried again after another ttl"
    );
}

#[test]
fn a_flood_of_status_changes_is_logged_once_per_interval_with_a_count() {
    let mut sim = ready_pool(1, false);
    for n in 0..100_000 {
        sim.message(WorkerId(1), WorkerMessage::Status(format!("step {n}")));
        if n % 10_000 == 9_999 {
            sim.advance(S);
        }
    }
    let logged: Vec<(String, u64)> = sim
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::Status {
                text, suppressed, ..
            } => Some((text.clone(), *suppressed)),
            _ => None,
        })
        .collect();
    // 10 s of changes, one logged every 3 s: at 0, 3, 6 and 9 s.
    assert_eq!(
        logged,
        [
            ("step 0".to_owned(), 0),
            ("step 30000".to_owned(), 29_999),
            ("step 60000".to_owned(), 29_999),
            ("step 90000".to_owned(), 29_999),
        ]
    );
    // The last one is the worker's status all the same.
    let status = sim.plan.status(sim.now);
    assert_eq!(status[0].workers[0].status.as_deref(), Some("step 99999"));
}

#[test]
fn messages_from_stopping_workers_are_ignored() {
    let mut sim = ready_pool(1, false);
    sim.message(WorkerId(1), WorkerMessage::Status("busy".into()));
    sim.message(WorkerId(1), WorkerMessage::Status("busy".into()));
    assert_eq!(
        sim.count(|n| matches!(n, Notice::Status { .. })),
        1,
        "unchanged status is not logged twice"
    );
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    sim.message(WorkerId(1), WorkerMessage::RequestRestart);
    sim.message(WorkerId(1), WorkerMessage::Ready);
    assert_eq!(sim.spawns.len(), 1);
}

#[test]
fn an_added_pool_starts_and_a_removed_pool_stops_gracefully() {
    let mut sim = ready_pool(2, false);
    let jobs = Arc::new(pool(3, Readiness::None));
    sim.handle(Event::AddPool {
        name: "jobs".into(),
        spec: jobs.clone(),
    });
    assert_eq!(sim.serving("jobs").len(), 3);
    assert_eq!(
        sim.plan.pools().collect::<Vec<_>>(),
        [("web", 2), ("jobs", 3)]
    );
    // A second pool of the same name is refused.
    sim.handle(Event::AddPool {
        name: "jobs".into(),
        spec: jobs,
    });
    assert_eq!(sim.count(|n| matches!(n, Notice::Refused { .. })), 1);

    sim.handle(Event::RemovePool { name: "web".into() });
    let stopped: Vec<_> = sim.signals.iter().map(|(id, _)| *id).collect();
    assert_eq!(stopped, [WorkerId(1), WorkerId(2)]);
    assert_eq!(sim.plan.pools().collect::<Vec<_>>(), [("jobs", 3)]);
    sim.exit_stopped();
    // Nothing refills the removed pool's slots; the other pool is untouched.
    sim.advance(60 * S);
    assert!(sim.workers("web").is_empty());
    assert_eq!(sim.serving("jobs").len(), 3);
    assert_eq!(
        sim.count(|n| matches!(
            n,
            Notice::Exited {
                cause: ExitCause::Stopped(StopReason::PoolRemoved),
                ..
            }
        )),
        2
    );
    // The name can be used again, for a new pool.
    sim.handle(Event::AddPool {
        name: "web".into(),
        spec: Arc::new(pool(1, Readiness::None)),
    });
    assert_eq!(sim.serving("web").len(), 1);
}

#[test]
fn an_operator_restart_replaces_one_worker_after_its_successor_is_ready() {
    let mut sim = ready_pool(2, false);
    sim.handle(Event::Replace { id: WorkerId(1) });
    assert_eq!(sim.starting(), [WorkerId(3)]);
    assert!(sim.signals.is_empty());
    sim.ready(WorkerId(3));
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
    // A worker that is already stopping, or unknown, is refused.
    sim.handle(Event::Replace { id: WorkerId(1) });
    sim.handle(Event::Replace { id: WorkerId(99) });
    assert_eq!(sim.count(|n| matches!(n, Notice::Refused { .. })), 2);
}

#[test]
fn memory_above_the_limit_for_the_grace_period_replaces_the_worker() {
    let mut spec = pool(1, Readiness::Notify);
    spec.max_memory = Some(crate::config::ByteSize(1000));
    let mut sim = Sim::new(&config(&[("web", spec)]));
    sim.ready(WorkerId(1));
    let sample = |sim: &mut Sim, rss| {
        sim.handle(Event::Memory {
            id: WorkerId(1),
            rss,
        })
    };
    // A burst, then back below the limit: nothing happens.
    sample(&mut sim, 5000);
    sim.advance(2 * S);
    sample(&mut sim, 500);
    sim.advance(2 * S);
    sample(&mut sim, 5000);
    sim.advance(2 * S);
    sample(&mut sim, 5000);
    assert!(sim.starting().is_empty());
    // Above it for MEMORY_GRACE: replaced, rolling.
    sim.advance(MEMORY_GRACE);
    sample(&mut sim, 5000);
    sample(&mut sim, 6000);
    assert_eq!(sim.starting(), [WorkerId(2)]);
    assert_eq!(sim.count(|n| matches!(n, Notice::OverMemory { .. })), 1);
    assert!(sim.signals.is_empty());
    sim.ready(WorkerId(2));
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
}

#[test]
fn a_worker_silent_past_its_watchdog_is_aborted_and_replaced() {
    let mut spec = pool(1, Readiness::Notify);
    spec.watchdog = Some(10 * S);
    let mut sim = Sim::new(&config(&[("web", spec)]));
    sim.advance(5 * S);
    sim.ready(WorkerId(1));
    // Pings keep it alive well past one watchdog period.
    for _ in 0..5 {
        sim.advance(8 * S);
        sim.message(WorkerId(1), WorkerMessage::Watchdog);
    }
    assert!(sim.signals.is_empty());
    sim.advance(10 * S);
    assert_eq!(sim.signals, [(WorkerId(1), Signal::ABRT)]);
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::Hung { silent_for, .. } if *silent_for == 10 * S
    )));
    // Still there after kill_timeout: SIGKILL; once gone, the slot is refilled at once.
    sim.advance(5 * S);
    assert_eq!(sim.kills, [WorkerId(1)]);
    sim.exit(WorkerId(1), ExitStatus::Signal(9));
    assert_eq!(sim.starting(), [WorkerId(2)]);
    // WATCHDOG=trigger: hung right away.
    sim.ready(WorkerId(2));
    sim.message(WorkerId(2), WorkerMessage::WatchdogTrigger);
    assert_eq!(sim.signals.last(), Some(&(WorkerId(2), Signal::ABRT)));
}

#[test]
fn a_shutdown_timeout_overrides_kill_timeout() {
    let mut sim = ready_pool(1, false);
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: Some(S),
    });
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
    sim.advance(S);
    assert_eq!(sim.kills, [WorkerId(1)]);
}

#[test]
fn restarts_are_counted_per_slot_and_by_reason() {
    let mut sim = ready_pool(2, false);
    sim.exit(WorkerId(1), ExitStatus::Signal(9));
    sim.advance(2 * S);
    sim.message(WorkerId(2), WorkerMessage::RequestRestart);
    finish(&mut sim);
    let pool = &sim.plan.pools[0];
    assert_eq!(pool.slots[0].restarts, 1);
    assert_eq!(pool.slots[1].restarts, 1);
    assert_eq!(
        pool.restarts
            .iter()
            .map(|(k, v)| (k.as_ref(), *v))
            .collect::<Vec<_>>(),
        [("crash", 1), ("request", 1)]
    );
    assert_eq!(
        pool.slots[0].last_exit.map(|e| e.status),
        Some(ExitStatus::Signal(9))
    );
}

#[test]
fn the_status_shows_states_rollout_progress_and_last_exits() {
    let mut sim = ready_pool(2, false);
    sim.exit(WorkerId(1), ExitStatus::Code(3));
    let pools = sim.plan.status(sim.now);
    assert_eq!(pools.len(), 1);
    assert_eq!((pools[0].size, pools[0].ready), (2, 1));
    sim.advance(2 * S);
    sim.ready(WorkerId(3));
    rollout(&mut sim);
    let pools = sim.plan.status(sim.now);
    let web = &pools[0];
    assert_eq!(web.ready, 2);
    assert_eq!(
        web.rollout.as_ref().map(|r| (r.replaced, r.size)),
        Some((0, 2))
    );
    let states: Vec<_> = web
        .workers
        .iter()
        .map(|w| (w.slot, w.id, w.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [(0, 3, "ready"), (0, 4, "starting"), (1, 2, "ready")]
    );
    let slot0 = &web.workers[0];
    assert_eq!(slot0.restarts, 1);
    let last = slot0.last_exit.as_ref().unwrap();
    assert_eq!(
        (last.status.as_str(), last.reason.as_str()),
        ("exit code 3", "crash")
    );
    assert_eq!(web.restarts.get("crash"), Some(&1));
}

#[test]
fn a_restart_keeps_a_scaled_size_and_a_reload_applies_the_configured_one() {
    let mut sim = ready_pool(2, false);
    sim.handle(Event::Scale {
        pool: "web".into(),
        size: 3,
    });
    for id in sim.starting() {
        sim.ready(id);
    }
    rollout(&mut sim);
    finish(&mut sim);
    assert_eq!(sim.plan.pools().collect::<Vec<_>>(), [("web", 3)]);
    sim.handle(Event::Rollout {
        pool: None,
        trigger: RolloutTrigger::Reload,
        spec: Some(Arc::new(pool(2, Readiness::Notify))),
    });
    finish(&mut sim);
    assert_eq!(sim.plan.pools().collect::<Vec<_>>(), [("web", 2)]);
}

#[test]
fn a_worker_cut_off_is_replaced_rolling_when_serving_and_fails_its_start_when_starting() {
    let mut sim = ready_pool(2, false);
    sim.handle(Event::Cut {
        id: WorkerId(1),
        why: "garbage".into(),
    });
    assert_eq!(sim.starting(), [WorkerId(3)]);
    assert!(
        sim.signals.is_empty(),
        "it serves until its successor is ready"
    );
    sim.ready(WorkerId(3));
    assert_eq!(sim.signals, [(WorkerId(1), Signal::TERM)]);
    sim.exit_stopped();

    // A starting worker that breaks the protocol is stopped and its slot backs off.
    sim.exit(WorkerId(2), ExitStatus::Signal(9));
    sim.advance(2 * S);
    let starting = sim.starting();
    assert_eq!(starting, [WorkerId(4)]);
    sim.handle(Event::Cut {
        id: WorkerId(4),
        why: "oversized frame".into(),
    });
    assert_eq!(sim.signals.last(), Some(&(WorkerId(4), Signal::TERM)));
    assert_eq!(
        sim.count(|n| matches!(n, Notice::RestartScheduled { failures: 1, .. })),
        1
    );
    sim.exit(WorkerId(4), ExitStatus::Code(0));
    sim.advance(2 * S);
    assert_eq!(sim.starting(), [WorkerId(5)]);
}

#[test]
fn a_worker_cut_off_that_leaves_on_its_own_broke_the_protocol_it_did_not_crash() {
    let mut sim = ready_pool(1, false);
    sim.handle(Event::Cut {
        id: WorkerId(1),
        why: "not JSON".into(),
    });
    // Its channel closed, it exits before its successor is ready.
    sim.exit(WorkerId(1), ExitStatus::Code(1));
    let cause = sim.notices.iter().find_map(|n| match n {
        Notice::Exited { cause, .. } => Some(*cause),
        _ => None,
    });
    assert_eq!(cause, Some(ExitCause::Stopped(StopReason::Protocol)));
    let status = sim.plan.status(sim.now);
    assert_eq!(status[0].restarts.get("protocol"), Some(&1), "{status:?}");
    assert_eq!(status[0].restarts.get("crash"), None);
}

/// The names are the `event` of the JSON log and of the control stream: scripts tell notices
/// apart by them.
#[test]
fn every_notice_has_a_name_of_its_own() {
    let worker = WorkerRef {
        pool: "web".into(),
        slot: 0,
        id: WorkerId(1),
        pid: Some(1000),
        generation: 1,
    };
    let pool: Arc<str> = "web".into();
    let notices = [
        Notice::Spawned {
            worker: worker.clone(),
        },
        Notice::SpawnFailed {
            worker: worker.clone(),
            error: String::new(),
        },
        Notice::Ready {
            worker: worker.clone(),
            after: S,
        },
        Notice::Listening {
            worker: worker.clone(),
            socket: pool.clone(),
            how: crate::listening::Wait::Epoll,
            process: 1001,
            after: S,
        },
        Notice::Stopping {
            worker: worker.clone(),
            reason: StopReason::Rollout,
            signal: Signal::TERM,
            told: None,
        },
        Notice::Killed {
            worker: worker.clone(),
            cause: KillCause::ShutdownNow,
        },
        Notice::Exited {
            worker: worker.clone(),
            status: ExitStatus::Code(0),
            cause: ExitCause::Crashed,
            uptime: S,
        },
        Notice::RestartScheduled {
            pool: pool.clone(),
            slot: 0,
            delay: S,
            failures: 0,
        },
        Notice::ReplaceQueued {
            worker: worker.clone(),
            reason: StopReason::Ttl,
        },
        Notice::ReplaceAbandoned {
            worker: worker.clone(),
            reason: StopReason::Ttl,
            why: String::new(),
        },
        Notice::RolloutStarted {
            pool: pool.clone(),
            generation: 2,
            trigger: RolloutTrigger::Restart,
            superseded: None,
        },
        Notice::RolloutFinished {
            pool: pool.clone(),
            generation: 2,
            replaced: 1,
            elapsed: S,
        },
        Notice::RolloutAborted {
            pool: pool.clone(),
            generation: 2,
            replaced: 0,
            size: 1,
            why: String::new(),
        },
        Notice::Scaled {
            pool: pool.clone(),
            from: 1,
            to: 2,
        },
        Notice::Status {
            worker: worker.clone(),
            text: String::new(),
            suppressed: 0,
        },
        Notice::Refused { why: String::new() },
        Notice::ShutdownStarted {
            immediate: false,
            workers: 1,
        },
        Notice::AllStopped,
        Notice::PoolAdded {
            pool: pool.clone(),
            size: 1,
        },
        Notice::PoolRemoved {
            pool: pool.clone(),
            workers: 1,
        },
        Notice::Hung {
            worker: worker.clone(),
            silent_for: S,
        },
        Notice::OverMemory {
            worker,
            rss: 2,
            limit: 1,
        },
    ];
    let names: std::collections::BTreeSet<&str> = notices.iter().map(Notice::name).collect();
    assert_eq!(
        names.len(),
        notices.len(),
        "two notices share a name: {names:?}"
    );
    assert!(names.iter().all(|name| !name.is_empty()));
}

#[test]
fn a_size_beyond_any_systems_processes_is_refused_not_allocated() {
    let mut sim = ready_pool(1, false);
    let outcome = sim.plan.handle(
        Event::Scale {
            pool: "web".into(),
            size: usize::MAX,
        },
        sim.now,
    );
    assert!(
        outcome
            .refusal()
            .is_some_and(|why| why.contains("processes"))
    );
    assert!(outcome.actions.is_empty());
    assert_eq!(sim.plan.pools().next(), Some(("web", 1)));
}

#[test]
fn an_outcome_tells_whether_its_event_was_refused() {
    let mut sim = ready_pool(1, false);
    let refused = sim.plan.handle(
        Event::Scale {
            pool: "nope".into(),
            size: 2,
        },
        sim.now,
    );
    assert_eq!(refused.refusal(), Some("scaling unknown pool `nope`"));
    let accepted = sim.plan.handle(
        Event::Scale {
            pool: "web".into(),
            size: 2,
        },
        sim.now,
    );
    assert_eq!(accepted.refusal(), None);
    assert!(!accepted.actions.is_empty());
}

// ----- before_start --------------------------------------------------------------------------

fn hooked(size: usize) -> PoolSpec {
    let mut spec = pool(size, Readiness::Notify);
    spec.before_start = Some(Command::new(["build"]).unwrap());
    spec.before_start_timeout = 60 * S;
    spec
}

impl Sim {
    fn hook_exits(&mut self, pool: &str, generation: u64, result: Result<(), &str>) {
        self.handle(Event::HookExited {
            pool: pool.to_owned(),
            generation,
            result: result.map_err(str::to_owned),
        });
    }

    fn hook_status(&self, pool: &str) -> Option<crate::status::HookStatus> {
        let status = self.plan.status(self.now);
        let pool = status.iter().find(|p| p.name == pool).expect("the pool");
        pool.before_start.clone()
    }
}

#[test]
fn a_pool_with_before_start_starts_its_workers_once_it_exited_0() {
    let mut sim = Sim::new(&config(&[
        ("web", hooked(2)),
        ("jobs", pool(1, Readiness::None)),
    ]));
    assert_eq!(sim.hooks, [("web".to_owned(), 1)]);
    assert_eq!(
        sim.workers("web"),
        [],
        "nothing starts before the command is done"
    );
    assert_eq!(sim.workers("jobs").len(), 1, "other pools do not wait");
    assert!(sim.hook_status("web").unwrap().running_secs.is_some());

    sim.advance(3 * S);
    sim.hook_exits("web", 1, Ok(()));
    let started: Vec<(usize, u64)> = sim.workers("web").iter().map(|w| (w.0, w.2)).collect();
    assert_eq!(started, [(0, 1), (1, 1)]);
    assert_eq!(sim.hook_status("web"), None);
    assert_eq!(
        sim.count(|n| matches!(n, Notice::HookFinished { generation: 1, elapsed, .. } if *elapsed == 3 * S)),
        1
    );

    // A crash restarts the worker without running the command again: it ran for this generation.
    let id = sim.workers("web")[0].1;
    sim.ready(id);
    sim.advance(10 * S);
    sim.exit(id, ExitStatus::Code(1));
    assert_eq!(sim.hooks.len(), 1);
    assert_eq!(sim.workers("web").len(), 2);
}

#[test]
fn a_failing_before_start_on_first_start_is_run_again_backing_off() {
    let mut sim = Sim::new(&config(&[("web", hooked(1))]));
    sim.hook_exits("web", 1, Err("exited with exit code 2"));
    let delays: Vec<Option<Duration>> = sim
        .notices
        .iter()
        .filter_map(|n| match n {
            Notice::HookFailed { retry_in, .. } => Some(*retry_in),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [Some(S)]);
    let status = sim.hook_status("web").unwrap();
    assert_eq!(
        status.last_error.as_deref(),
        Some("exited with exit code 2")
    );
    assert_eq!((status.failures, status.running_secs), (1, None));
    assert_eq!(status.next_attempt_secs, Some(1.0));

    sim.advance(S - MS);
    assert_eq!(sim.hooks.len(), 1, "not before its backoff");
    sim.advance(MS);
    assert_eq!(sim.hooks, [("web".to_owned(), 1), ("web".to_owned(), 1)]);
    sim.hook_exits("web", 1, Err("exited with exit code 2"));
    sim.advance(2 * S);
    assert_eq!(sim.hooks.len(), 3, "the second failure waits twice as long");
    assert_eq!(sim.workers("web"), []);

    sim.hook_exits("web", 1, Ok(()));
    assert_eq!(sim.workers("web").len(), 1);
    assert_eq!(sim.hook_status("web"), None, "a success clears the failure");
}

#[test]
fn a_rollout_waits_for_before_start_with_the_old_workers_serving_and_slots_refilled() {
    let mut sim = Sim::new(&config(&[("web", hooked(2))]));
    sim.hook_exits("web", 1, Ok(()));
    for id in sim.starting() {
        sim.ready(id);
    }
    sim.advance(10 * S);
    rollout(&mut sim);
    assert_eq!(sim.hooks.last(), Some(&("web".to_owned(), 2)));
    assert!(
        sim.starting().is_empty(),
        "no replacement before the command is done"
    );
    assert!(sim.signals.is_empty());

    // A worker that crashes meanwhile is replaced at once, by the running generation.
    let crashed = sim.serving("web")[0];
    sim.exit(crashed, ExitStatus::Signal(9));
    let refill = sim.starting();
    assert_eq!(refill.len(), 1);
    assert_eq!(sim.plan.worker(refill[0]).unwrap().generation, 1);
    sim.ready(refill[0]);

    sim.hook_exits("web", 2, Ok(()));
    finish(&mut sim);
    let generations: Vec<u64> = sim.workers("web").iter().map(|w| w.2).collect();
    assert_eq!(generations, [2, 2]);
    assert_eq!(
        sim.count(|n| matches!(n, Notice::RolloutFinished { generation: 2, .. })),
        1
    );
    assert_eq!(
        sim.peak["web"], 3,
        "one replacement at a time, beside the old workers"
    );
}

#[test]
fn a_rollout_whose_before_start_fails_stops_and_the_old_workers_serve_on() {
    let mut sim = Sim::new(&config(&[("web", hooked(2))]));
    sim.hook_exits("web", 1, Ok(()));
    for id in sim.starting() {
        sim.ready(id);
    }
    let serving = sim.serving("web");
    rollout(&mut sim);
    sim.hook_exits("web", 2, Err("exited with exit code 1"));
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::RolloutAborted { generation: 2, replaced: 0, why, .. }
            if why == "before_start failed: exited with exit code 1"
    )));
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::HookFailed {
            generation: 2,
            retry_in: None,
            ..
        }
    )));
    assert!(sim.starting().is_empty() && sim.signals.is_empty());
    assert_eq!(sim.serving("web"), serving);
    sim.advance(60 * S);
    assert_eq!(
        sim.hooks.len(),
        2,
        "a rollout's command is not retried on its own"
    );
    let status = sim.hook_status("web").unwrap();
    assert_eq!((status.generation, status.next_attempt_secs), (2, None));

    // The next rollout runs it again, and goes through.
    rollout(&mut sim);
    assert_eq!(sim.hooks.last(), Some(&("web".to_owned(), 3)));
    sim.hook_exits("web", 3, Ok(()));
    finish(&mut sim);
    let generations: Vec<u64> = sim.workers("web").iter().map(|w| w.2).collect();
    assert_eq!(generations, [3, 3]);
}

#[test]
fn a_before_start_that_runs_too_long_is_killed_and_fails() {
    let mut spec = hooked(1);
    spec.before_start_timeout = 30 * S;
    let mut sim = Sim::new(&config(&[("web", spec)]));
    sim.advance(30 * S - MS);
    assert!(sim.stopped_hooks.is_empty());
    sim.advance(MS);
    assert_eq!(sim.stopped_hooks, [("web".to_owned(), 1)]);
    assert!(sim.notices.iter().any(|n| matches!(
        n,
        Notice::HookFailed { why, retry_in: Some(_), .. } if why.contains("before_start_timeout (30s)")
    )));
    // Its exit, once killed, changes nothing: the failure was counted when it was killed.
    sim.hook_exits("web", 1, Err("exited with SIGKILL"));
    assert_eq!(sim.count(|n| matches!(n, Notice::HookFailed { .. })), 1);
    assert_eq!(sim.workers("web"), []);
}

#[test]
fn a_new_rollout_kills_the_before_start_of_the_one_it_supersedes() {
    let mut sim = Sim::new(&config(&[("web", hooked(1))]));
    sim.hook_exits("web", 1, Ok(()));
    for id in sim.starting() {
        sim.ready(id);
    }
    rollout(&mut sim);
    rollout(&mut sim);
    assert_eq!(sim.stopped_hooks, [("web".to_owned(), 2)]);
    assert_eq!(sim.hooks.last(), Some(&("web".to_owned(), 3)));
    // The killed run's end is stale; generation 3's success counts.
    sim.hook_exits("web", 2, Err("exited with SIGKILL"));
    assert_eq!(sim.count(|n| matches!(n, Notice::RolloutAborted { .. })), 0);
    sim.hook_exits("web", 3, Ok(()));
    finish(&mut sim);
    let generations: Vec<u64> = sim.workers("web").iter().map(|w| w.2).collect();
    assert_eq!(generations, [3]);
}

#[test]
fn shutdown_kills_a_running_before_start_and_exits_without_waiting_for_it() {
    let mut sim = Sim::new(&config(&[("web", hooked(1))]));
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    assert_eq!(sim.stopped_hooks, [("web".to_owned(), 1)]);
    assert!(sim.exited);
    sim.hook_exits("web", 1, Err("exited with SIGKILL"));
    assert_eq!(sim.workers("web"), []);
}

// ---------------------------------------------------------------------------------------------
// The plan as a document (`snapshot`): what a new program reads back carries on exactly.

/// A clock for documents written and read in one test: every instant reads back exactly.
fn test_clock(sim: &Sim) -> Clock {
    Clock::at(sim.now, 5_000_000_000_000)
}

/// Replaces the sim's plan by the one its document describes, after checking that the
/// document reads back to itself.
fn through_a_document(sim: &mut Sim) {
    let clock = test_clock(sim);
    let document = sim.plan.snapshot(clock).unwrap();
    let restored = Plan::restore(&document, clock).unwrap();
    assert_eq!(restored.snapshot(clock).unwrap(), document);
    assert_eq!(restored.status(sim.now), sim.plan.status(sim.now));
    sim.plan = restored;
}

/// A day in the life of two pools, calling `checkpoint` between steps: crashes and backoff,
/// `before_start`, STATUS and watchdog, memory, a rollout caught half way, scaling, a ttl,
/// and a graceful stop.
fn a_busy_day(checkpoint: &mut dyn FnMut(&mut Sim)) -> Sim {
    let mut web = hooked(3);
    web.ttl = Some(600 * S);
    web.watchdog = Some(2000 * S);
    web.max_memory = Some(crate::config::ByteSize(1 << 20));
    web.max_surge = Some(crate::config::Budget::Count(2));
    let mut jobs = pool(2, Readiness::Notify);
    jobs.after = vec!["web".to_owned()];
    jobs.stop_signal = Signal::INT;
    let mut sim = Sim::new(&config(&[("web", web), ("jobs", jobs)]));
    checkpoint(&mut sim);
    sim.hook_exits("web", 1, Ok(()));
    checkpoint(&mut sim);
    for id in sim.starting() {
        sim.ready(id);
        checkpoint(&mut sim);
    }
    for id in sim.starting() {
        sim.ready(id);
    }
    checkpoint(&mut sim);
    let web0 = sim.serving("web")[0];
    sim.message(web0, WorkerMessage::Status("warming".to_owned()));
    sim.message(web0, WorkerMessage::Watchdog);
    sim.handle(Event::Memory {
        id: web0,
        rss: 2 << 20,
    });
    checkpoint(&mut sim);
    sim.advance(4 * S);
    checkpoint(&mut sim);
    // Still above max_memory after its grace: replaced.
    sim.handle(Event::Memory {
        id: web0,
        rss: 2 << 20,
    });
    checkpoint(&mut sim);
    // Ready jobs die, faster than one per slot a second: the third one's replacement waits.
    for _ in 0..3 {
        let job = sim.serving("jobs")[0];
        sim.exit(job, ExitStatus::Signal(9));
        checkpoint(&mut sim);
        for id in sim.starting() {
            sim.ready(id);
        }
        checkpoint(&mut sim);
    }
    sim.advance(300 * MS);
    checkpoint(&mut sim);
    // A job that crashes before it is ready: a failed start, backing off.
    let job = sim.serving("jobs")[0];
    sim.exit(job, ExitStatus::Signal(9));
    let starting = sim.starting();
    sim.exit(starting[0], ExitStatus::Code(3));
    checkpoint(&mut sim);
    sim.advance(300 * MS);
    checkpoint(&mut sim);
    sim.advance(S);
    for id in sim.starting() {
        sim.ready(id);
    }
    checkpoint(&mut sim);
    // A rollout, caught with its hook done and one batch ready.
    rollout(&mut sim);
    checkpoint(&mut sim);
    sim.hook_exits("web", 2, Ok(()));
    checkpoint(&mut sim);
    let first = sim.starting();
    sim.ready(first[0]);
    checkpoint(&mut sim);
    sim.exit_stopped();
    checkpoint(&mut sim);
    finish(&mut sim);
    checkpoint(&mut sim);
    sim.handle(Event::Scale {
        pool: "jobs".to_owned(),
        size: 1,
    });
    checkpoint(&mut sim);
    sim.advance(3 * S);
    sim.exit_stopped();
    checkpoint(&mut sim);
    for _ in 0..8 {
        sim.advance(600 * S);
        sim.exit_stopped();
        for id in sim.starting() {
            sim.ready(id);
        }
        checkpoint(&mut sim);
    }
    finish(&mut sim);
    sim.handle(Event::Shutdown {
        immediate: false,
        timeout: None,
    });
    checkpoint(&mut sim);
    sim.advance(S);
    sim.exit_stopped();
    checkpoint(&mut sim);
    sim.advance(10 * S);
    sim.exit_stopped();
    sim
}

/// What a sim has done so far, at one moment: counts of what it saw, for comparing two runs
/// step by step (a spawn or a signal that comes earlier in one shows at the next step). Times
/// are since `start`, the moment its day began.
fn trace(sim: &Sim, start: Instant) -> (Duration, usize, usize, usize, usize, Option<Duration>) {
    (
        sim.now - start,
        sim.notices.len(),
        sim.spawns.len(),
        sim.signals.len(),
        sim.kills.len(),
        sim.plan.next_deadline().map(|at| at - start),
    )
}

#[test]
fn a_plan_read_back_from_its_document_carries_on_exactly_as_the_original() {
    let mut straight_trace = Vec::new();
    let mut start = None;
    let straight = a_busy_day(&mut |sim| {
        let start = *start.get_or_insert(sim.now);
        straight_trace.push(trace(sim, start));
    });
    let mut restored_trace = Vec::new();
    let mut start = None;
    let restored = a_busy_day(&mut |sim| {
        through_a_document(sim);
        let start = *start.get_or_insert(sim.now);
        restored_trace.push(trace(sim, start));
    });
    assert!(straight_trace.len() > 15, "{}", straight_trace.len());
    assert!(straight.exited, "the day ends with the primary exiting");
    assert_eq!(restored_trace, straight_trace);
    assert_eq!(restored.notices, straight.notices);
    assert_eq!(restored.spawns, straight.spawns);
    assert_eq!(restored.signals, straight.signals);
    assert_eq!(restored.kills, straight.kills);
    assert_eq!(restored.hooks, straight.hooks);
    assert_eq!(restored.exited, straight.exited);
    // The day was a busy one: each kind of step happened.
    for name in [
        "before_start_done",
        "restart_scheduled",
        "over_memory",
        "rollout_finished",
        "scaled",
        "replace_queued",
        "shutdown",
    ] {
        assert!(
            straight.notices.iter().any(|n| n.name() == name),
            "no {name} in the day"
        );
    }
    assert!(
        straight.notices.iter().any(|n| matches!(
            n,
            Notice::Stopping {
                reason: StopReason::Ttl,
                ..
            }
        )),
        "a ttl ran out"
    );
}

#[test]
fn a_document_keeps_each_moment_whatever_time_the_exec_took() {
    let mut sim = a_busy_day_until_the_rollout();
    let written = Clock::at(sim.now, 5_000_000_000_000);
    let document = sim.plan.snapshot(written).unwrap();
    // The new program reads its clocks 40 ms later: both have moved alike.
    let read = Clock::at(sim.now + 40 * MS, 5_000_040_000_000);
    let restored = Plan::restore(&document, read).unwrap();
    assert_eq!(restored.next_deadline(), sim.plan.next_deadline());
    assert_eq!(restored.status(sim.now), sim.plan.status(sim.now));
    sim.plan = restored;
    finish(&mut sim);
    assert_eq!(sim.count(|n| n.name() == "rollout_finished"), 1);
}

fn a_busy_day_until_the_rollout() -> Sim {
    let mut sim = ready_pool(3, false);
    sim.message(
        sim.serving("web")[1],
        WorkerMessage::Status("up".to_owned()),
    );
    rollout(&mut sim);
    let first = sim.starting();
    sim.ready(first[0]);
    sim
}

#[test]
fn a_document_of_another_version_or_shape_is_refused_before_anything_is_read() {
    let sim = a_busy_day_until_the_rollout();
    let clock = test_clock(&sim);
    let document = sim.plan.snapshot(clock).unwrap();
    let newer = document.replacen(
        &format!("\"version\":{STATE_VERSION}"),
        &format!("\"version\":{}", STATE_VERSION + 1),
        1,
    );
    let error = Plan::restore(&newer, clock).unwrap_err();
    assert_eq!(
        error,
        RestoreError::Version {
            found: STATE_VERSION + 1
        }
    );
    assert!(
        error.to_string().contains(&format!(
            "state version {} is not one this program knows",
            STATE_VERSION + 1
        )),
        "{error}"
    );
    for broken in ["", "{}", "[1]", &document[..document.len() / 2]] {
        assert!(
            matches!(
                Plan::restore(broken, clock),
                Err(RestoreError::Malformed(_))
            ),
            "{broken:?}"
        );
    }
}
