//! The supervisor: services the target's trapped socket syscalls with the
//! SAPS paper's Figure 3 request/wait protocol against the io-server.
//!
//! One thread receives notifications and answers what it can at once
//! (`socket`, `getsockname`, `setsockopt`, a ready `accept` …). Calls that
//! wait for the io-server (`bind`, `listen`, `connect`, a blocking `accept`)
//! become tasks on the tokio runtime that answer when done, so one process
//! waiting never holds up another. The data path never comes here: it is
//! relayed between the kernel sockets inside the target and the fabric by
//! `Endpoint::relay_unix` (`relay.rs`).
//!
//! This file only receives a notification and dispatches it to its
//! handler. The rest, by file:
//!
//! * `socket.rs` — socket, bind, listen, shutdown; making a socket native.
//! * `connect.rs` — blocking and non-blocking connect.
//! * `accept.rs` — accept/accept4.
//! * `sockopt.rs` — set/getsockopt, getsockname, getpeername.
//! * `sendto.rs` — sendto with an address.
//! * `listeners.rs` — the listener table: every listener's state, its
//!   ready queue and markers, connections waiting for a listener, under
//!   one lock, tested without seccomp.
//! * `arrival.rs` — the table's driver: where a connection from the
//!   io-server goes, and what is done outside the table's lock.
//! * `events.rs` — the io-server's callbacks, the listener sweep, rejoin.
//! * `call.rs` — one call being serviced, and the helpers handlers use on
//!   it; `answer.rs` — answering and tracing it.
//! * `state.rs` — [`SupervisorState`](state::SupervisorState), the state
//!   shared by every call and task; `restart.rs` (bind/listen restarted
//!   after a signal), `pidfds.rs` (the pidfd cache) own their parts of it.
//! * `relay.rs` — relaying a connection; `objects.rs` — the sockets the
//!   supervisor makes for the program; `markers.rs` — the marker bytes.
//! * `trace.rs` — the records given to a tracer; `config.rs` — options.
//! * `locks.rs` — the locks and their one order.

mod accept;
mod answer;
mod arrival;
mod call;
mod config;
mod connect;
mod events;
mod listeners;
mod locks;
mod loopback;
mod markers;
mod objects;
mod pidfds;
mod placeholders;
mod relay;
mod reserve;
mod restart;
mod sendto;
mod socket;
mod sockopt;
mod state;
mod trace;
mod watch;

pub use config::{Loopback, SupervisorConfig};
pub use trace::{CallRecord, Detail, Note, Tracer};

use crate::notify::{Notification, Notifier, Reply};
use call::{Call, Outcome};
use saps_fabric::endpoint::{Endpoint, EndpointEvent};
use state::SupervisorState;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

/// The node's supervisor, shared by every process of the target.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<SupervisorState>,
}

impl Supervisor {
    /// A supervisor answering notifications from `notifier`, talking to the
    /// io-server through `endpoint`. The endpoint's events must be fed to
    /// [`Supervisor::serve_events`].
    pub fn new(
        notifier: Notifier,
        endpoint: Endpoint,
        rt: tokio::runtime::Handle,
        config: SupervisorConfig,
    ) -> Self {
        Supervisor {
            shared: Arc::new(SupervisorState::new(notifier, endpoint, rt, config)),
        }
    }

    /// Number of live virtual sockets (for status and tests).
    pub fn virtual_sockets(&self) -> usize {
        self.shared.table().len()
    }

    /// Services notifications until `stop` becomes readable (e.g. the
    /// target's pidfd when it exits). The thread blocks in the listener's
    /// receive ioctl (so the kernel's synchronous wake-up applies); a helper
    /// thread watching `stop` interrupts it with a signal.
    pub fn run(&self, stop: BorrowedFd<'_>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = match stop.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the program");
                return;
            }
        };
        if let Err(e) = crate::sys::install_wakeup_handler() {
            tracing::error!(error = %e, "cannot install the supervisor's wake-up signal");
            return;
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let left = Arc::new(AtomicBool::new(false));
        let me = crate::sys::current_thread();
        let waker = {
            let (stopping, left) = (stopping.clone(), left.clone());
            std::thread::spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                loop {
                    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        _ => break,
                    }
                }
                stopping.store(true, Ordering::Release);
                // The signal may land just before the ioctl is entered:
                // repeat until the supervisor thread has left (bounded).
                for _ in 0..10_000 {
                    if left.load(Ordering::Acquire) {
                        return;
                    }
                    crate::sys::wake_thread(me);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        while !stopping.load(Ordering::Acquire) {
            match self.shared.notifier.recv_interruptible() {
                Ok(n) => self.handle(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The call was interrupted or its process died.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    tracing::error!(error = %e, "receiving a seccomp notification failed");
                    break;
                }
            }
        }
        left.store(true, Ordering::Release);
        let _ = waker.join();
    }

    /// Handles the io-server's callbacks for this node: connections accepted
    /// for our listeners are delivered to the listener's `L`.
    pub async fn serve_events(self, events: tokio::sync::mpsc::UnboundedReceiver<EndpointEvent>) {
        events::serve(self.shared, events).await
    }

    /// The node joined the io-server again over `endpoint` (after the old
    /// channel closed): connections of the old channel are gone, and every
    /// listener the program still holds is registered again, so the
    /// program's listening sockets keep working across an io-server restart.
    pub async fn rejoin(&self, endpoint: Endpoint) {
        events::rejoin(&self.shared, endpoint).await
    }

    /// Takes the TCP sockets a same-host io-server hands over (zero-relay)
    /// and queues each on its listener's `L` like a relayed connection.
    pub async fn serve_handoffs(self, rx: saps_fabric::handoff::HandoffReceiver) {
        events::serve_handoffs(self.shared, rx).await
    }

    /// Dispatches one notification to its handler.
    fn handle(&self, n: Notification) {
        let mut call = Call::new(n);
        let sh = &self.shared;
        let outcome = match call.n.nr as i64 {
            libc::SYS_socket => socket::socket(sh, &mut call),
            libc::SYS_bind => socket::bind(sh, &mut call),
            libc::SYS_listen if sh.config.native_sockets => socket::listen_native(sh, &mut call),
            libc::SYS_listen => socket::listen(sh, &mut call),
            libc::SYS_shutdown => socket::shutdown(sh, &mut call),
            libc::SYS_connect => connect::connect(sh, &mut call),
            libc::SYS_accept => accept::accept(sh, &mut call, 0),
            libc::SYS_accept4 => {
                let flags = call.arg(3) as i32;
                accept::accept(sh, &mut call, flags)
            }
            libc::SYS_setsockopt => sockopt::setsockopt(sh, &mut call),
            libc::SYS_getsockopt => sockopt::getsockopt(sh, &mut call),
            libc::SYS_getsockname => sockopt::getname(sh, &mut call, false),
            libc::SYS_getpeername => sockopt::getname(sh, &mut call, true),
            libc::SYS_sendto => sendto::sendto(sh, &mut call),
            _ => Outcome::Reply(Reply::Continue),
        };
        answer::finish(sh, call, outcome);
    }
}
