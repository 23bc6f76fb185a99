//! The stack's thread: smoltcp's `Interface` on the TAP, the socket set,
//! the backlog pools of the listening ports, the pending connects and the
//! bridges, all owned here and touched by no other thread. Users talk to
//! it through a bounded command queue and an eventfd that wakes its
//! `poll(2)` ([`Wake`]); it answers through [`Mailbox`]es. One loop: the
//! commands and the pools, the TAP's frames one by one (the commands and
//! pools again before a frame when a user asked something meanwhile),
//! smoltcp's egress, the connects, the bridges, then `poll(2)` on the TAP,
//! the wake fd and the pairs, for at most smoltcp's `poll_delay`.

use crate::bridge::{Bridge, Moved, Step};
use crate::mailbox::{Mailbox, Wake};
use crate::sys::{self, Errno, Mapped};
use crate::tap::Tap;
use crate::{Config, Connection, Stats};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration as SDuration, Instant as SInstant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
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
    pool: Vec<SocketHandle>,
    ready: Arc<Mailbox<Connection>>,
}

/// An outbound connect under way.
struct Pending {
    handle: SocketHandle,
    remote: SocketAddrV4,
    deadline: Instant,
    outcome: Arc<Mailbox<Outcome>>,
}

pub(crate) struct Engine {
    config: Config,
    iface: Interface,
    tap: Tap,
    /// Declared before `buffers`: a socket drops before the memory its
    /// buffers borrow.
    sockets: SocketSet<'static>,
    /// Each socket's receive and send buffer (`sys::Mapped`).
    buffers: HashMap<SocketHandle, [Mapped; 2]>,
    /// How many sockets `sockets` holds (bounded by `max_sockets`).
    count: usize,
    commands: Receiver<Command>,
    wake: Arc<Wake>,
    stop: Arc<AtomicBool>,
    ports: HashMap<u16, Port>,
    pending: Vec<Pending>,
    bridges: HashMap<SocketHandle, Bridge>,
    /// Local ports of outbound connections, by socket.
    ephemeral: HashMap<SocketHandle, u16>,
    used_ephemeral: HashSet<u16>,
    next_ephemeral: u16,
    moved: Moved,
    resets: u64,
    refused_max_sockets: u64,
    /// The socket limit was hit and logged; cleared once below it again.
    at_limit: bool,
    pollfds: Vec<libc::pollfd>,
    polled: Vec<SocketHandle>,
}

impl Engine {
    pub fn new(
        config: Config,
        mut tap: Tap,
        commands: Receiver<Command>,
        wake: Arc<Wake>,
        stop: Arc<AtomicBool>,
    ) -> Engine {
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
        let next_ephemeral = *config.ephemeral_ports.start();
        Engine {
            config,
            iface,
            tap,
            sockets: SocketSet::new(vec![]),
            buffers: HashMap::new(),
            count: 0,
            commands,
            wake,
            stop,
            ports: HashMap::new(),
            pending: Vec::new(),
            bridges: HashMap::new(),
            ephemeral: HashMap::new(),
            used_ephemeral: HashSet::new(),
            next_ephemeral,
            moved: Moved::default(),
            resets: 0,
            refused_max_sockets: 0,
            at_limit: false,
            pollfds: Vec::new(),
            polled: Vec::new(),
        }
    }

    /// Runs until the [`crate::Stack`] is dropped.
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            let now = SInstant::now();
            self.wake.take();
            self.serve_users();
            // Frame by frame, each after what users asked before it
            // arrived: an `accept` frees its place in the backlog for the
            // SYN right behind it, as in the kernel.
            while self.tap.fetch() {
                if self.wake.take() {
                    self.serve_users();
                }
                self.iface
                    .poll_ingress_single(now, &mut self.tap, &mut self.sockets);
            }
            self.iface
                .poll_egress(now, &mut self.tap, &mut self.sockets);
            self.service_ports();
            self.service_pending();
            self.service_bridges();
            let delay = self.iface.poll_delay(SInstant::now(), &self.sockets);
            self.wait(delay);
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

    /// A new smoltcp socket with the configured buffers, if under the bound.
    fn add_socket(&mut self) -> Option<SocketHandle> {
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
        // (or the engine's drop, `sockets` first) drops before `mem`.
        let (rx, tx) = unsafe { (mem[0].slice(), mem[1].slice()) };
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        s.set_timeout(Some(to_smol(self.config.idle_timeout)));
        s.set_keep_alive(Some(to_smol(self.config.keep_alive)));
        s.set_nagle_enabled(false);
        self.count += 1;
        let h = self.sockets.add(s);
        self.buffers.insert(h, mem);
        Some(h)
    }

    fn remove_socket(&mut self, h: SocketHandle) {
        drop(self.sockets.remove(h));
        self.buffers.remove(&h);
        self.count -= 1;
        if let Some(p) = self.ephemeral.remove(&h) {
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
            let Some(h) = self.add_socket() else {
                return;
            };
            if self.sockets.get_mut::<tcp::Socket>(h).listen(port).is_err() {
                self.remove_socket(h);
                return;
            }
            if let Some(p) = self.ports.get_mut(&port) {
                p.pool.push(h);
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
        let ports: Vec<u16> = self.ports.keys().copied().collect();
        for port in ports {
            let mut established = Vec::new();
            if let Some(p) = self.ports.get_mut(&port) {
                let sockets = &self.sockets;
                p.pool.retain(|h| {
                    let s = sockets.get::<tcp::Socket>(*h).state();
                    let up = !matches!(s, State::Listen | State::SynReceived);
                    if up {
                        established.push(*h);
                    }
                    !up
                });
            }
            for h in established {
                self.promote(port, h);
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
        for h in p.pool {
            self.remove_socket(h);
        }
        drop(p.ready.drain());
        tracing::debug!(port, "listener closed");
    }

    /// A pool socket that left LISTEN: bridged and queued for accept.
    fn promote(&mut self, port: u16, h: SocketHandle) {
        let s = self.sockets.get::<tcp::Socket>(h);
        let ends = (s.remote_endpoint(), s.local_endpoint());
        let (Some(peer), Some(local)) = ends else {
            // Back to CLOSED (reset during the handshake).
            self.remove_socket(h);
            return;
        };
        match self.bridge(h, peer, local) {
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
                self.sockets.get_mut::<tcp::Socket>(h).abort();
                self.remove_socket(h);
            }
        }
    }

    /// Makes socket `h`'s pair and its bridge: the user's end.
    fn bridge(
        &mut self,
        h: SocketHandle,
        peer: IpEndpoint,
        local: IpEndpoint,
    ) -> Result<Connection, Errno> {
        let (mine, theirs) = sys::stream_pair(self.config.pair_buffer)?;
        self.bridges.insert(h, Bridge::new(mine));
        Ok(Connection {
            fd: theirs,
            peer: to_std(peer),
            local: to_std(local),
        })
    }

    fn connect(
        &mut self,
        remote: SocketAddrV4,
        outcome: &Arc<Mailbox<Outcome>>,
    ) -> Result<(), Errno> {
        let port = self.ephemeral_port().ok_or(libc::EADDRNOTAVAIL)?;
        let h = self.add_socket().ok_or(libc::ENOBUFS)?;
        let ep = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        if s.connect(self.iface.context(), ep, port).is_err() {
            self.remove_socket(h);
            return Err(libc::ENETUNREACH);
        }
        self.ephemeral.insert(h, port);
        self.used_ephemeral.insert(port);
        self.pending.push(Pending {
            handle: h,
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
            let s = self.sockets.get_mut::<tcp::Socket>(p.handle);
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
                    let s = self.sockets.get::<tcp::Socket>(p.handle);
                    match (s.remote_endpoint(), s.local_endpoint()) {
                        (Some(peer), Some(local)) => self.bridge(p.handle, peer, local),
                        _ => Err(libc::ECONNRESET),
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                tracing::debug!(remote = %p.remote, errno = e, "connect failed");
                self.remove_socket(p.handle);
            }
            let _ = p.outcome.push(outcome);
        }
    }

    /// Copies between each connection and its pair; ends the finished.
    fn service_bridges(&mut self) {
        let mut done = Vec::new();
        for (h, b) in self.bridges.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if let Step::Done { reset } = b.pump(s, &mut self.moved) {
                done.push(*h);
                self.resets += u64::from(reset);
            }
        }
        for h in done {
            self.bridges.remove(&h);
            self.remove_socket(h);
        }
    }

    /// `poll(2)` on the TAP, the wake fd and the pairs that wait for
    /// something, for at most `delay`.
    fn wait(&mut self, delay: Option<SDuration>) {
        let ms = match delay {
            Some(d) => d.total_millis().min(1000) as i32,
            None => 1000,
        };
        let ms = if self.pending.is_empty() {
            ms
        } else {
            ms.min(50)
        };
        self.pollfds.clear();
        self.polled.clear();
        for fd in [self.tap.as_fd().as_raw_fd(), self.wake.as_fd().as_raw_fd()] {
            self.pollfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for (h, b) in &self.bridges {
            let ev = b.interest(self.sockets.get::<tcp::Socket>(*h));
            if ev != 0 {
                self.pollfds.push(libc::pollfd {
                    fd: b.fd.as_raw_fd(),
                    events: ev,
                    revents: 0,
                });
                self.polled.push(*h);
            }
        }
        if let Err(e) = sys::poll(&mut self.pollfds, ms) {
            tracing::warn!(errno = e, "poll failed");
        }
        if self.pollfds[1].revents != 0 {
            self.wake.drain();
        }
        if self.pollfds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            // The device was removed under the stack (or the fd broke):
            // nothing more can be served; stop rather than spin.
            tracing::error!("the TAP device failed: the stack stops");
            self.stop.store(true, Ordering::Release);
        }
        for (pfd, h) in self.pollfds[2..].iter().zip(&self.polled) {
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                if let Some(b) = self.bridges.get_mut(h) {
                    b.readable = true;
                }
            }
        }
    }

    fn stats(&self) -> Stats {
        let mut by_state = std::collections::BTreeMap::new();
        for (_, s) in self.sockets.iter() {
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
