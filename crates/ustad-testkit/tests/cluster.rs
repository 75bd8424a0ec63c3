//! The `Cluster` fixture, against a shell script that logs like the primary.

use std::path::Path;
use std::time::{Duration, Instant};

use ustad_testkit::Signal;
use ustad_testkit::cluster::Cluster;

const T: Duration = Duration::from_secs(20);

fn fake_ustad() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fake-ustad"
    ))
}

#[test]
fn events_lines_and_a_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(fake_ustad(), &["run", "-w", "2"], dir.path());

    assert_eq!(
        cluster.listen_addr("web"),
        "127.0.0.1:4242".parse().unwrap()
    );
    let ready = cluster.wait_events(|e| e.is("ready"), 2, T);
    assert_eq!(ready[0].u64("pid"), Some(123), "nested under fields");
    assert_eq!(ready[0].str("id"), Some("web.0"));
    assert_eq!(ready[1].u64("pid"), Some(124), "a number in a string");
    cluster.wait_stdout_line(|l| l == "plain stdout line", T);
    cluster.wait_stderr_line(|l| l.starts_with("web.0 | "), T);
    // The relayed line is not JSON: a line, not an event.
    assert!(cluster.events().iter().all(|e| !e.event().is_empty()));

    let mark = cluster.event_count();
    cluster.signal(Signal::TERM).unwrap();
    let shutdown = cluster.wait_event_since(mark, |e| e.is("shutdown"), T);
    assert_eq!(shutdown.bool("graceful"), Some(true));
    let status = cluster.wait_exit(T);
    assert!(status.success());
    assert!(cluster.events().last().unwrap().is("stopped"));
    let args = std::fs::read_to_string(dir.path().join("args.txt")).unwrap();
    assert_eq!(args.trim(), "--log-format json run -w 2");
}

#[test]
fn waiting_fails_fast_once_the_primary_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(fake_ustad(), &["exit-now"], dir.path());
    let started = Instant::now();
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cluster.wait_event(|e| e.is("listening"), Duration::from_secs(60))
    }));
    let message = *waited.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("stderr closed"), "{message}");
    assert!(
        message.contains("bad config"),
        "quotes the stderr tail: {message}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(cluster.wait_exit(T).code(), Some(3));
}
