//! Same-host zero-relay hand-off (issue 7).
//!
//! When the io-server and a node share a process (the embedded mode), the
//! io-server may hand an accepted client's TCP socket itself to the node
//! instead of relaying its bytes over the fabric: the node installs it in
//! the program, so no byte is copied at all. The io-server still schedules
//! and counts the connection. This is the in-process side channel that
//! carries the sockets; the fabric's frames are not involved.
//!
//! A node on the same host as a separate io-server, joined over a `unix:`
//! fabric, gets the same through [`side`]: a `SOCK_SEQPACKET` socket next to
//! the fabric socket (`PATH.handoff`) that carries each socket with
//! `SCM_RIGHTS`.

use crate::frame::ConnId;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use tokio::sync::mpsc;

/// A client connection handed to a node's listener.
#[derive(Debug)]
pub struct HandedOff {
    /// The node's listener (its Bind/Listen connection tag).
    pub listener: ConnId,
    /// The client's address.
    pub peer: SocketAddr,
    /// The single address the client connected to.
    pub local: SocketAddr,
    /// The accepted TCP socket.
    pub socket: OwnedFd,
    /// The io-server's id of the connection, when it keeps its own copy
    /// of the socket until the node says its program accepted it
    /// ([`crate::Frame::Accepted`]) and gives it to another node if this
    /// one's channel ends first; 0: not kept (a version 1 node).
    pub conn: ConnId,
    /// The node id (Welcome) it was handed to, with `conn`: a node that
    /// has joined again since must not accept it.
    pub node: u32,
}

/// The io-server's end.
#[derive(Debug, Clone)]
pub struct HandoffSender(mpsc::UnboundedSender<HandedOff>);

/// The node's end.
#[derive(Debug)]
pub struct HandoffReceiver(mpsc::UnboundedReceiver<HandedOff>);

/// A connected pair of ends.
pub fn channel() -> (HandoffSender, HandoffReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (HandoffSender(tx), HandoffReceiver(rx))
}

impl HandoffSender {
    /// Hands `conn` over; gives it back if the node's end is gone.
    pub fn send(&self, conn: HandedOff) -> Result<(), HandedOff> {
        self.0.send(conn).map_err(|e| e.0)
    }

    /// Whether the node still takes connections this way.
    pub fn is_open(&self) -> bool {
        !self.0.is_closed()
    }
}

impl HandoffReceiver {
    pub async fn recv(&mut self) -> Option<HandedOff> {
        self.0.recv().await
    }

    /// Takes no more connections (the sender's `send` fails from now);
    /// those already sent are still received.
    pub fn close(&mut self) {
        self.0.close();
    }

    /// The next connection already sent, if any.
    pub fn try_recv(&mut self) -> Option<HandedOff> {
        self.0.try_recv().ok()
    }
}

pub mod side;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handed_off_socket_arrives_and_a_closed_end_gives_it_back() {
        let (tx, mut rx) = channel();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:80".parse().unwrap();
        let h = HandedOff {
            listener: 2,
            peer,
            local,
            socket: a.into(),
            conn: 0,
            node: 0,
        };
        tx.send(h).unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!((got.listener, got.peer, got.local), (2, peer, local));
        drop(rx);
        assert!(!tx.is_open());
        let back = tx.send(got).unwrap_err();
        assert_eq!(back.listener, 2);
    }
}
