//! The joined nodes' part of an upgrade (design note §2, §4.3, §5 steps 6
//! and 7): each node's fabric endpoint frozen and captured with its
//! relayed connections, hand-off socket and handed-over copies in the
//! old process, and the same made again in the new one, where its
//! requests, relays and hand-offs go on from where they stopped.
//!
//! Quiesce ([`quiesce`]), in this order, within one bound:
//!
//! 1. every group holds its clients in its queue (no member is picked,
//!    so nothing new is given to a node; the accept loops are paused
//!    already);
//! 2. every endpoint freezes (`Endpoint::freeze`: its reader, timer and
//!    writer rest, and each relay writes what it was handed);
//! 3. each node's task handles the events it was given before the
//!    freeze (a barrier, `node.rs`): their answers wait in the frozen
//!    channels;
//! 4. the outbound connects still in progress finish, and the hand-off
//!    tasks send the sockets queued for them (`ServerState::in_flight`).
//!
//! Then, under the tables' lock, [`capture`]. Any failure before the
//! commit goes back ([`resume`]): nothing was consumed.
//!
//! A node whose channel has no descriptor that can move (`rdma://`) is
//! left behind: its channel ends with the old process and the node joins
//! the new one again; the new process makes it leave its groups.

use super::state::{
    BlobRef, ConnectSnap, HandedSnap, NodeSnap, RelayedSnap, SocketSnap, Source, StateError,
    TransportSnap,
};
use crate::relay::{Dispatched, Relay};
use crate::state::{lock_handed, NodeEntry, PendingConnect, ServerState, Socket, Tables, Waits};
use crate::traffic::NodeId;
use saps_fabric::channel::ChannelSnap;
use saps_fabric::endpoint::{
    Capture as EndpointCapture, CaptureError, Resumed, RouterSnap, Waiting,
};
use saps_fabric::handoff::side::SideSocket;
use saps_fabric::transport::{tcp_socket, unix_socket, StreamReader, StreamWriter};
use saps_fabric::{ChannelConfig, ConnId, Endpoint, EndpointEvent};
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The most a quiesce takes: frozen, an endpoint answers no pings, and a
/// node drops a silent io-server after `DEFAULT_PEER_TIMEOUT` (6 s); the
/// transfer and the new process's start come after it.
const QUIESCE_MAX: Duration =
    Duration::from_secs(saps_fabric::channel::DEFAULT_PEER_TIMEOUT.as_secs() / 2);

/// The bound of a quiesce under `--upgrade-timeout` `timeout`: half of it,
/// at most [`QUIESCE_MAX`].
pub(crate) fn quiesce_bound(timeout: Duration) -> Duration {
    (timeout / 2).min(QUIESCE_MAX)
}

/// Steps 1 to 4 of the quiesce, within `bound`. On a failure everything
/// is resumed and the reason returned.
pub(crate) async fn quiesce(server: &Arc<ServerState>, bound: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + bound;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let nodes: Vec<(NodeId, Endpoint, _)> = {
        let mut st = server.lock();
        st.groups.hold(true);
        st.connects.held = true;
        st.nodes
            .iter()
            .map(|(&id, n)| (id, n.ep.clone(), n.barrier.clone()))
            .collect()
    };
    for (id, ep, _) in &nodes {
        if let Err(e) = ep.freeze(left()).await {
            resume(server);
            return Err(format!("node {id}: {e}"));
        }
    }
    let mut answers = Vec::new();
    for (id, _, barrier) in &nodes {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A node whose task has ended is on its way out: nothing to wait for.
        if barrier.send(tx).is_ok() {
            answers.push((*id, rx));
        }
    }
    for (id, rx) in answers {
        match tokio::time::timeout(left(), rx).await {
            Ok(_) => {}
            Err(_) => {
                resume(server);
                return Err(format!(
                    "node {id}: its requests were not handled within --upgrade-timeout"
                ));
            }
        }
    }
    if !server.in_flight.idle(left()).await {
        resume(server);
        return Err("answers to connects or hand-offs were still in progress at the bound".into());
    }
    Ok(())
}

/// Goes back from [`quiesce`]: endpoints run again, groups give clients
/// to members again, and those queued meanwhile are let in.
pub(crate) fn resume(server: &Arc<ServerState>) {
    let (eps, connects) = {
        let mut st = server.lock();
        st.groups.hold(false);
        let connects: Vec<_> = st
            .connects
            .release()
            .into_iter()
            .filter_map(|p| Some((st.nodes.get(&p.node)?.ep.clone(), p)))
            .collect();
        let eps: Vec<Endpoint> = st.nodes.values().map(|n| n.ep.clone()).collect();
        (eps, connects)
    };
    for ep in eps {
        ep.unfreeze();
    }
    // Connects that finished meanwhile are answered now; those that wait
    // to read their outcome read it.
    for (ep, p) in connects {
        answer_connect(server, ep, p, None);
    }
    server.connects_released.notify_waiters();
    server
        .waiting
        .store(true, std::sync::atomic::Ordering::Release);
    server.freed.notify_one();
}

/// Closes every node's channel (a `GoAway` once its endpoint runs
/// again): their nodes join again.
pub(crate) fn end_channels(server: &Arc<ServerState>, why: &str) {
    let eps: Vec<Endpoint> = server.lock().nodes.values().map(|n| n.ep.clone()).collect();
    for ep in eps {
        ep.handle().with(|ch| ch.close(why));
    }
}

/// What a capture gathers: descriptors (owned copies, in index order,
/// starting at `base`) and the blob.
pub(crate) struct Gathered<'b> {
    pub fds: &'b mut Vec<OwnedFd>,
    pub blob: &'b mut Vec<u8>,
}

impl Gathered<'_> {
    fn owned(&mut self, fd: OwnedFd) -> u32 {
        self.fds.push(fd);
        (self.fds.len() - 1) as u32
    }

    fn dup(&mut self, fd: BorrowedFd<'_>) -> Result<u32, String> {
        let fd = fd.try_clone_to_owned().map_err(|e| format!("dup: {e}"))?;
        Ok(self.owned(fd))
    }

    fn bytes(&mut self, bytes: &[u8]) -> BlobRef {
        let offset = self.blob.len() as u64;
        self.blob.extend_from_slice(bytes);
        BlobRef {
            offset,
            len: bytes.len() as u64,
        }
    }
}

/// Every quiesced node of `st` (under the tables' lock), by id; the ids
/// of those left behind (no descriptor that can move).
pub(crate) fn capture(
    st: &Tables,
    out: &mut Gathered<'_>,
) -> Result<(Vec<NodeSnap>, Vec<NodeId>), String> {
    let mut snaps = Vec::new();
    let mut behind = Vec::new();
    for (&id, node) in &st.nodes {
        match node.ep.capture() {
            Ok(cap) => snaps.push(node_snap(st, id, node, cap, out)?),
            Err(CaptureError::NoDescriptor(what)) => {
                tracing::warn!(node = id, name = %node.name, %what, "upgrade: this node's channel cannot move; it joins the new process again");
                behind.push(id);
            }
            Err(e) => return Err(format!("node {id}: {e}")),
        }
    }
    Ok((snaps, behind))
}

fn node_snap(
    st: &Tables,
    id: NodeId,
    node: &NodeEntry,
    cap: EndpointCapture,
    out: &mut Gathered<'_>,
) -> Result<NodeSnap, String> {
    let transport = match cap.fds.get(cap.router.transport).map(transport_of) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(format!("node {id}: {e}")),
        None => return Err(format!("node {id}: the capture names no transport")),
    };
    let mut channel = bytes::BytesMut::new();
    cap.channel.encode(&mut channel);
    let channel = out.bytes(&channel);
    let mut router = bytes::BytesMut::new();
    cap.router.encode(&mut router);
    let router = out.bytes(&router);
    let relayed: std::collections::HashSet<ConnId> =
        cap.router.relays.iter().map(|r| r.conn).collect();
    let fds = cap.fds.into_iter().map(|fd| out.owned(fd)).collect();
    let mut sockets = Vec::new();
    let mut conns: Vec<&ConnId> = node.sockets.keys().collect();
    conns.sort_unstable();
    for &conn in conns {
        let s = &node.sockets[&conn];
        let relay = match (&s.tcp, s.client) {
            (None, _) => None,
            (Some(_), None) => Some(RelayedSnap::Outbound),
            (Some(_), Some(at)) => Some(RelayedSnap::Client {
                key: at.key,
                listener: at.listener,
                peer: at.peer,
            }),
        };
        if relay.is_some() && !relayed.contains(&conn) {
            return Err(format!(
                "node {id}: connection {conn} has a socket and no relay in the capture"
            ));
        }
        let opts = s
            .opts
            .iter()
            .map(|(level, name, value)| (*level, *name, out.bytes(value)))
            .collect();
        sockets.push(SocketSnap {
            conn,
            group: s.group,
            opts,
            relay,
        });
    }
    let mut listeners: Vec<u64> = node.listeners.keys().copied().collect();
    listeners.sort_unstable();
    let handoff = match (&node.handoff, &node.handoff_socket) {
        (Some(tx), Some(sock)) if tx.is_open() => Some(out.dup(sock.as_fd())?),
        _ => None,
    };
    let mut handed = Vec::new();
    for (conn, copy) in lock_handed(&node.handed).copies() {
        let Some(socket) = &copy.socket else {
            return Err(format!("node {id}: a hand-off is still being sent"));
        };
        handed.push(HandedSnap {
            conn,
            key: copy.key,
            peer: copy.peer,
            fd: out.dup(socket.as_fd())?,
        });
    }
    let mut connects = Vec::new();
    for p in st.connects.iter().filter(|p| p.node == id) {
        connects.push(ConnectSnap {
            req: p.req,
            conn: p.conn,
            to: p.to,
            fd: out.dup(p.socket.as_fd())?,
            outcome: p.outcome,
        });
    }
    Ok(NodeSnap {
        id,
        name: node.name.clone(),
        peer: node.peer.clone(),
        pid: node.pid,
        notifies_accepts: node.notifies_accepts,
        transport,
        channel,
        router,
        fds,
        sockets,
        listeners,
        handoff,
        handed,
        connects,
    })
}

/// Finishes connect `p` of node endpoint `ep` in a task of its own (its
/// entry in `Tables::connects` is `key`, if any).
fn answer_connect(server: &Arc<ServerState>, ep: Endpoint, p: PendingConnect, key: Option<u64>) {
    let c = crate::node::Connecting {
        node: p.node,
        req: p.req,
        conn: p.conn,
        to: p.to,
        key,
    };
    let limit = crate::timeouts::connect_timeout(&server.config);
    tokio::spawn(crate::node::finish_connect(
        server.clone(),
        ep,
        c,
        p.socket,
        p.outcome,
        limit,
    ));
}

/// A unix or a TCP stream socket.
fn transport_of(fd: &OwnedFd) -> Result<TransportSnap, String> {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    let addr: SockaddrStorage = getsockname(std::os::fd::AsRawFd::as_raw_fd(fd))
        .map_err(|e| format!("its transport: {e}"))?;
    match addr.family() {
        Some(AddressFamily::Unix) => Ok(TransportSnap::Unix),
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Ok(TransportSnap::Tcp),
        other => Err(format!("its transport is of family {other:?}")),
    }
}

/// A node made again in the new process, its endpoint frozen: to be put
/// in the tables ([`Moved::entry`]), then started ([`Moved::start`]).
pub(crate) struct Moved {
    pub id: NodeId,
    ep: Endpoint,
    events: mpsc::UnboundedReceiver<EndpointEvent>,
    snap: NodeSnap,
    /// Relayed connections: socket and where the client came from.
    relays: Vec<(ConnId, Arc<tokio::net::TcpStream>, Option<Dispatched>)>,
    handoff: Option<SideSocket>,
    handed: Vec<(HandedSnap, OwnedFd)>,
    opts: HashMap<ConnId, Vec<(i32, i32, bytes::Bytes)>>,
    /// Outbound connects in progress, finished in the new process.
    connects: Vec<PendingConnect>,
}

/// Makes each node of the snapshot again from `source`. On a failure,
/// what was made is disowned (no destructor shuts a socket down).
pub(crate) fn restore(
    config: &ChannelConfig,
    snaps: &[NodeSnap],
    source: &mut Source,
) -> Result<Vec<Moved>, StateError> {
    let mut moved = Vec::new();
    for snap in snaps {
        match restore_one(config, snap, source) {
            Ok(m) => moved.push(m),
            Err(e) => {
                disown(moved);
                return Err(e);
            }
        }
    }
    Ok(moved)
}

/// Lets go of nodes made again without running a destructor (a refused
/// upgrade's new process, about to exit).
pub(crate) fn disown(moved: Vec<Moved>) {
    for m in moved {
        m.ep.disown();
        std::mem::forget((m.events, m.relays, m.handoff, m.handed, m.connects));
    }
}

fn restore_one(
    config: &ChannelConfig,
    snap: &NodeSnap,
    source: &mut Source,
) -> Result<Moved, StateError> {
    let invalid = |what: String| StateError::Invalid(format!("node {}: {what}", snap.id));
    let channel = ChannelSnap::decode(source.bytes(snap.channel)?)
        .map_err(|e| invalid(format!("its channel: {e}")))?;
    let router = RouterSnap::decode(source.bytes(snap.router)?)
        .map_err(|e| invalid(format!("its router: {e}")))?;
    let mut opts = HashMap::new();
    for s in &snap.sockets {
        let mut o = Vec::new();
        for &(level, name, value) in &s.opts {
            o.push((
                level,
                name,
                bytes::Bytes::copy_from_slice(source.bytes(value)?),
            ));
        }
        opts.insert(s.conn, o);
    }
    let mut fds = Vec::with_capacity(snap.fds.len());
    for &i in &snap.fds {
        fds.push(source.fd(i)?);
    }
    let handoff = match snap.handoff {
        Some(i) => Some(
            SideSocket::from_fd(source.fd(i)?)
                .map_err(|e| invalid(format!("its hand-off socket: {e}")))?,
        ),
        None => None,
    };
    let mut handed = Vec::new();
    for h in &snap.handed {
        handed.push((h.clone(), source.fd(h.fd)?));
    }
    let mut connects = Vec::new();
    for c in &snap.connects {
        connects.push(PendingConnect {
            node: snap.id,
            req: c.req,
            conn: c.conn,
            to: c.to,
            socket: source.fd(c.fd)?,
            outcome: c.outcome,
        });
    }
    let kind = snap.transport;
    let capture = EndpointCapture {
        channel,
        router,
        fds,
    };
    let Resumed {
        endpoint,
        events,
        relays,
    } = saps_fabric::Endpoint::resume(config.clone(), capture, |fd| transport(kind, fd))
        .map_err(|e| invalid(format!("its endpoint: {e}")))?;
    let mut carried = Vec::new();
    let mut bad = None;
    let kinds: HashMap<ConnId, Option<RelayedSnap>> =
        snap.sockets.iter().map(|s| (s.conn, s.relay)).collect();
    for (conn, fd) in relays {
        let client = kinds.get(&conn).copied().flatten();
        let client = match client {
            Some(RelayedSnap::Outbound) => None,
            Some(RelayedSnap::Client {
                key,
                listener,
                peer,
            }) => Some(Dispatched {
                key,
                listener,
                peer,
            }),
            None => {
                bad = Some(format!("connection {conn} is relayed and has no socket"));
                std::mem::forget(fd);
                continue;
            }
        };
        let stream = std::net::TcpStream::from(fd);
        match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => carried.push((conn, Arc::new(s), client)),
            Err(e) => bad = Some(format!("connection {conn}: {e}")),
        }
    }
    let moved = Moved {
        id: snap.id,
        ep: endpoint,
        events,
        snap: snap.clone(),
        relays: carried,
        handoff,
        handed,
        opts,
        connects,
    };
    match bad {
        Some(why) => {
            disown(vec![moved]);
            Err(invalid(why))
        }
        None => Ok(moved),
    }
}

/// The transport halves of a moved fabric socket.
fn transport(kind: TransportSnap, fd: OwnedFd) -> std::io::Result<(StreamReader, StreamWriter)> {
    Ok(match kind {
        TransportSnap::Unix => {
            let s = std::os::unix::net::UnixStream::from(fd);
            unix_socket(tokio::net::UnixStream::from_std(s)?)
        }
        TransportSnap::Tcp => {
            let s = std::net::TcpStream::from(fd);
            tcp_socket(tokio::net::TcpStream::from_std(s)?)
        }
    })
}

impl Moved {
    /// The node's entry in the new process's tables; `freed` wakes the
    /// admission task when one of its listeners' places is given back.
    pub fn entry(
        &mut self,
        freed: &Arc<tokio::sync::Notify>,
    ) -> (NodeEntry, crate::node::Barriers) {
        let (barrier, barriers) = mpsc::unbounded_channel();
        let relayed: HashMap<ConnId, _> = self
            .relays
            .iter()
            .map(|(c, stream, at)| (*c, (stream.clone(), *at)))
            .collect();
        let mut sockets = HashMap::new();
        for s in &self.snap.sockets {
            let (tcp, client) = match relayed.get(&s.conn) {
                Some((stream, at)) => (Some(stream.clone()), *at),
                None => (None, None),
            };
            let socket = Socket {
                group: s.group,
                tcp,
                opts: self.opts.remove(&s.conn).unwrap_or_default(),
                client,
            };
            sockets.insert(s.conn, socket);
        }
        let waits = || Waits {
            relayed: Waiting::new(freed.clone()),
            handed: Waiting::new(freed.clone()),
        };
        let listeners = self.snap.listeners.iter().map(|&l| (l, waits())).collect();
        let handed = crate::state::HandedTable::default();
        {
            let mut h = lock_handed(&handed);
            for (copy, fd) in self.handed.drain(..) {
                h.carried(copy.conn, copy.key, copy.peer, fd);
            }
        }
        let handoff_socket = self
            .handoff
            .as_ref()
            .and_then(|s| s.as_fd().try_clone_to_owned().ok());
        let entry = NodeEntry {
            name: self.snap.name.clone(),
            peer: self.snap.peer.clone(),
            ep: self.ep.clone(),
            sockets,
            handoff: None,
            pid: self.snap.pid,
            notifies_accepts: self.snap.notifies_accepts,
            handed,
            listeners,
            barrier,
            handoff_socket,
        };
        (entry, barriers)
    }

    /// Starts the node's task, its relays and its hand-off task, then its
    /// endpoint.
    pub fn start(self, server: &Arc<ServerState>, barriers: crate::node::Barriers) {
        let Moved {
            id,
            ep,
            events,
            snap,
            relays,
            handoff,
            connects,
            ..
        } = self;
        if let Some(sock) = handoff {
            let (tx, rx) = saps_fabric::handoff::channel();
            let handed = {
                let mut st = server.lock();
                st.nodes.get_mut(&id).map(|n| {
                    n.handoff = Some(tx);
                    n.handed.clone()
                })
            };
            if let Some(handed) = handed {
                let (server, ep) = (server.clone(), ep.clone());
                tokio::spawn(async move {
                    crate::handoff::forward_handoffs(&server, &handed, &ep, rx, sock).await;
                });
            }
        }
        for (conn, stream, client) in relays {
            Relay::resumed(id, conn, client, ep.clone(), stream).spawn(server);
        }
        for p in connects {
            // Kept in the tables again (a copy), for the next upgrade.
            let key = p.socket.try_clone().ok().map(|socket| {
                let copy = PendingConnect {
                    socket,
                    outcome: None,
                    ..p
                };
                server.lock().connects.open(copy)
            });
            answer_connect(server, ep.clone(), p, key);
        }
        tokio::spawn(crate::node::run(
            server.clone(),
            ep.clone(),
            events,
            barriers,
            id,
            snap.name,
            snap.peer,
            true,
        ));
        ep.unfreeze();
        tracing::info!(node = id, "node carried over");
    }
}

/// Now in the new process: when the oldest queued client of each group
/// expires, and that queued clients may go.
pub(crate) fn restart_queues(server: &Arc<ServerState>) {
    let queued: Vec<(std::net::SocketAddr, Instant)> = {
        let st = server.lock();
        st.groups
            .keys()
            .into_iter()
            .filter_map(|k| st.groups.oldest_queued(k).map(|at| (k, at)))
            .collect()
    };
    let timeout = server.lock().groups.limits().queue_timeout;
    for (key, at) in queued {
        crate::dispatch::expire_later(server, key, at + timeout);
    }
    server
        .waiting
        .store(true, std::sync::atomic::Ordering::Release);
    server.freed.notify_one();
}
