//! An sd_notify datagram from a worker (`READY=1`, `STATUS=…`, `WATCHDOG=1`…): parsed as the
//! primary parses each one it receives, and what it says handed to the plan for a worker of a
//! pool with a watchdog, as the supervisor does.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ustad_core::config::{Command, Config, PoolSpec, Readiness};
use ustad_core::notify::{MAX_DATAGRAM, parse};
use ustad_core::plan::{Event, WorkerId, WorkerMessage};
use ustad_fuzz::{Op, Sim, Step};

fuzz_target!(|data: &[u8]| {
    // The kernel truncates longer datagrams, and the primary rejects them unread.
    let Some(datagram) = data.get(..data.len().min(MAX_DATAGRAM)) else {
        return;
    };
    let messages = match parse(datagram) {
        Ok(messages) => messages,
        Err(why) => {
            assert!(!why.is_empty());
            return;
        }
    };
    for message in &messages {
        if let WorkerMessage::Status(text) = message {
            // Worker text is cut before it reaches the log: 200 bytes and an ellipsis.
            assert!(text.len() <= 200 + '…'.len_utf8(), "{} bytes", text.len());
        }
    }
    let mut config = Config::default();
    let mut spec = PoolSpec::new(Command::new(["app"]).expect("a command"));
    spec.ready = Readiness::Notify;
    spec.watchdog = Some(Duration::from_secs(10));
    config.pools.insert("web".to_owned(), spec);
    let mut sim = Sim::start(&config, 1);
    for message in messages {
        sim.handle(Event::Message {
            id: WorkerId(1),
            message,
        });
        sim.play(Op::Advance(Step::Millis(1500)));
    }
    sim.play(Op::Advance(Step::NextDeadline));
});
