//! `ustad upgrade`: the primary replaces its own program in place. Under load, every worker
//! keeps its pid and keeps serving, not one request fails, a rollout started before goes on
//! after, a worker's channel and output still reach the primary, a worker killed after is
//! replaced, and the guard still takes everything down when the new program is SIGKILLed. A
//! binary that cannot take over is refused and nothing changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use ustad_testkit::Signal;
use ustad_testkit::load::{self, LoadOptions};
use ustad_testkit::process::wait_dead;

use crate::util::{Run, TIMEOUT, fixture, signal_pid, test_worker, ustad};

/// A copy of the ustad binary at another path: the "new version" (`/proc/PID/exe` tells
/// which program the primary runs).
fn next_binary(dir: &Path) -> PathBuf {
    let next = dir.join("ustad-next");
    std::fs::copy(ustad(), &next).expect("copying the ustad binary");
    next
}

/// `ustad run` with two demo workers on a port of its own.
fn two_demo_workers() -> Run {
    let ustad_path = ustad().to_string_lossy().into_owned();
    Run::start(&[
        "run",
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--",
        &ustad_path,
        "demo-worker",
    ])
}

/// An executable shell script `name` in the run's directory.
fn script(run: &Run, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = run.path(name);
    std::fs::write(&path, text).expect("writing a script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn status(run: &Run) -> Value {
    let out = run.client(&["status", "--json"]).ok();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

/// Each live worker of `pool`: id → pid.
fn workers(status: &Value, pool: &str) -> BTreeMap<u64, u64> {
    status["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .filter(|p| p["name"] == pool)
        .flat_map(|p| p["workers"].as_array().expect("workers").iter())
        .map(|w| {
            (
                w["id"].as_u64().expect("id"),
                w["pid"].as_u64().expect("pid"),
            )
        })
        .collect()
}

/// The signals `pid` blocks (`SigBlk` of `/proc/PID/status`, a hex mask).
fn blocked_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigBlk:"))
        .expect("a SigBlk line");
    u64::from_str_radix(mask.trim(), 16).expect("a hex mask")
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("reading /proc/PID/exe")
}

#[test]
fn an_upgrade_under_load_keeps_every_worker_and_loses_no_request() {
    let ustad_path = ustad().to_string_lossy().into_owned();
    let run = Run::with_config(&format!(
        r#"
        [sockets.web]
        listen = "127.0.0.1:0"

        [pools.web]
        command = ["{ustad_path}", "demo-worker", "--idle-grace", "300ms"]
        size = 4
        sockets = ["web"]
        ready = "notify"

        [pools.lib]
        command = ["python3", "{worker}"]
        size = 1
        ipc = "ustad"
        ready = "message"
        kill_timeout = "20s"

        [pools.slow]
        command = ["sleep", "300"]
        size = 2
        ready = "delay:1500ms"
        "#,
        worker = fixture("channel_worker.py"),
    ));
    let primary = run.cluster.pid();
    run.wait_ready(7);
    let next = next_binary(run.dir.path());
    let before = status(&run);
    let web_before = workers(&before, "web");
    let lib_before = workers(&before, "lib");
    assert_eq!(web_before.len(), 4, "{before}");
    assert_eq!(lib_before.len(), 1, "{before}");
    assert!(before["upgrade"].is_null(), "{before}");

    let mut options = LoadOptions::new(run.addr("web"));
    options.connections = 8;
    options.keep_alive = false;
    options.max_duration = Duration::from_secs(90);
    let load = load::start(options);
    assert!(load.wait_for_ok(200, TIMEOUT), "load: {}", load.snapshot());

    // A rollout of `slow` is under way (each replacement takes 1.5 s to be ready) when the
    // primary changes its program.
    let since = run.cluster.event_count();
    run.client(&["restart", "slow"]).ok();
    run.cluster.wait_event_since(
        since,
        |e| e.is("spawned") && e.str("pool") == Some("slow"),
        TIMEOUT,
    );
    let said = run
        .client(&[
            "upgrade",
            "--wait",
            "--binary",
            next.to_str().expect("UTF-8"),
        ])
        .ok();
    assert!(said.contains("upgraded ustad"), "{said}");
    // 4 web, 1 lib, 2 slow and the first replacement of the rollout.
    assert!(said.contains("8 workers kept, 0 gone"), "{said}");

    assert_eq!(exe_of(primary), next, "the primary runs the new program");
    // The signals blocked across the exec are delivered again.
    assert_eq!(blocked_signals(primary), 0);
    let after = status(&run);
    assert_eq!(after["pid"].as_u64(), Some(u64::from(primary)), "{after}");
    assert_eq!(
        workers(&after, "web"),
        web_before,
        "web workers kept: {after}"
    );
    assert_eq!(
        workers(&after, "lib"),
        lib_before,
        "lib worker kept: {after}"
    );
    assert_eq!(after["upgrade"]["count"], 1, "{after}");
    assert_eq!(after["upgrade"]["workers_kept"], 8, "{after}");
    assert_eq!(after["version"], env!("CARGO_PKG_VERSION"), "{after}");
    // The primary's uptime went on across the exec.
    assert!(
        after["uptime_secs"].as_f64() >= before["uptime_secs"].as_f64(),
        "{before} → {after}"
    );

    // The rollout started before the upgrade finishes after it.
    let finished = run.cluster.wait_event_since(
        since,
        |e| e.is("rollout_finished") && e.str("pool") == Some("slow"),
        TIMEOUT,
    );
    assert_eq!(finished.u64("replaced"), Some(2), "{finished}");

    // The load went on through the upgrade without a failure.
    let served = load.snapshot().ok;
    assert!(
        load.wait_for_ok(served + 200, TIMEOUT),
        "requests stopped after the upgrade"
    );
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "failed requests across the upgrade: {report}"
    );

    // The library worker's channel crossed the exec: restarting its pool sends it the `stop`
    // frame (it ignores its stop signal), and what it prints comes through its relayed stdout.
    let lib_pid = *lib_before.values().next().expect("a lib worker");
    let since = run.cluster.event_count();
    run.client(&["restart", "lib"]).ok();
    let line = run.cluster.wait_stdout_line(
        |line| line.contains(&format!("channel worker {lib_pid}: stop frame received")),
        TIMEOUT,
    );
    assert!(line.contains("lib.0"), "relayed with its prefix: {line}");
    let exited = run.cluster.wait_event_since(
        since,
        |e| e.is("exited") && e.u64("pid") == Some(lib_pid),
        TIMEOUT,
    );
    assert_eq!(exited.u64("code"), Some(0), "{exited}");

    // A worker killed after the upgrade is replaced.
    let (&id, &victim) = web_before.iter().next().expect("a web worker");
    let since = run.cluster.event_count();
    signal_pid(victim as u32, Signal::KILL);
    let exited = run.cluster.wait_event_since(
        since,
        |e| e.is("exited") && e.u64("id") == Some(id),
        TIMEOUT,
    );
    assert_eq!(exited.str("reason"), Some("crash"), "{exited}");
    run.cluster.wait_event_since(
        since,
        |e| e.is("ready") && e.str("pool") == Some("web"),
        TIMEOUT,
    );

    // The guard still watches every worker: SIGKILL the new program, and all of them go.
    let last = status(&run);
    let pids: Vec<u64> = ["web", "lib", "slow"]
        .iter()
        .flat_map(|pool| workers(&last, pool).into_values())
        .collect();
    assert_eq!(pids.len(), 7, "{last}");
    run.cluster
        .signal(Signal::KILL)
        .expect("SIGKILL to the primary");
    for pid in pids {
        assert!(
            wait_dead(pid as u32, TIMEOUT),
            "worker {pid} outlived the SIGKILLed primary"
        );
    }
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_take_over_is_refused_and_changes_nothing() {
    let mut run = two_demo_workers();
    let primary = run.cluster.pid();
    run.wait_ready(2);
    let before = workers(&status(&run), "app");
    let exe = exe_of(primary);

    // Not a ustad; a ustad whose state versions differ; not there at all.
    let other_version = script(
        &run,
        "ustad-other",
        "#!/bin/sh\necho '{\"ustad\":\"9.0.0\",\"state_versions\":[99]}'\n",
    );
    let cases = [
        ("/bin/true", "is not a ustad that can take over"),
        ("/bin/sleep", "is not a ustad that can take over"),
        (
            other_version.to_str().expect("UTF-8"),
            "reads state versions [99]",
        ),
        ("/nonexistent/ustad", "cannot run /nonexistent/ustad"),
    ];
    for (binary, why) in cases {
        let out = run.client(&["upgrade", "--wait", "--binary", binary]);
        assert_eq!(out.code, Some(1), "{binary}: {out:#?}");
        assert!(
            out.stderr.contains("upgrade refused") && out.stderr.contains(why),
            "{binary}: {out:#?}"
        );
    }
    let after = status(&run);
    assert_eq!(workers(&after, "app"), before, "{after}");
    assert!(after["upgrade"].is_null(), "{after}");
    assert_eq!(exe_of(primary), exe);

    // SIGURG upgrades to the program the primary was started from; again and again, nothing
    // accumulates (the fds of one upgrade are all taken or closed by the next program).
    let mut fds = Vec::new();
    for count in 1..=3 {
        let since = run.cluster.event_count();
        run.cluster.signal(Signal::URG).expect("SIGURG");
        let upgraded = run
            .cluster
            .wait_event_since(since, |e| e.is("upgraded"), TIMEOUT);
        assert_eq!(upgraded.u64("workers"), Some(2), "{upgraded}");
        let after = status(&run);
        assert_eq!(workers(&after, "app"), before, "{after}");
        assert_eq!(after["upgrade"]["count"], count, "{after}");
        fds.push(fd_count(primary));
    }
    assert_eq!(
        fds[0], fds[2],
        "the primary's open fds after each upgrade: {fds:?}"
    );
    run.stop();
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

#[test]
fn a_new_program_that_cannot_take_over_stops_the_old_workers_and_starts_afresh() {
    let ustad_path = ustad().to_string_lossy().into_owned();
    let mut run = two_demo_workers();
    let primary = run.cluster.pid();
    run.wait_ready(2);
    let old: Vec<u64> = workers(&status(&run), "app").into_values().collect();

    // A new "binary" that answers the check as ustad does, but loses its handover document:
    // it is started with the fd of a document that is not there.
    let broken = script(
        &run,
        "ustad-broken",
        &format!(
            "#!/bin/sh\ncase \"$1\" in\n  --handover=*) shift; exec '{ustad_path}' --handover=1000 \"$@\";;\n  *) exec '{ustad_path}' \"$@\";;\nesac\n"
        ),
    );
    let since = run.cluster.event_count();
    let out = run.client(&[
        "upgrade",
        "--wait",
        "--binary",
        broken.to_str().expect("UTF-8"),
    ]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("could not take over"), "{out:#?}");

    let failed = run
        .cluster
        .wait_event_since(since, |e| e.is("upgrade_failed"), TIMEOUT);
    assert!(
        failed
            .str("message")
            .is_some_and(|m| m.contains("handover document")),
        "{failed}"
    );
    // The old workers were stopped (never left running unsupervised)…
    for pid in &old {
        assert!(
            wait_dead(*pid as u32, TIMEOUT),
            "old worker {pid} still runs"
        );
    }
    // …and the same primary runs a fresh cluster from its command line.
    run.cluster.wait_event_since(
        since,
        |e| e.is("ready") && e.str("pool") == Some("app"),
        TIMEOUT,
    );
    let after = status(&run);
    assert_eq!(after["pid"].as_u64(), Some(u64::from(primary)), "{after}");
    let new: Vec<u64> = workers(&after, "app").into_values().collect();
    assert!(new.iter().all(|pid| !old.contains(pid)), "{after}");
    // It answers its signals (blocked across the exec) and stops as usual.
    assert_eq!(blocked_signals(primary), 0);
    run.stop();
}

#[test]
fn a_worker_that_dies_as_the_program_changes_is_reaped_and_replaced() {
    let mut run = two_demo_workers();
    let primary = run.cluster.pid();
    run.wait_ready(2);
    // The kill and the upgrade race: the old program may see the exit first, or hand over a
    // worker that is already a zombie. Either way it is reaped and replaced, never lost.
    for round in 1..=5u64 {
        let before = workers(&status(&run), "app");
        let (&id, &victim) = before.iter().next().expect("a worker");
        let since = run.cluster.event_count();
        signal_pid(victim as u32, Signal::KILL);
        run.cluster.signal(Signal::URG).expect("SIGURG");
        run.cluster
            .wait_event_since(since, |e| e.is("upgraded"), TIMEOUT);
        let exited = run.cluster.wait_event_since(
            since,
            |e| e.is("exited") && e.u64("id") == Some(id),
            TIMEOUT,
        );
        assert_eq!(exited.u64("signal"), Some(9), "round {round}: {exited}");
        run.cluster.wait_event_since(
            since,
            |e| e.is("ready") && e.u64("id").is_some_and(|new| new > id),
            TIMEOUT,
        );
        let after = status(&run);
        let now = workers(&after, "app");
        assert_eq!(now.len(), 2, "round {round}: {after}");
        assert!(
            !now.values().any(|pid| *pid == victim),
            "round {round}: {after}"
        );
        assert_eq!(after["upgrade"]["count"], round, "{after}");
        assert!(
            wait_dead(victim as u32, TIMEOUT),
            "round {round}: {victim} not reaped"
        );
    }
    assert!(zombies_of(primary).is_empty(), "{:?}", zombies_of(primary));
    run.stop();
}

/// Children of `parent` that are zombies (exited, not reaped).
fn zombies_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
                fields.first() == Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str())
            })
        })
        .collect()
}

#[test]
fn an_exec_that_fails_after_the_check_undoes_everything() {
    let ustad_path = ustad().to_string_lossy().into_owned();
    let mut run = two_demo_workers();
    let primary = run.cluster.pid();
    run.wait_ready(2);
    let before = workers(&status(&run), "app");
    let inherited = inherited_fds(primary);

    // It answers the check as ustad does, and is gone by the time the primary executes it.
    let vanishing = script(
        &run,
        "ustad-vanishing",
        &format!("#!/bin/sh\nrm -f \"$0\"\nexec '{ustad_path}' \"$@\"\n"),
    );
    let out = run.client(&[
        "upgrade",
        "--wait",
        "--binary",
        vanishing.to_str().expect("UTF-8"),
    ]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("cannot execute") && out.stderr.contains("No such file"),
        "{out:#?}"
    );
    // Nothing changed: the same program, workers and answers, every fd close-on-exec again,
    // no signal left blocked.
    let after = status(&run);
    assert_eq!(workers(&after, "app"), before, "{after}");
    assert!(after["upgrade"].is_null(), "{after}");
    assert_eq!(exe_of(primary), ustad());
    assert_eq!(inherited_fds(primary), inherited);
    assert_eq!(blocked_signals(primary), 0);
    let load = load::get(run.addr("listen"));
    assert!(load.is_ok_and(|(code, _, _)| code == 200));
    run.stop();
}

/// The fds of `pid` that a program it executes would inherit (not close-on-exec).
fn inherited_fds(pid: u32) -> Vec<u32> {
    const O_CLOEXEC: u32 = 0o2_000_000;
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| {
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).is_ok_and(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("flags:"))
                    .and_then(|flags| u32::from_str_radix(flags.trim(), 8).ok())
                    .is_some_and(|flags| flags & O_CLOEXEC == 0)
            })
        })
        .collect();
    fds.sort_unstable();
    fds
}

/// The nice value of `pid` (field 19 of `/proc/PID/stat`).
fn nice_of(pid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = &stat[stat.rfind(')').expect("a comm") + 2..];
    after
        .split(' ')
        .nth(16)
        .and_then(|nice| nice.parse().ok())
        .expect("a nice value")
}

#[test]
fn the_primary_runs_above_its_workers_before_and_after_an_upgrade() {
    let mut run = two_demo_workers();
    let primary = run.cluster.pid();
    run.wait_ready(2);
    let raised = nice_of(primary);
    // Started at another nice value than 0 (the tests run under `nice`), ustad leaves it, for
    // itself and its workers: the operator chose it.
    let started_at = nice_of(std::process::id());
    if started_at != 0 {
        assert_eq!(raised, started_at, "left as it was started");
        let said = run
            .cluster
            .wait_event(|e| e.is("priority"), TIMEOUT)
            .to_string();
        assert!(said.contains("keeps its priority"), "{said}");
        run.stop();
        return;
    }
    if raised == 0 {
        // Not permitted here (no CAP_SYS_NICE): the primary says so and changes nothing.
        let said = run
            .cluster
            .wait_event(|e| e.is("priority"), TIMEOUT)
            .to_string();
        assert!(said.contains("not permitted"), "{said}");
    } else {
        assert_eq!(raised, ustad_core::priority::DEFAULT_NICE);
    }
    let pids = workers(&status(&run), "app");
    for pid in pids.values() {
        assert_eq!(nice_of(*pid as u32), 0, "worker {pid}");
    }
    let since = run.cluster.event_count();
    run.client(&["upgrade", "--wait"]).ok();
    run.cluster
        .wait_event_since(since, |e| e.is("upgraded"), TIMEOUT);
    assert_eq!(nice_of(primary), raised, "the same after the exec");
    // A worker started by the new program starts at 0 too.
    let (&id, &victim) = pids.iter().next().expect("a worker");
    signal_pid(victim as u32, Signal::KILL);
    run.cluster.wait_event_since(
        since,
        |e| e.is("ready") && e.u64("id").is_some_and(|new| new > id),
        TIMEOUT,
    );
    for pid in workers(&status(&run), "app").values() {
        assert_eq!(nice_of(*pid as u32), 0, "worker {pid}");
    }
    run.stop();
}

#[test]
fn a_program_a_worker_starts_after_an_upgrade_still_gets_the_preload_library_and_the_socket() {
    // The worker is a shell that waits on a FIFO, then execs a program that binds ustad's
    // address itself: it loads the library from the path the old program gave the shell.
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("go");
    let made = std::process::Command::new("mkfifo")
        .arg(&gate)
        .status()
        .unwrap();
    assert!(made.success());
    // Read-write: never blocks, and keeps what is written until the shell reads it.
    let mut gate_end = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&gate)
        .unwrap();
    let script = format!(
        "read go < {}; exec {} --never-ready --serve-http --bind 127.0.0.1:{{port}}",
        gate.display(),
        test_worker()
    );
    let mut run = Run::start(&[
        "run",
        "-w",
        "1",
        "-l",
        "127.0.0.1:0",
        "--ready",
        "none",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    run.wait_ready(1);
    let primary = run.cluster.pid();
    let shell = *workers(&status(&run), "app").values().next().unwrap() as u32;
    let environ = std::fs::read(format!("/proc/{shell}/environ")).unwrap();
    let preload = environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"LD_PRELOAD="))
        .map(|path| String::from_utf8_lossy(path).into_owned())
        .expect("the worker has LD_PRELOAD");
    let prefix = format!("/proc/{primary}/fd/");
    assert!(preload.starts_with(&prefix), "{preload}");

    let since = run.cluster.event_count();
    run.client(&["upgrade", "--wait"]).ok();
    run.cluster
        .wait_event_since(since, |e| e.is("upgraded"), TIMEOUT);
    let target = std::fs::read_link(&preload).expect("the path still names an open fd");
    assert!(
        target.to_string_lossy().starts_with("/memfd:ustad-preload"),
        "{preload} -> {}",
        target.display()
    );

    use std::io::Write;
    gate_end.write_all(b"go\n").unwrap();
    let (status, headers, _) = load::get(run.addr("listen")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        headers["x-worker-pid"].parse::<u32>().unwrap(),
        shell,
        "the program the shell became serves ustad's socket"
    );
    assert!(
        !run.cluster.events().iter().any(|e| e.is("address_in_use")),
        "it did not find its address in use"
    );
    run.stop();
}
