//! Where workers' output goes: log files rotated by size with nothing lost or split, reopened on
//! SIGUSR1 after an outside rotator, and `inherit`; and the level of ustad's own log.

use std::path::Path;
use std::time::{Duration, Instant};

use ustad_testkit::Signal;
use ustad_testkit::cluster::Cluster;

use crate::util::{Run, TIMEOUT};

/// Every file of a rotated log, oldest first: `app.log.N` … `app.log.1`, `app.log`.
fn rotated(dir: &Path, name: &str) -> Vec<String> {
    let mut numbered: Vec<(u32, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| {
            let file = entry.unwrap().file_name().into_string().ok()?;
            let n = file.strip_prefix(&format!("{name}."))?.parse().ok()?;
            Some((n, file))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    numbered
        .into_iter()
        .map(|(_, file)| file)
        .chain(std::iter::once(name.to_owned()))
        .collect()
}

/// Waits until the lines of `files` (in order) end with `last`.
fn wait_for_line(dir: &Path, files: impl Fn() -> Vec<String>, last: &str) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let lines: Vec<String> = files()
            .iter()
            .flat_map(|file| {
                std::fs::read_to_string(dir.join(file))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        if lines.last().is_some_and(|line| line.ends_with(last)) {
            return lines;
        }
        assert!(Instant::now() < deadline, "never saw {last:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_fast_writer_rotated_by_size_loses_no_line_and_splits_none() {
    const LINES: usize = 20_000;
    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do echo \"line $i of a worker that writes fast\"; i=$((i+1)); done; exec sleep 100"
    );
    let run = Run::start(&[
        "run",
        "--stdout",
        "file:app.log",
        "--log-max-size",
        "64KiB",
        "--log-keep",
        "100",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let dir = run.dir.path().to_owned();
    let lines = wait_for_line(
        &dir,
        || rotated(&dir, "app.log"),
        &format!("line {} of a worker that writes fast", LINES - 1),
    );
    let files = rotated(&dir, "app.log");
    assert!(files.len() > 10, "rotated at 64 KiB: {files:?}");
    for file in &files {
        let size = std::fs::metadata(dir.join(file)).unwrap().len();
        assert!(size <= 64 * 1024, "{file} is {size} bytes");
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.ends_with('\n'), "{file} ends inside a line");
    }
    assert_eq!(lines.len(), LINES, "every line once");
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(
            line,
            &format!("app.0 | line {n} of a worker that writes fast")
        );
    }
    // `ustad logs` still shows the recent lines.
    let recent = run.client(&["logs", "-n", "3"]).ok();
    assert!(
        recent.contains(&format!("line {} of a worker", LINES - 1)),
        "{recent}"
    );
    let mut run = run;
    run.stop();
}

#[test]
fn sigusr1_reopens_a_log_file_an_outside_rotator_renamed() {
    // The worker writes a line each time the test writes one to its FIFO.
    let fifos = tempfile::tempdir().unwrap();
    let fifo = fifos.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let script = format!(
        "exec 0<'{}'; i=0; while read go; do echo \"tick $i\"; i=$((i+1)); done",
        fifo.display()
    );
    let run = Run::start(&["run", "--stdout", "file:app.log", "--", "sh", "-c", &script]);
    let dir = run.dir.path().to_owned();
    let mut feed = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut tick = |n: usize| {
        std::io::Write::write_all(&mut feed, b"go\n").unwrap();
        wait_for_line(&dir, || vec!["app.log".into()], &format!("tick {n}"))
    };
    tick(0);
    tick(1);
    // logrotate's way: rename, then tell the program to reopen.
    std::fs::rename(dir.join("app.log"), dir.join("app.log.old")).unwrap();
    run.cluster.signal(Signal::USR1).unwrap();
    run.cluster.wait_event(
        |e| e.is("signal") && e.str("signal") == Some("SIGUSR1"),
        TIMEOUT,
    );
    let after = tick(2);
    assert_eq!(after, ["app.0 | tick 2"], "a new file");
    let before = std::fs::read_to_string(dir.join("app.log.old")).unwrap();
    assert_eq!(
        before, "app.0 | tick 0\napp.0 | tick 1\n",
        "the renamed one kept the rest"
    );
    let mut run = run;
    run.stop();
}

#[test]
fn inherit_hands_the_primarys_stdout_to_the_worker() {
    let mut run = Run::start(&[
        "run",
        "--stdout",
        "inherit",
        "--",
        "sh",
        "-c",
        "echo straight from the worker; exec sleep 100",
    ]);
    let line = run
        .cluster
        .wait_stdout_line(|line| line.contains("straight from the worker"), TIMEOUT);
    assert_eq!(line, "straight from the worker", "no prefix: not relayed");
    run.stop();
}

#[test]
fn a_worker_over_its_log_rate_limit_has_the_rest_dropped_and_counted() {
    // 1,000 lines at once, then the worker exits (oneshot: not run again): its pipes close, so
    // the count of what was dropped is written then.
    let mut run = Run::with_config(
        r#"
[pools.chatty]
command = ["sh", "-c", "seq 1 1000"]
oneshot = true
log_rate_limit = "100/1h"
"#,
    );
    let suppressed = run
        .cluster
        .wait_event(|e| e.is("output_suppressed"), TIMEOUT);
    assert_eq!(suppressed.u64("lines"), Some(900), "{suppressed}");
    assert_eq!(suppressed.str("pool"), Some("chatty"));
    // The relay keeps a line for `ustad logs` before it prints it, on the stream of the pipe
    // that closed first.
    let deadline = Instant::now() + TIMEOUT;
    while !run
        .cluster
        .stdout_lines()
        .iter()
        .chain(&run.cluster.stderr_lines())
        .any(|line| line.contains("900 lines dropped here"))
    {
        assert!(Instant::now() < deadline, "the count was never printed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = run.client(&["logs", "chatty", "-n", "2000"]).ok();
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 101, "{logs}");
    assert!(lines[0].ends_with("| 1"), "{logs}");
    assert!(lines[99].ends_with("| 100"), "{logs}");
    assert!(
        lines[100].ends_with("ustad: 900 lines dropped here (log_rate_limit 100/1h)"),
        "{logs}"
    );
    run.stop();
}

#[test]
fn ustad_log_sets_the_level_of_ustads_own_log_and_per_target() {
    // The `preload` event is the binary's (target `ustad`), at debug level, before any `ready`.
    for (directives, shown) in [
        ("debug", true),
        ("debug,ustad=info", false),
        ("info", false),
    ] {
        let dir = tempfile::tempdir().expect("a temp dir");
        let args = [
            "run",
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--ready",
            "none",
            "--",
            "sleep",
            "100",
        ];
        let mut run = Run {
            cluster: Cluster::start_with_env(
                crate::util::ustad(),
                &args,
                dir.path(),
                &[("USTAD_LOG", directives)],
            ),
            dir,
        };
        run.wait_ready(1);
        let events = run.cluster.events();
        let preload = events.iter().find(|e| e.is("preload"));
        assert_eq!(
            preload.is_some(),
            shown,
            "USTAD_LOG={directives}: {events:?}"
        );
        if let Some(event) = preload {
            assert_eq!(event.str("level"), Some("DEBUG"), "{event}");
        }
        run.stop();
    }
}
