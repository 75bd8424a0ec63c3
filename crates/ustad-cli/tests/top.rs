//! `ustad top` on a real terminal: tmux runs it in a detached session of a known size, the
//! test reads the screen with `capture-pane` and types with `send-keys`.
//!
//! Each test has a tmux server of its own, on a socket in its temp dir (`-S`, which also leaves
//! no socket file behind in `/tmp/tmux-UID`) and with no config file, killed when the test ends:
//! no other tmux server is touched. `top` runs under `sh -c` that writes
//! its exit code and stderr to files in the test's temp dir: the session ends with it, and the
//! test still learns how it ended.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use ustad_testkit::Signal;

use crate::util::{Run, TIMEOUT, pid, test_worker, ustad};

/// A tmux server of the test's own, running one command in one detached session.
struct Tmux {
    socket: PathBuf,
    session: &'static str,
}

impl Tmux {
    /// Whether tmux can be run here. Without it the tests are skipped, except on CI, which
    /// installs it (`.ci/run`) and where a skip would hide a missing install step.
    fn available() -> bool {
        let found = Command::new("tmux")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "tmux is missing on CI: .ci/run should install it"
            );
            eprintln!("skipped: tmux is not installed (apt-get install tmux)");
        }
        found
    }

    /// Starts `command` (a shell command line) on a `width`×`height` terminal, with the
    /// server's socket in `dir`.
    fn start(dir: &Path, command: &str, width: u16, height: u16) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
            session: "top",
        };
        let (width, height) = (width.to_string(), height.to_string());
        let output = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            tmux.session,
            "-x",
            &width,
            "-y",
            &height,
            command,
        ]);
        assert!(output.status.success(), "tmux new-session: {output:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"])
            .args(args)
            // Not a client of a tmux server this test may be running in.
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .output()
            .expect("running tmux")
    }

    /// The text on the screen now (empty once the session has ended).
    fn screen(&self) -> String {
        let output = self.run(&["capture-pane", "-p", "-t", self.session]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The screen now with its colours and attributes, as escape sequences.
    fn styled_screen(&self) -> String {
        let output = self.run(&["capture-pane", "-p", "-e", "-t", self.session]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until the screen satisfies `done`, and returns it.
    #[track_caller]
    fn wait_screen(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}; it shows:\n{screen}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &str) {
        let output = self.run(&["send-keys", "-t", self.session, keys]);
        assert!(output.status.success(), "tmux send-keys: {output:?}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Gone already when the session ended with `top`: then this fails, quietly.
        let _ = self.run(&["kill-server"]);
    }
}

/// `ustad top` on the cluster listening at `control`, leaving its exit code and stderr in
/// `dir`.
struct Top {
    tmux: Tmux,
    dir: PathBuf,
}

impl Top {
    fn start(dir: &Path, control: &Path) -> Top {
        Top::start_with(dir, control, "")
    }

    /// With more flags for `top`. Its pid goes to `top.pid`; once it has exited, what `stty`
    /// says of the terminal goes to `top.stty` (raw mode left on shows as `-icanon -echo`).
    fn start_with(dir: &Path, control: &Path, flags: &str) -> Top {
        let command = format!(
            "sh -c 'echo $$ >{pid}; exec {ustad} top --control {control} {flags}' 2>{err}; echo $? >{code}; stty -a >{stty}; sleep 60",
            pid = quote(&dir.join("top.pid")),
            ustad = quote(ustad()),
            control = quote(control),
            err = quote(&dir.join("top.err")),
            code = quote(&dir.join("top.code")),
            stty = quote(&dir.join("top.stty")),
        );
        Top {
            tmux: Tmux::start(dir, &command, 160, 40),
            dir: dir.to_owned(),
        }
    }

    /// Waits for `top` to exit: its exit code and stderr.
    #[track_caller]
    fn wait_exit(&self) -> (i32, String) {
        let path = self.dir.join("top.code");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            // Complete once the shell's `echo` wrote the line.
            let code = std::fs::read_to_string(&path).unwrap_or_default();
            if code.ends_with('\n') {
                let stderr = std::fs::read_to_string(self.dir.join("top.err")).unwrap_or_default();
                let code = code.trim().parse().expect("an exit code");
                return (code, stderr);
            }
            assert!(
                Instant::now() < deadline,
                "`ustad top` did not exit; the screen shows:\n{}",
                self.tmux.screen()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn quote(path: &Path) -> String {
    let text = path.to_str().expect("a UTF-8 path");
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Two ready workers that say what they do, under a control socket at a known path.
fn cluster(control: &Path) -> (Run, Vec<u32>) {
    let worker = test_worker();
    let run = Run::start(&[
        "run",
        "--control",
        control.to_str().expect("a UTF-8 path"),
        "-w",
        "2",
        "--restart-delay",
        "100ms",
        "--ready",
        "notify",
        "--",
        &worker,
        "--notify",
        "STATUS=serving from the test",
    ]);
    let pids = run.wait_ready(2).iter().map(pid).collect();
    (run, pids)
}

#[test]
fn top_shows_pools_workers_and_events_and_quits_on_q() {
    if !Tmux::available() {
        return;
    }
    let dir = TempDir::new().expect("temp dir");
    let control = dir.path().join("control.sock");
    let (run, pids) = cluster(&control);
    let top = Top::start(dir.path(), &control);

    let screen = top
        .tmux
        .wait_screen("both workers, ready, with their status", |screen| {
            pids.iter().all(|pid| screen.contains(&pid.to_string()))
                && screen.matches("serving from the test").count() >= 2
        });
    let primary = run.cluster.pid();
    assert!(
        screen.contains(&format!("ustad app  pid {primary}  up ")),
        "{screen}"
    );
    assert!(screen.contains("app  2/2 ready  size 2"), "{screen}");
    assert!(screen.contains("PID  STATE"), "{screen}");
    for pid in &pids {
        let row = screen
            .lines()
            .find(|line| line.contains(&pid.to_string()))
            .unwrap();
        assert!(row.contains(" ready "), "{row}");
        assert!(row.contains(" MiB"), "RSS in human units: {row}");
    }

    // What happens next shows up as events, and in the table.
    let victim = pids[0];
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim as i32).expect("a pid"),
        Signal::KILL,
    )
    .expect("killing a worker");
    let screen = top
        .tmux
        .wait_screen("the crash, in the table and the events", |s| {
            s.contains("restarts 1 (crash 1)")
                && s.contains("crash: SIGKILL")
                && s.contains("exited ")
        });
    assert!(screen.contains("Recent events"), "{screen}");
    assert!(screen.contains("restarts 1 (crash 1)"), "{screen}");

    top.tmux.keys("q");
    let (code, stderr) = top.wait_exit();
    assert_eq!(
        code, 0,
        "exit code of `ustad top` after q; stderr:\n{stderr}"
    );
    assert_eq!(stderr, "");
}

#[test]
fn top_gives_the_terminal_back_when_killed_with_sigterm_and_honours_color_never() {
    if !Tmux::available() {
        return;
    }
    let dir = TempDir::new().expect("temp dir");
    let control = dir.path().join("control.sock");
    let (_run, pids) = cluster(&control);
    let top = Top::start_with(dir.path(), &control, "--color never");
    top.tmux.wait_screen("both workers", |screen| {
        pids.iter().all(|pid| screen.contains(&pid.to_string()))
    });
    // --color never: attributes only (bold, dim, reverse), no colour.
    let styled = top.tmux.styled_screen();
    let colours: Vec<u32> = styled
        .split("\x1b[")
        .skip(1)
        .filter_map(|sequence| sequence.split_once('m').map(|(codes, _)| codes))
        .flat_map(|codes| codes.split(';').filter_map(|code| code.parse().ok()))
        // Foreground and background colours; 39 and 49 are the defaults.
        .filter(|code| matches!(code, 30..=38 | 40..=48 | 90..=97 | 100..=107))
        .collect();
    assert!(
        colours.is_empty(),
        "colours {colours:?} with --color never:\n{styled:?}"
    );
    let pid: i32 = std::fs::read_to_string(dir.path().join("top.pid"))
        .expect("top's pid")
        .trim()
        .parse()
        .expect("a pid");
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), Signal::TERM)
        .expect("SIGTERM to top");
    let (code, stderr) = top.wait_exit();
    assert_eq!(code, 0, "{stderr}");
    // The terminal is given back: cooked mode, echo on.
    let deadline = Instant::now() + TIMEOUT;
    let stty = loop {
        let stty = std::fs::read_to_string(dir.path().join("top.stty")).unwrap_or_default();
        if stty.contains("icanon") {
            break stty;
        }
        assert!(Instant::now() < deadline, "stty never ran");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !stty.contains("-icanon") && !stty.contains("-echo "),
        "{stty}"
    );
}

#[test]
fn top_says_that_the_primary_is_gone_and_exits_non_zero() {
    if !Tmux::available() {
        return;
    }
    let dir = TempDir::new().expect("temp dir");
    let control = dir.path().join("control.sock");
    let (mut run, pids) = cluster(&control);
    let top = Top::start(dir.path(), &control);
    top.tmux.wait_screen("the workers", |screen| {
        pids.iter().all(|pid| screen.contains(&pid.to_string()))
    });

    let primary = run.cluster.pid();
    run.stop();
    let gone = format!("ustad (pid {primary}) is gone");
    top.tmux
        .wait_screen("that the primary is gone", |s| s.contains(&gone));
    // Without a key: it leaves by itself, a moment later.
    let (code, stderr) = top.wait_exit();
    assert_ne!(code, 0, "stderr:\n{stderr}");
    assert!(stderr.contains(&gone), "{stderr}");
}

#[test]
fn top_without_a_terminal_points_to_status() {
    let dir = TempDir::new().expect("temp dir");
    let output = Command::new(ustad())
        .args(["top", "--control"])
        .arg(dir.path().join("nothing.sock"))
        .stdin(Stdio::null())
        .output()
        .expect("running ustad top");
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not one"), "{stderr}");
    assert!(stderr.contains("`ustad status`"), "{stderr}");
}
