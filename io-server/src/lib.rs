//! `saps-io-server`: the SAPS io-server, the gateway daemon that owns the
//! single address (SAPS paper §2, DESIGN.md "The picture").
//!
//! Clients connect to one IP address; the io-server runs TCP on the host's
//! stack and serves any number of application nodes over the fabric, one
//! channel per node (`node.rs`). Ports that nodes listen on form listener
//! groups (`group.rs`) whose [`scheduler`] picks a node per client; stream
//! data is relayed within the Appendix A credits by
//! [`saps_fabric::Endpoint::relay`]. [`control`] serves `io-server status`
//! and `io-server weight`.
//!
//! Files by concern: [`cli`] (the command line), [`config`] (flags and
//! TOML), [`allow`] (`--allow-ports`), `state.rs` (nodes, counters),
//! [`status`] (the `ipvsadm`-like report), `sys` (the raw socket calls).

pub mod allow;
pub mod cli;
pub mod config;
pub mod control;
mod group;
mod node;
pub mod scheduler;
mod state;
pub mod status;
mod sys;
mod unaccepted;

pub use config::{Config, SchedulerKind, Stack};
pub use status::Status;

use saps_fabric::handoff::side;
use saps_fabric::transport::{FabricUrl, StreamListener, TransportRead, TransportWrite};
use state::{NodeId, State};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

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
    #[error("the token is empty: put the shared secret in the token file")]
    EmptyToken,
    #[error(transparent)]
    FabricUrl(#[from] saps_fabric::transport::UrlError),
    #[error("cannot listen for nodes on {url}: {source}")]
    FabricBind { url: String, source: std::io::Error },
    #[error("--stack smoltcp is not built in this version; use --stack kernel (the default)")]
    SmoltcpNotBuilt,
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
}

/// State shared by every task of one io-server.
pub(crate) struct Shared {
    pub config: Config,
    pub token: Vec<u8>,
    state: Mutex<State>,
    /// Becomes true when a graceful shutdown starts.
    pub shutdown: watch::Sender<bool>,
    /// Signalled whenever a relayed connection ends.
    pub conns_changed: Notify,
    pub started: Instant,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a node's weight (0 drains it) and lets queued clients go.
    pub fn set_weight(self: &Arc<Self>, id: NodeId, weight: u32) -> bool {
        let keys: Vec<_> = {
            let mut st = self.lock();
            let Some(node) = st.nodes.get_mut(&id) else {
                return false;
            };
            node.weight = weight;
            tracing::info!(node = id, name = %node.name, weight, "weight changed");
            st.groups.map.keys().copied().collect()
        };
        for key in keys {
            group::drain_queue(self, key);
        }
        true
    }

    /// A node's channel closed: its sockets leave their groups, and the
    /// clients it was given whose program had not accepted them go to the
    /// other members (issue 17; its relayed ones come back through their
    /// relays, `state::start_relay`).
    pub fn remove_node(self: &Arc<Self>, id: NodeId) {
        let (keys, handed) = {
            let mut st = self.lock();
            let handed = st
                .nodes
                .remove(&id)
                .map(|n| state::lock_handed(&n.handed).leave())
                .unwrap_or_default();
            let orphans = st.groups.unbind(id, None);
            group::expire_orphans(self, orphans);
            (st.groups.map.keys().copied().collect::<Vec<_>>(), handed)
        };
        for copy in handed {
            if let Some(socket) = copy.socket {
                redispatch_handed(self, copy.key, socket, copy.peer);
            }
        }
        for key in keys {
            group::drain_queue(self, key);
        }
    }
}

/// A running io-server.
pub struct IoServer {
    shared: Arc<Shared>,
    fabric: Vec<FabricUrl>,
}

impl IoServer {
    /// Binds the `--fabric` listeners, the control socket and the metrics
    /// address, and starts serving on the current tokio runtime.
    pub async fn start(config: Config) -> Result<IoServer, Error> {
        if config.stack == Stack::Smoltcp {
            return Err(Error::SmoltcpNotBuilt);
        }
        let token = config.load_token()?;
        let mut listeners = Vec::new();
        let mut sides = Vec::new();
        for url in &config.fabric {
            let parsed: FabricUrl = url.parse()?;
            let l = StreamListener::bind(&parsed)
                .await
                .map_err(|source| Error::FabricBind {
                    url: url.clone(),
                    source,
                })?;
            listeners.push(l);
            // Same-host nodes on a unix fabric may take accepted sockets
            // themselves (zero-relay) through PATH.handoff.
            // Without it (a path too long for one more suffix, say) those
            // nodes are relayed, as over tcp.
            if let FabricUrl::Unix(path) = &parsed {
                let side = side::path_for(path);
                match side::SideListener::bind(&side) {
                    Ok(l) => sides.push(l),
                    Err(e) => tracing::warn!(
                        path = %side.display(),
                        error = %e,
                        "no hand-off socket: same-host nodes will be relayed"
                    ),
                }
            }
        }
        let control = match &config.control {
            Some(path) => Some(control::bind(path)?),
            None => None,
        };
        let metrics = match config.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::MetricsBind { addr, source })?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            config,
            token,
            state: Mutex::new(State::default()),
            shutdown: watch::Sender::new(false),
            conns_changed: Notify::new(),
            started: Instant::now(),
        });
        let mut fabric = Vec::new();
        for l in listeners {
            if let Ok(url) = l.local_url() {
                tracing::info!(%url, "listening for nodes");
                fabric.push(url);
            }
            tokio::spawn(fabric_loop(shared.clone(), l));
        }
        for l in sides {
            tokio::spawn(handoff_loop(shared.clone(), l));
        }
        if let Some(l) = control {
            tokio::spawn(control::serve(shared.clone(), l));
        }
        if let Some(l) = metrics {
            tokio::spawn(status::serve_metrics(shared.clone(), l));
        }
        Ok(IoServer { shared, fabric })
    }

    /// The fabric addresses nodes connect to (ports resolved).
    pub fn fabric_urls(&self) -> &[FabricUrl] {
        &self.fabric
    }

    /// Serves one node of this process (the embedded mode, over
    /// `memory_pair()`); returns when its channel closes. The channel
    /// speaks protocol version 1: the node and this io-server live and die
    /// together, so there is no other member to give its clients to, and
    /// no `Accepted` per connection is worth its cost.
    pub async fn attach<R: TransportRead, W: TransportWrite>(&self, r: R, w: W) {
        let how = node::Joined::InProcess;
        node::serve(self.shared.clone(), r, w, "embedded".into(), None, how).await
    }

    /// Like [`IoServer::attach`] for a node in this process: accepted
    /// client sockets are handed to it through `handoff` instead of being
    /// relayed (zero-relay). They are scheduled and counted as usual.
    pub async fn attach_local<R: TransportRead, W: TransportWrite>(
        &self,
        r: R,
        w: W,
        handoff: saps_fabric::handoff::HandoffSender,
    ) {
        let how = node::Joined::InProcess;
        let peer = "embedded".to_string();
        node::serve(self.shared.clone(), r, w, peer, Some(handoff), how).await
    }

    /// Serves a node that reached this io-server over a transport of the
    /// caller's rather than a `--fabric` listener, as one that joined over
    /// a listener: clients its program has not accepted when it leaves go
    /// to another member (tests use it over `memory_pair()`).
    pub async fn attach_remote<R: TransportRead, W: TransportWrite>(&self, r: R, w: W, peer: &str) {
        let how = node::Joined::Fabric { pid: None };
        node::serve(self.shared.clone(), r, w, peer.into(), None, how).await
    }

    /// The current `io-server status` report.
    pub fn status(&self) -> Status {
        Status::collect(&self.shared)
    }

    /// Sets the weight of node `name` (0 drains it). False if no such node.
    pub fn set_weight(&self, name: &str, weight: u32) -> bool {
        control::set_weight(&self.shared, name, weight)
    }

    /// Graceful shutdown: stop accepting clients and nodes, let open
    /// connections finish within `deadline`, then close every node channel.
    /// Returns how many connections were still open at the deadline.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        self.shared.shutdown.send_replace(true);
        let (queued, live) = {
            let mut st = self.shared.lock();
            let queued: usize = st
                .groups
                .map
                .values_mut()
                .map(|g| std::mem::take(&mut g.queue).len())
                .sum();
            (queued, st.live_connections())
        };
        tracing::info!(live, queued, "shutting down: no new connections");
        let end = tokio::time::Instant::now() + deadline;
        let cut = loop {
            let changed = self.shared.conns_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let live = self.shared.lock().live_connections();
            if live == 0 {
                break 0;
            }
            if tokio::time::timeout_at(end, changed).await.is_err() {
                break live;
            }
        };
        let nodes: Vec<_> = self
            .shared
            .lock()
            .nodes
            .values()
            .map(|n| n.ep.clone())
            .collect();
        for ep in nodes {
            ep.handle()
                .with(|ch| ch.close("the io-server is shutting down"));
        }
        tracing::info!(cut, "shutdown complete");
        cut
    }
}

/// Accepts nodes on one fabric listener until shutdown.
async fn fabric_loop(shared: Arc<Shared>, listener: StreamListener) {
    accept_until_shutdown(
        &shared,
        "fabric",
        || listener.accept_node(),
        |((r, w), peer, pid)| {
            let how = node::Joined::Fabric { pid };
            tokio::spawn(node::serve(shared.clone(), r, w, peer, None, how));
        },
    )
    .await
}

/// Accepts same-host nodes' hand-off sockets until shutdown.
async fn handoff_loop(shared: Arc<Shared>, listener: side::SideListener) {
    accept_until_shutdown(
        &shared,
        "hand-off",
        || listener.accept(),
        |(sock, pid)| {
            tokio::spawn(claim_handoff(shared.clone(), sock, pid));
        },
    )
    .await
}

/// Gives node `id` its hand-off socket if `pid` is the process whose unix
/// fabric connection got that id; accepted client sockets then go to it
/// instead of being relayed, until either end closes the socket.
async fn claim_handoff(shared: Arc<Shared>, sock: side::SideSocket, pid: i32) {
    let id = match tokio::time::timeout(saps_fabric::driver::HANDSHAKE_TIMEOUT, sock.recv_hello())
        .await
    {
        Ok(Ok(Some(id))) => id,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(pid, error = %e, "hand-off claim refused");
            return;
        }
        Err(_) => {
            tracing::warn!(
                pid,
                timeout = ?saps_fabric::driver::HANDSHAKE_TIMEOUT,
                "hand-off claim refused: no node id in time"
            );
            return;
        }
    };
    let (rx, handed, ep) = {
        let mut st = shared.lock();
        let node = state::NodeId::try_from(id).ok();
        match node.and_then(|id| st.nodes.get_mut(&id)) {
            Some(n) if n.pid == Some(pid) => {
                let (tx, rx) = saps_fabric::handoff::channel();
                n.handoff = Some(tx);
                tracing::info!(node = id, name = %n.name, "same-host node: zero-relay");
                (rx, n.handed.clone(), n.ep.clone())
            }
            _ => {
                tracing::warn!(
                    node = id,
                    pid,
                    "hand-off claim refused: that node did not join from this process over a unix fabric"
                );
                return;
            }
        }
    };
    if let Err(e) = sock.send_ack().await {
        tracing::warn!(node = id, error = %e, "hand-off socket failed; relaying");
        return;
    }
    forward_handoffs(&shared, &handed, &ep, rx, sock).await;
}

/// Sends every socket handed to a node over its hand-off socket until
/// either end closes. The io-server's descriptor of a socket it keeps for
/// re-dispatch (`conn` not 0) is kept once sent, until the node's program
/// accepts it (`unaccepted.rs`); any other is closed once sent, as
/// [`side::forward`] does. One the node can no longer get (it left, or the
/// socket failed) is dispatched again.
async fn forward_handoffs(
    shared: &Arc<Shared>,
    handed: &state::SharedHanded,
    ep: &saps_fabric::Endpoint,
    mut rx: saps_fabric::handoff::HandoffReceiver,
    sock: side::SideSocket,
) {
    use unaccepted::Sent;
    while let Some(h) = rx.recv().await {
        let tracked = h.conn != 0;
        let left = tracked
            .then(|| state::lock_handed(handed).before_send(h.conn))
            .flatten();
        if let Some(copy) = left {
            redispatch_handed(shared, copy.key, h.socket, copy.peer);
            continue;
        }
        if let Err(e) = sock.send(&h).await {
            tracing::warn!(error = %e, "hand-off socket failed; relaying again");
            // Nothing more is handed to this node: what it was given and
            // did not get goes to a member again (relayed, if to it).
            rx.close();
            for h in std::iter::once(h).chain(std::iter::from_fn(|| rx.try_recv())) {
                let copy = state::lock_handed(handed).unsent(h.conn);
                if tracked {
                    ep.forget_handed(h.conn);
                }
                let key = copy.map(|c| c.key);
                match key.or_else(|| group_of(shared, h.node, h.listener)) {
                    Some(key) => redispatch_handed(shared, key, h.socket, h.peer),
                    None => tracing::warn!(peer = %h.peer, "client of a failed hand-off closed"),
                }
            }
            return;
        }
        if !tracked {
            continue; // closed here once sent, as before
        }
        let sent = state::lock_handed(handed).sent(h.conn, h.socket);
        match sent {
            Sent::Kept => {}
            Sent::Close(socket) => drop(socket),
            Sent::Redispatch(copy) => {
                if let Some(socket) = copy.socket {
                    redispatch_handed(shared, copy.key, socket, copy.peer);
                }
            }
        }
    }
}

/// The group whose member is `node`'s `listener`.
fn group_of(
    shared: &Shared,
    node: NodeId,
    listener: saps_fabric::ConnId,
) -> Option<std::net::SocketAddr> {
    let st = shared.lock();
    st.groups
        .map
        .iter()
        .find(|(_, g)| {
            g.members
                .iter()
                .any(|m| m.node == node && m.listener == listener)
        })
        .map(|(&key, _)| key)
}

/// Dispatches a client whose socket was handed to a node again, unless
/// its program read from it or wrote to it ([`sys::untouched`]); nothing of
/// it was read by the io-server, so it may be handed over again.
fn redispatch_handed(
    shared: &Arc<Shared>,
    key: std::net::SocketAddr,
    socket: std::os::fd::OwnedFd,
    peer: std::net::SocketAddr,
) {
    // The node's `Accepted` may have been lost with it: one its program
    // read from or answered stays closed, as any connection of a dead node.
    if !sys::untouched(std::os::fd::AsFd::as_fd(&socket)) {
        tracing::info!(%peer, "client of a node that left was read or answered there: closed");
        return;
    }
    let stream = std::net::TcpStream::from(socket);
    let replay = saps_fabric::endpoint::Replay::default();
    group::redispatch(shared, key, stream, peer, replay);
}

/// Runs `accept` until shutdown starts, handing each success to `each`.
/// Failures (EMFILE and friends) are logged and retried after a pause
/// rather than in a busy loop.
pub(crate) async fn accept_until_shutdown<T, F, Fut>(
    shared: &Shared,
    what: &str,
    mut accept: F,
    mut each: impl FnMut(T),
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let mut stop = shared.shutdown.subscribe();
    loop {
        let r = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
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
