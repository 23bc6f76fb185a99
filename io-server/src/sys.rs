//! The io-server's raw socket calls: the one module with `unsafe`.
//!
//! Nodes' `setsockopt`/`getsockopt` carry an arbitrary level, name and value
//! (Figure 3's SetOpt/GetOpt), which no typed wrapper covers; they are passed
//! to the real TCP socket as bytes. Creating, binding and listening use `nix`.

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The errno of a failed call.
pub type Errno = i32;

/// A TCP socket bound to `addr` (not listening yet), with `SO_REUSEADDR`
/// as servers set it, so a port in TIME_WAIT can be bound again.
pub fn bound_socket(addr: SocketAddr) -> Result<std::net::TcpListener, Errno> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::socket(family, SockType::Stream, flags, None).map_err(|e| e as i32)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| e as i32)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| e as i32)?;
    Ok(std::net::TcpListener::from(fd))
}

/// `listen(2)` on a socket from [`bound_socket`].
pub fn listen(sock: &std::net::TcpListener, backlog: u32) -> Result<(), Errno> {
    // The kernel clamps a large backlog to somaxconn; nix refuses values
    // at or above its MAXCONN, so clamp here the same way.
    let backlog =
        Backlog::new(backlog.clamp(1, i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN);
    socket::listen(sock, backlog).map_err(|e| e as i32)
}

/// `setsockopt(fd, level, name, value)` with the value as raw bytes.
pub fn setsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, value: &[u8]) -> Result<(), Errno> {
    let len = libc::socklen_t::try_from(value.len()).map_err(|_| libc::EINVAL)?;
    // SAFETY: `fd` is a live descriptor for the borrow; `value` is a valid
    // buffer of `len` bytes that the kernel only reads.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last_raw())
    }
}

/// `getsockopt(fd, level, name)` into at most `len` bytes (capped at 1 KiB).
pub fn getsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, len: u32) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len.min(1024) as usize];
    let mut n = buf.len() as libc::socklen_t;
    // SAFETY: `fd` is live; `buf` is writable for `n` bytes and the kernel
    // writes at most `n` and stores the length it wrote in `n`.
    let r =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut n) };
    if r != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `accept4(2)` of one client on a non-blocking listener: a non-blocking
/// socket and the client's address. Unlike tokio's `accept` it does not
/// register the socket with the runtime, which a socket handed to a node
/// (zero-relay) never needs.
pub fn accept(l: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: all zeroes is a valid (empty) sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` and `len` are valid for writes and `len` holds the
    // storage's size; the fd returned is new and owned by nobody else.
    let fd = unsafe {
        libc::accept4(
            l.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept4 and is owned here alone.
    let stream = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: the kernel filled `len` octets of `storage`.
    let peer = unsafe {
        <SockaddrStorage as nix::sys::socket::SockaddrLike>::from_raw(
            (&storage as *const libc::sockaddr_storage).cast(),
            Some(len),
        )
    };
    let peer = peer
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                })
        })
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
    Ok((stream, peer))
}

/// Watches a listening socket with the runtime's reactor.
pub fn register_listener(
    l: std::net::TcpListener,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    // SAFETY: the listener moves into the `AsyncFd`, so its fd stays open
    // and names the same socket for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register(l) }.map_err(|e| e.into_parts().1)
}
