//! Zero-downtime rolling restarts: under load not one request fails; a replacement that never
//! gets ready stops the rollout and the old workers keep serving; strict pools never exceed
//! their size; requests during a rollout are coalesced; workers can ask to be replaced.

use std::collections::BTreeSet;

use ustad_testkit::Signal;
use ustad_testkit::load::{self, LoadOptions};

use crate::util::{Run, TIMEOUT, live_pids, peak_alive, pid, test_worker, ustad};

/// Starts the demo worker pool, puts it under load, rolls it three times, and checks that
/// every worker was replaced and that not a single request failed.
fn roll_under_load(reuseport: bool, keep_alive: bool) {
    let ustad = ustad().to_string_lossy().into_owned();
    let mut args = vec!["run", "-w", "2", "-l", "127.0.0.1:0", "--ready", "notify"];
    if reuseport {
        args.push("--reuseport");
    }
    args.extend(["--", &ustad, "demo-worker", "--idle-grace", "300ms"]);
    let mut run = Run::start(&args);
    let addr = run.addr("listen");
    let first: BTreeSet<u32> = run.wait_ready(2).iter().map(pid).collect();

    let mut options = LoadOptions::new(addr);
    options.connections = 8;
    options.keep_alive = keep_alive;
    options.max_duration = std::time::Duration::from_secs(90);
    let load = load::start(options);
    assert!(
        load.wait_for_ok(200, TIMEOUT),
        "load never got going: {}",
        load.snapshot()
    );

    for round in 0..3 {
        let since = run.cluster.event_count();
        run.cluster.signal(Signal::HUP).unwrap();
        let finished = run
            .cluster
            .wait_event_since(since, |e| e.is("rollout_finished"), TIMEOUT);
        assert_eq!(
            finished.u64("replaced"),
            Some(2),
            "round {round}: {finished}"
        );
        // The last old worker drains after the rollout is declared finished.
        run.cluster
            .wait_events(|e| e.is("exited"), 2 * (round + 1), TIMEOUT);
        let served = load.snapshot().ok;
        assert!(
            load.wait_for_ok(served + 100, TIMEOUT),
            "requests stopped after round {round}"
        );
    }
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "failed requests during rolling restarts: {report}"
    );

    let events = run.cluster.events();
    let last: BTreeSet<u32> = live_pids(&events, "app").into_values().collect();
    assert_eq!(last.len(), 2);
    assert!(last.is_disjoint(&first), "every worker was replaced");
    // Keep-alive connections are not rebalanced, so not every new worker need have served;
    // but the load went on through the new generation.
    assert!(
        last.iter().any(|p| report.by_pid.contains_key(p)),
        "new workers served: {report}"
    );
    assert!(
        peak_alive(&events, "app") <= 3,
        "never more than one extra worker"
    );
    let exits: Vec<_> = events.iter().filter(|e| e.is("exited")).collect();
    assert!(
        exits
            .iter()
            .all(|e| e.u64("code") == Some(0) && e.str("reason") == Some("rollout")),
        "old workers drained and exited cleanly: {exits:?}"
    );
    run.stop();
}

#[test]
fn rolling_restarts_under_keep_alive_load_fail_no_request_shared() {
    roll_under_load(false, true);
}

#[test]
fn rolling_restarts_under_new_connection_load_fail_no_request_shared() {
    roll_under_load(false, false);
}

#[test]
fn rolling_restarts_under_keep_alive_load_fail_no_request_reuseport() {
    roll_under_load(true, true);
}

#[test]
fn rolling_restarts_under_new_connection_load_fail_no_request_reuseport() {
    roll_under_load(true, false);
}

fn config(worker: &str, extra_args: &str) -> String {
    format!(
        r#"
[sockets.http]
listen = "127.0.0.1:0"

[pools.web]
command = ["{worker}", "--serve-http"{extra_args}]
size = 2
sockets = ["http"]
ready = "notify"
ready_timeout = "3s"
restart_delay = "100ms"
"#
    )
}

#[test]
fn a_replacement_that_never_gets_ready_stops_the_rollout_and_the_old_workers_keep_serving() {
    let worker = test_worker();
    let mut run = Run::with_config(&config(&worker, ""));
    let addr = run.addr("http");
    let old: BTreeSet<u32> = run.wait_ready(2).iter().map(pid).collect();

    std::fs::write(
        run.path("ustad.toml"),
        config(&worker, r#", "--never-ready""#),
    )
    .unwrap();
    let since = run.cluster.event_count();
    run.cluster.signal(Signal::HUP).unwrap();
    let aborted = run
        .cluster
        .wait_event_since(since, |e| e.is("rollout_aborted"), TIMEOUT);
    assert_eq!(aborted.u64("replaced"), Some(0));
    assert!(
        aborted.str("why").unwrap().contains("ready_timeout"),
        "{aborted}"
    );

    let events = run.cluster.events()[since..].to_vec();
    let spawned: Vec<_> = events.iter().filter(|e| e.is("spawned")).collect();
    assert_eq!(
        spawned.len(),
        1,
        "one replacement was tried, then the rollout stopped"
    );
    assert!(
        !events.iter().any(|e| e.is("stopping")),
        "no old worker was asked to stop"
    );
    // The replacement accepted on the shared socket while it was starting (it serves, it just
    // never says READY=1); once it is gone, only the old workers answer. (The abort is logged
    // as the kill is decided, just before it is sent.)
    let tried = spawned[0].u64("id");
    run.cluster
        .wait_event_since(since, |e| e.is("exited") && e.u64("id") == tried, TIMEOUT);
    let mut options = LoadOptions::new(addr);
    options.max_requests = Some(200);
    let report = load::start(options).wait();
    assert_eq!(report.failed, 0, "{report}");
    let answered: BTreeSet<u32> = report.by_pid.keys().copied().collect();
    assert!(
        answered.is_subset(&old) && !answered.is_empty(),
        "only the old workers serve: {report}"
    );

    // A crash now restarts the slot with the configuration that works (generation 1).
    let victim = *old.iter().next().unwrap();
    let since = run.cluster.event_count();
    let victim_pid = rustix::process::Pid::from_raw(victim as i32).unwrap();
    rustix::process::kill_process(victim_pid, Signal::KILL).unwrap();
    let respawned = run
        .cluster
        .wait_event_since(since, |e| e.is("spawned"), TIMEOUT);
    assert_eq!(respawned.u64("generation"), Some(1), "{respawned}");
    run.cluster.wait_event_since(
        since,
        |e| e.is("ready") && e.u64("id") == respawned.u64("id"),
        TIMEOUT,
    );
    run.stop();
}

#[test]
fn a_broken_config_on_sighup_changes_nothing() {
    let worker = test_worker();
    let mut run = Run::with_config(&config(&worker, ""));
    run.wait_ready(2);
    std::fs::write(run.path("ustad.toml"), "[pools.web]\nsize = 0\n").unwrap();
    let since = run.cluster.event_count();
    run.cluster.signal(Signal::HUP).unwrap();
    let failed = run
        .cluster
        .wait_event_since(since, |e| e.is("reload_failed"), TIMEOUT);
    let message = failed.str("message").unwrap();
    assert!(
        message.contains("ustad.toml:2:8: size must be at least 1"),
        "{message}"
    );
    let events = run.cluster.events();
    assert!(
        !events[since..]
            .iter()
            .any(|e| e.is("spawned") || e.is("stopping") || e.is("rollout_started")),
        "a refused reload touches no worker"
    );
    // A good config afterwards rolls the pool as usual.
    std::fs::write(run.path("ustad.toml"), config(&worker, "")).unwrap();
    run.cluster.signal(Signal::HUP).unwrap();
    let finished = run
        .cluster
        .wait_event_since(since, |e| e.is("rollout_finished"), TIMEOUT);
    assert_eq!(finished.u64("generation"), Some(2));
    run.stop();
}

#[test]
fn strict_pools_stop_the_old_worker_first_and_never_exceed_their_size() {
    let mut run = Run::start(&[
        "run",
        "-w",
        "3",
        "--strict",
        "--ready",
        "notify",
        "--",
        &test_worker(),
    ]);
    run.wait_ready(3);
    run.cluster.signal(Signal::USR2).unwrap();
    run.cluster
        .wait_event(|e| e.is("rollout_finished"), TIMEOUT);
    let events = run.cluster.events();
    assert_eq!(peak_alive(&events, "app"), 3);
    run.stop();
}

#[test]
fn rollout_requests_during_a_rollout_are_coalesced() {
    let mut run = Run::start(&[
        "run",
        "-w",
        "3",
        "--ready",
        "notify",
        "--",
        &test_worker(),
        "--ready-after",
        "300",
    ]);
    run.wait_ready(3);
    // Three requests while the first rollout is under way (each one acknowledged before the
    // next is sent, since the kernel merges pending signals of one kind).
    for generation in 2..=4 {
        run.cluster.signal(Signal::USR2).unwrap();
        run.cluster.wait_event(
            |e| e.is("rollout_started") && e.u64("generation") == Some(generation),
            TIMEOUT,
        );
    }
    let finished = run
        .cluster
        .wait_event(|e| e.is("rollout_finished"), TIMEOUT);
    assert_eq!(
        finished.u64("generation"),
        Some(4),
        "one rollout to the newest generation: {finished}"
    );
    let superseded: Vec<_> = run
        .cluster
        .events()
        .iter()
        .filter(|e| e.is("rollout_started"))
        .map(|e| e.u64("superseded"))
        .collect();
    assert_eq!(superseded, [Some(0), Some(2), Some(3)]);
    // Once the last old worker has drained, every worker is of generation 4.
    let events = wait_live(&run, "app", 3);
    assert_eq!(
        events.iter().filter(|e| e.is("rollout_finished")).count(),
        1
    );
    assert!(peak_alive(&events, "app") <= 4, "at most one extra worker");
    let live = live_pids(&events, "app");
    let generations: BTreeSet<u64> = events
        .iter()
        .filter(|e| e.is("spawned") && live.contains_key(&e.u64("id").unwrap()))
        .map(|e| e.u64("generation").unwrap())
        .collect();
    assert_eq!(generations, BTreeSet::from([4]));
    run.stop();
}

/// Waits until exactly `count` workers of `pool` are alive, and returns the events so far.
fn wait_live(run: &Run, pool: &str, count: usize) -> Vec<ustad_testkit::cluster::LogEvent> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let events = run.cluster.events();
        if live_pids(&events, pool).len() == count {
            return events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pool} never settled at {count} workers"
        );
        let seen = events.len();
        // Wake on the next event rather than polling blindly.
        run.cluster.wait_event_since(seen, |_| true, TIMEOUT);
    }
}

#[test]
fn a_worker_can_ask_to_be_replaced() {
    let worker = test_worker();
    // Only the first worker asks, or every replacement would ask again.
    let script = format!(
        r#"if [ "$USTAD_WORKER_ID" = 1 ]; then exec {worker} --notify USTAD_REQUEST=restart; else exec {worker}; fi"#
    );
    let mut run = Run::start(&["run", "--ready", "notify", "--", "sh", "-c", &script]);
    let stopping = run.cluster.wait_event(|e| e.is("stopping"), TIMEOUT);
    assert_eq!(stopping.u64("id"), Some(1));
    assert_eq!(stopping.str("reason"), Some("request"));
    let events = run.cluster.events();
    let ready_2 = events
        .iter()
        .position(|e| e.is("ready") && e.u64("id") == Some(2))
        .expect("id 2 ready");
    let stop_1 = events
        .iter()
        .position(|e| e.is("stopping") && e.u64("id") == Some(1))
        .expect("id 1 stopping");
    assert!(
        ready_2 < stop_1,
        "the successor is ready before the worker is stopped"
    );
    run.stop();
}
