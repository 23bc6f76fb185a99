//! `connect()` of a virtual socket (Figure 3: Connect, status once
//! established or failed).
//!
//! The supervisor makes a socketpair (S, P), puts S over the program's fd
//! and relays P ⇄ fabric. A non-blocking connect answers `EINPROGRESS` at
//! once; a 2048-byte filler written through S with the smallest `SO_SNDBUF`
//! keeps S neither readable nor writable — like a socket in SYN_SENT —
//! until the io-server reports the TCP connection established, when the
//! filler is drained. On failure P is closed (S sees POLLHUP) and the next
//! `getsockopt(SO_ERROR)` reports the real errno (§2.3).

use super::socket::{make_native, set_nonblocking};
use super::{defer, inode_of, Call, Outcome, Shared};
use crate::notify::Reply;
use crate::vsock::{Inode, State, VirtualSocket};
use nix::sys::socket::{self as so, sockopt, AddressFamily, SockFlag, SockType};
use saps_fabric::{ConnId, Request, Response};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// Bytes written through S so that it does not poll writable.
const FILLER: usize = 2048;
pub(crate) fn connect(sh: &Arc<Shared>, call: &mut Call) -> Outcome {
    let Some((ino, mut vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let addr = match sh.read_sockaddr(call, call.arg(1), call.arg(2)) {
        Ok(a) => a,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    match vs.state {
        State::Fresh => {}
        State::Connecting { .. } => return Outcome::Reply(Reply::Errno(libc::EALREADY)),
        State::Connected { .. } => return Outcome::Reply(Reply::Errno(libc::EISCONN)),
        State::Listening => return Outcome::Reply(Reply::Errno(libc::EINVAL)),
    }
    if vs.domain == libc::AF_INET && addr.is_ipv6() {
        return Outcome::Reply(Reply::Errno(libc::EAFNOSUPPORT));
    }
    if sh.stays_local(&addr) && vs.bound.is_none() {
        return Outcome::Reply(make_native(sh, call, ino, &vs));
    }
    let conn = match sh.tag(call, &mut vs, "virtual") {
        Ok(c) => c,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    let nonblock = sh.nonblocking(call);
    let (s, p) = match pair(nonblock) {
        Ok(x) => x,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    if !nonblock {
        return defer(move |sh, call| async move {
            let reply = match sh.request(Request::Connect { conn, addr }).await {
                Response::Status {
                    errno: 0,
                    addr: local,
                } => established(&sh, &call, ino, vs, conn, addr, local, s, p),
                r => {
                    sh.table().insert(ino, vs);
                    Reply::Errno(r.errno())
                }
            };
            (call, Outcome::Reply(reply))
        });
    }
    // Non-blocking: S goes in now, held back by the filler.
    let (sndbuf, s_ino) = match hold_back(&s).and_then(|b| Ok((b, inode_of(&s)?))) {
        Ok(x) => x,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    if let Err(e) = sh.replace_fd(call, s.as_fd()) {
        return Outcome::Reply(Reply::Errno(e));
    }
    vs.state = State::Connecting { peer: addr };
    sh.table().rekey(ino, s_ino, vs.clone());
    let task = sh.clone();
    sh.rt.spawn(async move {
        let resp = task.request(Request::Connect { conn, addr }).await;
        finish_nonblocking(&task, s_ino, vs, conn, addr, resp, (s, sndbuf), p).await;
    });
    Outcome::Reply(Reply::Errno(libc::EINPROGRESS))
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

/// Makes S look like a socket in SYN_SENT (see the module docs); returns
/// the `SO_SNDBUF` to restore once the connection is established.
fn hold_back(s: &OwnedFd) -> Result<usize, i32> {
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

/// Blocking connect succeeded: S goes over the fd and the relay starts.
#[allow(clippy::too_many_arguments)]
fn established(
    sh: &Arc<Shared>,
    call: &Call,
    ino: Inode,
    mut vs: VirtualSocket,
    conn: ConnId,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    s: OwnedFd,
    p: OwnedFd,
) -> Reply {
    let s_ino = match inode_of(&s) {
        Ok(i) => i,
        Err(e) => return Reply::Errno(e),
    };
    if let Err(e) = sh.replace_fd(call, s.as_fd()) {
        sh.ep().close_connection(conn, 0);
        return Reply::Errno(e);
    }
    let local = local.unwrap_or_else(|| crate::vsock::unspecified(vs.domain));
    vs.state = State::Connected { peer, local };
    sh.table().rekey(ino, s_ino, vs);
    spawn_relay(sh, conn, p);
    Reply::Value(0)
}

/// The io-server answered a non-blocking connect.
#[allow(clippy::too_many_arguments)]
async fn finish_nonblocking(
    sh: &Arc<Shared>,
    s_ino: Inode,
    mut vs: VirtualSocket,
    conn: ConnId,
    peer: SocketAddr,
    resp: Response,
    (s, sndbuf): (OwnedFd, usize),
    p: OwnedFd,
) {
    match resp {
        Response::Status { errno: 0, addr } => {
            // Restore S's send buffer, then let it become writable.
            let _ = so::setsockopt(&s, sockopt::SndBuf, &sndbuf);
            drop(s);
            let Ok(mut p) = to_tokio(p) else { return };
            let mut filler = [0u8; FILLER];
            if p.read_exact(&mut filler).await.is_err() {
                sh.ep().close_connection(conn, 0);
                return;
            }
            let local = addr.unwrap_or_else(|| crate::vsock::unspecified(vs.domain));
            vs.state = State::Connected { peer, local };
            if let Some(e) = sh.table().get_mut(s_ino) {
                *e = vs;
            }
            relay(sh, conn, p).await;
        }
        r => {
            vs.state = State::Fresh;
            vs.error = r.errno();
            if let Some(e) = sh.table().get_mut(s_ino) {
                *e = vs;
            }
            // Closing P hangs S up: poll reports the failure.
        }
    }
}

/// `p` is non-blocking already ([`pair`]).
fn to_tokio(p: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(p))
}

/// Relays P ⇄ fabric in a task.
pub(crate) fn spawn_relay(sh: &Arc<Shared>, conn: ConnId, p: OwnedFd) {
    let sh2 = sh.clone();
    sh.rt.spawn(async move {
        match to_tokio(p) {
            Ok(p) => relay(&sh2, conn, p).await,
            Err(e) => {
                tracing::warn!(conn, error = %e, "cannot relay");
                sh2.ep().close_connection(conn, libc::EIO);
            }
        }
    });
}

/// Relays until the connection ends, then forgets the virtual socket: the
/// connection is over, whatever the program still holds.
async fn relay(sh: &Arc<Shared>, conn: ConnId, p: tokio::net::UnixStream) {
    let generation = sh.generation();
    let out = sh.ep().relay_unix(conn, p).await;
    if sh.generation() != generation {
        // The node rejoined meanwhile: this tag may be reused already.
        return;
    }
    tracing::debug!(
        conn,
        bytes_in = out.bytes_in,
        bytes_out = out.bytes_out,
        errno = out.errno,
        "connection ended"
    );
    let mut t = sh.table();
    if out.errno == 0 {
        t.remove_conn(conn);
    } else if let Some(vs) = t.by_conn_mut(conn) {
        // Reported at the next getsockopt(SO_ERROR) (§2.3).
        vs.error = out.errno;
    }
}
