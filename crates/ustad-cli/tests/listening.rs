//! Apps that know nothing of ustad, with ustad's defaults: a worker is ready when ustad sees it
//! wait for connections on its socket (`ready = "listening"`), however it waits.

use std::collections::BTreeSet;

use ustad_testkit::Signal;
use ustad_testkit::cluster::LogEvent;
use ustad_testkit::load::{self, LoadOptions};

use crate::util::{Run, TIMEOUT, fixture, pid, ustad};

/// Starts `ustad run -w 2 -l 127.0.0.1:0 <extra…> -- <command…>`, waits until both workers
/// are seen listening (in the way `how`) and ready, then checks that requests are answered by
/// the processes seen. Returns the run and its ready events.
fn serves(extra: &[&str], command: &[&str], how: &str) -> (Run, Vec<LogEvent>) {
    let mut args = vec!["run", "-w", "2", "-l", "127.0.0.1:0"];
    args.extend(extra);
    args.push("--");
    args.extend(command);
    let run = Run::start(&args);
    let ready = run.wait_ready(2);
    let seen =
        run.cluster
            .wait_events(|e| e.is("listening") && e.str("pool").is_some(), 2, TIMEOUT);
    for (listening, ready) in seen.iter().zip(&ready) {
        assert_eq!(listening.str("how"), Some(how), "{listening}");
        assert_eq!(listening.str("socket"), Some("listen"), "{listening}");
        assert!(listening.u64("after_ms").is_some(), "{listening}");
        assert_eq!(listening.u64("id"), ready.u64("id"));
    }
    let pids: BTreeSet<u32> = seen
        .iter()
        .map(|e| {
            e.u64("process")
                .and_then(|p| u32::try_from(p).ok())
                .expect("a process")
        })
        .collect();
    let mut options = LoadOptions::new(run.addr("listen"));
    options.keep_alive = false;
    options.max_requests = Some(40);
    let report = load::start(options).wait();
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.by_pid.keys().all(|p| pids.contains(p)), "{report}");
    (run, ready)
}

#[test]
fn node_listening_on_fd_3_is_seen_by_epoll() {
    let (mut run, _) = serves(&[], &["node", &fixture("naive.js")], "epoll");
    // `status --json` says when each worker was seen listening, and where.
    let status: serde_json::Value =
        serde_json::from_str(&run.client(&["status", "--json"]).ok()).expect("JSON status");
    let workers = status["pools"][0]["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{status}");
    for worker in workers {
        assert_eq!(worker["listening"]["socket"], "listen", "{worker}");
        assert!(
            worker["listening"]["after_secs"]
                .as_f64()
                .is_some_and(|s| s > 0.0),
            "{worker}"
        );
    }
    run.stop();
}

#[test]
fn node_on_reuseport_sockets_is_seen_on_its_slots_socket() {
    let (mut run, _) = serves(&["--reuseport"], &["node", &fixture("naive.js")], "epoll");
    run.stop();
}

#[test]
fn python_http_server_is_seen_polling() {
    let (mut run, _) = serves(&[], &["python3", &fixture("servers.py"), "poll"], "poll");
    run.stop();
}

#[test]
fn a_python_thread_blocked_in_accept_is_seen() {
    let (mut run, _) = serves(
        &[],
        &["python3", &fixture("servers.py"), "accept"],
        "accept",
    );
    run.stop();
}

#[test]
fn a_python_select_loop_is_seen() {
    let (mut run, _) = serves(
        &[],
        &["python3", &fixture("servers.py"), "select"],
        "select",
    );
    run.stop();
}

#[test]
fn python_asyncio_is_seen_by_epoll() {
    let (mut run, _) = serves(
        &[],
        &["python3", &fixture("servers.py"), "asyncio"],
        "epoll",
    );
    run.stop();
}

#[test]
fn the_rust_demo_worker_is_seen_by_epoll() {
    // Without NOTIFY_SOCKET, or it would say READY=1 before it is seen.
    let demo = format!(
        "unset NOTIFY_SOCKET; exec {} demo-worker",
        ustad().to_string_lossy()
    );
    let (mut run, _) = serves(&["--ready", "listening"], &["sh", "-c", &demo], "epoll");
    run.stop();
}

#[test]
fn a_server_started_by_a_shell_wrapper_is_seen_in_the_workers_tree() {
    // As `npm start` does: a shell that stays, with the server as its child.
    let script = format!("node {} ; exit $?", fixture("naive.js"));
    let (mut run, ready) = serves(&[], &["sh", "-c", &script], "epoll");
    let listening = run
        .cluster
        .events()
        .into_iter()
        .filter(|e| e.is("listening") && e.str("pool").is_some())
        .collect::<Vec<_>>();
    assert_eq!(listening.len(), 2);
    // The events name the worker (the shell), and the child of it that was seen.
    let shells: BTreeSet<u32> = ready.iter().map(pid).collect();
    assert!(listening.iter().all(|e| shells.contains(&pid(e))));
    assert!(
        listening.iter().all(|e| e
            .u64("process")
            .is_some_and(|p| !shells.contains(&(p as u32)))),
        "{listening:?}"
    );
    run.stop();
}

#[test]
fn a_rolling_restart_of_a_naive_app_never_empties_a_slot() {
    let (mut run, _) = serves(&[], &["node", &fixture("naive.js")], "epoll");
    run.cluster.signal(Signal::HUP).expect("SIGHUP");
    run.cluster
        .wait_event(|e| e.is("rollout_finished"), TIMEOUT);
    // In each slot, the old worker was asked to stop only after its replacement was ready
    // (seen listening): never a moment with no worker accepting in that slot.
    let events = run.cluster.events();
    for stopping in events
        .iter()
        .filter(|e| e.is("stopping") && e.u64("generation") == Some(1))
    {
        let slot = stopping.u64("slot");
        let position = events.iter().position(|e| std::ptr::eq(e, stopping));
        let replaced_first = events[..position.expect("in the list")]
            .iter()
            .any(|e| e.is("ready") && e.u64("generation") == Some(2) && e.u64("slot") == slot);
        assert!(
            replaced_first,
            "slot {slot:?} stopped before its replacement listened"
        );
    }
    run.stop();
}

#[test]
fn a_new_version_that_never_listens_stops_the_rollout_and_the_old_workers_keep_serving() {
    let broken = tempfile::NamedTempFile::new().expect("a temp file");
    let broken_path = broken.path().to_string_lossy().into_owned();
    let flag = format!("BROKEN={broken_path}.flag");
    let (run, ready) = serves(
        &["--ready-timeout", "2s", "-e", &flag],
        &["node", &fixture("naive.js")],
        "epoll",
    );
    let old: BTreeSet<u32> = ready.iter().map(pid).collect();
    // The next version hangs at boot.
    std::fs::write(format!("{broken_path}.flag"), "").expect("writing the flag");
    let mut options = LoadOptions::new(run.addr("listen"));
    options.keep_alive = false;
    let load = load::start(options);
    let reload = run.client(&["reload", "--wait"]);
    let report = load.stop();
    assert_eq!(reload.code, Some(1), "{reload:#?}");
    assert!(
        reload.stderr.contains("not ready within ready_timeout"),
        "{reload:#?}"
    );
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.ok > 0, "{report}");
    assert!(report.by_pid.keys().all(|p| old.contains(p)), "{report}");
    // The log said why, before the kill, and what to do.
    let warning = run.cluster.wait_event(|e| e.is("not_listening"), TIMEOUT);
    assert!(
        warning
            .str("message")
            .is_some_and(|m| m.contains("ready = \"notify\"")),
        "{warning}"
    );
    let status = run.client(&["status"]).ok();
    assert!(status.contains("2/2 ready"), "{status}");
    let _ = std::fs::remove_file(format!("{broken_path}.flag"));
    let mut run = run;
    run.stop();
}
