//! `socket`, `bind`, `listen` and `shutdown` of virtual sockets (Figure 3),
//! and turning a virtual socket back into a real one for loopback traffic.

use super::arrival::{listening, reap_listeners};
use super::call::{defer, Call, Outcome, LIVENESS_CHECK};
use super::config::Loopback;
use super::listeners::Listener;
use super::objects::{hold_back, inode_of, local_addr, pair, set_options};
use super::restart;
use super::state::SupervisorState;
use crate::notify::{AddFd, Reply};
use crate::sockaddr::{Decoded, SOCKADDR_IN_LEN};
use crate::vsock::{Inode, State, VirtualSocket};
use nix::sys::socket::{self as so, AddressFamily, SockFlag, SockType};
use saps_fabric::{Request, Response};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

/// `socket(AF_INET|AF_INET6, SOCK_STREAM, 0|IPPROTO_TCP|IPPROTO_MPTCP)`:
/// install a placeholder (`placeholders.rs`) and remember it as a virtual
/// socket. An
/// MPTCP socket is served like a TCP one (the io-server's socket toward
/// the client is TCP; docs/interceptor.md, "Departures").
pub(crate) fn socket(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let domain = call.arg(0) as i32;
    let ty = call.arg(1) as i32;
    let proto = match call.arg(2) as i32 {
        0 => libc::IPPROTO_TCP,
        p @ (libc::IPPROTO_TCP | libc::IPPROTO_MPTCP) => p,
        _ => {
            // SCTP-over-stream and the like: a real socket (or the
            // kernel's error), decided on registers only.
            call.note.action = "native (protocol)";
            return Outcome::Reply(Reply::Continue);
        }
    };
    if ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC | 0xf) != 0 {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    let made = sh
        .placeholders
        .lock()
        .make(domain, proto, ty & libc::SOCK_NONBLOCK != 0);
    let (placeholder, ino) = match made {
        Ok(x) => x,
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    // In the table before the program can see the fd.
    sh.table()
        .insert(ino, VirtualSocket::with_protocol(domain, proto));
    call.note.inode = Some(ino);
    call.note.action = "virtual";
    let add = AddFd {
        target_fd: None,
        cloexec: ty & libc::SOCK_CLOEXEC != 0,
        send: true,
    };
    match sh.notifier.add_fd(call.n.id, placeholder.as_fd(), add) {
        Ok(fd) => Outcome::Answered(fd as i64),
        Err(e) => {
            sh.table().remove(ino);
            Outcome::Reply(Reply::Errno(e.raw_os_error().unwrap_or(libc::EBADF)))
        }
    }
}

/// Replaces the virtual socket by a real socket of its family and protocol
/// carrying the options set so far (loopback stays local). The supervisor
/// then makes the call itself on the returned socket, with the address it
/// read: answering `CONTINUE` would let the kernel read the address again,
/// after another thread of the program could have changed it.
pub(crate) fn make_native(
    sh: &SupervisorState,
    call: &mut Call,
    ino: Inode,
    vs: &VirtualSocket,
) -> Result<OwnedFd, i32> {
    let family = if vs.domain == libc::AF_INET6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if sh.nonblocking(call) {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    let real = crate::sys::socket_raw(
        family as i32,
        SockType::Stream as i32 | flags.bits(),
        vs.protocol,
    )
    .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
    set_options(real.as_fd(), vs.options.iter());
    sh.replace_fd(call, real.as_fd())?;
    sh.table().remove(ino);
    if let Some(conn) = vs.conn {
        sh.ep().close_connection(conn, 0);
    }
    call.note.action = "native (loopback)";
    Ok(real)
}

/// `bind(fd, addr, len)`: Bind on the io-server, which answers the address
/// bound (port 0 resolved).
pub(crate) fn bind(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let Some((ino, mut vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let addr = match sh.read_any_sockaddr(call, call.arg(1), call.arg(2)) {
        Ok(Decoded::Inet(SocketAddr::V4(a))) if vs.domain == libc::AF_INET => SocketAddr::V4(a),
        Ok(Decoded::Inet(SocketAddr::V6(a))) if vs.domain == libc::AF_INET6 => SocketAddr::V6(a),
        // AF_UNSPEC with INADDR_ANY binds an IPv4 socket as AF_INET.
        Ok(Decoded::Unspec { any: Some(port) }) if vs.domain == libc::AF_INET => {
            let a = SocketAddr::from(([0, 0, 0, 0], port));
            call.detail.addr = Some(a);
            a
        }
        // Shorter than a sockaddr_in: EINVAL before the family is looked at.
        Ok(_) if vs.domain == libc::AF_INET && call.arg(2) < SOCKADDR_IN_LEN as u64 => {
            return Outcome::Reply(Reply::Errno(libc::EINVAL))
        }
        Ok(_) if vs.domain == libc::AF_INET => {
            return Outcome::Reply(Reply::Errno(libc::EAFNOSUPPORT))
        }
        // An AF_INET address on an AF_INET6 socket: too short for a
        // sockaddr_in6, or of the wrong family (inet6_bind's checks).
        Ok(_) => return Outcome::Reply(Reply::Errno(v4_on_v6(call.arg(2)))),
        Err(e) => return Outcome::Reply(Reply::Errno(e)),
    };
    if v6only_v4mapped(&vs, &addr) {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    let flags = vs.options.bind_flags();
    let mut key = addr.to_string().into_bytes();
    key.extend_from_slice(&flags.to_ne_bytes());
    let registered = match sh.ops.begin(&sh.notifier, call.id(), ino, key) {
        restart::Begin::New => true,
        restart::Begin::Unregistered => false,
        restart::Begin::Done(d) => return Outcome::Reply(done_reply(d)),
        restart::Begin::Join(rx) => return join(ino, rx),
    };
    if vs.bound.is_some() || vs.state != State::Fresh {
        sh.ops.forget(ino);
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    let local = sh.stays_local(&addr);
    if local || no_client_reaches(&addr) {
        sh.ops.forget(ino);
        // A virtual socket's wildcard bind of this port takes this
        // address too: the kernel's EADDRINUSE (the socket stays as it is).
        if local && addr.port() != 0 {
            reap_listeners(sh, Some(addr.port()));
            sh.sweep_closed(Some(addr.port()));
            let held = sh
                .table()
                .wildcard_holds(ino, addr.ip(), addr.port(), flags);
            if held {
                return Outcome::Reply(Reply::Errno(libc::EADDRINUSE));
            }
        }
        let reply = native_bind(sh, call, ino, &vs, addr);
        if !local {
            call.note.action = NOT_SERVED;
        }
        return Outcome::Reply(reply);
    }
    // Its wildcard takes the node's loopback addresses, where the node's
    // own sockets are (loopback stays local): one of them on this port
    // conflicts as in the kernel.
    let wildcard = addr.ip().is_unspecified() && addr.port() != 0;
    if wildcard && sh.config.loopback == Loopback::Local {
        let own = sh.loopback.lock().holds(addr.port());
        if own && loopback_holds(&vs, addr.port()) {
            sh.ops.forget(ino);
            return Outcome::Reply(Reply::Errno(libc::EADDRINUSE));
        }
    }
    let conn = match sh.tag(call, &mut vs, "virtual") {
        Ok(c) => c,
        Err(e) => {
            sh.ops.forget(ino);
            return Outcome::Reply(Reply::Errno(e));
        }
    };
    // A listener of this port the program closed, or a socket bound to it
    // and closed unlistened, must not keep it bound.
    reap_listeners(sh, Some(addr.port()));
    sh.sweep_closed(Some(addr.port()));
    defer(move |sh, mut call| async move {
        let resp = sh.request(Request::Bind { conn, addr, flags }).await;
        let reply = match resp {
            Response::Status { errno: 0, addr } => {
                vs.bound = Some(addr.unwrap_or(SocketAddr::from((addr_ip(&vs), 0))));
                sh.table().insert(ino, vs);
                Reply::Value(0)
            }
            // Not the io-server's address, and the program asked for a
            // non-local bind, or it is a broadcast address of the node's
            // (asked only now: it costs a netlink dump): the node's kernel
            // makes it.
            r if r.errno() == libc::EADDRNOTAVAIL
                && (freebind(&vs) || interface_broadcast(&addr)) =>
            {
                let reply = native_bind(&sh, &mut call, ino, &vs, addr);
                call.note.action = NOT_SERVED;
                reply
            }
            r => {
                // Keep the tag: a later bind may succeed.
                sh.table().insert(ino, vs);
                Reply::Errno(r.errno())
            }
        };
        if !registered {
            return (call, Outcome::Reply(reply));
        }
        match sh.ops.complete(ino, call.n.id, restart::Done::Reply(reply)) {
            Some(d) => {
                call.op = Some(ino);
                (call, Outcome::Reply(done_reply(d)))
            }
            None => (call, Outcome::Reply(Reply::Errno(libc::EINTR))),
        }
    })
}

/// The kernel's answer to an AF_INET address given to an AF_INET6 socket
/// with `len` octets: `EINVAL` when shorter than a sockaddr_in6 (24, the
/// RFC 2133 size), else `EAFNOSUPPORT`.
pub(crate) fn v4_on_v6(len: u64) -> i32 {
    if len < 24 {
        libc::EINVAL
    } else {
        libc::EAFNOSUPPORT
    }
}

/// A v4-mapped address on an `IPV6_V6ONLY` socket (bind: `EINVAL`,
/// connect: `ENETUNREACH`).
pub(crate) fn v6only_v4mapped(vs: &VirtualSocket, addr: &SocketAddr) -> bool {
    let mapped = match addr {
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
        SocketAddr::V4(_) => false,
    };
    mapped && vs.options.is_on(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
}

/// What `--trace` says of a socket made real for an address the io-server
/// does not serve (multicast, broadcast, `IP_FREEBIND`).
const NOT_SERVED: &str = "native (address not served)";

/// Whether a socket of the node holds `port` on a loopback address that a
/// wildcard bind of `vs` takes, so that the kernel would refuse that bind:
/// asked of the kernel by binding a scratch socket with `vs`'s bind options
/// there (`127.0.0.1`, `::1`, or both for a dual-stack socket). Asked only
/// while one of the program's own loopback sockets holds the port
/// (`loopback.rs`): an io-server on this host holds it too.
fn loopback_holds(vs: &VirtualSocket, port: u16) -> bool {
    let v6only = vs.options.is_on(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let mapped = SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port));
    let probes: &[SocketAddr] = match (vs.domain, v6only) {
        (libc::AF_INET6, true) => &[v6],
        (libc::AF_INET6, false) => &[v6, mapped],
        _ => &[v4],
    };
    let bind_options = vs.options.iter().filter(|&(level, name, _)| {
        matches!(
            (level, name),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT)
                | (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
        )
    });
    let bind_options: Vec<_> = bind_options.collect();
    probes.iter().any(|a| {
        let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
        let Ok(s) = crate::sys::socket_raw(vs.domain, ty, libc::IPPROTO_TCP) else {
            return false;
        };
        set_options(s.as_fd(), bind_options.iter().copied());
        let at = nix::sys::socket::SockaddrStorage::from(*a);
        so::bind(s.as_raw_fd(), &at) == Err(nix::errno::Errno::EADDRINUSE)
    })
}

/// A multicast address, or the limited broadcast one: the kernel binds a
/// TCP socket to it, and no client ever reaches it. Bound by the node's
/// kernel, which gives the kernel's every answer for it; the io-server
/// serves one address. (A subnet's broadcast address is known only from
/// the interfaces: [`interface_broadcast`].)
fn no_client_reaches(addr: &SocketAddr) -> bool {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => ip.is_multicast() || ip.is_broadcast(),
        IpAddr::V6(ip) => ip.is_multicast(),
    }
}

/// Whether `addr` is a broadcast address of an interface of the node: the
/// one it was given, or its subnet's last address (the kernel makes that
/// one a broadcast address for prefixes shorter than /31, given or not).
fn interface_broadcast(addr: &SocketAddr) -> bool {
    let IpAddr::V4(ip) = addr.ip().to_canonical() else {
        return false;
    };
    if ip.is_unspecified() || ip.is_loopback() {
        return false;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    let v4 = |a: Option<nix::sys::socket::SockaddrStorage>| {
        a.and_then(|a| a.as_sockaddr_in().map(|a| a.ip()))
    };
    addrs.into_iter().any(|a| {
        // Without a broadcast address of its own, an interface's is its
        // address (glibc's getifaddrs fills it with IFA_ADDRESS).
        let given = v4(a.broadcast) == Some(ip) && v4(a.address) != Some(ip);
        let subnet = match (v4(a.address), v4(a.netmask)) {
            (Some(addr), Some(mask)) if mask.to_bits().count_ones() < 31 => {
                (addr.to_bits() | !mask.to_bits()) == ip.to_bits()
            }
            _ => false,
        };
        given || subnet
    })
}

/// The program set `IP_FREEBIND` (`IPV6_FREEBIND`): the kernel binds an
/// address that is not local. Not `IP_TRANSPARENT`, which needs a
/// privilege the program may not have and the supervisor has.
fn freebind(vs: &VirtualSocket) -> bool {
    vs.options.is_on(libc::IPPROTO_IP, libc::IP_FREEBIND)
        || (vs.domain == libc::AF_INET6
            && vs.options.is_on(libc::IPPROTO_IPV6, libc::IPV6_FREEBIND))
}

/// The answer of a finished bind (or of a listen that failed).
fn done_reply(d: restart::Done) -> Reply {
    match d {
        restart::Done::Reply(r) => r,
        // A bind's op never holds this.
        restart::Done::Listening { .. } => Reply::Errno(libc::EINVAL),
    }
}

/// The same bind again after a signal, while the first still waits for the
/// io-server: answers what the first gets.
fn join(ino: Inode, mut rx: tokio::sync::watch::Receiver<bool>) -> Outcome {
    defer(move |sh, mut call| async move {
        loop {
            if let Some(d) = sh.ops.result(ino) {
                call.op = Some(ino);
                return (call, Outcome::Reply(done_reply(d)));
            }
            // Never ERESTARTSYS: bind does not sleep natively.
            if !sh.notifier.id_valid(call.n.id) {
                return (call, Outcome::Reply(Reply::Errno(libc::EINTR)));
            }
            let _ = tokio::time::timeout(LIVENESS_CHECK, rx.changed()).await;
        }
    })
}

/// A bind to a loopback address that stays on the node: made by the
/// supervisor on the socket that replaces the placeholder.
fn native_bind(
    sh: &SupervisorState,
    call: &mut Call,
    ino: Inode,
    vs: &VirtualSocket,
    addr: SocketAddr,
) -> Reply {
    let real = match make_native(sh, call, ino, vs) {
        Ok(r) => r,
        Err(e) => return Reply::Errno(e),
    };
    match so::bind(
        real.as_raw_fd(),
        &nix::sys::socket::SockaddrStorage::from(addr),
    ) {
        Ok(()) => {
            if sh.stays_local(&addr) {
                // The port it got (port 0 resolved).
                let port = local_addr(&real).map_or(addr.port(), |a| a.port());
                if let Ok(real_ino) = inode_of(&real) {
                    sh.loopback.lock().add(real.as_fd(), real_ino, port);
                }
            }
            Reply::Value(0)
        }
        Err(e) => Reply::Errno(e as i32),
    }
}

fn addr_ip(vs: &VirtualSocket) -> std::net::IpAddr {
    crate::vsock::unspecified(vs.domain).ip()
}

/// `listen(fd, backlog)` with native sockets, trapped only for `--trace`:
/// the kernel's own socket listens. The answer depends on nothing the
/// supervisor reads from the program's memory, so `CONTINUE` is exact; the
/// trace notes the address it listens on.
pub(crate) fn listen_native(sh: &SupervisorState, call: &mut Call) -> Outcome {
    call.note.action = "native";
    let pidfds = &sh.pidfds;
    let dup = pidfds.with(call.pid(), |p| crate::fds::socket_dup_inode(p, call.fd()));
    if let Ok((dup, ino)) = dup {
        call.note.inode = ino;
        call.note.group = local_addr(&dup);
    }
    Outcome::Reply(Reply::Continue)
}

/// `listen(fd, backlog)`: Listen on the io-server (binding an ephemeral port
/// first, as the kernel would), then swap the placeholder for the AF_UNIX
/// listener `L` the supervisor delivers connections to.
pub(crate) fn listen(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let Some((ino, mut vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let backlog = (call.arg(1) as i32).clamp(1, 4096) as u32;
    match vs.state {
        State::Listening => return Outcome::Reply(Reply::Value(0)),
        State::Fresh if !vs.tried_connect => {}
        _ => return Outcome::Reply(Reply::Errno(libc::EINVAL)),
    }
    let nonblock = sh.nonblocking(call);
    let registered =
        match sh
            .ops
            .begin(&sh.notifier, call.id(), ino, backlog.to_ne_bytes().to_vec())
        {
            restart::Begin::New => true,
            restart::Begin::Unregistered => false,
            restart::Begin::Done(d) => return Outcome::Reply(finish_listen(sh, call, ino, d)),
            restart::Begin::Join(mut rx) => {
                return defer(move |sh, mut call| async move {
                    loop {
                        if let Some(d) = sh.ops.result(ino) {
                            let reply = finish_listen(&sh, &mut call, ino, d);
                            return (call, Outcome::Reply(reply));
                        }
                        // Never ERESTARTSYS: listen does not sleep natively.
                        if !sh.notifier.id_valid(call.n.id) {
                            return (call, Outcome::Reply(Reply::Errno(libc::EINTR)));
                        }
                        let _ = tokio::time::timeout(LIVENESS_CHECK, rx.changed()).await;
                    }
                });
            }
        };
    // Not bound yet on this channel: bind first, as the kernel would
    // (port 0), or again after the node rejoined the io-server.
    let needs_bind = vs.conn.is_none() || vs.bound.is_none();
    let conn = match sh.tag(call, &mut vs, "virtual listener") {
        Ok(c) => c,
        Err(e) => {
            sh.ops.forget(ino);
            return Outcome::Reply(Reply::Errno(e));
        }
    };
    call.note.group = vs.bound;
    defer(move |sh, mut call| async move {
        let done = listen_at_io_server(&sh, conn, backlog, nonblock, needs_bind, vs).await;
        if !registered {
            let reply = finish_listen(&sh, &mut call, ino, done);
            return (call, Outcome::Reply(reply));
        }
        match sh.ops.complete(ino, call.n.id, done) {
            Some(d) => {
                let reply = finish_listen(&sh, &mut call, ino, d);
                (call, Outcome::Reply(reply))
            }
            None => (call, Outcome::Reply(Reply::Errno(libc::EINTR))),
        }
    })
}

/// Bind (when needed) and Listen on the io-server.
async fn listen_at_io_server(
    sh: &Arc<SupervisorState>,
    conn: saps_fabric::ConnId,
    backlog: u32,
    nonblock: bool,
    needs_bind: bool,
    mut vs: VirtualSocket,
) -> restart::Done {
    if needs_bind {
        let addr = vs
            .bound
            .unwrap_or_else(|| crate::vsock::unspecified(vs.domain));
        let flags = vs.options.bind_flags();
        match sh.request(Request::Bind { conn, addr, flags }).await {
            Response::Status { errno: 0, addr: a } => vs.bound = Some(a.unwrap_or(addr)),
            r => return restart::Done::Reply(Reply::Errno(r.errno())),
        }
    }
    let resp = sh.request(Request::Listen { conn, backlog }).await;
    if resp.errno() != 0 {
        return restart::Done::Reply(Reply::Errno(resp.errno()));
    }
    restart::Done::Listening {
        conn,
        backlog,
        nonblock,
        vs,
    }
}

/// Puts `L` over the program's fd once the io-server listens, with the
/// notification that answers the call now (the first, or its restart).
fn finish_listen(
    sh: &Arc<SupervisorState>,
    call: &mut Call,
    ino: Inode,
    done: restart::Done,
) -> Reply {
    let restart::Done::Listening {
        conn,
        backlog,
        nonblock,
        mut vs,
    } = done
    else {
        call.op = Some(ino);
        return done_reply(done);
    };
    match install_listener(sh, call, ino, conn, backlog, nonblock, &mut vs) {
        Ok(()) => {
            sh.ops.forget(ino);
            Reply::Value(0)
        }
        // The caller left (a signal): the restart installs it.
        Err(libc::EINTR) => Reply::Errno(libc::EINTR),
        Err(e) => {
            sh.ops.forget(ino);
            sh.ep().close_connection(conn, 0);
            Reply::Errno(e)
        }
    }
}

/// Makes `L`, one end of a socket pair whose other end `M` the supervisor
/// keeps for markers, and puts it over the call's fd. The table knows `L`
/// before the program holds it (and the placeholder is gone).
fn install_listener(
    sh: &Arc<SupervisorState>,
    call: &Call,
    ino: Inode,
    conn: saps_fabric::ConnId,
    backlog: u32,
    nonblock: bool,
    vs: &mut VirtualSocket,
) -> Result<(), i32> {
    let (l, marker) = pair(nonblock)?;
    // `L` must not poll writable, as a listening socket does not: a filler
    // sent through it with the smallest send buffer, never read by `M`
    // (which only writes markers and watches for the hang-up).
    hold_back(&l)?;
    let l_ino = inode_of(&l)?;
    vs.state = State::Listening;
    sh.table().rekey(ino, l_ino, vs.clone());
    if let Err(e) = sh.replace_fd(call, l.as_fd()) {
        vs.state = State::Fresh;
        sh.table().rekey(l_ino, ino, vs.clone());
        return Err(e);
    }
    let listener = Listener {
        marker: Arc::new(marker),
        addr: vs
            .bound
            .unwrap_or_else(|| crate::vsock::unspecified(vs.domain)),
        flags: vs.options.bind_flags(),
        backlog,
    };
    listening(sh, conn, listener);
    Ok(())
}

/// `shutdown(fd, how)`: on an established connection the kernel object `S`
/// does it natively (its EOF reaches the relay, which sends FIN after the
/// data), and so does a TCP placeholder (`ENOTCONN`, and the socket polls
/// hung up from then on, as the kernel's); a connecting socket abandons its
/// connect, as the kernel's in SYN_SENT; elsewhere the kernel's answers.
pub(crate) fn shutdown(sh: &Arc<SupervisorState>, call: &mut Call) -> Outcome {
    let Some((ino, vs)) = sh.lookup(call) else {
        return Outcome::Reply(Reply::Continue);
    };
    let how = call.arg(1) as i32;
    if !(libc::SHUT_RD..=libc::SHUT_RDWR).contains(&how) {
        return Outcome::Reply(Reply::Errno(libc::EINVAL));
    }
    Outcome::Reply(match vs.state {
        State::Connected { .. } => Reply::Continue,
        // The kernel's `inet_shutdown` disconnects a socket in SYN_SENT.
        State::Connecting { .. } => match super::connect::unconnect(sh, call, ino, vs) {
            Ok(()) => Reply::Value(0),
            Err(e) => Reply::Errno(e),
        },
        State::Listening => Reply::Value(0),
        State::Fresh if sh.placeholders.lock().is_tcp(ino) => Reply::Continue,
        State::Fresh => Reply::Errno(libc::ENOTCONN),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 0)
    }

    #[test]
    fn multicast_and_broadcast_addresses_are_bound_by_the_node_kernel() {
        for ip in [
            "224.0.0.1",
            "239.1.2.3",
            "255.255.255.255",
            "ff02::1",
            "::ffff:224.0.0.1",
        ] {
            assert!(no_client_reaches(&at(ip)), "{ip}");
        }
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "192.0.2.255",
            "::",
            "::1",
            "2001:db8::1",
        ] {
            assert!(!no_client_reaches(&at(ip)), "{ip}");
        }
    }

    #[test]
    fn a_node_socket_on_a_loopback_address_holds_the_port_against_a_wildcard_bind() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let one = 1i32.to_ne_bytes();
        assert!(loopback_holds(&VirtualSocket::new(libc::AF_INET), port));
        assert!(
            loopback_holds(&VirtualSocket::new(libc::AF_INET6), port),
            "dual stack"
        );
        let mut v6only = VirtualSocket::new(libc::AF_INET6);
        v6only
            .options
            .set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &one);
        assert!(!loopback_holds(&v6only, port));
        drop(held);
        assert!(!loopback_holds(&VirtualSocket::new(libc::AF_INET), port));
    }

    #[test]
    fn the_node_addresses_are_not_broadcast_ones() {
        let addrs = nix::ifaddrs::getifaddrs().unwrap();
        for a in addrs {
            let Some(ip) = a.address.and_then(|a| a.as_sockaddr_in().map(|a| a.ip())) else {
                continue;
            };
            let at = SocketAddr::from((ip, 80));
            assert!(!interface_broadcast(&at), "{ip} of {}", a.interface_name);
        }
    }

    #[test]
    fn freebind_is_ip_freebind_or_ipv6_freebind_on_an_inet6_socket() {
        let one = 1i32.to_ne_bytes();
        let mut v4 = VirtualSocket::new(libc::AF_INET);
        assert!(!freebind(&v4));
        v4.options.set(libc::IPPROTO_IP, libc::IP_TRANSPARENT, &one);
        assert!(!freebind(&v4), "IP_TRANSPARENT is not enough");
        v4.options.set(libc::IPPROTO_IP, libc::IP_FREEBIND, &one);
        assert!(freebind(&v4));
        let mut v6 = VirtualSocket::new(libc::AF_INET6);
        v6.options
            .set(libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, &one);
        assert!(freebind(&v6));
    }
}
