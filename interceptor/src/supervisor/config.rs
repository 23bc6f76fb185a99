//! The supervisor's options (`saps-run`'s flags that reach it).

use super::trace::Tracer;
use crate::maker::SocketMaker;
use std::sync::Arc;

/// How loopback addresses are treated (`--loopback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Loopback {
    /// 127.0.0.0/8 and ::1 binds and connects stay on the node (default).
    #[default]
    Local,
    /// They go through the io-server like any other address.
    Cluster,
}

/// Options of a supervisor.
#[derive(Clone, Default)]
pub struct SupervisorConfig {
    pub loopback: Loopback,
    pub tracer: Option<Arc<dyn Tracer>>,
    /// The io-server joined ("embedded" or its URL) and this node's name,
    /// for the trace annotations.
    pub io_server: Arc<str>,
    pub node: Arc<str>,
    /// The program's sockets are the kernel's own: no socket call traps
    /// but `listen`, and that only for the trace (the filter's
    /// [`crate::FilterOptions::native_sockets`]).
    pub native_sockets: bool,
    /// Where TCP placeholders come from (`None`: AF_UNIX ones).
    pub maker: Option<Arc<SocketMaker>>,
}
