//! Changes of the cluster that move clients: a node's weight changes (0
//! drains it; queued clients may go), and a node leaves (its sockets leave
//! their groups, the clients it had not accepted go to the other members,
//! queued ones go to whoever is eligible). `Groups` decides; this does
//! the socket work it returns.

use crate::dispatch::{close_orphans_later, drain_queue};
use crate::handoff::redispatch_handed;
use crate::state::{lock_handed, ServerState};
use crate::traffic::NodeId;
use std::sync::Arc;

/// Sets a node's weight (0 drains it) and lets queued clients go. False
/// if no such node.
pub(crate) fn set_weight(server: &Arc<ServerState>, id: NodeId, weight: u32) -> bool {
    let keys = {
        let mut st = server.lock();
        let Some(node) = st.nodes.get(&id) else {
            return false;
        };
        tracing::info!(node = id, name = %node.name, weight, "weight changed");
        if !st.groups.set_weight(id, weight) {
            return false;
        }
        st.groups.keys()
    };
    for key in keys {
        drain_queue(server, key);
    }
    true
}

/// Sets the weight of the node called `name` (or with that id).
pub(crate) fn set_weight_by_name(server: &Arc<ServerState>, name: &str, weight: u32) -> bool {
    let id = {
        let st = server.lock();
        st.nodes
            .iter()
            .find(|(id, n)| n.name == name || id.to_string() == name)
            .map(|(&id, _)| id)
    };
    id.is_some_and(|id| set_weight(server, id, weight))
}

/// A node's channel closed: its sockets leave their groups, and the
/// clients it was given whose program had not accepted them go to the
/// other members (issue 17; its relayed ones come back through their
/// relays, `relay.rs`).
pub(crate) fn remove_node(server: &Arc<ServerState>, id: NodeId) {
    let (keys, handed, orphans) = {
        let mut st = server.lock();
        let handed = st
            .nodes
            .remove(&id)
            .map(|n| lock_handed(&n.handed).leave())
            .unwrap_or_default();
        let orphans = st.leave(id);
        (st.groups.keys(), handed, orphans)
    };
    close_orphans_later(server, orphans);
    for copy in handed {
        if let Some(socket) = copy.socket {
            redispatch_handed(server, copy.key, socket, copy.peer);
        }
    }
    for key in keys {
        drain_queue(server, key);
    }
}
