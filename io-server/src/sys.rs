//! The io-server's raw socket calls (and the monotonic clock systemd
//! reads): the one module with `unsafe`.
//!
//! Nodes' `setsockopt`/`getsockopt` carry an arbitrary level, name and value
//! (Figure 3's SetOpt/GetOpt), which no typed wrapper covers; they are passed
//! to the real TCP socket as bytes. Creating, binding and listening use `nix`.

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The errno of a failed call.
pub type Errno = i32;

/// A TCP socket bound to `addr` (not listening yet), with `SO_REUSEADDR`
/// as servers set it, so a port in TIME_WAIT can be bound again.
pub fn bound_socket(addr: SocketAddr) -> Result<std::net::TcpListener, Errno> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::socket(family, SockType::Stream, flags, None).map_err(|e| e as i32)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| e as i32)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| e as i32)?;
    Ok(std::net::TcpListener::from(fd))
}

/// `getsockname(2)` of the socket `fd` as a socket address (`None` if it
/// fails or is not an IP one).
pub fn local_addr(fd: std::os::fd::RawFd) -> Option<SocketAddr> {
    ip_addr(&socket::getsockname::<SockaddrStorage>(fd).ok()?)
}

/// An IPv4 or IPv6 socket address as the standard library's.
fn ip_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
        .or_else(|| {
            a.as_sockaddr_in6()
                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
        })
}

/// `listen(2)` on a socket from [`bound_socket`].
pub fn listen(sock: &std::net::TcpListener, backlog: u32) -> Result<(), Errno> {
    // The kernel clamps a large backlog to somaxconn; nix refuses values
    // at or above its MAXCONN, so clamp here the same way.
    let backlog =
        Backlog::new(backlog.clamp(1, i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN);
    socket::listen(sock, backlog).map_err(|e| e as i32)
}

/// `setsockopt(fd, level, name, value)` with the value as raw bytes.
pub fn setsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, value: &[u8]) -> Result<(), Errno> {
    let len = libc::socklen_t::try_from(value.len()).map_err(|_| libc::EINVAL)?;
    // SAFETY: `fd` is a live descriptor for the borrow; `value` is a valid
    // buffer of `len` bytes that the kernel only reads.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last_raw())
    }
}

/// `getsockopt(fd, level, name)` into at most `len` bytes (capped at 1 KiB).
pub fn getsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, len: u32) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len.min(1024) as usize];
    let mut n = buf.len() as libc::socklen_t;
    // SAFETY: `fd` is live; `buf` is writable for `n` bytes and the kernel
    // writes at most `n` and stores the length it wrote in `n`.
    let r =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut n) };
    if r != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `accept4(2)` of one client on a non-blocking listener: a non-blocking
/// socket and the client's address. Unlike tokio's `accept` it does not
/// register the socket with the runtime, which a socket handed to a node
/// (zero-relay) never needs.
pub fn accept(l: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: all zeroes is a valid (empty) sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` and `len` are valid for writes and `len` holds the
    // storage's size; the fd returned is new and owned by nobody else.
    let fd = unsafe {
        libc::accept4(
            l.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept4 and is owned here alone.
    let stream = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: the kernel filled `len` octets of `storage`.
    let peer = unsafe {
        <SockaddrStorage as nix::sys::socket::SockaddrLike>::from_raw(
            (&storage as *const libc::sockaddr_storage).cast(),
            Some(len),
        )
    };
    let peer = peer
        .as_ref()
        .and_then(ip_addr)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
    Ok((stream, peer))
}

/// Watches a listening socket with the runtime's reactor.
pub fn register_listener(
    l: std::net::TcpListener,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    // SAFETY: the listener moves into the `AsyncFd`, so its fd stays open
    // and names the same socket for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register(l) }.map_err(|e| e.into_parts().1)
}

/// Watches a descriptor of the smoltcp stack (a listener's or a pending
/// connect's: readable while something waits) with the runtime's reactor.
pub fn register_readable<T: std::os::fd::AsRawFd>(
    fd: T,
) -> std::io::Result<tokio::io::unix::AsyncFd<T>> {
    let readable = tokio::io::Interest::READABLE;
    // SAFETY: `fd` moves into the `AsyncFd`, so its descriptor stays open
    // and names the same eventfd for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, readable) }
        .map_err(|e| e.into_parts().1)
}

/// The soft limit on this process's descriptors (`RLIMIT_NOFILE`).
pub fn nofile_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit the kernel writes.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    ok.then_some(r.rlim_cur)
}

/// The most descriptors an upgrade's new process makes room for at once
/// ([`presize_fd_table`]).
const PRESIZE_MAX: u64 = 1 << 20;

/// Grows this process's descriptor table to its `RLIMIT_NOFILE` (at most
/// [`PRESIZE_MAX`]) while it has one thread: an upgrade's new process,
/// which is about to receive every descriptor of the running io-server.
/// The kernel grows a table by doubling it, and in a process of several
/// threads each growth waits for an RCU grace period; received as they
/// come, thousands of descriptors cost seconds of pause on a loaded host
/// (about eight bytes of table per descriptor here instead).
pub fn presize_fd_table() {
    let Some(limit) = nofile_limit() else { return };
    let Ok(top) = i32::try_from(limit.min(PRESIZE_MAX).saturating_sub(1)) else {
        return;
    };
    if top < 1024 {
        return;
    }
    // SAFETY: dup2 onto a descriptor number nothing uses (it is above
    // every one open: tables grow from the bottom) and closing it again.
    unsafe {
        if libc::fcntl(top, libc::F_GETFD) == -1 && libc::dup2(0, top) == top {
            libc::close(top);
        }
    }
}

/// `TCP_INFO` of a socket; `None` if the kernel does not give it.
fn tcp_info(fd: BorrowedFd<'_>) -> Option<libc::tcp_info> {
    // SAFETY: all zeroes is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let mut len = size;
    // SAFETY: `fd` is live; `info` is writable for `len` octets, and the
    // kernel writes at most that many and stores how many in `len`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Older kernels fill less (no tcpi_data_segs_out / tcpi_bytes_sent).
    (r == 0 && len == size).then_some(info)
}

/// The accept queue of a listening socket: connections the kernel holds
/// for `accept`, and its bound (for a listener the kernel reports them as
/// `tcpi_unacked` and `tcpi_sacked`).
pub fn accept_queue(l: &std::net::TcpListener) -> Option<(u32, u32)> {
    use std::os::fd::AsFd;
    let info = tcp_info(l.as_fd())?;
    Some((info.tcpi_unacked, info.tcpi_sacked))
}

/// Whether nobody has read from or written to the TCP socket `fd` since it
/// was accepted, nor shut it down: every octet the client sent (and its
/// FIN, if it came) is still unread in the receive queue, and nothing was
/// sent or queued. A program that accepted such a socket cannot have acted
/// on its request, so it may go to another node (issue 17: the safety net
/// under a node's `Accepted`, should its last one be lost with the node).
/// `false` where the kernel does not tell.
pub fn untouched(fd: BorrowedFd<'_>) -> bool {
    let Some(info) = tcp_info(fd) else {
        return false;
    };
    let (mut inq, mut outq): (libc::c_int, libc::c_int) = (0, 0);
    // SAFETY: SIOCINQ (FIONREAD) and SIOCOUTQ (TIOCOUTQ) write one int.
    let ok = unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut inq) == 0
            && libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) == 0
    };
    if !ok {
        return false;
    }
    untouched_by(&info, inq as u64, outq as u64)
}

/// [`untouched`]'s rule on the kernel's figures. `bytes_received` counts a
/// FIN received as one octet, which `SIOCINQ` leaves out once it came
/// (CLOSE_WAIT) until it is read.
fn untouched_by(info: &libc::tcp_info, inq: u64, outq: u64) -> bool {
    const ESTABLISHED: u8 = 1;
    const CLOSE_WAIT: u8 = 8;
    let fin = match info.tcpi_state {
        ESTABLISHED => 0,
        CLOSE_WAIT => 1,
        _ => return false, // shut down or closed by this end
    };
    let nothing_written = info.tcpi_data_segs_out == 0
        && info.tcpi_bytes_sent == 0
        && info.tcpi_notsent_bytes == 0
        && outq == 0;
    nothing_written && info.tcpi_bytes_received == inq + fin
}

/// `CLOCK_MONOTONIC` in microseconds: the clock systemd reads
/// `MONOTONIC_USEC=` against (`notify.rs`).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec into the one we pass.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(r, 0, "CLOCK_MONOTONIC is always there");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Whether a TCP connection of this host's stack on local address `addr`
/// was closed first by its end here and lingers (FIN_WAIT1, FIN_WAIT2,
/// CLOSING, TIME_WAIT), holding the port: asked of the kernel with
/// `sock_diag` (`inet_diag`, a dump of the sockets in those states, read
/// here for the address). False when the kernel cannot be asked.
pub fn closed_first_on(addr: SocketAddr) -> bool {
    match inet_diag_any(addr, CLOSED_FIRST) {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(%addr, error = e, "cannot ask the kernel for lingering connections");
            false
        }
    }
}

/// `TCPF_FIN_WAIT1 | TCPF_FIN_WAIT2 | TCPF_TIME_WAIT | TCPF_CLOSING`.
const CLOSED_FIRST: u32 = 1 << 4 | 1 << 5 | 1 << 6 | 1 << 11;

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;

/// Whether a TCP socket in one of `states` (a `TCPF_*` mask) has local
/// address `addr`.
fn inet_diag_any(addr: SocketAddr, states: u32) -> Result<bool, Errno> {
    use nix::sys::socket::{NetlinkAddr, SockProtocol};
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|e| e as i32)?;
    // Never wait long in a node's task for the kernel's answer.
    let limit = nix::sys::time::TimeVal::new(1, 0);
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &limit).map_err(|e| e as i32)?;
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // nlmsghdr, then inet_diag_req_v2 with an empty inet_diag_sockid.
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    req.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&states.to_ne_bytes());
    req.resize(72, 0);
    socket::sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        socket::MsgFlags::empty(),
    )
    .map_err(|e| e as i32)?;
    let mut buf = vec![0u8; 32 * 1024];
    let mut found = false;
    loop {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, socket::MsgFlags::empty())
            .map_err(|e| e as i32)?;
        match diag_messages(&buf[..n], addr, &mut found) {
            Some(Ok(())) => return Ok(found),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
}

/// Reads one datagram of an `inet_diag` dump, setting `found` for a
/// socket whose local address is `addr`; `Some` once the dump is done
/// (or failed), `None` while more follows.
fn diag_messages(mut msg: &[u8], addr: SocketAddr, found: &mut bool) -> Option<Result<(), Errno>> {
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    while msg.len() >= 16 {
        let len = u32::from_ne_bytes(msg[0..4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(msg[4..6].try_into().ok()?);
        if len < 16 || len > msg.len() {
            return Some(Err(libc::EPROTO));
        }
        let body = &msg[16..len];
        match ty {
            NLMSG_DONE => return Some(Ok(())),
            NLMSG_ERROR => {
                let e = body.get(..4).map_or(libc::EPROTO, |e| {
                    -i32::from_ne_bytes(e.try_into().unwrap_or_default())
                });
                return Some(if e == 0 { Ok(()) } else { Err(e) });
            }
            // inet_diag_msg: family, state, timer, retrans, then the
            // sockid: sport (big-endian), dport, src[16], …
            _ if body.len() >= 24 => {
                let port = u16::from_be_bytes([body[4], body[5]]);
                let ip: std::net::IpAddr = match addr {
                    SocketAddr::V4(_) => <[u8; 4]>::try_from(&body[8..12]).ok()?.into(),
                    SocketAddr::V6(_) => <[u8; 16]>::try_from(&body[8..24]).ok()?.into(),
                };
                *found |= port == addr.port() && (ip == addr.ip() || addr.ip().is_unspecified());
            }
            _ => {}
        }
        msg = msg.get((len + 3) & !3..).unwrap_or_default();
    }
    None
}

/// Ends the process at once, running no destructor and flushing nothing:
/// an upgrade's old process after the commit, whose destructors would shut
/// down sockets and remove paths the new process serves on.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) takes an integer and never returns.
    unsafe { libc::_exit(code) }
}

/// Starts the upgrade launcher (`SIGUSR2`): a child forked before the
/// sandbox, which the sandbox never reaches, that runs `argv` (the
/// io-server's own command line with `upgrade`) once for each octet
/// written to the returned pipe, waiting for each run to end, and exits
/// when the pipe's write end closes (this process is gone). It keeps
/// nothing of this process but the pipe and the standard descriptors, and
/// dies with it (`PR_SET_PDEATHSIG`).
pub(crate) fn spawn_launcher(argv: &[std::ffi::CString]) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fork in a multi-threaded process: the child makes only raw
    // async-signal-safe calls on data prepared before the fork (`ptrs`).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: as above; the child never returns.
        unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            let rfd = r.as_raw_fd();
            if libc::dup2(rfd, 3) < 0 {
                libc::_exit(1);
            }
            libc::syscall(
                libc::SYS_close_range,
                4 as libc::c_uint,
                libc::c_uint::MAX,
                0,
            );
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            loop {
                let mut b = [0u8; 1];
                let n = libc::read(3, b.as_mut_ptr().cast(), 1);
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                if n <= 0 {
                    libc::_exit(0);
                }
                let child = libc::fork();
                if child == 0 {
                    libc::close(3);
                    libc::execv(ptrs[0], ptrs.as_ptr());
                    libc::_exit(127);
                }
                if child > 0 {
                    let mut status = 0;
                    while libc::waitpid(child, &mut status, 0) < 0
                        && *libc::__errno_location() == libc::EINTR
                    {}
                }
            }
        }
    }
    drop(r);
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    #[test]
    fn a_connection_closed_first_here_lingers_on_its_local_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        assert!(!closed_first_on(at), "a listener does not linger");
        let mut c = TcpStream::connect(at).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(!closed_first_on(at), "established");
        drop(s); // closed first here: FIN_WAIT, then TIME_WAIT
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        assert!(closed_first_on(at));
        drop(c);
        assert!(closed_first_on(at), "TIME_WAIT");
    }

    /// A connected pair: (the client, the accepted socket).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// Waits (bounded) until `s` has `n` unread octets, or its peer's FIN
    /// with `fin`.
    fn arrived(s: &TcpStream, n: i32, fin: bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut inq: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut inq) };
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: as in `untouched`.
            unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            if inq == n && (!fin || info.tcpi_state == 8) {
                return;
            }
            assert!(Instant::now() < deadline, "the octets never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_socket_nobody_read_or_wrote_is_untouched() {
        let (mut c, s) = pair();
        assert!(untouched(s.as_fd()), "fresh");
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        arrived(&s, 18, false);
        assert!(untouched(s.as_fd()), "a request waiting");
        c.shutdown(Shutdown::Write).unwrap();
        arrived(&s, 18, true);
        assert!(untouched(s.as_fd()), "and the client's FIN");
    }

    #[test]
    fn a_read_a_write_or_a_shutdown_touches_it() {
        let (mut c, mut s) = pair();
        c.write_all(b"request").unwrap();
        arrived(&s, 7, false);
        s.read_exact(&mut [0u8; 1]).unwrap();
        assert!(!untouched(s.as_fd()), "one octet read");

        let (_c, mut s) = pair();
        s.write_all(b"banner").unwrap();
        assert!(!untouched(s.as_fd()), "written");

        let (c, mut s) = pair();
        c.shutdown(Shutdown::Write).unwrap();
        arrived(&s, 0, true);
        assert!(untouched(s.as_fd()), "only the FIN came");
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
        assert!(untouched(s.as_fd()), "reading the end of an empty request");

        let (_c, s) = pair();
        s.shutdown(Shutdown::Write).unwrap();
        assert!(!untouched(s.as_fd()), "shut down");

        let (mut c, mut s) = pair();
        c.write_all(b"ab").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        arrived(&s, 2, true);
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert!(!untouched(s.as_fd()), "read to the end");
    }
}
