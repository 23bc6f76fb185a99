//! The listener groups' real sockets: one per port on the single address,
//! bound when the group opens, listening (watched by the runtime as an
//! `AsyncFd`, clients taken with `accept4`, `dispatch.rs`) from its first
//! member's `listen`, with the task that accepts on it. [`Ports`] follows
//! what `Groups` (`groups.rs`) returns: a port opens with its group and
//! closes with it.
//!
//! Under `--stack smoltcp` a port is reserved here when its group opens
//! (port 0: one no group holds) and listens on the stack
//! (`saps_stack::Listener`) from its first member's `listen`; that call
//! waits for the stack's thread, so the node's task makes it with the
//! tables' lock released ([`Ports::stack_port_to_open`],
//! [`Ports::stack_opened`]).

use crate::sys::{self, Errno};
use crate::upgrade::state::{Capture, PortSnap, Source, StateError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A group's listening socket, watched by the runtime: the kernel's
/// (clients accepted with [`sys::accept`]) or the stack's (its fd polls
/// readable while a connection waits; `try_accept`).
pub(crate) enum Listening {
    Kernel(AsyncFd<std::net::TcpListener>),
    Stack(AsyncFd<saps_stack::Listener>),
}

/// A group's port before it listens.
enum Bound {
    /// The kernel's socket, bound.
    Kernel(std::net::TcpListener),
    /// A port of the stack, reserved here; its listener once the first
    /// member's `listen` opened it (`Ports::stack_opened`).
    Stack(Option<saps_stack::Listener>),
}

/// The real socket of one group.
struct Port {
    /// The socket while bound but not yet listening.
    socket: Option<Bound>,
    /// The listening socket, shared with the accept task.
    listening: Option<Arc<Listening>>,
    accept_task: Option<JoinHandle<()>>,
    /// Wakes the accept task of a paused group (admission,
    /// `Groups::resume`).
    resume: Arc<Notify>,
    /// The backlog it listens with: the largest of its members'.
    backlog: u32,
}

impl Drop for Port {
    fn drop(&mut self) {
        // Free the port now, not when the aborted accept loop is dropped:
        // a program that closes its listener and binds the port again
        // (iperf3 does, per test) must not see EADDRINUSE.
        if let Some(l) = &self.listening {
            close_listener(l);
        }
        if let Some(t) = &self.accept_task {
            t.abort();
        }
    }
}

/// Ports a group may be given for port 0 on the stack: Linux's
/// `ip_local_port_range`, as `bind(2)` to port 0 picks from.
const STACK_FREE_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;

/// Every group's port, by the group's address.
#[derive(Default)]
pub(crate) struct Ports {
    ports: HashMap<SocketAddr, Port>,
    /// Ports are the smoltcp stack's (`--stack smoltcp`).
    stack: bool,
    /// Where the search for a free stack port starts next.
    next_free: u16,
}

impl Ports {
    /// The ports of the kernel's stack, or (`stack`) of the smoltcp one.
    pub fn new(stack: bool) -> Ports {
        Ports {
            ports: HashMap::new(),
            stack,
            next_free: *STACK_FREE_PORTS.start(),
        }
    }

    /// Binds a new port at `addr` (port 0: a free one); its real address.
    pub fn open(&mut self, addr: SocketAddr) -> Result<SocketAddr, Errno> {
        let (socket, real) = if self.stack {
            let port = match addr.port() {
                0 => self.free_stack_port().ok_or(libc::EADDRINUSE)?,
                p if self.serves_port(p) => return Err(libc::EADDRINUSE),
                p => p,
            };
            (Bound::Stack(None), SocketAddr::new(addr.ip(), port))
        } else {
            let socket = sys::bound_socket(addr)?;
            let real = socket
                .local_addr()
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
            (Bound::Kernel(socket), real)
        };
        let port = Port {
            socket: Some(socket),
            listening: None,
            accept_task: None,
            resume: Arc::default(),
            backlog: 0,
        };
        self.ports.insert(real, port);
        Ok(real)
    }

    /// A stack port no group holds, round robin over [`STACK_FREE_PORTS`]
    /// (bounded: one pass).
    fn free_stack_port(&mut self) -> Option<u16> {
        let (lo, hi) = (*STACK_FREE_PORTS.start(), *STACK_FREE_PORTS.end());
        for _ in STACK_FREE_PORTS {
            let p = self.next_free;
            self.next_free = if p >= hi { lo } else { p + 1 };
            if !self.serves_port(p) {
                return Some(p);
            }
        }
        None
    }

    /// Whether a group holds `port` (on any address).
    pub fn serves_port(&self, port: u16) -> bool {
        self.ports.keys().any(|k| k.port() == port)
    }

    /// The stack's port of `key` if it must be opened on the stack before
    /// it can listen (its group's first `listen`): the caller opens it
    /// (`Stack::listen`, with the tables' lock released) and gives it to
    /// [`Ports::stack_opened`].
    pub fn stack_port_to_open(&self, key: SocketAddr) -> Option<u16> {
        match self.ports.get(&key)?.socket {
            Some(Bound::Stack(None)) => Some(key.port()),
            _ => None,
        }
    }

    /// Keeps the stack's listener of port `key`, opened by the caller;
    /// given back if the port closed (or was opened by another) meanwhile.
    pub fn stack_opened(
        &mut self,
        key: SocketAddr,
        l: saps_stack::Listener,
    ) -> Result<(), saps_stack::Listener> {
        match self.ports.get_mut(&key).map(|p| &mut p.socket) {
            Some(Some(Bound::Stack(slot @ None))) => {
                *slot = Some(l);
                Ok(())
            }
            _ => Err(l),
        }
    }

    /// Makes port `key` listen, the first time: the listening socket, for
    /// the caller to run its accept task. `None` if it listens already;
    /// its kernel accept queue then grows to `backlog` if that is larger
    /// (clients left there while the group admits no more wait in it,
    /// `dispatch::accept_loop`: as many as its largest member would hold).
    pub fn start_listening(
        &mut self,
        key: SocketAddr,
        backlog: u32,
    ) -> Result<Option<Arc<Listening>>, Errno> {
        let port = self.ports.get_mut(&key).ok_or(libc::EINVAL)?;
        let l = match port.socket.take() {
            None => {
                match port.listening.as_deref().filter(|_| backlog > port.backlog) {
                    Some(Listening::Kernel(l)) => sys::listen(l.get_ref(), backlog)?,
                    // Never blocks: the stack's thread tops the pool up.
                    // Its command queue full: the backlog stays as it is.
                    Some(Listening::Stack(l)) => {
                        if let Err(e) = l.get_ref().grow_backlog(backlog) {
                            tracing::warn!(%key, error = %e, "stack listener: backlog not grown");
                            return Ok(None);
                        }
                    }
                    None => return Ok(None),
                }
                port.backlog = backlog;
                return Ok(None);
            }
            Some(Bound::Kernel(s)) => {
                if let Err(e) = sys::listen(&s, backlog) {
                    port.socket = Some(Bound::Kernel(s));
                    return Err(e);
                }
                let l = sys::register_listener(s);
                Listening::Kernel(l.map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?)
            }
            // Not opened on the stack (its open failed, or raced a close).
            Some(Bound::Stack(None)) => {
                port.socket = Some(Bound::Stack(None));
                return Err(libc::EADDRINUSE);
            }
            Some(Bound::Stack(Some(l))) => {
                // The stack's backlog is the one it was opened with; a
                // larger one grows it.
                if let Err(e) = l.grow_backlog(backlog) {
                    tracing::debug!(error = %e, "stack listener: backlog not grown");
                }
                let l = sys::register_readable(l);
                Listening::Stack(l.map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?)
            }
        };
        port.backlog = backlog;
        let l = Arc::new(l);
        port.listening = Some(l.clone());
        Ok(Some(l))
    }

    /// What wakes the accept task of port `key` once its group admits
    /// clients again.
    pub fn resume(&self, key: SocketAddr) -> Option<Arc<Notify>> {
        self.ports.get(&key).map(|p| p.resume.clone())
    }

    /// The kernel's accept queue of port `key`: clients waiting in it and
    /// its bound (`TCP_INFO` of a listening socket: `tcpi_unacked`,
    /// `tcpi_sacked`). `None` while it does not listen, and on the stack
    /// (its queue is in `Stack::stats`).
    pub fn kernel_queue(&self, key: SocketAddr) -> Option<(u32, u32)> {
        match self.ports.get(&key)?.listening.as_deref()? {
            Listening::Kernel(l) => sys::accept_queue(l.get_ref()),
            Listening::Stack(_) => None,
        }
    }

    /// Keeps the accept task of port `key` (stopped with the port).
    pub fn set_accept_task(&mut self, key: SocketAddr, task: JoinHandle<()>) {
        match self.ports.get_mut(&key) {
            Some(p) => p.accept_task = Some(task),
            None => task.abort(),
        }
    }

    /// Closes port `key`: new clients are refused.
    pub fn close(&mut self, key: SocketAddr) {
        self.ports.remove(&key);
    }

    /// Every port with its socket, for an upgrade (the kernel's stack
    /// only: the caller refuses the smoltcp stack first), by address.
    pub fn snapshot<'a>(&'a self, capture: &mut Capture<'a>) -> Vec<PortSnap> {
        let mut keys: Vec<&SocketAddr> = self.ports.keys().collect();
        keys.sort_unstable();
        let mut out = Vec::new();
        for key in keys {
            let port = &self.ports[key];
            let (fd, listening) = match (&port.socket, port.listening.as_deref()) {
                (Some(Bound::Kernel(s)), _) => (s.as_fd(), false),
                (_, Some(Listening::Kernel(l))) => (l.get_ref().as_fd(), true),
                _ => continue,
            };
            out.push(PortSnap {
                key: *key,
                fd: capture.fd(fd),
                listening,
                backlog: port.backlog,
            });
        }
        out
    }

    /// The ports of a snapshot, on the descriptors that came with it; the
    /// listening ones, for the caller to start their accept tasks
    /// ([`Ports::set_accept_task`]).
    pub fn restore(
        snaps: &[PortSnap],
        source: &mut Source,
    ) -> Result<(Ports, Vec<ListeningPort>), StateError> {
        let mut ports = Ports::new(false);
        let mut listening = Vec::new();
        for snap in snaps {
            let socket = std::net::TcpListener::from(source.fd(snap.fd)?);
            let local = socket.local_addr().map_err(|e| {
                StateError::Invalid(format!("the port of {} is not a socket: {e}", snap.key))
            })?;
            if local.port() != snap.key.port() {
                return Err(StateError::Invalid(format!(
                    "the socket of port {} is bound to {local}",
                    snap.key
                )));
            }
            let mut port = Port {
                socket: None,
                listening: None,
                accept_task: None,
                resume: Arc::default(),
                backlog: snap.backlog,
            };
            if snap.listening {
                let l = sys::register_listener(socket)
                    .map_err(|e| StateError::Invalid(format!("port {}: {e}", snap.key)))?;
                let l = Arc::new(Listening::Kernel(l));
                port.listening = Some(l.clone());
                listening.push((snap.key, l));
            } else {
                port.socket = Some(Bound::Kernel(socket));
            }
            ports.ports.insert(snap.key, port);
        }
        Ok((ports, listening))
    }
}

/// A port that listens, and its socket.
pub(crate) type ListeningPort = (SocketAddr, Arc<Listening>);

/// Set once an upgrade has committed: every listening socket is the new
/// process's from then on, and this one, about to exit, shuts none down.
static DISOWNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An upgrade committed: no port of this process is ever shut down again
/// ([`close_listener`] does nothing).
pub(crate) fn disown() {
    DISOWNED.store(true, std::sync::atomic::Ordering::Release);
}

/// This process owns its ports again (an upgrade's new process, once
/// committed: until then a refused takeover must not shut down the
/// sockets it was given).
pub(crate) fn own() {
    DISOWNED.store(false, std::sync::atomic::Ordering::Release);
}

/// Stops a listening socket at once (the port is free and new clients are
/// refused) whoever still holds a reference to it; nothing once the
/// process has handed its ports over ([`disown`]).
pub(crate) fn close_listener(l: &Listening) {
    if DISOWNED.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    match l {
        Listening::Kernel(l) => {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(l),
                nix::sys::socket::Shutdown::Both,
            );
        }
        // The stack closes the port (and the connections not accepted).
        Listening::Stack(l) => l.get_ref().close(),
    }
}
