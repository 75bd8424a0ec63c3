//! The library's primary side against real workers: requests with timeouts and dying workers,
//! round-robin by tag, messages both ways, and a flood that memory survives.
//!
//! The test process is the primary; its `jobs` pool runs the `pools` example, whose `jobs`
//! workers answer `echo`, `sleep` and `flood` requests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use ustad::{Cluster, Event, Pool, Primary, RequestError, WorkerRef};

const TIMEOUT: Duration = Duration::from_secs(30);

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("examples").join(name)
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Report {
    Tick { n: u64 },
    Flooded { n: u64 },
    Done { job: String, by: u64 },
    Echoed { value: serde_json::Value, by: u64 },
}

/// A cluster of `size` jobs workers, all ready, with its event stream.
async fn jobs(
    test: &str,
    size: usize,
) -> (Cluster, tokio::sync::mpsc::Receiver<Event>, Vec<WorkerRef>) {
    let pool = Pool::new(size)
        .command([example("pools").to_string_lossy().into_owned()])
        .restart_delay(Duration::from_millis(50));
    let name = format!("ustad-library-{test}-{}", std::process::id());
    let cluster = Primary::new()
        .name(&name)
        .pool("jobs", pool)
        .start()
        .expect("cluster starts");
    let mut events = cluster.events().expect("first call");
    let mut ready = Vec::new();
    // Each worker's life up to `ready`, as events tell it: spawned, then online, then ready.
    let mut lives: BTreeMap<u64, Vec<&'static str>> = BTreeMap::new();
    while ready.len() < size {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(event)) => {
                if let Some((id, kind)) = kind_of(&event) {
                    lives.entry(id).or_default().push(kind);
                }
                if let Event::Ready(worker) = event {
                    ready.push(worker);
                }
            }
            other => panic!("workers did not get ready: {other:?}"),
        }
    }
    for worker in &ready {
        assert_eq!(
            lives[&worker.id.0],
            ["spawned", "online", "ready"],
            "worker {} up to ready",
            worker.id
        );
    }
    ready.sort_by_key(|w| w.slot);
    (cluster, events, ready)
}

fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_time_out_and_fail_when_their_worker_dies() {
    let (cluster, _events, workers) = jobs("requests", 2).await;
    let (a, b) = (&workers[0], &workers[1]);

    let echoed: Report = cluster
        .request(a.id, &json!({"type": "echo", "value": [1, 2]}), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        echoed,
        Report::Echoed {
            value: json!([1, 2]),
            by: a.id.0
        }
    );

    let slow = cluster
        .request::<_, Report>(
            b.id,
            &json!({"type": "sleep", "ms": 5000}),
            Duration::from_millis(200),
        )
        .await;
    assert_eq!(slow, Err(RequestError::Timeout(Duration::from_millis(200))));

    let failed = cluster
        .request::<_, Report>(a.id, &json!({"type": "dance"}), TIMEOUT)
        .await;
    assert!(
        matches!(failed, Err(RequestError::Failed(ref why)) if why.contains("unknown job")),
        "{failed:?}"
    );

    // A request in flight when its worker is SIGKILLed fails at once, not at its timeout.
    let started = std::time::Instant::now();
    let long_sleep = json!({"type": "sleep", "ms": 20000});
    let pending = cluster.request::<_, Report>(a.id, &long_sleep, TIMEOUT);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        kill(a.pid);
    };
    let (result, ()) = tokio::join!(pending, killer);
    assert_eq!(result, Err(RequestError::WorkerGone(a.id.0)));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The other worker is untouched.
    let echoed: Report = cluster
        .request(
            b.id,
            &json!({"type": "echo", "value": "still here"}),
            TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(
        echoed,
        Report::Echoed {
            value: json!("still here"),
            by: b.id.0
        }
    );
    cluster.stop(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_rotates_per_tag_over_ready_workers_only() {
    let (cluster, mut events, workers) = jobs("round-robin", 3).await;
    let ids: Vec<u64> = workers.iter().map(|w| w.id.0).collect();
    let picks = |tag: &str, n: usize| -> Vec<u64> {
        (0..n)
            .map(|_| cluster.round_robin("jobs", tag).unwrap().id.0)
            .collect()
    };
    // Exact rotation, in slot order, for each tag on its own.
    let a = picks("a", 7);
    assert_eq!(a, [ids[0], ids[1], ids[2], ids[0], ids[1], ids[2], ids[0]]);
    assert_eq!(picks("b", 2), [ids[0], ids[1]]);
    assert_eq!(picks("a", 2), [ids[1], ids[2]]);

    // Shrinking stops slot 2: from then on it is skipped.
    cluster.scale("jobs", 2).await.unwrap();
    loop {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(Event::Stopping { worker, .. })) => {
                assert_eq!(worker.slot, 2);
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no stopping event: {other:?}"),
        }
    }
    let after = picks("a", 4);
    assert!(!after.contains(&ids[2]), "{after:?}");
    let mut counts = BTreeMap::new();
    for id in &after {
        *counts.entry(*id).or_insert(0) += 1;
    }
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [2, 2]);
    assert!(cluster.round_robin("nope", "a").is_none());
    cluster.stop(None).await.unwrap();
}

/// What an event is, and of which worker.
fn kind_of(event: &Event) -> Option<(u64, &'static str)> {
    let (worker, kind) = match event {
        Event::Spawned(worker) => (worker, "spawned"),
        Event::Online(worker) => (worker, "online"),
        Event::Ready(worker) => (worker, "ready"),
        Event::Message { worker, .. } => (worker, "message"),
        Event::Request { worker, .. } => (worker, "request"),
        Event::Stopping { worker, .. } => (worker, "stopping"),
        Event::Disconnected(worker) => (worker, "disconnected"),
        Event::Exited { worker, .. } => (worker, "exited"),
        _ => return None,
    };
    Some((worker.id.0, kind))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_is_spawned_online_ready_stopping_and_exited_in_that_order() {
    let (cluster, mut events, workers) = jobs("lifecycle", 2).await;
    cluster.stop(None).await.unwrap();
    let mut seen: BTreeMap<u64, Vec<&'static str>> = BTreeMap::new();
    // `jobs` read up to the workers' `ready`: the stream still holds the rest, and it ends
    // once the cluster has stopped.
    let mut rest = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(TIMEOUT, events.recv()).await {
        rest.push(event);
    }
    for worker in &workers {
        seen.insert(worker.id.0, vec!["spawned", "online", "ready"]);
    }
    for (id, kind) in rest.iter().filter_map(kind_of) {
        seen.entry(id).or_default().push(kind);
    }
    for worker in &workers {
        assert_eq!(
            seen[&worker.id.0],
            [
                "spawned",
                "online",
                "ready",
                "stopping",
                "disconnected",
                "exited"
            ],
            "the life of worker {}",
            worker.id
        );
    }
    assert_eq!(seen.len(), 2, "no other worker: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_at_a_time_kill_disconnect_and_lookups() {
    let (cluster, mut events, workers) = jobs("one-at-a-time", 2).await;
    let (first, second) = (&workers[0], &workers[1]);
    // Every live worker, with its state; a lookup by id.
    let live = cluster.live_workers(None);
    assert_eq!(live.len(), 2);
    assert!(
        live.iter()
            .all(|w| w.state == ustad::WorkerState::Ready && w.connected)
    );
    let info = cluster.worker(first.id).expect("alive");
    assert_eq!(info.worker, *first);
    // kill: the signal ends it; a serving worker that dies is replaced at once.
    cluster.kill(first.id, "SIGKILL").await.expect("killed");
    let mut replaced = None;
    while replaced.is_none() {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(Event::Exited { worker, status, .. })) if worker.id == first.id => {
                assert_eq!(status, ustad::ExitStatus::Signal(9));
            }
            Ok(Some(Event::Ready(worker))) if worker.slot == first.slot => replaced = Some(worker),
            Ok(Some(_)) => {}
            other => panic!("no replacement: {other:?}"),
        }
    }
    assert!(cluster.worker(first.id).is_none(), "dead");
    // disconnect: stopped gracefully, not replaced; its slot waits.
    cluster.disconnect(second.id).await.expect("disconnected");
    let mut order = Vec::new();
    loop {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(event)) => {
                if let Some((id, kind)) = kind_of(&event) {
                    if id == second.id.0 {
                        order.push(kind);
                    }
                }
                if matches!(event, Event::Exited { ref worker, .. } if worker.id == second.id) {
                    break;
                }
            }
            other => panic!("it did not stop: {other:?}"),
        }
    }
    assert_eq!(order, ["stopping", "disconnected", "exited"]);
    assert!(cluster.workers("jobs").len() == 1 && cluster.worker(second.id).is_none());
    let status = cluster.status().await.expect("status");
    assert!(
        status.pools[0]
            .waiting
            .iter()
            .any(|w| w.stopped && w.slot == second.slot)
    );
    // Errors name the problem.
    assert!(cluster.kill(second.id, "SIGKILL").await.is_err());
    assert!(cluster.kill(replaced.unwrap().id, "SIGNOPE").await.is_err());
    cluster.stop(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_messages_is_held_back_not_buffered_and_none_is_lost() {
    const COUNT: u64 = 200_000;
    let (cluster, mut events, workers) = jobs("flood", 1).await;
    let cluster = std::sync::Arc::new(cluster);
    let worker = workers[0].id;
    let rss = || ustad_core::procfs::rss_bytes(std::process::id()).unwrap();
    let before = rss();
    let flood = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            cluster
                .request::<_, Report>(worker, &json!({"type": "flood", "count": COUNT}), TIMEOUT)
                .await
        })
    };
    // Nobody reads the events for a while: the worker must be held back by the bounded
    // queues and its socket, not buffered for.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss();
    assert!(
        during.saturating_sub(before) < 64 << 20,
        "the primary grew by {} MiB while a worker flooded it",
        (during - before) >> 20
    );
    let mut next = 0;
    while next < COUNT {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(Event::Message { message, .. })) => {
                let report: Report = message.decode().unwrap();
                assert_eq!(
                    report,
                    Report::Flooded { n: next },
                    "messages arrive in order"
                );
                next += 1;
            }
            Ok(Some(_)) => {}
            other => panic!("after {next} messages: {other:?}"),
        }
    }
    let done = flood.await.unwrap().unwrap();
    assert_eq!(
        done,
        Report::Done {
            job: "flood".into(),
            by: worker.0
        }
    );
    cluster.stop(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_ready_worker_and_send_to_a_gone_worker_fails() {
    let (cluster, _events, workers) = jobs("broadcast", 2).await;
    // jobs workers take messages and ignore them: what counts is that each one got it.
    let sent = cluster
        .broadcast("jobs", &json!({"type": "hello"}))
        .await
        .unwrap();
    assert_eq!(sent, 2);
    assert_eq!(cluster.broadcast("nope", &json!({})).await.unwrap(), 0);
    let gone = cluster.send(ustad::WorkerId(999), &json!({})).await;
    assert_eq!(gone, Err(RequestError::NoWorker(999)));
    let status = cluster.status().await.unwrap();
    assert_eq!(status.pools[0].ready, 2);
    assert_eq!(status.pools[0].workers.len(), workers.len());
    cluster.stop(None).await.unwrap();
    assert!(cluster.status().await.is_err());
}

/// One HTTP/1.1 request on a kept-alive connection; the answering worker's pid.
fn ask_pid(stream: &mut std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before the response");
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response);
        // The body is one line ending in a newline, after the headers.
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if body.ends_with('\n') {
                return head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-worker-pid: "))
                    .expect("an x-worker-pid header")
                    .to_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_hands_long_lived_connections_evenly_to_every_worker() {
    const CONNECTIONS: usize = 1000;
    const WORKERS: usize = 4;
    // A free port: bound, read, released (round-robin sockets are not visible to workers).
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pool = Pool::new(WORKERS)
        .listen_round_robin(&address.to_string())
        .command([example("hello_cluster").to_string_lossy().into_owned()])
        .env("HELLO_MODE", "round-robin");
    let name = format!("ustad-library-handoff-{}", std::process::id());
    let cluster = Primary::new()
        .name(&name)
        .pool("web", pool)
        .start()
        .expect("cluster starts");
    let mut events = cluster.events().unwrap();
    let mut ready = 0;
    while ready < WORKERS {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(Event::Ready(_))) => ready += 1,
            Ok(Some(_)) => {}
            other => panic!("workers did not get ready: {other:?}"),
        }
    }
    let counts = tokio::task::spawn_blocking(move || {
        // Every connection stays open (long-lived, like WebSockets) while the others open.
        let mut open = Vec::with_capacity(CONNECTIONS);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..CONNECTIONS {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            *counts.entry(ask_pid(&mut stream)).or_default() += 1;
            open.push(stream);
        }
        // Each connection keeps its worker: a second request on it goes to the same pid.
        let again = ask_pid(&mut open[0]);
        assert!(counts.contains_key(&again));
        counts
    })
    .await
    .unwrap();
    assert_eq!(counts.len(), WORKERS, "{counts:?}");
    let even = CONNECTIONS / WORKERS;
    for (pid, count) in &counts {
        assert!(
            count.abs_diff(even) <= even / 10,
            "worker {pid} got {count} of {CONNECTIONS} connections: {counts:?}"
        );
    }
    cluster.stop(Some(Duration::from_secs(5))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_start_runs_before_the_first_workers_and_an_empty_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("prepared");
    // The workers start only once the marker exists: each writes it into its `echo` answer.
    let pool = Pool::new(2)
        .command([example("pools").to_string_lossy().into_owned()])
        .before_start([
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo $USTAD_POOL $USTAD_GENERATION > {}", marker.display()),
        ]);
    let name = format!("ustad-library-before-start-{}", std::process::id());
    let cluster = Primary::new()
        .name(&name)
        .pool("jobs", pool)
        .start()
        .expect("cluster starts");
    let mut events = cluster.events().unwrap();
    let mut ready = 0;
    while ready < 2 {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(Event::Spawned(_))) => {
                assert!(marker.exists(), "a worker started before before_start ran");
            }
            Ok(Some(Event::Ready(_))) => ready += 1,
            Ok(Some(_)) => {}
            other => panic!("workers did not get ready: {other:?}"),
        }
    }
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "jobs 1\n");
    cluster.stop(Some(Duration::from_secs(5))).await.unwrap();

    let error = Primary::new()
        .name(&format!("{name}-empty"))
        .pool("jobs", Pool::new(1).before_start(Vec::<String>::new()))
        .start()
        .unwrap_err();
    assert!(error.to_string().contains("before_start"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_rate_limit_of_no_line_is_refused() {
    let error = Primary::new()
        .name(&format!("ustad-library-rate-{}", std::process::id()))
        .pool(
            "jobs",
            Pool::new(1).log_rate_limit(0, Duration::from_secs(1)),
        )
        .start()
        .unwrap_err();
    assert!(
        error.to_string().contains("relays no line at all"),
        "{error}"
    );
}
