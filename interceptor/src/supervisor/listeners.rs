//! The listener table: every virtual listener of the node and the
//! connections delivered to it that the program has not accepted yet, in
//! one type under one lock ([`ListenerTable`]).
//!
//! A listener is [`ListenerState::Listening`] (its `L` is in the program,
//! with a ready queue) or [`ListenerState::Retired`] (the program closed
//! `L`; kept, bounded, so that a connection the io-server sends it before
//! it learns of the close waits [`RELISTEN_GRACE`] for a new listener on
//! the same address). Listeners the program still holds but that are not
//! served (listening again after a rejoin failed) are dormant: they have no
//! tag on the current channel, and only their `M` is kept, until `L` is
//! closed, since `L` would poll readable (hang-up) for good once `M` was.
//!
//! A relayed connection (`ConnectionAccepted`) waits as the program's end
//! of a socket pair whose other end the relay holds; a handed-over one
//! (zero-relay) as the TCP socket itself. The table stores those fds; it
//! makes no socket and starts no relay: its methods say what the caller
//! must do next ([`Placement`], [`Refused`]), and the caller does it after
//! the lock is released. The only I/O under the lock is on the markers
//! (`markers.rs`), whose count must match the queue's at every moment.
//!
//! A relayed connection whose socket pair could not be made for want of
//! descriptors (`EMFILE`, `ENFILE`) waits *short* of them
//! ([`ListenerTable::short_of_descriptors`]), without a socket, until
//! descriptors free up (docs/interceptor.md, "Out of descriptors").
//!
//! Markers, bytes sent on `M`, keep `L` readable while the queue is not
//! empty: one for a short queue, one more for every [`MARKER_STEP`]
//! connections queued (up to [`MAX_MARKERS`]), so a burst of clients costs
//! a few markers, not one each, and still wakes more than one process.
//! Processes that share `L` with `EPOLLEXCLUSIVE` (nginx's workers) get one
//! wake-up per marker, not per connection: with a single marker, a process
//! asleep when a burst arrived slept until the queue emptied while another
//! accepted the whole burst. Renewing one marker on every accept instead
//! woke the sleepers too, but made bursts slower to accept
//! (bench/notes/2026-12-01-sessions-5-to-8.md, "The accept burst").

use super::locks::{Rank, Ranked};
use super::markers;
use saps_fabric::{ConnId, RELISTEN_GRACE};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[cfg(test)]
mod tests;

/// A virtual listener: where its `L` is and what it asked the io-server
/// for, to ask again after a rejoin.
#[derive(Debug, Clone)]
pub(crate) struct Listener {
    /// The supervisor's end `M` of the socket pair whose other end is
    /// `L`: markers are bytes sent on it, and it sees `L` closed (hang-up)
    /// once the program has closed it everywhere.
    pub marker: Arc<OwnedFd>,
    pub addr: SocketAddr,
    pub flags: u32,
    pub backlog: u32,
}

impl Listener {
    /// Whether the program still holds `L` somewhere.
    pub(crate) fn alive(&self) -> bool {
        markers::peer_alive(&self.marker)
    }
}

/// A connection accepted by the io-server, waiting for the program's accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    pub peer: SocketAddr,
    pub local: SocketAddr,
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

/// What a connection without a listener waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaits {
    /// The program closed the listener: a new one on this address.
    Address(SocketAddr),
    /// The io-server sent it to this listener before its Listen response
    /// reached the supervisor (a same-host io-server's hand-off socket can
    /// deliver a client first).
    Listener(ConnId),
}

/// A connection waiting (up to [`RELISTEN_GRACE`]) for its listener.
#[derive(Debug)]
struct Orphan {
    awaits: Awaits,
    id: ConnId,
    kind: Kind,
    /// When it is refused if no listener took it.
    until: Instant,
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

/// The state of a listener known by its tag on the current channel.
enum ListenerState {
    /// The program holds `L`: connections queue for its accept.
    Listening { listener: Listener, ready: Ready },
    /// The program closed `L`: connections still sent to it wait for a
    /// new listener on `addr`.
    Retired { addr: SocketAddr },
}

/// Listeners the program closed kept as [`ListenerState::Retired`].
const RETIRED_KEPT: usize = 256;

/// A queue this long gets one more marker on `L`.
const MARKER_STEP: usize = 4;
/// Markers on one `L` at most: a wake-up for each of that many processes
/// asleep on it (a program's acceptors are about as many as its cores).
const MAX_MARKERS: usize = 4;

/// How many markers `queued` connections keep on `L`.
fn markers_for(queued: usize) -> usize {
    queued.div_ceil(MARKER_STEP).min(MAX_MARKERS)
}

/// One listener's ready queue and its markers: bytes on `L` while any
/// connection waits, never more than the connections queued, so `L` polls
/// readable exactly then.
#[derive(Default)]
struct Ready {
    /// Connection tags, oldest first.
    queue: VecDeque<ConnId>,
    /// Markers pending on `L`.
    on_l: usize,
}

impl Ready {
    /// Puts the markers the queue calls for on `L`, under the table's
    /// lock: so an accept never sees a queued connection whose marker is
    /// still on its way (it could not take that marker off again, and `L`
    /// would poll readable with nothing to accept, which a program that
    /// selects and then blocks in `accept` would not survive). With one on
    /// `L` already, `L` polls readable anyway and the rest are not retried.
    /// The first always has room: with no marker on `L`, `M` has nothing
    /// unread, and at most [`MAX_MARKERS`] bytes ever are. `Err`: `L` is
    /// closed (`ECONNREFUSED`) or `M` failed.
    fn fill(&mut self, m: BorrowedFd<'_>) -> Result<(), i32> {
        while self.on_l < markers_for(self.queue.len()) {
            match markers::put_marker(m) {
                Ok(()) => self.on_l += 1,
                Err(_) if self.on_l > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A connection taken off a queue for an accept.
#[derive(Debug)]
pub(crate) struct Taken {
    pub id: ConnId,
    pub socket: OwnedFd,
    pub kind: Kind,
    /// Its addresses (gone if the io-server closed it meanwhile).
    pub arrival: Option<Arrival>,
}

/// A connection nobody will accept: the caller resets it.
#[derive(Debug)]
pub(crate) struct Refused {
    pub id: ConnId,
    pub kind: Kind,
    pub socket: Option<OwnedFd>,
}

/// A marker could not reach a listener's `L`: its queue is handed back.
#[derive(Debug)]
pub(crate) struct MarkerFailure {
    pub listener: ConnId,
    pub addr: SocketAddr,
    /// `ECONNREFUSED`: the program closed `L`.
    pub errno: i32,
    /// The connections that were queued, oldest first.
    pub queued: Vec<ConnId>,
}

/// Where [`ListenerTable::place`] put a connection, and what the caller
/// must do next.
#[derive(Debug)]
pub(crate) enum Placement {
    /// In a listener's ready queue, its marker on `L`.
    Queued,
    /// Routed to this listener, but a relayed connection needs its socket
    /// pair first: make it, [`ListenerTable::attach`] the program's end,
    /// start the relay on the other, and place it again.
    NeedsSocket(ConnId),
    /// Waiting for its listener until [`ListenerTable::expire`].
    Parked(Awaits),
    /// The listener's `L` took no marker.
    MarkerFailed(MarkerFailure),
    /// Nobody will accept it.
    Refused(Refused),
}

/// What [`ListenerTable::reap`] found.
#[derive(Debug, Default)]
pub(crate) struct Reaped {
    /// Listeners the program closed: their tags, to close at the io-server.
    pub closed: Vec<ConnId>,
    /// Connections that were queued on them.
    pub refused: Vec<Refused>,
}

/// The node's virtual listeners and their connections: the one owner of
/// that state (see the module docs).
pub(crate) struct ListenerTable {
    inner: Ranked<Listeners>,
    /// Some connection waits short of descriptors (read without the lock
    /// after every accept).
    any_short: AtomicBool,
    /// A task tries the connections short of descriptors again
    /// (`arrival.rs`).
    retrying: AtomicBool,
}

#[derive(Default)]
struct Listeners {
    by_tag: HashMap<ConnId, ListenerState>,
    /// Retired tags, oldest first (to keep [`RETIRED_KEPT`]).
    retired: VecDeque<ConnId>,
    dormant: Vec<Listener>,
    /// Sockets of connections not accepted yet, by tag.
    sockets: HashMap<ConnId, (OwnedFd, Kind)>,
    /// Addresses of connections not accepted yet, by tag.
    arrivals: HashMap<ConnId, Arrival>,
    orphans: Vec<Orphan>,
    /// Relayed connections (listener, id) waiting for descriptors to make
    /// their socket pair, oldest first.
    short: VecDeque<(ConnId, ConnId)>,
}

impl ListenerTable {
    pub(crate) fn new() -> Self {
        ListenerTable {
            inner: Ranked::default_with(Rank::Listeners),
            any_short: AtomicBool::new(false),
            retrying: AtomicBool::new(false),
        }
    }

    /// Relayed connection `id` for listener `lconn` could not get its
    /// socket pair (out of descriptors): it waits, unplaced, for
    /// [`ListenerTable::take_short`].
    pub(crate) fn short_of_descriptors(&self, lconn: ConnId, id: ConnId) {
        let mut t = self.inner.lock();
        t.short.push_back((lconn, id));
        self.any_short.store(true, Ordering::Release);
    }

    /// The connections waiting for descriptors, oldest first, to place
    /// again; each that still finds none is put back with
    /// [`ListenerTable::short_of_descriptors`]. Empty at the cost of one
    /// atomic load when none waits.
    pub(crate) fn take_short(&self) -> Vec<(ConnId, ConnId)> {
        if !self.any_short.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut t = self.inner.lock();
        self.any_short.store(false, Ordering::Release);
        std::mem::take(&mut t.short).into()
    }

    /// Marks the retry task of connections short of descriptors running;
    /// false if it was already.
    pub(crate) fn arm_retry(&self) -> bool {
        !self.retrying.swap(true, Ordering::AcqRel)
    }

    /// The retry task ends.
    pub(crate) fn disarm_retry(&self) {
        self.retrying.store(false, Ordering::Release);
    }

    /// Whether connections wait for descriptors.
    pub(crate) fn is_short(&self) -> bool {
        self.any_short.load(Ordering::Acquire)
    }

    /// A connection arrives for some listener: its addresses, and the
    /// socket it waits as if it has one already (a handed-over one).
    pub(crate) fn arrive(&self, id: ConnId, arrival: Arrival, socket: Option<(OwnedFd, Kind)>) {
        let mut t = self.inner.lock();
        t.arrivals.insert(id, arrival);
        if let Some(s) = socket {
            t.sockets.insert(id, s);
        }
    }

    /// The io-server closed connection `id` before the program accepted
    /// it: its addresses are forgotten (the accept sees them unspecified).
    pub(crate) fn forget_arrival(&self, id: ConnId) {
        self.inner.lock().arrivals.remove(&id);
    }

    /// A duplicate of the program's end of relayed connection `id` while it
    /// waits for the program's accept.
    pub(crate) fn queued_socket(&self, id: ConnId) -> Option<OwnedFd> {
        let t = self.inner.lock();
        let (s, kind) = t.sockets.get(&id)?;
        (*kind == Kind::Relayed)
            .then(|| s.try_clone().ok())
            .flatten()
    }

    /// The program's end of relayed connection `id`'s socket pair.
    pub(crate) fn attach(&self, id: ConnId, socket: OwnedFd) {
        self.inner
            .lock()
            .sockets
            .insert(id, (socket, Kind::Relayed));
    }

    /// Queues connection `id` for `listener`, or for whichever listener
    /// now serves its address; else it waits for one from `now` on.
    pub(crate) fn place(
        &self,
        listener: ConnId,
        id: ConnId,
        kind: Kind,
        now: Instant,
    ) -> Placement {
        self.inner.lock().place(listener, id, kind, now)
    }

    /// The next connection queued for listener `lconn` (the program's `L`
    /// is `l`); markers are taken off `L` as the queue shrinks below their
    /// number, the last with the last connection. `None`: nothing waits,
    /// and stale markers found on `L` are taken off (a spurious wake-up).
    pub(crate) fn take_next(&self, lconn: ConnId, l: BorrowedFd<'_>) -> Result<Option<Taken>, i32> {
        self.inner.lock().take_next(lconn, l)
    }

    /// A taken connection whose delivery failed goes back to the front.
    pub(crate) fn requeue(&self, lconn: ConnId, taken: Taken) -> Placement {
        let mut t = self.inner.lock();
        if !t.is_listening(lconn) {
            return Placement::Refused(Refused {
                id: taken.id,
                kind: taken.kind,
                socket: Some(taken.socket),
            });
        }
        t.sockets.insert(taken.id, (taken.socket, taken.kind));
        if let Some(a) = taken.arrival {
            t.arrivals.insert(taken.id, a);
        }
        t.enqueue(lconn, taken.id, taken.kind, true)
    }

    /// Forgets connection `id`: nobody will accept it. `kind`: how it
    /// reaches the program if known, else as its socket says.
    pub(crate) fn refuse(&self, id: ConnId, kind: Option<Kind>) -> Refused {
        self.inner.lock().refuse(id, kind)
    }

    /// The program listens on `listener`'s address as `conn`: the
    /// connections waiting for it are returned, to be placed. (Listening
    /// already, it keeps its queue.)
    pub(crate) fn listen(&self, conn: ConnId, listener: Listener) -> Vec<(ConnId, Kind)> {
        let mut t = self.inner.lock();
        let addr = listener.addr;
        let ready = match t.by_tag.remove(&conn) {
            Some(ListenerState::Listening { ready, .. }) => ready,
            _ => Ready::default(),
        };
        t.by_tag
            .insert(conn, ListenerState::Listening { listener, ready });
        let (mine, rest): (Vec<Orphan>, Vec<Orphan>) = std::mem::take(&mut t.orphans)
            .into_iter()
            .partition(|o| o.served_by(conn, addr));
        t.orphans = rest;
        mine.into_iter().map(|o| (o.id, o.kind)).collect()
    }

    /// How queued connection `id` reaches the program (relayed if its
    /// socket is gone).
    pub(crate) fn kind_of(&self, id: ConnId) -> Kind {
        self.inner
            .lock()
            .sockets
            .get(&id)
            .map_or(Kind::Relayed, |s| s.1)
    }

    /// Whether `conn` is a listener whose `L` the program holds.
    pub(crate) fn is_listening(&self, conn: ConnId) -> bool {
        self.inner.lock().is_listening(conn)
    }

    /// Retires the listeners (of `port`, or all) whose `L` the program has
    /// closed, and forgets dormant ones it closed: like the kernel with its
    /// accept queue, the connections queued on a closed listener are
    /// refused.
    pub(crate) fn reap(&self, port: Option<u16>) -> Reaped {
        self.inner.lock().reap(port)
    }

    /// Connections that waited for a listener until `now` in vain, with
    /// what they waited for.
    pub(crate) fn expire(&self, now: Instant) -> Vec<(Awaits, Refused)> {
        let mut t = self.inner.lock();
        let (expired, kept): (Vec<Orphan>, Vec<Orphan>) = std::mem::take(&mut t.orphans)
            .into_iter()
            .partition(|o| o.until <= now);
        t.orphans = kept;
        expired
            .into_iter()
            .map(|o| (o.awaits, t.refuse(o.id, Some(o.kind))))
            .collect()
    }

    /// Puts back markers the program took off `L` itself (it read from its
    /// listener, which no server does, but nothing stops it): `L` would
    /// otherwise not poll readable while connections wait, and an
    /// epoll-driven program would never accept them. `M` has nothing unread
    /// by `L` exactly when no marker is on it.
    pub(crate) fn repair_markers(&self) {
        let mut t = self.inner.lock();
        for (&lconn, state) in t.by_tag.iter_mut() {
            let ListenerState::Listening { listener, ready } = state else {
                continue;
            };
            if ready.on_l == 0 || markers::unread(listener.marker.as_fd()) {
                continue;
            }
            tracing::warn!(
                listener = lconn,
                queued = ready.queue.len(),
                "the program read its listener's markers; putting them back"
            );
            ready.on_l = 0;
            if let Err(e) = ready.fill(listener.marker.as_fd()) {
                tracing::debug!(listener = lconn, errno = e, "markers not put back");
            }
        }
    }

    /// The node joined the io-server again: the old channel's tags mean
    /// nothing on the new one. Forgets every queue, waiting connection and
    /// retired listener; returns the listeners to register again, and the
    /// sockets to close (nothing is said on the new channel; the old
    /// channel's relays end with it). Dormant listeners stay dormant.
    pub(crate) fn drain_for_rejoin(&self) -> (Vec<(ConnId, Listener)>, Vec<OwnedFd>) {
        let mut t = self.inner.lock();
        let t = &mut *t;
        t.arrivals.clear();
        t.retired.clear();
        t.short.clear();
        self.any_short.store(false, Ordering::Release);
        let mut closed = Vec::new();
        let mut listeners = Vec::new();
        let orphans = std::mem::take(&mut t.orphans).into_iter().map(|o| o.id);
        let mut dropped: Vec<ConnId> = orphans.collect();
        for (conn, state) in t.by_tag.drain() {
            if let ListenerState::Listening { listener, ready } = state {
                dropped.extend(ready.queue);
                listeners.push((conn, listener));
            }
        }
        for id in dropped {
            closed.extend(t.sockets.remove(&id).map(|(s, _)| s));
        }
        (listeners, closed)
    }

    /// A listener the program holds could not listen again after a rejoin.
    pub(crate) fn go_dormant(&self, listeners: impl IntoIterator<Item = Listener>) {
        self.inner.lock().dormant.extend(listeners);
    }
}

impl Listeners {
    fn is_listening(&self, conn: ConnId) -> bool {
        matches!(
            self.by_tag.get(&conn),
            Some(ListenerState::Listening { .. })
        )
    }

    /// The listening tag serving `addr`, if any.
    fn serving(&self, addr: SocketAddr) -> Option<ConnId> {
        self.by_tag.iter().find_map(|(&c, s)| match s {
            ListenerState::Listening { listener, .. } if listener.addr == addr => Some(c),
            _ => None,
        })
    }

    fn place(&mut self, listener: ConnId, id: ConnId, kind: Kind, now: Instant) -> Placement {
        let awaits = match self.by_tag.get(&listener) {
            Some(ListenerState::Listening { .. }) => {
                return self.enqueue(listener, id, kind, false)
            }
            // The program listens on that address again: its new
            // listener takes it.
            Some(&ListenerState::Retired { addr }) => match self.serving(addr) {
                Some(c) => return self.enqueue(c, id, kind, false),
                None => Awaits::Address(addr),
            },
            None => Awaits::Listener(listener),
        };
        self.orphans.push(Orphan {
            awaits,
            id,
            kind,
            until: now + RELISTEN_GRACE,
        });
        Placement::Parked(awaits)
    }

    /// Queues `id` on listening `lconn` (at the front: a failed accept's)
    /// and puts the markers the queue calls for on `L`.
    fn enqueue(&mut self, lconn: ConnId, id: ConnId, kind: Kind, front: bool) -> Placement {
        if kind == Kind::Relayed && !self.sockets.contains_key(&id) {
            return Placement::NeedsSocket(lconn);
        }
        let Some(ListenerState::Listening { listener, ready }) = self.by_tag.get_mut(&lconn) else {
            return Placement::Refused(self.refuse(id, Some(kind)));
        };
        if front {
            ready.queue.push_front(id);
        } else {
            ready.queue.push_back(id);
        }
        match ready.fill(listener.marker.as_fd()) {
            Ok(()) => Placement::Queued,
            Err(errno) => {
                let queued = std::mem::take(ready).queue.into();
                Placement::MarkerFailed(MarkerFailure {
                    listener: lconn,
                    addr: listener.addr,
                    errno,
                    queued,
                })
            }
        }
    }

    fn take_next(&mut self, lconn: ConnId, l: BorrowedFd<'_>) -> Result<Option<Taken>, i32> {
        let Some(ListenerState::Listening { ready, .. }) = self.by_tag.get_mut(&lconn) else {
            // Nothing can wait: stale markers are taken off.
            while markers::take_one(l)? {}
            return Ok(None);
        };
        // A socket closed under it (rejoin) is skipped.
        let sockets = &mut self.sockets;
        let next = std::iter::from_fn(|| ready.queue.pop_front())
            .find_map(|id| sockets.remove(&id).map(|s| (id, s)));
        if next.is_none() {
            while markers::take_one(l)? {}
            ready.on_l = 0;
        }
        while ready.on_l > ready.queue.len() {
            ready.on_l -= 1;
            if !markers::take_one(l)? {
                // None left on `L` to take.
                ready.on_l = 0;
            }
        }
        Ok(next.map(|(id, (socket, kind))| Taken {
            id,
            socket,
            kind,
            arrival: self.arrivals.remove(&id),
        }))
    }

    fn refuse(&mut self, id: ConnId, kind: Option<Kind>) -> Refused {
        self.arrivals.remove(&id);
        let socket = self.sockets.remove(&id);
        let kind = kind.unwrap_or(socket.as_ref().map_or(Kind::Relayed, |s| s.1));
        Refused {
            id,
            kind,
            socket: socket.map(|s| s.0),
        }
    }

    fn reap(&mut self, port: Option<u16>) -> Reaped {
        let dead: Vec<ConnId> = self
            .by_tag
            .iter()
            .filter_map(|(&c, s)| match s {
                ListenerState::Listening { listener, .. }
                    if port.is_none_or(|p| p == listener.addr.port()) && !listener.alive() =>
                {
                    Some(c)
                }
                _ => None,
            })
            .collect();
        self.dormant.retain(Listener::alive);
        let mut reaped = Reaped::default();
        for conn in dead {
            let Some(ListenerState::Listening { listener, ready }) = self.by_tag.remove(&conn)
            else {
                continue;
            };
            self.retire(conn, listener.addr);
            for id in ready.queue {
                reaped.refused.push(self.refuse(id, None));
            }
            reaped.closed.push(conn);
        }
        reaped
    }

    /// Remembers a closed listener's address (bounded).
    fn retire(&mut self, conn: ConnId, addr: SocketAddr) {
        if self.retired.len() >= RETIRED_KEPT {
            if let Some(old) = self.retired.pop_front() {
                if matches!(self.by_tag.get(&old), Some(ListenerState::Retired { .. })) {
                    self.by_tag.remove(&old);
                }
            }
        }
        self.retired.push_back(conn);
        self.by_tag.insert(conn, ListenerState::Retired { addr });
    }
}
