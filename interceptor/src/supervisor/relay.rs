//! Relaying a connection: the supervisor's end P of a socket pair whose
//! other end is the program's, to and from the fabric, until the
//! connection ends.

use super::state::SupervisorState;
use saps_fabric::ConnId;
use std::os::fd::OwnedFd;
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
