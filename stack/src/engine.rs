//! The stack's thread: smoltcp's `Interface` on the TAP, the sockets, the
//! backlog pools of the listening ports, the pending connects and the
//! bridges, all owned here and touched by no other thread. Users talk to
//! it through a bounded command queue and an eventfd that wakes its epoll
//! ([`Wake`]); it answers through [`Mailbox`]es.
//!
//! The sockets are spread over shards, several `SocketSet`s under the one
//! `Interface`, so that no step of the loop walks every socket: each frame
//! is routed by its addresses (remote address, remote port, local port)
//! through an index to the one shard holding its connection, or to the
//! listen shard (the backlog pools, and whatever the index does not know:
//! SYNs, ARP, strays, which smoltcp answers there as before); only the
//! shards that got a frame, whose bridges moved bytes, or whose own
//! deadline came are polled for egress; only the bridges of those shards
//! and the pairs epoll reports ready are pumped.
//!
//! One loop: the commands and the pools, the TAP's frames one by one (the
//! commands and pools again before a frame when a user asked something
//! meanwhile), the egress of the shards due, the connects, the bridges due,
//! then epoll on the TAP, the wake fd and the pairs that wait for
//! something, for at most the nearest shard's deadline.

use crate::bridge::{Bridge, Moved, Step};
use crate::mailbox::{Mailbox, Wake};
use crate::sys::{self, Epoll, Errno, Mapped};
use crate::tap::Tap;
use crate::{Config, Connection, Stats};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration as SDuration, Instant as SInstant};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpEndpoint, IpProtocol, Ipv4Packet, TcpPacket,
};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::Instant;

/// A connect's outcome: the connection, or the errno the kernel would give.
pub(crate) type Outcome = Result<Connection, Errno>;

/// What users ask of the thread.
pub(crate) enum Command {
    Listen {
        port: u16,
        backlog: usize,
        ready: Arc<Mailbox<Connection>>,
        reply: SyncSender<Result<(), Errno>>,
    },
    Connect {
        remote: SocketAddrV4,
        outcome: Arc<Mailbox<Outcome>>,
    },
    Stats {
        reply: SyncSender<Stats>,
    },
    /// A listener's backlog grows (a second `listen` asking more).
    Backlog {
        port: u16,
        backlog: usize,
        ready: Arc<Mailbox<Connection>>,
    },
}

/// A listening port: its pool of listening sockets and the queue of
/// established connections not yet accepted; the two together never hold
/// more than the backlog.
struct Port {
    backlog: usize,
    pool: Vec<Id>,
    ready: Arc<Mailbox<Connection>>,
}

/// An outbound connect under way.
struct Pending {
    id: Id,
    remote: SocketAddrV4,
    deadline: Instant,
    outcome: Arc<Mailbox<Outcome>>,
}

/// A socket of the engine, whatever shard holds it (a socket moves from
/// the listen shard to a data shard when it leaves LISTEN).
pub(crate) type Id = u64;

/// What routes a TCP segment to its connection: the remote address, the
/// remote port, the local port (the local address is the single one).
pub(crate) type Key = (Ipv4Addr, u16, u16);

/// The shard of the backlog pools and of every frame the index does not
/// route.
const LISTEN: usize = 0;

/// Sockets per data shard the shard count is sized for (from
/// `max_sockets`): a polled shard has smoltcp walk all its sockets and
/// the engine pump all its bridges, so a shard holds few (docs/stack.md,
/// "The per-packet walk"). Nothing walks every shard per loop: the dirty
/// ones are listed, the deadlines kept in a heap.
const PER_SHARD: usize = 8;

/// At most this many data shards.
const MAX_SHARDS: usize = 8192;

/// The epoll keys of the TAP and of the wake fd (the pairs' are their
/// socket's [`Id`], counted from 0).
const TAP_KEY: u64 = u64::MAX;
const WAKE_KEY: u64 = u64::MAX - 1;

/// One `SocketSet` and what the loop knows of it.
pub(crate) struct Shard {
    set: SocketSet<'static>,
    /// Its sockets' ids.
    ids: HashMap<SocketHandle, Id>,
    /// When smoltcp wants it polled next (retransmits, keep-alives,
    /// timeouts), as of its last egress; `None`: never by itself.
    at: Option<SInstant>,
    /// Something happened to it since its last egress (a frame, a bridge
    /// moved bytes, a command): polled in this loop (and in
    /// `Engine::dirty`).
    dirty: bool,
}

/// Where a socket is and the memory its buffers borrow.
struct Slot {
    shard: usize,
    handle: SocketHandle,
    /// Its entry in the index, once it has a remote end outside the listen
    /// shard.
    key: Option<Key>,
    /// Its receive and send buffer (`sys::Mapped`).
    mem: [Mapped; 2],
}

pub(crate) struct Engine {
    config: Config,
    iface: Interface,
    tap: Tap,
    /// Declared before `slots`: a socket drops before the memory its
    /// buffers borrow. `shards[LISTEN]`, then the data shards.
    shards: Vec<Shard>,
    slots: HashMap<Id, Slot>,
    next_id: Id,
    /// The data shards' connections by their addresses.
    index: HashMap<Key, Id>,
    /// How many sockets the shards hold (bounded by `max_sockets`).
    count: usize,
    commands: Receiver<Command>,
    wake: Arc<Wake>,
    stop: Arc<AtomicBool>,
    ports: HashMap<u16, Port>,
    /// The pools may hold sockets that left LISTEN (the listen shard got a
    /// frame or was polled since they were last looked at).
    pools_stale: bool,
    /// An ARP frame came: a socket waiting for its neighbour may go now,
    /// whatever its shard's deadline said.
    neighbours_changed: bool,
    /// The shards marked dirty, in the order marked.
    dirty: Vec<usize>,
    /// The shards' deadlines, nearest first; an entry whose shard's `at`
    /// has changed since is stale and skipped.
    timers: BinaryHeap<Reverse<(SInstant, usize)>>,
    /// The data shards by their number of sockets (the emptiest first).
    loads: BTreeSet<(usize, usize)>,
    pending: Vec<Pending>,
    bridges: HashMap<Id, Bridge>,
    /// Bridges to pump in this loop (epoll reported their pair, their
    /// shard was polled, or they are new).
    due: Vec<Id>,
    /// Local ports of outbound connections, by socket.
    ephemeral: HashMap<Id, u16>,
    used_ephemeral: HashSet<u16>,
    next_ephemeral: u16,
    moved: Moved,
    resets: u64,
    refused_max_sockets: u64,
    /// The socket limit was hit and logged; cleared once below it again.
    at_limit: bool,
    epoll: Epoll,
    events: Vec<libc::epoll_event>,
    /// Egress passes per shard, for the tests.
    #[cfg(test)]
    egress_passes: Vec<u64>,
}

/// The number of data shards for `max_sockets`.
fn data_shards(max_sockets: usize) -> usize {
    max_sockets.div_ceil(PER_SHARD).clamp(1, MAX_SHARDS)
}

/// The route of a TCP segment to the address `local`: its [`Key`]; `None`
/// for anything else (not IPv4, not TCP, not to `local`, a fragment past
/// the first, malformed). No checksum is checked: smoltcp does that.
pub(crate) fn frame_key(frame: &[u8], local: Ipv4Addr) -> Option<Key> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.dst_addr() != local || ip.frag_offset() != 0 {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((ip.src_addr(), tcp.src_port(), tcp.dst_port()))
}

/// Whether `frame` is ARP (it may fill smoltcp's neighbour cache).
fn is_arp(frame: &[u8]) -> bool {
    EthernetFrame::new_checked(frame).is_ok_and(|e| e.ethertype() == EthernetProtocol::Arp)
}

impl Engine {
    pub fn new(
        config: Config,
        mut tap: Tap,
        commands: Receiver<Command>,
        wake: Arc<Wake>,
        stop: Arc<AtomicBool>,
    ) -> Result<Engine, Errno> {
        let mut ic =
            smoltcp::iface::Config::new(HardwareAddress::Ethernet(EthernetAddress(config.mac)));
        ic.random_seed = seed();
        let mut iface = Interface::new(ic, &mut tap, SInstant::now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(
                IpAddress::Ipv4(config.address),
                config.prefix_len,
            ));
        });
        if let Some(gw) = config.gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        let epoll = Epoll::new()?;
        epoll.ctl(
            libc::EPOLL_CTL_ADD,
            tap.as_fd(),
            libc::EPOLLIN as u32,
            TAP_KEY,
        )?;
        epoll.ctl(
            libc::EPOLL_CTL_ADD,
            wake.as_fd(),
            libc::EPOLLIN as u32,
            WAKE_KEY,
        )?;
        let n = 1 + data_shards(config.max_sockets);
        let shards = (0..n)
            .map(|_| Shard {
                set: SocketSet::new(vec![]),
                ids: HashMap::new(),
                at: None,
                dirty: false,
            })
            .collect();
        let next_ephemeral = *config.ephemeral_ports.start();
        Ok(Engine {
            config,
            iface,
            tap,
            shards,
            slots: HashMap::new(),
            next_id: 0,
            index: HashMap::new(),
            count: 0,
            commands,
            wake,
            stop,
            ports: HashMap::new(),
            pools_stale: false,
            neighbours_changed: false,
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            loads: (1..n).map(|i| (0, i)).collect(),
            pending: Vec::new(),
            bridges: HashMap::new(),
            due: Vec::new(),
            ephemeral: HashMap::new(),
            used_ephemeral: HashSet::new(),
            next_ephemeral,
            moved: Moved::default(),
            resets: 0,
            refused_max_sockets: 0,
            at_limit: false,
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            #[cfg(test)]
            egress_passes: vec![0; n],
        })
    }

    /// Runs until the [`crate::Stack`] is dropped.
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            self.turn();
            self.wait();
        }
    }

    /// One loop but the wait.
    fn turn(&mut self) {
        let now = SInstant::now();
        self.wake.take();
        self.serve_users();
        // Frame by frame, each after what users asked before it arrived:
        // an `accept` frees its place in the backlog for the SYN right
        // behind it, as in the kernel.
        while self.tap.fetch() {
            if self.wake.take() {
                self.serve_users();
            }
            let shard = self.route();
            self.iface
                .poll_ingress_single(now, &mut self.tap, &mut self.shards[shard].set);
        }
        self.egress();
        self.service_ports();
        self.service_pending();
        self.service_bridges();
    }

    /// The shard the frame read ahead goes to, marked dirty.
    fn route(&mut self) -> usize {
        let Some(frame) = self.tap.peek() else {
            return LISTEN;
        };
        let shard = match frame_key(frame, self.config.address) {
            Some(key) => self
                .index
                .get(&key)
                .and_then(|id| self.slots.get(id))
                .map_or(LISTEN, |s| s.shard),
            None => {
                if is_arp(frame) {
                    self.neighbours_changed = true;
                }
                LISTEN
            }
        };
        if shard == LISTEN {
            self.pools_stale = true;
        }
        self.touch(shard);
        shard
    }

    /// Shard `i` to be polled for egress in this loop.
    fn touch(&mut self, i: usize) {
        let sh = &mut self.shards[i];
        if !sh.dirty {
            sh.dirty = true;
            self.dirty.push(i);
        }
    }

    /// Shard `i`'s deadline is now `at`.
    fn set_deadline(&mut self, i: usize, at: Option<SInstant>) {
        let sh = &mut self.shards[i];
        if sh.at != at {
            sh.at = at;
            if let Some(t) = at {
                self.timers.push(Reverse((t, i)));
            }
        }
    }

    /// Shard `i`'s place among the data shards by load, after it held
    /// `before` sockets.
    fn reload(&mut self, i: usize, before: usize) {
        if i != LISTEN {
            self.loads.remove(&(before, i));
            self.loads.insert((self.shards[i].ids.len(), i));
        }
    }

    /// smoltcp's egress for the shards due (dirty, or their deadline
    /// passed); their bridges become due.
    fn egress(&mut self) {
        let now = SInstant::now();
        if std::mem::take(&mut self.neighbours_changed) {
            // A socket that waited for a neighbour has a deadline a second
            // away; with the neighbour known it may send now.
            for i in 0..self.shards.len() {
                let at = self.iface.poll_at(now, &self.shards[i].set);
                self.set_deadline(i, at);
            }
        }
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.shards[i].at == Some(t) {
                // Consumed: the poll below sets the next one.
                self.shards[i].at = None;
                self.touch(i);
            }
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            let sh = &mut self.shards[i];
            sh.dirty = false;
            self.iface.poll_egress(now, &mut self.tap, &mut sh.set);
            let at = self.iface.poll_at(now, &sh.set);
            if i == LISTEN {
                // Its sockets have no bridge yet: the pools are looked at.
                self.pools_stale = true;
            } else {
                self.due.extend(sh.ids.values().copied());
            }
            self.set_deadline(i, at);
            #[cfg(test)]
            {
                self.egress_passes[i] += 1;
            }
        }
        dirty.clear();
        self.dirty = dirty;
        if self.timers.len() > 2 * self.shards.len() + 64 {
            // Stale entries: one per shard is enough.
            self.timers = self
                .shards
                .iter()
                .enumerate()
                .filter_map(|(i, sh)| sh.at.map(|t| Reverse((t, i))))
                .collect();
        }
    }

    /// The commands queued, then the listening ports (accepts handed out,
    /// pools refilled).
    fn serve_users(&mut self) {
        while let Ok(c) = self.commands.try_recv() {
            self.command(c);
        }
        self.service_ports();
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Listen {
                port,
                backlog,
                ready,
                reply,
            } => {
                let r = self.listen(port, backlog, ready);
                let _ = reply.try_send(r);
            }
            Command::Connect { remote, outcome } => {
                if let Err(e) = self.connect(remote, &outcome) {
                    let _ = outcome.push(Err(e));
                }
            }
            Command::Stats { reply } => {
                let _ = reply.try_send(self.stats());
            }
            Command::Backlog {
                port,
                backlog,
                ready,
            } => {
                if let Some(p) = self.ports.get_mut(&port) {
                    if Arc::ptr_eq(&p.ready, &ready) && backlog > p.backlog {
                        p.backlog = backlog;
                        tracing::debug!(port, backlog, "backlog grown");
                    }
                }
                self.refill(port);
            }
        }
    }

    fn listen(
        &mut self,
        port: u16,
        backlog: usize,
        ready: Arc<Mailbox<Connection>>,
    ) -> Result<(), Errno> {
        if self.ports.get(&port).is_some_and(|p| p.ready.is_closed()) {
            self.close_port(port);
        }
        if port == 0 || self.ports.contains_key(&port) || self.used_ephemeral.contains(&port) {
            return Err(libc::EADDRINUSE);
        }
        self.ports.insert(
            port,
            Port {
                backlog,
                pool: Vec::new(),
                ready,
            },
        );
        self.refill(port);
        tracing::debug!(port, backlog, "listening");
        Ok(())
    }

    /// A new smoltcp socket in shard `shard` with the configured buffers,
    /// if under the bound.
    fn add_socket(&mut self, shard: usize) -> Option<Id> {
        if self.count >= self.config.max_sockets {
            self.refused_max_sockets += 1;
            if !self.at_limit {
                self.at_limit = true;
                tracing::warn!(
                    max_sockets = self.config.max_sockets,
                    "socket limit reached: listening pools not refilled, connects refused"
                );
            }
            return None;
        }
        let mem = match (
            Mapped::new(self.config.rx_buffer),
            Mapped::new(self.config.tx_buffer),
        ) {
            (Ok(rx), Ok(tx)) => [rx, tx],
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(errno = e, "cannot map a socket's buffers");
                return None;
            }
        };
        // SAFETY: the slices live in the socket, which `remove_socket`
        // (or the engine's drop, `shards` first) drops before `mem`.
        let (rx, tx) = unsafe { (mem[0].slice(), mem[1].slice()) };
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        s.set_timeout(Some(to_smol(self.config.idle_timeout)));
        s.set_keep_alive(Some(to_smol(self.config.keep_alive)));
        s.set_nagle_enabled(false);
        self.count += 1;
        let id = self.next_id;
        self.next_id += 1;
        let handle = self.shards[shard].set.add(s);
        let before = self.shards[shard].ids.len();
        self.shards[shard].ids.insert(handle, id);
        self.reload(shard, before);
        self.slots.insert(
            id,
            Slot {
                shard,
                handle,
                key: None,
                mem,
            },
        );
        Some(id)
    }

    /// The data shard with the fewest sockets.
    fn data_shard(&self) -> usize {
        self.loads.first().map_or(LISTEN, |&(_, i)| i)
    }

    /// Socket `id` routed by `key` from now on.
    fn index(&mut self, id: Id, key: Key) {
        if let Some(slot) = self.slots.get_mut(&id) {
            if let Some(old) = slot.key.replace(key) {
                self.index.remove(&old);
            }
            self.index.insert(key, id);
        }
    }

    /// Moves socket `id` (out of the listen shard) to the data shard with
    /// the fewest sockets; its buffers stay where they are mapped.
    fn move_to_data(&mut self, id: Id) {
        let Some(slot) = self.slots.get(&id) else {
            return;
        };
        let (from, handle) = (slot.shard, slot.handle);
        let to = self.data_shard();
        if to == from {
            return;
        }
        let smoltcp::socket::Socket::Tcp(s) = self.shards[from].set.remove(handle);
        self.shards[from].ids.remove(&handle);
        let handle = self.shards[to].set.add(s);
        let before = self.shards[to].ids.len();
        self.shards[to].ids.insert(handle, id);
        self.reload(to, before);
        self.touch(to);
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.shard = to;
            slot.handle = handle;
        }
    }

    fn socket(&self, id: Id) -> &tcp::Socket<'static> {
        let slot = &self.slots[&id];
        self.shards[slot.shard].set.get::<tcp::Socket>(slot.handle)
    }

    fn socket_mut(&mut self, id: Id) -> &mut tcp::Socket<'static> {
        let slot = &self.slots[&id];
        self.shards[slot.shard]
            .set
            .get_mut::<tcp::Socket>(slot.handle)
    }

    fn remove_socket(&mut self, id: Id) {
        let Some(slot) = self.slots.remove(&id) else {
            return;
        };
        let shard = &mut self.shards[slot.shard];
        drop(shard.set.remove(slot.handle));
        let before = shard.ids.len();
        shard.ids.remove(&slot.handle);
        self.reload(slot.shard, before);
        if let Some(key) = slot.key {
            if self.index.get(&key) == Some(&id) {
                self.index.remove(&key);
            }
        }
        drop(slot.mem);
        self.count -= 1;
        if let Some(p) = self.ephemeral.remove(&id) {
            self.used_ephemeral.remove(&p);
        }
        if self.at_limit && self.count < self.config.max_sockets {
            self.at_limit = false;
            tracing::info!("below the socket limit again");
        }
    }

    /// Tops port `port`'s pool up to its backlog less what waits.
    fn refill(&mut self, port: u16) {
        loop {
            let Some(p) = self.ports.get(&port) else {
                return;
            };
            if p.pool.len() + p.ready.len() >= p.backlog {
                return;
            }
            let Some(id) = self.add_socket(LISTEN) else {
                return;
            };
            if self.socket_mut(id).listen(port).is_err() {
                self.remove_socket(id);
                return;
            }
            if let Some(p) = self.ports.get_mut(&port) {
                p.pool.push(id);
            }
        }
    }

    /// Hands out the pools' established sockets, closes the ports whose
    /// [`crate::Listener`] is gone, refills the rest.
    fn service_ports(&mut self) {
        let gone: Vec<u16> = self
            .ports
            .iter()
            .filter(|(_, p)| p.ready.is_closed())
            .map(|(k, _)| *k)
            .collect();
        for port in gone {
            self.close_port(port);
        }
        // Pool sockets leave LISTEN only by a frame to the listen shard or
        // its egress: without either, no pool is walked.
        let stale = std::mem::take(&mut self.pools_stale);
        let ports: Vec<u16> = self.ports.keys().copied().collect();
        for port in ports {
            let mut established = Vec::new();
            if let (true, Some(p)) = (stale, self.ports.get_mut(&port)) {
                let (set, slots) = (&self.shards[LISTEN].set, &self.slots);
                p.pool.retain(|id| {
                    let s = set.get::<tcp::Socket>(slots[id].handle).state();
                    let up = !matches!(s, State::Listen | State::SynReceived);
                    if up {
                        established.push(*id);
                    }
                    !up
                });
            }
            for id in established {
                self.promote(port, id);
            }
            self.refill(port);
        }
    }

    /// Closes port `port` (its [`crate::Listener`] was dropped): the pool
    /// goes, and the user ends of the connections nobody accepted close
    /// (their clients see end of file, or a reset if they had sent bytes;
    /// the kernel resets them all).
    fn close_port(&mut self, port: u16) {
        let Some(p) = self.ports.remove(&port) else {
            return;
        };
        for id in p.pool {
            self.remove_socket(id);
        }
        drop(p.ready.drain());
        tracing::debug!(port, "listener closed");
    }

    /// A pool socket that left LISTEN: moved to a data shard, indexed,
    /// bridged and queued for accept.
    fn promote(&mut self, port: u16, id: Id) {
        let s = self.socket(id);
        let ends = (s.remote_endpoint(), s.local_endpoint());
        let (Some(peer), Some(local)) = ends else {
            // Back to CLOSED (reset during the handshake).
            self.remove_socket(id);
            return;
        };
        self.move_to_data(id);
        let IpAddress::Ipv4(remote) = peer.addr;
        self.index(id, (remote, peer.port, local.port));
        match self.bridge(id, peer, local) {
            Ok(c) => {
                let Some(p) = self.ports.get(&port) else {
                    return;
                };
                if let Err(c) = p.ready.push(c) {
                    tracing::warn!(port, "accept queue full: connection reset");
                    drop(c);
                }
            }
            Err(e) => {
                tracing::warn!(
                    port,
                    errno = e,
                    "cannot make a socketpair: connection reset"
                );
                self.socket_mut(id).abort();
                self.remove_socket(id);
            }
        }
    }

    /// Makes socket `id`'s pair and its bridge (due at once): the user's
    /// end.
    fn bridge(&mut self, id: Id, peer: IpEndpoint, local: IpEndpoint) -> Result<Connection, Errno> {
        let (mine, theirs) = sys::stream_pair(self.config.pair_buffer)?;
        self.bridges.insert(id, Bridge::new(mine));
        self.due.push(id);
        Ok(Connection {
            fd: theirs,
            peer: to_std(peer),
            local: to_std(local),
        })
    }

    /// An outbound connect: its socket goes straight to a data shard,
    /// indexed by the remote end and its ephemeral port.
    fn connect(
        &mut self,
        remote: SocketAddrV4,
        outcome: &Arc<Mailbox<Outcome>>,
    ) -> Result<(), Errno> {
        let port = self.ephemeral_port().ok_or(libc::EADDRNOTAVAIL)?;
        let shard = self.data_shard();
        let id = self.add_socket(shard).ok_or(libc::ENOBUFS)?;
        let ep = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        let slot = &self.slots[&id];
        let s = self.shards[slot.shard]
            .set
            .get_mut::<tcp::Socket>(slot.handle);
        if s.connect(self.iface.context(), ep, port).is_err() {
            self.remove_socket(id);
            return Err(libc::ENETUNREACH);
        }
        self.touch(shard);
        self.index(id, (*remote.ip(), remote.port(), port));
        self.ephemeral.insert(id, port);
        self.used_ephemeral.insert(port);
        self.pending.push(Pending {
            id,
            remote,
            deadline: Instant::now() + self.config.connect_timeout,
            outcome: outcome.clone(),
        });
        Ok(())
    }

    /// The next free port of the ephemeral range, round robin.
    fn ephemeral_port(&mut self) -> Option<u16> {
        let (lo, hi) = (
            *self.config.ephemeral_ports.start(),
            *self.config.ephemeral_ports.end(),
        );
        let span = u32::from(hi - lo) + 1;
        for _ in 0..span {
            let p = self.next_ephemeral;
            self.next_ephemeral = if p >= hi { lo } else { p + 1 };
            if !self.used_ephemeral.contains(&p) && !self.ports.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Completes or fails the connects under way.
    fn service_pending(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let slot = &self.slots[&p.id];
            let shard = slot.shard;
            let s = self.shards[shard].set.get_mut::<tcp::Socket>(slot.handle);
            let result = match s.state() {
                State::SynSent | State::SynReceived
                    if now < p.deadline && !p.outcome.is_closed() =>
                {
                    i += 1;
                    continue;
                }
                State::SynSent | State::SynReceived => {
                    s.abort();
                    Err(libc::ETIMEDOUT)
                }
                // An RST to the SYN (smoltcp also ends on its own timeout).
                State::Closed if now < p.deadline => Err(libc::ECONNREFUSED),
                State::Closed => Err(libc::ETIMEDOUT),
                _ => Ok(()),
            };
            let p = self.pending.swap_remove(i);
            let outcome = match result {
                Ok(()) => {
                    let s = self.socket(p.id);
                    match (s.remote_endpoint(), s.local_endpoint()) {
                        (Some(peer), Some(local)) => self.bridge(p.id, peer, local),
                        _ => Err(libc::ECONNRESET),
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                tracing::debug!(remote = %p.remote, errno = e, "connect failed");
                self.remove_socket(p.id);
            }
            let _ = p.outcome.push(outcome);
        }
    }

    /// Copies between the due connections and their pairs; ends the
    /// finished. A bridge that moved bytes or changed its socket's state
    /// makes its shard dirty (smoltcp has segments to send); its pair's
    /// epoll registration follows its interest.
    fn service_bridges(&mut self) {
        if self.due.is_empty() {
            return;
        }
        let mut due = std::mem::take(&mut self.due);
        due.sort_unstable();
        due.dedup();
        for id in due.drain(..) {
            let Some(b) = self.bridges.get_mut(&id) else {
                continue;
            };
            let Some(slot) = self.slots.get(&id) else {
                continue;
            };
            let shard = &mut self.shards[slot.shard];
            let s = shard.set.get_mut::<tcp::Socket>(slot.handle);
            let (before, state) = (self.moved, s.state());
            let step = b.pump(s, &mut self.moved);
            if (self.moved != before || s.state() != state) && !shard.dirty {
                shard.dirty = true;
                self.dirty.push(slot.shard);
            }
            if let Step::Done { reset } = step {
                self.resets += u64::from(reset);
                if b.armed != 0 {
                    let _ = self.epoll.ctl(libc::EPOLL_CTL_DEL, b.fd.as_fd(), 0, id);
                }
                self.bridges.remove(&id);
                self.remove_socket(id);
                continue;
            }
            let want = b.interest(s);
            if want != b.armed {
                let op = match (b.armed, want) {
                    (0, _) => libc::EPOLL_CTL_ADD,
                    (_, 0) => libc::EPOLL_CTL_DEL,
                    _ => libc::EPOLL_CTL_MOD,
                };
                match self.epoll.ctl(op, b.fd.as_fd(), want, id) {
                    Ok(()) => b.armed = want,
                    Err(e) => tracing::warn!(errno = e, "epoll_ctl on a pair failed"),
                }
            }
        }
        // Keep the vector's room, and whatever was made due meanwhile.
        due.append(&mut self.due);
        self.due = due;
    }

    /// Waits on the epoll (the TAP, the wake fd, the pairs registered) for
    /// at most the nearest shard's deadline (none if a shard is dirty or a
    /// bridge due).
    fn wait(&mut self) {
        let now = SInstant::now();
        let mut ms: i64 = 1000;
        if !self.due.is_empty() || !self.dirty.is_empty() {
            ms = 0;
        } else if let Some(&Reverse((t, _))) = self.timers.peek() {
            ms = ms.min(if t > now {
                (t - now).total_millis() as i64
            } else {
                0
            });
        }
        if !self.pending.is_empty() {
            ms = ms.min(50);
        }
        let room = self.events.len();
        let events = match self.epoll.wait(&mut self.events, ms as i32) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(errno = e, "epoll_wait failed");
                return;
            }
        };
        let full = events.len() == room;
        for ev in events {
            let (flags, key) = (ev.events, ev.u64);
            match key {
                WAKE_KEY => self.wake.drain(),
                TAP_KEY => {
                    if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                        // The device was removed under the stack (or the fd
                        // broke): nothing more can be served; stop rather
                        // than spin.
                        tracing::error!("the TAP device failed: the stack stops");
                        self.stop.store(true, Ordering::Release);
                    }
                }
                id => {
                    let readable = (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32;
                    if flags & readable != 0 {
                        if let Some(b) = self.bridges.get_mut(&id) {
                            b.readable = true;
                        }
                    }
                    self.due.push(id);
                }
            }
        }
        if full {
            // More may be ready: room for them next time.
            let n = self.events.len() * 2;
            self.events
                .resize(n.min(1 << 16), libc::epoll_event { events: 0, u64: 0 });
        }
    }

    fn stats(&self) -> Stats {
        let mut by_state = std::collections::BTreeMap::new();
        for (_, s) in self.shards.iter().flat_map(|sh| sh.set.iter()) {
            let smoltcp::socket::Socket::Tcp(t) = s;
            *by_state.entry(t.state().to_string()).or_insert(0) += 1;
        }
        Stats {
            sockets: self.count,
            by_state,
            listening_ports: self.ports.len(),
            accept_queued: self.ports.values().map(|p| p.ready.len()).sum(),
            bridges: self.bridges.len(),
            pending_connects: self.pending.len(),
            bytes_to_pair: self.moved.to_pair,
            bytes_to_net: self.moved.to_net,
            tap: self.tap.counters,
            resets: self.resets,
            refused_max_sockets: self.refused_max_sockets,
        }
    }
}

fn to_smol(d: std::time::Duration) -> SDuration {
    SDuration::from_millis(d.as_millis() as u64)
}

fn to_std(e: IpEndpoint) -> SocketAddr {
    match e.addr {
        IpAddress::Ipv4(a) => SocketAddr::new(a.into(), e.port),
    }
}

/// smoltcp's seed for initial sequence numbers and ephemeral choices.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
