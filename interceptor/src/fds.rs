//! The target's file descriptors, seen from the supervisor (DESIGN.md
//! "Virtual TCP sockets", *Identity*): a virtual socket is known by the inode
//! of its kernel object, which survives `dup`, `fork`, `exec` and SCM_RIGHTS.
//!
//! All of these read `/proc/PID/...` or use a pidfd, so the TOCTOU rule of
//! [`crate::memory`] applies: check `Notifier::id_valid` afterwards.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use crate::sys;

/// The socket inode behind the target's `fd`, or `None` if that fd is not a
/// socket. `NotFound` if the process has no such fd (or no longer exists).
pub fn socket_inode(pid: u32, fd: RawFd) -> io::Result<Option<u64>> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))?;
    Ok(parse_socket_link(&link.to_string_lossy()))
}

/// Like [`socket_inode`], through a pidfd of the process (`pidfd_getfd` and
/// `fstat` cost about half of the `/proc` path walk); also returns the
/// duplicate it took, for the caller to reuse.
pub fn socket_dup_inode(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<(OwnedFd, Option<u64>)> {
    let dup = get_fd(pidfd, fd)?;
    let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&dup))?;
    let ino = (st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(st.st_ino);
    Ok((dup, ino))
}

/// `socket:[12345]` → `Some(12345)`.
fn parse_socket_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A pidfd for `pid` (a process of the target tree), for [`get_fd`].
/// Notifications carry thread ids; a thread that is not its process's
/// leader is opened through its thread group id.
pub fn open_pidfd(pid: u32) -> io::Result<OwnedFd> {
    let as_pid =
        |p: u32| libc::pid_t::try_from(p).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH));
    match sys::pidfd_open(as_pid(pid)?) {
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOENT) =>
        {
            sys::pidfd_open(as_pid(thread_group(pid)?)?)
        }
        r => r,
    }
}

/// The thread group (process) id of thread `tid`.
pub fn thread_group(tid: u32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

/// A duplicate of the target's `fd` (`pidfd_getfd`). Keep it no longer than
/// one syscall's handling: a duplicate hides the target's `close`.
pub fn get_fd(pidfd: BorrowedFd<'_>, fd: RawFd) -> io::Result<OwnedFd> {
    sys::pidfd_getfd(pidfd, fd)
}

/// The file status flags of the target's `fd` (`O_NONBLOCK`, `O_RDWR`, …,
/// plus `O_CLOEXEC` when close-on-exec is set), from `/proc/PID/fdinfo/N`.
pub fn fd_flags(pid: u32, fd: RawFd) -> io::Result<i32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    parse_fdinfo_flags(&info)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no flags: line in fdinfo"))
}

/// Whether the target's `fd` is close-on-exec.
pub fn fd_cloexec(pid: u32, fd: RawFd) -> io::Result<bool> {
    Ok(fd_flags(pid, fd)? & libc::O_CLOEXEC != 0)
}

/// The octal `flags:` field of an fdinfo file.
fn parse_fdinfo_flags(info: &str) -> Option<i32> {
    let value = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    i32::from_str_radix(value.trim(), 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn parses_socket_links_and_rejects_others() {
        assert_eq!(parse_socket_link("socket:[4026532]"), Some(4026532));
        assert_eq!(parse_socket_link("pipe:[12]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
        assert_eq!(parse_socket_link("socket:[x]"), None);
    }

    #[test]
    fn parses_fdinfo_flags_in_octal() {
        let info = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t77\n";
        assert_eq!(parse_fdinfo_flags(info), Some(0o2004002));
        assert_eq!(parse_fdinfo_flags("pos:\t0\n"), None);
    }

    #[test]
    fn own_fds_report_inode_and_flags() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let me = std::process::id();
        let ino = socket_inode(me, a.as_raw_fd()).unwrap().expect("a socket");
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", a.as_raw_fd())).unwrap();
        assert_eq!(ino, std::os::unix::fs::MetadataExt::ino(&meta));
        assert_ne!(fd_flags(me, a.as_raw_fd()).unwrap() & libc::O_NONBLOCK, 0);
        assert!(
            fd_cloexec(me, a.as_raw_fd()).unwrap(),
            "std opens sockets CLOEXEC"
        );
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(socket_inode(me, file.as_raw_fd()).unwrap(), None);
        assert_eq!(
            socket_inode(me, 100_000).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
