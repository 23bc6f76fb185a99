//! Running a relayed connection: a client given to a node (`dispatch.rs`)
//! or an outbound `connect` of a node (`node.rs`). The endpoint's relay
//! carries the bytes within the Appendix A credits
//! (`saps_fabric::Endpoint::relay_client`); the connection is counted when
//! it starts and when it ends (`Tables::relay_started`/`relay_finished`,
//! one call to the ledger each, `traffic.rs`), and a client its node's
//! program never accepted comes back to be dispatched again (issue 17).

use crate::state::{ServerState, Tables};
use crate::traffic::{MemberId, NodeId};
use saps_fabric::endpoint::{ClientRelayEnd, Replay};
use saps_fabric::{ConnId, Endpoint};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tracing::Instrument;

/// Where an accepted client went: its group, the member's listener, and
/// the client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dispatched {
    pub key: SocketAddr,
    pub listener: ConnId,
    pub peer: SocketAddr,
}

/// What to do with a client given back unaccepted: dispatch it again to
/// its group (`dispatch::redispatch`), with what it sent.
pub(crate) type GiveBack = fn(&Arc<ServerState>, Dispatched, std::net::TcpStream, Replay);

/// What a relay carries.
#[derive(Clone, Copy)]
pub(crate) enum Relayed {
    /// A node's outbound connection.
    Outbound,
    /// A client accepted for a group's member; `back` takes it if the
    /// node leaves before its program accepts it.
    Client { at: Dispatched, back: GiveBack },
}

/// A relayed connection recorded in the tables, to run once their lock
/// is released ([`Relay::spawn`]).
pub(crate) struct Relay {
    node: NodeId,
    conn: ConnId,
    relayed: Relayed,
    ep: Endpoint,
    stream: Arc<TcpStream>,
}

impl Relay {
    /// Records connection `conn` of `node` (`Tables::relay_started`);
    /// `None` if the node is gone.
    pub fn record(
        st: &mut Tables,
        node: NodeId,
        relayed: Relayed,
        conn: ConnId,
        stream: TcpStream,
    ) -> Option<Relay> {
        let member = match relayed {
            Relayed::Client { at, .. } => {
                let listener = at.listener;
                Some((at.key, MemberId { node, listener }))
            }
            Relayed::Outbound => None,
        };
        let (ep, stream) = st.relay_started(node, conn, member, stream)?;
        if let (Relayed::Client { at, .. }, Some(n)) = (relayed, st.nodes.get_mut(&node)) {
            n.sockets.entry(conn).or_default().client = Some(at);
        }
        Some(Relay {
            node,
            conn,
            relayed,
            ep,
            stream,
        })
    }

    /// A relay carried over by an upgrade, on its socket: it goes on from
    /// where the old process's stopped (its start was counted there).
    pub fn resumed(
        node: NodeId,
        conn: ConnId,
        client: Option<Dispatched>,
        ep: Endpoint,
        stream: Arc<TcpStream>,
    ) -> Relay {
        let relayed = match client {
            Some(at) => Relayed::Client {
                at,
                back: crate::dispatch::give_back,
            },
            None => Relayed::Outbound,
        };
        Relay {
            node,
            conn,
            relayed,
            ep,
            stream,
        }
    }

    /// Runs the relay; the counters are settled when it ends.
    pub fn spawn(self, server: &Arc<ServerState>) {
        let Relay {
            node,
            conn,
            relayed,
            ep,
            stream,
        } = self;
        let server = server.clone();
        let span = tracing::debug_span!("conn", node, conn);
        tokio::spawn(
            async move {
                // The peer's address is in the "client dispatched" line of
                // this conn (a getpeername per connection only to log it
                // cost a system call).
                let (out, back) = match relayed {
                    Relayed::Client { .. } => match ep.relay_client(conn, stream).await {
                        ClientRelayEnd::Finished(out) => (out, None),
                        ClientRelayEnd::Unaccepted {
                            stream,
                            replay,
                            outcome,
                        } => (outcome, Some((stream, replay))),
                    },
                    Relayed::Outbound => (ep.relay_tcp(conn, stream).await, None),
                };
                tracing::debug!(
                    bytes_in = out.bytes_in,
                    bytes_out = out.bytes_out,
                    errno = out.errno,
                    "connection finished"
                );
                let bytes = (out.bytes_in, out.bytes_out);
                server.lock().relay_finished(node, conn, bytes);
                server.conns_changed.notify_waiters();
                server.freed.notify_one();
                if let (Some((stream, replay)), Relayed::Client { at, back }) = (back, relayed) {
                    // The node's copy of the socket went with its entry above.
                    match own_stream(stream) {
                        Ok(stream) => back(&server, at, stream, replay),
                        Err(e) => tracing::warn!(peer = %at.peer, error = %e, "cannot dispatch the client again; closed"),
                    }
                }
            }
            .instrument(span),
        );
    }
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
