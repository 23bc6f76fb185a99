//! The user's side of the stack: [`Stack`] starts the thread
//! (`engine.rs`) on a TAP and sends it commands; a [`Listener`] and a
//! [`Connecting`] each have a file descriptor that polls readable when a
//! connection (or a connect's outcome) waits, for an `AsyncFd`.

use crate::engine::{Command, Engine, Outcome};
use crate::mailbox::{Mailbox, Wake};
use crate::tap::Tap;
use crate::{os, sys, Config, Connection, Error, Stats};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// smoltcp on a TAP device, in a thread of its own; stopped when dropped.
pub struct Stack {
    commands: SyncSender<Command>,
    wake: Arc<Wake>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    config: Config,
}

impl Stack {
    /// Opens the TAP device `name` (created if absent, in the calling
    /// thread's network namespace) and starts the stack on it.
    pub fn open_tap(name: &str, config: Config) -> Result<Stack, Error> {
        let fd = sys::open_tap(name).map_err(|e| Error::Tap {
            name: name.to_string(),
            source: std::io::Error::from_raw_os_error(e),
        })?;
        Stack::from_tap_fd(fd, config)
    }

    /// Starts the stack on an open TAP (`--tap-fd`: handed over by a
    /// privileged helper; opened with `IFF_TAP | IFF_NO_PI`).
    pub fn from_tap_fd(fd: OwnedFd, config: Config) -> Result<Stack, Error> {
        let tap = Tap::new(fd, config.mtu).map_err(os)?;
        let wake = Arc::new(Wake::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let (commands, rx) = sync_channel(config.command_queue);
        let engine =
            Engine::new(config.clone(), tap, rx, wake.clone(), stop.clone()).map_err(os)?;
        let thread = std::thread::Builder::new()
            .name("saps-stack".into())
            .spawn(move || engine.run())?;
        Ok(Stack {
            commands,
            wake,
            stop,
            thread: Some(thread),
            config,
        })
    }

    /// Listens on `port` of the single address with a pool of `backlog`
    /// listening sockets (clamped to 1..=`max_backlog`). EADDRINUSE if a
    /// listener or an outbound connection holds the port.
    pub fn listen(&self, port: u16, backlog: u32) -> Result<Listener, Error> {
        let backlog = backlog.clamp(1, self.config.max_backlog) as usize;
        let ready = Arc::new(Mailbox::new(backlog, self.wake.clone())?);
        let (reply, answer) = sync_channel(1);
        self.send(Command::Listen {
            port,
            backlog,
            ready: ready.clone(),
            reply,
        })?;
        answer
            .recv_timeout(self.config.command_timeout)
            .map_err(|_| Error::Stopped)?
            .map_err(os)?;
        Ok(Listener {
            port,
            ready,
            commands: self.commands.clone(),
            wake: self.wake.clone(),
            max_backlog: self.config.max_backlog,
        })
    }

    /// Starts a connect from the single address to `remote`.
    pub fn connect(&self, remote: SocketAddr) -> Result<Connecting, Error> {
        let SocketAddr::V4(remote) = remote else {
            return Err(Error::NotIpv4(remote));
        };
        let outcome = Arc::new(Mailbox::new(1, self.wake.clone())?);
        self.send(Command::Connect {
            remote,
            outcome: outcome.clone(),
        })?;
        Ok(Connecting { outcome })
    }

    /// The stack's counters and sockets by state.
    pub fn stats(&self) -> Result<Stats, Error> {
        let (reply, answer) = sync_channel(1);
        self.send(Command::Stats { reply })?;
        answer
            .recv_timeout(self.config.command_timeout)
            .map_err(|_| Error::Stopped)
    }

    fn send(&self, c: Command) -> Result<(), Error> {
        send(&self.commands, &self.wake, c)
    }
}

/// Queues command `c` for the stack's thread and wakes it; never blocks
/// (`Busy` with the queue full).
fn send(commands: &SyncSender<Command>, wake: &Wake, c: Command) -> Result<(), Error> {
    commands.try_send(c).map_err(|e| match e {
        std::sync::mpsc::TrySendError::Full(_) => Error::Busy,
        std::sync::mpsc::TrySendError::Disconnected(_) => Error::Stopped,
    })?;
    wake.wake();
    Ok(())
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listening port; closed (its pool and unaccepted connections with it)
/// when dropped.
pub struct Listener {
    port: u16,
    ready: Arc<Mailbox<Connection>>,
    commands: SyncSender<Command>,
    wake: Arc<Wake>,
    max_backlog: u32,
}

impl Listener {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next established connection, if one waits.
    pub fn try_accept(&self) -> Option<Connection> {
        self.ready.pop()
    }

    /// Grows the backlog to `backlog` (clamped to `max_backlog`; a
    /// smaller one changes nothing), as a second `listen(2)` with a larger
    /// backlog does: the pool is topped up by the thread. Never blocks.
    pub fn grow_backlog(&self, backlog: u32) -> Result<(), Error> {
        let backlog = backlog.clamp(1, self.max_backlog) as usize;
        self.ready.grow(backlog);
        let c = Command::Backlog {
            port: self.port,
            backlog,
            ready: self.ready.clone(),
        };
        send(&self.commands, &self.wake, c)
    }

    /// Closes the port now (as dropping the listener does) while others
    /// may still hold it: no connection is accepted from here on, those
    /// not yet accepted are closed, and the port is free for a new
    /// `listen`.
    pub fn close(&self) {
        self.ready.close();
    }

    /// Whether [`Listener::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.ready.is_closed()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.ready.close();
    }
}

impl AsFd for Listener {
    /// Readable while a connection waits.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }
}

/// An outbound connect under way; abandoned when dropped.
pub struct Connecting {
    outcome: Arc<Mailbox<Outcome>>,
}

impl Connecting {
    /// The outcome once known: the connection, or the errno the kernel
    /// would give (ECONNREFUSED, ETIMEDOUT, ENOBUFS at the socket limit,
    /// EADDRNOTAVAIL with no ephemeral port free).
    pub fn try_result(&self) -> Option<Result<Connection, std::io::Error>> {
        let r = self.outcome.pop()?;
        Some(r.map_err(std::io::Error::from_raw_os_error))
    }
}

/// For tokio's `AsyncFd`, which asks `AsRawFd`.
impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl AsRawFd for Connecting {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        self.outcome.close();
    }
}

impl AsFd for Connecting {
    /// Readable once the outcome is known.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.outcome.as_fd()
    }
}
