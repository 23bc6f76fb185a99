//! `connect()` of a virtual socket (Figure 3: Connect, status once
//! established or failed).
//!
//! The supervisor makes a socketpair (S, P), puts S over the program's fd
//! and relays P ⇄ fabric. From the first call on, blocking or not, S is
//! held back like a socket in SYN_SENT: a 2048-byte filler written through
//! S with the smallest `SO_SNDBUF` keeps it neither readable nor writable
//! until the io-server reports the TCP connection established, when the
//! filler is drained. A non-blocking connect answers `EINPROGRESS` at once;
//! a blocking one waits for the io-server in a task. Either way the socket
//! is `Connecting` as in the kernel, so a blocking connect interrupted by a
//! signal leaves the connection going on, and the next `connect` waits for
//! it (blocking), says `EALREADY` (non-blocking), then reports its outcome
//! once: 0 or the error, then `EISCONN`. On failure P is closed (S sees
//! POLLHUP) and the next `getsockopt(SO_ERROR)` reports the real errno
//! (§2.3).

use super::call::{defer, Call, Outcome, LIVENESS_CHECK};
use super::objects::{hold_back, inode_of, pair, set_nonblocking, set_options, FILLER};
use super::relay::{relay, to_tokio};
use super::socket::{make_native, v4_on_v6, v6only_v4mapped};
use super::state::SupervisorState;
use crate::notify::Reply;
use crate::sockaddr::Decoded;
use crate::vsock::{Inode, State, VirtualSocket};
use nix::sys::socket::{self as so, sockopt};
use saps_fabric::{ConnId, Request, Response};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

pub(crate) fn connect(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let Some((ino, mut vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let addr = match sh.read_any_sockaddr(call, call.arg(1), call.arg(2)) {
        Ok(Decoded::Inet(a)) => a,
        Ok(Decoded::Unspec { .. }) => return disconnect(sh, call, ino, vs),
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    let nonblock = sh.nonblocking(call);
    match vs.state {
        State::Fresh | State::Connected { .. } if vs.connect_unreported => {
            return Outcome::Reply(sh.table().get_mut(ino).map_or(Reply::Value(0), report))
        }
        State::Fresh => {}
        State::Connecting { .. } if nonblock => {
            return Outcome::Reply(Reply::Errno(libc::EALREADY))
        }
        State::Connecting { .. } => {
            let timeout = vs.options.timeout(libc::SO_SNDTIMEO);
            return wait_connected(ino, timeout.map(|t| (t, libc::EALREADY)));
        }
        State::Connected { .. } => return Outcome::Reply(Reply::Errno(libc::EISCONN)),
        // Linux: a listening socket is not SS_UNCONNECTED.
        State::Listening => return Outcome::Reply(Reply::Errno(libc::EISCONN)),
    }
    if vs.domain == libc::AF_INET && addr.is_ipv6() {
        return Outcome::Reply(Reply::Errno(libc::EAFNOSUPPORT));
    }
    if vs.domain == libc::AF_INET6 && addr.is_ipv4() {
        return Outcome::Reply(Reply::Errno(v4_on_v6(call.arg(2))));
    }
    if v6only_v4mapped(&vs, &addr) {
        return Outcome::Reply(Reply::Errno(libc::ENETUNREACH));
    }
    if sh.stays_local(&addr) && vs.bound.is_none() {
        return native_connect(sh, call, ino, &vs, addr, nonblock);
    }
    let conn = match sh.tag(call, &mut vs, "virtual") {
        Ok(c) => c,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    let (s, p) = match pair(true) {
        Ok(x) => x,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    // S goes in now, held back by the filler, in the program's mode.
    let (sndbuf, s_ino) = match hold_back(&s).and_then(|b| Ok((b, inode_of(&s)?))) {
        Ok(x) => x,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    if !nonblock {
        if let Err(e) = set_nonblocking(&s, false) {
            return Outcome::Reply(Reply::Errno(e as i32));
        }
    }
    set_options(s.as_fd(), vs.options.on_program_end());
    let timeout = vs.options.timeout(libc::SO_SNDTIMEO);
    let (tx, _) = tokio::sync::watch::channel(false);
    sh.connecting.lock().insert(s_ino, tx);
    // The table knows S before the program holds it.
    vs.state = State::Connecting {
        peer: addr,
        local: None,
    };
    vs.tried_connect = true;
    vs.holder = Some((call.pid(), call.fd()));
    sh.table().rekey(ino, s_ino, vs.clone());
    if let Err(e) = sh.replace_fd(call, s.as_fd()) {
        sh.connecting.lock().remove(&s_ino);
        vs.state = State::Fresh;
        sh.table().rekey(s_ino, ino, vs);
        return Outcome::Reply(Reply::Errno(e));
    }
    let task = sh.clone();
    sh.rt.spawn(async move {
        let resp = task.request(Request::Connect { conn, addr }).await;
        finish(&task, s_ino, conn, addr, resp, (s, sndbuf), p).await;
    });
    if nonblock {
        return Outcome::Reply(Reply::Errno(libc::EINPROGRESS));
    }
    wait_connected(s_ino, timeout.map(|t| (t, libc::EINPROGRESS)))
}

/// `connect(fd, {AF_UNSPEC}, …)`: the kernel's `tcp_disconnect`. A
/// connected socket resets its connection (the peer sees `ECONNRESET`), a
/// connecting one abandons its connect, and either is an unconnected
/// socket again, with its options, that may connect anew ([`unconnect`]).
/// On a socket never connected it does nothing. A listening socket keeps
/// today's refusal (docs/interceptor.md, "Departures" 9).
fn disconnect(
    sh: &Arc<SupervisorState>,
    call: &mut Call,
    ino: Inode,
    vs: VirtualSocket,
) -> Outcome {
    call.note.action = "disconnect";
    match vs.state {
        State::Fresh => Outcome::Reply(Reply::Value(0)),
        State::Connected { .. } | State::Connecting { .. } => {
            Outcome::Reply(match unconnect(sh, call, ino, vs) {
                Ok(()) => Reply::Value(0),
                Err(e) => Reply::Errno(e),
            })
        }
        State::Listening => Outcome::Reply(Reply::Errno(libc::EAFNOSUPPORT)),
    }
}

/// Makes the connected or connecting socket `ino` (the call's fd) an
/// unconnected one again, with its options, as the kernel's
/// `tcp_disconnect` does: a fresh placeholder goes over the program's fd;
/// an established connection is closed with a reset, a connect in flight
/// is abandoned (a blocking `connect` waiting for it is woken, and the
/// io-server's answer, when it comes, finds no socket).
pub(crate) fn unconnect(
    sh: &Arc<SupervisorState>,
    call: &mut Call,
    ino: Inode,
    vs: VirtualSocket,
) -> Result<(), i32> {
    let nonblock = sh.nonblocking(call);
    let made = sh
        .placeholders
        .lock()
        .make(vs.domain, vs.protocol, nonblock);
    let (placeholder, new_ino) = made?;
    let mut fresh = VirtualSocket::with_protocol(vs.domain, vs.protocol);
    fresh.options = vs.options.clone();
    sh.table().insert(new_ino, fresh);
    if let Err(e) = sh.replace_fd(call, placeholder.as_fd()) {
        sh.table().remove(new_ino);
        return Err(e);
    }
    sh.table().remove(ino);
    let connecting = matches!(vs.state, State::Connecting { .. });
    if connecting {
        let tx = sh.connecting.lock().remove(&ino);
        if let Some(tx) = tx {
            tx.send_replace(true);
        }
    }
    if let Some(conn) = vs.conn {
        let errno = if connecting { 0 } else { libc::ECONNRESET };
        sh.ep().close_connection(conn, errno);
    }
    Ok(())
}

/// A blocking connect waits until the connection of `S` (inode `s_ino`) is
/// established or has failed, and reports it; if the caller is interrupted
/// meanwhile, or `SO_SNDTIMEO` passes (answered with the errno given:
/// `EINPROGRESS` for the first connect, `EALREADY` for a later one), the
/// connection goes on (the kernel's `SS_CONNECTING`).
fn wait_connected(s_ino: Inode, timeout: Option<(std::time::Duration, i32)>) -> Outcome {
    defer(move |sh, call| async move {
        let deadline = timeout.map(|(t, _)| tokio::time::Instant::now() + t);
        let connecting = |s: &State| matches!(s, State::Connecting { .. });
        match wait_while(&sh, &call, s_ino, deadline, connecting).await {
            Waited::Late => {
                // Late only with a deadline, which comes with its errno.
                let e = timeout.map_or(libc::EINPROGRESS, |(_, e)| e);
                (call, Outcome::Reply(Reply::Errno(e)))
            }
            Waited::Interrupted(r) => (call, Outcome::Reply(r)),
            Waited::Done => {
                // Gone already: ended (closed by the peer) after connecting.
                let reply = sh.table().get_mut(s_ino).map_or(Reply::Value(0), report);
                (call, Outcome::Reply(reply))
            }
        }
    })
}

/// Why [`wait_while`] returned.
enum Waited {
    /// The state no longer waits (or the socket is gone).
    Done,
    /// At the deadline.
    Late,
    /// The caller was interrupted: its answer.
    Interrupted(Reply),
}

/// Waits while the state of the socket `ino` is one `waiting` holds of,
/// woken by its connect's watch ([`SupervisorState::connecting`], which
/// ends when the connect does) and looking again every
/// [`LIVENESS_CHECK`], until `deadline` or the caller's interruption.
async fn wait_while(
    sh: &SupervisorState,
    call: &Call,
    ino: Inode,
    deadline: Option<tokio::time::Instant>,
    waiting: impl Fn(&State) -> bool,
) -> Waited {
    let mut rx = sh.connecting.lock().get(&ino).map(|tx| tx.subscribe());
    loop {
        let now = tokio::time::Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Waited::Late;
        }
        let still = sh.table().get(ino).is_some_and(|v| waiting(&v.state));
        if !still {
            return Waited::Done;
        }
        if let Some(r) = sh.interrupted(call) {
            return Waited::Interrupted(r);
        }
        let nap = deadline.map_or(LIVENESS_CHECK, |d| LIVENESS_CHECK.min(d - now));
        match rx.as_mut() {
            Some(r) => {
                if let Ok(Err(_)) = tokio::time::timeout(nap, r.changed()).await {
                    // The connect finished (its sender is gone).
                    rx = None;
                }
            }
            None => tokio::time::sleep(nap).await,
        }
    }
}

/// How long a `getsockname` of a socket whose connect is in flight waits
/// for the io-server to say the connect's local address
/// ([`local_known`]). The io-server says it as soon as its `connect()`
/// returned, so this is a fabric round trip; a channel that does not
/// carry it is not waited for ([`wait_local`]).
pub(crate) const LOCAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The io-server said where the connect of `conn` leaves from
/// (`EndpointEvent::Connecting`): recorded on its socket while it is still
/// connecting (a late word, after the connect finished or was abandoned,
/// is dropped), and a `getsockname` waiting for it ([`wait_local`]) is
/// woken.
pub(crate) fn local_known(sh: &SupervisorState, conn: ConnId, local: SocketAddr) {
    let ino = {
        let mut table = sh.table();
        let ino = table.inode_of_conn(conn);
        let state = table.by_conn_mut(conn).map(|v| &mut v.state);
        let Some(State::Connecting { local: known, .. }) = state else {
            return;
        };
        *known = Some(local);
        ino
    };
    let Some(ino) = ino else { return };
    let connecting = sh.connecting.lock();
    if let Some(tx) = connecting.get(&ino) {
        // Wakes the watchers without changing the value (still going).
        tx.send_modify(|_| {});
    }
}

/// `getsockname` of the socket `ino`, whose connect is in flight and whose
/// local address the io-server has not said yet: answered once it has (or
/// once the connect finished), within [`LOCAL_WAIT`]; after that, or if
/// the thread is interrupted, with what is known (the bound or unspecified
/// address, as before protocol version 4). `getsockname` never sleeps in
/// the kernel, so no signal ends it with an error.
pub(crate) fn wait_local(ino: Inode) -> Outcome {
    defer(move |sh, mut call| async move {
        let deadline = tokio::time::Instant::now() + LOCAL_WAIT;
        let unsaid = |s: &State| matches!(s, State::Connecting { local: None, .. });
        // However it ends, the answer is what is known then.
        let _ = wait_while(&sh, &call, ino, Some(deadline), unsaid).await;
        let known = sh.table().get(ino).map(VirtualSocket::local_addr);
        // Gone meanwhile (the connect abandoned): what the fd is now.
        let addr = match known {
            Some(a) => a,
            None => match sh.lookup(&mut call) {
                Some((_, vs)) => vs.local_addr(),
                None => return (call, Outcome::Reply(Reply::Continue)),
            },
        };
        call.note.action = "virtual";
        let (ptr, len_ptr) = (call.arg(1), call.arg(2));
        let reply = match sh.write_addr(&mut call, ptr, len_ptr, &addr) {
            Ok(()) => Reply::Value(0),
            Err(e) => Reply::Errno(e),
        };
        (call, Outcome::Reply(reply))
    })
}

/// The outcome of a finished connect, reported once (the kernel's
/// `SS_CONNECTING` ends): 0, or the pending error (`ECONNABORTED` once
/// `SO_ERROR` took it), after which a failed socket is unconnected again.
fn report(v: &mut VirtualSocket) -> Reply {
    v.connect_unreported = false;
    if matches!(v.state, State::Connected { .. }) {
        return Reply::Value(0);
    }
    match std::mem::take(&mut v.error) {
        0 => Reply::Errno(libc::ECONNABORTED),
        e => Reply::Errno(e),
    }
}

/// A connect to a loopback address that stays on the node: the supervisor
/// connects the real socket that replaces the placeholder itself, to the
/// address it read (a blocking connect in a blocking-pool thread).
fn native_connect(
    sh: &Arc<SupervisorState>,
    call: &mut Call,
    ino: Inode,
    vs: &VirtualSocket,
    addr: SocketAddr,
    nonblock: bool,
) -> Outcome {
    let real = match make_native(sh, call, ino, vs) {
        Ok(r) => r,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    let sa = so::SockaddrStorage::from(addr);
    if nonblock {
        return Outcome::Reply(match so::connect(real.as_raw_fd(), &sa) {
            Ok(()) => Reply::Value(0),
            Err(e) => Reply::Errno(e as i32),
        });
    }
    // The kernel's own blocking connect, in a blocking-pool thread, on the
    // socket the program now holds. A signal waits for it (a loopback
    // connect ends within microseconds unless the listener's queue is
    // full): answered ERESTARTSYS, the program's restarted connect would
    // find this one done and get EISCONN, where the kernel would let it
    // wait for the same connection and answer 0.
    let mut done = sh
        .rt
        .spawn_blocking(move || so::connect(real.as_raw_fd(), &sa));
    defer(move |sh, call| async move {
        loop {
            if !sh.notifier.id_valid(call.n.id) {
                return (call, Outcome::Reply(Reply::Errno(libc::EINTR)));
            }
            if let Ok(r) = tokio::time::timeout(LIVENESS_CHECK, &mut done).await {
                let reply = match r {
                    Ok(Ok(())) => Reply::Value(0),
                    Ok(Err(e)) => Reply::Errno(e as i32),
                    Err(_) => Reply::Errno(libc::EIO),
                };
                return (call, Outcome::Reply(reply));
            }
        }
    })
}

/// The io-server answered the connect of `S` (inode `s_ino`): the relay
/// starts, or P is closed so that S hangs up; a blocking connect waiting
/// for it is told.
#[allow(clippy::too_many_arguments)]
async fn finish(
    sh: &Arc<SupervisorState>,
    s_ino: Inode,
    conn: ConnId,
    peer: SocketAddr,
    resp: Response,
    (s, sndbuf): (OwnedFd, usize),
    p: OwnedFd,
) {
    let tell = |sh: &SupervisorState| {
        let tx = sh.connecting.lock().remove(&s_ino);
        if let Some(tx) = tx {
            tx.send_replace(true);
        }
    };
    match resp {
        Response::Status { errno: 0, addr } => {
            // Connected in the table before S can poll writable: a program
            // woken by POLLOUT asks getsockname/getpeername at once.
            let known = {
                let mut table = sh.table();
                let v = table.get_mut(s_ino);
                let known = v.is_some();
                if let Some(v) = v {
                    let local = addr.unwrap_or_else(|| crate::vsock::unspecified(v.domain));
                    v.state = State::Connected { peer, local };
                    v.connect_unreported = true;
                }
                known
            };
            if !known {
                // Abandoned meanwhile (`unconnect`), which closed it.
                tell(sh);
                return;
            }
            // Restore S's send buffer, then let it become writable.
            let _ = so::setsockopt(&s, sockopt::SndBuf, &sndbuf);
            drop(s);
            let Ok(mut p) = to_tokio(p) else {
                tell(sh);
                return;
            };
            let mut filler = [0u8; FILLER];
            if p.read_exact(&mut filler).await.is_err() {
                sh.ep().close_connection(conn, 0);
                fail(sh, s_ino, libc::ECONNRESET);
                tell(sh);
                return;
            }
            tell(sh);
            relay(sh, conn, p).await;
        }
        r => {
            fail(sh, s_ino, r.errno());
            tell(sh);
            // Closing P hangs S up: poll reports the failure.
        }
    }
}

/// The connect of `S` failed with `errno`: the socket is unconnected
/// again, and a new connect gets a new tag.
fn fail(sh: &SupervisorState, s_ino: Inode, errno: i32) {
    let mut t = sh.table();
    if let Some(mut v) = t.remove(s_ino) {
        v.state = State::Fresh;
        v.conn = None;
        v.error = errno;
        v.connect_unreported = true;
        t.insert(s_ino, v);
    }
}
