//! Whether an AF_UNIX socket object still exists, asked of the kernel with
//! `sock_diag` (`NETLINK_SOCK_DIAG`, `unix_diag`'s exact lookup by inode).
//!
//! `close` is not trapped, so the supervisor cannot see the program close a
//! virtual socket that is still its AF_UNIX placeholder (after `socket` or
//! `bind`). The object exists exactly as long as some process holds it (an
//! fd, a duplicate in flight in an `SCM_RIGHTS` message): once the kernel
//! no longer finds its inode, the program has closed it everywhere, and
//! what it held at the io-server (a bound port) can go.

use nix::sys::socket::{self as so, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;

/// A `NETLINK_SOCK_DIAG` socket, reused for every question.
#[derive(Debug)]
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    pub fn new() -> io::Result<Self> {
        let fd = so::socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        Ok(SockDiag { fd, seq: 0 })
    }

    /// Whether the AF_UNIX socket with inode `ino` exists (in this network
    /// namespace: the program's, where the supervisor made it).
    pub fn unix_exists(&mut self, ino: u64) -> io::Result<bool> {
        let Ok(ino) = u32::try_from(ino) else {
            // Socket inodes are 32-bit (get_next_ino); never ours.
            return Ok(false);
        };
        self.seq = self.seq.wrapping_add(1);
        let req = request(self.seq, ino);
        so::sendto(
            self.fd.as_raw_fd(),
            &req,
            &NetlinkAddr::new(0, 0),
            so::MsgFlags::empty(),
        )?;
        let mut buf = [0u8; 4096];
        loop {
            let n = so::recv(self.fd.as_raw_fd(), &mut buf, so::MsgFlags::empty())?;
            match answer(&buf[..n], self.seq) {
                Some(r) => return r,
                // An answer to an earlier question (one that failed half
                // way): skip it.
                None => continue,
            }
        }
    }
}

/// `nlmsghdr` + `unix_diag_req` asking for socket `ino` exactly.
fn request(seq: u32, ino: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes()); // nlmsg_flags
    m.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    m.push(libc::AF_UNIX as u8); // sdiag_family
    m.push(0); // sdiag_protocol
    m.extend_from_slice(&0u16.to_ne_bytes()); // pad
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: any
    m.extend_from_slice(&ino.to_ne_bytes()); // udiag_ino
    m.extend_from_slice(&0u32.to_ne_bytes()); // udiag_show
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_cookie: none
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m
}

/// The answer to question `seq` in one datagram: `Some(Ok(true))` for a
/// `unix_diag_msg`, `Some(Ok(false))` for `ENOENT`, another error as is;
/// `None` for a datagram that answers something else.
fn answer(msg: &[u8], seq: u32) -> Option<io::Result<bool>> {
    if msg.len() < 16 {
        return Some(Err(io::Error::from_raw_os_error(libc::EPROTO)));
    }
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    let got = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
    if got != seq {
        return None;
    }
    if ty != NLMSG_ERROR {
        return Some(Ok(true));
    }
    let errno = msg.get(16..20).map_or(libc::EPROTO, |e| {
        -i32::from_ne_bytes([e[0], e[1], e[2], e[3]])
    });
    Some(match errno {
        0 => Ok(true),
        libc::ENOENT => Ok(false),
        e => Err(io::Error::from_raw_os_error(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn inode(fd: impl AsFd) -> u64 {
        nix::sys::stat::fstat(fd.as_fd().as_raw_fd())
            .unwrap()
            .st_ino
    }

    #[test]
    fn a_socket_exists_until_its_last_holder_closes_it() {
        let mut d = SockDiag::new().unwrap();
        let s = so::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let ino = inode(&s);
        assert!(d.unix_exists(ino).unwrap());
        let dup = s.try_clone().unwrap();
        drop(s);
        assert!(d.unix_exists(ino).unwrap(), "a duplicate keeps it");
        drop(dup);
        assert!(!d.unix_exists(ino).unwrap(), "closed everywhere");
    }

    #[test]
    fn both_ends_of_a_pair_are_found() {
        let mut d = SockDiag::new().unwrap();
        let (a, b) = so::socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        assert!(d.unix_exists(inode(&a)).unwrap());
        assert!(d.unix_exists(inode(&b)).unwrap());
        assert!(!d.unix_exists(u64::from(u32::MAX) + 7).unwrap());
    }
}
