//! Seeing a socket's last close without holding it: each socket watched is
//! registered in an epoll instance that is never waited on. The kernel
//! drops a registration when the last reference to the socket goes (a close
//! in every process, no `SCM_RIGHTS` message in flight), and the instance's
//! `fdinfo` lists the inodes still registered. Nothing is held that would
//! hide the program's close. `close` is not trapped (the data path never
//! goes through seccomp), so this is how the supervisor learns of it.

use crate::vsock::Inode;
use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The epoll instance the watched sockets are registered in.
#[derive(Debug)]
pub(crate) struct Watch {
    /// `None` if the kernel would not make one: then nothing is watched.
    epoll: Option<OwnedFd>,
}

impl Watch {
    pub(crate) fn new() -> Self {
        // SAFETY: epoll_create1 has no memory arguments; a non-negative
        // result is a new descriptor owned here.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let epoll = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        Watch { epoll }
    }

    /// Watches `sock` (inode `ino`); whether it is watched. The caller may
    /// close its descriptor at once.
    pub(crate) fn add(&self, sock: BorrowedFd<'_>, ino: Inode) -> bool {
        let Some(ep) = &self.epoll else { return false };
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
        r == 0
    }

    /// The inodes of the watched sockets still open somewhere (`None` if
    /// the kernel would not say).
    pub(crate) fn open(&self) -> Option<HashSet<Inode>> {
        let ep = self.epoll.as_ref()?;
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", ep.as_raw_fd())).ok()?;
        Some(parse_fdinfo(&text))
    }
}

/// The inodes of an epoll instance's `fdinfo` (`tfd: … ino:HEX sdev:…` per
/// registration).
fn parse_fdinfo(text: &str) -> HashSet<Inode> {
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
    use crate::supervisor::objects::inode_of;
    use std::os::fd::AsFd;

    #[test]
    fn a_socket_is_open_until_its_last_reference_closes() {
        let _forks = crate::maker::fork_lock();
        let w = Watch::new();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = inode_of(&l).unwrap();
        assert!(w.add(l.as_fd(), ino));
        assert!(w.open().unwrap().contains(&ino));
        let other = l.try_clone().unwrap();
        drop(l);
        assert!(w.open().unwrap().contains(&ino), "a duplicate holds it");
        drop(other);
        assert!(!w.open().unwrap().contains(&ino), "closed everywhere");
    }

    #[test]
    fn fdinfo_lines_give_the_registered_inodes() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        5 events:       19 data:                0  pos:0 ino:1b2a sdev:8\n\
                    tfd:        7 events:        0 data:               2a  pos:0 ino:ff sdev:8\n";
        assert_eq!(parse_fdinfo(text), HashSet::from([0x1b2a, 0xff]));
    }
}
