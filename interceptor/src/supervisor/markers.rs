//! Markers: bytes the supervisor sends on `M`, its end of the socket pair
//! whose other end is a listener's `L`, so that `L` polls readable while
//! connections wait for the program's accept. How many are on `L` is the
//! listener table's business (`listeners.rs`); this is the I/O.

use nix::sys::socket as so;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Whether the program still holds `L` somewhere: until then `m` (its
/// other end) sees no hang-up. The same for any socket pair's end.
pub(crate) fn peer_alive(m: impl AsFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pfd = [PollFd::new(m.as_fd(), PollFlags::empty())];
    match poll(&mut pfd, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => !pfd[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => true,
    }
}

/// One marker, a byte sent on `M` that makes `L` readable until an accept
/// takes it off ([`take_one`]). `ECONNREFUSED`: the program has closed `L`.
pub(crate) fn put_marker(m: BorrowedFd<'_>) -> Result<(), i32> {
    let flags = so::MsgFlags::MSG_DONTWAIT | so::MsgFlags::MSG_NOSIGNAL;
    loop {
        match so::send(m.as_raw_fd(), b"m", flags) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                return Err(libc::ECONNREFUSED)
            }
            Err(e) => return Err(e as i32),
        }
    }
}

/// Takes one marker off `l` (the program's `L`): `false` once `L` is
/// empty. Only under the listener table's lock, which keeps a queue's
/// count of markers equal to what is on `L`. Only the supervisor's `M`
/// writes to `L` (the pair has no name to connect to); a program that
/// reads `L` itself is caught up with by the table's `repair_markers`.
pub(crate) fn take_one(l: BorrowedFd<'_>) -> Result<bool, i32> {
    let mut byte = [0u8; 1];
    loop {
        match so::recv(l.as_raw_fd(), &mut byte, so::MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(n == 1),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(e as i32),
        }
    }
}

/// Whether markers sent on `m` are still unread by `L` (the program read
/// them itself when none are while some should be).
pub(crate) fn unread(m: BorrowedFd<'_>) -> bool {
    crate::sys::unread_by_peer(m).map_or(true, |n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::objects::pair;

    fn readable(fd: BorrowedFd<'_>) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut pfd, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn l_is_readable_exactly_while_markers_are_on_it_and_m_sees_it_closed() {
        let (l, m) = pair(true).unwrap();
        assert!(!readable(l.as_fd()), "no marker yet");
        put_marker(m.as_fd()).unwrap();
        put_marker(m.as_fd()).unwrap();
        assert!(readable(l.as_fd()));
        assert!(take_one(l.as_fd()).unwrap());
        assert!(readable(l.as_fd()), "one marker left");
        assert!(take_one(l.as_fd()).unwrap());
        assert!(!take_one(l.as_fd()).unwrap(), "both taken");
        assert!(!readable(l.as_fd()));
        assert!(peer_alive(&m));
        drop(l);
        assert!(!peer_alive(&m), "the program closed L");
        assert_eq!(put_marker(m.as_fd()), Err(libc::ECONNREFUSED));
    }
}
