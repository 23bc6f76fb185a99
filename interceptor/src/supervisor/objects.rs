//! The kernel objects the supervisor makes for the program: AF_UNIX
//! placeholders, the socket pairs of connections and listeners, a socket
//! held back like one in SYN_SENT, and the option replay onto them. Plain
//! fd helpers: no state of the supervisor.

use crate::vsock::Inode;
use nix::sys::socket::{self as so, sockopt, AddressFamily, SockFlag, SockType};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Bytes written through S so that it does not poll writable.
pub(crate) const FILLER: usize = 2048;

/// A new unconnected AF_UNIX stream socket of ours.
pub(crate) fn unix_socket(nonblock: bool) -> Result<OwnedFd, i32> {
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblock {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    so::socket(AddressFamily::Unix, SockType::Stream, flags, None).map_err(|e| e as i32)
}

/// The socketpair (S, P): S for the program, P for the relay.
pub(crate) fn pair(nonblock: bool) -> Result<(OwnedFd, OwnedFd), i32> {
    // Both ends non-blocking from the start (P always is, for the relay;
    // most programs want S so too): no fcntl or ioctl per connection.
    let (s, p) = so::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| e as i32)?;
    if !nonblock {
        set_nonblocking(&s, false).map_err(|e| e as i32)?;
    }
    Ok((s, p))
}

/// Makes S look like a socket in SYN_SENT (`connect.rs`): a [`FILLER`]
/// written through it with the smallest send buffer keeps it neither
/// readable nor writable. Returns the `SO_SNDBUF` to restore once the
/// connection is established.
pub(crate) fn hold_back(s: &OwnedFd) -> Result<usize, i32> {
    let sndbuf = so::getsockopt(s, sockopt::SndBuf).map_err(|e| e as i32)?;
    so::setsockopt(s, sockopt::SndBuf, &1).map_err(|e| e as i32)?;
    let n = nix::unistd::write(s, &[0u8; FILLER]).map_err(|e| e as i32)?;
    if n == FILLER {
        // What to restore: the kernel reports twice what is set.
        Ok(sndbuf / 2)
    } else {
        Err(libc::ENOBUFS)
    }
}

/// Sets or clears `O_NONBLOCK` on an object before the program gets it.
pub(crate) fn set_nonblocking(fd: &OwnedFd, on: bool) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let raw = fd.as_raw_fd();
    let mut fl = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fl.set(OFlag::O_NONBLOCK, on);
    fcntl(raw, FcntlArg::F_SETFL(fl)).map(|_| ())
}

/// Sets `options` on a socket (the supervisor's or the program's): one the
/// kernel refuses there is its answer, logged, not an error.
pub(crate) fn set_options<'a>(
    fd: BorrowedFd<'_>,
    options: impl Iterator<Item = (i32, i32, &'a [u8])>,
) {
    for (level, name, value) in options {
        if let Err(e) = crate::sys::setsockopt_raw(fd, level, name, value) {
            tracing::debug!(level, name, error = %e, "an option not taken");
        }
    }
}

/// The inode of a socket of ours (its key in the virtual-socket table).
pub(crate) fn inode_of(fd: impl AsFd) -> Result<Inode, i32> {
    nix::sys::stat::fstat(fd.as_fd().as_raw_fd())
        .map(|st| st.st_ino)
        .map_err(|e| e as i32)
}

/// The address an IPv4 or IPv6 socket of ours is bound to.
pub(crate) fn local_addr(fd: impl AsFd) -> Option<std::net::SocketAddr> {
    let a = so::getsockname::<so::SockaddrStorage>(fd.as_fd().as_raw_fd()).ok()?;
    match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
        (Some(v4), _) => Some(std::net::SocketAddrV4::from(*v4).into()),
        (_, Some(v6)) => Some(std::net::SocketAddrV6::from(*v6).into()),
        _ => None,
    }
}
