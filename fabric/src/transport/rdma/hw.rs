//! [`Verbs`] over libibverbs, for real RDMA devices (InfiniBand, RoCE,
//! Soft-RoCE). This is the crate's one `unsafe` module.
//!
//! Device discovery uses the `ibverbs` crate (`ibverbs::devices()`; where the
//! kernel has no RDMA it fails with ENOSYS, reported as "no RDMA device
//! found"). Everything after goes through `ibverbs-sys`, the same bindings:
//! the safe wrapper has no RDMA WRITE with immediate, no completion channel,
//! and ties the queue pair to borrowed lifetimes we cannot keep in a task.
//! Untested here: this machine has no RDMA device (see docs/rdma.md).

use super::verbs::{
    mr_range, Completion, QpConfig, RemoteBuf, SendOp, SendWr, Verbs, VerbsEndpoint, VerbsProvider,
    WcOpcode, WcStatus,
};
use super::RdmaError;
use bytes::BytesMut;
use ibverbs_sys as ffi;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr;
use tokio::io::unix::AsyncFd;

/// Port used on the device (the first; as the `ibverbs` crate does).
const PORT: u8 = 1;
/// GID table index (0: the port's default GID; RoCE v2 setups may need another).
const GID_INDEX: u8 = 0;

/// Registers a completion channel fd (a duplicate, owned here) with tokio.
pub(crate) fn watch_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns `fd`, so it stays open and the same until
    // the AsyncFd is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?)
}

/// One RDMA device, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IbDevice {
    name: String,
}

impl IbDevice {
    /// The first device libibverbs lists, or [`RdmaError::NoDevice`].
    pub fn first() -> Result<Self, RdmaError> {
        let list =
            ibverbs::devices().map_err(|e| RdmaError::NoDevice(format!("libibverbs: {e}")))?;
        let dev = list.iter().next().ok_or_else(|| {
            RdmaError::NoDevice("libibverbs lists none; see docs/rdma.md for Soft-RoCE".into())
        })?;
        let name = dev
            .name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

fn verb_err(verb: &'static str) -> RdmaError {
    RdmaError::Verb {
        verb,
        source: io::Error::last_os_error(),
    }
}

fn check(verb: &'static str, rc: i32) -> Result<(), RdmaError> {
    match rc {
        0 => Ok(()),
        e => Err(RdmaError::Verb {
            verb,
            source: io::Error::from_raw_os_error(e),
        }),
    }
}

/// The libibverbs objects of one queue pair, destroyed in reverse order.
pub struct IbVerbs {
    ctx: *mut ffi::ibv_context,
    channel: *mut ffi::ibv_comp_channel,
    cq: *mut ffi::ibv_cq,
    pd: *mut ffi::ibv_pd,
    qp: *mut ffi::ibv_qp,
    lid: u16,
    mtu: ffi::ibv_mtu,
    gid: [u8; 16],
    psn: u32,
    rnr_retry: u8,
}

// SAFETY: libibverbs objects may be used from any thread; the verbs used
// here (post, poll, notify, get_cq_event) are thread-safe per rdma-core.
unsafe impl Send for IbVerbs {}
// SAFETY: as above; no method mutates Rust-side state.
unsafe impl Sync for IbVerbs {}

impl VerbsProvider for IbDevice {
    type Verbs = IbVerbs;

    fn open(&self, config: &QpConfig) -> Result<IbVerbs, RdmaError> {
        let mut v = IbVerbs {
            ctx: ptr::null_mut(),
            channel: ptr::null_mut(),
            cq: ptr::null_mut(),
            pd: ptr::null_mut(),
            qp: ptr::null_mut(),
            lid: 0,
            mtu: ffi::IBV_MTU_1024,
            gid: [0; 16],
            psn: 0,
            rnr_retry: config.rnr_retry,
        };
        let mut psn = [0u8; 4];
        getrandom::getrandom(&mut psn).map_err(|e| RdmaError::Setup(e.to_string()))?;
        v.psn = u32::from_be_bytes(psn) & 0x00ff_ffff;
        // SAFETY: plain libibverbs calls in their documented order; every
        // pointer is checked before use, and `v`'s Drop releases whatever was
        // created if a later step fails.
        unsafe {
            let mut n = 0;
            let list = ffi::ibv_get_device_list(&mut n);
            if list.is_null() {
                return Err(RdmaError::NoDevice(io::Error::last_os_error().to_string()));
            }
            let devs = std::slice::from_raw_parts(list, usize::try_from(n).unwrap_or(0));
            let dev = devs.iter().copied().find(|&d| {
                let name = ffi::ibv_get_device_name(d);
                !name.is_null() && std::ffi::CStr::from_ptr(name).to_string_lossy() == self.name
            });
            v.ctx = dev.map_or(ptr::null_mut(), |d| ffi::ibv_open_device(d));
            ffi::ibv_free_device_list(list);
            if v.ctx.is_null() {
                return Err(RdmaError::NoDevice(format!("cannot open {}", self.name)));
            }
            let mut port = ffi::ibv_port_attr::default();
            check(
                "ibv_query_port",
                ffi::ibv_query_port(v.ctx, PORT, &mut port as *mut _ as *mut _),
            )?;
            v.lid = port.lid;
            v.mtu = port.active_mtu;
            let mut gid = ffi::ibv_gid { raw: [0; 16] };
            if ffi::ibv_query_gid(v.ctx, PORT, GID_INDEX.into(), &mut gid) == 0 {
                v.gid = gid.raw;
            }
            v.channel = ffi::ibv_create_comp_channel(v.ctx);
            if v.channel.is_null() {
                return Err(verb_err("ibv_create_comp_channel"));
            }
            let fd = (*v.channel).fd;
            if libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
            ) < 0
            {
                return Err(verb_err("fcntl(O_NONBLOCK)"));
            }
            let cqe = i32::try_from(config.max_send_wr + config.max_recv_wr).unwrap_or(i32::MAX);
            v.cq = ffi::ibv_create_cq(v.ctx, cqe, ptr::null_mut(), v.channel, 0);
            if v.cq.is_null() {
                return Err(verb_err("ibv_create_cq"));
            }
            v.pd = ffi::ibv_alloc_pd(v.ctx);
            if v.pd.is_null() {
                return Err(verb_err("ibv_alloc_pd"));
            }
            let mut init = ffi::ibv_qp_init_attr {
                qp_context: ptr::null_mut(),
                send_cq: v.cq,
                recv_cq: v.cq,
                srq: ptr::null_mut(),
                cap: ffi::ibv_qp_cap {
                    max_send_wr: config.max_send_wr,
                    max_recv_wr: config.max_recv_wr,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
                qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
                sq_sig_all: 0,
            };
            v.qp = ffi::ibv_create_qp(v.pd, &mut init);
            if v.qp.is_null() {
                return Err(verb_err("ibv_create_qp"));
            }
            // INIT now, so receives can be posted before the peer is known.
            let mut attr = ffi::ibv_qp_attr {
                qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
                pkey_index: 0,
                port_num: PORT,
                qp_access_flags: (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                    .0,
                ..Default::default()
            };
            use ffi::ibv_qp_attr_mask as m;
            let mask =
                m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS;
            check(
                "ibv_modify_qp(INIT)",
                ffi::ibv_modify_qp(v.qp, &mut attr, mask.0 as i32),
            )?;
        }
        Ok(v)
    }
}

impl Drop for IbVerbs {
    fn drop(&mut self) {
        // SAFETY: each object was created by this struct, is destroyed once,
        // children before parents; null ones were never created. Errors
        // cannot be handled in drop and are ignored.
        unsafe {
            if !self.qp.is_null() {
                ffi::ibv_destroy_qp(self.qp);
            }
            if !self.cq.is_null() {
                ffi::ibv_destroy_cq(self.cq);
            }
            if !self.channel.is_null() {
                ffi::ibv_destroy_comp_channel(self.channel);
            }
            if !self.pd.is_null() {
                ffi::ibv_dealloc_pd(self.pd);
            }
            if !self.ctx.is_null() {
                ffi::ibv_close_device(self.ctx);
            }
        }
    }
}

/// A registered buffer; it must be dropped before its [`IbVerbs`].
pub struct IbMr {
    mr: *mut ffi::ibv_mr,
    buf: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory plus a libibverbs handle; concurrent
// access is coordinated by the transport (a slot is touched only by its owner).
unsafe impl Send for IbMr {}
// SAFETY: as above.
unsafe impl Sync for IbMr {}

impl Drop for IbMr {
    fn drop(&mut self) {
        // SAFETY: `mr` registered `buf`, which came from `Box::into_raw` of a
        // `len`-byte slice; deregister first so the device stops using it.
        unsafe {
            ffi::ibv_dereg_mr(self.mr);
            drop(Box::from_raw(ptr::slice_from_raw_parts_mut(
                self.buf, self.len,
            )));
        }
    }
}

impl Verbs for IbVerbs {
    type Mr = IbMr;

    fn register(&self, len: usize) -> Result<IbMr, RdmaError> {
        let buf = Box::into_raw(vec![0u8; len].into_boxed_slice()) as *mut u8;
        let access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: `buf` is `len` valid bytes that live until IbMr's drop.
        let mr = unsafe { ffi::ibv_reg_mr(self.pd, buf.cast(), len, access.0 as i32) };
        if mr.is_null() {
            let err = verb_err("ibv_reg_mr");
            // SAFETY: reclaims the box leaked above; nothing else holds it.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(buf, len)) });
            return Err(err);
        }
        Ok(IbMr { mr, buf, len })
    }

    fn remote_buf(&self, mr: &IbMr) -> RemoteBuf {
        // SAFETY: `mr.mr` is a live registration.
        let rkey = unsafe { (*mr.mr).rkey };
        RemoteBuf {
            addr: mr.buf as u64,
            rkey,
            len: mr.len as u32,
        }
    }

    fn write_mr(&self, mr: &IbMr, offset: usize, data: &[u8]) -> Result<(), RdmaError> {
        let r = mr_range(offset, data.len(), mr.len)?;
        // SAFETY: the range is inside the region; the transport writes only
        // a send slot it owns, which no posted request is reading.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), mr.buf.add(r.start), data.len()) };
        Ok(())
    }

    fn read_mr(
        &self,
        mr: &IbMr,
        offset: usize,
        len: usize,
        out: &mut BytesMut,
    ) -> Result<(), RdmaError> {
        let r = mr_range(offset, len, mr.len)?;
        // SAFETY: the range is inside the region and its receive has
        // completed, so the device no longer writes it.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(mr.buf.add(r.start), len) });
        Ok(())
    }

    fn endpoint(&self) -> VerbsEndpoint {
        // SAFETY: `qp` is live for the life of `self`.
        let qpn = unsafe { (*self.qp).qp_num };
        VerbsEndpoint {
            qpn,
            lid: self.lid,
            gid: self.gid,
            psn: self.psn,
        }
    }

    fn connect(&self, remote: &VerbsEndpoint) -> Result<(), RdmaError> {
        use ffi::ibv_qp_attr_mask as m;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: self.mtu,
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ..Default::default()
        };
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.port_num = PORT;
        if remote.gid != [0; 16] {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ffi::ibv_gid { raw: remote.gid };
            attr.ah_attr.grh.hop_limit = 0xff;
            attr.ah_attr.grh.sgid_index = GID_INDEX;
        }
        let rtr = m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER;
        // SAFETY: `qp` is live and `attr` is initialised for the mask.
        check("ibv_modify_qp(RTR)", unsafe {
            ffi::ibv_modify_qp(self.qp, &mut attr, rtr.0 as i32)
        })?;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: self.psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: self.rnr_retry,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let rts = m::IBV_QP_STATE
            | m::IBV_QP_SQ_PSN
            | m::IBV_QP_TIMEOUT
            | m::IBV_QP_RETRY_CNT
            | m::IBV_QP_RNR_RETRY
            | m::IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: as above.
        check("ibv_modify_qp(RTS)", unsafe {
            ffi::ibv_modify_qp(self.qp, &mut attr, rts.0 as i32)
        })
    }

    fn post_send(&self, wr: SendWr<'_, IbMr>) -> Result<(), RdmaError> {
        let r = mr_range(wr.offset, wr.len, wr.mr.len)?;
        let mut sge = ffi::ibv_sge {
            // SAFETY: in bounds of the region (checked above).
            addr: unsafe { wr.mr.buf.add(r.start) } as u64,
            length: wr.len as u32,
            // SAFETY: live registration.
            lkey: unsafe { (*wr.mr.mr).lkey },
        };
        let mut send = ffi::ibv_send_wr {
            wr_id: wr.wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
            opcode: ffi::ibv_wr_opcode::IBV_WR_SEND,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            __bindgen_anon_1: Default::default(),
            wr: Default::default(),
            qp_type: Default::default(),
            __bindgen_anon_2: Default::default(),
        };
        if let SendOp::WriteImm {
            remote,
            offset,
            imm,
        } = wr.op
        {
            send.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
            send.__bindgen_anon_1.imm_data = imm.to_be();
            send.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: remote.addr + offset,
                rkey: remote.rkey,
            };
        }
        let mut bad = ptr::null_mut();
        // SAFETY: `qp` is live; `send` and `sge` outlive the call; the slot
        // stays untouched until its completion is polled (transport rule).
        let rc = unsafe {
            let post = (*(*self.qp).context)
                .ops
                .post_send
                .ok_or(RdmaError::Closed)?;
            post(self.qp, &mut send, &mut bad)
        };
        match rc {
            libc::ENOMEM => Err(RdmaError::SendQueueFull),
            rc => check("ibv_post_send", rc),
        }
    }

    fn post_recv(&self, mr: &IbMr, offset: usize, len: usize, wr_id: u64) -> Result<(), RdmaError> {
        let r = mr_range(offset, len, mr.len)?;
        let mut sge = ffi::ibv_sge {
            // SAFETY: in bounds (checked above).
            addr: unsafe { mr.buf.add(r.start) } as u64,
            length: len as u32,
            // SAFETY: live registration.
            lkey: unsafe { (*mr.mr).lkey },
        };
        let mut recv = ffi::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: as for post_send.
        let rc = unsafe {
            let post = (*(*self.qp).context)
                .ops
                .post_recv
                .ok_or(RdmaError::Closed)?;
            post(self.qp, &mut recv, &mut bad)
        };
        match rc {
            libc::ENOMEM => Err(RdmaError::RecvQueueFull),
            rc => check("ibv_post_recv", rc),
        }
    }

    fn poll_cq(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, RdmaError> {
        let mut wcs = vec![ffi::ibv_wc::default(); max.min(64)];
        // SAFETY: `cq` is live and `wcs` has room for the count passed.
        let n = unsafe {
            let poll = (*self.ctx).ops.poll_cq.ok_or(RdmaError::Closed)?;
            poll(self.cq, wcs.len() as i32, wcs.as_mut_ptr())
        };
        let n = usize::try_from(n).map_err(|_| RdmaError::Verb {
            verb: "ibv_poll_cq",
            source: io::Error::other("failed"),
        })?;
        for wc in &wcs[..n] {
            let status = match wc.error() {
                None => WcStatus::Success,
                Some((ffi::ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR, _)) => {
                    WcStatus::RnrRetryExceeded
                }
                Some((ffi::ibv_wc_status::IBV_WC_RETRY_EXC_ERR, _)) => WcStatus::RetryExceeded,
                Some((ffi::ibv_wc_status::IBV_WC_WR_FLUSH_ERR, _)) => WcStatus::Flushed,
                Some((ffi::ibv_wc_status::IBV_WC_REM_ACCESS_ERR, _)) => WcStatus::RemoteAccess,
                Some((ffi::ibv_wc_status::IBV_WC_LOC_LEN_ERR, _)) => WcStatus::LocalLength,
                Some((s, _)) => WcStatus::Other(s),
            };
            let opcode = match wc.opcode() {
                ffi::ibv_wc_opcode::IBV_WC_SEND => WcOpcode::Send,
                ffi::ibv_wc_opcode::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
                ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvWithImm,
                // Error completions leave the opcode undefined; the wr_id
                // ranges are disjoint per queue only, so call it a receive.
                _ => WcOpcode::Recv,
            };
            let imm = wc.imm_data().map(u32::from_be);
            out.push(Completion {
                wr_id: wc.wr_id(),
                status,
                opcode,
                byte_len: wc.len() as u32,
                imm,
            });
        }
        Ok(n)
    }

    fn req_notify(&self) -> Result<(), RdmaError> {
        // SAFETY: `cq` is live.
        let rc = unsafe {
            let notify = (*self.ctx).ops.req_notify_cq.ok_or(RdmaError::Closed)?;
            notify(self.cq, 0)
        };
        check("ibv_req_notify_cq", rc)
    }

    fn ack_event(&self) -> Result<(), RdmaError> {
        loop {
            let mut cq = ptr::null_mut();
            let mut ctx = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking.
            if unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut ctx) } != 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    _ => Err(RdmaError::Verb {
                        verb: "ibv_get_cq_event",
                        source: e,
                    }),
                };
            }
            // SAFETY: acknowledges the one event just taken from our cq.
            unsafe { ffi::ibv_ack_cq_events(cq, 1) };
        }
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel's fd is open for the life of `self`.
        unsafe { BorrowedFd::borrow_raw((*self.channel).fd) }
    }
}
