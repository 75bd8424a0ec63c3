//! A Node worker's channel (`ipc = "node"`, `NODE_CHANNEL_FD`): any bytes, split into reads
//! anywhere, through the primary's line reader and Node line decoder, until the channel ends
//! or breaks.
//!
//! Input: the line limit (the default, or a small one), the read sizes, then the stream.

#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use ustad_core::ipc::node::{LineReader, decode};
use ustad_core::ipc::{DEFAULT_MAX_FRAME, Kind};
use ustad_fuzz::{Chunked, chunk_sizes, run};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let max = match u.int_in_range(0..=2).unwrap_or(0) {
        0 => DEFAULT_MAX_FRAME,
        1 => u.int_in_range(0..=64).unwrap_or(0),
        _ => u.int_in_range(1..=100_000).unwrap_or(1),
    };
    let sizes = chunk_sizes(&mut u);
    let stream = u.take_rest();
    let mut reader = LineReader::new(Chunked::new(stream, sizes), max);
    for _ in 0..10_000 {
        let line = match run(reader.next()) {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => return,
        };
        assert!(line.len() <= max && !line.contains(&b'\n'));
        let _ = reader.lone();
        if let Ok(Some(envelope)) = decode(line)
            && envelope.kind == Kind::Msg
        {
            // A message is handed on whole: its text is one JSON value (its strings' UTF-8 is
            // checked by whoever decodes it, as for frames).
            let body = envelope.body().expect("a message has a body");
            assert!(serde_json::from_slice::<IgnoredAny>(body).is_ok());
        }
    }
});
