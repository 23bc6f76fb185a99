//! Zero-relay for same-host nodes (docs/io-server.md "Zero-relay"): next to
//! each `unix:PATH` fabric listener, `PATH.handoff` takes the claims of
//! nodes that want accepted sockets themselves ([`handoff_loop`],
//! [`claim_handoff`]); a granted claim gets a task that sends each socket
//! `dispatch.rs` hands the node ([`forward_handoffs`]). A handed socket the
//! node can no longer get, or one its program had not accepted when it
//! left, is dispatched again ([`redispatch_handed`], issue 17).

use crate::dispatch;
use crate::state::{lock_handed, HandedTable, ServerState};
use crate::sys;
use crate::traffic::{MemberId, NodeId};
use crate::unaccepted::Sent;
use saps_fabric::handoff::side;
use std::sync::Arc;
use std::time::Duration;

/// Accepts same-host nodes' hand-off sockets until shutdown.
pub(crate) async fn handoff_loop(server: Arc<ServerState>, listener: side::SideListener) {
    server
        .accept_until_shutdown(
            "hand-off",
            || listener.accept(),
            |(sock, pid)| {
                tokio::spawn(claim_handoff(server.clone(), sock, pid));
            },
        )
        .await
}

/// Gives node `id` its hand-off socket if `pid` is the process whose unix
/// fabric connection got that id; accepted client sockets then go to it
/// instead of being relayed, until either end closes the socket.
async fn claim_handoff(server: Arc<ServerState>, sock: side::SideSocket, pid: i32) {
    let id = match tokio::time::timeout(saps_fabric::driver::HANDSHAKE_TIMEOUT, sock.recv_hello())
        .await
    {
        Ok(Ok(Some(id))) => id,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(pid, error = %e, "hand-off claim refused");
            return;
        }
        Err(_) => {
            tracing::warn!(
                pid,
                timeout = ?saps_fabric::driver::HANDSHAKE_TIMEOUT,
                "hand-off claim refused: no node id in time"
            );
            return;
        }
    };
    // Kept with the node, for an upgrade to hand over.
    let copy = match sock.as_fd().try_clone_to_owned() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(node = id, error = %e, "hand-off claim refused: no copy of its socket");
            return;
        }
    };
    let (rx, handed, ep) = {
        let mut st = server.lock();
        let node = NodeId::try_from(id).ok();
        match node.and_then(|id| st.nodes.get_mut(&id)) {
            Some(n) if n.pid == Some(pid) => {
                let (tx, rx) = saps_fabric::handoff::channel();
                n.handoff = Some(tx);
                n.handoff_socket = Some(copy);
                tracing::info!(node = id, name = %n.name, "same-host node: zero-relay");
                (rx, n.handed.clone(), n.ep.clone())
            }
            _ => {
                tracing::warn!(
                    node = id,
                    pid,
                    "hand-off claim refused: that node did not join from this process over a unix fabric"
                );
                return;
            }
        }
    };
    if let Err(e) = sock.send_ack().await {
        tracing::warn!(node = id, error = %e, "hand-off socket failed; relaying");
        return;
    }
    forward_handoffs(&server, &handed, &ep, rx, sock).await;
}

/// Sends every socket handed to a node over its hand-off socket until
/// either end closes. The io-server's descriptor of a socket it keeps for
/// re-dispatch (`conn` not 0) is kept once sent, until the node's program
/// accepts it (`unaccepted.rs`); any other is closed once sent, as
/// [`side::forward`] does. One the node can no longer get (it left, or the
/// socket failed) is dispatched again.
pub(crate) async fn forward_handoffs(
    server: &Arc<ServerState>,
    handed: &HandedTable,
    ep: &saps_fabric::Endpoint,
    mut rx: saps_fabric::handoff::HandoffReceiver,
    sock: side::SideSocket,
) {
    while let Some(h) = rx.recv().await {
        // Each one was counted in flight when queued (`dispatch.rs`).
        server.in_flight.end();
        let tracked = h.conn != 0;
        let left = tracked
            .then(|| lock_handed(handed).before_send(h.conn))
            .flatten();
        if let Some(copy) = left {
            redispatch_handed(server, copy.key, h.socket, copy.peer);
            continue;
        }
        // A sequenced-packet send: cancelled, it sent all or nothing.
        let sent = match server.config.node_request_timeout {
            0 => sock.send(&h).await,
            secs => tokio::time::timeout(Duration::from_secs(secs), sock.send(&h))
                .await
                .unwrap_or_else(|_| Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT))),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "hand-off socket failed; relaying again");
            // Nothing more is handed to this node: what it was given and
            // did not get goes to a member again (relayed, if to it).
            rx.close();
            let rest = std::iter::from_fn(|| rx.try_recv()).inspect(|_| server.in_flight.end());
            for h in std::iter::once(h).chain(rest) {
                let copy = lock_handed(handed).unsent(h.conn);
                if tracked {
                    ep.forget_handed(h.conn);
                }
                let member = MemberId {
                    node: h.node,
                    listener: h.listener,
                };
                let key = match copy {
                    Some(c) => Some(c.key),
                    None => group_of(server, member),
                };
                match key {
                    Some(key) => redispatch_handed(server, key, h.socket, h.peer),
                    None => tracing::warn!(peer = %h.peer, "client of a failed hand-off closed"),
                }
            }
            return;
        }
        if !tracked {
            continue; // closed here once sent, as before
        }
        let sent = lock_handed(handed).sent(h.conn, h.socket);
        match sent {
            Sent::Kept => {}
            Sent::Close(socket) => drop(socket),
            Sent::Redispatch(copy) => {
                if let Some(socket) = copy.socket {
                    redispatch_handed(server, copy.key, socket, copy.peer);
                }
            }
        }
    }
}

/// The group whose member is `member`.
fn group_of(server: &ServerState, member: MemberId) -> Option<std::net::SocketAddr> {
    server.lock().groups.group_of(member)
}

/// Dispatches a client whose socket was handed to a node again, unless
/// its program read from it or wrote to it ([`sys::untouched`]); nothing of
/// it was read by the io-server, so it may be handed over again.
pub(crate) fn redispatch_handed(
    server: &Arc<ServerState>,
    key: std::net::SocketAddr,
    socket: std::os::fd::OwnedFd,
    peer: std::net::SocketAddr,
) {
    // The node's `Accepted` may have been lost with it: one its program
    // read from or answered stays closed, as any connection of a dead node.
    if !sys::untouched(std::os::fd::AsFd::as_fd(&socket)) {
        tracing::info!(%peer, "client of a node that left was read or answered there: closed");
        return;
    }
    let stream = std::net::TcpStream::from(socket);
    let replay = saps_fabric::endpoint::Replay::default();
    dispatch::redispatch(server, key, stream, peer, replay);
}
