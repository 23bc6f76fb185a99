//! The application node (the paper's name for a host running a program
//! whose sockets SAPS serves): it joins an io-server, runs the program
//! under the supervisor, stays joined across io-server restarts, and
//! reports the program's exit status. `saps-run` is a thin command line
//! over it, as youki is over libcontainer.
//!
//! * `config.rs` — [`NodeConfig`]: who the node is and which io-server it
//!   joins ([`IoServerLink`]).
//! * `join.rs` — transport, handshake until the Welcome, hand-off claim.
//! * `rejoin.rs` — serving the channel and joining again with backoff.
//! * `program.rs` — the program's process tree: the kill on drop, where
//!   forwarded signals go ([`SignalForwarder`]), stopping the rest.
//!
//! A life: [`ApplicationNode::join`] (on the runtime), then
//! [`ApplicationNode::start`] (on the thread that lives as long as the
//! program), then [`RunningProgram::wait`].

mod config;
mod error;
mod join;
mod program;
mod rejoin;
#[cfg(test)]
mod tests;

pub use config::{
    EmbeddedIoServer, IoServerLink, NodeConfig, RemoteIoServer, DEFAULT_REQUEST_TIMEOUT,
};
pub use error::NodeError;
pub use program::SignalForwarder;

use crate::filter::FilterOptions;
use crate::launch::{self, ExitStatus, Target, Tree};
use crate::supervisor::{Loopback, Supervisor, SupervisorConfig, Tracer};
use join::{Events, Identity};
use program::KillOnDrop;
use rejoin::Rejoin;
use saps_fabric::endpoint::Endpoint;
use saps_fabric::handoff::{self, HandoffReceiver};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::sync::Arc;

/// A node joined to its io-server, its program not started yet.
pub struct ApplicationNode {
    me: Identity,
    loopback: Loopback,
    io_server: Arc<str>,
    endpoint: Endpoint,
    events: Events,
    /// Where zero-relay sockets come from, if anywhere.
    handoffs: Option<HandoffReceiver>,
    /// How to join again when the channel is lost (a remote io-server).
    rejoin: Option<Rejoin>,
    /// The program's sockets are the kernel's own (an embedded io-server
    /// that allows it).
    native_sockets: bool,
}

impl ApplicationNode {
    /// Joins the io-server and waits for its Welcome; with a same-host
    /// io-server and zero-relay, also claims the node's sockets on its
    /// hand-off socket, so the program's first clients already come as
    /// sockets.
    pub async fn join(config: NodeConfig) -> Result<Self, NodeError> {
        let me = Identity {
            name: config.name,
            weight: config.weight,
        };
        let io_server: Arc<str> = config.io_server.label().into();
        let native_sockets =
            matches!(&config.io_server, IoServerLink::Embedded(e) if e.native_sockets);
        let (joined, handoffs, rejoin) = match config.io_server {
            IoServerLink::Remote(remote) => {
                let token = remote.read_token()?;
                let joined = join::join_remote(&remote, &me, token).await?;
                let (tx, rx) = match &remote.handoff_side {
                    Some(path) => {
                        let (tx, rx) = handoff::channel();
                        join::claim_handoff(path, joined.node_id, tx.clone()).await;
                        (Some(tx), Some(rx))
                    }
                    None => (None, None),
                };
                let rejoin = Rejoin {
                    remote,
                    me: me.clone(),
                    handoffs: tx,
                };
                (joined, rx, Some(rejoin))
            }
            IoServerLink::Embedded(embedded) => {
                let joined = join::handshake(&me, embedded.token, embedded.transport).await?;
                (joined, embedded.handoffs, None)
            }
        };
        Ok(ApplicationNode {
            me,
            loopback: config.loopback,
            io_server,
            endpoint: joined.endpoint,
            events: joined.events,
            handoffs,
            rejoin,
            native_sockets,
        })
    }

    /// Starts `program` under the supervisor, which from now on serves it
    /// and, in tasks on `rt` (the runtime the node joined on), the
    /// io-server's events (and joins again when the channel is lost).
    ///
    /// Call it on the thread that lives as long as the program (a binary's
    /// main thread): the main process's parent-death signal follows the
    /// thread that forked it. The node becomes the subreaper of the
    /// program's tree first, so a daemon's orphans come to it.
    pub fn start(
        self,
        rt: &tokio::runtime::Handle,
        program: &OsStr,
        args: &[OsString],
        tracer: Option<Arc<dyn Tracer>>,
    ) -> Result<RunningProgram, NodeError> {
        // Before the subreaper: the maker must not be reparented to us.
        // Test hook: `SAPS_TEST_AF_UNIX_PLACEHOLDERS` makes the supervisor
        // behave as where no network namespace can be made.
        let no_maker = std::env::var_os("SAPS_TEST_AF_UNIX_PLACEHOLDERS").is_some();
        let maker = if self.native_sockets || no_maker {
            None
        } else {
            match crate::maker::SocketMaker::start() {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => {
                    tracing::info!(error = %e, "no network namespace for TCP placeholders: AF_UNIX ones");
                    None
                }
            }
        };
        launch::become_subreaper().map_err(NodeError::Subreaper)?;
        // Neither the program nor anything else running as this user may
        // read the node's memory (it holds the fabric's token) through
        // ptrace or /proc/PID/mem: the node is not dumpable. The program
        // is, again, from its `exec` on.
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!("cannot make the node undumpable: {e}");
        }
        // With native sockets, `listen` traps only for the trace: a
        // trapped call can end with EINTR where the kernel's would not.
        let filter = FilterOptions {
            native_sockets: self.native_sockets,
            trap_listen: tracer.is_some(),
            ..Default::default()
        };
        let (target, notifier) = match Target::spawn_with(program, args, &filter) {
            Ok(t) => t,
            Err(e @ crate::Error::Exec { .. }) => return Err(NodeError::Exec(e)),
            Err(e) => return Err(NodeError::Start(e)),
        };
        let tree = match target.reap_tree() {
            Ok(tree) => Arc::new(tree),
            Err(e) => {
                let _ = target.signal(libc::SIGKILL);
                let _ = target.wait();
                return Err(NodeError::Watch(e));
            }
        };
        // From here on, however the node stops (an error, a panic), the
        // tree goes down with it.
        let guard = KillOnDrop(tree.clone());
        let target = Arc::new(target);
        let supervisor = Supervisor::new(
            notifier,
            self.endpoint,
            rt.clone(),
            SupervisorConfig {
                loopback: self.loopback,
                tracer,
                io_server: self.io_server,
                node: self.me.name.into(),
                native_sockets: self.native_sockets,
                maker,
            },
        );
        rt.spawn(rejoin::stay_joined(
            supervisor.clone(),
            self.events,
            self.rejoin,
        ));
        if let Some(rx) = self.handoffs {
            rt.spawn(supervisor.clone().serve_handoffs(rx));
        }
        let (signals, stopping) = SignalForwarder::new(target.clone(), tree.clone());
        rt.spawn(program::stop_the_rest(
            target.clone(),
            tree.clone(),
            stopping,
        ));
        Ok(RunningProgram {
            target,
            tree,
            supervisor,
            signals,
            _kill_on_drop: guard,
        })
    }
}

/// A node's program, started: the supervisor serves it in
/// [`RunningProgram::wait`]. Dropped before its tree is gone, it kills the
/// tree.
pub struct RunningProgram {
    target: Arc<Target>,
    tree: Arc<Tree>,
    supervisor: Supervisor,
    signals: SignalForwarder,
    _kill_on_drop: KillOnDrop,
}

impl RunningProgram {
    /// What forwards signals to the program (for the host's handlers).
    pub fn signals(&self) -> SignalForwarder {
        self.signals.clone()
    }

    /// Serves the program's trapped calls on this thread until the last
    /// process of its tree has exited; then the main process's status.
    pub fn wait(self) -> Result<ExitStatus, NodeError> {
        self.supervisor.run(self.tree.as_fd());
        if !self.tree.is_done() {
            // The program would get ENOSYS from every trapped call; the
            // drop of `self` kills it.
            return Err(NodeError::SupervisorStopped);
        }
        self.target.wait().map_err(NodeError::Wait)
    }
}
