//! Workers in other languages under a library primary: Python and Node programs that speak
//! `docs/protocol.md` with their standard libraries only (`tests/workers/`), exchanging
//! messages and requests both ways with this test binary, which is the primary. The proof that
//! the protocol is language-neutral, and that a worker breaking it is cut off and replaced
//! while the others keep working.
//!
//! Every pool has a `command`, so the primary re-executes nothing. Each test names its
//! instance uniquely (the control socket is `<runtime dir>/ustad/<name>.sock`), bounds every
//! wait, and stops its cluster even when it fails (workers would die with this process anyway:
//! they get `PR_SET_PDEATHSIG`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use ustad::{
    Cluster, Event, ExitCause, ExitStatus, Pool, Primary, RequestError, StopReason, WorkerRef,
};

/// The longest any one phase of a test may take: generous, because two cores are shared by
/// the whole suite and Python and Node take a while to start there. A passing test never waits
/// for it.
const PHASE: Duration = Duration::from_secs(30);
/// The timeout of each request.
const REQUEST: Duration = Duration::from_secs(10);

fn script(name: &str) -> String {
    format!("{}/tests/workers/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A name no other test (or test run) uses at the same time.
fn instance(test: &str) -> String {
    format!("foreign-{test}-{}", std::process::id())
}

fn deadline() -> Instant {
    Instant::now() + PHASE
}

/// SIGKILLs a worker. With a syscall, not the `kill` program: the supervisor would reap that
/// child of ours before we could (see `a_library_primary_leaves_the_programs_own_children_alone`).
fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("the worker exists");
}

/// One cluster at a time in this process. A library primary takes every child process of its
/// process for its own (see `a_library_primary_leaves_the_programs_own_children_alone`), so two
/// at once would stop each other's workers when tests share a process (`cargo test`; nextest
/// runs each test in a process of its own).
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stops the cluster when a test fails before it does.
struct StopOnPanic<'a>(&'a Cluster);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // On a thread of its own: this one may belong to the test's runtime.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    let stop = self.0.stop(Some(Duration::from_secs(1)));
                    let _ = tokio::time::timeout(Duration::from_secs(10), stop).await;
                });
            });
        });
    }
}

/// The cluster's event stream, remembering what it saw for failure messages and which
/// processes were started.
struct Events {
    stream: mpsc::Receiver<Event>,
    seen: Vec<String>,
    pids: BTreeSet<u32>,
}

impl Events {
    fn of(cluster: &Cluster) -> Events {
        Events {
            stream: cluster.events().expect("the event stream is taken once"),
            seen: Vec::new(),
            pids: BTreeSet::new(),
        }
    }

    /// The next event; `None` when the stream has ended.
    async fn next(&mut self, deadline: Instant, what: &str) -> Option<Event> {
        let next = tokio::time::timeout_at(deadline.into(), self.stream.recv()).await;
        let Ok(event) = next else {
            panic!(
                "timed out waiting for {what}; events so far:\n  {}",
                self.seen.join("\n  ")
            );
        };
        if let Some(event) = &event {
            if let Event::Spawned(worker) = event {
                self.pids.insert(worker.pid);
            }
            self.seen.push(format!("{event:?}"));
        }
        event
    }

    /// Waits for the first event `pick` takes (events it returns `None` for are dropped; a
    /// dropped request fails on the worker's side).
    async fn until<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        mut pick: impl FnMut(Event) -> Option<T>,
    ) -> T {
        loop {
            let Some(event) = self.next(deadline, what).await else {
                panic!(
                    "the event stream ended while waiting for {what}; events:\n  {}",
                    self.seen.join("\n  ")
                );
            };
            if let Some(found) = pick(event) {
                return found;
            }
        }
    }

    /// Everything until the stream ends (after the cluster stopped).
    async fn rest(&mut self, deadline: Instant) -> Vec<Event> {
        let mut rest = Vec::new();
        while let Some(event) = self.next(deadline, "the end of the event stream").await {
            rest.push(event);
        }
        rest
    }
}

fn ready(event: Event) -> Option<WorkerRef> {
    match event {
        Event::Ready(worker) => Some(worker),
        _ => None,
    }
}

fn lang(worker: &WorkerRef) -> &'static str {
    if worker.pool == "js" {
        "node"
    } else {
        "python"
    }
}

async fn echo(cluster: &Cluster, worker: &WorkerRef, value: Value) -> Value {
    let request = json!({"type": "echo", "value": value});
    cluster
        .request(worker.id, &request, REQUEST)
        .await
        .unwrap_or_else(|e| panic!("echo from {worker:?}: {e}"))
}

async fn assert_echoes(cluster: &Cluster, worker: &WorkerRef) {
    let reply = echo(cluster, worker, json!(42)).await;
    let expected = json!({"type": "echoed", "value": 42, "pid": worker.pid, "lang": lang(worker)});
    assert_eq!(reply, expected, "from {worker:?}");
}

/// The worker asks the primary a question to answer our `ask_primary`; we answer it from the
/// event stream, and the worker passes our answer back as its reply.
async fn ask_primary(cluster: &Cluster, events: &mut Events, worker: &WorkerRef) {
    let answer = json!({"type": "answer", "text": format!("hello, worker {}", worker.id)});
    let ask = json!({"type": "ask_primary"});
    let (reply, ()) = tokio::join!(
        cluster.request::<_, Value>(worker.id, &ask, REQUEST),
        async {
            let question = events
                .until(deadline(), "the worker's question", |event| match event {
                    Event::Request {
                        worker: from,
                        request,
                    } if from.id == worker.id => Some(request),
                    _ => None,
                })
                .await;
            let body: Value = question.decode().expect("a JSON question");
            assert_eq!(body, json!({"type": "question"}));
            question.reply(&answer).await.expect("the answer is sent");
        }
    );
    assert_eq!(reply.expect("the worker passes the answer on"), answer);
}

/// Stops the cluster; every worker still running must exit with code 0 (they handle `stop`
/// and the stop signal), and no process the cluster started may be left.
async fn stop_cleanly(cluster: &Cluster, events: &mut Events, running: &[WorkerRef]) {
    tokio::time::timeout(PHASE, cluster.stop(None))
        .await
        .expect("the cluster stops in time")
        .expect("the cluster stops");
    let exits: BTreeMap<u64, (ExitStatus, ExitCause)> = events
        .rest(deadline())
        .await
        .into_iter()
        .filter_map(|event| match event {
            Event::Exited {
                worker,
                status,
                cause,
            } => Some((worker.id.0, (status, cause))),
            _ => None,
        })
        .collect();
    for worker in running {
        assert_eq!(
            exits.get(&worker.id.0),
            Some(&(
                ExitStatus::Code(0),
                ExitCause::Stopped(StopReason::Shutdown)
            )),
            "how {worker:?} ended"
        );
    }
    for pid in &events.pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "worker pid {pid} outlived the cluster"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_and_node_workers_exchange_messages_with_a_library_primary() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let pool = |size, words: [String; 2]| {
        Pool::new(size)
            .command(words)
            .restart_delay(Duration::from_millis(100))
            .kill_timeout(Duration::from_secs(10))
    };
    let cluster = Primary::new()
        .name(&instance("talk"))
        .pool("py", pool(2, ["python3".into(), script("echo_worker.py")]))
        .pool("js", pool(1, ["node".into(), script("echo_worker.js")]))
        .start()
        .expect("the primary starts");
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);

    // 1. Three workers say `ready`.
    let phase = deadline();
    let mut workers = Vec::new();
    while workers.len() < 3 {
        workers.push(events.until(phase, "3 ready workers", ready).await);
    }
    workers.sort_by_key(|w| (w.pool.clone(), w.slot));
    let [js, py0, py1] = <[WorkerRef; 3]>::try_from(workers.clone()).expect("3 workers");
    assert_eq!((js.pool.as_str(), py0.pool.as_str()), ("js", "py"));

    // 2. Requests, answered by each in its own language.
    for worker in &workers {
        assert_echoes(&cluster, worker).await;
    }
    // Frames split across reads (a 300 kB reply, a 100 kB request: more than one read of
    // 64 kB), and several in one read (requests sent at once are written together).
    let big = "é".repeat(50_000);
    for worker in [&js, &py0] {
        let (a, b, c) = tokio::join!(
            echo(&cluster, worker, json!(big)),
            echo(&cluster, worker, json!({"nested": [1, 2.5, null, "ünï"]})),
            echo(&cluster, worker, json!("third")),
        );
        assert_eq!(a["value"], json!(big));
        assert_eq!(b["value"], json!({"nested": [1, 2.5, null, "ünï"]}));
        assert_eq!(c["value"], json!("third"));
    }

    // 3. A broadcast to the Python pool: each worker answers with a message of its own.
    let sent = cluster.broadcast("py", &json!({"type": "ping"})).await;
    assert_eq!(sent, Ok(2));
    let phase = deadline();
    let mut pongs = BTreeSet::new();
    while pongs.len() < 2 {
        let (worker, body) = events
            .until(phase, "2 pongs", |event| match event {
                Event::Message { worker, message } => Some((worker, message.decode::<Value>())),
                _ => None,
            })
            .await;
        let body = body.expect("a JSON message");
        assert_eq!(worker.pool, "py");
        assert_eq!(body, json!({"type": "pong", "pid": worker.pid}));
        pongs.insert(worker.pid);
    }
    assert_eq!(pongs, BTreeSet::from([py0.pid, py1.pid]));

    // 4. Requests the other way: a worker asks the primary, mid-request.
    ask_primary(&cluster, &mut events, &js).await;
    ask_primary(&cluster, &mut events, &py0).await;

    // 5. A worker killed while it handles a request: the request fails, it does not hang.
    let ask = json!({"type": "ask_primary"});
    let (result, question) =
        tokio::join!(cluster.request::<_, Value>(py1.id, &ask, REQUEST), async {
            let question = events
                .until(deadline(), "the victim's question", |event| match event {
                    Event::Request { worker, request } if worker.id == py1.id => Some(request),
                    _ => None,
                })
                .await;
            // It waits for our answer now: mid-request.
            kill(py1.pid);
            // Unanswered until the request has failed (dropping it would answer with `err`).
            question
        });
    assert_eq!(result, Err(RequestError::WorkerGone(py1.id.0)));
    drop(question);
    let phase = deadline();
    let (status, cause) = events
        .until(phase, "the victim's exit", |event| match event {
            Event::Exited {
                worker,
                status,
                cause,
            } if worker.id == py1.id => Some((status, cause)),
            _ => None,
        })
        .await;
    assert_eq!((status, cause), (ExitStatus::Signal(9), ExitCause::Crashed));
    let successor = events
        .until(phase, "the victim's successor", |event| {
            ready(event).filter(|w| w.pool == "py" && w.slot == py1.slot)
        })
        .await;
    assert_echoes(&cluster, &successor).await;

    // 6. Stop: each finishes and exits 0; nothing is left behind.
    stop_cleanly(&cluster, &mut events, &[js, py0, successor]).await;
}

/// The code block in `language` that follows `heading` in `docs/protocol.md`.
fn doc_snippet(heading: &str, language: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/protocol.md is readable");
    let section = &doc[doc.find(heading).expect(heading)..];
    let fence = format!("```{language}\n");
    let start = section.find(&fence).expect("a code block") + fence.len();
    let end = start
        + section[start..]
            .find("```")
            .expect("the end of the code block");
    section[start..end].to_owned()
}

/// The minimal workers of `docs/protocol.md`, as printed there, under a real primary.
#[tokio::test(flavor = "multi_thread")]
async fn the_minimal_workers_of_the_protocol_docs_work() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let python = dir.path().join("minimal.py");
    let node = dir.path().join("minimal.js");
    std::fs::write(
        &python,
        doc_snippet("## A minimal worker in Python", "python"),
    )
    .unwrap();
    std::fs::write(&node, doc_snippet("## A minimal worker in Node", "js")).unwrap();
    let path = |p: &Path| p.to_str().expect("a UTF-8 temp dir").to_owned();
    let cluster = Primary::new()
        .name(&instance("minimal"))
        .pool(
            "py",
            Pool::new(1).command(["python3".to_owned(), path(&python)]),
        )
        .pool("js", Pool::new(1).command(["node".to_owned(), path(&node)]))
        .start()
        .expect("the primary starts");
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);

    let phase = deadline();
    let mut workers = Vec::new();
    while workers.len() < 2 {
        workers.push(events.until(phase, "2 ready workers", ready).await);
    }
    for worker in &workers {
        let body = json!({"n": [1, "two", {"three": null}]});
        let reply: Value = cluster
            .request(worker.id, &body, REQUEST)
            .await
            .unwrap_or_else(|e| panic!("a reply from {worker:?}: {e}"));
        assert_eq!(reply, json!({"echo": body}), "from {worker:?}");
        cluster
            .send(worker.id, &json!({"type": "hello"}))
            .await
            .expect("a message is sent");
    }
    stop_cleanly(&cluster, &mut events, &workers).await;
}

/// A pool `bad` of hostile workers (`tests/workers/hostile_worker.py`), one per mode, with
/// messages of at most 1 kB, and a pool `js` of one well-behaved Node worker.
fn hostile_cluster(test: &str, dir: &Path, modes: &[&str], pool: impl Fn(Pool) -> Pool) -> Cluster {
    Primary::new()
        .name(&instance(test))
        .pool(
            "bad",
            pool(
                Pool::new(modes.len())
                    .command(["python3".to_owned(), script("hostile_worker.py")])
                    .max_message(1024)
                    .env("HOSTILE_DIR", dir.to_str().expect("a UTF-8 temp dir"))
                    .env("HOSTILE_MODES", &modes.join(","))
                    .restart_delay(Duration::from_millis(100))
                    .kill_timeout(Duration::from_secs(10)),
            ),
        )
        .pool(
            "js",
            Pool::new(1).command(["node".to_owned(), script("echo_worker.js")]),
        )
        .start()
        .expect("the primary starts")
}

/// Waits until `bad` has `count` workers ready and `js` has its one; returns them.
async fn first_workers(
    events: &mut Events,
    count: usize,
) -> (BTreeMap<usize, WorkerRef>, WorkerRef) {
    let phase = deadline();
    let mut bad: BTreeMap<usize, WorkerRef> = BTreeMap::new();
    let mut good = None;
    while bad.len() < count || good.is_none() {
        let worker = events.until(phase, "the first workers ready", ready).await;
        if worker.pool == "js" {
            good = Some(worker);
        } else {
            bad.entry(worker.slot).or_insert(worker);
        }
    }
    (bad, good.expect("the js worker is ready"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_breaking_the_protocol_is_cut_off_and_replaced_while_others_work() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let modes = ["garbage", "oversized", "truncated"];
    let cluster = hostile_cluster("hostile", dir.path(), &modes, |pool| pool);
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);
    let (first, good) = first_workers(&mut events, 3).await;

    // Each hostile worker broke the protocol right after `ready`, in its own way. Each is
    // replaced: asked to stop once a successor in its slot is ready. Meanwhile the Node worker
    // keeps answering.
    let phase = deadline();
    let mut stopped = BTreeSet::new();
    let mut exited = BTreeSet::new();
    let mut successors: BTreeMap<usize, WorkerRef> = BTreeMap::new();
    let mut answered = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while exited.len() < 3 || successors.len() < 3 {
        tokio::select! {
            event = events.next(phase, "the hostile workers' replacement") => match event {
                Some(Event::Stopping { worker, reason }) if worker.pool == "bad" => {
                    assert_eq!(first.get(&worker.slot), Some(&worker), "only hostile ones stop");
                    assert_eq!(reason, StopReason::Protocol, "why {worker:?} stops");
                    stopped.insert(worker.slot);
                }
                Some(Event::Exited { worker, .. }) if worker.pool == "bad" => {
                    assert!(stopped.contains(&worker.slot), "{worker:?} exited unasked");
                    exited.insert(worker.slot);
                }
                Some(Event::Ready(worker)) if worker.pool == "bad" => {
                    assert_ne!(first.get(&worker.slot), Some(&worker));
                    successors.insert(worker.slot, worker);
                }
                Some(Event::Exited { worker, .. } | Event::Stopping { worker, .. }) => {
                    panic!("the Node worker was disturbed: {worker:?}")
                }
                Some(_) => {}
                None => panic!("the event stream ended"),
            },
            _ = tick.tick() => {
                assert_echoes(&cluster, &good).await;
                answered += 1;
            }
        }
    }
    assert!(answered > 0, "the Node worker was asked nothing");
    assert_eq!(stopped, BTreeSet::from([0, 1, 2]));

    // The successors serve (they run echo_worker.py), and so does the Node worker.
    for worker in successors.values() {
        assert_echoes(&cluster, worker).await;
    }
    assert_echoes(&cluster, &good).await;

    let mut running: Vec<WorkerRef> = successors.into_values().collect();
    running.push(good);
    stop_cleanly(&cluster, &mut events, &running).await;
}

/// A cut-off worker must not linger as a black hole until its successor is ready. Today the
/// supervisor closes its channel, but tells the library nothing (`supervisor/link.rs`,
/// `on_lifecycle_frame`): the library's entry for the worker stays `serving`, so
/// `Cluster::workers`, `round_robin`, `broadcast` and `dispatch` still pick it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_worker_loses_its_channel_at_once() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    // The successor takes its time: until it is ready, the cut-off worker is still running.
    let cluster = hostile_cluster("cut", dir.path(), &["garbage"], |pool| {
        pool.env("HOSTILE_SUCCESSOR_DELAY", "5")
    });
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);
    let (first, good) = first_workers(&mut events, 1).await;
    let hostile = &first[&0];

    // Cut off: its channel is closed (it sees the end), the primary neither offers it for work
    // nor waits for replies that cannot come.
    let eof = dir.path().join("slot-0.eof");
    let until = Instant::now() + Duration::from_secs(3);
    while !eof.exists() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read_to_string(&eof).ok().as_deref(),
        Some("yes"),
        "the cut-off worker saw its channel end"
    );
    assert!(
        !cluster.workers("bad").contains(hostile),
        "a cut-off worker is offered for work"
    );
    let result = tokio::time::timeout(
        Duration::from_secs(3),
        cluster.request::<_, Value>(hostile.id, &json!({"type": "echo", "value": 1}), REQUEST),
    )
    .await
    .expect("a request to a cut-off worker fails at once");
    assert!(
        matches!(
            result,
            Err(RequestError::WorkerGone(_) | RequestError::NoWorker(_))
        ),
        "{result:?}"
    );
    assert_echoes(&cluster, &good).await;

    let successor = events
        .until(deadline(), "the successor", |event| {
            ready(event).filter(|w| w.pool == "bad")
        })
        .await;
    stop_cleanly(&cluster, &mut events, &[successor, good]).await;
}

/// A worker that breaks the protocol before `ready` must be cut off as promptly as one that is
/// ready. Today `on_lifecycle_frame` asks the plan to `Replace` it, which the plan refuses for
/// a worker that is not serving (`plan/mod.rs`, `on_replace`): it runs on, unreachable, until
/// `ready_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_breaking_the_protocol_before_it_is_ready_is_replaced_too() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    // Longer than the test waits: `ready_timeout` must not be what ends it.
    let cluster = hostile_cluster("early", dir.path(), &["early"], |pool| {
        pool.ready_timeout(Duration::from_secs(120))
    });
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);

    let phase = deadline();
    let mut hostile = None;
    let mut good = None;
    let successor = loop {
        match events
            .next(phase, "the early hostile worker's replacement")
            .await
        {
            Some(Event::Spawned(worker)) if worker.pool == "bad" && hostile.is_none() => {
                hostile = Some(worker);
            }
            Some(Event::Ready(worker)) if worker.pool == "js" => good = Some(worker),
            Some(Event::Ready(worker)) if worker.pool == "bad" => {
                assert_ne!(
                    Some(&worker),
                    hostile.as_ref(),
                    "the hostile worker is ready"
                );
                break worker;
            }
            Some(_) => {}
            None => panic!("the event stream ended"),
        }
    };
    assert_echoes(&cluster, &successor).await;
    let good = match good {
        Some(good) => good,
        None => {
            events
                .until(deadline(), "the js worker", |e| {
                    ready(e).filter(|w| w.pool == "js")
                })
                .await
        }
    };
    stop_cleanly(&cluster, &mut events, &[successor, good]).await;
}

/// `max_message` binds both directions (`USTAD_IPC_MAX_FRAME` tells the worker what to expect).
/// Today `Cluster::send`/`request` encode without checking it, and the worker, rightly, treats
/// the frame as a breach: the Node worker exits, a Rust worker stops reading its channel.
#[tokio::test(flavor = "multi_thread")]
async fn the_primary_never_sends_a_frame_larger_than_the_workers_limit() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Primary::new()
        .name(&instance("limit"))
        .pool(
            "js",
            Pool::new(1)
                .command(["node".to_owned(), script("echo_worker.js")])
                .max_message(1024),
        )
        .start()
        .expect("the primary starts");
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);
    let worker = events.until(deadline(), "the worker ready", ready).await;

    // The worker was told 1 kB (USTAD_IPC_MAX_FRAME) and treats a larger frame as a breach of
    // the protocol: the primary must refuse to send one, not break the worker.
    let big = json!({"type": "echo", "value": "x".repeat(2000)});
    let refused = cluster.request::<_, Value>(worker.id, &big, REQUEST).await;
    assert!(
        matches!(refused, Err(RequestError::TooLarge { max: 1024, .. })),
        "{refused:?}"
    );
    let refused = cluster.send(worker.id, &big).await;
    assert!(
        matches!(refused, Err(RequestError::TooLarge { max: 1024, .. })),
        "{refused:?}"
    );
    assert_echoes(&cluster, &worker).await;
    stop_cleanly(&cluster, &mut events, &[worker]).await;
}

/// Kills and waits for a process of the test's own when dropped.
struct OwnChild(std::process::Child);

impl Drop for OwnChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A library primary runs inside a program that may have child processes of its own. Today the
/// supervisor, a child subreaper, takes every child of the process that is not one of its
/// workers for an orphan that escaped a worker (`supervisor/process_groups.rs`):
/// `reap_adopted` waits for those that exit, stealing their status from the program (whose
/// `wait` then fails with ECHILD), and `kill_adopted_orphans` SIGTERMs, then SIGKILLs, those
/// still running when the cluster stops. Two clusters in one process stop each other's workers.
#[tokio::test(flavor = "multi_thread")]
async fn a_library_primary_leaves_the_programs_own_children_alone() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut running = OwnChild(
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep starts"),
    );
    let mut finished = OwnChild(
        std::process::Command::new("true")
            .spawn()
            .expect("true starts"),
    );
    let cluster = Primary::new()
        .name(&instance("children"))
        .pool(
            "js",
            Pool::new(1).command(["node".to_owned(), script("echo_worker.js")]),
        )
        .start()
        .expect("the primary starts");
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);
    let worker = events.until(deadline(), "the worker ready", ready).await;
    assert_echoes(&cluster, &worker).await;
    stop_cleanly(&cluster, &mut events, &[worker]).await;

    let status = finished.0.wait();
    assert!(
        status.as_ref().is_ok_and(std::process::ExitStatus::success),
        "the program's own finished child: {status:?}"
    );
    let status = running.0.try_wait();
    assert!(
        matches!(status, Ok(None)),
        "the program's own running child: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unmodified_node_workers_talk_over_nodes_own_channel() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = Primary::new()
        .name(&instance("node-fork"))
        .pool(
            "js",
            Pool::new(2)
                .command(["node".to_owned(), script("node_fork_worker.js")])
                .node()
                .kill_timeout(Duration::from_secs(10)),
        )
        .start()
        .expect("the primary starts");
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);

    // 1. Each greets with process.send() and is ready by process.send('ready').
    let phase = deadline();
    let mut greeted = BTreeSet::new();
    let mut workers = Vec::new();
    while workers.len() < 2 || greeted.len() < 2 {
        events
            .until(phase, "greetings and readiness", |event| match event {
                Event::Message { worker, message } => {
                    let body: Value = message.decode().expect("JSON");
                    assert_eq!(body, json!({"hello": worker.pid}));
                    greeted.insert(worker.id);
                    Some(())
                }
                Event::Ready(worker) => {
                    workers.push(worker);
                    Some(())
                }
                _ => None,
            })
            .await;
    }

    // 2. Cluster::send reaches process.on('message'); its answer comes back as a message.
    let first = &workers[0];
    cluster
        .send(first.id, &json!({"n": 1}))
        .await
        .expect("sent");
    let back = events
        .until(deadline(), "the answer", |event| match event {
            Event::Message { worker, message } if worker.id == first.id => {
                Some(message.decode::<Value>().expect("JSON"))
            }
            _ => None,
        })
        .await;
    assert_eq!(back, json!({"back": {"n": 1}, "pid": first.pid}));

    // 3. A broadcast reaches both.
    let sent = cluster
        .broadcast("js", &"everyone")
        .await
        .expect("broadcast");
    assert_eq!(sent, 2);
    let mut answered = BTreeSet::new();
    while answered.len() < 2 {
        let (id, body) = events
            .until(
                deadline(),
                "answers to the broadcast",
                |event| match event {
                    Event::Message { worker, message } => {
                        Some((worker.id, message.decode::<Value>().expect("JSON")))
                    }
                    _ => None,
                },
            )
            .await;
        assert_eq!(body["back"], json!("everyone"));
        answered.insert(id);
    }

    // 4. Node has no replies: a request is refused at once, not timed out.
    let refused = cluster
        .request::<_, Value>(first.id, &json!({"q": 1}), REQUEST)
        .await;
    assert!(
        matches!(refused, Err(RequestError::NotSupported(_))),
        "{refused:?}"
    );

    // 5. They exit 0 on the 'shutdown' message.
    stop_cleanly(&cluster, &mut events, &workers).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_ready_when_listening_learns_where_it_listens() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let server = "require('http').createServer((q, s) => s.end('hi')).listen({ fd: 3 })";
    let cluster = Primary::new()
        .name(&instance("listening"))
        .pool(
            "web",
            Pool::new(1)
                .listen("127.0.0.1:0")
                .command(["node", "-e", server])
                .ready(ustad::Readiness::Listening),
        )
        .start()
        .expect("the primary starts");
    let _stop = StopOnPanic(&cluster);
    let mut events = Events::of(&cluster);
    let (worker, socket, address) = events
        .until(
            deadline(),
            "the worker seen listening",
            |event| match event {
                Event::Listening {
                    worker,
                    socket,
                    address,
                } => Some((worker, socket, address)),
                Event::Ready(worker) => panic!("{worker:?} ready before it was seen listening"),
                _ => None,
            },
        )
        .await;
    assert_eq!(socket, "web");
    let address: std::net::SocketAddr = address.parse().expect("an IP address");
    assert_ne!(address.port(), 0, "the port actually bound");
    let ready = events.until(deadline(), "ready", ready).await;
    assert_eq!(ready.id, worker.id);
    // And it answers there.
    let mut stream = std::net::TcpStream::connect(address).expect("connecting");
    std::io::Write::write_all(&mut stream, b"GET / HTTP/1.0\r\n\r\n").expect("asking");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("reading");
    assert!(answer.ends_with("hi"), "{answer}");
    tokio::time::timeout(PHASE, cluster.stop(Some(Duration::from_secs(2))))
        .await
        .expect("the cluster stops in time")
        .expect("the cluster stops");
}
