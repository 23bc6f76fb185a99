//! `sendto` with a destination address on a virtual socket.
//!
//! TCP ignores the address of a `sendto` on a connected socket; the
//! AF_UNIX stream socket that is the program's end of a relayed connection
//! refuses it (`EISCONN`). The filter traps `sendto` only when its address
//! argument is not NULL (BPF sees the pointer, not what it points to), so
//! plain `send`/`sendto(…, NULL, 0)` never trap. A trapped one on a virtual
//! socket is sent by the supervisor without the address, on the program's
//! own socket; any other continues natively (the kernel's own answer for
//! UDP, zero-relay TCP sockets and the rest).

use super::call::{defer, Call, Outcome, LIVENESS_CHECK};
use super::state::SupervisorState;
use crate::notify::Reply;
use crate::vsock::State;
use nix::sys::socket::{self as so, MsgFlags};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Octets read from the program and sent per round.
const CHUNK: usize = 64 * 1024;

pub(crate) fn sendto(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let Some((_, vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    call.note.action = "virtual (address ignored)";
    // For the trace only: the address is not used.
    let _ = sh.read_sockaddr(call, call.arg(4), call.arg(5));
    match vs.state {
        State::Connected { .. } | State::Connecting { .. } => {}
        // TCP's answer on a socket that is not connected.
        State::Fresh | State::Listening => return Outcome::Reply(Reply::Errno(libc::EPIPE)),
    }
    let Some(sock) = call.dup.take() else {
        return Outcome::Reply(Reply::Errno(libc::EBADF));
    };
    let (buf, len) = (call.arg(1), call.arg(2) as usize);
    let flags = MsgFlags::from_bits_truncate(call.arg(3) as i32);
    let nonblock = sh.nonblocking(call) || flags.contains(MsgFlags::MSG_DONTWAIT);
    let flags = flags | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    match send_some(call, &sock, buf, len, 0, flags) {
        Ok(n) if n == len || nonblock => Outcome::Reply(Reply::Value(n as i64)),
        Ok(n) => wait_and_send(sock, buf, len, n, flags),
        Err(libc::EAGAIN) if !nonblock => wait_and_send(sock, buf, len, 0, flags),
        Err(e) => Outcome::Reply(Reply::Errno(e)),
    }
}

/// Sends the program's octets `[done, len)` from `buf` (one chunk), without
/// waiting; `Ok(done + sent)`.
fn send_some(
    call: &Call,
    sock: &OwnedFd,
    buf: u64,
    len: usize,
    done: usize,
    flags: MsgFlags,
) -> Result<usize, i32> {
    let n = (len - done).min(CHUNK);
    let data = call
        .mem()
        .read(buf + done as u64, n)
        .map_err(|_| libc::EFAULT)?;
    let mut sent = done;
    loop {
        match so::send(sock.as_raw_fd(), &data[sent - done..], flags) {
            Ok(k) => {
                sent += k;
                if sent - done == n || k == 0 {
                    return Ok(sent);
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) if sent > done => return Ok(sent),
            Err(e) if sent > done => {
                tracing::debug!(error = %e, "sendto stopped short");
                return Ok(sent);
            }
            Err(e) => return Err(e as i32),
        }
    }
}

/// A blocking `sendto`: sends the rest as the socket drains, like the
/// kernel's; interrupted, it answers what it sent (or `EINTR`).
fn wait_and_send(sock: OwnedFd, buf: u64, len: usize, done: usize, flags: MsgFlags) -> Outcome {
    defer(move |sh, call| async move {
        let mut done = done;
        let Ok(afd) = crate::sys::async_writable(sock) else {
            return (call, Outcome::Reply(Reply::Errno(libc::EBADF)));
        };
        while done < len {
            if let Some(r) = sh.interrupted(&call) {
                let r = if done > 0 {
                    Reply::Value(done as i64)
                } else {
                    r
                };
                return (call, Outcome::Reply(r));
            }
            let ready = tokio::time::timeout(LIVENESS_CHECK, afd.writable()).await;
            if let Ok(Ok(mut g)) = ready {
                g.clear_ready();
            }
            match send_some(&call, afd.get_ref(), buf, len, done, flags) {
                Ok(n) => done = n,
                Err(libc::EAGAIN) => {}
                Err(e) if done > 0 => {
                    tracing::debug!(errno = e, "sendto stopped short");
                    break;
                }
                Err(e) => return (call, Outcome::Reply(Reply::Errno(e))),
            }
        }
        (call, Outcome::Reply(Reply::Value(done as i64)))
    })
}
