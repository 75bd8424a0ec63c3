//! Passing connections over the channel (`round-robin` sockets): the primary sends a `conn`
//! frame with the connection's fd attached (`SCM_RIGHTS`), the worker reads frames with
//! `recvmsg` and pairs each `conn` frame with the next fd received.
//!
//! On a Unix stream socket, ancillary data travels with the first byte of the `sendmsg` it was
//! given to, so by the time a worker has read a whole `conn` frame its fd has arrived: fds and
//! `conn` frames pair up in order.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::UnixStream;

/// Most fds accepted with one `recvmsg` (more are closed by the kernel).
const MAX_FDS: usize = 32;

/// Fds received and not yet claimed by their `conn` frame.
pub type ReceivedFds = Arc<Mutex<VecDeque<OwnedFd>>>;

/// Writes `frame` with `fd` attached to its first byte.
///
/// # Errors
/// When the socket fails (the worker is gone).
pub async fn send_with_fd(stream: &UnixStream, frame: &[u8], fd: &OwnedFd) -> io::Result<()> {
    let sent = {
        stream
            .async_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                let fds = [fd.as_fd()];
                control.push(SendAncillaryMessage::ScmRights(&fds));
                sendmsg(
                    stream,
                    &[IoSlice::new(frame)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            })
            .await?
    };
    if sent < frame.len() {
        super::write_all(stream, &frame[sent..]).await?;
    }
    Ok(())
}

/// Reads a socket that others write to (the channel's writer, senders writing through).
/// Fds a peer attaches are not accepted: the kernel closes them.
#[derive(Debug)]
pub struct SocketReader(pub Arc<UnixStream>);

impl AsyncRead for SocketReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &*self.get_mut().0;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            match stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

/// Reads the channel with `recvmsg`, keeping the fds that come along.
#[derive(Debug)]
pub struct FdReader {
    stream: Arc<UnixStream>,
    fds: ReceivedFds,
}

impl FdReader {
    /// Reads `stream`; fds received go to [`FdReader::fds`].
    pub fn new(stream: Arc<UnixStream>) -> FdReader {
        FdReader {
            stream,
            fds: ReceivedFds::default(),
        }
    }

    /// Where received fds wait for their `conn` frame.
    pub fn fds(&self) -> ReceivedFds {
        self.fds.clone()
    }
}

impl AsyncRead for FdReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let stream = &*this.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = stream.try_io(Interest::READABLE, || {
                recvmsg(
                    stream,
                    &mut [IoSliceMut::new(unfilled)],
                    &mut control,
                    RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match received {
                Ok(message) => {
                    let mut fds = this.fds.lock().unwrap_or_else(|e| e.into_inner());
                    for ancillary in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(passed) = ancillary {
                            fds.extend(passed);
                        }
                    }
                    drop(fds);
                    buf.advance(message.bytes);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::ipc::{FrameReader, Kind, decode, encode_simple};

    #[tokio::test]
    async fn each_conn_frame_arrives_with_its_fd_in_order() {
        let (writer, worker) = tokio::net::UnixStream::pair().unwrap();
        let reader = FdReader::new(Arc::new(worker));
        let fds = reader.fds();
        let mut frames = FrameReader::new(reader, 1024);
        let mut peers = Vec::new();
        for n in 0..5 {
            let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let frame = encode_simple(&Kind::Conn {
                socket: format!("s{n}"),
            });
            send_with_fd(&writer, &frame, &OwnedFd::from(theirs))
                .await
                .unwrap();
            // A plain frame in between, without an fd.
            crate::ipc::write_all(&writer, &encode_simple(&Kind::Heartbeat))
                .await
                .unwrap();
            peers.push(mine);
        }
        for (n, mut peer) in peers.into_iter().enumerate() {
            let conn = decode(frames.next().await.unwrap().unwrap()).unwrap();
            assert_eq!(
                conn.kind,
                Kind::Conn {
                    socket: format!("s{n}")
                }
            );
            let fd = fds
                .lock()
                .unwrap()
                .pop_front()
                .expect("its fd came with it");
            let mut passed = std::os::unix::net::UnixStream::from(fd);
            passed.write_all(&[n as u8]).unwrap();
            let mut byte = [0u8];
            peer.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], n as u8);
            let plain = decode(frames.next().await.unwrap().unwrap()).unwrap();
            assert_eq!(plain.kind, Kind::Heartbeat);
        }
        assert!(fds.lock().unwrap().is_empty());
    }
}
