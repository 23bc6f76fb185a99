//! The node's own loopback sockets: those the supervisor made real for a
//! loopback `bind` that stays on the node (`--loopback local`), watched
//! for their close without holding them (`watch.rs`).
//!
//! A virtual wildcard bind of a port takes the node's loopback addresses
//! too, so the kernel would refuse it while one of the program's loopback
//! sockets holds the port. Asking the kernel with a scratch socket
//! ([`super::socket`]) is right only while such a socket exists: an
//! io-server on the same host, listening on the wildcard or a loopback
//! address, holds the port as well, and the program must not see it.

use super::watch::Watch;
use crate::vsock::Inode;
use std::os::fd::BorrowedFd;

/// One loopback socket the supervisor made.
#[derive(Debug)]
struct Held {
    ino: Inode,
    port: u16,
}

/// The node's loopback sockets still open, by port.
#[derive(Debug)]
pub(crate) struct LoopbackBinds {
    watch: Watch,
    held: Vec<Held>,
}

/// Most sockets remembered: the oldest are forgotten beyond it (a
/// forgotten one no longer makes a wildcard bind of its port fail).
const MAX_HELD: usize = 4096;

impl LoopbackBinds {
    pub(crate) fn new() -> Self {
        LoopbackBinds {
            watch: Watch::new(),
            held: Vec::new(),
        }
    }

    /// Remembers `sock` (inode `ino`), bound to a loopback address on
    /// `port`. The caller may close its descriptor at once.
    pub(crate) fn add(&mut self, sock: BorrowedFd<'_>, ino: Inode, port: u16) {
        if self.held.len() >= MAX_HELD {
            self.held.remove(0);
        }
        if self.watch.add(sock, ino) {
            self.held.push(Held { ino, port });
        }
    }

    /// Whether a loopback socket the supervisor made on `port` is still
    /// open somewhere; forgets those closed everywhere.
    pub(crate) fn holds(&mut self, port: u16) -> bool {
        if !self.held.iter().any(|h| h.port == port) {
            return false;
        }
        let Some(open) = self.watch.open() else {
            return false;
        };
        self.held.retain(|h| open.contains(&h.ino));
        self.held.iter().any(|h| h.port == port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::objects::inode_of;
    use std::os::fd::AsFd;

    /// Held by port, forgotten at the last close (what a close is:
    /// `watch.rs`'s test).
    #[test]
    fn a_socket_holds_its_port_until_it_is_closed() {
        let _forks = crate::maker::fork_lock();
        let mut b = LoopbackBinds::new();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        b.add(l.as_fd(), inode_of(&l).unwrap(), port);
        assert!(b.holds(port));
        assert!(!b.holds(port.wrapping_add(1)));
        drop(l);
        assert!(!b.holds(port));
        assert!(b.held.is_empty());
    }
}
