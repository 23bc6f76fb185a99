//! Accept and dispatch (DESIGN.md "Figure 3"): each group's accept task
//! takes clients off its port ([`accept_loop`]) and [`dispatch`] gives each
//! to the member `Groups` picks (`groups.rs`): to a same-host node as the
//! socket itself (zero-relay, [`hand_off`]), else relayed over the node's
//! channel (`relay.rs`); with no member eligible it waits in the group's
//! queue, which [`drain_queue`] empties when one is. A client whose node
//! left before its program accepted it comes back through [`redispatch`]
//! (issue 17, `unaccepted.rs`), with what it already sent ([`Replay`]).
//!
//! Orphaned ports (no listener left) are closed here after the grace
//! unless taken over ([`close_orphans_later`]).

use crate::groups::{Orphan, Placement};
use crate::ports::{close_listener, Listening};
use crate::relay::{Dispatched, Relay, Relayed};
use crate::state::{in_flight, lock_handed, Client, ServerState, Tables};
use crate::sys;
use crate::traffic::{MemberId, NodeId};
use saps_fabric::endpoint::Replay;
use saps_fabric::RELISTEN_GRACE;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

/// Accepts clients on a group's port until shutdown or the group closes.
pub(crate) async fn accept_loop(
    server: Arc<ServerState>,
    key: SocketAddr,
    listener: Arc<Listening>,
) {
    let what = key.to_string();
    server
        .accept_until_shutdown(
            &what,
            || accept(&listener),
            |(stream, peer)| dispatch(&server, key, stream, peer, Replay::default()),
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

/// Closes the ports an unbind orphaned once [`RELISTEN_GRACE`] is over,
/// unless a listener took them over meanwhile; with them the clients
/// still waiting in their queues.
pub(crate) fn close_orphans_later(server: &Arc<ServerState>, orphans: Vec<Orphan>) {
    if orphans.is_empty() {
        return;
    }
    let server = server.clone();
    tokio::spawn(async move {
        tokio::time::sleep(RELISTEN_GRACE).await;
        let mut closed = Vec::new();
        {
            let mut st = server.lock();
            for orphan in orphans {
                if let Some(waiting) = st.close_orphan(orphan) {
                    tracing::debug!(key = %orphan.key, "no listener took the port over: closed");
                    closed.extend(waiting);
                }
            }
        }
        drop(closed);
    });
}

/// A client whose node left before its program accepted it (its channel
/// ended): dispatched again to the group it came to, with what it sent
/// (`replay`). The socket is made non-blocking again (a node may have
/// cleared that on the description it shared).
pub(crate) fn redispatch(
    server: &Arc<ServerState>,
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
    let client = Client {
        stream,
        peer,
        replay,
    };
    place(server, key, client, true);
}

/// [`redispatch`] for a relay that gave its client back.
fn give_back(server: &Arc<ServerState>, at: Dispatched, stream: TcpStream, replay: Replay) {
    redispatch(server, at.key, stream, at.peer, replay);
}

/// Hands a client connection to the member the scheduler picks, or queues
/// it. `replay`: what it sent to a node that left before accepting it,
/// sent first (such a client is relayed: octets read from its socket
/// cannot be handed over with it).
pub(crate) fn dispatch(
    server: &Arc<ServerState>,
    key: SocketAddr,
    stream: TcpStream,
    peer: SocketAddr,
    replay: Replay,
) {
    let client = Client {
        stream,
        peer,
        replay,
    };
    place(server, key, client, false);
}

/// [`dispatch`]; `again`: counted as dispatched again (once, however many
/// members it tries). A relayed client's relay starts once the tables'
/// lock is released.
fn place(server: &Arc<ServerState>, key: SocketAddr, client: Client, again: bool) {
    let relay = place_locked(server, &mut server.lock(), key, client, again);
    if let Some(relay) = relay {
        relay.spawn(server);
    }
}

/// [`place`] under the tables' lock: the client is handed over or queued,
/// or recorded as relayed (the relay to run is returned).
fn place_locked(
    server: &Arc<ServerState>,
    st: &mut Tables,
    key: SocketAddr,
    mut client: Client,
    mut again: bool,
) -> Option<Relay> {
    let peer = client.peer;
    // The group's address is the client's destination unless it is a
    // wildcard one.
    let local = if key.ip().is_unspecified() {
        match client.stream.local_addr() {
            Ok(a) => a,
            Err(_) => return None,
        }
    } else {
        key
    };
    loop {
        let placed = {
            let nodes = &st.nodes;
            let pending = |node, conn| in_flight(nodes, node, conn);
            match std::mem::take(&mut again) {
                true => st.groups.redispatch(key, client, peer.ip(), pending),
                false => st.groups.dispatch(key, client, peer.ip(), pending),
            }
        };
        let member = match placed {
            Placement::Member(member, back) => {
                client = back;
                member
            }
            Placement::Queued => {
                tracing::debug!(%key, %peer, "no eligible member: client queued");
                return None;
            }
            Placement::QueueFull(_) => {
                tracing::warn!(%key, %peer, "group queue full: client closed");
                return None;
            }
            Placement::NoGroup(_) => return None,
        };
        let MemberId {
            node: node_id,
            listener,
        } = member;
        let at = Dispatched {
            key,
            listener,
            peer,
        };
        let Some(node) = st.nodes.get(&node_id) else {
            close_orphans_later(server, st.unbind(node_id, None));
            continue;
        };
        // Kept for re-dispatch until its program accepts it (issue 17),
        // where the node says so and has room.
        let track = node.notifies_accepts && {
            let handed = lock_handed(&node.handed).len();
            crate::unaccepted::room(node.ep.unaccepted(), handed)
        };
        let ep = node.ep.clone();
        if client.replay.is_empty() {
            if let Some(tx) = node.handoff.clone().filter(|t| t.is_open()) {
                if !ep.is_open() {
                    // Its channel ended; it is on its way out.
                    close_orphans_later(server, st.unbind(node_id, None));
                    continue;
                }
                match hand_off(st, &tx, at, node_id, track, client.stream, local) {
                    Ok(()) => return None,
                    // The node's hand-off just stopped: relayed instead.
                    Err(back) => client.stream = back,
                }
            }
        }
        // The relay writes what the node sends as soon as it comes; a socket
        // handed off above keeps the options the program gave its listener.
        let _ = client.stream.set_nodelay(true);
        match ep.accept_connection_with(listener, peer, local, &client.replay, track) {
            Ok(conn) => {
                let stream = match tokio::net::TcpStream::from_std(client.stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot relay the connection");
                        ep.close_connection(conn, libc::ECONNABORTED);
                        return None;
                    }
                };
                tracing::debug!(%key, %peer, node = node_id, conn, track, "client dispatched");
                let relayed = Relayed::Client {
                    at,
                    back: give_back,
                };
                return Relay::record(st, node_id, relayed, conn, stream);
            }
            // The node's channel closed; its removal is on the way.
            Err(_) => close_orphans_later(server, st.unbind(node_id, None)),
        }
    }
}

/// Zero-relay: gives the accepted socket itself to a same-host node.
/// `track`: keep the io-server's descriptor of it (the hand-off task does,
/// once sent) until the node says its program accepted it, to give it to
/// another member if the node leaves first. The socket back when the
/// node's hand-off has stopped.
fn hand_off(
    st: &mut Tables,
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
    // Recorded before it is sent, under the tables' lock, so that the
    // hand-off task (which looks for it before sending) and the node's
    // Accepted (which can only follow the send) both find it.
    let conn = match track.then(|| node.ep.hand_connection()) {
        Some(Ok(conn)) => {
            lock_handed(&node.handed).sending(conn, key, peer);
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
            lock_handed(&node.handed).unsent(conn);
            node.ep.forget_handed(conn);
        }
        return Err(TcpStream::from(h.socket));
    }
    tracing::debug!(%key, %peer, node = node_id, conn, "client handed off (zero-relay)");
    let member = MemberId {
        node: node_id,
        listener,
    };
    st.groups.handed_off(key, member);
    Ok(())
}

/// Dispatches queued clients of `key` while a member is eligible.
pub(crate) fn drain_queue(server: &Arc<ServerState>, key: SocketAddr) {
    for _ in 0..crate::groups::MAX_QUEUED {
        let next = server.lock().groups.next_queued(key);
        match next {
            Some(client) => place(server, key, client, false),
            None => return,
        }
    }
}
