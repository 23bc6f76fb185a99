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
//! * a handed-over one (zero-relay, over the hand-off socket) is kept
//!   here: the io-server's own descriptor of the socket, which it used to
//!   close once `sendmsg` had passed it to the node and now closes at the
//!   accept instead (so a served connection costs it no descriptor, and
//!   no system call more). The client's unread octets are all still in
//!   the socket's receive queue.
//!
//! At most [`MAX_UNACCEPTED`] connections per node are kept so; past that,
//! new ones are given as before version 2 (reset if the node dies before
//! accepting them). A connection the program accepted is never given to
//! another node: its request may have been processed.
//!
//! A handed-over connection's socket is with the hand-off task while it
//! is sent ([`Handed::sending`] .. [`Handed::sent`]); a node that leaves
//! meanwhile leaves that one to the task ([`Handed::before_send`],
//! [`Sent::Redispatch`]).

use saps_fabric::endpoint::Place;
use saps_fabric::ConnId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

/// Connections kept per node until accepted, relayed and handed-over
/// together: the bound of a group's queue ([`crate::groups::MAX_QUEUED`]),
/// so a node whose program stopped accepting holds no more clients for
/// re-dispatch than a group without members holds waiting.
pub const MAX_UNACCEPTED: usize = crate::groups::MAX_QUEUED;

/// Whether one more connection may be kept for a node that keeps
/// `relayed` relayed and `handed` handed-over ones now.
pub fn room(relayed: usize, handed: usize) -> bool {
    relayed + handed < MAX_UNACCEPTED
}

/// The io-server's copy of a socket handed to a node.
#[derive(Debug)]
pub struct HandedCopy {
    /// `None` while the hand-off task sends it.
    pub socket: Option<OwnedFd>,
    /// The group (its address) and the client, to dispatch it again.
    pub key: SocketAddr,
    pub peer: SocketAddr,
    /// Its place among its member's clients not accepted yet (admission),
    /// given back when the copy goes.
    pub _place: Option<Place>,
}

/// What the hand-off task does with its socket once sent.
#[derive(Debug)]
pub enum Sent {
    /// Kept until the node's program accepts it.
    Kept,
    /// The node accepted or closed it meanwhile: close it.
    Close(OwnedFd),
    /// The node left meanwhile: dispatch it again.
    Redispatch(HandedCopy),
}

/// A node's handed-over connections whose program has not accepted them.
#[derive(Debug, Default)]
pub struct Handed {
    copies: HashMap<ConnId, HandedCopy>,
    /// The node left: what is still being sent goes elsewhere.
    left: bool,
}

impl Handed {
    /// The socket of `conn` is on its way to the node (with the hand-off
    /// task).
    /// `place`: its place in its member's count, held as long as the copy.
    pub fn sending(
        &mut self,
        conn: ConnId,
        key: SocketAddr,
        peer: SocketAddr,
        place: Option<Place>,
    ) {
        let socket = None;
        let copy = HandedCopy {
            socket,
            key,
            peer,
            _place: place,
        };
        self.copies.insert(conn, copy);
    }

    /// The hand-off task, before sending `conn`: `Some` when the node
    /// left meanwhile: not to be sent but dispatched again (to the copy's
    /// group and client; the socket is the task's).
    pub fn before_send(&mut self, conn: ConnId) -> Option<HandedCopy> {
        match self.left {
            true => self.copies.remove(&conn),
            false => None,
        }
    }

    /// The hand-off task sent `conn`; `socket` is the io-server's
    /// descriptor of it.
    pub fn sent(&mut self, conn: ConnId, socket: OwnedFd) -> Sent {
        match self.copies.get_mut(&conn) {
            None => Sent::Close(socket),
            Some(_) if self.left => {
                let mut copy = self.copies.remove(&conn).expect("just found");
                copy.socket = Some(socket);
                Sent::Redispatch(copy)
            }
            Some(copy) => {
                copy.socket = Some(socket);
                Sent::Kept
            }
        }
    }

    /// The socket of `conn` could not be sent: forgotten here (the caller
    /// dispatches it again).
    pub fn unsent(&mut self, conn: ConnId) -> Option<HandedCopy> {
        self.copies.remove(&conn)
    }

    /// The node accepted `conn`, or closed it unaccepted: the copy, which
    /// the caller drops (closes); one still being sent is closed by the
    /// hand-off task ([`Sent::Close`]).
    pub fn settle(&mut self, conn: ConnId) -> Option<HandedCopy> {
        self.copies.remove(&conn)
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// Every copy, by id (an upgrade's capture).
    pub fn copies(&self) -> Vec<(ConnId, &HandedCopy)> {
        let mut all: Vec<_> = self.copies.iter().map(|(&c, copy)| (c, copy)).collect();
        all.sort_unstable_by_key(|(c, _)| *c);
        all
    }

    /// A copy carried over by an upgrade, held until the program accepts
    /// `conn` (its place in its member's count is not carried).
    pub fn carried(&mut self, conn: ConnId, key: SocketAddr, peer: SocketAddr, socket: OwnedFd) {
        let copy = HandedCopy {
            socket: Some(socket),
            key,
            peer,
            _place: None,
        };
        self.copies.insert(conn, copy);
    }

    /// The node left: every copy held here, oldest first (ids grow), to
    /// dispatch again; those still being sent the hand-off task gives
    /// back ([`Sent::Redispatch`]).
    pub fn leave(&mut self) -> Vec<HandedCopy> {
        self.left = true;
        let mut held: Vec<ConnId> = self
            .copies
            .iter()
            .filter(|(_, c)| c.socket.is_some())
            .map(|(&conn, _)| conn)
            .collect();
        held.sort_unstable();
        held.iter().filter_map(|c| self.copies.remove(c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    const KEY: &str = "127.0.0.1:80";

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// A socket pair standing for the client's connection: the io-server's
    /// descriptor and the client's end.
    fn client() -> (OwnedFd, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (ours.into(), theirs)
    }

    /// Whether the client end sees its peer closed (no descriptor left).
    fn closed(client: &mut UnixStream) -> bool {
        client.set_nonblocking(true).unwrap();
        matches!(client.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn the_copy_is_kept_once_sent_and_closed_at_the_accept() {
        let mut h = Handed::default();
        let (fd, mut c) = client();
        h.sending(5, KEY.parse().unwrap(), peer(1), None);
        assert!(h.before_send(5).is_none());
        assert!(matches!(h.sent(5, fd), Sent::Kept));
        assert!(!closed(&mut c), "the io-server's copy holds it open");
        drop(h.settle(5).expect("kept"));
        assert!(closed(&mut c), "no descriptor left once accepted");
        assert!(h.settle(5).is_none(), "a repeated settle is a no-op");
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn an_accept_before_the_send_finished_closes_the_copy_then() {
        let mut h = Handed::default();
        let (fd, mut c) = client();
        h.sending(5, KEY.parse().unwrap(), peer(1), None);
        assert!(h.before_send(5).is_none());
        assert!(h.settle(5).is_some(), "the Accepted came first");
        let Sent::Close(fd) = h.sent(5, fd) else {
            panic!("not to be kept");
        };
        drop(fd);
        assert!(closed(&mut c));
    }

    #[test]
    fn a_node_that_leaves_gives_back_every_copy_even_those_in_flight() {
        let mut h = Handed::default();
        let mut clients = Vec::new();
        for (conn, port) in [(9, 3), (3, 1), (7, 2)] {
            let (fd, c) = client();
            h.sending(conn, KEY.parse().unwrap(), peer(port), None);
            assert!(h.before_send(conn).is_none());
            assert!(matches!(h.sent(conn, fd), Sent::Kept));
            clients.push(c);
        }
        drop(h.settle(7)); // accepted: stays with the node
        h.sending(11, KEY.parse().unwrap(), peer(4), None); // being sent
        h.sending(13, KEY.parse().unwrap(), peer(5), None); // not sent yet
        let back: Vec<u16> = h.leave().iter().map(|c| c.peer.port()).collect();
        assert_eq!(back, vec![1, 3], "the held ones, oldest first");
        let (fd, _c) = client();
        match h.sent(11, fd) {
            Sent::Redispatch(copy) => {
                assert_eq!(copy.peer.port(), 4);
                assert!(copy.socket.is_some());
            }
            other => panic!("{other:?}"),
        }
        let back = h.before_send(13).expect("not sent to a node that left");
        assert_eq!(back.peer.port(), 5);
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn a_handed_copy_holds_its_members_place_until_it_goes() {
        let freed = std::sync::Arc::new(tokio::sync::Notify::new());
        let waiting = saps_fabric::endpoint::Waiting::new(freed);
        let mut h = Handed::default();
        let (fd, _c) = client();
        h.sending(5, KEY.parse().unwrap(), peer(1), Some(waiting.take()));
        assert_eq!(waiting.get(), 1, "taken while it is sent");
        assert!(matches!(h.sent(5, fd), Sent::Kept));
        assert_eq!(waiting.get(), 1, "and while it waits for the accept");
        drop(h.settle(5));
        assert_eq!(waiting.get(), 0, "given back at the accept");
    }

    #[test]
    fn at_most_max_unaccepted_are_kept_per_node() {
        assert!(room(0, 0));
        assert!(room(MAX_UNACCEPTED - 2, 1));
        assert!(!room(MAX_UNACCEPTED - 1, 1));
        assert!(!room(0, MAX_UNACCEPTED));
    }
}
