//! Where a connection from the io-server goes until the program accepts
//! it: the driver of the listener table (`listeners.rs`), the other half
//! of `accept.rs`.
//!
//! The table decides where a connection waits; this file does what its
//! answers ask, outside its lock: making a relayed connection's socket
//! pair and starting its relay, refusing a connection nobody will accept
//! (a reset for the client), closing a listener the program closed at the
//! io-server, and refusing connections that waited [`RELISTEN_GRACE`] for
//! a listener in vain.
//!
//! Out of descriptors (`EMFILE`/`ENFILE` making a socket pair), a relayed
//! connection is neither refused nor lost: it waits short of descriptors
//! and is placed again as soon as some free up ([`descriptors_freed`],
//! called after each accept and each relay's end, and every
//! [`SHORT_RETRY`] while any waits). Meanwhile the io-server counts it
//! against the listener's backlog, so it sends the node no more than the
//! program's backlog (docs/interceptor.md, "Out of descriptors").

use super::listeners::{Arrival, Awaits, Kind, Listener, MarkerFailure, Placement, Refused, Taken};
use super::objects::pair;
use super::relay::spawn_relay;
use super::state::SupervisorState;
use nix::sys::socket as so;
use saps_fabric::{ConnId, RELISTEN_GRACE};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often connections short of descriptors are tried again when no
/// accept or relay's end has freed any meanwhile (the program may close
/// other files).
pub(crate) const SHORT_RETRY: Duration = Duration::from_millis(100);

/// `ConnectionAccepted(listener, conn, peer, local)` from the io-server.
pub(crate) fn deliver(
    sh: &Arc<SupervisorState>,
    listener: ConnId,
    conn: ConnId,
    peer: SocketAddr,
    local: SocketAddr,
) {
    sh.listeners.arrive(conn, Arrival { peer, local }, None);
    place(sh, listener, conn, Kind::Relayed);
}

/// Zero-relay: a TCP socket handed over by a same-host io-server. It waits
/// in the listener's queue like a relayed connection; the accept installs
/// the TCP socket itself.
pub(crate) fn deliver_handoff(sh: &Arc<SupervisorState>, h: saps_fabric::handoff::HandedOff) {
    use std::sync::atomic::Ordering;
    let id = sh.next_handed.fetch_add(1, Ordering::Relaxed);
    // One the io-server keeps a copy of for a channel that has ended is
    // going to another node (issue 17): this copy is closed.
    if !sh.ep().handed(id, h.conn, h.node) {
        tracing::debug!(
            listener = h.listener,
            "hand-off of an ended channel; closed"
        );
        return;
    }
    let arrival = Arrival {
        peer: h.peer,
        local: h.local,
    };
    sh.listeners
        .arrive(id, arrival, Some((h.socket, Kind::Handed)));
    place(sh, h.listener, id, Kind::Handed);
}

/// Queues connection `id` for `listener` (or for whichever listener now
/// serves its address), in a task.
pub(crate) fn place(sh: &Arc<SupervisorState>, listener: ConnId, id: ConnId, kind: Kind) {
    let sh2 = sh.clone();
    sh.rt.spawn(async move {
        let placed = sh2.listeners.place(listener, id, kind, Instant::now());
        settle(&sh2, id, kind, placed);
    });
}

/// Does what placing connection `id` asks for.
fn settle(sh: &Arc<SupervisorState>, id: ConnId, kind: Kind, mut placed: Placement) {
    loop {
        match placed {
            Placement::Queued => return,
            Placement::NeedsSocket(lconn) => {
                // The program's end waits non-blocking, as the io-server's
                // sockets do; a blocking accept clears that (`accept.rs`).
                match pair(true) {
                    Ok((program_end, relay_end)) => {
                        sh.listeners.attach(id, program_end);
                        spawn_relay(sh, id, relay_end, descriptors_freed);
                    }
                    Err(e) if e == libc::EMFILE || e == libc::ENFILE => {
                        return short_of_descriptors(sh, lconn, id, e);
                    }
                    Err(e) => {
                        tracing::warn!(
                            listener = lconn,
                            errno = e,
                            "cannot make the connection's socket pair"
                        );
                        return give_up(sh, sh.listeners.refuse(id, Some(kind)));
                    }
                }
                placed = sh.listeners.place(lconn, id, kind, Instant::now());
            }
            Placement::Parked(awaits) => {
                match awaits {
                    Awaits::Address(addr) => {
                        tracing::debug!(%addr, id, "connection waits for a listener on its address");
                    }
                    Awaits::Listener(listener) => {
                        tracing::debug!(
                            listener,
                            id,
                            "connection waits for its listener to be made"
                        );
                    }
                }
                return expire_later(sh);
            }
            Placement::MarkerFailed(f) => return marker_failed(sh, f),
            Placement::Refused(r) => return give_up(sh, r),
        }
    }
}

/// Relayed connection `id` waits for descriptors to make its socket pair;
/// a task tries again every [`SHORT_RETRY`] while any waits. Logged when
/// the node first runs short, not once per connection.
fn short_of_descriptors(sh: &Arc<SupervisorState>, lconn: ConnId, id: ConnId, errno: i32) {
    sh.listeners.short_of_descriptors(lconn, id);
    if !sh.listeners.arm_retry() {
        return; // a task tries already
    }
    tracing::warn!(
        listener = lconn,
        errno,
        "out of descriptors: new connections wait until the program accepts or closes some"
    );
    let sh2 = sh.clone();
    sh.rt.spawn(async move {
        loop {
            tokio::time::sleep(SHORT_RETRY).await;
            descriptors_freed(&sh2);
            if sh2.listeners.is_short() {
                continue;
            }
            sh2.listeners.disarm_retry();
            // One that came short just now, after the check, finds the
            // task gone: it stays, or arms another.
            if !(sh2.listeners.is_short() && sh2.listeners.arm_retry()) {
                return;
            }
        }
    });
}

/// Descriptors may have freed up (the program accepted a connection, a
/// relay ended): the connections waiting for them are placed again, in
/// order, until one still finds none. One atomic load when none waits.
pub(crate) fn descriptors_freed(sh: &Arc<SupervisorState>) {
    // The supervisor's own reserve first: calls must be served.
    sh.reserve.refill();
    let mut short = sh.listeners.take_short().into_iter();
    for (lconn, id) in short.by_ref() {
        let placed = sh.listeners.place(lconn, id, Kind::Relayed, Instant::now());
        settle(sh, id, Kind::Relayed, placed);
        if sh.listeners.is_short() {
            break;
        }
    }
    for (lconn, id) in short {
        sh.listeners.short_of_descriptors(lconn, id);
    }
}

/// After [`RELISTEN_GRACE`], refuses the connections that waited for a
/// listener in vain.
fn expire_later(sh: &Arc<SupervisorState>) {
    let sh2 = sh.clone();
    sh.rt.spawn(async move {
        tokio::time::sleep(RELISTEN_GRACE).await;
        for (awaits, r) in sh2.listeners.expire(Instant::now()) {
            match awaits {
                Awaits::Listener(listener) => {
                    tracing::warn!(listener, "connection for an unknown listener; closing it");
                }
                Awaits::Address(_) => {
                    tracing::debug!(id = r.id, "no listener came back; closing the connection");
                }
            }
            give_up(&sh2, r);
        }
    });
}

/// The marker could not reach `L`: a closed `L` sends its queue where the
/// address is served now (or to wait for that); otherwise it is refused.
fn marker_failed(sh: &Arc<SupervisorState>, f: MarkerFailure) {
    if f.errno == libc::ECONNREFUSED {
        reap_listeners(sh, Some(f.addr.port()));
        if !sh.listeners.is_listening(f.listener) {
            for id in f.queued {
                let kind = sh.listeners.kind_of(id);
                place(sh, f.listener, id, kind);
            }
            return;
        }
    }
    tracing::warn!(
        listener = f.listener,
        errno = f.errno,
        "cannot hand connections to the program"
    );
    for id in f.queued {
        give_up(sh, sh.listeners.refuse(id, None));
    }
}

/// A taken connection whose delivery failed goes back to the front of
/// listener `lconn`'s queue.
pub(crate) fn requeue(sh: &Arc<SupervisorState>, lconn: ConnId, taken: Taken) {
    let (id, kind) = (taken.id, taken.kind);
    let placed = sh.listeners.requeue(lconn, taken);
    settle(sh, id, kind, placed);
}

/// Forgets the listeners (of `port`, or all) whose `L` the program has
/// closed, and tells the io-server, so the port can be bound again and no
/// client is handed to a listener that is gone. Like the kernel with its
/// accept queue, the connections waiting in a closed listener's queue are
/// reset; those the io-server sends it afterwards, before it learns of the
/// close, wait for a new listener on its address.
pub(crate) fn reap_listeners(sh: &SupervisorState, port: Option<u16>) {
    let reaped = sh.listeners.reap(port);
    for r in reaped.refused {
        tracing::debug!(id = r.id, "listener closed: resetting a queued connection");
        give_up(sh, r);
    }
    for conn in reaped.closed {
        tracing::debug!(conn, "the program closed a listener");
        sh.table().remove_conn(conn);
        sh.ep().close_connection(conn, 0);
    }
}

/// The program listens as `conn`: connections kept for it (or for its
/// address) go to it.
pub(crate) fn listening(sh: &Arc<SupervisorState>, conn: ConnId, l: Listener) {
    for (id, kind) in sh.listeners.listen(conn, l) {
        place(sh, conn, id, kind);
    }
}

/// Refuses a connection nobody will accept: the client sees a reset.
fn give_up(sh: &SupervisorState, r: Refused) {
    if let (Some(sock), Kind::Handed) = (&r.socket, r.kind) {
        // A handed-over TCP socket closed with SO_LINGER 0 sends RST.
        let rst = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = so::setsockopt(sock, so::sockopt::Linger, &rst);
    }
    if r.kind == Kind::Relayed {
        // Reset first: closing the program's end first would let its
        // relay read end of file and send a FIN ahead of the reset (the
        // client would then read end of file, not ECONNRESET).
        sh.ep().close_connection(r.id, libc::ECONNREFUSED);
        drop(r.socket);
    } else {
        // Dropping the socket closes it.
        drop(r.socket);
        // The io-server keeps its own copy until told (issue 17).
        sh.ep().close_handed(r.id);
    }
}
