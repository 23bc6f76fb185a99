#!/usr/bin/env python3
"""The SAPS paper's §4 evaluation on a cluster of network namespaces.

Issue 18, item 3. Started by `bench/paper`, which builds the release
binaries first. On the testbed of `scripts/netns-cluster` (clients behind a
router whose client port is the bottleneck; a gateway and four nodes on a
LAN) it runs, one setup after the other, each on a fresh cluster of the
same rate and queue:

* saps: the io-server in the gateway, the nodes under `saps-run` over a
  `tcp://` fabric on the LAN (Figure 4);
* vs: Virtual Server with direct routing (Figure 5), built with an
  nftables netdev chain on the gateway (`--virtual-server`);
* haproxy: haproxy `mode tcp` in the gateway, the nodes as its backends.

The nodes run the same servers in every setup, as `nobody`: nginx (the web
load) and this file's `agent serve` (a 4-byte echo and a stream source).
Then: Table 3 (4-byte round trip, SYN -> SYN-ACK seen by the client),
Figure 6 (one stream, bandwidth against write size), Figure 7 (four
streams, the bottleneck's bandwidth every 10 ms), Tables 5-6 (a load shaped
like SPECweb2005 Support). `agent ...` subcommands are the programs run
inside the namespaces (standard library only).
"""

import argparse
import asyncio
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ADDRESS = "203.0.113.10"
FABRIC_PORT = 7100
WEB_PORT = 8080
ECHO_PORT = 9000    # node i echoes on 9000+i
STREAM_PORT = 9100  # node i streams on 9100+i
NOBODY = 65534
SETUPS = ("saps", "vs", "haproxy")
LABEL = {"saps": "SAPS", "vs": "Virtual Server (DR)", "haproxy": "haproxy (mode tcp)"}
WRITE_SIZES = [64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]
# The Support-like mix at the paper's 1 Gbit/s: (bytes, share of requests).
# Pages and their images dominate the count, downloads up to 30 MB the bytes
# (SPECweb2005 Support); `scaled_mix` scales the sizes to the bench's rate.
MIX_1GBIT = [(10_000, 0.40), (50_000, 0.25), (100_000, 0.15), (500_000, 0.12),
             (2_000_000, 0.055), (10_000_000, 0.02), (30_000_000, 0.005)]
GOOD, TOLERABLE = 3.0, 5.0  # seconds, as SPECweb's TimeGood / TimeTolerable
SLICE = 15  # seconds: the Support load's requests are also counted per slice
# The paper's own figures (§4, Tables 3, 5, 6).
PAPER_T3 = {"SAPS": ((213, 210, 217), (96.6, 92, 106)),
            "Virtual Server": ((173, 162, 236), (134.8, 105, 187))}


# ---------------------------------------------------------------- agents
# Run inside the namespaces: `paper.py agent NAME ARGS...`, one JSON line out.

def agent_serve(echo_port, stream_port):
    """A 4-byte (any size) echo on `echo_port`; on `stream_port` a source
    that reads "SIZE SECONDS\\n" and writes SIZE-byte blocks for SECONDS."""
    def echo(c):
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)

    def stream(c):
        size, secs = c.makefile("rb").readline().split()
        block = b"x" * int(size)
        end = time.monotonic() + float(secs)
        while time.monotonic() < end:
            for _ in range(64):
                c.sendall(block)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)

    def serve(handler, c):
        # Resets (Table 3's connects end with one) and probes that send
        # nothing end a connection quietly.
        with c:
            try:
                handler(c)
            except (OSError, ValueError):
                pass

    def listen(port, handler):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(128)
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(handler, c), daemon=True).start()

    threading.Thread(target=listen, args=(stream_port, stream), daemon=True).start()
    listen(echo_port, echo)


def agent_probe(ports, web_port, nodes, timeout):
    """Waits until every port accepts and the web port has been answered
    by all `nodes` (each node's /who), so every member has joined."""
    import http.client
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                socket.create_connection((ADDRESS, port), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"port {port} does not accept")
                time.sleep(0.1)
    seen = set()
    while len(seen) < nodes:
        try:
            c = http.client.HTTPConnection(ADDRESS, web_port, timeout=2)
            c.request("GET", "/who")
            seen.add(c.getresponse().read().strip())
            c.close()
        except OSError:
            time.sleep(0.1)
        if time.monotonic() > deadline:
            sys.exit(f"the web port answered only from {sorted(seen)}")
    print(json.dumps({"seen": sorted(s.decode() for s in seen)}))


def agent_rtt(port, n, m):
    """Table 3: `n` 4-byte round trips on one connection, then `m`
    connects, each timed (connect() returns when the SYN-ACK is in)."""
    s = socket.create_connection((ADDRESS, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    user = []
    for i in range(n + 20):
        t = time.perf_counter_ns()
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            d = s.recv(4 - len(got))
            if not d:
                sys.exit("echo closed")
            got += d
        if i >= 20:  # the first ones warm the path up
            user.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    tcp = []
    for _ in range(m):
        c = socket.socket()
        c.settimeout(10)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        t = time.perf_counter_ns()
        c.connect((ADDRESS, port))
        tcp.append((time.perf_counter_ns() - t) / 1000)
        c.close()  # linger 0: a RST, no TIME_WAIT
        time.sleep(0.005)
    print(json.dumps({"user": user, "tcp": tcp}))


def agent_stream(port, sizes, secs, at):
    """Figure 6/7: for each write size, one stream from the node; the
    payload received and the monotonic times of its first and last byte."""
    while time.monotonic() < at:
        time.sleep(min(0.01, at - time.monotonic()))
    out = []
    buf = bytearray(1 << 18)
    for size in sizes:
        s = socket.create_connection((ADDRESS, port), timeout=30)
        s.sendall(f"{size} {secs}\n".encode())
        n = s.recv_into(buf)
        first = time.monotonic()
        total = 0
        while n:
            total += n
            n = s.recv_into(buf)
        last = time.monotonic()
        s.close()
        out.append({"size": size, "bytes": total, "first": first, "last": last})
    print(json.dumps(out))


def agent_sample(dev):
    """The "Bandwidth Analyzer": `dev`'s transmitted bytes every 10 ms,
    one "monotonic bytes" line each. A read that took over 1 ms (this
    process preempted in between) is dropped rather than misdated."""
    path = f"/sys/class/net/{dev}/statistics/tx_bytes"
    t = time.monotonic()
    lines = []
    while True:
        with open(path) as f:
            a = time.monotonic()
            b = f.read().strip()
            z = time.monotonic()
        if z - a < 0.001:
            lines.append(f"{(a + z) / 2:.6f} {b}\n")
        if len(lines) >= 20:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
            lines = []
        t += 0.01
        time.sleep(max(0.0, t - time.monotonic()))


def agent_support(port, sessions, think, mix, seed, start, warmup, duration):
    """Tables 5-6: `sessions` keep-alive users, each thinking (exponential,
    mean `think` s) then downloading a file of the mix, from `start` for
    `warmup` + `duration` s. Requests completing in the last `duration`
    s are counted, with their response times."""
    counted_from, end = start + warmup, start + warmup + duration
    sizes = [s for s, _ in mix]
    weights = [w for _, w in mix]
    res = {"requests": 0, "good": 0, "tolerable": 0, "errors": 0, "bytes": 0, "times": [],
           "kinds": {}, "slices": {}, "sized": {}}

    async def get(reader, writer, size):
        writer.write(f"GET /files/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                      if h.lower().startswith(b"content-length:"))
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(head.split(b"\r\n")[0].decode())
        left = length
        while left:
            d = await asyncio.wait_for(reader.read(min(left, 1 << 16)), 60)
            if not d:
                raise OSError("closed mid-response")
            left -= len(d)
        return length

    async def user(i):
        rnd = random.Random(seed * 100003 + i)
        reader = writer = None
        await asyncio.sleep(max(0, start - time.monotonic()) + rnd.uniform(0, think))
        while True:
            await asyncio.sleep(rnd.expovariate(1 / think))
            size = rnd.choices(sizes, weights)[0]
            t0 = time.monotonic()
            if t0 >= end:
                break
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(ADDRESS, port), 60)
                got = await get(reader, writer, size)
                t1 = time.monotonic()
                slot = int((t1 - start) // SLICE)
                res["slices"][slot] = res["slices"].get(slot, 0) + 1
                if counted_from <= t1 < end:
                    res["requests"] += 1
                    res["bytes"] += got
                    res["good"] += t1 - t0 <= GOOD
                    res["tolerable"] += t1 - t0 <= TOLERABLE
                    res["times"].append(round(t1 - t0, 4))
                    res["sized"].setdefault(str(size), []).append(round(t1 - t0, 4))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    StopIteration) as e:
                if counted_from <= time.monotonic() < end:
                    res["errors"] += 1
                    kind = type(e).__name__
                    res["kinds"][kind] = res["kinds"].get(kind, 0) + 1
                if writer is not None:
                    writer.transport.abort()
                reader = writer = None
        if writer is not None:
            writer.transport.abort()

    async def main():
        tasks = [asyncio.create_task(user(i)) for i in range(sessions)]
        await asyncio.wait(tasks, timeout=max(0, end - time.monotonic()) + 1)
        for t in tasks:
            t.cancel()

    asyncio.run(main())
    print(json.dumps(res))


def agent(argv):
    name, a = argv[0], argv[1:]
    if name == "serve":
        agent_serve(int(a[0]), int(a[1]))
    elif name == "probe":
        agent_probe([int(p) for p in a[0].split(",")], int(a[1]), int(a[2]), float(a[3]))
    elif name == "rtt":
        agent_rtt(int(a[0]), int(a[1]), int(a[2]))
    elif name == "stream":
        agent_stream(int(a[0]), [int(s) for s in a[1].split(",")], float(a[2]), float(a[3]))
    elif name == "sample":
        agent_sample(a[0])
    elif name == "support":
        agent_support(int(a[0]), int(a[1]), float(a[2]), json.loads(a[3]), int(a[4]),
                      float(a[5]), float(a[6]), float(a[7]))
    else:
        sys.exit(f"unknown agent {name}")


# ---------------------------------------------------------------- the bench

def tree_cpu(pid):
    """CPU seconds used by `pid` and its descendants."""
    import bench
    return bench.cpu_seconds([pid] + list(bench.descendants(pid)))


def rate_bits(rate):
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[:-len(u)]) * f
    return float(rate)


def scaled_mix(rate):
    k = rate_bits(rate) / 1e9
    return [(max(1000, int(s * k)), w) for s, w in MIX_1GBIT]


def cpu_times():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def idle_since(before):
    busy, total = cpu_times()
    return 100 * (1 - (busy - before[0]) / max(1, total - before[1]))


def mean_std(v):
    return statistics.fmean(v), (statistics.pstdev(v) if len(v) > 1 else 0.0)


class Samples:
    """The bottleneck's byte counter every 10 ms (from `agent sample`)."""

    def __init__(self, path):
        self.t, self.b = [], []
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) == 2:
                    self.t.append(float(p[0]))
                    self.b.append(int(p[1]))

    def at(self, t):
        import bisect
        i = bisect.bisect_left(self.t, t)
        if i <= 0:
            return self.b[0]
        if i >= len(self.t):
            return self.b[-1]
        t0, t1, b0, b1 = self.t[i - 1], self.t[i], self.b[i - 1], self.b[i]
        return b0 + (b1 - b0) * (t - t0) / max(1e-9, t1 - t0)

    def mbps(self, t0, t1):
        return (self.at(t1) - self.at(t0)) * 8 / max(1e-9, t1 - t0) / 1e6

    def series(self, t0, t1):
        """(seconds since t0, Mbit/s) for each 10 ms interval in [t0, t1]."""
        out = []
        for i in range(1, len(self.t)):
            if t0 <= self.t[i - 1] and self.t[i] <= t1:
                dt = self.t[i] - self.t[i - 1]
                out.append((self.t[i] - t0, (self.b[i] - self.b[i - 1]) * 8 / dt / 1e6))
        return out


class Fanout:
    """Functions run in threads at once; `join` returns their results or
    raises their errors."""

    def __init__(self, fns):
        self.out = [None] * len(fns)
        self.errs = []

        def one(k, f):
            try:
                self.out[k] = f()
            except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
                self.errs.append(str(e))
        self.threads = [threading.Thread(target=one, args=kf) for kf in enumerate(fns)]
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join()
        if self.errs:
            raise RuntimeError("; ".join(self.errs))
        return self.out


class Cluster:
    """One setup on a fresh testbed: the namespaces, the gateway, the four
    nodes' servers and the bottleneck sampler; `close` ends it all."""

    def __init__(self, b, setup, index):
        self.b, self.setup = b, setup
        self.name = f"p{os.getpid() % 100000:x}{index}"[:8]
        self.d = os.path.join(b.work, setup)
        os.makedirs(self.d)
        os.chmod(self.d, 0o755)
        self.gateway = None
        self.nodes = {}
        self.procs = []
        argv = [b.script, "up", self.name, "--nodes", "4", "--clients", "4",
                "--rate", b.args.rate, "--queue", str(b.args.queue),
                "--host-queue", str(b.args.host_queue)]
        if setup != "vs" and b.args.fabric_link == "own":
            argv.append("--cluster-link")
        if setup == "vs":
            argv.append("--virtual-server")
            for i in range(1, 5):
                argv += ["--pin", f"{ECHO_PORT + i}={i}", "--pin", f"{STREAM_PORT + i}={i}"]
        b.clusters.append(self.name)
        subprocess.run(argv, check=True, timeout=120)
        self.sampler = self.spawn("sample", "rt", [sys.executable, b.agent_py, "agent",
                                                  "sample", "cli"])

    def on_clients(self, argv_of, timeout):
        """Agent `argv_of(i)` in each client ci at once; `.join()` gives
        their answers."""
        return Fanout([lambda i=i: self.run(f"c{i}", argv_of(i), timeout)
                       for i in range(1, 5)])

    def ns(self, host):
        return f"{self.name}-{host}"

    def spawn(self, what, host, argv, cwd=None):
        p = self.b.procs.spawn(f"{self.setup}-{what}",
                               ["ip", "netns", "exec", self.ns(host)] + argv, cwd=cwd)
        self.procs.append(p)
        return p

    def run(self, host, argv, timeout):
        """Runs an agent in `host`, returns its JSON answer."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(host), sys.executable,
                              self.b.agent_py, "agent"] + argv, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        p.bench_name = f"{self.setup}-{argv[0]}-{host}"
        self.b.procs.live.append(p)  # ended with the rest on error or Ctrl-C
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"agent {argv[0]} in {host} still running after {timeout:.0f} s")
        finally:
            self.b.procs.stop([p])
        if p.returncode != 0 or not out.strip():
            raise RuntimeError(f"agent {argv[0]} in {host}: {err.strip()[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def start(self):
        b = self.b
        if self.setup == "saps":
            token = os.path.join(self.d, "token")
            with open(token, "w") as f:
                f.write("paper bench\n")
            os.chmod(token, 0o600)
            os.chown(token, NOBODY, NOBODY)  # the nodes run as nobody
            self.gateway = self.spawn("io-server", "gw", [
                os.path.join(b.bin_dir, "io-server"),
                "--fabric", f"tcp://{self.gateway_address()}:{FABRIC_PORT}", "--address", ADDRESS,
                "--scheduler", "rr", "--token-file", token,
                "--control", os.path.join(self.d, "control.sock")])
            time.sleep(0.5)
        elif self.setup == "haproxy":
            self.gateway = self.spawn("haproxy", "gw", ["haproxy", "-db", "-f",
                                                        self.haproxy_conf()])
        for i in range(1, 5):
            self.node(i)
        ports = [ECHO_PORT + i for i in range(1, 5)] + [STREAM_PORT + i for i in range(1, 5)]
        self.run("c1", ["probe", ",".join(map(str, ports)), str(WEB_PORT), "4", "60"], 90)

    def node(self, i):
        """nginx and the echo/stream agent on node i, as nobody; under
        saps-run in the SAPS setup."""
        b = self.b
        w = os.path.join(self.d, f"n{i}")
        os.makedirs(w)
        with open(os.path.join(w, "who"), "w") as f:
            f.write(f"n{i}\n")
        os.symlink(b.files, os.path.join(w, "files"))
        os.chown(w, NOBODY, NOBODY)
        conf = os.path.join(w, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                "daemon off; master_process on; worker_processes 1;\n"
                f"worker_rlimit_nofile 16384; pid {w}/nginx.pid; error_log {w}/error.log;\n"
                "events { worker_connections 8192; }\n"
                "http { access_log off; keepalive_timeout 600s; keepalive_requests 1000000;\n"
                "  default_type application/octet-stream;\n"
                f"  client_body_temp_path {w}/body; proxy_temp_path {w}/proxy;\n"
                f"  fastcgi_temp_path {w}/fcgi; uwsgi_temp_path {w}/uwsgi;\n"
                f"  scgi_temp_path {w}/scgi;\n"
                f"  server {{ listen {WEB_PORT} backlog=4096; root {w}; }} }}\n")
        serve = [sys.executable, b.agent_py, "agent", "serve", str(ECHO_PORT + i),
                 str(STREAM_PORT + i)]
        script = (shlex.join(["nginx", "-p", w, "-c", conf, "-e", f"{w}/error.log"])
                  + " & exec " + shlex.join(serve))
        argv = ["sh", "-c", script]
        if self.setup == "saps":
            argv = [os.path.join(b.bin_dir, "saps-run"), "--io-server",
                    f"tcp://{self.gateway_address()}:{FABRIC_PORT}", "--token-file",
                    os.path.join(self.d, "token"), "--node", f"n{i}", "--"] + argv
        self.nodes[i] = self.spawn(f"n{i}", f"n{i}", ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                      "--clear-groups", "--"] + argv, cwd=w)

    def gateway_address(self):
        """Where the nodes reach the gateway: on the fabric's own link
        (`--fabric-link own`, scripts/netns-cluster --cluster-link) or on
        the LAN."""
        return "203.0.113.129" if self.b.args.fabric_link == "own" else "192.0.2.2"

    def haproxy_conf(self):
        conf = os.path.join(self.d, "haproxy.cfg")
        own = self.b.args.fabric_link == "own"
        nodes = [(i, f"203.0.113.{130 + i}" if own else f"192.0.2.{10 + i}")
                 for i in range(1, 5)]
        text = ("global\n  nbthread 1\n  maxconn 8000\n"
                "defaults\n  mode tcp\n  timeout connect 5s\n"
                "  timeout client 600s\n  timeout server 600s\n"
                f"listen web\n  bind {ADDRESS}:{WEB_PORT}\n  balance roundrobin\n")
        text += "".join(f"  server n{i} {a}:{WEB_PORT}\n" for i, a in nodes)
        for i, a in nodes:
            for base in (ECHO_PORT, STREAM_PORT):
                text += f"listen p{base + i}\n  bind {ADDRESS}:{base + i}\n" \
                        f"  server n{i} {a}:{base + i}\n"
        with open(conf, "w") as f:
            f.write(text)
        return conf

    def retrans(self):
        """TcpRetransSegs and TcpExtTCPTimeouts of the gateway and each
        node (nstat), by host."""
        by = {}
        for h in ["gw"] + [f"n{i}" for i in range(1, 5)]:
            out = subprocess.run(["ip", "netns", "exec", self.ns(h), "nstat", "-asz",
                                  "TcpRetransSegs", "TcpExtTCPTimeouts"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            by[h] = {"TcpRetransSegs": 0, "TcpExtTCPTimeouts": 0}
            for line in out.splitlines():
                p = line.split()
                if p and p[0] in by[h]:
                    by[h][p[0]] = int(p[1])
        return by

    def ss(self):
        """`ss -tin` of every web connection's server side (the gateway's
        for SAPS and haproxy, the nodes' for the Virtual Server): how many,
        how many have retransmitted, how many are retransmitting now, and
        the median congestion window and RTO."""
        import re
        conns = []
        for h in ["gw"] + [f"n{i}" for i in range(1, 5)]:
            out = subprocess.run(["ip", "netns", "exec", self.ns(h), "ss", "-tinH", "state",
                                  "established", f"( sport = :{WEB_PORT} and dst 198.51.100.0/24 )"],
                                 capture_output=True, text=True, timeout=20).stdout
            for line in out.splitlines():
                cwnd = re.search(r"\bcwnd:(\d+)", line)
                if cwnd:
                    rt = re.search(r"\bretrans:(\d+)/(\d+)", line)
                    rto = re.search(r"\brto:([\d.]+)", line)
                    conns.append((int(cwnd[1]), int(rt[1]) if rt else 0,
                                  int(rt[2]) if rt else 0, float(rto[1]) if rto else 0))
        if not conns:
            return None
        return {"conns": len(conns), "retransmitted": sum(c[2] > 0 for c in conns),
                "in_loss": sum(c[1] > 0 for c in conns),
                "cwnd": statistics.median(c[0] for c in conns),
                "rto": statistics.median(c[3] for c in conns)}

    def qdisc(self, host="rt", dev="cli"):
        """A shaped NIC's pfifo (the bottleneck's by default): bytes sent,
        packets dropped, packets queued now."""
        out = subprocess.run(["tc", "-n", self.ns(host), "-s", "-j", "qdisc", "show",
                              "dev", dev], capture_output=True, text=True,
                             timeout=20, check=True).stdout
        q = next(q for q in json.loads(out) if q["kind"] == "pfifo")
        return q["bytes"], q["drops"], q["qlen"]

    def gateway_sent(self):
        """Bytes the gateway's NIC has sent (the replies, unless they go
        straight from the nodes)."""
        return int(subprocess.run(["ip", "netns", "exec", self.ns("gw"), "cat",
                                   "/sys/class/net/eth0/statistics/tx_bytes"],
                                  capture_output=True, text=True, timeout=20,
                                  check=True).stdout)

    def gateway_cpu(self):
        """CPU seconds of the gateway's process tree (None: no process)."""
        return None if self.gateway is None else tree_cpu(self.gateway.pid)

    def samples(self):
        return Samples(os.path.join(self.b.work, f"{self.setup}-sample.log"))

    def close(self):
        self.b.procs.stop(self.procs)
        subprocess.run([self.b.script, "down", self.name], timeout=120)
        self.b.clusters.remove(self.name)


class Bench:
    def __init__(self, args):
        import bench
        self.args = args
        self.bin_dir = args.bin_dir
        self.script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                   "scripts", "netns-cluster")
        self.work = tempfile.mkdtemp(prefix="saps-paper-")
        os.chmod(self.work, 0o755)
        # The nodes run as nobody: this file and the served files go where
        # nobody can read them.
        self.agent_py = os.path.join(self.work, "paper.py")
        shutil.copy(os.path.abspath(__file__), self.agent_py)
        os.chmod(self.agent_py, 0o644)
        self.files = os.path.join(self.work, "files")
        os.makedirs(self.files)
        os.chmod(self.files, 0o755)
        self.mix = scaled_mix(args.rate)
        for size, _ in self.mix:
            with open(os.path.join(self.files, str(size)), "wb") as f:
                f.write(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        self.procs = bench.Procs(self.work)
        self.clusters = []
        q = args.quick
        self.n_rtt, self.n_syn = (300, 50) if q else (2000, 300)
        self.stream_secs = 1.0 if q else 2.5
        self.four_secs = 4.0 if q else 10.0
        self.warmup, self.support_secs = (5.0, 30.0) if q else (15.0, args.support_secs)
        self.errors = []

    def cleanup(self):
        self.procs.stop_all()
        for name in list(self.clusters):
            subprocess.run([self.script, "down", name], timeout=120)
        self.clusters.clear()

    def setup(self, setup, index):
        log(f"{setup}: starting a cluster at {self.args.rate}, queue {self.args.queue}")
        c = Cluster(self, setup, index)
        r = {"setup": setup}
        try:
            c.start()
            for what, f in (("table3", self.table3), ("fig6", self.fig6),
                            ("fig7", self.fig7), ("support", self.support)):
                idle = cpu_times()
                try:
                    r[what] = f(c)
                    r[what]["idle"] = idle_since(idle)
                    log(f"{setup}: {what} {summary(what, r[what])}")
                except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as e:
                    self.errors.append(f"{setup} {what}: {e}")
                    log(f"{setup}: {what} failed: {e}")
        except (RuntimeError, subprocess.SubprocessError) as e:
            self.errors.append(f"{setup}: {e}")
            log(f"{setup} failed: {e}")
        finally:
            c.close()
        return r

    def table3(self, c):
        a = c.run("c1", ["rtt", str(ECHO_PORT + 1), str(self.n_rtt), str(self.n_syn)], 300)
        out = {}
        for k in ("user", "tcp"):
            m, s = mean_std(a[k])
            out[k] = {"mean": m, "std": s, "min": min(a[k]), "max": max(a[k]),
                      "median": statistics.median(a[k])}
        return out

    def fig6(self, c):
        """One write size at a time, with the CPU the gateway process and
        node n1's tree (saps-run included) used meanwhile."""
        points = []
        for size in WRITE_SIZES:
            g0, n0, t0 = c.gateway_cpu(), tree_cpu(c.nodes[1].pid), time.monotonic()
            p = c.run("c1", ["stream", str(STREAM_PORT + 1), str(size),
                             str(self.stream_secs), "0"], 60 + 4 * self.stream_secs)[0]
            g1, n1, t1 = c.gateway_cpu(), tree_cpu(c.nodes[1].pid), time.monotonic()
            points.append({"size": size, "first": p["first"], "last": p["last"],
                           "goodput": p["bytes"] * 8 / (p["last"] - p["first"]) / 1e6,
                           "gateway_cpu": None if g0 is None else 100 * (g1 - g0) / (t1 - t0),
                           "node_cpu": 100 * (n1 - n0) / (t1 - t0)})
        time.sleep(0.3)
        s = c.samples()
        for p in points:
            p["wire"] = s.mbps(p["first"], p["last"])
        return {"points": points}

    def fig7(self, c):
        at = time.monotonic() + 1.5
        out = c.on_clients(lambda i: ["stream", str(STREAM_PORT + i), "65536",
                                      str(self.four_secs), str(at)], 60 + self.four_secs).join()
        time.sleep(0.3)
        # While all four run, after their first round trips.
        t0 = max(o[0]["first"] for o in out) + 0.2
        t1 = min(o[0]["last"] for o in out)
        series = c.samples().series(t0, t1)
        m, s = mean_std([v for _, v in series])
        streams = [o[0]["bytes"] * 8 / (o[0]["last"] - o[0]["first"]) / 1e6 for o in out]
        span = max(o[0]["last"] for o in out) - min(o[0]["first"] for o in out)
        half = rate_bits(self.args.rate) / 2e6
        return {"series": series, "mean": m, "std": s, "streams": streams,
                "below_half": sum(v < half for _, v in series), "intervals": len(series),
                "goodput": sum(o[0]["bytes"] for o in out) * 8 / span / 1e6}

    def support(self, c):
        a = self.args
        start = time.monotonic() + 3
        per = a.sessions // 4
        total = self.warmup + self.support_secs
        load = c.on_clients(lambda i: ["support", str(WEB_PORT), str(per), str(a.think),
                                       json.dumps(self.mix), str(i), str(start),
                                       str(self.warmup), str(self.support_secs)], total + 120)
        time.sleep(max(0, start + self.warmup - time.monotonic()))
        r0, q0, g0, s0, i0 = (c.retrans(), c.qdisc(), c.gateway_cpu(), c.gateway_sent(),
                              cpu_times())
        gq0 = c.qdisc("gw", "eth0")
        t0 = time.monotonic()
        time.sleep(max(0, start + total - 2 - time.monotonic()))
        ss = c.ss()
        if ss:
            ss["gw_queue"], ss["rt_queue"] = c.qdisc("gw", "eth0")[2], c.qdisc()[2]
        time.sleep(max(0, start + total - time.monotonic()))
        r1, q1, g1, s1, idle = (c.retrans(), c.qdisc(), c.gateway_cpu(), c.gateway_sent(),
                                idle_since(i0))
        gq1 = c.qdisc("gw", "eth0")
        t1 = time.monotonic()
        out = load.join()
        secs = t1 - t0

        def rate(k, hosts=r1):
            return sum(r1[h][k] - r0[h][k] for h in hosts) / secs
        times = [x for o in out for x in o["times"]]
        res = {k: sum(o[k] for o in out) for k in ("requests", "good", "tolerable",
                                                   "errors", "bytes")}
        res.update({
            "secs": self.support_secs,
            "retrans": rate("TcpRetransSegs"),
            "retrans_gw": rate("TcpRetransSegs", ["gw"]),
            "timeouts": rate("TcpExtTCPTimeouts"),
            "bandwidth": (q1[0] - q0[0]) * 8 / secs / 1e6,
            "drops": q1[1] - q0[1],
            "gateway_drops": gq1[1] - gq0[1],
            "gateway_sent": (s1 - s0) * 8 / secs / 1e6,
            "payload": res["bytes"] * 8 / self.support_secs / 1e6,
            "kinds": {k: sum(o["kinds"].get(k, 0) for o in out)
                      for k in {k for o in out for k in o["kinds"]}},
            "gateway_cpu": None if g0 is None else 100 * (g1 - g0) / secs,
            "load_idle": idle,
            "ss": ss,
            "p50": statistics.median(times) if times else None,
            "mean_time": statistics.fmean(times) if times else None,
            "sized": {str(z): {"n": len(v), "p50": statistics.median(v),
                               "mean": statistics.fmean(v), "max": max(v)}
                      for z, _ in self.mix
                      for v in [[x for o in out for x in o["sized"].get(str(z), [])]] if v},
            "slices": [sum(o["slices"].get(str(k), 0) for o in out)
                       for k in range(-int(-total // SLICE))],
        })
        return res


def summary(what, r):
    if what == "table3":
        return (f"user {r['user']['mean']:.0f} ± {r['user']['std']:.0f} µs "
                f"(min {r['user']['min']:.0f}), SYN->SYN-ACK {r['tcp']['mean']:.0f} ± "
                f"{r['tcp']['std']:.0f} µs (min {r['tcp']['min']:.0f})")
    if what == "fig6":
        return " ".join(f"{p['size']}:{p['goodput']:.1f}" for p in r["points"]) + " Mbit/s"
    if what == "fig7":
        return f"{r['mean']:.1f} ± {r['std']:.1f} Mbit/s"
    return (f"{r['requests']} requests, {r['errors']} errors, {r['retrans']:.1f} retrans/s, "
            f"{r['bandwidth']:.1f} Mbit/s, {r['drops']} drops, CPU idle {r['load_idle']:.0f} %")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report

def plots(results, outdir, rate):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(outdir, exist_ok=True)
    files = {}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        if "fig6" in r:
            pts = r["fig6"]["points"]
            ax.plot([p["size"] for p in pts], [p["goodput"] for p in pts], "o-",
                    label=LABEL[r["setup"]])
    ax.axhline(rate_bits(rate) / 1e6, color="grey", ls=":", label="bottleneck rate")
    ax.set_xscale("log", base=2)
    ax.set_xticks(WRITE_SIZES, [human(x).replace(" ", "\u00a0") for x in WRITE_SIZES])
    ax.set_xlabel("write size (bytes)")
    ax.set_ylabel("bandwidth received (Mbit/s)")
    ax.set_title("Figure 6: one stream, node → client")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files["fig6"] = os.path.join(outdir, "fig6-single-stream.png")
    fig.savefig(files["fig6"], dpi=110)
    plt.close(fig)

    rows = [r for r in results if "fig7" in r]
    if rows:
        fig, axs = plt.subplots(len(rows), 1, figsize=(7, 2.2 * len(rows) + 0.6),
                                sharex=True, sharey=True, squeeze=False)
        for ax, r in zip(axs[:, 0], rows):
            f = r["fig7"]
            ax.plot([t for t, _ in f["series"]], [v for _, v in f["series"]], lw=0.7)
            ax.axhline(f["mean"], color="k", ls="--", lw=0.8)
            ax.set_title(f"{LABEL[r['setup']]}: mean {f['mean']:.1f}, "
                         f"std-dev {f['std']:.1f} Mbit/s", fontsize=9)
            ax.set_ylabel("Mbit/s")
            ax.grid(alpha=0.3)
        axs[-1, 0].set_xlabel("seconds (bottleneck's transmitted bytes every 10 ms)")
        fig.suptitle("Figure 7: four streams, four nodes → four clients")
        fig.tight_layout()
        files["fig7"] = os.path.join(outdir, "fig7-four-streams.png")
        fig.savefig(files["fig7"], dpi=110)
        plt.close(fig)
    return files


def fmt(v, d=1):
    return "—" if v is None else f"{v:,.{d}f}"


def report(b, results, command, secs, started_at, load):
    a = b.args
    by = {r["setup"]: r for r in results}
    rate = rate_bits(a.rate) / 1e6
    o = []
    o.append(f"Last run: `{command}`, {started_at}, {secs / 60:.1f} minutes, on "
             f"{os.cpu_count()} vCPUs (Linux `{os.uname().release}`), load average "
             f"before/after {load[0]} / {load[1]}"
             + (" (**--quick**: short runs, noisy)" if a.quick else "") + ".")
    o.append(f"Bottleneck: {a.rate} with a {a.queue}-packet queue; every NIC at {a.rate} "
             f"with a {a.host_queue}-packet queue. "
             + ("The gateway reaches the nodes (SAPS's fabric, haproxy's backends) on a link "
                "of its own. " if a.fabric_link == "own" else
                "The gateway reaches the nodes (SAPS's fabric, haproxy's backends) on the LAN "
                "it shares with the router. ")
             + "CPU idle is the whole machine's during each measurement, from /proc/stat.")
    if b.errors:
        o.append("\nErrors in this run:\n" + "\n".join(f"* {e}" for e in b.errors))

    o.append("\n### Table 3: round trip time (µs)\n")
    o.append("| setup | user mean | std-dev | min | median | max | TCP (SYN→SYN-ACK) mean "
             "| std-dev | min | median | max | CPU idle |")
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in SETUPS:
        t = by.get(s, {}).get("table3")
        if t:
            u, c = t["user"], t["tcp"]
            o.append(f"| {LABEL[s]} | {u['mean']:.0f} | {u['std']:.0f} | {u['min']:.0f} | "
                     f"{u['median']:.0f} | {u['max']:.0f} | {c['mean']:.0f} | {c['std']:.0f} | "
                     f"{c['min']:.0f} | {c['median']:.0f} | {c['max']:.0f} | {t['idle']:.0f} % |")
    for name, (u, c) in PAPER_T3.items():
        o.append(f"| *paper: {name}* | *{u[0]}* | | *{u[1]}* | | *{u[2]}* | *{c[0]}* | | "
                 f"*{c[1]}* | | *{c[2]}* | |")

    o.append("\n### Figure 6: one stream, bandwidth against write size (Mbit/s)\n")
    o.append("![Figure 6](paper/fig6-single-stream.png)\n")
    o.append("Payload received by the client (the bottleneck's wire rate in brackets, "
             "Ethernet/IP/TCP headers included).\n")
    sizes = WRITE_SIZES
    o.append("| setup | " + " | ".join(human(x) for x in sizes) + " | CPU idle |")
    o.append("|---|" + "---:|" * len(sizes) + "---:|")
    for s in SETUPS:
        f = by.get(s, {}).get("fig6")
        if f:
            o.append(f"| {LABEL[s]} | " + " | ".join(
                f"{p['goodput']:.1f} ({p['wire']:.1f})" for p in f["points"])
                + f" | {f['idle']:.0f} % |")
    o.append("\nCPU meanwhile, % of one CPU: node n1's processes (the stream source, and "
             "saps-run under SAPS) / the gateway process (io-server, haproxy; — for the "
             "Virtual Server, whose forwarding is in the kernel).\n")
    o.append("| setup | " + " | ".join(human(x) for x in sizes) + " |")
    o.append("|---|" + "---:|" * len(sizes))
    for s in SETUPS:
        f = by.get(s, {}).get("fig6")
        if f:
            o.append(f"| {LABEL[s]} | " + " | ".join(
                f"{p['node_cpu']:.0f} / {fmt(p['gateway_cpu'], 0)}" for p in f["points"]) + " |")
    o.append("\n### Figure 7: four streams, bottleneck bandwidth every 10 ms (Mbit/s)\n")
    o.append("![Figure 7](paper/fig7-four-streams.png)\n")
    o.append("| setup | mean | std-dev | 10-ms intervals below half the rate | payload received, "
             "all four | each stream alone | CPU idle |")
    o.append("|---|---:|---:|---:|---:|---|---:|")
    for s in SETUPS:
        f = by.get(s, {}).get("fig7")
        if f:
            o.append(f"| {LABEL[s]} | {f['mean']:.1f} | {f['std']:.1f} | "
                     f"{f['below_half']} of {f['intervals']} | {f['goodput']:.1f} | "
                     + " / ".join(f"{x:.1f}" for x in f["streams"]) + f" | {f['idle']:.0f} % |")

    o.append("\n### Tables 5-6: Support-like load\n")
    o.append(f"{a.sessions} sessions ({a.sessions // 4} per client), think time exponential "
             f"with mean {a.think} s, keep-alive, {b.support_secs:.0f} s counted after "
             f"{b.warmup:.0f} s of warm-up; file sizes (bytes, share of requests): "
             + ", ".join(f"{s:,} {w * 100:g} %" for s, w in b.mix) + ".\n")
    o.append("| setup | requests | vs VS | TimeGood (≤ 3 s) | TimeTolerable (≤ 5 s) | errors | "
             "median time (s) | mean time (s) | payload delivered (Mbit/s) |")
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    vs = by.get("vs", {}).get("support")
    for s in SETUPS:
        t = by.get(s, {}).get("support")
        if t:
            n = max(1, t["requests"])
            ratio = f"{t['requests'] / vs['requests']:.3f}×" if vs and vs["requests"] else "—"
            o.append(f"| {LABEL[s]} | {t['requests']:,} | {ratio} | {100 * t['good'] / n:.1f} % "
                     f"| {100 * t['tolerable'] / n:.1f} % | {errors(t)} | {fmt(t['p50'], 2)} | "
                     f"{fmt(t.get('mean_time'), 2)} | {t['payload']:.1f} |")
    o.append("| *paper: SAPS (2800 sessions, 300 s)* | *75,569* | *1.076×* | *88.5 %* | "
             "*97.6 %* | *0* | | | |")
    o.append("| *paper: Virtual Server* | *70,227* | | *73.6 %* | *93.0 %* | *13* | | | |")
    o.append("")
    o.append("Response time by file size, median / mean / max (s):\n")
    o.append("| setup | " + " | ".join(f"{z:,} B" for z, _ in b.mix) + " |")
    o.append("|---|" + "---:|" * len(b.mix))
    for s in SETUPS:
        t = by.get(s, {}).get("support")
        if t and t.get("sized"):
            cells = []
            for z, _ in b.mix:
                v = t["sized"].get(str(z))
                cells.append(f"{v['p50']:.2f} / {v['mean']:.2f} / {v['max']:.1f}" if v else "—")
            o.append(f"| {LABEL[s]} | " + " | ".join(cells) + " |")
    o.append("")
    o.append("| setup | retransmissions (segments/s) | by the gateway | RTO timeouts (/s) | "
             "bottleneck bandwidth (Mbit/s) | bottleneck drops | gateway NIC sent (Mbit/s) | "
             "gateway NIC drops | gateway process CPU (% of one CPU) | machine CPU idle |")
    o.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in SETUPS:
        t = by.get(s, {}).get("support")
        if t:
            o.append(f"| {LABEL[s]} | {t['retrans']:.1f} | {t['retrans_gw']:.1f} | "
                     f"{t['timeouts']:.1f} | "
                     f"{t['bandwidth']:.1f} | {t['drops']:,} | {t['gateway_sent']:.1f} | "
                     f"{t.get('gateway_drops', 0):,} | "
                     f"{fmt(t['gateway_cpu'], 0)} | "
                     f"{t['load_idle']:.0f} % |")
    o.append("| *paper: SAPS* | *103* | *103* | | *930.0* | | | *45* | |")
    o.append("| *paper: Virtual Server* | *11,984* | | | *917.8* | | | *6* | |")
    o.append(f"\nRequests completed in each {SLICE} s from the start of the load (the "
             f"first {b.warmup:.0f} s are the warm-up, not counted above):\n")
    n = max((len(by[s]["support"]["slices"]) for s in SETUPS if by.get(s, {}).get("support")),
            default=0)
    o.append("| setup | " + " | ".join(f"{k * SLICE}-{(k + 1) * SLICE} s" for k in range(n))
             + " |")
    o.append("|---|" + "---:|" * n)
    for s in SETUPS:
        t = by.get(s, {}).get("support")
        if t:
            o.append(f"| {LABEL[s]} | " + " | ".join(f"{x:,}" for x in t["slices"]) + " |")
    o.append("\nThe web connections' server-side sockets 2 s before the end (`ss -tin`, in "
             "the gateway for SAPS and haproxy, in the nodes for the Virtual Server):\n")
    o.append("| setup | connections | have retransmitted | retransmitting now | median cwnd "
             "(segments) | median RTO (ms) | packets queued then: gateway NIC / bottleneck |")
    o.append("|---|---:|---:|---:|---:|---:|---:|")
    for s in SETUPS:
        t = (by.get(s, {}).get("support") or {}).get("ss")
        if t:
            o.append(f"| {LABEL[s]} | {t['conns']} | {t['retransmitted']} | {t['in_loss']} | "
                     f"{t['cwnd']:g} | {t['rto']:g} | {t['gw_queue']} / {t['rt_queue']} |")

    o.append("\n### The issue's targets, in this run\n")
    sp, hp = by.get("saps", {}), by.get("haproxy", {})

    def check(ok, text):
        o.append(f"* {'met' if ok else '**missed**'}: {text}")
    ss, vss, hs = sp.get("support"), vs, hp.get("support")
    if ss and vss:
        check(ss["retrans"] <= 0.1 * max(vss["retrans"], 1e-9),
              f"SAPS retransmissions {ss['retrans']:.1f}/s ≤ 0.1 × Virtual Server's "
              f"{vss['retrans']:.1f}/s")
        check(ss["requests"] >= 1.079 * vss["requests"],
              f"SAPS requests {ss['requests']:,} ≥ 1.079 × Virtual Server's "
              f"{vss['requests']:,} (ratio {ss['requests'] / max(1, vss['requests']):.3f})")
    if ss and hs:
        check(ss["requests"] >= hs["requests"],
              f"SAPS requests {ss['requests']:,} ≥ haproxy's {hs['requests']:,}")
    f6 = sp.get("fig6")
    if f6:
        best = max(f6["points"], key=lambda p: p["wire"])
        check(best["wire"] >= 0.95 * rate,
              f"SAPS single stream at the bottleneck {best['wire']:.1f} Mbit/s ≥ 95 % of "
              f"{rate:g} Mbit/s (payload {best['goodput']:.1f} Mbit/s; a full-size "
              "frame carries 1448 payload bytes in 1514, so payload tops out at 95.6 %)")
    f7, v7 = sp.get("fig7"), by.get("vs", {}).get("fig7")
    if f7 and v7:
        check(f7["std"] < v7["std"], f"four-stream std-dev SAPS {f7['std']:.1f} < Virtual "
              f"Server's {v7['std']:.1f} Mbit/s")
    return "\n".join(o) + "\n"


def errors(t):
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(t["kinds"].items()))
    return f"{t['errors']}" + (f" ({kinds})" if kinds else "")


def human(n):
    for u, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n // k} {u}"
    return f"{n} B"


def write_doc(path, measured):
    """Replaces what lies between the markers of `path` (or appends)."""
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# The SAPS paper's evaluation on a namespace cluster\n"
    begin, end = "<!-- bench/paper:begin -->", "<!-- bench/paper:end -->"
    block = f"{begin}\n{measured.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "agent":
        agent(sys.argv[2:])
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", required=True, help="where saps-run and io-server are")
    ap.add_argument("--quick", action="store_true", help="short runs (about 3.5 minutes)")
    ap.add_argument("--only", default=",".join(SETUPS), help="comma-separated from "
                    + ",".join(SETUPS))
    ap.add_argument("--rate", default="50mbit", help="the line rate of every NIC (tc rate)")
    ap.add_argument("--queue", type=int, default=40, help="the bottleneck's queue, packets")
    ap.add_argument("--host-queue", type=int, default=1000,
                    help="every other NIC's queue, packets")
    ap.add_argument("--fabric-link", choices=("own", "lan"), default="own",
                    help="where the gateway reaches the nodes under SAPS and haproxy: "
                    "a cluster link of its own (as the paper's Myrinet) or the LAN")
    ap.add_argument("--sessions", type=int, default=800, help="Support sessions (all clients)")
    ap.add_argument("--think", type=float, default=2.0, help="mean think time, s")
    ap.add_argument("--support-secs", type=float, default=120.0,
                    help="counted seconds of the Support load (full run)")
    ap.add_argument("--doc", help="markdown file to write the results into")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--command", default="bench/paper", help="the command to report")
    args = ap.parse_args()
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    b = Bench(args)

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    started, started_at = time.monotonic(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = [open("/proc/loadavg").read().split()[0]]
    results = []
    try:
        for i, s in enumerate(x for x in args.only.split(",") if x):
            if s not in SETUPS:
                sys.exit(f"bench/paper: unknown setup {s}")
            results.append(b.setup(s, i))
    finally:
        b.cleanup()
    load.append(open("/proc/loadavg").read().split()[0])
    secs = time.monotonic() - started
    with open(os.path.join(b.work, "results.json"), "w") as f:
        json.dump(results, f)
    text = report(b, results, args.command, secs, started_at, load)
    print(text)
    if args.doc:
        plots(results, os.path.join(os.path.dirname(args.doc), "paper"), args.rate)
        write_doc(args.doc, text)
        log(f"wrote {args.doc} and its plots")
    if b.errors or args.keep:
        log(f"done in {secs:.0f} s; logs kept in {b.work}")
    else:
        shutil.rmtree(b.work, ignore_errors=True)
        log(f"done in {secs:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"bench/paper: stopped ({e or 'interrupted'}); every process and namespace "
              "it made was removed", file=sys.stderr)
        sys.exit(130)
