//! `ustad.toml`: parsed and validated as `ustad run` loads it; a configuration that loads is
//! then run through the plan with pretend processes and synthetic time, over the events the
//! rest of the input picks (spawns, readiness, exits, rollouts, scaling, a stop, and time
//! jumping far ahead). A configuration that validates must not panic the planner.
//!
//! Input: the TOML text, a NUL byte (which TOML text cannot hold), then the events.

#![no_main]

use std::path::Path;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use ustad_core::config::Config;
use ustad_fuzz::{Op, Sim, small_enough};

/// Events played per input: enough for a rollout over a few slots, and a stop.
const MAX_OPS: usize = 200;

fuzz_target!(|data: &[u8]| {
    let (text, events) = match data.iter().position(|b| *b == 0) {
        Some(at) => data.split_at(at),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let config = match Config::from_toml(text, Path::new("/etc/ustad/ustad.toml")) {
        Ok(config) => config,
        Err(error) => {
            // The diagnostics render the offending line with an underline.
            let _ = error.to_string();
            return;
        }
    };
    assert_eq!(config.validate(), Ok(()), "a loaded config validates");
    let _ = config.summary();
    for pool in config.pools.values() {
        let _ = (
            pool.command.to_string(),
            pool.ready.to_string(),
            pool.size.to_string(),
        );
        let _ = pool.max_memory.map(|m| m.to_string());
    }
    if !small_enough(&config) {
        return;
    }
    let mut u = Unstructured::new(events.get(1..).unwrap_or_default());
    let seed = u.arbitrary().unwrap_or(0);
    let mut sim = Sim::start(&config, seed);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.arbitrary::<Op>() {
            Ok(op) => sim.play(op),
            Err(_) => break,
        }
    }
});
