//! A library worker's channel (`USTAD_IPC_FD`): any bytes, split into reads anywhere, through
//! the primary's frame reader and envelope decoder, as its reader task runs them; every frame
//! read and decoded until the channel ends or breaks.
//!
//! Input: the frame limit (the default, or a small one so that the limit is hit), the read
//! sizes, then the stream.

#![no_main]

use arbitrary::Unstructured;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use ustad_core::ipc::{DEFAULT_MAX_FRAME, FrameReader, decode};
use ustad_fuzz::{Chunked, chunk_sizes, run};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let max = match u.int_in_range(0..=2).unwrap_or(0) {
        0 => DEFAULT_MAX_FRAME,
        1 => u.int_in_range(1..=64).unwrap_or(1),
        _ => u.int_in_range(1..=100_000).unwrap_or(1),
    };
    let sizes = chunk_sizes(&mut u);
    let stream = u.take_rest();
    let mut reader = FrameReader::new(Chunked::new(stream, sizes), max);
    for _ in 0..10_000 {
        let body = match run(reader.next()) {
            Ok(Some(body)) => body,
            Ok(None) | Err(_) => return,
        };
        assert!(
            !body.is_empty() && body.len() <= max,
            "{} > {max}",
            body.len()
        );
        let _ = reader.lone();
        check(body);
        while let Ok(Some(body)) = reader.try_next() {
            check(body);
        }
    }
});

/// Decodes one frame; the fast path for frames as ustad writes them must answer as the
/// general one does (a leading space sends a frame down the general path).
fn check(body: Bytes) {
    let mut spaced = b" ".to_vec();
    spaced.extend_from_slice(&body);
    let (fast, general) = (decode(body), decode(Bytes::from(spaced)));
    match (fast, general) {
        (Ok(fast), Ok(general)) => {
            assert_eq!(fast.kind, general.kind);
            let (a, b) = (fast.decode::<Value>(), general.decode::<Value>());
            assert_eq!(a.ok(), b.ok(), "the bodies differ");
            assert_eq!(fast.body().is_some(), general.body().is_some());
        }
        (Err(_), Err(_)) => {}
        // The fast path leaves checking that the body's strings are UTF-8 to whoever decodes
        // it (see `decode_canonical`), and then it fails there.
        (Ok(fast), Err(_))
            if fast
                .body()
                .is_some_and(|body| std::str::from_utf8(body).is_err()) =>
        {
            assert!(fast.decode::<Value>().is_err());
        }
        (fast, general) => panic!("fast path {fast:?}, general path {general:?}"),
    }
}
