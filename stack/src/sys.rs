//! The crate's raw system calls, each behind a small typed wrapper: opening
//! a TAP device (`TUNSETIFF`), the bridge's socketpairs, non-blocking
//! read/write returning an errno, the engine's epoll and the buffers'
//! mappings.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// An errno, as the kernel would give it.
pub type Errno = i32;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn last() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Opens (or creates, in the calling thread's network namespace) the TAP
/// device `name`, non-blocking, frames without the packet-info header.
pub fn open_tap(name: &str) -> Result<OwnedFd, Errno> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(libc::EINVAL);
    }
    // SAFETY: a NUL-terminated literal path; the fd is owned at once.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: `fd` was just opened and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(last());
    }
    Ok(fd)
}

/// Makes `fd` non-blocking (a TAP handed over by a helper may not be).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: F_GETFL/F_SETFL on a valid fd.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(last());
        }
    }
    Ok(())
}

/// An `AF_UNIX` `SOCK_STREAM` pair, both ends non-blocking and
/// close-on-exec; `sndbuf` (if not 0) bounds what each end holds unread.
pub fn stream_pair(sndbuf: usize) -> Result<(OwnedFd, OwnedFd), Errno> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| e as Errno)?;
    if sndbuf > 0 {
        for fd in [&a, &b] {
            nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::SndBuf, &sndbuf)
                .map_err(|e| e as Errno)?;
        }
    }
    Ok((a, b))
}

/// `read(2)`: bytes read (0 at end of file) or the errno.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(last())
    } else {
        Ok(n as usize)
    }
}

/// `send(2)` without SIGPIPE: bytes written or the errno.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(last())
    } else {
        Ok(n as usize)
    }
}

/// `write(2)` of a whole frame to a TAP device.
pub fn write_frame(fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(last())
    } else {
        Ok(n as usize)
    }
}

/// `shutdown(fd, SHUT_WR)`: the other end reads end of file.
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
}

/// An epoll instance (level-triggered), its events carrying a `u64` key.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> Result<Epoll, Errno> {
        // SAFETY: no pointer; the fd is owned at once.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(last());
        }
        // SAFETY: `fd` was just made and is not owned elsewhere.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// `epoll_ctl(op, fd)` for `events`, reported with `key`.
    pub fn ctl(&self, op: i32, fd: BorrowedFd<'_>, events: u32, key: u64) -> Result<(), Errno> {
        let mut ev = libc::epoll_event { events, u64: key };
        // SAFETY: `ev` is a valid epoll_event (ignored by EPOLL_CTL_DEL).
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) };
        if r < 0 {
            return Err(last());
        }
        Ok(())
    }

    /// `epoll_wait` for at most `timeout_ms`: the events ready (EINTR:
    /// none).
    pub fn wait<'a>(
        &self,
        events: &'a mut [libc::epoll_event],
        timeout_ms: i32,
    ) -> Result<&'a [libc::epoll_event], Errno> {
        // SAFETY: `events` is a valid array of `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = last();
            return if e == libc::EINTR { Ok(&[]) } else { Err(e) };
        }
        Ok(&events[..n as usize])
    }
}

/// Anonymous private memory, zero-filled and backed by pages only as they
/// are first touched (a socket's buffer: an idle connection costs the
/// pages its data passed through, not the buffer's size); unmapped when
/// dropped.
pub struct Mapped {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone.
unsafe impl Send for Mapped {}

impl Mapped {
    pub fn new(len: usize) -> Result<Mapped, Errno> {
        // SAFETY: a fresh anonymous mapping, no address requested.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last());
        }
        Ok(Mapped {
            ptr: ptr.cast(),
            len: len.max(1),
        })
    }

    /// The memory as a slice that outlives this borrow.
    ///
    /// # Safety
    /// The caller must stop using the slice before this `Mapped` drops
    /// (the engine drops a socket before its buffers).
    pub unsafe fn slice(&self) -> &'static mut [u8] {
        // SAFETY: `ptr` is a live mapping of `len` bytes (the caller
        // keeps the slice no longer than the mapping, see above).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}
