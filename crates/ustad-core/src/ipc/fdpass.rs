//! Passing connections over the channel (`round-robin` sockets): the primary sends a `conn`
//! frame with the connection's fd attached (`SCM_RIGHTS`, [`ChannelSocket::send_with_fd`]),
//! the worker reads frames with `recvmsg` ([`super::FdReader`]) and pairs each `conn` frame
//! with the next fd received.
//!
//! On a Unix stream socket, ancillary data travels with the first byte of the `sendmsg` it was
//! given to, so by the time a worker has read a whole `conn` frame its fd has arrived: fds and
//! `conn` frames pair up in order.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

#[cfg(doc)]
use super::ChannelSocket;

/// Fds received and not yet claimed by their `conn` frame.
pub type ReceivedFds = Arc<Mutex<VecDeque<OwnedFd>>>;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::ipc::{ChannelSocket, FdReader, FrameReader, Kind, decode, encode_simple};

    #[tokio::test]
    async fn each_conn_frame_arrives_with_its_fd_in_order() {
        let (writer, worker) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = ChannelSocket::new(writer.into()).unwrap();
        let reader = FdReader::new(Arc::new(ChannelSocket::new(worker.into()).unwrap()));
        let fds = reader.fds();
        let mut frames = FrameReader::new(reader, 1024);
        let mut peers = Vec::new();
        for n in 0..5 {
            let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let frame = encode_simple(&Kind::Conn {
                socket: format!("s{n}"),
            });
            writer
                .send_with_fd(&frame, &OwnedFd::from(theirs))
                .await
                .unwrap();
            // A plain frame in between, without an fd.
            writer
                .write_all(&encode_simple(&Kind::Heartbeat))
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
