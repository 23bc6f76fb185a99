//! The async endpoint over [`driver::spawn`]: routes a channel's callbacks
//! per SAPS connection and relays byte streams within the Appendix A credits.
//!
//! Both ends use it: the io-server relays client TCP sockets, the node's
//! supervisor relays the application's socket pairs. One router task takes
//! the channel's events in order and hands each connection's
//! `message_received`/`Fin`/`connection_closed`/`buffer_available` (§2.1.1)
//! to that connection's [`Endpoint::relay`], so a connection whose stream
//! stops reading waits on its own credit and never stalls another (§2.2).
//! Everything else (authentication, Figure 3 requests and responses, accepted
//! connections) comes out as an [`EndpointEvent`] or answers
//! [`Endpoint::request`].
//!
//! An idle relay holds no read buffer (a gateway holds tens of thousands of
//! idle connections; docs/benchmarks.md "Scale"): a read goes straight into
//! a Data frame in the channel's output buffer.
//!
//! Re-dispatch (issue 17): on a protocol version 2 channel the io-server
//! keeps each client connection it gives a node until the node says its
//! program accepted it ([`Endpoint::accepted`] on the node). A relayed
//! one keeps the client's octets sent before that ([`preaccept`]), and
//! [`Endpoint::relay_client`] gives the socket and those octets back when
//! the channel ends first; a handed-over one is the io-server's business
//! (its duplicate of the socket), told by [`EndpointEvent::Accepted`].

mod preaccept;
use preaccept::{PreAccept, Step};
pub use preaccept::{Replay, PRE_ACCEPT_MAX};

use crate::channel::{CallError, Channel, ChannelError, Event};
use crate::driver::{self, FabricHandle};
use crate::frame::{ConnId, ReqId, Request, Response};
use crate::splice::{self, Pipe, ReadySocket, ReceivePipe, SPLICE_MIN};
use crate::transport::{TransportRead, TransportWrite};
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

/// Linux errno values the relay reports (the fabric carries Linux errnos).
pub mod errno {
    pub const EIO: i32 = 5;
    pub const EPIPE: i32 = 32;
    pub const ECONNABORTED: i32 = 103;
    pub const ECONNRESET: i32 = 104;
    pub const ENOTCONN: i32 = 107;
    pub const ETIMEDOUT: i32 = 110;
    pub const ECONNREFUSED: i32 = 111;
}

/// The errno to report for a local I/O error.
pub fn io_errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::BrokenPipe => errno::EPIPE,
        io::ErrorKind::ConnectionReset => errno::ECONNRESET,
        io::ErrorKind::ConnectionAborted => errno::ECONNABORTED,
        io::ErrorKind::NotConnected => errno::ENOTCONN,
        io::ErrorKind::TimedOut => errno::ETIMEDOUT,
        io::ErrorKind::ConnectionRefused => errno::ECONNREFUSED,
        _ => errno::EIO,
    })
}

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
    /// The peer closed (or reported an error on) a connection with no relay
    /// attached, e.g. a listener or a bound socket.
    ConnectionClosed { conn: ConnId, errno: i32 },
    /// io-server side: the node announced a new weight.
    WeightChanged { weight: u32 },
    /// io-server side: the node's program accepted `conn`, a connection
    /// handed over as a socket ([`Endpoint::hand_connection`]). A node
    /// that closes its copy unaccepted says so with a
    /// [`EndpointEvent::ConnectionClosed`] of it instead. (For a relayed
    /// connection the relay itself is told.)
    Accepted { conn: ConnId },
    /// The channel closed; the endpoint is finished.
    Closed { error: ChannelError },
}

/// Errors of [`Endpoint::request`].
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("the fabric channel closed: {0}")]
    Closed(String),
    #[error(transparent)]
    Call(#[from] CallError),
}

/// How the relay of a client connection the io-server accepted for a node
/// ended ([`Endpoint::relay_client`]).
#[derive(Debug)]
pub enum ClientRelayEnd {
    /// As [`Endpoint::relay_tcp`]: the socket is closed.
    Finished(RelayOutcome),
    /// The node's channel ended before its program accepted the
    /// connection: the client's socket, open and untouched, and what was
    /// read from it, to give to another node.
    Unaccepted {
        stream: Arc<TcpStream>,
        replay: Replay,
        outcome: RelayOutcome,
    },
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Octets read from the stream and sent on the connection.
    pub bytes_in: u64,
    /// Octets received on the connection and written to the stream.
    pub bytes_out: u64,
    /// 0: both directions finished cleanly; else the peer's or the local errno.
    pub errno: i32,
}

/// A stream event of one connection.
#[derive(Debug)]
enum ConnEvent {
    Data(Bytes),
    /// This many octets are in the connection's receive pipe.
    Spliced(usize, Arc<ReceivePipe>),
    Fin,
    Credit,
    Closed(i32),
}

/// The router's side of an attached relay.
struct Attached {
    inbound: mpsc::UnboundedSender<ConnEvent>,
    credit: Arc<Notify>,
    /// Fired on an abortive close so a relay blocked on its stream ends at once.
    abort: Option<oneshot::Sender<i32>>,
    receive: Receive,
}

/// How payloads from the fabric reach a relay's socket.
enum Receive {
    /// Copied (the relay has no socket to splice into, or no pipe was
    /// to be had).
    Copy,
    /// Spliced through a pipe made when the first large payload comes.
    Lazy,
    Pipe(Arc<ReceivePipe>),
}

impl Attached {
    /// The relay's receive pipe, made now if need be.
    fn receive_pipe(&mut self) -> Option<Arc<ReceivePipe>> {
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

    fn deliver(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Credit => self.credit.notify_one(),
            ConnEvent::Closed(e) if e != 0 => {
                if let Some(abort) = self.abort.take() {
                    let _ = abort.send(e);
                }
            }
            ev => {
                let _ = self.inbound.send(ev);
            }
        }
    }
}

/// Counters of one relayed connection.
#[derive(Debug, Default)]
struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// The peer's `B_r` for this connection (the send window before any send).
    peer_window: u64,
    /// io-server: kept for re-dispatch until the node's program accepts it.
    track: Option<Arc<Track>>,
}

impl Counters {
    /// Whether the node's program accepted the connection (always, for
    /// one not tracked).
    fn accepted(&self) -> bool {
        self.track.as_ref().is_none_or(|t| t.settled())
    }
}

/// io-server: a connection kept for re-dispatch until the node's program
/// accepts it, counted in [`Endpoint::unaccepted`] until it is settled
/// (accepted, or its relay ended), at the latest when it is dropped.
#[derive(Debug)]
struct Track {
    settled: AtomicBool,
    count: Arc<AtomicUsize>,
}

impl Track {
    fn new(count: &Arc<AtomicUsize>) -> Arc<Track> {
        count.fetch_add(1, Ordering::AcqRel);
        Arc::new(Track {
            settled: AtomicBool::new(false),
            count: count.clone(),
        })
    }

    /// Settles it; true for the first call only (so at the end of a
    /// relay: true when the program never accepted the connection).
    fn settle(&self) -> bool {
        let first = !self.settled.swap(true, Ordering::AcqRel);
        if first {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        first
    }

    fn settled(&self) -> bool {
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
struct Start {
    /// Octets (and FIN) a node that died before accepting it was sent.
    replay: Replay,
    track: Option<Arc<Track>>,
}

enum Route {
    /// Known connection without a relay yet: events wait here (bounded by
    /// the credit we granted).
    Held(Vec<ConnEvent>),
    Relayed(Attached, Arc<Counters>),
}

#[derive(Default)]
struct Router {
    pending: HashMap<ReqId, oneshot::Sender<Response>>,
    conns: HashMap<ConnId, Route>,
    closed: Option<String>,
    /// io-server: connections announced with a replay or kept for
    /// re-dispatch, until their relay attaches.
    starts: HashMap<ConnId, Start>,
    /// Node: the id the io-server's Welcome gave us.
    node_id: Option<u32>,
    /// Node: connections handed over as sockets and not yet accepted, by
    /// local id: the io-server's id of each (`None`: not kept by it).
    handed: HashMap<ConnId, Option<ConnId>>,
}

impl Router {
    fn expect(&mut self, conn: ConnId) {
        self.conns.entry(conn).or_insert(Route::Held(Vec::new()));
    }

    /// Routes a stream event; returns false when no relay is attached.
    fn deliver(&mut self, conn: ConnId, ev: ConnEvent) -> bool {
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
fn program_wrote(track: &Track, a: &Attached) {
    if !track.settled() && track.settle() {
        a.credit.notify_one();
    }
}

/// The reader task's sink: routes as it reads, and finds the receive
/// pipes of relays that splice.
struct RouteSink {
    router: Arc<Mutex<Router>>,
    tx: mpsc::UnboundedSender<EndpointEvent>,
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

struct Inner {
    handle: FabricHandle,
    router: Arc<Mutex<Router>>,
    /// io-server: tracked connections not yet accepted ([`Track`]).
    unaccepted: Arc<AtomicUsize>,
}

fn lock_router(r: &Mutex<Router>) -> MutexGuard<'_, Router> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running channel with per-connection routing. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl Endpoint {
    /// Starts the channel's driver and the router on the current runtime.
    pub fn spawn<R: TransportRead, W: TransportWrite>(
        channel: Channel,
        r: R,
        w: W,
    ) -> (Endpoint, mpsc::UnboundedReceiver<EndpointEvent>) {
        let router = Arc::new(Mutex::new(Router::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        // The reader task routes what the peer sends itself (no hop through
        // the router task per frame); the router task gets the rest.
        let sink = RouteSink {
            router: router.clone(),
            tx: tx.clone(),
        };
        let (handle, events) = driver::spawn_with_sink(channel, r, w, sink);
        tokio::spawn(route(router.clone(), events, tx));
        let ep = Endpoint {
            inner: Arc::new(Inner {
                handle,
                router,
                unaccepted: Arc::default(),
            }),
        };
        (ep, rx)
    }

    fn router(&self) -> MutexGuard<'_, Router> {
        lock_router(&self.inner.router)
    }

    pub fn handle(&self) -> &FabricHandle {
        &self.inner.handle
    }

    /// Node: sends a Figure 3 request and waits for its Response.
    pub async fn request(&self, request: Request) -> Result<Response, EndpointError> {
        let rx = {
            // The router lock is held across the send so the response cannot
            // be routed before its waiter is registered.
            let mut router = self.router();
            if let Some(reason) = &router.closed {
                return Err(EndpointError::Closed(reason.clone()));
            }
            let req = self.inner.handle.with(|ch| ch.request(request))?;
            let (tx, rx) = oneshot::channel();
            router.pending.insert(req, tx);
            rx
        };
        rx.await.map_err(|_| {
            let reason = self.router().closed.clone();
            EndpointError::Closed(reason.unwrap_or_else(|| "no response".into()))
        })
    }

    /// io-server: answers request `req`.
    pub fn respond(&self, req: ReqId, response: Response) {
        self.inner.handle.with(|ch| ch.respond(req, response));
    }

    /// `make_connection`: a new connection whose events are held for a relay.
    pub fn make_connection(&self) -> Result<ConnId, CallError> {
        let mut router = self.router();
        let conn = self.inner.handle.with(|ch| ch.make_connection())?;
        router.expect(conn);
        Ok(conn)
    }

    /// io-server: registers the node's connection `conn` after a successful Connect.
    pub fn open_connection(&self, conn: ConnId) -> Result<(), CallError> {
        let mut router = self.router();
        self.inner.handle.with(|ch| ch.open_connection(conn))?;
        router.expect(conn);
        Ok(())
    }

    /// io-server: announces a client connection to the node's `listener`.
    pub fn accept_connection(
        &self,
        listener: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<ConnId, CallError> {
        self.accept_connection_with(listener, peer, local, &Replay::default(), false)
    }

    /// io-server: [`Endpoint::accept_connection`] for a client whose
    /// relay ([`Endpoint::relay_client`]) first sends `replay` (what a
    /// node that died before accepting it was sent). `track`: keep it for
    /// re-dispatch until the node's program accepts it, where the node
    /// says so (protocol version 2; else it is not kept).
    pub fn accept_connection_with(
        &self,
        listener: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
        replay: &Replay,
        track: bool,
    ) -> Result<ConnId, CallError> {
        let mut router = self.router();
        let (conn, notifies) = self.inner.handle.with(|ch| {
            let conn = ch.accept_connection(listener, peer, local)?;
            Ok::<_, CallError>((conn, ch.notifies_accepts()))
        })?;
        router.expect(conn);
        let track = (track && notifies).then(|| Track::new(&self.inner.unaccepted));
        if track.is_some() || !replay.is_empty() || replay.fin {
            let replay = replay.clone();
            router.starts.insert(conn, Start { replay, track });
        }
        Ok(conn)
    }

    /// io-server: connections kept for re-dispatch whose program has not
    /// accepted them yet (relayed ones; handed-over ones are the caller's).
    pub fn unaccepted(&self) -> usize {
        self.inner.unaccepted.load(Ordering::Acquire)
    }

    /// Whether the channel is open.
    pub fn is_open(&self) -> bool {
        self.inner.handle.with(|ch| ch.is_open())
    }

    /// Whether the peer tells the io-server of each accept (protocol
    /// version 2).
    pub fn notifies_accepts(&self) -> bool {
        self.inner.handle.with(|ch| ch.notifies_accepts())
    }

    /// io-server: an id for a client handed to the node as a socket,
    /// whose [`EndpointEvent::Accepted`] (or `ConnectionClosed`, the node
    /// closed it unaccepted) comes with it; see
    /// [`Channel::hand_connection`].
    pub fn hand_connection(&self) -> Result<ConnId, CallError> {
        self.inner.handle.with(|ch| ch.hand_connection())
    }

    /// io-server: the socket of `conn` ([`Endpoint::hand_connection`])
    /// never left; forget the id.
    pub fn forget_handed(&self, conn: ConnId) {
        self.inner.handle.with(|ch| ch.forget_handed(conn));
    }

    /// Node: records a connection handed over as a socket, known here as
    /// `local`; `server` is the io-server's id of it (0: the io-server does
    /// not keep it) and `node` the node id it was handed to. False when the
    /// io-server keeps it for a channel that has ended (this one closed,
    /// or an earlier one): it gives the connection to another node, and
    /// the caller must close this copy.
    pub fn handed(&self, local: ConnId, server: ConnId, node: u32) -> bool {
        let mut router = self.router();
        if server != 0 {
            let ours = router.node_id == Some(node) && self.inner.handle.with(|ch| ch.is_open());
            if !ours {
                return false;
            }
        }
        router.handed.insert(local, (server != 0).then_some(server));
        true
    }

    /// Node: whether the program may be given the connection `id` (a
    /// relayed one's tag, or the local id of a `handed` one). Not once the
    /// channel it came on has ended: the io-server gives it to another
    /// node (unless it did not keep it, a version 1 io-server's handed
    /// socket). Ask before installing it, then say [`Endpoint::accepted`].
    pub fn may_accept(&self, id: ConnId, handed: bool) -> bool {
        let router = self.router();
        let open = || self.inner.handle.with(|ch| ch.is_open());
        match handed {
            true => match router.handed.get(&id) {
                Some(None) => true,
                Some(Some(_)) => open(),
                // Recorded on an earlier channel (the node rejoined).
                None => false,
            },
            false => open(),
        }
    }

    /// Node: the program accepted `id` (as for [`Endpoint::may_accept`]):
    /// tells the io-server ([`crate::Frame::Accepted`]), which then no
    /// longer keeps it for another node. One small frame, sent at once for
    /// a relayed connection, within [`crate::driver::COALESCE`] (with the
    /// others of that moment) for a handed-over one.
    pub fn accepted(&self, id: ConnId, handed: bool) {
        let server = match handed {
            true => {
                let entry = self.router().handed.remove(&id);
                match entry {
                    Some(Some(server)) => server,
                    _ => return,
                }
            }
            false => id,
        };
        let notify = |ch: &mut Channel| {
            if handed || ch.has_connection(server) {
                ch.accepted(server);
            }
        };
        match handed {
            // Nothing waits for it but the io-server's copy of the socket,
            // which it checks before giving it to anyone else (a socket the
            // program read or wrote stays closed): it may wait a moment for
            // company (`driver::COALESCE`), saving a wake-up per connection.
            true => self.inner.handle.with_coalesced(notify),
            // A relayed connection's octets are not the io-server's to
            // check: the io-server must know at once.
            false => self.inner.handle.with(notify),
        }
    }

    /// Node: the handed-over connection `local` is closed unaccepted
    /// (nobody will accept it): the io-server closes its copy too.
    pub fn close_handed(&self, local: ConnId) {
        let entry = self.router().handed.remove(&local);
        if let Some(Some(server)) = entry {
            self.inner.handle.with(|ch| ch.close_connection(server, 0));
        }
    }

    /// `close_connection`; also forgets events held for `conn`.
    pub fn close_connection(&self, conn: ConnId, errno: i32) {
        let mut router = self.router();
        router.conns.remove(&conn);
        router.starts.remove(&conn);
        self.inner
            .handle
            .with(|ch| ch.close_connection(conn, errno));
    }

    /// io-server: reports an asynchronous error on `conn` (§2.3).
    pub fn report_error(&self, conn: ConnId, errno: i32) {
        self.inner.handle.with(|ch| ch.report_error(conn, errno));
    }

    /// Octets sent on `conn` that the peer has not yet acknowledged as
    /// consumed (`A_s` minus the consumption implied by the last credit,
    /// `L_s - B_r`). Appendix A reports credit after half a buffer, so this
    /// over-counts by less than `B_r / 2`. 0 for a connection not relayed.
    pub fn pending_bytes(&self, conn: ConnId) -> u64 {
        let window = match self.router().conns.get(&conn) {
            Some(Route::Relayed(_, c)) => c.peer_window,
            _ => return 0,
        };
        let available = self.inner.handle.with(|ch| ch.send_window(conn)) as u64;
        window.saturating_sub(available)
    }

    /// Octets relayed on `conn` so far: (read from the stream, written to it).
    pub fn relayed_bytes(&self, conn: ConnId) -> (u64, u64) {
        match self.router().conns.get(&conn) {
            Some(Route::Relayed(_, c)) => (
                c.bytes_in.load(Ordering::Relaxed),
                c.bytes_out.load(Ordering::Relaxed),
            ),
            _ => (0, 0),
        }
    }

    /// Copies `stream` <-> `conn` until both directions are finished, the
    /// peer closes the connection, or the stream fails; then closes `conn`.
    ///
    /// Reads from `stream` only within the send window (`L_s - A_s`), writes
    /// received data fully before crediting it with `consumed`, turns the
    /// peer's Fin into `shutdown` of the stream and the stream's EOF into
    /// `send_fin`.
    pub async fn relay<S>(&self, conn: ConnId, stream: S) -> RelayOutcome
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.relay_with(conn, stream, None::<&TcpStream>, |_| {})
            .await
    }

    /// [`Endpoint::relay`] for a unix stream socket (a node's end of a
    /// program's connection), splicing bulk reads as
    /// [`Endpoint::relay_tcp`] does.
    pub async fn relay_unix(&self, conn: ConnId, stream: UnixStream) -> RelayOutcome {
        let stream = Arc::new(stream);
        let source = stream.clone();
        self.relay_with(conn, Shared(stream), Some(&*source), |_| {})
            .await
    }

    /// [`Endpoint::relay`] for a TCP socket: when the peer resets the
    /// connection the socket is closed with `SO_LINGER` 0, so the client
    /// sees RST rather than FIN.
    ///
    /// The socket is shared so its owner can still set and read socket
    /// options while it is relayed, without a second descriptor (a
    /// duplicate per connection would halve how many fit under `ulimit -n`).
    /// It closes when the last `Arc` is dropped.
    ///
    /// Once a read brings [`SPLICE_MIN`] octets, and while reads keep doing
    /// so, payloads go from the socket to the fabric by `splice(2)` where
    /// the transport allows (see [`crate::splice`]).
    pub async fn relay_tcp(&self, conn: ConnId, stream: Arc<TcpStream>) -> RelayOutcome {
        let source = stream.clone();
        self.relay_with(conn, Shared(stream), Some(&*source), |s| {
            if let Err(e) = s.0.set_zero_linger() {
                tracing::debug!(error = %e, "SO_LINGER 0 failed");
            }
        })
        .await
    }

    /// io-server: [`Endpoint::relay_tcp`] for a client connection
    /// announced with [`Endpoint::accept_connection_with`]: its replay
    /// goes first; while it is kept for re-dispatch (until the node's
    /// program accepts it) at most [`PRE_ACCEPT_MAX`] octets (or the
    /// node's window) are read from the client, and kept; and if the
    /// node's channel ends before the accept, the socket is given back
    /// open with everything the client sent
    /// ([`ClientRelayEnd::Unaccepted`]) rather than closed.
    pub async fn relay_client(&self, conn: ConnId, stream: Arc<TcpStream>) -> ClientRelayEnd {
        let source = stream.clone();
        let (end, stream, counters, pre) =
            match self.run_relay(conn, Shared(stream), Some(&*source)).await {
                Relayed::Ran {
                    end,
                    stream,
                    counters,
                    pre,
                } => (end, stream, counters, pre),
                Relayed::NotAttached { stream, start } => {
                    drop(source);
                    let outcome = RelayOutcome {
                        bytes_in: 0,
                        bytes_out: 0,
                        errno: errno::ENOTCONN,
                    };
                    // The channel closed before the relay began: the node
                    // cannot have accepted the connection.
                    if let Some(Start {
                        replay,
                        track: Some(track),
                    }) = start
                    {
                        if track.settle() && !self.is_open() {
                            return ClientRelayEnd::Unaccepted {
                                stream: stream.0,
                                replay,
                                outcome,
                            };
                        }
                    }
                    return ClientRelayEnd::Finished(outcome);
                }
            };
        // Settled here at the latest; true: never accepted.
        let unaccepted = counters.track.as_ref().is_some_and(|t| t.settle());
        if unaccepted && self.router().closed.is_some() {
            drop(source);
            self.close_connection(conn, 0);
            let outcome = RelayOutcome {
                bytes_in: counters.bytes_in.load(Ordering::Relaxed),
                bytes_out: counters.bytes_out.load(Ordering::Relaxed),
                errno: errno::ECONNABORTED,
            };
            tracing::debug!(conn, "the node left before accepting the connection");
            return ClientRelayEnd::Unaccepted {
                stream: stream.0,
                replay: pre.map(PreAccept::into_replay).unwrap_or_default(),
                outcome,
            };
        }
        ClientRelayEnd::Finished(self.finish_relay(conn, end, stream, &counters, |s| {
            if let Err(e) = s.0.set_zero_linger() {
                tracing::debug!(error = %e, "SO_LINGER 0 failed");
            }
        }))
    }

    async fn relay_with<S, F, T>(
        &self,
        conn: ConnId,
        stream: S,
        socket: Option<&T>,
        abortive: F,
    ) -> RelayOutcome
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        F: FnOnce(&S),
        T: ReadySocket,
    {
        match self.run_relay(conn, stream, socket).await {
            Relayed::Ran {
                end,
                stream,
                counters,
                ..
            } => self.finish_relay(conn, end, stream, &counters, abortive),
            Relayed::NotAttached { .. } => RelayOutcome {
                bytes_in: 0,
                bytes_out: 0,
                errno: errno::ENOTCONN,
            },
        }
    }

    /// Runs the relay of `conn` until it stops; the stream is given back
    /// open.
    async fn run_relay<S, T>(&self, conn: ConnId, stream: S, socket: Option<&T>) -> Relayed<S>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        T: ReadySocket,
    {
        let span = tracing::debug_span!("relay", conn);
        let a = match self.attach(conn, socket.is_some() && T::SPLICE_RECEIVED) {
            Ok(a) => a,
            Err(start) => return Relayed::NotAttached { stream, start },
        };
        let pre = a.pre.map(|p| Mutex::new(Some(p)));
        let (rd, wr) = tokio::io::split(stream);
        let (end, rd, wr) = Pump {
            ep: self,
            conn,
            counters: &a.counters,
            socket,
            pre: pre.as_ref(),
        }
        .run(rd, wr, a.inbound, &a.credit, a.abort)
        .instrument(span)
        .await;
        Relayed::Ran {
            end,
            stream: rd.unsplit(wr),
            counters: a.counters,
            pre: pre.and_then(|p| p.into_inner().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// Closes the stream of a relay that ran (abortively when the peer
    /// reset the connection) and the connection.
    fn finish_relay<S, F: FnOnce(&S)>(
        &self,
        conn: ConnId,
        end: End,
        stream: S,
        counters: &Counters,
        abortive: F,
    ) -> RelayOutcome {
        let errno = match end {
            End::Done => 0,
            End::Peer(e) | End::Local(e) => e,
        };
        if matches!(end, End::Peer(e) if e != 0) {
            abortive(&stream);
        }
        drop(stream);
        self.close_connection(conn, errno);
        tracing::debug!(conn, errno, "relay finished");
        RelayOutcome {
            bytes_in: counters.bytes_in.load(Ordering::Relaxed),
            bytes_out: counters.bytes_out.load(Ordering::Relaxed),
            errno,
        }
    }

    /// Attaches a relay to `conn`, replaying the events held for it;
    /// `splices`: the relay has a socket to splice payloads into. Refused
    /// (with how the connection was to start, if it was announced so)
    /// for an unknown connection or a closed channel.
    fn attach(&self, conn: ConnId, splices: bool) -> Result<Attachment, Option<Start>> {
        let mut router = self.router();
        let start = router.starts.remove(&conn);
        let (known, peer_window) = self
            .inner
            .handle
            .with(|ch| (ch.has_connection(conn), ch.send_window(conn) as u64));
        let held = match router.conns.remove(&conn) {
            Some(Route::Held(q)) => q,
            Some(relayed @ Route::Relayed(..)) => {
                router.conns.insert(conn, relayed);
                tracing::warn!(conn, "a relay is already attached to this connection");
                return Err(None);
            }
            None if known => Vec::new(),
            None => return Err(start),
        };
        if router.closed.is_some() || (!known && held.is_empty()) {
            return Err(start);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (abort_tx, abort_rx) = oneshot::channel();
        let credit = Arc::new(Notify::new());
        let (pre, track) = match start {
            Some(Start { replay, track }) => {
                let tracked = track.as_ref().is_some_and(|t| !t.settled());
                let pre = (tracked || !replay.is_empty() || replay.fin)
                    .then(|| PreAccept::new(replay, tracked, preaccept::cap(peer_window)));
                (pre, track)
            }
            None => (None, None),
        };
        let counters = Arc::new(Counters {
            peer_window,
            track,
            ..Counters::default()
        });
        let mut attached = Attached {
            inbound: tx,
            credit: credit.clone(),
            abort: Some(abort_tx),
            receive: match splices {
                true => Receive::Lazy,
                false => Receive::Copy,
            },
        };
        for ev in held {
            attached.deliver(ev);
        }
        router
            .conns
            .insert(conn, Route::Relayed(attached, counters.clone()));
        Ok(Attachment {
            inbound: rx,
            credit,
            abort: abort_rx,
            counters,
            pre,
        })
    }
}

/// A relay attached to its connection.
struct Attachment {
    inbound: mpsc::UnboundedReceiver<ConnEvent>,
    credit: Arc<Notify>,
    abort: oneshot::Receiver<i32>,
    counters: Arc<Counters>,
    /// io-server: the connection starts with a replay, or is kept until
    /// the node's program accepts it.
    pre: Option<PreAccept>,
}

/// What [`Endpoint::run_relay`] did.
enum Relayed<S> {
    /// The relay ran and stopped; the stream is back, open.
    Ran {
        end: End,
        stream: S,
        counters: Arc<Counters>,
        /// What is kept of a connection not accepted yet.
        pre: Option<PreAccept>,
    },
    /// No relay could attach (unknown connection, or a closed channel).
    NotAttached { stream: S, start: Option<Start> },
}

/// Why a relay stopped.
#[derive(Debug, Clone, Copy)]
enum End {
    Done,
    Peer(i32),
    Local(i32),
}

/// How the peer-to-stream direction stopped.
enum DownEnd {
    /// Fin written through and the other direction already done.
    Finished,
    Closed(i32),
}

/// A socket shared behind an `Arc`, read and written through its
/// readiness (tokio implements the I/O traits only for an owned stream).
struct Shared<T>(Arc<T>);

impl<T: ReadySocket> AsyncRead for Shared<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Each WouldBlock clears the readiness, so the next poll parks.
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let want = buf.remaining();
            let mut got = 0;
            // A short read drained the socket (epoll): report WouldBlock to
            // `try_io` so it clears the readiness now, as tokio's own
            // poll_read does, instead of paying a recv that fails next time.
            let r = self.0.try_io(Interest::READABLE, || {
                // Into the unfilled part as it is: the relay reads straight
                // into the channel's output buffer, whose spare room is not
                // initialised, and zeroing 64 KiB per read cost more than
                // the read. SAFETY: recv only writes to the slice.
                got = socket2::SockRef::from(&*self.0).recv(unsafe { buf.unfilled_mut() })?;
                if got > 0 && got < want {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got == 0 => {}
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
                _ => {
                    // SAFETY: recv wrote (initialised) the first `got` octets.
                    unsafe { buf.assume_init(got) };
                    buf.advance(got);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<T: ReadySocket> Shared<T> {
    /// Runs `write` once the socket is writable, until it does not block.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&T) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }
}

impl<T: ReadySocket> AsyncWrite for Shared<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// What one read of the stream did.
enum Chunk {
    Eof,
    /// This many octets were sent on the connection.
    Sent(usize),
    /// The channel no longer takes data for the connection.
    Refused,
}

/// One relay's two directions.
struct Pump<'a, T> {
    ep: &'a Endpoint,
    conn: ConnId,
    counters: &'a Counters,
    /// The stream's socket, when bulk payloads may be spliced from it and
    /// into it.
    socket: Option<&'a T>,
    /// io-server: the replay to send first, and the client's octets kept
    /// until the node's program accepts the connection; `None` inside
    /// once that is over.
    pre: Option<&'a Mutex<Option<PreAccept>>>,
}

fn lock_pre(pre: &Mutex<Option<PreAccept>>) -> MutexGuard<'_, Option<PreAccept>> {
    pre.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: ReadySocket> Pump<'_, T> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut rd: tokio::io::ReadHalf<S>,
        mut wr: tokio::io::WriteHalf<S>,
        mut inbound: mpsc::UnboundedReceiver<ConnEvent>,
        credit: &Notify,
        mut abort: oneshot::Receiver<i32>,
    ) -> (End, tokio::io::ReadHalf<S>, tokio::io::WriteHalf<S>) {
        let up_done = AtomicBool::new(false);
        let fin_seen = AtomicBool::new(false);
        let end = {
            let up = self.upstream(&mut rd, credit);
            let down = self.downstream(&mut wr, &mut inbound, &up_done, &fin_seen);
            tokio::pin!(up, down);
            let mut abort_live = true;
            loop {
                tokio::select! {
                    r = &mut up, if !up_done.load(Ordering::Relaxed) => match r {
                        Ok(()) => {
                            up_done.store(true, Ordering::Relaxed);
                            if fin_seen.load(Ordering::Relaxed) {
                                break End::Done;
                            }
                        }
                        Err(e) => break End::Local(io_errno(&e)),
                    },
                    r = &mut down => break match r {
                        Ok(DownEnd::Finished) => End::Done,
                        Ok(DownEnd::Closed(e)) => End::Peer(e),
                        Err(e) => End::Local(io_errno(&e)),
                    },
                    r = &mut abort, if abort_live => {
                        abort_live = false;
                        if let Ok(e) = r {
                            break End::Peer(e);
                        }
                    }
                }
            }
        };
        (end, rd, wr)
    }

    /// Stream -> connection, never past the peer's credit.
    ///
    /// No buffer is kept across the wait for data (an idle connection costs
    /// no buffer): each read goes straight into a Data frame in the
    /// channel's output, in the poll that reads.
    async fn upstream<R: AsyncRead + Unpin>(&self, rd: &mut R, credit: &Notify) -> io::Result<()> {
        if let Some(pre) = self.pre {
            if self.pre_accept(rd, credit, pre).await? {
                return Ok(());
            }
        }
        let handle = self.ep.handle();
        let conn = self.conn;
        // Whether the last read was a bulk one (worth splicing the next).
        let mut bulk = false;
        loop {
            let window = loop {
                let (window, known) =
                    handle.with(|ch| (ch.send_window(conn), ch.has_connection(conn)));
                if !known {
                    // The peer dropped the connection (or the channel
                    // closed): that news is on its way to the other
                    // direction, which ends the relay.
                    std::future::pending::<()>().await;
                }
                if window > 0 {
                    break window;
                }
                credit.notified().await;
            };
            let chunk = std::future::poll_fn(|cx| {
                if let (true, Some(socket), Some(pipe)) = (bulk, self.socket, handle.pipe()) {
                    if pipe.room() >= SPLICE_MIN {
                        match poll_splice(cx, handle, conn, window, socket, pipe) {
                            Poll::Ready(Some(r)) => return Poll::Ready(r),
                            Poll::Pending => return Poll::Pending,
                            // The pipe is full: copy this read.
                            Poll::Ready(None) => {}
                        }
                    }
                }
                // Only this task sends on `conn`, so the window still holds.
                let sent = handle.with(|ch| {
                    ch.send_message_with(conn, window, |rb| Pin::new(&mut *rd).poll_read(cx, rb))
                });
                Poll::Ready(Ok::<_, io::Error>(match sent {
                    Ok(Some((_, Poll::Pending))) => return Poll::Pending,
                    Ok(Some((_, Poll::Ready(Err(e))))) => return Poll::Ready(Err(e)),
                    Ok(Some((0, Poll::Ready(Ok(()))))) => Chunk::Eof,
                    Ok(Some((n, Poll::Ready(Ok(()))))) => Chunk::Sent(n),
                    // The window shut meanwhile: wait for credit again.
                    Ok(None) => Chunk::Sent(0),
                    Err(_) => Chunk::Refused,
                }))
            })
            .await?;
            match chunk {
                Chunk::Eof => {
                    let _ = handle.with(|ch| ch.send_fin(conn));
                    return Ok(());
                }
                Chunk::Sent(n) => {
                    bulk = n >= SPLICE_MIN;
                    self.counters
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                // The connection is going away; the other direction ends the relay.
                Chunk::Refused => std::future::pending::<()>().await,
            }
        }
    }

    /// Stream -> connection while the connection starts with a replay or
    /// is kept until the node's program accepts it ([`preaccept`]): the
    /// replay goes first, then reads, each kept (in the poll that reads
    /// it, so a relay stopped at any await has lost nothing) and at most
    /// the pre-accept cap of them. Never spliced. `Ok(true)`: the client's
    /// FIN went out, nothing more goes this way.
    async fn pre_accept<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        credit: &Notify,
        pre: &Mutex<Option<PreAccept>>,
    ) -> io::Result<bool> {
        let handle = self.ep.handle();
        let conn = self.conn;
        loop {
            let (window, known) = handle.with(|ch| (ch.send_window(conn), ch.has_connection(conn)));
            if !known {
                // As in `upstream`: the other direction ends the relay.
                std::future::pending::<()>().await;
            }
            let step = {
                let mut g = lock_pre(pre);
                let Some(p) = g.as_mut() else {
                    return Ok(false);
                };
                if self.counters.accepted() {
                    p.accept();
                }
                p.next(window)
            };
            match step {
                Step::Send(n) => {
                    let sent = {
                        let mut g = lock_pre(pre);
                        let p = g.as_mut().expect("pre-accept state");
                        let r = handle.with(|ch| ch.send_message(conn, &p.unsent()[..n]));
                        if let Ok(k) = r {
                            p.sent(k);
                        }
                        r
                    };
                    match sent {
                        Ok(k) => {
                            self.counters
                                .bytes_in
                                .fetch_add(k as u64, Ordering::Relaxed);
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                }
                Step::Fin => {
                    let mut g = lock_pre(pre);
                    if let Some(p) = g.as_mut() {
                        p.fin_sent();
                    }
                    drop(g);
                    let _ = handle.with(|ch| ch.send_fin(conn));
                    return Ok(true);
                }
                Step::Finished => return Ok(true),
                Step::Done => {
                    // Accepted and all sent: nothing is kept any more.
                    *lock_pre(pre) = None;
                    return Ok(false);
                }
                // Credit, or the accept, wakes this.
                Step::Wait => credit.notified().await,
                Step::Read(limit) => {
                    let read = std::future::poll_fn(|cx| {
                        let sent = handle.with(|ch| {
                            ch.send_message_with(conn, limit, |rb| {
                                let r = Pin::new(&mut *rd).poll_read(cx, rb);
                                if let Poll::Ready(Ok(())) = r {
                                    let mut g = lock_pre(pre);
                                    if let Some(p) = g.as_mut() {
                                        p.read(rb.filled());
                                    }
                                }
                                r
                            })
                        });
                        Poll::Ready(Ok::<_, io::Error>(match sent {
                            Ok(Some((_, Poll::Pending))) => return Poll::Pending,
                            Ok(Some((_, Poll::Ready(Err(e))))) => return Poll::Ready(Err(e)),
                            Ok(Some((0, Poll::Ready(Ok(()))))) => Chunk::Eof,
                            Ok(Some((n, Poll::Ready(Ok(()))))) => Chunk::Sent(n),
                            Ok(None) => Chunk::Sent(0),
                            Err(_) => Chunk::Refused,
                        }))
                    });
                    // An accept while the client is quiet ends the
                    // pre-accept phase (and frees what is kept) at once.
                    let chunk = tokio::select! {
                        chunk = read => chunk?,
                        _ = credit.notified() => continue,
                    };
                    match chunk {
                        Chunk::Eof => {
                            let mut g = lock_pre(pre);
                            if let Some(p) = g.as_mut() {
                                p.eof();
                            }
                        }
                        Chunk::Sent(n) => {
                            self.counters
                                .bytes_in
                                .fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Chunk::Refused => std::future::pending::<()>().await,
                    }
                }
            }
        }
    }

    /// Connection -> stream: each Data is written fully, then credited.
    async fn downstream<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        inbound: &mut mpsc::UnboundedReceiver<ConnEvent>,
        up_done: &AtomicBool,
        fin_seen: &AtomicBool,
    ) -> io::Result<DownEnd> {
        let handle = self.ep.handle();
        // Data already queued behind the first goes out in the same write
        // (one syscall and one wake-up of the reader for a fabric read's
        // worth of frames); the event that ends a batch waits here.
        let mut next = None;
        loop {
            let ev = match next.take() {
                Some(ev) => Some(ev),
                None => inbound.recv().await,
            };
            match ev {
                Some(ConnEvent::Data(data)) => {
                    // Made per batch: an idle relay keeps no allocation.
                    let mut batch = vec![data];
                    while batch.len() < MAX_BATCH {
                        match inbound.try_recv() {
                            Ok(ConnEvent::Data(more)) => batch.push(more),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // Boxed: this future is large and rare; inline, every
                    // relay task (idle ones too) would be that much larger.
                    let n = Box::pin(write_all_vectored(wr, &batch)).await?;
                    handle.with(|ch| ch.consumed(self.conn, n));
                    self.counters
                        .bytes_out
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Some(ConnEvent::Spliced(len, pipe)) => {
                    let socket = self.socket.ok_or(io::ErrorKind::Unsupported)?;
                    // Boxed, as the vectored write above.
                    Box::pin(pipe.drain_into(socket, len)).await?;
                    handle.with(|ch| ch.consumed(self.conn, len));
                    self.counters
                        .bytes_out
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
                Some(ConnEvent::Fin) => {
                    wr.shutdown().await?;
                    fin_seen.store(true, Ordering::Relaxed);
                    if up_done.load(Ordering::Relaxed) {
                        return Ok(DownEnd::Finished);
                    }
                }
                Some(ConnEvent::Closed(e)) => return Ok(DownEnd::Closed(e)),
                Some(ConnEvent::Credit) => {}
                None => return Ok(DownEnd::Closed(errno::ECONNABORTED)),
            }
        }
    }
}

/// One read of `socket` spliced into the channel's pipe as a Data
/// payload (see [`crate::splice`]); `None`: the pipe is full, copy instead.
fn poll_splice(
    cx: &mut Context<'_>,
    handle: &FabricHandle,
    conn: ConnId,
    window: usize,
    socket: &impl ReadySocket,
    pipe: &Pipe,
) -> Poll<Option<io::Result<Chunk>>> {
    let fd = socket.as_raw_fd();
    let r = ready!(splice::poll_spliced(cx, socket, || {
        // Only this task sends on `conn`, so the window still holds.
        let sent = handle.with(|ch| {
            ch.send_message_spliced(conn, window, |room| match pipe.fill(fd, room) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            })
        });
        match sent {
            Ok(Some((_, Ok(0)))) => Ok(Chunk::Eof),
            Ok(Some((n, Ok(_)))) => Ok(Chunk::Sent(n)),
            Ok(Some((_, Err(e)))) => Err(e),
            Ok(None) => Ok(Chunk::Sent(0)),
            Err(_) => Ok(Chunk::Refused),
        }
    }));
    Poll::Ready(match r {
        Ok(Some(chunk)) => Some(Ok(chunk)),
        Ok(None) => None,
        // A socket splice does not take: copy.
        Err(e) if splice::unspliceable(&e) => None,
        Err(e) => Some(Err(e)),
    })
}

/// At most this many Data frames go into one vectored write (`IOV_MAX`
/// is far larger; this bounds what one write holds back from the credit).
const MAX_BATCH: usize = 16;

/// Writes every octet of `bufs` in order, vectored where the stream allows;
/// returns how many were written.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bufs: &[Bytes],
) -> io::Result<usize> {
    let total = bufs.iter().map(Bytes::len).sum();
    if bufs.len() == 1 || !wr.is_write_vectored() {
        for b in bufs {
            wr.write_all(b).await?;
        }
        return Ok(total);
    }
    let (mut first, mut skip) = (0, 0);
    while first < bufs.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&bufs[first][skip..])
            .chain(bufs[first + 1..].iter().map(|b| &b[..]))
            .map(io::IoSlice::new)
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Step past what was written: whole buffers, then into one.
        n += skip;
        while first < bufs.len() && n >= bufs[first].len() {
            n -= bufs[first].len();
            first += 1;
        }
        skip = n;
    }
    Ok(total)
}

/// The router task: routes the events the reader task does not (a
/// `Closed` raised by a local call).
async fn route(
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
fn route_one(router: &Mutex<Router>, tx: &mpsc::UnboundedSender<EndpointEvent>, ev: Event) -> bool {
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
        Event::WeightChanged { weight } => Some(EndpointEvent::WeightChanged { weight }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelConfig;
    use crate::transport::memory_pair;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;
    use tokio::time::timeout;

    const WINDOW: u32 = 64 * 1024;
    const LIMIT: Duration = Duration::from_secs(10);

    struct Pair {
        server: Endpoint,
        server_rx: mpsc::UnboundedReceiver<EndpointEvent>,
        node: Endpoint,
        node_rx: mpsc::UnboundedReceiver<EndpointEvent>,
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<EndpointEvent>) -> EndpointEvent {
        timeout(LIMIT, rx.recv())
            .await
            .expect("event in time")
            .expect("event")
    }

    /// An io-server and a node endpoint, authenticated, over memory.
    async fn pair() -> Pair {
        pair_over(memory_pair(), WINDOW).await
    }

    async fn pair_over(
        ((sr, sw), (nr, nw)): (
            (impl TransportRead, impl TransportWrite),
            (impl TransportRead, impl TransportWrite),
        ),
        window: u32,
    ) -> Pair {
        let server_ch = Channel::io_server(ChannelConfig::new("t").window(window));
        let node_ch = Channel::node(ChannelConfig::new("t").node("n1", 1).window(window));
        let (server, mut server_rx) = Endpoint::spawn(server_ch, sr, sw);
        let (node, mut node_rx) = Endpoint::spawn(node_ch, nr, nw);
        assert!(matches!(
            next(&mut server_rx).await,
            EndpointEvent::NodeAuthenticated { ref node, weight: 1 } if node == "n1"
        ));
        server.handle().with(|ch| ch.welcome(7));
        assert_eq!(
            next(&mut node_rx).await,
            EndpointEvent::Welcome { node_id: 7 }
        );
        Pair {
            server,
            server_rx,
            node,
            node_rx,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The io-server accepts a client connection for listener 2; returns
    /// (io-server conn, node conn).
    async fn accept(p: &mut Pair) -> ConnId {
        let conn = p
            .server
            .accept_connection(2, addr(40000), addr(80))
            .unwrap();
        match next(&mut p.node_rx).await {
            EndpointEvent::ConnectionAccepted {
                listener: 2,
                conn: c,
                ..
            } => assert_eq!(c, conn),
            other => panic!("expected ConnectionAccepted, got {other:?}"),
        }
        conn
    }

    /// Writes `data` to `w` and shuts it down while reading `r` to its end;
    /// returns what `r` gave.
    async fn send_and_read_all<W, R>(mut w: W, data: &[u8], mut r: R) -> Vec<u8>
    where
        W: tokio::io::AsyncWrite + Unpin,
        R: tokio::io::AsyncRead + Unpin,
    {
        let write = async {
            w.write_all(data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        timeout(LIMIT, async { tokio::join!(write, read) })
            .await
            .unwrap()
            .1
            .unwrap();
        got
    }

    /// The node sends `Listen { conn: 4, backlog: 8 }` in a task.
    fn ask_listen(p: &Pair) -> tokio::task::JoinHandle<Result<Response, EndpointError>> {
        let node = p.node.clone();
        tokio::spawn(async move {
            node.request(Request::Listen {
                conn: 4,
                backlog: 8,
            })
            .await
        })
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A vectored writer that takes at most 7 octets per call.
    struct Trickle(Vec<u8>, usize);

    impl Trickle {
        fn take(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
            self.1 += 1;
            let mut room = 7;
            for b in bufs {
                let n = b.len().min(room);
                self.0.extend_from_slice(&b[..n]);
                room -= n;
            }
            7 - room
        }
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(self.take(&[io::IoSlice::new(buf)])))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(self.take(bufs)))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_survives_short_vectored_writes_in_order() {
        let bufs: Vec<Bytes> = [&b"abc"[..], b"", b"defghijklmno", b"p", b"qrstuvwxyz0123"]
            .iter()
            .map(|b| Bytes::copy_from_slice(b))
            .collect();
        let mut w = Trickle(Vec::new(), 0);
        let n = write_all_vectored(&mut w, &bufs).await.unwrap();
        assert_eq!(n, 30);
        assert_eq!(w.0, b"abcdefghijklmnopqrstuvwxyz0123");
        assert_eq!(
            w.1, 5,
            "each write took as much as it could, across buffers"
        );
    }

    #[tokio::test]
    async fn request_gets_its_response() {
        let mut p = pair().await;
        let asked = ask_listen(&p);
        let EndpointEvent::Request { req, request } = next(&mut p.server_rx).await else {
            panic!("expected a request");
        };
        assert_eq!(
            request,
            Request::Listen {
                conn: 4,
                backlog: 8
            }
        );
        let answer = Response::Status {
            errno: 98,
            addr: None,
        };
        p.server.respond(req, answer.clone());
        assert_eq!(asked.await.unwrap().unwrap(), answer);
    }

    #[tokio::test]
    async fn request_fails_when_the_channel_closes() {
        let mut p = pair().await;
        let asked = ask_listen(&p);
        assert!(matches!(
            next(&mut p.server_rx).await,
            EndpointEvent::Request { .. }
        ));
        p.server.handle().with(|ch| ch.close("test over"));
        let err = timeout(LIMIT, asked).await.unwrap().unwrap().unwrap_err();
        assert!(
            matches!(err, EndpointError::Closed(ref r) if r.contains("test over")),
            "{err}"
        );
        assert!(matches!(
            next(&mut p.node_rx).await,
            EndpointEvent::Closed { .. }
        ));
    }

    #[tokio::test]
    async fn relay_copies_both_ways_with_half_close() {
        let mut p = pair().await;
        let conn = accept(&mut p).await;
        // Client <-> io-server relay over a duplex; node relay <-> app over a UnixStream pair.
        let (mut client, client_side) = tokio::io::duplex(8192);
        let (mut app, app_side) = UnixStream::pair().unwrap();
        let (s, n) = (p.server.clone(), p.node.clone());
        let server_relay = tokio::spawn(async move { s.relay(conn, client_side).await });
        let node_relay = tokio::spawn(async move { n.relay(conn, app_side).await });

        let request = pattern(1 << 20, 1);
        let reply = pattern(300_000, 2);
        let (req2, rep2) = (request.clone(), reply.clone());
        let app_task = tokio::spawn(async move {
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            assert!(got == req2, "app received the request intact");
            app.write_all(&rep2).await.unwrap();
            app.shutdown().await.unwrap();
        });
        let (cr, cw) = tokio::io::split(&mut client);
        let got = send_and_read_all(cw, &request, cr).await;
        assert!(got == reply, "client received the reply intact");
        timeout(LIMIT, app_task).await.unwrap().unwrap();
        let so = timeout(LIMIT, server_relay).await.unwrap().unwrap();
        let no = timeout(LIMIT, node_relay).await.unwrap().unwrap();
        assert_eq!(
            so,
            RelayOutcome {
                bytes_in: request.len() as u64,
                bytes_out: reply.len() as u64,
                errno: 0
            }
        );
        assert_eq!(
            no,
            RelayOutcome {
                bytes_in: reply.len() as u64,
                bytes_out: request.len() as u64,
                errno: 0
            }
        );
        assert_eq!(p.server.handle().with(|ch| ch.connection_count()), 0);
    }

    #[tokio::test]
    async fn stalled_reader_does_not_stall_another_connection() {
        let mut p = pair().await;
        let stalled = accept(&mut p).await;
        let live = accept(&mut p).await;
        let mut relays = Vec::new();
        let mut clients = Vec::new();
        let mut apps = Vec::new();
        for conn in [stalled, live] {
            let (client, client_side) = tokio::io::duplex(8192);
            let (app, app_side) = UnixStream::pair().unwrap();
            let (s, n) = (p.server.clone(), p.node.clone());
            relays.push(tokio::spawn(
                async move { s.relay(conn, client_side).await },
            ));
            relays.push(tokio::spawn(async move { n.relay(conn, app_side).await }));
            clients.push(client);
            apps.push(app);
        }
        let live_app = apps.pop().unwrap();
        let _stalled_app = apps.pop().unwrap(); // never read
        let live_client = clients.pop().unwrap();
        let stalled_client = clients.pop().unwrap();
        let data = pattern(2 << 20, 3);
        stall_one_and_pass_the_other(
            &p,
            stalled,
            WINDOW,
            stalled_client,
            live_client,
            live_app,
            data,
        )
        .await;
    }

    /// The stalled client writes until everything between it and its
    /// (never reading) app is full; the io-server then holds at least half
    /// the window for it and never more than the window, while `data`
    /// passes through the live connection intact.
    async fn stall_one_and_pass_the_other(
        p: &Pair,
        stalled: ConnId,
        window: u32,
        mut stalled_client: impl AsyncWrite + Unpin + Send + 'static,
        mut live_client: impl AsyncWrite + Unpin,
        mut live_app: impl AsyncRead + Unpin + Send + 'static,
        data: Vec<u8>,
    ) {
        let flood = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            while stalled_client.write_all(&chunk).await.is_ok() {}
        });
        let deadline = tokio::time::Instant::now() + LIMIT;
        while p.server.pending_bytes(stalled) < u64::from(window) / 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "stalled conn never filled"
            );
            tokio::task::yield_now().await;
        }
        let expect = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expect.len()];
            live_app.read_exact(&mut got).await.unwrap();
            assert!(got == expect, "the live connection's octets arrive intact");
        });
        timeout(LIMIT, live_client.write_all(&data))
            .await
            .unwrap()
            .unwrap();
        timeout(LIMIT, reader).await.unwrap().unwrap();
        assert!(p.server.pending_bytes(stalled) <= u64::from(window));
        assert!(
            !flood.is_finished(),
            "the stalled client is blocked, not failed"
        );
        flood.abort();
    }

    #[tokio::test]
    async fn relay_tcp_shares_the_socket_with_its_owner_and_half_closes() {
        let mut p = pair().await;
        let conn = accept(&mut p).await;
        let listener = tokio::net::TcpListener::bind(addr(0)).await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let server_side = Arc::new(listener.accept().await.unwrap().0);
        let owner = server_side.clone();
        let (mut app, app_side) = UnixStream::pair().unwrap();
        let (s, n) = (p.server.clone(), p.node.clone());
        let server_relay = tokio::spawn(async move { s.relay_tcp(conn, server_side).await });
        let node_relay = tokio::spawn(async move { n.relay(conn, app_side).await });
        // The owner sets an option on the socket while it is relayed.
        owner.set_nodelay(true).unwrap();
        assert!(owner.nodelay().unwrap());
        let request = pattern(200_000, 4);
        let (mut cr, cw) = client.split();
        let got = send_and_read_all(cw, &request, &mut app).await;
        assert!(got == request, "the app received the client's bytes intact");
        app.write_all(b"bye").await.unwrap();
        app.shutdown().await.unwrap();
        let mut reply = Vec::new();
        timeout(LIMIT, cr.read_to_end(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, b"bye", "the app's FIN reached the client as EOF");
        let so = timeout(LIMIT, server_relay).await.unwrap().unwrap();
        timeout(LIMIT, node_relay).await.unwrap().unwrap();
        assert_eq!((so.bytes_in, so.bytes_out, so.errno), (200_000, 3, 0));
        assert_eq!(
            Arc::strong_count(&owner),
            1,
            "the relay let go of the socket"
        );
    }

    /// Octets whose value depends on their position well past 256, so
    /// that two frames swapped in order would not compare equal.
    fn unique_pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// A pair over a unix socket, a transport that splices both ways, with
    /// the default window (reads of full Data frames, which splice).
    async fn socket_pair() -> Pair {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        pair_over(
            (
                crate::transport::unix_socket(a),
                crate::transport::unix_socket(b),
            ),
            crate::channel::DEFAULT_WINDOW,
        )
        .await
    }

    #[tokio::test]
    async fn bulk_streams_are_spliced_into_a_socket_fabric_intact_both_ways() {
        let mut p = socket_pair().await;
        assert!(
            p.server.handle().pipe().is_some(),
            "the socket fabric has a pipe"
        );
        let listener = tokio::net::TcpListener::bind(addr(0)).await.unwrap();
        // Four bulk clients at once, their frames interleaved on the
        // channel: spliced payloads among copied ones (each stream's first
        // read is copied, and any read that finds the pipe short of room).
        const CLIENTS: u32 = 4;
        const LEN: usize = 6 << 20;
        let mut streams = Vec::new();
        for i in 0..CLIENTS {
            let conn = accept(&mut p).await;
            let client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let server_side = Arc::new(listener.accept().await.unwrap().0);
            let (app, app_side) = UnixStream::pair().unwrap();
            let (s, n) = (p.server.clone(), p.node.clone());
            let relays = tokio::spawn(async move {
                let (so, no) =
                    tokio::join!(s.relay_tcp(conn, server_side), n.relay_unix(conn, app_side));
                (so, no)
            });
            streams.push((i, client, app, relays));
        }
        let checks = streams
            .into_iter()
            .map(|(i, mut client, mut app, relays)| async move {
                let data = unique_pattern(LEN, i);
                let (cr, cw) = client.split();
                let got = send_and_read_all(cw, &data, &mut app).await;
                assert!(
                    got == data,
                    "client {i}: the app received the bytes intact, in order"
                );
                // The app's reply, spliced by the node's relay, then EOF.
                let reply = unique_pattern(LEN, i + 100);
                let got = send_and_read_all(&mut app, &reply, cr).await;
                assert!(
                    got == reply,
                    "client {i}: the reply arrived intact, in order"
                );
                drop(client);
                let (so, no) = timeout(LIMIT, relays).await.unwrap().unwrap();
                let all = (LEN as u64, LEN as u64, 0);
                assert_eq!((so.bytes_in, so.bytes_out, so.errno), all);
                assert_eq!((no.bytes_in, no.bytes_out, no.errno), all);
            });
        futures_join_all(checks).await;
        for ep in [&p.server, &p.node] {
            let stats = ep.handle().with(|ch| ch.stats());
            assert!(
                stats.bytes_spliced > 0 && stats.bytes_spliced < stats.bytes_sent,
                "both spliced and copied payloads went out: {stats:?}"
            );
        }
        // Into the app's unix sockets, payloads were spliced too (and the
        // start of each frame copied); into TCP sockets, none.
        let node = p.node.handle().with(|ch| ch.stats());
        assert!(
            node.bytes_received_spliced > node.bytes_received / 2
                && node.bytes_received_spliced < node.bytes_received,
            "{node:?}"
        );
        let server = p.server.handle().with(|ch| ch.stats());
        assert_eq!(server.bytes_received_spliced, 0, "{server:?}");
    }

    /// A program that stops reading fills its connection's receive pipe
    /// (and then its queue), never the channel: the other connection's
    /// payloads, spliced, keep arriving.
    #[tokio::test]
    async fn a_stalled_program_does_not_stall_a_spliced_connection() {
        let mut p = socket_pair().await;
        let mut clients = Vec::new();
        let mut apps = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..2 {
            let conn = accept(&mut p).await;
            let (client, client_side) = UnixStream::pair().unwrap();
            let (app, app_side) = UnixStream::pair().unwrap();
            let (s, n) = (p.server.clone(), p.node.clone());
            tokio::spawn(async move { s.relay_unix(conn, client_side).await });
            tokio::spawn(async move { n.relay_unix(conn, app_side).await });
            clients.push(client);
            apps.push(app);
            conns.push(conn);
        }
        let (live_app, _stalled_app) = (apps.pop().unwrap(), apps.pop().unwrap());
        let (live_client, stalled_client) = (clients.pop().unwrap(), clients.pop().unwrap());
        let data = unique_pattern(16 << 20, 9);
        let window = crate::channel::DEFAULT_WINDOW;
        stall_one_and_pass_the_other(
            &p,
            conns[0],
            window,
            stalled_client,
            live_client,
            live_app,
            data,
        )
        .await;
        let node = p.node.handle().with(|ch| ch.stats());
        assert!(node.bytes_received_spliced > 8 << 20, "{node:?}");
    }

    /// Runs the futures concurrently on this task.
    async fn futures_join_all<F: std::future::Future<Output = ()>>(fs: impl Iterator<Item = F>) {
        let mut set = Vec::new();
        for f in fs {
            set.push(Box::pin(f));
        }
        std::future::poll_fn(|cx| {
            set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
            if set.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    #[tokio::test]
    async fn connection_closed_errno_reaches_the_relay() {
        let mut p = pair().await;
        let conn = accept(&mut p).await;
        let (mut app, app_side) = UnixStream::pair().unwrap();
        let n = p.node.clone();
        let node_relay = tokio::spawn(async move { n.relay(conn, app_side).await });
        p.server.close_connection(conn, errno::ECONNRESET);
        let out = timeout(LIMIT, node_relay).await.unwrap().unwrap();
        assert_eq!(out.errno, errno::ECONNRESET);
        let mut buf = [0u8; 16];
        assert_eq!(
            timeout(LIMIT, app.read(&mut buf)).await.unwrap().unwrap(),
            0,
            "app sees the end"
        );
        assert_eq!(
            p.node.handle().with(|ch| ch.connection_count()),
            0,
            "node closed it too"
        );
    }

    #[tokio::test]
    async fn data_before_the_relay_attaches_is_held() {
        let mut p = pair().await;
        let conn = accept(&mut p).await;
        p.server
            .handle()
            .with(|ch| ch.send_message(conn, b"hello"))
            .unwrap();
        p.server.handle().with(|ch| ch.send_fin(conn)).unwrap();
        // Let the router see the data before attaching.
        let deadline = tokio::time::Instant::now() + LIMIT;
        while p.node.handle().with(|ch| ch.buffered(conn)) < 5 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        let (mut app, app_side) = UnixStream::pair().unwrap();
        let n = p.node.clone();
        let relay = tokio::spawn(async move { n.relay(conn, app_side).await });
        let mut got = Vec::new();
        timeout(LIMIT, app.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"hello");
        drop(app);
        p.server.close_connection(conn, 0);
        let out = timeout(LIMIT, relay).await.unwrap().unwrap();
        assert_eq!((out.bytes_out, out.errno), (5, 0));
    }

    /// A client TCP connection: (the client's end, the io-server's end).
    async fn tcp_client() -> (tokio::net::TcpStream, Arc<TcpStream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, l.accept());
        (client.unwrap(), Arc::new(accepted.unwrap().0))
    }

    /// A tracked client connection announced to the node of `p` and
    /// relayed on both ends (the program's end of the node's relay is
    /// returned, unread).
    async fn tracked(
        p: &mut Pair,
        replay: Replay,
    ) -> (
        ConnId,
        tokio::net::TcpStream,
        tokio::task::JoinHandle<ClientRelayEnd>,
        UnixStream,
    ) {
        let (client, server_end) = tcp_client().await;
        let conn = p
            .server
            .accept_connection_with(2, addr(40000), addr(80), &replay, true)
            .unwrap();
        assert!(matches!(
            next(&mut p.node_rx).await,
            EndpointEvent::ConnectionAccepted { conn: c, .. } if c == conn
        ));
        let s = p.server.clone();
        let relay = tokio::spawn(async move { s.relay_client(conn, server_end).await });
        let (app, app_side) = UnixStream::pair().unwrap();
        let n = p.node.clone();
        tokio::spawn(async move { n.relay_unix(conn, app_side).await });
        (conn, client, relay, app)
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Issue 17: the node's channel ends before its program accepted the
    /// connection; the io-server gets the client's socket back open, with
    /// the octets it forwarded (capped, kept), and the rest is still in the
    /// socket: every octet once, in order.
    #[tokio::test]
    async fn an_unaccepted_client_comes_back_whole_when_the_node_leaves() {
        let mut p = pair().await;
        let (conn, mut client, relay, _app) = tracked(&mut p, Replay::default()).await;
        assert_eq!(p.server.unaccepted(), 1);
        let sent = pattern(200_000, 7);
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let cap = preaccept::cap(u64::from(WINDOW));
        until("the pre-accept cap to be forwarded", || {
            p.server.relayed_bytes(conn).0 == cap as u64
        })
        .await;
        // The node dies (its channel ends).
        p.node.handle().with(|ch| ch.close("node killed"));
        let end = timeout(LIMIT, relay).await.unwrap().unwrap();
        let ClientRelayEnd::Unaccepted { stream, replay, .. } = end else {
            panic!("expected the client back, got {end:?}");
        };
        assert!(!replay.fin, "the FIN is still in the socket");
        assert_eq!(&replay.data[..], &sent[..cap], "exactly what was forwarded");
        assert_eq!(p.server.unaccepted(), 0);
        let mut stream = Arc::try_unwrap(stream).expect("no other owner");
        let mut rest = Vec::new();
        timeout(LIMIT, stream.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest == sent[cap..], "the rest is unread, then the FIN");
        // The client's connection is open: the next node answers on it.
        stream.write_all(b"served").await.unwrap();
        let mut answer = [0u8; 6];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"served");
    }

    /// A client that sent its request and its FIN before the node died
    /// comes back with both.
    #[tokio::test]
    async fn a_request_and_fin_forwarded_unaccepted_come_back_in_the_replay() {
        let mut p = pair().await;
        let (_conn, mut client, relay, mut app) = tracked(&mut p, Replay::default()).await;
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        // Both reached the node (its program never took them).
        let mut at_node = Vec::new();
        timeout(LIMIT, app.read_to_end(&mut at_node))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(at_node, b"GET / HTTP/1.0\r\n\r\n");
        p.node.handle().with(|ch| ch.close("node killed"));
        let end = timeout(LIMIT, relay).await.unwrap().unwrap();
        let ClientRelayEnd::Unaccepted { replay, .. } = end else {
            panic!("expected the client back, got {end:?}");
        };
        assert_eq!(
            replay,
            Replay {
                data: Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n"),
                fin: true
            }
        );
    }

    /// Once the node says its program accepted the connection, the cap is
    /// lifted, nothing is kept, and the channel ending closes it as before.
    #[tokio::test]
    async fn an_accepted_client_is_relayed_freely_and_not_given_back() {
        let mut p = pair().await;
        let (conn, mut client, relay, mut app) = tracked(&mut p, Replay::default()).await;
        p.node.accepted(conn, false);
        until("the accept to reach the io-server", || {
            p.server.unaccepted() == 0
        })
        .await;
        let sent = pattern(300_000, 9);
        let (sent2, got) = (
            sent.clone(),
            tokio::spawn(async move {
                let mut got = vec![0u8; 300_000];
                app.read_exact(&mut got).await.unwrap();
                (got, app)
            }),
        );
        client.write_all(&sent2).await.unwrap();
        let (got, _app) = timeout(LIMIT, got).await.unwrap().unwrap();
        assert!(got == sent, "past the cap, intact");
        p.node.handle().with(|ch| ch.close("node killed"));
        let end = timeout(LIMIT, relay).await.unwrap().unwrap();
        assert!(
            matches!(end, ClientRelayEnd::Finished(ref o) if o.bytes_in == sent.len() as u64),
            "{end:?}"
        );
    }

    /// The next node gets the replay first, then the rest of the stream.
    #[tokio::test]
    async fn a_replay_reaches_the_next_node_before_the_rest() {
        let mut p = pair().await;
        let first = Replay {
            data: Bytes::from(pattern(100_000, 3)),
            fin: false,
        };
        let (conn, mut client, relay, mut app) = tracked(&mut p, first.clone()).await;
        client.write_all(b"and the rest").await.unwrap();
        client.shutdown().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            got
        });
        // The replay alone is past the cap: the rest waits for the accept.
        until("the replay to be forwarded", || {
            p.server.relayed_bytes(conn).0 == first.data.len() as u64
        })
        .await;
        p.node.accepted(conn, false);
        let got = timeout(LIMIT, reader).await.unwrap().unwrap();
        let mut want = first.data.to_vec();
        want.extend_from_slice(b"and the rest");
        assert!(got == want, "replay, then the stream, each octet once");
        drop(client);
        let end = timeout(LIMIT, relay).await.unwrap().unwrap();
        assert!(matches!(end, ClientRelayEnd::Finished(_)), "{end:?}");
    }

    /// A replay ending in the client's FIN: the next node reads the
    /// octets, then the end.
    #[tokio::test]
    async fn a_replay_with_its_fin_ends_the_stream_after_it() {
        let mut p = pair().await;
        let replay = Replay {
            data: Bytes::from_static(b"request"),
            fin: true,
        };
        let (_conn, mut client, _relay, mut app) = tracked(&mut p, replay).await;
        // The client's FIN was read already by the io-server (a real
        // re-dispatch reads it again from the socket; here it is sent).
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        timeout(LIMIT, app.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"request");
    }

    /// The node's side of a handed-over socket: recorded for this channel
    /// only, accepted or closed once, never after the channel ended.
    #[tokio::test]
    async fn a_handed_connection_is_accepted_or_refused_once_and_only_on_its_channel() {
        let mut p = pair().await;
        let (a, b, c) = (
            p.server.hand_connection().unwrap(),
            p.server.hand_connection().unwrap(),
            p.server.hand_connection().unwrap(),
        );
        let local = 1 << 62;
        assert!(!p.node.handed(local, a, 8), "another node id (an old join)");
        assert!(p.node.handed(local, a, 7));
        assert!(p.node.handed(local + 1, b, 7));
        assert!(p.node.handed(local + 2, 0, 0), "not kept by the io-server");
        assert!(p.node.may_accept(local, true));
        assert!(!p.node.may_accept(local + 9, true), "recorded nowhere");
        p.node.accepted(local, true);
        p.node.accepted(local, true);
        p.node.close_handed(local + 1);
        p.node.close_handed(local + 2);
        assert_eq!(
            next(&mut p.server_rx).await,
            EndpointEvent::Accepted { conn: a }
        );
        assert_eq!(
            next(&mut p.server_rx).await,
            EndpointEvent::ConnectionClosed { conn: b, errno: 0 }
        );
        // The node's channel ends: what the io-server keeps is its own.
        assert!(p.node.handed(local + 3, c, 7));
        p.node.handle().with(|ch| ch.close("rejoining"));
        assert!(!p.node.may_accept(local + 3, true));
        assert!(!p.node.may_accept(2, false), "nor a relayed one");
        assert!(!p.node.may_accept(local + 2, true), "closed already");
        assert!(!p.node.handed(local + 4, c + 2, 7));
    }

    /// The program's first reply may come before the node's `Accepted`:
    /// it is the accept (only the program writes to its end).
    #[tokio::test]
    async fn a_reply_from_the_program_counts_as_its_accept() {
        let mut p = pair().await;
        let (_conn, mut client, relay, mut app) = tracked(&mut p, Replay::default()).await;
        assert_eq!(p.server.unaccepted(), 1);
        app.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        timeout(LIMIT, client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"hello");
        until("the reply to settle it", || p.server.unaccepted() == 0).await;
        p.node.handle().with(|ch| ch.close("node killed"));
        let end = timeout(LIMIT, relay).await.unwrap().unwrap();
        assert!(matches!(end, ClientRelayEnd::Finished(_)), "{end:?}");
    }

    /// Handed-over accepts are coalesced: the first goes at once, those
    /// right after it wait for the window's end (`driver::COALESCE`) and
    /// go together; none is lost.
    #[tokio::test]
    async fn handed_accepts_go_at_once_then_together() {
        let mut p = pair().await;
        let ids: Vec<ConnId> = (0..3)
            .map(|_| p.server.hand_connection().unwrap())
            .collect();
        for (i, &c) in ids.iter().enumerate() {
            assert!(p.node.handed(100 + i as u64, c, 7));
        }
        p.node.accepted(100, true);
        assert_eq!(
            next(&mut p.server_rx).await,
            EndpointEvent::Accepted { conn: ids[0] }
        );
        let start = std::time::Instant::now();
        p.node.accepted(101, true);
        p.node.accepted(102, true);
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let pending = p.node.handle().with(|ch| ch.pending_transmit());
        // (Only when this thread was not held up past the window.)
        if start.elapsed() < crate::driver::COALESCE / 2 {
            assert!(pending > 0, "held for the window");
        }
        for &c in &ids[1..] {
            assert_eq!(
                next(&mut p.server_rx).await,
                EndpointEvent::Accepted { conn: c }
            );
        }
    }
}
