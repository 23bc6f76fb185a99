//! The bridge: one smoltcp TCP socket presented to the rest of the
//! io-server as one end of an `AF_UNIX` stream socketpair, so code that
//! works on a client's file descriptor (the relay: read/write/splice)
//! needs no change. The stack's thread copies between the smoltcp socket
//! and its end of the pair, never holding bytes of its own:
//!
//! * flow control: bytes leave smoltcp's receive buffer only as fast as
//!   the pair takes them (so when the pair is full, the TCP window
//!   closes), and the pair is read only into free room of smoltcp's send
//!   buffer;
//! * half-close both ways: end of file on the pair (the user's
//!   `shutdown(SHUT_WR)` or `close`) queues a FIN (`close()`); a FIN from
//!   the network, once its data is delivered, is `shutdown(SHUT_WR)` on
//!   the pair;
//! * reset: the user closing its end with data unread, or writing into a
//!   pair whose user end is gone, `abort()`s the connection (an RST, as
//!   the kernel sends when a socket is closed with unread data); an RST
//!   (or a smoltcp timeout) from the network closes the stack's end, so
//!   the user reads end of file after the data already delivered, then
//!   `EPIPE` on write (`ECONNRESET` if it had written bytes not yet
//!   taken). `Stats::resets` counts both.

use crate::sys;
use smoltcp::socket::tcp::{self, State};
use std::os::fd::{AsFd, OwnedFd};

/// Bytes copied by [`Bridge::pump`], for [`crate::Stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// From the network to the pair.
    pub to_pair: u64,
    /// From the pair to the network.
    pub to_net: u64,
}

/// What [`Bridge::pump`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Still open: keep the socket and the pair.
    Open,
    /// Over: remove the socket, close the pair's end. `reset`: not by an
    /// orderly exchange of FINs.
    Done { reset: bool },
}

/// One bridged connection's bookkeeping (the socket itself stays in the
/// stack's `SocketSet`).
pub struct Bridge {
    /// The stack's end of the pair.
    pub fd: OwnedFd,
    /// End of file read from the pair: FIN queued.
    pair_eof: bool,
    /// The network's FIN passed on (`SHUT_WR` on the pair).
    net_eof: bool,
    /// A FIN was seen from the network (the socket passed CloseWait or
    /// Closing): a later Closed is orderly.
    fin_seen: bool,
    /// The last write to the pair would have blocked.
    pair_full: bool,
    /// The pair may have bytes to read (set from the engine's epoll,
    /// cleared when a read would block): idle pairs cost no system call.
    pub readable: bool,
    /// The events the pair is registered for in the engine's epoll (0:
    /// not registered).
    pub armed: u32,
}

/// Why a copy stopped.
enum Stop {
    Blocked,
    Eof,
    Failed,
}

impl Bridge {
    pub fn new(fd: OwnedFd) -> Bridge {
        Bridge {
            fd,
            pair_eof: false,
            net_eof: false,
            fin_seen: false,
            pair_full: false,
            readable: true,
            armed: 0,
        }
    }

    /// The epoll events to wait for on the pair: readable while the send
    /// buffer has room, writable while a write to it blocked (0: none, the
    /// pair is then not registered at all, so that a hang-up does not wake
    /// the engine for a pair it cannot serve yet).
    pub fn interest(&self, tcp: &tcp::Socket) -> u32 {
        let mut ev = 0;
        if !self.pair_eof && tcp.can_send() {
            ev |= libc::EPOLLIN as u32;
        }
        if self.pair_full {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }

    /// Copies what can move each way without blocking and applies the
    /// half-closes and resets of the module doc.
    pub fn pump(&mut self, tcp: &mut tcp::Socket, moved: &mut Moved) -> Step {
        if matches!(
            tcp.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            self.fin_seen = true;
        }
        // Network → pair.
        self.pair_full = false;
        while tcp.can_recv() {
            let fd = self.fd.as_fd();
            let r = tcp.recv(|buf| match sys::write(fd, buf) {
                Ok(n) => (n, Ok(n)),
                Err(libc::EAGAIN) => (0, Err(Stop::Blocked)),
                Err(_) => (0, Err(Stop::Failed)),
            });
            match r {
                Ok(Ok(n)) => moved.to_pair += n as u64,
                Ok(Err(Stop::Blocked)) => {
                    self.pair_full = true;
                    break;
                }
                // The user's end is gone with data still arriving.
                Ok(Err(_)) | Err(_) => {
                    tcp.abort();
                    return Step::Done { reset: true };
                }
            }
        }
        if !self.net_eof && self.fin_seen && !tcp.can_recv() {
            sys::shutdown_write(self.fd.as_fd());
            self.net_eof = true;
        }
        // Pair → network.
        while self.readable && !self.pair_eof && tcp.can_send() {
            let fd = self.fd.as_fd();
            let r = tcp.send(|buf| match sys::read(fd, buf) {
                Ok(0) => (0, Err(Stop::Eof)),
                Ok(n) => (n, Ok(n)),
                Err(libc::EAGAIN) => (0, Err(Stop::Blocked)),
                Err(_) => (0, Err(Stop::Failed)),
            });
            match r {
                Ok(Ok(n)) => moved.to_net += n as u64,
                Ok(Err(Stop::Blocked)) => self.readable = false,
                Ok(Err(Stop::Eof)) => {
                    tcp.close();
                    self.pair_eof = true;
                }
                // ECONNRESET: the user closed its end with data unread.
                Ok(Err(Stop::Failed)) | Err(_) => {
                    tcp.abort();
                    return Step::Done { reset: true };
                }
            }
        }
        match tcp.state() {
            State::Closed => Step::Done {
                reset: !(self.fin_seen && self.pair_eof) || tcp.can_recv(),
            },
            // Everything both ways was exchanged; TIME-WAIT is not kept
            // (docs/stack.md "Bounds").
            State::TimeWait if !tcp.can_recv() => Step::Done { reset: false },
            _ => Step::Open,
        }
    }
}
