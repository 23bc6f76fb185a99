//! Where a connection from the io-server waits until the program accepts
//! it: the other half of `accept.rs`.
//!
//! Each listener has a ready queue. A relayed connection
//! (`ConnectionAccepted`) gets a socket pair: the relay runs on one end at
//! once, the other waits in the queue for the program. A handed-over one
//! (zero-relay) waits as the TCP socket itself. Markers, bytes sent on `M`
//! (the supervisor's end of the socket pair whose other end is the
//! listener's `L`), keep `L` readable while the queue is not empty: one for
//! a short queue, one more for every [`MARKER_STEP`] connections queued
//! (up to [`MAX_MARKERS`]), so a burst of clients costs a few markers, not
//! one each, and still wakes more than one process.
//!
//! For a listener the program has closed (close is not trapped), a
//! connection goes to the listener now serving the same address, or waits
//! [`RELISTEN_GRACE`] for one. A connection for a listener not known yet
//! waits as long for it: a same-host io-server's hand-off socket can
//! deliver a client before the fabric brings the Listen response that
//! makes the listener.

use super::connect::{pair, spawn_relay};
use super::{lock, Arrival, Shared};
use nix::sys::socket as so;
use saps_fabric::{ConnId, RELISTEN_GRACE};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

/// `ConnectionAccepted(listener, conn, peer, local)` from the io-server.
pub(crate) fn deliver(
    sh: &Arc<Shared>,
    listener: ConnId,
    conn: ConnId,
    peer: SocketAddr,
    local: SocketAddr,
) {
    lock(&sh.arrivals).insert(conn, Arrival { peer, local });
    place(sh, listener, conn, Kind::Relayed);
}

/// Zero-relay: a TCP socket handed over by a same-host io-server. It waits
/// in the listener's queue like a relayed connection; the accept installs
/// the TCP socket itself.
pub(crate) fn deliver_handoff(sh: &Arc<Shared>, h: saps_fabric::handoff::HandedOff) {
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
    lock(&sh.arrivals).insert(
        id,
        Arrival {
            peer: h.peer,
            local: h.local,
        },
    );
    lock(&sh.waiting).insert(id, (h.socket, Kind::Handed));
    place(sh, h.listener, id, Kind::Handed);
}

/// How a connection waiting for the program's accept reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Relayed over the fabric: the program gets one end of a socket pair
    /// whose other end the relay holds.
    Relayed,
    /// Zero-relay: the program gets the handed-over TCP socket itself.
    Handed,
}

/// A connection waiting (up to [`RELISTEN_GRACE`]) for its listener.
#[derive(Debug)]
pub(crate) struct Orphan {
    pub awaits: Awaits,
    pub id: ConnId,
    pub kind: Kind,
}

/// What an [`Orphan`] waits for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Awaits {
    /// The program closed the listener: a new one on this address.
    Address(SocketAddr),
    /// The io-server sent it to this listener before its Listen response
    /// reached the supervisor.
    Listener(ConnId),
}

impl Orphan {
    /// Whether listener `conn` on `addr` is the one this connection awaits.
    fn served_by(&self, conn: ConnId, addr: SocketAddr) -> bool {
        match self.awaits {
            Awaits::Address(a) => a == addr,
            Awaits::Listener(c) => c == conn,
        }
    }
}

/// Listeners the program closed kept in `retired`, for connections the
/// io-server sent before it learnt of the close.
const RETIRED_KEPT: usize = 256;

/// Where a connection for a listener goes.
enum Route {
    /// This listener (its tag and `L`).
    To(ConnId, super::Listener),
    /// The listener was closed and none listens on its address now.
    Wait(SocketAddr),
    /// Not a listener of this node.
    Unknown,
}

fn route(sh: &Shared, listener: ConnId) -> Route {
    let listeners = lock(&sh.listeners);
    if let Some(l) = listeners.get(&listener) {
        return Route::To(listener, l.clone());
    }
    let Some(addr) = lock(&sh.retired)
        .iter()
        .find(|(c, _)| *c == listener)
        .map(|&(_, a)| a)
    else {
        return Route::Unknown;
    };
    // The program listens on that address again: its new listener takes it.
    match listeners.iter().find(|(_, l)| l.addr == addr) {
        Some((&c, l)) => Route::To(c, l.clone()),
        None => Route::Wait(addr),
    }
}

/// Queues connection `id` for `listener` (or for whichever listener now
/// serves its address), in a task. A relayed connection gets its socket
/// pair and its relay the first time it is queued.
pub(crate) fn place(sh: &Arc<Shared>, listener: ConnId, id: ConnId, kind: Kind) {
    let sh2 = sh.clone();
    sh.rt.spawn(async move {
        let (lconn, l) = match route(&sh2, listener) {
            Route::To(c, l) => (c, l),
            Route::Wait(addr) => {
                let awaits = Awaits::Address(addr);
                return park(&sh2, Orphan { awaits, id, kind });
            }
            Route::Unknown => {
                let awaits = Awaits::Listener(listener);
                return park(&sh2, Orphan { awaits, id, kind });
            }
        };
        if kind == Kind::Relayed && !lock(&sh2.waiting).contains_key(&id) {
            // The program's end waits non-blocking, as the io-server's
            // sockets do; a blocking accept clears that (`accept.rs`).
            match pair(true) {
                Ok((program_end, relay_end)) => {
                    lock(&sh2.waiting).insert(id, (program_end, Kind::Relayed));
                    spawn_relay(&sh2, id, relay_end);
                }
                Err(e) => {
                    tracing::warn!(
                        listener,
                        errno = e,
                        "cannot make the connection's socket pair"
                    );
                    return give_up(&sh2, id, kind);
                }
            }
        }
        enqueue(&sh2, lconn, &l, id);
    });
}

/// A queue this long gets one more marker on `L`.
const MARKER_STEP: usize = 4;
/// Markers on one `L` at most: a wake-up for each of that many processes
/// asleep on it (a program's acceptors are about as many as its cores).
const MAX_MARKERS: usize = 4;

/// How many markers `queued` connections keep on `L`.
fn markers_for(queued: usize) -> usize {
    queued.div_ceil(MARKER_STEP).min(MAX_MARKERS)
}

/// The connections waiting for the program's accept on one listener, and
/// their markers: bytes on `L` while any wait, never more
/// than the connections queued, so `L` polls readable exactly then. A
/// burst of clients costs a few markers, not one each; accepts take
/// markers off as the queue shrinks below their number.
///
/// Processes that share `L` with `EPOLLEXCLUSIVE` (nginx's workers) get
/// one wake-up per marker, not per connection: with a single marker, a
/// process asleep when a burst arrived slept until the queue emptied while
/// another accepted the whole burst (50 or more of wrk's 50 connections
/// to one nginx worker in five runs of six). A marker per [`MARKER_STEP`] queued wakes
/// up to [`MAX_MARKERS`] of them for a burst and none for a lone client.
/// Renewing one marker on every accept instead woke the sleepers too, but
/// made bursts slower to accept (bench/notes/2026-12-01-sessions-5-to-8.md, "The accept burst").
#[derive(Default)]
pub(crate) struct Ready {
    /// Tags (keys of `waiting`), oldest first.
    queue: VecDeque<ConnId>,
    /// Markers pending on `L`.
    on_l: usize,
}

impl Ready {
    /// Puts the markers the queue calls for on `L`, under the queue's lock:
    /// so an accept never sees a queued connection whose marker is still
    /// on its way (it could not take that marker off again, and `L` would
    /// poll readable with nothing to accept, which a program that selects
    /// and then blocks in `accept` would not survive). With one on `L`
    /// already, `L` polls readable anyway and the rest are not retried.
    /// The first always has room: with no marker on `L`, `M` has nothing
    /// unread, and at most [`MAX_MARKERS`] bytes ever are. `Err`: `L` is
    /// closed (`ECONNREFUSED`) or `M` failed.
    fn fill(&mut self, m: BorrowedFd<'_>) -> Result<(), i32> {
        while self.on_l < markers_for(self.queue.len()) {
            match put_marker(m) {
                Ok(()) => self.on_l += 1,
                Err(_) if self.on_l > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Queues a connection on listener `lconn` and puts its marker on `L`.
fn enqueue(sh: &Arc<Shared>, lconn: ConnId, l: &super::Listener, id: ConnId) {
    if let Err(e) = add_to_queue(sh, lconn, l.marker.as_fd(), |q| q.push_back(id)) {
        marker_failed(sh, lconn, l, e);
    }
}

/// Changes `lconn`'s queue with `add`, then [`Ready::fill`]s its marker.
fn add_to_queue(
    sh: &Shared,
    lconn: ConnId,
    m: BorrowedFd<'_>,
    add: impl FnOnce(&mut VecDeque<ConnId>),
) -> Result<(), i32> {
    let mut ready = lock(&sh.ready);
    let r = ready.entry(lconn).or_default();
    add(&mut r.queue);
    r.fill(m)
}

/// The marker could not reach `L`: a closed `L` sends its queue where the
/// address is served now (or to wait for that); otherwise it is refused.
fn marker_failed(sh: &Arc<Shared>, lconn: ConnId, l: &super::Listener, e: i32) {
    let queued = lock(&sh.ready).remove(&lconn).map(|r| r.queue);
    let queued = queued.unwrap_or_default();
    if e == libc::ECONNREFUSED {
        sh.reap_listeners(Some(l.addr.port()));
        if !lock(&sh.listeners).contains_key(&lconn) {
            for id in queued {
                place(sh, lconn, id, kind_of(sh, id));
            }
            return;
        }
    }
    tracing::warn!(
        listener = lconn,
        errno = e,
        "cannot hand connections to the program"
    );
    for id in queued {
        give_up(sh, id, kind_of(sh, id));
    }
}

/// Puts back markers the program took off `L` itself (it read from its
/// listener, which no server does, but nothing stops it): `L` would
/// otherwise not poll readable while connections wait, and an
/// epoll-driven program would never accept them. Run by the listener
/// sweep; `M` has nothing unread by `L` exactly when no marker is on it.
pub(crate) fn repair_markers(sh: &Shared) {
    let listeners: Vec<(ConnId, Arc<std::os::fd::OwnedFd>)> = lock(&sh.listeners)
        .iter()
        .map(|(&c, l)| (c, l.marker.clone()))
        .collect();
    let mut ready = lock(&sh.ready);
    for (lconn, m) in listeners {
        let Some(r) = ready.get_mut(&lconn) else {
            continue;
        };
        if r.on_l == 0 || crate::sys::unread_by_peer(m.as_fd()).map_or(true, |n| n > 0) {
            continue;
        }
        tracing::warn!(
            listener = lconn,
            queued = r.queue.len(),
            "the program read its listener's markers; putting them back"
        );
        r.on_l = 0;
        if let Err(e) = r.fill(m.as_fd()) {
            tracing::debug!(listener = lconn, errno = e, "markers not put back");
        }
    }
}

/// How a queued connection reaches the program (relayed if it is gone).
fn kind_of(sh: &Shared, id: ConnId) -> Kind {
    lock(&sh.waiting).get(&id).map_or(Kind::Relayed, |w| w.1)
}

/// The next connection queued for listener `lconn` (the program's `L` is
/// `l`); markers are taken off `L` as the queue shrinks below their
/// number, the last with the last connection. `None`: nothing
/// waits, and stale markers found on `L` are taken off (a spurious
/// wake-up). Under the queue's lock, so no marker connected meanwhile is
/// taken for a stale one.
pub(crate) fn next_queued(
    sh: &Shared,
    lconn: ConnId,
    l: BorrowedFd<'_>,
) -> Result<Option<ConnId>, i32> {
    let mut ready = lock(&sh.ready);
    let r = ready.entry(lconn).or_default();
    // A socket closed under it (rejoin) is skipped.
    let next =
        std::iter::from_fn(|| r.queue.pop_front()).find(|id| lock(&sh.waiting).contains_key(id));
    if next.is_none() {
        while take_one(l)? {}
        r.on_l = 0;
    }
    while r.on_l > r.queue.len() {
        r.on_l -= 1;
        if !take_one(l)? {
            // None left on `L` to take.
            r.on_l = 0;
        }
    }
    Ok(next)
}

/// Takes one marker off `l` (the program's `L`): `false` once `L` is
/// empty. Only under the ready queues' lock, which keeps a queue's count
/// of markers equal to what is on `L`. Only the supervisor's `M` writes
/// to `L` (the pair has no name to connect to); a program that reads `L`
/// itself is caught up with by [`repair_markers`].
fn take_one(l: BorrowedFd<'_>) -> Result<bool, i32> {
    let mut byte = [0u8; 1];
    loop {
        match so::recv(l.as_raw_fd(), &mut byte, so::MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(n == 1),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(e as i32),
        }
    }
}

/// A queued connection whose delivery failed goes back to the front.
pub(crate) fn requeue(sh: &Arc<Shared>, lconn: ConnId, id: ConnId) {
    let Some(l) = lock(&sh.listeners).get(&lconn).cloned() else {
        return give_up(sh, id, kind_of(sh, id));
    };
    if let Err(e) = add_to_queue(sh, lconn, l.marker.as_fd(), |q| q.push_front(id)) {
        marker_failed(sh, lconn, &l, e);
    }
}

/// Closes a listener's queue (the program closed `L`): like the kernel
/// with its accept queue, the connections waiting in it are reset. Those
/// the io-server sends to the closed listener afterwards, before it learns
/// of the close, wait for a new listener on its address instead (`route`).
pub(crate) fn orphan_queue(sh: &Arc<Shared>, lconn: ConnId) {
    let queued = lock(&sh.ready).remove(&lconn).map(|r| r.queue);
    for id in queued.unwrap_or_default() {
        tracing::debug!(
            listener = lconn,
            id,
            "listener closed: resetting a queued connection"
        );
        give_up(sh, id, kind_of(sh, id));
    }
}

/// Forgets every queue (the node joined the io-server again). Their
/// sockets are closed; nothing is said on the new channel, where the old
/// channel's tags mean nothing (its relays end with the old channel).
pub(crate) fn clear_queues(sh: &Shared) {
    let queues: Vec<Ready> = lock(&sh.ready).drain().map(|(_, r)| r).collect();
    // Relayed connections waiting for a listener go too; a handed-over
    // one is a real socket, whose id is the supervisor's own: it may
    // still find its listener (their timers expire the rest).
    let orphans: Vec<ConnId> = {
        let mut o = lock(&sh.orphans);
        let (relayed, kept) = std::mem::take(&mut *o)
            .into_iter()
            .partition(|x| x.kind == Kind::Relayed);
        *o = kept;
        relayed.into_iter().map(|x: Orphan| x.id).collect()
    };
    for id in queues.into_iter().flat_map(|r| r.queue).chain(orphans) {
        lock(&sh.arrivals).remove(&id);
        drop(lock(&sh.waiting).remove(&id));
    }
}

/// Refuses a connection nobody will accept: the client sees a reset.
fn give_up(sh: &Shared, id: ConnId, kind: Kind) {
    lock(&sh.arrivals).remove(&id);
    let waiting = lock(&sh.waiting).remove(&id);
    if let Some((sock, Kind::Handed)) = &waiting {
        // A handed-over TCP socket closed with SO_LINGER 0 sends RST.
        let rst = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = so::setsockopt(sock, so::sockopt::Linger, &rst);
    }
    // Dropping the socket closes it.
    drop(waiting);
    if kind == Kind::Relayed {
        sh.ep().close_connection(id, libc::ECONNREFUSED);
    } else {
        // The io-server keeps its own copy until told (issue 17).
        sh.ep().close_handed(id);
    }
}

/// Keeps a connection for the listener it awaits, for [`RELISTEN_GRACE`].
fn park(sh: &Arc<Shared>, orphan: Orphan) {
    let (id, kind, awaits) = (orphan.id, orphan.kind, orphan.awaits);
    {
        // Under the orphans' lock: a listener installed after this look
        // adopts the orphan (`adopt_orphans` takes the lock after it is
        // in `listeners`), one installed before is found here.
        let mut orphans = lock(&sh.orphans);
        let now = lock(&sh.listeners)
            .iter()
            .find(|(&c, l)| orphan.served_by(c, l.addr))
            .map(|(&c, _)| c);
        if let Some(listener) = now {
            drop(orphans);
            return place(sh, listener, id, kind);
        }
        match awaits {
            Awaits::Address(addr) => {
                tracing::debug!(%addr, id, "connection waits for a listener on its address");
            }
            Awaits::Listener(listener) => {
                tracing::debug!(listener, id, "connection waits for its listener to be made");
            }
        }
        orphans.push(orphan);
    }
    let sh2 = sh.clone();
    sh.rt.spawn(async move {
        tokio::time::sleep(RELISTEN_GRACE).await;
        let expired = {
            let mut o = lock(&sh2.orphans);
            let before = o.len();
            o.retain(|x| x.id != id);
            o.len() != before
        };
        if expired {
            match awaits {
                Awaits::Listener(listener) => {
                    tracing::warn!(listener, "connection for an unknown listener; closing it");
                }
                Awaits::Address(_) => {
                    tracing::debug!(id, "no listener came back; closing the connection");
                }
            }
            give_up(&sh2, id, kind);
        }
    });
}

/// The program listens on `addr` again (as `listener`): connections kept
/// for that address go to it.
pub(crate) fn adopt_orphans(sh: &Arc<Shared>, listener: ConnId, addr: SocketAddr) {
    let adopted: Vec<Orphan> = {
        let mut o = lock(&sh.orphans);
        let (mine, rest) = std::mem::take(&mut *o)
            .into_iter()
            .partition(|x| x.served_by(listener, addr));
        *o = rest;
        mine
    };
    for x in adopted {
        place(sh, listener, x.id, x.kind);
    }
}

/// Remembers a closed listener's address (bounded).
pub(crate) fn retire(sh: &Shared, listener: ConnId, addr: SocketAddr) {
    let mut r = lock(&sh.retired);
    if r.len() >= RETIRED_KEPT {
        r.pop_front();
    }
    r.push_back((listener, addr));
}

/// One marker, a byte sent on `M` that makes `L` readable until an accept
/// takes it off (`take_one`). `ECONNREFUSED`: the program has closed `L`.
fn put_marker(m: BorrowedFd<'_>) -> Result<(), i32> {
    let flags = so::MsgFlags::MSG_DONTWAIT | so::MsgFlags::MSG_NOSIGNAL;
    loop {
        match so::send(m.as_raw_fd(), b"m", flags) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                return Err(libc::ECONNREFUSED)
            }
            Err(e) => return Err(e as i32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Listener;
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn readable(fd: BorrowedFd<'_>) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut pfd, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn l_is_readable_exactly_while_markers_are_on_it_and_m_sees_it_closed() {
        let (l, m) = pair(true).unwrap();
        let listener = Listener {
            marker: Arc::new(m),
            addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80)),
            flags: 0,
            backlog: 128,
        };
        assert!(!readable(l.as_fd()), "no marker yet");
        put_marker(listener.marker.as_fd()).unwrap();
        put_marker(listener.marker.as_fd()).unwrap();
        assert!(readable(l.as_fd()));
        assert!(take_one(l.as_fd()).unwrap());
        assert!(readable(l.as_fd()), "one marker left");
        assert!(take_one(l.as_fd()).unwrap());
        assert!(!take_one(l.as_fd()).unwrap(), "both taken");
        assert!(!readable(l.as_fd()));
        assert!(listener.alive());
        drop(l);
        assert!(!listener.alive(), "the program closed L");
        assert_eq!(put_marker(listener.marker.as_fd()), Err(libc::ECONNREFUSED));
    }
}
