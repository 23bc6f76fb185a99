//! `socket`, `bind`, `listen` and `shutdown` of virtual sockets (Figure 3),
//! and turning a virtual socket back into a real one for loopback traffic.

use super::{defer, inode_of, Call, Outcome, Shared};
use crate::notify::{AddFd, Reply};
use crate::vsock::{Inode, State, VirtualSocket};
use nix::sys::socket::{self as so, AddressFamily, SockFlag, SockType};
use saps_fabric::{Request, Response};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

/// A new unconnected AF_UNIX stream socket of ours.
pub(crate) fn unix_socket(nonblock: bool) -> Result<OwnedFd, i32> {
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblock {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    so::socket(AddressFamily::Unix, SockType::Stream, flags, None).map_err(|e| e as i32)
}

/// `socket(AF_INET|AF_INET6, SOCK_STREAM, 0|IPPROTO_TCP)`: install an
/// AF_UNIX placeholder and remember it as a virtual socket.
pub(crate) fn socket(sh: &Arc<Shared>, call: &mut Call) -> Outcome {
    let domain = call.arg(0) as i32;
    let ty = call.arg(1) as i32;
    let proto = call.arg(2) as i32;
    if proto != 0 && proto != libc::IPPROTO_TCP {
        // MPTCP, SCTP-over-stream …: a real socket.
        call.note.action = "native (protocol)";
        return Outcome::Reply(Reply::Continue);
    }
    let placeholder = match unix_socket(ty & libc::SOCK_NONBLOCK != 0) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    let ino = match inode_of(&placeholder) {
        Ok(i) => i,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    // In the table before the program can see the fd.
    sh.table().insert(ino, VirtualSocket::new(domain));
    call.note.inode = Some(ino);
    call.note.action = "virtual";
    let add = AddFd {
        target_fd: None,
        cloexec: ty & libc::SOCK_CLOEXEC != 0,
        send: true,
    };
    match sh.notifier.add_fd(call.n.id, placeholder.as_fd(), add) {
        Ok(fd) => Outcome::Answered(fd as i64),
        Err(e) => {
            sh.table().remove(ino);
            Outcome::Reply(Reply::Errno(e.raw_os_error().unwrap_or(libc::EBADF)))
        }
    }
}

/// Replaces the virtual socket by a real socket of its family carrying the
/// options set so far, so the call continues natively (loopback stays local).
pub(crate) fn make_native(sh: &Shared, call: &mut Call, ino: Inode, vs: &VirtualSocket) -> Reply {
    let family = if vs.domain == libc::AF_INET6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if sh.nonblocking(call) {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    let real = match so::socket(family, SockType::Stream, flags, None) {
        Ok(fd) => fd,
        Err(e) => return Reply::Errno(e as i32),
    };
    for (level, name, value) in vs.options.iter() {
        if let Err(e) = crate::sys::setsockopt_raw(real.as_fd(), level, name, value) {
            tracing::debug!(level, name, error = %e, "replaying an option on the native socket");
        }
    }
    if let Err(e) = sh.replace_fd(call, real.as_fd()) {
        return Reply::Errno(e);
    }
    sh.table().remove(ino);
    if let Some(conn) = vs.conn {
        sh.ep().close_connection(conn, 0);
    }
    call.note.action = "native (loopback)";
    Reply::Continue
}

/// `bind(fd, addr, len)`: Bind on the io-server, which answers the address
/// bound (port 0 resolved).
pub(crate) fn bind(sh: &Arc<Shared>, call: &mut Call) -> Outcome {
    let Some((ino, mut vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let addr = match sh.read_sockaddr(call, call.arg(1), call.arg(2)) {
        Ok(SocketAddr::V4(a)) if vs.domain == libc::AF_INET => SocketAddr::V4(a),
        Ok(SocketAddr::V6(a)) if vs.domain == libc::AF_INET6 => SocketAddr::V6(a),
        Ok(_) if vs.domain == libc::AF_INET => {
            return Outcome::Reply(Reply::Errno(libc::EAFNOSUPPORT))
        }
        Ok(_) => return Outcome::Reply(Reply::Errno(libc::EINVAL)),
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    if vs.bound.is_some() || vs.state != State::Fresh {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    if sh.stays_local(&addr) {
        return Outcome::Reply(make_native(sh, call, ino, &vs));
    }
    let conn = match sh.tag(call, &mut vs, "virtual") {
        Ok(c) => c,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    // A listener of this port the program closed must not keep it bound.
    sh.reap_listeners(Some(addr.port()));
    let flags = vs.options.bind_flags();
    defer(move |sh, call| async move {
        let resp = sh.request(Request::Bind { conn, addr, flags }).await;
        let reply = match resp {
            Response::Status { errno: 0, addr } => {
                vs.bound = Some(addr.unwrap_or(SocketAddr::from((addr_ip(&vs), 0))));
                sh.table().insert(ino, vs);
                Reply::Value(0)
            }
            r => {
                // Keep the tag: a later bind may succeed.
                sh.table().insert(ino, vs);
                Reply::Errno(r.errno())
            }
        };
        (call, Outcome::Reply(reply))
    })
}

fn addr_ip(vs: &VirtualSocket) -> std::net::IpAddr {
    crate::vsock::unspecified(vs.domain).ip()
}

/// `listen(fd, backlog)`: Listen on the io-server (binding an ephemeral port
/// first, as the kernel would), then swap the placeholder for the AF_UNIX
/// listener `L` the supervisor delivers connections to.
pub(crate) fn listen(sh: &Arc<Shared>, call: &mut Call) -> Outcome {
    let Some((ino, mut vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let backlog = (call.arg(1) as i32).clamp(1, 4096) as u32;
    match vs.state {
        State::Listening => return Outcome::Reply(Reply::Value(0)),
        State::Fresh => {}
        _ => return Outcome::Reply(Reply::Errno(libc::EINVAL)),
    }
    // Not bound yet on this channel: bind first, as the kernel would
    // (port 0), or again after the node rejoined the io-server.
    let needs_bind = vs.conn.is_none() || vs.bound.is_none();
    let conn = match sh.tag(call, &mut vs, "virtual listener") {
        Ok(c) => c,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    call.note.group = vs.bound;
    let nonblock = sh.nonblocking(call);
    defer(move |sh, call| async move {
        if needs_bind {
            let addr = vs
                .bound
                .unwrap_or_else(|| crate::vsock::unspecified(vs.domain));
            let flags = vs.options.bind_flags();
            match sh.request(Request::Bind { conn, addr, flags }).await {
                Response::Status { errno: 0, addr: a } => vs.bound = Some(a.unwrap_or(addr)),
                r => return (call, Outcome::Reply(Reply::Errno(r.errno()))),
            }
        }
        let resp = sh.request(Request::Listen { conn, backlog }).await;
        if resp.errno() != 0 {
            return (call, Outcome::Reply(Reply::Errno(resp.errno())));
        }
        let reply = match install_listener(&sh, &call, conn, backlog, nonblock, &vs) {
            Ok(l_ino) => {
                vs.state = State::Listening;
                sh.table().rekey(ino, l_ino, vs);
                Reply::Value(0)
            }
            Err(e) => {
                sh.ep().close_connection(conn, 0);
                Reply::Errno(e)
            }
        };
        (call, Outcome::Reply(reply))
    })
}

/// Makes `L`, one end of a socket pair whose other end `M` the supervisor
/// keeps for markers, and puts it over the call's fd.
fn install_listener(
    sh: &Arc<Shared>,
    call: &Call,
    conn: saps_fabric::ConnId,
    backlog: u32,
    nonblock: bool,
    vs: &VirtualSocket,
) -> Result<Inode, i32> {
    let (l, marker) = super::connect::pair(nonblock)?;
    let l_ino = inode_of(&l)?;
    sh.replace_fd(call, l.as_fd())?;
    let listener = super::Listener {
        marker: Arc::new(marker),
        addr: vs
            .bound
            .unwrap_or_else(|| crate::vsock::unspecified(vs.domain)),
        flags: vs.options.bind_flags(),
        backlog,
    };
    let addr = listener.addr;
    super::lock(&sh.listeners).insert(conn, listener);
    super::arrival::adopt_orphans(sh, conn, addr);
    Ok(l_ino)
}

/// `shutdown(fd, how)`: on an established connection the kernel object `S`
/// does it natively (its EOF reaches the relay, which sends FIN after the
/// data); elsewhere the kernel's answers.
pub(crate) fn shutdown(sh: &Arc<Shared>, call: &mut Call) -> Outcome {
    let Some((_, vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let how = call.arg(1) as i32;
    if !(libc::SHUT_RD..=libc::SHUT_RDWR).contains(&how) {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    Outcome::Reply(match vs.state {
        State::Connected { .. } | State::Connecting { .. } => Reply::Continue,
        State::Listening => Reply::Value(0),
        State::Fresh => Reply::Errno(libc::ENOTCONN),
    })
}

/// Sets or clears `O_NONBLOCK` on an object before the program gets it.
pub(crate) fn set_nonblocking(fd: &OwnedFd, on: bool) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let raw = fd.as_raw_fd();
    let mut fl = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fl.set(OFlag::O_NONBLOCK, on);
    fcntl(raw, FcntlArg::F_SETFL(fl)).map(|_| ())
}
