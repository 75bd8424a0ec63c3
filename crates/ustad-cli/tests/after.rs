//! Pools that wait for pools: a oneshot migration and a cache before the web pool; shutdown in
//! the reverse order.

use crate::util::{Run, TIMEOUT, test_worker};

fn config(migration: &str) -> String {
    let worker = test_worker();
    format!(
        r#"
[pools.web]
command = ["{worker}"]
size = 2
ready = "notify"
after = ["migrate", "cache"]

[pools.migrate]
command = ["sh", "-c", "{migration}"]
oneshot = true
restart_delay = "100ms"

[pools.cache]
command = ["{worker}"]
ready = "notify"
"#
    )
}

/// The position of the first event that `matches`.
fn first(
    events: &[ustad_testkit::cluster::LogEvent],
    matches: impl Fn(&ustad_testkit::cluster::LogEvent) -> bool,
) -> usize {
    events.iter().position(matches).expect("the event happened")
}

#[test]
fn web_starts_after_its_migration_succeeded_and_its_cache_is_ready_and_stops_first() {
    let mut run = Run::with_config(&config("sleep 0.3; echo migrated > migrated"));
    run.cluster.wait_events(
        |e| e.is("ready") && e.str("pool") == Some("web"),
        2,
        TIMEOUT,
    );
    let events = run.cluster.events();
    let waiting = first(&events, |e| e.is("waiting") && e.str("pool") == Some("web"));
    let migrated = first(&events, |e| {
        e.is("exited") && e.str("pool") == Some("migrate") && e.str("reason") == Some("done")
    });
    let cache_ready = first(&events, |e| e.is("ready") && e.str("pool") == Some("cache"));
    let web_spawned = first(&events, |e| e.is("spawned") && e.str("pool") == Some("web"));
    assert!(waiting < migrated && migrated < web_spawned && cache_ready < web_spawned);
    assert!(run.path("migrated").exists());
    let status = run.client(&["status"]).ok();
    assert!(
        status.contains("migrate  done: every worker exited 0"),
        "{status}"
    );
    // The migration is not run again.
    assert_eq!(
        events
            .iter()
            .filter(|e| e.is("spawned") && e.str("pool") == Some("migrate"))
            .count(),
        1
    );
    run.stop();
    let events = run.cluster.events();
    let web_stopped = first(&events, |e| e.is("exited") && e.str("pool") == Some("web"));
    let cache_stopping = first(&events, |e| {
        e.is("stopping") && e.str("pool") == Some("cache")
    });
    assert!(
        web_stopped < cache_stopping,
        "web is stopped before its cache"
    );
}

#[test]
fn a_failing_migration_keeps_web_waiting_and_says_why() {
    let mut run = Run::with_config(&config("echo no database; exit 3"));
    run.cluster.wait_events(
        |e| e.is("exited") && e.str("pool") == Some("migrate") && e.i64("code") == Some(3),
        2,
        TIMEOUT,
    );
    let status = run.client(&["status"]).ok();
    assert!(status.contains("waiting for migrate"), "{status}");
    assert!(
        status.contains("backoff"),
        "the migration retries, backing off: {status}"
    );
    assert!(
        !run.cluster
            .events()
            .iter()
            .any(|e| e.is("spawned") && e.str("pool") == Some("web")),
        "web never started"
    );
    run.stop();
}
