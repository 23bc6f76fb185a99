//! Connections given to a node that its program has not accepted yet
//! (issue 17), sans-IO: the io-server's part of the re-dispatch contract
//! of DESIGN.md ("connections queued for it but not yet accepted are
//! re-dispatched, none lost").
//!
//! A node that speaks protocol version 2 says when its program accepts
//! each connection (`Accepted`). Until then the connection is still the
//! io-server's, and if the node's channel ends first it goes to another
//! member of its group:
//!
//! * a relayed one is kept by its relay: the client's socket and the
//!   octets read from it before the accept, at most
//!   [`saps_fabric::endpoint::PRE_ACCEPT_MAX`] (or the node's window),
//!   which the next node gets first (`Endpoint::relay_client`);
//! * a handed-over one (zero-relay) is kept here: a duplicate of the
//!   socket, whose unread octets are all still in its receive queue. It
//!   is closed at the accept, so a served connection costs the io-server
//!   no descriptor, and with the node's `Close` of it unaccepted.
//!
//! At most [`MAX_UNACCEPTED`] connections per node are kept so; past that,
//! new ones are given as before version 2 (reset if the node dies before
//! accepting them). A connection the program accepted is never given to
//! another node: its request may have been processed.

use saps_fabric::ConnId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

/// Connections kept per node until accepted, relayed and handed-over
/// together: the bound of a group's queue ([`crate::group::MAX_QUEUED`]),
/// so a node whose program stopped accepting holds no more clients for
/// re-dispatch than a group without members holds waiting.
pub const MAX_UNACCEPTED: usize = crate::group::MAX_QUEUED;

/// Whether one more connection may be kept for a node that keeps
/// `relayed` relayed and `handed` handed-over ones now.
pub fn room(relayed: usize, handed: usize) -> bool {
    relayed + handed < MAX_UNACCEPTED
}

/// The io-server's copy of a socket handed to a node.
#[derive(Debug)]
pub struct HandedCopy {
    pub socket: OwnedFd,
    /// The group (its address) and the client, to dispatch it again.
    pub key: SocketAddr,
    pub peer: SocketAddr,
}

/// A node's handed-over connections whose program has not accepted them.
#[derive(Debug, Default)]
pub struct Handed {
    copies: HashMap<ConnId, HandedCopy>,
}

impl Handed {
    /// Keeps the copy of the socket handed over as `conn`.
    pub fn keep(&mut self, conn: ConnId, copy: HandedCopy) {
        self.copies.insert(conn, copy);
    }

    pub fn contains(&self, conn: ConnId) -> bool {
        self.copies.contains_key(&conn)
    }

    /// The node accepted `conn`, or closed it unaccepted: the copy, which
    /// the caller drops (closes).
    pub fn settle(&mut self, conn: ConnId) -> Option<HandedCopy> {
        self.copies.remove(&conn)
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// The node left: every copy, oldest first (ids grow), to dispatch
    /// again.
    pub fn take_all(&mut self) -> Vec<HandedCopy> {
        let mut all: Vec<_> = self.copies.drain().collect();
        all.sort_unstable_by_key(|(conn, _)| *conn);
        all.into_iter().map(|(_, c)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn copy(port: u16) -> (HandedCopy, UnixStream, UnixStream) {
        let (node_end, client) = UnixStream::pair().unwrap();
        let dup = node_end.try_clone().unwrap();
        let c = HandedCopy {
            socket: dup.into(),
            key: "127.0.0.1:80".parse().unwrap(),
            peer: SocketAddr::from(([192, 0, 2, 1], port)),
        };
        (c, node_end, client)
    }

    /// Whether the client end sees its peer closed (no copy left open).
    fn closed(client: &mut UnixStream) -> bool {
        client.set_nonblocking(true).unwrap();
        matches!(client.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn the_copy_keeps_the_connection_open_until_the_accept_closes_it() {
        let mut h = Handed::default();
        let (c, node_end, mut client) = copy(1);
        h.keep(5, c);
        drop(node_end); // the node's copy (it accepted, or died)
        assert!(!closed(&mut client), "the io-server's copy holds it open");
        assert!(h.contains(5));
        drop(h.settle(5).expect("kept"));
        assert!(closed(&mut client), "no descriptor left once accepted");
        assert!(h.settle(5).is_none(), "a late or repeated settle is a no-op");
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn a_node_that_leaves_gives_back_every_copy_oldest_first() {
        let mut h = Handed::default();
        let mut ends = Vec::new();
        for (conn, port) in [(9, 3), (3, 1), (7, 2)] {
            let (c, node_end, client) = copy(port);
            h.keep(conn, c);
            ends.push((node_end, client));
        }
        drop(h.settle(7));
        let back: Vec<u16> = h.take_all().iter().map(|c| c.peer.port()).collect();
        assert_eq!(back, vec![1, 3]);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn at_most_max_unaccepted_are_kept_per_node() {
        assert!(room(0, 0));
        assert!(room(MAX_UNACCEPTED - 2, 1));
        assert!(!room(MAX_UNACCEPTED - 1, 1));
        assert!(!room(0, MAX_UNACCEPTED));
    }
}
