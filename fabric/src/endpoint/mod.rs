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
//!
//! Timeouts (issue 24): the io-server's client connections are swept for
//! silence ([`Endpoint::sweep_quiet`], `quiet.rs`); one found past its
//! limit is aborted with `ETIMEDOUT`.
//!
//! Upgrade in place (issue 19): a running endpoint is frozen at clean
//! points ([`Endpoint::freeze`]), captured as data and duplicated
//! descriptors ([`Endpoint::capture`]) and made again from that, in this
//! process or another ([`Endpoint::resume`]); `freeze.rs`.
//!
//! Files: this one (the endpoint and its protocol calls), `router.rs` (the
//! per-connection route table), `relay.rs` (the pumps and splicing), `io.rs`
//! (the socket adapter and vectored writes), [`errno`] (the errno table),
//! `preaccept.rs` (a client kept until its program accepts it),
//! `quiet.rs` (idle and half-closed timeouts) and `freeze.rs` (freeze,
//! capture and resume).

pub mod errno;
mod freeze;
mod io;
mod preaccept;
mod quiet;
mod relay;
mod router;
mod waiting;

pub use errno::io_errno;
pub use freeze::{
    Capture, CaptureError, FreezeError, HeldEvent, PipeSnap, RelaySnap, ResumeError, Resumed,
    RouterSnap, RouterSnapError, StartSnap, ROUTER_SNAP_VERSION,
};
pub use preaccept::{PreAcceptSnap, Replay, PRE_ACCEPT_MAX};
pub use quiet::{Expiry, QuietLimits, QuietSnap};
pub use relay::ProgramEnd;
pub use router::EndpointEvent;
pub use waiting::{Place, Waiting};

use crate::channel::{CallError, Channel};
use crate::driver::{self, FabricHandle};
use crate::frame::{ConnId, ReqId, Request, Response};
use crate::splice::ReadySocket;
use crate::transport::{TransportRead, TransportWrite};
use io::SocketAdapter;
use preaccept::PreAccept;
use quiet::Quiet;
use relay::{Attachment, End, Pump, Relayed};
use router::{
    lock_router, route, Attached, Counters, Inbox, InboxSender, Receive, Route, RouteSink, Router,
    Start, Track,
};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::Instrument;

/// Errors of [`Endpoint::request`].
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("the fabric channel closed: {0}")]
    Closed(String),
    /// No answer within the endpoint's request timeout
    /// ([`Endpoint::set_request_timeout`]); the channel stays open.
    #[error("no answer from the io-server within {0:?}")]
    TimedOut(std::time::Duration),
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

struct Inner {
    handle: FabricHandle,
    router: Arc<Mutex<Router>>,
    /// io-server: tracked connections not yet accepted ([`Track`]).
    unaccepted: Arc<AtomicUsize>,
    /// Node: how long a request may wait for its answer, in ms (0: for
    /// ever).
    request_timeout: AtomicU64,
}

/// A running channel with per-connection routing. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Starts the channel's driver and the router on the current runtime.
    pub fn spawn<R: TransportRead, W: TransportWrite>(
        channel: Channel,
        r: R,
        w: W,
    ) -> (Endpoint, mpsc::UnboundedReceiver<EndpointEvent>) {
        Endpoint::start(Router::default(), Arc::default(), |sink| {
            driver::spawn_with_sink(channel, r, w, sink)
        })
    }

    /// Starts the router with `router`'s state over the driver `driver`
    /// starts; `unaccepted` counts the tracked connections in it.
    fn start(
        router: Router,
        unaccepted: Arc<AtomicUsize>,
        driver: impl FnOnce(RouteSink) -> (FabricHandle, mpsc::UnboundedReceiver<crate::channel::Event>),
    ) -> (Endpoint, mpsc::UnboundedReceiver<EndpointEvent>) {
        let router = Arc::new(Mutex::new(router));
        let (tx, rx) = mpsc::unbounded_channel();
        // The reader task routes what the peer sends itself (no hop through
        // the router task per frame); the router task gets the rest.
        let sink = RouteSink {
            router: router.clone(),
            tx: tx.clone(),
        };
        let (handle, events) = driver(sink);
        tokio::spawn(route(router.clone(), events, tx));
        let ep = Endpoint {
            inner: Arc::new(Inner {
                handle,
                router,
                unaccepted,
                request_timeout: AtomicU64::new(0),
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

    /// Node: how long [`Endpoint::request`] waits for an answer (`None`:
    /// for ever). The liveness ping gives up a channel that went silent;
    /// this gives up one request that a live channel does not answer.
    pub fn set_request_timeout(&self, limit: Option<std::time::Duration>) {
        let ms = limit.map_or(0, |d| d.as_millis().clamp(1, u64::MAX.into()) as u64);
        self.inner.request_timeout.store(ms, Ordering::Relaxed);
    }

    /// Node: sends a Figure 3 request and waits for its Response, at most
    /// the request timeout ([`EndpointError::TimedOut`]; a late answer is
    /// then dropped).
    pub async fn request(&self, request: Request) -> Result<Response, EndpointError> {
        let (req, rx) = {
            // The router lock is held across the send so the response cannot
            // be routed before its waiter is registered.
            let mut router = self.router();
            if let Some(reason) = &router.closed {
                return Err(EndpointError::Closed(reason.clone()));
            }
            let req = self.inner.handle.with(|ch| ch.request(request))?;
            let (tx, rx) = oneshot::channel();
            router.pending.insert(req, tx);
            (req, rx)
        };
        let answer = match self.inner.request_timeout.load(Ordering::Relaxed) {
            0 => rx.await,
            ms => {
                let limit = std::time::Duration::from_millis(ms);
                match tokio::time::timeout(limit, rx).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        self.router().pending.remove(&req);
                        return Err(EndpointError::TimedOut(limit));
                    }
                }
            }
        };
        answer.map_err(|_| {
            let reason = self.router().closed.clone();
            EndpointError::Closed(reason.unwrap_or_else(|| "no response".into()))
        })
    }

    /// io-server: the node's weight announced since the last call (the
    /// latest of them), after [`EndpointEvent::WeightChanged`].
    pub fn take_weight(&self) -> Option<u32> {
        self.router().weight.take()
    }

    /// io-server: answers request `req`.
    pub fn respond(&self, req: ReqId, response: Response) {
        self.inner.handle.with(|ch| ch.respond(req, response));
    }

    /// io-server: the node's outbound connect of `conn` is in flight from
    /// `local`; the node is told before the Connect's response where its
    /// channel speaks it (protocol version 4, or in-process), else nothing
    /// is sent. Whether it was sent.
    pub fn connecting(&self, conn: ConnId, local: SocketAddr) -> bool {
        self.inner.handle.with(|ch| ch.connecting(conn, local))
    }

    /// Whether the channel carries [`EndpointEvent::Connecting`] (protocol
    /// version 4, or in-process): a node may wait for the local address
    /// of a connect in flight.
    pub fn speaks_connecting(&self) -> bool {
        self.inner.handle.with(|ch| ch.speaks_connecting())
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
        self.accept_connection_with(listener, peer, local, &Replay::default(), false, None)
    }

    /// io-server: [`Endpoint::accept_connection`] for a client whose
    /// relay ([`Endpoint::relay_client`]) first sends `replay` (what a
    /// node that died before accepting it was sent). `track`: keep it for
    /// re-dispatch until the node's program accepts it, where the node
    /// says so (protocol version 2; else it is not kept). `waiting`: the
    /// member's count of connections not accepted yet, which a tracked
    /// connection takes a place in until its program accepts it (the
    /// io-server's admission, issue 24).
    pub fn accept_connection_with(
        &self,
        listener: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
        replay: &Replay,
        track: bool,
        waiting: Option<&Waiting>,
    ) -> Result<ConnId, CallError> {
        let mut router = self.router();
        let (conn, notifies) = self.inner.handle.with(|ch| {
            let conn = ch.accept_connection(listener, peer, local)?;
            Ok::<_, CallError>((conn, ch.notifies_accepts()))
        })?;
        router.expect(conn);
        let track = (track && notifies)
            .then(|| Track::new(&self.inner.unaccepted, waiting.map(Waiting::take)));
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
        router.resumed.remove(&conn);
        let progress = router.progress.clone();
        self.inner
            .handle
            .with(|ch| ch.close_connection(conn, errno));
        drop(router);
        // A freeze waiting for this relay to end sees it gone.
        progress.made();
    }

    /// io-server: reports an asynchronous error on `conn` (§2.3).
    pub fn report_error(&self, conn: ConnId, errno: i32) {
        self.inner.handle.with(|ch| ch.report_error(conn, errno));
    }

    /// Octets sent on `conn` that the peer has not yet acknowledged as
    /// consumed (Appendix A's arithmetic: [`Channel::unacknowledged`]). 0
    /// for a connection not relayed.
    pub fn pending_bytes(&self, conn: ConnId) -> u64 {
        let router = self.router();
        let relayed = matches!(router.conns.get(&conn), Some(Route::Relayed(..)));
        drop(router);
        if !relayed {
            return 0;
        }
        self.inner.handle.with(|ch| ch.unacknowledged(conn))
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
        self.relay_with(conn, stream, None::<&TcpStream>, None, |_| {})
            .await
    }

    /// [`Endpoint::relay`] for a unix stream socket (a node's end of a
    /// program's connection), splicing bulk reads as
    /// [`Endpoint::relay_tcp`] does.
    pub async fn relay_unix(&self, conn: ConnId, stream: UnixStream) -> RelayOutcome {
        let stream = Arc::new(stream);
        let source = stream.clone();
        self.relay_with(conn, SocketAdapter(stream), Some(&*source), None, |_| {})
            .await
    }

    /// Node: [`Endpoint::relay_unix`] of a program's connection, whose
    /// `program` end is told of a peer's reset and asked whether its own
    /// end of file was an abortive close ([`ProgramEnd`]).
    pub async fn relay_program(
        &self,
        conn: ConnId,
        stream: UnixStream,
        program: &dyn ProgramEnd,
    ) -> RelayOutcome {
        let stream = Arc::new(stream);
        let source = stream.clone();
        self.relay_with(
            conn,
            SocketAdapter(stream),
            Some(&*source),
            Some(program),
            |s| program.reset(&s.0),
        )
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
        self.relay_with(conn, SocketAdapter(stream), Some(&*source), None, |s| {
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
        let (end, stream, counters, pre) = match self
            .run_relay(conn, SocketAdapter(stream), Some(&*source), None, true)
            .await
        {
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
        program: Option<&dyn ProgramEnd>,
        abortive: F,
    ) -> RelayOutcome
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        F: FnOnce(&S),
        T: ReadySocket,
    {
        match self.run_relay(conn, stream, socket, program, false).await {
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
    /// open. `swept`: an io-server's client connection, which
    /// [`Endpoint::sweep_quiet`] watches.
    async fn run_relay<S, T>(
        &self,
        conn: ConnId,
        stream: S,
        socket: Option<&T>,
        program: Option<&dyn ProgramEnd>,
        swept: bool,
    ) -> Relayed<S>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        T: ReadySocket,
    {
        let span = tracing::debug_span!("relay", conn);
        let fd = socket.map(|s| s.as_raw_fd());
        let a = match self.attach(conn, fd, socket.is_some() && T::SPLICE_RECEIVED, swept) {
            Ok(a) => a,
            Err(start) => return Relayed::NotAttached { stream, start },
        };
        let pre = relay::lock_pre(&a.counters.pre).is_some();
        let (rd, wr) = tokio::io::split(stream);
        let (end, rd, wr) = Pump {
            handle: self.handle(),
            conn,
            counters: &a.counters,
            socket,
            pre: pre.then_some(&a.counters.pre),
            program,
        }
        .run(rd, wr, a.inbound, &a.credit, a.abort)
        .instrument(span)
        .await;
        let pre = relay::lock_pre(&a.counters.pre).take();
        Relayed::Ran {
            end,
            stream: rd.unsplit(wr),
            counters: a.counters,
            pre,
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
    /// for an unknown connection or a closed channel. `swept`: see
    /// [`Endpoint::run_relay`].
    ///
    /// A relay that attaches to a connection an upgrade in place carried
    /// ([`Endpoint::resume`]) goes on with its counters, half-close and
    /// pre-accept state; `socket`: the relay's socket, which a capture
    /// moves.
    fn attach(
        &self,
        conn: ConnId,
        socket: Option<RawFd>,
        splices: bool,
        swept: bool,
    ) -> Result<Attachment, Option<Start>> {
        let mut router = self.router();
        let start = router.starts.remove(&conn);
        let resumed = router.resumed.remove(&conn);
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
        let inbox = Arc::new(Inbox::default());
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
        let now = std::time::Instant::now();
        let quiet = match &resumed {
            Some(carried) => carried.quiet().map(|q| q.restore(now)),
            None => swept.then(|| Quiet::new(now)),
        };
        let counters = Arc::new(match resumed {
            Some(carried) => carried.counters(router.progress.clone()),
            None => Counters {
                track,
                pre: Mutex::new(pre),
                progress: router.progress.clone(),
                ..Counters::default()
            },
        });
        let mut attached = Attached {
            inbound: InboxSender(inbox.clone()),
            credit: credit.clone(),
            abort: Some(abort_tx),
            receive: match splices {
                true => Receive::Lazy,
                false => Receive::Copy,
            },
            quiet,
            socket,
        };
        for ev in held {
            attached.deliver(ev);
        }
        router
            .conns
            .insert(conn, Route::Relayed(attached, counters.clone()));
        Ok(Attachment {
            inbound: inbox,
            credit,
            abort: abort_rx,
            counters,
        })
    }
}

#[cfg(test)]
mod tests;
