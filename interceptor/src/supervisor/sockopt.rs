//! `setsockopt`/`getsockopt` (Figure 3: SetOpt/GetOpt) and
//! `getsockname`/`getpeername` of virtual sockets.
//!
//! Options are remembered on the virtual socket: `SO_REUSEADDR`,
//! `SO_REUSEPORT` and `IPV6_V6ONLY` shape the Bind on the io-server; on an
//! established connection the options that belong to the TCP socket
//! (`TCP_*`, `SO_KEEPALIVE`, `SO_LINGER`, buffer sizes) are sent to the
//! io-server in the background — the call does not wait for the gateway —
//! and `TCP_INFO` is asked of it. `SO_ERROR` reports the asynchronous error
//! of §2.3 and clears it.

use super::call::{defer, Call, Outcome};
use super::objects::set_options;
use super::state::SupervisorState;
use crate::notify::Reply;
use crate::vsock::{State, VirtualSocket};
use bytes::Bytes;
use saps_fabric::{Request, Response};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Longest option value read from or written to the program.
const MAX_OPT: u32 = 256;

/// Options that belong to the real TCP socket on the io-server. Not
/// `TCP_NODELAY` (the io-server sets it on every client connection) nor
/// `TCP_CORK` (the relay decides how bytes are batched): Apache corks around
/// every response, and a SetOpt per request would cost a fabric message.
fn on_gateway(level: i32, name: i32) -> bool {
    (level == libc::IPPROTO_TCP && !matches!(name, libc::TCP_NODELAY | libc::TCP_CORK))
        || (level == libc::SOL_SOCKET
            && matches!(
                name,
                libc::SO_KEEPALIVE | libc::SO_LINGER | libc::SO_RCVBUF | libc::SO_SNDBUF
            ))
}

/// Options set on a connection on every response by some servers
/// (apache corks around each one): answered without a scratch socket.
fn hot(level: i32, name: i32) -> bool {
    level == libc::IPPROTO_TCP && matches!(name, libc::TCP_NODELAY | libc::TCP_CORK)
}

/// Options whose value read back is not what to set again (the kernel
/// doubles a buffer size): kept as the program set them.
fn kept_as_set(level: i32, name: i32) -> bool {
    level == libc::SOL_SOCKET
        && matches!(
            name,
            libc::SO_RCVBUF | libc::SO_SNDBUF | libc::SO_RCVBUFFORCE | libc::SO_SNDBUFFORCE
        )
}

/// A fresh real socket of `vs`'s family and protocol carrying the options
/// set on `vs` so far: the kernel's own answer for an option (whether it
/// exists at that level, its checks, its default, how it rounds a value)
/// without keeping a real socket per virtual one. Only the connection's
/// state differs: it is never connected nor listening.
fn scratch(vs: &VirtualSocket) -> Result<OwnedFd, i32> {
    let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    let s = crate::sys::socket_raw(vs.domain, ty, vs.protocol)
        .or_else(|_| crate::sys::socket_raw(vs.domain, ty, libc::IPPROTO_TCP))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOBUFS))?;
    set_options(s.as_fd(), vs.options.iter());
    Ok(s)
}

pub(crate) fn setsockopt(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let Some((ino, vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let (level, name, ptr, len) = (
        call.arg(1) as i32,
        call.arg(2) as i32,
        call.arg(3),
        call.arg(4) as u32,
    );
    if len > MAX_OPT {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    let value = match call.mem().read(ptr, len as usize) {
        Ok(v) => v,
        Err(_) => return Outcome::Reply(Reply::Errno(libc::EFAULT)),
    };
    if (level, name) == (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
        && vs.domain == libc::AF_INET6
        && vs.bound.is_some()
    {
        // The kernel refuses to change it once bound.
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    call.detail.value = Some(value.clone());
    call.note.action = "virtual";
    let established = matches!(vs.state, State::Connected { .. } | State::Connecting { .. });
    let stored = if established && hot(level, name) {
        if value.len() < 4 {
            return Outcome::Reply(Reply::Errno(libc::EINVAL));
        }
        let on = value[..4].iter().any(|&b| b != 0);
        i32::from(on).to_ne_bytes().to_vec()
    } else {
        match kernel_set(&vs, level, name, &value) {
            Ok(v) => v,
            Err(e) => return Outcome::Reply(Reply::Errno(e)),
        }
    };
    let mut table = sh.table();
    if let Some(v) = table.get_mut(ino) {
        v.options.set(level, name, &stored);
    }
    drop(table);
    if established {
        // Timeouts and the low-water mark act on the program's own end.
        if let (Some(d), true) = (&call.dup, crate::vsock::on_program_end(level, name)) {
            set_options(d.as_fd(), std::iter::once((level, name, &stored[..])));
        }
    }
    if let (Some(conn), true) = (vs.conn, established && on_gateway(level, name)) {
        let sh2 = sh.clone();
        let value = Bytes::from(value);
        sh.rt.spawn(async move {
            let r = sh2
                .request(Request::SetOpt {
                    conn,
                    level,
                    name,
                    value,
                })
                .await;
            if r.errno() != 0 {
                tracing::debug!(
                    conn,
                    level,
                    name,
                    errno = r.errno(),
                    "io-server refused an option"
                );
            }
        });
    }
    Outcome::Reply(Reply::Value(0))
}

/// Sets the option on a scratch socket: the kernel's error, or the value
/// to remember (as the kernel reads it back, so that `SO_LINGER` with
/// `l_onoff` 0 keeps the old `l_linger` and a timeout is rounded to
/// jiffies, as natively).
fn kernel_set(vs: &VirtualSocket, level: i32, name: i32, value: &[u8]) -> Result<Vec<u8>, i32> {
    let s = scratch(vs)?;
    crate::sys::setsockopt_raw(s.as_fd(), level, name, value)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
    if kept_as_set(level, name) {
        return Ok(value.to_vec());
    }
    Ok(
        crate::sys::getsockopt_raw(s.as_fd(), level, name, value.len().max(4))
            .unwrap_or_else(|_| value.to_vec()),
    )
}

pub(crate) fn getsockopt(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let Some((ino, vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let (level, name, len_ptr) = (call.arg(1) as i32, call.arg(2) as i32, call.arg(4));
    let mem = call.mem();
    let len = match mem.read_u32(len_ptr) {
        Ok(l) => l,
        Err(_) => return Outcome::Reply(Reply::Errno(libc::EFAULT)),
    };
    if (len as i32) < 0 {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    call.note.action = "virtual";
    call.detail.len_in = Some(len);
    if level == libc::IPPROTO_TCP && name == libc::TCP_INFO {
        if let (Some(conn), State::Connected { .. }) = (vs.conn, &vs.state) {
            return defer(move |sh, mut call| async move {
                let req = Request::GetOpt {
                    conn,
                    level,
                    name,
                    len: len.min(MAX_OPT),
                };
                let reply = match sh.request(req).await {
                    Response::OptValue { errno: 0, value } => write_value(&mut call, &value, len),
                    r => Reply::Errno(r.errno()),
                };
                (call, Outcome::Reply(reply))
            });
        }
    }
    let value = match local_value(sh, ino, &vs, level, name, len) {
        Ok(v) => v,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    if (level, name) == (libc::SOL_SOCKET, libc::SO_ERROR) {
        // The error is answered from the table: the program's end's own
        // (a reset passed on, `relay.rs`) is taken too, so it stops
        // polling POLLERR, as the kernel's socket does once read.
        if let Some(d) = &call.dup {
            let _ = nix::sys::socket::getsockopt(d, nix::sys::socket::sockopt::SocketError);
        }
    }
    Outcome::Reply(write_value(call, &value, len))
}

/// `tcpi_state` values (include/net/tcp_states.h).
const TCP_SYN_SENT: u8 = 2;
const TCP_LISTEN: u8 = 10;

/// The value of an option answered by the supervisor itself: what the
/// virtual socket knows (its error, type, family, protocol, whether it
/// listens, the options set on it), the rest as the kernel answers it for
/// a socket with those options.
fn local_value(
    sh: &SupervisorState,
    ino: u64,
    vs: &VirtualSocket,
    level: i32,
    name: i32,
    len: u32,
) -> Result<Vec<u8>, i32> {
    let int = |v: i32| Ok(v.to_ne_bytes().to_vec());
    if level == libc::SOL_SOCKET {
        match name {
            libc::SO_ERROR => {
                let e = sh
                    .table()
                    .get_mut(ino)
                    .map_or(0, |v| std::mem::take(&mut v.error));
                return int(e);
            }
            libc::SO_TYPE => return int(libc::SOCK_STREAM),
            libc::SO_DOMAIN => return int(vs.domain),
            libc::SO_PROTOCOL => return int(vs.protocol),
            libc::SO_ACCEPTCONN => return int((vs.state == State::Listening) as i32),
            _ => {}
        }
    }
    if let (Some(v), false) = (vs.options.get(level, name), kept_as_set(level, name)) {
        return Ok(v.to_vec());
    }
    let s = scratch(vs)?;
    let mut v = crate::sys::getsockopt_raw(s.as_fd(), level, name, len.min(MAX_OPT) as usize)
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
    if (level, name) == (libc::IPPROTO_TCP, libc::TCP_INFO) && !v.is_empty() {
        match vs.state {
            State::Listening => v[0] = TCP_LISTEN,
            State::Connecting { .. } => v[0] = TCP_SYN_SENT,
            _ => {}
        }
    }
    Ok(v)
}

/// Writes `value` (truncated to the caller's `len`) and the length used.
fn write_value(call: &mut Call, value: &[u8], len: u32) -> Reply {
    let n = value.len().min(len as usize);
    let mem = call.mem();
    if mem.write(call.arg(3), &value[..n]).is_err() || mem.write_u32(call.arg(4), n as u32).is_err()
    {
        return Reply::Errno(libc::EFAULT);
    }
    call.detail.value = Some(value[..n].to_vec());
    call.detail.len = Some(n as u32);
    Reply::Value(0)
}

/// `getsockname(fd, addr, len)` / `getpeername(fd, addr, len)`: the virtual
/// addresses — the gateway's address and the client's real one.
pub(crate) fn getname(sh: &Arc<SupervisorState>, call: &mut Call, peer: bool) -> Outcome {
    let Some((ino, vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    // A connect in flight: the io-server says its local address soon after
    // it sent the SYN, where its channel carries it (protocol version 4).
    let unsaid = matches!(vs.state, State::Connecting { local: None, .. });
    if !peer && unsaid && sh.ep().speaks_connecting() {
        return super::connect::wait_local(ino);
    }
    let addr = if peer {
        match vs.peer_addr() {
            Some(a) => a,
            None => {
                call.detail.len_in = call.mem().read_u32(call.arg(2)).ok();
                return Outcome::Reply(Reply::Errno(libc::ENOTCONN));
            }
        }
    } else {
        vs.local_addr()
    };
    call.note.action = "virtual";
    let (ptr, len_ptr) = (call.arg(1), call.arg(2));
    Outcome::Reply(match sh.write_addr(call, ptr, len_ptr, &addr) {
        Ok(()) => Reply::Value(0),
        Err(e) => Reply::Errno(e),
    })
}
