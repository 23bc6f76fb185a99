//! `accept`/`accept4` on a virtual listener.
//!
//! A connection is pending on the listener's AF_UNIX socket `L` (see
//! `arrival.rs`): relayed, as a stand-in connection bound to an abstract
//! name carrying its SAPS tag, which becomes the program's socket; handed
//! over (zero-relay), in the listener's ready queue, behind one marker
//! connection on `L`. So `L` polls readable exactly when a connection is
//! pending, and epoll/select-driven servers work unchanged. The trapped
//! accept takes the next connection (off `L` through a duplicate of the
//! program's fd, checking with `SO_PEERCRED` that the supervisor made it),
//! writes the client's real address into the caller's buffer, and installs
//! the socket with `ADDFD`. A connection whose delivery fails (bad address
//! buffer, interrupted call) is kept for the next accept, never lost.

use super::arrival::{drop_marker_if_idle, marker_taken, pop_ready, requeue};
use super::socket::set_nonblocking;
use super::{defer, inode_of, lock, Arrival, Call, Outcome, Shared};
use crate::notify::{AddFd, Reply};
use crate::vsock::{Inode, State, VirtualSocket};
use nix::sys::socket::{self as so, sockopt, UnixAddr};
use saps_fabric::ConnId;
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// How often a blocked accept checks that its caller is still waiting.
const LIVENESS_CHECK: Duration = Duration::from_millis(200);

/// What a supervisor connection's abstract name (`…-c-<conn>`,
/// `…-m-<listener>`) says it is.
fn standin_of(sh: &Shared, a: OwnedFd) -> Option<Pending> {
    let addr: UnixAddr = so::getpeername(a.as_raw_fd()).ok()?;
    let name = addr.as_abstract()?;
    let s = std::str::from_utf8(name).ok()?;
    let rest = s.strip_prefix(&sh.prefix)?;
    if let Some(lconn) = rest.strip_prefix("-m-") {
        return Some(Pending::Marker(lconn.parse().ok()?));
    }
    let conn = rest.strip_prefix("-c-")?.parse().ok()?;
    Some(Pending::Standin(a, conn))
}

/// What `L` held.
pub(crate) enum Pending {
    /// A connection's stand-in (for a relayed one, the program's end).
    Standin(OwnedFd, ConnId),
    /// The marker of a listener (its tag; see [`Ready`]).
    Marker(ConnId),
}

/// A connection taken for an accept.
enum Taken {
    /// Its stand-in, off `L`.
    Standin(OwnedFd, ConnId),
    /// A handed-over socket from the ready queue of a listener: (its
    /// tag, the socket's local tag).
    Queued(ConnId, ConnId),
}

/// `accept(fd, addr, addrlen)` / `accept4(…, flags)`.
pub(crate) fn accept(sh: &Arc<Shared>, call: &mut Call, flags: i32) -> Outcome {
    let Some((ino, vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    if vs.state != State::Listening {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    call.note.action = "accept";
    let taken = match call.dup.take() {
        Some(l) => {
            let t = take(sh, call, ino, &vs, l.as_fd());
            call.dup = Some(l);
            t
        }
        None => listener_dup(sh, call).and_then(|l| take(sh, call, ino, &vs, l.as_fd())),
    };
    match taken {
        Ok(Some(t)) => return hand_over(sh, call, ino, &vs, t, flags),
        Ok(None) => {}
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    }
    if sh.nonblocking(call) {
        return Outcome::Reply(Reply::Errno(libc::EAGAIN));
    }
    defer(move |sh, mut call| async move {
        let outcome = wait_and_take(&sh, &mut call, ino, &vs, flags).await;
        (call, outcome)
    })
}

/// A blocking accept: waits for `L` to become readable, checking now and
/// then that the caller was not interrupted.
async fn wait_and_take(
    sh: &Arc<Shared>,
    call: &mut Call,
    ino: Inode,
    vs: &VirtualSocket,
    flags: i32,
) -> Outcome {
    loop {
        if !sh.notifier.id_valid(call.n.id) {
            return Outcome::Reply(Reply::Errno(libc::EINTR));
        }
        // One duplicate of `L` per round, both to take from and to wait on;
        // it is dropped at the end of the round so a close by the program
        // is not hidden for long.
        let l = match listener_dup(sh, call) {
            Ok(l) => l,
            Err(e) => return Outcome::Reply(Reply::Errno(e)),
        };
        match take(sh, call, ino, vs, l.as_fd()) {
            Ok(Some(t)) => return hand_over(sh, call, ino, vs, t, flags),
            Ok(None) => {}
            Err(e) => return Outcome::Reply(Reply::Errno(e)),
        }
        let Ok(afd) = crate::sys::async_readable(l) else {
            return Outcome::Reply(Reply::Errno(libc::EBADF));
        };
        // Readable or not, look again.
        let _ = tokio::time::timeout(LIVENESS_CHECK, afd.readable()).await;
    }
}

/// The program's `L`, duplicated for the time of one call.
fn listener_dup(sh: &Shared, call: &Call) -> Result<OwnedFd, i32> {
    sh.target_fd(call)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF))
}

/// Takes one pending connection for the listener `vs` (inode `ino`, `L`
/// is `l`): one kept from a failed delivery, else the next handed-over
/// socket, else one off `L`. `None`: nothing pending.
fn take(
    sh: &Shared,
    call: &Call,
    ino: Inode,
    vs: &VirtualSocket,
    l: BorrowedFd<'_>,
) -> Result<Option<Taken>, i32> {
    let stashed = lock(&sh.stash).get_mut(&ino).and_then(|q| q.pop_front());
    if let Some((a, conn)) = stashed {
        if let Some(lconn) = vs.conn {
            drop_marker_if_idle(sh, call, lconn, l, ino);
        }
        return Ok(Some(Taken::Standin(a, conn)));
    }
    if let Some(lconn) = vs.conn {
        while let Some(id) = pop_ready(sh, lconn) {
            // A socket closed under it (rejoin) is skipped.
            if lock(&sh.handed).contains_key(&id) {
                drop_marker_if_idle(sh, call, lconn, l, ino);
                return Ok(Some(Taken::Queued(lconn, id)));
            }
        }
        drop_marker_if_idle(sh, call, lconn, l, ino);
    }
    loop {
        match take_one(sh, call, l)? {
            Some(Pending::Standin(a, conn)) => return Ok(Some(Taken::Standin(a, conn))),
            // A marker left over from an emptied queue: a spurious wake-up.
            Some(Pending::Marker(lconn)) => marker_taken(sh, lconn),
            None => return Ok(None),
        }
    }
}

/// Takes one pending connection off `l` (the program's `L`), if any,
/// dropping any the supervisor did not make.
pub(crate) fn take_one(
    sh: &Shared,
    call: &Call,
    l: BorrowedFd<'_>,
) -> Result<Option<Pending>, i32> {
    let _guard = lock(&sh.accept_lock);
    loop {
        let mut pfd = [nix::poll::PollFd::new(l, nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e as i32),
        }
        let a = match crate::sys::accept4(l, libc::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        };
        let ours = so::getsockopt(&a, sockopt::PeerCredentials).is_ok_and(|c| c.pid() == sh.pid);
        match standin_of(sh, a) {
            Some(p) if ours => return Ok(Some(p)),
            _ => tracing::warn!(
                pid = call.pid(),
                "dropping a connection to a virtual listener not made by the supervisor"
            ),
        }
    }
}

/// Writes the client's address, installs the connection in the program
/// and answers the call with its fd; on failure keeps the connection.
fn hand_over(
    sh: &Arc<Shared>,
    call: &mut Call,
    l_ino: Inode,
    listener: &VirtualSocket,
    taken: Taken,
    flags: i32,
) -> Outcome {
    let conn = match &taken {
        Taken::Standin(_, conn) | Taken::Queued(_, conn) => *conn,
    };
    let arrival = lock(&sh.arrivals).get(&conn).copied();
    let (peer, local) = match arrival {
        Some(Arrival { peer, local }) => (
            in_family(listener.domain, peer),
            in_family(listener.domain, local),
        ),
        None => {
            let u = crate::vsock::unspecified(listener.domain);
            (u, u)
        }
    };
    call.note.conn = Some(conn);
    call.note.group = listener.bound;
    let keep = |taken: Taken, errno: i32| {
        match taken {
            Taken::Standin(a, conn) => lock(&sh.stash)
                .entry(l_ino)
                .or_default()
                .push_front((a, conn)),
            Taken::Queued(lconn, id) => requeue(sh, lconn, id),
        }
        Outcome::Reply(Reply::Errno(errno))
    };
    let (addr_ptr, len_ptr) = (call.arg(1), call.arg(2));
    if addr_ptr != 0 && sh.write_addr(call, addr_ptr, len_ptr, &peer).is_err() {
        return keep(taken, libc::EFAULT);
    }
    let a = match taken {
        Taken::Standin(a, _) => a,
        Taken::Queued(lconn, id) => {
            // Zero-relay: the program gets the TCP socket itself, a real
            // socket the supervisor need not know again.
            let Some(tcp) = lock(&sh.handed).remove(&id) else {
                return Outcome::Reply(Reply::Errno(libc::ECONNABORTED));
            };
            // The io-server's sockets are non-blocking already.
            if flags & libc::SOCK_NONBLOCK == 0 {
                let _ = set_nonblocking(&tcp, false);
            }
            call.note.action = "accept (zero-relay)";
            return match install(sh, call, tcp.as_fd(), flags) {
                Ok(fd) => {
                    lock(&sh.arrivals).remove(&id);
                    Outcome::Answered(fd as i64)
                }
                Err(e) => {
                    lock(&sh.handed).insert(id, tcp);
                    keep(Taken::Queued(lconn, id), e)
                }
            };
        }
    };
    let _ = set_nonblocking(&a, flags & libc::SOCK_NONBLOCK != 0);
    let a_ino = match inode_of(&a) {
        Ok(i) => i,
        Err(e) => return keep(Taken::Standin(a, conn), e),
    };
    sh.table().insert(
        a_ino,
        VirtualSocket::accepted(listener.domain, conn, peer, local),
    );
    let installed = install(sh, call, a.as_fd(), flags);
    match installed {
        Ok(fd) => {
            lock(&sh.arrivals).remove(&conn);
            Outcome::Answered(fd as i64)
        }
        Err(e) => {
            sh.table().remove(a_ino);
            keep(Taken::Standin(a, conn), e)
        }
    }
}

/// Installs `obj` as the result of the accept call (`ADDFD` with `SEND`).
fn install(
    sh: &Shared,
    call: &Call,
    obj: std::os::fd::BorrowedFd<'_>,
    flags: i32,
) -> Result<i32, i32> {
    let add = AddFd {
        target_fd: None,
        cloexec: flags & libc::SOCK_CLOEXEC != 0,
        send: true,
    };
    // ENOENT: the call was interrupted (or its process died) meanwhile;
    // the kernel checks that, so no ID_VALID round trip first.
    sh.notifier
        .add_fd(call.n.id, obj, add)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | None => libc::EINTR,
            Some(e) => e,
        })
}

/// An IPv4 client of an AF_INET6 listener is seen as `::ffff:a.b.c.d`.
fn in_family(domain: i32, addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) if domain == libc::AF_INET6 => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        a => a,
    }
}
