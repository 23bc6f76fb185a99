//! An in-process emulation of RC verbs, for tests on machines without RDMA.
//!
//! One [`EmuFabric`] is a tiny subnet: queue pairs find each other by QP
//! number and write into each other's registered memory directly (shared
//! memory behind one lock). It keeps the semantics the transport relies on:
//! work requests execute in order per queue pair (RC ordering); a SEND or a
//! WRITE with immediate consumes one posted receive at the peer; with none
//! posted the request waits (RNR NAK) and is retried every [`RNR_TIMER`],
//! failing with [`WcStatus::RnrRetryExceeded`] after `rnr_retry` retries
//! (7 = forever) and taking the queue pair to the error state, where every
//! outstanding request is flushed; a send-queue slot stays taken until its
//! completion is polled, so posting past `max_send_wr` fails with
//! [`RdmaError::SendQueueFull`]. The completion channel is a datagram socket
//! pair: one byte per armed notification.

use super::verbs::{
    mr_range, Completion, QpConfig, RemoteBuf, SendOp, SendWr, Verbs, VerbsEndpoint, VerbsProvider,
    WcOpcode, WcStatus,
};
use super::RdmaError;
use bytes::BytesMut;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Interval between RNR retries (a real device's `min_rnr_timer`).
pub const RNR_TIMER: Duration = Duration::from_millis(1);
/// `rnr_retry` value meaning "retry forever".
const RNR_INFINITE: u8 = 7;

/// An emulated subnet; clones share it.
#[derive(Clone, Default)]
pub struct EmuFabric {
    world: Arc<Mutex<World>>,
}

#[derive(Default)]
struct World {
    qps: HashMap<u32, Qp>,
    mrs: HashMap<u32, Region>,
    next_id: u32,
}

struct Region {
    owner: u32,
    data: Vec<u8>,
}

struct PendingSend {
    wr_id: u64,
    data: Vec<u8>,
    op: SendOp,
}

struct PostedRecv {
    wr_id: u64,
    mr: u32,
    offset: usize,
    len: usize,
}

struct Qp {
    config: QpConfig,
    peer: Option<u32>,
    /// Posted sends not yet executed (the head may be waiting on RNR).
    sq: VecDeque<PendingSend>,
    /// Sends posted whose completion has not been polled.
    sq_outstanding: usize,
    rq: VecDeque<PostedRecv>,
    cq: VecDeque<Completion>,
    armed: bool,
    notify: UnixDatagram,
    error: bool,
    /// RNR retries done on the head request and when the next is due.
    rnr: Option<(u8, Instant)>,
}

impl Qp {
    fn complete(&mut self, c: Completion) {
        self.cq.push_back(c);
        if std::mem::take(&mut self.armed) {
            // A full socket buffer already holds a wake-up; nothing is lost.
            let _ = self.notify.send(&[1]);
        }
    }

    fn complete_send(&mut self, status: WcStatus) {
        if let Some(s) = self.sq.pop_front() {
            let opcode = match s.op {
                SendOp::Send => WcOpcode::Send,
                SendOp::WriteImm { .. } => WcOpcode::RdmaWrite,
            };
            self.complete(Completion {
                wr_id: s.wr_id,
                status,
                opcode,
                byte_len: 0,
                imm: None,
            });
        }
        self.rnr = None;
    }

    /// Enters the error state: every outstanding request completes flushed.
    fn fail(&mut self) {
        self.error = true;
        while !self.sq.is_empty() {
            self.complete_send(WcStatus::Flushed);
        }
        while let Some(r) = self.rq.pop_front() {
            self.complete(Completion {
                wr_id: r.wr_id,
                status: WcStatus::Flushed,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                imm: None,
            });
        }
    }
}

impl World {
    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    /// Executes `qpn`'s queued sends in order until one must wait.
    /// `tick` lets a due RNR retry count (the sender's own polling drives it).
    fn progress(&mut self, qpn: u32, tick: bool) {
        loop {
            let Some(peer) = self.qps.get(&qpn).and_then(|q| q.peer) else {
                return;
            };
            let [Some(qp), peer_qp] = self.qps.get_disjoint_mut([&qpn, &peer]) else {
                return;
            };
            if qp.error || qp.sq.is_empty() {
                return;
            }
            let Some(peer_qp) = peer_qp.filter(|p| !p.error) else {
                // The peer is gone: the transport's retries run out.
                qp.complete_send(WcStatus::RetryExceeded);
                qp.fail();
                return;
            };
            let Some(recv) = peer_qp.rq.pop_front() else {
                let now = Instant::now();
                match qp.rnr {
                    None => qp.rnr = Some((0, now + RNR_TIMER)),
                    Some((n, due)) if tick && now >= due => {
                        if qp.config.rnr_retry != RNR_INFINITE && n >= qp.config.rnr_retry {
                            qp.complete_send(WcStatus::RnrRetryExceeded);
                            qp.fail();
                        } else {
                            qp.rnr = Some((n + 1, now + RNR_TIMER));
                        }
                    }
                    Some(_) => {}
                }
                return;
            };
            let head = &qp.sq[0];
            let len = head.data.len();
            let (target, range, opcode, imm) = match head.op {
                SendOp::Send => (
                    recv.mr,
                    (recv.len >= len).then(|| recv.offset..recv.offset + len),
                    WcOpcode::Recv,
                    None,
                ),
                SendOp::WriteImm {
                    remote,
                    offset,
                    imm,
                } => {
                    let ok = self.mrs.get(&remote.rkey).is_some_and(|r| r.owner == peer);
                    let range = usize::try_from(offset)
                        .ok()
                        .and_then(|o| mr_range(o, len, remote.len as usize).ok());
                    (
                        remote.rkey,
                        range.filter(|_| ok),
                        WcOpcode::RecvWithImm,
                        Some(imm),
                    )
                }
            };
            let Some(dst) =
                range.and_then(|r| self.mrs.get_mut(&target).and_then(|m| m.data.get_mut(r)))
            else {
                let (local, remote) = match head.op {
                    SendOp::Send => (WcStatus::Other(9), WcStatus::LocalLength),
                    SendOp::WriteImm { .. } => (WcStatus::RemoteAccess, WcStatus::Flushed),
                };
                peer_qp.complete(Completion {
                    wr_id: recv.wr_id,
                    status: remote,
                    opcode,
                    byte_len: 0,
                    imm: None,
                });
                peer_qp.fail();
                qp.complete_send(local);
                qp.fail();
                return;
            };
            dst.copy_from_slice(&head.data);
            peer_qp.complete(Completion {
                wr_id: recv.wr_id,
                status: WcStatus::Success,
                opcode,
                byte_len: len as u32,
                imm,
            });
            qp.complete_send(WcStatus::Success);
        }
    }
}

impl EmuFabric {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VerbsProvider for EmuFabric {
    type Verbs = EmuVerbs;

    fn open(&self, config: &QpConfig) -> Result<EmuVerbs, RdmaError> {
        let (notify, events) = UnixDatagram::pair()?;
        notify.set_nonblocking(true)?;
        events.set_nonblocking(true)?;
        let mut w = self.lock();
        let qpn = w.id();
        w.qps.insert(
            qpn,
            Qp {
                config: *config,
                peer: None,
                sq: VecDeque::new(),
                sq_outstanding: 0,
                rq: VecDeque::new(),
                cq: VecDeque::new(),
                armed: false,
                notify,
                error: false,
                rnr: None,
            },
        );
        Ok(EmuVerbs {
            fabric: self.clone(),
            qpn,
            events,
        })
    }
}

/// One emulated queue pair.
pub struct EmuVerbs {
    fabric: EmuFabric,
    qpn: u32,
    events: UnixDatagram,
}

/// An emulated memory region: its key (lkey = rkey) and length.
pub struct EmuMr {
    key: u32,
    len: usize,
}

impl EmuVerbs {
    /// Runs `f` on this queue pair; [`RdmaError::Closed`] if it is gone.
    fn with_qp<T>(&self, f: impl FnOnce(&mut Qp) -> T) -> Result<T, RdmaError> {
        self.fabric
            .lock()
            .qps
            .get_mut(&self.qpn)
            .map(f)
            .ok_or(RdmaError::Closed)
    }

    fn with_region<T>(
        &self,
        mr: &EmuMr,
        f: impl FnOnce(&mut Vec<u8>) -> T,
    ) -> Result<T, RdmaError> {
        self.fabric
            .lock()
            .mrs
            .get_mut(&mr.key)
            .map(|r| f(&mut r.data))
            .ok_or(RdmaError::Closed)
    }
}

impl Drop for EmuVerbs {
    /// Destroying a queue pair: its regions go, and the peer sees its
    /// requests fail (as retries would on a real link).
    fn drop(&mut self) {
        let mut w = self.fabric.lock();
        w.mrs.retain(|_, r| r.owner != self.qpn);
        if let Some(peer) = w.qps.remove(&self.qpn).and_then(|q| q.peer) {
            if let Some(p) = w.qps.get_mut(&peer) {
                p.fail();
            }
        }
    }
}

impl Verbs for EmuVerbs {
    type Mr = EmuMr;

    fn register(&self, len: usize) -> Result<EmuMr, RdmaError> {
        let mut w = self.fabric.lock();
        let key = w.id();
        w.mrs.insert(
            key,
            Region {
                owner: self.qpn,
                data: vec![0; len],
            },
        );
        Ok(EmuMr { key, len })
    }

    fn remote_buf(&self, mr: &EmuMr) -> RemoteBuf {
        RemoteBuf {
            addr: 0,
            rkey: mr.key,
            len: mr.len as u32,
        }
    }

    fn write_mr(&self, mr: &EmuMr, offset: usize, data: &[u8]) -> Result<(), RdmaError> {
        let r = mr_range(offset, data.len(), mr.len)?;
        self.with_region(mr, |d| d[r].copy_from_slice(data))
    }

    fn read_mr(
        &self,
        mr: &EmuMr,
        offset: usize,
        len: usize,
        out: &mut BytesMut,
    ) -> Result<(), RdmaError> {
        let r = mr_range(offset, len, mr.len)?;
        self.with_region(mr, |d| out.extend_from_slice(&d[r]))
    }

    fn endpoint(&self) -> VerbsEndpoint {
        VerbsEndpoint {
            qpn: self.qpn,
            lid: 1,
            gid: [0; 16],
            psn: 0,
        }
    }

    fn connect(&self, remote: &VerbsEndpoint) -> Result<(), RdmaError> {
        self.with_qp(|q| q.peer = Some(remote.qpn))
    }

    fn post_send(&self, wr: SendWr<'_, EmuMr>) -> Result<(), RdmaError> {
        let r = mr_range(wr.offset, wr.len, wr.mr.len)?;
        let mut w = self.fabric.lock();
        let data = w.mrs.get(&wr.mr.key).ok_or(RdmaError::Closed)?.data[r].to_vec();
        let qp = w.qps.get_mut(&self.qpn).ok_or(RdmaError::Closed)?;
        if qp.peer.is_none() {
            return Err(RdmaError::NotConnected);
        }
        if qp.sq_outstanding >= qp.config.max_send_wr as usize {
            return Err(RdmaError::SendQueueFull);
        }
        qp.sq_outstanding += 1;
        qp.sq.push_back(PendingSend {
            wr_id: wr.wr_id,
            data,
            op: wr.op,
        });
        if qp.error {
            qp.fail();
        }
        w.progress(self.qpn, false);
        Ok(())
    }

    fn post_recv(
        &self,
        mr: &EmuMr,
        offset: usize,
        len: usize,
        wr_id: u64,
    ) -> Result<(), RdmaError> {
        mr_range(offset, len, mr.len)?;
        let mut w = self.fabric.lock();
        let qp = w.qps.get_mut(&self.qpn).ok_or(RdmaError::Closed)?;
        if qp.rq.len() >= qp.config.max_recv_wr as usize {
            return Err(RdmaError::RecvQueueFull);
        }
        qp.rq.push_back(PostedRecv {
            wr_id,
            mr: mr.key,
            offset,
            len,
        });
        if qp.error {
            qp.fail();
        }
        // A peer waiting on RNR retries now that a receive is posted.
        if let Some(peer) = qp.peer {
            w.progress(peer, false);
        }
        Ok(())
    }

    fn poll_cq(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, RdmaError> {
        let mut w = self.fabric.lock();
        w.progress(self.qpn, true);
        let qp = w.qps.get_mut(&self.qpn).ok_or(RdmaError::Closed)?;
        let n = max.min(qp.cq.len());
        for c in qp.cq.drain(..n) {
            if matches!(c.opcode, WcOpcode::Send | WcOpcode::RdmaWrite) {
                qp.sq_outstanding -= 1;
            }
            out.push(c);
        }
        Ok(n)
    }

    fn req_notify(&self) -> Result<(), RdmaError> {
        self.with_qp(|q| q.armed = true)
    }

    fn ack_event(&self) -> Result<(), RdmaError> {
        let mut b = [0u8; 64];
        loop {
            match self.events.recv(&mut b) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }
}
