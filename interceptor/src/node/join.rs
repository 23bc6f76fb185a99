//! Joining an io-server: open the transport, run the channel handshake
//! until the io-server's Welcome names this node, and, for a same-host
//! io-server, claim the node's zero-relay sockets on its hand-off socket
//! (docs/io-server.md, "Zero-relay for same-host nodes").

use saps_fabric::channel::{DEFAULT_PEER_TIMEOUT, DEFAULT_PING_INTERVAL};
use saps_fabric::endpoint::{Endpoint, EndpointEvent};
use saps_fabric::handoff::{side, HandoffSender};
use saps_fabric::transport::{self, FabricUrl, StreamReader, StreamWriter};
use saps_fabric::{Channel, ChannelConfig};
use std::path::Path;
use std::time::Duration;

use super::config::RemoteIoServer;
use super::error::NodeError;

/// How long to wait for the io-server to welcome the node (and to take
/// its hand-off claim).
pub(crate) const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The io-server's events for the node's channel.
pub(crate) type Events = tokio::sync::mpsc::UnboundedReceiver<EndpointEvent>;

/// A channel the io-server welcomed.
pub(crate) struct Welcomed {
    pub endpoint: Endpoint,
    pub events: Events,
    /// The id the io-server gave this node (what a hand-off claim names).
    pub node_id: u32,
}

/// Who the node says it is in the handshake.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub name: String,
    pub weight: u32,
}

/// Connects to a remote io-server and joins it with `token`.
pub(crate) async fn join_remote(
    remote: &RemoteIoServer,
    me: &Identity,
    token: Vec<u8>,
) -> Result<Welcomed, NodeError> {
    // A remote io-server that goes silent (host down, link cut) is given
    // up like the io-server gives up a silent node, and joined again.
    let config = ChannelConfig::new(token)
        .node(me.name.clone(), me.weight)
        .liveness(DEFAULT_PING_INTERVAL, DEFAULT_PEER_TIMEOUT);
    let welcomed = open(config, connect(&remote.url).await?).await?;
    welcomed
        .endpoint
        .set_request_timeout(remote.request_timeout);
    Ok(welcomed)
}

async fn connect(url: &FabricUrl) -> Result<(StreamReader, StreamWriter), NodeError> {
    let liveness = transport::TcpLiveness {
        interval: DEFAULT_PING_INTERVAL,
        timeout: DEFAULT_PEER_TIMEOUT,
    };
    transport::connect_stream_with(url, Some(liveness))
        .await
        .map_err(|source| NodeError::Connect {
            url: url.to_string(),
            source,
        })
}

/// Opens the node's channel to saps-run's embedded io-server over `(r, w)`
/// and waits for the Welcome.
pub(crate) async fn handshake(
    me: &Identity,
    token: Vec<u8>,
    halves: (StreamReader, StreamWriter),
) -> Result<Welcomed, NodeError> {
    let mut config = ChannelConfig::new(token).node(me.name.clone(), me.weight);
    config.in_process = true;
    open(config, halves).await
}

/// Opens a node channel of `config` over `(r, w)` and waits for the Welcome.
async fn open(
    config: ChannelConfig,
    (r, w): (StreamReader, StreamWriter),
) -> Result<Welcomed, NodeError> {
    let (endpoint, mut events) = Endpoint::spawn(Channel::node(config), r, w);
    let welcome = async {
        while let Some(ev) = events.recv().await {
            match ev {
                EndpointEvent::Welcome { node_id } => return Ok(node_id),
                EndpointEvent::Closed { error } => return Err(NodeError::Refused(error)),
                _ => {}
            }
        }
        Err(NodeError::ClosedBeforeWelcome)
    };
    let node_id = tokio::time::timeout(JOIN_TIMEOUT, welcome)
        .await
        .map_err(|_| NodeError::NoWelcome(JOIN_TIMEOUT))??;
    tracing::info!(node_id, "joined the io-server");
    Ok(Welcomed {
        endpoint,
        events,
        node_id,
    })
}

/// Claims node `node_id`'s zero-relay sockets on the io-server's hand-off
/// socket; they reach `tx` until the io-server closes it. Without it (an
/// io-server that does not offer one) the node's connections are relayed.
pub(crate) async fn claim_handoff(path: &Path, node_id: u32, tx: HandoffSender) {
    let side = match side::SideSocket::connect(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no hand-off socket: relaying every byte");
            return;
        }
    };
    // The program starts serving only once the io-server took the claim,
    // so its first clients already come as sockets.
    let claimed = async {
        side.send_hello(u64::from(node_id)).await?;
        side.recv_ack().await
    };
    match tokio::time::timeout(JOIN_TIMEOUT, claimed).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            tracing::warn!("the io-server refused the hand-off claim: relaying every byte");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "hand-off claim failed: relaying every byte");
            return;
        }
        Err(_) => {
            tracing::warn!("no answer to the hand-off claim: relaying every byte");
            return;
        }
    }
    tracing::info!(path = %path.display(), "zero-relay through the io-server's hand-off socket");
    tokio::spawn(side::receive(side, tx));
}
