//! The socket maker: TCP sockets made in a network namespace of their own,
//! with no interface up, for the program's unconnected virtual sockets.
//!
//! Until `connect` or `listen`, a virtual socket is a placeholder the
//! supervisor puts in the program's fd table. Its data calls, `poll` and
//! ioctls are not trapped (the data path never goes through seccomp), so
//! they are the placeholder's own answers: a TCP socket answers them as the
//! kernel's TCP does on a socket never connected (`recv` `ENOTCONN`, `send`
//! `EPIPE`, `poll` `POLLOUT|POLLHUP`, `FIONREAD` 0 …). Made in a namespace
//! with no interface, such a socket reaches nothing should a call on it
//! ever run natively (a `connect` gets `ENETUNREACH`, a listener there is
//! reached by no one).
//!
//! A process that runs threads cannot enter a new user namespace, and
//! `setns` into a network namespace needs `CAP_SYS_ADMIN`, so the sockets
//! come from a small process forked for it (`sys::fork_socket_maker`)
//! that made the namespace (in a user namespace of its own when the kernel
//! lets an unprivileged user, else as root) and sends them back over a
//! `SOCK_SEQPACKET` pair in batches. It is not a child of saps-run, and
//! ends when saps-run's end of the pair closes.

use crate::sys;
use nix::sys::socket::{self as so, AddressFamily, SockFlag, SockType};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// How long an answer of the maker may take before the supervisor gives up
/// on it (its sockets are made without any wait: only a maker gone wrong
/// is this slow).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Most sockets one request asks for.
pub const BATCH_MAX: usize = sys::MAKER_MAX;

/// saps-run's end of the maker's socket pair.
#[derive(Debug)]
pub struct SocketMaker {
    sock: OwnedFd,
}

impl SocketMaker {
    /// Forks the maker and waits for its namespace. An error says why
    /// there is none (no user namespaces for this user, no privilege).
    pub fn start() -> io::Result<SocketMaker> {
        let (ours, theirs) = so::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let timeout = so::sockopt::ReceiveTimeout;
        so::setsockopt(
            &ours,
            timeout,
            &nix::sys::time::TimeVal::from(libc::timeval {
                tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
                tv_usec: 0,
            }),
        )?;
        sys::fork_socket_maker(theirs.as_fd())?;
        drop(theirs);
        let mut first = [0u8; 4];
        let n = retry(|| so::recv(ours.as_raw_fd(), &mut first, so::MsgFlags::empty()))?;
        if n != first.len() {
            return Err(io::Error::other("the socket maker ended before it started"));
        }
        match i32::from_ne_bytes(first) {
            0 => Ok(SocketMaker { sock: ours }),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    /// Up to `count` (at most [`BATCH_MAX`]) new unconnected stream
    /// sockets of `domain` and `protocol`, close-on-exec and blocking; an
    /// error if none could be made.
    pub fn make(&self, domain: i32, protocol: i32, count: usize) -> io::Result<Vec<OwnedFd>> {
        let count = count.clamp(1, BATCH_MAX) as i32;
        let mut req = [0u8; 12];
        req[..4].copy_from_slice(&domain.to_ne_bytes());
        req[4..8].copy_from_slice(&protocol.to_ne_bytes());
        req[8..].copy_from_slice(&count.to_ne_bytes());
        let flags = so::MsgFlags::MSG_NOSIGNAL;
        retry(|| so::send(self.sock.as_raw_fd(), &req, flags))?;
        let mut body = [0u8; 4];
        let mut iov = [io::IoSliceMut::new(&mut body)];
        let mut space = nix::cmsg_space!([RawFd; BATCH_MAX]);
        let msg = retry(|| {
            so::recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                so::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map(|m| {
                let fds: Vec<RawFd> = m
                    .cmsgs()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| match c {
                        so::ControlMessageOwned::ScmRights(fds) => Some(fds),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                (m.bytes, m.flags, fds)
            })
        })?;
        let (bytes, msg_flags, raw) = msg;
        // SAFETY: SCM_RIGHTS installed these descriptors in this process
        // just now; nothing else owns them.
        let fds: Vec<OwnedFd> = raw
            .into_iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if bytes == 0 {
            return Err(io::Error::other("the socket maker has ended"));
        }
        // Until the maker's copies are closed, a socket closed here would
        // not be closed everywhere (`supervisor/watch.rs`).
        let mut closed = [0u8; 1];
        if retry(|| so::recv(self.sock.as_raw_fd(), &mut closed, so::MsgFlags::empty()))? != 1 {
            return Err(io::Error::other("the socket maker has ended"));
        }
        if msg_flags.contains(so::MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("the socket maker's answer was cut short"));
        }
        let errno = i32::from_ne_bytes(body);
        if fds.is_empty() {
            return Err(io::Error::from_raw_os_error(if errno == 0 {
                libc::ENOBUFS
            } else {
                errno
            }));
        }
        Ok(fds)
    }
}

/// Held by the tests that fork the maker and by those that watch a socket's
/// last close (`supervisor/watch.rs`): until the maker has closed what it
/// inherited, a fork holds a copy of every descriptor of the test process.
#[cfg(test)]
pub(crate) fn fork_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sockopt, SockaddrLike};

    fn maker() -> Option<SocketMaker> {
        match SocketMaker::start() {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("skipped: no network namespace for the socket maker here ({e})");
                None
            }
        }
    }

    #[test]
    fn sockets_answer_as_tcp_and_reach_nothing() {
        let _forks = fork_lock();
        let Some(m) = maker() else { return };
        let mut socks = m.make(libc::AF_INET, libc::IPPROTO_TCP, 3).unwrap();
        assert_eq!(socks.len(), 3);
        let s = socks.pop().unwrap();
        assert_eq!(
            so::getsockopt(&s, sockopt::SockType).unwrap(),
            SockType::Stream
        );
        let mut buf = [0u8; 4];
        assert_eq!(
            so::recv(s.as_raw_fd(), &mut buf, so::MsgFlags::MSG_DONTWAIT),
            Err(nix::errno::Errno::ENOTCONN)
        );
        assert_eq!(
            so::send(s.as_raw_fd(), b"x", so::MsgFlags::MSG_NOSIGNAL),
            Err(nix::errno::Errno::EPIPE)
        );
        // A native connect from it reaches nothing: no interface is up.
        let to = so::SockaddrIn::new(127, 0, 0, 1, 9);
        assert_eq!(
            so::connect(s.as_raw_fd(), &to),
            Err(nix::errno::Errno::ENETUNREACH)
        );
        let v6 = m.make(libc::AF_INET6, libc::IPPROTO_TCP, 1).unwrap();
        let name = so::getsockname::<so::SockaddrStorage>(v6[0].as_raw_fd()).unwrap();
        assert_eq!(name.family(), Some(AddressFamily::Inet6));
    }
}
