//! The supervisor's state shared by every call and task of the node:
//! [`SupervisorState`]. Each piece has one owner with its own lock — the
//! listener table, the virtual-socket table, the connects in flight, the
//! restartable calls, the pidfd cache — taken in the one order of
//! `locks.rs`, never one while calling into another module.

use super::config::{Loopback, SupervisorConfig};
use super::listeners::ListenerTable;
use super::locks::{Guard, Rank, Ranked};
use super::pidfds::PidfdCache;
use super::restart::OpTable;
use crate::notify::Notifier;
use crate::vsock::{Inode, VirtualSocket, VsockTable};
use saps_fabric::endpoint::Endpoint;
use saps_fabric::{ConnId, Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// The node's supervisor state (see the module docs).
pub(crate) struct SupervisorState {
    pub notifier: Notifier,
    /// The channel to the io-server; replaced when the node rejoins.
    endpoint: Ranked<Endpoint>,
    /// Bumped at each rejoin: work of an older channel must not touch
    /// the state of the new one.
    generation: AtomicU64,
    pub rt: tokio::runtime::Handle,
    pub config: SupervisorConfig,
    table: Ranked<VsockTable>,
    /// The virtual listeners and the connections waiting for an accept.
    pub listeners: ListenerTable,
    /// Local tags of handed-over connections (apart from the fabric's).
    pub next_handed: AtomicU64,
    pub pidfds: PidfdCache,
    /// Connects in flight, by the inode of their `S`: told when the
    /// io-server answers, for a blocking `connect` waiting on it.
    pub connecting: Ranked<HashMap<Inode, tokio::sync::watch::Sender<bool>>>,
    /// `bind`/`listen` calls waiting for the io-server (`restart.rs`).
    pub ops: OpTable,
    /// The unconnected sockets' placeholders (`placeholders.rs`).
    pub placeholders: Ranked<super::placeholders::Placeholders>,
    /// Descriptors held back for the calls' duplicates (`reserve.rs`).
    pub reserve: super::reserve::Reserve,
    /// The loopback sockets the supervisor made real (`loopback.rs`).
    pub loopback: Ranked<super::loopback::LoopbackBinds>,
}

impl SupervisorState {
    pub(crate) fn new(
        notifier: Notifier,
        endpoint: Endpoint,
        rt: tokio::runtime::Handle,
        config: SupervisorConfig,
    ) -> Self {
        let placeholders = super::placeholders::Placeholders::new(config.maker.clone());
        SupervisorState {
            notifier,
            endpoint: Ranked::new(Rank::Endpoint, endpoint),
            generation: AtomicU64::new(0),
            rt,
            config,
            table: Ranked::default_with(Rank::Table),
            listeners: ListenerTable::new(),
            next_handed: AtomicU64::new(1 << 62),
            pidfds: PidfdCache::new(),
            connecting: Ranked::default_with(Rank::Connecting),
            ops: OpTable::new(),
            placeholders: Ranked::new(Rank::Placeholders, placeholders),
            reserve: super::reserve::Reserve::new(),
            loopback: Ranked::new(Rank::Loopback, super::loopback::LoopbackBinds::new()),
        }
    }

    /// The current channel to the io-server.
    pub(crate) fn ep(&self) -> Endpoint {
        self.endpoint.lock().clone()
    }

    /// The node joined the io-server again over `endpoint`: work of the
    /// old channel is told apart by the generation, bumped here.
    pub(crate) fn set_endpoint(&self, endpoint: Endpoint) {
        *self.endpoint.lock() = endpoint;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn table(&self) -> Guard<'_, VsockTable> {
        self.table.lock()
    }

    /// Sends a Figure 3 request and waits for its answer; a dead channel
    /// answers `ENETDOWN`, no answer within the request timeout
    /// `ETIMEDOUT`.
    pub(crate) async fn request(&self, req: Request) -> Response {
        match self.ep().request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "io-server request failed");
                let errno = match e {
                    saps_fabric::endpoint::EndpointError::TimedOut(_) => libc::ETIMEDOUT,
                    _ => libc::ENETDOWN,
                };
                Response::Status { errno, addr: None }
            }
        }
    }

    /// The connection tag of `vs`, allocating one on first use.
    pub(crate) fn conn_of(&self, vs: &mut VirtualSocket) -> Result<ConnId, i32> {
        if let Some(c) = vs.conn {
            return Ok(c);
        }
        let c = self.ep().make_connection().map_err(|_| libc::ENETDOWN)?;
        vs.conn = Some(c);
        Ok(c)
    }

    /// Whether a loopback address stays on the node.
    pub(crate) fn stays_local(&self, addr: &SocketAddr) -> bool {
        self.config.loopback == Loopback::Local && addr.ip().is_loopback()
    }

    /// Forgets the virtual sockets the program closed while they were still
    /// placeholders (after `socket` or `bind`, bound on `port` if given),
    /// and releases what they held at the io-server, so that a port bound
    /// and closed without `listen` can be bound again, as in the kernel.
    /// `close` is not trapped: the kernel says which are still open
    /// (`watch.rs`). Before a bind (of `port`), and on the listener sweep.
    pub(crate) fn sweep_closed(&self, port: Option<u16>) {
        /// Placeholders looked at per sweep at most.
        const MAX_SWEPT: usize = 4096;
        let candidates = self.table().placeholders(port, MAX_SWEPT);
        if candidates.is_empty() {
            return;
        }
        let all = port.is_none() && candidates.len() < MAX_SWEPT;
        let gone = self.placeholders.lock().closed(&candidates, all);
        for ino in gone {
            let removed = self.table().remove_placeholder(ino);
            if let Some(conn) = removed.and_then(|vs| vs.conn) {
                tracing::debug!(conn, ino, "the program closed an unconnected socket");
                self.ep().close_connection(conn, 0);
            }
        }
    }
}
