//! The program's unconnected virtual sockets: the placeholders the
//! supervisor puts in its fd table at `socket` (and at a disconnect), and
//! which of them the program has closed.
//!
//! A placeholder is a TCP socket of the socket's family made in a network
//! namespace with no interface (`crate::maker`), so the calls that are not
//! trapped on it (data calls, `poll`, ioctls, `shutdown`) answer as on the
//! kernel's TCP socket never connected. Where no such namespace can be
//! made (no user namespaces for this user, no privilege), it is an AF_UNIX
//! stream socket, whose answers differ (docs/interceptor.md,
//! "Departures" 2). Each is watched (`watch.rs`) until the program closes
//! it everywhere, so that what it held at the io-server can go.

use super::objects::{inode_of, set_nonblocking, unix_socket};
use super::watch::Watch;
use crate::maker::{SocketMaker, BATCH_MAX};
use crate::vsock::Inode;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Sockets asked of the maker at a time, per family and protocol: one
/// round trip to the maker per this many `socket` calls.
const BATCH: usize = 16;

/// Most placeholders watched: beyond it a new one is not watched, and the
/// program's close of it is not seen (what it holds at the io-server stays
/// until the program exits).
const MAX_WATCHED: usize = 65_536;

/// The placeholders' source and the ones still open.
#[derive(Debug)]
pub(crate) struct Placeholders {
    /// `None`: AF_UNIX placeholders.
    maker: Option<Arc<SocketMaker>>,
    /// Sockets made ahead, by (family, protocol).
    pools: HashMap<(i32, i32), Vec<OwnedFd>>,
    watch: Watch,
    /// The inodes registered in `watch` (only those can be seen closed),
    /// and whether each is a TCP placeholder.
    watched: HashMap<Inode, bool>,
}

impl Placeholders {
    pub(crate) fn new(maker: Option<Arc<SocketMaker>>) -> Self {
        Placeholders {
            maker,
            pools: HashMap::new(),
            watch: Watch::new(),
            watched: HashMap::new(),
        }
    }

    /// Whether the placeholder with inode `ino` is a TCP socket (else an
    /// AF_UNIX one, or one not watched).
    pub(crate) fn is_tcp(&self, ino: Inode) -> bool {
        self.watched.get(&ino).copied().unwrap_or(false)
    }

    /// A new placeholder for a socket of `domain` and `protocol`, and its
    /// inode (the socket's key in the table), watched for its close.
    pub(crate) fn make(
        &mut self,
        domain: i32,
        protocol: i32,
        nonblock: bool,
    ) -> Result<(OwnedFd, Inode), i32> {
        let (fd, tcp) = match self.pooled(domain, protocol) {
            Some(fd) => {
                if nonblock {
                    set_nonblocking(&fd, true).map_err(|e| e as i32)?;
                }
                (fd, true)
            }
            None => (unix_socket(nonblock)?, false),
        };
        let ino = inode_of(&fd)?;
        if self.watched.len() < MAX_WATCHED && self.watch.add(fd.as_fd(), ino) {
            self.watched.insert(ino, tcp);
        }
        Ok((fd, ino))
    }

    fn pooled(&mut self, domain: i32, protocol: i32) -> Option<OwnedFd> {
        let maker = self.maker.clone()?;
        let pool = self.pools.entry((domain, protocol)).or_default();
        if pool.is_empty() {
            match maker.make(domain, protocol, BATCH.min(BATCH_MAX)) {
                Ok(fds) => pool.extend(fds),
                Err(e) => {
                    // A family or protocol the maker's namespace lacks: an
                    // AF_UNIX placeholder for this one.
                    tracing::debug!(domain, protocol, error = %e, "no TCP placeholder");
                    return None;
                }
            }
        }
        pool.pop()
    }

    /// Which of `candidates` the program has closed everywhere, forgotten
    /// here. With `all` (the candidates are every placeholder the table
    /// still has), every other one not open either is forgotten too: a
    /// socket that connected or listened, whose placeholder went.
    pub(crate) fn closed(&mut self, candidates: &[Inode], all: bool) -> Vec<Inode> {
        let Some(open) = self.watch.open() else {
            return Vec::new();
        };
        let gone: Vec<Inode> = candidates
            .iter()
            .copied()
            .filter(|ino| self.watched.contains_key(ino) && !open.contains(ino))
            .collect();
        for ino in &gone {
            self.watched.remove(ino);
        }
        if all {
            let kept: std::collections::HashSet<Inode> = candidates.iter().copied().collect();
            self.watched
                .retain(|ino, _| open.contains(ino) || kept.contains(ino));
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_placeholder_is_seen_closed_once_every_copy_is() {
        let _forks = crate::maker::fork_lock();
        let maker = SocketMaker::start().ok().map(Arc::new);
        let mut p = Placeholders::new(maker);
        let (a, ia) = p.make(libc::AF_INET, libc::IPPROTO_TCP, false).unwrap();
        let (b, ib) = p.make(libc::AF_INET6, libc::IPPROTO_TCP, true).unwrap();
        assert!(p.closed(&[ia, ib], true).is_empty());
        let copy = a.try_clone().unwrap();
        drop(a);
        assert!(
            p.closed(&[ia, ib], true).is_empty(),
            "a copy still holds it"
        );
        drop(copy);
        assert_eq!(p.closed(&[ia, ib], true), vec![ia]);
        assert!(
            p.closed(&[ia], true).is_empty(),
            "forgotten once seen closed"
        );
        drop(b);
        assert_eq!(p.closed(&[ib], true), vec![ib]);
    }

    #[test]
    fn a_sweep_of_some_keeps_the_others_for_their_own_sweep() {
        let _forks = crate::maker::fork_lock();
        let mut p = Placeholders::new(None);
        let (a, ia) = p.make(libc::AF_INET, libc::IPPROTO_TCP, false).unwrap();
        let (b, ib) = p.make(libc::AF_INET, libc::IPPROTO_TCP, false).unwrap();
        drop((a, b));
        // A bind's sweep looks at the sockets of its port only.
        assert_eq!(p.closed(&[ia], false), vec![ia]);
        assert_eq!(p.closed(&[ib], false), vec![ib], "not forgotten meanwhile");
        // One that left the table (it connected) goes at a full sweep.
        let (c, ic) = p.make(libc::AF_INET, libc::IPPROTO_TCP, false).unwrap();
        drop(c);
        assert!(p.closed(&[], true).is_empty());
        assert!(p.closed(&[ic], false).is_empty(), "forgotten");
    }
}
