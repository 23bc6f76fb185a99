//! The one per-connection route table of an endpoint: which relay each
//! SAPS connection's stream events go to (§2.1.1's `message_received`,
//! `Fin`, `connection_closed`, `buffer_available`), the events held for a
//! connection whose relay has not attached yet, the waiters of Figure 3
//! requests, and what the io-server keeps of a connection until the
//! node's program accepts it (issue 17). The reader task routes as it
//! reads ([`RouteSink`]); the router task routes the rest ([`route`]).

use super::errno;
use super::preaccept::{PreAccept, Replay};
use super::quiet::Quiet;
use super::waiting::Place;
use crate::channel::{ChannelError, Event};
use crate::driver;
use crate::frame::{ConnId, ReqId, Request, Response};
use crate::splice::ReceivePipe;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, Notify};

/// What the owner of an [`Endpoint`] hears about; per-connection stream
/// events go to that connection's relay instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointEvent {
    /// io-server side: the node proved the token.
    NodeAuthenticated { node: String, weight: u32 },
    /// Node side: the io-server welcomed us.
    Welcome { node_id: u32 },
    /// io-server side: a Figure 3 request; answer with [`Endpoint::respond`].
    Request { req: ReqId, request: Request },
    /// Node side: a client connection for one of our listeners. Its data is
    /// held until [`Endpoint::relay`] attaches to `conn`.
    ConnectionAccepted {
        listener: ConnId,
        conn: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
    },
    /// Node side: the outbound connect of `conn` is in flight from `local`
    /// (the io-server's address and the port its socket got), before the
    /// Connect's response (protocol version 4).
    Connecting { conn: ConnId, local: SocketAddr },
    /// The peer closed (or reported an error on) a connection with no relay
    /// attached, e.g. a listener or a bound socket.
    ConnectionClosed { conn: ConnId, errno: i32 },
    /// io-server side: the node announced a new weight; the latest is
    /// [`Endpoint::take_weight`](super::Endpoint::take_weight). Weight
    /// frames are merged: while one change waits to be taken, later
    /// ones replace its weight and raise no event (a node sending
    /// millions costs one pending update, not a queue).
    WeightChanged,
    /// io-server side: the node's program accepted `conn`, a connection
    /// handed over as a socket ([`Endpoint::hand_connection`]). A node
    /// that closes its copy unaccepted says so with a
    /// [`EndpointEvent::ConnectionClosed`] of it instead. (For a relayed
    /// connection the relay itself is told.)
    Accepted { conn: ConnId },
    /// The channel closed; the endpoint is finished.
    Closed { error: ChannelError },
}

/// A stream event of one connection.
#[derive(Debug)]
pub(super) enum ConnEvent {
    Data(Bytes),
    /// This many octets are in the connection's receive pipe.
    Spliced(usize, Arc<ReceivePipe>),
    Fin,
    Credit,
    Closed(i32),
}

/// The router's side of an attached relay.
pub(super) struct Attached {
    /// Where its stream events go; closed when this is dropped.
    pub(super) inbound: InboxSender,
    pub(super) credit: Arc<Notify>,
    /// Fired on an abortive close so a relay blocked on its stream ends at once.
    pub(super) abort: Option<oneshot::Sender<i32>>,
    pub(super) receive: Receive,
    /// io-server's client connections: what the idle sweeps saw of it
    /// ([`Endpoint::sweep_quiet`](super::Endpoint::sweep_quiet)).
    pub(super) quiet: Option<Quiet>,
    /// The relay's socket, where it has one: what an upgrade in place
    /// moves ([`super::Capture`]).
    pub(super) socket: Option<RawFd>,
}

/// How payloads from the fabric reach a relay's socket.
pub(super) enum Receive {
    /// Copied (the relay has no socket to splice into, or no pipe was
    /// to be had).
    Copy,
    /// Spliced through a pipe made when the first large payload comes.
    Lazy,
    Pipe(Arc<ReceivePipe>),
}

impl Attached {
    /// The relay's receive pipe, made now if need be.
    pub(super) fn receive_pipe(&mut self) -> Option<Arc<ReceivePipe>> {
        if let Receive::Lazy = self.receive {
            self.receive = match ReceivePipe::new() {
                Some(p) => Receive::Pipe(Arc::new(p)),
                None => Receive::Copy,
            };
        }
        match &self.receive {
            Receive::Pipe(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// Hands `ev` to the relay: into its [`Inbox`], where it stays until
    /// the relay has written it through.
    pub(super) fn deliver(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Credit => self.credit.notify_one(),
            ConnEvent::Closed(e) if e != 0 => {
                if let Some(abort) = self.abort.take() {
                    let _ = abort.send(e);
                }
            }
            ev => self.inbound.0.push(ev),
        }
    }
}

/// What the router hands one relay to write to its stream, and what the
/// relay has not written yet: the relay steps past each octet in the poll
/// that writes it, so that a frozen endpoint's capture finds here,
/// exactly, what its stream has still to be sent (design §2, "Capture
/// instead of drain").
#[derive(Debug, Default)]
pub(super) struct Inbox {
    state: Mutex<InboxState>,
    /// Wakes the relay for an event, or the router's letting go.
    ready: Notify,
}

/// The inside of an [`Inbox`].
#[derive(Debug, Default)]
pub(super) struct InboxState {
    /// Events not yet written through, in order; the first Data or
    /// spliced payload holds what is left of it.
    pub(super) events: VecDeque<ConnEvent>,
    /// The router let go of the relay: nothing more comes.
    pub(super) closed: bool,
    /// The relay is at its clean point, for a freeze: it writes nothing
    /// until the endpoint runs again ([`Endpoint::freeze`](super::Endpoint::freeze)).
    pub(super) parked: bool,
}

impl Inbox {
    pub(super) fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, ev: ConnEvent) {
        self.lock().events.push_back(ev);
        self.ready.notify_one();
    }

    /// Waits for an event, or the router's letting go (a permit left by a
    /// push since the relay last looked is not lost).
    pub(super) async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// The router's hold on a relay's [`Inbox`]: dropped (the connection is
/// finished, or the channel closed), the relay hears that nothing more
/// comes once it has written what it holds.
#[derive(Debug)]
pub(super) struct InboxSender(pub(super) Arc<Inbox>);

impl Drop for InboxSender {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_one();
    }
}

/// Counters of one relayed connection.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) bytes_in: AtomicU64,
    pub(super) bytes_out: AtomicU64,
    /// The peer's Fin was written through (the stream's write side is
    /// shut): the connection is half-closed until the stream's EOF.
    pub(super) fin_written: AtomicBool,
    /// io-server: kept for re-dispatch until the node's program accepts it.
    pub(super) track: Option<Arc<Track>>,
    /// The stream's end of file went out as a Fin: nothing more is read
    /// from it.
    pub(super) fin_sent: AtomicBool,
    /// io-server: the replay to send first, and the client's octets kept
    /// until the node's program accepts the connection (`None` once that
    /// is over, or for a connection that never had them). Here rather
    /// than in the relay's task, so that a frozen endpoint can copy it.
    pub(super) pre: Mutex<Option<PreAccept>>,
    /// The router's [`Router::progress`].
    pub(super) progress: Arc<Progress>,
}

impl Counters {
    /// Whether the node's program accepted the connection (always, for
    /// one not tracked).
    pub(super) fn accepted(&self) -> bool {
        self.track.as_ref().is_none_or(|t| t.settled())
    }
}

/// io-server: a connection kept for re-dispatch until the node's program
/// accepts it, counted in [`Endpoint::unaccepted`] until it is settled
/// (accepted, or its relay ended), at the latest when it is dropped.
#[derive(Debug)]
pub(super) struct Track {
    pub(super) settled: AtomicBool,
    pub(super) count: Arc<AtomicUsize>,
    /// Its place in its member's count ([`super::Waiting`]), given back when
    /// settled.
    place: Mutex<Option<Place>>,
}

impl Track {
    pub(super) fn new(count: &Arc<AtomicUsize>, place: Option<Place>) -> Arc<Track> {
        count.fetch_add(1, Ordering::AcqRel);
        Arc::new(Track {
            settled: AtomicBool::new(false),
            count: count.clone(),
            place: Mutex::new(place),
        })
    }

    /// Settles it; true for the first call only (so at the end of a
    /// relay: true when the program never accepted the connection).
    pub(super) fn settle(&self) -> bool {
        let first = !self.settled.swap(true, Ordering::AcqRel);
        if first {
            self.count.fetch_sub(1, Ordering::AcqRel);
            let place = self.place.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(place);
        }
        first
    }

    pub(super) fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

impl Drop for Track {
    fn drop(&mut self) {
        self.settle();
    }
}

/// io-server: how a connection announced to the node starts, until its
/// relay attaches.
#[derive(Debug)]
pub(super) struct Start {
    /// Octets (and FIN) a node that died before accepting it was sent.
    pub(super) replay: Replay,
    pub(super) track: Option<Arc<Track>>,
}

pub(super) enum Route {
    /// Known connection without a relay yet: events wait here (bounded by
    /// the credit we granted).
    Held(Vec<ConnEvent>),
    Relayed(Attached, Arc<Counters>),
}

#[derive(Default)]
pub(super) struct Router {
    pub(super) pending: HashMap<ReqId, oneshot::Sender<Response>>,
    pub(super) conns: HashMap<ConnId, Route>,
    pub(super) closed: Option<String>,
    /// io-server: connections announced with a replay or kept for
    /// re-dispatch, until their relay attaches.
    pub(super) starts: HashMap<ConnId, Start>,
    /// Node: the id the io-server's Welcome gave us.
    pub(super) node_id: Option<u32>,
    /// Node: connections handed over as sockets and not yet accepted, by
    /// local id: the io-server's id of each (`None`: not kept by it).
    pub(super) handed: HashMap<ConnId, Option<ConnId>>,
    /// io-server: the node's latest weight not taken yet
    /// ([`EndpointEvent::WeightChanged`]).
    pub(super) weight: Option<u32>,
    /// Relayed connections carried by an upgrade in place
    /// ([`super::Endpoint::resume`]) whose relay has not attached again.
    pub(super) resumed: HashMap<ConnId, super::freeze::Carried>,
    /// What a freeze waits on ([`super::Endpoint::freeze`]).
    pub(super) progress: Arc<Progress>,
}

/// Relays reaching their clean points, or ending, while a freeze waits
/// for them. Told only while one waits.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub(super) waiting: AtomicBool,
    pub(super) notify: Notify,
}

impl Progress {
    /// A relay parked, or ended.
    pub(super) fn made(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }
}

impl Router {
    pub(super) fn expect(&mut self, conn: ConnId) {
        self.conns.entry(conn).or_insert(Route::Held(Vec::new()));
    }

    /// Routes a stream event; returns false when no relay is attached.
    pub(super) fn deliver(&mut self, conn: ConnId, ev: ConnEvent) -> bool {
        match self.conns.get_mut(&conn) {
            Some(Route::Relayed(a, c)) => {
                if let (Some(t), ConnEvent::Data(_)) = (&c.track, &ev) {
                    program_wrote(t, a);
                }
                a.deliver(ev);
                true
            }
            Some(Route::Held(q)) => {
                if !matches!(ev, ConnEvent::Credit) {
                    q.push(ev);
                }
                false
            }
            // Late events for a connection already finished.
            None => false,
        }
    }
}

/// io-server: the node sent data on a connection kept until its program
/// accepts it. Only the program writes to its end (the supervisor never
/// does), so it has the connection: accepted, whether or not its
/// `Accepted` came yet (it may trail the program's first reply).
pub(super) fn program_wrote(track: &Track, a: &Attached) {
    if !track.settled() && track.settle() {
        a.credit.notify_one();
    }
}

/// The reader task's sink: routes as it reads, and finds the receive
/// pipes of relays that splice.
pub(super) struct RouteSink {
    pub(super) router: Arc<Mutex<Router>>,
    pub(super) tx: mpsc::UnboundedSender<EndpointEvent>,
}

impl driver::Sink for RouteSink {
    fn event(&mut self, ev: Event) {
        route_one(&self.router, &self.tx, ev);
    }
    fn receive_pipe(&mut self, conn: ConnId) -> Option<Arc<ReceivePipe>> {
        match lock_router(&self.router).conns.get_mut(&conn) {
            Some(Route::Relayed(a, _)) => a.receive_pipe(),
            _ => None,
        }
    }
}

pub(super) fn lock_router(r: &Mutex<Router>) -> MutexGuard<'_, Router> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// The router task: routes the events the reader task does not (a
/// `Closed` raised by a local call).
pub(super) async fn route(
    router: Arc<Mutex<Router>>,
    mut events: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::UnboundedSender<EndpointEvent>,
) {
    while let Some(ev) = events.recv().await {
        if route_one(&router, &tx, ev) {
            return;
        }
    }
}

/// Routes one channel event: stream events to their connection's relay,
/// responses to their waiter, the rest to the endpoint's owner. True once
/// the channel closed.
pub(super) fn route_one(
    router: &Mutex<Router>,
    tx: &mpsc::UnboundedSender<EndpointEvent>,
    ev: Event,
) -> bool {
    let mut router = lock_router(router);
    let out = match ev {
        Event::NodeAuthenticated { node, weight } => {
            Some(EndpointEvent::NodeAuthenticated { node, weight })
        }
        Event::Welcome { node_id } => {
            router.node_id = Some(node_id);
            Some(EndpointEvent::Welcome { node_id })
        }
        Event::Request { req, request } => Some(EndpointEvent::Request { req, request }),
        Event::WeightChanged { weight } => router
            .weight
            .replace(weight)
            .is_none()
            .then_some(EndpointEvent::WeightChanged),
        Event::Response { req, response } => {
            match router.pending.remove(&req) {
                Some(waiter) => {
                    let _ = waiter.send(response);
                }
                None => tracing::debug!(req, "response nobody waits for"),
            }
            None
        }
        Event::ConnectionAccepted {
            listener,
            conn,
            peer,
            local,
        } => {
            router.expect(conn);
            Some(EndpointEvent::ConnectionAccepted {
                listener,
                conn,
                peer,
                local,
            })
        }
        Event::Connecting { conn, local } => Some(EndpointEvent::Connecting { conn, local }),
        Event::MessageReceived { conn, data } => {
            router.deliver(conn, ConnEvent::Data(data));
            None
        }
        Event::MessageSpliced { conn, len } => {
            // Only a relay with a pipe is given spliced payloads.
            if let Some(Route::Relayed(a, c)) = router.conns.get_mut(&conn) {
                if let Some(t) = &c.track {
                    program_wrote(t, a);
                }
                if let Some(pipe) = a.receive_pipe() {
                    a.deliver(ConnEvent::Spliced(len, pipe));
                }
            }
            None
        }
        Event::Fin { conn } => {
            router.deliver(conn, ConnEvent::Fin);
            None
        }
        Event::BufferAvailable { conn } => {
            router.deliver(conn, ConnEvent::Credit);
            None
        }
        Event::ConnectionClosed { conn, errno } => (!router
            .deliver(conn, ConnEvent::Closed(errno)))
        .then_some(EndpointEvent::ConnectionClosed { conn, errno }),
        Event::Accepted { conn } => {
            let router = &mut *router;
            match router.conns.get_mut(&conn) {
                // A relayed connection: its relay stops keeping it.
                Some(Route::Relayed(a, c)) => {
                    if let Some(t) = &c.track {
                        t.settle();
                    }
                    a.credit.notify_one();
                    None
                }
                Some(Route::Held(_)) => {
                    if let Some(t) = router.starts.get(&conn).and_then(|s| s.track.as_ref()) {
                        t.settle();
                    }
                    None
                }
                // Handed over as a socket: the owner keeps that.
                None => Some(EndpointEvent::Accepted { conn }),
            }
        }
        Event::Closed { error } => {
            if router.closed.is_some() {
                return true;
            }
            router.closed = Some(error.to_string());
            router.pending.clear();
            for (_, route) in router.conns.drain() {
                if let Route::Relayed(mut a, _) = route {
                    a.deliver(ConnEvent::Closed(errno::ECONNABORTED));
                }
            }
            drop(router);
            let _ = tx.send(EndpointEvent::Closed { error });
            return true;
        }
    };
    drop(router);
    if let Some(out) = out {
        let _ = tx.send(out);
    }
    false
}
