//! The channel between a primary and each of its library workers: a Unix stream socket
//! (one end of a `socketpair`, passed to the worker as `USTAD_IPC_FD`) carrying frames.
//!
//! The wire format is language-neutral and documented in `docs/protocol.md`: each frame is a
//! 4-byte little-endian length followed by that many bytes of one JSON object, the
//! [`Envelope`]. Envelopes say what the frame is (`"t"`): lifecycle news (`ready`,
//! `heartbeat`, `restart`, `stopping`, `stop`), or the user's messages (`msg`), requests
//! (`req`), replies (`rep`) and failed replies (`err`), whose `body` is any JSON value.
//!
//! Reading is bounded: a frame longer than the agreed maximum, of length zero, or that is not
//! an envelope is a protocol error that ends the channel (the peer is cut off); it never
//! allocates more than the maximum.

pub mod channel;
mod envelope;
mod fdpass;
mod frame;
pub mod node;
mod outbox;
mod socket;

pub use envelope::{Envelope, Kind, decode, encode_body, encode_simple};
pub use fdpass::ReceivedFds;
pub use frame::{FrameError, FrameReader, frame};
pub use outbox::{Closed, OUTBOX_BYTES, Outbox, PushError};
pub use socket::{ChannelSocket, FdReader, SocketReader};
/// The channel's constants, spelled once in `ustad-proto` for both ends.
pub use ustad_proto::ipc::{DEFAULT_MAX_FRAME, HEADER};
/// The channel's variables under the names this module gave them before `ustad-proto`.
pub use ustad_proto::ipc::{USTAD_IPC_FD as IPC_FD_VAR, USTAD_IPC_MAX_FRAME as MAX_FRAME_VAR};
