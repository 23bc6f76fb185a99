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
//! set `SO_REUSEPORT`, or both set `SO_REUSEADDR` and the one held does not
//! listen (and then the second `listen` of the two fails); an `AF_INET6`
//! socket with `IPV6_V6ONLY` and an `AF_INET` one bind no address in
//! common and share it too (the v4 one gets the clients then). Connections
//! a node's program closed first hold the port in TIME_WAIT
//! ([`Groups::lingers`]). Different nodes binding one port share it.
//!
//! A port whose last listener closes stays open for
//! `saps_fabric::RELISTEN_GRACE`: a program that closes its listening socket
//! and opens a new one on the same port (iperf3 does between tests) takes
//! the port over, and clients that arrive in between wait in the queue
//! instead of being refused. Past the grace the port closes and clients
//! still waiting are closed ([`Orphan`], [`Groups::close_orphan`]).
//!
//! Weight 0 drains: such a member is never picked and its open connections
//! finish. Admission follows haproxy (issue 24, docs/io-server.md
//! "Admission"): a member is eligible only below its bounds ([`Limits`]:
//! connections per node and per group, and the program's `listen` backlog
//! for what its node holds unaccepted, [`Held`]). When no member is
//! eligible a client waits in the group's queue, up to
//! [`Limits::max_queue`] for at most [`Limits::queue_timeout`]
//! ([`Groups::expire`]), and goes as soon as one is
//! ([`Groups::next_queued`]); with the queue full too the group is
//! *paused* ([`Groups::admits`]): its accept task leaves new clients in the
//! kernel's accept queue until [`Groups::resume`]. A client whose node left
//! before its program accepted it is dispatched again like a new one
//! ([`Groups::redispatch`], issue 17).
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

/// Set by the io-server in the bind flags of an `AF_INET` socket (the
/// family of the address it asked for); never one of the flags a node
/// sends ([`bind_flags::ALL`]).
pub const INET: u32 = 1 << 31;

/// Whether a new socket of one node with bind `flags` may share a port
/// with one it holds (`held`, `listening` or not), by the kernel's rules
/// (`inet_csk_bind_conflict`): both `SO_REUSEPORT`, or both `SO_REUSEADDR`
/// while the one held does not listen; or they bind no address in common
/// ([`overlap`]).
fn shares(flags: u32, held: u32, listening: bool) -> bool {
    !overlap(flags, held) || bind_flags::reuse(flags, held, listening)
}

/// Whether two sockets' binds of one port take an address in common: an
/// `AF_INET6` socket with `IPV6_V6ONLY` takes no IPv4 address, so it and
/// an `AF_INET` socket bind the same port side by side, as in the kernel
/// (`inet_rcv_saddr_equal`). Every other pair does: each bind is of the
/// wildcard or of the one address.
fn overlap(a: u32, b: u32) -> bool {
    !(inet(a) && v6only(b) || v6only(a) && inet(b))
}

fn inet(flags: u32) -> bool {
    flags & INET != 0
}

fn v6only(flags: u32) -> bool {
    !inet(flags) && flags & bind_flags::V6ONLY != 0
}

/// Whether a socket bound with `flags` takes clients of group `key`'s
/// family: an `IPV6_V6ONLY` socket no IPv4 client, an `AF_INET` socket no
/// IPv6 one. The io-server serves one address, so a group's clients are
/// all of its family; such a member gets them only while no member of
/// the group takes them ([`Group::passed_over`]).
fn takes(key: SocketAddr, flags: u32) -> bool {
    if key.is_ipv4() {
        !v6only(flags)
    } else {
        !inet(flags)
    }
}

mod snapshot;
#[cfg(test)]
mod tests;

/// The largest `--max-queue` the default configuration gives a group; a
/// node keeps at most this many connections for re-dispatch
/// (`unaccepted.rs`).
pub const MAX_QUEUED: usize = 1024;

/// Descriptors kept out of the derived `--max-conn-per-group`
/// ([`Limits::new`]) for the io-server's own sockets: fabric and control
/// listeners, one or two per node, the handshakes in flight (64 by
/// default). A relayed connection costs one descriptor, a handed-over one
/// none once accepted.
pub const RESERVED_FDS: u64 = 128;

/// The admission bounds of every group ([`Limits::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections one member may have at once (0: no limit).
    pub per_node: usize,
    /// Connections one group may have at once.
    pub per_group: usize,
    /// Clients one group keeps waiting for an eligible member.
    pub max_queue: usize,
    /// How long a client may wait in the queue.
    pub queue_timeout: Duration,
}

impl Limits {
    /// The bounds `config` asks for; a `--max-conn-per-group` of 0 is
    /// derived from `nofile`, the io-server's descriptor limit, less
    /// [`RESERVED_FDS`] (at least 64), as haproxy derives its `maxconn`
    /// from `ulimit -n`.
    pub fn new(config: &crate::config::Config, nofile: u64) -> Limits {
        let derived = nofile.saturating_sub(RESERVED_FDS).max(64);
        Limits {
            per_node: config.max_conn_per_node as usize,
            per_group: match config.max_conn_per_group {
                0 => usize::try_from(derived).unwrap_or(usize::MAX),
                n => n as usize,
            },
            max_queue: config.max_queue as usize,
            queue_timeout: Duration::from_secs(config.queue_timeout),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_node: 0,
            per_group: usize::MAX,
            max_queue: MAX_QUEUED,
            queue_timeout: Duration::from_secs(crate::config::DEFAULT_QUEUE_TIMEOUT),
        }
    }
}

/// What a member's node holds of the clients the group gave it, beyond
/// the ledger's live relayed connections (its callers count these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Relayed clients its program has not accepted yet.
    pub relayed: usize,
    /// Clients handed over as sockets its program has not accepted yet
    /// (the ledger does not count them as active).
    pub handed: usize,
    /// The node tells of each accept (protocol version 2): only then are
    /// the counts above known, and the backlog a bound.
    pub counts_accepts: bool,
    /// The node keeps as many unaccepted connections as it may
    /// (`unaccepted::MAX_UNACCEPTED`): none more until it accepts some.
    pub node_full: bool,
}

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
    /// Each member's `listen` backlog, as its program gave it.
    backlogs: BTreeMap<MemberId, u32>,
    scheduler: Box<dyn Scheduler>,
    /// Clients waiting for an eligible member, with when they came.
    queue: VecDeque<(C, Instant)>,
    /// A timer is set for the queue's oldest client ([`Groups::expire`]).
    expiring: bool,
    /// Clients ever queued, and of those closed at the queue timeout.
    queued_total: u64,
    timed_out: u64,
    /// New clients are left in the kernel's accept queue.
    paused: bool,
    /// How many times the group was paused.
    pauses: u64,
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
    /// The bind flags of `node`'s socket `conn` here (0 if not bound).
    fn flags(&self, node: NodeId, conn: ConnId) -> u32 {
        let bound = self.binds.iter().find(|b| b.node == node && b.conn == conn);
        bound.map_or(0, |b| b.flags)
    }

    /// The members of group `key` passed over for its clients: those that
    /// do not take clients of the group's family ([`takes`]) while another
    /// member does (the kernel would give them to that one). Mostly none,
    /// found in one pass over the binds.
    fn passed_over(&self, key: SocketAddr) -> Vec<MemberId> {
        if self.binds.iter().all(|b| takes(key, b.flags)) {
            return Vec::new();
        }
        let (taking, not): (Vec<MemberId>, Vec<MemberId>) = self
            .members
            .iter()
            .partition(|m| takes(key, self.flags(m.node, m.listener)));
        if taking.is_empty() {
            Vec::new()
        } else {
            not
        }
    }

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

    /// A member's `listen` backlog (0 for one not here).
    pub fn backlog(&self, member: MemberId) -> u32 {
        self.backlogs.get(&member).copied().unwrap_or(0)
    }

    /// Clients ever queued, and of those closed at the queue timeout.
    pub fn queue_counts(&self) -> (u64, u64) {
        (self.queued_total, self.timed_out)
    }

    /// Whether new clients are left in the kernel's accept queue now, and
    /// how many times they were.
    pub fn paused(&self) -> (bool, u64) {
        (self.paused, self.pauses)
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
    /// Kept in the group's queue until a member is eligible; `expire`:
    /// the caller sets a timer for [`Groups::expire`] (none is set yet).
    Queued { expire: bool },
    /// The queue is full: the caller closes the client.
    QueueFull(C),
    /// No such group (its port closed): the caller closes the client.
    NoGroup(C),
}

/// Every listener group, keyed by its real address, and the nodes'
/// weights.
pub struct Groups<C> {
    kind: SchedulerKind,
    limits: Limits,
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
    /// Listeners that left their group, oldest first, for [`Groups::lingers`].
    left: VecDeque<Left>,
    /// While set, no member is picked: every client waits in its group's
    /// queue (an upgrade's quiesce; not carried, it is the old process's).
    hold: bool,
}

/// How long after a listener leaves its group the connections it was
/// given may hold the port still, closed first by its program: up to
/// `tcp_fin_timeout` (60 s) in FIN_WAIT2, then `TCP_TIMEWAIT_LEN` (60 s)
/// in TIME_WAIT.
pub const LINGER: Duration = Duration::from_secs(120);

/// Listeners that left remembered at most ([`Groups::lingers`]).
const MAX_LEFT: usize = 4096;

/// A listener that left group `key`, with its bind flags.
#[derive(Debug)]
struct Left {
    key: SocketAddr,
    node: NodeId,
    flags: u32,
    at: Instant,
}

impl<C> Groups<C> {
    /// No groups; every group schedules with `kind`, admits within
    /// [`Limits::default`].
    #[cfg(test)]
    pub fn new(kind: SchedulerKind) -> Self {
        Groups::with_limits(kind, Limits::default())
    }

    /// No groups; every group schedules with `kind` and admits within
    /// `limits`.
    pub fn with_limits(kind: SchedulerKind, limits: Limits) -> Self {
        Groups {
            kind,
            limits,
            map: BTreeMap::new(),
            weights: BTreeMap::new(),
            slow_start: Duration::ZERO,
            ramps: BTreeMap::new(),
            ledger: Ledger::default(),
            orphanings: 0,
            left: VecDeque::new(),
            hold: false,
        }
    }

    /// When the oldest client queued in group `key` came, if any queues
    /// (for a restored group's expiry timer, `dispatch::expire_later`).
    pub fn oldest_queued(&self, key: SocketAddr) -> Option<Instant> {
        self.map.get(&key)?.queue.front().map(|(_, at)| *at)
    }

    /// Holds every client in its group's queue ([`Groups::pick`] picks no
    /// member) while `hold`.
    pub fn hold(&mut self, hold: bool) {
        self.hold = hold;
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
        let members = &g.members;
        let clash = g.binds.iter().filter(|b| b.node == node).any(|b| {
            let listening = members.contains(&MemberId {
                node,
                listener: b.conn,
            });
            !shares(flags, b.flags, listening)
        });
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
            backlogs: BTreeMap::new(),
            scheduler: scheduler::new(self.kind),
            queue: VecDeque::new(),
            expiring: false,
            queued_total: 0,
            timed_out: 0,
            paused: false,
            pauses: 0,
            redispatched: 0,
            listening: false,
            orphaned: None,
        };
        self.map.insert(key, group);
    }

    /// Whether there is a group at `key`.
    #[cfg(test)]
    pub fn contains(&self, key: SocketAddr) -> bool {
        self.map.contains_key(&key)
    }

    /// Whether the connections a listener of `node` on `key` was given
    /// may hold the port against a new bind of it with `flags`, at `now`:
    /// the listener left within [`LINGER`], and the two would not share
    /// the port (a connection keeps its listener's `SO_REUSEADDR`, and
    /// one closed first lingers, not listening). If so the caller asks
    /// the kernel whether a connection closed first lingers on the port
    /// (`sys::closed_first_on`): then the bind fails with `EADDRINUSE`,
    /// as the kernel's TIME_WAIT makes it fail. Which node's connection
    /// lingers the kernel does not say: any one counts here.
    pub fn lingers(&mut self, node: NodeId, key: SocketAddr, flags: u32, now: Instant) -> bool {
        let old = |l: &Left| now.saturating_duration_since(l.at) >= LINGER;
        while self.left.front().is_some_and(old) {
            self.left.pop_front();
        }
        let held = |l: &Left| l.key == key && l.node == node && !shares(flags, l.flags, false);
        key.port() != 0 && self.left.iter().any(held)
    }

    /// Makes the bound `conn` a member with its program's `backlog`; the
    /// caller has made the port listen. False when it was one already
    /// (`listen()` again only changes the backlog).
    pub fn listen(
        &mut self,
        key: SocketAddr,
        node: NodeId,
        conn: ConnId,
        backlog: u32,
    ) -> Result<bool, i32> {
        self.may_listen(key, node, conn)?;
        let g = self.map.get_mut(&key).ok_or(libc::EINVAL)?;
        let member = MemberId {
            node,
            listener: conn,
        };
        g.listening = true;
        g.backlogs.insert(member, backlog);
        if g.members.contains(&member) {
            return Ok(false);
        }
        g.members.push(member);
        self.ledger.open(Scope::Member(key, member));
        Ok(true)
    }

    /// Whether the bound `conn` of `node` may listen on `key`: the kernel
    /// checks the port again at `listen`, and another socket of this node
    /// listening on it conflicts unless both set `SO_REUSEPORT` (two
    /// `SO_REUSEADDR` sockets share a port only while neither listens).
    pub fn may_listen(&self, key: SocketAddr, node: NodeId, conn: ConnId) -> Result<(), i32> {
        let g = self.map.get(&key).ok_or(libc::EINVAL)?;
        let flags = |c: ConnId| g.flags(node, c);
        let mine = flags(conn);
        let clash = g.members.iter().any(|m| {
            m.node == node && m.listener != conn && !shares(mine, flags(m.listener), true)
        });
        if clash {
            return Err(libc::EADDRINUSE);
        }
        Ok(())
    }

    /// Drops `node`'s socket `conn` (or all of its sockets with `None`).
    /// A group nobody binds any more closes its port, unless it was
    /// listening: then it is orphaned.
    pub fn unbind(&mut self, node: NodeId, conn: Option<ConnId>) -> Unbound {
        let hit = |n: NodeId, c: ConnId| n == node && conn.is_none_or(|x| x == c);
        let mut out = Unbound::default();
        let ledger = &mut self.ledger;
        let at = Instant::now();
        for (&key, g) in self.map.iter_mut() {
            let had = !g.binds.is_empty();
            for m in g.members.iter().filter(|m| hit(m.node, m.listener)) {
                let flags = g.flags(m.node, m.listener);
                if self.left.len() >= MAX_LEFT {
                    self.left.pop_front();
                }
                let node = m.node;
                self.left.push_back(Left {
                    key,
                    node,
                    flags,
                    at,
                });
            }
            g.binds.retain(|b| !hit(b.node, b.conn));
            let backlogs = &mut g.backlogs;
            g.members.retain(|&m| {
                let gone = hit(m.node, m.listener);
                if gone {
                    ledger.forget(Scope::Member(key, m));
                    backlogs.remove(&m);
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
        let g = self.remove(orphan.key)?;
        Some(g.queue.into_iter().map(|(c, _)| c).collect())
    }

    fn remove(&mut self, key: SocketAddr) -> Option<Group<C>> {
        let g = self.map.remove(&key)?;
        self.ledger.forget(Scope::Group(key));
        for &m in &g.members {
            self.ledger.forget(Scope::Member(key, m));
        }
        Some(g)
    }

    /// Asks the group's scheduler for an eligible member for a client
    /// from `client`. Each candidate carries its weight and live
    /// connections; for a scheduler that [needs
    /// them](Scheduler::needs_pending), also the bytes still to deliver on
    /// them, `pending` per connection. A member at one of its bounds
    /// (`held`, [`Limits`]) is offered with weight 0, never picked; none at
    /// all while the group is at its own bound.
    pub fn pick(
        &mut self,
        key: SocketAddr,
        client: IpAddr,
        pending: impl Fn(NodeId, ConnId) -> u64,
        held: impl Fn(MemberId) -> Held,
    ) -> Option<MemberId> {
        if self.hold {
            return None;
        }
        let g = self.map.get_mut(&key)?;
        let needs_pending = g.scheduler.needs_pending();
        let over = g.passed_over(key);
        let limits = &self.limits;
        let mut group_conns = self
            .ledger
            .get(Scope::Group(key))
            .map_or(0, |t| t.active() as usize);
        let candidates: Vec<Candidate> = g
            .members
            .iter()
            .map(|&m| {
                let t = self.ledger.get(Scope::Member(key, m));
                let active = t.map_or(0, |t| t.active());
                let h = held(m);
                group_conns += h.handed;
                let backlog = g.backlogs.get(&m).copied().unwrap_or(0) as usize;
                let eligible =
                    admits_one(limits, active as usize, backlog, &h) && !over.contains(&m);
                let weight = self.weights.get(&m.node).copied().unwrap_or(0);
                Candidate {
                    key: (u64::from(m.node) << 40) ^ m.listener,
                    weight: if eligible { weight } else { 0 },
                    active,
                    pending: match t {
                        Some(t) if needs_pending => t.live().map(|(n, c)| pending(n, c)).sum(),
                        _ => 0,
                    },
                }
            })
            .collect();
        if group_conns >= limits.per_group {
            return None;
        }
        let i = g.scheduler.pick(&candidates, client)?;
        Some(g.members[i])
    }

    /// Places a new client of group `key`, come at `now` (see
    /// [`Groups::pick`]): with a member, or in the queue.
    pub fn dispatch(
        &mut self,
        key: SocketAddr,
        client: C,
        from: IpAddr,
        now: Instant,
        pending: impl Fn(NodeId, ConnId) -> u64,
        held: impl Fn(MemberId) -> Held,
    ) -> Placement<C> {
        if let Some(member) = self.pick(key, from, pending, held) {
            return Placement::Member(member, client);
        }
        let max_queue = self.limits.max_queue;
        match self.map.get_mut(&key) {
            None => Placement::NoGroup(client),
            Some(g) if g.queue.len() < max_queue => {
                g.queue.push_back((client, now));
                g.queued_total += 1;
                let expire = !std::mem::replace(&mut g.expiring, true);
                Placement::Queued { expire }
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
        now: Instant,
        pending: impl Fn(NodeId, ConnId) -> u64,
        held: impl Fn(MemberId) -> Held,
    ) -> Placement<C> {
        if let Some(g) = self.map.get_mut(&key) {
            g.redispatched += 1;
        }
        self.dispatch(key, client, from, now, pending, held)
    }

    /// Whether group `key` takes another client now (a member may be
    /// eligible, or its queue has room); if not it is paused from now on:
    /// its accept task leaves new clients in the kernel's accept queue
    /// until [`Groups::resume`] says otherwise. Called after a client was
    /// queued or refused, so a client given to a member costs nothing more.
    pub fn admits(&mut self, key: SocketAddr, held: impl Fn(MemberId) -> Held) -> bool {
        let limits = self.limits;
        let eligible = self.eligible(key, &held);
        let Some(g) = self.map.get_mut(&key) else {
            return false;
        };
        let admits = eligible || g.queue.len() < limits.max_queue;
        if !admits && !g.paused {
            g.paused = true;
            g.pauses += 1;
        }
        admits
    }

    /// Whether group `key`, paused, admits clients again (a member became
    /// eligible, or its queue has room): if so it is no longer paused and
    /// the caller wakes its accept task.
    pub fn resume(&mut self, key: SocketAddr, held: impl Fn(MemberId) -> Held) -> bool {
        let limits = self.limits;
        let eligible = self.eligible(key, &held);
        let Some(g) = self.map.get_mut(&key) else {
            return false;
        };
        if !g.paused || !(eligible || g.queue.len() < limits.max_queue) {
            return false;
        }
        g.paused = false;
        true
    }

    /// The groups that wait for room: paused, or with clients queued.
    pub fn waiting(&self) -> Vec<SocketAddr> {
        let waiting = self
            .map
            .iter()
            .filter(|(_, g)| g.paused || !g.queue.is_empty());
        waiting.map(|(&k, _)| k).collect()
    }

    /// Whether some member of group `key` may take a client now (the
    /// group below its bound, one member with weight and below its own).
    fn eligible(&self, key: SocketAddr, held: &impl Fn(MemberId) -> Held) -> bool {
        let Some(g) = self.map.get(&key) else {
            return false;
        };
        let active = |scope| self.ledger.get(scope).map_or(0, |t| t.active() as usize);
        let mut group_conns = active(Scope::Group(key));
        let over = g.passed_over(key);
        let mut any = false;
        for &m in &g.members {
            let h = held(m);
            group_conns += h.handed;
            let backlog = g.backlogs.get(&m).copied().unwrap_or(0) as usize;
            let weighted = self.weights.get(&m.node).is_some_and(|&w| w > 0);
            any |= weighted
                && admits_one(&self.limits, active(Scope::Member(key, m)), backlog, &h)
                && !over.contains(&m);
        }
        any && group_conns < self.limits.per_group
    }

    /// The next queued client of group `key`, if a member is eligible to
    /// take it (the caller dispatches it).
    pub fn next_queued(&mut self, key: SocketAddr, held: impl Fn(MemberId) -> Held) -> Option<C> {
        if !self.eligible(key, &held) {
            return None;
        }
        let g = self.map.get_mut(&key)?;
        g.queue.pop_front().map(|(c, _)| c)
    }

    /// The clients of group `key` that waited in its queue past the queue
    /// timeout at `now`, to close (counted), and when the next one's time
    /// is up; `None` then: the queue is empty and its timer ends (the next
    /// client queued sets one again, [`Placement::Queued`]).
    pub fn expire(&mut self, key: SocketAddr, now: Instant) -> (Vec<C>, Option<Instant>) {
        let timeout = self.limits.queue_timeout;
        let Some(g) = self.map.get_mut(&key) else {
            return (Vec::new(), None);
        };
        let mut out = Vec::new();
        while let Some((_, since)) = g.queue.front() {
            if now.saturating_duration_since(*since) < timeout {
                break;
            }
            out.extend(g.queue.pop_front().map(|(c, _)| c));
        }
        g.timed_out += out.len() as u64;
        let next = g.queue.front().map(|(_, since)| *since + timeout);
        g.expiring = next.is_some();
        (out, next)
    }

    /// The admission bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Empties every queue (shutdown): the clients, to close.
    pub fn take_queues(&mut self) -> Vec<C> {
        let queues = self.map.values_mut().map(|g| std::mem::take(&mut g.queue));
        queues.flatten().map(|(c, _)| c).collect()
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

/// Whether one member with `active` live relayed connections, `backlog`
/// and `held` may take a client within `limits`: below the per-node
/// bound, and, where its node tells of accepts, with fewer unaccepted
/// than a kernel listener of that backlog holds (backlog + 1) and room to
/// keep one more.
fn admits_one(limits: &Limits, active: usize, backlog: usize, held: &Held) -> bool {
    let conns = active + held.handed;
    if limits.per_node > 0 && conns >= limits.per_node {
        return false;
    }
    !held.counts_accepts || (!held.node_full && held.relayed + held.handed <= backlog)
}
