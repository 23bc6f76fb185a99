//! Accept and dispatch (DESIGN.md "Figure 3"): each group's accept task
//! takes clients off its port ([`accept_loop`]) and [`dispatch`] gives each
//! to the member `Groups` picks (`groups.rs`): to a same-host node as the
//! socket itself (zero-relay, [`hand_off`]), else relayed over the node's
//! channel (`relay.rs`); with no member eligible it waits in the group's
//! queue, which [`drain_queue`] empties when one is. A client whose node
//! left before its program accepted it comes back through [`redispatch`]
//! (issue 17, `unaccepted.rs`), with what it already sent ([`Replay`]).
//!
//! Admission (issue 24, docs/io-server.md "Admission"): a group that can
//! take no more clients (no member eligible and its queue full) pauses its
//! accept task, which then leaves new clients in the kernel's accept queue
//! until woken ([`accept_loop`]); whatever gives a place back wakes the
//! [`admission_task`], which lets queued clients in and wakes the paused
//! groups that admit again. A queued client waits at most the queue
//! timeout ([`expire_later`]).
//!
//! Orphaned ports (no listener left) are closed here after the grace
//! unless taken over ([`close_orphans_later`]).

use crate::groups::{Orphan, Placement};
use crate::ports::{close_listener, Listening};
use crate::relay::{Dispatched, Relay, Relayed};
use crate::state::{held, in_flight, lock_handed, Client, ServerState, Tables};
use crate::sys;
use crate::traffic::{MemberId, NodeId};
use saps_fabric::endpoint::Replay;
use saps_fabric::RELISTEN_GRACE;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Accepts clients on a group's port until shutdown or the group closes.
/// While the group admits no more (`Groups::admits`) it does not call
/// `accept`: new clients wait in the kernel's accept queue, the last
/// bound, until the admission task wakes it (`resume`).
pub(crate) async fn accept_loop(
    server: Arc<ServerState>,
    key: SocketAddr,
    listener: Arc<Listening>,
) {
    let resume = server.lock().ports.resume(key).unwrap_or_default();
    let mut stop = server.shutdown.subscribe();
    let mut paused = server.paused.subscribe();
    let mut admits = true;
    let mut pauses = 0u64;
    loop {
        if *paused.borrow_and_update() {
            // An upgrade's handover: clients wait in the kernel's queue.
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = paused.wait_for(|p| !*p) => continue,
            }
        }
        if !admits {
            // Logged as a warning the first time, then at debug level (a
            // burst may pause a group many times; `status` counts them).
            pauses += 1;
            if pauses == 1 {
                tracing::warn!(%key, "admission: every bound reached; new clients wait in the kernel's accept queue (logged once; `status` counts the pauses)");
            } else {
                tracing::debug!(%key, pauses, "admission: every bound reached; new clients wait in the kernel's accept queue");
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = resume.notified() => {}
            }
            tracing::debug!(%key, "admission: accepting again");
        }
        let r = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = paused.changed() => continue,
            r = accept(&listener) => r,
        };
        admits = match r {
            Ok((stream, peer)) => dispatch(&server, key, stream, peer, Replay::default()),
            // The listening socket was shut down (its group is gone).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => {
                tracing::warn!(%key, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                true
            }
        };
    }
    // The group may still hold the socket: stop listening now.
    close_listener(&listener);
}

/// The next client of `l`, once the runtime reports it readable. A
/// client of the stack is its end of the bridge's socketpair, carried as
/// a `TcpStream` like the kernel's clients (read, write, `splice` and
/// `shutdown` work on it alike; nothing asks it TCP questions: its
/// addresses come with it, `ServerState::stack`).
async fn accept(l: &Listening) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Listening::Kernel(l) => loop {
            let mut ready = l.readable().await?;
            if let Ok(r) = ready.try_io(|l| sys::accept(l.get_ref())) {
                return r;
            }
        },
        Listening::Stack(l) => loop {
            if l.get_ref().is_closed() {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            let mut ready = l.readable().await?;
            match ready.get_inner().try_accept() {
                Some(c) => return Ok((TcpStream::from(c.fd), c.peer)),
                None => ready.clear_ready(),
            }
        },
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
pub(crate) fn give_back(
    server: &Arc<ServerState>,
    at: Dispatched,
    stream: TcpStream,
    replay: Replay,
) {
    redispatch(server, at.key, stream, at.peer, replay);
}

/// Hands a client connection to the member the scheduler picks, or queues
/// it. `replay`: what it sent to a node that left before accepting it,
/// sent first (such a client is relayed: octets read from its socket
/// cannot be handed over with it). Whether the group takes another client
/// now (false: its accept task pauses, [`accept_loop`]).
pub(crate) fn dispatch(
    server: &Arc<ServerState>,
    key: SocketAddr,
    stream: TcpStream,
    peer: SocketAddr,
    replay: Replay,
) -> bool {
    let client = Client {
        stream,
        peer,
        replay,
    };
    place(server, key, client, false)
}

/// [`dispatch`]; `again`: counted as dispatched again (once, however many
/// members it tries). A relayed client's relay starts once the tables'
/// lock is released. Whether the group takes another client now.
fn place(server: &Arc<ServerState>, key: SocketAddr, client: Client, again: bool) -> bool {
    let (relay, admits) = {
        let mut st = server.lock();
        let (relay, queued) = place_locked(server, &mut st, key, client, again);
        // Only a client that found no member asks more of the tables.
        let admits = match queued {
            Queued::No => true,
            Queued::Yes | Queued::Refused => {
                server.waiting.store(true, Ordering::Release);
                let Tables { nodes, groups, .. } = &mut *st;
                groups.admits(key, |m| held(nodes, m))
            }
        };
        (relay, admits)
    };
    if let Some(relay) = relay {
        relay.spawn(server);
    }
    admits
}

/// Whether [`place_locked`] queued its client.
enum Queued {
    /// Given to a member (or closed with its group).
    No,
    /// Waiting in the group's queue.
    Yes,
    /// The queue was full: closed.
    Refused,
}

/// [`place`] under the tables' lock: the client is handed over or queued,
/// or recorded as relayed (the relay to run is returned).
fn place_locked(
    server: &Arc<ServerState>,
    st: &mut Tables,
    key: SocketAddr,
    mut client: Client,
    mut again: bool,
) -> (Option<Relay>, Queued) {
    let peer = client.peer;
    // A client of the smoltcp stack is one end of a socketpair: no
    // hand-off (a program would get an AF_UNIX socket), no TCP option.
    let on_stack = server.stack.is_some();
    // The group's address is the client's destination unless it is a
    // wildcard one (never on the stack: its groups are on the address).
    let local = if key.ip().is_unspecified() && !on_stack {
        match client.stream.local_addr() {
            Ok(a) => a,
            Err(_) => return (None, Queued::No),
        }
    } else {
        key
    };
    let now = Instant::now();
    loop {
        let placed = {
            let nodes = &st.nodes;
            let pending = |node, conn| in_flight(nodes, node, conn);
            let held = |m| held(nodes, m);
            match std::mem::take(&mut again) {
                true => st
                    .groups
                    .redispatch(key, client, peer.ip(), now, pending, held),
                false => st
                    .groups
                    .dispatch(key, client, peer.ip(), now, pending, held),
            }
        };
        let member = match placed {
            Placement::Member(member, back) => {
                client = back;
                member
            }
            Placement::Queued { expire } => {
                tracing::debug!(%key, %peer, "no eligible member: client queued");
                if expire {
                    expire_later(server, key, now + st.groups.limits().queue_timeout);
                }
                return (None, Queued::Yes);
            }
            Placement::QueueFull(_) => {
                tracing::warn!(%key, %peer, "group queue full: client closed");
                return (None, Queued::Refused);
            }
            Placement::NoGroup(_) => return (None, Queued::No),
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
        // where the node says so and has room (a member picked has, unless
        // it became one since, `Held::node_full`), and counted against its
        // backlog meanwhile.
        let track = node.notifies_accepts && !held(&st.nodes, member).node_full;
        let waits = node.listeners.get(&listener);
        let (relayed, handed) = match waits {
            Some(w) if track => (Some(w.relayed.clone()), Some(w.handed.clone())),
            _ => (None, None),
        };
        let ep = node.ep.clone();
        if client.replay.is_empty() && !on_stack {
            if let Some(tx) = node.handoff.clone().filter(|t| t.is_open()) {
                if !ep.is_open() {
                    // Its channel ended; it is on its way out.
                    close_orphans_later(server, st.unbind(node_id, None));
                    continue;
                }
                let place = handed.as_ref().map(|w| w.take());
                // In flight until the daemon's hand-off task takes it
                // (`handoff.rs`; an embedded node's is its own).
                let counted = node.handoff_socket.is_some();
                if counted {
                    server.in_flight.enter();
                }
                match hand_off(st, &tx, at, node_id, place, client.stream, local) {
                    Ok(()) => return (None, Queued::No),
                    // The node's hand-off just stopped: relayed instead.
                    Err(back) => {
                        if counted {
                            server.in_flight.end();
                        }
                        client.stream = back;
                    }
                }
            }
        }
        // The relay writes what the node sends as soon as it comes; a socket
        // handed off above keeps the options the program gave its listener.
        if !on_stack {
            let _ = client.stream.set_nodelay(true);
        }
        let replay = &client.replay;
        match ep.accept_connection_with(listener, peer, local, replay, track, relayed.as_ref()) {
            Ok(conn) => {
                let stream = match tokio::net::TcpStream::from_std(client.stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot relay the connection");
                        ep.close_connection(conn, libc::ECONNABORTED);
                        return (None, Queued::No);
                    }
                };
                tracing::debug!(%key, %peer, node = node_id, conn, track, "client dispatched");
                let relayed = Relayed::Client {
                    at,
                    back: give_back,
                };
                return (
                    Relay::record(st, node_id, relayed, conn, stream),
                    Queued::No,
                );
            }
            // The node's channel closed; its removal is on the way.
            Err(_) => close_orphans_later(server, st.unbind(node_id, None)),
        }
    }
}

/// Zero-relay: gives the accepted socket itself to a same-host node.
/// `place` (its member's, counted until its program accepts it): keep the
/// io-server's descriptor of it (the hand-off task does, once sent) until
/// the node says its program accepted it, to give it to another member if
/// the node leaves first. The socket back when the node's hand-off has
/// stopped.
fn hand_off(
    st: &mut Tables,
    tx: &saps_fabric::handoff::HandoffSender,
    at: Dispatched,
    node_id: NodeId,
    place: Option<saps_fabric::endpoint::Place>,
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
    let track = place.is_some();
    let conn = match track.then(|| node.ep.hand_connection()) {
        Some(Ok(conn)) => {
            lock_handed(&node.handed).sending(conn, key, peer, place);
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

/// Dispatches queued clients of `key` while a member is eligible (at most
/// `--max-queue`, the most it holds), then wakes its accept task if it was
/// paused and admits again.
pub(crate) fn drain_queue(server: &Arc<ServerState>, key: SocketAddr) {
    let max = server.lock().groups.limits().max_queue;
    for _ in 0..max {
        let next = {
            let mut st = server.lock();
            let Tables { nodes, groups, .. } = &mut *st;
            groups.next_queued(key, |m| held(nodes, m))
        };
        match next {
            Some(client) => {
                place(server, key, client, false);
            }
            None => break,
        }
    }
    let resume = {
        let mut st = server.lock();
        let Tables {
            nodes,
            groups,
            ports,
            ..
        } = &mut *st;
        match groups.resume(key, |m| held(nodes, m)) {
            true => ports.resume(key),
            false => None,
        }
    };
    if let Some(resume) = resume {
        resume.notify_one();
    }
}

/// Lets waiting clients in whenever a place is given back
/// (`ServerState::freed`: a program accepted, a connection ended, a
/// weight or a membership changed): the queues of the groups that wait,
/// and the accept tasks of those paused. Wake-ups that come while it
/// works are one more round, not one each.
pub(crate) async fn admission_task(server: Arc<ServerState>) {
    let mut stop = server.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = server.freed.notified() => {}
        }
        // Nothing waits (no group queues or is paused): nothing to do, and
        // the tables' lock is not taken.
        if !server.waiting.load(Ordering::Acquire) {
            continue;
        }
        let waiting = {
            let st = server.lock();
            let keys = st.groups.waiting();
            if keys.is_empty() {
                server.waiting.store(false, Ordering::Release);
            }
            keys
        };
        for key in waiting {
            drain_queue(&server, key);
        }
    }
}

/// Closes the clients of group `key` that waited in its queue past the
/// queue timeout, from `first` (the oldest's deadline) on, until the
/// queue is empty; each batch is logged once and counted.
pub(crate) fn expire_later(server: &Arc<ServerState>, key: SocketAddr, first: Instant) {
    let server = server.clone();
    tokio::spawn(async move {
        let mut at = first;
        loop {
            tokio::time::sleep_until(at.into()).await;
            let (expired, next) = server.lock().groups.expire(key, Instant::now());
            if !expired.is_empty() {
                let timeout = server.config.queue_timeout;
                tracing::warn!(%key, clients = expired.len(), timeout_s = timeout, "admission: clients waited in the queue past --queue-timeout: closed");
                drop(expired);
                // The queue has room again: a paused group may accept.
                server.freed.notify_one();
            }
            match next {
                Some(t) => at = t,
                None => return,
            }
        }
    });
}
