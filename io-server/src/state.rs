//! What every task of one io-server shares ([`ServerState`]: its config,
//! its shutdown signal and the tables behind its one lock), and those
//! tables ([`Tables`]): the registered nodes with their sockets, the
//! listener groups ([`Groups`], sans-IO) and the groups' real ports
//! ([`Ports`]).

use crate::config::Config;
use crate::groups::{Bind, Groups, Held, Orphan};
use crate::handshakes::Handshakes;
use crate::ports::{Listening, Ports};
use crate::sys::Errno;
use crate::traffic::{MemberId, NodeId};
use crate::unaccepted::Handed;
use saps_fabric::endpoint::{Replay, Waiting};
use saps_fabric::{ConnId, Endpoint};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

/// The state of one io-server, shared by all its tasks (the paper's
/// io-server, as data; [`crate::IoServer`] is its handle).
pub(crate) struct ServerState {
    pub config: Config,
    pub token: Vec<u8>,
    tables: Mutex<Tables>,
    /// Becomes true when a graceful shutdown starts.
    pub shutdown: watch::Sender<bool>,
    /// Signalled whenever a relayed connection ends.
    pub conns_changed: Notify,
    /// Notified whenever a client given to a node stops counting against
    /// an admission bound (accepted by its program, or ended): the
    /// admission task (`dispatch::admission_task`) then lets waiting
    /// clients in.
    pub freed: Arc<Notify>,
    /// Some group may have clients queued or be paused (set under the
    /// tables' lock when one is, cleared there when none is): the
    /// admission task looks at the tables only then.
    pub waiting: std::sync::atomic::AtomicBool,
    pub started: Instant,
    /// Fabric connections in their handshake, and what was refused.
    pub handshakes: Arc<Handshakes>,
    /// The io-server's own TCP endpoints (metrics, `tcp://` fabric
    /// listeners), which nodes may not connect to (`guard::connect`).
    pub own_addrs: Vec<SocketAddr>,
    /// Node requests refused by `guard` (options, connects).
    pub refused: std::sync::atomic::AtomicU64,
    /// Takeovers from an older process (`io-server upgrade`, issue 19),
    /// `saps_upgrades_total`: the new process bumps it and carries it on.
    pub upgrades: std::sync::atomic::AtomicU64,
    /// Connections closed by a timeout (`timeouts.rs`).
    pub timed_out: crate::timeouts::TimedOut,
    /// Refusals and drops logged once per reason and interval.
    pub logs: crate::ratelimit::LogLimit,
    /// The smoltcp stack serving clients (`--stack smoltcp`); `None`:
    /// the kernel's. Never called into under the tables' lock (its
    /// `listen` and `stats` wait for its thread).
    pub stack: Option<saps_stack::Stack>,
    /// While true, no listener accepts (an upgrade's handover): the
    /// listening sockets stay open and their clients wait in the kernel's
    /// queues.
    pub paused: watch::Sender<bool>,
    /// Copies of the listening sockets of [`crate::IoServer`] (fabric,
    /// hand-off, control, metrics), for an upgrade to hand over.
    pub listening: Mutex<Vec<(crate::upgrade::state::ListenerKind, std::os::fd::OwnedFd)>>,
    /// systemd's notification socket, when the daemon has one: an upgrade
    /// says `RELOADING=1` and `MAINPID=` on it.
    pub notifier: std::sync::OnceLock<Arc<crate::notify::Notifier>>,
    /// Set while an upgrade is under way (one at a time).
    pub upgrading: std::sync::atomic::AtomicBool,
    /// Metrics scrapes and control commands being answered: an upgrade's
    /// old process lets them finish before it exits.
    pub answering: Answering,
    /// Nodes' outbound connects in progress, and sockets on their way to
    /// same-host nodes: an upgrade waits for none.
    pub in_flight: Answering,
    /// Woken when an upgrade that held the connects lets them go
    /// ([`ServerState::finishing_connect`]).
    pub connects_released: tokio::sync::Notify,
}

/// A count of answers in progress, and a way to wait for none.
#[derive(Default)]
pub(crate) struct Answering {
    count: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

/// One answer in progress, until dropped.
pub(crate) struct Answer<'a>(&'a Answering);

impl Answering {
    pub fn begin(&self) -> Answer<'_> {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Answer(self)
    }

    /// Waits until no answer is in progress, at most `timeout`; whether
    /// none is.
    pub async fn idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl Answering {
    /// One more in progress, ended by [`Answering::end`].
    pub fn enter(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn end(&self) {
        if self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// One of [`ServerState::in_flight`], until dropped; it may move into a
/// task of its own.
pub(crate) struct InFlight(Arc<ServerState>);

impl InFlight {
    pub fn begin(server: &Arc<ServerState>) -> InFlight {
        server.in_flight.enter();
        InFlight(server.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.end();
    }
}

impl ServerState {
    pub fn new(config: Config, token: Vec<u8>) -> ServerState {
        let tables = Tables {
            nodes: BTreeMap::new(),
            next_node: 0,
            groups: {
                let nofile = crate::sys::nofile_limit().unwrap_or(4096);
                let limits = crate::groups::Limits::new(&config, nofile);
                let mut g = Groups::with_limits(config.scheduler, limits);
                g.set_slow_start(Duration::from_secs(config.slow_start));
                g
            },
            ports: Ports::new(config.stack == crate::config::Stack::Smoltcp),
            connects: Connects::default(),
        };
        let handshakes = Arc::new(Handshakes::new(
            config.max_handshakes as usize,
            config.max_handshakes_per_source as usize,
        ));
        ServerState {
            config,
            token,
            tables: Mutex::new(tables),
            shutdown: watch::Sender::new(false),
            conns_changed: Notify::new(),
            freed: Arc::new(Notify::new()),
            waiting: Default::default(),
            started: Instant::now(),
            handshakes,
            own_addrs: Vec::new(),
            refused: Default::default(),
            upgrades: Default::default(),
            timed_out: Default::default(),
            logs: Default::default(),
            stack: None,
            paused: watch::Sender::new(false),
            listening: Mutex::new(Vec::new()),
            notifier: std::sync::OnceLock::new(),
            upgrading: Default::default(),
            answering: Default::default(),
            in_flight: Default::default(),
            connects_released: tokio::sync::Notify::new(),
        }
    }

    /// Whether a connect whose socket is writable may read its outcome
    /// (`SO_ERROR`, which reading clears) now: `Some` while no upgrade
    /// holds the connects, counted in [`ServerState::in_flight`] until
    /// dropped, so that a quiesce begun meanwhile waits for the outcome to
    /// be answered or kept. `None`: held; the outcome stays in the socket
    /// for whichever process finishes the connect (wait for
    /// [`ServerState::connects_released`], then ask again).
    pub fn finishing_connect(self: &Arc<Self>) -> Option<InFlight> {
        // Counted first: a quiesce sets `held` before it waits for
        // `in_flight`, so one that begins after the look below waits for
        // this connect.
        let answering = InFlight::begin(self);
        let held = self.lock().connects.held;
        (!held).then_some(answering)
    }

    pub fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `accept` until shutdown starts, handing each success to `each`;
    /// accepts nothing while [`ServerState::paused`].
    /// Failures (EMFILE and friends) are logged and retried after a pause
    /// rather than in a busy loop.
    pub async fn accept_until_shutdown<T, F, Fut>(
        &self,
        what: &str,
        mut accept: F,
        mut each: impl FnMut(T),
    ) where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<T>>,
    {
        let mut stop = self.shutdown.subscribe();
        let mut paused = self.paused.subscribe();
        loop {
            if *paused.borrow_and_update() {
                // An upgrade's handover: accept nothing until it is over
                // (this process then exits, or goes on serving).
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = paused.wait_for(|p| !*p) => continue,
                }
            }
            let r = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = paused.changed() => continue,
                r = accept() => r,
            };
            match r {
                Ok(v) => each(v),
                // The listening socket was shut down (its group is gone).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
                Err(e) => {
                    tracing::warn!(what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The io-server's tables, under [`ServerState::lock`]. Its methods keep
/// a group (`Groups`) and its real port (`Ports`) in step.
pub(crate) struct Tables {
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub next_node: NodeId,
    pub groups: Groups<Client>,
    pub ports: Ports,
    /// Nodes' outbound connects in progress (`node.rs`).
    pub connects: Connects,
}

/// Nodes' outbound connects in progress, each with a copy of its socket,
/// so that an upgrade can move them (design note §4.4): the new process
/// waits for the connect to finish and answers the node.
#[derive(Default)]
pub(crate) struct Connects {
    next: u64,
    /// While set (an upgrade's quiesce), a connect that finishes keeps its
    /// outcome here instead of answering: the capture carries it, or
    /// [`Connects::release`] gives it back.
    pub held: bool,
    pending: BTreeMap<u64, PendingConnect>,
}

/// One outbound connect of a node's socket `conn`, asked by request `req`.
pub(crate) struct PendingConnect {
    pub node: NodeId,
    pub req: saps_fabric::ReqId,
    pub conn: ConnId,
    pub to: SocketAddr,
    pub socket: std::os::fd::OwnedFd,
    /// Finished while held: 0 (connected) or the errno.
    pub outcome: Option<Errno>,
}

impl Connects {
    /// Keeps `p` while its connect is in progress: its key.
    pub fn open(&mut self, p: PendingConnect) -> u64 {
        self.next += 1;
        self.pending.insert(self.next, p);
        self.next
    }

    /// The connect `key` finished with `errno` (0: connected): whether
    /// its task answers the node now (else it was held: kept here).
    pub fn finished(&mut self, key: u64, errno: Errno) -> bool {
        if !self.held {
            self.pending.remove(&key);
            return true;
        }
        match self.pending.get_mut(&key) {
            Some(p) => {
                p.outcome = Some(errno);
                false
            }
            None => true,
        }
    }

    /// Every connect in progress or held, by key.
    pub fn iter(&self) -> impl Iterator<Item = &PendingConnect> {
        self.pending.values()
    }

    /// No longer held: the connects that finished meanwhile, for their
    /// answers (the others' tasks answer when they finish).
    pub fn release(&mut self) -> Vec<PendingConnect> {
        self.held = false;
        let done: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.outcome.is_some())
            .map(|(&k, _)| k)
            .collect();
        done.iter().filter_map(|k| self.pending.remove(k)).collect()
    }
}

impl Tables {
    /// Binds `conn` of `node` at `at` (port 0: a free one): into the group
    /// holding that port, or a new group on a new real port. The group's
    /// real address.
    pub fn bind(
        &mut self,
        node: NodeId,
        conn: ConnId,
        at: SocketAddr,
        flags: u32,
    ) -> Result<SocketAddr, Errno> {
        match self.groups.bind(node, conn, at, flags)? {
            Bind::Joined(real) => Ok(real),
            Bind::OpenPort => {
                let real = self.ports.open(at)?;
                self.groups.open(real, node, conn, flags);
                Ok(real)
            }
        }
    }

    /// Makes the bound `conn` a member of group `key`; its port listens
    /// from the first member on. The listening socket then, for the caller
    /// to start its accept task.
    pub fn listen(
        &mut self,
        key: SocketAddr,
        node: NodeId,
        conn: ConnId,
        backlog: u32,
        freed: &Arc<Notify>,
    ) -> Result<Option<Arc<Listening>>, Errno> {
        self.groups.may_listen(key, node, conn)?;
        let listening = self.ports.start_listening(key, backlog)?;
        self.groups.listen(key, node, conn, backlog)?;
        if let Some(entry) = self.nodes.get_mut(&node) {
            let waits = || Waits {
                relayed: Waiting::new(freed.clone()),
                handed: Waiting::new(freed.clone()),
            };
            entry.listeners.entry(conn).or_insert_with(waits);
        }
        Ok(listening)
    }

    /// Drops `node`'s socket `conn` (or all of its sockets with `None`):
    /// ports no group holds any more close now; the orphaned ones, for the
    /// caller to close after the grace (`dispatch::close_orphans_later`).
    #[must_use]
    pub fn unbind(&mut self, node: NodeId, conn: Option<ConnId>) -> Vec<Orphan> {
        let entry = self.nodes.get_mut(&node);
        match (entry, conn) {
            (Some(e), Some(c)) => drop(e.listeners.remove(&c)),
            (Some(e), None) => e.listeners.clear(),
            (None, _) => {}
        }
        let unbound = self.groups.unbind(node, conn);
        for key in unbound.closed {
            self.ports.close(key);
        }
        unbound.orphaned
    }

    /// A node left (its entry is gone): [`Tables::unbind`] of all its
    /// sockets, and its weight and counters go.
    #[must_use]
    pub fn leave(&mut self, node: NodeId) -> Vec<Orphan> {
        let unbound = self.groups.leave(node);
        for key in unbound.closed {
            self.ports.close(key);
        }
        unbound.orphaned
    }

    /// Closes an orphaned port nobody took over: the clients that waited
    /// in its queue, to close. `None`: taken over.
    pub fn close_orphan(&mut self, orphan: Orphan) -> Option<Vec<Client>> {
        let waiting = self.groups.close_orphan(orphan)?;
        self.ports.close(orphan.key);
        Some(waiting)
    }

    /// Records the start of a relayed connection of `node`, for `member`
    /// of group `key` (an accepted client) or outbound (`None`): the TCP
    /// socket is kept for the node's SetOpt/GetOpt, the ledger counts it.
    /// The node's endpoint and the shared socket, to run the relay with;
    /// `None` if the node is gone.
    pub fn relay_started(
        &mut self,
        node: NodeId,
        conn: ConnId,
        member: Option<(SocketAddr, MemberId)>,
        stream: TcpStream,
    ) -> Option<(Endpoint, Arc<TcpStream>)> {
        let entry = self.nodes.get_mut(&node)?;
        let stream = Arc::new(stream);
        entry.sockets.entry(conn).or_default().tcp = Some(stream.clone());
        let ep = entry.ep.clone();
        self.groups.connection_started(node, conn, member);
        Some((ep, stream))
    }

    /// A relayed connection of `node` ended: counted, and its socket
    /// forgotten.
    pub fn relay_finished(&mut self, node: NodeId, conn: ConnId, bytes: (u64, u64)) {
        self.groups.connection_finished(node, conn, bytes);
        if let Some(entry) = self.nodes.get_mut(&node) {
            entry.sockets.remove(&conn);
        }
    }
}

/// Bytes still to deliver on `node`'s relayed connection `conn` (MWLC's
/// `C_i` is their sum over a member's live connections).
pub(crate) fn in_flight(nodes: &BTreeMap<NodeId, NodeEntry>, node: NodeId, conn: ConnId) -> u64 {
    nodes.get(&node).map_or(0, |n| n.conn_in_flight(conn))
}

/// What `member`'s node holds of the clients its group gave it
/// ([`Held`]): read from atomic counts, no lock taken.
pub(crate) fn held(nodes: &BTreeMap<NodeId, NodeEntry>, member: MemberId) -> Held {
    let Some(n) = nodes.get(&member.node) else {
        return Held::default();
    };
    let (relayed, handed) = n
        .listeners
        .get(&member.listener)
        .map_or((0, 0), |w| (w.relayed.get(), w.handed.get()));
    let handed_all: usize = n.listeners.values().map(|w| w.handed.get()).sum();
    Held {
        relayed,
        handed,
        counts_accepts: n.notifies_accepts,
        node_full: !crate::unaccepted::room(n.ep.unaccepted(), handed_all),
    }
}

/// A client accepted on a group's port and not given to a node yet (or
/// given back by one that left).
pub(crate) struct Client {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    /// What it sent to a node that left before accepting it.
    pub replay: Replay,
}

/// One node socket the io-server holds state for.
#[derive(Debug, Default)]
pub struct Socket {
    /// The group it is bound in.
    pub group: Option<SocketAddr>,
    /// The connected TCP socket, shared with its relay, for SetOpt/GetOpt.
    /// Dropped when the relay ends, which is when the socket really closes.
    pub tcp: Option<Arc<TcpStream>>,
    /// Options set before there was a TCP socket; applied on connect.
    /// On the smoltcp stack: every option set, remembered only.
    pub opts: Vec<(i32, i32, bytes::Bytes)>,
    /// Relayed: where the client came from (`None`: an outbound
    /// connection), for an upgrade to run its relay again.
    pub client: Option<crate::relay::Dispatched>,
}

/// A registered node (its weight and traffic are in [`Groups`]).
pub struct NodeEntry {
    pub name: String,
    pub peer: String,
    pub ep: Endpoint,
    pub sockets: HashMap<ConnId, Socket>,
    /// Same-host node: accepted sockets are handed to it, not relayed.
    pub handoff: Option<saps_fabric::handoff::HandoffSender>,
    /// The node's process, when its fabric is a unix socket: only that
    /// process may claim the node's hand-off socket.
    pub pid: Option<i32>,
    /// The node says when its program accepts a connection (protocol
    /// version 2): its connections are kept for re-dispatch until then.
    pub notifies_accepts: bool,
    /// Handed-over connections its program has not accepted yet, with the
    /// io-server's copy of each socket (`unaccepted.rs`); shared with the
    /// node's hand-off task, which outlives the entry.
    pub handed: HandedTable,
    /// Per listening socket: its clients not accepted yet (admission).
    pub listeners: HashMap<ConnId, Waits>,
    /// Asks the node's task to handle every event it has been given and
    /// say so (an upgrade's quiesce, `node.rs`).
    pub barrier: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
    /// A copy of the hand-off socket of a same-host node, for an upgrade
    /// to hand over (the hand-off task holds the socket itself).
    pub handoff_socket: Option<std::os::fd::OwnedFd>,
}

/// One member's counts of clients its program has not accepted yet, by
/// how they were given (`groups::Held`).
#[derive(Debug)]
pub struct Waits {
    pub relayed: Waiting,
    pub handed: Waiting,
}

/// A node's [`Handed`], taken after the tables' lock when both are.
pub type HandedTable = Arc<Mutex<Handed>>;

pub fn lock_handed(h: &HandedTable) -> MutexGuard<'_, Handed> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeEntry {
    /// Bytes still to deliver on one relayed connection, both ways
    /// (client data the node has not consumed, node data not yet written
    /// to the client).
    pub fn conn_in_flight(&self, conn: ConnId) -> u64 {
        conn_in_flight(&self.ep, conn)
    }
}

/// [`NodeEntry::conn_in_flight`] from the node's endpoint alone (for the
/// status report, which asks it once the tables' lock is released).
pub(crate) fn conn_in_flight(ep: &Endpoint, conn: ConnId) -> u64 {
    ep.pending_bytes(conn) + ep.handle().with(|ch| ch.buffered(conn))
}
