//! The RDMA transport over any [`Verbs`]: [`RdmaReader`] / [`RdmaWriter`].
//!
//! * **Send buffers** are one registered region cut into `send_buffers`
//!   slots; a frame chunk is copied into a free slot once and posted from
//!   there. The send queue is as deep as the pool, so it never overflows. A
//!   send completion returns the slot: that is the transport-level
//!   `buffer_available` that wakes a waiting [`RdmaWriter::write`].
//! * **Small messages** (control frames, short data) go by SEND into one of
//!   the peer's posted receive buffers, behind an 8-byte header that carries
//!   credit back: `ring_freed: u32, recvs_returned: u16, flags: u16`.
//! * **Bulk messages** go by RDMA WRITE with immediate into the peer's ring
//!   at the next position both sides compute the same way ([`ring_place`]:
//!   a message that would straddle the end starts at 0, the tail is skipped);
//!   the immediate is the length and consumes one receive.
//! * **Transport credit**, separate from Appendix A: a sender may use
//!   `credits` posted receives (one kept back for credit updates) and ring
//!   bytes up to what the peer reported freed. The receiver frees ring space
//!   and re-posts receives as soon as [`RdmaReader::read`] copies the bytes
//!   out, whatever the connections above do; Appendix A credit bounds what
//!   the channel buffers, so a stalled connection never stalls the ring.
//! * **Completions** are polled by one task: a bounded spin of `SPIN`
//!   yields, then it arms the completion channel and sleeps on its fd.

use super::verbs::{
    Completion, QpConfig, RemoteBuf, SendOp, SendWr, Verbs, VerbsProvider, WcOpcode, WcStatus,
};
use super::{RdmaConfig, RdmaError};
use crate::transport::{TransportRead, TransportWrite};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Bytes of the SEND header.
pub(crate) const HEADER: usize = 8;
const FLAG_FIN: u16 = 1;
/// Empty polls before the poller sleeps on the completion channel.
const SPIN: u32 = 64;
/// Completions taken per poll.
const BATCH: usize = 32;
/// A read returns once it has gathered this much.
const READ_CAP: usize = 256 * 1024;

/// Where a `len`-byte message goes in a ring of `size` bytes when the
/// writer is at absolute position `pos`: (offset, bytes skipped at the end).
pub fn ring_place(pos: u64, len: u64, size: u64) -> (u64, u64) {
    let off = pos % size;
    if off + len > size {
        (0, size - off)
    } else {
        (off, 0)
    }
}

/// A received message waiting for the reader, in arrival order.
enum Rx {
    Small { slot: u32, len: u32 },
    Ring { slot: u32, len: u32 },
    Fin,
}

/// What a sender wants to post.
#[derive(Clone, Copy)]
enum Msg<'a> {
    Data(&'a [u8]),
    Fin,
    /// Credit only; posted when enough is owed.
    Update,
}

#[derive(Default)]
struct State {
    free: Vec<u32>,
    /// Receives the peer has posted that we may consume.
    credits: u32,
    /// Absolute positions in the peer's ring: written (with skips), freed.
    ring_written: u64,
    ring_freed: u64,
    /// Credit we owe the peer: receives re-posted, ring bytes freed.
    owed_recvs: u32,
    owed_ring: u64,
    /// Absolute read position in our ring.
    ring_head: u64,
    rx: VecDeque<Rx>,
    error: Option<String>,
}

struct QueuePairState<V: Verbs> {
    // Regions before the queue pair: fields drop in order.
    send_mr: V::Mr,
    recv_mr: V::Mr,
    ring_mr: V::Mr,
    verbs: V,
    config: RdmaConfig,
    peer_ring: RemoteBuf,
    /// Largest message that goes by SEND (header included).
    small_max: usize,
    /// Largest message of one work request.
    chunk: usize,
    state: Mutex<State>,
    readable: Notify,
    writable: Notify,
    stop: Notify,
}

/// A queue pair with its buffers registered and receives posted, before
/// the peer is known.
pub(crate) struct Local<V: Verbs> {
    send_mr: V::Mr,
    recv_mr: V::Mr,
    ring_mr: V::Mr,
    verbs: V,
    config: RdmaConfig,
}

impl<V: Verbs> Local<V> {
    pub(crate) fn new<P: VerbsProvider<Verbs = V>>(
        provider: &P,
        config: RdmaConfig,
    ) -> Result<Self, RdmaError> {
        if config.send_buffers == 0
            || config.recv_buffers < 2
            || (config.small as usize) <= HEADER
            || config.ring_size < 4
        {
            return Err(RdmaError::Setup(format!(
                "unusable buffer sizes {config:?}"
            )));
        }
        let verbs = provider.open(&QpConfig {
            max_send_wr: config.send_buffers,
            max_recv_wr: config.recv_buffers,
            // Transport credit keeps receives posted ahead of every message.
            rnr_retry: 7,
        })?;
        let send_mr =
            verbs.register(config.send_buffers as usize * config.send_buffer_size as usize)?;
        let recv_mr = verbs.register(config.recv_buffers as usize * config.small as usize)?;
        let ring_mr = verbs.register(config.ring_size as usize)?;
        for slot in 0..config.recv_buffers {
            let small = config.small as usize;
            verbs.post_recv(&recv_mr, slot as usize * small, small, slot.into())?;
        }
        Ok(Self {
            verbs,
            send_mr,
            recv_mr,
            ring_mr,
            config,
        })
    }

    pub(crate) fn verbs(&self) -> &V {
        &self.verbs
    }

    pub(crate) fn ring(&self) -> RemoteBuf {
        self.verbs.remote_buf(&self.ring_mr)
    }

    /// Starts the completion poller; the queue pair is connected.
    pub(crate) fn start(
        self,
        peer_ring: RemoteBuf,
        peer_recvs: u32,
        peer_small: u32,
    ) -> (RdmaReader<V>, RdmaWriter<V>) {
        let c = self.config;
        let shared = Arc::new(QueuePairState {
            small_max: (peer_small.min(c.send_buffer_size)) as usize,
            chunk: (c.send_buffer_size.min(peer_ring.len / 4).max(1)) as usize,
            verbs: self.verbs,
            send_mr: self.send_mr,
            recv_mr: self.recv_mr,
            ring_mr: self.ring_mr,
            config: c,
            peer_ring,
            state: Mutex::new(State {
                free: (0..c.send_buffers).rev().collect(),
                credits: peer_recvs,
                ..State::default()
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            stop: Notify::new(),
        });
        tokio::spawn(poll_loop(shared.clone()));
        let handle = Arc::new(Handle(shared));
        (RdmaReader(handle.clone()), RdmaWriter(handle))
    }
}

/// Held by both halves; when both are gone the poller stops and the queue
/// pair is destroyed.
struct Handle<V: Verbs>(Arc<QueuePairState<V>>);

impl<V: Verbs> Drop for Handle<V> {
    fn drop(&mut self) {
        self.0.stop.notify_one();
    }
}

impl<V: Verbs> QueuePairState<V> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, st: &mut State, reason: String) {
        st.error.get_or_insert(reason);
        self.readable.notify_one();
        self.writable.notify_one();
    }

    fn error(st: &State) -> Option<io::Error> {
        st.error
            .as_ref()
            .map(|e| io::Error::new(io::ErrorKind::ConnectionAborted, e.clone()))
    }

    /// Posts `msg` if a send buffer and transport credit allow; `Ok(false)`
    /// means wait for `writable`.
    fn try_post(&self, st: &mut State, msg: Msg<'_>) -> Result<bool, RdmaError> {
        let threshold_met = st.owed_recvs >= self.config.recv_buffers / 2
            || st.owed_ring >= u64::from(self.config.ring_size / 2);
        let (data, flags, reserve) = match msg {
            Msg::Data(d) => (d, 0, 2),
            Msg::Fin => (&[][..], FLAG_FIN, 2),
            Msg::Update if threshold_met => (&[][..], 0, 1),
            Msg::Update => return Ok(true),
        };
        let bulk = data.len() + HEADER > self.small_max;
        let ring = bulk.then(|| {
            let size = u64::from(self.peer_ring.len);
            let (off, skip) = ring_place(st.ring_written, data.len() as u64, size);
            (
                off,
                skip,
                st.ring_written + skip + data.len() as u64 - st.ring_freed <= size,
            )
        });
        if st.credits < reserve || st.free.is_empty() || ring.is_some_and(|(_, _, fits)| !fits) {
            return Ok(false);
        }
        let Some(slot) = st.free.pop() else {
            return Ok(false);
        };
        let base = slot as usize * self.config.send_buffer_size as usize;
        let (op, len) = match ring {
            Some((offset, skip, _)) => {
                self.verbs.write_mr(&self.send_mr, base, data)?;
                st.ring_written += skip + data.len() as u64;
                (
                    SendOp::WriteImm {
                        remote: self.peer_ring,
                        offset,
                        imm: data.len() as u32,
                    },
                    data.len(),
                )
            }
            None => {
                let ring_freed = u32::try_from(st.owed_ring).unwrap_or(u32::MAX);
                let recvs = u16::try_from(st.owed_recvs).unwrap_or(u16::MAX);
                st.owed_ring -= u64::from(ring_freed);
                st.owed_recvs -= u32::from(recvs);
                let mut h = [0u8; HEADER];
                h[..4].copy_from_slice(&ring_freed.to_be_bytes());
                h[4..6].copy_from_slice(&recvs.to_be_bytes());
                h[6..].copy_from_slice(&flags.to_be_bytes());
                self.verbs.write_mr(&self.send_mr, base, &h)?;
                self.verbs.write_mr(&self.send_mr, base + HEADER, data)?;
                (SendOp::Send, HEADER + data.len())
            }
        };
        st.credits -= 1;
        self.verbs.post_send(SendWr {
            wr_id: slot.into(),
            mr: &self.send_mr,
            offset: base,
            len,
            op,
        })?;
        Ok(true)
    }

    /// Polls the completion queue once and applies what it returned.
    fn progress(&self, comps: &mut Vec<Completion>) -> Result<usize, RdmaError> {
        comps.clear();
        let n = self.verbs.poll_cq(comps, BATCH)?;
        if n == 0 {
            return Ok(0);
        }
        let mut st = self.lock();
        for c in comps.drain(..) {
            self.on_completion(&mut st, c)?;
        }
        self.try_post(&mut st, Msg::Update)?;
        Ok(n)
    }

    fn on_completion(&self, st: &mut State, c: Completion) -> Result<(), RdmaError> {
        let slot = u32::try_from(c.wr_id)
            .map_err(|_| RdmaError::Setup(format!("stray work request id {}", c.wr_id)))?;
        if c.status != WcStatus::Success {
            if matches!(c.opcode, WcOpcode::Send | WcOpcode::RdmaWrite) {
                st.free.push(slot);
            }
            self.fail(st, format!("RDMA work request failed: {:?}", c.status));
            return Ok(());
        }
        match (c.opcode, c.imm) {
            (WcOpcode::Send | WcOpcode::RdmaWrite, _) => {
                st.free.push(slot);
                self.writable.notify_one();
            }
            (WcOpcode::RecvWithImm, Some(len)) => {
                st.rx.push_back(Rx::Ring { slot, len });
                self.readable.notify_one();
            }
            (WcOpcode::Recv, _) if (c.byte_len as usize) >= HEADER => {
                let mut h = BytesMut::with_capacity(HEADER);
                self.verbs.read_mr(
                    &self.recv_mr,
                    slot as usize * self.config.small as usize,
                    HEADER,
                    &mut h,
                )?;
                st.ring_freed += u64::from(u32::from_be_bytes([h[0], h[1], h[2], h[3]]));
                st.credits += u32::from(u16::from_be_bytes([h[4], h[5]]));
                self.writable.notify_one();
                let len = c.byte_len - HEADER as u32;
                if u16::from_be_bytes([h[6], h[7]]) & FLAG_FIN != 0 {
                    st.rx.push_back(Rx::Fin);
                } else if len > 0 {
                    st.rx.push_back(Rx::Small { slot, len });
                } else {
                    return self.repost(st, slot);
                }
                self.readable.notify_one();
            }
            _ => self.fail(st, format!("malformed RDMA message {:?}", c.opcode)),
        }
        Ok(())
    }

    fn repost(&self, st: &mut State, slot: u32) -> Result<(), RdmaError> {
        let small = self.config.small as usize;
        self.verbs
            .post_recv(&self.recv_mr, slot as usize * small, small, slot.into())?;
        st.owed_recvs += 1;
        Ok(())
    }

    /// Moves received messages into `buf`; `None` when there are none.
    fn take(&self, st: &mut State, buf: &mut BytesMut) -> Result<Option<usize>, RdmaError> {
        let mut n = 0;
        while let Some(rx) = st.rx.front() {
            let (slot, len) = match *rx {
                Rx::Fin if n > 0 => break,
                Rx::Fin => return Ok(Some(0)),
                Rx::Small { slot, len } => {
                    let at = slot as usize * self.config.small as usize + HEADER;
                    self.verbs.read_mr(&self.recv_mr, at, len as usize, buf)?;
                    (slot, len)
                }
                Rx::Ring { slot, len } => {
                    let (off, skip) =
                        ring_place(st.ring_head, len.into(), self.config.ring_size.into());
                    self.verbs
                        .read_mr(&self.ring_mr, off as usize, len as usize, buf)?;
                    st.ring_head += skip + u64::from(len);
                    st.owed_ring += skip + u64::from(len);
                    (slot, len)
                }
            };
            st.rx.pop_front();
            self.repost(st, slot)?;
            n += len as usize;
            if n >= READ_CAP {
                break;
            }
        }
        if n > 0 {
            self.try_post(st, Msg::Update)?;
            return Ok(Some(n));
        }
        Ok(None)
    }
}

/// The receiving half of an RDMA channel.
pub struct RdmaReader<V: Verbs>(Arc<Handle<V>>);
/// The sending half of an RDMA channel.
pub struct RdmaWriter<V: Verbs>(Arc<Handle<V>>);

impl<V: Verbs> TransportRead for RdmaReader<V> {
    async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let s = &self.0 .0;
        loop {
            {
                let mut st = s.lock();
                if let Some(n) = s.take(&mut st, buf)? {
                    return Ok(n);
                }
                if let Some(e) = QueuePairState::<V>::error(&st) {
                    return Err(e);
                }
            }
            s.readable.notified().await;
        }
    }
}

impl<V: Verbs> RdmaWriter<V> {
    /// Waits until `msg` is posted.
    async fn post(&self, msg: Msg<'_>) -> io::Result<()> {
        let s = &self.0 .0;
        loop {
            {
                let mut st = s.lock();
                if let Some(e) = QueuePairState::<V>::error(&st) {
                    return Err(e);
                }
                if s.try_post(&mut st, msg)? {
                    return Ok(());
                }
            }
            s.writable.notified().await;
        }
    }
}

impl<V: Verbs> TransportWrite for RdmaWriter<V> {
    async fn write(&mut self, bytes: Bytes) -> io::Result<()> {
        for chunk in bytes.chunks(self.0 .0.chunk) {
            self.post(Msg::Data(chunk)).await?;
        }
        Ok(())
    }

    /// Sends FIN and waits until every send buffer has completed, so that
    /// destroying the queue pair loses nothing.
    async fn shutdown(&mut self) -> io::Result<()> {
        self.post(Msg::Fin).await?;
        let s = &self.0 .0;
        loop {
            {
                let st = s.lock();
                if let Some(e) = QueuePairState::<V>::error(&st) {
                    return Err(e);
                }
                if st.free.len() == s.config.send_buffers as usize {
                    return Ok(());
                }
            }
            s.writable.notified().await;
        }
    }
}

/// The completion poller: bounded busy-poll, then sleep on the channel fd.
async fn poll_loop<V: Verbs>(shared: Arc<QueuePairState<V>>) {
    if let Err(e) = poll_until_stopped(&shared).await {
        shared.fail(&mut shared.lock(), e.to_string());
    }
}

async fn poll_until_stopped<V: Verbs>(shared: &QueuePairState<V>) -> Result<(), RdmaError> {
    let fd = super::hw::watch_fd(shared.verbs.event_fd().try_clone_to_owned()?)?;
    let mut comps = Vec::with_capacity(BATCH);
    let mut idle = 0;
    loop {
        if shared.progress(&mut comps)? > 0 {
            idle = 0;
            continue;
        }
        if idle < SPIN {
            idle += 1;
            tokio::task::yield_now().await;
            continue;
        }
        shared.verbs.req_notify()?;
        // Completions that arrived before the channel was armed.
        if shared.progress(&mut comps)? > 0 {
            idle = 0;
            continue;
        }
        tokio::select! {
            _ = shared.stop.notified() => return Ok(()),
            ready = fd.readable() => {
                ready?.clear_ready();
                shared.verbs.ack_event()?;
                idle = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ring_place;

    #[test]
    fn a_message_that_would_straddle_the_ring_end_starts_at_zero() {
        assert_eq!(ring_place(0, 10, 100), (0, 0));
        assert_eq!(ring_place(90, 10, 100), (90, 0));
        assert_eq!(ring_place(95, 10, 100), (0, 5));
        assert_eq!(ring_place(205, 10, 100), (5, 0));
    }
}
