//! What the supervisor tells a tracer (`saps-run --trace`): one
//! [`CallRecord`] per serviced call, with the arguments read from the
//! target and what SAPS did with the call.

use crate::notify::Reply;
use crate::vsock::Inode;
use saps_fabric::ConnId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What one trapped call came to, for `--trace`.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub pid: i32,
    pub nr: i64,
    pub args: [u64; 6],
    /// Decoded argument details captured while the call was serviced
    /// (addresses, option values), for the tracer.
    pub detail: Detail,
    pub result: Reply,
    pub start: SystemTime,
    pub duration: Duration,
    /// What SAPS did: the virtual socket, the connection, the listener.
    pub note: Note,
}

/// Arguments read from target memory while servicing a call.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    /// The address argument (bind/connect) or result (accept/getsockname).
    pub addr: Option<SocketAddr>,
    /// The option value (setsockopt) or result (getsockopt).
    pub value: Option<Vec<u8>>,
    /// A value-result length as passed in (accept/getsockname/getsockopt) …
    pub len_in: Option<u32>,
    /// … and as written back.
    pub len: Option<u32>,
}

/// The SAPS annotation of a call.
#[derive(Debug, Clone, Default)]
pub struct Note {
    pub inode: Option<Inode>,
    pub conn: Option<ConnId>,
    /// What happened, e.g. "virtual", "native (loopback)".
    pub action: &'static str,
    /// The listener group (the address it listens on), for bind, listen
    /// and accept.
    pub group: Option<SocketAddr>,
    /// Which io-server and as which node.
    pub io_server: Option<Arc<str>>,
    pub node: Option<Arc<str>>,
}

/// Receives one record per serviced call (the `--trace` mode).
pub trait Tracer: Send + Sync {
    fn record(&self, call: &CallRecord);
}
