//! saps-stack: TCP for the single address in user space (issue 21).
//! smoltcp runs on a TAP device in a thread of its own ([`Stack`]); each of
//! its TCP connections is handed to the rest of the io-server as one end
//! of an `AF_UNIX` stream socketpair (`bridge.rs`), so the relay and the
//! hand-off, which work on file descriptors, need no change. Listeners
//! keep a pool of listening sockets sized by the backlog (smoltcp has no
//! listen backlog); outbound connects leave from the single address.
//! docs/stack.md describes the design, its bounds and its cost.

mod bridge;
mod config;
mod engine;
mod mailbox;
mod stack;
mod sys;
mod tap;
#[cfg(test)]
mod tests;

pub use config::Config;
pub use stack::{Connecting, Listener, Stack};
pub use tap::TapCounters;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

/// A connection of the stack, as the user holds it: its end of the pair,
/// non-blocking, and the connection's two addresses.
#[derive(Debug)]
pub struct Connection {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// The stack's state for `status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// smoltcp sockets held (bounded by `Config::max_sockets`).
    pub sockets: usize,
    /// Sockets by TCP state (RFC 793 names).
    pub by_state: BTreeMap<String, usize>,
    pub listening_ports: usize,
    /// Established connections waiting for `try_accept`.
    pub accept_queued: usize,
    /// Connections bridged to a pair.
    pub bridges: usize,
    pub pending_connects: usize,
    /// Bytes from the network to the pairs, and back.
    pub bytes_to_pair: u64,
    pub bytes_to_net: u64,
    pub tap: TapCounters,
    /// Connections that ended by a reset (either side) or a timeout.
    pub resets: u64,
    /// Sockets not made because `max_sockets` was reached.
    pub refused_max_sockets: u64,
}

/// What can go wrong setting up or asking the stack.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the TAP device {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("the stack's command queue is full")]
    Busy,
    #[error("the stack's thread did not answer")]
    Stopped,
    #[error("only IPv4 is served: {0}")]
    NotIpv4(SocketAddr),
    #[error(transparent)]
    Os(#[from] std::io::Error),
}

/// An errno as an [`Error`].
fn os(errno: sys::Errno) -> Error {
    Error::Os(std::io::Error::from_raw_os_error(errno))
}
