//! The io-server's life (after mini-redis's `server.rs`): [`IoServer::start`]
//! binds what it serves on (the `--fabric` listeners and their hand-off
//! sockets, the control socket, the metrics address) and spawns one task
//! per listener: the fabric listeners' ([`fabric_loop`], a task per node
//! then, `node.rs`), the hand-off sockets' (`handoff.rs`), the control
//! socket's (`control.rs`) and the metrics' (`metrics.rs`); client
//! listeners and their accept tasks come with the nodes' `listen`s
//! (`node.rs`, `dispatch.rs`). Every task stops accepting when the
//! shutdown signal is raised ([`IoServer::shutdown`]): open connections
//! get until the deadline, then every node channel is closed.

use crate::config::{Config, Stack};
use crate::state::ServerState;
use crate::status::Status;
use crate::upgrade::state::ListenerKind;
use crate::{cluster, control, handoff, handshakes, metrics, node, timeouts, Error};
use saps_fabric::handoff::side;
use saps_fabric::transport::{FabricUrl, StreamListener, TransportRead, TransportWrite};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// A running io-server.
pub struct IoServer {
    server: Arc<ServerState>,
    fabric: Vec<FabricUrl>,
}

/// What an io-server serves on: bound by [`IoServer::start`], or taken
/// over from the process it replaces ([`crate::upgrade::handover`]).
pub(crate) struct Listeners {
    /// Each `--fabric` listener with its URL as given.
    pub fabric: Vec<(String, StreamListener)>,
    pub sides: Vec<side::SideListener>,
    pub control: Option<tokio::net::UnixListener>,
    pub metrics: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds every listener `config` names.
    async fn bind(config: &Config, relay_only: bool) -> Result<Listeners, Error> {
        let mut fabric = Vec::new();
        let mut sides = Vec::new();
        for url in &config.fabric {
            let parsed: FabricUrl = url.parse()?;
            let l = StreamListener::bind(&parsed)
                .await
                .map_err(|source| Error::FabricBind {
                    url: url.clone(),
                    source,
                })?;
            fabric.push((url.clone(), l));
            // Same-host nodes on a unix fabric may take accepted sockets
            // themselves (zero-relay) through PATH.handoff.
            // Without it (a path too long for one more suffix, say) those
            // nodes are relayed, as over tcp.
            // Under the smoltcp stack a client is one end of a socketpair,
            // not a TCP socket a program could be given: every node is
            // relayed (docs/io-server.md "--stack smoltcp").
            if let (FabricUrl::Unix(path), false) = (&parsed, relay_only) {
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
        Ok(Listeners {
            fabric,
            sides,
            control,
            metrics,
        })
    }

    /// Copies of the listening sockets, each with what it is, for an
    /// upgrade to hand over (an `rdma://` listener cannot move: none).
    fn copies(&self, config: &Config) -> std::io::Result<Vec<(ListenerKind, OwnedFd)>> {
        let mut out = Vec::new();
        for (url, l) in &self.fabric {
            let fd = match l {
                StreamListener::Unix(l, _) => l.as_fd().try_clone_to_owned()?,
                StreamListener::Tcp(l) => l.as_fd().try_clone_to_owned()?,
                #[cfg(feature = "rdma")]
                StreamListener::Rdma(_) => continue,
            };
            out.push((ListenerKind::Fabric { url: url.clone() }, fd));
        }
        for l in &self.sides {
            let path = l.path().display().to_string();
            out.push((
                ListenerKind::Handoff { path },
                l.as_fd().try_clone_to_owned()?,
            ));
        }
        if let (Some(l), Some(path)) = (&self.control, &config.control) {
            let path = path.display().to_string();
            out.push((
                ListenerKind::Control { path },
                l.as_fd().try_clone_to_owned()?,
            ));
        }
        if let (Some(l), Some(addr)) = (&self.metrics, config.metrics) {
            let addr = addr.to_string();
            out.push((
                ListenerKind::Metrics { addr },
                l.as_fd().try_clone_to_owned()?,
            ));
        }
        Ok(out)
    }
}

impl IoServer {
    /// Binds the `--fabric` listeners, the control socket and the metrics
    /// address, and starts serving on the current tokio runtime.
    pub async fn start(config: Config) -> Result<IoServer, Error> {
        let token = config.load_token()?;
        let stack = open_stack(&config)?;
        let listeners = Listeners::bind(&config, stack.is_some()).await?;
        Self::serve_on(config, token, stack, listeners, |_| Ok(()))
    }

    /// Starts serving on `listeners`; `prepare` may change the state
    /// (an upgrade's carried counters and tables) before it is shared.
    pub(crate) fn serve_on(
        config: Config,
        token: Vec<u8>,
        stack: Option<saps_stack::Stack>,
        listeners: Listeners,
        prepare: impl FnOnce(&mut ServerState) -> Result<(), Error>,
    ) -> Result<IoServer, Error> {
        crate::guard::init();
        let copies = listeners.copies(&config);
        let mut state = ServerState::new(config, token);
        state.stack = stack;
        match copies {
            Ok(c) => *state.listening.get_mut().unwrap_or_else(|e| e.into_inner()) = c,
            Err(e) => tracing::warn!(error = %e, "no copies of the listeners: no upgrade in place"),
        }
        let mut fabric = Vec::new();
        for (_, l) in &listeners.fabric {
            if let Ok(url) = l.local_url() {
                tracing::info!(%url, "listening for nodes");
                if let FabricUrl::Tcp(addr) = &url {
                    state
                        .own_addrs
                        .extend(addr.parse::<std::net::SocketAddr>().ok());
                }
                fabric.push(url);
            }
        }
        state
            .own_addrs
            .extend(listeners.metrics.as_ref().and_then(|m| m.local_addr().ok()));
        prepare(&mut state)?;
        let server = Arc::new(state);
        tokio::spawn(crate::dispatch::admission_task(server.clone()));
        for (_, l) in listeners.fabric {
            tokio::spawn(fabric_loop(server.clone(), l));
        }
        for l in listeners.sides {
            tokio::spawn(handoff::handoff_loop(server.clone(), l));
        }
        if let Some(l) = listeners.control {
            tokio::spawn(control::serve(server.clone(), l));
        }
        if let Some(l) = listeners.metrics {
            tokio::spawn(metrics::serve(server.clone(), l));
        }
        tokio::spawn(timeouts::housekeeping(server.clone()));
        Ok(IoServer { server, fabric })
    }

    /// The state its tasks share.
    pub(crate) fn state(&self) -> &Arc<ServerState> {
        &self.server
    }

    /// Where systemd's notifications go, for an upgrade's `RELOADING=1`
    /// and `MAINPID=` (set once, by the daemon).
    pub fn set_notifier(&self, n: Arc<crate::notify::Notifier>) {
        let _ = self.server.notifier.set(n);
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
        node::serve(
            self.server.clone(),
            r,
            w,
            "embedded".into(),
            None,
            how,
            None,
        )
        .await
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
        node::serve(self.server.clone(), r, w, peer, Some(handoff), how, None).await
    }

    /// Serves a node that reached this io-server over a transport of the
    /// caller's rather than a `--fabric` listener, as one that joined over
    /// a listener: clients its program has not accepted when it leaves go
    /// to another member (tests use it over `memory_pair()`).
    pub async fn attach_remote<R: TransportRead, W: TransportWrite>(&self, r: R, w: W, peer: &str) {
        let how = node::Joined::Fabric { pid: None };
        node::serve(self.server.clone(), r, w, peer.into(), None, how, None).await
    }

    /// The current `io-server status` report.
    pub fn status(&self) -> Status {
        Status::collect(&self.server)
    }

    /// Sets the weight of node `name` (0 drains it). False if no such node.
    pub fn set_weight(&self, name: &str, weight: u32) -> bool {
        cluster::set_weight_by_name(&self.server, name, weight)
    }

    /// Graceful shutdown: stop accepting clients and nodes, let open
    /// connections finish within `deadline`, then close every node channel.
    /// Returns how many connections were still open at the deadline.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let server = &self.server;
        server.shutdown.send_replace(true);
        let (queued, live) = {
            let mut st = server.lock();
            let queued = st.groups.take_queues();
            (queued, st.groups.traffic().live_connections())
        };
        tracing::info!(
            live,
            queued = queued.len(),
            "shutting down: no new connections"
        );
        drop(queued);
        let end = tokio::time::Instant::now() + deadline;
        let cut = loop {
            let changed = server.conns_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let live = server.lock().groups.traffic().live_connections();
            if live == 0 {
                break 0;
            }
            if tokio::time::timeout_at(end, changed).await.is_err() {
                break live;
            }
        };
        let nodes: Vec<_> = server.lock().nodes.values().map(|n| n.ep.clone()).collect();
        for ep in nodes {
            ep.handle()
                .with(|ch| ch.close("the io-server is shutting down"));
        }
        tracing::info!(cut, "shutdown complete");
        cut
    }
}

/// The smoltcp stack of `--stack smoltcp` on its TAP (`--tap` or
/// `--tap-fd`), started; `None` for the kernel's stack.
fn open_stack(config: &Config) -> Result<Option<saps_stack::Stack>, Error> {
    if config.stack == Stack::Kernel {
        if config.tap.is_some() || config.tap_fd.is_some() {
            tracing::warn!("--tap and --tap-fd are for --stack smoltcp: ignored");
        }
        return Ok(None);
    }
    let address = match config.address {
        std::net::IpAddr::V4(a) if !a.is_unspecified() => a,
        other => return Err(Error::StackAddress(other)),
    };
    let mut cfg = saps_stack::Config::new(address, config.tap_prefix, config.tap_gateway);
    cfg.max_sockets = config.stack_max_sockets;
    cfg.rx_buffer = config.stack_buffer;
    cfg.tx_buffer = config.stack_buffer;
    cfg.max_backlog = config.stack_max_backlog;
    cfg.idle_timeout = Duration::from_secs(config.stack_idle_timeout);
    cfg.keep_alive = Duration::from_secs(config.stack_keepalive);
    // The node's connects are bounded by --connect-timeout (0: the
    // kernel's own SYN retries, about 127 s).
    cfg.connect_timeout = match config.connect_timeout {
        0 => Duration::from_secs(127),
        secs => Duration::from_secs(secs),
    };
    let stack = match (&config.tap, config.tap_fd) {
        (Some(name), _) => saps_stack::Stack::open_tap(name, cfg)?,
        (None, Some(fd)) => {
            if let Err(e) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) {
                let source = std::io::Error::from(e);
                return Err(Error::TapFd { fd, source });
            }
            // SAFETY: an open descriptor (checked above), handed to this
            // process for the stack to own; nothing else here uses it.
            let owned =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            saps_stack::Stack::from_tap_fd(owned, cfg)?
        }
        (None, None) => return Err(Error::StackNoTap),
    };
    tracing::info!(%address, prefix = config.tap_prefix, gateway = ?config.tap_gateway, tap = ?config.tap, tap_fd = ?config.tap_fd, max_sockets = config.stack_max_sockets, "TCP by the smoltcp stack on the TAP (every node relayed)");
    Ok(Some(stack))
}

/// Binds fabric listener `url` once it is free, trying for at most
/// `within` (an upgrade's new process: the old one holds an `rdma://`
/// listener, which cannot move, until it exits), then accepts nodes on it.
pub(crate) fn bind_when_free(server: Arc<ServerState>, url: String, within: Duration) {
    tokio::spawn(async move {
        let parsed: FabricUrl = match url.parse() {
            Ok(u) => u,
            Err(e) => return tracing::warn!(%url, error = %e, "fabric listener not bound"),
        };
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match StreamListener::bind(&parsed).await {
                Ok(l) => {
                    tracing::info!(%url, "listening for nodes");
                    return fabric_loop(server, l).await;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return tracing::error!(%url, error = %e, "fabric listener not bound: its nodes cannot join");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
}

/// Accepts nodes on one fabric listener until shutdown.
async fn fabric_loop(server: Arc<ServerState>, listener: StreamListener) {
    let liveness = server.config.tcp_liveness();
    server
        .accept_until_shutdown(
            "fabric",
            || listener.accept_node(liveness),
            |((r, w), peer, pid)| {
                // Beyond the bounds on handshakes the connection is
                // closed at once (dropping its halves), its reason logged.
                let source = handshakes::source(&peer, pid);
                let permit = match server.handshakes.admit(&source) {
                    Ok(p) => p,
                    Err(reason) => {
                        if let Some(more) = server.logs.allow("fabric connection refused") {
                            tracing::warn!(%peer, %reason, "fabric connection refused{more}");
                        }
                        return;
                    }
                };
                let how = node::Joined::Fabric { pid };
                let serve = node::serve(server.clone(), r, w, peer, None, how, Some(permit));
                tokio::spawn(serve);
            },
        )
        .await
}
