//! The channel's connection table, its one owner of per-connection state:
//! each SAPS connection's Appendix A credits in both directions, its FIN
//! flag and the send room lent out for frames not yet committed; the ids
//! of connections handed over as sockets; and id allocation (the low bit
//! says who allocated an id; ids are never reused on a channel).

use super::event::CallError;
use super::snapshot::SnapError;
use crate::credit::{RecvCredit, SendCredit};
use crate::frame::ConnId;
use std::collections::{HashMap, HashSet};

/// One connection's state.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) send: SendCredit,
    pub(super) recv: RecvCredit,
    pub(super) fin_sent: bool,
    /// The peer's Fin came: another is dropped, not raised again.
    pub(super) fin_received: bool,
    /// Send room lent out ([`super::Reservation`]) and not yet committed:
    /// not available to another reservation meanwhile.
    pub(super) reserved: u64,
}

/// One connection of a [`ConnsSnap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConnSnap {
    pub(super) conn: ConnId,
    pub(super) send: SendCredit,
    pub(super) recv: RecvCredit,
    pub(super) fin_sent: bool,
    pub(super) fin_received: bool,
}

/// A [`ConnTable`] as plain data, connections and handed ids in id order
/// (so that its encoding is the same for the same table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConnsSnap {
    pub(super) conns: Vec<ConnSnap>,
    pub(super) handed: Vec<ConnId>,
    pub(super) next: ConnId,
    pub(super) peer_window: u64,
    pub(super) window: u64,
}

/// Every connection of one channel.
#[derive(Debug)]
pub(super) struct ConnTable {
    conns: HashMap<ConnId, Conn>,
    /// io-server end: ids of connections handed over as sockets whose
    /// `Accepted` or `Close` has not come yet.
    handed: HashSet<ConnId>,
    next: ConnId,
    /// The peer's `B_r`: the first `L_s` of every connection.
    peer_window: u64,
    /// Our `B_r`.
    window: u64,
}

impl ConnTable {
    /// `first`: the first id this end allocates (2 on a node, 1 on the
    /// io-server); `window`: our `B_r`.
    pub(super) fn new(first: ConnId, window: u32) -> Self {
        Self {
            conns: HashMap::new(),
            handed: HashSet::new(),
            next: first,
            peer_window: 0,
            window: u64::from(window),
        }
    }

    /// The peer's `B_r`, learnt in the handshake.
    pub(super) fn set_peer_window(&mut self, window: u32) {
        self.peer_window = u64::from(window);
    }

    /// Adds `conn` with fresh credits.
    pub(super) fn insert(&mut self, conn: ConnId) {
        self.conns.insert(
            conn,
            Conn {
                send: SendCredit::new(self.peer_window),
                recv: RecvCredit::new(self.window),
                fin_sent: false,
                fin_received: false,
                reserved: 0,
            },
        );
    }

    /// The next id of this end.
    pub(super) fn allocate(&mut self) -> ConnId {
        let conn = self.next;
        self.next += 2;
        conn
    }

    /// An id for a connection handed over as a socket.
    pub(super) fn hand(&mut self) -> ConnId {
        let conn = self.allocate();
        self.handed.insert(conn);
        conn
    }

    /// Forgets a handed-over id; whether it was one.
    pub(super) fn take_handed(&mut self, conn: ConnId) -> bool {
        self.handed.remove(&conn)
    }

    pub(super) fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns.get(&conn)
    }

    pub(super) fn get_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(&conn)
    }

    pub(super) fn contains(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    pub(super) fn remove(&mut self, conn: ConnId) -> bool {
        self.conns.remove(&conn).is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    /// The channel closed: nothing is left.
    pub(super) fn clear(&mut self) {
        self.conns.clear();
        self.handed.clear();
    }

    /// Octets `conn` may send now (`L_s - A_s`, less what is lent out);
    /// an error if it may not send at all.
    pub(super) fn send_room(&self, conn: ConnId) -> Result<u64, CallError> {
        let c = self.get(conn).ok_or(CallError::UnknownConnection(conn))?;
        if c.fin_sent {
            return Err(CallError::AfterFin(conn));
        }
        Ok(c.send.available() - c.reserved)
    }

    /// Lends `room` octets of `conn`'s send room to a reservation.
    pub(super) fn lend(&mut self, conn: ConnId, room: u64) {
        if let Some(c) = self.get_mut(conn) {
            c.reserved += room;
        }
    }

    /// Takes back the room of a reservation that is committed.
    pub(super) fn take_back(&mut self, conn: ConnId, room: u64) {
        if let Some(c) = self.get_mut(conn) {
            c.reserved -= room;
        }
    }

    /// Counts `n` octets queued on `conn` against its credit.
    pub(super) fn sent(&mut self, conn: ConnId, n: u64) {
        if let Some(c) = self.get_mut(conn) {
            c.send.on_sent(n);
        }
    }

    /// The table as plain data. Refused while send room is lent out: a
    /// reservation lives in its caller's hands, not in the table.
    pub(super) fn snapshot(&self) -> Result<ConnsSnap, SnapError> {
        let mut conns = Vec::with_capacity(self.conns.len());
        for (&conn, c) in &self.conns {
            if c.reserved != 0 {
                return Err(SnapError::Reserved(conn));
            }
            conns.push(ConnSnap {
                conn,
                send: c.send,
                recv: c.recv,
                fin_sent: c.fin_sent,
                fin_received: c.fin_received,
            });
        }
        conns.sort_unstable_by_key(|c| c.conn);
        let mut handed: Vec<ConnId> = self.handed.iter().copied().collect();
        handed.sort_unstable();
        Ok(ConnsSnap {
            conns,
            handed,
            next: self.next,
            peer_window: self.peer_window,
            window: self.window,
        })
    }

    /// The table [`ConnTable::snapshot`] gave.
    pub(super) fn restore(snap: ConnsSnap) -> Self {
        let conns = snap
            .conns
            .into_iter()
            .map(|c| {
                let conn = Conn {
                    send: c.send,
                    recv: c.recv,
                    fin_sent: c.fin_sent,
                    fin_received: c.fin_received,
                    reserved: 0,
                };
                (c.conn, conn)
            })
            .collect();
        Self {
            conns,
            handed: snap.handed.into_iter().collect(),
            next: snap.next,
            peer_window: snap.peer_window,
            window: snap.window,
        }
    }
}
