//! The traffic ledger behind `io-server status` (the `ActiveConn`, `Conns`,
//! `InBytes` and `OutBytes` columns), sans-IO: one [`Ledger`] counts every
//! connection for its node, its listener group and the group member it
//! was given to, from one call per event (started, handed off, finished),
//! so the three totals cannot disagree.
//!
//! Bytes of live connections are not here: the endpoint relaying them
//! knows them (`status.rs` adds them); a connection's bytes are booked
//! when it finishes.

use crate::upgrade::state::{
    LedgerConnSnap, LedgerSnap, MemberSnap, ScopeSnap, StateError, TrafficSnap,
};
use saps_fabric::ConnId;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

/// A node's id on this io-server (sent in Welcome).
pub type NodeId = u32;

/// A member of a listener group: a node's listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberId {
    pub node: NodeId,
    pub listener: ConnId,
}

impl From<MemberId> for MemberSnap {
    fn from(m: MemberId) -> MemberSnap {
        MemberSnap {
            node: m.node,
            listener: m.listener,
        }
    }
}

impl From<MemberSnap> for MemberId {
    fn from(m: MemberSnap) -> MemberId {
        MemberId {
            node: m.node,
            listener: m.listener,
        }
    }
}

/// What one row of the status report counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every connection of a node, outbound ones included.
    Node(NodeId),
    /// Every client a listener group (by its address) accepted.
    Group(SocketAddr),
    /// The clients one member of a group was given.
    Member(SocketAddr, MemberId),
}

impl From<Scope> for ScopeSnap {
    fn from(s: Scope) -> ScopeSnap {
        match s {
            Scope::Node(n) => ScopeSnap::Node(n),
            Scope::Group(key) => ScopeSnap::Group(key),
            Scope::Member(key, m) => ScopeSnap::Member(key, m.into()),
        }
    }
}

impl From<ScopeSnap> for Scope {
    fn from(s: ScopeSnap) -> Scope {
        match s {
            ScopeSnap::Node(n) => Scope::Node(n),
            ScopeSnap::Group(key) => Scope::Group(key),
            ScopeSnap::Member(key, m) => Scope::Member(key, m.into()),
        }
    }
}

/// Connection counters of one [`Scope`].
#[derive(Debug, Default)]
pub struct Traffic {
    /// Live relayed connections, by (node, connection).
    live: HashSet<(NodeId, ConnId)>,
    /// Connections ever relayed or handed off.
    total: u64,
    /// Connections handed to a same-host node (zero-relay): they are in
    /// `total` but never live here, and their bytes are not counted.
    handed_off: u64,
    /// Bytes of finished connections, client → node and node → client.
    bytes_in: u64,
    bytes_out: u64,
}

impl Traffic {
    /// The live relayed connections, by (node, connection).
    pub fn live(&self) -> impl Iterator<Item = (NodeId, ConnId)> + '_ {
        self.live.iter().copied()
    }

    /// How many connections are live.
    pub fn active(&self) -> u64 {
        self.live.len() as u64
    }

    /// Connections ever relayed or handed off.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Connections handed over as sockets (zero-relay).
    pub fn handed_off(&self) -> u64 {
        self.handed_off
    }

    /// Bytes of finished connections: (client → node, node → client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_in, self.bytes_out)
    }
}

/// Every scope's [`Traffic`], and which member each live connection was
/// counted for. Scopes are opened when their node joins, their group
/// opens or their member listens, and forgotten when they go; events of a
/// scope that is gone are not counted (a connection outlives its member).
#[derive(Debug, Default)]
pub struct Ledger {
    scopes: HashMap<Scope, Traffic>,
    /// Live relayed connections: the group and member each was given to
    /// (`None`: an outbound connection).
    conns: HashMap<(NodeId, ConnId), Option<(SocketAddr, MemberId)>>,
    /// Connections ever relayed or handed off, whatever their scopes
    /// (`saps_connections_total`: it outlives every node and group).
    connections: u64,
}

/// The scopes one connection counts in.
fn scopes(node: NodeId, member: Option<(SocketAddr, MemberId)>) -> [Option<Scope>; 3] {
    [
        Some(Scope::Node(node)),
        member.map(|(key, _)| Scope::Group(key)),
        member.map(|(key, m)| Scope::Member(key, m)),
    ]
}

impl Ledger {
    /// Starts counting for `scope` (from zero).
    pub fn open(&mut self, scope: Scope) {
        self.scopes.entry(scope).or_default();
    }

    /// Stops counting for `scope`.
    pub fn forget(&mut self, scope: Scope) {
        self.scopes.remove(&scope);
    }

    /// The counters of `scope`, if it is open.
    pub fn get(&self, scope: Scope) -> Option<&Traffic> {
        self.scopes.get(&scope)
    }

    /// A relayed connection of `node` started: given to `member` of the
    /// group at the address (an accepted client), or outbound (`None`).
    pub fn started(&mut self, node: NodeId, conn: ConnId, member: Option<(SocketAddr, MemberId)>) {
        self.conns.insert((node, conn), member);
        self.connections += 1;
        for scope in scopes(node, member).into_iter().flatten() {
            if let Some(t) = self.scopes.get_mut(&scope) {
                t.live.insert((node, conn));
                t.total += 1;
            }
        }
    }

    /// A client was handed to `member` as its socket (zero-relay): counted,
    /// never live.
    pub fn handed_off(&mut self, key: SocketAddr, member: MemberId) {
        self.connections += 1;
        for scope in scopes(member.node, Some((key, member)))
            .into_iter()
            .flatten()
        {
            if let Some(t) = self.scopes.get_mut(&scope) {
                t.total += 1;
                t.handed_off += 1;
            }
        }
    }

    /// A relayed connection ended having carried `bytes_in` client → node
    /// and `bytes_out` node → client.
    pub fn finished(&mut self, node: NodeId, conn: ConnId, bytes_in: u64, bytes_out: u64) {
        let Some(member) = self.conns.remove(&(node, conn)) else {
            return;
        };
        for scope in scopes(node, member).into_iter().flatten() {
            if let Some(t) = self.scopes.get_mut(&scope) {
                if t.live.remove(&(node, conn)) {
                    t.bytes_in += bytes_in;
                    t.bytes_out += bytes_out;
                }
            }
        }
    }

    /// Connections ever relayed or handed off, since start.
    pub fn connections(&self) -> u64 {
        self.connections
    }

    /// Live connections of every node still here.
    pub fn live_connections(&self) -> usize {
        self.scopes
            .iter()
            .filter(|(s, _)| matches!(s, Scope::Node(_)))
            .map(|(_, t)| t.live.len())
            .sum()
    }
}

/// The upgrade's capture and rebuild (`upgrade/state.rs`).
impl Ledger {
    /// Every counter, for an upgrade to carry (`upgrade/state.rs`), in a
    /// fixed order.
    pub fn snapshot(&self) -> LedgerSnap {
        let mut scopes: Vec<TrafficSnap> = self
            .scopes
            .iter()
            .map(|(&scope, t)| {
                let mut live: Vec<(NodeId, ConnId)> = t.live().collect();
                live.sort_unstable();
                TrafficSnap {
                    scope: scope.into(),
                    live,
                    total: t.total,
                    handed_off: t.handed_off,
                    bytes_in: t.bytes_in,
                    bytes_out: t.bytes_out,
                }
            })
            .collect();
        scopes.sort_unstable_by_key(|t| t.scope);
        let mut conns: Vec<LedgerConnSnap> = self
            .conns
            .iter()
            .map(|(&(node, conn), member)| LedgerConnSnap {
                node,
                conn,
                member: member.map(|(key, m)| (key, m.into())),
            })
            .collect();
        conns.sort_unstable_by_key(|c| (c.node, c.conn));
        LedgerSnap {
            scopes,
            conns,
            connections: self.connections,
        }
    }

    /// The ledger [`Ledger::snapshot`] was taken of; a scope or connection
    /// listed twice is refused.
    pub fn restore(snap: LedgerSnap) -> Result<Ledger, StateError> {
        let invalid = |what: String| StateError::Invalid(format!("traffic ledger: {what}"));
        let mut scopes = HashMap::with_capacity(snap.scopes.len());
        for t in snap.scopes {
            let traffic = Traffic {
                live: t.live.iter().copied().collect(),
                total: t.total,
                handed_off: t.handed_off,
                bytes_in: t.bytes_in,
                bytes_out: t.bytes_out,
            };
            if traffic.live.len() != t.live.len() {
                return Err(invalid(format!("{:?} lists a connection twice", t.scope)));
            }
            if scopes.insert(Scope::from(t.scope), traffic).is_some() {
                return Err(invalid(format!("{:?} twice", t.scope)));
            }
        }
        let mut conns = HashMap::with_capacity(snap.conns.len());
        for c in snap.conns {
            let member = c.member.map(|(key, m)| (key, MemberId::from(m)));
            if conns.insert((c.node, c.conn), member).is_some() {
                return Err(invalid(format!(
                    "connection {} of node {} twice",
                    c.conn, c.node
                )));
            }
        }
        Ok(Ledger {
            scopes,
            conns,
            connections: snap.connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "127.0.0.1:80";

    fn member(node: NodeId, listener: ConnId) -> MemberId {
        MemberId { node, listener }
    }

    #[test]
    fn one_call_counts_a_connection_for_its_node_group_and_member() {
        let key: SocketAddr = KEY.parse().unwrap();
        let m = member(1, 7);
        let mut l = Ledger::default();
        for s in [Scope::Node(1), Scope::Group(key), Scope::Member(key, m)] {
            l.open(s);
        }
        l.started(1, 40, Some((key, m)));
        l.started(1, 41, None); // outbound: the node's only
        l.handed_off(key, m);
        for s in [Scope::Node(1), Scope::Group(key), Scope::Member(key, m)] {
            let t = l.get(s).unwrap();
            assert_eq!(t.handed_off(), 1, "{s:?}");
        }
        assert_eq!(l.get(Scope::Node(1)).unwrap().total(), 3);
        assert_eq!(l.get(Scope::Group(key)).unwrap().total(), 2);
        assert_eq!(l.live_connections(), 2);
        assert_eq!(l.connections(), 3);
        l.finished(1, 40, 5, 6);
        l.finished(1, 40, 5, 6); // once only
        for s in [Scope::Node(1), Scope::Group(key), Scope::Member(key, m)] {
            assert_eq!(l.get(s).unwrap().bytes(), (5, 6), "{s:?}");
        }
        assert_eq!(l.get(Scope::Member(key, m)).unwrap().active(), 0);
        assert_eq!(l.live_connections(), 1);
    }

    #[test]
    fn a_connection_that_outlives_its_member_counts_only_where_it_started() {
        let key: SocketAddr = KEY.parse().unwrap();
        let m = member(1, 7);
        let mut l = Ledger::default();
        l.open(Scope::Node(1));
        l.open(Scope::Group(key));
        l.started(1, 40, Some((key, m))); // the member scope is not open
        l.forget(Scope::Group(key));
        l.open(Scope::Group(key)); // the port closed and opened again
        l.finished(1, 40, 5, 6);
        assert_eq!(l.get(Scope::Group(key)).unwrap().bytes(), (0, 0));
        assert_eq!(l.get(Scope::Node(1)).unwrap().bytes(), (5, 6));
        assert!(l.get(Scope::Member(key, m)).is_none());
        l.forget(Scope::Node(1));
        assert_eq!(l.connections(), 1, "outlives its scopes");
    }
}
