//! Many descriptors over a unix `SOCK_SEQPACKET` socket, in batches, for
//! the io-server's upgrade in place (bench/notes/2026-12-03-upgrade-design.md,
//! §4.2 step 4): the old process sends every descriptor it holds, in the
//! order its state names them, and the new one gets them back in that
//! order, or an error. The hand-off socket ([`crate::handoff::side`])
//! sends one descriptor a message; this sends any number.
//!
//! One `SCM_RIGHTS` message carries at most [`SCM_MAX_FD`] descriptors (the
//! kernel's limit), so `n` of them go in `ceil(n / 253)` messages (one
//! when there are none). Each message is a [`PREFIX_LEN`]-octet prefix,
//! `batch: u32 | first: u32 | count: u32 | total: u32` (big-endian: its
//! number from 0, the index of its first descriptor, how many it carries,
//! how many the transfer has), then the caller's header, with its
//! descriptors attached. On a `SOCK_SEQPACKET` socket message boundaries
//! hold and a message with descriptors is never merged with another. The
//! receiver refuses a message whose descriptors did not all arrive
//! (`MSG_CTRUNC`: no room for them, or it is out of descriptors), a
//! batch out of order or with a gap before it, a count other than the
//! batch's share, and a total or header other than the first message's.
//!
//! Both calls block, at most for their timeout: whatever the socket's mode,
//! they wait with `poll(2)` (`MSG_DONTWAIT` on every call).
//! After an error the transfer is broken: the upgrade fails as a whole.
//! [`send_message`] and [`recv_message`] carry the single messages
//! around a transfer, bounded the same way.

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self as so, ControlMessage, MsgFlags};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Most descriptors one `SCM_RIGHTS` message carries (Linux's
/// `SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// Octets before the header in every message: batch, first, count, total.
pub const PREFIX_LEN: usize = 16;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    #[error("descriptor transfer: {0}")]
    Io(#[from] io::Error),
    #[error("batch {batch} arrived without all its descriptors (MSG_CTRUNC: no room for them, or out of descriptors)")]
    Truncated { batch: u32 },
    #[error("batch {batch} from descriptor {first} came where batch {due} from descriptor {due_first} was due")]
    Gap {
        batch: u32,
        first: u32,
        due: u32,
        due_first: u32,
    },
    #[error("malformed descriptor batch: {0}")]
    Malformed(&'static str),
    #[error("the socket closed after {received} of {total} descriptors")]
    Closed { received: usize, total: usize },
    #[error("{0} descriptors are more than a transfer carries")]
    TooMany(usize),
}

/// One message's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batch {
    batch: u32,
    first: u32,
    count: u32,
    total: u32,
}

impl Batch {
    fn encode(&self) -> [u8; PREFIX_LEN] {
        let mut p = [0; PREFIX_LEN];
        for (i, n) in [self.batch, self.first, self.count, self.total]
            .into_iter()
            .enumerate()
        {
            p[4 * i..4 * i + 4].copy_from_slice(&n.to_be_bytes());
        }
        p
    }

    fn decode(p: &[u8]) -> Option<Batch> {
        let n = |i: usize| {
            Some(u32::from_be_bytes(
                p.get(4 * i..4 * i + 4)?.try_into().ok()?,
            ))
        };
        Some(Batch {
            batch: n(0)?,
            first: n(1)?,
            count: n(2)?,
            total: n(3)?,
        })
    }

    /// How many descriptors the batch from `first` of `total` carries.
    fn share(first: u32, total: u32) -> u32 {
        (total - first).min(SCM_MAX_FD as u32)
    }
}

/// Sends `fds`, in order, with `header` in every message (what they are,
/// for the receiver to check), within `timeout`.
pub fn send_fds(
    sock: BorrowedFd<'_>,
    header: &[u8],
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> Result<(), FdPassError> {
    let deadline = Instant::now() + timeout;
    let total = u32::try_from(fds.len()).map_err(|_| FdPassError::TooMany(fds.len()))?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let (mut batch, mut first) = (0, 0);
    loop {
        let count = Batch::share(first, total);
        let b = Batch {
            batch,
            first,
            count,
            total,
        };
        send_batch(
            sock,
            b,
            header,
            &raw[first as usize..(first + count) as usize],
            deadline,
        )?;
        first += count;
        if first == total {
            return Ok(());
        }
        batch += 1;
    }
}

/// One message: `b`'s prefix and `header`, with `fds`.
fn send_batch(
    sock: BorrowedFd<'_>,
    b: Batch,
    header: &[u8],
    fds: &[RawFd],
    deadline: Instant,
) -> io::Result<()> {
    let prefix = b.encode();
    let iov = [IoSlice::new(&prefix), IoSlice::new(header)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match so::sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait(sock, PollFlags::POLLOUT, deadline)?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives a transfer [`send_fds`] sent: its header (at most
/// `max_header` octets) and its descriptors, in order (close-on-exec),
/// within `timeout`.
pub fn recv_fds(
    sock: BorrowedFd<'_>,
    max_header: usize,
    timeout: Duration,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FdPassError> {
    recv_with_room::<SCM_MAX_FD>(sock, max_header, Instant::now() + timeout)
}

/// [`recv_fds`] with room for `ROOM` descriptors a message (the tests
/// give less, to see a truncated batch refused).
fn recv_with_room<const ROOM: usize>(
    sock: BorrowedFd<'_>,
    max_header: usize,
    deadline: Instant,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FdPassError> {
    // One octet more than the longest message: a longer one is seen.
    let mut buf = vec![0; PREFIX_LEN + max_header + 1];
    let mut got: Vec<OwnedFd> = Vec::new();
    let mut first_msg: Option<(u32, Vec<u8>)> = None;
    let mut due = 0;
    loop {
        let (n, flags, fds) = recv_one::<ROOM>(sock, &mut buf, deadline)?;
        // The descriptors of a refused message close as `fds` drops.
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(FdPassError::Truncated { batch: due });
        }
        let total = first_msg.as_ref().map_or(0, |(t, _)| *t as usize);
        if n == 0 {
            return Err(FdPassError::Closed {
                received: got.len(),
                total,
            });
        }
        if flags.contains(MsgFlags::MSG_TRUNC) || n > PREFIX_LEN + max_header {
            return Err(FdPassError::Malformed("a header longer than allowed"));
        }
        let b = Batch::decode(&buf[..n.min(PREFIX_LEN)])
            .ok_or(FdPassError::Malformed("a message shorter than its prefix"))?;
        let header = &buf[PREFIX_LEN..n];
        let (total, first_header) = first_msg.get_or_insert_with(|| (b.total, header.to_vec()));
        if b.total != *total || header != &first_header[..] {
            return Err(FdPassError::Malformed(
                "a total or header other than the first batch's",
            ));
        }
        if b.batch != due || b.first as usize != got.len() {
            return Err(FdPassError::Gap {
                batch: b.batch,
                first: b.first,
                due,
                due_first: got.len() as u32,
            });
        }
        if b.first > b.total || b.count != Batch::share(b.first, b.total) {
            return Err(FdPassError::Malformed(
                "a count other than the batch's share",
            ));
        }
        if fds.len() != b.count as usize {
            return Err(FdPassError::Malformed(
                "a batch with another number of descriptors than it says",
            ));
        }
        got.extend(fds);
        if got.len() == b.total as usize {
            return Ok((first_header.clone(), got));
        }
        due += 1;
    }
}

/// One message into `buf`: its length, flags and the descriptors it
/// brought, ours now whatever the flags say. (With `libc`, not `nix`:
/// `nix` gives no control messages of a message with `MSG_CTRUNC`, and
/// the descriptors the kernel did install must still be closed.)
fn recv_one<const ROOM: usize>(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<(usize, MsgFlags, Vec<OwnedFd>)> {
    let fd_size = std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((ROOM * fd_size) as u32) } as usize;
    // u64s: aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed msghdr is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `iov` and `control`, live for the call,
        // with their true lengths.
        let flags = libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT;
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    wait(sock, PollFlags::POLLIN, deadline)?;
                    continue;
                }
                _ => return Err(e),
            }
        }
        let mut fds = Vec::new();
        // SAFETY: the kernel wrote `msg.msg_controllen` octets of control
        // messages into `control`; the CMSG_* macros walk them within it,
        // and each SCM_RIGHTS descriptor was installed in this process for
        // this message, owned by nothing else.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / fd_size;
                    for i in 0..len {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let flags = MsgFlags::from_bits_truncate(msg.msg_flags);
        return Ok((n as usize, flags, fds));
    }
}

/// One message on a `SOCK_SEQPACKET` socket, within `timeout`.
pub fn send_message(sock: BorrowedFd<'_>, msg: &[u8], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        match so::send(sock.as_raw_fd(), msg, flags) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait(sock, PollFlags::POLLOUT, deadline)?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One message of at most `max` octets on a `SOCK_SEQPACKET` socket,
/// within `timeout`: `UnexpectedEof` once the peer has closed its end,
/// `InvalidData` for a longer message, `TimedOut` past the timeout.
pub fn recv_message(sock: BorrowedFd<'_>, max: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; max + 1];
    loop {
        match so::recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed its end",
                ))
            }
            Ok(n) if n > max => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a message longer than {max} octets"),
                ))
            }
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait(sock, PollFlags::POLLIN, deadline)?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until `sock` is ready for `what`, at most until `deadline`.
fn wait(sock: BorrowedFd<'_>, what: PollFlags, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(sock, what)];
    match nix::poll::poll(&mut fds, ms) {
        Ok(0) if left.is_zero() || Instant::now() >= deadline => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer did not answer in time",
        )),
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
