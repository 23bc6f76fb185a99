//! A `bind` or `listen` made again after a signal joins the first.
//!
//! A trapped call waiting for the io-server is interrupted by a signal like
//! any sleeping syscall: the kernel drops the notification and, under
//! `SA_RESTART` (or when the handler returns and the program retries, as
//! Python does), makes the same call again with a new notification. The
//! first request is still in effect at the io-server, so doing the call
//! again would bind twice (`EADDRINUSE`). Instead the supervisor remembers,
//! per socket, the call in flight ([`Op`]): the same call on the same
//! socket with the same arguments, while the first one's notification is
//! gone, takes over its result. A call that finished after its caller left
//! keeps the result for the restart.
//!
//! (`connect` needs none of this: like the kernel's, a virtual socket is
//! `Connecting` from the first call on, and a later `connect` waits for,
//! or reports, that same connection.)

use super::locks::{Rank, Ranked};
use crate::notify::{Notifier, Reply};
use crate::vsock::{Inode, VirtualSocket};
use saps_fabric::ConnId;
use std::collections::HashMap;
use tokio::sync::watch;

/// What a `bind` or `listen` came to at the io-server.
#[derive(Debug, Clone)]
pub(crate) enum Done {
    /// The answer (bind, or a failed listen).
    Reply(Reply),
    /// The io-server listens: the listener `L` is still to be put over the
    /// program's fd, with whichever notification answers the call.
    Listening {
        conn: ConnId,
        backlog: u32,
        nonblock: bool,
        vs: VirtualSocket,
    },
}

/// A `bind`/`listen` in flight on one socket.
#[derive(Debug)]
pub(crate) struct Op {
    nr: i64,
    /// The arguments that make it the same call again.
    key: Vec<u8>,
    /// The notification that answers it now.
    id: u64,
    done: Option<Done>,
    tx: watch::Sender<bool>,
}

/// How a call on a socket with an op starts.
pub(crate) enum Begin {
    /// A new call: do it (registered as the op of its socket).
    New,
    /// Another thread makes the same call at the same time: do it without
    /// an op, as the kernel would serialise the two.
    Unregistered,
    /// The same call again, already answered by the io-server.
    Done(Done),
    /// The same call again, still in flight: wait for this.
    Join(watch::Receiver<bool>),
}

/// The `bind`/`listen` calls waiting for the io-server, by socket, so
/// that the same call made again after a signal joins the first instead
/// of repeating it.
pub(crate) struct OpTable {
    by_socket: Ranked<HashMap<Inode, Op>>,
}

impl OpTable {
    pub(crate) fn new() -> Self {
        OpTable {
            by_socket: Ranked::default_with(Rank::Ops),
        }
    }

    /// Registers call `id` (syscall `nr` with `key`) on socket `ino`, or
    /// finds the call it repeats (`notifier` tells whether the first
    /// call's caller still waits).
    pub(crate) fn begin(
        &self,
        notifier: &Notifier,
        (nr, id): (i64, u64),
        ino: Inode,
        key: Vec<u8>,
    ) -> Begin {
        let mut ops = self.by_socket.lock();
        if let Some(op) = ops.get_mut(&ino) {
            if op.nr == nr && op.key == key {
                if op.id != id && notifier.id_valid(op.id) {
                    return Begin::Unregistered;
                }
                op.id = id;
                return match op.done.clone() {
                    Some(d) => Begin::Done(d),
                    None => Begin::Join(op.tx.subscribe()),
                };
            }
        }
        let (tx, _) = watch::channel(false);
        ops.insert(
            ino,
            Op {
                nr,
                key,
                id,
                done: None,
                tx,
            },
        );
        Begin::New
    }

    /// The first call on `ino` (notification `id`) finished with `done`.
    /// `Some`: answer it with this; `None`: a restarted call has taken it
    /// over and is told (this caller is gone).
    pub(crate) fn complete(&self, ino: Inode, id: u64, done: Done) -> Option<Done> {
        let mut ops = self.by_socket.lock();
        let Some(op) = ops.get_mut(&ino) else {
            return Some(done);
        };
        op.done = Some(done.clone());
        if op.id == id {
            return Some(done);
        }
        op.tx.send_replace(true);
        None
    }

    /// The result a joined call waited for, once its first call finished.
    pub(crate) fn result(&self, ino: Inode) -> Option<Done> {
        self.by_socket
            .lock()
            .get(&ino)
            .and_then(|op| op.done.clone())
    }

    /// The op of `ino`, taken out while notification `id` is answered: the
    /// program may make its next call on the socket as soon as the answer
    /// lands, and must not find this one still in flight.
    pub(crate) fn take(&self, ino: Inode, id: u64) -> Option<Op> {
        let mut ops = self.by_socket.lock();
        if ops.get(&ino).is_some_and(|op| op.id == id) {
            return ops.remove(&ino);
        }
        None
    }

    /// The answer did not reach its caller (a signal came first): the op
    /// stays for the restarted call.
    pub(crate) fn put_back(&self, ino: Inode, op: Op) {
        self.by_socket.lock().entry(ino).or_insert(op);
    }

    /// Forgets the op of socket `ino` (it changed object, or is gone).
    pub(crate) fn forget(&self, ino: Inode) {
        self.by_socket.lock().remove(&ino);
    }
}
