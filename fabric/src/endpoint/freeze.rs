//! Freezing a running endpoint and resuming it elsewhere: the fabric's
//! part of the io-server's upgrade in place
//! (bench/notes/2026-12-03-upgrade-design.md, §2 "Quiesce", §4.3, §5
//! step 4).
//!
//! [`Endpoint::freeze`] stops everything at clean points and closes
//! nothing: the channel's send side ([`Channel::freeze`]: relays read no
//! more from their streams), the driver's tasks ([`Phase::Frozen`]: the
//! reader at its read, the timer, the writer at its next write, in the
//! middle of a piece of output if need be), then each relay's writing to
//! its stream, between two writes. Nothing is drained, everything is
//! captured (the design's "capture instead of drain", §2): the channel's
//! output with its pipe, and what each relay has not yet written to its
//! stream ([`RelaySnap::pending`]). A peer or a client that does not read
//! therefore never holds a freeze up. [`Endpoint::unfreeze`] goes back:
//! nothing was consumed, so nothing is put back.
//!
//! [`Endpoint::capture`] copies a frozen endpoint as data ([`Capture`]:
//! the [`ChannelSnap`] and the router's [`RouterSnap`]) and duplicates of
//! its descriptors, in a fixed order. [`Endpoint::resume`] makes an
//! equivalent endpoint of a capture, in this process or another, and
//! [`Endpoint::disown`] lets go of the old one without running a
//! destructor: tokio's write halves shut the socket's write side down on
//! drop, and a relay ended by its endpoint's drop sets `SO_LINGER` 0 on
//! the socket it shares with the new endpoint.

use super::preaccept::{PreAccept, PreAcceptSnap, Replay};
use super::quiet::QuietSnap;
use super::relay::lock_pre;
use super::router::{ConnEvent, Counters, Inbox, Progress, Route, RouteSink, Router, Start, Track};
use super::{Endpoint, EndpointEvent};
use crate::channel::{Channel, ChannelConfig, ChannelSnap, SnapError};
use crate::driver::{self, Phase};
use crate::frame::ConnId;
use crate::splice::{self, Pipe, ReceivePipe};
use crate::transport::{TransportRead, TransportWrite};
use bytes::Bytes;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

mod snapshot;
pub use snapshot::{RouterSnapError, ROUTER_SNAP_VERSION};

/// Why [`Endpoint::freeze`] gave up (the endpoint runs on, unfrozen).
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("the fabric channel is not open")]
    NotOpen,
    /// The driver's tasks did not all reach a clean point in time (a
    /// transport that cannot stop in the middle of a write, such as
    /// `rdma://`, finishes it first).
    #[error("the fabric's tasks did not pause within {0:?} (a write to the peer did not end)")]
    Writer(Duration),
    /// A relay did not reach its clean point in time, or did not end (one
    /// aborted, or done both ways).
    #[error("the relay of connection {conn} did not pause or end within {bound:?}")]
    Relay { conn: ConnId, bound: Duration },
}

/// Why [`Endpoint::capture`] refused (the endpoint stays frozen).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the endpoint is not frozen")]
    NotFrozen,
    #[error(transparent)]
    Snap(#[from] SnapError),
    #[error("{0} has no descriptor that can move")]
    NoDescriptor(String),
    #[error("{0} requests wait for their answers")]
    Requests(usize),
    #[error("connection {0} was carried by an earlier resume and its relay has not attached")]
    NotAttached(ConnId),
    #[error("the relay of connection {0} is not paused")]
    RelayNotParked(ConnId),
    #[error("connection {conn}: {buffered} octets received and not written to its stream, {expected} expected")]
    Unsettled {
        conn: ConnId,
        buffered: u64,
        expected: u64,
    },
    #[error(
        "connection {conn}: its receive pipe holds {inside} octets, its relay's payloads {queued}"
    )]
    ReceivePipe {
        conn: ConnId,
        inside: usize,
        queued: usize,
    },
    #[error("the channel's pipe holds {inside} octets, its count says {held}")]
    Pipe { inside: usize, held: usize },
    #[error("duplicating a descriptor: {0}")]
    Io(#[from] io::Error),
}

/// Why [`Endpoint::resume`] could not make an endpoint of a capture.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Snap(#[from] SnapError),
    #[error("descriptor {0} of the capture is missing, or named twice")]
    Fd(usize),
    #[error("descriptor {0} of the capture is not a stream socket")]
    NotAStream(usize),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A frozen endpoint, as data and descriptors ([`Endpoint::capture`]).
#[derive(Debug)]
pub struct Capture {
    pub channel: ChannelSnap,
    pub router: RouterSnap,
    /// Duplicates (close-on-exec) of the endpoint's descriptors, each
    /// named by its index in `router`: the transport's socket, then the
    /// channel pipe's read and write ends (if it has one), then each
    /// relay's socket in the order of [`RouterSnap::relays`].
    pub fds: Vec<OwnedFd>,
}

/// The router of a frozen endpoint: everything of it but the waiters of
/// requests (a capture with any is refused) and the relays' tasks.
/// As octets: [`RouterSnap::encode`], [`RouterSnap::decode`]
/// (`freeze/snapshot.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSnap {
    /// Index of the transport's socket in [`Capture::fds`].
    pub transport: usize,
    /// The channel's pipe, where it was made: it holds the spliced
    /// payloads the channel's output counts on.
    pub pipe: Option<PipeSnap>,
    /// These and the lists below are in the order of connection ids.
    pub relays: Vec<RelaySnap>,
    /// Connections known without a relay yet, with the events held for
    /// them, in order.
    pub held: Vec<(ConnId, Vec<HeldEvent>)>,
    /// io-server: how connections announced to the node start, until
    /// their relay attaches.
    pub starts: Vec<StartSnap>,
    /// Node: the id the io-server's Welcome gave.
    pub node_id: Option<u32>,
    /// Node: connections handed over as sockets and not accepted yet, by
    /// local id, with the io-server's id of each.
    pub handed: Vec<(ConnId, Option<ConnId>)>,
    /// io-server: the node's latest weight not taken yet.
    pub weight: Option<u32>,
}

/// The channel's pipe: its ends' indices in [`Capture::fds`] and the
/// octets in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeSnap {
    pub read: usize,
    pub write: usize,
    pub held: usize,
}

/// One relayed connection of a frozen endpoint. Nothing of it is in
/// flight: what the peer sent is written to the stream, in
/// [`RelaySnap::pending`] or still in the channel's input; what the stream
/// sent is in the channel's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySnap {
    pub conn: ConnId,
    /// Index of the relay's socket in [`Capture::fds`].
    pub socket: usize,
    /// Octets read from the stream and sent on the connection.
    pub bytes_in: u64,
    /// Octets received on the connection and written to the stream.
    pub bytes_out: u64,
    /// The stream's end of file went out as a Fin: nothing more is read.
    pub fin_sent: bool,
    /// The peer's Fin was written through (the stream's write side is shut).
    pub fin_written: bool,
    /// io-server: kept for re-dispatch until the node's program accepts it.
    pub tracked: bool,
    /// io-server: what the relay keeps until that accept.
    pub pre: Option<PreAcceptSnap>,
    /// io-server: what the idle sweeps saw of it.
    pub quiet: Option<QuietSnap>,
    /// What the relay was handed and has not written to its stream yet,
    /// in order: payload octets (the first one's rest; spliced payloads
    /// read out of its receive pipe), then perhaps the peer's Fin or
    /// close. The relay run again on the socket writes them first.
    pub pending: Vec<HeldEvent>,
}

/// An event held for a connection whose relay has not attached (or, in
/// [`RelaySnap::pending`], handed to a relay and not written yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldEvent {
    Data(Bytes),
    Fin,
    Closed(i32),
}

/// io-server: how a connection announced to the node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartSnap {
    pub conn: ConnId,
    pub replay: Replay,
    /// Kept for re-dispatch until the node's program accepts it.
    pub tracked: bool,
}

/// An endpoint made of a capture ([`Endpoint::resume`]), frozen until
/// [`Endpoint::unfreeze`].
#[derive(Debug)]
pub struct Resumed {
    pub endpoint: Endpoint,
    pub events: mpsc::UnboundedReceiver<EndpointEvent>,
    /// Each relayed connection with its socket: run a relay on it again
    /// ([`Endpoint::relay_tcp`], [`Endpoint::relay_unix`], ...), which
    /// goes on from where the captured one stopped.
    pub relays: Vec<(ConnId, OwnedFd)>,
}

/// A relayed connection carried by [`Endpoint::resume`], until its relay
/// attaches again.
pub(super) struct Carried {
    snap: RelaySnap,
    /// A tracked connection is counted in [`Endpoint::unaccepted`] from
    /// the resume on (without its place in its member's count: that is
    /// the io-server's to make again).
    track: Option<Arc<Track>>,
}

impl Carried {
    /// The relay's counters, carried on.
    pub(super) fn counters(self, progress: Arc<Progress>) -> Counters {
        let s = self.snap;
        Counters {
            bytes_in: AtomicU64::new(s.bytes_in),
            bytes_out: AtomicU64::new(s.bytes_out),
            fin_written: AtomicBool::new(s.fin_written),
            track: self.track,
            fin_sent: AtomicBool::new(s.fin_sent),
            pre: Mutex::new(s.pre.as_ref().map(PreAccept::restore)),
            progress,
        }
    }

    /// What the idle sweeps saw of it.
    pub(super) fn quiet(&self) -> Option<QuietSnap> {
        self.snap.quiet
    }
}

impl HeldEvent {
    /// `None`: an event never held (a credit, or a spliced payload, which
    /// only an attached relay gets).
    fn of(ev: &ConnEvent) -> Option<HeldEvent> {
        match ev {
            ConnEvent::Data(b) => Some(HeldEvent::Data(b.clone())),
            ConnEvent::Fin => Some(HeldEvent::Fin),
            ConnEvent::Closed(e) => Some(HeldEvent::Closed(*e)),
            ConnEvent::Spliced(..) | ConnEvent::Credit => None,
        }
    }

    fn into_event(self) -> ConnEvent {
        match self {
            HeldEvent::Data(b) => ConnEvent::Data(b),
            HeldEvent::Fin => ConnEvent::Fin,
            HeldEvent::Closed(e) => ConnEvent::Closed(e),
        }
    }
}

/// The router's part of a capture, copied under its lock.
struct RouterCopy {
    snap: RouterSnap,
    /// Per relay, in the order of `snap.relays` (whose `socket` is set
    /// later): its socket.
    sockets: Vec<Option<RawFd>>,
    /// Per relay, in the same order (whose `pending` is set later): its
    /// inbox.
    inboxes: Vec<Arc<Inbox>>,
}

/// What the parked relay of `conn` has not written to its stream, from
/// its inbox. Spliced payloads are read out of the receive pipe into the
/// inbox as copies (in place, in order): the capture carries octets, not
/// the pipe. Read under the inbox's lock, which nothing else takes while
/// the endpoint is frozen but the router handing it more (after these).
fn pending_of(conn: ConnId, inbox: &Inbox) -> Result<Vec<HeldEvent>, CaptureError> {
    let mut st = inbox.lock();
    if !st.parked {
        return Err(CaptureError::RelayNotParked(conn));
    }
    // Each receive pipe must hold exactly the spliced payloads queued.
    let mut pipes: Vec<(Arc<ReceivePipe>, usize)> = Vec::new();
    for ev in &st.events {
        if let ConnEvent::Spliced(len, pipe) = ev {
            match pipes.iter_mut().find(|(p, _)| Arc::ptr_eq(p, pipe)) {
                Some((_, n)) => *n += len,
                None => pipes.push((pipe.clone(), *len)),
            }
        }
    }
    for (pipe, queued) in &pipes {
        let inside = splice::unread(pipe.fds().0.as_raw_fd())?;
        if inside != *queued {
            return Err(CaptureError::ReceivePipe {
                conn,
                inside,
                queued: *queued,
            });
        }
    }
    for ev in st.events.iter_mut() {
        if let ConnEvent::Spliced(len, pipe) = ev {
            let data = pipe.take_out(*len)?;
            *ev = ConnEvent::Data(Bytes::from(data));
        }
    }
    Ok(st.events.iter().filter_map(HeldEvent::of).collect())
}

/// Descriptors of a capture, duplicated in index order.
#[derive(Default)]
struct Fds(Vec<OwnedFd>);

impl Fds {
    fn dup(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.0.push(fd.try_clone_to_owned()?);
        Ok(self.0.len() - 1)
    }

    /// [`Fds::dup`] of a descriptor the frozen endpoint holds open.
    fn dup_raw(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: `fd` is the transport's or a relay's socket, which the
        // frozen endpoint keeps open (its tasks are parked, and a frozen
        // endpoint closes nothing) for as long as this call.
        self.dup(unsafe { BorrowedFd::borrow_raw(fd) })
    }
}

impl Endpoint {
    /// Stops the endpoint at clean points, within `bound` (else it goes
    /// back to running and says why): the channel's send side is frozen
    /// (relays read nothing more from their streams), the reader is
    /// paused at its read (undecoded input stays in the channel), the
    /// timer is paused (liveness cannot fire), the writer stops at its
    /// next write (the rest of the piece it was writing goes back to the
    /// channel's output), and each relay stops writing to its stream
    /// between two writes (what it holds stays in its inbox). Nothing is
    /// closed, and nothing waits for a peer or a client to read: every
    /// step is at once, and the bound is only for tasks to be scheduled
    /// (and for a transport that cannot stop inside a write, `rdma://`).
    /// Then [`Endpoint::capture`], or [`Endpoint::unfreeze`].
    ///
    /// Calls made on the endpoint while frozen still work (its owner
    /// answering a request, accepting a connection): their output waits
    /// in the channel. The owner stops its own work first (admission,
    /// the [`EndpointEvent`]s it has not handled; design §2 steps 1 and
    /// 5).
    pub async fn freeze(&self, bound: Duration) -> Result<(), FreezeError> {
        let deadline = tokio::time::Instant::now() + bound;
        let r = self.quiesce(deadline, bound).await;
        if r.is_err() {
            self.unfreeze();
        }
        r
    }

    async fn quiesce(
        &self,
        deadline: tokio::time::Instant,
        bound: Duration,
    ) -> Result<(), FreezeError> {
        let handle = self.handle();
        let open = handle.with(|ch| {
            ch.freeze();
            ch.is_open()
        });
        if !open {
            return Err(FreezeError::NotOpen);
        }
        handle.set_phase(Phase::Frozen);
        tokio::time::timeout_at(deadline, handle.at_rest())
            .await
            .map_err(|_| FreezeError::Writer(bound))?;
        let progress = self.router().progress.clone();
        progress.waiting.store(true, Ordering::SeqCst);
        let parked = async {
            loop {
                // Registered before looking: progress made in between
                // wakes it.
                let notified = progress.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let Some(conn) = self.busy_relay() else {
                    return Ok(());
                };
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(FreezeError::Relay { conn, bound });
                }
            }
        }
        .await;
        progress.waiting.store(false, Ordering::SeqCst);
        parked?;
        match self.is_open() {
            true => Ok(()),
            false => Err(FreezeError::NotOpen),
        }
    }

    /// A relay not yet at its clean point, or ending: writing to its
    /// stream, or an abort fired, or both directions finished (such a
    /// relay ends at once, writing nothing).
    fn busy_relay(&self) -> Option<ConnId> {
        let relays: Vec<(ConnId, Arc<Counters>, Arc<Inbox>, bool)> = {
            let router = self.router();
            router
                .conns
                .iter()
                .filter_map(|(&conn, route)| match route {
                    Route::Relayed(a, c) => {
                        Some((conn, c.clone(), a.inbound.0.clone(), a.abort.is_none()))
                    }
                    Route::Held(_) => None,
                })
                .collect()
        };
        relays
            .iter()
            .find(|(_, c, inbox, aborted)| {
                *aborted
                    || (c.fin_sent.load(Ordering::Relaxed) && c.fin_written.load(Ordering::Relaxed))
                    || !inbox.lock().parked
            })
            .map(|(conn, ..)| *conn)
    }

    /// Ends [`Endpoint::freeze`] (or starts an endpoint made by
    /// [`Endpoint::resume`]): the channel sends again, the driver's tasks
    /// go on, and every relay looks at its credit again. Nothing, once
    /// disowned: its channel stays frozen for good, so its relays never
    /// read (or splice into the pipe another endpoint now owns).
    pub fn unfreeze(&self) {
        self.unfreeze_with(|| {});
    }

    /// [`Endpoint::unfreeze`], calling `midway` between opening the channel
    /// and waking the relays (a test stands for a thread preempted there).
    pub(crate) fn unfreeze_with(&self, midway: impl FnOnce()) {
        if self.handle().phase() == Phase::Disowned {
            return;
        }
        // The channel first, then the relays attached by now: a relay that
        // attaches after this look finds the channel open when it asks for
        // its window. (Looking first left a relay attaching in between
        // waiting for a credit that never came: a frozen channel answers 0,
        // and an idle connection gets no credit of its own.)
        self.handle().with(|ch| ch.unfreeze());
        self.handle().set_phase(Phase::Running);
        midway();
        let credits: Vec<Arc<Notify>> = {
            let router = self.router();
            router
                .conns
                .values()
                .filter_map(|route| match route {
                    Route::Relayed(a, _) => Some(a.credit.clone()),
                    Route::Held(_) => None,
                })
                .collect()
        };
        for credit in credits {
            credit.notify_one();
        }
    }

    /// Copies a frozen endpoint ([`Endpoint::freeze`]): its channel, its
    /// router and relays as data, its descriptors as duplicates. The
    /// endpoint stays frozen and whole: unfreeze it if the capture is not
    /// used, [`Endpoint::disown`] it once an endpoint resumed from the
    /// capture has touched the descriptors.
    ///
    /// Each relay's [`RelaySnap::pending`] is what its inbox holds; the
    /// spliced payloads among it are read out of its receive pipe then
    /// (the relay, if unfrozen, writes them as copies: the same octets in
    /// the same order), so that no receive pipe has to move. Checks, for
    /// each relay, that what the channel counts as received and not
    /// consumed is exactly that pending payload plus what its input still
    /// holds of a Data frame read halfway (nothing is anywhere else), that
    /// each receive pipe holds what its relay's payloads say, and that the
    /// channel's pipe holds what its count says.
    pub fn capture(&self) -> Result<Capture, CaptureError> {
        let handle = self.handle();
        if !handle.is_at_rest() {
            return Err(CaptureError::NotFrozen);
        }
        // The channel's instants are on its clock, which stood still
        // while frozen; the router's are on the runtime's.
        let now = handle.channel_time();
        let RouterCopy {
            mut snap,
            sockets,
            inboxes,
        } = self.copy_router(std::time::Instant::now())?;
        for (relay, inbox) in snap.relays.iter_mut().zip(&inboxes) {
            relay.pending = pending_of(relay.conn, inbox)?;
        }
        let (channel, counts, partial) = handle.with(|ch| {
            let counts: Vec<Option<u64>> = snap
                .relays
                .iter()
                .map(|r| ch.has_connection(r.conn).then(|| ch.buffered(r.conn)))
                .collect();
            (ch.snapshot(now), counts, ch.payload_pending())
        });
        let channel = channel?;
        for (relay, count) in snap.relays.iter().zip(counts) {
            // A connection the channel no longer has counts nothing: its
            // relay writes what it holds, then ends.
            let Some(buffered) = count else {
                continue;
            };
            let held: u64 = relay
                .pending
                .iter()
                .map(|e| match e {
                    HeldEvent::Data(b) => b.len() as u64,
                    _ => 0,
                })
                .sum();
            let expected = held
                + match partial {
                    Some((conn, left)) if conn == relay.conn => left as u64,
                    _ => 0,
                };
            if buffered != expected {
                return Err(CaptureError::Unsettled {
                    conn: relay.conn,
                    buffered,
                    expected,
                });
            }
        }
        let mut fds = Fds::default();
        let transport = handle
            .transport_fd()
            .ok_or_else(|| CaptureError::NoDescriptor("the fabric transport".into()))?;
        snap.transport = fds.dup_raw(transport)?;
        if let Some(pipe) = handle.pipe_made() {
            let (read, write) = pipe.fds();
            let inside = splice::unread(read.as_raw_fd())?;
            let held = pipe.held();
            if inside != held {
                return Err(CaptureError::Pipe { inside, held });
            }
            snap.pipe = Some(PipeSnap {
                read: fds.dup(read)?,
                write: fds.dup(write)?,
                held,
            });
        }
        for (relay, socket) in snap.relays.iter_mut().zip(sockets) {
            let socket = socket.ok_or_else(|| {
                CaptureError::NoDescriptor(format!("the relay of connection {}", relay.conn))
            })?;
            relay.socket = fds.dup_raw(socket)?;
        }
        Ok(Capture {
            channel,
            router: snap,
            fds: fds.0,
        })
    }

    /// The router as data (descriptor indices left at 0): copied under
    /// its lock, which is held for nothing else; each relay's pre-accept
    /// state is read after, under its own lock.
    fn copy_router(&self, now: std::time::Instant) -> Result<RouterCopy, CaptureError> {
        let mut relays = Vec::new();
        let mut held = Vec::new();
        let (starts, node_id, handed, weight) = {
            let router = self.router();
            if !router.pending.is_empty() {
                return Err(CaptureError::Requests(router.pending.len()));
            }
            if let Some(&conn) = router.resumed.keys().next() {
                return Err(CaptureError::NotAttached(conn));
            }
            for (&conn, route) in &router.conns {
                match route {
                    Route::Held(events) => {
                        held.push((conn, events.iter().filter_map(HeldEvent::of).collect()));
                    }
                    Route::Relayed(a, c) => {
                        relays.push((conn, a.socket, a.quiet, c.clone(), a.inbound.0.clone()))
                    }
                }
            }
            let starts: Vec<_> = router
                .starts
                .iter()
                .map(|(&conn, s)| (conn, s.replay.clone(), s.track.clone()))
                .collect();
            let handed: Vec<_> = router.handed.iter().map(|(&k, &v)| (k, v)).collect();
            (starts, router.node_id, handed, router.weight)
        };
        // In the order of the connections' ids, whatever the maps' order.
        relays.sort_unstable_by_key(|r| r.0);
        held.sort_unstable_by_key(|h| h.0);
        let mut starts = starts;
        starts.sort_unstable_by_key(|s| s.0);
        let mut handed = handed;
        handed.sort_unstable();
        let unsettled = |t: &Option<Arc<Track>>| t.as_ref().is_some_and(|t| !t.settled());
        let starts = starts
            .into_iter()
            .map(|(conn, replay, track)| StartSnap {
                conn,
                replay,
                tracked: unsettled(&track),
            })
            .collect();
        let sockets = relays.iter().map(|r| r.1).collect();
        let inboxes = relays.iter().map(|r| r.4.clone()).collect();
        let relays = relays
            .into_iter()
            .map(|(conn, _, quiet, c, _)| RelaySnap {
                conn,
                socket: 0,
                bytes_in: c.bytes_in.load(Ordering::Relaxed),
                bytes_out: c.bytes_out.load(Ordering::Relaxed),
                fin_sent: c.fin_sent.load(Ordering::Relaxed),
                fin_written: c.fin_written.load(Ordering::Relaxed),
                tracked: unsettled(&c.track),
                pre: lock_pre(&c.pre).as_ref().map(PreAccept::snapshot),
                quiet: quiet.map(|q| q.snapshot(now)),
                pending: Vec::new(),
            })
            .collect();
        Ok(RouterCopy {
            snap: RouterSnap {
                transport: 0,
                pipe: None,
                relays,
                held,
                starts,
                node_id,
                handed,
                weight,
            },
            sockets,
            inboxes,
        })
    }

    /// Lets go of an endpoint whose capture another endpoint resumed
    /// from: the driver's tasks end without closing or shutting down the
    /// transport, and the endpoint is leaked, so that no destructor of
    /// its runs (its relays stay parked on their frozen channel, holding
    /// their streams). For a process about to exit, or a test.
    pub fn disown(self) {
        self.handle().set_phase(Phase::Disowned);
        std::mem::forget(self);
    }

    /// Makes the endpoint a [`Capture`] was taken of, over its
    /// descriptors (moved from another process, or duplicated; each
    /// checked to be what its index names: a stream socket, a pipe's
    /// ends holding the octets counted): the
    /// channel restored with `config`'s settings (no handshake: it is
    /// open), the transport made by `transport` from its socket, the
    /// router with its held events and starts, and each relay's state,
    /// which the relay run again on its socket ([`Resumed::relays`])
    /// picks up. The endpoint is frozen: run the relays, then
    /// [`Endpoint::unfreeze`]. A refused capture closes the descriptors it
    /// was given and shuts nothing down (`transport` is called last, when
    /// nothing else can fail).
    pub fn resume<R, W>(
        config: ChannelConfig,
        capture: Capture,
        transport: impl FnOnce(OwnedFd) -> io::Result<(R, W)>,
    ) -> Result<Resumed, ResumeError>
    where
        R: TransportRead,
        W: TransportWrite,
    {
        let Capture {
            channel,
            router: snap,
            fds,
        } = capture;
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |i: usize| {
            fds.get_mut(i)
                .and_then(Option::take)
                .ok_or(ResumeError::Fd(i))
        };
        let now = tokio::time::Instant::now().into_std();
        let channel = Channel::restore(config, channel, now)?;
        let pipe = match snap.pipe {
            Some(p) => Some(Pipe::from_fds(take(p.read)?, take(p.write)?, p.held)?),
            None => None,
        };
        let mut stream = |i: usize| {
            let fd = take(i)?;
            match socket2::SockRef::from(&fd).r#type() {
                Ok(t) if t == socket2::Type::STREAM => Ok(fd),
                _ => Err(ResumeError::NotAStream(i)),
            }
        };
        let mut relays = Vec::with_capacity(snap.relays.len());
        for relay in &snap.relays {
            relays.push((relay.conn, stream(relay.socket)?));
        }
        // Made last: nothing after can fail, so a refused capture never
        // drops a write half (whose drop would shut the socket down).
        let (r, w) = transport(stream(snap.transport)?)?;
        let unaccepted = Arc::new(AtomicUsize::new(0));
        let mut router = Router {
            node_id: snap.node_id,
            handed: snap.handed.into_iter().collect(),
            weight: snap.weight,
            ..Router::default()
        };
        for (conn, events) in snap.held {
            let events = events.into_iter().map(HeldEvent::into_event).collect();
            router.conns.insert(conn, Route::Held(events));
        }
        for s in snap.starts {
            let track = s.tracked.then(|| Track::new(&unaccepted, None));
            let start = Start {
                replay: s.replay,
                track,
            };
            router.starts.insert(s.conn, start);
        }
        for mut relay in snap.relays {
            // Events for it wait here until its relay attaches again,
            // behind what it had not written.
            let pending = std::mem::take(&mut relay.pending);
            let pending = pending.into_iter().map(HeldEvent::into_event).collect();
            router.conns.insert(relay.conn, Route::Held(pending));
            let track = relay.tracked.then(|| Track::new(&unaccepted, None));
            let carried = Carried { snap: relay, track };
            router.resumed.insert(carried.snap.conn, carried);
        }
        let (endpoint, events) = Endpoint::start(router, unaccepted, |sink: RouteSink| {
            driver::spawn_resumed(channel, r, w, sink, pipe)
        });
        Ok(Resumed {
            endpoint,
            events,
            relays,
        })
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_snapshot;
