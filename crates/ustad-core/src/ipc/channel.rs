//! One end of a channel, the same on both sides: the writer task that writes what the outbox
//! gathers (and, on the primary's side, connections handed over with their fds), and the
//! reader loop that reads frames, decodes their envelopes, arms write-through, and gives each
//! envelope to the side that owns the channel ([`Receiver`]). The primary's side
//! (`supervisor::link`) and the worker's (`ustad::worker`) differ only in their receivers.
//! The same loop reads Node's channel (JSON lines, [`super::node`]) into the same envelopes.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::node::LineReader;
use super::{ChannelSocket, Envelope, FrameError, FrameReader, Outbox, decode};
use crate::config::IpcProtocol;

/// A connection to hand to the peer: its `conn` frame and its fd.
pub type Handed = (Bytes, OwnedFd);

/// What a receiver wants after an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Read on.
    Continue,
    /// Stop reading: this side is done with the channel.
    Stop,
    /// The peer broke the protocol: stop reading, and say why.
    Broken(String),
}

/// What one side does with the envelopes its peer sends.
pub trait Receiver: Send {
    /// Takes one envelope. It may wait (the side is behind): the peer's writes then back up
    /// in the socket, and memory stays bounded.
    fn envelope(&mut self, envelope: Envelope) -> impl Future<Output = Flow> + Send;
}

/// How reading a channel ended.
#[derive(Debug)]
pub enum Ended {
    /// The peer closed its end (it exited, or closed the channel).
    Closed,
    /// The peer is gone in the middle of something: a read error, or the stream ended inside
    /// a frame (a process killed mid-write). Not a breach of the protocol.
    Lost(FrameError),
    /// The peer broke the protocol (a frame too long, empty, not an envelope, or an envelope
    /// the receiver refuses).
    Broken(String),
    /// The receiver stopped reading.
    Stopped,
}

/// Where envelopes come from: frames, or Node's lines.
enum Source<R> {
    Frames(FrameReader<R>),
    Lines(LineReader<R>),
}

impl<R: AsyncRead + Unpin> Source<R> {
    async fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
        match self {
            Source::Frames(frames) => frames.next().await,
            Source::Lines(lines) => lines.next().await,
        }
    }

    fn lone(&self) -> bool {
        match self {
            Source::Frames(frames) => frames.lone(),
            Source::Lines(lines) => lines.lone(),
        }
    }

    /// The envelope of a frame or line; `None` for what is not for ustad (Node's own).
    fn decode(&self, frame: Bytes) -> Result<Option<Envelope>, FrameError> {
        match self {
            Source::Frames(_) => decode(frame).map(Some),
            Source::Lines(_) => super::node::decode(frame),
        }
    }
}

/// Reads the peer's frames (or lines) of at most `max_frame` bytes in `protocol` and gives
/// their envelopes to `receiver`, until the channel ends; says how. A frame that comes alone
/// arms `outbox`'s write-through (see [`Outbox::heard`]).
pub async fn read<R, V>(
    reader: R,
    protocol: IpcProtocol,
    max_frame: usize,
    outbox: &Outbox,
    receiver: &mut V,
) -> Ended
where
    R: AsyncRead + Unpin + Send,
    V: Receiver,
{
    let mut frames = match protocol {
        IpcProtocol::Ustad => Source::Frames(FrameReader::new(reader, max_frame)),
        IpcProtocol::Node => Source::Lines(LineReader::new(reader, max_frame)),
    };
    loop {
        let frame = match frames.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ended::Closed,
            Err(error @ (FrameError::Io(_) | FrameError::Truncated { .. })) => {
                return Ended::Lost(error);
            }
            Err(error) => return Ended::Broken(error.to_string()),
        };
        let envelope = match frames.decode(frame) {
            Ok(Some(envelope)) => envelope,
            Ok(None) => continue,
            Err(error) => return Ended::Broken(error.to_string()),
        };
        if frames.lone() {
            outbox.heard();
        }
        match receiver.envelope(envelope).await {
            Flow::Continue => {}
            Flow::Stop => return Ended::Stopped,
            Flow::Broken(why) => return Ended::Broken(why),
        }
    }
}

/// Writes the outbox's batches to `socket`, and the connections that come through `handed`
/// with their fds (each closed here once sent: the peer has its own copy), until the outbox
/// closes or the socket fails (the outbox is then closed).
pub async fn write(
    outbox: Outbox,
    socket: Arc<ChannelSocket>,
    mut handed: Option<mpsc::Receiver<Handed>>,
) {
    let mut batch = BytesMut::with_capacity(4096);
    loop {
        let conn = async {
            match &mut handed {
                Some(handed) => handed.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            more = outbox.next_batch(&mut batch) => {
                if more.is_none() || !outbox.write_batch(&socket, &mut batch).await {
                    return;
                }
            }
            conn = conn => match conn {
                Some((frame, fd)) => {
                    outbox.hold();
                    let sent = socket.send_with_fd(&frame, &fd).await;
                    outbox.release();
                    if sent.is_err() {
                        outbox.close();
                        return;
                    }
                }
                None => handed = None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::socket::pair;
    use crate::ipc::{Kind, SocketReader, encode_simple};

    /// Keeps the kinds it is given; breaks on `stop`, stops after `stopping`.
    #[derive(Default)]
    struct Keep(Vec<Kind>);

    impl Receiver for Keep {
        async fn envelope(&mut self, envelope: Envelope) -> Flow {
            let flow = match envelope.kind {
                Kind::Stop { .. } => Flow::Broken("no stop here".to_owned()),
                Kind::Stopping => Flow::Stop,
                _ => Flow::Continue,
            };
            self.0.push(envelope.kind);
            flow
        }
    }

    async fn read_from(frames: &[&[u8]], close: bool) -> (Ended, Vec<Kind>) {
        let (near, far) = pair();
        for frame in frames {
            near.write_all(frame).await.unwrap();
        }
        if close {
            drop(near);
        } else {
            std::mem::forget(near);
        }
        let mut keep = Keep::default();
        let outbox = Outbox::new(1024);
        let ended = read(
            SocketReader(far),
            IpcProtocol::Ustad,
            1024,
            &outbox,
            &mut keep,
        )
        .await;
        (ended, keep.0)
    }

    #[tokio::test]
    async fn every_envelope_reaches_the_receiver_until_the_peer_closes() {
        let (ended, kinds) = read_from(
            &[
                &encode_simple(&Kind::Ready),
                &encode_simple(&Kind::Heartbeat),
            ],
            true,
        )
        .await;
        assert!(matches!(ended, Ended::Closed), "{ended:?}");
        assert_eq!(kinds, [Kind::Ready, Kind::Heartbeat]);
    }

    #[tokio::test]
    async fn a_receiver_ends_the_reading_when_it_stops_or_refuses() {
        let (ended, kinds) = read_from(
            &[
                &encode_simple(&Kind::Stopping),
                &encode_simple(&Kind::Ready),
            ],
            false,
        )
        .await;
        assert!(matches!(ended, Ended::Stopped), "{ended:?}");
        assert_eq!(kinds, [Kind::Stopping]);
        let stop = encode_simple(&Kind::Stop { deadline_ms: 1 });
        let (ended, _) = read_from(&[&stop], false).await;
        assert!(
            matches!(&ended, Ended::Broken(why) if why == "no stop here"),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn garbage_breaks_the_channel_and_a_cut_frame_loses_it() {
        let (ended, kinds) = read_from(&[b"\x05\x00\x00\x00hello"], false).await;
        assert!(matches!(ended, Ended::Broken(_)), "{ended:?}");
        assert!(kinds.is_empty());
        let (ended, _) = read_from(&[b"\x40\x00\x00\x00{\"t\":"], true).await;
        assert!(
            matches!(ended, Ended::Lost(FrameError::Truncated { .. })),
            "{ended:?}"
        );
        let (ended, _) = read_from(&[b"\xff\xff\x00\x00"], false).await;
        assert!(matches!(ended, Ended::Broken(_)), "too long: {ended:?}");
    }

    #[tokio::test]
    async fn nodes_lines_become_the_same_envelopes_and_its_own_messages_are_skipped() {
        let (near, far) = pair();
        near.write_all(b"\"ready\"\n{\"cmd\":\"NODE_X\"}\n{\"hits\":3}\n{\"ustad\":\"restart\"}\n")
            .await
            .unwrap();
        drop(near);
        let mut keep = Keep::default();
        let outbox = Outbox::new(1024);
        let ended = read(
            SocketReader(far),
            IpcProtocol::Node,
            1024,
            &outbox,
            &mut keep,
        )
        .await;
        assert!(matches!(ended, Ended::Closed), "{ended:?}");
        assert_eq!(keep.0, [Kind::Ready, Kind::Msg, Kind::Restart]);
    }

    #[tokio::test]
    async fn the_writer_writes_batches_and_handed_connections_in_order() {
        let (near, far) = pair();
        let outbox = Outbox::new(1024);
        outbox.attach(near.clone());
        let (conns, handed) = mpsc::channel(4);
        let writer = tokio::spawn(write(outbox.clone(), near, Some(handed)));
        outbox.push_now(&encode_simple(&Kind::Ready)).unwrap();
        let (conn, _kept) = std::os::unix::net::UnixStream::pair().unwrap();
        conns
            .send((encode_simple(&Kind::Heartbeat), conn.into()))
            .await
            .unwrap();
        drop(conns);
        let reader = crate::ipc::FdReader::new(far);
        let fds = reader.fds();
        let mut frames = FrameReader::new(reader, 1024);
        let first = decode(frames.next().await.unwrap().unwrap()).unwrap();
        let second = decode(frames.next().await.unwrap().unwrap()).unwrap();
        assert_eq!((first.kind, second.kind), (Kind::Ready, Kind::Heartbeat));
        assert_eq!(fds.lock().unwrap().len(), 1, "the fd came with its frame");
        outbox.close();
        writer.await.unwrap();
    }
}
