//! What a frame says (see the module docs of [`crate::ipc`] and `docs/protocol.md`).

use std::io::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
// The values of `"t"`, as `t::READY`.
use ustad_proto::ipc::kind as t;

use super::HEADER;
use super::frame::FrameError;

/// The kinds of frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Worker → primary: serving.
    Ready,
    /// Worker → primary: alive (for `watchdog`).
    Heartbeat,
    /// Worker → primary: replace me (rolling).
    Restart,
    /// Worker → primary: I am shutting down on my own.
    Stopping,
    /// Primary → worker: stop gracefully within `deadline_ms`.
    Stop {
        /// Milliseconds before the worker's process group is killed.
        deadline_ms: u64,
    },
    /// Either way: a message.
    Msg,
    /// Either way: a request, to be answered with `rep` or `err` of the same id.
    Req {
        /// Chosen by the sender, unique among its requests in flight.
        id: u64,
    },
    /// Either way: the answer to request `id`.
    Rep {
        /// The request's id.
        id: u64,
    },
    /// Either way: request `id` failed.
    Err {
        /// The request's id.
        id: u64,
        /// Why.
        message: String,
    },
    /// Primary → worker: a connection accepted on `round-robin` socket `socket`; its fd is
    /// attached (`SCM_RIGHTS`).
    Conn {
        /// The socket's name.
        socket: String,
    },
}

/// A decoded frame: its kind, and where its `body` is in the frame.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// What it is.
    pub kind: Kind,
    frame: Bytes,
    body: Option<std::ops::Range<usize>>,
}

impl Envelope {
    /// An envelope whose body is the whole of `json` (a message of Node's channel).
    pub(crate) fn whole(kind: Kind, json: Bytes) -> Envelope {
        let body = Some(0..json.len());
        Envelope {
            kind,
            frame: json,
            body,
        }
    }

    /// The `body` as raw JSON text (`msg`, `req` and `rep` have one).
    pub fn body(&self) -> Option<&[u8]> {
        self.body.clone().map(|range| &self.frame[range])
    }

    /// The `body`, deserialized.
    ///
    /// # Errors
    /// When there is no body or it does not fit `T`.
    pub fn decode<T: for<'de> Deserialize<'de>>(&self) -> Result<T, serde_json::Error> {
        let body = self.body().unwrap_or(b"null");
        serde_json::from_slice(body)
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    t: &'a str,
    #[serde(default)]
    id: Option<u64>,
    // `null` is a body like any other value (`Option<&RawValue>` alone would read it as none).
    #[serde(borrow, default, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    #[serde(default)]
    socket: Option<String>,
}

/// A field that is there, whatever its value: `Some`, even for `null`.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Decodes a frame body (as [`super::FrameReader::next`] returns it).
///
/// # Errors
/// [`FrameError::Envelope`] when it is not an envelope of a known kind with its fields.
pub fn decode(frame: Bytes) -> Result<Envelope, FrameError> {
    if let Some(envelope) = decode_canonical(&frame) {
        return Ok(envelope);
    }
    let wire: Wire<'_> =
        serde_json::from_slice(&frame).map_err(|e| FrameError::Envelope(e.to_string()))?;
    let needs_id = |what: &str| {
        wire.id
            .ok_or_else(|| FrameError::Envelope(format!("a `{what}` frame needs an `id`")))
    };
    let kind = match wire.t {
        t::READY => Kind::Ready,
        t::HEARTBEAT => Kind::Heartbeat,
        t::RESTART => Kind::Restart,
        t::STOPPING => Kind::Stopping,
        t::STOP => Kind::Stop {
            deadline_ms: wire.deadline_ms.unwrap_or(0),
        },
        t::MSG => Kind::Msg,
        t::REQ => Kind::Req {
            id: needs_id(t::REQ)?,
        },
        t::REP => Kind::Rep {
            id: needs_id(t::REP)?,
        },
        t::ERR => Kind::Err {
            id: needs_id(t::ERR)?,
            message: wire.message.clone().unwrap_or_default(),
        },
        t::CONN => Kind::Conn {
            socket: wire.socket.clone().ok_or_else(|| {
                FrameError::Envelope(format!("a `{}` frame needs a `socket`", t::CONN))
            })?,
        },
        other => {
            return Err(FrameError::Envelope(format!(
                "unknown frame type `{}`",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let body = match (&kind, wire.body) {
        (Kind::Msg | Kind::Req { .. } | Kind::Rep { .. }, None) => {
            return Err(FrameError::Envelope(format!(
                "a `{}` frame needs a `body`",
                wire.t
            )));
        }
        (_, Some(raw)) => {
            // The raw value borrows from `frame`: its offset locates the body in the frame.
            let start = raw.get().as_ptr() as usize - frame.as_ptr() as usize;
            Some(start..start + raw.get().len())
        }
        (_, None) => None,
    };
    Ok(Envelope { kind, frame, body })
}

// The heads are spelled out, to be matched and copied byte for byte; a test checks them
// against the kinds' names.

/// The start of a `msg` frame as [`encode_body`] writes it.
const MSG_HEAD: &[u8] = b"{\"t\":\"msg\",\"body\":";
/// The start of a `req` frame, before its id.
const REQ_HEAD: &[u8] = b"{\"t\":\"req\",\"id\":";
/// The start of a `rep` frame, before its id.
const REP_HEAD: &[u8] = b"{\"t\":\"rep\",\"id\":";
/// Between the id and the body.
const BODY_KEY: &[u8] = b",\"body\":";

/// `msg`, `req` and `rep` frames as [`encode_body`] writes them (the keys in its order, no
/// spaces), decoded without the general path: the envelope is matched byte for byte and only
/// the body is scanned, to check that it is exactly one JSON value. Anything else (another
/// order, spaces, more fields, a body that is not one value) is left to the general path,
/// which accepts or refuses it as before.
fn decode_canonical(frame: &Bytes) -> Option<Envelope> {
    let bytes = &frame[..];
    let (kind, rest) = if let Some(rest) = bytes.strip_prefix(MSG_HEAD) {
        (Kind::Msg, rest)
    } else {
        let (req, rest) = match bytes.strip_prefix(REQ_HEAD) {
            Some(rest) => (true, rest),
            None => (false, bytes.strip_prefix(REP_HEAD)?),
        };
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (number, rest) = rest.split_at(digits);
        // No leading zeros, as JSON has none; 20 digits may overflow: the general path says so.
        if digits == 0 || digits > 19 || (digits > 1 && number.first() == Some(&b'0')) {
            return None;
        }
        let id = number
            .iter()
            .fold(0u64, |id, digit| id * 10 + u64::from(digit - b'0'));
        let rest = rest.strip_prefix(BODY_KEY)?;
        (
            if req {
                Kind::Req { id }
            } else {
                Kind::Rep { id }
            },
            rest,
        )
    };
    let start = bytes.len() - rest.len();
    let inner = rest.strip_suffix(b"}")?;
    // Skipping the value does not check that its strings are UTF-8 (the general path's
    // `RawValue` does): a body that is not is refused when it is decoded instead of on arrival,
    // as checking here would make decoding a large body several times slower.
    serde_json::from_slice::<serde::de::IgnoredAny>(inner).ok()?;
    let end = start + inner.trim_ascii_end().len();
    Some(Envelope {
        kind,
        frame: frame.clone(),
        body: Some(start..end),
    })
}

/// Appends `n` in decimal.
fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Writes a whole frame (header included) of a kind with a body: `msg`, `req`, `rep`.
///
/// # Errors
/// When `body` cannot be serialized (e.g. a map with non-string keys).
pub fn encode_body<T: Serialize + ?Sized>(
    out: &mut BytesMut,
    kind: &Kind,
    body: &T,
) -> Result<(), serde_json::Error> {
    let start = out.len();
    out.put_u32_le(0);
    // The envelope by hand (no formatting machinery, no allocation), the body with serde.
    match kind {
        Kind::Req { id } | Kind::Rep { id } => {
            out.extend_from_slice(if matches!(kind, Kind::Req { .. }) {
                REQ_HEAD
            } else {
                REP_HEAD
            });
            put_decimal(out, *id);
            out.extend_from_slice(BODY_KEY);
        }
        _ => out.extend_from_slice(MSG_HEAD),
    }
    let mut writer = out.writer();
    let written = serde_json::to_writer(&mut writer, body)
        .and_then(|()| writer.write_all(b"}").map_err(serde_json::Error::io));
    let out = writer.into_inner();
    if let Err(error) = written {
        out.truncate(start);
        return Err(error);
    }
    let len = (out.len() - start - HEADER) as u32;
    out[start..start + HEADER].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// A whole frame of a kind without a body: `ready`, `heartbeat`, `restart`, `stopping`,
/// `stop`, `err`.
pub fn encode_simple(kind: &Kind) -> Bytes {
    #[derive(Serialize)]
    struct Simple<'a> {
        t: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        socket: Option<&'a str>,
    }
    let simple = match kind {
        Kind::Ready => Simple {
            t: t::READY,
            id: None,
            message: None,
            deadline_ms: None,
            socket: None,
        },
        Kind::Heartbeat => Simple {
            t: t::HEARTBEAT,
            id: None,
            message: None,
            deadline_ms: None,
            socket: None,
        },
        Kind::Restart => Simple {
            t: t::RESTART,
            id: None,
            message: None,
            deadline_ms: None,
            socket: None,
        },
        Kind::Stopping => Simple {
            t: t::STOPPING,
            id: None,
            message: None,
            deadline_ms: None,
            socket: None,
        },
        Kind::Stop { deadline_ms } => Simple {
            t: t::STOP,
            id: None,
            message: None,
            deadline_ms: Some(*deadline_ms),
            socket: None,
        },
        Kind::Err { id, message } => Simple {
            t: t::ERR,
            id: Some(*id),
            message: Some(message),
            deadline_ms: None,
            socket: None,
        },
        Kind::Conn { socket } => Simple {
            t: t::CONN,
            id: None,
            message: None,
            deadline_ms: None,
            socket: Some(socket),
        },
        Kind::Msg | Kind::Req { .. } | Kind::Rep { .. } => {
            let mut out = BytesMut::new();
            encode_body(&mut out, kind, &()).expect("unit serializes");
            return out.freeze();
        }
    };
    super::frame(&serde_json::to_vec(&simple).expect("a simple envelope serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(frame: &[u8]) -> Bytes {
        Bytes::copy_from_slice(&frame[HEADER..])
    }

    #[test]
    fn bodies_are_written_and_read_back_without_copying() {
        let mut out = BytesMut::new();
        encode_body(
            &mut out,
            &Kind::Req { id: 7 },
            &serde_json::json!({"type": "add", "n": 2}),
        )
        .unwrap();
        let frame = out.freeze();
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - HEADER);
        let envelope = decode(body_of(&frame)).unwrap();
        assert_eq!(envelope.kind, Kind::Req { id: 7 });
        assert_eq!(envelope.body().unwrap(), br#"{"n":2,"type":"add"}"#);
        let value: serde_json::Value = envelope.decode().unwrap();
        assert_eq!(value["n"], 2);
    }

    #[test]
    fn the_canonical_heads_spell_the_kinds_names() {
        let head = |kind: &str| format!(r#"{{"t":"{kind}","#);
        assert_eq!(MSG_HEAD, format!(r#"{}"body":"#, head(t::MSG)).as_bytes());
        assert_eq!(REQ_HEAD, format!(r#"{}"id":"#, head(t::REQ)).as_bytes());
        assert_eq!(REP_HEAD, format!(r#"{}"id":"#, head(t::REP)).as_bytes());
    }

    #[test]
    fn simple_kinds_round_trip() {
        for kind in [
            Kind::Ready,
            Kind::Heartbeat,
            Kind::Restart,
            Kind::Stopping,
            Kind::Stop { deadline_ms: 3000 },
            Kind::Err {
                id: 4,
                message: "no such task".into(),
            },
            Kind::Conn {
                socket: "web".into(),
            },
        ] {
            let frame = encode_simple(&kind);
            assert_eq!(decode(body_of(&frame)).unwrap().kind, kind);
        }
    }

    #[test]
    fn what_other_languages_write_is_read_too() {
        let envelope = decode(Bytes::from_static(
            br#" { "body" : [1, 2] , "t" : "msg", "extra": true }"#,
        ))
        .unwrap();
        assert_eq!(envelope.kind, Kind::Msg);
        assert_eq!(envelope.body().unwrap(), b"[1, 2]");
    }

    #[test]
    fn malformed_envelopes_are_refused_with_the_reason() {
        let refuse = |text: &'static [u8]| match decode(Bytes::from_static(text)) {
            Err(FrameError::Envelope(why)) => why,
            other => panic!("accepted {other:?}"),
        };
        assert!(refuse(b"not json").contains("expected"));
        assert!(refuse(br#"{"t":"explode"}"#).contains("unknown frame type `explode`"));
        assert!(refuse(br#"{"t":"req","body":1}"#).contains("needs an `id`"));
        assert!(refuse(br#"{"t":"msg"}"#).contains("needs a `body`"));
        assert!(refuse(br#"{"body":1}"#).contains("missing field `t`"));
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/ipc_frame.rs`): the general path read `"body": null`
    /// as no body and cut off a worker that answered `null` with a space in its frame, while
    /// the same frame without spaces was taken.
    #[test]
    fn a_null_body_is_a_body_on_either_path() {
        for frame in [
            &br#"{"t":"rep","id":7,"body":null}"#[..],
            br#"{"t": "rep", "id": 7, "body": null}"#,
        ] {
            let envelope = decode(Bytes::from_static(frame)).unwrap();
            assert_eq!(envelope.kind, Kind::Rep { id: 7 });
            assert_eq!(envelope.body(), Some(&b"null"[..]));
        }
        assert!(
            decode(Bytes::from_static(br#"{"t":"ready"}"#))
                .unwrap()
                .body()
                .is_none()
        );
    }

    /// The general path, for comparison with what `decode` (and its fast path) says.
    fn decode_general(frame: &'static [u8]) -> Result<(Kind, Option<Vec<u8>>), String> {
        let wire: Wire<'_> = serde_json::from_slice(frame).map_err(|e| e.to_string())?;
        let envelope = decode(Bytes::from_static(frame)).map_err(|e| e.to_string())?;
        assert_eq!(
            wire.body.map(|raw| raw.get().as_bytes().to_vec()),
            envelope.body().map(<[u8]>::to_vec)
        );
        Ok((envelope.kind.clone(), envelope.body().map(<[u8]>::to_vec)))
    }

    #[test]
    fn frames_as_written_take_the_fast_path_to_the_same_envelope() {
        for (kind, body) in [
            (Kind::Msg, serde_json::json!({"type": "small", "n": 1})),
            (Kind::Req { id: 0 }, serde_json::json!("}")),
            (
                Kind::Req { id: u64::MAX / 10 },
                serde_json::json!([1, {"a": "}"}]),
            ),
            (Kind::Rep { id: 12 }, serde_json::json!(null)),
        ] {
            let mut out = BytesMut::new();
            encode_body(&mut out, &kind, &body).unwrap();
            let frame = body_of(&out);
            let fast = decode_canonical(&frame).expect("the fast path takes it");
            assert_eq!(fast.kind, kind);
            assert_eq!(fast.decode::<serde_json::Value>().unwrap(), body);
            assert_eq!(decode(frame).unwrap().body(), fast.body());
        }
    }

    #[test]
    fn frames_that_only_look_canonical_get_the_general_answer() {
        for frame in [
            &br#"{"t":"msg","body":1 }"#[..],
            br#"{"t":"msg","body":{"a":1},"extra":true}"#,
            br#"{"t":"rep","id":18446744073709551615,"body":1}"#,
        ] {
            let general = decode_general(frame);
            assert!(general.is_ok(), "{general:?}");
        }
        for frame in [
            &br#"{"t":"msg","body":1,"body":2}"#[..],
            br#"{"t":"msg","body":nope}"#,
            br#"{"t":"req","id":7,"body":[1,2],"t":"rep"}"#,
            br#"{"t":"msg","body":{"a":1}"#,
            br#"{"t":"req","id":007,"body":1}"#,
            br#"{"t":"req","id":18446744073709551616,"body":1}"#,
            br#"{"t":"rep","id":-1,"body":1}"#,
            br#"{"t":"msg","body":}"#,
        ] {
            assert!(
                decode_canonical(&Bytes::from_static(frame)).is_none(),
                "{frame:?}"
            );
            assert!(decode(Bytes::from_static(frame)).is_err(), "{frame:?}");
        }
    }
}
