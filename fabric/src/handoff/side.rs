//! Zero-relay between processes on one host: the io-server's handed-off
//! sockets travel to a node over a unix `SOCK_SEQPACKET` socket with
//! `SCM_RIGHTS`.
//!
//! Next to a `unix:PATH` fabric listener the io-server listens on
//! `PATH.handoff` (mode 0600, like the fabric socket). A node that joined
//! over that fabric connects to it and sends its node id (8 octets, from
//! the Welcome); the io-server accepts the claim only from the process
//! whose fabric connection got that id (`SO_PEERCRED` of both sockets), so
//! one node cannot take another's clients, and answers an accepted claim
//! with one octet (1) before anything else, so the node serves only once
//! its clients will come as sockets. From then on each message is one
//! client: [`HEADER_LEN`] octets (listener, peer, local) with the socket
//! attached, or, to a node whose fabric channel speaks protocol version 2,
//! [`HEADER_LEN_V2`] octets: the same, then the io-server's id of the
//! connection (u64) and the node id it was sent to (u32), when the
//! io-server keeps a copy of the socket until the node's `Accepted`
//! (issue 17). A node reads both lengths; an io-server sends the longer
//! one only to a node that spoke version 2, so either end may be the
//! older. Either end closing the socket ends the hand-off; the
//! io-server then relays that node's connections over the fabric again.
//!
//! A node out of descriptors must not lose a client: a `recvmsg` that
//! cannot install the socket (`EMFILE`) would consume the message and
//! drop the socket (`MSG_CTRUNC`). So the node peeks each message first
//! (`MSG_PEEK` installs a duplicate of the socket and leaves the message
//! queued when it cannot), then takes it off with no room for
//! descriptors (the kernel closes its own). Out of descriptors, the
//! message waits in the socket and [`recv`](SideSocket::recv) answers
//! `EMFILE`; [`receive`] tries again after [`NO_ROOM_RETRY`], and the
//! io-server, whose sends then wait, counts the clients against the
//! listener's backlog.

use super::{HandedOff, HandoffReceiver, HandoffSender};
use nix::sys::socket::{
    self as so, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// One encoded address: family (4 or 6), 16 octets of IP, port.
const ADDR_LEN: usize = 19;
/// Octets of one hand-off message: listener id, peer, local.
pub const HEADER_LEN: usize = 8 + 2 * ADDR_LEN;
/// With the io-server's id of the connection and the node id (version 2).
pub const HEADER_LEN_V2: usize = HEADER_LEN + 8 + 4;

/// The hand-off socket that goes with the fabric socket `fabric`.
pub fn path_for(fabric: &Path) -> PathBuf {
    let mut p = fabric.as_os_str().to_owned();
    p.push(".handoff");
    p.into()
}

fn put_addr(out: &mut [u8], a: SocketAddr) {
    let (family, ip) = match a.ip() {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => (6, v6),
    };
    out[0] = family;
    out[1..17].copy_from_slice(&ip.octets());
    out[17..19].copy_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let octets: [u8; 16] = b[1..17].try_into().ok()?;
    let ip = Ipv6Addr::from(octets);
    let ip = match b[0] {
        4 => IpAddr::V4(ip.to_ipv4_mapped()?),
        6 => IpAddr::V6(ip),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be_bytes([b[17], b[18]])))
}

/// Encodes the header of one hand-off message.
pub fn encode(listener: u64, peer: SocketAddr, local: SocketAddr) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&listener.to_be_bytes());
    put_addr(&mut h[8..8 + ADDR_LEN], peer);
    put_addr(&mut h[8 + ADDR_LEN..], local);
    h
}

/// Encodes the header of a hand-off message the io-server keeps a copy
/// of, as connection `conn`, sent to node `node`.
pub fn encode_v2(
    listener: u64,
    peer: SocketAddr,
    local: SocketAddr,
    conn: u64,
    node: u32,
) -> [u8; HEADER_LEN_V2] {
    let mut h = [0u8; HEADER_LEN_V2];
    h[..HEADER_LEN].copy_from_slice(&encode(listener, peer, local));
    h[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&conn.to_be_bytes());
    h[HEADER_LEN + 8..].copy_from_slice(&node.to_be_bytes());
    h
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub listener: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// 0 in a version 1 header.
    pub conn: u64,
    pub node: u32,
}

/// Decodes a header of either length; `None` if malformed.
pub fn decode(h: &[u8]) -> Option<Header> {
    let (conn, node) = match h.len() {
        HEADER_LEN => (0, 0),
        HEADER_LEN_V2 => (
            u64::from_be_bytes(h[HEADER_LEN..HEADER_LEN + 8].try_into().ok()?),
            u32::from_be_bytes(h[HEADER_LEN + 8..].try_into().ok()?),
        ),
        _ => return None,
    };
    Some(Header {
        listener: u64::from_be_bytes(h[..8].try_into().ok()?),
        peer: get_addr(&h[8..8 + ADDR_LEN])?,
        local: get_addr(&h[8 + ADDR_LEN..HEADER_LEN])?,
        conn,
        node,
    })
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Registers an fd of ours with the tokio reactor.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, so it stays open and
    // refers to the same file description for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn seqpacket() -> io::Result<OwnedFd> {
    so::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(errno)
}

/// The io-server's listening hand-off socket.
pub struct SideListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl SideListener {
    /// Listens on `path` (mode 0600 from the start, [`crate::private`]), replacing a stale socket file.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = seqpacket()?;
        let _ = std::fs::remove_file(path);
        let addr = UnixAddr::new(path).map_err(errno)?;
        crate::private::bind_private(|| so::bind(fd.as_raw_fd(), &addr)).map_err(errno)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        so::listen(&fd, Backlog::new(64).map_err(errno)?).map_err(errno)?;
        Ok(SideListener {
            fd: register(fd, Interest::READABLE)?,
            path: path.to_owned(),
        })
    }

    /// A hand-off socket listening on `path` already (an upgrade's new
    /// process takes over its predecessor's); its path is removed when it
    /// is dropped, as a bound one's.
    pub fn from_fd(fd: OwnedFd, path: PathBuf) -> io::Result<Self> {
        let fl = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(errno)?;
        let mut fl = nix::fcntl::OFlag::from_bits_truncate(fl);
        fl.insert(nix::fcntl::OFlag::O_NONBLOCK);
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(errno)?;
        Ok(SideListener {
            fd: register(fd, Interest::READABLE)?,
            path,
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.get_ref().as_fd()
    }

    /// Accepts one node's hand-off socket and the pid of its process.
    pub async fn accept(&self) -> io::Result<(SideSocket, i32)> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |l| {
                so::accept4(
                    l.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(errno)
            })
            .await?;
        // SAFETY: accept4 just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let pid = so::getsockopt(&fd, sockopt::PeerCredentials)
            .map_err(errno)?
            .pid();
        Ok((
            SideSocket(register(fd, Interest::READABLE | Interest::WRITABLE)?),
            pid,
        ))
    }
}

impl Drop for SideListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One end of a hand-off socket.
pub struct SideSocket(AsyncFd<OwnedFd>);

impl SideSocket {
    /// A node connects to the io-server's hand-off socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = seqpacket()?;
        so::connect(fd.as_raw_fd(), &UnixAddr::new(path).map_err(errno)?).map_err(errno)?;
        Ok(SideSocket(register(
            fd,
            Interest::READABLE | Interest::WRITABLE,
        )?))
    }

    /// A hand-off socket's end made elsewhere (an io-server upgrade's new
    /// process takes the old one's over): checked to be a sequenced-packet
    /// socket, made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let ty = so::getsockopt(&fd, so::sockopt::SockType).map_err(errno)?;
        if ty != so::SockType::SeqPacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a hand-off socket (SOCK_SEQPACKET)",
            ));
        }
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(errno)?;
        Ok(SideSocket(register(
            fd,
            Interest::READABLE | Interest::WRITABLE,
        )?))
    }

    /// The socket's descriptor (for a copy to hand over).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.0.get_ref())
    }

    async fn send_with(&self, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        let iov = [IoSlice::new(data)];
        let fds = fd.map(|f| [f]);
        self.0
            .async_io(Interest::WRITABLE, |s| {
                let rights;
                let cmsgs: &[ControlMessage] = match &fds {
                    Some(f) => {
                        rights = [ControlMessage::ScmRights(f)];
                        &rights
                    }
                    None => &[],
                };
                so::sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(errno)
            })
            .await
            .map(|_| ())
    }

    /// Node: claims the hand-off of node `id`.
    pub async fn send_hello(&self, id: u64) -> io::Result<()> {
        self.send_with(&id.to_be_bytes(), None).await
    }

    /// io-server: the node id the other end claims; `None` if it closed.
    pub async fn recv_hello(&self) -> io::Result<Option<u64>> {
        let mut b = [0u8; 8];
        let (n, _) = self.recv_with(&mut b).await?;
        match n {
            0 => Ok(None),
            8 => Ok(Some(u64::from_be_bytes(b))),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad hand-off hello",
            )),
        }
    }

    /// io-server: accepts the node's claim.
    pub async fn send_ack(&self) -> io::Result<()> {
        self.send_with(&[1], None).await
    }

    /// Node: whether the io-server accepted the claim (false: it closed
    /// the socket, refusing it).
    pub async fn recv_ack(&self) -> io::Result<bool> {
        let mut b = [0u8; 1];
        let (n, _) = self.recv_with(&mut b).await?;
        Ok(n == 1 && b[0] == 1)
    }

    /// io-server: sends one handed-off socket, with the version 2 header
    /// when the io-server keeps its descriptor of it until the node's
    /// `Accepted` (the caller closes or keeps `h.socket`).
    pub async fn send(&self, h: &HandedOff) -> io::Result<()> {
        let fd = Some(h.socket.as_raw_fd());
        if h.conn == 0 {
            let header = encode(h.listener, h.peer, h.local);
            return self.send_with(&header, fd).await;
        }
        let header = encode_v2(h.listener, h.peer, h.local, h.conn, h.node);
        self.send_with(&header, fd).await
    }

    /// Node: the next handed-off socket; `None` once the io-server closed.
    /// `EMFILE` (or `ENFILE`): no descriptor was free for it; the message
    /// is still queued, for a later call.
    pub async fn recv(&self) -> io::Result<Option<HandedOff>> {
        let mut b = [0u8; HEADER_LEN_V2 + 1];
        let (n, socket) = self.peek_then_take(&mut b).await?;
        if n == 0 {
            return Ok(None);
        }
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let h = decode(&b[..n]).ok_or_else(|| bad("bad hand-off header"))?;
        let socket = socket.ok_or_else(|| bad("hand-off message without a socket"))?;
        Ok(Some(HandedOff {
            listener: h.listener,
            peer: h.peer,
            local: h.local,
            socket,
            conn: h.conn,
            node: h.node,
        }))
    }

    /// One message into `buf`, with the fd it carried, taken without ever
    /// losing the fd (module docs): peeked with room for it, then taken
    /// off the queue with none.
    async fn peek_then_take(&self, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
        self.0
            .async_io(Interest::READABLE, |s| {
                let (n, fd) = {
                    let mut iov = [IoSliceMut::new(&mut *buf)];
                    let mut space = nix::cmsg_space!([RawFd; 1]);
                    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_CMSG_CLOEXEC;
                    let msg = so::recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), flags)
                        .map_err(errno)?;
                    // Truncated: no room for the descriptor (the message
                    // carries one; with none installed there is nothing
                    // to close). It stays queued.
                    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                        return Err(io::Error::from_raw_os_error(libc::EMFILE));
                    }
                    (msg.bytes, first_fd(&msg)?)
                };
                // Off the queue; the kernel closes the descriptors it held
                // for it (ours is the peeked duplicate).
                let mut iov = [IoSliceMut::new(&mut *buf)];
                so::recvmsg::<()>(s.as_raw_fd(), &mut iov, None, MsgFlags::empty())
                    .map_err(errno)?;
                Ok((n, fd))
            })
            .await
    }

    /// One message into `buf`: (length, the fd it carried).
    async fn recv_with(&self, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
        self.0
            .async_io(Interest::READABLE, |s| {
                let mut iov = [IoSliceMut::new(buf)];
                let mut space = nix::cmsg_space!([RawFd; 1]);
                let msg = so::recvmsg::<()>(
                    s.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(errno)?;
                Ok((msg.bytes, first_fd(&msg)?))
            })
            .await
    }
}

/// The first descriptor a received message carried (it is ours now).
fn first_fd(msg: &so::RecvMsg<'_, '_, ()>) -> io::Result<Option<OwnedFd>> {
    let mut fd = None;
    for c in msg.cmsgs().map_err(errno)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for f in fds {
                // SAFETY: the kernel installed `f` in this process for
                // this message; nothing else owns it. Extra fds (never
                // sent by the io-server) are closed by their drop.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                fd.get_or_insert(owned);
            }
        }
    }
    Ok(fd)
}

/// How long a node out of descriptors waits before it reads its hand-off
/// socket again.
pub const NO_ROOM_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// io-server: sends every socket handed to `rx` over `side` until either
/// end closes, closing each once sent; a socket that cannot be sent is
/// closed (its client sees the connection end). (The io-server itself
/// keeps the sockets of a version 2 node until it accepts them, and
/// dispatches again those it cannot send.)
pub async fn forward(mut rx: HandoffReceiver, side: SideSocket) {
    while let Some(h) = rx.recv().await {
        if let Err(e) = side.send(&h).await {
            tracing::warn!(error = %e, "hand-off socket failed; relaying again");
            return;
        }
    }
}

/// Node: passes every socket received on `side` to `tx` until the
/// io-server closes it.
/// Out of descriptors, the sockets wait in `side` (module docs): logged
/// once per shortage, tried again every [`NO_ROOM_RETRY`].
pub async fn receive(side: SideSocket, tx: HandoffSender) {
    let mut short = false;
    loop {
        match side.recv().await {
            Ok(Some(h)) => {
                short = false;
                if tx.send(h).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                if !std::mem::replace(&mut short, true) {
                    tracing::warn!(error = %e, "out of descriptors: handed-over clients wait in the hand-off socket");
                }
                tokio::time::sleep(NO_ROOM_RETRY).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "hand-off socket failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_malformed_ones_are_refused() {
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let local: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        let h = encode(7, peer, local);
        let v1 = Header {
            listener: 7,
            peer,
            local,
            conn: 0,
            node: 0,
        };
        assert_eq!(decode(&h), Some(v1));
        assert_eq!(decode(&h[..HEADER_LEN - 1]), None);
        let mut bad = h;
        bad[8] = 5;
        assert_eq!(decode(&bad), None);
        // Version 2: the same, then the io-server's id and the node id.
        let h2 = encode_v2(7, peer, local, 0x1_0000_0003, 9);
        assert_eq!(&h2[..HEADER_LEN], &h[..]);
        let v2 = Header {
            conn: 0x1_0000_0003,
            node: 9,
            ..v1
        };
        assert_eq!(decode(&h2), Some(v2));
        assert_eq!(decode(&h2[..HEADER_LEN_V2 - 1]), None);
        let mut long = h2.to_vec();
        long.push(0);
        assert_eq!(decode(&long), None);
    }

    #[tokio::test]
    async fn a_socket_crosses_with_its_addresses_and_a_close_ends_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("fabric.sock"));
        let listener = SideListener::bind(&path).unwrap();
        let node = SideSocket::connect(&path).unwrap();
        let (server, pid) = listener.accept().await.unwrap();
        assert_eq!(pid, std::process::id() as i32);
        node.send_hello(42).await.unwrap();
        assert_eq!(server.recv_hello().await.unwrap(), Some(42));
        server.send_ack().await.unwrap();
        assert!(node.recv_ack().await.unwrap());

        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let local: SocketAddr = "198.51.100.1:80".parse().unwrap();
        server
            .send(&HandedOff {
                listener: 3,
                peer,
                local,
                socket: a.into(),
                conn: 0,
                node: 0,
            })
            .await
            .unwrap();
        let got = node.recv().await.unwrap().expect("one hand-off");
        assert_eq!((got.listener, got.peer, got.local), (3, peer, local));
        assert_eq!((got.conn, got.node), (0, 0), "a version 1 header");
        // The received fd is the same socket: what is written to it
        // reaches the other end of the pair.
        let mut s = std::os::unix::net::UnixStream::from(got.socket);
        std::io::Write::write_all(&mut s, b"hi").unwrap();
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut &b, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // One the io-server keeps a copy of carries its id and the node's.
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        server
            .send(&HandedOff {
                listener: 3,
                peer,
                local,
                socket: c.into(),
                conn: 5,
                node: 42,
            })
            .await
            .unwrap();
        let got = node.recv().await.unwrap().expect("a tracked hand-off");
        assert_eq!((got.listener, got.conn, got.node), (3, 5, 42));
        drop(server);
        assert!(node.recv().await.unwrap().is_none());
    }
}
