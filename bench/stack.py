"""Issue 21's rows: the io-server on the kernel's TCP against `--stack
smoltcp`, for bench/run's "stack" section.

The same io-server + 1 relayed node (saps-run over a unix fabric, nginx
with the bench's 1 KiB and 10 MiB files, the bench's 4-byte echo server and
an idle sink) is started with `--stack kernel` and with `--stack smoltcp`,
in alternating pairs (kernel then smoltcp, then smoltcp then kernel, ...)
so that drift weighs on both arms. In both arms the clients are in a
namespace of their own and reach the single address over a veth, through
a gateway namespace (built as tests/tests/stack_smoltcp.rs builds it):

* client namespace: 198.51.100.2/24 on its veth, default route via the
  gateway's 198.51.100.1;
* gateway namespace: 198.51.100.1/24 on its veth end, forwarding on;
  the kernel arm's single address 203.0.113.2/24 on that veth end too
  (the io-server binds it there); the TAP with its kernel side
  192.0.2.1/24, the smoltcp arm's single address 192.0.2.2 living on it
  in the io-server alone.

The io-server runs in the gateway namespace, the node and its programs in
the bench's own (they reach the io-server over the unix fabric only). The
load generators run in the client namespace: this module runs them from a
thread that joined it (setns(2) applies to the calling thread, and the
processes it starts inherit it).

Per start: wrk c50 keep-alive and `Connection: close` on the 1 KiB file,
curl of the 10 MiB file (one stream), the 4-byte ping-pong; then idle
connections to the sink are opened in steps (100, 1 000, and 10 000 or
as many as the descriptor limit lets the smoltcp arm hold: it takes two
descriptors per connection), and at each step the
io-server's resident memory is read and wrk c50 keep-alive runs again.

smoltcp's socket limit (`--stack-max-sockets`, 4096 by default,
listening pools included) is raised to `MAX_SOCKETS` here so that the
largest step fits; past the limit the stack answers a SYN with a reset,
and the row reports the connections it took.

Run as a program (`stack.py sink PORT`) it is the idle sink: it accepts
connections and holds them, reading and dropping whatever arrives.
"""

import ctypes
import errno
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

from fmt import num, spread

CLONE_NEWNET = 0x40000000
CLIENT, ROUTER = "198.51.100.2", "198.51.100.1"
KERNEL_ADDR = "203.0.113.2"
SMOLTCP_ADDR, TAP_GW = "192.0.2.2", "192.0.2.1"
# `--stack-max-sockets` of the smoltcp arm: room for the largest idle step,
# the listening pools and the load's own connections.
MAX_SOCKETS = 16384
# nginx's own default listen backlog on Linux; the bench's usual 4096
# would take every socket smoltcp has for its listening pool.
NGINX_BACKLOG = 511
SINK_BACKLOG = 128
def _idle_top():
    """10 000 idle connections, or as many as the io-server's descriptor
    limit holds under smoltcp, which takes two per connection (both ends
    of its socketpair stay in the io-server), with room for the rest."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 10000
    return max(1000, min(10000, (hard - 2048) // 2 // 1000 * 1000))


IDLE_STEPS = (100, 1000, _idle_top())
# docs/benchmarks.md's block for `bench/run --only stack`.
BEGIN = "<!-- bench/run stack:begin -->"
END = "<!-- bench/run stack:end -->"

ARMS = [("kernel", "io-server --stack kernel"),
        ("smoltcp", "io-server --stack smoltcp")]


# ---------------------------------------------------------------- namespaces

_libc = ctypes.CDLL(None, use_errno=True)


def in_ns(ns, f):
    """Runs `f()` in a thread that joined network namespace `ns`; sockets
    it makes and processes it starts live there."""
    out = {}

    def body():
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns {ns}: {os.strerror(e)}")
            finally:
                os.close(fd)
            out["v"] = f()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["e"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "e" in out:
        raise out["e"]
    return out.get("v")


class Net:
    """The client and gateway namespaces, the veth between them and the
    TAP; names unique to this process; `down()` removes them all."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.gw, self.client = f"sbench-g{tag}", f"sbench-c{tag}"
        self.veth, self.tap = f"sbv{tag}", f"sbt{tag}"
        self.made = False

    def up(self):
        g, c, v, t = self.gw, self.client, self.veth, self.tap
        self.made = True
        for cmd in (
                f"ip netns add {g}",
                f"ip netns add {c}",
                f"ip link add {v} netns {g} type veth peer name {v}p netns {c}",
                f"ip -n {g} link set lo up",
                f"ip -n {c} link set lo up",
                f"ip -n {g} addr add {ROUTER}/24 dev {v}",
                f"ip -n {g} addr add {KERNEL_ADDR}/24 dev {v}",
                f"ip -n {g} link set {v} up",
                f"ip -n {c} addr add {CLIENT}/24 dev {v}p",
                f"ip -n {c} link set {v}p up",
                f"ip -n {c} route add default via {ROUTER}",
                f"ip netns exec {g} sysctl -qw net.ipv4.ip_forward=1",
                f"ip -n {g} tuntap add dev {t} mode tap",
                f"ip -n {g} addr add {TAP_GW}/24 dev {t}",
                f"ip -n {g} link set {t} up"):
            r = subprocess.run(cmd.split(), capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"{cmd}: {r.stderr.strip()}")

    def down(self):
        if not self.made:
            return
        self.made = False
        for ns in (self.gw, self.client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def unavailable():
    """Why the namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a TAP)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if not any(os.access(os.path.join(p, "ip"), os.X_OK)
               for p in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]):
        return "no `ip` (iproute2)"
    return None


# ---------------------------------------------------------------- the sink

def sink(port):
    """Accepts and holds connections; reads and drops their bytes."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(SINK_BACKLOG)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is srv:
                try:
                    while True:
                        c, _ = srv.accept()
                        c.setblocking(False)
                        sel.register(c, selectors.EVENT_READ)
                except (BlockingIOError, OSError):
                    pass
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(c)
                c.close()


def open_idle(host, port, n, held, deadline):
    """Opens connections, 32 at a time, until `held` has `n`, or `deadline`
    passes, or 20 rounds in a row had failures and no success (with a
    pause of 0.2 s after each: smoltcp refuses a SYN while its accept queue
    is full, for a moment, and at its socket limit, for good); returns why
    it stopped short, or None."""
    err, bad_rounds = None, 0
    started = time.monotonic()
    sel = selectors.DefaultSelector()
    pending = {}
    try:
        while time.monotonic() < deadline and bad_rounds < 20:
            ok = failed = 0
            while len(pending) < 32 and len(held) + len(pending) < n:
                s = socket.socket()
                s.setblocking(False)
                rc = s.connect_ex((host, port))
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    err, failed = os.strerror(rc), failed + 1
                    break
                sel.register(s, selectors.EVENT_WRITE)
                pending[s] = time.monotonic()
            if not pending and not failed:
                break
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                sel.unregister(s)
                del pending[s]
                e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if e == 0:
                    s.setblocking(True)
                    held.append(s)
                    ok += 1
                else:
                    s.close()
                    err, failed = os.strerror(e), failed + 1
            for s, t in list(pending.items()):
                if time.monotonic() - t > 5:
                    sel.unregister(s)
                    del pending[s]
                    s.close()
                    err, failed = "connect not answered within 5 s", failed + 1
            if ok:
                bad_rounds = 0
            elif failed:
                bad_rounds += 1
            if failed:
                time.sleep(0.2)
    finally:
        for s in pending:
            s.close()
        sel.close()
    if len(held) >= n:
        return None
    if bad_rounds >= 20:
        return f"refused: {err}"
    return f"out of time after {time.monotonic() - started:.0f} s"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


# ---------------------------------------------------------------- one start

def start(r, net, arm):
    """The io-server of `arm` in the gateway namespace and one saps-run
    node; returns the setup once nginx, the echo server and the sink answer
    from the client namespace."""
    import bench
    b = r.b
    s = bench.Setup(dict(zip(("http", "echo", "sink"), bench.free_ports(3))))
    s.addr = KERNEL_ADDR if arm == "kernel" else SMOLTCP_ADDR
    d = b.dir(f"stack-{arm}")
    try:
        fabric = f"unix:{d}/fabric.sock"
        control = os.path.join(d, "control.sock")
        stack = (["--stack", "kernel"] if arm == "kernel" else
                 ["--stack", "smoltcp", "--tap", net.tap, "--tap-gateway", TAP_GW,
                  "--stack-max-sockets", str(MAX_SOCKETS)])
        io = b.spawn(s, "io-server", [
            "ip", "netns", "exec", net.gw, b.io_server, *stack,
            "--fabric", fabric, "--address", s.addr, "--token-file", b.token,
            "--control", control, "--scheduler", "rr"])
        s.gateway.append(io.pid)  # `ip netns exec` execs the io-server in place
        bench.wait_until("io-server control socket", 30,
                         lambda: os.path.exists(control), b.procs, io)
        nd = os.path.join(d, "a")
        os.makedirs(nd)
        os.chmod(nd, 0o755)
        www = bench.make_site(nd, "a")
        nginx = bench.nginx_argv(nd, s.ports["http"], 2)
        conf = nginx[2]
        with open(conf) as f:
            text = f.read().replace("backlog=4096", f"backlog={NGINX_BACKLOG}")
        bench.write(conf, text)
        here = os.path.abspath(__file__)
        cmds = [nginx,
                [sys.executable, os.path.join(os.path.dirname(here), "bench.py"),
                 "echo-server", str(s.ports["echo"])],
                [sys.executable, here, "sink", str(s.ports["sink"])]]
        import shlex
        script = " & ".join(shlex.join(c) for c in cmds) + " & wait"
        relay = ("--zero-relay", "off") if b.zero_relay else ()
        node = b.spawn(s, "node-a", [b.saps_run, "--io-server", fabric, "--token-file",
                                     b.token, "--node", "a", *relay, "--", "sh", "-c", script],
                       cwd=www)
        s.nodes.append(node.pid)

        def answers():
            def check():
                if not bench.http_get(f"http://{s.addr}:{s.ports['http']}/1k.bin"):
                    return False
                for k in ("echo", "sink"):
                    try:
                        socket.create_connection((s.addr, s.ports[k]), timeout=2).close()
                    except OSError:
                        return False
                return True
            return in_ns(net.client, check)

        bench.wait_until(f"{arm}: nginx, echo and sink from the client namespace", 30,
                         answers, b.procs, node)
    except BaseException:
        b.procs.stop(s.procs)
        raise
    return s


def measure(r, net, arm, label, quick):
    """One start of `arm`: every row's figures, or what failed."""
    import bench
    row = {"idle": {}}
    s = r.attempt(label, "start", lambda: start(r, net, arm))
    if s is None:
        return row
    held = []
    try:
        url = f"http://{s.addr}:{s.ports['http']}/1k.bin"

        def client(f):
            return lambda: in_ns(net.client, f)

        r.attempt(label, "warm-up", client(lambda: bench.wrk(url, 10, 1)))
        for key, close in (("ka", False), ("close", True)):
            m = r.attempt(label, f"wrk -c50{' close' if close else ''}",
                          client(lambda c=close: bench.wrk(url, 50, r.secs, c)), {})
            row[key] = m.get("rps")
            if m.get("errors"):
                r.errors.append(f"{label}: wrk -c50{' close' if close else ''}: "
                                f"{m['errors']} errors")
        row["gbps"] = r.attempt(label, "curl 10 MiB", client(lambda: bench.curl_gbps(
            f"http://{s.addr}:{s.ports['http']}/10m.bin", 3 if quick else 7)))
        row["rtt_mean"], row["rtt_p50"] = r.attempt(
            label, "ping-pong", client(lambda: bench.ping_pong(
                s.ports["echo"], 2000 if quick else 10000, host=s.addr)), (None, None))
        # Idle connections in steps; each step's count bounded by what the
        # descriptor limit leaves this process (wrk's 50 and a margin).
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = soft - 50 - 200
        io_pid = s.gateway[0]
        time.sleep(0.5)
        base = rss_kib(io_pid)
        for n in IDLE_STEPS:
            want = min(n, room)
            deadline = time.monotonic() + (30 if quick else 60)
            err = in_ns(net.client, lambda w=want, dl=deadline: open_idle(
                s.addr, s.ports["sink"], w, held, dl))
            time.sleep(1)  # the io-server accepts and relays the last ones
            rss = rss_kib(io_pid)
            got = len(held)
            m = r.attempt(label, f"wrk -c50 with {got} idle",
                          client(lambda: bench.wrk(url, 50, r.secs)), {})
            row["idle"][n] = {
                "held": got, "want": want, "err": err,
                "rps": m.get("rps"), "errors": m.get("errors", 0),
                "kib_per_conn": (rss - base) / got if got and rss and base else None,
                "rss": rss, "base": base}
            if got < want:
                break  # refused or out of time: the next step would be the same
    finally:
        for c in held:
            c.close()
        r.b.procs.stop(s.procs)
    return row


def run(r, quick):
    """Alternating pairs; `r` is bench.py's Run. Returns the starts, each
    {arm: row}, or a reason the section could not run."""
    why = unavailable()
    if why:
        return {"skipped": why, "pairs": []}
    net = Net()
    pairs = []
    try:
        net.up()
        for i in range(1 if quick else 2):
            order = ARMS if i % 2 == 0 else ARMS[::-1]
            got = {}
            for arm, label in order:
                from bench import log
                log(f"{label} (pair {i + 1}) ...")
                got[arm] = measure(r, net, arm, label, quick)
            pairs.append(got)
    finally:
        net.down()
    return {"skipped": None, "pairs": pairs}


# ---------------------------------------------------------------- report

def table(out, result, load):
    out.append("\n#### Kernel stack and smoltcp (issue 21)\n")
    if result["skipped"]:
        out.append(f"Skipped: {result['skipped']}.\n")
        return
    pairs = result["pairs"]
    out.append(
        "io-server + 1 node over unix, relayed, nginx (listen backlog "
        f"{NGINX_BACKLOG}), the 4-byte echo server and an idle sink; clients in a "
        "namespace of their own behind a veth. `--stack kernel`: the single "
        f"address {KERNEL_ADDR} on the gateway's veth; `--stack smoltcp`: "
        f"{SMOLTCP_ADDR} on a TAP in the gateway namespace. Each arm started afresh "
        f"{len(pairs)} {'time' if len(pairs) == 1 else 'times'}, in alternating pairs; cells give the median of the "
        "starts and, with more than one, the range. Idle connections are held "
        "to the sink while wrk c50 keep-alive runs on nginx; memory is the "
        "io-server's resident set while holding them less before, per connection "
        "(the kernel's socket memory is not in it). The largest step is 10 000 or "
        "as many as the descriptor limit lets the smoltcp arm hold (two descriptors "
        f"per connection): {num(IDLE_STEPS[-1], 0)} here. Load average {load} at the end.\n")

    def values(arm, get):
        v = []
        for p in pairs:
            x = get(p.get(arm, {}))
            if x is not None:
                v.append(x)
        return v


    rows = [("keep-alive c50 req/s (1 KiB)", lambda r: r.get("ka"), 0, None),
            ("`Connection: close` c50 conn/s", lambda r: r.get("close"), 0, None),
            ("one stream, 10 MiB curl Gbit/s", lambda r: r.get("gbps"), 2, None),
            ("ping-pong p50 µs", lambda r: r.get("rtt_p50"), 1, None),
            ("ping-pong mean µs", lambda r: r.get("rtt_mean"), 1, None)]
    for n in IDLE_STEPS:
        rows.append((f"keep-alive c50 req/s, {num(n, 0)} idle held",
                     lambda r, n=n: r.get("idle", {}).get(n, {}).get("rps"), 0, n))
    for n in IDLE_STEPS:
        rows.append((f"io-server KiB per idle connection, {num(n, 0)} held",
                     lambda r, n=n: r.get("idle", {}).get(n, {}).get("kib_per_conn"), 2, n))

    def short(arm, n):
        """", only N held" where a start held fewer than `n`."""
        if n is None:
            return ""
        held = values(arm, lambda r: r.get("idle", {}).get(n, {}).get("held"))
        if not held or min(held) >= n:
            return ""
        got = num(min(held), 0) + (f"–{num(max(held), 0)}" if max(held) != min(held) else "")
        return f", only {got} held"

    text = "| row | kernel | smoltcp | smoltcp / kernel |\n|---|---:|---:|---:|\n"
    for what, get, dec, n in rows:
        k, s = values("kernel", get), values("smoltcp", get)
        ratio = (f"{statistics.median(s) / statistics.median(k):.2f}×"
                 if k and s and statistics.median(k) else "–")
        text += (f"| {what} | {spread(k, dec)}{short('kernel', n)} "
                 f"| {spread(s, dec)}{short('smoltcp', n)} | {ratio} |\n")
    out.append(text)
    notes = []
    for i, p in enumerate(pairs):
        for arm, _ in ARMS:
            for n, st in sorted(p.get(arm, {}).get("idle", {}).items()):
                if st["held"] < n:
                    why = st["err"] or f"the descriptor limit leaves room for {st['want']}"
                    notes.append(f"* pair {i + 1}, {arm}: {st['held']} of {n} idle "
                                 f"connections held ({why}); wrk c50 then "
                                 f"{num(st['rps'], 0)} req/s, {st['errors']} errors.\n")
    if notes:
        out.append(f"\nCounts not reached (the smoltcp arm runs with `--stack-max-sockets "
                   f"{MAX_SOCKETS}`, listening pools included):\n")
        out.append("".join(notes))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sink":
        sink(int(sys.argv[2]))
    else:
        print("usage: stack.py sink PORT", file=sys.stderr)
        sys.exit(2)
