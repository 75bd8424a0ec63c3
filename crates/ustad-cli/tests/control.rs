//! The control socket and the client commands against live clusters: `status`, `scale`,
//! `restart`, `reload` (with config changes), `logs`, `stop`, and hostile clients.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;
use ustad_testkit::Signal;

use crate::util::{Run, TIMEOUT, client_in, pid, run_in, signal_pid, test_worker};

fn status_json(run: &Run) -> Value {
    let out = run.client(&["status", "--json"]).ok();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

fn worker_pids(status: &Value, pool: &str) -> Vec<u64> {
    let pool = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pool)
        .unwrap_or_else(|| panic!("no pool {pool} in {status}"));
    pool["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| w["pid"].as_u64().unwrap())
        .collect()
}

#[test]
fn status_lists_every_worker_as_a_table_and_as_json() {
    let run = Run::start(&["run", "-w", "2", "--name", "shop", "--", &test_worker()]);
    let ready: Vec<u64> = run
        .wait_ready(2)
        .iter()
        .map(|e| u64::from(pid(e)))
        .collect();
    let status = status_json(&run);
    assert_eq!(status["name"], "shop");
    assert_eq!(status["pid"].as_u64(), Some(u64::from(run.cluster.pid())));
    let mut pids = worker_pids(&status, "app");
    pids.sort_unstable();
    let mut expected = ready.clone();
    expected.sort_unstable();
    assert_eq!(pids, expected);
    let worker = &status["pools"][0]["workers"][0];
    assert!(worker["rss_bytes"].as_u64().unwrap() > 0, "{worker}");
    let table = run.client(&["status"]).ok();
    assert!(table.starts_with("shop (pid "), "{table}");
    assert!(table.contains("app   2/2 ready"), "{table}");
    for pid in ready {
        assert!(table.contains(&pid.to_string()), "{table}");
    }
    // The default socket is $XDG_RUNTIME_DIR/ustad/<name>.sock (the fixture points
    // XDG_RUNTIME_DIR at the test's directory), found by name or as the only one running.
    let socket = run.dir.path().join("ustad/shop.sock");
    assert_eq!(run.control(), socket);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let runtime_dir = run.dir.path().to_str().unwrap();
    let env = [("XDG_RUNTIME_DIR", runtime_dir)];
    let by_name = client_in(run.dir.path(), &["status", "--name", "shop"], &env).ok();
    assert!(by_name.starts_with("shop (pid "));
    let only_one = client_in(run.dir.path(), &["status"], &env).ok();
    assert!(only_one.starts_with("shop (pid "));
    let wrong = client_in(run.dir.path(), &["status", "--name", "nope"], &env);
    assert_eq!(wrong.code, Some(1));
    assert!(wrong.stderr.contains("nope.sock"), "{wrong:?}");
}

#[test]
fn a_client_with_no_instance_running_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let runtime_dir = dir.path().to_str().unwrap();
    let out = client_in(dir.path(), &["status"], &[("XDG_RUNTIME_DIR", runtime_dir)]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("no ustad is running"), "{out:?}");
}

#[test]
fn scale_grows_and_shrinks_a_pool_from_the_highest_slot() {
    let run = Run::start(&["run", "-w", "2", "--", &test_worker()]);
    run.wait_ready(2);
    let out = run.client(&["scale", "app", "+1"]).ok();
    assert_eq!(out.trim(), "pool app scaled from 2 to 3");
    let added = run
        .cluster
        .wait_event(|e| e.is("ready") && e.u64("slot") == Some(2), TIMEOUT);
    run.client(&["scale", "app", "-2"]).ok();
    let stopped: Vec<u64> = run
        .cluster
        .wait_events(
            |e| e.is("exited") && e.str("reason") == Some("scale"),
            2,
            TIMEOUT,
        )
        .iter()
        .map(|e| e.u64("slot").unwrap())
        .collect();
    assert_eq!(stopped.iter().copied().max(), Some(2));
    assert!(stopped.contains(&1));
    assert_eq!(pid(&added) as u64, stopped_pid(&run, 2));
    assert_eq!(worker_pids(&status_json(&run), "app").len(), 1);
    let refused = run.client(&["scale", "app", "-1"]);
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.contains("cannot shrink"), "{refused:?}");
    let unknown = run.client(&["scale", "nope", "3"]);
    assert_eq!(unknown.code, Some(1));
    assert!(
        unknown.stderr.contains("no pool named `nope`"),
        "{unknown:?}"
    );
}

/// Reliability issue, part 1: sizes and deltas from a control client are bounded; none of them
/// takes the primary (and every worker) down.
#[test]
fn absurd_sizes_and_deltas_are_refused_and_the_primary_lives_on() {
    let mut run = Run::start(&["run", "-w", "2", "--", &test_worker()]);
    run.wait_ready(2);
    for (size, says) in [
        ("18446744073709551615", "processes"),
        ("4294967296", "processes"),
        ("+9223372036854775807", "processes"),
        (
            "-9223372036854775808",
            "cannot shrink by 9223372036854775808",
        ),
    ] {
        let refused = run.client(&["scale", "app", size]);
        assert_eq!(refused.code, Some(1), "{size}: {refused:?}");
        assert!(refused.stderr.contains(says), "{size}: {refused:?}");
    }
    // Still there, still serving both workers.
    assert_eq!(worker_pids(&status_json(&run), "app").len(), 2);
    run.stop();
}

/// Reliability issue, part 5: a crash loop's backoff shows where operators look.
#[test]
fn status_shows_each_backing_off_slot_with_its_failures_and_next_attempt() {
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "--restart-delay",
        "30s",
        "--",
        &test_worker(),
        "--exit-code",
        "3",
    ]);
    run.cluster
        .wait_events(|e| e.is("restart_scheduled"), 2, TIMEOUT);
    let status = status_json(&run);
    let waiting = status["pools"][0]["waiting"]
        .as_array()
        .expect("waiting slots");
    assert_eq!(waiting.len(), 2, "{status}");
    for slot in waiting {
        assert_eq!(slot["failures"], 1, "{slot}");
        let next = slot["next_attempt_secs"].as_f64().expect("a time");
        assert!(next > 0.0 && next <= 30.0, "{slot}");
        assert_eq!(slot["last_exit"]["status"], "exit code 3", "{slot}");
    }
    let table = run.client(&["status"]).ok();
    assert!(
        table.contains("backoff: 1 failed start, next in"),
        "{table}"
    );
    assert!(table.contains("exit code 3 (crash)"), "{table}");
    run.stop();
}

/// Issue "What users still miss", part 1: one worker at a time from the command line.
#[test]
fn stop_one_worker_kill_a_pool_and_follow_the_events_as_json() {
    let mut run = Run::start(&["run", "-w", "2", "--ready", "notify", "--", &test_worker()]);
    run.wait_ready(2);
    // `ustad events --json` follows everything that happens, with exit codes and signals.
    let control = run.control();
    let events_out = run.path("events.jsonl");
    let mut follow = std::process::Command::new(crate::util::ustad());
    follow
        .args(["events", "--json", "--control"])
        .arg(&control)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&events_out).unwrap());
    let mut follower = ustad_testkit::process::ProcessGuard::spawn(&mut follow).unwrap();
    // It follows from when it connected: grow the pool until it has seen that happen.
    let mut size = 2;
    let subscribed = std::time::Instant::now() + TIMEOUT;
    while !std::fs::read_to_string(&events_out)
        .unwrap()
        .contains("\"scaled\"")
    {
        assert!(
            std::time::Instant::now() < subscribed,
            "the follower saw nothing"
        );
        size += 1;
        run.client(&["scale", "app", &size.to_string()]).ok();
        run.wait_ready(size);
    }
    let ready = run.wait_ready(size);
    let target = pid(&ready[1]) as u64;
    let id = ready[1].u64("id").unwrap();
    let out = run.client(&["stop", &id.to_string()]).ok();
    assert!(out.contains("slot stays empty"), "{out}");
    let exit = run
        .cluster
        .wait_event(|e| e.is("exited") && e.u64("id") == Some(id), TIMEOUT);
    assert_eq!(exit.str("reason"), Some("operator"), "{exit}");
    // Not replaced: one worker, and the slot shows why it is empty.
    let table = run.client(&["status"]).ok();
    assert!(table.contains("empty: stopped by an operator"), "{table}");
    assert_eq!(worker_pids(&status_json(&run), "app").len(), size - 1);
    // kill POOL SIGNAL: every worker of the pool; a ready worker that dies is replaced at once.
    let killed = run.client(&["kill", "app", "SIGKILL"]).ok();
    assert!(
        killed.contains(&format!("sent SIGKILL to {} workers", size - 1)),
        "{killed}"
    );
    run.cluster.wait_events(
        |e| e.is("exited") && e.i64("signal") == Some(9),
        size - 1,
        TIMEOUT,
    );
    run.wait_ready(2 * size - 1);
    let bad = run.client(&["kill", "app", "SIGNOPE"]);
    assert_eq!(bad.code, Some(1), "{bad:?}");
    let gone = run.client(&["kill", &id.to_string()]);
    assert!(gone.stderr.contains("no worker with id"), "{gone:?}");
    // A restart of the pool fills the emptied slot.
    run.client(&["restart", "app"]).ok();
    run.cluster
        .wait_event(|e| e.is("rollout_finished"), TIMEOUT);
    assert_eq!(worker_pids(&status_json(&run), "app").len(), size);
    run.stop();
    // The follower ends with the primary; what it printed are JSON events with their fields.
    let status = follower
        .wait_timeout(TIMEOUT)
        .expect("events ends with the primary");
    assert!(status.success());
    let text = std::fs::read_to_string(&events_out).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON event"))
        .collect();
    let stopped = events
        .iter()
        .find(|e| e["event"] == "exited" && e["pid"] == target)
        .unwrap_or_else(|| panic!("no exit of pid {target} in:\n{text}"));
    assert_eq!(stopped["reason"], "operator");
    assert_eq!(stopped["code"], 0);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "exited" && e["signal"] == 9 && e["reason"] == "crash"),
        "{text}"
    );
}

fn stopped_pid(run: &Run, slot: u64) -> u64 {
    run.cluster
        .events()
        .iter()
        .find(|e| e.is("exited") && e.u64("slot") == Some(slot))
        .and_then(|e| e.u64("pid"))
        .unwrap()
}

#[test]
fn restart_replaces_one_worker_or_a_whole_pool_rolling() {
    let run = Run::start(&["run", "-w", "2", "--ready", "notify", "--", &test_worker()]);
    let ready = run.wait_ready(2);
    let first = ready.iter().find(|e| e.u64("slot") == Some(0)).unwrap();
    let id = first.u64("id").unwrap().to_string();
    let out = run.client(&["restart", &id]).ok();
    assert!(out.contains("will be replaced"), "{out}");
    let exited = run.cluster.wait_event(
        |e| e.is("exited") && e.str("reason") == Some("restart"),
        TIMEOUT,
    );
    assert_eq!(exited.u64("pid"), first.u64("pid"));
    // The replacement was ready before the old one was asked to stop.
    let events = run.cluster.events();
    let position =
        |f: &dyn Fn(&ustad_testkit::cluster::LogEvent) -> bool| events.iter().position(f).unwrap();
    let replacement_ready = position(&|e| e.is("ready") && e.u64("id") == Some(3));
    let old_stopping = position(&|e| e.is("stopping") && e.u64("pid") == first.u64("pid"));
    assert!(replacement_ready < old_stopping);

    run.client(&["restart", "app"]).ok();
    run.cluster.wait_event(
        |e| e.is("rollout_finished") && e.str("pool") == Some("app"),
        TIMEOUT,
    );
    let unknown = run.client(&["restart", "999"]);
    assert_eq!(unknown.code, Some(1));
    assert!(
        unknown.stderr.contains("no worker with id 999"),
        "{unknown:?}"
    );
}

#[test]
fn reload_applies_a_changed_config_and_refuses_a_broken_one_whole() {
    let worker = test_worker();
    let config = |pools: &str| format!("restart_delay = \"100ms\"\n{pools}");
    let web = format!("[pools.web]\ncommand = [\"{worker}\"]\nsize = 2\nready = \"notify\"\n");
    let jobs = format!("[pools.jobs]\ncommand = [\"{worker}\"]\nsize = 1\n");
    let mut run = Run::with_config(&config(&format!("{web}\n{jobs}")));
    run.wait_ready(3);
    let write = |text: &str| std::fs::write(run.path("ustad.toml"), text).unwrap();

    // A broken file: refused with its line and column, nothing changes.
    write(&format!("{web}\n{jobs}\nsurprise = 1\n"));
    let refused = run.client(&["reload", "--wait"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(refused.stderr.contains("ustad.toml:"), "{refused:?}");
    assert!(refused.stderr.contains("surprise"), "{refused:?}");
    assert_eq!(
        run.cluster
            .events()
            .iter()
            .filter(|e| e.is("spawned"))
            .count(),
        3
    );

    // web changes (its env), jobs goes, cron comes: web rolls, jobs stops, cron starts.
    let changed_web = format!("{web}env = {{ COLOR = \"blue\" }}\n");
    let cron = format!("[pools.cron]\ncommand = [\"{worker}\"]\nsize = 1\n");
    write(&config(&format!("{changed_web}\n{cron}")));
    let out = run.client(&["reload", "web", "--wait"]);
    let stdout = out.stdout.clone();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(stdout.contains("rolling restart finished"), "{stdout}");
    assert!(out.stderr.contains("2/2"), "progress is shown: {out:?}");
    let events = run.cluster.events();
    assert!(
        events
            .iter()
            .any(|e| e.is("pool_removed") && e.str("pool") == Some("jobs"))
    );
    assert!(
        events
            .iter()
            .any(|e| e.is("exited") && e.str("reason") == Some("pool_removed"))
    );
    assert!(
        events
            .iter()
            .any(|e| e.is("ready") && e.str("pool") == Some("cron"))
    );
    let status = status_json(&run);
    let pools: Vec<&str> = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["web", "cron"]);
    assert_eq!(status["pools"][0]["generation"], 2);

    // Unchanged and not named: left alone.
    let before = events.iter().filter(|e| e.is("spawned")).count();
    let out = run.client(&["reload", "cron", "--wait"]).ok();
    assert!(out.contains("rolling restart finished: cron"), "{out}");
    let spawned: Vec<_> = run
        .cluster
        .events()
        .into_iter()
        .filter(|e| e.is("spawned"))
        .skip(before)
        .collect();
    assert!(
        spawned.iter().all(|e| e.str("pool") == Some("cron")),
        "{spawned:?}"
    );
    run.stop();
}

#[test]
fn logs_shows_recent_lines_and_follows_new_ones() {
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
    let id = |e: &ustad_testkit::cluster::LogEvent| e.u64("id").unwrap();
    // Lines are kept as they are relayed: wait until both start lines went through.
    for event in &ready {
        let line = format!("test-worker {} started", id(event));
        run.cluster.wait_stdout_line(|l| l.contains(&line), TIMEOUT);
    }
    let out = run.client(&["logs", "-n", "10"]).ok();
    for event in &ready {
        assert!(
            out.contains(&format!("test-worker {} started", id(event))),
            "{out}"
        );
    }
    let out = run.client(&["logs", "-n", "1"]).ok();
    assert_eq!(out.lines().count(), 1, "{out}");

    // Follow: a replacement's first line arrives on the open stream.
    let control = run.control();
    let mut command = std::process::Command::new(crate::util::ustad());
    command
        .args([
            "logs",
            "-f",
            "-n",
            "0",
            "--control",
            control.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut follower = ustad_testkit::process::ProcessGuard::spawn(&mut command).unwrap();
    let stdout = follower.child_mut().stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // The follower is subscribed once the primary has its request; a status round trip
    // through the same loop after that makes sure.
    std::thread::sleep(Duration::from_millis(200));
    run.client(&["status"]).ok();
    signal_pid(pid(&ready[0]), Signal::KILL);
    let replacement = run
        .cluster
        .wait_event(|e| e.is("spawned") && e.u64("id") == Some(3), TIMEOUT);
    let expected = format!("test-worker {} started", id(&replacement));
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines_rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("`ustad logs -f` did not show {expected:?}"));
        if line.contains(&expected) {
            assert!(line.starts_with("app.0 | "), "{line}");
            break;
        }
    }
}

#[test]
fn stop_stops_every_worker_and_waits_for_the_primary() {
    // `--ready notify`: ready once the worker's signal handlers are in place (ready at spawn,
    // a fast stop could reach a worker before it ignores SIGTERM, and kill it outright).
    let mut run = Run::start(&[
        "run",
        "-w",
        "2",
        "--ready",
        "notify",
        "--",
        &test_worker(),
        "--ignore-term",
    ]);
    run.wait_ready(2);
    let out = run.client(&["stop", "--timeout", "300ms"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "stopped");
    assert!(out.stderr.contains("stopping 2 workers"), "{out:?}");
    // The workers ignored SIGTERM: --timeout, not the default 30 s kill_timeout, ended them.
    let status = run.cluster.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0));
    let killed = run
        .cluster
        .events()
        .iter()
        .filter(|e| e.is("killed"))
        .count();
    assert_eq!(killed, 2);
    assert!(!run.dir.path().join("ustad/app.sock").exists());
}

#[test]
fn garbage_oversized_and_half_written_requests_leave_the_primary_serving() {
    let mut run = Run::start(&["run", "-w", "1", "--", &test_worker()]);
    run.wait_ready(1);
    let control = run.control();
    let ask = |bytes: &[u8]| -> String {
        let mut stream = UnixStream::connect(&control).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        // A write may fail when the primary has already answered and closed.
        let _ = stream.write_all(bytes);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let garbage = ask(b"\xff\xfe not json\n");
    assert!(garbage.starts_with("{\"error\":"), "{garbage}");
    let unknown = ask(b"{\"command\":\"explode\"}\n");
    assert!(unknown.contains("unknown variant"), "{unknown}");
    let huge = vec![b'x'; 200 * 1024];
    let oversized = ask(&huge);
    assert!(oversized.contains("longer than"), "{oversized}");
    // A client that never finishes its request does not hold anything up.
    let mut half = UnixStream::connect(&control).unwrap();
    half.write_all(b"{\"command\":").unwrap();
    let mut many = Vec::new();
    for _ in 0..10 {
        many.push(UnixStream::connect(&control).unwrap());
    }
    let status = status_json(&run);
    assert_eq!(worker_pids(&status, "app").len(), 1);
    drop(half);
    drop(many);
    assert_eq!(run.cluster.try_exit_status(), None);
}

/// Reliability issue, part 3: a thousand connections that send nothing do not keep the owner
/// out, and each is dropped once its request is overdue.
#[test]
fn a_thousand_idle_connections_neither_lock_out_status_nor_stay_forever() {
    let mut run = Run::start(&["run", "-w", "1", "--", &test_worker()]);
    run.wait_ready(1);
    let control = run.control();
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&control).expect("connecting"))
        .collect();
    let status = status_json(&run);
    assert_eq!(worker_pids(&status, "app").len(), 1, "{status}");
    let stopped = run.client(&["scale", "app", "2"]).ok();
    assert!(stopped.contains("scaled from 1 to 2"), "{stopped}");
    // Each idle client is told why and closed, within the request deadline (2 s).
    for mut stream in idle.into_iter().step_by(100) {
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("the primary closes it");
        assert!(answer.contains("no complete request within"), "{answer}");
    }
    run.stop();
}

#[test]
fn a_client_of_another_user_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    let run = Run::start(&["run", "-w", "1", "--", &test_worker()]);
    run.wait_ready(1);
    let control = run.control();
    // Open the way to the socket, so that ustad's own check (SO_PEERCRED) is what refuses.
    let dir = control.parent().unwrap();
    std::fs::set_permissions(run.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let ustad = crate::util::ustad().to_str().unwrap().to_owned();
    let control_arg = control.to_str().unwrap().to_owned();
    let status_as_nobody = || {
        run_in(
            std::path::Path::new("/"),
            std::path::Path::new("setpriv"),
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &ustad,
                "status",
                "--control",
                &control_arg,
            ],
            &[],
        )
    };
    let out = status_as_nobody();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("permission denied"), "{out:?}");
    assert!(out.stderr.contains("only that user and root"), "{out:?}");
    let refused = run.cluster.wait_event(|e| e.is("control_refused"), TIMEOUT);
    assert_eq!(refused.u64("uid"), Some(65534));
    // With the socket's own mode (0600), the kernel refuses the connection already.
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = status_as_nobody();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("Permission denied"), "{out:?}");
    // The owner still gets in.
    assert_eq!(worker_pids(&status_json(&run), "app").len(), 1);
}

#[test]
fn reload_wait_fails_when_a_roll_stops_and_the_old_workers_keep_serving() {
    let worker = test_worker();
    let pool = |extra: &str| {
        format!(
            "[pools.web]\ncommand = [\"{worker}\"{extra}]\nsize = 2\nready = \"notify\"\nready_timeout = \"500ms\"\n"
        )
    };
    let run = Run::with_config(&pool(""));
    let old: Vec<u32> = run.wait_ready(2).iter().map(pid).collect();
    std::fs::write(run.path("ustad.toml"), pool(", \"--never-ready\"")).unwrap();
    let out = run.client(&["reload", "--wait"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("rolling restart of pool web stopped"),
        "{out:?}"
    );
    let mut serving: Vec<u32> = worker_pids(&status_json(&run), "web")
        .into_iter()
        .map(|p| p as u32)
        .collect();
    serving.sort_unstable();
    let mut old = old;
    old.sort_unstable();
    assert_eq!(serving, old);
}

#[test]
fn a_worker_above_max_memory_is_replaced_rolling() {
    // python3 holds ~80 MiB of touched memory; the limit is 40 MiB.
    let script =
        "import time\nb = b'x' * (80 << 20)\nprint('allocated', flush=True)\ntime.sleep(1000)\n";
    let run = Run::start(&[
        "run",
        "--max-memory",
        "40MiB",
        "--ready",
        "delay:200ms",
        "--",
        "python3",
        "-c",
        script,
    ]);
    let first = run.wait_ready(1);
    let over = run.cluster.wait_event(|e| e.is("over_memory"), TIMEOUT);
    assert_eq!(over.u64("id"), first[0].u64("id"));
    assert!(over.u64("rss").unwrap() > 40 << 20);
    assert_eq!(over.u64("limit"), Some(40 << 20));
    // Rolling: the replacement is ready before the old one is asked to stop.
    let stopping = run.cluster.wait_event(
        |e| e.is("stopping") && e.str("reason") == Some("memory"),
        TIMEOUT,
    );
    assert_eq!(stopping.u64("pid"), first[0].u64("pid"));
    let events = run.cluster.events();
    let ready_second = events
        .iter()
        .position(|e| e.is("ready") && e.u64("id") == Some(2))
        .expect("the replacement became ready");
    let stop = events.iter().position(|e| e.is("stopping")).unwrap();
    assert!(ready_second < stop);
}

#[test]
fn a_worker_that_stops_answering_its_watchdog_is_killed_as_hung_and_replaced() {
    let run = Run::start(&[
        "run",
        "--watchdog",
        "500ms",
        "--ready",
        "notify",
        "--restart-delay",
        "10ms",
        "--",
        &test_worker(),
        "--notify",
        "WATCHDOG=1",
        "--env-report",
        "WATCHDOG_USEC",
        "--report",
        "report-{id}.json",
    ]);
    let first = run.wait_ready(1);
    let report = ustad_testkit::report::WorkerReport::wait_for(&run.path("report-1.json"), TIMEOUT);
    assert_eq!(
        report
            .env
            .get("WATCHDOG_USEC")
            .cloned()
            .flatten()
            .as_deref(),
        Some("500000")
    );
    let hung = run.cluster.wait_event(|e| e.is("hung"), TIMEOUT);
    assert_eq!(hung.u64("pid"), first[0].u64("pid"));
    let exited = run.cluster.wait_event(
        |e| e.is("exited") && e.str("reason") == Some("watchdog"),
        TIMEOUT,
    );
    // test-worker does not handle SIGABRT: the default action ends it.
    assert_eq!(exited.i64("signal"), Some(6));
    run.cluster
        .wait_event(|e| e.is("ready") && e.u64("id") == Some(2), TIMEOUT);
}

#[test]
fn reload_binds_added_sockets_and_closes_removed_ones_after_their_last_worker() {
    let worker = test_worker();
    let web = format!(
        "[sockets.http]\nlisten = \"127.0.0.1:0\"\n\n[pools.web]\ncommand = [\"{worker}\", \"--serve-http\"]\nsockets = [\"http\"]\nready = \"notify\"\n"
    );
    let admin = format!(
        "[sockets.admin]\nlisten = \"127.0.0.1:0\"\n\n[pools.admin]\ncommand = [\"{worker}\", \"--serve-http\"]\nsockets = [\"admin\"]\nready = \"notify\"\n"
    );
    let run = Run::with_config(&web);
    run.wait_ready(1);
    std::fs::write(run.path("ustad.toml"), format!("{web}\n{admin}")).unwrap();
    let out = run.client(&["reload", "admin", "--wait"]).ok();
    assert!(out.contains("socket admin added"), "{out}");
    let address = run.addr("admin");
    let (code, headers, _) = ustad_testkit::load::get(address).expect("the new socket serves");
    assert_eq!(code, 200);
    let admin_pid: u64 = headers["x-worker-pid"].parse().unwrap();
    assert!(worker_pids(&status_json(&run), "admin").contains(&admin_pid));

    // Removed: its pool stops, then the socket is closed and refuses connections.
    std::fs::write(run.path("ustad.toml"), &web).unwrap();
    let out = run.client(&["reload", "web", "--wait"]).ok();
    assert!(out.contains("rolling restart finished: web"), "{out}");
    let closed = run.cluster.wait_event(|e| e.is("socket_closed"), TIMEOUT);
    assert_eq!(closed.str("socket"), Some("admin"));
    let refused = std::net::TcpStream::connect(address).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // Closed only once the admin worker had exited.
    let events = run.cluster.events();
    let exited = events
        .iter()
        .position(|e| e.is("exited") && e.str("pool") == Some("admin"))
        .unwrap();
    let closed_at = events.iter().position(|e| e.is("socket_closed")).unwrap();
    assert!(exited < closed_at);
    let (code, _, _) = ustad_testkit::load::get(run.addr("http")).unwrap();
    assert_eq!(code, 200);
}
