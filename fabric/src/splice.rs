//! Relaying large reads without copying them through user space.
//!
//! A relay copies each octet twice: out of the source socket into a Data
//! frame, and out of the frame into the fabric socket. For a bulk stream
//! from a TCP client, a channel over a socket transport (`unix:`,
//! `tcp://`) can do without both copies: the payload goes from the TCP
//! socket into the channel's pipe with `splice(2)` (the pipe takes
//! references to the socket's pages), and the writer moves it from the
//! pipe into the fabric socket with `splice(2)` again, after the frame's
//! header. The wire format is the same; the peer cannot tell.
//!
//! One pipe serves the whole channel, so the order of the octets in it is
//! the order in which the channel queued spliced payloads: a payload is
//! spliced in and its segment queued under the channel's lock
//! ([`crate::Channel::send_message_spliced`]), and only the writer task
//! takes octets out, segment by segment.
//!
//! The other way, from the fabric socket to a connection's socket, each
//! bulk connection has a pipe of its own ([`ReceivePipe`]): the reader
//! task reads the header of a large Data frame, splices the rest of its
//! payload into the connection's pipe ([`crate::Channel::payload_pending`]),
//! and the connection's relay splices it on into its socket when that has
//! room. A pipe per connection is what keeps a connection whose program
//! reads slowly from holding up the others; the credit bounds what its
//! pipe must hold to the window, and when the pipe is short of room the
//! reader copies the payload instead.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A relay splices only after a read of this much (a bulk stream): for
/// small reads the two `splice` calls and the header's own write cost more
/// than the copies they save, and small frames batch into one write.
pub const SPLICE_MIN: usize = 64 * 1024;

/// The pipe's size asked for (`/proc/sys/fs/pipe-max-size` is 1 MiB by
/// default): four full Data frames.
const PIPE_SIZE: usize = 1024 * 1024;

/// Receive pipes one process holds at most. Each 1 MiB pipe counts
/// against the user's `/proc/sys/fs/pipe-user-pages-soft` (64 MiB by
/// default, beyond which new pipes get two pages); past this many bulk
/// connections, the rest copy.
pub const MAX_RECEIVE_PIPES: usize = 16;

static RECEIVE_PIPES: AtomicUsize = AtomicUsize::new(0);

/// A bulk connection's pipe, for payloads from the fabric on their way to
/// its socket; one of [`MAX_RECEIVE_PIPES`].
#[derive(Debug)]
pub struct ReceivePipe {
    pipe: Pipe,
    _slot: Slot,
}

/// One of the process's [`MAX_RECEIVE_PIPES`], given back on drop.
#[derive(Debug)]
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        RECEIVE_PIPES.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ReceivePipe {
    /// A new receive pipe, unless the process holds its share already or
    /// the pipe would be too small to save anything.
    pub fn new() -> Option<ReceivePipe> {
        RECEIVE_PIPES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_RECEIVE_PIPES).then_some(n + 1)
            })
            .ok()?;
        let slot = Slot;
        let pipe = Pipe::new()
            .inspect_err(|e| tracing::debug!(error = %e, "no receive pipe: the connection copies"))
            .ok()
            .filter(|p| p.capacity >= 4 * SPLICE_MIN)?;
        Some(ReceivePipe { pipe, _slot: slot })
    }
}

impl std::ops::Deref for ReceivePipe {
    type Target = Pipe;
    fn deref(&self) -> &Pipe {
        &self.pipe
    }
}

/// A pipe that spliced payloads pass through (a channel's, or a
/// connection's [`ReceivePipe`]): its two ends and how many octets are
/// in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    held: AtomicUsize,
}

impl Pipe {
    /// A non-blocking pipe of up to [`PIPE_SIZE`] octets.
    pub fn new() -> io::Result<Pipe> {
        Self::with_size(PIPE_SIZE)
    }

    fn with_size(size: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A smaller limit only makes bulk reads fall back to copying sooner.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        // SAFETY: as above.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            capacity: capacity as usize,
            held: AtomicUsize::new(0),
        })
    }

    /// A pipe that moved from another endpoint as its two descriptors,
    /// with `held` octets in it (an upgrade in place: the spliced payloads
    /// the channel's output still counts on). Refused unless the
    /// descriptors are the two ends of one pipe, holding exactly `held`
    /// octets.
    pub fn from_fds(read: OwnedFd, write: OwnedFd, held: usize) -> io::Result<Pipe> {
        let (r, w) = (fifo(&read)?, fifo(&write)?);
        if r != w {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the descriptors are not the ends of one pipe",
            ));
        }
        // SAFETY: fcntl on a descriptor we own.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        let inside = unread(read.as_raw_fd())?;
        if inside != held {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the pipe holds {inside} octets, not the {held} expected"),
            ));
        }
        Ok(Pipe {
            read,
            write,
            capacity: capacity as usize,
            held: AtomicUsize::new(held),
        })
    }

    /// The read end, then the write end.
    pub fn fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.read.as_fd(), self.write.as_fd())
    }

    /// Octets in the pipe.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Octets that still fit (by count; the pipe may run out of page
    /// slots first, which [`Pipe::fill`] reports as `WouldBlock`).
    pub fn room(&self) -> usize {
        self.capacity
            .saturating_sub(self.held.load(Ordering::Acquire))
    }

    /// Moves up to `len` octets from socket `from` into the pipe: `Ok(0)`
    /// at the socket's end of stream, `WouldBlock` when the socket has
    /// nothing or the pipe is full (tell them apart with [`unread`]).
    pub fn fill(&self, from: RawFd, len: usize) -> io::Result<usize> {
        let len = len.min(self.room());
        if len == 0 {
            // splice would return 0, which reads as the end of stream.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = splice(from, self.write.as_raw_fd(), len)?;
        self.held.fetch_add(n, Ordering::AcqRel);
        Ok(n)
    }

    /// [`Pipe::fill`] from `socket` once it has octets: `Some(n)` (0 at
    /// its end of stream), or `None` when the pipe is full or the socket
    /// cannot be spliced (read it instead).
    pub async fn fill_from(
        &self,
        socket: &impl ReadySocket,
        len: usize,
    ) -> io::Result<Option<usize>> {
        let fd = socket.as_raw_fd();
        match std::future::poll_fn(|cx| poll_spliced(cx, socket, || self.fill(fd, len))).await {
            Err(e) if unspliceable(&e) => Ok(None),
            r => r,
        }
    }

    /// Moves up to `len` octets from the pipe into socket `to`
    /// (`WouldBlock`: the socket's send buffer is full).
    pub fn drain(&self, to: RawFd, len: usize) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), to, len)?;
        self.held.fetch_sub(n, Ordering::AcqRel);
        Ok(n)
    }

    /// Moves some of the first `len` octets of the pipe (at least one, if
    /// `len` is not 0) into `to` once it has room: how many. Dropped
    /// before it returns, it moved nothing.
    pub async fn drain_some(&self, to: &impl ReadySocket, len: usize) -> io::Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        loop {
            std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
            match to.try_io(Interest::WRITABLE, || self.drain(to.as_raw_fd(), len)) {
                // The pipe holds every octet queued, so 0 cannot mean empty.
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the first `len` octets out of the pipe (which holds them):
    /// what an upgrade in place carries of a connection's receive pipe,
    /// as plain octets.
    pub fn take_out(&self, len: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let mut got = 0;
        while got < len {
            // SAFETY: read(2) into the unfilled rest of `out`.
            let n = unsafe {
                libc::read(
                    self.read.as_raw_fd(),
                    out[got..].as_mut_ptr().cast(),
                    len - got,
                )
            };
            match n {
                n if n > 0 => {
                    got += n as usize;
                    self.held.fetch_sub(n as usize, Ordering::AcqRel);
                }
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A tokio socket read and written through its readiness: what a relay
/// shares with the socket's owner, splices from, and what a socket
/// transport splices into.
pub trait ReadySocket: AsFd + AsRawFd + Send + Sync + 'static {
    /// Whether payloads from the fabric are spliced into this kind of
    /// socket ([`ReceivePipe`]). Not into TCP: measured through an
    /// io-server, TCP's transmit of spliced pages cost more than the copy
    /// it saved, in throughput and in CPU per GiB
    /// (bench/notes/2026-12-01-sessions-5-to-8.md, the eighth session).
    const SPLICE_RECEIVED: bool;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize>;
}

macro_rules! ready_socket {
    ($t:ty, $received:expr) => {
        impl ReadySocket for $t {
            const SPLICE_RECEIVED: bool = $received;
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
        }
    };
}
ready_socket!(TcpStream, false);
ready_socket!(UnixStream, true);

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors and no offsets (both ends are a pipe or a
    // socket); the kernel checks the descriptors.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Runs `fill`, a splice out of `socket`, once the socket is readable,
/// until it does not block: `Some` of what it gave, or `None` when it
/// blocked with octets still unread on the socket, which means the pipe
/// is full (the socket's readiness is then left set, for a copying read).
pub fn poll_spliced<T>(
    cx: &mut Context<'_>,
    socket: &impl ReadySocket,
    mut fill: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<Option<T>>> {
    loop {
        if let Err(e) = ready!(socket.poll_read_ready(cx)) {
            return Poll::Ready(Err(e));
        }
        match fill() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r.map(Some)),
        }
        // Either the socket has nothing (clear its readiness and wait) or
        // the pipe is full. Asked inside `try_io`: readiness that news
        // newer than this check brought is not cleared.
        match socket.try_io(Interest::READABLE, || match unread(socket.as_raw_fd())? {
            0 => Err(io::ErrorKind::WouldBlock.into()),
            _ => Ok(()),
        }) {
            Ok(()) => return Poll::Ready(Ok(None)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Whether a splice failed because this pair of files cannot be spliced
/// (copy instead), rather than because the socket failed.
pub fn unspliceable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// The identity (device, inode) of the pipe `fd` is an end of; an error
/// if it is not a pipe's.
fn fifo(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the struct it is given on success.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a descriptor of the pipe is not a pipe",
        ));
    }
    Ok((st.st_dev, st.st_ino))
}

/// Octets waiting to be read on socket `fd` (`SIOCINQ`).
pub fn unread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn octets_go_through_the_pipe_in_order_and_are_counted() {
        let pipe = Pipe::new().unwrap();
        let (mut src, src_peer) = UnixStream::pair().unwrap();
        let (dst, mut dst_peer) = UnixStream::pair().unwrap();
        src_peer.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        src.write_all(&data).unwrap();
        let mut moved = 0;
        while moved < data.len() {
            moved += pipe.fill(src_peer.as_raw_fd(), data.len() - moved).unwrap();
        }
        assert_eq!(pipe.room(), pipe.capacity - data.len());
        // Nothing left on the socket: WouldBlock, and nothing unread.
        let e = pipe.fill(src_peer.as_raw_fd(), 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(unread(src_peer.as_raw_fd()).unwrap(), 0);
        let mut got = vec![0; data.len()];
        let mut out = 0;
        let mut read = 0;
        while read < data.len() {
            if out < data.len() {
                match pipe.drain(dst.as_raw_fd(), data.len() - out) {
                    Ok(n) => out += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            read += dst_peer.read(&mut got[read..]).unwrap();
        }
        assert_eq!(got, data);
        assert_eq!(pipe.room(), pipe.capacity);
        drop(src);
        assert_eq!(
            pipe.fill(src_peer.as_raw_fd(), 10).unwrap(),
            0,
            "end of stream"
        );
    }

    #[test]
    fn a_full_pipe_blocks_while_the_socket_still_has_octets() {
        // One page: the smallest pipe there is.
        let pipe = Pipe::with_size(4096).unwrap();
        let (mut src, src_peer) = UnixStream::pair().unwrap();
        src_peer.set_nonblocking(true).unwrap();
        src.write_all(&[7; 20_000]).unwrap();
        let mut moved = 0;
        let e = loop {
            match pipe.fill(src_peer.as_raw_fd(), 20_000) {
                Ok(n) => moved += n,
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(moved > 0 && moved <= 4096, "{moved}");
        // What tells a full pipe from an empty socket (endpoint::poll_splice).
        assert_eq!(unread(src_peer.as_raw_fd()).unwrap(), 20_000 - moved);
    }
}
