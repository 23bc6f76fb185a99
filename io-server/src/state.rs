//! The io-server's shared state: the registered nodes, the listener groups
//! and the traffic counters behind `io-server status`.

use crate::group::{Dispatched, Groups};
use crate::Shared;
use saps_fabric::endpoint::ClientRelayEnd;
use saps_fabric::{ConnId, Endpoint, RelayOutcome};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tracing::Instrument;

/// A node's id on this io-server (sent in Welcome).
pub type NodeId = u32;

/// Connection counters of a node, a group or a group member.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Live relayed connections, by (node, connection).
    pub live: HashSet<(NodeId, ConnId)>,
    /// Connections ever relayed or handed off.
    pub total: u64,
    /// Connections handed to a same-host node (zero-relay): they are in
    /// `total` but never live here, and their bytes are not counted.
    pub handed_off: u64,
    /// Bytes of finished connections; live ones are asked from the endpoint.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Traffic {
    fn start(&mut self, id: (NodeId, ConnId)) {
        self.live.insert(id);
        self.total += 1;
    }

    /// A connection handed to a same-host node: counted, never relayed.
    pub fn handed_off(&mut self) {
        self.total += 1;
        self.handed_off += 1;
    }

    fn finish(&mut self, id: (NodeId, ConnId), out: &RelayOutcome) {
        if self.live.remove(&id) {
            self.bytes_in += out.bytes_in;
            self.bytes_out += out.bytes_out;
        }
    }
}

/// One node socket the io-server holds state for.
#[derive(Debug, Default)]
pub struct Socket {
    /// The group it is bound in.
    pub group: Option<SocketAddr>,
    /// The connected TCP socket, shared with its relay, for SetOpt/GetOpt.
    /// Dropped when the relay ends, which is when the socket really closes.
    pub tcp: Option<Arc<TcpStream>>,
    /// Options set before there was a TCP socket; applied on connect.
    pub opts: Vec<(i32, i32, bytes::Bytes)>,
}

/// A registered node.
pub struct NodeEntry {
    pub name: String,
    pub peer: String,
    pub ep: Endpoint,
    /// The scheduling weight; 0 drains.
    pub weight: u32,
    pub traffic: Traffic,
    pub sockets: HashMap<ConnId, Socket>,
    /// Same-host node: accepted sockets are handed to it, not relayed.
    pub handoff: Option<saps_fabric::handoff::HandoffSender>,
    /// The node's process, when its fabric is a unix socket: only that
    /// process may claim the node's hand-off socket.
    pub pid: Option<i32>,
    /// The node says when its program accepts a connection (protocol
    /// version 2): its connections are kept for re-dispatch until then.
    pub notifies_accepts: bool,
    /// Handed-over connections its program has not accepted yet, with the
    /// io-server's copy of each socket (`unaccepted.rs`); shared with the
    /// node's hand-off task, which outlives the entry.
    pub handed: SharedHanded,
}

/// A node's [`crate::unaccepted::Handed`], taken after the state's lock
/// when both are.
pub type SharedHanded = Arc<std::sync::Mutex<crate::unaccepted::Handed>>;

pub fn lock_handed(h: &SharedHanded) -> std::sync::MutexGuard<'_, crate::unaccepted::Handed> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeEntry {
    /// `C_i` of MWLC: bytes still to deliver on `t`'s live connections of
    /// this node, both ways (client data the node has not consumed, node
    /// data not yet written to the client).
    pub fn in_flight(&self, t: &Traffic) -> u64 {
        t.live.iter().map(|&(_, c)| self.conn_in_flight(c)).sum()
    }

    /// Bytes still to deliver on one relayed connection.
    pub fn conn_in_flight(&self, conn: ConnId) -> u64 {
        self.ep.pending_bytes(conn) + self.ep.handle().with(|ch| ch.buffered(conn))
    }
}

#[derive(Default)]
pub struct State {
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub next_node: NodeId,
    pub groups: Groups,
}

impl State {
    /// Live connections of every node.
    pub fn live_connections(&self) -> usize {
        self.nodes.values().map(|n| n.traffic.live.len()).sum()
    }
}

/// Records a relayed connection of `node` (accepted for `member`, or
/// outbound) and runs its relay; the counters are settled when it ends.
/// An accepted client whose node leaves before its program accepts it is
/// dispatched again ([`crate::group::redispatch`]).
pub(crate) fn start_relay(
    shared: &Arc<Shared>,
    st: &mut State,
    node_id: NodeId,
    member: Option<Dispatched>,
    conn: ConnId,
    stream: TcpStream,
) {
    let Some(node) = st.nodes.get_mut(&node_id) else {
        return;
    };
    let id = (node_id, conn);
    node.traffic.start(id);
    let sock = node.sockets.entry(conn).or_default();
    let stream = Arc::new(stream);
    sock.tcp = Some(stream.clone());
    let ep = node.ep.clone();
    if let Some(Dispatched { key, listener, .. }) = member {
        if let Some(g) = st.groups.map.get_mut(&key) {
            g.traffic.start(id);
        }
        if let Some(m) = st.groups.member_mut(key, node_id, listener) {
            m.traffic.start(id);
        }
    }
    let shared = shared.clone();
    let span = tracing::debug_span!("conn", node = node_id, conn);
    tokio::spawn(
        async move {
            // The peer's address is in the "client dispatched" line of
            // this conn (a getpeername per connection only to log it cost
            // a system call).
            let (out, back) = match member {
                Some(_) => match ep.relay_client(conn, stream).await {
                    ClientRelayEnd::Finished(out) => (out, None),
                    ClientRelayEnd::Unaccepted {
                        stream,
                        replay,
                        outcome,
                    } => (outcome, Some((stream, replay))),
                },
                None => (ep.relay_tcp(conn, stream).await, None),
            };
            tracing::debug!(
                bytes_in = out.bytes_in,
                bytes_out = out.bytes_out,
                errno = out.errno,
                "connection finished"
            );
            let mut st = shared.lock();
            if let Some(node) = st.nodes.get_mut(&node_id) {
                node.traffic.finish(id, &out);
                node.sockets.remove(&conn);
            }
            if let Some(Dispatched { key, listener, .. }) = member {
                if let Some(g) = st.groups.map.get_mut(&key) {
                    g.traffic.finish(id, &out);
                }
                if let Some(m) = st.groups.member_mut(key, node_id, listener) {
                    m.traffic.finish(id, &out);
                }
            }
            drop(st);
            shared.conns_changed.notify_waiters();
            if let (Some((stream, replay)), Some(m)) = (back, member) {
                // The node's copy of the socket went with its entry above.
                match own_stream(stream) {
                    Ok(stream) => crate::group::redispatch(&shared, m.key, stream, m.peer, replay),
                    Err(e) => tracing::warn!(peer = %m.peer, error = %e, "cannot dispatch the client again; closed"),
                }
            }
        }
        .instrument(span),
    );
}

/// The client socket a relay gave back, as a socket of its own again
/// (out of the runtime's reactor); a duplicate if it is still shared.
fn own_stream(stream: Arc<TcpStream>) -> std::io::Result<std::net::TcpStream> {
    match Arc::try_unwrap(stream) {
        Ok(s) => s.into_std(),
        Err(shared) => {
            let fd = std::os::fd::AsFd::as_fd(&*shared).try_clone_to_owned()?;
            Ok(std::net::TcpStream::from(fd))
        }
    }
}
