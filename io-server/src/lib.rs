//! `saps-io-server`: the SAPS io-server, the gateway daemon that owns the
//! single address (SAPS paper §2, DESIGN.md "The picture").
//!
//! Clients connect to one IP address; the io-server runs TCP on the host's
//! stack (or, with `--stack smoltcp`, on `saps_stack`'s user-space stack
//! on a TAP it owns) and serves any number of application nodes over the
//! fabric, one channel per node. Ports that nodes listen on form listener groups whose
//! [`scheduler`] picks a node per client; stream data is relayed within the
//! Appendix A credits by [`saps_fabric::Endpoint::relay`]. [`control`]
//! serves `io-server status` and `io-server weight`.
//!
//! Files by concern, following one accepted client:
//!
//! * `server.rs` — the life of an io-server ([`IoServer`]: start, the
//!   listener tasks, graceful shutdown);
//! * `node.rs` — one task per node channel: handshake, Figure 3 requests
//!   (bind, listen, connect, options); `handshakes.rs`, the bounds on
//!   fabric connections not authenticated yet;
//! * `groups.rs` — the listener groups, sans-IO: membership, weights,
//!   schedulers, queues; which member gets a client; `traffic.rs`, the
//!   ledger counting each connection for its node, group and member;
//! * `ports.rs` — the groups' real listening sockets (the kernel's, or
//!   the smoltcp stack's listeners);
//! * `dispatch.rs` — accept, then give each client to its member (hand it
//!   over, `handoff.rs`, or relay it, `relay.rs`) or queue it;
//! * `cluster.rs` — weight changes and a node's leaving; `slowstart.rs`,
//!   a joining node's weight ramping up;
//! * `timeouts.rs` — idle, half-closed and connect timeouts, and the
//!   housekeeping tick; `ratelimit.rs`, refusals logged once per reason
//!   and interval;
//! * `unaccepted.rs` — clients given to a node its program has not
//!   accepted yet (issue 17);
//! * `state.rs` — what every task shares, and the tables under its lock;
//! * [`status`] (the `ipvsadm`-like report), `metrics.rs` (`--metrics`:
//!   Prometheus's format from a shared snapshot), [`notify`] (systemd's
//!   readiness protocol), [`cli`], [`config`],
//!   [`allow`] (`--allow-ports`), `sys` (the raw socket calls);
//! * [`upgrade`] — `io-server upgrade`: the state a new process takes
//!   over from the old one.

pub mod allow;
pub mod cli;
mod cluster;
pub mod config;
pub mod control;
mod dispatch;
mod groups;
mod guard;
mod handoff;
mod handshakes;
mod metrics;
mod node;
pub mod notify;
mod ports;
mod ratelimit;
mod relay;
pub mod scheduler;
mod server;
mod slowstart;
mod state;
pub mod status;
mod sys;
pub use sys::presize_fd_table;
mod timeouts;
mod traffic;
mod unaccepted;
pub mod upgrade;

pub use config::{Config, SchedulerKind, Stack};
pub use server::IoServer;
pub use status::Status;

use std::path::PathBuf;

/// Everything that can stop the io-server from starting or a control
/// command from completing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    ConfigParse { path: PathBuf, message: String },
    #[error("no token: pass --token-file PATH (a file holding the secret every node must prove)")]
    NoToken,
    #[error("cannot read the token file {path}: {source}")]
    TokenRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {} is open to other users (mode {mode:04o}); make it private: chmod o-rwx {}", path.display(), path.display())]
    TokenNotPrivate { path: PathBuf, mode: u32 },
    #[error("the token is empty: put the shared secret in the token file")]
    EmptyToken,
    #[error(transparent)]
    FabricUrl(#[from] saps_fabric::transport::UrlError),
    #[error("cannot listen for nodes on {url}: {source}")]
    FabricBind { url: String, source: std::io::Error },
    #[error("--stack smoltcp needs the single address as a specific IPv4 address: pass --address IP (got {0})")]
    StackAddress(std::net::IpAddr),
    #[error("--stack smoltcp needs a TAP device: pass --tap NAME or --tap-fd N")]
    StackNoTap,
    #[error("--tap-fd {fd} is not an open descriptor: {source}")]
    TapFd { fd: i32, source: std::io::Error },
    #[error("cannot start the smoltcp stack: {0}")]
    StackOpen(#[from] saps_stack::Error),
    #[error("cannot create the control socket {path}: {source}")]
    ControlBind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot reach the io-server's control socket {path}: {source} (is the io-server running, and is this its --control path?)")]
    ControlConnect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Command(String),
    #[error("upgrade: {0}")]
    Upgrade(String),
}
