//! `before_start`: a command run before each generation of a pool starts; its failure stops a
//! rollout as a failed start does, and the old workers serve on.

use std::collections::BTreeSet;

use ustad_testkit::Signal;
use ustad_testkit::process::wait_dead;

use crate::util::{Run, TIMEOUT, pid, test_worker};

/// The hook appends its generation to `hooks.log` and fails while a file `broken` exists.
fn config() -> String {
    let worker = test_worker();
    format!(
        r#"
[pools.web]
command = ["{worker}"]
size = 2
ready = "notify"
restart_delay = "100ms"
before_start = ["sh", "-c", "echo building $USTAD_GENERATION; echo $USTAD_GENERATION >> hooks.log; test ! -e broken"]
"#
    )
}

fn hook_runs(run: &Run) -> Vec<String> {
    std::fs::read_to_string(run.path("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn workers_start_after_their_before_start_succeeded_and_a_failing_one_stops_the_rollout() {
    let mut run = Run::with_config(&config());
    let old: BTreeSet<u32> = run.wait_ready(2).iter().map(pid).collect();
    let events = run.cluster.events();
    let done = events
        .iter()
        .position(|e| e.is("before_start_done") && e.u64("generation") == Some(1))
        .expect("the hook ran to success");
    let first_spawn = events.iter().position(|e| e.is("spawned")).unwrap();
    assert!(done < first_spawn, "workers start once the hook is done");
    assert_eq!(hook_runs(&run), ["1"]);
    // Its output is relayed under its own prefix.
    run.cluster.wait_stdout_line(
        |line| line.contains("web.before_start") && line.contains("building 1"),
        TIMEOUT,
    );

    // A rollout whose hook fails: no replacement starts, the old workers stay.
    std::fs::write(run.path("broken"), "").unwrap();
    let since = run.cluster.event_count();
    run.client(&["restart", "web"]).ok();
    let aborted = run
        .cluster
        .wait_event_since(since, |e| e.is("rollout_aborted"), TIMEOUT);
    assert!(
        aborted
            .str("why")
            .unwrap()
            .starts_with("before_start failed"),
        "{aborted}"
    );
    let events = run.cluster.events()[since..].to_vec();
    assert!(events.iter().any(|e| e.is("before_start_failed")));
    assert!(
        !events.iter().any(|e| e.is("spawned") || e.is("stopping")),
        "no worker was started or stopped"
    );
    let status = run.client(&["status", "--json"]).ok();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let web = &status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "web")
        .unwrap()["before_start"];
    assert_eq!(web["generation"], 2, "{web}");
    assert!(
        web["last_error"].as_str().unwrap().contains("exit"),
        "{web}"
    );
    assert_eq!(hook_runs(&run), ["1", "2"]);

    // A crash now is refilled by the generation that works, without running the hook again.
    let victim = *old.iter().next().unwrap();
    let since = run.cluster.event_count();
    crate::util::signal_pid(victim, Signal::KILL);
    let respawned = run
        .cluster
        .wait_event_since(since, |e| e.is("spawned"), TIMEOUT);
    assert_eq!(respawned.u64("generation"), Some(1), "{respawned}");

    // Fixed: the next rollout runs the hook again (a new generation) and goes through.
    std::fs::remove_file(run.path("broken")).unwrap();
    let since = run.cluster.event_count();
    run.client(&["restart", "web"]).ok();
    run.cluster
        .wait_event_since(since, |e| e.is("rollout_finished"), TIMEOUT);
    assert_eq!(hook_runs(&run), ["1", "2", "3"]);
    let generations: Vec<u64> = run.cluster.events()[since..]
        .iter()
        .filter(|e| e.is("spawned"))
        .filter_map(|e| e.u64("generation"))
        .collect();
    assert_eq!(generations, [3, 3]);
    run.stop();
}

#[test]
fn a_before_start_that_hangs_is_killed_with_its_children_at_its_timeout() {
    let worker = test_worker();
    let mut run = Run::with_config(&format!(
        r#"
[pools.web]
command = ["{worker}"]
ready = "notify"
restart_delay = "100ms"
before_start = ["sh", "-c", "sleep 600 & echo $! > child.pid; wait"]
before_start_timeout = "300ms"
"#
    ));
    let failed = run
        .cluster
        .wait_event(|e| e.is("before_start_failed"), TIMEOUT);
    assert!(
        failed.str("why").unwrap().contains("before_start_timeout"),
        "{failed}"
    );
    // The hook's own child went with it: the whole process group was killed.
    let child: u32 = std::fs::read_to_string(run.path("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_dead(child, TIMEOUT),
        "the hook's child {child} lives on"
    );
    let status = run.client(&["status"]).ok();
    assert!(status.contains("before_start"), "{status}");
    assert!(
        !run.cluster.events().iter().any(|e| e.is("spawned")),
        "no worker starts while the hook fails"
    );
    run.stop();
}
