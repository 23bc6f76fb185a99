//! The narrow verbs interface the RDMA transport is written against.
//!
//! Only the verbs the transport uses (DESIGN.md, fabric `rdma`): register
//! memory, connect an RC queue pair, post SEND / RDMA WRITE with immediate,
//! post receives, poll the completion queue, and arm/acknowledge the
//! completion channel whose file descriptor the poller sleeps on. Two
//! implementations: [`super::hw`] over libibverbs for real devices and
//! [`super::emu`], an in-process emulation with the same ordering and
//! completion semantics, for tests on machines without RDMA.

use super::RdmaError;
use bytes::BytesMut;
use std::os::fd::BorrowedFd;

/// Queue pair sizing and retry behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpConfig {
    /// Work requests the send queue holds (posted and not yet polled).
    pub max_send_wr: u32,
    /// Receives the receive queue holds.
    pub max_recv_wr: u32,
    /// RNR retries before a send fails with [`WcStatus::RnrRetryExceeded`];
    /// 7 means retry forever (the InfiniBand encoding).
    pub rnr_retry: u8,
}

/// What the peer needs to connect its queue pair to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerbsEndpoint {
    pub qpn: u32,
    pub lid: u16,
    /// All zero when the port has no GID (InfiniBand with LID routing).
    pub gid: [u8; 16],
    pub psn: u32,
}

/// A registered buffer as the peer addresses it in an RDMA WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteBuf {
    pub addr: u64,
    pub rkey: u32,
    pub len: u32,
}

/// The operation of a send work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// Two-sided: consumes one receive at the peer.
    Send,
    /// One-sided write into `remote` at `offset`; the immediate consumes one
    /// receive at the peer and tells it the length.
    WriteImm {
        remote: RemoteBuf,
        offset: u64,
        imm: u32,
    },
}

/// One send work request over `len` bytes of `mr` at `offset`.
pub struct SendWr<'a, M> {
    pub wr_id: u64,
    pub mr: &'a M,
    pub offset: usize,
    pub len: usize,
    pub op: SendOp,
}

/// Work completion status (the `ibv_wc_status` values the transport tells apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    Success,
    /// The peer had no receive posted for longer than the RNR retries allow.
    RnrRetryExceeded,
    /// The peer did not answer (transport retries exhausted).
    RetryExceeded,
    /// The queue pair is in the error state; outstanding requests are flushed.
    Flushed,
    /// A remote access (rkey/bounds) violation.
    RemoteAccess,
    /// The incoming message did not fit the posted receive.
    LocalLength,
    Other(u32),
}

/// Which queue a completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    Recv,
    RecvWithImm,
}

/// One work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    pub byte_len: u32,
    pub imm: Option<u32>,
}

/// Opens queue pairs on one device (a NIC, or the emulated fabric).
pub trait VerbsProvider: Clone + Send + Sync + 'static {
    type Verbs: Verbs;
    /// Creates a queue pair with its completion queue and channel.
    fn open(&self, config: &QpConfig) -> Result<Self::Verbs, RdmaError>;
}

/// One RC queue pair with its completion queue and completion channel.
/// Every method is non-blocking.
pub trait Verbs: Send + Sync + 'static {
    /// A registered memory region.
    type Mr: Send + Sync + 'static;
    /// Allocates and registers `len` zeroed bytes (local write, remote write).
    fn register(&self, len: usize) -> Result<Self::Mr, RdmaError>;
    /// How the peer addresses `mr`.
    fn remote_buf(&self, mr: &Self::Mr) -> RemoteBuf;
    /// Copies `data` into `mr` at `offset` (the one copy of the send path).
    fn write_mr(&self, mr: &Self::Mr, offset: usize, data: &[u8]) -> Result<(), RdmaError>;
    /// Appends `len` bytes of `mr` at `offset` to `out`.
    fn read_mr(
        &self,
        mr: &Self::Mr,
        offset: usize,
        len: usize,
        out: &mut BytesMut,
    ) -> Result<(), RdmaError>;
    /// Our side of the connection, to send to the peer.
    fn endpoint(&self) -> VerbsEndpoint;
    /// Moves the queue pair to ready-to-send against `remote`.
    fn connect(&self, remote: &VerbsEndpoint) -> Result<(), RdmaError>;
    /// Posts one signalled send; [`RdmaError::SendQueueFull`] when
    /// `max_send_wr` requests are outstanding.
    fn post_send(&self, wr: SendWr<'_, Self::Mr>) -> Result<(), RdmaError>;
    /// Posts one receive into `len` bytes of `mr` at `offset`.
    fn post_recv(
        &self,
        mr: &Self::Mr,
        offset: usize,
        len: usize,
        wr_id: u64,
    ) -> Result<(), RdmaError>;
    /// Moves up to `max` completions into `out`; returns how many.
    fn poll_cq(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, RdmaError>;
    /// Asks for one readiness event on [`Verbs::event_fd`] at the next completion.
    fn req_notify(&self) -> Result<(), RdmaError>;
    /// Consumes the readiness event (after the fd polled readable).
    fn ack_event(&self) -> Result<(), RdmaError>;
    /// The completion channel's non-blocking file descriptor.
    fn event_fd(&self) -> BorrowedFd<'_>;
}

/// The range `offset..offset + len` of a region of `size` bytes, or
/// [`RdmaError::Bounds`]; shared by both implementations.
pub(crate) fn mr_range(
    offset: usize,
    len: usize,
    size: usize,
) -> Result<std::ops::Range<usize>, RdmaError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset..end),
        _ => Err(RdmaError::Bounds { offset, len, size }),
    }
}
