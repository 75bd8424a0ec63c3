//! A control client's request line (`ustad status`, `scale`, `stop`, …): read as the control
//! server reads it, then what the primary does with it before it answers: a `stop`'s timeout
//! parsed and given to the plan (whose deadlines then pass), `logs` read from the log book, a
//! `restart` of any pool or worker id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ustad_core::config::{Command, Config, PoolSpec, Readiness, Size};
use ustad_core::control::protocol::{LogLine, Request};
use ustad_core::control::server::parse_request;
use ustad_core::logbook::LogBook;
use ustad_core::plan::{Event, RolloutTrigger, WorkerId};
use ustad_fuzz::{Op, Sim, Step};

fuzz_target!(|data: &[u8]| {
    let request = match parse_request(data) {
        Ok(request) => request,
        Err(why) => {
            assert!(!why.is_empty());
            return;
        }
    };
    // What the server parsed, it can write back (the client library sends the same types).
    let line = serde_json::to_vec(&request).expect("a request serializes");
    let again: Request = serde_json::from_slice(&line).expect("a written request reads back");
    assert_eq!(again, request);

    let mut sim = Sim::start(&cluster(), 1);
    match request {
        Request::Stop {
            worker: Some(id), ..
        } => {
            sim.handle(Event::StopWorker { id: WorkerId(id) });
        }
        Request::Stop {
            timeout,
            worker: None,
        } => {
            sim.play(Op::Shutdown {
                immediate: false,
                timeout,
            });
            for _ in 0..4 {
                sim.play(Op::Advance(Step::NextDeadline));
            }
        }
        Request::Logs { pool, lines, .. } => {
            let book = LogBook::default();
            for (n, pool) in ["web", "jobs", "web"].into_iter().enumerate() {
                book.record(LogLine {
                    time: n as f64,
                    pool: pool.to_owned(),
                    slot: 0,
                    id: 1,
                    stream: "stdout".to_owned(),
                    line: "hello".to_owned(),
                });
            }
            assert!(book.recent(pool.as_deref(), lines).len() <= lines);
        }
        Request::Restart { pool, worker } => {
            if let Some(id) = worker {
                sim.handle(Event::Replace { id: WorkerId(id) });
            }
            if pool.is_some() {
                sim.handle(Event::Rollout {
                    pool,
                    trigger: RolloutTrigger::Restart,
                    spec: None,
                });
            }
        }
        Request::Reload { pools, .. } => {
            for pool in pools {
                sim.handle(Event::Rollout {
                    pool: Some(pool),
                    trigger: RolloutTrigger::Reload,
                    spec: None,
                });
            }
        }
        // `scale` is checked against the machine's process limit in the supervisor
        // (`supervisor/control.rs`), with checked arithmetic, before the plan sees it.
        _ => {}
    }
});

/// Two small pools, as a control client finds them.
fn cluster() -> Config {
    let mut config = Config::default();
    for (name, size) in [("web", 2), ("jobs", 1)] {
        let mut spec = PoolSpec::new(Command::new(["app"]).expect("a command"));
        spec.size = Size::fixed(size).expect("not zero");
        spec.ready = Readiness::None;
        config.pools.insert(name.to_owned(), spec);
    }
    config
}
