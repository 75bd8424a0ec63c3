//! Restarts, backoff, readiness timeouts, stopping (graceful, forced, on SIGKILL of the
//! primary), scaling by signal, ttl, and cleaning up after workers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ustad_testkit::Signal;
use ustad_testkit::process::{pid_alive, wait_dead};
use ustad_testkit::report::WorkerReport;

use crate::util::{Run, TIMEOUT, pid, test_worker};

fn kill(pid: u32, signal: Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a valid pid");
    rustix::process::kill_process(pid, signal).expect("sending a signal to a worker");
}

#[test]
fn a_killed_worker_is_replaced_in_its_slot() {
    let worker = test_worker();
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "--restart-delay",
        "100ms",
        "--ready",
        "notify",
        "--",
        &worker,
        "--report",
        "report-{id}.json",
    ]);
    let ready = run.wait_ready(2);
    let victim = ready.iter().find(|e| e.u64("slot") == Some(1)).unwrap();
    kill(pid(victim), Signal::KILL);
    let exited = run.cluster.wait_event(
        |e| e.is("exited") && e.u64("id") == victim.u64("id"),
        TIMEOUT,
    );
    assert_eq!(exited.u64("signal"), Some(9));
    assert_eq!(exited.str("reason"), Some("crash"));
    let replacement = run
        .cluster
        .wait_event(|e| e.is("ready") && e.u64("id") == Some(3), TIMEOUT);
    assert_eq!(
        replacement.u64("slot"),
        Some(1),
        "replaced in the same slot"
    );
    let report = WorkerReport::wait_for(&run.path("report-3.json"), TIMEOUT);
    assert_eq!(report.env("USTAD_WORKER_INDEX"), Some("1"));
    assert_eq!(
        report.env("USTAD_WORKER_ID"),
        Some("3"),
        "ids keep increasing"
    );
    run.stop();
}

#[test]
fn a_crash_looping_command_backs_off_and_the_primary_stays_responsive() {
    let mut run = Run::start(&[
        "run",
        "--restart-delay",
        "100ms",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    let scheduled = run
        .cluster
        .wait_events(|e| e.is("restart_scheduled"), 4, TIMEOUT);
    let delays: Vec<u64> = scheduled
        .iter()
        .map(|e| e.u64("delay_ms").unwrap())
        .collect();
    assert_eq!(
        delays,
        [100, 200, 400, 800],
        "the delay doubles after each failed start"
    );
    let failures: Vec<u64> = scheduled
        .iter()
        .map(|e| e.u64("failures").unwrap())
        .collect();
    assert_eq!(failures, [1, 2, 3, 4]);
    let exits = run.cluster.wait_events(|e| e.is("exited"), 4, TIMEOUT);
    assert!(
        exits
            .iter()
            .all(|e| e.u64("code") == Some(3) && e.str("reason") == Some("crash"))
    );
    // Responsive during the backoff: a stop is acted on at once.
    let asked = Instant::now();
    run.stop();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        asked.elapsed()
    );
}

#[test]
fn a_command_that_cannot_run_is_a_clear_failed_start_not_a_crash_of_the_primary() {
    let mut run = Run::start(&[
        "run",
        "--restart-delay",
        "100ms",
        "--",
        "no-such-program-for-ustad",
        "--flag",
    ]);
    let failed = run
        .cluster
        .wait_events(|e| e.is("spawn_failed"), 2, TIMEOUT);
    let error = failed[0].str("error").unwrap();
    assert!(
        error.contains("command not found: `no-such-program-for-ustad`"),
        "{error}"
    );
    let scheduled = run
        .cluster
        .wait_events(|e| e.is("restart_scheduled"), 2, TIMEOUT);
    assert!(scheduled[1].u64("delay_ms") > scheduled[0].u64("delay_ms"));
    run.stop();

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let script = script.to_string_lossy().into_owned();
    let mut run = Run::start(&["run", "--", &script]);
    let failed = run.cluster.wait_event(|e| e.is("spawn_failed"), TIMEOUT);
    assert!(
        failed.str("error").unwrap().contains("is not executable"),
        "{failed}"
    );
    run.stop();
}

#[test]
fn a_worker_not_ready_in_time_is_killed_as_a_failed_start() {
    let mut run = Run::start(&[
        "run",
        "--ready",
        "notify",
        "--ready-timeout",
        "500ms",
        "--restart-delay",
        "100ms",
        "--",
        &test_worker(),
        "--never-ready",
    ]);
    let killed = run.cluster.wait_event(|e| e.is("killed"), TIMEOUT);
    assert!(
        killed.str("why").unwrap().contains("ready_timeout"),
        "{killed}"
    );
    let exited = run.cluster.wait_event(|e| e.is("exited"), TIMEOUT);
    assert_eq!(exited.str("reason"), Some("ready_timeout"));
    assert_eq!(exited.u64("signal"), Some(9));
    let scheduled = run
        .cluster
        .wait_event(|e| e.is("restart_scheduled"), TIMEOUT);
    assert_eq!(scheduled.u64("failures"), Some(1));
    run.stop();
}

#[test]
fn a_worker_ignoring_sigterm_and_its_child_are_killed_after_kill_timeout() {
    let mut run = Run::start(&[
        "run",
        "--kill-timeout",
        "1s",
        "--ready",
        "notify",
        "--",
        &test_worker(),
        "--ignore-term",
        "--grandchild",
        "--report",
        "report.json",
    ]);
    let ready = run.wait_ready(1);
    let report = WorkerReport::wait_for(&run.path("report.json"), TIMEOUT);
    let grandchild = report.grandchild_pid.expect("the worker started a child");
    assert!(pid_alive(grandchild));
    run.cluster.signal(Signal::TERM).unwrap();
    let stopping = run.cluster.wait_event(|e| e.is("stopping"), TIMEOUT);
    assert_eq!(stopping.str("signal"), Some("SIGTERM"));
    let killed = run.cluster.wait_event(|e| e.is("killed"), TIMEOUT);
    assert!(
        killed.str("why").unwrap().contains("kill_timeout"),
        "{killed}"
    );
    let status = run.cluster.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0));
    assert!(wait_dead(pid(&ready[0]), TIMEOUT), "worker gone");
    assert!(wait_dead(grandchild, TIMEOUT), "its child gone too");
    // The worker got SIGTERM first and ignored it.
    run.cluster
        .wait_stderr_line(|line| line.contains("got SIGTERM"), TIMEOUT);
}

#[test]
fn a_second_stop_signal_kills_at_once() {
    // `--ready notify`: the worker reports ready once its signal handlers are in place.
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "--kill-timeout",
        "60s",
        "--ready",
        "notify",
        "--",
        &test_worker(),
        "--ignore-term",
    ]);
    let ready = run.wait_ready(2);
    run.cluster.signal(Signal::TERM).unwrap();
    run.cluster.wait_events(|e| e.is("stopping"), 2, TIMEOUT);
    run.cluster.signal(Signal::INT).unwrap();
    let killed = run.cluster.wait_events(|e| e.is("killed"), 2, TIMEOUT);
    assert!(
        killed
            .iter()
            .all(|e| e.str("why") == Some("immediate shutdown"))
    );
    assert_eq!(run.cluster.wait_exit(TIMEOUT).code(), Some(0));
    for event in &ready {
        assert!(wait_dead(pid(event), TIMEOUT));
    }
}

/// Ctrl-C in a terminal signals the whole foreground process group; workers are in groups of
/// their own, so only the primary gets SIGINT and it stops them with their stop signal.
#[test]
fn ctrl_c_reaches_only_the_primary_which_stops_workers_gracefully() {
    let mut run = Run::start(&["run", "-w", "2", "--ready", "notify", "--", &test_worker()]);
    run.wait_ready(2);
    let group = rustix::process::Pid::from_raw(run.cluster.pid() as i32).unwrap();
    rustix::process::kill_process_group(group, Signal::INT).unwrap();
    assert_eq!(run.cluster.wait_exit(TIMEOUT).code(), Some(0));
    let stopped = run
        .cluster
        .events()
        .into_iter()
        .filter(|e| e.is("exited"))
        .count();
    assert_eq!(stopped, 2);
    let lines = run.cluster.stderr_lines();
    assert_eq!(
        lines.iter().filter(|l| l.contains("got SIGTERM")).count(),
        2,
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("got SIGINT")),
        "a worker saw the terminal's SIGINT"
    );
}

#[test]
fn workers_die_with_a_sigkilled_primary_even_when_spawned_later() {
    let run = Run::start(&[
        "run",
        "-w",
        "2",
        "--restart-delay",
        "10ms",
        "--",
        &test_worker(),
    ]);
    let ready = run.wait_ready(2);
    // A worker started later must also be tied to the primary's life (PDEATHSIG follows the
    // forking thread): replace one, after the primary's helper threads have been busy relaying.
    kill(pid(&ready[0]), Signal::KILL);
    let replacement = run
        .cluster
        .wait_event(|e| e.is("ready") && e.u64("id") == Some(3), TIMEOUT);
    let workers = [pid(&ready[1]), pid(&replacement)];
    run.cluster.signal(Signal::KILL).unwrap();
    for worker in workers {
        assert!(
            wait_dead(worker, Duration::from_secs(2)),
            "worker {worker} outlived the primary"
        );
    }
}

#[test]
fn what_workers_started_dies_with_a_sigkilled_primary_too() {
    let (run, workers) = two_workers_with_grandchildren();
    let reports: Vec<WorkerReport> = (0..2)
        .map(|i| WorkerReport::wait_for(&run.path(&format!("report-{i}.json")), TIMEOUT))
        .collect();
    let grandchildren: Vec<u32> = reports
        .iter()
        .map(|report| report.grandchild_pid.expect("a grandchild"))
        .collect();
    let notify_socket = PathBuf::from(
        reports[0].env["NOTIFY_SOCKET"]
            .clone()
            .expect("NOTIFY_SOCKET"),
    );
    assert!(notify_socket.exists());
    let guard = guard_of(run.cluster.pid()).expect("the primary runs a guard process");
    run.cluster.signal(Signal::KILL).unwrap();
    for pid in workers.iter().chain(&grandchildren) {
        assert!(
            wait_dead(*pid, Duration::from_secs(2)),
            "pid {pid} outlived the primary"
        );
    }
    assert!(
        wait_dead(guard, Duration::from_secs(2)),
        "the guard exits too"
    );
    // The guard removed the notify socket and its directory, which the primary could not.
    let dir = notify_socket.parent().unwrap();
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

#[test]
fn a_killed_guard_is_replaced_and_still_protects_every_worker_group() {
    let (run, workers) = two_workers_with_grandchildren();
    let grandchildren: Vec<u32> = (0..2)
        .map(|i| {
            let report = WorkerReport::wait_for(&run.path(&format!("report-{i}.json")), TIMEOUT);
            report.grandchild_pid.expect("a grandchild")
        })
        .collect();
    let first = guard_of(run.cluster.pid()).expect("the primary runs a guard process");
    kill(first, Signal::KILL);
    let replaced = run.cluster.wait_event(|e| e.is("guard_replaced"), TIMEOUT);
    assert_eq!(replaced.u64("pid"), Some(u64::from(first)));
    let second = replaced.u64("new_pid").expect("new_pid") as u32;
    // The new guard names itself right after the fork, maybe after the primary's log line.
    let deadline = Instant::now() + TIMEOUT;
    while guard_of(run.cluster.pid()) != Some(second) && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(guard_of(run.cluster.pid()), Some(second));
    run.cluster.signal(Signal::KILL).unwrap();
    for pid in workers.iter().chain(&grandchildren) {
        assert!(
            wait_dead(*pid, Duration::from_secs(2)),
            "pid {pid} outlived the primary"
        );
    }
    assert!(
        wait_dead(second, Duration::from_secs(2)),
        "the new guard exits too"
    );
}

/// A cluster of 2 ready test workers that each started a grandchild and wrote a report.
fn two_workers_with_grandchildren() -> (Run, Vec<u32>) {
    let run = Run::start(&[
        "run",
        "-w",
        "2",
        "--ready",
        "notify",
        "--",
        &test_worker(),
        "--grandchild",
        "--report",
        "report-{index}.json",
    ]);
    let workers = run.wait_ready(2).iter().map(pid).collect();
    (run, workers)
}

/// The primary's guard process, found by its name among the primary's children.
fn guard_of(primary: u32) -> Option<u32> {
    children_of(primary).into_iter().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "ustad-guard")
    })
}

#[test]
fn sigttin_and_sigttou_add_and_remove_a_worker_of_the_first_pool() {
    let mut run = Run::start(&["run", "-w", "2", "--", &test_worker()]);
    run.wait_ready(2);
    run.cluster.signal(Signal::TTIN).unwrap();
    let added = run
        .cluster
        .wait_event(|e| e.is("ready") && e.u64("slot") == Some(2), TIMEOUT);
    let scaled = run.cluster.wait_event(|e| e.is("scaled"), TIMEOUT);
    assert_eq!((scaled.u64("from"), scaled.u64("to")), (Some(2), Some(3)));
    run.cluster.signal(Signal::TTOU).unwrap();
    let stopping = run.cluster.wait_event(|e| e.is("stopping"), TIMEOUT);
    assert_eq!(stopping.str("reason"), Some("scale"));
    assert_eq!(stopping.u64("id"), added.u64("id"), "the highest slot goes");
    run.cluster.wait_event(
        |e| e.is("exited") && e.u64("id") == added.u64("id"),
        TIMEOUT,
    );
    // One signal at a time: the kernel merges a signal sent while the same one is pending.
    let since = run.cluster.event_count();
    run.cluster.signal(Signal::TTOU).unwrap();
    run.cluster
        .wait_event_since(since, |e| e.is("scaled") && e.u64("to") == Some(1), TIMEOUT);
    // Down to none: a pool of size 0 stays defined, to be scaled up again.
    run.cluster.signal(Signal::TTOU).unwrap();
    run.cluster
        .wait_event(|e| e.is("scaled") && e.u64("to") == Some(0), TIMEOUT);
    run.stop();
}

#[test]
fn ttl_recycles_workers_by_rolling_replacement() {
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "--ready",
        "notify",
        "--ttl",
        "1s",
        "--",
        &test_worker(),
    ]);
    let first = run.wait_ready(2);
    let recycled = run.cluster.wait_events(
        |e| e.is("stopping") && e.str("reason") == Some("ttl"),
        2,
        TIMEOUT,
    );
    let first_ids: Vec<_> = first.iter().map(|e| e.u64("id")).collect();
    for event in &recycled {
        assert!(first_ids.contains(&event.u64("id")), "{event}");
    }
    let events = run.cluster.events();
    assert!(
        crate::util::peak_alive(&events, "app") <= 3,
        "at most one extra worker"
    );
    run.stop();
}

#[test]
fn processes_escaping_a_workers_group_are_stopped_with_the_primary_and_zombies_are_reaped() {
    // The worker starts a `setsid` daemon (out of its process group) and an orphan that exits
    // after a second (re-parented to the primary, which must reap it).
    let worker = test_worker();
    let script = format!("setsid sleep 1000 & echo escaped=$!; (sleep 1 &); exec {worker}");
    let mut run = Run::start(&["run", "--", "sh", "-c", &script]);
    run.wait_ready(1);
    let line = run
        .cluster
        .wait_stdout_line(|l| l.contains("escaped="), TIMEOUT);
    let escaped: u32 = line.rsplit('=').next().unwrap().trim().parse().unwrap();
    let primary = run.cluster.pid();
    // The orphan is adopted by the primary…
    poll(
        || {
            children_of(primary)
                .iter()
                .any(|pid| ustad_core::procfs::cmdline(*pid) == "sleep 1")
        },
        "orphan adopted",
    );
    // …and reaped when it exits: no zombie stays behind.
    poll(
        || {
            let children = children_of(primary);
            let zombie = children
                .iter()
                .any(|pid| ustad_core::procfs::stat(*pid).is_some_and(|s| s.state == 'Z'));
            let orphan = children
                .iter()
                .any(|pid| ustad_core::procfs::cmdline(*pid) == "sleep 1");
            !zombie && !orphan
        },
        "orphan reaped",
    );
    // The daemon has left the worker's process group.
    poll(
        || {
            ustad_core::procfs::stat(escaped).is_some_and(|s| s.pgrp == escaped)
                && ustad_core::procfs::cmdline(escaped) == "sleep 1000"
        },
        "daemon escaped",
    );
    run.stop();
    assert!(
        wait_dead(escaped, TIMEOUT),
        "the escaped process was stopped with the primary"
    );
    let orphan = run.cluster.events().into_iter().find(|e| e.is("orphan"));
    assert_eq!(orphan.and_then(|e| e.u64("pid")), Some(u64::from(escaped)));
}

/// Polls `/proc`-derived state (there is no event to wait on) until `done`, within `TIMEOUT`.
fn poll(done: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// In a container, ustad is PID 1: every orphan in the namespace becomes its child and must be
/// reaped, and SIGTERM (which the kernel delivers to PID 1 only if it has a handler) stops it.
#[test]
fn as_pid_1_of_a_pid_namespace_ustad_reaps_orphans_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("ustad-as-pid-1");
    // --kill-child: if unshare dies, the namespace's PID 1 (ustad) gets SIGKILL, and with it
    // every process in the namespace.
    let script = format!(
        "#!/bin/sh\nexec unshare --map-root-user --pid --mount-proc --kill-child {} \"$@\"\n",
        crate::util::ustad().display()
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let worker = test_worker();
    let leave_orphans = format!("for i in 1 2 3; do (sleep 1 &); done; exec {worker}");
    let mut cluster = ustad_testkit::cluster::Cluster::start(
        &wrapper,
        &["run", "--ready", "notify", "--", "sh", "-c", &leave_orphans],
        dir.path(),
    );
    let ready = cluster.wait_event(|e| e.is("ready"), TIMEOUT);
    assert_eq!(ready.u64("pid").map(|p| p > 1), Some(true));
    let ustad = children_of(cluster.pid())
        .into_iter()
        .next()
        .expect("unshare runs ustad");
    let sleepers = || {
        children_of(ustad)
            .into_iter()
            .filter(|pid| ustad_core::procfs::cmdline(*pid) == "sleep 1")
            .count()
    };
    poll(|| sleepers() == 3, "the orphans are adopted by PID 1");
    poll(
        || {
            let zombies = children_of(ustad)
                .into_iter()
                .filter(|pid| ustad_core::procfs::stat(*pid).is_some_and(|s| s.state == 'Z'))
                .count();
            sleepers() == 0 && zombies == 0
        },
        "the orphans are reaped",
    );
    let pid = rustix::process::Pid::from_raw(ustad as i32).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    assert_eq!(
        cluster.wait_exit(TIMEOUT).code(),
        Some(0),
        "{}",
        cluster.stderr_tail(20)
    );
    assert!(cluster.events().iter().any(|e| e.is("stopped")));
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    children
}
