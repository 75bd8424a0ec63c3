//! `--watch` / `watch`: a saved file rolls the pool, and a save that breaks the app leaves the
//! workers of the last good one serving.

use std::collections::BTreeSet;

use crate::util::{Run, TIMEOUT, ustad};

/// The pids of the workers of `app`, as `status --json` shows them.
fn workers(run: &Run) -> BTreeSet<u64> {
    let out = run.client(&["status", "--json"]).ok();
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    status["pools"][0]["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|worker| worker["pid"].as_u64().expect("a pid"))
        .collect()
}

#[test]
fn a_saved_file_rolls_the_pool_and_a_save_that_breaks_it_keeps_the_old_workers() {
    let src = tempfile::tempdir().unwrap();
    let version = src.path().join("version");
    std::fs::write(&version, "ok 1").unwrap();
    // The app: the demo worker, as long as its "code" says ok.
    let app = format!(
        "grep -q ^ok {} && exec {} demo-worker; echo broken; exit 1",
        version.display(),
        ustad().display()
    );
    let src_path = src.path().to_str().unwrap();
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--watch",
        src_path,
        "--",
        "sh",
        "-c",
        &app,
    ]);
    run.wait_ready(2);
    let watching = run.cluster.wait_event(|e| e.is("watching"), TIMEOUT);
    assert_eq!(watching.u64("directories"), Some(1), "{watching}");
    let first = workers(&run);
    assert_eq!(first.len(), 2);

    let since = run.cluster.event_count();
    std::fs::write(&version, "ok 2").unwrap();
    let changed = run
        .cluster
        .wait_event_since(since, |e| e.is("files_changed"), TIMEOUT);
    assert_eq!(
        changed.str("paths"),
        Some(version.to_str().unwrap()),
        "{changed}"
    );
    run.cluster
        .wait_event_since(since, |e| e.is("rollout_finished"), TIMEOUT);
    let second = workers(&run);
    assert_eq!(second.len(), 2);
    assert!(first.is_disjoint(&second), "{first:?} then {second:?}");

    let since = run.cluster.event_count();
    std::fs::write(&version, "syntax error").unwrap();
    run.cluster
        .wait_event_since(since, |e| e.is("rollout_aborted"), TIMEOUT);
    let (status, headers, _) = ustad_testkit::load::get(run.addr("listen")).unwrap();
    assert_eq!(status, 200);
    let server: u64 = headers["x-worker-pid"].parse().unwrap();
    assert!(
        second.contains(&server),
        "the last good workers serve: {server} of {second:?}"
    );
    run.stop();
}
