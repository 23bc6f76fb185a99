//! One task per node channel: the handshake, then every Figure 3 request
//! of that node serviced on the host's real TCP stack (DESIGN.md "Figure 3,
//! as messages on the fabric").
//!
//! `bind`/`listen` reserve and listen on the real port of the single
//! address (the group's socket); `connect` opens a real outbound TCP
//! connection from the single address and answers with the real errno;
//! `setsockopt`/`getsockopt` reach the real TCP socket. Under `--stack
//! smoltcp` the port listens on the stack, the connect leaves from it, and
//! options on its sockets are remembered only. A node whose channel
//! fails (wrong token, garbage, disconnect) is dropped with its reason
//! logged; its listeners leave their groups and nothing else is touched.

use crate::cluster;
use crate::dispatch;
use crate::groups;
use crate::guard;
use crate::handshakes::Permit;
use crate::relay::{Relay, Relayed};
use crate::state::{lock_handed, InFlight, NodeEntry, PendingConnect, ServerState, Socket};
use crate::sys;
use crate::timeouts;
use crate::traffic::NodeId;
use saps_fabric::channel::SILENT_PEER;
use saps_fabric::endpoint::io_errno;
use saps_fabric::frame::bind_flags;
use saps_fabric::transport::{TransportRead, TransportWrite};
use saps_fabric::{
    Channel, ChannelConfig, ConnId, Endpoint, EndpointEvent, ReqId, Request, Response,
};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::Instrument;

/// How a node reached the io-server.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Joined {
    /// Over a fabric (or as if): `pid` is the process of a unix fabric's
    /// peer, the only one that may claim the node's hand-off socket.
    Fabric { pid: Option<i32> },
    /// A node of this process (embedded): protocol version 1, since it
    /// cannot leave without this io-server (no `Accepted` per connection,
    /// nothing kept for re-dispatch).
    InProcess,
}

/// Serves one node over `r`/`w` until its channel closes.
pub(crate) async fn serve<R: TransportRead, W: TransportWrite>(
    server: Arc<ServerState>,
    r: R,
    w: W,
    peer: String,
    handoff: Option<saps_fabric::handoff::HandoffSender>,
    joined: Joined,
    permit: Option<Permit>,
) {
    let (config, pid) = match joined {
        // Over a fabric: the handshake's deadline is the operator's, and
        // a node that goes silent is pinged, then dropped.
        Joined::Fabric { pid } => (server.config.node_channel(server.token.clone()), pid),
        Joined::InProcess => {
            let mut config = ChannelConfig::new(server.token.clone()).window(server.config.window);
            config.max_version = 1;
            config.in_process = true;
            (config, None)
        }
    };
    let (ep, mut events) = Endpoint::spawn(Channel::io_server(config), r, w);
    let first = events.recv().await;
    // The handshake is over, however it ended: its place is free.
    drop(permit);
    let (name, weight) = match first {
        Some(EndpointEvent::NodeAuthenticated { node, weight }) => (node, weight),
        Some(EndpointEvent::Closed { error }) => {
            server.handshakes.failed.fetch_add(1, Ordering::Relaxed);
            if let Some(more) = server.logs.allow("node refused") {
                tracing::warn!(%peer, reason = %error, "node refused{more}");
            }
            return;
        }
        other => {
            server.handshakes.failed.fetch_add(1, Ordering::Relaxed);
            if let Some(more) = server.logs.allow("node refused: unexpected first event") {
                tracing::warn!(%peer, event = ?other, "node refused: unexpected first event{more}");
            }
            return;
        }
    };
    let (barrier, barriers) = tokio::sync::mpsc::unbounded_channel();
    let id = {
        let mut st = server.lock();
        st.next_node += 1;
        let id = st.next_node;
        st.nodes.insert(
            id,
            NodeEntry {
                name: name.clone(),
                peer: peer.clone(),
                ep: ep.clone(),
                sockets: Default::default(),
                handoff,
                pid,
                notifies_accepts: ep.notifies_accepts(),
                handed: Default::default(),
                listeners: Default::default(),
                barrier,
                handoff_socket: None,
            },
        );
        st.groups.join(id, weight, std::time::Instant::now());
        id
    };
    ep.handle().with(|ch| ch.welcome(id));
    let remote = matches!(joined, Joined::Fabric { .. });
    tracing::info!(parent: &node_span(id, &name), peer = %peer, weight, "node joined");
    run(server, ep, events, barriers, id, name, peer, remote).await
}

fn node_span(id: NodeId, name: &str) -> tracing::Span {
    tracing::info_span!("node", id, name = %name)
}

/// Asks of a node's task: handle every event given so far, then answer.
pub(crate) type Barriers = tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>;

/// Serves the requests of node `id`, joined (or carried over by an
/// upgrade, `upgrade/nodes.rs`), until its channel closes; then it leaves.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    server: Arc<ServerState>,
    ep: Endpoint,
    mut events: tokio::sync::mpsc::UnboundedReceiver<EndpointEvent>,
    mut barriers: Barriers,
    id: NodeId,
    name: String,
    peer: String,
    remote: bool,
) {
    async {
        let node = Node {
            server: server.clone(),
            ep,
            id,
            peer,
            remote,
        };
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                Some(done) = barriers.recv() => {
                    // Everything given so far (an upgrade froze the
                    // channel first, so nothing more comes).
                    while let Ok(ev) = events.try_recv() {
                        if node.event(ev).is_break() {
                            cluster::remove_node(&server, id);
                            return;
                        }
                    }
                    let _ = done.send(());
                    continue;
                }
            };
            let Some(ev) = ev else { break };
            if node.event(ev).is_break() {
                break;
            }
        }
        cluster::remove_node(&server, id);
    }
    .instrument(node_span(id, &name))
    .await
}

struct Node {
    server: Arc<ServerState>,
    ep: Endpoint,
    id: NodeId,
    peer: String,
    /// Joined over a fabric (not a node of this process): `Connect` to
    /// the gateway itself is refused (`guard::connect`).
    remote: bool,
}

/// Test hook: `SAPS_TEST_LISTEN_REPLY_DELAY_MS` holds back the answer to
/// every successful Listen that long, while the listening socket already
/// accepts, so a test can make a client reach a node before the node knows
/// its listener (which a same-host hand-off can do by itself).
fn listen_reply_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms = std::env::var("SAPS_TEST_LISTEN_REPLY_DELAY_MS").ok()?;
        ms.parse().ok().map(std::time::Duration::from_millis)
    })
}

fn status(r: Result<Option<SocketAddr>, i32>) -> Response {
    match r {
        Ok(addr) => Response::Status { errno: 0, addr },
        Err(errno) => Response::Status { errno, addr: None },
    }
}

impl Node {
    /// Handles one event of the node's endpoint; `Break` once its channel
    /// has closed.
    fn event(&self, ev: EndpointEvent) -> std::ops::ControlFlow<()> {
        match ev {
            EndpointEvent::Request { req, request } => self.request(req, request),
            // Merged: however many Weight frames came, the latest.
            EndpointEvent::WeightChanged => {
                if let Some(weight) = self.ep.take_weight() {
                    cluster::set_weight(&self.server, self.id, weight);
                }
            }
            EndpointEvent::ConnectionClosed { conn, errno } => self.socket_closed(conn, errno),
            EndpointEvent::Accepted { conn } => self.handed_accepted(conn),
            EndpointEvent::Closed { error } => {
                if error.to_string().contains(SILENT_PEER) {
                    self.server
                        .handshakes
                        .silent_nodes
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %self.peer, reason = %error, "node dropped: silent");
                } else {
                    tracing::info!(reason = %error, "node left");
                }
                return std::ops::ControlFlow::Break(());
            }
            other => tracing::debug!(event = ?other, "ignored"),
        }
        std::ops::ControlFlow::Continue(())
    }

    fn request(&self, req: ReqId, request: Request) {
        tracing::debug!(req, ?request, "request");
        let is_listen = matches!(request, Request::Listen { .. });
        let response = match request {
            Request::Bind { conn, addr, flags } => {
                let r = self.bind(conn, addr, flags);
                if r.is_ok() {
                    // Known to the channel, so the node's Close of this
                    // virtual socket reaches socket_closed and frees the port.
                    let _ = self.ep.open_connection(conn);
                }
                status(r.map(Some))
            }
            Request::Listen { conn, backlog } => status(self.listen(conn, backlog).map(Some)),
            Request::Connect { conn, addr } => return self.connect(req, conn, addr),
            Request::Shutdown { conn, .. } => {
                // FIN travels in the data path (EOF on the node's socket
                // pair); only the answer is needed here.
                let known = self.with_socket(conn, |s| s.tcp.is_some()).unwrap_or(false);
                status(if known { Ok(None) } else { Err(libc::ENOTCONN) })
            }
            Request::SetOpt {
                conn,
                level,
                name,
                value,
            } => status(self.set_opt(conn, level, name, value).map(|_| None)),
            Request::GetOpt {
                conn,
                level,
                name,
                len,
            } => match self.get_opt(conn, level, name, len) {
                Ok(value) => Response::OptValue {
                    errno: 0,
                    value: value.into(),
                },
                Err(errno) => Response::OptValue {
                    errno,
                    value: Default::default(),
                },
            },
        };
        if response.errno() != 0 {
            tracing::debug!(req, errno = response.errno(), "request failed");
        }
        if let (Some(delay), true, 0) = (listen_reply_delay(), is_listen, response.errno()) {
            // The listening socket accepts already; only the answer waits.
            let ep = self.ep.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                ep.respond(req, response);
            });
            return;
        }
        self.ep.respond(req, response);
    }

    /// Logs a refused request (once per reason and interval, with how
    /// many more there were: `ratelimit.rs`) and counts it; returns
    /// `errno`.
    fn refuse(&self, errno: i32, what: &str, reason: &'static str) -> i32 {
        self.server.refused.fetch_add(1, Ordering::Relaxed);
        let peer = &self.peer;
        match self.server.logs.allow(reason) {
            Some(more) => tracing::warn!(%peer, what, reason, errno, "node request refused{more}"),
            None => tracing::debug!(%peer, what, reason, errno, "node request refused"),
        }
        errno
    }

    fn check_option(&self, level: i32, name: i32, set: bool, value: &[u8]) -> Result<(), i32> {
        guard::option(level, name, set, value).map_err(|r| {
            let what = format!(
                "{} level {level} option {name}",
                if set { "setsockopt" } else { "getsockopt" }
            );
            self.refuse(libc::EPERM, &what, r.reason())
        })
    }

    fn with_socket<T>(&self, conn: ConnId, f: impl FnOnce(&mut Socket) -> T) -> Option<T> {
        let mut st = self.server.lock();
        st.nodes.get_mut(&self.id)?.sockets.get_mut(&conn).map(f)
    }

    /// Checks `--allow-ports`; a refusal is logged and answers EACCES.
    fn allowed(&self, port: u16) -> Result<(), i32> {
        match &self.server.config.allow_ports {
            Some(allow) if !allow.allows(port) => {
                let reason = "bind refused: port not in --allow-ports (EACCES)";
                if let Some(more) = self.server.logs.allow(reason) {
                    tracing::warn!(port, allowed = %allow, "{reason}{more}");
                }
                Err(libc::EACCES)
            }
            _ => Ok(()),
        }
    }

    fn bind(&self, conn: ConnId, addr: SocketAddr, flags: u32) -> Result<SocketAddr, i32> {
        let address = self.server.config.address;
        let ip = addr.ip();
        // An AF_INET6 socket binds the address v4-mapped as the kernel's
        // does (it then takes the address's IPv4 clients).
        if !(ip.is_unspecified() || ip.is_loopback() || ip.to_canonical() == address) {
            return Err(libc::EADDRNOTAVAIL);
        }
        if addr.port() != 0 {
            self.allowed(addr.port())?;
        }
        // The family asked for decides what the socket shares a port with.
        let family = if addr.is_ipv4() { groups::INET } else { 0 };
        let flags = flags & bind_flags::ALL | family;
        let at = SocketAddr::new(address, addr.port());
        // Connections of its listeners on this port that its program
        // closed first hold the port in TIME_WAIT, as in the kernel.
        let now = std::time::Instant::now();
        let lingers = self.server.lock().groups.lingers(self.id, at, flags, now);
        if lingers && sys::closed_first_on(at) {
            return Err(libc::EADDRINUSE);
        }
        let mut st = self.server.lock();
        let node = st.nodes.get(&self.id).ok_or(libc::ENOTCONN)?;
        if node.sockets.get(&conn).is_some_and(|s| s.group.is_some()) {
            return Err(libc::EINVAL);
        }
        let real = st.bind(self.id, conn, at, flags)?;
        let node = st.nodes.get_mut(&self.id).ok_or(libc::ENOTCONN)?;
        node.sockets.entry(conn).or_default().group = Some(real);
        tracing::info!(port = real.port(), "bound");
        Ok(SocketAddr::new(ip, real.port()))
    }

    fn listen(&self, conn: ConnId, backlog: u32) -> Result<SocketAddr, i32> {
        let bound = self.with_socket(conn, |s| s.group).flatten();
        let key = match bound {
            Some(key) => key,
            // listen() without bind() binds a free port, as the kernel does.
            None => {
                let any = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0);
                let addr = self.bind(conn, any, 0)?;
                SocketAddr::new(self.server.config.address, addr.port())
            }
        };
        if let Err(e) = self.allowed(key.port()) {
            self.socket_closed(conn, 0);
            return Err(e);
        }
        if let Some(stack) = &self.server.stack {
            // The group's first listen opens its port on the stack, which
            // waits for the stack's thread: with the tables' lock released.
            let to_open = self.server.lock().ports.stack_port_to_open(key);
            if let Some(port) = to_open {
                match stack.listen(port, backlog) {
                    Ok(l) => {
                        // Given back (and closed, here) if the port went
                        // or another member opened it meanwhile.
                        let back = self.server.lock().ports.stack_opened(key, l);
                        drop(back);
                    }
                    // Another member of the group opened it meanwhile.
                    Err(_) if self.server.lock().ports.stack_port_to_open(key).is_none() => {}
                    Err(e) => {
                        tracing::warn!(port, error = %e, "cannot listen on the stack");
                        return Err(stack_errno(&e));
                    }
                }
            }
        }
        let freed = &self.server.freed;
        let listener = self
            .server
            .lock()
            .listen(key, self.id, conn, backlog, freed)?;
        if let Some(listener) = listener {
            let task = tokio::spawn(dispatch::accept_loop(self.server.clone(), key, listener));
            self.server.lock().ports.set_accept_task(key, task);
        }
        tracing::info!(port = key.port(), "listening");
        dispatch::drain_queue(&self.server, key);
        Ok(key)
    }

    /// Outbound connect from the single address, answered when it is
    /// established or has failed.
    fn connect(&self, req: ReqId, conn: ConnId, addr: SocketAddr) {
        if self.remote && !self.server.config.allow_connect_local {
            let served = |port| self.server.lock().ports.serves_port(port);
            let own = &self.server.own_addrs;
            let address = self.server.config.address;
            if let Err((errno, reason)) = guard::connect(addr, own, address, served) {
                let errno = self.refuse(errno, &format!("connect to {addr}"), reason);
                self.ep.respond(req, status(Err(errno)));
                return;
            }
        }
        let server = self.server.clone();
        let (ep, id) = (self.ep.clone(), self.id);
        // On the stack the options stay remembered (`set_opt`).
        let opts = match server.stack {
            Some(_) => Vec::new(),
            None => self
                .with_socket(conn, |s| std::mem::take(&mut s.opts))
                .unwrap_or_default(),
        };
        // A socket the program bound first connects from its port, as
        // natively: the group's socket holds it with SO_REUSEADDR, and so
        // does the outbound one (the stack picks its own ports).
        let port = self
            .with_socket(conn, |s| s.group.map(|k| k.port()))
            .flatten();
        let limit = timeouts::connect_timeout(&server.config);
        if server.stack.is_some() {
            tokio::spawn(
                async move {
                    let Some(stack) = &server.stack else { return };
                    // The stack picks the port on its thread and says it
                    // only with the connection: the node is told the
                    // address, port 0.
                    ep.connecting(conn, SocketAddr::new(server.config.address, 0));
                    let result = open_on_stack(stack, addr, limit).await;
                    let c = Connecting {
                        node: id,
                        req,
                        conn,
                        to: addr,
                        key: None,
                    };
                    connected(&server, &ep, c, result);
                }
                .in_current_span(),
            );
            return;
        }
        let sock = match outbound_socket(server.config.address, port, addr, &opts) {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%addr, error = %e, "connect failed");
                self.ep.respond(req, status(Err(io_errno(&e))));
                return;
            }
        };
        // Started here, then finished as a moved one is: an upgrade under
        // way finds its outcome still in the socket.
        let started = start_connect(&sock, addr).map(|in_flight| {
            use std::os::fd::{FromRawFd, IntoRawFd};
            // SAFETY: `into_raw_fd` gives up the socket's one descriptor,
            // which this takes over.
            let s = unsafe { std::os::fd::OwnedFd::from_raw_fd(sock.into_raw_fd()) };
            (in_flight, s)
        });
        let socket = match started {
            Ok((in_flight, s)) => {
                // In flight: the node hears the local address the kernel
                // gave it (`Frame::Connecting`, where its channel speaks
                // it), as a native `getsockname` would answer while the
                // SYN is out; before the connect's answer, always.
                let local = in_flight.then(|| sys::local_addr(s.as_raw_fd())).flatten();
                if let Some(local) = local.filter(|l| l.port() != 0) {
                    self.ep.connecting(conn, local);
                }
                s
            }
            Err(e) => {
                tracing::info!(%addr, error = %e, "connect failed");
                self.ep.respond(req, status(Err(io_errno(&e))));
                return;
            }
        };
        // Kept with a copy of its socket while in progress: an upgrade
        // moves it (design note §4.4).
        let key = socket.try_clone().ok().map(|copy| {
            let pending = PendingConnect {
                node: id,
                req,
                conn,
                to: addr,
                socket: copy,
                outcome: None,
            };
            server.lock().connects.open(pending)
        });
        let c = Connecting {
            node: id,
            req,
            conn,
            to: addr,
            key,
        };
        tokio::spawn(finish_connect(server, ep, c, socket, None, limit).in_current_span());
    }

    fn set_opt(&self, conn: ConnId, level: i32, name: i32, value: bytes::Bytes) -> Result<(), i32> {
        self.check_option(level, name, true, &value)?;
        let on_stack = self.server.stack.is_some();
        let mut st = self.server.lock();
        let node = st.nodes.get_mut(&self.id).ok_or(libc::ENOTCONN)?;
        let s = node.sockets.entry(conn).or_default();
        match &s.tcp {
            Some(fd) if !on_stack => sys::setsockopt(fd.as_fd(), level, name, &value),
            // Not connected yet: remembered and applied by connect. On the
            // smoltcp stack: remembered only (its socket is a socketpair's
            // end; docs/io-server.md "--stack smoltcp").
            _ => {
                s.opts.retain(|(l, n, _)| (*l, *n) != (level, name));
                s.opts.push((level, name, value));
                Ok(())
            }
        }
    }

    fn get_opt(&self, conn: ConnId, level: i32, name: i32, len: u32) -> Result<Vec<u8>, i32> {
        self.check_option(level, name, false, &[])?;
        let on_stack = self.server.stack.is_some();
        self.with_socket(conn, |s| match &s.tcp {
            Some(fd) if !on_stack => sys::getsockopt(fd.as_fd(), level, name, len),
            _ if on_stack => remembered(&s.opts, level, name, len),
            // Not connected yet: what was set, if anything.
            _ => s
                .opts
                .iter()
                .find(|(l, n, _)| (*l, *n) == (level, name))
                .map(|(_, _, v)| v.to_vec())
                .ok_or(libc::ENOPROTOOPT),
        })
        .unwrap_or(Err(libc::ENOTCONN))
    }

    /// The program accepted a connection handed over as a socket: it is
    /// the node's now, and the io-server's copy is closed.
    fn handed_accepted(&self, conn: ConnId) {
        let copy = {
            let st = self.server.lock();
            let node = st.nodes.get(&self.id);
            node.and_then(|n| lock_handed(&n.handed).settle(conn))
        };
        if copy.is_none() {
            tracing::debug!(conn, "Accepted for a connection not kept");
        }
    }

    /// The node closed a socket that has no relay (a bound or listening
    /// one): it leaves its group. A handed-over connection it closed
    /// unaccepted: the io-server's copy is closed too (the client sees the
    /// connection end, as it did before copies were kept).
    /// The node closed `conn` (`errno` not 0: with a reset) before any
    /// relay took it.
    fn socket_closed(&self, conn: ConnId, errno: i32) {
        let mut st = self.server.lock();
        let Some(node) = st.nodes.get_mut(&self.id) else {
            return;
        };
        let copy = lock_handed(&node.handed).settle(conn);
        if let Some(copy) = copy {
            drop(st);
            drop(copy);
            return;
        }
        if let Some(tcp) = node.sockets.get(&conn).and_then(|s| s.tcp.as_ref()) {
            // Relayed: its relay, about to start, finds the connection gone
            // and closes the socket; with an RST if the node reset it.
            if errno != 0 {
                if let Err(e) = tcp.set_zero_linger() {
                    tracing::debug!(error = %e, "SO_LINGER 0 failed");
                }
            }
            return;
        }
        if node.sockets.remove(&conn).and_then(|s| s.group).is_some() {
            let orphans = st.unbind(self.id, Some(conn));
            drop(st);
            dispatch::close_orphans_later(&self.server, orphans);
        }
    }
}

/// A socket option of a socket on the smoltcp stack: as remembered
/// (`Socket::opts`), truncated to `len`; what a TCP socket answers for
/// its type and family; else ENOPROTOOPT.
fn remembered(
    opts: &[(i32, i32, bytes::Bytes)],
    level: i32,
    name: i32,
    len: u32,
) -> Result<Vec<u8>, i32> {
    let fixed = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_TYPE) => Some(libc::SOCK_STREAM),
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => Some(libc::AF_INET),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => Some(libc::IPPROTO_TCP),
        (libc::SOL_SOCKET, libc::SO_ERROR | libc::SO_ACCEPTCONN) => Some(0),
        _ => None,
    };
    let mut v = match fixed {
        Some(n) => n.to_ne_bytes().to_vec(),
        None => opts
            .iter()
            .find(|(l, n, _)| (*l, *n) == (level, name))
            .map(|(_, _, v)| v.to_vec())
            .ok_or(libc::ENOPROTOOPT)?,
    };
    v.truncate(len as usize);
    Ok(v)
}

/// The errno a node is answered when the stack refuses or fails.
pub(crate) fn stack_errno(e: &saps_stack::Error) -> i32 {
    match e {
        saps_stack::Error::Os(e) => e.raw_os_error().unwrap_or(libc::EIO),
        saps_stack::Error::Tap { .. } | saps_stack::Error::Stopped => libc::ENETDOWN,
        saps_stack::Error::Busy => libc::ENOBUFS,
        saps_stack::Error::NotIpv4(_) => libc::ENETUNREACH,
    }
}

/// A connection of the smoltcp stack to `to`, from the single address
/// (`Stack::connect`, awaited through its fd); its local address. Given
/// up with `ETIMEDOUT` after `limit` (the stack's own connect timeout,
/// set from the same flag, answers the same).
async fn open_on_stack(
    stack: &saps_stack::Stack,
    to: SocketAddr,
    limit: Option<std::time::Duration>,
) -> std::io::Result<(tokio::net::TcpStream, Option<SocketAddr>)> {
    let errno = |e: saps_stack::Error| std::io::Error::from_raw_os_error(stack_errno(&e));
    let pending = stack.connect(to).map_err(errno)?;
    let pending = sys::register_readable(pending)?;
    let outcome = async {
        loop {
            let mut ready = pending.readable().await?;
            match ready.get_inner().try_result() {
                Some(r) => return r,
                None => ready.clear_ready(),
            }
        }
    };
    let conn = match limit {
        Some(limit) => tokio::time::timeout(limit, outcome)
            .await
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ETIMEDOUT))??,
        None => outcome.await?,
    };
    let stream = tokio::net::TcpStream::from_std(std::net::TcpStream::from(conn.fd))?;
    Ok((stream, Some(conn.local)))
}

/// Whether a connect failed for `--connect-timeout`.
fn timed_out(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
}

/// A TCP socket to connect to `to`, leaving from `from` (unless
/// unspecified), with the node's pending socket options applied.
fn outbound_socket(
    from: IpAddr,
    port: Option<u16>,
    to: SocketAddr,
    opts: &[(i32, i32, bytes::Bytes)],
) -> std::io::Result<tokio::net::TcpSocket> {
    let new = || match to {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    };
    let mut sock = new()?;
    let from = if from.is_ipv4() == to.is_ipv4() {
        from
    } else {
        match to {
            SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
            SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
        }
    };
    let kept = match port {
        Some(port) => {
            sock.set_reuseaddr(true)?;
            match sock.bind(SocketAddr::new(from, port)) {
                Ok(()) => true,
                // Its group listens (another node's listener on that
                // port): from a free port instead.
                Err(e) => {
                    tracing::debug!(port, error = %e, "cannot connect from the bound port");
                    sock = new()?;
                    false
                }
            }
        }
        None => false,
    };
    if !kept && !from.is_unspecified() {
        sock.bind(SocketAddr::new(from, 0))?;
    }
    for (level, name, value) in opts {
        sys::setsockopt(sock.as_fd(), *level, *name, value)
            .map_err(std::io::Error::from_raw_os_error)?;
    }
    Ok(sock)
}

/// `connect(2)` of the non-blocking `sock` to `to`: started (`true`: in
/// flight; `false`: done at once), or refused at once.
fn start_connect(sock: &tokio::net::TcpSocket, to: SocketAddr) -> std::io::Result<bool> {
    let addr = nix::sys::socket::SockaddrStorage::from(to);
    match nix::sys::socket::connect(sock.as_raw_fd(), &addr) {
        Ok(()) => Ok(false),
        Err(nix::errno::Errno::EINPROGRESS) => Ok(true),
        Err(e) => Err(std::io::Error::from_raw_os_error(e as i32)),
    }
}

/// An outbound connect of node `node`'s socket `conn`, asked by `req`;
/// `key`: its entry in `Tables::connects`.
pub(crate) struct Connecting {
    pub node: NodeId,
    pub req: ReqId,
    pub conn: ConnId,
    pub to: SocketAddr,
    pub key: Option<u64>,
}

/// A node's outbound connect finished: the node is answered and, if
/// connected, the connection relayed; while an upgrade holds connects,
/// the outcome is kept for it instead (`Connects::finished`).
pub(crate) fn connected(
    server: &Arc<ServerState>,
    ep: &Endpoint,
    c: Connecting,
    result: std::io::Result<(tokio::net::TcpStream, Option<SocketAddr>)>,
) {
    let Connecting {
        node,
        req,
        conn,
        to,
        key,
    } = c;
    if result.as_ref().is_err_and(timed_out) {
        server.timed_out.connect.fetch_add(1, Ordering::Relaxed);
    }
    let mut st = server.lock();
    if let Some(key) = key {
        let errno = match &result {
            Ok(_) => 0,
            Err(e) => io_errno(e),
        };
        if !st.connects.finished(key, errno) {
            // Held: the upgrade's capture (or its going back) answers.
            return;
        }
    }
    // Counted until answered: an upgrade's quiesce waits for it.
    let answering = InFlight::begin(server);
    let (response, relay) = match result {
        Ok((stream, local)) => match ep.open_connection(conn) {
            Ok(()) => {
                tracing::info!(%to, ?local, "connected");
                let relay = Relay::record(&mut st, node, Relayed::Outbound, conn, stream);
                (status(Ok(local)), relay)
            }
            Err(_) => return, // the node is gone
        },
        Err(e) => {
            tracing::info!(%to, error = %e, "connect failed");
            (status(Err(io_errno(&e))), None)
        }
    };
    drop(st);
    if let Some(relay) = relay {
        relay.spawn(server);
    }
    ep.respond(req, response);
    drop(answering);
}

/// Finishes a connect started on `socket` (by this process, or by the one
/// an upgrade took it from): its outcome if it had one, else once the
/// socket is writable (`SO_ERROR`, given up with `ETIMEDOUT`, what the
/// kernel says when its SYNs go unanswered, after `limit`).
pub(crate) async fn finish_connect(
    server: Arc<ServerState>,
    ep: Endpoint,
    c: Connecting,
    socket: std::os::fd::OwnedFd,
    outcome: Option<i32>,
    limit: Option<std::time::Duration>,
) {
    // Counted from the reading of `SO_ERROR` until answered.
    let mut answering = None;
    let result = async {
        let stream = std::net::TcpStream::from(socket);
        stream.set_nonblocking(true)?;
        let stream = tokio::net::TcpStream::from_std(stream)?;
        match outcome {
            Some(0) => {}
            Some(errno) => return Err(std::io::Error::from_raw_os_error(errno)),
            None => {
                let ready = async {
                    loop {
                        // Registered before the look: a release between
                        // them wakes it.
                        let released = server.connects_released.notified();
                        tokio::pin!(released);
                        released.as_mut().enable();
                        stream.writable().await?;
                        // While an upgrade holds the connects, `SO_ERROR`
                        // stays unread: the process that finishes the
                        // connect reads it.
                        match server.finishing_connect() {
                            Some(a) => {
                                answering = Some(a);
                                break;
                            }
                            None => released.await,
                        }
                    }
                    match stream.take_error()? {
                        Some(e) => Err(e),
                        None => stream.peer_addr().map(drop),
                    }
                };
                match limit {
                    Some(limit) => tokio::time::timeout(limit, ready)
                        .await
                        .map_err(|_| std::io::Error::from_raw_os_error(libc::ETIMEDOUT))??,
                    None => ready.await?,
                }
            }
        }
        stream.set_nodelay(true)?;
        let local = stream.local_addr().ok();
        Ok((stream, local))
    }
    .await;
    connected(&server, &ep, c, result);
    drop(answering);
}

#[cfg(test)]
mod tests {
    use super::remembered;

    #[test]
    fn options_on_the_stack_are_answered_as_remembered_or_as_a_tcp_socket_would() {
        let one = bytes::Bytes::copy_from_slice(&1i32.to_ne_bytes());
        let opts = vec![(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, one)];
        let get = |level, name, len| remembered(&opts, level, name, len);
        let int = |v: Vec<u8>| i32::from_ne_bytes(v.try_into().unwrap());
        assert_eq!(
            get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 4).map(int),
            Ok(1)
        );
        assert_eq!(
            get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2).map(|v| v.len()),
            Ok(2)
        );
        assert_eq!(
            get(libc::IPPROTO_TCP, libc::TCP_INFO, 104),
            Err(libc::ENOPROTOOPT)
        );
        let ty = get(libc::SOL_SOCKET, libc::SO_TYPE, 4).map(int);
        assert_eq!(ty, Ok(libc::SOCK_STREAM));
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_ERROR, 4).map(int), Ok(0));
        let proto = get(libc::SOL_SOCKET, libc::SO_PROTOCOL, 4).map(int);
        assert_eq!(proto, Ok(libc::IPPROTO_TCP));
    }
}
