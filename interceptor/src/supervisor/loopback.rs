//! The node's own loopback sockets: those the supervisor made real for a
//! loopback `bind` that stays on the node (`--loopback local`), watched
//! for their close without holding them.
//!
//! A virtual wildcard bind of a port takes the node's loopback addresses
//! too, so the kernel would refuse it while one of the program's loopback
//! sockets holds the port. Asking the kernel with a scratch socket
//! ([`super::socket`]) is right only while such a socket exists: an
//! io-server on the same host, listening on the wildcard or a loopback
//! address, holds the port as well, and the program must not see it. So
//! the supervisor remembers the sockets it made, each registered in an
//! epoll instance of its own that is never waited on: the kernel drops a
//! registration when the last reference to the socket goes (a close in
//! every process, no message in flight), and the instance's `fdinfo`
//! lists the inodes still registered. Nothing is held that would hide the
//! program's close.

use crate::vsock::Inode;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// One loopback socket the supervisor made.
#[derive(Debug)]
struct Held {
    ino: Inode,
    port: u16,
}

/// The node's loopback sockets still open, by port.
#[derive(Debug)]
pub(crate) struct LoopbackBinds {
    /// The epoll instance they are registered in (`None` if the kernel
    /// would not make one: then none is remembered).
    epoll: Option<OwnedFd>,
    held: Vec<Held>,
}

/// Most sockets remembered: the oldest are forgotten beyond it (a
/// forgotten one no longer makes a wildcard bind of its port fail).
const MAX_HELD: usize = 4096;

impl LoopbackBinds {
    pub(crate) fn new() -> Self {
        // SAFETY: epoll_create1 has no memory arguments; a non-negative
        // result is a new descriptor owned here.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let epoll = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        LoopbackBinds {
            epoll,
            held: Vec::new(),
        }
    }

    /// Remembers `sock` (inode `ino`), bound to a loopback address on
    /// `port`. The caller may close its descriptor at once.
    pub(crate) fn add(&mut self, sock: BorrowedFd<'_>, ino: Inode, port: u16) {
        let Some(ep) = &self.epoll else { return };
        if self.held.len() >= MAX_HELD {
            self.held.remove(0);
        }
        let mut ev = libc::epoll_event {
            events: 0,
            u64: ino,
        };
        // SAFETY: both descriptors are open; `ev` lives across the call.
        let r = unsafe {
            libc::epoll_ctl(
                ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                sock.as_raw_fd(),
                &mut ev,
            )
        };
        if r == 0 {
            self.held.push(Held { ino, port });
        }
    }

    /// Whether a loopback socket the supervisor made on `port` is still
    /// open somewhere; forgets those closed everywhere.
    pub(crate) fn holds(&mut self, port: u16) -> bool {
        if !self.held.iter().any(|h| h.port == port) {
            return false;
        }
        let Some(ep) = &self.epoll else { return false };
        let Some(open) = registered(ep.as_raw_fd()) else {
            return false;
        };
        self.held.retain(|h| open.contains(&h.ino));
        self.held.iter().any(|h| h.port == port)
    }
}

/// The inodes registered in epoll instance `fd`, from its `fdinfo`
/// (`tfd: … ino:HEX sdev:…` per registration).
fn registered(fd: i32) -> Option<Vec<Inode>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    Some(parse_fdinfo(&text))
}

fn parse_fdinfo(text: &str) -> Vec<Inode> {
    text.lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let hex = l.split_whitespace().find_map(|w| w.strip_prefix("ino:"))?;
            u64::from_str_radix(hex, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    fn inode(l: &std::net::TcpListener) -> Inode {
        let path = format!("/proc/self/fd/{}", l.as_raw_fd());
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn a_socket_is_held_until_its_last_reference_closes() {
        let mut b = LoopbackBinds::new();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        b.add(l.as_fd(), inode(&l), port);
        assert!(b.holds(port));
        assert!(!b.holds(port.wrapping_add(1)));
        let other = l.try_clone().unwrap();
        drop(l);
        assert!(b.holds(port), "a duplicate still holds it");
        drop(other);
        assert!(!b.holds(port), "closed everywhere");
        assert!(b.held.is_empty());
    }

    #[test]
    fn fdinfo_lines_give_the_registered_inodes() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        5 events:       19 data:                0  pos:0 ino:1b2a sdev:8\n\
                    tfd:        7 events:        0 data:               2a  pos:0 ino:ff sdev:8\n";
        assert_eq!(parse_fdinfo(text), vec![0x1b2a, 0xff]);
    }
}
