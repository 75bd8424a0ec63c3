//! Bad configuration and bad flags stop ustad before anything starts: exit 2, with the file,
//! line and column (or the flag). A socket that cannot be bound: exit 1, naming the address.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use ustad_testkit::process::ProcessGuard;

use crate::util::{TIMEOUT, ustad};

/// Runs `ustad <args>` in `dir` to completion; returns (exit code, stdout, stderr).
fn ustad_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(ustad());
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ProcessGuard::spawn(&mut command).expect("spawning ustad");
    let mut stdout = guard.child_mut().stdout.take().unwrap();
    let mut stderr = guard.child_mut().stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).ok();
        text
    });
    let mut out = String::new();
    stdout.read_to_string(&mut out).ok();
    let status = guard.wait_timeout(TIMEOUT).expect("ustad finished");
    (status.code().unwrap_or(-1), out, err_reader.join().unwrap())
}

const BAD_CONFIGS: &[(&str, &str, &str)] = &[
    (
        "unknown key",
        "[pools.web]\ncommand = [\"x\"]\nsizee = 2\n",
        "ustad.toml:3:1: unknown field `sizee`",
    ),
    (
        "bad duration",
        "kill_timeout = \"3 fortnights\"\n[pools.web]\ncommand = [\"x\"]\n",
        "ustad.toml:1:16: invalid duration",
    ),
    (
        "unknown socket",
        "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[pools.web]\ncommand = [\"x\"]\nsockets = [\"htp\"]\n",
        "ustad.toml:5:12: unknown socket `htp` (defined sockets: http)",
    ),
    (
        "empty command",
        "[pools.web]\ncommand = []\n",
        "ustad.toml:2:11: the command is empty",
    ),
    (
        "negative size",
        "[pools.web]\ncommand = [\"x\"]\nsize = -1\n",
        "ustad.toml:3:8: size must be 0 or more",
    ),
    (
        "duplicate listen address",
        "[sockets.a]\nlisten = \"127.0.0.1:7000\"\n[sockets.b]\nlisten = \"127.0.0.1:7000\"\n[pools.web]\ncommand = [\"x\"]\n",
        "ustad.toml:4:10: `127.0.0.1:7000` is already used by socket `a`",
    ),
    ("not toml", "[pools.web\n", "ustad.toml:1:"),
];

#[test]
fn every_bad_config_exits_2_with_file_line_and_column_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (case, text, expected) in BAD_CONFIGS {
        std::fs::write(dir.path().join("ustad.toml"), text).unwrap();
        for command in ["run", "check"] {
            let (code, stdout, stderr) = ustad_in(dir.path(), &[command, "ustad.toml"]);
            assert_eq!(code, 2, "{case} ({command}): exit code; stderr:\n{stderr}");
            assert!(
                stderr.contains(expected),
                "{case} ({command}): expected `{expected}` in:\n{stderr}"
            );
            assert!(
                !stderr.contains("spawned") && stdout.is_empty(),
                "{case}: something started:\n{stderr}"
            );
        }
    }
}

#[test]
fn check_accepts_a_good_config_and_summarises_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[sockets.http]\nlisten = \"127.0.0.1:0\"\n[pools.web]\ncommand = [\"sh\"]\nsize = 4\nsockets = [\"http\"]\n[pools.jobs]\ncommand = \"sh -c true\"\n";
    std::fs::write(dir.path().join("ustad.toml"), text).unwrap();
    let (code, stdout, stderr) = ustad_in(dir.path(), &["check", "ustad.toml"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "ustad.toml: ok (1 socket, 2 pools: web ×4, jobs ×1)"
    );
}

#[test]
fn bad_flags_exit_2_and_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "-w", "many", "--", "sh"], "--workers"),
        (
            &["run", "-l", "localhost:80", "--", "sh"],
            "--listen localhost:80",
        ),
        (&["run", "--ready", "sometimes", "--", "sh"], "--ready"),
        (
            &["run", "--kill-timeout", "30", "--", "sh"],
            "--kill-timeout",
        ),
        (
            &["run", "ustad.toml", "-w", "2"],
            "--workers cannot be combined with a config file",
        ),
        (
            &["run", "app.toml", "node"],
            "a config file takes no command",
        ),
    ];
    for (args, expected) in cases {
        let (code, _, stderr) = ustad_in(dir.path(), args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected `{expected}` in:\n{stderr}"
        );
    }
}

#[test]
fn an_address_in_use_exits_1_naming_it_before_any_worker_starts() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let script = format!("touch {}", marker.display());
    let (code, _, stderr) = ustad_in(
        dir.path(),
        &["run", "-l", &address, "--", "sh", "-c", &script],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {address}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("Address already in use") || stderr.contains("in use"),
        "{stderr}"
    );
    assert!(!marker.exists(), "a worker was started");
}
