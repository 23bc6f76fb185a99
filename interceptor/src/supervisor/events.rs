//! The io-server's side of the node: its callbacks (connections accepted
//! for our listeners, hand-offs of a same-host io-server), the listener
//! sweep, and the rejoin after the channel to it was lost.

use super::arrival;
use super::state::SupervisorState;
use saps_fabric::endpoint::{Endpoint, EndpointEvent};
use saps_fabric::Request;
use std::sync::Arc;
use std::time::Duration;

/// How often listeners the program closed are looked for. `close` is not
/// trapped, so a closed listener is noticed by its hang-up on `M`.
const LISTENER_SWEEP: Duration = Duration::from_secs(1);

/// Handles the io-server's callbacks for this node until the channel ends:
/// connections accepted for our listeners are delivered to the listener's
/// `L`; every [`LISTENER_SWEEP`] closed listeners and placeholders are
/// forgotten and markers the program read are put back.
pub(crate) async fn serve(
    sh: Arc<SupervisorState>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<EndpointEvent>,
) {
    let mut sweep = tokio::time::interval(LISTENER_SWEEP);
    loop {
        let ev = tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => ev,
                None => return,
            },
            _ = sweep.tick() => {
                arrival::reap_listeners(&sh, None);
                sh.sweep_closed(None);
                sh.listeners.repair_markers();
                continue;
            }
        };
        match ev {
            EndpointEvent::ConnectionAccepted {
                listener,
                conn,
                peer,
                local,
            } => arrival::deliver(&sh, listener, conn, peer, local),
            EndpointEvent::Connecting { conn, local } => {
                super::connect::local_known(&sh, conn, local);
            }
            EndpointEvent::ConnectionClosed { conn, errno } => {
                tracing::debug!(conn, errno, "connection closed before it was relayed");
                sh.listeners.forget_arrival(conn);
            }
            EndpointEvent::Closed { error } => {
                tracing::error!(%error, "the fabric channel to the io-server closed");
                return;
            }
            other => tracing::debug!(event = ?other, "fabric event"),
        }
    }
}

/// Takes the TCP sockets a same-host io-server hands over (zero-relay)
/// and queues each on its listener's `L` like a relayed connection.
pub(crate) async fn serve_handoffs(
    sh: Arc<SupervisorState>,
    mut rx: saps_fabric::handoff::HandoffReceiver,
) {
    while let Some(h) = rx.recv().await {
        arrival::deliver_handoff(&sh, h);
    }
}

/// The node joined the io-server again over `endpoint` (after the old
/// channel closed): connections of the old channel are gone, and every
/// listener the program still holds is registered again, so the program's
/// listening sockets keep working across an io-server restart.
pub(crate) async fn rejoin(sh: &Arc<SupervisorState>, endpoint: Endpoint) {
    sh.set_endpoint(endpoint.clone());
    let (old, closed) = sh.listeners.drain_for_rejoin();
    drop(closed);
    sh.table().forget_connections();
    let mut old = old.into_iter();
    while let Some((old_conn, l)) = old.next() {
        if !l.alive() {
            sh.table().remove_conn(old_conn);
            continue;
        }
        let Ok(conn) = endpoint.make_connection() else {
            sh.listeners
                .go_dormant(std::iter::once(l).chain(old.map(|(_, l)| l)));
            return;
        };
        let bind = Request::Bind {
            conn,
            addr: l.addr,
            flags: l.flags,
        };
        let listen = Request::Listen {
            conn,
            backlog: l.backlog,
        };
        let mut errno = sh.request(bind).await.errno();
        if errno == 0 {
            errno = sh.request(listen).await.errno();
        }
        if errno != 0 {
            tracing::warn!(addr = %l.addr, errno, "could not listen again after rejoining");
            sh.listeners.go_dormant(std::iter::once(l));
            continue;
        }
        tracing::info!(addr = %l.addr, "listening again after rejoining");
        sh.table().retag(old_conn, conn);
        arrival::listening(sh, conn, l);
    }
}
