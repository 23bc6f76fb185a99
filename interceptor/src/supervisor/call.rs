//! One trapped call being serviced: [`Call`] (the notification, what was
//! read for the trace, the duplicate of its fd argument), what servicing it
//! came to ([`Outcome`]), and the helpers every handler uses on a call:
//! finding its virtual socket, reading and writing its address arguments,
//! putting an object over its fd, checking that its caller still waits.

use super::state::SupervisorState;
use super::trace::{Detail, Note};
use crate::memory::TargetMemory;
use crate::notify::{AddFd, Notification, Reply};
use crate::vsock::{Inode, VirtualSocket};
use crate::{fds, sockaddr};
use saps_fabric::ConnId;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often a call waiting in a task (a blocking accept, connect or
/// sendto) checks that its caller is still waiting and has no signal to
/// take: the longest a signal waits to interrupt it.
pub(crate) const LIVENESS_CHECK: Duration = Duration::from_millis(50);

/// `ERESTARTSYS`: the answer of a call that sleeps natively and is
/// interrupted by a signal. The kernel turns it into `EINTR`, or restarts
/// the call under `SA_RESTART`, exactly as for its own sleeping calls.
pub(crate) const ERESTARTSYS: i32 = 512;

/// The result of servicing a call synchronously.
pub(crate) enum Outcome {
    /// Answer with this.
    Reply(Reply),
    /// Already answered (`ADDFD` with `SEND` answers the call itself).
    Answered(i64),
    /// Wait for the io-server (or a connection) in a task that answers.
    Defer(Deferred),
}

pub(crate) type Deferred = Box<
    dyn FnOnce(Arc<SupervisorState>, Call) -> Pin<Box<dyn Future<Output = (Call, Outcome)> + Send>>
        + Send,
>;

/// Services the rest of a call in a task on the runtime.
pub(crate) fn defer<F, Fut>(f: F) -> Outcome
where
    F: FnOnce(Arc<SupervisorState>, Call) -> Fut + Send + 'static,
    Fut: Future<Output = (Call, Outcome)> + Send + 'static,
{
    Outcome::Defer(Box::new(move |sh, call| Box::pin(f(sh, call))))
}

/// The context of one notification being serviced.
pub(crate) struct Call {
    pub n: Notification,
    pub start: Instant,
    pub wall: SystemTime,
    pub detail: Detail,
    pub note: Note,
    /// The fd argument's flags (`/proc/PID/fdinfo`), read once per call.
    flags: std::sync::OnceLock<Option<i32>>,
    /// The supervisor's duplicate of the fd argument, taken by `lookup` and
    /// reused for the rest of the call (the listener of an accept, the file
    /// status flags); dropped before the call waits in a task, so a close
    /// by the program is not hidden.
    pub dup: Option<OwnedFd>,
    /// The socket whose `bind`/`listen` this call is, when it waits for
    /// the io-server (`restart.rs`): told whether the answer arrived.
    pub op: Option<Inode>,
}

impl Call {
    /// A call received now.
    pub(crate) fn new(n: Notification) -> Self {
        Call {
            n,
            start: Instant::now(),
            wall: SystemTime::now(),
            detail: Detail::default(),
            note: Note::default(),
            flags: std::sync::OnceLock::new(),
            dup: None,
            op: None,
        }
    }

    /// The flags of the call's fd argument (`O_NONBLOCK`, `O_CLOEXEC` …).
    pub fn fd_flags(&self) -> Option<i32> {
        *self
            .flags
            .get_or_init(|| fds::fd_flags(self.pid(), self.fd()).ok())
    }

    pub fn mem(&self) -> TargetMemory {
        TargetMemory::new(self.n.pid)
    }

    pub fn pid(&self) -> u32 {
        self.n.pid
    }

    pub fn fd(&self) -> RawFd {
        self.n.args[0] as RawFd
    }

    pub fn arg(&self, i: usize) -> u64 {
        self.n.args[i]
    }

    /// The syscall and the notification, which tell a call made again
    /// after a signal (`restart.rs`).
    pub fn id(&self) -> (i64, u64) {
        (self.n.nr as i64, self.n.id)
    }
}

/// The state's services to a call.
impl SupervisorState {
    /// A duplicate of the call's fd argument, for the time of the call.
    pub(crate) fn target_fd(&self, call: &Call) -> std::io::Result<OwnedFd> {
        let dup = || self.pidfds.with(call.pid(), |p| fds::get_fd(p, call.fd()));
        super::reserve::with_room(&self.reserve, dup)
    }

    /// The virtual socket behind the call's fd argument, if it is one.
    pub(crate) fn lookup(&self, call: &mut Call) -> Option<(Inode, VirtualSocket)> {
        let dup = || {
            let pidfds = &self.pidfds;
            pidfds.with(call.pid(), |p| fds::socket_dup_inode(p, call.fd()))
        };
        let (dup, ino) = super::reserve::with_room(&self.reserve, dup).ok()?;
        let ino = ino?;
        let vs = self.table().get(ino)?.clone();
        call.dup = Some(dup);
        call.note.inode = Some(ino);
        call.note.conn = vs.conn;
        Some((ino, vs))
    }

    /// The tag of `vs` (allocated on first use), noted on the call with
    /// what SAPS does with it.
    pub(crate) fn tag(
        &self,
        call: &mut Call,
        vs: &mut VirtualSocket,
        action: &'static str,
    ) -> Result<ConnId, i32> {
        let conn = self.conn_of(vs)?;
        call.note.conn = Some(conn);
        call.note.action = action;
        Ok(conn)
    }

    /// Installs `obj` over the call's fd number (`ADDFD` + `SETFD`), keeping
    /// the fd's close-on-exec flag, after checking the call is still live.
    pub(crate) fn replace_fd(&self, call: &Call, obj: BorrowedFd<'_>) -> Result<(), i32> {
        let cloexec = call.fd_flags().is_some_and(|f| f & libc::O_CLOEXEC != 0);
        if !self.notifier.id_valid(call.n.id) {
            return Err(libc::EINTR);
        }
        self.notifier
            .add_fd(
                call.n.id,
                obj,
                AddFd {
                    target_fd: Some(call.fd()),
                    cloexec,
                    send: false,
                },
            )
            .map(|_| ())
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF))
    }

    /// Whether the fd of the call is in non-blocking mode.
    pub(crate) fn nonblocking(&self, call: &Call) -> bool {
        // O_NONBLOCK belongs to the open file, which the duplicate shares:
        // one fcntl instead of reading /proc/PID/fdinfo.
        if let Some(d) = &call.dup {
            if let Ok(f) = nix::fcntl::fcntl(d.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL) {
                return f & libc::O_NONBLOCK != 0;
            }
        }
        call.fd_flags().is_some_and(|f| f & libc::O_NONBLOCK != 0)
    }

    /// Whether the caller of `call`, waiting in a task, should be answered
    /// now: `EINTR` if the call is gone (its process died, or an older
    /// kernel interrupted it), `ERESTARTSYS` if its thread has a signal to
    /// take (the filter waits killably: a signal does not end the wait by
    /// itself, see `sys::fork_filtered`).
    pub(crate) fn interrupted(&self, call: &Call) -> Option<Reply> {
        if !self.notifier.id_valid(call.n.id) {
            return Some(Reply::Errno(libc::EINTR));
        }
        signal_pending(call.pid()).then_some(Reply::Errno(ERESTARTSYS))
    }

    /// Writes `addr` into the caller's (addr, addrlen) value-result pair
    /// with the kernel's truncation rules, recording both lengths.
    pub(crate) fn write_addr(
        &self,
        call: &mut Call,
        ptr: u64,
        len_ptr: u64,
        addr: &SocketAddr,
    ) -> Result<(), i32> {
        let mem = call.mem();
        call.detail.addr = Some(*addr);
        match sockaddr::write_to_target(&mem, ptr, len_ptr, addr) {
            Ok(len_in) => call.detail.len_in = Some(len_in),
            Err(e) => {
                // The trace still shows a length that was readable.
                call.detail.len_in = mem.read_u32(len_ptr).ok();
                return Err(e);
            }
        }
        call.detail.len = Some(sockaddr::encode(addr).len() as u32);
        Ok(())
    }

    /// Reads a sockaddr argument; errors are the errno to return.
    pub(crate) fn read_sockaddr(
        &self,
        call: &mut Call,
        ptr: u64,
        len: u64,
    ) -> Result<SocketAddr, i32> {
        match self.read_any_sockaddr(call, ptr, len)? {
            sockaddr::Decoded::Inet(addr) => Ok(addr),
            sockaddr::Decoded::Unspec { .. } => Err(libc::EAFNOSUPPORT),
        }
    }

    /// The address argument, `AF_UNSPEC` included (`bind`'s compatibility
    /// rule, `connect`'s disconnect).
    pub(crate) fn read_any_sockaddr(
        &self,
        call: &mut Call,
        ptr: u64,
        len: u64,
    ) -> Result<sockaddr::Decoded, i32> {
        let d = sockaddr::read_from_target(&call.mem(), ptr, len)?;
        if let sockaddr::Decoded::Inet(addr) = d {
            call.detail.addr = Some(addr);
        }
        Ok(d)
    }
}

/// Whether thread `tid` has a signal pending that it does not block
/// (`/proc/TID/status`: `SigPnd` and `ShdPnd` against `SigBlk`).
fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}
