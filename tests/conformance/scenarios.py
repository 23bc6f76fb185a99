#!/usr/bin/python3
"""Differential conformance scenarios for SAPS.

Run natively and under `saps-run` in every mode; the output must be the same
line for line (tests/tests/conformance.rs compares it). Every line is
`name: facts`, with nothing that changes from run to run: no ephemeral port
numbers, fds or timings (ports are printed as <srv>, <bound>, <eph>), errno
values as names.

    python3 scenarios.py              # all scenarios
    python3 scenarios.py NAME...      # only these
    python3 scenarios.py --list       # their names

Addresses: CONFORMANCE_ADDR4 (192.0.2.1) and CONFORMANCE_ADDR6 (2001:db8::1)
are on a dummy interface of the namespace the harness makes;
CONFORMANCE_BLACKHOLE4 (192.0.2.2) is on its subnet but answers nothing, so
a connection to it stays in SYN_SENT.
"""

import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time

A4 = os.environ.get("CONFORMANCE_ADDR4", "192.0.2.1")
A6 = os.environ.get("CONFORMANCE_ADDR6", "2001:db8::1")
BH4 = os.environ.get("CONFORMANCE_BLACKHOLE4", "192.0.2.2")
NOTLOCAL4 = "192.0.2.99"
NOTLOCAL6 = "2001:db8::99"
MAPPED4 = "::ffff:" + A4
T = 5.0  # bound of every wait, seconds
WATCHDOG = 10.0  # per scenario
# After a TIMEOUT, exit (status 3) instead of going on: a supervisor that
# hangs would make every later scenario time out too; the harness starts
# the program again with the scenarios after the one that hung.
STOP_ON_TIMEOUT = os.environ.get("CONFORMANCE_STOP_ON_TIMEOUT") == "1"

AF_INET, AF_INET6, SOCK_STREAM = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM
SOL_SOCKET, IPPROTO_TCP = socket.SOL_SOCKET, socket.IPPROTO_TCP
IPPROTO_IPV6, IPPROTO_IP = socket.IPPROTO_IPV6, socket.IPPROTO_IP
IPPROTO_MPTCP = 262
SIOCOUTQ = 0x5411  # TIOCOUTQ
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
              5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT",
              9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}

libc = ctypes.CDLL(None, use_errno=True)

# ---------------------------------------------------------------- output

_cur = "?"


def out(*parts):
    print("%s: %s" % (_cur, " ".join(str(p) for p in parts)), flush=True)


def en(e):
    """An exception as an errno name (or its type when it has none)."""
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, "E%d" % e.errno)
    return type(e).__name__


def tv(fn, *a, **kw):
    """Calls fn: 'ok' for None, the result otherwise, the errno name on OSError."""
    try:
        r = fn(*a, **kw)
    except OSError as e:
        return en(e)
    return "ok" if r is None else r


def show(v):
    """A result of tv() as printed: bytes as repr, an address through fa(),
    an accepted (socket, address) as 'accepted'."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray)):
        return repr(bytes(v))
    if isinstance(v, tuple):
        if v and isinstance(v[0], socket.socket):
            track(v[0])
            return "accepted"
        return fa(v)
    return str(v)


def tr(fn, *a, **kw):
    """tv() as printed (show())."""
    return show(tv(fn, *a, **kw))


def ecode(n):
    return "0" if n == 0 else errno.errorcode.get(n, "E%d" % n)


def fa(addr, **ports):
    """An address with its port replaced by a label: <NAME> for a port given
    as NAME=port, 0 for 0, <eph> for any other. An errno name (a string from
    tr()) is returned as it is."""
    if isinstance(addr, str):
        return addr
    if not isinstance(addr, tuple):
        return repr(addr)
    host, port = addr[0], addr[1]
    label = None
    for k, v in ports.items():
        if v and port == v:
            label = "<%s>" % k
            break
    if label is None:
        label = "0" if port == 0 else "<eph>"
    rest = [repr(x) for x in addr[2:]]
    return "(" + ", ".join([repr(host), label] + rest) + ")"


PMASK = [(select.POLLIN, "IN"), (select.POLLPRI, "PRI"), (select.POLLOUT, "OUT"),
         (select.POLLERR, "ERR"), (select.POLLHUP, "HUP"), (select.POLLNVAL, "NVAL"),
         (select.POLLRDHUP, "RDHUP")]
ALLEV = select.POLLIN | select.POLLPRI | select.POLLOUT | select.POLLRDHUP


def pm(m):
    return "|".join(n for b, n in PMASK if m & b) or "0"


def pollmask(s, timeout_ms=0, ev=ALLEV):
    p = select.poll()
    p.register(s, ev)
    r = p.poll(timeout_ms)
    return r[0][1] if r else 0


def wait_mask(s, want, timeout=T, ev=ALLEV):
    """Polls until one of the bits in `want` is set; the mask then (fresh)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        m = pollmask(s, max(0, int(left * 1000)), ev)
        if m & want or left <= 0:
            return pollmask(s, 0, ev)
        if not (m & want):
            # readiness we do not wait for (e.g. OUT): nap briefly, keep polling
            time.sleep(0.002)


def wait_until(pred, timeout=T):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(0.002)


def readable(s, timeout=T):
    return bool(pollmask(s, int(timeout * 1000), select.POLLIN) & select.POLLIN)


def fionread(s):
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def wait_inq(s, n, timeout=T):
    """Polls FIONREAD until n bytes are queued; the count then."""
    return wait_until(lambda: fionread(s) >= n and fionread(s), timeout) or fionread(s)


def recv_exact(s, n, timeout=T):
    buf = bytearray()
    deadline = time.monotonic() + timeout
    old = s.gettimeout()
    try:
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            chunk = s.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
    finally:
        s.settimeout(old)
    return bytes(buf)


def recv_to_eof(s, limit=1 << 24, timeout=T):
    buf = bytearray()
    deadline = time.monotonic() + timeout
    old = s.gettimeout()
    try:
        while len(buf) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(buf) + b"<timeout>"
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.settimeout(old)
    return bytes(buf)


def geti(s, level, opt):
    return s.getsockopt(level, opt)


def tcp_state(s):
    st = s.getsockopt(IPPROTO_TCP, socket.TCP_INFO, 104)[0]
    return TCP_STATES.get(st, st)


def wait_state(s, want, timeout=T):
    return wait_until(lambda: tcp_state(s) == want and want, timeout) or tcp_state(s)


def flags_of(fd):
    nb = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
    ce = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    return "nonblock=%s cloexec=%s" % (nb, ce)


# ---------------------------------------------------------------- sockets

_tracked = []
_children = []


def track(s):
    _tracked.append(s)
    return s


def S(fam=AF_INET, timeout=T, proto=0, typ=SOCK_STREAM):
    s = socket.socket(fam, typ, proto)
    s.settimeout(timeout)
    return track(s)


def wild(fam):
    return "0.0.0.0" if fam == AF_INET else "::"


def listener(fam=AF_INET, host=None, port=0, backlog=16, opts=(), timeout=T, proto=0):
    """A listening socket; (socket, port)."""
    l = S(fam, timeout, proto)
    for level, opt, val in opts:
        l.setsockopt(level, opt, val)
    l.bind((wild(fam) if host is None else host, port))
    l.listen(backlog)
    return l, l.getsockname()[1]


def connect(port, host=A4, fam=None, timeout=T, proto=0):
    if fam is None:
        fam = AF_INET6 if ":" in host else AF_INET
    c = S(fam, timeout, proto)
    c.connect((host, port))
    return c


def accept(l):
    s, a = l.accept()
    track(s)
    s.settimeout(T)
    return s, a


def pair(fam=AF_INET, lhost=None, chost=None, proto=0):
    """(listener, port, client, accepted)."""
    if chost is None:
        chost = A6 if fam == AF_INET6 else A4
    l, port = listener(fam, lhost, proto=proto)
    c = connect(port, chost, proto=proto)
    s, _ = accept(l)
    return l, port, c, s


def closed_port(fam=AF_INET, host=None):
    """A port bound but not listening: a SYN to it is answered with RST."""
    if host is None:
        host = A4 if fam == AF_INET else A6
    b = S(fam)
    b.bind((host, 0))
    return b, b.getsockname()[1]


class Verdict:
    """True, or False with what differed (printed only when SAPS differs:
    natively every such check is True)."""

    def __init__(self, ok, detail=""):
        self.ok, self.detail = ok, detail

    def __bool__(self):
        return self.ok

    def __str__(self):
        return "True" if self.ok else "False[%s]" % self.detail


def same(peer, client):
    """Whether an accepted connection's peer address is the client's own
    address (its getsockname()); a v4-mapped v6 address equals its v4 one."""
    if isinstance(peer, tuple) and isinstance(client, tuple) and same_peer(peer, client):
        return Verdict(True)
    return Verdict(False, "peer=%s client=%s same_port=%s" % (
        fa(peer), fa(client),
        isinstance(peer, tuple) and isinstance(client, tuple) and peer[1] == client[1]))


def same_port(port, addr):
    """Whether a port reported by another process is the port of `addr`."""
    if port == addr[1]:
        return Verdict(True)
    return Verdict(False, "reported port is not that of %s" % fa(addr))


def same_peer(a, b):
    """Whether two addresses name the same endpoint (a v4-mapped v6 address
    equals its v4 address)."""
    ha, hb = a[0], b[0]
    if ha.startswith("::ffff:"):
        ha = ha[7:]
    if hb.startswith("::ffff:"):
        hb = hb[7:]
    return ha == hb and a[1] == b[1]


# ---------------------------------------------------------------- libc

def cerr():
    return ecode(ctypes.get_errno())


def sa_in(host, port, family=AF_INET, pad=0):
    return (struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(host)
            + b"\0" * (8 + pad))


def sa_in6(host, port, family=AF_INET6):
    return (struct.pack("=H", family) + struct.pack("!HI", port, 0)
            + socket.inet_pton(AF_INET6, host) + struct.pack("=I", 0))


def cbuf(b):
    return ctypes.create_string_buffer(b, len(b))


def c_bind(fd, sa, ln=None):
    ctypes.set_errno(0)
    r = libc.bind(fd, cbuf(sa), len(sa) if ln is None else ln)
    return "ok" if r == 0 else cerr()


def c_connect(fd, sa, ln=None):
    ctypes.set_errno(0)
    r = libc.connect(fd, cbuf(sa), len(sa) if ln is None else ln)
    return "ok" if r == 0 else cerr()


def c_accept4(fd, flags, addr=None, addrlen=None):
    """(new fd or -1, errno name or 'ok')."""
    ctypes.set_errno(0)
    r = libc.accept4(fd, addr, addrlen, flags)
    return r, ("ok" if r >= 0 else cerr())


def adopt(fd):
    return track(socket.socket(fileno=fd))


# ---------------------------------------------------------------- processes

def fork_child(fn):
    """Runs fn() in a child process; its exit code is 0, or 1 on an exception."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.signal(signal.SIGUSR2, signal.SIG_DFL)
            signal.alarm(int(WATCHDOG))
            fn()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _children.append(pid)
    return pid


def reap(pid, timeout=T):
    deadline = time.monotonic() + timeout
    while True:
        p, status = os.waitpid(pid, os.WNOHANG)
        if p == pid:
            if pid in _children:
                _children.remove(pid)
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return "running"
        time.sleep(0.005)


def read_pipe(fd, timeout=T):
    """Everything written to a pipe until its write ends close."""
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return buf.decode() + "<timeout>"
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return buf.decode()
        buf += chunk


class Alarm(Exception):
    pass


def _raise_alarm(sig, frame):
    raise Alarm()


def one_shot(secs, handler):
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, secs)


def no_timer():
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)


# ---------------------------------------------------------------- scenarios

SCENARIOS = []


def sc(fn):
    SCENARIOS.append(fn)
    return fn


# ---- bind, close, rebind ----------------------------------------------------

@sc
def bind_port0_resolves():
    s = S()
    s.bind(("", 0))
    port = s.getsockname()[1]
    out("port_nonzero=%s" % (port != 0), "addr=%s" % fa(s.getsockname(), bound=port))
    s6 = S(AF_INET6)
    s6.bind(("", 0))
    p6 = s6.getsockname()[1]
    out("v6 port_nonzero=%s" % (p6 != 0), "addr=%s" % fa(s6.getsockname(), bound=p6))


@sc
def bind_close_rebind():
    s = S()
    s.bind(("", 0))
    port = s.getsockname()[1]
    s.close()
    s2 = S()
    out("rebind=%s" % tr(s2.bind, ("", port)), "same_port=%s" % (s2.getsockname()[1] == port))


@sc
def bind_addr_close_rebind():
    s = S()
    s.bind((A4, 0))
    port = s.getsockname()[1]
    s.close()
    s2 = S()
    out("rebind=%s" % tr(s2.bind, (A4, port)), "addr=%s" % fa(s2.getsockname(), bound=port))


@sc
def listen_close_rebind():
    l, port = listener()
    l.close()
    l2 = S()
    out("rebind=%s" % tr(l2.bind, ("", port)), "listen=%s" % tr(l2.listen, 4))
    c = connect(port)
    s, a = accept(l2)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def listen_queued_close_rebind():
    l, port = listener()
    c = connect(port)
    out("pending=%s" % readable(l))
    l.close()
    l2 = S()
    out("rebind=%s" % tr(l2.bind, ("", port)), "listen=%s" % tr(l2.listen, 4))
    c2 = connect(port)
    s, a = accept(l2)
    out("new_client_accepted peer_is_client=%s" % same(a, c2.getsockname()))


@sc
def listen_queued_close_client_sees():
    l, port = listener()
    c = connect(port)
    out("pending=%s" % readable(l))
    l.close()
    out("client_recv=%s" % tr(c.recv, 10))
    out("client_recv_again=%s" % tr(c.recv, 10))


@sc
def close_listener_three_queued_rebind():
    l, port = listener()
    cs = [connect(port) for _ in range(3)]
    out("pending=%s" % readable(l))
    l.close()
    l2 = S()
    out("rebind=%s" % tr(l2.bind, ("", port)), "listen=%s" % tr(l2.listen, 4))
    out("clients=%s" % ",".join(str(tr(c.recv, 10)) for c in cs))
    c = connect(port)
    s, a = accept(l2)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def bind_twice_einval():
    s = S()
    s.bind(("", 0))
    port = s.getsockname()[1]
    out("again_port0=%s" % tr(s.bind, ("", 0)), "again_same=%s" % tr(s.bind, ("", port)))
    s6 = S(AF_INET6)
    s6.bind(("", 0))
    out("v6 again=%s" % tr(s6.bind, ("", 0)))


@sc
def bind_listener_einval():
    l, port = listener()
    out("bind_listener=%s" % tr(l.bind, ("", 0)))


@sc
def bind_connected_einval():
    l, port, c, s = pair()
    out("bind_client=%s" % tr(c.bind, ("", 0)), "bind_accepted=%s" % tr(s.bind, ("", 0)))


@sc
def bind_not_local_v4():
    for host in (NOTLOCAL4, "198.51.100.1"):
        out("bind %s=%s" % (host, tr(S().bind, (host, 0))))


@sc
def bind_not_local_v6():
    out("bind %s=%s" % (NOTLOCAL6, tr(S(AF_INET6).bind, (NOTLOCAL6, 0))))


@sc
def bind_freebind_nonlocal():
    s = S()
    s.setsockopt(IPPROTO_IP, 15, 1)  # IP_FREEBIND
    r = tr(s.bind, ("198.51.100.1", 0))
    out("bind=%s" % r, "addr=%s" % fa(s.getsockname()))


@sc
def bind_multicast_broadcast():
    for host in ("224.0.0.1", "192.0.2.255", "255.255.255.255"):
        out("bind %s=%s" % (host, tr(S().bind, (host, 0))))


@sc
def bind_short_addrlen():
    s = S()
    out("addrlen8=%s" % c_bind(s.fileno(), sa_in(A4, 0), 8))
    s6 = S(AF_INET6)
    out("v6 addrlen16=%s" % c_bind(s6.fileno(), sa_in6(A6, 0), 16))


@sc
def bind_efault():
    s = S()
    ctypes.set_errno(0)
    r = libc.bind(s.fileno(), ctypes.c_void_p(8), 16)
    out("bind=%s" % ("ok" if r == 0 else cerr()))


@sc
def bind_unspec_family():
    s = S()
    out("unspec_any=%s" % c_bind(s.fileno(), sa_in("0.0.0.0", 0, family=0)),
        "addr=%s" % fa(s.getsockname()))
    s2 = S()
    out("unspec_addr=%s" % c_bind(s2.fileno(), sa_in(A4, 0, family=0)))


@sc
def bind_wrong_family():
    s = S()
    out("v4_socket_v6_addr=%s" % c_bind(s.fileno(), sa_in6(A6, 0)))
    s6 = S(AF_INET6)
    out("v6_socket_v4_addr16=%s" % c_bind(s6.fileno(), sa_in(A4, 0)))
    out("v6_socket_v4_addr28=%s" % c_bind(s6.fileno(), sa_in(A4, 0, pad=12)))


# ---- EADDRINUSE rules -------------------------------------------------------

REUSEADDR = (SOL_SOCKET, socket.SO_REUSEADDR, 1)
REUSEPORT = (SOL_SOCKET, socket.SO_REUSEPORT, 1)


def bound(host="", port=0, opts=(), fam=AF_INET):
    s = S(fam)
    for o in opts:
        s.setsockopt(*o)
    r = tr(s.bind, (host, port))
    return s, r


@sc
def inuse_bound_bound():
    a, _ = bound()
    port = a.getsockname()[1]
    b, r = bound(port=port)
    out("second_bind=%s" % r)


@sc
def inuse_listener_bound():
    l, port = listener()
    b, r = bound(port=port)
    out("second_bind=%s" % r)


@sc
def reuseaddr_bound_bound():
    a, _ = bound(opts=[REUSEADDR])
    port = a.getsockname()[1]
    b, r = bound(port=port, opts=[REUSEADDR])
    out("second_bind=%s" % r)
    out("listen_first=%s" % tr(a.listen, 4), "listen_second=%s" % tr(b.listen, 4))


@sc
def reuseaddr_vs_listener():
    l, port = listener(opts=[REUSEADDR])
    b, r = bound(port=port, opts=[REUSEADDR])
    out("second_bind=%s" % r)


@sc
def reuseaddr_one_side():
    a, _ = bound(opts=[REUSEADDR])
    port = a.getsockname()[1]
    b, r = bound(port=port)
    out("second_bind_without=%s" % r)
    a2, _ = bound()
    port2 = a2.getsockname()[1]
    b2, r2 = bound(port=port2, opts=[REUSEADDR])
    out("second_bind_with=%s" % r2)


@sc
def reuseport_both_listen():
    a, _ = bound(opts=[REUSEPORT])
    port = a.getsockname()[1]
    b, r = bound(port=port, opts=[REUSEPORT])
    out("second_bind=%s" % r)
    out("listen_a=%s" % tr(a.listen, 4), "listen_b=%s" % tr(b.listen, 4))
    c = connect(port)
    p = select.poll()
    p.register(a, select.POLLIN)
    p.register(b, select.POLLIN)
    ready = p.poll(int(T * 1000))
    out("ready_count=%d" % len(ready))
    if ready:
        l = a if ready[0][0] == a.fileno() else b
        other = b if l is a else a
        s, peer = accept(l)
        out("peer_is_client=%s" % same(peer, c.getsockname()),
            "other_readable=%s" % bool(pollmask(other, 0, select.POLLIN)))


@sc
def reuseport_one_side():
    a, _ = bound(opts=[REUSEPORT])
    port = a.getsockname()[1]
    b, r = bound(port=port)
    out("second_bind=%s" % r)


@sc
def inuse_wildcard_specific():
    a, _ = bound("")
    port = a.getsockname()[1]
    out("wild_then_addr=%s" % bound(A4, port)[1])
    b, _ = bound(A4)
    port2 = b.getsockname()[1]
    out("addr_then_wild=%s" % bound("", port2)[1])


@sc
def reuseaddr_wildcard_specific():
    a, _ = bound("", opts=[REUSEADDR])
    port = a.getsockname()[1]
    b, r = bound(A4, port, opts=[REUSEADDR])
    out("bound_only=%s" % r)
    l, lport = listener(opts=[REUSEADDR])
    out("vs_listener=%s" % bound(A4, lport, opts=[REUSEADDR])[1])


@sc
def inuse_v6_dual_v4():
    a, _ = bound("", fam=AF_INET6)
    port = a.getsockname()[1]
    out("v4_after_dual_v6=%s" % bound("", port)[1])
    b, _ = bound("")
    port2 = b.getsockname()[1]
    out("dual_v6_after_v4=%s" % bound("", port2, fam=AF_INET6)[1])


@sc
def v6only_and_v4_share_port():
    l6 = S(AF_INET6)
    l6.setsockopt(IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    l6.bind(("", 0))
    port = l6.getsockname()[1]
    l6.listen(4)
    l4 = S()
    out("v4_bind=%s" % tr(l4.bind, ("", port)), "v4_listen=%s" % tr(l4.listen, 4))
    c4 = connect(port, A4)
    c6 = connect(port, A6)
    s4, a4 = accept(l4)
    s6, a6 = accept(l6)
    out("v4 accepted family=%s peer_is_client=%s" % (s4.family.name, same(a4, c4.getsockname())))
    out("v6 accepted family=%s peer_is_client=%s" % (s6.family.name, same(a6, c6.getsockname())))


@sc
def inuse_after_active_close():
    l, port = listener(opts=[REUSEADDR])
    c = connect(port)
    s, _ = accept(l)
    s.close()  # the server closes first: its end lingers (FIN_WAIT2/TIME_WAIT)
    out("client_eof=%s" % tr(c.recv, 10))
    c.close()
    l.close()
    out("rebind_without_reuseaddr=%s" % bound("", port)[1])
    n, r = bound("", port, opts=[REUSEADDR])
    out("rebind_with_reuseaddr=%s" % r, "listen=%s" % tr(n.listen, 4))


@sc
def rebind_after_passive_close():
    l, port = listener()
    c = connect(port)
    s, _ = accept(l)
    c.close()  # the client closes first
    out("server_eof=%s" % tr(s.recv, 10))
    s.close()
    l.close()
    res = []

    def attempt():
        n = S()
        r = tr(n.bind, ("", port))
        res.append(r)
        if r != "ok":
            n.close()
        return r == "ok"

    wait_until(attempt, 3.0)
    out("rebind=%s" % res[-1])


@sc
def tcp_udp_same_port():
    l, port = listener()
    u = S(typ=socket.SOCK_DGRAM)
    out("udp_bind_same_port=%s" % tr(u.bind, ("", port)))


# ---- IPv4, IPv6, dual stack -------------------------------------------------

@sc
def v6_echo():
    l, port, c, s = pair(AF_INET6)
    out("listener=%s" % fa(l.getsockname(), srv=port))
    out("client sock=%s peer=%s" % (fa(c.getsockname(), srv=port), fa(c.getpeername(), srv=port)))
    out("accepted sock=%s peer_is_client=%s" % (fa(s.getsockname(), srv=port),
                                                 same(s.getpeername(), c.getsockname())))
    c.sendall(b"v6 ping")
    out("echo=%r" % recv_exact(s, 7))


@sc
def dualstack_v4_client():
    l, port = listener(AF_INET6)
    c = connect(port, A4)
    s, a = accept(l)
    out("accepted family=%s" % s.family.name)
    out("peer=%s" % fa(a), "peer_is_client=%s" % same(a, c.getsockname()))
    out("sock=%s" % fa(s.getsockname(), srv=port))
    c.sendall(b"dual")
    out("echo=%r" % recv_exact(s, 4))


@sc
def v6only_default():
    s = S(AF_INET6)
    out("v6only=%d" % geti(s, IPPROTO_IPV6, socket.IPV6_V6ONLY))


@sc
def v6only_set_get():
    s = S(AF_INET6)
    s.setsockopt(IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    a = geti(s, IPPROTO_IPV6, socket.IPV6_V6ONLY)
    s.setsockopt(IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    b = geti(s, IPPROTO_IPV6, socket.IPV6_V6ONLY)
    s.setsockopt(IPPROTO_IPV6, socket.IPV6_V6ONLY, 7)
    out("after_1=%d after_0=%d after_7=%d" % (a, b, geti(s, IPPROTO_IPV6, socket.IPV6_V6ONLY)))


@sc
def v6only_effect():
    l, port = listener(AF_INET6, opts=[(IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)])
    c4 = S()
    out("v4_client=%s" % tr(c4.connect, (A4, port)))
    c6 = connect(port, A6)
    s, a = accept(l)
    out("v6_client accepted peer_is_client=%s" % same(a, c6.getsockname()))


@sc
def v6only_after_bind():
    s = S(AF_INET6)
    s.bind(("", 0))
    out("set_after_bind=%s" % tr(s.setsockopt, IPPROTO_IPV6, socket.IPV6_V6ONLY, 1),
        "get=%d" % geti(s, IPPROTO_IPV6, socket.IPV6_V6ONLY))
    s.listen(4)
    out("set_after_listen=%s" % tr(s.setsockopt, IPPROTO_IPV6, socket.IPV6_V6ONLY, 1))


@sc
def v6only_on_v4_socket():
    s = S()
    out("set=%s" % tr(s.setsockopt, IPPROTO_IPV6, socket.IPV6_V6ONLY, 1),
        "get=%s" % tr(s.getsockopt, IPPROTO_IPV6, socket.IPV6_V6ONLY))


@sc
def v6_bind_v4mapped():
    l = S(AF_INET6)
    out("bind=%s" % tr(l.bind, (MAPPED4, 0)))
    port = l.getsockname()[1]
    out("sock=%s" % fa(l.getsockname(), srv=port))
    l.listen(4)
    c = connect(port, A4)
    s, a = accept(l)
    out("accepted peer=%s peer_is_client=%s" % (fa(a), same(a, c.getsockname())))


@sc
def v6only_bind_v4mapped():
    s = S(AF_INET6)
    s.setsockopt(IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    out("bind=%s" % tr(s.bind, (MAPPED4, 0)))


@sc
def v6_connect_v4mapped():
    l, port = listener()
    c = S(AF_INET6)
    out("connect=%s" % tr(c.connect, (MAPPED4, port)))
    s, a = accept(l)
    out("client sock=%s peer=%s" % (fa(c.getsockname(), srv=port), fa(c.getpeername(), srv=port)))
    out("accepted family=%s peer_is_client=%s" % (s.family.name, same(a, c.getsockname())))


@sc
def v6only_connect_v4mapped():
    l, port = listener()
    c = S(AF_INET6)
    c.setsockopt(IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    out("connect=%s" % tr(c.connect, (MAPPED4, port)))


@sc
def connect_v6addr_on_v4_socket():
    l, port = listener(AF_INET6)
    c = S(timeout=None)
    out("connect=%s" % c_connect(c.fileno(), sa_in6(A6, port)))


@sc
def connect_v4addr_on_v6_socket():
    l, port = listener()
    c = S(AF_INET6, timeout=None)
    out("connect_len16=%s" % c_connect(c.fileno(), sa_in(A4, port)))
    out("connect_len28=%s" % c_connect(c.fileno(), sa_in(A4, port, pad=12)))


@sc
def v6_listener_specific_addr():
    l, port = listener(AF_INET6, A6)
    c4 = S()
    out("v4_client=%s" % tr(c4.connect, (A4, port)))
    c6 = connect(port, A6)
    s, a = accept(l)
    out("v6 accepted sock=%s peer_is_client=%s" % (fa(s.getsockname(), srv=port),
                                                   same(a, c6.getsockname())))


@sc
def v4_listener_specific_addr():
    l, port = listener(AF_INET, A4)
    out("listener=%s" % fa(l.getsockname(), srv=port))
    c = connect(port, A4)
    s, a = accept(l)
    out("accepted sock=%s peer_is_client=%s" % (fa(s.getsockname(), srv=port),
                                                same(a, c.getsockname())))


# ---- getsockname / getpeername ----------------------------------------------

@sc
def names_fresh():
    s = S()
    out("v4 sock=%s peer=%s" % (fa(s.getsockname()), tr(s.getpeername)))
    s6 = S(AF_INET6)
    out("v6 sock=%s peer=%s" % (fa(s6.getsockname()), tr(s6.getpeername)))


@sc
def names_bound():
    s = S()
    s.bind((A4, 0))
    port = s.getsockname()[1]
    out("sock=%s peer=%s" % (fa(s.getsockname(), bound=port), tr(s.getpeername)))


@sc
def names_listening():
    l, port = listener()
    out("sock=%s peer=%s" % (fa(l.getsockname(), srv=port), tr(l.getpeername)))
    l6, port6 = listener(AF_INET6)
    out("v6 sock=%s peer=%s" % (fa(l6.getsockname(), srv=port6), tr(l6.getpeername)))


@sc
def names_connecting():
    c = S(timeout=0.0)
    out("connect=%s" % ecode(c.connect_ex((BH4, 80))))
    out("sock=%s peer=%s" % (fa(c.getsockname()), tr(c.getpeername)))


@sc
def names_connected_and_accepted():
    l, port, c, s = pair()
    out("client sock=%s peer=%s" % (fa(c.getsockname(), srv=port), fa(c.getpeername(), srv=port)))
    out("accepted sock=%s peer_is_client=%s" % (fa(s.getsockname(), srv=port),
                                                same(s.getpeername(), c.getsockname())))
    out("client_peer_is_accepted=%s" % same(c.getpeername(), s.getsockname()))


@sc
def names_after_peer_close():
    l, port, c, s = pair()
    s.close()
    out("eof=%s" % tr(c.recv, 10))
    out("sock=%s peer=%s" % (fa(c.getsockname(), srv=port), fa(tv(c.getpeername), srv=port)))


@sc
def names_after_shutdown():
    l, port, c, s = pair()
    me = c.getsockname()
    c.shutdown(socket.SHUT_RDWR)
    out("client sock_same=%s peer=%s" % (tv(c.getsockname) == me, fa(tv(c.getpeername), srv=port)))
    out("accepted eof=%s" % tr(s.recv, 10))
    out("accepted sock=%s peer_is_client=%s" % (fa(tv(s.getsockname), srv=port),
                                                same(tv(s.getpeername), me)))
    s.shutdown(socket.SHUT_WR)
    # LAST_ACK until the client acknowledges the FIN, then CLOSE
    out("accepted after shut_wr: state=%s" % wait_state(s, "CLOSE"),
        "peer=%s" % fa(tv(s.getpeername)))


@sc
def names_after_reset():
    l, port, c, s = pair()
    s.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    out("recv=%s" % tr(c.recv, 10))
    out("peer=%s" % fa(tv(c.getpeername), srv=port))


@sc
def getsockname_small_buffer():
    s = S()
    s.bind((A4, 0))
    buf = ctypes.create_string_buffer(4)
    ln = ctypes.c_uint32(4)
    ctypes.set_errno(0)
    r = libc.getsockname(s.fileno(), buf, ctypes.byref(ln))
    fam = struct.unpack("=H", buf.raw[:2])[0]
    out("ret=%s len=%d family=%d" % ("ok" if r == 0 else cerr(), ln.value, fam))


@sc
def getname_efault():
    l, port, c, s = pair()
    ln = ctypes.c_uint32(16)
    ctypes.set_errno(0)
    r = libc.getsockname(c.fileno(), ctypes.c_void_p(8), ctypes.byref(ln))
    out("getsockname=%s" % ("ok" if r == 0 else cerr()))
    ln = ctypes.c_uint32(16)
    ctypes.set_errno(0)
    r = libc.getpeername(c.fileno(), ctypes.c_void_p(8), ctypes.byref(ln))
    out("getpeername=%s" % ("ok" if r == 0 else cerr()))


# ---- listen -----------------------------------------------------------------

@sc
def listen_without_bind():
    l = S()
    out("listen=%s" % tr(l.listen, 4))
    port = l.getsockname()[1]
    out("port_nonzero=%s addr=%s" % (port != 0, fa(l.getsockname(), srv=port)))
    c = connect(port)
    s, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def listen_without_bind_v6():
    l = S(AF_INET6)
    out("listen=%s" % tr(l.listen, 4))
    port = l.getsockname()[1]
    out("port_nonzero=%s addr=%s" % (port != 0, fa(l.getsockname(), srv=port)))
    c = connect(port, A6)
    s, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def listen_twice():
    l, port = listener()
    out("again=%s" % tr(l.listen, 32), "port_same=%s" % (l.getsockname()[1] == port))
    c = connect(port)
    s, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def listen_after_connect():
    l, port, c, s = pair()
    out("client=%s" % tr(c.listen, 4), "accepted=%s" % tr(s.listen, 4))


@sc
def listen_after_failed_connect():
    b, port = closed_port()
    c = S()
    out("connect=%s" % tr(c.connect, (A4, port)))
    out("listen=%s" % tr(c.listen, 4), "acceptconn=%s" % tr(geti, c, SOL_SOCKET, socket.SO_ACCEPTCONN))


@sc
def shutdown_listener_rdwr():
    l, port = listener()
    out("shutdown=%s" % tr(l.shutdown, socket.SHUT_RDWR))
    l.setblocking(False)
    out("accept=%s" % tr(l.accept))
    c = S()
    out("connect=%s" % tr(c.connect, (A4, port)))
    p2 = l.getsockname()[1]
    out("port_after=%s" % ("same" if p2 == port else "0" if p2 == 0 else "other"))
    out("listen_again=%s" % tr(l.listen, 4))
    p3 = l.getsockname()[1]
    out("port_relisten=%s" % ("same" if p3 == port else "0" if p3 == 0 else "other"))
    l.settimeout(T)
    c2 = connect(p3)
    s, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c2.getsockname()))


@sc
def shutdown_listener_rd_bound_port():
    f = S()
    f.bind(("", 0))
    port = f.getsockname()[1]
    f.close()
    b = S()
    b.bind(("", port))  # an explicit port stays bound through shutdown
    b.listen(4)
    out("shutdown_rd=%s" % tr(b.shutdown, socket.SHUT_RD))
    p2 = b.getsockname()[1]
    out("port_after=%s" % ("same" if p2 == port else "0" if p2 == 0 else "other"))
    c = S()
    out("connect=%s" % tr(c.connect, (A4, port)))
    out("listen_again=%s" % tr(b.listen, 4))
    p3 = b.getsockname()[1]
    out("port_relisten=%s" % ("same" if p3 == port else "0" if p3 == 0 else "other"))
    c2 = connect(p3)
    s, a = accept(b)
    out("accepted peer_is_client=%s" % same(a, c2.getsockname()))


@sc
def shutdown_listener_wr():
    l, port = listener()
    out("shutdown_wr=%s" % tr(l.shutdown, socket.SHUT_WR))
    c = connect(port)
    s, a = accept(l)
    out("still_accepts peer_is_client=%s" % same(a, c.getsockname()))


# ---- connect ----------------------------------------------------------------

@sc
def connect_nonblocking_complete():
    l, port = listener()
    c = S(timeout=0.0)
    out("first=%s" % ecode(c.connect_ex((A4, port))))
    out("poll=%s" % pm(wait_mask(c, select.POLLOUT)))
    out("second=%s" % ecode(c.connect_ex((A4, port))), "third=%s" % ecode(c.connect_ex((A4, port))))
    out("so_error=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)))
    s, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def connect_nonblocking_inflight():
    c = S(timeout=0.0)
    out("first=%s" % ecode(c.connect_ex((BH4, 80))))
    out("second=%s" % ecode(c.connect_ex((BH4, 80))), "third=%s" % ecode(c.connect_ex((BH4, 80))))
    out("poll=%s" % pm(pollmask(c, 0)))
    out("so_error=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)), "state=%s" % tcp_state(c))
    out("other_addr=%s" % ecode(c.connect_ex((A4, 80))))


@sc
def connect_refused_blocking():
    b, port = closed_port()
    c = S(timeout=None)
    out("connect=%s" % tr(c.connect, (A4, port)))
    out("so_error=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)), "state=%s" % tcp_state(c))
    out("again=%s" % tr(c.connect, (A4, port)))


@sc
def connect_refused_nonblocking():
    b, port = closed_port()
    c = S(timeout=0.0)
    out("connect=%s" % ecode(c.connect_ex((A4, port))))
    out("poll=%s" % pm(wait_mask(c, select.POLLERR | select.POLLHUP)))
    out("so_error=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)),
        "so_error_again=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)))
    out("connect_after=%s" % ecode(c.connect_ex((A4, port))))


@sc
def connect_refused_nonblocking_no_soerror():
    b, port = closed_port()
    c = S(timeout=0.0)
    out("connect=%s" % ecode(c.connect_ex((A4, port))))
    wait_mask(c, select.POLLERR | select.POLLHUP)
    out("connect_after=%s" % ecode(c.connect_ex((A4, port))),
        "so_error=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)))


@sc
def connect_refused_v6():
    b, port = closed_port(AF_INET6)
    c = S(AF_INET6, timeout=None)
    out("connect=%s" % tr(c.connect, (A6, port)))


@sc
def connect_refused_python_timeout():
    b, port = closed_port()
    c = S(timeout=T)
    out("connect=%s" % tr(c.connect, (A4, port)))


@sc
def connect_twice_connected():
    l, port, c, s = pair()
    l2, port2 = listener()
    out("same=%s" % tr(c.connect, (A4, port)), "other=%s" % tr(c.connect, (A4, port2)))
    out("nonblocking same=%s" % ecode(c.connect_ex((A4, port))))


@sc
def connect_on_listener():
    l, port = listener()
    l2, port2 = listener()
    out("connect=%s" % tr(l.connect, (A4, port2)))
    out("still_listening acceptconn=%d" % geti(l, SOL_SOCKET, socket.SO_ACCEPTCONN))


@sc
def connect_retry_after_refused():
    b = S()
    b.bind(("", 0))
    port = b.getsockname()[1]
    c = S(timeout=None)
    out("first=%s" % tr(c.connect, (A4, port)))
    b.listen(4)
    b.settimeout(T)
    out("second=%s" % tr(c.connect, (A4, port)))
    s, a = accept(b)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def connect_sndtimeo_blackhole():
    c = S(timeout=None)
    c.setsockopt(SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 200000))
    out("connect=%s" % tr(c.connect, (BH4, 80)))
    out("again=%s" % ecode(c.connect_ex((BH4, 80))), "state=%s" % tcp_state(c))


@sc
def connect_unspec_disconnect():
    l, port, c, s = pair()
    out("disconnect=%s" % c_connect(c.fileno(), sa_in("0.0.0.0", 0, family=0)))
    out("peer=%s" % tr(c.getpeername), "state=%s" % tcp_state(c))
    out("server_recv=%s" % tr(s.recv, 10))
    c.settimeout(T)
    out("reconnect=%s" % tr(c.connect, (A4, port)))
    s2, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def connect_unspec_connecting():
    c = S(timeout=0.0)
    out("connect=%s" % ecode(c.connect_ex((BH4, 80))))
    out("disconnect=%s" % c_connect(c.fileno(), sa_in("0.0.0.0", 0, family=0)),
        "state=%s" % tcp_state(c))
    out("peer=%s" % tr(c.getpeername))
    l, port = listener()
    c.settimeout(T)
    out("reconnect=%s" % tr(c.connect, (A4, port)))
    s, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def shutdown_connecting_reconnect():
    c = S(timeout=0.0)
    out("connect=%s" % ecode(c.connect_ex((BH4, 80))))
    out("shutdown=%s" % tr(c.shutdown, socket.SHUT_WR), "state=%s" % tcp_state(c))
    l, port = listener()
    c.settimeout(T)
    out("reconnect=%s" % tr(c.connect, (A4, port)))
    s, a = accept(l)
    c.sendall(b"after")
    out("accepted got=%r" % recv_exact(s, 5))


@sc
def connect_efault():
    l, port = listener()
    c = S(timeout=None)
    ctypes.set_errno(0)
    r = libc.connect(c.fileno(), ctypes.c_void_p(8), 16)
    out("connect=%s" % ("ok" if r == 0 else cerr()))


@sc
def connect_short_addrlen():
    l, port = listener()
    c = S(timeout=None)
    out("addrlen8=%s" % c_connect(c.fileno(), sa_in(A4, port), 8))


@sc
def connect_from_bound_socket():
    l, port = listener()
    c = S()
    c.bind((A4, 0))
    bport = c.getsockname()[1]
    c.connect((A4, port))
    s, a = accept(l)
    out("local_port_kept=%s peer_port_is_bound=%s" % (c.getsockname()[1] == bport, a[1] == bport))


@sc
def connect_after_listener_closed():
    l, port = listener()
    l.close()
    c = S(timeout=None)
    out("connect=%s" % tr(c.connect, (A4, port)))


@sc
def shutdown_connecting():
    c = S(timeout=0.0)
    out("connect=%s" % ecode(c.connect_ex((BH4, 80))))
    out("shutdown=%s" % tr(c.shutdown, socket.SHUT_RDWR), "state=%s" % tcp_state(c))
    out("peer=%s" % tr(c.getpeername))


# ---- accept -----------------------------------------------------------------

@sc
def accept4_flags():
    l, port = listener(timeout=None)
    c1 = connect(port)
    c2 = connect(port)
    readable(l)
    fd, r = c_accept4(l.fileno(), socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    out("nonblock_cloexec=%s" % r, flags_of(fd) if fd >= 0 else "")
    if fd >= 0:
        adopt(fd)
    readable(l)
    fd, r = c_accept4(l.fileno(), 0)
    out("no_flags=%s" % r, flags_of(fd) if fd >= 0 else "")
    if fd >= 0:
        adopt(fd)


@sc
def accept4_flags_nonblocking_listener():
    l, port = listener(timeout=0.0)
    c = connect(port)
    readable(l)
    fd, r = c_accept4(l.fileno(), 0)
    out("accept=%s" % r, flags_of(fd) if fd >= 0 else "")
    if fd >= 0:
        adopt(fd)


@sc
def accept4_bad_flags():
    l, port = listener(timeout=None)
    c = connect(port)
    readable(l)
    fd, r = c_accept4(l.fileno(), 1)
    out("bad_flags=%s" % r)
    if fd >= 0:
        adopt(fd)
    s, a = accept(l)
    out("then_accept peer_is_client=%s" % same(a, c.getsockname()))


@sc
def accept_not_listening():
    s = S(timeout=None)
    out("fresh=%s" % tr(s.accept))
    b = S(timeout=None)
    b.bind(("", 0))
    out("bound=%s" % tr(b.accept))
    l, port, c, a = pair()
    c.settimeout(None)
    out("connected=%s" % tr(c.accept))


@sc
def accept_nonblocking_empty():
    l, port = listener(timeout=0.0)
    out("accept=%s" % tr(l.accept))
    fd, r = c_accept4(l.fileno(), socket.SOCK_NONBLOCK)
    out("accept4=%s" % r)


@sc
def accept_null_addr():
    l, port = listener(timeout=None)
    c = connect(port)
    readable(l)
    ctypes.set_errno(0)
    fd = libc.accept(l.fileno(), None, None)
    out("accept=%s" % ("ok" if fd >= 0 else cerr()))
    if fd >= 0:
        s = adopt(fd)
        out("peer_is_client=%s" % same(s.getpeername(), c.getsockname()))


@sc
def accept_small_addrlen():
    l, port = listener(timeout=None)
    c = connect(port)
    readable(l)
    buf = ctypes.create_string_buffer(4)
    ln = ctypes.c_uint32(4)
    fd, r = c_accept4(l.fileno(), 0, buf, ctypes.byref(ln))
    out("accept=%s len=%d family=%d" % (r, ln.value, struct.unpack("=H", buf.raw[:2])[0]))
    if fd >= 0:
        adopt(fd)


@sc
def accept_efault_drops_connection():
    l, port = listener(timeout=None)
    c = connect(port)
    readable(l)
    ln = ctypes.c_uint32(16)
    fd, r = c_accept4(l.fileno(), 0, ctypes.c_void_p(8), ctypes.byref(ln))
    out("accept=%s" % r)
    if fd >= 0:
        adopt(fd)
    out("client_recv=%s" % tr(c.recv, 10))
    l.settimeout(0.0)
    out("accept_again=%s" % tr(l.accept))


@sc
def accept_inherits_options():
    l, port = listener(opts=[(IPPROTO_TCP, socket.TCP_NODELAY, 1),
                             (SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                             (IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)])
    c = connect(port)
    s, a = accept(l)
    out("nodelay=%d keepalive=%d keepidle=%d" % (geti(s, IPPROTO_TCP, socket.TCP_NODELAY),
                                                 geti(s, SOL_SOCKET, socket.SO_KEEPALIVE),
                                                 geti(s, IPPROTO_TCP, socket.TCP_KEEPIDLE)))
    out("client nodelay=%d keepalive=%d" % (geti(c, IPPROTO_TCP, socket.TCP_NODELAY),
                                            geti(c, SOL_SOCKET, socket.SO_KEEPALIVE)))


@sc
def accept_order_fifo():
    l, port = listener()
    cs = []
    for i in range(3):
        c = connect(port)
        c.sendall(bytes([i]))
        cs.append(c)
    order = []
    for i in range(3):
        s, a = accept(l)
        order.append([j for j, c in enumerate(cs) if c.getsockname() == a])
    out("order=%s" % order)


@sc
def accept_rcvtimeo():
    l, port = listener(timeout=None)
    l.setsockopt(SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    out("accept=%s" % tr(l.accept))


# ---- shutdown -----------------------------------------------------------------

@sc
def half_close():
    l, port, c, s = pair()
    c.sendall(b"request")
    out("shutdown_wr=%s" % tr(c.shutdown, socket.SHUT_WR))
    out("server_read=%r" % recv_to_eof(s))
    s.sendall(b"reply after eof")
    s.close()
    out("client_read=%r" % recv_to_eof(c))


@sc
def shutdown_rd_local():
    l, port, c, s = pair()
    out("shutdown_rd=%s" % tr(s.shutdown, socket.SHUT_RD))
    out("recv_after=%s" % tr(s.recv, 10))
    out("poll=%s" % pm(pollmask(s, 0)))
    out("peer_send=%s" % tr(c.send, b"late"))
    out("inq=%s" % wait_inq(s, 4))
    out("recv_late=%s" % tr(s.recv, 10))
    out("send_still=%s" % tr(s.send, b"back"))
    out("peer_got=%r" % recv_exact(c, 4))


@sc
def shutdown_wr_send_epipe():
    l, port, c, s = pair()
    c.shutdown(socket.SHUT_WR)
    out("send=%s" % tr(c.send, b"x", socket.MSG_NOSIGNAL))
    out("os_write=%s" % tr(os.write, c.fileno(), b"x"))
    out("peer_eof=%r" % recv_to_eof(s))
    out("poll=%s" % pm(pollmask(c, 0)))


@sc
def shutdown_rdwr():
    l, port, c, s = pair()
    out("shutdown=%s" % tr(c.shutdown, socket.SHUT_RDWR))
    out("recv=%s" % tr(c.recv, 10), "send=%s" % tr(c.send, b"x", socket.MSG_NOSIGNAL))
    out("peer_recv=%s" % tr(s.recv, 10))
    out("poll=%s" % pm(pollmask(c, 0)))


@sc
def shutdown_rdwr_peer_writes():
    l, port, c, s = pair()
    c.shutdown(socket.SHUT_RDWR)
    out("peer_recv=%s" % tr(s.recv, 10))
    out("peer_send=%s" % tr(s.send, b"x"))
    m = wait_mask(s, select.POLLERR)
    out("peer_poll=%s" % pm(m), "peer_so_error=%s" % ecode(geti(s, SOL_SOCKET, socket.SO_ERROR)))


@sc
def shutdown_fresh():
    s = S()
    out("rd=%s wr=%s rdwr=%s" % (tr(s.shutdown, socket.SHUT_RD), tr(s.shutdown, socket.SHUT_WR),
                                 tr(s.shutdown, socket.SHUT_RDWR)))
    out("poll_after=%s" % pm(pollmask(s, 0)))


@sc
def shutdown_invalid_how():
    l, port, c, s = pair()
    out("connected how3=%s how_minus1=%s" % (tr(c.shutdown, 3), tr(c.shutdown, -1)))
    f = S()
    out("fresh how3=%s" % tr(f.shutdown, 3))
    c.sendall(b"still")
    out("still_connected=%r" % recv_exact(s, 5))


@sc
def shutdown_wr_twice():
    l, port, c, s = pair()
    out("first=%s second=%s" % (tr(c.shutdown, socket.SHUT_WR), tr(c.shutdown, socket.SHUT_WR)))
    out("rd_after=%s" % tr(c.shutdown, socket.SHUT_RD))


# ---- send / recv --------------------------------------------------------------

@sc
def sendto_connected_with_addr():
    l, port, c, s = pair()
    out("sendto=%s" % tr(c.sendto, b"abc", ("198.51.100.7", 9)))
    out("peer_got=%r" % recv_exact(s, 3))


@sc
def sendmsg_connected_with_addr():
    l, port, c, s = pair()
    out("sendmsg=%s" % tr(c.sendmsg, [b"ab", b"cd"], [], 0, ("198.51.100.7", 9)))
    out("sendmsg_noaddr=%s" % tr(c.sendmsg, [b"ef"]))
    out("peer_got=%r" % recv_exact(s, 6))


@sc
def sendto_unconnected():
    l, port = listener()
    c = S(timeout=None)
    out("sendto=%s" % tr(c.sendto, b"x", (A4, port)))
    out("sendto_nosignal=%s" % tr(c.sendto, b"x", socket.MSG_NOSIGNAL, (A4, port)))
    l.settimeout(0.0)
    out("listener_accept=%s" % tr(l.accept))


@sc
def send_fresh():
    s = S(timeout=None)
    out("send_nosignal=%s send=%s" % (tr(s.send, b"x", socket.MSG_NOSIGNAL), tr(s.send, b"x")))
    out("sendmsg=%s" % tr(s.sendmsg, [b"x"]))


@sc
def recv_fresh():
    s = S(timeout=None)
    out("recv=%s" % tr(s.recv, 10), "recv_dontwait=%s" % tr(s.recv, 10, socket.MSG_DONTWAIT))
    out("os_read=%s os_write=%s" % (tr(os.read, s.fileno(), 10), tr(os.write, s.fileno(), b"x")))


@sc
def recv_bound_and_listener():
    b = S(timeout=None)
    b.bind(("", 0))
    out("bound recv=%s send=%s" % (tr(b.recv, 10), tr(b.send, b"x")))
    l, port = listener(timeout=None)
    out("listener recv=%s send=%s" % (tr(l.recv, 10), tr(l.send, b"x")))


@sc
def recv_peek():
    l, port, c, s = pair()
    c.sendall(b"hello")
    got = wait_until(lambda: len(s.recv(16, socket.MSG_PEEK)) >= 5 and True)
    out("peek_ready=%s" % bool(got), "peek=%r" % s.recv(16, socket.MSG_PEEK))
    out("recv=%r" % s.recv(16))


@sc
def recv_dontwait_empty():
    l, port, c, s = pair()
    s.settimeout(None)
    out("recv=%s" % tr(s.recv, 10, socket.MSG_DONTWAIT))
    c.sendall(b"z")
    wait_inq(s, 1)
    out("after_data=%s" % tr(s.recv, 10, socket.MSG_DONTWAIT))


@sc
def recv_waitall():
    l, port, c, s = pair()
    s.settimeout(None)
    for i in range(3):
        c.sendall(bytes([65 + i]) * 100)
    d = s.recv(300, socket.MSG_WAITALL)
    out("waitall_len=%d ok=%s" % (len(d), d == b"A" * 100 + b"B" * 100 + b"C" * 100))
    c.sendall(b"D" * 100)
    c.close()
    d = s.recv(300, socket.MSG_WAITALL)
    out("waitall_at_eof_len=%d" % len(d))


@sc
def recv_trunc_discards():
    l, port, c, s = pair()
    c.sendall(b"0123456789")
    wait_inq(s, 10)
    s.settimeout(None)
    out("trunc_len=%d" % len(s.recv(4, socket.MSG_TRUNC)))
    out("rest=%r" % s.recv(100))


@sc
def recvmsg_data_and_eof():
    l, port, c, s = pair()
    c.sendall(b"msg")
    wait_inq(s, 3)
    data, anc, flags, addr = s.recvmsg(16)
    out("data=%r anc=%r flags=%d addr=%r" % (data, anc, flags, addr))
    c.close()
    data, anc, flags, addr = s.recvmsg(16)
    out("eof data=%r flags=%d" % (data, flags))


@sc
def send_recv_zero_bytes():
    l, port, c, s = pair()
    out("send_empty=%s" % tr(c.send, b""), "recv_zero=%s" % tr(s.recv, 0))


@sc
def oob_send_recv():
    l, port, c, s = pair()
    s.settimeout(None)
    c.sendall(b"ab")
    out("send_oob=%s" % tr(c.send, b"!", socket.MSG_OOB))
    out("poll=%s" % pm(wait_mask(s, select.POLLPRI)))
    out("recv_oob=%s" % tr(s.recv, 1, socket.MSG_OOB))
    s.settimeout(T)
    out("normal=%r" % recv_exact(s, 2))


@sc
def oob_inline():
    l, port, c, s = pair()
    s.setsockopt(SOL_SOCKET, socket.SO_OOBINLINE, 1)
    out("oobinline=%d" % geti(s, SOL_SOCKET, socket.SO_OOBINLINE))
    c.sendall(b"ab")
    c.send(b"!", socket.MSG_OOB)
    c.sendall(b"cd")
    out("inline=%r" % recv_exact(s, 5))
    s.settimeout(None)
    out("recv_oob=%s" % tr(s.recv, 1, socket.MSG_OOB))


@sc
def recv_oob_none():
    l, port, c, s = pair()
    s.settimeout(None)
    out("recv_oob=%s" % tr(s.recv, 1, socket.MSG_OOB))


@sc
def linger_zero_reset():
    l, port, c, s = pair()
    c.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    out("peer_recv=%s" % tr(s.recv, 10))
    out("peer_recv_again=%s" % tr(s.recv, 10), "peer_send=%s" % tr(s.send, b"x"))


@sc
def linger_get_set():
    s = S()

    def ling():
        return struct.unpack("ii", s.getsockopt(SOL_SOCKET, socket.SO_LINGER, 8))

    out("default=%s" % (ling(),))
    s.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a = ling()
    s.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
    b = ling()
    s.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 3))
    out("set_1_0=%s set_1_5=%s set_0_3=%s" % (a, b, ling()))
    l, port, c, a2 = pair()
    c.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 2))
    out("connected=%s" % (struct.unpack("ii", c.getsockopt(SOL_SOCKET, socket.SO_LINGER, 8)),))


@sc
def peer_close_unread_rst():
    l, port, c, s = pair()
    c.sendall(b"x" * 10)
    out("inq=%d" % wait_inq(s, 10))
    s.close()
    out("client_recv=%s" % tr(c.recv, 10))
    out("client_send=%s" % tr(c.send, b"y", socket.MSG_NOSIGNAL))


@sc
def send_after_peer_reset():
    l, port, c, s = pair()
    s.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    m = wait_mask(c, select.POLLERR | select.POLLHUP)
    out("poll=%s" % pm(m))
    out("send=%s" % tr(c.send, b"y", socket.MSG_NOSIGNAL), "then_recv=%s" % tr(c.recv, 1))


@sc
def writev_readv():
    l, port, c, s = pair()
    out("writev=%s" % tr(os.writev, c.fileno(), [b"ab", b"cd", b"ef"]))
    wait_inq(s, 6)
    b1, b2 = bytearray(2), bytearray(4)
    out("readv=%s" % tr(os.readv, s.fileno(), [b1, b2]), "data=%r" % bytes(b1 + b2))


@sc
def sendfile_to_socket():
    l, port, c, s = pair()
    data = bytes(range(256)) * 40
    fd = os.memfd_create("conf")
    try:
        os.write(fd, data)
        c.settimeout(None)
        out("sendfile=%s" % tr(os.sendfile, c.fileno(), fd, 0, len(data)))
    finally:
        os.close(fd)
    out("peer_ok=%s" % (recv_exact(s, len(data)) == data))


# ---- socket options ---------------------------------------------------------

@sc
def sockopt_type_domain_protocol():
    def tdp(s):
        return "type=%d domain=%d protocol=%d" % (geti(s, SOL_SOCKET, socket.SO_TYPE),
                                                  geti(s, SOL_SOCKET, socket.SO_DOMAIN),
                                                  geti(s, SOL_SOCKET, socket.SO_PROTOCOL))
    out("v4 fresh", tdp(S()))
    out("v6 fresh", tdp(S(AF_INET6)))
    out("v4 explicit proto", tdp(S(proto=6)))
    l, port, c, s = pair()
    out("listener", tdp(l))
    out("client", tdp(c))
    out("accepted", tdp(s))


@sc
def sockopt_acceptconn():
    f = S()
    b = S()
    b.bind(("", 0))
    l, port, c, s = pair()
    out("fresh=%d bound=%d listener=%d client=%d accepted=%d" % tuple(
        geti(x, SOL_SOCKET, socket.SO_ACCEPTCONN) for x in (f, b, l, c, s)))


@sc
def sockopt_error_states():
    l, port, c, s = pair()
    out("fresh=%s listener=%s client=%s accepted=%s" % tuple(
        ecode(geti(x, SOL_SOCKET, socket.SO_ERROR)) for x in (S(), l, c, s)))


@sc
def sockopt_reuseaddr():
    s = S()
    a = geti(s, SOL_SOCKET, socket.SO_REUSEADDR)
    s.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, 5)
    b = geti(s, SOL_SOCKET, socket.SO_REUSEADDR)
    s.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, 0)
    out("default=%d set5=%d set0=%d" % (a, b, geti(s, SOL_SOCKET, socket.SO_REUSEADDR)))
    s.setsockopt(SOL_SOCKET, socket.SO_REUSEPORT, 1)
    out("reuseport=%d" % geti(s, SOL_SOCKET, socket.SO_REUSEPORT))


@sc
def sockopt_keepalive():
    l, port, c, s = pair()
    a = geti(c, SOL_SOCKET, socket.SO_KEEPALIVE)
    c.setsockopt(SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    out("default=%d set=%d" % (a, geti(c, SOL_SOCKET, socket.SO_KEEPALIVE)))
    f = S()
    f.setsockopt(SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    out("fresh set=%d" % geti(f, SOL_SOCKET, socket.SO_KEEPALIVE))


@sc
def tcp_nodelay():
    f = S()
    a = geti(f, IPPROTO_TCP, socket.TCP_NODELAY)
    f.setsockopt(IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out("fresh default=%d set=%d" % (a, geti(f, IPPROTO_TCP, socket.TCP_NODELAY)))
    l, port, c, s = pair()
    b = geti(s, IPPROTO_TCP, socket.TCP_NODELAY)
    s.setsockopt(IPPROTO_TCP, socket.TCP_NODELAY, 1)
    d = geti(s, IPPROTO_TCP, socket.TCP_NODELAY)
    s.setsockopt(IPPROTO_TCP, socket.TCP_NODELAY, 0)
    out("accepted default=%d set=%d unset=%d" % (b, d, geti(s, IPPROTO_TCP, socket.TCP_NODELAY)))


@sc
def tcp_keepalive_params():
    l, port, c, s = pair()
    opts = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
    out("defaults=%s" % [geti(c, IPPROTO_TCP, o) for o in opts])
    for o, v in zip(opts, (30, 5, 4)):
        c.setsockopt(IPPROTO_TCP, o, v)
    out("set=%s" % [geti(c, IPPROTO_TCP, o) for o in opts])
    out("idle0=%s cnt0=%s" % (tr(c.setsockopt, IPPROTO_TCP, socket.TCP_KEEPIDLE, 0),
                              tr(c.setsockopt, IPPROTO_TCP, socket.TCP_KEEPCNT, 0)))


@sc
def tcp_info_states():
    f = S()
    l, port, c, s = pair()
    out("fresh=%s listener=%s client=%s accepted=%s" % (tcp_state(f), tcp_state(l),
                                                         tcp_state(c), tcp_state(s)))
    c.shutdown(socket.SHUT_WR)
    out("after_shut_wr client=%s accepted=%s" % (wait_state(c, "FIN_WAIT2"),
                                                  wait_state(s, "CLOSE_WAIT")))
    b, bport = closed_port()
    r = S(timeout=None)
    tr(r.connect, (A4, bport))
    out("refused=%s" % tcp_state(r))


@sc
def tcp_maxseg():
    f = S()
    a = geti(f, IPPROTO_TCP, socket.TCP_MAXSEG)
    f.setsockopt(IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
    out("fresh default=%d set1000=%d" % (a, geti(f, IPPROTO_TCP, socket.TCP_MAXSEG)))
    l, port, c, s = pair()
    out("client>0=%s accepted>0=%s" % (geti(c, IPPROTO_TCP, socket.TCP_MAXSEG) > 0,
                                        geti(s, IPPROTO_TCP, socket.TCP_MAXSEG) > 0))
    out("set_small=%s" % tr(f.setsockopt, IPPROTO_TCP, socket.TCP_MAXSEG, 10))


@sc
def tcp_congestion():
    def cc(s):
        return s.getsockopt(IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()

    f = S()
    out("fresh=%s" % cc(f))
    f.setsockopt(IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    out("set_reno=%s" % cc(f))
    out("set_bogus=%s" % tr(f.setsockopt, IPPROTO_TCP, socket.TCP_CONGESTION, b"bogus-cc"))
    l, port, c, s = pair()
    out("client=%s accepted=%s" % (cc(c), cc(s)))


@sc
def socket_buffers():
    l, port, c, s = pair()
    out("rcvbuf>0=%s sndbuf>0=%s" % (geti(c, SOL_SOCKET, socket.SO_RCVBUF) > 0,
                                     geti(c, SOL_SOCKET, socket.SO_SNDBUF) > 0))
    f = S()
    f.setsockopt(SOL_SOCKET, socket.SO_RCVBUF, 65536)
    f.setsockopt(SOL_SOCKET, socket.SO_SNDBUF, 65536)
    out("fresh set 65536: rcvbuf=%d sndbuf=%d" % (geti(f, SOL_SOCKET, socket.SO_RCVBUF),
                                                  geti(f, SOL_SOCKET, socket.SO_SNDBUF)))
    s.setsockopt(SOL_SOCKET, socket.SO_RCVBUF, 32768)
    out("accepted set 32768: rcvbuf=%d" % geti(s, SOL_SOCKET, socket.SO_RCVBUF))


@sc
def sockopt_unknown():
    s = S()
    out("get sol_socket=%s tcp=%s" % (tr(s.getsockopt, SOL_SOCKET, 9999),
                                       tr(s.getsockopt, IPPROTO_TCP, 9999)))
    out("set sol_socket=%s tcp=%s" % (tr(s.setsockopt, SOL_SOCKET, 9999, 1),
                                       tr(s.setsockopt, IPPROTO_TCP, 9999, 1)))
    out("get level 9999=%s" % tr(s.getsockopt, 9999, 1))


@sc
def sockopt_short_len():
    s = S()
    out("set_2_bytes=%s" % tr(s.setsockopt, SOL_SOCKET, socket.SO_REUSEADDR, b"\x01\x00"))
    out("get_type_1_byte=%s" % tr(s.getsockopt, SOL_SOCKET, socket.SO_TYPE, 1))
    out("get_linger_4_bytes=%s" % tr(s.getsockopt, SOL_SOCKET, socket.SO_LINGER, 4))


@sc
def sockopt_timeouts():
    s = S()
    s.setsockopt(SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 1, 500000))
    s.setsockopt(SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 2, 250000))
    out("rcvtimeo=%s sndtimeo=%s" % (
        struct.unpack("ll", s.getsockopt(SOL_SOCKET, socket.SO_RCVTIMEO, 16)),
        struct.unpack("ll", s.getsockopt(SOL_SOCKET, socket.SO_SNDTIMEO, 16))))


@sc
def rcvtimeo_recv():
    l, port, c, s = pair()
    s.settimeout(None)
    s.setsockopt(SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    out("recv=%s" % tr(s.recv, 10))


@sc
def sockopt_ip_level():
    s = S()
    ttl = geti(s, IPPROTO_IP, socket.IP_TTL)
    s.setsockopt(IPPROTO_IP, socket.IP_TTL, 33)
    s.setsockopt(IPPROTO_IP, socket.IP_TOS, 0x10)
    out("ttl_default=%d ttl=%d tos=%#x" % (ttl, geti(s, IPPROTO_IP, socket.IP_TTL),
                                           geti(s, IPPROTO_IP, socket.IP_TOS)))
    s6 = S(AF_INET6)
    hops = geti(s6, IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
    s6.setsockopt(IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 10)
    s6.setsockopt(IPPROTO_IPV6, socket.IPV6_TCLASS, 0x20)
    out("v6 hops_default=%d hops=%d tclass=%#x" % (
        hops, geti(s6, IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS),
        geti(s6, IPPROTO_IPV6, socket.IPV6_TCLASS)))
    l, port, c, a = pair()
    c.setsockopt(IPPROTO_IP, socket.IP_TOS, 0x08)
    out("connected tos=%#x" % geti(c, IPPROTO_IP, socket.IP_TOS))


@sc
def sockopt_sol_socket_misc():
    s = S()
    s.setsockopt(SOL_SOCKET, socket.SO_PRIORITY, 3)
    s.setsockopt(SOL_SOCKET, socket.SO_MARK, 7)
    s.setsockopt(SOL_SOCKET, socket.SO_RCVLOWAT, 10)
    s.setsockopt(SOL_SOCKET, socket.SO_DONTROUTE, 1)
    out("priority=%d mark=%d rcvlowat=%d dontroute=%d" % (
        geti(s, SOL_SOCKET, socket.SO_PRIORITY), geti(s, SOL_SOCKET, socket.SO_MARK),
        geti(s, SOL_SOCKET, socket.SO_RCVLOWAT), geti(s, SOL_SOCKET, socket.SO_DONTROUTE)))


@sc
def sockopt_tcp_misc():
    s = S()
    vals = [(socket.TCP_CORK, 1), (socket.TCP_USER_TIMEOUT, 1234),
            (socket.TCP_NOTSENT_LOWAT, 16384), (socket.TCP_SYNCNT, 3),
            (socket.TCP_LINGER2, 10), (socket.TCP_WINDOW_CLAMP, 40000)]
    out("quickack_fresh=%d" % geti(s, IPPROTO_TCP, socket.TCP_QUICKACK))
    for o, v in vals:
        s.setsockopt(IPPROTO_TCP, o, v)
    out("got=%s" % [geti(s, IPPROTO_TCP, o) for o, v in vals])
    l, port, c, a = pair()
    c.setsockopt(IPPROTO_TCP, socket.TCP_CORK, 1)
    out("connected cork=%d" % geti(c, IPPROTO_TCP, socket.TCP_CORK))
    c.sendall(b"corked")
    c.setsockopt(IPPROTO_TCP, socket.TCP_CORK, 0)
    out("uncorked data=%r" % recv_exact(a, 6))


@sc
def sockopt_listener_only():
    l, port = listener()
    l.setsockopt(IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    l.setsockopt(IPPROTO_TCP, socket.TCP_FASTOPEN, 5)
    out("defer_accept=%d fastopen=%d" % (geti(l, IPPROTO_TCP, socket.TCP_DEFER_ACCEPT),
                                         geti(l, IPPROTO_TCP, socket.TCP_FASTOPEN)))


@sc
def so_peercred_tcp():
    l, port, c, s = pair()
    pc = struct.unpack("3i", c.getsockopt(SOL_SOCKET, socket.SO_PEERCRED, 12))
    ps = struct.unpack("3i", s.getsockopt(SOL_SOCKET, socket.SO_PEERCRED, 12))
    out("client=%s accepted=%s" % (pc, ps))


# ---- ioctl ------------------------------------------------------------------

@sc
def fionread_after_peer_write():
    l, port, c, s = pair()
    out("empty=%d" % fionread(s))
    c.sendall(b"q" * 1000)
    readable(s)
    out("after_1000=%d" % wait_inq(s, 1000))
    s.recv(400)
    out("after_read_400=%d" % fionread(s))


@sc
def ioctl_states():
    def io(s, req):
        try:
            return struct.unpack("i", fcntl.ioctl(s.fileno(), req, b"\0" * 4))[0]
        except OSError as e:
            return en(e)

    f = S()
    l, port, c, s = pair()
    out("fionread fresh=%s listener=%s client=%s" % (io(f, termios.FIONREAD), io(l, termios.FIONREAD),
                                                     io(c, termios.FIONREAD)))
    out("siocoutq fresh=%s listener=%s" % (io(f, SIOCOUTQ), io(l, SIOCOUTQ)))


# ---- readiness ----------------------------------------------------------------

@sc
def select_listener():
    l, port = listener()
    r, w, x = select.select([l], [], [], 0)
    out("empty_readable=%s" % bool(r))
    c = connect(port)
    r, w, x = select.select([l], [], [], T)
    out("pending_readable=%s" % bool(r))
    s, a = accept(l)
    r, w, x = select.select([l], [], [], 0)
    out("after_accept_readable=%s" % bool(r))


@sc
def poll_listener():
    l, port = listener()
    out("empty=%s" % pm(pollmask(l, 0)))
    c = connect(port)
    readable(l)
    out("pending=%s" % pm(pollmask(l, 0)))
    s, a = accept(l)
    out("after_accept=%s" % pm(pollmask(l, 0)))


@sc
def epoll_lt_listener():
    l, port = listener()
    ep = select.epoll()
    try:
        ep.register(l.fileno(), select.EPOLLIN)
        out("empty_events=%d" % len(ep.poll(0)))
        c1 = connect(port)
        c2 = connect(port)
        ev = ep.poll(T)
        out("pending events=%d mask=%s" % (len(ev), pm(ev[0][1]) if ev else "-"))
        accept(l)
        out("after_one_accept_events=%d" % len(ep.poll(T)))
        accept(l)
        out("after_both_events=%d" % len(ep.poll(0)))
    finally:
        ep.close()


@sc
def epoll_et_listener():
    l, port = listener()
    ep = select.epoll()
    try:
        ep.register(l.fileno(), select.EPOLLIN | select.EPOLLET)
        c1 = connect(port)
        c2 = connect(port)
        out("first_wait_events=%d" % len(ep.poll(T)))
        a1, _ = accept(l)
        a2, _ = accept(l)
        out("accepted=2 after_drain_events=%d" % len(ep.poll(0.1)))
    finally:
        ep.close()


@sc
def epoll_connected():
    l, port, c, s = pair()
    ep = select.epoll()
    try:
        ep.register(c.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP)

        def wait_ev(bit):
            deadline = time.monotonic() + T
            while True:
                ev = ep.poll(max(0.0, deadline - time.monotonic()))
                m = ev[0][1] if ev else 0
                if m & bit or time.monotonic() >= deadline:
                    ev = ep.poll(0)
                    return pm(ev[0][1]) if ev else "0"
                time.sleep(0.002)

        out("at_once=%s" % wait_ev(select.EPOLLOUT))
        s.sendall(b"data")
        out("after_peer_write=%s" % wait_ev(select.EPOLLIN))
        s.shutdown(socket.SHUT_WR)
        out("after_peer_shut_wr=%s" % wait_ev(select.EPOLLRDHUP))
    finally:
        ep.close()


@sc
def poll_fresh_and_bound():
    f = S()
    out("fresh=%s" % pm(pollmask(f, 0)))
    b = S()
    b.bind(("", 0))
    out("bound=%s" % pm(pollmask(b, 0)))
    f6 = S(AF_INET6)
    out("v6 fresh=%s" % pm(pollmask(f6, 0)))


@sc
def poll_connected_states():
    l, port, c, s = pair()
    out("idle client=%s accepted=%s" % (pm(pollmask(c, 0)), pm(pollmask(s, 0))))
    s.close()
    out("after_peer_close=%s" % pm(wait_mask(c, select.POLLRDHUP)))


@sc
def poll_after_reset():
    l, port, c, s = pair()
    s.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    out("after_rst=%s" % pm(wait_mask(c, select.POLLERR | select.POLLHUP)))
    out("so_error=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)))
    out("after_so_error=%s" % pm(pollmask(c, 0)))


@sc
def select_connected():
    l, port, c, s = pair()
    r, w, x = select.select([c], [c], [c], T)
    out("readable=%s writable=%s exceptional=%s" % (bool(r), bool(w), bool(x)))


# ---- processes: fork, exec, SCM_RIGHTS ----------------------------------------

@sc
def fork_child_accepts():
    l, port = listener()
    r, w = os.pipe()

    def child():
        os.close(r)
        s, a = l.accept()
        s.settimeout(T)
        data = recv_exact(s, 4)
        s.sendall(b"pong")
        os.write(w, ("%s %d" % (data.decode(), a[1])).encode())

    pid = fork_child(child)
    os.close(w)
    c = connect(port)
    c.sendall(b"ping")
    out("reply=%r" % recv_exact(c, 4))
    rep = read_pipe(r).split()
    os.close(r)
    out("child_got=%s peer_is_client=%s" % (rep[0] if rep else "-",
                                            len(rep) > 1 and same_port(int(rep[1]), c.getsockname())))
    out("child_exit=%s" % reap(pid))


@sc
def fork_parent_closes_listener():
    l, port = listener()
    r, w = os.pipe()
    go_r, go_w = os.pipe()

    def child():
        os.close(r)
        os.close(go_w)
        os.read(go_r, 1)  # the parent has closed its copy
        s, a = l.accept()
        os.write(w, b"%d" % a[1])

    pid = fork_child(child)
    os.close(w)
    os.close(go_r)
    l.close()
    os.write(go_w, b"g")
    os.close(go_w)
    c = connect(port)
    rep = read_pipe(r)
    os.close(r)
    out("child_accepted peer_is_client=%s" % (rep.isdigit() and same_port(int(rep), c.getsockname())))
    out("child_exit=%s" % reap(pid))


@sc
def fork_child_connects():
    l, port = listener()
    r, w = os.pipe()

    def child():
        os.close(r)
        c = socket.socket()
        c.settimeout(T)
        c.connect((A4, port))
        c.sendall(b"from child")
        os.write(w, b"%d" % c.getsockname()[1])
        c.close()

    pid = fork_child(child)
    os.close(w)
    s, a = accept(l)
    out("data=%r" % recv_to_eof(s))
    rep = read_pipe(r)
    os.close(r)
    out("peer_is_child=%s" % (rep.isdigit() and same_port(int(rep), a)))
    out("child_exit=%s" % reap(pid))


EXEC_CHILD = r"""
import os, signal, socket, sys
signal.alarm(10)
fd, w, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rep(*a):
    os.write(w, (" ".join(str(x) for x in a) + "\n").encode())
s = socket.socket(fileno=fd)
rep("family=%s type=%s proto=%d" % (s.family.name, s.type.name, s.proto))
rep("sock_port_is_arg=%s" % (s.getsockname()[1] == port))
rep("acceptconn=%d" % s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
    s.settimeout(5)
    c, a = s.accept()
    rep("PEER %d" % a[1])
    c.sendall(b"from exec child")
    c.close()
else:
    rep("peer_port_is_arg=%s" % (s.getpeername()[1] == port))
    s.sendall(b"exec child writes")
"""


def run_exec_child(sock, port):
    os.set_inheritable(sock.fileno(), True)
    r, w = os.pipe()
    os.set_inheritable(w, True)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.execv(sys.executable, [sys.executable, "-c", EXEC_CHILD, str(sock.fileno()),
                                      str(w), str(port)])
        finally:
            os._exit(127)
    _children.append(pid)
    os.close(w)
    return pid, r


@sc
def exec_inherited_listener():
    l, port = listener()
    pid, r = run_exec_child(l, port)
    c = connect(port)
    out("data=%r" % recv_to_eof(c))
    for line in read_pipe(r).splitlines():
        if line.startswith("PEER "):
            out("peer_is_client=%s" % (same_port(int(line[5:]), c.getsockname())))
        else:
            out("child", line)
    os.close(r)
    out("child_exit=%s" % reap(pid))


@sc
def exec_inherited_connected():
    l, port, c, s = pair()
    pid, r = run_exec_child(c, port)
    for line in read_pipe(r).splitlines():
        out("child", line)
    os.close(r)
    out("child_exit=%s" % reap(pid))
    out("server_got=%r" % recv_exact(s, 17))


@sc
def scm_rights_listener():
    a, b = socket.socketpair()
    track(a)
    track(b)

    def child():
        a.close()
        b.settimeout(T)
        msg, fds, flags, addr = socket.recv_fds(b, 16, 2)
        l = socket.socket(fileno=fds[0])
        info = "acceptconn=%d" % l.getsockopt(SOL_SOCKET, socket.SO_ACCEPTCONN)
        l.settimeout(T)
        s, peer = l.accept()
        s.settimeout(T)
        data = recv_exact(s, 4)
        s.sendall(b"pong")
        b.sendall(("%s got=%s PEER %d" % (info, data.decode(), peer[1])).encode())

    pid = fork_child(child)
    b.close()
    l, port = listener()
    out("send_fds=%s" % tr(socket.send_fds, a, [b"L"], [l.fileno()]))
    l.close()
    c = connect(port)
    c.sendall(b"ping")
    out("reply=%r" % recv_exact(c, 4))
    a.settimeout(T)
    rep = tv(a.recv, 200)
    rep = rep.decode() if isinstance(rep, bytes) else rep
    if " PEER " in rep:
        rep, p = rep.split(" PEER ")
        rep += " peer_is_client=%s" % (same_port(int(p), c.getsockname()))
    out("child", rep)
    out("child_exit=%s" % reap(pid))


@sc
def scm_rights_connected():
    a, b = socket.socketpair()
    track(a)
    track(b)

    def child():
        a.close()
        b.settimeout(T)
        msg, fds, flags, addr = socket.recv_fds(b, 16, 2)
        s = socket.socket(fileno=fds[0])
        s.settimeout(T)
        data = recv_exact(s, 5)
        s.sendall(b"world")
        b.sendall(("got=%s PEER %d" % (data.decode(), s.getpeername()[1])).encode())

    pid = fork_child(child)
    b.close()
    l, port, c, s = pair()
    out("send_fds=%s" % tr(socket.send_fds, a, [b"S"], [s.fileno()]))
    s.close()
    c.sendall(b"hello")
    out("reply=%r" % recv_exact(c, 5))
    a.settimeout(T)
    rep = tv(a.recv, 200)
    rep = rep.decode() if isinstance(rep, bytes) else rep
    if " PEER " in rep:
        rep, p = rep.split(" PEER ")
        rep += " peer_is_client=%s" % (same_port(int(p), c.getsockname()))
    out("child", rep)
    out("child_exit=%s" % reap(pid))


@sc
def scm_rights_self():
    a, b = socket.socketpair()
    track(a)
    track(b)
    l, port = listener()
    socket.send_fds(a, [b"L"], [l.fileno()])
    b.settimeout(T)
    msg, fds, flags, addr = socket.recv_fds(b, 16, 2)
    l2 = track(socket.socket(fileno=fds[0]))
    l.close()
    out("received acceptconn=%d port_same=%s" % (geti(l2, SOL_SOCKET, socket.SO_ACCEPTCONN),
                                                  l2.getsockname()[1] == port))
    c = connect(port)
    l2.settimeout(T)
    s, a2 = accept(l2)
    out("accepted peer_is_client=%s" % same(a2, c.getsockname()))


@sc
def dup_listener():
    l, port = listener()
    d = track(socket.socket(fileno=os.dup(l.fileno())))
    l.close()
    d.settimeout(T)
    out("dup acceptconn=%d" % geti(d, SOL_SOCKET, socket.SO_ACCEPTCONN))
    c = connect(port)
    s, a = accept(d)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


@sc
def dup_connected_shutdown():
    l, port, c, s = pair()
    d = track(socket.socket(fileno=os.dup(c.fileno())))
    c.close()
    d.sendall(b"via dup")
    out("peer_got=%r" % recv_exact(s, 7))
    d.shutdown(socket.SHUT_WR)
    out("peer_eof=%r" % recv_to_eof(s))


# ---- signals ------------------------------------------------------------------

@sc
def signal_accept_raises():
    l, port = listener(timeout=None)
    try:
        one_shot(0.2, _raise_alarm)
        try:
            l.accept()
            out("accepted (no signal?)")
        except Alarm:
            out("interrupted=True")
    finally:
        no_timer()
    c = connect(port)
    l.settimeout(T)
    s, a = accept(l)
    out("accept_after peer_is_client=%s" % same(a, c.getsockname()))


@sc
def signal_accept_retried():
    l, port = listener(timeout=None)
    st = {}

    def h(sig, frame):
        if "c" not in st:
            st["c"] = connect(port)

    try:
        one_shot(0.2, h)
        s, a = l.accept()
        track(s)
    finally:
        no_timer()
    out("handler_connected=%s peer_is_client=%s" % ("c" in st, "c" in st and same(a, st["c"].getsockname())))


@sc
def signal_recv_raises():
    l, port, c, s = pair()
    s.settimeout(None)
    try:
        one_shot(0.2, _raise_alarm)
        try:
            s.recv(10)
            out("recv returned (no signal?)")
        except Alarm:
            out("interrupted=True")
    finally:
        no_timer()
    c.sendall(b"after")
    out("recv_after=%r" % recv_exact(s, 5))


@sc
def signal_recv_retried():
    l, port, c, s = pair()
    s.settimeout(None)

    def h(sig, frame):
        c.sendall(b"late")

    try:
        one_shot(0.2, h)
        d = s.recv(10)
    finally:
        no_timer()
    out("recv=%r" % d)


@sc
def signal_connect_blackhole_raises():
    c = S(timeout=None)
    try:
        one_shot(0.2, _raise_alarm)
        try:
            c.connect((BH4, 80))
            out("connected (no signal?)")
        except Alarm:
            out("interrupted=True")
    finally:
        no_timer()
    out("state=%s" % tcp_state(c), "so_error=%s" % ecode(geti(c, SOL_SOCKET, socket.SO_ERROR)))
    c.setblocking(False)
    out("connect_again=%s" % ecode(c.connect_ex((BH4, 80))))


def signal_storm(restart):
    st = {"n": 0}

    def h(sig, frame):
        st["n"] += 1

    errors = set()
    done = 0
    signal.signal(signal.SIGALRM, h)
    if restart:
        signal.siginterrupt(signal.SIGALRM, False)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        i = 0
        while i < 2000 and (i < 20 or st["n"] < 10):
            i += 1
            step = "socket"
            try:
                l = S(timeout=None)
                step = "bind"
                l.bind(("", 0))
                step = "listen"
                l.listen(4)
                port = l.getsockname()[1]
                step = "socket"
                c = S(timeout=None)
                step = "connect"
                c.connect((A4, port))
                step = "accept"
                s, a = l.accept()
                track(s)
                step = "names"
                if a != c.getsockname():
                    errors.add("peer mismatch")
                step = "send"
                c.sendall(b"x")
                step = "recv"
                if s.recv(1) != b"x":
                    errors.add("data mismatch")
                done += 1
            except OSError as e:
                errors.add("%s %s" % (step, en(e)))
            finally:
                for x in list(_tracked):
                    x.close()
                del _tracked[:]
    finally:
        no_timer()
    out("all_ok=%s errors=%s" % (done == i, sorted(errors)))


@sc
def signal_storm_sa_restart():
    signal_storm(True)


@sc
def signal_storm_eintr():
    signal_storm(False)


# ---- MPTCP --------------------------------------------------------------------

def mptcp(fam, host):
    try:
        l = S(fam, proto=IPPROTO_MPTCP)
    except OSError as e:
        out("socket=%s" % en(e))
        return
    l.bind((wild(fam), 0))
    l.listen(4)
    port = l.getsockname()[1]
    out("listener protocol=%d" % geti(l, SOL_SOCKET, socket.SO_PROTOCOL))
    c = connect(port, host, proto=IPPROTO_MPTCP)
    s, a = accept(l)
    out("client protocol=%d accepted protocol=%d" % (geti(c, SOL_SOCKET, socket.SO_PROTOCOL),
                                                     geti(s, SOL_SOCKET, socket.SO_PROTOCOL)))
    out("peer_is_client=%s sock=%s" % (same(a, c.getsockname()), fa(s.getsockname(), srv=port)))
    c.sendall(b"mptcp ping")
    got = recv_exact(s, 10)
    s.sendall(got.upper())
    out("echo=%r" % recv_exact(c, 10))


@sc
def mptcp_v4():
    mptcp(AF_INET, A4)


@sc
def mptcp_v6():
    mptcp(AF_INET6, A6)


@sc
def mptcp_listener_tcp_client():
    try:
        l = S(proto=IPPROTO_MPTCP)
    except OSError as e:
        out("socket=%s" % en(e))
        return
    l.bind(("", 0))
    l.listen(4)
    port = l.getsockname()[1]
    c = connect(port)
    s, a = accept(l)
    out("accepted protocol=%d peer_is_client=%s" % (geti(s, SOL_SOCKET, socket.SO_PROTOCOL),
                                                    same(a, c.getsockname())))
    c.sendall(b"plain")
    out("data=%r" % recv_exact(s, 5))


# ---- volume -----------------------------------------------------------------

@sc
def many_short_connections():
    l, port = listener()
    ok = 0
    for i in range(50):
        c = connect(port)
        s, a = accept(l)
        msg = b"conn %d " % i * 10
        c.sendall(msg)
        got = recv_exact(s, len(msg))
        s.sendall(got)
        if recv_exact(c, len(msg)) == msg and a == c.getsockname():
            ok += 1
        c.close()
        s.close()
    out("ok=%d" % ok)


@sc
def large_transfer_both_ways():
    l, port, c, s = pair()
    n = 4 << 20
    up = bytes(range(256)) * (n // 256)
    down = bytes(range(255, -1, -1)) * (n // 256)
    c.setblocking(False)
    s.setblocking(False)
    sent = {c: 0, s: 0}
    data = {c: up, s: down}
    got = {c: bytearray(), s: bytearray()}
    p = select.poll()
    byfd = {c.fileno(): c, s.fileno(): s}
    for x in (c, s):
        p.register(x, select.POLLIN | select.POLLOUT)
    deadline = time.monotonic() + 2 * T
    while (len(got[c]) < n or len(got[s]) < n) and time.monotonic() < deadline:
        for fd, ev in p.poll(200):
            x = byfd[fd]
            if ev & select.POLLOUT and sent[x] < n:
                try:
                    sent[x] += x.send(data[x][sent[x]:sent[x] + 65536])
                except BlockingIOError:
                    pass
                if sent[x] == n:
                    p.modify(x, select.POLLIN)
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    chunk = x.recv(262144)
                except BlockingIOError:
                    continue
                if not chunk:
                    p.unregister(x)
                got[x] += chunk
    out("up_ok=%s down_ok=%s bytes=%d" % (bytes(got[s]) == up, bytes(got[c]) == down, n))


@sc
def many_listeners():
    ok = 0
    ls = [listener() for _ in range(20)]
    cs = [connect(port) for l, port in ls]
    for (l, port), c in zip(ls, cs):
        s, a = accept(l)
        if a == c.getsockname() and s.getsockname()[1] == port:
            ok += 1
    out("ok=%d" % ok)


@sc
def concurrent_connections():
    l, port = listener(backlog=64)
    cs = [connect(port) for _ in range(30)]
    byport = {c.getsockname()[1]: (i, c) for i, c in enumerate(cs)}
    ok = 0
    for _ in range(30):
        s, a = accept(l)
        i, c = byport.get(a[1], (None, None))
        if c is None:
            continue
        c.sendall(b"%04d" % i)
        if recv_exact(s, 4) == b"%04d" % i:
            s.sendall(b"ack")
            if recv_exact(c, 3) == b"ack":
                ok += 1
    out("ok=%d" % ok)


# ---- loopback ---------------------------------------------------------------

@sc
def loopback4_echo():
    l, port, c, s = pair(AF_INET, "127.0.0.1", "127.0.0.1")
    out("listener=%s" % fa(l.getsockname(), srv=port))
    out("client sock=%s peer=%s" % (fa(c.getsockname(), srv=port), fa(c.getpeername(), srv=port)))
    out("accepted sock=%s peer_is_client=%s" % (fa(s.getsockname(), srv=port),
                                                 same(s.getpeername(), c.getsockname())))
    c.sendall(b"lo")
    out("echo=%r" % recv_exact(s, 2))


@sc
def loopback6_echo():
    l, port, c, s = pair(AF_INET6, "::1", "::1")
    out("listener=%s" % fa(l.getsockname(), srv=port))
    out("client sock=%s peer=%s" % (fa(c.getsockname(), srv=port), fa(c.getpeername(), srv=port)))
    out("accepted peer_is_client=%s" % same(s.getpeername(), c.getsockname()))
    c.sendall(b"lo6")
    out("echo=%r" % recv_exact(s, 3))


@sc
def loopback_refused():
    b, port = closed_port(AF_INET, "127.0.0.1")
    c = S(timeout=None)
    out("connect=%s" % tr(c.connect, ("127.0.0.1", port)))
    b6, port6 = closed_port(AF_INET6, "::1")
    c6 = S(AF_INET6, timeout=None)
    out("v6 connect=%s" % tr(c6.connect, ("::1", port6)))


@sc
def loopback_nonblocking_connect():
    l, port = listener(AF_INET, "127.0.0.1")
    c = S(timeout=0.0)
    out("first=%s" % ecode(c.connect_ex(("127.0.0.1", port))))
    out("poll=%s" % pm(wait_mask(c, select.POLLOUT)))
    out("second=%s third=%s" % (ecode(c.connect_ex(("127.0.0.1", port))),
                                ecode(c.connect_ex(("127.0.0.1", port)))))


@sc
def wildcard_listener_loopback_client():
    l, port = listener()
    c = connect(port, "127.0.0.1")
    s, a = accept(l)
    out("accepted sock=%s peer=%s peer_is_client=%s" % (fa(s.getsockname(), srv=port), fa(a),
                                                        same(a, c.getsockname())))


@sc
def dualstack_loopback_v4_client():
    l, port = listener(AF_INET6)
    c = connect(port, "127.0.0.1")
    s, a = accept(l)
    out("accepted family=%s peer=%s peer_is_client=%s" % (s.family.name, fa(a),
                                                          same(a, c.getsockname())))


@sc
def loopback_bind_conflict():
    a = S()
    a.bind(("127.0.0.1", 0))
    port = a.getsockname()[1]
    out("wild_after_loopback=%s" % bound("", port)[1])
    b = S()
    b.bind(("", 0))
    port2 = b.getsockname()[1]
    out("loopback_after_wild=%s" % bound("127.0.0.1", port2)[1])


@sc
def loopback_listener_other_addr():
    # On a port nothing holds on A4: a port the kernel picked for 127.0.0.1
    # could be one the io-server still keeps on A4 for a relisten after an
    # earlier scenario's listener closed (docs/interceptor.md, Departures 1),
    # and the connect below would reach it.
    probe = S()
    probe.bind((A4, 0))
    free = probe.getsockname()[1]
    probe.close()
    l, port = listener(AF_INET, "127.0.0.1", free)
    c = S(timeout=None)
    out("connect_to_addr4=%s" % tr(c.connect, (A4, port)))
    l2, port2 = listener(AF_INET, A4)
    c2 = S(timeout=None)
    out("connect_to_loopback=%s" % tr(c2.connect, ("127.0.0.1", port2)))


# ---- sockets that SAPS does not trap, and socket() itself ----------------------

@sc
def unix_socketpair_echo():
    a, b = socket.socketpair()
    track(a)
    track(b)
    a.sendall(b"unix")
    b.settimeout(T)
    out("echo=%r" % recv_exact(b, 4), "type=%d" % geti(a, SOL_SOCKET, socket.SO_TYPE))


@sc
def udp_untouched():
    u = S(typ=socket.SOCK_DGRAM)
    u.bind((A4, 0))
    u.sendto(b"dgram", u.getsockname())
    d, addr = u.recvfrom(16)
    out("data=%r from_self=%s" % (d, addr == u.getsockname()))


@sc
def socket_bad_protocol():
    out("stream_udp=%s" % tr(socket.socket, AF_INET, SOCK_STREAM, socket.IPPROTO_UDP))
    out("stream_proto_99=%s" % tr(socket.socket, AF_INET6, SOCK_STREAM, 99))


@sc
def socket_flags():
    s = S(timeout=None)
    out("default", flags_of(s.fileno()))
    n = track(socket.socket(AF_INET, SOCK_STREAM | socket.SOCK_NONBLOCK))
    out("sock_nonblock", flags_of(n.fileno()))
    fd = libc.socket(AF_INET, SOCK_STREAM, 0)
    out("libc_plain", flags_of(fd) if fd >= 0 else cerr())
    if fd >= 0:
        os.close(fd)


@sc
def close_and_reuse_fd_number():
    s = S()
    fd = s.fileno()
    s.close()
    u = track(socket.socket(AF_INET, socket.SOCK_DGRAM))
    t = S()
    out("udp_type=%d tcp_type=%d" % (geti(u, SOL_SOCKET, socket.SO_TYPE), geti(t, SOL_SOCKET, socket.SO_TYPE)))
    l, port = listener()
    c = connect(port)
    s2, a = accept(l)
    out("accepted peer_is_client=%s" % same(a, c.getsockname()))


# ---------------------------------------------------------------- runner

class ScenarioTimeout(BaseException):
    pass


class Watchdog:
    """A thread that interrupts the main thread (SIGUSR2) when a scenario
    runs too long. It blocks every signal, so that process-directed signals
    (the scenarios' SIGALRM) interrupt the main thread's system calls.
    Should the main thread not come back within 6 s more (a call that the
    signal does not end), the watchdog reports the TIMEOUT itself and
    exits."""

    def __init__(self):
        self.cond = threading.Condition()
        self.deadline = None
        self.kicks = 0
        self.main = threading.main_thread().ident
        t = threading.Thread(target=self.run, daemon=True)
        t.start()

    def arm(self, secs):
        with self.cond:
            self.kicks = 0
            self.deadline = time.monotonic() + secs
            self.cond.notify()

    def disarm(self):
        with self.cond:
            self.deadline = None
            self.cond.notify()

    def run(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        with self.cond:
            while True:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                left = self.deadline - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.kicks += 1
                if self.kicks > 3:
                    os.write(1, ("%s: TIMEOUT\n" % _cur).encode())
                    os._exit(3)
                signal.pthread_kill(self.main, signal.SIGUSR2)
                self.deadline = time.monotonic() + 2.0


def _on_timeout(sig, frame):
    raise ScenarioTimeout()


def cleanup():
    for s in _tracked:
        try:
            s.close()
        except OSError:
            pass
    del _tracked[:]
    for pid in list(_children):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    del _children[:]


def run_one(fn, dog):
    global _cur
    _cur = fn.__name__
    dog.arm(WATCHDOG)
    try:
        try:
            fn()
        finally:
            dog.disarm()
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            cleanup()
    except ScenarioTimeout:
        out("TIMEOUT")
        if STOP_ON_TIMEOUT:
            os._exit(3)
        cleanup()
    except Exception as e:
        out("EXC %s %s" % (type(e).__name__, en(e) if isinstance(e, OSError) and e.errno else "-"))


def main():
    args = sys.argv[1:]
    if args == ["--list"]:
        for fn in SCENARIOS:
            print(fn.__name__)
        return 0
    names = {fn.__name__ for fn in SCENARIOS}
    unknown = [a for a in args if a not in names]
    if unknown:
        print("unknown scenarios: %s" % " ".join(unknown), file=sys.stderr)
        return 2
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, _on_timeout)
    dog = Watchdog()
    for fn in SCENARIOS:
        if not args or fn.__name__ in args:
            run_one(fn, dog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
