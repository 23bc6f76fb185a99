//! Listener groups (DESIGN.md "Figure 3" and "Schedulers"): every port that
//! nodes listen on is one real listening socket on the single address, and
//! its members are the `(node, listener)` pairs that listen on it. Each
//! accepted client connection goes to the member the group's scheduler
//! picks; when no member is eligible (none yet, or all draining) the client
//! waits in the group's queue and is dispatched when one becomes eligible.
//!
//! A port whose last listener closes stays open for [`RELISTEN_GRACE`]:
//! a program that closes its listening socket and opens a new one on the
//! same port (iperf3 does between tests) takes the port over, and clients
//! that arrive in between wait in the queue instead of being refused. Past
//! the grace the port closes and clients still waiting are closed.
//!
//! Binds follow the kernel's rules within one node: a second bind of a port
//! the same node already holds fails with `EADDRINUSE` unless both sockets
//! set `SO_REUSEPORT`. Different nodes binding one port share it.
//!
//! A client whose node left before its program accepted it comes back
//! through [`redispatch`] (issue 17, `unaccepted.rs`) and is dispatched
//! again like a new one, by the same scheduler, with what it already sent
//! ([`Replay`]); with no member left it waits in the queue like any client.

use crate::scheduler::{self, Candidate, Scheduler};
use crate::state::{NodeId, Traffic};
use crate::sys::{self, Errno};
use crate::Shared;
use saps_fabric::endpoint::Replay;
use saps_fabric::frame::bind_flags;
use saps_fabric::ConnId;
use saps_fabric::RELISTEN_GRACE;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::net::TcpStream;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

/// A group's listening socket, watched by the runtime; clients are
/// accepted with [`sys::accept`].
type Listening = AsyncFd<std::net::TcpListener>;

/// Clients waiting for an eligible member, per group; beyond this new
/// clients are closed (like a full listen backlog).
pub const MAX_QUEUED: usize = 1024;

/// A client waiting for an eligible member.
pub(crate) struct Queued {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// What it sent to a node that left before accepting it.
    pub replay: Replay,
}

/// One node socket bound to the port.
#[derive(Debug)]
struct Bound {
    node: NodeId,
    conn: ConnId,
    flags: u32,
}

/// A listening member of the group.
pub(crate) struct Member {
    pub node: NodeId,
    pub listener: ConnId,
    pub traffic: Traffic,
}

/// One port on the single address.
pub(crate) struct Group {
    /// The real socket while bound but not yet listening.
    socket: Option<std::net::TcpListener>,
    /// The listening socket, shared with the accept loop.
    listening: Option<Arc<Listening>>,
    accept_task: Option<JoinHandle<()>>,
    binds: Vec<Bound>,
    pub members: Vec<Member>,
    scheduler: Box<dyn Scheduler>,
    pub queue: VecDeque<Queued>,
    /// Every connection the group accepted, by whichever member.
    pub traffic: Traffic,
    /// Clients dispatched again because their node left before its
    /// program accepted them.
    pub redispatched: u64,
    /// Set while nobody binds the port but it is kept listening for
    /// [`RELISTEN_GRACE`]; the value tells one orphaning from the next.
    orphaned: Option<u64>,
}

impl Drop for Group {
    fn drop(&mut self) {
        // Free the port now, not when the aborted accept loop is dropped:
        // a program that closes its listener and binds the port again
        // (iperf3 does, per test) must not see EADDRINUSE.
        if let Some(l) = &self.listening {
            close_listener(l);
        }
        if let Some(t) = &self.accept_task {
            t.abort();
        }
    }
}

/// All groups, keyed by their real address.
#[derive(Default)]
pub(crate) struct Groups {
    pub map: HashMap<SocketAddr, Group>,
    orphanings: u64,
}

impl Groups {
    /// Binds `conn` of `node` to `addr` (port 0: a free port). Returns the
    /// group's real address.
    pub fn bind(
        &mut self,
        node: NodeId,
        conn: ConnId,
        addr: SocketAddr,
        flags: u32,
        kind: crate::config::SchedulerKind,
    ) -> Result<SocketAddr, Errno> {
        if addr.port() != 0 {
            if let Some(g) = self.map.get_mut(&addr) {
                let reuseport = flags & bind_flags::REUSEPORT != 0;
                let clash = g.binds.iter().any(|b| {
                    b.node == node && !(reuseport && b.flags & bind_flags::REUSEPORT != 0)
                });
                if clash {
                    return Err(libc::EADDRINUSE);
                }
                g.orphaned = None;
                g.binds.push(Bound { node, conn, flags });
                return Ok(addr);
            }
        }
        let socket = sys::bound_socket(addr)?;
        let real = socket
            .local_addr()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
        self.map.insert(
            real,
            Group {
                socket: Some(socket),
                listening: None,
                accept_task: None,
                binds: vec![Bound { node, conn, flags }],
                members: Vec::new(),
                scheduler: scheduler::new(kind),
                queue: VecDeque::new(),
                traffic: Traffic::default(),
                redispatched: 0,
                orphaned: None,
            },
        );
        Ok(real)
    }

    /// Makes the bound `conn` a member. Returns the real listener when this
    /// is the group's first `listen`, for the caller to run its accept loop.
    pub fn listen(
        &mut self,
        key: SocketAddr,
        node: NodeId,
        conn: ConnId,
        backlog: u32,
    ) -> Result<Option<Arc<Listening>>, Errno> {
        let g = self.map.get_mut(&key).ok_or(libc::EINVAL)?;
        if g.members
            .iter()
            .any(|m| m.node == node && m.listener == conn)
        {
            return Ok(None); // listen() again only changes the backlog
        }
        let listener = match g.socket.take() {
            Some(s) => {
                if let Err(e) = sys::listen(&s, backlog) {
                    g.socket = Some(s);
                    return Err(e);
                }
                let l = Arc::new(
                    sys::register_listener(s)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?,
                );
                g.listening = Some(l.clone());
                Some(l)
            }
            None => None,
        };
        g.members.push(Member {
            node,
            listener: conn,
            traffic: Traffic::default(),
        });
        Ok(listener)
    }

    /// Starts the accept loop of a group that just began listening.
    pub fn set_accept_task(&mut self, key: SocketAddr, task: JoinHandle<()>) {
        match self.map.get_mut(&key) {
            Some(g) => g.accept_task = Some(task),
            None => task.abort(),
        }
    }

    /// Drops `node`'s socket `conn` (or all of its sockets with `None`).
    /// A group nobody binds any more closes its port, unless it was
    /// listening: then it is orphaned, and the returned `(port, orphaning)`
    /// pairs are for [`expire_orphans`] to close after the grace.
    #[must_use]
    pub fn unbind(&mut self, node: NodeId, conn: Option<ConnId>) -> Vec<(SocketAddr, u64)> {
        let hit = |n: NodeId, c: ConnId| n == node && conn.is_none_or(|x| x == c);
        let mut orphans = Vec::new();
        for (key, g) in self.map.iter_mut() {
            let had = !g.binds.is_empty();
            g.binds.retain(|b| !hit(b.node, b.conn));
            g.members.retain(|m| !hit(m.node, m.listener));
            if had && g.binds.is_empty() && g.listening.is_some() {
                self.orphanings += 1;
                g.orphaned = Some(self.orphanings);
                orphans.push((*key, self.orphanings));
            }
        }
        self.map
            .retain(|_, g| !g.binds.is_empty() || g.orphaned.is_some());
        orphans
    }

    /// Closes the port of group `key` if it is still the orphan it became
    /// at `orphaning` (nobody took it over).
    fn close_orphan(&mut self, key: SocketAddr, orphaning: u64) {
        if self
            .map
            .get(&key)
            .is_some_and(|g| g.binds.is_empty() && g.orphaned == Some(orphaning))
        {
            tracing::debug!(%key, "no listener took the port over: closed");
            self.map.remove(&key);
        }
    }

    /// Asks the group's scheduler for a member; `weight` gives each
    /// member's weight and, for a scheduler that
    /// [needs them](Scheduler::needs_pending), `pending` its bytes in flight.
    pub fn pick(
        &mut self,
        key: SocketAddr,
        client: std::net::IpAddr,
        weight: impl Fn(&Member) -> u32,
        pending: impl Fn(&Member) -> u64,
    ) -> Option<(NodeId, ConnId)> {
        let g = self.map.get_mut(&key)?;
        let needs_pending = g.scheduler.needs_pending();
        let candidates: Vec<Candidate> = g
            .members
            .iter()
            .map(|m| {
                let weight = weight(m);
                let pending = if needs_pending { pending(m) } else { 0 };
                Candidate {
                    key: (u64::from(m.node) << 40) ^ m.listener,
                    weight,
                    active: m.traffic.live.len() as u64,
                    pending,
                }
            })
            .collect();
        let i = g.scheduler.pick(&candidates, client)?;
        Some((g.members[i].node, g.members[i].listener))
    }

    pub fn member_mut(
        &mut self,
        key: SocketAddr,
        node: NodeId,
        listener: ConnId,
    ) -> Option<&mut Member> {
        self.map
            .get_mut(&key)?
            .members
            .iter_mut()
            .find(|m| m.node == node && m.listener == listener)
    }
}

/// Closes the ports orphaned by an [`Groups::unbind`] that nobody takes
/// over within [`RELISTEN_GRACE`].
pub(crate) fn expire_orphans(shared: &Arc<Shared>, orphans: Vec<(SocketAddr, u64)>) {
    if orphans.is_empty() {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(RELISTEN_GRACE).await;
        let mut st = shared.lock();
        for (key, orphaning) in orphans {
            st.groups.close_orphan(key, orphaning);
        }
    });
}

/// Accepts clients on a group's port until shutdown or the group closes.
pub(crate) async fn accept_loop(shared: Arc<Shared>, key: SocketAddr, listener: Arc<Listening>) {
    let what = key.to_string();
    crate::accept_until_shutdown(
        &shared,
        &what,
        || accept(&listener),
        |(stream, peer)| dispatch(&shared, key, stream, peer, Replay::default()),
    )
    .await;
    // The group may still hold the socket: stop listening now.
    close_listener(&listener);
}

/// The next client of `l`, once the runtime reports it readable.
async fn accept(l: &Listening) -> std::io::Result<(TcpStream, SocketAddr)> {
    loop {
        let mut ready = l.readable().await?;
        if let Ok(r) = ready.try_io(|l| sys::accept(l.get_ref())) {
            return r;
        }
    }
}

/// Stops a listening socket at once (the port is free and new clients are
/// refused) whoever still holds a reference to it.
fn close_listener(l: &Listening) {
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(l),
        nix::sys::socket::Shutdown::Both,
    );
}

/// A client whose node left before its program accepted it (its channel
/// ended): dispatched again to the group it came to, with what it sent
/// (`replay`). The socket is made non-blocking again (a node may have
/// cleared that on the description it shared).
pub(crate) fn redispatch(
    shared: &Arc<Shared>,
    key: SocketAddr,
    stream: TcpStream,
    peer: SocketAddr,
    replay: Replay,
) {
    if let Err(e) = stream.set_nonblocking(true) {
        tracing::warn!(%peer, error = %e, "cannot dispatch the client again; closed");
        return;
    }
    tracing::info!(%key, %peer, replay = replay.data.len(), fin = replay.fin, "client of a node that left: dispatched again");
    if let Some(g) = shared.lock().groups.map.get_mut(&key) {
        g.redispatched += 1;
    }
    dispatch(shared, key, stream, peer, replay);
}

/// Hands a client connection to the member the scheduler picks, or queues
/// it. `replay`: what it sent to a node that left before accepting it,
/// sent first (such a client is relayed: octets read from its socket
/// cannot be handed over with it).
pub(crate) fn dispatch(
    shared: &Arc<Shared>,
    key: SocketAddr,
    mut stream: TcpStream,
    peer: SocketAddr,
    replay: Replay,
) {
    let mut guard = shared.lock();
    let st = &mut *guard;
    // The group's address is the client's destination unless it is a
    // wildcard one.
    let local = if key.ip().is_unspecified() {
        match stream.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        }
    } else {
        key
    };
    loop {
        let picked = {
            let nodes = &st.nodes;
            let weight = |m: &Member| nodes.get(&m.node).map_or(0, |n| n.weight);
            let pending = |m: &Member| nodes.get(&m.node).map_or(0, |n| n.in_flight(&m.traffic));
            st.groups.pick(key, peer.ip(), weight, pending)
        };
        let Some((node_id, listener)) = picked else {
            let Some(g) = st.groups.map.get_mut(&key) else {
                return;
            };
            if g.queue.len() < MAX_QUEUED {
                tracing::debug!(%key, %peer, "no eligible member: client queued");
                g.queue.push_back(Queued {
                    stream,
                    peer,
                    replay,
                });
            } else {
                tracing::warn!(%key, %peer, "group queue full: client closed");
            }
            return;
        };
        let Some(node) = st.nodes.get(&node_id) else {
            expire_orphans(shared, st.groups.unbind(node_id, None));
            continue;
        };
        // Kept for re-dispatch until its program accepts it (issue 17),
        // where the node says so and has room.
        let track = node.notifies_accepts && {
            let handed = crate::state::lock_handed(&node.handed).len();
            crate::unaccepted::room(node.ep.unaccepted(), handed)
        };
        let ep = node.ep.clone();
        if replay.is_empty() {
            if let Some(tx) = node.handoff.clone().filter(|t| t.is_open()) {
                if !ep.is_open() {
                    // Its channel ended; it is on its way out.
                    expire_orphans(shared, st.groups.unbind(node_id, None));
                    continue;
                }
                let at = Dispatched {
                    key,
                    listener,
                    peer,
                };
                match hand_off(st, &tx, at, node_id, track, stream, local) {
                    Ok(()) => return,
                    // The node's hand-off just stopped: relayed instead.
                    Err(back) => stream = back,
                }
            }
        }
        // The relay writes what the node sends as soon as it comes; a socket
        // handed off above keeps the options the program gave its listener.
        let _ = stream.set_nodelay(true);
        match ep.accept_connection_with(listener, peer, local, &replay, track) {
            Ok(conn) => {
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot relay the connection");
                        ep.close_connection(conn, libc::ECONNABORTED);
                        return;
                    }
                };
                tracing::debug!(%key, %peer, node = node_id, conn, track, "client dispatched");
                let member = Some(Dispatched {
                    key,
                    listener,
                    peer,
                });
                crate::state::start_relay(shared, st, node_id, member, conn, stream);
                return;
            }
            // The node's channel closed; its removal is on the way.
            Err(_) => expire_orphans(shared, st.groups.unbind(node_id, None)),
        }
    }
}

/// Where an accepted client went: its group, the member's listener, and
/// the client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dispatched {
    pub key: SocketAddr,
    pub listener: ConnId,
    pub peer: SocketAddr,
}

/// Zero-relay: gives the accepted socket itself to a same-host node.
/// `track`: keep the io-server's descriptor of it (the hand-off task does,
/// once sent) until the node says its program accepted it, to give it to
/// another member if the node leaves first. The socket back when the
/// node's hand-off has stopped.
fn hand_off(
    st: &mut crate::state::State,
    tx: &saps_fabric::handoff::HandoffSender,
    at: Dispatched,
    node_id: NodeId,
    track: bool,
    stream: TcpStream,
    local: SocketAddr,
) -> Result<(), TcpStream> {
    let Dispatched {
        key,
        listener,
        peer,
    } = at;
    let Some(node) = st.nodes.get_mut(&node_id) else {
        return Err(stream);
    };
    // Recorded before it is sent, under the state's lock, so that the
    // hand-off task (which looks for it before sending) and the node's
    // Accepted (which can only follow the send) both find it.
    let conn = match track.then(|| node.ep.hand_connection()) {
        Some(Ok(conn)) => {
            crate::state::lock_handed(&node.handed).sending(conn, key, peer);
            conn
        }
        _ => 0,
    };
    let h = saps_fabric::handoff::HandedOff {
        listener,
        peer,
        local,
        socket: std::os::fd::OwnedFd::from(stream),
        conn,
        node: node_id,
    };
    if let Err(h) = tx.send(h) {
        if conn != 0 {
            crate::state::lock_handed(&node.handed).unsent(conn);
            node.ep.forget_handed(conn);
        }
        return Err(TcpStream::from(h.socket));
    }
    tracing::debug!(%key, %peer, node = node_id, conn, "client handed off (zero-relay)");
    node.traffic.handed_off();
    if let Some(g) = st.groups.map.get_mut(&key) {
        g.traffic.handed_off();
    }
    if let Some(m) = st.groups.member_mut(key, node_id, listener) {
        m.traffic.handed_off();
    }
    Ok(())
}

/// Dispatches queued clients of `key` while a member is eligible.
pub(crate) fn drain_queue(shared: &Arc<Shared>, key: SocketAddr) {
    for _ in 0..MAX_QUEUED {
        let next = {
            let mut st = shared.lock();
            let eligible = {
                let nodes = &st.nodes;
                st.groups.map.get(&key).is_some_and(|g| {
                    g.members
                        .iter()
                        .any(|m| nodes.get(&m.node).is_some_and(|n| n.weight > 0))
                })
            };
            match st.groups.map.get_mut(&key) {
                Some(g) if eligible => g.queue.pop_front(),
                _ => None,
            }
        };
        match next {
            Some(q) => dispatch(shared, key, q.stream, q.peer, q.replay),
            None => return,
        }
    }
}
