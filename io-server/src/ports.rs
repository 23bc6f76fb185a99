//! The listener groups' real sockets: one per port on the single address,
//! bound when the group opens, listening (watched by the runtime as an
//! `AsyncFd`, clients taken with `accept4`, `dispatch.rs`) from its first
//! member's `listen`, with the task that accepts on it. [`Ports`] follows
//! what `Groups` (`groups.rs`) returns: a port opens with its group and
//! closes with it.

use crate::sys::{self, Errno};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A group's listening socket, watched by the runtime; clients are
/// accepted with [`sys::accept`].
pub(crate) type Listening = AsyncFd<std::net::TcpListener>;

/// The real socket of one group.
struct Port {
    /// The socket while bound but not yet listening.
    socket: Option<std::net::TcpListener>,
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

/// Every group's port, by the group's address.
#[derive(Default)]
pub(crate) struct Ports(HashMap<SocketAddr, Port>);

impl Ports {
    /// Binds a new port at `addr` (port 0: a free one); its real address.
    pub fn open(&mut self, addr: SocketAddr) -> Result<SocketAddr, Errno> {
        let socket = sys::bound_socket(addr)?;
        let real = socket
            .local_addr()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
        let port = Port {
            socket: Some(socket),
            listening: None,
            accept_task: None,
            resume: Arc::default(),
            backlog: 0,
        };
        self.0.insert(real, port);
        Ok(real)
    }

    /// Whether a group holds `port` (on any address).
    pub fn serves_port(&self, port: u16) -> bool {
        self.0.keys().any(|k| k.port() == port)
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
        let port = self.0.get_mut(&key).ok_or(libc::EINVAL)?;
        let Some(s) = port.socket.take() else {
            if let Some(l) = port.listening.as_ref().filter(|_| backlog > port.backlog) {
                sys::listen(l.get_ref(), backlog)?;
                port.backlog = backlog;
            }
            return Ok(None);
        };
        if let Err(e) = sys::listen(&s, backlog) {
            port.socket = Some(s);
            return Err(e);
        }
        port.backlog = backlog;
        let l = sys::register_listener(s).map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
        let l = Arc::new(l);
        port.listening = Some(l.clone());
        Ok(Some(l))
    }

    /// What wakes the accept task of port `key` once its group admits
    /// clients again.
    pub fn resume(&self, key: SocketAddr) -> Option<Arc<Notify>> {
        self.0.get(&key).map(|p| p.resume.clone())
    }

    /// The kernel's accept queue of port `key`: clients waiting in it and
    /// its bound (`TCP_INFO` of a listening socket: `tcpi_unacked`,
    /// `tcpi_sacked`). `None` while it does not listen.
    pub fn kernel_queue(&self, key: SocketAddr) -> Option<(u32, u32)> {
        let l = self.0.get(&key)?.listening.as_ref()?;
        sys::accept_queue(l.get_ref())
    }

    /// Keeps the accept task of port `key` (stopped with the port).
    pub fn set_accept_task(&mut self, key: SocketAddr, task: JoinHandle<()>) {
        match self.0.get_mut(&key) {
            Some(p) => p.accept_task = Some(task),
            None => task.abort(),
        }
    }

    /// Closes port `key`: new clients are refused.
    pub fn close(&mut self, key: SocketAddr) {
        self.0.remove(&key);
    }
}

/// Stops a listening socket at once (the port is free and new clients are
/// refused) whoever still holds a reference to it.
pub(crate) fn close_listener(l: &Listening) {
    let _ = nix::sys::socket::shutdown(
        std::os::fd::AsRawFd::as_raw_fd(l),
        nix::sys::socket::Shutdown::Both,
    );
}
