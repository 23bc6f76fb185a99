//! `accept`/`accept4` on a virtual listener.
//!
//! Connections for a listener wait in its ready queue (`listeners.rs`):
//! relayed ones as the program's end of a socket pair, zero-relay ones as
//! the handed-over TCP socket, behind markers on the listener's `L` (a
//! few per burst, never more than wait): bytes the supervisor sends on
//! `M`, the other end of `L`'s socket pair. So `L` polls readable exactly
//! when a connection waits, and epoll/select-driven servers work
//! unchanged. The trapped accept takes the next connection from the
//! queue in one pass over the listener table (its socket, its addresses,
//! the markers it leaves on `L`), writes the client's real address into the caller's buffer and
//! installs the socket with `ADDFD`; an accept that leaves fewer
//! connections than markers reads one off `L` (through a duplicate of the
//! program's fd). A connection whose delivery
//! fails (bad address buffer, interrupted call) goes back to the head of
//! the queue, never lost.

use super::arrival::requeue;
use super::call::{defer, Call, Outcome, LIVENESS_CHECK};
use super::listeners::{Arrival, Kind, Taken};
use super::objects::{inode_of, set_nonblocking, set_options};
use super::state::SupervisorState;
use crate::notify::{AddFd, Reply};
use crate::vsock::{State, VirtualSocket};
use saps_fabric::ConnId;
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// `accept(fd, addr, addrlen)` / `accept4(…, flags)`.
pub(crate) fn accept(sh: &Arc<SupervisorState>, call: &mut Call, flags: i32) -> Outcome {
    let Some((_, vs)) = sh.lookup(call) else {
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
            let t = take(sh, &vs, l.as_fd());
            call.dup = Some(l);
            t
        }
        None => listener_dup(sh, call).and_then(|l| take(sh, &vs, l.as_fd())),
    };
    match taken {
        Ok(Some((lconn, t))) => {
            // `L` is not ours past the answer (see `hand_over`).
            call.dup = None;
            return hand_over(sh, call, &vs, lconn, t, flags);
        }
        Ok(None) => {}
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    }
    if sh.nonblocking(call) {
        return Outcome::Reply(Reply::Errno(libc::EAGAIN));
    }
    defer(move |sh, mut call| async move {
        let outcome = wait_and_take(&sh, &mut call, &vs, flags).await;
        (call, outcome)
    })
}

/// A blocking accept: waits for `L` to become readable, checking now and
/// then that the caller was not interrupted.
async fn wait_and_take(
    sh: &Arc<SupervisorState>,
    call: &mut Call,
    vs: &VirtualSocket,
    flags: i32,
) -> Outcome {
    // SO_RCVTIMEO bounds a blocking accept (EAGAIN), as natively.
    let deadline = vs
        .options
        .timeout(libc::SO_RCVTIMEO)
        .map(|t| tokio::time::Instant::now() + t);
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
        // A waiting connection is taken even with a signal pending, as the
        // kernel's accept does; only then does the signal end the wait.
        match take(sh, vs, l.as_fd()) {
            Ok(Some((lconn, t))) => {
                drop(l);
                return hand_over(sh, call, vs, lconn, t, flags);
            }
            Ok(None) => {}
            Err(e) => return Outcome::Reply(Reply::Errno(e)),
        }
        if let Some(r) = sh.interrupted(call) {
            return Outcome::Reply(r);
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Outcome::Reply(Reply::Errno(libc::EAGAIN));
        }
        let Ok(afd) = crate::sys::async_readable(l) else {
            return Outcome::Reply(Reply::Errno(libc::EBADF));
        };
        // Readable or not, look again.
        let wait = deadline.map_or(LIVENESS_CHECK, |d| {
            LIVENESS_CHECK.min(d.saturating_duration_since(tokio::time::Instant::now()))
        });
        let _ = tokio::time::timeout(wait, afd.readable()).await;
    }
}

/// The program's `L`, duplicated for the time of one call.
fn listener_dup(sh: &SupervisorState, call: &Call) -> Result<OwnedFd, i32> {
    sh.target_fd(call)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF))
}

/// Takes the next connection queued for the listener `vs` (`L` is `l`),
/// with the listener's tag. `None`: nothing waits.
fn take(
    sh: &SupervisorState,
    vs: &VirtualSocket,
    l: BorrowedFd<'_>,
) -> Result<Option<(ConnId, Taken)>, i32> {
    let Some(lconn) = vs.conn else {
        return Ok(None);
    };
    Ok(sh.listeners.take_next(lconn, l)?.map(|t| (lconn, t)))
}

/// Writes the client's address, installs the connection taken off the
/// queue of listener `lconn` in the program and answers the call with its
/// fd; on failure puts the connection back at the head of the queue. The
/// caller holds no duplicate of `L` any more: the install answers the
/// program, which may close `L` at once and bind its port again, and a
/// duplicate still open would hide that close from the bind's reap
/// (`EADDRINUSE`).
fn hand_over(
    sh: &Arc<SupervisorState>,
    call: &mut Call,
    listener: &VirtualSocket,
    lconn: ConnId,
    taken: Taken,
    flags: i32,
) -> Outcome {
    let (peer, local) = match taken.arrival {
        Some(Arrival { peer, local }) => (
            in_family(listener.domain, peer),
            in_family(listener.domain, local),
        ),
        None => {
            let u = crate::vsock::unspecified(listener.domain);
            (u, u)
        }
    };
    let (id, kind) = (taken.id, taken.kind);
    call.note.conn = Some(id);
    call.note.group = listener.bound;
    // Until the program has it, the io-server keeps the connection for
    // another node should this node's channel end (issue 17): once it has
    // ended, the connection is not ours to give (and its socket is
    // closed). After the install the io-server is told the program has it
    // (`ep.accepted`).
    let (ep, handed) = (sh.ep(), kind == Kind::Handed);
    if !ep.may_accept(id, handed) {
        return Outcome::Reply(Reply::Errno(libc::ECONNABORTED));
    }
    let keep = |taken: Taken, errno: i32| {
        requeue(sh, lconn, taken);
        Outcome::Reply(Reply::Errno(errno))
    };
    let (addr_ptr, len_ptr) = (call.arg(1), call.arg(2));
    if addr_ptr != 0 && sh.write_addr(call, addr_ptr, len_ptr, &peer).is_err() {
        return keep(taken, libc::EFAULT);
    }
    let nonblock = flags & libc::SOCK_NONBLOCK != 0;
    let sock = &taken.socket;
    let mut table_entry = None;
    match kind {
        Kind::Handed => {
            // Zero-relay: the program gets the TCP socket itself, a real
            // socket the supervisor need not know again. It carries the
            // options set on the listener, as an accepted socket inherits
            // them natively (an option it refuses is the kernel's call).
            call.note.action = "accept (zero-relay)";
            set_options(sock.as_fd(), listener.options.iter());
        }
        Kind::Relayed => {
            // The program's end of the socket pair, a virtual socket.
            let ino = match inode_of(sock) {
                Ok(i) => i,
                Err(e) => return keep(taken, e),
            };
            // It inherits the listener's options. Its protocol is TCP, even
            // under an MPTCP listener: the client's connection ends at the
            // io-server's TCP socket (docs/interceptor.md, "MPTCP").
            let mut vs = VirtualSocket::accepted(listener.domain, id, peer, local);
            vs.options = listener.options.clone();
            set_options(sock.as_fd(), vs.options.on_program_end());
            sh.table().insert(ino, vs);
            table_entry = Some(ino);
        }
    }
    // Queued sockets are non-blocking (the io-server's, and the pairs
    // `arrival::settle` makes): a blocking accept clears that, and sets it
    // again if the socket goes back to the queue.
    if !nonblock {
        let _ = set_nonblocking(sock, false);
    }
    match install(sh, call, sock.as_fd(), flags) {
        Ok(fd) => {
            if let Some(ino) = table_entry {
                let mut t = sh.table();
                if let Some(v) = t.get_mut(ino) {
                    v.holder = Some((call.pid(), fd));
                }
            }
            ep.accepted(id, handed);
            // Ours is closed: a connection short of descriptors may go.
            drop(taken);
            super::arrival::descriptors_freed(sh);
            Outcome::Answered(fd as i64)
        }
        Err(e) => {
            if let Some(ino) = table_entry {
                sh.table().remove(ino);
            }
            if !nonblock {
                let _ = set_nonblocking(&taken.socket, true);
            }
            keep(taken, e)
        }
    }
}

/// Installs `obj` as the result of the accept call (`ADDFD` with `SEND`).
fn install(
    sh: &SupervisorState,
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
