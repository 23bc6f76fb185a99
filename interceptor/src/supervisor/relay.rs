//! Relaying a connection: the supervisor's end P of a socket pair whose
//! other end is the program's, to and from the fabric, until the
//! connection ends.

use super::markers;
use super::state::SupervisorState;
use crate::fds;
use crate::vsock::Options;
use nix::sys::socket as so;
use saps_fabric::endpoint::ProgramEnd;
use saps_fabric::ConnId;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

/// `p` is non-blocking already (`objects::pair`).
pub(crate) fn to_tokio(p: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(p))
}

/// Relays P ⇄ fabric in a task; `ended` runs once it is over and P is
/// closed (a descriptor freed: `arrival::descriptors_freed`).
pub(crate) fn spawn_relay(
    sh: &Arc<SupervisorState>,
    conn: ConnId,
    p: OwnedFd,
    ended: fn(&Arc<SupervisorState>),
) {
    let sh2 = sh.clone();
    sh.rt.spawn(async move {
        match to_tokio(p) {
            Ok(p) => relay(&sh2, conn, p).await,
            Err(e) => {
                tracing::warn!(conn, error = %e, "cannot relay");
                sh2.ep().close_connection(conn, libc::EIO);
            }
        }
        ended(&sh2);
    });
}

/// Relays until the connection ends, then forgets the virtual socket: the
/// connection is over, whatever the program still holds.
pub(crate) async fn relay(sh: &SupervisorState, conn: ConnId, p: tokio::net::UnixStream) {
    let generation = sh.generation();
    let side = ProgramSide {
        sh,
        conn,
        relayed: p.as_raw_fd(),
    };
    let out = sh.ep().relay_program(conn, p, &side).await;
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
        vs.ended = true;
    }
}

/// The program's end of a relayed connection, as the relay sees it: resets
/// cross the fabric both ways as the node's kernel would make them (an
/// AF_UNIX pair carries no reset of its own).
struct ProgramSide<'a> {
    sh: &'a SupervisorState,
    conn: ConnId,
    /// The relay's end P (open for as long as the relay runs).
    relayed: RawFd,
}

impl ProgramEnd for ProgramSide<'_> {
    /// The program closed its end (P hangs up: not a `shutdown(SHUT_WR)`)
    /// with `SO_LINGER` 0 set on it: the kernel would send an RST.
    fn closed_abortively(&self) -> bool {
        let linger0 = self
            .sh
            .table()
            .by_conn_mut(self.conn)
            .is_some_and(|vs| zero_linger(&vs.options));
        // SAFETY: the relay holds P open while it asks.
        linger0 && !markers::peer_alive(unsafe { BorrowedFd::borrow_raw(self.relayed) })
    }

    /// An AF_UNIX socket whose peer is closed with bytes unread reports
    /// `ECONNRESET` (then end of file, `EPIPE` on send, `POLLERR`), as a
    /// TCP socket does after an RST: one byte is sent through the
    /// program's end into P, which the relay then closes unread.
    fn reset(&self, relayed: &tokio::net::UnixStream) {
        // Before the program can see it (P is still open): no peer any more.
        let mut t = self.sh.table();
        if let Some(vs) = t.by_conn_mut(self.conn) {
            vs.ended = true;
        }
        drop(t);
        // Closed everywhere already (nothing to tell), or it will see
        // ECONNRESET anyway (P holds bytes it sent).
        let unread = saps_fabric::splice::unread(relayed.as_raw_fd()).unwrap_or(0);
        if !markers::peer_alive(relayed) || unread > 0 {
            return;
        }
        let Some(end) = self.program_end() else {
            tracing::debug!(
                conn = self.conn,
                "a reset reaches the program as end of file: its end is not found"
            );
            return;
        };
        let flags = so::MsgFlags::MSG_DONTWAIT | so::MsgFlags::MSG_NOSIGNAL;
        let _ = so::send(end.as_raw_fd(), b"r", flags);
    }
}

impl ProgramSide<'_> {
    /// A duplicate of the program's end: still queued for its accept, or
    /// where it was given to the program (the fd number it got, else
    /// among that process's descriptors).
    fn program_end(&self) -> Option<OwnedFd> {
        if let Some(s) = self.sh.listeners.queued_socket(self.conn) {
            return Some(s);
        }
        let (ino, (tid, fd)) = {
            let mut t = self.sh.table();
            let ino = t.inode_of_conn(self.conn)?;
            (ino, t.by_conn_mut(self.conn)?.holder?)
        };
        let at = |fd: RawFd| {
            self.sh
                .pidfds
                .with(tid, |p| fds::socket_dup_inode(p, fd))
                .ok()
                .and_then(|(dup, i)| (i == Some(ino)).then_some(dup))
        };
        if let Some(dup) = at(fd) {
            return Some(dup);
        }
        let want = format!("socket:[{ino}]");
        std::fs::read_dir(format!("/proc/{tid}/fd"))
            .ok()?
            .flatten()
            .take(MAX_FDS_SCANNED)
            .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
            .and_then(|e| e.file_name().to_str()?.parse().ok())
            .and_then(at)
    }
}

/// Descriptors of the program looked through for a moved end, at most.
const MAX_FDS_SCANNED: usize = 65_536;

/// `SO_LINGER` set on with a zero timeout.
fn zero_linger(options: &Options) -> bool {
    options
        .get(libc::SOL_SOCKET, libc::SO_LINGER)
        .and_then(|v| v.get(..8))
        .is_some_and(|v| v[..4] != [0; 4] && v[4..8] == [0; 4])
}
