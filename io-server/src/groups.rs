//! Listener groups, sans-IO (DESIGN.md "Figure 3" and "Schedulers"): every
//! port that nodes listen on is one real listening socket on the single
//! address (LVS's virtual service), and its members are the `(node,
//! listener)` pairs that listen on it (the real servers). [`Groups`] holds
//! the membership, the nodes' weights, each group's scheduler and queue and
//! the [`Ledger`]; it decides which member gets a client, what a node's
//! leaving does to its groups and what happens to a group's queue, and
//! holds no socket, no runtime and no lock: its callers (`Tables` in
//! `state.rs` with the ports, `dispatch.rs`, `cluster.rs`) do the socket
//! work with what it returns.
//! The queued clients are a type of the caller's (`C`).
//!
//! Binds follow the kernel's rules within one node: a second bind of a port
//! the same node already holds fails with `EADDRINUSE` unless both sockets
//! set `SO_REUSEPORT`. Different nodes binding one port share it.
//!
//! A port whose last listener closes stays open for
//! `saps_fabric::RELISTEN_GRACE`: a program that closes its listening socket
//! and opens a new one on the same port (iperf3 does between tests) takes
//! the port over, and clients that arrive in between wait in the queue
//! instead of being refused. Past the grace the port closes and clients
//! still waiting are closed ([`Orphan`], [`Groups::close_orphan`]).
//!
//! Weight 0 drains: such a member is never picked and its open connections
//! finish. When no member is eligible (none yet, or all draining) a client
//! waits in the group's queue, up to [`MAX_QUEUED`], and goes as soon as one
//! is ([`Groups::next_queued`]). A client whose node left before its program
//! accepted it is dispatched again like a new one ([`Groups::redispatch`],
//! issue 17).
//!
//! A node that joins ramps its weight up over the slow-start period
//! (`slowstart.rs`): the schedulers see its effective weight, which
//! [`Groups::ramp`] recomputes at each housekeeping tick.

use crate::config::SchedulerKind;
use crate::scheduler::{self, Candidate, Scheduler};
use crate::slowstart::Ramp;
use crate::traffic::{Ledger, MemberId, NodeId, Scope};
use saps_fabric::frame::bind_flags;
use saps_fabric::ConnId;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests;

/// Clients waiting for an eligible member, per group; beyond this new
/// clients are closed (like a full listen backlog).
pub const MAX_QUEUED: usize = 1024;

/// One node socket bound to the port.
#[derive(Debug)]
struct Bound {
    node: NodeId,
    conn: ConnId,
    flags: u32,
}

/// One port on the single address.
pub struct Group<C> {
    binds: Vec<Bound>,
    members: Vec<MemberId>,
    scheduler: Box<dyn Scheduler>,
    queue: VecDeque<C>,
    /// Clients dispatched again because their node left before its
    /// program accepted them.
    redispatched: u64,
    /// Its port is listening (a member listened once).
    listening: bool,
    /// Set while nobody binds the port but it is kept listening for the
    /// grace; the value tells one orphaning from the next.
    orphaned: Option<u64>,
}

impl<C> Group<C> {
    /// The listening members, in the order they listened.
    pub fn members(&self) -> &[MemberId] {
        &self.members
    }

    /// How many clients wait for an eligible member.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Clients dispatched again because their node left first.
    pub fn redispatched(&self) -> u64 {
        self.redispatched
    }
}

/// What a bind asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Bind {
    /// The port is a group's already: the socket shares it.
    Joined(SocketAddr),
    /// A new port: the caller binds a real socket and calls [`Groups::open`]
    /// with its address.
    OpenPort,
}

/// A port nobody binds any more but kept listening for the grace; the
/// caller calls [`Groups::close_orphan`] with it once the grace is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub key: SocketAddr,
    orphaning: u64,
}

/// What an unbind (or a node's leaving) asks of the caller.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Unbound {
    /// Ports no group holds any more: close their sockets now.
    pub closed: Vec<SocketAddr>,
    /// Ports to close after the grace unless taken over.
    pub orphaned: Vec<Orphan>,
}

/// Where a client goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement<C> {
    /// To this member of the group (the caller hands it over or relays it;
    /// if the member's node turns out gone, it unbinds the node and asks
    /// again).
    Member(MemberId, C),
    /// Kept in the group's queue until a member is eligible.
    Queued,
    /// The queue is full: the caller closes the client.
    QueueFull(C),
    /// No such group (its port closed): the caller closes the client.
    NoGroup(C),
}

/// Every listener group, keyed by its real address, and the nodes'
/// weights.
pub struct Groups<C> {
    kind: SchedulerKind,
    map: BTreeMap<SocketAddr, Group<C>>,
    /// Weights of the nodes that joined and did not leave, as the
    /// schedulers see them (during a node's slow start, its effective
    /// weight); 0 drains.
    weights: BTreeMap<NodeId, u32>,
    /// The slow start period (zero: none), and the nodes ramping up, with
    /// their own weight.
    slow_start: Duration,
    ramps: BTreeMap<NodeId, (Ramp, u32)>,
    ledger: Ledger,
    orphanings: u64,
}

impl<C> Groups<C> {
    /// No groups; every group schedules with `kind`.
    pub fn new(kind: SchedulerKind) -> Self {
        Groups {
            kind,
            map: BTreeMap::new(),
            weights: BTreeMap::new(),
            slow_start: Duration::ZERO,
            ramps: BTreeMap::new(),
            ledger: Ledger::default(),
            orphanings: 0,
        }
    }

    /// Nodes that join from now on ramp their weight up over `period`
    /// (zero: they get their full weight at once).
    pub fn set_slow_start(&mut self, period: Duration) {
        self.slow_start = period;
    }

    /// A node joined with `weight` at `now`; with a slow start it begins
    /// at the smallest share ([`Groups::ramp`] raises it).
    pub fn join(&mut self, node: NodeId, weight: u32, now: Instant) {
        let ramp = Ramp::new(now);
        let w = match ramp.effective(weight, self.slow_start, now) {
            Some(w) => {
                self.ramps.insert(node, (ramp, weight));
                w
            }
            None => weight,
        };
        self.weights.insert(node, w);
        self.ledger.open(Scope::Node(node));
    }

    /// Recomputes the effective weight of every node in its slow start at
    /// `now`; those whose ramp is over get their own weight. Whether any
    /// weight went up (queued clients may go then).
    pub fn ramp(&mut self, now: Instant) -> bool {
        let mut raised = false;
        let period = self.slow_start;
        self.ramps.retain(|node, (ramp, weight)| {
            let effective = ramp.effective(*weight, period, now);
            if let Some(w) = self.weights.get_mut(node) {
                let next = effective.unwrap_or(*weight);
                raised |= next > *w;
                *w = next;
            }
            effective.is_some()
        });
        raised
    }

    /// The weight `node` ramps up to, while it is in its slow start.
    pub fn ramping_to(&self, node: NodeId) -> Option<u32> {
        self.ramps.get(&node).map(|&(_, w)| w)
    }

    /// A node left: its sockets leave their groups. The caller dispatches
    /// the queues ([`Groups::keys`]) and what the node had not accepted.
    pub fn leave(&mut self, node: NodeId) -> Unbound {
        self.weights.remove(&node);
        self.ramps.remove(&node);
        self.ledger.forget(Scope::Node(node));
        self.unbind(node, None)
    }

    /// Sets a node's weight (0 drains). False if it is not here. The
    /// caller then lets the queues go ([`Groups::next_queued`]). A node in
    /// its slow start goes on ramping, to the new weight.
    pub fn set_weight(&mut self, node: NodeId, weight: u32) -> bool {
        if let Some((_, w)) = self.ramps.get_mut(&node) {
            *w = weight;
            return self.weights.contains_key(&node);
        }
        match self.weights.get_mut(&node) {
            Some(w) => {
                *w = weight;
                true
            }
            None => false,
        }
    }

    /// A node's weight as the schedulers see it (0 for one not here).
    pub fn weight(&self, node: NodeId) -> u32 {
        self.weights.get(&node).copied().unwrap_or(0)
    }

    /// Binds `conn` of `node` to `addr` (port 0: a free port).
    pub fn bind(
        &mut self,
        node: NodeId,
        conn: ConnId,
        addr: SocketAddr,
        flags: u32,
    ) -> Result<Bind, i32> {
        if addr.port() == 0 {
            return Ok(Bind::OpenPort);
        }
        let Some(g) = self.map.get_mut(&addr) else {
            return Ok(Bind::OpenPort);
        };
        let reuseport = flags & bind_flags::REUSEPORT != 0;
        let clash = g
            .binds
            .iter()
            .any(|b| b.node == node && !(reuseport && b.flags & bind_flags::REUSEPORT != 0));
        if clash {
            return Err(libc::EADDRINUSE);
        }
        g.orphaned = None;
        g.binds.push(Bound { node, conn, flags });
        Ok(Bind::Joined(addr))
    }

    /// A new group on the port the caller bound at `key`, for the bind
    /// that asked for it ([`Bind::OpenPort`]).
    pub fn open(&mut self, key: SocketAddr, node: NodeId, conn: ConnId, flags: u32) {
        self.ledger.open(Scope::Group(key));
        let group = Group {
            binds: vec![Bound { node, conn, flags }],
            members: Vec::new(),
            scheduler: scheduler::new(self.kind),
            queue: VecDeque::new(),
            redispatched: 0,
            listening: false,
            orphaned: None,
        };
        self.map.insert(key, group);
    }

    /// Whether there is a group at `key`.
    pub fn contains(&self, key: SocketAddr) -> bool {
        self.map.contains_key(&key)
    }

    /// Makes the bound `conn` a member; the caller has made the port
    /// listen. False when it was one already (`listen()` again only
    /// changes the backlog).
    pub fn listen(&mut self, key: SocketAddr, node: NodeId, conn: ConnId) -> Result<bool, i32> {
        let g = self.map.get_mut(&key).ok_or(libc::EINVAL)?;
        g.listening = true;
        let member = MemberId {
            node,
            listener: conn,
        };
        if g.members.contains(&member) {
            return Ok(false);
        }
        g.members.push(member);
        self.ledger.open(Scope::Member(key, member));
        Ok(true)
    }

    /// Drops `node`'s socket `conn` (or all of its sockets with `None`).
    /// A group nobody binds any more closes its port, unless it was
    /// listening: then it is orphaned.
    pub fn unbind(&mut self, node: NodeId, conn: Option<ConnId>) -> Unbound {
        let hit = |n: NodeId, c: ConnId| n == node && conn.is_none_or(|x| x == c);
        let mut out = Unbound::default();
        let ledger = &mut self.ledger;
        for (&key, g) in self.map.iter_mut() {
            let had = !g.binds.is_empty();
            g.binds.retain(|b| !hit(b.node, b.conn));
            g.members.retain(|&m| {
                let gone = hit(m.node, m.listener);
                if gone {
                    ledger.forget(Scope::Member(key, m));
                }
                !gone
            });
            if had && g.binds.is_empty() && g.listening {
                self.orphanings += 1;
                g.orphaned = Some(self.orphanings);
                out.orphaned.push(Orphan {
                    key,
                    orphaning: self.orphanings,
                });
            }
        }
        out.closed = self
            .map
            .iter()
            .filter(|(_, g)| g.binds.is_empty() && g.orphaned.is_none())
            .map(|(&key, _)| key)
            .collect();
        for &key in &out.closed {
            self.remove(key);
        }
        out
    }

    /// Closes group `orphan.key` if it is still the orphan it became
    /// (nobody took it over): the clients still waiting in its queue,
    /// for the caller to close with its port. `None`: still in use.
    pub fn close_orphan(&mut self, orphan: Orphan) -> Option<Vec<C>> {
        let g = self.map.get(&orphan.key)?;
        if !(g.binds.is_empty() && g.orphaned == Some(orphan.orphaning)) {
            return None;
        }
        self.remove(orphan.key).map(|g| g.queue.into())
    }

    fn remove(&mut self, key: SocketAddr) -> Option<Group<C>> {
        let g = self.map.remove(&key)?;
        self.ledger.forget(Scope::Group(key));
        for &m in &g.members {
            self.ledger.forget(Scope::Member(key, m));
        }
        Some(g)
    }

    /// Asks the group's scheduler for a member for a client from
    /// `client`. Each candidate carries its weight and live connections;
    /// for a scheduler that [needs them](Scheduler::needs_pending), also
    /// the bytes still to deliver on them, `pending` per connection.
    pub fn pick(
        &mut self,
        key: SocketAddr,
        client: IpAddr,
        pending: impl Fn(NodeId, ConnId) -> u64,
    ) -> Option<MemberId> {
        let g = self.map.get_mut(&key)?;
        let needs_pending = g.scheduler.needs_pending();
        let candidates: Vec<Candidate> = g
            .members
            .iter()
            .map(|&m| {
                let t = self.ledger.get(Scope::Member(key, m));
                Candidate {
                    key: (u64::from(m.node) << 40) ^ m.listener,
                    weight: self.weights.get(&m.node).copied().unwrap_or(0),
                    active: t.map_or(0, |t| t.active()),
                    pending: match t {
                        Some(t) if needs_pending => t.live().map(|(n, c)| pending(n, c)).sum(),
                        _ => 0,
                    },
                }
            })
            .collect();
        let i = g.scheduler.pick(&candidates, client)?;
        Some(g.members[i])
    }

    /// Places a new client of group `key` (see [`Groups::pick`]): with a
    /// member, or in the queue.
    pub fn dispatch(
        &mut self,
        key: SocketAddr,
        client: C,
        from: IpAddr,
        pending: impl Fn(NodeId, ConnId) -> u64,
    ) -> Placement<C> {
        if let Some(member) = self.pick(key, from, pending) {
            return Placement::Member(member, client);
        }
        match self.map.get_mut(&key) {
            None => Placement::NoGroup(client),
            Some(g) if g.queue.len() < MAX_QUEUED => {
                g.queue.push_back(client);
                Placement::Queued
            }
            Some(_) => Placement::QueueFull(client),
        }
    }

    /// Places a client whose node left before its program accepted it,
    /// like a new one, and counts it.
    pub fn redispatch(
        &mut self,
        key: SocketAddr,
        client: C,
        from: IpAddr,
        pending: impl Fn(NodeId, ConnId) -> u64,
    ) -> Placement<C> {
        if let Some(g) = self.map.get_mut(&key) {
            g.redispatched += 1;
        }
        self.dispatch(key, client, from, pending)
    }

    /// The next queued client of group `key`, if a member is eligible to
    /// take it (the caller dispatches it).
    pub fn next_queued(&mut self, key: SocketAddr) -> Option<C> {
        let g = self.map.get_mut(&key)?;
        let weights = &self.weights;
        let eligible = g
            .members
            .iter()
            .any(|m| weights.get(&m.node).is_some_and(|&w| w > 0));
        if !eligible {
            return None;
        }
        g.queue.pop_front()
    }

    /// Empties every queue (shutdown): the clients, to close.
    pub fn take_queues(&mut self) -> Vec<C> {
        let queues = self.map.values_mut().map(|g| std::mem::take(&mut g.queue));
        queues.flatten().collect()
    }

    /// The address of every group.
    pub fn keys(&self) -> Vec<SocketAddr> {
        self.map.keys().copied().collect()
    }

    /// Every group by its address, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &Group<C>)> {
        self.map.iter().map(|(&k, g)| (k, g))
    }

    /// The group whose member is `node`'s `listener`.
    pub fn group_of(&self, member: MemberId) -> Option<SocketAddr> {
        let mut groups = self.map.iter();
        groups
            .find(|(_, g)| g.members.contains(&member))
            .map(|(&key, _)| key)
    }

    /// The traffic counters of every node, group and member.
    pub fn traffic(&self) -> &Ledger {
        &self.ledger
    }

    /// A relayed connection of `node` started, for `member` of group
    /// `key` or outbound (`None`).
    pub fn connection_started(
        &mut self,
        node: NodeId,
        conn: ConnId,
        member: Option<(SocketAddr, MemberId)>,
    ) {
        self.ledger.started(node, conn, member);
    }

    /// A client was handed to `member` of group `key` as its socket.
    pub fn handed_off(&mut self, key: SocketAddr, member: MemberId) {
        self.ledger.handed_off(key, member);
    }

    /// A relayed connection of `node` finished.
    pub fn connection_finished(&mut self, node: NodeId, conn: ConnId, bytes: (u64, u64)) {
        self.ledger.finished(node, conn, bytes.0, bytes.1);
    }
}
