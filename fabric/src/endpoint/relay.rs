//! The pumps of one relay: stream to connection within the peer's credit
//! (reading straight into a Data frame, or splicing bulk reads into the
//! channel's pipe), and connection to stream (each write credited as it
//! is made, and stepped past in the relay's inbox, where a freeze's
//! capture finds what is not written yet). §2.2: a connection whose
//! stream stops reading waits on its own credit and never stalls another.

use super::errno::{self, io_errno};
use super::io::{poll_read_into, write_vectored_once, MAX_BATCH};
use super::preaccept::{PreAccept, Step};
use super::router::{ConnEvent, Counters, Inbox, Start};
use crate::channel::CallError;
use crate::driver::{FabricHandle, PhaseWatch};
use crate::frame::ConnId;
use crate::splice::{self, Pipe, ReadySocket, ReceivePipe, SPLICE_MIN};
use bytes::{Buf, Bytes};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

/// A relay attached to its connection.
pub(super) struct Attachment {
    /// What the router hands it to write to its stream.
    pub(super) inbound: Arc<Inbox>,
    pub(super) credit: Arc<Notify>,
    pub(super) abort: oneshot::Receiver<i32>,
    /// Its counters, with what it keeps before its program accepts it
    /// ([`Counters::pre`]).
    pub(super) counters: Arc<Counters>,
}

/// What [`Endpoint::run_relay`] did.
pub(super) enum Relayed<S> {
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
pub(super) enum End {
    Done,
    Peer(i32),
    Local(i32),
}

/// How the peer-to-stream direction stopped.
pub(super) enum DownEnd {
    /// Fin written through and the other direction already done.
    Finished,
    Closed(i32),
}

/// What one read of the stream did.
pub(super) enum Chunk {
    Eof,
    /// This many octets were sent on the connection.
    Sent(usize),
    /// The channel no longer takes data for the connection.
    Refused,
}

/// One relay's two directions.
pub(super) struct Pump<'a, T> {
    pub(super) handle: &'a FabricHandle,
    pub(super) conn: ConnId,
    pub(super) counters: &'a Counters,
    /// The stream's socket, when bulk payloads may be spliced from it and
    /// into it.
    pub(super) socket: Option<&'a T>,
    /// io-server: the replay to send first, and the client's octets kept
    /// until the node's program accepts the connection; `None` inside
    /// once that is over.
    pub(super) pre: Option<&'a Mutex<Option<PreAccept>>>,
    /// Node: asked at the stream's end of file whether the program's end
    /// was closed abortively ([`ProgramEnd::closed_abortively`]): then the
    /// connection ends with a reset instead of a FIN.
    pub(super) program: Option<&'a dyn ProgramEnd>,
}

/// A node's relay of a program's connection ([`super::Endpoint::relay_program`])
/// asks its program's end how it ended, so that resets cross the fabric
/// both ways as the node's kernel would make them.
pub trait ProgramEnd: Send + Sync {
    /// The program's end gave end of file: whether that was an abortive
    /// close (`SO_LINGER` 0) to pass on as a reset rather than a FIN.
    fn closed_abortively(&self) -> bool;
    /// The peer reset the connection: make the program's end see a reset
    /// (`ECONNRESET`, then end of file) when the relay's end, `relayed`,
    /// is closed right after this returns.
    fn reset(&self, relayed: &tokio::net::UnixStream);
}

pub(super) fn lock_pre(pre: &Mutex<Option<PreAccept>>) -> MutexGuard<'_, Option<PreAccept>> {
    pre.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: ReadySocket> Pump<'_, T> {
    pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut rd: tokio::io::ReadHalf<S>,
        mut wr: tokio::io::WriteHalf<S>,
        inbound: Arc<Inbox>,
        credit: &Notify,
        mut abort: oneshot::Receiver<i32>,
    ) -> (End, tokio::io::ReadHalf<S>, tokio::io::WriteHalf<S>) {
        // A relay carried by an upgrade in place goes on from where it was.
        let up_done = AtomicBool::new(self.counters.fin_sent.load(Ordering::Relaxed));
        let fin_seen = AtomicBool::new(self.counters.fin_written.load(Ordering::Relaxed));
        let end = {
            let up = self.upstream(&mut rd, credit);
            let down = self.downstream(&mut wr, &inbound, &up_done, &fin_seen);
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
    pub(super) async fn upstream<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        credit: &Notify,
    ) -> io::Result<()> {
        if let Some(pre) = self.pre {
            if self.pre_accept(rd, credit, pre).await? {
                return Ok(());
            }
        }
        let handle = self.handle;
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
                        match poll_splice(cx, handle, self.counters, conn, window, socket, pipe) {
                            Poll::Ready(Some(r)) => return Poll::Ready(r),
                            Poll::Pending => return Poll::Pending,
                            // The pipe is full: copy this read.
                            Poll::Ready(None) => {}
                        }
                    }
                }
                // Only this task sends on `conn`, so the window still holds.
                poll_read_frame(cx, handle, self.counters, conn, window, &mut *rd, |_| {})
            })
            .await?;
            match chunk {
                Chunk::Eof => {
                    if self.program.is_some_and(|p| p.closed_abortively()) {
                        return Err(io::Error::from_raw_os_error(errno::ECONNRESET));
                    }
                    self.send_fin();
                    return Ok(());
                }
                Chunk::Sent(n) => bulk = n >= SPLICE_MIN,
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
    pub(super) async fn pre_accept<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        credit: &Notify,
        pre: &Mutex<Option<PreAccept>>,
    ) -> io::Result<bool> {
        let handle = self.handle;
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
                        // Counted under the channel's lock, and the copy's
                        // count under its own: a capture sees all of it.
                        let r = handle.with(|ch| {
                            let r = ch.send_message(conn, &p.unsent()[..n]);
                            if let Ok(k) = r {
                                self.counters
                                    .bytes_in
                                    .fetch_add(k as u64, Ordering::Relaxed);
                            }
                            r
                        });
                        if let Ok(k) = r {
                            p.sent(k);
                        }
                        r
                    };
                    if sent.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                Step::Fin => {
                    // Under the copy's lock: a capture sees the FIN sent
                    // in both or in neither.
                    let mut g = lock_pre(pre);
                    if let Some(p) = g.as_mut() {
                        p.fin_sent();
                    }
                    self.send_fin();
                    drop(g);
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
                        // Kept in the poll that reads it.
                        poll_read_frame(cx, handle, self.counters, conn, limit, &mut *rd, |read| {
                            if let Some(p) = lock_pre(pre).as_mut() {
                                p.read(read);
                            }
                        })
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
                        Chunk::Sent(_) => {}
                        Chunk::Refused => std::future::pending::<()>().await,
                    }
                }
            }
        }
    }

    /// The stream's end of file goes out as a Fin. Marked in the same
    /// hold of the channel's lock, so that a relay carried by an upgrade
    /// in place knows it has nothing more to read.
    fn send_fin(&self) {
        self.handle.with(|ch| {
            let _ = ch.send_fin(self.conn);
            self.counters.fin_sent.store(true, Ordering::Relaxed);
        });
    }

    /// Connection -> stream, from the relay's [`Inbox`]: each write steps
    /// past what it wrote in the inbox and credits it, in the poll that
    /// wrote it. While the endpoint is frozen it writes nothing: it parks
    /// at once, between two writes, and what its stream has not been sent
    /// stays in the inbox, where a capture finds it (design §2, "Capture
    /// instead of drain"); a stream that does not read never holds a
    /// freeze up.
    pub(super) async fn downstream<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        inbox: &Inbox,
        up_done: &AtomicBool,
        fin_seen: &AtomicBool,
    ) -> io::Result<DownEnd> {
        let handle = self.handle;
        let mut phase = handle.phase_watch();
        loop {
            // The clean point: what is not written is in the inbox.
            if !phase.is_running() {
                self.park(inbox, &mut phase).await;
                continue;
            }
            match front(inbox) {
                // Biased, here and below: the pause is looked at only when
                // the inbox or the write has to wait (the loop's top looks
                // at the phase in any case), so a relay that never waits
                // never registers with the phase's watch.
                Front::Empty => tokio::select! {
                    biased;
                    _ = inbox.ready() => {}
                    _ = phase.paused() => {}
                },
                Front::Data(batch) => {
                    // Data already queued behind the first goes out in the
                    // same write (one syscall and one wake-up of the
                    // reader for a fabric read's worth of frames). Boxed:
                    // this future is large and rare; inline, every relay
                    // task (idle ones too) would be that much larger.
                    let n = tokio::select! {
                        biased;
                        n = Box::pin(write_vectored_once(wr, &batch)) => n?,
                        _ = phase.paused() => continue,
                    };
                    step_past(inbox, n);
                    self.written(n);
                }
                Front::Spliced(left, pipe) => {
                    let socket = self.socket.ok_or(io::ErrorKind::Unsupported)?;
                    let n = tokio::select! {
                        biased;
                        n = pipe.drain_some(socket, left) => n?,
                        _ = phase.paused() => continue,
                    };
                    step_past(inbox, n);
                    self.written(n);
                }
                Front::Fin => {
                    // Half-closed from here (before the stream can see
                    // its EOF): the sweeps' half-closed limit applies.
                    self.counters.fin_written.store(true, Ordering::Relaxed);
                    // At once on a socket: not a point to stop at.
                    wr.shutdown().await?;
                    inbox.lock().events.pop_front();
                    fin_seen.store(true, Ordering::Relaxed);
                    if up_done.load(Ordering::Relaxed) {
                        return Ok(DownEnd::Finished);
                    }
                }
                Front::Closed(e) => return Ok(DownEnd::Closed(e)),
                Front::Gone => return Ok(DownEnd::Closed(errno::ECONNABORTED)),
            }
        }
    }

    /// `n` octets were written to the stream: credited and counted.
    fn written(&self, n: usize) {
        self.handle.with(|ch| ch.consumed(self.conn, n));
        self.counters
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Waits at the clean point until the endpoint runs again, marked
    /// parked in the inbox meanwhile. The mark is cleared before the
    /// phase is looked at, and the freeze looks at the mark after telling
    /// the tasks to pause: a relay that goes on, having seen the endpoint
    /// running, is never counted parked.
    async fn park(&self, inbox: &Inbox, phase: &mut PhaseWatch) {
        loop {
            inbox.lock().parked = false;
            if phase.is_running() {
                return;
            }
            inbox.lock().parked = true;
            self.counters.progress.made();
            phase.running().await;
        }
    }
}

/// What a relay's downstream does next, as its inbox says.
enum Front {
    Empty,
    /// The first Data payloads (the first one's rest), at most
    /// [`MAX_BATCH`] of them.
    Data(Vec<Bytes>),
    /// Octets left of a spliced payload, in the relay's receive pipe.
    Spliced(usize, Arc<ReceivePipe>),
    Fin,
    Closed(i32),
    /// The router let go, and nothing is left to write.
    Gone,
}

/// The front of `inbox` (credits and empty payloads, which ask for no
/// write, dropped).
fn front(inbox: &Inbox) -> Front {
    let mut st = inbox.lock();
    while let Some(ConnEvent::Credit) | Some(ConnEvent::Spliced(0, _)) = st.events.front() {
        st.events.pop_front();
    }
    while matches!(st.events.front(), Some(ConnEvent::Data(d)) if d.is_empty()) {
        st.events.pop_front();
    }
    match st.events.front() {
        None if st.closed => Front::Gone,
        None => Front::Empty,
        Some(ConnEvent::Data(_)) => Front::Data(
            st.events
                .iter()
                .take(MAX_BATCH)
                .map_while(|ev| match ev {
                    ConnEvent::Data(d) if !d.is_empty() => Some(d.clone()),
                    _ => None,
                })
                .collect(),
        ),
        Some(ConnEvent::Spliced(left, pipe)) => Front::Spliced(*left, pipe.clone()),
        Some(ConnEvent::Fin) => Front::Fin,
        Some(ConnEvent::Closed(e)) => Front::Closed(*e),
        Some(ConnEvent::Credit) => Front::Empty,
    }
}

/// Steps `inbox` past `n` octets written from its front.
fn step_past(inbox: &Inbox, mut n: usize) {
    let mut st = inbox.lock();
    while n > 0 {
        match st.events.front_mut() {
            Some(ConnEvent::Data(d)) if d.len() <= n => {
                n -= d.len();
                st.events.pop_front();
            }
            Some(ConnEvent::Data(d)) => {
                d.advance(n);
                n = 0;
            }
            Some(ConnEvent::Spliced(left, _)) if *left <= n => {
                n -= *left;
                st.events.pop_front();
            }
            Some(ConnEvent::Spliced(left, _)) => {
                *left -= n;
                n = 0;
            }
            _ => break,
        }
    }
}

/// One read of `rd` straight into a Data frame on `conn` of at most `max`
/// octets, in room the channel lends from its output buffer
/// ([`crate::Channel::reserve`], [`crate::Channel::commit`]): no copy, and
/// no buffer of the relay's own. `keep` sees what was read. The read runs
/// under the channel's lock (one non-blocking `recv`): the frame then
/// rejoins the output buffer where it was lent, with no copy, whatever
/// other relays queue meanwhile. What was sent is counted in `counters`
/// in the same hold of the lock, so a frozen channel's relays are
/// counted to the octet.
pub(super) fn poll_read_frame<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    handle: &FabricHandle,
    counters: &Counters,
    conn: ConnId,
    max: usize,
    rd: &mut R,
    keep: impl FnOnce(&[u8]),
) -> Poll<io::Result<Chunk>> {
    let sent = handle.with(|ch| {
        let Some(mut r) = ch.reserve(conn, max)? else {
            return Ok(None);
        };
        let read = poll_read_into(rd, cx, &mut r);
        if let Poll::Ready(Ok(())) = read {
            keep(r.payload());
        }
        let n = ch.commit(r)?;
        counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        Ok::<_, CallError>(Some((n, read)))
    });
    Poll::Ready(Ok(match sent {
        Ok(Some((_, Poll::Pending))) => return Poll::Pending,
        Ok(Some((_, Poll::Ready(Err(e))))) => return Poll::Ready(Err(e)),
        Ok(Some((0, Poll::Ready(Ok(()))))) => Chunk::Eof,
        Ok(Some((n, Poll::Ready(Ok(()))))) => Chunk::Sent(n),
        // The window shut meanwhile: wait for credit again.
        Ok(None) => Chunk::Sent(0),
        Err(_) => Chunk::Refused,
    }))
}

/// One read of `socket` spliced into the channel's pipe as a Data
/// payload (see [`crate::splice`]); `None`: the pipe is full, copy instead.
pub(super) fn poll_splice(
    cx: &mut Context<'_>,
    handle: &FabricHandle,
    counters: &Counters,
    conn: ConnId,
    window: usize,
    socket: &impl ReadySocket,
    pipe: &Pipe,
) -> Poll<Option<io::Result<Chunk>>> {
    let fd = socket.as_raw_fd();
    let r = ready!(splice::poll_spliced(cx, socket, || {
        // Only this task sends on `conn`, so the window still holds. The
        // splice and its commit share one hold of the channel's lock: the
        // pipe is the channel's, and its octets must be in the order of
        // the frames that say so.
        let sent = handle.with(|ch| {
            let Some(r) = ch.reserve(conn, window)? else {
                return Ok(None);
            };
            let filled = pipe.fill(fd, r.room());
            let n = ch.commit_spliced(r, *filled.as_ref().unwrap_or(&0))?;
            counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            Ok::<_, CallError>(Some(filled))
        });
        match sent {
            Ok(Some(Ok(0))) => Ok(Chunk::Eof),
            Ok(Some(Ok(n))) => Ok(Chunk::Sent(n)),
            Ok(Some(Err(e))) => Err(e),
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

#[cfg(test)]
mod tests;
