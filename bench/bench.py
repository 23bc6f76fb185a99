#!/usr/bin/env python3
"""End-to-end benchmark of SAPS against direct connections and haproxy.

Issue 7 ("Benchmarks against haproxy and direct connections"), plus the
measurements of issue 5 (python http.server and apache2 through SAPS) and
issue 6 (the cost of `saps-run --trace` next to strace). Started by
`bench/run`, which builds the release binaries first; python3's standard
library only.

Every setup serves the same programs on loopback: nginx (a 1 KiB and a
10 MiB file), `iperf3 -s` and a 4-byte echo server (the SAPS paper's
Table 3 ping-pong). The setups are: direct (no proxy), haproxy in TCP mode
in front of them, saps-run with its embedded io-server (relayed, and
zero-relay when saps-run offers `--zero-relay`), and a standalone io-server
with one node over a unix fabric (relayed, and zero-relay through the
io-server's hand-off socket), two nodes over unix, and one node over tcp. bench/hardening.py and
bench/stack.py are sections in modules of their own (issue 24's bounds on
against off; issue 21's `--stack kernel` against `--stack smoltcp`, from a
client namespace). Every load is bounded in time; every process started here is killed,
with its whole tree, on exit, error or Ctrl-C.
"""

import argparse
import atexit
import datetime
import json
import os
import random
import re
import resource
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
import urllib.request

import hardening
import stack
import upgrade

BEGIN = "<!-- bench/run:begin -->"
END = "<!-- bench/run:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes

class CpuPlan:
    """Which CPUs the load generators and the served side (servers,
    proxies, SAPS) run on. Apart where this process may use four CPUs or
    more (`--pin auto`): the upper half for this process and the load
    generators it starts (wrk, curl, iperf3, the ping-pong client), the
    lower half for everything `Procs.spawn` starts. Shared otherwise, or
    with `--pin off`."""

    def __init__(self, load=None, served=None, why=""):
        self.load, self.served, self.why = load, served, why

    @classmethod
    def make(cls, mode):
        cpus = sorted(os.sched_getaffinity(0))
        if mode == "off":
            return cls(why="--pin off")
        if len(cpus) < 4:
            return cls(why=f"only {len(cpus)} CPUs to run on")
        half = len(cpus) // 2
        return cls(set(cpus[half:]), set(cpus[:half]))

    def apply(self):
        """Moves this process (and so the load generators it starts) to
        the load CPUs."""
        if self.load:
            os.sched_setaffinity(0, self.load)

    def describe(self):
        if not self.load:
            return (f"the load generator (wrk, curl, iperf3, the ping-pong client) "
                    f"shares the CPUs with the servers ({self.why}), so the figures "
                    "also measure who gets a CPU when")
        cpus = lambda s: ",".join(map(str, sorted(s)))
        return (f"the load generator (wrk, curl, iperf3, the ping-pong client) runs "
                f"on CPUs {cpus(self.load)}, the servers, proxies and SAPS on CPUs "
                f"{cpus(self.served)}")


class Procs:
    """Every process this run started, each in its own session, so that the
    whole tree can be ended however the run ends; on `served_cpus` when
    the CPU plan keeps them apart from the load generators."""

    def __init__(self, logdir, served_cpus=None):
        self.logdir = logdir
        self.live = []
        self.served_cpus = served_cpus

    def spawn(self, name, argv, cwd=None):
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        cpus = self.served_cpus
        p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True,
                             preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        log.close()
        p.bench_name = name
        self.live.append(p)
        return p

    def log(self, p):
        with open(os.path.join(self.logdir, f"{p.bench_name}.log"), "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def stop(self, procs):
        """SIGTERM to each process's group and every descendant, SIGKILL
        to what is left after 5 s."""
        victims = set()  # kept across rounds: orphans lose their ppid link
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                if p.poll() is None:
                    victims.add(p.pid)
                victims |= descendants(p.pid)
            for pid in victims:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if all(p.poll() is not None for p in procs) and \
                        not any(alive(pid) for pid in victims):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        for p in procs:
            if p in self.live:
                self.live.remove(p)

    def stop_all(self):
        self.stop(list(self.live))


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(root):
    """Every process below `root` (its session members included), by ppid."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def cpu_seconds(pids):
    """utime+stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK_TCK


def perf_counts_syscalls():
    """Whether `perf stat` can count system calls here (Debian's linux-perf,
    and root or a low perf_event_paranoid)."""
    try:
        return subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "true"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class SyscallCount:
    """System calls made by every thread of `pids` while it runs, counted by
    `perf stat` (attaching takes a few ms, so a count misses that much)."""

    def __init__(self, pids, enabled):
        self.p = None
        if pids and enabled:
            self.p = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter",
                 "-p", ",".join(map(str, pids))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True, start_new_session=True)

    def stop(self):
        if self.p is None:
            return None
        self.p.send_signal(signal.SIGINT)
        try:
            err = self.p.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            self.p.kill()
            return None
        for line in err.splitlines():
            if "raw_syscalls:sys_enter" not in line:
                continue
            count = line.split(",")[0]
            if count.isdigit():
                return int(count)
            # The counter never ran: no thread of the process did.
            if count == "<not counted>":
                return 0
        return None


class CpuLimit:
    """A cgroup whose processes get at most `share` of one CPU (CFS bandwidth
    control: `cpu.max` on cgroup v2, `cpu.cfs_quota_us` on v1), for the
    gateway-bound runs. `CpuLimit.make` returns None and says why when this
    machine lets no such cgroup be made (no cpu controller, not root)."""

    PERIOD_US = 10000  # short, so a throttled gateway stalls at most ms

    def __init__(self, path, parent, enabled_cpu=False):
        self.path, self.parent = path, parent
        # Whether make() enabled the cpu controller for the parent's
        # children (cgroup v2), which remove() then undoes.
        self.enabled_cpu = enabled_cpu

    @classmethod
    def make(cls, share):
        name = f"saps-bench-{os.getpid()}"
        quota = max(1000, int(share * cls.PERIOD_US))
        v2 = "/sys/fs/cgroup"
        v1 = next((d for d in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")
                   if os.path.exists(os.path.join(d, "cpu.cfs_quota_us"))), None)
        try:
            if os.path.exists(os.path.join(v2, "cgroup.controllers")):
                with open(os.path.join(v2, "cgroup.controllers")) as f:
                    if "cpu" not in f.read().split():
                        return None, "cgroup v2 without the cpu controller"
                subtree = os.path.join(v2, "cgroup.subtree_control")
                with open(subtree) as f:
                    enabled = "cpu" not in f.read().split()
                if enabled:
                    write(subtree, "+cpu")
                limit = cls(os.path.join(v2, name), v2, enabled)
                try:
                    os.mkdir(limit.path)
                    write(os.path.join(limit.path, "cpu.max"), f"{quota} {cls.PERIOD_US}")
                except OSError:
                    limit.remove()
                    raise
                return limit, None
            if v1:
                path = os.path.join(v1, name)
                os.mkdir(path)
                write(os.path.join(path, "cpu.cfs_period_us"), str(cls.PERIOD_US))
                write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
                return cls(path, v1), None
        except OSError as e:
            return None, f"cannot make a cpu cgroup: {e}"
        return None, "no cgroup cpu controller mounted"

    def add(self, pids):
        for pid in pids:
            write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def remove(self):
        """Moves what is left back to the parent and deletes the cgroup."""
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                left = f.read().split()
            for pid in left:
                try:
                    write(os.path.join(self.parent, "cgroup.procs"), pid)
                except OSError:
                    pass  # exited meanwhile
            os.rmdir(self.path)
        except FileNotFoundError:
            pass  # never made
        except OSError as e:
            log(f"could not remove cgroup {self.path}: {e}")
        if self.enabled_cpu:
            try:
                write(os.path.join(self.parent, "cgroup.subtree_control"), "-cpu")
            except OSError as e:
                # Another cgroup under the parent uses it meanwhile.
                log(f"left the cpu controller enabled under {self.parent}: {e}")


def free_ports(n):
    """`n` distinct ports that bind on 0.0.0.0 right now, taken below the
    ephemeral range, so no outgoing connection (wrk's thousands under
    `Connection: close`, anyone else's) takes one before its server binds."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    low = 10000 if ephemeral > 12000 else 1024
    candidates = random.sample(range(low, ephemeral), min(2000, ephemeral - low))
    socks = []
    for port in candidates:
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            s.close()
            continue
        socks.append(s)
        if len(socks) == n:
            break
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    if len(ports) < n:
        raise RuntimeError(f"found only {len(ports)} free ports below {ephemeral}")
    return ports


def recv_exact(sock, n):
    """`n` octets from `sock`; EOFError if it ends before."""
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError("early EOF")
        got += chunk
    return got


def wait_until(what, timeout, check, procs=None, p=None):
    """Polls `check` until it is true; fails after `timeout` seconds or when
    `p` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{what}: {p.bench_name} exited with {p.returncode}"
                               f"\n--- its log ---\n{procs.log(p)}")
        time.sleep(0.05)
    detail = f"\n--- {p.bench_name} log ---\n{procs.log(p)}" if p else ""
    raise RuntimeError(f"{what} not ready within {timeout} s{detail}")


def listening(port):
    """Whether some socket LISTENs on `port` in this network namespace."""
    want = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A" and \
                            (parts[1] + " ").endswith(want):
                        return True
        except OSError:
            pass
    return False


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read()
    except OSError:
        return None


# ---------------------------------------------------------------- configs

def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def make_site(d, who):
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    write(os.path.join(www, "who"), f"{who}\n")
    with open(os.path.join(www, "1k.bin"), "wb") as f:
        f.write(bytes(i * 7 % 251 for i in range(1024)))
    with open(os.path.join(www, "10m.bin"), "wb") as f:
        f.write(bytes(range(256)) * (40 * 1024))
    os.chmod(d, 0o755)
    os.chmod(www, 0o755)
    return www


def nginx_argv(d, port, workers):
    """nginx serving `d/www` on `port`, configured like the e2e tests."""
    conf = os.path.join(d, "nginx.conf")
    write(conf, (
        f"daemon off; master_process on; worker_processes {workers}; user root;\n"
        f"pid {d}/nginx.pid; error_log {d}/error.log;\n"
        "events { worker_connections 4096; use epoll; }\n"
        f"http {{ access_log off; sendfile on; keepalive_requests 1000000;\n"
        f"  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n"
        f"  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi;\n"
        f"  scgi_temp_path {d}/scgi;\n"
        f"  server {{ listen {port} backlog=4096; root {d}/www; }} }}\n"))
    return ["nginx", "-c", conf, "-e", os.path.join(d, "error.log")]


def apache_argv(d, port):
    """apache2 with the event MPM, configured like the e2e tests."""
    m = "/usr/lib/apache2/modules"
    conf = os.path.join(d, "httpd.conf")
    write(conf, (
        f"ServerRoot {d}\nServerName localhost\nListen {port}\n"
        f"PidFile {d}/httpd.pid\n"
        f"LoadModule mpm_event_module {m}/mod_mpm_event.so\n"
        f"LoadModule authz_core_module {m}/mod_authz_core.so\n"
        f"LoadModule mime_module {m}/mod_mime.so\n"
        f"User www-data\nGroup www-data\nErrorLog {d}/error.log\n"
        f"Mutex file:{d} default\nTypesConfig /etc/mime.types\n"
        "EnableSendfile On\nMaxKeepAliveRequests 0\n"
        "StartServers 2\nServerLimit 4\nThreadsPerChild 64\nMaxRequestWorkers 256\n"
        "MinSpareThreads 32\nMaxSpareThreads 256\n"
        f"DocumentRoot {d}/www\n<Directory {d}/www>\n Require all granted\n"
        "</Directory>\n"))
    return ["apache2", "-f", conf, "-DFOREGROUND"]


def bundle_argv(d, ports, workers, full=True):
    """One command running nginx, and with `full` also iperf3 and the echo
    server, so one saps-run serves all three."""
    cmds = [nginx_argv(d, ports["http"], workers)]
    if full:
        cmds.append(["iperf3", "-s", "-p", str(ports["iperf"])])
        cmds.append([sys.executable, os.path.abspath(__file__), "echo-server",
                     str(ports["echo"])])
    script = " & ".join(shlex.join(c) for c in cmds) + " & wait"
    return ["sh", "-c", script]


def haproxy_conf(d, routes, nbthread):
    conf = os.path.join(d, "haproxy.cfg")
    text = (f"global\n  nbthread {nbthread}\n  maxconn 8000\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n"
            "  timeout client 60s\n  timeout server 60s\n")
    for name, (front, back) in routes.items():
        text += (f"listen {name}\n  bind 127.0.0.1:{front}\n"
                 f"  server s1 127.0.0.1:{back}\n")
    write(conf, text)
    return conf


# ---------------------------------------------------------------- setups

class Setup:
    """A running setup: the ports clients use, the gateway's pids (whose CPU
    is charged as relaying cost) and the saps-run nodes' pids."""

    def __init__(self, ports):
        self.ports = ports
        self.gateway = []
        self.nodes = []
        self.procs = []


class Bench:
    def __init__(self, args, plan):
        self.work = tempfile.mkdtemp(prefix="saps-bench.")
        os.chmod(self.work, 0o755)
        self.procs = Procs(self.work, plan.served)
        self.saps_run = os.path.join(args.bin_dir, "saps-run")
        self.io_server = os.path.join(args.bin_dir, "io-server")
        help_text = subprocess.run([self.saps_run, "--help"], capture_output=True,
                                   text=True, timeout=30).stdout
        self.zero_relay = "--zero-relay" in help_text
        m = re.search(r"--zero-relay.*?\[default: (\w+)\]", help_text, re.S)
        self.zero_relay_default = m.group(1) if m else ("unknown" if self.zero_relay else None)
        # Builds before native sockets had none: their defaults were virtual.
        self.native_sockets = "--native-sockets" in help_text
        self.perf = perf_counts_syscalls()
        self.token = os.path.join(self.work, "token")
        write(self.token, "bench token\n")
        os.chmod(self.token, 0o600)
        self.n = 0

    def dir(self, name):
        self.n += 1
        d = os.path.join(self.work, f"{self.n:02}-{name}")
        os.makedirs(d)
        os.chmod(d, 0o755)
        return d

    def spawn(self, setup, name, argv, cwd=None):
        p = self.procs.spawn(f"{self.n:02}-{name}", argv, cwd)
        setup.procs.append(p)
        return p

    def wait_ready(self, setup, p, full=True):
        ports = setup.ports
        wait_until(f"http on {ports['http']}", 30,
                   lambda: http_get(f"http://127.0.0.1:{ports['http']}/1k.bin"),
                   self.procs, p)
        if full:
            for k in ("iperf", "echo"):
                wait_until(f"{k} on {ports[k]}", 30,
                           lambda k=k: listening(ports[k]), self.procs, p)

    def embedded_flags(self, kind):
        """saps-run's flags for each embedded setup, or None for others.
        An `--address` makes the embedded io-server's sockets virtual
        whatever the build's default; the rows without one run saps-run's
        defaults (native sockets, where the build has them)."""
        local = ("--address", "127.0.0.1")
        virtual = ("--native-sockets", "off") if self.native_sockets else ()
        return {
            "embedded": local + (("--zero-relay", "off") if self.zero_relay else ()),
            "zero-relay": local + virtual + ("--zero-relay", "on"),
            "virtual": local + virtual,
            "native": (),
            "default": (),
            "trace": ("--trace", "-o", "/dev/null"),
        }.get(kind)

    def start(self, kind, app="bundle"):
        """Starts setup `kind` serving `app` ("bundle": nginx, iperf3 and
        echo; "nginx"; "python"; "apache") and waits until it answers."""
        full = app == "bundle"
        s = Setup(dict(zip(("http", "iperf", "echo"), free_ports(3))))
        d = self.dir(f"{kind}-{app}")
        www = os.path.join(d, "www")
        try:
            if kind in ("unix-1", "unix-2", "tcp-1", "unix-1-zr", hardening.OFF):
                p = self.cluster(s, kind, d, app)
            else:
                make_site(d, "a")
                # haproxy's servers listen on ports of their own.
                proxied = kind in ("haproxy", "haproxy-1")
                ports = dict(zip(s.ports, free_ports(3))) if proxied else s.ports
                program = self.program(app, d, ports, 2)
                flags = self.embedded_flags(kind)
                if flags is not None:
                    p = self.spawn(s, "saps-run", [self.saps_run, *flags, "--", *program],
                                   cwd=www)
                    s.gateway.append(p.pid)
                elif kind == "strace":
                    p = self.spawn(s, "server", ["strace", "-f", "-e", "trace=network",
                                                 "-o", "/dev/null", *program], cwd=www)
                else:
                    p = self.spawn(s, "server", program, cwd=www)
                if proxied:
                    self.wait_ready(Setup(ports), p, full)
                    routes = {k: (s.ports[k], ports[k]) for k in (s.ports if full else ["http"])}
                    nbthread = 1 if kind == "haproxy-1" else 2
                    p = self.spawn(s, "haproxy", ["haproxy", "-db", "-f",
                                                  haproxy_conf(d, routes, nbthread)])
                    s.gateway.append(p.pid)
            self.wait_ready(s, p, full)
            if kind == "unix-2":
                self.wait_both_nodes(s, p)
        except BaseException:
            self.procs.stop(s.procs)
            raise
        return s

    def program(self, app, d, ports, workers):
        if app == "python":
            return [sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
                    "--directory", os.path.join(d, "www"), str(ports["http"])]
        if app == "apache":
            return apache_argv(d, ports["http"])
        return bundle_argv(d, ports, workers, full=app == "bundle")

    def cluster(self, s, kind, d, app):
        """A standalone io-server and one or two saps-run nodes."""
        if kind == "tcp-1":
            fabric = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        else:
            fabric = f"unix:{d}/fabric.sock"
        control = os.path.join(d, "control.sock")
        io = self.spawn(s, "io-server", [
            self.io_server, "--fabric", fabric, "--address", "127.0.0.1",
            "--token-file", self.token, "--control", control, "--scheduler", "rr",
            *(hardening.OFF_FLAGS if kind == hardening.OFF else ())])
        s.gateway.append(io.pid)
        wait_until("io-server control socket", 30,
                   lambda: os.path.exists(control), self.procs, io)
        names = ["a", "b"] if kind == "unix-2" else ["a"]
        # Nodes relay unless the setup is the same-host zero-relay one.
        relay = (() if not self.zero_relay else
                 ("--zero-relay", "on" if kind == "unix-1-zr" else "off"))
        first = None
        for name in names:
            nd = os.path.join(d, name)
            os.makedirs(nd)
            os.chmod(nd, 0o755)
            make_site(nd, name)
            # Two nodes: one nginx worker each, and only node a runs iperf3
            # and the echo server (their connections must reach one process).
            program = bundle_argv(nd, s.ports, 1 if len(names) == 2 else 2,
                                  full=(app == "bundle" and name == "a"))
            p = self.spawn(s, f"node-{name}", [
                self.saps_run, "--io-server", fabric, "--token-file", self.token,
                "--node", name, *relay, "--", *program], cwd=os.path.join(nd, "www"))
            s.nodes.append(p.pid)
            first = first or p
        return first

    def wait_both_nodes(self, s, p):
        """Round robin alternates once both nodes have joined the group."""
        seen = set()

        def both():
            body = http_get(f"http://127.0.0.1:{s.ports['http']}/who")
            if body:
                seen.add(body.strip())
            return len(seen) == 2

        wait_until("both nodes behind the io-server", 30, both, self.procs, p)


# ---------------------------------------------------------------- workloads

def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        return None
    v = float(m.group(1))
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[m.group(2)]


def wrk(url, conns, secs, close=False):
    """wrk -t2 with --latency: requests/s, p50/p99 in ms, requests, errors."""
    argv = ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--timeout", "5s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [url], capture_output=True, text=True,
                         timeout=secs + 60).stdout
    r = {"rps": None, "p50": None, "p99": None, "requests": 0, "errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[key] = to_ms(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["errors"] += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r["errors"] += int(m.group(1))
    if r["rps"] is None:
        r["errors"] += 1
    return r


def curl_gbps(url, repeats):
    """Median Gbit/s of `repeats` downloads."""
    speeds = []
    for _ in range(repeats):
        out = subprocess.run(["curl", "-sS", "--max-time", "30", "-o", "/dev/null",
                              "-w", "%{size_download} %{time_total}", url],
                             capture_output=True, text=True, timeout=60).stdout.split()
        if len(out) == 2 and float(out[1]) > 0 and int(float(out[0])) == 10 * 1024 * 1024:
            speeds.append(float(out[0]) * 8 / float(out[1]) / 1e9)
    if not speeds:
        raise RuntimeError("no complete download")
    return statistics.median(speeds)


def iperf3(port, secs, streams):
    """(Gbit/s received, bytes received) of one iperf3 run."""
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t",
                          str(secs), "-P", str(streams), "-J"],
                         capture_output=True, text=True, timeout=secs + 30).stdout
    try:
        report = json.loads(out)
        s = report["end"]["sum_received"]
    except (ValueError, KeyError):
        raise RuntimeError(f"no iperf3 result: {out[-300:]!r}") from None
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    return s["bits_per_second"] / 1e9, s["bytes"]


def ping_pong(port, n, host="127.0.0.1"):
    """Round trips of 4 bytes on one connection: (mean µs, p50 µs)."""
    with socket.create_connection((host, port), timeout=5) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(n + n // 10):
            t0 = time.perf_counter_ns()
            c.sendall(b"ping")
            recv_exact(c, 4)
            if i >= n // 10:  # the first tenth warms up
                times.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.mean(times), statistics.median(times)


def echo_server(port):
    """The ping-pong peer: echoes every connection's bytes, one thread each."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)

    def serve(c):
        with c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(data)

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


# ---------------------------------------------------------------- the run

MAIN_SETUPS = [
    ("direct", "direct (no proxy)"),
    ("haproxy", "haproxy, mode tcp, nbthread 2"),
    ("haproxy-1", "haproxy, mode tcp, nbthread 1"),
    ("native", "SAPS embedded, native sockets (saps-run's defaults)"),
    ("embedded", "SAPS embedded (relayed)"),
    ("zero-relay", "SAPS embedded, --zero-relay on, virtual sockets"),
    ("unix-1", "SAPS io-server + 1 node, unix"),
    ("unix-1-zr", "SAPS io-server + 1 node, unix, --zero-relay on"),
    ("unix-2", "SAPS io-server + 2 nodes, unix"),
    ("tcp-1", "SAPS io-server + 1 node, tcp"),
]

# (key, column title, decimals, higher is better)
HTTP_COLS = [
    ("ka50_rps", "keep-alive c50 req/s", 0, True),
    ("ka50_p50", "c50 p50 ms", 2, False),
    ("ka50_p99", "c50 p99 ms", 2, False),
    ("ka400_rps", "keep-alive c400 req/s", 0, True),
    ("ka400_p50", "c400 p50 ms", 2, False),
    ("ka400_p99", "c400 p99 ms", 2, False),
    ("close_rps", "Connection: close c50 req/s", 0, True),
]
BYTES_COLS = [
    ("dl_gbps", "10 MiB curl Gbit/s", 2, True),
    ("ip1_gbps", "iperf3 -P 1 Gbit/s", 2, True),
    ("ip4_gbps", "iperf3 -P 4 Gbit/s", 2, True),
    ("rtt_p50", "ping-pong p50 µs", 1, False),
    ("rtt_mean", "ping-pong mean µs", 1, False),
]
CPU_COLS = [
    ("gw_10k_ka", "gateway CPU s / 10k req (keep-alive)", 3, False),
    ("gw_10k_close", "gateway CPU s / 10k req (close)", 3, False),
    ("gw_gib", "gateway CPU s / GiB", 3, False),
    ("node_10k_ka", "saps-run nodes CPU s / 10k req (keep-alive)", 3, False),
    ("node_10k_close", "saps-run nodes CPU s / 10k req (close)", 3, False),
    ("node_gib", "saps-run nodes CPU s / GiB", 3, False),
]
SYSCALL_COLS = [
    ("gw_sys_ka", "gateway syscalls / req (keep-alive)", 2, False),
    ("gw_sys_close", "gateway syscalls / req (close)", 2, False),
    ("node_sys_ka", "saps-run nodes syscalls / req (keep-alive)", 2, False),
    ("node_sys_close", "saps-run nodes syscalls / req (close)", 2, False),
]
EXTRA_COLS = [
    ("ka50_rps", "keep-alive c50 req/s", 0, True),
    ("ka50_p99", "c50 p99 ms", 2, False),
    ("close_rps", "Connection: close c50 req/s", 0, True),
]

# Rounds of the interleaved zero-relay against direct comparison.
INTERLEAVED_ROUNDS = 3
# The servers of the hot-path table: (app, Connection: close, wrk
# connections, what). python's http.server listens with a backlog of 5:
# more clients than that measure SYN retransmits, not the server; it
# speaks HTTP/1.0, so each of its requests is a connection anyway.
HOT_PATH = [
    ("apache", False, 50, "apache2 (event), keep-alive c50"),
    ("python", False, 10, "python3 -m http.server, c10"),
    ("nginx", True, 50, "nginx, Connection: close c50"),
]

# The gateway-bound runs: the setups whose gateway is a process of its own.
LABELS = dict(MAIN_SETUPS)
GATEWAY_SETUPS = [(k, LABELS[k]) for k in ("haproxy-1", "haproxy", "unix-1", "tcp-1", "unix-1-zr")]
_COLS = {c[0]: c for c in HTTP_COLS + BYTES_COLS + CPU_COLS}
GATEWAY_COLS = [_COLS[k] for k in ("ka50_rps", "ka50_p99", "close_rps", "ip1_gbps",
                                   "gw_10k_ka", "gw_10k_close", "gw_gib")]


class Run:
    def __init__(self, bench, quick, gateway_cpu):
        self.b = bench
        self.quick = quick
        self.gateway_cpu = gateway_cpu
        self.secs = 3 if quick else 5
        self.rounds = 1 if quick else 2
        self.iperf_secs = 2 if quick else 5
        self.errors = []

    def measured(self, s, f, syscalls=False):
        """Runs `f()` and returns (its result, gateway CPU s, nodes CPU s,
        gateway system calls, nodes system calls); the calls are counted
        only with `syscalls` and where perf can (else None)."""
        counts = [SyscallCount(pids, syscalls and self.b.perf) for pids in (s.gateway, s.nodes)]
        g0, n0 = cpu_seconds(s.gateway), cpu_seconds(s.nodes)
        r = f()
        g, n = cpu_seconds(s.gateway) - g0, cpu_seconds(s.nodes) - n0
        return (r, g, n, *(c.stop() for c in counts))

    def http(self, label, s, row, conns, close, key, cpu_key=None):
        """wrk on the 1 KiB file, best of `self.rounds` runs (the one least
        disturbed by whatever else the shared vCPUs do), with the gateway's
        and nodes' CPU over that run."""
        url = f"http://127.0.0.1:{s.ports['http']}/1k.bin"
        what = f"wrk -c{conns}{' close' if close else ''}"
        failed = {"rps": None, "p50": None, "p99": None, "requests": 0, "errors": 0}
        best = None
        for _ in range(self.rounds):
            m = self.measured(s, lambda: self.attempt(
                label, what, lambda: wrk(url, conns, self.secs, close), failed),
                syscalls=cpu_key is not None)
            r = m[0]
            if r["errors"]:
                self.errors.append(f"{label}: {what}: {r['errors']} errors")
            if best is None or (r["rps"] or 0) > (best[0]["rps"] or 0):
                best = m
        r, g, n, gs, ns = best
        row[f"{key}_rps"], row[f"{key}_p50"], row[f"{key}_p99"] = r["rps"], r["p50"], r["p99"]
        if not (cpu_key and r["requests"]):
            return
        for pids, cpu, calls, who in ((s.gateway, g, gs, "gw"), (s.nodes, n, ns, "node")):
            if pids:
                row[f"{who}_10k_{cpu_key}"] = cpu / r["requests"] * 1e4
            if pids and calls is not None:
                row[f"{who}_sys_{cpu_key}"] = calls / r["requests"]

    def attempt(self, label, what, f, default=None):
        """Runs one workload; a failure is reported, not fatal to the run."""
        try:
            return f()
        except Exception as e:  # noqa: BLE001 - any failure becomes a report line
            self.errors.append(f"{label}: {what}: {e}".splitlines()[0][:300])
            log(f"  {label}: {what} failed: {e}")
            return default

    def served(self, kind, label, body, app="bundle"):
        """Starts setup `kind` serving `app`, warms it up, runs `body(s,
        row)` and stops it; returns the row `body` filled (empty when the
        setup did not start)."""
        s = self.attempt(label, "start", lambda: self.b.start(kind, app))
        row = {}
        if s is None:
            return row
        try:
            self.attempt(label, "warm-up", lambda: wrk(
                f"http://127.0.0.1:{s.ports['http']}/1k.bin", 10, 1))
            body(s, row)
        finally:
            self.b.procs.stop(s.procs)
        return row

    def main_setup(self, kind, label):
        def body(s, row):
            base = f"http://127.0.0.1:{s.ports['http']}"
            self.http(label, s, row, 50, False, "ka50", "ka")
            self.http(label, s, row, 400, False, "ka400")
            self.http(label, s, row, 50, True, "close", "close")
            row["dl_gbps"] = self.attempt(label, "curl", lambda: curl_gbps(
                f"{base}/10m.bin", 3 if self.quick else 7))
            self.single_stream(label, s, row)
            row["ip4_gbps"] = self.attempt(label, "iperf3 -P 4", lambda: iperf3(
                s.ports["iperf"], self.iperf_secs, 4), (None, 0))[0]
            row["rtt_mean"], row["rtt_p50"] = self.attempt(
                label, "ping-pong",
                lambda: ping_pong(s.ports["echo"], 2000 if self.quick else 10000),
                (None, None))
        return self.served(kind, label, body)

    def single_stream(self, label, s, row):
        """iperf3 -P 1, with the gateway's and nodes' CPU per GiB."""
        (gbps, nbytes), g, n, _, _ = self.measured(s, lambda: self.attempt(
            label, "iperf3 -P 1", lambda: iperf3(s.ports["iperf"], self.iperf_secs, 1),
            (None, 0)))
        row["ip1_gbps"] = gbps
        if nbytes:
            if s.gateway:
                row["gw_gib"] = g / (nbytes / 2**30)
            if s.nodes:
                row["node_gib"] = n / (nbytes / 2**30)

    def gateway_setup(self, kind, label, limit):
        """The gateway process in `limit`'s cgroup (after the warm-up);
        nginx, the nodes and the load generators run free."""
        def body(s, row):
            limit.add(s.gateway)
            self.http(label, s, row, 50, False, "ka50", "ka")
            self.http(label, s, row, 50, True, "close", "close")
            self.single_stream(label, s, row)
        return self.served(kind, label, body)

    def interleaved(self, kinds):
        """Each of `kinds` started afresh in turn, `INTERLEAVED_ROUNDS`
        times over: wrk c50 keep-alive and iperf3 -P 1 per start. Figures
        that drift with the machine (builds, the other tenant of the vCPUs)
        drift for every setup alike."""
        runs = {k: {"rps": [], "gbps": []} for k, _ in kinds}
        for n in range(1 if self.quick else INTERLEAVED_ROUNDS):
            for k, label in kinds:
                log(f"{label} (interleaved, round {n + 1}) ...")

                def body(s, row, label=label):
                    url = f"http://127.0.0.1:{s.ports['http']}/1k.bin"
                    r = self.attempt(label, "wrk -c50", lambda: wrk(url, 50, self.secs), {})
                    row["rps"] = r.get("rps")
                    row["gbps"] = self.attempt(label, "iperf3 -P 1", lambda: iperf3(
                        s.ports["iperf"], self.iperf_secs, 1), (None, 0))[0]
                row = self.served(k, label, body)
                for key in ("rps", "gbps"):
                    if row.get(key):
                        runs[k][key].append(row[key])
        return [(k, label, runs[k]) for k, label in kinds]

    def hot_path(self, kinds):
        """The servers that trap per request or per connection under
        virtual sockets (issue 23), each of `kinds` started afresh in turn,
        round after round: one wrk run per start, at the load of `HOT_PATH`."""
        apps = [a for a in HOT_PATH if a[0] != "apache" or have("apache2")]
        runs = {(app, k): [] for app, *_ in apps for k, _ in kinds}
        for n in range(2 if self.quick else INTERLEAVED_ROUNDS):
            for app, close, conns, what in apps:
                for k, label in kinds:
                    label = f"{what}, {label}"
                    log(f"{label} (round {n + 1}) ...")

                    def body(s, row, label=label, close=close, conns=conns):
                        url = f"http://127.0.0.1:{s.ports['http']}/1k.bin"
                        r = self.attempt(label, f"wrk -c{conns}",
                                         lambda: wrk(url, conns, self.secs, close), {})
                        row["rps"] = r.get("rps")
                    row = self.served(k, label, body, app)
                    if row.get("rps"):
                        runs[(app, k)].append(row["rps"])
        return [(app, what, [(k, label, runs[(app, k)]) for k, label in kinds])
                for app, _, _, what in apps]

    def tracing_setup(self, kind, label):
        """nginx under setup `kind`: wrk c50 keep-alive and Connection: close."""
        def body(s, row):
            self.http(label, s, row, 50, False, "ka50")
            self.http(label, s, row, 50, True, "close")
        return self.served(kind, label, body, "nginx")

    def all(self, only):
        main = [(k, l) for k, l in MAIN_SETUPS
                if (k not in ("zero-relay", "unix-1-zr") or self.b.zero_relay)
                and (k != "native" or self.b.native_sockets)
                and (not only or k in only)]
        tracing = [("direct", "nginx, direct"),
                   ("strace", "nginx under strace -f -e trace=network"),
                   ("default", "nginx under saps-run"),
                   ("trace", "nginx under saps-run --trace -o /dev/null")]
        if not have("strace"):
            tracing = [t for t in tracing if t[0] != "strace"]
        servers = [("direct", "direct"), ("default", "saps-run (its defaults)"),
                   ("virtual", "saps-run, virtual sockets")]
        if not self.b.native_sockets:
            servers = servers[:2]
        results = {"main": [], "tracing": [], "servers": [], "gateway": [],
                   "gateway_skipped": None, "interleaved": [], "hardening": [],
                   "stack": None, "upgrade": None}
        for k, label in main:
            log(f"{label} ...")
            results["main"].append((k, label, self.main_setup(k, label)))
        if self.b.zero_relay and (not only or "interleaved" in only):
            results["interleaved"] = self.interleaved(
                [(k, LABELS[k]) for k in ("direct", "native", "zero-relay", "unix-1-zr")
                 if k != "native" or self.b.native_sockets])
        if not only or "hardening" in only:
            log("hardening cost: bounds and timeouts on against off, alternating ...")
            results["hardening"] = hardening.run(self, wrk, self.quick)
        if not only or "stack" in only:
            log("kernel stack against --stack smoltcp, alternating ...")
            results["stack"] = stack.run(self, self.quick)
        if not only or "upgrade" in only:
            log("io-server upgrade under load: without, then with upgrades ...")
            results["upgrade"] = upgrade.run(self, self.quick)
        if self.gateway_cpu and (not only or "gateway-bound" in only):
            limit, why = CpuLimit.make(self.gateway_cpu)
            if limit is None:
                log(f"gateway-bound runs skipped: {why}")
                results["gateway_skipped"] = why
            else:
                try:
                    for k, label in GATEWAY_SETUPS:
                        if k == "unix-1-zr" and not self.b.zero_relay:
                            continue
                        log(f"{label}, gateway limited to {self.gateway_cpu} CPU ...")
                        results["gateway"].append(
                            (k, label, self.gateway_setup(k, label, limit)))
                finally:
                    limit.remove()
        if not only or "tracing" in only:
            for k, label in tracing:
                log(f"{label} ...")
                results["tracing"].append((k, label, self.tracing_setup(k, label)))
        if not only or "servers" in only:
            results["servers"] = self.hot_path(servers)
        return results


def have(program):
    return any(os.access(os.path.join(p, program), os.X_OK)
               for p in os.environ.get("PATH", "").split(":"))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report

def cell(v, decimals, ref=None):
    if v is None:
        return "–"
    text = f"{v:,.{decimals}f}".replace(",", " ")
    if ref:
        text += f" ({v / ref:.2f}×)"
    return text


def table(rows, cols, ref_key):
    """A markdown table; each cell also gives its ratio to the row `ref_key`."""
    ref = next((r for k, _, r in rows if k == ref_key), {})
    head = "| setup | " + " | ".join(c[1] for c in cols) + " |\n"
    head += "|---|" + "---:|" * len(cols) + "\n"
    body = "".join(
        f"| {label} | " + " | ".join(cell(r.get(key), dec, ref.get(key) if ref is not r else None)
                                     for key, _, dec, _ in cols) + " |\n"
        for _, label, r in rows)
    return head + body


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} vCPU ({cpu}), Linux `{os.uname().release}`"


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main_tables(out, rows):
    """The tables of the setups compared with haproxy."""
    out.append("#### HTTP: nginx, 1 KiB file, wrk\n")
    out.append(table(rows, HTTP_COLS, "haproxy"))
    out.append("\n#### Bytes and round trips\n")
    out.append(table(rows, BYTES_COLS, "haproxy"))
    out.append("\n#### CPU of the gateway process\n")
    out.append("Gateway: haproxy; the io-server; saps-run itself when embedded "
               "(io-server and supervisor in one process). utime+stime of all its "
               "threads from `/proc/PID/stat` over the reported wrk c50 runs and the "
               "single-stream iperf3 run; the programs it serves are not counted. "
               "The saps-run nodes (supervisors) of the io-server setups are shown "
               "apart.\n")
    out.append(table(rows, CPU_COLS, "haproxy"))
    if any(k in r for _, _, r in rows for k, *_ in SYSCALL_COLS):
        out.append("\n#### System calls of the gateway process\n")
        out.append("Counted with `perf stat -e raw_syscalls:sys_enter -p PIDS` over the "
                   "same wrk c50 runs as the CPU table, divided by the requests served: "
                   "steadier than CPU time on shared vCPUs, since each call on loopback "
                   "also pays for the wake-up of the process at the other end.\n")
        out.append(table(rows, SYSCALL_COLS, "haproxy"))


def interleaved_table(out, rows):
    """Medians (and ranges) of the interleaved runs, with ratios to direct."""
    ref = next((r for k, _, r in rows if k == "direct"), {})
    out.append("\n#### Zero-relay against direct, interleaved\n")
    out.append("Each setup started afresh in turn, round after round; per start one "
               "wrk c50 keep-alive run on the 1 KiB file and one `iperf3 -P 1`. Cells "
               "give the median and, in brackets, the range; the ratios are of "
               "medians to direct's.\n")
    text = ("| setup | runs | keep-alive c50 req/s | ratio | iperf3 -P 1 Gbit/s | ratio |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    for _, label, r in rows:
        ratios = []
        for key in ("rps", "gbps"):
            if r[key] and ref.get(key) and r is not ref:
                ratios.append(f"{statistics.median(r[key]) / statistics.median(ref[key]):.2f}×")
            else:
                ratios.append("–")
        text += (f"| {label} | {len(r['rps'])} | {spread(r['rps'], 0)} | {ratios[0]} | "
                 f"{spread(r['gbps'], 2)} | {ratios[1]} |\n")
    out.append(text)


def spread(v, decimals):
    """A median and, in brackets, the range."""
    if not v:
        return "–"
    return (f"{cell(statistics.median(v), decimals)} "
            f"({cell(min(v), decimals)}–{cell(max(v), decimals)})")


def hot_path_table(out, apps):
    """One table per server of the hot-path runs, ratios of medians to
    the server run directly."""
    out.append("\n#### Servers that would trap per request (issue 23): 1 KiB file, wrk\n")
    out.append("apache2 (event MPM) sets `TCP_CORK` on and off around each response; "
               "python's http.server takes a connection per request and asks "
               "`getsockname` and `shutdown` of each; nginx with `Connection: close` "
               "accepts a connection per request. Each setup started afresh in turn, "
               "round after round, one wrk run per start; cells give the median and, "
               "in brackets, the range; ratios are of medians to the same server run "
               "directly.\n")
    for _, what, rows in apps:
        ref = next((r for k, _, r in rows if k == "direct"), [])
        text = f"\n{what}:\n\n| setup | runs | req/s | ratio |\n|---|---:|---:|---:|\n"
        for k, label, r in rows:
            ratio = (f"{statistics.median(r) / statistics.median(ref):.2f}×"
                     if r and ref and k != "direct" else "–")
            text += f"| {label} | {len(r)} | {spread(r, 0)} | {ratio} |\n"
        out.append(text)


def gateway_table(out, rows, share):
    """The gateway-bound table, with ratios to the faster haproxy row."""
    ref = max((r for r in rows if r[0].startswith("haproxy")),
              key=lambda r: r[2].get("ka50_rps") or 0, default=None)
    out.append(f"\n#### Gateway-bound: the gateway limited to {share:g} of a CPU\n")
    out.append("One gateway in front of a cluster whose nodes have CPUs of their own: "
               "after the warm-up, the gateway process (haproxy; the io-server) is put "
               f"in a cgroup whose CFS quota is {share:g} of one CPU "
               f"({CpuLimit.PERIOD_US // 1000} ms period), while nginx, the saps-run node "
               "and the load generators run unlimited. Requests/s then measure what a "
               "gateway CPU carries, the figure that decides how many gateways a "
               "cluster needs. Ratios are to "
               f"{ref[1] if ref else 'haproxy'}, the faster haproxy here.\n")
    out.append(table(rows, GATEWAY_COLS, ref[0] if ref else "haproxy"))


def report(results, command, quick, zero_relay, load_before, load_after, errors, secs,
           rounds, gateway_cpu, plan, native_sockets=False):
    rounds = f", best of {rounds} runs" if rounds > 1 else ""
    today = datetime.date.today().isoformat()
    out = [f"### Run of {today}{' (--quick)' if quick else ''}\n",
           f"Command: `{command}`\n",
           f"Machine: {machine()}. Load average {load_before} before the run, "
           f"{load_after} after it; {plan.describe()}. The CPUs may be busy "
           "with other work (builds), so figures are noisy.\n",
           f"Each wrk load runs {secs} s with 2 threads{rounds}. Cells give the figure and, "
           "in brackets, its ratio to haproxy's with nbthread 2 (for req/s and Gbit/s "
           "higher is better; for ms, µs and CPU lower is better). nbthread 2 is "
           "haproxy's faster setting on this machine; the io-server and saps-run "
           "run their default of one event-loop thread (`--threads 1`), which the "
           "nbthread 1 row matches.\n"]
    if zero_relay:
        out.append(f"saps-run's `--zero-relay` defaults to `{zero_relay}` in this build; "
                   "the relayed embedded row and the io-server rows pass `--zero-relay "
                   "off` (but for the one marked `--zero-relay on`, where the node takes "
                   "its clients' sockets through the io-server's hand-off socket), the "
                   "tracing rows and the hot-path table's saps-run rows run saps-run with its "
                   "defaults.\n")
    else:
        out.append("saps-run had no `--zero-relay` flag in this build: no zero-relay row.\n")
    if native_sockets:
        out.append("With saps-run's defaults the embedded io-server's node gets the "
                   "kernel's own sockets (`--native-sockets`, docs/interceptor.md): the "
                   "native sockets row, the tracing rows and the hot-path table's "
                   "`saps-run` rows run so. Every row with `--address 127.0.0.1` (the "
                   "other embedded rows, those marked virtual sockets) has virtual "
                   "sockets, as every node of an io-server does.\n")
    if results["main"]:
        main_tables(out, results["main"])
    if results["interleaved"]:
        interleaved_table(out, results["interleaved"])
    if results["hardening"]:
        hardening.table(out, results["hardening"], load_after)
    if results["stack"]:
        stack.table(out, results["stack"], load_after)
    if results["upgrade"]:
        upgrade.table(out, results["upgrade"], load_after)
    if results["gateway"]:
        gateway_table(out, results["gateway"], gateway_cpu)
    elif results["gateway_skipped"]:
        out.append(f"\nGateway-bound runs skipped: {results['gateway_skipped']}.\n")
    if results["tracing"]:
        out.append("\n#### Tracing cost (issue 6): nginx, 1 KiB file, wrk c50\n")
        out.append("Ratios are to plain saps-run.\n")
        out.append(table(results["tracing"], EXTRA_COLS, "default"))
    if results["servers"]:
        hot_path_table(out, results["servers"])
    if errors:
        out.append("\nErrors seen by the load generators:\n")
        out.extend(f"* {e}\n" for e in errors)
    return "\n".join(out).replace("\n\n\n", "\n\n")


def write_doc(path, text, begin=BEGIN, end=END, heading="End-to-end"):
    """Replaces what lies between the markers (or appends a new section)."""
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "echo-server":
        echo_server(int(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", required=True, help="where saps-run and io-server are")
    ap.add_argument("--quick", action="store_true", help="3 s loads (about 3 minutes)")
    ap.add_argument("--only", default="",
                    help="comma-separated setups (direct,haproxy,haproxy-1,embedded,zero-relay,"
                         "unix-1,unix-1-zr,unix-2,tcp-1,tracing,servers,gateway-bound,"
                         "interleaved,hardening,stack,upgrade)")
    ap.add_argument("--gateway-cpu", type=float, default=0.25, metavar="SHARE",
                    help="the share of one CPU the gateway gets in the gateway-bound "
                         "runs (0: no such runs)")
    ap.add_argument("--doc", help="markdown file to write the report into")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (configs, logs) even without errors")
    ap.add_argument("--command", default="bench/run", help="the command to report")
    ap.add_argument("--pin", choices=("auto", "off"), default="auto",
                    help="auto: with four CPUs or more, run the load generators on the "
                         "upper half and everything served on the lower half; off: share")
    args = ap.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    missing = [p for p in ("nginx", "haproxy", "wrk", "iperf3", "curl") if not have(p)]
    if missing:
        print(f"bench: missing programs: {' '.join(missing)}", file=sys.stderr)
        return 2

    plan = CpuPlan.make(args.pin)
    plan.apply()
    log(f"CPUs: {plan.describe()}")
    bench = Bench(args, plan)
    atexit.register(bench.procs.stop_all)

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")

    # SIGINT too: a shell may have started this run with SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    load_before = loadavg()
    run = Run(bench, args.quick, args.gateway_cpu)
    started = time.monotonic()
    try:
        results = run.all({o for o in args.only.split(",") if o})
    finally:
        bench.procs.stop_all()
    if run.errors or args.keep:
        log(f"done in {time.monotonic() - started:.0f} s; logs kept in {bench.work}")
    else:
        shutil.rmtree(bench.work, ignore_errors=True)
        log(f"done in {time.monotonic() - started:.0f} s")
    text = report(results, args.command, args.quick, bench.zero_relay_default, load_before,
                  loadavg(), run.errors, run.secs, run.rounds, args.gateway_cpu, plan,
                  bench.native_sockets)
    print(text)
    only = {o for o in args.only.split(",") if o}
    sections = {"stack": (stack, "Kernel stack and smoltcp (issue 21)"),
                "upgrade": (upgrade, "Upgrade in place under load (issue 19)")}
    if args.doc and len(only) == 1 and next(iter(only)) in sections:
        # A section alone: its own block, the end-to-end one kept.
        key = next(iter(only))
        module, heading = sections[key]
        out = [f"Run of {datetime.date.today().isoformat()}{' (--quick)' if args.quick else ''}, "
               f"`{args.command}`; {machine()}; load average {load_before} before, "
               f"{loadavg()} after; {plan.describe()}.\n"]
        module.table(out, results[key], loadavg())
        write_doc(args.doc, "\n".join(out).replace("\n\n\n", "\n\n"), module.BEGIN,
                  module.END, heading)
        log(f"wrote the {key} section of {args.doc}")
    elif args.doc:
        write_doc(args.doc, text)
        log(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"bench: stopped ({e or 'interrupted'}); every process it started was ended",
              file=sys.stderr)
        sys.exit(130)
