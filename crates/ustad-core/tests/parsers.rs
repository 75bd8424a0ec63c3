//! Properties of every parser of outside input, checked on generated cases in the normal test
//! suite (the fuzz targets in `fuzz/` search the same entry points for much longer): the
//! config file, control requests, notify datagrams, the framed channel and Node's channel.
//!
//! Each property holds for any input: nothing panics, what is accepted is within its bounds,
//! and what ustad writes it reads back. The cases come from a small seeded generator, the same
//! on every run; set `USTAD_PROPERTY_SEED` to try others. A failure names its case.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, ReadBuf};
use ustad_core::config::value::{MAX_DURATION, format_duration, parse_duration};
use ustad_core::config::{
    ByteSize, Command, Config, IpcProtocol, ListenAddr, Readiness, Signal, Size, SocketMode,
};
use ustad_core::control::protocol::{MAX_REQUEST, Request};
use ustad_core::control::server::parse_request;
use ustad_core::ipc::{self, FrameError, FrameReader, Kind};
use ustad_core::plan::{Action, Event, Plan, WorkerMessage};

// ----- the generator -----------------------------------------------------------------------

/// A seeded xorshift64* generator: deterministic, so that a failure can be replayed.
struct Gen(u64);

impl Gen {
    /// The generator for one property: its name and the run's seed decide its cases.
    fn new(property: &str) -> Gen {
        let seed = std::env::var("USTAD_PROPERTY_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0x5eed);
        let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
        for byte in property.bytes() {
            state = (state ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
        Gen(state | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Any bytes, often few.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Text with the characters parsers trip on: quotes, escapes, newlines, multi-byte ones.
    fn text(&mut self, max: usize) -> String {
        const PIECES: &[&str] = &[
            "a", "Z", "0", "9", " ", "_", "-", ".", ":", "=", "\"", "'", "\\", "\n", "\r", "\t",
            "#", "[", "]", "{", "}", ",", "é", "€", "𝄞", "\u{7f}", "\u{1}", "\u{feff}", "ab",
        ];
        let len = self.below(max + 1);
        (0..len).map(|_| *self.pick(PIECES)).collect()
    }

    /// A JSON value, nested at most `depth` deep.
    fn json(&mut self, depth: usize) -> Value {
        match self.below(if depth == 0 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(self.chance(2)),
            2 => match self.below(3) {
                0 => json!(self.next()),
                1 => json!(self.next() as i64),
                // Halves and quarters: floats that any JSON reader gets back exactly.
                _ => json!((self.next() % 1_000_000) as f64 / 4.0),
            },
            3 | 4 => json!(self.text(12)),
            5 => Value::Array((0..self.below(4)).map(|_| self.json(depth - 1)).collect()),
            _ => Value::Object(
                (0..self.below(4))
                    .map(|_| (self.text(6), self.json(depth - 1)))
                    .collect(),
            ),
        }
    }

    /// A duration anywhere from nothing to the longest ustad takes.
    fn duration(&mut self) -> Duration {
        match self.below(5) {
            0 => Duration::ZERO,
            1 => Duration::from_millis(self.next() % 100_000),
            2 => Duration::from_secs(self.next() % 100_000_000),
            3 => MAX_DURATION,
            _ => Duration::from_nanos(self.next()).min(MAX_DURATION),
        }
    }
}

/// A stream that returns `data` in chunks of the given sizes (cycled), as a socket may.
struct Chunked {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    read: usize,
}

impl Chunked {
    fn new(data: Vec<u8>, g: &mut Gen) -> Chunked {
        let sizes = (0..1 + g.below(4))
            .map(|_| match g.below(3) {
                0 => 1 + g.below(3),
                1 => 1 + g.below(100),
                _ => usize::MAX,
            })
            .collect();
        Chunked {
            data,
            at: 0,
            sizes,
            read: 0,
        }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = self.sizes[self.read % self.sizes.len()];
        self.read += 1;
        let n = size.min(buf.remaining()).min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future over an in-memory stream, which never waits.
fn run<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(std::task::Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
    }
}

// ----- the config file ---------------------------------------------------------------------

/// A value for a setting: mostly valid ones (extremes included), sometimes wrong ones.
fn toml_value(g: &mut Gen, key: &str) -> String {
    let (good, bad): (&[&str], &[&str]) = match key {
        "size" => (
            &["1", "2", "3", "\"auto\""],
            &["0", "-1", "\"3\"", "4294967296"],
        ),
        "ready" => (
            &["\"notify\"", "\"none\"", "\"delay:2s\"", "\"delay:1ns\""],
            &[
                "\"listening\"",
                "\"message\"",
                "\"delay:584543y\"",
                "\"delay:\"",
                "\"yes\"",
            ],
        ),
        "stop_signal" => (
            &["\"SIGTERM\"", "\"int\"", "\"9\"", "\"64\""],
            &["\"65\"", "\"0\"", "\"SIGNOPE\""],
        ),
        "max_memory" => (
            &["\"512MiB\"", "\"1.5G\"", "\"1\"", "\"16777215T\""],
            &["\"0\"", "\"99999999T\"", "\"1e3\"", "\".\""],
        ),
        "strict" | "silent" => (&["true", "false"], &["1"]),
        "command" => (
            &["\"app --flag\"", "[\"a\", \"b c\"]", "\"'quoted arg' x\""],
            &["\"\"", "[]", "\"'unclosed\""],
        ),
        "listen" => (
            &[
                "\"127.0.0.1:0\"",
                "\"[::1]:0\"",
                "\"unix:/tmp/ustad-property.sock\"",
            ],
            &["\"unix:\"", "\"localhost:80\""],
        ),
        "mode" => (
            &["\"shared\""],
            &["\"reuseport\"", "\"round-robin\"", "\"other\""],
        ),
        "backlog" => (&["1", "1024", "4294967295"], &["0", "4294967296", "-1"]),
        "ipc" => (&["\"node\"", "\"ustad\""], &["\"smoke\""]),
        "env" => (
            &["{ A = \"1\", PORT = 3000 }", "{ \"x.y\" = true }"],
            &["{ \"\" = \"v\" }", "{ \"B=C\" = 1 }"],
        ),
        "cwd" => (&["\"app\"", "\"/srv/é\""], &["1"]),
        _ => (
            &[
                "\"30s\"",
                "\"1m30s\"",
                "\"1ns\"",
                "\"1us\"",
                "\"584542y\"",
                "\"99999y 11months\"",
                "\"1y 1ns\"",
            ],
            &[
                "\"0\"",
                "\"584543y\"",
                "\"99999999999y\"",
                "\"18446744073709551615s\"",
                "30",
                "\"soon\"",
            ],
        ),
    };
    if g.chance(16) {
        g.pick(bad).to_string()
    } else {
        g.pick(good).to_string()
    }
}

const POOL_KEYS: &[&str] = &[
    "size",
    "sockets",
    "ready",
    "ready_timeout",
    "env",
    "cwd",
    "ttl",
    "strict",
    "kill_timeout",
    "restart_delay",
    "min_uptime",
    "stop_signal",
    "silent",
    "max_memory",
    "watchdog",
    "ipc",
    "stop_grace",
];
const TOP_KEYS: &[&str] = &[
    "kill_timeout",
    "restart_delay",
    "ready",
    "ready_timeout",
    "min_uptime",
    "stop_signal",
    "ttl",
    "strict",
    "silent",
    "max_memory",
    "watchdog",
];

/// A config file of the real schema, now and then mangled.
fn config_text(g: &mut Gen) -> String {
    let mut text = String::new();
    for key in TOP_KEYS {
        if g.chance(6) {
            text += &format!("{key} = {}\n", toml_value(g, key));
        }
    }
    let sockets = ["http", "admin", "extra"];
    let count = g.below(3);
    for (n, name) in sockets.iter().take(count).enumerate() {
        text += &format!("[sockets.{name}]\n");
        // Each on an address of its own: two on one are refused, as they should be.
        let listen = match g.below(3) {
            0 => format!("\"unix:/tmp/ustad-property-{n}.sock\""),
            _ => format!("\"127.0.0.1:{}\"", 7000 + n),
        };
        text += &format!("listen = {listen}\n");
        for key in ["mode", "backlog"] {
            if g.chance(3) {
                text += &format!("{key} = {}\n", toml_value(g, key));
            }
        }
    }
    for name in ["web", "jobs", "w-3"].iter().take(1 + g.below(3)) {
        text += &format!("[pools.{name}]\n");
        if !g.chance(30) {
            text += &format!("command = {}\n", toml_value(g, "command"));
        }
        for key in POOL_KEYS {
            if !g.chance(4) {
                continue;
            }
            let value = match *key {
                "sockets" if count > 0 && !g.chance(6) => {
                    format!("[\"{}\"]", sockets[g.below(count)])
                }
                "sockets" => "[\"nope\"]".to_owned(),
                _ => toml_value(g, key),
            };
            text += &format!("{key} = {value}\n");
        }
    }
    if g.chance(10) {
        let mut cut = g.below(text.len() + 1);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text += &g.text(8);
    }
    text
}

/// Runs a config through the plan with pretend processes: each worker spawns, gets ready,
/// then the primary stops; the clock jumps to every deadline and then past the longest
/// duration a config may hold.
fn exercise_plan(config: &Config) {
    let mut plan = Plan::new(config, 7);
    let mut now = Instant::now();
    let mut pending = plan.start(now).actions;
    let mut pid = 100;
    for round in 0..8 {
        let mut next = Vec::new();
        for action in pending.drain(..) {
            if let Action::Spawn { id, .. } = action {
                pid += 1;
                next.extend(plan.handle(Event::Spawned { id, pid }, now).actions);
                let ready = Event::Message {
                    id,
                    message: WorkerMessage::Ready,
                };
                next.extend(plan.handle(ready, now).actions);
            }
        }
        if round == 4 {
            let stop = Event::Shutdown {
                immediate: false,
                timeout: None,
            };
            next.extend(plan.handle(stop, now).actions);
        }
        if let Some(deadline) = plan.next_deadline() {
            now = now.max(deadline);
            next.extend(plan.tick(now).actions);
        }
        let _ = plan.status(now);
        pending = next;
    }
    let far = now + MAX_DURATION + MAX_DURATION;
    let _ = plan.tick(far);
    let _ = plan.status(far);
}

#[test]
fn any_config_text_loads_or_is_refused_and_what_loads_runs() {
    let mut g = Gen::new("config");
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..400 {
        let text = config_text(&mut g);
        match Config::from_toml(&text, Path::new("/etc/ustad/ustad.toml")) {
            Ok(config) => {
                loaded += 1;
                assert_eq!(config.validate(), Ok(()), "case {case}:\n{text}");
                let total: usize = config.pools.values().map(|p| p.size.count()).sum();
                if total <= 16 {
                    exercise_plan(&config);
                }
            }
            Err(error) => {
                refused += 1;
                let message = error.to_string();
                assert!(message.contains("ustad.toml"), "case {case}: {message}");
            }
        }
    }
    // The generator reaches both sides.
    assert!(
        loaded > 100 && refused > 100,
        "{loaded} loaded, {refused} refused"
    );
}

#[test]
fn durations_are_bounded_and_read_back_as_written() {
    let mut g = Gen::new("durations");
    let units = ["ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y", "", "x"];
    for case in 0..2000 {
        let duration = g.duration();
        let written = format_duration(duration);
        assert_eq!(
            parse_duration(&written),
            Ok(duration),
            "case {case}: {written}"
        );

        let mut text = String::new();
        for _ in 0..1 + g.below(3) {
            let number = match g.below(3) {
                0 => g.below(100) as u64,
                1 => g.next() % 1_000_000_000_000,
                _ => g.next(),
            };
            text += &format!("{number}{}", g.pick(&units));
        }
        if let Ok(duration) = parse_duration(&text) {
            assert!(duration <= MAX_DURATION, "case {case}: {text}");
            // Every deadline the plan computes from it fits an Instant.
            let jittered = duration.mul_f64(1.1);
            assert!(Instant::now().checked_add(jittered + duration).is_some());
        }
    }
}

#[test]
fn value_types_read_back_what_they_write() {
    let mut g = Gen::new("values");
    for case in 0..500 {
        let words: Vec<String> = (0..1 + g.below(4)).map(|_| g.text(8)).collect();
        if let Ok(command) = Command::new(words.clone()) {
            let line = command.to_string();
            let again = Command::parse_line(&line);
            assert_eq!(
                again.as_ref().map(Command::words),
                Ok(&words[..]),
                "case {case}: {line:?}"
            );
        }
        let size = Size::fixed(1 + g.below(100_000)).unwrap();
        assert_eq!(size.to_string().parse(), Ok(size));
        let delay = Readiness::Delay(g.duration());
        let readiness = *g.pick(&[
            Readiness::Notify,
            Readiness::Listening,
            Readiness::Message,
            Readiness::None,
            delay,
        ]);
        assert_eq!(readiness.to_string().parse(), Ok(readiness), "case {case}");
        let addr = ListenAddr::Tcp(std::net::SocketAddr::new(
            std::net::Ipv6Addr::from(g.next() as u128 * g.next() as u128).into(),
            g.next() as u16,
        ));
        assert_eq!(addr.to_string().parse(), Ok(addr.clone()), "case {case}");
        for mode in [
            SocketMode::Shared,
            SocketMode::ReusePort,
            SocketMode::RoundRobin,
        ] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
        for ipc in [IpcProtocol::Node, IpcProtocol::Ustad] {
            assert_eq!(ipc.to_string().parse(), Ok(ipc));
        }
        // Whatever the text, no panic; an amount is at least a byte, a signal 1 to 64.
        let text = g.text(12);
        if let Ok(ByteSize(bytes)) = text.parse() {
            assert!(bytes >= 1, "case {case}: {text:?}");
        }
        if let Ok(signal) = text.parse::<Signal>() {
            assert!((1..=64).contains(&signal.number()), "case {case}: {text:?}");
        }
        let _ = (
            text.parse::<Size>(),
            text.parse::<ListenAddr>(),
            parse_duration(&text),
        );
    }
}

// ----- control requests --------------------------------------------------------------------

fn request(g: &mut Gen) -> Request {
    let name = |g: &mut Gen| g.text(10);
    match g.below(8) {
        0 => Request::Status {},
        1 => Request::Reload {
            pools: (0..g.below(3)).map(|_| name(g)).collect(),
            wait: g.chance(2),
        },
        2 => Request::Scale {
            pool: name(g),
            size: g.chance(2).then(|| g.next() as usize),
            delta: g.chance(2).then(|| g.next() as i64),
        },
        3 => Request::Restart {
            pool: g.chance(2).then(|| name(g)),
            worker: g.chance(2).then(|| g.next()),
        },
        4 => Request::Stop {
            timeout: g.chance(2).then(|| name(g)),
            worker: g.chance(2).then(|| g.next()),
        },
        6 => Request::Kill {
            pool: g.chance(2).then(|| name(g)),
            worker: g.chance(2).then(|| g.next()),
            signal: g.chance(2).then(|| name(g)),
        },
        5 => Request::Logs {
            pool: g.chance(2).then(|| name(g)),
            lines: g.next() as usize,
            follow: g.chance(2),
        },
        _ => Request::Events {},
    }
}

#[test]
fn control_requests_read_back_and_anything_else_is_refused_with_a_reason() {
    let mut g = Gen::new("control");
    for case in 0..1000 {
        let request = request(&mut g);
        let mut line = serde_json::to_vec(&request).unwrap();
        line.push(b'\n');
        assert_eq!(parse_request(&line), Ok(request.clone()), "case {case}");

        // Mangled: a byte changed, the line cut, or garbage. Never a panic; a refusal says why.
        let mut mangled = line.clone();
        match g.below(3) {
            0 => {
                let at = g.below(mangled.len());
                mangled[at] = g.next() as u8;
            }
            1 => mangled.truncate(g.below(mangled.len())),
            _ => mangled = g.bytes(64),
        }
        if let Err(why) = parse_request(&mangled) {
            assert!(!why.is_empty());
        }
        if mangled.last() != Some(&b'\n') {
            assert!(parse_request(&mangled).is_err(), "case {case}: no newline");
        }
    }
    let mut long = br#"{"command":"status"}"#.to_vec();
    long.resize(MAX_REQUEST, b' ');
    long.push(b'\n');
    assert!(parse_request(&long).unwrap_err().contains("longer than"));
}

// ----- notify datagrams --------------------------------------------------------------------

#[test]
fn notify_datagrams_say_what_their_lines_say_or_are_refused_whole() {
    let mut g = Gen::new("notify");
    for case in 0..1000 {
        let mut lines = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..1 + g.below(5) {
            match g.below(8) {
                0 => {
                    lines.push("READY=1".to_owned());
                    expected.push(WorkerMessage::Ready);
                }
                1 => {
                    lines.push("STOPPING=1".to_owned());
                    expected.push(WorkerMessage::Stopping);
                }
                2 => {
                    lines.push("WATCHDOG=1".to_owned());
                    expected.push(WorkerMessage::Watchdog);
                }
                3 => {
                    lines.push("USTAD_REQUEST=restart".to_owned());
                    expected.push(WorkerMessage::RequestRestart);
                }
                4 => {
                    // A status: any text without a newline, long ones cut to 200 bytes.
                    let text = g.text(300).replace('\n', " ");
                    lines.push(format!("STATUS={text}"));
                    let mut end = text.len().min(200);
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    let shown = match text.len() > 200 {
                        true => format!("{}…", &text[..end]),
                        false => text,
                    };
                    expected.push(WorkerMessage::Status(shown));
                }
                5 => lines.push(format!("MAINPID={}", g.next())),
                6 => lines.push("X_VENDOR_THING=whatever".to_owned()),
                _ => lines.push(String::new()),
            }
        }
        let datagram = lines.join("\n");
        if datagram.trim().is_empty() {
            assert!(ustad_core::notify::parse(datagram.as_bytes()).is_err());
            continue;
        }
        assert_eq!(
            ustad_core::notify::parse(datagram.as_bytes()),
            Ok(expected),
            "case {case}: {datagram:?}"
        );

        // Garbage: never a panic, and a status is never longer than 200 bytes and the ellipsis.
        let mut garbage = datagram.into_bytes();
        garbage.extend(g.bytes(40));
        if let Ok(messages) = ustad_core::notify::parse(&garbage) {
            for message in messages {
                if let WorkerMessage::Status(text) = message {
                    assert!(text.len() <= 203, "case {case}");
                }
            }
        }
    }
}

// ----- the framed channel ------------------------------------------------------------------

/// One frame as either side writes it, with the kind it must be read as.
fn envelope(g: &mut Gen) -> (Bytes, Kind, Option<Value>) {
    let id = g.next();
    let body = g.json(3);
    let kind = match g.below(10) {
        0 => Kind::Ready,
        1 => Kind::Heartbeat,
        2 => Kind::Restart,
        3 => Kind::Stopping,
        4 => Kind::Stop {
            deadline_ms: g.next(),
        },
        5 => Kind::Err {
            id,
            message: g.text(20),
        },
        6 => Kind::Conn { socket: g.text(8) },
        7 => Kind::Msg,
        8 => Kind::Req { id },
        _ => Kind::Rep { id },
    };
    match kind {
        Kind::Msg | Kind::Req { .. } | Kind::Rep { .. } => {
            let mut out = BytesMut::new();
            ipc::encode_body(&mut out, &kind, &body).unwrap();
            (out.freeze(), kind, Some(body))
        }
        _ => (ipc::encode_simple(&kind), kind, None),
    }
}

#[test]
fn frames_read_back_however_the_stream_is_split() {
    let mut g = Gen::new("frames");
    for case in 0..300 {
        let written: Vec<_> = (0..1 + g.below(6)).map(|_| envelope(&mut g)).collect();
        let stream: Vec<u8> = written.iter().flat_map(|(f, _, _)| f.to_vec()).collect();
        let mut reader = FrameReader::new(Chunked::new(stream, &mut g), ipc::DEFAULT_MAX_FRAME);
        for (_, kind, body) in &written {
            let frame = run(reader.next()).unwrap().expect("a frame");
            let envelope = ipc::decode(frame.clone()).unwrap();
            assert_eq!(&envelope.kind, kind, "case {case}");
            if let Some(body) = body {
                assert_eq!(&envelope.decode::<Value>().unwrap(), body, "case {case}");
                // Read by the general path (a leading space), the same envelope.
                let mut spaced = b" ".to_vec();
                spaced.extend_from_slice(&frame);
                let general = ipc::decode(Bytes::from(spaced)).unwrap();
                assert_eq!(&general.kind, kind, "case {case}");
                assert_eq!(&general.decode::<Value>().unwrap(), body, "case {case}");
            }
        }
        assert!(run(reader.next()).unwrap().is_none());
    }
}

#[test]
fn any_bytes_on_the_channel_give_bounded_frames_or_a_protocol_error() {
    let mut g = Gen::new("frame garbage");
    for case in 0..1000 {
        let max = *g.pick(&[1, 16, 100, ipc::DEFAULT_MAX_FRAME]);
        let mut stream = Vec::new();
        for _ in 0..g.below(4) {
            // Mostly plausible frames with bodies that are not quite envelopes.
            let mut body = serde_json::to_vec(&g.json(2)).unwrap();
            if g.chance(3) {
                body = g.bytes(20);
            }
            let len = match g.below(6) {
                0 => g.next() as u32,
                1 => 0,
                _ => body.len() as u32,
            };
            stream.extend_from_slice(&len.to_le_bytes());
            stream.extend_from_slice(&body);
        }
        stream.extend(g.bytes(6));
        let mut reader = FrameReader::new(Chunked::new(stream, &mut g), max);
        loop {
            match run(reader.next()) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= max, "case {case}");
                    let _ = ipc::decode(frame).map(|e| e.decode::<Value>());
                }
                Ok(None) => break,
                Err(FrameError::TooLong { len, max: limit }) => {
                    assert!(len > limit, "case {case}");
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

// ----- Node's channel ----------------------------------------------------------------------

#[test]
fn node_lines_read_back_however_the_stream_is_split() {
    let mut g = Gen::new("node");
    for case in 0..300 {
        let values: Vec<Value> = (0..1 + g.below(6))
            .map(|_| match g.below(6) {
                0 => json!("ready"),
                1 => json!({"ustad": *g.pick(&["ready", "restart", "stopping", "heartbeat"])}),
                2 => json!({"cmd": "NODE_HANDLE", "msg": g.json(1)}),
                _ => g.json(3),
            })
            .collect();
        let mut stream = BytesMut::new();
        for value in &values {
            ipc::node::encode(&mut stream, value).unwrap();
        }
        let mut reader = ipc::node::LineReader::new(Chunked::new(stream.to_vec(), &mut g), 1 << 20);
        for value in &values {
            let line = run(reader.next()).unwrap().expect("a line");
            let decoded = ipc::node::decode(line).unwrap();
            let internal = value["cmd"]
                .as_str()
                .is_some_and(|c| c.starts_with("NODE_"));
            let asks = value.get("ustad").is_some() || *value == json!("ready");
            match decoded {
                None => assert!(internal, "case {case}: {value}"),
                Some(envelope) if envelope.kind == Kind::Msg => {
                    assert!(!internal && !asks, "case {case}: {value}");
                    assert_eq!(&envelope.decode::<Value>().unwrap(), value, "case {case}");
                }
                Some(_) => assert!(asks, "case {case}: {value}"),
            }
        }
        assert!(run(reader.next()).unwrap().is_none());

        // Garbage and a small limit: lines within the limit or an error, never a panic.
        let mut garbage = stream.to_vec();
        let at = g.below(garbage.len());
        garbage.insert(at, g.next() as u8);
        let max = 1 + g.below(64);
        let mut reader = ipc::node::LineReader::new(Chunked::new(garbage, &mut g), max);
        while let Ok(Some(line)) = run(reader.next()) {
            assert!(line.len() <= max, "case {case}");
            let _ = ipc::node::decode(line);
        }
    }
}
