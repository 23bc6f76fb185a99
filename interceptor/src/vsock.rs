//! The virtual-socket table (DESIGN.md, "Virtual TCP sockets").
//!
//! Every AF_INET/AF_INET6 stream socket of the target is a real kernel object
//! inside it — first an unconnected placeholder (a TCP socket of a network
//! namespace with no interface, or AF_UNIX), then the socketpair end `S` of
//! a connection or the AF_UNIX listener `L` — and is known here by
//! that object's inode, which survives `dup`, `fork`, `exec` and SCM_RIGHTS.
//! An fd whose inode is not in the table is a real socket: its syscalls
//! continue natively.

use saps_fabric::ConnId;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The inode of a socket object (`socket:[INO]`).
pub type Inode = u64;

/// Where a virtual socket is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// After `socket()` (and perhaps `bind()`): still the placeholder.
    Fresh,
    /// Non-blocking `connect()` in flight: `S` is installed, its filler
    /// keeps it from polling writable until the io-server answers.
    /// `local`: the address the io-server's outbound socket leaves from,
    /// once it said (`EndpointEvent::Connecting`, protocol version 4).
    Connecting {
        peer: SocketAddr,
        local: Option<SocketAddr>,
    },
    /// An established connection (connected or accepted).
    Connected { peer: SocketAddr, local: SocketAddr },
    /// `listen()` done: the fd is the AF_UNIX listener `L`.
    Listening,
}

/// One virtual TCP socket (the paper's `VirtualSocket`).
#[derive(Debug, Clone)]
pub struct VirtualSocket {
    /// `AF_INET` or `AF_INET6`, as the program asked.
    pub domain: i32,
    /// `IPPROTO_TCP`, or `IPPROTO_MPTCP` (served as TCP by the io-server).
    pub protocol: i32,
    /// The SAPS connection tag, once the io-server knows the socket.
    pub conn: Option<ConnId>,
    /// The address bound on the io-server (port 0 resolved).
    pub bound: Option<SocketAddr>,
    pub state: State,
    /// An asynchronous error for the next `getsockopt(SO_ERROR)` (§2.3).
    pub error: i32,
    /// Options the program set, replayed where they apply.
    pub options: Options,
    /// A connect finished (or failed) while no `connect` call waited for
    /// it (non-blocking, or interrupted): the kernel's `sock->state` is
    /// still `SS_CONNECTING`, so the next `connect` reports the outcome
    /// (0, or the error) instead of `EISCONN`.
    pub connect_unreported: bool,
    /// A connect was made on it: the kernel will not let it listen.
    pub tried_connect: bool,
    /// Where the program was given its end of a relayed connection: the
    /// thread and the fd number (a hint; the program may move it), for
    /// passing a peer's reset on to it (`supervisor/relay.rs`).
    pub holder: Option<(u32, i32)>,
    /// Its connection ended with an error (a reset): the kernel's socket is
    /// closed, so it has no peer name any more.
    pub ended: bool,
}

impl VirtualSocket {
    pub fn new(domain: i32) -> Self {
        VirtualSocket::with_protocol(domain, libc::IPPROTO_TCP)
    }

    /// A new socket of `domain` and `protocol` (TCP or MPTCP).
    pub fn with_protocol(domain: i32, protocol: i32) -> Self {
        VirtualSocket {
            domain,
            protocol,
            conn: None,
            bound: None,
            state: State::Fresh,
            error: 0,
            options: Options::default(),
            connect_unreported: false,
            tried_connect: false,
            holder: None,
            ended: false,
        }
    }

    /// A socket accepted from a listener.
    pub fn accepted(domain: i32, conn: ConnId, peer: SocketAddr, local: SocketAddr) -> Self {
        VirtualSocket {
            conn: Some(conn),
            bound: Some(local),
            state: State::Connected { peer, local },
            ..VirtualSocket::new(domain)
        }
    }

    /// What `getsockname()` says.
    pub fn local_addr(&self) -> SocketAddr {
        match &self.state {
            State::Connected { local, .. }
            | State::Connecting {
                local: Some(local), ..
            } => *local,
            _ => self.bound.unwrap_or_else(|| unspecified(self.domain)),
        }
    }

    /// What `getpeername()` says; `None` is `ENOTCONN`.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match &self.state {
            State::Connected { peer, .. } if !self.ended => Some(*peer),
            _ => None,
        }
    }
}

/// `0.0.0.0:0` or `[::]:0`.
pub fn unspecified(domain: i32) -> SocketAddr {
    if domain == libc::AF_INET6 {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    }
}

/// Socket options set by the program, by `(level, name)`.
#[derive(Debug, Clone, Default)]
pub struct Options(BTreeMap<(i32, i32), Vec<u8>>);

impl Options {
    pub fn set(&mut self, level: i32, name: i32, value: &[u8]) {
        self.0.insert((level, name), value.to_vec());
    }

    pub fn get(&self, level: i32, name: i32) -> Option<&[u8]> {
        self.0.get(&(level, name)).map(Vec::as_slice)
    }

    /// Whether an int-valued option is set to non-zero.
    pub fn is_on(&self, level: i32, name: i32) -> bool {
        self.get(level, name)
            .is_some_and(|v| v.iter().take(4).any(|&b| b != 0))
    }

    /// The options that decide how a bind behaves on the io-server.
    pub fn bind_flags(&self) -> u32 {
        use saps_fabric::frame::bind_flags::*;
        let mut f = 0;
        if self.is_on(libc::SOL_SOCKET, libc::SO_REUSEADDR) {
            f |= REUSEADDR;
        }
        if self.is_on(libc::SOL_SOCKET, libc::SO_REUSEPORT) {
            f |= REUSEPORT;
        }
        if self.is_on(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) {
            f |= V6ONLY;
        }
        f
    }

    /// A `struct timeval` option (`SO_RCVTIMEO`, `SO_SNDTIMEO`): `None`
    /// when unset or zero (wait for ever).
    pub fn timeout(&self, name: i32) -> Option<std::time::Duration> {
        let v = self.get(libc::SOL_SOCKET, name)?;
        let word = |i: usize| Some(i64::from_ne_bytes(v.get(i..i + 8)?.try_into().ok()?));
        let (sec, usec) = (word(0)?, word(8)?);
        let d = std::time::Duration::from_secs(sec.max(0) as u64)
            + std::time::Duration::from_micros(usec.max(0) as u64);
        (!d.is_zero()).then_some(d)
    }

    /// The options that act on the program's own end of a connection, an
    /// AF_UNIX socket when relayed (timeouts, the receive low-water mark):
    /// set on it as on the kernel's TCP socket.
    pub fn on_program_end(&self) -> impl Iterator<Item = (i32, i32, &[u8])> {
        self.iter()
            .filter(|&(level, name, _)| on_program_end(level, name))
    }

    pub fn iter(&self) -> impl Iterator<Item = (i32, i32, &[u8])> {
        self.0.iter().map(|(&(l, n), v)| (l, n, v.as_slice()))
    }
}

/// Whether option `name` at `level` acts on the program's own end of a
/// connection ([`Options::on_program_end`]).
pub fn on_program_end(level: i32, name: i32) -> bool {
    level == libc::SOL_SOCKET
        && matches!(
            name,
            libc::SO_RCVTIMEO | libc::SO_SNDTIMEO | libc::SO_RCVLOWAT
        )
}

/// The table, keyed by inode.
#[derive(Debug, Default)]
pub struct VsockTable {
    by_inode: HashMap<Inode, VirtualSocket>,
    /// Connection tag → inode, to forget a socket when its connection ends.
    by_conn: HashMap<ConnId, Inode>,
}

impl VsockTable {
    pub fn get(&self, ino: Inode) -> Option<&VirtualSocket> {
        self.by_inode.get(&ino)
    }

    pub fn get_mut(&mut self, ino: Inode) -> Option<&mut VirtualSocket> {
        self.by_inode.get_mut(&ino)
    }

    pub fn insert(&mut self, ino: Inode, vs: VirtualSocket) {
        if let Some(c) = vs.conn {
            self.by_conn.insert(c, ino);
        }
        self.by_inode.insert(ino, vs);
    }

    pub fn remove(&mut self, ino: Inode) -> Option<VirtualSocket> {
        let vs = self.by_inode.remove(&ino)?;
        if let Some(c) = vs.conn {
            if self.by_conn.get(&c) == Some(&ino) {
                self.by_conn.remove(&c);
            }
        }
        Some(vs)
    }

    /// The inode of connection `conn`'s socket.
    pub fn inode_of_conn(&self, conn: ConnId) -> Option<Inode> {
        self.by_conn.get(&conn).copied()
    }

    /// The socket of connection `conn`.
    pub fn by_conn_mut(&mut self, conn: ConnId) -> Option<&mut VirtualSocket> {
        let ino = *self.by_conn.get(&conn)?;
        self.by_inode.get_mut(&ino)
    }

    /// Sockets still in their placeholder (`Fresh`, not listening nor
    /// connected), bound on `port` if given: the ones whose close the
    /// supervisor cannot see. At most `max`.
    pub fn placeholders(&self, port: Option<u16>, max: usize) -> Vec<Inode> {
        self.by_inode
            .iter()
            .filter(|(_, vs)| vs.state == State::Fresh)
            .filter(|(_, vs)| port.is_none_or(|p| vs.bound.is_some_and(|b| b.port() == p)))
            .map(|(&ino, _)| ino)
            .take(max)
            .collect()
    }

    /// Whether a virtual socket other than `ino` holds `port` on the
    /// wildcard address in a way that keeps a new socket with bind `flags`
    /// (`saps_fabric::frame::bind_flags`) from binding loopback address
    /// `ip` on it, by the kernel's rules: its wildcard takes `ip` (an
    /// `AF_INET` one IPv4 addresses, an `AF_INET6` one IPv6 ones and,
    /// without `IPV6_V6ONLY`, IPv4 ones too), and they do not share the
    /// port (both `SO_REUSEPORT`, or both `SO_REUSEADDR` while it does not
    /// listen). The node's kernel knows nothing of virtual binds.
    pub fn wildcard_holds(&self, ino: Inode, ip: IpAddr, port: u16, flags: u32) -> bool {
        let v4 = match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
        };
        self.by_inode.iter().any(|(&other, vs)| {
            let Some(b) = vs
                .bound
                .filter(|b| b.port() == port && b.ip().is_unspecified())
            else {
                return false;
            };
            let takes = match b {
                SocketAddr::V4(_) => v4,
                SocketAddr::V6(_) => {
                    !v4 || !vs.options.is_on(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
                }
            };
            let listening = vs.state == State::Listening;
            let shares =
                saps_fabric::frame::bind_flags::reuse(flags, vs.options.bind_flags(), listening);
            other != ino && takes && !shares
        })
    }

    /// Forgets socket `ino` if it is still a placeholder.
    pub fn remove_placeholder(&mut self, ino: Inode) -> Option<VirtualSocket> {
        if self.by_inode.get(&ino)?.state != State::Fresh {
            return None;
        }
        self.remove(ino)
    }

    /// Forgets the socket of connection `conn`.
    pub fn remove_conn(&mut self, conn: ConnId) -> Option<VirtualSocket> {
        let ino = *self.by_conn.get(&conn)?;
        self.remove(ino)
    }

    /// Gives the socket of connection `old` the tag `new` (a listener
    /// registered again on a new channel).
    pub fn retag(&mut self, old: ConnId, new: ConnId) {
        if let Some(ino) = self.by_conn.remove(&old) {
            if let Some(vs) = self.by_inode.get_mut(&ino) {
                vs.conn = Some(new);
                self.by_conn.insert(new, ino);
            }
        }
    }

    /// The channel to the io-server was lost: forget every connection of
    /// it. Listeners stay (they are registered again); sockets not yet
    /// connected lose their tag, and their bind is made again on the new
    /// channel when they listen or connect.
    pub fn forget_connections(&mut self) {
        self.by_inode.retain(|_, vs| match vs.state {
            State::Listening => true,
            State::Fresh => {
                vs.conn = None;
                true
            }
            State::Connecting { .. } | State::Connected { .. } => false,
        });
        let by_inode = &self.by_inode;
        self.by_conn.retain(|_, ino| by_inode.contains_key(ino));
    }

    /// The object behind the fd changed (`ADDFD` with `SETFD`): move the
    /// entry to the new object's inode.
    pub fn rekey(&mut self, old: Inode, new: Inode, vs: VirtualSocket) {
        self.remove(old);
        self.insert(new, vs);
    }

    pub fn len(&self) -> usize {
        self.by_inode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_inode.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saps_fabric::frame::bind_flags;

    fn bound(domain: i32, port: u16, opts: &[(i32, i32)]) -> VirtualSocket {
        let mut vs = VirtualSocket::new(domain);
        vs.bound = Some(SocketAddr::new(unspecified(domain).ip(), port));
        for &(level, name) in opts {
            vs.options.set(level, name, &1i32.to_ne_bytes());
        }
        vs
    }

    #[test]
    fn a_virtual_wildcard_bind_holds_its_port_on_the_loopback_addresses_it_takes() {
        let lo4: IpAddr = Ipv4Addr::LOCALHOST.into();
        let lo6: IpAddr = Ipv6Addr::LOCALHOST.into();
        let mapped: IpAddr = Ipv4Addr::LOCALHOST.to_ipv6_mapped().into();
        let reuseaddr = (libc::SOL_SOCKET, libc::SO_REUSEADDR);
        let v6only = (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
        let mut t = VsockTable::default();
        t.insert(1, bound(libc::AF_INET, 80, &[reuseaddr]));
        assert!(t.wildcard_holds(9, lo4, 80, 0));
        assert!(t.wildcard_holds(9, mapped, 80, 0));
        assert!(!t.wildcard_holds(9, lo6, 80, 0), "IPv4 only");
        assert!(!t.wildcard_holds(9, lo4, 81, 0), "another port");
        assert!(!t.wildcard_holds(1, lo4, 80, 0), "itself");
        let addr = bind_flags::REUSEADDR;
        assert!(!t.wildcard_holds(9, lo4, 80, addr), "SO_REUSEADDR on both");
        t.get_mut(1).unwrap().state = State::Listening;
        assert!(t.wildcard_holds(9, lo4, 80, addr), "unless it listens");
        t.insert(2, bound(libc::AF_INET6, 90, &[]));
        assert!(t.wildcard_holds(9, lo4, 90, 0), "dual stack");
        assert!(t.wildcard_holds(9, lo6, 90, 0));
        t.insert(3, bound(libc::AF_INET6, 91, &[v6only]));
        assert!(!t.wildcard_holds(9, lo4, 91, 0), "IPV6_V6ONLY");
        assert!(t.wildcard_holds(9, lo6, 91, 0));
        let mut specific = bound(libc::AF_INET, 92, &[]);
        specific.bound = Some(SocketAddr::from(([192, 0, 2, 1], 92)));
        t.insert(4, specific);
        assert!(!t.wildcard_holds(9, lo4, 92, 0), "not the wildcard");
    }

    #[test]
    fn bind_flags_follow_the_options_set() {
        let mut o = Options::default();
        assert_eq!(o.bind_flags(), 0);
        o.set(libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32.to_ne_bytes());
        o.set(libc::SOL_SOCKET, libc::SO_REUSEPORT, &0i32.to_ne_bytes());
        assert_eq!(o.bind_flags(), bind_flags::REUSEADDR);
        o.set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &1i32.to_ne_bytes());
        assert_eq!(o.bind_flags(), bind_flags::REUSEADDR | bind_flags::V6ONLY);
    }

    #[test]
    fn rekey_moves_the_entry_to_the_new_object() {
        let mut t = VsockTable::default();
        t.insert(10, VirtualSocket::new(libc::AF_INET));
        let mut vs = t.get(10).unwrap().clone();
        vs.state = State::Listening;
        t.rekey(10, 11, vs);
        assert!(t.get(10).is_none());
        assert_eq!(t.get(11).unwrap().state, State::Listening);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn losing_the_channel_keeps_listeners_and_retags_them() {
        let mut t = VsockTable::default();
        let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        t.insert(1, VirtualSocket::accepted(libc::AF_INET, 3, peer, peer));
        let mut l = VirtualSocket::new(libc::AF_INET);
        l.conn = Some(4);
        l.state = State::Listening;
        t.insert(2, l);
        let mut fresh = VirtualSocket::new(libc::AF_INET);
        fresh.conn = Some(6);
        t.insert(3, fresh);
        t.forget_connections();
        assert!(t.get(1).is_none() && t.by_conn_mut(3).is_none());
        assert_eq!(t.get(3).unwrap().conn, None);
        t.retag(4, 8);
        assert!(t.by_conn_mut(4).is_none());
        assert_eq!(t.by_conn_mut(8).unwrap().state, State::Listening);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_socket_is_found_and_forgotten_by_its_connection() {
        let mut t = VsockTable::default();
        let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        t.insert(20, VirtualSocket::accepted(libc::AF_INET, 9, peer, peer));
        t.by_conn_mut(9).unwrap().error = libc::ECONNRESET;
        assert_eq!(t.get(20).unwrap().error, libc::ECONNRESET);
        assert!(t.remove_conn(9).is_some());
        assert!(t.is_empty() && t.by_conn_mut(9).is_none());
    }

    #[test]
    fn placeholders_are_fresh_sockets_and_only_they_are_swept() {
        let mut t = VsockTable::default();
        let mut bound = VirtualSocket::new(libc::AF_INET);
        bound.bound = Some("0.0.0.0:8080".parse().unwrap());
        t.insert(1, bound);
        t.insert(2, VirtualSocket::new(libc::AF_INET));
        let mut l = VirtualSocket::new(libc::AF_INET);
        l.bound = Some("0.0.0.0:8080".parse().unwrap());
        l.state = State::Listening;
        t.insert(3, l);
        assert_eq!(t.placeholders(Some(8080), 10), vec![1]);
        let mut all = t.placeholders(None, 10);
        all.sort();
        assert_eq!(all, vec![1, 2]);
        assert_eq!(t.placeholders(None, 1).len(), 1, "bounded");
        assert!(t.remove_placeholder(3).is_none(), "a listener is not swept");
        assert!(t.remove_placeholder(1).is_some());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn addresses_of_a_fresh_and_an_accepted_socket() {
        let fresh = VirtualSocket::new(libc::AF_INET6);
        assert_eq!(fresh.local_addr(), "[::]:0".parse().unwrap());
        assert_eq!(fresh.peer_addr(), None);
        let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:80".parse().unwrap();
        let a = VirtualSocket::accepted(libc::AF_INET, 3, peer, local);
        assert_eq!(a.peer_addr(), Some(peer));
        assert_eq!(a.local_addr(), local);
    }
}
